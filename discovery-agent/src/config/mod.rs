//! Command line and environment: the top-level `Cli`, its global flags and
//! the command list; every flag has an environment variable.
mod admin;
mod announce;
mod etcd;
mod file;
mod run;
mod status;

use clap::{Parser, Subcommand};

pub use self::{
    admin::{BackendCommand, ServiceCommand},
    announce::{AnnounceArgs, InstanceArgs},
    etcd::EtcdArgs,
    file::{ArgsError, CONFIG_ENV, parse_args},
    run::{DoctorArgs, MetricsAddr, PinArgs, RunArgs, StatusFileArgs},
    status::{MapArgs, MapFormat, StatusArgs},
};
use crate::util::VERSION;

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
    /// Check this node for everything `run` needs (same flags and config
    /// file): kernel, cgroup, bpffs, BTF, privileges, pinned state, etcd,
    /// services. Exits non-zero when a check fails.
    Doctor(DoctorArgs),
    /// Draw who talks to whom across the fleet (workloads → services →
    /// backends, from etcd) as SVG or DOT.
    Map(MapArgs),
    /// Define or remove a service (its frontend) in etcd.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Take a backend out of rotation on every node, or put it back.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Write the man pages and shell completions into DIR (for packages:
    /// `cargo xtask dist` runs it).
    #[command(hide = true)]
    GenerateAssets(AssetsArgs),
}

#[derive(Debug, clap::Args)]
pub struct AssetsArgs {
    /// Directory to write man/man1/*.1 and completions/{bash,zsh,fish}/
    /// into; created if missing.
    pub dir: std::path::PathBuf,
}
