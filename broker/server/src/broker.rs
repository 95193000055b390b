//! The broker: the [`rules`] run on the [`Cache`], committed to a [`Store`], with the
//! [`Leases`] of endpoints and the watch on top. Credentials are in [`crate::credentials`].
//!
//! Writers take turns (one async lock around plan + commit), and a commit lands only on the
//! revision its plan saw, so two clusters racing for overlapping CIDRs cannot both win: the
//! second sees the first, through this replica or another one of a shared store. Every
//! store call is one await: no blocking thread, no second runtime.

use std::{
    net::IpAddr,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use causeway_broker_api::{
    ClusterRecord, EndpointRecord, ListResponse, Object, Record, WatchEvent, WatchResponse, endpoint_key,
};
use tokio::sync::watch;
use tracing::{debug, info};

pub use crate::error::BrokerError;
pub use crate::leases::DEFAULT_LEASE;
pub use crate::rate::{DEFAULT_WRITE_BURST, DEFAULT_WRITES_PER_SECOND};
use crate::{
    auth::Identity,
    cache::Cache,
    leases::Leases,
    rate::WriteRate,
    rules::{self, Plan},
    store::{Followed, Since, Store, StoreError},
};

/// What a transaction did.
enum Applied {
    /// Committed as one revision: its events (none when the plan had nothing to change).
    Committed(Vec<WatchEvent>),
    /// The record was stored exactly so already.
    Unchanged(Box<Object>),
}

/// Held by whoever plans and commits (records or credentials): writers take turns.
pub(crate) type Writer<'a> = tokio::sync::MutexGuard<'a, ()>;

pub(crate) fn describe(who: &Identity) -> String {
    match who {
        Identity::Admin => "the admin credential".into(),
        Identity::Join => "a join credential".into(),
        Identity::Cluster(id) => format!("cluster {id:?}"),
        Identity::Reader(id) => format!("cluster {id:?}'s read-only credential"),
    }
}

pub(crate) fn require_write(who: &Identity, cluster_id: &str, action: &str) -> Result<(), BrokerError> {
    if who.may_write(cluster_id) {
        Ok(())
    } else {
        Err(BrokerError::Forbidden {
            who: describe(who),
            action: format!("{action} of cluster {cluster_id:?}"),
        })
    }
}

pub(crate) fn require_admin(who: &Identity, action: &str) -> Result<(), BrokerError> {
    if *who == Identity::Admin {
        Ok(())
    } else {
        Err(BrokerError::Forbidden { who: describe(who), action: action.to_owned() })
    }
}

pub(crate) fn require_read(who: &Identity) -> Result<(), BrokerError> {
    if who.may_read() {
        Ok(())
    } else {
        Err(BrokerError::Forbidden { who: describe(who), action: "read the cluster set".into() })
    }
}

pub struct Broker {
    /// Never held across an await.
    pub(crate) cache: RwLock<Cache>,
    pub(crate) store: Box<dyn Store>,
    writer: tokio::sync::Mutex<()>,
    revision: watch::Sender<u64>,
    leases: Leases,
    /// The broker's own addresses: no cluster may claim a prefix covering them.
    own_addresses: RwLock<Vec<IpAddr>>,
    write_rate: RwLock<Arc<WriteRate>>,
    /// The relay, made on first use ([`Broker::relay`]).
    relay: std::sync::OnceLock<Arc<crate::relay::Relay>>,
    /// Cluster credentials by relay credential id. Never held across an await.
    relay_ids: std::sync::Mutex<crate::credentials::RelayIds>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("revision", &*self.revision.borrow()).finish_non_exhaustive()
    }
}

/// A lock whose holder panicked still guards consistent data here (every change under these
/// locks completes before they are released), so poisoning is ignored.
pub(crate) fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Broker {
    pub async fn new(store: impl Store) -> Result<Arc<Self>, BrokerError> {
        Self::with_lease(store, DEFAULT_LEASE).await
    }

    /// A broker whose endpoint records expire `lease` after their last heartbeat. Endpoints
    /// already stored get a full lease from now (a broker restart expires nobody). Call it on
    /// the runtime that will serve the broker: a shared store follows the other replicas'
    /// commits from a task there.
    pub async fn with_lease(store: impl Store, lease: Duration) -> Result<Arc<Self>, BrokerError> {
        let (rev, items) = store.list().await?;
        let cache = Cache::new(rev, items, store.history());
        let leases = Leases::new(lease, &cache.records, Instant::now());
        let broker = Arc::new(Self {
            cache: RwLock::new(cache),
            store: Box::new(store),
            writer: tokio::sync::Mutex::new(()),
            revision: watch::channel(rev).0,
            leases,
            own_addresses: RwLock::new(Vec::new()),
            write_rate: RwLock::new(Arc::new(WriteRate::new(DEFAULT_WRITES_PER_SECOND, DEFAULT_WRITE_BURST))),
            relay: std::sync::OnceLock::new(),
            relay_ids: std::sync::Mutex::default(),
        });
        // Commits by other replicas of a shared store reach this one's cache from here.
        let weak = Arc::downgrade(&broker);
        broker.store.follow(
            rev,
            Box::new(move |item| {
                if let Some(b) = weak.upgrade() {
                    match item {
                        Followed::Events(events) => b.publish(&events),
                        Followed::Reset { revision, records } => b.reset(revision, records),
                    }
                }
            }),
        );
        Ok(broker)
    }

    pub(crate) fn relay_ids(&self) -> std::sync::MutexGuard<'_, crate::credentials::RelayIds> {
        self.relay_ids.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn relay_cell(&self) -> &std::sync::OnceLock<Arc<crate::relay::Relay>> {
        &self.relay
    }

    /// Declares the addresses this broker is reached at (its listen and advertised
    /// addresses): a cluster whose CIDRs cover one is refused, since every gateway would then
    /// route the broker's traffic into that cluster's tunnel.
    pub fn protect_addresses(&self, addrs: impl IntoIterator<Item = IpAddr>) {
        let mut own = write(&self.own_addresses);
        own.extend(addrs);
        own.sort();
        own.dedup();
    }

    /// Sets every writer's budget: `per_second` sustained, `burst` at once.
    pub fn set_write_rate(&self, per_second: u32, burst: u32) {
        *write(&self.write_rate) = Arc::new(WriteRate::new(per_second, burst));
    }

    /// One write by `who` (holding the token hashed `caller_hash`): within its budget, or 429.
    pub fn check_write_rate(&self, who: &Identity, caller_hash: &str) -> Result<(), BrokerError> {
        let key = match who {
            Identity::Admin => return Ok(()),
            Identity::Cluster(id) | Identity::Reader(id) => format!("cluster/{id}"),
            Identity::Join => format!("join/{caller_hash}"),
        };
        let rate = Arc::clone(&read(&self.write_rate));
        rate.take(&key, Instant::now()).map_err(|wait| BrokerError::TooManyRequests {
            who: describe(who),
            per_second: rate.per_second,
            burst: rate.burst,
            retry_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1),
        })
    }

    /// Takes the writer's turn.
    pub(crate) async fn writer(&self) -> Writer<'_> {
        self.writer.lock().await
    }

    /// Deletes the endpoints whose lease ran out before `now`; returns their keys.
    pub async fn expire_endpoints(&self, now: Instant) -> Result<Vec<String>, BrokerError> {
        let expired = self.leases.expired(now);
        if expired.is_empty() {
            return Ok(expired);
        }
        let w = self.writer().await;
        let mut doomed = Vec::new();
        for key in expired {
            // Another replica may have had the heartbeat.
            if let Some(age) = self.store.heartbeat_age(&key).await?
                && age <= self.leases.lease()
            {
                self.leases.renew(&key, now.checked_sub(age).unwrap_or(now));
                continue;
            }
            // Re-checked under the writer's turn: a heartbeat may have arrived meanwhile.
            if self.leases.take_expired(&key, now) {
                doomed.push(key);
            }
        }
        self.transact(&w, |state| Ok(rules::delete_present(state, &doomed))).await?;
        for k in &doomed {
            info!(key = %k, lease = ?self.leases.lease(), "endpoint expired: no heartbeat");
        }
        Ok(doomed)
    }

    /// Expires endpoints every second, forever (spawn it next to the server).
    pub async fn run_expiry(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1).min(self.leases.lease() / 2));
        let mut last_prune = Instant::now();
        loop {
            tick.tick().await;
            if let Err(e) = self.expire_endpoints(Instant::now()).await {
                tracing::warn!(error = %e, "expiring endpoints failed");
            }
            // Expired credentials already fail; deleting them is housekeeping (once a minute).
            if last_prune.elapsed() >= Duration::from_secs(60) {
                last_prune = Instant::now();
                if let Err(e) = self.prune_credentials().await {
                    tracing::warn!(error = %e, "deleting expired credentials failed");
                }
            }
        }
    }

    /// Applies a commit's events to the cache, then wakes the watchers. Called for this
    /// replica's commits and by the follower of a shared store; whichever comes second finds
    /// the revision already applied. Revisions are applied strictly in order.
    fn publish(&self, events: &[WatchEvent]) {
        if !write(&self.cache).apply(events) {
            return;
        }
        // Endpoints written through other replicas get a lease here too.
        self.leases.follow(events, Instant::now());
        if let Some(last) = events.last() {
            self.revision.send_replace(last.revision);
        }
    }

    /// Replaces the cache with a fresh list (never backwards).
    fn reset(&self, revision: u64, records: Vec<Object>) {
        {
            let mut cache = write(&self.cache);
            if !cache.reset(revision, records) {
                return;
            }
            self.leases.reset(&cache.records, Instant::now());
        }
        self.revision.send_replace(revision);
    }

    /// Runs a planner ([`rules`]) on the cache and commits its plan against the revision it
    /// saw. When another replica committed first, waits for the cache to catch up and plans
    /// again, so the rules are always checked on the state the commit lands on.
    async fn transact(
        &self,
        _turn: &Writer<'_>,
        mut plan: impl FnMut(rules::State<'_>) -> Result<Plan, BrokerError> + Send,
    ) -> Result<Applied, BrokerError> {
        const ATTEMPTS: usize = 50;
        for attempt in 1..=ATTEMPTS {
            let (base, changes) = {
                let cache = read(&self.cache);
                let addresses = read(&self.own_addresses);
                let state = rules::State { records: &cache.records, broker_addresses: &addresses };
                match plan(state)? {
                    Plan::Unchanged(obj) => return Ok(Applied::Unchanged(obj)),
                    Plan::Commit(changes) if changes.is_empty() => return Ok(Applied::Committed(Vec::new())),
                    Plan::Commit(changes) => (cache.revision, changes),
                }
            };
            match self.store.commit(base, changes).await {
                Ok(events) => {
                    self.publish(&events);
                    return Ok(Applied::Committed(events));
                }
                Err(StoreError::Conflict { current, .. }) if attempt < ATTEMPTS => {
                    debug!(base, current, attempt, "another replica committed first; planning again");
                    self.catch_up(current).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        unreachable!("the last attempt returns")
    }

    /// Commits a put's plan; returns the stored object (the old one when nothing changed).
    pub(crate) async fn put(
        &self,
        turn: &Writer<'_>,
        plan: impl FnMut(rules::State<'_>) -> Result<Plan, BrokerError> + Send,
    ) -> Result<Object, BrokerError> {
        match self.transact(turn, plan).await? {
            Applied::Unchanged(obj) => Ok(*obj),
            Applied::Committed(events) => {
                // A put plans one change, and a committed change is one event.
                let obj = events.into_iter().next().map(|e| e.object).expect("a committed put has its event");
                info!(key = obj.record.key(), revision = obj.resource_version, "record stored");
                Ok(obj)
            }
        }
    }

    /// Commits a delete's plan; returns the deleted objects.
    async fn delete(
        &self,
        turn: &Writer<'_>,
        plan: impl FnMut(rules::State<'_>) -> Result<Plan, BrokerError> + Send,
    ) -> Result<Vec<Object>, BrokerError> {
        match self.transact(turn, plan).await? {
            Applied::Committed(events) => Ok(events.into_iter().map(|e| e.object).collect()),
            Applied::Unchanged(_) => Ok(Vec::new()),
        }
    }

    /// Waits briefly for the follower to bring the cache to `revision`, else re-lists.
    async fn catch_up(&self, revision: u64) -> Result<(), BrokerError> {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if read(&self.cache).revision >= revision {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let (rev, records) = self.store.list().await?;
        self.reset(rev, records);
        Ok(())
    }

    /// Reads the cached records.
    pub(crate) fn with_records<T>(&self, f: impl FnOnce(&crate::cache::Records) -> T) -> T {
        f(&read(&self.cache).records)
    }

    /// The stored record under `key` (from the cache).
    pub(crate) fn stored(&self, key: &str) -> Option<Object> {
        read(&self.cache).records.get(key).cloned()
    }

    pub fn list(&self, who: &Identity) -> Result<ListResponse, BrokerError> {
        require_read(who)?;
        let cache = read(&self.cache);
        Ok(ListResponse { resource_version: cache.revision, items: cache.records.all().cloned().collect() })
    }

    /// Creates or replaces a cluster record.
    pub async fn put_cluster(&self, who: &Identity, c: ClusterRecord) -> Result<Object, BrokerError> {
        require_write(who, &c.cluster_id, "write the cluster record")?;
        causeway_broker_api::validate_cluster(&c)?;
        let w = self.writer().await;
        self.put(&w, |state| rules::put_cluster(state, &c, false)).await
    }

    /// Deletes a cluster and all its endpoints, as one revision, and revokes its credentials
    /// (a cluster that left must not come back by re-registering).
    pub async fn delete_cluster(&self, who: &Identity, cluster_id: &str) -> Result<Vec<Object>, BrokerError> {
        require_write(who, cluster_id, "delete the cluster")?;
        let w = self.writer().await;
        let deleted = self.delete(&w, |state| rules::delete_cluster(state, cluster_id)).await?;
        self.revoke_cluster(&w, cluster_id).await?;
        info!(cluster = cluster_id, "cluster and its endpoints deleted");
        Ok(deleted)
    }

    /// Creates or replaces an endpoint record of a registered cluster.
    pub async fn put_endpoint(&self, who: &Identity, e: EndpointRecord) -> Result<Object, BrokerError> {
        require_write(who, &e.cluster_id, "write an endpoint")?;
        causeway_broker_api::validate_endpoint(&e)?;
        let w = self.writer().await;
        let obj = self.put(&w, |state| rules::put_endpoint(state, &e)).await?;
        // Changed or not, a PUT of the endpoint is its gateway's heartbeat, here and (for
        // shared stores) for the other replicas.
        let key = endpoint_key(&e.cluster_id, &e.hostname);
        self.leases.renew(&key, Instant::now());
        self.store.heartbeat(&key).await?;
        Ok(obj)
    }

    /// Creates or replaces a cluster-set policy rule (admin only: policy binds every cluster).
    pub async fn put_policy(
        &self,
        who: &Identity,
        p: causeway_broker_api::PolicyRecord,
    ) -> Result<Object, BrokerError> {
        require_admin(who, "write cluster-set policy")?;
        causeway_broker_api::validate_policy(&p)?;
        self.put_set_record(Record::Policy(p)).await
    }

    /// Sets the action for traffic no policy rule matches (admin only).
    pub async fn put_policy_default(
        &self,
        who: &Identity,
        d: causeway_broker_api::PolicyDefaultRecord,
    ) -> Result<Object, BrokerError> {
        require_admin(who, "set the default policy action")?;
        self.put_set_record(Record::PolicyDefault(d)).await
    }

    async fn put_set_record(&self, record: Record) -> Result<Object, BrokerError> {
        let w = self.writer().await;
        self.put(&w, |state| rules::put_set_record(state, &record)).await
    }

    /// Publishes one of a cluster's exported services; its IPs must lie in the cluster's
    /// service CIDRs (its global CIDR in overlap mode).
    pub async fn put_service(
        &self,
        who: &Identity,
        svc: causeway_broker_api::ServiceExportRecord,
    ) -> Result<Object, BrokerError> {
        require_write(who, &svc.cluster_id, "export a service")?;
        causeway_broker_api::validate_service(&svc)?;
        let w = self.writer().await;
        self.put(&w, |state| rules::put_service(state, &svc)).await
    }

    pub async fn delete_service(
        &self,
        who: &Identity,
        cluster_id: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Vec<Object>, BrokerError> {
        require_write(who, cluster_id, "unexport a service")?;
        let w = self.writer().await;
        self.delete(&w, |state| rules::delete_service(state, cluster_id, namespace, name)).await
    }

    /// Sets the cluster set's settings (admin only). Turning overlap mode on needs every
    /// cluster to carry a unique global CIDR; turning it off needs their pod and service
    /// CIDRs not to overlap.
    pub async fn put_cluster_set(
        &self,
        who: &Identity,
        settings: causeway_broker_api::ClusterSetRecord,
    ) -> Result<Object, BrokerError> {
        require_admin(who, "change the cluster set's settings")?;
        let w = self.writer().await;
        let obj = self.put(&w, |state| rules::put_cluster_set(state, &settings)).await?;
        info!(overlap_mode = settings.overlap_mode, "cluster-set settings stored");
        Ok(obj)
    }

    /// Deletes a policy rule (admin only).
    pub async fn delete_policy(&self, who: &Identity, name: &str) -> Result<Vec<Object>, BrokerError> {
        require_admin(who, "delete cluster-set policy")?;
        let key = causeway_broker_api::policy_key(name);
        let w = self.writer().await;
        let deleted = self.delete(&w, |state| rules::delete(state, &key)).await?;
        info!(key, "policy deleted");
        Ok(deleted)
    }

    pub async fn delete_endpoint(
        &self,
        who: &Identity,
        cluster_id: &str,
        hostname: &str,
    ) -> Result<Vec<Object>, BrokerError> {
        require_write(who, cluster_id, "delete an endpoint")?;
        let key = endpoint_key(cluster_id, hostname);
        let w = self.writer().await;
        self.delete(&w, |state| rules::delete(state, &key)).await
    }

    /// The changes after `since`; waits up to `wait` for the first one.
    /// Watch requests waiting for a change now (gateways, route agents and DNS servers each
    /// hold one most of the time).
    #[must_use]
    pub fn watchers(&self) -> usize {
        self.revision.receiver_count()
    }

    pub async fn watch(
        &self,
        who: &Identity,
        since: u64,
        wait: Duration,
    ) -> Result<WatchResponse, BrokerError> {
        require_read(who)?;
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
                let cached = read(&self.cache).since(since);
                let found = match cached {
                    Some(events) => Since::Events(events),
                    None => self.store.events_since(since).await?,
                };
                return match found {
                    Since::Events(events) => Ok(WatchResponse::page(since, events)),
                    Since::Compacted { oldest } => Err(BrokerError::Gone { since, oldest }),
                };
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return Ok(WatchResponse {
                    resource_version: since.max(current),
                    events: Vec::new(),
                    more: false,
                });
            }
        }
    }
}
