//! The redirect stage on the cluster-facing interfaces: remote-bound packets go straight to
//! their tunnel device, past the kernel's forwarding path.

use aya_ebpf::{
    bindings::{
        TC_ACT_OK, bpf_check_mtu_flags::BPF_MTU_CHK_SEGS, bpf_check_mtu_ret::BPF_MTU_CHK_RET_SUCCESS,
    },
    helpers::{bpf_check_mtu, bpf_redirect},
    macros::classifier,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use causeway_datapath_common::Stat;

use crate::{
    frame::{ETH_HDR, ETH_P_IP},
    maps::{REMOTE_CIDRS_V4, REMOTE_CIDRS_V6, bump},
};

pub(crate) const ETH_P_IPV6: u16 = 0x86dd;

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
pub(crate) fn redirect_target(ctx: &TcContext) -> Option<u32> {
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
pub(crate) fn fits_tunnel(ctx: &TcContext, ifindex: u32, l3_len: u32) -> bool {
    // SAFETY: reading a field of the context's own __sk_buff.
    let gso = unsafe { (*ctx.skb.skb).gso_segs } > 1;
    let (mut len, flags) = if gso { (0, u64::from(BPF_MTU_CHK_SEGS)) } else { (l3_len, 0) };
    // SAFETY: the context pointer is the program's own; `len` lives across the call.
    let r = unsafe { bpf_check_mtu(ctx.skb.skb.cast(), ifindex, &raw mut len, 0, flags) };
    r == i64::from(BPF_MTU_CHK_RET_SUCCESS)
}
