//! Many hosts on one machine: each host is a network namespace with a veth
//! into a bridge that lives in a namespace of its own (the switch), an
//! address 198.18.0.(10+i)/24, its own etcd member (one cluster across the
//! hosts), its own agent attached to its own child cgroup, and helpers to
//! start backends, announcers and clients inside it. `cut`/`heal` take a
//! host's port on the switch down and up: a partition.
//!
//! Nothing is routed to or from the machine's own namespace: the only
//! links are the hosts' veths into the switch's bridge, and each host's
//! default route goes to that bridge (so an announcer's `--addr 0.0.0.0:P`
//! finds the host's address, as on a real node), where no router is.
//!
//! Each member also listens on 127.0.0.1:2379 of its host, so the host's
//! agent and announcers use `--etcd http://127.0.0.1:2379`, as in the
//! classic setup. Everything is torn down on drop, in reverse order:
//! agents (detached), cgroups, etcd members, host namespaces, the switch.
use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Command, Output},
    thread,
    time::Duration,
};

use crate::{
    Agent, Etcd, Load, Outcome, Proc, SMALL_MAPS, TestCgroup, agent_bin, announce_args, etcd_dir,
    net::{self, Netns},
    wait_until,
};

/// The local etcd member every host's daemons talk to.
pub const LOCAL_ETCD: &str = "http://127.0.0.1:2379";

/// Host `i`'s address: 198.18.0.(10+i).
pub fn host_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 10 + u8::try_from(i).expect("at most 245 hosts"))
}

fn must(out: std::io::Result<Output>, what: &str) {
    let out = out.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One host: its namespace, etcd member, cgroup and agent.
pub struct Host {
    pub index: usize,
    /// `host-a`, `host-b`, ...: the agent's `--node` and the member's name.
    pub name: String,
    pub ip: Ipv4Addr,
    // Drop order: agent (detach), cgroup, etcd, namespace.
    /// None while stopped (see [`Fleet::stop_agent`]).
    pub agent: Option<Agent>,
    pub cg: TestCgroup,
    pub etcd: Etcd,
    pub ns: Netns,
    agent_args: Vec<String>,
}

impl Host {
    /// `program` as a command inside this host's namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.ns.command(program)
    }

    /// The running agent.
    pub fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("the host's agent runs")
    }

    /// Runs `f` on a thread inside this host's network namespace (sockets
    /// it creates stay there), and returns what it returns.
    pub fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.ns.name);
        let ns = fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: setns on a namespace fd we hold open; it moves
                // only this (scoped, short-lived) thread.
                let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("thread inside the host's namespace")
        })
    }

    /// Whether `n` sockets listen on `port` in this host (`ss` inside it).
    fn listening(&self, port: u16, n: usize) -> bool {
        self.command("ss")
            .args(["-Hlntu", &format!("sport = :{port}")])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().count() >= n)
    }
}

/// n hosts on one switch, with one etcd cluster and an agent per host.
pub struct Fleet {
    /// Dropped in reverse order (see `Drop`).
    pub hosts: Vec<Host>,
    switch: Netns,
    probe: PathBuf,
    echo: PathBuf,
}

/// The tests crate's binaries sit beside the agent's in the target dir.
fn sibling_bin(name: &str) -> PathBuf {
    let p = agent_bin().with_file_name(name);
    assert!(
        p.exists(),
        "{} not found: build the tests crate's binaries (cargo build -p discovery-tests --bins)",
        p.display()
    );
    p
}

impl Fleet {
    /// Builds `n` hosts (see the module doc), starts the etcd cluster and
    /// every agent, and waits until each agent is ready.
    pub fn new(tag: &str, n: usize) -> Self {
        Self::with_agent_args(tag, n, &[])
    }

    /// Like `new`, with `extra` added to every agent's flags.
    pub fn with_agent_args(tag: &str, n: usize, extra: &[&str]) -> Self {
        assert!((1..=26).contains(&n), "1 to 26 hosts");
        net::isolate();
        let switch = Netns::new(&format!("{tag}-sw"));
        let sw = |args: &[&str]| must(switch.command("ip").args(args).output(), "ip in switch");
        sw(&["link", "add", "br0", "type", "bridge"]);
        sw(&["link", "set", "br0", "up"]);
        let mut fleet = Self {
            hosts: Vec::new(),
            switch,
            probe: sibling_bin("discovery-probe"),
            echo: sibling_bin("discovery-echo"),
        };
        let names: Vec<String> = (0..n)
            .map(|i| format!("host-{}", (b'a' + i as u8) as char))
            .collect();
        let initial_cluster = names
            .iter()
            .enumerate()
            .map(|(i, name)| format!("{name}=http://{}:2380", host_ip(i)))
            .collect::<Vec<_>>()
            .join(",");
        for (i, name) in names.iter().enumerate() {
            fleet.add_host(tag, i, name, &initial_cluster, &[]);
        }
        // Every member must run before any is healthy (quorum).
        fleet.hosts.iter_mut().for_each(|h| h.etcd.launch());
        for h in &mut fleet.hosts {
            assert!(
                h.etcd.wait_healthy(),
                "etcd member {} exited:\n{}",
                h.name,
                h.etcd.log()
            );
        }
        for h in &mut fleet.hosts {
            let mut args: Vec<String> = SMALL_MAPS.iter().map(|s| s.to_string()).collect();
            args.extend(["--node".into(), h.name.clone()]);
            args.extend(extra.iter().map(|s| s.to_string()));
            h.agent_args = args;
        }
        for i in 0..n {
            fleet.start_agent(i);
        }
        for h in &fleet.hosts {
            h.agent().wait_ready(Duration::from_secs(30));
        }
        fleet
    }

    /// Makes host `i` (namespace, switch port, address, its etcd member's
    /// settings and its cgroup); launches nothing.
    fn add_host(
        &mut self,
        tag: &str,
        i: usize,
        name: &str,
        initial_cluster: &str,
        etcd_extra: &[&str],
    ) {
        let ns = Netns::new(&format!("{tag}-{name}"));
        let ip = host_ip(i);
        let port = format!("p{i}");
        let sw = |args: &[&str]| {
            must(
                self.switch.command("ip").args(args).output(),
                "ip in switch",
            )
        };
        sw(&[
            "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ]);
        sw(&["link", "set", &port, "master", "br0"]);
        sw(&["link", "set", &port, "up"]);
        let h = |args: &[&str]| must(ns.command("ip").args(args).output(), "ip in host");
        h(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        h(&["link", "set", "eth0", "up"]);
        h(&["route", "add", "default", "dev", "eth0"]);
        let url = format!("http://{ip}:2379");
        let mut server_args: Vec<String> = [
            // Relaxed raft timing for a loaded 2-core machine; pre-vote so
            // that a healed member does not depose the leader.
            "--heartbeat-interval",
            "150",
            "--election-timeout",
            "1500",
            "--pre-vote",
        ]
        .map(String::from)
        .to_vec();
        server_args.extend(etcd_extra.iter().map(|s| s.to_string()));
        let etcd = Etcd {
            child: None,
            listen_client: Some(format!("{url},{LOCAL_ETCD}")),
            url,
            peer_url: format!("http://{ip}:2380"),
            name: name.to_owned(),
            initial_cluster: initial_cluster.to_owned(),
            server_args,
            ctl_args: Vec::new(),
            netns: Some(ns.name.clone()),
            dir: etcd_dir(),
        };
        let cg = TestCgroup::new(&format!("{tag}-{name}"));
        self.hosts.push(Host {
            index: i,
            name: name.to_owned(),
            ip,
            agent: None,
            cg,
            etcd,
            ns,
            agent_args: Vec::new(),
        });
    }

    /// A new host joins the running fleet: its etcd member is added to the
    /// cluster (`member add`, then started with the cluster as it is), its
    /// agent started with the others' flags. Returns its index once the
    /// agent is ready (it applied a full list of etcd).
    pub fn join(&mut self, tag: &str) -> usize {
        let i = self.hosts.len();
        let name = format!("host-{}", (b'a' + i as u8) as char);
        let peer = format!("http://{}:2380", host_ip(i));
        // etcd refuses a new member until every member has been up for a
        // few seconds ("unhealthy cluster"): retry within a deadline.
        let mut last = None;
        let added = wait_until(Duration::from_secs(30), || {
            let out = self.ctl(0, &["member", "add", &name, &format!("--peer-urls={peer}")]);
            let ok = out.status.success();
            last = Some(out);
            ok.then_some(())
        });
        assert!(added.is_some(), "member add: {last:?}");
        let cluster = self
            .hosts
            .iter()
            .map(|h| format!("{}={}", h.name, h.etcd.peer_url))
            .chain([format!("{name}={peer}")])
            .collect::<Vec<_>>()
            .join(",");
        self.add_host(
            tag,
            i,
            &name,
            &cluster,
            &["--initial-cluster-state", "existing"],
        );
        let h = self.hosts.last_mut().expect("just added");
        h.etcd.launch();
        assert!(
            h.etcd.wait_healthy(),
            "etcd member {name} exited:\n{}",
            h.etcd.log()
        );
        let mut args = self.hosts[0].agent_args.clone();
        if let Some(at) = args.iter().position(|a| a == "--node") {
            args[at + 1] = name.clone();
        }
        self.hosts[i].agent_args = args;
        self.start_agent(i);
        self.agent(i).wait_ready(Duration::from_secs(30));
        i
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    pub fn agent(&self, i: usize) -> &Agent {
        self.hosts[i].agent()
    }

    /// Starts host `i`'s agent (`discovery-agent run` inside the host, on
    /// its cgroup, pin dir and status file); does not wait for it.
    pub fn start_agent(&mut self, i: usize) {
        let h = &mut self.hosts[i];
        assert!(h.agent.is_none(), "{}'s agent already runs", h.name);
        let args: Vec<&str> = h.agent_args.iter().map(String::as_str).collect();
        h.agent = Some(Agent::spawn_netns(
            LOCAL_ETCD,
            &h.cg,
            &args,
            false,
            Some(&h.ns.name),
        ));
    }

    /// Stops host `i`'s agent with SIGTERM, keeping its pins (the programs
    /// keep redirecting), and respawns it on the same pins: a restart.
    pub fn restart_agent(&mut self, i: usize) {
        let a = self.hosts[i].agent.as_mut().expect("agent runs");
        a.stop();
        a.respawn();
    }

    /// etcdctl against host `i`'s member (from inside host `i`).
    pub fn ctl(&self, i: usize, args: &[&str]) -> Output {
        self.hosts[i].etcd.ctl(args)
    }

    /// `etcdctl put` through host `i`'s member.
    pub fn put(&self, i: usize, key: &str, value: &str) {
        self.hosts[i].etcd.put(key, value);
    }

    /// Index of the etcd leader, asked of host `i`'s member.
    pub fn leader(&self, i: usize) -> usize {
        let out = self.ctl(i, &["endpoint", "status", "-w", "json"]);
        assert!(out.status.success(), "endpoint status: {out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
        let leader = v[0]["Status"]["leader"].as_u64().expect("leader id");
        (0..self.hosts.len())
            .find(|&j| {
                let out = self.ctl(j, &["endpoint", "status", "-w", "json"]);
                serde_json::from_slice::<serde_json::Value>(&out.stdout)
                    .ok()
                    .and_then(|v| v[0]["Status"]["header"]["member_id"].as_u64())
                    == Some(leader)
            })
            .expect("the leader is a member")
    }

    /// Hands the etcd leadership to host `to`'s member (`etcdctl
    /// move-leader`, sent to the current leader), and waits until every
    /// member agrees.
    pub fn move_leader(&self, to: usize) {
        let member_id = |i: usize| {
            let out = self.ctl(i, &["endpoint", "status", "-w", "json"]);
            serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .ok()
                .and_then(|v| v[0]["Status"]["header"]["member_id"].as_u64())
                .expect("member id")
        };
        let target = format!("{:x}", member_id(to));
        let ok = wait_until(Duration::from_secs(20), || {
            let from = self.leader(to);
            if from == to {
                return Some(());
            }
            let _ = self.ctl(from, &["move-leader", &target]);
            None
        });
        assert!(
            ok.is_some(),
            "leadership never moved to {}",
            self.hosts[to].name
        );
        for i in 0..self.hosts.len() {
            wait_until(Duration::from_secs(10), || {
                (self.leader(i) == to).then_some(())
            })
            .unwrap_or_else(|| panic!("{} does not see the new leader", self.hosts[i].name));
        }
    }

    /// Starts `discovery-echo NAME ADDR PROTO` (`tcp`, `udp` or `both`)
    /// inside host `i`, at `host_ip(i):port`, and waits until it listens.
    pub fn backend(&self, i: usize, name: &str, port: u16, proto: &str) -> Proc {
        let h = &self.hosts[i];
        let addr = SocketAddr::from((h.ip, port));
        let p = Proc::spawn_on(
            Some(self.echo.clone()),
            vec![name.into(), addr.to_string(), proto.into()],
            None,
            Some(h.ns.name.clone()),
        );
        let sockets = if proto == "both" { 2 } else { 1 };
        wait_until(Duration::from_secs(10), || {
            h.listening(port, sockets).then_some(())
        })
        .unwrap_or_else(|| panic!("echo {name} never listened on {addr}:\n{}", p.log()));
        p
    }

    /// Starts `discovery-agent announce` inside host `i` for `service/id`
    /// at `addr` (`0.0.0.0:P`: the host's own address, or a literal),
    /// against the host's local member, registered as exempt with the
    /// host's agent; `extra` (e.g. `--ttl 3s`) is appended.
    pub fn announcer(&self, i: usize, service: &str, id: &str, addr: &str, extra: &[&str]) -> Proc {
        let h = &self.hosts[i];
        let mut args = announce_args(
            LOCAL_ETCD,
            service,
            id,
            addr.parse().expect("announce address"),
        );
        args.extend(["--pin-dir".into(), h.agent().pin_dir.display().to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        Proc::spawn_on(None, args, None, Some(h.ns.name.clone()))
    }

    /// `discovery-probe ARGS...` inside host `i`'s namespace and cgroup,
    /// its stdout piped (one JSON outcome per line).
    pub fn client(&self, i: usize, args: &[&str]) -> Load {
        let h = &self.hosts[i];
        let mut cmd = h.command(&self.probe);
        cmd.args(args);
        h.cg.start_command(cmd)
    }

    /// `discovery-probe load ADDR MILLIS` on host `i`: new TCP connections
    /// back to back.
    pub fn load(&self, i: usize, addr: &str, millis: u64) -> Load {
        self.client(i, &["load", addr, &millis.to_string()])
    }

    /// `discovery-probe MODE ADDR COUNT` on host `i`, to completion.
    pub fn probe(&self, i: usize, mode: &str, addr: &str, n: usize) -> Vec<Outcome> {
        let h = &self.hosts[i];
        let out =
            h.cg.output(h.command(&self.probe).args([mode, addr, &n.to_string()]));
        assert!(
            out.status.success(),
            "probe on {}: {}",
            h.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("probe output is JSON"))
            .collect()
    }

    fn port_cmd(&self, i: usize, state: &str) {
        must(
            self.switch
                .command("ip")
                .args(["link", "set", &format!("p{i}"), state])
                .output(),
            "ip link set in switch",
        );
    }

    /// Cuts host `i` off: its port on the switch goes down.
    pub fn cut(&self, i: usize) {
        self.port_cmd(i, "down");
    }

    /// Reconnects host `i`.
    pub fn heal(&self, i: usize) {
        self.port_cmd(i, "up");
    }

    /// The status files of every running agent, by host.
    pub fn snapshots(&self) -> Vec<Option<serde_json::Value>> {
        self.hosts
            .iter()
            .map(|h| h.agent.as_ref().and_then(Agent::snapshot))
            .collect()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Reverse order: the last host first; each host drops its agent
        // (detached), cgroup, etcd member and namespace in that order; the
        // switch (a field) goes last.
        while let Some(h) = self.hosts.pop() {
            drop(h);
        }
    }
}
