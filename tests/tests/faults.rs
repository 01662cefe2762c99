//! Fault injection under load: a load generator in the test cgroup opens
//! new connections back to back and records every attempt; whatever the
//! control plane does, no connection to a live backend may fail, and each
//! must land on a backend that was registered.
use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    thread,
    time::Duration,
};

use discovery_tests::{Backend, Outcome, World, now_ms, wait_until};

const PROBE: &str = env!("CARGO_BIN_EXE_discovery-probe");
const FE: &str = "127.0.0.1:8080";

fn world(tag: &str, extra: &[&str]) -> World {
    World::start(PROBE, tag, extra)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Asserts every attempt succeeded and landed on one of `allowed`;
/// returns answers per backend.
fn check_load(outcomes: &[Outcome], allowed: &[&str]) -> HashMap<String, usize> {
    assert!(
        outcomes.len() > 100,
        "load generator made only {} attempts",
        outcomes.len()
    );
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.backend.is_none()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} connections failed, first: {:?}",
        failed.len(),
        outcomes.len(),
        failed.first()
    );
    let mut per = HashMap::new();
    for o in outcomes {
        let b = o.backend.clone().unwrap();
        assert!(
            allowed.contains(&b.as_str()),
            "landed on {b}, not one of {allowed:?}"
        );
        *per.entry(b).or_default() += 1;
    }
    eprintln!(
        "load: {} connections, 0 failed, per backend {per:?}",
        outcomes.len()
    );
    per
}

/// Ids of the pinned maps: unchanged ids mean nothing was re-created.
fn map_ids(w: &World) -> BTreeSet<u64> {
    [
        "disc_services",
        "disc_slots",
        "disc_backends",
        "disc_counters",
    ]
    .iter()
    .map(|m| {
        let out = std::process::Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(w.agent.pin_dir.join(m))
            .output()
            .expect("bpftool");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
        v["id"].as_u64().expect("map id")
    })
    .collect()
}

/// Program ids attached to the test cgroup.
fn prog_ids(w: &World) -> BTreeSet<u64> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(&w.cg.path)
        .output()
        .expect("bpftool");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    v.as_array()
        .expect("list")
        .iter()
        .map(|p| p["id"].as_u64().expect("prog id"))
        .collect()
}

/// Service `web` with live backends a and b registered, and c live but not
/// registered yet.
fn web_with_a_and_b(tag: &str) -> (World, [Backend; 3]) {
    let w = world(tag, &[]);
    let a = Backend::tcp("a", addr("127.0.0.2:0"));
    let b = Backend::tcp("b", addr("127.0.0.3:0"));
    let c = Backend::tcp("c", addr("127.0.0.4:0"));
    w.service("web", FE, "tcp");
    w.backend("web", "a", &a.addr().to_string());
    w.backend("web", "b", &b.addr().to_string());
    w.converge("tcp", FE, 20, |t| t.len() == 2);
    (w, [a, b, c])
}

#[test]
fn agent_killed_under_load_keeps_traffic_and_the_restart_adopts_and_reconciles() {
    let (mut w, [_a, _b, c]) = web_with_a_and_b("kill9");
    let (maps, progs) = (map_ids(&w), prog_ids(&w));

    let mut load = w.start_load(FE, 4000);
    load.wait_attempts(100, Duration::from_secs(5));
    w.agent.kill();
    // Changed while the agent is down: b goes, c comes.
    w.etcd.del("/discovery/backends/web/b");
    w.backend("web", "c", &c.addr().to_string());
    // Clients keep connecting while the agent is down.
    load.wait_attempts(100, Duration::from_secs(5));
    w.agent.respawn();
    let ready = w.agent.wait_ready(Duration::from_secs(20));
    let converged_at = wait_until(Duration::from_secs(2), || {
        let t = discovery_tests::tally(&w.probe("tcp", FE, 20));
        (t.len() == 2 && t.contains_key("a") && t.contains_key("c")).then(now_ms)
    })
    .expect("restarted agent did not reconcile");
    let outcomes = load.finish();

    check_load(&outcomes, &["a", "b", "c"]);
    // After the reconcile, b (deleted meanwhile) gets nothing new.
    let late_b = outcomes
        .iter()
        .filter(|o| o.at_ms > converged_at && o.backend.as_deref() == Some("b"))
        .count();
    assert_eq!(
        late_b, 0,
        "connections to a deleted backend after the reconcile"
    );
    let programs = ready["programs"].as_object().expect("programs");
    assert!(programs.values().all(|h| h == "adopted"), "{ready}");
    assert_eq!(map_ids(&w), maps, "maps were re-created");
    assert_eq!(prog_ids(&w), progs, "programs were replaced");
}

#[test]
fn programs_are_replaced_atomically_under_load() {
    let mut w = world("upgrade", &[]);
    let a = Backend::tcp("a", addr("127.0.0.2:0"));
    w.service("web", FE, "tcp");
    w.backend("web", "a", &a.addr().to_string());
    w.converge("tcp", FE, 5, |t| t.contains_key("a"));
    let (maps, progs) = (map_ids(&w), prog_ids(&w));

    let mut load = w.start_load(FE, 3000);
    load.wait_attempts(100, Duration::from_secs(5));
    w.agent.stop();
    // An upgrade drill: the new agent swaps every attached program.
    w.agent.respawn_adding(&["--replace-programs"]);
    let ready = w.agent.wait_ready(Duration::from_secs(20));
    let outcomes = load.finish();

    check_load(&outcomes, &["a"]);
    // The sock_addr programs and the sock_ops program.
    let programs = discovery_common::names::PROGRAMS.len() + 1;
    let how = ready["programs"].as_object().expect("programs");
    assert_eq!(how.len(), programs, "{ready}");
    assert!(how.values().all(|h| h == "replaced"), "{ready}");
    let now = prog_ids(&w);
    assert_eq!(now.len(), programs);
    assert!(
        now.is_disjoint(&progs),
        "old programs still attached: {progs:?} {now:?}"
    );
    assert_eq!(map_ids(&w), maps, "maps were re-created");
}

#[test]
fn backend_churn_under_load_never_exposes_a_half_written_service() {
    let w = world("churn", &[]);
    let names = ["a", "b", "c", "d"];
    let backends: Vec<Backend> = names
        .iter()
        .enumerate()
        .map(|(i, n)| Backend::tcp(n, addr(&format!("127.0.0.{}:0", i + 2))))
        .collect();
    w.service("web", FE, "tcp");
    // a is always registered; b, c and d churn.
    w.backend("web", "a", &backends[0].addr().to_string());
    w.converge("tcp", FE, 5, |t| t.contains_key("a"));

    let load = w.start_load(FE, 3000);
    let mut changes = 0;
    let deadline = std::time::Instant::now() + Duration::from_millis(2800);
    let mut i = 0usize;
    while std::time::Instant::now() < deadline {
        let j = 1 + i % 3;
        let key = format!("/discovery/backends/web/{}", names[j]);
        match (i / 3) % 3 {
            0 => w.etcd.put(&key, &backends[j].addr().to_string()),
            1 => w.etcd.put(
                &key,
                &format!(r#"{{"addr":"{}","weight":{}}}"#, backends[j].addr(), i % 5),
            ),
            _ => w.etcd.del(&key),
        }
        changes += 1;
        i += 1;
    }
    let outcomes = load.finish();
    let per = check_load(&outcomes, &names);
    assert!(changes > 20, "only {changes} changes");
    eprintln!("churn: {changes} etcd changes in 2.8 s");
    assert!(per.len() >= 2, "churned backends never served: {per:?}");
    assert!(w.agent.log().matches("service applied").count() > 10);
}

#[test]
fn etcd_down_longer_than_lease_ttls_keeps_last_backends_then_resyncs_deletes() {
    let mut w = world("etcddown", &[]);
    let a = Backend::tcp("a", addr("127.0.0.2:0"));
    let b = Backend::tcp("b", addr("127.0.0.3:0"));
    w.service("web", FE, "tcp");
    // a's announcer is gone: its lease is never kept alive again.
    let lease = w.etcd.lease_grant(2);
    w.etcd
        .put_with_lease("/discovery/backends/web/a", &a.addr().to_string(), &lease);
    w.backend("web", "b", &b.addr().to_string());
    w.converge("tcp", FE, 20, |t| t.len() == 2);

    let load = w.start_load(FE, 6000);
    w.etcd.stop();
    w.agent
        .wait_status("etcd lost", Duration::from_secs(10), |v| {
            v["etcd"]["connected"] == false
        });
    // The outage: longer than the lease TTL.
    thread::sleep(Duration::from_secs(3));
    w.etcd.restart();
    // etcd gives leases a fresh TTL on restart; a's expires 2 s later and
    // its delete must reach the agent.
    let converged_at = wait_until(Duration::from_secs(10), || {
        let t = discovery_tests::tally(&w.probe("tcp", FE, 20));
        (t.len() == 1 && t.contains_key("b")).then(now_ms)
    })
    .unwrap_or_else(|| panic!("a's expiry never applied:\n{}", w.agent.log()));
    let outcomes = load.finish();
    // a stayed live throughout, so every connection must succeed.
    check_load(&outcomes, &["a", "b"]);
    let late_a = outcomes
        .iter()
        .filter(|o| o.at_ms > converged_at && o.backend.as_deref() == Some("a"))
        .count();
    assert_eq!(late_a, 0);
}

#[test]
fn history_compacted_while_the_agent_is_cut_off_converges() {
    let (mut w, [_a, _b, c]) = web_with_a_and_b("compact");

    let load = w.start_load(FE, 4000);
    // Cut the agent off: frozen, its watch stream then broken by an etcd
    // restart, and the history it missed compacted away.
    w.agent.signal(libc::SIGSTOP);
    w.etcd.del("/discovery/backends/web/a");
    w.backend("web", "c", &c.addr().to_string());
    for i in 0..20 {
        w.etcd.put("/discovery/noise", &i.to_string());
    }
    w.etcd.compact();
    w.etcd.restart();
    w.agent.signal(libc::SIGCONT);
    let converged_at = wait_until(Duration::from_secs(10), || {
        let t = discovery_tests::tally(&w.probe("tcp", FE, 20));
        (t.len() == 2 && t.contains_key("b") && t.contains_key("c")).then(now_ms)
    })
    .unwrap_or_else(|| panic!("did not converge after compaction:\n{}", w.agent.log()));
    let outcomes = load.finish();
    check_load(&outcomes, &["a", "b", "c"]);
    assert!(
        !outcomes
            .iter()
            .any(|o| o.at_ms > converged_at && o.backend.as_deref() == Some("a"))
    );
}

#[test]
fn hostile_values_are_reported_and_nothing_else_is_disturbed() {
    let mut w = world("garbage", &[]);
    let a = Backend::tcp("a", addr("127.0.0.2:0"));
    w.service("web", FE, "tcp");
    w.backend("web", "a", &a.addr().to_string());
    w.converge("tcp", FE, 5, |t| t.contains_key("a"));
    let rss_before = w.agent.rss_kib();

    let load = w.start_load(FE, 4000);
    let hostile: Vec<(&str, String)> = vec![
        ("/discovery/services/huge", "x".repeat(100_000)),
        ("/discovery/services/array", "[1,2,3]".into()),
        ("/discovery/services/number", "42".into()),
        ("/discovery/services/null", "null".into()),
        (
            "/discovery/services/nested",
            r#"{"frontend":{"ip":"127.0.0.1"}}"#.into(),
        ),
        (
            "/discovery/services/badport",
            r#"{"frontend":"127.0.0.1:99999"}"#.into(),
        ),
        (
            "/discovery/services/hijack",
            r#"{"frontend":"10.0.0.1:80"}"#.into(),
        ),
        (
            "/discovery/services/..",
            r#"{"frontend":"127.0.0.1:81"}"#.into(),
        ),
        (
            "/discovery/services/a/../b",
            r#"{"frontend":"127.0.0.1:82"}"#.into(),
        ),
        (
            "/discovery/services/ünï",
            r#"{"frontend":"127.0.0.1:83"}"#.into(),
        ),
        (
            "/discovery/backends/web/../../services/web",
            "127.0.0.9:1".into(),
        ),
        (
            "/discovery/backends/web/evil",
            "127.0.0.9:1; rm -rf /".into(),
        ),
        (
            "/discovery/backends/web/big",
            r#"{"addr":"127.0.0.9:1","weight":1e99}"#.into(),
        ),
    ];
    for (k, v) in &hostile {
        w.etcd.put(k, v);
    }
    // Thousands of bad keys at once.
    let bulk: Vec<(String, String)> = (0..3000)
        .map(|i| {
            (
                format!("/discovery/backends/web/bulk-{i}"),
                format!("not-an-address-{i}"),
            )
        })
        .collect();
    w.etcd.put_many(&bulk);
    let outcomes = load.finish();
    check_load(&outcomes, &["a"]);

    let n = hostile.len() + bulk.len();
    let reported = wait_until(Duration::from_secs(10), || {
        let c = w.agent.log().matches("skipping invalid etcd key").count();
        (c >= n).then_some(c)
    });
    assert!(reported.is_some(), "not every bad key was reported");
    let log = w.agent.log();
    for (k, _) in &hostile {
        assert!(log.contains(&format!("key=\"{k}\"")), "{k} not reported");
    }
    assert!(w.agent.is_running());
    // Valid changes still apply after the flood.
    let b = Backend::tcp("b", addr("127.0.0.3:0"));
    w.backend("web", "b", &b.addr().to_string());
    w.converge("tcp", FE, 20, |t| t.len() == 2);
    let rss_after = w.agent.rss_kib();
    eprintln!("agent RSS {rss_before} KiB -> {rss_after} KiB after {n} bad keys");
    assert!(
        rss_after < rss_before + 20 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
}

#[test]
fn three_member_cluster_losing_its_leader_then_a_follower_keeps_changes_flowing() {
    let mut cluster = discovery_tests::EtcdCluster::start(3);
    let cg = discovery_tests::TestCgroup::new("cluster");
    let agent = discovery_tests::Agent::start(&cluster.urls(), &cg, &discovery_tests::SMALL_MAPS);
    let a = Backend::tcp("a", addr("127.0.0.2:0"));
    let b = Backend::tcp("b", addr("127.0.0.3:0"));
    let c = Backend::tcp("c", addr("127.0.0.4:0"));
    let put = |k: &str, v: &str, cl: &discovery_tests::EtcdCluster| cl.ctl_retry(&["put", k, v]);
    put(
        "/discovery/services/web",
        &format!(r#"{{"frontend":"{FE}"}}"#),
        &cluster,
    );
    put("/discovery/backends/web/a", &a.addr().to_string(), &cluster);
    let converge = |want: &[&str]| {
        wait_until(Duration::from_secs(30), || {
            let t = discovery_tests::tally(&cg.probe(PROBE, "tcp", FE, 20));
            (t.len() == want.len() && want.iter().all(|w| t.contains_key(*w))).then_some(())
        })
        .unwrap_or_else(|| panic!("did not converge to {want:?}:\n{}", agent.log()))
    };
    converge(&["a"]);
    let load = cg.start_load(PROBE, FE, 8_000);

    let leader = cluster.leader();
    cluster.members[leader].stop();
    put("/discovery/backends/web/b", &b.addr().to_string(), &cluster);
    converge(&["a", "b"]);

    cluster.members[leader].restart();
    let follower = (0..3).find(|&i| i != cluster.leader()).expect("a follower");
    cluster.members[follower].stop();
    put("/discovery/backends/web/c", &c.addr().to_string(), &cluster);
    cluster.ctl_retry(&["del", "/discovery/backends/web/a"]);
    converge(&["b", "c"]);
    // Whether the agent kept its watch (its member survived) or moved to
    // another member, every change arrived.
    check_load(&load.finish(), &["a", "b", "c"]);
}

#[test]
fn a_tree_larger_than_one_etcd_response_is_listed_in_pages() {
    use discovery_tests::{Agent, Etcd, TestCgroup, tally};
    let etcd = Etcd::start();
    // 2500 backends (weight 0) and 4.5 MiB of other keys under the prefix:
    // more keys than a page and more bytes than etcd-client's 4 MiB default.
    etcd.put(
        "/discovery/services/web",
        &format!(r#"{{"frontend":"{FE}"}}"#),
    );
    let fillers: Vec<(String, String)> = (0..2500)
        .map(|i| {
            (
                format!("/discovery/backends/web/f{i:04}"),
                format!(
                    r#"{{"addr":"127.{}.{}.{}:9","weight":0}}"#,
                    100 + i / 62500,
                    (i / 250) % 250,
                    i % 250 + 1
                ),
            )
        })
        .collect();
    etcd.put_many(&fillers);
    let blob = "x".repeat(100 * 1024);
    for i in 0..45 {
        etcd.put(&format!("/discovery/reserved/blob{i}"), &blob);
    }
    // Sorts after every filler: only a complete list finds it.
    let live = Backend::tcp("live", addr("127.0.0.2:0"));
    etcd.put("/discovery/backends/web/zz-live", &live.addr().to_string());

    let cg = TestCgroup::new("pages");
    let agent = Agent::start(
        &etcd.url,
        &cg,
        &["--max-services", "256", "--max-backends", "4096"],
    );
    let ok = wait_until(Duration::from_secs(20), || {
        let t = tally(&cg.probe(PROBE, "tcp", FE, 5));
        (t.len() == 1 && t.contains_key("live")).then_some(())
    });
    assert!(ok.is_some(), "agent log:\n{}", agent.log());
    assert!(!agent.log().contains("failed"), "{}", agent.log());
}
