//! The gateway's local status endpoint, on a Unix socket (reachable from any namespace on the
//! node, nothing exposed on the network): `GET /status` (JSON, what `causeway show
//! connections` prints) and `GET /metrics` (Prometheus text).

use std::{fmt::Write as _, path::Path, sync::Arc};

use axum::{Json, Router, extract::State, http::header, response::IntoResponse, routing::get};
use tokio::sync::Mutex;
use tracing::warn;

use crate::daemon::Shared;

// The wire types live in the API crate, so that clients (the CLI, the test harness) read a
// gateway's status without linking the gateway.
pub use causeway_broker_api::status::{
    ConnectionView, DatapathCounters, FetchError, GatewayStatus, StandbyView, fetch, fetch_raw,
};

async fn status(State(shared): State<Arc<Mutex<Shared>>>) -> impl IntoResponse {
    match shared.lock().await.status().await {
        Ok(s) => Json(s).into_response(),
        Err(e) => {
            warn!(error = %e, "status failed");
            (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
        }
    }
}

/// The latest status, refreshed in the background ([`start_snapshots`]). Metrics are rendered
/// from it: a scrape never waits on the daemon's lock, and never holds it while a reconcile
/// waits (however many scrapers there are, or however slow they read).
#[derive(Clone, Debug)]
pub struct Snapshot(pub tokio::sync::watch::Receiver<Option<Arc<GatewayStatus>>>);

/// Refreshes the snapshot every `every` (one lock and one status read per period, whatever
/// the scrape rate).
pub fn start_snapshots(
    shared: Arc<Mutex<Shared>>,
    every: std::time::Duration,
) -> (Snapshot, tokio::task::JoinHandle<()>) {
    let (tx, rx) = tokio::sync::watch::channel(None);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let status = shared.lock().await.status().await;
            match status {
                Ok(s) => {
                    tx.send_replace(Some(Arc::new(s)));
                }
                Err(e) => {
                    warn!(error = %e, "refreshing the status snapshot failed; metrics show the last one")
                }
            }
        }
    });
    (Snapshot(rx), task)
}

async fn metrics(State(snapshot): State<Snapshot>) -> impl IntoResponse {
    let latest = snapshot.0.borrow().clone();
    match latest {
        Some(s) => {
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], render_metrics(&s)).into_response()
        }
        None => (axum::http::StatusCode::SERVICE_UNAVAILABLE, "no status yet\n").into_response(),
    }
}

/// Prometheus text exposition of a status snapshot.
#[must_use]
pub fn render_metrics(s: &GatewayStatus) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    };
    let per = |f: &dyn Fn(&ConnectionView) -> f64| -> Vec<(String, f64)> {
        s.connections.iter().map(|c| (format!("cluster=\"{}\"", c.cluster_id), f(c))).collect()
    };
    family(
        "causeway_standby_up",
        "gauge",
        "1 when the session with a remote cluster's standby gateway is established (warm)",
        s.standbys
            .iter()
            .map(|c| {
                let up = if c.status == "connected" { 1.0 } else { 0.0 };
                (format!("cluster=\"{}\",endpoint=\"{}\"", c.cluster_id, c.endpoint), up)
            })
            .collect(),
    );
    family(
        "causeway_connection_up",
        "gauge",
        "1 when a session with the remote gateway is established",
        per(&|c| {
            if c.status == "connected" { 1.0 } else { 0.0 }
        }),
    );
    #[expect(clippy::cast_precision_loss, reason = "metrics are floats by definition")]
    {
        family(
            "causeway_tx_bytes_total",
            "counter",
            "Bytes sent to the remote cluster (eBPF)",
            per(&|c| c.datapath.tx_bytes as f64),
        );
        family(
            "causeway_rx_bytes_total",
            "counter",
            "Bytes received from the remote cluster (eBPF)",
            per(&|c| c.datapath.rx_bytes as f64),
        );
        family(
            "causeway_tx_packets_total",
            "counter",
            "Packets sent to the remote cluster (eBPF)",
            per(&|c| c.datapath.tx_packets as f64),
        );
        family(
            "causeway_rx_packets_total",
            "counter",
            "Packets received from the remote cluster (eBPF)",
            per(&|c| c.datapath.rx_packets as f64),
        );
        family(
            "causeway_cable_drops_total",
            "counter",
            "Packets the cable dropped, by reason",
            s.cable_drops.iter().map(|(k, v)| (format!("reason=\"{k}\""), *v as f64)).collect(),
        );
        family(
            "causeway_cable_udp_segmentation",
            "gauge",
            "1 while encrypted runs leave as UDP segmentation offload messages; 0 once the kernel refused one",
            vec![(format!("cable=\"{}\"", s.cable), if s.cable_udp_segmentation { 1.0 } else { 0.0 })],
        );
        family(
            "causeway_datapath_events_total",
            "counter",
            "Datapath events counted in the kernel, by kind",
            s.datapath_events.iter().map(|(k, v)| (format!("event=\"{k}\""), *v as f64)).collect(),
        );
        family(
            "causeway_policy_drops_total",
            "counter",
            "Packets dropped by the cluster-set policy (both directions), by deciding rule",
            s.policy_drops.iter().map(|(k, v)| (format!("rule=\"{k}\""), *v as f64)).collect(),
        );
    }
    family(
        "causeway_rtt_seconds",
        "gauge",
        "Round-trip time of the last in-band probe through the tunnel",
        s.connections
            .iter()
            .filter_map(|c| c.rtt_secs.map(|v| (format!("cluster=\"{}\"", c.cluster_id), v)))
            .collect(),
    );
    family(
        "causeway_probe_loss_ratio",
        "gauge",
        "Fraction of recent in-band probes that were lost",
        s.connections.iter().map(|c| (format!("cluster=\"{}\"", c.cluster_id), c.loss)).collect(),
    );
    family(
        "causeway_last_handshake_seconds",
        "gauge",
        "Seconds since the last handshake with the remote gateway",
        s.connections
            .iter()
            .filter_map(|c| c.last_handshake_secs.map(|v| (format!("cluster=\"{}\"", c.cluster_id), v)))
            .collect(),
    );
    family(
        "causeway_remote_refused",
        "gauge",
        "Remote clusters this gateway refuses to route (see show connections for why)",
        s.refused.keys().map(|c| (format!("cluster=\"{c}\""), 1.0)).collect(),
    );
    family(
        "causeway_route_conflicts",
        "gauge",
        "Remote prefixes not routed because a route Causeway did not create holds them",
        vec![(String::new(), s.route_conflicts.len() as f64)],
    );
    family(
        "causeway_reconcile_failed",
        "gauge",
        "Reconcile steps that failed on the last pass (the others ran; retried on the next pass)",
        s.reconcile_failures.keys().map(|step| (format!("step=\"{step}\""), 1.0)).collect(),
    );
    family(
        "causeway_build_info",
        "gauge",
        "Build information",
        vec![(format!("version=\"{}\"", env!("CARGO_PKG_VERSION")), 1.0)],
    );
    let p = process_stats();
    for (name, kind, help, value) in [
        ("process_cpu_seconds_total", "counter", "User and system CPU time spent", p.cpu_seconds),
        ("process_resident_memory_bytes", "gauge", "Resident memory size", p.resident_bytes),
        ("process_start_time_seconds", "gauge", "Start time since the Unix epoch", p.start_time),
    ] {
        if let Some(v) = value {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        }
    }
    out
}

struct ProcessStats {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<f64>,
    start_time: Option<f64>,
}

/// Reads this process's CPU time, RSS and start time from /proc (Linux clock ticks are 100 Hz
/// and pages 4 KiB on every platform we run on).
fn process_stats() -> ProcessStats {
    const TICKS: f64 = 100.0;
    const PAGE: f64 = 4096.0;
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime is field 14, stime 15, starttime 22.
    let rest: Vec<&str> =
        stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let field = |n: usize| rest.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    let cpu_seconds = field(14).zip(field(15)).map(|(u, s)| (u + s) / TICKS);
    let resident_bytes = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        .map(|pages| pages * PAGE);
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines().find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<f64>().ok()))
    });
    let start_time = boot.zip(field(22)).map(|(b, t)| b + t / TICKS);
    ProcessStats { cpu_seconds, resident_bytes, start_time }
}

/// What the network may ask: metrics and health. `/status` (keys, endpoints, why a member is
/// refused) stays on the node's owner-only Unix socket.
fn tcp_router(snapshot: Snapshot) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(snapshot)
}

fn router(shared: Arc<Mutex<Shared>>, snapshot: Snapshot) -> Router {
    Router::new().route("/status", get(status)).with_state(shared).merge(tcp_router(snapshot))
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
pub async fn serve(
    path: &Path,
    shared: Arc<Mutex<Shared>>,
    snapshot: Snapshot,
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
    let app = router(shared, snapshot);
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
            device: "cw0".into(),
            listen_port: 51820,
            broker_url: "http://x".into(),
            revision: 3,
            connections: vec![ConnectionView {
                cluster_id: "b".into(),
                endpoint: "172.31.0.12:51820".into(),
                public_key: "k2".into(),
                status: "connected".into(),
                rtt_secs: Some(0.0002),
                loss: 0.25,
                last_handshake_secs: Some(1.5),
                cidrs: vec!["10.2.0.0/16".into()],
                tx_bytes: 10,
                rx_bytes: 20,
                datapath: DatapathCounters { tx_packets: 1, tx_bytes: 100, rx_packets: 2, rx_bytes: 200 },
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
        }
    }

    /// The metrics text less the process's own series (resident memory moves between calls).
    fn causeway_lines(text: &str) -> Vec<String> {
        text.lines().filter(|l| !l.contains("process_")).map(str::to_owned).collect()
    }

    #[tokio::test]
    async fn metrics_come_from_the_snapshot_alone() {
        let (tx, rx) = tokio::sync::watch::channel(None);
        let snapshot = Snapshot(rx);
        let resp = metrics(State(snapshot.clone())).await.into_response();
        assert_eq!(resp.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE, "nothing to render yet");
        let mut s = sample();
        tx.send_replace(Some(Arc::new(s.clone())));
        let resp = metrics(State(snapshot.clone())).await.into_response();
        assert_eq!(resp.status(), axum::http::StatusCode::OK);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        assert_eq!(causeway_lines(std::str::from_utf8(&body).unwrap()), causeway_lines(&render_metrics(&s)));
        // A newer snapshot replaces it for the next scrape.
        s.connections[0].datapath.tx_bytes = 12_345;
        tx.send_replace(Some(Arc::new(s.clone())));
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
        assert!(text.contains("causeway_probe_loss_ratio{cluster=\"b\"} 0.25\n"));
        assert!(text.contains("# TYPE causeway_tx_bytes_total counter\n"));
        assert!(text.contains("\nprocess_resident_memory_bytes "), "{text}");
        assert!(text.contains("\nprocess_start_time_seconds "), "{text}");
    }
}
