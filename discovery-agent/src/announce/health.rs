//! The announcer's checker tasks, one per instance.
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::config::Instance;
use crate::health::watch;

/// Checks one instance forever, sending (index, up) on each change.
pub async fn run_checker(
    index: usize,
    inst: Instance,
    http: reqwest::Client,
    tx: mpsc::Sender<(usize, bool)>,
) {
    let check = &inst.check;
    // Spread the first checks of many instances over a quarter interval.
    watch(check, &http, None, check.interval / 4, |up, failure| {
        match &failure {
            None => info!(service = inst.service, instance = inst.id, addr = %inst.addr,
                          rise = check.rise, "instance healthy; announcing"),
            Some(reason) => warn!(service = inst.service, instance = inst.id, addr = %inst.addr,
                                  fall = check.fall, %reason, "instance unhealthy; withdrawing"),
        }
        let tx = tx.clone();
        async move { tx.send((index, up)).await.is_ok() }
    })
    .await;
}
