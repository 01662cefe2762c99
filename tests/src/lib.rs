//! Test harness: a real etcd on free loopback ports, the real agent attached
//! to a per-test child cgroup with its own pin dir, real backends on
//! 127.0.0.x, and real clients moved into the cgroup. Every guard cleans up
//! on drop, so a failing (panicking) test still removes its cgroup, pins and
//! processes.
//!
//! Only client processes are moved into the test cgroup (a child writes its
//! own PID to `cgroup.procs` before exec), never the test runner.
use std::{
    collections::HashMap,
    fs,
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::{io::AsRawFd as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

pub mod cdp;
pub mod clients;
pub mod hosts;
pub mod net;

/// One attempt of `discovery-probe`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Outcome {
    /// The name the backend answered with.
    pub backend: Option<String>,
    /// getpeername() for TCP/connected UDP; reply source for unconnected UDP.
    pub peer: Option<String>,
    pub errno: Option<i32>,
    pub micros: u64,
    /// When the attempt started, ms since the Unix epoch (load mode).
    #[serde(default)]
    pub at_ms: u64,
    /// What failed, in the client's words (the JVM and Python clients
    /// print it; an exception with no errno has only this).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Milliseconds since the Unix epoch: the clock tests and the load
/// generator share.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name unique to this test process and call.
pub fn unique(tag: &str) -> String {
    format!(
        "discovery-{tag}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `f` until it returns Some or `timeout` passes.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

fn workspace_target() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// The agent binary: `DISCOVERY_AGENT_BIN`, else the workspace's debug build
/// (`cargo xtask test` builds it first).
pub fn agent_bin() -> PathBuf {
    let p = std::env::var_os("DISCOVERY_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_target().join("debug/discovery-agent"));
    assert!(
        p.exists(),
        "agent binary {} not found: run the tests with `cargo xtask test`",
        p.display()
    );
    p
}

/// The agent built with the other map layout (feature `layout-test`), for
/// the migration tests: `DISCOVERY_AGENT_ALT_BIN`, else
/// `target/layout-test/debug/discovery-agent` (`cargo xtask test` builds
/// it).
pub fn alt_agent_bin() -> PathBuf {
    let p = std::env::var_os("DISCOVERY_AGENT_ALT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_target().join("layout-test/debug/discovery-agent"));
    assert!(
        p.exists(),
        "the layout-test agent {} is not built: run the tests with `cargo xtask test`",
        p.display()
    );
    p
}

// ---------------------------------------------------------------- backends

/// An in-process backend answering with its name: TCP connections get the
/// name and are closed; UDP datagrams are answered with the name.
pub struct Backend {
    addr: SocketAddr,
    udp: bool,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    pub fn tcp(name: &str, addr: SocketAddr) -> Self {
        net::isolate();
        Self::tcp_with(name, addr, false)
    }

    /// Like `tcp`, but keeps every connection open after the greeting (a
    /// backend whose requests hang), until dropped.
    pub fn tcp_holding(name: &str, addr: SocketAddr) -> Self {
        net::isolate();
        Self::tcp_with(name, addr, true)
    }

    fn tcp_with(name: &str, addr: SocketAddr, hold: bool) -> Self {
        let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind tcp {addr}: {e}"));
        let addr = l.local_addr().expect("local addr");
        let stop = Arc::new(AtomicBool::new(false));
        let (s, name) = (stop.clone(), name.to_owned());
        let thread = thread::spawn(move || {
            let mut held = Vec::new();
            for c in l.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(mut c) = c {
                    let _ = c.write_all(format!("{name}\n").as_bytes());
                    if hold {
                        held.push(c);
                    }
                }
            }
        });
        Self {
            addr,
            udp: false,
            stop,
            thread: Some(thread),
        }
    }

    pub fn udp(name: &str, addr: SocketAddr) -> Self {
        net::isolate();
        let sock = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
        let addr = sock.local_addr().expect("local addr");
        let stop = Arc::new(AtomicBool::new(false));
        let (s, name) = (stop.clone(), name.to_owned());
        let thread = thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((_, from)) = sock.recv_from(&mut buf) {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let _ = sock.send_to(format!("{name}\n").as_bytes(), from);
            }
        });
        Self {
            addr,
            udp: true,
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the blocked accept/recv; the test runner is not redirected.
        if self.udp {
            // From the backend's own family: a 127.0.0.1 socket cannot
            // send to [::1], and the recv would never wake.
            let local = if self.addr.is_ipv4() {
                "127.0.0.1:0"
            } else {
                "[::]:0"
            };
            if let Ok(s) = UdpSocket::bind(local) {
                let _ = s.send_to(b"stop", self.addr);
            }
        } else {
            let _ = TcpStream::connect(self.addr);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// -------------------------------------------------------------------- etcd

/// A private single-member etcd on free loopback ports, data in a temp dir.
pub struct Etcd {
    child: Option<Child>,
    pub url: String,
    peer_url: String,
    name: String,
    /// `--initial-cluster`: just this member, or all members of a cluster.
    initial_cluster: String,
    /// Extra server flags (TLS) and etcdctl flags (TLS, root user).
    server_args: Vec<String>,
    ctl_args: Vec<String>,
    /// `--listen-client-urls` when it differs from `url` (a member that
    /// also listens on its host's loopback).
    listen_client: Option<String>,
    /// A network namespace (`/run/netns/NAME`) the member and its etcdctl
    /// run in, through nsenter; None: the calling thread's.
    netns: Option<String>,
    dir: tempfile::TempDir,
}

/// Certificates and credentials of a secured etcd, for the agent's flags.
pub struct Secure {
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// User `agent`, read-write on /discovery/.
    pub password_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Secure {
    /// The agent's flags for this etcd as user `agent`.
    pub fn agent_flags(&self) -> Vec<String> {
        let p = |p: &PathBuf| p.display().to_string();
        vec![
            "--etcd-ca-file".into(),
            p(&self.ca),
            "--etcd-cert-file".into(),
            p(&self.client_cert),
            "--etcd-key-file".into(),
            p(&self.client_key),
            "--etcd-user".into(),
            "agent".into(),
            "--etcd-password-file".into(),
            p(&self.password_file),
        ]
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
}

/// A test CA, a server certificate for 127.0.0.1 and a client certificate.
fn make_certs(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=discovery-test-ca",
    ]);
    openssl(dir, &ca);
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        fs::write(dir.join(format!("{name}.ext")), ext).expect("ext file");
        let (key, csr, crt, extf) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        let subj = format!("/CN=discovery-test-{name}");
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &req);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &extf,
            ],
        );
    }
}

fn etcd_dir() -> tempfile::TempDir {
    // tmpfs keeps fsync cheap for many small tests on 2 cores.
    let base = if Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    };
    tempfile::Builder::new()
        .prefix("discovery-etcd-")
        .tempdir_in(base)
        .expect("etcd temp dir")
}

impl Etcd {
    pub fn start() -> Self {
        net::isolate();
        // A port found free can be taken before etcd binds it (parallel
        // tests): if etcd exits at start, try again with other ports.
        for _ in 0..3 {
            let peer_url = format!("http://127.0.0.1:{}", free_port());
            let mut e = Self {
                child: None,
                url: format!("http://127.0.0.1:{}", free_port()),
                initial_cluster: format!("default={peer_url}"),
                peer_url,
                name: "default".into(),
                server_args: Vec::new(),
                ctl_args: Vec::new(),
                listen_client: None,
                netns: None,
                dir: etcd_dir(),
            };
            if e.spawn() {
                return e;
            }
        }
        panic!("etcd did not start in 3 attempts");
    }

    /// Starts the member; false if it exited (port taken), panics if it
    /// runs but never becomes healthy.
    fn spawn(&mut self) -> bool {
        self.launch();
        self.wait_healthy()
    }

    fn launch(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .expect("etcd log");
        let listen = self.listen_client.as_deref().unwrap_or(&self.url);
        let child = net::command_in(self.netns.as_deref(), "etcd")
            .process_group(0)
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", listen])
            .args(["--advertise-client-urls", &self.url])
            .args(["--listen-peer-urls", &self.peer_url])
            .args(["--initial-advertise-peer-urls", &self.peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(&self.server_args)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start etcd (is etcd-server installed? run `cargo xtask bootstrap`)");
        self.child = Some(child);
    }

    /// Waits until the member answers; false if it exited (port taken).
    fn wait_healthy(&mut self) -> bool {
        let ok = wait_until(Duration::from_secs(15), || {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(_)) = c.try_wait()
            {
                return Some(false);
            }
            self.ctl(&["endpoint", "health"])
                .status
                .success()
                .then_some(true)
        });
        match ok {
            Some(true) => true,
            Some(false) => {
                self.child = None;
                false
            }
            None => panic!("etcd did not become healthy:\n{}", self.log()),
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        net::command_in(self.netns.as_deref(), "etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.url, "--command-timeout", "5s"])
            .args(&self.ctl_args)
            .args(args)
            .output()
            .expect("run etcdctl (is etcd-client installed?)")
    }

    pub fn put(&self, key: &str, value: &str) {
        let out = self.ctl(&["put", key, value]);
        assert!(out.status.success(), "etcdctl put {key}: {out:?}");
    }

    pub fn del(&self, key: &str) {
        let out = self.ctl(&["del", key]);
        assert!(out.status.success(), "etcdctl del {key}: {out:?}");
    }

    /// An etcd serving only TLS with client certificates, with
    /// authentication on: user `root` (for the test's etcdctl) and user
    /// `agent`, read-write on /discovery/ only.
    pub fn start_secure() -> (Self, Secure) {
        net::isolate();
        let certs = tempfile::tempdir().expect("cert dir");
        let d = certs.path();
        make_certs(d);
        let f = |n: &str| d.join(n).display().to_string();
        let peer_url = format!("http://127.0.0.1:{}", free_port());
        let mut e = Self {
            child: None,
            url: format!("https://127.0.0.1:{}", free_port()),
            initial_cluster: format!("default={peer_url}"),
            peer_url,
            name: "default".into(),
            server_args: vec![
                "--cert-file".into(),
                f("server.crt"),
                "--key-file".into(),
                f("server.key"),
                "--client-cert-auth".into(),
                "--trusted-ca-file".into(),
                f("ca.crt"),
            ],
            ctl_args: vec![
                "--cacert".into(),
                f("ca.crt"),
                "--cert".into(),
                f("client.crt"),
                "--key".into(),
                f("client.key"),
            ],
            listen_client: None,
            netns: None,
            dir: etcd_dir(),
        };
        assert!(e.spawn(), "secure etcd did not start:\n{}", e.log());
        for cmd in [
            &["user", "add", "root:rootpw"][..],
            &["user", "add", "agent:agentpw"],
            &["role", "add", "discovery"],
            &[
                "role",
                "grant-permission",
                "discovery",
                "--prefix=true",
                "readwrite",
                "/discovery/",
            ],
            &["user", "grant-role", "agent", "discovery"],
            &["auth", "enable"],
        ] {
            let out = e.ctl(cmd);
            assert!(out.status.success(), "etcdctl {cmd:?}: {out:?}");
        }
        e.ctl_args.extend(["--user".into(), "root:rootpw".into()]);
        let password_file = d.join("agent.password");
        fs::write(&password_file, "agentpw\n").expect("password file");
        let secure = Secure {
            ca: d.join("ca.crt"),
            client_cert: d.join("client.crt"),
            client_key: d.join("client.key"),
            password_file,
            _dir: certs,
        };
        (e, secure)
    }

    /// The value of `key`, if it exists.
    pub fn get(&self, key: &str) -> Option<String> {
        let out = self.ctl(&["get", key, "--print-value-only"]);
        assert!(out.status.success(), "etcdctl get {key}: {out:?}");
        let v = String::from_utf8_lossy(&out.stdout).trim_end().to_owned();
        (!v.is_empty()).then_some(v)
    }

    /// The lease `key` is attached to (0 for none), if the key exists.
    pub fn lease_of(&self, key: &str) -> Option<i64> {
        let out = self.ctl(&["get", key, "-w", "fields"]);
        assert!(out.status.success(), "etcdctl get {key}: {out:?}");
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            l.strip_prefix("\"Lease\" : ")
                .and_then(|v| v.trim().parse().ok())
        })
    }

    /// The store's current revision.
    pub fn revision(&self) -> i64 {
        let out = self.ctl(&["endpoint", "status", "-w", "json"]);
        assert!(out.status.success(), "endpoint status: {out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
        v[0]["Status"]["header"]["revision"]
            .as_i64()
            .expect("revision")
    }

    /// Compacts the history up to the current revision.
    pub fn compact(&self) -> i64 {
        let rev = self.revision();
        let out = self.ctl(&["compact", &rev.to_string()]);
        assert!(out.status.success(), "compact: {out:?}");
        rev
    }

    /// Grants a lease that nobody keeps alive; returns its id in hex.
    pub fn lease_grant(&self, ttl_secs: u32) -> String {
        let out = self.ctl(&["lease", "grant", &ttl_secs.to_string()]);
        assert!(out.status.success(), "lease grant: {out:?}");
        // "lease 694d8f2c1b5e9a04 granted with TTL(2s)"
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .expect("lease id")
            .to_owned()
    }

    pub fn put_with_lease(&self, key: &str, value: &str, lease: &str) {
        let out = self.ctl(&["put", &format!("--lease={lease}"), key, value]);
        assert!(out.status.success(), "etcdctl put {key}: {out:?}");
    }

    /// Many puts in transactions of 100 (values must not contain spaces
    /// or quotes).
    pub fn put_many(&self, kvs: &[(String, String)]) {
        for chunk in kvs.chunks(100) {
            let mut input = String::from("\n");
            for (k, v) in chunk {
                input.push_str(&format!("put {k} {v}\n"));
            }
            input.push_str("\n\n");
            let mut child = net::command_in(self.netns.as_deref(), "etcdctl")
                .args(["--endpoints", &self.url, "txn"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("etcdctl txn");
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input.as_bytes())
                .expect("write txn");
            let out = child.wait_with_output().expect("etcdctl txn");
            assert!(out.status.success(), "etcdctl txn: {out:?}");
        }
    }

    /// Stops the member (by our own PID), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports with the same data.
    pub fn restart(&mut self) {
        self.stop();
        assert!(self.spawn(), "etcd did not restart:\n{}", self.log());
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

/// A three-member etcd cluster on loopback ports.
pub struct EtcdCluster {
    pub members: Vec<Etcd>,
}

impl EtcdCluster {
    pub fn start(n: usize) -> Self {
        net::isolate();
        let peers: Vec<String> = (0..n)
            .map(|_| format!("http://127.0.0.1:{}", free_port()))
            .collect();
        let initial_cluster = peers
            .iter()
            .enumerate()
            .map(|(i, p)| format!("m{i}={p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<Etcd> = peers
            .into_iter()
            .enumerate()
            .map(|(i, peer_url)| Etcd {
                child: None,
                url: format!("http://127.0.0.1:{}", free_port()),
                peer_url,
                name: format!("m{i}"),
                initial_cluster: initial_cluster.clone(),
                // Relaxed raft timing: on a loaded 2-core machine the
                // defaults (100 ms / 1 s) cause spurious elections.
                server_args: ["--heartbeat-interval", "250", "--election-timeout", "2500"]
                    .map(String::from)
                    .to_vec(),
                ctl_args: Vec::new(),
                listen_client: None,
                netns: None,
                dir: etcd_dir(),
            })
            .collect();
        // All must run before any can be healthy (quorum).
        members.iter_mut().for_each(Etcd::launch);
        for m in &mut members {
            assert!(
                m.wait_healthy(),
                "cluster member {} exited:\n{}",
                m.name,
                m.log()
            );
        }
        Self { members }
    }

    /// All client URLs, comma separated, as the agent takes them.
    pub fn urls(&self) -> String {
        self.members
            .iter()
            .map(|m| m.url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A running member to send writes to.
    pub fn any(&self) -> &Etcd {
        self.members
            .iter()
            .find(|m| m.is_running())
            .expect("a running member")
    }

    /// Runs an etcdctl command against the running members until it
    /// succeeds (writes fail while a new leader is being elected).
    pub fn ctl_retry(&self, args: &[&str]) {
        let urls: Vec<&str> = self
            .members
            .iter()
            .filter(|m| m.is_running())
            .map(|m| m.url.as_str())
            .collect();
        let eps = urls.join(",");
        let ok = wait_until(Duration::from_secs(30), || {
            Command::new("etcdctl")
                .args(["--endpoints", &eps, "--command-timeout", "3s"])
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
        });
        assert!(ok.is_some(), "etcdctl {args:?} never succeeded");
    }

    /// Index of the current leader, asked of a running member.
    pub fn leader(&self) -> usize {
        let out = self
            .any()
            .ctl(&["endpoint", "status", "--cluster", "-w", "json"]);
        assert!(out.status.success(), "endpoint status: {out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
        let leader_ep = v
            .as_array()
            .expect("list")
            .iter()
            .find(|e| e["Status"]["leader"] == e["Status"]["header"]["member_id"])
            .and_then(|e| e["Endpoint"].as_str())
            .expect("a leader")
            .to_owned();
        self.members
            .iter()
            .position(|m| m.url == leader_ep)
            .expect("leader is a member")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

// ------------------------------------------------------------------ cgroup

/// The cgroup v2 mount point, from /proc/mounts.
pub fn cgroup2_root() -> PathBuf {
    let mounts = fs::read_to_string("/proc/mounts").expect("/proc/mounts");
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("cgroup v2 is not mounted")
}

/// Writes the calling process's PID to the open `cgroup.procs` fd. Runs
/// between fork and exec, so only async-signal-safe calls and a stack
/// buffer.
fn move_self(fd: i32) -> io::Result<()> {
    let mut buf = [0u8; 16];
    // SAFETY: getpid and write are async-signal-safe.
    let mut pid = unsafe { libc::getpid() } as u32;
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (pid % 10) as u8;
        pid /= 10;
        if pid == 0 {
            break;
        }
    }
    let n = buf.len() - i;
    // SAFETY: `fd` is open for the call and the slice is valid for `n` bytes.
    if unsafe { libc::write(fd, buf[i..].as_ptr().cast(), n) } != n as isize {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A running load generator.
pub struct Load {
    child: Child,
    /// Lines of stdout as they come, once `next_line` was called.
    lines: Option<std::sync::mpsc::Receiver<String>>,
    /// Attempts read while stopping.
    taken: Vec<Outcome>,
}

impl Load {
    /// The next line the probe prints, waiting at most `timeout`.
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        if self.lines.is_none() {
            let out = self.child.stdout.take().expect("stdout");
            let (tx, rx) = std::sync::mpsc::channel();
            thread::spawn(move || {
                for l in std::io::BufRead::lines(std::io::BufReader::new(out)) {
                    if l.is_err() || tx.send(l.unwrap_or_default()).is_err() {
                        break;
                    }
                }
            });
            self.lines = Some(rx);
        }
        self.lines.as_ref()?.recv_timeout(timeout).ok()
    }

    /// Ends the run now (by PID) and returns the lines not yet taken by
    /// `next_line`; a last line cut off by the kill is dropped.
    pub fn stop(mut self) -> Vec<Outcome> {
        let _ = self.next_line(Duration::ZERO).map(|l| self.pending(l));
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut out = std::mem::take(&mut self.taken);
        if let Some(rx) = &self.lines {
            out.extend(rx.iter().filter_map(|l| serde_json::from_str(&l).ok()));
        }
        out
    }

    fn pending(&mut self, l: String) {
        if let Ok(o) = serde_json::from_str(&l) {
            self.taken.push(o);
        }
    }

    /// Waits until the run has made `n` more attempts (kept for `finish`):
    /// "the load has been running across this" without a fixed sleep.
    pub fn wait_attempts(&mut self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for i in 0..n {
            let left = deadline.saturating_duration_since(Instant::now());
            let l = self
                .next_line(left)
                .unwrap_or_else(|| panic!("the load made {i} of {n} attempts in {timeout:?}"));
            self.pending(l);
        }
    }

    /// Waits for the end of the run and returns every attempt.
    pub fn finish(mut self) -> Vec<Outcome> {
        if let Some(rx) = self.lines.take() {
            // Lines already flow through `next_line`'s reader.
            let _ = self.child.wait();
            let mut out = std::mem::take(&mut self.taken);
            out.extend(
                rx.iter()
                    .map(|l| serde_json::from_str(&l).expect("load output is JSON")),
            );
            return out;
        }
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out)
            .expect("read load output");
        let status = self.child.wait().expect("wait load generator");
        assert!(status.success(), "load generator failed: {status:?}");
        out.lines()
            .map(|l| serde_json::from_str(l).expect("load output is JSON"))
            .collect()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child cgroup of the cgroup v2 root for one test's clients.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(tag: &str) -> Self {
        net::isolate();
        let path = cgroup2_root().join(unique(tag));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        Self { path }
    }

    /// A child cgroup (a separate workload) that inherits this one's
    /// programs. Drop it before its parent.
    pub fn child(&self, name: &str) -> Self {
        let path = self.path.join(name);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        Self { path }
    }

    /// Makes `cmd`'s process move itself into this cgroup between fork and
    /// exec; the returned file must stay open until it has been spawned.
    fn enter_on_exec(&self, cmd: &mut Command) -> fs::File {
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.procs"))
            .expect("open cgroup.procs");
        let fd = procs.as_raw_fd();
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe { cmd.pre_exec(move || move_self(fd)) };
        procs
    }

    /// Starts `cmd` as a process inside this cgroup (a server that must be
    /// redirected, such as a DNS forwarder). The caller ends it.
    pub fn spawn(&self, cmd: &mut Command) -> Child {
        let _procs = self.enter_on_exec(cmd);
        cmd.spawn().expect("spawn a process in the test cgroup")
    }

    /// Runs `cmd` to completion as a process inside this cgroup.
    pub fn output(&self, cmd: &mut Command) -> Output {
        let _procs = self.enter_on_exec(cmd);
        cmd.output().expect("spawn client in test cgroup")
    }

    /// Starts `discovery-probe load ADDR MILLIS` in the cgroup: new
    /// connections back to back for that long, one JSON line each.
    pub fn start_load(&self, probe_bin: &str, addr: &str, millis: u64) -> Load {
        self.start(probe_bin, &["load", addr, &millis.to_string()])
    }

    /// Starts `discovery-probe ARGS...` in the cgroup, its stdout piped.
    pub fn start(&self, probe_bin: &str, args: &[&str]) -> Load {
        let mut cmd = Command::new(probe_bin);
        cmd.args(args);
        self.start_command(cmd)
    }

    /// Starts `cmd` (a client printing one JSON outcome per line) in the
    /// cgroup, its stdout piped.
    pub fn start_command(&self, mut cmd: Command) -> Load {
        cmd.stdout(std::process::Stdio::piped());
        let _procs = self.enter_on_exec(&mut cmd);
        Load {
            child: cmd.spawn().expect("spawn probe"),
            lines: None,
            taken: Vec::new(),
        }
    }

    /// Runs `discovery-probe MODE ADDR COUNT` in the cgroup.
    pub fn probe(&self, probe_bin: &str, mode: &str, addr: &str, count: usize) -> Vec<Outcome> {
        let out = self.output(Command::new(probe_bin).args([mode, addr, &count.to_string()]));
        assert!(
            out.status.success(),
            "probe failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("probe output is JSON"))
            .collect()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Only our clients can be in here; end any that outlived a failure.
        let _ = wait_until(Duration::from_secs(5), || {
            if let Ok(procs) = fs::read_to_string(self.path.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    // SAFETY: kill has no memory preconditions; only our
                    // clients can be in the test's own cgroup.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            fs::remove_dir(&self.path).ok()
        });
    }
}

// ---------------------------------------------------------------- nftables

/// An nftables table of the test's own that silently drops TCP packets to
/// one loopback address and port (as a vanished host would); removed on
/// drop.
pub struct PacketDrop {
    table: String,
}

impl PacketDrop {
    /// Drops SYNs only: new connections hang, existing ones still work.
    pub fn syns(addr: SocketAddr) -> Self {
        Self::matching(addr, "tcp flags syn")
    }

    /// Drops every packet to the address: existing connections go silent.
    pub fn all(addr: SocketAddr) -> Self {
        Self::matching(addr, "")
    }

    fn matching(addr: SocketAddr, extra: &str) -> Self {
        let table = unique("drop").replace('-', "_");
        let family = if addr.is_ipv6() { "ip6" } else { "ip" };
        let script = format!(
            "table inet {table} {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n  \
             {family} daddr {} tcp dport {} {extra} drop\n }}\n}}\n",
            addr.ip(),
            addr.port()
        );
        let out = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin
                    .take()
                    .expect("stdin")
                    .write_all(script.as_bytes())?;
                c.wait_with_output()
            })
            .expect("nft (nftables)");
        assert!(out.status.success(), "nft: {out:?}");
        Self { table }
    }
}

impl Drop for PacketDrop {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .output();
    }
}

// ------------------------------------------------------------------- agent

/// A `discovery-agent` process (any subcommand) with its log in a temp dir.
pub struct Proc {
    child: Option<Child>,
    args: Vec<String>,
    /// Another agent binary than [`agent_bin`] (see `set_binary`).
    bin: Option<PathBuf>,
    env: Vec<(String, String)>,
    /// A test cgroup to start (and restart) the process in.
    cgroup: Option<PathBuf>,
    /// A network namespace (`/run/netns/NAME`) to start it in, through
    /// nsenter (which execs it: the child's PID is the process's own).
    netns: Option<String>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Proc {
    pub fn spawn(args: Vec<String>) -> Self {
        Self::spawn_in(args, None)
    }

    /// Starts it as a process inside the cgroup at `cgroup` (one of the
    /// test's own), as a workload there would run.
    pub fn spawn_in(args: Vec<String>, cgroup: Option<PathBuf>) -> Self {
        Self::spawn_on(None, args, cgroup, None)
    }

    /// Starts `bin` (None: the agent under test) with `args`, in the test
    /// cgroup `cgroup` if given, and in the network namespace `netns`
    /// (`/run/netns/NAME`) if given.
    pub fn spawn_on(
        bin: Option<PathBuf>,
        args: Vec<String>,
        cgroup: Option<PathBuf>,
        netns: Option<String>,
    ) -> Self {
        net::isolate();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut p = Self {
            child: None,
            args,
            bin,
            env: Vec::new(),
            cgroup,
            netns,
            log: dir.path().join("log"),
            _dir: dir,
        };
        p.respawn();
        p
    }

    pub fn args(&self) -> Vec<String> {
        self.args.clone()
    }

    /// Starts the process again with the same arguments.
    pub fn respawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = net::command_in(
            self.netns.as_deref(),
            self.bin.clone().unwrap_or_else(agent_bin),
        );
        cmd.process_group(0)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let procs = self.cgroup.as_ref().map(|cg| {
            fs::OpenOptions::new()
                .write(true)
                .open(cg.join("cgroup.procs"))
                .expect("open cgroup.procs")
        });
        if let Some(f) = &procs {
            let fd = f.as_raw_fd();
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe { cmd.pre_exec(move || move_self(fd)) };
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.binary().display()));
        drop(procs);
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        strip_ansi(&s)
    }

    /// Runs another build of the agent from the next respawn on (None:
    /// the one under test).
    pub fn set_binary(&mut self, bin: Option<PathBuf>) {
        self.bin = bin;
    }

    /// The binary it runs.
    pub fn binary(&self) -> PathBuf {
        self.bin.clone().unwrap_or_else(agent_bin)
    }

    /// Sets the environment the next respawns add (replacing the last).
    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
    }

    /// Starts the process again with `extra` added to its arguments (for
    /// good: a later [`respawn`](Self::respawn) keeps them).
    pub fn respawn_adding(&mut self, extra: &[&str]) {
        self.args.extend(extra.iter().map(|s| s.to_string()));
        self.respawn();
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().map(|s| s.is_none()).unwrap_or(false))
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `sig` to the process (ours, by PID).
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill has no memory preconditions; the pid is our child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let status = wait_until(timeout, || {
            self.child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
        });
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// Resident memory of the process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let pid = self.child.as_ref().expect("running").id();
        fs::read_to_string(format!("/proc/{pid}/status"))
            .expect("proc status")
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS")
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: kill has no memory preconditions; the pid is our child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().ok()
    }

    /// SIGKILL and wait.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `discovery-agent announce` arguments for one instance `service/id` at
/// `addr`, checked every 100 ms so tests stay short.
pub fn announce_args(etcd_url: &str, service: &str, id: &str, addr: SocketAddr) -> Vec<String> {
    [
        "announce",
        "--etcd",
        etcd_url,
        "--service",
        service,
        "--id",
        id,
        "--interval",
        "100ms",
        "--timeout",
        "80ms",
        "--rise",
        "2",
        "--fall",
        "3",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(["--addr".to_owned(), addr.to_string()])
    .collect()
}

/// Small maps: quick to create and dump in many parallel tests.
pub const SMALL_MAPS: [&str; 4] = ["--max-services", "256", "--max-backends", "1024"];

/// The real agent, attached to a test cgroup with its own pin dir.
pub struct Agent {
    pub proc: Proc,
    pub pin_dir: PathBuf,
    /// The agent's `--status-file`.
    pub status_file: PathBuf,
}

impl std::ops::Deref for Agent {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        &self.proc
    }
}

impl std::ops::DerefMut for Agent {
    fn deref_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

impl Agent {
    /// Starts `discovery-agent run` and waits until it is ready.
    pub fn start(etcd_url: &str, cgroup: &TestCgroup, extra: &[&str]) -> Self {
        let a = Self::spawn(etcd_url, cgroup, extra);
        a.wait_ready(Duration::from_secs(20));
        a
    }

    /// The agent's status file, if this process of it has written one.
    pub fn snapshot(&self) -> Option<serde_json::Value> {
        let v: serde_json::Value =
            serde_json::from_slice(&fs::read(&self.status_file).ok()?).ok()?;
        (v["pid"].as_u64() == self.pid().map(u64::from)).then_some(v)
    }

    /// Waits for the readiness signal: `ready` in the status file, set by
    /// this process as soon as it has applied a full list of etcd to the
    /// maps.
    pub fn wait_ready(&self, timeout: Duration) -> serde_json::Value {
        self.wait_status("ready", timeout, |v| match v.get("ready") {
            Some(r) => r == true,
            // An agent from before the flag (the bench compares builds):
            // it wrote the file only once etcd was applied.
            None => v["revision"].as_i64().is_some_and(|r| r > 0),
        })
    }

    /// Waits until this process's status file satisfies `ok`; panics naming
    /// `what`, with the last status file and the log, if it never does.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        wait_until(timeout, || self.snapshot().filter(|v| ok(v))).unwrap_or_else(|| {
            panic!(
                "agent status never showed {what} within {timeout:?}; last status file: {}\n{}",
                self.snapshot().map(|v| v.to_string()).unwrap_or_default(),
                self.log()
            )
        })
    }

    /// A backend's `health` in the status file (`ok`, `check failing`,
    /// `ejected`), by service and instance.
    pub fn backend_health(
        snapshot: &serde_json::Value,
        service: &str,
        instance: &str,
    ) -> Option<String> {
        Self::service_status(snapshot, service)?["backends"]
            .as_array()?
            .iter()
            .find(|b| b["instance"] == instance)
            .and_then(|b| b["health"].as_str().map(str::to_owned))
    }

    /// One service of the status file, by name.
    pub fn service_status(snapshot: &serde_json::Value, name: &str) -> Option<serde_json::Value> {
        snapshot["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
    }

    /// Starts it as a process inside the cgroup its programs attach to (what
    /// the default `--cgroup`, the root, amounts to on a real node), and
    /// waits until it has listed etcd.
    pub fn start_inside(etcd_url: &str, cgroup: &TestCgroup, extra: &[&str]) -> Self {
        let a = Self::spawn_with(etcd_url, cgroup, extra, true);
        a.wait_ready(Duration::from_secs(20));
        a
    }

    /// Starts it without waiting for etcd.
    pub fn spawn(etcd_url: &str, cgroup: &TestCgroup, extra: &[&str]) -> Self {
        Self::spawn_with(etcd_url, cgroup, extra, false)
    }

    fn spawn_with(etcd_url: &str, cgroup: &TestCgroup, extra: &[&str], inside: bool) -> Self {
        Self::spawn_netns(etcd_url, cgroup, extra, inside, None)
    }

    /// Starts it without waiting for etcd, in the network namespace
    /// `netns` (`/run/netns/NAME`, through nsenter) if given: an agent of
    /// its own host (see [`hosts`]).
    pub fn spawn_netns(
        etcd_url: &str,
        cgroup: &TestCgroup,
        extra: &[&str],
        inside: bool,
        netns: Option<&str>,
    ) -> Self {
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(unique("pins"));
        let mut args: Vec<String> = vec![
            "run".into(),
            "--etcd".into(),
            etcd_url.into(),
            "--cgroup".into(),
            cgroup.path.display().to_string(),
            "--pin-dir".into(),
            pin_dir.display().to_string(),
        ];
        // Parallel agents cannot all listen on the default port.
        if !extra.contains(&"--metrics-addr") {
            args.extend(["--metrics-addr".into(), "127.0.0.1:0".into()]);
        }
        // Nor share the default status file.
        let status_file = std::env::temp_dir().join(format!(
            "{}.status.json",
            pin_dir.file_name().expect("pin dir name").to_string_lossy()
        ));
        args.extend(["--status-file".into(), status_file.display().to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        Self {
            proc: Proc::spawn_on(
                None,
                args,
                inside.then(|| cgroup.path.clone()),
                netns.map(str::to_owned),
            ),
            pin_dir,
            status_file,
        }
    }

    /// `discovery-agent status --json` for this agent's pins and status
    /// file.
    pub fn status(&self) -> serde_json::Value {
        // The same build as the running agent: the maps have its layout.
        let out = Command::new(self.proc.binary())
            .args(["status", "--json", "--pin-dir"])
            .arg(&self.pin_dir)
            .arg("--status-file")
            .arg(&self.status_file)
            .output()
            .expect("run discovery-agent status");
        assert!(out.status.success(), "status: {out:?}");
        serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
    }

    /// Scrapes `path` from the agent's metrics endpoint (the bound address
    /// from its status file): (status line, body).
    pub fn scrape(&self, path: &str) -> (String, String) {
        let addr = wait_until(Duration::from_secs(10), || {
            Some(self.snapshot()?["metrics_addr"].as_str()?.to_owned())
        })
        .unwrap_or_else(|| panic!("no metrics address in the status file:\n{}", self.log()));
        let mut c = TcpStream::connect(&addr).expect("connect to metrics");
        c.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .expect("send request");
        let mut resp = String::new();
        c.read_to_string(&mut resp).expect("read response");
        let (head, body) = resp.split_once("\r\n\r\n").expect("HTTP response");
        (
            head.lines().next().unwrap_or_default().to_owned(),
            body.to_owned(),
        )
    }

    /// The value of one metric sample line (`name{labels}` as printed).
    pub fn metric(&self, sample: &str) -> Option<f64> {
        let (_, body) = self.scrape("/metrics");
        body.lines().find_map(|l| {
            l.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }

    pub fn run_cmd(&self, sub: &str) -> Output {
        Command::new(self.proc.binary())
            .args([sub, "--pin-dir"])
            .arg(&self.pin_dir)
            .env("NO_COLOR", "1")
            .output()
            .expect("run discovery-agent")
    }

    /// The kernel counters from the pinned maps.
    pub fn counters(&self) -> HashMap<String, u64> {
        let out = self.run_cmd("counters");
        assert!(out.status.success(), "counters: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k.to_owned(), v.parse().ok()?))
            })
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.proc.kill();
        let _ = self.run_cmd("detach");
        let _ = fs::remove_dir_all(&self.pin_dir);
        let _ = fs::remove_file(&self.status_file);
    }
}

pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Counts answers per backend name; failures under "errno N".
pub fn tally(outcomes: &[Outcome]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for o in outcomes {
        let k = match (&o.backend, o.errno) {
            (Some(b), _) => b.clone(),
            (None, Some(e)) => format!("errno {e}"),
            (None, None) => o.error.clone().unwrap_or_else(|| "?".into()),
        };
        *m.entry(k).or_default() += 1;
    }
    m
}

// ------------------------------------------------------------------- world

/// Changes must reach new connections within a second.
pub const CONVERGE: Duration = Duration::from_secs(1);

/// One test's world: a private etcd, a child cgroup, the agent attached to
/// it, and the probe binary for clients.
pub struct World {
    // Drop order: agent (detach) before cgroup before etcd.
    pub agent: Agent,
    pub cg: TestCgroup,
    pub etcd: Etcd,
    probe: String,
}

impl World {
    pub fn start(probe: &str, tag: &str, extra: &[&str]) -> Self {
        net::isolate();
        let etcd = Etcd::start();
        let cg = TestCgroup::new(tag);
        // Small maps unless the test sizes them itself.
        let mut args: Vec<&str> = SMALL_MAPS
            .chunks(2)
            .filter(|kv| !extra.contains(&kv[0]))
            .flatten()
            .copied()
            .collect();
        args.extend_from_slice(extra);
        let agent = Agent::start(&etcd.url, &cg, &args);
        Self {
            agent,
            cg,
            etcd,
            probe: probe.to_owned(),
        }
    }

    pub fn service(&self, name: &str, frontend: &str, protocol: &str) {
        self.etcd.put(
            &format!("/discovery/services/{name}"),
            &format!(r#"{{"frontend":"{frontend}","protocol":"{protocol}"}}"#),
        );
    }

    pub fn backend(&self, service: &str, instance: &str, value: &str) {
        self.etcd
            .put(&format!("/discovery/backends/{service}/{instance}"), value);
    }

    pub fn probe(&self, mode: &str, addr: &str, n: usize) -> Vec<Outcome> {
        self.cg.probe(&self.probe, mode, addr, n)
    }

    /// The agent's command line, to start another agent on the same pins.
    pub fn agent_args(&self) -> Vec<String> {
        self.agent.args()
    }

    pub fn start_load(&self, addr: &str, millis: u64) -> Load {
        self.cg.start_load(&self.probe, addr, millis)
    }

    /// `discovery-probe hold FRONTEND N HELD` in the test cgroup: N
    /// connections, those answered by `held` kept open to the end (hung
    /// requests), the others closed at once. Returns `held`'s share.
    pub fn held_share(&self, frontend: &str, n: usize, held: &str) -> f64 {
        let out = self.cg.output(Command::new(&self.probe).args([
            "hold",
            frontend,
            &n.to_string(),
            held,
        ]));
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.lines().count(), n, "{text}");
        text.lines().filter(|l| *l == held).count() as f64 / n as f64
    }

    /// Starts `discovery-probe ARGS...` in the test cgroup.
    pub fn start_probe(&self, args: &[&str]) -> Load {
        self.cg.start(&self.probe, args)
    }

    /// Polls with fresh connections until `ok` holds for a whole batch.
    pub fn converge(
        &self,
        mode: &str,
        addr: &str,
        n: usize,
        ok: impl Fn(&HashMap<String, usize>) -> bool,
    ) -> HashMap<String, usize> {
        let mut last = HashMap::new();
        let r = wait_until(CONVERGE, || {
            last = tally(&self.probe(mode, addr, n));
            ok(&last).then(|| last.clone())
        });
        r.unwrap_or_else(|| {
            panic!(
                "{mode} {addr} did not converge within {CONVERGE:?}; last: {last:?}\nagent log:\n{}",
                self.agent.log()
            )
        })
    }
}
