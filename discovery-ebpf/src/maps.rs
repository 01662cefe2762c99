//! Every map the programs use, and the one global the agent sets at load.
//! Layouts, names and sizes come from `discovery-common`'s `MAPS` table
//! (the default sizes here; the agent resizes the maps whose size follows
//! a flag before loading). A unit test in the agent checks the built
//! object against the table. `#[btf_map]` needs literal names: they must
//! match `names`, which that test also checks.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, SkStorage},
    macros::btf_map,
};
use discovery_common::{
    BPF_F_NO_PREALLOC, Backend, BackendHealth, BackendKey, BackendStats, Config, ConsumerCache,
    ConsumerKey, Exempt, RevNatEntry, Service, ServiceKey, ServiceStats, Slot, SlotKey, SockRevNat,
    map_entries, names,
};

#[btf_map(name = "disc_services")]
pub static SERVICES: HashMap<
    ServiceKey,
    Service,
    { map_entries(names::SERVICES) as usize },
    BPF_F_NO_PREALLOC,
> = HashMap::new();

#[btf_map(name = "disc_slots")]
pub static SLOTS: HashMap<
    SlotKey,
    Slot,
    { map_entries(names::SLOTS) as usize },
    BPF_F_NO_PREALLOC,
> = HashMap::new();

#[btf_map(name = "disc_backends")]
pub static BACKENDS: Array<Backend, { map_entries(names::BACKENDS) as usize }> = Array::new();

#[btf_map(name = "disc_counters")]
pub static COUNTERS: PerCpuArray<u64, { map_entries(names::COUNTERS) as usize }> =
    PerCpuArray::new();

#[btf_map(name = "disc_revnat")]
pub static REVNAT: SkStorage<SockRevNat> = SkStorage::new();

#[btf_map(name = "disc_svc_stats")]
pub static SVC_STATS: PerCpuArray<ServiceStats, { map_entries(names::SVC_STATS) as usize }> =
    PerCpuArray::new();

#[btf_map(name = "disc_backend_stats")]
pub static BACKEND_STATS: PerCpuArray<
    BackendStats,
    { map_entries(names::BACKEND_STATS) as usize },
> = PerCpuArray::new();

#[btf_map(name = "disc_consumer_cache")]
pub static CONSUMER_CACHE: PerCpuArray<
    ConsumerCache,
    { map_entries(names::CONSUMER_CACHE) as usize },
> = PerCpuArray::new();

#[btf_map(name = "disc_consumers")]
pub static CONSUMERS: LruHashMap<ConsumerKey, u64, { map_entries(names::CONSUMERS) as usize }> =
    LruHashMap::new();

#[btf_map(name = "disc_exempt")]
pub static EXEMPT: HashMap<u32, Exempt, { map_entries(names::EXEMPT) as usize }> = HashMap::new();

#[btf_map(name = "disc_exempt_calls")]
pub static EXEMPT_CALLS: PerCpuArray<u64, { map_entries(names::EXEMPT_CALLS) as usize }> =
    PerCpuArray::new();

#[btf_map(name = "disc_bhealth")]
pub static BHEALTH: HashMap<
    BackendKey,
    BackendHealth,
    { map_entries(names::BHEALTH) as usize },
    BPF_F_NO_PREALLOC,
> = HashMap::new();

#[btf_map(name = "disc_config")]
pub static CONFIG: Array<Config, { map_entries(names::CONFIG) as usize }> = Array::new();

#[btf_map(name = "disc_udp_conns")]
pub static UDP_CONNS: LruHashMap<u64, RevNatEntry, { map_entries(names::UDP_CONNS) as usize }> =
    LruHashMap::new();

/// Kernel ticks per second (CONFIG_HZ), set by the agent at load time: the
/// initial RTO a sock_ops program returns is in jiffies. 0: unknown, so
/// connect timeouts keep the kernel's 1 s initial RTO.
#[unsafe(no_mangle)]
pub static HZ: u32 = 0;
