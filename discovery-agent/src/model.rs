//! The store: the valid definitions currently in etcd (and the invalid
//! keys, with why), kept up to date one etcd event at a time, and the
//! routing table derived from them, refreshed only where a change touched
//! it. Built on the etcd contract ([`crate::schema`]) and the desired-state
//! builder ([`crate::desired`]).
use std::collections::{BTreeMap, BTreeSet};

use discovery_common::ServiceKey;

use crate::{
    desired::{Definitions, Desired},
    guard::{AllowedFrontend, NodeGuard},
    schema::{BackendDef, Invalid, KeyRef, ServiceDef, parse_backend, parse_key, parse_service},
};

/// (name, definition, [(instance, backend, in maintenance)]).
pub type ServiceView<'a> = (&'a str, &'a ServiceDef, Vec<(&'a str, BackendDef, bool)>);

/// Outcome of applying one etcd key, for logging by the caller.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    Changed,
    Ignored,
    Invalid(Invalid),
}

/// The valid definitions currently in etcd, and the invalid keys with why.
#[derive(Debug)]
pub struct Model {
    prefix: String,
    allowed: Vec<AllowedFrontend>,
    defs: Definitions,
    invalid: BTreeMap<String, Invalid>,
    /// Keys whose value applied with fields the contract does not know.
    ignored: BTreeMap<String, Vec<crate::hints::Ignored>>,
    /// Names of services whose definition, backends or maintenance keys
    /// changed since `take_touched`.
    touched: BTreeSet<String>,
    all_touched: bool,
    /// The routing table before this node's health verdicts, derived from
    /// the definitions above and kept between refreshes so that a change
    /// recomputes only the frontends it touches.
    routes: Desired,
}

/// The frontends a refresh recomputed (`None`: all of them).
pub type Scope = Option<BTreeSet<ServiceKey>>;

/// Above this many services changed at once, recompute everything.
const PARTIAL_LIMIT: usize = 1_000;

impl Model {
    pub fn new(prefix: String, allowed: Vec<AllowedFrontend>) -> Self {
        Self {
            prefix,
            allowed,
            defs: Definitions::default(),
            invalid: BTreeMap::new(),
            ignored: BTreeMap::new(),
            touched: BTreeSet::new(),
            all_touched: true,
            routes: Desired::default(),
        }
    }

    pub fn clear(&mut self) {
        self.defs.services.clear();
        self.defs.backends.clear();
        self.defs.maintenance.clear();
        self.invalid.clear();
        self.ignored.clear();
        self.all_touched = true;
    }

    pub fn invalid_keys(&self) -> &BTreeMap<String, Invalid> {
        &self.invalid
    }

    /// Keys applied with fields ignored, and what was probably meant.
    pub fn ignored_fields(&self) -> &BTreeMap<String, Vec<crate::hints::Ignored>> {
        &self.ignored
    }

    /// Applies a put. An invalid value removes any earlier valid one for the
    /// key: the maps always follow what etcd says, on every node alike.
    pub fn put(&mut self, key: &str, value: &[u8], create_revision: i64) -> Applied {
        self.delete(key);
        if let Ok(Some(KeyRef::Maintenance { service, instance })) = parse_key(&self.prefix, key) {
            self.defs.maintenance.insert((service, instance));
            return Applied::Changed;
        }
        let parsed = parse_key(&self.prefix, key).and_then(|k| match k {
            None | Some(KeyRef::Maintenance { .. }) => Ok(None),
            Some(KeyRef::Service(name)) => {
                parse_service(value, &self.allowed, create_revision).map(|d| Some((name, Ok(d))))
            }
            Some(KeyRef::Backend { service, instance }) => {
                parse_backend(value).map(|b| Some((service, Err((instance, b)))))
            }
        });
        match parsed {
            Ok(None) => Applied::Ignored,
            Ok(Some((name, Ok(def)))) => {
                self.note_ignored(key, crate::hints::ignored_in_service(value));
                self.defs.services.insert(name, def);
                Applied::Changed
            }
            Ok(Some((service, Err((instance, def))))) => {
                self.note_ignored(key, crate::hints::ignored_in_backend(value));
                self.defs
                    .backends
                    .entry(service)
                    .or_default()
                    .insert(instance, def);
                Applied::Changed
            }
            Err(e) => {
                self.invalid.insert(key.to_owned(), e.clone());
                Applied::Invalid(e)
            }
        }
    }

    fn note_ignored(&mut self, key: &str, fields: Vec<crate::hints::Ignored>) {
        if !fields.is_empty() {
            self.ignored.insert(key.to_owned(), fields);
        }
    }

    pub fn delete(&mut self, key: &str) -> Applied {
        self.ignored.remove(key);
        let was_invalid = self.invalid.remove(key).is_some();
        let parsed = parse_key(&self.prefix, key);
        if let Ok(Some(
            KeyRef::Service(name)
            | KeyRef::Backend { service: name, .. }
            | KeyRef::Maintenance { service: name, .. },
        )) = &parsed
        {
            self.touched.insert(name.clone());
        }
        let removed = match parsed {
            Ok(Some(KeyRef::Service(name))) => self.defs.services.remove(&name).is_some(),
            Ok(Some(KeyRef::Backend { service, instance })) => {
                let set = self.defs.backends.get_mut(&service);
                let removed = set.as_ref().is_some_and(|s| s.contains_key(&instance));
                if let Some(set) = set {
                    set.remove(&instance);
                    if set.is_empty() {
                        self.defs.backends.remove(&service);
                    }
                }
                removed
            }
            Ok(Some(KeyRef::Maintenance { service, instance })) => {
                self.defs.maintenance.remove(&(service, instance))
            }
            _ => false,
        };
        if removed || was_invalid {
            Applied::Changed
        } else {
            Applied::Ignored
        }
    }

    /// Every valid service with all its registered instances, whether or
    /// not routed.
    pub fn view(&self) -> Vec<ServiceView<'_>> {
        self.defs
            .services
            .iter()
            .map(|(name, def)| {
                let backends = self
                    .defs
                    .backends
                    .get(name)
                    .map(|b| {
                        b.iter()
                            .map(|(id, d)| {
                                let m = self.defs.maintenance.contains(&(name.clone(), id.clone()));
                                (id.as_str(), *d, m)
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                (name.as_str(), def, backends)
            })
            .collect()
    }

    /// Services whose keys changed since the last call (`None`: all of
    /// them, after a snapshot replaced the model).
    fn take_touched(&mut self) -> Option<BTreeSet<String>> {
        let all = std::mem::take(&mut self.all_touched);
        let t = std::mem::take(&mut self.touched);
        (!all).then_some(t)
    }

    /// The routing table as of the last refresh.
    pub fn routes(&self) -> &Desired {
        &self.routes
    }

    /// Brings the routing table up to date: the frontends of services whose
    /// keys changed since the last refresh (where they were and where they
    /// are now) and the `also` frontends (those that failed to apply), or
    /// every frontend when `full` (the node's rules or health changed), after
    /// a snapshot, or when too much changed. Returns what it recomputed.
    pub fn refresh(
        &mut self,
        guard: &NodeGuard,
        also: impl IntoIterator<Item = ServiceKey>,
        full: bool,
    ) -> Scope {
        let names = match self.take_touched() {
            Some(names) if !full && names.len() <= PARTIAL_LIMIT => names,
            _ => {
                self.routes = self.desired_for(guard);
                return None;
            }
        };
        let mut keys: BTreeSet<ServiceKey> = self
            .routes
            .services
            .iter()
            .filter(|(_, s)| names.contains(&s.service))
            .map(|(k, _)| *k)
            .collect();
        // A refused frontend is not in `services`: its claimant's move or
        // delete must recompute it too (and promote the next claimant).
        keys.extend(
            self.routes
                .refused
                .iter()
                .filter(|(_, r)| names.contains(&r.service))
                .map(|(k, _)| *k),
        );
        keys.extend(names.iter().flat_map(|n| self.defs.frontend_keys(n)));
        keys.extend(also);
        let part = self.desired_where(|k| keys.contains(k), guard);
        let r = &mut self.routes;
        for k in &keys {
            r.services.remove(k);
            r.refused.remove(k);
        }
        let fronts: BTreeSet<String> = keys.iter().map(crate::addr::frontend).collect();
        r.conflicts.retain(|c| {
            !names.contains(&c.winner) && !names.contains(&c.loser) && !fronts.contains(&c.frontend)
        });
        r.family.retain(|n| !fronts.contains(&n.frontend));
        r.conflicts.extend(part.conflicts);
        r.services.extend(part.services);
        r.refused.extend(part.refused);
        r.family.extend(part.family);
        Some(keys)
    }

    /// The routing table: for each frontend+protocol, the winning service
    /// (oldest create revision, then name) and its backends.
    pub fn desired_for(&self, guard: &NodeGuard) -> Desired {
        self.desired_where(|_| true, guard)
    }

    /// The routing table with no node rules (unit tests).
    #[cfg(test)]
    pub fn desired(&self) -> Desired {
        self.desired_for(&NodeGuard::default())
    }

    /// The frontends (with protocol) of every service that would shadow a
    /// listener on this node: what a new listener scan is compared on.
    pub fn shadowing(&self, guard: &NodeGuard) -> BTreeSet<ServiceKey> {
        self.defs.shadowing(guard)
    }

    /// The routing table for the frontends `want` selects only (see
    /// [`Definitions::desired_where`]).
    pub fn desired_where(&self, want: impl Fn(&ServiceKey) -> bool, guard: &NodeGuard) -> Desired {
        self.defs.desired_where(want, guard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use discovery_common::IPPROTO_TCP;

    const P: &str = "/discovery/";

    fn model() -> Model {
        Model::new(P.into(), vec!["127.0.0.0/8".parse().unwrap()])
    }

    #[test]
    fn invalid_value_replaces_valid_one_and_is_reported() {
        let mut m = model();
        let k = "/discovery/backends/web/a";
        assert_eq!(m.put(k, b"127.0.0.2:80", 1), Applied::Changed);
        assert!(matches!(m.put(k, b"garbage", 1), Applied::Invalid(_)));
        assert!(m.invalid_keys().contains_key(k));
        m.put(
            "/discovery/services/web",
            br#"{"frontend":"127.0.0.1:80"}"#,
            2,
        );
        let d = m.desired();
        assert_eq!(d.services.len(), 1);
        assert!(d.services.values().next().unwrap().backends.is_empty());
        assert_eq!(m.delete(k), Applied::Changed);
        assert!(m.invalid_keys().is_empty());
    }

    #[test]
    fn maintenance_takes_a_backend_out_until_enabled() {
        let mut m = model();
        m.put(
            "/discovery/services/web",
            br#"{"frontend":"127.0.0.1:80"}"#,
            1,
        );
        m.put("/discovery/backends/web/a", b"127.0.0.2:80", 2);
        m.put("/discovery/backends/web/b", b"127.0.0.3:80", 3);
        let addrs = |m: &Model| -> Vec<String> {
            m.desired()
                .services
                .values()
                .next()
                .unwrap()
                .backends
                .iter()
                .map(|b| b.addr.to_string())
                .collect()
        };
        assert_eq!(addrs(&m), ["127.0.0.2:80", "127.0.0.3:80"]);
        assert_eq!(
            m.put("/discovery/maintenance/web/a", b"{}", 4),
            Applied::Changed
        );
        assert_eq!(addrs(&m), ["127.0.0.3:80"]);
        // The announcer rewriting its key does not clear the override.
        m.put(
            "/discovery/backends/web/a",
            br#"{"addr":"127.0.0.2:80","weight":5}"#,
            2,
        );
        assert_eq!(addrs(&m), ["127.0.0.3:80"]);
        assert_eq!(m.delete("/discovery/maintenance/web/a"), Applied::Changed);
        assert_eq!(addrs(&m), ["127.0.0.2:80", "127.0.0.3:80"]);
        assert!(parse_key(P, "/discovery/maintenance/web").is_err());
    }

    #[test]
    fn a_partial_refresh_recomputes_a_refused_frontend_whose_claimant_went() {
        let mut m = model();
        m.put(
            "/discovery/services/old",
            br#"{"frontend":"127.0.0.1:80"}"#,
            1,
        );
        m.put(
            "/discovery/services/new",
            br#"{"frontend":"127.0.0.1:80","takeover":true}"#,
            2,
        );
        m.put("/discovery/backends/new/a", b"127.0.0.9:1", 3);
        let mut g = NodeGuard::new(&[], None);
        let mut l = crate::listeners::Listeners::default();
        l.add(IPPROTO_TCP, "127.0.0.1".parse().unwrap(), 80, false);
        g.set_listeners(l);
        assert_eq!(m.refresh(&g, [], true), None);
        assert_eq!(
            m.routes().refused.len(),
            1,
            "old wins the frontend, which is refused"
        );
        assert!(m.routes().services.is_empty());
        m.delete("/discovery/services/old");
        assert!(m.refresh(&g, [], false).is_some(), "a partial refresh");
        let full = m.desired_for(&g);
        assert!(
            m.routes().refused.is_empty(),
            "stale refusal: {:?}",
            m.routes().refused
        );
        assert_eq!(m.routes().services, full.services);
        assert_eq!(m.routes().services.values().next().unwrap().service, "new");
    }
}
