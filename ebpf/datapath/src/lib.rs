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

use std::path::Path;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuHashMap},
    programs::ProgramError,
};
use causeway_datapath_common::{FlowKey, NatPrefix, PeerSession, PolicyAddr, maps};
pub use causeway_datapath_common::{
    MAX_POLICY_RULES, MAX_POLICY_VERDICTS, POLICY_ALLOW, POLICY_ANY, POLICY_DENY, PolicyKey, PolicyVerdict,
    RemoteCidr, Stat, TrafficCounters,
};
use tracing::warn;

// One module per program family, as in `ebpf/programs`; each adds its part of `Datapath`.
mod attach;
mod guard;
pub mod pin;
mod policy;
mod redirect;
pub mod sockets;
mod translate;
mod tunnel;
pub use guard::{GuardVerdict, UplinkHook};
pub use pin::{PinDir, PinError};
pub use policy::{PolicyTables, StagedPolicy};
pub use translate::TranslationError;

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
    #[error("opening the cgroup {path}: {reason} (a cgroup v2 directory, e.g. /sys/fs/cgroup)")]
    Cgroup { path: String, reason: String },
    #[error("pinning the link of {name} at {path}: {reason}")]
    Link { name: &'static str, path: String, reason: String },
    #[error(transparent)]
    Translation(#[from] TranslationError),
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
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
    nat_out: LpmTrie<MapData, u32, NatPrefix>,
    nat_in: LpmTrie<MapData, u32, NatPrefix>,
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
        pins.drop_incompatible_maps(OBJECT, &maps::ALL)?;
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
        let nat_out =
            LpmTrie::try_from(take(&mut ebpf, maps::NAT_OUT_V4)?).map_err(map_err(maps::NAT_OUT_V4))?;
        let nat_in =
            LpmTrie::try_from(take(&mut ebpf, maps::NAT_IN_V4)?).map_err(map_err(maps::NAT_IN_V4))?;
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
            nat_out,
            nat_in,
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
