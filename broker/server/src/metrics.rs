//! The broker's health and metrics. `/readyz` answers 200 only while the store answers (a point
//! read within [`READY_WITHIN`]); `/healthz` while the process serves. `/metrics` (on
//! `--metrics-listen`, plain HTTP on the pod's address, like the gateways') counts what the
//! broker holds and what its STUN responder and relay did.

use std::{sync::Arc, time::Duration};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use causeway_broker_api::Record;
use causeway_metrics::Family;

use crate::{Broker, stun::StunCounters};

/// How long the store may take to answer the readiness read.
pub const READY_WITHIN: Duration = Duration::from_secs(2);

/// `Err(why)` unless the store answers a point read within [`READY_WITHIN`].
pub async fn readiness(b: &Broker) -> Result<(), String> {
    // A credential no token hashes to: one point read, nothing found.
    match tokio::time::timeout(READY_WITHIN, b.store.credential("readiness-probe")).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("the store fails: {e}")),
        Err(_) => Err(format!("the store did not answer within {READY_WITHIN:?}")),
    }
}

/// `/readyz`'s answer.
pub async fn readyz(State(b): State<Arc<Broker>>) -> impl IntoResponse {
    match readiness(&b).await {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

fn kind(r: &Record) -> &'static str {
    match r {
        Record::Cluster(_) => "cluster",
        Record::Endpoint(_) => "endpoint",
        Record::Policy(_) => "policy",
        Record::PolicyDefault(_) => "policy_default",
        Record::ServiceExport(_) => "service_export",
        Record::ClusterSet(_) => "cluster_set",
        Record::ServiceImport(_) => "service_import",
    }
}

/// Renders families with the process metrics (re-exported so callers need not depend on the
/// metrics crate).
pub use causeway_metrics::render;

/// What one scrape reports.
#[must_use]
pub fn families(b: &Broker, stun: &StunCounters, ready: bool) -> Vec<Family> {
    use std::sync::atomic::Ordering::Relaxed;
    let (by_kind, revision) = {
        let cache = crate::broker::read(&b.cache);
        let mut by_kind = std::collections::BTreeMap::<&str, u64>::new();
        for o in cache.records.all() {
            *by_kind.entry(kind(&o.record)).or_default() += 1;
        }
        (by_kind, cache.revision)
    };
    let udp = |name: &str, help: &str, v: &std::sync::atomic::AtomicU64| {
        Family::counter(name, help).with(&[], v.load(Relaxed))
    };
    vec![
        Family::gauge("causeway_broker_ready", "1 while the store answers (what /readyz says)")
            .with(&[], ready),
        Family::gauge("causeway_broker_records", "Records the broker holds, by kind")
            .each(by_kind, |(k, n)| Some((vec![("kind", (*k).to_owned())], *n))),
        Family::gauge("causeway_broker_revision", "The store's revision (grows with every change)")
            .with(&[], revision),
        Family::gauge("causeway_broker_watchers", "Watch streams open (gateways, route agents, DNS servers)")
            .with(&[], b.watchers()),
        udp("causeway_broker_stun_answered_total", "STUN binding requests answered", &stun.answered),
        udp(
            "causeway_broker_udp_ignored_total",
            "Datagrams on the STUN port that were neither a binding request nor a relay frame",
            &stun.ignored,
        ),
        udp("causeway_broker_udp_limited_total", "Requests past their source's budget", &stun.limited),
        udp("causeway_broker_relay_registered_total", "Relay registrations taken", &stun.registered),
        udp(
            "causeway_broker_relay_refused_total",
            "Relay registrations refused (bad MAC, unknown credential or key, replayed)",
            &stun.refused,
        ),
        udp("causeway_broker_relay_relayed_total", "Datagrams relayed between gateways", &stun.relayed),
        udp(
            "causeway_broker_relay_unroutable_total",
            "Relay frames whose sender or receiver was not registered",
            &stun.unroutable,
        ),
        udp(
            "causeway_broker_relay_overflow_total",
            "Frames dropped on a relay stream's full queue",
            &stun.overflow,
        ),
    ]
}

/// Serves [`router`] on `listener` (plain HTTP) until the process ends.
pub fn serve(listener: tokio::net::TcpListener, broker: Arc<Broker>) -> tokio::task::JoinHandle<()> {
    let app = router(broker);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "the metrics server stopped");
        }
    })
}

/// `/metrics`, `/healthz` and `/readyz` for `--metrics-listen`.
pub fn router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(|State(b): State<Arc<Broker>>| async move {
                let ready = readiness(&b).await.is_ok();
                let text = causeway_metrics::render(families(&b, b.relay().counters(), ready));
                ([(axum::http::header::CONTENT_TYPE, causeway_metrics::CONTENT_TYPE)], text)
            }),
        )
        .with_state(broker)
}

#[cfg(test)]
mod tests {
    use causeway_broker_api::{ClusterRecord, EndpointRecord, WireGuardKey};

    use super::*;
    use crate::{Identity, MemStore};

    fn cluster(id: &str, net: u8) -> ClusterRecord {
        ClusterRecord {
            cluster_id: id.into(),
            pod_cidrs: vec![format!("10.{net}.0.0/16").parse().unwrap()],
            service_cidrs: vec![],
            global_cidrs: vec![],
            labels: Default::default(),
            generation: 1,
        }
    }

    #[tokio::test]
    async fn the_metrics_count_records_by_kind_and_the_relays_work() {
        let b = Broker::new(MemStore::default()).await.unwrap();
        for (id, net) in [("east", 1), ("west", 2)] {
            b.put_cluster(&Identity::Admin, cluster(id, net)).await.unwrap();
        }
        let e = EndpointRecord::new("east", "gw", "192.0.2.1".parse().unwrap(), WireGuardKey([1; 32]));
        b.put_endpoint(&Identity::Cluster("east".into()), e).await.unwrap();
        let stun = StunCounters::default();
        stun.relayed.fetch_add(7, std::sync::atomic::Ordering::Relaxed);
        readiness(&b).await.unwrap();
        let text = causeway_metrics::render(families(&b, &stun, true));
        for line in [
            "causeway_broker_ready{} 1\n",
            "causeway_broker_records{kind=\"cluster\"} 2\n",
            "causeway_broker_records{kind=\"endpoint\"} 1\n",
            "causeway_broker_relay_relayed_total{} 7\n",
            "causeway_broker_watchers{} 0\n",
            "# TYPE causeway_broker_relay_refused counter\n",
        ] {
            assert!(text.contains(line), "{line:?} missing:\n{text}");
        }
        assert!(!text.contains("kind=\"policy\""), "no policy record, no sample:\n{text}");
    }

    /// A memory store whose credential reads can be made to fail or to hang (shared: the test
    /// keeps a handle on the store the broker owns).
    #[derive(Default)]
    struct Faulty {
        inner: MemStore,
        /// 0: answers, 1: fails, 2: never answers.
        mode: std::sync::atomic::AtomicU8,
    }

    #[async_trait::async_trait]
    impl crate::Store for Arc<Faulty> {
        async fn list(&self) -> Result<(u64, Vec<causeway_broker_api::Object>), crate::StoreError> {
            self.inner.list().await
        }
        async fn commit(
            &self,
            base: u64,
            changes: Vec<crate::store::Change>,
        ) -> Result<Vec<causeway_broker_api::WatchEvent>, crate::StoreError> {
            self.inner.commit(base, changes).await
        }
        async fn events_since(&self, since: u64) -> Result<crate::store::Since, crate::StoreError> {
            self.inner.events_since(since).await
        }
        fn history(&self) -> u64 {
            self.inner.history()
        }
        async fn credential(&self, hash: &str) -> Result<Option<crate::Credential>, crate::StoreError> {
            match self.mode.load(std::sync::atomic::Ordering::Relaxed) {
                0 => self.inner.credential(hash).await,
                1 => Err(crate::StoreError::Etcd("connection refused".into())),
                _ => std::future::pending().await,
            }
        }
        async fn put_credential(&self, hash: &str, c: &crate::Credential) -> Result<(), crate::StoreError> {
            self.inner.put_credential(hash, c).await
        }
        async fn credentials(&self) -> Result<Vec<(String, crate::Credential)>, crate::StoreError> {
            self.inner.credentials().await
        }
        async fn delete_credentials(&self, hashes: &[String]) -> Result<(), crate::StoreError> {
            self.inner.delete_credentials(hashes).await
        }
    }

    #[tokio::test]
    async fn readiness_follows_the_store() {
        let store = Arc::new(Faulty::default());
        let b = Broker::new(store.clone()).await.unwrap();
        assert_eq!(readiness(&b).await, Ok(()));
        store.mode.store(1, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(readiness(&b).await, Err("the store fails: etcd: connection refused".into()));
        store.mode.store(2, std::sync::atomic::Ordering::Relaxed);
        let t = std::time::Instant::now();
        assert_eq!(readiness(&b).await, Err("the store did not answer within 2s".into()));
        assert!(t.elapsed() < READY_WITHIN + Duration::from_secs(1));
        let text = causeway_metrics::render(families(&b, &StunCounters::default(), false));
        assert!(text.contains("causeway_broker_ready{} 0\n"), "{text}");
        store.mode.store(0, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(readiness(&b).await, Ok(()));
    }
}
