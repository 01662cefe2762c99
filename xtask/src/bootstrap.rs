//! One idempotent step that installs what building, running and testing
//! need, says why, and does nothing when everything is there.
//!
//! The eBPF programs need a compiler that can build `core` for
//! `bpfel-unknown-none`. A rustup nightly with rust-src is preferred; where
//! there is none (and none can be downloaded), Debian's rustc-web with
//! rust-web-src is linked into rustup as `discovery-bpf` and used with
//! RUSTC_BOOTSTRAP=1 (see discovery-agent/build.rs).
//!
//! Every install is pinned: Debian's packages come from the machine's
//! Debian 12 sources, and bpf-linker is installed at one exact version
//! with its own Cargo.lock (`--locked`), so a new release of one of its
//! dependencies cannot break a fresh machine.
use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

/// Must match discovery-agent/build.rs.
const LINKED_TOOLCHAIN: &str = "discovery-bpf";
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

fn ok(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

fn stdout(cmd: &mut Command) -> Option<String> {
    let o = cmd.output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn deb_installed(pkg: &str) -> bool {
    stdout(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.contains("install ok installed"))
}

/// Whether apt knows a version of `pkg` it could install.
fn deb_candidate(pkg: &str) -> bool {
    stdout(Command::new("apt-cache").args(["policy", pkg])).is_some_and(|s| {
        s.lines()
            .find_map(|l| l.trim().strip_prefix("Candidate:"))
            .is_some_and(|c| c.trim() != "(none)")
    })
}

fn has_rust_src(toolchain: &str) -> bool {
    stdout(Command::new("rustup").args(["run", toolchain, "rustc", "--print", "sysroot"]))
        .is_some_and(|s| {
            Path::new(s.trim())
                .join("lib/rustlib/src/rust/library/core")
                .is_dir()
        })
}

fn bpf_linker_ok() -> bool {
    stdout(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|v| v.contains(&format!(" {BPF_LINKER_VERSION}")))
}

/// Runs one install step; a failure names the step and what to do.
fn step(name: &str, cmd: &mut Command, fix: &str) -> anyhow::Result<()> {
    eprintln!("bootstrap: [{name}] + {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("bootstrap step '{name}': cannot start {cmd:?}. {fix}"))?;
    if !status.success() {
        bail!("bootstrap step '{name}' failed ({status}): {cmd:?}. {fix}");
    }
    Ok(())
}

/// What must be installed, and why.
fn wanted(nightly: bool, linker: bool) -> Vec<(&'static str, &'static str)> {
    let mut want = vec![
        (
            "protobuf-compiler",
            "protoc: etcd-client generates its gRPC code at build time",
        ),
        (
            "libprotobuf-dev",
            "protobuf's well-known types (google/protobuf/*.proto) that etcd's protos import",
        ),
        (
            "etcd-server",
            "etcd: the demo and the integration tests run a private etcd",
        ),
        (
            "etcd-client",
            "etcdctl: tests and the demo write services and backends",
        ),
        ("bpftool", "inspecting attached programs and pinned maps"),
        (
            "nftables",
            "tests drop SYNs to a loopback address to prove connect timeouts",
        ),
        (
            "iproute2",
            "ip: each integration test runs in a network namespace of its own",
        ),
        (
            "openssl",
            "tests make a private CA and certificates for etcd TLS",
        ),
        (
            "haproxy",
            "a test moves a frontend from a live HAProxy to the agent",
        ),
        (
            "chromium",
            "the stats page is tested in a real browser (headless Chromium)",
        ),
        // Debian 12's default JDK itself, not the default-jdk-headless
        // metapackage: the version is pinned, and a machine with the JDK
        // but not the metapackage needs nothing.
        (
            "openjdk-17-jdk-headless",
            "java and javac: dual-stack tests run a JVM client (AF_INET6 sockets)",
        ),
        (
            "python3",
            "dual-stack tests run a Python client on explicit AF_INET6 sockets",
        ),
        (
            "curl",
            "tests redirect a real HTTP client, which tries ::1 and 127.0.0.1 for localhost",
        ),
        (
            "dnsmasq-base",
            "dnsmasq (the binary, no system service): tests redirect DNS to a real server",
        ),
        (
            "bind9-dnsutils",
            "dig: the DNS client of the DNS redirect tests",
        ),
        (
            "prometheus",
            "promtool: tests check and unit-test the alert rules in contrib/prometheus/",
        ),
    ];
    if !nightly {
        for pkg in ["rustc-web", "cargo-web", "rust-web-src"] {
            want.push((
                pkg,
                "no rustup nightly with rust-src: Debian's rustc-web builds core for the eBPF target",
            ));
        }
    }
    if !linker {
        for pkg in [
            "llvm-22-dev",
            "libpolly-22-dev",
            "zlib1g-dev",
            "libzstd-dev",
        ] {
            want.push((pkg, "bpf-linker is built against LLVM 22"));
        }
    }
    want
}

fn install_debs(missing: &[&(&str, &str)]) -> anyhow::Result<()> {
    let names: Vec<&str> = missing.iter().map(|(p, _)| *p).collect();
    if !crate::is_root() {
        bail!("missing Debian packages {names:?}; run `cargo xtask bootstrap` as root");
    }
    for (pkg, why) in missing {
        eprintln!("bootstrap: installing {pkg}: {why}");
    }
    step(
        "apt-get update",
        Command::new("apt-get").args(["update", "-qq"]),
        "Check that /etc/apt/sources.list(.d) names a reachable Debian 12 (bookworm) \
         mirror with bookworm, bookworm-updates and bookworm-security, then run \
         `cargo xtask bootstrap` again.",
    )?;
    let unknown: Vec<&str> = names
        .iter()
        .copied()
        .filter(|p| !deb_candidate(p))
        .collect();
    if !unknown.is_empty() {
        bail!(
            "bootstrap step 'apt-get install': apt has no installable version of {unknown:?}. \
             These come from Debian 12's main archive (LLVM 22 and rustc-web from its \
             point releases): add `bookworm` and `bookworm-updates` to the apt sources, \
             run `apt-get update`, then `cargo xtask bootstrap` again."
        );
    }
    let r = step(
        "apt-get install",
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&names)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt-get's output above names the package that failed; fix that (for example \
         `dpkg --configure -a` after an interrupted install) and run `cargo xtask bootstrap` \
         again.",
    );
    let still: Vec<&str> = names
        .iter()
        .copied()
        .filter(|p| !deb_installed(p))
        .collect();
    match r {
        Err(e) if !still.is_empty() => Err(e.context(format!("still not installed: {still:?}"))),
        r => r,
    }
}

pub fn bootstrap() -> anyhow::Result<()> {
    let nightly = has_rust_src("nightly");
    let linker = bpf_linker_ok();
    let want = wanted(nightly, linker);
    let missing: Vec<&(&str, &str)> = want.iter().filter(|(p, _)| !deb_installed(p)).collect();
    if !missing.is_empty() {
        install_debs(&missing)?;
    }
    if !linker {
        eprintln!(
            "bootstrap: installing bpf-linker {BPF_LINKER_VERSION} (links the eBPF object; \
             built against LLVM 22, takes a few minutes)"
        );
        step(
            "bpf-linker",
            Command::new("cargo")
                .args(["install", "--locked", "bpf-linker"])
                .args(["--version", &format!("={BPF_LINKER_VERSION}")])
                .args(["--no-default-features", "--features", "llvm-22"])
                .env("LLVM_PREFIX", LLVM_PREFIX),
            "cargo's output above says why. It needs crates.io and llvm-22-dev \
             (LLVM_PREFIX=/usr/lib/llvm-22); after fixing, run `cargo xtask bootstrap` again.",
        )?;
    }
    if !nightly && !has_rust_src(LINKED_TOOLCHAIN) {
        if !Path::new("/usr/lib/rustlib/src/rust/library/core").is_dir() {
            bail!(
                "bootstrap step 'eBPF toolchain': rust-web-src is installed but \
                 /usr/lib/rustlib/src/rust/library/core is missing; reinstall it with \
                 `apt-get install --reinstall rust-web-src`"
            );
        }
        eprintln!(
            "bootstrap: linking Debian's rustc-web into rustup as '{LINKED_TOOLCHAIN}' (builds the eBPF programs)"
        );
        step(
            "eBPF toolchain",
            Command::new("rustup").args(["toolchain", "link", LINKED_TOOLCHAIN, "/usr"]),
            "rustup must be on PATH (~/.cargo/bin) and ~/.rustup writable.",
        )?;
    }
    for (component, check) in [("rustfmt", "fmt"), ("clippy", "clippy")] {
        if !ok(Command::new("cargo").args([check, "--version"])) {
            eprintln!("bootstrap: adding rustup component {component} (lint step of the tests)");
            step(
                component,
                Command::new("rustup").args(["component", "add", component]),
                "rustup could not add it: install the stable toolchain with its default \
                 profile (rustfmt and clippy included).",
            )?;
        }
    }
    let which = if nightly { "nightly" } else { LINKED_TOOLCHAIN };
    let v = stdout(Command::new("rustup").args(["run", which, "rustc", "--version"]))
        .with_context(|| format!("the eBPF toolchain '{which}' does not run"))?;
    eprintln!("bootstrap: ready (eBPF toolchain: {which}, {})", v.trim());
    Ok(())
}

/// Whether `tool` is an executable on PATH.
pub fn on_path(tool: &str) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| {
            d.join(tool)
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// A host tool a task needs, from the Debian package `pkg`: installed when
/// missing (as root), else an error naming the tool and the package.
pub fn ensure_tool(tool: &str, pkg: &str, why: &str) -> anyhow::Result<()> {
    if on_path(tool) {
        return Ok(());
    }
    if !crate::is_root() {
        bail!("{tool} is missing ({why}): install it with `apt-get install {pkg}` as root");
    }
    eprintln!("bootstrap: installing {pkg}: {why}");
    step(
        &format!("apt-get install {pkg}"),
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", pkg])
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt-get's output above says why; `apt-get update` first if its lists are old.",
    )?;
    if !on_path(tool) {
        bail!("{pkg} is installed but {tool} is still not on PATH");
    }
    Ok(())
}
