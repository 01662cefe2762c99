//! etcd over TLS with client certificates and password authentication, and
//! root-only local state.
use std::{net::SocketAddr, os::unix::fs::PermissionsExt as _, time::Duration};

use discovery_tests::{Agent, Backend, Etcd, Proc, SMALL_MAPS, TestCgroup, tally, wait_until};

const PROBE: &str = env!("CARGO_BIN_EXE_discovery-probe");
const FE: &str = "127.0.0.1:8080";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn agent_and_announcer_work_against_etcd_with_tls_client_certs_and_auth() {
    let (etcd, sec) = Etcd::start_secure();
    let cg = TestCgroup::new("tls");
    let mut flags: Vec<String> = SMALL_MAPS.iter().map(|s| s.to_string()).collect();
    flags.extend(sec.agent_flags());
    let flags_ref: Vec<&str> = flags.iter().map(String::as_str).collect();
    let agent = Agent::start(&etcd.url, &cg, &flags_ref);
    // Local state is root-only.
    let mode = std::fs::metadata(&agent.pin_dir)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700, "pin dir mode {mode:o}");

    etcd.put(
        "/discovery/services/web",
        &format!(r#"{{"frontend":"{FE}"}}"#),
    );
    let b = Backend::tcp("a", addr("127.0.0.2:0"));
    // The announcer writes with a lease through the same secured etcd.
    let mut args = discovery_tests::announce_args(&etcd.url, "web", "a", b.addr());
    args.extend(sec.agent_flags());
    let ann = Proc::spawn(args);
    let ok = wait_until(Duration::from_secs(10), || {
        let t = tally(&cg.probe(PROBE, "tcp", FE, 5));
        (t.len() == 1 && t.contains_key("a")).then_some(())
    });
    assert!(
        ok.is_some(),
        "agent log:\n{}\nannouncer log:\n{}",
        agent.log(),
        ann.log()
    );
}

#[test]
fn wrong_credentials_are_reported_and_retried() {
    let (etcd, sec) = Etcd::start_secure();
    let cg = TestCgroup::new("badauth");
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("pw");
    std::fs::write(&wrong, "not-the-password").unwrap();
    let mut flags: Vec<String> = SMALL_MAPS.iter().map(|s| s.to_string()).collect();
    flags.extend(sec.agent_flags());
    let i = flags
        .iter()
        .position(|f| f == "--etcd-password-file")
        .unwrap();
    flags[i + 1] = wrong.display().to_string();
    let flags_ref: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut agent = Agent::spawn(&etcd.url, &cg, &flags_ref);
    let snap = agent.wait_status("the etcd error", Duration::from_secs(15), |v| {
        v["etcd"]["error"].is_string()
    });
    assert!(
        snap["etcd"]["error"]
            .as_str()
            .unwrap()
            .contains("authentication failed"),
        "{snap}"
    );
    assert_eq!(snap["ready"], false, "{snap}");
    assert!(agent.is_running());
    assert!(
        !snap.to_string().contains("not-the-password"),
        "password leaked into the status file"
    );
    assert!(
        !agent.log().contains("not-the-password"),
        "password leaked into the log"
    );
}

#[test]
fn tls_flags_are_checked_at_start() {
    let run = |args: &[&str]| {
        std::process::Command::new(discovery_tests::agent_bin())
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["service", "rm", "x", "--etcd", "https://127.0.0.1:1"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("need --etcd-ca-file"),
        "{out:?}"
    );
    let out = run(&[
        "service",
        "rm",
        "x",
        "--etcd-ca-file",
        "/nonexistent/ca.pem",
        "--etcd",
        "https://127.0.0.1:1",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/ca.pem"),
        "{out:?}"
    );
    let out = run(&["service", "rm", "x", "--etcd-user", "u"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--etcd-password-file"),
        "{out:?}"
    );
}
