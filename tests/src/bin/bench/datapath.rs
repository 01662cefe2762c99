//! One redis-server (TCP) and UDP sinks, reached four ways, in interleaved
//! rounds (A B C D A B C D ...): A direct, B through discovery (frontend on
//! loopback, redirected at connect), C nftables DNAT in the output hook,
//! D HAProxy in TCP mode. Each path has its own backend address, so their
//! TIME_WAIT sockets never share a port space.
use std::{
    net::{SocketAddr, UdpSocket},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use discovery_tests::{Agent, Etcd, TestCgroup, unique, wait_until};

use super::{Bins, KernelMaps, Owned, Plan, free_tcp_port, free_udp_port, tcp_key, wait_tcp};
use crate::report::{Micro, PathSample, Results};

pub const PATHS: [&str; 4] = ["direct", "discovery", "nft DNAT", "HAProxy"];

/// A redis-benchmark target: (index in [`PATHS`], host, port).
type Target = (usize, String, u16);

/// (name, redis-benchmark flags). connect-heavy stays far below local port
/// exhaustion: 8000 connections per run, and a pause after each.
const WORKLOADS: [(&str, &[&str]); 3] = [
    ("keep-alive (-c 50)", &["-c", "50", "-n", "200000"]),
    (
        "pipelined (-P 16)",
        &["-c", "50", "-n", "1000000", "-P", "16"],
    ),
    (
        "connect-heavy (-k 0)",
        &["-c", "50", "-n", "8000", "-k", "0"],
    ),
];

/// An nftables table of ours, deleted on drop.
struct NftTable(String);

impl NftTable {
    fn new(name: &str, body: &str) -> anyhow::Result<Self> {
        let script = format!("table ip {name} {{\n{body}\n}}\n");
        let mut c = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .context("nft")?;
        use std::io::Write as _;
        c.stdin
            .take()
            .context("stdin")?
            .write_all(script.as_bytes())?;
        if !c.wait()?.success() {
            bail!("nft rejected:\n{script}");
        }
        Ok(Self(name.to_owned()))
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "ip", &self.0])
            .status();
    }
}

/// Counts datagrams arriving at one address.
struct Sink {
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Sink {
    fn new(addr: SocketAddr) -> anyhow::Result<Self> {
        let s = UdpSocket::bind(addr).with_context(|| format!("bind {addr}"))?;
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
        let (count, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (c, st) = (count.clone(), stop.clone());
        let thread = thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !st.load(Ordering::Relaxed) {
                if s.recv(&mut buf).is_ok() {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Ok(Self {
            count,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn redis_rps(out: &std::process::Output) -> anyhow::Result<f64> {
    let text = String::from_utf8_lossy(&out.stdout);
    // --csv: a header line, then "GET","<rps>",...
    text.lines()
        .find(|l| l.starts_with("\"GET\""))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|v| v.trim_matches('"').parse().ok())
        .with_context(|| {
            format!(
                "redis-benchmark output: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

pub fn run(bins: &Bins, plan: &Plan, results: &mut Results) -> anyhow::Result<()> {
    eprintln!("bench: data path");
    let etcd = Etcd::start();
    let cg = TestCgroup::new("bench-data");
    let agent = Agent::start(
        &etcd.url,
        &cg,
        &["--metrics-addr", "off", "--consumers-interval", "0s"],
    );
    let maps = KernelMaps::open(&agent.pin_dir)?;

    // One redis on four addresses: one per path.
    let port = free_tcp_port("127.0.0.2");
    let _redis = Owned(
        Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.2 127.0.0.3 127.0.0.4 127.0.0.5"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(["--logfile", "/dev/null"])
            .spawn()
            .context("starting redis-server")?,
    );
    for ip in ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"] {
        wait_tcp(format!("{ip}:{port}").parse()?, "redis-server")?;
    }
    // IPv6 has one loopback address: the direct and the discovery paths
    // get a redis-server each, on ports of their own.
    let port6 = [free_tcp_port("::1"), free_tcp_port("::1")];
    let _redis6 = port6
        .iter()
        .map(|p| {
            let child = Command::new("redis-server")
                .args(["--port", &p.to_string(), "--bind", "::1"])
                .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                .args(["--logfile", "/dev/null"])
                .spawn()
                .context("starting redis-server on ::1")?;
            wait_tcp(format!("[::1]:{p}").parse()?, "redis-server on ::1")?;
            Ok(Owned(child))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let udp_port = free_udp_port("127.0.0.2");
    let udp6_port = [free_udp_port("::1"), free_udp_port("::1")];
    let sinks = [
        Sink::new(format!("127.0.0.2:{udp_port}").parse()?)?,
        Sink::new(format!("127.0.0.3:{udp_port}").parse()?)?,
        Sink::new(format!("127.0.0.4:{udp_port}").parse()?)?,
    ];
    let sinks6 = [
        Sink::new(format!("[::1]:{}", udp6_port[0]).parse()?)?,
        Sink::new(format!("[::1]:{}", udp6_port[1]).parse()?)?,
    ];

    // B: discovery.
    let fe_tcp: SocketAddr = format!("127.0.0.1:{}", free_tcp_port("127.0.0.1")).parse()?;
    let fe_udp: SocketAddr = format!("127.0.0.1:{}", free_udp_port("127.0.0.1")).parse()?;
    etcd.put(
        "/discovery/services/bench-redis",
        &format!(r#"{{"frontend":"{fe_tcp}"}}"#),
    );
    etcd.put(
        "/discovery/backends/bench-redis/r",
        &format!("127.0.0.3:{port}"),
    );
    etcd.put(
        "/discovery/services/bench-udp",
        &format!(r#"{{"frontend":"{fe_udp}","protocol":"udp"}}"#),
    );
    etcd.put(
        "/discovery/backends/bench-udp/u",
        &format!("127.0.0.3:{udp_port}"),
    );
    // IPv6: frontends on ::1 with backends on ::1.
    let fe6_tcp: SocketAddr = format!("[::1]:{}", free_tcp_port("::1")).parse()?;
    let fe6_udp: SocketAddr = format!("[::1]:{}", free_udp_port("::1")).parse()?;
    etcd.put(
        "/discovery/services/bench-redis6",
        &format!(r#"{{"frontend":"{fe6_tcp}"}}"#),
    );
    etcd.put(
        "/discovery/backends/bench-redis6/r",
        &format!("[::1]:{}", port6[1]),
    );
    etcd.put(
        "/discovery/services/bench-udp6",
        &format!(r#"{{"frontend":"{fe6_udp}","protocol":"udp"}}"#),
    );
    etcd.put(
        "/discovery/backends/bench-udp6/u",
        &format!("[::1]:{}", udp6_port[1]),
    );
    let udp = |fe: SocketAddr| {
        let mut k = tcp_key(fe);
        k.proto = discovery_common::IPPROTO_UDP;
        k
    };
    let (udp_key, udp6_key) = (udp(fe_udp), udp(fe6_udp));
    wait_until(Duration::from_secs(10), || {
        let ok = |k| maps.service(&k).is_some_and(|s| s.count > 0);
        (ok(tcp_key(fe_tcp)) && ok(tcp_key(fe6_tcp)) && ok(udp_key) && ok(udp6_key)).then_some(())
    })
    .context("the agent did not install the bench services")?;

    // C: DNAT in the output hook.
    let dnat_tcp = free_tcp_port("127.0.0.1");
    let dnat_udp = free_udp_port("127.0.0.1");
    let table = unique("bench_dnat").replace('-', "_");
    let _nft = NftTable::new(
        &table,
        &format!(
            " chain out {{\n  type nat hook output priority -100; policy accept;\n  \
             ip daddr 127.0.0.1 tcp dport {dnat_tcp} dnat to 127.0.0.4:{port}\n  \
             ip daddr 127.0.0.1 udp dport {dnat_udp} dnat to 127.0.0.4:{udp_port}\n }}"
        ),
    )?;

    // D: HAProxy, TCP mode, one thread per core.
    let hp = free_tcp_port("127.0.0.6");
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 5000\n  nbthread 2\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
             timeout client 60s\n  timeout server 60s\nfrontend f\n  bind 127.0.0.6:{hp}\n  \
             default_backend b\nbackend b\n  server r 127.0.0.5:{port}\n"
        ),
    )?;
    let _haproxy = Owned(
        Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&cfg)
            .spawn()
            .context("starting haproxy")?,
    );
    wait_tcp(format!("127.0.0.6:{hp}").parse()?, "haproxy")?;

    let targets = [
        format!("127.0.0.2:{port}"),
        fe_tcp.to_string(),
        format!("127.0.0.1:{dnat_tcp}"),
        format!("127.0.0.6:{hp}"),
    ];
    // The discovery client runs in the cgroup with the programs; the
    // others in a sibling cgroup without them, so every client is
    // scheduled the same way (a client beside the bench in its cgroup
    // would compete differently with redis-server for the two cores).
    let plain = TestCgroup::new("bench-plain");
    let run_client = |path: usize, cmd: &mut Command| {
        if path == 1 {
            cg.output(cmd)
        } else {
            plain.output(cmd)
        }
    };
    // AF_INET6 sockets, against direct of the same family: dual stack to
    // the IPv4 frontend (v4-mapped), and IPv6 end to end. Paths without a
    // target here (DNAT, HAProxy) are AF_INET only.
    let mapped = |a: &str| format!("::ffff:{a}");
    let tcp_families: [(&str, Vec<Target>); 3] = [
        (
            "",
            targets
                .iter()
                .enumerate()
                .map(|(p, t)| {
                    let a: SocketAddr = t.parse().expect("ip:port");
                    (p, a.ip().to_string(), a.port())
                })
                .collect(),
        ),
        (
            "AF_INET6 v4-mapped: ",
            vec![
                (0, mapped("127.0.0.2"), port),
                (1, mapped("127.0.0.1"), fe_tcp.port()),
            ],
        ),
        (
            "IPv6: ",
            vec![
                (0, "::1".into(), port6[0]),
                (1, "::1".into(), fe6_tcp.port()),
            ],
        ),
    ];
    for round in 0..plan.rounds {
        for (family, family_targets) in &tcp_families {
            for (w, (_, flags)) in WORKLOADS.iter().enumerate() {
                for (p, host, port) in family_targets {
                    let p = *p;
                    let mut cmd = Command::new("redis-benchmark");
                    cmd.args(["-h", host, "-p", &port.to_string(), "-t", "get", "--csv"])
                        .args(*flags);
                    let out = run_client(p, &mut cmd);
                    let rps = redis_rps(&out)?;
                    let workload = format!("{family}{}", WORKLOADS[w].0);
                    eprintln!(
                        "bench: round {} {workload} {}: {rps:.0} req/s",
                        round + 1,
                        PATHS[p]
                    );
                    results.tcp.push(PathSample {
                        workload,
                        path: PATHS[p].to_owned(),
                        value: rps,
                    });
                    if flags.contains(&"-k") {
                        // Let TIME_WAIT drain a little between connect-heavy runs.
                        thread::sleep(Duration::from_secs(1));
                    }
                }
            }
        }
        // UDP: A, B, C (HAProxy has no UDP).
        let udp_targets = [
            format!("127.0.0.2:{udp_port}"),
            fe_udp.to_string(),
            format!("127.0.0.1:{dnat_udp}"),
        ];
        // (family, path, target, sink): AF_INET; AF_INET6 to the v4-mapped
        // frontend (the kernel runs the IPv4 hooks for it); IPv6.
        let mut udp_cases: Vec<(&str, usize, String, &Sink)> = udp_targets
            .iter()
            .enumerate()
            .map(|(p, t)| ("", p, t.clone(), &sinks[p]))
            .collect();
        udp_cases.extend([
            (
                "AF_INET6 v4-mapped: ",
                0,
                format!("[::ffff:127.0.0.2]:{udp_port}"),
                &sinks[0],
            ),
            (
                "AF_INET6 v4-mapped: ",
                1,
                format!("[::ffff:127.0.0.1]:{}", fe_udp.port()),
                &sinks[1],
            ),
            ("IPv6: ", 0, format!("[::1]:{}", udp6_port[0]), &sinks6[0]),
            ("IPv6: ", 1, fe6_udp.to_string(), &sinks6[1]),
        ]);
        for how in ["unconnected", "connected"] {
            for (family, p, target, sink) in &udp_cases {
                let (p, target) = (*p, target.as_str());
                let before = sink.count.load(Ordering::Relaxed);
                let t = Instant::now();
                let mut cmd = Command::new(&bins.load);
                cmd.args(["udp-send", target, "2000", how]);
                let out = run_client(p, &mut cmd);
                if !out.status.success() {
                    bail!("udp-send {target}: {out:?}");
                }
                // Datagrams still in the socket buffer arrive right after.
                thread::sleep(Duration::from_millis(100));
                let got = sink.count.load(Ordering::Relaxed) - before;
                let rate = got as f64 / (t.elapsed().as_secs_f64() - 0.1);
                eprintln!(
                    "bench: round {} {family}udp {how} {}: {rate:.0} datagrams/s delivered",
                    round + 1,
                    PATHS[p]
                );
                results.udp.push(PathSample {
                    workload: format!("{family}UDP {how}"),
                    path: PATHS[p].to_owned(),
                    value: rate,
                });
            }
        }
    }

    // The hook alone: re-connect one UDP socket (no packet is sent).
    let micro = |label: &str, results: &mut Results| -> anyhow::Result<()> {
        let cases = [
            (
                "no programs, direct",
                false,
                format!("127.0.0.3:{udp_port}"),
            ),
            (
                "programs, not a frontend",
                true,
                format!("127.0.0.3:{udp_port}"),
            ),
            ("programs, frontend (redirected)", true, fe_udp.to_string()),
            // AF_INET6 sockets: dual stack to a v4-mapped frontend, and IPv6.
            (
                "AF_INET6 v4-mapped: no programs, direct",
                false,
                format!("[::ffff:127.0.0.3]:{udp_port}"),
            ),
            (
                "AF_INET6 v4-mapped: programs, frontend (redirected)",
                true,
                format!("[::ffff:127.0.0.1]:{}", fe_udp.port()),
            ),
            (
                "IPv6: no programs, direct",
                false,
                format!("[::1]:{}", udp6_port[1]),
            ),
            (
                "IPv6: programs, frontend (redirected)",
                true,
                fe6_udp.to_string(),
            ),
        ];
        for (case, in_cg, target) in cases {
            let mut xs = Vec::new();
            for _ in 0..3 {
                let mut cmd = Command::new(&bins.load);
                cmd.args(["reconnect", &target, &plan.micro_connects.to_string()]);
                let out = if in_cg {
                    cg.output(&mut cmd)
                } else {
                    plain.output(&mut cmd)
                };
                let ns: f64 = String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse()
                    .with_context(|| format!("reconnect output {out:?}"))?;
                xs.push(ns);
            }
            eprintln!("bench: connect() {label}, {case}: {xs:?} ns");
            results.micro.push(Micro {
                services: label.to_owned(),
                case: case.to_owned(),
                ns: xs,
            });
        }
        Ok(())
    };
    micro("1 service", results)?;
    // 10k more UDP services, one backend each.
    let kvs: Vec<(String, String)> = (0..10_000)
        .flat_map(|i| {
            let name = format!("bench-s{i}");
            [
                (
                    format!("/discovery/services/{name}"),
                    format!(
                        r#"{{"frontend":"127.10.{}.{}:5000","protocol":"udp"}}"#,
                        i / 250,
                        i % 250 + 1
                    ),
                ),
                (
                    format!("/discovery/backends/{name}/b"),
                    format!("127.0.0.3:{udp_port}"),
                ),
            ]
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut c = super::etcd(&etcd.url).await?;
        super::bulk_put(&mut c, &kvs).await
    })?;
    wait_until(Duration::from_secs(60), || {
        (maps.count() >= 10_002).then_some(())
    })
    .context("the agent did not install 10k services")?;
    micro("10k services", results)?;
    drop(agent);
    Ok(())
}
