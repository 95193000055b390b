//! The `clusterset.local` zone as data, and every answer it gives (sans IO: records and health
//! in, DNS records out). Follows the Multi-Cluster Services DNS specification (KEP-1645,
//! `specification.md`, schema 1.0.0):
//!
//! | name | ClusterSetIP service | headless service |
//! |---|---|---|
//! | `<svc>.<ns>.svc.clusterset.local` A/AAAA | the ClusterSetIP | every ready endpoint of every reachable cluster; none → NXDOMAIN |
//! | `_<port>._<proto>.<svc>.<ns>.svc…` SRV | the named port → `<svc>.<ns>.svc…` | one per endpoint with a hostname → `<hostname>.<cluster>.<svc>…` |
//! | `<cluster>.<svc>.<ns>.svc…` | does not exist (spec §2.3.4) | that cluster's ready endpoints |
//! | `<hostname>.<cluster>.<svc>.<ns>.svc…` | does not exist | that endpoint |
//! | PTR of an address | ClusterSetIP → `<svc>.<ns>.svc…` | endpoint → `<hostname>.<cluster>.<svc>…` |
//! | `dns-version.clusterset.local` TXT | `"1.0.0"` | |
//!
//! A name that exists without records of the asked type is NODATA (NOERROR, empty answer, the
//! SOA in authority); a name that does not exist is NXDOMAIN; a name outside the zones this
//! server is authoritative for is REFUSED. Names compare case-insensitively.
//!
//! Health decides headless answers only: a cluster the local gateways cannot reach is left out,
//! so no client is handed an address behind a dead tunnel. A ClusterSetIP stays answered (it is
//! stable for the service's life); the nodes' socket programs pick among reachable clusters at
//! `connect()`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use causeway_broker_api::{Object, Record as BrokerRecord, ServiceEndpoint, ServicePort, ServiceType};
use hickory_proto::{
    op::ResponseCode,
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, AAAA, PTR, SOA, SRV, TXT},
    },
};

/// The cluster-set zone.
pub const ZONE: &str = "clusterset.local.";
/// The schema version of the MCS DNS specification this server follows.
pub const SCHEMA_VERSION: &str = "1.0.0";
/// Default TTL of answers (Lighthouse's too).
pub const DEFAULT_TTL: u32 = 5;

/// Which clusters the local gateways reach through a working tunnel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// No health source: every cluster counts as reachable.
    Unknown,
    /// These remote clusters are reachable (the local cluster always is).
    Reachable(BTreeSet<String>),
}

impl Health {
    fn up(&self, local: &str, cluster: &str) -> bool {
        match self {
            Health::Unknown => true,
            Health::Reachable(set) => cluster == local || set.contains(cluster),
        }
    }
}

/// One cluster's part of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Part {
    cluster_id: String,
    endpoints: Vec<ServiceEndpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Service {
    service_type: ServiceType,
    ips: Vec<IpAddr>,
    ports: Vec<ServicePort>,
    /// Clusters taking part (not excluded by a type conflict), oldest export first.
    parts: Vec<Part>,
}

/// What one query gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub code: ResponseCode,
    /// Whether this server is authoritative for the name (false only for REFUSED).
    pub authoritative: bool,
    pub answers: Vec<Record>,
    /// The zone's SOA for negative answers (RFC 2308), empty otherwise.
    pub soa: Vec<Record>,
    pub additionals: Vec<Record>,
}

impl Answer {
    fn refused() -> Self {
        Self {
            code: ResponseCode::Refused,
            authoritative: false,
            answers: vec![],
            soa: vec![],
            additionals: vec![],
        }
    }
}

/// The zone's contents: every service import, indexed for lookups.
#[derive(Clone, Debug)]
pub struct Catalog {
    zone: Name,
    /// The reverse zone of the ClusterSetIP pool (PTR answers there are authoritative).
    local_cluster: String,
    services: BTreeMap<(String, String), Service>,
    namespaces: BTreeSet<String>,
    ttl: u32,
    /// Revision of the records: the SOA serial.
    serial: u32,
}

impl Catalog {
    /// The catalog of the records at one revision, for a server in `local_cluster`.
    #[must_use]
    pub fn new(objects: &[Object], local_cluster: &str, ttl: u32, revision: u64) -> Self {
        let exports: BTreeMap<(&str, &str, &str), &causeway_broker_api::ServiceExportRecord> = objects
            .iter()
            .filter_map(|o| match &o.record {
                BrokerRecord::ServiceExport(s) => {
                    Some(((s.cluster_id.as_str(), s.namespace.as_str(), s.name.as_str()), s))
                }
                _ => None,
            })
            .collect();
        let mut services = BTreeMap::new();
        for o in objects {
            let BrokerRecord::ServiceImport(i) = &o.record else { continue };
            let parts = i
                .clusters
                .iter()
                .filter(|c| !c.excluded)
                .filter_map(|c| {
                    let export =
                        exports.get(&(c.cluster_id.as_str(), i.namespace.as_str(), i.name.as_str()))?;
                    // A cluster that says none of its endpoints is ready takes no part.
                    (export.ready_endpoints != Some(0)).then(|| Part {
                        cluster_id: c.cluster_id.clone(),
                        endpoints: export.endpoints.clone(),
                    })
                })
                .collect();
            services.insert(
                (i.namespace.to_ascii_lowercase(), i.name.to_ascii_lowercase()),
                Service { service_type: i.service_type, ips: i.ips.clone(), ports: i.ports.clone(), parts },
            );
        }
        let namespaces = services.keys().map(|(ns, _)| ns.clone()).collect();
        Self {
            zone: Name::from_ascii(ZONE).expect("valid constant name"),
            local_cluster: local_cluster.to_owned(),
            services,
            namespaces,
            ttl,
            serial: u32::try_from(revision % u64::from(u32::MAX)).unwrap_or(0),
        }
    }

    /// How many services the zone holds.
    #[must_use]
    pub fn len(&self) -> usize {
        self.services.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    fn soa(&self) -> Record {
        let ns = Name::from_ascii("ns.dns.clusterset.local.").expect("valid constant name");
        let mbox = Name::from_ascii("hostmaster.clusterset.local.").expect("valid constant name");
        Record::from_rdata(
            self.zone.clone(),
            self.ttl,
            RData::SOA(SOA::new(ns, mbox, self.serial, 7200, 1800, 86400, self.ttl)),
        )
    }

    fn service_name(&self, ns: &str, svc: &str) -> Name {
        Name::from_ascii(format!("{svc}.{ns}.svc.{ZONE}")).expect("DNS labels validated by the broker")
    }

    fn nxdomain(&self) -> Answer {
        Answer {
            code: ResponseCode::NXDomain,
            authoritative: true,
            answers: vec![],
            soa: vec![self.soa()],
            additionals: vec![],
        }
    }

    fn records(&self, code: ResponseCode, answers: Vec<Record>, additionals: Vec<Record>) -> Answer {
        let soa = if answers.is_empty() { vec![self.soa()] } else { vec![] };
        Answer { code, authoritative: true, answers, soa, additionals }
    }

    fn address(&self, name: &Name, ip: IpAddr, ttl: u32) -> Record {
        match ip {
            IpAddr::V4(v4) => Record::from_rdata(name.clone(), ttl, RData::A(A(v4))),
            IpAddr::V6(v6) => Record::from_rdata(name.clone(), ttl, RData::AAAA(AAAA(v6))),
        }
    }

    /// Address records of `ips` for `name` of the asked type; NODATA when the name has
    /// addresses of the other family only.
    fn addresses(&self, name: &Name, qtype: RecordType, ips: &[IpAddr]) -> Answer {
        let wanted: Vec<Record> = ips
            .iter()
            .filter(|ip| match qtype {
                RecordType::A => ip.is_ipv4(),
                RecordType::AAAA => ip.is_ipv6(),
                _ => false,
            })
            .map(|ip| self.address(name, *ip, self.ttl))
            .collect();
        self.records(ResponseCode::NoError, wanted, vec![])
    }

    /// Ready endpoints of the clusters that are up, oldest export first.
    fn endpoints<'a>(
        &'a self,
        s: &'a Service,
        health: &'a Health,
    ) -> impl Iterator<Item = (&'a str, &'a ServiceEndpoint)> {
        s.parts
            .iter()
            .filter(|p| health.up(&self.local_cluster, &p.cluster_id))
            .flat_map(|p| p.endpoints.iter().map(move |e| (p.cluster_id.as_str(), e)))
    }

    /// The answer to one question.
    #[must_use]
    pub fn answer(&self, qname: &Name, qtype: RecordType, health: &Health) -> Answer {
        let qname = qname.to_lowercase();
        if matches!(qtype, RecordType::PTR) || is_reverse(&qname) {
            return self.reverse(&qname, qtype, health);
        }
        if !self.zone.zone_of(&qname) {
            return Answer::refused();
        }
        let labels: Vec<String> = qname
            .iter()
            .take(usize::from(qname.num_labels() - self.zone.num_labels()))
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect();
        let l: Vec<&str> = labels.iter().map(String::as_str).collect();
        let nodata = || self.records(ResponseCode::NoError, vec![], vec![]);
        match l.as_slice() {
            [] => match qtype {
                RecordType::SOA => self.records(ResponseCode::NoError, vec![self.soa()], vec![]),
                _ => nodata(),
            },
            ["dns-version"] => match qtype {
                RecordType::TXT => self.records(
                    ResponseCode::NoError,
                    vec![Record::from_rdata(
                        qname.clone(),
                        self.ttl,
                        RData::TXT(TXT::new(vec![SCHEMA_VERSION.to_owned()])),
                    )],
                    vec![],
                ),
                _ => nodata(),
            },
            ["svc"] => nodata(),
            [ns, "svc"] if self.namespaces.contains(*ns) => nodata(),
            [svc, ns, "svc"] => match self.services.get(&((*ns).to_owned(), (*svc).to_owned())) {
                None => self.nxdomain(),
                Some(s) => match (s.service_type, qtype) {
                    (ServiceType::ClusterSetIP, RecordType::A | RecordType::AAAA) => {
                        self.addresses(&qname, qtype, &s.ips)
                    }
                    (ServiceType::Headless, RecordType::A | RecordType::AAAA) => {
                        let ips: Vec<IpAddr> = self.endpoints(s, health).map(|(_, e)| e.ip).collect();
                        if ips.is_empty() {
                            // Spec §2.4.1: no ready endpoint → NXDOMAIN.
                            self.nxdomain()
                        } else {
                            self.addresses(&qname, qtype, &ips)
                        }
                    }
                    _ => nodata(),
                },
            },
            [port, proto, svc, ns, "svc"] if port.starts_with('_') && proto.starts_with('_') => {
                self.srv(&qname, qtype, (&port[1..], &proto[1..]), (svc, ns), health)
            }
            [proto, svc, ns, "svc"] if proto.starts_with('_') => {
                // An empty non-terminal above the SRV names of that protocol.
                match self.services.get(&((*ns).to_owned(), (*svc).to_owned())) {
                    Some(s)
                        if s.ports
                            .iter()
                            .any(|p| p.name.is_some() && p.protocol.eq_ignore_ascii_case(&proto[1..])) =>
                    {
                        nodata()
                    }
                    _ => self.nxdomain(),
                }
            }
            [cluster, svc, ns, "svc"] => match self.services.get(&((*ns).to_owned(), (*svc).to_owned())) {
                Some(s) if s.service_type == ServiceType::Headless => {
                    let ips: Vec<IpAddr> =
                        self.endpoints(s, health).filter(|(c, _)| c == cluster).map(|(_, e)| e.ip).collect();
                    self.endpoint_name(&qname, qtype, &ips)
                }
                // Spec §2.3.4: no per-cluster name for a ClusterSetIP service.
                _ => self.nxdomain(),
            },
            [host, cluster, svc, ns, "svc"] => {
                match self.services.get(&((*ns).to_owned(), (*svc).to_owned())) {
                    Some(s) if s.service_type == ServiceType::Headless => {
                        let ips: Vec<IpAddr> = self
                            .endpoints(s, health)
                            .filter(|(c, e)| c == cluster && e.hostname.as_deref() == Some(*host))
                            .map(|(_, e)| e.ip)
                            .collect();
                        self.endpoint_name(&qname, qtype, &ips)
                    }
                    _ => self.nxdomain(),
                }
            }
            _ => self.nxdomain(),
        }
    }

    /// A headless service's per-cluster or per-host name: it exists while it has endpoints
    /// (NXDOMAIN otherwise); A/AAAA answer them, any other type is NODATA.
    fn endpoint_name(&self, qname: &Name, qtype: RecordType, ips: &[IpAddr]) -> Answer {
        if ips.is_empty() {
            self.nxdomain()
        } else if matches!(qtype, RecordType::A | RecordType::AAAA) {
            self.addresses(qname, qtype, ips)
        } else {
            self.records(ResponseCode::NoError, vec![], vec![])
        }
    }

    fn srv(
        &self,
        qname: &Name,
        qtype: RecordType,
        (port_name, proto): (&str, &str),
        (svc, ns): (&str, &str),
        health: &Health,
    ) -> Answer {
        let Some(s) = self.services.get(&(ns.to_owned(), svc.to_owned())) else { return self.nxdomain() };
        let Some(port) = s
            .ports
            .iter()
            .find(|p| p.name.as_deref() == Some(port_name) && p.protocol.eq_ignore_ascii_case(proto))
        else {
            return self.nxdomain();
        };
        let service_name = self.service_name(ns, svc);
        let (answers, additionals) = match s.service_type {
            ServiceType::ClusterSetIP => (
                vec![Record::from_rdata(
                    qname.clone(),
                    self.ttl,
                    RData::SRV(SRV::new(0, 100, port.port, service_name.clone())),
                )],
                s.ips.iter().map(|ip| self.address(&service_name, *ip, self.ttl)).collect(),
            ),
            ServiceType::Headless => {
                let mut answers = Vec::new();
                let mut additionals = Vec::new();
                for (cluster, e) in self.endpoints(s, health) {
                    let Some(host) = &e.hostname else { continue };
                    let Ok(target) = service_name
                        .prepend_label(cluster.as_bytes())
                        .and_then(|n| n.prepend_label(host.as_bytes()))
                    else {
                        continue;
                    };
                    answers.push(Record::from_rdata(
                        qname.clone(),
                        self.ttl,
                        RData::SRV(SRV::new(0, 100, port.port, target.clone())),
                    ));
                    additionals.push(self.address(&target, e.ip, self.ttl));
                }
                if answers.is_empty() {
                    return self.nxdomain();
                }
                (answers, additionals)
            }
        };
        if qtype == RecordType::SRV {
            self.records(ResponseCode::NoError, answers, additionals)
        } else {
            self.records(ResponseCode::NoError, vec![], vec![])
        }
    }

    /// PTR answers for ClusterSetIPs and headless endpoints with a hostname. Other reverse
    /// names are somebody else's: REFUSED.
    fn reverse(&self, qname: &Name, qtype: RecordType, health: &Health) -> Answer {
        let Some(ip) = reverse_ip(qname) else { return Answer::refused() };
        let mut targets = Vec::new();
        for ((ns, svc), s) in &self.services {
            if s.ips.contains(&ip) {
                targets.push(self.service_name(ns, svc));
            }
            for (cluster, e) in self.endpoints(s, health) {
                if e.ip == ip
                    && let Some(host) = &e.hostname
                    && let Ok(n) = self
                        .service_name(ns, svc)
                        .prepend_label(cluster.as_bytes())
                        .and_then(|n| n.prepend_label(host.as_bytes()))
                {
                    targets.push(n);
                }
            }
        }
        if targets.is_empty() {
            return Answer::refused();
        }
        let answers = if qtype == RecordType::PTR {
            targets
                .into_iter()
                .map(|t| Record::from_rdata(qname.clone(), self.ttl, RData::PTR(PTR(t))))
                .collect()
        } else {
            vec![]
        };
        self.records(ResponseCode::NoError, answers, vec![])
    }
}

fn is_reverse(name: &Name) -> bool {
    let s = name.to_ascii();
    s.ends_with(".in-addr.arpa.") || s.ends_with(".ip6.arpa.")
}

/// The address a full reverse name stands for (`d.c.b.a.in-addr.arpa.`, or 32 nibbles under
/// `ip6.arpa.`).
fn reverse_ip(name: &Name) -> Option<IpAddr> {
    let s = name.to_ascii().to_ascii_lowercase();
    if let Some(v4) = s.strip_suffix(".in-addr.arpa.") {
        let mut octets: Vec<u8> = v4.split('.').map(str::parse).collect::<Result<_, _>>().ok()?;
        if octets.len() != 4 {
            return None;
        }
        octets.reverse();
        return Some(IpAddr::from([octets[0], octets[1], octets[2], octets[3]]));
    }
    let v6 = s.strip_suffix(".ip6.arpa.")?;
    let nibbles: Vec<u8> = v6
        .split('.')
        .map(|n| u8::from_str_radix(n, 16).ok().filter(|_| n.len() == 1))
        .collect::<Option<_>>()?;
    if nibbles.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for (i, pair) in nibbles.iter().rev().collect::<Vec<_>>().chunks(2).enumerate() {
        bytes[i] = (pair[0] << 4) | pair[1];
    }
    Some(IpAddr::from(bytes))
}

#[cfg(test)]
#[path = "zone_tests.rs"]
mod tests;
