//! Counters: global and per-service/per-backend ones are per-CPU array
//! slots (no other writer while a program runs on that CPU); the consumer
//! map is shared by all CPUs, so it is added to atomically.
use aya_ebpf::helpers::generated::bpf_get_current_cgroup_id;
use discovery_common::{BackendStats, ConsumerKey, Counter, ServiceKey, ServiceStats};

use crate::{
    atomic,
    maps::{BACKEND_STATS, CONSUMER_CACHE, CONSUMERS, COUNTERS, SVC_STATS},
};

#[inline(always)]
pub fn bump(counter: Counter) {
    if let Some(v) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: this CPU's slot of a per-CPU array; nothing else writes it
        // while this program runs.
        unsafe { *v += 1 };
    }
}

/// Adds to a service's per-CPU stats.
#[inline(always)]
pub fn service(stats_id: u32, f: impl FnOnce(&mut ServiceStats)) {
    if stats_id != 0
        && let Some(s) = SVC_STATS.get_ptr_mut(stats_id)
    {
        // SAFETY: as in `bump`: a per-CPU slot, ours alone while we run.
        f(unsafe { &mut *s });
    }
}

/// Adds to a backend's per-CPU stats, by backend id.
#[inline(always)]
pub fn backend(id: u32, f: impl FnOnce(&mut BackendStats)) {
    if let Some(s) = BACKEND_STATS.get_ptr_mut(id) {
        // SAFETY: as in `bump`: a per-CPU slot, ours alone while we run.
        f(unsafe { &mut *s });
    }
}

/// Counts a call of the current cgroup to a frontend ("who talks to
/// whom"). Calls of the same pair in a row only bump this CPU's cache;
/// the shared LRU map is added to (atomically) when the pair changes.
#[inline(always)]
pub fn consumed(service: &ServiceKey) {
    let key = ConsumerKey {
        service: *service,
        pad: 0,
        // SAFETY: a helper with no arguments, allowed in these programs.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
    };
    let Some(c) = CONSUMER_CACHE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's only slot of a per-CPU array.
    let c = unsafe { &mut *c };
    if c.pending > 0 && c.key.service.port == key.service.port && same(&c.key, &key) {
        c.pending += 1;
        return;
    }
    if c.pending > 0 {
        match CONSUMERS.get_ptr_mut(c.key) {
            // SAFETY: a live value of the map; other CPUs add to it too,
            // hence the atomic add.
            Some(n) => unsafe { atomic::add_u64(n, c.pending) },
            None => {
                let _ = CONSUMERS.insert(c.key, c.pending, 0);
            }
        }
    }
    c.key = key;
    c.pending = 1;
}

#[inline(always)]
fn same(a: &ConsumerKey, b: &ConsumerKey) -> bool {
    a.cgroup_id == b.cgroup_id
        && a.service.port == b.service.port
        && a.service.proto == b.service.proto
        && a.service.addr == b.service.addr
}
