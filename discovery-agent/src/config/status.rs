//! Flags of `status`: the local table view or, with `--consumers`, etcd's.
use std::time::Duration;

use clap::Args;

use super::{EtcdArgs, PinArgs, StatusFileArgs};

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

/// `map`: the fleet's dependency graph.
#[derive(Debug, clap::Args)]
pub struct MapArgs {
    #[command(flatten)]
    pub etcd: super::EtcdArgs,
    /// svg (laid out here) or dot (for graphviz).
    #[arg(long, value_enum, default_value = "svg")]
    pub format: MapFormat,
    /// Write here instead of to stdout.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Only this service, its callers and backends.
    #[arg(long)]
    pub service: Option<String>,
    /// Only the workloads of this node and what they call.
    #[arg(long)]
    pub node: Option<String>,
    /// With more backends than this on the map (after --node), each
    /// service's backends are drawn as one node with their count; a map of
    /// one service (--service) shows each.
    #[arg(long, value_name = "N", default_value_t = crate::fleet::COLLAPSE_ABOVE)]
    pub collapse_above: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MapFormat {
    Svg,
    Dot,
}
