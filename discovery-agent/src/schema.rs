//! The etcd contract: the key layout under the prefix, the value formats,
//! and their validation. Announcers, `discovery-agent service|backend`,
//! scripts and etcdctl all write what this module parses.
//!
//! ```text
//! <prefix>services/<name>                 {"frontend": "127.0.0.1:11211", "protocol": "tcp"}
//! <prefix>backends/<name>/<instance-id>   10.0.0.5:11211
//!                                         {"addr": "10.0.0.5:11211", "weight": 1}
//! <prefix>maintenance/<name>/<instance-id>  {"reason": "..."}  (any value)
//! ```
//!
//! Key paths: [`service_key_path`], [`backend_key_path`],
//! [`maintenance_key_path`]; [`parse_key`] classifies a key into a
//! [`KeyRef`]. Names: `<name>` matches `[a-z0-9][a-z0-9._-]{0,62}`
//! ([`valid_name`]); `<instance-id>` is 1-128 characters of
//! `[A-Za-z0-9._:-]` ([`valid_instance`]).
//!
//! Values: a service is a [`ServiceJson`] (parsed by [`parse_service`] into
//! a [`ServiceDef`]); a backend is `ip:port` or a [`BackendJson`] (parsed by
//! [`parse_backend`] into a [`BackendDef`]); a maintenance key's value is
//! not read. No value may exceed [`MAX_VALUE_LEN`] bytes.
//!
//! Backend states: *active*; *draining* (weight 0: no new connections unless
//! every backend of the service is draining); *maintenance* (an operator
//! override kept under its own key, so an announcer rewriting the backend
//! key cannot clear it: the backend gets no new connections at all).
//!
//! `protocol` is `tcp`, `udp` or `both` (default `tcp`); `weight` defaults to
//! 1, and 0 takes a backend out of rotation for new connections. Unknown JSON
//! fields are ignored (except inside `keepalive`, where a misspelt field is an
//! error). An invalid key or value is treated as absent and
//! reported ([`Invalid`]); it never affects another service.
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use crate::guard::AllowedFrontend;
use discovery_common::{IPPROTO_TCP, IPPROTO_UDP, TcpOpts};
use serde::{Deserialize, Serialize};

/// Largest value accepted; anything bigger is not a hand-written definition.
pub const MAX_VALUE_LEN: usize = 4096;
/// Largest weight accepted (HAProxy allows 256; leave headroom).
pub const MAX_WEIGHT: u32 = 65_535;

/// A service's `protocol`: which of TCP and UDP its frontend is routed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Both,
}

impl Protocol {
    /// The IP protocol numbers the frontend is routed for.
    pub fn ip_protos(self) -> &'static [u8] {
        match self {
            Protocol::Tcp => &[IPPROTO_TCP],
            Protocol::Udp => &[IPPROTO_UDP],
            Protocol::Both => &[IPPROTO_TCP, IPPROTO_UDP],
        }
    }
}

/// A valid `<prefix>services/<name>` value, as the agent uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceDef {
    /// One to [`MAX_FRONTENDS`] addresses, IPv4 and IPv6 alike (a service
    /// on `127.0.0.1:P` and `[::1]:P` serves `localhost:P` whichever
    /// address a client's resolver returns).
    pub frontends: Vec<SocketAddr>,
    pub protocol: Protocol,
    pub policy: Policy,
    pub check: Option<ServiceCheck>,
    /// Connect timeout, keepalive and user timeout of redirected TCP
    /// sockets; zeros keep the kernel's defaults.
    pub tcp: TcpOpts,
    /// Route it even over a socket listening on the frontend (see
    /// `ServiceJson::takeover`).
    pub takeover: bool,
    /// Reset redirected TCP connections to a backend that leaves (see
    /// `ServiceJson::shutdown_sessions`).
    pub shutdown_sessions: bool,
    /// etcd create revision: the oldest definition wins a frontend.
    pub create_revision: i64,
}

impl ServiceDef {
    /// Every (frontend, map key) the service claims: each frontend for
    /// each of its protocols.
    pub fn keys(&self) -> impl Iterator<Item = (SocketAddr, discovery_common::ServiceKey)> + '_ {
        self.frontends.iter().flat_map(move |&f| {
            self.protocol
                .ip_protos()
                .iter()
                .map(move |&p| (f, crate::addr::service_key(f, p)))
        })
    }
}

/// A valid `<prefix>backends/<name>/<instance-id>` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BackendDef {
    pub addr: SocketAddr,
    pub weight: u32,
}

/// Why a key or value was skipped. The message names the problem; callers
/// add the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("unknown key layout (expected services/<name> or backends/<name>/<instance-id>)")]
    Layout,
    #[error("invalid service name {0:?}: must match [a-z0-9][a-z0-9._-]{{0,62}}")]
    Name(String),
    #[error("invalid instance id {0:?}: 1-128 characters of [A-Za-z0-9._:-]")]
    Instance(String),
    #[error("value is {0} bytes, more than {MAX_VALUE_LEN}")]
    TooLarge(usize),
    #[error("value is not UTF-8")]
    NotUtf8,
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("invalid address {0:?}: expected ip:port, or [ipv6]:port")]
    Addr(String),
    #[error(
        "IPv6 address {0} has a zone (scope id): frontends and backends take global or loopback addresses"
    )]
    Scope(String),
    #[error("service has no frontend")]
    NoFrontend,
    #[error("service has {0} frontends; at most {MAX_FRONTENDS}")]
    TooManyFrontends(usize),
    #[error("frontend {0} is listed twice")]
    DuplicateFrontend(String),
    #[error("port 0 in {0}")]
    PortZero(String),
    #[error("address {0} cannot be a backend (unspecified, broadcast or multicast)")]
    BadBackendIp(String),
    #[error("frontend {0} is outside the allowed frontends {1} (--allowed-frontends)")]
    FrontendNotAllowed(String, String),
    #[error("weight {0} is above the maximum {MAX_WEIGHT}")]
    Weight(u64),
    #[error("check: {0}")]
    Check(String),
    /// A TCP option field (`connect_timeout`, `keepalive.idle`, ...).
    #[error("{0} {1}")]
    Tcp(&'static str, String),
}

/// A parsed key under the prefix: which service (and instance) it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRef {
    Service(String),
    Backend { service: String, instance: String },
    Maintenance { service: String, instance: String },
}

/// A service name: `[a-z0-9][a-z0-9._-]{0,62}`.
pub fn valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(c))
}

/// The service name rule, as an error that says it.
pub fn check_name(s: &str) -> Result<(), Invalid> {
    if valid_name(s) {
        Ok(())
    } else {
        Err(Invalid::Name(s.to_owned()))
    }
}

/// The instance id rule, as an error that says it.
pub fn check_instance(s: &str) -> Result<(), Invalid> {
    if valid_instance(s) {
        Ok(())
    } else {
        Err(Invalid::Instance(s.to_owned()))
    }
}

/// An instance id: 1-128 characters of `[A-Za-z0-9._:-]`, not `.` or `..`.
pub fn valid_instance(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._:-".contains(&c))
}

/// `<prefix>services/<name>`.
pub fn service_key_path(prefix: &str, name: &str) -> String {
    format!("{prefix}services/{name}")
}

/// `<prefix>backends/<service>/<instance>`.
pub fn backend_key_path(prefix: &str, service: &str, instance: &str) -> String {
    format!("{prefix}backends/{service}/{instance}")
}

/// `<prefix>maintenance/<service>/<instance>`.
pub fn maintenance_key_path(prefix: &str, service: &str, instance: &str) -> String {
    format!("{prefix}maintenance/{service}/{instance}")
}

/// Classifies a key. `Ok(None)` is a key of another subtree under the prefix
/// (reserved for later features) that the agent ignores.
pub fn parse_key(prefix: &str, key: &str) -> Result<Option<KeyRef>, Invalid> {
    let Some(rest) = key.strip_prefix(prefix) else {
        return Err(Invalid::Layout);
    };
    let mut parts = rest.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("services"), Some(name), None, None) => {
            if !valid_name(name) {
                return Err(Invalid::Name(name.to_owned()));
            }
            Ok(Some(KeyRef::Service(name.to_owned())))
        }
        (Some(kind @ ("backends" | "maintenance")), Some(name), Some(instance), None) => {
            if !valid_name(name) {
                return Err(Invalid::Name(name.to_owned()));
            }
            if !valid_instance(instance) {
                return Err(Invalid::Instance(instance.to_owned()));
            }
            let (service, instance) = (name.to_owned(), instance.to_owned());
            Ok(Some(if kind == "backends" {
                KeyRef::Backend { service, instance }
            } else {
                KeyRef::Maintenance { service, instance }
            }))
        }
        (Some("services" | "backends" | "maintenance"), ..) => Err(Invalid::Layout),
        _ => Ok(None),
    }
}

fn value_str(value: &[u8]) -> Result<&str, Invalid> {
    if value.len() > MAX_VALUE_LEN {
        return Err(Invalid::TooLarge(value.len()));
    }
    std::str::from_utf8(value).map_err(|_| Invalid::NotUtf8)
}

/// Frontends one service may have.
pub const MAX_FRONTENDS: usize = 4;

/// `ip:port` (IPv4) or `[ip]:port` (IPv6) with a port other than 0. A
/// v4-mapped IPv6 address (`[::ffff:127.0.0.1]:80`) is the IPv4 address it
/// maps: the maps hold one entry for both.
pub fn parse_addr(s: &str) -> Result<SocketAddr, Invalid> {
    let a = s
        .trim()
        .parse::<SocketAddr>()
        .map_err(|_| Invalid::Addr(s.to_owned()))?;
    if a.port() == 0 {
        return Err(Invalid::PortZero(a.to_string()));
    }
    match a {
        SocketAddr::V6(v6) if v6.scope_id() != 0 => Err(Invalid::Scope(a.to_string())),
        a => Ok(crate::addr::canonical(a)),
    }
}

/// How a service picks a backend for a new connection.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Deserialize,
    Serialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Weighted random per connection (per socket for unconnected UDP).
    #[default]
    Random,
    /// Weighted Maglev table keyed by the client's cgroup: each workload
    /// sticks to one backend; removing one of N backends moves about 1/N
    /// of the workloads.
    Consistent,
    /// Power of two choices on live connection counts kept in the kernel:
    /// new connections go mostly to the backends with fewer open ones.
    LeastConn,
}

/// The value of `<prefix>services/<name>`.
#[derive(Debug, Deserialize, Serialize)]
pub struct ServiceJson {
    /// `"127.0.0.1:11211"`, or a list: `["127.0.0.1:11211", "[::1]:11211"]`.
    pub frontend: FrontendJson,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "is_default_policy")]
    pub policy: Policy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckJson>,
    /// e.g. "500ms": a TCP connect to a backend fails after this long
    /// instead of after the kernel's SYN retries (about two minutes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    /// e.g. "30s": an established connection whose sent data (or keepalive
    /// probes) stay unacknowledged this long fails (TCP_USER_TIMEOUT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_timeout: Option<String>,
    /// TCP keepalive on redirected connections, so an idle connection to a
    /// backend that vanished is noticed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive: Option<KeepaliveJson>,
    /// Route the frontend even where a socket on the node listens on it:
    /// the step that moves a frontend off a local proxy (HAProxy) with no
    /// gap. Without it such a frontend is refused on that node.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub takeover: bool,
    /// Reset the established TCP connections that the programs redirected
    /// to a backend when it leaves the service or is ejected, so
    /// connection pools reconnect instead of waiting on a dead host
    /// (HAProxy's `on-marked-down shutdown-sessions`). Off: they stay.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shutdown_sessions: bool,
}

/// A service's `frontend`: one address or a list of them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum FrontendJson {
    One(String),
    Many(Vec<String>),
}

impl FrontendJson {
    /// One address as a string, several as a list.
    pub fn new(mut addrs: Vec<String>) -> Self {
        if addrs.len() == 1 {
            FrontendJson::One(addrs.remove(0))
        } else {
            FrontendJson::Many(addrs)
        }
    }

    pub fn addrs(&self) -> &[String] {
        match self {
            FrontendJson::One(a) => std::slice::from_ref(a),
            FrontendJson::Many(v) => v,
        }
    }
}

/// `{"idle": "30s", "interval": "5s", "probes": 3}`: after `idle` without
/// traffic, probe every `interval`; `probes` unanswered probes fail the
/// connection. `interval` and `probes` default to the kernel's settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeepaliveJson {
    pub idle: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<u16>,
}

/// Bounds of `connect_timeout`. Below 3 s the SYN gets an initial RTO of a
/// third of the timeout (needs the kernel's CONFIG_HZ; see the loader).
pub const MIN_CONNECT_TIMEOUT: Duration = Duration::from_millis(100);
pub const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(600);
/// Bounds of `user_timeout`.
pub const MIN_USER_TIMEOUT: Duration = Duration::from_secs(1);
pub const MAX_USER_TIMEOUT: Duration = Duration::from_secs(3600);
/// The kernel's limits for TCP_KEEPIDLE / TCP_KEEPINTVL (seconds) and
/// TCP_KEEPCNT.
pub const MAX_KEEPALIVE_SECS: u64 = 32_767;
pub const MAX_KEEPALIVE_PROBES: u16 = 127;

/// A duration field within `min..=max`, or an error naming the field.
fn bounded(
    field: &'static str,
    t: &str,
    min: Duration,
    max: Duration,
) -> Result<Duration, Invalid> {
    let d = humantime::parse_duration(t).map_err(|e| Invalid::Tcp(field, format!("{t:?}: {e}")))?;
    if !(min..=max).contains(&d) {
        return Err(Invalid::Tcp(
            field,
            format!("{t:?} is outside {min:?}..={max:?}"),
        ));
    }
    Ok(d)
}

/// Whole seconds within 1..=MAX_KEEPALIVE_SECS: the kernel's unit.
fn keepalive_secs(field: &'static str, t: &str) -> Result<u16, Invalid> {
    let d = bounded(
        field,
        t,
        Duration::from_secs(1),
        Duration::from_secs(MAX_KEEPALIVE_SECS),
    )?;
    if d.subsec_nanos() != 0 {
        return Err(Invalid::Tcp(field, format!("{t:?} is not whole seconds")));
    }
    Ok(d.as_secs() as u16)
}

impl ServiceJson {
    /// The TCP options this definition asks for.
    pub fn tcp_opts(&self) -> Result<TcpOpts, Invalid> {
        let ms = |d: Duration| d.as_millis() as u32;
        let mut o = TcpOpts::default();
        if let Some(t) = &self.connect_timeout {
            o.connect_timeout_ms = ms(bounded(
                "connect_timeout",
                t,
                MIN_CONNECT_TIMEOUT,
                MAX_CONNECT_TIMEOUT,
            )?);
        }
        if let Some(t) = &self.user_timeout {
            o.user_timeout_ms = ms(bounded(
                "user_timeout",
                t,
                MIN_USER_TIMEOUT,
                MAX_USER_TIMEOUT,
            )?);
        }
        if let Some(k) = &self.keepalive {
            o.keepalive_idle_s = keepalive_secs("keepalive.idle", &k.idle)?;
            if let Some(i) = &k.interval {
                o.keepalive_intvl_s = keepalive_secs("keepalive.interval", i)?;
            }
            if let Some(p) = k.probes {
                if !(1..=MAX_KEEPALIVE_PROBES).contains(&p) {
                    return Err(Invalid::Tcp(
                        "keepalive.probes",
                        format!("{p} is outside 1..={MAX_KEEPALIVE_PROBES}"),
                    ));
                }
                o.keepalive_probes = p;
            }
        }
        Ok(o)
    }
}

/// A service's active check, run by every agent against the backends it
/// routes to: `{"type": "tcp", "interval": "1s", "timeout": "300ms",
/// "rise": 2, "fall": 2}`, or `"type": "http"` with `"path"`. Commands are
/// not allowed here: whoever can write etcd must not run code on every node.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CheckJson {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default = "default_check_interval")]
    pub interval: String,
    #[serde(default = "default_check_timeout")]
    pub timeout: String,
    #[serde(default = "default_rise")]
    pub rise: u32,
    #[serde(default = "default_fall")]
    pub fall: u32,
}

// Defaults from [`crate::health::SERVICE_CHECK`].
fn default_check_interval() -> String {
    humantime::format_duration(crate::health::SERVICE_CHECK.interval).to_string()
}

fn default_check_timeout() -> String {
    humantime::format_duration(crate::health::SERVICE_CHECK.timeout).to_string()
}

fn default_rise() -> u32 {
    crate::health::SERVICE_CHECK.rise
}

fn default_fall() -> u32 {
    crate::health::SERVICE_CHECK.fall
}

/// A validated service check; [`ServiceCheck::for_backend`] makes the probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceCheck {
    /// None: TCP connect; Some(path): HTTP GET expecting 2xx.
    pub http_path: Option<String>,
    pub interval: std::time::Duration,
    pub timeout: std::time::Duration,
    pub rise: u32,
    pub fall: u32,
}

impl ServiceCheck {
    /// Agent checks run at most this often per backend.
    pub const MIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

    fn parse(j: &CheckJson) -> Result<Self, Invalid> {
        let bad = |why: String| Invalid::Check(why);
        let http_path = match j.kind.as_str() {
            "tcp" => None,
            "http" => {
                let p = j.path.clone().unwrap_or_else(|| "/".into());
                if !p.starts_with('/') {
                    return Err(bad(format!("path {p:?} must start with '/'")));
                }
                Some(p)
            }
            other => {
                return Err(bad(format!(
                    "type {other:?} is not allowed (tcp or http; commands only in announcers)"
                )));
            }
        };
        let dur = |s: &str, what: &str| {
            humantime::parse_duration(s).map_err(|e| bad(format!("{what} {s:?}: {e}")))
        };
        let c = Self {
            http_path,
            interval: dur(&j.interval, "interval")?,
            timeout: dur(&j.timeout, "timeout")?,
            rise: j.rise,
            fall: j.fall,
        };
        if c.interval < Self::MIN_INTERVAL {
            return Err(bad(format!(
                "interval {:?} is below {:?}",
                c.interval,
                Self::MIN_INTERVAL
            )));
        }
        if c.timeout.is_zero() || c.timeout > c.interval {
            return Err(bad(format!(
                "timeout {:?} must be above zero and at most the interval",
                c.timeout
            )));
        }
        if c.rise == 0 || c.fall == 0 {
            return Err(bad("rise and fall must be at least 1".into()));
        }
        Ok(c)
    }

    /// The probe of this check against one backend.
    pub fn for_backend(&self, addr: SocketAddr) -> crate::health::Check {
        use crate::health::{Check, CheckKind};
        Check {
            kind: match &self.http_path {
                None => CheckKind::Tcp { target: addr },
                Some(path) => CheckKind::Http {
                    url: format!("http://{addr}{path}"),
                },
            },
            interval: self.interval,
            timeout: self.timeout,
            rise: self.rise,
            fall: self.fall,
        }
    }
}

fn is_default_policy(p: &Policy) -> bool {
    *p == Policy::Random
}

fn default_protocol() -> Protocol {
    Protocol::Tcp
}

/// The fields of [`ServiceJson`], [`CheckJson`] and [`BackendJson`] as
/// written in etcd: an unknown one is ignored and reported (see `hints`).
/// A unit test keeps these lists equal to the structs.
pub const SERVICE_FIELDS: &[&str] = &[
    "frontend",
    "protocol",
    "policy",
    "check",
    "connect_timeout",
    "user_timeout",
    "keepalive",
    "takeover",
    "shutdown_sessions",
];
pub const CHECK_FIELDS: &[&str] = &["type", "path", "interval", "timeout", "rise", "fall"];
pub const BACKEND_FIELDS: &[&str] = &["addr", "weight"];

/// The JSON form of `<prefix>backends/<name>/<instance-id>` (a plain
/// `ip:port` is also accepted).
#[derive(Debug, Deserialize, Serialize)]
pub struct BackendJson {
    pub addr: String,
    #[serde(default = "default_weight")]
    pub weight: u64,
}

fn default_weight() -> u64 {
    1
}

/// Validates a service value; `allowed` are the frontends this agent may
/// route (`--allowed-frontends`).
pub fn parse_service(
    value: &[u8],
    allowed: &[AllowedFrontend],
    create_revision: i64,
) -> Result<ServiceDef, Invalid> {
    let s = value_str(value)?;
    let j: ServiceJson = serde_json::from_str(s).map_err(|e| Invalid::Json(e.to_string()))?;
    let addrs = j.frontend.addrs();
    if addrs.is_empty() {
        return Err(Invalid::NoFrontend);
    }
    if addrs.len() > MAX_FRONTENDS {
        return Err(Invalid::TooManyFrontends(addrs.len()));
    }
    let mut frontends = Vec::with_capacity(addrs.len());
    for a in addrs {
        let frontend = parse_addr(a)?;
        if !allowed.iter().any(|n| n.contains(frontend)) {
            let ranges = allowed
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(",");
            return Err(Invalid::FrontendNotAllowed(frontend.to_string(), ranges));
        }
        if frontends.contains(&frontend) {
            return Err(Invalid::DuplicateFrontend(frontend.to_string()));
        }
        frontends.push(frontend);
    }
    let check = j.check.as_ref().map(ServiceCheck::parse).transpose()?;
    let tcp = j.tcp_opts()?;
    Ok(ServiceDef {
        frontends,
        protocol: j.protocol,
        policy: j.policy,
        check,
        tcp,
        takeover: j.takeover,
        shutdown_sessions: j.shutdown_sessions,
        create_revision,
    })
}

/// Validates a backend value (`ip:port` or [`BackendJson`]).
pub fn parse_backend(value: &[u8]) -> Result<BackendDef, Invalid> {
    let s = value_str(value)?.trim();
    let (addr, weight) = if s.starts_with('{') {
        let j: BackendJson = serde_json::from_str(s).map_err(|e| Invalid::Json(e.to_string()))?;
        (parse_addr(&j.addr)?, j.weight)
    } else {
        (parse_addr(s)?, 1)
    };
    let ip = addr.ip();
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    if ip.is_unspecified() || broadcast || ip.is_multicast() {
        return Err(Invalid::BadBackendIp(addr.to_string()));
    }
    if weight > u64::from(MAX_WEIGHT) {
        return Err(Invalid::Weight(weight));
    }
    Ok(BackendDef {
        addr,
        weight: weight as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/discovery/";

    #[test]
    fn keys_are_classified() {
        assert_eq!(
            parse_key(P, "/discovery/services/memcached").unwrap(),
            Some(KeyRef::Service("memcached".into()))
        );
        assert_eq!(
            parse_key(P, "/discovery/backends/memcached/host-1:11211").unwrap(),
            Some(KeyRef::Backend {
                service: "memcached".into(),
                instance: "host-1:11211".into()
            })
        );
        assert_eq!(parse_key(P, "/discovery/consumers/x/y").unwrap(), None);
        assert_eq!(
            parse_key(P, "/discovery/services/Mem").unwrap_err(),
            Invalid::Name("Mem".into())
        );
        assert_eq!(
            parse_key(P, "/discovery/services/a/b").unwrap_err(),
            Invalid::Layout
        );
        assert_eq!(
            parse_key(P, "/discovery/backends/a/..").unwrap_err(),
            Invalid::Instance("..".into())
        );
        assert!(parse_key(P, "/discovery/backends/a").is_err());
        assert!(parse_key(P, "/discovery/services/").is_err());
    }

    #[test]
    fn names_follow_the_documented_pattern() {
        assert!(valid_name("a"));
        assert!(valid_name("mc-router.v2_x"));
        assert!(valid_name(&"a".repeat(63)));
        assert!(!valid_name(&"a".repeat(64)));
        assert!(!valid_name("-a"));
        assert!(!valid_name(".a"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(""));
    }

    #[test]
    fn service_values() {
        let allowed = ["127.0.0.0/8".parse().unwrap()];
        let d = parse_service(br#"{"frontend":"127.0.0.1:11211"}"#, &allowed, 5).unwrap();
        assert_eq!(d.protocol, Protocol::Tcp);
        assert_eq!(d.frontends, ["127.0.0.1:11211".parse().unwrap()]);
        let d = parse_service(
            br#"{"frontend":"127.0.0.9:53","protocol":"both","extra":[1]}"#,
            &allowed,
            5,
        )
        .unwrap();
        assert_eq!(d.protocol, Protocol::Both);
        assert_eq!(d.policy, Policy::Random);
        let d = parse_service(
            br#"{"frontend":"127.0.0.9:53","policy":"consistent"}"#,
            &allowed,
            5,
        )
        .unwrap();
        assert_eq!(d.policy, Policy::Consistent);
        assert_eq!(
            parse_service(
                br#"{"frontend":"127.0.0.9:53","policy":"least_conn"}"#,
                &allowed,
                5
            )
            .unwrap()
            .policy,
            Policy::LeastConn
        );
        assert!(matches!(
            parse_service(
                br#"{"frontend":"127.0.0.9:53","policy":"roundrobin"}"#,
                &allowed,
                5
            ),
            Err(Invalid::Json(_))
        ));
        assert!(matches!(
            parse_service(br#"{"frontend":"10.0.0.1:80"}"#, &allowed, 1),
            Err(Invalid::FrontendNotAllowed(..))
        ));
        assert!(matches!(
            parse_service(br#"{"frontend":"[::1]:80"}"#, &allowed, 1),
            Err(Invalid::FrontendNotAllowed(..))
        ));
        // Several frontends, IPv6 among them; v4-mapped is IPv4.
        let both = ["127.0.0.0/8".parse().unwrap(), "::1".parse().unwrap()];
        let d = parse_service(
            br#"{"frontend":["127.0.0.1:80","[::1]:80"],"protocol":"both"}"#,
            &both,
            1,
        )
        .unwrap();
        assert_eq!(
            d.frontends,
            ["127.0.0.1:80".parse().unwrap(), "[::1]:80".parse().unwrap()]
        );
        assert_eq!(d.keys().count(), 4);
        assert!(matches!(
            parse_service(
                br#"{"frontend":["127.0.0.1:80","[::ffff:127.0.0.1]:80"]}"#,
                &both,
                1
            ),
            Err(Invalid::DuplicateFrontend(_))
        ));
        assert!(matches!(
            parse_service(br#"{"frontend":[]}"#, &both, 1),
            Err(Invalid::NoFrontend)
        ));
        assert!(matches!(
            parse_service(
                br#"{"frontend":["127.0.0.1:1","127.0.0.1:2","127.0.0.1:3","127.0.0.1:4","127.0.0.1:5"]}"#,
                &both,
                1
            ),
            Err(Invalid::TooManyFrontends(5))
        ));
        assert!(matches!(
            parse_service(
                br#"{"frontend":"127.0.0.1:80","protocol":"sctp"}"#,
                &allowed,
                1
            ),
            Err(Invalid::Json(_))
        ));
        assert!(matches!(
            parse_service(b"127.0.0.1:80", &allowed, 1),
            Err(Invalid::Json(_))
        ));
        assert!(matches!(
            parse_service(br#"{"frontend":"127.0.0.1:0"}"#, &allowed, 1),
            Err(Invalid::PortZero(_))
        ));
    }

    #[test]
    fn tcp_options() {
        let allowed = ["127.0.0.0/8".parse().unwrap()];
        let tcp = |extra: &str| {
            let v = format!(r#"{{"frontend":"127.0.0.1:80"{extra}}}"#);
            parse_service(v.as_bytes(), &allowed, 1).map(|d| d.tcp)
        };
        assert_eq!(tcp("").unwrap(), TcpOpts::default());
        let t = tcp(r#","connect_timeout":"250ms","user_timeout":"20s",
               "keepalive":{"idle":"30s","interval":"5s","probes":3}"#)
        .unwrap();
        assert_eq!(
            (t.connect_timeout_ms, t.user_timeout_ms),
            (250, 20_000),
            "{t:?}"
        );
        assert_eq!(
            (t.keepalive_idle_s, t.keepalive_intvl_s, t.keepalive_probes),
            (30, 5, 3)
        );
        let t = tcp(r#","keepalive":{"idle":"1m"}"#).unwrap();
        assert_eq!((t.keepalive_idle_s, t.keepalive_intvl_s), (60, 0));
        for (extra, field) in [
            (r#","connect_timeout":"50ms""#, "connect_timeout"),
            (r#","connect_timeout":"soon""#, "connect_timeout"),
            (r#","user_timeout":"2h""#, "user_timeout"),
            (r#","keepalive":{"idle":"1500ms"}"#, "keepalive.idle"),
            (r#","keepalive":{"idle":"10h"}"#, "keepalive.idle"),
            (
                r#","keepalive":{"idle":"1s","interval":"0s"}"#,
                "keepalive.interval",
            ),
            (
                r#","keepalive":{"idle":"1s","probes":0}"#,
                "keepalive.probes",
            ),
        ] {
            match tcp(extra) {
                Err(Invalid::Tcp(f, _)) => assert_eq!(f, field, "{extra}"),
                other => panic!("{extra}: {other:?}"),
            }
        }
        // A misspelt keepalive field is an error, not silently ignored.
        assert!(matches!(
            tcp(r#","keepalive":{"idle":"1s","intervall":"1s"}"#),
            Err(Invalid::Json(_))
        ));
    }

    #[test]
    fn backend_values() {
        assert_eq!(
            parse_backend(b"10.0.0.5:11211\n").unwrap(),
            BackendDef {
                addr: "10.0.0.5:11211".parse().unwrap(),
                weight: 1
            }
        );
        assert_eq!(
            parse_backend(br#"{"addr":"127.0.0.2:80","weight":0}"#)
                .unwrap()
                .weight,
            0
        );
        assert!(matches!(parse_backend(b"::1"), Err(Invalid::Addr(_))));
        assert_eq!(
            parse_backend(b"[2001:db8::5]:11211").unwrap().addr,
            "[2001:db8::5]:11211".parse().unwrap()
        );
        assert_eq!(
            parse_backend(br#"{"addr":"[::ffff:10.0.0.5]:80"}"#)
                .unwrap()
                .addr,
            "10.0.0.5:80".parse().unwrap(),
            "v4-mapped is IPv4"
        );
        assert!(matches!(
            parse_backend(b"[fe80::1%2]:80"),
            Err(Invalid::Scope(_))
        ));
        assert!(matches!(parse_backend(b"host:80"), Err(Invalid::Addr(_))));
        assert!(matches!(
            parse_backend(b"0.0.0.0:80"),
            Err(Invalid::BadBackendIp(_))
        ));
        assert!(matches!(
            parse_backend(br#"{"addr":"127.0.0.2:80","weight":-1}"#),
            Err(Invalid::Json(_))
        ));
        assert!(matches!(
            parse_backend(br#"{"addr":"127.0.0.2:80","weight":70000}"#),
            Err(Invalid::Weight(70000))
        ));
        assert!(matches!(
            parse_backend(&[b'1'; 5000]),
            Err(Invalid::TooLarge(5000))
        ));
        assert!(matches!(
            parse_backend(&[0xff, 0xfe]),
            Err(Invalid::NotUtf8)
        ));
    }

    #[test]
    fn allowed_frontends_limit_ports_too() {
        let allowed = ["127.0.0.1:11211-11299".parse().unwrap()];
        assert!(parse_service(br#"{"frontend":"127.0.0.1:11212"}"#, &allowed, 1).is_ok());
        let e = parse_service(br#"{"frontend":"127.0.0.1:22"}"#, &allowed, 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "frontend 127.0.0.1:22 is outside the allowed frontends 127.0.0.1:11211-11299 \
             (--allowed-frontends)"
        );
    }
}
