//! cgroup/sock_addr programs: rewrite a client's connect()/sendmsg() to a
//! frontend into one of the service's backends, and make replies and
//! getpeername() report the frontend again; and a sock_ops program for the
//! redirected TCP sockets.
//!
//! The hooks are thin: they read the address from their context into a
//! 16-byte form (IPv4 v4-mapped, so an AF_INET6 socket's call to
//! `::ffff:127.0.0.1` finds the same service as an AF_INET one's to
//! 127.0.0.1), call the one forward (`xlate::fwd`) or reverse (`xlate::rev`)
//! translation, and write the result back. The IPv4 and IPv6 hooks differ
//! only in how they read and write their context. Per call to a
//! frontend: one hash lookup for the service, one for the slot, one array
//! lookup for the backend. Traffic to anything that is not a frontend costs
//! one hash lookup and is left untouched.
#![no_std]
#![no_main]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]
#![deny(clippy::undocumented_unsafe_blocks)]

mod atomic;
mod lb;
mod maps;
mod revnat;
mod sockops;
mod stats;
mod xlate;

use aya_ebpf::{
    macros::{cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockOpsContext},
};
use discovery_common::{Addr16, Counter, IPPROTO_TCP, IPPROTO_UDP, ServiceKey};

use crate::{lb::Hook, xlate::ALLOW};

/// The IPv4 destination (or, for recvmsg/getpeername, the peer) the kernel
/// wrote into the context, v4-mapped.
#[inline(always)]
fn addr4(ctx: &SockAddrContext) -> (Addr16, u16) {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's
    // whole run.
    let sa = unsafe { &*ctx.sock_addr };
    // user_ip4 holds the address bytes in network order; user_port holds
    // the port in network order in its low 16 bits.
    (
        Addr16::v4_mapped(sa.user_ip4.to_ne_bytes()),
        u16::from_be(sa.user_port as u16),
    )
}

/// Writes a v4-mapped address back into an IPv4 context. Returns false
/// (writing nothing) for an IPv6 address, which an AF_INET socket cannot
/// reach; the agent keeps such backends away from IPv4 frontends.
#[inline(always)]
fn set_addr4(ctx: &SockAddrContext, addr: &Addr16, port: u16) -> bool {
    let Some(ip) = addr.as_v4() else {
        return false;
    };
    // SAFETY: as in `addr4`; these fields are writable in the connect,
    // sendmsg, recvmsg and getpeername hooks.
    let sa = unsafe { &mut *ctx.sock_addr };
    sa.user_ip4 = u32::from_ne_bytes(ip);
    sa.user_port = u32::from(port.to_be());
    true
}

#[inline(always)]
fn proto_of(ctx: &SockAddrContext) -> u8 {
    // SAFETY: as in `addr4`.
    unsafe { (*ctx.sock_addr).protocol as u8 }
}

/// The frontend key of an IPv4 call.
#[inline(always)]
fn key4(ctx: &SockAddrContext, proto: u8) -> ServiceKey {
    let (addr, port) = addr4(ctx);
    ServiceKey {
        addr,
        port,
        proto,
        pad: 0,
    }
}

/// The IPv6 destination (or peer) of an AF_INET6 socket's call: a real
/// IPv6 address, or v4-mapped for an IPv4 peer of a dual-stack socket.
#[inline(always)]
fn addr6(ctx: &SockAddrContext) -> (Addr16, u16) {
    // SAFETY: as in `addr4`.
    let sa = unsafe { &*ctx.sock_addr };
    // user_ip6 holds the 16 address bytes in network order, in four words.
    (
        Addr16::from_words(sa.user_ip6),
        u16::from_be(sa.user_port as u16),
    )
}

/// Writes an address into an IPv6 context (an IPv4 one v4-mapped): every
/// address fits, so it returns true.
#[inline(always)]
fn set_addr6(ctx: &SockAddrContext, addr: &Addr16, port: u16) -> bool {
    // SAFETY: as in `set_addr4`.
    let sa = unsafe { &mut *ctx.sock_addr };
    sa.user_ip6 = addr.words();
    sa.user_port = u32::from(port.to_be());
    true
}

/// The frontend key of an IPv6 call. A v4-mapped destination gives the
/// same key as the IPv4 call would: one entry serves both families.
#[inline(always)]
fn key6(ctx: &SockAddrContext, proto: u8) -> ServiceKey {
    let (addr, port) = addr6(ctx);
    ServiceKey {
        addr,
        port,
        proto,
        pad: 0,
    }
}

/// TCP connect() and connected UDP: a fresh backend per connect() by the
/// service's policy.
#[cgroup_sock_addr(connect4)]
pub fn disc_connect4(ctx: SockAddrContext) -> i32 {
    let proto = proto_of(&ctx);
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return ALLOW;
    }
    let key = key4(&ctx, proto);
    xlate::fwd(&ctx, &key, Hook::Connect, |a, p| set_addr4(&ctx, a, p))
}

/// Unconnected UDP sendto(): rewritten per datagram. The choice is derived
/// from the socket cookie, so one socket keeps one backend per frontend while
/// the backend set is unchanged (request/response protocols need replies from
/// the backend they asked) and different sockets spread over the backends.
#[cgroup_sock_addr(sendmsg4)]
pub fn disc_sendmsg4(ctx: SockAddrContext) -> i32 {
    if proto_of(&ctx) != IPPROTO_UDP {
        return ALLOW;
    }
    let key = key4(&ctx, IPPROTO_UDP);
    xlate::fwd(&ctx, &key, Hook::Sendmsg, |a, p| set_addr4(&ctx, a, p))
}

/// recvfrom() on a UDP socket that sent to a frontend: the reply appears to
/// come from the frontend, as resolvers and other clients that check the
/// source require.
#[cgroup_sock_addr(recvmsg4)]
pub fn disc_recvmsg4(ctx: SockAddrContext) -> i32 {
    if proto_of(&ctx) == IPPROTO_UDP {
        let (peer, port) = addr4(&ctx);
        if xlate::rev(&ctx, &peer, port, |a, p| set_addr4(&ctx, a, p)) {
            stats::bump(Counter::RecvmsgRevNat);
        }
    }
    ALLOW
}

/// getpeername() on a redirected socket reports the frontend.
#[cgroup_sock_addr(getpeername4)]
pub fn disc_getpeername4(ctx: SockAddrContext) -> i32 {
    let (peer, port) = addr4(&ctx);
    if xlate::rev(&ctx, &peer, port, |a, p| set_addr4(&ctx, a, p)) {
        stats::bump(Counter::PeerRevNat);
    }
    ALLOW
}

/// connect() on an AF_INET6 socket: to an IPv6 frontend, or to a v4-mapped
/// one (`::ffff:127.0.0.1`, what a JVM's dual-stack socket connects to for
/// 127.0.0.1). Any backend fits: IPv4 ones are written v4-mapped.
#[cgroup_sock_addr(connect6)]
pub fn disc_connect6(ctx: SockAddrContext) -> i32 {
    let proto = proto_of(&ctx);
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return ALLOW;
    }
    let key = key6(&ctx, proto);
    xlate::fwd(&ctx, &key, Hook::Connect, |a, p| set_addr6(&ctx, a, p))
}

/// Unconnected UDP sendto() on an AF_INET6 socket to an IPv6 frontend (a
/// v4-mapped destination runs sendmsg4 instead). The kernel refuses a
/// rewrite to a v4-mapped address here, so an IPv4 backend fails the call
/// at once with EAFNOSUPPORT.
#[cgroup_sock_addr(sendmsg6)]
pub fn disc_sendmsg6(ctx: SockAddrContext) -> i32 {
    if proto_of(&ctx) != IPPROTO_UDP {
        return ALLOW;
    }
    let key = key6(&ctx, IPPROTO_UDP);
    xlate::fwd(&ctx, &key, Hook::Sendmsg, |a, p| {
        a.as_v4().is_none() && set_addr6(&ctx, a, p)
    })
}

/// recvfrom() on an AF_INET6 UDP socket (also for an IPv4 peer of a
/// dual-stack socket, v4-mapped): the reply comes from the frontend.
#[cgroup_sock_addr(recvmsg6)]
pub fn disc_recvmsg6(ctx: SockAddrContext) -> i32 {
    if proto_of(&ctx) == IPPROTO_UDP {
        let (peer, port) = addr6(&ctx);
        if xlate::rev(&ctx, &peer, port, |a, p| set_addr6(&ctx, a, p)) {
            stats::bump(Counter::RecvmsgRevNat);
        }
    }
    ALLOW
}

/// getpeername() on a redirected AF_INET6 socket reports the frontend.
#[cgroup_sock_addr(getpeername6)]
pub fn disc_getpeername6(ctx: SockAddrContext) -> i32 {
    let (peer, port) = addr6(&ctx);
    if xlate::rev(&ctx, &peer, port, |a, p| set_addr6(&ctx, a, p)) {
        stats::bump(Counter::PeerRevNat);
    }
    ALLOW
}

/// Redirected TCP sockets: connect timeouts, keepalive and user timeout,
/// and connect outcomes per backend (see `sockops`).
#[sock_ops]
pub fn disc_sockops(ctx: SockOpsContext) -> u32 {
    sockops::handle(&ctx);
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
