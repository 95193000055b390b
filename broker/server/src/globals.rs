//! Global prefixes (overlap mode): each pod and service CIDR of a cluster gets a global prefix
//! of the same length, which the cluster set reaches it at. A cluster may name its own; the
//! broker allocates the ones it leaves out, from the cluster set's global pools in order, and
//! keeps them in the cluster's record, so a later write that leaves them out again (a gateway
//! registering after a restart) finds them unchanged.
//!
//! Allocation starts at an FNV hash of `<cluster>/<cidr>` inside the pool and probes for the
//! first prefix clear of everything taken: every cluster's CIDRs and global prefixes, the
//! ClusterSetIP pool, the broker's and the gateways' addresses. Plans are committed against
//! the revision they were made on, so two clusters joining at the same instant are planned
//! one after the other and never get the same prefix.

use std::net::IpAddr;

use causeway_broker_api::{ClusterRecord, ClusterSetRecord, GlobalCidr, validate::overlaps};
use ipnetwork::IpNetwork;

/// Most candidates one allocation looks at in a pool before trying the next pool.
const MAX_PROBES: u128 = 1 << 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "no global prefix of length /{} is free for {cidr} of cluster {cluster:?} in the global pools ({}); widen them with `causeway cluster-set --global-pool`, or name one in the cluster's globalCidrs",
    cidr.prefix(),
    pools.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
)]
pub struct GlobalPoolExhausted {
    pub cluster: String,
    pub cidr: IpNetwork,
    pub pools: Vec<IpNetwork>,
}

/// What a new global prefix must stay clear of.
pub struct Taken<'a> {
    /// The other clusters of the set (their stored records, or completed ones).
    pub others: Vec<&'a ClusterRecord>,
    /// The broker's and every gateway's addresses.
    pub addresses: Vec<IpAddr>,
}

/// `c` with a global prefix for each of its CIDRs: the one it names, else the one `stored`
/// holds, else (in overlap mode) a new one. Outside overlap mode nothing is allocated.
pub fn complete(
    c: &ClusterRecord,
    stored: Option<&ClusterRecord>,
    set: &ClusterSetRecord,
    taken: &Taken<'_>,
) -> Result<ClusterRecord, GlobalPoolExhausted> {
    let mut out = c.clone();
    // Named ones for CIDRs the cluster does not have stay, for validation to refuse.
    let mut globals: Vec<GlobalCidr> =
        c.global_cidrs.iter().filter(|g| !c.all_cidrs().any(|n| *n == g.cidr)).copied().collect();
    for cidr in c.all_cidrs() {
        let chosen = c.global_of(cidr).or_else(|| stored.and_then(|s| s.global_of(cidr)));
        let global = match chosen {
            Some(g) => g,
            None if set.overlap_mode => allocate(c, cidr, &globals, set, taken)?,
            None => continue,
        };
        globals.push(GlobalCidr { cidr: *cidr, global });
    }
    out.global_cidrs = globals;
    Ok(out)
}

fn allocate(
    c: &ClusterRecord,
    cidr: &IpNetwork,
    chosen: &[GlobalCidr],
    set: &ClusterSetRecord,
    taken: &Taken<'_>,
) -> Result<IpNetwork, GlobalPoolExhausted> {
    let free = |candidate: &IpNetwork| {
        let clash = |n: &IpNetwork| overlaps(candidate, n);
        !(c.all_cidrs().any(clash)
            || chosen.iter().any(|g| clash(&g.global))
            || taken.others.iter().any(|o| o.all_cidrs().any(clash) || o.globals().any(clash))
            || clash(&set.cluster_set_ip_pool)
            || taken.addresses.iter().any(|a| candidate.contains(*a)))
            && causeway_broker_api::validate::claimable_global("globalCidrs", candidate).is_ok()
    };
    for pool in &set.pools.global_cidrs {
        if pool.is_ipv4() != cidr.is_ipv4() || pool.prefix() > cidr.prefix() {
            continue;
        }
        let bits: u32 = if cidr.is_ipv4() { 32 } else { 128 };
        let spare = u32::from(cidr.prefix() - pool.prefix());
        let count: u128 = if spare >= 128 { u128::MAX } else { 1u128 << spare };
        let key = format!("{}/{cidr}", c.cluster_id);
        let start = u128::from(crate::imports::fnv1a(key.as_bytes())) % count;
        let step_shift = bits - u32::from(cidr.prefix());
        for i in 0..count.min(MAX_PROBES) {
            let index = (start + i) % count;
            let candidate = match pool {
                IpNetwork::V4(p) => {
                    let base = u32::from(p.network());
                    let offset =
                        u32::try_from(index).ok().and_then(|x| x.checked_shl(step_shift)).unwrap_or(0);
                    IpNetwork::new(IpAddr::V4((base | offset).into()), cidr.prefix())
                }
                IpNetwork::V6(p) => {
                    let base = u128::from(p.network());
                    let offset = index.checked_shl(step_shift).unwrap_or(0);
                    IpNetwork::new(IpAddr::V6((base | offset).into()), cidr.prefix())
                }
            };
            if let Ok(candidate) = candidate
                && free(&candidate)
            {
                return Ok(candidate);
            }
        }
    }
    Err(GlobalPoolExhausted {
        cluster: c.cluster_id.clone(),
        cidr: *cidr,
        pools: set.pools.global_cidrs.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(id: &str, pods: &str, services: &str) -> ClusterRecord {
        ClusterRecord::new(id, vec![pods.parse().unwrap()], vec![services.parse().unwrap()])
    }

    fn overlap() -> ClusterSetRecord {
        ClusterSetRecord { overlap_mode: true, ..ClusterSetRecord::default() }
    }

    fn none<'a>() -> Taken<'a> {
        Taken { others: Vec::new(), addresses: Vec::new() }
    }

    #[test]
    fn every_cidr_gets_a_prefix_of_its_length_from_the_pool() {
        let c = complete(&cluster("a", "10.244.0.0/16", "10.96.0.0/12"), None, &overlap(), &none()).unwrap();
        assert_eq!(c.global_cidrs.len(), 2);
        for g in &c.global_cidrs {
            assert_eq!(g.global.prefix(), g.cidr.prefix(), "{g:?}");
            assert!("242.0.0.0/8".parse::<IpNetwork>().unwrap().contains(g.global.network()), "{g:?}");
        }
        assert!(!overlaps(&c.global_cidrs[0].global, &c.global_cidrs[1].global));
        // Deterministic: the same cluster and CIDR get the same prefix on an empty set.
        let again =
            complete(&cluster("a", "10.244.0.0/16", "10.96.0.0/12"), None, &overlap(), &none()).unwrap();
        assert_eq!(again, c);
        // Outside overlap mode nothing is allocated.
        let off = complete(
            &cluster("a", "10.244.0.0/16", "10.96.0.0/12"),
            None,
            &ClusterSetRecord::default(),
            &none(),
        )
        .unwrap();
        assert!(off.global_cidrs.is_empty());
    }

    #[test]
    fn named_and_stored_prefixes_are_kept_and_taken_ones_skipped() {
        let set = overlap();
        let mut named = cluster("a", "10.244.0.0/16", "10.96.0.0/12");
        named.global_cidrs = vec![GlobalCidr {
            cidr: "10.244.0.0/16".parse().unwrap(),
            global: "242.7.0.0/16".parse().unwrap(),
        }];
        let a = complete(&named, None, &set, &none()).unwrap();
        assert_eq!(a.global_of(&"10.244.0.0/16".parse().unwrap()), Some("242.7.0.0/16".parse().unwrap()));
        // A later write that leaves them out (a gateway registering again) keeps them.
        let bare = cluster("a", "10.244.0.0/16", "10.96.0.0/12");
        assert_eq!(complete(&bare, Some(&a), &set, &none()).unwrap(), a);
        // Fifty clusters with the same CIDRs: no prefix handed out twice, none on a real CIDR.
        // (A /12 service CIDR, Kubernetes' default, would fit sixteen times in 242.0.0.0/8.)
        let mut all: Vec<ClusterRecord> = Vec::new();
        for i in 0..50 {
            let taken = Taken { others: all.iter().collect(), addresses: vec!["242.0.0.1".parse().unwrap()] };
            let c = complete(&cluster(&format!("c{i}"), "10.244.0.0/16", "10.96.0.0/20"), None, &set, &taken)
                .unwrap();
            all.push(c);
        }
        let globals: Vec<IpNetwork> = all.iter().flat_map(|c| c.globals().copied()).collect();
        assert_eq!(globals.len(), 100);
        for (i, a) in globals.iter().enumerate() {
            assert!(!a.contains("242.0.0.1".parse().unwrap()), "{a} covers a gateway address");
            for b in &globals[i + 1..] {
                assert!(!overlaps(a, b), "{a} and {b} handed out twice");
            }
        }
    }

    #[test]
    fn an_exhausted_pool_says_so() {
        let mut set = overlap();
        set.pools.global_cidrs = vec!["242.0.0.0/15".parse().unwrap()];
        let a = complete(&cluster("a", "10.244.0.0/16", "10.96.0.0/16"), None, &set, &none()).unwrap();
        let taken = Taken { others: vec![&a], addresses: Vec::new() };
        let err = complete(&cluster("b", "10.244.0.0/16", "10.96.0.0/16"), None, &set, &taken).unwrap_err();
        assert_eq!(err.cidr, "10.244.0.0/16".parse().unwrap());
        assert!(err.to_string().contains("no global prefix of length /16 is free"), "{err}");
        // An IPv6 CIDR finds no IPv4 pool.
        let v6 = complete(&cluster("c", "fd00:10::/64", "fd00:96::/108"), None, &set, &none()).unwrap_err();
        assert_eq!(v6.cidr, "fd00:10::/64".parse().unwrap());
    }
}
