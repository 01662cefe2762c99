//! The one lease keeper: a connection to etcd holding a lease, kept alive
//! at a third of its TTL by a task that reports the loss once it is real:
//! etcd answering TTL 0 (expired), or no keepalive answered until the
//! lease's TTL ran out. Until then it keeps retrying, on a fresh stream. The announcer and the consumers
//! publisher both write under a [`LeaseSession`]; neither runs its own
//! keepalive loop.
use std::time::Duration;

use anyhow::Context as _;
use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper, PutOptions};
use tokio::{
    sync::oneshot,
    task::JoinHandle,
    time::{Instant, sleep, timeout},
};

/// How soon a keepalive that went unanswered is tried again.
const RETRY: Duration = Duration::from_millis(500);

/// One keepalive: the TTL etcd says is left (0: the lease is gone).
async fn renew(
    keeper: &mut LeaseKeeper,
    stream: &mut LeaseKeepAliveStream,
    wait: Duration,
) -> Result<i64, String> {
    keeper.keep_alive().await.map_err(|e| e.to_string())?;
    match timeout(wait.max(Duration::from_secs(1)), stream.message()).await {
        Ok(Ok(Some(r))) => Ok(r.ttl()),
        Ok(Ok(None)) => Err("the keepalive stream closed".to_owned()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("not answered".to_owned()),
    }
}

use crate::etcd::{EtcdConfig, connect};

/// A connection to etcd with a lease and its keepalive task. Dropping it
/// stops the keepalive (the lease then expires after its TTL); [`revoke`]
/// ends it at once.
///
/// [`revoke`]: LeaseSession::revoke
pub struct LeaseSession {
    client: Client,
    lease: i64,
    /// Fires (with a reason) when the lease or the keepalive stream is lost.
    lost: oneshot::Receiver<String>,
    keepalive: JoinHandle<()>,
}

impl Drop for LeaseSession {
    fn drop(&mut self) {
        self.keepalive.abort();
    }
}

impl LeaseSession {
    /// Connects, grants a lease of `ttl` (whole seconds, at least 1) and
    /// starts keeping it alive.
    pub async fn open(etcd: &EtcdConfig, ttl: Duration) -> anyhow::Result<Self> {
        let ttl = Duration::from_secs(ttl.as_secs().max(1));
        let mut client = connect(etcd).await.context("connecting to etcd")?;
        let lease = client
            .lease_grant(ttl.as_secs() as i64, None)
            .await
            .context("granting a lease")?
            .id();
        let (mut keeper, mut stream) = client
            .lease_keep_alive(lease)
            .await
            .with_context(|| format!("starting keepalive of lease {lease:x}"))?;
        let (lost_tx, lost) = oneshot::channel();
        let period = ttl / 3;
        let mut again = client.clone();
        let keepalive = tokio::spawn(async move {
            // The lease lives until etcd says it ended or its TTL is over
            // with no keepalive answered: a member that lost its leader for
            // a moment (an election, a partition healing) is no reason to
            // give up a lease that is still valid, and with it every key
            // under it.
            let mut expires = Instant::now() + ttl;
            let mut wait = period;
            let reason = loop {
                sleep(wait).await;
                match renew(&mut keeper, &mut stream, period).await {
                    Ok(left) if left > 0 => {
                        expires = Instant::now() + Duration::from_secs(left as u64);
                        wait = period;
                    }
                    Ok(_) => break format!("lease {lease:x} expired"),
                    Err(e) if Instant::now() >= expires => {
                        break format!("keepalive of lease {lease:x}: {e}; its TTL is over");
                    }
                    Err(_) => {
                        // Try again soon, on a fresh stream (the old one
                        // may be dead with its connection).
                        if let Ok((k, st)) = again.lease_keep_alive(lease).await {
                            (keeper, stream) = (k, st);
                        }
                        wait = RETRY.min(period);
                    }
                }
            };
            let _ = lost_tx.send(reason);
        });
        Ok(Self {
            client,
            lease,
            lost,
            keepalive,
        })
    }

    pub fn id(&self) -> i64 {
        self.lease
    }

    /// The connection, for writes under [`put_options`](Self::put_options).
    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    /// Options that attach a put to this lease.
    pub fn put_options(&self) -> PutOptions {
        PutOptions::new().with_lease(self.lease)
    }

    /// Resolves with the reason once the lease is lost.
    pub async fn lost(&mut self) -> String {
        (&mut self.lost)
            .await
            .unwrap_or_else(|_| format!("keepalive task of lease {:x} ended", self.lease))
    }

    /// The reason, if the lease has been lost by now.
    pub fn check_lost(&mut self) -> Option<String> {
        match self.lost.try_recv() {
            Ok(reason) => Some(reason),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => {
                Some(format!("keepalive task of lease {:x} ended", self.lease))
            }
        }
    }

    /// Best effort: lets etcd drop the lease (and every key under it) now
    /// instead of after the TTL.
    pub async fn revoke(mut self) {
        let _ = self.client.lease_revoke(self.lease).await;
    }
}
