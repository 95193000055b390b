//! Two broker replicas on one real etcd: the rules hold across them (overlap races, unique
//! ids, credentials, endpoint leases), and each serves watchers the other's writes.

use std::time::Duration;

use causeway_broker::{
    Broker, EtcdOptions, EtcdStore, Identity,
    testing::{EtcdCluster, require_etcd},
};
use causeway_broker_api::{
    BrokerClient, ClusterRecord, EndpointRecord, EventType, GatewayRole, WireGuardKey,
};

async fn replica(etcd: &EtcdCluster, lease: Duration) -> (BrokerClient, std::sync::Arc<Broker>) {
    let store = EtcdStore::connect(&EtcdOptions::new(etcd.endpoints())).await.unwrap();
    let broker = Broker::with_lease(store, lease).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(causeway_broker::run(listener, broker.clone(), std::future::pending()));
    tokio::spawn(broker.clone().run_expiry());
    let admin = broker.issue(&Identity::Admin).await.unwrap();
    (BrokerClient::new(url).with_token(admin), broker)
}

fn cluster(id: &str, pod: &str) -> ClusterRecord {
    ClusterRecord::new(id, vec![pod.parse().unwrap()], vec![])
}

fn endpoint(id: &str, host: &str) -> EndpointRecord {
    EndpointRecord {
        cluster_id: id.into(),
        hostname: host.into(),
        private_ips: vec!["172.31.0.11".parse().unwrap()],
        public_ips: vec![],
        port: 51820,
        // A key of its own per gateway: a shared one would hide key-clash bugs.
        public_key: {
            use sha2::Digest as _;
            WireGuardKey(sha2::Sha256::digest(format!("{id}/{host}")).into())
        },
        backend: "wireguard".into(),
        role: GatewayRole::Active,
        priority: 0,
        health_check_ip: None,
        reachable: None,
        candidates: Vec::new(),
        generation: 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_enforce_one_set_of_rules() {
    require_etcd("two_replicas_enforce_one_set_of_rules");
    let etcd = EtcdCluster::start(1);
    let lease = Duration::from_millis(1500);
    let (a, broker_a) = replica(&etcd, lease).await;
    let (b, _broker_b) = replica(&etcd, lease).await;

    // Overlapping registrations racing through both replicas: exactly one wins.
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let c = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(
            async move { c.put_cluster(&cluster(&format!("r{i}"), "10.50.0.0/16")).await },
        ));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.status(), Some(409), "{e}"),
        }
    }
    assert_eq!(ok, 1, "exactly one of the overlapping clusters is registered");
    assert_eq!(a.list().await.unwrap(), b.list().await.unwrap());

    // A watcher on B gets a write made through A.
    let rv = b.list().await.unwrap().resource_version;
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.watch(rv, Duration::from_secs(10)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.put_cluster(&cluster("east", "10.1.0.0/16")).await.unwrap();
    let w = waiter.await.unwrap().unwrap();
    assert_eq!(w.events.len(), 1);
    assert_eq!(w.events[0].object.record.cluster_id(), "east");

    // A credential issued by A works on B; a join through B of an id taken through A is refused.
    let joiner = broker_a.issue(&Identity::Join).await.unwrap();
    let west_token = a.with_token(joiner.clone()).join(&cluster("west", "10.2.0.0/16")).await.unwrap().token;
    let west_on_b = b.with_token(west_token);
    west_on_b.list().await.unwrap();
    let err = b.with_token(joiner).join(&cluster("west", "10.9.0.0/16")).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    // Revoked through A: dead on B too.
    a.revoke("west").await.unwrap();
    assert_eq!(west_on_b.list().await.unwrap_err().status(), Some(401));

    // Heartbeats through A keep an endpoint alive on B (whose own view has no heartbeat),
    // and without heartbeats it expires.
    a.put_endpoint(&endpoint("east", "gw-1")).await.unwrap();
    let rv_alive = a.list().await.unwrap().resource_version;
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        a.put_endpoint(&endpoint("east", "gw-1")).await.unwrap();
    }
    let keys = |l: causeway_broker_api::ListResponse| {
        l.items
            .into_iter()
            .map(|o| o.record.key())
            .filter(|k| k.starts_with("endpoints/"))
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(b.list().await.unwrap()), vec!["endpoints/east/gw-1"], "alive while heartbeating via A");
    let rv = b.list().await.unwrap().resource_version;
    assert_eq!(rv, rv_alive, "never expired (and re-created) while heartbeating");
    let w = b.watch(rv, Duration::from_secs(10)).await.unwrap();
    assert_eq!(w.events.len(), 1, "{w:?}");
    assert_eq!(w.events[0].kind, EventType::Delete);
    assert!(keys(a.list().await.unwrap()).is_empty());
    assert!(keys(b.list().await.unwrap()).is_empty());
}
