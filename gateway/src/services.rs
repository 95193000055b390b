//! Which backends each ClusterSetIP port has on this node, now (sans IO): from the broker's
//! imports and exports, the local cluster, and which remote clusters the cluster's gateways
//! reach. A [`Translator`] writes the result into the socket programs' map
//! ([`causeway_datapath::sockets`]) whenever either input changes: the route agent's on
//! worker nodes, the gateway's own on gateway nodes.
//!
//! - A cluster serves a port of an import when it is not excluded by a type conflict, its
//!   export says it has ready endpoints (or does not say), and the port is among the ports
//!   the import gives it. Its backend for the port is its export's first IPv4 ClusterIP at
//!   the same port number (as the MCS API has it: a service's port is the same everywhere).
//! - Overlap mode: exports carry global addresses; the local cluster's own backend is its
//!   real address (the global one is only reachable from other clusters).
//! - A remote cluster the gateways cannot reach is left out; with no health source at all
//!   (`reachable` is `None`) every cluster counts.
//! - [`Affinity::Local`]: when the local cluster serves a port, only it does, so traffic stays
//!   in the cluster; otherwise every reachable cluster, in the import's age order.
//! - A port nobody can serve gets an empty list: connections to it are refused at once
//!   rather than sent into a dead tunnel.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddrV4},
    path::PathBuf,
};

use causeway_broker_api::{Object, Record, ServiceExportRecord, ServiceType};
use causeway_datapath::{
    DatapathError,
    sockets::{Proto, ServicePort, ServiceSockets},
};
use tracing::{debug, info, warn};

/// Where a ClusterSetIP's connections go when the local cluster serves it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Affinity {
    /// Only to the local cluster when it serves the port (Cilium's `local` affinity).
    #[default]
    Local,
    /// To every cluster serving it, local or not.
    None,
}

impl std::str::FromStr for Affinity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local" => Ok(Self::Local),
            "none" => Ok(Self::None),
            other => Err(format!("{other:?}: expected local or none")),
        }
    }
}

/// The backends of every ClusterSetIP port for a node of `local`.
#[must_use]
pub fn backends(
    objects: &[Object],
    local: &str,
    reachable: Option<&BTreeSet<String>>,
    affinity: Affinity,
) -> BTreeMap<ServicePort, Vec<SocketAddrV4>> {
    let exports: BTreeMap<(&str, &str, &str), &ServiceExportRecord> = objects
        .iter()
        .filter_map(|o| match &o.record {
            Record::ServiceExport(s) => {
                Some(((s.cluster_id.as_str(), s.namespace.as_str(), s.name.as_str()), s))
            }
            _ => None,
        })
        .collect();
    let up = |cluster: &str| cluster == local || reachable.is_none_or(|r| r.contains(cluster));
    // Overlap mode: exports carry global addresses; the local cluster's own are reached at the
    // real address they stand for (nothing routes a cluster's own global prefix back to it).
    let own: Vec<causeway_broker_api::GlobalCidr> = objects
        .iter()
        .find_map(|o| match &o.record {
            Record::Cluster(c) if c.cluster_id == local => Some(c.global_cidrs.clone()),
            _ => None,
        })
        .unwrap_or_default();
    let reach = |cluster: &str, ip: std::net::Ipv4Addr| {
        if cluster != local {
            return ip;
        }
        own.iter()
            .find_map(|g| causeway_broker_api::GlobalCidr::map(&g.global, &g.cidr, ip.into()))
            .and_then(|a| match a {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            })
            .unwrap_or(ip)
    };
    let mut out = BTreeMap::new();
    for o in objects {
        let Record::ServiceImport(i) = &o.record else { continue };
        if i.service_type != ServiceType::ClusterSetIP {
            continue;
        }
        let Some(IpAddr::V4(vip)) = i.ips.first().copied() else { continue };
        for port in &i.ports {
            let proto = match port.protocol.as_str() {
                "TCP" => Proto::Tcp,
                "UDP" => Proto::Udp,
                _ => continue,
            };
            let serving: Vec<(&str, SocketAddrV4)> = i
                .clusters
                .iter()
                .filter(|c| !c.excluded && c.ports.contains(port) && up(&c.cluster_id))
                .filter_map(|c| {
                    let e = exports.get(&(c.cluster_id.as_str(), i.namespace.as_str(), i.name.as_str()))?;
                    if e.ready_endpoints == Some(0) {
                        return None;
                    }
                    let ip = e.ips.iter().find_map(|ip| match ip {
                        IpAddr::V4(v4) => Some(*v4),
                        IpAddr::V6(_) => None,
                    })?;
                    Some((c.cluster_id.as_str(), SocketAddrV4::new(reach(&c.cluster_id, ip), port.port)))
                })
                .collect();
            let local_only = affinity == Affinity::Local && serving.iter().any(|(c, _)| *c == local);
            let list =
                serving.into_iter().filter(|(c, _)| !local_only || *c == local).map(|(_, a)| a).collect();
            out.insert((vip, port.port, proto), list);
        }
    }
    out
}

/// Where this node translates ClusterSetIPs: the cgroup (v2) its socket programs are attached
/// to (every pod's processes, e.g. `/sys/fs/cgroup`), the affinity, and where the programs'
/// maps and links are pinned (`None`: they go with the process).
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    pub cgroup: PathBuf,
    pub affinity: Affinity,
    pub pins: Option<PathBuf>,
}

/// The node's socket programs, kept saying what [`backends`] says. The route agent and the
/// gateway drive it alike: they tell it when the records or the reachable clusters change,
/// and it rewrites the map on the next [`Self::sync`].
#[derive(Debug)]
pub struct Translator {
    sockets: ServiceSockets,
    config: ServiceConfig,
    reachable: Option<BTreeSet<String>>,
    stale: bool,
}

impl Translator {
    /// Attaches the programs (taking over pinned ones an earlier run left).
    pub fn attach(config: ServiceConfig) -> Result<Self, DatapathError> {
        let sockets = match &config.pins {
            Some(dir) => ServiceSockets::attach_pinned(&config.cgroup, dir)?,
            None => ServiceSockets::attach(&config.cgroup)?,
        };
        info!(
            cgroup = %config.cgroup.display(),
            affinity = ?config.affinity,
            pinned = config.pins.is_some(),
            "ClusterSetIP socket programs attached"
        );
        Ok(Self { sockets, config, reachable: None, stale: true })
    }

    /// The records changed.
    pub fn records_changed(&mut self) {
        self.stale = true;
    }

    /// Which remote clusters the gateways reach now (`None`: no health source).
    pub fn set_reachable(&mut self, reachable: Option<BTreeSet<String>>) {
        if reachable != self.reachable {
            info!(reachable = ?reachable, "reachable clusters changed");
            self.reachable = reachable;
            self.stale = true;
        }
    }

    /// Rewrites the backends from `objects` if anything changed since the last success.
    pub fn sync(&mut self, objects: &[Object], local: &str) {
        if !self.stale {
            return;
        }
        let want = backends(objects, local, self.reachable.as_ref(), self.config.affinity);
        match self.sockets.sync(&want) {
            Ok(()) => {
                debug!(ports = want.len(), "ClusterSetIP backends synced");
                self.stale = false;
            }
            Err(e) => warn!(error = %e, "writing the ClusterSetIP backends failed; retrying"),
        }
    }

    /// Whether the programs outlive this process.
    #[must_use]
    pub fn pinned(&self) -> bool {
        self.config.pins.is_some()
    }
}

#[cfg(test)]
mod tests {
    use causeway_broker_api::{ExportSource, ImportedCluster, ServiceImportRecord, ServicePort as Port};

    use super::*;

    fn port(n: u16, proto: &str) -> Port {
        Port { name: None, port: n, protocol: proto.into() }
    }

    fn export(cluster: &str, ip: &str, ready: Option<u32>) -> Object {
        Object::new(
            1,
            Record::ServiceExport(ServiceExportRecord {
                cluster_id: cluster.into(),
                namespace: "demo".into(),
                name: "echo".into(),
                ips: vec![ip.parse().unwrap()],
                ports: vec![port(7, "TCP"), port(53, "UDP")],
                service_type: ServiceType::ClusterSetIP,
                endpoints: vec![],
                ready_endpoints: ready,
                source: ExportSource::Cli,
                generation: 1,
            }),
        )
    }

    fn part(cluster: &str, ports: Vec<Port>) -> ImportedCluster {
        ImportedCluster { cluster_id: cluster.into(), ports, excluded: false, conflict: None }
    }

    fn objects(local_exports: bool) -> Vec<Object> {
        let mut v = vec![
            export("c2", "10.102.0.10", None),
            export("c3", "10.103.0.10", Some(2)),
            export("c4", "10.104.0.10", Some(0)),
        ];
        let mut clusters = vec![
            part("c2", vec![port(7, "TCP"), port(53, "UDP")]),
            part("c3", vec![port(7, "TCP")]),
            part("c4", vec![port(7, "TCP")]),
            ImportedCluster { excluded: true, ..part("c5", vec![]) },
        ];
        if local_exports {
            v.push(export("c1", "10.101.0.10", None));
            clusters.push(part("c1", vec![port(7, "TCP")]));
        }
        v.push(Object::new(
            2,
            Record::ServiceImport(ServiceImportRecord {
                namespace: "demo".into(),
                name: "echo".into(),
                service_type: ServiceType::ClusterSetIP,
                ips: vec!["241.0.0.7".parse().unwrap()],
                ports: vec![port(7, "TCP"), port(53, "UDP"), port(9, "SCTP")],
                clusters,
                generation: 1,
            }),
        ));
        v
    }

    fn key(p: u16, proto: Proto) -> ServicePort {
        ("241.0.0.7".parse().unwrap(), p, proto)
    }

    fn addrs(v: &[&str]) -> Vec<SocketAddrV4> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn serving_clusters_that_are_reachable_and_ready_in_age_order() {
        let all: BTreeSet<String> = ["c2", "c3", "c4", "c5"].map(str::to_owned).into();
        let b = backends(&objects(false), "c1", Some(&all), Affinity::Local);
        // c4 has no ready endpoint, c5 is excluded, SCTP is not for sockets.
        assert_eq!(b[&key(7, Proto::Tcp)], addrs(&["10.102.0.10:7", "10.103.0.10:7"]));
        assert_eq!(b[&key(53, Proto::Udp)], addrs(&["10.102.0.10:53"]));
        assert_eq!(b.len(), 2);
        // c2's tunnel is down: only c3 for TCP, nobody for UDP (refused, not black-holed).
        let without_c2: BTreeSet<String> = ["c3", "c4"].map(str::to_owned).into();
        let b = backends(&objects(false), "c1", Some(&without_c2), Affinity::Local);
        assert_eq!(b[&key(7, Proto::Tcp)], addrs(&["10.103.0.10:7"]));
        assert_eq!(b[&key(53, Proto::Udp)], vec![]);
        // No health source: everyone counts.
        let b = backends(&objects(false), "c1", None, Affinity::Local);
        assert_eq!(b[&key(7, Proto::Tcp)], addrs(&["10.102.0.10:7", "10.103.0.10:7"]));
    }

    #[test]
    fn the_local_cluster_is_preferred_when_it_serves_the_port() {
        let none: BTreeSet<String> = BTreeSet::new();
        let b = backends(&objects(true), "c1", Some(&none), Affinity::Local);
        assert_eq!(b[&key(7, Proto::Tcp)], addrs(&["10.101.0.10:7"]), "local, though nothing remote is up");
        let all: BTreeSet<String> = ["c2", "c3"].map(str::to_owned).into();
        let b = backends(&objects(true), "c1", Some(&all), Affinity::Local);
        assert_eq!(b[&key(7, Proto::Tcp)], addrs(&["10.101.0.10:7"]));
        // c1 does not serve UDP 53: the remote ones do.
        assert_eq!(b[&key(53, Proto::Udp)], addrs(&["10.102.0.10:53"]));
        let b = backends(&objects(true), "c1", Some(&all), Affinity::None);
        assert_eq!(b[&key(7, Proto::Tcp)], addrs(&["10.102.0.10:7", "10.103.0.10:7", "10.101.0.10:7"]));
    }

    #[test]
    fn in_overlap_mode_the_local_backend_is_its_real_address_and_remote_ones_global() {
        // c1's services 10.101.0.0/16 are 242.101.0.0/16 to the set; its export says so.
        let mut objs = objects(false);
        objs.push(export("c1", "242.101.0.10", None));
        if let Record::ServiceImport(i) = &mut objs[3].record {
            i.clusters.push(part("c1", vec![port(7, "TCP")]));
        }
        let mut c1 = causeway_broker_api::ClusterRecord::new(
            "c1",
            vec!["10.1.0.0/16".parse().unwrap()],
            vec!["10.101.0.0/16".parse().unwrap()],
        );
        c1.global_cidrs = vec![causeway_broker_api::GlobalCidr {
            cidr: "10.101.0.0/16".parse().unwrap(),
            global: "242.101.0.0/16".parse().unwrap(),
        }];
        objs.push(Object::new(1, Record::Cluster(c1)));
        let all: BTreeSet<String> = ["c2", "c3"].map(str::to_owned).into();
        let b = backends(&objs, "c1", Some(&all), Affinity::None);
        assert_eq!(b[&key(7, Proto::Tcp)], addrs(&["10.102.0.10:7", "10.103.0.10:7", "10.101.0.10:7"]));
        // Seen from c2, c1's backend is the global address.
        let b = backends(&objs, "c2", Some(&["c1".to_owned(), "c3".to_owned()].into()), Affinity::None);
        assert!(b[&key(7, Proto::Tcp)].contains(&"242.101.0.10:7".parse().unwrap()), "{b:?}");
    }
}
