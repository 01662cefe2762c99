//! End-to-end: real etcd, the real agent and kernel programs on a per-test
//! child cgroup, real backends on 127.0.0.x, real clients in the cgroup.
use std::{collections::HashMap, net::SocketAddr, time::Duration};

use discovery_tests::{Agent, Backend, Etcd, SMALL_MAPS, TestCgroup, World, tally, wait_until};

const PROBE: &str = env!("CARGO_BIN_EXE_discovery-probe");
const ECONNREFUSED: i32 = 111;

fn world(tag: &str, extra: &[&str]) -> World {
    World::start(PROBE, tag, extra)
}

fn only(name: &str) -> impl Fn(&HashMap<String, usize>) -> bool + '_ {
    move |t| t.len() == 1 && t.contains_key(name)
}

/// The tally of `n` attempts that all gave `what`.
fn all(what: &str, n: usize) -> HashMap<String, usize> {
    HashMap::from([(what.to_owned(), n)])
}

/// Runs the agent with `args`, expects it to fail, returns its stderr.
fn agent_fails<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = std::process::Command::new(discovery_tests::agent_bin())
        .args(args)
        .output()
        .expect("run discovery-agent");
    assert!(!out.status.success(), "agent should have failed: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn each_test_runs_in_a_network_namespace_of_its_own() {
    let w = world("netns", &[]);
    let ns = discovery_tests::net::current().expect("the harness entered a namespace");
    let ino = |p: &str| {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(p).unwrap().ino()
    };
    assert_ne!(
        ino("/proc/thread-self/ns/net"),
        ino("/proc/self/ns/net"),
        "{ns}"
    );
    // The agent (and so etcd, the backends and the clients) is in it too.
    let pid = w.agent.pid().expect("agent running");
    assert_eq!(
        ino(&format!("/proc/{pid}/ns/net")),
        ino("/proc/thread-self/ns/net")
    );
}

#[test]
fn tcp_is_redirected_and_getpeername_reports_the_frontend() {
    let w = world("tcp", &[]);
    let b = Backend::tcp("alpha", addr("127.0.0.2:0"));
    w.service("web", "127.0.0.1:8080", "tcp");
    w.backend("web", "alpha", &b.addr().to_string());
    w.converge("tcp", "127.0.0.1:8080", 5, only("alpha"));
    for o in w.probe("tcp", "127.0.0.1:8080", 20) {
        assert_eq!(o.backend.as_deref(), Some("alpha"));
        assert_eq!(o.peer.as_deref(), Some("127.0.0.1:8080"), "getpeername");
    }
    let c = w.agent.counters();
    assert!(c["connect_redirected"] >= 20, "{c:?}");
    assert!(c["peer_revnat"] >= 20, "{c:?}");
}

#[test]
fn udp_unconnected_and_connected_replies_come_from_the_frontend() {
    let w = world("udp", &[]);
    let b = Backend::udp("dns1", addr("127.0.0.3:0"));
    w.service("dns", "127.0.0.1:5353", "udp");
    w.backend("dns", "one", &b.addr().to_string());
    w.converge("udp", "127.0.0.1:5353", 3, only("dns1"));
    for o in w.probe("udp", "127.0.0.1:5353", 10) {
        assert_eq!(o.backend.as_deref(), Some("dns1"));
        assert_eq!(o.peer.as_deref(), Some("127.0.0.1:5353"), "reply source");
    }
    for o in w.probe("udp-connected", "127.0.0.1:5353", 10) {
        assert_eq!(o.backend.as_deref(), Some("dns1"));
        assert_eq!(o.peer.as_deref(), Some("127.0.0.1:5353"), "getpeername");
    }
    // TCP to the same frontend is not a service here: untouched.
    let t = tally(&w.probe("tcp", "127.0.0.1:5353", 1));
    assert_eq!(t.get(&format!("errno {ECONNREFUSED}")), Some(&1), "{t:?}");
    let c = w.agent.counters();
    assert!(c["sendmsg_redirected"] >= 10, "{c:?}");
    assert!(c["recvmsg_revnat"] >= 10, "{c:?}");
    assert_eq!(c["no_backend"], 0, "{c:?}");
}

#[test]
fn protocol_both_serves_tcp_and_udp() {
    let w = world("both", &[]);
    let t = Backend::tcp("t", addr("127.0.0.4:0"));
    // Same port for UDP, as a real dual-protocol daemon would use.
    let u = Backend::udp("t", t.addr());
    w.service("statsd", "127.0.0.1:8125", "both");
    w.backend("statsd", "a", &t.addr().to_string());
    w.converge("tcp", "127.0.0.1:8125", 3, only("t"));
    w.converge("udp", "127.0.0.1:8125", 3, only("t"));
    drop(u);
}

#[test]
fn balances_across_backends_by_weight() {
    let w = world("balance", &[]);
    let a = Backend::tcp("a", addr("127.0.0.2:0"));
    let b = Backend::tcp("b", addr("127.0.0.3:0"));
    w.service("web", "127.0.0.1:8080", "tcp");
    w.backend("web", "a", &a.addr().to_string());
    w.backend(
        "web",
        "b",
        &format!(r#"{{"addr":"{}","weight":3}}"#, b.addr()),
    );
    w.converge("tcp", "127.0.0.1:8080", 20, |t| t.len() == 2);
    let n = 800;
    let t = tally(&w.probe("tcp", "127.0.0.1:8080", n));
    let share_b = t.get("b").copied().unwrap_or(0) as f64 / n as f64;
    // Expected 0.75; the binomial standard deviation is 0.015, so this
    // bound is over 6 sigma wide and still rejects equal or inverted weights.
    assert!((0.65..0.85).contains(&share_b), "b share {share_b}: {t:?}");
    assert_eq!(
        t.values().sum::<usize>(),
        n,
        "every connect succeeded: {t:?}"
    );
    // Many unconnected UDP sockets spread over backends too.
    let ua = Backend::udp("ua", addr("127.0.0.2:0"));
    let ub = Backend::udp("ub", addr("127.0.0.3:0"));
    w.service("dns", "127.0.0.1:53", "udp");
    w.backend("dns", "a", &ua.addr().to_string());
    w.backend("dns", "b", &ub.addr().to_string());
    w.converge("udp", "127.0.0.1:53", 60, |t| {
        t.len() == 2 && t.contains_key("ua") && t.contains_key("ub")
    });
}

#[test]
fn backend_add_weight_zero_and_delete_reach_new_connections() {
    let w = world("changes", &[]);
    let a = Backend::tcp("a", addr("127.0.0.2:0"));
    let b = Backend::tcp("b", addr("127.0.0.3:0"));
    w.service("web", "127.0.0.1:8080", "tcp");
    w.backend("web", "a", &a.addr().to_string());
    w.converge("tcp", "127.0.0.1:8080", 5, only("a"));
    // Add.
    w.backend("web", "b", &b.addr().to_string());
    w.converge("tcp", "127.0.0.1:8080", 30, |t| {
        t.contains_key("b") && t.contains_key("a")
    });
    // Weight 0 takes a out of rotation.
    w.backend(
        "web",
        "a",
        &format!(r#"{{"addr":"{}","weight":0}}"#, a.addr()),
    );
    w.converge("tcp", "127.0.0.1:8080", 30, only("b"));
    // Delete b: a is all that is left; a service whose backends are all at
    // weight 0 still answers.
    w.etcd.del("/discovery/backends/web/b");
    w.converge("tcp", "127.0.0.1:8080", 10, only("a"));
    // Delete a: no backend, refused at once.
    w.etcd.del("/discovery/backends/web/a");
    w.converge(
        "tcp",
        "127.0.0.1:8080",
        3,
        only(&format!("errno {ECONNREFUSED}")),
    );
}

#[test]
fn service_delete_leaves_the_frontend_untouched() {
    let w = world("svcdel", &[]);
    // Something really listens on the frontend address (so the service
    // must take over to be routed at all): after the service is deleted,
    // clients must reach it directly.
    let direct = Backend::tcp("direct", addr("127.0.0.1:0"));
    let fe = direct.addr().to_string();
    let b = Backend::tcp("redirected", addr("127.0.0.2:0"));
    w.etcd.put(
        "/discovery/services/web",
        &format!(r#"{{"frontend":"{fe}","takeover":true}}"#),
    );
    w.backend("web", "a", &b.addr().to_string());
    w.converge("tcp", &fe, 5, only("redirected"));
    w.etcd.del("/discovery/services/web");
    w.converge("tcp", &fe, 5, only("direct"));
}

#[test]
fn frontend_without_backend_fails_immediately() {
    let w = world("nobackend", &[]);
    w.service("empty", "127.0.0.1:9999", "both");
    w.converge(
        "tcp",
        "127.0.0.1:9999",
        1,
        only(&format!("errno {ECONNREFUSED}")),
    );
    let before = w.agent.counters()["no_backend"];
    let tcp = w.probe("tcp", "127.0.0.1:9999", 5);
    let udp = w.probe("udp", "127.0.0.1:9999", 5);
    for o in tcp.iter().chain(&udp) {
        assert_eq!(o.errno, Some(ECONNREFUSED), "{o:?}");
    }
    // The counter proves the refusal came from the program (a plain closed
    // port would also refuse TCP, but never a UDP send).
    assert_eq!(w.agent.counters()["no_backend"], before + 10);
}

#[test]
fn invalid_values_are_skipped_and_others_keep_working() {
    let mut w = world("invalid", &[]);
    let a = Backend::tcp("a", addr("127.0.0.2:0"));
    w.service("web", "127.0.0.1:8080", "tcp");
    w.backend("web", "good", &a.addr().to_string());
    w.converge("tcp", "127.0.0.1:8080", 3, only("a"));
    let bad = [
        ("/discovery/backends/web/bad1", "not-an-address"),
        ("/discovery/backends/web/bad2", "[fe80::1%1]:80"),
        (
            "/discovery/backends/web/bad3",
            r#"{"addr":"127.0.0.9:1","weight":"x"}"#,
        ),
        ("/discovery/services/broken", "{"),
        ("/discovery/services/UPPER", r#"{"frontend":"127.0.0.1:1"}"#),
        ("/discovery/backends/web/x/y", "127.0.0.2:1"),
    ];
    for (k, v) in bad {
        w.etcd.put(k, v);
    }
    // Every bad key is reported by name, with its reason.
    let snap = w
        .agent
        .wait_status("every invalid key", Duration::from_secs(5), |v| {
            bad.iter().all(|(k, _)| {
                v["invalid"]
                    .as_array()
                    .is_some_and(|l| l.iter().any(|i| i["key"] == *k))
            })
        });
    assert_eq!(snap["invalid_total"], bad.len(), "{snap}");
    let reason = |key: &str| {
        snap["invalid"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["key"] == key)
            .map(|i| i["reason"].as_str().unwrap().to_owned())
            .unwrap()
    };
    assert!(
        reason("/discovery/backends/web/bad2").contains("has a zone"),
        "{snap}"
    );
    // And each is logged with its key.
    let log = w.agent.log();
    for (k, _) in bad {
        assert!(
            log.contains(&format!("key=\"{k}\"")),
            "{k} not logged:\n{log}"
        );
    }
    let invalid = wait_until(Duration::from_secs(5), || {
        w.agent
            .metric("discovery_invalid_keys")
            .filter(|v| *v >= bad.len() as f64)
    });
    assert_eq!(invalid, Some(bad.len() as f64));
    let (status, _) = w.agent.scrape("/nope");
    assert!(status.contains("404"), "{status}");
    assert!(w.agent.is_running());
    // A second service added after the garbage still works.
    let b = Backend::tcp("b", addr("127.0.0.3:0"));
    w.service("api", "127.0.0.1:8081", "tcp");
    w.backend("api", "one", &b.addr().to_string());
    w.converge("tcp", "127.0.0.1:8081", 3, only("b"));
    let t = tally(&w.probe("tcp", "127.0.0.1:8080", 20));
    assert_eq!(t, all("a", 20));
}

#[test]
fn frontend_outside_allowed_ranges_is_refused() {
    let w = world("allowed", &["--allowed-frontends", "127.0.0.0/24"]);
    // 127.0.1.1 is loopback but outside the allowed /24: the service must
    // not hijack it, so clients keep reaching what really listens there.
    let direct = Backend::tcp("direct", addr("127.0.1.1:0"));
    let fe = direct.addr().to_string();
    let b = Backend::tcp("hijacker", addr("127.0.0.2:0"));
    w.service("evil", &fe, "tcp");
    w.backend("evil", "a", &b.addr().to_string());
    let snap = w
        .agent
        .wait_status("the refused service", Duration::from_secs(5), |v| {
            v["invalid"]
                .as_array()
                .is_some_and(|l| l.iter().any(|i| i["key"] == "/discovery/services/evil"))
        });
    assert!(
        snap.to_string().contains("outside the allowed frontends"),
        "{snap}"
    );
    let t = tally(&w.probe("tcp", &fe, 10));
    assert_eq!(t, all("direct", 10));
}

#[test]
fn contested_frontend_goes_to_the_oldest_service() {
    let w = world("conflict", &[]);
    let a = Backend::tcp("first", addr("127.0.0.2:0"));
    let b = Backend::tcp("second", addr("127.0.0.3:0"));
    w.service("first", "127.0.0.1:7000", "tcp");
    w.backend("first", "a", &a.addr().to_string());
    w.converge("tcp", "127.0.0.1:7000", 3, only("first"));
    w.service("second", "127.0.0.1:7000", "tcp");
    w.backend("second", "a", &b.addr().to_string());
    // The newer service is known and not routed: the frontend is taken.
    w.agent
        .wait_status("second not routed", Duration::from_secs(5), |v| {
            Agent::service_status(v, "second").is_some_and(|s| s["routed"] == false)
        });
    assert_eq!(
        tally(&w.probe("tcp", "127.0.0.1:7000", 10)),
        all("first", 10)
    );
    // The loser takes over when the winner goes.
    w.etcd.del("/discovery/services/first");
    w.converge("tcp", "127.0.0.1:7000", 5, only("second"));
}

#[test]
fn watch_resumes_after_etcd_restart_and_traffic_flows_meanwhile() {
    let mut w = world("etcdrestart", &[]);
    let a = Backend::tcp("a", addr("127.0.0.2:0"));
    let b = Backend::tcp("b", addr("127.0.0.3:0"));
    w.service("web", "127.0.0.1:8080", "tcp");
    w.backend("web", "a", &a.addr().to_string());
    w.converge("tcp", "127.0.0.1:8080", 3, only("a"));
    w.etcd.stop();
    w.agent
        .wait_status("etcd lost", Duration::from_secs(10), |v| {
            v["etcd"]["connected"] == false && v["etcd"]["losses"] == 1
        });
    // Last known backends keep serving while etcd is down.
    assert_eq!(tally(&w.probe("tcp", "127.0.0.1:8080", 10)), all("a", 10));
    w.etcd.restart();
    w.backend("web", "b", &b.addr().to_string());
    w.etcd.del("/discovery/backends/web/a");
    let r = wait_until(Duration::from_secs(15), || {
        (tally(&w.probe("tcp", "127.0.0.1:8080", 10)) == all("b", 10)).then_some(())
    });
    assert!(
        r.is_some(),
        "agent did not resume the watch:\n{}",
        w.agent.log()
    );
}

#[test]
fn agent_waits_for_etcd_at_start_and_says_so() {
    let etcd = Etcd::start();
    let url = etcd.url.clone();
    let cg = TestCgroup::new("noetcd");
    // Nothing listens here yet: the agent must keep retrying, not exit.
    drop(etcd);
    let mut agent = Agent::spawn(&url, &cg, &SMALL_MAPS);
    // Running, not ready, and the status file says why.
    let snap = agent.wait_status("why etcd is missing", Duration::from_secs(15), |v| {
        v["etcd"]["error"].is_string()
    });
    assert_eq!(snap["ready"], false, "{snap}");
    assert_eq!(snap["etcd"]["connected"], false, "{snap}");
    assert_eq!(
        agent.metric("discovery_etcd_connected"),
        Some(0.0),
        "{snap}"
    );
    assert!(agent.is_running(), "{}", agent.log());
    agent.stop();
}

#[test]
fn stop_keeps_traffic_flowing_restart_adopts_and_detach_removes() {
    let mut w = world("lifecycle", &[]);
    let a = Backend::tcp("a", addr("127.0.0.2:0"));
    let b = Backend::tcp("b", addr("127.0.0.3:0"));
    w.service("web", "127.0.0.1:8080", "tcp");
    w.backend("web", "a", &a.addr().to_string());
    w.converge("tcp", "127.0.0.1:8080", 3, only("a"));
    let status = w.agent.stop().expect("agent was running");
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    // Agent down: pinned programs and maps keep redirecting.
    assert_eq!(tally(&w.probe("tcp", "127.0.0.1:8080", 10)), all("a", 10));
    // A change made while it was down is applied after the restart.
    w.backend("web", "b", &b.addr().to_string());
    w.etcd.del("/discovery/backends/web/a");
    w.agent.respawn();
    let snap = w.agent.wait_ready(Duration::from_secs(20));
    assert_adopted(&snap);
    w.converge("tcp", "127.0.0.1:8080", 10, only("b"));
    w.agent.stop();
    let out = w.agent.run_cmd("detach");
    assert!(out.status.success(), "{out:?}");
    assert!(!w.agent.pin_dir.exists(), "pins removed");
    // Detached: the frontend is an ordinary closed port again.
    assert_eq!(
        tally(&w.probe("tcp", "127.0.0.1:8080", 3)),
        all(&format!("errno {ECONNREFUSED}"), 3)
    );
}

#[test]
fn clear_errors_for_bad_setup() {
    let never = "/sys/fs/bpf/discovery-test-never";
    let err = agent_fails(["run", "--cgroup", "/nonexistent-cgroup", "--pin-dir", never]);
    assert!(err.contains("/nonexistent-cgroup"), "{err}");
    let err = agent_fails(["run", "--cgroup", "/tmp", "--pin-dir", never]);
    assert!(err.contains("/tmp is not a cgroup v2 directory"), "{err}");
    let err = agent_fails(["run", "--prefix", "relative/"]);
    assert!(err.contains("must start with '/'"), "{err}");
    assert!(!std::path::Path::new(never).exists());
}

#[test]
fn non_root_gets_a_clear_error() {
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(discovery_tests::agent_bin())
        .args(["run", "--pin-dir", "/sys/fs/bpf/discovery-test-never"])
        .output()
        .expect("setpriv (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("must run as root"), "{err}");
}

#[test]
fn full_map_reports_the_service_and_keeps_the_rest() {
    let w = world("full", &["--max-services", "1"]);
    let a = Backend::tcp("a", addr("127.0.0.2:0"));
    let b = Backend::tcp("b", addr("127.0.0.3:0"));
    // Applied in frontend order: 7001 fits, 7002 does not.
    w.service("first", "127.0.0.1:7001", "tcp");
    w.backend("first", "a", &a.addr().to_string());
    w.converge("tcp", "127.0.0.1:7001", 3, only("a"));
    w.service("second", "127.0.0.1:7002", "tcp");
    w.backend("second", "b", &b.addr().to_string());
    let snap = w
        .agent
        .wait_status("second not applied", Duration::from_secs(5), |v| {
            v["not_applied"]
                .as_array()
                .is_some_and(|l| l.iter().any(|n| n["service"] == "second"))
        });
    let n = &snap["not_applied"][0];
    assert_eq!(n["frontend"], "127.0.0.1:7002/tcp", "{snap}");
    assert!(
        n["error"].as_str().unwrap().contains("map is full"),
        "{snap}"
    );
    assert_eq!(tally(&w.probe("tcp", "127.0.0.1:7001", 10)), all("a", 10));
    let sample = r#"discovery_service_not_applied{service="second",frontend="127.0.0.1:7002/tcp",map="disc_services"}"#;
    assert_eq!(
        w.agent.metric(sample),
        Some(1.0),
        "{}",
        w.agent.scrape("/metrics").1
    );
    // Room freed: the waiting service is applied, and the metric clears.
    w.etcd.del("/discovery/services/first");
    w.converge("tcp", "127.0.0.1:7002", 3, only("b"));
    assert_eq!(w.agent.metric(sample), None);
    w.agent
        .wait_status("nothing left unapplied", Duration::from_secs(5), |v| {
            v["not_applied"].as_array().is_some_and(Vec::is_empty)
        });
}

#[test]
fn pins_attached_to_another_cgroup_are_not_adopted() {
    let mut w = world("pinsa", &[]);
    w.agent.stop();
    let other = TestCgroup::new("pinsb");
    let (cg, pins) = (
        other.path.display().to_string(),
        w.agent.pin_dir.display().to_string(),
    );
    let mut args = vec![
        "run",
        "--etcd",
        &w.etcd.url,
        "--cgroup",
        &cg,
        "--pin-dir",
        &pins,
    ];
    args.extend(SMALL_MAPS);
    let err = agent_fails(args);
    assert!(err.contains("is attached to another cgroup"), "{err}");
    assert!(err.contains("discovery-agent detach --pin-dir"), "{err}");
    // The original attachment is untouched and still adoptable.
    w.agent.respawn();
    let snap = w.agent.wait_ready(Duration::from_secs(20));
    assert_adopted(&snap);
}

/// Every program of the status file was adopted, none attached anew.
fn assert_adopted(snap: &serde_json::Value) {
    let programs = snap["programs"].as_object().expect("programs");
    // The sock_addr programs and the sock_ops program.
    assert_eq!(
        programs.len(),
        discovery_common::names::PROGRAMS.len() + 1,
        "{snap}"
    );
    assert!(programs.values().all(|h| h == "adopted"), "{snap}");
}

#[test]
fn pinned_maps_whose_key_changed_are_refused_naming_both_layouts() {
    let pin_dir = std::path::PathBuf::from("/sys/fs/bpf").join(discovery_tests::unique("layout"));
    std::fs::create_dir(&pin_dir).unwrap();
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(pin_dir.clone());
    let map = pin_dir.join("disc_services").display().to_string();
    let out = std::process::Command::new("bpftool")
        .args([
            "map", "create", &map, "type", "hash", "key", "8", "value", "8",
        ])
        .args(["entries", "16", "name", "disc_services", "flags", "1"])
        .output()
        .expect("bpftool");
    assert!(out.status.success(), "{out:?}");
    let cg = TestCgroup::new("layout");
    let (cgp, pins) = (cg.path.display().to_string(), pin_dir.display().to_string());
    let mut args = vec!["run", "--cgroup", &cgp, "--pin-dir", &pins];
    args.extend(SMALL_MAPS);
    let err = agent_fails(args);
    assert!(
        err.contains("disc_services (type 1, key 8 B, value 8 B, 16 entries) cannot be migrated")
            && err.contains("key 20 B, value 32 B"),
        "{err}"
    );
    // Nothing was attached.
    let out = std::process::Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&cg.path)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "{out:?}"
    );
}

#[test]
fn maintenance_takes_a_backend_out_on_every_node_until_enabled() {
    let w = world("maint", &[]);
    let a = Backend::tcp("a", addr("127.0.0.2:0"));
    let b = Backend::tcp("b", addr("127.0.0.3:0"));
    w.service("web", "127.0.0.1:8080", "tcp");
    w.backend("web", "a", &a.addr().to_string());
    w.backend("web", "b", &b.addr().to_string());
    w.converge("tcp", "127.0.0.1:8080", 20, |t| t.len() == 2);
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(discovery_tests::agent_bin())
            .args(args)
            .args(["--etcd", &w.etcd.url])
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    };
    cli(&[
        "backend",
        "disable",
        "web",
        "a",
        "--reason",
        "kernel upgrade",
    ]);
    w.converge("tcp", "127.0.0.1:8080", 20, only("b"));
    let v = w.etcd.get("/discovery/maintenance/web/a").unwrap();
    assert!(v.contains("kernel upgrade"), "{v}");
    // Its announcer rewriting the backend key does not end maintenance.
    w.backend(
        "web",
        "a",
        &format!(r#"{{"addr":"{}","weight":3}}"#, a.addr()),
    );
    w.backend(
        "web",
        "b",
        &format!(r#"{{"addr":"{}","weight":1}}"#, b.addr()),
    );
    assert_eq!(tally(&w.probe("tcp", "127.0.0.1:8080", 20)), all("b", 20));
    // Maintenance is never a fallback: with every backend in it, refuse.
    cli(&["backend", "disable", "web", "b"]);
    w.converge(
        "tcp",
        "127.0.0.1:8080",
        3,
        only(&format!("errno {ECONNREFUSED}")),
    );
    cli(&["backend", "enable", "web", "a"]);
    w.converge("tcp", "127.0.0.1:8080", 10, only("a"));
    let out = std::process::Command::new(discovery_tests::agent_bin())
        .args(["backend", "enable", "web", "a", "--etcd", &w.etcd.url])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not in maintenance"),
        "{out:?}"
    );
}

#[test]
fn consistent_policy_sticks_workloads_and_moves_about_one_nth_on_change() {
    let w = world("consistent", &[]);
    let backends: Vec<Backend> = (0..5)
        .map(|i| Backend::tcp(&format!("b{i}"), addr(&format!("127.0.0.{}:0", i + 2))))
        .collect();
    w.etcd.put(
        "/discovery/services/web",
        r#"{"frontend":"127.0.0.1:8080","policy":"consistent"}"#,
    );
    for (i, b) in backends.iter().enumerate() {
        w.backend("web", &format!("b{i}"), &b.addr().to_string());
    }
    // Workloads are cgroups: 40 children of the test cgroup.
    let workloads: Vec<TestCgroup> = (0..40).map(|i| w.cg.child(&format!("w{i}"))).collect();
    let assign = |expect_absent: Option<&str>| -> Option<Vec<String>> {
        let mut v = Vec::new();
        for c in &workloads {
            let t = tally(&c.probe(PROBE, "tcp", "127.0.0.1:8080", 4));
            // Sticky: every connection of a workload lands on one backend.
            if t.len() != 1 {
                return None;
            }
            let b = t.into_keys().next().unwrap();
            if b.starts_with("errno") || Some(b.as_str()) == expect_absent {
                return None;
            }
            v.push(b);
        }
        Some(v)
    };
    // All five registered and in use (40 workloads leave one of five
    // backends empty with probability under 0.1%).
    let distinct = |v: &Vec<String>| v.iter().collect::<std::collections::BTreeSet<_>>().len();
    let before = wait_until(Duration::from_secs(5), || {
        assign(None).filter(|v| distinct(v) == 5)
    })
    .expect("workloads not sticky, or not spread over all five backends");
    w.etcd.del("/discovery/backends/web/b0");
    let after =
        wait_until(Duration::from_secs(5), || assign(Some("b0"))).expect("did not converge");
    let on_removed = before.iter().filter(|b| *b == "b0").count();
    let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    eprintln!(
        "consistent: {moved} of 40 workloads moved, {on_removed} were on the removed backend"
    );
    // Only the removed backend's workloads must move (ideal 1/5); Maglev
    // allows a little more.
    assert!(moved >= on_removed);
    assert!(
        moved - on_removed <= 3,
        "{moved} moved, {on_removed} had to"
    );
    drop(workloads);
}

#[test]
fn active_checks_eject_a_dead_backend_on_this_node_and_bring_it_back() {
    // Active checks alone: passive ejection would hold the dead backend out
    // for its own back-off.
    let w = world("activecheck", &["--passive-failures", "0"]);
    let a = Backend::tcp("a", addr("127.0.0.2:0"));
    let b = Backend::tcp("b", addr("127.0.0.3:0"));
    let at = a.addr();
    w.etcd.put(
        "/discovery/services/web",
        r#"{"frontend":"127.0.0.1:8080","check":{"type":"tcp","interval":"100ms","timeout":"80ms","rise":2,"fall":2}}"#,
    );
    // Registered for good: no announcer will withdraw a.
    w.backend("web", "a", &at.to_string());
    w.backend("web", "b", &b.addr().to_string());
    w.converge("tcp", "127.0.0.1:8080", 20, |t| t.len() == 2);
    drop(a);
    let out = wait_until(Duration::from_secs(5), || {
        (tally(&w.probe("tcp", "127.0.0.1:8080", 20)) == all("b", 20)).then_some(())
    });
    assert!(
        out.is_some(),
        "dead backend not ejected:\n{}",
        w.agent.log()
    );
    assert_eq!(w.agent.metric("discovery_backends_ejected"), Some(1.0));
    assert!(
        w.etcd.get("/discovery/backends/web/a").is_some(),
        "only this node's view changed"
    );
    let _a = Backend::tcp("a", at);
    let back = wait_until(Duration::from_secs(5), || {
        (tally(&w.probe("tcp", "127.0.0.1:8080", 20)).len() == 2).then_some(())
    });
    assert!(
        back.is_some(),
        "backend did not come back:\n{}",
        w.agent.log()
    );
}

#[test]
fn when_every_backend_fails_its_check_traffic_falls_back_to_all() {
    let w = world("fallback", &[]);
    // Plain TCP backends fail an HTTP check, though they serve clients.
    let a = Backend::tcp("a", addr("127.0.0.2:0"));
    let b = Backend::tcp("b", addr("127.0.0.3:0"));
    w.etcd.put(
        "/discovery/services/web",
        r#"{"frontend":"127.0.0.1:8080","check":{"type":"http","path":"/health","interval":"100ms","timeout":"80ms"}}"#,
    );
    w.backend("web", "a", &a.addr().to_string());
    w.backend("web", "b", &b.addr().to_string());
    w.agent
        .wait_status("the fallback", Duration::from_secs(5), |v| {
            Agent::service_status(v, "web").is_some_and(|s| s["fallback"] == true)
        });
    let ejected = wait_until(Duration::from_secs(5), || {
        w.agent
            .metric("discovery_backends_ejected")
            .filter(|v| *v == 2.0)
    });
    assert!(ejected.is_some());
    w.converge("tcp", "127.0.0.1:8080", 30, |t| t.len() == 2);
}

#[test]
fn connect_timeout_fails_a_connect_to_a_backend_that_drops_syns() {
    const ETIMEDOUT: i32 = 110;
    let w = world("ctimeout", &[]);
    // Nothing answers: SYNs to this address are dropped silently.
    let dead = addr(&format!("127.0.0.9:{}", {
        let l = std::net::TcpListener::bind("127.0.0.9:0").unwrap();
        l.local_addr().unwrap().port()
    }));
    let _drop = discovery_tests::PacketDrop::syns(dead);
    w.etcd.put(
        "/discovery/services/web",
        r#"{"frontend":"127.0.0.1:8080","connect_timeout":"1500ms"}"#,
    );
    w.backend("web", "dead", &dead.to_string());
    // Without the timeout the kernel retries SYNs for minutes; the probe
    // itself gives up after 5 s with no errno.
    let o = wait_until(Duration::from_secs(15), || {
        let o = w.probe("tcp", "127.0.0.1:8080", 1).remove(0);
        (o.errno == Some(ETIMEDOUT)).then_some(o)
    })
    .unwrap_or_else(|| panic!("connect never timed out early:\n{}", w.agent.log()));
    assert!(
        (1_400_000..2_500_000).contains(&o.micros),
        "timed out after {} ms, configured 1500 ms",
        o.micros / 1000
    );
    eprintln!(
        "connect timed out after {} ms (configured 1500 ms)",
        o.micros / 1000
    );
    let c = w.agent.counters();
    assert!(c["connect_failed"] >= 1, "{c:?}");
    // Below the kernel's 1 s initial RTO: the SYN gets a shorter one.
    w.etcd.put(
        "/discovery/services/web",
        r#"{"frontend":"127.0.0.1:8080","connect_timeout":"300ms"}"#,
    );
    let o = wait_until(Duration::from_secs(15), || {
        let o = w.probe("tcp", "127.0.0.1:8080", 1).remove(0);
        (o.errno == Some(ETIMEDOUT) && o.micros < 1_000_000).then_some(o)
    })
    .unwrap_or_else(|| panic!("no sub-second connect timeout:\n{}", w.agent.log()));
    assert!(o.micros >= 280_000, "timed out after {} us", o.micros);
    eprintln!(
        "connect timed out after {} ms (configured 300 ms)",
        o.micros / 1000
    );
}

#[test]
fn keepalive_notices_an_idle_connection_to_a_vanished_backend() {
    const ETIMEDOUT: i32 = 110;
    let w = world("keepalive", &[]);
    let b = Backend::tcp_holding("held", addr("127.0.0.2:0"));
    w.etcd.put(
        "/discovery/services/web",
        r#"{"frontend":"127.0.0.1:8080",
            "keepalive":{"idle":"1s","interval":"1s","probes":2}}"#,
    );
    w.backend("web", "held", &b.addr().to_string());
    // A second service with only a user timeout: no keepalive.
    w.etcd.put(
        "/discovery/services/plain",
        r#"{"frontend":"127.0.0.1:8081","user_timeout":"20s"}"#,
    );
    w.backend("plain", "held", &b.addr().to_string());
    // One idle connection, once the frontend is applied (before that the
    // probe's connect is refused and it exits without a line).
    let idle = |frontend: &str| {
        wait_until(Duration::from_secs(10), || {
            let mut p = w.start_probe(&["idle", frontend]);
            let line = p.next_line(Duration::from_secs(5))?;
            let opts: serde_json::Value = serde_json::from_str(&line).unwrap();
            Some((p, opts))
        })
        .unwrap_or_else(|| panic!("no connection to {frontend}:\n{}", w.agent.log()))
    };
    let (_plain, o) = idle("127.0.0.1:8081");
    assert_eq!(
        (o["keepalive"].as_i64(), o["user_timeout"].as_i64()),
        (Some(0), Some(20_000)),
        "{o}"
    );

    let (mut idle, o) = idle("127.0.0.1:8080");
    assert_eq!(o["backend"], "held");
    let got = ["keepalive", "idle", "interval", "probes"].map(|k| o[k].as_i64());
    assert_eq!(got, [Some(1), Some(1), Some(1), Some(2)], "{o}");
    assert_eq!(o["user_timeout"], 0, "{o}");

    // The backend's host goes silent: no RST, no FIN, nothing.
    let _gone = discovery_tests::PacketDrop::all(b.addr());
    let end = idle
        .next_line(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("idle connection never noticed the vanished backend"));
    let end: serde_json::Value = serde_json::from_str(&end).unwrap();
    assert_eq!(end["errno"], ETIMEDOUT, "{end}");
    // 1 s idle + 2 probes 1 s apart; nothing else times out an idle socket.
    assert!(end["after_ms"].as_u64() < Some(10_000), "{end}");
    eprintln!("idle connection failed after {} ms", end["after_ms"]);
}

#[test]
fn passive_checks_eject_a_backend_that_refuses_connections() {
    let w = world(
        "passive",
        &["--passive-failures", "3", "--passive-ejection", "2s"],
    );
    // Registered, but nothing listens there any more: connects are refused.
    let refused = {
        let b = Backend::tcp("gone", addr("127.0.0.2:0"));
        b.addr()
    };
    let b = Backend::tcp("b", addr("127.0.0.3:0"));
    w.service("web", "127.0.0.1:8080", "tcp");
    w.backend("web", "gone", &refused.to_string());
    w.backend("web", "b", &b.addr().to_string());
    // Some clients get refused at first; after three in a row the agent
    // takes the backend out on this node, before any etcd change.
    let ok = wait_until(Duration::from_secs(10), || {
        (tally(&w.probe("tcp", "127.0.0.1:8080", 20)) == all("b", 20)).then_some(())
    });
    assert!(
        ok.is_some(),
        "refusing backend not ejected:\n{}",
        w.agent.log()
    );
    let health = |v: &serde_json::Value| Agent::backend_health(v, "web", "gone");
    w.agent
        .wait_status("gone ejected", Duration::from_secs(5), |v| {
            health(v).is_some_and(|h| h == "ejected")
        });
    assert!(w.agent.counters()["connect_failed"] >= 3);
    assert!(w.etcd.get("/discovery/backends/web/gone").is_some());
    // After the back-off it is tried again.
    w.agent
        .wait_status("gone back in rotation", Duration::from_secs(5), |v| {
            health(v).is_some_and(|h| h == "ok")
        });
}

#[test]
fn least_conn_sends_new_connections_away_from_a_backend_holding_many() {
    let w = world("leastconn", &[]);
    let fast = Backend::tcp("fast", addr("127.0.0.2:0"));
    let slow = Backend::tcp_holding("slow", addr("127.0.0.3:0"));
    w.etcd.put(
        "/discovery/services/web",
        r#"{"frontend":"127.0.0.1:8080","policy":"least_conn"}"#,
    );
    w.backend("web", "fast", &fast.addr().to_string());
    w.backend("web", "slow", &slow.addr().to_string());
    // (A plain probe would wait for the slow backend to close.)
    w.agent
        .wait_status("both backends", Duration::from_secs(5), |v| {
            Agent::service_status(v, "web")
                .is_some_and(|s| s["backends"].as_array().is_some_and(|b| b.len() == 2))
        });
    // The client keeps the slow backend's connections open (hung requests)
    // and closes the fast one's at once.
    let n = 200;
    let slow_share = w.held_share("127.0.0.1:8080", n, "slow");
    eprintln!(
        "least_conn: slow backend got {:.0}% of {n} connections",
        slow_share * 100.0
    );
    // Random would give 50%; two choices give about 25% once the slow one
    // leads (both draws must hit it). The bound is several sigma from both.
    assert!(slow_share < 0.38, "slow share {slow_share}");
}
