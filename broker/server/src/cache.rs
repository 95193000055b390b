//! The broker's in-memory copy of the store: the current records, indexed, and the recent
//! events for watchers. The store stays the durable truth; the cache follows its commits (this
//! replica's and, for a shared store, everyone's) strictly in revision order.
//!
//! Record keys are laid out as `<kind>/<cluster>/<name>` (see `causeway_broker_api`'s `*_key`
//! functions), so one ordered map by key is also the index the rules need: a kind is a key
//! range, and one cluster's records of a kind are a narrower one. A lookup is a map lookup
//! and a per-cluster count walks only that cluster's records.

use std::collections::{BTreeMap, VecDeque};

use causeway_broker_api::{
    ClusterRecord, ClusterSetRecord, EndpointRecord, EventType, Object, Record, ServiceExportRecord,
    ServiceImportRecord, WatchEvent,
};

/// Key prefixes of the record kinds the rules look up by range.
const CLUSTERS: &str = "clusters/";
const ENDPOINTS: &str = "endpoints/";
const SERVICES: &str = "services/";
const IMPORTS: &str = "imports/";

/// The current records by key.
#[derive(Clone, Debug, Default)]
pub struct Records(BTreeMap<String, Object>);

impl FromIterator<Object> for Records {
    fn from_iter<I: IntoIterator<Item = Object>>(iter: I) -> Self {
        Self(iter.into_iter().map(|o| (o.record.key(), o)).collect())
    }
}

impl Records {
    #[must_use]
    pub fn get(&self, key: &str) -> Option<&Object> {
        self.0.get(key)
    }

    /// Every record, in key order.
    pub fn all(&self) -> impl Iterator<Item = &Object> {
        self.0.values()
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn prefixed<'a>(&'a self, prefix: String) -> impl Iterator<Item = &'a Object> + Clone + 'a {
        self.0.range(prefix.clone()..).take_while(move |(k, _)| k.starts_with(&prefix)).map(|(_, o)| o)
    }

    pub fn clusters(&self) -> impl Iterator<Item = &ClusterRecord> + Clone {
        self.prefixed(CLUSTERS.to_owned()).filter_map(|o| match &o.record {
            Record::Cluster(c) => Some(c),
            _ => None,
        })
    }

    #[must_use]
    pub fn cluster(&self, id: &str) -> Option<&ClusterRecord> {
        match self.get(&causeway_broker_api::cluster_key(id)).map(|o| &o.record) {
            Some(Record::Cluster(c)) => Some(c),
            _ => None,
        }
    }

    pub fn endpoints(&self) -> impl Iterator<Item = &EndpointRecord> + Clone {
        self.prefixed(ENDPOINTS.to_owned()).filter_map(|o| match &o.record {
            Record::Endpoint(e) => Some(e),
            _ => None,
        })
    }

    /// The cluster's endpoints.
    pub fn endpoints_of(&self, cluster_id: &str) -> impl Iterator<Item = &Object> + Clone {
        self.prefixed(format!("{ENDPOINTS}{cluster_id}/"))
    }

    /// The cluster's exported services.
    pub fn services_of(&self, cluster_id: &str) -> impl Iterator<Item = &Object> + Clone {
        self.prefixed(format!("{SERVICES}{cluster_id}/"))
    }

    /// Every service import, with its key.
    pub fn imports(&self) -> impl Iterator<Item = &ServiceImportRecord> + Clone {
        self.prefixed(IMPORTS.to_owned()).filter_map(|o| match &o.record {
            Record::ServiceImport(i) => Some(i),
            _ => None,
        })
    }

    #[must_use]
    pub fn import(&self, namespace: &str, name: &str) -> Option<&ServiceImportRecord> {
        match self.get(&causeway_broker_api::import_key(namespace, name)).map(|o| &o.record) {
            Some(Record::ServiceImport(i)) => Some(i),
            _ => None,
        }
    }

    /// A cluster's export of `<namespace>/<name>`.
    #[must_use]
    pub fn export(&self, cluster_id: &str, namespace: &str, name: &str) -> Option<&ServiceExportRecord> {
        match self.get(&causeway_broker_api::service_key(cluster_id, namespace, name)).map(|o| &o.record) {
            Some(Record::ServiceExport(s)) => Some(s),
            _ => None,
        }
    }

    /// The cluster set's settings (the defaults until the admin writes some).
    #[must_use]
    pub fn settings(&self) -> ClusterSetRecord {
        match self.get(causeway_broker_api::CLUSTER_SET_KEY).map(|o| &o.record) {
            Some(Record::ClusterSet(s)) => s.clone(),
            _ => ClusterSetRecord::default(),
        }
    }

    fn apply(&mut self, e: &WatchEvent) {
        let key = e.object.record.key();
        match e.kind {
            EventType::Put => self.0.insert(key, e.object.clone()),
            EventType::Delete => self.0.remove(&key),
        };
    }
}

/// Events kept in memory for watchers; older revisions are read from the store.
pub const CACHED_EVENTS: usize = 10_000;

/// Records plus recent events, at one revision.
#[derive(Debug, Default)]
pub struct Cache {
    pub records: Records,
    events: VecDeque<WatchEvent>,
    pub revision: u64,
    /// Never reach further back than the store does (same answers either way).
    window: u64,
}

impl Cache {
    /// The cache of a store at `revision` holding `records` that keeps `history` revisions.
    #[must_use]
    pub fn new(revision: u64, records: Vec<Object>, history: u64) -> Self {
        Self {
            records: records.into_iter().collect(),
            events: VecDeque::new(),
            revision,
            window: history.min(CACHED_EVENTS as u64),
        }
    }

    /// Events after `since`, if the cache reaches back that far.
    #[must_use]
    pub fn since(&self, since: u64) -> Option<Vec<WatchEvent>> {
        if since >= self.revision {
            return Some(Vec::new());
        }
        let oldest = self.events.front()?.revision;
        if since + 1 < oldest {
            return None;
        }
        Some(self.events.iter().filter(|e| e.revision > since).cloned().collect())
    }

    /// Applies one commit's events when they are the next revision; says whether it did
    /// (an older revision is already applied, a newer one waits for the follower to deliver
    /// the ones before it).
    pub fn apply(&mut self, events: &[WatchEvent]) -> bool {
        let (Some(first), Some(last)) = (events.first(), events.last()) else { return false };
        if first.revision != self.revision + 1 {
            return false;
        }
        for e in events {
            self.records.apply(e);
            self.events.push_back(e.clone());
        }
        while self.events.front().is_some_and(|e| last.revision - e.revision >= self.window) {
            self.events.pop_front();
        }
        self.revision = last.revision;
        true
    }

    /// Replaces the records with a fresh list (never backwards); says whether it did. The
    /// recent events are dropped: watchers then read them from the store.
    pub fn reset(&mut self, revision: u64, records: Vec<Object>) -> bool {
        if revision <= self.revision {
            return false;
        }
        self.records = records.into_iter().collect();
        self.events.clear();
        self.revision = revision;
        true
    }
}

#[cfg(test)]
mod tests {
    use causeway_broker_api::{ServiceExportRecord, cluster_key, endpoint_key, service_key};

    use super::*;

    fn cluster(id: &str) -> Record {
        Record::Cluster(ClusterRecord::new(id, vec!["10.1.0.0/16".parse().unwrap()], vec![]))
    }

    fn endpoint(cluster: &str, host: &str) -> Record {
        let key = causeway_broker_api::WireGuardKey([1; 32]);
        Record::Endpoint(EndpointRecord::new(cluster, host, "172.31.0.1".parse().unwrap(), key))
    }

    fn service(cluster: &str, name: &str) -> Record {
        Record::ServiceExport(ServiceExportRecord {
            cluster_id: cluster.into(),
            namespace: "default".into(),
            name: name.into(),
            ips: vec![],
            ports: vec![],
            service_type: Default::default(),
            endpoints: Vec::new(),
            ready_endpoints: None,
            source: causeway_broker_api::ExportSource::Cli,
            generation: 1,
        })
    }

    #[test]
    fn the_key_layout_is_the_index() {
        // The prefixes above are the API's key functions' own.
        assert!(cluster_key("a").starts_with(CLUSTERS));
        assert!(endpoint_key("a", "gw").starts_with(&format!("{ENDPOINTS}a/")));
        assert!(service_key("a", "ns", "web").starts_with(&format!("{SERVICES}a/")));
        // Cluster "a" must not see cluster "ab"'s records (the '/' ends the id).
        let records: Records = [
            cluster("a"),
            cluster("ab"),
            endpoint("a", "gw-1"),
            endpoint("a", "gw-2"),
            endpoint("ab", "gw-1"),
            service("a", "web"),
            service("ab", "web"),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, r)| Object::new(i as u64 + 1, r))
        .collect();
        let hosts = |id| records.endpoints_of(id).map(|o| o.record.key()).collect::<Vec<_>>();
        assert_eq!(hosts("a"), vec![endpoint_key("a", "gw-1"), endpoint_key("a", "gw-2")]);
        assert_eq!(hosts("ab"), vec![endpoint_key("ab", "gw-1")]);
        assert_eq!(records.services_of("a").count(), 1);
        assert_eq!(records.clusters().map(|c| c.cluster_id.as_str()).collect::<Vec<_>>(), ["a", "ab"]);
        assert_eq!(records.endpoints().count(), 3);
        assert!(records.cluster("a").is_some() && records.cluster("b").is_none());
        assert_eq!(records.settings(), ClusterSetRecord::default());
    }

    #[test]
    fn commits_apply_in_order_only() {
        let ev = |rev, kind, r| WatchEvent { kind, revision: rev, object: Object::new(rev, r) };
        let mut cache = Cache::new(0, Vec::new(), 2);
        assert!(!cache.apply(&[ev(2, EventType::Put, cluster("b"))]), "a gap waits");
        assert!(cache.apply(&[ev(1, EventType::Put, cluster("a"))]));
        assert!(!cache.apply(&[ev(1, EventType::Put, cluster("a"))]), "applied once");
        assert!(cache.apply(&[ev(2, EventType::Put, cluster("b"))]));
        assert!(cache.apply(&[ev(3, EventType::Delete, cluster("a"))]));
        assert_eq!(cache.revision, 3);
        assert_eq!(cache.records.len(), 1);
        // A window of two revisions: revision 1 is gone from memory, 2 and 3 are served.
        assert_eq!(cache.since(0), None);
        assert_eq!(cache.since(1).unwrap().iter().map(|e| e.revision).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(cache.since(3), Some(Vec::new()));
        // A reset never goes back, and forgets the events.
        assert!(!cache.reset(3, Vec::new()));
        assert!(cache.reset(9, vec![Object::new(9, cluster("z"))]));
        assert_eq!(cache.since(8), None);
        assert_eq!(cache.records.cluster("z").map(|c| c.cluster_id.as_str()), Some("z"));
    }
}
