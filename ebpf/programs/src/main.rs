//! Causeway's TC programs on the gateway's tunnel device.
//!
//! The tunnel device is a layer-3 TUN: packets start at the IP header. `tunnel_egress` sees
//! what the gateway sends to remote clusters, `tunnel_ingress` what it received from them
//! (already decrypted). Both first check the cluster-set policy (IPv4: two LPM lookups give the
//! source and destination classes, then at most three hash lookups give the verdict — the cost
//! does not grow with the number of rules; replies of allowed flows pass), then look the
//! remote address up in the remote-prefix tries and count packets and bytes per remote
//! cluster, and clamp the MSS of SYNs.
//!
//! `cluster_redirect` sits on the gateway's cluster-facing interfaces (TC ingress, Ethernet):
//! a packet for a remote cluster's prefix is handed straight to that prefix's tunnel device
//! (`bpf_redirect`), past the kernel's forwarding path (route lookup, netfilter, conntrack),
//! with its TTL lowered as a router would; the tunnel device's egress program then applies the
//! policy and counts it as it does for routed packets. Whatever it cannot do exactly as the
//! stack would (TTL expiring, larger than the tunnel MTU, not plain IPv4/IPv6) it leaves to
//! the stack.
//!
//! `uplink_guard` (XDP, or `uplink_guard_tc` at TC ingress where XDP costs more than it saves)
//! lets only well-formed WireGuard messages from known peers, and rate-limited handshakes,
//! reach the WireGuard port.
//!
//! No logging on the fast path: only the rare "no remote prefix matched" event is logged
//! (aya-log), and counted.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        TC_ACT_OK, TC_ACT_SHOT, bpf_check_mtu_flags::BPF_MTU_CHK_SEGS,
        bpf_check_mtu_ret::BPF_MTU_CHK_RET_SUCCESS, xdp_action,
    },
    helpers::{bpf_check_mtu, bpf_ktime_get_ns, bpf_redirect},
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, lpm_trie::Key},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::warn;
use causeway_datapath_common::{
    Config, FlowKey, HandshakeBucket, MAX_CLUSTERS, MAX_HANDSHAKE_SOURCES, MAX_PEERS, MAX_POLICY_CLASSES,
    MAX_POLICY_FLOWS, MAX_POLICY_RULES, MAX_POLICY_VERDICTS, MAX_REMOTE_CIDRS, NUM_CONFIG, NUM_STATS,
    POLICY_ALLOW, POLICY_DENY, POLICY_GENERATION_BIT, POLICY_STATE_DENY, POLICY_STATE_ENABLED,
    POLICY_STATE_GENERATION, PeerSession, PolicyAddr, PolicyKey, PolicyVerdict, RemoteCidr, Stat,
    TrafficCounters,
};

#[map]
static REMOTE_CIDRS_V4: LpmTrie<u32, RemoteCidr> =
    LpmTrie::with_max_entries(MAX_REMOTE_CIDRS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map]
static REMOTE_CIDRS_V6: LpmTrie<[u8; 16], RemoteCidr> =
    LpmTrie::with_max_entries(MAX_REMOTE_CIDRS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map]
static CLUSTER_COUNTERS: PerCpuHashMap<u32, TrafficCounters> =
    PerCpuHashMap::with_max_entries(MAX_CLUSTERS, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_STATS, 0);

#[map]
static CONFIG: Array<u32> = Array::with_max_entries(NUM_CONFIG, 0);

#[map]
static KNOWN_PEERS_V4: HashMap<u32, u32> = HashMap::with_max_entries(MAX_PEERS, 0);

#[map]
static PEER_SESSIONS_V4: HashMap<PeerSession, u32> = HashMap::with_max_entries(MAX_PEERS, 0);

#[map]
static HANDSHAKE_BUCKETS: LruHashMap<u32, HandshakeBucket> =
    LruHashMap::with_max_entries(MAX_HANDSHAKE_SOURCES, 0);

// The policy tables hold two generations (the live one and the one being installed), hence
// twice a policy's size; allocated as used.
#[map]
static POLICY_SRC_V4: LpmTrie<PolicyAddr, u32> =
    LpmTrie::with_max_entries(2 * MAX_POLICY_CLASSES, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map]
static POLICY_DST_V4: LpmTrie<PolicyAddr, u32> =
    LpmTrie::with_max_entries(2 * MAX_POLICY_CLASSES, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map]
static POLICY_VERDICTS: HashMap<PolicyKey, PolicyVerdict> =
    HashMap::with_max_entries(2 * MAX_POLICY_VERDICTS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map]
static POLICY_FLOWS: LruHashMap<FlowKey, u32> = LruHashMap::with_max_entries(MAX_POLICY_FLOWS, 0);

#[map]
static POLICY_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_POLICY_RULES + 1, 0);

#[inline(always)]
fn config(c: Config) -> u32 {
    CONFIG.get(c as u32).copied().unwrap_or(0)
}

/// A frame the uplink guard can judge: XDP's, or a socket buffer's at TC.
trait Frame {
    fn start(&self) -> usize;
    /// End of the directly readable bytes.
    fn end(&self) -> usize;
    /// The whole frame's length (a socket buffer's may lie partly outside the readable bytes).
    fn len(&self) -> usize;
    /// The size of each datagram when the frame is a run of them (a UDP GSO socket buffer).
    fn segment(&self) -> Option<usize>;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn len(&self) -> usize {
        self.data_end() - self.data()
    }
    #[inline(always)]
    fn segment(&self) -> Option<usize> {
        None
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn len(&self) -> usize {
        self.skb.len() as usize
    }
    #[inline(always)]
    fn segment(&self) -> Option<usize> {
        // SAFETY: reads a field of the program's own __sk_buff.
        let gso = unsafe { (*self.skb.skb).gso_size };
        (gso > 0).then_some(gso as usize)
    }
}

/// Bounds-checked pointer into the readable part of a frame.
#[inline(always)]
fn ptr_at<T>(ctx: &impl Frame, offset: usize) -> Option<*const T> {
    let start = ctx.start();
    let end = ctx.end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

const ETH_HDR: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_UDP: u8 = 17;

/// XDP on the gateway's uplink: traffic to the WireGuard port must be a well-formed WireGuard
/// message; data messages must come from a known peer; handshake initiations are rate-limited
/// per source. Everything else on the uplink passes untouched. Drops cost no syscall.
#[xdp]
pub fn uplink_guard(ctx: XdpContext) -> u32 {
    match guard(&ctx) {
        Verdict::NotOurs => xdp_action::XDP_PASS,
        Verdict::Drop(stat) => {
            bump(stat);
            xdp_action::XDP_DROP
        }
        Verdict::Accept => {
            bump(Stat::XdpPassed);
            xdp_action::XDP_PASS
        }
    }
}

/// The uplink guard at TC ingress (see [`uplink_guard`]), for uplinks where XDP would cost
/// more than it saves. A GSO run of datagrams is judged by its first one.
#[classifier]
pub fn uplink_guard_tc(ctx: TcContext) -> i32 {
    // Headers first in the readable part (a no-op for the usual linear frame).
    let _ = ctx.pull_data(GUARD_HEADERS);
    match guard(&ctx) {
        Verdict::NotOurs => TC_ACT_OK,
        Verdict::Drop(stat) => {
            bump(stat);
            TC_ACT_SHOT
        }
        Verdict::Accept => {
            bump(Stat::XdpPassed);
            TC_ACT_OK
        }
    }
}

/// Ethernet, the longest IPv4 header, UDP and the WireGuard message type.
const GUARD_HEADERS: u32 = (ETH_HDR + 60 + 8 + 4) as u32;

enum Verdict {
    /// Not for the WireGuard port (or not parseable as such): not our business.
    NotOurs,
    /// A well-formed WireGuard message from an acceptable source.
    Accept,
    Drop(Stat),
}

#[inline(always)]
fn guard(ctx: &impl Frame) -> Verdict {
    let port = config(Config::WireGuardPort);
    if port == 0 {
        return Verdict::NotOurs;
    }
    let Some(ethertype) = ptr_at::<u16>(ctx, 12) else { return Verdict::NotOurs };
    // SAFETY: bounds-checked by ptr_at.
    if u16::from_be(unsafe { core::ptr::read_unaligned(ethertype) }) != ETH_P_IP {
        return Verdict::NotOurs;
    }
    let Some(vihl) = ptr_at::<u8>(ctx, ETH_HDR) else { return Verdict::NotOurs };
    // SAFETY: bounds-checked.
    let ihl = usize::from(unsafe { *vihl } & 0x0f) * 4;
    let Some(proto) = ptr_at::<u8>(ctx, ETH_HDR + 9) else { return Verdict::NotOurs };
    // SAFETY: bounds-checked.
    if unsafe { *proto } != IPPROTO_UDP || ihl < 20 {
        return Verdict::NotOurs;
    }
    let Some(frag) = ptr_at::<u16>(ctx, ETH_HDR + 6) else { return Verdict::NotOurs };
    // SAFETY: bounds-checked. Non-first fragments carry no UDP header: leave them to the kernel.
    if u16::from_be(unsafe { core::ptr::read_unaligned(frag) }) & 0x1fff != 0 {
        return Verdict::NotOurs;
    }
    let Some(saddr) = ptr_at::<u32>(ctx, ETH_HDR + 12) else { return Verdict::NotOurs };
    // SAFETY: bounds-checked; the raw network-order word is the map key.
    let src = unsafe { core::ptr::read_unaligned(saddr) };
    let udp = ETH_HDR + ihl;
    let Some(dport) = ptr_at::<u16>(ctx, udp + 2) else { return Verdict::NotOurs };
    // SAFETY: bounds-checked.
    if u32::from(u16::from_be(unsafe { core::ptr::read_unaligned(dport) })) != port {
        return Verdict::NotOurs;
    }
    let Some(ulen) = ptr_at::<u16>(ctx, udp + 4) else { return Verdict::Drop(Stat::XdpMalformed) };
    // SAFETY: bounds-checked.
    let udp_len = usize::from(u16::from_be(unsafe { core::ptr::read_unaligned(ulen) })).saturating_sub(8);
    // The first 8 bytes of every message: type (first byte), three reserved zero bytes, then
    // (data messages) the receiver index. One bounds check for both: the verifier does not
    // follow a second one at a variable offset.
    let Some(first8) = ptr_at::<u64>(ctx, udp + 8) else { return Verdict::Drop(Stat::XdpMalformed) };
    // SAFETY: bounds-checked.
    let first8 = u64::from_le(unsafe { core::ptr::read_unaligned(first8) });
    // The low and the high 32 bits (truncation on purpose).
    let (head, receiver) = (first8 as u32, (first8 >> 32) as u32);
    // The UDP length must not claim more than the frame holds.
    if udp + 8 + udp_len > ctx.len() {
        return Verdict::Drop(Stat::XdpMalformed);
    }
    // A run's header counts all its datagrams; the first one is what the type must match.
    let len = ctx.segment().unwrap_or(udp_len);
    match (head, len) {
        // Every handshake message shares the source's budget: responses and cookie replies
        // (which move no peer but do cost the cable a MAC check and a wake-up) as well.
        (1, 148) | (2, 92) | (3, 64) => handshake_allowed(src),
        // Header (16) + tag (16) at least. Padding to 16 bytes is a sender "should" that
        // boringtun does not follow, so no multiple-of-16 rule.
        (4, l) if l >= 32 => {
            // The low 8 bits are the session slot boringtun rotates; the rest is our index.
            let index = receiver >> 8;
            // SAFETY: plain map lookups.
            if unsafe { PEER_SESSIONS_V4.get(&PeerSession { addr: src, index }) }.is_some() {
                Verdict::Accept
            } else if unsafe { KNOWN_PEERS_V4.get(&src) }.is_some() {
                // From where a peer is, but not for that peer's session: spoofed.
                Verdict::Drop(Stat::XdpUnknownSession)
            } else {
                Verdict::Drop(Stat::XdpUnknownSource)
            }
        }
        _ => Verdict::Drop(Stat::XdpMalformed),
    }
}

/// Token bucket per source address: `HandshakeRate` per second, bursts of `HandshakeBurst`.
#[inline(always)]
fn handshake_allowed(src: u32) -> Verdict {
    let rate = u64::from(config(Config::HandshakeRate));
    let burst = u64::from(config(Config::HandshakeBurst));
    if rate == 0 || burst == 0 {
        return Verdict::Accept;
    }
    let cap = burst * 1000;
    // SAFETY: reads the monotonic clock.
    let now = unsafe { bpf_ktime_get_ns() };
    match HANDSHAKE_BUCKETS.get_ptr_mut(&src) {
        Some(b) => {
            // SAFETY: the map value lives as long as this program run; races between CPUs only
            // make the limit approximate.
            let b = unsafe { &mut *b };
            let refill = now.saturating_sub(b.last_ns) / 1_000 * rate / 1_000;
            b.tokens_milli = (b.tokens_milli + refill).min(cap);
            b.last_ns = now;
            if b.tokens_milli >= 1000 {
                b.tokens_milli -= 1000;
                Verdict::Accept
            } else {
                Verdict::Drop(Stat::XdpHandshakeFlood)
            }
        }
        None => {
            let _ = HANDSHAKE_BUCKETS.insert(
                &src,
                &HandshakeBucket { tokens_milli: cap - 1000, last_ns: now },
                0,
            );
            Verdict::Accept
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Leaving through the tunnel: the remote address is the destination.
    Tx,
    /// Arriving from the tunnel: the remote address is the source.
    Rx,
}

#[inline(always)]
fn bump(stat: Stat) {
    if let Some(p) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

#[classifier]
pub fn tunnel_egress(ctx: TcContext) -> i32 {
    if !policy_allows(&ctx, 0) {
        bump(Stat::PolicyDeniedTx);
        return TC_ACT_SHOT;
    }
    count(&ctx, Direction::Tx);
    clamp_mss(&ctx);
    TC_ACT_OK
}

#[classifier]
pub fn tunnel_ingress(ctx: TcContext) -> i32 {
    if !policy_allows(&ctx, 0) {
        bump(Stat::PolicyDeniedRx);
        return TC_ACT_SHOT;
    }
    count(&ctx, Direction::Rx);
    clamp_mss(&ctx);
    TC_ACT_OK
}

const ETH_P_IPV6: u16 = 0x86dd;

/// TC ingress of a cluster-facing interface: packets for remote prefixes go straight to their
/// tunnel device.
#[classifier]
pub fn cluster_redirect(ctx: TcContext) -> i32 {
    match redirect_target(&ctx) {
        Some(ifindex) => {
            bump(Stat::Redirected);
            // SAFETY: a helper call with plain integer arguments.
            let r = unsafe { bpf_redirect(ifindex, 0) };
            i32::try_from(r).unwrap_or(TC_ACT_OK)
        }
        None => TC_ACT_OK,
    }
}

/// The tunnel to redirect this frame to (TTL already lowered), or `None` to leave it to the
/// stack.
#[inline(always)]
fn redirect_target(ctx: &TcContext) -> Option<u32> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    let l3 = ETH_HDR;
    let (remote, ttl_off, l3_len) = match ethertype {
        ETH_P_IP => {
            let first = ctx.load::<u8>(l3).ok()?;
            if first >> 4 != 4 {
                return None;
            }
            let daddr = ctx.load::<u32>(l3 + 16).ok()?;
            let remote = REMOTE_CIDRS_V4.get(&Key::new(32, daddr)).copied()?;
            let total = u32::from(u16::from_be(ctx.load::<u16>(l3 + 2).ok()?));
            // A header that lies about its lengths is the stack's to drop, not ours to carry.
            if u32::from(first & 0x0f) < 5 || total < u32::from(first & 0x0f) * 4 {
                return None;
            }
            (remote, l3 + 8, total)
        }
        ETH_P_IPV6 => {
            let first = ctx.load::<u8>(l3).ok()?;
            if first >> 4 != 6 {
                return None;
            }
            let daddr = ctx.load::<[u8; 16]>(l3 + 24).ok()?;
            let remote = REMOTE_CIDRS_V6.get(&Key::new(128, daddr)).copied()?;
            let payload = u32::from(u16::from_be(ctx.load::<u16>(l3 + 4).ok()?));
            // Zero: a jumbogram (hop-by-hop option), left to the stack.
            if payload == 0 {
                return None;
            }
            (remote, l3 + 7, 40 + payload)
        }
        _ => return None,
    };
    if remote.tunnel == 0 || ETH_HDR as u32 + l3_len > ctx.len() {
        return None;
    }
    let ttl = ctx.load::<u8>(ttl_off).ok()?;
    // An expiring TTL needs an ICMP "time exceeded" from this router: the stack's job.
    if ttl <= 1 {
        return None;
    }
    if !fits_tunnel(ctx, remote.tunnel, l3_len) {
        return None;
    }
    if ethertype == ETH_P_IP {
        // TTL and protocol share a 16-bit word of the header checksum.
        let old = ctx.load::<u16>(ttl_off).ok()?;
        let new = u16::from_be(old).wrapping_sub(0x100).to_be();
        ctx.l3_csum_replace(l3 + 10, u64::from(old), u64::from(new), 2).ok()?;
        ctx.store(ttl_off, &new, 0).ok()?;
    } else {
        ctx.store(ttl_off, &(ttl - 1), 0).ok()?;
    }
    Some(remote.tunnel)
}

/// Whether the packet (IP length `l3_len`; for GSO packets every segment) fits the tunnel
/// device's MTU. Too big: the stack fragments it or sends "fragmentation needed".
#[inline(always)]
fn fits_tunnel(ctx: &TcContext, ifindex: u32, l3_len: u32) -> bool {
    // SAFETY: reading a field of the context's own __sk_buff.
    let gso = unsafe { (*ctx.skb.skb).gso_segs } > 1;
    let (mut len, flags) = if gso { (0, u64::from(BPF_MTU_CHK_SEGS)) } else { (l3_len, 0) };
    // SAFETY: the context pointer is the program's own; `len` lives across the call.
    let r = unsafe { bpf_check_mtu(ctx.skb.skb.cast(), ifindex, &raw mut len, 0, flags) };
    r == i64::from(BPF_MTU_CHK_RET_SUCCESS)
}

/// The cluster-set policy on an Ethernet device (TC, either direction): the same verdicts as
/// on the tunnel, for forwarding paths without a tunnel device (the policy benchmark's
/// routed path; non-IPv4 frames pass).
#[classifier]
pub fn policy_eth(ctx: TcContext) -> i32 {
    match ctx.load::<u16>(12) {
        Ok(t) if u16::from_be(t) == ETH_P_IP => {}
        _ => return TC_ACT_OK,
    }
    if policy_allows(&ctx, ETH_HDR) {
        TC_ACT_OK
    } else {
        bump(Stat::PolicyDeniedTx);
        TC_ACT_SHOT
    }
}

const IPPROTO_UDP_TC: u8 = 17;

/// The cluster-set policy's verdict on the IP packet at offset `l3`; counts denies per rule.
#[inline(always)]
fn policy_allows(ctx: &TcContext, l3: usize) -> bool {
    // One read: the packet is judged by one whole generation of the tables.
    let state = config(Config::PolicyState);
    if state & POLICY_STATE_ENABLED == 0 {
        return true;
    }
    let default = if state & POLICY_STATE_DENY != 0 { POLICY_DENY } else { POLICY_ALLOW };
    let generation = u32::from(state & POLICY_STATE_GENERATION != 0);
    let tag = if generation == 1 { POLICY_GENERATION_BIT } else { 0 };
    let Ok(first) = ctx.load::<u8>(l3) else { return decide_default(default) };
    if first >> 4 != 4 {
        // IPv6 has no policy classes yet: the default action decides.
        return decide_default(default);
    }
    let (Ok(proto), Ok(saddr), Ok(daddr), Ok(frag)) =
        (ctx.load::<u8>(l3 + 9), ctx.load::<u32>(l3 + 12), ctx.load::<u32>(l3 + 16), ctx.load::<u16>(l3 + 6))
    else {
        return decide_default(default);
    };
    let l4 = l3 + usize::from(first & 0x0f) * 4;
    // Ports only where there is a transport header: TCP/UDP, first fragment.
    let (sport, dport) =
        if (proto == IPPROTO_TCP || proto == IPPROTO_UDP_TC) && u16::from_be(frag) & 0x1fff == 0 {
            (ctx.load::<u16>(l4).unwrap_or(0), ctx.load::<u16>(l4 + 2).unwrap_or(0))
        } else {
            (0, 0)
        };
    let src_class =
        POLICY_SRC_V4.get(&Key::new(64, PolicyAddr { generation, addr: saddr })).copied().unwrap_or(tag);
    let dst_class =
        POLICY_DST_V4.get(&Key::new(64, PolicyAddr { generation, addr: daddr })).copied().unwrap_or(tag);
    let mut key = PolicyKey { src_class, dst_class, port: u16::from_be(dport), proto: u16::from(proto) };
    // SAFETY (the three lookups): map values are plain old data, copied out at once.
    let mut verdict = unsafe { POLICY_VERDICTS.get(&key) }.copied();
    if verdict.is_none() {
        key.port = 0;
        verdict = unsafe { POLICY_VERDICTS.get(&key) }.copied();
    }
    if verdict.is_none() {
        key.proto = 0;
        verdict = unsafe { POLICY_VERDICTS.get(&key) }.copied();
    }
    let flow = FlowKey { saddr, daddr, sport, dport, proto: u32::from(proto) };
    let (action, rule) = match verdict {
        Some(v) => (v.action, v.rule),
        None => (default, MAX_POLICY_RULES),
    };
    if action == POLICY_ALLOW {
        // Remember the flow so its replies pass even where the reverse direction is denied.
        if POLICY_FLOWS.get_ptr(&flow).is_none() {
            let _ = POLICY_FLOWS.insert(&flow, &1, 0);
        }
        return true;
    }
    let reply = FlowKey { saddr: daddr, daddr: saddr, sport: dport, dport: sport, proto: u32::from(proto) };
    if POLICY_FLOWS.get_ptr(&reply).is_some() {
        bump(Stat::PolicyReplyAllowed);
        return true;
    }
    // An ICMP error about a packet of an allowed flow (unreachable, fragmentation needed,
    // time exceeded, parameter problem) belongs to that flow: path MTU discovery must work.
    if proto == IPPROTO_ICMP && u16::from_be(frag) & 0x1fff == 0 && icmp_error_of_allowed_flow(ctx, l4) {
        bump(Stat::PolicyReplyAllowed);
        return true;
    }
    if let Some(p) = POLICY_DROPS.get_ptr_mut(rule.min(MAX_POLICY_RULES)) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
    false
}

const IPPROTO_ICMP: u8 = 1;

/// Whether the ICMP message at `l4` is an error quoting a packet of a flow the policy allowed.
#[inline(always)]
fn icmp_error_of_allowed_flow(ctx: &TcContext, l4: usize) -> bool {
    let Ok(kind) = ctx.load::<u8>(l4) else { return false };
    if !matches!(kind, 3 | 11 | 12) {
        return false;
    }
    let inner = l4 + 8;
    let (Ok(first), Ok(proto), Ok(saddr), Ok(daddr)) = (
        ctx.load::<u8>(inner),
        ctx.load::<u8>(inner + 9),
        ctx.load::<u32>(inner + 12),
        ctx.load::<u32>(inner + 16),
    ) else {
        return false;
    };
    if first >> 4 != 4 {
        return false;
    }
    let inner_l4 = inner + usize::from(first & 0x0f) * 4;
    let (sport, dport) = if proto == IPPROTO_TCP || proto == IPPROTO_UDP_TC {
        (ctx.load::<u16>(inner_l4).unwrap_or(0), ctx.load::<u16>(inner_l4 + 2).unwrap_or(0))
    } else {
        (0, 0)
    };
    let quoted = FlowKey { saddr, daddr, sport, dport, proto: u32::from(proto) };
    POLICY_FLOWS.get_ptr(&quoted).is_some()
}

#[inline(always)]
fn decide_default(default: u32) -> bool {
    if default == POLICY_ALLOW {
        return true;
    }
    if let Some(p) = POLICY_DROPS.get_ptr_mut(MAX_POLICY_RULES) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
    false
}

const IPPROTO_TCP: u8 = 6;
/// `BPF_F_PSEUDO_HDR` is not needed: the MSS is not part of the pseudo-header. Low bits: size.
const CSUM_SIZE_2: u64 = 2;

/// Lowers the MSS option of SYN and SYN-ACK segments crossing the tunnel (both directions, so
/// both ends learn it), so TCP fits the tunnel even where ICMP "fragmentation needed" is lost.
#[inline(always)]
fn clamp_mss(ctx: &TcContext) {
    let _ = try_clamp_mss(ctx);
}

#[inline(always)]
fn try_clamp_mss(ctx: &TcContext) -> Result<(), i64> {
    let first = ctx.load::<u8>(0)?;
    let (l4, cfg) = match first >> 4 {
        4 => {
            if ctx.load::<u8>(9)? != IPPROTO_TCP {
                return Ok(());
            }
            // Only first fragments carry the TCP header.
            if u16::from_be(ctx.load::<u16>(6)?) & 0x1fff != 0 {
                return Ok(());
            }
            (usize::from(first & 0x0f) * 4, Config::MssV4)
        }
        // IPv6 without extension headers (a SYN with extension headers keeps its MSS).
        6 if ctx.load::<u8>(6)? == IPPROTO_TCP => (40, Config::MssV6),
        _ => return Ok(()),
    };
    let max = match CONFIG.get(cfg as u32) {
        Some(m) if *m != 0 => *m,
        _ => return Ok(()),
    };
    if ctx.load::<u8>(l4 + 13)? & 0x02 == 0 {
        return Ok(()); // not SYN
    }
    let doff = usize::from(ctx.load::<u8>(l4 + 12)? >> 4) * 4;
    let mut off = 20;
    // At most 40 bytes of options: at most 40 steps.
    for _ in 0..40 {
        if off + 4 > doff {
            break;
        }
        match ctx.load::<u8>(l4 + off)? {
            0 => break,
            1 => off += 1,
            2 => {
                let old = ctx.load::<u16>(l4 + off + 2)?;
                if u32::from(u16::from_be(old)) > max {
                    let new = (max as u16).to_be();
                    ctx.store(l4 + off + 2, &new, 0)?;
                    ctx.l4_csum_replace(l4 + 16, u64::from(old), u64::from(new), CSUM_SIZE_2)?;
                    bump(Stat::MssClamped);
                }
                break;
            }
            _ => {
                let len = usize::from(ctx.load::<u8>(l4 + off + 1)?);
                if len < 2 {
                    break;
                }
                off += len;
            }
        }
    }
    Ok(())
}

#[inline(always)]
fn count(ctx: &TcContext, dir: Direction) {
    let Ok(first) = ctx.load::<u8>(0) else {
        bump(Stat::Unparsed);
        return;
    };
    let hit = match first >> 4 {
        4 => {
            // IPv4: saddr at 12, daddr at 16; the key is the raw network-order word.
            let off = if dir == Direction::Tx { 16 } else { 12 };
            let Ok(addr) = ctx.load::<u32>(off) else {
                bump(Stat::Unparsed);
                return;
            };
            let hit = REMOTE_CIDRS_V4.get(&Key::new(32, addr)).copied();
            // Multicast (224.0.0.0/4) is link housekeeping: counted, not logged.
            if hit.is_none() && (u32::from_be(addr) >> 28) != 0xe {
                warn!(ctx, "no remote cluster for {:i}", u32::from_be(addr));
            }
            hit
        }
        6 => {
            // IPv6: saddr at 8, daddr at 24.
            let off = if dir == Direction::Tx { 24 } else { 8 };
            let Ok(addr) = ctx.load::<[u8; 16]>(off) else {
                bump(Stat::Unparsed);
                return;
            };
            let hit = REMOTE_CIDRS_V6.get(&Key::new(128, addr)).copied();
            // Multicast (ff00::/8: router solicitations, MLD) is link housekeeping.
            if hit.is_none() && addr[0] != 0xff {
                warn!(ctx, "no remote cluster for {:i}", addr);
            }
            hit
        }
        _ => {
            bump(Stat::Unparsed);
            return;
        }
    };
    let Some(remote) = hit else {
        bump(if dir == Direction::Tx { Stat::TxNoRemote } else { Stat::RxNoRemote });
        return;
    };
    let Some(c) = CLUSTER_COUNTERS.get_ptr_mut(&remote.cluster_slot) else {
        bump(Stat::NoCounterSlot);
        return;
    };
    let bytes = u64::from(ctx.len());
    // A GSO packet stands for several wire packets.
    // SAFETY: reading a field of the context's own __sk_buff.
    let segs = u64::from(unsafe { (*ctx.skb.skb).gso_segs }).max(1);
    // SAFETY: per-CPU value, no concurrent writer on this CPU.
    unsafe {
        match dir {
            Direction::Tx => {
                (*c).tx_packets += segs;
                (*c).tx_bytes += bytes;
            }
            Direction::Rx => {
                (*c).rx_packets += segs;
                (*c).rx_bytes += bytes;
            }
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
