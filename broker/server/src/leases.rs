//! Endpoint leases: a gateway's endpoint record lives as long as the gateway keeps writing it
//! (every PUT, changed or not, is a heartbeat). The clock is passed in, so the rules here are
//! tested without waiting; the broker runs them every second and deletes what expired.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use causeway_broker_api::{EventType, Record, WatchEvent};

use crate::cache::Records;

/// Default endpoint lease: three missed 10-second heartbeats.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// Last heartbeat per endpoint key.
#[derive(Debug)]
pub struct Leases {
    lease: Duration,
    beats: Mutex<HashMap<String, Instant>>,
}

impl Leases {
    /// Leases of `lease` for the endpoints among `records`, each starting `now` (a broker
    /// restart expires nobody).
    #[must_use]
    pub fn new(lease: Duration, records: &Records, now: Instant) -> Self {
        let leases = Self { lease, beats: Mutex::default() };
        leases.reset(records, now);
        leases
    }

    #[must_use]
    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn beats(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.beats.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A heartbeat for `key` at `at`.
    pub fn renew(&self, key: &str, at: Instant) {
        self.beats().insert(key.to_owned(), at);
    }

    /// The keys whose lease ran out before `now`.
    #[must_use]
    pub fn expired(&self, now: Instant) -> Vec<String> {
        let mut keys: Vec<String> = self
            .beats()
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(**t) > self.lease)
            .map(|(k, _)| k.clone())
            .collect();
        keys.sort();
        keys
    }

    /// Forgets `key` if its lease is still out at `now` (a heartbeat may have come in since
    /// [`Self::expired`]); says whether it did.
    pub fn take_expired(&self, key: &str, now: Instant) -> bool {
        let mut beats = self.beats();
        if beats.get(key).is_some_and(|t| now.saturating_duration_since(*t) > self.lease) {
            beats.remove(key);
            true
        } else {
            false
        }
    }

    /// Follows a commit: an endpoint that appears gets a lease (written through another
    /// replica, it is alive there), one that is deleted has none.
    pub fn follow(&self, events: &[WatchEvent], now: Instant) {
        let mut beats = self.beats();
        for e in events.iter().filter(|e| matches!(e.object.record, Record::Endpoint(_))) {
            let key = e.object.record.key();
            match e.kind {
                EventType::Put => {
                    beats.entry(key).or_insert(now);
                }
                EventType::Delete => {
                    beats.remove(&key);
                }
            }
        }
    }

    /// Follows a re-list: leases of endpoints that are gone end, new endpoints get one.
    pub fn reset(&self, records: &Records, now: Instant) {
        let mut beats = self.beats();
        beats.retain(|k, _| records.get(k).is_some());
        for o in records.all().filter(|o| matches!(o.record, Record::Endpoint(_))) {
            beats.entry(o.record.key()).or_insert(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use causeway_broker_api::{ClusterRecord, EndpointRecord, Object, WireGuardKey, endpoint_key};

    use super::*;

    fn endpoint(host: &str) -> Record {
        Record::Endpoint(EndpointRecord::new("a", host, "172.31.0.1".parse().unwrap(), WireGuardKey([1; 32])))
    }

    #[test]
    fn an_endpoint_lives_while_it_beats() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let records: Records = [
            Object::new(
                1,
                Record::Cluster(ClusterRecord::new("a", vec!["10.1.0.0/16".parse().unwrap()], vec![])),
            ),
            Object::new(2, endpoint("gw-1")),
            Object::new(3, endpoint("gw-2")),
        ]
        .into_iter()
        .collect();
        let leases = Leases::new(s(30), &records, t0);
        // Exactly the lease is still alive; a moment past it is not.
        assert!(leases.expired(t0 + s(30)).is_empty());
        leases.renew(&endpoint_key("a", "gw-1"), t0 + s(20));
        assert_eq!(leases.expired(t0 + s(31)), vec![endpoint_key("a", "gw-2")]);
        // A heartbeat between the scan and the delete saves it.
        leases.renew(&endpoint_key("a", "gw-2"), t0 + s(31));
        assert!(!leases.take_expired(&endpoint_key("a", "gw-2"), t0 + s(31)));
        assert!(leases.take_expired(&endpoint_key("a", "gw-1"), t0 + s(51)));
        assert!(!leases.take_expired(&endpoint_key("a", "gw-1"), t0 + s(51)), "taken once");
        // Commits seen from other replicas: a new endpoint gets a lease, a deleted one loses it.
        let put = WatchEvent { kind: EventType::Put, revision: 4, object: Object::new(4, endpoint("gw-3")) };
        let del =
            WatchEvent { kind: EventType::Delete, revision: 4, object: Object::new(4, endpoint("gw-2")) };
        leases.follow(&[put, del], t0 + s(40));
        assert_eq!(leases.expired(t0 + s(71)), vec![endpoint_key("a", "gw-3")]);
        // A re-list without gw-3 ends its lease.
        leases.reset(&Records::default(), t0 + s(72));
        assert!(leases.expired(t0 + s(1000)).is_empty());
    }
}
