//! The uplink guard: only well-formed WireGuard messages from known peers (for their own
//! sessions), and rate-limited handshakes, reach the WireGuard port.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use causeway_datapath_common::{Config, HandshakeBucket, PeerSession, Stat};

use crate::{
    frame::{ETH_HDR, ETH_P_IP, Frame, IPPROTO_UDP, ptr_at},
    maps::{HANDSHAKE_BUCKETS, KNOWN_PEERS_V4, PEER_SESSIONS_V4, bump, config},
};

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
pub(crate) const GUARD_HEADERS: u32 = (ETH_HDR + 60 + 8 + 4) as u32;

pub(crate) enum Verdict {
    /// Not for the WireGuard port (or not parseable as such): not our business.
    NotOurs,
    /// A well-formed WireGuard message from an acceptable source.
    Accept,
    Drop(Stat),
}

#[inline(always)]
pub(crate) fn guard(ctx: &impl Frame) -> Verdict {
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
    // The STUN responder's binding answers (type 0x0101, the magic cookie), from its address
    // and port exactly: the reflexive address is learnt on the WireGuard socket itself. And
    // the relay's frames, on the same socket: datagrams of peers no direct path reaches.
    let stun_answer = head & STUN_BINDING_SUCCESS_MASK == STUN_BINDING_SUCCESS && receiver == STUN_COOKIE;
    if (stun_answer || head & RELAY_MAGIC_MASK == RELAY_MAGIC)
        && src == config(Config::StunServer)
        && src != 0
    {
        let Some(sport) = ptr_at::<u16>(ctx, udp) else { return Verdict::Drop(Stat::XdpMalformed) };
        // SAFETY: bounds-checked.
        if u32::from(u16::from_be(unsafe { core::ptr::read_unaligned(sport) })) == config(Config::StunPort) {
            return Verdict::Accept;
        }
    }
    // A run's header counts all its datagrams; the first one is what the type must match, and
    // each of them costs a handshake token (GRO hands a TC guard a whole run of initiations).
    let (len, count) = match ctx.segment() {
        Some(seg) => (seg, udp_len.div_ceil(seg) as u64),
        None => (udp_len, 1),
    };
    match (head, len) {
        // Every handshake message shares the source's budget: responses and cookie replies
        // (which move no peer but do cost the cable a MAC check and a wake-up) as well.
        (1, 148) | (2, 92) | (3, 64) => handshake_allowed(src, count),
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

/// A STUN binding success response's first word (type 0x0101, big-endian, then the length's
/// two bytes, masked out), read little-endian as `head` is.
const STUN_BINDING_SUCCESS_MASK: u32 = 0x0000_ffff;
const STUN_BINDING_SUCCESS: u32 = 0x0101;
/// The magic cookie 0x2112A442 as the little-endian read of bytes 4..8 gives it.
const STUN_COOKIE: u32 = 0x42A4_1221;
/// The relay frames' first three bytes (0xCA 0x5E 0x72), read little-endian as `head` is.
const RELAY_MAGIC_MASK: u32 = 0x00ff_ffff;
const RELAY_MAGIC: u32 = 0x0072_5eca;

/// Token bucket per source address: `HandshakeRate` per second, bursts of `HandshakeBurst`.
/// A run of `count` messages passes whole or not at all, paying one token per message.
#[inline(always)]
pub(crate) fn handshake_allowed(src: u32, count: u64) -> Verdict {
    let rate = u64::from(config(Config::HandshakeRate));
    let burst = u64::from(config(Config::HandshakeBurst));
    if rate == 0 || burst == 0 {
        return Verdict::Accept;
    }
    let cap = burst * 1000;
    let cost = count * 1000;
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
            if b.tokens_milli >= cost {
                b.tokens_milli -= cost;
                Verdict::Accept
            } else {
                Verdict::Drop(Stat::XdpHandshakeFlood)
            }
        }
        None => {
            let allowed = cost <= cap;
            let tokens_milli = if allowed { cap - cost } else { cap };
            let _ = HANDSHAKE_BUCKETS.insert(&src, &HandshakeBucket { tokens_milli, last_ns: now }, 0);
            if allowed { Verdict::Accept } else { Verdict::Drop(Stat::XdpHandshakeFlood) }
        }
    }
}
