//! One forward translation (connect, sendmsg) and one reverse translation
//! (recvmsg, getpeername), as Cilium's bpf_sock.c has `__sock4_xlate_fwd`
//! and `__sock4_xlate_rev`. The hooks only read and write their context's
//! address; everything else happens here on a 16-byte address, so IPv6
//! hooks (with v4-mapped frontends) reuse the same path.
use aya_ebpf::{
    helpers::generated::{bpf_get_current_pid_tgid, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use discovery_common::{Addr16, Backend, Counter, IPPROTO_UDP, RevNatEntry, ServiceKey, TcpOpts};

use crate::{
    lb::{self, Hook, Pick},
    maps::{EXEMPT, EXEMPT_CALLS, UDP_CONNS},
    revnat, stats,
};

/// cgroup sock_addr verdicts.
pub const ALLOW: i32 = 1;
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;
const EAFNOSUPPORT: i32 = 97;

/// Rewrites a call to a frontend into one to a backend. `set` writes the
/// chosen backend's address into the hook's context, or returns false if
/// the context cannot carry it (an IPv6 backend for an AF_INET socket, an
/// IPv4 one for IPv6 sendmsg): the call then fails with EAFNOSUPPORT.
#[inline(always)]
pub fn fwd(
    ctx: &SockAddrContext,
    key: &ServiceKey,
    hook: Hook,
    set: impl FnOnce(&Addr16, u16) -> bool,
) -> i32 {
    let p = match lb::select(ctx.sock_addr.cast(), key, hook) {
        Pick::NotFrontend => return ALLOW,
        _ if own_process() => return ALLOW,
        Pick::NoBackend(stats_id) => return fail(stats_id, ECONNREFUSED),
        Pick::Backend(p) => p,
    };
    if !set(&p.backend.addr, p.backend.port) {
        return fail(p.stats_id, EAFNOSUPPORT);
    }
    match hook {
        Hook::Connect => {
            revnat::remember(ctx, key, &p.backend, &p.tcp, p.stats_id, Some(p.backend_id));
            if key.proto == IPPROTO_UDP {
                track_udp(ctx, key, &p.backend);
            }
            stats::bump(Counter::ConnectRedirected);
            stats::service(p.stats_id, |s| s.connects += 1);
            stats::backend(p.backend_id, |s| s.connects += 1);
        }
        Hook::Sendmsg => {
            revnat::remember(ctx, key, &p.backend, &TcpOpts::default(), p.stats_id, None);
            stats::bump(Counter::SendmsgRedirected);
            stats::service(p.stats_id, |s| s.datagrams += 1);
            stats::backend(p.backend_id, |s| s.datagrams += 1);
        }
    }
    stats::consumed(key);
    ALLOW
}

/// Records a connected UDP socket's (frontend, backend) by its cookie,
/// for the agent's re-steering (sock_diag shows no socket storage for
/// UDP). A full map evicts its oldest entry.
#[inline(always)]
fn track_udp(ctx: &SockAddrContext, key: &ServiceKey, backend: &Backend) {
    // SAFETY: the hook's context, which this helper takes.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let e = RevNatEntry {
        backend_addr: backend.addr,
        frontend_addr: key.addr,
        backend_port: backend.port,
        frontend_port: key.port,
        pad: 0,
    };
    let _ = UDP_CONNS.insert(cookie, e, 0);
}

/// Rewrites the peer a socket sees (reply source, getpeername) back to the
/// frontend if it was redirected to it. Returns whether it did.
#[inline(always)]
pub fn rev(
    ctx: &SockAddrContext,
    peer: &Addr16,
    port: u16,
    set: impl FnOnce(&Addr16, u16) -> bool,
) -> bool {
    match revnat::frontend_of(ctx, peer, port) {
        Some((addr, port)) => set(&addr, port),
        None => false,
    }
}

/// Whether the caller is the agent or an announcer (they register their
/// process id): their calls to a frontend are left alone whatever etcd
/// says, so no etcd write can redirect their connections to etcd or to the
/// backends they check. Only looked up for calls to a frontend.
#[inline(always)]
fn own_process() -> bool {
    // SAFETY: a helper with no arguments.
    let tgid = (unsafe { bpf_get_current_pid_tgid() } >> 32) as u32;
    // SAFETY: a lookup with a key on our stack; the value is only tested
    // for presence.
    if unsafe { EXEMPT.get(tgid) }.is_none() {
        return false;
    }
    if let Some(n) = EXEMPT_CALLS.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array; nothing else writes
        // it while this program runs.
        unsafe { *n += 1 };
    }
    true
}

/// Fails the call right away with `errno` (ECONNREFUSED: no backend;
/// EAFNOSUPPORT: none this socket can reach) instead of letting it hang.
/// Both count as no_backend.
#[inline(always)]
fn fail(stats_id: u32, errno: i32) -> i32 {
    stats::bump(Counter::NoBackend);
    stats::service(stats_id, |s| s.no_backend += 1);
    // SAFETY: allowed in cgroup sock_addr programs; sets the call's errno.
    unsafe { bpf_set_retval(-errno) };
    REJECT
}
