//! AF_INET6 clients: dual-stack sockets to v4-mapped frontends, IPv6
//! frontends and backends, one service on 127.0.0.1 and ::1, and what the
//! kernel cannot do (failing at once, and said in the status file).
use std::{collections::HashMap, net::SocketAddr, time::Duration};

use discovery_tests::{Agent, Backend, Outcome, World, clients, tally, wait_until};

const PROBE: &str = env!("CARGO_BIN_EXE_discovery-probe");
const ECONNREFUSED: i32 = 111;
const EAFNOSUPPORT: i32 = 97;
const ENETUNREACH: i32 = 101;

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

// ---------------------------------------------------------- real clients

#[test]
fn a_jvm_client_reaches_an_ipv4_frontend_over_tcp_and_udp() {
    let w = world("jvm");
    let (a, _ua) = both("a", "127.0.0.2");
    w.service("web", "127.0.0.1:8080", "both");
    w.backend("web", "a", &a.addr().to_string());
    w.converge("tcp", "127.0.0.1:8080", 3, |t| t == &all("a", 3));
    // The JVM's default sockets are AF_INET6: connect6 and, for datagrams
    // to a v4-mapped destination, sendmsg4 then recvmsg6.
    let tcp = clients::java(&w.cg, "tcp", "127.0.0.1", 8080, 5);
    assert_eq!(tally(&tcp), all("a", 5), "{tcp:?}");
    let udp = clients::java(&w.cg, "udp", "127.0.0.1", 8080, 5);
    // The reply's real source, as the JVM saw it: the frontend.
    assert_all(&udp, "a", "127.0.0.1:8080");
    let connected = clients::java(&w.cg, "udp-connected", "127.0.0.1", 8080, 5);
    assert_eq!(tally(&connected), all("a", 5), "{connected:?}");
}

#[test]
fn python_af_inet6_sockets_to_v4_mapped_and_ipv6_frontends() {
    let w = world("python6");
    let (a, _ua) = both("a", "127.0.0.2");
    let (a6, _ua6) = both("a6", "[::1]");
    w.service("web", "127.0.0.1:8080", "both");
    w.backend("web", "a", &a.addr().to_string());
    w.service("web6", "[::1]:8081", "both");
    w.backend("web6", "a6", &a6.addr().to_string());
    w.converge("tcp", "127.0.0.1:8080", 3, |t| t == &all("a", 3));
    w.converge("tcp", "[::1]:8081", 3, |t| t == &all("a6", 3));
    let mapped = "[::ffff:127.0.0.1]:8080";
    for mode in ["tcp", "udp", "udp-connected"] {
        let o = clients::python6(&w.cg, mode, "::ffff:127.0.0.1", 8080, 5, false);
        assert_all(&o, "a", mapped);
        let o = clients::python6(&w.cg, mode, "::1", 8081, 5, false);
        assert_all(&o, "a6", "[::1]:8081");
    }
    // IPV6_V6ONLY: the kernel refuses a v4-mapped destination on such a
    // socket (ENETUNREACH) before any program runs; nothing to redirect.
    let o = clients::python6(&w.cg, "tcp", "::ffff:127.0.0.1", 8080, 2, true);
    assert_eq!(tally(&o), all(&format!("errno {ENETUNREACH}"), 2), "{o:?}");
    // Nor can such a socket reach an IPv4 backend of an IPv6 frontend.
    w.service("web64", "[::1]:8082", "tcp");
    w.backend("web64", "a", &a.addr().to_string());
    w.converge("tcp", "[::1]:8082", 3, |t| t == &all("a", 3));
    let o = clients::python6(&w.cg, "tcp", "::1", 8082, 2, true);
    assert_eq!(tally(&o), all(&format!("errno {ENETUNREACH}"), 2), "{o:?}");
}

#[test]
fn curl_to_localhost_reaches_a_service_on_ipv6_loopback() {
    let w = world("curl");
    let http = clients::HttpBackend::start("web-1", addr("127.0.0.2:0"));
    // Only [::1]: curl tries 127.0.0.1:8080 first, is refused, and falls
    // back to [::1]:8080, the frontend.
    w.service("web", "[::1]:8080", "tcp");
    w.backend("web", "a", &http.addr().to_string());
    w.converge("tcp", "[::1]:8080", 3, |t| t.get("errno 111").is_none());
    let r = clients::curl(&w.cg, "http://localhost:8080/");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("web-1"), "{r:?}");
    assert_eq!(r.remote_ip, "::1", "curl dialled the frontend: {r:?}");
    // On both loopbacks: whichever address curl tries, it is served.
    w.etcd.put(
        "/discovery/services/web",
        r#"{"frontend":["127.0.0.1:8080","[::1]:8080"]}"#,
    );
    w.converge("tcp", "127.0.0.1:8080", 3, |t| t.get("errno 111").is_none());
    for args in [&["-4"][..], &["-6"][..], &[][..]] {
        let r = clients::curl_with(&w.cg, args, "http://localhost:8080/");
        assert_eq!(r.status, 200, "curl {args:?}: {r:?}");
        assert!(r.body.contains("web-1"), "{r:?}");
    }
}

#[test]
fn dig_at_ipv6_loopback_is_answered_by_a_real_dns_server() {
    let w = world("dig");
    let dns6 = clients::Dnsmasq::start(
        addr("[::1]:0"),
        &[("svc.test", "10.1.2.3".parse().unwrap())],
    );
    let dns4 = clients::Dnsmasq::start(
        addr("127.0.0.2:0"),
        &[("svc.test", "10.9.9.9".parse().unwrap())],
    );
    w.service("dns6", "[::1]:5353", "udp");
    w.backend("dns6", "a", &dns6.addr().to_string());
    // An IPv6 frontend with an IPv4 server: dig's socket is IPV6_V6ONLY
    // (bind9's tools set it), and such a socket cannot reach a v4-mapped
    // backend: the kernel fails it at once, as README's table says.
    w.service("dns4", "[::1]:5354", "udp");
    w.backend("dns4", "a", &dns4.addr().to_string());
    w.agent
        .wait_status("dns4's backend", Duration::from_secs(5), |v| {
            Agent::service_status(v, "dns4")
                .is_some_and(|s| s["backends"].as_array().is_some_and(|b| b.len() == 1))
        });
    let d = clients::dig(&w.cg, "::1", 5354, "svc.test");
    assert!(d.output.contains("network unreachable"), "{d:?}");
    assert!(d.answers.is_empty(), "{d:?}");
    let d = wait_until(Duration::from_secs(5), || {
        let d = clients::dig(&w.cg, "::1", 5353, "svc.test");
        (d.answers == ["10.1.2.3"]).then_some(d)
    })
    .unwrap_or_else(|| {
        panic!(
            "no answer via [::1]:5353: {:?}",
            clients::dig(&w.cg, "::1", 5353, "svc.test")
        )
    });
    // dig accepted the reply because it came from where it asked.
    assert_eq!(d.from.as_deref(), Some("[::1]:5353"), "{d:?}");
    assert_eq!(d.status.as_deref(), Some("NOERROR"), "{d:?}");
    // The IPv4 server through an IPv4 frontend: what such clients need.
    w.service("dns4", "127.0.0.1:5354", "udp");
    let d = wait_until(Duration::from_secs(5), || {
        let d = clients::dig(&w.cg, "127.0.0.1", 5354, "svc.test");
        (d.answers == ["10.9.9.9"]).then_some(d)
    })
    .unwrap_or_else(|| panic!("no answer via 127.0.0.1:5354"));
    assert_eq!(d.from.as_deref(), Some("127.0.0.1:5354"), "{d:?}");
}

#[test]
fn active_checks_work_over_ipv6() {
    let w = World::start(PROBE, "check6", &["--passive-failures", "0"]);
    let a = Backend::tcp("a6", addr("[::1]:0"));
    let b = Backend::tcp("b6", addr("[::1]:0"));
    let at = a.addr();
    w.etcd.put(
        "/discovery/services/web",
        r#"{"frontend":"[::1]:8080","check":{"type":"tcp","interval":"100ms","timeout":"80ms","rise":2,"fall":2}}"#,
    );
    w.backend("web", "a", &at.to_string());
    w.backend("web", "b", &b.addr().to_string());
    w.converge("tcp", "[::1]:8080", 20, |t| t.len() == 2);
    drop(a);
    let health = |v: &serde_json::Value| Agent::backend_health(v, "web", "a");
    w.agent
        .wait_status("a6 failing its check", Duration::from_secs(5), |v| {
            health(v).is_some_and(|h| h == "check failing")
        });
    w.converge("tcp", "[::1]:8080", 20, |t| t == &all("b6", 20));
    let _a = Backend::tcp("a6", at);
    w.agent.wait_status("a6 back", Duration::from_secs(5), |v| {
        health(v).is_some_and(|h| h == "ok")
    });
}

#[test]
fn an_announcer_registers_an_ipv6_instance_while_its_check_passes() {
    let w = world("announce6");
    let b = Backend::tcp("a6", addr("[::1]:0"));
    let at = b.addr();
    w.service("web", "[::1]:8080", "tcp");
    let _ann =
        discovery_tests::Proc::spawn(discovery_tests::announce_args(&w.etcd.url, "web", "a6", at));
    let key = "/discovery/backends/web/a6";
    let v = wait_until(Duration::from_secs(5), || w.etcd.get(key))
        .unwrap_or_else(|| panic!("{key} never appeared"));
    let v: serde_json::Value = serde_json::from_str(&v).unwrap();
    assert_eq!(v["addr"], at.to_string());
    w.converge("tcp", "[::1]:8080", 3, |t| t == &all("a6", 3));
    // Its tcp check over IPv6 fails once the instance is gone.
    drop(b);
    let gone = wait_until(Duration::from_secs(5), || {
        w.etcd.get(key).is_none().then_some(())
    });
    assert!(gone.is_some(), "{key} still registered");
}

#[test]
fn policies_socket_options_and_passive_ejection_hold_for_ipv6() {
    let w = World::start(
        PROBE,
        "policy6",
        &["--passive-failures", "3", "--passive-ejection", "30s"],
    );
    let a = Backend::tcp_holding("a6", addr("[::1]:0"));
    let b = Backend::tcp("b6", addr("[::1]:0"));
    // consistent: this workload (one cgroup) sticks to one backend.
    w.etcd.put(
        "/discovery/services/sticky",
        r#"{"frontend":"[::1]:8081","policy":"consistent"}"#,
    );
    w.backend("sticky", "a", &b.addr().to_string());
    w.backend(
        "sticky",
        "c",
        &Backend::tcp("c6", addr("[::1]:0")).addr().to_string(),
    );
    w.converge("tcp", "[::1]:8081", 20, |t| t.len() == 1);
    // sock_ops sets the service's TCP options on AF_INET6 sockets too.
    w.etcd.put(
        "/discovery/services/held",
        r#"{"frontend":"[::1]:8080","keepalive":{"idle":"7s","interval":"3s","probes":4},"user_timeout":"20s"}"#,
    );
    w.backend("held", "a", &a.addr().to_string());
    let (_idle, opts) = wait_until(Duration::from_secs(10), || {
        let mut p = w.start_probe(&["idle", "[::1]:8080"]);
        let line = p.next_line(Duration::from_secs(5))?;
        let o: serde_json::Value = serde_json::from_str(&line).unwrap();
        Some((p, o))
    })
    .expect("an idle connection to [::1]:8080");
    assert_eq!(opts["backend"], "a6", "{opts}");
    let got = ["keepalive", "idle", "interval", "probes", "user_timeout"].map(|k| opts[k].as_i64());
    assert_eq!(
        got,
        [Some(1), Some(7), Some(3), Some(4), Some(20_000)],
        "{opts}"
    );
    // Passive ejection of an IPv6 backend that refuses connections.
    let gone = Backend::tcp("gone", addr("[::1]:0")).addr();
    w.service("web", "[::1]:8082", "tcp");
    w.backend("web", "gone", &gone.to_string());
    w.backend("web", "b", &b.addr().to_string());
    w.converge("tcp", "[::1]:8082", 20, |t| t == &all("b6", 20));
    let st = w
        .agent
        .wait_status("gone ejected", Duration::from_secs(5), |v| {
            Agent::backend_health(v, "web", "gone").as_deref() == Some("ejected")
        });
    assert!(st.to_string().contains(&gone.to_string()), "{st}");
}

#[test]
fn http_checks_reach_ipv6_backends() {
    let w = World::start(PROBE, "http6", &["--passive-failures", "0"]);
    let h = clients::HttpBackend::start("h6", addr("[::1]:0"));
    let at = h.addr();
    let b = Backend::tcp("b6", addr("[::1]:0"));
    w.etcd.put(
        "/discovery/services/web",
        r#"{"frontend":"[::1]:8080","check":{"type":"http","path":"/health","interval":"100ms","timeout":"80ms","rise":1,"fall":1}}"#,
    );
    w.backend("web", "h", &at.to_string());
    w.backend("web", "b", &b.addr().to_string());
    let health = |v: &serde_json::Value, who: &str| Agent::backend_health(v, "web", who);
    // The HTTP server passes GET http://[::1]:P/health; the plain TCP one
    // fails it.
    w.agent
        .wait_status("h ok and b failing", Duration::from_secs(5), |v| {
            health(v, "h").as_deref() == Some("ok")
                && health(v, "b").as_deref() == Some("check failing")
        });
    assert!(
        h.seen().iter().any(|c| c.is_ipv6()),
        "the check came over IPv6"
    );
    drop(h);
    w.agent
        .wait_status("h failing once gone", Duration::from_secs(5), |v| {
            health(v, "h").as_deref() == Some("check failing")
        });
}

#[test]
fn least_conn_counts_live_af_inet6_connections() {
    let w = world("leastconn6");
    let fast = Backend::tcp("fast", addr("[::1]:0"));
    let slow = Backend::tcp_holding("slow", addr("[::1]:0"));
    w.etcd.put(
        "/discovery/services/web",
        r#"{"frontend":"[::1]:8080","policy":"least_conn"}"#,
    );
    w.backend("web", "fast", &fast.addr().to_string());
    w.backend("web", "slow", &slow.addr().to_string());
    w.agent
        .wait_status("both backends", Duration::from_secs(5), |v| {
            Agent::service_status(v, "web")
                .is_some_and(|s| s["backends"].as_array().is_some_and(|b| b.len() == 2))
        });
    // The client keeps the slow backend's connections open; sock_ops
    // counts them live by the AF_INET6 peer, and new connects avoid it.
    let slow_share = w.held_share("[::1]:8080", 200, "slow");
    // Random would give 50%; two choices about 25% (see redirect.rs).
    assert!(slow_share < 0.38, "slow share {slow_share}");
}

#[test]
fn connect_timeout_applies_to_af_inet6_sockets() {
    const ETIMEDOUT: i32 = 110;
    let w = world("ctimeout6");
    // Nothing answers: SYNs to this address are dropped silently.
    let dead = {
        let l = std::net::TcpListener::bind("[::1]:0").unwrap();
        l.local_addr().unwrap()
    };
    let _drop = discovery_tests::PacketDrop::syns(dead);
    w.etcd.put(
        "/discovery/services/web",
        r#"{"frontend":"[::1]:8080","connect_timeout":"1500ms"}"#,
    );
    w.backend("web", "dead", &dead.to_string());
    let o = wait_until(Duration::from_secs(15), || {
        let o = w.probe("tcp", "[::1]:8080", 1).remove(0);
        (o.errno == Some(ETIMEDOUT)).then_some(o)
    })
    .unwrap_or_else(|| panic!("connect never timed out early:\n{}", w.agent.log()));
    assert!(
        (1_400_000..2_500_000).contains(&o.micros),
        "timed out after {} ms, configured 1500 ms",
        o.micros / 1000
    );
}

#[test]
fn an_ipv6_frontend_is_counted_in_status_metrics_and_consumers() {
    let w = World::start(
        PROBE,
        "observe6",
        &["--consumers-interval", "1s", "--node", "node-6"],
    );
    let a = Backend::tcp("a6", addr("[::1]:0"));
    w.service("web", "[::1]:8080", "tcp");
    w.backend("web", "a", &a.addr().to_string());
    w.converge("tcp", "[::1]:8080", 3, |t| t == &all("a6", 3));
    assert_eq!(tally(&w.probe("tcp", "[::1]:8080", 10)), all("a6", 10));
    let st = w.agent.status();
    let web = &st["services"][0];
    assert_eq!(web["frontend"], "[::1]:8080", "{st}");
    assert!(web["connects"].as_u64() >= Some(13), "{st}");
    let cgroup = format!("/{}", w.cg.path.file_name().unwrap().to_string_lossy());
    assert!(
        web["consumers"]
            .as_array()
            .is_some_and(|l| l.iter().any(|c| c["cgroup"] == cgroup.as_str())),
        "{st}"
    );
    // Names reach the metrics with the next status tick (at most 1 s).
    let connects = wait_until(Duration::from_secs(5), || {
        w.agent
            .metric(r#"discovery_service_connects_total{service="web",frontend="[::1]:8080/tcp"}"#)
            .filter(|n| *n >= 13.0)
    });
    assert!(connects >= Some(13.0), "{connects:?}");
    let backend = w.agent.metric(&format!(
        r#"discovery_backend_connects_total{{backend="{}"}}"#,
        a.addr()
    ));
    assert!(backend >= Some(13.0), "{backend:?}");
    // Published to etcd by service name, like IPv4 ones.
    let key = "/discovery/consumers/web/node-6";
    let published = wait_until(Duration::from_secs(10), || {
        let v: serde_json::Value = serde_json::from_str(&w.etcd.get(key)?).ok()?;
        v["workloads"]
            .as_array()?
            .iter()
            .any(|c| c["cgroup"] == cgroup.as_str())
            .then_some(())
    });
    assert!(published.is_some(), "{key} never named {cgroup}");
}

#[test]
fn an_announcer_given_the_unspecified_address_registers_this_hosts_own() {
    // This test's namespace stands in for a host: 198.18.0.5 and
    // 2001:db8::5 on its network, default routes through it, and etcd on
    // loopback (a local member, as the classic deployment runs).
    discovery_tests::net::add_host_address("198.18.0.5/15");
    discovery_tests::net::add_host_address("2001:db8::5/64");
    let w = world("own-addr");
    let b4 = Backend::tcp("own4", addr("198.18.0.5:0"));
    let _b6 = Backend::tcp("own6", addr(&format!("[2001:db8::5]:{}", b4.addr().port())));
    w.service("web4", "127.0.0.1:8080", "tcp");
    w.service("web6", "[::1]:8080", "tcp");
    let port = b4.addr().port();
    let _a4 = discovery_tests::Proc::spawn(discovery_tests::announce_args(
        &w.etcd.url,
        "web4",
        "own4",
        addr(&format!("0.0.0.0:{port}")),
    ));
    let _a6 = discovery_tests::Proc::spawn(discovery_tests::announce_args(
        &w.etcd.url,
        "web6",
        "own6",
        addr(&format!("[::]:{port}")),
    ));
    for (key, want) in [
        (
            "/discovery/backends/web4/own4",
            format!("198.18.0.5:{port}"),
        ),
        (
            "/discovery/backends/web6/own6",
            format!("[2001:db8::5]:{port}"),
        ),
    ] {
        // The value appears only once the check toward the detected
        // address passes.
        let v = wait_until(Duration::from_secs(5), || w.etcd.get(key))
            .unwrap_or_else(|| panic!("{key} never appeared"));
        let v: serde_json::Value = serde_json::from_str(&v).unwrap();
        assert_eq!(v["addr"], want, "{key}");
    }
    w.converge("tcp", "127.0.0.1:8080", 3, |t| t == &all("own4", 3));
    w.converge("tcp", "[::1]:8080", 3, |t| t == &all("own6", 3));
}

#[test]
fn an_announcer_without_a_route_names_what_it_could_not_find() {
    let w = world("no-route");
    let out = std::process::Command::new(discovery_tests::agent_bin())
        .args(discovery_tests::announce_args(
            &w.etcd.url,
            "web",
            "x",
            addr("[::]:8080"),
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("cannot find this host's IPv6 address") && err.contains("default IPv6 route"),
        "{err}"
    );
}
