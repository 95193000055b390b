//! The socket programs (`causeway-sockets`): ClusterSetIPs translated at `connect()` and
//! `sendmsg()` for every process in a cgroup, and given back at `recvmsg()` and
//! `getpeername()`. A separate object from the gateway's: a node loads only this.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};
use causeway_datapath_common::{
    MAX_SERVICE_BACKENDS, ServiceAddr, ServiceBackends, ServiceKey, ServiceStat, service_maps,
};

use tracing::info;

use crate::{
    DatapathError, PinDir,
    attach::{link_err, pin_link, prune_pinned_links, unpin_stale},
    map_err, take,
};

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
    // Owns the programs and, unless they are pinned, their cgroup links: dropping it
    // detaches unpinned ones.
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
    /// whatever else is attached there (a CNI's own socket programs keep running). Dropping
    /// the value detaches them.
    pub fn attach(cgroup: &Path) -> Result<Self, DatapathError> {
        Self::attach_with(cgroup, None)
    }

    /// Like [`Self::attach`], but the maps and the cgroup links are pinned in `dir` (a bpffs;
    /// mounted there if needed): the programs keep translating with the last backends while no
    /// process holds them, and the next attach reuses the maps (so a UDP socket's replies are
    /// still given their ClusterSetIP back) and replaces the links without a gap: its
    /// programs are attached before the old ones are unpinned, and while both run the old
    /// ones translate first and the new ones find nothing left to translate.
    pub fn attach_pinned(cgroup: &Path, dir: &Path) -> Result<Self, DatapathError> {
        let pins = PinDir::prepare(dir)?;
        pins.drop_incompatible_maps(OBJECT, &service_maps::ALL)?;
        Self::attach_with(cgroup, Some(pins))
    }

    fn attach_with(cgroup: &Path, pins: Option<PinDir>) -> Result<Self, DatapathError> {
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&str, PathBuf)> =
            pins.iter().flat_map(|p| service_maps::ALL.map(|m| (m, p.map(m)))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT).map_err(DatapathError::Load)?;
        let cgroup_err = |e: std::io::Error| DatapathError::Cgroup {
            path: cgroup.display().to_string(),
            reason: e.to_string(),
        };
        let dir = std::fs::File::open(cgroup).map_err(cgroup_err)?;
        let inode = std::os::unix::fs::MetadataExt::ino(&dir.metadata().map_err(cgroup_err)?);
        let mut attached = Vec::new();
        for name in PROGRAMS {
            let perr = |source| DatapathError::Program { name, source };
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(DatapathError::Missing { what: "program", name })?
                .try_into()
                .map_err(perr)?;
            prog.load().map_err(perr)?;
            let id = prog.attach(&dir, CgroupAttachMode::Single).map_err(perr)?;
            let Some(pins) = &pins else { continue };
            let path = pins.link(name, &format!("cgroup{inode}"));
            let link = FdLink::try_from(prog.take_link(id).map_err(perr)?).map_err(link_err(name, &path))?;
            if path.exists() {
                // Ours is attached already: unpinning the old link now leaves no gap.
                unpin_stale(name, &path)?;
            }
            pin_link(name, link, &path)?;
            attached.push(path);
        }
        if let Some(pins) = &pins {
            prune_pinned_links(pins, &attached)?;
            info!(cgroup = %cgroup.display(), pins = %pins.root().display(), "socket programs attached and pinned");
        }
        let services: HashMap<MapData, ServiceKey, ServiceBackends> =
            HashMap::try_from(take(&mut ebpf, service_maps::SERVICES_V4)?)
                .map_err(map_err(service_maps::SERVICES_V4))?;
        let stats = PerCpuArray::try_from(take(&mut ebpf, service_maps::SERVICE_STATS)?)
            .map_err(map_err(service_maps::SERVICE_STATS))?;
        // A reused map's ports stay served until the first sync says otherwise, and that sync
        // removes what is no longer wanted.
        let installed = services.keys().filter_map(Result::ok).collect();
        Ok(Self { _ebpf: ebpf, services, stats, installed })
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
