//! `cargo xtask fresh-check`: the README's commands on a machine that has
//! nothing but Debian 12 and rustup's stable toolchain.
//!
//! A clean root from debootstrap (minbase plus what this project's machine
//! image ships: gcc, git, ca-certificates), the host's rustup stable
//! toolchain copied in (nothing else from ~/.cargo or ~/.rustup), and a
//! clean clone of HEAD. Each phase runs in a private mount namespace chrooted
//! into the root, with /proc, /sys (with the host's cgroup v2), /dev and a
//! private bpffs mounted: the same kernel, child cgroups and loopback as the
//! tests on the host. The mounts end with the namespace; the root is removed
//! afterwards unless `--keep`.
use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    debroot::{self, Mounts},
    run,
};

#[derive(clap::Args)]
pub struct Opts {
    #[command(flatten)]
    root: debroot::RootOpts,
    /// Only bootstrap inside the root; skip the demo and the tests.
    #[arg(long)]
    bootstrap_only: bool,
}

const TOOLCHAIN: &str = "stable-x86_64-unknown-linux-gnu";
/// What a new machine of this project's kind has besides minbase.
const INCLUDE: &str = "gcc,libc6-dev,git,ca-certificates";

/// rustup, its proxies and the stable toolchain: what rustup's installer
/// leaves on a new machine.
fn copy_rustup(root: &Path) -> anyhow::Result<()> {
    let home = PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?);
    let src = home.join(".rustup/toolchains").join(TOOLCHAIN);
    if !src.is_dir() {
        bail!(
            "{} is missing: the fresh-machine check copies rustup's stable toolchain from the host",
            src.display()
        );
    }
    let dst = root.join("root/.rustup/toolchains");
    fs::create_dir_all(&dst)?;
    run(Command::new("cp").arg("-a").arg(&src).arg(&dst))?;
    fs::write(
        root.join("root/.rustup/settings.toml"),
        format!("version = \"12\"\ndefault_toolchain = \"{TOOLCHAIN}\"\nprofile = \"default\"\n"),
    )?;
    let bin = home.join(".cargo/bin");
    let rustup = fs::metadata(bin.join("rustup")).context("~/.cargo/bin/rustup")?;
    let out = root.join("root/.cargo/bin");
    fs::create_dir_all(&out)?;
    // The proxies are links to rustup (symbolic or hard); anything else
    // there (bpf-linker, cargo-installed tools) is what a fresh machine lacks.
    for e in fs::read_dir(&bin)? {
        let e = e?;
        let to = out.join(e.file_name());
        if e.file_type()?.is_symlink() {
            let target = fs::read_link(e.path())?;
            if target.file_name() == Some("rustup".as_ref()) {
                std::os::unix::fs::symlink(&target, &to)?;
            }
        } else if e.metadata()?.ino() == rustup.ino() {
            fs::copy(e.path(), &to)?;
        }
    }
    Ok(())
}

fn mins(d: Duration) -> String {
    format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
}

pub fn check(opts: &Opts) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .current_dir(crate::root())
        .output()
        .is_ok_and(|o| !o.stdout.is_empty());
    if dirty {
        eprintln!(
            "fresh-check: warning: uncommitted changes are not part of the check (it clones HEAD)"
        );
    }
    let logp = crate::target_dir().join("fresh-check.log");
    fs::create_dir_all(crate::target_dir())?;
    let mut log = fs::File::create(&logp).with_context(|| logp.display().to_string())?;
    let mut phases: Vec<(String, Duration)> = Vec::new();

    let t = Instant::now();
    let root = debroot::create(&opts.root, "fresh-check", INCLUDE)?;
    let dir = &root.dir;
    phases.push((
        "debootstrap (Debian 12 minbase, gcc, git)".into(),
        t.elapsed(),
    ));

    let t = Instant::now();
    copy_rustup(dir)?;
    run(Command::new("git")
        .args(["clone", "--quiet", "--no-local"])
        .arg(crate::root())
        .arg(dir.join("root/discovery")))?;
    phases.push((
        "rustup stable and a clean clone of HEAD".into(),
        t.elapsed(),
    ));

    let mut all = Vec::new();
    let mut scripts = vec![("cargo xtask bootstrap", "cargo xtask bootstrap")];
    if !opts.bootstrap_only {
        scripts.push(("cargo xtask demo", "cargo xtask demo"));
        scripts.push(("bash .ci/run", "bash .ci/run"));
    }
    for (name, script) in scripts {
        let t = Instant::now();
        eprintln!("fresh-check: running `{script}` in the fresh root");
        let r = debroot::run_in(
            &root,
            Mounts::Kernel,
            &format!("`{script}`"),
            &format!("export CI=true; cd /root/discovery && {script}"),
            &mut log,
        );
        phases.push((name.to_owned(), t.elapsed()));
        match r {
            Ok(lines) => all.extend(lines),
            Err(e) => {
                report(&phases, &all, t0.elapsed(), &logp);
                return Err(e);
            }
        }
    }
    report(&phases, &all, t0.elapsed(), &logp);
    Ok(())
}

fn report(phases: &[(String, Duration)], lines: &[String], total: Duration, log: &Path) {
    println!("\n== fresh-check summary ==");
    for (name, d) in phases {
        println!("  {:>7}  {name}", mins(*d));
    }
    println!("  {:>7}  in all", mins(total));
    println!("install steps seen:");
    for l in lines.iter().filter(|l| {
        l.starts_with("bootstrap: installing")
            || l.starts_with("bootstrap: linking")
            || l.starts_with("bootstrap: adding")
            || l.starts_with("bootstrap: ready")
    }) {
        println!("  {l}");
    }
    if let Some(total) = lines
        .iter()
        .rev()
        .find(|l| l.ends_with(" failed") && l.contains(" passed, "))
    {
        println!("tests: {total}");
    }
    println!("full log: {}", log.display());
}
