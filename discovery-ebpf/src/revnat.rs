//! Reverse NAT kept in socket storage: which (frontend, backend) pairs a
//! socket was redirected for, so replies and getpeername() report the
//! frontend. Lives and dies with the socket.
use aya_ebpf::programs::SockAddrContext;
use discovery_common::{
    Addr16, Backend, Counter, REVNAT_ENTRIES, RevNatEntry, ServiceKey, SockRevNat, TcpOpts,
};

use crate::{maps::REVNAT, stats};

/// Remember that this socket talks to `backend` on behalf of `frontend`;
/// `connected` is the backend id when connect() chose it (the socket is
/// then connected to it, which the agent's re-steering looks for).
#[inline(always)]
pub fn remember(
    ctx: &SockAddrContext,
    frontend: &ServiceKey,
    backend: &Backend,
    tcp: &TcpOpts,
    stats_id: u32,
    connected: Option<u32>,
) {
    // SAFETY: the hook's own socket; the kernel returns null or a pointer
    // to this socket's storage, valid while the program runs.
    let st = unsafe { REVNAT.get_or_insert_ptr_mut(ctx, None) };
    if st.is_null() {
        stats::bump(Counter::RevNatAllocFailed);
        return;
    }
    // SAFETY: checked non-null above; socket storage is only written by
    // hooks of this socket, which hold its lock.
    let st = unsafe { &mut *st };
    st.tcp = *tcp;
    st.stats_id = stats_id;
    let i = slot_for(st, frontend, backend);
    if let Some(id) = connected {
        st.connected = i as u32 + 1;
        st.backend_id = id;
    }
}

/// Writes the pair into the socket's entry for `backend` (or a free one,
/// or the oldest) and returns its index.
#[inline(always)]
fn slot_for(st: &mut SockRevNat, frontend: &ServiceKey, backend: &Backend) -> usize {
    let mut i = 0;
    while i < REVNAT_ENTRIES {
        let e = &mut st.entries[i];
        if e.backend_port == backend.port && e.backend_addr == backend.addr {
            e.frontend_addr = frontend.addr;
            e.frontend_port = frontend.port;
            return i;
        }
        if e.backend_port == 0 {
            break;
        }
        i += 1;
    }
    if i >= REVNAT_ENTRIES {
        i = (st.next as usize) % REVNAT_ENTRIES;
        st.next = st.next.wrapping_add(1);
    }
    if let Some(e) = st.entries.get_mut(i) {
        *e = RevNatEntry {
            backend_addr: backend.addr,
            frontend_addr: frontend.addr,
            backend_port: backend.port,
            frontend_port: frontend.port,
            pad: 0,
        };
    }
    i
}

/// The frontend this socket was redirected for, if `peer` is one of its
/// backends.
#[inline(always)]
pub fn frontend_of(ctx: &SockAddrContext, peer: &Addr16, port: u16) -> Option<(Addr16, u16)> {
    // SAFETY: as in `remember`; only read here.
    let st = unsafe { REVNAT.get_ptr_mut(ctx) };
    if st.is_null() {
        return None;
    }
    // SAFETY: checked non-null above.
    let st = unsafe { &*st };
    let mut i = 0;
    while i < REVNAT_ENTRIES {
        let e = &st.entries[i];
        if e.backend_port == port && e.backend_addr == *peer {
            return Some((e.frontend_addr, e.frontend_port));
        }
        i += 1;
    }
    None
}
