//! Small things every layer may use: the build's version, the clock, the
//! node's name.
use std::time::{SystemTime, UNIX_EPOCH};

/// Crate version, git commit and the embedded programs' content hash.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("DISCOVERY_GIT"),
    ", programs ",
    env!("DISCOVERY_PROGRAMS_ID"),
    ")"
);

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// This node's name: the hostname.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}
