//! Where the gateway learns its own cluster's facts. A small trait so that the static source
//! (flags / config, used by the sandbox) and the Kubernetes source (`causeway-deploy`: nodes,
//! CIDR discovery and the active-gateway Lease) are interchangeable.

use std::{future::Future, net::IpAddr};

use causeway_broker_api::{ClusterRecord, ValidationError};
use ipnetwork::IpNetwork;

/// This cluster and this gateway node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalCluster {
    pub cluster_id: String,
    pub pod_cidrs: Vec<IpNetwork>,
    pub service_cidrs: Vec<IpNetwork>,
    /// This node's name.
    pub hostname: String,
    /// Addresses of this node that other gateways can reach (private first, then public).
    pub private_ips: Vec<IpAddr>,
    pub public_ips: Vec<IpAddr>,
    /// Whether this node is the cluster's active gateway.
    pub active: bool,
}

impl LocalCluster {
    #[must_use]
    pub fn record(&self, generation: u64) -> ClusterRecord {
        ClusterRecord {
            cluster_id: self.cluster_id.clone(),
            pod_cidrs: self.pod_cidrs.clone(),
            service_cidrs: self.service_cidrs.clone(),
            global_cidrs: Vec::new(),
            labels: Default::default(),
            generation,
        }
    }

    /// The gateway's health-check address for in-band probes: the network address of the first
    /// IPv4 pod CIDR. Probes are answered inside the gateway, so the address never has to be
    /// configured on an interface, and a network address is never a pod's.
    #[must_use]
    pub fn health_ip(&self) -> Option<std::net::Ipv4Addr> {
        self.pod_cidrs.iter().find_map(|c| match c {
            IpNetwork::V4(n) => Some(n.network()),
            IpNetwork::V6(_) => None,
        })
    }

    /// Same checks the broker applies, so that a bad flag fails at startup.
    pub fn validate(&self) -> Result<(), ValidationError> {
        causeway_broker_api::validate_cluster(&self.record(0))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("invalid cluster configuration: {0}")]
    Invalid(#[from] ValidationError),
    #[error("{0}")]
    Unavailable(String),
}

/// A source of the local cluster's facts.
pub trait ClusterSource: Send + 'static {
    fn local_cluster(&mut self) -> impl Future<Output = Result<LocalCluster, SourceError>> + Send;

    /// Completes when the facts change (e.g. this gateway became active or standby), with the
    /// new facts. The default never completes: static facts do not change.
    fn next_change(&mut self) -> impl Future<Output = Result<LocalCluster, SourceError>> + Send {
        std::future::pending()
    }
}

/// Facts given on the command line or in a config file.
#[derive(Clone, Debug)]
pub struct StaticSource(pub LocalCluster);

impl ClusterSource for StaticSource {
    async fn local_cluster(&mut self) -> Result<LocalCluster, SourceError> {
        self.0.validate()?;
        Ok(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_source_validates() {
        let mut local = LocalCluster {
            cluster_id: "east".into(),
            pod_cidrs: vec!["10.1.0.0/16".parse().unwrap()],
            service_cidrs: vec!["10.101.0.0/16".parse().unwrap()],
            hostname: "gw".into(),
            private_ips: vec!["172.31.0.11".parse().unwrap()],
            public_ips: vec![],
            active: true,
        };
        assert_eq!(StaticSource(local.clone()).local_cluster().await.unwrap(), local);
        local.cluster_id = "East!".into();
        assert!(StaticSource(local).local_cluster().await.is_err());
    }
}
