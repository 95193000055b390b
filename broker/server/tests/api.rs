//! The broker over real HTTP on loopback: refusals are clear and lose nothing; watchers
//! resume exactly where they left off. The scenarios run on every store (memory, the
//! embedded redb file, real etcd): same behaviour everywhere.

use std::time::Duration;

use causeway_broker::{
    Broker, EtcdOptions, EtcdStore, Identity, MemStore, RedbStore, Store,
    testing::{EtcdCluster, require_etcd},
};
use causeway_broker_api::{
    BrokerClient, ClusterRecord, EndpointRecord, EventType, GatewayRole, GlobalCidr, ListResponse, Record,
    Token, WireGuardKey, validate::overlaps,
};

/// Starts a broker on loopback; returns a client holding a fresh admin credential.
async fn start(store: impl causeway_broker::Store) -> (BrokerClient, tokio::sync::oneshot::Sender<()>) {
    let (client, _, stop) = start_with(store).await;
    (client, stop)
}

async fn start_with(
    store: impl causeway_broker::Store,
) -> (BrokerClient, std::sync::Arc<Broker>, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let broker = Broker::new(store).await.unwrap();
    let admin = broker.issue(&Identity::Admin).await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(causeway_broker::run(listener, broker.clone(), async {
        let _ = rx.await;
    }));
    (BrokerClient::new(url).with_token(admin), broker, tx)
}

/// A fresh store of one kind, and what keeps it alive (its file, its etcd).
struct Fixture {
    store: Option<Box<dyn Store>>,
    _etcd: Option<EtcdCluster>,
    dir: Option<std::path::PathBuf>,
}

impl Fixture {
    fn take(&mut self) -> Box<dyn Store> {
        self.store.take().expect("one store per fixture")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Memory,
    Redb,
    Etcd,
}

static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A store of this kind; etcd's fails the test when etcd is missing (never a silent pass).
async fn fixture(kind: Kind, history: u64, test: &str) -> Fixture {
    match kind {
        Kind::Memory => {
            Fixture { store: Some(Box::new(MemStore::with_history(history))), _etcd: None, dir: None }
        }
        Kind::Redb => {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("cw-api-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let store = RedbStore::open_with_history(&dir.join("broker.redb"), history).unwrap();
            Fixture { store: Some(Box::new(store)), _etcd: None, dir: Some(dir) }
        }
        Kind::Etcd => {
            require_etcd(test);
            let etcd = EtcdCluster::start(1);
            let mut o = EtcdOptions::new(etcd.endpoints());
            o.history = history;
            let store = EtcdStore::connect(&o).await.unwrap();
            Fixture { store: Some(Box::new(store)), _etcd: Some(etcd), dir: None }
        }
    }
}

/// One `#[tokio::test]` per store kind for a scenario `async fn(Fixture)`.
macro_rules! on_every_store {
    ($scenario:ident, $history:expr) => {
        mod $scenario {
            use super::*;
            async fn run(kind: Kind) {
                let name = concat!(stringify!($scenario), " on ");
                super::$scenario(fixture(kind, $history, &format!("{name}{kind:?}")).await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                run(Kind::Memory).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redb() {
                run(Kind::Redb).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn etcd() {
                run(Kind::Etcd).await;
            }
        }
    };
    ($scenario:ident) => {
        on_every_store!($scenario, 100_000);
    };
}

on_every_store!(refusals_are_clear_and_lose_nothing);
on_every_store!(racing_overlapping_clusters_exactly_one_wins);
on_every_store!(racing_joins_in_overlap_mode_never_share_a_global_prefix);
on_every_store!(watcher_resumes_with_exactly_the_missed_events_in_order);
on_every_store!(credentials_decide_who_may_write_what);
on_every_store!(endpoints_expire_without_heartbeats);
on_every_store!(a_watcher_behind_the_history_is_told_to_relist, 5);
on_every_store!(policy_is_admin_only_and_validated);
on_every_store!(services_and_overlap_mode);
on_every_store!(hostile_claims_are_refused_and_lose_nothing);
on_every_store!(pools_and_quotas_are_the_admins);
on_every_store!(credentials_expire_are_spent_revoked_rotated_and_read_only);
on_every_store!(a_watcher_far_behind_gets_pages_and_misses_nothing);
on_every_store!(exports_merge_into_imports_with_a_clusterset_ip);

fn cluster(id: &str, pod: &str, svc: &str) -> ClusterRecord {
    ClusterRecord::new(id, vec![pod.parse().unwrap()], vec![svc.parse().unwrap()])
}

fn endpoint(id: &str, host: &str) -> EndpointRecord {
    EndpointRecord {
        cluster_id: id.into(),
        hostname: host.into(),
        private_ips: vec!["172.31.0.11".parse().unwrap()],
        public_ips: vec![],
        port: 51820,
        public_key: key_of(id, host),
        backend: "wireguard".into(),
        role: GatewayRole::Active,
        priority: 0,
        health_check_ip: None,
        reachable: None,
        candidates: Vec::new(),
        generation: 1,
    }
}

/// A key of its own for every gateway (a shared one would hide key-clash bugs).
fn key_of(id: &str, host: &str) -> WireGuardKey {
    use sha2::Digest as _;
    WireGuardKey(sha2::Sha256::digest(format!("{id}/{host}")).into())
}

fn records(l: &ListResponse) -> Vec<Record> {
    l.items.iter().map(|o| o.record.clone()).collect()
}

async fn refusals_are_clear_and_lose_nothing(mut f: Fixture) {
    let (client, broker, _stop) = start_with(f.take()).await;
    let admin_token = broker.issue(&Identity::Admin).await.unwrap();
    client.put_cluster(&cluster("east", "10.1.0.0/16", "10.101.0.0/16")).await.unwrap();
    client.put_endpoint(&endpoint("east", "gw-1")).await.unwrap();
    let before = client.list().await.unwrap();

    // Overlapping CIDRs: 409 naming the other cluster and both CIDRs.
    let err = client.put_cluster(&cluster("west", "10.1.128.0/17", "10.102.0.0/16")).await.unwrap_err();
    assert_eq!(err.status(), Some(409));
    let msg = err.to_string();
    assert!(
        msg.contains("\"east\"") && msg.contains("10.1.128.0/17") && msg.contains("10.1.0.0/16"),
        "{msg}"
    );

    // Invalid field: 400 naming the field.
    let err = client.put_cluster(&cluster("Bad_Id", "10.9.0.0/16", "10.109.0.0/16")).await.unwrap_err();
    assert_eq!(err.status(), Some(400));
    assert!(err.to_string().contains("clusterId"), "{err}");

    // Endpoint of a cluster that never registered: 409.
    let err = client.put_endpoint(&endpoint("ghost", "gw-9")).await.unwrap_err();
    assert_eq!(err.status(), Some(409));
    assert!(err.to_string().contains("not registered"), "{err}");

    // Older generation over a newer one: 409.
    let mut newer = cluster("east", "10.1.0.0/16", "10.101.0.0/16");
    newer.generation = 5;
    client.put_cluster(&newer).await.unwrap();
    let err = client.put_cluster(&cluster("east", "10.1.0.0/16", "10.101.0.0/16")).await.unwrap_err();
    assert_eq!(err.status(), Some(409));
    assert!(err.to_string().contains("generation 1 is older"), "{err}");

    // Raw bodies: malformed JSON, unknown field, oversized, path/body mismatch.
    let http = reqwest::Client::new();
    let url = format!("{}/v1/clusters/west", client.base_url());
    let admin = admin_token.0.clone();
    let resp = http
        .put(&url)
        .bearer_auth(&admin)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = http
        .put(&url)
        .bearer_auth(&admin)
        .body(r#"{"clusterId":"west","podCidrs":["10.2.0.0/16"],"serviceCidrs":[],"x":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("unknown field"));
    // The server answers 413 without reading the body, then drops the connection: it must
    // not go back to the client's pool, or the next request fails with a broken pipe.
    let resp = http
        .put(&url)
        .bearer_auth(&admin)
        .header(reqwest::header::CONNECTION, "close")
        .body(vec![b' '; 200 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let resp = http
        .put(&url)
        .bearer_auth(&admin)
        .body(r#"{"clusterId":"east","podCidrs":["10.2.0.0/16"],"serviceCidrs":[]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    let after = client.list().await.unwrap();
    let mut expected = records(&before);
    expected[0] = Record::Cluster(newer);
    assert_eq!(records(&after), expected, "refused requests changed nothing");
}

/// Overlap mode: eight clusters with the same CIDRs join at the same instant; every one gets
/// global prefixes, and no prefix is handed out twice.
async fn racing_joins_in_overlap_mode_never_share_a_global_prefix(mut f: Fixture) {
    let (client, _stop) = start(f.take()).await;
    let on =
        causeway_broker_api::ClusterSetRecord { overlap_mode: true, generation: 1, ..Default::default() };
    client.put_cluster_set(&on).await.unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move {
                c.put_cluster(&cluster(&format!("c{i}"), "10.244.0.0/16", "10.96.0.0/12")).await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let globals: Vec<ipnetwork::IpNetwork> = client
        .list()
        .await
        .unwrap()
        .items
        .iter()
        .flat_map(|o| match &o.record {
            Record::Cluster(c) => c.globals().copied().collect(),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(globals.len(), 16);
    for (i, a) in globals.iter().enumerate() {
        for b in &globals[i + 1..] {
            assert!(!overlaps(a, b), "{a} and {b} handed out twice");
        }
    }
}

async fn racing_overlapping_clusters_exactly_one_wins(mut f: Fixture) {
    let (client, _stop) = start(f.take()).await;
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            c.put_cluster(&cluster(&format!("c{i}"), "10.50.0.0/16", &format!("10.{}.0.0/16", 150 + i))).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.status(), Some(409), "{e}"),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(client.list().await.unwrap().items.len(), 1);
}

async fn watcher_resumes_with_exactly_the_missed_events_in_order(mut f: Fixture) {
    let (client, _stop) = start(f.take()).await;
    client.put_cluster(&cluster("east", "10.1.0.0/16", "10.101.0.0/16")).await.unwrap();
    let since = client.list().await.unwrap().resource_version;
    // The watcher is "disconnected" while 100 changes happen.
    for g in 2..=101u64 {
        let mut c = cluster("east", "10.1.0.0/16", "10.101.0.0/16");
        c.generation = g;
        client.put_cluster(&c).await.unwrap();
    }
    let w = client.watch(since, Duration::from_secs(1)).await.unwrap();
    assert!(!w.more, "100 events fit one answer");
    assert_eq!(w.events.len(), 100);
    let gens: Vec<u64> = w.events.iter().map(|e| e.object.record.generation()).collect();
    assert_eq!(gens, (2..=101).collect::<Vec<_>>());
    assert!(w.events.windows(2).all(|p| p[0].revision < p[1].revision));
    assert_eq!(w.resource_version, since + 100);
    // Nothing new: the long-poll times out empty.
    let idle = client.watch(w.resource_version, Duration::from_secs(1)).await.unwrap();
    assert!(idle.events.is_empty());
    // A long-poll wakes on the next change, and deletes carry the last state.
    let waiter = {
        let c = client.clone();
        let rv = w.resource_version;
        tokio::spawn(async move { c.watch(rv, Duration::from_secs(10)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    client.delete_cluster("east").await.unwrap();
    let woke = waiter.await.unwrap().unwrap();
    assert_eq!(woke.events.len(), 1);
    assert_eq!(woke.events[0].kind, EventType::Delete);
    // A revision the broker never had: 410, re-list.
    let err = client.watch(999_999, Duration::from_secs(1)).await.unwrap_err();
    assert_eq!(err.status(), Some(410));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_keeps_everything_across_restarts() {
    let dir = std::env::temp_dir().join(format!("cw-broker-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("broker.redb");
    let first = {
        let (client, stop) = start(RedbStore::open(&path).unwrap()).await;
        client.put_cluster(&cluster("east", "10.1.0.0/16", "10.101.0.0/16")).await.unwrap();
        client.put_endpoint(&endpoint("east", "gw-1")).await.unwrap();
        let l = client.list().await.unwrap();
        stop.send(()).unwrap();
        l
    };
    // The first server's task may still hold the file briefly.
    let store = loop {
        match RedbStore::open(&path) {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let (client, _stop) = start(store).await;
    let second = client.list().await.unwrap();
    assert_eq!(second, first);
    std::fs::remove_dir_all(&dir).unwrap();
}

async fn credentials_decide_who_may_write_what(mut f: Fixture) {
    let (admin, broker, _stop) = start_with(f.take()).await;
    let joiner = admin.with_token(broker.issue(&Identity::Join).await.unwrap());
    let east =
        admin.with_token(joiner.join(&cluster("east", "10.1.0.0/16", "10.101.0.0/16")).await.unwrap().token);
    let west =
        admin.with_token(joiner.join(&cluster("west", "10.2.0.0/16", "10.102.0.0/16")).await.unwrap().token);
    east.put_endpoint(&endpoint("east", "gw-1")).await.unwrap();
    let before = admin.list().await.unwrap();

    // No credential, a made-up one: 401, for reads and writes alike.
    let anonymous = BrokerClient::new(admin.base_url());
    assert_eq!(anonymous.list().await.unwrap_err().status(), Some(401));
    let forged = admin.with_token(Token("cw1_not-a-real-token".into()));
    assert_eq!(
        forged.put_cluster(&cluster("east", "10.1.0.0/16", "10.101.0.0/16")).await.unwrap_err().status(),
        Some(401)
    );

    // West may read everything but write only its own records: 403 for east's.
    west.list().await.unwrap();
    let mut hijack = cluster("east", "10.1.0.0/16", "10.101.0.0/16");
    hijack.generation = 9;
    let err = west.put_cluster(&hijack).await.unwrap_err();
    assert_eq!(err.status(), Some(403));
    assert!(err.to_string().contains("cluster \"west\" may not"), "{err}");
    assert_eq!(west.put_endpoint(&endpoint("east", "gw-evil")).await.unwrap_err().status(), Some(403));
    assert_eq!(west.delete_cluster("east").await.unwrap_err().status(), Some(403));
    assert_eq!(west.delete_endpoint("east", "gw-1").await.unwrap_err().status(), Some(403));
    assert_eq!(west.rotate("east").await.unwrap_err().status(), Some(403));
    assert_eq!(west.revoke("east").await.unwrap_err().status(), Some(403), "only the admin revokes");
    // A join credential registers clusters and nothing else; ids are unique.
    assert_eq!(joiner.list().await.unwrap_err().status(), Some(403));
    assert_eq!(joiner.put_endpoint(&endpoint("east", "gw-2")).await.unwrap_err().status(), Some(403));
    let err = joiner.join(&cluster("east", "10.9.0.0/16", "10.109.0.0/16")).await.unwrap_err();
    assert_eq!(err.status(), Some(409));
    assert!(err.to_string().contains("already registered"), "{err}");
    assert_eq!(
        joiner.join(&cluster("north", "10.1.5.0/24", "10.103.0.0/16")).await.unwrap_err().status(),
        Some(409)
    );
    assert_eq!(
        east.join(&cluster("south", "10.4.0.0/16", "10.104.0.0/16")).await.unwrap_err().status(),
        Some(403)
    );
    assert_eq!(admin.list().await.unwrap(), before, "no refused request changed anything");

    // Rotation: the new credential works, the old one is dead.
    let rotated = east.rotate("east").await.unwrap().token;
    assert_eq!(east.list().await.unwrap_err().status(), Some(401));
    let east = admin.with_token(rotated);
    east.list().await.unwrap();
    // Revocation by the admin.
    assert_eq!(admin.revoke("east").await.unwrap()["revoked"], 1);
    assert_eq!(east.list().await.unwrap_err().status(), Some(401));
    // Leaving revokes too: west deletes itself and its credential stops working.
    west.delete_cluster("west").await.unwrap();
    assert_eq!(west.list().await.unwrap_err().status(), Some(401));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_the_brokers_own_ca() {
    let g = causeway_broker::tls::generate(&["127.0.0.1".into()]).unwrap();
    let dir = std::env::temp_dir().join(format!("cw-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("server.pem"), &g.cert_pem).unwrap();
    std::fs::write(dir.join("server.key"), &g.key_pem).unwrap();
    let config =
        causeway_broker::tls::server_config(&dir.join("server.pem"), &dir.join("server.key")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let broker = Broker::new(MemStore::default()).await.unwrap();
    let admin = broker.issue(&Identity::Admin).await.unwrap();
    tokio::spawn(causeway_broker::run_tls(listener, config, broker, std::future::pending()));

    let trusted = BrokerClient::with(url.clone(), Some(&g.ca_pem), Some(admin.clone())).unwrap();
    trusted.put_cluster(&cluster("east", "10.1.0.0/16", "10.101.0.0/16")).await.unwrap();
    assert_eq!(trusted.list().await.unwrap().items.len(), 1);
    // Without the broker's CA the client refuses the connection (no system roots are trusted).
    let untrusting = BrokerClient::with(url.clone(), None, Some(admin.clone())).unwrap();
    assert!(matches!(untrusting.list().await, Err(causeway_broker_api::ClientError::Unreachable { .. })));
    // Another CA's certificate is not accepted either.
    let other = causeway_broker::tls::generate(&["127.0.0.1".into()]).unwrap();
    let wrong_ca = BrokerClient::with(url.clone(), Some(&other.ca_pem), Some(admin)).unwrap();
    assert!(wrong_ca.list().await.is_err());
    // Plain HTTP against the TLS port gets nowhere, and the broker keeps serving.
    assert!(BrokerClient::new(url.replace("https", "http")).list().await.is_err());
    assert_eq!(trusted.list().await.unwrap().items.len(), 1);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Sends one request on a fresh connection; returns the whole answer.
async fn raw_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_metrics_and_the_clock_are_served() {
    let (client, broker, _stop) = start_with(MemStore::default()).await;
    client.put_cluster(&cluster("east", "10.1.0.0/16", "10.101.0.0/16")).await.unwrap();
    // The API port: readiness (the store answers) and the clock `diagnose` compares with.
    let api: std::net::SocketAddr = client.base_url().trim_start_matches("http://").parse().unwrap();
    let ready = raw_get(api, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200") && ready.ends_with("ok\n"), "{ready}");
    let skew = match std::time::SystemTime::now().duration_since(client.clock().await.unwrap()) {
        Ok(d) => d,
        Err(e) => e.duration(),
    };
    assert!(skew < Duration::from_secs(3), "{skew:?}");
    // The metrics port: OpenMetrics text with what the broker holds.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = causeway_broker::metrics::serve(listener, broker);
    let metrics = raw_get(addr, "/metrics").await;
    assert!(metrics.contains("content-type: application/openmetrics-text"), "{metrics}");
    assert!(metrics.contains("causeway_broker_records{kind=\"cluster\"} 1\n"), "{metrics}");
    assert!(metrics.contains("process_resident_memory_bytes{} "), "{metrics}");
    assert!(raw_get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
    assert!(raw_get(addr, "/nothing").await.starts_with("HTTP/1.1 404"));
    // Garbage, an oversized head and a half request on the metrics port: each connection gets
    // an error or is closed, and the port keeps answering.
    {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        for junk in [
            vec![0xffu8; 512],
            format!("GET /{} HTTP/1.1\r\n", "a".repeat(70_000)).into_bytes(),
            b"GET /me".to_vec(),
        ] {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let _ = s.write_all(&junk).await;
            let _ = s.shutdown().await;
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
            assert!(!String::from_utf8_lossy(&out).contains("HTTP/1.1 200"), "junk answered 200");
        }
    }
    assert!(raw_get(addr, "/metrics").await.contains("causeway_broker_ready{} 1\n"));
    task.abort();
}

async fn endpoints_expire_without_heartbeats(mut f: Fixture) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let broker = Broker::with_lease(f.take(), Duration::from_millis(600)).await.unwrap();
    let admin = BrokerClient::new(url).with_token(broker.issue(&Identity::Admin).await.unwrap());
    tokio::spawn(causeway_broker::run(listener, broker.clone(), std::future::pending()));
    tokio::spawn(broker.run_expiry());
    admin.put_cluster(&cluster("east", "10.1.0.0/16", "10.101.0.0/16")).await.unwrap();
    admin.put_endpoint(&endpoint("east", "gw-1")).await.unwrap();
    let rv = admin.list().await.unwrap().resource_version;
    // Heartbeats (unchanged PUTs) keep it alive and produce no events.
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        admin.put_endpoint(&endpoint("east", "gw-1")).await.unwrap();
    }
    assert_eq!(admin.list().await.unwrap().items.len(), 2, "alive while heartbeating");
    assert_eq!(admin.list().await.unwrap().resource_version, rv, "heartbeats are not changes");
    // The gateway stops: the record goes, and watchers see it go.
    let w = admin.watch(rv, Duration::from_secs(5)).await.unwrap();
    assert_eq!(w.events.len(), 1);
    assert_eq!(w.events[0].kind, EventType::Delete);
    assert_eq!(w.events[0].object.record.key(), "endpoints/east/gw-1");
    let left: Vec<_> = admin.list().await.unwrap().items.into_iter().map(|o| o.record.key()).collect();
    assert_eq!(left, vec!["clusters/east"], "the cluster record itself does not expire");
}

async fn a_watcher_behind_the_history_is_told_to_relist(mut f: Fixture) {
    let (client, _stop) = start(f.take()).await;
    let rv = {
        client.put_cluster(&cluster("east", "10.1.0.0/16", "10.101.0.0/16")).await.unwrap();
        client.list().await.unwrap().resource_version
    };
    for g in 2..=20u64 {
        let mut c = cluster("east", "10.1.0.0/16", "10.101.0.0/16");
        c.generation = g;
        client.put_cluster(&c).await.unwrap();
    }
    let err = client.watch(rv, Duration::from_secs(1)).await.unwrap_err();
    assert_eq!(err.status(), Some(410));
    assert!(err.to_string().contains("list again"), "{err}");
    // Re-listing and watching from there works.
    let list = client.list().await.unwrap();
    assert_eq!(list.items[0].record.generation(), 20);
    assert!(client.watch(list.resource_version, Duration::from_secs(1)).await.unwrap().events.is_empty());
}

fn web_policy() -> causeway_broker_api::PolicyRecord {
    serde_json::from_value(serde_json::json!({
        "name": "web", "priority": 10,
        "from": {"cluster": "east"}, "to": {"cluster": "west", "cidrs": ["10.2.5.0/24"]},
        "protocol": "tcp", "ports": ["80", "8000-8080"], "action": "allow", "generation": 1
    }))
    .unwrap()
}

async fn policy_is_admin_only_and_validated(mut f: Fixture) {
    let (admin, broker, _stop) = start_with(f.take()).await;
    let joiner = admin.with_token(broker.issue(&Identity::Join).await.unwrap());
    let east =
        admin.with_token(joiner.join(&cluster("east", "10.1.0.0/16", "10.101.0.0/16")).await.unwrap().token);
    admin.put_policy(&web_policy()).await.unwrap();
    admin
        .put_policy_default(&causeway_broker_api::PolicyDefaultRecord {
            action: causeway_broker_api::PolicyAction::Deny,
            generation: 1,
        })
        .await
        .unwrap();
    let before = admin.list().await.unwrap();
    assert!(before.items.iter().any(|o| o.record == Record::Policy(web_policy())));

    // A cluster's own credential may read policy but not write it.
    let mut mine = web_policy();
    mine.name = "mine".into();
    let err = east.put_policy(&mine).await.unwrap_err();
    assert_eq!(err.status(), Some(403), "{err}");
    assert_eq!(east.delete_policy("web").await.unwrap_err().status(), Some(403));
    let d = causeway_broker_api::PolicyDefaultRecord {
        action: causeway_broker_api::PolicyAction::Allow,
        generation: 2,
    };
    assert_eq!(east.put_policy_default(&d).await.unwrap_err().status(), Some(403));

    // Bad rules: clear 400s naming the problem.
    let mut bad = web_policy();
    bad.protocol = causeway_broker_api::PolicyProtocol::Icmp;
    let err = admin.put_policy(&bad).await.unwrap_err();
    assert_eq!(err.status(), Some(400));
    assert!(err.to_string().contains("only TCP and UDP rules have ports"), "{err}");
    let mut bad = web_policy();
    bad.ports = vec!["90-80".parse().unwrap()];
    assert!(admin.put_policy(&bad).await.unwrap_err().to_string().contains("90-80"));
    let mut bad = web_policy();
    bad.to.cidrs = vec!["fd00::/64".parse().unwrap()];
    assert!(admin.put_policy(&bad).await.unwrap_err().to_string().contains("IPv6"));
    let mut bad = web_policy();
    bad.name = "Not_A_Label".into();
    assert_eq!(admin.put_policy(&bad).await.unwrap_err().status(), Some(400));
    let mut stale = web_policy();
    stale.generation = 0;
    stale.action = causeway_broker_api::PolicyAction::Deny;
    assert_eq!(admin.put_policy(&stale).await.unwrap_err().status(), Some(409), "generations never go back");
    assert_eq!(admin.list().await.unwrap(), before, "nothing refused changed anything");

    admin.delete_policy("web").await.unwrap();
    assert_eq!(admin.delete_policy("web").await.unwrap_err().status(), Some(404));
}

fn service(cluster: &str, ip: &str) -> causeway_broker_api::ServiceExportRecord {
    causeway_broker_api::ServiceExportRecord {
        cluster_id: cluster.into(),
        namespace: "shop".into(),
        name: "cart".into(),
        ips: vec![ip.parse().unwrap()],
        ports: vec![causeway_broker_api::ServicePort {
            name: Some("http".into()),
            port: 80,
            protocol: "TCP".into(),
        }],
        service_type: Default::default(),
        endpoints: Vec::new(),
        ready_endpoints: None,
        source: causeway_broker_api::ExportSource::Cli,
        generation: 1,
    }
}

async fn services_and_overlap_mode(mut f: Fixture) {
    let (admin, broker, _stop) = start_with(f.take()).await;
    let joiner = admin.with_token(broker.issue(&Identity::Join).await.unwrap());
    let east =
        admin.with_token(joiner.join(&cluster("east", "10.1.0.0/16", "10.101.0.0/16")).await.unwrap().token);
    let west =
        admin.with_token(joiner.join(&cluster("west", "10.2.0.0/16", "10.102.0.0/16")).await.unwrap().token);

    // Services: only the owner publishes, only with its own service IPs.
    east.put_service(&service("east", "10.101.0.10")).await.unwrap();
    let err = east.put_service(&service("east", "10.200.0.1")).await.unwrap_err();
    assert_eq!(err.status(), Some(400));
    assert!(err.to_string().contains("outside cluster \"east\"'s service CIDRs"), "{err}");
    assert_eq!(west.put_service(&service("east", "10.101.0.11")).await.unwrap_err().status(), Some(403));
    assert_eq!(admin.put_service(&service("north", "10.103.0.1")).await.unwrap_err().status(), Some(409));
    let mut bad = service("east", "10.101.0.12");
    bad.ports[0].protocol = "ICMP".into();
    assert!(east.put_service(&bad).await.unwrap_err().to_string().contains("not TCP, UDP or SCTP"));

    // Overlap mode off: an overlapping cluster is refused.
    let clash = joiner.join(&cluster("south", "10.1.0.0/16", "10.104.0.0/16")).await.unwrap_err();
    assert_eq!(clash.status(), Some(409));
    // Turning it on gives every cluster a global prefix per CIDR, in the same revision: from
    // 242.0.0.0/8, of the CIDR's length.
    let on =
        causeway_broker_api::ClusterSetRecord { overlap_mode: true, generation: 1, ..Default::default() };
    assert_eq!(east.put_cluster_set(&on).await.unwrap_err().status(), Some(403), "admin only");
    admin.put_cluster_set(&on).await.unwrap();
    let stored = |id: &'static str| {
        let admin = admin.clone();
        async move {
            admin
                .list()
                .await
                .unwrap()
                .items
                .into_iter()
                .find_map(|o| match o.record {
                    Record::Cluster(c) if c.cluster_id == id => Some(c),
                    _ => None,
                })
                .unwrap()
        }
    };
    let east_rec = stored("east").await;
    assert_eq!(east_rec.global_cidrs.len(), 2, "{east_rec:?}");
    let pool: ipnetwork::IpNetwork = "242.0.0.0/8".parse().unwrap();
    for g in &east_rec.global_cidrs {
        assert_eq!(g.global.prefix(), g.cidr.prefix(), "{g:?}");
        assert!(pool.contains(g.global.network()), "{g:?}");
    }
    // Now pod CIDRs may overlap: south, with east's very CIDRs, joins and gets its own.
    joiner.join(&cluster("south", "10.1.0.0/16", "10.101.0.0/16")).await.unwrap();
    let (south, west_rec) = (stored("south").await, stored("west").await);
    for g in south.globals() {
        assert!(east_rec.globals().chain(west_rec.globals()).all(|e| !overlaps(g, e)), "{g}");
    }
    // Naming a global prefix another cluster holds: 409 naming the owner. One of another
    // length than its CIDR: 400.
    let east_pods = east_rec.global_of(&"10.1.0.0/16".parse().unwrap()).unwrap();
    let mut north = cluster("north", "10.1.0.0/16", "10.101.0.0/16");
    north.global_cidrs = vec![GlobalCidr { cidr: north.pod_cidrs[0], global: east_pods }];
    let err = joiner.join(&north).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(
        err.to_string().contains(&format!("overlaps global prefix {east_pods} of cluster \"east\"")),
        "{err}"
    );
    north.global_cidrs =
        vec![GlobalCidr { cidr: north.pod_cidrs[0], global: "242.99.0.0/24".parse().unwrap() }];
    let err = joiner.join(&north).await.unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
    assert!(err.to_string().contains("the length of the CIDR it stands for"), "{err}");
    // A named one in the private pools, then a cluster whose real CIDR lies on it: 409.
    north.global_cidrs =
        vec![GlobalCidr { cidr: north.pod_cidrs[0], global: "10.60.0.0/16".parse().unwrap() }];
    joiner.join(&north).await.unwrap();
    let err = joiner.join(&cluster("late", "10.60.0.0/16", "10.160.0.0/16")).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains("overlaps global prefix 10.60.0.0/16 of cluster \"north\""), "{err}");
    // A later write that leaves the prefixes out (a gateway registering again) keeps them.
    let mut again = cluster("east", "10.1.0.0/16", "10.101.0.0/16");
    again.generation = 2;
    let back = east.put_cluster(&again).await.unwrap();
    assert!(
        matches!(&back.record, Record::Cluster(c) if c.global_cidrs == east_rec.global_cidrs),
        "{back:?}"
    );
    assert_eq!(stored("east").await.global_cidrs, east_rec.global_cidrs);
    // In overlap mode services are exported with global IPs.
    let east_services = east_rec.global_of(&"10.101.0.0/16".parse().unwrap()).unwrap();
    let global_ip =
        GlobalCidr::map(&"10.101.0.0/16".parse().unwrap(), &east_services, "10.101.0.10".parse().unwrap())
            .unwrap();
    let mut svc = service("east", &global_ip.to_string());
    svc.generation = 2;
    east.put_service(&svc).await.unwrap();
    // An exporter that knows only the real ClusterIP (Kubernetes' does) has it stored at the
    // global address: what the other clusters reach.
    let mut real = service("east", "10.101.0.10");
    real.generation = 3;
    let stored_svc = east.put_service(&real).await.unwrap();
    assert!(
        matches!(&stored_svc.record, Record::ServiceExport(s) if s.ips == vec![global_ip]),
        "{stored_svc:?}"
    );
    // Overlap mode cannot be switched off while clusters overlap.
    let off =
        causeway_broker_api::ClusterSetRecord { overlap_mode: false, generation: 2, ..Default::default() };
    assert_eq!(admin.put_cluster_set(&off).await.unwrap_err().status(), Some(409));

    // Leaving takes the cluster's services along.
    east.delete_cluster("east").await.unwrap();
    let left = admin.list().await.unwrap();
    assert!(left.items.iter().all(|o| !matches!(o.record, Record::ServiceExport(_))), "{left:?}");
}

#[tokio::test]
async fn bootstrap_credentials_register_by_hash_and_bad_ones_are_refused() {
    let broker = Broker::new(MemStore::default()).await.unwrap();
    let token = causeway_broker::auth::new_token();
    let hash = causeway_broker::auth::hash(&token.0);
    broker.bootstrap(&hash, &Identity::Admin).await.unwrap();
    // Idempotent: a restarted broker registers the same file again.
    broker.bootstrap(&hash.to_uppercase(), &Identity::Admin).await.unwrap();
    assert_eq!(broker.authenticate(Some(&token.0)).await.unwrap(), Identity::Admin);
    let err = broker.bootstrap("not-a-hash", &Identity::Join).await.unwrap_err();
    assert!(err.to_string().contains("SHA-256"), "{err}");
    // Nothing stored was lost on the way.
    assert_eq!(broker.authenticate(Some(&token.0)).await.unwrap(), Identity::Admin);
    assert!(broker.authenticate(Some("cw1_other")).await.is_err());
}

/// What a malicious member (or the holder of a join token) tries first: claim address space
/// that is not its own. Every attempt gets a 4xx saying why, and the store is unchanged.
async fn hostile_claims_are_refused_and_lose_nothing(mut f: Fixture) {
    let (admin, broker, _stop) = start_with(f.take()).await;
    broker.protect_addresses(["172.31.0.2".parse().unwrap()]);
    let joiner = admin.with_token(broker.issue(&Identity::Join).await.unwrap());
    let east =
        admin.with_token(joiner.join(&cluster("east", "10.1.0.0/16", "10.101.0.0/16")).await.unwrap().token);
    east.put_endpoint(&endpoint("east", "gw-1")).await.unwrap();
    let x = admin.with_token(joiner.join(&cluster("x", "10.5.0.0/16", "10.105.0.0/16")).await.unwrap().token);
    let before = admin.list().await.unwrap();

    // Through join (a new cluster) and through a PUT of an existing one: the same answers.
    let mut refused = 0;
    for (pod, status, why) in [
        ("128.0.0.0/1", 400, "broader than /8"),
        ("0.0.0.0/0", 400, "broader than /8"),
        ("169.254.169.254/32", 400, "cloud metadata"),
        ("224.0.0.0/4", 400, "multicast"),
        ("::/0", 400, "broader than /32"),
        ("8.8.8.0/24", 403, "outside the address pools"),
        ("172.31.0.8/29", 409, "gateway \"gw-1\" of cluster \"east\""),
        ("172.31.0.0/30", 409, "the broker's address 172.31.0.2"),
    ] {
        let err = joiner.join(&cluster("evil", pod, "10.150.0.0/16")).await.unwrap_err();
        assert_eq!(err.status(), Some(status), "join {pod}: {err}");
        assert!(err.to_string().contains(why), "join {pod}: {err}");
        let mut takeover = cluster("x", "10.5.0.0/16", "10.105.0.0/16");
        takeover.pod_cidrs.push(pod.parse().unwrap());
        takeover.generation = 2;
        let err = x.put_cluster(&takeover).await.unwrap_err();
        assert_eq!(err.status(), Some(status), "put {pod}: {err}");
        assert!(err.to_string().contains(why), "put {pod}: {err}");
        refused += 2;
    }
    assert_eq!(refused, 16);

    // Endpoints: an address inside another cluster's CIDRs, a key another cluster uses, a
    // health-check address outside the cluster's own pod CIDRs, a special address.
    let mut e = endpoint("x", "gw-x");
    e.private_ips = vec!["10.1.0.1".parse().unwrap()];
    let err = x.put_endpoint(&e).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains("10.1.0.1 lies in 10.1.0.0/16 of cluster \"east\""), "{err}");
    let mut e = endpoint("x", "gw-x");
    e.public_key = key_of("east", "gw-1");
    let err = x.put_endpoint(&e).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains("already used by gateway \"gw-1\" of cluster \"east\""), "{err}");
    let mut e = endpoint("x", "gw-x");
    e.health_check_ip = Some("10.1.0.0".parse().unwrap());
    let err = x.put_endpoint(&e).await.unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
    assert!(
        err.to_string().contains("healthCheckIp: 10.1.0.0 is outside cluster \"x\"'s pod CIDRs"),
        "{err}"
    );
    let mut e = endpoint("x", "gw-x");
    e.public_ips = vec!["169.254.169.254".parse().unwrap()];
    assert_eq!(x.put_endpoint(&e).await.unwrap_err().status(), Some(400));
    // Its connection summary: a name that is no cluster id, its own cluster, a repeat, a list
    // longer than any cluster set.
    for (reachable, why) in [
        (vec!["East!".to_owned()], "reachable: \"East!\" is not a DNS-1123 label"),
        (vec!["x".to_owned()], "reachable: \"x\" is listed twice or is the gateway's own cluster"),
        (vec!["east".to_owned(), "east".to_owned()], "listed twice"),
        ((0..1025).map(|i| format!("c{i}")).collect(), "reachable: 1025 entries, at most 1024"),
    ] {
        let mut e = endpoint("x", "gw-x");
        e.reachable = Some(reachable);
        let err = x.put_endpoint(&e).await.unwrap_err();
        assert_eq!(err.status(), Some(400), "{err}");
        assert!(err.to_string().contains(why), "{why}: {err}");
    }
    // Its candidates: an address inside another cluster's prefixes (which would pull that
    // cluster's traffic to this gateway's peers' guard lists), a special address, port 0, too
    // many of them.
    let reflexive = |a: &str| causeway_broker_api::records::Candidate {
        address: a.parse().unwrap(),
        kind: causeway_broker_api::records::CandidateKind::Reflexive,
    };
    for (candidates, status, why) in [
        (vec![reflexive("10.1.0.9:51820")], 409, "10.1.0.9 lies in 10.1.0.0/16 of cluster \"east\""),
        (
            vec![reflexive("169.254.169.254:80")],
            400,
            "candidates: 169.254.169.254 is not a usable unicast address",
        ),
        (vec![reflexive("203.0.113.9:0")], 400, "port: 0 is not a valid UDP port"),
        (
            (0..17).map(|i| reflexive(&format!("203.0.113.9:{}", 1000 + i))).collect(),
            400,
            "candidates: 17 entries, at most 16",
        ),
    ] {
        let mut e = endpoint("x", "gw-x");
        e.candidates = candidates;
        let err = x.put_endpoint(&e).await.unwrap_err();
        assert_eq!(err.status(), Some(status), "{err}");
        assert!(err.to_string().contains(why), "{why}: {err}");
    }

    assert_eq!(admin.list().await.unwrap(), before, "no refused claim changed anything");
    // The honest versions go through.
    let mut e = endpoint("x", "gw-x");
    e.health_check_ip = Some("10.5.0.0".parse().unwrap());
    e.reachable = Some(vec!["east".into()]);
    e.candidates = vec![reflexive("203.0.113.9:40001")];
    x.put_endpoint(&e).await.unwrap();
    let stored = admin.list().await.unwrap().items.into_iter().find_map(|o| match o.record {
        Record::Endpoint(e) if e.hostname == "gw-x" => Some(e),
        _ => None,
    });
    let stored = stored.unwrap();
    assert_eq!(stored.reachable, Some(vec!["east".to_owned()]));
    assert_eq!(stored.candidates, vec![reflexive("203.0.113.9:40001")]);
}

/// Pools and quotas are the admin's to set; members are held to them, and a change that
/// would strand a stored cluster is refused.
async fn pools_and_quotas_are_the_admins(mut f: Fixture) {
    let (admin, broker, _stop) = start_with(f.take()).await;
    let joiner = admin.with_token(broker.issue(&Identity::Join).await.unwrap());
    let east =
        admin.with_token(joiner.join(&cluster("east", "10.1.0.0/16", "10.101.0.0/16")).await.unwrap().token);
    let mut settings = causeway_broker_api::ClusterSetRecord { generation: 1, ..Default::default() };
    settings.quotas.max_endpoints = 2;
    settings.quotas.max_services = 1;
    assert_eq!(east.put_cluster_set(&settings).await.unwrap_err().status(), Some(403), "admin only");
    admin.put_cluster_set(&settings).await.unwrap();

    // The (N+1)-th endpoint: 409; updating one of the N is fine.
    east.put_endpoint(&endpoint("east", "gw-1")).await.unwrap();
    east.put_endpoint(&endpoint("east", "gw-2")).await.unwrap();
    let before = admin.list().await.unwrap();
    let err = east.put_endpoint(&endpoint("east", "gw-3")).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains("already has 2 gateway endpoints"), "{err}");
    let mut update = endpoint("east", "gw-2");
    update.generation = 2;
    update.priority = 5;
    east.put_endpoint(&update).await.unwrap();
    // Services likewise.
    east.put_service(&service("east", "10.101.0.10")).await.unwrap();
    let mut other = service("east", "10.101.0.11");
    other.name = "till".into();
    let err = east.put_service(&other).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains("already has 1 exported services"), "{err}");
    let after = admin.list().await.unwrap();
    // The first service landed with its import (the update replaced a record).
    assert_eq!(after.items.len(), before.items.len() + 2, "only the update and the first service landed");

    // Narrower pools: new clusters must fit; a change that leaves out a stored cluster is refused.
    settings.generation = 2;
    settings.pools.pod_cidrs = vec!["10.0.0.0/12".parse().unwrap()];
    settings.pools.service_cidrs = vec!["10.96.0.0/11".parse().unwrap()];
    admin.put_cluster_set(&settings).await.unwrap();
    let err = joiner.join(&cluster("west", "192.168.0.0/16", "10.102.0.0/16")).await.unwrap_err();
    assert_eq!(err.status(), Some(403), "{err}");
    assert!(err.to_string().contains("podCidrs: 192.168.0.0/16 is outside"), "{err}");
    joiner.join(&cluster("west", "10.2.0.0/16", "10.102.0.0/16")).await.unwrap();
    let mut strand = settings.clone();
    strand.generation = 3;
    strand.pools.pod_cidrs = vec!["10.2.0.0/16".parse().unwrap()];
    let err = admin.put_cluster_set(&strand).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains("leave out cluster \"east\""), "{err}");
}

/// Join tokens with a TTL or for one use, revocable by id; rotation with an overlap window;
/// a re-join by the same caller; read-only credentials for route agents.
async fn credentials_expire_are_spent_revoked_rotated_and_read_only(mut f: Fixture) {
    use causeway_broker_api::{CredentialKind, IssueRequest};
    let (admin, broker, _stop) = start_with(f.take()).await;
    let issue = |kind, ttl_seconds, single_use| {
        let admin = admin.clone();
        async move { admin.issue(&IssueRequest { kind, ttl_seconds, single_use }).await.unwrap() }
    };

    // Single use: the second registration with the same token is refused (401).
    let once = issue(CredentialKind::Join, None, true).await;
    let joiner = admin.with_token(once.token.clone());
    let east =
        admin.with_token(joiner.join(&cluster("east", "10.1.0.0/16", "10.101.0.0/16")).await.unwrap().token);
    let err = joiner.join(&cluster("west", "10.2.0.0/16", "10.102.0.0/16")).await.unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");
    // Only the admin issues admin and join credentials; nothing issues cluster ones here.
    let req = IssueRequest { kind: CredentialKind::Join, ttl_seconds: None, single_use: false };
    assert_eq!(east.issue(&req).await.unwrap_err().status(), Some(403));
    let bad = IssueRequest { kind: CredentialKind::Cluster, ttl_seconds: None, single_use: false };
    assert_eq!(admin.issue(&bad).await.unwrap_err().status(), Some(400));
    let bad = IssueRequest { kind: CredentialKind::Admin, ttl_seconds: None, single_use: true };
    assert_eq!(admin.issue(&bad).await.unwrap_err().status(), Some(400));

    // Revocable by id: listed without its token, then gone, then 401.
    let multi = issue(CredentialKind::Join, None, false).await;
    assert_eq!(multi.id.len(), 12);
    let listed = admin.list_credentials().await.unwrap();
    assert!(listed.iter().any(|c| c.id == multi.id && c.kind == CredentialKind::Join && !c.single_use));
    assert!(!listed.iter().any(|c| c.id == once.id), "the spent token is gone");
    let text = serde_json::to_string(&listed).unwrap();
    assert!(!text.contains(&multi.token.0) && !text.contains("cw1_"), "no token in the list");
    assert_eq!(east.list_credentials().await.unwrap_err().status(), Some(403));
    let joiner = admin.with_token(multi.token.clone());
    // A re-join by the same caller with the same record gets a fresh credential; a different
    // record, or another caller, gets 409.
    let west_rec = cluster("west", "10.2.0.0/16", "10.102.0.0/16");
    let first = joiner.join(&west_rec).await.unwrap();
    let again = joiner.join(&west_rec).await.unwrap();
    assert_eq!(again.object, first.object);
    assert_ne!(again.token, first.token);
    admin.with_token(first.token.clone()).list().await.unwrap();
    admin.with_token(again.token.clone()).list().await.unwrap();
    let mut changed = west_rec.clone();
    changed.service_cidrs = vec!["10.103.0.0/16".parse().unwrap()];
    assert_eq!(joiner.join(&changed).await.unwrap_err().status(), Some(409));
    let other = admin.with_token(issue(CredentialKind::Join, None, false).await.token);
    let err = other.join(&west_rec).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains("already registered"), "{err}");
    assert_eq!(admin.revoke_credential(&multi.id).await.unwrap()["revoked"], 1);
    assert_eq!(
        joiner.join(&cluster("north", "10.3.0.0/16", "10.103.0.0/16")).await.unwrap_err().status(),
        Some(401)
    );
    assert_eq!(admin.revoke_credential(&multi.id).await.unwrap_err().status(), Some(404));
    assert_eq!(admin.revoke_credential("not-an-id").await.unwrap_err().status(), Some(400));
    // The admin cannot revoke the credential it is using (it would lock itself out).
    let me = admin.list_credentials().await.unwrap();
    let mine: Vec<_> = me.iter().filter(|c| c.kind == CredentialKind::Admin).collect();
    assert_eq!(mine.len(), 1);
    assert_eq!(admin.revoke_credential(&mine[0].id).await.unwrap_err().status(), Some(400));

    // Read-only credentials: read and watch, write nothing, issue nothing.
    let reader = admin.with_token(east.issue_reader("east").await.unwrap().token);
    let rv = reader.list().await.unwrap().resource_version;
    reader.watch(rv, Duration::from_secs(1)).await.unwrap();
    let mut hijack = cluster("east", "10.1.0.0/16", "10.101.0.0/16");
    hijack.generation = 7;
    assert_eq!(reader.put_cluster(&hijack).await.unwrap_err().status(), Some(403));
    assert_eq!(reader.put_endpoint(&endpoint("east", "gw-r")).await.unwrap_err().status(), Some(403));
    assert_eq!(reader.issue_reader("east").await.unwrap_err().status(), Some(403));
    assert_eq!(reader.rotate("east").await.unwrap_err().status(), Some(403));
    assert_eq!(
        reader.join(&cluster("south", "10.4.0.0/16", "10.104.0.0/16")).await.unwrap_err().status(),
        Some(403)
    );
    let west = admin.with_token(first.token.clone());
    assert_eq!(west.issue_reader("east").await.unwrap_err().status(), Some(403));

    // TTL and rotation overlap: working now, 401 once the window is over.
    let short = admin.with_token(issue(CredentialKind::Join, Some(3), false).await.token);
    let rotated = east.rotate_with_overlap("east", Duration::from_secs(3)).await.unwrap();
    assert!(rotated.old_valid_until.is_some());
    east.list().await.unwrap();
    let east_new = admin.with_token(rotated.token);
    east_new.list().await.unwrap();
    // Rotating west with no overlap: the old ones stop at once.
    let west_new = admin.with_token(west.rotate("west").await.unwrap().token);
    assert_eq!(west.list().await.unwrap_err().status(), Some(401));
    assert_eq!(admin.with_token(again.token.clone()).list().await.unwrap_err().status(), Some(401));
    west_new.list().await.unwrap();
    tokio::time::sleep(Duration::from_millis(4_100)).await;
    assert_eq!(east.list().await.unwrap_err().status(), Some(401), "the overlap is over");
    assert_eq!(
        short.join(&cluster("south", "10.4.0.0/16", "10.104.0.0/16")).await.unwrap_err().status(),
        Some(401),
        "the TTL ran out"
    );
    east_new.list().await.unwrap();
    // Expired credentials are deleted by the housekeeping, and revoking the cluster takes its
    // readers along.
    assert_eq!(
        broker.prune_credentials().await.unwrap(),
        2,
        "east's old credential and the short join token"
    );
    assert_eq!(admin.revoke("east").await.unwrap()["revoked"], 2, "the new credential and the reader");
    assert_eq!(reader.list().await.unwrap_err().status(), Some(401));
}

/// A watcher 2,500 changes behind gets them in pages of at most 1,000, in order, none missed,
/// each page telling it to come back at once.
async fn a_watcher_far_behind_gets_pages_and_misses_nothing(mut f: Fixture) {
    let (client, _stop) = start(f.take()).await;
    client.put_cluster(&cluster("east", "10.1.0.0/16", "10.101.0.0/16")).await.unwrap();
    let since = client.list().await.unwrap().resource_version;
    for g in 2..=2_501u64 {
        let mut c = cluster("east", "10.1.0.0/16", "10.101.0.0/16");
        c.generation = g;
        client.put_cluster(&c).await.unwrap();
    }
    let mut rv = since;
    let mut sizes = Vec::new();
    let mut gens = Vec::new();
    loop {
        let w = client.watch(rv, Duration::from_secs(1)).await.unwrap();
        sizes.push(w.events.len());
        gens.extend(w.events.iter().map(|e| e.object.record.generation()));
        rv = w.resource_version;
        if !w.more {
            break;
        }
    }
    assert_eq!(sizes, vec![1_000, 1_000, 500]);
    assert_eq!(gens, (2..=2_501).collect::<Vec<_>>());
    assert_eq!(rv, since + 2_500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_writing_too_fast_gets_429_and_the_others_do_not() {
    let (admin, broker, _stop) = start_with(MemStore::default()).await;
    broker.set_write_rate(1, 20);
    let joiner = admin.with_token(broker.issue(&Identity::Join).await.unwrap());
    let east_token = joiner.join(&cluster("east", "10.1.0.0/16", "10.101.0.0/16")).await.unwrap().token;
    let east = admin.with_token(east_token.clone());
    let west =
        admin.with_token(joiner.join(&cluster("west", "10.2.0.0/16", "10.102.0.0/16")).await.unwrap().token);
    let mut statuses = Vec::new();
    let started = std::time::Instant::now();
    for _ in 0..30 {
        statuses.push(
            east.put_endpoint(&endpoint("east", "gw-1")).await.map_err(|e| (e.status(), e.to_string())),
        );
    }
    // The burst, plus one write per whole second the 30 took (on a quiet machine: none).
    let refilled = usize::try_from(started.elapsed().as_secs()).unwrap();
    let ok = statuses.iter().filter(|r| r.is_ok()).count();
    assert!((20..=20 + refilled).contains(&ok), "the burst of 20 and {refilled} refill(s): {statuses:?}");
    assert!(statuses[..20].iter().all(Result::is_ok));
    let refused: Vec<_> = statuses.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(refused.len(), 30 - ok);
    for (status, msg) in refused {
        assert_eq!(*status, Some(429));
        assert!(msg.contains("cluster \"east\" writes faster than 1/s (burst 20)"), "{msg}");
    }
    // The answer says when to come back.
    let resp = reqwest::Client::new()
        .put(format!("{}/v1/clusters/east/endpoints/gw-1", east.base_url()))
        .bearer_auth(&east_token.0)
        .json(&endpoint("east", "gw-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    // Reads are not writes; other members and the admin have their own budgets.
    east.list().await.unwrap();
    west.put_endpoint(&endpoint("west", "gw-1")).await.unwrap();
    for g in 2..30 {
        let mut c = cluster("north", "10.3.0.0/16", "10.103.0.0/16");
        c.generation = g;
        admin.put_cluster(&c).await.unwrap();
    }
    // A second later the bucket has refilled by one.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    east.put_endpoint(&endpoint("east", "gw-1")).await.unwrap();
}

fn import_of(
    list: &causeway_broker_api::ListResponse,
    ns: &str,
    name: &str,
) -> Option<causeway_broker_api::ServiceImportRecord> {
    list.items.iter().find_map(|o| match &o.record {
        causeway_broker_api::Record::ServiceImport(i) if i.namespace == ns && i.name == name => {
            Some(i.clone())
        }
        _ => None,
    })
}

/// Exports of one name merge into one import, in the same revision as the export that
/// changed it: a ClusterSetIP from the pool, the union of ports, the younger export's clashing
/// port in conflict. Clients cannot write imports; hostile exports are refused and lose
/// nothing; the pool cannot be moved from under a held ClusterSetIP.
async fn exports_merge_into_imports_with_a_clusterset_ip(mut f: Fixture) {
    use causeway_broker_api::{Record, ServiceEndpoint, ServicePort, ServiceType};
    let (admin, broker, _stop) = start_with(f.take()).await;
    let joiner = admin.with_token(broker.issue(&Identity::Join).await.unwrap());
    let east =
        admin.with_token(joiner.join(&cluster("east", "10.1.0.0/16", "10.101.0.0/16")).await.unwrap().token);
    let west =
        admin.with_token(joiner.join(&cluster("west", "10.2.0.0/16", "10.102.0.0/16")).await.unwrap().token);

    let put = east.put_service(&service("east", "10.101.0.10")).await.unwrap();
    let list = admin.list().await.unwrap();
    let import = import_of(&list, "shop", "cart").expect("an import for shop/cart");
    let stored = list.items.iter().find(|o| matches!(&o.record, Record::ServiceImport(_))).unwrap();
    assert_eq!(stored.resource_version, put.resource_version, "the import lands with the export");
    assert_eq!(import.service_type, ServiceType::ClusterSetIP);
    assert_eq!(import.ips.len(), 1);
    let vip = import.ips[0];
    assert!(causeway_broker_api::default_cluster_set_ip_pool().contains(vip), "{vip}");
    assert_eq!(import.clusters.len(), 1);

    // West exports the same name with another port and a clashing one: union, conflict on
    // west, the ClusterSetIP unchanged.
    let mut w = service("west", "10.102.0.10");
    w.ports = vec![
        ServicePort { name: Some("http".into()), port: 8080, protocol: "TCP".into() },
        ServicePort { name: Some("admin".into()), port: 9090, protocol: "TCP".into() },
    ];
    west.put_service(&w).await.unwrap();
    let import = import_of(&admin.list().await.unwrap(), "shop", "cart").unwrap();
    assert_eq!(import.ips, vec![vip]);
    assert_eq!(import.ports.iter().map(|p| p.port).collect::<Vec<_>>(), vec![80, 9090]);
    assert_eq!(import.clusters[0].cluster_id, "east");
    assert_eq!(import.clusters[1].cluster_id, "west");
    assert_eq!(
        import.clusters[1].conflict.as_deref(),
        Some(
            r#"port 8080/TCP ("http") conflicts with 80/TCP ("http") of the older export of cluster "east""#
        )
    );
    assert_eq!(import.clusters[1].ports.iter().map(|p| p.port).collect::<Vec<_>>(), vec![9090]);

    // Hostile or malformed exports: refused, nothing stored changes.
    let before = admin.list().await.unwrap().items;
    let mut twice = service("west", "10.102.0.10");
    twice.ports.push(ServicePort { name: Some("other".into()), port: 80, protocol: "TCP".into() });
    let mut same_name = service("west", "10.102.0.10");
    same_name.ports.push(ServicePort { name: Some("http".into()), port: 81, protocol: "TCP".into() });
    let mut not_label = service("west", "10.102.0.10");
    not_label.name = "Cart.v2".into();
    let mut headless_with_vip = service("west", "10.102.0.10");
    headless_with_vip.service_type = ServiceType::Headless;
    let mut foreign_pod = service("west", "10.102.0.10");
    foreign_pod.service_type = ServiceType::Headless;
    foreign_pod.ips.clear();
    foreign_pod.endpoints = vec![ServiceEndpoint { ip: "10.1.0.5".parse().unwrap(), hostname: None }];
    for (bad, why) in [
        (&twice, "80/TCP is listed twice"),
        (&same_name, r#"the name "http" is given to two ports"#),
        (&not_label, "is not a DNS-1123 label"),
        (&headless_with_vip, "a headless export has no virtual IP"),
        (&foreign_pod, "10.1.0.5 is outside cluster \"west\"'s pod CIDRs"),
    ] {
        let err = west.put_service(bad).await.unwrap_err();
        assert_eq!(err.status(), Some(400), "{err}");
        assert!(err.to_string().contains(why), "{why}: {err}");
    }
    assert_eq!(admin.list().await.unwrap().items, before, "nothing stored changed");
    // No route writes an import: the broker alone does.
    for path in ["/v1/imports/shop/cart", "/v1/clusters/east/imports/shop/cart"] {
        let resp = reqwest::Client::new()
            .put(format!("{}{path}", admin.base_url()))
            .json(&Record::ServiceImport(import.clone()))
            .send()
            .await
            .unwrap();
        assert!(matches!(resp.status().as_u16(), 404 | 405), "{path}: {}", resp.status());
    }

    // The pool cannot move from under the held ClusterSetIP; a bad pool is refused.
    let mut settings = causeway_broker_api::ClusterSetRecord { generation: 1, ..Default::default() };
    settings.cluster_set_ip_pool = "241.1.0.0/16".parse().unwrap();
    let err = admin.put_cluster_set(&settings).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains(&format!("leaves out {vip}, the ClusterSetIP of shop/cart")), "{err}");
    for (pool, why) in
        [("127.0.0.0/16", "loopback"), ("2001:db8::/64", "IPv6"), ("241.0.0.0/30", "between /8 and /28")]
    {
        settings.cluster_set_ip_pool = pool.parse().unwrap();
        let err = admin.put_cluster_set(&settings).await.unwrap_err();
        assert_eq!(err.status(), Some(400), "{pool}: {err}");
        assert!(err.to_string().contains(why), "{pool}: {err}");
    }

    // Unexport east: west is the oldest now, its port wins, the ClusterSetIP stays.
    east.delete_service("east", "shop", "cart").await.unwrap();
    let import = import_of(&admin.list().await.unwrap(), "shop", "cart").unwrap();
    assert_eq!(import.ips, vec![vip]);
    assert_eq!(import.clusters.len(), 1);
    assert_eq!(import.clusters[0].conflict, None);
    assert_eq!(import.ports.iter().map(|p| p.port).collect::<Vec<_>>(), vec![8080, 9090]);
    // Deleting west's cluster takes its export and the import with it.
    admin.delete_cluster("west").await.unwrap();
    assert_eq!(import_of(&admin.list().await.unwrap(), "shop", "cart"), None);
    // No ClusterSetIP is held now; a pool over a member's prefixes is still refused.
    settings.cluster_set_ip_pool = "10.0.0.0/8".parse().unwrap();
    let err = admin.put_cluster_set(&settings).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains("overlaps the ClusterSetIP pool"), "{err}");
    // Exported again, the name gets its old ClusterSetIP back (nobody took it meanwhile).
    let mut again = service("east", "10.101.0.10");
    again.generation = 2;
    east.put_service(&again).await.unwrap();
    assert_eq!(import_of(&admin.list().await.unwrap(), "shop", "cart").unwrap().ips, vec![vip]);
}
