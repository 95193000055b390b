//! Builds a Causeway cluster set out of network namespaces, runs the real broker and gateway
//! processes in it, and tears it all down. The same code serves `causeway sandbox` and the
//! privileged end-to-end tests.
//!
//! Per cluster `i` (1-based): a gateway node and a worker node joined by a LAN
//! (`172.20.i.0/24`), one pod on the worker created by the real CNI `bridge` + `host-local`
//! plugins (pod CIDR `10.i.0.0/16`, the worker's pods in `10.i.2.0/24`, service CIDR
//! `10.(100+i).0.0/16`). The gateways' uplinks and the broker meet on a bridge in an
//! `underlay` namespace (`172.31.0.0/24`: broker `.2`, gateway `i` at `.(10+i)`; a second
//! gateway node of cluster `i`, when asked for, at `.(40+i)` with its own link to the worker,
//! `172.21.i.0/24`; a worker that runs a real route agent at `.(60+i)`). A gateway's node
//! address is its LAN address (`172.20.i.1`), its public address the underlay one. No
//! namespace has a default route and nothing leaves the topology, except that the sandbox gives
//! the root namespace a veth with one /32 route to the broker.

pub mod exec;
pub mod pcap;
pub mod ready;
pub mod topology;

pub use topology::{ClusterInfo, NatKind, Topology, TopologySpec};

/// The `causeway` binary the tests run: `CAUSEWAY_BIN`, else `target/debug/causeway` of this
/// workspace (build it first: `cargo build -p causeway`).
#[must_use]
pub fn causeway_bin() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("CAUSEWAY_BIN") {
        return p.into();
    }
    let target = std::env::var("CARGO_TARGET_DIR").map_or_else(
        |_| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
        std::path::PathBuf::from,
    );
    target.join("debug/causeway")
}

/// `require_privileges!()` at the top of a privileged test (which is also `#[ignore]`d, so the
/// runner reports it as skipped unless asked to run ignored tests): fails unless root.
#[macro_export]
macro_rules! require_privileges {
    () => {
        $crate::require_root()
    };
}

/// Fails the test unless this is root (see [`require_privileges!`]).
pub fn require_root() {
    causeway_datapath::testing::require_root();
}
