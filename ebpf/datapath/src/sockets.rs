//! The socket programs (`causeway-sockets`): ClusterSetIPs translated at `connect()` and
//! `sendmsg()` for every process in a cgroup, and given back at `recvmsg()` and
//! `getpeername()`. A separate object from the gateway's: a node loads only this.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr},
};
use causeway_datapath_common::{
    MAX_SERVICE_BACKENDS, ServiceAddr, ServiceBackends, ServiceKey, ServiceStat, service_maps,
};

use crate::{DatapathError, map_err, take};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/causeway-sockets"));

const PROGRAMS: [&str; 4] =
    ["service_connect4", "service_sendmsg4", "service_recvmsg4", "service_getpeername4"];

/// Transport protocols a ClusterSetIP port can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }
}

/// One ClusterSetIP port.
pub type ServicePort = (Ipv4Addr, u16, Proto);

/// The socket programs attached to one cgroup, and their map.
pub struct ServiceSockets {
    // Owns the programs and their cgroup links: dropping it detaches them.
    _ebpf: Ebpf,
    services: HashMap<MapData, ServiceKey, ServiceBackends>,
    stats: PerCpuArray<MapData, u64>,
    installed: BTreeSet<ServiceKey>,
}

impl std::fmt::Debug for ServiceSockets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceSockets").field("ports", &self.installed.len()).finish_non_exhaustive()
    }
}

fn key((addr, port, proto): ServicePort) -> ServiceKey {
    ServiceKey { addr: u32::from(addr).to_be(), port: port.to_be(), proto: proto.number(), pad: 0 }
}

impl ServiceSockets {
    /// Loads the programs and attaches them to the cgroup (v2) directory `cgroup`, next to
    /// whatever else is attached there (a CNI's own socket programs keep running).
    pub fn attach(cgroup: &Path) -> Result<Self, DatapathError> {
        let mut ebpf = EbpfLoader::new().load(OBJECT).map_err(DatapathError::Load)?;
        let dir = std::fs::File::open(cgroup).map_err(|e| DatapathError::Cgroup {
            path: cgroup.display().to_string(),
            reason: e.to_string(),
        })?;
        for name in PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(DatapathError::Missing { what: "program", name })?
                .try_into()
                .map_err(|source| DatapathError::Program { name, source })?;
            prog.load().map_err(|source| DatapathError::Program { name, source })?;
            prog.attach(&dir, CgroupAttachMode::Single)
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        let services = HashMap::try_from(take(&mut ebpf, service_maps::SERVICES_V4)?)
            .map_err(map_err(service_maps::SERVICES_V4))?;
        let stats = PerCpuArray::try_from(take(&mut ebpf, service_maps::SERVICE_STATS)?)
            .map_err(map_err(service_maps::SERVICE_STATS))?;
        Ok(Self { _ebpf: ebpf, services, stats, installed: BTreeSet::new() })
    }

    /// Makes the map say exactly `want`: every port's backends (at most
    /// [`MAX_SERVICE_BACKENDS`]; an empty list refuses connections to the port). One map
    /// update per port, so a connection sees a port's old list or its new one, never a mix.
    pub fn sync(&mut self, want: &BTreeMap<ServicePort, Vec<SocketAddrV4>>) -> Result<(), DatapathError> {
        let mut keep = BTreeSet::new();
        for (port, backends) in want {
            let k = key(*port);
            let mut v = ServiceBackends::default();
            for (slot, b) in v.backends.iter_mut().zip(backends.iter().take(MAX_SERVICE_BACKENDS)) {
                *slot = ServiceAddr { addr: u32::from(*b.ip()).to_be(), port: b.port().to_be(), pad: 0 };
            }
            v.count = u32::try_from(backends.len().min(MAX_SERVICE_BACKENDS)).unwrap_or(0);
            let current = self.services.get(&k, 0).ok();
            if current != Some(v) {
                self.services.insert(k, v, 0).map_err(map_err(service_maps::SERVICES_V4))?;
            }
            keep.insert(k);
        }
        for k in self.installed.difference(&keep).copied().collect::<Vec<_>>() {
            crate::ignore_not_found(self.services.remove(&k).map_err(map_err(service_maps::SERVICES_V4)))?;
        }
        self.installed = keep;
        Ok(())
    }

    /// The programs' counters (sum over CPUs).
    pub fn stats(&self) -> Result<Vec<(ServiceStat, u64)>, DatapathError> {
        ServiceStat::ALL
            .iter()
            .map(|s| {
                let v = self.stats.get(&(*s as u32), 0).map_err(map_err(service_maps::SERVICE_STATS))?;
                Ok((*s, v.iter().sum()))
            })
            .collect()
    }
}
