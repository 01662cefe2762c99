//! Builds the eBPF programs from source on every build and leaves the object
//! in OUT_DIR, where `src/loader.rs` embeds it.
//!
//! The programs need a toolchain that can build `core` for
//! `bpfel-unknown-none`: a rustup nightly with rust-src when there is one,
//! else the toolchain `cargo xtask bootstrap` links as `discovery-bpf`
//! (Debian's rustc-web and rust-web-src, used with RUSTC_BOOTSTRAP=1).
use std::{env, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use aya_build::{Package, Toolchain};

/// Name under which the bootstrap links Debian's rustc-web into rustup.
const LINKED_TOOLCHAIN: &str = "discovery-bpf";

fn has_rust_src(toolchain: &str) -> bool {
    let Ok(out) = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--print", "sysroot"])
        .output()
    else {
        return false;
    };
    out.status.success()
        && PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
            .join("lib/rustlib/src/rust/library/core")
            .is_dir()
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=DISCOVERY_EBPF_TOOLCHAIN");
    let toolchain = match env::var("DISCOVERY_EBPF_TOOLCHAIN") {
        Ok(t) => t,
        Err(_) if has_rust_src("nightly") => "nightly".to_owned(),
        Err(_) if has_rust_src(LINKED_TOOLCHAIN) => LINKED_TOOLCHAIN.to_owned(),
        Err(_) => bail!(
            "no toolchain can build the eBPF programs: need a rustup nightly with rust-src \
             or the '{LINKED_TOOLCHAIN}' toolchain; run `cargo xtask bootstrap`"
        ),
    };
    if toolchain != "nightly" {
        // A stable-channel compiler needs this for -Z build-std=core.
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    }
    let manifest_dir = env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = PathBuf::from(manifest_dir).join("../discovery-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [Package {
            name: "discovery-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
}
