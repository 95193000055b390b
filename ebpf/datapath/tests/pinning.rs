//! Pinned state across loads: a second `load_pinned` finds the first one's entries, a pinned
//! map whose definition does not fit this build is recreated (not misread), and removing the
//! pins leaves nothing.
//! Needs root: `#[ignore]`d (reported as skipped) unless run with `--run-ignored all`, as
//! `scripts/test.sh` does; then not being root fails it.

use std::path::PathBuf;

use aya::maps::{MapData, MapInfo, MapType};
use causeway_datapath::{Datapath, PinDir, RemoteCidr};

/// A directory on tmpfs, so that `load_pinned` has to mount its own bpffs; unmounted and
/// removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.0.join("gw")).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
#[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
async fn pinned_maps_are_reused_refitted_and_removed() {
    causeway_datapath::testing::require_root();
    let scratch = Scratch(PathBuf::from(format!("/run/causeway-pin-test-{}", std::process::id())));
    let dir = scratch.0.join("gw");
    let net: ipnetwork::IpNetwork = "10.9.0.0/16".parse().unwrap();

    let mut dp = Datapath::load_pinned(&dir).expect("first load");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        mounts.lines().any(|l| l.contains(&*dir.to_string_lossy()) && l.contains(" bpf ")),
        "no bpffs was mounted on {}:\n{mounts}",
        dir.display()
    );
    let value = RemoteCidr { cluster_slot: 3, tunnel: 1 };
    dp.set_remote_cidr(net, value).unwrap();
    dp.ensure_counters(3).unwrap();
    drop(dp);

    // A second process (here: a second load) finds the state as it was.
    let dp = Datapath::load_pinned(&dir).expect("second load");
    assert_eq!(dp.remote_cidrs().unwrap().get(&net), Some(&value), "the pinned prefix is gone");
    assert_eq!(dp.counter_slots().unwrap(), vec![3], "the pinned counters are gone");
    drop(dp);

    // An upgrade changed a map's layout: here STATS's pin is replaced by a hash map.
    let stats = dir.join("maps/STATS");
    std::fs::remove_file(&stats).unwrap();
    let peers = MapData::from_pin(dir.join("maps/KNOWN_PEERS_V4")).unwrap();
    peers.pin(&stats).unwrap();
    let dp = Datapath::load_pinned(&dir).expect("load over a stale pin");
    let info = MapInfo::from_pin(&stats).unwrap();
    assert_eq!(info.map_type().unwrap(), MapType::PerCpuArray, "the stale STATS pin was reused");
    assert!(dp.stats().unwrap().iter().all(|(_, v)| *v == 0), "STATS is not a fresh map");
    // The maps that did fit were kept.
    assert_eq!(dp.remote_cidrs().unwrap().get(&net), Some(&value));
    drop(dp);

    PinDir::at(&dir).remove().unwrap();
    assert!(!dir.join("maps").exists(), "pins left behind");
    drop(scratch);
}
