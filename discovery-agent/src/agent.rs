//! The run loop: etcd → model → desired table → reconciler → maps.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{debug, error, info, warn};

use discovery_common::ServiceKey;

use crate::{
    checks::ActiveChecks,
    config::{MetricsAddr, RunArgs},
    etcd::{Change as EtcdChange, Source, Update},
    exempt,
    guard::NodeGuard,
    listeners, loader,
    maps::BpfMaps,
    metrics::{self, Metrics, NotApplied, RefusedLabels},
    model::{Applied, Conflict, Desired, Model, Refused, proto_name},
    reconcile::{ApplyError, Change, Reconciler, frontend_of},
    status::{self, SnapBackend, SnapRefused, SnapService, Snapshot},
};

/// How often changed active-check verdicts are applied: each application
/// recomputes every service, and a service's whole backend set is
/// rewritten when it changes.
const HEALTH_APPLY_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Above this many services changed in one batch, recompute everything.
const PARTIAL_LIMIT: usize = 1_000;

/// How often the node's listening sockets are listed (sock_diag): a
/// listener that appears under a routed frontend is noticed, and the
/// frontend withdrawn, within this time. Documented in README.
pub const LISTENER_SCAN_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Entries of processes that are gone are pruned from the exemption map
/// every this many listener scans.
const EXEMPT_PRUNE_EVERY: u32 = 10;

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    loader::ensure_root()?;
    let etcd = args.etcd.config()?;
    let cgroup = match &args.cgroup {
        Some(c) => c.clone(),
        None => loader::cgroup2_root()?,
    };
    let pin_dir = args.pin.pin_dir.clone();
    // Bound before attaching: a busy port must not leave programs behind.
    let (names_tx, names_rx) = tokio::sync::watch::channel(HashMap::new());
    let metrics = Arc::new(Metrics::new(Some(metrics::KernelCollector {
        pin_dir: pin_dir.clone(),
        names: names_rx.clone(),
        etcd_revision: Default::default(),
        etcd_watch_revision: Default::default(),
    })));
    if let MetricsAddr(Some(addr)) = args.metrics_addr {
        metrics::serve(addr, metrics.clone()).await?;
    }
    // What this node never routes: its etcd endpoints, its metrics address
    // and, unless a service takes over, addresses where something listens.
    let mut guard = NodeGuard::new(&args.etcd.endpoints, args.metrics_addr.0);
    let fresh = loader::load_and_attach(
        &cgroup,
        &pin_dir,
        &loader::Sizes {
            max_services: args.max_services,
            max_backends: args.max_backends,
        },
        args.replace_programs,
    )?;
    // Our own connections (etcd, checks) are never redirected.
    if let Err(e) = exempt::prune(&pin_dir) {
        warn!(pin_dir = %pin_dir.display(), error = %format!("{e:#}"), "could not prune the exemption map");
    }
    let _own = exempt::Registration::register(&pin_dir)
        .context("exempting the agent's own connections from redirection")?;
    let mut scan_failing = false;
    scan_listeners(&mut guard, &mut scan_failing);
    let maps = BpfMaps::open(&pin_dir)?.with_fresh(fresh);
    let mut reconciler = Reconciler::new(maps).context("reading the pinned maps")?;
    info!(cgroup = %cgroup.display(), pin_dir = %pin_dir.display(), prefix = %args.etcd.prefix,
          services = reconciler.services_installed(), "agent started; waiting for etcd");

    let mut model = Model::new(args.etcd.prefix.clone(), args.allowed_frontends.clone());
    let (tx, mut rx) = mpsc::channel(64);
    let source = Source {
        etcd,
        prefix: args.etcd.prefix.clone(),
        metrics: metrics.clone(),
    };
    let source_task = tokio::spawn(source.run(tx));

    let node = args
        .node
        .clone()
        .unwrap_or_else(crate::announce::config::hostname);
    let consumers_task = (!args.consumers_interval.is_zero()).then(|| {
        tokio::spawn(
            crate::consumers::Publisher {
                etcd: args.etcd.config().expect("checked at start"),
                prefix: args.etcd.prefix.clone(),
                node: node.clone(),
                pin_dir: pin_dir.clone(),
                cgroup_root: loader::cgroup2_root().unwrap_or_else(|_| cgroup.clone()),
                interval: args.consumers_interval,
                names: names_rx,
            }
            .run(),
        )
    });
    // The status file is rewritten at most once per tick, when dirty.
    let mut status_tick = tokio::time::interval(std::time::Duration::from_secs(1));
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut status_dirty = false;
    let mut status_next = std::time::Instant::now();
    let mut applied_unix = 0;

    let (health_tx, mut health_rx) = mpsc::channel(256);
    let mut checks = ActiveChecks::new(health_tx)?;

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut conflicts = BTreeSet::new();
    let mut refused_seen = BTreeMap::new();
    let mut shadowing = BTreeSet::new();
    let mut listener_tick = tokio::time::interval(LISTENER_SCAN_EVERY);
    listener_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut scans = 0u32;
    let mut failing: BTreeMap<NotApplied, (String, ServiceKey)> = BTreeMap::new();
    let mut revision = 0;
    // The routing table before this node's health verdicts, kept between
    // batches so a batch recomputes only the frontends it touches.
    let mut raw = Desired::default();
    let mut names_dirty = false;
    // Active check verdicts are applied at most this often.
    let mut health_tick = tokio::time::interval(HEALTH_APPLY_EVERY);
    health_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut health_pending = false;
    // Passive checks read the kernel's connect outcomes at this pace.
    let mut passive_tick = tokio::time::interval(std::time::Duration::from_millis(200));
    passive_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Health verdicts can change any service: recompute everything.
        let mut full = false;
        tokio::select! {
            u = rx.recv() => {
                let Some(u) = u else { anyhow::bail!("etcd source stopped") };
                // Coalesce a burst of updates into one reconcile.
                revision = apply(&mut model, u);
                while let Ok(u) = rx.try_recv() {
                    revision = apply(&mut model, u);
                }
                // A service put now is checked against the listeners of
                // now, not of the last tick (a proxy that just started).
                full |= rescan(&mut guard, &mut scan_failing, &model, &mut shadowing);
            }
            Some((addr, check, up)) = health_rx.recv() => {
                // Verdicts come in bursts (a rack goes away): take them all,
                // and apply them on the next health tick, not one by one.
                let mut changed = checks.observe(addr, &check, up);
                while let Ok((addr, check, up)) = health_rx.try_recv() {
                    changed |= checks.observe(addr, &check, up);
                }
                health_pending |= changed;
                continue;
            }
            _ = health_tick.tick(), if health_pending => {
                health_pending = false;
                full = true;
            }
            _ = passive_tick.tick(), if args.passive_failures > 0 => {
                let failing = reconciler.dataplane().failing_backends(args.passive_failures);
                let (newly, changed) =
                    checks.passive(&failing, args.passive_ejection, std::time::Instant::now());
                for addr in newly {
                    // A re-admitted backend must fail anew to go out again.
                    reconciler.dataplane_mut().reset_failures(addr);
                }
                if !changed {
                    continue;
                }
                full = true;
            }
            _ = listener_tick.tick() => {
                scans = scans.wrapping_add(1);
                if scans.is_multiple_of(EXEMPT_PRUNE_EVERY) {
                    match exempt::prune(&pin_dir) {
                        Ok(0) => {}
                        Ok(n) => debug!(pruned = n, "exemption entries of processes that are gone"),
                        Err(e) => warn!(error = %format!("{e:#}"), "could not prune the exemption map"),
                    }
                }
                if !rescan(&mut guard, &mut scan_failing, &model, &mut shadowing) {
                    continue;
                }
                full = true;
            }
            _ = status_tick.tick(), if status_dirty && std::time::Instant::now() >= status_next => {
                let began = std::time::Instant::now();
                if std::mem::take(&mut names_dirty) {
                    names_tx.send_if_modified(|names| {
                        let now: HashMap<_, _> = raw
                            .services
                            .iter()
                            .map(|(k, s)| (*k, s.service.clone()))
                            .collect();
                        let changed = *names != now;
                        *names = now;
                        changed
                    });
                }
                let snap = snapshot(&node, revision, applied_unix, &model, &raw, &checks);
                if let Err(e) = status::write_snapshot(&args.status.status_file, &snap) {
                    warn!(path = %args.status.status_file.display(), error = %format!("{e:#}"),
                          "could not write the status file");
                }
                status_dirty = false;
                // A big table takes a while to write: keep it under 5% of
                // the agent's time.
                status_next = began + began.elapsed() * 20;
                continue;
            }
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break }
            _ = sigint.recv() => { info!("SIGINT: stopping"); break }
        }
        let started = std::time::Instant::now();
        // The frontends to recompute: those of services whose keys changed
        // (where they were and where they are now) and those that failed
        // to apply before; or all of them.
        let scope = match model.take_touched() {
            Some(names) if !full && names.len() <= PARTIAL_LIMIT => {
                let mut keys: BTreeSet<ServiceKey> = raw
                    .services
                    .iter()
                    .filter(|(_, s)| names.contains(&s.service))
                    .map(|(k, _)| *k)
                    .collect();
                keys.extend(names.iter().flat_map(|n| model.frontend_keys(n)));
                keys.extend(failing.values().map(|(_, k)| *k));
                let part = model.desired_where(|k| keys.contains(k), &guard);
                for k in &keys {
                    raw.services.remove(k);
                    raw.refused.remove(k);
                }
                let fronts: BTreeSet<String> = keys.iter().map(frontend_of).collect();
                raw.conflicts.retain(|c| {
                    !names.contains(&c.winner)
                        && !names.contains(&c.loser)
                        && !fronts.contains(&c.frontend)
                });
                raw.conflicts.extend(part.conflicts);
                raw.services.extend(part.services);
                raw.refused.extend(part.refused);
                Some(keys)
            }
            _ => {
                raw = model.desired_for(&guard);
                shadowing = model.shadowing(&guard);
                None
            }
        };
        report_conflicts(&mut conflicts, &raw.conflicts);
        report_refused(&mut refused_seen, &raw.refused, &metrics);
        // Active checks: this node's view of backend health.
        checks.sync(&raw);
        let mut desired = Desired {
            services: match &scope {
                Some(keys) => keys
                    .iter()
                    .filter_map(|k| raw.services.get(k).map(|s| (*k, s.clone())))
                    .collect(),
                None => raw.services.clone(),
            },
            conflicts: BTreeSet::new(),
            refused: BTreeMap::new(),
        };
        checks.apply(&mut desired);
        let (changes, errors) = match &scope {
            Some(keys) => reconciler.reconcile_keys(&desired, keys),
            None => reconciler.reconcile(&desired),
        };
        metrics
            .reconcile_duration
            .observe(started.elapsed().as_secs_f64());
        metrics.last_reconcile.set(status::unix_now() as i64);
        log_changes(&changes, revision, started.elapsed());
        report_failures(&mut failing, errors, scope.as_ref(), &metrics);
        applied_unix = status::unix_now();
        names_dirty = true;
        status_dirty = true;
        metrics.services.set(reconciler.services_installed() as i64);
        metrics.invalid_keys.set(model.invalid_keys().len() as i64);
        metrics.etcd_revision.set(revision);
        metrics.ejected.set(checks.ejected() as i64);
    }
    source_task.abort();
    if let Some(t) = consumers_task {
        t.abort();
    }
    if args.detach_on_exit {
        loader::detach(&pin_dir)?;
    } else {
        info!(pin_dir = %pin_dir.display(),
              "programs stay attached and maps pinned; traffic keeps flowing");
    }
    Ok(())
}

/// Feeds one etcd update into the model; returns its revision.
fn apply(model: &mut Model, u: Update) -> i64 {
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
            revision
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
            revision
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

/// Lists the listeners again; returns whether that changed which
/// frontends shadow one (then everything is recomputed).
fn rescan(
    guard: &mut NodeGuard,
    failing: &mut bool,
    model: &Model,
    shadowing: &mut BTreeSet<ServiceKey>,
) -> bool {
    if !scan_listeners(guard, failing) {
        return false;
    }
    let now = model.shadowing(guard);
    if now == *shadowing {
        return false;
    }
    *shadowing = now;
    true
}

/// Lists the node's listeners into the guard. Returns whether the scan
/// changed anything; a failing scan is logged once and keeps the last one.
fn scan_listeners(guard: &mut NodeGuard, failing: &mut bool) -> bool {
    match listeners::scan() {
        Ok(l) => {
            if std::mem::take(failing) {
                info!(listeners = l.len(), "listing listening sockets works again");
            }
            guard.set_listeners(l)
        }
        Err(e) => {
            if !std::mem::replace(failing, true) {
                error!(error = %e,
                       "cannot list listening sockets (sock_diag); frontends are not checked \
                        against new listeners until it works");
            }
            false
        }
    }
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
            frontend: def.frontend.to_string(),
            protocol: serde_name(&def.protocol),
            policy: serde_name(&def.policy),
            routed: routed.contains(name),
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
                })
                .collect(),
        })
        .collect();
    Snapshot {
        node: node.to_owned(),
        pid: std::process::id(),
        version: crate::config::VERSION.to_owned(),
        revision,
        applied_unix,
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
