//! cgroup/sock_addr programs: rewrite a client's connect()/sendmsg() to a
//! frontend into one of the service's backends, and make replies and
//! getpeername() report the frontend again; and a sock_ops program for the
//! redirected TCP sockets.
//!
//! The hooks are thin: they read the address from their context into a
//! 16-byte (v4-mapped) form, call the one forward (`xlate::fwd`) or reverse
//! (`xlate::rev`) translation, and write the result back. Per call to a
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

/// Writes a v4-mapped address back into an IPv4 context.
#[inline(always)]
fn set_addr4(ctx: &SockAddrContext, addr: &Addr16, port: u16) {
    // SAFETY: as in `addr4`; these fields are writable in the connect,
    // sendmsg, recvmsg and getpeername hooks.
    let sa = unsafe { &mut *ctx.sock_addr };
    let a = &addr.0;
    sa.user_ip4 = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
    sa.user_port = u32::from(port.to_be());
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
