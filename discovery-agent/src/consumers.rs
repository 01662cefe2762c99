//! Who talks to whom. The programs count calls per (frontend, client
//! cgroup) in `disc_consumers`; this module turns cgroup ids into paths
//! (`/system.slice/memcached-client.service`) and publishes one compact
//! summary per service and node at `<prefix>consumers/<service>/<node>`,
//! under a lease so a dead node's entries expire.
//!
//! Writes are bounded: a summary is written when its set of workloads
//! changes, and otherwise refreshed at most every [`REFRESH_EVERY`] ticks.
use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use discovery_common::ServiceKey;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{etcd::EtcdConfig, lease::LeaseSession, maps::BpfMaps, util::unix_now};

/// Full refresh of unchanged summaries (fresh call counts), in ticks.
const REFRESH_EVERY: u32 = 10;
/// Workloads listed per service and node, busiest first.
const MAX_WORKLOADS: usize = 100;

pub fn consumers_prefix(prefix: &str, service: &str) -> String {
    format!("{prefix}consumers/{service}/")
}

/// The value at `<prefix>consumers/<service>/<node>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub node: String,
    pub updated_unix: u64,
    /// Busiest first.
    pub workloads: Vec<Workload>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// cgroup path below the cgroup v2 mount, e.g. `/system.slice/x.service`.
    pub cgroup: String,
    /// connect()/sendmsg() calls to the service's frontends counted on this
    /// node (approximate: the kernel counts without atomics).
    pub calls: u64,
}

/// cgroup id → path, for every cgroup under `root` (a cgroup v2 directory's
/// inode number is its id).
pub fn cgroup_paths(root: &Path) -> HashMap<u64, String> {
    use std::os::unix::fs::MetadataExt as _;
    let mut out = HashMap::new();
    let mut stack: Vec<PathBuf> = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&dir) else {
            continue;
        };
        let rel = dir.strip_prefix(root).unwrap_or(&dir);
        out.insert(meta.ino(), format!("/{}", rel.display()));
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
    out
}

/// Per service name: its workloads on this node. Frontends map to names
/// through `names`; calls of cgroups that no longer exist are dropped.
pub fn summarise(
    counts: &[(discovery_common::ConsumerKey, u64)],
    names: &HashMap<ServiceKey, String>,
    paths: &HashMap<u64, String>,
) -> BTreeMap<String, Vec<Workload>> {
    let mut per: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for (k, n) in counts {
        let (Some(name), Some(path)) = (names.get(&k.service), paths.get(&k.cgroup_id)) else {
            continue;
        };
        *per.entry(name.clone())
            .or_default()
            .entry(path.clone())
            .or_default() += n;
    }
    per.into_iter()
        .map(|(name, m)| {
            let mut w: Vec<Workload> = m
                .into_iter()
                .map(|(cgroup, calls)| Workload { cgroup, calls })
                .collect();
            w.sort_by(|a, b| b.calls.cmp(&a.calls).then(a.cgroup.cmp(&b.cgroup)));
            w.truncate(MAX_WORKLOADS);
            (name, w)
        })
        .collect()
}

pub struct Publisher {
    pub etcd: EtcdConfig,
    pub prefix: String,
    pub node: String,
    pub pin_dir: PathBuf,
    pub cgroup_root: PathBuf,
    pub interval: Duration,
    /// Frontend → service name, as last applied by the agent.
    pub names: watch::Receiver<HashMap<ServiceKey, String>>,
}

impl Publisher {
    pub async fn run(mut self) {
        let maps = match BpfMaps::open(&self.pin_dir) {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "consumers: cannot open the maps; not publishing");
                return;
            }
        };
        let mut session: Option<LeaseSession> = None;
        // service → (workload set, ticks since written)
        let mut published: BTreeMap<String, (Vec<String>, u32)> = BTreeMap::new();
        let mut paths = HashMap::new();
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let counts = match maps.consumers() {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "consumers: reading the map");
                    continue;
                }
            };
            if counts
                .iter()
                .any(|(k, _)| !paths.contains_key(&k.cgroup_id))
            {
                paths = cgroup_paths(&self.cgroup_root);
            }
            let names = self.names.borrow_and_update().clone();
            let now = summarise(&counts, &names, &paths);
            if let Some(reason) = session.as_mut().and_then(LeaseSession::check_lost) {
                warn!(node = self.node, %reason, "consumers: lease lost; publishing again under a new one");
                session = None;
            }
            if let Err(e) = self.publish(&mut session, &mut published, &now).await {
                warn!(node = self.node, error = %format!("{e:#}"), "consumers: publishing to etcd failed; retrying next tick");
                session = None;
            }
        }
    }

    async fn publish(
        &self,
        session: &mut Option<LeaseSession>,
        published: &mut BTreeMap<String, (Vec<String>, u32)>,
        now: &BTreeMap<String, Vec<Workload>>,
    ) -> anyhow::Result<()> {
        if session.is_none() {
            let ttl = (self.interval * 3).max(Duration::from_secs(60));
            let s = LeaseSession::open(&self.etcd, ttl).await?;
            info!(
                node = self.node,
                lease = format!("{:x}", s.id()),
                "consumers: publishing under a new lease"
            );
            *session = Some(s);
            // Nothing is under the new lease yet.
            published.clear();
        }
        let s = session.as_mut().expect("opened above");
        let opts = s.put_options();
        let c = s.client();
        let key =
            |service: &str| format!("{}{}", consumers_prefix(&self.prefix, service), self.node);
        for (service, workloads) in now {
            let set: Vec<String> = workloads.iter().map(|w| w.cgroup.clone()).collect();
            let due = match published.get_mut(service) {
                Some((old, age)) if *old == set => {
                    *age += 1;
                    *age >= REFRESH_EVERY
                }
                _ => true,
            };
            if !due {
                continue;
            }
            let value = serde_json::to_string(&Summary {
                node: self.node.clone(),
                updated_unix: unix_now(),
                workloads: workloads.clone(),
            })
            .expect("serialisable");
            let k = key(service);
            c.put(k.as_str(), value, Some(opts.clone()))
                .await
                .with_context(|| format!("writing {k}"))?;
            debug!(
                service,
                key = k,
                workloads = set.len(),
                "consumers published"
            );
            published.insert(service.clone(), (set, 0));
        }
        let gone: Vec<String> = published
            .keys()
            .filter(|s| !now.contains_key(*s))
            .cloned()
            .collect();
        for service in gone {
            let k = key(&service);
            c.delete(k.as_str(), None)
                .await
                .with_context(|| format!("deleting {k}"))?;
            published.remove(&service);
        }
        Ok(())
    }
}

/// `status --consumers SERVICE`: every node's summary from etcd.
pub async fn show(
    etcd: &EtcdConfig,
    prefix: &str,
    service: &str,
    json: bool,
) -> anyhow::Result<()> {
    crate::schema::check_name(service)?;
    let mut c = crate::etcd::connect(etcd).await?;
    let p = consumers_prefix(prefix, service);
    let r = c
        .get(
            p.as_str(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .with_context(|| format!("reading {p}"))?;
    let mut all = Vec::new();
    for kv in r.kvs() {
        match serde_json::from_slice::<Summary>(kv.value()) {
            Ok(s) => all.push(s),
            Err(e) => warn!(key = %String::from_utf8_lossy(kv.key()), error = %e,
                            "skipping a malformed consumers entry"),
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    if all.is_empty() {
        println!("no node reports a workload using {service}");
        return Ok(());
    }
    let now = unix_now();
    println!(
        "{:<24} {:<56} {:>10} {:>8}",
        "NODE", "WORKLOAD (cgroup)", "CALLS", "AGE"
    );
    for s in &all {
        for w in &s.workloads {
            println!(
                "{:<24} {:<56} {:>10} {:>7}s",
                s.node,
                w.cgroup,
                w.calls,
                now.saturating_sub(s.updated_unix)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use discovery_common::{ConsumerKey, IPPROTO_TCP, IPPROTO_UDP, v4_mapped};

    #[test]
    fn summaries_group_by_service_and_drop_unknown_cgroups() {
        let svc = |proto| ServiceKey {
            addr: v4_mapped([127, 0, 0, 1]),
            port: 53,
            proto,
            pad: 0,
        };
        let ck = |proto, cgroup_id| ConsumerKey {
            service: svc(proto),
            pad: 0,
            cgroup_id,
        };
        let names = HashMap::from([
            (svc(IPPROTO_TCP), "dns".to_owned()),
            (svc(IPPROTO_UDP), "dns".to_owned()),
        ]);
        let paths = HashMap::from([(10, "/a.service".to_owned()), (11, "/b.service".to_owned())]);
        let counts = [
            (ck(IPPROTO_TCP, 10), 2),
            (ck(IPPROTO_UDP, 10), 3),
            (ck(IPPROTO_UDP, 11), 9),
            (ck(IPPROTO_UDP, 99), 1), // cgroup gone
        ];
        let s = summarise(&counts, &names, &paths);
        assert_eq!(
            s["dns"],
            vec![
                Workload {
                    cgroup: "/b.service".into(),
                    calls: 9
                },
                Workload {
                    cgroup: "/a.service".into(),
                    calls: 5
                },
            ]
        );
    }

    #[test]
    fn cgroup_ids_are_directory_inodes() {
        use std::os::unix::fs::MetadataExt as _;
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("x/y")).unwrap();
        let p = cgroup_paths(d.path());
        let ino = std::fs::metadata(d.path().join("x/y")).unwrap().ino();
        assert_eq!(p[&ino], "/x/y");
    }
}
