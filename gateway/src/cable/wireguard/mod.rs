//! The userspace WireGuard cable: a TUN device and a UDP socket driven by one tokio task that
//! owns the sans-IO [`core::WgCore`]. Control calls reach the task over a channel.
//!
//! The fast-path issue replaces this loop (batched syscalls, offloads, several workers)
//! without touching `core`.

pub mod core;
mod gso;
pub mod probe;
pub mod uapi;

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use boringtun::x25519::StaticSecret;
use causeway_broker_api::WireGuardKey;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use self::core::{BUF_SIZE, Output, PERSISTENT_KEEPALIVE_SECS, PeerConfig, PeerStats, WgCore};
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
}

impl std::fmt::Debug for WireGuardConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireGuardConfig")
            .field("device", &self.device)
            .field("mtu", &self.mtu)
            .field("listen_port", &self.listen_port)
            .finish_non_exhaustive()
    }
}

impl WireGuardConfig {
    #[cfg(test)]
    pub(crate) fn for_test() -> Self {
        Self {
            device: "cwtest0".into(),
            mtu: 1420,
            listen_port: 0,
            private_key: StaticSecret::from([1; 32]),
            uapi: false,
            health_ip: None,
            persistent: false,
        }
    }
}

/// Peers and drop counters, as one consistent reading.
type Snapshot = (Vec<PeerStats>, Vec<(&'static str, u64)>);

enum Command {
    Upsert(PeerConfig, oneshot::Sender<()>),
    Remove(WireGuardKey, oneshot::Sender<bool>),
    Stats(oneshot::Sender<Snapshot>),
    Stop(oneshot::Sender<()>),
}

/// Handle on the running cable.
#[derive(Debug)]
pub struct WireGuardCable {
    device: String,
    public_key: WireGuardKey,
    local_addr: SocketAddr,
    tx: mpsc::Sender<Command>,
    /// Remote cluster → the keys of its peers (the active gateway's first, then standbys).
    keys: HashMap<String, Vec<WireGuardKey>>,
    uapi: Option<(std::path::PathBuf, tokio::task::JoinHandle<()>)>,
    persistent: bool,
}

impl WireGuardCable {
    /// Creates the TUN device and the UDP socket (in the calling thread's network namespace)
    /// and starts the I/O task.
    pub async fn start(cfg: WireGuardConfig) -> Result<Self, CableError> {
        let tun = tun_rs::DeviceBuilder::new()
            .name(&cfg.device)
            .mtu(cfg.mtu)
            // The kernel→reader ring of a TUN device is txqueuelen long; at the default 500 a
            // single TCP stream overflows it while the reader encrypts.
            .tx_queue_len(TUN_QUEUE_LEN)
            // IFF_VNET_HDR with TSO/USO: the pods' stacks hand over up to 64 KB at a time and
            // the segmentation happens here, once per read instead of once per packet in
            // the kernel; decrypted packets are coalesced (GRO) before they are written.
            .offload(true)
            .build_async()
            .map_err(|source| CableError::CreateDevice { name: cfg.device.clone(), source })?;
        set_persistent(&tun, cfg.persistent)
            .map_err(|e| CableError::CreateDevice { name: cfg.device.clone(), source: e.into() })?;
        let udp = tokio::net::UdpSocket::bind(("0.0.0.0", cfg.listen_port))
            .await
            .map_err(|source| CableError::Bind { port: cfg.listen_port, source })?;
        let local_addr =
            udp.local_addr().map_err(|source| CableError::Bind { port: cfg.listen_port, source })?;
        size_socket_buffers(&udp);
        let gro = gso::enable_gro(&udp);
        let private_bytes = cfg.private_key.to_bytes();
        let mut core = WgCore::new(cfg.private_key);
        core.set_health_ip(cfg.health_ip);
        let public_key = core.public_key();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(io_loop(core, tun, udp, rx, usize::from(cfg.mtu), gro));
        let uapi = if cfg.uapi {
            let tx = tx.clone();
            let snapshot = move || {
                let tx = tx.clone();
                async move {
                    let (reply, rx) = oneshot::channel();
                    tx.send(Command::Stats(reply)).await.ok()?;
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
        info!(device = %cfg.device, mtu = cfg.mtu, listen = %local_addr, key = %public_key, "wireguard cable up");
        Ok(Self {
            device: cfg.device,
            public_key,
            local_addr,
            tx,
            keys: HashMap::new(),
            uapi,
            persistent: cfg.persistent,
        })
    }

    #[must_use]
    pub fn device(&self) -> &str {
        &self.device
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
        self.tx.send(make(tx)).await.map_err(|_| CableError::Stopped)?;
        rx.await.map_err(|_| CableError::Stopped)
    }
}

impl CableDriver for WireGuardCable {
    fn name(&self) -> &'static str {
        "wireguard"
    }

    async fn connect(&mut self, ep: &RemoteEndpoint) -> Result<(), CableError> {
        let want: Vec<WireGuardKey> =
            std::iter::once(ep.public_key).chain(ep.standbys.iter().map(|s| s.public_key)).collect();
        let have = self.keys.get(&ep.cluster_id).cloned().unwrap_or_default();
        for old in have.into_iter().filter(|k| !want.contains(k)) {
            // A gateway of the cluster that is gone (or changed key): its session goes.
            self.call(|tx| Command::Remove(old, tx)).await?;
        }
        // Standbys first: a gateway demoted to standby gives up the prefixes before the
        // promoted one takes them over, on the session it already has.
        for s in &ep.standbys {
            let cfg = PeerConfig {
                cluster_id: ep.cluster_id.clone(),
                public_key: s.public_key,
                endpoint: s.endpoint,
                allowed: Vec::new(),
                health_ip: None,
            };
            self.call(|tx| Command::Upsert(cfg, tx)).await?;
        }
        let cfg = PeerConfig {
            cluster_id: ep.cluster_id.clone(),
            public_key: ep.public_key,
            endpoint: ep.endpoint,
            allowed: ep.cidrs.clone(),
            health_ip: ep.health_ip,
        };
        self.call(|tx| Command::Upsert(cfg, tx)).await?;
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
            })
            .collect())
    }

    async fn drops(&self) -> Result<Vec<(&'static str, u64)>, CableError> {
        Ok(self.call(Command::Stats).await?.1)
    }

    async fn cleanup(&mut self) -> Result<(), CableError> {
        self.keys.clear();
        if let Some((path, task)) = self.uapi.take() {
            task.abort();
            let _ = std::fs::remove_file(path);
        }
        // Without IFF_PERSIST the device disappears with the task's fd; with it, remove it.
        self.call(Command::Stop).await?;
        if self.persistent {
            delete_link(&self.device).await?;
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

/// Deletes the (persistent) device `name` in the calling thread's namespace.
async fn delete_link(name: &str) -> Result<(), CableError> {
    crate::route::delete_link(name).await.map_err(|e| CableError::CreateDevice {
        name: name.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })
}

/// Length of the TUN device's queue.
const TUN_QUEUE_LEN: u32 = 10_000;

/// Socket buffer size (what wireguard-go uses): at the kernel's default ~208 KiB the receiving
/// gateway drops ~12 % of a single TCP stream's datagrams, and TCP goodput collapses.
const SOCKET_BUFFER: usize = 7 << 20;

/// Sizes the UDP socket's buffers past `net.core.{r,w}mem_max` (the FORCE options need
/// CAP_NET_ADMIN, which a gateway has; those sysctls cannot be raised from a child namespace).
fn size_socket_buffers(udp: &tokio::net::UdpSocket) {
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

/// Reads handled per readiness event before the other direction gets a turn (a TUN read
/// may carry up to 64 KB, split into many packets).
const BATCH: usize = 64;
/// TUN reads per readiness event.
const TUN_READS: usize = 16;

/// The I/O loop: on readiness, drain each socket with non-blocking reads (bounded batches, so
/// neither direction starves the other), hand the packets to the core, and write what it
/// returns with non-blocking writes, waiting only when a queue is full.
async fn io_loop(
    mut core: WgCore,
    tun: tun_rs::AsyncDevice,
    udp: tokio::net::UdpSocket,
    mut rx: mpsc::Receiver<Command>,
    mtu: usize,
    gro: bool,
) {
    // Room for a coalesced run of datagrams (UDP GRO) or one datagram.
    let mut buf = vec![0u8; BUF_SIZE.max(65_536)];
    let mut cmsg = nix::cmsg_space!(i32);
    let mut sender = UdpSender { gso: true, run: gso::Batcher::default() };
    // One TUN read: the virtio header plus up to 64 KB, split into MTU-sized packets.
    let mut original = vec![0u8; tun_rs::VIRTIO_NET_HDR_LEN + 65_535];
    let mut segments = vec![vec![0u8; mtu.max(1280) + 64]; tun_rs::IDEAL_BATCH_SIZE];
    let mut sizes = vec![0usize; tun_rs::IDEAL_BATCH_SIZE];
    let mut writer = TunWriter::default();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = Vec::new();
    loop {
        tokio::select! {
            r = tun.readable() => {
                if let Err(e) = r {
                    warn!(error = %e, "waiting on the tunnel device failed");
                }
                for _ in 0..TUN_READS {
                    match tun.try_recv_multiple(&mut original, &mut segments, &mut sizes, 0) {
                        Ok(n) => {
                            for (seg, len) in segments.iter().zip(&sizes).take(n) {
                                core.on_tun_packet(&seg[..*len], &mut out);
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            warn!(error = %e, "reading the tunnel device failed");
                            break;
                        }
                    }
                }
            }
            r = udp.readable() => {
                if let Err(e) = r {
                    debug!(error = %e, "waiting on the UDP socket failed");
                }
                let now = std::time::Instant::now();
                for _ in 0..BATCH {
                    let got = if gro {
                        gso::try_recv_run(&udp, &mut buf, &mut cmsg)
                    } else {
                        udp.try_recv_from(&mut buf).map(|(n, src)| (n, src, None))
                    };
                    match got {
                        Ok((n, src, Some(segment))) => {
                            for d in buf[..n].chunks(segment) {
                                core.on_datagram(src, d, now, &mut out);
                            }
                        }
                        Ok((n, src, None)) => core.on_datagram(src, &buf[..n], now, &mut out),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            debug!(error = %e, "udp receive failed");
                            break;
                        }
                    }
                }
            }
            _ = tick.tick() => core.tick(std::time::Instant::now(), &mut out),
            cmd = rx.recv() => match cmd {
                Some(Command::Upsert(cfg, done)) => { core.upsert_peer(cfg, &mut out); let _ = done.send(()); }
                Some(Command::Remove(key, done)) => { let _ = done.send(core.remove_peer(&key)); }
                Some(Command::Stats(reply)) => {
                    let drops = core.drops().into_iter().map(|(r, n)| (r.name(), n)).collect();
                    let _ = reply.send((core.peers(std::time::Instant::now()), drops));
                }
                Some(Command::Stop(done)) => { let _ = done.send(()); return; }
                None => return,
            },
        }
        flush(&tun, &udp, &mut out, &mut writer, &mut sender).await;
    }
}

/// Encrypted datagrams on their way out: runs to one peer go out as one GSO send.
struct UdpSender {
    /// Cleared when the kernel refuses `UDP_SEGMENT`; datagrams then go one by one.
    gso: bool,
    run: gso::Batcher,
}

impl UdpSender {
    async fn push(&mut self, udp: &tokio::net::UdpSocket, dst: SocketAddr, data: &[u8]) {
        if self.run.count > 0 && !self.run.fits(dst, data.len()) {
            self.send(udp).await;
        }
        self.run.push(dst, data);
    }

    /// Sends the current run.
    async fn send(&mut self, udp: &tokio::net::UdpSocket) {
        let Some(dst) = self.run.dst else { return };
        if self.run.count > 1 && self.gso {
            let segment = u16::try_from(self.run.segment).unwrap_or(u16::MAX);
            loop {
                match gso::try_send_run(udp, dst, &self.run.buf, segment) {
                    Ok(_) => {
                        self.run.reset();
                        return;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if udp.writable().await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "UDP segmentation offload refused; sending datagrams one by one");
                        self.gso = false;
                        break;
                    }
                }
            }
        }
        let segment = self.run.segment.max(1);
        for d in self.run.buf.chunks(segment) {
            let sent = match udp.try_send_to(d, dst) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => udp.send_to(d, dst).await,
                other => other,
            };
            if let Err(e) = sent {
                debug!(%dst, error = %e, "udp send failed");
            }
        }
        self.run.reset();
    }
}

/// Decrypted packets on their way into the TUN device: each buffer starts with room for the
/// virtio header, and the batch is coalesced (TCP/UDP GRO) into as few writes as possible.
#[derive(Default)]
struct TunWriter {
    gro: tun_rs::GROTable,
    bufs: Vec<Vec<u8>>,
    /// Buffers kept for reuse (no allocation per packet once warm).
    spare: Vec<Vec<u8>>,
}

impl TunWriter {
    fn push(&mut self, packet: &[u8]) {
        let mut b = self.spare.pop().unwrap_or_default();
        b.clear();
        b.resize(tun_rs::VIRTIO_NET_HDR_LEN, 0);
        b.extend_from_slice(packet);
        self.bufs.push(b);
    }

    async fn write(&mut self, tun: &tun_rs::AsyncDevice) {
        if self.bufs.is_empty() {
            return;
        }
        if let Err(e) = tun.send_multiple(&mut self.gro, &mut self.bufs, tun_rs::VIRTIO_NET_HDR_LEN).await {
            debug!(error = %e, "writing the tunnel device failed");
        }
        self.spare.append(&mut self.bufs);
        self.spare.truncate(tun_rs::IDEAL_BATCH_SIZE);
    }
}

async fn flush(
    tun: &tun_rs::AsyncDevice,
    udp: &tokio::net::UdpSocket,
    out: &mut Vec<Output>,
    writer: &mut TunWriter,
    sender: &mut UdpSender,
) {
    for o in out.drain(..) {
        match o {
            Output::Udp(dst, data) => sender.push(udp, dst, &data).await,
            Output::Tun(pkt) => {
                writer.push(&pkt);
                if writer.bufs.len() >= tun_rs::IDEAL_BATCH_SIZE {
                    writer.write(tun).await;
                }
            }
        }
    }
    sender.send(udp).await;
    writer.write(tun).await;
}
