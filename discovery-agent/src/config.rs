//! Command line and environment: every flag has an environment variable.
use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::schema::{Policy, Protocol};
use discovery_common::{DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/discovery";
pub const DEFAULT_PREFIX: &str = "/discovery/";
pub const DEFAULT_ETCD: &str = "http://127.0.0.1:2379";
pub const DEFAULT_STATUS_FILE: &str = "/run/discovery/status.json";

pub use crate::util::VERSION;

#[derive(Debug, Parser)]
#[command(
    name = "discovery-agent",
    version = VERSION,
    about = "eBPF transparent service redirector"
)]
pub struct Cli {
    /// Log level or filter (tracing EnvFilter syntax, e.g. `debug` or
    /// `info,discovery_agent::etcd=debug`); RUST_LOG is used when unset.
    #[arg(long, global = true, env = "DISCOVERY_LOG")]
    pub log: Option<String>,
    /// Log lines as text or as JSON objects (one per line, for collectors).
    #[arg(
        long,
        global = true,
        env = "DISCOVERY_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load and attach the programs, then keep the maps in sync with etcd.
    Run(RunArgs),
    /// Detach the programs and remove the pinned maps and links.
    Detach(PinArgs),
    /// Print the kernel counters (summed over CPUs) from the pinned maps.
    Counters(PinArgs),
    /// Show every service, its backends, their state and traffic; works
    /// while the agent is down.
    Status(StatusArgs),
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
        /// TCP connects to a backend fail after this long, e.g. 500ms.
        #[arg(long)]
        connect_timeout: Option<String>,
        /// Established connections with data unacknowledged this long fail.
        #[arg(long)]
        user_timeout: Option<String>,
        /// TCP keepalive on redirected connections: idle time before probing.
        #[arg(long)]
        keepalive_idle: Option<String>,
        /// Time between keepalive probes (needs --keepalive-idle).
        #[arg(long, requires = "keepalive_idle")]
        keepalive_interval: Option<String>,
        /// Unanswered probes before the connection fails (needs
        /// --keepalive-idle).
        #[arg(long, requires = "keepalive_idle")]
        keepalive_probes: Option<u16>,
        /// Route the frontend even on nodes where a socket listens on it
        /// (the step that moves clients off a local HAProxy with no gap).
        #[arg(long)]
        takeover: bool,
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
pub struct StatusFileArgs {
    /// Where the agent records what it applied (names, weights, states,
    /// health) for `status`.
    #[arg(long, env = "DISCOVERY_STATUS_FILE", default_value = DEFAULT_STATUS_FILE)]
    pub status_file: PathBuf,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub pin: PinArgs,
    #[command(flatten)]
    pub status: StatusFileArgs,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Redraw every INTERVAL (e.g. 1s) until interrupted, like `top`.
    #[arg(long, value_name = "INTERVAL", num_args = 0..=1, default_missing_value = "2s",
          value_parser = humantime::parse_duration)]
    pub watch: Option<Duration>,
    /// Instead of the local view: every node and workload that uses
    /// SERVICE, from etcd.
    #[arg(long, value_name = "SERVICE", conflicts_with = "watch")]
    pub consumers: Option<String>,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct RunArgs {
    /// TOML file with any of these flags as keys (`pin_dir = "..."`,
    /// `allowed_frontends = ["127.0.0.0/8"]`, `detach_on_exit = true`);
    /// flags on the command line override it.
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
    /// `127.0.0.0/8:10000-19999`). A service whose frontend is outside them
    /// is rejected, so a bad etcd write cannot hijack traffic to real
    /// hosts. Within them, this node's etcd endpoints and metrics address
    /// are never routed, nor is an address where a socket listens (unless
    /// the service sets "takeover").
    #[arg(
        long,
        env = "DISCOVERY_ALLOWED_FRONTENDS",
        value_delimiter = ',',
        default_value = "127.0.0.0/8"
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

/// Expands `run --config FILE` (or DISCOVERY_CONFIG) into flags placed
/// right after `run`, so every flag can live in the file and the command
/// line still wins (`args_override_self`). Other commands pass through.
pub fn expand_config_file(
    args: Vec<std::ffi::OsString>,
) -> anyhow::Result<Vec<std::ffi::OsString>> {
    expand_config_file_from(
        args,
        std::env::var_os("DISCOVERY_CONFIG").map(PathBuf::from),
    )
}

/// Where the subcommand is: the first argument that is neither a global
/// flag nor its value. (Not the first `run` anywhere: `service put run`
/// names a service.)
fn subcommand_at(args: &[std::ffi::OsString]) -> Option<usize> {
    let mut i = 1;
    while let Some(a) = args.get(i) {
        let a = a.to_string_lossy();
        if a == "--log" || a == "--log-format" {
            i += 2;
        } else if a.starts_with('-') {
            i += 1;
        } else {
            return Some(i);
        }
    }
    None
}

fn expand_config_file_from(
    args: Vec<std::ffi::OsString>,
    env_path: Option<PathBuf>,
) -> anyhow::Result<Vec<std::ffi::OsString>> {
    use anyhow::Context as _;
    let Some(run) = subcommand_at(&args).filter(|&i| args[i] == "run") else {
        return Ok(args);
    };
    let mut path = env_path;
    for (i, a) in args.iter().enumerate().skip(run + 1) {
        let a = a.to_string_lossy();
        if a == "--config" {
            path = args.get(i + 1).map(PathBuf::from);
        } else if let Some(p) = a.strip_prefix("--config=") {
            path = Some(PathBuf::from(p));
        }
    }
    let Some(path) = path else { return Ok(args) };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    let file_args =
        config_file_args(&text).with_context(|| format!("config file {}", path.display()))?;
    let mut out = args[..=run].to_vec();
    out.extend(file_args.into_iter().map(Into::into));
    out.extend(args[run + 1..].iter().cloned());
    Ok(out)
}

/// TOML keys to flags: `max_services = 100` → `--max-services 100`,
/// `true` → the bare flag, arrays → one comma-joined value.
fn config_file_args(text: &str) -> anyhow::Result<Vec<String>> {
    let table: toml::Table = text.parse()?;
    let mut out = Vec::new();
    for (k, v) in table {
        let flag = format!("--{}", k.replace('_', "-"));
        let scalar = |v: &toml::Value| -> anyhow::Result<String> {
            Ok(match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                other => anyhow::bail!(
                    "{k}: expected a string or number, found {}",
                    other.type_str()
                ),
            })
        };
        match &v {
            toml::Value::Boolean(true) => out.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                let items: Vec<String> = items.iter().map(scalar).collect::<anyhow::Result<_>>()?;
                out.extend([flag, items.join(",")]);
            }
            other => out.extend([flag, scalar(other)?]),
        }
    }
    Ok(out)
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
    fn only_the_run_subcommand_gets_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, "max_services = 7\n").unwrap();
        let os = |v: &[&str]| -> Vec<std::ffi::OsString> { v.iter().map(Into::into).collect() };
        // A service called "run" is not the run command.
        let put = os(&[
            "discovery-agent",
            "service",
            "put",
            "run",
            "--frontend",
            "127.0.0.1:1",
        ]);
        assert_eq!(
            expand_config_file_from(put.clone(), Some(file.clone())).unwrap(),
            put
        );
        let run = os(&["discovery-agent", "--log", "debug", "run", "--node", "n"]);
        assert_eq!(
            expand_config_file_from(run, Some(file)).unwrap(),
            os(&[
                "discovery-agent",
                "--log",
                "debug",
                "run",
                "--max-services",
                "7",
                "--node",
                "n"
            ])
        );
    }

    #[test]
    fn config_file_sets_flags_and_the_command_line_wins() {
        let file = "pin_dir = \"/sys/fs/bpf/x\"\nmax_services = 100\n\
                    allowed_frontends = [\"127.0.0.0/8\", \"169.254.0.0/16\"]\n\
                    detach_on_exit = true\nreplace_programs = false\n";
        let args = config_file_args(file).unwrap();
        let mut argv = vec!["discovery-agent".to_owned(), "run".into()];
        argv.extend(args);
        argv.extend(["--max-services".to_owned(), "7".to_owned()]);
        let cli = Cli::try_parse_from(argv).unwrap();
        let Command::Run(a) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(a.pin.pin_dir, PathBuf::from("/sys/fs/bpf/x"));
        assert_eq!(a.max_services, 7, "command line overrides the file");
        assert_eq!(a.allowed_frontends.len(), 2);
        assert!(a.detach_on_exit && !a.replace_programs);
        // A key that is no flag is an error from clap, naming it.
        let mut argv = vec!["discovery-agent".to_owned(), "run".into()];
        argv.extend(config_file_args("max_sevices = 1").unwrap());
        let e = Cli::try_parse_from(argv).unwrap_err().to_string();
        assert!(e.contains("--max-sevices"), "{e}");
        assert!(config_file_args("[etcd]\nx = 1").is_err());
    }

    #[test]
    fn the_contrib_config_file_is_valid() {
        let mut argv = vec!["discovery-agent".to_owned(), "run".into()];
        argv.extend(config_file_args(include_str!("../../contrib/agent.toml")).unwrap());
        let cli = Cli::try_parse_from(argv).unwrap();
        let Command::Run(a) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(a.etcd.endpoints.len(), 3);
        assert_eq!(a.passive_ejection, Duration::from_secs(10));
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
