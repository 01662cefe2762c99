//! `discovery-agent status`: one table per service, joining what the agent
//! last knew (names, weights, states, health; a JSON snapshot it writes to
//! `--status-file`) with what the kernel routes and counted (the pinned
//! maps, read directly, so it works while the agent is down).
use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    path::Path,
    time::{Duration, UNIX_EPOCH},
};

use anyhow::Context as _;
use discovery_common::{SVC_F_CONSISTENT, SVC_F_LEAST_CONN, ServiceKey};
use serde::{Deserialize, Serialize};

use crate::{
    addr::{Addr, proto_name},
    maps::{BpfMaps, KernelView},
};

/// What the agent knew when it last applied etcd to the maps.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub node: String,
    pub pid: u32,
    pub version: String,
    /// etcd revision applied to the maps.
    pub revision: i64,
    /// Unix seconds of that apply.
    pub applied_unix: u64,
    /// Where /metrics listens (the bound address, also for port 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
    pub services: Vec<SnapService>,
    /// Frontends this node does not route although a service claims them.
    #[serde(default)]
    pub refused: Vec<SnapRefused>,
    /// The readiness signal: this process has applied a full list of etcd
    /// to the maps. Before that the file is written with `false`, the
    /// services of the previous run (still in the pinned maps) and why
    /// etcd is not there yet.
    #[serde(default)]
    pub ready: bool,
    #[serde(default)]
    pub etcd: EtcdStatus,
    /// Program name → how this process put it in place: `attached`,
    /// `adopted` (the pinned one was identical) or `replaced`.
    #[serde(default)]
    pub programs: BTreeMap<String, String>,
    /// etcd keys skipped as invalid, with the reason (the first
    /// [`MAX_INVALID_LISTED`]; `invalid_total` counts them all).
    #[serde(default)]
    pub invalid: Vec<SnapInvalid>,
    #[serde(default)]
    pub invalid_total: usize,
    /// Keys applied with fields the contract does not know (ignored), with
    /// what was probably meant (the first [`MAX_INVALID_LISTED`]).
    #[serde(default)]
    pub ignored_fields: Vec<SnapIgnored>,
    /// Services the maps could not take (a map is full); they keep their
    /// previous state in the kernel.
    #[serde(default)]
    pub not_applied: Vec<SnapNotApplied>,
    /// Frontends that reach only some of their backends, or with a limit,
    /// because of address families.
    #[serde(default)]
    pub family: Vec<SnapFamily>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapFamily {
    pub service: String,
    /// `addr:port/proto`.
    pub frontend: String,
    pub detail: String,
}

/// Invalid keys listed in the status file; the rest are only counted.
pub const MAX_INVALID_LISTED: usize = 100;

/// The agent's connection to etcd.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdStatus {
    /// Listing or watching the prefix.
    pub connected: bool,
    /// Unix seconds of the last change of `connected`.
    pub since_unix: u64,
    /// Why it is not connected (the last error), when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Connections lost since start.
    pub losses: u64,
}

/// A field of an etcd value the agent ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapIgnored {
    pub key: String,
    /// Its path in the value: `balance`, `check.inter`.
    pub field: String,
    /// The contract's field the writer probably meant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub did_you_mean: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapInvalid {
    pub key: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapNotApplied {
    pub service: String,
    /// `addr:port/proto`.
    pub frontend: String,
    /// The map that refused the write.
    pub map: String,
    pub error: String,
}

/// A frontend refused on this node (reserved, or a socket listens there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapRefused {
    pub service: String,
    /// `addr:port/proto`.
    pub frontend: String,
    /// `reserved` or `listener`.
    pub reason: String,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapService {
    pub name: String,
    /// The first frontend (see `frontends`).
    pub frontend: String,
    /// Every frontend, IPv4 and IPv6.
    #[serde(default)]
    pub frontends: Vec<String>,
    pub protocol: String,
    pub policy: String,
    /// False when an older service holds the same frontend.
    pub routed: bool,
    /// Every backend fails its check from this node, so all of them are
    /// used anyway.
    #[serde(default)]
    pub fallback: bool,
    pub backends: Vec<SnapBackend>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapBackend {
    pub instance: String,
    pub addr: String,
    pub weight: u32,
    /// `active`, `draining` (weight 0) or `maintenance`.
    pub state: String,
    /// This node's verdict: `ok`, `check failing` or `ejected`.
    pub health: String,
    /// For `ejected`: `kernel` (the sock_ops program, on the failing
    /// connect) or `agent` (on its poll); see `--passive-ejector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ejected_by: Option<String>,
}

pub use crate::util::unix_now;

/// Writes the snapshot atomically (temp file, then rename), so a reader
/// never sees half of it.
pub fn write_snapshot(path: &Path, snap: &Snapshot) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(snap)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

pub fn read_snapshot(path: &Path) -> anyhow::Result<Option<Snapshot>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(
            serde_json::from_slice(&b).with_context(|| format!("parsing {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

pub fn addr_str(a: Addr) -> String {
    crate::addr::show(a)
}

fn frontend_str(k: &ServiceKey) -> String {
    addr_str((k.addr, k.port))
}

pub fn policy_name(flags: u32) -> &'static str {
    if flags & SVC_F_CONSISTENT != 0 {
        "consistent"
    } else if flags & SVC_F_LEAST_CONN != 0 {
        "least_conn"
    } else {
        "random"
    }
}

/// The joined view `status` prints.
#[derive(Debug, Serialize)]
pub struct Report {
    /// None when the status file is missing (agent never ran here).
    pub agent: Option<AgentInfo>,
    pub services: Vec<ServiceRow>,
    pub counters: BTreeMap<String, u64>,
    pub maps: Vec<MapUsage>,
    /// Frontends refused on this node, from the status file.
    pub refused: Vec<SnapRefused>,
    /// Processes (the agent, announcers) whose calls are never redirected.
    pub own_processes: Vec<u32>,
    /// Their calls to a frontend, left alone.
    pub own_calls: u64,
}

#[derive(Debug, Serialize)]
pub struct AgentInfo {
    pub node: String,
    pub pid: u32,
    pub version: String,
    pub revision: i64,
    pub applied_unix: u64,
    pub applied_at: String,
    pub age_seconds: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
    /// Whether this agent has applied etcd since it started.
    pub ready: bool,
    pub etcd: EtcdStatus,
    pub programs: BTreeMap<String, String>,
    pub invalid: Vec<SnapInvalid>,
    pub invalid_total: usize,
    pub ignored_fields: Vec<SnapIgnored>,
    pub not_applied: Vec<SnapNotApplied>,
    pub family: Vec<SnapFamily>,
}

#[derive(Debug, Serialize)]
pub struct MapUsage {
    pub map: String,
    pub entries: usize,
    pub capacity: usize,
}

#[derive(Debug, Serialize)]
pub struct ServiceRow {
    /// `?` when the maps hold a frontend the status file does not name.
    pub name: String,
    pub frontend: String,
    pub protocol: String,
    pub policy: String,
    pub connects: u64,
    pub datagrams: u64,
    pub no_backend: u64,
    pub connect_failed: u64,
    /// Every backend fails its check from this node: all are used.
    pub fallback: bool,
    pub backends: Vec<BackendRow>,
    /// Workloads (cgroups) on this node calling this frontend, busiest
    /// first.
    pub consumers: Vec<crate::consumers::Workload>,
}

#[derive(Debug, Serialize)]
pub struct BackendRow {
    pub addr: String,
    pub instance: String,
    pub weight: Option<u32>,
    pub state: String,
    pub health: String,
    /// In the kernel's live set for this service: new connects can go here.
    pub routed: bool,
    pub connects: u64,
    pub datagrams: u64,
    /// Failed connects (all services using the address).
    pub failures: u64,
    /// Open redirected TCP connections.
    pub live: u32,
}

pub fn report(snap: Option<Snapshot>, k: &KernelView, paths: &HashMap<u64, String>) -> Report {
    let mut by_frontend: HashMap<(String, String), &SnapService> = HashMap::new();
    if let Some(s) = &snap {
        for svc in s.services.iter().filter(|s| s.routed) {
            let frontends = if svc.frontends.is_empty() {
                std::slice::from_ref(&svc.frontend)
            } else {
                &svc.frontends[..]
            };
            for f in frontends {
                for proto in match svc.protocol.as_str() {
                    "both" => &["tcp", "udp"][..],
                    "udp" => &["udp"],
                    _ => &["tcp"],
                } {
                    by_frontend.insert((f.clone(), (*proto).to_owned()), svc);
                }
            }
        }
    }
    let by_addr: HashMap<String, _> = k.backends.iter().map(|(a, v)| (addr_str(*a), *v)).collect();
    let mut services = Vec::new();
    for sv in &k.services {
        let frontend = frontend_str(&sv.key);
        let protocol = proto_name(sv.key.proto).to_owned();
        let snap_svc = by_frontend.get(&(frontend.clone(), protocol.clone()));
        let routed: Vec<String> = sv.routed.iter().map(|a| addr_str(*a)).collect();
        let mut rows = Vec::new();
        let row = |addr: &str, instance: &str, weight, state: &str, health: &str| {
            let v = by_addr.get(addr).copied().unwrap_or_default();
            BackendRow {
                addr: addr.to_owned(),
                instance: instance.to_owned(),
                weight,
                state: state.to_owned(),
                health: health.to_owned(),
                routed: routed.iter().any(|r| r == addr),
                connects: v.stats.connects,
                datagrams: v.stats.datagrams,
                failures: v.health.failures,
                live: v.health.live,
            }
        };
        if let Some(s) = snap_svc {
            for b in &s.backends {
                let health = match &b.ejected_by {
                    Some(by) => format!("{} by {by}", b.health),
                    None => b.health.clone(),
                };
                rows.push(row(&b.addr, &b.instance, Some(b.weight), &b.state, &health));
            }
        }
        for r in &routed {
            if !rows.iter().any(|x| &x.addr == r) {
                rows.push(row(r, "?", None, "?", "?"));
            }
        }
        let mut consumers: Vec<crate::consumers::Workload> = k
            .consumers
            .iter()
            .filter(|(c, _)| c.service == sv.key)
            .map(|(c, n)| crate::consumers::Workload {
                cgroup: paths
                    .get(&c.cgroup_id)
                    .cloned()
                    .unwrap_or_else(|| format!("(gone: cgroup id {})", c.cgroup_id)),
                calls: *n,
            })
            .collect();
        consumers.sort_by(|a, b| b.calls.cmp(&a.calls).then(a.cgroup.cmp(&b.cgroup)));
        services.push(ServiceRow {
            consumers,
            name: snap_svc.map_or("?".to_owned(), |s| s.name.clone()),
            frontend,
            protocol,
            policy: policy_name(sv.service.flags).to_owned(),
            connects: sv.stats.connects,
            datagrams: sv.stats.datagrams,
            no_backend: sv.stats.no_backend,
            connect_failed: sv.stats.connect_failed,
            fallback: snap_svc.is_some_and(|s| s.fallback),
            backends: rows,
        });
    }
    services.sort_by(|a, b| (&a.name, &a.frontend).cmp(&(&b.name, &b.frontend)));
    let now = unix_now();
    let refused = snap.as_ref().map(|s| s.refused.clone()).unwrap_or_default();
    Report {
        refused,
        own_processes: Vec::new(),
        own_calls: 0,
        agent: snap.map(|s| AgentInfo {
            applied_at: humantime::format_rfc3339_seconds(
                UNIX_EPOCH + Duration::from_secs(s.applied_unix),
            )
            .to_string(),
            age_seconds: now.saturating_sub(s.applied_unix),
            node: s.node,
            pid: s.pid,
            version: s.version,
            revision: s.revision,
            applied_unix: s.applied_unix,
            metrics_addr: s.metrics_addr,
            ready: s.ready,
            etcd: s.etcd,
            programs: s.programs,
            invalid: s.invalid,
            invalid_total: s.invalid_total,
            ignored_fields: s.ignored_fields,
            not_applied: s.not_applied,
            family: s.family,
        }),
        services,
        counters: k
            .counters
            .iter()
            .map(|(n, v)| ((*n).to_owned(), *v))
            .collect(),
        maps: k
            .usage
            .iter()
            .map(|(m, e, c)| MapUsage {
                map: (*m).to_owned(),
                entries: *e,
                capacity: *c,
            })
            .collect(),
    }
}

/// Left-aligned columns, two spaces apart.
fn table(out: &mut String, indent: &str, rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = indent.to_owned();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

pub fn render(r: &Report) -> String {
    let mut out = String::new();
    match &r.agent {
        Some(a) => {
            let _ = writeln!(
                out,
                "node {}  agent pid {} ({})  etcd revision {} applied {} ({}s ago)",
                a.node, a.pid, a.version, a.revision, a.applied_at, a.age_seconds
            );
            if !a.ready {
                out.push_str(
                    "agent not ready: it has not applied etcd since it started; names below are \
                     from its previous run\n",
                );
            }
            if !a.etcd.connected {
                let _ = writeln!(
                    out,
                    "etcd not connected since {}: {}",
                    humantime::format_rfc3339_seconds(
                        UNIX_EPOCH + Duration::from_secs(a.etcd.since_unix)
                    ),
                    a.etcd.error.as_deref().unwrap_or("connecting")
                );
            }
            if !a.not_applied.is_empty() {
                out.push_str("\nnot applied (the kernel keeps the previous state):\n");
                for n in &a.not_applied {
                    let _ = writeln!(out, "  {} {}: {}", n.service, n.frontend, n.error);
                }
            }
            if !a.family.is_empty() {
                out.push_str("\naddress families:\n");
                for n in &a.family {
                    let _ = writeln!(out, "  {} {}: {}", n.service, n.frontend, n.detail);
                }
            }
            if a.invalid_total > 0 {
                let _ = writeln!(out, "\n{} invalid etcd keys skipped:", a.invalid_total);
                for i in a.invalid.iter().take(10) {
                    let _ = writeln!(out, "  {}: {}", i.key, i.reason);
                }
                if a.invalid_total > 10 {
                    out.push_str("  ... (status --json lists more)\n");
                }
            }
            if !a.ignored_fields.is_empty() {
                out.push_str("\nfields ignored in etcd values (not part of the contract):\n");
                for i in &a.ignored_fields {
                    let hint = i
                        .did_you_mean
                        .as_ref()
                        .map(|m| format!(" (did you mean {m}?)"))
                        .unwrap_or_default();
                    let _ = writeln!(out, "  {}: {}{hint}", i.key, i.field);
                }
            }
        }
        None => out.push_str(
            "no agent status file: names, weights and health unknown (kernel view only)\n",
        ),
    }
    if !r.refused.is_empty() {
        out.push_str("\nrefused on this node (not routed here):\n");
        for f in &r.refused {
            let _ = writeln!(out, "  {} {}: {}", f.service, f.frontend, f.detail);
        }
    }
    if r.services.is_empty() {
        out.push_str("\nno services in the maps\n");
    }
    for s in &r.services {
        out.push('\n');
        table(
            &mut out,
            "",
            &[
                vec![
                    "SERVICE".into(),
                    "FRONTEND".into(),
                    "PROTO".into(),
                    "POLICY".into(),
                    "CONNECTS".into(),
                    "DATAGRAMS".into(),
                    "NO_BACKEND".into(),
                    "CONNECT_FAILED".into(),
                ],
                vec![
                    s.name.clone(),
                    s.frontend.clone(),
                    s.protocol.clone(),
                    s.policy.clone(),
                    s.connects.to_string(),
                    s.datagrams.to_string(),
                    s.no_backend.to_string(),
                    s.connect_failed.to_string(),
                ],
            ],
        );
        let mut rows = vec![
            [
                "BACKEND",
                "INSTANCE",
                "WEIGHT",
                "STATE",
                "HEALTH",
                "ROUTED",
                "CONNECTS",
                "DATAGRAMS",
                "FAILURES",
                "LIVE",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for b in &s.backends {
            rows.push(vec![
                b.addr.clone(),
                b.instance.clone(),
                b.weight.map_or("?".into(), |w| w.to_string()),
                b.state.clone(),
                b.health.clone(),
                if b.routed { "yes" } else { "no" }.into(),
                b.connects.to_string(),
                b.datagrams.to_string(),
                b.failures.to_string(),
                b.live.to_string(),
            ]);
        }
        if s.backends.is_empty() {
            out.push_str("  (no backends: connects are refused)\n");
        } else {
            table(&mut out, "  ", &rows);
        }
        if s.fallback {
            out.push_str("  every backend fails its check from this node: all of them are used\n");
        }
        if !s.consumers.is_empty() {
            let list: Vec<String> = s
                .consumers
                .iter()
                .take(5)
                .map(|w| format!("{} ({})", w.cgroup, w.calls))
                .collect();
            let more = s.consumers.len().saturating_sub(5);
            let _ = write!(out, "  used by: {}", list.join(", "));
            if more > 0 {
                let _ = write!(out, " and {more} more");
            }
            out.push('\n');
        }
    }
    out.push('\n');
    let usage: Vec<String> = r
        .maps
        .iter()
        .map(|m| format!("{} {}/{}", m.map, m.entries, m.capacity))
        .collect();
    let _ = writeln!(out, "maps: {}", usage.join(", "));
    if !r.own_processes.is_empty() {
        let own: Vec<String> = r.own_processes.iter().map(u32::to_string).collect();
        let _ = writeln!(
            out,
            "never redirected: pids {} ({} calls to a frontend left alone)",
            own.join(", "),
            r.own_calls
        );
    }
    out
}

/// One status read: the snapshot (if any) joined with the maps.
pub fn collect(pin_dir: &Path, status_file: &Path) -> anyhow::Result<Report> {
    let maps = BpfMaps::open(pin_dir).with_context(|| {
        format!(
            "no pinned maps under {} (is the agent installed with this --pin-dir?)",
            pin_dir.display()
        )
    })?;
    let view = maps.view()?;
    let paths = crate::loader::cgroup2_root()
        .map(|root| crate::consumers::cgroup_paths(&root))
        .unwrap_or_default();
    let mut r = report(read_snapshot(status_file)?, &view, &paths);
    if let Ok((mut pids, calls)) = crate::exempt::list(pin_dir) {
        pids.sort_unstable();
        r.own_processes = pids;
        r.own_calls = calls;
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::{BackendView, ServiceView};
    use discovery_common::{
        BackendHealth, BackendStats, IPPROTO_TCP, Service, ServiceStats, TcpOpts, v4_mapped,
    };

    #[test]
    fn joins_names_from_the_snapshot_with_kernel_counts() {
        let b1 = (v4_mapped([127, 0, 0, 2]), 80);
        let b2 = (v4_mapped([127, 0, 0, 3]), 80);
        let key = ServiceKey {
            addr: v4_mapped([127, 0, 0, 1]),
            port: 8080,
            proto: IPPROTO_TCP,
            pad: 0,
        };
        let k = KernelView {
            services: vec![ServiceView {
                key,
                service: Service {
                    set_id: 1,
                    count: 1,
                    flags: SVC_F_LEAST_CONN,
                    stats_id: 1,
                    tcp: TcpOpts::default(),
                },
                routed: vec![b1, b2],
                stats: ServiceStats {
                    connects: 7,
                    ..Default::default()
                },
            }],
            backends: [(
                b1,
                BackendView {
                    stats: BackendStats {
                        connects: 5,
                        datagrams: 0,
                    },
                    health: BackendHealth {
                        live: 2,
                        failures: 1,
                        ..Default::default()
                    },
                },
            )]
            .into(),
            consumers: vec![],
            counters: vec![("connect_redirected", 7)],
            usage: vec![("disc_services", 1, 16)],
        };
        let snap = Snapshot {
            node: "n1".into(),
            revision: 42,
            ready: true,
            etcd: EtcdStatus {
                connected: true,
                ..Default::default()
            },
            services: vec![SnapService {
                name: "web".into(),
                frontend: "127.0.0.1:8080".into(),
                protocol: "tcp".into(),
                policy: "least_conn".into(),
                routed: true,
                fallback: false,
                frontends: vec![],
                backends: vec![SnapBackend {
                    instance: "a".into(),
                    addr: "127.0.0.2:80".into(),
                    weight: 3,
                    state: "active".into(),
                    health: "ok".into(),
                    ejected_by: None,
                }],
            }],
            ..Default::default()
        };
        let r = report(Some(snap), &k, &HashMap::new());
        let s = &r.services[0];
        assert_eq!(
            (s.name.as_str(), s.policy.as_str(), s.connects),
            ("web", "least_conn", 7)
        );
        let a = &s.backends[0];
        assert_eq!(
            (
                a.instance.as_str(),
                a.weight,
                a.routed,
                a.connects,
                a.live,
                a.failures
            ),
            ("a", Some(3), true, 5, 2, 1)
        );
        // Routed by the kernel but unknown to the snapshot: still shown.
        assert_eq!(s.backends[1].addr, "127.0.0.3:80");
        assert_eq!(s.backends[1].instance, "?");
        let text = render(&r);
        assert!(text.contains("etcd revision 42"), "{text}");
        assert!(text.contains("127.0.0.2:80"), "{text}");
        // Without the snapshot the kernel view still prints.
        let r = report(None, &k, &HashMap::new());
        assert_eq!(r.services[0].name, "?");
        assert!(render(&r).contains("kernel view only"));
    }
}
