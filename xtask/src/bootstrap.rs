//! One idempotent step that installs what building, running and testing
//! need, says why, and does nothing when everything is there.
//!
//! The eBPF programs need a compiler that can build `core` for
//! `bpfel-unknown-none`. A rustup nightly with rust-src is preferred; where
//! there is none (and none can be downloaded), Debian's rustc-web with
//! rust-web-src is linked into rustup as `discovery-bpf` and used with
//! RUSTC_BOOTSTRAP=1 (see discovery-agent/build.rs).
use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::run;

/// Must match discovery-agent/build.rs.
const LINKED_TOOLCHAIN: &str = "discovery-bpf";
const BPF_LINKER_VERSION: &str = "0.13";
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
        .is_some_and(|v| v.contains(&format!(" {BPF_LINKER_VERSION}.")))
}

pub fn bootstrap() -> anyhow::Result<()> {
    let nightly = has_rust_src("nightly");
    let linker = bpf_linker_ok();
    let mut want: Vec<(&str, &str)> = vec![
        (
            "protobuf-compiler",
            "protoc: etcd-client generates its gRPC code at build time",
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
            want.push((pkg, "bpf-linker 0.13 is built against LLVM 22"));
        }
    }
    let missing: Vec<&(&str, &str)> = want.iter().filter(|(p, _)| !deb_installed(p)).collect();
    if !missing.is_empty() {
        if !crate::is_root() {
            bail!(
                "missing packages {:?}; run `cargo xtask bootstrap` as root",
                missing.iter().map(|(p, _)| *p).collect::<Vec<_>>()
            );
        }
        for (pkg, why) in &missing {
            eprintln!("bootstrap: installing {pkg}: {why}");
        }
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(missing.iter().map(|(p, _)| *p))
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if !linker {
        eprintln!(
            "bootstrap: installing bpf-linker {BPF_LINKER_VERSION} (links the eBPF object; built against LLVM 22, takes a few minutes)"
        );
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                &format!("^{BPF_LINKER_VERSION}"),
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX))?;
    }
    if !nightly && !has_rust_src(LINKED_TOOLCHAIN) {
        if !Path::new("/usr/lib/rustlib/src/rust/library/core").is_dir() {
            bail!(
                "rust-web-src is installed but /usr/lib/rustlib/src/rust/library/core is missing"
            );
        }
        eprintln!(
            "bootstrap: linking Debian's rustc-web into rustup as '{LINKED_TOOLCHAIN}' (builds the eBPF programs)"
        );
        run(Command::new("rustup").args(["toolchain", "link", LINKED_TOOLCHAIN, "/usr"]))?;
    }
    for (component, check) in [("rustfmt", "fmt"), ("clippy", "clippy")] {
        if !ok(Command::new("cargo").args([check, "--version"])) {
            eprintln!("bootstrap: adding rustup component {component} (lint step of the tests)");
            run(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    let which = if nightly { "nightly" } else { LINKED_TOOLCHAIN };
    let v = stdout(Command::new("rustup").args(["run", which, "rustc", "--version"]))
        .context("eBPF toolchain does not run")?;
    eprintln!("bootstrap: ready (eBPF toolchain: {which}, {})", v.trim());
    Ok(())
}
