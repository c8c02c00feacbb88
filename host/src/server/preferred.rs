//! The default `GetPreferredAllocation` policy, used when a resource offers
//! preferred allocation but its backend leaves the choice to the host:
//! honour `must_include`, choose only from `available`, return exactly
//! `size` IDs (or all available if fewer), and use as few NUMA nodes as
//! possible.

use std::collections::{BTreeMap, BTreeSet};

use crate::backend::{Device, PreferredRequest};

/// Chooses devices for `request` among `devices` (the resource's current list).
pub fn choose(devices: &[Device], request: &PreferredRequest) -> Vec<String> {
    let available: BTreeSet<&str> = request.available.iter().map(String::as_str).collect();
    let mut chosen: Vec<String> = Vec::with_capacity(request.size);
    for id in &request.must_include {
        if available.contains(id.as_str()) && !chosen.contains(id) && chosen.len() < request.size {
            chosen.push(id.clone());
        }
    }
    let numa_of = |id: &str| -> Vec<i64> {
        devices.iter().find(|d| d.id == id).map(|d| d.numa_nodes.clone()).unwrap_or_default()
    };
    // Candidates grouped by their first NUMA node (-1: no affinity).
    let mut groups: BTreeMap<i64, Vec<&str>> = BTreeMap::new();
    for &id in &available {
        if !chosen.iter().any(|c| c == id) {
            groups.entry(numa_of(id).first().copied().unwrap_or(-1)).or_default().push(id);
        }
    }
    let used: BTreeSet<i64> = chosen.iter().flat_map(|id| numa_of(id)).collect();
    // Nodes already used by must-include devices first, then the largest
    // groups (fewest nodes to fill the request), devices without affinity last.
    let mut order: Vec<(i64, Vec<&str>)> = groups.into_iter().collect();
    order.sort_by_key(|(node, ids)| (*node < 0, !used.contains(node), std::cmp::Reverse(ids.len()), *node));
    let needed = request.size.saturating_sub(chosen.len());
    // A single group that fits the rest beats splitting across nodes.
    if let Some(position) = order.iter().position(|(node, ids)| *node >= 0 && ids.len() >= needed)
        && !order[..position].iter().any(|(node, _)| used.contains(node))
    {
        let group = order.remove(position);
        order.insert(0, group);
    }
    for (_, ids) in order {
        for id in ids {
            if chosen.len() == request.size {
                return chosen;
            }
            chosen.push(id.to_owned());
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Health;

    fn device(id: &str, numa: &[i64]) -> Device {
        Device { id: id.into(), health: Health::Healthy, numa_nodes: numa.to_vec() }
    }

    fn request(available: &[&str], must: &[&str], size: usize) -> PreferredRequest {
        PreferredRequest {
            available: available.iter().map(|s| (*s).to_owned()).collect(),
            must_include: must.iter().map(|s| (*s).to_owned()).collect(),
            size,
        }
    }

    fn devices() -> Vec<Device> {
        vec![
            device("a0", &[0]),
            device("a1", &[0]),
            device("b0", &[1]),
            device("b1", &[1]),
            device("b2", &[1]),
            device("n", &[]),
        ]
    }

    #[test]
    fn fits_in_one_node_when_possible() {
        let chosen = choose(&devices(), &request(&["a0", "a1", "b0", "b1", "b2", "n"], &[], 3));
        assert_eq!(chosen, ["b0", "b1", "b2"]);
        let chosen = choose(&devices(), &request(&["a0", "a1", "b0", "b1", "b2", "n"], &[], 2));
        assert_eq!(chosen.len(), 2);
        let nodes: BTreeSet<i64> = chosen
            .iter()
            .map(|id| devices().iter().find(|d| &d.id == id).map(|d| d.numa_nodes[0]).unwrap_or(-1))
            .collect();
        assert_eq!(nodes.len(), 1, "{chosen:?}");
    }

    #[test]
    fn must_include_is_honoured_and_its_node_preferred() {
        let chosen = choose(&devices(), &request(&["a0", "a1", "b0", "b1", "b2"], &["a1"], 2));
        assert_eq!(chosen, ["a1", "a0"]);
    }

    #[test]
    fn only_available_ids_and_exact_size() {
        let chosen = choose(&devices(), &request(&["b0", "n"], &["zz"], 2));
        assert_eq!(chosen, ["b0", "n"], "zz is not available, n (no affinity) comes last");
        let chosen = choose(&devices(), &request(&["b0"], &[], 3));
        assert_eq!(chosen, ["b0"], "never more than available");
        assert!(choose(&devices(), &request(&["a0"], &[], 0)).is_empty());
    }
}
