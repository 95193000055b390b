//! The etcd v3 store: several broker replicas serve one cluster set. Same contract as the
//! embedded store (dense set-wide revisions, an event log with a retention window,
//! credentials by hash), kept in etcd under a prefix `P` (default `/causeway/`):
//!
//! | key | value |
//! |---|---|
//! | `P rev` | the set's revision (decimal) |
//! | `P compacted` | the newest revision dropped from the event log |
//! | `P records/<key>` | the record's [`Object`] (JSON) |
//! | `P events/<rev, 20 digits>` | that revision's events (JSON array) |
//! | `P credentials/<sha256>` | a [`Credential`] (JSON: identity and limits) |
//! | `P heartbeats/<key>` | unix milliseconds of an endpoint's last heartbeat, via any replica |
//!
//! Every commit is one etcd transaction guarded by "`P rev` unchanged since the caller read
//! it", so replicas serialise on the set revision: of two racing writers exactly one commits
//! and the other gets [`StoreError::Conflict`] and re-checks its rules. Each replica follows
//! the event log with an etcd watch ([`Store::follow`]) to keep its in-memory cache current.
//!
//! etcd-client is async, and so is the [`Store`] trait: calls run on the broker's own
//! runtime, one await each, with no thread or runtime of their own.

use std::{future::Future, time::Duration};

use causeway_broker_api::{Object, WatchEvent};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, TxnOp, TxnOpResponse,
    WatchOptions,
};
use tracing::{debug, info, warn};

use crate::{
    Credential,
    store::{Change, FollowSink, Followed, Since, Store, StoreError, apply},
};

/// How to reach etcd.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// Client URLs of the members, e.g. `http://10.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix of this cluster set (several sets can share one etcd).
    pub prefix: String,
    /// PEM CA bundle that signed the members' certificates (for `https://` endpoints).
    pub ca_pem: Option<String>,
    /// PEM client certificate and key, when etcd requires client certificates.
    pub client_identity: Option<(String, String)>,
    /// How many revisions of events to keep.
    pub history: u64,
    /// Longest time one store call may take, retries included.
    pub timeout: Duration,
}

impl EtcdOptions {
    #[must_use]
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: "/causeway/".into(),
            ca_pem: None,
            client_identity: None,
            history: crate::store::EVENT_HISTORY,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Events fetched per range request when catching up.
const PAGE: i64 = 1_000;

#[derive(Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn rev(&self) -> String {
        format!("{}rev", self.prefix)
    }
    fn compacted(&self) -> String {
        format!("{}compacted", self.prefix)
    }
    fn records(&self) -> String {
        format!("{}records/", self.prefix)
    }
    fn record(&self, key: &str) -> String {
        format!("{}records/{key}", self.prefix)
    }
    fn events(&self) -> String {
        format!("{}events/", self.prefix)
    }
    fn event(&self, rev: u64) -> String {
        format!("{}events/{rev:020}", self.prefix)
    }
    /// First key after every event key (`/` + 1 is `0`).
    fn events_end(&self) -> String {
        format!("{}events0", self.prefix)
    }
    fn credentials(&self) -> String {
        format!("{}credentials/", self.prefix)
    }
    fn credential(&self, hash: &str) -> String {
        format!("{}credentials/{hash}", self.prefix)
    }
    fn heartbeat(&self, key: &str) -> String {
        format!("{}heartbeats/{key}", self.prefix)
    }
}

fn etcd_err(e: etcd_client::Error) -> StoreError {
    StoreError::Etcd(e.to_string())
}

fn corrupt(key: &[u8], source: serde_json::Error) -> StoreError {
    StoreError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), source }
}

fn decode<T: serde::de::DeserializeOwned>(kv: &etcd_client::KeyValue) -> Result<T, StoreError> {
    serde_json::from_slice(kv.value()).map_err(|e| corrupt(kv.key(), e))
}

fn number(kv: Option<&etcd_client::KeyValue>) -> Result<u64, StoreError> {
    let Some(kv) = kv else { return Ok(0) };
    std::str::from_utf8(kv.value())
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| StoreError::Etcd(format!("{} holds no number", String::from_utf8_lossy(kv.key()))))
}

/// Worth another try on the next member: the member is gone, has no leader, or timed out.
fn transient(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    match e {
        E::TransportError(_) | E::IoError(_) => true,
        E::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unknown
                | tonic::Code::Aborted
        ),
        _ => false,
    }
}

/// Retries `f` on transient errors until `timeout`.
async fn retry<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = Duration::from_millis(50);
    loop {
        match tokio::time::timeout_at(deadline, f()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if transient(&e) && tokio::time::Instant::now() + pause < deadline => {
                debug!(error = %e, what, "etcd call failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            Ok(Err(e)) => return Err(etcd_err(e)),
            Err(_) => {
                return Err(StoreError::Etcd(format!("{what}: no answer from etcd within {timeout:?}")));
            }
        }
    }
}

/// One consistent read: the set revision, the `P rev` key's etcd mod revision (what a commit
/// compares against), and the records.
struct Snapshot {
    revision: u64,
    rev_mod: i64,
    compacted: u64,
    records: Vec<Object>,
}

async fn snapshot(
    client: &Client,
    keys: &Keys,
    record_keys: Option<&[String]>,
) -> Result<Snapshot, StoreError> {
    let mut ops = vec![TxnOp::get(keys.rev(), None), TxnOp::get(keys.compacted(), None)];
    match record_keys {
        None => ops.push(TxnOp::get(keys.records(), Some(GetOptions::new().with_prefix()))),
        Some(list) => ops.extend(list.iter().map(|k| TxnOp::get(keys.record(k), None))),
    }
    let resp = retry(Duration::from_secs(10), "read", || {
        let mut c = client.clone();
        let txn = etcd_client::Txn::new().and_then(ops.clone());
        async move { c.txn(txn).await }
    })
    .await?;
    let mut gets = resp.op_responses().into_iter().filter_map(|r| match r {
        TxnOpResponse::Get(g) => Some(g),
        _ => None,
    });
    let rev = gets.next().ok_or_else(|| StoreError::Etcd("short transaction response".into()))?;
    let compacted = gets.next().ok_or_else(|| StoreError::Etcd("short transaction response".into()))?;
    let mut records = Vec::new();
    for g in gets {
        for kv in g.kvs() {
            records.push(decode::<Object>(kv)?);
        }
    }
    Ok(Snapshot {
        revision: number(rev.kvs().first())?,
        rev_mod: rev.kvs().first().map_or(0, etcd_client::KeyValue::mod_revision),
        compacted: number(compacted.kvs().first())?,
        records,
    })
}

/// The event log from revision `from` on (at most [`PAGE`] revisions), and etcd's revision
/// of that read.
async fn read_events(
    client: &Client,
    keys: &Keys,
    from: u64,
) -> Result<(Vec<Vec<WatchEvent>>, i64), StoreError> {
    let (start, end) = (keys.event(from), keys.events_end());
    let resp = retry(Duration::from_secs(10), "read events", || {
        let mut c = client.clone();
        let opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        let start = start.clone();
        async move { c.get(start, Some(opts)).await }
    })
    .await?;
    let etcd_revision = resp.header().map_or(0, etcd_client::ResponseHeader::revision);
    let revs = resp.kvs().iter().map(decode::<Vec<WatchEvent>>).collect::<Result<_, _>>()?;
    Ok((revs, etcd_revision))
}

/// Store in etcd v3; see the module docs for the layout.
pub struct EtcdStore {
    client: Client,
    keys: Keys,
    history: u64,
    timeout: Duration,
    /// The followers started by [`Store::follow`]: they end with the store.
    followers: std::sync::Mutex<Vec<tokio::task::AbortHandle>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").field("prefix", &self.keys.prefix).finish_non_exhaustive()
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        for f in self.followers.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner).drain(..) {
            f.abort();
        }
    }
}

impl EtcdStore {
    /// Connects to etcd and checks it answers.
    pub async fn connect(opts: &EtcdOptions) -> Result<Self, StoreError> {
        if opts.endpoints.is_empty() {
            return Err(StoreError::Etcd("no etcd endpoints given".into()));
        }
        if !opts.prefix.starts_with('/') || !opts.prefix.ends_with('/') {
            return Err(StoreError::Etcd(format!(
                "etcd prefix {:?} must start and end with '/', e.g. /causeway/",
                opts.prefix
            )));
        }
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        if opts.ca_pem.is_some() || opts.client_identity.is_some() {
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &opts.ca_pem {
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &opts.client_identity {
                tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
            }
            connect = connect.with_tls(tls);
        }
        let client = tokio::time::timeout(
            Duration::from_secs(10),
            Client::connect(opts.endpoints.clone(), Some(connect)),
        )
        .await
        .map_err(|_| StoreError::Etcd(format!("no etcd member answered at {:?}", opts.endpoints)))?
        .map_err(|e| StoreError::Etcd(format!("connecting to etcd at {:?}: {e}", opts.endpoints)))?;
        let keys = Keys { prefix: opts.prefix.clone() };
        let snap = snapshot(&client, &keys, Some(&[])).await?;
        info!(endpoints = ?opts.endpoints, prefix = %opts.prefix, revision = snap.revision, "etcd store ready");
        Ok(Self {
            client,
            keys,
            history: opts.history.max(1),
            timeout: opts.timeout,
            followers: std::sync::Mutex::default(),
        })
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn list(&self) -> Result<(u64, Vec<Object>), StoreError> {
        let s = snapshot(&self.client, &self.keys, None).await?;
        Ok((s.revision, s.records))
    }

    async fn commit(&self, base: u64, changes: Vec<Change>) -> Result<Vec<WatchEvent>, StoreError> {
        let (c, k, history, timeout) = (&self.client, &self.keys, self.history, self.timeout);
        // Only the records being deleted are needed (their delete events carry them).
        let deleted: Vec<String> = changes
            .iter()
            .filter_map(|ch| match ch {
                Change::Delete(key) => Some(key.clone()),
                Change::Put(_) => None,
            })
            .collect();
        let snap = snapshot(c, k, Some(&deleted)).await?;
        if snap.revision != base {
            return Err(StoreError::Conflict { expected: base, current: snap.revision });
        }
        let current = snap.records.into_iter().map(|o| (o.record.key(), o)).collect();
        let rev = base + 1;
        let applied = apply(&current, changes, rev);
        if applied.is_empty() {
            return Ok(Vec::new());
        }
        let mut ops = Vec::new();
        let mut events = Vec::new();
        for (key, new, event) in applied {
            match new {
                Some(o) => {
                    ops.push(TxnOp::put(
                        k.record(&key),
                        serde_json::to_vec(&o).expect("records serialise"),
                        None,
                    ));
                }
                None => ops.push(TxnOp::delete(k.record(&key), None)),
            }
            events.push(event);
        }
        ops.push(TxnOp::put(k.event(rev), serde_json::to_vec(&events).expect("events serialise"), None));
        ops.push(TxnOp::put(k.rev(), rev.to_string(), None));
        // Retention: drop whole revisions older than the history window.
        if rev > history && rev - history > snap.compacted {
            let cut = rev - history;
            ops.push(TxnOp::delete(k.events(), Some(DeleteOptions::new().with_range(k.event(cut + 1)))));
            ops.push(TxnOp::put(k.compacted(), cut.to_string(), None));
        }
        let guard = Compare::mod_revision(k.rev(), CompareOp::Equal, snap.rev_mod);
        let resp = retry(timeout, "commit", || {
            let mut c = c.clone();
            let txn = etcd_client::Txn::new().when(vec![guard.clone()]).and_then(ops.clone());
            async move { c.txn(txn).await }
        })
        .await?;
        if resp.succeeded() {
            Ok(events)
        } else {
            // Someone else committed first (or our own commit landed but its answer was
            // lost and this was the retry): either way the caller re-plans.
            let now = snapshot(c, k, Some(&[])).await?;
            Err(StoreError::Conflict { expected: base, current: now.revision })
        }
    }

    async fn events_since(&self, since: u64) -> Result<Since, StoreError> {
        let snap = snapshot(&self.client, &self.keys, Some(&[])).await?;
        if since < snap.compacted {
            return Ok(Since::Compacted { oldest: snap.compacted + 1 });
        }
        // One page; the watcher comes back for the rest with the last revision it got.
        let (revs, _) = read_events(&self.client, &self.keys, since + 1).await?;
        Ok(Since::Events(revs.into_iter().flatten().collect()))
    }

    fn history(&self) -> u64 {
        self.history
    }

    async fn credential(&self, hash: &str) -> Result<Option<Credential>, StoreError> {
        let key = self.keys.credential(hash);
        let resp = retry(self.timeout, "read credential", || {
            let mut c = self.client.clone();
            let key = key.clone();
            async move { c.get(key, None).await }
        })
        .await?;
        resp.kvs().first().map(decode::<Credential>).transpose()
    }

    async fn put_credential(&self, hash: &str, credential: &Credential) -> Result<(), StoreError> {
        let key = self.keys.credential(hash);
        let value = serde_json::to_vec(credential).expect("credentials serialise");
        retry(self.timeout, "store credential", || {
            let mut c = self.client.clone();
            let (key, value) = (key.clone(), value.clone());
            async move { c.put(key, value, None).await }
        })
        .await
        .map(drop)
    }

    async fn credentials(&self) -> Result<Vec<(String, Credential)>, StoreError> {
        let prefix = self.keys.credentials();
        let resp = retry(self.timeout, "read credentials", || {
            let mut c = self.client.clone();
            let prefix = prefix.clone();
            async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
        })
        .await?;
        let mut out = Vec::new();
        for kv in resp.kvs() {
            let hash = String::from_utf8_lossy(kv.key()).trim_start_matches(prefix.as_str()).to_owned();
            out.push((hash, decode::<Credential>(kv)?));
        }
        Ok(out)
    }

    async fn delete_credentials(&self, hashes: &[String]) -> Result<(), StoreError> {
        if hashes.is_empty() {
            return Ok(());
        }
        let ops: Vec<TxnOp> =
            hashes.iter().map(|h| TxnOp::delete(self.keys.credential(h).into_bytes(), None)).collect();
        retry(self.timeout, "delete credentials", || {
            let mut c = self.client.clone();
            let txn = etcd_client::Txn::new().and_then(ops.clone());
            async move { c.txn(txn).await }
        })
        .await
        .map(drop)
    }

    async fn heartbeat(&self, key: &str) -> Result<(), StoreError> {
        let key = self.keys.heartbeat(key);
        let now = unix_millis().to_string();
        retry(self.timeout, "store heartbeat", || {
            let mut c = self.client.clone();
            let (key, now) = (key.clone(), now.clone());
            async move { c.put(key, now, None).await }
        })
        .await
        .map(drop)
    }

    async fn heartbeat_age(&self, key: &str) -> Result<Option<Duration>, StoreError> {
        let key = self.keys.heartbeat(key);
        let resp = retry(self.timeout, "read heartbeat", || {
            let mut c = self.client.clone();
            let key = key.clone();
            async move { c.get(key, None).await }
        })
        .await?;
        let Some(kv) = resp.kvs().first() else { return Ok(None) };
        let then = number(Some(kv))?;
        Ok(Some(Duration::from_millis(unix_millis().saturating_sub(then))))
    }

    fn follow(&self, after: u64, sink: FollowSink) {
        let task = tokio::spawn(follow(self.client.clone(), self.keys.clone(), after, sink));
        self.followers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(task.abort_handle());
    }
}

fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Reports every revision after `after` to `sink`, in order, forever: catch up from the
/// log, then watch it; after any failure (a member died, the stream broke) start over from
/// the last revision reported.
async fn follow(client: Client, keys: Keys, mut after: u64, sink: FollowSink) {
    loop {
        match follow_once(&client, &keys, &mut after, &sink).await {
            Ok(()) => debug!(after, "etcd watch ended; resuming"),
            Err(e) => warn!(error = %e, after, "following etcd failed; resuming"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Hands one revision to the sink if it is the next one; a gap means the log moved past us.
fn deliver(sink: &FollowSink, after: &mut u64, events: Vec<WatchEvent>) -> Result<(), StoreError> {
    let Some(rev) = events.first().map(|e| e.revision) else { return Ok(()) };
    if rev <= *after {
        return Ok(());
    }
    if rev != *after + 1 {
        return Err(StoreError::Conflict { expected: *after + 1, current: rev });
    }
    *after = rev;
    sink(Followed::Events(events));
    Ok(())
}

async fn follow_once(
    client: &Client,
    keys: &Keys,
    after: &mut u64,
    sink: &FollowSink,
) -> Result<(), StoreError> {
    // Catch up from the log, page by page.
    let watch_from = loop {
        let snap = snapshot(client, keys, Some(&[])).await?;
        if *after < snap.compacted {
            // What we missed is gone from the log: start from the whole state.
            let full = snapshot(client, keys, None).await?;
            info!(
                after = *after,
                revision = full.revision,
                "etcd follower fell behind the history; re-listing"
            );
            *after = full.revision;
            sink(Followed::Reset { revision: full.revision, records: full.records });
            continue;
        }
        let (revs, etcd_revision) = read_events(client, keys, *after + 1).await?;
        let full_page = revs.len() == usize::try_from(PAGE).unwrap_or(usize::MAX);
        for events in revs {
            deliver(sink, after, events)?;
        }
        if !full_page {
            break etcd_revision + 1;
        }
    };
    let mut watcher = client.watch_client();
    let opts = WatchOptions::new().with_range(keys.events_end()).with_start_revision(watch_from);
    let mut stream = watcher.watch(keys.events(), Some(opts)).await.map_err(etcd_err)?;
    while let Some(msg) = stream.message().await.map_err(etcd_err)? {
        if msg.canceled() {
            return Err(StoreError::Etcd(format!("etcd cancelled the watch: {}", msg.cancel_reason())));
        }
        for ev in msg.events() {
            if ev.event_type() != EventType::Put {
                continue; // retention deletes
            }
            let Some(kv) = ev.kv() else { continue };
            deliver(sink, after, decode(kv)?)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::{
        store::tests::{cluster, compaction, conformance},
        testing::{EtcdCluster, require_etcd},
    };

    async fn store(etcd: &EtcdCluster, prefix: &str, history: u64) -> EtcdStore {
        let mut o = EtcdOptions::new(etcd.endpoints());
        o.prefix = prefix.into();
        o.history = history;
        EtcdStore::connect(&o).await.unwrap()
    }

    #[tokio::test]
    async fn etcd_store_conforms_compacts_and_follows() {
        require_etcd("etcd_store_conforms_compacts_and_follows");
        let etcd = EtcdCluster::start(1);
        conformance(&store(&etcd, "/conformance/", 100).await).await;
        compaction(&store(&etcd, "/compaction/", 3).await).await;
        // The log's window survives a reconnect (it lives in etcd).
        assert_eq!(
            store(&etcd, "/compaction/", 3).await.events_since(2).await.unwrap(),
            Since::Compacted { oldest: 8 }
        );

        // Two replicas on one prefix: what one commits, the other's follower reports, in order.
        let a = store(&etcd, "/replicas/", 100).await;
        let b = store(&etcd, "/replicas/", 100).await;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        b.follow(
            0,
            Box::new(move |f| match f {
                Followed::Events(ev) => s.lock().unwrap().extend(ev.into_iter().map(|e| e.revision)),
                Followed::Reset { .. } => panic!("no reset expected"),
            }),
        );
        for g in 1..=20 {
            a.commit(g - 1, vec![Change::put(cluster("a", g))]).await.unwrap();
        }
        // b planned against revision 0: refused, nothing written.
        assert!(matches!(
            b.commit(0, vec![Change::put(cluster("b", 1))]).await,
            Err(StoreError::Conflict { expected: 0, current: 20 })
        ));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while seen.lock().unwrap().len() < 20 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(*seen.lock().unwrap(), (1..=20).collect::<Vec<_>>());
        b.commit(20, vec![Change::put(cluster("b", 1))]).await.unwrap();
        assert_eq!(a.list().await.unwrap().0, 21);
    }

    #[tokio::test]
    async fn unreachable_etcd_is_a_clear_error() {
        let mut o = EtcdOptions::new(vec!["http://127.0.0.1:1".into()]);
        o.timeout = Duration::from_secs(1);
        let err = EtcdStore::connect(&o).await.unwrap_err().to_string();
        assert!(err.contains("127.0.0.1:1"), "{err}");
        o.prefix = "causeway".into();
        let err = EtcdStore::connect(&o).await.unwrap_err().to_string();
        assert!(err.contains("must start and end with '/'"), "{err}");
    }
}
