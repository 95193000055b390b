//! The cluster-set policy: the verdict of the live generation of the compiled tables, replies
//! of allowed flows, ICMP errors about them.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use causeway_datapath_common::{
    Config, FlowKey, MAX_POLICY_RULES, POLICY_ALLOW, POLICY_DENY, POLICY_GENERATION_BIT, POLICY_STATE_DENY,
    POLICY_STATE_ENABLED, POLICY_STATE_GENERATION, PolicyAddr, PolicyKey, Stat,
};

use crate::{
    frame::{ETH_HDR, ETH_P_IP, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP},
    maps::{POLICY_DROPS, POLICY_DST_V4, POLICY_FLOWS, POLICY_SRC_V4, POLICY_VERDICTS, bump, config},
};

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

/// The cluster-set policy's verdict on the IP packet at offset `l3`; counts denies per rule.
#[inline(always)]
pub(crate) fn policy_allows(ctx: &TcContext, l3: usize) -> bool {
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
    let (sport, dport) = if (proto == IPPROTO_TCP || proto == IPPROTO_UDP) && u16::from_be(frag) & 0x1fff == 0
    {
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

/// Whether the ICMP message at `l4` is an error quoting a packet of a flow the policy allowed.
#[inline(always)]
pub(crate) fn icmp_error_of_allowed_flow(ctx: &TcContext, l4: usize) -> bool {
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
    let (sport, dport) = if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
        (ctx.load::<u16>(inner_l4).unwrap_or(0), ctx.load::<u16>(inner_l4 + 2).unwrap_or(0))
    } else {
        (0, 0)
    };
    let quoted = FlowKey { saddr, daddr, sport, dport, proto: u32::from(proto) };
    POLICY_FLOWS.get_ptr(&quoted).is_some()
}

#[inline(always)]
pub(crate) fn decide_default(default: u32) -> bool {
    if default == POLICY_ALLOW {
        return true;
    }
    if let Some(p) = POLICY_DROPS.get_ptr_mut(MAX_POLICY_RULES) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
    false
}
