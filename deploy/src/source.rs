//! The gateway's Kubernetes cluster source: this node's addresses and gateway label, the
//! cluster's pod and service CIDRs, and (through [`crate::election`]) whether this gateway is
//! the active one.
//!
//! CIDR discovery is a pure function of what the API server returned ([`discover`]), so every
//! rule is unit-tested; [`KubernetesSource`] fetches at startup, then follows a Node watch.

use std::{collections::BTreeMap, net::IpAddr};

use futures::StreamExt as _;

use causeway_gateway::cluster::{ClusterSource, LocalCluster, SourceError};
use ipnetwork::IpNetwork;
use k8s_openapi::api::{
    core::v1::{ConfigMap, Node},
    networking::v1::ServiceCIDR,
};
use kube::{Api, Client, api::ListParams, runtime::watcher};
use tracing::{info, warn};

use crate::{election::Role, manifests::GATEWAY_LABEL};

/// What discovery looks at, as fetched from the API server.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// `spec.podCIDRs` of every node.
    pub node_pod_cidrs: Vec<Vec<String>>,
    /// `data["config.conf"]` of `kube-system/kube-proxy`.
    pub kube_proxy_config: Option<String>,
    /// `data["ClusterConfiguration"]` of `kube-system/kubeadm-config`.
    pub kubeadm_config: Option<String>,
    /// `spec.cidrs` of the `networking.k8s.io/v1` ServiceCIDR objects (Kubernetes ≥ 1.33).
    pub service_cidr_objects: Vec<String>,
}

/// Where each answer came from, for the startup log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Discovered {
    pub pod_cidrs: Vec<IpNetwork>,
    pub pod_from: &'static str,
    pub service_cidrs: Vec<IpNetwork>,
    pub service_from: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(
        "cannot find this cluster's pod CIDRs: no node has spec.podCIDRs, and neither \
         kube-system/kube-proxy (clusterCIDR) nor kube-system/kubeadm-config (networking.podSubnet) \
         names one. Set CAUSEWAY_POD_CIDRS in the causeway-gateway-config ConfigMap (or pass \
         --pod-cidr to `causeway join`)"
    )]
    NoPodCidrs,
    #[error(
        "cannot find this cluster's service CIDRs: there is no ServiceCIDR object and \
         kube-system/kubeadm-config has no networking.serviceSubnet. Set CAUSEWAY_SERVICE_CIDRS in \
         the causeway-gateway-config ConfigMap (or pass --service-cidr to `causeway join`)"
    )]
    NoServiceCidrs,
    #[error("{what} holds {value:?}, which is not a CIDR")]
    BadCidr { what: &'static str, value: String },
    #[error("node {node}: {problem}")]
    Node { node: String, problem: String },
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
}

impl From<DiscoveryError> for SourceError {
    fn from(e: DiscoveryError) -> Self {
        SourceError::Unavailable(e.to_string())
    }
}

fn parse_list(what: &'static str, raw: &str) -> Result<Vec<IpNetwork>, DiscoveryError> {
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| DiscoveryError::BadCidr { what, value: s.to_owned() }))
        .collect()
}

/// The value of `key:` in a flat or nested YAML document, without a YAML parser's opinion on
/// the rest of a config file we do not own (kube-proxy's and kubeadm's evolve by version).
fn yaml_value<'a>(doc: &'a str, key: &str) -> Option<&'a str> {
    doc.lines().find_map(|line| {
        let rest = line.trim_start().strip_prefix(key)?.strip_prefix(':')?;
        let v = rest.trim().trim_matches('"').trim_matches('\'');
        (!v.is_empty()).then_some(v)
    })
}

/// Pod CIDRs: explicit settings win; then the nodes' `spec.podCIDRs`, summarised by the
/// cluster-wide CIDR from kube-proxy's or kubeadm's config when that covers them all (so the
/// record does not change each time a node joins); then that config alone (CNIs with their own
/// IPAM leave node podCIDRs empty). Service CIDRs: explicit, then ServiceCIDR objects, then
/// kubeadm's serviceSubnet.
pub fn discover(
    o: &Observed,
    pod_override: &[IpNetwork],
    service_override: &[IpNetwork],
) -> Result<Discovered, DiscoveryError> {
    let mut config_pods = Vec::new();
    if let Some(v) = o.kube_proxy_config.as_deref().and_then(|c| yaml_value(c, "clusterCIDR")) {
        config_pods = parse_list("kube-proxy's clusterCIDR", v)?;
    }
    if config_pods.is_empty()
        && let Some(v) = o.kubeadm_config.as_deref().and_then(|c| yaml_value(c, "podSubnet"))
    {
        config_pods = parse_list("kubeadm's networking.podSubnet", v)?;
    }
    let mut nodes: Vec<IpNetwork> = Vec::new();
    for list in &o.node_pod_cidrs {
        for c in list {
            let net = c
                .parse()
                .map_err(|_| DiscoveryError::BadCidr { what: "a node's spec.podCIDRs", value: c.clone() })?;
            if !nodes.contains(&net) {
                nodes.push(net);
            }
        }
    }
    nodes.sort();
    let covers = |n: &IpNetwork| config_pods.iter().any(|c| c.is_supernet_of_or_eq(*n));
    let (pod_cidrs, pod_from) = if !pod_override.is_empty() {
        (pod_override.to_vec(), "settings")
    } else if !nodes.is_empty() && !config_pods.is_empty() && nodes.iter().all(covers) {
        (config_pods, "nodes' podCIDRs, summarised by the cluster config")
    } else if !nodes.is_empty() {
        (nodes, "nodes' podCIDRs")
    } else if !config_pods.is_empty() {
        (config_pods, "kube-proxy/kubeadm config")
    } else {
        return Err(DiscoveryError::NoPodCidrs);
    };

    let (service_cidrs, service_from) = if !service_override.is_empty() {
        (service_override.to_vec(), "settings")
    } else if !o.service_cidr_objects.is_empty() {
        let mut v = Vec::new();
        for c in &o.service_cidr_objects {
            v.extend(parse_list("a ServiceCIDR object", c)?);
        }
        v.sort();
        v.dedup();
        (v, "ServiceCIDR objects")
    } else if let Some(v) = o.kubeadm_config.as_deref().and_then(|c| yaml_value(c, "serviceSubnet")) {
        (parse_list("kubeadm's networking.serviceSubnet", v)?, "kubeadm config")
    } else {
        return Err(DiscoveryError::NoServiceCidrs);
    };
    Ok(Discovered { pod_cidrs, pod_from, service_cidrs, service_from })
}

trait Supernet {
    fn is_supernet_of_or_eq(&self, other: IpNetwork) -> bool;
}

impl Supernet for IpNetwork {
    fn is_supernet_of_or_eq(&self, other: IpNetwork) -> bool {
        match (self, other) {
            (IpNetwork::V4(a), IpNetwork::V4(b)) => a.prefix() <= b.prefix() && a.contains(b.network()),
            (IpNetwork::V6(a), IpNetwork::V6(b)) => a.prefix() <= b.prefix() && a.contains(b.network()),
            _ => false,
        }
    }
}

/// This node's facts from its Node object: the gateway label must be set, InternalIPs are the
/// private addresses and ExternalIPs the public ones.
pub fn node_facts(node: &Node) -> Result<(Vec<IpAddr>, Vec<IpAddr>), DiscoveryError> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let labelled =
        node.metadata.labels.as_ref().and_then(|l| l.get(GATEWAY_LABEL)).is_some_and(|v| v == "true");
    if !labelled {
        return Err(DiscoveryError::Node {
            node: name.clone(),
            problem: format!(
                "is not labelled {GATEWAY_LABEL}=true, so it is not a gateway node \
                 (`kubectl label node {name} {GATEWAY_LABEL}=true`, or `causeway join --gateway-node {name}`)"
            ),
        });
    }
    let (mut private, mut public) = (Vec::new(), Vec::new());
    for a in node.status.as_ref().and_then(|s| s.addresses.as_ref()).into_iter().flatten() {
        let Ok(ip) = a.address.parse::<IpAddr>() else { continue };
        match a.type_.as_str() {
            "InternalIP" => private.push(ip),
            "ExternalIP" => public.push(ip),
            _ => {}
        }
    }
    if private.is_empty() && public.is_empty() {
        return Err(DiscoveryError::Node {
            node: name,
            problem: "has no InternalIP or ExternalIP in status.addresses; set CAUSEWAY_NODE_IPS".into(),
        });
    }
    Ok((private, public))
}

/// Fetches [`Observed`] from the API server. Config maps and ServiceCIDRs that are missing or
/// not readable are skipped: discovery then says what it could not find.
pub async fn observe(client: &Client) -> Result<Observed, DiscoveryError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let list = nodes.list(&ListParams::default()).await?;
    let node_pod_cidrs = list.items.iter().map(pod_cidrs_of).collect();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");
    let data = |cm: Option<ConfigMap>, key: &str| cm.and_then(|c| c.data).and_then(|mut d| d.remove(key));
    let kube_proxy_config = data(optional(cms.get_opt("kube-proxy").await)?, "config.conf");
    let kubeadm_config = data(optional(cms.get_opt("kubeadm-config").await)?, "ClusterConfiguration");
    let service_cidr_objects =
        match optional(Api::<ServiceCIDR>::all(client.clone()).list(&ListParams::default()).await.map(Some))?
        {
            Some(l) => {
                l.items.into_iter().filter_map(|s| s.spec).flat_map(|s| s.cidrs.unwrap_or_default()).collect()
            }
            None => Vec::new(),
        };
    Ok(Observed { node_pod_cidrs, kube_proxy_config, kubeadm_config, service_cidr_objects })
}

/// Absent and forbidden both mean "this source has nothing to say".
fn optional<T>(r: Result<Option<T>, kube::Error>) -> Result<Option<T>, DiscoveryError> {
    match r {
        Ok(v) => Ok(v),
        Err(kube::Error::Api(s)) if s.is_not_found() || s.is_forbidden() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Settings that override discovery (from flags or the gateway config map).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub cluster_id: String,
    pub pod_cidrs: Vec<IpNetwork>,
    pub service_cidrs: Vec<IpNetwork>,
    pub node_ips: Vec<IpAddr>,
    pub public_ips: Vec<IpAddr>,
}

/// The gateway's [`ClusterSource`] on Kubernetes.
pub struct KubernetesSource {
    client: Client,
    node: String,
    overrides: Overrides,
    roles: tokio::sync::watch::Receiver<Role>,
    roles_open: bool,
    last: Option<LocalCluster>,
    /// The cluster configuration read at startup (kube-proxy, kubeadm, ServiceCIDRs); the
    /// nodes' part is kept current by the node watch.
    config: Observed,
    /// Every Node, as the watch last reported it.
    nodes: BTreeMap<String, Node>,
    events: Option<futures::stream::BoxStream<'static, Result<watcher::Event<Node>, watcher::Error>>>,
    /// The last error reported by [`ClusterSource::next_change`] (each is reported once).
    last_error: Option<String>,
}

impl KubernetesSource {
    /// `roles` comes from [`crate::election::Elector::spawn`].
    #[must_use]
    pub fn new(
        client: Client,
        node: String,
        overrides: Overrides,
        roles: tokio::sync::watch::Receiver<Role>,
    ) -> Self {
        Self {
            client,
            node,
            overrides,
            roles,
            roles_open: true,
            last: None,
            config: Observed::default(),
            nodes: BTreeMap::new(),
            events: None,
            last_error: None,
        }
    }

    /// This gateway's facts from its Node, the cluster configuration and the other nodes'
    /// podCIDRs (in `config`).
    fn compose(&self, node: &Node, config: &Observed) -> Result<LocalCluster, DiscoveryError> {
        let (mut private, mut public) = node_facts(node)?;
        if !self.overrides.node_ips.is_empty() {
            private.clone_from(&self.overrides.node_ips);
        }
        if !self.overrides.public_ips.is_empty() {
            public.clone_from(&self.overrides.public_ips);
        }
        let found = discover(config, &self.overrides.pod_cidrs, &self.overrides.service_cidrs)?;
        Ok(LocalCluster {
            cluster_id: self.overrides.cluster_id.clone(),
            pod_cidrs: found.pod_cidrs,
            service_cidrs: found.service_cidrs,
            hostname: self.node.clone(),
            private_ips: private,
            public_ips: public,
            active: *self.roles.borrow() == Role::Active,
        })
    }

    async fn read(&mut self) -> Result<LocalCluster, DiscoveryError> {
        let node = Api::<Node>::all(self.client.clone()).get(&self.node).await?;
        // The label first: without it nothing else matters, and its error names the fix.
        node_facts(&node)?;
        let config = observe(&self.client).await?;
        let local = self.compose(&node, &config)?;
        let found = discover(&config, &self.overrides.pod_cidrs, &self.overrides.service_cidrs)?;
        info!(
            pods = ?found.pod_cidrs, pods_from = found.pod_from,
            services = ?found.service_cidrs, services_from = found.service_from,
            "discovered the cluster's CIDRs"
        );
        self.config = config;
        Ok(local)
    }

    /// Folds one node-watch event in; true when the node set is complete and changed.
    fn apply(&mut self, event: watcher::Event<Node>) -> bool {
        let name = |n: &Node| n.metadata.name.clone().unwrap_or_default();
        match event {
            watcher::Event::Init => {
                self.nodes.clear();
                false
            }
            watcher::Event::InitApply(n) => {
                self.nodes.insert(name(&n), n);
                false
            }
            watcher::Event::InitDone => true,
            watcher::Event::Apply(n) => {
                self.nodes.insert(name(&n), n);
                true
            }
            watcher::Event::Delete(n) => {
                self.nodes.remove(&name(&n));
                true
            }
        }
    }

    /// The facts as the watched nodes say now.
    fn facts_from_nodes(&self) -> Result<LocalCluster, DiscoveryError> {
        let me = self.nodes.get(&self.node).ok_or_else(|| DiscoveryError::Node {
            node: self.node.clone(),
            problem: "was deleted from the cluster".into(),
        })?;
        let mut config = self.config.clone();
        config.node_pod_cidrs = self.nodes.values().map(pod_cidrs_of).collect();
        self.compose(me, &config)
    }
}

fn pod_cidrs_of(n: &Node) -> Vec<String> {
    let spec = n.spec.as_ref();
    spec.and_then(|s| s.pod_cidrs.clone())
        .or_else(|| spec.and_then(|s| s.pod_cidr.clone()).map(|c| vec![c]))
        .unwrap_or_default()
}

impl ClusterSource for KubernetesSource {
    async fn local_cluster(&mut self) -> Result<LocalCluster, SourceError> {
        let local = self.read().await?;
        local.validate()?;
        self.last = Some(local.clone());
        Ok(local)
    }

    /// The next change of this gateway's facts: a new role from the election, or what the
    /// Node watch shows (this node's addresses or gateway label, the cluster's pod CIDRs as
    /// nodes come and go). Events that change none of the facts (status heartbeats, other
    /// labels) are absorbed here.
    async fn next_change(&mut self) -> Result<LocalCluster, SourceError> {
        use kube::runtime::WatchStreamExt as _;
        if self.events.is_none() {
            let api = Api::<Node>::all(self.client.clone());
            self.events = Some(watcher(api, watcher::Config::default()).default_backoff().boxed());
        }
        loop {
            let roles_open = self.roles_open;
            let (roles, events) = (&mut self.roles, self.events.as_mut().expect("set above"));
            let candidate = tokio::select! {
                changed = roles.changed(), if roles_open => {
                    if changed.is_err() {
                        warn!("the election stopped; keeping the current role");
                        self.roles_open = false;
                        continue;
                    }
                    let active = *self.roles.borrow_and_update() == Role::Active;
                    self.last.clone().map(|mut l| {
                        l.active = active;
                        Ok(l)
                    })
                }
                event = events.next() => match event {
                    Some(Ok(event)) => self.apply(event).then(|| self.facts_from_nodes()),
                    Some(Err(e)) => {
                        warn!(error = %e, "watching nodes failed; retrying");
                        None
                    }
                    None => {
                        self.events = None;
                        return Err(SourceError::Unavailable("the node watch ended".into()));
                    }
                },
            };
            match candidate {
                Some(Ok(local)) if Some(&local) != self.last.as_ref() => {
                    local.validate()?;
                    self.last_error = None;
                    self.last = Some(local.clone());
                    return Ok(local);
                }
                Some(Err(e)) if self.last_error.as_deref() != Some(&e.to_string()) => {
                    self.last_error = Some(e.to_string());
                    return Err(e.into());
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(v: &[&str]) -> Vec<IpNetwork> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    const KUBEADM: &str = "apiServer: {}\nkind: ClusterConfiguration\nnetworking:\n  dnsDomain: cluster.local\n  podSubnet: 10.244.0.0/16\n  serviceSubnet: 10.96.0.0/12\n";

    #[test]
    fn node_cidrs_are_summarised_by_the_cluster_config_that_covers_them() {
        let o = Observed {
            node_pod_cidrs: vec![vec!["10.244.1.0/24".into()], vec!["10.244.0.0/24".into()]],
            kubeadm_config: Some(KUBEADM.into()),
            ..Observed::default()
        };
        let d = discover(&o, &[], &[]).unwrap();
        assert_eq!(d.pod_cidrs, nets(&["10.244.0.0/16"]));
        assert_eq!(d.service_cidrs, nets(&["10.96.0.0/12"]));
        assert_eq!(d.service_from, "kubeadm config");
    }

    #[test]
    fn node_cidrs_outside_the_config_are_taken_as_they_are() {
        let o = Observed {
            node_pod_cidrs: vec![
                vec!["10.9.1.0/24".into(), "fd00:1::/64".into()],
                vec!["10.9.0.0/24".into()],
                vec![],
            ],
            kube_proxy_config: Some("kind: KubeProxyConfiguration\nclusterCIDR: \"10.244.0.0/16\"\n".into()),
            service_cidr_objects: vec!["10.96.0.0/16".into(), "fd00:96::/112".into()],
            ..Observed::default()
        };
        let d = discover(&o, &[], &[]).unwrap();
        assert_eq!(d.pod_cidrs, nets(&["10.9.0.0/24", "10.9.1.0/24", "fd00:1::/64"]));
        assert_eq!(d.pod_from, "nodes' podCIDRs");
        assert_eq!(d.service_cidrs, nets(&["10.96.0.0/16", "fd00:96::/112"]));
    }

    #[test]
    fn config_alone_serves_cnis_without_node_cidrs_and_settings_win() {
        let o = Observed {
            kube_proxy_config: Some("clusterCIDR: 10.50.0.0/16,fd00:50::/56\n".into()),
            kubeadm_config: Some(KUBEADM.into()),
            ..Observed::default()
        };
        let d = discover(&o, &[], &[]).unwrap();
        assert_eq!(d.pod_cidrs, nets(&["10.50.0.0/16", "fd00:50::/56"]));
        let d = discover(&o, &nets(&["10.7.0.0/16"]), &nets(&["10.107.0.0/16"])).unwrap();
        assert_eq!((d.pod_cidrs, d.pod_from), (nets(&["10.7.0.0/16"]), "settings"));
        assert_eq!(d.service_cidrs, nets(&["10.107.0.0/16"]));
    }

    #[test]
    fn nothing_found_says_where_it_looked_and_what_to_set() {
        let e = discover(&Observed::default(), &[], &[]).unwrap_err().to_string();
        assert!(
            e.contains("podCIDRs") && e.contains("kubeadm-config") && e.contains("CAUSEWAY_POD_CIDRS"),
            "{e}"
        );
        let o = Observed { node_pod_cidrs: vec![vec!["10.1.0.0/24".into()]], ..Observed::default() };
        let e = discover(&o, &[], &[]).unwrap_err().to_string();
        assert!(e.contains("ServiceCIDR") && e.contains("CAUSEWAY_SERVICE_CIDRS"), "{e}");
        let o = Observed { node_pod_cidrs: vec![vec!["10.1.0.0/33".into()]], ..Observed::default() };
        assert!(discover(&o, &[], &[]).unwrap_err().to_string().contains("10.1.0.0/33"));
    }

    #[test]
    fn a_node_must_be_labelled_and_have_an_address() {
        let mut node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "gw-1", "labels": {"causeway.io/gateway": "true"}},
            "status": {"addresses": [
                {"type": "Hostname", "address": "gw-1"},
                {"type": "InternalIP", "address": "192.168.1.10"},
                {"type": "ExternalIP", "address": "203.0.113.7"}
            ]}
        }))
        .unwrap();
        let (private, public) = node_facts(&node).unwrap();
        assert_eq!(private, vec!["192.168.1.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(public, vec!["203.0.113.7".parse::<IpAddr>().unwrap()]);
        node.metadata.labels.as_mut().unwrap().insert(GATEWAY_LABEL.into(), "false".into());
        let e = node_facts(&node).unwrap_err().to_string();
        assert!(e.contains("kubectl label node gw-1"), "{e}");
    }
}
