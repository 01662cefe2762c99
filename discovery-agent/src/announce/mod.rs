//! `discovery-agent announce`: registers local instances in etcd while their
//! health checks pass.
//!
//! All instances of one announcer share one lease ([`LeaseSession`]);
//! every change is one transaction. If etcd or the lease is lost, checks
//! keep running and the instances are registered again under a new
//! lease as soon as etcd answers. On SIGTERM/SIGINT the instances are set to
//! weight 0, held for the drain period (a second signal skips the wait),
//! then deleted, and the process exits once the delete is confirmed.
pub mod config;
pub mod detect;
pub mod health;

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context as _, bail};
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::mpsc,
    time::{Instant, sleep, sleep_until},
};
use tracing::{error, info, warn};

use crate::{
    config::AnnounceArgs,
    etcd::{Backoff, EtcdConfig, connect},
    lease::LeaseSession,
    schema::{BackendJson, backend_key_path},
};
use config::Instance;

/// Key → JSON value, as written under our lease.
type Entries = BTreeMap<String, String>;

/// A value no real one equals: marks a key that may exist in etcd (from
/// another lease or an earlier run) and must be deleted.
const MAYBE_STALE: &str = "";

/// etcd's default `--max-txn-ops`.
const MAX_INSTANCES: usize = 128;

/// Writes the difference between `written` and `want` in one transaction,
/// under the session's lease.
async fn sync(session: &mut LeaseSession, written: &Entries, want: &Entries) -> anyhow::Result<()> {
    let mut ops = Vec::new();
    for (k, v) in want {
        if written.get(k) != Some(v) {
            ops.push(TxnOp::put(
                k.as_str(),
                v.as_str(),
                Some(session.put_options()),
            ));
        }
    }
    for k in written.keys().filter(|k| !want.contains_key(*k)) {
        ops.push(TxnOp::delete(k.as_str(), None));
    }
    if ops.is_empty() {
        return Ok(());
    }
    session
        .client()
        .txn(Txn::new().and_then(ops))
        .await
        .context("writing instances")?;
    Ok(())
}

fn value(inst: &Instance, weight: u32) -> String {
    serde_json::to_string(&BackendJson {
        addr: inst.addr.to_string(),
        weight: u64::from(weight),
    })
    .expect("serialising a backend value")
}

struct Announcer {
    etcd: EtcdConfig,
    prefix: String,
    ttl: Duration,
    instances: Vec<Instance>,
    /// None until the first verdict of the instance's check.
    up: Vec<Option<bool>>,
    draining: bool,
    session: Option<LeaseSession>,
    written: Entries,
    backoff: Backoff,
    retry_at: Instant,
}

impl Announcer {
    fn key(&self, inst: &Instance) -> String {
        backend_key_path(&self.prefix, &inst.service, &inst.id)
    }

    /// What should be in etcd now.
    fn desired(&self) -> Entries {
        self.instances
            .iter()
            .zip(&self.up)
            .filter(|(_, up)| **up == Some(true))
            .map(|(i, _)| {
                let w = if self.draining { 0 } else { i.weight };
                (self.key(i), value(i, w))
            })
            .collect()
    }

    /// Connects if needed and brings etcd to the desired state. Returns
    /// whether etcd now holds it.
    async fn converge(&mut self) -> bool {
        if self.session.is_none() {
            if Instant::now() < self.retry_at {
                return false;
            }
            match LeaseSession::open(&self.etcd, self.ttl).await {
                Ok(s) => {
                    info!(lease = format!("{:x}", s.id()), ttl = ?self.ttl,
                          endpoints = ?self.etcd.endpoints, "connected to etcd with a new lease");
                    self.session = Some(s);
                    // Nothing is under the new lease yet; instances known to
                    // be down may still have keys under the old one.
                    self.written.clear();
                    for i in 0..self.instances.len() {
                        if self.up[i] == Some(false) {
                            self.forget(i);
                        }
                    }
                    self.backoff.reset();
                }
                Err(e) => {
                    let wait = self.backoff.next();
                    warn!(endpoints = ?self.etcd.endpoints, error = format!("{e:#}"), retry_in = ?wait,
                          "etcd unreachable; health checks continue, will register when it answers");
                    self.retry_at = Instant::now() + wait;
                    return false;
                }
            }
        }
        let want = self.desired();
        let session = self.session.as_mut().expect("session just opened");
        if let Err(e) = sync(session, &self.written, &want).await {
            let wait = self.backoff.next();
            warn!(error = format!("{e:#}"), retry_in = ?wait, "lost etcd; will register again under a new lease");
            self.session = None;
            self.retry_at = Instant::now() + wait;
            return false;
        }
        for (k, v) in &want {
            if self.written.get(k) != Some(v) {
                info!(key = k, value = v, "registered");
            }
        }
        for (k, v) in self.written.iter().filter(|(k, _)| !want.contains_key(*k)) {
            if v != MAYBE_STALE {
                info!(key = k, "withdrawn");
            }
        }
        self.written = want;
        true
    }

    /// Makes the next sync delete instance `i`'s key whatever we wrote.
    fn forget(&mut self, i: usize) {
        let key = self.key(&self.instances[i]);
        self.written
            .entry(key)
            .or_insert_with(|| MAYBE_STALE.into());
    }

    fn set_state(&mut self, i: usize, up: bool) {
        self.up[i] = Some(up);
        if !up {
            self.forget(i);
        }
    }

    /// Resolves when the session's lease is lost; never without a session.
    async fn session_lost(&mut self) -> String {
        match self.session.as_mut() {
            Some(s) => s.lost().await,
            None => std::future::pending().await,
        }
    }
}

fn instances(args: &AnnounceArgs) -> anyhow::Result<Vec<Instance>> {
    let endpoints = &args.etcd.endpoints;
    let own = |want| detect::own_address(want, endpoints);
    let v = match &args.config {
        Some(path) => config::load_file(path, &own)?,
        None => vec![config::RawInstance::from_args(&args.instance)?.validate(&own)?],
    };
    config::check_unique(&v)?;
    if v.len() > MAX_INSTANCES {
        bail!(
            "{} instances: one announcer handles at most {MAX_INSTANCES} (every change is one \
             etcd transaction, and etcd allows {MAX_INSTANCES} operations per transaction by \
             default); split them over several announcers",
            v.len()
        );
    }
    Ok(v)
}

pub async fn run(args: AnnounceArgs) -> anyhow::Result<()> {
    let instances = instances(&args)?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    if args.drain {
        return drain_once(&args, &instances, &mut sigterm, &mut sigint).await;
    }
    // Our own connections (etcd, health checks) are never redirected, when
    // an agent runs on this node and we may write its maps (root).
    let _own = match crate::exempt::Registration::register(&args.pin.pin_dir) {
        Ok(r) => Some(r),
        Err(e) => {
            info!(pin_dir = %args.pin.pin_dir.display(), error = %format!("{e:#}"),
                  "not exempt from redirection (no agent maps here, or not root); \
                   keep this announcer's etcd endpoints among the agent's --etcd");
            None
        }
    };
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .context("building the HTTP check client")?;
    let (tx, mut rx) = mpsc::channel(64);
    for (i, inst) in instances.iter().enumerate() {
        info!(service = inst.service, instance = inst.id, addr = %inst.addr,
              check = ?inst.check.kind, "checking");
        tokio::spawn(health::run_checker(
            i,
            inst.clone(),
            http.clone(),
            tx.clone(),
        ));
    }
    let n = instances.len();
    let mut a = Announcer {
        etcd: args.etcd.config()?,
        prefix: args.etcd.prefix.clone(),
        ttl: args.ttl,
        instances,
        up: vec![None; n],
        draining: false,
        session: None,
        written: Entries::new(),
        backoff: Backoff::new(),
        retry_at: Instant::now(),
    };
    loop {
        a.converge().await;
        let retry_at = a.retry_at;
        let idle = a.session.is_some();
        tokio::select! {
            Some((i, up)) = rx.recv() => a.set_state(i, up),
            reason = a.session_lost() => {
                warn!(%reason, "lease lost; will register again under a new lease");
                a.session = None;
            }
            _ = sleep_until(retry_at), if !idle => {}
            _ = sigterm.recv() => { info!("SIGTERM: draining"); break }
            _ = sigint.recv() => { info!("SIGINT: draining"); break }
        }
    }
    a.draining = true;
    let second = async {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
    };
    tokio::pin!(second);
    // Weight 0: no new connections go to these instances.
    let hold = sleep(args.drain_period);
    tokio::pin!(hold);
    let mut skipped = false;
    loop {
        let converged = a.converge().await;
        if converged {
            info!(instances = a.written.len(), hold = ?args.drain_period, "weight 0 set; holding for the drain period");
            break;
        }
        tokio::select! {
            _ = &mut hold => break,
            _ = &mut second => { skipped = true; break }
            _ = sleep_until(a.retry_at) => {}
        }
    }
    if !skipped {
        tokio::select! {
            _ = &mut hold => {}
            _ = &mut second => info!("second signal: skipping the rest of the drain period"),
        }
    }
    // Delete, and exit once etcd confirms it. If etcd stays away, the keys
    // expire with the lease anyway.
    for i in 0..a.instances.len() {
        a.set_state(i, false);
    }
    let deadline = Instant::now() + args.ttl;
    loop {
        if a.converge().await {
            if let Some(s) = a.session.take() {
                s.revoke().await;
            }
            info!("instances withdrawn; exiting");
            return Ok(());
        }
        if Instant::now() >= deadline {
            error!(ttl = ?args.ttl, "could not confirm the delete; the keys expire with the lease");
            bail!("etcd unreachable while withdrawing instances");
        }
        sleep_until(a.retry_at.min(deadline)).await;
    }
}

/// `announce --drain`: drains instances registered by another announcer
/// process. Weight 0 keeps the key's current lease (so it still expires if
/// that announcer dies); only keys that exist are touched.
async fn drain_once(
    args: &AnnounceArgs,
    instances: &[Instance],
    sigterm: &mut Signal,
    sigint: &mut Signal,
) -> anyhow::Result<()> {
    let mut client = connect(&args.etcd.config()?)
        .await
        .context("connecting to etcd")?;
    let mut drained = Vec::new();
    for inst in instances {
        let key = backend_key_path(&args.etcd.prefix, &inst.service, &inst.id);
        let put = TxnOp::put(
            key.as_str(),
            value(inst, 0),
            Some(PutOptions::new().with_ignore_lease()),
        );
        let r = client
            .txn(
                Txn::new()
                    .when([Compare::version(key.as_str(), CompareOp::Greater, 0)])
                    .and_then([put]),
            )
            .await
            .with_context(|| format!("setting weight 0 on {key}"))?;
        if r.succeeded() {
            info!(key, "weight 0 set");
            drained.push(key);
        } else {
            warn!(key, "not registered; nothing to drain");
        }
    }
    if drained.is_empty() {
        return Ok(());
    }
    info!(hold = ?args.drain_period, "holding for the drain period (a signal skips the wait)");
    tokio::select! {
        _ = sleep(args.drain_period) => {}
        _ = sigterm.recv() => info!("signal: skipping the rest of the drain period"),
        _ = sigint.recv() => info!("signal: skipping the rest of the drain period"),
    }
    let ops: Vec<TxnOp> = drained
        .iter()
        .map(|k| TxnOp::delete(k.as_str(), None))
        .collect();
    client
        .txn(Txn::new().and_then(ops))
        .await
        .context("deleting drained instances")?;
    for key in &drained {
        info!(key, "withdrawn");
    }
    Ok(())
}
