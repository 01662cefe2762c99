//! Health checks shared by the announcer (its own instances) and the agent
//! (active checks of the backends it routes to): the probes and the
//! HAProxy-style rise/fall gate. An instance comes in after `rise`
//! consecutive passes and goes out after `fall` consecutive failures; any
//! failure resets the count towards `rise`, so one that alternates never
//! comes in.
use std::{future::Future, net::SocketAddr, process::Stdio, time::Duration};

use rand::Rng as _;
use tokio::{net::TcpStream, process::Command, sync::Semaphore, time::timeout};

/// Check timing defaults, in one place. An announcer checks its own
/// instances on the same host: fast, so a dead instance is withdrawn
/// within 1.5 s. A service's `check` runs from every node against every
/// backend of the service, so it is gentler on the backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Defaults {
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

/// `discovery-agent announce`: 500 ms, 300 ms, rise 2, fall 3.
pub const ANNOUNCER: Defaults = Defaults {
    interval: Duration::from_millis(500),
    timeout: Duration::from_millis(300),
    rise: 2,
    fall: 3,
};

/// A service's `check` in etcd (the agents' active checks): 1 s, 300 ms,
/// rise 2, fall 2.
pub const SERVICE_CHECK: Defaults = Defaults {
    interval: Duration::from_secs(1),
    timeout: Duration::from_millis(300),
    rise: 2,
    fall: 2,
};

/// Probes `check` every interval forever (after a random delay of up to
/// `spread`, so many checkers do not fire together), at most as many at
/// once as `limit` allows, and calls `changed(up, failure)` each time the
/// rise/fall gate changes state; stops when that returns false. The one
/// checker loop of the announcer and of the agent's active checks.
pub async fn watch<F, Fut>(
    check: &Check,
    http: &reqwest::Client,
    limit: Option<&Semaphore>,
    spread: Duration,
    mut changed: F,
) where
    F: FnMut(bool, Option<String>) -> Fut,
    Fut: Future<Output = bool>,
{
    let mut gate = Gate::new(check.rise, check.fall);
    let jitter = rand::rng().random_range(0..=spread.as_millis() as u64);
    tokio::time::sleep(Duration::from_millis(jitter)).await;
    let mut tick = tokio::time::interval(check.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = {
            let _permit = match limit {
                Some(l) => Some(l.acquire().await.expect("semaphore never closed")),
                None => None,
            };
            probe(check, http).await
        };
        if let Err(reason) = &result {
            tracing::debug!(target = ?check.kind, %reason, "check failed");
        }
        if let Some(up) = gate.observe(result.is_ok())
            && !changed(up, result.err()).await
        {
            return;
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CheckKind {
    /// Always healthy: announce while the process runs.
    None,
    Tcp {
        target: SocketAddr,
    },
    Http {
        url: String,
    },
    /// Run through `sh -c`; exit status 0 is healthy.
    Command {
        command: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Check {
    pub kind: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

/// The rise/fall state of one instance. It starts unknown: the first
/// verdict is up after `rise` passes in a row or down after `fall` failures
/// in a row, so a stale key of a dead instance is removed too.
#[derive(Debug, Clone)]
pub struct Gate {
    rise: u32,
    fall: u32,
    state: Option<bool>,
    passes: u32,
    fails: u32,
}

impl Gate {
    pub fn new(rise: u32, fall: u32) -> Self {
        Self {
            rise,
            fall,
            state: None,
            passes: 0,
            fails: 0,
        }
    }

    /// Feeds one result; returns the new state when it changes.
    pub fn observe(&mut self, pass: bool) -> Option<bool> {
        if pass {
            self.passes += 1;
            self.fails = 0;
        } else {
            self.fails += 1;
            self.passes = 0;
        }
        let verdict = if self.passes >= self.rise {
            true
        } else if self.fails >= self.fall {
            false
        } else {
            return None;
        };
        (self.state != Some(verdict)).then(|| {
            self.state = Some(verdict);
            verdict
        })
    }
}

/// One probe; Err says why it failed.
pub async fn probe(check: &Check, http: &reqwest::Client) -> Result<(), String> {
    let t = check.timeout;
    match &check.kind {
        CheckKind::None => Ok(()),
        CheckKind::Tcp { target } => timeout(t, TcpStream::connect(target))
            .await
            .map_err(|_| format!("tcp connect to {target} timed out after {t:?}"))
            .and_then(|r| {
                r.map(drop)
                    .map_err(|e| format!("tcp connect to {target}: {e}"))
            }),
        CheckKind::Http { url } => match timeout(t, http.get(url).send()).await {
            Err(_) => Err(format!("GET {url} timed out after {t:?}")),
            Ok(Err(e)) => Err(format!("GET {url}: {e}")),
            Ok(Ok(resp)) if resp.status().is_success() => Ok(()),
            Ok(Ok(resp)) => Err(format!("GET {url}: status {}", resp.status())),
        },
        CheckKind::Command { command } => {
            let child = Command::new("sh")
                .args(["-c", command])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn();
            match child {
                Err(e) => Err(format!("running {command:?}: {e}")),
                Ok(mut child) => match timeout(t, child.wait()).await {
                    Err(_) => Err(format!("{command:?} timed out after {t:?}")),
                    Ok(Err(e)) => Err(format!("waiting for {command:?}: {e}")),
                    Ok(Ok(s)) if s.success() => Ok(()),
                    Ok(Ok(s)) => Err(format!("{command:?} exited with {s}")),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(g: &mut Gate, results: &[bool]) -> Vec<Option<bool>> {
        results.iter().map(|&r| g.observe(r)).collect()
    }

    #[test]
    fn rise_and_fall() {
        let mut g = Gate::new(2, 3);
        assert_eq!(run(&mut g, &[true, true, true]), [None, Some(true), None]);
        assert_eq!(run(&mut g, &[false, false, true]), [None, None, None]);
        assert_eq!(
            run(&mut g, &[false, false, false]),
            [None, None, Some(false)]
        );
        assert_eq!(run(&mut g, &[true, true]), [None, Some(true)]);
    }

    #[test]
    fn a_dead_instance_is_reported_down_from_the_start() {
        let mut g = Gate::new(2, 3);
        assert_eq!(
            run(&mut g, &[false, false, false, false]),
            [None, None, Some(false), None]
        );
    }

    #[test]
    fn flapping_stays_out() {
        let mut g = Gate::new(2, 2);
        let alternating: Vec<bool> = (0..100).map(|i| i % 2 == 0).collect();
        assert!(run(&mut g, &alternating).iter().all(Option::is_none));
    }

    #[tokio::test]
    async fn probes_report_why() {
        let http = reqwest::Client::new();
        let check = |kind| Check {
            kind,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 1,
            fall: 1,
        };
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = l.local_addr().unwrap();
        assert_eq!(
            probe(&check(CheckKind::Tcp { target }), &http).await,
            Ok(())
        );
        drop(l);
        let e = probe(&check(CheckKind::Tcp { target }), &http)
            .await
            .unwrap_err();
        assert!(e.contains("refused"), "{e}");
        let ok = check(CheckKind::Command {
            command: "exit 0".into(),
        });
        assert_eq!(probe(&ok, &http).await, Ok(()));
        let e = probe(
            &check(CheckKind::Command {
                command: "exit 3".into(),
            }),
            &http,
        )
        .await
        .unwrap_err();
        assert!(e.contains("exit status: 3"), "{e}");
        let e = probe(
            &check(CheckKind::Command {
                command: "sleep 5".into(),
            }),
            &http,
        )
        .await
        .unwrap_err();
        assert!(e.contains("timed out"), "{e}");
    }
}
