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

/// Seconds since boot, suspend included (CLOCK_BOOTTIME): the clock of the
/// programs' `bpf_ktime_get_boot_ns`.
pub fn boot_secs() -> u32 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map_or(0, |t| u32::try_from(t.tv_sec()).unwrap_or(u32::MAX))
}
