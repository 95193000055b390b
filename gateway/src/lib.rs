//! The Causeway gateway daemon, assembled from:
//!
//! - [`cluster`]: where the gateway learns its own cluster's facts (static, or Kubernetes in
//!   `causeway-deploy`);
//! - [`keys`]: the WireGuard identity, generated once and kept;
//! - [`cable`]: cable drivers behind one trait (userspace WireGuard on `boringtun::noise`);
//! - [`desired`]: the desired state computed from broker records (pure);
//! - [`failover`]: which gateway of a remote cluster carries it, on probe evidence (pure);
//! - [`node_probe`]: how a cluster's nodes probe their gateway nodes (codec, responder);
//! - [`route`]: kernel routes via rtnetlink;
//! - [`daemon`]: the reconcile loop that ties them to the broker and the eBPF datapath;
//! - [`status`]: the local status/metrics endpoint;
//! - [`agent`]: the route agent of the other nodes (remote prefixes via the gateway node that
//!   forwards: the control plane's pick, or a live one when it stops answering), and the
//!   ClusterSetIP backends of [`services`] in the nodes' socket programs.
//!
//! Each outside dependency has one owner: boringtun and tun-rs `cable::wireguard`, rtnetlink
//! `route`, aya the `causeway-datapath` crate.

pub mod agent;
pub mod cable;
pub mod cluster;
pub mod controller;
pub mod daemon;
pub mod desired;
pub mod failover;
pub mod keys;
pub mod model;
pub mod node_probe;
pub mod policy;
pub mod route;
pub mod services;
pub mod status;

pub use causeway_datapath::UplinkHook;
pub use daemon::{GatewayConfig, GatewayError, run};
