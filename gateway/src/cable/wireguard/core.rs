//! The WireGuard cable's protocol core, sans I/O: one `boringtun::noise::Tunn` per remote
//! gateway, the peer lookup tables (by receiver index, by public key, by allowed prefix), and
//! allowed-IPs enforcement on decrypt. The I/O loop feeds it packets from the TUN device, UDP
//! datagrams and timer ticks, and carries out the [`Output`]s it returns.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use boringtun::{
    noise::{Packet, Tunn, TunnResult, errors::WireGuardError, handshake::parse_handshake_anon},
    x25519::{PublicKey, StaticSecret},
};
use causeway_broker_api::WireGuardKey;
use ipnetwork::IpNetwork;
use tracing::{debug, info, warn};

use super::probe::{Echo, Health, PROBE_ID, ProbeState};

/// WireGuard's own overhead on top of the inner packet (IPv6 outer header, UDP, WG header+tag).
pub const WG_OVERHEAD: u16 = 80;
/// Keepalive so that NAT bindings and the "connected" view stay fresh.
pub const PERSISTENT_KEEPALIVE_SECS: u16 = 25;
/// A session whose last handshake is older than this has expired (REJECT_AFTER_TIME).
pub const SESSION_LIFETIME: Duration = Duration::from_secs(180);
/// Scratch buffer size: the largest datagram plus WireGuard's overhead.
pub const BUF_SIZE: usize = 65_536 + 148;

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
}

impl DropReason {
    pub const ALL: [DropReason; 6] = [
        Self::NoPeerForDestination,
        Self::InvalidPacket,
        Self::UnknownPeer,
        Self::SourceNotAllowed,
        Self::LaneBacklog,
        Self::SendRefused,
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
        }
    }
}

/// The remote gateway a peer talks to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub cluster_id: String,
    pub public_key: WireGuardKey,
    pub endpoint: SocketAddr,
    pub allowed: Vec<IpNetwork>,
    /// The remote gateway's health-check address; probes run only when it is known.
    pub health_ip: Option<Ipv4Addr>,
}

/// A peer's state as reported to status and metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerStats {
    pub config: PeerConfig,
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
    tunn: Tunn,
    probe: ProbeState,
    tx_bytes: u64,
    rx_bytes: u64,
    tx_packets: u64,
    rx_packets: u64,
}

/// The sans-IO core.
pub struct WgCore {
    private: StaticSecret,
    public: PublicKey,
    peers: HashMap<u32, Peer>,
    by_key: HashMap<[u8; 32], u32>,
    /// Allowed prefixes, longest first, for the TUN → peer lookup.
    routes: Vec<(IpNetwork, u32)>,
    next_index: u32,
    drops: HashMap<DropReason, u64>,
    buf: Vec<u8>,
    /// Our own health-check address (probes are sent from it and answered on it).
    health_ip: Option<Ipv4Addr>,
}

impl std::fmt::Debug for WgCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgCore").field("peers", &self.peers.len()).finish_non_exhaustive()
    }
}

impl WgCore {
    #[must_use]
    pub fn new(private: StaticSecret) -> Self {
        let public = PublicKey::from(&private);
        Self {
            private,
            public,
            peers: HashMap::new(),
            by_key: HashMap::new(),
            routes: Vec::new(),
            next_index: 1,
            drops: HashMap::new(),
            buf: vec![0; BUF_SIZE],
            health_ip: None,
        }
    }

    /// Sets the local health-check address (inside the local cluster's prefixes).
    pub fn set_health_ip(&mut self, ip: Option<Ipv4Addr>) {
        self.health_ip = ip;
    }

    #[must_use]
    pub fn public_key(&self) -> WireGuardKey {
        WireGuardKey(self.public.to_bytes())
    }

    fn drop_packet(&mut self, reason: DropReason) {
        self.count_drops(reason, 1);
    }

    /// Counts `n` packets dropped for `reason` by the I/O around the core.
    pub fn count_drops(&mut self, reason: DropReason, n: u64) {
        *self.drops.entry(reason).or_default() += n;
    }

    #[must_use]
    pub fn drops(&self) -> Vec<(DropReason, u64)> {
        DropReason::ALL.iter().map(|r| (*r, self.drops.get(r).copied().unwrap_or(0))).collect()
    }

    fn rebuild_routes(&mut self) {
        self.routes =
            self.peers.iter().flat_map(|(idx, p)| p.config.allowed.iter().map(move |n| (*n, *idx))).collect();
        self.routes.sort_by_key(|r| std::cmp::Reverse(r.0.prefix()));
    }

    fn peer_for(&self, addr: IpAddr) -> Option<u32> {
        self.routes.iter().find(|(net, _)| net.contains(addr)).map(|(_, idx)| *idx)
    }

    /// Adds a peer, or updates it in place if the key is known (endpoint and allowed prefixes
    /// change without dropping the session). A new peer starts its handshake at once.
    pub fn upsert_peer(&mut self, config: PeerConfig, out: &mut impl Sink) {
        if let Some(idx) = self.by_key.get(&config.public_key.0).copied() {
            if let Some(p) = self.peers.get_mut(&idx)
                && p.config != config
            {
                info!(cluster = %config.cluster_id, endpoint = %config.endpoint, "peer updated");
                p.config = config;
                self.rebuild_routes();
            }
            return;
        }
        let idx = self.next_index;
        // Indices are 24 bits (boringtun puts a session counter in the low 8).
        self.next_index = (self.next_index % 0x00FF_FFFF) + 1;
        let tunn = Tunn::new(
            self.private.clone(),
            PublicKey::from(config.public_key.0),
            None,
            Some(PERSISTENT_KEEPALIVE_SECS),
            idx,
            None,
        );
        info!(cluster = %config.cluster_id, endpoint = %config.endpoint, key = %config.public_key, "peer added");
        self.by_key.insert(config.public_key.0, idx);
        let endpoint = config.endpoint;
        self.peers.insert(
            idx,
            Peer {
                config,
                tunn,
                probe: ProbeState::default(),
                tx_bytes: 0,
                rx_bytes: 0,
                tx_packets: 0,
                rx_packets: 0,
            },
        );
        self.rebuild_routes();
        let peer = self.peers.get_mut(&idx).expect("just inserted");
        if let TunnResult::WriteToNetwork(pkt) = peer.tunn.format_handshake_initiation(&mut self.buf, false) {
            out.udp(endpoint, pkt);
        }
    }

    /// Removes the peer with this key; returns whether it existed.
    pub fn remove_peer(&mut self, key: &WireGuardKey) -> bool {
        let Some(idx) = self.by_key.remove(&key.0) else { return false };
        if let Some(p) = self.peers.remove(&idx) {
            info!(cluster = %p.config.cluster_id, key = %key, "peer removed");
        }
        self.rebuild_routes();
        true
    }

    /// Peers as of `now`.
    #[must_use]
    pub fn peers(&self, now: Instant) -> Vec<PeerStats> {
        let mut v: Vec<PeerStats> = self
            .peers
            .values()
            .map(|p| PeerStats {
                config: p.config.clone(),
                last_handshake: p.tunn.stats().0,
                tx_bytes: p.tx_bytes,
                rx_bytes: p.rx_bytes,
                tx_packets: p.tx_packets,
                rx_packets: p.rx_packets,
                health: p.probe.health(now),
                rtt: p.probe.rtt(),
                loss: p.probe.loss(now),
                probed: self.probes_for(p),
            })
            .collect();
        v.sort_by(|a, b| a.config.cluster_id.cmp(&b.config.cluster_id));
        v
    }

    /// A packet read from the TUN device: encrypt it for the peer whose prefixes cover its
    /// destination.
    pub fn on_tun_packet(&mut self, packet: &[u8], out: &mut impl Sink) {
        let Some(dst) = Tunn::dst_address(packet) else {
            self.drop_packet(DropReason::InvalidPacket);
            return;
        };
        let Some(idx) = self.peer_for(dst) else {
            self.drop_packet(DropReason::NoPeerForDestination);
            return;
        };
        let peer = self.peers.get_mut(&idx).expect("routes point at live peers");
        let (buf, built) = workspace(out, &mut self.buf);
        let base = buf.as_ptr();
        let wire = match peer.tunn.encapsulate(packet, buf) {
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
        emit(out, &self.buf, built, Some(peer.config.endpoint), wire);
    }

    fn probes_for(&self, p: &Peer) -> bool {
        self.health_ip.is_some() && p.config.health_ip.is_some()
    }

    /// A datagram received on the cable's UDP socket at `now`.
    pub fn on_datagram(&mut self, src: SocketAddr, datagram: &[u8], now: Instant, out: &mut impl Sink) {
        let idx = match Tunn::parse_incoming_packet(datagram) {
            Ok(Packet::HandshakeInit(init)) => {
                match parse_handshake_anon(&self.private, &self.public, &init) {
                    Ok(half) => match self.by_key.get(&half.peer_static_public) {
                        Some(idx) => *idx,
                        None => {
                            self.drop_packet(DropReason::UnknownPeer);
                            return;
                        }
                    },
                    Err(_) => {
                        self.drop_packet(DropReason::InvalidPacket);
                        return;
                    }
                }
            }
            Ok(Packet::HandshakeResponse(p)) => p.receiver_idx >> 8,
            Ok(Packet::PacketCookieReply(p)) => p.receiver_idx >> 8,
            Ok(Packet::PacketData(p)) => p.receiver_idx >> 8,
            Err(_) => {
                self.drop_packet(DropReason::InvalidPacket);
                return;
            }
        };
        let Some(peer) = self.peers.get_mut(&idx) else {
            self.drop_packet(DropReason::UnknownPeer);
            return;
        };
        let mut dropped = None;
        let mut authenticated = false;
        let mut first = true;
        let mut answer = None;
        let local_health = self.health_ip;
        loop {
            let input: &[u8] = if first { datagram } else { &[] };
            first = false;
            let (buf, built) = workspace(out, &mut self.buf);
            let base = buf.as_ptr();
            let (pkt, inner_src) = match peer.tunn.decapsulate(Some(src.ip()), input, buf) {
                TunnResult::Done => break,
                TunnResult::Err(WireGuardError::DuplicateCounter) => break,
                TunnResult::Err(e) => {
                    debug!(cluster = %peer.config.cluster_id, error = ?e, "decapsulate failed");
                    dropped = Some(DropReason::InvalidPacket);
                    break;
                }
                TunnResult::WriteToNetwork(wire) => {
                    authenticated = true;
                    let wire = span(base, wire);
                    emit(out, &self.buf, built, Some(src), wire);
                    // Flush whatever was queued behind the handshake.
                    continue;
                }
                TunnResult::WriteToTunnelV4(pkt, addr) => (pkt, IpAddr::V4(addr)),
                TunnResult::WriteToTunnelV6(pkt, addr) => (pkt, IpAddr::V6(addr)),
            };
            authenticated = true;
            match Self::deliver(peer, local_health, now, inner_src, pkt) {
                Ok(Delivery::Tun) => {
                    let pkt = span(base, pkt);
                    emit(out, &self.buf, built, None, pkt);
                }
                Ok(Delivery::Answer(reply)) => answer = Some(reply),
                Ok(Delivery::Nothing) => {}
                Err(reason) => dropped = Some(reason),
            }
            break;
        }
        if authenticated && peer.config.endpoint != src {
            // Roaming: an authenticated packet tells us where the peer is now.
            info!(cluster = %peer.config.cluster_id, from = %peer.config.endpoint, to = %src, "peer endpoint moved");
            peer.config.endpoint = src;
        }
        if let Some(reply) = answer
            && let TunnResult::WriteToNetwork(wire) = peer.tunn.encapsulate(&reply, &mut self.buf)
        {
            out.udp(peer.config.endpoint, wire);
        }
        if let Some(r) = dropped {
            self.drop_packet(r);
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
                if !echo.reply {
                    return Ok(Delivery::Answer(echo.answer().to_packet()));
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

    /// Timer tick (every ~250 ms) at `now`: handshakes, rekeys, keepalives, expiry, probes.
    pub fn tick(&mut self, now: Instant, out: &mut impl Sink) {
        let local_health = self.health_ip;
        for peer in self.peers.values_mut() {
            // Probes only ride a live session: without one they would just queue.
            if let (Some(src), Some(dst)) = (local_health, peer.config.health_ip)
                && peer.tunn.stats().0.is_some_and(|age| age < SESSION_LIFETIME)
                && let Some(probe) = peer.probe.next(now, src, dst)
                && let TunnResult::WriteToNetwork(wire) =
                    peer.tunn.encapsulate(&probe.to_packet(), &mut self.buf)
            {
                out.udp(peer.config.endpoint, wire);
            }
            match peer.tunn.update_timers(&mut self.buf) {
                TunnResult::WriteToNetwork(wire) => out.udp(peer.config.endpoint, wire),
                TunnResult::Err(WireGuardError::ConnectionExpired) => {
                    debug!(cluster = %peer.config.cluster_id, "session expired");
                }
                TunnResult::Err(e) => debug!(cluster = %peer.config.cluster_id, error = ?e, "timer error"),
                _ => {}
            }
        }
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
                allowed: vec!["10.2.0.0/16".parse().unwrap()],
                health_ip: None,
            },
            &mut out,
        );
        let mut ignored = Vec::new();
        b.upsert_peer(
            PeerConfig {
                cluster_id: "a".into(),
                public_key: a.public_key(),
                endpoint: a_addr,
                allowed: vec!["10.1.0.0/16".parse().unwrap()],
                health_ip: None,
            },
            &mut ignored,
        );
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
            allowed: vec![net.parse().unwrap()],
            health_ip: Some(health.parse().unwrap()),
        };
        let mut ignored = Vec::new();
        p.a.upsert_peer(cfg("b", key_b, p.b_addr, "10.2.0.0/16", "10.2.0.0"), &mut ignored);
        p.b.upsert_peer(cfg("a", key_a, p.a_addr, "10.1.0.0/16", "10.1.0.0"), &mut ignored);
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
            allowed,
            health_ip: None,
        };
        p.a.upsert_peer(standby(vec![], &p), &mut ignored);
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
            allowed: vec!["10.1.0.0/16".parse().unwrap()],
            health_ip: Some("10.1.0.0".parse().unwrap()),
        };
        p.b.upsert_peer(to_a, &mut ignored);
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
        p.a.upsert_peer(standby(vec!["10.2.0.0/16".parse().unwrap()], &p), &mut ignored);
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
        assert_eq!(drops[&DropReason::InvalidPacket] + drops[&DropReason::UnknownPeer], 2);
    }

    #[test]
    fn handshake_from_a_stranger_is_refused() {
        let mut p = pump_ready();
        let mut stranger = WgCore::new(StaticSecret::random_from_rng(OsRng));
        let mut out = Vec::new();
        stranger.upsert_peer(
            PeerConfig {
                cluster_id: "a".into(),
                public_key: p.a.public_key(),
                endpoint: p.a_addr,
                allowed: vec!["10.1.0.0/16".parse().unwrap()],
                health_ip: None,
            },
            &mut out,
        );
        let Output::Udp(_, init) = &out[0] else { panic!() };
        let mut replies = Vec::new();
        p.a.on_datagram("172.31.0.99:51820".parse().unwrap(), init, Instant::now(), &mut replies);
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
}
