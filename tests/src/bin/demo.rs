//! `discovery-demo`, run by `cargo xtask demo`: the whole flow on one machine, on loopback only.
//!
//! A private etcd, the agent attached to a dedicated child cgroup, two TCP
//! backends and one UDP backend on 127.0.0.x, a client in that cgroup being
//! balanced, then a backend removed and traffic moving. The harness guards
//! from the test suite clean up on the way out, also after Ctrl-C.
use std::{
    collections::BTreeMap,
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use discovery_tests::{Agent, Backend, Etcd, Outcome, TestCgroup, tally, wait_until};

fn step(n: u32, msg: &str) {
    println!("\n[{n}/6] {msg}");
}

fn show(outcomes: &[Outcome]) -> String {
    let t: BTreeMap<_, _> = tally(outcomes).into_iter().collect();
    let peers: std::collections::BTreeSet<_> =
        outcomes.iter().filter_map(|o| o.peer.clone()).collect();
    format!("{t:?}, peer seen by the client: {peers:?}")
}

/// The agent and the probe are found beside this binary (`cargo xtask demo`
/// builds them all).
fn main() -> anyhow::Result<()> {
    // A demo on the host's loopback, where the user can try it too.
    discovery_tests::net::share_host_network();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo attaches BPF programs to a child cgroup: run it as root");
    }
    let exe = std::env::current_exe().context("locating discovery-demo")?;
    let bin_dir = exe
        .parent()
        .context("discovery-demo has no parent directory")?;
    match std::env::args().nth(1).as_deref() {
        None => demo(bin_dir),
        Some("--hosts") => hosts(bin_dir),
        Some(other) => bail!("unknown argument {other:?}: expected nothing or --hosts"),
    }
}

/// `--hosts`: three hosts in network namespaces on a switch (198.18.0.0/24,
/// nothing routed outside), an etcd member and an agent each; backends on
/// hosts b and c announced with a 3 s lease, a client on host a; then host
/// c is cut off and traffic moves to b, and comes back when c returns.
fn hosts(bin_dir: &Path) -> anyhow::Result<()> {
    use discovery_tests::hosts::Fleet;
    // SAFETY: single-threaded at this point; read by the harness later.
    unsafe { std::env::set_var("DISCOVERY_AGENT_BIN", bin_dir.join("discovery-agent")) };
    println!("== discovery demo: three hosts, one cut off ==");
    println!("\n[1/4] three hosts (namespaces on a switch), an etcd member and an agent on each");
    let fleet = Fleet::new("demo", 3);
    for h in &fleet.hosts {
        println!("      {} at {}", h.name, h.ip);
    }
    fleet.put(
        0,
        "/discovery/services/web",
        r#"{"frontend":"127.0.0.1:8080","connect_timeout":"300ms"}"#,
    );
    println!("\n[2/4] backends on host-b and host-c, announced with --addr 0.0.0.0:9000 --ttl 3s");
    let _b = fleet.backend(1, "backend-on-b", 9000, "tcp");
    let _c = fleet.backend(2, "backend-on-c", 9000, "tcp");
    let _ab = fleet.announcer(1, "web", "b", "0.0.0.0:9000", &["--ttl", "3s"]);
    let _ac = fleet.announcer(2, "web", "c", "0.0.0.0:9000", &["--ttl", "3s"]);
    let seen = |want: usize| {
        wait_until(Duration::from_secs(15), || {
            let t = tally(&fleet.probe(0, "tcp", "127.0.0.1:8080", 20));
            (t.len() == want).then_some(t)
        })
    };
    let t = seen(2).context("host-a never reached both backends")?;
    println!(
        "      host-a's client to 127.0.0.1:8080: {:?}",
        t.into_iter().collect::<BTreeMap<_, _>>()
    );
    println!("\n[3/4] host-c cut off from the switch");
    fleet.cut(2);
    let started = Instant::now();
    let t = wait_until(Duration::from_secs(20), || {
        let t = tally(&fleet.probe(0, "tcp", "127.0.0.1:8080", 20));
        (t.len() == 1 && t.contains_key("backend-on-b")).then_some(t)
    })
    .context("traffic never left host-c")?;
    println!(
        "      after {:.1} s: {:?}\n      (connects to host-c time out at 300 ms and the kernel ejects it; \
         its lease expires on the majority after the 3 s TTL)",
        started.elapsed().as_secs_f64(),
        t.into_iter().collect::<BTreeMap<_, _>>()
    );
    println!("\n[4/4] host-c back on the switch");
    fleet.heal(2);
    let t = seen(2).context("host-c never came back")?;
    println!(
        "      host-a's client again: {:?}",
        t.into_iter().collect::<BTreeMap<_, _>>()
    );
    println!("\ndone: cleaning up the hosts");
    Ok(())
}

fn demo(bin_dir: &Path) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    ctrlc::set_handler(move || {
        eprintln!("\ninterrupted: cleaning up");
        s.store(true, Ordering::SeqCst);
    })
    .context("installing the Ctrl-C handler")?;
    let result = steps(bin_dir, &stop);
    // The guards inside `steps` have cleaned up by now.
    if stop.load(Ordering::SeqCst) {
        eprintln!("cleaned up");
        std::process::exit(130);
    }
    result
}

fn steps(bin_dir: &Path, stop: &AtomicBool) -> anyhow::Result<()> {
    let check = || -> anyhow::Result<()> {
        if stop.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        Ok(())
    };
    // SAFETY: single-threaded at this point; read by the harness later.
    unsafe { std::env::set_var("DISCOVERY_AGENT_BIN", bin_dir.join("discovery-agent")) };
    let probe = bin_dir.join("discovery-probe");
    let probe = probe.to_str().context("non-UTF-8 path")?;

    println!("== discovery demo: transparent redirection on loopback ==");
    step(1, "starting a private etcd");
    let etcd = Etcd::start();
    println!("      etcd at {}", etcd.url);
    check()?;

    step(2, "starting the agent on a dedicated child cgroup");
    let cg = TestCgroup::new("demo");
    let agent = Agent::start(&etcd.url, &cg, &["--detach-on-exit"]);
    println!("      cgroup {}", cg.path.display());
    println!("      pins   {}", agent.pin_dir.display());
    check()?;

    step(3, "starting backends and registering them in etcd");
    let alpha = Backend::tcp("alpha", "127.0.0.2:0".parse()?);
    let beta = Backend::tcp("beta", "127.0.0.3:0".parse()?);
    let gamma = Backend::udp("gamma", "127.0.0.4:0".parse()?);
    let puts = [
        (
            "/discovery/services/web".to_owned(),
            r#"{"frontend":"127.0.0.1:8080","protocol":"tcp"}"#.to_owned(),
        ),
        (
            "/discovery/services/dns".to_owned(),
            r#"{"frontend":"127.0.0.1:5353","protocol":"udp"}"#.to_owned(),
        ),
        (
            "/discovery/backends/web/alpha".to_owned(),
            alpha.addr().to_string(),
        ),
        (
            "/discovery/backends/web/beta".to_owned(),
            beta.addr().to_string(),
        ),
        (
            "/discovery/backends/dns/gamma".to_owned(),
            gamma.addr().to_string(),
        ),
    ];
    for (k, v) in &puts {
        etcd.put(k, v);
        println!("      etcdctl put {k} '{v}'");
    }
    check()?;

    step(
        4,
        "a client in the cgroup connects to 127.0.0.1:8080, 20 times",
    );
    let both = wait_until(Duration::from_secs(5), || {
        let o = cg.probe(probe, "tcp", "127.0.0.1:8080", 20);
        let t = tally(&o);
        (t.contains_key("alpha") && t.contains_key("beta")).then_some(o)
    })
    .context("the client was not balanced across alpha and beta")?;
    println!("      tcp: {}", show(&both));
    let udp = cg.probe(probe, "udp", "127.0.0.1:5353", 3);
    println!(
        "      udp sendto 127.0.0.1:5353: {} (reply source is the frontend)",
        show(&udp)
    );
    let outside = Command::new(probe)
        .args(["tcp", "127.0.0.1:8080", "1"])
        .output()
        .context("running the probe outside the cgroup")?;
    let outside: Vec<Outcome> = String::from_utf8_lossy(&outside.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    println!(
        "      the same client outside the cgroup is not redirected: {}",
        show(&outside)
    );
    check()?;

    step(5, "removing beta from etcd");
    let t0 = Instant::now();
    etcd.del("/discovery/backends/web/beta");
    let moved = wait_until(Duration::from_secs(5), || {
        let o = cg.probe(probe, "tcp", "127.0.0.1:8080", 20);
        (tally(&o).keys().collect::<Vec<_>>() == ["alpha"]).then_some(o)
    })
    .context("traffic did not move off beta")?;
    println!(
        "      tcp: {} (all on alpha {} ms after the delete)",
        show(&moved),
        t0.elapsed().as_millis()
    );
    check()?;

    step(6, "what the kernel sees");
    let _ = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&cg.path)
        .status();
    let counters = agent.run_cmd("counters");
    print!("{}", String::from_utf8_lossy(&counters.stdout));
    let services = agent.pin_dir.join("disc_services");
    println!("      bpftool map dump pinned {}", services.display());
    let _ = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(&services)
        .status();
    println!("\ncleaning up: agent detached, cgroup removed, etcd stopped");
    drop((alpha, beta, gamma));
    drop(agent);
    drop(cg);
    drop(etcd);
    Ok(())
}
