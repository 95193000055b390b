//! The broker: credentials, leases, the cache and the watch, and the [`rules`] run on top of a
//! [`Store`]. Check and commit happen under one lock, and a commit lands only on the revision
//! its plan saw, so two clusters racing for overlapping CIDRs cannot both win: the second sees
//! the first.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use causeway_broker_api::{
    ClusterRecord, CredentialKind, EndpointRecord, ListResponse, Object, Record, Token, ValidationError,
    WatchResponse, cluster_key, endpoint_key, validate::Overlap,
};
use tokio::sync::watch;
use tracing::{debug, info};

use crate::{
    auth::{self, Credential, Identity},
    rules::{self, Plan},
    store::{Followed, Since, Store, StoreError},
};

/// What a transaction did.
enum Applied {
    /// Committed as one revision: its events (none when the plan had nothing to change).
    Committed(Vec<causeway_broker_api::WatchEvent>),
    /// The record was stored exactly so already.
    Unchanged(Object),
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("invalid record: {0}")]
    Invalid(#[from] ValidationError),
    #[error("invalid request: {0}")]
    BadRequest(String),
    #[error("{0}")]
    Overlap(Overlap),
    #[error("{0}")]
    GlobalOverlap(causeway_broker_api::GlobalOverlap),
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
    #[error(
        "missing or unknown credential: send `Authorization: Bearer <token>` from your credentials file (causeway join writes one per cluster)"
    )]
    Unauthorized,
    #[error("{who} may not {action}: a cluster may change only its own records")]
    Forbidden { who: String, action: String },
    #[error(
        "cluster {0:?} is already registered; pick another --cluster-id, or use that cluster's own credentials"
    )]
    AlreadyRegistered(String),
    #[error("{0}")]
    OutsidePools(causeway_broker_api::OutsidePools),
    /// A prefix that would swallow infrastructure (an endpoint, the broker), or an address
    /// inside another cluster's prefixes.
    #[error("{0}")]
    AddressConflict(String),
    #[error(
        "publicKey {key} is already used by gateway {hostname:?} of cluster {cluster:?}; every gateway needs its own WireGuard key"
    )]
    DuplicateKey { key: causeway_broker_api::WireGuardKey, cluster: String, hostname: String },
    #[error(
        "cluster {cluster:?} already has {max} {what}, the most the cluster set allows (quota set by its admin with `causeway cluster-set`)"
    )]
    QuotaExceeded { cluster: String, what: &'static str, max: u32 },
    #[error("{who} writes faster than {per_second}/s (burst {burst}); retry in {retry_ms} ms")]
    TooManyRequests { who: String, per_second: u32, burst: u32, retry_ms: u64 },
}

/// Token buckets of writes, one per writer: a member cluster, or one join token (clusters
/// and their readers share their cluster's; the admin is not limited).
#[derive(Debug)]
struct WriteRate {
    per_second: u32,
    burst: u32,
    buckets: Mutex<std::collections::HashMap<String, (f64, std::time::Instant)>>,
}

impl WriteRate {
    /// Takes one token for `key` at `now`, or says how long until one is there.
    fn take(&self, key: &str, now: std::time::Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (tokens, last) = buckets.entry(key.to_owned()).or_insert((f64::from(self.burst), now));
        let refill = now.saturating_duration_since(*last).as_secs_f64() * f64::from(self.per_second);
        *tokens = (*tokens + refill).min(f64::from(self.burst));
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / f64::from(self.per_second.max(1))))
        }
    }
}

/// Default write budget per writer: far above a gateway's heartbeat every 10 s and a burst of
/// exports at start, far below what would keep the broker from serving the others.
pub const DEFAULT_WRITES_PER_SECOND: u32 = 50;
pub const DEFAULT_WRITE_BURST: u32 = 200;

fn describe(who: &Identity) -> String {
    match who {
        Identity::Admin => "the admin credential".into(),
        Identity::Join => "a join credential".into(),
        Identity::Cluster(id) => format!("cluster {id:?}"),
        Identity::Reader(id) => format!("cluster {id:?}'s read-only credential"),
    }
}

fn require_write(who: &Identity, cluster_id: &str, action: &str) -> Result<(), BrokerError> {
    if who.may_write(cluster_id) {
        Ok(())
    } else {
        Err(BrokerError::Forbidden {
            who: describe(who),
            action: format!("{action} of cluster {cluster_id:?}"),
        })
    }
}

fn require_admin(who: &Identity, action: &str) -> Result<(), BrokerError> {
    if *who == Identity::Admin {
        Ok(())
    } else {
        Err(BrokerError::Forbidden { who: describe(who), action: action.to_owned() })
    }
}

fn require_read(who: &Identity) -> Result<(), BrokerError> {
    if who.may_read() {
        Ok(())
    } else {
        Err(BrokerError::Forbidden { who: describe(who), action: "read the cluster set".into() })
    }
}

impl BrokerError {
    /// HTTP status and machine-readable code.
    #[must_use]
    pub fn status_code(&self) -> (u16, &'static str) {
        match self {
            Self::Invalid(_) | Self::BadRequest(_) => (400, "Invalid"),
            Self::Overlap(_) => (409, "CidrOverlap"),
            Self::GlobalOverlap(causeway_broker_api::GlobalOverlap::Clash(_)) => (409, "CidrOverlap"),
            Self::GlobalOverlap(causeway_broker_api::GlobalOverlap::Missing(_)) => (400, "Invalid"),
            Self::StaleGeneration { .. } => (409, "StaleGeneration"),
            Self::ClusterNotRegistered(_) => (409, "ClusterNotRegistered"),
            Self::NotFound(_) => (404, "NotFound"),
            Self::Gone { .. } => (410, "Gone"),
            Self::Store(_) => (500, "Internal"),
            Self::Unauthorized => (401, "Unauthorized"),
            Self::Forbidden { .. } => (403, "Forbidden"),
            Self::AlreadyRegistered(_) => (409, "AlreadyRegistered"),
            Self::OutsidePools(_) => (403, "OutsidePools"),
            Self::AddressConflict(_) => (409, "AddressConflict"),
            Self::DuplicateKey { .. } => (409, "DuplicateKey"),
            Self::QuotaExceeded { .. } => (409, "QuotaExceeded"),
            Self::TooManyRequests { .. } => (429, "TooManyRequests"),
        }
    }
}

/// The broker: rules plus store plus a revision signal for long-polling watchers.
/// Events kept in memory for watchers; older revisions are read from the store.
const CACHED_EVENTS: usize = 10_000;

/// What the store holds, in memory: the current records and the recent events. Watchers and
/// checks read this; the store stays the durable truth (updated first, under the store lock).
#[derive(Default)]
struct Cache {
    records: std::collections::BTreeMap<String, Object>,
    events: std::collections::VecDeque<causeway_broker_api::WatchEvent>,
    revision: u64,
    /// Never reach further back than the store does (same answers either way).
    window: u64,
}

impl Cache {
    /// Events after `since`, if the cache reaches back that far.
    fn since(&self, since: u64) -> Option<Vec<causeway_broker_api::WatchEvent>> {
        if since >= self.revision {
            return Some(Vec::new());
        }
        let oldest = self.events.front()?.revision;
        if since + 1 < oldest {
            return None;
        }
        Some(self.events.iter().filter(|e| e.revision > since).cloned().collect())
    }
}

pub struct Broker {
    cache: std::sync::RwLock<Cache>,
    /// Writers (check + commit) hold it exclusively; reads (credentials, old events) share it.
    store: std::sync::RwLock<Box<dyn Store>>,
    revision: watch::Sender<u64>,
    /// Endpoint key → last heartbeat (a PUT of the endpoint, changed or not).
    heartbeats: Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// How long an endpoint lives without a heartbeat.
    lease: Duration,
    /// The broker's own addresses: no cluster may claim a prefix covering them.
    own_addresses: std::sync::RwLock<Vec<std::net::IpAddr>>,
    write_rate: std::sync::RwLock<Arc<WriteRate>>,
}

/// Default endpoint lease: three missed 10-second heartbeats.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("revision", &*self.revision.borrow()).finish_non_exhaustive()
    }
}

impl Broker {
    pub fn new(store: impl Store) -> Result<Arc<Self>, BrokerError> {
        Self::with_lease(store, DEFAULT_LEASE)
    }

    /// A broker whose endpoint records expire `lease` after their last heartbeat. Endpoints
    /// already stored get a full lease from now (a broker restart expires nobody).
    pub fn with_lease(store: impl Store, lease: Duration) -> Result<Arc<Self>, BrokerError> {
        let (rev, items) = store.list()?;
        let (revision, _) = watch::channel(rev);
        let now = std::time::Instant::now();
        let heartbeats = items
            .iter()
            .filter(|o| matches!(o.record, Record::Endpoint(_)))
            .map(|o| (o.record.key(), now))
            .collect();
        let cache = Cache {
            records: items.iter().map(|o| (o.record.key(), o.clone())).collect(),
            events: std::collections::VecDeque::new(),
            revision: rev,
            window: store.history().min(CACHED_EVENTS as u64),
        };
        let broker = Arc::new(Self {
            cache: std::sync::RwLock::new(cache),
            store: std::sync::RwLock::new(Box::new(store)),
            revision,
            heartbeats: Mutex::new(heartbeats),
            lease,
            own_addresses: std::sync::RwLock::new(Vec::new()),
            write_rate: std::sync::RwLock::new(Arc::new(WriteRate {
                per_second: DEFAULT_WRITES_PER_SECOND,
                burst: DEFAULT_WRITE_BURST,
                buckets: Mutex::default(),
            })),
        });
        // Commits by other replicas of a shared store reach this one's cache from here.
        let weak = Arc::downgrade(&broker);
        broker.lock().follow(
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

    /// Declares the addresses this broker is reached at (its listen and advertised
    /// addresses): a cluster whose CIDRs cover one is refused, since every gateway would then
    /// route the broker's traffic into that cluster's tunnel.
    pub fn protect_addresses(&self, addrs: impl IntoIterator<Item = std::net::IpAddr>) {
        let mut own = self.own_addresses.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        own.extend(addrs);
        own.sort();
        own.dedup();
    }

    /// Sets every writer's budget: `per_second` sustained, `burst` at once.
    pub fn set_write_rate(&self, per_second: u32, burst: u32) {
        *self.write_rate.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(WriteRate {
            per_second: per_second.max(1),
            burst: burst.max(1),
            buckets: Mutex::default(),
        });
    }

    /// One write by `who` (holding the token hashed `caller_hash`): within its budget, or 429.
    pub fn check_write_rate(&self, who: &Identity, caller_hash: &str) -> Result<(), BrokerError> {
        let key = match who {
            Identity::Admin => return Ok(()),
            Identity::Cluster(id) | Identity::Reader(id) => format!("cluster/{id}"),
            Identity::Join => format!("join/{caller_hash}"),
        };
        let rate = Arc::clone(&self.write_rate.read().unwrap_or_else(std::sync::PoisonError::into_inner));
        rate.take(&key, std::time::Instant::now()).map_err(|wait| BrokerError::TooManyRequests {
            who: describe(who),
            per_second: rate.per_second,
            burst: rate.burst,
            retry_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1),
        })
    }

    fn heartbeats(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, std::time::Instant>> {
        self.heartbeats.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Renews an endpoint's lease, here and (for shared stores) for the other replicas.
    fn beat(&self, store: &mut dyn Store, key: &str) -> Result<(), BrokerError> {
        self.heartbeats().insert(key.to_owned(), std::time::Instant::now());
        store.heartbeat(key)?;
        Ok(())
    }

    /// Deletes the endpoints whose lease ran out before `now`; returns their keys.
    pub fn expire_endpoints(&self, now: std::time::Instant) -> Result<Vec<String>, BrokerError> {
        let expired: Vec<String> = self
            .heartbeats()
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(**t) > self.lease)
            .map(|(k, _)| k.clone())
            .collect();
        if expired.is_empty() {
            return Ok(expired);
        }
        let mut store = self.lock();
        let mut doomed = Vec::new();
        for key in expired {
            // Another replica may have had the heartbeat.
            if let Some(age) = store.heartbeat_age(&key)?
                && age <= self.lease
            {
                self.heartbeats().insert(key, now.checked_sub(age).unwrap_or(now));
                continue;
            }
            // Re-check under the store lock: a heartbeat may have arrived meanwhile.
            let mut hb = self.heartbeats();
            if hb.get(&key).is_some_and(|t| now.saturating_duration_since(*t) > self.lease) {
                hb.remove(&key);
                doomed.push(key);
            }
        }
        self.transact(&mut **store, |state| Ok(rules::delete_present(state, &doomed)))?;
        for k in &doomed {
            info!(key = %k, lease = ?self.lease, "endpoint expired: no heartbeat");
        }
        Ok(doomed)
    }

    /// Expires endpoints every second, forever (spawn it next to the server).
    pub async fn run_expiry(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1).min(self.lease / 2));
        let mut last_prune = std::time::Instant::now();
        loop {
            tick.tick().await;
            let this = Arc::clone(&self);
            let res =
                tokio::task::spawn_blocking(move || this.expire_endpoints(std::time::Instant::now())).await;
            if let Ok(Err(e)) = res {
                tracing::warn!(error = %e, "expiring endpoints failed");
            }
            // Expired credentials already fail; deleting them is housekeeping (once a minute).
            if last_prune.elapsed() >= Duration::from_secs(60) {
                last_prune = std::time::Instant::now();
                let this = Arc::clone(&self);
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || this.prune_credentials()).await {
                    tracing::warn!(error = %e, "deleting expired credentials failed");
                }
            }
        }
    }

    fn lock(&self) -> std::sync::RwLockWriteGuard<'_, Box<dyn Store>> {
        // A panic while holding the lock cannot leave the store half-written (commits are
        // atomic), so a poisoned lock is still usable.
        self.store.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Box<dyn Store>> {
        self.store.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies a commit's events to the cache, then wakes the watchers. Called for this
    /// replica's commits and by the follower of a shared store; whichever comes second finds
    /// the revision already applied. Revisions are applied strictly in order.
    fn publish(&self, events: &[causeway_broker_api::WatchEvent]) {
        let (Some(first), Some(last)) = (events.first(), events.last()) else { return };
        {
            let mut cache = self.cache.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            if first.revision != cache.revision + 1 {
                // Already applied, or ahead of the follower (which will deliver in order).
                return;
            }
            for e in events {
                let key = e.object.record.key();
                match e.kind {
                    causeway_broker_api::EventType::Put => cache.records.insert(key, e.object.clone()),
                    causeway_broker_api::EventType::Delete => cache.records.remove(&key),
                };
                cache.events.push_back(e.clone());
            }
            while cache.events.front().is_some_and(|e| last.revision - e.revision >= cache.window) {
                cache.events.pop_front();
            }
            cache.revision = last.revision;
        }
        // Endpoints written through other replicas get a lease here too.
        let now = std::time::Instant::now();
        let mut hb = self.heartbeats();
        for e in events {
            if let Record::Endpoint(_) = e.object.record {
                let key = e.object.record.key();
                match e.kind {
                    causeway_broker_api::EventType::Put => {
                        hb.entry(key).or_insert(now);
                    }
                    causeway_broker_api::EventType::Delete => {
                        hb.remove(&key);
                    }
                }
            }
        }
        drop(hb);
        self.revision.send_replace(last.revision);
    }

    /// Replaces the cache with a fresh list (never backwards). The recent events are dropped:
    /// watchers then read them from the store.
    fn reset(&self, revision: u64, records: Vec<Object>) {
        {
            let mut cache = self.cache.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            if revision <= cache.revision {
                return;
            }
            cache.records = records.into_iter().map(|o| (o.record.key(), o)).collect();
            cache.events.clear();
            cache.revision = revision;
            let now = std::time::Instant::now();
            let mut hb = self.heartbeats();
            hb.retain(|k, _| cache.records.contains_key(k));
            for (k, o) in &cache.records {
                if matches!(o.record, Record::Endpoint(_)) {
                    hb.entry(k.clone()).or_insert(now);
                }
            }
        }
        self.revision.send_replace(revision);
    }

    /// Runs a planner ([`rules`]) on the cache and commits its plan against the revision it
    /// saw. When another replica committed first, waits for the cache to catch up and plans
    /// again, so the rules are always checked on the state the commit lands on.
    fn transact(
        &self,
        store: &mut dyn Store,
        mut plan: impl FnMut(rules::State<'_>) -> Result<Plan, BrokerError>,
    ) -> Result<Applied, BrokerError> {
        const ATTEMPTS: usize = 50;
        let broker_addresses =
            self.own_addresses.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        for attempt in 1..=ATTEMPTS {
            let (base, items) = {
                let cache = self.cache.read().unwrap_or_else(std::sync::PoisonError::into_inner);
                (cache.revision, cache.records.values().cloned().collect::<Vec<_>>())
            };
            let changes = match plan(rules::State { items: &items, broker_addresses: &broker_addresses })? {
                Plan::Unchanged(obj) => return Ok(Applied::Unchanged(obj)),
                Plan::Commit(changes) if changes.is_empty() => return Ok(Applied::Committed(Vec::new())),
                Plan::Commit(changes) => changes,
            };
            match store.commit(base, changes) {
                Ok(events) => {
                    self.publish(&events);
                    return Ok(Applied::Committed(events));
                }
                Err(StoreError::Conflict { current, .. }) if attempt < ATTEMPTS => {
                    debug!(base, current, attempt, "another replica committed first; planning again");
                    self.catch_up(store, current)?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        unreachable!("the last attempt returns")
    }

    /// Commits a put's plan; returns the stored object (the old one when nothing changed).
    fn put(
        &self,
        store: &mut dyn Store,
        plan: impl FnMut(rules::State<'_>) -> Result<Plan, BrokerError>,
    ) -> Result<Object, BrokerError> {
        match self.transact(store, plan)? {
            Applied::Unchanged(obj) => Ok(obj),
            Applied::Committed(events) => {
                // A put plans one change, and a committed change is one event.
                let obj = events.into_iter().next().map(|e| e.object).expect("a committed put has its event");
                info!(key = obj.record.key(), revision = obj.resource_version, "record stored");
                Ok(obj)
            }
        }
    }

    /// Commits a delete's plan; returns the deleted objects.
    fn delete(
        &self,
        store: &mut dyn Store,
        plan: impl FnMut(rules::State<'_>) -> Result<Plan, BrokerError>,
    ) -> Result<Vec<Object>, BrokerError> {
        match self.transact(store, plan)? {
            Applied::Committed(events) => Ok(events.into_iter().map(|e| e.object).collect()),
            Applied::Unchanged(_) => Ok(Vec::new()),
        }
    }

    /// Waits briefly for the follower to bring the cache to `revision`, else re-lists.
    fn catch_up(&self, store: &mut dyn Store, revision: u64) -> Result<(), BrokerError> {
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < deadline {
            if self.cache.read().unwrap_or_else(std::sync::PoisonError::into_inner).revision >= revision {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let (rev, records) = store.list()?;
        self.reset(rev, records);
        Ok(())
    }

    /// The current records (from the cache).
    fn items(&self) -> Vec<Object> {
        self.cache
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .records
            .values()
            .cloned()
            .collect()
    }

    /// The identity behind a bearer token (unknown, revoked or expired: 401).
    pub fn authenticate(&self, token: Option<&str>) -> Result<Identity, BrokerError> {
        let token = token.ok_or(BrokerError::Unauthorized)?;
        match self.read().credential(&auth::hash(token))? {
            Some(c) if c.valid_at(auth::now_unix()) => Ok(c.identity),
            _ => Err(BrokerError::Unauthorized),
        }
    }

    /// Creates a credential for `identity` and returns its token (shown once, stored hashed).
    pub fn issue(&self, identity: &Identity) -> Result<Token, BrokerError> {
        let token = auth::new_token();
        self.lock().put_credential(&auth::hash(&token.0), &Credential::new(identity.clone()))?;
        Ok(token)
    }

    /// Issues an admin or join credential (admin only), optionally with a TTL and, for a join
    /// token, for one registration only.
    pub fn issue_limited(
        &self,
        who: &Identity,
        req: &causeway_broker_api::IssueRequest,
    ) -> Result<causeway_broker_api::IssueResponse, BrokerError> {
        require_admin(who, "issue credentials")?;
        let identity = match req.kind {
            CredentialKind::Admin => Identity::Admin,
            CredentialKind::Join => Identity::Join,
            other => {
                return Err(BrokerError::BadRequest(format!(
                    "kind: {other:?} credentials come from join (cluster) or from the cluster (reader), not from here"
                )));
            }
        };
        if req.single_use && identity != Identity::Join {
            return Err(BrokerError::BadRequest("singleUse: only join tokens can be single-use".into()));
        }
        if req.ttl_seconds == Some(0) {
            return Err(BrokerError::BadRequest(
                "ttlSeconds: 0 would never work; omit it for no expiry".into(),
            ));
        }
        let mut cred = Credential::new(identity);
        cred.expires_at = req.ttl_seconds.map(|t| cred.issued_at.saturating_add(t));
        cred.single_use = req.single_use;
        let token = auth::new_token();
        let hash = auth::hash(&token.0);
        self.lock().put_credential(&hash, &cred)?;
        info!(id = %auth::credential_id(&hash), kind = ?req.kind, ttl = ?req.ttl_seconds, single_use = req.single_use,
            "credential issued");
        Ok(causeway_broker_api::IssueResponse {
            id: auth::credential_id(&hash),
            token,
            expires_at: cred.expires_at,
        })
    }

    /// A read-only credential for a cluster (route agents), issued by that cluster or the admin.
    pub fn issue_reader(
        &self,
        who: &Identity,
        cluster_id: &str,
    ) -> Result<causeway_broker_api::IssueResponse, BrokerError> {
        require_write(who, cluster_id, "issue a reader credential")?;
        let mut store = self.lock();
        if Self::stored(&self.items(), &cluster_key(cluster_id)).is_none() {
            return Err(BrokerError::NotFound(cluster_key(cluster_id)));
        }
        let token = auth::new_token();
        let hash = auth::hash(&token.0);
        store.put_credential(&hash, &Credential::new(Identity::Reader(cluster_id.to_owned())))?;
        info!(cluster = %cluster_id, id = %auth::credential_id(&hash), "reader credential issued");
        Ok(causeway_broker_api::IssueResponse { id: auth::credential_id(&hash), token, expires_at: None })
    }

    /// Every credential, without its token (admin only).
    pub fn list_credentials(
        &self,
        who: &Identity,
    ) -> Result<Vec<causeway_broker_api::CredentialInfo>, BrokerError> {
        require_admin(who, "list credentials")?;
        let mut out: Vec<causeway_broker_api::CredentialInfo> = self
            .read()
            .credentials()?
            .into_iter()
            .map(|(hash, c)| causeway_broker_api::CredentialInfo {
                id: auth::credential_id(&hash),
                kind: match c.identity {
                    Identity::Admin => CredentialKind::Admin,
                    Identity::Join => CredentialKind::Join,
                    Identity::Cluster(_) => CredentialKind::Cluster,
                    Identity::Reader(_) => CredentialKind::Reader,
                },
                cluster_id: c.identity.cluster().map(str::to_owned),
                issued_at: c.issued_at,
                expires_at: c.expires_at,
                single_use: c.single_use,
            })
            .collect();
        out.sort_by(|a, b| (a.kind as u8, &a.cluster_id, &a.id).cmp(&(b.kind as u8, &b.cluster_id, &b.id)));
        Ok(out)
    }

    /// Revokes one credential by its id (admin only). The caller's own is refused: revoking it
    /// would lock the operator out mid-command; issue another admin credential first.
    pub fn revoke_credential(
        &self,
        who: &Identity,
        caller_hash: &str,
        id: &str,
    ) -> Result<usize, BrokerError> {
        require_admin(who, "revoke credentials")?;
        if id.len() < 12 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BrokerError::BadRequest(format!(
                "{id:?} is not a credential id (12 hex digits, as `causeway credentials list` shows)"
            )));
        }
        let mut store = self.lock();
        let doomed: Vec<String> =
            store.credentials()?.into_iter().map(|(h, _)| h).filter(|h| h.starts_with(id)).collect();
        if doomed.is_empty() {
            return Err(BrokerError::NotFound(format!("credential {id}")));
        }
        if doomed.iter().any(|h| h == caller_hash) {
            return Err(BrokerError::BadRequest(format!(
                "credential {id} is the one this request uses; revoke it with another admin credential"
            )));
        }
        store.delete_credentials(&doomed)?;
        info!(id, "credential revoked");
        Ok(doomed.len())
    }

    /// Deletes credentials that have expired (rotation overlaps that ended, TTLs that ran out).
    pub fn prune_credentials(&self) -> Result<usize, BrokerError> {
        let now = auth::now_unix();
        let expired: Vec<String> = self
            .read()
            .credentials()?
            .into_iter()
            .filter(|(_, c)| !c.valid_at(now))
            .map(|(h, _)| h)
            .collect();
        if !expired.is_empty() {
            self.lock().delete_credentials(&expired)?;
            debug!(count = expired.len(), "expired credentials deleted");
        }
        Ok(expired.len())
    }

    /// Registers a credential by its token's SHA-256 (idempotent). This is how a broker that
    /// `deploy-broker --kubeconfig` set up learns the admin and join tokens the CLI generated:
    /// only their hashes travel, in a Secret.
    pub fn bootstrap(&self, token_sha256: &str, identity: &Identity) -> Result<(), BrokerError> {
        if token_sha256.len() != 64 || !token_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BrokerError::BadRequest(format!(
                "bootstrap credential {token_sha256:?} is not a SHA-256 in hex"
            )));
        }
        let hash = token_sha256.to_ascii_lowercase();
        if self.read().credential(&hash)?.is_some_and(|c| c.identity == *identity) {
            return Ok(());
        }
        self.lock().put_credential(&hash, &Credential::new(identity.clone()))?;
        Ok(())
    }

    pub fn list(&self, who: &Identity) -> Result<ListResponse, BrokerError> {
        require_read(who)?;
        let cache = self.cache.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(ListResponse {
            resource_version: cache.revision,
            items: cache.records.values().cloned().collect(),
        })
    }

    /// Registers a new cluster and issues its own credential (join or admin credential;
    /// `caller_hash`: the hash of the token used). A single-use join token is spent by it.
    /// The same caller joining again with the same record gets a fresh credential for the
    /// cluster (its first answer may have been lost); anybody else gets 409.
    pub fn join(
        &self,
        who: &Identity,
        caller_hash: &str,
        c: ClusterRecord,
    ) -> Result<(Object, Token), BrokerError> {
        if !matches!(who, Identity::Join | Identity::Admin) {
            return Err(BrokerError::Forbidden {
                who: describe(who),
                action: "register a new cluster".into(),
            });
        }
        causeway_broker_api::validate_cluster(&c)?;
        let mut store = self.lock();
        // Re-read under the lock: a racing join may have spent a single-use token.
        let caller = match store.credential(caller_hash)? {
            Some(cred) if cred.valid_at(auth::now_unix()) => cred,
            _ => return Err(BrokerError::Unauthorized),
        };
        let caller_id = auth::credential_id(caller_hash);
        let id = c.cluster_id.clone();
        let identity = Identity::Cluster(id.clone());
        let existing = Self::stored(&self.items(), &cluster_key(&id)).cloned();
        let obj = match existing {
            Some(obj)
                if obj.record == Record::Cluster(c.clone())
                    && store.credentials()?.iter().any(|(_, k)| {
                        k.identity == identity && k.issued_by.as_deref() == Some(caller_id.as_str())
                    }) =>
            {
                info!(cluster = %id, "the same caller joined again: a fresh credential for the cluster");
                obj
            }
            _ => self.put(&mut **store, |state| rules::put_cluster(state, &c, true))?,
        };
        let token = auth::new_token();
        let mut cred = Credential::new(identity);
        cred.issued_by = Some(caller_id);
        store.put_credential(&auth::hash(&token.0), &cred)?;
        if caller.single_use {
            store.delete_credentials(&[caller_hash.to_owned()])?;
            info!(cluster = %id, "single-use join token spent");
        }
        info!(cluster = %id, "cluster joined");
        Ok((obj, token))
    }

    /// A new credential for the cluster. Its old ones keep working for `overlap` (so gateways
    /// and agents can be moved over without an outage), then stop; zero: at once. Returns the
    /// token and when the old ones stop (unix seconds; `None` when there were none).
    pub fn rotate(
        &self,
        who: &Identity,
        cluster_id: &str,
        overlap: Duration,
    ) -> Result<(Token, Option<u64>), BrokerError> {
        require_write(who, cluster_id, "rotate the credentials")?;
        let mut store = self.lock();
        let items = self.items();
        if Self::stored(&items, &cluster_key(cluster_id)).is_none() {
            return Err(BrokerError::NotFound(cluster_key(cluster_id)));
        }
        let identity = Identity::Cluster(cluster_id.to_owned());
        let now = auth::now_unix();
        let old: Vec<(String, Credential)> = store
            .credentials()?
            .into_iter()
            .filter(|(_, c)| c.identity == identity && c.valid_at(now))
            .collect();
        let until = now.saturating_add(overlap.as_secs());
        let issued_by = old.iter().find_map(|(_, c)| c.issued_by.clone());
        if overlap.is_zero() {
            store.delete_credentials(&old.iter().map(|(h, _)| h.clone()).collect::<Vec<_>>())?;
        } else {
            for (hash, mut c) in old.clone() {
                c.expires_at = Some(c.expires_at.map_or(until, |t| t.min(until)));
                store.put_credential(&hash, &c)?;
            }
        }
        let token = auth::new_token();
        let mut cred = Credential::new(identity);
        cred.issued_by = issued_by;
        store.put_credential(&auth::hash(&token.0), &cred)?;
        info!(cluster = %cluster_id, overlap = ?overlap, old = old.len(), "credentials rotated");
        Ok((token, (!old.is_empty()).then_some(if overlap.is_zero() { now } else { until })))
    }

    /// Revokes every credential of the cluster, its readers' too (admin only).
    pub fn revoke(&self, who: &Identity, cluster_id: &str) -> Result<usize, BrokerError> {
        if *who != Identity::Admin {
            return Err(BrokerError::Forbidden { who: describe(who), action: "revoke credentials".into() });
        }
        let n = Self::revoke_cluster(&mut **self.lock(), cluster_id)?;
        info!(cluster = %cluster_id, revoked = n, "credentials revoked");
        Ok(n)
    }

    /// Deletes the cluster's credentials and its readers'; returns how many.
    fn revoke_cluster(store: &mut dyn Store, cluster_id: &str) -> Result<usize, BrokerError> {
        let doomed: Vec<String> = store
            .credentials()?
            .into_iter()
            .filter(|(_, c)| c.identity.cluster() == Some(cluster_id))
            .map(|(h, _)| h)
            .collect();
        store.delete_credentials(&doomed)?;
        Ok(doomed.len())
    }

    fn stored<'a>(items: &'a [Object], key: &str) -> Option<&'a Object> {
        items.iter().find(|o| o.record.key() == key)
    }

    /// Creates or replaces a cluster record.
    pub fn put_cluster(&self, who: &Identity, c: ClusterRecord) -> Result<Object, BrokerError> {
        require_write(who, &c.cluster_id, "write the cluster record")?;
        causeway_broker_api::validate_cluster(&c)?;
        let mut store = self.lock();
        self.put(&mut **store, |state| rules::put_cluster(state, &c, false))
    }

    /// Deletes a cluster and all its endpoints, as one revision, and revokes its credentials
    /// (a cluster that left must not come back by re-registering).
    pub fn delete_cluster(&self, who: &Identity, cluster_id: &str) -> Result<Vec<Object>, BrokerError> {
        require_write(who, cluster_id, "delete the cluster")?;
        let mut store = self.lock();
        let deleted = self.delete(&mut **store, |state| rules::delete_cluster(state, cluster_id))?;
        Self::revoke_cluster(&mut **store, cluster_id)?;
        info!(cluster = cluster_id, "cluster and its endpoints deleted");
        Ok(deleted)
    }

    /// Creates or replaces an endpoint record of a registered cluster.
    pub fn put_endpoint(&self, who: &Identity, e: EndpointRecord) -> Result<Object, BrokerError> {
        require_write(who, &e.cluster_id, "write an endpoint")?;
        causeway_broker_api::validate_endpoint(&e)?;
        let mut store = self.lock();
        let obj = self.put(&mut **store, |state| rules::put_endpoint(state, &e))?;
        // Changed or not, a PUT of the endpoint is its gateway's heartbeat.
        self.beat(&mut **store, &endpoint_key(&e.cluster_id, &e.hostname))?;
        Ok(obj)
    }

    /// Creates or replaces a cluster-set policy rule (admin only: policy binds every cluster).
    pub fn put_policy(
        &self,
        who: &Identity,
        p: causeway_broker_api::PolicyRecord,
    ) -> Result<Object, BrokerError> {
        require_admin(who, "write cluster-set policy")?;
        causeway_broker_api::validate_policy(&p)?;
        self.put_set_record(Record::Policy(p))
    }

    /// Sets the action for traffic no policy rule matches (admin only).
    pub fn put_policy_default(
        &self,
        who: &Identity,
        d: causeway_broker_api::PolicyDefaultRecord,
    ) -> Result<Object, BrokerError> {
        require_admin(who, "set the default policy action")?;
        self.put_set_record(Record::PolicyDefault(d))
    }

    fn put_set_record(&self, record: Record) -> Result<Object, BrokerError> {
        let mut store = self.lock();
        self.put(&mut **store, |state| rules::put_set_record(state, &record))
    }

    /// Publishes one of a cluster's exported services; its IPs must lie in the cluster's
    /// service CIDRs (its global CIDR in overlap mode).
    pub fn put_service(
        &self,
        who: &Identity,
        svc: causeway_broker_api::ServiceExportRecord,
    ) -> Result<Object, BrokerError> {
        require_write(who, &svc.cluster_id, "export a service")?;
        causeway_broker_api::validate_service(&svc)?;
        let mut store = self.lock();
        self.put(&mut **store, |state| rules::put_service(state, &svc))
    }

    pub fn delete_service(
        &self,
        who: &Identity,
        cluster_id: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Vec<Object>, BrokerError> {
        require_write(who, cluster_id, "unexport a service")?;
        let key = causeway_broker_api::service_key(cluster_id, namespace, name);
        let mut store = self.lock();
        self.delete(&mut **store, |state| rules::delete(state, &key))
    }

    /// Sets the cluster set's settings (admin only). Turning overlap mode on needs every
    /// cluster to carry a unique global CIDR; turning it off needs their pod and service
    /// CIDRs not to overlap.
    pub fn put_cluster_set(
        &self,
        who: &Identity,
        settings: causeway_broker_api::ClusterSetRecord,
    ) -> Result<Object, BrokerError> {
        require_admin(who, "change the cluster set's settings")?;
        let mut store = self.lock();
        let obj = self.put(&mut **store, |state| rules::put_cluster_set(state, &settings))?;
        info!(overlap_mode = settings.overlap_mode, "cluster-set settings stored");
        Ok(obj)
    }

    /// Deletes a policy rule (admin only).
    pub fn delete_policy(&self, who: &Identity, name: &str) -> Result<Vec<Object>, BrokerError> {
        require_admin(who, "delete cluster-set policy")?;
        let key = causeway_broker_api::policy_key(name);
        let mut store = self.lock();
        let deleted = self.delete(&mut **store, |state| rules::delete(state, &key))?;
        info!(key, "policy deleted");
        Ok(deleted)
    }

    pub fn delete_endpoint(
        &self,
        who: &Identity,
        cluster_id: &str,
        hostname: &str,
    ) -> Result<Vec<Object>, BrokerError> {
        require_write(who, cluster_id, "delete an endpoint")?;
        let key = endpoint_key(cluster_id, hostname);
        let mut store = self.lock();
        self.delete(&mut **store, |state| rules::delete(state, &key))
    }

    /// The changes after `since`; waits up to `wait` for the first one.
    pub async fn watch(
        self: &Arc<Self>,
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
                let cached =
                    self.cache.read().unwrap_or_else(std::sync::PoisonError::into_inner).since(since);
                let found = match cached {
                    Some(events) => Since::Events(events),
                    None => {
                        let this = Arc::clone(self);
                        tokio::task::spawn_blocking(move || this.read().events_since(since))
                            .await
                            .map_err(|e| BrokerError::BadRequest(format!("watch task failed: {e}")))??
                    }
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
