//! The announcer's own address, for instances written as `0.0.0.0:P` or
//! `[::]:P` ("this host, on port P").
//!
//! The address is the one this host's kernel would send from: first toward
//! an etcd endpoint that is not on loopback (the network the fleet shares),
//! else along the default route. A UDP `connect()` does the route lookup
//! and sends nothing. Loopback endpoints are skipped because the classic
//! deployment runs an etcd member on every node at 127.0.0.1, and that
//! route says nothing about how other hosts reach this one.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs, UdpSocket};

use anyhow::bail;

/// Destinations whose route is the default route: TEST-NET-2 and the IPv6
/// documentation prefix are never configured on a real network, so a
/// route to them is the default one (or none).
const DEFAULT_ROUTE_PROBE_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const DEFAULT_ROUTE_PROBE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

/// The host part of an etcd endpoint (`http://host:port`, `host:port`),
/// resolved.
fn endpoint_addrs(endpoint: &str) -> Vec<SocketAddr> {
    let hostport = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest)
        .trim_end_matches('/');
    hostport
        .to_socket_addrs()
        .map(|a| a.collect())
        .unwrap_or_default()
}

/// The source address of the route toward `to`, or None without a route.
fn source_toward(to: SocketAddr) -> Option<IpAddr> {
    let local: SocketAddr = match to {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = UdpSocket::bind(local).ok()?;
    s.connect(to).ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// This host's address of the family of `want` (an unspecified address).
pub fn own_address(want: IpAddr, etcd_endpoints: &[String]) -> anyhow::Result<IpAddr> {
    let family = if want.is_ipv4() { "IPv4" } else { "IPv6" };
    for to in etcd_endpoints.iter().flat_map(|e| endpoint_addrs(e)) {
        if to.is_ipv4() != want.is_ipv4() || to.ip().is_loopback() {
            continue;
        }
        if let Some(ip) = source_toward(to) {
            return Ok(ip);
        }
    }
    let probe: IpAddr = match want {
        IpAddr::V4(_) => DEFAULT_ROUTE_PROBE_V4.into(),
        IpAddr::V6(_) => DEFAULT_ROUTE_PROBE_V6.into(),
    };
    match source_toward((probe, 9).into()) {
        Some(ip) if !ip.is_loopback() => Ok(ip),
        _ => bail!(
            "cannot find this host's {family} address for {want}: no etcd endpoint of that \
             family off loopback ({}) and no default {family} route; write the address \
             instead of {want}",
            etcd_endpoints.join(",")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_with_and_without_scheme() {
        assert_eq!(
            endpoint_addrs("http://127.0.0.1:2379"),
            vec!["127.0.0.1:2379".parse().unwrap()]
        );
        assert_eq!(
            endpoint_addrs("[::1]:2379/"),
            vec!["[::1]:2379".parse().unwrap()]
        );
        assert!(endpoint_addrs("no port").is_empty());
    }

    #[test]
    fn loopback_route_has_a_loopback_source() {
        // The kernel answers this lookup on every machine with loopback up.
        assert_eq!(
            source_toward("127.0.0.9:9".parse().unwrap()),
            Some("127.0.0.1".parse().unwrap())
        );
    }
}
