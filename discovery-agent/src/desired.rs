//! The desired routing state: for each frontend and protocol, the service
//! that wins it and the backends it should route to, plus the conflicts and
//! the frontends this node refuses. [`Definitions`] (the valid definitions
//! the store holds) builds it; the health verdicts filter it and the
//! reconciler writes it to the maps.
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use discovery_common::{IPPROTO_UDP, ServiceKey, TcpOpts};

use crate::{
    addr::proto_name,
    guard::{NodeGuard, Refusal},
    schema::{BackendDef, Policy, ServiceCheck, ServiceDef},
};

/// What one frontend should route to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredService {
    pub service: String,
    pub frontend: SocketAddr,
    pub policy: Policy,
    pub check: Option<ServiceCheck>,
    pub tcp: TcpOpts,
    /// Reset redirected TCP connections to backends that leave.
    pub shutdown_sessions: bool,
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

/// Backends of a service that one of its frontends cannot reach, and
/// what happens instead (see README, "Address families").
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct FamilyNote {
    pub service: String,
    /// `addr:port/proto`.
    pub frontend: String,
    pub detail: String,
}

#[derive(Debug, Default)]
pub struct Desired {
    pub services: BTreeMap<ServiceKey, DesiredService>,
    pub conflicts: BTreeSet<Conflict>,
    /// Frontends the node guard refused, with the service that won them.
    pub refused: BTreeMap<ServiceKey, Refused>,
    /// Frontends routed to only some of their backends, or with a limit,
    /// because of address families.
    pub family: BTreeSet<FamilyNote>,
}

/// Which of `backends` a frontend can route to, by address family:
/// - an IPv4 frontend only IPv4 backends (an AF_INET socket cannot carry an
///   IPv6 address);
/// - an IPv6 frontend, TCP: every backend (IPv4 ones v4-mapped, on
///   dual-stack sockets);
/// - an IPv6 frontend, UDP: its IPv6 backends if it has any; with only IPv4
///   ones, connected UDP works (v4-mapped) but the kernel refuses to rewrite
///   an unconnected sendmsg() to a v4-mapped address, so that call fails at
///   once with EAFNOSUPPORT.
///
/// Returns the usable backends and, when something is left out or
/// limited, why.
fn by_family(
    frontend: SocketAddr,
    proto: u8,
    backends: Vec<BackendDef>,
) -> (Vec<BackendDef>, Option<String>) {
    let (v4, v6): (Vec<BackendDef>, Vec<BackendDef>) =
        backends.into_iter().partition(|b| b.addr.is_ipv4());
    let list = |bs: &[BackendDef]| {
        bs.iter()
            .map(|b| b.addr.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (frontend.is_ipv4(), proto == IPPROTO_UDP) {
        (true, _) if v6.is_empty() => (v4, None),
        (true, _) => {
            let why = format!(
                "IPv6 backends {} are left out: an IPv4 frontend's AF_INET clients cannot reach \
                 them (give the service an IPv6 frontend too)",
                list(&v6)
            );
            (v4, Some(why))
        }
        (false, false) => {
            let mut all = v4;
            all.extend(v6);
            all.sort();
            (all, None)
        }
        (false, true) if v4.is_empty() => (v6, None),
        (false, true) if v6.is_empty() => (
            v4,
            Some(
                "IPv4 backends only: connected UDP works, but an unconnected sendto() to this \
                 IPv6 frontend fails with EAFNOSUPPORT (the kernel does not rewrite IPv6 \
                 datagrams to v4-mapped addresses)"
                    .to_owned(),
            ),
        ),
        (false, true) => {
            let why = format!(
                "IPv4 backends {} are left out of UDP on this IPv6 frontend (the kernel does \
                 not rewrite IPv6 datagrams to v4-mapped addresses)",
                list(&v4)
            );
            (v6, Some(why))
        }
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
            .map(|d| d.keys().map(|(_, k)| k).collect())
            .unwrap_or_default()
    }

    /// The frontends (with protocol) of every service that would shadow a
    /// listener on this node: what a new listener scan is compared on.
    pub fn shadowing(&self, guard: &NodeGuard) -> BTreeSet<ServiceKey> {
        self.services
            .values()
            .flat_map(|d| d.keys().map(move |(f, k)| (d, f, k)))
            .filter(|(d, f, k)| {
                matches!(
                    guard.refusal(*f, k.proto, d.takeover),
                    Some(Refusal::Shadows(_))
                )
            })
            .map(|(_, _, k)| k)
            .collect()
    }

    /// The routing table for the frontends `want` selects only: a change to
    /// a few services costs a scan of the service definitions, not a
    /// rebuild of every service's backend list. Frontends the node guard
    /// refuses are left out and listed in `refused`. A frontend claimed by
    /// several services goes to the oldest definition (create revision,
    /// then name); the others are listed in `conflicts`.
    pub fn desired_where(&self, want: impl Fn(&ServiceKey) -> bool, guard: &NodeGuard) -> Desired {
        let mut claims: BTreeMap<ServiceKey, Vec<(i64, &str, SocketAddr)>> = BTreeMap::new();
        for (name, def) in &self.services {
            for (frontend, key) in def.keys() {
                if want(&key) {
                    claims
                        .entry(key)
                        .or_default()
                        .push((def.create_revision, name, frontend));
                }
            }
        }
        let mut out = Desired::default();
        for (key, mut claimants) in claims {
            claimants.sort();
            let (_, winner, frontend) = claimants[0];
            let def = &self.services[winner];
            let shown = format!("{frontend}/{}", proto_name(key.proto));
            for (_, loser, _) in &claimants[1..] {
                out.conflicts.insert(Conflict {
                    frontend: shown.clone(),
                    winner: winner.to_owned(),
                    loser: (*loser).to_owned(),
                });
            }
            if let Some(why) = guard.refusal(frontend, key.proto, def.takeover) {
                out.refused.insert(
                    key,
                    Refused {
                        service: winner.to_owned(),
                        frontend: shown,
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
            let (backends, note) = by_family(frontend, key.proto, backends);
            if let Some(detail) = note {
                out.family.insert(FamilyNote {
                    service: winner.to_owned(),
                    frontend: shown,
                    detail,
                });
            }
            out.services.insert(
                key,
                DesiredService {
                    service: winner.to_owned(),
                    frontend,
                    policy: def.policy,
                    check: def.check.clone(),
                    tcp: def.tcp,
                    shutdown_sessions: def.shutdown_sessions,
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
    use crate::{
        addr::service_key,
        schema::{parse_backend, parse_service},
    };
    use discovery_common::{IPPROTO_TCP, IPPROTO_UDP};

    fn service(d: &mut Definitions, name: &str, value: &[u8], create_revision: i64) {
        let allowed = ["127.0.0.0/8".parse().unwrap(), "::1".parse().unwrap()];
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

    #[test]
    fn families_decide_which_backends_a_frontend_reaches() {
        let mut m = Definitions::default();
        service(
            &mut m,
            "web",
            br#"{"frontend":["127.0.0.1:80","[::1]:80"],"protocol":"both"}"#,
            1,
        );
        backend(&mut m, "web", "v4", b"127.0.0.2:80");
        backend(&mut m, "web", "v6", b"[::1]:8080");
        let d = desired(&m);
        let addrs = |f: &str, p: u8| -> Vec<String> {
            d.services[&service_key(f.parse().unwrap(), p)]
                .backends
                .iter()
                .map(|b| b.addr.to_string())
                .collect()
        };
        // AF_INET clients cannot reach [::1]:8080.
        assert_eq!(addrs("127.0.0.1:80", IPPROTO_TCP), ["127.0.0.2:80"]);
        assert_eq!(addrs("127.0.0.1:80", IPPROTO_UDP), ["127.0.0.2:80"]);
        // IPv6 TCP reaches both (IPv4 v4-mapped); IPv6 UDP only IPv6.
        assert_eq!(
            addrs("[::1]:80", IPPROTO_TCP),
            ["127.0.0.2:80", "[::1]:8080"]
        );
        assert_eq!(addrs("[::1]:80", IPPROTO_UDP), ["[::1]:8080"]);
        let notes: Vec<&str> = d.family.iter().map(|n| n.frontend.as_str()).collect();
        assert_eq!(
            notes,
            ["127.0.0.1:80/tcp", "127.0.0.1:80/udp", "[::1]:80/udp"],
            "every limit is reported"
        );

        // IPv4 backends only: IPv6 UDP keeps them (connected UDP works) and
        // says that unconnected sendto() fails.
        m.backends.get_mut("web").unwrap().remove("v6");
        let d = desired(&m);
        let udp6 = &d.services[&service_key("[::1]:80".parse().unwrap(), IPPROTO_UDP)];
        assert_eq!(udp6.backends.len(), 1);
        let note = d
            .family
            .iter()
            .find(|n| n.frontend == "[::1]:80/udp")
            .expect("a note for UDP on [::1]");
        assert!(note.detail.contains("EAFNOSUPPORT"), "{note:?}");
        assert_eq!(d.family.len(), 1);
    }
}
