//! Flags of `run` (the agent itself), and the pin dir and status file flags
//! other commands share with it.
use std::{path::PathBuf, time::Duration};

use clap::Args;

use super::EtcdArgs;
use discovery_common::{DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/discovery";
pub const DEFAULT_STATUS_FILE: &str = "/run/discovery/status.json";

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

#[derive(Debug, Args)]
pub struct PinArgs {
    /// Directory on bpffs holding the pinned maps and links.
    #[arg(long, env = "DISCOVERY_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct StatusFileArgs {
    /// Where the agent records what it applied (names, weights, states,
    /// health) for `status`.
    #[arg(long, env = "DISCOVERY_STATUS_FILE", default_value = DEFAULT_STATUS_FILE)]
    pub status_file: PathBuf,
}

/// `doctor`: the flags of `run`, checked rather than run.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Print the checks as a JSON array.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct RunArgs {
    /// TOML file with any of these flags as keys (`pin_dir = "..."`,
    /// `allowed_frontends = ["127.0.0.0/8"]`, `detach_on_exit = true`);
    /// flags on the command line and environment variables override it.
    #[arg(long, env = "DISCOVERY_CONFIG")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub etcd: EtcdArgs,

    /// cgroup v2 directory the programs attach to (default: the cgroup v2
    /// root, found in /proc/mounts). Processes in it and below are redirected.
    #[arg(long, env = "DISCOVERY_CGROUP")]
    pub cgroup: Option<PathBuf>,

    #[command(flatten)]
    pub pin: PinArgs,

    /// Frontends services may claim, comma separated: networks, addresses
    /// and port ranges (`127.0.0.0/8`, `127.0.0.1:11211-11299`,
    /// `127.0.0.0/8:10000-19999`; IPv6 `::1/128`, `[::1]:11211`,
    /// `[fd00::/8]:10000-19999`). A service whose frontend is outside them
    /// is rejected, so a bad etcd write cannot hijack traffic to real
    /// hosts. Within them, this node's etcd endpoints and metrics address
    /// are never routed, nor is an address where a socket listens (unless
    /// the service sets "takeover").
    #[arg(
        long,
        env = "DISCOVERY_ALLOWED_FRONTENDS",
        value_delimiter = ',',
        default_value = "127.0.0.0/8,::1/128"
    )]
    pub allowed_frontends: Vec<crate::guard::AllowedFrontend>,

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

    /// Who ejects: `kernel` (the sock_ops program, on the failing connect
    /// itself) or `agent` (on its next poll of the kernel's counts).
    #[arg(long, env = "DISCOVERY_PASSIVE_EJECTOR", value_enum, default_value_t = crate::checks::Ejection::Kernel)]
    pub passive_ejector: crate::checks::Ejection,

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

    #[command(flatten)]
    pub status: StatusFileArgs,

    /// This node's name in etcd (consumers); default: the hostname.
    #[arg(long, env = "DISCOVERY_NODE")]
    pub node: Option<String>,

    /// How often this node's consumers (which workloads use which
    /// services) are published to etcd, if they changed; 0s turns it off.
    #[arg(long, env = "DISCOVERY_CONSUMERS_INTERVAL", default_value = "30s",
          value_parser = humantime::parse_duration)]
    pub consumers_interval: Duration,
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::super::{
        Cli, Command,
        etcd::{DEFAULT_ETCD, DEFAULT_PREFIX},
    };
    use super::*;

    #[test]
    fn flags_parse_with_defaults() {
        let cli = Cli::try_parse_from(["discovery-agent", "run"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(args.etcd.endpoints, vec![DEFAULT_ETCD.to_owned()]);
        assert_eq!(args.etcd.prefix, DEFAULT_PREFIX);
        assert_eq!(args.pin.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
        assert_eq!(
            args.allowed_frontends,
            vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()]
        );
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
