//! The shared reflector against a real broker over loopback HTTP: it lists once, then
//! follows changes by watching; after the broker restarts (same store) it resumes watching
//! from its last revision, without a re-list; when the broker's history no longer reaches that
//! revision (compacted), it re-lists, and the snapshot equals what the broker holds.

use std::time::Duration;

use causeway_broker::{Broker, Identity, RedbStore};
use causeway_broker_api::{BrokerClient, ClusterRecord, Reflector, Step};

fn cluster(i: u32) -> ClusterRecord {
    ClusterRecord {
        cluster_id: format!("c{i}"),
        pod_cidrs: vec![format!("10.{}.{}.0/24", i / 256, i % 256).parse().unwrap()],
        service_cidrs: vec![],
        global_cidrs: Vec::new(),
        labels: Default::default(),
        generation: 1,
    }
}

/// A broker on `listener`'s address over the store at `path`; dropping the sender stops it.
async fn serve(
    listener: tokio::net::TcpListener,
    path: &std::path::Path,
    history: u64,
) -> (std::sync::Arc<Broker>, tokio::sync::oneshot::Sender<()>) {
    let broker = Broker::new(RedbStore::open_with_history(path, history).unwrap()).await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(causeway_broker::run(listener, broker.clone(), async {
        let _ = rx.await;
    }));
    (broker, tx)
}

async fn bind(addr: std::net::SocketAddr) -> tokio::net::TcpListener {
    // The old listener's port: retry while the kernel releases it.
    for _ in 0..50 {
        if let Ok(l) = tokio::net::TcpListener::bind(addr).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("could not bind {addr} again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_after_a_broker_restart_and_relists_when_told_too_old() {
    let dir = std::env::temp_dir().join(format!("cw-reflector-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("broker.redb");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (broker, stop) = serve(listener, &path, 5).await;
    let admin = broker.issue(&Identity::Admin).await.unwrap();
    let client = BrokerClient::new(format!("http://{addr}")).with_token(admin);
    client.put_cluster(&cluster(1)).await.unwrap();

    let mut r = Reflector::new(client.clone(), Duration::from_secs(1));
    assert_eq!(r.next().await.unwrap(), Step::Listed);
    assert_eq!(r.snapshot().objects.len(), 1);
    assert_eq!(r.next().await.unwrap(), Step::Quiet, "nothing new: the watch times out");
    client.put_cluster(&cluster(2)).await.unwrap();
    assert_eq!(r.next().await.unwrap(), Step::Changed);
    assert_eq!(r.snapshot().objects.len(), 2);
    let seen = r.snapshot().revision;

    // The broker goes away: an error (after a backoff), then it is back on the same store.
    drop(stop);
    drop(broker);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(r.next().await.is_err(), "the broker is down");
    let (broker, _stop) = serve(bind(addr).await, &path, 5).await;
    client.put_cluster(&cluster(3)).await.unwrap_or_else(|_| {
        // The old admin token lives in the store: it still works after the restart.
        panic!("the restarted broker refused the old credential")
    });
    // Resumed from the last revision: the one change since, no re-list.
    assert_eq!(r.next().await.unwrap(), Step::Changed);
    assert!(r.snapshot().revision > seen);
    assert_eq!(r.snapshot().objects.len(), 3);

    // More writes than the history keeps while the reflector is not looking: the broker
    // answers 410 for its revision, and it re-lists.
    for i in 4..20 {
        client.put_cluster(&cluster(i)).await.unwrap();
    }
    assert_eq!(r.next().await.unwrap(), Step::Listed, "told too old: a full list");
    let listed = client.list().await.unwrap();
    assert_eq!(r.snapshot().revision, listed.resource_version);
    assert_eq!(r.snapshot().objects(), listed.items);
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}
