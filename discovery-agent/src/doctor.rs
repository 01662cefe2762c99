//! `discovery-agent doctor`: checks on this node everything `run` needs,
//! with the same flags and config file, and says for each check what is
//! wrong and what to do. Exits non-zero when a check fails.
use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Serialize;

use crate::{config::DoctorArgs, loader, migrate, schema};

/// The kernel these programs need: cgroup sock_addr hooks for v4 and v6
/// with bpf links, sock_ops, socket storage, BTF, bpf_set_retval (5.18).
const MIN_KERNEL: (u32, u32) = (5, 18);

/// The attach types the agent uses.
const ATTACH_TYPES: &str = "cgroup/connect4, connect6, sendmsg4, sendmsg6, recvmsg4, recvmsg6, \
                            getpeername4, getpeername6, sock_ops";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    /// Works, with a limit the operator should know.
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub check: &'static str,
    pub verdict: Verdict,
    pub detail: String,
    /// What to do, for warn and fail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn ok(check: &'static str, detail: impl Into<String>) -> Check {
    Check {
        check,
        verdict: Verdict::Ok,
        detail: detail.into(),
        fix: None,
    }
}

fn bad(
    check: &'static str,
    verdict: Verdict,
    detail: impl Into<String>,
    fix: impl Into<String>,
) -> Check {
    Check {
        check,
        verdict,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

fn kernel() -> Check {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let v = (
        parts.next().and_then(|p| p.parse().ok()).unwrap_or(0),
        parts.next().and_then(|p| p.parse().ok()).unwrap_or(0),
    );
    if v >= MIN_KERNEL {
        ok(
            "kernel",
            format!("Linux {release}; attach types used: {ATTACH_TYPES}"),
        )
    } else {
        bad(
            "kernel",
            Verdict::Fail,
            format!(
                "Linux {release} is older than {}.{}",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
            format!(
                "the programs need Linux {}.{} or newer ({ATTACH_TYPES})",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
        )
    }
}

fn cgroup(args: &DoctorArgs) -> Check {
    let root = match loader::cgroup2_root() {
        Ok(r) => r,
        Err(e) => {
            return bad(
                "cgroup v2",
                Verdict::Fail,
                format!("{e:#}"),
                "mount the unified hierarchy (cgroup2) or boot with systemd.unified_cgroup_hierarchy=1",
            );
        }
    };
    let target = args.run.cgroup.clone().unwrap_or_else(|| root.clone());
    match fs::metadata(&target) {
        Ok(m) if m.is_dir() => ok(
            "cgroup v2",
            format!(
                "mounted at {}; programs go on {}",
                root.display(),
                target.display()
            ),
        ),
        _ => bad(
            "cgroup v2",
            Verdict::Fail,
            format!("--cgroup {} does not exist", target.display()),
            "create the cgroup or point --cgroup at the workloads' cgroup",
        ),
    }
}

fn bpffs(pin_dir: &Path) -> Check {
    let parent = pin_dir.parent().unwrap_or(Path::new("/"));
    match nix::sys::statfs::statfs(parent) {
        Ok(s) if s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC => {
            ok("bpffs", format!("{} is on a bpffs", parent.display()))
        }
        _ if parent == Path::new(loader::DEFAULT_BPFFS) => ok(
            "bpffs",
            format!("not mounted at {}; `run` mounts it", loader::DEFAULT_BPFFS),
        ),
        _ => bad(
            "bpffs",
            Verdict::Fail,
            format!("{} is not on a bpf filesystem", parent.display()),
            format!(
                "use a --pin-dir under a bpffs mount such as {}",
                loader::DEFAULT_BPFFS
            ),
        ),
    }
}

fn btf() -> Check {
    let p = "/sys/kernel/btf/vmlinux";
    if Path::new(p).exists() {
        ok("BTF", format!("{p} present"))
    } else {
        bad(
            "BTF",
            Verdict::Fail,
            format!("{p} missing"),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (socket storage maps need BTF)",
        )
    }
}

fn kernel_options() -> Vec<Check> {
    let Some(config) = loader::kernel_config() else {
        return vec![bad(
            "kernel config",
            Verdict::Warn,
            "neither /proc/config.gz nor /boot/config-<release> is readable",
            "install the kernel's config (or load the configs module) so CONFIG_HZ and \
             CONFIG_INET_DIAG_DESTROY can be checked",
        )];
    };
    let destroy = match loader::kernel_option(&config, "CONFIG_INET_DIAG_DESTROY").as_deref() {
        Some("y") => ok(
            "sock_diag destroy",
            "CONFIG_INET_DIAG_DESTROY=y: re-steering works",
        ),
        _ => bad(
            "sock_diag destroy",
            Verdict::Warn,
            "CONFIG_INET_DIAG_DESTROY is not set",
            "connected UDP sockets (and shutdown_sessions TCP connections) of a backend that \
             leaves are not re-steered; use a kernel with CONFIG_INET_DIAG_DESTROY=y",
        ),
    };
    let hz = match loader::kernel_option(&config, "CONFIG_HZ") {
        Some(hz) => ok(
            "CONFIG_HZ",
            format!("{hz}: connect timeouts under 3 s get a shorter SYN retransmission"),
        ),
        None => bad(
            "CONFIG_HZ",
            Verdict::Warn,
            "not in the kernel config",
            "connect timeouts under 3 s keep the kernel's 1 s initial SYN retransmission",
        ),
    };
    vec![destroy, hz]
}

fn privileges() -> Check {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return ok("privileges", "running as root");
    }
    // CAP_NET_ADMIN 12, CAP_SYS_ADMIN 21, CAP_BPF 39 in CapEff.
    let caps = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        })
        .unwrap_or(0);
    let has = |bit: u32| caps & (1 << bit) != 0;
    if has(21) || (has(39) && has(12)) {
        ok("privileges", format!("capabilities {caps:#x}"))
    } else {
        bad(
            "privileges",
            Verdict::Fail,
            format!("not root, capabilities {caps:#x}"),
            "run as root, or with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN (attaching to a cgroup and \
             mounting bpffs)",
        )
    }
}

fn pinned_state(args: &DoctorArgs) -> Vec<Check> {
    let pin_dir = &args.run.pin.pin_dir;
    if !pin_dir.join(discovery_common::names::SERVICES).exists() {
        return vec![ok(
            "pinned state",
            format!(
                "nothing pinned under {}: `run` creates it",
                pin_dir.display()
            ),
        )];
    }
    let sizes = loader::Sizes {
        max_services: args.run.max_services,
        max_backends: args.run.max_backends,
    };
    let want = |spec: &discovery_common::MapSpec| match spec.size {
        discovery_common::MapSize::Fixed(n) => n,
        s => s.entries(sizes.max_services, sizes.max_backends),
    };
    let mut out = Vec::new();
    match migrate::plan(pin_dir, want) {
        Ok(plan) => {
            let moved: Vec<&str> = plan
                .iter()
                .filter(|(_, s)| *s != migrate::Step::Keep)
                .map(|(n, _)| *n)
                .collect();
            out.push(if moved.is_empty() {
                ok(
                    "map layout",
                    "the pinned maps have this build's layout and sizes",
                )
            } else {
                bad(
                    "map layout",
                    Verdict::Warn,
                    format!("maps of another layout or size: {}", moved.join(", ")),
                    "`run` migrates them with no gap at its next start",
                )
            });
        }
        Err(e) => out.push(bad(
            "map layout",
            Verdict::Fail,
            format!("{e:#}"),
            "this build cannot take over the pinned maps",
        )),
    }
    let cgroup = args
        .run
        .cgroup
        .clone()
        .or_else(|| loader::cgroup2_root().ok())
        .unwrap_or_else(|| PathBuf::from("/"));
    let want_id = fs::metadata(&cgroup).map(|m| m.ino()).ok();
    let mut wrong = Vec::new();
    let mut missing = Vec::new();
    for (_, link) in discovery_common::names::PROGRAMS
        .iter()
        .chain([&discovery_common::names::SOCKOPS])
    {
        let path = pin_dir.join(link);
        match loader::pinned_link_cgroup(&path) {
            Ok(id) if id.is_some() && id == want_id => {}
            Ok(_) => wrong.push(*link),
            Err(_) => missing.push(*link),
        }
    }
    out.push(match (wrong.is_empty(), missing.is_empty()) {
        (true, true) => ok(
            "programs attached",
            format!("every link is attached to {}", cgroup.display()),
        ),
        _ => bad(
            "programs attached",
            Verdict::Fail,
            format!(
                "links on another cgroup: [{}]; links missing: [{}]",
                wrong.join(", "),
                missing.join(", ")
            ),
            format!(
                "`run` attaches missing links; links on another cgroup need `discovery-agent detach \
                 --pin-dir {}` or another --pin-dir",
                pin_dir.display()
            ),
        ),
    });
    out
}

async fn etcd(args: &DoctorArgs) -> Vec<Check> {
    let cfg = match args.run.etcd.config() {
        Ok(c) => c,
        Err(e) => {
            return vec![bad(
                "etcd",
                Verdict::Fail,
                format!("{e:#}"),
                "fix the --etcd-* flags or the files they name",
            )];
        }
    };
    let tls = cfg.endpoints.iter().any(|e| e.starts_with("https://"));
    let auth = cfg.user.as_ref().map(|(u, _)| u.clone());
    let endpoints = cfg.endpoints.join(",");
    let connect = tokio::time::timeout(Duration::from_secs(5), crate::etcd::connect(&cfg)).await;
    let mut client = match connect {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return vec![bad(
                "etcd",
                Verdict::Fail,
                format!("cannot connect to {endpoints}: {e}"),
                "check the endpoints, TLS material and credentials, and that etcd runs",
            )];
        }
        Err(_) => {
            return vec![bad(
                "etcd",
                Verdict::Fail,
                format!("no answer from {endpoints} within 5 s"),
                "check the endpoints and the network",
            )];
        }
    };
    let prefix = args.run.etcd.prefix.clone();
    let services = format!("{prefix}services/");
    let got = client
        .get(
            services.as_str(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await;
    let resp = match got {
        Ok(r) => r,
        Err(e) => {
            return vec![bad(
                "etcd",
                Verdict::Fail,
                format!("connected to {endpoints}, but reading {services} failed: {e}"),
                "the user needs read access to the prefix (see README, etcd RBAC)",
            )];
        }
    };
    let mut out = vec![ok(
        "etcd",
        format!(
            "{endpoints}: revision {}, TLS {}, auth {}",
            resp.header().map_or(0, |h| h.revision()),
            if tls { "on" } else { "off" },
            auth.map_or("off".to_owned(), |u| format!("as {u}"))
        ),
    )];
    let mut refused = Vec::new();
    let mut invalid = 0;
    for kv in resp.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        match schema::parse_service(kv.value(), &args.run.allowed_frontends, 0) {
            Ok(_) => {}
            Err(schema::Invalid::FrontendNotAllowed(f, _)) => refused.push(format!("{key} ({f})")),
            Err(_) => invalid += 1,
        }
    }
    let allowed = args
        .run
        .allowed_frontends
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",");
    out.push(if refused.is_empty() {
        ok(
            "services",
            format!(
                "{} services under {services}, every frontend within --allowed-frontends {allowed}{}",
                resp.kvs().len(),
                if invalid > 0 { format!(" ({invalid} invalid: see `status`)") } else { String::new() }
            ),
        )
    } else {
        bad(
            "services",
            Verdict::Fail,
            format!("outside --allowed-frontends {allowed}: {}", refused.join(", ")),
            "move those frontends into the allowed ranges, or widen --allowed-frontends",
        )
    });
    out
}

/// Runs every check; prints them (or JSON); fails if any failed.
pub async fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let mut checks = vec![kernel(), cgroup(&args), bpffs(&args.run.pin.pin_dir), btf()];
    checks.extend(kernel_options());
    checks.push(privileges());
    checks.extend(pinned_state(&args));
    checks.extend(etcd(&args).await);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            let tag = match c.verdict {
                Verdict::Ok => "ok  ",
                Verdict::Warn => "warn",
                Verdict::Fail => "FAIL",
            };
            println!("{tag}  {:<18} {}", c.check, c.detail);
            if let Some(fix) = &c.fix {
                println!("      {:<18} -> {fix}", "");
            }
        }
    }
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| c.verdict == Verdict::Fail)
        .map(|c| c.check)
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{} check(s) failed: {}", failed.len(), failed.join(", "))
    }
}
