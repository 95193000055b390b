//! Overlap mode: stateless 1:1 prefix translation on the tunnel device (NETMAP for IPv4).
//!
//! Leaving through the tunnel, a source in one of the local cluster's real prefixes moves to
//! its global prefix (`NAT_OUT_V4`); arriving, a destination in one of the local global
//! prefixes moves back to the real one (`NAT_IN_V4`). The host bits are kept, so nothing is
//! remembered per flow: the standby gateway holds the same two tries and carries every flow
//! on a failover.
//!
//! Checksums are updated incrementally: the IPv4 header's, and TCP's and UDP's through the
//! pseudo-header (a UDP checksum of 0, "none", stays 0); ICMP has no pseudo-header. Only a
//! first fragment carries the transport header; later ones get the IP header alone. In an
//! ICMP error the embedded packet is the one the error is about, which crossed the tunnel
//! the other way: leaving, its destination moves to the global prefix; arriving, its source
//! moves back. Its IP header checksum and its transport checksum (when the error carries it)
//! are updated too, and the ICMP checksum with every change inside the message, so that
//! path-MTU discovery and traceroute work through the translation.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    maps::{LpmTrie, lpm_trie::Key},
    programs::TcContext,
};
use causeway_datapath_common::{NatPrefix, Stat};

use crate::{
    frame::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP},
    maps::{NAT_IN_V4, NAT_OUT_V4, bump},
};

/// Offsets in the IPv4 header.
const IP_CSUM: usize = 10;
const IP_SRC: usize = 12;
const IP_DST: usize = 16;
/// ICMP types whose message embeds the packet it is about.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;
/// Size bits of the checksum helpers' flags.
const SIZE_2: u64 = 2;
const SIZE_4: u64 = 4;

/// Leaving through the tunnel: the source real → global.
#[inline(always)]
pub(crate) fn translate_egress(ctx: &TcContext) {
    if let Ok(true) = translate(ctx, IP_SRC, IP_DST, &NAT_OUT_V4) {
        bump(Stat::TranslatedTx);
    }
}

/// Arriving from the tunnel: the destination global → real.
#[inline(always)]
pub(crate) fn translate_ingress(ctx: &TcContext) {
    if let Ok(true) = translate(ctx, IP_DST, IP_SRC, &NAT_IN_V4) {
        bump(Stat::TranslatedRx);
    }
}

/// `addr` moved to `nat`'s prefix, host bits kept (both in network order).
#[inline(always)]
fn moved(addr: u32, nat: &NatPrefix) -> u32 {
    let prefix = nat.prefix.min(32);
    let mask: u32 = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
    ((u32::from_be(nat.to) & mask) | (u32::from_be(addr) & !mask)).to_be()
}

#[inline(always)]
fn lookup(map: &LpmTrie<u32, NatPrefix>, addr: u32) -> Option<NatPrefix> {
    map.get(&Key::new(32, addr)).copied()
}

/// Rewrites the address at `outer` (the packet's source or destination) and, in an ICMP
/// error, the embedded packet's address at `inner` (the other one). Whether anything moved.
#[inline(always)]
fn translate(
    ctx: &TcContext,
    outer: usize,
    inner: usize,
    map: &LpmTrie<u32, NatPrefix>,
) -> Result<bool, i64> {
    let first = ctx.load::<u8>(0)?;
    if first >> 4 != 4 {
        return Ok(false);
    }
    let ihl = usize::from(first & 0x0f) * 4;
    if ihl < 20 {
        return Ok(false);
    }
    let proto = ctx.load::<u8>(9)?;
    // Only a first fragment (offset 0) carries the transport header.
    let first_fragment = u16::from_be(ctx.load::<u16>(6)?) & 0x1fff == 0;
    let mut changed = false;
    let old = ctx.load::<u32>(outer)?;
    if let Some(nat) = lookup(map, old) {
        let new = moved(old, &nat);
        ctx.store(outer, &new, 0)?;
        ctx.l3_csum_replace(IP_CSUM, u64::from(old), u64::from(new), SIZE_4)?;
        if first_fragment {
            match proto {
                IPPROTO_TCP => {
                    ctx.l4_csum_replace(
                        ihl + 16,
                        u64::from(old),
                        u64::from(new),
                        u64::from(BPF_F_PSEUDO_HDR) | SIZE_4,
                    )?;
                }
                IPPROTO_UDP => {
                    // A zero checksum means "none" and stays so (MARK_MANGLED_0 also turns a
                    // computed 0 into 0xffff).
                    ctx.l4_csum_replace(
                        ihl + 6,
                        u64::from(old),
                        u64::from(new),
                        u64::from(BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0) | SIZE_4,
                    )?;
                }
                _ => {}
            }
        }
        changed = true;
    }
    if proto == IPPROTO_ICMP && first_fragment {
        changed |= translate_icmp_error(ctx, ihl, inner, map)?;
    }
    Ok(changed)
}

/// The embedded packet of an ICMP error at `ihl`: its address at `inner` (offset in its own IP
/// header), its IP checksum, its transport checksum if carried, and the ICMP checksum.
#[inline(always)]
fn translate_icmp_error(
    ctx: &TcContext,
    ihl: usize,
    inner: usize,
    map: &LpmTrie<u32, NatPrefix>,
) -> Result<bool, i64> {
    let kind = ctx.load::<u8>(ihl)?;
    if !matches!(kind, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB) {
        return Ok(false);
    }
    let icmp_csum = ihl + 2;
    let embedded = ihl + 8;
    let first = ctx.load::<u8>(embedded)?;
    if first >> 4 != 4 {
        return Ok(false);
    }
    let inner_ihl = usize::from(first & 0x0f) * 4;
    if inner_ihl < 20 || inner_ihl > 60 {
        return Ok(false);
    }
    let old = ctx.load::<u32>(embedded + inner)?;
    let Some(nat) = lookup(map, old) else {
        return Ok(false);
    };
    let new = moved(old, &nat);
    ctx.store(embedded + inner, &new, 0)?;
    ctx.l4_csum_replace(icmp_csum, u64::from(old), u64::from(new), SIZE_4)?;
    // The embedded IP header's checksum, by hand: it is payload to every helper.
    let old_sum = ctx.load::<u16>(embedded + IP_CSUM)?;
    let new_sum = csum_update4(old_sum, old, new);
    ctx.store(embedded + IP_CSUM, &new_sum, 0)?;
    ctx.l4_csum_replace(icmp_csum, u64::from(old_sum), u64::from(new_sum), SIZE_2)?;
    // The embedded transport checksum, when the error carries it (its pseudo-header has the
    // address) and it is the first fragment's.
    let inner_proto = ctx.load::<u8>(embedded + 9)?;
    let inner_first = u16::from_be(ctx.load::<u16>(embedded + 6)?) & 0x1fff == 0;
    let sum_at = match inner_proto {
        IPPROTO_TCP => Some(embedded + inner_ihl + 16),
        IPPROTO_UDP => Some(embedded + inner_ihl + 6),
        _ => None,
    };
    if let (Some(at), true) = (sum_at, inner_first)
        && let Ok(old_l4) = ctx.load::<u16>(at)
        && !(inner_proto == IPPROTO_UDP && old_l4 == 0)
    {
        let mut new_l4 = csum_update4(old_l4, old, new);
        if inner_proto == IPPROTO_UDP && new_l4 == 0 {
            new_l4 = 0xffff;
        }
        ctx.store(at, &new_l4, 0)?;
        ctx.l4_csum_replace(icmp_csum, u64::from(old_l4), u64::from(new_l4), SIZE_2)?;
    }
    Ok(true)
}

/// RFC 1624: a one's-complement checksum `sum` (as stored, network order) after a 32-bit
/// word of what it covers changed from `old` to `new` (network order).
#[inline(always)]
fn csum_update4(sum: u16, old: u32, new: u32) -> u16 {
    let (old, new) = (u32::from_be(old), u32::from_be(new));
    let mut s: u32 = u32::from(!u16::from_be(sum));
    s += u32::from(!((old >> 16) as u16)) + u32::from(!(old as u16));
    s += (new >> 16) + (new & 0xffff);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    (!(s as u16)).to_be()
}
