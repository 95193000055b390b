//! The broker under connection pressure: thousands of idle TLS connections do not stop it
//! answering; connections that send no request (or trickle one) are closed; past the cap new
//! connections are closed at once and the ones inside it keep working.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use causeway_broker::{Broker, Identity, Limits, MemStore};
use causeway_broker_api::BrokerClient;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// Reads until the peer closes; `Some(elapsed)` if it did within `limit`.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit.saturating_sub(start.elapsed()), s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {} // e.g. a 408 before the close
            Err(_) => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_idle_tls_connections_do_not_stop_a_list() {
    const IDLE: usize = 5_000;
    let g = causeway_broker::tls::generate(&["127.0.0.1".into()]).unwrap();
    let dir = std::env::temp_dir().join(format!("cw-limits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("server.pem"), &g.cert_pem).unwrap();
    std::fs::write(dir.join("server.key"), &g.key_pem).unwrap();
    let config =
        causeway_broker::tls::server_config(&dir.join("server.pem"), &dir.join("server.key")).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let broker = Broker::new(MemStore::default()).await.unwrap();
    let admin = broker.issue(&Identity::Admin).await.unwrap();
    let limits = Limits { max_connections: 10_000, header_read_timeout: Duration::from_secs(300) };
    tokio::spawn(causeway_broker::run_tls_with(listener, config, broker, std::future::pending(), limits));

    // 5,000 clients finish their TLS handshake, then say nothing.
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::{CertificateDer, pem::PemObject as _};
    for cert in CertificateDer::pem_slice_iter(g.ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let client_config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
    let opened = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let connector = connector.clone();
        tasks.push(tokio::spawn(async move {
            let mut held = Vec::new();
            for _ in 0..IDLE / 50 {
                let tcp = TcpStream::connect(addr).await.unwrap();
                let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
                held.push(connector.connect(name, tcp).await.unwrap());
            }
            held
        }));
    }
    let mut idle = Vec::new();
    for t in tasks {
        idle.extend(t.await.unwrap());
    }
    assert_eq!(idle.len(), IDLE);
    eprintln!("{IDLE} idle TLS connections open after {:?}", opened.elapsed());

    // A real client still gets its answer at once.
    let client = BrokerClient::with(format!("https://{addr}"), Some(&g.ca_pem), Some(admin)).unwrap();
    let start = Instant::now();
    client.list().await.unwrap();
    let took = start.elapsed();
    eprintln!("list with {IDLE} idle connections open: {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    // And the idle ones are still connected (nothing was dropped to make room).
    let mut buf = [0u8; 1];
    let probe = tokio::time::timeout(Duration::from_millis(100), idle[0].read(&mut buf)).await;
    assert!(probe.is_err(), "the first idle connection is still open: {probe:?}");
}

async fn plain_broker(limits: Limits) -> (SocketAddr, BrokerClient) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let broker = Broker::new(MemStore::default()).await.unwrap();
    let admin = broker.issue(&Identity::Admin).await.unwrap();
    tokio::spawn(causeway_broker::run_with(listener, broker, std::future::pending(), limits));
    (addr, BrokerClient::new(format!("http://{addr}")).with_token(admin))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_trickling_connections_are_closed() {
    let limits = Limits { max_connections: 100, header_read_timeout: Duration::from_secs(1) };
    let (addr, client) = plain_broker(limits).await;
    // Connected, silent: closed after the header-read timeout, not before.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    let t = closed_within(&mut idle, Duration::from_secs(5)).await.expect("an idle connection is closed");
    assert!(t >= Duration::from_millis(900), "{t:?}");
    // One request, then quiet: a kept-alive connection is closed too.
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 256];
    let n = kept.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&buf[..n]));
    assert!(
        closed_within(&mut kept, Duration::from_secs(5)).await.is_some(),
        "an idle keep-alive connection is closed"
    );
    // A header trickled one byte every 200 ms never completes: closed after the timeout.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    let start = Instant::now();
    let trickle = async {
        for b in b"GET /v1/records HTTP/1.1\r\nhost: x\r\n".iter().cycle() {
            if slow.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            if start.elapsed() > Duration::from_secs(6) {
                break;
            }
        }
    };
    trickle.await;
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "the trickling connection was closed: {:?}",
        start.elapsed()
    );
    // A long-poll is a request in flight, not idleness: it outlives the timeout.
    let rv = client.list().await.unwrap().resource_version;
    let start = Instant::now();
    let w = client.watch(rv, Duration::from_secs(3)).await.unwrap();
    assert!(w.events.is_empty() && start.elapsed() >= Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_cap_new_connections_are_closed_at_once() {
    let limits = Limits { max_connections: 8, header_read_timeout: Duration::from_secs(30) };
    let (addr, client) = plain_broker(limits).await;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    // Give the accept loop time to take all eight.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut ninth = TcpStream::connect(addr).await.unwrap();
    let t = closed_within(&mut ninth, Duration::from_secs(2)).await.expect("the ninth is closed");
    assert!(t < Duration::from_secs(1), "{t:?}");
    // The held ones still work.
    held[0].write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 256];
    let n = held[0].read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // Room again once one goes (its task sees the close and gives its slot back).
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(e) = client.list().await {
        assert!(Instant::now() < deadline, "no room after a connection closed: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
