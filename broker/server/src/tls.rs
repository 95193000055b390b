//! TLS for the broker: a certificate authority and a server certificate for `deploy-broker`
//! (rcgen), the rustls server config, and an axum listener that completes TLS handshakes
//! concurrently (a slow or hostile client never blocks the others).

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio::{net::TcpStream, sync::mpsc};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tracing::debug;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen_error::Error),
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no usable {what} (PEM expected)")]
    Pem { path: String, what: &'static str },
    #[error("the certificate and key do not make a valid TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// rcgen's error, re-exported so callers need not depend on rcgen.
pub mod rcgen_error {
    pub use rcgen::Error;
}

/// PEM of a CA, and a server certificate it signed.
pub struct Generated {
    pub ca_pem: String,
    pub ca_key_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Generated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Generated { <certificates and keys> }")
    }
}

/// A new CA and a server certificate for `names` (IP addresses or DNS names), valid 10 years.
pub fn generate(names: &[String]) -> Result<Generated, TlsError> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "Causeway broker CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let ca_key = KeyPair::generate()?;
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)?;
    let mut params = CertificateParams::new(names.to_vec())?;
    params.distinguished_name.push(DnType::CommonName, "causeway-broker");
    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca)?;
    Ok(Generated {
        ca_pem: ca.pem(),
        ca_key_pem: ca.key().serialize_pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The rustls server configuration from PEM files.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| TlsError::Read { path: p.display().to_string(), source })
    };
    let cert_bytes = read(cert)?;
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&cert_bytes).filter_map(Result::ok).collect();
    if certs.is_empty() {
        return Err(TlsError::Pem { path: cert.display().to_string(), what: "certificate" });
    }
    let key_der = PrivateKeyDer::from_pem_slice(&read(key)?)
        .map_err(|_| TlsError::Pem { path: key.display().to_string(), what: "private key" })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)?;
    Ok(Arc::new(config))
}

/// A TCP listener that hands out only connections whose TLS handshake completed.
pub struct TlsListener {
    local: SocketAddr,
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

/// How long a client may take to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl TlsListener {
    pub fn new(tcp: tokio::net::TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let acceptor = TlsAcceptor::from(config);
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (stream, addr) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, addr)).await;
                        }
                        Ok(Err(e)) => debug!(%addr, error = %e, "TLS handshake failed"),
                        Err(_) => debug!(%addr, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { local, rx })
    }
}

impl TlsListener {
    /// The bound address (for logs).
    #[must_use]
    pub fn local_addr_or_unspecified(&self) -> SocketAddr {
        self.local
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task only ends when we are dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
