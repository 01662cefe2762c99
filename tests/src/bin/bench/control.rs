//! The control plane: etcd write → maps, at growing sizes; beside it the
//! classic etcd → confd → HAProxy reload pipeline; failover after a backend
//! dies; the cost of active checks at 10k backends.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use discovery_tests::{Agent, Backend, Etcd, Outcome, Proc, TestCgroup, now_ms, wait_until};
use etcd_client::{Client, EventType, GetOptions, Txn, TxnOp, WatchOptions};

use super::{
    Bins, KernelMaps, Plan, bulk_put, cpu_ticks, etcd, filler, free_tcp_port, map_memory, rss_kib,
    summarise, tcp_key,
};
use crate::report::{Convergence, Failover, Pipeline, Results};

const QUIET: [&str; 4] = ["--metrics-addr", "off", "--consumers-interval", "0s"];

fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn frontend(i: usize) -> SocketAddr {
    format!("127.20.{}.{}:80", i / 250, i % 250 + 1)
        .parse()
        .expect("frontend")
}

/// Time from an etcd write to the changed service entry in the kernel map,
/// over `plan.changes` puts and deletes, at each size (10 backends per
/// service). Each size also measures the agent's initial sync from a cold
/// start, its RSS and the maps' memory.
pub async fn convergence(_bins: &Bins, plan: &Plan, results: &mut Results) -> anyhow::Result<()> {
    // DISCOVERY_BENCH_SIZES=100000 runs only the sizes given.
    let sizes: Vec<usize> = match std::env::var("DISCOVERY_BENCH_SIZES") {
        Ok(v) => v.split(',').filter_map(|s| s.trim().parse().ok()).collect(),
        Err(_) => plan.sizes.to_vec(),
    };
    for size in sizes {
        eprintln!("bench: convergence at {size} backends");
        let etcd_srv = Etcd::start();
        let cg = TestCgroup::new("bench-conv");
        let per = 10.min(size);
        let services = size / per;
        let mut kvs = Vec::with_capacity(size + services);
        for i in 0..services {
            kvs.push((
                format!("/discovery/services/svc-{i}"),
                format!(r#"{{"frontend":"{}"}}"#, frontend(i)),
            ));
            for j in 0..per {
                kvs.push((
                    format!("/discovery/backends/svc-{i}/b{j}"),
                    filler(i * per + j),
                ));
            }
        }
        let mut c = etcd(&etcd_srv.url).await?;
        bulk_put(&mut c, &kvs).await?;

        // Cold start: spawn to the last service in the maps.
        let t0 = Instant::now();
        let agent = Agent::spawn(&etcd_srv.url, &cg, &QUIET);
        let maps = wait_until(Duration::from_secs(30), || {
            KernelMaps::open(&agent.pin_dir).ok()
        })
        .context("the agent did not pin its maps")?;
        // Services are applied in key order, so the highest frontend is
        // the last one: one lookup per poll, not a walk of the whole map
        // that would compete with the agent for the CPU.
        let last = tcp_key(frontend(services - 1));
        wait_until(Duration::from_secs(120), || {
            maps.service(&last)
                .is_some_and(|s| s.count > 0)
                .then_some(())
        })
        .with_context(|| format!("initial sync of {services} services did not finish"))?;
        let sync = t0.elapsed();
        anyhow::ensure!(
            maps.count() >= services,
            "the last service is in but not all {services}"
        );
        eprintln!("bench: initial sync of {services} services / {size} backends: {sync:?}");
        for l in agent.log().lines().filter(|l| {
            ["agent started", "listed etcd prefix", "services applied"]
                .iter()
                .any(|m| l.contains(m))
        }) {
            eprintln!("bench:   agent: {l}");
        }

        let mut total = Vec::new();
        let mut after_write = Vec::new();
        for k in 0..plan.changes {
            let i = (k / 2 * 7919) % services;
            let key = tcp_key(frontend(i));
            let before = maps.service(&key).context("service missing")?.set_id;
            let extra = format!("/discovery/backends/svc-{i}/extra");
            let t = Instant::now();
            if k % 2 == 0 {
                c.put(extra.as_str(), filler(size + i), None).await?;
            } else {
                c.delete(extra.as_str(), None).await?;
            }
            let written = t.elapsed();
            loop {
                if maps.service(&key).is_some_and(|s| s.set_id != before) {
                    break;
                }
                if t.elapsed() > Duration::from_secs(10) {
                    bail!("change {k} to svc-{i} not visible after 10 s");
                }
                tokio::time::sleep(Duration::from_micros(50)).await;
            }
            let e = t.elapsed();
            total.push(e.as_secs_f64() * 1e3);
            after_write.push((e - written).as_secs_f64() * 1e3);
        }
        let pid = agent.pid().context("agent pid")?;
        let mem = map_memory(&agent.pin_dir);
        let row = Convergence {
            backends: size,
            services,
            total_ms: summarise(&total),
            after_write_ms: summarise(&after_write),
            initial_sync_s: sync.as_secs_f64(),
            rss_kib: rss_kib(pid),
            map_bytes: mem.values().sum(),
        };
        eprintln!("bench: {row:?}");
        results.convergence.push(row);
    }
    Ok(())
}

/// A confd-style loop: on every watch event under `prefix`, read the whole
/// prefix, render haproxy.cfg, check it, and reload HAProxy (SIGUSR2 to the
/// master-worker).
async fn confd(url: String, prefix: String, cfg: std::path::PathBuf, listen: String, master: u32) {
    let Ok(mut c) = Client::connect([url], None).await else {
        return;
    };
    let Ok(mut stream) = c
        .watch(prefix.as_str(), Some(WatchOptions::new().with_prefix()))
        .await
    else {
        return;
    };
    while let Ok(Some(resp)) = stream.message().await {
        if !resp
            .events()
            .iter()
            .any(|e| matches!(e.event_type(), EventType::Put | EventType::Delete))
        {
            continue;
        }
        if render(&mut c, &prefix, &cfg, &listen).await.is_err() {
            continue;
        }
        let ok = tokio::process::Command::new("haproxy")
            .args(["-c", "-q", "-f"])
            .arg(&cfg)
            .status()
            .await
            .is_ok_and(|s| s.success());
        if ok {
            // SAFETY: a process we started.
            unsafe { libc::kill(master as i32, libc::SIGUSR2) };
        }
    }
}

async fn render(c: &mut Client, prefix: &str, cfg: &Path, listen: &str) -> anyhow::Result<()> {
    let r = c.get(prefix, Some(GetOptions::new().with_prefix())).await?;
    let mut servers = String::new();
    for (n, kv) in r.kvs().iter().enumerate() {
        let v: serde_json::Value = serde_json::from_slice(kv.value())?;
        let addr = v["addr"].as_str().unwrap_or_default();
        let w = v["weight"].as_u64().unwrap_or(1);
        servers.push_str(&format!("  server s{n} {addr} weight {w}\n"));
    }
    let text = format!(
        "global\n  maxconn 5000\n  nbthread 2\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
         timeout client 30s\n  timeout server 30s\nfrontend f\n  bind {listen}\n  \
         default_backend b\nbackend b\n  balance roundrobin\n{servers}"
    );
    let tmp = cfg.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, cfg)?;
    Ok(())
}

/// Waits for a greet-watch line naming `want`; returns its timestamp (ns).
fn seen(w: &mut discovery_tests::Load, want: &str) -> anyhow::Result<u128> {
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end {
        let Some(line) = w.next_line(Duration::from_secs(60)) else {
            break;
        };
        if let Some((ts, name)) = line.split_once(' ')
            && name == want
        {
            return Ok(ts.parse()?);
        }
    }
    bail!("no connection reached {want} within 60 s")
}

/// etcd write → first new connection on the new backend, for discovery and
/// for the classic pipeline, at 1, 1k and 10k servers (all but one at
/// weight 0, so every connection goes to the one live backend).
pub async fn pipeline(bins: &Bins, plan: &Plan, results: &mut Results) -> anyhow::Result<()> {
    for &n in plan.classic_sizes {
        eprintln!("bench: etcd write to first connection, {n} servers");
        let etcd_srv = Etcd::start();
        let cg = TestCgroup::new("bench-pipe");
        let agent = Agent::start(&etcd_srv.url, &cg, &QUIET);
        let g = [
            Backend::tcp("g0", "127.0.0.7:0".parse()?),
            Backend::tcp("g1", "127.0.0.8:0".parse()?),
        ];
        let fe: SocketAddr = format!("127.0.0.1:{}", free_tcp_port("127.0.0.1")).parse()?;
        let hp = format!("127.0.0.9:{}", free_tcp_port("127.0.0.9"));
        let mut c = etcd(&etcd_srv.url).await?;
        let mut kvs = vec![(
            "/discovery/services/swap".to_owned(),
            format!(r#"{{"frontend":"{fe}"}}"#),
        )];
        for i in 0..n.saturating_sub(1) {
            let v = format!(r#"{{"addr":"{}","weight":0}}"#, filler(i));
            kvs.push((format!("/discovery/backends/swap/f{i}"), v.clone()));
            kvs.push((format!("/classic/backends/f{i}"), v));
        }
        let live = |i: usize| format!(r#"{{"addr":"{}","weight":1}}"#, g[i].addr());
        kvs.push(("/discovery/backends/swap/live".into(), live(0)));
        kvs.push(("/classic/backends/live".into(), live(0)));
        bulk_put(&mut c, &kvs).await?;

        let dir = tempfile::tempdir()?;
        let cfg = dir.path().join("haproxy.cfg");
        render(&mut c, "/classic/backends/", &cfg, &hp).await?;
        let haproxy = super::Owned(
            Command::new("haproxy")
                .args(["-W", "-db", "-f"])
                .arg(&cfg)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("starting haproxy")?,
        );
        super::wait_tcp(hp.parse()?, "haproxy")?;
        let confd_task = tokio::spawn(confd(
            etcd_srv.url.clone(),
            "/classic/backends/".into(),
            cfg.clone(),
            hp.clone(),
            haproxy.0.id(),
        ));
        let load = bins.load.display().to_string();
        let mut watch_disc = cg.start(&load, &["greet-watch", &fe.to_string()]);
        let mut watch_classic = cg.start(&load, &["greet-watch", &hp]);
        seen(&mut watch_disc, "g0")?;
        seen(&mut watch_classic, "g0")?;
        let (mut disc, mut classic) = (Vec::new(), Vec::new());
        for s in 0..plan.pipeline_samples {
            let new = (s + 1) % 2;
            let name = format!("g{new}");
            for (prefix, watch, out) in [
                ("/discovery/backends/swap/", &mut watch_disc, &mut disc),
                ("/classic/backends/", &mut watch_classic, &mut classic),
            ] {
                let key = format!("{prefix}live");
                let t = unix_ns();
                c.txn(Txn::new().and_then([TxnOp::put(key.as_str(), live(new), None)]))
                    .await?;
                let at = seen(watch, &name)?;
                out.push(at.saturating_sub(t) as f64 / 1e6);
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            eprintln!(
                "bench: {n} servers sample {}: discovery {:.1} ms, classic {:.1} ms",
                s + 1,
                disc[s],
                classic[s]
            );
        }
        confd_task.abort();
        results.pipeline.push(Pipeline {
            servers: n,
            discovery_ms: summarise(&disc),
            classic_ms: summarise(&classic),
        });
        drop((watch_disc, watch_classic, haproxy, agent));
    }
    Ok(())
}

/// How long the load runs, and when in it the backend dies.
const FAILOVER_LOAD_MS: u64 = 7_000;
const FAILOVER_KILL_AFTER: Duration = Duration::from_millis(1_500);

/// A failed connect as the client sees it: an error, no greeting (through
/// a proxy the connect to the proxy succeeds even when no backend is
/// reached: `discovery-probe` then reads an empty greeting), or an answer
/// from the dead backend `x`.
fn failed(o: &Outcome) -> bool {
    o.errno.is_some()
        || o.backend
            .as_deref()
            .is_none_or(|b| b.is_empty() || b == "x")
}

/// Waits until connections to `addr` from `cg` reach both backends, runs
/// the load, kills `x` in the middle of it and returns the kill's time
/// (ms since the epoch) with every attempt.
fn kill_under_load(
    cg: &TestCgroup,
    probe: &str,
    addr: &str,
    x: Backend,
) -> anyhow::Result<(u64, Vec<Outcome>)> {
    wait_until(Duration::from_secs(20), || {
        let seen: std::collections::HashSet<String> = cg
            .probe(probe, "tcp", addr, 10)
            .into_iter()
            .filter_map(|o| o.backend)
            .filter(|b| !b.is_empty())
            .collect();
        (seen.len() == 2).then_some(())
    })
    .context("both backends never answered")?;
    let load = cg.start_load(probe, addr, FAILOVER_LOAD_MS);
    std::thread::sleep(FAILOVER_KILL_AFTER);
    let killed = now_ms();
    drop(x);
    Ok((killed, load.finish()))
}

/// The row of one run: time to the last failed connect after the kill,
/// their count, and the connects after the kill.
fn failover_row(label: &str, killed: u64, outcomes: &[Outcome], note: Option<String>) -> Failover {
    let after: Vec<&Outcome> = outcomes.iter().filter(|o| o.at_ms >= killed).collect();
    let bad: Vec<&&Outcome> = after.iter().filter(|o| failed(o)).collect();
    let last = bad.iter().map(|o| o.at_ms).max().unwrap_or(killed);
    let slowest = after.iter().map(|o| o.micros).max().unwrap_or(0);
    eprintln!(
        "bench: failover, {label}: slowest connect after the kill {:.1} ms",
        slowest as f64 / 1e3
    );
    Failover {
        label: label.to_owned(),
        ms: (last - killed) as f64,
        failed_connects: bad.len(),
        connects: after.len(),
        note,
    }
}

/// A backend dies under load: how many new connections fail, and for how
/// long, with discovery (the announcer alone, ejection by the agent's
/// poll, ejection in the kernel) and with HAProxy set up for fast
/// failover.
pub async fn failover(bins: &Bins, results: &mut Results) -> anyhow::Result<()> {
    for (label, flags) in [
        (
            "announcer's check alone (passive off)",
            &["--passive-failures", "0"][..],
        ),
        (
            "agent-side ejection (3 failures, 200 ms poll)",
            &["--passive-ejector", "agent"][..],
        ),
        ("ejection in the kernel (3 failures)", &[][..]),
    ] {
        eprintln!("bench: failover, {label}");
        let etcd_srv = Etcd::start();
        let cg = TestCgroup::new("bench-fo");
        let mut args: Vec<&str> = QUIET.to_vec();
        args.extend(flags);
        let agent = Agent::start(&etcd_srv.url, &cg, &args);
        let x = Backend::tcp("x", "127.0.0.11:0".parse()?);
        let y = Backend::tcp("y", "127.0.0.12:0".parse()?);
        let fe = format!("127.0.0.1:{}", free_tcp_port("127.0.0.1"));
        etcd_srv.put(
            "/discovery/services/fo",
            &format!(r#"{{"frontend":"{fe}"}}"#),
        );
        let announce = |addr: SocketAddr| {
            Proc::spawn(vec![
                "announce".into(),
                "--etcd".into(),
                etcd_srv.url.clone(),
                "--service".into(),
                "fo".into(),
                "--addr".into(),
                addr.to_string(),
                "--check".into(),
                "tcp".into(),
            ])
        };
        let _ax = announce(x.addr());
        let _ay = announce(y.addr());
        let probe = bins.probe.display().to_string();
        let (killed, outcomes) = kill_under_load(&cg, &probe, &fe, x)?;
        let row = failover_row(label, killed, &outcomes, None);
        eprintln!("bench: {row:?}");
        results.failover.push(row);
        drop((y, agent));
    }
    failover_haproxy(bins, results)
}

/// HAProxy's per-server counters from `show stat` on its stats socket.
fn haproxy_stat(sock: &Path, server: &str) -> anyhow::Result<BTreeMap<String, String>> {
    use std::io::{Read as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(sock)
        .with_context(|| format!("connecting to {}", sock.display()))?;
    s.write_all(b"show stat\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .and_then(|h| h.strip_prefix("# "))
        .context("show stat: no header")?
        .split(',')
        .collect();
    lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .find(|f| f.get(1) == Some(&server))
        .map(|f| {
            header
                .iter()
                .zip(f)
                .map(|(k, v)| ((*k).to_owned(), v.to_owned()))
                .collect()
        })
        .with_context(|| format!("show stat: no server {server}"))
}

/// The peer: HAProxy in TCP mode in front of the same two backends, set up
/// as an operator would for fast failover (passive observation of layer 4
/// errors marks a server down after 3, retries with redispatch, an active
/// check every second). Its client runs in a sibling cgroup without
/// programs.
fn failover_haproxy(bins: &Bins, results: &mut Results) -> anyhow::Result<()> {
    let label = "HAProxy: observe layer4, error-limit 3, mark-down; retries 3, redispatch";
    eprintln!("bench: failover, {label}");
    let x = Backend::tcp("x", "127.0.0.11:0".parse()?);
    let y = Backend::tcp("y", "127.0.0.12:0".parse()?);
    let hp = format!("127.0.0.13:{}", free_tcp_port("127.0.0.13"));
    let dir = tempfile::tempdir()?;
    let (cfg, sock) = (
        dir.path().join("haproxy.cfg"),
        dir.path().join("stats.sock"),
    );
    let server = |name: &str, addr: SocketAddr| {
        format!(
            "  server {name} {addr} check observe layer4 error-limit 3 on-error mark-down \
             inter 1s\n"
        )
    };
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 5000\n  nbthread 2\n  stats socket {}\ndefaults\n  mode tcp\n  \
             timeout connect 5s\n  timeout client 30s\n  timeout server 30s\nfrontend f\n  \
             bind {hp}\n  default_backend b\nbackend b\n  balance roundrobin\n  retries 3\n  \
             option redispatch\n{}{}",
            sock.display(),
            server("x", x.addr()),
            server("y", y.addr()),
        ),
    )?;
    let check = Command::new("haproxy")
        .args(["-c", "-q", "-f"])
        .arg(&cfg)
        .output()
        .context("haproxy -c")?;
    if !check.status.success() {
        bail!(
            "haproxy rejected its config: {}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
    let log = dir.path().join("haproxy.log");
    let haproxy = super::Owned(
        Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting haproxy")?,
    );
    super::wait_tcp(hp.parse()?, "haproxy")?;
    let plain = TestCgroup::new("bench-fo-plain");
    let probe = bins.probe.display().to_string();
    let (killed, outcomes) = kill_under_load(&plain, &probe, &hp, x)?;
    let stat = haproxy_stat(&sock, "x")?;
    let field = |k: &str| stat.get(k).map_or("?", String::as_str).to_owned();
    let after: Vec<&Outcome> = outcomes.iter().filter(|o| o.at_ms >= killed).collect();
    let slowest = after.iter().map(|o| o.micros).max().unwrap_or(0) as f64 / 1e3;
    let slow = after.iter().filter(|o| o.micros >= 100_000).count();
    let note = format!(
        "HAProxy redispatched {} connects from the dead server (`wredis`), retried {} on it \
         (`wretr`) and gave up on {} (`econ`), status {}; the slowest connect after the kill \
         took {slowest:.0} ms ({slow} over 100 ms)",
        field("wredis"),
        field("wretr"),
        field("econ"),
        field("status"),
    );
    for l in std::fs::read_to_string(&log).unwrap_or_default().lines() {
        eprintln!("bench:   haproxy: {l}");
    }
    let row = failover_row(label, killed, &outcomes, Some(note));
    eprintln!("bench: {row:?}");
    results.failover.push(row);
    drop((plain, haproxy, y));
    Ok(())
}

/// Agent CPU and memory with a tcp check every second on 10k backends.
pub async fn active_checks(_bins: &Bins, plan: &Plan, results: &mut Results) -> anyhow::Result<()> {
    let n = if plan.changes < 1000 { 1_000 } else { 10_000 };
    eprintln!("bench: active checks on {n} backends");
    let etcd_srv = Etcd::start();
    let cg = TestCgroup::new("bench-chk");
    let agent = Agent::start(&etcd_srv.url, &cg, &["--consumers-interval", "0s"]);
    let mut kvs = vec![(
        "/discovery/services/chk".to_owned(),
        r#"{"frontend":"127.0.0.1:7","check":{"type":"tcp","interval":"1s","timeout":"300ms"}}"#
            .to_owned(),
    )];
    // Nothing listens on the fillers: every probe is refused at once.
    kvs.extend((0..n).map(|i| (format!("/discovery/backends/chk/b{i}"), filler(i))));
    let mut c = etcd(&etcd_srv.url).await?;
    bulk_put(&mut c, &kvs).await?;
    let pid = agent.pid().context("agent pid")?;
    wait_until(Duration::from_secs(60), || {
        agent
            .metric("discovery_backends_ejected")
            .filter(|v| *v >= n as f64)
    })
    .context("active checks never marked every backend down")?;
    let hz = super::clock_hz();
    let (t, before) = (Instant::now(), cpu_ticks(pid));
    tokio::time::sleep(Duration::from_secs(10)).await;
    let cpu = (cpu_ticks(pid) - before) as f64 / hz / t.elapsed().as_secs_f64() * 100.0;
    let mut m = BTreeMap::new();
    m.insert("backends checked".to_owned(), n.to_string());
    m.insert("probes per second".to_owned(), n.to_string());
    m.insert("agent CPU (% of one core)".to_owned(), format!("{cpu:.1}"));
    m.insert(
        "agent RSS (MiB)".to_owned(),
        format!("{:.1}", rss_kib(pid) as f64 / 1024.0),
    );
    eprintln!("bench: active checks {m:?}");
    results.checks = m;
    Ok(())
}
