//! The node's listening sockets, from the kernel's sock_diag netlink
//! interface (no /proc scan): TCP sockets in LISTEN and bound, unconnected
//! UDP sockets, IPv4 and IPv6. A frontend on an address where something
//! listens would shadow it; see `guard`.
use std::{
    collections::HashSet,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use discovery_common::{IPPROTO_TCP, IPPROTO_UDP};
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

/// Listening sockets by (protocol, address, port), as frontends see them:
/// an IPv6 socket on `[::]` takes every IPv6 address and, without
/// IPV6_V6ONLY, every IPv4 one too; one on `::ffff:a.b.c.d` is a.b.c.d.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Listeners {
    /// IPv4 as such (never v4-mapped).
    exact: HashSet<(u8, IpAddr, u16)>,
    /// 0.0.0.0, or a dual-stack [::]: every IPv4 address on that port.
    wildcard4: HashSet<(u8, u16)>,
    /// [::]: every IPv6 address on that port.
    wildcard6: HashSet<(u8, u16)>,
}

impl Listeners {
    pub fn add(&mut self, proto: u8, ip: IpAddr, port: u16, v6only: bool) {
        match ip {
            IpAddr::V4(a) if a.is_unspecified() => {
                self.wildcard4.insert((proto, port));
            }
            IpAddr::V6(a) if a.is_unspecified() => {
                self.wildcard6.insert((proto, port));
                if !v6only {
                    self.wildcard4.insert((proto, port));
                }
            }
            IpAddr::V6(a) => {
                let ip = a.to_ipv4_mapped().map_or(ip, IpAddr::V4);
                self.exact.insert((proto, ip, port));
            }
            IpAddr::V4(_) => {
                self.exact.insert((proto, ip, port));
            }
        }
    }

    /// The listener that `addr:port` would shadow, if any: itself or a
    /// wildcard on its port.
    pub fn shadowed(&self, proto: u8, addr: IpAddr, port: u16) -> Option<IpAddr> {
        let (wildcard, any) = match addr {
            IpAddr::V4(_) => (&self.wildcard4, IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            IpAddr::V6(_) => (&self.wildcard6, IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        };
        if self.exact.contains(&(proto, addr, port)) {
            Some(addr)
        } else if wildcard.contains(&(proto, port)) {
            Some(any)
        } else {
            None
        }
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard4.len() + self.wildcard6.len()
    }
}

/// One dump per (family, protocol): about 0.3 ms for a hundred sockets.
pub fn scan() -> io::Result<Listeners> {
    let mut sock = Socket::new(NETLINK_SOCK_DIAG)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut out = Listeners::default();
    let mut seq = 0;
    for family in [AF_INET, AF_INET6] {
        for (proto, states) in [
            (IPPROTO_TCP, StateFlags::LISTEN),
            // Bound and not connected (TCP_CLOSE): a UDP server socket.
            (IPPROTO_UDP, StateFlags::CLOSE),
        ] {
            seq += 1;
            dump(&sock, seq, family, proto, states, &mut buf, &mut out)?;
        }
    }
    Ok(out)
}

fn dump(
    sock: &Socket,
    seq: u32,
    family: u8,
    proto: u8,
    states: StateFlags,
    buf: &mut Vec<u8>,
    out: &mut Listeners,
) -> io::Result<()> {
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
    sock.send(&tx, 0)?;
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
            let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[off..n])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = msg.header.length as usize;
            if len == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "zero-length netlink message",
                ));
            }
            off += (len + 3) & !3;
            if msg.header.sequence_number != seq {
                continue;
            }
            match msg.payload {
                NetlinkPayload::Done(d) if d.code == 0 => return Ok(()),
                NetlinkPayload::Done(d) => return Err(io::Error::from_raw_os_error(-d.code)),
                NetlinkPayload::Error(e) => return Err(e.to_io()),
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let v6only = r.nlas.iter().any(|n| matches!(n, Nla::SkV6Only(true)));
                    let id = &r.header.socket_id;
                    out.add(proto, id.source_address, id.source_port, v6only);
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, UdpSocket};

    use super::*;

    #[test]
    fn wildcards_and_mapped_addresses_count_per_family() {
        let mut l = Listeners::default();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let lo6: IpAddr = "::1".parse().unwrap();
        let any4: IpAddr = "0.0.0.0".parse().unwrap();
        let any6: IpAddr = "::".parse().unwrap();
        l.add(IPPROTO_TCP, any4, 80, false);
        l.add(IPPROTO_UDP, any6, 53, false);
        l.add(IPPROTO_UDP, any6, 54, true);
        l.add(IPPROTO_TCP, "::ffff:127.0.0.2".parse().unwrap(), 22, false);
        l.add(IPPROTO_TCP, lo6, 23, true);
        assert_eq!(l.shadowed(IPPROTO_TCP, lo, 80), Some(any4));
        assert_eq!(
            l.shadowed(IPPROTO_TCP, lo6, 80),
            None,
            "0.0.0.0 is not IPv6"
        );
        assert_eq!(l.shadowed(IPPROTO_UDP, lo, 80), None);
        assert_eq!(l.shadowed(IPPROTO_UDP, lo, 53), Some(any4));
        assert_eq!(l.shadowed(IPPROTO_UDP, lo6, 53), Some(any6));
        assert_eq!(l.shadowed(IPPROTO_UDP, lo, 54), None, "v6only [::]");
        assert_eq!(l.shadowed(IPPROTO_UDP, lo6, 54), Some(any6));
        let two: IpAddr = "127.0.0.2".parse().unwrap();
        assert_eq!(l.shadowed(IPPROTO_TCP, two, 22), Some(two));
        assert_eq!(l.shadowed(IPPROTO_TCP, lo, 22), None);
        assert_eq!(l.shadowed(IPPROTO_TCP, lo, 23), None, "::1 is not IPv4");
        assert_eq!(l.shadowed(IPPROTO_TCP, lo6, 23), Some(lo6));
    }

    #[test]
    fn scan_sees_tcp_listeners_and_bound_udp_but_not_connected_udp() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let connected = UdpSocket::bind("127.0.0.1:0").unwrap();
        connected.connect(udp.local_addr().unwrap()).unwrap();
        let l = scan().expect("sock_diag dump");
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let port = |a: std::net::SocketAddr| a.port();
        assert!(
            l.shadowed(IPPROTO_TCP, lo, port(tcp.local_addr().unwrap()))
                .is_some()
        );
        assert!(
            l.shadowed(IPPROTO_UDP, lo, port(udp.local_addr().unwrap()))
                .is_some()
        );
        assert!(
            l.shadowed(IPPROTO_UDP, lo, port(connected.local_addr().unwrap()))
                .is_none(),
            "a connected UDP socket is a client, not a listener"
        );
    }
}
