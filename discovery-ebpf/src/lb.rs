//! Service lookup and backend selection, apart from the hook glue (as
//! Cilium's bpf/lib/lb.h): one hash lookup for the service, one for the
//! slot, one array lookup for the backend.
use aya_ebpf::helpers::generated::{
    bpf_get_current_cgroup_id, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_boot_ns,
};
use discovery_common::{
    BACKEND_F_VALID, Backend, BackendKey, Counter, SVC_F_CONSISTENT, SVC_F_LEAST_CONN, ServiceKey,
    SlotKey, TcpOpts,
};

use crate::{
    maps::{BACKENDS, BHEALTH, SERVICES, SLOTS},
    stats,
};

/// Which hook asks: they draw differently and count differently.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// connect(): TCP and connected UDP, a fresh draw per call.
    Connect,
    /// sendmsg() on an unconnected UDP socket: the socket's cookie picks,
    /// so one socket keeps one backend while the set is unchanged.
    Sendmsg,
}

/// What a lookup of the destination found.
pub enum Pick {
    /// Not a frontend: leave the call alone.
    NotFrontend,
    /// A frontend with no backend (its stats id).
    NoBackend(u32),
    Backend(Picked),
}

/// A backend and what the caller needs of its service.
#[derive(Clone, Copy)]
pub struct Picked {
    pub backend: Backend,
    pub backend_id: u32,
    pub tcp: TcpOpts,
    pub flags: u32,
    pub stats_id: u32,
}

/// The backend for a call to `key` from `hook`, by the service's policy:
/// weighted random (`Connect`) or by socket cookie (`Sendmsg`); the
/// workload's slot under `consistent`; the less loaded of two draws under
/// `least_conn` (connect only).
#[inline(always)]
pub fn select(sock: *mut core::ffi::c_void, key: &ServiceKey, hook: Hook) -> Pick {
    let draw = |flags: u32| {
        if flags & SVC_F_CONSISTENT != 0 {
            workload_draw()
        } else if hook == Hook::Sendmsg {
            // SAFETY: `sock` is the hook's context, which this helper takes.
            let cookie = unsafe { bpf_get_socket_cookie(sock) };
            let h = mix(cookie ^ (u64::from(key.port) << 32));
            ((h >> 32) as u32, h as u32)
        } else {
            random_draw()
        }
    };
    let p = match pick(key, draw) {
        Pick::Backend(p) => p,
        other => return other,
    };
    if hook == Hook::Connect && p.flags & SVC_F_LEAST_CONN != 0 {
        // Power of two choices: a second weighted draw, and the one with
        // fewer live connections wins.
        if let Pick::Backend(other) = pick(key, |_| random_draw())
            && live(&other.backend) < live(&p.backend)
        {
            return Pick::Backend(other);
        }
    }
    Pick::Backend(p)
}

/// One service lookup, then a weighted choice: `draw` (given the service's
/// policy flags) gives two u32s, the first picks the slot, the second
/// decides between the slot's backend and its alias. It is only called for
/// a frontend with backends. A lookup that races a set flip (slot of the
/// old set already deleted) re-reads the service once and uses the new set.
#[inline(always)]
fn pick(key: &ServiceKey, draw: impl FnOnce(u32) -> (u32, u32)) -> Pick {
    // SAFETY: a lookup with a key on our stack; the value is copied out
    // field by field before any other map call.
    let Some(svc) = (unsafe { SERVICES.get(key) }) else {
        return Pick::NotFrontend;
    };
    let stats_id = svc.stats_id;
    if svc.count == 0 {
        return Pick::NoBackend(stats_id);
    }
    let flags = svc.flags;
    let (r1, r2) = draw(flags);
    let tcp = svc.tcp;
    let (mut set_id, mut count) = (svc.set_id, svc.count);
    let mut attempt = 0;
    while attempt < 2 {
        attempt += 1;
        let slot = ((u64::from(r1) * u64::from(count)) >> 32) as u32;
        if let Some((id, b)) = backend_at(set_id, slot, r2) {
            let (id, backend) = if !ejected_now(b) {
                (id, b)
            } else {
                // Ejected in the kernel: the next live slot, or this one if
                // every slot looked at is out (all ejected: use them all,
                // as the agent's fallback does).
                live_after(set_id, count, r1, r2).unwrap_or((id, b))
            };
            return Pick::Backend(Picked {
                backend: *backend,
                backend_id: id,
                tcp,
                flags,
                stats_id,
            });
        }
        stats::bump(Counter::StaleRetry);
        // SAFETY: as above.
        match unsafe { SERVICES.get(key) } {
            Some(s) if s.count > 0 => (set_id, count) = (s.set_id, s.count),
            Some(_) => return Pick::NoBackend(stats_id),
            None => return Pick::NotFrontend,
        }
    }
    Pick::NoBackend(stats_id)
}

/// Slots looked at past an ejected backend before falling back to it:
/// the agent takes an ejected backend out of the set within one poll, so
/// this mostly bridges that gap (and serves while no agent runs).
const MAX_PROBES: u32 = 8;

/// The valid backend a slot names for the draw `r2` (its backend or its
/// alias), with its id.
#[inline(always)]
fn backend_at(set_id: u32, slot: u32, r2: u32) -> Option<(u32, &'static Backend)> {
    // SAFETY: a lookup with a key on our stack; the slot is copied before
    // the next lookup.
    let slot = unsafe { SLOTS.get(SlotKey { set_id, slot }) }?;
    let id = if r2 < slot.threshold {
        slot.backend
    } else {
        slot.alias
    };
    let b = BACKENDS.get(id)?;
    (b.flags & BACKEND_F_VALID != 0).then_some((id, b))
}

/// Another slot's backend that is not ejected: slots in order from one
/// drawn afresh (from the call's own draw, so a workload under
/// `consistent` keeps its choice and random calls spread over the set
/// instead of all landing on the ejected slot's neighbour), at most
/// [`MAX_PROBES`] of them. Counted as an ejected skip when found.
#[inline(always)]
fn live_after(set_id: u32, count: u32, r1: u32, r2: u32) -> Option<(u32, &'static Backend)> {
    let start = (((mix(u64::from(r1) | (1 << 40)) >> 32) * u64::from(count)) >> 32) as u32;
    let mut k = 0;
    while k < MAX_PROBES && k < count {
        let s = (start + k) % count;
        if let Some((id, b)) = backend_at(set_id, s, r2)
            && !ejected_now(b)
        {
            stats::bump(Counter::EjectedSkip);
            return Some((id, b));
        }
        k += 1;
    }
    None
}

/// Whether a backend's kernel ejection is in force now. The clock is read
/// only for a marked backend.
#[inline(always)]
fn ejected_now(b: &Backend) -> bool {
    // SAFETY: a helper with no arguments.
    b.ejected != 0 && ((unsafe { bpf_ktime_get_boot_ns() } / 1_000_000_000) as u32) < b.ejected
}

/// Two u32s for a weighted draw from one helper call: the kernel's
/// random source costs tens of nanoseconds a call, and splitmix spreads
/// 32 random bits well enough over both halves.
#[inline(always)]
fn random_draw() -> (u32, u32) {
    // SAFETY: a helper with no arguments.
    let h = mix(u64::from(unsafe { bpf_get_prandom_u32() }));
    ((h >> 32) as u32, h as u32)
}

/// `consistent` policy: the slot comes from the caller's cgroup (its
/// workload), so every connection of a workload lands on the same backend.
/// Slots of a Maglev table name one backend, so the second draw is moot.
#[inline(always)]
fn workload_draw() -> (u32, u32) {
    // SAFETY: a helper with no arguments.
    let h = mix(unsafe { bpf_get_current_cgroup_id() });
    ((h >> 32) as u32, 0)
}

/// splitmix64 finaliser: spreads a cookie or a cgroup id over both halves.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Live connections to a backend, as the sock_ops program counts them.
#[inline(always)]
fn live(b: &Backend) -> u32 {
    let key = BackendKey {
        addr: b.addr,
        port: b.port,
        pad: 0,
    };
    // SAFETY: a lookup with a key on our stack; one u32 is read.
    unsafe { BHEALTH.get(key) }.map_or(0, |h| h.live)
}
