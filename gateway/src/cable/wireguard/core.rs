//! The WireGuard cable's protocol core, sans I/O: one `boringtun::noise::Tunn` per remote
//! gateway, each behind its own lock; the peer lookup tables (by receiver index, by public
//! key, by allowed prefix), read-mostly and swapped whole by control calls; and allowed-IPs
//! enforcement on decrypt. Every I/O thread holds its own handle ([`WgCore::handle`]). The I/O loop feeds it packets from the TUN device, UDP
//! datagrams and timer ticks, and carries out the [`Output`]s it returns.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use boringtun::{
    noise::{
        Packet, Tunn, TunnResult, errors::WireGuardError, handshake::parse_handshake_anon,
        rate_limiter::RateLimiter,
    },
    x25519::{PublicKey, StaticSecret},
};
use causeway_broker_api::WireGuardKey;
use ipnetwork::IpNetwork;
use tracing::{debug, info, warn};

use super::{
    probe::{Echo, Health, PROBE_ID, ProbeState},
    reflexive::Reflexive,
    relay_client::{RelayClient, RelaySettings, Transport},
};
use crate::cable::paths::{PathChange, PathKind, Paths};
use causeway_broker_api::relay;

/// While the current path goes unanswered (probes down), a new handshake goes to every
/// candidate this often, so another path is found at once rather than at the session's own
/// retry (15 s later).
pub const RESCUE_EVERY: Duration = Duration::from_secs(2);

/// ICMP identifier of path checks: probes sent through the session to a candidate address
/// other than the current path (answered to where they came from, and moving nothing).
pub const PATH_CHECK_ID: u16 = 0xca06;

/// WireGuard's own overhead on top of the inner packet (IPv6 outer header, UDP, WG header+tag).
pub const WG_OVERHEAD: u16 = 80;
/// Keepalive so that NAT bindings and the "connected" view stay fresh.
pub const PERSISTENT_KEEPALIVE_SECS: u16 = 25;
/// A session whose last handshake is older than this has expired (REJECT_AFTER_TIME).
pub const SESSION_LIFETIME: Duration = Duration::from_secs(180);
/// Scratch buffer size: the largest datagram plus WireGuard's overhead.
pub const BUF_SIZE: usize = 65_536 + 148;
/// Handshake messages (initiations and responses, all peers together) processed per second
/// before the core asks senders to prove their address with a cookie (WireGuard's "under
/// load"). Each costs a Diffie-Hellman; a real peer sends a handful per two minutes.
pub const HANDSHAKES_PER_SECOND: u64 = 100;

/// Where the core puts what the I/O must do next, in order. The lanes' sink lends its one
/// reusable buffer, so packets are sealed and opened where the I/O sends or writes them from
/// (no copy, no allocation per packet); a `Vec<Output>` owns each one (tests, control calls).
pub trait Sink {
    /// Send `datagram` to a remote gateway.
    fn udp(&mut self, dst: SocketAddr, datagram: &[u8]);
    /// Write a decrypted `packet` to the TUN device.
    fn tun(&mut self, packet: &[u8]);
    /// Room (at least [`BUF_SIZE`] bytes) to build the next output in, in place; the core then
    /// calls [`Sink::commit`] with the bytes it built there instead of `udp`/`tun`. `None` (the
    /// default): the core builds in its own scratch buffer and passes a copy.
    fn room(&mut self) -> Option<&mut [u8]> {
        None
    }
    /// `room()[range]` is the next output, for `dst` (`None`: the TUN device). Only called
    /// after `room` returned `Some`.
    fn commit(&mut self, dst: Option<SocketAddr>, range: std::ops::Range<usize>) {
        let _ = (dst, range);
        unreachable!("commit without room");
    }
}

/// What becomes of a decrypted packet.
enum Delivery {
    /// Written to the TUN device.
    Tun,
    /// A probe for this gateway: this answer goes back through the tunnel.
    Answer(Vec<u8>),
    /// A path check for this gateway: this answer goes back to where the check came from.
    CheckAnswer(Vec<u8>),
    /// The answer to one of our path checks (its sequence number).
    CheckReply(u16),
    /// Consumed here (a keepalive, an answered probe of ours).
    Nothing,
}

/// Where the core built an output: in the sink's room, or in its own scratch buffer.
#[derive(Clone, Copy)]
enum Built {
    InRoom,
    InScratch,
}

/// The buffer to build the next output in: the sink's room when it lends one.
fn workspace<'a>(out: &'a mut impl Sink, scratch: &'a mut [u8]) -> (&'a mut [u8], Built) {
    match out.room() {
        Some(room) => (room, Built::InRoom),
        None => (scratch, Built::InScratch),
    }
}

/// Where `part` (a slice boringtun returned) lies within `whole` (the buffer it was given).
fn span(whole: *const u8, part: &[u8]) -> std::ops::Range<usize> {
    let start = (part.as_ptr() as usize).wrapping_sub(whole as usize);
    start..start + part.len()
}

/// Hands an output built in `built` to the sink: a commit when it is already in the sink's
/// room, a copy from the scratch buffer otherwise.
fn emit(
    out: &mut impl Sink,
    scratch: &[u8],
    built: Built,
    dst: Option<SocketAddr>,
    range: std::ops::Range<usize>,
) {
    match (built, dst) {
        (Built::InRoom, _) => out.commit(dst, range),
        (Built::InScratch, Some(dst)) => out.udp(dst, &scratch[range]),
        (Built::InScratch, None) => out.tun(&scratch[range]),
    }
}

/// One thing for the I/O to do, owning its bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Output {
    /// Send a datagram to a remote gateway.
    Udp(SocketAddr, Vec<u8>),
    /// Write a decrypted packet to the TUN device.
    Tun(Vec<u8>),
}

impl Sink for Vec<Output> {
    fn udp(&mut self, dst: SocketAddr, datagram: &[u8]) {
        self.push(Output::Udp(dst, datagram.to_vec()));
    }
    fn tun(&mut self, packet: &[u8]) {
        self.push(Output::Tun(packet.to_vec()));
    }
}

/// Why a packet was dropped (counted; exported as metrics by the gateway).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// From the TUN device, for an address no peer's allowed prefixes cover.
    NoPeerForDestination,
    /// From the network, not a WireGuard message or failed to authenticate.
    InvalidPacket,
    /// From the network, for a key or session index we do not know.
    UnknownPeer,
    /// Decrypted fine, but the inner source address is not in the sender's allowed prefixes.
    SourceNotAllowed,
    /// Decrypted fine, but the I/O lane that writes its flow to the device was too far behind.
    LaneBacklog,
    /// Encrypted, but the kernel refused to send it (a firewall rule, no route to the peer).
    SendRefused,
    /// A handshake message past the rate limit, answered with a cookie instead of processed.
    UnderLoad,
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        Self::NoPeerForDestination,
        Self::InvalidPacket,
        Self::UnknownPeer,
        Self::SourceNotAllowed,
        Self::LaneBacklog,
        Self::SendRefused,
        Self::UnderLoad,
    ];

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::NoPeerForDestination => "no_peer_for_destination",
            Self::InvalidPacket => "invalid_packet",
            Self::UnknownPeer => "unknown_peer",
            Self::SourceNotAllowed => "source_not_allowed",
            Self::LaneBacklog => "lane_backlog",
            Self::SendRefused => "send_refused",
            Self::UnderLoad => "handshake_under_load",
        }
    }
}

/// The remote gateway a peer talks to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub cluster_id: String,
    pub public_key: WireGuardKey,
    /// Where traffic starts (the record's preferred address) until an answer says otherwise.
    pub endpoint: SocketAddr,
    /// Every address the remote gateway may be reached at, in preference order (empty: just
    /// `endpoint`).
    pub candidates: Vec<causeway_broker_api::records::Candidate>,
    pub allowed: Vec<IpNetwork>,
    /// The remote gateway's health-check address; probes run only when it is known.
    pub health_ip: Option<Ipv4Addr>,
}

/// A peer's state as reported to status and metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerStats {
    /// The peer's configuration, with `endpoint` where its traffic goes now.
    pub config: PeerConfig,
    /// The kind of path its traffic takes.
    pub path: PathKind,
    /// Our index for the peer: the receiver index of its data messages, less the low 8 bits
    /// (the uplink guard only lets data for a live index through).
    pub index: u32,
    /// Time since the last completed handshake.
    pub last_handshake: Option<Duration>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub rx_packets: u64,
    /// What the in-band probes say (`Unknown` when probes are off for this peer).
    pub health: Health,
    /// Round-trip time of the last answered probe.
    pub rtt: Option<Duration>,
    /// Fraction of recent probes lost.
    pub loss: f64,
    /// Whether in-band probes run for this peer.
    pub probed: bool,
    /// When its probes began and were last answered (for the failover switch).
    pub evidence: crate::failover::Evidence,
}

impl PeerStats {
    /// A session exists and has not expired.
    #[must_use]
    pub fn has_session(&self) -> bool {
        self.last_handshake.is_some_and(|d| d < SESSION_LIFETIME)
    }
}

struct Peer {
    config: PeerConfig,
    paths: Paths,
    /// When the last handshake went to every candidate because the path stopped answering.
    rescued: Option<Instant>,
    tunn: Tunn,
    probe: ProbeState,
    tx_bytes: u64,
    rx_bytes: u64,
    tx_packets: u64,
    rx_packets: u64,
}

/// One peer's protocol state, locked by whichever thread works for that peer at the moment:
/// lanes working for different peers never wait on each other.
type PeerSlot = Arc<Mutex<Peer>>;

fn lock_peer(slot: &PeerSlot) -> MutexGuard<'_, Peer> {
    // A thread that panicked mid-packet leaves a session boringtun can go on with.
    slot.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The peer lookup tables. Read-mostly: the control calls (upsert, remove) build a new one
/// and swap it in; every thread keeps the one it read until the generation moves.
#[derive(Clone, Default)]
struct PeerTable {
    peers: HashMap<u32, PeerSlot>,
    by_key: HashMap<[u8; 32], u32>,
    /// Allowed prefixes, longest first, for the TUN → peer lookup.
    routes: Vec<(IpNetwork, u32)>,
}

impl PeerTable {
    fn rebuild_routes(&mut self) {
        self.routes = self
            .peers
            .iter()
            .flat_map(|(idx, p)| lock_peer(p).config.allowed.iter().map(|n| (*n, *idx)).collect::<Vec<_>>())
            .collect();
        self.routes.sort_by_key(|r| std::cmp::Reverse(r.0.prefix()));
    }

    fn peer_for(&self, addr: IpAddr) -> Option<&PeerSlot> {
        let idx = self.routes.iter().find(|(net, _)| net.contains(addr)).map(|(_, idx)| *idx)?;
        self.peers.get(&idx)
    }
}

/// What every handle of one core shares.
struct Shared {
    private: StaticSecret,
    public: PublicKey,
    /// The current table; also held by a control call for the whole of its change, so changes
    /// never interleave.
    table: Mutex<Arc<PeerTable>>,
    /// Moves after every swap of `table`: one atomic load per packet tells a handle whether
    /// its table is current.
    generation: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
    /// Our own health-check address (probes are sent from it and answered on it): the
    /// address's bits, and bit 32 set when there is one.
    health_ip: AtomicU64,
    /// mac1 (and, under load, mac2/cookie) of every handshake message, checked before any
    /// Diffie-Hellman; counts handshakes per second for the whole core.
    limiter: Arc<RateLimiter>,
    /// Handed to every `Tunn`: it checks mac1 again but is never "under load" (the core's
    /// limiter decided that already), so its cookies never mix with ours.
    tunn_limiter: Arc<RateLimiter>,
    /// Diffie-Hellman computations started for handshake initiations (one per
    /// `parse_handshake_anon`): what an attacker can make us spend.
    handshake_dh: AtomicU64,
    /// Our reflexive address (STUN from the WireGuard socket).
    reflexive: Mutex<Reflexive>,
    /// The reflexive address as last seen by a tick: what the endpoint record publishes.
    reflexive_seen: Arc<Mutex<Option<SocketAddr>>>,
    /// Our registration with the broker's relay.
    relay: Mutex<RelayClient>,
    /// The relay's address (set once, before any lane runs): every datagram to it is framed.
    relay_server: std::sync::OnceLock<SocketAddr>,
    /// The cable's stream proxy on loopback (set once, with the relay): frames sent to it
    /// travel on a stream to the broker's HTTPS port, and frames from the stream come from it.
    relay_proxy: std::sync::OnceLock<SocketAddr>,
    /// Whether relay frames go through the proxy now (the relay client's transport, as of
    /// the last tick).
    relay_over_stream: AtomicBool,
    /// The relay and the transport, while our registration is current, as last seen by a tick.
    relay_seen: Arc<Mutex<Option<(SocketAddr, Transport)>>>,
}

impl Shared {
    fn count(&self, reason: DropReason, n: u64) {
        self.drops[reason as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// How a datagram from `src` comes from the relay, if it does: by UDP from the relay's
    /// address, or by the stream through the proxy.
    fn relay_via(&self, src: SocketAddr) -> Option<Transport> {
        if self.relay_server.get() == Some(&src) {
            Some(Transport::Udp)
        } else if self.relay_proxy.get() == Some(&src) {
            Some(Transport::Stream)
        } else {
            None
        }
    }

    /// Where frames for the relay go now.
    fn relay_wire(&self) -> Option<SocketAddr> {
        if self.relay_over_stream.load(Ordering::Relaxed) {
            self.relay_proxy.get().copied()
        } else {
            self.relay_server.get().copied()
        }
    }

    fn health_ip(&self) -> Option<Ipv4Addr> {
        let v = self.health_ip.load(Ordering::Relaxed);
        (v >> 32 == 1).then(|| Ipv4Addr::from(u32::try_from(v & 0xFFFF_FFFF).unwrap_or(0)))
    }

    fn current(&self) -> MutexGuard<'_, Arc<PeerTable>> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The sans-IO core, as one thread's handle on it: the peers, their sessions and the
/// counters are shared by every handle ([`WgCore::handle`]); the scratch buffer and the view
/// of the peer table are the handle's own. No lock is taken per packet except the lock of the
/// one peer the packet is for.
pub struct WgCore {
    shared: Arc<Shared>,
    table: Arc<PeerTable>,
    /// The generation `table` was read at.
    seen: u64,
    buf: Vec<u8>,
}

/// Why the core refused a peer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeerRefused {
    #[error("key {key} belongs to cluster {owner:?}; cluster {claimant:?} may not take it over")]
    KeyOfAnotherCluster { key: WireGuardKey, owner: String, claimant: String },
    #[error("key {key} of cluster {claimant:?} is this gateway's own key")]
    OwnKey { key: WireGuardKey, claimant: String },
}

impl std::fmt::Debug for WgCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgCore").field("peers", &self.table.peers.len()).finish_non_exhaustive()
    }
}

impl WgCore {
    #[must_use]
    pub fn new(private: StaticSecret) -> Self {
        let public = PublicKey::from(&private);
        let table = Arc::new(PeerTable::default());
        Self {
            shared: Arc::new(Shared {
                private,
                public,
                table: Mutex::new(Arc::clone(&table)),
                generation: AtomicU64::new(0),
                drops: std::array::from_fn(|_| AtomicU64::new(0)),
                health_ip: AtomicU64::new(0),
                limiter: Arc::new(RateLimiter::new(&public, HANDSHAKES_PER_SECOND)),
                tunn_limiter: Arc::new(RateLimiter::new(&public, u64::MAX)),
                handshake_dh: AtomicU64::new(0),
                reflexive: Mutex::new(Reflexive::new(None)),
                reflexive_seen: Arc::new(Mutex::new(None)),
                relay: Mutex::new(RelayClient::default()),
                relay_server: std::sync::OnceLock::new(),
                relay_proxy: std::sync::OnceLock::new(),
                relay_over_stream: AtomicBool::new(false),
                relay_seen: Arc::new(Mutex::new(None)),
            }),
            table,
            seen: 0,
            buf: vec![0; BUF_SIZE],
        }
    }

    /// Another handle on the same core, for another thread (a lane): same peers, sessions and
    /// counters, its own scratch buffer.
    #[must_use]
    pub fn handle(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            table: Arc::clone(&self.table),
            seen: self.seen,
            buf: vec![0; BUF_SIZE],
        }
    }

    /// Picks up the table a control call swapped in, if any. Never called while holding a
    /// peer's lock (a control call holds the table while it locks peers).
    fn refresh(&mut self) {
        let generation = self.shared.generation.load(Ordering::Acquire);
        if generation != self.seen {
            self.table = Arc::clone(&self.shared.current());
            self.seen = generation;
        }
    }

    /// Diffie-Hellman computations started for incoming initiations so far.
    #[must_use]
    pub fn handshake_computations(&self) -> u64 {
        self.shared.handshake_dh.load(Ordering::Relaxed)
    }

    /// Sets the local health-check address (inside the local cluster's prefixes).
    pub fn set_health_ip(&mut self, ip: Option<Ipv4Addr>) {
        let v = ip.map_or(0, |ip| (1u64 << 32) | u64::from(u32::from(ip)));
        self.shared.health_ip.store(v, Ordering::Relaxed);
    }

    /// Where to learn our reflexive address from (the broker's STUN responder); `None`: not
    /// learnt.
    pub fn set_stun_server(&mut self, server: Option<SocketAddr>) {
        *self.shared.reflexive.lock().unwrap_or_else(PoisonError::into_inner) = Reflexive::new(server);
    }

    /// Registers with the broker's relay (from the WireGuard socket), so that peers no direct
    /// path reaches can still be reached through it; with `proxy` (the cable's stream proxy on
    /// loopback), over a stream when UDP to the relay gets no answer. Set once, before the
    /// lanes start.
    pub fn set_relay(&mut self, settings: Option<RelaySettings>, proxy: Option<SocketAddr>) {
        let Some(s) = settings else { return };
        let _ = self.shared.relay_server.set(s.server);
        let mut client = RelayClient::new(Some(s), self.shared.public.to_bytes());
        if let Some(p) = proxy {
            let _ = self.shared.relay_proxy.set(p);
            client = client.with_stream();
        }
        *self.shared.relay.lock().unwrap_or_else(PoisonError::into_inner) = client;
    }

    /// The relay and how we reach it, while our registration is current, as of the last tick.
    #[must_use]
    pub fn relay(&self) -> Arc<Mutex<Option<(SocketAddr, Transport)>>> {
        Arc::clone(&self.shared.relay_seen)
    }

    /// The reflexive address, as of the last tick, in a cell the cable's owner may read at any
    /// time.
    #[must_use]
    pub fn reflexive(&self) -> Arc<Mutex<Option<SocketAddr>>> {
        Arc::clone(&self.shared.reflexive_seen)
    }

    #[must_use]
    pub fn public_key(&self) -> WireGuardKey {
        WireGuardKey(self.shared.public.to_bytes())
    }

    /// Counts `n` packets dropped for `reason` by the I/O around the core.
    pub fn count_drops(&self, reason: DropReason, n: u64) {
        self.shared.count(reason, n);
    }

    #[must_use]
    pub fn drops(&self) -> Vec<(DropReason, u64)> {
        DropReason::ALL.iter().map(|r| (*r, self.shared.drops[*r as usize].load(Ordering::Relaxed))).collect()
    }

    /// Swaps in `table` as every handle's next one.
    fn publish(&mut self, current: &mut MutexGuard<'_, Arc<PeerTable>>, table: PeerTable) {
        let table = Arc::new(table);
        **current = Arc::clone(&table);
        self.seen = self.shared.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.table = table;
    }

    /// Adds a peer, or updates it in place if the key is known (endpoint and allowed prefixes
    /// change without dropping the session). A new peer starts its handshake at once.
    /// A key stays with the cluster that has it: moving it to another cluster (whose
    /// prefixes would then be served by that key's holder) is refused, as is our own key.
    pub fn upsert_peer(&mut self, config: PeerConfig, out: &mut impl Sink) -> Result<(), PeerRefused> {
        if config.public_key.0 == self.shared.public.to_bytes() {
            warn!(cluster = %config.cluster_id, "refusing a peer with this gateway's own key");
            return Err(PeerRefused::OwnKey { key: config.public_key, claimant: config.cluster_id });
        }
        let shared = Arc::clone(&self.shared);
        let mut current = shared.current();
        if let Some(slot) = current.by_key.get(&config.public_key.0).and_then(|idx| current.peers.get(idx)) {
            let mut p = lock_peer(slot);
            if p.config == config {
                return Ok(());
            }
            if p.config.cluster_id != config.cluster_id {
                warn!(key = %config.public_key, owner = %p.config.cluster_id, claimant = %config.cluster_id,
                    "refusing to move a peer's key to another cluster");
                return Err(PeerRefused::KeyOfAnotherCluster {
                    key: config.public_key,
                    owner: p.config.cluster_id.clone(),
                    claimant: config.cluster_id,
                });
            }
            info!(cluster = %config.cluster_id, endpoint = %config.endpoint, "peer updated");
            let reroute = p.config.allowed != config.allowed;
            let new_paths = p.config.candidates != config.candidates || p.config.endpoint != config.endpoint;
            p.paths.set_candidates(config.candidates.clone(), config.endpoint);
            p.config = config;
            // New addresses for a peer we have no session with: try them now, not at the next
            // retry (behind NATs, the other side is sending to ours at about this moment).
            if new_paths
                && p.tunn.stats().0.is_none_or(|age| age >= SESSION_LIFETIME)
                && let TunnResult::WriteToNetwork(pkt) =
                    p.tunn.format_handshake_initiation(&mut self.buf, true)
            {
                send_to_paths(&self.shared, &p.config.public_key.0, &p.paths, pkt, out);
            }
            drop(p);
            if reroute {
                let mut table = (**current).clone();
                table.rebuild_routes();
                self.publish(&mut current, table);
            }
            return Ok(());
        }
        // Indices are 24 bits (boringtun puts a session counter in the low 8), and random: the
        // guard drops data for an index that is not a peer's, and a spoofer has to guess one.
        let idx = loop {
            let candidate = rand_core::RngCore::next_u32(&mut rand_core::OsRng) & 0x00FF_FFFF;
            if candidate != 0 && !current.peers.contains_key(&candidate) {
                break candidate;
            }
        };
        let tunn = Tunn::new(
            shared.private.clone(),
            PublicKey::from(config.public_key.0),
            None,
            Some(PERSISTENT_KEEPALIVE_SECS),
            idx,
            Some(Arc::clone(&shared.tunn_limiter)),
        );
        info!(cluster = %config.cluster_id, endpoint = %config.endpoint, key = %config.public_key, "peer added");
        let mut table = (**current).clone();
        table.by_key.insert(config.public_key.0, idx);
        let slot = Arc::new(Mutex::new(Peer {
            paths: Paths::new(config.candidates.clone(), config.endpoint),
            rescued: None,
            config,
            tunn,
            probe: ProbeState::default(),
            tx_bytes: 0,
            rx_bytes: 0,
            tx_packets: 0,
            rx_packets: 0,
        }));
        table.peers.insert(idx, Arc::clone(&slot));
        table.rebuild_routes();
        self.publish(&mut current, table);
        drop(current);
        let mut peer = lock_peer(&slot);
        if let TunnResult::WriteToNetwork(pkt) = peer.tunn.format_handshake_initiation(&mut self.buf, false) {
            send_to_paths(&self.shared, &peer.config.public_key.0, &peer.paths, pkt, out);
        }
        Ok(())
    }

    /// Removes the peer with this key; returns whether it existed.
    pub fn remove_peer(&mut self, key: &WireGuardKey) -> bool {
        let shared = Arc::clone(&self.shared);
        let mut current = shared.current();
        let mut table = (**current).clone();
        let Some(idx) = table.by_key.remove(&key.0) else { return false };
        if let Some(p) = table.peers.remove(&idx) {
            info!(cluster = %lock_peer(&p).config.cluster_id, key = %key, "peer removed");
        }
        table.rebuild_routes();
        self.publish(&mut current, table);
        true
    }

    /// Peers as of `now`.
    #[must_use]
    pub fn peers(&mut self, now: Instant) -> Vec<PeerStats> {
        self.refresh();
        let probing = self.shared.health_ip().is_some();
        let mut v: Vec<PeerStats> = self
            .table
            .peers
            .iter()
            .map(|(idx, slot)| {
                let p = lock_peer(slot);
                PeerStats {
                    index: *idx,
                    config: PeerConfig { endpoint: p.paths.current(), ..p.config.clone() },
                    path: p.paths.kind(),
                    last_handshake: p.tunn.stats().0,
                    tx_bytes: p.tx_bytes,
                    rx_bytes: p.rx_bytes,
                    tx_packets: p.tx_packets,
                    rx_packets: p.rx_packets,
                    health: p.probe.health(now),
                    rtt: p.probe.rtt(),
                    loss: p.probe.loss(now),
                    probed: probing && p.config.health_ip.is_some(),
                    evidence: p.probe.evidence(),
                }
            })
            .collect();
        v.sort_by(|a, b| a.config.cluster_id.cmp(&b.config.cluster_id));
        v
    }

    /// A packet read from the TUN device: encrypt it for the peer whose prefixes cover its
    /// destination.
    pub fn on_tun_packet(&mut self, packet: &[u8], out: &mut impl Sink) {
        self.refresh();
        let Some(dst) = Tunn::dst_address(packet) else {
            self.shared.count(DropReason::InvalidPacket, 1);
            return;
        };
        let Some(slot) = self.table.peer_for(dst) else {
            self.shared.count(DropReason::NoPeerForDestination, 1);
            return;
        };
        let mut peer = lock_peer(slot);
        let (buf, built) = workspace(out, &mut self.buf);
        let base = buf.as_ptr();
        let wire = match peer.tunn.encapsulate(packet, buf) {
            // No session: this is the handshake initiation, for every candidate path.
            TunnResult::WriteToNetwork(wire) if is_initiation(wire) => {
                let wire = wire.to_vec();
                send_to_paths(&self.shared, &peer.config.public_key.0, &peer.paths, &wire, out);
                return;
            }
            // Through the relay: framed, so not built in place.
            TunnResult::WriteToNetwork(wire)
                if self.shared.relay_server.get() == Some(&peer.paths.current()) =>
            {
                let wire = wire.to_vec();
                peer.tx_bytes += packet.len() as u64;
                peer.tx_packets += 1;
                send_via(&self.shared, &peer.config.public_key.0, peer.paths.current(), &wire, out);
                return;
            }
            TunnResult::WriteToNetwork(wire) => span(base, wire),
            TunnResult::Err(e) => {
                debug!(cluster = %peer.config.cluster_id, error = ?e, "encapsulate failed");
                return;
            }
            // Queued until the handshake completes.
            _ => return,
        };
        peer.tx_bytes += packet.len() as u64;
        peer.tx_packets += 1;
        emit(out, &self.buf, built, Some(peer.paths.current()), wire);
    }

    /// A datagram received on the cable's UDP socket at `now`.
    pub fn on_datagram(&mut self, src: SocketAddr, datagram: &[u8], now: Instant, out: &mut impl Sink) {
        let via = self.shared.relay_via(src);
        if let Some(via) = via
            && (relay::is_relay(datagram) || via == Transport::Stream)
        {
            // The relay's own address names the path, whichever way the frame came.
            let relay_addr = self.shared.relay_server.get().copied().unwrap_or(src);
            match relay::parse(datagram) {
                Ok(relay::Frame::Deliver { datagram: inner, .. }) if !relay::is_relay(inner) => {
                    // The WireGuard datagram authenticates itself; the relay's word on who sent
                    // it is not needed.
                    self.on_wireguard(relay_addr, inner, now, out, true);
                }
                Ok(relay::Frame::Registered { key, nonce }) => {
                    let mut r = self.shared.relay.lock().unwrap_or_else(PoisonError::into_inner);
                    if !r.on_registered(via, &key, &nonce, now) {
                        self.shared.count(DropReason::InvalidPacket, 1);
                    }
                }
                Ok(relay::Frame::Refused { key, nonce }) => {
                    let mut r = self.shared.relay.lock().unwrap_or_else(PoisonError::into_inner);
                    if !r.on_refused(via, &key, &nonce) {
                        self.shared.count(DropReason::InvalidPacket, 1);
                    }
                }
                _ => self.shared.count(DropReason::InvalidPacket, 1),
            }
            return;
        }
        self.on_wireguard(src, datagram, now, out, false);
    }

    /// A WireGuard datagram from `src` (the relay's address when `relayed`: answers then go
    /// back through it, framed).
    fn on_wireguard(
        &mut self,
        src: SocketAddr,
        datagram: &[u8],
        now: Instant,
        out: &mut impl Sink,
        relayed: bool,
    ) {
        self.refresh();
        let shared = &*self.shared;
        // mac1 first (a keyed hash, no Diffie-Hellman), and past the rate limit a cookie
        // reply instead of any work: the sender must prove it receives at its address.
        // Disjoint fields: no reference-count traffic on the per-datagram path.
        let packet = match shared.limiter.verify_packet(Some(src.ip()), datagram, &mut self.buf) {
            Ok(packet) => packet,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                // A cookie is for the sender's own address; a relayed one has none to prove.
                if !relayed {
                    out.udp(src, cookie);
                }
                shared.count(DropReason::UnderLoad, 1);
                return;
            }
            Err(_) if !relayed && causeway_broker_api::stun::is_stun(datagram) => {
                let mut r = shared.reflexive.lock().unwrap_or_else(PoisonError::into_inner);
                match r.on_datagram(src, datagram, now) {
                    Ok(Some(addr)) => info!(reflexive = %addr, "reflexive address learnt"),
                    Ok(None) => {}
                    Err(why) => {
                        debug!(%src, ?why, "STUN datagram refused");
                        shared.count(DropReason::InvalidPacket, 1);
                    }
                }
                return;
            }
            Err(_) => {
                shared.count(DropReason::InvalidPacket, 1);
                return;
            }
        };
        let cookie_reply = matches!(packet, Packet::PacketCookieReply(_));
        let idx = match packet {
            Packet::HandshakeInit(init) => {
                shared.handshake_dh.fetch_add(1, Ordering::Relaxed);
                match parse_handshake_anon(&shared.private, &shared.public, &init) {
                    Ok(half) => match self.table.by_key.get(&half.peer_static_public) {
                        Some(idx) => *idx,
                        None => {
                            shared.count(DropReason::UnknownPeer, 1);
                            return;
                        }
                    },
                    Err(_) => {
                        shared.count(DropReason::InvalidPacket, 1);
                        return;
                    }
                }
            }
            Packet::HandshakeResponse(p) => p.receiver_idx >> 8,
            Packet::PacketCookieReply(p) => p.receiver_idx >> 8,
            Packet::PacketData(p) => p.receiver_idx >> 8,
        };
        let Some(slot) = self.table.peers.get(&idx) else {
            shared.count(DropReason::UnknownPeer, 1);
            return;
        };
        let mut peer = lock_peer(slot);
        let mut dropped = None;
        // Whether this datagram proved it comes from the peer: data that decrypted (a
        // keepalive too), or a handshake message that completed. A cookie reply proves
        // nothing about its sender (anyone who saw our mac1 can provoke one), and neither
        // does a replayed data packet.
        let mut authenticated = false;
        let mut first = true;
        // The answer to a probe, and whether it goes back where the datagram came from (a
        // path check) rather than along the current path.
        let mut answer: Option<(Vec<u8>, bool)> = None;
        let mut check_reply = None;
        let local_health = shared.health_ip();
        loop {
            let was_first = first;
            let input: &[u8] = if first { datagram } else { &[] };
            first = false;
            let (buf, built) = workspace(out, &mut self.buf);
            let base = buf.as_ptr();
            let (pkt, inner_src) = match peer.tunn.decapsulate(Some(src.ip()), input, buf) {
                TunnResult::Done => {
                    // A keepalive decrypted on the first call.
                    authenticated |= was_first && !cookie_reply;
                    break;
                }
                TunnResult::Err(WireGuardError::DuplicateCounter) => break,
                TunnResult::Err(e) => {
                    debug!(cluster = %peer.config.cluster_id, error = ?e, "decapsulate failed");
                    dropped = Some(DropReason::InvalidPacket);
                    break;
                }
                TunnResult::WriteToNetwork(wire) => {
                    // On the first call: a handshake response to an initiation, or the
                    // keepalive that completes ours (the Tunn's limiter never sends cookies).
                    authenticated |= was_first && !cookie_reply;
                    if relayed {
                        let wire = relay::send(&relay::key_id(&peer.config.public_key.0), wire);
                        out.udp(shared.relay_wire().unwrap_or(src), &wire);
                        continue;
                    }
                    let wire = span(base, wire);
                    emit(out, &self.buf, built, Some(src), wire);
                    // Flush whatever was queued behind the handshake.
                    continue;
                }
                TunnResult::WriteToTunnelV4(pkt, addr) => (pkt, IpAddr::V4(addr)),
                TunnResult::WriteToTunnelV6(pkt, addr) => (pkt, IpAddr::V6(addr)),
            };
            // Data that decrypted under the peer's session.
            authenticated |= was_first;
            match Self::deliver(&mut peer, local_health, now, inner_src, pkt) {
                Ok(Delivery::Tun) => {
                    let pkt = span(base, pkt);
                    emit(out, &self.buf, built, None, pkt);
                }
                Ok(Delivery::Answer(reply)) => answer = Some((reply, false)),
                Ok(Delivery::CheckAnswer(reply)) => answer = Some((reply, true)),
                Ok(Delivery::CheckReply(seq)) => check_reply = Some(seq),
                Ok(Delivery::Nothing) => {}
                Err(reason) => dropped = Some(reason),
            }
            break;
        }
        // Path checks and their answers prove a path, they do not choose it: only the checker
        // decides, on the answer.
        let path_check = check_reply.is_some() || answer.as_ref().is_some_and(|(_, back)| *back);
        if authenticated && !path_check {
            // Roaming: an authenticated packet tells us where the peer is now.
            let change = peer.paths.on_authenticated(src, now);
            log_change(&peer.config.cluster_id, change);
        }
        if let Some(seq) = check_reply {
            let change = peer.paths.on_check_reply(src, seq, now);
            log_change(&peer.config.cluster_id, change);
        }
        if let Some((reply, back)) = answer
            && let TunnResult::WriteToNetwork(wire) = peer.tunn.encapsulate(&reply, &mut self.buf)
        {
            send_via(
                shared,
                &peer.config.public_key.0,
                if back { src } else { peer.paths.current() },
                wire,
                out,
            );
        }
        if let Some(r) = dropped {
            shared.count(r, 1);
        }
    }

    /// Decides what becomes of a decrypted packet: the TUN device, unless it is a probe for us
    /// (answered or recorded here) or comes from outside the peer's prefixes.
    fn deliver(
        peer: &mut Peer,
        local_health: Option<Ipv4Addr>,
        now: Instant,
        src: IpAddr,
        pkt: &[u8],
    ) -> Result<Delivery, DropReason> {
        if pkt.is_empty() {
            return Ok(Delivery::Nothing); // keepalive
        }
        // A peer without prefixes is a remote cluster's standby gateway: its probes are
        // answered (so it knows its tunnel works), nothing else it sends is delivered.
        let standby = peer.config.allowed.is_empty();
        if standby || peer.config.allowed.iter().any(|n| n.contains(src)) {
            if let Some(ours) = local_health
                && pkt.len() >= 20
                && pkt[16..20] == ours.octets()
                && let Some(echo) = Echo::parse(pkt)
            {
                match (echo.reply, echo.id) {
                    (false, PATH_CHECK_ID) => return Ok(Delivery::CheckAnswer(echo.answer().to_packet())),
                    (false, _) => return Ok(Delivery::Answer(echo.answer().to_packet())),
                    (true, PATH_CHECK_ID) => return Ok(Delivery::CheckReply(echo.seq)),
                    _ => {}
                }
                if echo.id == PROBE_ID {
                    peer.probe.on_reply(echo.seq, now);
                    return Ok(Delivery::Nothing);
                }
            }
            if standby {
                return Err(DropReason::SourceNotAllowed);
            }
            peer.rx_bytes += pkt.len() as u64;
            peer.rx_packets += 1;
            Ok(Delivery::Tun)
        } else {
            warn!(cluster = %peer.config.cluster_id, %src, "dropping decrypted packet from a source outside the peer's prefixes");
            Err(DropReason::SourceNotAllowed)
        }
    }

    /// Timer tick (every ~50 ms) at `now`: handshakes, rekeys, keepalives, expiry, probes.
    pub fn tick(&mut self, now: Instant, out: &mut impl Sink) {
        // Once a second at most (the limiter checks): the handshake budget starts again.
        self.shared.limiter.reset_count();
        self.refresh();
        self.tick_reflexive(now, out);
        let local_health = self.shared.health_ip();
        for slot in self.table.peers.values() {
            let mut guard = lock_peer(slot);
            let peer = &mut *guard;
            // Probes only ride a live session: without one they would just queue.
            let live = peer.tunn.stats().0.is_some_and(|age| age < SESSION_LIFETIME);
            if let (Some(src), Some(dst)) = (local_health, peer.config.health_ip)
                && live
            {
                if let Some(probe) = peer.probe.next(now, src, dst)
                    && let TunnResult::WriteToNetwork(wire) =
                        peer.tunn.encapsulate(&probe.to_packet(), &mut self.buf)
                {
                    send_via(&self.shared, &peer.config.public_key.0, peer.paths.current(), wire, out);
                }
                // The path stopped answering: a new handshake to every candidate, the first
                // to answer carries on.
                if peer.probe.health(now) == Health::Down
                    && peer.paths.has_alternatives()
                    && peer.rescued.is_none_or(|t| now.saturating_duration_since(t) >= RESCUE_EVERY)
                    && let TunnResult::WriteToNetwork(wire) =
                        peer.tunn.format_handshake_initiation(&mut self.buf, true)
                {
                    peer.rescued = Some(now);
                    info!(cluster = %peer.config.cluster_id, path = %peer.paths.current(), "path stopped answering; trying every candidate");
                    send_to_paths(&self.shared, &peer.config.public_key.0, &peer.paths, wire, out);
                }
                // Better paths than the current one, checked through the session.
                for (to, seq) in peer.paths.due_checks(now) {
                    let check = Echo { src, dst, reply: false, id: PATH_CHECK_ID, seq, payload: Vec::new() };
                    if let TunnResult::WriteToNetwork(wire) =
                        peer.tunn.encapsulate(&check.to_packet(), &mut self.buf)
                    {
                        send_via(&self.shared, &peer.config.public_key.0, to, wire, out);
                    }
                }
            }
            match peer.tunn.update_timers(&mut self.buf) {
                TunnResult::WriteToNetwork(wire) => {
                    send_to_paths(&self.shared, &peer.config.public_key.0, &peer.paths, wire, out);
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) => {
                    debug!(cluster = %peer.config.cluster_id, "session expired");
                }
                TunnResult::Err(e) => debug!(cluster = %peer.config.cluster_id, error = ?e, "timer error"),
                _ => {}
            }
        }
    }
}

impl WgCore {
    /// Asks for the reflexive address and renews the relay registration when due, and
    /// publishes what is known now.
    fn tick_reflexive(&mut self, now: Instant, out: &mut impl Sink) {
        let mut r = self.shared.reflexive.lock().unwrap_or_else(PoisonError::into_inner);
        let id = || {
            let mut id = [0u8; 12];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut id);
            id
        };
        if let Some((server, request)) = r.poll(now, id) {
            out.udp(server, &request);
        }
        let known = r.address(now);
        drop(r);
        let mut relay = self.shared.relay.lock().unwrap_or_else(PoisonError::into_inner);
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let nonce = || {
            let mut n = [0u8; 8];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut n);
            n
        };
        for (via, frame) in relay.poll(now, unix_ms, nonce) {
            let to = match via {
                Transport::Udp => self.shared.relay_server.get(),
                Transport::Stream => self.shared.relay_proxy.get(),
            };
            if let Some(to) = to {
                out.udp(*to, &frame);
            }
        }
        let transport = relay.transport();
        self.shared.relay_over_stream.store(transport == Transport::Stream, Ordering::Relaxed);
        let registered = relay.registered(now).map(|a| (a, transport));
        drop(relay);
        {
            let mut seen = self.shared.relay_seen.lock().unwrap_or_else(PoisonError::into_inner);
            if *seen != registered {
                info!(relay = ?registered, "relay registration changed");
                *seen = registered;
            }
        }
        let mut seen = self.shared.reflexive_seen.lock().unwrap_or_else(PoisonError::into_inner);
        if *seen != known {
            if known.is_none() {
                info!("reflexive address no longer confirmed; not published");
            }
            *seen = known;
        }
    }
}

/// Whether `wire` is a handshake initiation (message type 1).
fn is_initiation(wire: &[u8]) -> bool {
    wire.first() == Some(&1)
}

/// Sends what a peer's timers produced: a handshake initiation to every candidate path (the
/// first to answer wins, and both sides sending at once opens their NATs), anything else
/// along the current path.
fn send_to_paths(shared: &Shared, key: &[u8; 32], paths: &Paths, wire: &[u8], out: &mut impl Sink) {
    if is_initiation(wire) {
        for to in paths.handshake_targets() {
            send_via(shared, key, to, wire, out);
        }
    } else {
        send_via(shared, key, paths.current(), wire, out);
    }
}

/// Sends `wire` for the peer with `key` to `to`: framed for the relay when `to` is the relay.
fn send_via(shared: &Shared, key: &[u8; 32], to: SocketAddr, wire: &[u8], out: &mut impl Sink) {
    if shared.relay_server.get() == Some(&to) {
        out.udp(shared.relay_wire().unwrap_or(to), &relay::send(&relay::key_id(key), wire));
    } else {
        out.udp(to, wire);
    }
}

fn log_change(cluster: &str, change: Option<PathChange>) {
    if let Some(c) = change {
        info!(%cluster, from = %c.from, to = %c.to, path = c.kind.name(), reason = c.reason, "tunnel path changed");
    }
}

#[cfg(test)]
mod tests {
    use rand_core::OsRng;

    use super::*;

    fn ipv4_packet(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let total = 20 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&u16::try_from(total).unwrap().to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..].copy_from_slice(payload);
        p
    }

    struct Pair {
        a: WgCore,
        b: WgCore,
        a_addr: SocketAddr,
        b_addr: SocketAddr,
    }

    /// Two cores, A (10.1/16) and B (10.2/16), each knowing the other.
    fn pair() -> (Pair, Vec<Output>) {
        let mut a = WgCore::new(StaticSecret::random_from_rng(OsRng));
        let mut b = WgCore::new(StaticSecret::random_from_rng(OsRng));
        let a_addr: SocketAddr = "172.31.0.11:51820".parse().unwrap();
        let b_addr: SocketAddr = "172.31.0.12:51820".parse().unwrap();
        let mut out = Vec::new();
        a.upsert_peer(
            PeerConfig {
                cluster_id: "b".into(),
                public_key: b.public_key(),
                endpoint: b_addr,
                candidates: Vec::new(),
                allowed: vec!["10.2.0.0/16".parse().unwrap()],
                health_ip: None,
            },
            &mut out,
        )
        .unwrap();
        let mut ignored = Vec::new();
        b.upsert_peer(
            PeerConfig {
                cluster_id: "a".into(),
                public_key: a.public_key(),
                endpoint: a_addr,
                candidates: Vec::new(),
                allowed: vec!["10.1.0.0/16".parse().unwrap()],
                health_ip: None,
            },
            &mut ignored,
        )
        .unwrap();
        (Pair { a, b, a_addr, b_addr }, out)
    }

    /// Delivers every datagram until both sides are quiet; returns what reached the TUNs.
    fn pump(p: &mut Pair, to_deliver: Vec<Output>) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        pump_at(p, to_deliver, Instant::now())
    }

    /// Like [`pump`], with every datagram arriving at `now`.
    fn pump_at(p: &mut Pair, mut to_deliver: Vec<Output>, now: Instant) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let (mut tun_a, mut tun_b) = (Vec::new(), Vec::new());
        let mut rounds = 0;
        while !to_deliver.is_empty() {
            rounds += 1;
            assert!(rounds < 50, "no quiescence");
            let mut next = Vec::new();
            // A builds its outputs in its scratch buffer, B in the sink's room, as the lanes do:
            // every exchange goes through both paths.
            let mut in_place = InPlace::default();
            for o in to_deliver {
                match o {
                    Output::Udp(dst, d) if dst == p.b_addr => {
                        p.b.on_datagram(p.a_addr, &d, now, &mut in_place);
                        next.append(&mut in_place.outs);
                    }
                    Output::Udp(dst, d) if dst == p.a_addr => p.a.on_datagram(p.b_addr, &d, now, &mut next),
                    Output::Udp(dst, _) => panic!("datagram to unknown {dst}"),
                    Output::Tun(_) => unreachable!(),
                }
            }
            // Separate TUN writes by which core produced them: B's outputs go to B's TUN.
            to_deliver = Vec::new();
            for o in next {
                match o {
                    Output::Tun(pkt) => {
                        let src = [pkt[12], pkt[13], pkt[14], pkt[15]];
                        if src[1] == 1 { tun_b.push(pkt) } else { tun_a.push(pkt) }
                    }
                    other => to_deliver.push(other),
                }
            }
        }
        (tun_a, tun_b)
    }

    #[test]
    fn probes_prove_forwarding_and_notice_a_broken_path() {
        let (mut p, init) = pair();
        p.a.set_health_ip(Some("10.1.0.0".parse().unwrap()));
        p.b.set_health_ip(Some("10.2.0.0".parse().unwrap()));
        let key_a = p.a.public_key();
        let key_b = p.b.public_key();
        let cfg = |id: &str, key, ep, net: &str, health: &str| PeerConfig {
            cluster_id: id.into(),
            public_key: key,
            endpoint: ep,
            candidates: Vec::new(),
            allowed: vec![net.parse().unwrap()],
            health_ip: Some(health.parse().unwrap()),
        };
        let mut ignored = Vec::new();
        p.a.upsert_peer(cfg("b", key_b, p.b_addr, "10.2.0.0/16", "10.2.0.0"), &mut ignored).unwrap();
        p.b.upsert_peer(cfg("a", key_a, p.a_addr, "10.1.0.0/16", "10.1.0.0"), &mut ignored).unwrap();
        pump(&mut p, init);
        let t0 = Instant::now();
        let mut out = Vec::new();
        p.a.tick(t0, &mut out);
        assert_eq!(out.len(), 1, "one probe on a live session");
        // The probe is answered inside B's core and never reaches either TUN.
        let (tun_a, tun_b) = pump_at(&mut p, out, t0 + Duration::from_millis(1));
        assert!(tun_a.is_empty() && tun_b.is_empty());
        let s = &p.a.peers(t0 + Duration::from_millis(10))[0];
        assert!(s.probed && s.rtt.is_some());
        assert_eq!(s.health, Health::Up);
        // The path breaks: A's probes are lost from now on.
        let mut t = t0;
        for _ in 0..5 {
            t += Duration::from_millis(500);
            let mut lost = Vec::new();
            p.a.tick(t, &mut lost);
        }
        assert_eq!(p.a.peers(t)[0].health, Health::Down);
        // It heals: the next probe is answered.
        t += Duration::from_millis(500);
        let mut out = Vec::new();
        p.a.tick(t, &mut out);
        pump_at(&mut p, out, t + Duration::from_millis(1));
        assert_eq!(p.a.peers(t + Duration::from_millis(5))[0].health, Health::Up);
    }

    #[test]
    fn a_standby_peer_is_kept_warm_and_takes_over_without_a_handshake() {
        // A sees B as a standby gateway of cluster b: a peer with no prefixes.
        let (mut p, init) = pair();
        let mut ignored = Vec::new();
        let standby = |allowed: Vec<IpNetwork>, p: &Pair| PeerConfig {
            cluster_id: "b".into(),
            public_key: p.b.public_key(),
            endpoint: p.b_addr,
            candidates: Vec::new(),
            allowed,
            health_ip: None,
        };
        p.a.upsert_peer(standby(vec![], &p), &mut ignored).unwrap();
        assert!(ignored.is_empty(), "an update in place starts no second handshake");
        pump(&mut p, init);
        assert!(p.a.peers(Instant::now())[0].has_session(), "the standby's session is up (warm)");
        // The standby probes A (its own view of the tunnel): A answers, though the standby
        // has no prefixes at A.
        p.a.set_health_ip(Some("10.1.0.0".parse().unwrap()));
        p.b.set_health_ip(Some("10.2.0.0".parse().unwrap()));
        let to_a = PeerConfig {
            cluster_id: "a".into(),
            public_key: p.a.public_key(),
            endpoint: p.a_addr,
            candidates: Vec::new(),
            allowed: vec!["10.1.0.0/16".parse().unwrap()],
            health_ip: Some("10.1.0.0".parse().unwrap()),
        };
        p.b.upsert_peer(to_a, &mut ignored).unwrap();
        let t0 = Instant::now();
        let mut out = Vec::new();
        p.b.tick(t0, &mut out);
        assert_eq!(out.len(), 1, "one probe");
        pump_at(&mut p, out, t0 + Duration::from_millis(1));
        assert_eq!(
            p.b.peers(t0 + Duration::from_millis(5))[0].health,
            Health::Up,
            "the standby's probe was answered"
        );
        // Nothing is routed to a standby.
        let pkt = ipv4_packet([10, 1, 0, 5], [10, 2, 0, 7], b"to b");
        let mut out = Vec::new();
        p.a.on_tun_packet(&pkt, &mut out);
        assert!(out.is_empty());
        assert!(p.a.drops().contains(&(DropReason::NoPeerForDestination, 1)), "{:?}", p.a.drops());
        // Failover: the prefixes move to it, and the very next packet is a data message on
        // the existing session (type 4), not a handshake initiation (type 1).
        p.a.upsert_peer(standby(vec!["10.2.0.0/16".parse().unwrap()], &p), &mut ignored).unwrap();
        let mut out = Vec::new();
        p.a.on_tun_packet(&pkt, &mut out);
        match out.as_slice() {
            [Output::Udp(dst, d)] => {
                assert_eq!(*dst, p.b_addr);
                assert_eq!(d[0], 4, "a data message, no handshake first");
            }
            other => panic!("expected one datagram, got {}", other.len()),
        }
        let (_, at_b) = pump(&mut p, out);
        assert_eq!(at_b, vec![pkt]);
    }

    /// A sink that lends room, like the lanes' one: records what was built in place, and
    /// counts the copies handed over instead.
    #[derive(Default)]
    struct InPlace {
        room: Vec<u8>,
        outs: Vec<Output>,
        commits: usize,
        copies: usize,
    }

    impl Sink for InPlace {
        fn udp(&mut self, dst: SocketAddr, datagram: &[u8]) {
            self.copies += 1;
            self.outs.udp(dst, datagram);
        }
        fn tun(&mut self, packet: &[u8]) {
            self.copies += 1;
            self.outs.tun(packet);
        }
        fn room(&mut self) -> Option<&mut [u8]> {
            // Stale bytes, so an output that is not fully built here shows.
            self.room = vec![0xa5; BUF_SIZE];
            Some(&mut self.room)
        }
        fn commit(&mut self, dst: Option<SocketAddr>, range: std::ops::Range<usize>) {
            self.commits += 1;
            let bytes = self.room[range].to_vec();
            self.outs.push(dst.map_or(Output::Tun(bytes.clone()), |d| Output::Udp(d, bytes)));
        }
    }

    #[test]
    fn packets_are_sealed_and_opened_in_the_sinks_room() {
        let mut p = pump_ready();
        let pkt = ipv4_packet([10, 1, 0, 5], [10, 2, 0, 7], &[7; 1300]);
        let mut sealed = InPlace::default();
        p.a.on_tun_packet(&pkt, &mut sealed);
        assert_eq!((sealed.commits, sealed.copies), (1, 0), "sealed in place");
        let Some(Output::Udp(dst, wire)) = sealed.outs.pop() else { panic!("no datagram") };
        assert_eq!((dst, wire.len()), (p.b_addr, 16 + pkt.len() + 16), "header + packet + tag");

        let mut opened = InPlace::default();
        p.b.on_datagram(p.a_addr, &wire, Instant::now(), &mut opened);
        assert_eq!((opened.commits, opened.copies), (1, 0), "opened in place");
        assert_eq!(opened.outs, vec![Output::Tun(pkt)]);

        // A replayed datagram is refused, and nothing is committed for it.
        let mut replayed = InPlace::default();
        p.b.on_datagram(p.a_addr, &wire, Instant::now(), &mut replayed);
        assert_eq!((replayed.commits, replayed.outs.len()), (0, 0));
    }

    #[test]
    fn handshake_then_data_both_ways() {
        let (mut p, init) = pair();
        assert_eq!(init.len(), 1, "a new peer starts its handshake");
        pump(&mut p, init);
        assert!(p.a.peers(Instant::now())[0].has_session() && p.b.peers(Instant::now())[0].has_session());

        let pkt = ipv4_packet([10, 1, 0, 5], [10, 2, 0, 7], b"hello from a");
        let mut out = Vec::new();
        p.a.on_tun_packet(&pkt, &mut out);
        let (_, at_b) = pump(&mut p, out);
        assert_eq!(at_b, vec![pkt.clone()]);

        let reply = ipv4_packet([10, 2, 0, 7], [10, 1, 0, 5], b"hello from b");
        let mut out = Vec::new();
        p.b.on_tun_packet(&reply, &mut out);
        let (at_a, _) = pump(&mut p, out);
        assert_eq!(at_a, vec![reply.clone()]);
        let a_stats = &p.a.peers(Instant::now())[0];
        assert_eq!((a_stats.tx_bytes, a_stats.rx_bytes), (pkt.len() as u64, reply.len() as u64));
    }

    #[test]
    fn packets_sent_during_the_handshake_are_queued_then_flushed() {
        let (mut p, init) = pair();
        let pkt = ipv4_packet([10, 1, 0, 5], [10, 2, 0, 7], b"early");
        let mut out = Vec::new();
        p.a.on_tun_packet(&pkt, &mut out);
        assert!(out.is_empty(), "no session yet: queued, and the initiation is already in flight");
        // The initiation reaches B, B's response reaches A, A flushes its queue.
        let (_, at_b) = pump(&mut p, init);
        assert_eq!(at_b, vec![pkt]);
    }

    #[test]
    fn spoofed_inner_source_is_dropped() {
        let mut p = pump_ready();
        // B sends a packet claiming a source outside 10.2/16 (say, cluster C's 10.3/16).
        let forged = ipv4_packet([10, 3, 0, 9], [10, 1, 0, 5], b"forged");
        let mut out = Vec::new();
        // B's core would route it to A because the destination is A's.
        p.b.on_tun_packet(&forged, &mut out);
        let (at_a, _) = pump(&mut p, out);
        assert!(at_a.is_empty(), "A must not deliver a source outside B's prefixes");
        assert!(p.a.drops().contains(&(DropReason::SourceNotAllowed, 1)));
    }

    fn pump_ready() -> Pair {
        let (mut p, init) = pair();
        pump(&mut p, init);
        p
    }

    /// A third core, C (10.3/16, at `172.31.0.13`), that A knows and has a session with.
    fn add_c(p: &mut Pair) -> (WgCore, SocketAddr) {
        let mut c = WgCore::new(StaticSecret::random_from_rng(OsRng));
        let c_addr: SocketAddr = "172.31.0.13:51820".parse().unwrap();
        let cfg = |id: &str, key, endpoint, net: &str| PeerConfig {
            cluster_id: id.into(),
            public_key: key,
            endpoint,
            candidates: Vec::new(),
            allowed: vec![net.parse().unwrap()],
            health_ip: None,
        };
        // A's own initiation is lost; C's goes through.
        p.a.upsert_peer(cfg("c", c.public_key(), c_addr, "10.3.0.0/16"), &mut Vec::new()).unwrap();
        let mut pending = Vec::new();
        c.upsert_peer(cfg("a", p.a.public_key(), p.a_addr, "10.1.0.0/16"), &mut pending).unwrap();
        for _ in 0..10 {
            let mut next = Vec::new();
            for o in pending {
                match o {
                    Output::Udp(dst, d) if dst == p.a_addr => {
                        p.a.on_datagram(c_addr, &d, Instant::now(), &mut next)
                    }
                    Output::Udp(dst, d) if dst == c_addr => {
                        c.on_datagram(p.a_addr, &d, Instant::now(), &mut next)
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            pending = next;
        }
        assert!(pending.is_empty(), "A and C went quiet");
        (c, c_addr)
    }

    #[test]
    fn lanes_working_for_different_peers_never_wait_on_each_other() {
        let mut p = pump_ready();
        let (mut c, c_addr) = add_c(&mut p);
        let seal = |core: &mut WgCore, pkt: &[u8]| {
            let mut out = Vec::new();
            core.on_tun_packet(pkt, &mut out);
            let [Output::Udp(_, wire)] = &out[..] else { panic!("one datagram: {out:?}") };
            wire.clone()
        };
        let from_b = ipv4_packet([10, 2, 0, 7], [10, 1, 0, 5], b"from b");
        let from_c = ipv4_packet([10, 3, 0, 7], [10, 1, 0, 5], b"from c");
        let to_c = ipv4_packet([10, 1, 0, 5], [10, 3, 0, 7], b"to c");
        let (wire_b, wire_c) = (seal(&mut p.b, &from_b), seal(&mut c, &from_c));
        // This thread is a lane in the middle of B's packet: it holds B's peer for as long as
        // the test likes.
        let b_idx = p.a.table.by_key[&p.b.public_key().0];
        let b_peer = Arc::clone(&p.a.table.peers[&b_idx]);
        let held = lock_peer(&b_peer);
        // Another lane, with its own handle on A's core, gets C's datagram, a packet for C,
        // then B's datagram.
        let mut lane = p.a.handle();
        let b_addr = p.b_addr;
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = std::thread::spawn(move || {
            let mut out = Vec::new();
            lane.on_datagram(c_addr, &wire_c, Instant::now(), &mut out);
            lane.on_tun_packet(&to_c, &mut out);
            tx.send(std::mem::take(&mut out)).unwrap();
            lane.on_datagram(b_addr, &wire_b, Instant::now(), &mut out);
            tx.send(out).unwrap();
        });
        let for_c = rx.recv_timeout(Duration::from_secs(10)).expect("C's traffic waited for B's lock");
        assert_eq!(for_c.len(), 2, "{for_c:?}");
        assert_eq!(for_c[0], Output::Tun(from_c));
        assert!(matches!(&for_c[1], Output::Udp(dst, _) if *dst == c_addr), "{for_c:?}");
        // The control: B's own datagram does wait while B is held, so the hold is real.
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "B's datagram passed a held lock");
        drop(held);
        let for_b = rx.recv_timeout(Duration::from_secs(10)).expect("B's datagram after the release");
        assert_eq!(for_b, vec![Output::Tun(from_b)]);
        worker.join().unwrap();
    }

    #[test]
    fn garbage_and_unknown_destinations_are_counted() {
        let mut p = pump_ready();
        let mut out = Vec::new();
        p.a.on_datagram(
            p.b_addr,
            b"\x04\x00\x00\x00garbage-garbage-garbage-garbage",
            Instant::now(),
            &mut out,
        );
        p.a.on_datagram(p.b_addr, b"xx", Instant::now(), &mut out);
        assert!(out.is_empty());
        p.a.on_tun_packet(&ipv4_packet([10, 1, 0, 5], [10, 9, 0, 1], b"nowhere"), &mut out);
        assert!(out.is_empty());
        let drops: HashMap<_, _> = p.a.drops().into_iter().collect();
        assert_eq!(drops[&DropReason::NoPeerForDestination], 1);
        // A well-formed data message for a session index nobody has, and two bytes of junk.
        assert_eq!(drops[&DropReason::UnknownPeer], 1);
        assert_eq!(drops[&DropReason::InvalidPacket], 1);
    }

    /// A handshake initiation to A from a core A does not know. Its mac1 is valid: mac1 needs
    /// only A's public key, which every member knows.
    fn stranger_initiation(p: &Pair) -> Vec<u8> {
        let mut stranger = WgCore::new(StaticSecret::random_from_rng(OsRng));
        let mut out = Vec::new();
        stranger
            .upsert_peer(
                PeerConfig {
                    cluster_id: "a".into(),
                    public_key: p.a.public_key(),
                    endpoint: p.a_addr,
                    candidates: Vec::new(),
                    allowed: vec!["10.1.0.0/16".parse().unwrap()],
                    health_ip: None,
                },
                &mut out,
            )
            .unwrap();
        out.iter()
            .find_map(|o| match o {
                Output::Udp(_, d) if d[0] == 1 => Some(d.clone()),
                _ => None,
            })
            .expect("an initiation")
    }

    #[test]
    fn handshake_from_a_stranger_is_refused() {
        let mut p = pump_ready();
        let init = stranger_initiation(&p);
        let mut replies = Vec::new();
        p.a.on_datagram("172.31.0.99:51820".parse().unwrap(), &init, Instant::now(), &mut replies);
        assert!(replies.is_empty());
        assert!(p.a.drops().contains(&(DropReason::UnknownPeer, 1)));
    }

    #[test]
    fn removing_a_peer_stops_routing_to_it() {
        let mut p = pump_ready();
        let key = p.b.public_key();
        assert!(p.a.remove_peer(&key));
        assert!(!p.a.remove_peer(&key));
        let mut out = Vec::new();
        p.a.on_tun_packet(&ipv4_packet([10, 1, 0, 5], [10, 2, 0, 7], b"x"), &mut out);
        assert!(out.is_empty());
        assert!(p.a.peers(Instant::now()).is_empty());
    }

    #[test]
    fn roaming_follows_authenticated_packets() {
        let mut p = pump_ready();
        let pkt = ipv4_packet([10, 2, 0, 7], [10, 1, 0, 5], b"moved");
        let mut out = Vec::new();
        p.b.on_tun_packet(&pkt, &mut out);
        let Output::Udp(_, wire) = &out[0] else { panic!() };
        let new_addr: SocketAddr = "172.31.0.50:40000".parse().unwrap();
        let mut delivered = Vec::new();
        p.a.on_datagram(new_addr, wire, Instant::now(), &mut delivered);
        assert_eq!(delivered, vec![Output::Tun(pkt)]);
        assert_eq!(p.a.peers(Instant::now())[0].config.endpoint, new_addr);
    }

    /// Two cores on a network of several paths: `route(dst)` says whether a datagram to `dst`
    /// arrives (at A or at B: `true` for B) and from which address the receiver sees it come.
    fn deliver_on(
        a: &mut WgCore,
        b: &mut WgCore,
        mut to_deliver: Vec<(bool, Output)>,
        now: Instant,
        route: &dyn Fn(bool, SocketAddr) -> Option<SocketAddr>,
    ) -> Vec<SocketAddr> {
        // Every destination a datagram was sent to, delivered or not.
        let mut sent_to = Vec::new();
        for _ in 0..50 {
            if to_deliver.is_empty() {
                return sent_to;
            }
            let mut next = Vec::new();
            for (from_a, o) in to_deliver {
                let Output::Udp(dst, d) = o else { continue };
                sent_to.push(dst);
                let Some(src) = route(from_a, dst) else { continue };
                let mut out = Vec::new();
                if from_a {
                    b.on_datagram(src, &d, now, &mut out)
                } else {
                    a.on_datagram(src, &d, now, &mut out)
                }
                next.extend(out.into_iter().map(|o| (!from_a, o)));
            }
            to_deliver = next;
        }
        panic!("no quiescence");
    }

    /// A peer called `id`: `key`'s core, at `endpoint` (and `candidates`), owning `net`, probed
    /// at `health` when given.
    fn peer(
        id: &str,
        key: &WgCore,
        endpoint: SocketAddr,
        candidates: Vec<causeway_broker_api::records::Candidate>,
        net: &str,
        health: Option<&str>,
    ) -> PeerConfig {
        PeerConfig {
            cluster_id: id.into(),
            public_key: key.public_key(),
            endpoint,
            candidates,
            allowed: vec![net.parse().unwrap()],
            health_ip: health.map(|h| h.parse().unwrap()),
        }
    }

    /// Two fresh cores, A (10.1/16) and B (10.2/16), with health addresses (probes on) when
    /// `probed`.
    fn cores(probed: bool) -> (WgCore, WgCore) {
        let mut a = WgCore::new(StaticSecret::random_from_rng(OsRng));
        let mut b = WgCore::new(StaticSecret::random_from_rng(OsRng));
        if probed {
            a.set_health_ip(Some("10.1.0.0".parse().unwrap()));
            b.set_health_ip(Some("10.2.0.0".parse().unwrap()));
        }
        (a, b)
    }

    fn candidate(
        addr: &str,
        kind: causeway_broker_api::records::CandidateKind,
    ) -> causeway_broker_api::records::Candidate {
        causeway_broker_api::records::Candidate { address: addr.parse().unwrap(), kind }
    }

    #[test]
    fn initiations_go_to_every_candidate_and_the_answering_path_is_used() {
        use causeway_broker_api::records::CandidateKind::{Private, Public};
        let (mut a, mut b) = cores(false);
        let (a_addr, b_private, b_public): (SocketAddr, SocketAddr, SocketAddr) = (
            "172.31.0.11:51820".parse().unwrap(),
            "172.31.0.12:51820".parse().unwrap(),
            "198.51.100.12:51820".parse().unwrap(),
        );
        let mut out = Vec::new();
        // The record prefers its public address, which is a black hole here.
        a.upsert_peer(
            peer(
                "b",
                &b,
                b_public,
                vec![candidate("172.31.0.12:51820", Private), candidate("198.51.100.12:51820", Public)],
                "10.2.0.0/16",
                None,
            ),
            &mut out,
        )
        .unwrap();
        let mut ignored = Vec::new();
        b.upsert_peer(peer("a", &a, a_addr, Vec::new(), "10.1.0.0/16", None), &mut ignored).unwrap();
        // One initiation, to both candidates, the preferred address first.
        let targets: Vec<SocketAddr> = out
            .iter()
            .map(|o| match o {
                Output::Udp(d, _) => *d,
                Output::Tun(_) => unreachable!(),
            })
            .collect();
        assert_eq!(targets, vec![b_public, b_private]);
        assert!(matches!((&out[0], &out[1]), (Output::Udp(_, x), Output::Udp(_, y)) if x == y && x[0] == 1));
        let route = |from_a: bool, dst: SocketAddr| match (from_a, dst) {
            (true, d) if d == b_private => Some(a_addr),
            (false, d) if d == a_addr => Some(b_private),
            _ => None,
        };
        let now = Instant::now();
        deliver_on(&mut a, &mut b, out.into_iter().map(|o| (true, o)).collect(), now, &route);
        let s = &a.peers(now)[0];
        assert!(s.has_session());
        assert_eq!(
            (s.config.endpoint, s.path),
            (b_private, PathKind::DirectPrivate),
            "the path that answered"
        );
        // Data follows it.
        let mut out = Vec::new();
        a.on_tun_packet(&ipv4_packet([10, 1, 0, 5], [10, 2, 0, 7], b"hello"), &mut out);
        assert!(matches!(&out[..], [Output::Udp(d, _)] if *d == b_private));
    }

    #[test]
    fn a_better_path_is_checked_through_the_session_and_taken_when_it_answers() {
        use causeway_broker_api::records::CandidateKind::{Private, Reflexive};
        let (mut a, mut b) = cores(true);
        let a_private: SocketAddr = "172.31.0.11:51820".parse().unwrap();
        let a_nat: SocketAddr = "203.0.113.11:40002".parse().unwrap();
        let b_private: SocketAddr = "172.31.0.12:51820".parse().unwrap();
        let b_nat: SocketAddr = "203.0.113.12:40001".parse().unwrap();
        let mut out = Vec::new();
        a.upsert_peer(
            peer(
                "b",
                &b,
                b_nat,
                vec![candidate("172.31.0.12:51820", Private), candidate("203.0.113.12:40001", Reflexive)],
                "10.2.0.0/16",
                Some("10.2.0.0"),
            ),
            &mut out,
        )
        .unwrap();
        let mut ignored = Vec::new();
        b.upsert_peer(
            peer(
                "a",
                &a,
                a_nat,
                vec![candidate("172.31.0.11:51820", Private), candidate("203.0.113.11:40002", Reflexive)],
                "10.1.0.0/16",
                Some("10.1.0.0"),
            ),
            &mut ignored,
        )
        .unwrap();
        // First only the NATs' public side carries anything: the private path is cut.
        let private_open = std::cell::Cell::new(false);
        let route = |from_a: bool, dst: SocketAddr| match (from_a, dst) {
            (true, d) if d == b_nat => Some(a_nat),
            (false, d) if d == a_nat => Some(b_nat),
            (true, d) if d == b_private && private_open.get() => Some(a_private),
            (false, d) if d == a_private && private_open.get() => Some(b_private),
            _ => None,
        };
        let t0 = Instant::now();
        deliver_on(&mut a, &mut b, out.into_iter().map(|o| (true, o)).collect(), t0, &route);
        assert_eq!(a.peers(t0)[0].config.endpoint, b_nat);
        // A check of the private path goes out, unanswered while it is cut: nothing moves.
        let mut out = Vec::new();
        a.tick(t0, &mut out);
        let checks: Vec<SocketAddr> = out
            .iter()
            .filter_map(|o| match o {
                Output::Udp(d, _) if *d == b_private => Some(*d),
                _ => None,
            })
            .collect();
        assert_eq!(checks, vec![b_private], "{out:?}");
        deliver_on(&mut a, &mut b, out.into_iter().map(|o| (true, o)).collect(), t0, &route);
        assert_eq!((a.peers(t0)[0].config.endpoint, a.peers(t0)[0].path), (b_nat, PathKind::DirectPublic));
        // The private path opens: the next check (an interval later) is answered and taken.
        private_open.set(true);
        let t1 = t0 + crate::cable::paths::CHECK_INTERVAL;
        let mut out = Vec::new();
        a.tick(t1, &mut out);
        deliver_on(&mut a, &mut b, out.into_iter().map(|o| (true, o)).collect(), t1, &route);
        let s = &a.peers(t1)[0];
        assert_eq!((s.config.endpoint, s.path), (b_private, PathKind::DirectPrivate));
        // The check itself moved nothing at B (only the checker decides) ...
        assert_eq!(b.peers(t1)[0].config.endpoint, a_nat);
        // ... A's next packet along the new path does (roaming).
        let mut out = Vec::new();
        a.on_tun_packet(&ipv4_packet([10, 1, 0, 5], [10, 2, 0, 7], b"direct"), &mut out);
        let sent = deliver_on(&mut a, &mut b, out.into_iter().map(|o| (true, o)).collect(), t1, &route);
        assert_eq!(sent, vec![b_private]);
        assert_eq!(
            (b.peers(t1)[0].config.endpoint, b.peers(t1)[0].path),
            (a_private, PathKind::DirectPrivate)
        );
    }

    #[test]
    fn a_path_that_stops_answering_is_left_for_another_candidate_within_seconds() {
        use causeway_broker_api::records::CandidateKind::{Private, Public};
        let (mut a, mut b) = cores(true);
        let (a_addr, b_private, b_public): (SocketAddr, SocketAddr, SocketAddr) = (
            "172.31.0.11:51820".parse().unwrap(),
            "172.31.0.12:51820".parse().unwrap(),
            "198.51.100.12:51820".parse().unwrap(),
        );
        let mut out = Vec::new();
        a.upsert_peer(
            peer(
                "b",
                &b,
                b_private,
                vec![candidate("172.31.0.12:51820", Private), candidate("198.51.100.12:51820", Public)],
                "10.2.0.0/16",
                Some("10.2.0.0"),
            ),
            &mut out,
        )
        .unwrap();
        let mut ignored = Vec::new();
        b.upsert_peer(peer("a", &a, a_addr, Vec::new(), "10.1.0.0/16", Some("10.1.0.0")), &mut ignored)
            .unwrap();
        // B answers to wherever A is; A reaches B on both paths until the private one dies.
        let private_up = std::cell::Cell::new(true);
        let route = |from_a: bool, dst: SocketAddr| match (from_a, dst) {
            (true, d) if d == b_private && private_up.get() => Some(a_addr),
            (true, d) if d == b_public => Some(a_addr),
            (false, d) if d == a_addr && private_up.get() => Some(b_private),
            (false, d) if d == a_addr => Some(b_public),
            _ => None,
        };
        let t0 = Instant::now();
        deliver_on(&mut a, &mut b, out.into_iter().map(|o| (true, o)).collect(), t0, &route);
        let mut out = Vec::new();
        a.tick(t0, &mut out);
        deliver_on(&mut a, &mut b, out.into_iter().map(|o| (true, o)).collect(), t0, &route);
        assert_eq!((a.peers(t0)[0].config.endpoint, a.peers(t0)[0].health), (b_private, Health::Up));
        // The private path dies; probes go unanswered; once they are called down, a fresh
        // handshake goes to every candidate and the public path takes over.
        private_up.set(false);
        let t1 = t0 + super::super::probe::DOWN_AFTER + Duration::from_millis(100);
        let mut out = Vec::new();
        a.tick(t1, &mut out);
        let initiations: Vec<SocketAddr> = out
            .iter()
            .filter_map(|o| match o {
                Output::Udp(d, w) if w[0] == 1 => Some(*d),
                _ => None,
            })
            .collect();
        assert_eq!(initiations, vec![b_private, b_public]);
        deliver_on(&mut a, &mut b, out.into_iter().map(|o| (true, o)).collect(), t1, &route);
        let s = &a.peers(t1)[0];
        assert_eq!((s.config.endpoint, s.path), (b_public, PathKind::DirectPublic));
        // Not again until RESCUE_EVERY has passed.
        let mut out = Vec::new();
        a.tick(t1 + Duration::from_millis(100), &mut out);
        assert!(out.iter().all(|o| !matches!(o, Output::Udp(_, w) if w[0] == 1)), "{out:?}");
    }

    #[test]
    fn peers_no_direct_path_reaches_talk_through_the_relay_which_sees_only_ciphertext() {
        relay_between(None);
    }

    #[test]
    fn a_gateway_whose_udp_to_the_relay_is_blocked_talks_through_the_stream() {
        relay_between(Some("127.0.0.1:40999".parse().unwrap()));
    }

    /// Two cores that reach each other only through the relay; with `b_proxy`, B's UDP to
    /// the relay goes unanswered, so its frames take the stream (through the proxy at that
    /// address) while A's stay on UDP.
    fn relay_between(b_proxy: Option<SocketAddr>) {
        use causeway_broker_api::records::CandidateKind::{Public, Relay};
        let relay_addr: SocketAddr = "172.31.0.2:3478".parse().unwrap();
        let settings =
            RelaySettings { server: relay_addr, token_sha256: relay::token_sha256("cw1_t"), stream: None };
        let (mut a, mut b) = cores(false);
        a.set_relay(Some(settings.clone()), None);
        b.set_relay(Some(settings), b_proxy);
        if let Some(proxy) = b_proxy {
            // Unanswered for three seconds on UDP, then through the proxy; answered there.
            let t0 = Instant::now();
            let mut sent = Vec::new();
            for ms in [0, 1000, 2000, 3000] {
                let mut out = Vec::new();
                b.tick(t0 + Duration::from_millis(ms), &mut out);
                sent.extend(out.into_iter().filter_map(|o| match o {
                    Output::Udp(to, d) if relay::is_relay(&d) => Some((to, d)),
                    _ => None,
                }));
            }
            let tos: Vec<SocketAddr> = sent.iter().map(|(to, _)| *to).collect();
            assert_eq!(tos, [relay_addr, relay_addr, relay_addr, proxy]);
            let Ok(relay::Frame::Register(r)) = relay::parse(&sent[3].1) else { panic!() };
            let ack = relay::registered(r.key, r.nonce);
            let mut none = Vec::new();
            // The same acknowledgement by UDP is not the stream's: refused.
            b.on_datagram(relay_addr, &ack, t0, &mut none);
            b.on_datagram(proxy, &ack, t0, &mut none);
            b.tick(t0 + Duration::from_millis(3100), &mut none);
            assert_eq!(*b.relay().lock().unwrap(), Some((relay_addr, Transport::Stream)));
            assert_eq!(b.drops().iter().find(|(r, _)| *r == DropReason::InvalidPacket).unwrap().1, 1);
        }
        // Where the relay takes B's frames from, and delivers B's.
        let b_side = b_proxy.unwrap_or(relay_addr);
        let (a_pub, b_pub): (SocketAddr, SocketAddr) =
            ("198.51.100.11:51820".parse().unwrap(), "198.51.100.12:51820".parse().unwrap());
        let via = |addr: SocketAddr| {
            vec![candidate(&addr.to_string(), Public), candidate("172.31.0.2:3478", Relay)]
        };
        let mut out = Vec::new();
        a.upsert_peer(peer("b", &b, b_pub, via(b_pub), "10.2.0.0/16", None), &mut out).unwrap();
        let mut ignored = Vec::new();
        b.upsert_peer(peer("a", &a, a_pub, via(a_pub), "10.1.0.0/16", None), &mut ignored).unwrap();
        // Direct datagrams are lost (hard NATs); the relay forwards Send frames as Deliver
        // frames, and remembers every payload it saw.
        let (key_a, key_b) = (a.public_key().0, b.public_key().0);
        let mut seen_by_relay: Vec<Vec<u8>> = Vec::new();
        let mut tun = Vec::new();
        let mut pump =
            |a: &mut WgCore, b: &mut WgCore, outs: Vec<(bool, Output)>, seen: &mut Vec<Vec<u8>>| {
                let mut queue = outs;
                for _ in 0..50 {
                    let mut next = Vec::new();
                    for (from_a, o) in queue {
                        let Output::Udp(dst, d) = o else {
                            tun.push(o);
                            continue;
                        };
                        // A's frames go to the relay; B's to wherever B reaches it.
                        if dst != if from_a { relay_addr } else { b_side } {
                            assert_ne!(dst, relay_addr, "B sent by UDP while on the stream");
                            continue;
                        }
                        let Ok(relay::Frame::Send { dst: to, datagram }) = relay::parse(&d) else {
                            panic!("{d:02x?}")
                        };
                        seen.push(datagram.to_vec());
                        let from_key = if from_a { key_a } else { key_b };
                        let frame = relay::deliver(&relay::key_id(&from_key), datagram);
                        let mut o = Vec::new();
                        if to == relay::key_id(&key_b) {
                            b.on_datagram(b_side, &frame, Instant::now(), &mut o)
                        } else {
                            a.on_datagram(relay_addr, &frame, Instant::now(), &mut o)
                        }
                        next.extend(o.into_iter().map(|x| (to == relay::key_id(&key_a), x)));
                    }
                    if next.is_empty() {
                        return;
                    }
                    queue = next;
                }
                panic!("no quiescence");
            };
        pump(&mut a, &mut b, out.into_iter().map(|o| (true, o)).collect(), &mut seen_by_relay);
        let s = &a.peers(Instant::now())[0];
        assert!(s.has_session());
        assert_eq!((s.config.endpoint, s.path), (relay_addr, PathKind::Relayed));
        // A packet through the relay arrives; the relay saw none of its plaintext.
        let secret = b"the plaintext the relay must not see";
        let pkt = ipv4_packet([10, 1, 0, 5], [10, 2, 0, 7], secret);
        let mut out = Vec::new();
        a.on_tun_packet(&pkt, &mut out);
        pump(&mut a, &mut b, out.into_iter().map(|o| (true, o)).collect(), &mut seen_by_relay);
        assert_eq!(tun, vec![Output::Tun(pkt)]);
        assert!(!seen_by_relay.is_empty());
        assert!(seen_by_relay.iter().all(|d| !d.windows(secret.len()).any(|w| w == secret)));
        assert_eq!(b.peers(Instant::now())[0].path, PathKind::Relayed);
        // Spoofed relay frames: from elsewhere, or from the relay with a datagram that is not
        // the peer's: counted, nothing moves.
        let invalid = |c: &WgCore| {
            c.drops()
                .iter()
                .filter(|(r, _)| matches!(r, DropReason::InvalidPacket | DropReason::UnknownPeer))
                .map(|(_, n)| n)
                .sum::<u64>()
        };
        let before = invalid(&b);
        let mut none = Vec::new();
        b.on_datagram(
            "198.51.100.66:3478".parse().unwrap(),
            &relay::deliver(&relay::key_id(&key_a), &seen_by_relay[0]),
            Instant::now(),
            &mut none,
        );
        b.on_datagram(
            relay_addr,
            &relay::deliver(
                &relay::key_id(&key_a),
                &[
                    4, 0, 0, 0, 9, 9, 9, 9, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                    0, 0,
                ],
            ),
            Instant::now(),
            &mut none,
        );
        b.on_datagram(b_side, &relay::registered(key_b, [0; 8]), Instant::now(), &mut none);
        b.on_datagram(b_side, &relay::refused(key_b, [0; 8]), Instant::now(), &mut none);
        assert!(none.iter().all(|o| !matches!(o, Output::Tun(_))));
        assert_eq!(invalid(&b) - before, 4);
        assert_eq!(b.peers(Instant::now())[0].config.endpoint, relay_addr);
    }

    #[test]
    fn the_reflexive_address_is_asked_from_the_cable_and_forged_answers_are_counted() {
        let mut core = WgCore::new(StaticSecret::random_from_rng(OsRng));
        let server: SocketAddr = "172.31.0.2:3478".parse().unwrap();
        core.set_stun_server(Some(server));
        let t0 = Instant::now();
        let mut out = Vec::new();
        core.tick(t0, &mut out);
        let [Output::Udp(to, request)] = &out[..] else { panic!("{out:?}") };
        assert_eq!(*to, server);
        let mapped: SocketAddr = "203.0.113.9:40001".parse().unwrap();
        let answer = causeway_broker_api::stun::answer(request, mapped).unwrap();
        // From elsewhere, or for another transaction: refused and counted, nothing learnt.
        let forged =
            causeway_broker_api::stun::answer(&causeway_broker_api::stun::binding_request([1; 12]), mapped)
                .unwrap();
        let mut none = Vec::new();
        core.on_datagram("172.31.0.66:3478".parse().unwrap(), &answer, t0, &mut none);
        core.on_datagram(server, &forged, t0, &mut none);
        assert!(none.is_empty());
        assert_eq!(core.drops().iter().find(|(r, _)| *r == DropReason::InvalidPacket).unwrap().1, 2);
        core.tick(t0, &mut none);
        assert_eq!(*core.reflexive().lock().unwrap(), None);
        // The real answer: published at the next tick.
        core.on_datagram(server, &answer, t0, &mut none);
        core.tick(t0 + Duration::from_millis(50), &mut none);
        assert_eq!(*core.reflexive().lock().unwrap(), Some(mapped));
    }

    /// A core that knows one peer, and that peer's side as a bare `Tunn` (so a test can make
    /// as many genuine initiations as it wants).
    fn core_and_initiator() -> (WgCore, Tunn, SocketAddr) {
        let ours = StaticSecret::random_from_rng(OsRng);
        let theirs = StaticSecret::random_from_rng(OsRng);
        let mut core = WgCore::new(ours.clone());
        let peer_addr: SocketAddr = "172.31.0.12:51820".parse().unwrap();
        core.upsert_peer(
            PeerConfig {
                cluster_id: "b".into(),
                public_key: WireGuardKey(PublicKey::from(&theirs).to_bytes()),
                endpoint: peer_addr,
                candidates: Vec::new(),
                allowed: vec!["10.2.0.0/16".parse().unwrap()],
                health_ip: None,
            },
            &mut Vec::new(),
        )
        .unwrap();
        let tunn = Tunn::new(theirs, PublicKey::from(&ours), None, None, 7, None);
        (core, tunn, peer_addr)
    }

    fn initiation(t: &mut Tunn) -> Vec<u8> {
        let mut buf = vec![0u8; 256];
        match t.format_handshake_initiation(&mut buf, true) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            _ => panic!("no initiation"),
        }
    }

    #[test]
    fn initiations_with_a_bad_mac1_cost_no_diffie_hellman() {
        let (mut core, mut initiator, peer_addr) = core_and_initiator();
        let genuine = initiation(&mut initiator);
        let mut out = Vec::new();
        for i in 0..100_000u32 {
            let mut forged = genuine.clone();
            // Anything in the message or its mac1 changed: the mac1 no longer matches.
            let at = 116 + (i as usize % 16);
            forged[at] ^= 1 + (i % 255) as u8;
            forged[8..12].copy_from_slice(&i.to_le_bytes());
            core.on_datagram(peer_addr, &forged, Instant::now(), &mut out);
        }
        assert!(out.is_empty(), "nothing answered");
        assert_eq!(core.handshake_computations(), 0, "no Diffie-Hellman for a bad mac1");
        let drops: HashMap<_, _> = core.drops().into_iter().collect();
        assert_eq!(drops[&DropReason::InvalidPacket], 100_000);
        // The genuine one still goes through, at the price of one.
        core.on_datagram(peer_addr, &genuine, Instant::now(), &mut out);
        assert_eq!(core.handshake_computations(), 1);
        assert!(matches!(&out[..], [Output::Udp(dst, resp)] if *dst == peer_addr && resp[0] == 2));
    }

    #[test]
    fn past_the_rate_limit_initiations_get_cookies_without_diffie_hellman() {
        let (mut core, mut initiator, _) = core_and_initiator();
        let flooder: SocketAddr = "172.31.0.66:40000".parse().unwrap();
        let extra = 50;
        let mut cookies = 0;
        let mut last_cookie = None;
        for _ in 0..HANDSHAKES_PER_SECOND + extra {
            let mut out = Vec::new();
            core.on_datagram(flooder, &initiation(&mut initiator), Instant::now(), &mut out);
            if let [Output::Udp(dst, reply)] = &out[..]
                && reply[0] == 3
            {
                assert_eq!(*dst, flooder, "the cookie goes to the address it tests");
                assert_eq!(reply.len(), 64);
                cookies += 1;
                last_cookie = Some(reply.clone());
            }
        }
        assert_eq!(core.handshake_computations(), HANDSHAKES_PER_SECOND, "the budget, and not one more");
        assert_eq!(cookies, extra);
        assert!(core.drops().contains(&(DropReason::UnderLoad, extra)));
        // A sender that really is at its address answers the cookie: its next initiation
        // carries mac2 and is processed although the core is still under load.
        let mut buf = vec![0u8; 256];
        assert!(matches!(
            initiator.decapsulate(Some(flooder.ip()), &last_cookie.unwrap(), &mut buf),
            TunnResult::Done
        ));
        let mut out = Vec::new();
        core.on_datagram(flooder, &initiation(&mut initiator), Instant::now(), &mut out);
        assert_eq!(core.handshake_computations(), HANDSHAKES_PER_SECOND + 1);
        assert!(matches!(&out[..], [Output::Udp(_, resp)] if resp[0] == 2), "a response, not a cookie");
    }

    #[test]
    fn forged_responses_and_cookie_replies_never_move_the_peer() {
        // A's initiation reaches B; B's response is what an on-path attacker records.
        let (mut p, init) = pair();
        let Output::Udp(_, init) = &init[0] else { panic!() };
        let mut from_b = Vec::new();
        p.b.on_datagram(p.a_addr, init, Instant::now(), &mut from_b);
        let Output::Udp(_, response) = &from_b[0] else { panic!() };
        assert_eq!(response[0], 2);
        let mut keepalive = Vec::new();
        p.a.on_datagram(p.b_addr, response, Instant::now(), &mut keepalive);
        assert!(p.a.peers(Instant::now())[0].has_session());
        // The attacker replays it from its own address: past the budget A answers with
        // cookies, which used to count as the peer having proved itself.
        let attacker: SocketAddr = "172.31.0.66:40000".parse().unwrap();
        // The genuine response used one of this second's budget.
        let forged = HANDSHAKES_PER_SECOND - 1 + 20;
        let mut answered = Vec::new();
        for _ in 0..forged {
            p.a.on_datagram(attacker, response, Instant::now(), &mut answered);
        }
        assert!(answered.iter().all(|o| matches!(o, Output::Udp(dst, c) if *dst == attacker && c[0] == 3)));
        assert_eq!(answered.len(), 20, "cookies past the budget only");
        // And forged cookie replies for A's session index, from the attacker.
        let mut cookie = vec![0u8; 64];
        cookie[0] = 3;
        cookie[4..8].copy_from_slice(&response[4..8]);
        for _ in 0..20 {
            p.a.on_datagram(attacker, &cookie, Instant::now(), &mut answered);
        }
        let peer = &p.a.peers(Instant::now())[0];
        assert_eq!(peer.config.endpoint, p.b_addr, "the peer stays where it authenticated");
        assert!(peer.has_session());
        // The tunnel still carries traffic to the right place.
        let pkt = ipv4_packet([10, 1, 0, 5], [10, 2, 0, 7], b"still here");
        let mut out = Vec::new();
        p.a.on_tun_packet(&pkt, &mut out);
        assert!(matches!(&out[..], [Output::Udp(dst, _)] if *dst == p.b_addr));
        let (_, at_b) = pump(&mut p, out);
        assert_eq!(at_b, vec![pkt]);
    }

    #[test]
    fn replayed_data_from_elsewhere_does_not_move_the_peer_but_a_keepalive_does() {
        let mut p = pump_ready();
        let pkt = ipv4_packet([10, 2, 0, 7], [10, 1, 0, 5], b"once");
        let mut out = Vec::new();
        p.b.on_tun_packet(&pkt, &mut out);
        let Output::Udp(_, wire) = &out[0] else { panic!() };
        let mut delivered = Vec::new();
        p.a.on_datagram(p.b_addr, wire, Instant::now(), &mut delivered);
        assert_eq!(delivered, vec![Output::Tun(pkt)]);
        // The same datagram again, from an attacker: a replay, not delivered, no roaming.
        let attacker: SocketAddr = "172.31.0.66:40000".parse().unwrap();
        let mut again = Vec::new();
        p.a.on_datagram(attacker, wire, Instant::now(), &mut again);
        assert!(again.is_empty());
        assert_eq!(p.a.peers(Instant::now())[0].config.endpoint, p.b_addr);
        // A fresh keepalive from B's new address is authenticated data: the peer roams.
        let moved: SocketAddr = "172.31.0.77:51820".parse().unwrap();
        let b_peer = p.b.table.peers.values().next().cloned().expect("B knows A");
        let mut buf = vec![0u8; 256];
        let TunnResult::WriteToNetwork(ka) = lock_peer(&b_peer).tunn.encapsulate(&[], &mut buf) else {
            panic!()
        };
        let ka = ka.to_vec();
        p.a.on_datagram(moved, &ka, Instant::now(), &mut Vec::new());
        assert_eq!(p.a.peers(Instant::now())[0].config.endpoint, moved);
    }

    #[test]
    fn a_key_never_moves_to_another_cluster() {
        let mut p = pump_ready();
        let key_b = p.b.public_key();
        let evil = PeerConfig {
            cluster_id: "evil".into(),
            public_key: key_b,
            endpoint: "172.31.0.66:51820".parse().unwrap(),
            candidates: Vec::new(),
            allowed: vec!["10.66.0.0/16".parse().unwrap()],
            health_ip: None,
        };
        let err = p.a.upsert_peer(evil, &mut Vec::new()).unwrap_err();
        assert_eq!(
            err,
            PeerRefused::KeyOfAnotherCluster { key: key_b, owner: "b".into(), claimant: "evil".into() }
        );
        let own = PeerConfig {
            cluster_id: "mirror".into(),
            public_key: p.a.public_key(),
            endpoint: "172.31.0.66:51820".parse().unwrap(),
            candidates: Vec::new(),
            allowed: vec!["10.67.0.0/16".parse().unwrap()],
            health_ip: None,
        };
        assert!(matches!(p.a.upsert_peer(own, &mut Vec::new()), Err(PeerRefused::OwnKey { .. })));
        let peers = p.a.peers(Instant::now());
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].config.cluster_id, "b");
        assert_eq!(peers[0].config.endpoint, p.b_addr);
        assert_eq!(peers[0].config.allowed, vec!["10.2.0.0/16".parse::<IpNetwork>().unwrap()]);
        let mut out = Vec::new();
        p.a.on_tun_packet(&ipv4_packet([10, 1, 0, 5], [10, 66, 0, 1], b"x"), &mut out);
        assert!(out.is_empty(), "the refused prefixes route nowhere");
    }

    /// The message classifier under hostile input, proptest-driven (a bounded fuzz run on
    /// every test run): arbitrary bytes, arbitrary bytes behind each message type's header,
    /// and genuine messages (an initiation, a data message) with bytes changed, from the
    /// peer's own address or another. Each one is dropped and counted exactly once, nothing
    /// is answered, no Diffie-Hellman is spent, and the session still carries data after.
    mod hostile {
        use proptest::prelude::*;

        use super::*;

        #[derive(Clone, Debug)]
        enum Input {
            Raw(Vec<u8>),
            /// A message type byte and length, random contents.
            Shaped(u8, Vec<u8>),
            /// A genuine initiation (false) or data message (true) with bytes XORed.
            Mutated(bool, Vec<(usize, u8)>),
        }

        fn input() -> impl Strategy<Value = Input> {
            let shaped = prop_oneof![
                Just((1u8, 148usize)),
                Just((2, 92)),
                Just((3, 64)),
                Just((4, 32)),
                Just((4, 48))
            ]
            .prop_flat_map(|(kind, len)| (Just(kind), prop::collection::vec(any::<u8>(), len - 4)));
            let flips = prop::collection::vec((any::<usize>(), 1u8..=255), 1..4);
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..200).prop_map(Input::Raw),
                shaped.prop_map(|(k, rest)| Input::Shaped(k, rest)),
                (any::<bool>(), flips).prop_map(|(data, f)| Input::Mutated(data, f)),
            ]
        }

        fn total(c: &WgCore) -> u64 {
            c.drops().iter().map(|d| d.1).sum()
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            #[test]
            fn every_hostile_datagram_is_dropped_and_counted_once(
                inputs in prop::collection::vec(input(), 1..30),
                from_peer in any::<bool>(),
            ) {
                let mut p = pump_ready();
                let mut out = Vec::new();
                p.b.on_tun_packet(&ipv4_packet([10, 2, 0, 5], [10, 1, 0, 5], b"genuine"), &mut out);
                let data = match &out[..] {
                    [Output::Udp(_, d)] => d.clone(),
                    _ => panic!("B sends one data message"),
                };
                // A stranger's initiation, intact but for the changes made below.
                let init = stranger_initiation(&p);
                let src: SocketAddr = if from_peer { p.b_addr } else { "172.31.0.66:51820".parse().unwrap() };
                let (drops, dh) = (total(&p.a), p.a.handshake_computations());
                let n = inputs.len() as u64;
                for i in inputs {
                    let bytes = match i {
                        Input::Raw(b) => b,
                        Input::Shaped(kind, rest) => [&[kind, 0, 0, 0][..], &rest].concat(),
                        Input::Mutated(is_data, flips) => {
                            let mut m = if is_data { data.clone() } else { init.clone() };
                            // An initiation's last 16 bytes are mac2, which the protocol
                            // checks only under load: changing them leaves a valid message
                            // (one the rate limiter prices). Everything mac1 covers, and
                            // mac1 itself, is fair game.
                            let span = if is_data { m.len() } else { 132 };
                            let original = m.clone();
                            for (at, x) in &flips {
                                m[at % span] ^= x;
                            }
                            // Two changes to one byte can cancel out: that is the genuine
                            // message, which A rightly accepts. Keep it changed.
                            if m == original {
                                m[flips[0].0 % span] ^= 1;
                            }
                            m
                        }
                    };
                    out.clear();
                    p.a.on_datagram(src, &bytes, Instant::now(), &mut out);
                    prop_assert!(out.is_empty(), "a hostile datagram was answered or delivered: {:?}", bytes);
                }
                prop_assert_eq!(total(&p.a), drops + n, "each datagram counted once: {:?}", p.a.drops());
                prop_assert_eq!(p.a.handshake_computations(), dh, "no Diffie-Hellman for any of them");
                // The real session is untouched: B's genuine message still gets through.
                out.clear();
                p.a.on_datagram(p.b_addr, &data, Instant::now(), &mut out);
                prop_assert!(matches!(&out[..], [Output::Tun(_)]), "the session no longer carries data");
            }
        }
    }
}
