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
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::run;

#[derive(clap::Args)]
pub struct Opts {
    /// Debian mirror for debootstrap and the root's apt sources (default:
    /// the host's, from /etc/apt/sources.list.d/debian.sources).
    #[arg(long)]
    mirror: Option<String>,
    /// Keep the root afterwards (its path is printed).
    #[arg(long)]
    keep: bool,
    /// Only bootstrap inside the root; skip the demo and the tests.
    #[arg(long)]
    bootstrap_only: bool,
}

const TOOLCHAIN: &str = "stable-x86_64-unknown-linux-gnu";
/// What a new machine of this project's kind has besides minbase.
const INCLUDE: &str = "gcc,libc6-dev,git,ca-certificates";
const PATH_IN_ROOT: &str =
    "/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The root, removed on drop unless kept; refuses to remove anything while
/// a mount is still under it.
struct Root {
    dir: PathBuf,
    keep: bool,
}

impl Drop for Root {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("fresh-check: root kept at {}", self.dir.display());
            return;
        }
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let prefix = self.dir.to_string_lossy().into_owned();
        if mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .any(|m| m.starts_with(&prefix))
        {
            eprintln!(
                "fresh-check: something is still mounted under {}: not removing it",
                self.dir.display()
            );
            return;
        }
        let _ = Command::new("rm")
            .args(["-rf", "--one-file-system"])
            .arg(&self.dir)
            .status();
    }
}

/// The host's Debian mirror, from its deb822 sources.
fn host_mirror() -> Option<String> {
    let s = fs::read_to_string("/etc/apt/sources.list.d/debian.sources").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("URIs:"))
        .map(|u| u.split_whitespace().next().unwrap_or("").to_owned())
        .filter(|u| !u.is_empty())
}

fn sources(mirror: &str) -> String {
    let security = mirror.trim_end_matches('/').to_owned() + "-security";
    format!(
        "Types: deb\nURIs: {mirror}\nSuites: bookworm bookworm-updates\nComponents: main\n\
         Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
         Types: deb\nURIs: {security}\nSuites: bookworm-security\nComponents: main\n\
         Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )
}

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

/// Runs `script` as root inside the chroot, in a private mount namespace,
/// teeing its output to the terminal and the log. Returns the lines.
fn in_root(root: &Path, script: &str, log: &mut fs::File) -> anyhow::Result<Vec<String>> {
    let r = root.to_str().context("non-UTF-8 root path")?;
    let setup = format!(
        "set -eu; R='{r}'
mount -t proc proc \"$R/proc\"
mount --rbind /sys \"$R/sys\"
mount -t bpf bpf \"$R/sys/fs/bpf\"
mount --rbind /dev \"$R/dev\"
mount -t tmpfs tmpfs \"$R/run\"
exec chroot \"$R\" /usr/bin/env -i HOME=/root PATH={PATH_IN_ROOT} TERM=dumb CI=true \
  LANG=C.UTF-8 /bin/bash -euc \"$1\""
    );
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "bash", "-c"])
        .arg(&setup)
        .arg("fresh-check")
        .arg(format!("cd /root/discovery && {{ {script} ; }} 2>&1"))
        .stdout(Stdio::piped())
        .spawn()
        .context("starting unshare (util-linux)")?;
    let mut lines = Vec::new();
    for line in BufReader::new(child.stdout.take().context("stdout")?).lines() {
        let line = line?;
        println!("{line}");
        writeln!(log, "{line}")?;
        lines.push(line);
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("`{script}` failed inside the fresh root ({status})");
    }
    Ok(lines)
}

fn mins(d: Duration) -> String {
    format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
}

pub fn check(opts: &Opts) -> anyhow::Result<()> {
    let t0 = Instant::now();
    if Command::new("debootstrap")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("fresh-check: installing debootstrap on the host");
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "debootstrap"])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
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
    let mirror = opts
        .mirror
        .clone()
        .or_else(host_mirror)
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_owned());
    let logp = crate::target_dir().join("fresh-check.log");
    fs::create_dir_all(crate::target_dir())?;
    let mut log = fs::File::create(&logp).with_context(|| logp.display().to_string())?;
    let root = Root {
        dir: PathBuf::from(format!("/var/tmp/discovery-fresh-{}", std::process::id())),
        keep: opts.keep,
    };
    let dir = &root.dir;
    let mut phases: Vec<(String, Duration)> = Vec::new();

    let t = Instant::now();
    eprintln!(
        "fresh-check: debootstrap bookworm into {} from {mirror}",
        dir.display()
    );
    run(Command::new("debootstrap")
        .args([
            "--variant=minbase",
            &format!("--include={INCLUDE}"),
            "bookworm",
        ])
        .arg(dir)
        .arg(&mirror))?;
    fs::remove_file(dir.join("etc/apt/sources.list")).ok();
    fs::write(
        dir.join("etc/apt/sources.list.d/debian.sources"),
        sources(&mirror),
    )?;
    fs::copy("/etc/resolv.conf", dir.join("etc/resolv.conf")).ok();
    // The machine's trust store (a workplace may add its own CAs, as this
    // one's TLS egress does): part of the machine, not of the project.
    let bundle = "etc/ssl/certs/ca-certificates.crt";
    fs::copy(Path::new("/").join(bundle), dir.join(bundle))
        .with_context(|| format!("copying the host's /{bundle} into the root"))?;
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
        let r = in_root(dir, script, &mut log);
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
