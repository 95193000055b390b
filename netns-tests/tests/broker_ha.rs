//! High availability on real etcd: a 3-member etcd cluster on loopback and two `causeway
//! broker` replicas sharing it. Mid-stream, the etcd leader (found by asking the members)
//! and one broker replica are SIGKILLed; writes and watches carry on through the survivors and no acknowledged write is
//! lost. Needs no privileges (loopback only), but needs etcd (required in CI).

use std::{
    collections::BTreeSet,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use causeway_broker::testing::{EtcdCluster, require_etcd};
use causeway_broker_api::{BrokerClient, ClusterRecord, Credentials, EventType};
use causeway_netns::causeway_bin;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Replica(Child);

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_replica(dir: &std::path::Path, port: u16, etcd: &str) -> Replica {
    Replica(
        Command::new(causeway_bin())
            .args(["broker", "--data-dir", &dir.display().to_string()])
            .args(["--listen", &format!("127.0.0.1:{port}"), "--etcd-endpoints", etcd, "--etcd-insecure"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting a broker replica"),
    )
}

async fn wait_up(client: &BrokerClient) {
    for _ in 0..150 {
        if client.list().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("broker replica {} did not come up", client.base_url());
}

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

/// Follows the cluster set through the replicas in `clients`, moving to the next one when its
/// replica stops answering, resuming from the last revision it got. Returns the cluster ids
/// of the puts it saw and checks revisions never go back or repeat.
async fn watcher(clients: Vec<BrokerClient>, stop: Arc<Mutex<bool>>) -> (Vec<String>, u64) {
    let (mut at, mut rv) = (0, 0);
    let mut seen = Vec::new();
    loop {
        match clients[at].watch(rv, Duration::from_secs(1)).await {
            Ok(w) => {
                for e in &w.events {
                    assert!(e.revision > rv, "revision {} after {rv}: repeated or out of order", e.revision);
                    rv = e.revision;
                    if e.kind == EventType::Put {
                        seen.push(e.object.record.cluster_id().to_owned());
                    }
                }
                rv = rv.max(w.resource_version);
                if w.events.is_empty() && *stop.lock().unwrap() {
                    return (seen, rv);
                }
            }
            Err(e) => {
                assert_ne!(e.status(), Some(410), "a watcher on a live set must never have to re-list: {e}");
                at = (at + 1) % clients.len();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_watches_survive_an_etcd_member_and_a_broker_replica_dying() {
    require_etcd("broker_ha");
    let mut etcd = EtcdCluster::start(3);
    let endpoints = etcd.endpoints().join(",");
    let dir = std::env::temp_dir().join(format!("cw-ha-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (p1, p2) = (free_port(), free_port());
    let deployed = Command::new(causeway_bin())
        .args(["deploy-broker", "--local", "--data-dir", &dir.display().to_string()])
        .args(["--address", "127.0.0.1", "--port", &p1.to_string(), "--etcd-endpoints", &endpoints])
        .output()
        .expect("deploy-broker");
    // etcd in the clear is refused unless asked for (it holds every member's routes).
    assert!(!deployed.status.success());
    let err = String::from_utf8_lossy(&deployed.stderr);
    assert!(err.contains("is not https://") && err.contains("--etcd-insecure"), "{err}");
    assert!(!dir.exists(), "a refused deploy-broker writes nothing");
    let deployed = Command::new(causeway_bin())
        .args(["deploy-broker", "--local", "--data-dir", &dir.display().to_string()])
        .args(["--address", "127.0.0.1", "--port", &p1.to_string(), "--etcd-endpoints", &endpoints])
        .arg("--etcd-insecure")
        .output()
        .expect("deploy-broker");
    assert!(deployed.status.success(), "{}", String::from_utf8_lossy(&deployed.stderr));
    assert!(!dir.join("broker.redb").exists(), "the etcd flavour keeps no local store");
    let admin = Credentials::load(&dir.join("admin-credentials.json")).unwrap();
    let one = BrokerClient::from_credentials(&admin).unwrap();
    let two = one.at(format!("https://127.0.0.1:{p2}"));
    let mut replica_one = Some(start_replica(&dir, p1, &endpoints));
    let _replica_two = start_replica(&dir, p2, &endpoints);
    wait_up(&one).await;
    wait_up(&two).await;

    // One watcher per replica; the one on replica 1 must move to replica 2 when it dies.
    let stop = Arc::new(Mutex::new(false));
    let w1 = tokio::spawn(watcher(vec![one.clone(), two.clone()], Arc::clone(&stop)));
    let w2 = tokio::spawn(watcher(vec![two.clone()], Arc::clone(&stop)));

    // The writer alternates replicas; a write that fails is retried on the other one.
    let clients = [one.clone(), two.clone()];
    let mut acked = BTreeSet::new();
    let mut after_kill = 0;
    let mut killed_leader = None;
    let total = 160u32;
    for i in 0..total {
        if i == total / 3 {
            // The leader, not whichever member: losing it forces an election mid-stream.
            let leader = tokio::task::block_in_place(|| etcd.leader(Duration::from_secs(10)));
            etcd.kill(leader);
            killed_leader = Some(leader);
            drop(replica_one.take());
        }
        let mut done = false;
        for attempt in 0..40 {
            let c = &clients[(i as usize + attempt) % 2];
            match c.put_cluster(&cluster(i)).await {
                Ok(_) => {
                    done = true;
                    break;
                }
                Err(e) if e.status() == Some(409) => {
                    // An earlier attempt landed but its answer was lost: it is there.
                    assert!(e.to_string().contains(&format!("c{i}")), "{e}");
                    done = true;
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        assert!(done, "write {i} never succeeded through the surviving replica");
        acked.insert(format!("c{i}"));
        if i >= total / 3 {
            after_kill += 1;
        }
    }
    assert!(after_kill > 100, "most writes happen after the failures");
    let leader = tokio::task::block_in_place(|| etcd.leader(Duration::from_secs(10)));
    assert_ne!(Some(leader), killed_leader, "the survivors elected a new leader");

    // Every acknowledged write is in the set, read from the survivor.
    let list = two.list().await.unwrap();
    let stored: BTreeSet<String> = list.items.iter().map(|o| o.record.cluster_id().to_owned()).collect();
    assert_eq!(stored, acked);
    *stop.lock().unwrap() = true;
    for (name, w) in [("watcher on replica 1 → 2", w1), ("watcher on replica 2", w2)] {
        let (seen, rv) = tokio::time::timeout(Duration::from_secs(30), w).await.expect(name).unwrap();
        assert_eq!(rv, list.resource_version, "{name} reached the end");
        let set: BTreeSet<String> = seen.iter().cloned().collect();
        assert_eq!(set.len(), seen.len(), "{name} saw a put twice");
        assert_eq!(set, acked, "{name} saw every acknowledged write");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
