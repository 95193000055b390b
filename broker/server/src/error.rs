//! What a broker request can fail with, and how each failure answers over HTTP.

use causeway_broker_api::{ValidationError, validate::Overlap};

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("invalid record: {0}")]
    Invalid(#[from] ValidationError),
    #[error("invalid request: {0}")]
    BadRequest(String),
    #[error("{0}")]
    Overlap(Overlap),
    #[error("{0}")]
    GlobalOverlap(causeway_broker_api::GlobalOverlap),
    #[error("{key}: generation {offered} is older than the stored generation {stored}; refusing to go back")]
    StaleGeneration { key: String, stored: u64, offered: u64 },
    #[error("cluster {0:?} is not registered; register the cluster before its endpoints")]
    ClusterNotRegistered(String),
    #[error("{0} does not exist")]
    NotFound(String),
    #[error(
        "revision {since} is not in the broker's history (kept: {oldest} and later); list again and watch from the list's resourceVersion"
    )]
    Gone { since: u64, oldest: u64 },
    #[error("storage failed: {0}")]
    Store(#[from] StoreError),
    #[error(
        "missing or unknown credential: send `Authorization: Bearer <token>` from your credentials file (causeway join writes one per cluster)"
    )]
    Unauthorized,
    #[error("{who} may not {action}: a cluster may change only its own records")]
    Forbidden { who: String, action: String },
    #[error(
        "cluster {0:?} is already registered; pick another --cluster-id, or use that cluster's own credentials"
    )]
    AlreadyRegistered(String),
    #[error("{0}")]
    OutsidePools(causeway_broker_api::OutsidePools),
    /// A prefix that would swallow infrastructure (an endpoint, the broker), or an address
    /// inside another cluster's prefixes.
    #[error("{0}")]
    AddressConflict(String),
    #[error(
        "publicKey {key} is already used by gateway {hostname:?} of cluster {cluster:?}; every gateway needs its own WireGuard key"
    )]
    DuplicateKey { key: causeway_broker_api::WireGuardKey, cluster: String, hostname: String },
    #[error(
        "cluster {cluster:?} already has {max} {what}, the most the cluster set allows (quota set by its admin with `causeway cluster-set`)"
    )]
    QuotaExceeded { cluster: String, what: &'static str, max: u32 },
    #[error("{0}")]
    PoolExhausted(#[from] crate::imports::PoolExhausted),
    #[error("{0}")]
    GlobalPoolExhausted(#[from] crate::globals::GlobalPoolExhausted),
    #[error("{who} writes faster than {per_second}/s (burst {burst}); retry in {retry_ms} ms")]
    TooManyRequests { who: String, per_second: u32, burst: u32, retry_ms: u64 },
}

impl BrokerError {
    /// HTTP status and machine-readable code.
    #[must_use]
    pub fn status_code(&self) -> (u16, &'static str) {
        match self {
            Self::Invalid(_) | Self::BadRequest(_) => (400, "Invalid"),
            Self::Overlap(_) => (409, "CidrOverlap"),
            Self::GlobalOverlap(causeway_broker_api::GlobalOverlap::Clash { .. }) => (409, "CidrOverlap"),
            Self::GlobalOverlap(causeway_broker_api::GlobalOverlap::Missing { .. }) => (400, "Invalid"),
            Self::StaleGeneration { .. } => (409, "StaleGeneration"),
            Self::ClusterNotRegistered(_) => (409, "ClusterNotRegistered"),
            Self::NotFound(_) => (404, "NotFound"),
            Self::Gone { .. } => (410, "Gone"),
            Self::Store(_) => (500, "Internal"),
            Self::Unauthorized => (401, "Unauthorized"),
            Self::Forbidden { .. } => (403, "Forbidden"),
            Self::AlreadyRegistered(_) => (409, "AlreadyRegistered"),
            Self::OutsidePools(_) => (403, "OutsidePools"),
            Self::AddressConflict(_) => (409, "AddressConflict"),
            Self::DuplicateKey { .. } => (409, "DuplicateKey"),
            Self::QuotaExceeded { .. } => (409, "QuotaExceeded"),
            Self::TooManyRequests { .. } => (429, "TooManyRequests"),
            Self::PoolExhausted(_) | Self::GlobalPoolExhausted(_) => (409, "PoolExhausted"),
        }
    }
}
