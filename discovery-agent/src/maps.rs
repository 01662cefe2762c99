//! Typed access to the pinned BPF maps.
use std::{io, net::SocketAddrV4, path::Path};

use anyhow::Context as _;
use aya::maps::{Array, HashMap, Map, MapData, MapError as AyaMapError, PerCpuArray};
use discovery_common::{
    BACKEND_F_VALID, Backend, BackendHealth, BackendKey, Counter, Service, ServiceKey, Slot,
    SlotKey, names, v4_mapped,
};

use crate::reconcile::{Dataplane, Dump, MapError};

pub struct BpfMaps {
    bhealth: HashMap<MapData, BackendKey, BackendHealth>,
    services: HashMap<MapData, ServiceKey, Service>,
    slots: HashMap<MapData, SlotKey, Slot>,
    backends: Array<MapData, Backend>,
    counters: PerCpuArray<MapData, u64>,
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
            services: open(pin_dir, names::SERVICES)?.try_into()?,
            slots: open(pin_dir, names::SLOTS)?.try_into()?,
            backends: open(pin_dir, names::BACKENDS)?.try_into()?,
            counters: open(pin_dir, names::COUNTERS)?.try_into()?,
        })
    }

    /// Backends whose connects failed `min` times in a row or more.
    pub fn failing_backends(&self, min: u32) -> Vec<(SocketAddrV4, u32)> {
        self.bhealth
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, h)| h.consecutive_failures >= min)
            .filter_map(|(k, h)| {
                let a = k.addr;
                (a[..12] == v4_mapped([0; 4])[..12]).then(|| {
                    let ip = std::net::Ipv4Addr::new(a[12], a[13], a[14], a[15]);
                    (SocketAddrV4::new(ip, k.port), h.consecutive_failures)
                })
            })
            .collect()
    }

    /// Starts a backend's failure streak over.
    pub fn reset_failures(&mut self, addr: SocketAddrV4) {
        let key = BackendKey {
            addr: v4_mapped(addr.ip().octets()),
            port: addr.port(),
            pad: 0,
        };
        if let Ok(mut h) = self.bhealth.get(&key, 0) {
            h.consecutive_failures = 0;
            let _ = self.bhealth.insert(key, h, 0);
        }
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

impl Dataplane for BpfMaps {
    fn set_backend(&mut self, id: u32, b: Backend) -> Result<(), MapError> {
        self.backends
            .set(id, b, 0)
            .map_err(|e| err(names::BACKENDS, "write backend", e))
    }

    fn clear_backend(&mut self, id: u32) -> Result<(), MapError> {
        let empty = Backend {
            addr: [0; 16],
            port: 0,
            flags: 0,
            pad: 0,
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
        for (id, b) in self.backends.iter().enumerate() {
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
