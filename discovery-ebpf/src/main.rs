//! cgroup/sock_addr programs: rewrite a client's connect()/sendmsg() to a
//! frontend into one of the service's backends, and make replies and
//! getpeername() report the frontend again.
//!
//! Per call to a frontend: one hash lookup for the service, one for the
//! slot, one array lookup for the backend. Traffic to anything that is not a frontend costs
//! one hash lookup and is left untouched.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TIMEOUT_INIT, BPF_TCP_CLOSE, BPF_TCP_SYN_SENT,
    },
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, SkStorage},
    helpers::generated::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_prandom_u32,
        bpf_get_socket_cookie, bpf_set_retval, bpf_setsockopt, bpf_sk_storage_get,
    },
    macros::{btf_map, cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockOpsContext},
};
use discovery_common::{
    BACKEND_F_VALID, BPF_F_NO_PREALLOC, Backend, BackendHealth, BackendKey, BackendStats,
    ConsumerCache, ConsumerKey, Counter, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES,
    DEFAULT_MAX_SLOTS, Exempt, IPPROTO_TCP, IPPROTO_UDP, MAX_CONSUMERS, MAX_EXEMPT, REVNAT_ENTRIES,
    RevNatEntry, SVC_F_CONSISTENT, SVC_F_LEAST_CONN, Service, ServiceKey, ServiceStats, Slot,
    SlotKey, SockRevNat, TcpOpts, v4_mapped,
};

#[btf_map(name = "disc_services")]
static SERVICES: HashMap<
    ServiceKey,
    Service,
    { DEFAULT_MAX_SERVICES as usize },
    BPF_F_NO_PREALLOC,
> = HashMap::new();

#[btf_map(name = "disc_slots")]
static SLOTS: HashMap<SlotKey, Slot, { DEFAULT_MAX_SLOTS as usize }, BPF_F_NO_PREALLOC> =
    HashMap::new();

#[btf_map(name = "disc_backends")]
static BACKENDS: Array<Backend, { DEFAULT_MAX_BACKENDS as usize }> = Array::new();

#[btf_map(name = "disc_counters")]
static COUNTERS: PerCpuArray<u64, { Counter::COUNT as usize }> = PerCpuArray::new();

#[btf_map(name = "disc_revnat")]
static REVNAT: SkStorage<SockRevNat> = SkStorage::new();

#[btf_map(name = "disc_svc_stats")]
static SVC_STATS: PerCpuArray<ServiceStats, { DEFAULT_MAX_SERVICES as usize + 1 }> =
    PerCpuArray::new();

#[btf_map(name = "disc_backend_stats")]
static BACKEND_STATS: PerCpuArray<BackendStats, { DEFAULT_MAX_BACKENDS as usize + 1 }> =
    PerCpuArray::new();

#[btf_map(name = "disc_consumer_cache")]
static CONSUMER_CACHE: PerCpuArray<ConsumerCache, 1> = PerCpuArray::new();

#[btf_map(name = "disc_consumers")]
static CONSUMERS: LruHashMap<ConsumerKey, u64, { MAX_CONSUMERS as usize }> = LruHashMap::new();

#[btf_map(name = "disc_exempt")]
static EXEMPT: HashMap<u32, Exempt, { MAX_EXEMPT as usize }> = HashMap::new();

#[btf_map(name = "disc_exempt_calls")]
static EXEMPT_CALLS: PerCpuArray<u64, 1> = PerCpuArray::new();

/// Kernel ticks per second (CONFIG_HZ), set by the agent at load time: the
/// initial RTO a sock_ops program returns is in jiffies. 0: unknown, so
/// connect timeouts keep the kernel's 1 s initial RTO.
#[unsafe(no_mangle)]
static HZ: u32 = 0;

/// cgroup sock_addr verdicts.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[inline(always)]
fn bump(counter: Counter) {
    if let Some(v) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot: no other writer while we run.
        unsafe { *v += 1 };
    }
}

/// Adds to a service's per-CPU stats (per-CPU slot: no other writer).
#[inline(always)]
fn svc_stat(stats_id: u32, f: impl FnOnce(&mut ServiceStats)) {
    if stats_id != 0
        && let Some(s) = SVC_STATS.get_ptr_mut(stats_id)
    {
        f(unsafe { &mut *s });
    }
}

/// Counts a call of the current cgroup to a frontend ("who talks to
/// whom"). Calls of the same pair in a row only bump this CPU's cache;
/// the LRU map is updated when the pair changes. Not atomic across CPUs
/// in the map: a usage summary, not a meter.
#[inline(always)]
fn consumed(service: &ServiceKey) {
    let key = ConsumerKey {
        service: *service,
        pad: 0,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
    };
    let Some(c) = CONSUMER_CACHE.get_ptr_mut(0) else {
        return;
    };
    let c = unsafe { &mut *c };
    if c.pending > 0 && same_consumer(&c.key, &key) {
        c.pending += 1;
        return;
    }
    if c.pending > 0 {
        match CONSUMERS.get_ptr_mut(c.key) {
            Some(n) => unsafe { *n += c.pending },
            None => {
                let _ = CONSUMERS.insert(c.key, c.pending, 0);
            }
        }
    }
    c.key = key;
    c.pending = 1;
}

/// Adds to a backend's per-CPU stats, by backend id.
#[inline(always)]
fn backend_stat(id: u32, f: impl FnOnce(&mut BackendStats)) {
    if let Some(s) = BACKEND_STATS.get_ptr_mut(id) {
        f(unsafe { &mut *s });
    }
}

/// Whether the caller is the agent or an announcer (they register their
/// process id): their calls to a frontend are left alone whatever etcd
/// says, so no etcd write can redirect their connections to etcd or to the
/// backends they check. Only looked up for calls to a frontend.
#[inline(always)]
fn own_process() -> bool {
    let tgid = (unsafe { bpf_get_current_pid_tgid() } >> 32) as u32;
    // SAFETY: a map lookup with a key on our stack; the value is only
    // tested for presence.
    if unsafe { EXEMPT.get(tgid) }.is_none() {
        return false;
    }
    if let Some(n) = EXEMPT_CALLS.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array; nothing else writes
        // it while this program runs (no preemption in cgroup hooks).
        unsafe { *n += 1 };
    }
    true
}

/// What the hook saw: the destination (or, for recvmsg/getpeername, the
/// peer) as written by the kernel into the context.
#[inline(always)]
fn ctx_addr(ctx: &SockAddrContext) -> ([u8; 16], u16) {
    let sa = unsafe { &*ctx.sock_addr };
    // user_ip4 holds the address bytes in network order; user_port holds
    // the port in network order in its low 16 bits.
    let ip = sa.user_ip4.to_ne_bytes();
    let port = u16::from_be(sa.user_port as u16);
    (v4_mapped(ip), port)
}

#[inline(always)]
fn set_ctx_addr(ctx: &SockAddrContext, addr: &[u8; 16], port: u16) {
    let sa = unsafe { &mut *ctx.sock_addr };
    sa.user_ip4 = u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]);
    sa.user_port = u32::from(port.to_be());
}

/// What a lookup of the destination found.
enum Pick {
    /// Not a frontend: leave the call alone.
    NotFrontend,
    /// A frontend with no backend: fail the call at once (its stats id).
    NoBackend(u32),
    Backend(Picked),
}

/// A backend and what the caller needs of its service.
#[derive(Clone, Copy)]
struct Picked {
    backend: Backend,
    backend_id: u32,
    tcp: TcpOpts,
    flags: u32,
    stats_id: u32,
}

/// One service lookup, then a weighted choice: `draw` (given the service's
/// policy flags) gives two u32s, the first picks the slot, the second
/// decides between the slot's backend and its alias. It is only called for
/// a frontend with backends. A lookup that
/// races a set flip (slot of the old set already deleted) re-reads the
/// service once and uses the new set.
#[inline(always)]
fn pick(key: &ServiceKey, draw: impl FnOnce(u32) -> (u32, u32)) -> Pick {
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
        if let Some(slot) = unsafe { SLOTS.get(SlotKey { set_id, slot }) } {
            let id = if r2 < slot.threshold {
                slot.backend
            } else {
                slot.alias
            };
            if let Some(b) = BACKENDS.get(id)
                && b.flags & BACKEND_F_VALID != 0
            {
                return Pick::Backend(Picked {
                    backend: *b,
                    backend_id: id,
                    tcp,
                    flags,
                    stats_id,
                });
            }
        }
        bump(Counter::StaleRetry);
        match unsafe { SERVICES.get(key) } {
            Some(s) if s.count > 0 => (set_id, count) = (s.set_id, s.count),
            Some(_) => return Pick::NoBackend(stats_id),
            None => return Pick::NotFrontend,
        }
    }
    Pick::NoBackend(stats_id)
}

#[inline(always)]
fn proto_of(ctx: &SockAddrContext) -> u8 {
    unsafe { (*ctx.sock_addr).protocol as u8 }
}

/// Remember that this socket talks to `backend` on behalf of `frontend`.
#[inline(always)]
fn remember(
    ctx: &SockAddrContext,
    frontend: &ServiceKey,
    backend: &Backend,
    tcp: &TcpOpts,
    stats_id: u32,
) {
    let st = unsafe { REVNAT.get_or_insert_ptr_mut(ctx, None) };
    if st.is_null() {
        bump(Counter::RevNatAllocFailed);
        return;
    }
    let st = unsafe { &mut *st };
    st.tcp = *tcp;
    st.stats_id = stats_id;
    let mut i = 0;
    while i < REVNAT_ENTRIES {
        let e = &mut st.entries[i];
        if e.backend_port == backend.port && addr_eq(&e.backend_addr, &backend.addr) {
            e.frontend_addr = frontend.addr;
            e.frontend_port = frontend.port;
            return;
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
}

/// Rewrite the peer address back to the frontend if this socket was
/// redirected to it. Returns whether it did.
#[inline(always)]
fn restore_frontend(ctx: &SockAddrContext) -> bool {
    let st = unsafe { REVNAT.get_ptr_mut(ctx) };
    if st.is_null() {
        return false;
    }
    let st = unsafe { &*st };
    let (addr, port) = ctx_addr(ctx);
    // Word-aligned for addr_eq.
    let addr = Aligned(addr);
    let mut i = 0;
    while i < REVNAT_ENTRIES {
        let e = &st.entries[i];
        if e.backend_port == port && addr_eq(&e.backend_addr, &addr.0) {
            set_ctx_addr(ctx, &e.frontend_addr, e.frontend_port);
            return true;
        }
        i += 1;
    }
    false
}

/// Fail the call with ECONNREFUSED right away instead of letting it hang.
#[inline(always)]
fn refuse(stats_id: u32) -> i32 {
    bump(Counter::NoBackend);
    svc_stat(stats_id, |s| s.no_backend += 1);
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REJECT
}

/// Two u32s for a weighted draw from one helper call: the kernel's
/// random source costs tens of nanoseconds a call, and splitmix spreads
/// 32 random bits well enough over both halves.
#[inline(always)]
fn random_draw() -> (u32, u32) {
    let h = mix(u64::from(unsafe { bpf_get_prandom_u32() }));
    ((h >> 32) as u32, h as u32)
}

#[repr(C, align(4))]
struct Aligned([u8; 16]);

/// Address equality in 4-byte words. `[u8; 16]` has alignment 1, so a
/// plain `==` compiles to sixteen byte loads per side. Callers pass
/// addresses that are 4-aligned: fields of the map structs (checked in
/// discovery-common's layout test) or an `Aligned`.
#[inline(always)]
fn addr_eq(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let (a, b) = unsafe {
        (
            &*a.as_ptr().cast::<[u32; 4]>(),
            &*b.as_ptr().cast::<[u32; 4]>(),
        )
    };
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

#[inline(always)]
fn same_consumer(a: &ConsumerKey, b: &ConsumerKey) -> bool {
    a.cgroup_id == b.cgroup_id
        && a.service.port == b.service.port
        && a.service.proto == b.service.proto
        && addr_eq(&a.service.addr, &b.service.addr)
}

/// splitmix64 finaliser: spreads a socket cookie over both halves.
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
    unsafe { BHEALTH.get(key) }.map_or(0, |h| h.live)
}

/// `consistent` policy: the slot comes from the caller's cgroup (its
/// workload), so every connection of a workload lands on the same backend.
/// Slots of a Maglev table name one backend, so the second draw is moot.
#[inline(always)]
fn workload_draw() -> (u32, u32) {
    let h = mix(unsafe { bpf_get_current_cgroup_id() });
    ((h >> 32) as u32, 0)
}

/// TCP connect() and connected UDP: a fresh random backend per connect()
/// (or the workload's backend under the `consistent` policy).
#[cgroup_sock_addr(connect4)]
pub fn disc_connect4(ctx: SockAddrContext) -> i32 {
    let proto = proto_of(&ctx);
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return ALLOW;
    }
    let (addr, port) = ctx_addr(&ctx);
    let key = ServiceKey {
        addr,
        port,
        proto,
        pad: 0,
    };
    let backend = match pick(&key, |flags| {
        if flags & SVC_F_CONSISTENT != 0 {
            workload_draw()
        } else {
            random_draw()
        }
    }) {
        Pick::NotFrontend => return ALLOW,
        _ if own_process() => return ALLOW,
        Pick::NoBackend(stats_id) => return refuse(stats_id),
        Pick::Backend(p) => p,
    };
    let mut p = backend;
    if p.flags & SVC_F_LEAST_CONN != 0 {
        // Power of two choices: a second weighted draw, and the one with
        // fewer live connections wins.
        if let Pick::Backend(other) = pick(&key, |_| random_draw())
            && live(&other.backend) < live(&p.backend)
        {
            p = other;
        }
    }
    set_ctx_addr(&ctx, &p.backend.addr, p.backend.port);
    remember(&ctx, &key, &p.backend, &p.tcp, p.stats_id);
    bump(Counter::ConnectRedirected);
    svc_stat(p.stats_id, |s| s.connects += 1);
    backend_stat(p.backend_id, |s| s.connects += 1);
    consumed(&key);
    ALLOW
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
    let (addr, port) = ctx_addr(&ctx);
    let key = ServiceKey {
        addr,
        port,
        proto: IPPROTO_UDP,
        pad: 0,
    };
    let backend = match pick(&key, |flags| {
        if flags & SVC_F_CONSISTENT != 0 {
            return workload_draw();
        }
        let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
        let h = mix(cookie ^ (u64::from(port) << 32));
        ((h >> 32) as u32, h as u32)
    }) {
        Pick::NotFrontend => return ALLOW,
        _ if own_process() => return ALLOW,
        Pick::NoBackend(stats_id) => return refuse(stats_id),
        Pick::Backend(p) => p,
    };
    set_ctx_addr(&ctx, &backend.backend.addr, backend.backend.port);
    remember(
        &ctx,
        &key,
        &backend.backend,
        &TcpOpts::default(),
        backend.stats_id,
    );
    bump(Counter::SendmsgRedirected);
    svc_stat(backend.stats_id, |s| s.datagrams += 1);
    backend_stat(backend.backend_id, |s| s.datagrams += 1);
    consumed(&key);
    ALLOW
}

/// recvfrom() on a UDP socket that sent to a frontend: the reply appears to
/// come from the frontend, as resolvers and other clients that check the
/// source require.
#[cgroup_sock_addr(recvmsg4)]
pub fn disc_recvmsg4(ctx: SockAddrContext) -> i32 {
    if proto_of(&ctx) == IPPROTO_UDP && restore_frontend(&ctx) {
        bump(Counter::RecvmsgRevNat);
    }
    ALLOW
}

/// getpeername() on a redirected socket reports the frontend.
#[cgroup_sock_addr(getpeername4)]
pub fn disc_getpeername4(ctx: SockAddrContext) -> i32 {
    if restore_frontend(&ctx) {
        bump(Counter::PeerRevNat);
    }
    ALLOW
}

#[btf_map(name = "disc_bhealth")]
static BHEALTH: HashMap<
    BackendKey,
    BackendHealth,
    { DEFAULT_MAX_BACKENDS as usize },
    BPF_F_NO_PREALLOC,
> = HashMap::new();

const SOL_SOCKET: i32 = 1;
const SO_KEEPALIVE: i32 = 9;
const SOL_TCP: i32 = 6;
const TCP_KEEPIDLE: i32 = 4;
const TCP_KEEPINTVL: i32 = 5;
const TCP_KEEPCNT: i32 = 6;
const TCP_USER_TIMEOUT: i32 = 18;

/// The socket storage of a sock_ops socket, if connect4 redirected it.
#[inline(always)]
fn redirected(ctx: &SockOpsContext) -> Option<&'static SockRevNat> {
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // The same map the sock_addr programs use, by its definition's address
    // (what aya-ebpf's SkStorage does for sock_addr contexts).
    let map = core::ptr::from_ref(&REVNAT).cast_mut().cast();
    let st = unsafe { bpf_sk_storage_get(map, sk.cast(), core::ptr::null_mut(), 0) };
    (!st.is_null()).then(|| unsafe { &*st.cast::<SockRevNat>() })
}

/// The peer of a sock_ops socket as a backend key.
#[inline(always)]
fn peer(ctx: &SockOpsContext) -> BackendKey {
    // remote_port holds the network-order port in its upper 16 bits.
    let port = u16::from_be((ctx.remote_port() >> 16) as u16);
    BackendKey {
        addr: v4_mapped(ctx.remote_ip4().to_ne_bytes()),
        port,
        pad: 0,
    }
}

/// Applies `f` to a backend's entry, creating it (zeroed) if missing.
#[inline(always)]
fn update_health(key: &BackendKey, f: impl FnOnce(&mut BackendHealth)) {
    match BHEALTH.get_ptr_mut(key) {
        Some(h) => f(unsafe { &mut *h }),
        None => {
            let mut h = BackendHealth::default();
            f(&mut h);
            let _ = BHEALTH.insert(key, h, 0);
        }
    }
}

#[inline(always)]
fn setsockopt(ctx: &SockOpsContext, level: i32, opt: i32, value: u32) {
    let mut v = value as i32;
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

/// Connect timeouts below this get a shorter initial RTO, so the SYN is
/// retransmitted (twice) before the timeout instead of once at 1 s.
const SHORT_CONNECT_TIMEOUT_MS: u32 = 3_000;

/// TCP sockets that connect4 redirected: applies the service's connect
/// timeout while connecting (the kernel clamps SYN retransmits to
/// TCP_USER_TIMEOUT), then its keepalive and user timeout once
/// established, and records connect outcomes per backend for passive
/// checks.
#[sock_ops]
pub fn disc_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TIMEOUT_INIT => {
            // The reply is the initial RTO in jiffies; left alone (0), the
            // kernel uses 1 s, and other programs' replies stand.
            let hz = unsafe { core::ptr::read_volatile(&HZ) };
            let Some(st) = redirected(&ctx) else { return 1 };
            let t = st.tcp.connect_timeout_ms;
            if hz > 0 && t > 0 && t < SHORT_CONNECT_TIMEOUT_MS {
                let jiffies = (u64::from(t / 3) * u64::from(hz) / 1000).max(1);
                ctx.set_reply(jiffies as u32);
            }
        }
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            let Some(st) = redirected(&ctx) else { return 1 };
            // State changes of this socket tell how the connect ended.
            let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
            if st.tcp.connect_timeout_ms > 0 {
                setsockopt(&ctx, SOL_TCP, TCP_USER_TIMEOUT, st.tcp.connect_timeout_ms);
            }
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let Some(st) = redirected(&ctx) else { return 1 };
            let tcp = st.tcp;
            if tcp.connect_timeout_ms > 0 || tcp.user_timeout_ms > 0 {
                // The connect timeout is not a timeout for the connection.
                setsockopt(&ctx, SOL_TCP, TCP_USER_TIMEOUT, tcp.user_timeout_ms);
            }
            if tcp.keepalive_idle_s > 0 {
                setsockopt(&ctx, SOL_SOCKET, SO_KEEPALIVE, 1);
                setsockopt(&ctx, SOL_TCP, TCP_KEEPIDLE, tcp.keepalive_idle_s.into());
                if tcp.keepalive_intvl_s > 0 {
                    setsockopt(&ctx, SOL_TCP, TCP_KEEPINTVL, tcp.keepalive_intvl_s.into());
                }
                if tcp.keepalive_probes > 0 {
                    setsockopt(&ctx, SOL_TCP, TCP_KEEPCNT, tcp.keepalive_probes.into());
                }
            }
            update_health(&peer(&ctx), |h| {
                h.consecutive_failures = 0;
                h.established += 1;
                h.live += 1;
            });
        }
        BPF_SOCK_OPS_STATE_CB => {
            // Only sockets that got the flag above: redirected ones.
            let (old, new) = (ctx.arg(0), ctx.arg(1));
            if new == BPF_TCP_CLOSE && old != BPF_TCP_SYN_SENT && old != BPF_TCP_CLOSE {
                // An established connection ended (it was counted live).
                let key = peer(&ctx);
                if let Some(h) = BHEALTH.get_ptr_mut(key) {
                    unsafe { (*h).live = (*h).live.saturating_sub(1) };
                }
            }
            if old == BPF_TCP_SYN_SENT && new == BPF_TCP_CLOSE {
                bump(Counter::ConnectFailed);
                if let Some(st) = redirected(&ctx) {
                    svc_stat(st.stats_id, |s| s.connect_failed += 1);
                }
                update_health(&peer(&ctx), |h| {
                    h.consecutive_failures += 1;
                    h.failures += 1;
                });
            }
        }
        _ => {}
    }
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
