//! Every map name, key and value layout shared between Causeway's eBPF programs and userspace.
//!
//! `#![no_std]`, `#[repr(C)]`, no padding (flags are explicit integers, not `bool`), so the
//! kernel and userspace agree byte for byte; the layout tests at the bottom pin that down.
//! The `user` feature adds the `aya::Pod` impls.
#![no_std]
#![cfg_attr(feature = "user", allow(unsafe_code, reason = "aya::Pod is an unsafe marker trait"))]

/// Map names, as the loader looks them up in the object and as they are pinned.
pub mod maps {
    /// `LpmTrie<u32 (IPv4, network order), RemoteCidr>`: remote cluster prefixes.
    pub const REMOTE_CIDRS_V4: &str = "REMOTE_CIDRS_V4";
    /// `LpmTrie<[u8; 16] (IPv6), RemoteCidr>`: remote cluster prefixes.
    pub const REMOTE_CIDRS_V6: &str = "REMOTE_CIDRS_V6";
    /// `PerCpuHashMap<u32 cluster slot, TrafficCounters>`: per-remote-cluster traffic.
    pub const CLUSTER_COUNTERS: &str = "CLUSTER_COUNTERS";
    /// `PerCpuArray<u64>` indexed by [`super::Stat`]: datapath-wide counters.
    pub const STATS: &str = "STATS";
    /// `Array<u32>` indexed by [`super::Config`]: settings written by userspace.
    pub const CONFIG: &str = "CONFIG";
    /// `HashMap<u32 (IPv4, network order), u32>`: addresses of known peer gateways.
    pub const KNOWN_PEERS_V4: &str = "KNOWN_PEERS_V4";
    /// `HashMap<PeerSession, u32>`: (peer address, our session index for it) pairs a data
    /// message may carry; anything else dies in the guard.
    pub const PEER_SESSIONS_V4: &str = "PEER_SESSIONS_V4";
    /// `LruHashMap<u32 (IPv4, network order), HandshakeBucket>`: handshake rate per source.
    pub const HANDSHAKE_BUCKETS: &str = "HANDSHAKE_BUCKETS";
    /// `LpmTrie<u32 (IPv4, network order), u32 class>`: policy class of a source address.
    pub const POLICY_SRC_V4: &str = "POLICY_SRC_V4";
    /// `LpmTrie<u32 (IPv4, network order), u32 class>`: policy class of a destination address.
    pub const POLICY_DST_V4: &str = "POLICY_DST_V4";
    /// `HashMap<PolicyKey, PolicyVerdict>`: the compiled cluster-set policy.
    pub const POLICY_VERDICTS: &str = "POLICY_VERDICTS";
    /// `LruHashMap<FlowKey, u32>`: flows a policy allowed, so their replies pass too.
    pub const POLICY_FLOWS: &str = "POLICY_FLOWS";
    /// `PerCpuArray<u64>`: drops per policy rule index; the last slot counts the default.
    pub const POLICY_DROPS: &str = "POLICY_DROPS";
    /// `LpmTrie<u32 (IPv4, network order), NatPrefix>`: overlap mode, the local cluster's real
    /// prefixes → their global prefixes (sources leaving through the tunnel).
    pub const NAT_OUT_V4: &str = "NAT_OUT_V4";
    /// `LpmTrie<u32 (IPv4, network order), NatPrefix>`: overlap mode, the local cluster's
    /// global prefixes → its real ones (destinations arriving from the tunnel).
    pub const NAT_IN_V4: &str = "NAT_IN_V4";

    /// Every map above: the state a restart-safe gateway pins and finds again.
    pub const ALL: [&str; 15] = [
        REMOTE_CIDRS_V4,
        REMOTE_CIDRS_V6,
        CLUSTER_COUNTERS,
        STATS,
        CONFIG,
        KNOWN_PEERS_V4,
        PEER_SESSIONS_V4,
        HANDSHAKE_BUCKETS,
        POLICY_SRC_V4,
        POLICY_DST_V4,
        POLICY_VERDICTS,
        POLICY_FLOWS,
        POLICY_DROPS,
        NAT_OUT_V4,
        NAT_IN_V4,
    ];
}

/// Prefixes one translation map may hold (one per pod or service CIDR of the local cluster).
pub const MAX_NAT_PREFIXES: u32 = 1_024;

/// The value of the translation tries: where a matched prefix goes, address for address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatPrefix {
    /// The other side's network address (IPv4, network order).
    pub to: u32,
    /// The prefix length both sides share.
    pub prefix: u32,
}

/// Classes one compiled policy may hold per side. The tries hold twice as many: the policy
/// being installed sits next to the live one until the switch (see [`Config::PolicyState`]).
pub const MAX_POLICY_CLASSES: u32 = 262_144;
/// Verdict entries one compiled policy may hold (the table holds twice as many, as above).
pub const MAX_POLICY_VERDICTS: u32 = 1_048_576;
/// Bit 31 of a class id (in the tries' values and the verdict keys) names the generation of
/// the policy tables it belongs to, so both generations can share the maps.
pub const POLICY_GENERATION_BIT: u32 = 1 << 31;
/// [`Config::PolicyState`]: enforce the live generation's tables.
pub const POLICY_STATE_ENABLED: u32 = 1;
/// [`Config::PolicyState`]: deny what no rule decides (else allow).
pub const POLICY_STATE_DENY: u32 = 2;
/// [`Config::PolicyState`]: the live generation is 1 (else 0).
pub const POLICY_STATE_GENERATION: u32 = 4;

/// Key of the policy class tries: the generation (0 or 1, matched in full: the key's prefix
/// length is 32 + the address prefix length), then the IPv4 address in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyAddr {
    pub generation: u32,
    pub addr: u32,
}
/// Rules one compiled policy may hold; `POLICY_DROPS` has one more slot, for the default.
pub const MAX_POLICY_RULES: u32 = 131_072;
/// Flows remembered for replies (least recently used ones are forgotten).
pub const MAX_POLICY_FLOWS: u32 = 262_144;
/// `PolicyKey::proto`/`port` value meaning "any other".
pub const POLICY_ANY: u16 = 0;

/// Key of the verdict table: (source class, destination class, protocol, destination port).
/// The program looks up the exact port, then `port = 0` (any port no rule names for this
/// protocol), then `proto = 0, port = 0` (any protocol no rule names), then the default.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    pub src_class: u32,
    pub dst_class: u32,
    /// Host order; 0 = any.
    pub port: u16,
    /// IP protocol number; 0 = any.
    pub proto: u16,
}

/// `PolicyVerdict::action`.
pub const POLICY_ALLOW: u32 = 0;
pub const POLICY_DENY: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyVerdict {
    /// [`POLICY_ALLOW`] or [`POLICY_DENY`].
    pub action: u32,
    /// Index of the deciding rule (its slot in `POLICY_DROPS`).
    pub rule: u32,
}

/// A flow the policy allowed, as seen by the program (addresses and ports in network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    /// IP protocol number in the low byte; the rest zero.
    pub proto: u32,
}

/// Program names in the object.
pub mod programs {
    /// TC on the tunnel device's egress: traffic leaving for remote clusters.
    pub const TUNNEL_EGRESS: &str = "tunnel_egress";
    /// TC on the tunnel device's ingress: decrypted traffic from remote clusters.
    pub const TUNNEL_INGRESS: &str = "tunnel_ingress";
    /// XDP on the uplink: only well-formed WireGuard messages reach the WireGuard port.
    pub const UPLINK_GUARD: &str = "uplink_guard";
    /// The same guard as TC ingress, for uplinks where XDP costs more than it saves (a veth
    /// with an XDP program makes its peer segment every GSO run).
    pub const UPLINK_GUARD_TC: &str = "uplink_guard_tc";
    /// TC on an Ethernet device: the cluster-set policy without a tunnel device.
    pub const POLICY_ETH: &str = "policy_eth";
    /// TC ingress of a cluster-facing interface: remote-bound packets straight to the tunnel.
    pub const CLUSTER_REDIRECT: &str = "cluster_redirect";
}

/// Capacity of the known-peer map.
pub const MAX_PEERS: u32 = 16_384;
/// Sources tracked for handshake rate limiting (least recently used ones are forgotten).
pub const MAX_HANDSHAKE_SOURCES: u32 = 65_536;

/// Token bucket of one source's handshake initiations.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandshakeBucket {
    /// Tokens left, scaled by 1,000 (one initiation costs 1,000).
    pub tokens_milli: u64,
    /// `bpf_ktime_get_ns` of the last refill.
    pub last_ns: u64,
}

/// Capacity of the remote prefix tries (per address family).
pub const MAX_REMOTE_CIDRS: u32 = 65_536;
/// Capacity of the per-cluster counter map: the number of remote clusters one gateway tracks.
pub const MAX_CLUSTERS: u32 = 16_384;

/// Value of the remote prefix tries: which remote cluster a prefix belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct RemoteCidr {
    /// Gateway-local slot of the remote cluster (key of `CLUSTER_COUNTERS`).
    pub cluster_slot: u32,
    /// Interface index of the tunnel device that carries the prefix: where `cluster_redirect`
    /// sends its packets (0: leave them to the kernel's routing).
    pub tunnel: u32,
}

/// Key of `PEER_SESSIONS_V4`: a peer's address and the index of our session with it (the
/// receiver index of its data messages, without the low 8 bits boringtun rotates).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct PeerSession {
    /// IPv4, network order (as in the packet).
    pub addr: u32,
    /// 24-bit local peer index.
    pub index: u32,
}

/// Per-remote-cluster traffic, one copy per CPU; userspace sums the copies.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

impl TrafficCounters {
    /// Adds another CPU's copy (saturating: counters never wrap in practice, never panic).
    #[must_use]
    pub fn merged(self, other: Self) -> Self {
        Self {
            tx_packets: self.tx_packets.saturating_add(other.tx_packets),
            tx_bytes: self.tx_bytes.saturating_add(other.tx_bytes),
            rx_packets: self.rx_packets.saturating_add(other.rx_packets),
            rx_bytes: self.rx_bytes.saturating_add(other.rx_bytes),
        }
    }
}

/// Indices of the `STATS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Sent into the tunnel but no remote prefix matched the destination.
    TxNoRemote = 0,
    /// Received from the tunnel but no remote prefix matched the source.
    RxNoRemote = 1,
    /// A remote prefix matched but its cluster has no counter entry.
    NoCounterSlot = 2,
    /// Neither IPv4 nor IPv6, or too short to parse.
    Unparsed = 3,
    /// A SYN or SYN-ACK whose MSS option was lowered to fit the tunnel.
    MssClamped = 4,
    /// XDP: sent to the WireGuard port, but not a well-formed WireGuard message.
    XdpMalformed = 5,
    /// XDP: a data message from an address that is no known peer.
    XdpUnknownSource = 6,
    /// XDP: a handshake initiation over its source's rate.
    XdpHandshakeFlood = 7,
    /// XDP: a WireGuard message let through.
    XdpPassed = 8,
    /// Policy: a packet to a remote cluster denied (by a rule or the default).
    PolicyDeniedTx = 9,
    /// Policy: a decrypted packet from a remote cluster denied.
    PolicyDeniedRx = 10,
    /// Policy: a packet denied by the rules but let through as the reply of an allowed flow.
    PolicyReplyAllowed = 11,
    /// A packet from the cluster handed straight to its tunnel device (`cluster_redirect`).
    Redirected = 12,
    /// XDP: a data message from a known peer's address for a session index that is not that
    /// peer's (spoofed, or a session long gone).
    XdpUnknownSession = 13,
    /// Overlap mode: a packet leaving through the tunnel whose source (or, in an ICMP error,
    /// the embedded destination) was moved to its global prefix.
    TranslatedTx = 14,
    /// Overlap mode: a packet from the tunnel whose destination (or, in an ICMP error, the
    /// embedded source) was moved back to its real prefix.
    TranslatedRx = 15,
}

impl Stat {
    pub const ALL: [Stat; 16] = [
        Self::TxNoRemote,
        Self::RxNoRemote,
        Self::NoCounterSlot,
        Self::Unparsed,
        Self::MssClamped,
        Self::XdpMalformed,
        Self::XdpUnknownSource,
        Self::XdpHandshakeFlood,
        Self::XdpPassed,
        Self::PolicyDeniedTx,
        Self::PolicyDeniedRx,
        Self::PolicyReplyAllowed,
        Self::Redirected,
        Self::XdpUnknownSession,
        Self::TranslatedTx,
        Self::TranslatedRx,
    ];

    /// Name used in metrics and `show` output.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::TxNoRemote => "tx_no_remote",
            Self::RxNoRemote => "rx_no_remote",
            Self::NoCounterSlot => "no_counter_slot",
            Self::Unparsed => "unparsed",
            Self::MssClamped => "mss_clamped",
            Self::XdpMalformed => "xdp_malformed",
            Self::XdpUnknownSource => "xdp_unknown_source",
            Self::XdpHandshakeFlood => "xdp_handshake_flood",
            Self::XdpPassed => "xdp_passed",
            Self::PolicyDeniedTx => "policy_denied_tx",
            Self::PolicyDeniedRx => "policy_denied_rx",
            Self::PolicyReplyAllowed => "policy_reply_allowed",
            Self::Redirected => "redirected",
            Self::XdpUnknownSession => "xdp_unknown_session",
            Self::TranslatedTx => "translated_tx",
            Self::TranslatedRx => "translated_rx",
        }
    }
}

/// Indices of the `CONFIG` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Config {
    /// Largest TCP MSS for IPv4 through the tunnel (tunnel MTU − 40); 0 disables clamping.
    MssV4 = 0,
    /// Largest TCP MSS for IPv6 through the tunnel (tunnel MTU − 60); 0 disables clamping.
    MssV6 = 1,
    /// The cable's UDP port (host order); 0 disables the uplink guard.
    WireGuardPort = 2,
    /// Handshake initiations per second allowed per source (sustained).
    HandshakeRate = 3,
    /// Burst of handshake initiations allowed per source.
    HandshakeBurst = 4,
    /// The policy in one word, so that a program sees one whole policy or the other and never
    /// a mix: [`POLICY_STATE_ENABLED`] (0: nothing looked up), [`POLICY_STATE_DENY`] (the
    /// default verdict) and [`POLICY_STATE_GENERATION`] (which tables are live). Userspace
    /// fills the other generation's tables, then switches with one write of this word.
    PolicyState = 5,
    /// The STUN responder's IPv4 address (network order; 0: none): its binding answers may
    /// reach the WireGuard port.
    StunServer = 6,
    /// The STUN responder's UDP port (host order).
    StunPort = 7,
}

/// Number of entries of the `CONFIG` array.
pub const NUM_CONFIG: u32 = 8;

/// Number of entries of the `STATS` array.
pub const NUM_STATS: u32 = Stat::ALL.len() as u32;

/// Map names of the socket programs (`causeway-sockets`, loaded by the route agent and
/// attached to a cgroup): ClusterSetIPs translated at `connect()`/`sendmsg()`.
pub mod service_maps {
    /// `HashMap<ServiceKey, ServiceBackends>`: a ClusterSetIP port and its backends.
    pub const SERVICES_V4: &str = "SERVICES_V4";
    /// `LruHashMap<ReverseKey, ServiceAddr>`: (socket, backend) → the ClusterSetIP it was
    /// asked for, so replies and `getpeername()` show the address the application used.
    pub const SERVICE_REVERSE_V4: &str = "SERVICE_REVERSE_V4";
    /// `PerCpuArray<u64>` indexed by [`super::ServiceStat`].
    pub const SERVICE_STATS: &str = "SERVICE_STATS";

    /// Every map above: what the socket programs pin and a restart finds again.
    pub const ALL: [&str; 3] = [SERVICES_V4, SERVICE_REVERSE_V4, SERVICE_STATS];
}

/// Most backends one ClusterSetIP port may have (one per cluster serving it, usually). A power
/// of two: the program masks its index with it.
pub const MAX_SERVICE_BACKENDS: usize = 32;
const _: () = assert!(MAX_SERVICE_BACKENDS.is_power_of_two());
/// ClusterSetIP ports the map holds.
pub const MAX_SERVICE_PORTS: u32 = 65_536;
/// (socket, backend) pairs remembered for reverse translation.
pub const MAX_SERVICE_REVERSE: u32 = 262_144;

/// A ClusterSetIP port: the key of `SERVICES_V4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ServiceKey {
    /// IPv4, network order.
    pub addr: u32,
    /// Network order.
    pub port: u16,
    /// IPPROTO_TCP (6) or IPPROTO_UDP (17).
    pub proto: u8,
    pub pad: u8,
}

/// An address and port (both network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceAddr {
    pub addr: u32,
    pub port: u16,
    pub pad: u16,
}

/// The backends of a ClusterSetIP port, as the node should use them now (reachable clusters
/// only, the local cluster alone when preferred). `count == 0`: refuse the connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceBackends {
    pub count: u32,
    pub pad: u32,
    pub backends: [ServiceAddr; MAX_SERVICE_BACKENDS],
}

impl Default for ServiceBackends {
    fn default() -> Self {
        Self { count: 0, pad: 0, backends: [ServiceAddr::default(); MAX_SERVICE_BACKENDS] }
    }
}

/// The key of `SERVICE_REVERSE_V4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ReverseKey {
    pub cookie: u64,
    pub backend: ServiceAddr,
}

/// Counters of the socket programs.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceStat {
    /// Connections (and unconnected datagrams) sent to a backend.
    Translated = 0,
    /// Refused: the ClusterSetIP port had no backend (every serving cluster unreachable).
    NoBackend = 1,
    /// Replies and `getpeername()` answers given the ClusterSetIP back.
    Reversed = 2,
}

impl ServiceStat {
    pub const ALL: [ServiceStat; 3] =
        [ServiceStat::Translated, ServiceStat::NoBackend, ServiceStat::Reversed];
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: as below.
    unsafe impl aya::Pod for super::ServiceKey {}
    // SAFETY: as below.
    unsafe impl aya::Pod for super::ServiceAddr {}
    // SAFETY: as below.
    unsafe impl aya::Pod for super::ServiceBackends {}
    // SAFETY: as below.
    unsafe impl aya::Pod for super::ReverseKey {}
    // SAFETY: #[repr(C)], only integer fields, no padding (asserted in the tests below).
    unsafe impl aya::Pod for super::RemoteCidr {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TrafficCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::HandshakeBucket {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PolicyKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PolicyAddr {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PolicyVerdict {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PeerSession {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NatPrefix {}
}

#[cfg(test)]
mod tests {
    use core::mem::{offset_of, size_of};

    use super::*;

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(size_of::<RemoteCidr>(), 8);
        assert_eq!(size_of::<NatPrefix>(), 8);
        assert_eq!(offset_of!(RemoteCidr, tunnel), 4);
        assert_eq!(size_of::<TrafficCounters>(), 32);
        assert_eq!(offset_of!(TrafficCounters, tx_bytes), 8);
        assert_eq!(offset_of!(TrafficCounters, rx_packets), 16);
        assert_eq!(offset_of!(TrafficCounters, rx_bytes), 24);
        assert_eq!(size_of::<HandshakeBucket>(), 16);
        assert_eq!(offset_of!(HandshakeBucket, last_ns), 8);
        assert_eq!(size_of::<PolicyKey>(), 12);
        assert_eq!(offset_of!(PolicyKey, dst_class), 4);
        assert_eq!(offset_of!(PolicyKey, port), 8);
        assert_eq!(offset_of!(PolicyKey, proto), 10);
        assert_eq!(size_of::<PolicyVerdict>(), 8);
        assert_eq!(size_of::<FlowKey>(), 16);
        assert_eq!(offset_of!(FlowKey, sport), 8);
        assert_eq!(offset_of!(FlowKey, proto), 12);
        assert_eq!(size_of::<PeerSession>(), 8);
        assert_eq!(size_of::<PolicyAddr>(), 8);
        assert_eq!(offset_of!(PolicyAddr, addr), 4);
        assert_eq!(offset_of!(PeerSession, index), 4);
        assert_eq!(size_of::<ServiceKey>(), 8);
        assert_eq!(offset_of!(ServiceKey, port), 4);
        assert_eq!(offset_of!(ServiceKey, proto), 6);
        assert_eq!(size_of::<ServiceAddr>(), 8);
        assert_eq!(size_of::<ServiceBackends>(), 8 + 8 * MAX_SERVICE_BACKENDS);
        assert_eq!(offset_of!(ServiceBackends, backends), 8);
        assert_eq!(size_of::<ReverseKey>(), 16);
        assert_eq!(offset_of!(ReverseKey, backend), 8);
    }

    #[test]
    fn stat_indices_are_dense() {
        for (i, s) in Stat::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i);
        }
        assert_eq!(NUM_STATS, 16);
        assert_eq!(Config::StunPort as u32 + 1, NUM_CONFIG);
    }

    #[test]
    fn merged_sums_and_saturates() {
        let a = TrafficCounters { tx_packets: 1, tx_bytes: u64::MAX, rx_packets: 3, rx_bytes: 4 };
        let b = TrafficCounters { tx_packets: 2, tx_bytes: 5, rx_packets: 0, rx_bytes: 6 };
        let m = a.merged(b);
        assert_eq!(m, TrafficCounters { tx_packets: 3, tx_bytes: u64::MAX, rx_packets: 3, rx_bytes: 10 });
    }
}
