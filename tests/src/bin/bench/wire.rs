//! The data path across hosts: the four paths of `datapath`, with every
//! client on host A and every backend on host B of two hosts on a switch
//! (tests/src/hosts.rs). What crosses the wire here that loopback hides:
//! routing from a rewritten loopback destination, the source address, and
//! for DNAT the route_localnet and masquerade the classic setup needs once
//! a backend is remote.
use std::{net::SocketAddr, process::Command, time::Duration};

use anyhow::{Context as _, bail};
use discovery_tests::{TestCgroup, hosts::Fleet, wait_until};

use super::{Bins, CpuMeter, KernelMaps, Owned, Plan, tcp_key, wait_tcp};
use crate::{
    datapath::{NftTable, Setting, Sink, UdpCase},
    report::Results,
};

/// Host B's addresses, one per path (direct, discovery, DNAT, HAProxy), so
/// that connect-heavy runs of one path never wait on another's TIME_WAIT.
const B_IPS: [&str; 4] = [
    "198.18.0.111",
    "198.18.0.112",
    "198.18.0.113",
    "198.18.0.114",
];
/// Ports inside the hosts' own namespaces, which hold nothing else there.
const REDIS: u16 = 6379;
const SINK: u16 = 9999;
const FE_TCP: &str = "127.0.0.1:7001";
const FE_UDP: &str = "127.0.0.1:7002";
const DNAT_TCP: u16 = 7003;
const DNAT_UDP: u16 = 7004;
const HAPROXY: u16 = 7005;

fn check(out: std::io::Result<std::process::Output>, what: &str) -> anyhow::Result<()> {
    let out = out.with_context(|| what.to_owned())?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

pub fn run(bins: &Bins, plan: &Plan, results: &mut Results) -> anyhow::Result<()> {
    eprintln!("bench: data path across hosts");
    let fleet = Fleet::new("bench-wire", 2);
    let (a, b) = (fleet.host(0), fleet.host(1));
    for ip in B_IPS {
        check(
            b.command("ip")
                .args(["addr", "add", &format!("{ip}/24"), "dev", "eth0"])
                .output(),
            "adding an address to host B",
        )?;
    }
    // Servers and proxies run here: their CPU is counted.
    let servers = TestCgroup::new("bench-wire-servers");
    let _redis = Owned(
        servers.spawn(
            b.command("redis-server")
                .args(["--port", &REDIS.to_string(), "--bind", &B_IPS.join(" ")])
                .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                .args(["--logfile", "/dev/null"]),
        ),
    );
    a.within(|| {
        B_IPS
            .iter()
            .try_for_each(|ip| wait_tcp(format!("{ip}:{REDIS}").parse()?, "redis-server on host B"))
    })?;
    // Sockets made inside host B stay there; their threads count here.
    let sinks = b.within(|| -> anyhow::Result<Vec<Sink>> {
        B_IPS[..3]
            .iter()
            .map(|ip| Sink::new(format!("{ip}:{SINK}").parse()?))
            .collect()
    })?;

    // A client opening connections back to back across hosts runs out
    // of even (connect) ports within two connect-heavy runs: 8000 in
    // TIME_WAIT from the last run, and no reuse off loopback by default
    // (tcp_tw_reuse=2), so each connect() scans the whole range. Reuse,
    // as such clients are set up and as loopback gets by default.
    check(
        a.command("sysctl")
            .args(["-qw", "net.ipv4.tcp_tw_reuse=1"])
            .output(),
        "tcp_tw_reuse on host A",
    )?;

    // B: discovery, from host A's member.
    fleet.put(
        0,
        "/discovery/services/wire-redis",
        &format!(r#"{{"frontend":"{FE_TCP}"}}"#),
    );
    fleet.put(
        0,
        "/discovery/backends/wire-redis/r",
        &format!("{}:{REDIS}", B_IPS[1]),
    );
    fleet.put(
        0,
        "/discovery/services/wire-udp",
        &format!(r#"{{"frontend":"{FE_UDP}","protocol":"udp"}}"#),
    );
    fleet.put(
        0,
        "/discovery/backends/wire-udp/u",
        &format!("{}:{SINK}", B_IPS[1]),
    );
    let maps = KernelMaps::open(&fleet.agent(0).pin_dir)?;
    let (fe_tcp, fe_udp): (SocketAddr, SocketAddr) = (FE_TCP.parse()?, FE_UDP.parse()?);
    let mut udp_key = tcp_key(fe_udp);
    udp_key.proto = discovery_common::IPPROTO_UDP;
    wait_until(Duration::from_secs(10), || {
        let ok = |k| maps.service(&k).is_some_and(|s| s.count > 0);
        (ok(tcp_key(fe_tcp)) && ok(udp_key)).then_some(())
    })
    .context("host A's agent did not install the bench services")?;

    // C: DNAT in host A's output hook. A loopback source cannot leave
    // through eth0: route_localnet lets the DNATed packet be routed, and
    // masquerade gives it host A's address (the replies come back to it).
    check(
        a.command("sysctl")
            .args(["-qw", "net.ipv4.conf.all.route_localnet=1"])
            .output(),
        "route_localnet on host A",
    )?;
    let _nft = NftTable::new(
        Some(&a.ns.name),
        "bench_wire_dnat",
        &format!(
            " chain out {{\n  type nat hook output priority -100; policy accept;\n  \
             ip daddr 127.0.0.1 tcp dport {DNAT_TCP} dnat to {ip}:{REDIS}\n  \
             ip daddr 127.0.0.1 udp dport {DNAT_UDP} dnat to {ip}:{SINK}\n }}\n \
             chain post {{\n  type nat hook postrouting priority 100; policy accept;\n  \
             oifname \"eth0\" ip saddr 127.0.0.0/8 masquerade\n }}",
            ip = B_IPS[2]
        ),
    )?;

    // D: HAProxy on host A's loopback, TCP mode, one thread per core.
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 5000\n  nbthread 2\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
             timeout client 60s\n  timeout server 60s\nfrontend f\n  bind 127.0.0.1:{HAPROXY}\n  \
             default_backend b\nbackend b\n  server r {}:{REDIS}\n",
            B_IPS[3]
        ),
    )?;
    let _haproxy = Owned(servers.spawn(a.command("haproxy").args(["-db", "-f"]).arg(&cfg)));
    a.within(|| wait_tcp(format!("127.0.0.1:{HAPROXY}").parse()?, "haproxy on host A"))?;

    // The discovery client runs in host A's cgroup (the agent's programs);
    // the others in a sibling without them, all in host A's namespace.
    let plain = TestCgroup::new("bench-wire-plain");
    let client = |path: usize, cmd: &mut Command| {
        if path == 1 {
            a.cg.output(cmd)
        } else {
            plain.output(cmd)
        }
    };
    let lo = "127.0.0.1".to_owned();
    let udp: Vec<UdpCase> = vec![
        ("", 0, format!("{}:{SINK}", B_IPS[0]), &sinks[0]),
        ("", 1, FE_UDP.to_owned(), &sinks[1]),
        ("", 2, format!("127.0.0.1:{DNAT_UDP}"), &sinks[2]),
    ];
    let setting = Setting {
        netns: Some(&a.ns.name),
        tcp: vec![(
            "",
            vec![
                (0, B_IPS[0].to_owned(), REDIS),
                (1, lo.clone(), fe_tcp.port()),
                (2, lo.clone(), DNAT_TCP),
                (3, lo, HAPROXY),
            ],
        )],
        udp,
        client: &client,
        cpu: CpuMeter::new(&[&a.cg.path, &plain.path, &servers.path]),
    };
    for round in 0..plan.rounds {
        setting.round(bins, round, &mut results.wire_tcp, &mut results.wire_udp)?;
    }
    setting.program_cost("across hosts", &a.cg.path, &mut results.programs)?;
    Ok(())
}
