//! Causeway's broker: the one shared control plane of a cluster set.
//!
//! Layers, each a module:
//! - [`server`]: HTTP (axum), one await on the [`Broker`] per request;
//! - [`broker`]: plan + commit, leases, the watch; [`credentials`](Broker::authenticate):
//!   who may call, as what;
//! - [`rules`]: pure planners per record kind, judged on the [`cache`]'s indexed records;
//! - [`store`]: the async [`store::Store`] trait (embedded redb file by default, etcd for
//!   replicas, memory for tests). Every accepted change gets the next revision of the set and
//!   is appended to an event log, so a watcher that reconnects with its last revision
//!   receives exactly what it missed.

pub mod auth;
pub mod broker;
pub mod cache;
mod credentials;
pub mod error;
pub mod etcd;
pub mod globals;
pub mod imports;
pub mod leases;
pub mod metrics;
pub mod rate;
pub mod relay;
pub mod rules;
pub mod server;
pub mod store;
pub mod stun;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tls;

pub use auth::{Credential, Identity};
pub use broker::{Broker, BrokerError};
pub use etcd::{EtcdOptions, EtcdStore};
pub use server::{Limits, run, run_tls, run_tls_with, run_with};
pub use store::{MemStore, RedbStore, Store, StoreError};
