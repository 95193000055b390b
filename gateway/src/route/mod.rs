//! Kernel routes for remote prefixes, and the process's one netlink owner ([`Netlink`]):
//! routes through the tunnel device on a gateway ([`RouteManager`]), and through the active
//! gateway's nexthop on the other nodes ([`node::NodeRoutes`]).
//!
//! Our routes carry their own protocol number, so the gateway can list exactly the routes it
//! owns and remove stale ones after a restart without touching anybody else's.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use futures::TryStreamExt as _;
use ipnetwork::IpNetwork;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol};
use rtnetlink::{Handle, RouteMessageBuilder};
use tracing::info;

use self::nexthop::{NexthopError, NexthopSocket};
use crate::model::plan;

pub mod nexthop;
pub mod node;

/// Route protocol number marking Causeway's routes (`ip route show proto 202`).
pub const ROUTE_PROTOCOL: u8 = 202;

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("opening a netlink socket: {0}")]
    Connect(#[source] std::io::Error),
    #[error("interface {name} not found")]
    NoInterface { name: String },
    #[error("nexthop: {0}")]
    Nexthop(#[source] NexthopError),
    #[error("netlink {op} {what}: {source}")]
    Netlink {
        op: &'static str,
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
}

/// What a route sync did. Prefixes held by a route Causeway did not create are left alone
/// and reported, never replaced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub added: usize,
    pub removed: usize,
    /// Prefixes not installed because another route to exactly that prefix exists.
    pub conflicts: Vec<IpNetwork>,
}

/// Adds `msg` unless a route to its prefix exists (`NLM_F_EXCL`): the kernel answers EEXIST
/// for somebody else's route, which is then reported, not clobbered. Returns whether it was
/// added.
async fn add_if_absent(handle: &Handle, msg: RouteMessage, net: IpNetwork) -> Result<bool, RouteError> {
    match handle.route().add(msg).execute().await {
        Ok(()) => Ok(true),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {
            tracing::warn!(route = %net, "a route to this prefix exists that Causeway did not create; left as it is");
            Ok(false)
        }
        Err(source) => Err(RouteError::Netlink { op: "add route", what: net.to_string(), source }),
    }
}

/// The process's one netlink owner: an rtnetlink connection and the nexthop socket (which
/// rtnetlink does not speak), opened once in the calling thread's namespace and lent to the
/// cable, the gateway's routes and the route agent. Clones share both.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
    nexthops: Arc<Mutex<NexthopSocket>>,
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink").finish_non_exhaustive()
    }
}

impl Netlink {
    /// Opens both sockets in the calling thread's namespace; the connection's task runs on the
    /// current tokio runtime.
    pub fn open() -> Result<Self, RouteError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(RouteError::Connect)?;
        tokio::spawn(conn);
        let nexthops = NexthopSocket::open().map_err(RouteError::Nexthop)?;
        Ok(Self { handle, nexthops: Arc::new(Mutex::new(nexthops)) })
    }

    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The nexthop socket; requests on it are short and synchronous.
    pub(crate) fn nexthops(&self) -> MutexGuard<'_, NexthopSocket> {
        self.nexthops.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The addresses of every interface in the namespace: remote prefixes that would cover
    /// one are refused (see `desired::LocalFacts`).
    pub async fn local_addresses(&self) -> Result<Vec<IpAddr>, RouteError> {
        use netlink_packet_route::address::AddressAttribute;
        let mut stream = self.handle.address().get().execute();
        let mut out = Vec::new();
        while let Some(msg) = stream.try_next().await.map_err(|source| RouteError::Netlink {
            op: "dump",
            what: "addresses".into(),
            source,
        })? {
            for a in &msg.attributes {
                if let AddressAttribute::Address(ip) | AddressAttribute::Local(ip) = a {
                    out.push(*ip);
                }
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Deletes interface `name`; absent is success.
    pub async fn delete_link(&self, name: &str) -> Result<(), RouteError> {
        let found = self.handle.link().get().match_name(name.to_owned()).execute().try_next().await;
        let index = match found {
            Ok(Some(link)) => link.header.index,
            Ok(None) => return Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => return Ok(()),
            Err(source) => return Err(RouteError::Netlink { op: "get link", what: name.to_owned(), source }),
        };
        self.handle.link().del(index).execute().await.map_err(|source| RouteError::Netlink {
            op: "delete link",
            what: name.to_owned(),
            source,
        })?;
        info!(device = name, "device removed");
        Ok(())
    }

    /// The kind of interface `name` (`veth`, `vxlan`, …; `None` for a physical device, which
    /// has no link info).
    pub async fn link_kind(&self, name: &str) -> Result<Option<String>, RouteError> {
        use netlink_packet_route::link::{LinkAttribute, LinkInfo};
        let link = self.link(name).await?;
        Ok(link.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                LinkInfo::Kind(kind) => Some(kind.to_string()),
                _ => None,
            }),
            _ => None,
        }))
    }

    /// The link called `name`; its absence is [`RouteError::NoInterface`].
    async fn link(&self, name: &str) -> Result<netlink_packet_route::link::LinkMessage, RouteError> {
        self.handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute()
            .try_next()
            .await
            .map_err(|source| RouteError::Netlink { op: "get link", what: name.to_owned(), source })?
            .ok_or_else(|| RouteError::NoInterface { name: name.to_owned() })
    }
}

/// Routes of remote prefixes via one device.
#[derive(Debug, Clone)]
pub struct RouteManager {
    handle: Handle,
    ifindex: u32,
    device: String,
}

impl RouteManager {
    /// Resolves `device` in `netlink`'s namespace.
    pub async fn new(netlink: &Netlink, device: &str) -> Result<Self, RouteError> {
        let link = netlink.link(device).await?;
        Ok(Self { handle: netlink.handle().clone(), ifindex: link.header.index, device: device.to_owned() })
    }

    /// Interface index of the device.
    #[must_use]
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    fn message(&self, net: IpNetwork) -> RouteMessage {
        let mut msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(net.network(), net.prefix())
            .expect("address family matches")
            .output_interface(self.ifindex)
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
            .build();
        msg.header.scope = netlink_packet_route::route::RouteScope::Link;
        msg
    }

    /// Our routes on the device right now.
    pub async fn current(&self) -> Result<BTreeSet<IpNetwork>, RouteError> {
        let mut out = BTreeSet::new();
        for family in [IpAddr::from([0, 0, 0, 0]), IpAddr::from([0u16; 8])] {
            let mut query = RouteMessageBuilder::<IpAddr>::new().build();
            query.header.address_family = match family {
                IpAddr::V4(_) => netlink_packet_route::AddressFamily::Inet,
                IpAddr::V6(_) => netlink_packet_route::AddressFamily::Inet6,
            };
            let mut stream = self.handle.route().get(query).execute();
            while let Some(msg) = stream.try_next().await.map_err(|source| RouteError::Netlink {
                op: "dump",
                what: "routes".into(),
                source,
            })? {
                if msg.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL) {
                    continue;
                }
                let oif =
                    msg.attributes.iter().any(|a| matches!(a, RouteAttribute::Oif(i) if *i == self.ifindex));
                let dst = msg.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
                    RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
                    _ => None,
                });
                if let (true, Some(dst)) = (oif, dst)
                    && let Ok(net) = IpNetwork::new(dst, msg.header.destination_prefix_length)
                {
                    out.insert(net);
                }
            }
        }
        Ok(out)
    }

    /// Makes our routes equal `desired`, never touching a route we did not create.
    pub async fn sync(&self, desired: &BTreeSet<IpNetwork>) -> Result<SyncReport, RouteError> {
        let current = self.current().await?;
        let p = plan(desired, &current);
        let mut report = SyncReport { removed: p.remove.len(), ..SyncReport::default() };
        for net in &p.add {
            if add_if_absent(&self.handle, self.message(*net), *net).await? {
                info!(route = %net, device = %self.device, "route added");
                report.added += 1;
            } else {
                report.conflicts.push(*net);
            }
        }
        for net in &p.remove {
            match self.handle.route().del(self.message(*net)).execute().await {
                Ok(()) => info!(route = %net, device = %self.device, "route removed"),
                // Already gone (e.g. the device went down): that is what we wanted.
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => {}
                Err(source) => {
                    return Err(RouteError::Netlink { op: "delete route", what: net.to_string(), source });
                }
            }
        }
        Ok(report)
    }
}
