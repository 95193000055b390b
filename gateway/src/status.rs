//! The gateway's local status endpoint, on a Unix socket (reachable from any namespace on the
//! node, nothing exposed on the network): `GET /status` (JSON, what `causeway show
//! connections` prints) and `GET /metrics` (Prometheus text).

use std::{collections::BTreeMap, path::Path, sync::Arc, time::Duration};

use axum::{Json, Router, extract::State, http::header, response::IntoResponse, routing::get};
use tokio::{sync::Mutex, time::Instant};
use tracing::warn;

use crate::daemon::Shared;

// The wire types live in the API crate, so that clients (the CLI, the test harness) read a
// gateway's status without linking the gateway.
pub use causeway_broker_api::status::{
    CarrierView, ConnectionView, DatapathCounters, FetchError, GatewayStatus, StandbyView, fetch, fetch_raw,
};

/// How long `/status` waits for a reading taken after the request before it answers with the
/// newest one there is (and says how old it is).
const STATUS_WAIT: Duration = Duration::from_secs(3);

async fn status(State(snapshot): State<Snapshot>) -> axum::response::Response {
    match snapshot.fresh(STATUS_WAIT).await {
        Some((reading, true)) => Json(&*reading.status).into_response(),
        Some((reading, false)) => {
            let age = reading.taken.elapsed();
            warn!(age_ms = age.as_millis(), "no fresh status reading in time; answering with the last one");
            ([(STATUS_AGE_HEADER, age.as_millis().to_string())], Json(&*reading.status)).into_response()
        }
        None => (axum::http::StatusCode::SERVICE_UNAVAILABLE, "no status yet\n").into_response(),
    }
}

/// Set on a `/status` answer that is not fresh: the reading's age in milliseconds.
pub const STATUS_AGE_HEADER: &str = "x-causeway-status-age-ms";

/// One status reading: when it began, and what it said.
#[derive(Clone, Debug)]
pub struct Reading {
    pub taken: Instant,
    pub status: Arc<GatewayStatus>,
}

/// The gateway's status as published by one task ([`start_snapshots`]): every period, and at
/// once when a `/status` request asks. The servers only read it: neither a scrape nor
/// `/status` ever takes the daemon's lock, so a slow reader cannot hold up a reconcile, and a
/// stuck reconcile cannot hang the status server (it answers with the last reading, and its
/// age).
#[derive(Clone, Debug)]
pub struct Snapshot {
    latest: tokio::sync::watch::Receiver<Option<Reading>>,
    /// Asks the publisher for a reading now. Room for one: a request made while another waits
    /// is answered by the same reading, which begins after both.
    refresh: tokio::sync::mpsc::Sender<()>,
}

impl Snapshot {
    /// A snapshot fed by `latest`, asking for readings on `refresh`.
    #[must_use]
    pub fn new(
        latest: tokio::sync::watch::Receiver<Option<Reading>>,
        refresh: tokio::sync::mpsc::Sender<()>,
    ) -> Self {
        Self { latest, refresh }
    }

    /// The newest reading.
    #[must_use]
    pub fn latest(&self) -> Option<Reading> {
        self.latest.borrow().clone()
    }

    /// A reading begun after this call (`true`), or, when none comes within `wait`, the newest
    /// there is (`false`); `None` before the first.
    pub async fn fresh(&self, wait: Duration) -> Option<(Reading, bool)> {
        let asked = Instant::now();
        // Full: a request is waiting, and the reading it gets begins after this one's `asked`.
        let _ = self.refresh.try_send(());
        let mut rx = self.latest.clone();
        let fresh = tokio::time::timeout(wait, async {
            rx.wait_for(|r| r.as_ref().is_some_and(|r| r.taken >= asked)).await.ok().and_then(|r| r.clone())
        })
        .await;
        match fresh {
            Ok(Some(reading)) => Some((reading, true)),
            _ => self.latest().map(|r| (r, false)),
        }
    }
}

/// Publishes a reading every `every`, and whenever asked (one lock and one status read per
/// reading, whatever the number of readers).
pub fn start_snapshots(
    shared: Arc<Mutex<Shared>>,
    every: Duration,
) -> (Snapshot, tokio::task::JoinHandle<()>) {
    let (tx, rx) = tokio::sync::watch::channel(None);
    let (refresh, mut asked) = tokio::sync::mpsc::channel(1);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                Some(()) = asked.recv() => {}
            }
            let taken = Instant::now();
            let status = shared.lock().await.status().await;
            match status {
                Ok(s) => {
                    tx.send_replace(Some(Reading { taken, status: Arc::new(s) }));
                }
                Err(e) => {
                    warn!(error = %e, "reading the gateway's status failed; readers get the last one")
                }
            }
        }
    });
    (Snapshot::new(rx, refresh), task)
}

/// Metrics are rendered from the newest reading as it is: a scrape asks for nothing.
async fn metrics(State(snapshot): State<Snapshot>) -> impl IntoResponse {
    match snapshot.latest() {
        Some(r) => ([(header::CONTENT_TYPE, causeway_metrics::CONTENT_TYPE)], render_metrics(&r.status))
            .into_response(),
        None => (axum::http::StatusCode::SERVICE_UNAVAILABLE, "no status yet\n").into_response(),
    }
}

/// Prometheus exposition (OpenMetrics) of a status snapshot.
#[must_use]
pub fn render_metrics(s: &GatewayStatus) -> String {
    use causeway_metrics::Family;
    let by_cluster = |f: Family, v: &dyn Fn(&ConnectionView) -> Option<causeway_metrics::Value>| {
        f.each(&s.connections, |c| v(c).map(|v| (vec![("cluster", c.cluster_id.clone())], v)))
    };
    let connected = |c: &ConnectionView| Some((c.status == "connected").into());
    let labelled = |f: Family, key: &'static str, m: &BTreeMap<String, u64>| {
        f.each(m, |(k, v)| Some((vec![(key, (*k).clone())], **v)))
    };
    let cable = [("cable", s.cable.as_str())];
    causeway_metrics::render(vec![
        Family::gauge(
            "causeway_standby_up",
            "1 when the session with a remote cluster's standby gateway is established (warm)",
        )
        .each(&s.standbys, |c| {
            Some((
                vec![("cluster", c.cluster_id.clone()), ("endpoint", c.endpoint.clone())],
                c.status == "connected",
            ))
        }),
        by_cluster(
            Family::gauge("causeway_connection_up", "1 when a session with the remote gateway is established"),
            &connected,
        ),
        by_cluster(Family::counter("causeway_tx_bytes_total", "Bytes sent to the remote cluster (eBPF)"), &|c| {
            Some(c.datapath.tx_bytes.into())
        }),
        by_cluster(Family::counter("causeway_rx_bytes_total", "Bytes received from the remote cluster (eBPF)"), &|c| {
            Some(c.datapath.rx_bytes.into())
        }),
        by_cluster(Family::counter("causeway_tx_packets_total", "Packets sent to the remote cluster (eBPF)"), &|c| {
            Some(c.datapath.tx_packets.into())
        }),
        by_cluster(
            Family::counter("causeway_rx_packets_total", "Packets received from the remote cluster (eBPF)"),
            &|c| Some(c.datapath.rx_packets.into()),
        ),
        labelled(Family::counter("causeway_cable_drops_total", "Packets the cable dropped, by reason"), "reason", &s.cable_drops),
        Family::gauge(
            "causeway_cable_udp_segmentation",
            "1 while encrypted runs leave as UDP segmentation offload messages; 0 once the kernel refused one",
        )
        .with(&cable, s.cable_udp_segmentation),
        Family::gauge(
            "causeway_cable_stalled_lanes",
            "Cable I/O lanes that have not turned for 5 s (stuck; /healthz fails while any is)",
        )
        .with(&cable, s.cable_stalled_lanes),
        labelled(
            Family::counter("causeway_datapath_events_total", "Datapath events counted in the kernel, by kind"),
            "event",
            &s.datapath_events,
        ),
        labelled(
            Family::counter(
                "causeway_policy_drops_total",
                "Packets dropped by the cluster-set policy (both directions), by deciding rule",
            ),
            "rule",
            &s.policy_drops,
        ),
        Family::counter(
            "causeway_failovers_total",
            "Changes of the gateway that carries a remote cluster, by reason (unreachable: it stopped answering probes; authority: the control plane named another; fail_back: traffic went back after the hold-down)",
        )
        .each(s.failovers.iter().flat_map(|(cluster, by)| by.iter().map(move |(r, n)| (cluster, r, *n))), |(c, r, n)| {
            Some((vec![("cluster", (*c).clone()), ("reason", (*r).clone())], *n))
        }),
        Family::gauge("causeway_connection_path", "1 for the kind of path each tunnel takes (direct-private, direct-public, relayed)")
            .each(&s.connections, |c| {
                c.path.as_ref().map(|p| (vec![("cluster", c.cluster_id.clone()), ("path", p.clone())], 1u64))
            }),
        by_cluster(Family::gauge("causeway_rtt_seconds", "Round-trip time of the last in-band probe through the tunnel"), &|c| {
            c.rtt_secs.map(Into::into)
        }),
        by_cluster(Family::gauge("causeway_probe_loss_ratio", "Fraction of recent in-band probes that were lost"), &|c| {
            Some(c.loss.into())
        }),
        by_cluster(
            Family::gauge("causeway_last_handshake_seconds", "Seconds since the last handshake with the remote gateway"),
            &|c| c.last_handshake_secs.map(Into::into),
        ),
        Family::gauge(
            "causeway_remote_refused",
            "Remote clusters this gateway refuses to route (see show connections for why)",
        )
        .each(s.refused.keys(), |c| Some((vec![("cluster", (*c).clone())], 1u64))),
        Family::gauge(
            "causeway_route_conflicts",
            "Remote prefixes not routed because a route Causeway did not create holds them",
        )
        .with(&[], s.route_conflicts.len()),
        Family::gauge(
            "causeway_reconcile_failed",
            "Reconcile steps that failed on the last pass (the others ran; retried on the next pass)",
        )
        .each(s.reconcile_failures.keys(), |step| Some((vec![("step", (*step).clone())], 1u64))),
    ])
}

/// The daemon publishes a status reading every second, taking its lock to do so: a newest
/// reading older than this means something (a reconcile step) has held the daemon that long.
pub const HEALTH_MAX_AGE: Duration = Duration::from_secs(10);

/// Liveness: `Err(why)` when the reconcile loop or a cable lane is stuck.
pub fn liveness(reading: Option<&Reading>, now: Instant) -> Result<(), String> {
    let Some(r) = reading else { return Err("no status reading yet (starting)".into()) };
    let age = now.saturating_duration_since(r.taken);
    if age > HEALTH_MAX_AGE {
        return Err(format!(
            "the newest status reading is {} s old (at most {} s): the daemon has been held that long, a reconcile step is stuck",
            age.as_secs(),
            HEALTH_MAX_AGE.as_secs()
        ));
    }
    if r.status.cable_stalled_lanes > 0 {
        return Err(format!(
            "{} of the cable's I/O lanes have stopped turning",
            r.status.cable_stalled_lanes
        ));
    }
    Ok(())
}

/// Readiness: live, and, when the set has other clusters, a working tunnel to at least one.
pub fn readiness(reading: Option<&Reading>, now: Instant) -> Result<(), String> {
    liveness(reading, now)?;
    let connections = reading.map(|r| &r.status.connections).into_iter().flatten();
    let (total, connected) =
        connections.fold((0, 0), |(t, c), conn| (t + 1, c + usize::from(conn.status == "connected")));
    if total > 0 && connected == 0 {
        return Err(format!("no working tunnel: none of {total} remote clusters is connected"));
    }
    Ok(())
}

fn probe_answer(verdict: Result<(), String>) -> (axum::http::StatusCode, String) {
    match verdict {
        Ok(()) => (axum::http::StatusCode::OK, "ok\n".into()),
        Err(why) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn healthz(State(snapshot): State<Snapshot>) -> (axum::http::StatusCode, String) {
    probe_answer(liveness(snapshot.latest().as_ref(), Instant::now()))
}

async fn readyz(State(snapshot): State<Snapshot>) -> (axum::http::StatusCode, String) {
    probe_answer(readiness(snapshot.latest().as_ref(), Instant::now()))
}

/// What the network may ask: metrics and health. `/status` (keys, endpoints, why a member is
/// refused) stays on the node's owner-only Unix socket.
fn tcp_router(snapshot: Snapshot) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(snapshot)
}

/// `GET /debug/hold-daemon?secs=N`: takes the daemon's lock for N seconds (at most 600) in
/// the background, as a stuck reconcile step would; answers at once.
async fn hold_daemon(
    State(shared): State<Arc<Mutex<Shared>>>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, u64>>,
) -> String {
    let secs = q.get("secs").copied().unwrap_or(1).min(600);
    tokio::spawn(async move {
        let _held = shared.lock().await;
        warn!(secs, "debug hook: holding the daemon");
        tokio::time::sleep(Duration::from_secs(secs)).await;
    });
    format!("holding the daemon for {secs} s\n")
}

fn router(snapshot: Snapshot, debug: Option<Arc<Mutex<Shared>>>) -> Router {
    let mut app =
        Router::new().route("/status", get(status)).with_state(snapshot.clone()).merge(tcp_router(snapshot));
    if let Some(shared) = debug {
        app = app.merge(Router::new().route("/debug/hold-daemon", get(hold_daemon)).with_state(shared));
    }
    app
}

/// Serves `/metrics` and `/healthz` over TCP (for Prometheus and the kubelet).
pub async fn serve_tcp(
    addr: std::net::SocketAddr,
    snapshot: Snapshot,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics listening");
    let app = tcp_router(snapshot);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!(error = %e, "metrics server stopped");
        }
    }))
}

/// Serves the status API on a Unix socket at `path` (replacing a stale socket file).
/// With `debug`, also the test hooks.
pub async fn serve(
    path: &Path,
    snapshot: Snapshot,
    debug: Option<Arc<Mutex<Shared>>>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    // Owner (root) only: the status names keys, endpoints and refusals.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let app = router(snapshot, debug);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!(error = %e, "status server stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn sample() -> GatewayStatus {
        GatewayStatus {
            cluster_id: "a".into(),
            hostname: "gw".into(),
            public_key: "k".into(),
            cable: "wireguard".into(),
            cable_lanes: 2,
            cable_udp_segmentation: true,
            cable_stalled_lanes: 0,
            reflexive: Some("203.0.113.9:40001".into()),
            relay: Some("172.31.0.2:3478".into()),
            relay_transport: Some("https".into()),
            device: "cw0".into(),
            listen_port: 51820,
            broker_url: "http://x".into(),
            revision: 3,
            connections: vec![ConnectionView {
                cluster_id: "b".into(),
                endpoint: "172.31.0.12:51820".into(),
                public_key: "k2".into(),
                status: "connected".into(),
                path: Some("direct-public".into()),
                rtt_secs: Some(0.0002),
                loss: 0.25,
                last_handshake_secs: Some(1.5),
                cidrs: vec!["10.2.0.0/16".into()],
                tx_bytes: 10,
                rx_bytes: 20,
                datapath: DatapathCounters { tx_packets: 1, tx_bytes: 100, rx_packets: 2, rx_bytes: 200 },
                carrier: Some(CarrierView {
                    since_secs: 4.0,
                    reason: "unreachable".into(),
                    provisional: true,
                }),
            }],
            cable_drops: [("invalid_packet".to_owned(), 4)].into_iter().collect(),
            datapath_events: BTreeMap::new(),
            policy_drops: [("web".to_owned(), 2)].into_iter().collect(),
            standbys: vec![StandbyView {
                cluster_id: "b".into(),
                endpoint: "172.31.0.13:51820".into(),
                public_key: "k3".into(),
                status: "connected".into(),
                last_handshake_secs: Some(3.0),
            }],
            refused: [("evil".to_owned(), "128.0.0.0/1 is broader than /8".to_owned())].into_iter().collect(),
            route_conflicts: vec!["10.9.0.0/16".into()],
            reconcile_failures: BTreeMap::from([("datapath".into(), "map full".into())]),
            failovers: BTreeMap::from([("b".into(), BTreeMap::from([("unreachable".into(), 2)]))]),
        }
    }

    /// The metrics text less the process's own series (resident memory moves between calls).
    fn causeway_lines(text: &str) -> Vec<String> {
        text.lines().filter(|l| !l.contains("process_")).map(str::to_owned).collect()
    }

    /// A publisher that answers every request with `status` after `delay`, as the daemon's
    /// snapshot task does (with the daemon's lock taken after the request).
    fn publisher(
        status: GatewayStatus,
        delay: Duration,
    ) -> (Snapshot, tokio::sync::watch::Sender<Option<Reading>>) {
        let (tx, rx) = tokio::sync::watch::channel(None);
        let (refresh, mut asked) = tokio::sync::mpsc::channel(1);
        let publish = tx.clone();
        tokio::spawn(async move {
            while asked.recv().await.is_some() {
                let taken = Instant::now();
                tokio::time::sleep(delay).await;
                publish.send_replace(Some(Reading { taken, status: Arc::new(status.clone()) }));
            }
        });
        (Snapshot::new(rx, refresh), tx)
    }

    #[tokio::test]
    async fn status_waits_for_a_reading_begun_after_the_request() {
        let mut fresh = sample();
        fresh.revision = 2;
        let (snapshot, tx) = publisher(fresh, Duration::from_millis(50));
        assert!(snapshot.fresh(Duration::from_millis(200)).await.is_some(), "the first reading");
        // A reading that began before the request is not an answer to it, even when it is
        // published after: the request's own reading (revision 2) is.
        let mut old = sample();
        old.revision = 1;
        let before = Instant::now();
        let waiting = tokio::spawn({
            let snapshot = snapshot.clone();
            async move { snapshot.fresh(Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        tx.send_replace(Some(Reading { taken: before, status: Arc::new(old) }));
        let (got, fresh_flag) = waiting.await.unwrap().unwrap();
        assert!(fresh_flag);
        assert_eq!(got.status.revision, 2);
        assert!(got.taken >= before);
        let resp = status(State(snapshot)).await;
        assert_eq!(resp.status(), axum::http::StatusCode::OK);
        assert!(resp.headers().get(STATUS_AGE_HEADER).is_none(), "a fresh answer carries no age");
    }

    #[tokio::test]
    async fn a_stuck_publisher_gets_the_last_reading_with_its_age() {
        // Nobody answers requests (a reconcile holds the daemon's lock for good).
        let (tx, rx) = tokio::sync::watch::channel(None);
        let (refresh, _asked) = tokio::sync::mpsc::channel(1);
        let snapshot = Snapshot::new(rx, refresh);
        let resp = status(State(snapshot.clone())).await;
        assert_eq!(resp.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE, "nothing read yet");
        let taken = Instant::now();
        tx.send_replace(Some(Reading { taken, status: Arc::new(sample()) }));
        let (got, fresh) = snapshot.fresh(Duration::from_millis(100)).await.unwrap();
        assert!(!fresh, "the reading began before the request");
        assert_eq!(got.taken, taken);
        let started = Instant::now();
        let resp = status(State(snapshot)).await;
        assert!(started.elapsed() < STATUS_WAIT + Duration::from_secs(1), "answered, not hung");
        assert_eq!(resp.status(), axum::http::StatusCode::OK);
        let age: u64 = resp.headers()[STATUS_AGE_HEADER].to_str().unwrap().parse().unwrap();
        assert!(age >= 3000, "the answer says how old it is: {age} ms");
    }

    #[test]
    fn health_fails_on_an_old_reading_or_a_stalled_lane_and_readiness_without_a_tunnel() {
        let now = Instant::now();
        let at = |age: u64, s: GatewayStatus| Reading {
            taken: now - Duration::from_secs(age),
            status: Arc::new(s),
        };
        assert!(liveness(None, now).is_err(), "nothing read yet");
        assert_eq!(liveness(Some(&at(1, sample())), now), Ok(()));
        assert_eq!(liveness(Some(&at(10, sample())), now), Ok(()), "the bound itself is still live");
        let stuck = liveness(Some(&at(11, sample())), now).unwrap_err();
        assert!(stuck.contains("11 s old"), "{stuck}");
        let mut stalled = sample();
        stalled.cable_stalled_lanes = 1;
        assert!(liveness(Some(&at(0, stalled)), now).unwrap_err().contains("1 of the cable's I/O lanes"));
        // Ready: live and a tunnel works; no remote clusters at all is ready too.
        assert_eq!(readiness(Some(&at(0, sample())), now), Ok(()));
        let mut cut = sample();
        cut.connections[0].status = "down".into();
        let why = readiness(Some(&at(0, cut.clone())), now).unwrap_err();
        assert_eq!(why, "no working tunnel: none of 1 remote clusters is connected");
        cut.connections.clear();
        assert_eq!(readiness(Some(&at(0, cut)), now), Ok(()));
        assert!(readiness(Some(&at(11, sample())), now).is_err(), "not ready when not live");
    }

    #[tokio::test]
    async fn metrics_come_from_the_snapshot_alone() {
        let (tx, rx) = tokio::sync::watch::channel(None);
        let (refresh, _asked) = tokio::sync::mpsc::channel(1);
        let snapshot = Snapshot::new(rx, refresh);
        let reading =
            |s: &GatewayStatus| Some(Reading { taken: Instant::now(), status: Arc::new(s.clone()) });
        let resp = metrics(State(snapshot.clone())).await.into_response();
        assert_eq!(resp.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE, "nothing to render yet");
        let mut s = sample();
        tx.send_replace(reading(&s));
        let resp = metrics(State(snapshot.clone())).await.into_response();
        assert_eq!(resp.status(), axum::http::StatusCode::OK);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        assert_eq!(causeway_lines(std::str::from_utf8(&body).unwrap()), causeway_lines(&render_metrics(&s)));
        // A newer snapshot replaces it for the next scrape.
        s.connections[0].datapath.tx_bytes = 12_345;
        tx.send_replace(reading(&s));
        let resp = metrics(State(snapshot)).await.into_response();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        let text = std::str::from_utf8(&body).unwrap();
        assert!(text.contains("causeway_tx_bytes_total{cluster=\"b\"} 12345\n"), "{text}");
        assert_eq!(causeway_lines(text), causeway_lines(&render_metrics(&s)));
    }

    #[test]
    fn metrics_render_per_cluster_series() {
        let s = sample();
        let text = render_metrics(&s);
        assert!(text.contains("causeway_remote_refused{cluster=\"evil\"} 1\n"), "{text}");
        assert!(text.contains("causeway_route_conflicts{} 1\n"), "{text}");
        assert!(text.contains("causeway_reconcile_failed{step=\"datapath\"} 1\n"), "{text}");
        assert!(text.contains("causeway_connection_up{cluster=\"b\"} 1\n"), "{text}");
        assert!(
            text.contains("causeway_standby_up{cluster=\"b\",endpoint=\"172.31.0.13:51820\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("causeway_tx_bytes_total{cluster=\"b\"} 100\n"));
        assert!(text.contains("causeway_rx_packets_total{cluster=\"b\"} 2\n"));
        assert!(text.contains("causeway_cable_drops_total{reason=\"invalid_packet\"} 4\n"));
        assert!(text.contains("causeway_cable_udp_segmentation{cable=\"wireguard\"} 1\n"), "{text}");
        assert!(text.contains("causeway_policy_drops_total{rule=\"web\"} 2\n"));
        assert!(text.contains("causeway_last_handshake_seconds{cluster=\"b\"} 1.5\n"));
        assert!(text.contains("causeway_rtt_seconds{cluster=\"b\"} 0.0002\n"));
        assert!(
            text.contains("causeway_connection_path{cluster=\"b\",path=\"direct-public\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("causeway_failovers_total{cluster=\"b\",reason=\"unreachable\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("causeway_probe_loss_ratio{cluster=\"b\"} 0.25\n"));
        assert!(text.contains("# TYPE causeway_tx_bytes counter\n"));
        assert!(text.contains("\nprocess_resident_memory_bytes{} "), "{text}");
        assert!(text.contains("\nprocess_start_time_seconds{} "), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
