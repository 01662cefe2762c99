//! A dead backend costs a handful of connects and holds no socket: ejection
//! in the kernel, connected UDP sockets re-steered, and the opt-in reset of
//! TCP connections, with real clients in the test cgroup.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use discovery_tests::{Backend, Load, Outcome, World, clients, tally};

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

fn refused(outcomes: &[Outcome]) -> usize {
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

/// Reads a running client's lines until one answered by `name` (within
/// `timeout`); returns every outcome read so far.
fn until_answered_by(load: &mut Load, name: &str, timeout: Duration) -> Vec<Outcome> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    while let Some(l) = load.next_line(deadline.saturating_duration_since(Instant::now())) {
        let o: Outcome = serde_json::from_str(&l).expect("probe output is JSON");
        let done = o.backend.as_deref() == Some(name);
        seen.push(o);
        if done {
            return seen;
        }
    }
    panic!("never answered by {name} within {timeout:?}: {seen:?}");
}

fn errors(outcomes: &[Outcome]) -> Vec<i32> {
    outcomes.iter().filter_map(|o| o.errno).collect()
}

#[test]
fn a_connected_udp_socket_is_re_steered_and_no_other_socket_is_touched() {
    let w = World::start(PROBE, "resteer-udp", &[]);
    let a = Backend::udp("a", addr("127.0.0.2:0"));
    let b = Backend::udp("b", addr("127.0.0.3:0"));
    w.service("stats", "127.0.0.1:8125", "udp");
    w.backend("stats", "a", &a.addr().to_string());
    routed(&w, "stats", 1);
    // Three long-lived sockets, all on `a`: one connected through the
    // frontend (a statsd client), one sending with sendto through the
    // frontend, and one connected to a's address directly.
    let mut via = w.start_probe(&["udp-keep", "127.0.0.1:8125", "30000", "connected"]);
    let mut unconnected = w.start_probe(&["udp-keep", "127.0.0.1:8125", "30000", "unconnected"]);
    let direct_to = a.addr().to_string();
    let mut direct = w.start_probe(&["udp-keep", &direct_to, "30000", "connected"]);
    for l in [&mut via, &mut unconnected, &mut direct] {
        until_answered_by(l, "a", Duration::from_secs(5));
    }
    // `a` leaves etcd but keeps answering: only re-steering moves the
    // connected socket.
    w.backend("stats", "b", &b.addr().to_string());
    w.etcd.del("/discovery/backends/stats/a");
    let moved = until_answered_by(&mut via, "b", Duration::from_secs(5));
    // The destroyed socket's next call failed, and its reconnect landed
    // on b: a few calls at most, no lost run of datagrams.
    let errs = errors(&moved);
    assert!(
        !errs.is_empty() && errs.len() <= 3,
        "the connected socket was not destroyed once: {moved:?}"
    );
    // The unconnected socket follows by itself (sendmsg picks per call)
    // and never sees an error; the direct one stays on a.
    let followed = until_answered_by(&mut unconnected, "b", Duration::from_secs(5));
    let (rest_direct, rest_via) = (direct.stop(), via.stop());
    let rest_unconnected = unconnected.stop();
    assert_eq!(errors(&followed), Vec::<i32>::new(), "{followed:?}");
    assert_eq!(errors(&rest_unconnected), Vec::<i32>::new());
    assert!(
        rest_direct
            .iter()
            .all(|o| o.backend.as_deref() == Some("a")),
        "a socket connected to the backend directly was touched: {rest_direct:?}"
    );
    assert!(rest_via.iter().all(|o| o.backend.as_deref() == Some("b")));
    let (_, metrics) = w.agent.scrape("/metrics");
    assert!(
        metrics.contains("discovery_sockets_destroyed_total{protocol=\"udp\"} 1"),
        "{metrics}"
    );
}

#[test]
fn a_dns_forwarder_keeps_answering_across_its_upstreams_removal() {
    let w = World::start(PROBE, "resteer-dns", &[]);
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    let one = clients::Dnsmasq::start(addr("127.0.0.2:0"), &[("svc.test", ip("198.18.0.1"))]);
    let two = clients::Dnsmasq::start(
        addr(&format!("127.0.0.3:{}", one.addr().port())),
        &[("svc.test", ip("198.18.0.2"))],
    );
    w.service("dns", "127.0.0.1:5353", "udp");
    w.backend("dns", "one", &one.addr().to_string());
    routed(&w, "dns", 1);
    let fwd = clients::Dnsmasq::forwarder(addr("127.0.0.4:0"), addr("127.0.0.1:5353"), &w.cg);
    let port = fwd.addr().port();
    let answer = || clients::dig(&w.cg, "127.0.0.4", port, "svc.test").answers;
    assert_eq!(answer(), ["198.18.0.1"]);
    w.backend("dns", "two", &two.addr().to_string());
    w.etcd.del("/discovery/backends/dns/one");
    // The forwarder moves to the other upstream without a restart.
    let moved = discovery_tests::wait_until(Duration::from_secs(5), || {
        (answer() == ["198.18.0.2"]).then_some(())
    });
    assert!(
        moved.is_some(),
        "the forwarder never reached the new upstream:\n{}",
        fwd.log()
    );
}

/// A process we started, ended by PID on drop.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An idle pooled connection through `frontend` (`discovery-probe idle`):
/// returns the client once it holds the connection, answered by `name`.
fn pooled(w: &World, frontend: &str, name: &str) -> Load {
    let mut c = w.start_probe(&["idle", frontend]);
    let first = c
        .next_line(Duration::from_secs(5))
        .expect("the idle client connected");
    let v: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(v["backend"], name, "{first}");
    c
}

/// Waits until the agent has applied everything written so far: a marker
/// service written now shows in its status file only after the reconcile
/// (and any sweep) of the earlier writes.
fn applied(w: &World, marker: &str) {
    w.service(marker, "127.0.0.1:9", "tcp");
    w.agent
        .wait_status(&format!("service {marker}"), Duration::from_secs(5), |v| {
            discovery_tests::Agent::service_status(v, marker).is_some()
        });
}

#[test]
fn shutdown_sessions_resets_a_pooled_connection_to_a_backend_that_left() {
    let w = World::start(PROBE, "shutdown", &[]);
    let a = Backend::tcp_holding("a", addr("127.0.0.2:0"));
    let b = Backend::tcp_holding("b", addr("127.0.0.3:0"));
    w.etcd.put(
        "/discovery/services/db",
        r#"{"frontend":"127.0.0.1:5432","shutdown_sessions":true}"#,
    );
    w.backend("db", "a", &a.addr().to_string());
    routed(&w, "db", 1);
    let mut conn = pooled(&w, "127.0.0.1:5432", "a");
    w.backend("db", "b", &b.addr().to_string());
    w.etcd.del("/discovery/backends/db/a");
    // The connection is reset at once (not after a keepalive or a user
    // timeout): the client's blocked read fails with ECONNABORTED.
    let end = conn
        .next_line(Duration::from_secs(5))
        .expect("the pooled connection was never reset");
    let v: serde_json::Value = serde_json::from_str(&end).unwrap();
    assert_eq!(v["errno"], 103, "{end}");
    // Its reconnect lands on b.
    drop(pooled(&w, "127.0.0.1:5432", "b"));
    let (_, metrics) = w.agent.scrape("/metrics");
    assert!(
        metrics.contains("discovery_sockets_destroyed_total{protocol=\"tcp\"} 1"),
        "{metrics}"
    );
}

#[test]
fn by_default_a_pooled_connection_outlives_its_backends_removal() {
    let w = World::start(PROBE, "no-shutdown", &[]);
    let a = Backend::tcp_holding("a", addr("127.0.0.2:0"));
    let b = Backend::tcp_holding("b", addr("127.0.0.3:0"));
    w.service("db", "127.0.0.1:5432", "tcp");
    w.backend("db", "a", &a.addr().to_string());
    routed(&w, "db", 1);
    let mut conn = pooled(&w, "127.0.0.1:5432", "a");
    w.backend("db", "b", &b.addr().to_string());
    w.etcd.del("/discovery/backends/db/a");
    applied(&w, "marker");
    drop(pooled(&w, "127.0.0.1:5432", "b"));
    // Still open: nothing ended it.
    assert_eq!(conn.next_line(Duration::ZERO), None);
    let (_, metrics) = w.agent.scrape("/metrics");
    assert!(
        metrics.contains("discovery_sockets_destroyed_total{protocol=\"tcp\"} 0"),
        "{metrics}"
    );
}

#[test]
fn a_connected_udp_socket_in_another_network_namespace_is_re_steered_too() {
    // A container: a process of the cgroup in a namespace of its own, with
    // its own loopback and the backends on it.
    let w = World::start(PROBE, "resteer-netns", &[]);
    let ns = discovery_tests::net::Netns::new("ctr");
    let echo = env!("CARGO_BIN_EXE_discovery-echo");
    let spawn_echo = |name: &str, at: &str| {
        let mut c = ns.command(echo);
        c.args([name, at, "udp"]);
        Killed(c.spawn().expect("echo in the namespace"))
    };
    let _a = spawn_echo("a", "127.0.0.2:7001");
    let _b = spawn_echo("b", "127.0.0.3:7001");
    w.service("stats", "127.0.0.1:8125", "udp");
    w.backend("stats", "a", "127.0.0.2:7001");
    routed(&w, "stats", 1);
    let mut cmd = ns.command(PROBE);
    cmd.args(["udp-keep", "127.0.0.1:8125", "30000", "connected"]);
    let mut client = w.cg.start_command(cmd);
    until_answered_by(&mut client, "a", Duration::from_secs(5));
    w.backend("stats", "b", "127.0.0.3:7001");
    w.etcd.del("/discovery/backends/stats/a");
    let moved = until_answered_by(&mut client, "b", Duration::from_secs(5));
    assert!(!errors(&moved).is_empty(), "{moved:?}");
}

#[test]
fn a_backend_dying_under_load_costs_at_most_the_threshold_in_failed_connects() {
    let w = World::start(
        PROBE,
        "failover-load",
        &["--passive-failures", "3", "--passive-ejection", "60s"],
    );
    let x = Backend::tcp("x", addr("127.0.0.2:0"));
    let y = Backend::tcp("y", addr("127.0.0.3:0"));
    w.service("web", "127.0.0.1:8080", "tcp");
    w.backend("web", "x", &x.addr().to_string());
    w.backend("web", "y", &y.addr().to_string());
    routed(&w, "web", 2);
    // One client opening connections back to back, as in `cargo xtask
    // bench failover`.
    let mut load = w.start_load("127.0.0.1:8080", 4_000);
    load.wait_attempts(200, Duration::from_secs(5));
    let killed = discovery_tests::now_ms();
    drop(x);
    load.wait_attempts(500, Duration::from_secs(5));
    let after: Vec<Outcome> = load
        .stop()
        .into_iter()
        .filter(|o| o.at_ms > killed)
        .collect();
    let failed = after.iter().filter(|o| o.errno.is_some()).count();
    // Only x's refusals count; nothing is left unanswered.
    assert!(failed <= 3, "{failed} failed connects after the kill");
    assert!(
        after
            .iter()
            .all(|o| o.errno.is_none() || o.errno == Some(ECONNREFUSED))
    );
    assert!(after.len() >= 400, "the load kept going: {}", after.len());
}
