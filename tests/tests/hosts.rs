//! Many hosts for real: network namespaces on one switch, one etcd member
//! and one agent per host (`discovery_tests::hosts`). A client on host A
//! connects back to back to the frontend; the service's backends live on
//! hosts B and C, registered by announcers there. Whatever happens to B or
//! C, no connect to a live backend may fail, and once a backend is known
//! dead no connect goes to it.
use std::{
    collections::{BTreeSet, HashMap},
    io::Write as _,
    net::{SocketAddr, TcpListener},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use discovery_tests::{
    Outcome,
    hosts::{Fleet, host_ip},
    now_ms, tally, wait_until,
};

const FE: &str = "127.0.0.1:8080";
const PORT: u16 = 9000;
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

/// The instances and addresses host `i`'s agent holds for `service`, from
/// its status file.
fn view(fleet: &Fleet, i: usize, service: &str) -> Option<BTreeSet<(String, String)>> {
    let snap = fleet.agent(i).snapshot()?;
    let svc = discovery_tests::Agent::service_status(&snap, service)?;
    Some(
        svc["backends"]
            .as_array()?
            .iter()
            .map(|b| {
                (
                    b["instance"].as_str().unwrap_or_default().to_owned(),
                    b["addr"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect(),
    )
}

fn instances(v: &BTreeSet<(String, String)>) -> BTreeSet<&str> {
    v.iter().map(|(i, _)| i.as_str()).collect()
}

/// Waits until every host's agent holds exactly `want` for `service`.
fn wait_views(fleet: &Fleet, hosts: &[usize], service: &str, want: &[&str], timeout: Duration) {
    let want: BTreeSet<&str> = want.iter().copied().collect();
    for &i in hosts {
        let ok = wait_until(timeout, || {
            let v = view(fleet, i, service)?;
            (instances(&v) == want).then_some(())
        });
        assert!(
            ok.is_some(),
            "{} never held {want:?} for {service}; it holds {:?}\n{}",
            fleet.host(i).name,
            view(fleet, i, service),
            fleet.agent(i).log()
        );
    }
}

/// Polls host `i` with batches of fresh connections until one batch is
/// answered by exactly `want`; returns when (ms since the epoch).
fn converge(fleet: &Fleet, i: usize, want: &[&str], timeout: Duration) -> u64 {
    let want: BTreeSet<&str> = want.iter().copied().collect();
    let mut last = HashMap::new();
    wait_until(timeout, || {
        last = tally(&fleet.probe(i, "tcp", FE, 20));
        (last.keys().map(String::as_str).collect::<BTreeSet<_>>() == want).then(now_ms)
    })
    .unwrap_or_else(|| {
        panic!(
            "{} never converged on {want:?}; last batch {last:?}",
            fleet.host(i).name
        )
    })
}

/// The service `web`, TCP, with a short connect timeout (a partitioned
/// backend fails fast instead of after the kernel's SYN retries).
fn put_web(fleet: &Fleet) {
    fleet.put(
        A,
        "/discovery/services/web",
        &format!(r#"{{"frontend":"{FE}","protocol":"both","connect_timeout":"300ms"}}"#),
    );
}

/// Attempts that got no answer: the connect failed, or the connection
/// closed before a backend said its name.
fn failures(outcomes: &[Outcome]) -> Vec<&Outcome> {
    outcomes
        .iter()
        .filter(|o| o.backend.as_deref().is_none_or(str::is_empty))
        .collect()
}

#[test]
fn a_backend_whose_check_fails_on_host_b_is_dropped_by_every_host_with_no_failed_connect() {
    let fleet = Fleet::new("hchk", 3);
    put_web(&fleet);
    let _b = fleet.backend(B, "b", PORT, "tcp");
    // b's health endpoint, apart from the service it serves: its check
    // fails while b itself still answers.
    let mut health = fleet.backend(B, "b-health", PORT + 1, "tcp");
    let _c = fleet.backend(C, "c", PORT, "tcp");
    let check = format!("{}:{}", host_ip(B), PORT + 1);
    let _ann_b = fleet.announcer(
        B,
        "web",
        "b",
        &format!("0.0.0.0:{PORT}"),
        &["--check-target", &check, "--ttl", "3s"],
    );
    let _ann_c = fleet.announcer(C, "web", "c", &format!("0.0.0.0:{PORT}"), &["--ttl", "3s"]);
    wait_views(
        &fleet,
        &[A, B, C],
        "web",
        &["b", "c"],
        Duration::from_secs(10),
    );
    // The announcers found their hosts' own addresses.
    let v = view(&fleet, A, "web").unwrap();
    let want: BTreeSet<(String, String)> = [
        ("b".to_owned(), format!("{}:{PORT}", host_ip(B))),
        ("c".to_owned(), format!("{}:{PORT}", host_ip(C))),
    ]
    .into();
    assert_eq!(v, want);
    converge(&fleet, A, &["b", "c"], Duration::from_secs(5));

    let mut load = fleet.load(A, FE, 60_000);
    load.wait_attempts(100, Duration::from_secs(10));
    let killed_at = now_ms();
    health.kill();
    wait_views(&fleet, &[A, B, C], "web", &["c"], Duration::from_secs(10));
    let known_dead = now_ms();
    // Every host's clients, too, get c alone.
    for i in [A, B, C] {
        converge(&fleet, i, &["c"], Duration::from_secs(2));
    }
    load.wait_attempts(100, Duration::from_secs(10));
    let outcomes = load.stop();

    assert!(outcomes.len() > 200, "only {} attempts", outcomes.len());
    let failed = failures(&outcomes);
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let late_b = outcomes
        .iter()
        .filter(|o| o.at_ms > known_dead && o.backend.as_deref() == Some("b"))
        .count();
    assert_eq!(late_b, 0, "connects to b after every host dropped it");
    let t = tally(&outcomes);
    eprintln!(
        "{} connects, 0 failed, {t:?}; every host dropped b {} ms after its check endpoint died",
        outcomes.len(),
        known_dead - killed_at
    );
}

#[test]
fn a_backend_killed_on_host_b_costs_at_most_the_passive_threshold_then_nothing() {
    let fleet = Fleet::new("hkill", 3);
    put_web(&fleet);
    let mut b = fleet.backend(B, "b", PORT, "tcp");
    let _c = fleet.backend(C, "c", PORT, "tcp");
    let _ann_b = fleet.announcer(B, "web", "b", &format!("0.0.0.0:{PORT}"), &["--ttl", "3s"]);
    let _ann_c = fleet.announcer(C, "web", "c", &format!("0.0.0.0:{PORT}"), &["--ttl", "3s"]);
    wait_views(
        &fleet,
        &[A, B, C],
        "web",
        &["b", "c"],
        Duration::from_secs(10),
    );
    converge(&fleet, A, &["b", "c"], Duration::from_secs(5));

    let mut load = fleet.load(A, FE, 60_000);
    load.wait_attempts(100, Duration::from_secs(10));
    b.kill();
    wait_views(&fleet, &[A, B, C], "web", &["c"], Duration::from_secs(10));
    let known_dead = now_ms();
    load.wait_attempts(100, Duration::from_secs(10));
    let outcomes = load.stop();

    let failed = failures(&outcomes);
    // Host B is up: a connect to the dead port is refused at once, and the
    // kernel ejects b on A at the threshold (3) in a row. Besides those,
    // the connection b's kernel had accepted when the process died closes
    // unanswered (or is reset).
    let (refused, lost): (Vec<&Outcome>, Vec<&Outcome>) = failed
        .iter()
        .partition(|o| o.errno == Some(libc::ECONNREFUSED));
    assert!(refused.len() <= 3, "{} refused: {refused:?}", refused.len());
    assert!(
        lost.len() <= 1
            && lost
                .iter()
                .all(|o| o.backend.as_deref() == Some("") || o.errno == Some(libc::ECONNRESET)),
        "{lost:?}"
    );
    let late = outcomes
        .iter()
        .filter(|o| o.at_ms > known_dead && o.backend.as_deref() != Some("c"))
        .count();
    assert_eq!(late, 0, "connects not to c after every host dropped b");
    eprintln!(
        "{} connects, {} refused and {} unanswered (b dead), {:?}",
        outcomes.len(),
        refused.len(),
        lost.len(),
        tally(&outcomes)
    );
}

#[test]
fn host_c_cut_off_expires_on_the_majority_keeps_its_last_state_and_resyncs_on_heal() {
    partition("hcut", A);
}

/// Fails: with the leader's host cut off, the majority has no leader for
/// a few seconds, and B's lease (3 s TTL) expires on the new leader too;
/// B's announcer registers again about 2 s later, and in between the
/// service has no backend on any host (connects refused at once). The
/// lease keeper gives a lease up at its first unanswered keepalive (1 s)
/// and waits for a new one, which is the likely cause.
#[test]
fn the_etcd_leaders_host_cut_off_expires_on_the_new_majority_and_resyncs_on_heal() {
    partition("hlead", C);
}

/// Host C cut off under load from A, with the etcd leader on host
/// `leader`, then healed.
fn partition(tag: &str, leader: usize) {
    let fleet = Fleet::new(tag, 3);
    fleet.move_leader(leader);
    put_web(&fleet);
    let _b = fleet.backend(B, "b", PORT, "tcp");
    let _c = fleet.backend(C, "c", PORT, "tcp");
    let _ann_b = fleet.announcer(B, "web", "b", &format!("0.0.0.0:{PORT}"), &["--ttl", "3s"]);
    let _ann_c = fleet.announcer(C, "web", "c", &format!("0.0.0.0:{PORT}"), &["--ttl", "3s"]);
    wait_views(
        &fleet,
        &[A, B, C],
        "web",
        &["b", "c"],
        Duration::from_secs(10),
    );
    converge(&fleet, A, &["b", "c"], Duration::from_secs(5));
    assert_eq!(
        fleet.agent(C).snapshot().unwrap()["etcd"]["connected"],
        true
    );

    let mut load = fleet.load(A, FE, 120_000);
    load.wait_attempts(100, Duration::from_secs(10));
    let cut_at = now_ms();
    fleet.cut(C);
    let cut_done = now_ms();
    // The majority expires C's lease and stops routing to c.
    wait_views(&fleet, &[A, B], "web", &["b"], Duration::from_secs(20));
    let expired = now_ms();
    converge(&fleet, A, &["b"], Duration::from_secs(2));
    // C notices it lost the quorum (require-leader watch) and says so.
    let snap = fleet
        .agent(C)
        .wait_status("etcd not connected", Duration::from_secs(30), |v| {
            v["etcd"]["connected"] == false
        });
    let lost = now_ms();
    eprintln!("C reports etcd lost: {}", snap["etcd"]);
    let metric = fleet
        .host(C)
        .within(|| fleet.agent(C).metric("discovery_etcd_connected"));
    assert_eq!(metric, Some(0.0), "C's metric");
    // C keeps serving its last state: both backends.
    let v = view(&fleet, C, "web").unwrap();
    assert_eq!(instances(&v), ["b", "c"].into(), "C's last state");
    load.wait_attempts(50, Duration::from_secs(10));

    fleet.heal(C);
    fleet
        .agent(C)
        .wait_status("etcd connected again", Duration::from_secs(30), |v| {
            v["etcd"]["connected"] == true
        });
    // C's announcer registers c again; every host agrees.
    wait_views(
        &fleet,
        &[A, B, C],
        "web",
        &["b", "c"],
        Duration::from_secs(20),
    );
    let views: Vec<_> = [A, B, C].map(|i| view(&fleet, i, "web").unwrap()).into();
    assert!(views.windows(2).all(|w| w[0] == w[1]), "{views:?}");
    converge(&fleet, A, &["b", "c"], Duration::from_secs(5));
    let outcomes = load.stop();

    // b was live and reachable throughout: every failure is to c during
    // the cut, before A dropped c: connects that timed out (the service's
    // 300 ms) or found no route, and the kernel's passive ejection stops
    // those at the threshold (3); besides, the one connection established
    // to c as the cut came, whose answer never arrived (the probe's read
    // timeout, EAGAIN).
    let failed = failures(&outcomes);
    eprintln!(
        "{} connects, {} failed, {:?}; etcd leader was {}; lease expired on the majority {} ms \
         after the cut, C saw etcd lost after {} ms",
        outcomes.len(),
        failed.len(),
        tally(&outcomes),
        fleet.host(leader).name,
        expired - cut_at,
        lost - cut_at,
    );
    let refused: Vec<u64> = failed
        .iter()
        .filter(|o| o.errno == Some(libc::ECONNREFUSED))
        .map(|o| o.at_ms - cut_at)
        .collect();
    assert!(
        refused.is_empty(),
        "{} connects refused at once (no backend) from {:?} to {:?} ms after the cut",
        refused.len(),
        refused.first(),
        refused.last()
    );
    let (connects, reads): (Vec<&Outcome>, Vec<&Outcome>) = failed
        .iter()
        .partition(|o| matches!(o.errno, Some(libc::ETIMEDOUT | libc::EHOSTUNREACH)));
    assert!(
        connects.len() <= 3,
        "{} failed: {:?}",
        connects.len(),
        &connects[..connects.len().min(5)]
    );
    assert!(
        reads.len() <= 1 && reads.iter().all(|o| o.errno == Some(libc::EAGAIN)),
        "{reads:?}"
    );
    assert!(
        failed
            .iter()
            .all(|o| o.at_ms >= cut_at && o.at_ms <= expired),
        "a failure outside the cut: {failed:?}"
    );
    let c_during_cut = outcomes
        .iter()
        .filter(|o| o.at_ms > cut_done && o.at_ms < lost && o.backend.as_deref() == Some("c"))
        .count();
    assert_eq!(c_during_cut, 0, "c answered across the cut");
}

#[test]
fn cross_host_clients_see_the_frontend_and_backends_see_the_client_host() {
    let fleet = Fleet::new("hpeer", 2);
    put_web(&fleet);
    let _b = fleet.backend(B, "b", PORT, "both");
    let _ann = fleet.announcer(
        B,
        "web",
        "b",
        &format!("0.0.0.0:{PORT}"),
        &["--check", "none"],
    );
    wait_views(&fleet, &[A, B], "web", &["b"], Duration::from_secs(10));
    for mode in ["tcp", "udp", "udp-connected"] {
        let out = fleet.probe(A, mode, FE, 5);
        for o in &out {
            assert_eq!(o.backend.as_deref(), Some("b"), "{mode}: {o:?}");
            assert_eq!(o.peer.as_deref(), Some(FE), "{mode}: {o:?}");
        }
    }

    // A TCP backend on B that records its peers.
    let listener: TcpListener = fleet
        .host(B)
        .within(|| TcpListener::bind((host_ip(B), PORT + 1)).expect("bind on B"));
    let rec_addr = listener.local_addr().expect("recorder address");
    let peers = Arc::new(Mutex::new(Vec::<SocketAddr>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (p, st) = (peers.clone(), stop.clone());
    let recorder = std::thread::spawn(move || {
        for mut c in listener.incoming().flatten() {
            if st.load(Ordering::Relaxed) {
                break;
            }
            let peer = c.peer_addr().expect("peer");
            p.lock().unwrap().push(peer);
            let _ = c.write_all(b"recorder\n");
        }
    });
    fleet.put(
        A,
        "/discovery/services/src",
        r#"{"frontend":"127.0.0.1:8081","protocol":"tcp"}"#,
    );
    fleet.put(
        A,
        "/discovery/backends/src/r",
        &format!("{}:{}", host_ip(B), PORT + 1),
    );
    wait_views(&fleet, &[A], "src", &["r"], Duration::from_secs(10));
    let out = fleet.probe(A, "tcp", "127.0.0.1:8081", 3);
    for o in &out {
        assert_eq!(o.backend.as_deref(), Some("recorder"), "{o:?}");
        assert_eq!(o.peer.as_deref(), Some("127.0.0.1:8081"), "{o:?}");
    }
    let seen = peers.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(
        seen.iter()
            .all(|p| p.ip() == std::net::IpAddr::V4(host_ip(A))),
        "the backend saw {seen:?}"
    );
    // Wake the recorder's accept from inside B, and let it end.
    stop.store(true, Ordering::Relaxed);
    fleet
        .host(B)
        .within(|| std::net::TcpStream::connect(rec_addr).expect("wake the recorder"));
    recorder.join().expect("recorder");
}

#[test]
fn every_agent_restarted_one_host_at_a_time_under_load_loses_no_connect() {
    let mut fleet = Fleet::new("hroll", 3);
    put_web(&fleet);
    let _b = fleet.backend(B, "b", PORT, "tcp");
    let _c = fleet.backend(C, "c", PORT, "tcp");
    let _ann_b = fleet.announcer(B, "web", "b", &format!("0.0.0.0:{PORT}"), &["--ttl", "3s"]);
    let _ann_c = fleet.announcer(C, "web", "c", &format!("0.0.0.0:{PORT}"), &["--ttl", "3s"]);
    wait_views(
        &fleet,
        &[A, B, C],
        "web",
        &["b", "c"],
        Duration::from_secs(10),
    );
    converge(&fleet, A, &["b", "c"], Duration::from_secs(5));

    let mut load = fleet.load(A, FE, 120_000);
    load.wait_attempts(100, Duration::from_secs(10));
    for i in [A, B, C] {
        fleet.restart_agent(i);
        let ready = fleet.agent(i).wait_ready(Duration::from_secs(30));
        let programs = ready["programs"].as_object().expect("programs");
        assert!(programs.values().all(|h| h == "adopted"), "{ready}");
        load.wait_attempts(100, Duration::from_secs(10));
    }
    wait_views(
        &fleet,
        &[A, B, C],
        "web",
        &["b", "c"],
        Duration::from_secs(10),
    );
    let outcomes = load.stop();
    let failed = failures(&outcomes);
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let t = tally(&outcomes);
    assert!(t.contains_key("b") && t.contains_key("c"), "{t:?}");
    eprintln!(
        "rolling restart: {} connects, 0 failed, {t:?}",
        outcomes.len()
    );
}

#[test]
fn a_new_host_joins_and_serves_from_its_first_sync() {
    let mut fleet = Fleet::new("hjoin", 3);
    put_web(&fleet);
    let _b = fleet.backend(B, "b", PORT, "tcp");
    let _c = fleet.backend(C, "c", PORT, "tcp");
    let _ann_b = fleet.announcer(B, "web", "b", &format!("0.0.0.0:{PORT}"), &["--ttl", "3s"]);
    let _ann_c = fleet.announcer(C, "web", "c", &format!("0.0.0.0:{PORT}"), &["--ttl", "3s"]);
    wait_views(
        &fleet,
        &[A, B, C],
        "web",
        &["b", "c"],
        Duration::from_secs(10),
    );
    // The fleet keeps serving while a fourth host (a new etcd member and
    // agent) joins.
    let mut load = fleet.load(A, FE, 60_000);
    load.wait_attempts(100, Duration::from_secs(10));
    let d = fleet.join("hjoin");
    // From its first sync (ready: a full list applied), its clients reach
    // both backends, with no failed connect and no warm-up.
    let first = fleet.probe(d, "tcp", FE, 40);
    assert!(failures(&first).is_empty(), "{first:?}");
    let t = tally(&first);
    assert!(t.contains_key("b") && t.contains_key("c"), "{t:?}");
    assert_eq!(
        fleet
            .ctl(d, &["member", "list"])
            .stdout
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count(),
        4
    );
    load.wait_attempts(100, Duration::from_secs(10));
    let outcomes = load.stop();
    assert!(
        failures(&outcomes).is_empty(),
        "the fleet lost connects while a host joined"
    );
}
