//! Addresses as the maps hold them (16 bytes, IPv4 as `::ffff:a.b.c.d`,
//! ports in host order) and as people read them. The one place that
//! decodes v4-mapped addresses.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};

use discovery_common::{Addr16, IPPROTO_TCP, IPPROTO_UDP, ServiceKey};

/// An address and port as the maps hold them.
pub type Addr = (Addr16, u16);

pub fn from_v4(a: SocketAddrV4) -> Addr {
    (Addr16::v4_mapped(a.ip().octets()), a.port())
}

/// A v4-mapped IPv6 address as the IPv4 one it maps (scope and flow info
/// dropped): how addresses are compared and shown.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => SocketAddr::new(IpAddr::V6(*v6.ip()), v6.port()),
        },
        v4 => v4,
    }
}

/// Any socket address as the maps hold it (IPv4 v4-mapped).
pub fn from_socket(a: SocketAddr) -> Addr {
    match a {
        SocketAddr::V4(v4) => from_v4(v4),
        SocketAddr::V6(v6) => (Addr16(v6.ip().octets()), v6.port()),
    }
}

/// The socket address of a map address: IPv4 for a v4-mapped one.
pub fn to_socket(a: Addr) -> SocketAddr {
    match to_v4(a) {
        Some(v4) => SocketAddr::V4(v4),
        None => SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a.0.0)), a.1),
    }
}

/// The map key of a frontend and protocol.
pub fn service_key(frontend: SocketAddr, proto: u8) -> ServiceKey {
    let (addr, port) = from_socket(frontend);
    ServiceKey {
        addr,
        port,
        proto,
        pad: 0,
    }
}

/// The IPv4 socket address, if `a` is v4-mapped.
pub fn to_v4((a, port): Addr) -> Option<SocketAddrV4> {
    a.as_v4()
        .map(|o| SocketAddrV4::new(Ipv4Addr::from(o), port))
}

/// `1.2.3.4:80`, or `[::1]:80` for IPv6.
pub fn show(a: Addr) -> String {
    match to_v4(a) {
        Some(v4) => v4.to_string(),
        None => format!("[{}]:{}", Ipv6Addr::from(a.0.0), a.1),
    }
}

pub fn proto_name(proto: u8) -> &'static str {
    match proto {
        IPPROTO_TCP => "tcp",
        IPPROTO_UDP => "udp",
        _ => "?",
    }
}

/// `ip:port/proto` of a map key, for messages and labels.
pub fn frontend(key: &ServiceKey) -> String {
    format!("{}/{}", show((key.addr, key.port)), proto_name(key.proto))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapped_round_trips_and_v6_is_bracketed() {
        let a: SocketAddrV4 = "127.0.0.1:80".parse().unwrap();
        assert_eq!(to_v4(from_v4(a)), Some(a));
        assert_eq!(show(from_v4(a)), "127.0.0.1:80");
        let mut one = [0u8; 16];
        one[15] = 1;
        assert_eq!(to_v4((Addr16(one), 53)), None);
        assert_eq!(show((Addr16(one), 53)), "[::1]:53");
        let key = ServiceKey {
            addr: Addr16::v4_mapped([127, 0, 0, 1]),
            port: 53,
            proto: IPPROTO_UDP,
            pad: 0,
        };
        assert_eq!(frontend(&key), "127.0.0.1:53/udp");
    }
}
