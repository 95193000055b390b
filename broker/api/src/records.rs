//! Record types and the wire envelope.

use std::{collections::BTreeMap, fmt, net::IpAddr, str::FromStr};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

/// The API version every object on the wire carries.
pub const API_VERSION: &str = "causeway.io/v1alpha1";

/// Largest request body the broker accepts, and the largest record it stores.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The only cable backend of this release; the gateway refuses any other.
pub const CABLE_BACKENDS: &[&str] = &["wireguard"];

/// A cluster of the cluster set (one per member cluster, written by that cluster).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterRecord {
    /// DNS-1123 label, at most 63 characters, unique in the set.
    pub cluster_id: String,
    pub pod_cidrs: Vec<IpNetwork>,
    pub service_cidrs: Vec<IpNetwork>,
    /// Overlap mode only: for each pod and service CIDR, the global prefix of the same length
    /// at which the cluster set reaches it. The broker allocates the ones a record leaves out
    /// (from the cluster set's global pools) and keeps them across later writes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub global_cidrs: Vec<GlobalCidr>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Bumped by the writer on every change; the broker refuses to go backwards.
    #[serde(default)]
    pub generation: u64,
}

impl ClusterRecord {
    /// A cluster with these CIDRs, no global CIDR, no labels, generation 1 (its first
    /// version).
    #[must_use]
    pub fn new(cluster_id: &str, pod_cidrs: Vec<IpNetwork>, service_cidrs: Vec<IpNetwork>) -> Self {
        Self {
            cluster_id: cluster_id.to_owned(),
            pod_cidrs,
            service_cidrs,
            global_cidrs: Vec::new(),
            labels: BTreeMap::new(),
            generation: 1,
        }
    }

    /// Pod and service CIDRs together: everything routed to this cluster.
    pub fn all_cidrs(&self) -> impl Iterator<Item = &IpNetwork> {
        self.pod_cidrs.iter().chain(self.service_cidrs.iter())
    }

    /// The global prefixes (overlap mode).
    pub fn globals(&self) -> impl Iterator<Item = &IpNetwork> {
        self.global_cidrs.iter().map(|g| &g.global)
    }

    /// The global prefix of `cidr`, one of the cluster's own.
    #[must_use]
    pub fn global_of(&self, cidr: &IpNetwork) -> Option<IpNetwork> {
        self.global_cidrs.iter().find(|g| g.cidr == *cidr).map(|g| g.global)
    }

    /// The global prefixes of the pod CIDRs.
    pub fn global_pod_cidrs(&self) -> impl Iterator<Item = IpNetwork> + '_ {
        self.pod_cidrs.iter().filter_map(|c| self.global_of(c))
    }

    /// The global prefixes of the service CIDRs.
    pub fn global_service_cidrs(&self) -> impl Iterator<Item = IpNetwork> + '_ {
        self.service_cidrs.iter().filter_map(|c| self.global_of(c))
    }
}

/// Overlap mode: a pod or service CIDR of a cluster and the global prefix of the same length
/// that stands for it in the cluster set, address for address (host bits kept), both ways.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GlobalCidr {
    /// The cluster's own CIDR (one of its pod or service CIDRs).
    pub cidr: IpNetwork,
    /// Where the other clusters reach it.
    pub global: IpNetwork,
}

impl GlobalCidr {
    /// `addr` of the real CIDR moved to the global prefix (or back, with the fields swapped):
    /// the prefix bits replaced, the host bits kept.
    #[must_use]
    pub fn map(from: &IpNetwork, to: &IpNetwork, addr: IpAddr) -> Option<IpAddr> {
        if !from.contains(addr) || from.prefix() != to.prefix() {
            return None;
        }
        match (addr, from, to) {
            (IpAddr::V4(a), IpNetwork::V4(f), IpNetwork::V4(t)) => {
                let mask = u32::from(f.mask());
                Some(IpAddr::V4((u32::from(t.network()) | (u32::from(a) & !mask)).into()))
            }
            (IpAddr::V6(a), IpNetwork::V6(f), IpNetwork::V6(t)) => {
                let mask = u128::from(f.mask());
                Some(IpAddr::V6((u128::from(t.network()) | (u128::from(a) & !mask)).into()))
            }
            _ => None,
        }
    }
}

/// Active or standby gateway.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum GatewayRole {
    #[default]
    Active,
    Standby,
}

/// How a gateway's WireGuard socket can be reached at an address, in the order peers prefer
/// the paths: a private address (same site or a routed underlay), a public one (configured),
/// the reflexive one (what a NAT maps the socket to, as the broker's STUN responder saw it),
/// and last the broker's relay, where the gateway is registered (frames for its key reach it
/// through the relay).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum CandidateKind {
    Private,
    Public,
    Reflexive,
    Relay,
}

/// One address (and port) a gateway's WireGuard socket may be reached at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Candidate {
    pub address: std::net::SocketAddr,
    pub kind: CandidateKind,
}

/// A gateway node of a cluster (one per gateway node).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointRecord {
    pub cluster_id: String,
    /// Node name (DNS-1123 subdomain).
    pub hostname: String,
    #[serde(default)]
    pub private_ips: Vec<IpAddr>,
    #[serde(default)]
    pub public_ips: Vec<IpAddr>,
    /// UDP port of the cable.
    pub port: u16,
    pub public_key: WireGuardKey,
    /// Cable backend, one of [`CABLE_BACKENDS`].
    pub backend: String,
    #[serde(default)]
    pub role: GatewayRole,
    /// Higher wins among standbys.
    #[serde(default)]
    pub priority: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_ip: Option<IpAddr>,
    /// The remote clusters this gateway's in-band probes reach now, as it reports them (its
    /// connection summary: the same verdict its failover, its nodes' ClusterSetIP backends and
    /// cluster-set DNS go by). Refreshed with the heartbeat, and within two seconds of a change.
    /// `None`: not reported (a gateway before its first probe round, or an older one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reachable: Option<Vec<String>>,
    /// Addresses the gateway found for itself besides `privateIps`/`publicIps` on `port`: its
    /// reflexive address (a NAT's mapping of its WireGuard socket, with the NAT's port).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<Candidate>,
    #[serde(default)]
    pub generation: u64,
}

impl EndpointRecord {
    /// An active gateway reached at `private_ip` on the default WireGuard port, priority 0, no
    /// public address or health-check address, generation 1 (its first version).
    #[must_use]
    pub fn new(cluster_id: &str, hostname: &str, private_ip: IpAddr, public_key: WireGuardKey) -> Self {
        Self {
            cluster_id: cluster_id.to_owned(),
            hostname: hostname.to_owned(),
            private_ips: vec![private_ip],
            public_ips: Vec::new(),
            port: 51820,
            public_key,
            backend: "wireguard".into(),
            role: GatewayRole::Active,
            priority: 0,
            health_check_ip: None,
            reachable: None,
            candidates: Vec::new(),
            generation: 1,
        }
    }

    /// Every address peers may reach this gateway at, in preference order: the private
    /// addresses, the public ones (both on `port`), then the published candidates; each
    /// address once (the first kind it is listed with).
    #[must_use]
    pub fn paths(&self) -> Vec<Candidate> {
        let configured = self
            .private_ips
            .iter()
            .map(|ip| (ip, CandidateKind::Private))
            .chain(self.public_ips.iter().map(|ip| (ip, CandidateKind::Public)))
            .map(|(ip, kind)| Candidate { address: std::net::SocketAddr::new(*ip, self.port), kind });
        let mut out: Vec<Candidate> = Vec::new();
        for c in configured.chain(self.candidates.iter().copied()) {
            if !out.iter().any(|o| o.address == c.address) {
                out.push(c);
            }
        }
        // Stable: within a kind, the order the record gives.
        out.sort_by_key(|c| c.kind);
        out
    }

    /// Every IP address of the gateway the record names (configured and discovered): none
    /// may lie in a cluster's prefixes.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + Clone + '_ {
        self.private_ips
            .iter()
            .chain(&self.public_ips)
            .copied()
            .chain(self.candidates.iter().map(|c| c.address.ip()))
    }

    /// The address peers should send to: the first public IP, else the first private one.
    #[must_use]
    pub fn preferred_ip(&self) -> Option<IpAddr> {
        self.public_ips.first().or(self.private_ips.first()).copied()
    }
}

/// A WireGuard (Curve25519) public key: 32 bytes, base64 on the wire.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WireGuardKey(pub [u8; 32]);

impl fmt::Display for WireGuardKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&B64.encode(self.0))
    }
}

impl fmt::Debug for WireGuardKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WireGuardKey({self})")
    }
}

/// Why a key string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyParseError {
    #[error("not valid base64")]
    Base64,
    #[error("decodes to {0} bytes, a WireGuard key has 32")]
    Length(usize),
}

impl FromStr for WireGuardKey {
    type Err = KeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = B64.decode(s.trim()).map_err(|_| KeyParseError::Base64)?;
        let arr: [u8; 32] = bytes.as_slice().try_into().map_err(|_| KeyParseError::Length(bytes.len()))?;
        Ok(Self(arr))
    }
}

impl Serialize for WireGuardKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WireGuardKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|e| serde::de::Error::custom(format!("publicKey: {e}")))
    }
}

/// Which traffic a policy rule is about, on one side: a cluster (its pod and service
/// CIDRs), CIDRs, both (the CIDRs inside that cluster), or neither (anything).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyPeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cidrs: Vec<IpNetwork>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PolicyProtocol {
    #[default]
    Any,
    Tcp,
    Udp,
    Icmp,
}

impl PolicyProtocol {
    /// The IP protocol number (0 for any).
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Self::Any => 0,
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Icmp => 1,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PolicyAction {
    #[default]
    Allow,
    Deny,
}

/// An inclusive destination port range; `"80"` or `"8000-8080"` on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parse = |p: &str| {
            p.trim().parse::<u16>().map_err(|_| format!("{s:?} is not a port or a port range like 8000-8080"))
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => {
                let p = parse(s)?;
                (p, p)
            }
        };
        Ok(Self { first, last })
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|e| serde::de::Error::custom(format!("ports: {e}")))
    }
}

/// A cluster-set network policy rule (written with the admin credential). Rules are
/// evaluated by ascending `priority`, then name; the first that matches a packet decides,
/// and [`PolicyDefaultRecord`] decides when none does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyRecord {
    /// DNS-1123 label, unique in the set.
    pub name: String,
    #[serde(default)]
    pub priority: u32,
    #[serde(default)]
    pub from: PolicyPeer,
    #[serde(default)]
    pub to: PolicyPeer,
    #[serde(default)]
    pub protocol: PolicyProtocol,
    /// Destination ports (TCP/UDP only); empty: every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRange>,
    pub action: PolicyAction,
    #[serde(default)]
    pub generation: u64,
}

/// The cluster set's default action when no policy rule matches (absent: allow).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyDefaultRecord {
    pub action: PolicyAction,
    #[serde(default)]
    pub generation: u64,
}

/// One port of an exported service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP` (Kubernetes spelling).
    #[serde(default = "tcp")]
    pub protocol: String,
}

fn tcp() -> String {
    "TCP".into()
}

/// A service a cluster exports to the set (the MCS API's ServiceExport), answered by
/// cluster-set DNS as `<name>.<namespace>.svc.clusterset.local`. Written by its cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceExportRecord {
    pub cluster_id: String,
    pub namespace: String,
    pub name: String,
    /// Virtual IPs (ClusterIPs), inside the cluster's service CIDRs (its global CIDR in
    /// overlap mode).
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// `ClusterSetIP` (the default: `ips` are the ClusterIPs, and the cluster set reaches
    /// them through one ClusterSetIP) or `Headless` (no `ips`; DNS answers with `endpoints`).
    #[serde(rename = "type", default, skip_serializing_if = "ServiceType::is_cluster_set_ip")]
    pub service_type: ServiceType,
    /// A headless service's ready endpoints (pod addresses in the cluster's pod CIDRs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<ServiceEndpoint>,
    /// How many of the service's endpoints are ready, when the exporter knows (the
    /// Kubernetes publisher does; `causeway export` does not). `Some(0)`: the cluster is left
    /// out of the service's backends until one is ready; absent: counted as ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_endpoints: Option<u32>,
    /// Who made the export: the cluster's Kubernetes publisher (from ServiceExport objects;
    /// it withdraws what it made when the object goes) or an operator with `causeway export`
    /// (the publisher never touches those). Absent means `cli`.
    #[serde(default, skip_serializing_if = "ExportSource::is_cli")]
    pub source: ExportSource,
    #[serde(default)]
    pub generation: u64,
}

/// What a multi-cluster service is (KEP-1645's ServiceImport type).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ServiceType {
    /// Reached through one virtual IP for the whole set.
    #[default]
    ClusterSetIP,
    /// DNS answers with the ready endpoints themselves.
    Headless,
}

impl ServiceType {
    #[must_use]
    pub fn is_cluster_set_ip(&self) -> bool {
        *self == Self::ClusterSetIP
    }
}

impl std::fmt::Display for ServiceType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ClusterSetIP => "ClusterSetIP",
            Self::Headless => "Headless",
        })
    }
}

/// One ready endpoint of a headless export.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEndpoint {
    pub ip: IpAddr,
    /// The endpoint's hostname (its pod's `hostname`, else the pod name): DNS answers
    /// `<hostname>.<cluster>.<name>.<namespace>.svc.clusterset.local` with its address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

/// The cluster set's view of one multi-cluster service: every cluster's export of
/// `<namespace>/<name>` merged by KEP-1645's rules. Written only by the broker, whenever an
/// export of that name changes; read by gateways, route agents and cluster-set DNS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceImportRecord {
    pub namespace: String,
    pub name: String,
    /// The oldest export's type; exports of the other type are in conflict.
    #[serde(rename = "type")]
    pub service_type: ServiceType,
    /// The ClusterSetIPs (one, from the cluster set's pool; none for a headless service).
    /// Held for as long as the import exists.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpAddr>,
    /// The union of the exports' ports, minus those that lost a conflict.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// The exporting clusters, oldest export first (that order settles conflicts).
    pub clusters: Vec<ImportedCluster>,
    #[serde(default)]
    pub generation: u64,
}

/// One cluster's part in a [`ServiceImportRecord`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImportedCluster {
    pub cluster_id: String,
    /// The ports of the import this cluster serves.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// Its export is of the other type than the oldest: it takes no part in the service.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub excluded: bool,
    /// KEP-1645's `Conflict` condition: what in this cluster's export an older export
    /// overrules, and whose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict: Option<String>,
}

/// Who made a [`ServiceExportRecord`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportSource {
    /// `causeway export` (or any other client).
    #[default]
    Cli,
    /// The cluster's ServiceExport publisher.
    Kubernetes,
}

impl ExportSource {
    #[must_use]
    pub fn is_cli(&self) -> bool {
        *self == Self::Cli
    }
}

/// Settings of the whole cluster set (written with the admin credential).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterSetRecord {
    /// Overlap mode: clusters may share pod and service CIDRs; each must then carry a
    /// global CIDR, and global CIDRs must not overlap.
    #[serde(default)]
    pub overlap_mode: bool,
    /// The address space the admin grants to member clusters: every CIDR a cluster declares
    /// must lie inside these pools.
    #[serde(default)]
    pub pools: AddressPools,
    /// Per-cluster caps on what one member may publish.
    #[serde(default)]
    pub quotas: Quotas,
    /// Where the broker takes ClusterSetIPs from. No cluster's prefixes may overlap it.
    #[serde(default = "default_cluster_set_ip_pool")]
    pub cluster_set_ip_pool: IpNetwork,
    #[serde(default)]
    pub generation: u64,
}

/// The default ClusterSetIP pool: part of 240.0.0.0/4, which is reserved and never assigned,
/// so it collides with no pod, service or underlay network (Submariner Globalnet takes
/// 242.0.0.0/8 for the same reason). ClusterSetIPs never reach the wire: the nodes' socket
/// programs translate them at `connect()`.
pub const DEFAULT_CLUSTER_SET_IP_POOL: &str = "241.0.0.0/16";

#[must_use]
pub fn default_cluster_set_ip_pool() -> IpNetwork {
    DEFAULT_CLUSTER_SET_IP_POOL.parse().expect("valid constant prefix")
}

impl Default for ClusterSetRecord {
    fn default() -> Self {
        Self {
            overlap_mode: false,
            pools: AddressPools::default(),
            quotas: Quotas::default(),
            cluster_set_ip_pool: default_cluster_set_ip_pool(),
            generation: 0,
        }
    }
}

/// Address pools granted by the cluster set's admin (SPEC §12, trust model). A member cluster
/// can only claim prefixes inside them, so it cannot claim the underlay, the internet or
/// another organisation's public space.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AddressPools {
    /// Where pod CIDRs may lie.
    #[serde(default = "private_ranges")]
    pub pod_cidrs: Vec<IpNetwork>,
    /// Where service CIDRs may lie.
    #[serde(default = "private_ranges")]
    pub service_cidrs: Vec<IpNetwork>,
    /// Where global prefixes (overlap mode) may lie; the broker allocates the ones a cluster
    /// leaves out from these, in order.
    #[serde(default = "global_ranges")]
    pub global_cidrs: Vec<IpNetwork>,
}

impl Default for AddressPools {
    fn default() -> Self {
        Self { pod_cidrs: private_ranges(), service_cidrs: private_ranges(), global_cidrs: global_ranges() }
    }
}

/// The default global pools: 242.0.0.0/8 first (reserved space, like Submariner Globalnet's,
/// so that no cluster's real CIDR can ever collide with an allocated prefix), then the
/// private ranges for prefixes a cluster names itself.
#[must_use]
pub fn global_ranges() -> Vec<IpNetwork> {
    std::iter::once(DEFAULT_GLOBAL_POOL.parse().expect("valid constant prefix"))
        .chain(private_ranges())
        .collect()
}

/// Where the broker allocates global prefixes first.
pub const DEFAULT_GLOBAL_POOL: &str = "242.0.0.0/8";

/// The default pools: RFC 1918, RFC 6598 (shared address space) and IPv6 unique local
/// addresses (RFC 4193). An admin narrows them to what the organisations agreed on.
#[must_use]
pub fn private_ranges() -> Vec<IpNetwork> {
    ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"]
        .iter()
        .map(|s| s.parse().expect("valid constant prefix"))
        .collect()
}

/// Per-cluster caps, so one member cannot exhaust the broker or every gateway's maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Quotas {
    /// Gateway endpoints per cluster (an active one and its standbys).
    #[serde(default = "default_max_endpoints")]
    pub max_endpoints: u32,
    /// Exported services per cluster.
    #[serde(default = "default_max_services")]
    pub max_services: u32,
}

/// Enough for an active gateway and a handful of standbys.
pub const DEFAULT_MAX_ENDPOINTS: u32 = 8;
/// Exported services per cluster by default.
pub const DEFAULT_MAX_SERVICES: u32 = 1_000;

fn default_max_endpoints() -> u32 {
    DEFAULT_MAX_ENDPOINTS
}

fn default_max_services() -> u32 {
    DEFAULT_MAX_SERVICES
}

impl Default for Quotas {
    fn default() -> Self {
        Self { max_endpoints: DEFAULT_MAX_ENDPOINTS, max_services: DEFAULT_MAX_SERVICES }
    }
}

/// Any record the broker stores.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "spec")]
pub enum Record {
    Cluster(ClusterRecord),
    Endpoint(EndpointRecord),
    Policy(PolicyRecord),
    PolicyDefault(PolicyDefaultRecord),
    ServiceExport(ServiceExportRecord),
    ClusterSet(ClusterSetRecord),
    ServiceImport(ServiceImportRecord),
}

impl Record {
    /// The storage key: `clusters/<id>`, `endpoints/<cluster>/<hostname>`,
    /// `services/<cluster>/<namespace>/<name>`, `imports/<namespace>/<name>`,
    /// `policies/<name>`, `settings/policy-default` or `settings/cluster-set`.
    #[must_use]
    pub fn key(&self) -> String {
        match self {
            Record::Cluster(c) => cluster_key(&c.cluster_id),
            Record::Endpoint(e) => endpoint_key(&e.cluster_id, &e.hostname),
            Record::Policy(p) => policy_key(&p.name),
            Record::PolicyDefault(_) => POLICY_DEFAULT_KEY.to_owned(),
            Record::ServiceExport(s) => service_key(&s.cluster_id, &s.namespace, &s.name),
            Record::ClusterSet(_) => CLUSTER_SET_KEY.to_owned(),
            Record::ServiceImport(i) => import_key(&i.namespace, &i.name),
        }
    }

    /// The cluster that owns the record; empty for the set-wide records (policy, settings),
    /// which only the admin writes, and for service imports, which only the broker writes.
    #[must_use]
    pub fn cluster_id(&self) -> &str {
        match self {
            Record::Cluster(c) => &c.cluster_id,
            Record::Endpoint(e) => &e.cluster_id,
            Record::ServiceExport(s) => &s.cluster_id,
            Record::Policy(_)
            | Record::PolicyDefault(_)
            | Record::ClusterSet(_)
            | Record::ServiceImport(_) => "",
        }
    }

    #[must_use]
    pub fn generation(&self) -> u64 {
        match self {
            Record::Cluster(c) => c.generation,
            Record::Endpoint(e) => e.generation,
            Record::Policy(p) => p.generation,
            Record::PolicyDefault(d) => d.generation,
            Record::ServiceExport(s) => s.generation,
            Record::ClusterSet(c) => c.generation,
            Record::ServiceImport(i) => i.generation,
        }
    }
}

#[must_use]
pub fn service_key(cluster_id: &str, namespace: &str, name: &str) -> String {
    format!("services/{cluster_id}/{namespace}/{name}")
}

/// Key of the [`ServiceImportRecord`] of `<namespace>/<name>`.
#[must_use]
pub fn import_key(namespace: &str, name: &str) -> String {
    format!("imports/{namespace}/{name}")
}

/// Key of the [`ClusterSetRecord`].
pub const CLUSTER_SET_KEY: &str = "settings/cluster-set";

#[must_use]
pub fn policy_key(name: &str) -> String {
    format!("policies/{name}")
}

/// Key of the cluster set's [`PolicyDefaultRecord`].
pub const POLICY_DEFAULT_KEY: &str = "settings/policy-default";

#[must_use]
pub fn cluster_key(cluster_id: &str) -> String {
    format!("clusters/{cluster_id}")
}

#[must_use]
pub fn endpoint_key(cluster_id: &str, hostname: &str) -> String {
    format!("endpoints/{cluster_id}/{hostname}")
}

/// A stored record as it travels: envelope plus the broker's resource version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Object {
    pub api_version: String,
    /// Revision of the cluster set at which this object was last written.
    pub resource_version: u64,
    #[serde(flatten)]
    pub record: Record,
}

impl Object {
    #[must_use]
    pub fn new(resource_version: u64, record: Record) -> Self {
        Self { api_version: API_VERSION.to_owned(), resource_version, record }
    }
}

/// `GET /v1/records`: a consistent snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListResponse {
    /// Watch from here to see every later change.
    pub resource_version: u64,
    pub items: Vec<Object>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventType {
    Put,
    Delete,
}

/// One change; `object` is the new state (Put) or the last state (Delete).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchEvent {
    #[serde(rename = "type")]
    pub kind: EventType,
    /// The revision this change created.
    pub revision: u64,
    pub object: Object,
}

/// `GET /v1/watch?since=N`: the changes after revision N, oldest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchResponse {
    /// Pass this as `since` next time.
    pub resource_version: u64,
    pub events: Vec<WatchEvent>,
    /// More events are waiting past `resource_version` (the answer was cut at
    /// [`MAX_WATCH_EVENTS`]): watch again at once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
}

/// Most events in one watch answer (whole revisions only: a revision is never split, so a
/// single larger commit is sent whole).
pub const MAX_WATCH_EVENTS: usize = 1_000;

impl WatchResponse {
    /// The first page of `events` (after `since`, oldest first): whole revisions up to
    /// [`MAX_WATCH_EVENTS`] events, the resource version to continue from, and whether more
    /// are waiting.
    #[must_use]
    pub fn page(since: u64, mut events: Vec<WatchEvent>) -> Self {
        let mut end = events.len();
        if end > MAX_WATCH_EVENTS {
            // Back up to the start of the revision that straddles the limit, unless that is
            // the first one (then it goes whole).
            let cut = events[MAX_WATCH_EVENTS].revision;
            end = events.iter().position(|e| e.revision == cut).unwrap_or(MAX_WATCH_EVENTS);
            if end == 0 {
                end = events.iter().position(|e| e.revision != cut).unwrap_or(events.len());
            }
        }
        let more = end < events.len();
        events.truncate(end);
        let resource_version = events.last().map_or(since, |e| e.revision);
        Self { resource_version, events, more }
    }
}

/// Error body of every non-2xx response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiError {
    /// Machine-readable: `Invalid`, `Conflict`, `NotFound`, `Gone`, `TooLarge`, `Internal`…
    pub code: String,
    /// What was wrong and what to do about it.
    pub message: String,
}

#[cfg(test)]
mod tests {
    fn events(revisions: &[(u64, usize)]) -> Vec<WatchEvent> {
        revisions
            .iter()
            .flat_map(|(rev, n)| {
                (0..*n).map(move |i| WatchEvent {
                    kind: EventType::Put,
                    revision: *rev,
                    object: Object::new(
                        *rev,
                        Record::Endpoint(EndpointRecord { hostname: format!("h{i}"), ..endpoint() }),
                    ),
                })
            })
            .collect()
    }

    #[test]
    fn watch_answers_are_paged_on_revision_boundaries() {
        // 2,500 one-event revisions: 1,000, 1,000, 500.
        let all = events(&(1..=2_500).map(|r| (r, 1)).collect::<Vec<_>>());
        let p = WatchResponse::page(0, all.clone());
        assert_eq!((p.events.len(), p.resource_version, p.more), (1_000, 1_000, true));
        let p = WatchResponse::page(1_000, all[1_000..].to_vec());
        assert_eq!((p.events.len(), p.resource_version, p.more), (1_000, 2_000, true));
        let p = WatchResponse::page(2_000, all[2_000..].to_vec());
        assert_eq!((p.events.len(), p.resource_version, p.more), (500, 2_500, false));
        // A revision that straddles the limit is left for the next page, whole.
        let straddle = events(&[(1, 990), (2, 20), (3, 5)]);
        let p = WatchResponse::page(0, straddle.clone());
        assert_eq!((p.events.len(), p.resource_version, p.more), (990, 1, true));
        let p = WatchResponse::page(1, straddle[990..].to_vec());
        assert_eq!((p.events.len(), p.resource_version, p.more), (25, 3, false));
        // One revision larger than a page goes whole (splitting it would lose its tail).
        let big = events(&[(7, 1_200), (8, 3)]);
        let p = WatchResponse::page(6, big);
        assert_eq!((p.events.len(), p.resource_version, p.more), (1_200, 7, true));
        // Nothing: the version asked for, no more.
        assert_eq!(
            WatchResponse::page(9, Vec::new()),
            WatchResponse { resource_version: 9, events: vec![], more: false }
        );
    }

    use super::*;

    fn key() -> WireGuardKey {
        WireGuardKey([7; 32])
    }

    pub(crate) fn endpoint() -> EndpointRecord {
        EndpointRecord {
            public_ips: vec!["172.31.0.11".parse().unwrap()],
            ..EndpointRecord::new("east", "gw-1", "172.16.1.10".parse().unwrap(), key())
        }
    }

    #[test]
    fn key_round_trips_through_base64() {
        let k = key();
        let s = k.to_string();
        assert_eq!(s.len(), 44);
        assert_eq!(s.parse::<WireGuardKey>().unwrap(), k);
    }

    #[test]
    fn key_rejects_wrong_length_and_garbage() {
        assert_eq!("AAAA".parse::<WireGuardKey>(), Err(KeyParseError::Length(3)));
        assert_eq!("not base64!".parse::<WireGuardKey>(), Err(KeyParseError::Base64));
    }

    #[test]
    fn an_export_says_who_made_it_and_nothing_else() {
        let base = r#"{"clusterId":"east","namespace":"shop","name":"cart","ips":["10.96.0.1"]"#;
        // Absent (every record written before the field existed): an operator's export.
        let old: ServiceExportRecord = serde_json::from_str(&format!("{base}}}")).unwrap();
        assert_eq!(old.source, ExportSource::Cli);
        assert!(!serde_json::to_string(&old).unwrap().contains("source"), "the wire form is unchanged");
        let k8s: ServiceExportRecord =
            serde_json::from_str(&format!(r#"{base},"source":"kubernetes"}}"#)).unwrap();
        assert_eq!(k8s.source, ExportSource::Kubernetes);
        assert!(serde_json::to_string(&k8s).unwrap().contains(r#""source":"kubernetes""#));
        // Any other name is refused, naming the values there are; any other type is refused.
        let parse =
            |v: &str| serde_json::from_str::<ServiceExportRecord>(&format!(r#"{base},"source":{v}}}"#));
        for bad in [r#""kubelet""#, r#""Kubernetes""#, r#""""#] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains("`cli`") && err.contains("`kubernetes`"), "{bad}: {err}");
        }
        for bad in ["1", "null", r#"["cli"]"#, r#"{"cli":1}"#] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn object_wire_format_is_stable() {
        let obj = Object::new(
            5,
            Record::Cluster(ClusterRecord {
                cluster_id: "east".into(),
                pod_cidrs: vec!["10.1.0.0/16".parse().unwrap()],
                service_cidrs: vec!["10.101.0.0/16".parse().unwrap()],
                global_cidrs: Vec::new(),
                labels: BTreeMap::new(),
                generation: 2,
            }),
        );
        let json = serde_json::to_value(&obj).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "apiVersion": "causeway.io/v1alpha1",
                "resourceVersion": 5,
                "kind": "Cluster",
                "spec": {
                    "clusterId": "east",
                    "podCidrs": ["10.1.0.0/16"],
                    "serviceCidrs": ["10.101.0.0/16"],
                    "generation": 2
                }
            })
        );
        let back: Object = serde_json::from_value(json).unwrap();
        assert_eq!(back, obj);
    }

    #[test]
    fn endpoint_round_trips_and_prefers_public_ip() {
        let ep = endpoint();
        let json = serde_json::to_string(&Record::Endpoint(ep.clone())).unwrap();
        let back: Record = serde_json::from_str(&json).unwrap();
        assert_eq!(back, Record::Endpoint(ep.clone()));
        assert_eq!(ep.preferred_ip(), Some("172.31.0.11".parse().unwrap()));
        assert_eq!(back.key(), "endpoints/east/gw-1");
    }

    #[test]
    fn unknown_fields_and_bad_keys_are_refused() {
        let bad =
            r#"{"kind":"Cluster","spec":{"clusterId":"a","podCidrs":[],"serviceCidrs":[],"surprise":1}}"#;
        let err = serde_json::from_str::<Record>(bad).unwrap_err().to_string();
        assert!(err.contains("surprise"), "{err}");
        let mut v = serde_json::to_value(Record::Endpoint(endpoint())).unwrap();
        v["spec"]["publicKey"] = "AAAA".into();
        let err = serde_json::from_value::<Record>(v).unwrap_err().to_string();
        assert!(err.contains("32"), "{err}");
    }
}

/// A bearer credential. Never printed: `Debug` and `Display` redact it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Token(pub String);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// What a credential allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum CredentialKind {
    /// Everything, including revoking other clusters' credentials.
    Admin,
    /// Only registering a new cluster (`causeway join`), which returns that cluster's own.
    Join,
    /// Reading the set and writing the records of one cluster.
    Cluster,
    /// Reading the set on behalf of one cluster, writing nothing (route agents).
    Reader,
}

/// `POST /v1/credentials` (admin): a new admin or join credential.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IssueRequest {
    pub kind: CredentialKind,
    /// Seconds until it stops working (none: until revoked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    /// A join token good for one registration.
    #[serde(default)]
    pub single_use: bool,
}

/// A credential just issued: its token (shown once) and its id (to revoke it by).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssueResponse {
    pub id: String,
    pub token: Token,
    /// Unix seconds from which it stops working.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

/// `GET /v1/credentials` (admin): what the broker knows of a credential, never its token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CredentialInfo {
    /// The first 12 hex digits of the token's SHA-256.
    pub id: String,
    pub kind: CredentialKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    /// Unix seconds (0: before the broker recorded it).
    pub issued_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    #[serde(default)]
    pub single_use: bool,
}

/// The admin's credentials file in a broker's data directory (written by `deploy-broker`).
pub const ADMIN_FILE: &str = "admin-credentials.json";
/// The join credential's file in a broker's data directory, handed to whoever joins clusters.
pub const BROKER_INFO_FILE: &str = "broker-info.json";

/// A credentials file: where the broker is, how to trust it, and who we are. Written 0600 by
/// `deploy-broker` (admin, and the join credential as the broker-info file) and by `join`
/// (the cluster's own).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Credentials {
    pub broker_url: String,
    /// PEM of the CA that signed the broker's certificate (absent for a plain-HTTP broker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    pub kind: CredentialKind,
    /// Set for `Cluster` credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    pub token: Token,
}

/// `O_NOFOLLOW` on Linux (the only platform Causeway runs on); spelled out so this crate needs
/// no libc dependency for one constant.
const fn libc_o_nofollow() -> i32 {
    0o400_000
}

/// `POST /v1/join` answer: the stored cluster record and the cluster's own credential.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinResponse {
    pub object: Object,
    pub token: Token,
}

/// `POST /v1/clusters/{id}/credentials` answer: the new credential, and when the old ones
/// stop working (unix seconds; the overlap window ends there).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RotateResponse {
    pub token: Token,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_valid_until: Option<u64>,
}

impl Credentials {
    /// Reads a credentials file, explaining what is wrong with it.
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| format!("{} is not a Causeway credentials file: {e}", path.display()))
    }

    /// Writes the file readable by its owner only. The temporary file is created afresh, never
    /// through a link someone left at its name, and is 0600 before a byte is written.
    pub fn save(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::{
            io::Write as _,
            os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
        };
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc_o_nofollow())
            .mode(0o600)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(&serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(tmp, path)
    }
}

#[cfg(test)]
mod credential_tests {
    use super::*;

    #[test]
    fn tokens_never_show_in_debug_output() {
        let c = Credentials {
            broker_url: "https://b".into(),
            ca_pem: None,
            kind: CredentialKind::Cluster,
            cluster_id: Some("east".into()),
            token: Token("cw1_supersecret".into()),
        };
        assert!(!format!("{c:?}").contains("supersecret"));
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains("\"token\":\"cw1_supersecret\""), "{json}");
        assert_eq!(serde_json::from_str::<Credentials>(&json).unwrap(), c);
    }

    #[test]
    fn credentials_files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("cw-creds-{}", std::process::id()));
        let path = dir.join("c.json");
        let c = Credentials {
            broker_url: "https://b".into(),
            ca_pem: Some("PEM".into()),
            kind: CredentialKind::Admin,
            cluster_id: None,
            token: Token("t".into()),
        };
        c.save(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(Credentials::load(&path).unwrap(), c);
        std::fs::write(&path, "{}").unwrap();
        assert!(Credentials::load(&path).unwrap_err().contains("not a Causeway credentials file"));
        // A link planted at the temporary name is replaced, not followed; a loose leftover
        // temporary file does not pass its mode on.
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("c.tmp")).unwrap();
        c.save(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(Credentials::load(&path).unwrap(), c);
        std::fs::write(dir.join("c.tmp"), "old").unwrap();
        std::fs::set_permissions(dir.join("c.tmp"), std::fs::Permissions::from_mode(0o644)).unwrap();
        c.save(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
