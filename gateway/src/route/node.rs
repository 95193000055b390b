//! Routes of a non-gateway node (the route agent's): every remote-cluster prefix goes through
//! one kernel nexthop object that points at the cluster's active gateway node, so a gateway
//! failover is one nexthop replace per node and the next packet already takes the new path.

use std::{collections::BTreeSet, net::IpAddr};

use futures::TryStreamExt as _;
use ipnetwork::IpNetwork;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol};
use rtnetlink::{Handle, RouteMessageBuilder};
use tracing::info;

use super::{Netlink, ROUTE_PROTOCOL, RouteError, SyncReport, add_if_absent};
use crate::model::plan;

/// The id of the node's nexthop object (`ip nexthop show id 202001`).
pub const NODE_NEXTHOP_ID: u32 = 202_001;
const RT_TABLE_MAIN: u8 = 254;

pub struct NodeRoutes {
    netlink: Netlink,
    handle: Handle,
    gateway: Option<IpAddr>,
}

fn address(a: &RouteAttribute) -> Option<IpAddr> {
    match a {
        RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

impl NodeRoutes {
    /// The node's routes, through `netlink`.
    #[must_use]
    pub fn new(netlink: &Netlink) -> Self {
        Self { netlink: netlink.clone(), handle: netlink.handle().clone(), gateway: None }
    }

    async fn dump(&self, family: IpAddr) -> Result<Vec<RouteMessage>, RouteError> {
        let mut query = RouteMessageBuilder::<IpAddr>::new().build();
        query.header.address_family = match family {
            IpAddr::V4(_) => netlink_packet_route::AddressFamily::Inet,
            IpAddr::V6(_) => netlink_packet_route::AddressFamily::Inet6,
        };
        self.handle.route().get(query).execute().try_collect().await.map_err(|source| RouteError::Netlink {
            op: "dump",
            what: "routes".into(),
            source,
        })
    }

    /// The interface of the longest on-link route of the main table that covers `gateway`:
    /// the node must reach its gateway directly.
    pub async fn interface_towards(&self, gateway: IpAddr) -> Result<u32, RouteError> {
        let mut best: Option<(u8, u32)> = None;
        for msg in self.dump(gateway).await? {
            if msg.header.table != RT_TABLE_MAIN
                || msg.attributes.iter().any(|a| matches!(a, RouteAttribute::Gateway(_)))
            {
                continue;
            }
            let Some(oif) = msg.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            }) else {
                continue;
            };
            let prefix = msg.header.destination_prefix_length;
            let dst = msg.attributes.iter().find_map(address);
            let covers = match dst {
                Some(d) => IpNetwork::new(d, prefix).is_ok_and(|n| n.contains(gateway)),
                None => prefix == 0,
            };
            if covers && best.is_none_or(|(p, _)| prefix > p) {
                best = Some((prefix, oif));
            }
        }
        best.map(|(_, oif)| oif).ok_or_else(|| RouteError::NoInterface {
            name: format!("an on-link route towards gateway {gateway}"),
        })
    }

    /// Points the node's nexthop at `gateway` (creating it the first time).
    pub async fn set_gateway(&mut self, gateway: IpAddr) -> Result<(), RouteError> {
        let oif = self.interface_towards(gateway).await?;
        self.netlink
            .nexthops()
            .replace(NODE_NEXTHOP_ID, gateway, oif, ROUTE_PROTOCOL)
            .map_err(RouteError::Nexthop)?;
        if self.gateway != Some(gateway) {
            info!(%gateway, nexthop = NODE_NEXTHOP_ID, "remote clusters now go through this gateway");
        }
        self.gateway = Some(gateway);
        Ok(())
    }

    fn message(net: IpNetwork) -> RouteMessage {
        RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(net.network(), net.prefix())
            .expect("address family matches")
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
            .nhid(NODE_NEXTHOP_ID)
            .build()
    }

    /// Our routes (through our nexthop) right now.
    pub async fn current(&self) -> Result<BTreeSet<IpNetwork>, RouteError> {
        let mut out = BTreeSet::new();
        for family in [IpAddr::from([0, 0, 0, 0]), IpAddr::from([0u16; 8])] {
            for msg in self.dump(family).await? {
                let ours = msg.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL)
                    && msg.attributes.iter().any(|a| matches!(a, RouteAttribute::NhId(NODE_NEXTHOP_ID)));
                if let (true, Some(dst)) = (ours, msg.attributes.iter().find_map(address))
                    && let Ok(net) = IpNetwork::new(dst, msg.header.destination_prefix_length)
                {
                    out.insert(net);
                }
            }
        }
        Ok(out)
    }

    /// Makes the routes through our nexthop equal `desired` (only prefixes of the gateway's
    /// address family can use it); returns (added, removed). Call [`Self::set_gateway`] first.
    pub async fn sync(&self, desired: &BTreeSet<IpNetwork>) -> Result<SyncReport, RouteError> {
        let Some(gateway) = self.gateway else { return Ok(SyncReport::default()) };
        let desired: BTreeSet<IpNetwork> =
            desired.iter().filter(|n| n.is_ipv4() == gateway.is_ipv4()).copied().collect();
        let p = plan(&desired, &self.current().await?);
        let mut report = SyncReport { removed: p.remove.len(), ..SyncReport::default() };
        for net in &p.add {
            if add_if_absent(&self.handle, Self::message(*net), *net).await? {
                info!(route = %net, nexthop = NODE_NEXTHOP_ID, "route added");
                report.added += 1;
            } else {
                report.conflicts.push(*net);
            }
        }
        for net in &p.remove {
            match self.handle.route().del(Self::message(*net)).execute().await {
                Ok(()) => info!(route = %net, "route removed"),
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => {}
                Err(source) => {
                    return Err(RouteError::Netlink { op: "delete route", what: net.to_string(), source });
                }
            }
        }
        Ok(report)
    }

    /// Removes the nexthop, and with it every route through it.
    pub fn clear(&mut self) -> Result<(), RouteError> {
        self.gateway = None;
        self.netlink.nexthops().delete(NODE_NEXTHOP_ID).map_err(RouteError::Nexthop)
    }
}
