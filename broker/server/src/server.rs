//! The broker's HTTP API (JSON). Routes:
//!
//! | method | path | does |
//! |---|---|---|
//! | GET | `/healthz` | liveness |
//! | GET | `/v1/records` | list everything, with the set's revision |
//! | GET | `/v1/watch?since=N&timeoutSeconds=S` | long-poll for the changes after N |
//! | PUT/DELETE | `/v1/clusters/{id}` | a cluster record (DELETE also drops its endpoints) |
//! | PUT/DELETE | `/v1/clusters/{id}/endpoints/{host}` | an endpoint record |
//!
//! Bodies over [`MAX_BODY_BYTES`] get 413; every error has an [`ApiError`] body.

use std::{future::Future, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, Query, State, rejection::BytesRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, put},
};
use causeway_broker_api::{ApiError, ClusterRecord, EndpointRecord, MAX_BODY_BYTES};
use serde::Deserialize;
use tracing::{info, warn};

use crate::broker::{Broker, BrokerError};

/// Longest long-poll a watcher may ask for.
const MAX_WATCH: Duration = Duration::from_secs(300);

struct Failure(StatusCode, ApiError);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

impl From<BrokerError> for Failure {
    fn from(e: BrokerError) -> Self {
        let (status, code) = e.status_code();
        if status >= 500 {
            warn!(error = %e, "request failed");
        }
        Failure(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            ApiError { code: code.to_owned(), message: e.to_string() },
        )
    }
}

fn invalid(message: String) -> Failure {
    Failure(StatusCode::BAD_REQUEST, ApiError { code: "Invalid".into(), message })
}

fn body<T: serde::de::DeserializeOwned>(raw: Result<Bytes, BytesRejection>) -> Result<T, Failure> {
    let bytes = raw.map_err(|r| {
        let status = r.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE { "TooLarge" } else { "Invalid" };
        Failure(
            status,
            ApiError {
                code: code.into(),
                message: format!("request body refused: {r} (limit {MAX_BODY_BYTES} bytes)"),
            },
        )
    })?;
    serde_json::from_slice(&bytes).map_err(|e| invalid(format!("malformed record: {e}")))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BrokerError> + Send + 'static,
) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| {
            Failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                ApiError { code: "Internal".into(), message: e.to_string() },
            )
        })?
        .map_err(Failure::from)
}

async fn list(State(b): State<Arc<Broker>>) -> Result<Response, Failure> {
    Ok(Json(blocking(move || b.list()).await?).into_response())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WatchQuery {
    since: u64,
    #[serde(default = "default_timeout")]
    timeout_seconds: u64,
}

fn default_timeout() -> u64 {
    30
}

async fn watch(State(b): State<Arc<Broker>>, Query(q): Query<WatchQuery>) -> Result<Response, Failure> {
    let wait = Duration::from_secs(q.timeout_seconds).min(MAX_WATCH);
    Ok(Json(b.watch(q.since, wait).await?).into_response())
}

async fn put_cluster(
    State(b): State<Arc<Broker>>,
    Path(id): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, Failure> {
    let c: ClusterRecord = body(raw)?;
    if c.cluster_id != id {
        return Err(invalid(format!(
            "clusterId {:?} in the body does not match {id:?} in the path",
            c.cluster_id
        )));
    }
    Ok(Json(blocking(move || b.put_cluster(c)).await?).into_response())
}

async fn delete_cluster(State(b): State<Arc<Broker>>, Path(id): Path<String>) -> Result<Response, Failure> {
    Ok(Json(blocking(move || b.delete_cluster(&id)).await?).into_response())
}

async fn put_endpoint(
    State(b): State<Arc<Broker>>,
    Path((id, host)): Path<(String, String)>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, Failure> {
    let e: EndpointRecord = body(raw)?;
    if e.cluster_id != id || e.hostname != host {
        return Err(invalid(format!(
            "clusterId/hostname {:?}/{:?} in the body do not match {id:?}/{host:?} in the path",
            e.cluster_id, e.hostname
        )));
    }
    Ok(Json(blocking(move || b.put_endpoint(e)).await?).into_response())
}

async fn delete_endpoint(
    State(b): State<Arc<Broker>>,
    Path((id, host)): Path<(String, String)>,
) -> Result<Response, Failure> {
    Ok(Json(blocking(move || b.delete_endpoint(&id, &host)).await?).into_response())
}

/// The broker's routes.
pub fn router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/records", get(list))
        .route("/v1/watch", get(watch))
        .route("/v1/clusters/{id}", put(put_cluster).delete(delete_cluster))
        .route("/v1/clusters/{id}/endpoints/{host}", put(put_endpoint).delete(delete_endpoint))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(broker)
}

/// Serves `broker` on `listener` until `shutdown` completes (mini-redis style: the caller
/// owns the socket and the shutdown signal, so tests bind port 0).
pub async fn run(
    listener: tokio::net::TcpListener,
    broker: Arc<Broker>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "broker listening");
    }
    axum::serve(listener, router(broker)).with_graceful_shutdown(shutdown).await
}
