//! Desired state, computed from the broker's records (pure: no I/O, unit-tested).
//!
//! For every remote cluster: its prefixes and the endpoint to connect to (the active gateway
//! with the highest priority). Routes and datapath entries are derived from that.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use causeway_broker_api::{ClusterRecord, EndpointRecord, GatewayRole, Object, Record};
use ipnetwork::IpNetwork;

use crate::cable::{RemoteEndpoint, StandbyGateway};

/// What the gateway should have, given the cluster set's records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Remote clusters that have a usable gateway, keyed by cluster id.
    pub remotes: BTreeMap<String, RemoteEndpoint>,
    /// The cluster-set policy and every cluster's CIDRs (the local one's too).
    pub policy: crate::policy::PolicyInput,
}

impl Desired {
    /// Every prefix routed into the tunnel.
    #[must_use]
    pub fn routes(&self) -> BTreeSet<IpNetwork> {
        self.remotes.values().flat_map(|r| r.cidrs.iter().copied()).collect()
    }
}

/// Builds the desired state from a snapshot of records, ignoring the local cluster's own.
#[must_use]
pub fn desired(objects: &[Object], local_cluster: &str) -> Desired {
    let mut clusters: BTreeMap<&str, &ClusterRecord> = BTreeMap::new();
    let mut endpoints: BTreeMap<&str, Vec<&EndpointRecord>> = BTreeMap::new();
    let mut policy = crate::policy::PolicyInput::default();
    for o in objects {
        if let Record::Cluster(c) = &o.record {
            policy.clusters.insert(c.cluster_id.clone(), c.all_cidrs().copied().collect());
        }
        if let Record::Endpoint(e) = &o.record
            && let Some(std::net::IpAddr::V4(ip)) = e.health_check_ip
        {
            policy.probe_ips.insert(ip);
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
    let mut remotes: BTreeMap<String, RemoteEndpoint> = BTreeMap::new();
    // CIDRs already routed: the local cluster's and the accepted remotes'. A cluster set in
    // overlap mode may hold clusters whose CIDRs clash; without address translation (not
    // there yet) they cannot be routed, so such a remote is left out, loudly.
    let mut taken: Vec<(String, IpNetwork)> = policy
        .clusters
        .get(local_cluster)
        .map(|v| v.iter().map(|n| (local_cluster.to_owned(), *n)).collect())
        .unwrap_or_default();
    for (id, c) in clusters {
        if let Some((other, net)) =
            taken.iter().find(|(_, t)| c.all_cidrs().any(|n| causeway_broker_api::validate::overlaps(n, t)))
        {
            tracing::warn!(
                cluster = id,
                clashes_with = %other,
                cidr = %net,
                "remote cluster's CIDRs overlap; not routed (overlap-mode translation is not supported yet)"
            );
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
                cidrs: c.all_cidrs().copied().collect(),
                health_ip: match ep.health_check_ip {
                    Some(std::net::IpAddr::V4(v4)) => Some(v4),
                    _ => None,
                },
                standbys,
            },
        );
        taken.extend(c.all_cidrs().map(|n| (id.to_owned(), *n)));
    }
    Desired { remotes, policy }
}

/// The active endpoint with the highest priority (ties: lowest hostname), else none.
fn pick_endpoint<'a>(eps: &[&'a EndpointRecord]) -> Option<&'a EndpointRecord> {
    eps.iter()
        .filter(|e| e.role == GatewayRole::Active)
        .max_by(|a, b| a.priority.cmp(&b.priority).then_with(|| b.hostname.cmp(&a.hostname)))
        .copied()
}

/// Changes to make a set of prefixes equal another.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan<T> {
    pub add: Vec<T>,
    pub remove: Vec<T>,
}

/// What to add and remove to go from `current` to `desired`.
#[must_use]
pub fn plan<T: Ord + Clone>(desired: &BTreeSet<T>, current: &BTreeSet<T>) -> Plan<T> {
    Plan {
        add: desired.difference(current).cloned().collect(),
        remove: current.difference(desired).cloned().collect(),
    }
}

#[cfg(test)]
mod tests {
    use causeway_broker_api::WireGuardKey;

    use super::*;

    fn cluster(id: &str, pod: &str) -> Object {
        Object::new(
            1,
            Record::Cluster(ClusterRecord {
                cluster_id: id.into(),
                pod_cidrs: vec![pod.parse().unwrap()],
                service_cidrs: vec![],
                global_cidr: None,
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
                public_key: WireGuardKey([host.len() as u8; 32]),
                backend: "wireguard".into(),
                role,
                priority,
                health_check_ip: None,
                generation: 1,
            }),
        )
    }

    #[test]
    fn remote_clusters_with_an_active_gateway_become_peers() {
        let objs = vec![
            cluster("a", "10.1.0.0/16"),
            endpoint("a", "gw-a", "172.31.0.11", GatewayRole::Active, 0),
            cluster("b", "10.2.0.0/16"),
            endpoint("b", "gw-b", "172.31.0.12", GatewayRole::Active, 0),
            cluster("c", "10.3.0.0/16"), // no endpoint yet
            cluster("d", "10.4.0.0/16"),
            endpoint("d", "gw-d", "172.31.0.14", GatewayRole::Standby, 9),
        ];
        let d = desired(&objs, "a");
        assert_eq!(d.remotes.keys().collect::<Vec<_>>(), vec!["b"]);
        let b = &d.remotes["b"];
        assert_eq!(b.endpoint, "172.31.0.12:51820".parse().unwrap());
        assert_eq!(d.routes().into_iter().collect::<Vec<_>>(), vec!["10.2.0.0/16".parse().unwrap()]);
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
        let d = desired(&objs, "a");
        assert_eq!(d.remotes.keys().collect::<Vec<_>>(), vec!["c"]);
    }

    #[test]
    fn highest_priority_active_gateway_wins() {
        let objs = vec![
            cluster("b", "10.2.0.0/16"),
            endpoint("b", "gw-1", "172.31.0.21", GatewayRole::Active, 1),
            endpoint("b", "gw-22", "172.31.0.22", GatewayRole::Active, 5),
        ];
        let d = desired(&objs, "a");
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
        let d = desired(&objs(GatewayRole::Active, GatewayRole::Standby), "a");
        let b = &d.remotes["b"];
        assert_eq!(b.endpoint.ip().to_string(), "172.31.0.21");
        assert_eq!(
            b.standbys,
            vec![StandbyGateway {
                public_key: WireGuardKey([5; 32]),
                endpoint: "172.31.0.22:51820".parse().unwrap()
            }]
        );
        // Failover: same peers, the roles swapped (the cable moves the prefixes, nothing else).
        let after = desired(&objs(GatewayRole::Standby, GatewayRole::Active), "a");
        let b2 = &after.remotes["b"];
        assert_eq!(b2.public_key, WireGuardKey([5; 32]));
        assert_eq!(b2.standbys.iter().map(|s| s.public_key).collect::<Vec<_>>(), vec![WireGuardKey([4; 32])]);
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
