//! Reading back what an earlier agent left pinned in the maps, so that a
//! restart rewrites nothing that is still right: the reconciler's record of
//! each installed service ([`Installed`]), the backend ids in use, the id
//! allocators' state, and the leftovers of an interrupted update to remove.
//! Pure: [`adopt`] reads a [`Dump`]; the reconciler does the deletes.
use std::collections::{HashMap, HashSet};

use discovery_common::{Backend, ServiceKey, Slot, SlotKey, TcpOpts};

use crate::{
    addr::Addr,
    ids::{IdPool, Reuse, SetIds},
    maps::Dump,
    tables::ResolvedSlot,
};

/// One service as the reconciler wrote (or adopted) it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// Known once this agent wrote it; the maps do not store names.
    pub service: Option<String>,
    pub set_id: u32,
    /// `Service::flags` (the policy).
    pub flags: u32,
    pub tcp: TcpOpts,
    /// `Service::stats_id`; kept for the service's lifetime.
    pub stats_id: u32,
    pub slots: Vec<ResolvedSlot>,
    /// Distinct backend ids the set references.
    pub ids: Vec<u32>,
}

/// The reconciler's state rebuilt from the maps.
#[derive(Debug)]
pub struct Adopted {
    pub installed: HashMap<ServiceKey, Installed>,
    /// Backend address → id, id → address, and how many installed services
    /// reference each id.
    pub backend_ids: HashMap<Addr, u32>,
    pub addrs: HashMap<u32, Addr>,
    pub refs: HashMap<u32, u32>,
    /// Backend ids: freed ones are reused oldest first, so an id is not
    /// rewritten while a program that read a stale slot may still be
    /// looking at it.
    pub backend_pool: IdPool,
    /// Service counter ids.
    pub stats_pool: IdPool,
    pub set_ids: SetIds,
    /// Leftovers of an interrupted update, to delete in this order: slots of
    /// no live set, then backends nothing references.
    pub stale_slots: Vec<SlotKey>,
    pub stale_backends: Vec<u32>,
}

/// Rebuilds the reconciler's state from what is in the maps.
/// `stats_capacity` bounds the service counter ids; `fresh`: the maps were
/// created empty by this agent (see `Dataplane::fresh`).
pub fn adopt(dump: Dump, stats_capacity: u32, fresh: bool) -> Adopted {
    let backends: HashMap<u32, Backend> = dump.backends.iter().copied().collect();
    let slots: HashMap<SlotKey, Slot> = dump.slots.iter().copied().collect();
    let mut installed = HashMap::new();
    let mut backend_ids = HashMap::new();
    let mut addrs = HashMap::new();
    let mut refs: HashMap<u32, u32> = HashMap::new();
    let mut live_slots = HashSet::new();
    let mut max_set = 0;
    for (key, svc) in dump.services {
        max_set = max_set.max(svc.set_id);
        let mut resolved = Vec::new();
        let mut ids = Vec::new();
        let mut complete = true;
        for i in 0..svc.count {
            let sk = SlotKey {
                set_id: svc.set_id,
                slot: i,
            };
            live_slots.insert(sk);
            let Some(slot) = slots.get(&sk) else {
                complete = false;
                continue;
            };
            match (backends.get(&slot.backend), backends.get(&slot.alias)) {
                (Some(b), Some(a)) => {
                    resolved.push(((b.addr, b.port), (a.addr, a.port), slot.threshold));
                    for id in [slot.backend, slot.alias] {
                        if !ids.contains(&id) {
                            ids.push(id);
                        }
                    }
                }
                _ => complete = false,
            }
        }
        if !complete {
            // Cannot happen with our write order; rewrite it from etcd.
            resolved.clear();
        }
        for &id in &ids {
            *refs.entry(id).or_default() += 1;
            let b = backends[&id];
            backend_ids.insert((b.addr, b.port), id);
            addrs.insert(id, (b.addr, b.port));
        }
        installed.insert(
            key,
            Installed {
                service: None,
                set_id: svc.set_id,
                flags: svc.flags,
                tcp: svc.tcp,
                stats_id: svc.stats_id,
                slots: resolved,
                ids,
            },
        );
    }
    // Counter ids: each adopted one once; a missing or shared one (maps
    // of an older agent) is 0 here, and the next apply assigns one.
    let mut seen = HashSet::new();
    for i in installed.values_mut() {
        if i.stats_id >= stats_capacity || !seen.insert(i.stats_id) {
            i.stats_id = 0;
        }
    }
    let mut stale_slots = Vec::new();
    for (sk, _) in &dump.slots {
        max_set = max_set.max(sk.set_id);
        if !live_slots.contains(sk) {
            stale_slots.push(*sk);
        }
    }
    let stale_backends = dump
        .backends
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !refs.contains_key(id))
        .collect();
    Adopted {
        backend_pool: IdPool::adopt(Reuse::Oldest, refs.keys().copied(), fresh),
        stats_pool: IdPool::adopt(Reuse::Newest, seen, fresh),
        set_ids: SetIds::adopt(max_set),
        installed,
        backend_ids,
        addrs,
        refs,
        stale_slots,
        stale_backends,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use discovery_common::{Addr16, BACKEND_F_VALID, IPPROTO_TCP, Service};

    fn backend(last: u8) -> Backend {
        Backend {
            addr: Addr16([last; 16]),
            port: 80,
            flags: BACKEND_F_VALID,
            ejected: 0,
        }
    }

    fn slot(set_id: u32, slot: u32, backend: u32, alias: u32) -> (SlotKey, Slot) {
        (
            SlotKey { set_id, slot },
            Slot {
                backend,
                alias,
                threshold: u32::MAX,
                pad: 0,
            },
        )
    }

    fn service(port: u16, set_id: u32, count: u32, stats_id: u32) -> (ServiceKey, Service) {
        (
            ServiceKey {
                addr: Addr16([127; 16]),
                port,
                proto: IPPROTO_TCP,
                pad: 0,
            },
            Service {
                set_id,
                count,
                flags: 0,
                stats_id,
                tcp: TcpOpts::default(),
            },
        )
    }

    #[test]
    fn adopts_live_sets_and_lists_the_leftovers() {
        let dump = Dump {
            services: vec![
                service(80, 3, 2, 4),
                // Slot 1 of its set is missing: adopted empty.
                service(81, 5, 2, 4),
            ],
            slots: vec![
                slot(3, 0, 1, 1),
                slot(3, 1, 4, 1),
                slot(5, 0, 4, 4),
                // Of no live set.
                slot(9, 0, 1, 1),
            ],
            backends: vec![(1, backend(1)), (4, backend(4)), (6, backend(6))],
        };
        let mut a = adopt(dump, 100, false);
        let (web, other) = (service(80, 0, 0, 0).0, service(81, 0, 0, 0).0);
        let w = &a.installed[&web];
        assert_eq!(
            (w.set_id, w.ids.as_slice(), w.slots.len()),
            (3, &[1, 4][..], 2)
        );
        let o = &a.installed[&other];
        assert!(o.slots.is_empty(), "incomplete set is rewritten");
        assert_eq!(o.ids, [4], "but its backends stay referenced");
        assert_eq!(a.refs, HashMap::from([(1, 1), (4, 2)]));
        assert_eq!(a.backend_ids[&(Addr16([4; 16]), 80)], 4);
        // One of the two services sharing counters keeps them.
        let mut stats: Vec<u32> = a.installed.values().map(|i| i.stats_id).collect();
        stats.sort();
        assert_eq!(stats, [0, 4]);
        assert_eq!(a.stale_slots, [SlotKey { set_id: 9, slot: 0 }]);
        assert_eq!(a.stale_backends, [6]);
        // Allocators continue above what is in use.
        let next = |p: &mut IdPool| p.alloc(100).unwrap().id;
        assert_eq!(next(&mut a.backend_pool), 2);
        assert_eq!(next(&mut a.stats_pool), 3);
        assert_eq!(a.set_ids.alloc(HashSet::new), 10);
    }

    #[test]
    fn counter_ids_beyond_the_capacity_are_dropped() {
        let dump = Dump {
            services: vec![service(80, 0, 0, 50)],
            ..Dump::default()
        };
        let a = adopt(dump, 10, false);
        assert_eq!(a.installed.values().next().unwrap().stats_id, 0);
    }
}
