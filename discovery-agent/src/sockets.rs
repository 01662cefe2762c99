//! The node's sockets that connect() redirected to a backend, from the
//! kernel's sock_diag netlink interface with the revnat socket storage
//! attached to each answer (`INET_DIAG_REQ_SK_BPF_STORAGES`), and their
//! destruction (`SOCK_DESTROY`): a TCP connection is aborted (the peer
//! gets a reset, the owner ECONNABORTED), a connected UDP socket gets
//! ECONNABORTED on its next call and is left disconnected. Dumping with
//! storage needs CAP_BPF (or CAP_SYS_ADMIN), destroying CAP_NET_ADMIN.
//! sock_diag sees one network namespace, the caller's: [`in_netns`] runs a
//! dump in another, [`netns_of_cgroup`] finds those of a workload.
use std::{
    collections::HashSet,
    fs::{self, File},
    io,
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{
        fd::{AsRawFd as _, BorrowedFd},
        unix::fs::MetadataExt as _,
    },
    path::Path,
};

use discovery_common::{Addr16, IPPROTO_TCP, IPPROTO_UDP, RevNatEntry, SockRevNat};
use netlink_packet_core::{
    NLA_F_NESTED, NLA_TYPE_MASK, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload, Nla as _, NlasIterator,
};
use netlink_packet_sock_diag::{
    SockDiagDestroy, SockDiagMessage,
    constants::{AF_INET, AF_INET6},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};

// Request attribute (after the inet_diag_req_v2), <linux/inet_diag.h>.
const INET_DIAG_REQ_SK_BPF_STORAGES: u16 = 2;
// Inside it, <linux/sock_diag.h>.
const SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u16 = 1;
// Response attribute, <linux/inet_diag.h> (21 is INET_DIAG_CGROUP_ID).
const INET_DIAG_SK_BPF_STORAGES: u16 = 20;
// Inside it, one per map, <linux/sock_diag.h>.
const SK_DIAG_BPF_STORAGE: u16 = 1;
// Inside that.
const SK_DIAG_BPF_STORAGE_MAP_VALUE: u16 = 3;

/// SOCK_DESTROY requests sent before their acks are read: the kernel
/// queues every ack at once, and the socket's receive buffer must hold
/// them.
const DESTROY_BATCH: usize = 32;

/// A socket that connect() redirected from a frontend to the backend it is
/// still connected to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirected {
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// `AF_INET` or `AF_INET6`: the socket's family (an IPv6 socket may
    /// talk to an IPv4 backend).
    pub family: u8,
    pub src: SocketAddr,
    /// The socket's destination. IPv4 as such, never v4-mapped.
    pub backend: SocketAddr,
    /// The frontend the socket asked for, likewise.
    pub frontend: SocketAddr,
    /// The socket as sock_diag named it, cookie included: what
    /// SOCK_DESTROY takes.
    id: SocketId,
}

/// One socket of a dump.
#[derive(Debug)]
struct Diag {
    family: u8,
    proto: u8,
    id: SocketId,
    /// The value of the requested socket storage, if the socket has one.
    storage: Option<Vec<u8>>,
}

#[cfg(test)]
impl Redirected {
    /// A socket as a dump would report it, for other modules' tests.
    pub fn for_test(proto: u8, src: SocketAddr, backend: SocketAddr, frontend: SocketAddr) -> Self {
        Self {
            proto,
            family: AF_INET,
            src,
            backend,
            frontend,
            id: SocketId::new_v4(),
        }
    }
}

/// What a dump found.
#[derive(Debug, Default)]
pub struct Found {
    pub redirected: Vec<Redirected>,
    /// The cookie of every connected UDP socket seen (redirected or not),
    /// so the caller can prune the entries of closed sockets.
    pub udp_cookies: Vec<u64>,
}

/// Looks a connected UDP socket up by its cookie in `disc_udp_conns`.
pub type UdpConns<'a> = dyn Fn(u64) -> Option<RevNatEntry> + Sync + 'a;

/// The redirected sockets of the caller's network namespace: TCP
/// connected or connecting, connected UDP, IPv4 and IPv6. A TCP socket is
/// one whose storage in `revnat` (the `disc_revnat` sk_storage map) says
/// the last redirected connect() went to the address it is connected to;
/// a UDP socket one whose entry in `udp_conns` says so. sock_diag adds
/// socket storage only for sockets with an `inet_connection_sock` (TCP;
/// Linux 6.18 and earlier), hence the second map. Four dumps (two
/// without `tcp`).
pub fn dump_redirected(
    revnat: BorrowedFd<'_>,
    udp_conns: &UdpConns<'_>,
    tcp: bool,
) -> io::Result<Found> {
    let fd = u32::try_from(revnat.as_raw_fd()).map_err(io::Error::other)?;
    let mut found = Found::default();
    for d in dump(Some(fd), tcp)? {
        if d.proto == IPPROTO_UDP {
            found.udp_cookies.push(u64::from_ne_bytes(d.id.cookie));
        }
        if let Some(r) = redirected(d, udp_conns) {
            found.redirected.push(r);
        }
    }
    Ok(found)
}

/// The socket as a [`Redirected`], if its storage (TCP) or its entry in
/// `udp_conns` (UDP) says connect() sent it to where it is connected.
fn redirected(d: Diag, udp_conns: &UdpConns<'_>) -> Option<Redirected> {
    let (dst, port) = (d.id.destination_address, d.id.destination_port);
    let frontend = match &d.storage {
        Some(v) => frontend_of(&revnat_of(v)?, dst, port)?,
        None if d.proto == IPPROTO_UDP => {
            let e = udp_conns(u64::from_ne_bytes(d.id.cookie))?;
            (e.backend_port == port && e.backend_addr == addr16(dst))
                .then(|| canonical(e.frontend_addr, e.frontend_port))?
        }
        None => return None,
    };
    Some(Redirected {
        proto: d.proto,
        family: d.family,
        src: canonical(addr16(d.id.source_address), d.id.source_port),
        backend: canonical(addr16(dst), port),
        frontend,
        id: d.id,
    })
}

/// The storage value as a [`SockRevNat`], if it is one.
fn revnat_of(value: &[u8]) -> Option<SockRevNat> {
    if value.len() != size_of::<SockRevNat>() {
        return None;
    }
    // SAFETY: the slice holds size_of::<SockRevNat>() bytes (checked
    // above), read_unaligned has no alignment requirement, and SockRevNat
    // is plain integers (repr(C), explicit padding), valid for any bytes.
    Some(unsafe { value.as_ptr().cast::<SockRevNat>().read_unaligned() })
}

/// The frontend of the last redirected connect(), if it went to
/// `dst:port` (the socket's destination): a socket connected elsewhere
/// since (or never through a frontend) is not ours to steer.
fn frontend_of(st: &SockRevNat, dst: IpAddr, port: u16) -> Option<SocketAddr> {
    let i = usize::try_from(st.connected).ok()?.checked_sub(1)?;
    let e = st.entries.get(i)?;
    (e.backend_port == port && e.backend_addr == addr16(dst))
        .then(|| canonical(e.frontend_addr, e.frontend_port))
}

/// Addresses as the maps hold them: IPv4 v4-mapped.
fn addr16(ip: IpAddr) -> Addr16 {
    match ip {
        IpAddr::V4(a) => Addr16::v4_mapped(a.octets()),
        IpAddr::V6(a) => Addr16(a.octets()),
    }
}

/// IPv4 (v4-mapped or not) as IPv4.
fn canonical(a: Addr16, port: u16) -> SocketAddr {
    let ip = match a.as_v4() {
        Some(o) => IpAddr::V4(Ipv4Addr::from(o)),
        None => IpAddr::V6(Ipv6Addr::from(a.0)),
    };
    SocketAddr::new(ip, port)
}

fn open() -> io::Result<Socket> {
    let mut sock = Socket::new(NETLINK_SOCK_DIAG)?;
    sock.bind_auto()?;
    sock.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    Ok(sock)
}

/// Every TCP socket connected or connecting and every connected UDP
/// socket, with the value of the storage of map `map_fd` if asked for and
/// present.
fn dump(map_fd: Option<u32>, tcp: bool) -> io::Result<Vec<Diag>> {
    let sock = open()?;
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut out = Vec::new();
    let mut seq = 0;
    for family in [AF_INET, AF_INET6] {
        for (proto, states) in [
            (IPPROTO_TCP, StateFlags::ESTABLISHED | StateFlags::SYN_SENT),
            // What a connected UDP socket reports.
            (IPPROTO_UDP, StateFlags::ESTABLISHED),
        ] {
            if proto == IPPROTO_TCP && !tcp {
                continue;
            }
            seq += 1;
            sock.send(&dump_request(seq, family, proto, states, map_fd), 0)?;
            read_dump(&sock, seq, proto, &mut buf, &mut out)?;
        }
    }
    Ok(out)
}

/// A dump request, with the storage of map `map_fd` asked for. The
/// crate's `InetRequest` has no request attributes: they are appended to
/// its bytes.
fn dump_request(
    seq: u32,
    family: u8,
    proto: u8,
    states: StateFlags,
    map_fd: Option<u32>,
) -> Vec<u8> {
    let mut hdr = NetlinkHeader::default();
    hdr.flags = NLM_F_REQUEST | NLM_F_DUMP;
    hdr.sequence_number = seq;
    let mut req = NetlinkMessage::new(
        hdr,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: proto,
            extensions: ExtensionFlags::empty(),
            states,
            socket_id: if family == AF_INET6 {
                SocketId::new_v6()
            } else {
                SocketId::new_v4()
            },
        })
        .into(),
    );
    req.finalize();
    let mut tx = vec![0u8; req.buffer_len()];
    req.serialize(&mut tx);
    if let Some(fd) = map_fd {
        let mut fd_attr = Vec::new();
        push_nla(
            &mut fd_attr,
            SK_DIAG_BPF_STORAGE_REQ_MAP_FD,
            &fd.to_ne_bytes(),
        );
        push_nla(
            &mut tx,
            INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED,
            &fd_attr,
        );
        // nlmsg_len, the header's first field, covers the attribute.
        let len = u32::try_from(tx.len()).expect("a small request");
        tx[..4].copy_from_slice(&len.to_ne_bytes());
    }
    tx
}

/// Appends a netlink attribute, 4-byte aligned.
fn push_nla(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    buf.resize(align4(buf.len()), 0);
    let len = u16::try_from(4 + value.len()).expect("a small attribute");
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(align4(buf.len()), 0);
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn invalid(e: impl ToString) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

fn read_dump(
    sock: &Socket,
    seq: u32,
    proto: u8,
    buf: &mut Vec<u8>,
    out: &mut Vec<Diag>,
) -> io::Result<()> {
    loop {
        // A dump spans several datagrams of several messages each, ended by
        // NLMSG_DONE (which carries the error, if any).
        buf.clear();
        let n = sock.recv(buf, libc::MSG_TRUNC)?;
        if n > buf.capacity() {
            return Err(io::Error::other("sock_diag reply truncated"));
        }
        let mut off = 0;
        while off < n {
            let msg =
                NetlinkMessage::<SockDiagMessage>::deserialize(&buf[off..n]).map_err(invalid)?;
            let len = msg.header.length as usize;
            if len == 0 {
                return Err(invalid("zero-length netlink message"));
            }
            off += align4(len);
            if msg.header.sequence_number != seq {
                continue;
            }
            match msg.payload {
                NetlinkPayload::Done(d) if d.code == 0 => return Ok(()),
                NetlinkPayload::Done(d) => return Err(io::Error::from_raw_os_error(-d.code)),
                NetlinkPayload::Error(e) => return Err(e.to_io()),
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let storage = r.nlas.iter().find_map(|nla| match nla {
                        Nla::Other(a) if a.kind() & NLA_TYPE_MASK == INET_DIAG_SK_BPF_STORAGES => {
                            let mut v = vec![0; a.value_len()];
                            a.emit_value(&mut v);
                            storage_value(&v)
                        }
                        _ => None,
                    });
                    out.push(Diag {
                        family: r.header.family,
                        proto,
                        id: r.header.socket_id,
                        storage,
                    });
                }
                _ => {}
            }
        }
    }
}

/// The map value in an `INET_DIAG_SK_BPF_STORAGES` attribute's value: one
/// nested `SK_DIAG_BPF_STORAGE` per requested map (we ask for one) holding
/// the map's id and the value.
fn storage_value(storages: &[u8]) -> Option<Vec<u8>> {
    NlasIterator::new(storages)
        .filter_map(Result::ok)
        .filter(|s| s.kind() & NLA_TYPE_MASK == SK_DIAG_BPF_STORAGE)
        .find_map(|s| {
            NlasIterator::new(s.value())
                .filter_map(Result::ok)
                .find(|a| a.kind() & NLA_TYPE_MASK == SK_DIAG_BPF_STORAGE_MAP_VALUE)
                .map(|a| a.value().to_vec())
        })
}

/// Destroys the sockets over one netlink socket, up to 32 requests per
/// datagram: how many it destroyed (those already gone do not count) and
/// the errors, in the order of the sockets (one per socket that failed; a
/// failed send or receive stands for its whole batch).
pub fn destroy_all(sockets: &[Redirected]) -> (usize, Vec<io::Error>) {
    let sock = match open() {
        Ok(s) => s,
        Err(e) => return (0, vec![e]),
    };
    let mut destroyed = 0;
    let mut errors = Vec::new();
    let mut buf = Vec::with_capacity(8 * 1024);
    let mut seq = 0u32;
    for batch in sockets.chunks(DESTROY_BATCH) {
        let first = seq + 1;
        let mut tx = Vec::new();
        for s in batch {
            seq += 1;
            tx.extend_from_slice(&destroy_request(seq, s));
        }
        if let Err(e) = sock.send(&tx, 0) {
            errors.push(e);
            continue;
        }
        let mut pending: HashSet<u32> = (first..=seq).collect();
        while !pending.is_empty() {
            match read_acks(&sock, &mut buf, &mut pending) {
                Ok(codes) => {
                    for code in codes {
                        match code {
                            0 => destroyed += 1,
                            libc::ENOENT => {}
                            e => errors.push(io::Error::from_raw_os_error(e)),
                        }
                    }
                }
                Err(e) => {
                    // The batch's other acks are lost with it; those that
                    // arrive late have sequence numbers no batch waits for.
                    errors.push(e);
                    break;
                }
            }
        }
    }
    (destroyed, errors)
}

fn destroy_request(seq: u32, s: &Redirected) -> Vec<u8> {
    let mut hdr = NetlinkHeader::default();
    hdr.flags = NLM_F_REQUEST | NLM_F_ACK;
    hdr.sequence_number = seq;
    let mut req = NetlinkMessage::new(
        hdr,
        SockDiagDestroy::new(SockDiagMessage::InetRequest(InetRequest {
            family: s.family,
            protocol: s.proto,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: s.id.clone(),
        }))
        .into(),
    );
    req.finalize();
    let mut tx = vec![0u8; req.buffer_len()];
    req.serialize(&mut tx);
    tx
}

/// The errno (0: success) of each ack in one datagram for a request in
/// `pending`, which loses them.
fn read_acks(sock: &Socket, buf: &mut Vec<u8>, pending: &mut HashSet<u32>) -> io::Result<Vec<i32>> {
    buf.clear();
    let n = sock.recv(buf, libc::MSG_TRUNC)?;
    if n > buf.capacity() {
        return Err(io::Error::other("sock_diag ack truncated"));
    }
    let mut codes = Vec::new();
    let mut off = 0;
    while off < n {
        let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[off..n]).map_err(invalid)?;
        let len = msg.header.length as usize;
        if len == 0 {
            return Err(invalid("zero-length netlink message"));
        }
        off += align4(len);
        if let NetlinkPayload::Error(e) = msg.payload
            && pending.remove(&msg.header.sequence_number)
        {
            codes.push(e.raw_code().abs());
        }
    }
    Ok(codes)
}

/// A network namespace's identity (device and inode of its nsfs file).
pub fn netns_id_of(f: &File) -> io::Result<(u64, u64)> {
    let m = f.metadata()?;
    Ok((m.dev(), m.ino()))
}

/// [`netns_id_of`] of the namespace file at `path` (such as
/// `/proc/thread-self/ns/net`).
pub fn netns_id(path: &Path) -> io::Result<(u64, u64)> {
    let m = fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Runs `f` on a thread in network namespace `ns` (a `/proc/PID/ns/net`
/// file): sockets it opens, sock_diag ones included, are that
/// namespace's. The caller's threads stay where they are.
pub fn in_netns<T: Send>(ns: &File, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let fd = ns.as_raw_fd();
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("netns".into())
            .spawn_scoped(scope, move || {
                // SAFETY: setns reads only its two integer arguments and
                // changes only the calling thread's namespace; `fd` stays
                // open (`ns` is borrowed for the whole scope), and this
                // thread ends after `f`, so nothing else runs in there.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            })?;
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// One `/proc/PID/ns/net` file per network namespace that the processes of
/// `cgroup_dir` and its descendants are in. Processes and cgroups that go
/// away during the walk are skipped.
pub fn netns_of_cgroup(cgroup_dir: &Path) -> io::Result<Vec<File>> {
    // Reading a removed cgroup's files fails with ENODEV; a process that
    // exited has no /proc entry (ENOENT) or no namespaces (ESRCH).
    let gone = |e: &io::Error| {
        e.kind() == io::ErrorKind::NotFound
            || matches!(e.raw_os_error(), Some(libc::ENODEV | libc::ESRCH))
    };
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut dirs = vec![cgroup_dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if gone(&e) && dir != cgroup_dir => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            match entry.and_then(|e| Ok((e.file_type()?, e.path()))) {
                Ok((t, path)) if t.is_dir() => dirs.push(path),
                Ok(_) => {}
                Err(e) if gone(&e) => {}
                Err(e) => return Err(e),
            }
        }
        let procs = match fs::read_to_string(dir.join("cgroup.procs")) {
            Ok(p) => p,
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(e),
        };
        for line in procs.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let pid: u32 = line
                .parse()
                .map_err(|_| invalid(format!("{}: bad pid {line:?}", dir.display())))?;
            let ns = match File::open(format!("/proc/{pid}/ns/net")) {
                Ok(f) => f,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(e),
            };
            let m = ns.metadata()?;
            if seen.insert((m.dev(), m.ino())) {
                out.push(ns);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::{TcpListener, TcpStream, UdpSocket},
        os::fd::{AsFd as _, AsRawFd},
    };

    use discovery_common::{REVNAT_ENTRIES, RevNatEntry, TcpOpts};

    /// Destroys one socket; one already gone is no error.
    fn destroy(s: &Redirected) -> io::Result<()> {
        let (_, mut errors) = destroy_all(std::slice::from_ref(s));
        errors.pop().map_or(Ok(()), Err)
    }

    use super::*;

    fn entry(backend: SocketAddr, frontend: SocketAddr) -> RevNatEntry {
        let a = |s: SocketAddr| match s.ip() {
            IpAddr::V4(v) => Addr16::v4_mapped(v.octets()),
            IpAddr::V6(v) => Addr16(v.octets()),
        };
        RevNatEntry {
            backend_addr: a(backend),
            frontend_addr: a(frontend),
            backend_port: backend.port(),
            frontend_port: frontend.port(),
            pad: 0,
        }
    }

    fn revnat(entries: &[RevNatEntry], connected: u32) -> SockRevNat {
        let empty = RevNatEntry {
            backend_addr: Addr16::default(),
            frontend_addr: Addr16::default(),
            backend_port: 0,
            frontend_port: 0,
            pad: 0,
        };
        let mut st = SockRevNat {
            entries: [empty; REVNAT_ENTRIES],
            next: 0,
            stats_id: 7,
            tcp: TcpOpts::default(),
            connected,
            backend_id: 3,
        };
        st.entries[..entries.len()].copy_from_slice(entries);
        st
    }

    fn bytes_of(st: &SockRevNat) -> Vec<u8> {
        // SAFETY: SockRevNat is repr(C) integers with explicit padding
        // fields (no uninitialised bytes); the slice borrows `st`.
        unsafe {
            std::slice::from_raw_parts(
                (st as *const SockRevNat).cast::<u8>(),
                size_of::<SockRevNat>(),
            )
        }
        .to_vec()
    }

    /// INET_DIAG_SK_BPF_STORAGES's value as the kernel builds it.
    fn storages_attr(map_id: u32, value: &[u8]) -> Vec<u8> {
        let mut inner = Vec::new();
        const SK_DIAG_BPF_STORAGE_MAP_ID: u16 = 2;
        push_nla(
            &mut inner,
            SK_DIAG_BPF_STORAGE_MAP_ID,
            &map_id.to_ne_bytes(),
        );
        push_nla(&mut inner, SK_DIAG_BPF_STORAGE_MAP_VALUE, value);
        let mut outer = Vec::new();
        push_nla(&mut outer, SK_DIAG_BPF_STORAGE | NLA_F_NESTED, &inner);
        outer
    }

    #[test]
    fn a_nested_storage_attribute_parses_into_the_revnat_value() {
        let be: SocketAddr = "10.0.0.5:8080".parse().unwrap();
        let fe: SocketAddr = "127.0.0.9:80".parse().unwrap();
        let st = revnat(&[entry(be, fe)], 1);
        let attr = storages_attr(42, &bytes_of(&st));
        let value = storage_value(&attr).expect("a storage");
        assert_eq!(revnat_of(&value), Some(st));
        // A value of another size is not ours (another map, a layout
        // change): rejected, not misread.
        let short = storages_attr(42, &bytes_of(&st)[..size_of::<SockRevNat>() - 4]);
        assert_eq!(revnat_of(&storage_value(&short).unwrap()), None);
        let mut long = bytes_of(&st);
        long.extend_from_slice(&[0; 4]);
        assert_eq!(revnat_of(&long), None);
        // No SK_DIAG_BPF_STORAGE inside: nothing.
        let mut other = Vec::new();
        push_nla(&mut other, 5, &[1, 2, 3, 4]);
        assert_eq!(storage_value(&other), None);
    }

    fn diag(family: u8, src: SocketAddr, dst: SocketAddr, st: Option<&SockRevNat>) -> Diag {
        let mut id = if family == AF_INET6 {
            SocketId::new_v6()
        } else {
            SocketId::new_v4()
        };
        id.source_address = src.ip();
        id.source_port = src.port();
        id.destination_address = dst.ip();
        id.destination_port = dst.port();
        id.cookie = [1, 2, 3, 4, 5, 6, 7, 8];
        Diag {
            family,
            proto: IPPROTO_UDP,
            id,
            storage: st.map(bytes_of),
        }
    }

    /// No UDP socket in `disc_udp_conns`.
    const NONE: fn(u64) -> Option<RevNatEntry> = |_| None;

    #[test]
    fn udp_sockets_are_found_by_cookie_when_connected_where_their_entry_says() {
        let src: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let be: SocketAddr = "10.0.0.5:8080".parse().unwrap();
        let fe: SocketAddr = "127.0.0.9:80".parse().unwrap();
        let cookie = u64::from_ne_bytes([1, 2, 3, 4, 5, 6, 7, 8]);
        let conns = move |c: u64| (c == cookie).then(|| entry(be, fe));
        let r = redirected(diag(AF_INET, src, be, None), &conns).expect("kept");
        assert_eq!((r.proto, r.backend, r.frontend), (IPPROTO_UDP, be, fe));
        // Connected elsewhere since (to the backend directly, say).
        let other: SocketAddr = "10.0.0.7:8080".parse().unwrap();
        assert!(redirected(diag(AF_INET, src, other, None), &conns).is_none());
        let unknown = |_: u64| None;
        assert!(redirected(diag(AF_INET, src, be, None), &unknown).is_none());
    }

    #[test]
    fn only_sockets_connected_to_the_last_redirected_backend_are_kept() {
        let src: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let be: SocketAddr = "10.0.0.5:8080".parse().unwrap();
        let be2: SocketAddr = "10.0.0.6:8080".parse().unwrap();
        let fe: SocketAddr = "127.0.0.9:80".parse().unwrap();
        let fe2: SocketAddr = "127.0.0.9:81".parse().unwrap();
        let two = revnat(&[entry(be, fe), entry(be2, fe2)], 2);

        let r = redirected(diag(AF_INET, src, be2, Some(&two)), &NONE).expect("kept");
        assert_eq!((r.src, r.backend, r.frontend), (src, be2, fe2));
        assert_eq!(r.family, AF_INET);
        assert_eq!(r.id.cookie, [1, 2, 3, 4, 5, 6, 7, 8]);
        // entries[0] matches but is not the last connect().
        assert!(redirected(diag(AF_INET, src, be, Some(&two)), &NONE).is_none());
        // Connected elsewhere since, or never through a frontend.
        let other: SocketAddr = "10.0.0.7:8080".parse().unwrap();
        assert!(redirected(diag(AF_INET, src, other, Some(&two)), &NONE).is_none());
        let port: SocketAddr = "10.0.0.6:8081".parse().unwrap();
        assert!(redirected(diag(AF_INET, src, port, Some(&two)), &NONE).is_none());
        let never = revnat(&[entry(be, fe)], 0);
        assert!(redirected(diag(AF_INET, src, be, Some(&never)), &NONE).is_none());
        let bad = revnat(&[entry(be, fe)], REVNAT_ENTRIES as u32 + 1);
        assert!(redirected(diag(AF_INET, src, be, Some(&bad)), &NONE).is_none());
        // No storage.
        assert!(redirected(diag(AF_INET, src, be, None), &NONE).is_none());

        // An IPv6 socket connected to an IPv4 backend reports it v4-mapped:
        // the same backend, reported canonical.
        let src6: SocketAddr = "[::ffff:127.0.0.1]:40000".parse().unwrap();
        let be_mapped: SocketAddr = "[::ffff:10.0.0.6]:8080".parse().unwrap();
        let r = redirected(diag(AF_INET6, src6, be_mapped, Some(&two)), &NONE).expect("kept");
        assert_eq!((r.src, r.backend, r.frontend), (src, be2, fe2));
        assert_eq!(r.family, AF_INET6);
        // IPv6 proper.
        let be6: SocketAddr = "[fd00::5]:8080".parse().unwrap();
        let fe6: SocketAddr = "[fd00:ff::1]:80".parse().unwrap();
        let src6: SocketAddr = "[fd00::1]:40000".parse().unwrap();
        let st6 = revnat(&[entry(be6, fe6)], 1);
        let r = redirected(diag(AF_INET6, src6, be6, Some(&st6)), &NONE).expect("kept");
        assert_eq!((r.src, r.backend, r.frontend), (src6, be6, fe6));
    }

    #[test]
    fn the_storage_request_is_appended_aligned_and_counted() {
        let plain = dump_request(1, AF_INET, IPPROTO_TCP, StateFlags::ESTABLISHED, None);
        let len = |m: &[u8]| u32::from_ne_bytes(m[..4].try_into().unwrap()) as usize;
        assert_eq!(len(&plain), plain.len());
        assert_eq!(plain.len(), 16 + 56, "nlmsghdr + inet_diag_req_v2");
        let req = dump_request(1, AF_INET, IPPROTO_TCP, StateFlags::ESTABLISHED, Some(9));
        assert_eq!(
            &req[4..plain.len()],
            &plain[4..],
            "the request proper is unchanged"
        );
        assert_eq!(len(&req), req.len());
        assert_eq!(req.len() % 4, 0);
        let attrs = &req[align4(plain.len())..];
        let u16_at = |b: &[u8], i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        // The nested attribute: header 4, inner header 4, the fd 4.
        assert_eq!(u16_at(attrs, 0), 12);
        assert_eq!(
            u16_at(attrs, 2),
            INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED
        );
        assert_eq!(u16_at(attrs, 4), 8);
        assert_eq!(u16_at(attrs, 6), SK_DIAG_BPF_STORAGE_REQ_MAP_FD);
        assert_eq!(&attrs[8..12], &9u32.to_ne_bytes());
        assert_eq!(attrs.len(), 12);

        // An unaligned message gets padding before the attribute.
        let mut odd = vec![0u8; 18];
        push_nla(&mut odd, 1, &[7]);
        assert_eq!(odd.len(), 20 + 8);
        assert_eq!(u16_at(&odd, 20), 5, "the length excludes the padding");
        assert_eq!(odd[24], 7);
    }

    fn cookie(s: &impl AsRawFd) -> [u8; 8] {
        let mut c = 0u64;
        let mut len = size_of::<u64>() as libc::socklen_t;
        // SAFETY: SO_COOKIE writes at most `len` bytes (8) into `c`, which
        // lives across the call; `s` is an open socket.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&raw mut c).cast(),
                &raw mut len,
            )
        };
        assert_eq!(rc, 0, "SO_COOKIE: {}", io::Error::last_os_error());
        // sock_diag's cookie is two u32s: the low word, then the high.
        let mut out = [0; 8];
        out[..4].copy_from_slice(&(c as u32).to_ne_bytes());
        out[4..].copy_from_slice(&((c >> 32) as u32).to_ne_bytes());
        out
    }

    /// The dumped socket with this cookie and local port, as destroy takes
    /// it.
    fn find(all: &[Diag], proto: u8, local: SocketAddr, cookie: [u8; 8]) -> Redirected {
        let mut hits = all.iter().filter(|d| {
            d.proto == proto && d.id.source_port == local.port() && d.id.cookie == cookie
        });
        let d = hits
            .next()
            .unwrap_or_else(|| panic!("{local} not in the dump"));
        assert!(hits.next().is_none(), "{local} twice");
        assert!(d.storage.is_none(), "no storage was asked for");
        let dst = canonical(addr16(d.id.destination_address), d.id.destination_port);
        Redirected {
            proto: d.proto,
            family: d.family,
            src: canonical(addr16(d.id.source_address), d.id.source_port),
            backend: dst,
            frontend: dst,
            id: d.id.clone(),
        }
    }

    fn errno(e: &io::Error) -> i32 {
        e.raw_os_error()
            .unwrap_or_else(|| panic!("not an errno: {e}"))
    }

    #[test]
    fn dumped_sockets_are_destroyed_exactly() {
        for lo in ["127.0.0.1:0", "[::1]:0"] {
            let server = UdpSocket::bind(lo).unwrap();
            let udp = UdpSocket::bind(lo).unwrap();
            udp.connect(server.local_addr().unwrap()).unwrap();
            let bystander = UdpSocket::bind(lo).unwrap();
            bystander.connect(server.local_addr().unwrap()).unwrap();
            let listener = TcpListener::bind(lo).unwrap();
            let mut tcp = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (mut accepted, _) = listener.accept().unwrap();

            let all = dump(None, true).expect("sock_diag dump");
            let u = find(&all, IPPROTO_UDP, udp.local_addr().unwrap(), cookie(&udp));
            assert_eq!(u.backend, server.local_addr().unwrap());
            assert_eq!(u.src, udp.local_addr().unwrap());
            let t = find(&all, IPPROTO_TCP, tcp.local_addr().unwrap(), cookie(&tcp));
            assert_eq!(t.backend, listener.local_addr().unwrap());
            let b = find(
                &all,
                IPPROTO_UDP,
                bystander.local_addr().unwrap(),
                cookie(&bystander),
            );

            // A wrong cookie names no socket: nothing is destroyed.
            let mut stale = b.clone();
            stale.id.cookie[0] ^= 0xff;
            destroy(&stale).expect("a socket with another cookie is gone");
            assert_eq!(destroy_all(std::slice::from_ref(&stale)).0, 0);

            let (n, errors) = destroy_all(&[u.clone(), t.clone()]);
            assert!(errors.is_empty(), "{errors:?}");
            assert_eq!(n, 2, "{lo}");
            // Destroyed already: gone, no error, none counted.
            destroy(&u).expect("a second destroy");
            assert_eq!(destroy_all(&[u.clone(), t.clone()]).0, 0);

            let mut buf = [0u8; 16];
            let e = udp
                .recv(&mut buf)
                .expect_err("the UDP socket was destroyed");
            assert_eq!(errno(&e), libc::ECONNABORTED, "{lo}: {e}");
            let e = tcp
                .read(&mut buf)
                .expect_err("the TCP socket was destroyed");
            assert!(
                matches!(errno(&e), libc::ECONNABORTED | libc::ECONNRESET),
                "{lo}: {e}"
            );
            // The TCP peer was reset.
            let e = accepted.read(&mut buf).expect_err("reset");
            assert_eq!(errno(&e), libc::ECONNRESET, "{lo}: {e}");
            // The UDP socket reported the error once and is disconnected.
            let e = udp.peer_addr().expect_err("disconnected");
            assert_eq!(errno(&e), libc::ENOTCONN, "{lo}: {e}");
            let e = udp.send(b"x").expect_err("no destination");
            assert_eq!(errno(&e), libc::EDESTADDRREQ, "{lo}: {e}");
            // Not on our list: untouched.
            bystander.send(b"still here").unwrap();
            let (got, from) = server.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..got], b"still here");
            assert_eq!(from, bystander.local_addr().unwrap());
        }
    }

    #[test]
    fn in_netns_runs_on_a_thread_of_the_namespace() {
        let own = File::open("/proc/thread-self/ns/net").unwrap();
        let caller = std::thread::current().id();
        let (ran_on, ns) = in_netns(&own, || {
            let ns = fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
            (std::thread::current().id(), ns)
        })
        .expect("setns into our own namespace");
        assert_ne!(ran_on, caller);
        assert_eq!(ns, own.metadata().unwrap().ino());
        // What the agent runs in there: a dump, with a closure that
        // borrows from the caller.
        let ports: Vec<u16> = Vec::new();
        let all = in_netns(&own, || dump(None, true).map(|d| (d.len(), ports.len()))).unwrap();
        assert!(all.is_ok(), "{all:?}");
        // Not a namespace file: setns fails, f never runs.
        let not_ns = File::open("/proc/self/status").unwrap();
        let e = in_netns(&not_ns, || panic!("ran")).expect_err("not a namespace");
        assert_eq!(errno(&e), libc::EINVAL);
    }

    #[test]
    fn netns_of_cgroup_walks_the_tree_and_dedupes() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        fs::write(dir.path().join("cgroup.procs"), format!("{me}\n")).unwrap();
        let sub = dir.path().join("a/b");
        fs::create_dir_all(&sub).unwrap();
        // The same namespace again, and a process that is gone.
        fs::write(sub.join("cgroup.procs"), format!("{me}\n999999999\n")).unwrap();
        let found = netns_of_cgroup(dir.path()).unwrap();
        assert_eq!(found.len(), 1);
        let want = fs::metadata("/proc/self/ns/net").unwrap();
        let got = found[0].metadata().unwrap();
        assert_eq!((got.dev(), got.ino()), (want.dev(), want.ino()));
        // Empty and missing cgroup.procs: no namespaces, no error.
        let empty = tempfile::tempdir().unwrap();
        fs::create_dir(empty.path().join("x")).unwrap();
        fs::write(empty.path().join("cgroup.procs"), "").unwrap();
        assert!(netns_of_cgroup(empty.path()).unwrap().is_empty());
        // The cgroup itself must exist.
        let e = netns_of_cgroup(&dir.path().join("nope")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    /// A real `disc_revnat`-like map: an sk_storage map of SockRevNat
    /// values, which needs BTF for its key and value, written from here
    /// (no program is loaded or attached).
    mod sk_storage {
        use std::os::fd::{FromRawFd as _, OwnedFd};

        use super::*;

        const BPF_MAP_CREATE: libc::c_long = 0;
        const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
        const BPF_BTF_LOAD: libc::c_long = 18;
        const BPF_MAP_TYPE_SK_STORAGE: u32 = 24;

        #[repr(C)]
        #[derive(Default)]
        struct BtfLoad {
            btf: u64,
            log_buf: u64,
            size: u32,
            log_size: u32,
            log_level: u32,
        }

        #[repr(C)]
        #[derive(Default)]
        struct MapCreate {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
            map_flags: u32,
            inner_map_fd: u32,
            numa_node: u32,
            map_name: [u8; 16],
            map_ifindex: u32,
            btf_fd: u32,
            btf_key_type_id: u32,
            btf_value_type_id: u32,
        }

        #[repr(C)]
        #[derive(Default)]
        struct MapUpdate {
            map_fd: u32,
            pad: u32,
            key: u64,
            value: u64,
            flags: u64,
        }

        fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
            // SAFETY: `attr` is a repr(C) prefix of union bpf_attr for
            // `cmd`, of the size passed; the pointers inside it point at
            // buffers the caller keeps alive across the call.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    cmd,
                    (attr as *mut T).cast::<libc::c_void>(),
                    size_of::<T>() as libc::c_uint,
                )
            };
            if rc < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(rc)
            }
        }

        fn owned(fd: libc::c_long) -> OwnedFd {
            // SAFETY: the kernel just returned this new descriptor, owned
            // by nobody else.
            unsafe { OwnedFd::from_raw_fd(fd as i32) }
        }

        /// BTF with [1] int, [2] u8, [3] u8[value_size].
        fn btf(value_size: u32) -> Vec<u8> {
            let strings = b"\0int\0u8\0";
            let mut types = Vec::new();
            let mut words = |w: &[u32]| {
                w.iter()
                    .for_each(|w| types.extend_from_slice(&w.to_ne_bytes()))
            };
            const INT: u32 = 1 << 24;
            const ARRAY: u32 = 3 << 24;
            words(&[1, INT, 4, (1 << 24) | 32]); // signed, 32 bits
            words(&[5, INT, 1, 8]);
            words(&[0, ARRAY, 0, 2, 1, value_size]);
            let mut b = Vec::new();
            b.extend_from_slice(&0xeb9fu16.to_ne_bytes());
            b.extend_from_slice(&[1, 0]);
            for w in [
                24,
                0,
                types.len() as u32,
                types.len() as u32,
                strings.len() as u32,
            ] {
                b.extend_from_slice(&w.to_ne_bytes());
            }
            b.extend_from_slice(&types);
            b.extend_from_slice(strings);
            b
        }

        pub(super) struct Map(OwnedFd);

        impl Map {
            pub(super) fn create() -> Self {
                let value_size = size_of::<SockRevNat>() as u32;
                let btf = btf(value_size);
                let mut log = vec![0u8; 4096];
                let mut load = BtfLoad {
                    btf: btf.as_ptr() as u64,
                    log_buf: log.as_mut_ptr() as u64,
                    size: btf.len() as u32,
                    log_size: log.len() as u32,
                    log_level: 1,
                };
                let btf_fd = owned(bpf(BPF_BTF_LOAD, &mut load).unwrap_or_else(|e| {
                    let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
                    panic!("BTF_LOAD: {e}: {}", String::from_utf8_lossy(&log[..end]))
                }));
                let mut create = MapCreate {
                    map_type: BPF_MAP_TYPE_SK_STORAGE,
                    key_size: 4,
                    value_size,
                    map_flags: discovery_common::BPF_F_NO_PREALLOC as u32,
                    btf_fd: btf_fd.as_raw_fd() as u32,
                    btf_key_type_id: 1,
                    btf_value_type_id: 3,
                    ..Default::default()
                };
                create.map_name[..9].copy_from_slice(b"test_rvnt");
                Map(owned(bpf(BPF_MAP_CREATE, &mut create).expect("MAP_CREATE")))
            }

            pub(super) fn fd(&self) -> BorrowedFd<'_> {
                self.0.as_fd()
            }

            /// What connect() would store for the socket.
            pub(super) fn set(&self, sock: &impl AsRawFd, st: &SockRevNat) {
                let key: i32 = sock.as_raw_fd();
                let mut update = MapUpdate {
                    map_fd: self.0.as_raw_fd() as u32,
                    key: (&raw const key) as u64,
                    value: (st as *const SockRevNat) as u64,
                    ..Default::default()
                };
                bpf(BPF_MAP_UPDATE_ELEM, &mut update).expect("MAP_UPDATE_ELEM");
            }
        }
    }

    #[test]
    fn dump_redirected_reads_the_storage_of_tcp_and_udp_sockets() {
        let map = sk_storage::Map::create();
        let fe: SocketAddr = "127.0.0.9:80".parse().unwrap();
        let fe6: SocketAddr = "[fd00:ff::1]:80".parse().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let be = listener.local_addr().unwrap();
        let listener6 = TcpListener::bind("[::1]:0").unwrap();
        let be6 = listener6.local_addr().unwrap();
        let connect = |to: SocketAddr, st: SockRevNat| {
            let s = TcpStream::connect(to).unwrap();
            map.set(&s, &st);
            s
        };
        let tcp = connect(be, revnat(&[entry(be, fe)], 1));
        // An IPv6 socket connected to the IPv4 backend (v4-mapped).
        let mapped = SocketAddr::new("::ffff:127.0.0.1".parse().unwrap(), be.port());
        let tcp_mapped = connect(mapped, revnat(&[entry(be, fe)], 1));
        let tcp6 = connect(be6, revnat(&[entry(be, fe), entry(be6, fe6)], 2));
        // Storage, but connected elsewhere since; storage, never connected
        // through a frontend; no storage.
        let other: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let _moved = connect(be, revnat(&[entry(other, fe)], 1));
        let _never = connect(be, revnat(&[entry(be, fe)], 0));
        let _plain = TcpStream::connect(be).unwrap();

        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = server.local_addr().unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.connect(to).unwrap();
        map.set(&udp, &revnat(&[entry(to, fe)], 1));
        let udp6 = UdpSocket::bind("[::]:0").unwrap();
        udp6.connect(SocketAddr::new(
            "::ffff:127.0.0.1".parse().unwrap(),
            to.port(),
        ))
        .unwrap();
        map.set(&udp6, &revnat(&[entry(to, fe)], 1));

        // The map is new: only these sockets have storage in it.
        let found = dump_redirected(map.fd(), &NONE, true).expect("dump with storage");
        let got = |proto: u8| -> Vec<_> {
            let mut v: Vec<_> = found
                .redirected
                .iter()
                .filter(|r| r.proto == proto)
                .map(|r| (r.family, r.src, r.backend, r.frontend, r.id.cookie))
                .collect();
            v.sort();
            v
        };
        let as_v4 = |a: SocketAddr| SocketAddr::new("127.0.0.1".parse().unwrap(), a.port());
        let mut want_tcp = vec![
            (AF_INET, tcp.local_addr().unwrap(), be, fe, cookie(&tcp)),
            (
                AF_INET6,
                as_v4(tcp_mapped.local_addr().unwrap()),
                be,
                fe,
                cookie(&tcp_mapped),
            ),
            (
                AF_INET6,
                tcp6.local_addr().unwrap(),
                be6,
                fe6,
                cookie(&tcp6),
            ),
        ];
        want_tcp.sort();
        assert_eq!(got(IPPROTO_TCP), want_tcp);
        // UDP sockets carry no storage in dumps (see dump_redirected); if
        // a kernel adds it, these two are what it must find.
        let local = |s: &UdpSocket| s.local_addr().unwrap();
        let mut want_udp = vec![
            (AF_INET, local(&udp), to, fe, cookie(&udp)),
            (AF_INET6, as_v4(local(&udp6)), to, fe, cookie(&udp6)),
        ];
        want_udp.sort();
        let udp_found = got(IPPROTO_UDP);
        assert!(
            udp_found.is_empty() || udp_found == want_udp,
            "{udp_found:?}"
        );
        if udp_found.is_empty() {
            eprintln!("this kernel reports no socket storage for UDP sockets");
        }

        let (n, errors) = destroy_all(&found.redirected);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(n, found.redirected.len());
        let mut buf = [0u8; 4];
        for mut s in [&tcp, &tcp_mapped, &tcp6] {
            let e = s.read(&mut buf).unwrap_err();
            assert!(
                matches!(errno(&e), libc::ECONNABORTED | libc::ECONNRESET),
                "{e}"
            );
        }
        if !udp_found.is_empty() {
            for s in [&udp, &udp6] {
                assert_eq!(errno(&s.recv(&mut buf).unwrap_err()), libc::ECONNABORTED);
            }
        }
        // The others are untouched.
        for mut s in [&_moved, &_never, &_plain] {
            s.write_all(b"x").unwrap();
        }
    }
}
