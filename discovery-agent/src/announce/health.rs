//! The announcer's checker tasks, one per instance.
use std::time::Duration;

use rand::Rng as _;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::config::Instance;
use crate::health::{Gate, probe};

/// Checks one instance forever, sending (index, up) on each change.
pub async fn run_checker(
    index: usize,
    inst: Instance,
    http: reqwest::Client,
    tx: mpsc::Sender<(usize, bool)>,
) {
    let check = &inst.check;
    let mut gate = Gate::new(check.rise, check.fall);
    // Spread the first checks of many instances over one interval.
    let jitter = rand::rng().random_range(0..=check.interval.as_millis() as u64 / 4);
    tokio::time::sleep(Duration::from_millis(jitter)).await;
    let mut tick = tokio::time::interval(check.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = probe(check, &http).await;
        if let Err(reason) = &result {
            debug!(service = inst.service, instance = inst.id, %reason, "check failed");
        }
        if let Some(up) = gate.observe(result.is_ok()) {
            match &result {
                Ok(()) => info!(service = inst.service, instance = inst.id, addr = %inst.addr,
                                rise = check.rise, "instance healthy; announcing"),
                Err(reason) => warn!(service = inst.service, instance = inst.id, addr = %inst.addr,
                                     fall = check.fall, %reason, "instance unhealthy; withdrawing"),
            }
            if tx.send((index, up)).await.is_err() {
                return;
            }
        }
    }
}
