//! The tunnel device's programs: policy, per-cluster counters and the MSS clamp, both ways.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use aya_log_ebpf::warn;
use causeway_datapath_common::{Config, Stat};

use crate::{
    frame::IPPROTO_TCP,
    maps::{CLUSTER_COUNTERS, REMOTE_CIDRS_V4, REMOTE_CIDRS_V6, bump, config},
    policy::policy_allows,
    translate::{translate_egress, translate_ingress},
};

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// Leaving through the tunnel: the remote address is the destination.
    Tx,
    /// Arriving from the tunnel: the remote address is the source.
    Rx,
}

#[classifier]
pub fn tunnel_egress(ctx: TcContext) -> i32 {
    // Overlap mode: from here on the packet carries global addresses only, which is what the
    // policy, the counters and the other clusters speak.
    translate_egress(&ctx);
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
    // Overlap mode: the policy and the counters saw global addresses; the cluster gets its
    // real ones.
    translate_ingress(&ctx);
    TC_ACT_OK
}

/// `BPF_F_PSEUDO_HDR` is not needed: the MSS is not part of the pseudo-header. Low bits: size.
pub(crate) const CSUM_SIZE_2: u64 = 2;

/// Lowers the MSS option of SYN and SYN-ACK segments crossing the tunnel (both directions, so
/// both ends learn it), so TCP fits the tunnel even where ICMP "fragmentation needed" is lost.
#[inline(always)]
pub(crate) fn clamp_mss(ctx: &TcContext) {
    let _ = try_clamp_mss(ctx);
}

#[inline(always)]
pub(crate) fn try_clamp_mss(ctx: &TcContext) -> Result<(), i64> {
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
    let max = config(cfg);
    if max == 0 {
        return Ok(());
    }
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
pub(crate) fn count(ctx: &TcContext, dir: Direction) {
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
