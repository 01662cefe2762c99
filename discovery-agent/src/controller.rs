//! The agent's state and every change to it, one method per event (as
//! istio/ztunnel's `ProxyStateUpdater` owns every mutation while the
//! transport only hands it updates): etcd batches, health verdicts and
//! the timers. `agent::run` only waits for events and calls these.
//!
//! Data flows one way: etcd → model (definitions and the routing table
//! derived from them) → this node's health verdicts → reconciler → maps.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use discovery_common::ServiceKey;

use crate::{
    addr::proto_name,
    checks::ActiveChecks,
    desired::{Conflict, Desired, FamilyNote, Refused},
    etcd::{Change as EtcdChange, Update},
    exempt,
    guard::NodeGuard,
    health::Check,
    listeners,
    maps::BpfMaps,
    metrics::{Metrics, NotApplied, RefusedLabels},
    model::{Applied, Model},
    reconcile::{ApplyError, Change, Reconciler, frontend_of},
    resteer::Resteer,
    sockets::{self, Redirected},
    status::{
        self, EtcdStatus, SnapBackend, SnapFamily, SnapInvalid, SnapNotApplied, SnapRefused,
        SnapService, Snapshot,
    },
};

/// Entries of processes that are gone are pruned from the exemption map
/// every this many listener scans.
const EXEMPT_PRUNE_EVERY: u32 = 10;

/// The UDP tracking map is pruned of closed sockets every this many
/// listener scans (seconds).
const UDP_PRUNE_EVERY: u32 = 10;

/// The longest the status file waits for a rewrite after a slow one.
const STATUS_MAX_GAP: Duration = Duration::from_secs(2);

/// Frontend → service name, for the metrics and the consumers publisher.
pub type Names = HashMap<ServiceKey, String>;

/// What the controller needs that does not change while it runs.
pub struct Settings {
    pub pin_dir: PathBuf,
    /// The cgroup the programs are attached to: re-steering also looks at
    /// the network namespaces of its processes.
    pub cgroup: PathBuf,
    pub status_file: PathBuf,
    pub node: String,
    /// Passive checks: consecutive failed connects that eject (0: off).
    pub passive_failures: u32,
    pub passive_ejection: Duration,
    pub ejection: crate::checks::Ejection,
    /// The bound metrics address, for the status file.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// How each program was put in place at start, for the status file.
    pub programs: BTreeMap<String, String>,
    /// The previous run's status file, shown until this run is ready (its
    /// services are still in the pinned maps). None when the maps are new.
    pub last_run: Option<Snapshot>,
}

pub struct Controller {
    settings: Settings,
    model: Model,
    guard: NodeGuard,
    checks: ActiveChecks,
    resteer: Resteer,
    reconciler: Reconciler<BpfMaps>,
    metrics: Arc<Metrics>,
    names: watch::Sender<Names>,
    /// etcd revision applied to the maps.
    revision: i64,
    applied_unix: u64,
    /// What was last logged, so each conflict, refusal and failure is
    /// logged once when it starts and once when it ends.
    conflicts: BTreeSet<Conflict>,
    family: BTreeSet<FamilyNote>,
    /// Keys with ignored fields, as last logged.
    ignored: BTreeMap<String, Vec<crate::hints::Ignored>>,
    refused: BTreeMap<ServiceKey, Refused>,
    failing: BTreeMap<NotApplied, (String, ServiceKey)>,
    /// Frontends that would shadow a listener: a scan matters only when
    /// this changes.
    shadowing: BTreeSet<ServiceKey>,
    scan_failing: bool,
    scans: u32,
    /// Active-check verdicts observed and not applied yet.
    health_pending: bool,
    status_dirty: bool,
    status_next: Instant,
    names_dirty: bool,
    /// A snapshot was applied and the status file not written since: it is
    /// written right after the reconcile, as the readiness signal (the
    /// revision in it is in the maps).
    ready_pending: bool,
    /// A full list has been applied to the maps.
    ready: bool,
    etcd: EtcdStatus,
}

impl Controller {
    pub fn new(
        settings: Settings,
        model: Model,
        guard: NodeGuard,
        checks: ActiveChecks,
        reconciler: Reconciler<BpfMaps>,
        metrics: Arc<Metrics>,
        names: watch::Sender<Names>,
    ) -> Self {
        let mut c = Self {
            settings,
            model,
            guard,
            checks,
            resteer: Resteer::default(),
            reconciler,
            metrics,
            names,
            revision: 0,
            applied_unix: 0,
            conflicts: BTreeSet::new(),
            family: BTreeSet::new(),
            ignored: BTreeMap::new(),
            refused: BTreeMap::new(),
            failing: BTreeMap::new(),
            shadowing: BTreeSet::new(),
            scan_failing: false,
            scans: 0,
            health_pending: false,
            status_dirty: false,
            status_next: Instant::now(),
            names_dirty: false,
            ready_pending: false,
            ready: false,
            etcd: EtcdStatus {
                since_unix: crate::util::unix_now(),
                ..EtcdStatus::default()
            },
        };
        c.scan_listeners();
        // Not ready yet: says so, and why, until etcd is applied.
        c.on_status_tick();
        c
    }

    pub fn services_installed(&self) -> usize {
        self.reconciler.services_installed()
    }

    /// A burst of etcd updates, applied in one reconcile.
    pub fn on_etcd(&mut self, batch: Vec<Update>) {
        let mut changed = false;
        for u in batch {
            changed |= self.apply(u);
        }
        if !changed {
            return;
        }
        self.report_ignored();
        // A service put now is checked against the listeners of now, not
        // of the last tick (a proxy that just started).
        let full = self.rescan();
        self.reconcile(full);
    }

    /// Active-check verdicts: recorded now, applied on the next health
    /// tick (verdicts come in bursts when a rack goes away).
    pub fn on_verdicts(&mut self, verdicts: Vec<(std::net::SocketAddr, Check, bool)>) {
        for (addr, check, up) in verdicts {
            self.health_pending |= self.checks.observe(addr, &check, up);
        }
    }

    pub fn health_pending(&self) -> bool {
        self.health_pending
    }

    /// Applies the verdicts observed since the last tick.
    pub fn on_health_tick(&mut self) {
        if std::mem::take(&mut self.health_pending) {
            self.reconcile(true);
        }
    }

    /// Passive checks: reads the kernel's connect outcomes.
    pub fn on_passive_tick(&mut self) {
        let s = &self.settings;
        if s.passive_failures == 0 {
            return;
        }
        let mut failing = self
            .reconciler
            .dataplane()
            .failing_backends(s.passive_failures);
        let kernel = s.ejection == crate::checks::Ejection::Kernel;
        if kernel {
            // The kernel decides: a streak without a mark in force is a
            // backend whose ejection ran out (on trial, or it never got
            // traffic since), not a fresh ejection.
            let r = &self.reconciler;
            failing.retain(|(addr, _)| r.kernel_ejected(*addr));
        }
        let p = self
            .checks
            .passive(&failing, s.passive_ejection, Instant::now());
        let by = self.settings.ejection.by();
        for addr in &p.ejected {
            self.metrics
                .passive_ejections
                .get_or_create(&crate::metrics::EjectorLabels { by: by.to_owned() })
                .inc();
            if !kernel {
                // Without the kernel's trial mark, a re-admitted backend
                // must fail anew to go out again.
                self.reconciler.dataplane_mut().set_failures(*addr, 0);
            }
        }
        if p.changed() {
            self.reconcile(true);
        }
    }

    /// Lists the listeners (and now and then prunes the exemption map and
    /// the UDP tracking map).
    pub fn on_listener_tick(&mut self) {
        self.scans = self.scans.wrapping_add(1);
        if self.ready && self.scans.is_multiple_of(UDP_PRUNE_EVERY) {
            // Closed sockets' entries go, so a DNS client's socket per query
            // does not evict a statsd client's one socket from the LRU.
            self.sweep(false);
        }
        if self.scans.is_multiple_of(EXEMPT_PRUNE_EVERY) {
            match exempt::prune(&self.settings.pin_dir) {
                Ok(0) => {}
                Ok(n) => debug!(pruned = n, "exemption entries of processes that are gone"),
                Err(e) => warn!(error = %format!("{e:#}"), "could not prune the exemption map"),
            }
        }
        if self.rescan() {
            self.reconcile(true);
        }
    }

    /// Whether the status file should be written now.
    pub fn status_due(&self) -> bool {
        self.status_dirty && Instant::now() >= self.status_next
    }

    /// Writes the status file (and publishes the frontend names).
    pub fn on_status_tick(&mut self) {
        let began = Instant::now();
        if std::mem::take(&mut self.names_dirty) {
            let routes = self.model.routes();
            self.names.send_if_modified(|names| {
                let now: Names = routes
                    .services
                    .iter()
                    .map(|(k, s)| (*k, s.service.clone()))
                    .collect();
                let changed = *names != now;
                *names = now;
                changed
            });
        }
        let mut snap = match (&self.settings.last_run, self.ready) {
            // What the pinned maps still hold, by the previous run's names.
            (Some(last), false) => Snapshot {
                node: self.settings.node.clone(),
                pid: std::process::id(),
                version: crate::util::VERSION.to_owned(),
                revision: last.revision,
                applied_unix: last.applied_unix,
                services: last.services.clone(),
                refused: last.refused.clone(),
                ..Snapshot::default()
            },
            _ => snapshot(
                &self.settings.node,
                self.revision,
                self.applied_unix,
                &self.model,
                self.model.routes(),
                &self.checks,
            ),
        };
        snap.metrics_addr = self.settings.metrics_addr.map(|a| a.to_string());
        snap.ready = self.ready;
        snap.etcd = self.etcd.clone();
        snap.programs = self.settings.programs.clone();
        snap.family = self
            .family
            .iter()
            .map(|n| SnapFamily {
                service: n.service.clone(),
                frontend: n.frontend.clone(),
                detail: n.detail.clone(),
            })
            .collect();
        snap.not_applied = self
            .failing
            .iter()
            .map(|(k, (error, _))| SnapNotApplied {
                service: k.service.clone(),
                frontend: k.frontend.clone(),
                map: k.map.clone(),
                error: error.clone(),
            })
            .collect();
        let invalid = self.model.invalid_keys();
        snap.invalid_total = invalid.len();
        snap.invalid = invalid
            .iter()
            .take(status::MAX_INVALID_LISTED)
            .map(|(key, reason)| SnapInvalid {
                key: key.clone(),
                reason: reason.to_string(),
            })
            .collect();
        snap.ignored_fields = self
            .model
            .ignored_fields()
            .iter()
            .flat_map(|(key, fields)| {
                fields.iter().map(move |f| status::SnapIgnored {
                    key: key.clone(),
                    field: f.field.clone(),
                    did_you_mean: f.suggestion.map(str::to_owned),
                })
            })
            .take(status::MAX_INVALID_LISTED)
            .collect();
        if let Err(e) = status::write_snapshot(&self.settings.status_file, &snap) {
            warn!(path = %self.settings.status_file.display(), error = %format!("{e:#}"),
                  "could not write the status file");
        }
        self.status_dirty = false;
        // A big table takes a while to write: keep it under 5% of the
        // agent's time, but never let the file (the readiness and state
        // signal) lag more than STATUS_MAX_GAP: one slow rename on a busy
        // disk must not hide the next changes for many seconds.
        self.status_next = began + (began.elapsed() * 20).min(STATUS_MAX_GAP);
    }

    /// Feeds one etcd update into the model; returns whether the model
    /// changed (so a reconcile is due).
    fn apply(&mut self, u: Update) -> bool {
        let model = &mut self.model;
        let one = |key: &str, r: Applied| {
            if let Applied::Invalid(reason) = r {
                warn!(key, %reason, "skipping invalid etcd key");
            }
        };
        match u {
            Update::Snapshot { kvs, revision } => {
                model.clear();
                for kv in kvs {
                    let r = model.put(&kv.key, &kv.value, kv.create_revision);
                    one(&kv.key, r);
                }
                let invalid = model.invalid_keys().len();
                if invalid > 0 {
                    warn!(
                        revision,
                        invalid, "snapshot has invalid keys (each logged above)"
                    );
                }
                self.metrics.etcd_connected.set(1);
                self.etcd_state(true, None);
                self.revision = revision;
                self.ready_pending = true;
                true
            }
            Update::Changes { puts, revision } => {
                for c in puts {
                    match c {
                        EtcdChange::Put(kv) => {
                            let r = model.put(&kv.key, &kv.value, kv.create_revision);
                            one(&kv.key, r);
                        }
                        EtcdChange::Delete(key) => {
                            model.delete(&key);
                        }
                    }
                }
                self.revision = revision;
                true
            }
            Update::Disconnected { error } => {
                self.metrics.etcd_connected.set(0);
                self.etcd_state(false, Some(error));
                false
            }
        }
    }

    /// Logs each key applied with ignored fields once (again only when its
    /// fields change), naming the field and what was probably meant.
    fn report_ignored(&mut self) {
        let now = self.model.ignored_fields();
        for (key, fields) in now {
            if self.ignored.get(key) != Some(fields) {
                let list = fields
                    .iter()
                    .map(|f| f.to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                warn!(
                    key,
                    fields = list,
                    "etcd value applied, but these fields are not part of the contract and are \
                       ignored"
                );
            }
        }
        self.ignored = now.clone();
    }

    /// Records the connection state for the status file.
    fn etcd_state(&mut self, connected: bool, error: Option<String>) {
        let e = &mut self.etcd;
        if e.connected == connected && e.error == error {
            return;
        }
        if e.connected != connected {
            e.losses += u64::from(e.connected);
            e.connected = connected;
            e.since_unix = crate::util::unix_now();
        }
        e.error = error;
        self.status_dirty = true;
    }

    /// Lists the listeners again; returns whether that changed which
    /// frontends shadow one (then everything is recomputed).
    fn rescan(&mut self) -> bool {
        if !self.scan_listeners() {
            return false;
        }
        let now = self.model.shadowing(&self.guard);
        if now == self.shadowing {
            return false;
        }
        self.shadowing = now;
        true
    }

    /// Lists the node's listeners into the guard. Returns whether the scan
    /// changed anything; a failing scan is logged once and keeps the last.
    fn scan_listeners(&mut self) -> bool {
        match listeners::scan() {
            Ok(l) => {
                if std::mem::take(&mut self.scan_failing) {
                    info!(listeners = l.len(), "listing listening sockets works again");
                }
                self.guard.set_listeners(l)
            }
            Err(e) => {
                if !std::mem::replace(&mut self.scan_failing, true) {
                    error!(error = %e,
                           "cannot list listening sockets (sock_diag); frontends are not checked \
                            against new listeners until it works");
                }
                false
            }
        }
    }

    /// model → routing table → this node's health → maps.
    fn reconcile(&mut self, full: bool) {
        let started = Instant::now();
        let also: Vec<ServiceKey> = self.failing.values().map(|(_, k)| *k).collect();
        let scope = self.model.refresh(&self.guard, also, full);
        if scope.is_none() {
            self.shadowing = self.model.shadowing(&self.guard);
        }
        let routes = self.model.routes();
        report_conflicts(&mut self.conflicts, &routes.conflicts);
        report_family(&mut self.family, &routes.family);
        report_refused(&mut self.refused, &routes.refused, &self.metrics);
        // Active checks: this node's view of backend health.
        self.checks.sync(routes);
        let mut desired = Desired {
            services: match &scope {
                Some(keys) => keys
                    .iter()
                    .filter_map(|k| routes.services.get(k).map(|s| (*k, s.clone())))
                    .collect(),
                None => routes.services.clone(),
            },
            conflicts: BTreeSet::new(),
            refused: BTreeMap::new(),
            family: BTreeSet::new(),
        };
        self.checks.apply(&mut desired);
        let (changes, errors) = match &scope {
            Some(keys) => self.reconciler.reconcile_keys(&desired, keys),
            None => self.reconciler.reconcile(&desired),
        };
        self.resteer.applied(&desired, scope.as_ref());
        let m = &self.metrics;
        m.reconcile_duration
            .observe(started.elapsed().as_secs_f64());
        m.last_reconcile.set(crate::util::unix_now() as i64);
        log_changes(&changes, self.revision, started.elapsed());
        report_failures(&mut self.failing, errors, scope.as_ref(), m);
        self.applied_unix = crate::util::unix_now();
        self.names_dirty = true;
        self.status_dirty = true;
        m.services.set(self.reconciler.services_installed() as i64);
        m.invalid_keys.set(self.model.invalid_keys().len() as i64);
        m.etcd_revision.set(self.revision);
        m.ejected.set(self.checks.ejected() as i64);
        // Only once etcd is applied in full: before that, a backend missing
        // from the maps may just not be read yet.
        if (self.ready || self.ready_pending) && self.resteer.due() {
            self.sweep(true);
        }
        if std::mem::take(&mut self.ready_pending) {
            self.ready = true;
            self.settings.last_run = None;
            self.on_status_tick();
        }
    }
}

/// One namespace's sweep.
struct Swept {
    /// Sockets found stale (and destroyed, but for `errors`).
    stale: Vec<Redirected>,
    errors: Vec<std::io::Error>,
    udp_cookies: Vec<u64>,
}

impl Controller {
    /// Destroys the redirected sockets whose backend left their frontend
    /// (see `resteer`), in this namespace and in those of the cgroup's
    /// processes (containers); with `destroy` false, only lists connected
    /// UDP sockets. Either way, prunes the UDP tracking map of sockets
    /// that are gone, when every namespace could be listed.
    fn sweep(&mut self, destroy: bool) {
        let began = Instant::now();
        let maps = self.reconciler.dataplane();
        // Keys from before the dumps: a socket connected after its
        // namespace was listed must not be pruned.
        let before = maps.udp_conn_keys();
        let fd = maps.revnat_fd();
        let lookup = |c: u64| maps.udp_conn(c);
        let resteer = &self.resteer;
        let work = || -> std::io::Result<Swept> {
            let found = sockets::dump_redirected(fd, &lookup, destroy)?;
            let stale: Vec<Redirected> = if destroy {
                resteer
                    .stale(&found.redirected)
                    .into_iter()
                    .cloned()
                    .collect()
            } else {
                Vec::new()
            };
            let (_, errors) = sockets::destroy_all(&stale);
            Ok(Swept {
                stale,
                errors,
                udp_cookies: found.udp_cookies,
            })
        };
        let own = sockets::netns_id(std::path::Path::new("/proc/thread-self/ns/net"));
        let mut complete = true;
        let others = match sockets::netns_of_cgroup(&self.settings.cgroup) {
            Ok(v) => v,
            Err(e) => {
                complete = false;
                warn!(cgroup = %self.settings.cgroup.display(), error = %e,
                      "cannot list the network namespaces of the cgroup's processes; \
                       re-steering sees this namespace only");
                Vec::new()
            }
        };
        let mut results = vec![("this namespace".to_owned(), work())];
        for ns in others
            .iter()
            .filter(|f| sockets::netns_id_of(f).ok() != own.as_ref().ok().copied())
        {
            let name =
                sockets::netns_id_of(ns).map_or("?".to_owned(), |(_, ino)| format!("net:[{ino}]"));
            results.push((name, sockets::in_netns(ns, work).and_then(|r| r)));
        }
        let mut live = std::collections::HashSet::new();
        let mut destroyed = Vec::new();
        for (ns, r) in results {
            match r {
                Ok(Swept {
                    stale,
                    errors,
                    udp_cookies,
                }) => {
                    live.extend(udp_cookies);
                    for e in errors {
                        warn!(namespace = ns, error = %e,
                              "could not destroy a socket redirected to a backend that left");
                    }
                    destroyed.extend(stale);
                }
                Err(e) => {
                    complete = false;
                    warn!(namespace = ns, error = %e,
                          "cannot list redirected sockets (sock_diag); sockets of backends \
                           that left stay connected there");
                }
            }
        }
        let routes = self.model.routes();
        for s in &destroyed {
            let key = crate::addr::service_key(s.frontend, s.proto);
            let service = routes
                .services
                .get(&key)
                .map_or("?", |d| d.service.as_str());
            info!(service, frontend = %s.frontend, backend = %s.backend, client = %s.src,
                  protocol = proto_name(s.proto),
                  "destroyed a socket redirected to a backend that left: its next call fails \
                   and its reconnect picks a live backend");
            self.metrics
                .sockets_destroyed
                .get_or_create(&crate::metrics::ProtocolLabels {
                    protocol: proto_name(s.proto).to_owned(),
                })
                .inc();
        }
        if complete {
            let gone: Vec<u64> = before.into_iter().filter(|c| !live.contains(c)).collect();
            let pruned = self.reconciler.dataplane_mut().remove_udp_conns(&gone);
            if pruned > 0 {
                debug!(pruned, "UDP tracking entries of closed sockets");
            }
        }
        if destroy {
            // A failed listing is tried again at the next change.
            if complete {
                self.resteer.swept();
            }
            self.metrics
                .resteer_duration
                .observe(began.elapsed().as_secs_f64());
        }
        let took = began.elapsed();
        if destroyed.is_empty() {
            debug!(
                destroy,
                namespaces = 1 + others.len(),
                ?took,
                "socket sweep"
            );
        } else {
            info!(
                destroyed = destroyed.len(),
                namespaces = 1 + others.len(),
                ?took,
                "re-steering sweep"
            );
        }
    }
}

/// Logs each service that could not be applied once when it starts
/// failing and once when it recovers, and mirrors the set in the metrics.
fn report_failures(
    failing: &mut BTreeMap<NotApplied, (String, ServiceKey)>,
    errors: Vec<ApplyError>,
    scope: Option<&BTreeSet<ServiceKey>>,
    metrics: &Metrics,
) {
    let mut now: BTreeMap<NotApplied, (String, ServiceKey)> = errors
        .into_iter()
        .map(|e| {
            (
                NotApplied {
                    service: e.service,
                    frontend: e.frontend,
                    map: e.source.map.to_owned(),
                },
                (e.source.to_string(), e.key),
            )
        })
        .collect();
    // Failures of frontends this reconcile did not look at still stand.
    if let Some(scope) = scope {
        for (k, v) in failing.iter() {
            if !scope.contains(&v.1) {
                now.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
    }
    for (k, (err, _)) in &now {
        if !failing.contains_key(k) {
            error!(service = k.service, frontend = k.frontend, map = k.map, error = %err,
                   "could not apply service; it keeps its previous state");
        }
    }
    for k in failing.keys().filter(|k| !now.contains_key(*k)) {
        info!(
            service = k.service,
            frontend = k.frontend,
            "service applied after earlier failure"
        );
    }
    metrics.not_applied.clear();
    for k in now.keys() {
        metrics.not_applied.get_or_create(k).set(1);
    }
    *failing = now;
}

/// Logs each frontend this node refuses once when the refusal starts and
/// once when it ends, and mirrors them in the metrics.
fn report_refused(
    seen: &mut BTreeMap<ServiceKey, Refused>,
    now: &BTreeMap<ServiceKey, Refused>,
    metrics: &Metrics,
) {
    for (k, r) in now {
        if seen.get(k) != Some(r) {
            warn!(service = r.service, frontend = r.frontend, reason = %r.why,
                  "frontend refused on this node; the service is not routed here");
        }
    }
    for (k, r) in seen.iter() {
        if !now.contains_key(k) {
            info!(
                service = r.service,
                frontend = r.frontend,
                "frontend no longer refused on this node"
            );
        }
    }
    metrics.refused.clear();
    for r in now.values() {
        metrics
            .refused
            .get_or_create(&RefusedLabels {
                service: r.service.clone(),
                frontend: r.frontend.clone(),
                reason: r.why.reason().to_owned(),
            })
            .set(1);
    }
    *seen = now.clone();
}

/// Logs each address-family limit once when it appears.
fn report_family(seen: &mut BTreeSet<FamilyNote>, now: &BTreeSet<FamilyNote>) {
    for n in now.difference(seen) {
        warn!(
            service = n.service,
            frontend = n.frontend,
            detail = n.detail,
            "frontend cannot reach every backend: address families"
        );
    }
    *seen = now.clone();
}

/// Logs each conflict once when it appears.
fn report_conflicts(seen: &mut BTreeSet<Conflict>, now: &BTreeSet<Conflict>) {
    for c in now.difference(seen) {
        warn!(
            frontend = c.frontend,
            service = c.loser,
            winner = c.winner,
            "frontend already claimed by an older service; this service is not routed"
        );
    }
    *seen = now.clone();
}

/// What `status` shows beside the kernel's view: names, weights, states
/// and this node's health verdicts.
fn snapshot(
    node: &str,
    revision: i64,
    applied_unix: u64,
    model: &Model,
    desired: &Desired,
    checks: &ActiveChecks,
) -> Snapshot {
    let routed: std::collections::HashSet<&str> = desired
        .services
        .values()
        .map(|d| d.service.as_str())
        .collect();
    let services = model
        .view()
        .into_iter()
        .map(|(name, def, backends)| SnapService {
            name: name.to_owned(),
            frontend: def.frontends[0].to_string(),
            frontends: def.frontends.iter().map(ToString::to_string).collect(),
            protocol: serde_name(&def.protocol),
            policy: serde_name(&def.policy),
            routed: routed.contains(name),
            fallback: checks.falling_back(name),
            backends: backends
                .into_iter()
                .map(|(instance, b, maintenance)| SnapBackend {
                    instance: instance.to_owned(),
                    addr: b.addr.to_string(),
                    weight: b.weight,
                    state: if maintenance {
                        "maintenance"
                    } else if b.weight == 0 {
                        "draining"
                    } else {
                        "active"
                    }
                    .to_owned(),
                    health: checks.health(b.addr).to_owned(),
                    ejected_by: checks.ejected_by(b.addr).map(str::to_owned),
                })
                .collect(),
        })
        .collect();
    Snapshot {
        node: node.to_owned(),
        pid: std::process::id(),
        version: crate::util::VERSION.to_owned(),
        revision,
        applied_unix,
        metrics_addr: None,
        services,
        refused: desired
            .refused
            .values()
            .map(|r| SnapRefused {
                service: r.service.clone(),
                frontend: r.frontend.clone(),
                reason: r.why.reason().to_owned(),
                detail: r.why.to_string(),
            })
            .collect(),
        ..Snapshot::default()
    }
}

/// An enum's name as written in etcd (`least_conn`, `both`).
fn serde_name<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Above this many changes in one reconcile (a cold start, a re-list),
/// one summary line at info; each service at debug.
const CHANGES_LOGGED_ONE_BY_ONE: usize = 50;

fn log_changes(changes: &[Change], revision: i64, took: std::time::Duration) {
    let one_by_one = changes.len() <= CHANGES_LOGGED_ONE_BY_ONE;
    // Each change at info when there are few, at debug when many.
    macro_rules! each {
        ($($t:tt)*) => {
            if one_by_one { info!($($t)*) } else { debug!($($t)*) }
        };
    }
    for c in changes {
        match c {
            Change::Updated {
                key,
                service,
                frontend,
                backends,
                slots,
            } => each!(
                service,
                frontend,
                proto = proto_name(key.proto),
                backends,
                slots,
                revision,
                "service applied"
            ),
            Change::Removed { key, service } => each!(
                service = service.as_deref().unwrap_or("(adopted)"),
                frontend = frontend_of(key),
                revision,
                "service removed"
            ),
        }
    }
    if !one_by_one {
        let removed = changes
            .iter()
            .filter(|c| matches!(c, Change::Removed { .. }))
            .count();
        info!(
            applied = changes.len() - removed,
            removed,
            revision,
            took_ms = took.as_millis() as u64,
            "services applied (each at debug level)"
        );
    }
}
