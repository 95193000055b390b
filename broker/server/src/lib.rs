//! Causeway's broker: the one shared control plane of a cluster set.
//!
//! [`Broker`] holds the rules (validation, CIDR overlaps across clusters, generations that
//! never go backwards, endpoints only for registered clusters) on top of a [`store::Store`]
//! (embedded redb file by default, in-memory for tests). Every accepted change gets the next
//! revision of the set and is appended to an event log, so a watcher that reconnects with its
//! last revision receives exactly what it missed. [`server::run`] serves it over HTTP.

pub mod auth;
pub mod broker;
pub mod etcd;
pub mod rules;
pub mod server;
pub mod store;
pub mod testing;
pub mod tls;

pub use auth::{Credential, Identity};
pub use broker::{Broker, BrokerError};
pub use etcd::{EtcdOptions, EtcdStore};
pub use server::{Limits, run, run_tls, run_tls_with, run_with};
pub use store::{MemStore, RedbStore, Store, StoreError};
