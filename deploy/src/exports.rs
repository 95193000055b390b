//! Publishes the cluster's MCS `ServiceExport`s to the broker as ServiceExport records: a
//! watch on ServiceExport objects marks the set dirty, and each reconcile compares what the
//! cluster exports (with its Services' cluster IPs and ports) against what the broker holds for
//! this cluster, writing only the difference. A periodic resync catches Service changes.
//! Records the publisher writes say so (`source: kubernetes`); it withdraws only those, so
//! exports an operator made with `causeway export` are left alone.
//!
//! Readiness comes from the Services' EndpointSlices (watched: a change is published within a
//! second): a ClusterIP Service's record carries how many endpoints are ready (`0` takes the
//! cluster out of the service's backends and out of DNS), a headless Service's record lists
//! its ready endpoints' addresses and hostnames.

use std::{collections::BTreeMap, time::Duration};

use causeway_broker_api::{
    BrokerClient, ExportSource, Record, ServiceEndpoint, ServiceExportRecord, ServicePort, ServiceType,
};
use futures::StreamExt as _;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams},
    runtime::watcher,
};
use tracing::{debug, info, warn};

use crate::crds::{MCS_GROUP, MCS_VERSION};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("broker: {0}")]
    Broker(#[from] causeway_broker_api::ClientError),
}

pub(crate) fn service_export_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(MCS_GROUP, MCS_VERSION, "ServiceExport"),
        "serviceexports",
    )
}

/// The label EndpointSlices carry with their Service's name.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The ready endpoints of a Service's EndpointSlices: address and hostname (the endpoint's
/// `hostname`, else its pod's name). An endpoint counts unless it says it is not ready.
#[must_use]
pub fn ready_endpoints(slices: &[EndpointSlice]) -> Vec<ServiceEndpoint> {
    let mut out: Vec<ServiceEndpoint> = slices
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .flat_map(|e| {
            let hostname = e
                .hostname
                .clone()
                .or_else(|| e.target_ref.as_ref().and_then(|r| r.name.clone()))
                .filter(|h| !h.is_empty());
            e.addresses.iter().filter_map(move |a| {
                Some(ServiceEndpoint { ip: a.parse().ok()?, hostname: hostname.clone() })
            })
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The record a Service exports (with its EndpointSlices), or why it exports none.
pub fn record_for(
    cluster_id: &str,
    service: &Service,
    slices: &[EndpointSlice],
) -> Result<ServiceExportRecord, String> {
    let namespace = service.metadata.namespace.clone().unwrap_or_default();
    let name = service.metadata.name.clone().unwrap_or_default();
    let spec = service.spec.as_ref().ok_or("the Service has no spec")?;
    let headless = spec.cluster_ip.as_deref() == Some("None");
    let ips: Vec<std::net::IpAddr> = if headless {
        Vec::new()
    } else {
        spec.cluster_ips
            .clone()
            .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
            .unwrap_or_default()
            .iter()
            .filter_map(|ip| ip.parse().ok())
            .collect()
    };
    if !headless && ips.is_empty() {
        return Err("the Service has no cluster IP yet".into());
    }
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            Some(ServicePort {
                name: p.name.clone(),
                port: u16::try_from(p.port).ok()?,
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            })
        })
        .collect();
    let mut ready = ready_endpoints(slices);
    let ready_count = u32::try_from(ready.len()).unwrap_or(u32::MAX);
    let endpoints = if headless {
        if ready.len() > causeway_broker_api::validate::MAX_SERVICE_ENDPOINTS {
            warn!(namespace = %namespace, name = %name, ready = ready.len(),
                max = causeway_broker_api::validate::MAX_SERVICE_ENDPOINTS,
                "more ready endpoints than one export may list; publishing the first ones");
            ready.truncate(causeway_broker_api::validate::MAX_SERVICE_ENDPOINTS);
        }
        ready
    } else {
        Vec::new()
    };
    Ok(ServiceExportRecord {
        cluster_id: cluster_id.into(),
        namespace,
        name,
        ips,
        ports,
        service_type: if headless { ServiceType::Headless } else { ServiceType::ClusterSetIP },
        endpoints,
        ready_endpoints: Some(ready_count),
        source: ExportSource::Kubernetes,
        generation: 0,
    })
}

/// What to write so that the broker holds `desired` for this cluster: records to put (with
/// their next generation) and `(namespace, name)`s to delete.
#[must_use]
pub fn plan(
    desired: &BTreeMap<(String, String), ServiceExportRecord>,
    published: &BTreeMap<(String, String), ServiceExportRecord>,
) -> (Vec<ServiceExportRecord>, Vec<(String, String)>) {
    let mut puts = Vec::new();
    for (key, want) in desired {
        match published.get(key) {
            Some(have) if ServiceExportRecord { generation: have.generation, ..want.clone() } == *have => {}
            have => puts.push(ServiceExportRecord {
                generation: have.map_or(1, |h| h.generation + 1),
                ..want.clone()
            }),
        }
    }
    let deletes = published.keys().filter(|k| !desired.contains_key(*k)).cloned().collect();
    (puts, deletes)
}

pub struct ExportSync {
    client: Client,
    broker: BrokerClient,
    cluster_id: String,
    pub resync: Duration,
}

impl ExportSync {
    #[must_use]
    pub fn new(client: Client, broker: BrokerClient, cluster_id: String) -> Self {
        Self { client, broker, cluster_id, resync: Duration::from_secs(30) }
    }

    /// One reconcile: returns how many records were written and deleted.
    pub async fn reconcile(&self, exports: &[(String, String)]) -> Result<(usize, usize), ExportError> {
        let mut desired = BTreeMap::new();
        for (ns, name) in exports {
            let services: Api<Service> = Api::namespaced(self.client.clone(), ns);
            let service = services.get_opt(name).await?;
            let slices = match &service {
                Some(_) => {
                    let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), ns);
                    api.list(&ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}={name}")))
                        .await?
                        .items
                }
                None => Vec::new(),
            };
            match service {
                Some(svc) => match record_for(&self.cluster_id, &svc, &slices) {
                    Ok(r) => {
                        desired.insert((ns.clone(), name.clone()), r);
                    }
                    Err(why) => warn!(namespace = %ns, %name, %why, "ServiceExport not published"),
                },
                None => {
                    warn!(namespace = %ns, %name, "ServiceExport names no existing Service; not published")
                }
            }
        }
        let published: BTreeMap<_, _> = self
            .broker
            .list()
            .await?
            .items
            .into_iter()
            .filter_map(|o| match o.record {
                // Only what this publisher made: exports made with `causeway export` stay.
                Record::ServiceExport(s)
                    if s.cluster_id == self.cluster_id && s.source == ExportSource::Kubernetes =>
                {
                    Some(((s.namespace.clone(), s.name.clone()), s))
                }
                _ => None,
            })
            .collect();
        let (puts, deletes) = plan(&desired, &published);
        for r in &puts {
            info!(namespace = %r.namespace, name = %r.name, ips = ?r.ips, "publishing ServiceExport");
            self.broker.put_service(r).await?;
        }
        for (ns, name) in &deletes {
            info!(namespace = %ns, %name, "withdrawing ServiceExport");
            self.broker.delete_service(&self.cluster_id, ns, name).await?;
        }
        Ok((puts.len(), deletes.len()))
    }

    /// Watches ServiceExports and the Services' EndpointSlices, and reconciles on every
    /// export change, within a second of an endpoint change, and every `resync`. Never
    /// returns.
    pub async fn run(&self) {
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &service_export_resource());
        let mut events = watcher(api, watcher::Config::default()).boxed();
        let slices: Api<EndpointSlice> = Api::all(self.client.clone());
        let mut slice_events = watcher(slices, watcher::Config::default().labels(SERVICE_NAME_LABEL)).boxed();
        let mut slices_changed = false;
        let mut debounce = tokio::time::interval(Duration::from_secs(1));
        debounce.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut exports: BTreeMap<(String, String), ()> = BTreeMap::new();
        let mut pending: Option<BTreeMap<(String, String), ()>> = None;
        let mut ready = false;
        let mut resync = tokio::time::interval(self.resync);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let dirty = tokio::select! {
                ev = events.next() => {
                    let key = |o: &DynamicObject| (o.metadata.namespace.clone().unwrap_or_default(), o.metadata.name.clone().unwrap_or_default());
                    match ev {
                        Some(Ok(watcher::Event::Init)) => { pending = Some(BTreeMap::new()); false }
                        Some(Ok(watcher::Event::InitApply(o))) => { if let Some(p) = &mut pending { p.insert(key(&o), ()); } false }
                        Some(Ok(watcher::Event::InitDone)) => {
                            exports = pending.take().unwrap_or_default();
                            ready = true;
                            true
                        }
                        Some(Ok(watcher::Event::Apply(o))) => exports.insert(key(&o), ()).is_none(),
                        Some(Ok(watcher::Event::Delete(o))) => exports.remove(&key(&o)).is_some(),
                        Some(Err(e)) => {
                            warn!(error = %e, "watching ServiceExports failed; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            false
                        }
                        None => return,
                    }
                }
                ev = slice_events.next() => {
                    match ev {
                        Some(Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone)) => slices_changed = true,
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            warn!(error = %e, "watching EndpointSlices failed; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        None => return,
                    }
                    false
                }
                // Endpoint changes come in bursts (a rollout): at most one reconcile a second.
                _ = debounce.tick() => std::mem::take(&mut slices_changed),
                _ = resync.tick() => true,
            };
            if dirty && ready {
                let list: Vec<_> = exports.keys().cloned().collect();
                match self.reconcile(&list).await {
                    Ok((p, d)) => debug!(written = p, deleted = d, "ServiceExports reconciled"),
                    Err(e) => {
                        warn!(error = %e, "publishing ServiceExports failed; retrying at the next change or resync")
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(json: serde_json::Value) -> Service {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_service_and_its_endpoint_slices_become_a_record() {
        let s = svc(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::a"],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}]}
        }));
        let r = record_for("east", &s, &[]).unwrap();
        assert_eq!(
            r.ips,
            vec!["10.96.0.10".parse::<std::net::IpAddr>().unwrap(), "fd00::a".parse().unwrap()]
        );
        assert_eq!(r.ports[0], ServicePort { name: Some("http".into()), port: 80, protocol: "TCP".into() });
        assert_eq!(r.ports[1].protocol, "UDP");
        assert_eq!(r.ready_endpoints, Some(0), "no EndpointSlice: nothing ready");
        assert_eq!(r.service_type, ServiceType::ClusterSetIP);
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-abc", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.244.1.5"], "conditions": {"ready": true}, "hostname": "db-0"},
                {"addresses": ["10.244.1.6"], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "db-1-xyz"}},
                {"addresses": ["10.244.1.7"], "conditions": {"ready": false}, "hostname": "db-2"},
                {"addresses": ["10.244.1.8"]}
            ]
        }))
        .unwrap();
        assert_eq!(record_for("east", &s, std::slice::from_ref(&slice)).unwrap().ready_endpoints, Some(3));
        let headless = svc(serde_json::json!({"metadata": {"name": "db", "namespace": "shop"},
            "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}}));
        let r = record_for("east", &headless, &[slice]).unwrap();
        assert_eq!(r.service_type, ServiceType::Headless);
        assert!(r.ips.is_empty());
        let ep = |ip: &str, h: Option<&str>| ServiceEndpoint {
            ip: ip.parse().unwrap(),
            hostname: h.map(str::to_owned),
        };
        assert_eq!(
            r.endpoints,
            vec![ep("10.244.1.5", Some("db-0")), ep("10.244.1.6", Some("db-1-xyz")), ep("10.244.1.8", None)],
            "ready ones only, hostname from the endpoint or its pod"
        );
        assert_eq!(r.ready_endpoints, Some(3));
        causeway_broker_api::validate_service(&r).expect("a valid headless export");
        let pending = svc(serde_json::json!({"metadata": {"name": "x", "namespace": "shop"}, "spec": {}}));
        assert!(record_for("east", &pending, &[]).unwrap_err().contains("no cluster IP"));
    }

    #[test]
    fn plan_writes_only_the_difference() {
        let rec = |name: &str, ip: &str, generation| ServiceExportRecord {
            cluster_id: "east".into(),
            namespace: "shop".into(),
            name: name.into(),
            ips: vec![ip.parse().unwrap()],
            ports: vec![],
            service_type: Default::default(),
            endpoints: Vec::new(),
            ready_endpoints: None,
            source: ExportSource::Kubernetes,
            generation,
        };
        let k = |n: &str| ("shop".to_owned(), n.to_owned());
        let desired = BTreeMap::from([
            (k("a"), rec("a", "10.96.0.1", 0)),
            (k("b"), rec("b", "10.96.0.2", 0)),
            (k("c"), rec("c", "10.96.0.3", 0)),
        ]);
        let published = BTreeMap::from([
            (k("a"), rec("a", "10.96.0.1", 4)),
            (k("b"), rec("b", "10.96.0.9", 2)),
            (k("z"), rec("z", "10.96.0.26", 1)),
        ]);
        let (puts, deletes) = plan(&desired, &published);
        assert_eq!(puts, vec![rec("b", "10.96.0.2", 3), rec("c", "10.96.0.3", 1)]);
        assert_eq!(deletes, vec![k("z")]);
    }
}
