//! Cluster-set DNS (`causeway dns`): answers `clusterset.local` for one member cluster, as the
//! Multi-Cluster Services DNS specification says, from the service imports the broker merges.
//!
//! - [`zone`]: the answers, sans IO: a [`zone::Catalog`] built from the broker's records and a
//!   [`zone::Health`] (which remote clusters the local gateways reach) in, DNS records out.
//! - [`server`]: hickory-server's UDP/TCP front end around it, with a per-client query budget.

pub mod server;
pub mod zone;
