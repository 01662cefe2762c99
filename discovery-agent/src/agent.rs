//! Wiring: loads and attaches the programs, starts the etcd source, the
//! checks and the consumers publisher, and hands every event to the
//! [`Controller`], which owns the state.
use std::{collections::HashMap, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{info, warn};

use crate::{
    checks::ActiveChecks,
    config::{MetricsAddr, RunArgs},
    controller::{Controller, Settings},
    etcd::Source,
    exempt,
    guard::NodeGuard,
    loader,
    maps::BpfMaps,
    metrics::{self, Metrics},
    model::Model,
    reconcile::Reconciler,
};

/// How often changed active-check verdicts are applied: each application
/// recomputes every service, and a service's whole backend set is
/// rewritten when it changes.
const HEALTH_APPLY_EVERY: Duration = Duration::from_millis(100);

/// Passive checks read the kernel's connect outcomes at this pace.
const PASSIVE_EVERY: Duration = Duration::from_millis(200);

/// How often the node's listening sockets are listed (sock_diag): a
/// listener that appears under a routed frontend is noticed, and the
/// frontend withdrawn, within this time. Documented in README.
pub const LISTENER_SCAN_EVERY: Duration = Duration::from_secs(1);

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
    let seen_revision = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let metrics = Arc::new(Metrics::new(Some(metrics::KernelCollector {
        pin_dir: pin_dir.clone(),
        names: names_rx.clone(),
        etcd_revision: Default::default(),
        seen_revision: seen_revision.clone(),
    })));
    let metrics_addr = match args.metrics_addr {
        MetricsAddr(Some(addr)) => Some(
            crate::web::serve(
                addr,
                metrics.clone(),
                crate::web::StatusSource {
                    pin_dir: pin_dir.clone(),
                    status_file: args.status.status_file.clone(),
                    etcd: args.etcd.config()?,
                    prefix: args.etcd.prefix.clone(),
                },
            )
            .await?,
        ),
        MetricsAddr(None) => None,
    };
    let loaded = loader::load_and_attach(
        &cgroup,
        &pin_dir,
        &loader::Sizes {
            max_services: args.max_services,
            max_backends: args.max_backends,
        },
        args.replace_programs,
    )?;
    if !loaded.migrated.is_empty() {
        info!(pin_dir = %pin_dir.display(), maps = ?loaded.migrated,
              "pinned maps migrated to this build's layout and sizes with no gap");
    }
    // Our own connections (etcd, checks) are never redirected.
    if let Err(e) = exempt::prune(&pin_dir) {
        warn!(pin_dir = %pin_dir.display(), error = %format!("{e:#}"), "could not prune the exemption map");
    }
    let _own = exempt::Registration::register(&pin_dir)
        .context("exempting the agent's own connections from redirection")?;
    let mut maps = BpfMaps::open(&pin_dir)?.with_fresh(loaded.fresh);
    maps.set_config(discovery_common::Config {
        passive_failures: args.passive_ejector.kernel_threshold(args.passive_failures),
        eject_secs: u32::try_from(args.passive_ejection.as_secs().max(1)).unwrap_or(u32::MAX),
    })?;
    // The previous run's names, until this one has applied etcd.
    let last_run = if loaded.fresh {
        None
    } else {
        crate::status::read_snapshot(&args.status.status_file).unwrap_or_else(|e| {
            warn!(path = %args.status.status_file.display(), error = %format!("{e:#}"),
                  "ignoring the previous status file");
            None
        })
    };
    let reconciler = Reconciler::new(maps).context("reading the pinned maps")?;
    let node = args
        .node
        .clone()
        .unwrap_or_else(crate::announce::config::hostname);
    let (health_tx, mut health_rx) = mpsc::channel(256);
    let mut ctl = Controller::new(
        Settings {
            pin_dir: pin_dir.clone(),
            cgroup: cgroup.clone(),
            status_file: args.status.status_file.clone(),
            node: node.clone(),
            passive_failures: args.passive_failures,
            passive_ejection: args.passive_ejection,
            ejection: args.passive_ejector,
            metrics_addr,
            programs: loaded
                .programs
                .iter()
                .map(|(name, how)| ((*name).to_owned(), how.as_str().to_owned()))
                .collect(),
            last_run,
        },
        Model::new(args.etcd.prefix.clone(), args.allowed_frontends.clone()),
        // What this node never routes: its etcd endpoints, its metrics
        // address and, unless a service takes over, where something listens.
        NodeGuard::new(&args.etcd.endpoints, args.metrics_addr.0),
        ActiveChecks::new(health_tx, args.passive_ejector)?,
        reconciler,
        metrics,
        names_tx,
    );
    info!(cgroup = %cgroup.display(), pin_dir = %pin_dir.display(), prefix = %args.etcd.prefix,
          services = ctl.services_installed(), "agent started; waiting for etcd");

    let (tx, mut rx) = mpsc::channel(64);
    let source = Source {
        etcd,
        prefix: args.etcd.prefix.clone(),
        seen_revision,
    };
    let source_task = tokio::spawn(source.run(tx));
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
    let tick = |every| {
        let mut t = tokio::time::interval(every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    };
    // The status file is rewritten at most once per tick, when dirty.
    let mut status_tick = tick(Duration::from_secs(1));
    let mut health_tick = tick(HEALTH_APPLY_EVERY);
    let mut passive_tick = tick(PASSIVE_EVERY);
    let mut listener_tick = tick(LISTENER_SCAN_EVERY);
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            u = rx.recv() => {
                let Some(u) = u else { anyhow::bail!("etcd source stopped") };
                // Coalesce a burst of updates into one reconcile.
                let mut batch = vec![u];
                while let Ok(u) = rx.try_recv() {
                    batch.push(u);
                }
                ctl.on_etcd(batch);
            }
            Some(v) = health_rx.recv() => {
                let mut verdicts = vec![v];
                while let Ok(v) = health_rx.try_recv() {
                    verdicts.push(v);
                }
                ctl.on_verdicts(verdicts);
            }
            _ = health_tick.tick(), if ctl.health_pending() => ctl.on_health_tick(),
            _ = passive_tick.tick(), if args.passive_failures > 0 => ctl.on_passive_tick(),
            _ = listener_tick.tick() => ctl.on_listener_tick(),
            _ = status_tick.tick(), if ctl.status_due() => ctl.on_status_tick(),
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break }
            _ = sigint.recv() => { info!("SIGINT: stopping"); break }
        }
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
