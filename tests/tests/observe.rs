//! Seeing what the data plane does: `status` (also with the agent down),
//! the Prometheus endpoint, consumers published to etcd, logs and version.
use std::{process::Command, time::Duration};

use discovery_tests::{Backend, World, agent_bin, wait_until};

const PROBE: &str = env!("CARGO_BIN_EXE_discovery-probe");

fn addr(s: &str) -> std::net::SocketAddr {
    s.parse().unwrap()
}

/// The service row named `name` in `status --json`.
fn service<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["services"]
        .as_array()
        .expect("services")
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no service {name} in {status:#}"))
}

fn backend<'a>(svc: &'a serde_json::Value, addr: &str) -> &'a serde_json::Value {
    svc["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .find(|b| b["addr"] == addr)
        .unwrap_or_else(|| panic!("no backend {addr} in {svc:#}"))
}

#[test]
fn status_metrics_and_consumers_show_what_the_kernel_does() {
    let mut w = World::start(
        PROBE,
        "observe",
        &["--consumers-interval", "1s", "--node", "node-a"],
    );
    let a = Backend::tcp("a", addr("127.0.0.2:0"));
    let b = Backend::tcp("b", addr("127.0.0.3:0"));
    let (a_addr, b_addr) = (a.addr().to_string(), b.addr().to_string());
    w.etcd.put(
        "/discovery/services/web",
        r#"{"frontend":"127.0.0.1:8080","policy":"least_conn"}"#,
    );
    w.etcd.put(
        "/discovery/backends/web/a",
        &format!(r#"{{"addr":"{a_addr}","weight":2}}"#),
    );
    w.backend("web", "b", &b_addr);
    w.etcd
        .put("/discovery/maintenance/web/b", r#"{"reason":"test"}"#);
    let u = Backend::udp("u", addr("127.0.0.4:0"));
    w.service("dns", "127.0.0.1:5353", "udp");
    w.backend("dns", "u", &u.addr().to_string());
    w.converge("tcp", "127.0.0.1:8080", 5, |t| {
        t.len() == 1 && t.contains_key("a")
    });
    w.converge("udp", "127.0.0.1:5353", 2, |t| t.contains_key("u"));

    // The status file is written within a second of the apply.
    let before = wait_until(Duration::from_secs(10), || {
        let s = w.agent.status();
        let names_known = s["services"]
            .as_array()?
            .iter()
            .any(|x| x["name"] == "web" && x["backends"].to_string().contains("maintenance"));
        names_known.then_some(s)
    })
    .unwrap_or_else(|| panic!("status never showed the maintenance:\n{}", w.agent.log()));
    let n = 20;
    for o in w.probe("tcp", "127.0.0.1:8080", n) {
        assert_eq!(o.backend.as_deref(), Some("a"), "{o:?}");
    }
    for o in w.probe("udp", "127.0.0.1:5353", 5) {
        assert_eq!(o.backend.as_deref(), Some("u"), "{o:?}");
    }
    let after = w.agent.status();
    let agent = &after["agent"];
    assert_eq!(agent["node"], "node-a", "{after:#}");
    assert!(agent["revision"].as_i64() > Some(0), "{after:#}");
    let (web0, web) = (service(&before, "web"), service(&after, "web"));
    assert_eq!(web["policy"], "least_conn");
    assert_eq!(web["frontend"], "127.0.0.1:8080");
    let delta = |a: &serde_json::Value, b: &serde_json::Value, k: &str| {
        b[k].as_u64().unwrap() - a[k].as_u64().unwrap()
    };
    assert_eq!(delta(web0, web, "connects"), n as u64, "{web:#}");
    let (ba0, ba) = (backend(web0, &a_addr), backend(web, &a_addr));
    assert_eq!(delta(ba0, ba, "connects"), n as u64, "{ba:#}");
    assert_eq!(
        (&ba["weight"], &ba["state"], &ba["health"], &ba["routed"]),
        (&2.into(), &"active".into(), &"ok".into(), &true.into())
    );
    let bb = backend(web, &b_addr);
    assert_eq!(
        (&bb["state"], &bb["routed"]),
        (&"maintenance".into(), &false.into())
    );
    let dns = service(&after, "dns");
    assert_eq!(
        delta(service(&before, "dns"), dns, "datagrams"),
        5,
        "{dns:#}"
    );
    // The probes ran in the test cgroup: that workload uses web.
    let cgroup = format!("/{}", w.cg.path.file_name().unwrap().to_string_lossy());
    assert!(
        web["consumers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["cgroup"] == cgroup.as_str()),
        "{web:#}"
    );

    // Prometheus: the same numbers, with service names.
    let (_, text) = w.agent.scrape("/metrics");
    let sample = |s: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(s)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no sample {s} in:\n{text}"))
    };
    let connects =
        sample(r#"discovery_service_connects_total{service="web",frontend="127.0.0.1:8080/tcp"}"#);
    assert!(connects >= n as f64, "{connects}");
    assert_eq!(
        sample(&format!(
            r#"discovery_backend_connects_total{{backend="{a_addr}"}}"#
        )),
        ba["connects"].as_f64().unwrap()
    );
    assert_eq!(sample("discovery_etcd_connected"), 1.0);
    assert_eq!(sample(r#"discovery_map_entries{map="disc_services"}"#), 2.0);
    assert!(sample("discovery_reconcile_duration_seconds_count") >= 1.0);
    assert!(sample("discovery_last_reconcile_timestamp_seconds") > 1.7e9);
    assert_eq!(sample("discovery_etcd_watch_lag_revisions"), 0.0);
    assert!(
        text.contains("# TYPE discovery_kernel_events counter"),
        "{text}"
    );

    // Who talks to whom, across nodes: the summary lands in etcd.
    let key = "/discovery/consumers/web/node-a";
    let summary = wait_until(Duration::from_secs(10), || {
        let v: serde_json::Value = serde_json::from_str(&w.etcd.get(key)?).ok()?;
        v["workloads"]
            .as_array()?
            .iter()
            .any(|c| c["cgroup"] == cgroup.as_str())
            .then_some(v)
    })
    .unwrap_or_else(|| panic!("{key} never named {cgroup}:\n{}", w.agent.log()));
    assert_eq!(summary["node"], "node-a");
    // A malformed entry from elsewhere is skipped with a (JSON) log line.
    w.etcd
        .put("/discovery/consumers/web/broken-node", "not json");
    let out = Command::new(agent_bin())
        .args([
            "--log-format",
            "json",
            "status",
            "--consumers",
            "web",
            "--json",
        ])
        .args(["--etcd", &w.etcd.url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown.as_array().map(Vec::len), Some(1), "{shown:#}");
    assert_eq!(shown[0]["node"], "node-a");
    let warn: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .next()
            .expect("a log line"),
    )
    .expect("--log-format json logs JSON");
    assert_eq!(warn["level"], "WARN", "{warn}");
    assert_eq!(
        warn["key"], "/discovery/consumers/web/broken-node",
        "{warn}"
    );

    // With the agent gone, status still reads the maps and the last file.
    w.agent.kill();
    let down = w.agent.status();
    let web = service(&down, "web");
    assert!(web["connects"].as_u64() >= Some(n as u64), "{web:#}");
    let table = Command::new(agent_bin())
        .args(["status", "--pin-dir"])
        .arg(&w.agent.pin_dir)
        .arg("--status-file")
        .arg(&w.agent.status_file)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("SERVICE") && table.contains(&a_addr),
        "{table}"
    );
    assert!(table.contains("maintenance"), "{table}");
}

#[test]
fn version_names_the_build_and_its_programs() {
    let out = Command::new(agent_bin()).arg("--version").output().unwrap();
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let id = v
        .split("programs ")
        .nth(1)
        .and_then(|s| s.strip_suffix(")\n"))
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(id.len(), 16, "{v}");
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{v}");
}

#[test]
fn an_unknown_field_is_applied_around_and_reported_once_with_the_word_meant() {
    let w = World::start(PROBE, "hints", &[]);
    let a = Backend::tcp("a", addr("127.0.0.2:0"));
    // HAProxy's word for the policy, and a typo in the check.
    let key = "/discovery/services/web";
    let value = r#"{"frontend":"127.0.0.1:8080","balance":"consistent","check":{"type":"tcp","inter":"1s"}}"#;
    w.etcd.put(key, value);
    w.backend("web", "a", &a.addr().to_string());
    // The service still applies (random policy, as written without the
    // unknown field).
    w.converge("tcp", "127.0.0.1:8080", 3, |t| t.contains_key("a"));
    let v = w
        .agent
        .wait_status("ignored fields", Duration::from_secs(5), |v| {
            v["ignored_fields"].as_array().is_some_and(|l| l.len() == 2)
        });
    let fields: Vec<(String, String)> = v["ignored_fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            assert_eq!(f["key"], key);
            (
                f["field"].as_str().unwrap().to_owned(),
                f["did_you_mean"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        fields,
        [
            ("balance".to_owned(), "policy".to_owned()),
            ("check.inter".to_owned(), "interval".to_owned())
        ]
    );
    // Written again (the same value): not logged again.
    w.etcd.put(key, value);
    w.backend("web", "a2", &a.addr().to_string());
    w.agent.wait_status("a2", Duration::from_secs(5), |v| {
        discovery_tests::Agent::backend_health(v, "web", "a2").is_some()
    });
    let log = w.agent.log();
    assert_eq!(
        log.matches("balance (did you mean policy?)").count(),
        1,
        "{log}"
    );
    // `status` prints it too.
    let out = Command::new(agent_bin())
        .args(["status", "--pin-dir"])
        .arg(&w.agent.pin_dir)
        .arg("--status-file")
        .arg(&w.agent.status_file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("check.inter (did you mean interval?)"),
        "{text}"
    );
}

/// `discovery-agent doctor --json` with the agent's own flags: (exit ok,
/// check name → (verdict, detail)).
fn doctor(
    w: &World,
    extra: &[&str],
) -> (bool, std::collections::HashMap<String, (String, String)>) {
    doctor_at(w, &w.etcd.url, extra)
}

/// The same against the etcd at `etcd`.
fn doctor_at(
    w: &World,
    etcd: &str,
    extra: &[&str],
) -> (bool, std::collections::HashMap<String, (String, String)>) {
    let out = Command::new(agent_bin())
        .arg("doctor")
        .args(["--etcd", etcd, "--cgroup"])
        .arg(&w.cg.path)
        .arg("--pin-dir")
        .arg(&w.agent.pin_dir)
        .args(discovery_tests::SMALL_MAPS)
        .args(extra)
        .arg("--json")
        .output()
        .expect("run doctor");
    let checks: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor --json: {e}: {out:?}"));
    let map = checks
        .iter()
        .map(|c| {
            (
                c["check"].as_str().unwrap().to_owned(),
                (
                    c["verdict"].as_str().unwrap().to_owned(),
                    c["detail"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect();
    (out.status.success(), map)
}

#[test]
fn doctor_checks_the_node_the_pins_and_etcd_and_names_what_fails() {
    let w = World::start(PROBE, "doctor", &[]);
    w.service("web", "127.0.0.1:8080", "tcp");
    let (ok, checks) = doctor(&w, &[]);
    assert!(ok, "{checks:?}");
    for name in [
        "kernel",
        "cgroup v2",
        "bpffs",
        "BTF",
        "privileges",
        "map layout",
        "programs attached",
        "etcd",
        "services",
    ] {
        assert_eq!(checks[name].0, "ok", "{name}: {checks:?}");
    }
    assert!(
        checks["programs attached"]
            .1
            .contains(&w.cg.path.display().to_string())
    );
    // A service outside --allowed-frontends fails the check, by key.
    w.etcd
        .put("/discovery/services/far", r#"{"frontend":"10.1.2.3:80"}"#);
    let (ok, checks) = doctor(&w, &[]);
    assert!(!ok);
    assert_eq!(checks["services"].0, "fail");
    assert!(
        checks["services"].1.contains("/discovery/services/far"),
        "{checks:?}"
    );
    // A map size other than the pinned one is a warning: `run` migrates.
    let (_, checks) = doctor(&w, &["--max-backends", "4096"]);
    assert_eq!(checks["map layout"].0, "warn", "{checks:?}");
    // etcd that does not answer.
    let (ok, checks) = doctor_at(&w, "http://127.0.0.1:9", &[]);
    assert!(!ok);
    assert_eq!(checks["etcd"].0, "fail", "{checks:?}");
}

#[test]
fn the_fleet_map_draws_who_calls_what_from_etcd() {
    let w = World::start(
        PROBE,
        "map",
        &["--consumers-interval", "1s", "--node", "node-a"],
    );
    let a = Backend::tcp("a", addr("127.0.0.2:0"));
    w.service("web", "127.0.0.1:8080", "tcp");
    w.backend("web", "a", &a.addr().to_string());
    w.service("lonely", "127.0.0.1:8081", "tcp");
    w.converge("tcp", "127.0.0.1:8080", 5, |t| t.contains_key("a"));
    // A workload that still calls a service removed since.
    w.etcd.put(
        "/discovery/consumers/gone/node-b",
        r#"{"node":"node-b","updated_unix":1,"workloads":[{"cgroup":"/old.slice","calls":7}]}"#,
    );
    let published = wait_until(Duration::from_secs(10), || {
        w.etcd.get("/discovery/consumers/web/node-a")
    });
    assert!(published.is_some(), "no consumers summary");
    let map = |args: &[&str]| {
        let out = Command::new(agent_bin())
            .args(["map", "--etcd", &w.etcd.url])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let dot = map(&["--format", "dot"]);
    let cgroup = format!("/{}", w.cg.path.file_name().unwrap().to_string_lossy());
    assert!(
        dot.contains(&format!("\"w:node-a:{cgroup}\" -> \"s:web\"")),
        "{dot}"
    );
    assert!(
        dot.contains(&format!("\"s:web\" -> \"b:{}\"", a.addr())),
        "{dot}"
    );
    assert!(dot.contains("lonely 127.0.0.1:8081 (no backend)"), "{dot}");
    assert!(dot.contains("gone (removed)"), "{dot}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fleet.svg");
    map(&["--out", file.to_str().unwrap()]);
    let svg = std::fs::read_to_string(&file).unwrap();
    assert!(
        svg.contains("<svg") && svg.contains("gone (removed)"),
        "{svg}"
    );
    // Filtered to one node: what node-b calls.
    let only_b = map(&["--format", "dot", "--node", "node-b"]);
    assert!(
        only_b.contains("gone (removed)") && !only_b.contains("s:web"),
        "{only_b}"
    );
}
