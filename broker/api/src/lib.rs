//! The broker's wire API: the records clusters publish (SPEC §3), their validation, the
//! request/response types of the HTTP API, and a client for it.
//!
//! No I/O except in [`client`]. Every object on the wire carries `apiVersion`, `kind` and the
//! broker-assigned `resourceVersion`, so the API can evolve and watchers can resume.

pub mod client;
pub mod records;
pub mod reflector;
pub mod relay;
pub mod status;
pub mod stun;
pub mod validate;

pub use client::{BrokerClient, ClientError};
pub use records::*;
pub use reflector::{Reflector, Snapshot, Step};
pub use validate::{
    GlobalOverlap, OutsidePools, ValidationError, check_global_overlaps, check_overlaps, check_pools,
    validate_cluster, validate_cluster_set_ip_pool, validate_endpoint, validate_policy, validate_service,
};
