//! Upgrades and resizes with no gap: a new agent whose map layout or sizes
//! differ from the pinned maps migrates them under load. The other layout
//! is the agent built with the `layout-test` feature (a field appended to
//! the per-service counters), as `cargo xtask test` builds it.
use std::{collections::HashMap, net::SocketAddr, time::Duration};

use discovery_tests::{Backend, Outcome, World, alt_agent_bin};

const PROBE: &str = env!("CARGO_BIN_EXE_discovery-probe");
const FE: &str = "127.0.0.1:8080";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A service with two live backends, converged.
fn world(tag: &str) -> (World, [Backend; 2]) {
    let w = World::start(PROBE, tag, &[]);
    let a = Backend::tcp("a", addr("127.0.0.2:0"));
    let b = Backend::tcp("b", addr("127.0.0.3:0"));
    w.service("web", FE, "tcp");
    w.backend("web", "a", &a.addr().to_string());
    w.backend("web", "b", &b.addr().to_string());
    w.converge("tcp", FE, 20, |t| t.len() == 2);
    (w, [a, b])
}

/// Every attempt reached a live backend.
fn check_load(outcomes: &[Outcome]) {
    assert!(outcomes.len() > 100, "only {} attempts", outcomes.len());
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.backend.is_none()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} connects failed, first: {:?}",
        failed.len(),
        outcomes.len(),
        failed.first()
    );
}

/// Map name → (id, value size, max entries), from bpftool.
fn maps(w: &World) -> HashMap<String, (u64, u64, u64)> {
    discovery_common::MAPS
        .iter()
        .filter(|m| m.kind != discovery_common::MapKind::SkStorage)
        .map(|m| {
            let out = std::process::Command::new("bpftool")
                .args(["-j", "map", "show", "pinned"])
                .arg(w.agent.pin_dir.join(m.name))
                .output()
                .expect("bpftool");
            let v: serde_json::Value =
                serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{out:?}"));
            let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k}: {v}"));
            (
                m.name.to_owned(),
                (n("id"), n("bytes_value"), n("max_entries")),
            )
        })
        .collect()
}

/// The service's redirected connects as the kernel counted them.
fn connects(w: &World) -> u64 {
    let v = w.agent.status();
    v["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "web"))
        .and_then(|s| s["connects"].as_u64())
        .unwrap_or_else(|| panic!("no connects for web: {v}"))
}

#[test]
fn an_upgrade_that_changes_the_layout_and_the_downgrade_back_lose_no_connect() {
    let (mut w, _backends) = world("migrate-layout");
    // UDP sockets opened before the upgrade: an unconnected one (replies
    // must keep coming from the frontend) and a connected one (getpeername
    // must keep saying the frontend).
    let u = Backend::udp("u", addr("127.0.0.4:0"));
    w.service("stats", "127.0.0.1:8125", "udp");
    w.backend("stats", "u", &u.addr().to_string());
    w.converge("udp", "127.0.0.1:8125", 3, |t| t.contains_key("u"));
    let mut udp: Vec<_> = ["unconnected", "connected"]
        .iter()
        .map(|how| w.start_probe(&["udp-keep", "127.0.0.1:8125", "20000", how]))
        .collect();
    let before = maps(&w);
    let mut load = w.start_load(FE, 6000);
    load.wait_attempts(200, Duration::from_secs(5));
    for c in &mut udp {
        c.wait_attempts(10, Duration::from_secs(5));
    }
    let counted = connects(&w);

    // Upgrade: the layout-test build's per-service counters are 8 bytes
    // longer.
    w.agent.stop();
    w.agent.set_binary(Some(alt_agent_bin()));
    w.agent.respawn();
    w.agent.wait_ready(Duration::from_secs(20));
    load.wait_attempts(200, Duration::from_secs(5));
    let up = maps(&w);
    let stats = discovery_common::names::SVC_STATS;
    assert_ne!(
        up[stats].0, before[stats].0,
        "the counters map was not rebuilt"
    );
    assert_eq!(up[stats].1, before[stats].1 + 8);
    // Maps of an unchanged layout are kept as they are.
    let services = discovery_common::names::SERVICES;
    assert_eq!(up[services], before[services]);
    // The kernel's counts came along.
    assert!(connects(&w) >= counted, "counters lost in the upgrade");
    assert!(w.agent.log().contains("map migrated"), "{}", w.agent.log());

    // Downgrade back.
    w.agent.stop();
    w.agent.set_binary(None);
    w.agent.respawn();
    w.agent.wait_ready(Duration::from_secs(20));
    load.wait_attempts(200, Duration::from_secs(5));
    let down = maps(&w);
    assert_eq!(down[stats].1, before[stats].1);
    assert!(connects(&w) >= counted);
    check_load(&load.finish());
    for c in &mut udp {
        c.wait_attempts(10, Duration::from_secs(5));
    }
    for c in udp {
        for o in c.stop() {
            assert_eq!(o.backend.as_deref(), Some("u"), "{o:?}");
            assert_eq!(o.peer.as_deref(), Some("127.0.0.1:8125"), "{o:?}");
        }
    }
    // Nothing of the migration is left behind.
    assert!(!w.agent.pin_dir.join("migrating").exists());
    assert!(!w.agent.pin_dir.join("migration-swapping").exists());
    assert!(!w.agent.pin_dir.join("migration-swapped").exists());
}

#[test]
fn raising_and_lowering_the_map_sizes_loses_no_connect() {
    let (mut w, _backends) = world("migrate-size");
    let before = maps(&w);
    let mut load = w.start_load(FE, 5000);
    load.wait_attempts(200, Duration::from_secs(5));
    for max in ["4096", "512"] {
        w.agent.stop();
        w.agent
            .respawn_adding(&["--max-services", max, "--max-backends", max]);
        w.agent.wait_ready(Duration::from_secs(20));
        load.wait_attempts(200, Duration::from_secs(5));
        let now = maps(&w);
        let backends = discovery_common::names::BACKENDS;
        let services = discovery_common::names::SERVICES;
        assert_eq!(now[services].2, max.parse::<u64>().unwrap(), "{now:?}");
        assert_eq!(now[backends].2, max.parse::<u64>().unwrap() + 1);
        assert_ne!(now[backends].0, before[backends].0);
    }
    check_load(&load.finish());
}

#[test]
fn a_map_too_small_for_what_it_holds_is_refused_and_nothing_changes() {
    let (mut w, _backends) = world("migrate-small");
    for i in 0..20 {
        w.service(&format!("s{i}"), &format!("127.0.0.1:{}", 9000 + i), "tcp");
    }
    w.agent
        .wait_status("21 services", Duration::from_secs(5), |v| {
            v["services"].as_array().is_some_and(|s| s.len() == 21)
        });
    let before = maps(&w);
    w.agent.stop();
    w.agent.respawn_adding(&["--max-services", "8"]);
    let status = w.agent.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| !s.success()),
        "the agent accepted a map too small"
    );
    let log = w.agent.log();
    assert!(log.contains("disc_services"), "{log}");
    assert_eq!(maps(&w), before, "the pinned maps changed");
    assert!(!w.agent.pin_dir.join("migrating").exists());
    // Still serving on the old maps.
    w.converge("tcp", FE, 20, |t| t.len() == 2);
}

#[test]
fn a_migration_killed_at_any_step_is_finished_by_the_next_start() {
    let (mut w, _backends) = world("migrate-crash");
    let mut load = w.start_load(FE, 12000);
    load.wait_attempts(200, Duration::from_secs(5));
    // Up to the other layout and back, stopped hard at each step once.
    for (bin, step) in [
        (Some(alt_agent_bin()), "before-swap"),
        (None, "mid-swap"),
        (Some(alt_agent_bin()), "after-swap"),
    ] {
        w.agent.stop();
        w.agent.set_binary(bin.clone());
        w.agent.set_env(&[("DISCOVERY_TEST_ABORT_MIGRATION", step)]);
        w.agent.respawn();
        let status = w.agent.wait_exit(Duration::from_secs(20));
        assert!(
            status.is_some_and(|s| !s.success()),
            "the agent did not stop at {step}:\n{}",
            w.agent.log()
        );
        // Traffic flows while no agent runs, half-way through.
        load.wait_attempts(100, Duration::from_secs(5));
        w.agent.set_env(&[]);
        w.agent.respawn();
        w.agent.wait_ready(Duration::from_secs(20));
        load.wait_attempts(100, Duration::from_secs(5));
        assert!(
            !w.agent.pin_dir.join("migration-swapping").exists(),
            "{step}"
        );
        assert!(
            !w.agent.pin_dir.join("migration-swapped").exists(),
            "{step}"
        );
        assert!(!w.agent.pin_dir.join("migrating").exists(), "{step}");
    }
    check_load(&load.finish());
}

#[test]
fn an_interrupted_upgrade_is_rolled_back_by_the_older_build_and_a_mismatch_is_refused() {
    let (mut w, _backends) = world("migrate-rollback");
    let before = maps(&w);
    let mut load = w.start_load(FE, 8000);
    load.wait_attempts(200, Duration::from_secs(5));
    let crash = |w: &mut World, extra: &[&str]| {
        w.agent.stop();
        w.agent.set_binary(Some(alt_agent_bin()));
        w.agent
            .set_env(&[("DISCOVERY_TEST_ABORT_MIGRATION", "mid-swap")]);
        w.agent.respawn_adding(extra);
        let status = w.agent.wait_exit(Duration::from_secs(20));
        assert!(status.is_some_and(|s| !s.success()), "{}", w.agent.log());
        w.agent.set_env(&[]);
    };
    // The upgrade dies half-way; the build that was running before comes
    // back and moves every program back onto the old maps.
    crash(&mut w, &[]);
    load.wait_attempts(100, Duration::from_secs(5));
    w.agent.set_binary(None);
    w.agent.respawn();
    w.agent.wait_ready(Duration::from_secs(20));
    let stats = discovery_common::names::SVC_STATS;
    assert_eq!(maps(&w)[stats], before[stats], "not rolled back");
    assert!(
        w.agent
            .log()
            .contains("rolled back an interrupted map migration")
    );
    // The upgrade dies again; this time the next start asks for other
    // sizes too: refused, naming both plans, and traffic keeps flowing.
    crash(&mut w, &[]);
    w.agent.respawn_adding(&["--max-backends", "2048"]);
    let status = w.agent.wait_exit(Duration::from_secs(20));
    assert!(status.is_some_and(|s| !s.success()));
    assert!(
        w.agent.log().contains("an interrupted migration"),
        "{}",
        w.agent.log()
    );
    load.wait_attempts(100, Duration::from_secs(5));
    check_load(&load.finish());
}
