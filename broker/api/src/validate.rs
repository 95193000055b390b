//! Field validation of records, and the cluster-set rule that CIDRs of different clusters
//! do not overlap. Errors name the field and say what a valid value looks like.

use std::collections::BTreeMap;

use ipnetwork::IpNetwork;

use crate::records::{
    CABLE_BACKENDS, ClusterRecord, EndpointRecord, PolicyProtocol, PolicyRecord, ServiceExportRecord,
    ServiceType,
};

/// Largest number of CIDRs of one kind a cluster may declare.
pub const MAX_CIDRS: usize = 64;
/// Largest number of addresses of one kind an endpoint may declare.
pub const MAX_IPS: usize = 16;
/// Largest number of labels on a cluster.
pub const MAX_LABELS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error(
        "{field}: {value:?} is not a DNS-1123 label (lowercase letters, digits and '-', starting and ending with an alphanumeric, at most 63 characters)"
    )]
    NotDnsLabel { field: &'static str, value: String },
    #[error(
        "{field}: {value:?} is not a DNS-1123 subdomain (dot-separated DNS-1123 labels, at most 253 characters)"
    )]
    NotDnsSubdomain { field: &'static str, value: String },
    #[error("{field}: at least one CIDR is required")]
    NoCidrs { field: &'static str },
    #[error("{field}: {count} entries, at most {max} are allowed")]
    TooMany { field: &'static str, count: usize, max: usize },
    #[error("{field}: {cidr} has host bits set; did you mean {network}?")]
    HostBits { field: &'static str, cidr: IpNetwork, network: IpNetwork },
    #[error("{field}: {a} overlaps {b} of the same cluster")]
    SelfOverlap { field: &'static str, a: IpNetwork, b: IpNetwork },
    #[error("{field}: {addr} is not a usable unicast address")]
    BadAddress { field: &'static str, addr: std::net::IpAddr },
    #[error("reachable: {0:?} is listed twice or is the gateway's own cluster")]
    BadReachable(String),
    #[error("globalCidrs: {0}")]
    BadGlobalCidr(String),
    #[error("an endpoint needs at least one of privateIps and publicIps")]
    NoAddresses,
    #[error("port: 0 is not a valid UDP port (the endpoint's, or a candidate's)")]
    ZeroPort,
    #[error("backend: {backend:?} is not a cable backend; valid backends: {}", CABLE_BACKENDS.join(", "))]
    UnknownBackend { backend: String },
    #[error("labels: {0}")]
    BadLabel(String),
    #[error(
        "{field}: {cidr} is IPv6; cluster-set policy covers IPv4 today (IPv6 traffic gets the default action)"
    )]
    Ipv6Policy { field: &'static str, cidr: IpNetwork },
    #[error("ports: only TCP and UDP rules have ports; set protocol to tcp or udp, or drop the ports")]
    PortsWithoutProtocol,
    #[error("ports: {0} is not a valid range (1-65535, first ≤ last)")]
    BadPortRange(crate::records::PortRange),
    #[error("ports: {0}")]
    BadServicePort(String),
    #[error("ips: an exported service needs at least one virtual IP")]
    NoServiceIps,
    #[error("{0}")]
    BadServiceShape(&'static str),
    #[error("clusterSetIpPool: {0}")]
    BadClusterSetIpPool(String),
    #[error("{field}: {cidr} overlaps {range} ({why}); such addresses are never routed between clusters")]
    Reserved { field: &'static str, cidr: IpNetwork, range: IpNetwork, why: &'static str },
    #[error(
        "{field}: {cidr} is broader than /{min}; a cluster may not claim that much address space (split it, or ask the admin)"
    )]
    TooBroad { field: &'static str, cidr: IpNetwork, min: u8 },
}

/// Ranges no cluster may claim, whatever the pools say, with why (SPEC §12, trust issue).
const SPECIAL_RANGES: &[(&str, &str)] = &[
    ("0.0.0.0/8", "\"this network\", RFC 791"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local, which holds cloud metadata at 169.254.169.254"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved, and the broadcast address 255.255.255.255"),
    ("::/128", "the unspecified address"),
    ("::1/128", "loopback"),
    ("::ffff:0:0/96", "IPv4-mapped addresses"),
    ("fe80::/10", "IPv6 link-local"),
    ("ff00::/8", "IPv6 multicast"),
];

/// Shortest prefix a cluster may claim: /8 for IPv4, /32 for IPv6.
#[must_use]
pub const fn min_prefix(v6: bool) -> u8 {
    if v6 { 32 } else { 8 }
}

/// The special range `cidr` overlaps, if any, and why it is special.
#[must_use]
pub fn special_range(cidr: &IpNetwork) -> Option<(IpNetwork, &'static str)> {
    SPECIAL_RANGES.iter().find_map(|(range, why)| {
        let range: IpNetwork = range.parse().expect("valid constant prefix");
        overlaps(cidr, &range).then_some((range, *why))
    })
}

/// Whether `addr` lies in a special range (never a usable tunnel endpoint or service address).
#[must_use]
pub fn is_special_address(addr: std::net::IpAddr) -> bool {
    special_range(&IpNetwork::from(addr)).is_some()
}

/// A prefix a cluster claims (pod, service or global CIDR): canonical, not a special range,
/// not broader than [`min_prefix`].
pub fn claimable(field: &'static str, cidr: &IpNetwork) -> Result<(), ValidationError> {
    canonical(field, cidr)?;
    // Inside a special range: say which. Otherwise a broad prefix is refused for its size
    // (0.0.0.0/0 "overlaps loopback" would be true but beside the point).
    if let Some((range, why)) = special_range(cidr).filter(|(range, _)| range.prefix() <= cidr.prefix()) {
        return Err(ValidationError::Reserved { field, cidr: *cidr, range, why });
    }
    let min = min_prefix(cidr.is_ipv6());
    if cidr.prefix() < min {
        return Err(ValidationError::TooBroad { field, cidr: *cidr, min });
    }
    if let Some((range, why)) = special_range(cidr) {
        return Err(ValidationError::Reserved { field, cidr: *cidr, range, why });
    }
    Ok(())
}

/// An address that may be a service's or an endpoint's: no special address, except that
/// reserved 240.0.0.0/4 may hold global prefixes (not its broadcast address).
#[must_use]
pub fn is_global_usable(addr: std::net::IpAddr) -> bool {
    claimable_global("address", &IpNetwork::from(addr)).is_ok()
}

/// A global prefix (overlap mode): like [`claimable`], except that the reserved 240.0.0.0/4
/// is allowed (never assigned to any network, so no real CIDR can collide with it: the
/// default global pool 242.0.0.0/8 lies there) but not its broadcast address.
pub fn claimable_global(field: &'static str, cidr: &IpNetwork) -> Result<(), ValidationError> {
    let reserved: IpNetwork = "240.0.0.0/4".parse().expect("valid constant prefix");
    match special_range(cidr) {
        Some((range, _)) if range == reserved && reserved.prefix() <= cidr.prefix() => {
            canonical(field, cidr)?;
            if cidr.prefix() < min_prefix(false) {
                return Err(ValidationError::TooBroad { field, cidr: *cidr, min: min_prefix(false) });
            }
            if cidr.contains(std::net::Ipv4Addr::BROADCAST.into()) {
                return Err(ValidationError::BadGlobalCidr(format!("{cidr} holds the broadcast address")));
            }
            Ok(())
        }
        _ => claimable(field, cidr),
    }
}

/// A CIDR of a cluster that lies outside the pools the admin granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutsidePools {
    pub field: &'static str,
    pub cidr: IpNetwork,
    pub pools: Vec<IpNetwork>,
}

impl std::fmt::Display for OutsidePools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} is outside the address pools granted to member clusters ({}); ask the cluster set's admin to grant it (`causeway cluster-set --{}-pool …`)",
            self.field,
            self.cidr,
            self.pools.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
            match self.field {
                "podCidrs" => "pod",
                "serviceCidrs" => "service",
                _ => "global",
            }
        )
    }
}

/// Every CIDR of `c` lies inside one of the pools of its kind.
pub fn check_pools(c: &ClusterRecord, pools: &crate::records::AddressPools) -> Result<(), OutsidePools> {
    let inside = |cidr: &IpNetwork, pool: &[IpNetwork]| {
        pool.iter().any(|p| {
            p.is_ipv4() == cidr.is_ipv4() && p.prefix() <= cidr.prefix() && p.contains(cidr.network())
        })
    };
    let kinds = [
        ("podCidrs", c.pod_cidrs.as_slice(), &pools.pod_cidrs),
        ("serviceCidrs", c.service_cidrs.as_slice(), &pools.service_cidrs),
    ];
    let globals: Vec<IpNetwork> = c.globals().copied().collect();
    let kinds = kinds.into_iter().chain([("globalCidrs", globals.as_slice(), &pools.global_cidrs)]);
    for (field, cidrs, pool) in kinds {
        if let Some(cidr) = cidrs.iter().find(|n| !inside(n, pool)) {
            return Err(OutsidePools { field, cidr: *cidr, pools: pool.clone() });
        }
    }
    Ok(())
}

/// The first of `addrs` that a CIDR of `c` covers, with that CIDR.
pub fn covered(
    c: &ClusterRecord,
    addrs: impl IntoIterator<Item = std::net::IpAddr>,
) -> Option<(IpNetwork, std::net::IpAddr)> {
    let cidrs: Vec<&IpNetwork> = c.all_cidrs().chain(c.globals()).collect();
    addrs.into_iter().find_map(|a| cidrs.iter().find(|n| n.contains(a)).map(|n| (**n, a)))
}

/// Largest number of endpoints one headless export may list.
pub const MAX_SERVICE_ENDPOINTS: usize = 256;

/// Checks an exported service on its own (its addresses against the cluster: the broker).
/// A ClusterSetIP export names its ClusterIPs; a headless one its ready endpoints. Two ports
/// with the same number and protocol, or the same name, are refused: the service would be
/// ambiguous before any other cluster is involved.
pub fn validate_service(s: &ServiceExportRecord) -> Result<(), ValidationError> {
    dns_label("clusterId", &s.cluster_id)?;
    dns_label("namespace", &s.namespace)?;
    dns_label("name", &s.name)?;
    match s.service_type {
        ServiceType::ClusterSetIP => {
            if s.ips.is_empty() {
                return Err(ValidationError::NoServiceIps);
            }
            if !s.endpoints.is_empty() {
                return Err(ValidationError::BadServiceShape(
                    "endpoints: only a headless export lists endpoints; a ClusterSetIP export names its ClusterIPs in ips",
                ));
            }
        }
        ServiceType::Headless => {
            if !s.ips.is_empty() {
                return Err(ValidationError::BadServiceShape(
                    "ips: a headless export has no virtual IP; list its ready endpoints in endpoints",
                ));
            }
        }
    }
    if s.ips.len() > MAX_IPS {
        return Err(ValidationError::TooMany { field: "ips", count: s.ips.len(), max: MAX_IPS });
    }
    // Overlap mode exports global addresses, which may lie in 240.0.0.0/4 (the broker then
    // checks that they lie in the cluster's own global prefixes).
    for addr in &s.ips {
        if !is_global_usable(*addr) {
            return Err(ValidationError::BadAddress { field: "ips", addr: *addr });
        }
    }
    if s.endpoints.len() > MAX_SERVICE_ENDPOINTS {
        return Err(ValidationError::TooMany {
            field: "endpoints",
            count: s.endpoints.len(),
            max: MAX_SERVICE_ENDPOINTS,
        });
    }
    for e in &s.endpoints {
        if !is_global_usable(e.ip) {
            return Err(ValidationError::BadAddress { field: "endpoints.ip", addr: e.ip });
        }
        if let Some(h) = &e.hostname {
            dns_label("endpoints.hostname", h)?;
        }
    }
    if s.ports.len() > MAX_PORT_RANGES {
        return Err(ValidationError::TooMany { field: "ports", count: s.ports.len(), max: MAX_PORT_RANGES });
    }
    for (i, p) in s.ports.iter().enumerate() {
        if p.port == 0 {
            return Err(ValidationError::BadServicePort("0 is not a port".into()));
        }
        if !["TCP", "UDP", "SCTP"].contains(&p.protocol.as_str()) {
            return Err(ValidationError::BadServicePort(format!(
                "protocol {:?} is not TCP, UDP or SCTP",
                p.protocol
            )));
        }
        if let Some(n) = &p.name {
            dns_label("ports.name", n)?;
        }
        let earlier = &s.ports[..i];
        if earlier.iter().any(|q| q.port == p.port && q.protocol == p.protocol) {
            return Err(ValidationError::BadServicePort(format!(
                "{}/{} is listed twice",
                p.port, p.protocol
            )));
        }
        if let Some(n) = &p.name
            && earlier.iter().any(|q| q.name.as_ref() == Some(n))
        {
            return Err(ValidationError::BadServicePort(format!("the name {n:?} is given to two ports")));
        }
    }
    Ok(())
}

/// Checks the cluster set's ClusterSetIP pool: IPv4, canonical, between /8 and /28, and
/// nothing a host treats specially (loopback, link-local, multicast, the broadcast address).
/// The reserved 240.0.0.0/4 is allowed: that is where the default pool lies.
pub fn validate_cluster_set_ip_pool(pool: &IpNetwork) -> Result<(), ValidationError> {
    let IpNetwork::V4(v4) = pool else {
        return Err(ValidationError::BadClusterSetIpPool(format!(
            "{pool} is IPv6; ClusterSetIPs are IPv4 today"
        )));
    };
    canonical("clusterSetIpPool", pool)?;
    if !(8..=28).contains(&v4.prefix()) {
        return Err(ValidationError::BadClusterSetIpPool(format!(
            "{pool}: the pool must be between /8 and /28"
        )));
    }
    if let Some((range, why)) = special_range(pool)
        && range != "240.0.0.0/4".parse::<IpNetwork>().expect("valid constant prefix")
    {
        return Err(ValidationError::BadClusterSetIpPool(format!("{pool} overlaps {range} ({why})")));
    }
    if pool.contains(std::net::Ipv4Addr::BROADCAST.into()) {
        return Err(ValidationError::BadClusterSetIpPool(format!("{pool} holds the broadcast address")));
    }
    Ok(())
}

/// Largest number of port ranges in one policy rule.
pub const MAX_PORT_RANGES: usize = 64;

/// Checks a policy rule on its own.
pub fn validate_policy(p: &PolicyRecord) -> Result<(), ValidationError> {
    dns_label("name", &p.name)?;
    for (side, peer) in [("from", &p.from), ("to", &p.to)] {
        if let Some(c) = &peer.cluster {
            dns_label(if side == "from" { "from.cluster" } else { "to.cluster" }, c)?;
        }
        let field = if side == "from" { "from.cidrs" } else { "to.cidrs" };
        if peer.cidrs.len() > MAX_CIDRS {
            return Err(ValidationError::TooMany { field, count: peer.cidrs.len(), max: MAX_CIDRS });
        }
        for cidr in &peer.cidrs {
            canonical(field, cidr)?;
            if cidr.is_ipv6() {
                return Err(ValidationError::Ipv6Policy { field, cidr: *cidr });
            }
        }
    }
    if !p.ports.is_empty() && !matches!(p.protocol, PolicyProtocol::Tcp | PolicyProtocol::Udp) {
        return Err(ValidationError::PortsWithoutProtocol);
    }
    if p.ports.len() > MAX_PORT_RANGES {
        return Err(ValidationError::TooMany { field: "ports", count: p.ports.len(), max: MAX_PORT_RANGES });
    }
    for r in &p.ports {
        if r.first == 0 || r.first > r.last {
            return Err(ValidationError::BadPortRange(*r));
        }
    }
    Ok(())
}

/// Checks a cluster record on its own (not against other clusters).
pub fn validate_cluster(c: &ClusterRecord) -> Result<(), ValidationError> {
    dns_label("clusterId", &c.cluster_id)?;
    if c.pod_cidrs.is_empty() {
        return Err(ValidationError::NoCidrs { field: "podCidrs" });
    }
    for (field, list) in [("podCidrs", &c.pod_cidrs), ("serviceCidrs", &c.service_cidrs)] {
        if list.len() > MAX_CIDRS {
            return Err(ValidationError::TooMany { field, count: list.len(), max: MAX_CIDRS });
        }
        for cidr in list {
            claimable(field, cidr)?;
        }
    }
    for g in &c.global_cidrs {
        if !c.all_cidrs().any(|n| *n == g.cidr) {
            return Err(ValidationError::BadGlobalCidr(format!(
                "{} is none of the cluster's pod or service CIDRs",
                g.cidr
            )));
        }
        if g.global.is_ipv4() != g.cidr.is_ipv4() || g.global.prefix() != g.cidr.prefix() {
            return Err(ValidationError::BadGlobalCidr(format!(
                "{} for {}: a global prefix has the family and the length of the CIDR it stands for (the map is address for address)",
                g.global, g.cidr
            )));
        }
        claimable_global("globalCidrs", &g.global)?;
    }
    for (i, a) in c.global_cidrs.iter().enumerate() {
        for b in &c.global_cidrs[i + 1..] {
            if a.cidr == b.cidr {
                return Err(ValidationError::BadGlobalCidr(format!("{} has two global prefixes", a.cidr)));
            }
            if overlaps(&a.global, &b.global) {
                return Err(ValidationError::SelfOverlap { field: "globalCidrs", a: a.global, b: b.global });
            }
        }
    }
    let all: Vec<&IpNetwork> = c.all_cidrs().collect();
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            if overlaps(a, b) {
                return Err(ValidationError::SelfOverlap { field: "podCidrs/serviceCidrs", a: **a, b: **b });
            }
        }
    }
    if c.labels.len() > MAX_LABELS {
        return Err(ValidationError::TooMany { field: "labels", count: c.labels.len(), max: MAX_LABELS });
    }
    for (k, v) in &c.labels {
        if k.is_empty() || k.len() > 253 || v.len() > 63 {
            return Err(ValidationError::BadLabel(format!(
                "{k:?}={v:?}: keys are 1-253 characters, values at most 63"
            )));
        }
    }
    Ok(())
}

/// Checks an endpoint record on its own.
pub fn validate_endpoint(e: &EndpointRecord) -> Result<(), ValidationError> {
    dns_label("clusterId", &e.cluster_id)?;
    dns_subdomain("hostname", &e.hostname)?;
    if e.private_ips.is_empty() && e.public_ips.is_empty() {
        return Err(ValidationError::NoAddresses);
    }
    for (field, list) in [("privateIps", &e.private_ips), ("publicIps", &e.public_ips)] {
        if list.len() > MAX_IPS {
            return Err(ValidationError::TooMany { field, count: list.len(), max: MAX_IPS });
        }
        for addr in list {
            if is_special_address(*addr) {
                return Err(ValidationError::BadAddress { field, addr: *addr });
            }
        }
    }
    // In overlap mode the probe address lies in a global prefix, possibly in 240.0.0.0/4 (the
    // broker then checks that it is the cluster's own).
    if let Some(addr) = e.health_check_ip
        && !is_global_usable(addr)
    {
        return Err(ValidationError::BadAddress { field: "healthCheckIp", addr });
    }
    if e.port == 0 {
        return Err(ValidationError::ZeroPort);
    }
    if !CABLE_BACKENDS.contains(&e.backend.as_str()) {
        return Err(ValidationError::UnknownBackend { backend: e.backend.clone() });
    }
    if e.candidates.len() > MAX_IPS {
        return Err(ValidationError::TooMany {
            field: "candidates",
            count: e.candidates.len(),
            max: MAX_IPS,
        });
    }
    for c in &e.candidates {
        if is_special_address(c.address.ip()) {
            return Err(ValidationError::BadAddress { field: "candidates", addr: c.address.ip() });
        }
        if c.address.port() == 0 {
            return Err(ValidationError::ZeroPort);
        }
    }
    if let Some(list) = &e.reachable {
        if list.len() > MAX_REACHABLE {
            return Err(ValidationError::TooMany {
                field: "reachable",
                count: list.len(),
                max: MAX_REACHABLE,
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        for id in list {
            dns_label("reachable", id)?;
            if id == &e.cluster_id || !seen.insert(id) {
                return Err(ValidationError::BadReachable(id.clone()));
            }
        }
    }
    Ok(())
}

/// Most remote clusters one endpoint may report reaching.
pub const MAX_REACHABLE: usize = 1024;

/// A clash between a new cluster record and one already in the set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlap {
    pub other_cluster: String,
    pub ours: IpNetwork,
    pub theirs: IpNetwork,
}

impl std::fmt::Display for Overlap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} overlaps {} of cluster {:?}; choose non-overlapping CIDRs (overlap mode is not enabled)",
            self.ours, self.theirs, self.other_cluster
        )
    }
}

/// The first overlap between `candidate` and the other clusters of the set (its own earlier
/// version, same id, is ignored).
pub fn check_overlaps<'a>(
    candidate: &ClusterRecord,
    existing: impl IntoIterator<Item = &'a ClusterRecord>,
) -> Result<(), Overlap> {
    let others: BTreeMap<&str, &ClusterRecord> = existing
        .into_iter()
        .filter(|c| c.cluster_id != candidate.cluster_id)
        .map(|c| (c.cluster_id.as_str(), c))
        .collect();
    for ours in candidate.all_cidrs() {
        for (id, other) in &others {
            if let Some(theirs) = other.all_cidrs().find(|t| overlaps(ours, t)) {
                return Err(Overlap { other_cluster: (*id).to_owned(), ours: *ours, theirs: *theirs });
            }
        }
    }
    Ok(())
}

/// Overlap mode: every pod and service CIDR of the candidate has a global prefix, and no
/// global prefix (its own or another cluster's) overlaps another cluster's global prefix or
/// any cluster's pod or service CIDRs (which may overlap each other freely).
pub fn check_global_overlaps<'a>(
    candidate: &ClusterRecord,
    existing: impl IntoIterator<Item = &'a ClusterRecord>,
) -> Result<(), GlobalOverlap> {
    if let Some(real) = candidate.all_cidrs().find(|n| candidate.global_of(n).is_none()) {
        return Err(GlobalOverlap::Missing { cluster: candidate.cluster_id.clone(), cidr: *real });
    }
    let clash = |other: &ClusterRecord, ours: &IpNetwork, theirs: &IpNetwork, what| GlobalOverlap::Clash {
        overlap: Overlap { other_cluster: other.cluster_id.clone(), ours: *ours, theirs: *theirs },
        what,
    };
    if let Some((g, n)) =
        candidate.globals().find_map(|g| candidate.all_cidrs().find(|n| overlaps(g, n)).map(|n| (g, n)))
    {
        return Err(clash(candidate, g, n, "its own CIDR"));
    }
    for other in existing.into_iter().filter(|c| c.cluster_id != candidate.cluster_id) {
        for ours in candidate.globals() {
            if let Some(theirs) = other.globals().find(|t| overlaps(ours, t)) {
                return Err(clash(other, ours, theirs, "global prefix"));
            }
            if let Some(theirs) = other.all_cidrs().find(|t| overlaps(ours, t)) {
                return Err(clash(other, ours, theirs, "CIDR"));
            }
        }
        for ours in candidate.all_cidrs() {
            if let Some(theirs) = other.globals().find(|t| overlaps(ours, t)) {
                return Err(clash(other, ours, theirs, "global prefix"));
            }
        }
    }
    Ok(())
}

/// Why a cluster does not fit a cluster set in overlap mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GlobalOverlap {
    /// A CIDR with no global prefix (the broker allocates them; this is a record it could not
    /// complete).
    Missing { cluster: String, cidr: IpNetwork },
    /// `ours` overlaps `what` `theirs` of another cluster (or of its own).
    Clash { overlap: Overlap, what: &'static str },
}

impl std::fmt::Display for GlobalOverlap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing { cluster, cidr } => write!(
                f,
                "cluster {cluster:?} has no global prefix for {cidr}; the cluster set runs in overlap mode, where every pod and service CIDR needs one"
            ),
            Self::Clash { overlap: o, what } => write!(
                f,
                "{} overlaps {what} {} of cluster {:?}; in overlap mode global prefixes are unique and clear of every cluster's CIDRs",
                o.ours, o.theirs, o.other_cluster
            ),
        }
    }
}

/// Whether two prefixes share any address.
#[must_use]
pub fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    match (a, b) {
        (IpNetwork::V4(x), IpNetwork::V4(y)) => x.contains(y.network()) || y.contains(x.network()),
        (IpNetwork::V6(x), IpNetwork::V6(y)) => x.contains(y.network()) || y.contains(x.network()),
        _ => false,
    }
}

fn canonical(field: &'static str, cidr: &IpNetwork) -> Result<(), ValidationError> {
    let network = IpNetwork::new(cidr.network(), cidr.prefix()).expect("prefix already valid");
    if network.ip() != cidr.ip() {
        return Err(ValidationError::HostBits { field, cidr: *cidr, network });
    }
    Ok(())
}

fn is_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

fn dns_label(field: &'static str, s: &str) -> Result<(), ValidationError> {
    if is_label(s) { Ok(()) } else { Err(ValidationError::NotDnsLabel { field, value: s.to_owned() }) }
}

fn dns_subdomain(field: &'static str, s: &str) -> Result<(), ValidationError> {
    if !s.is_empty() && s.len() <= 253 && s.split('.').all(is_label) {
        Ok(())
    } else {
        Err(ValidationError::NotDnsSubdomain { field, value: s.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{GlobalCidr, WireGuardKey};

    fn cluster(id: &str, pod: &str, svc: &str) -> ClusterRecord {
        ClusterRecord::new(id, vec![pod.parse().unwrap()], vec![svc.parse().unwrap()])
    }

    fn endpoint() -> EndpointRecord {
        EndpointRecord::new("east", "gw-1.example", "172.16.1.10".parse().unwrap(), WireGuardKey([1; 32]))
    }

    #[test]
    fn good_records_pass() {
        validate_cluster(&cluster("east", "10.1.0.0/16", "10.101.0.0/16")).unwrap();
        validate_endpoint(&endpoint()).unwrap();
    }

    #[test]
    fn cluster_ids_must_be_dns_labels() {
        for bad in ["", "East", "-a", "a-", "a_b", "a.b", &"x".repeat(64)] {
            let err = validate_cluster(&cluster(bad, "10.1.0.0/16", "10.2.0.0/16")).unwrap_err();
            assert!(matches!(err, ValidationError::NotDnsLabel { field: "clusterId", .. }), "{bad}: {err}");
        }
        validate_cluster(&cluster(&"x".repeat(63), "10.1.0.0/16", "10.2.0.0/16")).unwrap();
    }

    #[test]
    fn cidrs_need_zero_host_bits_and_no_self_overlap() {
        let err = validate_cluster(&cluster("a", "10.1.2.3/16", "10.2.0.0/16")).unwrap_err();
        assert_eq!(err.to_string(), "podCidrs: 10.1.2.3/16 has host bits set; did you mean 10.1.0.0/16?");
        let err = validate_cluster(&cluster("a", "10.1.0.0/16", "10.1.128.0/17")).unwrap_err();
        assert!(matches!(err, ValidationError::SelfOverlap { .. }), "{err}");
        let mut c = cluster("a", "10.1.0.0/16", "10.2.0.0/16");
        c.pod_cidrs.clear();
        assert_eq!(validate_cluster(&c), Err(ValidationError::NoCidrs { field: "podCidrs" }));
    }

    #[test]
    fn endpoint_fields_are_checked() {
        let mut e = endpoint();
        e.port = 0;
        assert_eq!(validate_endpoint(&e), Err(ValidationError::ZeroPort));
        let mut e = endpoint();
        e.backend = "ipsec".into();
        let msg = validate_endpoint(&e).unwrap_err().to_string();
        assert!(msg.contains("valid backends: wireguard"), "{msg}");
        let mut e = endpoint();
        e.private_ips.clear();
        assert_eq!(validate_endpoint(&e), Err(ValidationError::NoAddresses));
        let mut e = endpoint();
        e.private_ips = vec!["0.0.0.0".parse().unwrap()];
        assert!(matches!(validate_endpoint(&e), Err(ValidationError::BadAddress { .. })));
        let mut e = endpoint();
        e.hostname = "Bad_Host".into();
        assert!(matches!(validate_endpoint(&e), Err(ValidationError::NotDnsSubdomain { .. })));
        // The connection summary: cluster ids, each once, never the gateway's own.
        let mut e = endpoint();
        e.reachable = Some(vec!["west".into(), "north".into()]);
        validate_endpoint(&e).unwrap();
        e.reachable = Some(vec![]);
        validate_endpoint(&e).unwrap();
        e.reachable = Some(vec![e.cluster_id.clone()]);
        assert_eq!(validate_endpoint(&e), Err(ValidationError::BadReachable(e.cluster_id.clone())));
        e.reachable = Some(vec!["west".into(), "west".into()]);
        assert_eq!(validate_endpoint(&e), Err(ValidationError::BadReachable("west".into())));
        e.reachable = Some(vec!["a b".into()]);
        assert!(matches!(
            validate_endpoint(&e),
            Err(ValidationError::NotDnsLabel { field: "reachable", .. })
        ));
        e.reachable = Some((0..=MAX_REACHABLE).map(|i| format!("c{i}")).collect());
        assert!(matches!(validate_endpoint(&e), Err(ValidationError::TooMany { field: "reachable", .. })));
        // Candidates: usable unicast addresses, real ports, a bounded list.
        let candidate = |a: &str| crate::records::Candidate {
            address: a.parse().unwrap(),
            kind: crate::records::CandidateKind::Reflexive,
        };
        let mut e = endpoint();
        e.candidates = vec![candidate("203.0.113.9:40001")];
        validate_endpoint(&e).unwrap();
        for bad in ["169.254.169.254:1", "127.0.0.1:51820", "0.0.0.0:1", "[ff02::1]:1", "224.0.0.1:9"] {
            e.candidates = vec![candidate(bad)];
            assert!(
                matches!(validate_endpoint(&e), Err(ValidationError::BadAddress { field: "candidates", .. })),
                "{bad}"
            );
        }
        e.candidates = vec![candidate("203.0.113.9:0")];
        assert_eq!(validate_endpoint(&e), Err(ValidationError::ZeroPort));
        e.candidates = (0..=MAX_IPS).map(|i| candidate(&format!("203.0.113.9:{}", 1000 + i))).collect();
        assert!(matches!(validate_endpoint(&e), Err(ValidationError::TooMany { field: "candidates", .. })));
    }

    #[test]
    fn paths_list_every_address_once_in_preference_order() {
        use crate::records::{Candidate, CandidateKind::*};
        let mut e = endpoint();
        e.private_ips = vec!["172.31.0.5".parse().unwrap()];
        e.public_ips = vec!["198.51.100.5".parse().unwrap()];
        e.port = 51820;
        e.candidates = vec![
            Candidate { address: "203.0.113.9:40001".parse().unwrap(), kind: Reflexive },
            // The configured public address, found again by STUN: listed once, as public.
            Candidate { address: "198.51.100.5:51820".parse().unwrap(), kind: Reflexive },
        ];
        let got: Vec<(String, crate::records::CandidateKind)> =
            e.paths().iter().map(|c| (c.address.to_string(), c.kind)).collect();
        assert_eq!(
            got,
            vec![
                ("172.31.0.5:51820".to_owned(), Private),
                ("198.51.100.5:51820".to_owned(), Public),
                ("203.0.113.9:40001".to_owned(), Reflexive),
            ]
        );
        let ips: Vec<String> = e.addresses().map(|a| a.to_string()).collect();
        assert_eq!(ips, ["172.31.0.5", "198.51.100.5", "203.0.113.9", "198.51.100.5"]);
    }

    #[test]
    fn overlaps_between_clusters_name_the_other_cluster() {
        let east = cluster("east", "10.1.0.0/16", "10.101.0.0/16");
        let west = cluster("west", "10.2.0.0/16", "10.102.0.0/16");
        check_overlaps(&west, [&east]).unwrap();
        let clash = cluster("north", "10.3.0.0/16", "10.101.4.0/24");
        let err = check_overlaps(&clash, [&east, &west]).unwrap_err();
        assert_eq!(err.other_cluster, "east");
        assert_eq!(err.theirs, "10.101.0.0/16".parse::<IpNetwork>().unwrap());
        assert!(err.to_string().contains("10.101.4.0/24 overlaps 10.101.0.0/16 of cluster \"east\""));
        // A cluster never clashes with its own earlier version.
        check_overlaps(&east, [&east]).unwrap();
    }

    #[test]
    fn overlap_is_symmetric_and_family_aware() {
        let a: IpNetwork = "10.0.0.0/8".parse().unwrap();
        let b: IpNetwork = "10.9.0.0/16".parse().unwrap();
        let c: IpNetwork = "fd00::/8".parse().unwrap();
        assert!(overlaps(&a, &b) && overlaps(&b, &a));
        assert!(!overlaps(&a, &c));
        assert!(!overlaps(&"10.1.0.0/16".parse().unwrap(), &"10.2.0.0/16".parse().unwrap()));
    }

    #[test]
    fn special_and_broad_prefixes_are_refused_whatever_the_pools() {
        let refused = [
            ("128.0.0.0/1", "broader than /8"),
            ("0.0.0.0/0", "broader than /8"),
            ("10.0.0.0/7", "broader than /8"),
            ("169.254.169.254/32", "cloud metadata"),
            ("169.254.0.0/16", "link-local"),
            ("224.0.0.0/4", "multicast"),
            ("239.1.0.0/16", "multicast"),
            ("127.0.0.0/8", "loopback"),
            ("0.0.0.0/8", "RFC 791"),
            ("240.0.0.0/4", "reserved"),
            ("255.255.255.255/32", "broadcast"),
            ("::/0", "broader than /32"),
            ("2000::/3", "broader than /32"),
            ("::/96", "unspecified"),
            ("::ffff:0:0/96", "IPv4-mapped"),
            ("fe80::/64", "link-local"),
            ("ff02::/16", "multicast"),
        ];
        for (cidr, why) in refused {
            let err = validate_cluster(&cluster("x", cidr, "10.150.0.0/16")).unwrap_err();
            assert!(
                matches!(
                    err,
                    ValidationError::Reserved { field: "podCidrs", .. }
                        | ValidationError::TooBroad { field: "podCidrs", .. }
                ),
                "{cidr}: {err}"
            );
            assert!(err.to_string().contains(why), "{cidr}: {err}");
            // The same as a service CIDR and as a global CIDR.
            let err = validate_cluster(&cluster("x", "10.1.0.0/16", cidr)).unwrap_err();
            assert!(err.to_string().starts_with("serviceCidrs: "), "{cidr}: {err}");
            // As a global prefix (for a real CIDR of its length), unless it is reserved space
            // that global prefixes may use (240.0.0.0/4 less the broadcast address).
            let global: IpNetwork = cidr.parse().unwrap();
            if global.is_ipv4() && global.prefix() >= 8 {
                let mut c = cluster("x", &format!("10.0.0.0/{}", global.prefix()), "172.16.0.0/16");
                c.global_cidrs = vec![GlobalCidr { cidr: c.pod_cidrs[0], global }];
                let err = validate_cluster(&c).unwrap_err().to_string();
                assert!(err.starts_with("globalCidrs: "), "{cidr}: {err}");
            }
        }
        // The shortest allowed prefixes, and ordinary ones, pass.
        for ok in ["10.0.0.0/8", "100.64.0.0/10", "fd00:1::/64", "2001:db8::/32", "192.168.0.0/16"] {
            validate_cluster(&cluster("x", ok, "172.16.0.0/16")).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn special_addresses_are_no_endpoint_service_or_probe_address() {
        for bad in ["169.254.169.254", "255.255.255.255", "0.1.2.3", "fe80::1", "::ffff:10.0.0.1", "ff02::1"]
        {
            let mut e = endpoint();
            e.public_ips = vec![bad.parse().unwrap()];
            assert!(
                matches!(validate_endpoint(&e), Err(ValidationError::BadAddress { field: "publicIps", .. })),
                "{bad}"
            );
            let mut e = endpoint();
            e.health_check_ip = Some(bad.parse().unwrap());
            assert!(
                matches!(
                    validate_endpoint(&e),
                    Err(ValidationError::BadAddress { field: "healthCheckIp", .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn pools_bound_every_kind_of_cidr() {
        let pools = crate::records::AddressPools::default();
        let c = cluster("x", "10.1.0.0/16", "192.168.0.0/16");
        check_pools(&c, &pools).unwrap();
        // Public space, inside the always-allowed lengths: refused by the default pools only.
        let c = cluster("x", "8.8.0.0/16", "10.150.0.0/16");
        validate_cluster(&c).unwrap();
        let err = check_pools(&c, &pools).unwrap_err();
        assert_eq!(err.field, "podCidrs");
        assert!(err.to_string().contains("8.8.0.0/16 is outside the address pools"), "{err}");
        assert!(err.to_string().contains("--pod-pool"), "{err}");
        // A prefix straddling a pool's edge is outside (10.0.0.0/8 does not hold 10.0.0.0/7).
        let narrow = crate::records::AddressPools {
            pod_cidrs: vec!["10.1.0.0/16".parse().unwrap()],
            service_cidrs: vec!["10.101.0.0/16".parse().unwrap()],
            global_cidrs: vec!["100.64.0.0/10".parse().unwrap()],
        };
        check_pools(&cluster("x", "10.1.4.0/24", "10.101.0.0/16"), &narrow).unwrap();
        assert_eq!(
            check_pools(&cluster("x", "10.1.0.0/15", "10.101.0.0/16"), &narrow).unwrap_err().field,
            "podCidrs"
        );
        assert_eq!(
            check_pools(&cluster("x", "10.1.0.0/16", "10.1.128.0/17"), &narrow).unwrap_err().field,
            "serviceCidrs"
        );
        let mut g = cluster("x", "10.1.0.0/16", "10.101.0.0/16");
        g.global_cidrs = vec![GlobalCidr { cidr: g.pod_cidrs[0], global: "10.99.0.0/16".parse().unwrap() }];
        assert_eq!(check_pools(&g, &narrow).unwrap_err().field, "globalCidrs");
        // Families never mix: an IPv6 CIDR needs an IPv6 pool.
        assert!(check_pools(&cluster("x", "fd00:1::/64", "10.101.0.0/16"), &narrow).is_err());
        check_pools(&cluster("x", "fd00:1::/64", "10.150.0.0/16"), &pools).unwrap();
    }

    #[test]
    fn covered_addresses_are_found() {
        let c = cluster("x", "10.1.0.0/16", "10.150.0.0/16");
        let addrs: Vec<std::net::IpAddr> = vec!["172.31.0.2".parse().unwrap(), "10.150.3.4".parse().unwrap()];
        assert_eq!(covered(&c, addrs.iter().copied()), Some(("10.150.0.0/16".parse().unwrap(), addrs[1])));
        assert_eq!(covered(&c, addrs[..1].iter().copied()), None);
    }
}
