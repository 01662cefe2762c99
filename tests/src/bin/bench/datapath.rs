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
use discovery_tests::{Agent, Etcd, TestCgroup, net::command_in, unique, wait_until};

use super::{
    Bins, CpuMeter, KernelMaps, Owned, Plan, free_tcp_port, free_udp_port, tcp_key, wait_tcp,
};
use crate::report::{Micro, PathSample, ProgramCost, Results};

pub const PATHS: [&str; 4] = ["direct", "discovery", "nft DNAT", "HAProxy"];

/// A redis-benchmark target: (index in [`PATHS`], host, port).
pub type Target = (usize, String, u16);

/// (name, requests, redis-benchmark flags). connect-heavy stays far below
/// local port exhaustion: 8000 connections per run, and a pause after each.
const WORKLOADS: [(&str, u64, &[&str]); 3] = [
    ("keep-alive (-c 50)", 200_000, &["-c", "50"]),
    ("pipelined (-P 16)", 1_000_000, &["-c", "50", "-P", "16"]),
    ("connect-heavy (-k 0)", 8_000, &["-c", "50", "-k", "0"]),
];

/// An nftables table of ours (in a host's namespace, or the bench's own),
/// deleted on drop.
pub struct NftTable {
    name: String,
    netns: Option<String>,
}

impl NftTable {
    /// `body` is the table's chains, one statement per line.
    pub fn new(netns: Option<&str>, name: &str, body: &str) -> anyhow::Result<Self> {
        let script = format!("table ip {name} {{\n{body}\n}}\n");
        let mut c = command_in(netns, "nft")
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
        Ok(Self {
            name: name.to_owned(),
            netns: netns.map(str::to_owned),
        })
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let _ = command_in(self.netns.as_deref(), "nft")
            .args(["delete", "table", "ip", &self.name])
            .status();
    }
}

/// Counts datagrams arriving at one address.
pub struct Sink {
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Sink {
    pub fn new(addr: SocketAddr) -> anyhow::Result<Self> {
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

/// A UDP case: (family label, index in [`PATHS`], target, the sink it
/// reaches).
pub type UdpCase<'a> = (&'static str, usize, String, &'a Sink);

/// The paths of one setting (loopback, or across hosts): where each
/// leads, and how a client of each runs.
pub struct Setting<'a> {
    /// Where clients run: a network namespace, or the bench's own.
    pub netns: Option<&'a str>,
    /// (family label, targets), run with every workload.
    pub tcp: Vec<(&'static str, Vec<Target>)>,
    pub udp: Vec<UdpCase<'a>>,
    /// Runs a client of path `p` to completion (in its cgroup).
    pub client: &'a dyn Fn(usize, &mut Command) -> std::process::Output,
    /// Counts the clients' and servers' CPU.
    pub cpu: CpuMeter,
}

impl Setting<'_> {
    /// One interleaved round: every TCP workload over every path (A B C D),
    /// then every UDP case, unconnected and connected. Each run records
    /// its rate and the machine's CPU time per request.
    pub fn round(
        &self,
        bins: &Bins,
        round: usize,
        tcp: &mut Vec<PathSample>,
        udp: &mut Vec<PathSample>,
    ) -> anyhow::Result<()> {
        for (family, targets) in &self.tcp {
            for (name, requests, flags) in WORKLOADS {
                for (p, host, port) in targets {
                    let mut cmd = command_in(self.netns, "redis-benchmark");
                    cmd.args(["-h", host, "-p", &port.to_string(), "-t", "get", "--csv"])
                        .args(["-n", &requests.to_string()])
                        .args(flags);
                    let cpu = self.cpu.start();
                    let out = (self.client)(*p, &mut cmd);
                    let cpu_us = cpu.micros_per(requests as f64);
                    let rps = redis_rps(&out)?;
                    let workload = format!("{family}{name}");
                    eprintln!(
                        "bench: round {} {workload} {}: {rps:.0} req/s, {cpu_us:.1} µs CPU/req",
                        round + 1,
                        PATHS[*p]
                    );
                    tcp.push(PathSample {
                        workload,
                        path: PATHS[*p].to_owned(),
                        value: rps,
                        cpu_us,
                    });
                    if flags.contains(&"-k") {
                        // Let TIME_WAIT drain a little between connect-heavy runs.
                        thread::sleep(Duration::from_secs(1));
                    }
                }
            }
        }
        for how in ["unconnected", "connected"] {
            for (family, p, target, sink) in &self.udp {
                let before = sink.count.load(Ordering::Relaxed);
                let cpu = self.cpu.start();
                let t = Instant::now();
                let mut cmd = command_in(self.netns, &bins.load);
                cmd.args(["udp-send", target, "2000", how]);
                let out = (self.client)(*p, &mut cmd);
                if !out.status.success() {
                    bail!("udp-send {target}: {out:?}");
                }
                // Datagrams still in the socket buffer arrive right after.
                thread::sleep(Duration::from_millis(100));
                let got = sink.count.load(Ordering::Relaxed) - before;
                let rate = got as f64 / (t.elapsed().as_secs_f64() - 0.1);
                let cpu_us = cpu.micros_per(got as f64);
                eprintln!(
                    "bench: round {} {family}udp {how} {}: {rate:.0} datagrams/s delivered, \
                     {cpu_us:.2} µs CPU/datagram",
                    round + 1,
                    PATHS[*p]
                );
                udp.push(PathSample {
                    workload: format!("{family}UDP {how}"),
                    path: PATHS[*p].to_owned(),
                    value: rate,
                    cpu_us,
                });
            }
        }
        Ok(())
    }

    /// Where a redirected TCP connection's time in the programs goes: one
    /// more connect-heavy run of the discovery path (target `discovery`)
    /// with the kernel's program stats on, counted for the programs
    /// attached to `cgroup`.
    pub fn program_cost(
        &self,
        setting: &str,
        cgroup: &std::path::Path,
        out: &mut Vec<ProgramCost>,
    ) -> anyhow::Result<()> {
        let (_, host, port) = self
            .tcp
            .first()
            .and_then(|(_, t)| t.iter().find(|t| t.0 == 1))
            .context("no discovery target")?;
        let (_, connections, flags) = WORKLOADS[2];
        // Stats stay on while the fd is open, and go off with it.
        let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("enabling the kernel's BPF program stats")?;
        let before = super::program_runs(cgroup)?;
        let mut cmd = command_in(self.netns, "redis-benchmark");
        cmd.args(["-h", host, "-p", &port.to_string(), "-t", "get", "--csv"])
            .args(["-n", &connections.to_string()])
            .args(flags);
        let cpu = self.cpu.start();
        let run = (self.client)(1, &mut cmd);
        let cpu_us = cpu.micros_per(connections as f64);
        let rps = redis_rps(&run)?;
        eprintln!(
            "bench: {setting}: connect-heavy discovery with program stats: {rps:.0} req/s, \
             {cpu_us:.1} µs CPU/req; {:?}",
            self.cpu.breakdown()
        );
        for (name, (runs, ns)) in super::program_runs(cgroup)? {
            let (r0, ns0) = before.get(&name).copied().unwrap_or_default();
            if runs > r0 {
                out.push(ProgramCost {
                    setting: setting.to_owned(),
                    program: name,
                    runs_per_connection: (runs - r0) as f64 / connections as f64,
                    ns_per_connection: (ns - ns0) as f64 / connections as f64,
                    cpu_us_per_connection: cpu_us,
                });
            }
        }
        Ok(())
    }
}

pub fn run(bins: &Bins, plan: &Plan, results: &mut Results) -> anyhow::Result<()> {
    eprintln!("bench: data path");
    let etcd = Etcd::start();
    let cg = TestCgroup::new("bench-data");
    // Servers and proxies run here: their CPU is counted.
    let servers = TestCgroup::new("bench-servers");
    let agent = Agent::start(
        &etcd.url,
        &cg,
        &["--metrics-addr", "off", "--consumers-interval", "0s"],
    );
    let maps = KernelMaps::open(&agent.pin_dir)?;

    // One redis on four addresses: one per path.
    let port = free_tcp_port("127.0.0.2");
    let _redis = Owned(
        servers.spawn(
            Command::new("redis-server")
                .args(["--port", &port.to_string()])
                .args(["--bind", "127.0.0.2 127.0.0.3 127.0.0.4 127.0.0.5"])
                .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                .args(["--logfile", "/dev/null"]),
        ),
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
            let child = Owned(
                servers.spawn(
                    Command::new("redis-server")
                        .args(["--port", &p.to_string(), "--bind", "::1"])
                        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                        .args(["--logfile", "/dev/null"]),
                ),
            );
            wait_tcp(format!("[::1]:{p}").parse()?, "redis-server on ::1")?;
            Ok(child)
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
        None,
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
    let _haproxy = Owned(servers.spawn(Command::new("haproxy").args(["-db", "-f"]).arg(&cfg)));
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
    let client = |path: usize, cmd: &mut Command| {
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
    let udp_targets = [
        format!("127.0.0.2:{udp_port}"),
        fe_udp.to_string(),
        format!("127.0.0.1:{dnat_udp}"),
    ];
    // AF_INET; AF_INET6 to the v4-mapped frontend (the kernel runs the
    // IPv4 hooks for it); IPv6.
    let mut udp: Vec<UdpCase> = udp_targets
        .iter()
        .enumerate()
        .map(|(p, t)| ("", p, t.clone(), &sinks[p]))
        .collect();
    udp.extend([
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
    let setting = Setting {
        netns: None,
        tcp: vec![
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
        ],
        udp,
        client: &client,
        cpu: CpuMeter::new(&[&cg.path, &plain.path, &servers.path]),
    };
    for round in 0..plan.rounds {
        setting.round(bins, round, &mut results.tcp, &mut results.udp)?;
    }
    setting.program_cost("loopback", &cg.path, &mut results.programs)?;

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
