//! The real broker process on loopback: SIGKILL it in the middle of a stream of writes; after
//! a restart every write it had acknowledged is there. Needs no privileges (loopback only).

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use causeway_broker_api::{BrokerClient, ClusterRecord, Credentials};
use causeway_netns::causeway_bin;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start_broker(dir: &std::path::Path, port: u16) -> Child {
    Command::new(causeway_bin())
        .args(["broker", "--data-dir", &dir.display().to_string(), "--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the broker")
}

async fn wait_up(client: &BrokerClient) {
    for _ in 0..100 {
        if client.list().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the broker did not come up");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_survives_a_sigkill() {
    let dir = std::env::temp_dir().join(format!("cw-durability-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let port = free_port();
    let deployed = Command::new(causeway_bin())
        .args([
            "deploy-broker",
            "--local",
            "--data-dir",
            &dir.display().to_string(),
            "--address",
            "127.0.0.1",
        ])
        .args(["--port", &port.to_string()])
        .output()
        .expect("deploy-broker");
    assert!(deployed.status.success(), "{}", String::from_utf8_lossy(&deployed.stderr));
    let admin = Credentials::load(&dir.join("admin-credentials.json")).unwrap();
    let client = BrokerClient::from_credentials(&admin).unwrap();

    let mut broker = start_broker(&dir, port);
    wait_up(&client).await;
    // Four writers stream new clusters; the broker is killed while they run.
    let mut writers = Vec::new();
    for w in 0..4u32 {
        let client = client.clone();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for n in 0..10_000u32 {
                let i = n * 4 + w;
                match client.put_cluster(&cluster(i)).await {
                    Ok(_) => acked.push(i),
                    Err(_) => break,
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    broker.kill().expect("SIGKILL");
    broker.wait().unwrap();
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    assert!(acked.len() > 20, "the writers got going before the kill ({} writes)", acked.len());

    let mut broker = start_broker(&dir, port);
    wait_up(&client).await;
    let stored: std::collections::BTreeSet<String> =
        client.list().await.unwrap().items.into_iter().map(|o| o.record.cluster_id().to_owned()).collect();
    let lost: Vec<String> = acked.iter().map(|i| format!("c{i}")).filter(|id| !stored.contains(id)).collect();
    eprintln!("{} acknowledged writes before SIGKILL, {} stored after restart", acked.len(), stored.len());
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    broker.kill().unwrap();
    broker.wait().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `causeway benchmark broker` end to end at a small size, so the command cannot rot between
/// the runs that produce docs/benchmarks.md: it registers the clusters (each gateway with its
/// own key, as the broker demands), times the rounds and reports every watcher.
#[test]
fn the_broker_benchmark_runs() {
    let out = Command::new(causeway_bin())
        .args(["benchmark", "broker", "--clusters", "20", "--rounds", "2", "--output", "json"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("benchmark broker");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let results: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = &results[0];
    assert_eq!((r["clusters"].as_u64(), r["watchers"].as_u64()), (Some(20), Some(20)), "{results}");
    let (p50, max) = (r["p50Ms"].as_f64().unwrap(), r["maxMs"].as_f64().unwrap());
    assert!(p50 > 0.0 && p50 <= max, "{results}");
}

/// `--dry-run` outside Kubernetes is refused with a clear error and changes nothing: before,
/// `deploy-broker --local --dry-run` created a broker and `join --dry-run` registered the
/// cluster.
#[test]
fn a_dry_run_outside_kubernetes_is_refused_and_changes_nothing() {
    let dir = std::env::temp_dir().join(format!("cw-dry-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.display().to_string();
    let out = Command::new(causeway_bin())
        .args(["deploy-broker", "--local", "--dry-run", "--data-dir", &d, "--address", "127.0.0.1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--dry-run applies to Kubernetes"), "{out:?}");
    assert!(!dir.exists(), "a refused dry run writes nothing");

    // A real broker to join, then a dry-run join: refused, and the cluster is not registered.
    let port = free_port();
    let deployed = Command::new(causeway_bin())
        .args(["deploy-broker", "--local", "--data-dir", &d, "--address", "127.0.0.1"])
        .args(["--port", &port.to_string()])
        .output()
        .unwrap();
    assert!(deployed.status.success(), "{}", String::from_utf8_lossy(&deployed.stderr));
    let mut broker = start_broker(&dir, port);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let admin = Credentials::load(&dir.join("admin-credentials.json")).unwrap();
    let client = BrokerClient::from_credentials(&admin).unwrap();
    rt.block_on(wait_up(&client));
    let out = Command::new(causeway_bin())
        .args(["join", &dir.join("broker-info.json").display().to_string(), "--cluster-id", "east"])
        .args([
            "--pod-cidr",
            "10.1.0.0/16",
            "--dry-run",
            "--output",
            &dir.join("east.json").display().to_string(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--dry-run applies to joining a Kubernetes cluster"),
        "{out:?}"
    );
    assert!(!dir.join("east.json").exists());
    let listed = rt.block_on(client.list()).unwrap();
    assert!(listed.items.is_empty(), "nothing registered: {:?}", listed.items);
    broker.kill().unwrap();
    broker.wait().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
