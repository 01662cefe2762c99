//! `discovery-bench`, run by `cargo xtask bench`: the data path against
//! direct, nftables DNAT and HAProxy, on loopback and across hosts; the
//! control plane against the classic etcd → confd → HAProxy reload
//! pipeline; scale and failover; the stats page and the fleet map in
//! headless Chromium. Loopback, or network namespaces of our own; clients
//! in a child cgroup of our own, every process we start ended by PID,
//! every nft table and pin dir removed, also on failure.
mod control;
mod datapath;
mod hosts;
mod page;
mod report;
mod wire;

use std::{
    collections::{BTreeMap, HashMap},
    net::{SocketAddr, TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::maps::{HashMap as BpfHash, Map, MapData};
use discovery_common::{Service, ServiceKey, names, v4_mapped};
use etcd_client::{Client, Txn, TxnOp};

pub use report::Results;

/// How long and how often; `--quick` for a smoke run.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub rounds: usize,
    pub changes: usize,
    pub pipeline_samples: usize,
    pub sizes: &'static [usize],
    pub classic_sizes: &'static [usize],
    pub micro_connects: u64,
}

impl Plan {
    pub fn full() -> Self {
        Self {
            rounds: 5,
            changes: 1000,
            pipeline_samples: 10,
            sizes: &[10, 1_000, 100_000],
            classic_sizes: &[1, 1_000, 10_000],
            micro_connects: 2_000_000,
        }
    }

    pub fn quick() -> Self {
        Self {
            rounds: 1,
            changes: 50,
            pipeline_samples: 3,
            sizes: &[10, 1_000],
            classic_sizes: &[1, 1_000],
            micro_connects: 200_000,
        }
    }
}

/// Binaries the bench runs.
pub struct Bins {
    pub agent: PathBuf,
    pub probe: PathBuf,
    pub load: PathBuf,
}

/// `discovery-bench [--quick] [PART...]`; the agent, probe and load
/// binaries are found beside this one (`cargo xtask bench` builds them all).
fn main() -> anyhow::Result<()> {
    // DNAT and HAProxy, the baselines, are set up on the host.
    discovery_tests::net::share_host_network();
    let mut quick = false;
    let mut parts = Vec::new();
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--quick" => quick = true,
            "datapath" | "wire" | "control" | "failover" | "checks" | "hosts" | "page" => {
                parts.push(a)
            }
            other => bail!(
                "unknown argument {other:?}: expected --quick or parts among \
                 datapath, wire, control, failover, checks, hosts, page"
            ),
        }
    }
    let dir = std::env::current_exe()
        .context("locating discovery-bench")?
        .parent()
        .context("discovery-bench has no parent directory")?
        .to_path_buf();
    let bins = Bins {
        agent: dir.join("discovery-agent"),
        probe: dir.join("discovery-probe"),
        load: dir.join("discovery-load"),
    };
    for b in [&bins.agent, &bins.probe, &bins.load] {
        if !b.exists() {
            bail!(
                "{} is missing: run `cargo xtask bench`, which builds it",
                b.display()
            );
        }
    }
    run(
        bins,
        if quick { Plan::quick() } else { Plan::full() },
        &parts,
    )
}

/// Where BENCHMARKS.md and benchmarks.png go: the workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn run(bins: Bins, plan: Plan, parts: &[String]) -> anyhow::Result<()> {
    install_tools()?;
    // The harness finds the agent here.
    // SAFETY: still single-threaded; nothing reads the environment yet.
    unsafe { std::env::set_var("DISCOVERY_AGENT_BIN", &bins.agent) };
    let want = |p: &str| parts.is_empty() || parts.iter().any(|x| x == p);
    let mut results = Results::new(&bins)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // A part that fails is reported and the others still run: one broken
    // measurement must not hide the rest.
    let mut failed = Vec::new();
    let mut part = |name: &str, r: anyhow::Result<()>, results: &mut Results| {
        if let Err(e) = r {
            eprintln!("bench: {name} FAILED: {e:#}");
            results.notes.push(format!("**{name} failed**: {e:#}"));
            failed.push(name.to_owned());
        }
    };
    if want("datapath") {
        let r = datapath::run(&bins, &plan, &mut results);
        part("data path", r, &mut results);
    }
    if want("wire") {
        let r = wire::run(&bins, &plan, &mut results);
        part("data path across hosts", r, &mut results);
    }
    if want("control") {
        let r = rt.block_on(control::convergence(&bins, &plan, &mut results));
        part("convergence", r, &mut results);
        let r = rt.block_on(control::pipeline(&bins, &plan, &mut results));
        part("etcd write to first connection", r, &mut results);
    }
    if want("failover") {
        let r = rt.block_on(control::failover(&bins, &mut results));
        part("failover", r, &mut results);
    }
    if want("checks") {
        let r = rt.block_on(control::active_checks(&bins, &plan, &mut results));
        part("active checks", r, &mut results);
    }
    if want("hosts") {
        let r = hosts::run(&plan, &mut results);
        part("across hosts", r, &mut results);
    }
    if want("page") {
        let r = page::run(&bins, &plan, &mut results);
        part("stats page and fleet map", r, &mut results);
    }
    // A run of some parts writes a report of its own: it must not replace
    // the full run's BENCHMARKS.md.
    results.write(&root(), parts)?;
    if !failed.is_empty() {
        bail!("benchmark parts failed: {}", failed.join(", "));
    }
    Ok(())
}

/// redis-server, redis-benchmark, HAProxy and a font for the plot.
fn install_tools() -> anyhow::Result<()> {
    let missing: Vec<&str> = [
        ("redis-server", "redis-server"),
        ("redis-benchmark", "redis-tools"),
        ("haproxy", "haproxy"),
    ]
    .iter()
    .filter(|(bin, _)| which(bin).is_none())
    .map(|(_, pkg)| *pkg)
    .chain((!Path::new(report::FONT).exists()).then_some("fonts-dejavu-core"))
    .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("bench: installing {}", missing.join(" "));
    let status = Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("starting apt-get")?;
    if !status.success() {
        bail!(
            "apt-get install {} failed ({status}): the benchmarks need them; \
             install them by hand and run again",
            missing.join(" ")
        );
    }
    Ok(())
}

pub fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.exists())
}

pub fn free_tcp_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free tcp port")
}

pub fn free_udp_port(ip: &str) -> u16 {
    UdpSocket::bind((ip, 0))
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free udp port")
}

/// A process we started, ended by PID on drop.
pub struct Owned(pub Child);

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn wait_tcp(addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    let t = Instant::now();
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("{what} did not listen on {addr} within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Read access to the agent's pinned services map: what the kernel routes.
pub struct KernelMaps {
    services: BpfHash<MapData, ServiceKey, Service>,
}

impl KernelMaps {
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        let path = pin_dir.join(names::SERVICES);
        let data = MapData::from_pin(&path).with_context(|| format!("{}", path.display()))?;
        Ok(Self {
            services: Map::from_map_data(data)?.try_into()?,
        })
    }

    pub fn service(&self, key: &ServiceKey) -> Option<Service> {
        self.services.get(key, 0).ok()
    }

    pub fn count(&self) -> usize {
        self.services.keys().filter(Result::is_ok).count()
    }
}

pub fn tcp_key(addr: SocketAddr) -> ServiceKey {
    ServiceKey {
        addr: match addr {
            SocketAddr::V4(a) => v4_mapped(a.ip().octets()),
            SocketAddr::V6(a) => discovery_common::Addr16(a.ip().octets()),
        },
        port: addr.port(),
        proto: discovery_common::IPPROTO_TCP,
        pad: 0,
    }
}

pub async fn etcd(url: &str) -> anyhow::Result<Client> {
    Ok(Client::connect([url], None).await?)
}

/// Puts many keys, 128 per transaction (etcd's default limit).
pub async fn bulk_put(c: &mut Client, kvs: &[(String, String)]) -> anyhow::Result<()> {
    for chunk in kvs.chunks(128) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|(k, v)| TxnOp::put(k.as_str(), v.as_str(), None))
            .collect();
        c.txn(Txn::new().and_then(ops)).await?;
    }
    Ok(())
}

/// `n` filler backend addresses that nothing listens on (never chosen:
/// weight 0), distinct from every real one.
pub fn filler(i: usize) -> String {
    format!(
        "127.{}.{}.{}:9",
        100 + i / 62_500,
        (i / 250) % 250,
        i % 250 + 1
    )
}

/// Percentiles of a sample, in its unit.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
}

pub fn summarise(xs: &[f64]) -> Summary {
    if xs.is_empty() {
        return Summary::default();
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Summary {
        n: v.len(),
        p50: at(0.5),
        p99: at(0.99),
        min: v[0],
        max: v[v.len() - 1],
    }
}

/// Kilobytes of resident memory of a process.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time spent on a data path: the cgroups its clients and servers run
/// in (cgroup v2 `cpu.stat` usage_usec, which counts the kernel's work in
/// their syscalls and the softirqs run on their way out), this process
/// (the UDP sinks are its threads) and the kernel's softirq threads (which
/// take over packet processing under load). Unlike the machine's busy time
/// this leaves out whatever else runs meanwhile; unlike the rate it does
/// not move with how the two cores are shared.
pub struct CpuMeter {
    cgroups: Vec<PathBuf>,
    pids: Vec<u32>,
}

impl CpuMeter {
    pub fn new(cgroups: &[&Path]) -> Self {
        let ksoftirqd = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.starts_with("ksoftirqd/"))
            });
        Self {
            cgroups: cgroups.iter().map(|p| p.to_path_buf()).collect(),
            pids: ksoftirqd.chain([std::process::id()]).collect(),
        }
    }

    /// Seconds of CPU so far.
    fn now(&self) -> f64 {
        self.breakdown().iter().map(|(_, secs)| secs).sum()
    }

    /// Seconds of CPU so far of each source (cgroup name or pid), for a
    /// log line.
    pub fn breakdown(&self) -> Vec<(String, f64)> {
        let cgroups = self.cgroups.iter().map(|c| {
            let name = c
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into());
            (name, cgroup_cpu_secs(c))
        });
        let pids = self
            .pids
            .iter()
            .map(|&p| (p.to_string(), cpu_ticks(p) as f64 / clock_hz()));
        cgroups.chain(pids).collect()
    }

    pub fn start(&self) -> Busy<'_> {
        Busy {
            meter: self,
            at: self.now(),
        }
    }
}

/// A cgroup's CPU time so far (`cpu.stat` usage_usec), in seconds.
fn cgroup_cpu_secs(cg: &Path) -> f64 {
    std::fs::read_to_string(cg.join("cpu.stat"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .map_or(0.0, |us| us as f64 / 1e6)
}

/// Clock ticks per second, the unit of /proc/PID/stat's times.
pub fn clock_hz() -> f64 {
    // SAFETY: sysconf only reads a constant of the system.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// A [`CpuMeter`] reading taken at the start of a run.
pub struct Busy<'a> {
    meter: &'a CpuMeter,
    at: f64,
}

impl Busy<'_> {
    /// Microseconds of CPU per unit of `n` since the start.
    pub fn micros_per(&self, n: f64) -> f64 {
        let spent = self.meter.now() - self.at;
        if n > 0.0 { spent * 1e6 / n } else { f64::NAN }
    }
}

/// Runs and run time (ns) so far of each program attached to `cgroup`, by
/// program name: the kernel's own accounting, counted while the stats are
/// enabled (`aya::sys::enable_stats`).
pub fn program_runs(cgroup: &Path) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
        .output()
        .context("bpftool cgroup show")?;
    let attached: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("bpftool cgroup show output")?;
    let ids: Vec<u64> = attached
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["id"].as_u64())
        .collect();
    let mut runs = BTreeMap::new();
    for info in aya::programs::loaded_programs().filter_map(Result::ok) {
        if ids.contains(&u64::from(info.id())) {
            let name = info.name_as_str().unwrap_or("?").to_owned();
            let e = runs.entry(name).or_insert((0, 0));
            e.0 += info.run_count();
            e.1 += info.run_time().as_nanos() as u64;
        }
    }
    Ok(runs)
}

/// utime + stime of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may contain spaces) start at ")".
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // state is field 3 overall, f[0] here; utime is 14, stime 15.
    n(11) + n(12)
}

/// Memory the kernel charges for the pinned maps (bpftool's
/// bytes_memlock), by map name.
pub fn map_memory(pin_dir: &Path) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for name in discovery_common::MAPS.iter().map(|m| m.name) {
        let Ok(o) = Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(pin_dir.join(name))
            .output()
        else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        if let Some(b) = v["bytes_memlock"].as_u64() {
            out.insert(name.to_owned(), b);
        }
    }
    out
}
