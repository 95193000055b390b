//! The route agent, for the nodes of a cluster that are not gateways: it routes every remote
//! cluster's prefixes through one nexthop that points at the cluster's active gateway node.
//!
//! What to route comes from the broker (the same [`desired`] the gateways compute, so a node
//! routes exactly the prefixes its gateway tunnels). Which gateway is active comes from the
//! broker's endpoint records of this cluster, or from a caller-supplied source (the
//! Kubernetes Lease). A failover is one nexthop replace; the routes do not change.

use std::{collections::BTreeSet, future::Future, net::IpAddr, time::Duration};

use causeway_broker_api::{BrokerClient, GatewayRole, Object, Record, Reflector};
use ipnetwork::IpNetwork;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    desired::{LocalFacts, desired},
    route::{Netlink, RouteError, node::NodeRoutes},
};

/// What a node should have.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeView {
    pub remote_prefixes: BTreeSet<IpNetwork>,
    /// The node address of this cluster's active gateway, as its endpoint record says.
    pub active_gateway: Option<IpAddr>,
}

/// The node's view of the records. Among several endpoints marked active (a failover in
/// progress), the most recently written wins.
#[must_use]
pub fn node_view(objects: &[Object], local_cluster: &str, facts: &LocalFacts) -> NodeView {
    let active_gateway = objects
        .iter()
        .filter_map(|o| match &o.record {
            Record::Endpoint(e) if e.cluster_id == local_cluster && e.role == GatewayRole::Active => {
                e.private_ips.first().map(|ip| (o.resource_version, *ip))
            }
            _ => None,
        })
        .max_by_key(|(rv, _)| *rv)
        .map(|(_, ip)| ip);
    NodeView { remote_prefixes: desired(objects, local_cluster, facts).routes(), active_gateway }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("broker: {0}")]
    Broker(String),
}

struct Agent {
    routes: NodeRoutes,
    applied: NodeView,
}

impl Agent {
    async fn apply(&mut self, view: &NodeView, gateway: Option<IpAddr>) {
        if let Some(gw) = gateway
            && (self.applied.active_gateway != Some(gw))
        {
            match self.routes.set_gateway(gw).await {
                Ok(()) => self.applied.active_gateway = Some(gw),
                Err(e) => {
                    warn!(error = %e, gateway = %gw, "pointing the nexthop at the active gateway failed")
                }
            }
        }
        if self.applied.active_gateway.is_none() {
            // Nothing to route through yet; keep whatever a previous run left until we know.
            return;
        }
        match self.routes.sync(&view.remote_prefixes).await {
            Ok(report) => {
                if report.added + report.removed > 0 {
                    info!(added = report.added, removed = report.removed, "remote-cluster routes updated");
                }
                self.applied.remote_prefixes.clone_from(&view.remote_prefixes);
            }
            Err(e) => warn!(error = %e, "syncing remote-cluster routes failed; retrying on the next change"),
        }
    }
}

/// Runs the route agent until `shutdown`, then removes its nexthop and routes. `gateways`, when
/// given, says which node is the active gateway (e.g. the Lease holder's address) and
/// overrides the endpoint records.
pub async fn run(
    client: BrokerClient,
    local_cluster: String,
    mut gateways: Option<watch::Receiver<Option<IpAddr>>>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    let netlink = Netlink::open()?;
    let mut agent = Agent { routes: NodeRoutes::new(&netlink), applied: NodeView::default() };
    let mut shutdown = std::pin::pin!(shutdown);
    // The shared reflector: list once, then watch; after broker trouble it backs off (with
    // jitter) and resumes from the last revision. Routes stay as they are meanwhile.
    let mut reflector = Reflector::new(client, Duration::from_secs(20));
    let mut synced = false;
    info!(cluster = %local_cluster, "route agent started");
    loop {
        let facts = match netlink.local_addresses().await {
            Ok(addresses) => LocalFacts { addresses, public_key: None },
            Err(e) => {
                warn!(error = %e, "listing this node's addresses failed; remote prefixes are checked without them");
                LocalFacts::default()
            }
        };
        let view = node_view(&reflector.snapshot().objects(), &local_cluster, &facts);
        let gateway = match &gateways {
            Some(rx) => *rx.borrow(),
            None => view.active_gateway,
        };
        if synced {
            agent.apply(&view, gateway).await;
        }
        let gateway_changed = async {
            match &mut gateways {
                Some(rx) => {
                    if rx.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = &mut shutdown => break,
            () = gateway_changed => {}
            result = reflector.next() => match result {
                Ok(_) => synced = true,
                Err(e) => warn!(error = %e, "broker unavailable; resuming from the last revision"),
            },
        }
    }
    info!("route agent stopping; removing its routes");
    agent.routes.clear()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use causeway_broker_api::{ClusterRecord, EndpointRecord};

    fn obj(rv: u64, record: Record) -> Object {
        Object { api_version: "causeway.io/v1".into(), resource_version: rv, record }
    }

    fn cluster(id: &str, pods: &str) -> Record {
        Record::Cluster(ClusterRecord {
            cluster_id: id.into(),
            pod_cidrs: vec![pods.parse().unwrap()],
            service_cidrs: vec![],
            global_cidr: None,
            labels: Default::default(),
            generation: 1,
        })
    }

    fn endpoint(cluster: &str, host: &str, ip: &str, role: GatewayRole) -> Record {
        Record::Endpoint(EndpointRecord {
            cluster_id: cluster.into(),
            hostname: host.into(),
            private_ips: vec![ip.parse().unwrap()],
            public_ips: vec![],
            port: 51820,
            public_key: "oL9ZAbBp+BhK4uWWrNgb4V1rBDVKtYwNJEU4UwQmLmA=".parse().unwrap(),
            backend: "wireguard".into(),
            role,
            priority: 0,
            health_check_ip: None,
            generation: 1,
        })
    }

    #[test]
    fn a_node_routes_the_remote_prefixes_through_the_newest_active_gateway() {
        let objects = vec![
            obj(1, cluster("east", "10.1.0.0/16")),
            obj(2, cluster("west", "10.9.0.0/16")),
            obj(3, endpoint("west", "w-gw", "172.31.0.9", GatewayRole::Active)),
            obj(4, endpoint("east", "gw-1", "192.168.50.11", GatewayRole::Active)),
            obj(5, endpoint("east", "gw-2", "192.168.50.12", GatewayRole::Standby)),
        ];
        let v = node_view(&objects, "east", &LocalFacts::default());
        assert_eq!(v.remote_prefixes, ["10.9.0.0/16".parse().unwrap()].into());
        assert_eq!(v.active_gateway, Some("192.168.50.11".parse().unwrap()));
        // gw-2 takes over and writes its endpoint before gw-1's record is updated.
        let mut objects = objects;
        objects[4] = obj(6, endpoint("east", "gw-2", "192.168.50.12", GatewayRole::Active));
        assert_eq!(
            node_view(&objects, "east", &LocalFacts::default()).active_gateway,
            Some("192.168.50.12".parse().unwrap())
        );
        // No active gateway: nothing to point at.
        assert_eq!(node_view(&objects[..3], "east", &LocalFacts::default()).active_gateway, None);
    }
}
