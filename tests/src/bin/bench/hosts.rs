//! Convergence across hosts: three hosts in network namespaces on a switch
//! (tests/src/hosts.rs), an etcd member and an agent each. A backend is put
//! or deleted through host A's member; the time runs from the start of the
//! write to the service's entry changing in every other host's pinned map
//! (polled every 50 µs). Then the same with 47 more agents on host A, each
//! attached to a cgroup of its own with its own pins: 50 agents watching
//! one cluster.
use std::time::{Duration, Instant};

use anyhow::bail;
use discovery_tests::{Agent, TestCgroup, hosts::Fleet};

use super::{KernelMaps, Plan, summarise, tcp_key};
use crate::report::{HostsRow, Results};

const FE: &str = "127.0.0.1:8080";

pub fn run(plan: &Plan, results: &mut Results) -> anyhow::Result<()> {
    eprintln!("bench: convergence across hosts");
    let fleet = Fleet::new("bench-hosts", 3);
    fleet.put(
        0,
        "/discovery/services/web",
        &format!(r#"{{"frontend":"{FE}"}}"#),
    );
    fleet.put(0, "/discovery/backends/web/base", "198.18.0.11:9000");
    let key = tcp_key(FE.parse()?);
    let extra_agents = if plan.changes < 1000 { 7 } else { 47 };
    for (label, extra) in [("3 hosts, one agent each", 0), ("", extra_agents)] {
        // The extra agents: on host A, each on its own cgroup and pins.
        let mut watchers: Vec<(TestCgroup, Agent)> = Vec::new();
        for i in 0..extra {
            let cg = TestCgroup::new(&format!("bench-w{i}"));
            let a = Agent::spawn_netns(
                "http://127.0.0.1:2379",
                &cg,
                &["--metrics-addr", "off", "--consumers-interval", "0s"],
                false,
                Some(&fleet.host(0).ns.name),
            );
            watchers.push((cg, a));
        }
        for (_, a) in &watchers {
            a.wait_ready(Duration::from_secs(60));
        }
        let pins: Vec<_> = [fleet.agent(1), fleet.agent(2)]
            .into_iter()
            .chain(watchers.iter().map(|(_, a)| a))
            .map(|a| a.pin_dir.clone())
            .collect();
        let changes = if plan.changes < 1000 { 40 } else { 200 };
        // The writer runs inside host A (an etcd client of its local
        // member); the maps are pinned in the one bpffs and read from here.
        let (ms, timed) = fleet
            .host(0)
            .within(|| -> anyhow::Result<(Vec<f64>, usize)> {
                let maps: Vec<KernelMaps> = pins
                    .iter()
                    .map(|p| KernelMaps::open(p))
                    .collect::<anyhow::Result<_>>()?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let mut c = rt.block_on(super::etcd("http://127.0.0.1:2379"))?;
                let mut ms = Vec::new();
                for k in 0..changes {
                    let before: Vec<u32> = maps
                        .iter()
                        .map(|m| m.service(&key).map_or(0, |s| s.set_id))
                        .collect();
                    let t = Instant::now();
                    let key_path = "/discovery/backends/web/extra";
                    if k % 2 == 0 {
                        rt.block_on(c.put(key_path, "198.18.0.12:9000", None))?;
                    } else {
                        rt.block_on(c.delete(key_path, None))?;
                    }
                    let mut pending: Vec<usize> = (0..maps.len()).collect();
                    while !pending.is_empty() {
                        pending.retain(|&i| {
                            let changed =
                                maps[i].service(&key).is_some_and(|s| s.set_id != before[i]);
                            if changed {
                                ms.push(t.elapsed().as_secs_f64() * 1e3);
                            }
                            !changed
                        });
                        if t.elapsed() > Duration::from_secs(10) {
                            bail!("change {k} not on {} agents after 10 s", pending.len());
                        }
                        std::thread::sleep(Duration::from_micros(50));
                    }
                }
                Ok((ms, maps.len()))
            })?;
        let agents = timed + 1;
        let row = HostsRow {
            setup: if label.is_empty() {
                format!("3 hosts + {extra} more agents on host A: {agents} agents, attached")
            } else {
                label.to_owned()
            },
            watchers: timed,
            changes,
            ms: summarise(&ms),
        };
        eprintln!("bench: {row:?}");
        results.hosts.push(row);
        drop(watchers);
    }
    Ok(())
}
