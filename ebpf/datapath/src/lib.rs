//! Causeway's eBPF datapath, seen from userspace: the only crate that uses aya.
//!
//! It embeds the programs compiled from `ebpf/programs` (see `build.rs`), loads them, attaches
//! them to the tunnel device (TCX on ingress and egress: detached automatically when the
//! process exits, so a crash never leaves a stale program behind), forwards the programs'
//! aya-log records into `tracing`, and offers typed access to the maps: remote prefixes →
//! cluster slot, and per-cluster traffic counters.
//!
//! With a pin directory ([`Datapath::load_pinned`], see [`pin`]) the maps and the program
//! links are pinned instead: a restart reuses the maps and swaps its programs into the same
//! links, so the kernel keeps forwarding, enforcing and counting while no process runs.
//!
//! Everything above this crate deals in `IpNetwork`, slots and [`TrafficCounters`].

use std::{collections::BTreeMap, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues, lpm_trie::Key,
    },
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use causeway_datapath_common::{Config, FlowKey, PeerSession, PolicyAddr, maps, programs};
pub use causeway_datapath_common::{
    MAX_POLICY_RULES, MAX_POLICY_VERDICTS, POLICY_ALLOW, POLICY_ANY, POLICY_DENY, PolicyKey, PolicyVerdict,
    RemoteCidr, Stat, TrafficCounters,
};
use ipnetwork::IpNetwork;
use tracing::{info, warn};

pub mod pin;
mod policy;
pub use pin::{PinDir, PinError};
pub use policy::{PolicyTables, StagedPolicy};

pub mod testing;

/// The object compiled by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/causeway-datapath"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object failed (is this root with CAP_BPF on a BPF-enabled kernel?)")]
    Load(#[source] aya::EbpfError),
    #[error("the eBPF object has no {what} named {name}")]
    Missing { what: &'static str, name: &'static str },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("reading the number of CPUs failed: {0}")]
    Cpus(String),
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error("pinning the link of {name} at {path}: {reason}")]
    Link { name: &'static str, path: String, reason: String },
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// Where the uplink guard runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UplinkHook {
    /// XDP: drops before the kernel allocates anything. The choice for a physical NIC.
    Xdp,
    /// TC ingress: after the socket buffer exists. The choice for a veth uplink, where an XDP
    /// program makes the peer segment every GSO run (and copies every packet into XDP's
    /// layout), which costs more than the guard saves.
    Tc,
}

/// The uplink guard's verdict on one frame (from a test run).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardVerdict {
    Pass,
    Drop,
    /// A return code the guard never gives (a bug).
    Other(i64),
}

/// The loaded programs and their maps.
pub struct Datapath {
    ebpf: Ebpf,
    remote_v4: LpmTrie<MapData, u32, RemoteCidr>,
    remote_v6: LpmTrie<MapData, [u8; 16], RemoteCidr>,
    counters: PerCpuHashMap<MapData, u32, TrafficCounters>,
    stats: PerCpuArray<MapData, u64>,
    config: Array<MapData, u32>,
    known_peers: HashMap<MapData, u32, u32>,
    peer_sessions: HashMap<MapData, PeerSession, u32>,
    policy_src: LpmTrie<MapData, PolicyAddr, u32>,
    policy_dst: LpmTrie<MapData, PolicyAddr, u32>,
    policy_verdicts: HashMap<MapData, PolicyKey, PolicyVerdict>,
    policy_flows: HashMap<MapData, FlowKey, u32>,
    policy_drops: PerCpuArray<MapData, u64>,
    ncpus: usize,
    pins: Option<PinDir>,
    /// Pinned links attached (or re-attached) by this value.
    attached: Vec<std::path::PathBuf>,
    log_task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath").field("ncpus", &self.ncpus).finish_non_exhaustive()
    }
}

impl Datapath {
    /// Loads the object and its maps. Must run inside a tokio runtime (the aya-log reader is a
    /// task of it). Does not attach anything yet. Nothing is pinned: maps and attachments go
    /// with this value.
    pub fn load() -> Result<Self, DatapathError> {
        Self::load_with(None)
    }

    /// Like [`Self::load`], but the maps are pinned in `dir` (a bpffs is mounted there if
    /// needed) and reused when an earlier run left them there with the same layout; the
    /// programs' links are pinned by the attach calls.
    pub fn load_pinned(dir: &Path) -> Result<Self, DatapathError> {
        let pins = PinDir::prepare(dir)?;
        pins.drop_incompatible_maps(OBJECT)?;
        Self::load_with(Some(pins))
    }

    fn load_with(pins: Option<PinDir>) -> Result<Self, DatapathError> {
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&str, std::path::PathBuf)> =
            pins.iter().flat_map(|p| maps::ALL.map(|m| (m, p.map(m)))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT).map_err(DatapathError::Load)?;
        let log_task = start_logger(&mut ebpf);
        let ncpus = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Cpus(e.to_string()))?;
        let remote_v4 = LpmTrie::try_from(take(&mut ebpf, maps::REMOTE_CIDRS_V4)?)
            .map_err(map_err(maps::REMOTE_CIDRS_V4))?;
        let remote_v6 = LpmTrie::try_from(take(&mut ebpf, maps::REMOTE_CIDRS_V6)?)
            .map_err(map_err(maps::REMOTE_CIDRS_V6))?;
        let counters = PerCpuHashMap::try_from(take(&mut ebpf, maps::CLUSTER_COUNTERS)?)
            .map_err(map_err(maps::CLUSTER_COUNTERS))?;
        let stats = PerCpuArray::try_from(take(&mut ebpf, maps::STATS)?).map_err(map_err(maps::STATS))?;
        let config = Array::try_from(take(&mut ebpf, maps::CONFIG)?).map_err(map_err(maps::CONFIG))?;
        let known_peers = HashMap::try_from(take(&mut ebpf, maps::KNOWN_PEERS_V4)?)
            .map_err(map_err(maps::KNOWN_PEERS_V4))?;
        let peer_sessions = HashMap::try_from(take(&mut ebpf, maps::PEER_SESSIONS_V4)?)
            .map_err(map_err(maps::PEER_SESSIONS_V4))?;
        let policy_src =
            LpmTrie::try_from(take(&mut ebpf, maps::POLICY_SRC_V4)?).map_err(map_err(maps::POLICY_SRC_V4))?;
        let policy_dst =
            LpmTrie::try_from(take(&mut ebpf, maps::POLICY_DST_V4)?).map_err(map_err(maps::POLICY_DST_V4))?;
        let policy_verdicts = HashMap::try_from(take(&mut ebpf, maps::POLICY_VERDICTS)?)
            .map_err(map_err(maps::POLICY_VERDICTS))?;
        let policy_flows =
            HashMap::try_from(take(&mut ebpf, maps::POLICY_FLOWS)?).map_err(map_err(maps::POLICY_FLOWS))?;
        let policy_drops = PerCpuArray::try_from(take(&mut ebpf, maps::POLICY_DROPS)?)
            .map_err(map_err(maps::POLICY_DROPS))?;
        Ok(Self {
            ebpf,
            remote_v4,
            remote_v6,
            counters,
            stats,
            config,
            known_peers,
            peer_sessions,
            policy_src,
            policy_dst,
            policy_verdicts,
            policy_flows,
            policy_drops,
            ncpus,
            pins,
            attached: Vec::new(),
            log_task,
        })
    }

    /// The pin directory, if this datapath pins its state.
    #[must_use]
    pub fn pin_dir(&self) -> Option<&PinDir> {
        self.pins.as_ref()
    }

    /// Attaches the counting programs to both directions of the tunnel device `ifname`
    /// (resolved in the calling thread's network namespace).
    pub fn attach_tunnel(&mut self, ifname: &str) -> Result<(), DatapathError> {
        for (name, dir) in [
            (programs::TUNNEL_EGRESS, TcAttachType::Egress),
            (programs::TUNNEL_INGRESS, TcAttachType::Ingress),
        ] {
            self.attach_tc(name, ifname, dir)?;
        }
        Ok(())
    }

    /// Attaches the redirect stage to the ingress of the cluster-facing interface `ifname`:
    /// packets for remote prefixes whose entry names a tunnel device skip the kernel's
    /// forwarding path and go straight to it.
    pub fn attach_cluster_redirect(&mut self, ifname: &str) -> Result<(), DatapathError> {
        self.attach_tc(programs::CLUSTER_REDIRECT, ifname, TcAttachType::Ingress)
    }

    /// Unpins every pinned link this value did not attach (or re-attach): what an earlier run
    /// attached to an interface this one no longer serves is detached.
    pub fn prune_links(&mut self) -> Result<Vec<String>, DatapathError> {
        let Some(pins) = &self.pins else { return Ok(Vec::new()) };
        let dir = pins.root().join("links");
        let mut removed = Vec::new();
        let entries = std::fs::read_dir(&dir).map_err(|e| PinError::Io { path: dir.clone(), source: e })?;
        for entry in entries.flatten() {
            let path = entry.path();
            if !self.attached.contains(&path) {
                std::fs::remove_file(&path).map_err(|e| PinError::Io { path: path.clone(), source: e })?;
                let name = entry.file_name().to_string_lossy().into_owned();
                info!(link = %name, "detached a program an earlier run attached");
                removed.push(name);
            }
        }
        Ok(removed)
    }

    /// Attaches the policy program for Ethernet devices to `ifname` (egress or ingress): the
    /// installed policy then also applies to traffic forwarded through that device.
    pub fn attach_policy_eth(&mut self, ifname: &str, egress: bool) -> Result<(), DatapathError> {
        let name = programs::POLICY_ETH;
        let dir = if egress { TcAttachType::Egress } else { TcAttachType::Ingress };
        self.attach_tc(name, ifname, dir)
    }

    /// Attaches TC program `name` to `ifname`: through a link this value owns, or with a pin
    /// directory through the pinned link, into which a program left by an earlier run is
    /// atomically replaced.
    fn attach_tc(
        &mut self,
        name: &'static str,
        ifname: &str,
        dir: TcAttachType,
    ) -> Result<(), DatapathError> {
        let pin = self.pins.as_ref().map(|p| p.link(name, ifname));
        let prog = self.tunnel_program(name)?;
        let perr = |source| DatapathError::Program { name, source };
        let Some(path) = pin else {
            prog.attach(ifname, dir).map_err(perr)?;
            info!(program = name, interface = ifname, direction = ?dir, "attached");
            return Ok(());
        };
        if let Some(link) = pinned_link(name, &path)? {
            match SchedClassifierLink::try_from(link) {
                Ok(link) => match prog.attach_to_link(link) {
                    Ok(id) => {
                        // The pin holds the link; our copy of its fd may close.
                        drop(prog.take_link(id).map_err(perr)?);
                        info!(program = name, interface = ifname, direction = ?dir, "replaced the program in its pinned link");
                        self.attached.push(path);
                        return Ok(());
                    }
                    // ENOLINK: the interface it was attached to is gone.
                    Err(e) => warn!(program = name, error = %e, "pinned link is defunct; attaching afresh"),
                },
                Err(e) => {
                    warn!(program = name, error = %e, "pinned object is not a TC link; attaching afresh")
                }
            }
            unpin_stale(name, &path)?;
        }
        let id = prog.attach(ifname, dir).map_err(perr)?;
        let link = FdLink::try_from(prog.take_link(id).map_err(perr)?).map_err(link_err(name, &path))?;
        pin_link(name, link, &path)?;
        info!(program = name, interface = ifname, direction = ?dir, pinned = %path.display(), "attached");
        self.attached.push(path);
        Ok(())
    }

    /// A TC program, loaded into the kernel if it is not yet.
    fn tunnel_program(&mut self, name: &'static str) -> Result<&mut SchedClassifier, DatapathError> {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or(DatapathError::Missing { what: "program", name })?
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })?;
        if prog.fd().is_err() {
            prog.load().map_err(|source| DatapathError::Program { name, source })?;
        }
        Ok(prog)
    }

    /// Sets the largest TCP MSS let through the tunnel from its MTU (IPv4: MTU − 40, IPv6:
    /// MTU − 60); SYN and SYN-ACK segments with a larger MSS option are rewritten.
    pub fn set_tunnel_mtu(&mut self, mtu: u16) -> Result<(), DatapathError> {
        for (cfg, overhead) in [(Config::MssV4, 40), (Config::MssV6, 60)] {
            let mss = u32::from(mtu.saturating_sub(overhead));
            self.config.set(cfg as u32, mss, 0).map_err(map_err(maps::CONFIG))?;
        }
        Ok(())
    }

    /// Attaches the uplink guard to `ifname` at `hook`: datagrams to `wireguard_port` must be
    /// well-formed WireGuard messages, data messages must come from a known peer
    /// ([`Self::set_known_peers`]), handshake initiations are limited to `rate` per second per
    /// source with bursts of `burst`. XDP: native where the driver has it, generic otherwise.
    pub fn attach_uplink_guard(
        &mut self,
        ifname: &str,
        hook: UplinkHook,
        wireguard_port: u16,
        rate: u32,
        burst: u32,
    ) -> Result<(), DatapathError> {
        if hook == UplinkHook::Tc {
            self.configure_uplink_guard(wireguard_port, rate, burst)?;
            return self.attach_tc(programs::UPLINK_GUARD_TC, ifname, TcAttachType::Ingress);
        }
        let name = programs::UPLINK_GUARD;
        let pin = self.pins.as_ref().map(|p| p.link(name, ifname));
        let prog = self.load_uplink_guard(wireguard_port, rate, burst)?;
        let perr = |source| DatapathError::Program { name, source };
        if let Some(path) = &pin
            && let Some(link) = pinned_link(name, path)?
        {
            match XdpLink::try_from(link) {
                Ok(link) => match prog.attach_to_link(link) {
                    Ok(id) => {
                        drop(prog.take_link(id).map_err(perr)?);
                        info!(program = name, interface = ifname, "replaced the program in its pinned link");
                        self.attached.push(path.clone());
                        return Ok(());
                    }
                    Err(e) => warn!(program = name, error = %e, "pinned link is defunct; attaching afresh"),
                },
                Err(e) => {
                    warn!(program = name, error = %e, "pinned object is not an XDP link; attaching afresh")
                }
            }
            unpin_stale(name, path)?;
        }
        let id = match prog.attach(ifname, XdpMode::Default) {
            Ok(id) => id,
            Err(e) => {
                warn!(interface = ifname, error = %e, "native XDP unavailable; using generic XDP");
                prog.attach(ifname, XdpMode::Skb).map_err(perr)?
            }
        };
        if let Some(path) = pin {
            let link = FdLink::try_from(prog.take_link(id).map_err(perr)?).map_err(link_err(name, &path))?;
            pin_link(name, link, &path)?;
            self.attached.push(path);
        }
        info!(program = name, interface = ifname, wireguard_port, "attached");
        Ok(())
    }

    /// Sets the uplink guard's port and handshake limits (shared by both hooks).
    fn configure_uplink_guard(
        &mut self,
        wireguard_port: u16,
        rate: u32,
        burst: u32,
    ) -> Result<(), DatapathError> {
        for (cfg, v) in [
            (Config::WireGuardPort, u32::from(wireguard_port)),
            (Config::HandshakeRate, rate),
            (Config::HandshakeBurst, burst),
        ] {
            self.config.set(cfg as u32, v, 0).map_err(map_err(maps::CONFIG))?;
        }
        Ok(())
    }

    /// Configures and loads (once) the XDP uplink guard without attaching it.
    fn load_uplink_guard(
        &mut self,
        wireguard_port: u16,
        rate: u32,
        burst: u32,
    ) -> Result<&mut Xdp, DatapathError> {
        self.configure_uplink_guard(wireguard_port, rate, burst)?;
        let name = programs::UPLINK_GUARD;
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .ok_or(DatapathError::Missing { what: "program", name })?
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })?;
        if prog.fd().is_err() {
            prog.load().map_err(|source| DatapathError::Program { name, source })?;
        }
        Ok(prog)
    }

    /// Makes the known-peer set equal `peers` (the addresses data messages may come from).
    pub fn set_known_peers(
        &mut self,
        peers: &std::collections::BTreeSet<std::net::Ipv4Addr>,
    ) -> Result<(), DatapathError> {
        let want: std::collections::BTreeSet<u32> =
            peers.iter().map(|a| u32::from_ne_bytes(a.octets())).collect();
        let have: std::collections::BTreeSet<u32> =
            self.known_peers.keys().collect::<Result<_, _>>().map_err(map_err(maps::KNOWN_PEERS_V4))?;
        for k in have.difference(&want) {
            ignore_not_found(self.known_peers.remove(k).map_err(map_err(maps::KNOWN_PEERS_V4)))?;
        }
        for k in want.difference(&have) {
            self.known_peers.insert(k, 1, 0).map_err(map_err(maps::KNOWN_PEERS_V4))?;
        }
        Ok(())
    }

    /// Makes the (peer address, session index) set equal `sessions`: the data messages the
    /// guard lets through (with [`Self::set_known_peers`] for the addresses themselves).
    pub fn set_peer_sessions(
        &mut self,
        sessions: &std::collections::BTreeSet<(std::net::Ipv4Addr, u32)>,
    ) -> Result<(), DatapathError> {
        let want: std::collections::BTreeSet<PeerSession> = sessions
            .iter()
            .map(|(a, index)| PeerSession { addr: u32::from_ne_bytes(a.octets()), index: *index })
            .collect();
        let have: std::collections::BTreeSet<PeerSession> =
            self.peer_sessions.keys().collect::<Result<_, _>>().map_err(map_err(maps::PEER_SESSIONS_V4))?;
        for k in have.difference(&want) {
            ignore_not_found(self.peer_sessions.remove(k).map_err(map_err(maps::PEER_SESSIONS_V4)))?;
        }
        for k in want.difference(&have) {
            self.peer_sessions.insert(k, 1, 0).map_err(map_err(maps::PEER_SESSIONS_V4))?;
        }
        Ok(())
    }

    /// Maps `net` to its remote cluster's counter slot and tunnel device (insert or replace).
    pub fn set_remote_cidr(&mut self, net: IpNetwork, value: RemoteCidr) -> Result<(), DatapathError> {
        match net {
            IpNetwork::V4(n) => {
                let key = Key::new(u32::from(n.prefix()), u32::from_ne_bytes(n.network().octets()));
                self.remote_v4.insert(&key, value, 0).map_err(map_err(maps::REMOTE_CIDRS_V4))
            }
            IpNetwork::V6(n) => {
                let key = Key::new(u32::from(n.prefix()), n.network().octets());
                self.remote_v6.insert(&key, value, 0).map_err(map_err(maps::REMOTE_CIDRS_V6))
            }
        }
    }

    /// Removes `net`; absent is success.
    pub fn remove_remote_cidr(&mut self, net: IpNetwork) -> Result<(), DatapathError> {
        let res = match net {
            IpNetwork::V4(n) => self
                .remote_v4
                .remove(&Key::new(u32::from(n.prefix()), u32::from_ne_bytes(n.network().octets())))
                .map_err(map_err(maps::REMOTE_CIDRS_V4)),
            IpNetwork::V6(n) => self
                .remote_v6
                .remove(&Key::new(u32::from(n.prefix()), n.network().octets()))
                .map_err(map_err(maps::REMOTE_CIDRS_V6)),
        };
        ignore_not_found(res)
    }

    /// The remote prefixes currently in the maps, with their slots and tunnels.
    pub fn remote_cidrs(&self) -> Result<BTreeMap<IpNetwork, RemoteCidr>, DatapathError> {
        let mut out = BTreeMap::new();
        for item in self.remote_v4.iter() {
            let (k, v) = item.map_err(map_err(maps::REMOTE_CIDRS_V4))?;
            let addr = std::net::Ipv4Addr::from(k.data().to_ne_bytes());
            if let Ok(net) = ipnetwork::Ipv4Network::new(addr, prefix_u8(k.prefix_len())) {
                out.insert(IpNetwork::V4(net), v);
            }
        }
        for item in self.remote_v6.iter() {
            let (k, v) = item.map_err(map_err(maps::REMOTE_CIDRS_V6))?;
            let addr = std::net::Ipv6Addr::from(k.data());
            if let Ok(net) = ipnetwork::Ipv6Network::new(addr, prefix_u8(k.prefix_len())) {
                out.insert(IpNetwork::V6(net), v);
            }
        }
        Ok(out)
    }

    /// Creates the zeroed counter entry of `slot` if it does not exist yet (the programs only
    /// update existing entries, so that a packet never allocates in the kernel).
    pub fn ensure_counters(&mut self, slot: u32) -> Result<(), DatapathError> {
        match self.counters.get(&slot, 0) {
            Ok(_) => Ok(()),
            Err(MapError::KeyNotFound) => {
                let zeros = PerCpuValues::try_from(vec![TrafficCounters::default(); self.ncpus])
                    .map_err(|e| DatapathError::Cpus(e.to_string()))?;
                self.counters.insert(slot, zeros, 0).map_err(map_err(maps::CLUSTER_COUNTERS))
            }
            Err(e) => Err(map_err(maps::CLUSTER_COUNTERS)(e)),
        }
    }

    /// The slots that have a counter entry.
    pub fn counter_slots(&self) -> Result<Vec<u32>, DatapathError> {
        self.counters.keys().collect::<Result<_, _>>().map_err(map_err(maps::CLUSTER_COUNTERS))
    }

    /// Drops the counter entry of `slot`; absent is success.
    pub fn remove_counters(&mut self, slot: u32) -> Result<(), DatapathError> {
        ignore_not_found(self.counters.remove(&slot).map_err(map_err(maps::CLUSTER_COUNTERS)))
    }

    /// Sum over CPUs of the counters of `slot` (zero if it has none).
    pub fn counters(&self, slot: u32) -> Result<TrafficCounters, DatapathError> {
        match self.counters.get(&slot, 0) {
            Ok(values) => Ok(values.iter().fold(TrafficCounters::default(), |a, b| a.merged(*b))),
            Err(MapError::KeyNotFound) => Ok(TrafficCounters::default()),
            Err(e) => Err(map_err(maps::CLUSTER_COUNTERS)(e)),
        }
    }

    /// Datapath-wide counters (sum over CPUs).
    pub fn stats(&self) -> Result<Vec<(Stat, u64)>, DatapathError> {
        Stat::ALL
            .iter()
            .map(|s| {
                let v = self.stats.get(&(*s as u32), 0).map_err(map_err(maps::STATS))?;
                Ok((*s, v.iter().sum()))
            })
            .collect()
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        if let Some(t) = self.log_task.take() {
            t.abort();
        }
    }
}

/// The link pinned at `path`, if there is one.
fn pinned_link(name: &'static str, path: &Path) -> Result<Option<FdLink>, DatapathError> {
    if !path.exists() {
        return Ok(None);
    }
    match PinnedLink::from_pin(path) {
        Ok(p) => Ok(Some(FdLink::from(p))),
        Err(e) => {
            warn!(program = name, path = %path.display(), error = %e, "unreadable pinned link");
            unpin_stale(name, path)?;
            Ok(None)
        }
    }
}

fn unpin_stale(name: &'static str, path: &Path) -> Result<(), DatapathError> {
    std::fs::remove_file(path).map_err(|e| DatapathError::Link {
        name,
        path: path.display().to_string(),
        reason: format!("removing the stale pin: {e}"),
    })
}

fn pin_link(name: &'static str, link: FdLink, path: &Path) -> Result<(), DatapathError> {
    // Dropping the returned PinnedLink closes our fd; the pin keeps the link alive.
    link.pin(path).map(drop).map_err(|e| DatapathError::Link {
        name,
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn link_err(name: &'static str, path: &Path) -> impl FnOnce(LinkError) -> DatapathError {
    let path = path.display().to_string();
    move |e| DatapathError::Link { name, path, reason: e.to_string() }
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, DatapathError> {
    ebpf.take_map(name).ok_or(DatapathError::Missing { what: "map", name })
}

fn prefix_u8(p: u32) -> u8 {
    u8::try_from(p).unwrap_or(u8::MAX)
}

fn ignore_not_found(res: Result<(), DatapathError>) -> Result<(), DatapathError> {
    match res {
        Err(DatapathError::Map { source: MapError::KeyNotFound, .. }) => Ok(()),
        Err(DatapathError::Map { source: MapError::SyscallError(e), .. })
            if e.io_error.raw_os_error() == Some(libc_enoent()) =>
        {
            Ok(())
        }
        other => other,
    }
}

const fn libc_enoent() -> i32 {
    2
}

/// Forwards the programs' aya-log records into `log` (and from there into `tracing`).
fn start_logger(ebpf: &mut Ebpf) -> Option<tokio::task::JoinHandle<()>> {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "eBPF logging unavailable");
            return None;
        }
    };
    // SAFETY: the EbpfLogger owns the ring buffer's fd and keeps it open as long as it lives,
    // which is as long as the AsyncFd that owns it. (The safe `with_interest` is deprecated.)
    #[expect(unsafe_code, reason = "AsyncFd registration of an fd owned by the value itself")]
    let registered =
        unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "eBPF log reader could not be registered");
            return None;
        }
    };
    let mut fd = fd;
    Some(tokio::spawn(async move {
        loop {
            match fd.readable_mut().await {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(e) => {
                    warn!(error = %e, "eBPF log reader stopped");
                    return;
                }
            }
        }
    }))
}
