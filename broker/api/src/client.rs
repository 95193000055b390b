//! HTTP client of the broker API, used by gateways and the CLI.

use std::time::Duration;

use crate::records::{ApiError, ClusterRecord, EndpointRecord, ListResponse, Object, WatchResponse};

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
}

impl BrokerClient {
    /// `base` is e.g. `http://172.31.0.2:8443`.
    pub fn new(base: impl Into<String>) -> Self {
        let http =
            reqwest::Client::builder().connect_timeout(Duration::from_secs(3)).build().unwrap_or_default();
        Self { base: base.into().trim_end_matches('/').to_owned(), http }
    }

    #[must_use]
    pub fn base_url(&self) -> &str {
        &self.base
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<T, ClientError> {
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

    pub async fn put_cluster(&self, c: &ClusterRecord) -> Result<Object, ClientError> {
        let url = format!("{}/v1/clusters/{}", self.base, c.cluster_id);
        self.send(self.http.put(url).json(c), Self::TIMEOUT).await
    }

    pub async fn delete_cluster(&self, cluster_id: &str) -> Result<Vec<Object>, ClientError> {
        let url = format!("{}/v1/clusters/{cluster_id}", self.base);
        self.send(self.http.delete(url), Self::TIMEOUT).await
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

    /// Long-polls for the changes after `since`; returns an empty batch after `wait`.
    /// HTTP 410 (`Gone`) means `since` is older than the broker's history: list again.
    pub async fn watch(&self, since: u64, wait: Duration) -> Result<WatchResponse, ClientError> {
        let url = format!("{}/v1/watch?since={since}&timeoutSeconds={}", self.base, wait.as_secs());
        self.send(self.http.get(url), wait + Self::TIMEOUT).await
    }
}
