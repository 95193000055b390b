//! HTTP client of the broker API, used by gateways and the CLI.

use std::time::Duration;

use crate::records::{
    ApiError, ClusterRecord, Credentials, EndpointRecord, JoinResponse, ListResponse, Object, RotateResponse,
    Token, WatchResponse,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the broker at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the broker refused the request ({status} {}): {}", .error.code, .error.message)]
    Api { status: u16, error: ApiError },
    #[error("the broker's answer could not be read: {0}")]
    Decode(#[source] reqwest::Error),
    #[error("the broker's CA certificate is not valid PEM: {0}")]
    BadCa(#[source] reqwest::Error),
    #[error("building the HTTPS client failed: {0}")]
    Build(#[source] reqwest::Error),
    #[error("the broker's answer has no readable Date header")]
    NoDate,
}

impl ClientError {
    /// HTTP status of a refusal, if this is one.
    #[must_use]
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A handle on one broker; cheap to clone.
#[derive(Clone, Debug)]
pub struct BrokerClient {
    base: String,
    http: reqwest::Client,
    token: Option<Token>,
}

impl BrokerClient {
    /// A client for `base` (e.g. `https://172.31.0.2:7780`) that trusts only `ca_pem` (the
    /// broker's own CA, from a credentials file) and sends `token`.
    pub fn with(
        base: impl Into<String>,
        ca_pem: Option<&str>,
        token: Option<Token>,
    ) -> Result<Self, ClientError> {
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(3));
        if let Some(pem) = ca_pem {
            let ca = reqwest::Certificate::from_pem(pem.as_bytes()).map_err(ClientError::BadCa)?;
            builder = builder.tls_built_in_root_certs(false).add_root_certificate(ca);
        }
        let http = builder.build().map_err(ClientError::Build)?;
        Ok(Self { base: base.into().trim_end_matches('/').to_owned(), http, token })
    }

    /// A client from a credentials file's contents.
    pub fn from_credentials(c: &Credentials) -> Result<Self, ClientError> {
        Self::with(c.broker_url.clone(), c.ca_pem.as_deref(), Some(c.token.clone()))
    }

    /// An unauthenticated client without TLS settings (health checks, tests of refusals).
    #[must_use]
    pub fn new(base: impl Into<String>) -> Self {
        Self::with(base, None, None).expect("a client without TLS settings always builds")
    }

    /// The same broker with another credential.
    #[must_use]
    pub fn with_token(&self, token: Token) -> Self {
        Self { token: Some(token), ..self.clone() }
    }

    /// The same client (TLS trust, credential) against another URL: another replica of the
    /// same broker.
    #[must_use]
    pub fn at(&self, base: impl Into<String>) -> Self {
        Self { base: base.into(), ..self.clone() }
    }

    #[must_use]
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The broker's clock, from the `Date` header of its health answer (one-second
    /// resolution): what `diagnose` compares a node's clock with.
    pub async fn clock(&self) -> Result<std::time::SystemTime, ClientError> {
        let resp = self
            .http
            .get(format!("{}/healthz", self.base))
            .timeout(Self::TIMEOUT)
            .send()
            .await
            .map_err(|source| ClientError::Unreachable { url: self.base.clone(), source })?;
        let date = resp.headers().get(reqwest::header::DATE).ok_or(ClientError::NoDate)?;
        let date = date.to_str().map_err(|_| ClientError::NoDate)?;
        httpdate::parse_http_date(date).map_err(|_| ClientError::NoDate)
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(&t.0),
            None => req,
        };
        let resp = req
            .timeout(timeout)
            .send()
            .await
            .map_err(|source| ClientError::Unreachable { url: self.base.clone(), source })?;
        let status = resp.status();
        if status.is_success() {
            resp.json().await.map_err(ClientError::Decode)
        } else {
            let error = resp.json::<ApiError>().await.unwrap_or_else(|e| ApiError {
                code: "Unknown".into(),
                message: format!("unreadable error body: {e}"),
            });
            Err(ClientError::Api { status: status.as_u16(), error })
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(10);

    /// Asks the broker whether a relay registration (the frame as received) is genuine: what a
    /// relay run outside the broker checks every registration with.
    pub async fn relay_check(&self, frame: &[u8]) -> Result<bool, ClientError> {
        #[derive(serde::Deserialize)]
        struct Answer {
            genuine: bool,
        }
        let url = format!("{}{}", self.base, crate::relay::CHECK_PATH);
        let req = self.http.post(url).header(reqwest::header::CONTENT_TYPE, "application/octet-stream");
        let a: Answer = self.send(req.body(frame.to_vec()), Self::TIMEOUT).await?;
        Ok(a.genuine)
    }

    /// Opens a relay stream on the broker's API port (for a gateway whose UDP to the relay is
    /// blocked): relay frames, each preceded by its length, both ways
    /// ([`crate::relay::StreamDecoder`]).
    pub async fn relay_stream(&self) -> Result<reqwest::Upgraded, ClientError> {
        use crate::relay::{STREAM_PATH, STREAM_PROTOCOL};
        let url = format!("{}{STREAM_PATH}", self.base);
        let req = self
            .http
            .get(url)
            .header(reqwest::header::CONNECTION, "upgrade")
            .header(reqwest::header::UPGRADE, STREAM_PROTOCOL);
        let req = match &self.token {
            Some(t) => req.bearer_auth(&t.0),
            None => req,
        };
        // A timeout on the request itself would end the stream too: only the answer is timed.
        let unreachable = |source| ClientError::Unreachable { url: self.base.clone(), source };
        let resp = match tokio::time::timeout(Self::TIMEOUT, req.send()).await {
            Ok(r) => r.map_err(unreachable)?,
            Err(_) => {
                return Err(ClientError::Api {
                    status: 504,
                    error: ApiError {
                        code: "Timeout".into(),
                        message: "no answer to the relay upgrade".into(),
                    },
                });
            }
        };
        let status = resp.status();
        if status != reqwest::StatusCode::SWITCHING_PROTOCOLS {
            let error = resp.json::<ApiError>().await.unwrap_or_else(|e| ApiError {
                code: "Unknown".into(),
                message: format!("no upgrade ({status}), and an unreadable error body: {e}"),
            });
            return Err(ClientError::Api { status: status.as_u16(), error });
        }
        resp.upgrade().await.map_err(unreachable)
    }

    pub async fn put_cluster(&self, c: &ClusterRecord) -> Result<Object, ClientError> {
        let url = format!("{}/v1/clusters/{}", self.base, c.cluster_id);
        self.send(self.http.put(url).json(c), Self::TIMEOUT).await
    }

    pub async fn delete_cluster(&self, cluster_id: &str) -> Result<Vec<Object>, ClientError> {
        let url = format!("{}/v1/clusters/{cluster_id}", self.base);
        self.send(self.http.delete(url), Self::TIMEOUT).await
    }

    /// Publishes (creates or replaces) one of this cluster's exported services.
    pub async fn put_service(&self, s: &crate::ServiceExportRecord) -> Result<Object, ClientError> {
        let url = format!("{}/v1/clusters/{}/services/{}/{}", self.base, s.cluster_id, s.namespace, s.name);
        self.send(self.http.put(url).json(s), Self::TIMEOUT).await
    }

    pub async fn delete_service(
        &self,
        cluster_id: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Vec<Object>, ClientError> {
        let url = format!("{}/v1/clusters/{cluster_id}/services/{namespace}/{name}", self.base);
        self.send(self.http.delete(url), Self::TIMEOUT).await
    }

    /// Sets the cluster set's settings, e.g. overlap mode (admin credential).
    pub async fn put_cluster_set(&self, c: &crate::ClusterSetRecord) -> Result<Object, ClientError> {
        let url = format!("{}/v1/cluster-set", self.base);
        self.send(self.http.put(url).json(c), Self::TIMEOUT).await
    }

    /// Creates or replaces a cluster-set policy rule (admin credential).
    pub async fn put_policy(&self, p: &crate::PolicyRecord) -> Result<Object, ClientError> {
        let url = format!("{}/v1/policies/{}", self.base, p.name);
        self.send(self.http.put(url).json(p), Self::TIMEOUT).await
    }

    pub async fn delete_policy(&self, name: &str) -> Result<Vec<Object>, ClientError> {
        let url = format!("{}/v1/policies/{name}", self.base);
        self.send(self.http.delete(url), Self::TIMEOUT).await
    }

    /// Sets the cluster set's default policy action (admin credential).
    pub async fn put_policy_default(&self, d: &crate::PolicyDefaultRecord) -> Result<Object, ClientError> {
        let url = format!("{}/v1/policy-default", self.base);
        self.send(self.http.put(url).json(d), Self::TIMEOUT).await
    }

    pub async fn put_endpoint(&self, e: &EndpointRecord) -> Result<Object, ClientError> {
        let url = format!("{}/v1/clusters/{}/endpoints/{}", self.base, e.cluster_id, e.hostname);
        self.send(self.http.put(url).json(e), Self::TIMEOUT).await
    }

    pub async fn delete_endpoint(
        &self,
        cluster_id: &str,
        hostname: &str,
    ) -> Result<Vec<Object>, ClientError> {
        let url = format!("{}/v1/clusters/{cluster_id}/endpoints/{hostname}", self.base);
        self.send(self.http.delete(url), Self::TIMEOUT).await
    }

    pub async fn list(&self) -> Result<ListResponse, ClientError> {
        self.send(self.http.get(format!("{}/v1/records", self.base)), Self::TIMEOUT).await
    }

    /// Registers a new cluster (needs a join or admin credential); returns its own credential.
    pub async fn join(&self, c: &ClusterRecord) -> Result<JoinResponse, ClientError> {
        self.send(self.http.post(format!("{}/v1/join", self.base)).json(c), Self::TIMEOUT).await
    }

    /// Issues a new credential for the cluster and revokes its old ones at once.
    pub async fn rotate(&self, cluster_id: &str) -> Result<RotateResponse, ClientError> {
        self.rotate_with_overlap(cluster_id, Duration::ZERO).await
    }

    /// Issues a new credential for the cluster; the old ones keep working for `overlap`.
    pub async fn rotate_with_overlap(
        &self,
        cluster_id: &str,
        overlap: Duration,
    ) -> Result<RotateResponse, ClientError> {
        let url = format!(
            "{}/v1/clusters/{cluster_id}/credentials?overlapSeconds={}",
            self.base,
            overlap.as_secs()
        );
        self.send(self.http.post(url), Self::TIMEOUT).await
    }

    /// Issues an admin or join credential (admin only).
    pub async fn issue(&self, req: &crate::IssueRequest) -> Result<crate::IssueResponse, ClientError> {
        self.send(self.http.post(format!("{}/v1/credentials", self.base)).json(req), Self::TIMEOUT).await
    }

    /// Issues a read-only credential for the cluster (the cluster itself, or the admin).
    pub async fn issue_reader(&self, cluster_id: &str) -> Result<crate::IssueResponse, ClientError> {
        let url = format!("{}/v1/clusters/{cluster_id}/readers", self.base);
        self.send(self.http.post(url), Self::TIMEOUT).await
    }

    /// Every credential the broker holds, without tokens (admin only).
    pub async fn list_credentials(&self) -> Result<Vec<crate::CredentialInfo>, ClientError> {
        self.send(self.http.get(format!("{}/v1/credentials", self.base)), Self::TIMEOUT).await
    }

    /// Revokes one credential by its id (admin only).
    pub async fn revoke_credential(&self, id: &str) -> Result<serde_json::Value, ClientError> {
        self.send(self.http.delete(format!("{}/v1/credentials/{id}", self.base)), Self::TIMEOUT).await
    }

    /// Revokes every credential of the cluster (admin only).
    pub async fn revoke(&self, cluster_id: &str) -> Result<serde_json::Value, ClientError> {
        let url = format!("{}/v1/clusters/{cluster_id}/credentials", self.base);
        self.send(self.http.delete(url), Self::TIMEOUT).await
    }

    /// Long-polls for the changes after `since`; returns an empty batch after `wait`.
    /// HTTP 410 (`Gone`) means `since` is older than the broker's history: list again.
    pub async fn watch(&self, since: u64, wait: Duration) -> Result<WatchResponse, ClientError> {
        let url = format!("{}/v1/watch?since={since}&timeoutSeconds={}", self.base, wait.as_secs());
        self.send(self.http.get(url), wait + Self::TIMEOUT).await
    }
}
