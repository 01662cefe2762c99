//! AF_INET6 clients: dual-stack sockets to v4-mapped frontends, IPv6
//! frontends and backends, one service on 127.0.0.1 and ::1, and what the
//! kernel cannot do (failing at once, and said in the status file).
use std::{collections::HashMap, net::SocketAddr, time::Duration};

use discovery_tests::{Agent, Backend, Outcome, World, tally};

const PROBE: &str = env!("CARGO_BIN_EXE_discovery-probe");
const ECONNREFUSED: i32 = 111;
const EAFNOSUPPORT: i32 = 97;

fn world(tag: &str) -> World {
    World::start(PROBE, tag, &[])
}

/// Without passive ejection: every connect goes to the registered backend.
fn world_without_ejection(tag: &str) -> World {
    World::start(PROBE, tag, &["--passive-failures", "0"])
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A TCP and a UDP backend answering `name` on the same address.
fn both(name: &str, ip: &str) -> (Backend, Backend) {
    let t = Backend::tcp(name, addr(&format!("{ip}:0")));
    let u = Backend::udp(name, t.addr());
    (t, u)
}

fn all(what: &str, n: usize) -> HashMap<String, usize> {
    HashMap::from([(what.to_owned(), n)])
}

/// Every outcome answered by `backend` and reported `peer` (getpeername,
/// or the reply's source for unconnected UDP).
fn assert_all(outcomes: &[Outcome], backend: &str, peer: &str) {
    for o in outcomes {
        assert_eq!(o.backend.as_deref(), Some(backend), "{outcomes:?}");
        assert_eq!(o.peer.as_deref(), Some(peer), "{outcomes:?}");
    }
}

#[test]
fn af_inet6_sockets_to_a_v4_mapped_frontend_are_redirected_and_see_the_frontend() {
    let w = world("mapped");
    let (a, _ua) = both("a", "127.0.0.2");
    w.service("web", "127.0.0.1:8080", "both");
    w.backend("web", "a", &a.addr().to_string());
    w.converge("tcp", "127.0.0.1:8080", 3, |t| t == &all("a", 3));
    let before = w.agent.counters();
    let fe = "[::ffff:127.0.0.1]:8080";
    assert_all(&w.probe("tcp", fe, 10), "a", fe);
    assert_all(&w.probe("udp-connected", fe, 10), "a", fe);
    // Unconnected: sendmsg4 rewrites (the kernel takes a v4-mapped
    // destination down the IPv4 path), recvmsg6 restores the source.
    assert_all(&w.probe("udp", fe, 10), "a", fe);
    let after = w.agent.counters();
    assert_eq!(
        after["connect_redirected"] - before["connect_redirected"],
        20
    );
    assert_eq!(
        after["sendmsg_redirected"] - before["sendmsg_redirected"],
        10
    );
    assert!(after["recvmsg_revnat"] - before["recvmsg_revnat"] >= 10);
    assert!(after["peer_revnat"] - before["peer_revnat"] >= 20);
}

#[test]
fn a_failed_af_inet6_connect_counts_against_its_backend() {
    let w = world_without_ejection("mappedfail");
    // Nothing listens there any more: connects are refused.
    let gone = Backend::tcp("gone", addr("127.0.0.2:0")).addr();
    w.service("web", "127.0.0.1:8080", "tcp");
    w.backend("web", "gone", &gone.to_string());
    w.agent
        .wait_status("web's backend", Duration::from_secs(5), |v| {
            Agent::service_status(v, "web")
                .is_some_and(|s| s["backends"].as_array().is_some_and(|b| b.len() == 1))
        });
    let before = w.agent.counters()["connect_failed"];
    let t = tally(&w.probe("tcp", "[::ffff:127.0.0.1]:8080", 5));
    assert_eq!(t, all(&format!("errno {ECONNREFUSED}"), 5));
    // sock_ops saw the AF_INET6 socket's peer as the v4-mapped backend.
    assert_eq!(w.agent.counters()["connect_failed"] - before, 5);
    let st = w.agent.status();
    let b = &st["services"][0]["backends"][0];
    assert_eq!(b["addr"], gone.to_string(), "{st}");
    assert_eq!(b["failures"], 5, "{st}");
}

#[test]
fn ipv6_frontends_route_to_ipv6_backends() {
    let w = world("six");
    let (a, _ua) = both("a6", "[::1]");
    w.service("web", "[::1]:8080", "both");
    w.backend("web", "a", &format!(r#"{{"addr":"{}"}}"#, a.addr()));
    w.converge("tcp", "[::1]:8080", 3, |t| t == &all("a6", 3));
    assert_all(&w.probe("tcp", "[::1]:8080", 10), "a6", "[::1]:8080");
    assert_all(&w.probe("udp", "[::1]:8080", 10), "a6", "[::1]:8080");
    assert_all(
        &w.probe("udp-connected", "[::1]:8080", 10),
        "a6",
        "[::1]:8080",
    );
    let st = w.agent.status();
    assert_eq!(st["services"][0]["frontend"], "[::1]:8080", "{st}");
    assert_eq!(
        st["services"][0]["backends"][0]["addr"],
        a.addr().to_string(),
        "{st}"
    );
}

#[test]
fn one_service_on_both_loopbacks_and_what_ipv6_udp_cannot_do() {
    let w = world("bothlo");
    let (a, _ua) = both("a", "127.0.0.2");
    w.etcd.put(
        "/discovery/services/web",
        r#"{"frontend":["127.0.0.1:8080","[::1]:8080"],"protocol":"both"}"#,
    );
    w.backend("web", "a", &a.addr().to_string());
    w.converge("tcp", "127.0.0.1:8080", 3, |t| t == &all("a", 3));
    w.converge("tcp", "[::1]:8080", 3, |t| t == &all("a", 3));
    assert_all(&w.probe("tcp", "[::1]:8080", 5), "a", "[::1]:8080");
    assert_all(
        &w.probe("udp-connected", "[::1]:8080", 5),
        "a",
        "[::1]:8080",
    );
    // The kernel does not rewrite an IPv6 datagram to a v4-mapped address:
    // the call fails at once, and the status file says why.
    let t = tally(&w.probe("udp", "[::1]:8080", 3));
    assert_eq!(t, all(&format!("errno {EAFNOSUPPORT}"), 3));
    let snap = w
        .agent
        .wait_status("the UDP note", Duration::from_secs(5), |v| {
            v["family"]
                .as_array()
                .is_some_and(|l| l.iter().any(|n| n["frontend"] == "[::1]:8080/udp"))
        });
    assert!(snap.to_string().contains("EAFNOSUPPORT"), "{snap}");
    // IPv4 UDP is unaffected.
    assert_all(&w.probe("udp", "127.0.0.1:8080", 5), "a", "127.0.0.1:8080");
}

#[test]
fn an_ipv4_frontend_leaves_ipv6_backends_out_and_says_so() {
    let w = world("v4fe6be");
    let (a6, _u6) = both("a6", "[::1]");
    w.service("web", "127.0.0.1:8080", "tcp");
    w.backend("web", "a6", &a6.addr().to_string());
    let snap = w
        .agent
        .wait_status("the family note", Duration::from_secs(5), |v| {
            v["family"]
                .as_array()
                .is_some_and(|l| l.iter().any(|n| n["frontend"] == "127.0.0.1:8080/tcp"))
        });
    assert!(snap.to_string().contains("IPv6 backends"), "{snap}");
    // No backend an AF_INET socket can reach: refused at once, for both
    // families of client.
    for fe in ["127.0.0.1:8080", "[::ffff:127.0.0.1]:8080"] {
        let t = tally(&w.probe("tcp", fe, 3));
        assert_eq!(t, all(&format!("errno {ECONNREFUSED}"), 3), "{fe}");
    }
}
