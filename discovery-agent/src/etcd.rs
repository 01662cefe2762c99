//! The etcd source: reads the whole prefix at one revision, then watches
//! from the next one. Any loss (stream error, cancel, compaction, member
//! without leader) ends in a fresh list, so deletes made meanwhile are seen.
//! It never gives up: it retries with capped, jittered backoff.
use std::time::Duration;

use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, TlsOptions, WatchOptions,
};
use rand::Rng as _;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// How to reach etcd: endpoints, TLS material and credentials, read once
/// at start.
#[derive(Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    /// CA certificate (PEM) for https:// endpoints.
    pub ca: Option<Vec<u8>>,
    /// Client certificate and key (PEM).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// User and password.
    pub user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdConfig {
    // Never print the password or key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.ca.is_some())
            .field("client_cert", &self.identity.is_some())
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish()
    }
}

/// Connects with the options every part of discovery uses.
pub async fn connect(cfg: &EtcdConfig) -> Result<Client, etcd_client::Error> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(10))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
        // A member cut off from the quorum must fail requests and watches,
        // not go silent.
        .with_require_leader(true);
    if let Some(ca) = &cfg.ca {
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
        if let Some((cert, key)) = &cfg.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        opts = opts.with_tls(tls);
    }
    if let Some((user, password)) = &cfg.user {
        opts = opts
            .with_user(user.as_str(), password.as_str())
            .with_auto_token_refresh(true);
    }
    Client::connect(&cfg.endpoints, Some(opts)).await
}

/// Capped exponential backoff with jitter, shared by every etcd retry loop.
pub struct Backoff(Duration);

impl Backoff {
    pub fn new() -> Self {
        Self(BACKOFF_MIN)
    }

    pub fn reset(&mut self) {
        self.0 = BACKOFF_MIN;
    }

    /// The next wait: jittered, then doubled up to the cap.
    pub fn next(&mut self) -> Duration {
        let wait = jittered(self.0);
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        wait
    }
}

/// One key as read from etcd.
#[derive(Debug, Clone)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
}

#[derive(Debug)]
pub enum Update {
    /// The whole prefix at `revision`: replaces everything known. Also
    /// says etcd is connected.
    Snapshot { kvs: Vec<Kv>, revision: i64 },
    /// Changes in revision order.
    Changes { puts: Vec<Change>, revision: i64 },
    /// The list or watch was lost; a new snapshot follows when etcd is back.
    /// Connecting, listing or watching failed; the source retries.
    Disconnected { error: String },
}

#[derive(Debug)]
pub enum Change {
    Put(Kv),
    Delete(String),
}

/// Where the loop broke: before a consistent list (etcd unreachable) or
/// after (the watch was lost and a re-list will reconcile).
enum Lost {
    List(etcd_client::Error),
    Watch(anyhow::Error),
}

/// Lists and watches the prefix and hands every update, and every change of
/// connectivity, to its receiver as an [`Update`]; it keeps no state of its
/// own beyond the connection.
pub struct Source {
    pub etcd: EtcdConfig,
    pub prefix: String,
    /// The newest revision seen (list or watch), for the watch-lag metric:
    /// set before the update is queued, so the lag counts queued updates.
    pub seen_revision: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

/// Whether a failed request never reached a working etcd (as opposed to
/// etcd refusing it), so the log says which.
fn unreachable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        // gRPC codes Unknown (2), DeadlineExceeded (4), Unavailable (14).
        etcd_client::Error::GRpcStatus(s) => matches!(s.code() as i32, 2 | 4 | 14),
        _ => false,
    }
}

/// Keys per page of the initial list. Large, because etcd 3.4 walks the
/// rest of the range for every page (a list costs pages x keys): 110k keys
/// took 1.8 s in pages of 1000. Ten thousand small values are about 1 MB.
const LIST_PAGE: i64 = 10_000;
/// Largest etcd response accepted (a page of big values, a large watch
/// batch); etcd-client's default is 4 MiB.
const MAX_MESSAGE: usize = 64 << 20;

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: to the end of the keyspace.
    vec![0]
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.5..1.0))
}

fn key_string(k: &[u8]) -> String {
    String::from_utf8_lossy(k).into_owned()
}

impl Source {
    /// Runs until `tx` is closed.
    pub async fn run(self, tx: mpsc::Sender<Update>) {
        let mut backoff = Backoff::new();
        let mut client: Option<Client> = None;
        loop {
            if tx.is_closed() {
                return;
            }
            let c = match client.as_mut() {
                Some(c) => c,
                None => match self.connect().await {
                    Ok(c) => client.insert(c),
                    Err(e) => {
                        let error = e.to_string();
                        if tx.send(Update::Disconnected { error }).await.is_err() {
                            return;
                        }
                        let wait = backoff.next();
                        warn!(endpoints = ?self.etcd.endpoints, error = %e, retry_in = ?wait,
                              "etcd unreachable; retrying");
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                },
            };
            match self.list_and_watch(c, &tx, &mut backoff).await {
                Ok(()) => return,
                Err(e) => {
                    let error = match &e {
                        Lost::List(e) => format!("listing the prefix: {e}"),
                        Lost::Watch(e) => format!("watch: {e:#}"),
                    };
                    if tx.send(Update::Disconnected { error }).await.is_err() {
                        return;
                    }
                    let wait = backoff.next();
                    match e {
                        Lost::List(e) if unreachable(&e) => {
                            warn!(endpoints = ?self.etcd.endpoints, prefix = %self.prefix,
                            error = %e, retry_in = ?wait, "etcd unreachable; retrying")
                        }
                        Lost::List(e) => {
                            warn!(endpoints = ?self.etcd.endpoints, prefix = %self.prefix,
                            error = %e, retry_in = ?wait, "listing the etcd prefix failed; retrying")
                        }
                        Lost::Watch(e) => {
                            warn!(endpoints = ?self.etcd.endpoints, prefix = %self.prefix,
                            error = %e, retry_in = ?wait, "etcd watch lost; will re-list and reconcile")
                        }
                    }
                    tokio::time::sleep(wait).await;
                    // A fresh client re-resolves endpoints and skips a dead
                    // member.
                    client = None;
                }
            }
        }
    }

    fn seen(&self, revision: i64) {
        self.seen_revision
            .fetch_max(revision, std::sync::atomic::Ordering::Relaxed);
    }

    async fn connect(&self) -> Result<Client, etcd_client::Error> {
        connect(&self.etcd).await
    }

    /// Returns Ok(()) only when the receiver is gone.
    async fn list_and_watch(
        &self,
        client: &mut Client,
        tx: &mpsc::Sender<Update>,
        backoff: &mut Backoff,
    ) -> Result<(), Lost> {
        // In pages at one revision: a single response is capped (4 MiB by
        // default, about 60k keys), and a big tree must still list.
        let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
        let end = prefix_end(self.prefix.as_bytes());
        let mut from = self.prefix.as_bytes().to_vec();
        let mut revision = 0;
        let mut kvs: Vec<Kv> = Vec::new();
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let resp = kv.get(from.clone(), Some(opts)).await.map_err(Lost::List)?;
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or_default();
            }
            kvs.extend(resp.kvs().iter().map(|kv| Kv {
                key: key_string(kv.key()),
                value: kv.value().to_vec(),
                create_revision: kv.create_revision(),
            }));
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        info!(prefix = %self.prefix, revision, keys = kvs.len(), "listed etcd prefix");
        self.seen(revision);
        if tx.send(Update::Snapshot { kvs, revision }).await.is_err() {
            return Ok(());
        }
        self.watch(client, tx, backoff, revision)
            .await
            .map_err(Lost::Watch)
    }

    async fn watch(
        &self,
        client: &mut Client,
        tx: &mpsc::Sender<Update>,
        backoff: &mut Backoff,
        revision: i64,
    ) -> anyhow::Result<()> {
        let mut stream = client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE)
            .watch(
                self.prefix.as_bytes(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1)
                        .with_progress_notify(),
                ),
            )
            .await?;
        backoff.reset();
        while let Some(resp) = stream.message().await? {
            if resp.canceled() {
                if resp.compact_revision() > 0 {
                    anyhow::bail!(
                        "watch from revision {} was compacted (compact revision {})",
                        revision + 1,
                        resp.compact_revision()
                    );
                }
                anyhow::bail!("watch canceled by etcd: {}", resp.cancel_reason());
            }
            let rev = resp.header().map(|h| h.revision()).unwrap_or_default();
            self.seen(rev);
            if resp.events().is_empty() {
                debug!(revision = rev, "watch progress");
                continue;
            }
            let puts = resp
                .events()
                .iter()
                .filter_map(|ev| {
                    let kv = ev.kv()?;
                    Some(match ev.event_type() {
                        EventType::Put => Change::Put(Kv {
                            key: key_string(kv.key()),
                            value: kv.value().to_vec(),
                            create_revision: kv.create_revision(),
                        }),
                        EventType::Delete => Change::Delete(key_string(kv.key())),
                    })
                })
                .collect();
            if tx
                .send(Update::Changes {
                    puts,
                    revision: rev,
                })
                .await
                .is_err()
            {
                return Ok(());
            }
        }
        anyhow::bail!("watch stream closed by etcd")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_first_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/discovery/"), b"/discovery0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
