//! Results: a table on stdout, BENCHMARKS.md and a PNG plot.
use std::{collections::BTreeMap, fmt::Write as _, path::Path, process::Command};

use plotters::prelude::*;

use super::{Bins, Summary, datapath::PATHS, summarise};

/// The plot's font (Debian's fonts-dejavu-core, installed by the bench).
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

#[derive(Debug, Clone)]
pub struct PathSample {
    pub workload: String,
    pub path: String,
    pub value: f64,
    /// CPU time per request (or datagram delivered), in microseconds: the
    /// client's, server's and proxy's (see `CpuMeter`).
    pub cpu_us: f64,
}

/// One path of one workload, over the rounds.
struct PathRow {
    path: String,
    rate: Summary,
    cpu_us: Summary,
}

#[derive(Debug, Clone)]
pub struct Micro {
    pub services: String,
    pub case: String,
    pub ns: Vec<f64>,
}

#[derive(Debug, Clone)]
pub struct Convergence {
    pub backends: usize,
    pub services: usize,
    /// From the start of the etcd write to the kernel map changing.
    pub total_ms: Summary,
    /// From etcd acknowledging the write to the kernel map changing.
    pub after_write_ms: Summary,
    pub initial_sync_s: f64,
    pub rss_kib: u64,
    pub map_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct Pipeline {
    pub servers: usize,
    pub discovery_ms: Summary,
    pub classic_ms: Summary,
}

#[derive(Debug, Clone)]
pub struct Failover {
    pub label: String,
    pub ms: f64,
    pub failed_connects: usize,
    pub connects: usize,
    /// What the row cost besides failed connects, printed under the table.
    pub note: Option<String>,
}

/// One program's share of a redirected connection (connect-heavy).
#[derive(Debug)]
pub struct ProgramCost {
    pub setting: String,
    pub program: String,
    pub runs_per_connection: f64,
    pub ns_per_connection: f64,
    /// The whole run's CPU per connection, for scale.
    pub cpu_us_per_connection: f64,
}

/// One row of the across-hosts table.
#[derive(Debug)]
pub struct HostsRow {
    pub setup: String,
    /// Agents whose maps were timed (every agent but the writer's host's).
    pub watchers: usize,
    pub changes: usize,
    pub ms: Summary,
}

/// One figure of the stats page and fleet map section.
#[derive(Debug)]
pub struct PageRow {
    /// What was measured; empty for a part of the row above.
    pub figure: String,
    /// From when to when.
    pub spans: String,
    pub ms: Summary,
}

pub struct Results {
    pub machine: Vec<(String, String)>,
    pub tcp: Vec<PathSample>,
    pub udp: Vec<PathSample>,
    pub micro: Vec<Micro>,
    pub convergence: Vec<Convergence>,
    pub pipeline: Vec<Pipeline>,
    pub failover: Vec<Failover>,
    pub checks: BTreeMap<String, String>,
    pub hosts: Vec<HostsRow>,
    /// The data path across hosts (the `wire` part).
    pub wire_tcp: Vec<PathSample>,
    pub wire_udp: Vec<PathSample>,
    pub programs: Vec<ProgramCost>,
    pub page: Vec<PageRow>,
    pub notes: Vec<String>,
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            let s = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&s)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|_| "not found".into())
}

impl Results {
    pub fn new(bins: &Bins) -> anyhow::Result<Self> {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
            .unwrap_or_default();
        let agent = bins.agent.display().to_string();
        let machine = vec![
            (
                "date".into(),
                first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            ),
            ("kernel".into(), first_line("uname", &["-r"])),
            (
                "cpu".into(),
                format!(
                    "{cpu}, {} cores",
                    std::thread::available_parallelism().map_or(0, |n| n.get())
                ),
            ),
            (
                "memory".into(),
                first_line("sh", &["-c", "free -g | awk '/Mem:/ {print $2 \" GiB\"}'"]),
            ),
            ("discovery".into(), first_line(&agent, &["--version"])),
            ("redis".into(), first_line("redis-server", &["--version"])),
            ("HAProxy".into(), first_line("haproxy", &["-v"])),
            ("etcd".into(), first_line("etcd", &["--version"])),
            ("nftables".into(), first_line("nft", &["--version"])),
        ];
        Ok(Self {
            machine,
            tcp: vec![],
            udp: vec![],
            micro: vec![],
            convergence: vec![],
            pipeline: vec![],
            failover: vec![],
            checks: BTreeMap::new(),
            hosts: vec![],
            wire_tcp: vec![],
            wire_udp: vec![],
            programs: vec![],
            page: vec![],
            notes: vec![],
        })
    }

    /// BENCHMARKS.md and benchmarks.png for a full run; for a run of some
    /// parts, BENCHMARKS-<parts>.md only.
    pub fn write(&self, root: &Path, parts: &[String]) -> anyhow::Result<()> {
        let md = self.markdown();
        println!("{md}");
        if parts.is_empty() {
            std::fs::write(root.join("BENCHMARKS.md"), &md)?;
            self.plot(&root.join("benchmarks.png"))?;
            eprintln!("bench: wrote BENCHMARKS.md and benchmarks.png");
        } else {
            let name = format!("BENCHMARKS-{}.md", parts.join("-"));
            std::fs::write(root.join(&name), &md)?;
            eprintln!("bench: wrote {name}");
        }
        Ok(())
    }

    /// (workload, [(path, rate, CPU per request)]): summaries of the
    /// rounds, workloads in first-seen order.
    fn by_path(samples: &[PathSample]) -> Vec<(String, Vec<PathRow>)> {
        let mut order: Vec<String> = Vec::new();
        let mut m: BTreeMap<(String, String), (Vec<f64>, Vec<f64>)> = BTreeMap::new();
        for s in samples {
            if !order.contains(&s.workload) {
                order.push(s.workload.clone());
            }
            let e = m.entry((s.workload.clone(), s.path.clone())).or_default();
            e.0.push(s.value);
            e.1.push(s.cpu_us);
        }
        order
            .into_iter()
            .map(|w| {
                let rows = PATHS
                    .iter()
                    .filter_map(|p| {
                        m.get(&(w.clone(), (*p).to_owned())).map(|(v, c)| PathRow {
                            path: (*p).to_owned(),
                            rate: summarise(v),
                            cpu_us: summarise(c),
                        })
                    })
                    .collect();
                (w, rows)
            })
            .collect()
    }

    fn markdown(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "# Benchmarks\n");
        let _ = writeln!(
            o,
            "Produced by `cargo xtask bench` (see README.md). Every figure comes from the run \
             below; nothing is edited by hand. Nothing leaves the machine: loopback, and \
             network namespaces joined by a bridge for the across-hosts parts; clients of the \
             discovery path run in a child cgroup with the programs attached, the others in a sibling child cgroup \
             without them.\n"
        );
        for (k, v) in &self.machine {
            let _ = writeln!(o, "- **{k}**: {v}");
        }
        let _ = writeln!(o, "\n![throughput and convergence](benchmarks.png)\n");
        for n in &self.notes {
            let _ = writeln!(o, "> {n}\n");
        }
        for (title, samples, unit, per) in [
            (
                "TCP: redis-benchmark GET, one redis-server",
                &self.tcp,
                "requests/s",
                "request",
            ),
            (
                "UDP: 64-byte datagrams from one socket for 2 s",
                &self.udp,
                "datagrams/s delivered",
                "datagram delivered",
            ),
            (
                "Across hosts, TCP: redis-benchmark GET on host A, redis-server on host B",
                &self.wire_tcp,
                "requests/s",
                "request",
            ),
            (
                "Across hosts, UDP: 64-byte datagrams from host A to sinks on host B for 2 s",
                &self.wire_udp,
                "datagrams/s delivered",
                "datagram delivered",
            ),
        ] {
            if samples.is_empty() {
                continue;
            }
            let _ = writeln!(o, "## {title}\n");
            if std::ptr::eq(samples, &self.wire_tcp) {
                let _ = writeln!(
                    o,
                    "Two hosts (network namespaces) on a switch (tests/src/hosts.rs), an etcd \
                     member and an agent each; every client runs on host A and every backend \
                     on host B (one redis-server on four addresses of B, one per path, so \
                     TIME_WAIT never crosses paths). direct: B's address; discovery: a \
                     loopback frontend on A redirected at connect; nft DNAT: a loopback \
                     address on A translated in the output hook, with route_localnet and \
                     masquerade (as the classic setup needs once the backend is remote); \
                     HAProxy: on A's loopback, TCP mode, 2 threads. AF_INET only.\n"
                );
            }
            let _ = writeln!(
                o,
                "Median of the interleaved rounds, {unit}; the spread is min–max over rounds; \
                 the ratio is the median against direct. CPU is the time spent by the clients', \
                 servers' and proxy's processes (with the kernel's work in their syscalls) and \
                 the kernel's softirq threads, per {per}, in µs; anything else running on the \
                 machine is left out.\n"
            );
            let _ = writeln!(
                o,
                "| workload | path | median | spread | ratio to direct | CPU µs per {per} | CPU spread | CPU ratio |"
            );
            let _ = writeln!(o, "|---|---|---:|---:|---:|---:|---:|---:|");
            for (w, rows) in Self::by_path(samples) {
                let direct = rows.iter().find(|r| r.path == "direct");
                for r in &rows {
                    let (s, c) = (r.rate, r.cpu_us);
                    let ratio = direct.map_or("".into(), |d| format!("{:.2}x", s.p50 / d.rate.p50));
                    let cpu_ratio =
                        direct.map_or("".into(), |d| format!("{:.2}x", c.p50 / d.cpu_us.p50));
                    let digits = if c.p50 < 10.0 { 2 } else { 1 };
                    let _ = writeln!(
                        o,
                        "| {w} | {} | {:.0} | {:.0}–{:.0} (n={}) | {ratio} | {:.digits$} | \
                         {:.digits$}–{:.digits$} | {cpu_ratio} |",
                        r.path, s.p50, s.min, s.max, s.n, c.p50, c.min, c.max
                    );
                }
            }
            o.push('\n');
        }
        if !self.programs.is_empty() {
            let _ = writeln!(
                o,
                "## A redirected connection in the programs\n\nOne more connect-heavy run of \
                 the discovery path with the kernel's program stats on \
                 (`BPF_ENABLE_STATS`): runs and time of each program attached to the \
                 client's cgroup, per connection, beside the run's CPU per connection \
                 (counted as in the tables above). The rest of a connection's cost beyond \
                 direct is the kernel's, around the programs.\n"
            );
            let _ = writeln!(
                o,
                "| setting | program | runs per connection | ns per connection | CPU µs per connection (whole run) |"
            );
            let _ = writeln!(o, "|---|---|---:|---:|---:|");
            for p in &self.programs {
                let _ = writeln!(
                    o,
                    "| {} | {} | {:.1} | {:.0} | {:.1} |",
                    p.setting,
                    p.program,
                    p.runs_per_connection,
                    p.ns_per_connection,
                    p.cpu_us_per_connection
                );
            }
            o.push('\n');
        }
        if !self.micro.is_empty() {
            let _ = writeln!(
                o,
                "## Cost of the hook per connect()\n\nOne UDP socket re-connected in a loop (no \
                 packet sent), median of 3 runs, nanoseconds per connect(). The hook's cost is \
                 the difference to \"no programs, direct\" of the same socket family \
                 (AF_INET; AF_INET6 to a v4-mapped address; IPv6).\n"
            );
            let _ = writeln!(
                o,
                "| services in the maps | case | ns per connect() | spread | hook cost |"
            );
            let _ = writeln!(o, "|---|---|---:|---:|---:|");
            for m in &self.micro {
                let s = summarise(&m.ns);
                // Against the direct case of the same socket family, named
                // before ": " (none for AF_INET).
                let family = |c: &str| c.split_once(": ").map_or("", |(f, _)| f).to_owned();
                let base = self
                    .micro
                    .iter()
                    .find(|x| {
                        x.services == m.services
                            && family(&x.case) == family(&m.case)
                            && x.case.contains("no programs")
                    })
                    .map(|x| summarise(&x.ns).p50)
                    .unwrap_or(s.p50);
                let _ = writeln!(
                    o,
                    "| {} | {} | {:.1} | {:.1}–{:.1} | {:+.1} ns |",
                    m.services,
                    m.case,
                    s.p50,
                    s.min,
                    s.max,
                    s.p50 - base
                );
            }
            o.push('\n');
        }
        if !self.convergence.is_empty() {
            let _ = writeln!(
                o,
                "## Control plane: etcd write to kernel map\n\nEach change puts or deletes one \
                 backend of one service (10 backends per service); timed from the start of the \
                 etcd write (etcd fsyncs it) to the service's entry changing in the pinned map, \
                 polled every 50 µs. \"after ack\" starts when etcd acknowledged the write. The \
                 initial sync is a cold agent start against the full etcd.\n"
            );
            let _ = writeln!(
                o,
                "| backends (services) | changes | p50 | p99 | max | p50 after ack | p99 after ack | initial sync | agent RSS | map memory |"
            );
            let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
            for c in &self.convergence {
                let _ = writeln!(
                    o,
                    "| {} ({}) | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} s | {:.1} MiB | {:.1} MiB |",
                    c.backends,
                    c.services,
                    c.total_ms.n,
                    c.total_ms.p50,
                    c.total_ms.p99,
                    c.total_ms.max,
                    c.after_write_ms.p50,
                    c.after_write_ms.p99,
                    c.initial_sync_s,
                    c.rss_kib as f64 / 1024.0,
                    c.map_bytes as f64 / 1048576.0
                );
            }
            o.push('\n');
        }
        if !self.pipeline.is_empty() {
            let _ = writeln!(
                o,
                "## etcd write to the first connection on the new backend\n\nThe one live \
                 backend is swapped in one etcd write; the other servers have weight 0. Classic: \
                 a watch re-renders haproxy.cfg, `haproxy -c` checks it, SIGUSR2 reloads the \
                 master-worker. A client connecting back to back records when it first reaches \
                 the new backend.\n"
            );
            let _ = writeln!(o, "| servers | system | p50 | p99 | max | samples |");
            let _ = writeln!(o, "|---:|---|---:|---:|---:|---:|");
            for p in &self.pipeline {
                for (name, s) in [
                    ("discovery", p.discovery_ms),
                    ("etcd → confd → HAProxy reload", p.classic_ms),
                ] {
                    let _ = writeln!(
                        o,
                        "| {} | {name} | {:.1} ms | {:.1} ms | {:.1} ms | {} |",
                        p.servers, s.p50, s.p99, s.max, s.n
                    );
                }
            }
            o.push('\n');
        }
        if !self.failover.is_empty() {
            let _ = writeln!(
                o,
                "## Failover\n\nFailed connects per backend death, on one node: two backends \
                 under one client opening new TCP connections back to back; one backend's \
                 listener closes. A failed connect is one the client saw fail: an error, no \
                 greeting from a backend, or the dead backend's. Time from the kill to the \
                 last connect that still went to the dead backend. The first rows are \
                 discovery (client in the cgroup with the programs, backends announced with \
                 a tcp check); HAProxy's client runs in a sibling cgroup without them.\n"
            );
            let _ = writeln!(
                o,
                "| setup | time | failed connects | connects after the kill |"
            );
            let _ = writeln!(o, "|---|---:|---:|---:|");
            for f in &self.failover {
                let _ = writeln!(
                    o,
                    "| {} | {:.0} ms | {} | {} |",
                    f.label, f.ms, f.failed_connects, f.connects
                );
            }
            o.push('\n');
            for f in self.failover.iter().filter(|f| f.note.is_some()) {
                let note = f.note.as_deref().unwrap_or_default();
                if f.label.starts_with("HAProxy") {
                    let _ = writeln!(
                        o,
                        "HAProxy: the client connects to HAProxy, which stays up, so a dead \
                         server would show as a connection closed without a greeting, not as a \
                         refused connect. With `retries 3` and `option redispatch` HAProxy \
                         retries a refused connect itself, at once on the other server while \
                         more than one is up (round robin), and the client sees no failure; \
                         `observe layer4` counts each refused attempt and marks the server \
                         down at the third. The cost is a wait instead: the retry that finds \
                         one server left first waits the turn-around, min(`timeout connect`, \
                         1 s). Measured: {note}.\n"
                    );
                } else {
                    let _ = writeln!(o, "{}: {note}.\n", f.label);
                }
            }
        }
        if !self.hosts.is_empty() {
            let _ = writeln!(
                o,
                "## Across hosts: etcd write to every other agent's map\n\nHosts are network \
                 namespaces on a switch (tests/src/hosts.rs), each with an etcd member (one \
                 3-member cluster) and an agent. A backend is put or deleted through host A's \
                 member (an etcd client inside host A; etcd fsyncs the write); timed from \
                 before the write to the service's entry changing in each other agent's pinned \
                 map, polled every 50 µs.\n"
            );
            let _ = writeln!(o, "| setup | agents timed | changes | p50 | p99 | max |");
            let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|");
            for h in &self.hosts {
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {:.2} ms | {:.2} ms | {:.2} ms |",
                    h.setup, h.watchers, h.changes, h.ms.p50, h.ms.p99, h.ms.max
                );
            }
            o.push('\n');
        }
        if !self.page.is_empty() {
            let _ = writeln!(
                o,
                "## Stats page and fleet map at 1k services / 10k backends\n\nOne agent with \
                 1,000 services of 10 backends each in etcd (100 draining, 20 in maintenance) \
                 and consumers summaries from 20 nodes (100 workloads, 2,000 calls edges). \
                 Debian's headless Chromium, driven over the DevTools protocol, in real time \
                 (no virtual time), 1300×900 window; times in the browser are the page's \
                 performance.now() (zero at navigation start), \"frame painted\" is the first \
                 task after the next animation frame, after a forced layout. The page builds \
                 its list in slices (the first screen in one task, then 1,000 rows a task), so \
                 both the first frame and the one after the last row are given. A filter \
                 starts right after a poll's frame, so the page's own 1 s poll does not land \
                 in it. The first page load of a run is a fresh profile's first.\n"
            );
            let _ = writeln!(o, "| figure | spans | median | max | n |");
            let _ = writeln!(o, "|---|---|---:|---:|---:|");
            for r in &self.page {
                let _ = writeln!(
                    o,
                    "| {} | {} | {:.1} ms | {:.1} ms | {} |",
                    r.figure, r.spans, r.ms.p50, r.ms.max, r.ms.n
                );
            }
            o.push('\n');
        }
        if !self.checks.is_empty() {
            let _ = writeln!(
                o,
                "## Active checks\n\nA service with a tcp check every second on every backend; \
                 nothing listens on them, so every probe is refused. Agent CPU over 10 s.\n"
            );
            for (k, v) in &self.checks {
                let _ = writeln!(o, "- {k}: {v}");
            }
            o.push('\n');
        }
        o
    }

    fn plot(&self, path: &Path) -> anyhow::Result<()> {
        let font = std::fs::read(FONT)?;
        // The font lives for the process; plotters keeps a reference.
        let font: &'static [u8] = Box::leak(font.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, font)
            .map_err(|_| anyhow::anyhow!("registering {FONT}"))?;
        let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let (left, right) = root.split_horizontally(700);
        let colors = [
            RGBColor(90, 90, 90),
            RGBColor(31, 119, 180),
            RGBColor(255, 127, 14),
            RGBColor(214, 39, 40),
        ];

        // Left: throughput per path, relative to direct, per workload.
        let mut groups = Self::by_path(&self.tcp);
        groups.extend(Self::by_path(&self.udp));
        // AF_INET only: the AF_INET6 rows ("FAMILY: workload") are in the
        // tables.
        groups.retain(|(w, _)| !w.contains(": "));
        let mut chart = ChartBuilder::on(&left)
            .caption("Throughput relative to direct (median)", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(60)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..groups.len().max(1) as f64, 0f64..1.6f64)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc("ratio to direct")
            .draw()?;
        // Workload names above their bars (the x axis has no room).
        chart.draw_series(groups.iter().enumerate().map(|(g, (w, _))| {
            let short = w.split(" (").next().unwrap_or(w).replace("UDP ", "UDP\n");
            Text::new(
                short.lines().next().unwrap_or("").to_owned(),
                (g as f64 + 0.12, 1.22),
                ("sans-serif", 14),
            )
        }))?;
        chart.draw_series(groups.iter().enumerate().filter_map(|(g, (w, _))| {
            w.strip_prefix("UDP ")
                .map(|rest| Text::new(rest.to_owned(), (g as f64 + 0.12, 1.16), ("sans-serif", 14)))
        }))?;
        for (p, path_name) in PATHS.iter().enumerate() {
            let bars: Vec<Rectangle<(f64, f64)>> = groups
                .iter()
                .enumerate()
                .filter_map(|(g, (_, rows))| {
                    let direct = rows.iter().find(|r| r.path == "direct")?.rate.p50;
                    let s = rows.iter().find(|r| r.path == *path_name)?.rate;
                    let x0 = g as f64 + 0.1 + p as f64 * 0.2;
                    Some(Rectangle::new(
                        [(x0, 0.0), (x0 + 0.18, s.p50 / direct)],
                        colors[p].filled(),
                    ))
                })
                .collect();
            chart
                .draw_series(bars)?
                .label(*path_name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], colors[p].filled())
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;

        // Right: etcd write → change, against size (log-log).
        let mut pts: Vec<(String, Vec<(f64, f64)>)> = vec![
            (
                "discovery p99: etcd write to map".into(),
                self.convergence
                    .iter()
                    .map(|c| (c.backends as f64, c.total_ms.p99))
                    .collect(),
            ),
            (
                "discovery p50: etcd write to map".into(),
                self.convergence
                    .iter()
                    .map(|c| (c.backends as f64, c.total_ms.p50))
                    .collect(),
            ),
            (
                "discovery p50: write to first connection".into(),
                self.pipeline
                    .iter()
                    .map(|p| (p.servers as f64, p.discovery_ms.p50))
                    .collect(),
            ),
            (
                "HAProxy reload p50: write to first connection".into(),
                self.pipeline
                    .iter()
                    .map(|p| (p.servers as f64, p.classic_ms.p50))
                    .collect(),
            ),
        ];
        pts.retain(|(_, v)| !v.is_empty());
        let ymax = pts
            .iter()
            .flat_map(|(_, v)| v.iter().map(|p| p.1))
            .fold(1.0f64, f64::max)
            * 2.0;
        let mut chart = ChartBuilder::on(&right)
            .caption("Change latency against size", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(50)
            .y_label_area_size(60)
            .build_cartesian_2d((1f64..200_000f64).log_scale(), (0.1f64..ymax).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("backends / servers")
            .y_desc("milliseconds")
            .draw()?;
        for (i, (label, v)) in pts.into_iter().enumerate() {
            let c = colors[(i + 1) % colors.len()];
            chart
                .draw_series(LineSeries::new(v.clone(), c.stroke_width(2)))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2))
                });
            chart.draw_series(v.into_iter().map(|p| Circle::new(p, 4, c.filled())))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
        root.present()?;
        Ok(())
    }
}
