//! Flags of `announce`: lease and drain settings, and one instance given on
//! the command line (the instance file itself is the announcer's `config`).
use std::{path::PathBuf, time::Duration};

use clap::Args;

use super::{EtcdArgs, PinArgs};

#[derive(Debug, Args)]
pub struct AnnounceArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,

    /// The agent's pin dir: the announcer adds itself to its exemption map
    /// so its own connections are never redirected.
    #[command(flatten)]
    pub pin: PinArgs,

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
    /// Instance address clients are sent to: ip:port, or [ipv6]:port;
    /// 0.0.0.0:port or [::]:port for this host's own address (the source
    /// toward an etcd endpoint off loopback, else of the default route).
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

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser as _};

    use super::super::{Cli, Command};
    use super::*;

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
        let raw = crate::announce::config::RawInstance::from_args(&a.instance).unwrap();
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

    /// Every variable contrib/announce.env sets (or shows commented out) is
    /// one `announce` reads.
    #[test]
    fn the_contrib_announce_env_names_announce_variables() {
        let cmd = Cli::command();
        let announce = cmd.find_subcommand("announce").unwrap();
        let known: Vec<String> = announce
            .get_arguments()
            .filter_map(|a| a.get_env())
            .map(|e| e.to_string_lossy().into_owned())
            .collect();
        let mut seen = 0;
        for line in include_str!("../../../contrib/announce.env").lines() {
            let line = line.trim_start_matches("# ");
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            if !key.starts_with("DISCOVERY_") || key.contains(' ') {
                continue;
            }
            assert!(
                known.iter().any(|k| k == key),
                "{key} is not read by announce"
            );
            assert!(!value.is_empty() && !value.contains(' '), "{line}");
            seen += 1;
        }
        assert!(seen >= 6, "{seen} variables");
    }
}
