//! The lab: everything that builds clusters out of network namespaces on this machine and
//! measures them. The `causeway` command links it behind its default `sandbox` feature; an
//! operator build (`--no-default-features`) links neither this nor the namespace harness.
//!
//! - [`sandbox`]: `causeway sandbox up|status|down`, the local cluster set;
//! - [`bench`]: the broker's propagation benchmark; [`bench_dataplane`], [`bench_policy`] and
//!   [`bench_attack`]: the data plane, its policy and its rate under attack, each against
//!   the peers on the same topology; [`bench_failover`]: losing a cluster's active gateway,
//!   three ways, and failing back; [`bench_services`]: cluster-set DNS against dnsmasq, and
//!   connections to a ClusterSetIP against the backend's own address.

pub mod bench;
pub mod bench_attack;
pub mod bench_dataplane;
pub mod bench_failover;
pub mod bench_policy;
pub mod bench_services;
pub mod bench_translation;
pub mod sandbox;
