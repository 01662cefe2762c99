//! The announcer against a real etcd and real backends on 127.0.0.x, and end
//! to end with the agent and a client in a test cgroup.
use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use discovery_tests::{Agent, Backend, Etcd, Proc, SMALL_MAPS, TestCgroup, tally, wait_until};

const PROBE: &str = env!("CARGO_BIN_EXE_discovery-probe");
const KEY: &str = "/discovery/backends/web/a";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// `discovery-agent announce` for one instance `web/a` at `backend`.
fn announce(etcd: &Etcd, backend: SocketAddr, extra: &[&str]) -> Proc {
    let mut args = discovery_tests::announce_args(&etcd.url, "web", "a", backend);
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::spawn(args)
}

fn weight(value: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(value).expect("backend value is JSON");
    v["weight"].as_u64().expect("weight")
}

fn wait_present(etcd: &Etcd, key: &str, timeout: Duration) -> String {
    wait_until(timeout, || etcd.get(key)).unwrap_or_else(|| panic!("{key} never appeared"))
}

fn wait_absent(etcd: &Etcd, key: &str, timeout: Duration) -> Duration {
    let t0 = Instant::now();
    wait_until(timeout, || etcd.get(key).is_none().then_some(()))
        .unwrap_or_else(|| panic!("{key} still present after {timeout:?}"));
    t0.elapsed()
}

#[test]
fn registers_with_a_lease_withdraws_a_dead_backend_and_brings_it_back() {
    let etcd = Etcd::start();
    let b = Backend::tcp("a", addr("127.0.0.2:0"));
    let at = b.addr();
    let ann = announce(&etcd, at, &["--ttl", "5s"]);
    let v = wait_present(&etcd, KEY, Duration::from_secs(5));
    let json: serde_json::Value = serde_json::from_str(&v).unwrap();
    assert_eq!(json["addr"], at.to_string());
    assert_eq!(json["weight"], 1);
    assert!(etcd.lease_of(KEY).unwrap() > 0, "registered under a lease");
    // Killed: out within interval × fall plus a margin for the etcd write.
    drop(b);
    let gone = wait_absent(&etcd, KEY, Duration::from_secs(5));
    assert!(gone < Duration::from_millis(300 + 1000), "took {gone:?}");
    // Back: in again after `rise` passes.
    let _b = Backend::tcp("a", at);
    wait_present(&etcd, KEY, Duration::from_secs(5));
    let log = ann.log();
    assert!(log.contains("instance unhealthy; withdrawing"), "{log}");
    assert!(
        log.contains("connection refused") || log.contains("Connection refused"),
        "{log}"
    );
}

/// An HTTP health endpoint that flaps: one pass then two failures, over and
/// over (or always 200 once told to), counting complete requests. Two
/// failures between passes keep the pattern flapping even if a stray
/// connection (a client retry under load) takes one answer.
struct FlappingHealth {
    addr: SocketAddr,
    served: Arc<AtomicUsize>,
    steady: Arc<AtomicBool>,
}

impl FlappingHealth {
    fn start() -> Self {
        let l = TcpListener::bind("127.0.0.3:0").unwrap();
        let addr = l.local_addr().unwrap();
        let served = Arc::new(AtomicUsize::new(0));
        let steady = Arc::new(AtomicBool::new(false));
        let (s, st) = (served.clone(), steady.clone());
        thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                if !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    continue;
                }
                let n = s.fetch_add(1, Ordering::SeqCst);
                let ok = st.load(Ordering::SeqCst) || n % 3 == 0;
                let status = if ok {
                    "200 OK"
                } else {
                    "500 Internal Server Error"
                };
                let _ = c.write_all(
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                );
            }
        });
        Self {
            addr,
            served,
            steady,
        }
    }
}

#[test]
fn a_flapping_instance_stays_out_until_it_passes_rise_times_in_a_row() {
    let etcd = Etcd::start();
    let h = FlappingHealth::start();
    let target = h.addr.to_string();
    let _ann = announce(
        &etcd,
        h.addr,
        &[
            "--check",
            "http",
            "--check-target",
            &target,
            "--check-path",
            "/health",
        ],
    );
    // Twenty flapping answers: never two passes in a row, never in.
    let seen = wait_until(Duration::from_secs(10), || {
        assert!(etcd.get(KEY).is_none(), "flapping instance was registered");
        (h.served.load(Ordering::SeqCst) >= 20).then_some(())
    });
    assert!(seen.is_some(), "checks did not run");
    assert!(etcd.get(KEY).is_none());
    // Steady passes bring it in: the check really gates registration.
    h.steady.store(true, Ordering::SeqCst);
    wait_present(&etcd, KEY, Duration::from_secs(5));
}

#[test]
fn sigterm_drains_weight_zero_first_then_deletes_and_exits() {
    let etcd = Etcd::start();
    let b = Backend::tcp("a", addr("127.0.0.2:0"));
    let mut ann = announce(&etcd, b.addr(), &["--drain-period", "1s"]);
    assert_eq!(weight(&wait_present(&etcd, KEY, Duration::from_secs(5))), 1);
    ann.signal(libc::SIGTERM);
    let drained = wait_until(Duration::from_secs(5), || {
        etcd.get(KEY).filter(|v| weight(v) == 0)
    });
    assert!(drained.is_some(), "never saw weight 0:\n{}", ann.log());
    wait_absent(&etcd, KEY, Duration::from_secs(5));
    let status = ann
        .wait_exit(Duration::from_secs(5))
        .expect("announcer exited");
    assert!(status.success(), "{status:?}\n{}", ann.log());
}

#[test]
fn a_second_signal_skips_the_drain_wait() {
    let etcd = Etcd::start();
    let b = Backend::tcp("a", addr("127.0.0.2:0"));
    let mut ann = announce(&etcd, b.addr(), &["--drain-period", "60s"]);
    wait_present(&etcd, KEY, Duration::from_secs(5));
    ann.signal(libc::SIGTERM);
    // Weight 0 is written, then the 60 s hold begins.
    let drained = wait_until(Duration::from_secs(5), || {
        etcd.get(KEY).filter(|v| weight(v) == 0)
    });
    assert!(drained.is_some(), "never saw weight 0:\n{}", ann.log());
    ann.signal(libc::SIGINT);
    let status = ann
        .wait_exit(Duration::from_secs(10))
        .expect("exited well before 60s");
    assert!(status.success());
    assert!(etcd.get(KEY).is_none());
}

#[test]
fn registers_again_after_etcd_was_down_longer_than_the_ttl() {
    let mut etcd = Etcd::start();
    let b = Backend::tcp("a", addr("127.0.0.2:0"));
    let ann = announce(&etcd, b.addr(), &["--ttl", "2s"]);
    wait_present(&etcd, KEY, Duration::from_secs(5));
    let before = etcd.lease_of(KEY).unwrap();
    etcd.stop();
    // The outage itself: longer than the TTL (a scenario's duration, not a
    // wait for a condition).
    thread::sleep(Duration::from_secs(3));
    etcd.restart();
    // etcd gives surviving leases a fresh TTL on restart, so the key may be
    // back at once under the old lease; the announcer moves it to a new one.
    let lease = wait_until(Duration::from_secs(10), || {
        etcd.lease_of(KEY).filter(|l| *l != before && *l != 0)
    })
    .unwrap_or_else(|| panic!("not registered under a new lease:\n{}", ann.log()));
    // Still there well past a TTL: the new lease is kept alive.
    thread::sleep(Duration::from_secs(3));
    assert_eq!(etcd.lease_of(KEY), Some(lease), "{}", ann.log());
}

#[test]
fn kill_9_lets_the_lease_expire() {
    let etcd = Etcd::start();
    let b = Backend::tcp("a", addr("127.0.0.2:0"));
    let mut ann = announce(&etcd, b.addr(), &["--ttl", "2s"]);
    wait_present(&etcd, KEY, Duration::from_secs(5));
    ann.kill();
    // Gone within the TTL (plus etcd's expiry granularity).
    let gone = wait_absent(&etcd, KEY, Duration::from_secs(5));
    assert!(gone <= Duration::from_millis(3500), "took {gone:?}");
}

#[test]
fn bad_config_is_rejected_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("announce.toml");
    std::fs::write(
        &file,
        "[[instance]]\nservice = \"web\"\naddr = \"127.0.0.2:80\"\n[instance.check]\ntype = \"tcp\"\nrise = \"two\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(discovery_tests::agent_bin())
        .args(["announce", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("{}:6:", file.display())), "{err}");
}

#[test]
fn end_to_end_clients_stop_reaching_a_killed_backend() {
    let etcd = Etcd::start();
    let cg = TestCgroup::new("announce-e2e");
    let agent = Agent::start(&etcd.url, &cg, &SMALL_MAPS);
    let put = std::process::Command::new(discovery_tests::agent_bin())
        .args([
            "service",
            "put",
            "web",
            "--frontend",
            "127.0.0.1:8080",
            "--etcd",
            &etcd.url,
        ])
        .output()
        .unwrap();
    assert!(put.status.success(), "{put:?}");
    let a = Backend::tcp("a", addr("127.0.0.2:0"));
    let b = Backend::tcp("b", addr("127.0.0.3:0"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("announce.toml");
    let instance = |id: &str, at: SocketAddr| {
        format!(
            "[[instance]]\nservice = \"web\"\nid = \"{id}\"\naddr = \"{at}\"\n[instance.check]\ntype = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"80ms\"\n"
        )
    };
    std::fs::write(&file, instance("a", a.addr()) + &instance("b", b.addr())).unwrap();
    let _ann = Proc::spawn(vec![
        "announce".into(),
        "--etcd".into(),
        etcd.url.clone(),
        "--config".into(),
        file.display().to_string(),
    ]);
    let both = wait_until(Duration::from_secs(10), || {
        let t = tally(&cg.probe(PROBE, "tcp", "127.0.0.1:8080", 20));
        (t.len() == 2 && t.contains_key("a") && t.contains_key("b")).then_some(())
    });
    assert!(
        both.is_some(),
        "not balanced over a and b:\n{}",
        agent.log()
    );
    drop(a);
    // No manual step: the announcer withdraws a, the agent stops sending
    // clients there.
    let t0 = Instant::now();
    let moved = wait_until(Duration::from_secs(5), || {
        let t = tally(&cg.probe(PROBE, "tcp", "127.0.0.1:8080", 20));
        (t == HashMap::from([("b".to_owned(), 20)])).then_some(())
    });
    assert!(
        moved.is_some(),
        "clients still sent to the dead backend:\n{}",
        agent.log()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t0.elapsed()
    );
}

#[test]
fn a_stale_key_of_a_dead_instance_is_removed() {
    let etcd = Etcd::start();
    // Left by an earlier run; nothing listens at the address any more.
    let dead = {
        let b = Backend::tcp("a", addr("127.0.0.2:0"));
        b.addr()
    };
    etcd.put(KEY, &format!(r#"{{"addr":"{dead}","weight":1}}"#));
    let ann = announce(&etcd, dead, &[]);
    wait_absent(&etcd, KEY, Duration::from_secs(5));
    assert!(
        ann.log().contains("instance unhealthy; withdrawing"),
        "{}",
        ann.log()
    );
}

#[test]
fn drain_flag_drains_an_instance_another_announcer_registered() {
    let etcd = Etcd::start();
    let b = Backend::tcp("a", addr("127.0.0.2:0"));
    let _running = announce(&etcd, b.addr(), &[]);
    wait_present(&etcd, KEY, Duration::from_secs(5));
    let lease = etcd.lease_of(KEY).unwrap();
    let mut drain = announce(&etcd, b.addr(), &["--drain", "--drain-period", "1s"]);
    let zero = wait_until(Duration::from_secs(5), || {
        etcd.get(KEY).filter(|v| weight(v) == 0)
    });
    assert!(zero.is_some(), "never saw weight 0:\n{}", drain.log());
    assert_eq!(
        etcd.lease_of(KEY),
        Some(lease),
        "drain keeps the key's lease"
    );
    wait_absent(&etcd, KEY, Duration::from_secs(5));
    let status = drain
        .wait_exit(Duration::from_secs(5))
        .expect("drain exited");
    assert!(status.success(), "{}", drain.log());
}

#[test]
fn service_put_and_rm_write_the_documented_json() {
    let etcd = Etcd::start();
    let cli = |args: &[&str]| {
        std::process::Command::new(discovery_tests::agent_bin())
            .args(args)
            .args(["--etcd", &etcd.url])
            .output()
            .unwrap()
    };
    let out = cli(&[
        "service",
        "put",
        "dns",
        "--frontend",
        "127.0.0.1:53",
        "--protocol",
        "both",
    ]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value =
        serde_json::from_str(&etcd.get("/discovery/services/dns").unwrap()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"frontend": "127.0.0.1:53", "protocol": "both"})
    );
    let out = cli(&["service", "put", "Bad", "--frontend", "127.0.0.1:53"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid service name"),
        "{out:?}"
    );
    // IPv6, and one service on both loopbacks.
    let out = cli(&[
        "service",
        "put",
        "v6",
        "--frontend",
        "127.0.0.1:53",
        "--frontend",
        "[::1]:53",
    ]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value =
        serde_json::from_str(&etcd.get("/discovery/services/v6").unwrap()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"frontend": ["127.0.0.1:53", "[::1]:53"], "protocol": "tcp"})
    );
    let out = cli(&["service", "put", "v6", "--frontend", "[fe80::1%2]:53"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("zone"),
        "{out:?}"
    );
    assert!(cli(&["service", "rm", "dns"]).status.success());
    assert!(etcd.get("/discovery/services/dns").is_none());
    let out = cli(&["service", "rm", "dns"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not defined"),
        "{out:?}"
    );
}
