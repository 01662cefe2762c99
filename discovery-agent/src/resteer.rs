//! Re-steering: sockets that connect() redirected to a backend that is no
//! longer routed are destroyed (sock_diag SOCK_DESTROY), so the
//! application's next call fails and its reconnect lands on a live backend.
//!
//! Which sockets: only those whose socket storage says connect() went
//! through a frontend to the socket's current peer (`sockets`), for a
//! frontend this node routes, whose backend has left that frontend's set:
//! deleted from etcd, lease expired, maintenance, failing its active check
//! on this node, or passively ejected. A draining backend (weight 0) stays
//! in the set, so its sockets stay. Connected UDP sockets always; TCP
//! connections only for services with `shutdown_sessions` (HAProxy's
//! `on-marked-down shutdown-sessions`). Unconnected UDP sockets, sockets
//! connected to a backend's address directly, and sockets of a frontend
//! that was removed altogether are never touched.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::SocketAddr,
};

use discovery_common::{IPPROTO_TCP, ServiceKey};

use crate::{desired::Desired, sockets::Redirected};

/// What one frontend routes now, as far as re-steering cares.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Routed {
    /// Whether its sockets are destroyed when their backend leaves.
    resteer: bool,
    backends: HashSet<SocketAddr>,
}

#[derive(Debug, Default)]
pub struct Resteer {
    routed: HashMap<ServiceKey, Routed>,
    /// A sweep is due: a backend left a frontend that re-steers, or this
    /// run has not swept yet (sockets of backends that left while no agent
    /// ran).
    due: bool,
    swept_once: bool,
}

impl Resteer {
    /// Takes the routing just applied: every key of `desired` (a partial
    /// reconcile holds only the keys it touched; `scope` lists them, and
    /// keys of it missing from `desired` were removed).
    pub fn applied(&mut self, desired: &Desired, scope: Option<&BTreeSet<ServiceKey>>) {
        let removed: Vec<ServiceKey> = match scope {
            Some(keys) => keys
                .iter()
                .filter(|k| !desired.services.contains_key(k))
                .copied()
                .collect(),
            None => self
                .routed
                .keys()
                .filter(|k| !desired.services.contains_key(k))
                .copied()
                .collect(),
        };
        for k in removed {
            self.routed.remove(&k);
        }
        for (key, svc) in &desired.services {
            let now = Routed {
                resteer: key.proto != IPPROTO_TCP || svc.shutdown_sessions,
                backends: svc.backends.iter().map(|b| b.addr).collect(),
            };
            if let Some(before) = self.routed.get(key)
                && now.resteer
                && !before.backends.is_subset(&now.backends)
            {
                self.due = true;
            }
            self.routed.insert(*key, now);
        }
        if !self.swept_once {
            self.due = true;
        }
    }

    /// Whether a sweep should run now (call [`Resteer::swept`] after it).
    pub fn due(&self) -> bool {
        self.due
    }

    pub fn swept(&mut self) {
        self.due = false;
        self.swept_once = true;
    }

    /// The sockets to destroy among those redirected.
    pub fn stale<'a>(&self, sockets: &'a [Redirected]) -> Vec<&'a Redirected> {
        sockets
            .iter()
            .filter(|s| {
                let key = crate::addr::service_key(s.frontend, s.proto);
                self.routed
                    .get(&key)
                    .is_some_and(|r| r.resteer && !r.backends.contains(&s.backend))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use discovery_common::IPPROTO_UDP;

    use super::*;
    use crate::model::Model;

    fn desired(m: &mut Model) -> Desired {
        m.desired()
    }

    #[test]
    fn only_sockets_of_a_backend_that_left_a_resteering_frontend_are_stale() {
        let mut m = Model::new("/d/".into(), vec!["127.0.0.0/8".parse().unwrap()]);
        m.put(
            "/d/services/stats",
            br#"{"frontend":"127.0.0.1:8125","protocol":"udp"}"#,
            1,
        );
        m.put("/d/services/web", br#"{"frontend":"127.0.0.1:80"}"#, 1);
        for (svc, id, a) in [
            ("stats", "a", "127.0.0.2:8125"),
            ("stats", "b", "127.0.0.3:8125"),
            ("web", "a", "127.0.0.2:80"),
        ] {
            m.put(&format!("/d/backends/{svc}/{id}"), a.as_bytes(), 2);
        }
        let mut r = Resteer::default();
        r.applied(&desired(&mut m), None);
        assert!(r.due(), "the first apply sweeps once");
        r.swept();
        // Draining (weight 0) stays: no sweep.
        m.put(
            "/d/backends/stats/a",
            br#"{"addr":"127.0.0.2:8125","weight":0}"#,
            3,
        );
        r.applied(&desired(&mut m), None);
        assert!(!r.due());
        m.delete("/d/backends/stats/a");
        m.delete("/d/backends/web/a");
        r.applied(&desired(&mut m), None);
        assert!(r.due());
        let a = |p: &str| p.parse::<SocketAddr>().unwrap();
        let client = a("127.0.0.1:40000");
        let sockets = [
            Redirected::for_test(
                IPPROTO_UDP,
                client,
                a("127.0.0.2:8125"),
                a("127.0.0.1:8125"),
            ),
            Redirected::for_test(
                IPPROTO_UDP,
                client,
                a("127.0.0.3:8125"),
                a("127.0.0.1:8125"),
            ),
            // TCP without shutdown_sessions: left alone.
            Redirected::for_test(IPPROTO_TCP, client, a("127.0.0.2:80"), a("127.0.0.1:80")),
            // A frontend this node does not route.
            Redirected::for_test(IPPROTO_UDP, client, a("127.0.0.2:9"), a("127.0.0.1:9")),
        ];
        let stale = r.stale(&sockets);
        assert_eq!(stale, [&sockets[0]]);
        // With shutdown_sessions the TCP one goes too.
        m.put(
            "/d/services/web",
            br#"{"frontend":"127.0.0.1:80","shutdown_sessions":true}"#,
            5,
        );
        r.applied(&desired(&mut m), None);
        assert_eq!(r.stale(&sockets), [&sockets[0], &sockets[2]]);
    }
}
