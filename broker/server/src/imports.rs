//! Service imports: every cluster's export of one `<namespace>/<name>` merged into the one
//! service the cluster set sees (KEP-1645's ServiceImport), and the ClusterSetIP it is reached
//! at. Pure: the rules call [`merge`] inside the plan that changes an export, so an import is
//! committed in the same revision as the export that made it.
//!
//! Conflicts follow KEP-1645: the oldest export wins. "Oldest" is the order in which the
//! clusters' exports joined the import, kept in the import itself (a cluster that re-exports
//! after withdrawing goes to the back), so it needs no clock and no member can claim to be
//! older than it is.
//! - **Type**: the oldest export's type is the service's; an export of the other type takes no
//!   part (`excluded`) and carries a conflict.
//! - **Ports**: the union of the exports' ports. A port of a younger export that gives a known
//!   number and protocol another name, or a known name another number or protocol, is left
//!   out of that cluster's ports, and the cluster carries a conflict naming the older export.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use causeway_broker_api::{
    ImportedCluster, ServiceExportRecord, ServiceImportRecord, ServicePort, ServiceType,
};
use ipnetwork::IpNetwork;

/// No ClusterSetIP is left in the pool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the ClusterSetIP pool {pool} is exhausted ({held} addresses held); widen it with `causeway cluster-set --cluster-set-ip-pool`, or unexport services"
)]
pub struct PoolExhausted {
    pub pool: IpNetwork,
    pub held: usize,
}

/// The import of one service name after its exports changed. `exports` are every cluster's
/// current export of that name (any order); `previous` is the stored import; `held` are the
/// ClusterSetIPs of every other import. `None`: nobody exports the name any more.
///
/// The result keeps `previous`'s generation when nothing changed, and is one past it
/// otherwise.
pub fn merge(
    previous: Option<&ServiceImportRecord>,
    exports: &[&ServiceExportRecord],
    pool: IpNetwork,
    held: &BTreeSet<IpAddr>,
) -> Result<Option<ServiceImportRecord>, PoolExhausted> {
    let Some(first) = exports.first() else { return Ok(None) };
    let by_cluster: BTreeMap<&str, &ServiceExportRecord> =
        exports.iter().map(|e| (e.cluster_id.as_str(), *e)).collect();
    // The age order: those already in the import keep their place, newcomers go to the back
    // (by name, for when several arrive in one revision, as after a restore).
    let mut order: Vec<&str> = previous
        .into_iter()
        .flat_map(|p| p.clusters.iter().map(|c| c.cluster_id.as_str()))
        .filter(|id| by_cluster.contains_key(id))
        .collect();
    for id in by_cluster.keys() {
        if !order.contains(id) {
            order.push(id);
        }
    }
    let oldest = by_cluster[order[0]];
    let service_type = oldest.service_type;

    let mut ports: Vec<ServicePort> = Vec::new();
    let mut clusters = Vec::with_capacity(order.len());
    // Who first defined each port, for naming the winner of a conflict.
    let mut owner: Vec<&str> = Vec::new();
    for id in &order {
        let export = by_cluster[id];
        if export.service_type != service_type {
            clusters.push(ImportedCluster {
                cluster_id: (*id).to_owned(),
                ports: Vec::new(),
                excluded: true,
                conflict: Some(format!(
                    "type {} conflicts with {service_type}, the type of the oldest export (cluster {:?})",
                    export.service_type, oldest.cluster_id
                )),
            });
            continue;
        }
        let mut served = Vec::new();
        let mut lost = Vec::new();
        for p in &export.ports {
            let same_number = ports.iter().position(|q| q.port == p.port && q.protocol == p.protocol);
            let same_name =
                p.name.as_ref().and_then(|n| ports.iter().position(|q| q.name.as_ref() == Some(n)));
            match (same_number, same_name) {
                (Some(i), _) if ports[i].name == p.name => served.push(p.clone()),
                (None, None) => {
                    ports.push(p.clone());
                    owner.push(id);
                    served.push(p.clone());
                }
                (Some(i), _) | (None, Some(i)) => lost.push(format!(
                    "port {} conflicts with {} of the older export of cluster {:?}",
                    describe(p),
                    describe(&ports[i]),
                    owner[i]
                )),
            }
        }
        clusters.push(ImportedCluster {
            cluster_id: (*id).to_owned(),
            ports: served,
            excluded: false,
            conflict: (!lost.is_empty()).then(|| lost.join("; ")),
        });
    }
    ports.sort_by(|a, b| (a.port, &a.protocol).cmp(&(b.port, &b.protocol)));

    let ips = match service_type {
        ServiceType::Headless => Vec::new(),
        ServiceType::ClusterSetIP => {
            let kept = previous
                .filter(|p| p.service_type == ServiceType::ClusterSetIP)
                .and_then(|p| p.ips.first().copied())
                .filter(|ip| pool.contains(*ip) && !held.contains(ip));
            let ip = match kept {
                Some(ip) => ip,
                None => allocate(pool, held, &first.namespace, &first.name)?,
            };
            vec![ip]
        }
    };
    let mut import = ServiceImportRecord {
        namespace: first.namespace.clone(),
        name: first.name.clone(),
        service_type,
        ips,
        ports,
        clusters,
        generation: previous.map_or(0, |p| p.generation),
    };
    if previous != Some(&import) {
        import.generation += 1;
    }
    Ok(Some(import))
}

fn describe(p: &ServicePort) -> String {
    match &p.name {
        Some(n) => format!("{}/{} ({n:?})", p.port, p.protocol),
        None => format!("{}/{} (unnamed)", p.port, p.protocol),
    }
}

/// A free ClusterSetIP for `<namespace>/<name>`: the search starts at a point hashed from the
/// name, so a service that is withdrawn and exported again usually gets its old address back,
/// and an address just freed is not the next one handed out (clients may still cache it).
/// The pool's first and last addresses are never used.
pub fn allocate(
    pool: IpNetwork,
    held: &BTreeSet<IpAddr>,
    namespace: &str,
    name: &str,
) -> Result<IpAddr, PoolExhausted> {
    let exhausted = || PoolExhausted { pool, held: held.len() };
    let IpNetwork::V4(v4) = pool else { return Err(exhausted()) };
    let base = u32::from(v4.network());
    let size = 1u64 << (32 - u32::from(v4.prefix()));
    let usable = size.saturating_sub(2);
    if usable == 0 {
        return Err(exhausted());
    }
    let start = fnv1a(format!("{namespace}/{name}").as_bytes()) % usable;
    (0..usable)
        .map(|i| {
            IpAddr::V4(Ipv4Addr::from(
                base + 1 + u32::try_from((start + i) % usable).expect("inside a v4 pool"),
            ))
        })
        .find(|ip| !held.contains(ip))
        .ok_or_else(exhausted)
}

/// FNV-1a, 64 bits: stable across versions and platforms, unlike `std`'s hasher.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use causeway_broker_api::{ExportSource, ServiceEndpoint};

    use super::*;

    fn port(n: u16, proto: &str, name: Option<&str>) -> ServicePort {
        ServicePort { name: name.map(str::to_owned), port: n, protocol: proto.to_owned() }
    }

    fn export(cluster: &str, ports: Vec<ServicePort>) -> ServiceExportRecord {
        ServiceExportRecord {
            cluster_id: cluster.into(),
            namespace: "shop".into(),
            name: "web".into(),
            ips: vec!["10.101.0.10".parse().unwrap()],
            ports,
            service_type: ServiceType::ClusterSetIP,
            endpoints: Vec::new(),
            ready_endpoints: None,
            source: ExportSource::Cli,
            generation: 1,
        }
    }

    fn headless(cluster: &str) -> ServiceExportRecord {
        ServiceExportRecord {
            ips: Vec::new(),
            service_type: ServiceType::Headless,
            endpoints: vec![ServiceEndpoint {
                ip: "10.1.0.5".parse().unwrap(),
                hostname: Some("db-0".into()),
            }],
            ..export(cluster, vec![port(5432, "TCP", Some("pg"))])
        }
    }

    fn pool() -> IpNetwork {
        "241.0.0.0/16".parse().unwrap()
    }

    /// Merges `exports` in the given order, one at a time, as the broker sees them arrive.
    fn arrive(exports: &[ServiceExportRecord]) -> ServiceImportRecord {
        let mut import = None;
        for i in 1..=exports.len() {
            let now: Vec<&ServiceExportRecord> = exports[..i].iter().collect();
            import = merge(import.as_ref(), &now, pool(), &BTreeSet::new()).unwrap();
        }
        import.unwrap()
    }

    #[test]
    fn ports_are_the_union_and_each_cluster_serves_its_own() {
        let import = arrive(&[
            export("b", vec![port(80, "TCP", Some("http"))]),
            export("a", vec![port(80, "TCP", Some("http")), port(443, "TCP", Some("https"))]),
        ]);
        assert_eq!(import.service_type, ServiceType::ClusterSetIP);
        assert_eq!(import.ports, vec![port(80, "TCP", Some("http")), port(443, "TCP", Some("https"))]);
        // b exported first, so it stays first although a sorts before it.
        assert_eq!(
            import.clusters,
            vec![
                ImportedCluster {
                    cluster_id: "b".into(),
                    ports: vec![port(80, "TCP", Some("http"))],
                    excluded: false,
                    conflict: None
                },
                ImportedCluster {
                    cluster_id: "a".into(),
                    ports: vec![port(80, "TCP", Some("http")), port(443, "TCP", Some("https"))],
                    excluded: false,
                    conflict: None
                },
            ]
        );
        assert_eq!(import.ips.len(), 1);
        assert!(pool().contains(import.ips[0]));
    }

    #[test]
    fn the_oldest_export_wins_a_port_conflict() {
        let import = arrive(&[
            export("c", vec![port(80, "TCP", Some("http"))]),
            // Same number and protocol, another name; same name, another protocol; and a port
            // nobody else has.
            export("a", vec![port(80, "TCP", Some("web")), port(8080, "TCP", None)]),
            export("b", vec![port(81, "UDP", Some("http")), port(80, "TCP", Some("http"))]),
        ]);
        assert_eq!(import.ports, vec![port(80, "TCP", Some("http")), port(8080, "TCP", None)]);
        let c = |id: &str| import.clusters.iter().find(|c| c.cluster_id == id).unwrap().clone();
        assert_eq!(c("c").conflict, None);
        assert_eq!(c("a").ports, vec![port(8080, "TCP", None)]);
        assert_eq!(
            c("a").conflict.as_deref(),
            Some(r#"port 80/TCP ("web") conflicts with 80/TCP ("http") of the older export of cluster "c""#)
        );
        assert_eq!(c("b").ports, vec![port(80, "TCP", Some("http"))]);
        assert_eq!(
            c("b").conflict.as_deref(),
            Some(r#"port 81/UDP ("http") conflicts with 80/TCP ("http") of the older export of cluster "c""#)
        );
        assert!(!c("a").excluded && !c("b").excluded);
    }

    #[test]
    fn the_oldest_export_sets_the_type_and_the_other_type_is_left_out() {
        let import = arrive(&[headless("b"), export("a", vec![port(5432, "TCP", Some("pg"))])]);
        assert_eq!(import.service_type, ServiceType::Headless);
        assert!(import.ips.is_empty(), "a headless service has no ClusterSetIP");
        assert_eq!(import.clusters[0].conflict, None);
        assert!(import.clusters[1].excluded && import.clusters[1].ports.is_empty());
        assert_eq!(
            import.clusters[1].conflict.as_deref(),
            Some(r#"type ClusterSetIP conflicts with Headless, the type of the oldest export (cluster "b")"#)
        );
        // The headless export goes: the other is the oldest now, and the service turns into
        // a ClusterSetIP one with an address.
        let a = export("a", vec![port(5432, "TCP", Some("pg"))]);
        let after = merge(Some(&import), &[&a], pool(), &BTreeSet::new()).unwrap().unwrap();
        assert_eq!(after.service_type, ServiceType::ClusterSetIP);
        assert_eq!(after.ips.len(), 1);
        assert_eq!(after.clusters.len(), 1);
        assert_eq!(after.clusters[0].conflict, None);
        assert_eq!(after.generation, import.generation + 1);
    }

    #[test]
    fn age_is_kept_across_updates_and_lost_by_withdrawing() {
        let (a, b) = (
            export("a", vec![port(80, "TCP", Some("http"))]),
            export("b", vec![port(80, "TCP", Some("web"))]),
        );
        let import = arrive(&[a.clone(), b.clone()]);
        assert!(import.clusters[1].conflict.is_some());
        // a updates its export (another IP): it keeps its place and keeps winning.
        let a2 =
            ServiceExportRecord { ips: vec!["10.101.0.11".parse().unwrap()], generation: 2, ..a.clone() };
        let again = merge(Some(&import), &[&b, &a2], pool(), &BTreeSet::new()).unwrap().unwrap();
        assert_eq!(again, import, "the import does not change when no merged field does");
        // a withdraws and comes back: b is older now.
        let without_a = merge(Some(&import), &[&b], pool(), &BTreeSet::new()).unwrap().unwrap();
        let back = merge(Some(&without_a), &[&b, &a], pool(), &BTreeSet::new()).unwrap().unwrap();
        assert_eq!(back.clusters[0].cluster_id, "b");
        assert_eq!(back.clusters[0].conflict, None);
        assert!(back.clusters[1].conflict.is_some());
        assert_eq!(back.ports, vec![port(80, "TCP", Some("web"))]);
        // The last export goes: no import.
        assert_eq!(merge(Some(&back), &[], pool(), &BTreeSet::new()).unwrap(), None);
    }

    #[test]
    fn a_clusterset_ip_is_stable_and_never_one_held_by_another_service() {
        let a = export("a", vec![port(80, "TCP", None)]);
        let import = arrive(std::slice::from_ref(&a));
        let ip = import.ips[0];
        // Stable: the same name hashes to the same start, and a kept import keeps its IP.
        assert_eq!(merge(None, &[&a], pool(), &BTreeSet::new()).unwrap().unwrap().ips, vec![ip]);
        let updated = ServiceExportRecord { ports: vec![port(81, "TCP", None)], generation: 2, ..a.clone() };
        assert_eq!(
            merge(Some(&import), &[&updated], pool(), &BTreeSet::new()).unwrap().unwrap().ips,
            vec![ip]
        );
        // Held by another service: the next free one.
        let held: BTreeSet<IpAddr> = [ip].into();
        let other = merge(None, &[&a], pool(), &held).unwrap().unwrap().ips[0];
        assert_ne!(other, ip);
        assert!(pool().contains(other));
        // Every address of a small pool is handed out once, then the pool is exhausted.
        let small: IpNetwork = "241.0.0.0/29".parse().unwrap();
        let mut held = BTreeSet::new();
        for i in 0..6 {
            let ip = allocate(small, &held, "ns", &format!("svc-{i}")).unwrap();
            assert!(small.contains(ip) && ip != small.network() && ip != small.broadcast());
            assert!(held.insert(ip), "{ip} handed out twice");
        }
        assert_eq!(allocate(small, &held, "ns", "one-more"), Err(PoolExhausted { pool: small, held: 6 }));
        assert!(merge(None, &[&a], small, &held).is_err());
    }

    #[test]
    fn the_pool_spreads_names() {
        let held = BTreeSet::new();
        let ips: BTreeSet<IpAddr> =
            (0..50).map(|i| allocate(pool(), &held, "ns", &format!("svc-{i}")).unwrap()).collect();
        assert!(ips.len() > 45, "names hash to distinct starting points: {}", ips.len());
    }
}
