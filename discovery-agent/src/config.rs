//! Command line and environment: every flag has an environment variable.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
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
}

#[derive(Debug, Args)]
pub struct PinArgs {
    /// Directory on bpffs holding the pinned maps and links.
    #[arg(long, env = "DISCOVERY_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// etcd endpoints, comma separated.
    #[arg(long, env = "DISCOVERY_ETCD", value_delimiter = ',', default_value = DEFAULT_ETCD)]
    pub etcd: Vec<String>,

    /// Key prefix of the discovery tree in etcd.
    #[arg(long, env = "DISCOVERY_PREFIX", default_value = DEFAULT_PREFIX, value_parser = parse_prefix)]
    pub prefix: String,

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
        assert_eq!(args.etcd, vec![DEFAULT_ETCD.to_owned()]);
        assert_eq!(args.prefix, DEFAULT_PREFIX);
        assert_eq!(args.pin.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
        assert_eq!(args.allowed_frontends, vec!["127.0.0.0/8".parse().unwrap()]);
        assert_eq!(args.max_services, DEFAULT_MAX_SERVICES);
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
