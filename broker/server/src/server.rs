//! The broker's HTTP API (JSON). Routes:
//!
//! | method | path | does |
//! |---|---|---|
//! | GET | `/healthz` | liveness |
//! | GET | `/v1/records` | list everything, with the set's revision |
//! | GET | `/v1/watch?since=N&timeoutSeconds=S` | long-poll for the changes after N (at most 1,000 events an answer, whole revisions; `more` when there are more) |
//! | PUT/DELETE | `/v1/clusters/{id}` | a cluster record (DELETE also drops its endpoints) |
//! | PUT/DELETE | `/v1/clusters/{id}/endpoints/{host}` | an endpoint record |
//! | POST | `/v1/join` | register a new cluster (join or admin credential); returns its credential |
//! | POST/DELETE | `/v1/clusters/{id}/credentials?overlapSeconds=N` | rotate, the old ones valid N more seconds (the cluster or admin) / revoke (admin) |
//! | POST | `/v1/clusters/{id}/readers` | a read-only credential for the cluster's route agents (the cluster or admin) |
//! | POST/GET | `/v1/credentials` | issue an admin or join credential, with TTL / single use; list all, without tokens (admin) |
//! | DELETE | `/v1/credentials/{id}` | revoke one credential by id (admin) |
//! | PUT/DELETE | `/v1/clusters/{id}/services/{namespace}/{name}` | an exported service |
//! | PUT | `/v1/cluster-set` | the set's settings: overlap mode (admin) |
//! | PUT/DELETE | `/v1/policies/{name}` | a cluster-set policy rule (admin) |
//! | PUT | `/v1/policy-default` | the action when no rule matches (admin) |
//! | POST | `/v1/relay/check` | `{"genuine": bool}` for a relay registration frame in the body (any cluster's credential: a relay run on a member's node asks) |
//! | GET | `/v1/relay` (`Upgrade: causeway-relay`) | 101, then the connection carries relay frames (any cluster's credential; see [`crate::relay`]) |
//!
//! Every route but `/healthz` needs `Authorization: Bearer <token>`: 401 without a known
//! credential, 403 when the credential may not touch that cluster, 429 past the caller's write
//! budget (every identity but the admin's has its own). Bodies over
//! [`MAX_BODY_BYTES`] get 413; every error has an [`ApiError`] body.

use std::{future::Future, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, Query, State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use causeway_broker_api::{
    ApiError, ClusterRecord, EndpointRecord, JoinResponse, MAX_BODY_BYTES, RotateResponse,
};
use serde::Deserialize;
use tracing::{info, warn};

use crate::{
    auth::Identity,
    broker::{Broker, BrokerError},
};

/// Longest long-poll a watcher may ask for.
const MAX_WATCH: Duration = Duration::from_secs(300);

struct Failure(StatusCode, ApiError);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let retry = self.0 == StatusCode::TOO_MANY_REQUESTS;
        let mut resp = (self.0, Json(self.1)).into_response();
        if retry {
            resp.headers_mut().insert(header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
        }
        resp
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

/// Runs a write to completion even if its client goes away. A request's future is dropped when
/// its connection closes (or the server stops), and a write of several steps (a commit, then
/// the credentials of a join; a delete, then the revocation) must not stop between them.
async fn to_completion<T: Send + 'static>(
    write: impl Future<Output = Result<T, BrokerError>> + Send + 'static,
) -> Result<T, Failure> {
    tokio::spawn(write)
        .await
        .map_err(|e| {
            Failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                ApiError { code: "Internal".into(), message: format!("the write failed: {e}") },
            )
        })?
        .map_err(Failure::from)
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned())
}

/// The hash of the caller's token (how the broker names the credential in use).
fn caller_hash(headers: &HeaderMap) -> String {
    crate::auth::hash(&bearer(headers).unwrap_or_default())
}

/// The caller's identity, for a write: one more against its write budget (see
/// [`Broker::check_write_rate`]); past it, 429.
async fn writer(b: &Arc<Broker>, headers: &HeaderMap) -> Result<Identity, Failure> {
    let id = who(b, headers).await?;
    b.check_write_rate(&id, &caller_hash(headers))?;
    Ok(id)
}

/// The caller's identity, from `Authorization: Bearer <token>`.
async fn who(b: &Arc<Broker>, headers: &HeaderMap) -> Result<Identity, Failure> {
    Ok(b.authenticate(bearer(headers).as_deref()).await?)
}

async fn list(State(b): State<Arc<Broker>>, headers: HeaderMap) -> Result<Response, Failure> {
    let id = who(&b, &headers).await?;
    Ok(Json(b.list(&id)?).into_response())
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

async fn watch(
    State(b): State<Arc<Broker>>,
    headers: HeaderMap,
    Query(q): Query<WatchQuery>,
) -> Result<Response, Failure> {
    let id = who(&b, &headers).await?;
    let wait = Duration::from_secs(q.timeout_seconds).min(MAX_WATCH);
    Ok(Json(b.watch(&id, q.since, wait).await?).into_response())
}

async fn put_cluster(
    State(b): State<Arc<Broker>>,
    headers: HeaderMap,
    Path(cluster): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, Failure> {
    let id = writer(&b, &headers).await?;
    let c: ClusterRecord = body(raw)?;
    if c.cluster_id != cluster {
        return Err(invalid(format!(
            "clusterId {:?} in the body does not match {cluster:?} in the path",
            c.cluster_id
        )));
    }
    Ok(Json(to_completion(async move { b.put_cluster(&id, c).await }).await?).into_response())
}

async fn delete_cluster(
    State(b): State<Arc<Broker>>,
    headers: HeaderMap,
    Path(cluster): Path<String>,
) -> Result<Response, Failure> {
    let id = writer(&b, &headers).await?;
    Ok(Json(to_completion(async move { b.delete_cluster(&id, &cluster).await }).await?).into_response())
}

async fn put_endpoint(
    State(b): State<Arc<Broker>>,
    headers: HeaderMap,
    Path((cluster, host)): Path<(String, String)>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, Failure> {
    let id = writer(&b, &headers).await?;
    let e: EndpointRecord = body(raw)?;
    if e.cluster_id != cluster || e.hostname != host {
        return Err(invalid(format!(
            "clusterId/hostname {:?}/{:?} in the body do not match {cluster:?}/{host:?} in the path",
            e.cluster_id, e.hostname
        )));
    }
    Ok(Json(to_completion(async move { b.put_endpoint(&id, e).await }).await?).into_response())
}

async fn delete_endpoint(
    State(b): State<Arc<Broker>>,
    headers: HeaderMap,
    Path((cluster, host)): Path<(String, String)>,
) -> Result<Response, Failure> {
    let id = writer(&b, &headers).await?;
    Ok(Json(to_completion(async move { b.delete_endpoint(&id, &cluster, &host).await }).await?)
        .into_response())
}

async fn put_service(
    State(b): State<Arc<Broker>>,
    headers: HeaderMap,
    Path((cluster, namespace, name)): Path<(String, String, String)>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, Failure> {
    let id = writer(&b, &headers).await?;
    let s: causeway_broker_api::ServiceExportRecord = body(raw)?;
    if s.cluster_id != cluster || s.namespace != namespace || s.name != name {
        return Err(invalid(format!(
            "clusterId/namespace/name {:?}/{:?}/{:?} in the body do not match {cluster:?}/{namespace:?}/{name:?} in the path",
            s.cluster_id, s.namespace, s.name
        )));
    }
    Ok(Json(to_completion(async move { b.put_service(&id, s).await }).await?).into_response())
}

async fn delete_service(
    State(b): State<Arc<Broker>>,
    headers: HeaderMap,
    Path((cluster, namespace, name)): Path<(String, String, String)>,
) -> Result<Response, Failure> {
    let id = writer(&b, &headers).await?;
    Ok(Json(to_completion(async move { b.delete_service(&id, &cluster, &namespace, &name).await }).await?)
        .into_response())
}

async fn put_cluster_set(
    State(b): State<Arc<Broker>>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, Failure> {
    let id = writer(&b, &headers).await?;
    let c: causeway_broker_api::ClusterSetRecord = body(raw)?;
    Ok(Json(to_completion(async move { b.put_cluster_set(&id, c).await }).await?).into_response())
}

async fn put_policy(
    State(b): State<Arc<Broker>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, Failure> {
    let id = writer(&b, &headers).await?;
    let p: causeway_broker_api::PolicyRecord = body(raw)?;
    if p.name != name {
        return Err(invalid(format!("name {:?} in the body does not match {name:?} in the path", p.name)));
    }
    Ok(Json(to_completion(async move { b.put_policy(&id, p).await }).await?).into_response())
}

async fn delete_policy(
    State(b): State<Arc<Broker>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, Failure> {
    let id = writer(&b, &headers).await?;
    Ok(Json(to_completion(async move { b.delete_policy(&id, &name).await }).await?).into_response())
}

async fn put_policy_default(
    State(b): State<Arc<Broker>>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, Failure> {
    let id = writer(&b, &headers).await?;
    let d: causeway_broker_api::PolicyDefaultRecord = body(raw)?;
    Ok(Json(to_completion(async move { b.put_policy_default(&id, d).await }).await?).into_response())
}

async fn join(
    State(b): State<Arc<Broker>>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, Failure> {
    let id = writer(&b, &headers).await?;
    let hash = caller_hash(&headers);
    let c: ClusterRecord = body(raw)?;
    let (object, token) = to_completion(async move { b.join(&id, &hash, c).await }).await?;
    Ok((StatusCode::CREATED, Json(JoinResponse { object, token })).into_response())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RotateQuery {
    #[serde(default)]
    overlap_seconds: u64,
}

/// Longest overlap a rotation may give the old credentials.
const MAX_OVERLAP: Duration = Duration::from_secs(7 * 24 * 3600);

async fn rotate(
    State(b): State<Arc<Broker>>,
    headers: HeaderMap,
    Path(cluster): Path<String>,
    Query(q): Query<RotateQuery>,
) -> Result<Response, Failure> {
    let id = writer(&b, &headers).await?;
    let overlap = Duration::from_secs(q.overlap_seconds);
    if overlap > MAX_OVERLAP {
        return Err(invalid(format!(
            "overlapSeconds: {} is longer than a week; old credentials should not outlive a rotation by that much",
            q.overlap_seconds
        )));
    }
    let (token, old_valid_until) =
        to_completion(async move { b.rotate(&id, &cluster, overlap).await }).await?;
    Ok(Json(RotateResponse { token, old_valid_until }).into_response())
}

async fn issue(
    State(b): State<Arc<Broker>>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, Failure> {
    let id = writer(&b, &headers).await?;
    let req: causeway_broker_api::IssueRequest = body(raw)?;
    let out = to_completion(async move { b.issue_limited(&id, &req).await }).await?;
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

async fn issue_reader(
    State(b): State<Arc<Broker>>,
    headers: HeaderMap,
    Path(cluster): Path<String>,
) -> Result<Response, Failure> {
    let id = writer(&b, &headers).await?;
    let out = to_completion(async move { b.issue_reader(&id, &cluster).await }).await?;
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

async fn list_credentials(State(b): State<Arc<Broker>>, headers: HeaderMap) -> Result<Response, Failure> {
    let id = who(&b, &headers).await?;
    Ok(Json(b.list_credentials(&id).await?).into_response())
}

async fn revoke_credential(
    State(b): State<Arc<Broker>>,
    headers: HeaderMap,
    Path(cred): Path<String>,
) -> Result<Response, Failure> {
    let id = writer(&b, &headers).await?;
    let hash = caller_hash(&headers);
    let revoked = to_completion(async move { b.revoke_credential(&id, &hash, &cred).await }).await?;
    Ok(Json(serde_json::json!({ "revoked": revoked })).into_response())
}

async fn revoke(
    State(b): State<Arc<Broker>>,
    headers: HeaderMap,
    Path(cluster): Path<String>,
) -> Result<Response, Failure> {
    let id = writer(&b, &headers).await?;
    let revoked = to_completion(async move { b.revoke(&id, &cluster).await }).await?;
    Ok(Json(serde_json::json!({ "revoked": revoked })).into_response())
}

/// Turns the connection into a relay stream for a gateway that cannot send UDP to the relay.
/// Only a cluster's credential may open one: what it may then register is checked frame by
/// frame, as on UDP.
async fn relay_stream(
    State(b): State<Arc<Broker>>,
    mut req: axum::extract::Request,
) -> Result<Response, Failure> {
    use causeway_broker_api::relay::STREAM_PROTOCOL;
    let id = who(&b, req.headers()).await?;
    if !matches!(id, Identity::Cluster(_)) {
        return Err(Failure(
            StatusCode::FORBIDDEN,
            ApiError {
                code: "Forbidden".into(),
                message: "only a cluster's credential opens a relay stream".into(),
            },
        ));
    }
    let wanted = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(STREAM_PROTOCOL));
    if !wanted {
        return Err(invalid(format!("a relay stream needs `Upgrade: {STREAM_PROTOCOL}`")));
    }
    let relay = b.relay();
    if !relay.has_room() {
        return Err(Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            ApiError { code: "Unavailable".into(), message: "the relay holds all the streams it may".into() },
        ));
    }
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(io) => relay.serve_stream(hyper_util::rt::TokioIo::new(io)).await,
            Err(e) => tracing::debug!(error = %e, "relay stream upgrade failed"),
        }
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, STREAM_PROTOCOL)
        .body(axum::body::Body::empty())
        .unwrap_or_default())
}

/// Whether a relay registration is genuine, for a relay run on a member's node (which has no
/// tokens to check MACs with). Only a cluster's credential may ask; the answer says no more
/// than the broker's own relay would (it acknowledges or refuses the same frame).
async fn relay_check(
    State(b): State<Arc<Broker>>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, Failure> {
    let id = who(&b, &headers).await?;
    if !matches!(id, Identity::Cluster(_)) {
        return Err(Failure(
            StatusCode::FORBIDDEN,
            ApiError {
                code: "Forbidden".into(),
                message: "only a cluster's credential checks relay registrations".into(),
            },
        ));
    }
    let frame = raw.map_err(|r| invalid(format!("unreadable body: {r}")))?;
    let Ok(causeway_broker_api::relay::Frame::Register(r)) = causeway_broker_api::relay::parse(&frame) else {
        return Err(invalid("the body is not a relay registration frame".into()));
    };
    let genuine = b.relay_check(&r).await?;
    Ok(Json(serde_json::json!({ "genuine": genuine })).into_response())
}

/// The broker's routes.
pub fn router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(crate::metrics::readyz))
        .route("/v1/records", get(list))
        .route("/v1/watch", get(watch))
        .route("/v1/join", post(join))
        .route("/v1/clusters/{id}", put(put_cluster).delete(delete_cluster))
        .route("/v1/clusters/{id}/credentials", post(rotate).delete(revoke))
        .route("/v1/clusters/{id}/readers", post(issue_reader))
        .route("/v1/credentials", post(issue).get(list_credentials))
        .route("/v1/credentials/{id}", axum::routing::delete(revoke_credential))
        .route("/v1/clusters/{id}/endpoints/{host}", put(put_endpoint).delete(delete_endpoint))
        .route("/v1/clusters/{id}/services/{namespace}/{name}", put(put_service).delete(delete_service))
        .route("/v1/cluster-set", put(put_cluster_set))
        .route("/v1/policies/{name}", put(put_policy).delete(delete_policy))
        .route("/v1/policy-default", put(put_policy_default))
        .route(causeway_broker_api::relay::STREAM_PATH, get(relay_stream))
        .route(causeway_broker_api::relay::CHECK_PATH, post(relay_check))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(broker)
}

/// What one broker lets its clients hold. A member (or anyone who reaches the port) must not
/// be able to starve the others of connections or hold one open without sending a request.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; past it new ones are closed at once (and logged).
    pub max_connections: usize,
    /// A request's head must arrive within this, counted from the moment the connection is
    /// ready for it: a fresh or idle keep-alive connection that sends nothing is closed when
    /// it runs out, and so is one that trickles its headers. In-flight requests (long-polls)
    /// are not affected.
    pub header_read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        // 1,000 clusters with a gateway and an agent or two each, and headroom; an idle client
        // reconnects in one round trip.
        Self { max_connections: 10_000, header_read_timeout: Duration::from_secs(30) }
    }
}

/// Serves `broker` over TLS on `listener` until `shutdown` completes.
pub async fn run_tls(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    broker: Arc<Broker>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    run_tls_with(listener, tls, broker, shutdown, Limits::default()).await
}

/// [`run_tls`] with explicit [`Limits`].
pub async fn run_tls_with(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    broker: Arc<Broker>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: Limits,
) -> std::io::Result<()> {
    let listener = crate::tls::TlsListener::new(listener, tls)?;
    info!(addr = %listener.local_addr_or_unspecified(), "broker listening (HTTPS)");
    serve(listener, router(broker), shutdown, limits).await
}

/// Serves `broker` on `listener` until `shutdown` completes (mini-redis style: the caller
/// owns the socket and the shutdown signal, so tests bind port 0).
pub async fn run(
    listener: tokio::net::TcpListener,
    broker: Arc<Broker>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    run_with(listener, broker, shutdown, Limits::default()).await
}

/// [`run`] with explicit [`Limits`].
pub async fn run_with(
    listener: tokio::net::TcpListener,
    broker: Arc<Broker>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: Limits,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "broker listening");
    }
    serve(listener, router(broker), shutdown, limits).await
}

/// The accept loop: one task per connection, at most `max_connections` of them, each an
/// HTTP/1.1 connection with hyper's header-read timer on. On shutdown, connections finish
/// their request in flight (up to a grace period) and close.
async fn serve<L>(
    mut listener: L,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: Limits,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut refused: u64 = 0;
    loop {
        let (io, addr) = tokio::select! {
            c = listener.accept() => c,
            () = &mut shutdown => break,
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            refused += 1;
            // Every 100th, so a flood cannot flood the log too.
            if refused % 100 == 1 {
                warn!(
                    ?addr,
                    max = limits.max_connections,
                    refused,
                    "connection limit reached; closing new connections"
                );
            }
            drop(io);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
            // Upgrades: relay streams (`/v1/relay`) leave the HTTP connection here.
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service).with_upgrades();
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                res = conn.as_mut() => {
                    if let Err(e) = res {
                        tracing::debug!(?addr, error = %e, "connection ended");
                    }
                }
                // The one change ever sent is the stop.
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
                }
            }
        });
    }
    let _ = stop_tx.send(true);
    // Wait for the connections to finish (their permits come back), within the grace period.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, permits.acquire_many(all)).await;
    Ok(())
}

/// How long a stopping broker lets connections finish their request.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    };

    use super::*;

    #[tokio::test]
    async fn a_write_finishes_all_its_steps_when_its_request_is_dropped() {
        let steps = Arc::new(AtomicU32::new(0));
        let s = Arc::clone(&steps);
        let request = to_completion(async move {
            s.fetch_add(1, Ordering::SeqCst); // e.g. the commit
            tokio::time::sleep(Duration::from_millis(50)).await;
            s.fetch_add(1, Ordering::SeqCst); // e.g. the credential of a join
            Ok(())
        });
        // The client goes away mid-write: the request's future is dropped.
        assert!(tokio::time::timeout(Duration::from_millis(10), request).await.is_err());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(steps.load(Ordering::SeqCst), 2, "the write stopped halfway");
    }
}
