//! Health checks with HAProxy-style rise/fall: an instance comes in after
//! `rise` consecutive passes and goes out after `fall` consecutive failures.
//! Any failure resets the count towards `rise`, so an instance that
//! alternates never comes in.
use std::{process::Stdio, time::Duration};

use rand::Rng as _;
use tokio::{net::TcpStream, process::Command, sync::mpsc, time::timeout};
use tracing::{debug, info, warn};

use super::config::{Check, CheckKind, Instance};

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

/// Checks one instance forever, sending (index, up) on each change.
pub async fn run_checker(
    index: usize,
    inst: Instance,
    http: reqwest::Client,
    tx: mpsc::Sender<(usize, bool)>,
) {
    let check = &inst.check;
    let mut gate = Gate::new(check.rise, check.fall);
    // Spread the first checks of many instances over one interval.
    let jitter = rand::rng().random_range(0..=check.interval.as_millis() as u64 / 4);
    tokio::time::sleep(Duration::from_millis(jitter)).await;
    let mut tick = tokio::time::interval(check.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = probe(check, &http).await;
        if let Err(reason) = &result {
            debug!(service = inst.service, instance = inst.id, %reason, "check failed");
        }
        if let Some(up) = gate.observe(result.is_ok()) {
            match &result {
                Ok(()) => info!(service = inst.service, instance = inst.id, addr = %inst.addr,
                                rise = check.rise, "instance healthy; announcing"),
                Err(reason) => warn!(service = inst.service, instance = inst.id, addr = %inst.addr,
                                     fall = check.fall, %reason, "instance unhealthy; withdrawing"),
            }
            if tx.send((index, up)).await.is_err() {
                return;
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
        let std::net::SocketAddr::V4(target) = l.local_addr().unwrap() else {
            unreachable!()
        };
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
