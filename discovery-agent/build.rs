//! Builds the eBPF programs from source on every build and leaves the object
//! in OUT_DIR, where `src/loader.rs` embeds it.
//!
//! The programs need a toolchain that can build `core` for
//! `bpfel-unknown-none`: a rustup nightly with rust-src when there is one,
//! else the toolchain `cargo xtask bootstrap` links as `discovery-bpf`
//! (Debian's rustc-web and rust-web-src, used with RUSTC_BOOTSTRAP=1).
//! Without either it builds a stub (see `stub`), so checking and linting
//! the agent need no eBPF toolchain.
use std::{env, path::PathBuf, process::Command};

use anyhow::Context as _;
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

/// Where the eBPF crate lives, from cargo metadata (as aya-template does).
fn ebpf_root() -> anyhow::Result<String> {
    let meta = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let pkg = meta
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "discovery-ebpf")
        .context("the discovery-ebpf package is not in the workspace")?;
    let dir = pkg
        .manifest_path
        .parent()
        .context("discovery-ebpf's manifest has no directory")?;
    Ok(dir.to_string())
}

/// The eBPF object's path in OUT_DIR, the name `src/loader.rs` embeds.
fn object_path() -> anyhow::Result<PathBuf> {
    Ok(PathBuf::from(env::var("OUT_DIR").context("OUT_DIR")?).join("discovery"))
}

/// No eBPF toolchain (or AYA_BUILD_SKIP=1): leave an empty object so that
/// `cargo check`, clippy and the unit tests work on any machine. The agent
/// refuses to load it with an error that says how to build the real one.
fn stub(why: &str) -> anyhow::Result<()> {
    println!(
        "cargo:warning=discovery-agent is built WITHOUT its eBPF programs ({why}); \
         it can be checked and linted but not run. Run `cargo xtask bootstrap` and rebuild."
    );
    std::fs::write(object_path()?, b"").context("writing the stub eBPF object")?;
    version_info()
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=DISCOVERY_EBPF_TOOLCHAIN");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        return stub("AYA_BUILD_SKIP is set");
    }
    let toolchain = match env::var("DISCOVERY_EBPF_TOOLCHAIN") {
        Ok(t) => t,
        Err(_) if has_rust_src("nightly") => "nightly".to_owned(),
        Err(_) if has_rust_src(LINKED_TOOLCHAIN) => LINKED_TOOLCHAIN.to_owned(),
        Err(_) => {
            return stub(&format!(
                "no rustup nightly with rust-src and no '{LINKED_TOOLCHAIN}' toolchain"
            ));
        }
    };
    if toolchain != "nightly" {
        // A stable-channel compiler needs this for -Z build-std=core.
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    }
    let ebpf_dir = ebpf_root()?;
    // The programs share the agent's map layout.
    let features: &[&str] = if env::var_os("CARGO_FEATURE_LAYOUT_TEST").is_some() {
        &["layout-test"]
    } else {
        &[]
    };
    aya_build::build_ebpf(
        [Package {
            name: "discovery-ebpf",
            root_dir: &ebpf_dir,
            features,
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )?;
    version_info()
}

/// `--version` and `status` name the exact build: the git commit and a
/// content hash of the embedded eBPF object (the "programs id").
fn version_info() -> anyhow::Result<()> {
    let object = std::fs::read(object_path()?).context("reading the eBPF object")?;
    // FNV-1a 64: enough to tell builds apart, no dependency.
    let id = object.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    println!("cargo:rustc-env=DISCOVERY_PROGRAMS_ID={id:016x}");
    let git = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .is_some_and(|o| o.status.success() && !o.stdout.is_empty());
    let suffix = if dirty { "-dirty" } else { "" };
    println!("cargo:rustc-env=DISCOVERY_GIT={git}{suffix}");
    // Re-run when the checked-out commit moves.
    if let Ok(head) = Command::new("git")
        .args(["rev-parse", "--git-path", "HEAD"])
        .output()
    {
        println!(
            "cargo:rerun-if-changed={}",
            String::from_utf8_lossy(&head.stdout).trim()
        );
    }
    if let Ok(r) = Command::new("git")
        .args(["symbolic-ref", "-q", "HEAD"])
        .output()
        && r.status.success()
        && let Ok(p) = Command::new("git")
            .args([
                "rev-parse",
                "--git-path",
                String::from_utf8_lossy(&r.stdout).trim(),
            ])
            .output()
    {
        println!(
            "cargo:rerun-if-changed={}",
            String::from_utf8_lossy(&p.stdout).trim()
        );
    }
    Ok(())
}
