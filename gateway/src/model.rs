//! The domain model the gateway's parts share: what a remote cluster looks like to this
//! gateway (its active gateway, standbys and prefixes), and the set difference every
//! reconciler plans its changes with. No I/O, no dependency on any other part, so that the
//! cable, the routes and the desired-state computation depend on it and not on each other.

use std::{collections::BTreeSet, net::SocketAddr};

use causeway_broker_api::{WireGuardKey, records::Candidate};
use ipnetwork::IpNetwork;

/// A remote gateway to connect to (from the broker's records).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteEndpoint {
    pub cluster_id: String,
    pub public_key: WireGuardKey,
    /// Where traffic starts: the record's preferred address.
    pub endpoint: SocketAddr,
    /// Every address the gateway may be reached at, in preference order.
    pub candidates: Vec<Candidate>,
    /// Prefixes routed to (and accepted from) this cluster.
    pub cidrs: Vec<IpNetwork>,
    /// The remote gateway's health-check address (probes are off without one).
    pub health_ip: Option<std::net::Ipv4Addr>,
    /// Its priority in its endpoint record (which gateway a failover prefers).
    pub priority: u32,
    /// The cluster's standby gateways: peers whose sessions are kept up (keepalives) but who
    /// carry no prefixes, so that a failover only moves the prefixes to one of them, with no
    /// handshake on the critical path.
    pub standbys: Vec<StandbyGateway>,
}

/// A remote cluster's standby gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StandbyGateway {
    pub public_key: WireGuardKey,
    pub endpoint: SocketAddr,
    pub candidates: Vec<Candidate>,
    /// Probed like the active gateway, so that a failover goes only to a standby that answers.
    pub health_ip: Option<std::net::Ipv4Addr>,
    pub priority: u32,
}

/// Changes to make a set equal another.
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
