//! Every map the programs share, and the two helpers every program uses (the config word and
//! the datapath-wide counters). Layouts live in `causeway-datapath-common`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap},
};
use causeway_datapath_common::{
    Config, FlowKey, HandshakeBucket, MAX_CLUSTERS, MAX_HANDSHAKE_SOURCES, MAX_NAT_PREFIXES, MAX_PEERS,
    MAX_POLICY_CLASSES, MAX_POLICY_FLOWS, MAX_POLICY_RULES, MAX_POLICY_VERDICTS, MAX_REMOTE_CIDRS,
    NUM_CONFIG, NUM_STATS, NatPrefix, PeerSession, PolicyAddr, PolicyKey, PolicyVerdict, RemoteCidr, Stat,
    TrafficCounters,
};

#[map]
pub(crate) static REMOTE_CIDRS_V4: LpmTrie<u32, RemoteCidr> =
    LpmTrie::with_max_entries(MAX_REMOTE_CIDRS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map]
pub(crate) static REMOTE_CIDRS_V6: LpmTrie<[u8; 16], RemoteCidr> =
    LpmTrie::with_max_entries(MAX_REMOTE_CIDRS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map]
pub(crate) static CLUSTER_COUNTERS: PerCpuHashMap<u32, TrafficCounters> =
    PerCpuHashMap::with_max_entries(MAX_CLUSTERS, 0);

#[map]
pub(crate) static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_STATS, 0);

#[map]
pub(crate) static CONFIG: Array<u32> = Array::with_max_entries(NUM_CONFIG, 0);

#[map]
pub(crate) static KNOWN_PEERS_V4: HashMap<u32, u32> = HashMap::with_max_entries(MAX_PEERS, 0);

#[map]
pub(crate) static PEER_SESSIONS_V4: HashMap<PeerSession, u32> = HashMap::with_max_entries(MAX_PEERS, 0);

#[map]
pub(crate) static HANDSHAKE_BUCKETS: LruHashMap<u32, HandshakeBucket> =
    LruHashMap::with_max_entries(MAX_HANDSHAKE_SOURCES, 0);

// The policy tables hold two generations (the live one and the one being installed), hence
// twice a policy's size; allocated as used.
#[map]
pub(crate) static POLICY_SRC_V4: LpmTrie<PolicyAddr, u32> =
    LpmTrie::with_max_entries(2 * MAX_POLICY_CLASSES, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map]
pub(crate) static POLICY_DST_V4: LpmTrie<PolicyAddr, u32> =
    LpmTrie::with_max_entries(2 * MAX_POLICY_CLASSES, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map]
pub(crate) static POLICY_VERDICTS: HashMap<PolicyKey, PolicyVerdict> =
    HashMap::with_max_entries(2 * MAX_POLICY_VERDICTS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map]
pub(crate) static POLICY_FLOWS: LruHashMap<FlowKey, u32> = LruHashMap::with_max_entries(MAX_POLICY_FLOWS, 0);

#[map]
pub(crate) static POLICY_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_POLICY_RULES + 1, 0);

#[map]
pub(crate) static NAT_OUT_V4: LpmTrie<u32, NatPrefix> =
    LpmTrie::with_max_entries(MAX_NAT_PREFIXES, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map]
pub(crate) static NAT_IN_V4: LpmTrie<u32, NatPrefix> =
    LpmTrie::with_max_entries(MAX_NAT_PREFIXES, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[inline(always)]
pub(crate) fn config(c: Config) -> u32 {
    CONFIG.get(c as u32).copied().unwrap_or(0)
}

#[inline(always)]
pub(crate) fn bump(stat: Stat) {
    if let Some(p) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}
