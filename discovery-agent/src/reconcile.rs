//! Diffs the desired routing table against what is in the maps and writes
//! only the difference, in an order that never lets a connect() see a
//! half-written service:
//!
//! 1. new backend entries,
//! 2. the slots of a brand-new backend set,
//! 3. the service entry, flipped to the new set in one map update,
//! 4. the old set's slots, then backends nothing references any more.
//!
//! A failed write (map full, memory) is undone and leaves the service on its
//! previous set; other services are not affected.
//!
//! The slot tables come from [`crate::tables`] and the ids from
//! [`crate::ids`]; [`Reconciler::new`] takes over the pinned maps through
//! [`crate::adopt`].
use std::collections::{BTreeMap, BTreeSet, HashMap};

use discovery_common::{
    BACKEND_F_VALID, Backend, SVC_F_CONSISTENT, SVC_F_LEAST_CONN, Service, ServiceKey, Slot,
    SlotKey,
};

use crate::{
    addr::Addr,
    adopt::{Installed, adopt},
    desired::{Desired, DesiredService},
    ids::{Allocated, IdPool, SetIds},
    maps::{Dataplane, MapError, StatsSlot},
    schema::Policy,
    tables::desired_slots,
};

/// The entry of a backend in use, not ejected.
fn live_backend(addr: Addr) -> Backend {
    Backend {
        addr: addr.0,
        port: addr.1,
        flags: BACKEND_F_VALID,
        ejected: 0,
    }
}

/// `ip:port/proto` of a map key, for messages.
pub fn frontend_of(key: &ServiceKey) -> String {
    crate::addr::frontend(key)
}

/// One service written to the maps, for the caller to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Updated {
        key: ServiceKey,
        service: String,
        frontend: String,
        backends: usize,
        slots: usize,
    },
    Removed {
        key: ServiceKey,
        /// None for an entry adopted from an earlier run.
        service: Option<String>,
    },
}

#[derive(Debug, thiserror::Error)]
#[error("service {service} ({frontend}): {source}")]
pub struct ApplyError {
    pub key: ServiceKey,
    pub service: String,
    pub frontend: String,
    #[source]
    pub source: MapError,
}

pub struct Reconciler<D: Dataplane> {
    dp: D,
    installed: HashMap<ServiceKey, Installed>,
    backend_ids: HashMap<Addr, u32>,
    addrs: HashMap<u32, Addr>,
    refs: HashMap<u32, u32>,
    /// Freed ids are reused oldest first, so an id is not rewritten while a
    /// program that read a stale slot may still be looking at it.
    backend_pool: IdPool,
    /// Service counter ids.
    stats_pool: IdPool,
    set_ids: SetIds,
}

impl<D: Dataplane> Reconciler<D> {
    /// Adopts what is already in the maps (pinned by an earlier agent) so a
    /// restart rewrites nothing that is still right. Leftovers of an update
    /// that was interrupted (slots of no live set, unreferenced backends)
    /// are removed.
    pub fn new(mut dp: D) -> Result<Self, MapError> {
        let a = adopt(dp.dump()?, dp.service_stats_capacity(), dp.fresh());
        for sk in &a.stale_slots {
            dp.delete_slot(*sk)?;
        }
        for id in &a.stale_backends {
            dp.clear_backend(*id)?;
        }
        Ok(Self {
            dp,
            installed: a.installed,
            backend_ids: a.backend_ids,
            addrs: a.addrs,
            refs: a.refs,
            backend_pool: a.backend_pool,
            stats_pool: a.stats_pool,
            set_ids: a.set_ids,
        })
    }

    /// Whether the kernel's ejection of a backend is in force now.
    pub fn kernel_ejected(&self, addr: std::net::SocketAddr) -> bool {
        self.backend_ids
            .get(&crate::addr::from_socket(addr))
            .is_some_and(|&id| self.dp.ejected_until(id) > crate::util::boot_secs())
    }

    pub fn dataplane_mut(&mut self) -> &mut D {
        &mut self.dp
    }

    pub fn dataplane(&self) -> &D {
        &self.dp
    }

    pub fn services_installed(&self) -> usize {
        self.installed.len()
    }

    /// Brings the maps to `desired`, returning what changed and what failed.
    /// Removals go first so their room is free for additions.
    pub fn reconcile(&mut self, desired: &Desired) -> (Vec<Change>, Vec<ApplyError>) {
        self.reconcile_scoped(desired, None)
    }

    /// Like `reconcile`, for the frontends in `scope` only: `desired` holds
    /// (at least) their wanted state, and a frontend in scope that it does
    /// not hold is removed. Everything else is left as it is.
    pub fn reconcile_keys(
        &mut self,
        desired: &Desired,
        scope: &BTreeSet<ServiceKey>,
    ) -> (Vec<Change>, Vec<ApplyError>) {
        self.reconcile_scoped(desired, Some(scope))
    }

    fn reconcile_scoped(
        &mut self,
        desired: &Desired,
        scope: Option<&BTreeSet<ServiceKey>>,
    ) -> (Vec<Change>, Vec<ApplyError>) {
        let mut changes = Vec::new();
        let mut errors = Vec::new();
        let in_scope = |k: &ServiceKey| scope.is_none_or(|s| s.contains(k));
        let stale: Vec<ServiceKey> = match scope {
            None => self.installed.keys().copied().collect::<Vec<_>>(),
            Some(s) => s.iter().copied().collect::<Vec<_>>(),
        }
        .into_iter()
        .filter(|k| self.installed.contains_key(k) && !desired.services.contains_key(k))
        .collect();
        for key in stale {
            let service = self.installed.get(&key).and_then(|i| i.service.clone());
            match self.remove(key) {
                Ok(()) => changes.push(Change::Removed { key, service }),
                Err(source) => errors.push(ApplyError {
                    key,
                    service: service.unwrap_or_else(|| "(adopted)".into()),
                    frontend: frontend_of(&key),
                    source,
                }),
            }
        }
        for (key, svc) in desired.services.iter().filter(|(k, _)| in_scope(k)) {
            match self.apply(*key, svc) {
                Ok(Some(c)) => changes.push(c),
                Ok(None) => {}
                Err(source) => errors.push(ApplyError {
                    key: *key,
                    service: svc.service.clone(),
                    frontend: frontend_of(key),
                    source,
                }),
            }
        }
        (changes, errors)
    }

    /// A zeroed counters slot for a new service; 0 (no counters) if all
    /// are taken, which the services map being full already reports.
    fn alloc_stats(&mut self) -> u32 {
        let Some(a) = self.stats_pool.alloc(self.dp.service_stats_capacity()) else {
            return 0;
        };
        if a.used_before {
            self.dp.reset_stats(StatsSlot::Service(a.id));
        }
        a.id
    }

    /// A set id no live set has (see [`SetIds`]).
    fn alloc_set(&mut self) -> u32 {
        let installed = &self.installed;
        self.set_ids
            .alloc(|| installed.values().map(|i| i.set_id).collect())
    }

    /// Drops one reference to each id; unreferenced backends are cleared.
    fn release(&mut self, ids: &[u32]) -> Result<(), MapError> {
        for &id in ids {
            let r = self.refs.get_mut(&id).expect("released id is referenced");
            *r -= 1;
            if *r == 0 {
                self.refs.remove(&id);
                if let Some(addr) = self.addrs.remove(&id) {
                    self.backend_ids.remove(&addr);
                }
                self.dp.clear_backend(id)?;
                self.backend_pool.free(id);
            }
        }
        Ok(())
    }

    fn remove(&mut self, key: ServiceKey) -> Result<(), MapError> {
        let Some(old) = self.installed.get(&key).cloned() else {
            return Ok(());
        };
        self.dp.delete_service(key)?;
        self.installed.remove(&key);
        if old.stats_id != 0 {
            self.stats_pool.free(old.stats_id);
        }
        for i in 0..old.slots.len() as u32 {
            self.dp.delete_slot(SlotKey {
                set_id: old.set_id,
                slot: i,
            })?;
        }
        self.release(&old.ids)
    }

    fn apply(&mut self, key: ServiceKey, svc: &DesiredService) -> Result<Option<Change>, MapError> {
        let want = desired_slots(svc);
        let flags = match svc.policy {
            Policy::Random => 0,
            Policy::Consistent => SVC_F_CONSISTENT,
            Policy::LeastConn => SVC_F_LEAST_CONN,
        };
        if let Some(cur) = self.installed.get(&key)
            && cur.slots == want
            && cur.flags == flags
            && cur.tcp == svc.tcp
            && cur.stats_id != 0
        {
            return Ok(None);
        }
        // 1. Backends: reuse ids of addresses already present, write new ones.
        let mut ids_of: BTreeMap<Addr, u32> = BTreeMap::new();
        let mut result = Ok(());
        for (b, a, _) in &want {
            for addr in [*b, *a] {
                if ids_of.contains_key(&addr) {
                    continue;
                }
                let id = match self.backend_ids.get(&addr) {
                    Some(&id) => id,
                    None => {
                        let capacity = self.dp.backend_capacity();
                        let Some(Allocated { id, used_before }) = self.backend_pool.alloc(capacity)
                        else {
                            result = Err(MapError {
                                map: discovery_common::names::BACKENDS,
                                op: "allocate backend",
                                source: std::io::Error::other(format!(
                                    "all {} backend entries are in use (raise --max-backends)",
                                    self.dp.backend_capacity() - 1
                                )),
                            });
                            break;
                        };
                        let entry = live_backend(addr);
                        // Counters first, so the first connect is counted.
                        if used_before {
                            self.dp.reset_stats(StatsSlot::Backend(id));
                        }
                        if let Err(e) = self.dp.set_backend(id, entry) {
                            self.backend_pool.give_back(id);
                            result = Err(e);
                            break;
                        }
                        self.backend_ids.insert(addr, id);
                        self.addrs.insert(id, addr);
                        self.refs.insert(id, 0);
                        id
                    }
                };
                ids_of.insert(addr, id);
            }
            if result.is_err() {
                break;
            }
        }
        let ids: Vec<u32> = ids_of.values().copied().collect();
        // Hold a reference while writing so a failure can release uniformly.
        for id in &ids {
            *self.refs.get_mut(id).expect("id registered") += 1;
        }
        let set_id = if want.is_empty() { 0 } else { self.alloc_set() };
        // 2. Slots of the new set.
        let mut written = 0u32;
        if result.is_ok() {
            for (i, (b, a, t)) in want.iter().enumerate() {
                let slot = Slot {
                    backend: ids_of[b],
                    alias: ids_of[a],
                    threshold: *t,
                    pad: 0,
                };
                if let Err(e) = self.dp.set_slot(
                    SlotKey {
                        set_id,
                        slot: i as u32,
                    },
                    slot,
                ) {
                    result = Err(e);
                    break;
                }
                written += 1;
            }
        }
        // 3. Flip; a new service's counters are zeroed before its first
        // connect.
        let kept_stats = self.installed.get(&key).map_or(0, |i| i.stats_id);
        let stats_id = match kept_stats {
            0 if result.is_ok() => self.alloc_stats(),
            id => id,
        };
        if result.is_ok() {
            result = self.dp.set_service(
                key,
                Service {
                    set_id,
                    count: want.len() as u32,
                    flags,
                    stats_id,
                    tcp: svc.tcp,
                },
            );
        }
        if let Err(e) = result {
            for i in 0..written {
                let _ = self.dp.delete_slot(SlotKey { set_id, slot: i });
            }
            // Fresh ids drop to zero references and are cleared here.
            let _ = self.release(&ids);
            if kept_stats == 0 && stats_id != 0 {
                self.stats_pool.give_back(stats_id);
            }
            return Err(e);
        }
        // 4. Old set and unreferenced backends.
        let old = self.installed.insert(
            key,
            Installed {
                service: Some(svc.service.clone()),
                set_id,
                flags,
                tcp: svc.tcp,
                stats_id,
                slots: want.clone(),
                ids,
            },
        );
        if let Some(old) = old {
            for i in 0..old.slots.len() as u32 {
                self.dp.delete_slot(SlotKey {
                    set_id: old.set_id,
                    slot: i,
                })?;
            }
            self.release(&old.ids)?;
        }
        Ok(Some(Change::Updated {
            key,
            service: svc.service.clone(),
            frontend: svc.frontend.to_string(),
            backends: svc.backends.len(),
            slots: want.len(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::service_key;
    use crate::maps::Dump;
    use crate::model::Model;
    use crate::tables::maglev_size;
    use discovery_common::IPPROTO_TCP;
    use std::collections::HashSet;

    /// In-memory maps that check, after every single write, that each
    /// service entry points at complete slots and valid backends: the
    /// invariant a concurrent connect() relies on.
    #[derive(Default)]
    pub struct FakeMaps {
        pub services: HashMap<ServiceKey, Service>,
        pub slots: HashMap<SlotKey, Slot>,
        pub backends: HashMap<u32, Backend>,
        pub cap: u32,
        pub slot_cap: usize,
        pub writes: usize,
        pub resets: Vec<StatsSlot>,
        pub fresh: bool,
    }

    impl FakeMaps {
        pub fn new(cap: u32, slot_cap: usize) -> Self {
            Self {
                cap,
                slot_cap,
                ..Default::default()
            }
        }

        fn check(&self) {
            let mut stats = HashSet::new();
            for (k, s) in &self.services {
                assert!(s.stats_id != 0, "{k:?} has no counters");
                assert!(stats.insert(s.stats_id), "{k:?} shares counters");
                for i in 0..s.count {
                    let slot = self
                        .slots
                        .get(&SlotKey {
                            set_id: s.set_id,
                            slot: i,
                        })
                        .unwrap_or_else(|| panic!("{k:?} points at missing slot {i}"));
                    for id in [slot.backend, slot.alias] {
                        assert!(
                            self.backends.contains_key(&id),
                            "{k:?} slot {i} points at missing backend {id}"
                        );
                    }
                }
            }
        }

        /// What a connect() to `key` can reach: (addr, probability).
        pub fn reachable(&self, key: &ServiceKey) -> Vec<(Addr, f64)> {
            let s = &self.services[key];
            let mut out: BTreeMap<Addr, f64> = BTreeMap::new();
            for i in 0..s.count {
                let slot = self.slots[&SlotKey {
                    set_id: s.set_id,
                    slot: i,
                }];
                let p = f64::from(slot.threshold) / 4294967296.0;
                let b = self.backends[&slot.backend];
                let a = self.backends[&slot.alias];
                *out.entry((b.addr, b.port)).or_default() += p / f64::from(s.count);
                *out.entry((a.addr, a.port)).or_default() += (1.0 - p) / f64::from(s.count);
            }
            out.into_iter().filter(|(_, p)| *p > 1e-6).collect()
        }
    }

    fn full() -> MapError {
        MapError {
            map: "fake",
            op: "update",
            source: std::io::Error::from_raw_os_error(libc::E2BIG),
        }
    }

    impl Dataplane for FakeMaps {
        fn set_backend(&mut self, id: u32, b: Backend) -> Result<(), MapError> {
            self.backends.insert(id, b);
            self.writes += 1;
            self.check();
            Ok(())
        }
        fn ejected_until(&self, id: u32) -> u32 {
            self.backends.get(&id).map_or(0, |b| b.ejected)
        }
        fn clear_backend(&mut self, id: u32) -> Result<(), MapError> {
            self.backends.remove(&id);
            self.writes += 1;
            self.check();
            Ok(())
        }
        fn set_slot(&mut self, key: SlotKey, slot: Slot) -> Result<(), MapError> {
            if !self.slots.contains_key(&key) && self.slots.len() >= self.slot_cap {
                return Err(full());
            }
            self.slots.insert(key, slot);
            self.writes += 1;
            self.check();
            Ok(())
        }
        fn delete_slot(&mut self, key: SlotKey) -> Result<(), MapError> {
            self.slots.remove(&key);
            self.writes += 1;
            self.check();
            Ok(())
        }
        fn set_service(&mut self, key: ServiceKey, svc: Service) -> Result<(), MapError> {
            self.services.insert(key, svc);
            self.writes += 1;
            self.check();
            Ok(())
        }
        fn delete_service(&mut self, key: ServiceKey) -> Result<(), MapError> {
            self.services.remove(&key);
            self.writes += 1;
            self.check();
            Ok(())
        }
        fn reset_stats(&mut self, slot: StatsSlot) {
            self.resets.push(slot);
        }
        fn service_stats_capacity(&self) -> u32 {
            self.cap
        }
        fn fresh(&self) -> bool {
            self.fresh
        }
        fn backend_capacity(&self) -> u32 {
            self.cap
        }
        fn dump(&self) -> Result<Dump, MapError> {
            Ok(Dump {
                services: self.services.iter().map(|(k, v)| (*k, *v)).collect(),
                slots: self.slots.iter().map(|(k, v)| (*k, *v)).collect(),
                backends: self.backends.iter().map(|(k, v)| (*k, *v)).collect(),
            })
        }
    }

    fn model() -> Model {
        let mut m = Model::new("/d/".into(), vec!["127.0.0.0/8".parse().unwrap()]);
        m.put("/d/services/web", br#"{"frontend":"127.0.0.1:80"}"#, 1);
        m
    }

    fn a(s: &str) -> Addr {
        crate::addr::from_socket(s.parse().unwrap())
    }

    fn web() -> ServiceKey {
        service_key("127.0.0.1:80".parse().unwrap(), IPPROTO_TCP)
    }

    #[test]
    fn consistent_services_carry_the_flag_and_a_full_table() {
        let mut m = Model::new("/d/".into(), vec!["127.0.0.0/8".parse().unwrap()]);
        m.put(
            "/d/services/web",
            br#"{"frontend":"127.0.0.1:80","policy":"consistent"}"#,
            1,
        );
        m.put("/d/backends/web/a", b"127.0.0.2:80", 2);
        m.put("/d/backends/web/b", b"127.0.0.3:80", 3);
        let mut r = Reconciler::new(FakeMaps::new(100, 10_000)).unwrap();
        r.reconcile(&m.desired());
        let svc = r.dataplane().services[&web()];
        assert_eq!(svc.flags, SVC_F_CONSISTENT);
        assert_eq!(svc.count as usize, maglev_size(2));
        let reach = r.dataplane().reachable(&web());
        assert_eq!(reach.len(), 2);
        assert!(
            reach.iter().all(|(_, p)| (p - 0.5).abs() < 0.05),
            "{reach:?}"
        );
        // Switching the policy rewrites the service even with the same backends.
        m.put("/d/services/web", br#"{"frontend":"127.0.0.1:80"}"#, 1);
        let (changes, _) = r.reconcile(&m.desired());
        assert_eq!(changes.len(), 1);
        assert_eq!(r.dataplane().services[&web()].flags, 0);
    }

    #[test]
    fn writes_only_the_difference_and_never_half_a_service() {
        let mut m = model();
        m.put("/d/backends/web/a", b"127.0.0.2:80", 2);
        m.put("/d/backends/web/b", b"127.0.0.3:80", 3);
        let mut r = Reconciler::new(FakeMaps::new(100, 100)).unwrap();
        let (changes, errors) = r.reconcile(&m.desired());
        assert!(errors.is_empty());
        assert_eq!(changes.len(), 1);
        let reach = r.dataplane().reachable(&web());
        assert_eq!(reach.len(), 2);
        // Same desired state: nothing written.
        let before = r.dataplane().writes;
        let (changes, _) = r.reconcile(&m.desired());
        assert!(changes.is_empty());
        assert_eq!(r.dataplane().writes, before);
        // Weight 0 takes b out; delete a then leaves b alone (all weight 0
        // means all in rotation).
        m.put(
            "/d/backends/web/b",
            br#"{"addr":"127.0.0.3:80","weight":0}"#,
            3,
        );
        r.reconcile(&m.desired());
        assert_eq!(
            r.dataplane().reachable(&web()),
            vec![(a("127.0.0.2:80"), 1.0)]
        );
        m.delete("/d/backends/web/a");
        r.reconcile(&m.desired());
        assert_eq!(
            r.dataplane().reachable(&web()),
            vec![(a("127.0.0.3:80"), 1.0)]
        );
        // Old sets and backends are gone.
        assert_eq!(r.dataplane().slots.len(), 1);
        assert_eq!(r.dataplane().backends.len(), 1);
        // Service delete removes everything.
        m.delete("/d/services/web");
        let (changes, _) = r.reconcile(&m.desired());
        assert_eq!(
            changes,
            vec![Change::Removed {
                key: web(),
                service: Some("web".into())
            }]
        );
        assert_eq!(frontend_of(&web()), "127.0.0.1:80/tcp");
        let dp = r.dataplane();
        assert!(dp.services.is_empty() && dp.slots.is_empty() && dp.backends.is_empty());
    }

    #[test]
    fn a_scoped_reconcile_touches_only_its_frontends() {
        let mut m = model();
        m.put("/d/backends/web/a", b"127.0.0.2:80", 2);
        m.put("/d/services/other", br#"{"frontend":"127.0.0.1:81"}"#, 9);
        m.put("/d/backends/other/a", b"127.0.0.9:80", 10);
        let mut r = Reconciler::new(FakeMaps::new(100, 100)).unwrap();
        r.reconcile(&m.desired());
        let other = service_key("127.0.0.1:81".parse().unwrap(), IPPROTO_TCP);
        let other_entry = r.dataplane().services[&other];
        // Both change in etcd; only web is in scope.
        m.put("/d/backends/web/b", b"127.0.0.3:80", 3);
        m.put("/d/backends/other/b", b"127.0.0.10:80", 11);
        let scope = BTreeSet::from([web()]);
        let part = m.desired_where(|k| scope.contains(k), &crate::guard::NodeGuard::default());
        let (changes, errors) = r.reconcile_keys(&part, &scope);
        assert!(errors.is_empty());
        assert_eq!(changes.len(), 1);
        assert_eq!(r.dataplane().reachable(&web()).len(), 2);
        assert_eq!(r.dataplane().services[&other], other_entry, "out of scope");
        // A frontend in scope that is no longer desired is removed.
        m.delete("/d/services/web");
        let part = m.desired_where(|k| scope.contains(k), &crate::guard::NodeGuard::default());
        r.reconcile_keys(&part, &scope);
        assert!(!r.dataplane().services.contains_key(&web()));
        assert!(r.dataplane().services.contains_key(&other));
        // A full reconcile afterwards finds only other's pending change.
        let (changes, _) = r.reconcile(&m.desired());
        assert_eq!(changes.len(), 1);
    }

    #[test]
    fn fresh_maps_zero_counters_only_when_an_id_comes_back() {
        let mut m = model();
        m.put("/d/backends/web/a", b"127.0.0.2:80", 2);
        let mut maps = FakeMaps::new(100, 100);
        maps.fresh = true;
        let mut r = Reconciler::new(maps).unwrap();
        r.reconcile(&m.desired());
        assert!(r.dataplane().resets.is_empty(), "new maps hold zeros");
        // a's id is freed, then handed to c: zeroed first.
        m.delete("/d/backends/web/a");
        m.put("/d/backends/web/b", b"127.0.0.3:80", 3);
        r.reconcile(&m.desired());
        m.put("/d/backends/web/c", b"127.0.0.4:80", 4);
        r.reconcile(&m.desired());
        assert_eq!(r.dataplane().resets.len(), 1, "{:?}", r.dataplane().resets);
    }

    #[test]
    fn set_ids_skip_live_sets_after_the_counter_wraps() {
        let mut m = model();
        m.put("/d/services/other", br#"{"frontend":"127.0.0.1:81"}"#, 9);
        m.put("/d/backends/other/a", b"127.0.0.9:80", 10);
        m.put("/d/backends/web/a", b"127.0.0.2:80", 2);
        let mut r = Reconciler::new(FakeMaps::new(100, 100)).unwrap();
        r.reconcile(&m.desired());
        let other = service_key("127.0.0.1:81".parse().unwrap(), IPPROTO_TCP);
        let other_set = r.dataplane().services[&other].set_id;
        r.set_ids = SetIds::adopt(u32::MAX - 1);
        for i in 0..4u8 {
            let v = format!("127.0.0.{}:80", 3 + i);
            m.put("/d/backends/web/b", v.as_bytes(), 3);
            r.reconcile(&m.desired());
            let web_set = r.dataplane().services[&web()].set_id;
            assert_ne!(web_set, other_set, "change {i} reused a live set");
            assert_eq!(r.dataplane().services[&other].set_id, other_set);
        }
        assert!(r.set_ids.wrapped());
    }

    #[test]
    fn counters_are_zeroed_before_an_id_is_given_out_and_reused() {
        let mut m = model();
        m.put("/d/backends/web/a", b"127.0.0.2:80", 2);
        let mut r = Reconciler::new(FakeMaps::new(100, 100)).unwrap();
        r.reconcile(&m.desired());
        let id = r.dataplane().services[&web()].stats_id;
        let backend = r.dataplane().backends.keys().copied().next().unwrap();
        assert_eq!(
            r.dataplane().resets,
            vec![StatsSlot::Backend(backend), StatsSlot::Service(id)]
        );
        // A change keeps the service's counters.
        m.put("/d/backends/web/b", b"127.0.0.3:80", 3);
        r.reconcile(&m.desired());
        assert_eq!(r.dataplane().services[&web()].stats_id, id);
        // Removed and another service added: the id is reused, zeroed first.
        m.delete("/d/services/web");
        r.reconcile(&m.desired());
        m.put("/d/services/other", br#"{"frontend":"127.0.0.1:81"}"#, 9);
        r.dp.resets.clear();
        r.reconcile(&m.desired());
        let other = service_key("127.0.0.1:81".parse().unwrap(), IPPROTO_TCP);
        assert_eq!(r.dataplane().services[&other].stats_id, id);
        assert_eq!(r.dataplane().resets, vec![StatsSlot::Service(id)]);
    }

    #[test]
    fn service_without_backends_has_an_empty_entry() {
        let m = model();
        let mut r = Reconciler::new(FakeMaps::new(100, 100)).unwrap();
        r.reconcile(&m.desired());
        assert_eq!(r.dataplane().services[&web()].count, 0);
    }

    #[test]
    fn restart_adopts_maps_and_cleans_leftovers() {
        let mut m = model();
        m.put("/d/backends/web/a", b"127.0.0.2:80", 2);
        m.put(
            "/d/backends/web/b",
            br#"{"addr":"127.0.0.3:80","weight":3}"#,
            3,
        );
        let mut r = Reconciler::new(FakeMaps::new(100, 100)).unwrap();
        r.reconcile(&m.desired());
        let mut maps = std::mem::take(&mut r.dp);
        // Leftovers of an interrupted update.
        maps.slots.insert(
            SlotKey {
                set_id: 999,
                slot: 0,
            },
            Slot {
                backend: 1,
                alias: 1,
                threshold: 0,
                pad: 0,
            },
        );
        maps.backends.insert(
            50,
            Backend {
                addr: discovery_common::Addr16([9; 16]),
                port: 9,
                flags: BACKEND_F_VALID,
                ejected: 0,
            },
        );
        let id = maps.services[&web()].stats_id;
        let mut r = Reconciler::new(maps).unwrap();
        assert!(!r.dataplane().slots.keys().any(|k| k.set_id == 999));
        assert!(!r.dataplane().backends.contains_key(&50));
        let before = r.dataplane().writes;
        let (changes, _) = r.reconcile(&m.desired());
        assert!(changes.is_empty(), "adopted state is already right");
        assert_eq!(r.dataplane().writes, before);
        assert_eq!(
            r.dataplane().services[&web()].stats_id,
            id,
            "counters adopted"
        );
        // And changes after the restart still work.
        m.delete("/d/backends/web/a");
        r.reconcile(&m.desired());
        assert_eq!(
            r.dataplane().reachable(&web()),
            vec![(a("127.0.0.3:80"), 1.0)]
        );
        assert_eq!(r.dataplane().backends.len(), 1);
    }

    #[test]
    fn full_map_fails_one_service_and_keeps_the_rest() {
        let mut m = model();
        m.put("/d/backends/web/a", b"127.0.0.2:80", 2);
        m.put("/d/services/big", br#"{"frontend":"127.0.0.1:81"}"#, 4);
        for i in 0..5 {
            m.put(
                &format!("/d/backends/big/{i}"),
                format!("127.0.1.{i}:80").as_bytes(),
                5,
            );
        }
        let mut r = Reconciler::new(FakeMaps::new(100, 4)).unwrap();
        let (changes, errors) = r.reconcile(&m.desired());
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].service, "big");
        assert!(
            errors[0]
                .to_string()
                .contains("service big (127.0.0.1:81/tcp)")
        );
        assert_eq!(changes.len(), 1);
        assert_eq!(
            r.dataplane().reachable(&web()),
            vec![(a("127.0.0.2:80"), 1.0)]
        );
        // Nothing of the failed update is left behind.
        assert_eq!(r.dataplane().slots.len(), 1);
        assert_eq!(r.dataplane().backends.len(), 1);
        // Backend ids running out is reported the same way.
        let mut r = Reconciler::new(FakeMaps::new(3, 100)).unwrap();
        let (_, errors) = r.reconcile(&m.desired());
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].to_string().contains("--max-backends"),
            "{}",
            errors[0]
        );
        assert_eq!(
            r.dataplane().reachable(&web()),
            vec![(a("127.0.0.2:80"), 1.0)]
        );
    }

    #[test]
    fn backends_shared_between_services_are_kept_until_unused() {
        let mut m = model();
        m.put("/d/services/api", br#"{"frontend":"127.0.0.1:81"}"#, 4);
        m.put("/d/backends/web/a", b"127.0.0.2:80", 2);
        m.put("/d/backends/api/a", b"127.0.0.2:80", 5);
        let mut r = Reconciler::new(FakeMaps::new(100, 100)).unwrap();
        r.reconcile(&m.desired());
        assert_eq!(r.dataplane().backends.len(), 1);
        m.delete("/d/services/web");
        r.reconcile(&m.desired());
        assert_eq!(r.dataplane().backends.len(), 1);
        m.delete("/d/services/api");
        r.reconcile(&m.desired());
        assert!(r.dataplane().backends.is_empty());
    }
}
