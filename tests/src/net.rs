//! One network namespace per test: every integration test runs its etcd,
//! agent, backends and clients in a namespace of its own, so tests share no
//! loopback ports, listening sockets (the agent's listener guard sees only
//! its test's), nftables rules or conntrack state with each other or with
//! the host.
//!
//! A namespace belongs to a thread (Linux keeps it per task), and threads
//! and processes inherit their creator's. libtest runs each test on a
//! thread of its own, so the harness's constructors (`Etcd::start`,
//! `TestCgroup::new`, the backends) call [`isolate`], which moves the
//! calling thread into a fresh namespace the first time; everything the
//! test then starts, threads and processes alike, is inside it. The
//! namespace is deleted when the test's thread ends.
//!
//! BPF programs, maps and cgroups are not per namespace: the programs
//! attached to a test's cgroup see its clients' calls whatever namespace
//! they run in.
use std::{
    cell::RefCell,
    fs,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
};

static SHARE_HOST: AtomicBool = AtomicBool::new(false);

/// Opts this process out of [`isolate`]: the demo and the benchmarks run
/// on the host's loopback (the bench compares against DNAT and HAProxy set
/// up there).
pub fn share_host_network() {
    SHARE_HOST.store(true, Ordering::Relaxed);
}

thread_local! {
    static NET: RefCell<Option<TestNet>> = const { RefCell::new(None) };
}

/// Moves the calling thread into a network namespace of its own with
/// loopback up, unless it (or the thread that made it) already is in one.
pub fn isolate() {
    if SHARE_HOST.load(Ordering::Relaxed) || !in_host_netns() {
        return;
    }
    NET.with(|n| {
        if n.borrow().is_none() {
            *n.borrow_mut() = Some(TestNet::enter());
        }
    });
}

/// The name of the calling thread's test namespace (for `nsenter
/// --net=/run/netns/NAME`), if it has one.
pub fn current() -> Option<String> {
    NET.with(|n| n.borrow().as_ref().map(|t| t.name.clone()))
}

/// Whether this thread shares the network namespace of the process's main
/// thread (`/proc/self` is the thread group leader; libtest never moves
/// it, and PID 1's namespace may not be readable).
fn in_host_netns() -> bool {
    let ino = |p: &str| {
        fs::metadata(p)
            .map(|m| m.ino())
            .unwrap_or_else(|e| panic!("{p}: {e}"))
    };
    ino("/proc/thread-self/ns/net") == ino("/proc/self/ns/net")
}

struct TestNet {
    name: String,
    /// The namespace to return to.
    home: fs::File,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestNet {
    fn enter() -> Self {
        let name = crate::unique("net");
        let home = fs::File::open("/proc/thread-self/ns/net").expect("open this thread's netns");
        ip(&["netns", "add", &name]);
        let ns = fs::File::open(format!("/run/netns/{name}")).expect("open the new netns");
        // SAFETY: setns on a namespace fd we hold open; it affects only the
        // calling thread.
        let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            ip(&["netns", "del", &name]);
            panic!("entering netns {name}: {e}");
        }
        // From inside (the child inherits this thread's namespace): `ip -n`
        // would remount /sys, which fails where / is not a mount point
        // (the fresh-check chroot).
        ip(&["link", "set", "lo", "up"]);
        Self { name, home }
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        // SAFETY: as in `enter`, on the fd of the namespace we came from.
        unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) };
        // Processes still inside keep it alive; the name goes now.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Gives the calling test's namespace a host address `cidr` (for example
/// `198.18.0.5/15` or `2001:db8::5/64`) on a veth link whose peer is left
/// unused (these kernels have no dummy links), with the default
/// route of that family through it: a stand-in for a host's real network,
/// reachable only inside the namespace.
pub fn add_host_address(cidr: &str) {
    isolate();
    assert!(current().is_some(), "add_host_address outside a test netns");
    // Not /sys/class/net: sysfs shows the namespace that mounted it.
    let exists = Command::new("ip")
        .args(["link", "show", "host0"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !exists {
        ip(&[
            "link", "add", "host0", "type", "veth", "peer", "name", "host0p",
        ]);
        ip(&["link", "set", "host0p", "up"]);
        ip(&["link", "set", "host0", "up"]);
    }
    let v6 = cidr.contains(':');
    let family = if v6 { "-6" } else { "-4" };
    let mut addr = vec![family, "addr", "add", cidr, "dev", "host0"];
    if v6 {
        // No duplicate address detection: the address is usable at once.
        addr.push("nodad");
    }
    ip(&addr);
    ip(&[family, "route", "add", "default", "dev", "host0"]);
}

/// `program` as a command, run inside the network namespace
/// `/run/netns/NAME` through nsenter when `netns` is given (nsenter execs
/// it, so the child's PID is the program's own), else in the caller's.
pub fn command_in(netns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match netns {
        Some(name) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{name}"))
                .arg("--")
                .arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// A network namespace of the test's own besides its main one (a
/// container's, say), with loopback up; deleted on drop. Enter it with
/// [`Netns::command`].
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = crate::unique(tag);
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        let out = ns
            .command("ip")
            .args(["link", "set", "lo", "up"])
            .output()
            .expect("nsenter (util-linux)");
        assert!(out.status.success(), "lo up in {}: {out:?}", ns.name);
        ns
    }

    /// `program` run inside the namespace, through nsenter (not `ip netns
    /// exec`, which remounts /sys and hides the cgroup and bpffs mounts).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        command_in(Some(&self.name), program)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
