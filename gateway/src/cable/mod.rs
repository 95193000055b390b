//! Cable drivers: how a gateway reaches remote gateways. One trait (Submariner's
//! `cable.Driver`, shortened), a closed enum of backends picked by name.

pub mod paths;
pub mod wireguard;

use std::{future::Future, net::SocketAddr, time::Duration};

use causeway_broker_api::CABLE_BACKENDS;
use serde::Serialize;

pub use wireguard::{WireGuardCable, WireGuardConfig};

#[derive(Debug, thiserror::Error)]
pub enum CableError {
    #[error("unknown cable backend {name:?}; valid backends: {}", CABLE_BACKENDS.join(", "))]
    UnknownBackend { name: String },
    #[error("creating the tunnel device {name}: {source}")]
    CreateDevice {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("binding the cable's UDP socket on port {port}: {source}")]
    Bind {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("serving the WireGuard UAPI socket of {device}: {source}")]
    Uapi {
        device: String,
        #[source]
        source: std::io::Error,
    },
    #[error("removing the tunnel device {name}: {source}")]
    RemoveDevice {
        name: String,
        #[source]
        source: Box<crate::route::RouteError>,
    },
    #[error("the cable's I/O task has stopped")]
    Stopped,
    #[error("peer refused: {0}")]
    PeerRefused(#[source] wireguard::core::PeerRefused),
}

// The domain types every part shares live in `model`; the cable takes them as they are.
pub use crate::model::{RemoteEndpoint, StandbyGateway};

/// Connection state as `show connections` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionStatus {
    /// Configured, no live session yet (or it expired).
    Connecting,
    /// Forwarding works: in-band probes are answered (or, for a peer without a health
    /// address, a session is established).
    Connected,
    /// Probes go unanswered, or the session expired.
    Down,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Connection {
    pub cluster_id: String,
    pub endpoint: SocketAddr,
    pub public_key: String,
    pub status: ConnectionStatus,
    /// Round-trip time of the last answered probe.
    pub rtt_secs: Option<f64>,
    /// Fraction of recent probes lost.
    pub loss: f64,
    /// Whether in-band probes run on this connection.
    pub probed: bool,
    /// The kind of path the tunnel takes (drivers that choose among candidates).
    pub path: Option<paths::PathKind>,
    pub last_handshake_secs: Option<f64>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub rx_packets: u64,
    /// A standby gateway of the cluster (session kept warm, no prefixes).
    pub standby: bool,
    /// Our index for this peer (the receiver index its data messages carry, less the low 8
    /// bits); 0 for backends without one.
    #[serde(skip)]
    pub local_index: u32,
    /// The probes' evidence, for the failover switch.
    #[serde(skip)]
    pub evidence: crate::failover::Evidence,
}

/// What a running cable says about itself, the same for every driver: the daemon attaches the
/// datapath to `device`, sizes it by `mtu`, names the backend in the endpoint record, and
/// reports the rest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CableInfo {
    /// The backend's name (`wireguard`), as the endpoint record's `backend` gives it.
    pub name: &'static str,
    /// The tunnel device the datapath attaches to and routes point at.
    pub device: String,
    /// The device's MTU: the underlay's less the driver's overhead.
    pub mtu: u16,
    pub details: CableDetails,
}

/// Facts only some drivers have (`None`: not this driver's kind of thing).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CableDetails {
    /// I/O threads moving packets (userspace drivers).
    pub lanes: Option<usize>,
    /// Whether encrypted traffic still leaves in UDP segmentation offload runs (drivers that
    /// batch datagrams; `false` once the kernel refused one).
    pub udp_segmentation: Option<bool>,
    /// I/O threads that have stopped turning (userspace drivers): the gateway is not live.
    pub stalled_lanes: Option<usize>,
    /// Where a NAT maps the cable's socket, as the STUN responder last confirmed it (drivers
    /// that ask): the endpoint record's reflexive candidate.
    pub reflexive: Option<SocketAddr>,
    /// The relay, while it holds a current registration of the cable's (drivers that
    /// register): the endpoint record's relay candidate.
    pub relay: Option<SocketAddr>,
    /// How the relay is reached: `udp`, or `https` (a stream on the broker's API port).
    pub relay_transport: Option<&'static str>,
}

/// What every cable backend does.
pub trait CableDriver: Send + 'static {
    /// Name, device, MTU and details of the running cable.
    fn info(&self) -> CableInfo;
    /// Connects to (or updates) the remote endpoint; idempotent.
    fn connect(&mut self, ep: &RemoteEndpoint) -> impl Future<Output = Result<(), CableError>> + Send;
    /// Disconnects the cluster; absent is success.
    fn disconnect(&mut self, cluster_id: &str) -> impl Future<Output = Result<(), CableError>> + Send;
    fn connections(&self) -> impl Future<Output = Result<Vec<Connection>, CableError>> + Send;
    /// Drop counters by reason.
    fn drops(&self) -> impl Future<Output = Result<Vec<(&'static str, u64)>, CableError>> + Send;
    /// Tears the cable down (device, sockets).
    fn cleanup(&mut self) -> impl Future<Output = Result<(), CableError>> + Send;
    /// Where this gateway answers its peers' probes (the address its endpoint record
    /// publishes): it moves to the global prefix in overlap mode. Drivers without probes
    /// ignore it.
    fn set_health_ip(&mut self, _ip: Option<std::net::Ipv4Addr>) {}
}

/// What the daemon gives every cable driver: nothing driver-specific. Each driver reads it
/// its own way (its device MTU is the underlay's less its own overhead).
#[derive(Clone)]
pub struct CableSettings {
    /// Tunnel device name.
    pub device: String,
    /// MTU of the underlay path.
    pub underlay_mtu: u16,
    pub listen_port: u16,
    /// The gateway's key; its public half is in the endpoint record.
    pub private_key: boringtun::x25519::StaticSecret,
    /// Our health-check address: in-band probes are sent from it and answered on it.
    pub health_ip: Option<std::net::Ipv4Addr>,
    /// Keep the device (with its routes and programs) across restarts.
    pub persistent: bool,
    /// I/O threads, for drivers that run their own (0: automatic).
    pub lanes: usize,
    /// Serve the driver's management socket (`wg show`), for drivers that have one.
    pub uapi: bool,
    /// The process's netlink owner (a driver removes its persistent device through it).
    pub netlink: crate::route::Netlink,
    /// The STUN responder that tells the cable its reflexive address (drivers with their own
    /// UDP socket ask from it); `None`: not asked.
    pub stun_server: Option<SocketAddr>,
    /// The relay to register with, for peers no direct path reaches (drivers with their own
    /// UDP socket); `None`: none.
    pub relay: Option<wireguard::relay_client::RelaySettings>,
}

impl std::fmt::Debug for CableSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CableSettings")
            .field("device", &self.device)
            .field("underlay_mtu", &self.underlay_mtu)
            .field("listen_port", &self.listen_port)
            .field("lanes", &self.lanes)
            .finish_non_exhaustive()
    }
}

/// The backends, selected by name (no `dyn`, no `async_trait`).
#[derive(Debug)]
pub enum AnyCable {
    WireGuard(WireGuardCable),
}

impl AnyCable {
    /// Starts the backend called `name`.
    pub async fn start(name: &str, settings: &CableSettings) -> Result<Self, CableError> {
        match name {
            "wireguard" => {
                Ok(Self::WireGuard(WireGuardCable::start(WireGuardConfig::from_settings(settings)).await?))
            }
            other => Err(CableError::UnknownBackend { name: other.to_owned() }),
        }
    }
}

impl CableDriver for AnyCable {
    fn info(&self) -> CableInfo {
        match self {
            Self::WireGuard(c) => c.info(),
        }
    }
    async fn connect(&mut self, ep: &RemoteEndpoint) -> Result<(), CableError> {
        match self {
            Self::WireGuard(c) => c.connect(ep).await,
        }
    }
    async fn disconnect(&mut self, cluster_id: &str) -> Result<(), CableError> {
        match self {
            Self::WireGuard(c) => c.disconnect(cluster_id).await,
        }
    }
    async fn connections(&self) -> Result<Vec<Connection>, CableError> {
        match self {
            Self::WireGuard(c) => c.connections().await,
        }
    }
    async fn drops(&self) -> Result<Vec<(&'static str, u64)>, CableError> {
        match self {
            Self::WireGuard(c) => c.drops().await,
        }
    }
    async fn cleanup(&mut self) -> Result<(), CableError> {
        match self {
            Self::WireGuard(c) => c.cleanup().await,
        }
    }
    fn set_health_ip(&mut self, ip: Option<std::net::Ipv4Addr>) {
        match self {
            Self::WireGuard(c) => c.set_health_ip(ip),
        }
    }
}

pub(crate) fn secs(d: Option<Duration>) -> Option<f64> {
    d.map(|d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unknown_backend_lists_the_valid_ones() {
        let settings = CableSettings {
            device: "cwtest0".into(),
            underlay_mtu: 1500,
            listen_port: 0,
            private_key: boringtun::x25519::StaticSecret::from([1; 32]),
            health_ip: None,
            persistent: false,
            lanes: 1,
            uapi: false,
            netlink: crate::route::Netlink::open().unwrap(),
            stun_server: None,
            relay: None,
        };
        let err = AnyCable::start("ipsec", &settings).await.unwrap_err();
        assert_eq!(err.to_string(), "unknown cable backend \"ipsec\"; valid backends: wireguard");
    }
}
