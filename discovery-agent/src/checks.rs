//! Active checks from this node: every agent checks the backends it routes
//! to for services that define a `check`, and takes a failing backend out on
//! this node only; it comes back after `rise` passes.
//!
//! One checker runs per backend address, however many services share it
//! (the first service in frontend order sets the check). A backend counts as
//! healthy until its first verdict, so a new backend is not held back. If
//! every backend of a service fails, the service falls back to all its
//! registered backends rather than black-holing its traffic.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinHandle,
};
use tracing::{info, warn};

use crate::{
    desired::Desired,
    health::{Check, watch},
};

/// Probes in flight at once, whatever the number of backends: bounds the
/// sockets and CPU the checks take on a node with thousands of backends.
const MAX_CONCURRENT_PROBES: usize = 64;

/// Who takes a backend out after `--passive-failures` failed connects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Ejection {
    /// The sock_ops program, on the failure itself: the next connect()
    /// already skips the backend. The agent then takes it out of the set
    /// and owns the back-off and the return.
    #[default]
    Kernel,
    /// The agent, on its next poll of the kernel's failure counts (every
    /// 200 ms):
    /// connects keep failing until then. For comparison.
    Agent,
}

impl Ejection {
    pub fn by(self) -> &'static str {
        match self {
            Ejection::Kernel => "kernel",
            Ejection::Agent => "agent",
        }
    }

    /// The threshold the programs eject at (0: they never do).
    pub fn kernel_threshold(self, passive_failures: u32) -> u32 {
        match self {
            Ejection::Kernel => passive_failures,
            Ejection::Agent => 0,
        }
    }
}

/// What a passive tick changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Passive {
    /// Newly ejected.
    pub ejected: Vec<SocketAddr>,
    /// Back-off over: back in rotation (with kernel ejection, on trial:
    /// their first failure ejects them again).
    pub returned: Vec<SocketAddr>,
}

impl Passive {
    pub fn changed(&self) -> bool {
        !self.ejected.is_empty() || !self.returned.is_empty()
    }
}

pub struct ActiveChecks {
    tasks: HashMap<SocketAddr, (Check, JoinHandle<()>)>,
    down: HashSet<SocketAddr>,
    /// Passive ejections: backends whose connects kept failing, until when.
    ejected_until: HashMap<SocketAddr, Instant>,
    falling_back: BTreeSet<String>,
    /// Who ejects passively (for status).
    ejector: Ejection,
    tx: mpsc::Sender<(SocketAddr, Check, bool)>,
    http: reqwest::Client,
    limit: Arc<Semaphore>,
}

impl Drop for ActiveChecks {
    fn drop(&mut self) {
        for (_, (_, t)) in self.tasks.drain() {
            t.abort();
        }
    }
}

impl ActiveChecks {
    pub fn new(
        tx: mpsc::Sender<(SocketAddr, Check, bool)>,
        ejector: Ejection,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            tasks: HashMap::new(),
            down: HashSet::new(),
            ejected_until: HashMap::new(),
            falling_back: BTreeSet::new(),
            ejector,
            tx,
            http: reqwest::Client::builder().no_proxy().build()?,
            limit: Arc::new(Semaphore::new(MAX_CONCURRENT_PROBES)),
        })
    }

    /// This node's verdict on a backend, for `status`: `ok`, `check
    /// failing` (out of services that have an active check) or `ejected`
    /// (passively, from every service).
    pub fn health(&self, addr: SocketAddr) -> &'static str {
        if self.ejected_until.contains_key(&addr) {
            "ejected"
        } else if self.down.contains(&addr) {
            "check failing"
        } else {
            "ok"
        }
    }

    /// Who ejected a passively ejected backend: `kernel` or `agent`.
    pub fn ejected_by(&self, addr: SocketAddr) -> Option<&'static str> {
        self.ejected_until
            .contains_key(&addr)
            .then(|| self.ejector.by())
    }

    /// Whether every backend of `service` fails its check from this node,
    /// so all of them are used.
    pub fn falling_back(&self, service: &str) -> bool {
        self.falling_back.contains(service)
    }

    /// Backends out of rotation on this node (active or passive).
    pub fn ejected(&self) -> usize {
        self.down
            .union(&self.ejected_until.keys().copied().collect())
            .count()
    }

    /// Passive checks: ejects backends whose connects failed `threshold`
    /// times in a row (counted in the kernel, which with kernel ejection
    /// has already steered connects away) for `backoff`, and re-admits
    /// those whose back-off is over.
    pub fn passive(
        &mut self,
        failing: &[(SocketAddr, u32)],
        backoff: Duration,
        now: Instant,
    ) -> Passive {
        let mut out = Passive::default();
        self.ejected_until.retain(|addr, until| {
            let keep = *until > now;
            if !keep {
                info!(backend = %addr, "passive ejection over; back in rotation on this node for a trial connect");
                out.returned.push(*addr);
            }
            keep
        });
        for (addr, streak) in failing {
            // A backend just re-admitted still shows its old streak.
            if self.ejected_until.contains_key(addr) || out.returned.contains(addr) {
                continue;
            }
            warn!(backend = %addr, consecutive_failures = streak, ejection = ?backoff,
                  "connects keep failing; out of rotation on this node");
            self.ejected_until.insert(*addr, now + backoff);
            out.ejected.push(*addr);
        }
        out
    }

    /// Starts and stops checkers to match the services that define checks.
    pub fn sync(&mut self, desired: &Desired) {
        let mut want: HashMap<SocketAddr, Check> = HashMap::new();
        for svc in desired.services.values() {
            let Some(check) = &svc.check else { continue };
            for b in &svc.backends {
                want.entry(b.addr)
                    .or_insert_with(|| check.for_backend(b.addr));
            }
        }
        self.tasks.retain(|addr, (check, task)| {
            let keep = want.get(addr) == Some(check);
            if !keep {
                task.abort();
                self.down.remove(addr);
            }
            keep
        });
        for (addr, check) in want {
            if self.tasks.contains_key(&addr) {
                continue;
            }
            let task = tokio::spawn(run_checker(
                addr,
                check.clone(),
                self.http.clone(),
                self.limit.clone(),
                self.tx.clone(),
            ));
            self.tasks.insert(addr, (check, task));
        }
    }

    /// Records a verdict; returns whether the set of ejected backends
    /// changed. Verdicts of a check that was replaced meanwhile are dropped.
    pub fn observe(&mut self, addr: SocketAddr, check: &Check, up: bool) -> bool {
        if self.tasks.get(&addr).map(|(c, _)| c) != Some(check) {
            return false;
        }
        if up {
            self.down.remove(&addr)
        } else {
            self.down.insert(addr)
        }
    }

    /// Removes ejected backends on this node: failing active checks (for
    /// services with a check) or ejected passively (any service).
    pub fn apply(&mut self, desired: &mut Desired) {
        let mut falling_back = BTreeSet::new();
        for svc in desired.services.values_mut() {
            if svc.backends.is_empty() {
                continue;
            }
            let checked = svc.check.is_some();
            let healthy: Vec<_> = svc
                .backends
                .iter()
                .filter(|b| !(checked && self.down.contains(&b.addr)))
                .filter(|b| !self.ejected_until.contains_key(&b.addr))
                .copied()
                .collect();
            if healthy.len() == svc.backends.len() {
                continue;
            }
            if healthy.is_empty() {
                falling_back.insert(svc.service.clone());
            } else {
                svc.backends = healthy;
            }
        }
        for s in falling_back.difference(&self.falling_back) {
            warn!(
                service = s,
                "every backend fails its check or is ejected on this node; using all registered backends"
            );
        }
        for s in self.falling_back.difference(&falling_back) {
            info!(
                service = s,
                "backends pass their checks again; fallback ended"
            );
        }
        self.falling_back = falling_back;
    }
}

async fn run_checker(
    addr: SocketAddr,
    check: Check,
    http: reqwest::Client,
    limit: Arc<Semaphore>,
    tx: mpsc::Sender<(SocketAddr, Check, bool)>,
) {
    // Spread thousands of checkers over one interval.
    watch(&check, &http, Some(&limit), check.interval, |up, failure| {
        match &failure {
            None => {
                info!(backend = %addr, rise = check.rise, "backend passes its check again; back in rotation on this node")
            }
            Some(reason) => {
                warn!(backend = %addr, fall = check.fall, %reason, "backend fails its check; out of rotation on this node")
            }
        }
        let (tx, check) = (tx.clone(), check.clone());
        async move { tx.send((addr, check, up)).await.is_ok() }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;

    #[tokio::test]
    async fn ejects_on_this_node_and_falls_back_when_all_fail() {
        let mut m = Model::new("/d/".into(), vec!["127.0.0.0/8".parse().unwrap()]);
        m.put(
            "/d/services/web",
            br#"{"frontend":"127.0.0.1:80","check":{"type":"tcp","interval":"1s"}}"#,
            1,
        );
        m.put("/d/services/plain", br#"{"frontend":"127.0.0.1:81"}"#, 1);
        for (k, v) in [
            ("/d/backends/web/a", "127.0.0.2:80"),
            ("/d/backends/web/b", "127.0.0.3:80"),
            ("/d/backends/plain/a", "127.0.0.2:80"),
        ] {
            m.put(k, v.as_bytes(), 2);
        }
        let (tx, _rx) = mpsc::channel(8);
        let mut c = ActiveChecks::new(tx, Ejection::Kernel).unwrap();
        let d = m.desired();
        c.sync(&d);
        assert_eq!(c.tasks.len(), 2, "one checker per backend address");
        let a: SocketAddr = "127.0.0.2:80".parse().unwrap();
        let b: SocketAddr = "127.0.0.3:80".parse().unwrap();
        let check_a = c.tasks[&a].0.clone();
        assert!(c.observe(a, &check_a, false));
        let backends = |d: &Desired, port: u16| -> Vec<SocketAddr> {
            d.services
                .values()
                .find(|s| s.frontend.port() == port)
                .unwrap()
                .backends
                .iter()
                .map(|x| x.addr)
                .collect()
        };
        let mut d2 = m.desired();
        c.apply(&mut d2);
        assert_eq!(backends(&d2, 80), [b], "a is out for web");
        assert_eq!(
            backends(&d2, 81),
            [a],
            "a stays for a service without checks"
        );
        let check_b = c.tasks[&b].0.clone();
        c.observe(b, &check_b, false);
        let mut d3 = m.desired();
        c.apply(&mut d3);
        assert_eq!(backends(&d3, 80), [a, b], "all failing: fall back to all");
        // A verdict of a replaced check is ignored.
        assert!(!c.observe(a, &check_b, true));
        assert!(c.observe(a, &check_a, true));
    }

    #[tokio::test]
    async fn passive_ejection_lasts_the_backoff_and_applies_to_any_service() {
        let mut m = Model::new("/d/".into(), vec!["127.0.0.0/8".parse().unwrap()]);
        m.put("/d/services/plain", br#"{"frontend":"127.0.0.1:81"}"#, 1);
        m.put("/d/backends/plain/a", b"127.0.0.2:80", 2);
        m.put("/d/backends/plain/b", b"127.0.0.3:80", 2);
        let (tx, _rx) = mpsc::channel(8);
        let mut c = ActiveChecks::new(tx, Ejection::Kernel).unwrap();
        let a: SocketAddr = "127.0.0.2:80".parse().unwrap();
        let t0 = Instant::now();
        let backoff = Duration::from_secs(10);
        let p = c.passive(&[(a, 3)], backoff, t0);
        assert_eq!(p.ejected, [a]);
        assert!(p.changed());
        // Still failing while ejected: nothing new.
        assert!(
            !c.passive(&[(a, 5)], backoff, t0 + Duration::from_secs(1))
                .changed()
        );
        let mut d = m.desired();
        c.apply(&mut d);
        let only: Vec<_> = d
            .services
            .values()
            .next()
            .unwrap()
            .backends
            .iter()
            .map(|b| b.addr)
            .collect();
        assert_eq!(only, ["127.0.0.3:80".parse::<SocketAddr>().unwrap()]);
        assert_eq!(c.ejected(), 1);
        // Back-off over: back in, though its streak (not yet set back by
        // the caller) still reads as failing this once.
        let p = c.passive(&[(a, 5)], backoff, t0 + backoff);
        assert_eq!((p.ejected, p.returned), (vec![], vec![a]));
        assert_eq!(c.ejected(), 0);
    }
}
