//! The broker's rules on top of a [`Store`]. Check and commit happen under one lock, so two
//! clusters racing for overlapping CIDRs cannot both win: the second sees the first.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use causeway_broker_api::{
    ClusterRecord, EndpointRecord, ListResponse, Object, Record, ValidationError, WatchResponse, cluster_key,
    endpoint_key, validate::Overlap,
};
use tokio::sync::watch;
use tracing::info;

use crate::store::{Change, Since, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("invalid record: {0}")]
    Invalid(#[from] ValidationError),
    #[error("invalid request: {0}")]
    BadRequest(String),
    #[error("{0}")]
    Overlap(Overlap),
    #[error("{key}: generation {offered} is older than the stored generation {stored}; refusing to go back")]
    StaleGeneration { key: String, stored: u64, offered: u64 },
    #[error("cluster {0:?} is not registered; register the cluster before its endpoints")]
    ClusterNotRegistered(String),
    #[error("{0} does not exist")]
    NotFound(String),
    #[error(
        "revision {since} is not in the broker's history (kept: {oldest} and later); list again and watch from the list's resourceVersion"
    )]
    Gone { since: u64, oldest: u64 },
    #[error("storage failed: {0}")]
    Store(#[from] StoreError),
}

impl BrokerError {
    /// HTTP status and machine-readable code.
    #[must_use]
    pub fn status_code(&self) -> (u16, &'static str) {
        match self {
            Self::Invalid(_) | Self::BadRequest(_) => (400, "Invalid"),
            Self::Overlap(_) => (409, "CidrOverlap"),
            Self::StaleGeneration { .. } => (409, "StaleGeneration"),
            Self::ClusterNotRegistered(_) => (409, "ClusterNotRegistered"),
            Self::NotFound(_) => (404, "NotFound"),
            Self::Gone { .. } => (410, "Gone"),
            Self::Store(_) => (500, "Internal"),
        }
    }
}

/// The broker: rules plus store plus a revision signal for long-polling watchers.
pub struct Broker {
    store: Mutex<Box<dyn Store>>,
    revision: watch::Sender<u64>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("revision", &*self.revision.borrow()).finish_non_exhaustive()
    }
}

impl Broker {
    pub fn new(store: impl Store) -> Result<Arc<Self>, BrokerError> {
        let (rev, _) = store.list()?;
        let (revision, _) = watch::channel(rev);
        Ok(Arc::new(Self { store: Mutex::new(Box::new(store)), revision }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Box<dyn Store>> {
        // A panic while holding the lock cannot leave the store half-written (commits are
        // atomic), so a poisoned lock is still usable.
        self.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn committed(&self, store: &dyn Store) -> Result<(), BrokerError> {
        let (rev, _) = store.list()?;
        self.revision.send_replace(rev);
        Ok(())
    }

    pub fn list(&self) -> Result<ListResponse, BrokerError> {
        let (resource_version, items) = self.lock().list()?;
        Ok(ListResponse { resource_version, items })
    }

    fn stored<'a>(items: &'a [Object], key: &str) -> Option<&'a Object> {
        items.iter().find(|o| o.record.key() == key)
    }

    /// Creates or replaces a cluster record.
    pub fn put_cluster(&self, c: ClusterRecord) -> Result<Object, BrokerError> {
        causeway_broker_api::validate_cluster(&c)?;
        let mut store = self.lock();
        let (_, items) = store.list()?;
        let key = cluster_key(&c.cluster_id);
        if let Some(old) = Self::stored(&items, &key) {
            check_generation(&key, old, c.generation)?;
            if old.record == Record::Cluster(c.clone()) {
                return Ok(old.clone());
            }
        }
        let clusters = items.iter().filter_map(|o| match &o.record {
            Record::Cluster(c) => Some(c),
            Record::Endpoint(_) => None,
        });
        causeway_broker_api::check_overlaps(&c, clusters).map_err(BrokerError::Overlap)?;
        let events = store.commit(vec![Change::Put(Record::Cluster(c))])?;
        self.committed(store.as_ref())?;
        let obj = events.into_iter().next().map(|e| e.object).expect("a put produces an event");
        info!(key, revision = obj.resource_version, "cluster stored");
        Ok(obj)
    }

    /// Deletes a cluster and all its endpoints, as one revision.
    pub fn delete_cluster(&self, cluster_id: &str) -> Result<Vec<Object>, BrokerError> {
        let mut store = self.lock();
        let (_, items) = store.list()?;
        let key = cluster_key(cluster_id);
        if Self::stored(&items, &key).is_none() {
            return Err(BrokerError::NotFound(key));
        }
        let mut changes: Vec<Change> = items
            .iter()
            .filter(|o| matches!(&o.record, Record::Endpoint(e) if e.cluster_id == cluster_id))
            .map(|o| Change::Delete(o.record.key()))
            .collect();
        changes.push(Change::Delete(key.clone()));
        let events = store.commit(changes)?;
        self.committed(store.as_ref())?;
        info!(key, "cluster and its endpoints deleted");
        Ok(events.into_iter().map(|e| e.object).collect())
    }

    /// Creates or replaces an endpoint record of a registered cluster.
    pub fn put_endpoint(&self, e: EndpointRecord) -> Result<Object, BrokerError> {
        causeway_broker_api::validate_endpoint(&e)?;
        let mut store = self.lock();
        let (_, items) = store.list()?;
        if Self::stored(&items, &cluster_key(&e.cluster_id)).is_none() {
            return Err(BrokerError::ClusterNotRegistered(e.cluster_id));
        }
        let key = endpoint_key(&e.cluster_id, &e.hostname);
        if let Some(old) = Self::stored(&items, &key) {
            check_generation(&key, old, e.generation)?;
            if old.record == Record::Endpoint(e.clone()) {
                return Ok(old.clone());
            }
        }
        let events = store.commit(vec![Change::Put(Record::Endpoint(e))])?;
        self.committed(store.as_ref())?;
        let obj = events.into_iter().next().map(|e| e.object).expect("a put produces an event");
        info!(key, revision = obj.resource_version, "endpoint stored");
        Ok(obj)
    }

    pub fn delete_endpoint(&self, cluster_id: &str, hostname: &str) -> Result<Vec<Object>, BrokerError> {
        let key = endpoint_key(cluster_id, hostname);
        let mut store = self.lock();
        let events = store.commit(vec![Change::Delete(key.clone())])?;
        if events.is_empty() {
            return Err(BrokerError::NotFound(key));
        }
        self.committed(store.as_ref())?;
        Ok(events.into_iter().map(|e| e.object).collect())
    }

    /// The changes after `since`; waits up to `wait` for the first one.
    pub async fn watch(self: &Arc<Self>, since: u64, wait: Duration) -> Result<WatchResponse, BrokerError> {
        let mut rx = self.revision.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let current = *rx.borrow_and_update();
            if since > current {
                // A revision from the future: the broker lost history (e.g. a memory store
                // restarted). Only a fresh list is safe.
                return Err(BrokerError::Gone { since, oldest: current });
            }
            if current > since {
                let this = Arc::clone(self);
                let found = tokio::task::spawn_blocking(move || this.lock().events_since(since))
                    .await
                    .map_err(|e| BrokerError::BadRequest(format!("watch task failed: {e}")))??;
                return match found {
                    Since::Events(events) => {
                        let resource_version = events.last().map_or(since, |e| e.revision);
                        Ok(WatchResponse { resource_version, events })
                    }
                    Since::Compacted { oldest } => Err(BrokerError::Gone { since, oldest }),
                };
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return Ok(WatchResponse { resource_version: since.max(current), events: Vec::new() });
            }
        }
    }
}

fn check_generation(key: &str, old: &Object, offered: u64) -> Result<(), BrokerError> {
    let stored = old.record.generation();
    if offered < stored {
        return Err(BrokerError::StaleGeneration { key: key.to_owned(), stored, offered });
    }
    Ok(())
}
