//! Storage behind the broker: current records plus an append-only event log, both keyed by
//! the set-wide revision. Three implementations with the same behaviour (one conformance
//! suite): [`RedbStore`] (one crash-safe file, the default), [`crate::etcd::EtcdStore`]
//! (etcd v3, shared by several broker replicas) and [`MemStore`] (tests).

use std::{collections::BTreeMap, path::Path};

use redb::{ReadableDatabase as _, ReadableTable as _};

use causeway_broker_api::{EventType, Object, WatchEvent};

use crate::auth::Credential;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening the store at {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: redb::Error,
    },
    #[error("store I/O: {0}")]
    Io(#[from] redb::Error),
    #[error("corrupt entry {key}: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// Another writer (a broker replica) committed after the revision the change was planned
    /// against; plan again on fresh state.
    #[error("the cluster set moved from revision {expected} to {current} meanwhile")]
    Conflict { expected: u64, current: u64 },
    #[error("etcd: {0}")]
    Etcd(String),
    /// The blocking thread that ran a store call died (a panic in the storage engine).
    #[error("store call failed: {0}")]
    Task(String),
}

/// What a shared store reports to a broker replica about commits made by anyone.
#[derive(Debug)]
pub enum Followed {
    /// The next revision's events, in order, nothing skipped.
    Events(Vec<WatchEvent>),
    /// The follower lost track (history compacted meanwhile): here is the whole state.
    Reset { revision: u64, records: Vec<Object> },
}

/// Receives [`Followed`] items; called from the store's own thread, must not block long.
pub type FollowSink = Box<dyn Fn(Followed) + Send + Sync>;

/// One change of a commit: put (create or replace) or delete a record by key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Boxed: records are large and most commits hold one or two.
    Put(Box<causeway_broker_api::Record>),
    Delete(String),
}

impl Change {
    #[must_use]
    pub fn put(record: causeway_broker_api::Record) -> Self {
        Self::Put(Box::new(record))
    }
}

/// The result of `events_since`.
#[derive(Debug, PartialEq, Eq)]
pub enum Since {
    Events(Vec<WatchEvent>),
    /// The requested revision is older than the retained history.
    Compacted {
        oldest: u64,
    },
}

/// Storage contract. Every call is async: etcd answers over the network, and the embedded
/// store does its file I/O on a blocking thread inside its own impl, so the broker awaits
/// one call per step and never parks an async thread. Callers serialise writes (the broker
/// holds its writer lock around check + commit); every method takes `&self`.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Current revision and every record.
    async fn list(&self) -> Result<(u64, Vec<Object>), StoreError>;
    /// Applies the changes atomically as one new revision, provided the store is still at
    /// revision `base` (the one the caller checked its rules against; otherwise
    /// [`StoreError::Conflict`]); returns the events it produced (deletes of absent keys
    /// produce none). No changes → no new revision.
    async fn commit(&self, base: u64, changes: Vec<Change>) -> Result<Vec<WatchEvent>, StoreError>;
    /// Events with revision > `since`, oldest first.
    async fn events_since(&self, since: u64) -> Result<Since, StoreError>;
    /// How many revisions of events the store keeps.
    fn history(&self) -> u64;
    /// A credential, by the hash of its token.
    async fn credential(&self, hash: &str) -> Result<Option<Credential>, StoreError>;
    /// Stores (or replaces) a credential under the hash of its token, durably.
    async fn put_credential(&self, hash: &str, credential: &Credential) -> Result<(), StoreError>;
    /// Every credential, by hash.
    async fn credentials(&self) -> Result<Vec<(String, Credential)>, StoreError>;
    /// Removes the credentials with these hashes (absent ones are no error).
    async fn delete_credentials(&self, hashes: &[String]) -> Result<(), StoreError>;
    /// Records an endpoint heartbeat where every replica sees it. Single-replica stores keep
    /// heartbeats in the broker's memory only.
    async fn heartbeat(&self, _key: &str) -> Result<(), StoreError> {
        Ok(())
    }
    /// How long ago any replica last recorded a heartbeat for `key`, if the store shares them.
    async fn heartbeat_age(&self, _key: &str) -> Result<Option<std::time::Duration>, StoreError> {
        Ok(None)
    }
    /// Starts reporting commits made by any writer after revision `after` to `sink` (a task
    /// on the current runtime that ends with the store). Stores with a single writer (this
    /// process) have nothing to report.
    fn follow(&self, _after: u64, _sink: FollowSink) {}
}

/// A boxed store is a store (callers that pick the implementation at run time).
#[async_trait::async_trait]
impl Store for Box<dyn Store> {
    async fn list(&self) -> Result<(u64, Vec<Object>), StoreError> {
        (**self).list().await
    }
    async fn commit(&self, base: u64, changes: Vec<Change>) -> Result<Vec<WatchEvent>, StoreError> {
        (**self).commit(base, changes).await
    }
    async fn events_since(&self, since: u64) -> Result<Since, StoreError> {
        (**self).events_since(since).await
    }
    fn history(&self) -> u64 {
        (**self).history()
    }
    async fn credential(&self, hash: &str) -> Result<Option<Credential>, StoreError> {
        (**self).credential(hash).await
    }
    async fn put_credential(&self, hash: &str, credential: &Credential) -> Result<(), StoreError> {
        (**self).put_credential(hash, credential).await
    }
    async fn credentials(&self) -> Result<Vec<(String, Credential)>, StoreError> {
        (**self).credentials().await
    }
    async fn delete_credentials(&self, hashes: &[String]) -> Result<(), StoreError> {
        (**self).delete_credentials(hashes).await
    }
    async fn heartbeat(&self, key: &str) -> Result<(), StoreError> {
        (**self).heartbeat(key).await
    }
    async fn heartbeat_age(&self, key: &str) -> Result<Option<std::time::Duration>, StoreError> {
        (**self).heartbeat_age(key).await
    }
    fn follow(&self, after: u64, sink: FollowSink) {
        (**self).follow(after, sink);
    }
}

fn check_base(base: u64, current: u64) -> Result<(), StoreError> {
    if base == current { Ok(()) } else { Err(StoreError::Conflict { expected: base, current }) }
}

/// How many events the log retains; older watchers must re-list.
pub const EVENT_HISTORY: u64 = 100_000;

/// Applies `changes` to a record map, producing events at revision `rev`.
pub(crate) fn apply(
    records: &BTreeMap<String, Object>,
    changes: Vec<Change>,
    rev: u64,
) -> Vec<(String, Option<Object>, WatchEvent)> {
    let mut out = Vec::new();
    for change in changes {
        match change {
            Change::Put(record) => {
                let key = record.key();
                let object = Object::new(rev, *record);
                out.push((
                    key,
                    Some(object.clone()),
                    WatchEvent { kind: EventType::Put, revision: rev, object },
                ));
            }
            Change::Delete(key) => {
                if let Some(old) = records.get(&key) {
                    let object = Object::new(rev, old.record.clone());
                    out.push((key, None, WatchEvent { kind: EventType::Delete, revision: rev, object }));
                }
            }
        }
    }
    out
}

/// In-memory store (tests; a broker that may forget everything on restart).
#[derive(Debug)]
pub struct MemStore {
    inner: std::sync::Mutex<Mem>,
}

#[derive(Debug)]
struct Mem {
    history: u64,
    revision: u64,
    records: BTreeMap<String, Object>,
    events: std::collections::VecDeque<WatchEvent>,
    compacted: u64,
    credentials: BTreeMap<String, Credential>,
}

impl Default for MemStore {
    fn default() -> Self {
        Self::with_history(EVENT_HISTORY)
    }
}

impl MemStore {
    /// A store that keeps the last `history` events.
    #[must_use]
    pub fn with_history(history: u64) -> Self {
        Self {
            inner: std::sync::Mutex::new(Mem {
                history: history.max(1),
                revision: 0,
                records: BTreeMap::new(),
                events: std::collections::VecDeque::new(),
                compacted: 0,
                credentials: BTreeMap::new(),
            }),
        }
    }

    fn mem(&self) -> std::sync::MutexGuard<'_, Mem> {
        // Every change below completes before the guard drops, so a poisoned lock holds
        // consistent data.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait::async_trait]
impl Store for MemStore {
    async fn list(&self) -> Result<(u64, Vec<Object>), StoreError> {
        let m = self.mem();
        Ok((m.revision, m.records.values().cloned().collect()))
    }

    async fn commit(&self, base: u64, changes: Vec<Change>) -> Result<Vec<WatchEvent>, StoreError> {
        let mut m = self.mem();
        check_base(base, m.revision)?;
        let applied = apply(&m.records, changes, m.revision + 1);
        if applied.is_empty() {
            return Ok(Vec::new());
        }
        m.revision += 1;
        let mut events = Vec::new();
        for (key, new, event) in applied {
            match new {
                Some(o) => m.records.insert(key, o),
                None => m.records.remove(&key),
            };
            m.events.push_back(event.clone());
            events.push(event);
        }
        while m.events.len() as u64 > m.history {
            if let Some(e) = m.events.pop_front() {
                m.compacted = e.revision;
            }
        }
        Ok(events)
    }

    async fn events_since(&self, since: u64) -> Result<Since, StoreError> {
        let m = self.mem();
        if since < m.compacted {
            return Ok(Since::Compacted { oldest: m.compacted + 1 });
        }
        Ok(Since::Events(m.events.iter().filter(|e| e.revision > since).cloned().collect()))
    }

    fn history(&self) -> u64 {
        self.mem().history
    }

    async fn credential(&self, hash: &str) -> Result<Option<Credential>, StoreError> {
        Ok(self.mem().credentials.get(hash).cloned())
    }

    async fn put_credential(&self, hash: &str, credential: &Credential) -> Result<(), StoreError> {
        self.mem().credentials.insert(hash.to_owned(), credential.clone());
        Ok(())
    }

    async fn credentials(&self) -> Result<Vec<(String, Credential)>, StoreError> {
        Ok(self.mem().credentials.iter().map(|(h, c)| (h.clone(), c.clone())).collect())
    }

    async fn delete_credentials(&self, hashes: &[String]) -> Result<(), StoreError> {
        let mut m = self.mem();
        for h in hashes {
            m.credentials.remove(h);
        }
        Ok(())
    }
}

const RECORDS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("records");
/// Key: (revision, index within the revision).
const EVENTS: redb::TableDefinition<(u64, u32), &[u8]> = redb::TableDefinition::new("events");
const META: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
/// Hash of a token → JSON identity.
const CREDENTIALS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("credentials");
const META_REVISION: &str = "revision";
const META_COMPACTED: &str = "compacted";

/// The embedded store: one redb file. A commit returns only after redb's durable commit, so
/// an acknowledged write survives a crash of the broker or the machine. redb is synchronous:
/// each call runs on a blocking thread, so the broker's async threads never wait on the disk.
pub struct RedbStore {
    inner: std::sync::Arc<Redb>,
}

struct Redb {
    db: redb::Database,
    history: u64,
    /// (revision, compacted): changed only by commits, which redb serialises anyway.
    state: std::sync::Mutex<(u64, u64)>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").field("revision", &self.inner.state().0).finish_non_exhaustive()
    }
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_history(path, EVENT_HISTORY)
    }

    /// Opens the store keeping the last `history` revisions of events.
    pub fn open_with_history(path: &Path, history: u64) -> Result<Self, StoreError> {
        let history = history.max(1);
        let open_err = |source: redb::Error| StoreError::Open { path: path.display().to_string(), source };
        let db = redb::Database::create(path).map_err(|e| open_err(e.into()))?;
        let txn = db.begin_write().map_err(|e| open_err(e.into()))?;
        let (revision, compacted) = {
            txn.open_table(RECORDS).map_err(|e| open_err(e.into()))?;
            txn.open_table(EVENTS).map_err(|e| open_err(e.into()))?;
            txn.open_table(CREDENTIALS).map_err(|e| open_err(e.into()))?;
            let meta = txn.open_table(META).map_err(|e| open_err(e.into()))?;
            let get = |k| -> Result<u64, StoreError> {
                Ok(meta.get(k).map_err(|e| open_err(e.into()))?.map(|v| v.value()).unwrap_or(0))
            };
            (get(META_REVISION)?, get(META_COMPACTED)?)
        };
        txn.commit().map_err(|e| open_err(e.into()))?;
        let state = std::sync::Mutex::new((revision, compacted));
        Ok(Self { inner: std::sync::Arc::new(Redb { db, history, state }) })
    }

    /// Runs one synchronous redb call on a blocking thread.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Redb) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = std::sync::Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner)).await.map_err(|e| StoreError::Task(e.to_string()))?
    }
}

fn io<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Io(e.into())
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt { key: key.to_owned(), source })
}

impl Redb {
    fn state(&self) -> (u64, u64) {
        *self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn list(&self) -> Result<(u64, Vec<Object>), StoreError> {
        let txn = self.db.begin_read().map_err(io)?;
        // The revision from the same read transaction as the records: exactly consistent.
        let revision =
            txn.open_table(META).map_err(io)?.get(META_REVISION).map_err(io)?.map_or(0, |v| v.value());
        let table = txn.open_table(RECORDS).map_err(io)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(io)? {
            let (k, v) = item.map_err(io)?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok((revision, out))
    }

    fn commit(&self, base: u64, changes: Vec<Change>) -> Result<Vec<WatchEvent>, StoreError> {
        let txn = self.db.begin_write().map_err(io)?;
        // redb admits one write transaction at a time: from here the state is ours.
        let (revision, mut compacted) = self.state();
        check_base(base, revision)?;
        let rev = revision + 1;
        let mut events = Vec::new();
        {
            let mut records = txn.open_table(RECORDS).map_err(io)?;
            // Load only the keys being deleted (the delete event carries the last state).
            let mut current = BTreeMap::new();
            for c in &changes {
                if let Change::Delete(key) = c
                    && let Some(v) = records.get(key.as_str()).map_err(io)?
                {
                    current.insert(key.clone(), decode::<Object>(key, v.value())?);
                }
            }
            let applied = apply(&current, changes, rev);
            if applied.is_empty() {
                return Ok(Vec::new());
            }
            let mut log = txn.open_table(EVENTS).map_err(io)?;
            for (i, (key, new, event)) in applied.into_iter().enumerate() {
                match new {
                    Some(o) => {
                        let bytes = serde_json::to_vec(&o).expect("records serialise");
                        records.insert(key.as_str(), bytes.as_slice()).map_err(io)?;
                    }
                    None => {
                        records.remove(key.as_str()).map_err(io)?;
                    }
                }
                let bytes = serde_json::to_vec(&event).expect("events serialise");
                let idx = u32::try_from(i).unwrap_or(u32::MAX);
                log.insert((rev, idx), bytes.as_slice()).map_err(io)?;
                events.push(event);
            }
            // Retention: drop whole revisions older than the history window.
            if rev > self.history && rev - self.history > compacted {
                let cut = rev - self.history;
                log.retain_in((0, 0)..=(cut, u32::MAX), |_, _| false).map_err(io)?;
                compacted = cut;
            }
            let mut meta = txn.open_table(META).map_err(io)?;
            meta.insert(META_REVISION, rev).map_err(io)?;
            meta.insert(META_COMPACTED, compacted).map_err(io)?;
        }
        txn.commit().map_err(io)?;
        *self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = (rev, compacted);
        Ok(events)
    }

    fn events_since(&self, since: u64) -> Result<Since, StoreError> {
        let compacted = self.state().1;
        if since < compacted {
            return Ok(Since::Compacted { oldest: compacted + 1 });
        }
        let txn = self.db.begin_read().map_err(io)?;
        let log = txn.open_table(EVENTS).map_err(io)?;
        let mut out = Vec::new();
        for item in log.range((since + 1, 0)..).map_err(io)? {
            let (k, v) = item.map_err(io)?;
            out.push(decode(&format!("event {:?}", k.value()), v.value())?);
        }
        Ok(Since::Events(out))
    }

    fn credential(&self, hash: &str) -> Result<Option<Credential>, StoreError> {
        let txn = self.db.begin_read().map_err(io)?;
        let table = txn.open_table(CREDENTIALS).map_err(io)?;
        match table.get(hash).map_err(io)? {
            Some(v) => Ok(Some(decode("credential", v.value())?)),
            None => Ok(None),
        }
    }

    fn put_credential(&self, hash: &str, credential: &Credential) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(io)?;
        {
            let mut table = txn.open_table(CREDENTIALS).map_err(io)?;
            let bytes = serde_json::to_vec(credential).expect("credentials serialise");
            table.insert(hash, bytes.as_slice()).map_err(io)?;
        }
        txn.commit().map_err(io)
    }

    fn credentials(&self) -> Result<Vec<(String, Credential)>, StoreError> {
        let txn = self.db.begin_read().map_err(io)?;
        let table = txn.open_table(CREDENTIALS).map_err(io)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(io)? {
            let (k, v) = item.map_err(io)?;
            out.push((k.value().to_owned(), decode("credential", v.value())?));
        }
        Ok(out)
    }

    fn delete_credentials(&self, hashes: &[String]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(io)?;
        {
            let mut table = txn.open_table(CREDENTIALS).map_err(io)?;
            for h in hashes {
                table.remove(h.as_str()).map_err(io)?;
            }
        }
        txn.commit().map_err(io)
    }
}

#[async_trait::async_trait]
impl Store for RedbStore {
    async fn list(&self) -> Result<(u64, Vec<Object>), StoreError> {
        self.run(Redb::list).await
    }

    async fn commit(&self, base: u64, changes: Vec<Change>) -> Result<Vec<WatchEvent>, StoreError> {
        self.run(move |r| r.commit(base, changes)).await
    }

    async fn events_since(&self, since: u64) -> Result<Since, StoreError> {
        self.run(move |r| r.events_since(since)).await
    }

    fn history(&self) -> u64 {
        self.inner.history
    }

    async fn credential(&self, hash: &str) -> Result<Option<Credential>, StoreError> {
        let hash = hash.to_owned();
        self.run(move |r| r.credential(&hash)).await
    }

    async fn put_credential(&self, hash: &str, credential: &Credential) -> Result<(), StoreError> {
        let (hash, credential) = (hash.to_owned(), credential.clone());
        self.run(move |r| r.put_credential(&hash, &credential)).await
    }

    async fn credentials(&self) -> Result<Vec<(String, Credential)>, StoreError> {
        self.run(Redb::credentials).await
    }

    async fn delete_credentials(&self, hashes: &[String]) -> Result<(), StoreError> {
        let hashes = hashes.to_vec();
        self.run(move |r| r.delete_credentials(&hashes)).await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use causeway_broker_api::{ClusterRecord, Record};

    use super::*;

    pub(crate) fn cluster(id: &str, gen_: u64) -> Record {
        Record::Cluster(ClusterRecord {
            cluster_id: id.into(),
            pod_cidrs: vec!["10.1.0.0/16".parse().unwrap()],
            service_cidrs: vec![],
            global_cidrs: Vec::new(),
            labels: Default::default(),
            generation: gen_,
        })
    }

    /// Commits against the store's current revision.
    async fn commit(store: &dyn Store, changes: Vec<Change>) -> Vec<WatchEvent> {
        let base = store.list().await.unwrap().0;
        store.commit(base, changes).await.unwrap()
    }

    /// The same behaviour from every store.
    pub(crate) async fn conformance(store: &dyn Store) {
        assert_eq!(store.list().await.unwrap().0, 0);
        let ev = commit(store, vec![Change::put(cluster("a", 1))]).await;
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].revision, 1);
        commit(store, vec![Change::put(cluster("b", 1))]).await;
        commit(store, vec![Change::put(cluster("a", 2))]).await;
        // A commit planned against an old revision is refused, and changes nothing.
        match store.commit(1, vec![Change::put(cluster("c", 1))]).await {
            Err(StoreError::Conflict { expected: 1, current: 3 }) => {}
            other => panic!("expected a conflict, got {other:?}"),
        }
        // Deleting an absent key is a no-op: no event, no revision.
        assert!(commit(store, vec![Change::Delete("clusters/zzz".into())]).await.is_empty());
        let ev = commit(store, vec![Change::Delete("clusters/b".into())]).await;
        assert_eq!(ev[0].kind, EventType::Delete);
        assert_eq!(ev[0].object.record, cluster("b", 1));
        let (rev, items) = store.list().await.unwrap();
        assert_eq!(rev, 4);
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].record, cluster("a", 2));
        assert_eq!(items[0].resource_version, 3);
        let Since::Events(evs) = store.events_since(1).await.unwrap() else { panic!("compacted") };
        assert_eq!(evs.iter().map(|e| e.revision).collect::<Vec<_>>(), vec![2, 3, 4]);
        let Since::Events(evs) = store.events_since(4).await.unwrap() else { panic!("compacted") };
        assert!(evs.is_empty());
        // One commit, several changes: one revision, events in order.
        let ev = commit(store, vec![Change::put(cluster("x", 1)), Change::put(cluster("y", 1))]).await;
        assert_eq!(
            ev.iter().map(|e| (e.revision, e.object.record.key())).collect::<Vec<_>>(),
            vec![(5, "clusters/x".to_owned()), (5, "clusters/y".to_owned())]
        );
        let Since::Events(evs) = store.events_since(4).await.unwrap() else { panic!("compacted") };
        assert_eq!(evs, ev);
        // Credentials: stored by hash with their limits, replaced in place, listed, deleted.
        let east = Credential::new(crate::auth::Identity::Cluster("east".into()));
        let admin = Credential::new(crate::auth::Identity::Admin);
        store.put_credential("h1", &east).await.unwrap();
        store.put_credential("h2", &east).await.unwrap();
        store.put_credential("h3", &admin).await.unwrap();
        assert_eq!(store.credential("h1").await.unwrap(), Some(east.clone()));
        assert_eq!(store.credential("nope").await.unwrap(), None);
        let ending = Credential { expires_at: Some(42), ..east.clone() };
        store.put_credential("h2", &ending).await.unwrap();
        assert_eq!(store.credential("h2").await.unwrap(), Some(ending.clone()));
        let mut all = store.credentials().await.unwrap();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(all, vec![("h1".into(), east), ("h2".into(), ending), ("h3".into(), admin.clone())]);
        store.delete_credentials(&["h1".into(), "h2".into(), "absent".into()]).await.unwrap();
        assert_eq!(store.credential("h2").await.unwrap(), None);
        assert_eq!(store.credentials().await.unwrap(), vec![("h3".into(), admin)]);
    }

    #[tokio::test]
    async fn mem_store_conforms() {
        conformance(&MemStore::default()).await;
    }

    /// Past the history window a watcher is told to re-list, never given a partial story.
    pub(crate) async fn compaction(store: &dyn Store) {
        for g in 1..=10 {
            commit(store, vec![Change::put(cluster("a", g))]).await;
        }
        assert_eq!(store.events_since(2).await.unwrap(), Since::Compacted { oldest: 8 });
        let Since::Events(evs) = store.events_since(7).await.unwrap() else {
            panic!("7 is still in the window")
        };
        assert_eq!(evs.iter().map(|e| e.revision).collect::<Vec<_>>(), vec![8, 9, 10]);
    }

    #[tokio::test]
    async fn compaction_tells_old_watchers_to_relist() {
        compaction(&MemStore::with_history(3)).await;
        let dir = std::env::temp_dir().join(format!("cw-compact-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("b.redb");
        let _ = std::fs::remove_file(&path);
        compaction(&RedbStore::open_with_history(&path, 3).unwrap()).await;
        // The window survives a reopen.
        let s = RedbStore::open_with_history(&path, 3).unwrap();
        assert_eq!(s.events_since(2).await.unwrap(), Since::Compacted { oldest: 8 });
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn redb_store_conforms_and_survives_reopen() {
        let dir = std::env::temp_dir().join(format!("cw-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("broker.redb");
        let _ = std::fs::remove_file(&path);
        {
            let s = RedbStore::open(&path).unwrap();
            conformance(&s).await;
        }
        let s = RedbStore::open(&path).unwrap();
        let (rev, items) = s.list().await.unwrap();
        assert_eq!(rev, 5);
        assert_eq!(items.len(), 3);
        let Since::Events(evs) = s.events_since(0).await.unwrap() else { panic!("compacted") };
        assert_eq!(evs.len(), 6);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
