//! The desired routing state: for each frontend and protocol, the service
//! that wins it and the backends it should route to, plus the conflicts and
//! the frontends this node refuses. [`Definitions`] (the valid definitions
//! the store holds) builds it; the health verdicts filter it and the
//! reconciler writes it to the maps.
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddrV4;

use discovery_common::{ServiceKey, TcpOpts, v4_mapped};

use crate::{
    addr::proto_name,
    guard::{NodeGuard, Refusal},
    schema::{BackendDef, Policy, ServiceCheck, ServiceDef},
};

/// What one frontend should route to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredService {
    pub service: String,
    pub frontend: SocketAddrV4,
    pub policy: Policy,
    pub check: Option<ServiceCheck>,
    pub tcp: TcpOpts,
    /// Sorted, so the same set always gives the same slot table.
    pub backends: Vec<BackendDef>,
}

/// A frontend claimed by more than one service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Conflict {
    pub frontend: String,
    pub winner: String,
    pub loser: String,
}

/// A frontend this node does not route although a valid service claims it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Refused {
    pub service: String,
    /// `addr:port/proto`.
    pub frontend: String,
    pub why: Refusal,
}

#[derive(Debug, Default)]
pub struct Desired {
    pub services: BTreeMap<ServiceKey, DesiredService>,
    pub conflicts: BTreeSet<Conflict>,
    /// Frontends the node guard refused, with the service that won them.
    pub refused: BTreeMap<ServiceKey, Refused>,
}

pub fn service_key(frontend: SocketAddrV4, proto: u8) -> ServiceKey {
    ServiceKey {
        addr: v4_mapped(frontend.ip().octets()),
        port: frontend.port(),
        proto,
        pad: 0,
    }
}

/// The valid definitions a routing table is derived from: what the store
/// keeps of etcd.
#[derive(Debug, Default)]
pub struct Definitions {
    pub services: BTreeMap<String, ServiceDef>,
    /// Service name → instance id → backend.
    pub backends: BTreeMap<String, BTreeMap<String, BackendDef>>,
    /// (service, instance) pairs an operator took out.
    pub maintenance: BTreeSet<(String, String)>,
}

impl Definitions {
    /// The frontends (per protocol) a service's definition claims now.
    pub fn frontend_keys(&self, name: &str) -> Vec<ServiceKey> {
        self.services
            .get(name)
            .map(|d| {
                d.protocol
                    .ip_protos()
                    .iter()
                    .map(|&p| service_key(d.frontend, p))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The frontends (with protocol) of every service that would shadow a
    /// listener on this node: what a new listener scan is compared on.
    pub fn shadowing(&self, guard: &NodeGuard) -> BTreeSet<ServiceKey> {
        self.services
            .values()
            .flat_map(|d| d.protocol.ip_protos().iter().map(move |&p| (d, p)))
            .filter(|(d, p)| {
                matches!(
                    guard.refusal(d.frontend, *p, d.takeover),
                    Some(Refusal::Shadows(_))
                )
            })
            .map(|(d, p)| service_key(d.frontend, p))
            .collect()
    }

    /// The routing table for the frontends `want` selects only: a change to
    /// a few services costs a scan of the service definitions, not a
    /// rebuild of every service's backend list. Frontends the node guard
    /// refuses are left out and listed in `refused`. A frontend claimed by
    /// several services goes to the oldest definition (create revision,
    /// then name); the others are listed in `conflicts`.
    pub fn desired_where(&self, want: impl Fn(&ServiceKey) -> bool, guard: &NodeGuard) -> Desired {
        let mut claims: BTreeMap<ServiceKey, Vec<(i64, &str)>> = BTreeMap::new();
        for (name, def) in &self.services {
            for &proto in def.protocol.ip_protos() {
                let key = service_key(def.frontend, proto);
                if want(&key) {
                    claims
                        .entry(key)
                        .or_default()
                        .push((def.create_revision, name));
                }
            }
        }
        let mut out = Desired::default();
        for (key, mut claimants) in claims {
            claimants.sort();
            let winner = claimants[0].1;
            let def = &self.services[winner];
            for (_, loser) in &claimants[1..] {
                out.conflicts.insert(Conflict {
                    frontend: format!("{}/{}", def.frontend, proto_name(key.proto)),
                    winner: winner.to_owned(),
                    loser: (*loser).to_owned(),
                });
            }
            if let Some(why) = guard.refusal(def.frontend, key.proto, def.takeover) {
                out.refused.insert(
                    key,
                    Refused {
                        service: winner.to_owned(),
                        frontend: format!("{}/{}", def.frontend, proto_name(key.proto)),
                        why,
                    },
                );
                continue;
            }
            let mut backends: Vec<BackendDef> = self
                .backends
                .get(winner)
                .map(|b| {
                    b.iter()
                        .filter(|(id, _)| {
                            !self
                                .maintenance
                                .contains(&(winner.to_owned(), (*id).clone()))
                        })
                        .map(|(_, d)| *d)
                        .collect()
                })
                .unwrap_or_default();
            backends.sort();
            out.services.insert(
                key,
                DesiredService {
                    service: winner.to_owned(),
                    frontend: def.frontend,
                    policy: def.policy,
                    check: def.check.clone(),
                    tcp: def.tcp,
                    backends,
                },
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{parse_backend, parse_service};
    use discovery_common::{IPPROTO_TCP, IPPROTO_UDP};

    fn service(d: &mut Definitions, name: &str, value: &[u8], create_revision: i64) {
        let allowed = ["127.0.0.0/8".parse().unwrap()];
        let def = parse_service(value, &allowed, create_revision).unwrap();
        d.services.insert(name.into(), def);
    }

    fn backend(d: &mut Definitions, service: &str, instance: &str, value: &[u8]) {
        let def = parse_backend(value).unwrap();
        d.backends
            .entry(service.into())
            .or_default()
            .insert(instance.into(), def);
    }

    fn desired(d: &Definitions) -> Desired {
        d.desired_where(|_| true, &NodeGuard::default())
    }

    #[test]
    fn this_nodes_guard_refuses_frontends_and_takeover_opts_out_of_listeners() {
        let mut m = Definitions::default();
        service(&mut m, "etcd", br#"{"frontend":"127.0.0.1:2379"}"#, 1);
        service(
            &mut m,
            "dns",
            br#"{"frontend":"127.0.0.53:53","protocol":"udp"}"#,
            2,
        );
        service(
            &mut m,
            "cache",
            br#"{"frontend":"127.0.0.1:11211","takeover":true}"#,
            3,
        );
        for s in ["etcd", "dns", "cache"] {
            backend(&mut m, s, "a", b"127.0.0.9:1");
        }
        let mut g = NodeGuard::new(&["http://127.0.0.1:2379".to_owned()], None);
        let mut l = crate::listeners::Listeners::default();
        l.add(IPPROTO_UDP, "127.0.0.53".parse().unwrap(), 53, false);
        l.add(IPPROTO_TCP, "0.0.0.0".parse().unwrap(), 11211, false);
        g.set_listeners(l);
        let d = m.desired_where(|_| true, &g);
        let names: Vec<&str> = d.services.values().map(|s| s.service.as_str()).collect();
        assert_eq!(names, ["cache"], "takeover routes over the listener");
        let refused: Vec<(&str, &str, &str)> = d
            .refused
            .values()
            .map(|r| (r.service.as_str(), r.frontend.as_str(), r.why.reason()))
            .collect();
        assert_eq!(
            refused,
            [
                ("etcd", "127.0.0.1:2379/tcp", "reserved"),
                ("dns", "127.0.0.53:53/udp", "listener"),
            ]
        );
        let shadow = m.shadowing(&g);
        assert_eq!(
            shadow.into_iter().collect::<Vec<_>>(),
            [service_key("127.0.0.53:53".parse().unwrap(), IPPROTO_UDP)],
            "only services without takeover count"
        );
    }

    #[test]
    fn oldest_service_wins_a_frontend() {
        let mut m = Definitions::default();
        service(
            &mut m,
            "new",
            br#"{"frontend":"127.0.0.1:80","protocol":"both"}"#,
            20,
        );
        service(&mut m, "old", br#"{"frontend":"127.0.0.1:80"}"#, 10);
        backend(&mut m, "old", "1", b"127.0.0.2:80");
        backend(&mut m, "new", "1", b"127.0.0.3:80");
        let d = desired(&m);
        let tcp = &d.services[&service_key("127.0.0.1:80".parse().unwrap(), IPPROTO_TCP)];
        let udp = &d.services[&service_key("127.0.0.1:80".parse().unwrap(), IPPROTO_UDP)];
        assert_eq!(tcp.service, "old");
        assert_eq!(udp.service, "new", "udp is not contested");
        assert_eq!(
            d.conflicts.iter().cloned().collect::<Vec<_>>(),
            vec![Conflict {
                frontend: "127.0.0.1:80/tcp".into(),
                winner: "old".into(),
                loser: "new".into()
            }]
        );
        m.services.remove("old");
        let d = desired(&m);
        assert!(d.conflicts.is_empty());
        assert_eq!(
            d.services[&service_key("127.0.0.1:80".parse().unwrap(), IPPROTO_TCP)].service,
            "new"
        );
    }
}
