//! Flags of the etcd admin commands: `service put|rm` and
//! `backend disable|enable`.
use clap::Subcommand;

use super::EtcdArgs;
use crate::schema::{Policy, Protocol};

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

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Write <prefix>services/NAME.
    Put {
        name: String,
        /// Loopback address clients connect to, e.g. 127.0.0.1:11211 or
        /// [::1]:11211; repeat it (up to 4) for one service on several,
        /// e.g. both, so `localhost:11211` works whichever a client's
        /// resolver returns first.
        #[arg(long, required = true)]
        frontend: Vec<String>,
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
        /// Reset redirected TCP connections to a backend when it leaves or
        /// is ejected (HAProxy's on-marked-down shutdown-sessions).
        #[arg(long)]
        shutdown_sessions: bool,
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
