//! Preferred allocation over a described topology: a pure function of the
//! GPUs' NUMA nodes and the pairwise [`Link`]s, so it is tested without
//! NVML. The best answer spans the fewest NUMA nodes; among those, the one
//! whose GPUs share the best links (most NVLinks, then the closest PCIe
//! path); ties go to the lowest GPU indices.

use std::cmp::Reverse;
use std::collections::BTreeSet;

use crate::model::{Gpu, Link};

/// Above this many candidate sets the search is greedy, not exhaustive.
const EXHAUSTIVE_LIMIT: u128 = 20_000;

/// The GPUs of a node, in index order, and how each pair is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    ids: Vec<String>,
    numa: Vec<Option<i64>>,
    links: Vec<Vec<Link>>,
}

/// What makes one candidate set better than another: smaller is better.
type Key = (usize, Reverse<u64>, Vec<usize>);

impl Topology {
    /// Describes `gpus` with `link(a, b)` for every pair.
    pub fn new(gpus: &[Gpu], link: impl Fn(&Gpu, &Gpu) -> Link) -> Self {
        let mut links = vec![vec![Link::default(); gpus.len()]; gpus.len()];
        for (i, a) in gpus.iter().enumerate() {
            for (j, b) in gpus.iter().enumerate().skip(i + 1) {
                let l = link(a, b);
                links[i][j] = l;
                links[j][i] = l;
            }
        }
        Topology {
            ids: gpus.iter().map(|g| g.uuid.clone()).collect(),
            numa: gpus.iter().map(|g| g.numa_node).collect(),
            links,
        }
    }

    fn position(&self, id: &str) -> Result<usize, String> {
        self.ids.iter().position(|known| known == id).ok_or_else(|| format!("unknown GPU {id}"))
    }

    fn key(&self, set: &[usize]) -> Key {
        let nodes: BTreeSet<i64> = set.iter().filter_map(|&i| self.numa[i]).collect();
        let mut links = 0;
        for (n, &a) in set.iter().enumerate() {
            for &b in &set[n + 1..] {
                links += self.links[a][b].score();
            }
        }
        let mut sorted = set.to_vec();
        sorted.sort_unstable();
        (nodes.len(), Reverse(links), sorted)
    }

    /// Chooses `size` GPUs from `available`, including all of
    /// `must_include`. Errors name an unknown ID or an impossible request.
    pub fn preferred(&self, available: &[String], must_include: &[String], size: usize) -> Result<Vec<String>, String> {
        let mut must = Vec::new();
        for id in must_include {
            let p = self.position(id)?;
            if !must.contains(&p) {
                must.push(p);
            }
        }
        let mut candidates = Vec::new();
        for id in available {
            let p = self.position(id)?;
            if !must.contains(&p) && !candidates.contains(&p) {
                candidates.push(p);
            }
        }
        candidates.sort_unstable();
        if must.len() > size || must.len() + candidates.len() < size {
            return Err(format!(
                "cannot choose {size} GPUs from {} available including {} required",
                must.len() + candidates.len(),
                must.len()
            ));
        }
        let wanted = size - must.len();
        let chosen = if combinations(candidates.len(), wanted) <= EXHAUSTIVE_LIMIT {
            self.exhaustive(&must, &candidates, wanted)
        } else {
            self.greedy(&must, &candidates, wanted)
        };
        Ok(chosen.into_iter().map(|i| self.ids[i].clone()).collect())
    }

    /// Tries every set of `wanted` candidates.
    fn exhaustive(&self, must: &[usize], candidates: &[usize], wanted: usize) -> Vec<usize> {
        let mut best: Option<Key> = None;
        let mut picks: Vec<usize> = (0..wanted).collect();
        loop {
            let set: Vec<usize> = must.iter().copied().chain(picks.iter().map(|&p| candidates[p])).collect();
            let key = self.key(&set);
            if best.as_ref().is_none_or(|b| key < *b) {
                best = Some(key);
            }
            // Next combination of `wanted` out of `candidates.len()`.
            let Some(i) = (0..wanted).rev().find(|&i| picks[i] < candidates.len() - wanted + i) else { break };
            picks[i] += 1;
            for j in i + 1..wanted {
                picks[j] = picks[j - 1] + 1;
            }
        }
        best.map(|(_, _, set)| set).unwrap_or_else(|| must.to_vec())
    }

    /// Grows a set one GPU at a time from each possible seed and keeps the
    /// best result: for large nodes where trying every set costs too much.
    fn greedy(&self, must: &[usize], candidates: &[usize], wanted: usize) -> Vec<usize> {
        let seeds: Vec<Option<usize>> =
            if must.is_empty() { candidates.iter().map(|&c| Some(c)).collect() } else { vec![None] };
        let mut best: Option<Key> = None;
        for seed in seeds {
            let mut set: Vec<usize> = must.iter().copied().chain(seed).collect();
            while set.len() < must.len() + wanted {
                let next = candidates
                    .iter()
                    .filter(|c| !set.contains(c))
                    .map(|&c| {
                        let mut grown = set.clone();
                        grown.push(c);
                        (self.key(&grown), c)
                    })
                    .min();
                match next {
                    Some((_, c)) => set.push(c),
                    None => break,
                }
            }
            let key = self.key(&set);
            if best.as_ref().is_none_or(|b| key < *b) {
                best = Some(key);
            }
        }
        best.map(|(_, _, set)| set).unwrap_or_else(|| must.to_vec())
    }
}

/// `n` choose `k`, saturating.
fn combinations(n: usize, k: usize) -> u128 {
    let k = k.min(n.saturating_sub(k)) as u128;
    let mut result: u128 = 1;
    for i in 0..k {
        result = result.saturating_mul(n as u128 - i) / (i + 1);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(i: u32, numa: Option<i64>) -> Gpu {
        Gpu {
            uuid: format!("GPU-{i}"),
            index: i,
            minor: i,
            bus_id: format!("00000000:{:02X}:00.0", i + 1),
            numa_node: numa,
            memory_bytes: 0,
            mig_enabled: Some(false),
            name: "Test GPU".into(),
            details: Default::default(),
        }
    }

    fn ids(list: &[u32]) -> Vec<String> {
        list.iter().map(|i| format!("GPU-{i}")).collect()
    }

    /// Eight GPUs, four per NUMA node, PCIe only: 0-3 on node 0, 4-7 on 1.
    fn two_sockets(link: impl Fn(u32, u32) -> Link) -> Topology {
        let gpus: Vec<Gpu> = (0..8).map(|i| gpu(i, Some(i64::from(i / 4)))).collect();
        Topology::new(&gpus, |a, b| link(a.index, b.index))
    }

    fn pcie(a: u32, b: u32) -> Link {
        Link { nvlinks: 0, pcie: if a / 4 == b / 4 { 2 } else { 1 } }
    }

    #[test]
    fn one_numa_node_is_preferred_over_the_lowest_indices() {
        let topology = two_sockets(pcie);
        // 1 and 2 are gone: two from node 0 would be 0 and 3, but three
        // from one node means node 1.
        let available = ids(&[0, 3, 4, 5, 6, 7]);
        assert_eq!(topology.preferred(&available, &[], 3), Ok(ids(&[4, 5, 6])));
        assert_eq!(topology.preferred(&available, &[], 2), Ok(ids(&[0, 3])));
        // must_include pulls the choice onto its node.
        assert_eq!(topology.preferred(&ids(&[0, 3, 4, 5, 6, 7]), &ids(&[7]), 2), Ok(ids(&[4, 7])));
    }

    #[test]
    fn nvlink_pairs_win_within_a_numa_node() {
        // NVLink pairs (0,1), (2,3) with 2 links, and (1,2) with 4 links.
        let topology = two_sockets(|a, b| match (a.min(b), a.max(b)) {
            (0, 1) | (2, 3) => Link { nvlinks: 2, pcie: 2 },
            (1, 2) => Link { nvlinks: 4, pcie: 2 },
            (a, b) => pcie(a, b),
        });
        let all = ids(&[0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(topology.preferred(&all, &[], 2), Ok(ids(&[1, 2])), "the most links");
        assert_eq!(topology.preferred(&all, &ids(&[0]), 2), Ok(ids(&[0, 1])));
        assert_eq!(topology.preferred(&all, &ids(&[3]), 2), Ok(ids(&[2, 3])));
        assert_eq!(topology.preferred(&all, &[], 3), Ok(ids(&[0, 1, 2])));
        // Without 1 and 2, the remaining NVLink-less choice is the lowest.
        assert_eq!(topology.preferred(&ids(&[0, 3, 4, 5]), &[], 2), Ok(ids(&[0, 3])));
    }

    #[test]
    fn numa_beats_nvlink_across_sockets_and_pcie_breaks_ties() {
        let topology = two_sockets(|a, b| match (a.min(b), a.max(b)) {
            (3, 4) => Link { nvlinks: 1, pcie: 1 },
            (5, 6) => Link { nvlinks: 0, pcie: 5 },
            (a, b) => pcie(a, b),
        });
        // 3 and 4 share an NVLink but two NUMA nodes; 5 and 6 share a
        // PCIe switch on one node.
        assert_eq!(topology.preferred(&ids(&[3, 4, 5, 6]), &[], 2), Ok(ids(&[5, 6])));
    }

    #[test]
    fn gpus_without_numa_information_are_chosen_by_links_alone() {
        let gpus: Vec<Gpu> = (0..4).map(|i| gpu(i, None)).collect();
        let topology = Topology::new(&gpus, |a, b| {
            if (a.index, b.index) == (1, 3) { Link { nvlinks: 6, pcie: 1 } } else { Link { nvlinks: 0, pcie: 1 } }
        });
        assert_eq!(topology.preferred(&ids(&[0, 1, 2, 3]), &[], 2), Ok(ids(&[1, 3])));
    }

    #[test]
    fn large_nodes_use_the_greedy_search_with_the_same_preferences() {
        // 64 GPUs on 4 NUMA nodes; choosing 16 from 64 is far past the
        // exhaustive limit.
        let gpus: Vec<Gpu> = (0..64).map(|i| gpu(i, Some(i64::from(i / 16)))).collect();
        let topology =
            Topology::new(&gpus, |a, b| Link { nvlinks: 0, pcie: if a.index / 16 == b.index / 16 { 2 } else { 1 } });
        let available: Vec<u32> = (0..64).filter(|i| i % 16 != 0 || *i == 48).collect();
        let chosen = topology.preferred(&ids(&available), &[], 16).expect("a choice");
        assert_eq!(chosen, ids(&(48..64).collect::<Vec<_>>()), "the only node with 16 free GPUs");
        assert!(combinations(63, 16) > EXHAUSTIVE_LIMIT);
    }

    #[test]
    fn impossible_requests_and_unknown_ids_are_errors() {
        let topology = two_sockets(pcie);
        assert_eq!(
            topology.preferred(&ids(&[0, 1]), &[], 3),
            Err("cannot choose 3 GPUs from 2 available including 0 required".into())
        );
        assert_eq!(
            topology.preferred(&ids(&[0]), &ids(&[1, 2]), 1),
            Err("cannot choose 1 GPUs from 3 available including 2 required".into())
        );
        assert_eq!(topology.preferred(&["GPU-x".to_owned()], &[], 1), Err("unknown GPU GPU-x".into()));
        assert_eq!(topology.preferred(&ids(&[0, 0, 1]), &ids(&[1]), 2), Ok(ids(&[0, 1])), "duplicates count once");
    }

    #[test]
    fn combinations_count() {
        assert_eq!(combinations(8, 3), 56);
        assert_eq!(combinations(5, 0), 1);
        assert_eq!(combinations(5, 5), 1);
    }
}
