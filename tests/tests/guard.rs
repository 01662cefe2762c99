//! No etcd write can lock a node out or take over a socket listening on it:
//! the agent's etcd endpoints are never frontends, the agent's own
//! connections are never redirected, frontends over live listeners are
//! refused unless a service takes over on purpose, and moving a frontend
//! off a live HAProxy that way loses no connect.
use std::{
    collections::HashMap,
    net::{SocketAddr, TcpListener},
    process::{Child, Command, Stdio},
    time::Duration,
};

use discovery_tests::{
    Agent, Backend, Etcd, Outcome, Proc, SMALL_MAPS, TestCgroup, announce_args, tally, wait_until,
};

const PROBE: &str = env!("CARGO_BIN_EXE_discovery-probe");
const SETTLE: Duration = Duration::from_secs(10);

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The agent's refusals from `status --json`: (service, frontend, reason).
fn refused(agent: &Agent) -> Vec<(String, String, String)> {
    let s = agent.status();
    s["refused"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    let f = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
                    (f("service"), f("frontend"), f("reason"))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn wait_refused(agent: &Agent, want: &[(&str, &str, &str)]) {
    let want: Vec<(String, String, String)> = want
        .iter()
        .map(|(a, b, c)| ((*a).to_owned(), (*b).to_owned(), (*c).to_owned()))
        .collect();
    let mut last = Vec::new();
    let ok = wait_until(SETTLE, || {
        last = refused(agent);
        last.sort();
        (last == want).then_some(())
    });
    assert!(
        ok.is_some(),
        "refused {last:?}, want {want:?}\nagent log:\n{}",
        agent.log()
    );
}

/// Polls with fresh clients in `cg` until every one of `n` reaches `name`.
fn converge(cg: &TestCgroup, mode: &str, to: &str, name: &str, agent: &Agent) {
    let mut last = HashMap::new();
    let ok = wait_until(SETTLE, || {
        last = tally(&cg.probe(PROBE, mode, to, 5));
        (last.len() == 1 && last.contains_key(name)).then_some(())
    });
    assert!(
        ok.is_some(),
        "{mode} {to} never reached only {name}; last {last:?}\nagent log:\n{}",
        agent.log()
    );
}

#[test]
fn a_service_on_the_etcd_endpoint_is_refused_and_the_agent_survives_etcd_restarts() {
    let mut etcd = Etcd::start();
    let cg = TestCgroup::new("lockout");
    // Inside the cgroup its programs attach to, as with the default root.
    let agent = Agent::start_inside(&etcd.url, &cg, &SMALL_MAPS);
    let evil = Backend::tcp("evil", addr("127.0.0.2:0"));
    let endpoint = etcd.url.trim_start_matches("http://").to_owned();
    etcd.put(
        "/discovery/services/evil",
        &format!(r#"{{"frontend":"{endpoint}","protocol":"both"}}"#),
    );
    etcd.put("/discovery/backends/evil/x", &evil.addr().to_string());
    wait_refused(
        &agent,
        &[
            ("evil", &format!("{endpoint}/tcp"), "reserved"),
            ("evil", &format!("{endpoint}/udp"), "reserved"),
        ],
    );
    assert_eq!(
        agent.metric(&format!(
            r#"discovery_frontend_refused{{service="evil",frontend="{endpoint}/tcp",reason="reserved"}}"#
        )),
        Some(1.0)
    );
    // etcdctl on the node, a real client in the same cgroup, reaches etcd.
    let url = etcd.url.clone();
    let get = || {
        cg.output(
            Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &url, "--command-timeout", "3s"])
                .args(["get", "/discovery/services/evil", "--print-value-only"]),
        )
    };
    assert!(get().status.success(), "etcdctl in the cgroup: {:?}", get());

    // The next etcd blip: the agent reconnects from inside the cgroup and
    // keeps applying etcd.
    etcd.restart();
    let web = Backend::tcp("web1", addr("127.0.0.3:0"));
    etcd.put(
        "/discovery/services/web",
        r#"{"frontend":"127.0.0.1:8080"}"#,
    );
    etcd.put("/discovery/backends/web/a", &web.addr().to_string());
    converge(&cg, "tcp", "127.0.0.1:8080", "web1", &agent);
    wait_refused(
        &agent,
        &[
            ("evil", &format!("{endpoint}/tcp"), "reserved"),
            ("evil", &format!("{endpoint}/udp"), "reserved"),
        ],
    );
    assert!(get().status.success(), "etcdctl after the restart");
    drop(agent);
}

#[test]
fn the_agents_own_checks_are_never_redirected() {
    let etcd = Etcd::start();
    let cg = TestCgroup::new("ownconn");
    let mut args = SMALL_MAPS.to_vec();
    args.extend(["--passive-failures", "0"]);
    let agent = Agent::start_inside(&etcd.url, &cg, &args);
    let alpha = Backend::tcp("alpha", addr("127.0.0.2:0"));
    etcd.put(
        "/discovery/services/front",
        r#"{"frontend":"127.0.0.1:8081"}"#,
    );
    etcd.put("/discovery/backends/front/a", &alpha.addr().to_string());
    converge(&cg, "tcp", "127.0.0.1:8081", "alpha", &agent);
    // A backend at that frontend, where nothing listens: the agent's check
    // must see the address itself, not the service's backend.
    etcd.put(
        "/discovery/services/checked",
        r#"{"frontend":"127.0.0.1:8082","check":{"type":"tcp","interval":"100ms","timeout":"80ms","rise":1,"fall":1}}"#,
    );
    etcd.put("/discovery/backends/checked/b", "127.0.0.1:8081");
    let mut last = String::new();
    let failing = wait_until(SETTLE, || {
        let s = agent.status();
        let b = s["services"]
            .as_array()?
            .iter()
            .find(|x| x["name"] == "checked")?["backends"][0]
            .clone();
        last = b.to_string();
        (b["health"] == "check failing").then_some(())
    });
    assert!(
        failing.is_some(),
        "the check went through the redirect: {last}\n{}",
        agent.log()
    );
    let s = agent.status();
    let pid = agent.pid().expect("agent runs");
    assert!(
        s["own_processes"]
            .as_array()
            .is_some_and(|p| p.iter().any(|x| x.as_u64() == Some(u64::from(pid)))),
        "agent pid {pid} not exempt: {s}"
    );
    assert!(s["own_calls"].as_u64().is_some_and(|n| n > 0), "{s}");
    drop(agent);
}

#[test]
fn an_announcers_own_checks_are_never_redirected() {
    let etcd = Etcd::start();
    let cg = TestCgroup::new("ownannounce");
    let agent = Agent::start(&etcd.url, &cg, &SMALL_MAPS);
    let alpha = Backend::tcp("alpha", addr("127.0.0.2:0"));
    etcd.put(
        "/discovery/services/front",
        r#"{"frontend":"127.0.0.1:8083"}"#,
    );
    etcd.put("/discovery/backends/front/a", &alpha.addr().to_string());
    converge(&cg, "tcp", "127.0.0.1:8083", "alpha", &agent);
    // An announcer in the redirected cgroup whose instance is that
    // frontend, where nothing listens: its check must fail.
    let mut args = announce_args(&etcd.url, "ghost", "g1", addr("127.0.0.1:8083"));
    args.extend(["--pin-dir".to_owned(), agent.pin_dir.display().to_string()]);
    let mut announcer = Proc::spawn_in(args, Some(cg.path.clone()));
    let pid = announcer.pid().expect("announcer runs");
    let left_alone = wait_until(SETTLE, || {
        let s = agent.status();
        let exempt = s["own_processes"]
            .as_array()?
            .iter()
            .any(|x| x.as_u64() == Some(u64::from(pid)));
        (exempt && s["own_calls"].as_u64()? > 0).then_some(())
    });
    assert!(
        left_alone.is_some(),
        "the announcer's check was not left alone: {}\n{}",
        agent.status(),
        announcer.log()
    );
    assert!(announcer.is_running(), "{}", announcer.log());
    assert_eq!(
        etcd.get("/discovery/backends/ghost/g1"),
        None,
        "registered through the redirect:\n{}",
        announcer.log()
    );
    drop(announcer);
    drop(agent);
}

#[test]
fn a_frontend_over_a_live_listener_is_refused_until_it_goes_away() {
    let etcd = Etcd::start();
    let cg = TestCgroup::new("shadow");
    let agent = Agent::start(&etcd.url, &cg, &SMALL_MAPS);
    // A local DNS-like UDP server on an address of its own, and a service
    // claiming exactly that address with a remote backend.
    let local = Backend::udp("local-dns", addr("127.0.0.53:0"));
    let remote = Backend::udp("remote-dns", addr("127.0.0.54:0"));
    let front = local.addr().to_string();
    etcd.put(
        "/discovery/services/dns",
        &format!(r#"{{"frontend":"{front}","protocol":"udp"}}"#),
    );
    etcd.put("/discovery/backends/dns/r", &remote.addr().to_string());
    wait_refused(&agent, &[("dns", &format!("{front}/udp"), "listener")]);
    assert_eq!(
        agent.metric(&format!(
            r#"discovery_frontend_refused{{service="dns",frontend="{front}/udp",reason="listener"}}"#
        )),
        Some(1.0)
    );
    // Nothing that reaches the listener changes.
    let t = tally(&cg.probe(PROBE, "udp", &front, 10));
    assert_eq!(t, HashMap::from([("local-dns".to_owned(), 10)]));
    // The listener goes away: the service is applied.
    drop(local);
    converge(&cg, "udp", &front, "remote-dns", &agent);
    wait_refused(&agent, &[]);

    // A listener that appears under a routed frontend is noticed, and the
    // frontend withdrawn, within the scan interval.
    let alpha = Backend::tcp("alpha", addr("127.0.0.2:0"));
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let web = format!("127.0.0.1:{port}");
    etcd.put(
        "/discovery/services/web",
        &format!(r#"{{"frontend":"{web}"}}"#),
    );
    etcd.put("/discovery/backends/web/a", &alpha.addr().to_string());
    converge(&cg, "tcp", &web, "alpha", &agent);
    let _late = Backend::tcp("late", addr(&web));
    converge(&cg, "tcp", &web, "late", &agent);
    wait_refused(&agent, &[("web", &format!("{web}/tcp"), "listener")]);
    drop(agent);
}

/// HAProxy on `front`, forwarding to `to`; ended by PID on drop.
struct Haproxy {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    fn start(front: &str, to: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  maxconn 4096\n\
                 defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n\
                 frontend f\n  bind {front}\n  default_backend b\n\
                 backend b\n  server old {to}\n"
            ),
        )
        .unwrap();
        let child = Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start haproxy (installed by cargo xtask bootstrap)");
        let up = wait_until(SETTLE, || {
            std::net::TcpStream::connect(front).ok().map(drop)
        });
        assert!(up.is_some(), "haproxy did not listen on {front}");
        Self { child, _dir: dir }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn moving_a_frontend_off_a_live_haproxy_loses_no_connect() {
    let etcd = Etcd::start();
    let cg = TestCgroup::new("takeover");
    let agent = Agent::start(&etcd.url, &cg, &SMALL_MAPS);
    let old = Backend::tcp("via-haproxy", addr("127.0.0.2:0"));
    let new = Backend::tcp("direct", addr("127.0.0.3:0"));
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let front = format!("127.0.0.1:{port}");
    let mut haproxy = Haproxy::start(&front, old.addr());

    // Clients connect back to back through the whole migration.
    let mut load = cg.start_load(PROBE, &front, 120_000);
    let mut all: Vec<Outcome> = Vec::new();
    let mut seen = |load: &mut discovery_tests::Load, name: &str| {
        // Every line the load printed so far, until one names `name`.
        let ok = wait_until(SETTLE, || {
            while let Some(l) = load.next_line(Duration::from_millis(100)) {
                let o: Outcome = serde_json::from_str(&l).expect("load output is JSON");
                let hit = o.backend.as_deref() == Some(name);
                all.push(o);
                if hit {
                    return Some(());
                }
            }
            None
        });
        let last: Vec<&Outcome> = all.iter().rev().take(5).collect();
        assert!(
            ok.is_some(),
            "load never reached {name}; last attempts {last:?}\nstatus {}\n{}",
            agent.status(),
            agent.log()
        );
    };
    seen(&mut load, "via-haproxy");

    // 1. The service without takeover: refused, HAProxy keeps serving.
    etcd.put(
        "/discovery/services/cache",
        &format!(r#"{{"frontend":"{front}"}}"#),
    );
    etcd.put("/discovery/backends/cache/a", &new.addr().to_string());
    wait_refused(&agent, &[("cache", &format!("{front}/tcp"), "listener")]);
    seen(&mut load, "via-haproxy");

    // 2. Take over: new connects go to the backend directly.
    etcd.put(
        "/discovery/services/cache",
        &format!(r#"{{"frontend":"{front}","takeover":true}}"#),
    );
    seen(&mut load, "direct");
    wait_refused(&agent, &[]);

    // 3. HAProxy stops; nothing notices.
    let _ = haproxy.child.kill();
    let _ = haproxy.child.wait();
    let after = discovery_tests::now_ms();
    for _ in 0..50 {
        seen(&mut load, "direct");
    }
    let mut outcomes = all;
    outcomes.extend(load.stop());
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.errno.is_some()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} connects failed: {:?}",
        failed.len(),
        outcomes.len(),
        &failed[..failed.len().min(5)]
    );
    let t = tally(&outcomes);
    assert!(
        t.contains_key("via-haproxy") && t.contains_key("direct"),
        "{t:?}"
    );
    assert!(
        outcomes
            .iter()
            .filter(|o| o.at_ms > after)
            .all(|o| o.backend.as_deref() == Some("direct")),
        "a connect after HAProxy stopped went elsewhere"
    );
    drop(agent);
}
