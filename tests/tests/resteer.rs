//! A dead backend costs a handful of connects and holds no socket: ejection
//! in the kernel, connected UDP sockets re-steered, and the opt-in reset of
//! TCP connections, with real clients in the test cgroup.
use std::{collections::HashMap, net::SocketAddr, time::Duration};

use discovery_tests::{Agent, Backend, World, tally};

const PROBE: &str = env!("CARGO_BIN_EXE_discovery-probe");
const ECONNREFUSED: i32 = 111;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// An address that refuses connects: a backend's, once it has closed.
fn refusing(ip: &str) -> SocketAddr {
    let b = Backend::tcp("gone", addr(&format!("{ip}:0")));
    b.addr()
}

fn refused(outcomes: &[discovery_tests::Outcome]) -> usize {
    outcomes
        .iter()
        .filter(|o| o.errno == Some(ECONNREFUSED))
        .count()
}

#[test]
fn the_kernel_ejects_a_refusing_backend_after_the_threshold_and_not_one_connect_later() {
    // A long back-off: the agent does not return it during the test.
    let w = World::start(
        PROBE,
        "kernel-eject",
        &["--passive-failures", "3", "--passive-ejection", "60s"],
    );
    let dead = refusing("127.0.0.2");
    let b = Backend::tcp("b", addr("127.0.0.3:0"));
    w.service("web", "127.0.0.1:8080", "tcp");
    w.backend("web", "gone", &dead.to_string());
    w.backend("web", "b", &b.addr().to_string());
    routed(&w, "web", 2);
    // One client, connects back to back, far faster than the agent polls
    // (every 200 ms): exactly the threshold fails, then the kernel skips
    // the dead backend.
    let before = w.agent.counters();
    let out = w.probe("tcp", "127.0.0.1:8080", 300);
    let failed = refused(&out);
    let after = w.agent.counters();
    assert!(failed <= 3, "{failed} connects failed:\n{out:?}");
    assert_eq!(
        tally(&out).get("b").copied().unwrap_or(0) + failed,
        300,
        "{out:?}"
    );
    if failed == 3 {
        // It was drawn often enough to be ejected (not a matter of luck).
        assert!(after["kernel_ejection"] > before["kernel_ejection"]);
    }
    assert!(after["connect_failed"] - before["connect_failed"] == failed as u64);
    // The agent follows: status and metrics say who ejected it.
    w.agent
        .wait_status("gone ejected by the kernel", Duration::from_secs(5), |v| {
            backend(v, "web", "gone")
                .is_some_and(|b| b["health"] == "ejected" && b["ejected_by"] == "kernel")
        });
    let (_, metrics) = w.agent.scrape("/metrics");
    assert!(
        metrics.contains("discovery_passive_ejections_total{by=\"kernel\"} 1"),
        "{metrics}"
    );
    assert_eq!(w.agent.counters()["no_backend"], 0);
}

#[test]
fn when_every_backend_is_ejected_the_kernel_falls_back_to_all_of_them() {
    let w = World::start(
        PROBE,
        "kernel-eject-all",
        &["--passive-failures", "2", "--passive-ejection", "60s"],
    );
    let dead = refusing("127.0.0.2");
    w.service("web", "127.0.0.1:8080", "tcp");
    w.backend("web", "gone", &dead.to_string());
    routed(&w, "web", 1);
    // Every connect still reaches the (only) backend, which refuses: the
    // same fallback as the agent's, never "no backend".
    let out = w.probe("tcp", "127.0.0.1:8080", 20);
    assert_eq!(refused(&out), 20, "{out:?}");
    let c = w.agent.counters();
    assert_eq!(c["no_backend"], 0);
    assert!(c["kernel_ejection"] >= 1);
}

/// Waits until the kernel routes `n` backends of `service` (read from the
/// maps by `status --json`, without a connect that would count).
fn routed(w: &World, service: &str, n: usize) {
    let ok = discovery_tests::wait_until(Duration::from_secs(10), || {
        let v = w.agent.status();
        let svc = v["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == service)?
            .clone();
        let routed = svc["backends"]
            .as_array()?
            .iter()
            .filter(|b| b["routed"] == true)
            .count();
        (routed == n).then_some(())
    });
    assert!(
        ok.is_some(),
        "{service} never routed {n} backends:\n{}",
        w.agent.log()
    );
}

/// One backend's entry in the status file.
fn backend<'a>(
    v: &'a serde_json::Value,
    service: &str,
    instance: &str,
) -> Option<&'a serde_json::Value> {
    v["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == service)?["backends"]
        .as_array()?
        .iter()
        .find(|b| b["instance"] == instance)
}

#[allow(dead_code)]
fn all(what: &str, n: usize) -> HashMap<String, usize> {
    HashMap::from([(what.to_owned(), n)])
}

#[allow(dead_code)]
fn agent_health(v: &serde_json::Value, service: &str, instance: &str) -> Option<String> {
    Agent::backend_health(v, service, instance)
}
