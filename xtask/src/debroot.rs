//! A clean Debian 12 root made by debootstrap, and scripts run as root
//! inside it: what `fresh-check` and `dist --check` stand on.
//!
//! Each script runs in a private mount namespace chrooted into the root,
//! with /proc, /dev and an empty /run mounted (and, for [`Mounts::Kernel`],
//! /sys with the host's cgroup v2 and a private bpffs). The mounts end with
//! the namespace, whichever way the script exits, so nothing is left
//! mounted on the host; the root is removed on drop unless kept.
use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::run;

#[derive(clap::Args)]
pub struct RootOpts {
    /// Debian mirror for debootstrap and the root's apt sources (default:
    /// the host's, from /etc/apt/sources.list.d/debian.sources).
    #[arg(long)]
    pub mirror: Option<String>,
    /// Keep the root afterwards (its path is printed).
    #[arg(long)]
    pub keep: bool,
}

const PATH_IN_ROOT: &str =
    "/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The root, removed on drop unless kept; refuses to remove anything while
/// a mount is still under it.
pub struct Root {
    pub dir: PathBuf,
    keep: bool,
    task: &'static str,
}

impl Drop for Root {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("{}: root kept at {}", self.task, self.dir.display());
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
                "{}: something is still mounted under {}: not removing it",
                self.task,
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

/// Debootstraps bookworm (minbase plus `include`, comma separated) into
/// /var/tmp/discovery-<task>-<pid>, with the mirror in its apt sources, the
/// host's resolv.conf and the machine's trust store. `task` names the
/// caller in messages.
pub fn create(opts: &RootOpts, task: &'static str, include: &str) -> anyhow::Result<Root> {
    crate::bootstrap::ensure_tool(
        "debootstrap",
        "debootstrap",
        "it makes the clean Debian root",
    )?;
    let mirror = opts
        .mirror
        .clone()
        .or_else(host_mirror)
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_owned());
    let root = Root {
        dir: PathBuf::from(format!("/var/tmp/discovery-{task}-{}", std::process::id())),
        keep: opts.keep,
        task,
    };
    let dir = &root.dir;
    eprintln!(
        "{task}: debootstrap bookworm (minbase, {include}) into {} from {mirror}",
        dir.display()
    );
    run(Command::new("debootstrap")
        .args([
            "--variant=minbase",
            &format!("--include={include}"),
            "bookworm",
        ])
        .arg(dir)
        .arg(&mirror))?;
    fs::remove_file(dir.join("etc/apt/sources.list")).ok();
    let list = dir.join("etc/apt/sources.list.d/debian.sources");
    fs::write(&list, sources(&mirror)).with_context(|| format!("writing {}", list.display()))?;
    fs::copy("/etc/resolv.conf", dir.join("etc/resolv.conf")).ok();
    // The machine's trust store (a workplace may add its own CAs, as this
    // one's TLS egress does): part of the machine, not of the project.
    let bundle = "etc/ssl/certs/ca-certificates.crt";
    if dir.join("etc/ssl/certs").is_dir() {
        fs::copy(Path::new("/").join(bundle), dir.join(bundle))
            .with_context(|| format!("copying the host's /{bundle} into the root"))?;
    }
    Ok(root)
}

/// What a script inside the root sees besides the root itself.
#[derive(Clone, Copy)]
pub enum Mounts {
    /// /proc, /dev and an empty /run: enough for dpkg, apt, man and
    /// systemctl's offline verbs.
    Basic,
    /// Also /sys, with the host's cgroup v2, and a private bpffs: the same
    /// kernel and child cgroups as the tests on the host.
    Kernel,
}

/// Runs `script` with bash as root inside the chroot, in a private mount
/// namespace, teeing its output (stdout and stderr) to the terminal and
/// `log`. Returns the lines; an error names `what`.
pub fn run_in(
    root: &Root,
    mounts: Mounts,
    what: &str,
    script: &str,
    log: &mut fs::File,
) -> anyhow::Result<Vec<String>> {
    let r = root.dir.to_str().context("non-UTF-8 root path")?;
    let sys = match mounts {
        Mounts::Basic => "",
        Mounts::Kernel => "mount --rbind /sys \"$R/sys\"\nmount -t bpf bpf \"$R/sys/fs/bpf\"\n",
    };
    let setup = format!(
        "set -eu; R='{r}'
mount -t proc proc \"$R/proc\"
{sys}mount --rbind /dev \"$R/dev\"
mount -t tmpfs tmpfs \"$R/run\"
exec chroot \"$R\" /usr/bin/env -i HOME=/root PATH={PATH_IN_ROOT} TERM=dumb \
  LANG=C.UTF-8 /bin/bash -euc \"$1\""
    );
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "bash", "-c"])
        .arg(&setup)
        .arg(root.task)
        .arg(format!("{{ {script} ; }} 2>&1"))
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
        bail!("{what} failed inside the clean root {} ({status})", r);
    }
    Ok(lines)
}
