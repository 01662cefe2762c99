//! Command line and environment: every flag has an environment variable.
use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    announce::config::{RawCheck, RawInstance},
    model::{Policy, Protocol},
};
use discovery_common::{DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES};
use ipnet::Ipv4Net;

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/discovery";
pub const DEFAULT_PREFIX: &str = "/discovery/";
pub const DEFAULT_ETCD: &str = "http://127.0.0.1:2379";

#[derive(Debug, Parser)]
#[command(
    name = "discovery-agent",
    version,
    about = "eBPF transparent service redirector"
)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax); RUST_LOG is used when unset.
    #[arg(long, global = true, env = "DISCOVERY_LOG")]
    pub log: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load and attach the programs, then keep the maps in sync with etcd.
    Run(RunArgs),
    /// Detach the programs and remove the pinned maps and links.
    Detach(PinArgs),
    /// Print the kernel counters (summed over CPUs) from the pinned maps.
    Counters(PinArgs),
    /// Register local instances in etcd while their health checks pass.
    Announce(AnnounceArgs),
    /// Define or remove a service (its frontend) in etcd.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Take a backend out of rotation on every node, or put it back.
    #[command(subcommand)]
    Backend(BackendCommand),
}

#[derive(Debug, Subcommand)]
pub enum BackendCommand {
    /// Maintenance: no new connections to this instance, whatever its
    /// announcer says, until `enable`.
    Disable {
        service: String,
        instance: String,
        /// Recorded in etcd for whoever looks next.
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// End maintenance.
    Enable {
        service: String,
        instance: String,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

#[derive(Debug, Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma separated.
    #[arg(long = "etcd", env = "DISCOVERY_ETCD", value_delimiter = ',', default_value = DEFAULT_ETCD)]
    pub endpoints: Vec<String>,

    /// Key prefix of the discovery tree in etcd.
    #[arg(long, env = "DISCOVERY_PREFIX", default_value = DEFAULT_PREFIX, value_parser = parse_prefix)]
    pub prefix: String,

    /// CA certificate (PEM) that signed the etcd servers' certificates;
    /// needed for https:// endpoints.
    #[arg(long, env = "DISCOVERY_ETCD_CA_FILE")]
    pub etcd_ca_file: Option<PathBuf>,

    /// Client certificate (PEM) for etcd's --client-cert-auth.
    #[arg(long, env = "DISCOVERY_ETCD_CERT_FILE", requires = "etcd_key_file")]
    pub etcd_cert_file: Option<PathBuf>,

    /// Key (PEM) of the client certificate.
    #[arg(long, env = "DISCOVERY_ETCD_KEY_FILE", requires = "etcd_cert_file")]
    pub etcd_key_file: Option<PathBuf>,

    /// etcd user, for etcd's password authentication.
    #[arg(long, env = "DISCOVERY_ETCD_USER", requires = "etcd_password_file")]
    pub etcd_user: Option<String>,

    /// File holding the etcd user's password (kept out of the command line).
    #[arg(long, env = "DISCOVERY_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
}

impl EtcdArgs {
    /// Reads the certificate and password files now, so a wrong path is a
    /// clear error at start rather than an endless retry.
    pub fn config(&self) -> anyhow::Result<crate::etcd::EtcdConfig> {
        use anyhow::Context as _;
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p).with_context(|| format!("reading {what} {}", p.display()))
        };
        let https = self.endpoints.iter().any(|e| e.starts_with("https://"));
        let ca = self
            .etcd_ca_file
            .as_ref()
            .map(|p| read(p, "--etcd-ca-file"))
            .transpose()?;
        if https && ca.is_none() {
            anyhow::bail!("https:// etcd endpoints need --etcd-ca-file");
        }
        if !https && (ca.is_some() || self.etcd_cert_file.is_some()) {
            anyhow::bail!("TLS files given but the etcd endpoints are not https://");
        }
        let identity = match (&self.etcd_cert_file, &self.etcd_key_file) {
            (Some(c), Some(k)) => Some((read(c, "--etcd-cert-file")?, read(k, "--etcd-key-file")?)),
            _ => None,
        };
        let user = match (&self.etcd_user, &self.etcd_password_file) {
            (Some(u), Some(p)) => {
                let pw = String::from_utf8(read(p, "--etcd-password-file")?)
                    .context("--etcd-password-file is not UTF-8")?;
                Some((u.clone(), pw.trim_end_matches(['\n', '\r']).to_owned()))
            }
            _ => None,
        };
        Ok(crate::etcd::EtcdConfig {
            endpoints: self.endpoints.clone(),
            ca,
            identity,
            user,
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Write <prefix>services/NAME.
    Put {
        name: String,
        /// Loopback address clients connect to, e.g. 127.0.0.1:11211.
        #[arg(long)]
        frontend: String,
        #[arg(long, value_enum, default_value = "tcp")]
        protocol: Protocol,
        /// How backends are chosen: random (weighted), consistent (sticky
        /// per client cgroup) or least-conn (fewer live connections).
        #[arg(long, value_enum, default_value = "random")]
        policy: Policy,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Delete <prefix>services/NAME.
    Rm {
        name: String,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

#[derive(Debug, Args)]
pub struct AnnounceArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,

    /// TOML file listing instances and their checks (instead of --service
    /// and --addr).
    #[arg(long, env = "DISCOVERY_ANNOUNCE_CONFIG", conflicts_with_all = ["service", "addr"])]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub instance: InstanceArgs,

    /// Lease TTL (whole seconds); kept alive at a third of it.
    #[arg(long, env = "DISCOVERY_LEASE_TTL", default_value = "10s", value_parser = parse_ttl)]
    pub ttl: Duration,

    /// How long instances stay at weight 0 before they are deleted.
    #[arg(long, env = "DISCOVERY_DRAIN_PERIOD", default_value = "5s", value_parser = humantime::parse_duration)]
    pub drain_period: Duration,

    /// Drain the instances (weight 0, wait, delete) and exit.
    #[arg(long)]
    pub drain: bool,
}

/// One instance from flags.
#[derive(Debug, Args)]
pub struct InstanceArgs {
    /// Service name.
    #[arg(long, required_unless_present = "config", requires = "addr")]
    pub service: Option<String>,
    /// Instance address (ip:port) clients are sent to.
    #[arg(long, requires = "service")]
    pub addr: Option<String>,
    /// Instance id (default <hostname>-<port>).
    #[arg(long, conflicts_with = "config")]
    pub id: Option<String>,
    /// Weight (default 1).
    #[arg(long, conflicts_with = "config")]
    pub weight: Option<u32>,
    /// Check type: tcp (default), http, command or none.
    #[arg(long, conflicts_with = "config")]
    pub check: Option<String>,
    /// Address to check (default: --addr).
    #[arg(long, conflicts_with = "config")]
    pub check_target: Option<String>,
    /// HTTP check path (default /).
    #[arg(long, conflicts_with = "config")]
    pub check_path: Option<String>,
    /// Command for the command check (run by sh -c; exit 0 is healthy).
    #[arg(long, conflicts_with = "config")]
    pub check_command: Option<String>,
    /// Time between checks (default 500ms).
    #[arg(long, conflicts_with = "config", value_parser = humantime::parse_duration)]
    pub interval: Option<Duration>,
    /// Check timeout (default 300ms).
    #[arg(long, conflicts_with = "config", value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// Consecutive passes to come in (default 2).
    #[arg(long, conflicts_with = "config")]
    pub rise: Option<u32>,
    /// Consecutive failures to go out (default 3).
    #[arg(long, conflicts_with = "config")]
    pub fall: Option<u32>,
}

impl InstanceArgs {
    pub fn raw(&self) -> anyhow::Result<RawInstance> {
        let (Some(service), Some(addr)) = (&self.service, &self.addr) else {
            anyhow::bail!("--service and --addr are required without --config");
        };
        Ok(RawInstance {
            service: service.clone(),
            addr: addr.clone(),
            id: self.id.clone(),
            weight: self.weight,
            check: RawCheck {
                kind: self.check.clone(),
                target: self.check_target.clone(),
                path: self.check_path.clone(),
                command: self.check_command.clone(),
                interval: self.interval,
                timeout: self.timeout,
                rise: self.rise,
                fall: self.fall,
            },
        })
    }
}

/// Where to serve metrics, if at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<std::net::SocketAddr>);

fn parse_metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    if s == "off" {
        return Ok(MetricsAddr(None));
    }
    s.parse()
        .map(|a| MetricsAddr(Some(a)))
        .map_err(|_| format!("{s:?} is not ip:port or \"off\""))
}

/// etcd leases have whole-second TTLs.
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(1) || d.subsec_nanos() != 0 {
        return Err(format!(
            "lease TTL {s:?} must be whole seconds, at least 1s"
        ));
    }
    Ok(d)
}

#[derive(Debug, Args)]
pub struct PinArgs {
    /// Directory on bpffs holding the pinned maps and links.
    #[arg(long, env = "DISCOVERY_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,

    /// cgroup v2 directory the programs attach to (default: the cgroup v2
    /// root, found in /proc/mounts). Processes in it and below are redirected.
    #[arg(long, env = "DISCOVERY_CGROUP")]
    pub cgroup: Option<PathBuf>,

    #[command(flatten)]
    pub pin: PinArgs,

    /// Frontend address ranges services may claim, comma separated. A
    /// service whose frontend is outside them is rejected, so a bad etcd
    /// write cannot hijack traffic to real hosts.
    #[arg(
        long,
        env = "DISCOVERY_ALLOWED_FRONTENDS",
        value_delimiter = ',',
        default_value = "127.0.0.0/8"
    )]
    pub allowed_frontends: Vec<Ipv4Net>,

    /// Size of the services map (frontend+protocol entries).
    #[arg(long, env = "DISCOVERY_MAX_SERVICES", default_value_t = DEFAULT_MAX_SERVICES,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_services: u32,

    /// Size of the backends map (distinct backend addresses); the slots map
    /// (service/backend pairs) gets this plus room for one update in flight.
    #[arg(long, env = "DISCOVERY_MAX_BACKENDS", default_value_t = DEFAULT_MAX_BACKENDS,
          value_parser = clap::value_parser!(u32).range(2..))]
    pub max_backends: u32,

    /// Replace the attached programs with this build's even when they are
    /// identical (drills of the upgrade path). Programs that differ are
    /// always replaced, atomically.
    #[arg(long, env = "DISCOVERY_REPLACE_PROGRAMS")]
    pub replace_programs: bool,

    /// Passive checks: take a backend out on this node after this many
    /// consecutive failed connects (refused, timed out); 0 turns them off.
    #[arg(long, env = "DISCOVERY_PASSIVE_FAILURES", default_value_t = 3)]
    pub passive_failures: u32,

    /// How long a passively ejected backend stays out before it is tried
    /// again.
    #[arg(long, env = "DISCOVERY_PASSIVE_EJECTION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub passive_ejection: Duration,

    /// Address of the Prometheus endpoint (/metrics), or "off".
    #[arg(long, env = "DISCOVERY_METRICS_ADDR", default_value = "127.0.0.1:9464", value_parser = parse_metrics_addr)]
    pub metrics_addr: MetricsAddr,

    /// On SIGTERM/SIGINT also detach the programs and remove the pins. By
    /// default they stay, so traffic keeps flowing while the agent is down.
    #[arg(long, env = "DISCOVERY_DETACH_ON_EXIT")]
    pub detach_on_exit: bool,
}

/// A prefix is an absolute etcd key path ending in '/'; the slash is added
/// if missing so `/discovery` and `/discovery/` mean the same tree.
fn parse_prefix(s: &str) -> Result<String, String> {
    if !s.starts_with('/') {
        return Err(format!("prefix {s:?} must start with '/'"));
    }
    if s.contains("//") || s.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(format!("prefix {s:?} has an empty, '.' or '..' segment"));
    }
    Ok(if s.ends_with('/') {
        s.to_owned()
    } else {
        format!("{s}/")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_normalised_and_checked() {
        assert_eq!(parse_prefix("/discovery").unwrap(), "/discovery/");
        assert_eq!(parse_prefix("/a/b/").unwrap(), "/a/b/");
        assert!(parse_prefix("discovery/").is_err());
        assert!(parse_prefix("/a//b/").is_err());
        assert!(parse_prefix("/a/../b/").is_err());
    }

    #[test]
    fn flags_parse_with_defaults() {
        let cli = Cli::try_parse_from(["discovery-agent", "run"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(args.etcd.endpoints, vec![DEFAULT_ETCD.to_owned()]);
        assert_eq!(args.etcd.prefix, DEFAULT_PREFIX);
        assert_eq!(args.pin.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
        assert_eq!(args.allowed_frontends, vec!["127.0.0.0/8".parse().unwrap()]);
        assert_eq!(args.max_services, DEFAULT_MAX_SERVICES);
        assert_eq!(
            args.metrics_addr,
            MetricsAddr(Some("127.0.0.1:9464".parse().unwrap()))
        );
        let cli = Cli::try_parse_from(["discovery-agent", "run", "--metrics-addr", "off"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(args.metrics_addr, MetricsAddr(None));
    }

    #[test]
    fn announce_flags() {
        let cli = Cli::try_parse_from([
            "discovery-agent",
            "announce",
            "--service",
            "mc",
            "--addr",
            "127.0.0.2:11211",
            "--check",
            "http",
            "--interval",
            "1s",
            "--ttl",
            "3s",
        ])
        .unwrap();
        let Command::Announce(a) = cli.command else {
            panic!("expected announce")
        };
        assert_eq!(a.ttl, Duration::from_secs(3));
        let raw = a.instance.raw().unwrap();
        assert_eq!(raw.check.kind.as_deref(), Some("http"));
        assert_eq!(raw.check.interval, Some(Duration::from_secs(1)));
        for bad in [
            vec!["discovery-agent", "announce"],
            vec!["discovery-agent", "announce", "--service", "mc"],
            vec![
                "discovery-agent",
                "announce",
                "--config",
                "x.toml",
                "--service",
                "mc",
                "--addr",
                "1.2.3.4:5",
            ],
            vec![
                "discovery-agent",
                "announce",
                "--service",
                "mc",
                "--addr",
                "1.2.3.4:5",
                "--ttl",
                "500ms",
            ],
        ] {
            assert!(Cli::try_parse_from(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bad_flags_are_rejected_by_name() {
        let err = Cli::try_parse_from(["discovery-agent", "run", "--allowed-frontends", "nope"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--allowed-frontends"), "{err}");
        let err = Cli::try_parse_from(["discovery-agent", "run", "--max-services", "0"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--max-services"), "{err}");
    }
}
