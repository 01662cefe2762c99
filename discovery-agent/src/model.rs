//! The etcd layout (the contract with announcers, scripts and etcdctl) and
//! the desired routing state derived from it.
//!
//! ```text
//! <prefix>services/<name>                 {"frontend": "127.0.0.1:11211", "protocol": "tcp"}
//! <prefix>backends/<name>/<instance-id>   10.0.0.5:11211
//!                                         {"addr": "10.0.0.5:11211", "weight": 1}
//! <prefix>maintenance/<name>/<instance-id>  {"reason": "..."}  (any value)
//! ```
//!
//! Backend states: *active*; *draining* (weight 0: no new connections unless
//! every backend of the service is draining); *maintenance* (an operator
//! override kept under its own key, so an announcer rewriting the backend
//! key cannot clear it: the backend gets no new connections at all).
//!
//! `protocol` is `tcp`, `udp` or `both` (default `tcp`); `weight` defaults to
//! 1, and 0 takes a backend out of rotation for new connections. Unknown JSON
//! fields are ignored. An invalid key or value is treated as absent and
//! reported; it never affects another service.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use crate::guard::{AllowedFrontend, NodeGuard, Refusal};
use discovery_common::{IPPROTO_TCP, IPPROTO_UDP, ServiceKey, TcpOpts, v4_mapped};
use serde::{Deserialize, Serialize};

/// Largest value accepted; anything bigger is not a hand-written definition.
pub const MAX_VALUE_LEN: usize = 4096;
/// Largest weight accepted (HAProxy allows 256; leave headroom).
pub const MAX_WEIGHT: u32 = 65_535;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Both,
}

impl Protocol {
    pub fn ip_protos(self) -> &'static [u8] {
        match self {
            Protocol::Tcp => &[IPPROTO_TCP],
            Protocol::Udp => &[IPPROTO_UDP],
            Protocol::Both => &[IPPROTO_TCP, IPPROTO_UDP],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceDef {
    pub frontend: SocketAddrV4,
    pub protocol: Protocol,
    pub policy: Policy,
    pub check: Option<ServiceCheck>,
    /// Connect timeout, keepalive and user timeout of redirected TCP
    /// sockets; zeros keep the kernel's defaults.
    pub tcp: TcpOpts,
    /// Route it even over a socket listening on the frontend (see
    /// `ServiceJson::takeover`).
    pub takeover: bool,
    /// etcd create revision: the oldest definition wins a frontend.
    pub create_revision: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BackendDef {
    pub addr: SocketAddrV4,
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
    #[error("invalid address {0:?}: expected ip:port")]
    Addr(String),
    #[error("IPv6 address {0} is not supported yet")]
    Ipv6(String),
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

/// A parsed key under the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRef {
    Service(String),
    Backend { service: String, instance: String },
    Maintenance { service: String, instance: String },
}

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

pub fn valid_instance(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._:-".contains(&c))
}

pub fn service_key_path(prefix: &str, name: &str) -> String {
    format!("{prefix}services/{name}")
}

pub fn backend_key_path(prefix: &str, service: &str, instance: &str) -> String {
    format!("{prefix}backends/{service}/{instance}")
}

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

pub fn parse_addr(s: &str) -> Result<SocketAddrV4, Invalid> {
    match s.trim().parse::<SocketAddr>() {
        Ok(SocketAddr::V4(a)) if a.port() == 0 => Err(Invalid::PortZero(a.to_string())),
        Ok(SocketAddr::V4(a)) => Ok(a),
        Ok(SocketAddr::V6(a)) => Err(Invalid::Ipv6(a.to_string())),
        Err(_) => match s.trim().parse::<IpAddr>() {
            Ok(IpAddr::V6(a)) => Err(Invalid::Ipv6(a.to_string())),
            _ => Err(Invalid::Addr(s.to_owned())),
        },
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
    pub frontend: String,
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
    pub fn for_backend(&self, addr: SocketAddrV4) -> crate::health::Check {
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

pub fn parse_service(
    value: &[u8],
    allowed: &[AllowedFrontend],
    create_revision: i64,
) -> Result<ServiceDef, Invalid> {
    let s = value_str(value)?;
    let j: ServiceJson = serde_json::from_str(s).map_err(|e| Invalid::Json(e.to_string()))?;
    let frontend = parse_addr(&j.frontend)?;
    if !allowed.iter().any(|n| n.contains(frontend)) {
        let ranges = allowed
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(",");
        return Err(Invalid::FrontendNotAllowed(frontend.to_string(), ranges));
    }
    let check = j.check.as_ref().map(ServiceCheck::parse).transpose()?;
    let tcp = j.tcp_opts()?;
    Ok(ServiceDef {
        frontend,
        protocol: j.protocol,
        policy: j.policy,
        check,
        tcp,
        takeover: j.takeover,
        create_revision,
    })
}

pub fn parse_backend(value: &[u8]) -> Result<BackendDef, Invalid> {
    let s = value_str(value)?.trim();
    let (addr, weight) = if s.starts_with('{') {
        let j: BackendJson = serde_json::from_str(s).map_err(|e| Invalid::Json(e.to_string()))?;
        (parse_addr(&j.addr)?, j.weight)
    } else {
        (parse_addr(s)?, 1)
    };
    let ip = addr.ip();
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
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

/// (name, definition, [(instance, backend, in maintenance)]).
pub type ServiceView<'a> = (&'a str, &'a ServiceDef, Vec<(&'a str, BackendDef, bool)>);

/// What one frontend should route to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredService {
    pub service: String,
    pub frontend: SocketAddrV4,
    pub policy: Policy,
    pub check: Option<ServiceCheck>,
    pub tcp: TcpOpts,
    /// Sorted, so the same set always gives the same slot table.
    pub backends: Vec<BackendDef>,
}

/// A frontend claimed by more than one service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Conflict {
    pub frontend: String,
    pub winner: String,
    pub loser: String,
}

/// A frontend this node does not route although a valid service claims it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Refused {
    pub service: String,
    /// `addr:port/proto`.
    pub frontend: String,
    pub why: Refusal,
}

#[derive(Debug, Default)]
pub struct Desired {
    pub services: BTreeMap<ServiceKey, DesiredService>,
    pub conflicts: BTreeSet<Conflict>,
    /// Frontends the node guard refused, with the service that won them.
    pub refused: BTreeMap<ServiceKey, Refused>,
}

pub fn service_key(frontend: SocketAddrV4, proto: u8) -> ServiceKey {
    ServiceKey {
        addr: v4_mapped(frontend.ip().octets()),
        port: frontend.port(),
        proto,
        pad: 0,
    }
}

/// Outcome of applying one etcd key, for logging by the caller.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    Changed,
    Ignored,
    Invalid(Invalid),
}

/// The valid definitions currently in etcd, and the invalid keys with why.
#[derive(Debug)]
pub struct Model {
    prefix: String,
    allowed: Vec<AllowedFrontend>,
    services: BTreeMap<String, ServiceDef>,
    backends: BTreeMap<String, BTreeMap<String, BackendDef>>,
    /// (service, instance) pairs an operator took out.
    maintenance: BTreeSet<(String, String)>,
    invalid: BTreeMap<String, Invalid>,
    /// Names of services whose definition, backends or maintenance keys
    /// changed since `take_touched`.
    touched: BTreeSet<String>,
    all_touched: bool,
    /// The routing table before this node's health verdicts, derived from
    /// the definitions above and kept between refreshes so that a change
    /// recomputes only the frontends it touches.
    routes: Desired,
}

/// The frontends a refresh recomputed (`None`: all of them).
pub type Scope = Option<BTreeSet<ServiceKey>>;

/// Above this many services changed at once, recompute everything.
const PARTIAL_LIMIT: usize = 1_000;

impl Model {
    pub fn new(prefix: String, allowed: Vec<AllowedFrontend>) -> Self {
        Self {
            prefix,
            allowed,
            services: BTreeMap::new(),
            backends: BTreeMap::new(),
            maintenance: BTreeSet::new(),
            invalid: BTreeMap::new(),
            touched: BTreeSet::new(),
            all_touched: true,
            routes: Desired::default(),
        }
    }

    pub fn clear(&mut self) {
        self.services.clear();
        self.backends.clear();
        self.maintenance.clear();
        self.invalid.clear();
        self.all_touched = true;
    }

    pub fn invalid_keys(&self) -> &BTreeMap<String, Invalid> {
        &self.invalid
    }

    /// Applies a put. An invalid value removes any earlier valid one for the
    /// key: the maps always follow what etcd says, on every node alike.
    pub fn put(&mut self, key: &str, value: &[u8], create_revision: i64) -> Applied {
        self.delete(key);
        if let Ok(Some(KeyRef::Maintenance { service, instance })) = parse_key(&self.prefix, key) {
            self.maintenance.insert((service, instance));
            return Applied::Changed;
        }
        let parsed = parse_key(&self.prefix, key).and_then(|k| match k {
            None | Some(KeyRef::Maintenance { .. }) => Ok(None),
            Some(KeyRef::Service(name)) => {
                parse_service(value, &self.allowed, create_revision).map(|d| Some((name, Ok(d))))
            }
            Some(KeyRef::Backend { service, instance }) => {
                parse_backend(value).map(|b| Some((service, Err((instance, b)))))
            }
        });
        match parsed {
            Ok(None) => Applied::Ignored,
            Ok(Some((name, Ok(def)))) => {
                self.services.insert(name, def);
                Applied::Changed
            }
            Ok(Some((service, Err((instance, def))))) => {
                self.backends
                    .entry(service)
                    .or_default()
                    .insert(instance, def);
                Applied::Changed
            }
            Err(e) => {
                self.invalid.insert(key.to_owned(), e.clone());
                Applied::Invalid(e)
            }
        }
    }

    pub fn delete(&mut self, key: &str) -> Applied {
        let was_invalid = self.invalid.remove(key).is_some();
        let parsed = parse_key(&self.prefix, key);
        if let Ok(Some(
            KeyRef::Service(name)
            | KeyRef::Backend { service: name, .. }
            | KeyRef::Maintenance { service: name, .. },
        )) = &parsed
        {
            self.touched.insert(name.clone());
        }
        let removed = match parsed {
            Ok(Some(KeyRef::Service(name))) => self.services.remove(&name).is_some(),
            Ok(Some(KeyRef::Backend { service, instance })) => {
                let set = self.backends.get_mut(&service);
                let removed = set.as_ref().is_some_and(|s| s.contains_key(&instance));
                if let Some(set) = set {
                    set.remove(&instance);
                    if set.is_empty() {
                        self.backends.remove(&service);
                    }
                }
                removed
            }
            Ok(Some(KeyRef::Maintenance { service, instance })) => {
                self.maintenance.remove(&(service, instance))
            }
            _ => false,
        };
        if removed || was_invalid {
            Applied::Changed
        } else {
            Applied::Ignored
        }
    }

    /// Every valid service with all its registered instances, whether or
    /// not routed.
    pub fn view(&self) -> Vec<ServiceView<'_>> {
        self.services
            .iter()
            .map(|(name, def)| {
                let backends = self
                    .backends
                    .get(name)
                    .map(|b| {
                        b.iter()
                            .map(|(id, d)| {
                                let m = self.maintenance.contains(&(name.clone(), id.clone()));
                                (id.as_str(), *d, m)
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                (name.as_str(), def, backends)
            })
            .collect()
    }

    /// The frontends (per protocol) a service's definition claims now.
    pub fn frontend_keys(&self, name: &str) -> Vec<ServiceKey> {
        self.services
            .get(name)
            .map(|d| {
                d.protocol
                    .ip_protos()
                    .iter()
                    .map(|&p| service_key(d.frontend, p))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Services whose keys changed since the last call (`None`: all of
    /// them, after a snapshot replaced the model).
    fn take_touched(&mut self) -> Option<BTreeSet<String>> {
        let all = std::mem::take(&mut self.all_touched);
        let t = std::mem::take(&mut self.touched);
        (!all).then_some(t)
    }

    /// The routing table as of the last refresh.
    pub fn routes(&self) -> &Desired {
        &self.routes
    }

    /// Brings the routing table up to date: the frontends of services whose
    /// keys changed since the last refresh (where they were and where they
    /// are now) and the `also` frontends (those that failed to apply), or
    /// every frontend when `full` (the node's rules or health changed), after
    /// a snapshot, or when too much changed. Returns what it recomputed.
    pub fn refresh(
        &mut self,
        guard: &NodeGuard,
        also: impl IntoIterator<Item = ServiceKey>,
        full: bool,
    ) -> Scope {
        let names = match self.take_touched() {
            Some(names) if !full && names.len() <= PARTIAL_LIMIT => names,
            _ => {
                self.routes = self.desired_for(guard);
                return None;
            }
        };
        let mut keys: BTreeSet<ServiceKey> = self
            .routes
            .services
            .iter()
            .filter(|(_, s)| names.contains(&s.service))
            .map(|(k, _)| *k)
            .collect();
        // A refused frontend is not in `services`: its claimant's move or
        // delete must recompute it too (and promote the next claimant).
        keys.extend(
            self.routes
                .refused
                .iter()
                .filter(|(_, r)| names.contains(&r.service))
                .map(|(k, _)| *k),
        );
        keys.extend(names.iter().flat_map(|n| self.frontend_keys(n)));
        keys.extend(also);
        let part = self.desired_where(|k| keys.contains(k), guard);
        let r = &mut self.routes;
        for k in &keys {
            r.services.remove(k);
            r.refused.remove(k);
        }
        let fronts: BTreeSet<String> = keys.iter().map(crate::addr::frontend).collect();
        r.conflicts.retain(|c| {
            !names.contains(&c.winner) && !names.contains(&c.loser) && !fronts.contains(&c.frontend)
        });
        r.conflicts.extend(part.conflicts);
        r.services.extend(part.services);
        r.refused.extend(part.refused);
        Some(keys)
    }

    /// The routing table: for each frontend+protocol, the winning service
    /// (oldest create revision, then name) and its backends.
    pub fn desired_for(&self, guard: &NodeGuard) -> Desired {
        self.desired_where(|_| true, guard)
    }

    /// The routing table with no node rules (unit tests).
    #[cfg(test)]
    pub fn desired(&self) -> Desired {
        self.desired_for(&NodeGuard::default())
    }

    /// The frontends (with protocol) of every service that would shadow a
    /// listener on this node: what a new listener scan is compared on.
    pub fn shadowing(&self, guard: &NodeGuard) -> BTreeSet<ServiceKey> {
        self.services
            .values()
            .flat_map(|d| d.protocol.ip_protos().iter().map(move |&p| (d, p)))
            .filter(|(d, p)| {
                matches!(
                    guard.refusal(d.frontend, *p, d.takeover),
                    Some(Refusal::Shadows(_))
                )
            })
            .map(|(d, p)| service_key(d.frontend, p))
            .collect()
    }

    /// The routing table for the frontends `want` selects only: a change to
    /// a few services costs a scan of the service definitions, not a
    /// rebuild of every service's backend list. Frontends the node guard
    /// refuses are left out and listed in `refused`.
    pub fn desired_where(&self, want: impl Fn(&ServiceKey) -> bool, guard: &NodeGuard) -> Desired {
        let mut claims: BTreeMap<ServiceKey, Vec<(i64, &str)>> = BTreeMap::new();
        for (name, def) in &self.services {
            for &proto in def.protocol.ip_protos() {
                let key = service_key(def.frontend, proto);
                if want(&key) {
                    claims
                        .entry(key)
                        .or_default()
                        .push((def.create_revision, name));
                }
            }
        }
        let mut out = Desired::default();
        for (key, mut claimants) in claims {
            claimants.sort();
            let winner = claimants[0].1;
            let def = &self.services[winner];
            for (_, loser) in &claimants[1..] {
                out.conflicts.insert(Conflict {
                    frontend: format!("{}/{}", def.frontend, proto_name(key.proto)),
                    winner: winner.to_owned(),
                    loser: (*loser).to_owned(),
                });
            }
            if let Some(why) = guard.refusal(def.frontend, key.proto, def.takeover) {
                out.refused.insert(
                    key,
                    Refused {
                        service: winner.to_owned(),
                        frontend: format!("{}/{}", def.frontend, proto_name(key.proto)),
                        why,
                    },
                );
                continue;
            }
            let mut backends: Vec<BackendDef> = self
                .backends
                .get(winner)
                .map(|b| {
                    b.iter()
                        .filter(|(id, _)| {
                            !self
                                .maintenance
                                .contains(&(winner.to_owned(), (*id).clone()))
                        })
                        .map(|(_, d)| *d)
                        .collect()
                })
                .unwrap_or_default();
            backends.sort();
            out.services.insert(
                key,
                DesiredService {
                    service: winner.to_owned(),
                    frontend: def.frontend,
                    policy: def.policy,
                    check: def.check.clone(),
                    tcp: def.tcp,
                    backends,
                },
            );
        }
        out
    }
}

pub use crate::addr::proto_name;

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/discovery/";

    fn model() -> Model {
        Model::new(P.into(), vec!["127.0.0.0/8".parse().unwrap()])
    }

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
        assert_eq!(d.frontend, "127.0.0.1:11211".parse().unwrap());
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
            Err(Invalid::Ipv6(_))
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
        assert!(matches!(parse_backend(b"::1"), Err(Invalid::Ipv6(_))));
        assert!(matches!(parse_backend(b"[::1]:80"), Err(Invalid::Ipv6(_))));
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
    fn invalid_value_replaces_valid_one_and_is_reported() {
        let mut m = model();
        let k = "/discovery/backends/web/a";
        assert_eq!(m.put(k, b"127.0.0.2:80", 1), Applied::Changed);
        assert!(matches!(m.put(k, b"garbage", 1), Applied::Invalid(_)));
        assert!(m.invalid_keys().contains_key(k));
        m.put(
            "/discovery/services/web",
            br#"{"frontend":"127.0.0.1:80"}"#,
            2,
        );
        let d = m.desired();
        assert_eq!(d.services.len(), 1);
        assert!(d.services.values().next().unwrap().backends.is_empty());
        assert_eq!(m.delete(k), Applied::Changed);
        assert!(m.invalid_keys().is_empty());
    }

    #[test]
    fn maintenance_takes_a_backend_out_until_enabled() {
        let mut m = model();
        m.put(
            "/discovery/services/web",
            br#"{"frontend":"127.0.0.1:80"}"#,
            1,
        );
        m.put("/discovery/backends/web/a", b"127.0.0.2:80", 2);
        m.put("/discovery/backends/web/b", b"127.0.0.3:80", 3);
        let addrs = |m: &Model| -> Vec<String> {
            m.desired()
                .services
                .values()
                .next()
                .unwrap()
                .backends
                .iter()
                .map(|b| b.addr.to_string())
                .collect()
        };
        assert_eq!(addrs(&m), ["127.0.0.2:80", "127.0.0.3:80"]);
        assert_eq!(
            m.put("/discovery/maintenance/web/a", b"{}", 4),
            Applied::Changed
        );
        assert_eq!(addrs(&m), ["127.0.0.3:80"]);
        // The announcer rewriting its key does not clear the override.
        m.put(
            "/discovery/backends/web/a",
            br#"{"addr":"127.0.0.2:80","weight":5}"#,
            2,
        );
        assert_eq!(addrs(&m), ["127.0.0.3:80"]);
        assert_eq!(m.delete("/discovery/maintenance/web/a"), Applied::Changed);
        assert_eq!(addrs(&m), ["127.0.0.2:80", "127.0.0.3:80"]);
        assert!(parse_key(P, "/discovery/maintenance/web").is_err());
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

    #[test]
    fn this_nodes_guard_refuses_frontends_and_takeover_opts_out_of_listeners() {
        let mut m = model();
        m.put(
            "/discovery/services/etcd",
            br#"{"frontend":"127.0.0.1:2379"}"#,
            1,
        );
        m.put(
            "/discovery/services/dns",
            br#"{"frontend":"127.0.0.53:53","protocol":"udp"}"#,
            2,
        );
        m.put(
            "/discovery/services/cache",
            br#"{"frontend":"127.0.0.1:11211","takeover":true}"#,
            3,
        );
        for s in ["etcd", "dns", "cache"] {
            m.put(&format!("/discovery/backends/{s}/a"), b"127.0.0.9:1", 4);
        }
        let mut g = NodeGuard::new(&["http://127.0.0.1:2379".to_owned()], None);
        let mut l = crate::listeners::Listeners::default();
        l.add(IPPROTO_UDP, "127.0.0.53".parse().unwrap(), 53, false);
        l.add(IPPROTO_TCP, "0.0.0.0".parse().unwrap(), 11211, false);
        g.set_listeners(l);
        let d = m.desired_for(&g);
        let names: Vec<&str> = d.services.values().map(|s| s.service.as_str()).collect();
        assert_eq!(names, ["cache"], "takeover routes over the listener");
        let refused: Vec<(&str, &str, &str)> = d
            .refused
            .values()
            .map(|r| (r.service.as_str(), r.frontend.as_str(), r.why.reason()))
            .collect();
        assert_eq!(
            refused,
            [
                ("etcd", "127.0.0.1:2379/tcp", "reserved"),
                ("dns", "127.0.0.53:53/udp", "listener"),
            ]
        );
        let shadow = m.shadowing(&g);
        assert_eq!(
            shadow.into_iter().collect::<Vec<_>>(),
            [service_key("127.0.0.53:53".parse().unwrap(), IPPROTO_UDP)],
            "only services without takeover count"
        );
    }

    #[test]
    fn a_partial_refresh_recomputes_a_refused_frontend_whose_claimant_went() {
        let mut m = model();
        m.put(
            "/discovery/services/old",
            br#"{"frontend":"127.0.0.1:80"}"#,
            1,
        );
        m.put(
            "/discovery/services/new",
            br#"{"frontend":"127.0.0.1:80","takeover":true}"#,
            2,
        );
        m.put("/discovery/backends/new/a", b"127.0.0.9:1", 3);
        let mut g = NodeGuard::new(&[], None);
        let mut l = crate::listeners::Listeners::default();
        l.add(IPPROTO_TCP, "127.0.0.1".parse().unwrap(), 80, false);
        g.set_listeners(l);
        assert_eq!(m.refresh(&g, [], true), None);
        assert_eq!(
            m.routes().refused.len(),
            1,
            "old wins the frontend, which is refused"
        );
        assert!(m.routes().services.is_empty());
        m.delete("/discovery/services/old");
        assert!(m.refresh(&g, [], false).is_some(), "a partial refresh");
        let full = m.desired_for(&g);
        assert!(
            m.routes().refused.is_empty(),
            "stale refusal: {:?}",
            m.routes().refused
        );
        assert_eq!(m.routes().services, full.services);
        assert_eq!(m.routes().services.values().next().unwrap().service, "new");
    }

    #[test]
    fn oldest_service_wins_a_frontend() {
        let mut m = model();
        m.put(
            "/discovery/services/new",
            br#"{"frontend":"127.0.0.1:80","protocol":"both"}"#,
            20,
        );
        m.put(
            "/discovery/services/old",
            br#"{"frontend":"127.0.0.1:80"}"#,
            10,
        );
        m.put("/discovery/backends/old/1", b"127.0.0.2:80", 11);
        m.put("/discovery/backends/new/1", b"127.0.0.3:80", 21);
        let d = m.desired();
        let tcp = &d.services[&service_key("127.0.0.1:80".parse().unwrap(), IPPROTO_TCP)];
        let udp = &d.services[&service_key("127.0.0.1:80".parse().unwrap(), IPPROTO_UDP)];
        assert_eq!(tcp.service, "old");
        assert_eq!(udp.service, "new", "udp is not contested");
        assert_eq!(
            d.conflicts.iter().cloned().collect::<Vec<_>>(),
            vec![Conflict {
                frontend: "127.0.0.1:80/tcp".into(),
                winner: "old".into(),
                loser: "new".into()
            }]
        );
        m.delete("/discovery/services/old");
        let d = m.desired();
        assert!(d.conflicts.is_empty());
        assert_eq!(
            d.services[&service_key("127.0.0.1:80".parse().unwrap(), IPPROTO_TCP)].service,
            "new"
        );
    }
}
