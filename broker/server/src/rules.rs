//! The broker's rules, one planner per record kind: from the records as they stand (one
//! revision of the cache) and a request, the changes to commit, or why not. Pure: no store, no
//! lock, no clock. The broker runs a planner on its cache and commits the plan against that
//! revision; when another replica committed first it runs the planner again on the new state,
//! so every rule holds on the state the commit lands on.

use std::net::IpAddr;

use std::collections::BTreeSet;

use causeway_broker_api::{
    ClusterRecord, ClusterSetRecord, EndpointRecord, Object, Record, ServiceExportRecord, cluster_key,
    import_key, service_key,
};

use crate::{broker::BrokerError, cache::Records, imports, store::Change};

/// What a planner decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// Commit these, as one revision.
    Commit(Vec<Change>),
    /// The record is stored exactly so already: nothing to commit.
    Unchanged(Box<Object>),
}

/// The records a planner judges against.
#[derive(Clone, Copy, Debug)]
pub struct State<'a> {
    pub records: &'a Records,
    /// The broker's own addresses: no cluster's prefixes may cover them.
    pub broker_addresses: &'a [IpAddr],
}

impl<'a> State<'a> {
    fn stored(&self, key: &str) -> Option<&'a Object> {
        self.records.get(key)
    }

    /// The cluster set's settings (the defaults until the admin writes some).
    #[must_use]
    pub fn settings(&self) -> ClusterSetRecord {
        self.records.settings()
    }
}

/// Puts `record` unless the state says no: `first` sees the stored version, if any;
/// generations never go back; an identical record is [`Plan::Unchanged`]; `on_change` checks
/// what only matters for a real change.
fn put(
    state: State<'_>,
    record: &Record,
    first: impl FnOnce(Option<&Object>) -> Result<(), BrokerError>,
    on_change: impl FnOnce() -> Result<(), BrokerError>,
) -> Result<Plan, BrokerError> {
    let key = record.key();
    let old = state.stored(&key);
    first(old)?;
    if let Some(old) = old {
        let (stored, offered) = (old.record.generation(), record.generation());
        if offered < stored {
            return Err(BrokerError::StaleGeneration { key, stored, offered });
        }
        if old.record == *record {
            return Ok(Plan::Unchanged(Box::new(old.clone())));
        }
    }
    on_change()?;
    Ok(Plan::Commit(vec![Change::put(record.clone())]))
}

/// A cluster record (`new`: it must not exist yet): inside the pools, covering neither the
/// broker nor any gateway endpoint, overlapping no other cluster (global CIDRs in overlap mode).
pub fn put_cluster(state: State<'_>, c: &ClusterRecord, new: bool) -> Result<Plan, BrokerError> {
    // Overlap mode: the global prefixes the record leaves out are the stored ones, or new.
    let set = state.settings();
    let others: Vec<&ClusterRecord> =
        state.records.clusters().filter(|o| o.cluster_id != c.cluster_id).collect();
    let c = &crate::globals::complete(c, state.records.cluster(&c.cluster_id), &set, &taken(state, others))?;
    put(
        state,
        &Record::Cluster(c.clone()),
        |old| {
            if new && old.is_some() {
                Err(BrokerError::AlreadyRegistered(c.cluster_id.clone()))
            } else {
                Ok(())
            }
        },
        || {
            let set = state.settings();
            causeway_broker_api::check_pools(c, &set.pools).map_err(BrokerError::OutsidePools)?;
            clear_of_cluster_set_ips(c, &set)?;
            covers_nothing(state, c)?;
            if set.overlap_mode {
                causeway_broker_api::check_global_overlaps(c, state.records.clusters())
                    .map_err(BrokerError::GlobalOverlap)
            } else {
                causeway_broker_api::check_overlaps(c, state.records.clusters()).map_err(BrokerError::Overlap)
            }
        },
    )
}

/// `svc` with every address in one of `c`'s CIDRs moved to its global prefix (host bits kept);
/// addresses that are global already, or in no CIDR of `c`, are left for the checks.
fn to_global(c: &ClusterRecord, svc: &ServiceExportRecord) -> ServiceExportRecord {
    let map = |ip: IpAddr| {
        c.global_cidrs
            .iter()
            .find_map(|g| causeway_broker_api::GlobalCidr::map(&g.cidr, &g.global, ip))
            .unwrap_or(ip)
    };
    let mut out = svc.clone();
    for ip in &mut out.ips {
        *ip = map(*ip);
    }
    for e in &mut out.endpoints {
        e.ip = map(e.ip);
    }
    out
}

/// What a new global prefix must stay clear of besides `others`: the broker's and every
/// gateway's addresses.
fn taken<'a>(state: State<'a>, others: Vec<&'a ClusterRecord>) -> crate::globals::Taken<'a> {
    let addresses = state
        .broker_addresses
        .iter()
        .copied()
        .chain(state.records.endpoints().flat_map(EndpointRecord::addresses))
        .collect();
    crate::globals::Taken { others, addresses }
}

/// No prefix of a cluster may overlap the ClusterSetIP pool: a connection to a ClusterSetIP
/// is translated at `connect()`, so a pod with such an address would be unreachable.
fn clear_of_cluster_set_ips(c: &ClusterRecord, set: &ClusterSetRecord) -> Result<(), BrokerError> {
    let pool = set.cluster_set_ip_pool;
    let theirs = c.pod_cidrs.iter().chain(&c.service_cidrs).chain(c.globals());
    if let Some(cidr) = theirs.into_iter().find(|n| causeway_broker_api::validate::overlaps(n, &pool)) {
        return Err(BrokerError::AddressConflict(format!(
            "{cidr} of cluster {:?} overlaps the ClusterSetIP pool {pool}; choose CIDRs outside it (or move the pool with `causeway cluster-set --cluster-set-ip-pool`)",
            c.cluster_id
        )));
    }
    Ok(())
}

/// A cluster's prefixes may not cover the broker or any gateway endpoint (its own included):
/// every gateway would route that address into the cluster's tunnel.
fn covers_nothing(state: State<'_>, c: &ClusterRecord) -> Result<(), BrokerError> {
    if let Some((cidr, addr)) =
        causeway_broker_api::validate::covered(c, state.broker_addresses.iter().copied())
    {
        return Err(BrokerError::AddressConflict(format!(
            "{cidr} covers the broker's address {addr}; choose CIDRs that leave the broker and the underlay out"
        )));
    }
    for e in state.records.endpoints() {
        if let Some((cidr, addr)) = causeway_broker_api::validate::covered(c, e.addresses()) {
            return Err(BrokerError::AddressConflict(format!(
                "{cidr} covers {addr}, an address of gateway {:?} of cluster {:?}; a cluster's CIDRs may not cover a gateway endpoint",
                e.hostname, e.cluster_id
            )));
        }
    }
    Ok(())
}

/// An endpoint of a registered cluster: its addresses lie in no cluster's prefixes, its
/// health-check address in its own cluster's, its key is nobody else's, and its cluster keeps
/// to its quota.
pub fn put_endpoint(state: State<'_>, e: &EndpointRecord) -> Result<Plan, BrokerError> {
    put(
        state,
        &Record::Endpoint(e.clone()),
        |old| {
            let own = state
                .records
                .cluster(&e.cluster_id)
                .ok_or_else(|| BrokerError::ClusterNotRegistered(e.cluster_id.clone()))?;
            check_endpoint(state, e, own, old.is_some())
        },
        || Ok(()),
    )
}

fn check_endpoint(
    state: State<'_>,
    e: &EndpointRecord,
    own: &ClusterRecord,
    exists: bool,
) -> Result<(), BrokerError> {
    for c in state.records.clusters() {
        if let Some((cidr, addr)) = causeway_broker_api::validate::covered(c, e.addresses()) {
            return Err(BrokerError::AddressConflict(format!(
                "{addr} lies in {cidr} of cluster {:?}; a gateway endpoint must be outside every cluster's CIDRs",
                c.cluster_id
            )));
        }
    }
    // Gateways of one cluster are that cluster's business; a key shared across clusters
    // would let one member answer for another's tunnel.
    if let Some(other) =
        state.records.endpoints().find(|o| o.public_key == e.public_key && o.cluster_id != e.cluster_id)
    {
        return Err(BrokerError::DuplicateKey {
            key: e.public_key,
            cluster: other.cluster_id.clone(),
            hostname: other.hostname.clone(),
        });
    }
    if let Some(ip) = e.health_check_ip {
        let inside = own.pod_cidrs.iter().copied().chain(own.global_pod_cidrs()).any(|n| n.contains(ip));
        if !inside {
            return Err(BrokerError::BadRequest(format!(
                "healthCheckIp: {ip} is outside cluster {:?}'s pod CIDRs ({}); probes must be answered inside the cluster's own prefixes",
                e.cluster_id,
                own.pod_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            )));
        }
    }
    let max = state.settings().quotas.max_endpoints;
    if !exists && state.records.endpoints_of(&e.cluster_id).count() >= max as usize {
        return Err(BrokerError::QuotaExceeded {
            cluster: e.cluster_id.clone(),
            what: "gateway endpoints",
            max,
        });
    }
    Ok(())
}

/// One of a registered cluster's exported services: its ClusterIPs in the cluster's service
/// CIDRs (its global CIDR in overlap mode), a headless export's endpoints in its pod CIDRs,
/// its cluster within its quota. The service's import is merged again in the same revision.
pub fn put_service(state: State<'_>, svc: &ServiceExportRecord) -> Result<Plan, BrokerError> {
    // Overlap mode: an exporter that knows only the real ClusterIP (and pod addresses) has
    // them stored at their global addresses, which is what the rest of the set reaches.
    let globalized = state
        .records
        .cluster(&svc.cluster_id)
        .filter(|_| state.settings().overlap_mode)
        .map(|c| to_global(c, svc));
    let svc = globalized.as_ref().unwrap_or(svc);
    let plan = put(
        state,
        &Record::ServiceExport(svc.clone()),
        |_| {
            let c = state
                .records
                .cluster(&svc.cluster_id)
                .ok_or_else(|| BrokerError::ClusterNotRegistered(svc.cluster_id.clone()))?;
            let set = state.settings();
            let max = set.quotas.max_services;
            if state.stored(&service_key(&svc.cluster_id, &svc.namespace, &svc.name)).is_none()
                && state.records.services_of(&svc.cluster_id).count() >= max as usize
            {
                return Err(BrokerError::QuotaExceeded {
                    cluster: svc.cluster_id.clone(),
                    what: "exported services",
                    max,
                });
            }
            let (services, pods): (Vec<ipnetwork::IpNetwork>, Vec<ipnetwork::IpNetwork>) = if set.overlap_mode
            {
                (c.global_service_cidrs().collect(), c.global_pod_cidrs().collect())
            } else {
                (c.service_cidrs.clone(), c.pod_cidrs.clone())
            };
            let list =
                |r: &[ipnetwork::IpNetwork]| r.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
            let kind = |what: &'static str| {
                if set.overlap_mode { what.replacen("CIDRs", "global prefixes", 1) } else { what.to_owned() }
            };
            if let Some(ip) = svc.ips.iter().find(|ip| !services.iter().any(|r| r.contains(**ip))) {
                return Err(BrokerError::BadRequest(format!(
                    "ips: {ip} is outside cluster {:?}'s {} ({}); export the service's ClusterIP",
                    svc.cluster_id,
                    kind("service CIDRs"),
                    list(&services)
                )));
            }
            if let Some(e) = svc.endpoints.iter().find(|e| !pods.iter().any(|r| r.contains(e.ip))) {
                return Err(BrokerError::BadRequest(format!(
                    "endpoints: {} is outside cluster {:?}'s {} ({}); a headless export lists its pods' addresses",
                    e.ip,
                    svc.cluster_id,
                    kind("pod CIDRs"),
                    list(&pods)
                )));
            }
            Ok(())
        },
        || Ok(()),
    )?;
    match plan {
        Plan::Commit(mut changes) => {
            changes.extend(import_changes(state, &svc.namespace, &svc.name, Some(svc), None)?);
            Ok(Plan::Commit(changes))
        }
        unchanged @ Plan::Unchanged(_) => Ok(unchanged),
    }
}

/// One cluster's export of `<namespace>/<name>`, and the import merged again without it.
pub fn delete_service(
    state: State<'_>,
    cluster_id: &str,
    namespace: &str,
    name: &str,
) -> Result<Plan, BrokerError> {
    let key = service_key(cluster_id, namespace, name);
    if state.stored(&key).is_none() {
        return Err(BrokerError::NotFound(key));
    }
    let mut changes = vec![Change::Delete(key)];
    changes.extend(import_changes(state, namespace, name, None, Some(cluster_id))?);
    Ok(Plan::Commit(changes))
}

/// The change to `<namespace>/<name>`'s import once `put` is stored and `gone`'s export is
/// deleted (nothing when the import comes out the same).
fn import_changes(
    state: State<'_>,
    namespace: &str,
    name: &str,
    put: Option<&ServiceExportRecord>,
    gone: Option<&str>,
) -> Result<Option<Change>, BrokerError> {
    let exports: Vec<&ServiceExportRecord> = state
        .records
        .clusters()
        .filter(|c| Some(c.cluster_id.as_str()) != gone)
        .filter_map(|c| match put {
            Some(p) if p.cluster_id == c.cluster_id => Some(p),
            _ => state.records.export(&c.cluster_id, namespace, name),
        })
        .collect();
    let previous = state.records.import(namespace, name);
    let held: BTreeSet<std::net::IpAddr> = state
        .records
        .imports()
        .filter(|i| (i.namespace.as_str(), i.name.as_str()) != (namespace, name))
        .flat_map(|i| i.ips.iter().copied())
        .collect();
    let merged = imports::merge(previous, &exports, state.settings().cluster_set_ip_pool, &held)?;
    Ok(match (previous, merged) {
        (Some(_), None) => Some(Change::Delete(import_key(namespace, name))),
        (previous, Some(m)) if previous != Some(&m) => Some(Change::put(Record::ServiceImport(m))),
        _ => None,
    })
}

/// The cluster set's settings: every cluster stays inside the new pools, and the clusters'
/// prefixes may not overlap under the new mode (global CIDRs in overlap mode).
pub fn put_cluster_set(state: State<'_>, settings: &ClusterSetRecord) -> Result<Plan, BrokerError> {
    // Overlap mode on: every cluster gets the global prefixes it lacks, in the same revision
    // (each allocation sees the ones before it).
    let stored: Vec<&ClusterRecord> = state.records.clusters().collect();
    let mut clusters: Vec<ClusterRecord> = Vec::with_capacity(stored.len());
    for (i, c) in stored.iter().enumerate() {
        let others = clusters.iter().chain(stored[i + 1..].iter().copied()).collect();
        let done = crate::globals::complete(c, Some(c), settings, &taken(state, others))?;
        clusters.push(done);
    }
    let plan = put(
        state,
        &Record::ClusterSet(settings.clone()),
        |_| Ok(()),
        || {
            causeway_broker_api::validate_cluster_set_ip_pool(&settings.cluster_set_ip_pool)?;
            if let Some(i) = state
                .records
                .imports()
                .find(|i| i.ips.iter().any(|ip| !settings.cluster_set_ip_pool.contains(*ip)))
            {
                return Err(BrokerError::AddressConflict(format!(
                    "the new ClusterSetIP pool {} leaves out {}, the ClusterSetIP of {}/{}; a ClusterSetIP is kept for the life of its service (unexport it first, or keep it in the pool)",
                    settings.cluster_set_ip_pool,
                    i.ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
                    i.namespace,
                    i.name
                )));
            }
            for c in &clusters {
                clear_of_cluster_set_ips(c, settings)?;
                causeway_broker_api::check_pools(c, &settings.pools).map_err(|e| {
                    BrokerError::AddressConflict(format!(
                        "the new pools leave out cluster {:?}: {e}; remove that cluster first, or keep its CIDRs in the pools",
                        c.cluster_id
                    ))
                })?;
                if settings.overlap_mode {
                    causeway_broker_api::check_global_overlaps(c, &clusters)
                        .map_err(BrokerError::GlobalOverlap)?;
                } else {
                    causeway_broker_api::check_overlaps(c, &clusters).map_err(BrokerError::Overlap)?;
                }
            }
            Ok(())
        },
    )?;
    Ok(match plan {
        Plan::Commit(mut changes) => {
            for (before, after) in stored.iter().zip(clusters) {
                if **before != after {
                    changes.push(Change::put(Record::Cluster(after)));
                }
            }
            Plan::Commit(changes)
        }
        unchanged @ Plan::Unchanged(_) => unchanged,
    })
}

/// A record of the whole set with no rule of its own beyond generations (policy rules, the
/// default policy action).
pub fn put_set_record(state: State<'_>, record: &Record) -> Result<Plan, BrokerError> {
    put(state, record, |_| Ok(()), || Ok(()))
}

/// A cluster, with its endpoints and service exports, as one revision.
pub fn delete_cluster(state: State<'_>, cluster_id: &str) -> Result<Plan, BrokerError> {
    let key = cluster_key(cluster_id);
    if state.stored(&key).is_none() {
        return Err(BrokerError::NotFound(key));
    }
    let mut changes: Vec<Change> = state
        .records
        .endpoints_of(cluster_id)
        .chain(state.records.services_of(cluster_id))
        .map(|o| Change::Delete(o.record.key()))
        .collect();
    for o in state.records.services_of(cluster_id) {
        if let Record::ServiceExport(s) = &o.record {
            changes.extend(import_changes(state, &s.namespace, &s.name, None, Some(cluster_id))?);
        }
    }
    changes.push(Change::Delete(key));
    Ok(Plan::Commit(changes))
}

/// One stored record (an endpoint, a service export, a policy rule).
pub fn delete(state: State<'_>, key: &str) -> Result<Plan, BrokerError> {
    if state.stored(key).is_none() {
        return Err(BrokerError::NotFound(key.to_owned()));
    }
    Ok(Plan::Commit(vec![Change::Delete(key.to_owned())]))
}

/// Those of `keys` still stored (endpoints whose lease ran out; gone ones are no error).
#[must_use]
pub fn delete_present(state: State<'_>, keys: &[String]) -> Plan {
    Plan::Commit(
        keys.iter().filter(|k| state.stored(k).is_some()).map(|k| Change::Delete(k.clone())).collect(),
    )
}

#[cfg(test)]
mod tests {
    //! The rules on plain data: no store, no broker. (The HTTP API tests run the same rules
    //! through every store, racing replicas included.)

    use causeway_broker_api::{WireGuardKey, endpoint_key};

    use super::*;

    fn cluster(id: &str, pod: &str, svc: &str) -> ClusterRecord {
        ClusterRecord::new(id, vec![pod.parse().unwrap()], vec![svc.parse().unwrap()])
    }

    fn endpoint(id: &str, host: &str, ip: &str, key: u8) -> EndpointRecord {
        EndpointRecord::new(id, host, ip.parse().unwrap(), WireGuardKey([key; 32]))
    }

    /// Cluster a (10.1/16) with gateway a/gw at 172.31.0.11, and cluster b (10.2/16).
    fn stored() -> Vec<Object> {
        vec![
            Object::new(1, Record::Cluster(cluster("a", "10.1.0.0/16", "10.101.0.0/16"))),
            Object::new(2, Record::Cluster(cluster("b", "10.2.0.0/16", "10.102.0.0/16"))),
            Object::new(3, Record::Endpoint(endpoint("a", "gw", "172.31.0.11", 1))),
        ]
    }

    fn index(items: &[Object]) -> Records {
        items.iter().cloned().collect()
    }

    fn state(records: &Records) -> State<'_> {
        State { records, broker_addresses: &[] }
    }

    #[test]
    fn a_cluster_is_checked_against_the_others_the_endpoints_and_the_broker() {
        let items = stored();
        let c = cluster("c", "10.3.0.0/16", "10.103.0.0/16");
        assert_eq!(
            put_cluster(state(&index(&items)), &c, true).unwrap(),
            Plan::Commit(vec![Change::put(Record::Cluster(c))])
        );
        let overlapping = cluster("c", "10.2.128.0/17", "10.103.0.0/16");
        assert!(matches!(
            put_cluster(state(&index(&items)), &overlapping, true),
            Err(BrokerError::Overlap(_))
        ));
        let covering = cluster("c", "172.31.0.0/24", "10.103.0.0/16");
        let err = put_cluster(state(&index(&items)), &covering, true).unwrap_err();
        assert!(err.to_string().contains("172.31.0.11"), "{err}");
        let broker: [IpAddr; 1] = ["10.3.0.1".parse().unwrap()];
        let near_broker = State { records: &index(&items), broker_addresses: &broker };
        let err = put_cluster(near_broker, &cluster("c", "10.3.0.0/16", "10.103.0.0/16"), true).unwrap_err();
        assert!(err.to_string().contains("the broker's address 10.3.0.1"), "{err}");
        // Registering an id that exists is refused; the same record again is no change.
        let a = cluster("a", "10.1.0.0/16", "10.101.0.0/16");
        assert!(matches!(
            put_cluster(state(&index(&items)), &a, true),
            Err(BrokerError::AlreadyRegistered(_))
        ));
        assert_eq!(
            put_cluster(state(&index(&items)), &a, false).unwrap(),
            Plan::Unchanged(Box::new(items[0].clone()))
        );
    }

    #[test]
    fn generations_never_go_back() {
        let mut items = stored();
        let mut newer = cluster("a", "10.1.0.0/16", "10.101.0.0/16");
        newer.generation = 5;
        items[0] = Object::new(1, Record::Cluster(newer));
        let err = put_cluster(state(&index(&items)), &cluster("a", "10.1.0.0/16", "10.101.0.0/16"), false)
            .unwrap_err();
        assert!(matches!(err, BrokerError::StaleGeneration { stored: 5, offered: 1, .. }), "{err}");
    }

    #[test]
    fn an_endpoint_needs_its_cluster_its_own_key_and_addresses_outside_every_cluster() {
        let items = stored();
        let ok = endpoint("b", "gw", "172.31.0.12", 2);
        assert_eq!(
            put_endpoint(state(&index(&items)), &ok).unwrap(),
            Plan::Commit(vec![Change::put(Record::Endpoint(ok))])
        );
        assert!(matches!(
            put_endpoint(state(&index(&items)), &endpoint("z", "gw", "172.31.0.13", 3)),
            Err(BrokerError::ClusterNotRegistered(id)) if id == "z"
        ));
        assert!(matches!(
            put_endpoint(state(&index(&items)), &endpoint("b", "gw", "172.31.0.12", 1)),
            Err(BrokerError::DuplicateKey { cluster, .. }) if cluster == "a"
        ));
        let inside = put_endpoint(state(&index(&items)), &endpoint("b", "gw", "10.1.0.9", 2)).unwrap_err();
        assert!(inside.to_string().contains("lies in 10.1.0.0/16 of cluster \"a\""), "{inside}");
        let mut foreign_probe = endpoint("b", "gw", "172.31.0.12", 2);
        foreign_probe.health_check_ip = Some("10.1.0.0".parse().unwrap());
        assert!(matches!(
            put_endpoint(state(&index(&items)), &foreign_probe),
            Err(BrokerError::BadRequest(_))
        ));
    }

    #[test]
    fn deleting_a_cluster_takes_its_endpoints_and_services_in_one_plan() {
        let mut items = stored();
        let svc = ServiceExportRecord {
            cluster_id: "a".into(),
            namespace: "default".into(),
            name: "web".into(),
            ips: vec!["10.101.0.10".parse().unwrap()],
            ports: vec![],
            service_type: Default::default(),
            endpoints: Vec::new(),
            ready_endpoints: None,
            source: causeway_broker_api::ExportSource::Cli,
            generation: 1,
        };
        assert!(matches!(put_service(state(&index(&items)), &svc).unwrap(), Plan::Commit(_)));
        items.push(Object::new(4, Record::ServiceExport(svc)));
        assert_eq!(
            delete_cluster(state(&index(&items)), "a").unwrap(),
            Plan::Commit(vec![
                Change::Delete(endpoint_key("a", "gw")),
                Change::Delete(service_key("a", "default", "web")),
                Change::Delete(cluster_key("a")),
            ])
        );
        assert!(matches!(delete_cluster(state(&index(&items)), "z"), Err(BrokerError::NotFound(_))));
        assert_eq!(
            delete_present(state(&index(&items)), &[endpoint_key("a", "gw"), endpoint_key("b", "gone")]),
            Plan::Commit(vec![Change::Delete(endpoint_key("a", "gw"))])
        );
    }
}
