//! The one lease keeper: a connection to etcd holding a lease, kept alive
//! at a third of its TTL by a task that reports the first sign of loss
//! (keepalive error, an unanswered keepalive, the stream closing, or etcd
//! answering TTL 0, i.e. expired). The announcer and the consumers
//! publisher both write under a [`LeaseSession`]; neither runs its own
//! keepalive loop.
use std::time::Duration;

use anyhow::Context as _;
use etcd_client::{Client, PutOptions};
use tokio::{
    sync::oneshot,
    task::JoinHandle,
    time::{sleep, timeout},
};

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
        let keepalive = tokio::spawn(async move {
            let reason = loop {
                sleep(period).await;
                if let Err(e) = keeper.keep_alive().await {
                    break format!("keepalive of lease {lease:x}: {e}");
                }
                match timeout(period.max(Duration::from_secs(1)), stream.message()).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => continue,
                    Ok(Ok(Some(_))) => break format!("lease {lease:x} expired"),
                    Ok(Ok(None)) => break format!("keepalive stream of lease {lease:x} closed"),
                    Ok(Err(e)) => break format!("keepalive of lease {lease:x}: {e}"),
                    Err(_) => break format!("keepalive of lease {lease:x} not answered"),
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
