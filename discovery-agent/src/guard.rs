//! What a frontend may be, whatever etcd says.
//!
//! - `--allowed-frontends`: networks and port ranges any service may claim
//!   (checked when a service's value is parsed: the same on every node).
//! - This node's reserved addresses: its etcd endpoints and its metrics
//!   address. A frontend there would cut the agent (and `etcdctl`, and the
//!   announcers' lease keepalives) off from etcd at the next reconnect, with
//!   no way to learn that the service was removed again.
//! - Listening sockets on this node (`listeners`): a frontend on an address
//!   and port where a TCP listener or a bound UDP socket is (or a wildcard
//!   one on that port) would shadow it; refused unless the service opts in
//!   with `"takeover": true` (moving off a local HAProxy with no gap).
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs as _},
    str::FromStr,
};

use ipnet::IpNet;

use crate::listeners::Listeners;

/// One `--allowed-frontends` entry: `NET`, `NET:PORT` or `NET:LO-HI`, where
/// NET is an address or a CIDR network (`127.0.0.0/8`, `127.0.0.1:11211`,
/// `127.0.0.0/8:10000-19999`); IPv6 in brackets when a port follows
/// (`::1/128`, `[::1]:11211`, `[fd00::/8]:10000-19999`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowedFrontend {
    pub net: IpNet,
    pub ports: (u16, u16),
}

impl AllowedFrontend {
    pub fn contains(&self, a: SocketAddr) -> bool {
        self.net.contains(&a.ip()) && (self.ports.0..=self.ports.1).contains(&a.port())
    }
}

impl FromStr for AllowedFrontend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (net, ports) = if let Some(rest) = s.strip_prefix('[') {
            let (n, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("{s:?}: no ']' after the IPv6 network"))?;
            match after {
                "" => (n, None),
                p => (
                    n,
                    Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| format!("{s:?}: expected ':' after ']'"))?,
                    ),
                ),
            }
        } else if s.matches(':').count() > 1 {
            // Bare IPv6 takes no port (brackets do).
            (s, None)
        } else {
            match s.split_once(':') {
                Some((n, p)) => (n, Some(p)),
                None => (s, None),
            }
        };
        let net: IpNet = if net.contains('/') {
            net.parse()
                .map_err(|e| format!("{s:?}: network {net:?}: {e}"))?
        } else {
            let a: IpAddr = net
                .parse()
                .map_err(|e| format!("{s:?}: address {net:?}: {e}"))?;
            IpNet::from(a)
        };
        let port = |p: &str| -> Result<u16, String> {
            match p.parse::<u16>() {
                Ok(0) | Err(_) => Err(format!("{s:?}: port {p:?} is not 1-65535")),
                Ok(v) => Ok(v),
            }
        };
        let ports = match ports {
            None => (1, u16::MAX),
            Some(p) => match p.split_once('-') {
                Some((lo, hi)) => {
                    let (lo, hi) = (port(lo)?, port(hi)?);
                    if lo > hi {
                        return Err(format!("{s:?}: port range {lo}-{hi} is empty"));
                    }
                    (lo, hi)
                }
                None => {
                    let v = port(p)?;
                    (v, v)
                }
            },
        };
        Ok(Self { net, ports })
    }
}

impl fmt::Display for AllowedFrontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let net = if self.net.prefix_len() == self.net.max_prefix_len() {
            self.net.addr().to_string()
        } else {
            self.net.to_string()
        };
        let ports = match self.ports {
            (1, u16::MAX) => return write!(f, "{net}"),
            (lo, hi) if lo == hi => format!("{lo}"),
            (lo, hi) => format!("{lo}-{hi}"),
        };
        match self.net {
            IpNet::V6(_) => write!(f, "[{net}]:{ports}"),
            IpNet::V4(_) => write!(f, "{net}:{ports}"),
        }
    }
}

/// Why this node does not route a frontend.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    /// The agent's own connections need this address (`what` says which).
    Reserved(String),
    /// Something listens there (the listener's address: the frontend's
    /// own, or 0.0.0.0 / [::] for a wildcard one).
    Shadows(SocketAddr),
}

impl Refusal {
    /// Short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Reserved(_) => "reserved",
            Refusal::Shadows(_) => "listener",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Reserved(what) => write!(f, "reserved for this node's {what}"),
            Refusal::Shadows(l) => write!(
                f,
                "a socket on this node listens on {l}; set \"takeover\": true on the service \
                 to route it anyway"
            ),
        }
    }
}

/// This node's rules for frontends, with the last listener scan.
#[derive(Debug, Default)]
pub struct NodeGuard {
    reserved: Vec<(SocketAddr, String)>,
    listeners: Listeners,
}

/// `host:port` of an etcd endpoint URL (`http://127.0.0.1:2379`,
/// `https://etcd-1:2379`, `127.0.0.1:2379`), default port 2379.
fn endpoint_host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let hostport = rest.split('/').next().unwrap_or(rest);
    let has_port = match hostport.rsplit_once(':') {
        Some((h, p)) => !h.ends_with(':') && p.parse::<u16>().is_ok(),
        None => false,
    };
    if has_port {
        hostport.to_owned()
    } else {
        format!("{hostport}:2379")
    }
}

impl NodeGuard {
    /// Reserves every address the etcd endpoints resolve to, and the
    /// metrics address.
    pub fn new(etcd_endpoints: &[String], metrics: Option<std::net::SocketAddr>) -> Self {
        let mut reserved = Vec::new();
        for e in etcd_endpoints {
            let hp = endpoint_host_port(e);
            // `localhost` is loopback whatever the resolver says (RFC 6761):
            // a clean Debian root has no /etc/hosts to say so.
            if let Some((host, port)) = hp.rsplit_once(':')
                && (host.eq_ignore_ascii_case("localhost")
                    || host.to_ascii_lowercase().ends_with(".localhost"))
                && let Ok(port) = port.parse()
            {
                for ip in [
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(Ipv6Addr::LOCALHOST),
                ] {
                    reserved.push((SocketAddr::new(ip, port), format!("etcd endpoint {e}")));
                }
            }
            match hp.to_socket_addrs() {
                Ok(addrs) => {
                    for a in addrs {
                        reserved.push((crate::addr::canonical(a), format!("etcd endpoint {e}")));
                    }
                }
                Err(err) => tracing::warn!(endpoint = %e, error = %err,
                    "cannot resolve etcd endpoint; it is not protected from being a frontend"),
            }
        }
        if let Some(m) = metrics {
            reserved.push((crate::addr::canonical(m), "metrics address".to_owned()));
        }
        Self {
            reserved,
            listeners: Listeners::default(),
        }
    }

    /// Replaces the listener scan; returns whether it changed.
    pub fn set_listeners(&mut self, l: Listeners) -> bool {
        let changed = self.listeners != l;
        self.listeners = l;
        changed
    }

    /// Why `frontend` (for protocol `proto`) must not be routed on this
    /// node, if it must not. Reserved addresses are refused for both
    /// protocols and whatever the service says.
    pub fn refusal(&self, frontend: SocketAddr, proto: u8, takeover: bool) -> Option<Refusal> {
        if let Some((_, what)) = self.reserved.iter().find(|(a, _)| *a == frontend) {
            return Some(Refusal::Reserved(what.clone()));
        }
        if takeover {
            return None;
        }
        self.listeners
            .shadowed(proto, frontend.ip(), frontend.port())
            .map(|ip| Refusal::Shadows(SocketAddr::new(ip, frontend.port())))
    }
}

#[cfg(test)]
mod tests {
    use discovery_common::{IPPROTO_TCP, IPPROTO_UDP};

    use super::*;

    #[test]
    fn allowed_frontends_take_networks_and_ports() {
        let a: AllowedFrontend = "127.0.0.0/8".parse().unwrap();
        assert!(a.contains("127.1.2.3:1".parse().unwrap()));
        assert!(!a.contains("10.0.0.1:80".parse().unwrap()));
        let a: AllowedFrontend = "127.0.0.1:11211-11299".parse().unwrap();
        assert!(a.contains("127.0.0.1:11211".parse().unwrap()));
        assert!(a.contains("127.0.0.1:11299".parse().unwrap()));
        assert!(!a.contains("127.0.0.1:11300".parse().unwrap()));
        assert!(!a.contains("127.0.0.2:11211".parse().unwrap()));
        let a: AllowedFrontend = "127.0.0.0/8:10000-19999".parse().unwrap();
        assert!(a.contains("127.9.9.9:15000".parse().unwrap()));
        assert!(!a.contains("127.9.9.9:9999".parse().unwrap()));
        let a: AllowedFrontend = "169.254.1.1:53".parse().unwrap();
        assert!(a.contains("169.254.1.1:53".parse().unwrap()));
        assert_eq!(a.to_string(), "169.254.1.1:53");
        for (s, shown) in [
            ("127.0.0.0/8", "127.0.0.0/8"),
            ("127.0.0.1:11211-11299", "127.0.0.1:11211-11299"),
            ("127.0.0.0/8:10000-19999", "127.0.0.0/8:10000-19999"),
            ("::1/128", "::1"),
            ("::1", "::1"),
            ("[::1]:11211", "[::1]:11211"),
            ("[fd00::/8]:10000-19999", "[fd00::/8]:10000-19999"),
        ] {
            assert_eq!(s.parse::<AllowedFrontend>().unwrap().to_string(), shown);
        }
        let a: AllowedFrontend = "[::1]:11211".parse().unwrap();
        assert!(a.contains("[::1]:11211".parse().unwrap()));
        assert!(!a.contains("[::1]:11212".parse().unwrap()));
        assert!(!a.contains("127.0.0.1:11211".parse().unwrap()));
        for bad in [
            "nope",
            "127.0.0.0/33",
            "127.0.0.1:0",
            "127.0.0.1:99999",
            "127.0.0.1:20-10",
            "127.0.0.1:a-b",
            "[::1",
            "[::1]80",
            "[::1/129]",
        ] {
            let e = bad.parse::<AllowedFrontend>().unwrap_err();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn etcd_endpoints_and_metrics_are_reserved_for_both_protocols() {
        let g = NodeGuard::new(
            &[
                "http://127.0.0.1:2379".to_owned(),
                "https://127.0.0.5".to_owned(),
                "localhost:23790".to_owned(),
            ],
            Some("127.0.0.1:9464".parse().unwrap()),
        );
        for (f, what) in [
            ("127.0.0.1:2379", "etcd endpoint http://127.0.0.1:2379"),
            ("127.0.0.5:2379", "etcd endpoint https://127.0.0.5"),
            ("127.0.0.1:23790", "etcd endpoint localhost:23790"),
            ("[::1]:23790", "etcd endpoint localhost:23790"),
            ("127.0.0.1:9464", "metrics address"),
        ] {
            for proto in [IPPROTO_TCP, IPPROTO_UDP] {
                let r = g.refusal(f.parse().unwrap(), proto, true);
                assert_eq!(r, Some(Refusal::Reserved(what.to_owned())), "{f}");
            }
        }
        assert_eq!(
            g.refusal("127.0.0.1:2380".parse().unwrap(), IPPROTO_TCP, false),
            None
        );
    }

    #[test]
    fn listeners_are_shadowed_unless_the_service_takes_over() {
        let mut g = NodeGuard::new(&[], None);
        let mut l = Listeners::default();
        l.add(IPPROTO_UDP, "127.0.0.53".parse().unwrap(), 53, false);
        l.add(IPPROTO_TCP, "0.0.0.0".parse().unwrap(), 5432, false);
        assert!(g.set_listeners(l.clone()));
        assert!(!g.set_listeners(l));
        let dns: SocketAddr = "127.0.0.53:53".parse().unwrap();
        assert_eq!(
            g.refusal(dns, IPPROTO_UDP, false),
            Some(Refusal::Shadows(dns))
        );
        assert_eq!(g.refusal(dns, IPPROTO_TCP, false), None);
        assert_eq!(g.refusal(dns, IPPROTO_UDP, true), None);
        let pg: SocketAddr = "127.0.0.1:5432".parse().unwrap();
        assert_eq!(
            g.refusal(pg, IPPROTO_TCP, false),
            Some(Refusal::Shadows("0.0.0.0:5432".parse().unwrap()))
        );
    }
}
