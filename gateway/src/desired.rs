//! Desired state, computed from the broker's records (pure: no I/O, unit-tested).
//!
//! For every remote cluster: its prefixes and the endpoint to connect to (the active gateway
//! with the highest priority). Routes and datapath entries are derived from that.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use causeway_broker_api::{ClusterRecord, EndpointRecord, GatewayRole, Object, Record, WireGuardKey};
use ipnetwork::IpNetwork;

pub use crate::model::{Plan, plan};
use crate::model::{RemoteEndpoint, StandbyGateway};

/// What the gateway should have, given the cluster set's records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Remote clusters that have a usable gateway, keyed by cluster id.
    pub remotes: BTreeMap<String, RemoteEndpoint>,
    /// The cluster-set policy and every cluster's CIDRs (the local one's too).
    pub policy: crate::policy::PolicyInput,
    /// Remote clusters this node refuses to route, and why (their records would capture
    /// traffic that is not theirs, or clash with another cluster's).
    pub refused: BTreeMap<String, String>,
    /// Overlap mode: the local cluster's real prefix → global prefix pairs the tunnel programs
    /// translate between (empty otherwise).
    pub translation: Vec<(IpNetwork, IpNetwork)>,
}

impl Desired {
    /// Every prefix routed into the tunnel.
    #[must_use]
    pub fn routes(&self) -> BTreeSet<IpNetwork> {
        self.remotes.values().flat_map(|r| r.cidrs.iter().copied()).collect()
    }
}

/// What a node knows of itself that remote records must not capture. Members do not trust
/// each other: even with a broker that checks everything, a gateway re-checks what it routes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalFacts {
    /// The node's own interface addresses (the uplink's, so the underlay, among them).
    pub addresses: Vec<IpAddr>,
    /// This gateway's WireGuard key (none on a route agent).
    pub public_key: Option<WireGuardKey>,
}

/// The prefixes a cluster is reached at: its pod and service CIDRs, or in overlap mode their
/// global prefixes.
fn reached_at(c: &ClusterRecord, overlap_mode: bool) -> Vec<IpNetwork> {
    if overlap_mode { c.globals().copied().collect() } else { c.all_cidrs().copied().collect() }
}

/// Why a remote cluster's own record makes it unroutable from this node, if it does.
fn hostile_prefix<'a>(
    c: &ClusterRecord,
    overlap_mode: bool,
    facts: &LocalFacts,
    endpoints: impl Iterator<Item = &'a EndpointRecord> + Clone,
) -> Option<String> {
    let routed = reached_at(c, overlap_mode);
    if overlap_mode && let Some(real) = c.all_cidrs().find(|n| c.global_of(n).is_none()) {
        return Some(format!("{real} has no global prefix yet (overlap mode)"));
    }
    for cidr in &routed {
        let claimable = if overlap_mode {
            causeway_broker_api::validate::claimable_global("globalCidrs", cidr)
        } else {
            causeway_broker_api::validate::claimable("cidrs", cidr)
        };
        if let Err(e) = claimable {
            return Some(e.to_string());
        }
        if let Some(addr) = facts.addresses.iter().find(|a| cidr.contains(**a)) {
            return Some(format!("{cidr} covers {addr}, an address of this node"));
        }
        for e in endpoints.clone() {
            if let Some(addr) = e.addresses().find(|a| cidr.contains(*a)) {
                return Some(format!(
                    "{cidr} covers {addr}, an address of gateway {:?} of cluster {:?}",
                    e.hostname, e.cluster_id
                ));
            }
        }
    }
    None
}

/// Builds the desired state from a snapshot of records, ignoring the local cluster's own.
/// A remote cluster whose prefixes are special, cover this node or any gateway endpoint, or
/// clash with another cluster's, is routed to nobody and listed in [`Desired::refused`];
/// so is one whose gateway key another cluster (or this gateway) uses.
#[must_use]
pub fn desired(objects: &[Object], local_cluster: &str, facts: &LocalFacts) -> Desired {
    let mut clusters: BTreeMap<&str, &ClusterRecord> = BTreeMap::new();
    let mut endpoints: BTreeMap<&str, Vec<&EndpointRecord>> = BTreeMap::new();
    let mut all_endpoints: Vec<(u64, &EndpointRecord)> = Vec::new();
    let mut policy = crate::policy::PolicyInput::default();
    // Overlap mode: clusters are reached at their global prefixes, and the policy (which
    // sees the packets on the tunnel, translated) speaks those.
    let overlap_mode = objects.iter().any(|o| matches!(&o.record, Record::ClusterSet(s) if s.overlap_mode));
    let mut local: Option<&ClusterRecord> = None;
    for o in objects {
        if let Record::Cluster(c) = &o.record {
            policy.clusters.insert(c.cluster_id.clone(), reached_at(c, overlap_mode));
            if c.cluster_id == local_cluster {
                local = Some(c);
            }
        }
        if let Record::Endpoint(e) = &o.record {
            all_endpoints.push((o.resource_version, e));
            if let Some(std::net::IpAddr::V4(ip)) = e.health_check_ip {
                policy.probe_ips.insert(ip);
            }
        }
        match &o.record {
            Record::Policy(p) => policy.rules.push(p.clone()),
            Record::PolicyDefault(d) => policy.default = d.action,
            Record::Cluster(c) if c.cluster_id != local_cluster => {
                clusters.insert(&c.cluster_id, c);
            }
            Record::Endpoint(e) if e.cluster_id != local_cluster => {
                endpoints.entry(&e.cluster_id).or_default().push(e);
            }
            _ => {}
        }
    }
    let mut refused: BTreeMap<String, String> = BTreeMap::new();
    for (id, c) in &clusters {
        if let Some(why) = hostile_prefix(c, overlap_mode, facts, all_endpoints.iter().map(|(_, e)| *e)) {
            refused.insert((*id).to_owned(), why);
        }
    }
    // Clashes: with the local cluster (its own CIDRs and, in overlap mode, its global
    // prefixes too), the remote is out; between remotes, both are (routing to whichever id
    // sorts first would hand one cluster's traffic to the other).
    let local_cidrs: Vec<IpNetwork> =
        local.map(|l| l.all_cidrs().chain(l.globals()).copied().collect()).unwrap_or_default();
    let candidates: Vec<(&str, &ClusterRecord)> =
        clusters.iter().filter(|(id, _)| !refused.contains_key(**id)).map(|(id, c)| (*id, *c)).collect();
    for (i, (id, c)) in candidates.iter().enumerate() {
        let overlaps = |a: &IpNetwork, b: &IpNetwork| causeway_broker_api::validate::overlaps(a, b);
        let routed = reached_at(c, overlap_mode);
        if let Some((ours, theirs)) =
            routed.iter().find_map(|n| local_cidrs.iter().find(|l| overlaps(n, l)).map(|l| (*l, *n)))
        {
            refused.insert((*id).to_owned(), format!("{theirs} overlaps {ours} of the local cluster"));
            continue;
        }
        for (other, oc) in candidates.iter().skip(i + 1) {
            let theirs = reached_at(oc, overlap_mode);
            if let Some((a, b)) =
                routed.iter().find_map(|n| theirs.iter().find(|m| overlaps(n, m)).map(|m| (*n, *m)))
            {
                let why = |x: &IpNetwork, y: &IpNetwork, o: &str| {
                    format!("{x} overlaps {y} of cluster {o:?}: neither is routed until one of them changes")
                };
                refused.entry((*id).to_owned()).or_insert_with(|| why(&a, &b, other));
                refused.entry((*other).to_owned()).or_insert_with(|| why(&b, &a, id));
            }
        }
    }
    // Keys: one gateway key, one cluster. The broker refuses a second cluster's claim; should
    // records disagree anyway, the key stays with the cluster that published it first (the
    // lowest revision), as it does in the cable core, and a tie leaves it to nobody.
    let mut key_owner: BTreeMap<WireGuardKey, (u64, Option<&str>)> = BTreeMap::new();
    for (rv, e) in &all_endpoints {
        key_owner
            .entry(e.public_key)
            .and_modify(|(best, owner)| {
                if *rv < *best {
                    (*best, *owner) = (*rv, Some(e.cluster_id.as_str()));
                } else if *rv == *best && *owner != Some(e.cluster_id.as_str()) {
                    *owner = None;
                }
            })
            .or_insert((*rv, Some(e.cluster_id.as_str())));
    }
    for (id, eps) in &endpoints {
        for e in eps {
            let owner = key_owner.get(&e.public_key).and_then(|(_, o)| *o);
            if owner != Some(*id) {
                refused.entry((*id).to_owned()).or_insert_with(|| match owner {
                    Some(other) => {
                        format!("gateway {:?} uses the key of a gateway of cluster {other:?}", e.hostname)
                    }
                    None => format!("gateway {:?} shares its key with another cluster's gateway", e.hostname),
                });
            } else if facts.public_key == Some(e.public_key) {
                refused
                    .entry((*id).to_owned())
                    .or_insert_with(|| format!("gateway {:?} uses this gateway's own key", e.hostname));
            }
        }
    }
    for (id, why) in &refused {
        tracing::debug!(cluster = %id, reason = %why, "remote cluster not routed");
    }

    let mut remotes: BTreeMap<String, RemoteEndpoint> = BTreeMap::new();
    for (id, c) in clusters {
        if refused.contains_key(id) {
            continue;
        }
        let Some(ep) = endpoints.get(id).and_then(|eps| pick_endpoint(eps)) else { continue };
        let Some(ip) = ep.preferred_ip() else { continue };
        // Every other gateway of the cluster is a warm standby.
        let mut standbys: Vec<StandbyGateway> = endpoints[id]
            .iter()
            .filter(|e| e.public_key != ep.public_key)
            .filter_map(|e| {
                Some(StandbyGateway {
                    public_key: e.public_key,
                    endpoint: SocketAddr::new(e.preferred_ip()?, e.port),
                    candidates: e.paths(),
                    health_ip: v4(e.health_check_ip),
                    priority: e.priority,
                })
            })
            .collect();
        standbys.sort_by_key(|s| s.public_key.0);
        standbys.dedup_by_key(|s| s.public_key);
        remotes.insert(
            id.to_owned(),
            RemoteEndpoint {
                cluster_id: id.to_owned(),
                public_key: ep.public_key,
                endpoint: SocketAddr::new(ip, ep.port),
                candidates: ep.paths(),
                cidrs: reached_at(c, overlap_mode),
                health_ip: v4(ep.health_check_ip),
                priority: ep.priority,
                standbys,
            },
        );
    }
    let translation = match (overlap_mode, local) {
        // The programs translate IPv4; an IPv6 CIDR's global prefix is routed but not
        // translated (documented: overlap mode is for IPv4).
        (true, Some(l)) => {
            l.global_cidrs.iter().filter(|g| g.cidr.is_ipv4()).map(|g| (g.cidr, g.global)).collect()
        }
        _ => Vec::new(),
    };
    Desired { remotes, policy, refused, translation }
}

/// The active endpoint with the highest priority (ties: lowest hostname); without an active
/// one, the standby that would be picked the same way. A cluster whose active gateway's record
/// lapsed (the gateway died, and its lease with it) stays routed: to the standby the data plane
/// has most likely moved to already, never to nobody.
fn pick_endpoint<'a>(eps: &[&'a EndpointRecord]) -> Option<&'a EndpointRecord> {
    let best = |role: GatewayRole| {
        eps.iter()
            .filter(move |e| e.role == role)
            .max_by(|a, b| a.priority.cmp(&b.priority).then_with(|| b.hostname.cmp(&a.hostname)))
            .copied()
    };
    best(GatewayRole::Active).or_else(|| best(GatewayRole::Standby))
}

fn v4(ip: Option<IpAddr>) -> Option<std::net::Ipv4Addr> {
    match ip {
        Some(IpAddr::V4(v4)) => Some(v4),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key of each gateway's own, from its host name.
    fn key(host: &str) -> WireGuardKey {
        let mut k = [0u8; 32];
        k[..host.len()].copy_from_slice(host.as_bytes());
        WireGuardKey(k)
    }

    fn cluster(id: &str, pod: &str) -> Object {
        Object::new(
            1,
            Record::Cluster(ClusterRecord {
                cluster_id: id.into(),
                pod_cidrs: vec![pod.parse().unwrap()],
                service_cidrs: vec![],
                global_cidrs: Vec::new(),
                labels: Default::default(),
                generation: 1,
            }),
        )
    }

    fn endpoint(id: &str, host: &str, ip: &str, role: GatewayRole, priority: u32) -> Object {
        Object::new(
            1,
            Record::Endpoint(EndpointRecord {
                cluster_id: id.into(),
                hostname: host.into(),
                private_ips: vec![ip.parse().unwrap()],
                public_ips: vec![],
                port: 51820,
                public_key: key(host),
                backend: "wireguard".into(),
                role,
                priority,
                health_check_ip: None,
                reachable: None,
                candidates: Vec::new(),
                generation: 1,
            }),
        )
    }

    #[test]
    fn remote_clusters_with_a_gateway_become_peers() {
        let objs = vec![
            cluster("a", "10.1.0.0/16"),
            endpoint("a", "gw-a", "172.31.0.11", GatewayRole::Active, 0),
            cluster("b", "10.2.0.0/16"),
            endpoint("b", "gw-b", "172.31.0.12", GatewayRole::Active, 0),
            cluster("c", "10.3.0.0/16"), // no endpoint yet
            cluster("d", "10.4.0.0/16"),
            endpoint("d", "gw-d", "172.31.0.14", GatewayRole::Standby, 9),
        ];
        let d = desired(&objs, "a", &LocalFacts::default());
        assert_eq!(d.remotes.keys().collect::<Vec<_>>(), vec!["b", "d"]);
        let b = &d.remotes["b"];
        assert_eq!(b.endpoint, "172.31.0.12:51820".parse().unwrap());
        // d has only a standby (its active gateway's record lapsed): still routed, to it.
        assert_eq!(d.remotes["d"].endpoint, "172.31.0.14:51820".parse().unwrap());
        assert_eq!(d.remotes["d"].priority, 9);
        assert_eq!(
            d.routes().into_iter().collect::<Vec<_>>(),
            vec!["10.2.0.0/16".parse().unwrap(), "10.4.0.0/16".parse().unwrap()]
        );
    }

    /// A cluster of the same CIDRs as every other one, with its global prefix (overlap mode).
    fn twin(id: &str, global: Option<&str>) -> Object {
        let pods: IpNetwork = "10.244.0.0/16".parse().unwrap();
        let global_cidrs = global
            .map(|g| vec![causeway_broker_api::GlobalCidr { cidr: pods, global: g.parse().unwrap() }])
            .unwrap_or_default();
        Object::new(
            1,
            Record::Cluster(ClusterRecord {
                cluster_id: id.into(),
                pod_cidrs: vec![pods],
                service_cidrs: vec![],
                global_cidrs,
                labels: Default::default(),
                generation: 1,
            }),
        )
    }

    fn overlap_mode() -> Object {
        Object::new(
            1,
            Record::ClusterSet(causeway_broker_api::ClusterSetRecord {
                overlap_mode: true,
                ..Default::default()
            }),
        )
    }

    #[test]
    fn in_overlap_mode_remotes_are_routed_at_their_global_prefixes_and_the_local_one_translated() {
        let mut objs = vec![
            twin("a", Some("242.1.0.0/16")),
            twin("b", Some("242.2.0.0/16")),
            endpoint("b", "gw-b", "172.31.0.12", GatewayRole::Active, 0),
            twin("c", None), // no global prefix yet
            endpoint("c", "gw-c", "172.31.0.13", GatewayRole::Active, 0),
            twin("d", Some("242.1.128.0/17")),
            endpoint("d", "gw-d", "172.31.0.14", GatewayRole::Active, 0),
        ];
        // Without overlap mode the same records clash everywhere: nothing is routed.
        let d = desired(&objs, "a", &LocalFacts::default());
        assert!(d.remotes.is_empty(), "{:?}", d.remotes);
        assert!(d.translation.is_empty());
        objs.push(overlap_mode());
        let d = desired(&objs, "a", &LocalFacts::default());
        assert_eq!(d.remotes.keys().collect::<Vec<_>>(), vec!["b"]);
        assert_eq!(d.routes(), ["242.2.0.0/16".parse().unwrap()].into());
        assert_eq!(d.translation, vec![("10.244.0.0/16".parse().unwrap(), "242.1.0.0/16".parse().unwrap())]);
        assert_eq!(d.refused["c"], "10.244.0.0/16 has no global prefix yet (overlap mode)");
        assert!(d.refused["d"].contains("overlaps 242.1.0.0/16 of the local cluster"), "{}", d.refused["d"]);
        // The policy sees the tunnel's (global) addresses.
        assert_eq!(d.policy.clusters["a"], vec!["242.1.0.0/16".parse::<IpNetwork>().unwrap()]);
        assert_eq!(d.policy.clusters["b"], vec!["242.2.0.0/16".parse::<IpNetwork>().unwrap()]);
    }

    #[test]
    fn overlapping_remotes_are_not_routed() {
        let objs = vec![
            cluster("a", "10.1.0.0/16"),
            cluster("b", "10.1.128.0/17"), // clashes with the local cluster
            endpoint("b", "gw-b", "172.31.0.12", GatewayRole::Active, 0),
            cluster("c", "10.3.0.0/16"),
            endpoint("c", "gw-c", "172.31.0.13", GatewayRole::Active, 0),
            cluster("d", "10.3.1.0/24"), // clashes with c
            endpoint("d", "gw-d", "172.31.0.14", GatewayRole::Active, 0),
        ];
        let d = desired(&objs, "a", &LocalFacts::default());
        // c and d clash with each other: neither wins because of how its id sorts.
        assert!(d.remotes.is_empty(), "{:?}", d.remotes.keys());
        assert_eq!(d.refused.keys().collect::<Vec<_>>(), vec!["b", "c", "d"]);
        assert_eq!(d.refused["b"], "10.1.128.0/17 overlaps 10.1.0.0/16 of the local cluster");
        assert_eq!(
            d.refused["c"],
            "10.3.0.0/16 overlaps 10.3.1.0/24 of cluster \"d\": neither is routed until one of them changes"
        );
        assert_eq!(
            d.refused["d"],
            "10.3.1.0/24 overlaps 10.3.0.0/16 of cluster \"c\": neither is routed until one of them changes"
        );
        // The clash resolved (d leaves): c is routed again.
        let d = desired(&objs[..5], "a", &LocalFacts::default());
        assert_eq!(d.remotes.keys().collect::<Vec<_>>(), vec!["c"]);
        assert_eq!(d.refused.keys().collect::<Vec<_>>(), vec!["b"]);
    }

    #[test]
    fn prefixes_that_would_capture_this_node_or_an_endpoint_are_refused() {
        let facts = LocalFacts {
            addresses: vec!["192.168.7.5".parse().unwrap(), "172.20.1.1".parse().unwrap()],
            public_key: Some(key("me")),
        };
        let objs = vec![
            cluster("a", "10.1.0.0/16"),
            endpoint("a", "me", "172.31.0.11", GatewayRole::Active, 0),
            // Covers this node's uplink address.
            cluster("node", "192.168.0.0/16"),
            endpoint("node", "gw-n", "172.31.0.12", GatewayRole::Active, 0),
            // Covers the local gateway's endpoint (the underlay).
            cluster("under", "172.31.0.0/24"),
            endpoint("under", "gw-u", "172.30.0.13", GatewayRole::Active, 0),
            // Special and broad, as a broker without the checks would let through.
            cluster("meta", "169.254.169.254/32"),
            endpoint("meta", "gw-m", "172.31.0.14", GatewayRole::Active, 0),
            cluster("half", "128.0.0.0/1"),
            endpoint("half", "gw-h", "172.31.0.15", GatewayRole::Active, 0),
            // Honest.
            cluster("b", "10.2.0.0/16"),
            endpoint("b", "gw-b", "172.31.0.18", GatewayRole::Active, 0),
            // Published later with another cluster's key, and with this gateway's own.
            cluster("thief", "10.7.0.0/16"),
            endpoint("thief", "gw-t", "172.31.0.16", GatewayRole::Active, 0),
            cluster("mirror", "10.8.0.0/16"),
            endpoint("mirror", "gw-r", "172.31.0.17", GatewayRole::Active, 0),
        ];
        let mut objs = objs;
        for (i, o) in objs.iter_mut().enumerate() {
            o.resource_version = i as u64 + 1;
        }
        let Record::Endpoint(e) = &mut objs[13].record else { panic!() };
        e.public_key = key("gw-b");
        let Record::Endpoint(e) = &mut objs[15].record else { panic!() };
        e.public_key = key("me");
        let d = desired(&objs, "a", &facts);
        assert_eq!(d.remotes.keys().collect::<Vec<_>>(), vec!["b"]);
        assert_eq!(d.routes(), ["10.2.0.0/16".parse().unwrap()].into());
        assert_eq!(d.refused["node"], "192.168.0.0/16 covers 192.168.7.5, an address of this node");
        assert_eq!(
            d.refused["under"],
            "172.31.0.0/24 covers 172.31.0.11, an address of gateway \"me\" of cluster \"a\""
        );
        assert!(d.refused["meta"].contains("cloud metadata"), "{}", d.refused["meta"]);
        assert!(d.refused["half"].contains("broader than /8"), "{}", d.refused["half"]);
        // A shared key stays with who published it first.
        assert_eq!(d.refused["thief"], "gateway \"gw-t\" uses the key of a gateway of cluster \"b\"");
        assert_eq!(d.refused["mirror"], "gateway \"gw-r\" uses the key of a gateway of cluster \"a\"");
        assert_eq!(d.refused.len(), 6, "{:?}", d.refused);
        // Published in the same revision: neither can be told from the other, both are out.
        for o in &mut objs {
            o.resource_version = 1;
        }
        let d = desired(&objs, "a", &facts);
        assert_eq!(d.refused["b"], "gateway \"gw-b\" shares its key with another cluster's gateway");
        assert!(d.remotes.is_empty());
    }

    #[test]
    fn highest_priority_active_gateway_wins() {
        let objs = vec![
            cluster("b", "10.2.0.0/16"),
            endpoint("b", "gw-1", "172.31.0.21", GatewayRole::Active, 1),
            endpoint("b", "gw-22", "172.31.0.22", GatewayRole::Active, 5),
        ];
        let d = desired(&objs, "a", &LocalFacts::default());
        assert_eq!(d.remotes["b"].endpoint.ip().to_string(), "172.31.0.22");
    }

    #[test]
    fn the_other_gateways_of_a_cluster_are_warm_standbys_and_a_failover_swaps_them() {
        let objs = |gw1, gw2| {
            vec![
                cluster("b", "10.2.0.0/16"),
                endpoint("b", "gw-1", "172.31.0.21", gw1, 0),
                endpoint("b", "gw-22", "172.31.0.22", gw2, 0),
            ]
        };
        let d = desired(&objs(GatewayRole::Active, GatewayRole::Standby), "a", &LocalFacts::default());
        let b = &d.remotes["b"];
        assert_eq!(b.endpoint.ip().to_string(), "172.31.0.21");
        assert_eq!(
            b.standbys,
            vec![StandbyGateway {
                public_key: key("gw-22"),
                endpoint: "172.31.0.22:51820".parse().unwrap(),
                // Every address of its record, as the cable tries them.
                candidates: vec![causeway_broker_api::records::Candidate {
                    address: "172.31.0.22:51820".parse().unwrap(),
                    kind: causeway_broker_api::records::CandidateKind::Private,
                }],
                health_ip: None,
                priority: 0,
            }]
        );
        // Failover: same peers, the roles swapped (the cable moves the prefixes, nothing else).
        let after = desired(&objs(GatewayRole::Standby, GatewayRole::Active), "a", &LocalFacts::default());
        let b2 = &after.remotes["b"];
        assert_eq!(b2.public_key, key("gw-22"));
        assert_eq!(b2.standbys.iter().map(|s| s.public_key).collect::<Vec<_>>(), vec![key("gw-1")]);
        assert_eq!(b2.cidrs, b.cidrs);
    }

    #[test]
    fn plan_adds_missing_and_removes_stale() {
        let want: BTreeSet<IpNetwork> =
            ["10.2.0.0/16", "10.3.0.0/16"].iter().map(|s| s.parse().unwrap()).collect();
        let have: BTreeSet<IpNetwork> =
            ["10.3.0.0/16", "10.9.0.0/16"].iter().map(|s| s.parse().unwrap()).collect();
        let p = plan(&want, &have);
        assert_eq!(p.add, vec!["10.2.0.0/16".parse::<IpNetwork>().unwrap()]);
        assert_eq!(p.remove, vec!["10.9.0.0/16".parse::<IpNetwork>().unwrap()]);
        assert_eq!(plan(&want, &want), Plan { add: vec![], remove: vec![] });
    }
}
