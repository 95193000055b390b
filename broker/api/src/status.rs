//! A gateway's status as it serves it on its Unix socket (`GET /status`), and a small
//! blocking client for that socket. Here, in the API crate, so that the CLI and the test
//! harness read it without linking the gateway.

use std::{collections::BTreeMap, path::Path};

use serde::{Deserialize, Serialize};

/// Traffic counted by the eBPF programs on the tunnel device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DatapathCounters {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

/// One remote cluster as the gateway sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionView {
    pub cluster_id: String,
    pub endpoint: String,
    pub public_key: String,
    /// `connected` (forwarding works), `connecting` or `down`.
    pub status: String,
    /// The kind of path the tunnel takes: `direct-private` or `direct-public` (absent: the
    /// cable does not say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Round-trip time of the last in-band probe.
    pub rtt_secs: Option<f64>,
    /// Fraction of recent probes lost.
    pub loss: f64,
    pub last_handshake_secs: Option<f64>,
    pub cidrs: Vec<String>,
    /// Counted by the cable (bytes of inner packets).
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    /// Counted in the kernel by the eBPF programs.
    pub datapath: DatapathCounters,
    /// Since when this gateway of the cluster carries its traffic, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carrier: Option<CarrierView>,
}

/// Why a remote cluster's traffic goes to the gateway it goes to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CarrierView {
    /// Seconds since it took over.
    pub since_secs: f64,
    /// `initial`, `unreachable` (the previous one stopped answering), `authority` (the
    /// control plane named it) or `fail_back`.
    pub reason: String,
    /// The control plane names another gateway of the cluster: this side moved on its own
    /// evidence (and stays until the named one answers for the hold-down).
    pub provisional: bool,
}

/// `GET /status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    pub cluster_id: String,
    pub hostname: String,
    pub public_key: String,
    pub cable: String,
    /// I/O threads of the cable (each with a device queue and a socket).
    #[serde(default)]
    pub cable_lanes: usize,
    /// Whether the cable's encrypted runs still leave as UDP segmentation offload messages
    /// (`false`: the kernel refused one, and every datagram now goes out on its own).
    #[serde(default)]
    pub cable_udp_segmentation: bool,
    /// Cable I/O threads that have not turned for 5 s (stuck): `/healthz` fails while any is.
    #[serde(default)]
    pub cable_stalled_lanes: usize,
    /// Where a NAT maps the cable's socket, as the broker's STUN responder last confirmed it
    /// (published as the endpoint's reflexive candidate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reflexive: Option<String>,
    /// The relay that holds this gateway's registration (published as its relay candidate),
    /// and how it is reached: `udp`, or `https` when UDP to it is blocked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_transport: Option<String>,
    pub device: String,
    pub listen_port: u16,
    pub broker_url: String,
    /// Last broker revision applied.
    pub revision: u64,
    pub connections: Vec<ConnectionView>,
    pub cable_drops: BTreeMap<String, u64>,
    pub datapath_events: BTreeMap<String, u64>,
    /// Packets the cluster-set policy dropped, by rule name (`(default)`: no rule matched).
    #[serde(default)]
    pub policy_drops: BTreeMap<String, u64>,
    /// Remote clusters' standby gateways, with sessions kept warm for a failover.
    #[serde(default)]
    pub standbys: Vec<StandbyView>,
    /// Remote clusters this gateway refuses to route, and why (their prefixes would capture
    /// this node, an endpoint or another cluster's traffic, or their key is not theirs).
    #[serde(default)]
    pub refused: BTreeMap<String, String>,
    /// Remote prefixes not routed because a route Causeway did not create holds them.
    #[serde(default)]
    pub route_conflicts: Vec<String>,
    /// Failovers (changes of a remote cluster's carrier) so far, by cluster and reason.
    #[serde(default)]
    pub failovers: BTreeMap<String, BTreeMap<String, u64>>,
    /// Reconcile steps that failed on the last pass (`datapath`, `policy`, `guard`, `routes`,
    /// `peer/<cluster>`), and why; the other steps ran. Retried on the next pass.
    #[serde(default)]
    pub reconcile_failures: BTreeMap<String, String>,
}

/// A remote cluster's standby gateway as this gateway sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StandbyView {
    pub cluster_id: String,
    pub endpoint: String,
    pub public_key: String,
    /// `connected` when its session is up (ready to take over), else `connecting` or `down`.
    pub status: String,
    pub last_handshake_secs: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot reach the gateway's status socket {path}: {source} (is the gateway running?)")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the gateway's status answer could not be read: {0}")]
    Decode(String),
}

/// Reads `GET /status` from a gateway's socket (blocking; plain HTTP/1.0, std only, so the CLI
/// needs no HTTP stack for it).
pub fn fetch(path: &Path) -> Result<GatewayStatus, FetchError> {
    let body = fetch_raw(path, "/status")?;
    serde_json::from_str(&body).map_err(|e| FetchError::Decode(e.to_string()))
}

/// Reads `path_and_query` from a gateway's socket and returns the body.
pub fn fetch_raw(path: &Path, path_and_query: &str) -> Result<String, FetchError> {
    use std::io::{Read as _, Write as _};
    let p = path.display().to_string();
    let mut s = std::os::unix::net::UnixStream::connect(path)
        .map_err(|source| FetchError::Connect { path: p.clone(), source })?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .map_err(|source| FetchError::Connect { path: p.clone(), source })?;
    write!(s, "GET {path_and_query} HTTP/1.0\r\nHost: gateway\r\n\r\n")
        .map_err(|source| FetchError::Connect { path: p.clone(), source })?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(|source| FetchError::Connect { path: p, source })?;
    let (head, body) =
        resp.split_once("\r\n\r\n").ok_or_else(|| FetchError::Decode("no HTTP header".into()))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(FetchError::Decode(format!("{}: {body}", head.lines().next().unwrap_or(""))));
    }
    Ok(body.to_owned())
}
