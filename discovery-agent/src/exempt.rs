//! The agent's and announcers' own processes in `disc_exempt`: the
//! programs leave their calls to a frontend alone, whatever etcd says.
//!
//! A process registers itself (its tgid and start time) and removes its
//! entry when it exits; the agent prunes entries whose process is gone, or
//! whose pid now belongs to a process with another start time.
use std::path::Path;

use anyhow::Context as _;
use aya::maps::{HashMap as BpfHash, Map, MapData, PerCpuArray};
use discovery_common::{Exempt, names};

type ExemptMap = BpfHash<MapData, u32, Exempt>;

fn open(pin_dir: &Path) -> anyhow::Result<ExemptMap> {
    let path = pin_dir.join(names::EXEMPT);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Map::HashMap(data)
        .try_into()
        .with_context(|| format!("{} is not a hash of u32 to Exempt", path.display()))
}

/// Field 22 of /proc/PID/stat: start time in clock ticks since boot.
pub fn start_time(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command (field 2) may hold spaces and parentheses: fields after
    // the last ')' start at field 3.
    let rest = s.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// This process's entry; removed on drop.
pub struct Registration {
    map: ExemptMap,
    tgid: u32,
}

impl Registration {
    pub fn register(pin_dir: &Path) -> anyhow::Result<Self> {
        let mut map = open(pin_dir)?;
        let tgid = std::process::id();
        let start_time = start_time(tgid).context("reading this process's start time")?;
        map.insert(tgid, Exempt { start_time }, 0)
            .with_context(|| format!("adding pid {tgid} to {}", names::EXEMPT))?;
        Ok(Self { map, tgid })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = self.map.remove(&self.tgid);
    }
}

/// Removes entries of processes that are gone; returns how many.
pub fn prune(pin_dir: &Path) -> anyhow::Result<usize> {
    let mut map = open(pin_dir)?;
    let stale: Vec<u32> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(pid, e)| start_time(*pid) != Some(e.start_time))
        .map(|(pid, _)| pid)
        .collect();
    for pid in &stale {
        let _ = map.remove(pid);
    }
    Ok(stale.len())
}

/// Every registered process, and the calls to a frontend left alone
/// because they came from one (summed over CPUs).
pub fn list(pin_dir: &Path) -> anyhow::Result<(Vec<u32>, u64)> {
    let pids = open(pin_dir)?
        .iter()
        .filter_map(Result::ok)
        .map(|(pid, _)| pid)
        .collect();
    let path = pin_dir.join(names::EXEMPT_CALLS);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let calls: PerCpuArray<MapData, u64> = Map::PerCpuArray(data).try_into()?;
    let n = calls.get(&0, 0).map(|v| v.iter().sum()).unwrap_or(0);
    Ok((pids, n))
}

#[cfg(test)]
mod tests {
    #[test]
    fn start_time_of_this_process_is_stable_and_others_differ() {
        let me = std::process::id();
        let a = super::start_time(me).expect("own start time");
        assert_eq!(super::start_time(me), Some(a));
        assert!(super::start_time(1).is_some_and(|t| t <= a));
        assert_eq!(super::start_time(u32::MAX), None);
    }
}
