//! A scripted Kubernetes API server on kube's mock service (`tower-test`): no API server can
//! run on our machines, so the tests (this crate's and the CLI's) answer with recorded-shape
//! API responses and assert the requests the code makes. Test support only.

use std::sync::{Arc, Mutex};

use http::{Request, Response};
use http_body_util::BodyExt as _;
use kube::{Client, client::Body};
use serde_json::{Value, json};

/// One request as the API server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub content_type: Option<String>,
    pub body: Value,
}

impl Seen {
    pub fn path(&self) -> &str {
        self.uri.split('?').next().unwrap_or_default()
    }
    pub fn is(&self, method: &str, path: &str) -> bool {
        self.method == method && self.path() == path
    }
}

pub enum Reply {
    Json(u16, Value),
    /// A watch response: these events, then the stream ends.
    Events(Vec<Value>),
    /// Never answer (a watch with nothing to say).
    Hang,
    /// A plain-text body (a pod's log).
    Text(u16, String),
}

pub type Log = Arc<Mutex<Vec<Seen>>>;

/// A client whose every request is answered by `respond`.
#[must_use]
pub fn client(mut respond: impl FnMut(&Seen) -> Reply + Send + 'static) -> (Client, Log) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let log: Log = Arc::default();
    let seen_log = log.clone();
    tokio::spawn(async move {
        let mut handle = std::pin::pin!(handle);
        let mut hanging = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let seen = Seen {
                method: parts.method.to_string(),
                uri: parts.uri.path_and_query().map(ToString::to_string).unwrap_or_default(),
                content_type: parts.headers.get("content-type").and_then(|v| v.to_str().ok()).map(Into::into),
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            };
            seen_log.lock().unwrap().push(seen.clone());
            match respond(&seen) {
                Reply::Json(code, v) => send.send_response(
                    Response::builder()
                        .status(code)
                        .body(Body::from(serde_json::to_vec(&v).unwrap()))
                        .unwrap(),
                ),
                Reply::Events(events) => {
                    let mut out = Vec::new();
                    for e in events {
                        out.extend(serde_json::to_vec(&e).unwrap());
                        out.push(b'\n');
                    }
                    send.send_response(Response::builder().status(200).body(Body::from(out)).unwrap());
                }
                Reply::Hang => hanging.push(send),
                Reply::Text(code, text) => {
                    send.send_response(
                        Response::builder().status(code).body(Body::from(text.into_bytes())).unwrap(),
                    );
                }
            }
        }
    });
    (Client::new(service, "default"), log)
}

pub fn not_found(what: &str) -> Reply {
    Reply::Json(404, status(404, "NotFound", &format!("{what} not found")))
}

pub fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

pub fn list(kind: &str, api_version: &str, items: Vec<Value>) -> Value {
    json!({"kind": format!("{kind}List"), "apiVersion": api_version, "metadata": {"resourceVersion": "100"}, "items": items})
}

/// The decoded value of `key` in a Secret as the API server received it.
#[must_use]
pub fn secret_data(secret: &Value, key: &str) -> Vec<u8> {
    let s: k8s_openapi::api::core::v1::Secret = serde_json::from_value(secret.clone()).expect("a Secret");
    s.data.and_then(|mut d| d.remove(key)).map(|b| b.0).unwrap_or_default()
}
