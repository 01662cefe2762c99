//! The sock_ops program's work on sockets connect4 redirected: applies the
//! service's connect timeout while connecting (the kernel clamps SYN
//! retransmits to TCP_USER_TIMEOUT), then its keepalive and user timeout
//! once established, and records connect outcomes and live connections per
//! backend for passive checks and `least_conn`, ejecting a backend whose
//! connects keep failing. Those counters are shared by
//! every CPU, so they change atomically.
use aya_ebpf::{
    bindings::{
        BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TIMEOUT_INIT,
        BPF_TCP_CLOSE, BPF_TCP_SYN_SENT,
    },
    helpers::generated::{bpf_ktime_get_boot_ns, bpf_setsockopt, bpf_sk_storage_get},
    programs::SockOpsContext,
};
use discovery_common::{Addr16, Backend, BackendHealth, BackendKey, Counter, SockRevNat};

use crate::{
    atomic,
    maps::{BACKENDS, BHEALTH, CONFIG, HZ, REVNAT},
    stats,
};

const SOL_SOCKET: i32 = 1;
const SO_KEEPALIVE: i32 = 9;
const SOL_TCP: i32 = 6;
const TCP_KEEPIDLE: i32 = 4;
const TCP_KEEPINTVL: i32 = 5;
const TCP_KEEPCNT: i32 = 6;
const TCP_USER_TIMEOUT: i32 = 18;

/// Connect timeouts below this get a shorter initial RTO, so the SYN is
/// retransmitted (twice) before the timeout instead of once at 1 s.
const SHORT_CONNECT_TIMEOUT_MS: u32 = 3_000;

#[inline(always)]
pub fn handle(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_TIMEOUT_INIT => {
            // The reply is the initial RTO in jiffies; left alone (0), the
            // kernel uses 1 s, and other programs' replies stand.
            // SAFETY: a read of a global the loader may have rewritten.
            let hz = unsafe { core::ptr::read_volatile(&HZ) };
            let Some(st) = redirected(ctx) else { return };
            let t = st.tcp.connect_timeout_ms;
            if hz > 0 && t > 0 && t < SHORT_CONNECT_TIMEOUT_MS {
                let jiffies = (u64::from(t / 3) * u64::from(hz) / 1000).max(1);
                ctx.set_reply(jiffies as u32);
            }
        }
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            let Some(st) = redirected(ctx) else { return };
            // State changes of this socket tell how the connect ended.
            let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
            if st.tcp.connect_timeout_ms > 0 {
                setsockopt(ctx, SOL_TCP, TCP_USER_TIMEOUT, st.tcp.connect_timeout_ms);
            }
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let Some(st) = redirected(ctx) else { return };
            let tcp = st.tcp;
            if tcp.connect_timeout_ms > 0 || tcp.user_timeout_ms > 0 {
                // The connect timeout is not a timeout for the connection.
                setsockopt(ctx, SOL_TCP, TCP_USER_TIMEOUT, tcp.user_timeout_ms);
            }
            if tcp.keepalive_idle_s > 0 {
                setsockopt(ctx, SOL_SOCKET, SO_KEEPALIVE, 1);
                setsockopt(ctx, SOL_TCP, TCP_KEEPIDLE, tcp.keepalive_idle_s.into());
                if tcp.keepalive_intvl_s > 0 {
                    setsockopt(ctx, SOL_TCP, TCP_KEEPINTVL, tcp.keepalive_intvl_s.into());
                }
                if tcp.keepalive_probes > 0 {
                    setsockopt(ctx, SOL_TCP, TCP_KEEPCNT, tcp.keepalive_probes.into());
                }
            }
            let fresh = BackendHealth {
                consecutive_failures: 0,
                live: 1,
                failures: 0,
                established: 1,
            };
            let peer = peer(ctx);
            with_health(&peer, fresh, |h| {
                // SAFETY: `h` points at a live map value (see `with_health`).
                unsafe {
                    atomic::store_u32(&raw mut (*h).consecutive_failures, 0);
                    atomic::add_u64(&raw mut (*h).established, 1);
                    atomic::add_u32(&raw mut (*h).live, 1);
                }
            });
            // A backend that accepts connections is not dead.
            if let Some(b) = own_backend(st.backend_id, &peer)
                // SAFETY: a live map value; other CPUs change it too.
                && unsafe { core::ptr::read_volatile(&raw const (*b).ejected) } != 0
            {
                // SAFETY: as above.
                unsafe { atomic::store_u32(&raw mut (*b).ejected, 0) };
            }
        }
        BPF_SOCK_OPS_STATE_CB => {
            // Only sockets that got the flag above: redirected ones.
            let (old, new) = (ctx.arg(0), ctx.arg(1));
            if new == BPF_TCP_CLOSE && old != BPF_TCP_SYN_SENT && old != BPF_TCP_CLOSE {
                // An established connection ended (it was counted live).
                if let Some(h) = BHEALTH.get_ptr_mut(peer(ctx)) {
                    // SAFETY: a live map value; other CPUs change it too.
                    unsafe { dec_live(h) };
                }
            }
            if old == BPF_TCP_SYN_SENT && new == BPF_TCP_CLOSE {
                stats::bump(Counter::ConnectFailed);
                if let Some(st) = redirected(ctx) {
                    stats::service(st.stats_id, |s| s.connect_failed += 1);
                }
                let fresh = BackendHealth {
                    consecutive_failures: 1,
                    live: 0,
                    failures: 1,
                    established: 0,
                };
                let peer = peer(ctx);
                with_health(&peer, fresh, |h| {
                    // SAFETY: `h` points at a live map value.
                    unsafe {
                        atomic::add_u32(&raw mut (*h).consecutive_failures, 1);
                        atomic::add_u64(&raw mut (*h).failures, 1);
                    }
                });
                if let Some(st) = redirected(ctx) {
                    eject_if_failing(st.backend_id, &peer);
                }
            }
        }
        _ => {}
    }
}

// `dec_live` treats the first 8 bytes as one word: (failures streak, live).
const _: () = assert!(
    core::mem::offset_of!(BackendHealth, consecutive_failures) == 0
        && core::mem::offset_of!(BackendHealth, live) == 4
        && core::mem::align_of::<BackendHealth>() == 8
        && cfg!(target_endian = "little")
);

/// `live -= 1` unless it is 0 (a connection counted before the agent reset
/// the entry must not wrap it): a compare-and-swap of the word holding the
/// failure streak and `live`, since the BPF target only swaps 64 bits. Two
/// CPUs closing at once cannot take it below 0; after a few lost races it
/// gives up (the count is then one too high until the next close).
///
/// # Safety
/// `h` must point at a live map value.
#[inline(always)]
unsafe fn dec_live(h: *mut BackendHealth) {
    let word = h.cast::<u64>();
    let mut tries = 0;
    while tries < 4 {
        tries += 1;
        // SAFETY: the caller's contract; offset 0 is 8-byte aligned.
        let cur = unsafe { core::ptr::read_volatile(word) };
        // Little-endian: `live`, at offset 4, is the high half.
        if cur >> 32 == 0 {
            return;
        }
        // SAFETY: as above.
        if unsafe { atomic::cas_u64(word, cur, cur - (1 << 32)) } {
            return;
        }
    }
}

/// Ejects the backend (see [`discovery_common::Backend::ejected`]) once
/// its failure streak reaches the agent's threshold, or at the first
/// failure on trial after an ejection: from the next connect() on, no
/// round trip through the agent.
#[inline(always)]
fn eject_if_failing(backend_id: u32, peer: &BackendKey) {
    let Some(c) = CONFIG.get(0) else { return };
    let (threshold, secs) = (c.passive_failures, c.eject_secs.max(1));
    if threshold == 0 {
        return;
    }
    let Some(b) = own_backend(backend_id, peer) else {
        return;
    };
    // SAFETY: a live map value; other CPUs change it too.
    let mark = unsafe { core::ptr::read_volatile(&raw const (*b).ejected) };
    // SAFETY: a lookup with a key on our stack; one u32 is read.
    let streak = unsafe { BHEALTH.get(peer) }.map_or(0, |h| h.consecutive_failures);
    if mark == 0 && streak < threshold {
        return;
    }
    // SAFETY: a helper with no arguments.
    let now = (unsafe { bpf_ktime_get_boot_ns() } / 1_000_000_000) as u32;
    if mark <= now {
        stats::bump(Counter::KernelEjection);
    }
    // SAFETY: as above.
    unsafe { atomic::store_u32(&raw mut (*b).ejected, now.saturating_add(secs)) };
}

/// The backends-array entry `id` if it still names `peer` (the agent may
/// have given the id to another address since the socket connected).
#[inline(always)]
fn own_backend(id: u32, peer: &BackendKey) -> Option<*mut Backend> {
    let b = BACKENDS.get_ptr_mut(id)?;
    // SAFETY: a live map value; the address is only written by the agent
    // when it gives the id to an address.
    let (addr, port) = unsafe { ((*b).addr, (*b).port) };
    (port == peer.port && addr == peer.addr).then_some(b)
}

/// Applies `f` to a backend's entry, or creates it as `fresh` (the values
/// `f` would have given a zeroed entry). Two CPUs may create it at once:
/// the one whose insert loses applies `f` to the winner's entry.
#[inline(always)]
fn with_health(key: &BackendKey, fresh: BackendHealth, f: impl Fn(*mut BackendHealth)) {
    if let Some(h) = BHEALTH.get_ptr_mut(key) {
        f(h);
        return;
    }
    if BHEALTH.insert(key, fresh, u64::from(BPF_NOEXIST)).is_err()
        && let Some(h) = BHEALTH.get_ptr_mut(key)
    {
        f(h);
    }
}

/// The socket storage of a sock_ops socket, if connect4 redirected it.
#[inline(always)]
fn redirected(ctx: &SockOpsContext) -> Option<&'static SockRevNat> {
    // SAFETY: the kernel passes a valid bpf_sock_ops for the program's run.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // The same map the sock_addr programs use, by its definition's address
    // (what aya-ebpf's SkStorage does for sock_addr contexts).
    let map = core::ptr::from_ref(&REVNAT).cast_mut().cast();
    // SAFETY: `sk` is the context's full socket (checked non-null); no
    // flags: look up only, never create.
    let st = unsafe { bpf_sk_storage_get(map, sk.cast(), core::ptr::null_mut(), 0) };
    // SAFETY: null or this socket's storage, valid while the program runs.
    (!st.is_null()).then(|| unsafe { &*st.cast::<SockRevNat>() })
}

/// The peer of a sock_ops socket as a backend key.
#[inline(always)]
fn peer(ctx: &SockOpsContext) -> BackendKey {
    // remote_port holds the network-order port in its upper 16 bits.
    let port = u16::from_be((ctx.remote_port() >> 16) as u16);
    // An AF_INET6 socket's peer, v4-mapped for an IPv4 peer of a
    // dual-stack socket: the form the maps key backends by.
    let addr = if ctx.family() == AF_INET6 {
        // One load per word at a constant offset of the context: the
        // verifier refuses loads through a moved context pointer, which a
        // copy of the whole array compiles to.
        // SAFETY: the kernel passes a valid bpf_sock_ops for the program's
        // run; remote_ip6 is readable in every sock_ops callback.
        let w = unsafe {
            let ip6 = core::ptr::addr_of!((*ctx.ops).remote_ip6);
            [
                core::ptr::read_volatile(core::ptr::addr_of!((*ip6)[0])),
                core::ptr::read_volatile(core::ptr::addr_of!((*ip6)[1])),
                core::ptr::read_volatile(core::ptr::addr_of!((*ip6)[2])),
                core::ptr::read_volatile(core::ptr::addr_of!((*ip6)[3])),
            ]
        };
        Addr16::from_words(w)
    } else {
        Addr16::v4_mapped(ctx.remote_ip4().to_ne_bytes())
    };
    BackendKey { addr, port, pad: 0 }
}

const AF_INET6: u32 = 10;

#[inline(always)]
fn setsockopt(ctx: &SockOpsContext, level: i32, opt: i32, value: u32) {
    let mut v = value as i32;
    // SAFETY: the context's socket, an int option and its size.
    unsafe {
        bpf_setsockopt(
            ctx.ops.cast(),
            level,
            opt,
            core::ptr::from_mut(&mut v).cast(),
            4,
        )
    };
}
