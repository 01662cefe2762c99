//! The real clients themselves, with no redirection: each test runs them in
//! a test cgroup with no programs attached, against servers in its own
//! network namespace, so a failure in the redirect tests that use them is
//! about redirection, not about the client.
use std::net::{IpAddr, SocketAddr};

use discovery_tests::{
    Backend, Outcome, TestCgroup,
    clients::{self, Dnsmasq, HttpBackend},
};

const ECONNREFUSED: i32 = 111;
const ENETUNREACH: i32 = 101;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip address")
}

/// Every attempt answered by `name`, with `peer`.
fn all_from(outcomes: &[Outcome], n: usize, name: &str, peer: &str) {
    assert_eq!(outcomes.len(), n, "{outcomes:?}");
    for o in outcomes {
        assert_eq!(o.backend.as_deref(), Some(name), "{o:?}");
        assert_eq!(o.peer.as_deref(), Some(peer), "{o:?}");
        assert_eq!((o.errno, &o.error), (None, &None), "{o:?}");
    }
}

fn all_failed(outcomes: &[Outcome], n: usize, errno: i32) {
    assert_eq!(outcomes.len(), n, "{outcomes:?}");
    for o in outcomes {
        assert_eq!((o.backend.as_ref(), o.errno), (None, Some(errno)), "{o:?}");
        assert!(o.error.is_some(), "{o:?}");
    }
}

#[test]
fn java_reaches_backends() {
    let cg = TestCgroup::new("clients");
    let t4 = Backend::tcp("t4", addr("127.0.0.2:0"));
    let u4 = Backend::udp("u4", addr("127.0.0.2:0"));
    let t6 = Backend::tcp("t6", addr("[::1]:0"));
    let u6 = Backend::udp("u6", addr("[::1]:0"));
    let (p4, q4, p6, q6) = (
        t4.addr().port(),
        u4.addr().port(),
        t6.addr().port(),
        u6.addr().port(),
    );
    let peer4 = |p: u16| format!("127.0.0.2:{p}");
    all_from(
        &clients::java(&cg, "tcp", "127.0.0.2", p4, 3),
        3,
        "t4",
        &peer4(p4),
    );
    all_from(
        &clients::java(&cg, "udp", "127.0.0.2", q4, 3),
        3,
        "u4",
        &peer4(q4),
    );
    all_from(
        &clients::java(&cg, "udp-connected", "127.0.0.2", q4, 3),
        3,
        "u4",
        &peer4(q4),
    );
    // The JVM takes a v4-mapped literal as the IPv4 address (its sockets
    // send ::ffff:127.0.0.2 to the kernel), and reports it as such.
    for mode in ["tcp", "udp", "udp-connected"] {
        let port = if mode == "tcp" { p4 } else { q4 };
        let name = if mode == "tcp" { "t4" } else { "u4" };
        let o = clients::java(&cg, mode, "::ffff:127.0.0.2", port, 1);
        all_from(&o, 1, name, &peer4(port));
    }
    all_from(
        &clients::java(&cg, "tcp", "::1", p6, 2),
        2,
        "t6",
        &format!("[::1]:{p6}"),
    );
    all_from(
        &clients::java(&cg, "udp", "::1", q6, 2),
        2,
        "u6",
        &format!("[::1]:{q6}"),
    );
    all_from(
        &clients::java(&cg, "udp-connected", "::1", q6, 2),
        2,
        "u6",
        &format!("[::1]:{q6}"),
    );
    // Nothing on 127.0.0.3: refused (TCP RST, UDP ICMP port unreachable).
    all_failed(
        &clients::java(&cg, "tcp", "127.0.0.3", p4, 1),
        1,
        ECONNREFUSED,
    );
    all_failed(
        &clients::java(&cg, "udp-connected", "127.0.0.3", q4, 1),
        1,
        ECONNREFUSED,
    );
}

#[test]
fn python_ipv6_sockets_reach_backends() {
    let cg = TestCgroup::new("clients");
    let t4 = Backend::tcp("t4", addr("127.0.0.2:0"));
    let u4 = Backend::udp("u4", addr("127.0.0.2:0"));
    let t6 = Backend::tcp("t6", addr("[::1]:0"));
    let u6 = Backend::udp("u6", addr("[::1]:0"));
    let (p4, q4, p6, q6) = (
        t4.addr().port(),
        u4.addr().port(),
        t6.addr().port(),
        u6.addr().port(),
    );
    let mapped = "::ffff:127.0.0.2";
    for (mode, port, name) in [
        ("tcp", p4, "t4"),
        ("udp", q4, "u4"),
        ("udp-connected", q4, "u4"),
    ] {
        let o = clients::python6(&cg, mode, mapped, port, 3, false);
        all_from(&o, 3, name, &format!("[{mapped}]:{port}"));
        // A v6-only socket cannot reach an IPv4 address at all.
        let o = clients::python6(&cg, mode, mapped, port, 1, true);
        all_failed(&o, 1, ENETUNREACH);
    }
    for (mode, port, name) in [
        ("tcp", p6, "t6"),
        ("udp", q6, "u6"),
        ("udp-connected", q6, "u6"),
    ] {
        for v6only in [false, true] {
            let o = clients::python6(&cg, mode, "::1", port, 2, v6only);
            all_from(&o, 2, name, &format!("[::1]:{port}"));
        }
    }
    all_failed(
        &clients::python6(&cg, "tcp", "::ffff:127.0.0.3", p4, 1, false),
        1,
        ECONNREFUSED,
    );
}

#[test]
fn curl_reaches_http_backends() {
    let cg = TestCgroup::new("clients");
    let h4 = HttpBackend::start("h4", addr("127.0.0.2:0"));
    let h6 = HttpBackend::start("h6", addr("[::1]:0"));
    let r = clients::curl(&cg, &format!("http://{}/", h4.addr()));
    assert_eq!(
        (r.status, r.body.as_str(), r.exit),
        (200, "h4\n", Some(0)),
        "{r:?}"
    );
    assert_eq!(r.remote_ip, "127.0.0.2", "{r:?}");
    let r = clients::curl(&cg, &format!("http://{}/x", h6.addr()));
    assert_eq!(
        (r.status, r.body.as_str(), r.exit),
        (200, "h6\n", Some(0)),
        "{r:?}"
    );
    assert_eq!(r.remote_ip, "::1", "{r:?}");
    assert_eq!(h4.seen().len(), 1);
    assert!(h6.seen()[0].ip().is_loopback(), "{:?}", h6.seen());

    // curl resolves `localhost` itself to 127.0.0.1 and ::1 (this
    // machine's /etc/hosts may have only 127.0.0.1) and falls back from
    // one to the other.
    let only6 = HttpBackend::start("only6", addr("[::1]:0"));
    let r = clients::curl(&cg, &format!("http://localhost:{}/", only6.addr().port()));
    assert_eq!((r.status, r.body.as_str()), (200, "only6\n"), "{r:?}");
    assert_eq!(r.remote_ip, "::1", "{r:?}");
    let lo4 = HttpBackend::start("lo4", addr("127.0.0.1:0"));
    let port = lo4.addr().port();
    let lo6 = HttpBackend::start("lo6", SocketAddr::new(ip("::1"), port));
    let r = clients::curl(&cg, &format!("http://localhost:{port}/"));
    assert_eq!(r.status, 200, "{r:?}");
    // curl 7.88 (Debian 12) tries 127.0.0.1 first; others may not.
    eprintln!("curl localhost with both families listening: {r:?}");
    assert!(
        (r.body == "lo4\n" && r.remote_ip == "127.0.0.1")
            || (r.body == "lo6\n" && r.remote_ip == "::1"),
        "{r:?}"
    );
    let r = clients::curl_with(&cg, &["-6"], &format!("http://localhost:{port}/"));
    assert_eq!(
        (r.body.as_str(), r.remote_ip.as_str()),
        ("lo6\n", "::1"),
        "{r:?}"
    );
    drop(lo6);

    // Nothing listening: no status, curl's exit code 7.
    let r = clients::curl(&cg, "http://127.0.0.3:9/");
    assert_eq!((r.status, r.exit), (0, Some(7)), "{r:?}");
    assert!(r.stderr.contains("Failed to connect"), "{r:?}");
}

#[test]
fn dig_asks_dnsmasq() {
    let cg = TestCgroup::new("clients");
    let records = [("web.test", ip("10.1.2.3")), ("web.test", ip("fd00::1"))];
    let d4 = Dnsmasq::start(addr("127.0.0.2:0"), &records);
    let d6 = Dnsmasq::start(addr("[::1]:0"), &records);
    let p4 = d4.addr().port();
    let p6 = d6.addr().port();

    let d = clients::dig(&cg, "127.0.0.2", p4, "web.test");
    assert_eq!(d.status.as_deref(), Some("NOERROR"), "{}", d.output);
    assert_eq!(d.answers, ["10.1.2.3"], "{}", d.output);
    assert_eq!(d.from, Some(format!("127.0.0.2:{p4}")), "{}", d.output);
    assert_eq!((d.exit, d.errors.len()), (Some(0), 0), "{}", d.output);
    let d = clients::dig_type(&cg, "127.0.0.2", p4, "web.test", "AAAA");
    assert_eq!(d.answers, ["fd00::1"], "{}", d.output);

    let d = clients::dig(&cg, "::1", p6, "web.test");
    assert_eq!(d.status.as_deref(), Some("NOERROR"), "{}", d.output);
    assert_eq!(d.answers, ["10.1.2.3"], "{}", d.output);
    assert_eq!(d.from, Some(format!("[::1]:{p6}")), "{}", d.output);

    // Unknown names: no upstream, so no answer.
    let d = clients::dig(&cg, "127.0.0.2", p4, "other.test");
    assert!(d.status.is_some() && d.answers.is_empty(), "{}", d.output);

    // dnsmasq logged each query with the source it saw.
    let s4 = d4.query_sources();
    assert!(
        s4.len() >= 3 && s4.iter().all(|s| s == "127.0.0.1"),
        "{s4:?}"
    );
    assert!(
        d6.query_sources().iter().all(|s| s == "::1"),
        "{}",
        d6.log()
    );

    // dig will not use a v4-mapped server address at all.
    let d = clients::dig(&cg, "::ffff:127.0.0.2", p4, "web.test");
    assert_eq!(
        (d.status.as_ref(), d.answers.len()),
        (None, 0),
        "{}",
        d.output
    );
    assert!(
        d.errors
            .iter()
            .any(|e| e.contains("Skipping mapped address")),
        "{}",
        d.output
    );
    // Nothing on the port: refused, exit 9.
    let d = clients::dig(&cg, "127.0.0.3", p4, "web.test");
    assert_eq!((d.status.as_ref(), d.exit), (None, Some(9)), "{}", d.output);
    assert!(
        d.errors.iter().any(|e| e.contains("connection refused")),
        "{}",
        d.output
    );
}
