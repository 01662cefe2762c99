//! Typed access to the pinned BPF maps.
use std::{io, net::SocketAddr, path::Path};

use anyhow::Context as _;
use aya::maps::{
    Array, HashMap, IterableMap as _, Map, MapData, MapError as AyaMapError, PerCpuArray,
    PerCpuValues,
};
use discovery_common::{
    BACKEND_F_VALID, Backend, BackendHealth, BackendKey, BackendStats, ConsumerCache, ConsumerKey,
    Counter, Service, ServiceKey, ServiceStats, Slot, SlotKey, names,
};
use tracing::warn;

use crate::addr::Addr;

#[derive(Debug, thiserror::Error)]
#[error("{op} in map {map}: {source}")]
pub struct MapError {
    pub map: &'static str,
    pub op: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// What the reconciler needs from the maps. Implemented over the pinned BPF
/// maps (below) and by an in-memory fake in the reconciler's tests.
pub trait Dataplane {
    fn set_backend(&mut self, id: u32, b: Backend) -> Result<(), MapError>;
    fn clear_backend(&mut self, id: u32) -> Result<(), MapError>;
    /// A backend's kernel ejection mark (0: none; else a boot-time second).
    fn ejected_until(&self, id: u32) -> u32;
    fn set_slot(&mut self, key: SlotKey, slot: Slot) -> Result<(), MapError>;
    fn delete_slot(&mut self, key: SlotKey) -> Result<(), MapError>;
    fn set_service(&mut self, key: ServiceKey, svc: Service) -> Result<(), MapError>;
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), MapError>;
    /// Zeroes the counters at an id about to be given to a service or a
    /// backend address. Best effort: counters never hold up routing, so
    /// implementations log failures instead of returning them.
    fn reset_stats(&mut self, slot: StatsSlot);
    /// Service counter slots (ids are 1..capacity).
    fn service_stats_capacity(&self) -> u32;
    /// The maps were created empty by this agent: no id was ever handed
    /// out, so counters at never-used ids need no zeroing.
    fn fresh(&self) -> bool {
        false
    }
    /// Capacity of the backends array (ids are 1..capacity).
    fn backend_capacity(&self) -> u32;
    /// Everything currently in the maps.
    fn dump(&self) -> Result<Dump, MapError>;
}

/// A counters slot: a service's `stats_id` or a backend id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatsSlot {
    Service(u32),
    Backend(u32),
}

#[derive(Debug, Default, Clone)]
pub struct Dump {
    pub services: Vec<(ServiceKey, Service)>,
    pub slots: Vec<(SlotKey, Slot)>,
    /// Valid backend entries by id.
    pub backends: Vec<(u32, Backend)>,
}

pub struct BpfMaps {
    bhealth: HashMap<MapData, BackendKey, BackendHealth>,
    svc_stats: PerCpuArray<MapData, ServiceStats>,
    backend_stats: PerCpuArray<MapData, BackendStats>,
    consumer_cache: PerCpuArray<MapData, ConsumerCache>,
    consumers: HashMap<MapData, ConsumerKey, u64>,
    nr_cpus: usize,
    /// Created empty by this agent's load (see `Dataplane::fresh`).
    fresh: bool,
    services: HashMap<MapData, ServiceKey, Service>,
    slots: HashMap<MapData, SlotKey, Slot>,
    backends: Array<MapData, Backend>,
    counters: PerCpuArray<MapData, u64>,
    config: Array<MapData, discovery_common::Config>,
    udp_conns: HashMap<MapData, u64, discovery_common::RevNatEntry>,
    /// The socket storage, read over sock_diag (see `sockets`).
    revnat: MapData,
}

fn open(pin_dir: &Path, name: &str) -> anyhow::Result<Map> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("map {}", path.display()))
}

/// The errno behind an aya map error, so "map full" reads as such.
fn to_io(e: AyaMapError) -> io::Error {
    match e {
        AyaMapError::SyscallError(s) => s.io_error,
        other => io::Error::other(other.to_string()),
    }
}

fn err(map: &'static str, op: &'static str, e: AyaMapError) -> MapError {
    let source = to_io(e);
    let source = match source.raw_os_error() {
        Some(libc::E2BIG) => io::Error::other(format!(
            "map is full (raise --max-services / --max-backends): {source}"
        )),
        _ => source,
    };
    MapError { map, op, source }
}

impl BpfMaps {
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            bhealth: open(pin_dir, names::BHEALTH)?.try_into()?,
            svc_stats: open(pin_dir, names::SVC_STATS)?.try_into()?,
            backend_stats: open(pin_dir, names::BACKEND_STATS)?.try_into()?,
            consumers: open(pin_dir, names::CONSUMERS)?.try_into()?,
            consumer_cache: open(pin_dir, names::CONSUMER_CACHE)?.try_into()?,
            nr_cpus: aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?,
            fresh: false,
            services: open(pin_dir, names::SERVICES)?.try_into()?,
            slots: open(pin_dir, names::SLOTS)?.try_into()?,
            backends: open(pin_dir, names::BACKENDS)?.try_into()?,
            counters: open(pin_dir, names::COUNTERS)?.try_into()?,
            config: open(pin_dir, names::CONFIG)?.try_into()?,
            udp_conns: open(pin_dir, names::UDP_CONNS)?.try_into()?,
            revnat: {
                let path = pin_dir.join(names::REVNAT);
                MapData::from_pin(&path)
                    .with_context(|| format!("opening pinned map {}", path.display()))?
            },
        })
    }

    /// The socket storage map, for sock_diag dumps of redirected sockets.
    pub fn revnat_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd as _;
        self.revnat.fd().as_fd()
    }

    /// What connect() redirected the connected UDP socket with this
    /// cookie to, if it did ([`names::UDP_CONNS`]).
    pub fn udp_conn(&self, cookie: u64) -> Option<discovery_common::RevNatEntry> {
        self.udp_conns.get(&cookie, 0).ok()
    }

    /// The cookies in the UDP tracking map now.
    pub fn udp_conn_keys(&self) -> Vec<u64> {
        self.udp_conns.keys().filter_map(Result::ok).collect()
    }

    /// Removes these cookies' UDP tracking entries (sockets closed);
    /// returns how many went.
    pub fn remove_udp_conns(&mut self, cookies: &[u64]) -> usize {
        cookies
            .iter()
            .filter(|c| self.udp_conns.remove(c).is_ok())
            .count()
    }

    /// Writes the programs' settings ([`names::CONFIG`]).
    pub fn set_config(&mut self, c: discovery_common::Config) -> anyhow::Result<()> {
        self.config
            .set(0, c, 0)
            .with_context(|| format!("writing map {}", names::CONFIG))
    }

    /// Marks the maps as created empty by this agent: the reconciler then
    /// skips scanning the backends array for leftovers and zeroing
    /// counters no one has used.
    pub fn with_fresh(mut self, fresh: bool) -> Self {
        self.fresh = fresh;
        self
    }

    /// Backends whose connects failed `min` times in a row or more.
    pub fn failing_backends(&self, min: u32) -> Vec<(SocketAddr, u32)> {
        self.bhealth
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, h)| h.consecutive_failures >= min)
            .map(|(k, h)| {
                (
                    crate::addr::to_socket((k.addr, k.port)),
                    h.consecutive_failures,
                )
            })
            .collect()
    }

    /// Sets a backend's failure streak (for a trial after its ejection).
    pub fn set_failures(&mut self, addr: SocketAddr, streak: u32) {
        let (addr, port) = crate::addr::from_socket(addr);
        let key = BackendKey { addr, port, pad: 0 };
        if let Ok(mut h) = self.bhealth.get(&key, 0) {
            h.consecutive_failures = streak;
            let _ = self.bhealth.insert(key, h, 0);
        }
    }

    /// What the kernel routes and has counted, read straight from the
    /// maps (the agent need not run). Backends are read by id from the
    /// slots, not by scanning the whole backends array.
    pub fn view(&self) -> anyhow::Result<KernelView> {
        let ctx = |m: &str| format!("reading map {m}");
        let slots: std::collections::HashMap<SlotKey, Slot> = self
            .slots
            .iter()
            .collect::<Result<_, _>>()
            .with_context(|| ctx(names::SLOTS))?;
        let mut backend_cache: std::collections::HashMap<u32, Option<Addr>> = Default::default();
        let mut services = Vec::new();
        for r in self.services.iter() {
            let (key, svc) = r.with_context(|| ctx(names::SERVICES))?;
            let mut routed = Vec::new();
            for i in 0..svc.count {
                let Some(slot) = slots.get(&SlotKey {
                    set_id: svc.set_id,
                    slot: i,
                }) else {
                    continue;
                };
                for id in [slot.backend, slot.alias] {
                    let addr = *backend_cache.entry(id).or_insert_with(|| {
                        self.backends
                            .get(&id, 0)
                            .ok()
                            .filter(|b| b.flags & BACKEND_F_VALID != 0)
                            .map(|b| (b.addr, b.port))
                    });
                    if let Some(a) = addr
                        && !routed.contains(&a)
                    {
                        routed.push(a);
                    }
                }
            }
            routed.sort();
            let stats = match svc.stats_id {
                0 => ServiceStats::default(),
                id => self
                    .svc_stats
                    .get(&id, 0)
                    .map(|v| sum_services(v.iter()))
                    .with_context(|| ctx(names::SVC_STATS))?,
            };
            services.push(ServiceView {
                key,
                service: svc,
                routed,
                stats,
            });
        }
        services.sort_by_key(|s| s.key);
        let mut backends: std::collections::BTreeMap<Addr, BackendView> = Default::default();
        for (id, addr) in &backend_cache {
            let Some(addr) = addr else { continue };
            let per_cpu = self
                .backend_stats
                .get(id, 0)
                .with_context(|| ctx(names::BACKEND_STATS))?;
            let mut t = BackendStats::default();
            for v in per_cpu.iter() {
                t.connects += v.connects;
                t.datagrams += v.datagrams;
            }
            backends.entry(*addr).or_default().stats = t;
        }
        for r in self.bhealth.iter() {
            let (k, h) = r.with_context(|| ctx(names::BHEALTH))?;
            backends.entry((k.addr, k.port)).or_default().health = h;
        }
        let consumers = self.consumers()?;
        let usage = vec![
            (names::SERVICES, services.len(), self.services_capacity()),
            (names::SLOTS, slots.len(), self.slots_capacity()),
            (
                names::BACKENDS,
                backend_cache.values().flatten().count(),
                self.backends.len() as usize - 1,
            ),
            (names::CONSUMERS, consumers.len(), self.consumers_capacity()),
        ];
        Ok(KernelView {
            services,
            backends,
            consumers,
            counters: self.counters()?,
            usage,
        })
    }

    fn services_capacity(&self) -> usize {
        map_capacity(self.services.map())
    }

    fn slots_capacity(&self) -> usize {
        map_capacity(self.slots.map())
    }

    fn consumers_capacity(&self) -> usize {
        map_capacity(self.consumers.map())
    }

    /// Calls per (frontend, client cgroup): the LRU map plus what each
    /// CPU's cache holds back.
    pub fn consumers(&self) -> anyhow::Result<Vec<(ConsumerKey, u64)>> {
        let mut all: std::collections::HashMap<ConsumerKey, u64> = self
            .consumers
            .iter()
            .collect::<Result<_, _>>()
            .with_context(|| format!("reading map {}", names::CONSUMERS))?;
        let cached = self
            .consumer_cache
            .get(&0, 0)
            .with_context(|| format!("reading map {}", names::CONSUMER_CACHE))?;
        for c in cached.iter().filter(|c| c.pending > 0) {
            *all.entry(c.key).or_default() += c.pending;
        }
        Ok(all.into_iter().collect())
    }

    /// Global counters summed over CPUs, by name.
    pub fn counters(&self) -> anyhow::Result<Vec<(&'static str, u64)>> {
        Counter::ALL
            .iter()
            .map(|c| {
                let per_cpu = self
                    .counters
                    .get(&(*c as u32), 0)
                    .with_context(|| format!("reading counter {}", c.name()))?;
                Ok((c.name(), per_cpu.iter().sum()))
            })
            .collect()
    }
}

/// Zeroes one index of a per-CPU counters array.
fn zero<V: aya::Pod + Default>(
    map: &mut PerCpuArray<MapData, V>,
    nr_cpus: usize,
    index: u32,
) -> io::Result<()> {
    let zero = PerCpuValues::try_from(vec![V::default(); nr_cpus])?;
    map.set(index, zero, 0).map_err(to_io)
}

impl Dataplane for BpfMaps {
    fn reset_stats(&mut self, slot: StatsSlot) {
        let (map, r) = match slot {
            StatsSlot::Service(id) => (
                names::SVC_STATS,
                zero(&mut self.svc_stats, self.nr_cpus, id),
            ),
            StatsSlot::Backend(id) => (
                names::BACKEND_STATS,
                zero(&mut self.backend_stats, self.nr_cpus, id),
            ),
        };
        if let Err(error) = r {
            warn!(map, ?slot, %error, "counters not zeroed");
        }
    }

    fn service_stats_capacity(&self) -> u32 {
        self.svc_stats.len()
    }

    fn fresh(&self) -> bool {
        self.fresh
    }

    fn set_backend(&mut self, id: u32, b: Backend) -> Result<(), MapError> {
        self.backends
            .set(id, b, 0)
            .map_err(|e| err(names::BACKENDS, "write backend", e))
    }

    fn ejected_until(&self, id: u32) -> u32 {
        self.backends.get(&id, 0).map_or(0, |b| b.ejected)
    }

    fn clear_backend(&mut self, id: u32) -> Result<(), MapError> {
        let empty = Backend {
            addr: discovery_common::Addr16::default(),
            port: 0,
            flags: 0,
            ejected: 0,
        };
        self.backends
            .set(id, empty, 0)
            .map_err(|e| err(names::BACKENDS, "clear backend", e))
    }

    fn set_slot(&mut self, key: SlotKey, slot: Slot) -> Result<(), MapError> {
        self.slots
            .insert(key, slot, 0)
            .map_err(|e| err(names::SLOTS, "write slot", e))
    }

    fn delete_slot(&mut self, key: SlotKey) -> Result<(), MapError> {
        match self.slots.remove(&key) {
            Ok(()) | Err(AyaMapError::KeyNotFound) => Ok(()),
            Err(e) => Err(err(names::SLOTS, "delete slot", e)),
        }
    }

    fn set_service(&mut self, key: ServiceKey, svc: Service) -> Result<(), MapError> {
        self.services
            .insert(key, svc, 0)
            .map_err(|e| err(names::SERVICES, "write service", e))
    }

    fn delete_service(&mut self, key: ServiceKey) -> Result<(), MapError> {
        match self.services.remove(&key) {
            Ok(()) | Err(AyaMapError::KeyNotFound) => Ok(()),
            Err(e) => Err(err(names::SERVICES, "delete service", e)),
        }
    }

    fn backend_capacity(&self) -> u32 {
        self.backends.len()
    }

    fn dump(&self) -> Result<Dump, MapError> {
        let services = self
            .services
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|e| err(names::SERVICES, "dump", e))?;
        let slots = self
            .slots
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|e| err(names::SLOTS, "dump", e))?;
        let mut backends = Vec::new();
        // A new array holds nothing: skip reading every entry of it.
        let scan = if self.fresh { 0 } else { usize::MAX };
        for (id, b) in self.backends.iter().enumerate().take(scan) {
            let b = b.map_err(|e| err(names::BACKENDS, "dump", e))?;
            if b.flags & BACKEND_F_VALID != 0 {
                backends.push((id as u32, b));
            }
        }
        Ok(Dump {
            services,
            slots,
            backends,
        })
    }
}

fn map_capacity(m: &MapData) -> usize {
    m.info().map(|i| i.max_entries() as usize).unwrap_or(0)
}

fn sum_services<'a>(per_cpu: impl Iterator<Item = &'a ServiceStats>) -> ServiceStats {
    let mut t = ServiceStats::default();
    for v in per_cpu {
        t.connects += v.connects;
        t.datagrams += v.datagrams;
        t.no_backend += v.no_backend;
        t.connect_failed += v.connect_failed;
    }
    t
}

/// One frontend as the kernel sees it.
#[derive(Debug, Clone)]
pub struct ServiceView {
    pub key: ServiceKey,
    pub service: Service,
    /// Backends a connect() can reach now (from the live slot set).
    pub routed: Vec<Addr>,
    pub stats: ServiceStats,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct BackendView {
    pub stats: BackendStats,
    pub health: BackendHealth,
}

/// Everything `status` and the metrics read from the kernel.
#[derive(Debug, Clone)]
pub struct KernelView {
    pub services: Vec<ServiceView>,
    pub backends: std::collections::BTreeMap<Addr, BackendView>,
    pub consumers: Vec<(ConsumerKey, u64)>,
    pub counters: Vec<(&'static str, u64)>,
    /// (map, entries in use, capacity).
    pub usage: Vec<(&'static str, usize, usize)>,
}
