//! The broker's records as one member sees them, kept current: list once, then watch from the
//! last revision; after a broker error, back off (exponential, with jitter, so a thousand
//! members do not come back in lockstep after a broker restart) and resume watching from the
//! last revision seen; re-list only when the broker says that revision is gone (410: its
//! history was compacted past it, or it restarted without it). The gateway, the route agent
//! and the benchmarks share it instead of each writing the loop.

use std::{collections::BTreeMap, time::Duration};

use crate::{BrokerClient, ClientError, EventType, ListResponse, Object, WatchResponse};

/// The records at one revision, keyed like the broker's store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub revision: u64,
    pub objects: BTreeMap<String, Object>,
}

impl Snapshot {
    #[must_use]
    pub fn from_list(list: ListResponse) -> Self {
        Self {
            revision: list.resource_version,
            objects: list.items.into_iter().map(|o| (o.record.key(), o)).collect(),
        }
    }

    /// Applies a watch answer's events; returns whether anything changed.
    pub fn apply(&mut self, w: WatchResponse) -> bool {
        let changed = !w.events.is_empty();
        for ev in w.events {
            let key = ev.object.record.key();
            match ev.kind {
                EventType::Put => self.objects.insert(key, ev.object),
                EventType::Delete => self.objects.remove(&key),
            };
        }
        self.revision = w.resource_version;
        changed
    }

    #[must_use]
    pub fn objects(&self) -> Vec<Object> {
        self.objects.values().cloned().collect()
    }

    /// As the broker lists it (for a cache on disk).
    #[must_use]
    pub fn to_list(&self) -> ListResponse {
        ListResponse { resource_version: self.revision, items: self.objects() }
    }
}

/// What [`Reflector::next`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// A full list replaced the snapshot (the first one, or the broker's history no longer
    /// reached back to the last revision).
    Listed,
    /// A watch brought changes.
    Changed,
    /// A watch timed out with nothing new (a chance for heartbeats and retries).
    Quiet,
}

/// Exponential backoff with jitter (backon's): each delay is drawn from the upper half of the
/// current bound, which doubles from `min` up to `max` and goes back to `min` after a success.
#[derive(Debug)]
pub struct Backoff {
    builder: backon::ExponentialBuilder,
    delays: backon::ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    #[must_use]
    pub fn new(min: Duration, max: Duration) -> Self {
        // backon adds a jitter in [0, d) to each step d: steps of half the bound give delays
        // in [bound / 2, bound).
        let builder = backon::ExponentialBuilder::default()
            .with_min_delay(min / 2)
            .with_max_delay(max / 2)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self { builder, delays: backon::BackoffBuilder::build(builder), max }
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        // Never exhausted: built without a limit on attempts or total delay.
        self.delays.next().unwrap_or(self.max)
    }

    pub fn reset(&mut self) {
        self.delays = backon::BackoffBuilder::build(self.builder);
    }
}

/// List + watch + cache + backoff + resume. See the module docs.
pub struct Reflector {
    client: BrokerClient,
    /// How long one watch waits for changes.
    wait: Duration,
    snapshot: Snapshot,
    /// Whether `snapshot` came from the broker (else the next call lists).
    synced: bool,
    backoff: Backoff,
}

impl Reflector {
    #[must_use]
    pub fn new(client: BrokerClient, wait: Duration) -> Self {
        Self {
            client,
            wait,
            snapshot: Snapshot::default(),
            synced: false,
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
        }
    }

    /// Starts from `snapshot`, taken from the broker at its revision, and watches from there
    /// without a list of its own (many members started from one list; a 410 still re-lists).
    #[must_use]
    pub fn resume(client: BrokerClient, wait: Duration, snapshot: Snapshot) -> Self {
        Self { snapshot, synced: true, ..Self::new(client, wait) }
    }

    /// Waits for the next change. On a broker error it sleeps its backoff first and returns
    /// the error; the next call resumes watching from the last revision seen.
    pub async fn next(&mut self) -> Result<Step, ClientError> {
        let result = if self.synced {
            match self.client.watch(self.snapshot.revision, self.wait).await {
                Ok(w) => Ok(if self.snapshot.apply(w) { Step::Changed } else { Step::Quiet }),
                // Gone: that revision is older than the broker's history (or from a broker
                // that lost it). Only a full list can say what is there now.
                Err(e) if e.status() == Some(410) => {
                    tracing::info!(
                        revision = self.snapshot.revision,
                        "the broker no longer has our revision; re-listing"
                    );
                    self.list().await
                }
                Err(e) => Err(e),
            }
        } else {
            self.list().await
        };
        match &result {
            Ok(_) => self.backoff.reset(),
            Err(_) => tokio::time::sleep(self.backoff.next_delay()).await,
        }
        result
    }

    async fn list(&mut self) -> Result<Step, ClientError> {
        let list = self.client.list().await?;
        self.snapshot = Snapshot::from_list(list);
        self.synced = true;
        Ok(Step::Listed)
    }

    /// The records as of the last successful call.
    #[must_use]
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Forgets the revision: the next call lists (e.g. after re-registering changed what
    /// this member may see).
    pub fn relist(&mut self) {
        self.synced = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut bound = Duration::from_millis(200);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..10 {
            let d = b.next_delay();
            // (backon computes in f32 seconds: allow a microsecond.)
            let slack = Duration::from_micros(1);
            assert!(
                d + slack >= bound / 2 && d <= bound + slack,
                "{d:?} outside [{:?}, {bound:?}]",
                bound / 2
            );
            seen.insert(d);
            bound = (bound * 2).min(Duration::from_secs(5));
        }
        // At the cap, draws differ: members that failed together come back apart.
        let at_cap: std::collections::BTreeSet<Duration> = (0..20).map(|_| b.next_delay()).collect();
        assert!(at_cap.len() > 10, "{at_cap:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(200));
    }
}
