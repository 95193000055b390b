//! The userspace WireGuard cable: a multi-queue TUN device and a group of UDP sockets on the
//! WireGuard port, driven by [`lanes`] (one thread per queue) around the sans-IO
//! [`core::WgCore`]. Control calls reach the lanes' control thread over a channel.

mod coalesce;
pub mod core;
pub mod gso;
mod lanes;
pub mod probe;
mod reflexive;
pub mod relay_client;
mod relay_stream;
pub mod uapi;

use std::{
    collections::HashMap,
    net::{SocketAddr, UdpSocket},
    os::fd::OwnedFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Duration,
};

use boringtun::x25519::StaticSecret;
use causeway_broker_api::WireGuardKey;
use tokio::sync::oneshot;
use tracing::{info, warn};

use self::core::{PERSISTENT_KEEPALIVE_SECS, PeerConfig, PeerStats, WgCore};
use super::{CableDriver, CableError, Connection, ConnectionStatus, RemoteEndpoint, secs};

/// Settings of the WireGuard cable.
#[derive(Clone)]
pub struct WireGuardConfig {
    /// TUN device name (per network namespace).
    pub device: String,
    pub mtu: u16,
    pub listen_port: u16,
    pub private_key: StaticSecret,
    /// Serve the standard UAPI socket (`/var/run/wireguard/<device>.sock`) for `wg show`.
    pub uapi: bool,
    /// Our health-check address: in-band probes are sent from it and answered on it.
    pub health_ip: Option<std::net::Ipv4Addr>,
    /// Keep the TUN device (with its routes and attached programs) when the process exits,
    /// and take over an existing one of the same name: what makes a restart seamless.
    pub persistent: bool,
    /// I/O threads, each with its own device queue and socket (0: one per CPU, at most
    /// [`MAX_AUTO_LANES`]).
    pub lanes: usize,
    /// Removes the device when a persistent one is cleaned up.
    pub netlink: crate::route::Netlink,
    /// The STUN responder asked for the reflexive address (from the WireGuard socket).
    pub stun_server: Option<SocketAddr>,
    /// The relay to register with (from the WireGuard socket).
    pub relay: Option<relay_client::RelaySettings>,
}

/// Lanes started when none are asked for: one per CPU up to this many. Lanes lock only the
/// peer a packet is for, so more lanes are not held back by each other; the bound is memory
/// (each lane keeps ~1.2 MB of batch buffers) on very wide nodes, where a gateway's traffic,
/// spread by sender and flow, rarely keeps that many cores busy.
pub const MAX_AUTO_LANES: usize = 64;

/// A lane that has not gone round its loop for this long is stuck (an idle one wakes every
/// second).
pub const LANE_STALL: Duration = Duration::from_secs(5);

impl std::fmt::Debug for WireGuardConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireGuardConfig")
            .field("device", &self.device)
            .field("mtu", &self.mtu)
            .field("listen_port", &self.listen_port)
            .field("lanes", &self.lanes)
            .finish_non_exhaustive()
    }
}

impl WireGuardConfig {
    /// The userspace WireGuard driver's reading of the driver-neutral settings: the device
    /// MTU is the underlay's less WireGuard's encapsulation.
    #[must_use]
    pub fn from_settings(s: &super::CableSettings) -> Self {
        Self {
            device: s.device.clone(),
            mtu: s.underlay_mtu.saturating_sub(core::WG_OVERHEAD),
            listen_port: s.listen_port,
            private_key: s.private_key.clone(),
            uapi: s.uapi,
            health_ip: s.health_ip,
            persistent: s.persistent,
            lanes: s.lanes,
            netlink: s.netlink.clone(),
            stun_server: s.stun_server,
            relay: s.relay.clone(),
        }
    }
}

/// Peers and drop counters, as one consistent reading.
type Snapshot = (Vec<PeerStats>, Vec<(&'static str, u64)>);

pub(super) enum Command {
    Upsert(PeerConfig, oneshot::Sender<Result<(), core::PeerRefused>>),
    Remove(WireGuardKey, oneshot::Sender<bool>),
    Stats(oneshot::Sender<Snapshot>),
    SetHealthIp(Option<std::net::Ipv4Addr>),
    Stop(oneshot::Sender<()>),
}

/// Handle on the running cable.
#[derive(Debug)]
pub struct WireGuardCable {
    device: String,
    mtu: u16,
    public_key: WireGuardKey,
    local_addr: SocketAddr,
    tx: mpsc::Sender<Command>,
    /// Remote cluster → the keys of its peers (the active gateway's first, then standbys).
    keys: HashMap<String, Vec<WireGuardKey>>,
    lanes: usize,
    segmentation: Arc<AtomicBool>,
    uapi: Option<(std::path::PathBuf, tokio::task::JoinHandle<()>)>,
    persistent: bool,
    netlink: crate::route::Netlink,
    beats: lanes::Beats,
    /// The reflexive address as the core last saw it.
    reflexive: Arc<std::sync::Mutex<Option<SocketAddr>>>,
    /// The relay while registered, and how it is reached, as the core last saw it.
    relay: Arc<std::sync::Mutex<Option<(SocketAddr, relay_client::Transport)>>>,
    /// The relay's stream proxy (when the relay may be reached over the broker's HTTPS port).
    relay_proxy: Option<tokio::task::JoinHandle<()>>,
}

impl WireGuardCable {
    /// Creates the TUN device's queues and the UDP sockets (in the calling thread's network
    /// namespace) and starts the lanes.
    pub async fn start(cfg: WireGuardConfig) -> Result<Self, CableError> {
        let device_err =
            |source: std::io::Error| CableError::CreateDevice { name: cfg.device.clone(), source };
        let want = match cfg.lanes {
            0 => std::thread::available_parallelism().map_or(1, usize::from).min(MAX_AUTO_LANES),
            n => n,
        };
        let first = open_device(&cfg).map_err(device_err)?;
        set_persistent(&first, cfg.persistent).map_err(|e| device_err(e.into()))?;
        let first_udp = bind_reuseport(cfg.listen_port)
            .map_err(|source| CableError::Bind { port: cfg.listen_port, source })?;
        let local_addr =
            first_udp.local_addr().map_err(|source| CableError::Bind { port: cfg.listen_port, source })?;
        let gro = gso::enable_gro(&first_udp);
        let mut lanes = vec![lanes::Lane { tun: first, udp: first_udp }];
        while lanes.len() < want {
            // A queue nobody reads would strand the flows the kernel hashes to it: a queue
            // only joins with its socket.
            let more = lanes[0].tun.try_clone().and_then(|tun| {
                let udp = bind_reuseport(local_addr.port())?;
                Ok(lanes::Lane { tun, udp })
            });
            match more {
                Ok(lane) => lanes.push(lane),
                Err(e) => {
                    warn!(device = %cfg.device, error = %e, lanes = lanes.len(), "could not add a lane; running with fewer");
                    break;
                }
            }
        }
        for lane in &lanes {
            lane.tun.set_nonblocking(true).map_err(device_err)?;
            size_socket_buffers(&lane.udp);
            if gro {
                gso::enable_gro(&lane.udp);
            }
        }
        let private_bytes = cfg.private_key.to_bytes();
        let mut core = WgCore::new(cfg.private_key);
        core.set_health_ip(cfg.health_ip);
        core.set_stun_server(cfg.stun_server);
        // The stream proxy's socket is bound here, in the cable's namespace, beside the lanes'.
        let proxy = match cfg.relay.as_ref().and_then(|r| r.stream.clone()) {
            Some(open) => {
                match relay_stream::bind(local_addr.port()).and_then(|u| Ok((u.local_addr()?, u))) {
                    Ok((addr, udp)) => Some((addr, tokio::spawn(relay_stream::run(udp, open)))),
                    Err(e) => {
                        warn!(error = %e, "no relay stream proxy: the relay is reached by UDP only");
                        None
                    }
                }
            }
            None => None,
        };
        core.set_relay(cfg.relay.clone(), proxy.as_ref().map(|(addr, _)| *addr));
        let reflexive = core.reflexive();
        let relay = core.relay();
        let public_key = core.public_key();
        let (tx, rx) = mpsc::channel();
        let lane_count = lanes.len();
        // Runs leave as `UDP_SEGMENT` messages until the kernel refuses one.
        let segmentation = Arc::new(AtomicBool::new(true));
        let beats =
            lanes::start(core, lanes, rx, usize::from(cfg.mtu), segmentation.clone()).map_err(device_err)?;
        let uapi = if cfg.uapi {
            let tx = tx.clone();
            let snapshot = move || {
                let tx = tx.clone();
                async move {
                    let (reply, rx) = oneshot::channel();
                    tx.send(Command::Stats(reply)).ok()?;
                    rx.await.ok().map(|(peers, _)| peers)
                }
            };
            let served = uapi::serve(
                &cfg.device,
                private_bytes,
                local_addr.port(),
                PERSISTENT_KEEPALIVE_SECS,
                snapshot,
            )
            .map_err(|source| CableError::Uapi { device: cfg.device.clone(), source })?;
            Some(served)
        } else {
            None
        };
        info!(device = %cfg.device, mtu = cfg.mtu, listen = %local_addr, key = %public_key, lanes = lane_count, "wireguard cable up");
        Ok(Self {
            device: cfg.device,
            mtu: cfg.mtu,
            public_key,
            local_addr,
            tx,
            keys: HashMap::new(),
            lanes: lane_count,
            segmentation,
            uapi,
            persistent: cfg.persistent,
            netlink: cfg.netlink,
            beats,
            reflexive,
            relay,
            relay_proxy: proxy.map(|(_, task)| task),
        })
    }

    #[must_use]
    pub fn public_key(&self) -> WireGuardKey {
        self.public_key
    }

    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, CableError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).map_err(|_| CableError::Stopped)?;
        rx.await.map_err(|_| CableError::Stopped)
    }
}

impl CableDriver for WireGuardCable {
    fn set_health_ip(&mut self, ip: Option<std::net::Ipv4Addr>) {
        // Applied by the control lane between its other commands; a cable that stopped has
        // no probes to answer.
        let _ = self.tx.send(Command::SetHealthIp(ip));
    }

    fn info(&self) -> super::CableInfo {
        let relay = *self.relay.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        super::CableInfo {
            name: "wireguard",
            device: self.device.clone(),
            mtu: self.mtu,
            details: super::CableDetails {
                lanes: Some(self.lanes),
                // `false` once the kernel refused a segmented send: every datagram then
                // costs its own trip through the stack.
                udp_segmentation: Some(self.segmentation.load(Ordering::Relaxed)),
                stalled_lanes: Some(self.beats.stalled(LANE_STALL)),
                reflexive: *self.reflexive.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
                relay: relay.map(|(addr, _)| addr),
                relay_transport: relay.map(|(_, via)| via.name()),
            },
        }
    }

    async fn connect(&mut self, ep: &RemoteEndpoint) -> Result<(), CableError> {
        let want: Vec<WireGuardKey> =
            std::iter::once(ep.public_key).chain(ep.standbys.iter().map(|s| s.public_key)).collect();
        let have = self.keys.get(&ep.cluster_id).cloned().unwrap_or_default();
        for old in have.into_iter().filter(|k| !want.contains(k)) {
            // A gateway of the cluster that is gone (or changed key): its session goes.
            self.call(|tx| Command::Remove(old, tx)).await?;
        }
        // The carrier first: a gateway promoted from standby takes the prefixes over on the
        // session it already has, and only then does the demoted one give them up, so that
        // there is no moment when nobody carries them (in between, either may).
        let cfg = PeerConfig {
            cluster_id: ep.cluster_id.clone(),
            public_key: ep.public_key,
            endpoint: ep.endpoint,
            candidates: ep.candidates.clone(),
            allowed: ep.cidrs.clone(),
            health_ip: ep.health_ip,
        };
        self.call(|tx| Command::Upsert(cfg, tx)).await?.map_err(CableError::PeerRefused)?;
        for s in &ep.standbys {
            let cfg = PeerConfig {
                cluster_id: ep.cluster_id.clone(),
                public_key: s.public_key,
                endpoint: s.endpoint,
                candidates: s.candidates.clone(),
                allowed: Vec::new(),
                // Probed like the carrier: the switch only moves traffic to one that answers.
                health_ip: s.health_ip,
            };
            self.call(|tx| Command::Upsert(cfg, tx)).await?.map_err(CableError::PeerRefused)?;
        }
        self.keys.insert(ep.cluster_id.clone(), want);
        Ok(())
    }

    async fn disconnect(&mut self, cluster_id: &str) -> Result<(), CableError> {
        for key in self.keys.remove(cluster_id).unwrap_or_default() {
            self.call(|tx| Command::Remove(key, tx)).await?;
        }
        Ok(())
    }

    async fn connections(&self) -> Result<Vec<Connection>, CableError> {
        let (peers, _) = self.call(Command::Stats).await?;
        Ok(peers
            .into_iter()
            .map(|p| Connection {
                status: status_of(&p),
                rtt_secs: p.rtt.map(|d| d.as_secs_f64()),
                loss: p.loss,
                probed: p.probed,
                path: Some(p.path),
                // Every cluster has prefixes: a peer without any is one of its standbys.
                standby: p.config.allowed.is_empty(),
                cluster_id: p.config.cluster_id,
                endpoint: p.config.endpoint,
                public_key: p.config.public_key.to_string(),
                last_handshake_secs: secs(p.last_handshake),
                tx_bytes: p.tx_bytes,
                rx_bytes: p.rx_bytes,
                tx_packets: p.tx_packets,
                rx_packets: p.rx_packets,
                local_index: p.index,
                evidence: p.evidence,
            })
            .collect())
    }

    async fn drops(&self) -> Result<Vec<(&'static str, u64)>, CableError> {
        Ok(self.call(Command::Stats).await?.1)
    }

    async fn cleanup(&mut self) -> Result<(), CableError> {
        self.keys.clear();
        if let Some(task) = self.relay_proxy.take() {
            task.abort();
        }
        if let Some((path, task)) = self.uapi.take() {
            task.abort();
            let _ = std::fs::remove_file(path);
        }
        // Without IFF_PERSIST the device disappears with the task's fd; with it, remove it.
        self.call(Command::Stop).await?;
        if self.persistent {
            self.netlink
                .delete_link(&self.device)
                .await
                .map_err(|e| CableError::RemoveDevice { name: self.device.clone(), source: Box::new(e) })?;
        }
        Ok(())
    }
}

/// Sets or clears `IFF_PERSIST` on the device behind `tun`. Clearing it on a device an earlier
/// restart-safe run left behind makes it go with this process, as a non-persistent one does.
fn set_persistent(tun: &impl std::os::fd::AsRawFd, on: bool) -> Result<(), nix::Error> {
    nix::ioctl_write_int!(tunsetpersist, b'T', 203);
    #[expect(unsafe_code, reason = "TUNSETPERSIST takes an int by value on a TUN descriptor we own")]
    // SAFETY: the descriptor is a live TUN fd for the duration of the call.
    unsafe { tunsetpersist(tun.as_raw_fd(), nix::sys::ioctl::ioctl_param_type::from(on)) }.map(drop)
}

/// Opens the device's first queue, creating the device if it does not exist. Every queue
/// carries virtio headers with TSO/USO: the pods' stacks hand over up to 64 KB at a time and
/// the segmentation happens here, once per read instead of once per packet in the kernel;
/// decrypted packets are coalesced (GRO) before they are written.
fn open_device(cfg: &WireGuardConfig) -> std::io::Result<tun_rs::SyncDevice> {
    let build = |multi_queue: bool| {
        tun_rs::DeviceBuilder::new()
            .name(&cfg.device)
            .mtu(cfg.mtu)
            // The kernel→reader ring of each queue is txqueuelen long; at the default 500 a
            // single TCP stream overflows it while the reader encrypts.
            .tx_queue_len(TUN_QUEUE_LEN)
            .offload(true)
            .multi_queue(multi_queue)
            .build_sync()
    };
    build(true).or_else(|e| {
        // A persistent device left by a version without queues cannot take a second one.
        warn!(device = %cfg.device, error = %e, "the device refuses multiple queues; running one lane (`causeway cleanup --device` recreates it)");
        build(false)
    })
}

/// A non-blocking UDP socket on `port` (all addresses) in a `SO_REUSEPORT` group.
fn bind_reuseport(port: u16) -> std::io::Result<UdpSocket> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, setsockopt, socket, sockopt,
    };
    let fd: OwnedFd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::new(0, 0, 0, 0, port))?;
    Ok(UdpSocket::from(fd))
}

/// Length of the TUN device's queue.
const TUN_QUEUE_LEN: u32 = 10_000;

/// Socket buffer size (what wireguard-go uses): at the kernel's default ~208 KiB the receiving
/// gateway drops ~12 % of a single TCP stream's datagrams, and TCP goodput collapses.
const SOCKET_BUFFER: usize = 7 << 20;

/// Sizes the UDP socket's buffers past `net.core.{r,w}mem_max` (the FORCE options need
/// CAP_NET_ADMIN, which a gateway has; those sysctls cannot be raised from a child namespace).
fn size_socket_buffers(udp: &UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    if let Err(e) = setsockopt(udp, sockopt::RcvBufForce, &SOCKET_BUFFER) {
        warn!(error = %e, "could not force the UDP receive buffer; falling back to the capped size");
        let _ = setsockopt(udp, sockopt::RcvBuf, &SOCKET_BUFFER);
    }
    if let Err(e) = setsockopt(udp, sockopt::SndBufForce, &SOCKET_BUFFER) {
        warn!(error = %e, "could not force the UDP send buffer; falling back to the capped size");
        let _ = setsockopt(udp, sockopt::SndBuf, &SOCKET_BUFFER);
    }
}

/// Connected means forwarding works: with probes, only while they are answered; without
/// (a peer that publishes no health address), while a session is established.
fn status_of(p: &PeerStats) -> ConnectionStatus {
    use self::probe::Health;
    match (p.probed, p.health) {
        (true, Health::Up) => ConnectionStatus::Connected,
        (true, Health::Down) => ConnectionStatus::Down,
        // Had a session once, and it expired.
        (_, _) if !p.has_session() && p.last_handshake.is_some() => ConnectionStatus::Down,
        (true, Health::Unknown) => ConnectionStatus::Connecting,
        (false, _) if p.has_session() => ConnectionStatus::Connected,
        (false, _) => ConnectionStatus::Connecting,
    }
}
