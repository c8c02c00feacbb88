//! The default `GetPreferredAllocation` policy, used when a resource offers
//! preferred allocation but its backend leaves the choice to the host:
//! honour `must_include`, choose only from `available`, return exactly
//! `size` IDs (or all available if fewer), and use as few NUMA nodes as
//! possible.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};

use crate::device_state::Snapshot;
use crate::model::{Device, PreferredRequest, ReplicaPolicy};

/// The `must_include` IDs that are available, each once, up to `size`:
/// every policy starts from these. With the set of available IDs, the IDs
/// still free to choose from, in `available` order without repeats.
fn start(request: &PreferredRequest) -> (Vec<String>, Vec<&str>) {
    let available: HashSet<&str> = request.available.iter().map(String::as_str).collect();
    // `size` comes from the wire: never reserve by it.
    let mut chosen: Vec<String> = Vec::with_capacity(request.size.min(request.available.len()));
    let mut taken: HashSet<&str> = HashSet::new();
    for id in &request.must_include {
        if chosen.len() < request.size && available.contains(id.as_str()) && taken.insert(id) {
            chosen.push(id.clone());
        }
    }
    let free = request.available.iter().map(String::as_str).filter(|id| taken.insert(id)).collect();
    (chosen, free)
}

/// Chooses devices for `request` among `devices` (the resource's current
/// list). O(n log n) in the number of IDs.
pub fn choose(devices: &[Device], request: &PreferredRequest) -> Vec<String> {
    let (mut chosen, free) = start(request);
    let numa: HashMap<&str, &[i64]> = devices.iter().map(|d| (d.id.as_str(), d.numa_nodes.as_slice())).collect();
    let numa_of = |id: &str| numa.get(id).copied().unwrap_or_default();
    // Candidates grouped by their first NUMA node (-1: no affinity), each
    // group in ID order.
    let mut groups: BTreeMap<i64, Vec<&str>> = BTreeMap::new();
    for id in free {
        groups.entry(numa_of(id).first().copied().unwrap_or(-1)).or_default().push(id);
    }
    let used: BTreeSet<i64> = chosen.iter().flat_map(|id| numa_of(id).iter().copied()).collect();
    // Nodes already used by must-include devices first, then the largest
    // groups (fewest nodes to fill the request), devices without affinity last.
    let mut order: Vec<(i64, Vec<&str>)> = groups.into_iter().collect();
    order.sort_by_key(|(node, ids)| (*node < 0, !used.contains(node), Reverse(ids.len()), *node));
    let needed = request.size.saturating_sub(chosen.len());
    // A single group that fits the rest beats splitting across nodes.
    if let Some(position) = order.iter().position(|(node, ids)| *node >= 0 && ids.len() >= needed)
        && !order[..position].iter().any(|(node, _)| used.contains(node))
    {
        let group = order.remove(position);
        order.insert(0, group);
    }
    for (_, mut ids) in order {
        ids.sort_unstable();
        for id in ids {
            if chosen.len() == request.size {
                return chosen;
            }
            chosen.push(id.to_owned());
        }
    }
    chosen
}

/// Chooses replicas of a shared resource: `must_include` first, then by
/// policy: `Spread` takes replicas of the least used real devices (one per
/// device before doubling up), `Pack` fills the most used devices first so
/// others stay whole. O(n log n): a heap of real devices keyed by policy.
pub fn choose_replicas(snapshot: &Snapshot, request: &PreferredRequest) -> Vec<String> {
    let (mut chosen, free_ids) = start(request);
    // Free replicas per real device; how many of each this answer holds.
    let mut free: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut taken: HashMap<&str, usize> = HashMap::new();
    for id in &chosen {
        if let Some(real) = snapshot.real_device(id) {
            *taken.entry(real.id.as_str()).or_default() += 1;
        }
    }
    for id in free_ids {
        if let Some(real) = snapshot.real_device(id) {
            free.entry(real.id.as_str()).or_default().push(id);
        }
    }
    for ids in free.values_mut() {
        // Taken from the end: the highest replica ID first.
        ids.sort_unstable();
    }
    let replicas = snapshot.sharing.replicas;
    let policy = snapshot.sharing.policy;
    // The heap's top is the device to take a replica of next. Only the key
    // of the device just taken from changes, so it is pushed back anew.
    let key = |real, in_answer: usize, free_left: usize| {
        let used = replicas.saturating_sub(free_left);
        match policy {
            // Fewest in this answer, then least used elsewhere.
            ReplicaPolicy::Spread => Reverse((in_answer, used, real)),
            // Most in this answer, then most used elsewhere.
            ReplicaPolicy::Pack => Reverse((usize::MAX - in_answer, replicas - used, real)),
        }
    };
    let mut heap: BinaryHeap<_> = free
        .iter()
        .filter(|(_, ids)| !ids.is_empty())
        .map(|(&real, ids)| key(real, taken.get(real).copied().unwrap_or(0), ids.len()))
        .collect();
    while chosen.len() < request.size {
        let Some(Reverse((_, _, real))) = heap.pop() else { break };
        let Some(ids) = free.get_mut(real) else { continue };
        let Some(id) = ids.pop() else { continue };
        chosen.push(id.to_owned());
        let in_answer = taken.entry(real).or_default();
        *in_answer += 1;
        if !ids.is_empty() {
            heap.push(key(real, *in_answer, ids.len()));
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Health;

    fn device(id: &str, numa: &[i64]) -> Device {
        Device::new(id, Health::Healthy).with_numa_nodes(numa.to_vec())
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

    fn shared(policy: ReplicaPolicy) -> std::sync::Arc<Snapshot> {
        let state = crate::device_state::ResourceState::new("r.io/x");
        state.publish(vec![device("a", &[0]), device("b", &[0]), device("c", &[1])]).expect("valid");
        state.set_sharing(crate::model::Sharing { replicas: 3, policy }).expect("fits");
        state.snapshot()
    }

    fn reals(ids: &[String]) -> Vec<&str> {
        ids.iter().map(|id| id.split("::").next().unwrap_or_default()).collect()
    }

    #[test]
    fn spread_uses_distinct_and_least_used_devices() {
        let snapshot = shared(ReplicaPolicy::Spread);
        // a is busy (only one free replica left), b and c are idle.
        let chosen =
            choose_replicas(&snapshot, &request(&["a::0", "b::0", "b::1", "b::2", "c::0", "c::1", "c::2"], &[], 2));
        assert_eq!(reals(&chosen), ["b", "c"], "{chosen:?}");
        let chosen = choose_replicas(&snapshot, &request(&["a::0", "b::0", "b::1", "c::0"], &[], 4));
        assert_eq!(chosen.len(), 4);
        let mut devices = reals(&chosen);
        devices.sort_unstable();
        assert_eq!(devices, ["a", "b", "b", "c"], "one per device before doubling up");
    }

    #[test]
    fn pack_fills_the_most_used_device_first() {
        let snapshot = shared(ReplicaPolicy::Pack);
        let chosen =
            choose_replicas(&snapshot, &request(&["a::0", "b::0", "b::1", "b::2", "c::0", "c::1", "c::2"], &[], 1));
        assert_eq!(reals(&chosen), ["a"], "a is the most used device");
        let chosen =
            choose_replicas(&snapshot, &request(&["b::0", "b::1", "b::2", "c::0", "c::1", "c::2"], &["c::1"], 3));
        assert_eq!(chosen[0], "c::1");
        assert_eq!(reals(&chosen), ["c", "c", "c"], "packed onto the must-include device: {chosen:?}");
    }

    #[test]
    fn a_huge_size_from_the_wire_returns_what_is_available() {
        let huge = usize::try_from(i32::MAX).expect("fits");
        let chosen = choose(&devices(), &request(&["a0", "b0"], &[], huge));
        assert_eq!(chosen.len(), 2);
        // What was reserved is bounded by what is available, not by the
        // size from the wire (which once reserved ~48 GiB).
        assert!(chosen.capacity() <= 2, "reserved {} entries", chosen.capacity());
        let replicas = choose_replicas(&shared(ReplicaPolicy::Spread), &request(&["a::0", "b::1"], &[], huge));
        assert_eq!(replicas.len(), 2);
        assert!(replicas.capacity() <= 2, "reserved {} entries", replicas.capacity());
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
