//! Program-level tests, as aya's test/integration-test does them: the real
//! eBPF object loaded without the agent, its maps written directly, the
//! sock_addr programs a test needs attached to a child cgroup of the test's
//! own, and real clients (`discovery-probe`) in that cgroup. No etcd, no
//! agent, no pins: maps and links belong to the test's `Ebpf`, and dropping
//! it detaches the programs and frees the maps.
//!
//! The object is the one the agent's build.rs builds: `cargo xtask test`
//! passes its path in `DISCOVERY_EBPF_OBJECT`; without it the newest one
//! under the workspace's target dir is used.
use std::{
    fs,
    net::{SocketAddr, TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr},
};
use discovery_common::{
    BACKEND_F_VALID, Backend as BackendEntry, Counter, Exempt, IPPROTO_TCP, IPPROTO_UDP, MAPS,
    Service, ServiceKey, ServiceStats, Slot, SlotKey, TcpOpts, names, v4_mapped,
};
use discovery_tests::{Backend, Load, Outcome, TestCgroup, tally};

const PROBE: &str = env!("CARGO_BIN_EXE_discovery-probe");
const ECONNREFUSED: i32 = 111;

/// Small maps: quick to create for each test.
const MAX_SERVICES: u32 = 16;
const MAX_BACKENDS: u32 = 16;
/// The one backend set and the one counters slot a test's service uses.
const SET_ID: u32 = 1;
const STATS_ID: u32 = 1;

const CONNECT4: &str = "disc_connect4";
const SENDMSG4: &str = "disc_sendmsg4";
const RECVMSG4: &str = "disc_recvmsg4";
const GETPEERNAME4: &str = "disc_getpeername4";

fn workspace_target() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// The newest non-empty `build/discovery-agent-*/out/discovery` under a
/// profile dir. Empty ones are stubs of builds without an eBPF toolchain.
fn newest_object(profile_dir: &Path) -> Option<PathBuf> {
    fs::read_dir(profile_dir.join("build"))
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("discovery-agent-")
        })
        .map(|e| e.path().join("out/discovery"))
        .filter_map(|p| {
            let m = p.metadata().ok().filter(|m| m.len() > 0)?;
            Some((m.modified().ok()?, p))
        })
        .max()
        .map(|(_, p)| p)
}

/// The eBPF object: `DISCOVERY_EBPF_OBJECT`, else the newest real build.
fn object_path() -> PathBuf {
    if let Some(p) = std::env::var_os("DISCOVERY_EBPF_OBJECT") {
        return PathBuf::from(p);
    }
    newest_object(&workspace_target().join("debug")).unwrap_or_else(|| {
        panic!(
            "no eBPF object (DISCOVERY_EBPF_OBJECT unset and no non-empty \
             {}/debug/build/discovery-agent-*/out/discovery): run the tests with `cargo xtask test`",
            workspace_target().display()
        )
    })
}

/// The programs loaded from the real object, some attached to a cgroup of
/// the test's own. Fields drop in order: the links go (detaching the
/// programs) before the cgroup is removed.
struct Programs {
    ebpf: Ebpf,
    cg: TestCgroup,
}

impl Programs {
    /// Loads the object, loads `programs` into the kernel and attaches them
    /// to a new child cgroup of the cgroup v2 root.
    fn attach(tag: &str, programs: &[&str]) -> Self {
        let cg = TestCgroup::new(tag);
        let object = object_path();
        let mut loader = EbpfLoader::new();
        for m in MAPS.iter().filter(|m| m.size.follows_flags()) {
            loader.map_max_entries(m.name, m.size.entries(MAX_SERVICES, MAX_BACKENDS));
        }
        let mut ebpf = loader
            .load_file(&object)
            .unwrap_or_else(|e| panic!("loading {}: {e}", object.display()));
        let cgroup = fs::File::open(&cg.path).expect("open the test cgroup");
        for name in programs {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("no program {name} in the object"))
                .try_into()
                .unwrap_or_else(|e| panic!("{name} is not a sock_addr program: {e}"));
            prog.load()
                .unwrap_or_else(|e| panic!("verifier rejected {name}: {e}"));
            prog.attach(&cgroup, CgroupAttachMode::Single)
                .unwrap_or_else(|e| panic!("attaching {name}: {e}"));
        }
        Self { ebpf, cg }
    }

    /// Writes a frontend as the agent's reconciler does: the backends at
    /// ids from 1 (valid), then the slots of a set (equal weights: each slot
    /// names one backend), then the service entry that makes it live. No
    /// backends: a service of count 0.
    fn service(&mut self, frontend: SocketAddr, proto: u8, backends: &[SocketAddr]) -> ServiceKey {
        let key = service_key(frontend, proto);
        let mut array: Array<_, BackendEntry> = self.map_mut(names::BACKENDS);
        for (i, b) in backends.iter().enumerate() {
            let SocketAddr::V4(b) = b else {
                panic!("IPv4 backends only")
            };
            let entry = BackendEntry {
                addr: v4_mapped(b.ip().octets()),
                port: b.port(),
                flags: BACKEND_F_VALID,
                ejected: 0,
            };
            array.set(i as u32 + 1, entry, 0).expect("write a backend");
        }
        let mut slots: HashMap<_, SlotKey, Slot> = self.map_mut(names::SLOTS);
        for i in 0..backends.len() as u32 {
            let slot = Slot {
                backend: i + 1,
                alias: i + 1,
                threshold: u32::MAX,
                pad: 0,
            };
            slots
                .insert(
                    SlotKey {
                        set_id: SET_ID,
                        slot: i,
                    },
                    slot,
                    0,
                )
                .expect("write a slot");
        }
        let svc = Service {
            set_id: if backends.is_empty() { 0 } else { SET_ID },
            count: backends.len() as u32,
            flags: 0,
            stats_id: STATS_ID,
            tcp: TcpOpts::default(),
        };
        let mut services: HashMap<_, ServiceKey, Service> = self.map_mut(names::SERVICES);
        services.insert(key, svc, 0).expect("write the service");
        key
    }

    /// A map of the object, typed.
    fn map_mut<'a, M>(&'a mut self, name: &str) -> M
    where
        M: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .unwrap_or_else(|| panic!("no map {name}"));
        M::try_from(map).unwrap_or_else(|e| panic!("map {name}: {e}"))
    }

    fn map<'a, M>(&'a self, name: &str) -> M
    where
        M: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self
            .ebpf
            .map(name)
            .unwrap_or_else(|| panic!("no map {name}"));
        M::try_from(map).unwrap_or_else(|e| panic!("map {name}: {e}"))
    }

    /// A global counter, summed over the CPUs.
    fn counter(&self, c: Counter) -> u64 {
        let m: PerCpuArray<_, u64> = self.map(names::COUNTERS);
        m.get(&(c as u32), 0).expect("read a counter").iter().sum()
    }

    /// The test service's stats, summed over the CPUs.
    fn service_stats(&self) -> ServiceStats {
        let m: PerCpuArray<_, ServiceStats> = self.map(names::SVC_STATS);
        m.get(&STATS_ID, 0)
            .expect("read service stats")
            .iter()
            .fold(ServiceStats::default(), |a, s| ServiceStats {
                connects: a.connects + s.connects,
                datagrams: a.datagrams + s.datagrams,
                no_backend: a.no_backend + s.no_backend,
                connect_failed: a.connect_failed + s.connect_failed,
            })
    }

    /// Calls to a frontend from exempt processes, summed over the CPUs.
    fn exempt_calls(&self) -> u64 {
        let m: PerCpuArray<_, u64> = self.map(names::EXEMPT_CALLS);
        m.get(&0, 0).expect("read exempt calls").iter().sum()
    }

    fn exempt(&mut self, pid: u32, start_time: u64) {
        let mut m: HashMap<_, u32, Exempt> = self.map_mut(names::EXEMPT);
        m.insert(pid, Exempt { start_time }, 0)
            .expect("exempt a process");
    }

    fn unexempt(&mut self, pid: u32) {
        let mut m: HashMap<_, u32, Exempt> = self.map_mut(names::EXEMPT);
        m.remove(&pid).expect("end an exemption");
    }

    /// `discovery-probe MODE ADDR N` as a process inside the cgroup.
    fn probe(&self, mode: &str, addr: SocketAddr, n: usize) -> Vec<Outcome> {
        self.cg.probe(PROBE, mode, &addr.to_string(), n)
    }
}

fn service_key(frontend: SocketAddr, proto: u8) -> ServiceKey {
    let SocketAddr::V4(f) = frontend else {
        panic!("IPv4 frontends only")
    };
    ServiceKey {
        addr: v4_mapped(f.ip().octets()),
        port: f.port(),
        proto,
        pad: 0,
    }
}

/// `discovery-probe MODE ADDR N` as a plain child of the test runner,
/// outside the test cgroup.
fn probe_outside(mode: &str, addr: SocketAddr, n: usize) -> Vec<Outcome> {
    let out = Command::new(PROBE)
        .args([mode, &addr.to_string(), &n.to_string()])
        .output()
        .expect("run the probe");
    assert!(out.status.success(), "probe failed: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("probe output is JSON"))
        .collect()
}

/// 127.0.0.1 and a TCP port nothing listens on.
fn free_tcp_frontend() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
}

/// 127.0.0.1 and a UDP port nothing is bound to.
fn free_udp_frontend() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("bind an ephemeral port")
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// Reads the load generator's lines until one satisfies `pred`, within
/// `timeout` (no polling: each read waits for the next line).
fn next_matching(
    load: &mut Load,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&Outcome) -> bool,
) -> Outcome {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Some(line) = load.next_line(left) else {
            break;
        };
        if let Ok(o) = serde_json::from_str::<Outcome>(&line) {
            if pred(&o) {
                return o;
            }
            last = Some(o);
        }
    }
    panic!("no attempt {what} within {timeout:?}; last: {last:?}")
}

/// The only process in the test cgroup.
fn only_pid_in(cg: &TestCgroup) -> u32 {
    let procs = fs::read_to_string(cg.path.join("cgroup.procs")).expect("read cgroup.procs");
    let pids: Vec<u32> = procs
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert_eq!(pids.len(), 1, "one process in the test cgroup: {pids:?}");
    pids[0]
}

/// Field 22 of /proc/PID/stat: start time in clock ticks since boot.
fn start_time(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // The command name (field 2) may hold spaces; fields after it are plain.
    let rest = &stat[stat.rfind(')').expect("comm in stat") + 1..];
    rest.split_whitespace()
        .nth(19)
        .and_then(|v| v.parse().ok())
        .expect("start time in stat")
}

#[test]
fn connect4_redirects_tcp_from_the_cgroup_and_getpeername_reports_the_frontend() {
    let mut p = Programs::attach("prog-tcp", &[CONNECT4, GETPEERNAME4]);
    let b = Backend::tcp("alpha", addr("127.0.0.2:0"));
    let frontend = free_tcp_frontend();
    p.service(frontend, IPPROTO_TCP, &[b.addr()]);

    let n = 10;
    for o in p.probe("tcp", frontend, n) {
        assert_eq!(o.backend.as_deref(), Some("alpha"), "{o:?}");
        assert_eq!(
            o.peer,
            Some(frontend.to_string()),
            "getpeername reports the frontend: {o:?}"
        );
    }
    assert_eq!(p.counter(Counter::ConnectRedirected), n as u64);
    assert!(p.counter(Counter::PeerRevNat) >= n as u64);
    assert_eq!(p.service_stats().connects, n as u64);

    // The same client outside the cgroup reaches the frontend address
    // itself, where nothing listens; the programs do not even run.
    let outside = probe_outside("tcp", frontend, 3);
    assert_eq!(
        tally(&outside),
        [(format!("errno {ECONNREFUSED}"), 3)].into(),
        "not redirected outside the cgroup: {outside:?}"
    );
    assert_eq!(p.counter(Counter::ConnectRedirected), n as u64);
}

#[test]
fn connect4_refuses_a_frontend_without_backends_at_once_and_counts_no_backend() {
    let mut p = Programs::attach("prog-nobackend", &[CONNECT4]);
    // Something listens on the frontend address itself, so a refusal can
    // only come from the program.
    let listener = Backend::tcp("the-frontend-itself", addr("127.0.0.1:0"));
    let frontend = listener.addr();
    p.service(frontend, IPPROTO_TCP, &[]);

    let n = 5;
    let outcomes = p.probe("tcp", frontend, n);
    for o in &outcomes {
        assert_eq!(o.errno, Some(ECONNREFUSED), "{o:?}");
        // Refused in the connect() call, not after a timeout.
        assert!(o.micros < 1_000_000, "refused at once: {o:?}");
    }
    assert_eq!(p.counter(Counter::NoBackend), n as u64);
    assert_eq!(p.service_stats().no_backend, n as u64);
    assert_eq!(p.counter(Counter::ConnectRedirected), 0);

    // Outside the cgroup the listener answers.
    let outside = probe_outside("tcp", frontend, 1);
    assert_eq!(
        outside[0].backend.as_deref(),
        Some("the-frontend-itself"),
        "{outside:?}"
    );
    assert_eq!(p.counter(Counter::NoBackend), n as u64);
}

#[test]
fn sendmsg4_redirects_udp_datagrams_and_recvmsg4_makes_replies_come_from_the_frontend() {
    let mut p = Programs::attach("prog-udp", &[SENDMSG4, RECVMSG4]);
    let b = Backend::udp("dns1", addr("127.0.0.3:0"));
    let frontend = free_udp_frontend();
    p.service(frontend, IPPROTO_UDP, &[b.addr()]);

    let n = 5;
    for o in p.probe("udp", frontend, n) {
        assert_eq!(o.backend.as_deref(), Some("dns1"), "{o:?}");
        assert_eq!(
            o.peer,
            Some(frontend.to_string()),
            "the reply's source is the frontend, not {}: {o:?}",
            b.addr()
        );
    }
    assert_eq!(p.counter(Counter::SendmsgRedirected), n as u64);
    assert!(p.counter(Counter::RecvmsgRevNat) >= n as u64);
    assert_eq!(p.service_stats().datagrams, n as u64);
}

#[test]
fn connect4_redirects_connected_udp_and_getpeername_reports_the_frontend() {
    let mut p = Programs::attach("prog-udpconn", &[CONNECT4, GETPEERNAME4]);
    let b = Backend::udp("dns2", addr("127.0.0.3:0"));
    let frontend = free_udp_frontend();
    p.service(frontend, IPPROTO_UDP, &[b.addr()]);

    let n = 5;
    for o in p.probe("udp-connected", frontend, n) {
        assert_eq!(o.backend.as_deref(), Some("dns2"), "{o:?}");
        assert_eq!(o.peer, Some(frontend.to_string()), "getpeername: {o:?}");
    }
    assert_eq!(p.counter(Counter::ConnectRedirected), n as u64);
    assert_eq!(p.counter(Counter::SendmsgRedirected), 0);
}

#[test]
fn a_process_in_the_exempt_map_is_not_redirected_until_it_is_removed() {
    let mut p = Programs::attach("prog-exempt", &[CONNECT4]);
    let b = Backend::tcp("alpha", addr("127.0.0.2:0"));
    // Nothing listens on the frontend: an exempt client is refused there.
    let frontend = free_tcp_frontend();
    p.service(frontend, IPPROTO_TCP, &[b.addr()]);

    // One long-running client (single-threaded: its tgid is its pid),
    // connecting back to back; stopped (killed) at the end of the test.
    let mut load = p.cg.start(PROBE, &["load", &frontend.to_string(), "60000"]);
    let wait = Duration::from_secs(5);
    let redirected = |o: &Outcome| o.backend.as_deref() == Some("alpha");
    let refused = |o: &Outcome| o.errno == Some(ECONNREFUSED);
    next_matching(
        &mut load,
        wait,
        "redirected before the exemption",
        redirected,
    );

    let pid = only_pid_in(&p.cg);
    p.exempt(pid, start_time(pid));
    let o = next_matching(&mut load, wait, "left alone once exempt", refused);
    assert_eq!(o.backend, None);
    assert!(p.exempt_calls() > 0, "exempt calls are counted");

    p.unexempt(pid);
    next_matching(
        &mut load,
        wait,
        "redirected after the exemption",
        redirected,
    );
    load.stop();
}
