//! Project tasks: `cargo xtask bootstrap|build|run|demo|test|bench|dist|fresh-check`.
//!
//! xtask depends on nothing that needs a system tool to build (no protoc, no
//! LLVM, no etcd): on a machine with only rustup's stable toolchain it must
//! compile, so that `bootstrap` can install the rest. The demo and the
//! benchmarks need etcd-client, so they are binaries of the `tests` crate,
//! built and run after the bootstrap.
mod bootstrap;
mod debroot;
mod dist;
mod fresh;

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing to build, run and test (idempotent).
    Bootstrap,
    /// Bootstrap, then build the programs, the agent and the test clients.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Bootstrap, build, and run the agent as root with the given flags,
    /// e.g. `cargo xtask run -- --etcd http://127.0.0.1:2379`.
    Run {
        /// Flags for `discovery-agent run`.
        #[arg(last = true)]
        flags: Vec<String>,
    },
    /// A private etcd, the agent on a child cgroup, backends on 127.0.0.x and
    /// a client being redirected and rebalanced. Cleans up on exit or Ctrl-C.
    Demo {
        /// Three hosts in network namespaces, one cut off and back.
        #[arg(long)]
        hosts: bool,
    },
    /// Benchmarks against direct, nftables DNAT and HAProxy, and the
    /// classic etcd → confd → HAProxy reload pipeline; writes BENCHMARKS.md
    /// and benchmarks.png (as root; not part of the tests).
    Bench {
        /// A short smoke run (one round, fewer changes, smaller sizes).
        #[arg(long)]
        quick: bool,
        /// Only these parts: datapath, wire, control, failover, checks, hosts,
        /// page (a run of some parts writes BENCHMARKS-<parts>.md, not
        /// BENCHMARKS.md).
        parts: Vec<String>,
    },
    /// README's screenshots of the stats page and the fleet map, made in
    /// headless Chromium against a real agent (as root): docs/*.png.
    Screenshots,
    /// Bootstrap, lint, then run unit and integration tests (as root).
    Test {
        /// Extra arguments for `cargo test`, e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Prove the README's commands on a clean Debian 12 root: debootstrap,
    /// rustup's stable toolchain and a clean clone of HEAD, then
    /// `cargo xtask demo` and `bash .ci/run` inside it (as root; slow).
    FreshCheck(fresh::Opts),
    /// Bootstrap, build the release agent and make a Debian package of it
    /// in target/dist/; `--check` installs it into a clean Debian 12 root
    /// and checks it as an operator would (as root).
    Dist(dist::Opts),
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs `cargo test`, passing its output through, and ends with one total
/// line: cargo's own last line belongs to whichever crate ran last (often a
/// doc-test run of 0 tests).
fn test(cmd: &mut Command) -> anyhow::Result<()> {
    use std::io::BufRead as _;
    eprintln!("+ {cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let out = child.stdout.take().context("cargo test stdout")?;
    for line in std::io::BufReader::new(out).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut w = part.split_whitespace().rev();
                let (Some(kind), Some(n)) = (w.next(), w.next()) else {
                    continue;
                };
                let n: u64 = n.parse().unwrap_or(0);
                match kind {
                    "passed" => passed += n,
                    "failed" => failed += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    println!("{passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn need_root(what: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!("{what}: run it as root");
    }
    Ok(())
}

/// Builds the agent (with its programs) and every binary of the tests crate:
/// clients, the demo and the benchmarks.
pub fn build(release: bool) -> anyhow::Result<PathBuf> {
    build_packages(release, &["discovery-agent", "discovery-tests"])
}

/// Builds the binaries of `packages`; returns the directory they are in.
pub fn build_packages(release: bool, packages: &[&str]) -> anyhow::Result<PathBuf> {
    let mut c = cargo();
    c.arg("build");
    for p in packages {
        c.args(["-p", p]);
    }
    c.arg("--bins");
    if release {
        c.arg("--release");
    }
    run(&mut c)?;
    Ok(target_dir().join(if release { "release" } else { "debug" }))
}

fn exec(mut c: Command, what: &str) -> anyhow::Result<()> {
    eprintln!("+ {c:?}");
    Err(c.exec()).with_context(|| format!("starting {what}"))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Bootstrap => bootstrap::bootstrap(),
        Task::Build { release } => {
            bootstrap::bootstrap()?;
            build(release).map(drop)
        }
        Task::Run { flags } => {
            bootstrap::bootstrap()?;
            let bin = build(true)?.join("discovery-agent");
            let mut c = if is_root() {
                Command::new(&bin)
            } else {
                eprintln!("not root: running the agent through sudo");
                let mut c = Command::new("sudo");
                c.arg(&bin);
                c
            };
            c.arg("run").args(flags);
            exec(c, "discovery-agent")
        }
        Task::Demo { hosts } => {
            need_root("the demo attaches BPF programs to a child cgroup")?;
            bootstrap::bootstrap()?;
            let dir = build(false)?;
            let mut demo = Command::new(dir.join("discovery-demo"));
            if hosts {
                demo.arg("--hosts");
            }
            exec(demo, "the demo")
        }
        Task::Bench { quick, parts } => {
            need_root("the benchmarks attach BPF programs to a child cgroup")?;
            bootstrap::bootstrap()?;
            let dir = build(true)?;
            let mut c = Command::new(dir.join("discovery-bench"));
            c.current_dir(root());
            if quick {
                c.arg("--quick");
            }
            c.args(parts);
            exec(c, "the benchmarks")
        }
        Task::Screenshots => {
            need_root("the screenshots attach BPF programs to a child cgroup")?;
            bootstrap::bootstrap()?;
            let dir = build(false)?;
            run(cargo()
                .args(["test", "-p", "discovery-tests", "--test", "page"])
                .args(["--", "--ignored", "--exact", "screenshots"])
                .env("DISCOVERY_AGENT_BIN", dir.join("discovery-agent"))
                .env("DISCOVERY_SCREENSHOTS", root().join("docs")))
        }
        Task::Test { args } => {
            need_root("the integration tests attach BPF programs to child cgroups")?;
            bootstrap::bootstrap()?;
            run(cargo().args(["fmt", "--all", "--", "--check"]))?;
            run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
            // The eBPF crate, linted for the host: alone (the agent's `user`
            // feature would pull std into the common crate), without
            // unwinding, in a target dir of its own so the flags do not
            // rebuild everything else.
            run(cargo()
                .args(["clippy", "-p", "discovery-ebpf", "--", "-D", "warnings"])
                .env("CARGO_TARGET_DIR", root().join("target/clippy-ebpf"))
                .env("RUSTFLAGS", "-C panic=abort"))?;
            let dir = build(false)?;
            // The migration tests' other map layout: the agent with the
            // `layout-test` feature, in a target dir of its own.
            let alt = root().join("target/layout-test");
            run(cargo()
                .args([
                    "build",
                    "-p",
                    "discovery-agent",
                    "--features",
                    "layout-test",
                ])
                .env("CARGO_TARGET_DIR", &alt))?;
            let mut cmd = cargo();
            cmd.arg("test")
                .args(args)
                .env("DISCOVERY_AGENT_BIN", dir.join("discovery-agent"))
                .env("DISCOVERY_AGENT_ALT_BIN", alt.join("debug/discovery-agent"));
            // The eBPF object build.rs just built, for the program-level
            // tests (tests/tests/programs.rs): the newest non-empty
            // build/discovery-agent-*/out/discovery (stub builds leave an
            // empty one).
            let object = std::fs::read_dir(dir.join("build"))?
                .filter_map(Result::ok)
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("discovery-agent-")
                })
                .map(|e| e.path().join("out/discovery"))
                .filter_map(|p| {
                    let m = p.metadata().ok().filter(|m| m.len() > 0)?;
                    Some((m.modified().ok()?, p))
                })
                .max();
            if let Some((_, object)) = object {
                cmd.env("DISCOVERY_EBPF_OBJECT", object);
            }
            test(&mut cmd)
        }
        Task::FreshCheck(opts) => {
            need_root("the fresh-machine check runs debootstrap, mounts and chroot")?;
            fresh::check(&opts)
        }
        Task::Dist(opts) => {
            if opts.check {
                need_root("the package check runs debootstrap, mounts and chroot")?;
            }
            dist::dist(&opts)
        }
    }
}
