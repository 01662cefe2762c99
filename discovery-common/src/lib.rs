//! Map layouts shared by the eBPF programs (`discovery-ebpf`) and the agent.
//!
//! This file is the single definition of what lives in the pinned maps. Every
//! type is `#[repr(C)]`, has explicit padding and no implicit holes, so the
//! kernel, the agent and `bpftool map dump` (through BTF) agree on each byte.
//!
//! Addresses are 16 bytes everywhere: IPv4 is stored IPv4-mapped
//! (`::ffff:a.b.c.d`), so IPv6 needs no layout change. Ports are stored in
//! host byte order so `bpftool` prints the number an operator expects.
//!
//! # Changing a layout
//!
//! A new agent migrates pinned maps of another layout or size with no gap
//! (the agent's `migrate` module), by copying each entry and converting its
//! value: zero-extended when the new layout is longer, truncated when it is
//! shorter. So a change must keep every map's key and kind, and may only
//! append fields to a value (zero meaning "unset") or drop its last ones.
//! Anything else is refused at start with the map and both layouts named.
//! The feature `layout-test` is such a change (a field appended to
//! [`ServiceStats`]), for the migration tests.
//!
//! # Hitless updates
//!
//! A service entry points at a *backend set* (`set_id`) and says how many
//! slots it has. The agent writes a change as: backends first, then the slots
//! of a brand-new set, then flips the service entry (one atomic map update),
//! then deletes the old set's slots and any backend no longer referenced. A
//! `connect()` therefore sees either the old set or the new one, never a mix.
#![no_std]

/// Names of the maps and programs in the eBPF object. Pinned files under the
/// pin directory carry the same names.
pub mod names {
    /// [`crate::ServiceKey`] → [`crate::Service`].
    pub const SERVICES: &str = "disc_services";
    /// [`crate::SlotKey`] → [`crate::Slot`].
    pub const SLOTS: &str = "disc_slots";
    /// Array indexed by backend id → [`crate::Backend`].
    pub const BACKENDS: &str = "disc_backends";
    /// Per-CPU array indexed by [`crate::Counter`] → `u64`.
    pub const COUNTERS: &str = "disc_counters";
    /// Socket-local storage: [`crate::SockRevNat`], freed with the socket.
    pub const REVNAT: &str = "disc_revnat";
    /// [`crate::BackendKey`] → [`crate::BackendHealth`]: connect outcomes
    /// of redirected TCP sockets, for passive checks.
    pub const BHEALTH: &str = "disc_bhealth";
    /// Per-CPU array indexed by `Service::stats_id` →
    /// [`crate::ServiceStats`].
    pub const SVC_STATS: &str = "disc_svc_stats";
    /// Per-CPU array indexed by backend id → [`crate::BackendStats`].
    pub const BACKEND_STATS: &str = "disc_backend_stats";
    /// LRU hash [`crate::ConsumerKey`] → `u64` calls: which workloads use
    /// which frontends.
    pub const CONSUMERS: &str = "disc_consumers";
    /// Per-CPU array of one [`crate::ConsumerCache`]: the last (frontend,
    /// cgroup) pair seen on the CPU and its calls not yet in CONSUMERS.
    pub const CONSUMER_CACHE: &str = "disc_consumer_cache";
    /// Hash of a process id (tgid) → [`crate::Exempt`]: the agent's and
    /// the announcers' own processes, whose calls are never redirected.
    pub const EXEMPT: &str = "disc_exempt";
    /// Per-CPU array of one `u64`: calls to a frontend from exempt
    /// processes, left alone.
    pub const EXEMPT_CALLS: &str = "disc_exempt_calls";
    /// Array of one [`crate::Config`]: settings the agent writes at start.
    pub const CONFIG: &str = "disc_config";
    /// LRU hash of a socket cookie → [`crate::RevNatEntry`]: the UDP
    /// sockets connect() redirected, and to what. sock_diag reports socket
    /// storage for TCP sockets only, so this is how the agent finds the
    /// connected UDP sockets of a backend that left.
    pub const UDP_CONNS: &str = "disc_udp_conns";

    /// The cgroup/sock_addr programs: (program name, pinned link name).
    pub const PROGRAMS: [(&str, &str); 8] = [
        ("disc_connect4", "link_connect4"),
        ("disc_sendmsg4", "link_sendmsg4"),
        ("disc_recvmsg4", "link_recvmsg4"),
        ("disc_getpeername4", "link_getpeername4"),
        ("disc_connect6", "link_connect6"),
        ("disc_sendmsg6", "link_sendmsg6"),
        ("disc_recvmsg6", "link_recvmsg6"),
        ("disc_getpeername6", "link_getpeername6"),
    ];

    /// The sock_ops program (connect timeouts, connect outcomes) and its
    /// pinned link.
    pub const SOCKOPS: (&str, &str) = ("disc_sockops", "link_sockops");
}

/// Kinds of map in [`MAPS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    Hash,
    LruHash,
    Array,
    PerCpuArray,
    /// Socket-local storage (no entry count).
    SkStorage,
}

/// How a map's entry count follows the agent's `--max-services` and
/// `--max-backends`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapSize {
    /// Fixed by the programs.
    Fixed(u32),
    /// `--max-services`.
    Services,
    /// `--max-services` + 1: an array indexed by ids from 1.
    ServicesPlusOne,
    /// `--max-backends` + 1: an array indexed by ids from 1 (0 is "none").
    BackendsPlusOne,
    /// `--max-backends` + room for one more full set of the largest
    /// service while it is replaced.
    Slots,
    /// Not counted (socket storage).
    Unsized,
}

impl MapSize {
    /// Entries for the given flags (0 for `Unsized`).
    pub const fn entries(self, max_services: u32, max_backends: u32) -> u32 {
        match self {
            MapSize::Fixed(n) => n,
            MapSize::Services => max_services,
            MapSize::ServicesPlusOne => max_services.saturating_add(1),
            MapSize::BackendsPlusOne => max_backends.saturating_add(1),
            MapSize::Slots => max_backends.saturating_add(DEFAULT_MAX_SLOTS - DEFAULT_MAX_BACKENDS),
            MapSize::Unsized => 0,
        }
    }

    /// Entries with the default flags: the size the programs declare.
    pub const fn default_entries(self) -> u32 {
        self.entries(DEFAULT_MAX_SERVICES, DEFAULT_MAX_BACKENDS)
    }

    /// Whether the agent sets the size at load time.
    pub const fn follows_flags(self) -> bool {
        !matches!(self, MapSize::Fixed(_) | MapSize::Unsized)
    }
}

/// One map of the programs: what the loader checks pinned maps against and
/// sizes at load, and what a unit test checks the built object against.
#[derive(Clone, Copy, Debug)]
pub struct MapSpec {
    pub name: &'static str,
    pub kind: MapKind,
    pub key_size: u32,
    pub value_size: u32,
    pub size: MapSize,
}

const fn spec<K, V>(name: &'static str, kind: MapKind, size: MapSize) -> MapSpec {
    MapSpec {
        name,
        kind,
        key_size: core::mem::size_of::<K>() as u32,
        value_size: core::mem::size_of::<V>() as u32,
        size,
    }
}

/// Every map the agent pins, in the order it creates them.
pub const MAPS: [MapSpec; 14] = [
    spec::<ServiceKey, Service>(names::SERVICES, MapKind::Hash, MapSize::Services),
    spec::<SlotKey, Slot>(names::SLOTS, MapKind::Hash, MapSize::Slots),
    spec::<u32, Backend>(names::BACKENDS, MapKind::Array, MapSize::BackendsPlusOne),
    spec::<u32, u64>(
        names::COUNTERS,
        MapKind::PerCpuArray,
        MapSize::Fixed(Counter::COUNT),
    ),
    spec::<i32, SockRevNat>(names::REVNAT, MapKind::SkStorage, MapSize::Unsized),
    spec::<BackendKey, BackendHealth>(
        names::BHEALTH,
        MapKind::Hash,
        MapSize::Fixed(DEFAULT_MAX_BACKENDS),
    ),
    spec::<u32, ServiceStats>(
        names::SVC_STATS,
        MapKind::PerCpuArray,
        MapSize::ServicesPlusOne,
    ),
    spec::<u32, BackendStats>(
        names::BACKEND_STATS,
        MapKind::PerCpuArray,
        MapSize::BackendsPlusOne,
    ),
    spec::<ConsumerKey, u64>(
        names::CONSUMERS,
        MapKind::LruHash,
        MapSize::Fixed(MAX_CONSUMERS),
    ),
    spec::<u32, ConsumerCache>(
        names::CONSUMER_CACHE,
        MapKind::PerCpuArray,
        MapSize::Fixed(1),
    ),
    spec::<u32, Exempt>(names::EXEMPT, MapKind::Hash, MapSize::Fixed(MAX_EXEMPT)),
    spec::<u32, u64>(names::EXEMPT_CALLS, MapKind::PerCpuArray, MapSize::Fixed(1)),
    spec::<u32, Config>(names::CONFIG, MapKind::Array, MapSize::Fixed(1)),
    spec::<u64, RevNatEntry>(
        names::UDP_CONNS,
        MapKind::LruHash,
        MapSize::Fixed(MAX_UDP_CONNS),
    ),
];

/// Entries of [`names::UDP_CONNS`]: connected UDP sockets tracked for
/// re-steering. The agent prunes closed sockets' entries at each sweep;
/// past this many live ones the oldest are evicted and no longer
/// re-steered.
pub const MAX_UDP_CONNS: u32 = 65_536;

/// The spec of map `name`, at compile time (the programs size their maps
/// with it).
pub const fn map_entries(name: &str) -> u32 {
    let mut i = 0;
    while i < MAPS.len() {
        if str_eq(MAPS[i].name, name) {
            return MAPS[i].size.default_entries();
        }
        i += 1;
    }
    panic!("no such map in MAPS")
}

const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Default map sizes; the agent overrides them with `--max-services` and
/// `--max-backends`.
pub const DEFAULT_MAX_SERVICES: u32 = 16_384;
pub const DEFAULT_MAX_BACKENDS: u32 = 262_144;
/// Slots are service/backend pairs; the map has room for one extra full set
/// of the largest service while it is being replaced.
pub const DEFAULT_MAX_SLOTS: u32 = DEFAULT_MAX_BACKENDS + 65_536;

/// `BPF_F_NO_PREALLOC`: hash maps only take memory for entries in use.
pub const BPF_F_NO_PREALLOC: usize = 1;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Entries per socket in [`SockRevNat`]: how many (frontend, backend) pairs
/// one UDP socket can talk to at once and still see replies from the
/// frontend address.
pub const REVNAT_ENTRIES: usize = 4;

/// A 16-byte address: IPv6, or IPv4 as `::ffff:a.b.c.d`. Word-aligned, so
/// equality compares four 32-bit words (safe code, one load per word)
/// instead of sixteen bytes; `bpftool` still prints the bytes.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialOrd, Ord)]
pub struct Addr16(pub [u8; 16]);

impl Addr16 {
    /// `::ffff:a.b.c.d` from the 4 address bytes in network order.
    #[inline(always)]
    pub const fn v4_mapped(o: [u8; 4]) -> Self {
        Self([
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, o[0], o[1], o[2], o[3],
        ])
    }

    /// The IPv4 address bytes if this is a v4-mapped address.
    #[inline(always)]
    pub const fn as_v4(&self) -> Option<[u8; 4]> {
        let a = &self.0;
        let w = self.words();
        if w[0] == 0 && w[1] == 0 && a[8] == 0 && a[9] == 0 && a[10] == 0xff && a[11] == 0xff {
            Some([a[12], a[13], a[14], a[15]])
        } else {
            None
        }
    }

    /// From the four words of a kernel context's IPv6 address
    /// (`user_ip6`, `remote_ip6`: network-order bytes in each word).
    #[inline(always)]
    pub const fn from_words(w: [u32; 4]) -> Self {
        let (a, b, c, d) = (
            w[0].to_ne_bytes(),
            w[1].to_ne_bytes(),
            w[2].to_ne_bytes(),
            w[3].to_ne_bytes(),
        );
        Self([
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
            d[2], d[3],
        ])
    }

    /// The four words, as [`from_words`](Self::from_words) takes them.
    #[inline(always)]
    pub const fn words(&self) -> [u32; 4] {
        let a = &self.0;
        [
            u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
            u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
            u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
            u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
        ]
    }
}

impl PartialEq for Addr16 {
    #[inline(always)]
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.words(), other.words());
        a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
    }
}

impl Eq for Addr16 {}

// By the bytes, as equality (equal words are equal bytes).
impl core::hash::Hash for Addr16 {
    fn hash<H: core::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

/// A frontend: the loopback address clients connect to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// IPv4-mapped or IPv6 address.
    pub addr: Addr16,
    /// Host byte order.
    pub port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    pub pad: u8,
}

/// Socket options the sock_ops program applies to a service's redirected
/// TCP sockets. Zero everywhere means "leave the kernel's defaults".
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct TcpOpts {
    /// The connect fails after this long (TCP_USER_TIMEOUT while in
    /// SYN_SENT, and a shorter initial RTO below 3 s so the SYN is retried
    /// within it); 0 keeps the kernel's SYN retries (about two minutes).
    pub connect_timeout_ms: u32,
    /// TCP_USER_TIMEOUT once established: data unacknowledged this long
    /// (or keepalive probes unanswered this long) fails the connection.
    pub user_timeout_ms: u32,
    /// SO_KEEPALIVE with TCP_KEEPIDLE in seconds; 0 leaves keepalive to the
    /// application.
    pub keepalive_idle_s: u16,
    /// TCP_KEEPINTVL in seconds (0: kernel default).
    pub keepalive_intvl_s: u16,
    /// TCP_KEEPCNT (0: kernel default).
    pub keepalive_probes: u16,
    pub pad: u16,
}

/// Service entry: which backend set is live and how many slots it has.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Service {
    /// Set id of the live slots; never reused while referenced.
    pub set_id: u32,
    /// Number of slots in the set; 0 means "no backend": connect fails with
    /// `ECONNREFUSED` at once.
    pub count: u32,
    /// Policy: [`SVC_F_CONSISTENT`], [`SVC_F_LEAST_CONN`] or 0 (weighted
    /// random).
    pub flags: u32,
    /// Index of the service's counters in [`names::SVC_STATS`] (0: none).
    /// Counters are arrays indexed by id, not hashes keyed by address: an
    /// array lookup is a few instructions on the connect() path.
    pub stats_id: u32,
    /// Copied into each redirected TCP socket for the sock_ops program.
    pub tcp: TcpOpts,
}

/// The slots are a Maglev table and the slot is chosen by a hash of the
/// client's cgroup id, so each workload sticks to one backend. Each slot
/// names one backend (`threshold` is `u32::MAX`, `alias == backend`).
pub const SVC_F_CONSISTENT: u32 = 1;

/// `least_conn`: connect() draws two backends (weighted) and takes the one
/// with fewer live connections (`BackendHealth::live`).
pub const SVC_F_LEAST_CONN: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub set_id: u32,
    /// 0..count.
    pub slot: u32,
}

/// One column of a Walker alias table: pick a uniformly random slot, then
/// `backend` if a second random `u32` is below `threshold`, else `alias`.
/// Weighted random choice in O(1) with exactly one slot per backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Backend id (index into the backends array).
    pub backend: u32,
    /// Backend id used when the draw is at or above `threshold`.
    pub alias: u32,
    /// Probability of `backend`, scaled to 2^32.
    pub threshold: u32,
    pub pad: u32,
}

/// A backend address. Array slot 0 is never used, so an all-zero entry is
/// simply "no backend".
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    pub addr: Addr16,
    /// Host byte order.
    pub port: u16,
    /// [`BACKEND_F_VALID`] when in use.
    pub flags: u16,
    /// Ejection in the kernel: 0, or the second of boot time
    /// (`bpf_ktime_get_boot_ns` / 10^9) until which connect() steers to
    /// another backend of the set. The sock_ops program sets it when the
    /// backend's failure streak reaches [`Config::passive_failures`] (for
    /// [`Config::eject_secs`]) and clears it when a connect to the backend
    /// succeeds. Past its second the mark stays as "on trial": connects go
    /// to the backend again, and its next failure ejects it at once. It
    /// expires by itself, so no agent (or one with other settings) can
    /// leave a backend out for good. Read in the same lookup as the
    /// address: ejection costs connect() nothing.
    pub ejected: u32,
}

pub const BACKEND_F_VALID: u16 = 1;

/// One (frontend, backend) pair a socket was redirected for, so replies
/// (`recvmsg`) and `getpeername` report the frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevNatEntry {
    pub backend_addr: Addr16,
    pub frontend_addr: Addr16,
    /// Host byte order; 0 marks an empty entry.
    pub backend_port: u16,
    pub frontend_port: u16,
    pub pad: u32,
}

/// Socket-local storage value: lives and dies with the socket, so there is
/// nothing to garbage-collect and no LRU to evict live entries. The agent
/// reads it over sock_diag (`INET_DIAG_REQ_SK_BPF_STORAGES`) to find the
/// sockets connect() redirected to a backend that left.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockRevNat {
    pub entries: [RevNatEntry; REVNAT_ENTRIES],
    /// Next entry to overwrite when all are taken.
    pub next: u32,
    /// `Service::stats_id` of the service this (TCP) socket connected to.
    pub stats_id: u32,
    /// The service's socket options, for the sock_ops program (TCP).
    pub tcp: TcpOpts,
    /// 1 + the index in `entries` of the pair the last redirected
    /// connect() wrote (TCP, connected UDP); 0 if connect() never went
    /// through a frontend (a socket that only sent datagrams).
    pub connected: u32,
    /// The backend id that connect() chose, for the sock_ops program's
    /// ejection (it checks the id still names the socket's peer).
    pub backend_id: u32,
}

/// Settings the agent writes into [`names::CONFIG`] at start.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// Failed connects in a row after which the sock_ops program ejects a
    /// backend ([`Backend::ejected`]); 0: the kernel never ejects.
    pub passive_failures: u32,
    /// How long a kernel ejection lasts, in seconds (`--passive-ejection`,
    /// at least 1).
    pub eject_secs: u32,
}

/// A backend address as a map key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub addr: Addr16,
    /// Host byte order.
    pub port: u16,
    pub pad: u16,
}

/// Connect outcomes of redirected TCP sockets to one backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendHealth {
    /// Failed connects since the last successful one.
    pub consecutive_failures: u32,
    /// Redirected TCP connections open now (established, not yet closed).
    pub live: u32,
    pub failures: u64,
    pub established: u64,
}

/// Traffic of one frontend, per CPU, at `Service::stats_id`. The agent
/// zeroes the entry when it gives the id to a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceStats {
    /// connect() calls redirected (TCP and connected UDP).
    pub connects: u64,
    /// Unconnected UDP datagrams redirected.
    pub datagrams: u64,
    /// connect()/sendmsg() refused because the service had no backend.
    pub no_backend: u64,
    /// Redirected TCP connects that failed (refused or timed out).
    pub connect_failed: u64,
    /// Only in the migration tests' other layout (feature `layout-test`):
    /// a field appended, as an upgrade would.
    #[cfg(feature = "layout-test")]
    pub layout_test: u64,
}

/// Traffic to one backend address, per CPU, at its backend id, summed over
/// the services that use it. Zeroed by the agent when it gives the id to
/// an address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendStats {
    /// connect() calls redirected to this backend.
    pub connects: u64,
    /// Unconnected UDP datagrams redirected to this backend.
    pub datagrams: u64,
}

/// A client workload (its cgroup) calling a frontend. The programs count
/// connect()/sendmsg() calls per key; the least recently used entries are
/// evicted when the map is full.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConsumerKey {
    pub service: ServiceKey,
    pub pad: u32,
    /// cgroup v2 id of the caller: the inode number of its cgroup directory.
    pub cgroup_id: u64,
}

/// Entries of [`names::CONSUMERS`].
pub const MAX_CONSUMERS: u32 = 65_536;

/// Room in [`names::EXEMPT`]: the agent and the announcers of one node.
pub const MAX_EXEMPT: u32 = 256;

/// A process whose calls to frontends are left alone, so that no etcd
/// write can redirect the agent's (or an announcer's) own connections to
/// etcd or to the backends it checks. Written by the process itself at
/// start and removed at exit; the agent prunes entries whose process is
/// gone (a pid reused by another process has another start time).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Exempt {
    /// The process's start time (field 22 of /proc/PID/stat, in clock
    /// ticks since boot).
    pub start_time: u64,
}

/// The last consumer pair seen on one CPU and its calls not yet added to
/// [`names::CONSUMERS`]: a workload calling one service over and over
/// costs an array lookup, not a hash update, per call. Readers add
/// `pending` of every CPU to the map's counts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsumerCache {
    pub key: ConsumerKey,
    pub pending: u64,
}

/// Indexes into the per-CPU counters map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// connect() to a frontend rewritten to a backend (TCP and connected UDP).
    ConnectRedirected = 0,
    /// Unconnected UDP datagrams rewritten to a backend.
    SendmsgRedirected = 1,
    /// connect()/sendmsg() to a frontend with no backend: failed at once.
    NoBackend = 2,
    /// Replies whose source was rewritten back to the frontend.
    RecvmsgRevNat = 3,
    /// getpeername() answers rewritten to the frontend.
    PeerRevNat = 4,
    /// A lookup raced a set flip and was retried against the new set.
    StaleRetry = 5,
    /// Socket storage could not be allocated; reply source not rewritten.
    RevNatAllocFailed = 6,
    /// Redirected TCP connects that failed (refused or timed out).
    ConnectFailed = 7,
    /// connect() calls steered away from a backend ejected in the kernel.
    EjectedSkip = 8,
    /// Backends the sock_ops program ejected.
    KernelEjection = 9,
}

impl Counter {
    pub const COUNT: u32 = 10;
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::ConnectRedirected,
        Counter::SendmsgRedirected,
        Counter::NoBackend,
        Counter::RecvmsgRevNat,
        Counter::PeerRevNat,
        Counter::StaleRetry,
        Counter::RevNatAllocFailed,
        Counter::ConnectFailed,
        Counter::EjectedSkip,
        Counter::KernelEjection,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::ConnectRedirected => "connect_redirected",
            Counter::SendmsgRedirected => "sendmsg_redirected",
            Counter::NoBackend => "no_backend",
            Counter::RecvmsgRevNat => "recvmsg_revnat",
            Counter::PeerRevNat => "peer_revnat",
            Counter::StaleRetry => "stale_retry",
            Counter::RevNatAllocFailed => "revnat_alloc_failed",
            Counter::ConnectFailed => "connect_failed",
            Counter::EjectedSkip => "ejected_skip",
            Counter::KernelEjection => "kernel_ejection",
        }
    }
}

/// `::ffff:a.b.c.d` from the 4 address bytes in network order.
#[inline(always)]
pub const fn v4_mapped(octets: [u8; 4]) -> Addr16 {
    Addr16::v4_mapped(octets)
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // Each type is repr(C), Copy, and made of integers (or arrays of them)
    // with explicit padding fields, so every bit pattern is a valid value
    // and there are no uninitialised bytes: what aya::Pod requires.
    macro_rules! pod {
        ($($t:ty),*) => {$(
            // SAFETY: see above.
            unsafe impl aya::Pod for $t {}
        )*};
    }
    pod!(
        ServiceKey,
        Service,
        SlotKey,
        Slot,
        Backend,
        SockRevNat,
        RevNatEntry,
        BackendKey,
        BackendHealth,
        TcpOpts,
        ServiceStats,
        BackendStats,
        ConsumerKey,
        ConsumerCache,
        Exempt,
        Config,
        Addr16
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(size_of::<TcpOpts>(), 16);
        assert_eq!(size_of::<Service>(), 32);
        assert_eq!(size_of::<SlotKey>(), 8);
        assert_eq!(size_of::<Slot>(), 16);
        assert_eq!(size_of::<Backend>(), 24);
        assert_eq!(size_of::<RevNatEntry>(), 40);
        assert_eq!(size_of::<SockRevNat>(), 40 * REVNAT_ENTRIES + 8 + 16 + 8);
        assert_eq!(size_of::<Config>(), 8);
        assert_eq!(size_of::<BackendKey>(), 20);
        assert_eq!(size_of::<BackendHealth>(), 24);
        assert_eq!(
            size_of::<ServiceStats>(),
            if cfg!(feature = "layout-test") {
                40
            } else {
                32
            }
        );
        assert_eq!(size_of::<BackendStats>(), 16);
        assert_eq!(size_of::<ConsumerKey>(), 32);
        assert_eq!(size_of::<ConsumerCache>(), 40);
    }

    #[test]
    fn addresses_are_word_aligned() {
        // The programs compare addresses in 4-byte words.
        use core::mem::{align_of, offset_of};
        assert!(align_of::<Backend>() >= 4 && offset_of!(Backend, addr) % 4 == 0);
        assert!(align_of::<RevNatEntry>() >= 4);
        assert_eq!(offset_of!(RevNatEntry, backend_addr) % 4, 0);
        assert_eq!(offset_of!(RevNatEntry, frontend_addr) % 4, 0);
        assert_eq!(offset_of!(SockRevNat, entries) % 4, 0);
        assert!(align_of::<ConsumerKey>() >= 4 && offset_of!(ConsumerKey, service) % 4 == 0);
        assert_eq!(offset_of!(ServiceKey, addr), 0);
    }

    #[test]
    fn the_map_table_names_every_pinned_map_once() {
        for (i, a) in MAPS.iter().enumerate() {
            assert!(
                MAPS[..i].iter().all(|b| b.name != a.name),
                "{} twice",
                a.name
            );
            assert!(a.name.starts_with("disc_"));
        }
        assert_eq!(map_entries(names::SLOTS), DEFAULT_MAX_SLOTS);
        assert_eq!(map_entries(names::BACKENDS), DEFAULT_MAX_BACKENDS + 1);
        assert_eq!(MapSize::Slots.entries(10, 100), 100 + 65_536);
    }

    #[test]
    fn v4_mapped_layout() {
        let a = v4_mapped([127, 0, 0, 1]);
        assert_eq!(&a.0[10..], &[0xff, 0xff, 127, 0, 0, 1]);
        assert!(a.0[..10].iter().all(|b| *b == 0));
        assert_eq!(a.as_v4(), Some([127, 0, 0, 1]));
        assert_eq!(Addr16([0; 16]).as_v4(), None);
        let mut v6 = [0u8; 16];
        v6[15] = 1;
        assert_eq!(Addr16(v6).as_v4(), None, "::1 is not v4-mapped");
        assert_eq!(a, v4_mapped([127, 0, 0, 1]));
        assert_ne!(a, v4_mapped([127, 0, 0, 2]));
        assert_eq!(core::mem::align_of::<Addr16>(), 4);
    }
}
