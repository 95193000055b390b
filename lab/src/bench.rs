//! `causeway benchmark broker`: how fast a change reaches every watcher of a large cluster
//! set. Runs the real broker binary over HTTPS on loopback, registers N clusters with
//! `join` semantics (each with its own credential and endpoint), starts one watcher per
//! cluster, then changes one endpoint and times its arrival at every watcher.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use causeway_broker_api::{
    BrokerClient, ClusterRecord, Credentials, EndpointRecord, GatewayRole, Record, Reflector, Snapshot,
    WireGuardKey,
};
use serde::Serialize;

#[derive(clap::Args)]
pub struct BrokerBenchArgs {
    /// Cluster-set sizes to measure (each a fresh broker).
    #[arg(long, value_delimiter = ',', default_value = "100,500,1000")]
    clusters: Vec<u32>,
    /// Changes timed per size.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// `table` for people, `json` for scripts.
    #[arg(long, value_enum, default_value = "table")]
    output: causeway_cli_format::Output,
    /// Also write an SVG plot of the results here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Where the broker keeps the set: the embedded file, or a 3-member etcd cluster the
    /// benchmark runs on loopback (needs Debian's etcd-server).
    #[arg(long, value_enum, default_value = "redb")]
    store: BenchStore,
    /// Broker replicas sharing the set (more than one needs --store etcd); watchers are
    /// spread over them, writes go to the first.
    #[arg(long, default_value_t = 1)]
    replicas: u16,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum BenchStore {
    Redb,
    Etcd,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SizeResult {
    clusters: u32,
    watchers: u32,
    /// Propagation from the write's start to each watcher, all rounds pooled (milliseconds).
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Resident memory of the broker processes (all replicas) with every watcher connected.
    broker_rss_mib: f64,
    replicas: u16,
    /// Time to register the set (join + endpoint per cluster).
    setup_secs: f64,
}

struct BrokerProcess(Child);

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A scratch directory removed when the run ends, failed runs included.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// The `p` quantile (0..=1) of sorted samples, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "index math"
    )]
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn endpoint(cluster: &str, port: u16) -> EndpointRecord {
    EndpointRecord {
        cluster_id: cluster.to_owned(),
        hostname: "gw".into(),
        private_ips: vec!["192.0.2.1".parse().expect("valid")],
        public_ips: vec![],
        port,
        // A key of each cluster's own: the broker refuses one another cluster's gateway uses.
        public_key: WireGuardKey(std::array::from_fn(|i| cluster.as_bytes().get(i).copied().unwrap_or(0))),
        backend: "wireguard".into(),
        role: GatewayRole::Active,
        priority: 0,
        health_check_ip: None,
        reachable: None,
        candidates: Vec::new(),
        generation: 1,
    }
}

async fn measure(n: u32, rounds: u32, etcd: Option<&[String]>, replicas: u16) -> anyhow::Result<SizeResult> {
    let dir = std::env::temp_dir().join(format!("causeway-bench-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let scratch = Scratch(dir.clone());
    let ports = (0..replicas.max(1))
        .map(|_| Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()))
        .collect::<anyhow::Result<Vec<u16>>>()?;
    let bin = std::env::current_exe()?;
    let d = dir.display().to_string();
    // Each size gets its own key prefix in the shared etcd.
    let store_args: Vec<String> = etcd.map_or_else(Vec::new, |e| {
        // The benchmark's own etcd on loopback, plain HTTP.
        vec![
            "--etcd-endpoints".into(),
            e.join(","),
            "--etcd-prefix".into(),
            format!("/bench-{n}/"),
            "--etcd-insecure".into(),
        ]
    });
    let out = Command::new(&bin)
        .args(["deploy-broker", "--local", "--data-dir", &d, "--address", "127.0.0.1", "--port"])
        .arg(ports[0].to_string())
        .args(&store_args)
        .output()?;
    if !out.status.success() {
        bail!("deploy-broker: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut brokers = Vec::new();
    for port in &ports {
        let child = Command::new(&bin)
            // Several brokers share the namespace here, and nothing asks for STUN.
            .args([
                "broker",
                "--data-dir",
                &d,
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--stun-listen",
                "off",
            ])
            .args(&store_args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the broker")?;
        brokers.push(BrokerProcess(child));
    }
    // The admin registers the clusters: a join credential has a write budget (50/s), and
    // this measures propagation, not how fast one operator may register a thousand clusters.
    let info = Credentials::load(&dir.join(causeway_broker_api::ADMIN_FILE)).map_err(anyhow::Error::msg)?;
    let joiner = BrokerClient::from_credentials(&info)?;
    // The same credentials against each replica.
    let on_replica = |c: &BrokerClient, i: usize| c.at(format!("https://127.0.0.1:{}", ports[i]));
    for c in std::iter::once(joiner.clone()).chain((1..ports.len()).map(|i| on_replica(&joiner, i))) {
        for _ in 0..100 {
            if c.list().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    eprintln!("==> {n} clusters: registering");
    let setup = Instant::now();
    let mut clients = Vec::new();
    for i in 0..n {
        let id = format!("c{i}");
        let record = ClusterRecord {
            cluster_id: id.clone(),
            pod_cidrs: vec![format!("10.{}.{}.0/24", i / 256, i % 256).parse()?],
            service_cidrs: vec![format!("100.{}.{}.0/24", 64 + i / 256, i % 256).parse()?],
            global_cidrs: Vec::new(),
            labels: Default::default(),
            generation: 1,
        };
        let joined = joiner.join(&record).await.with_context(|| format!("joining {id}"))?;
        let client = joiner.with_token(joined.token);
        client.put_endpoint(&endpoint(&id, 51820)).await?;
        clients.push(client);
    }
    let setup_secs = setup.elapsed().as_secs_f64();
    eprintln!("==> {n} clusters registered in {setup_secs:.1} s; starting {n} watchers");
    let rv = clients[0].list().await?.resource_version;
    // Each watcher is a gateway's reflector, resumed from `rv` (the records before it do
    // not matter here, and a thousand lists of the whole set would only measure lists), and
    // reports when it sees c0's endpoint at a new port.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u16, Instant)>();
    let stop = Arc::new(tokio::sync::Notify::new());
    let watched = Record::Endpoint(endpoint("c0", 0)).key();
    for (i, c) in clients.iter().enumerate() {
        let start = Snapshot { revision: rv, objects: std::collections::BTreeMap::new() };
        let mut reflector = Reflector::resume(on_replica(c, i % ports.len()), Duration::from_secs(60), start);
        let (tx, stop, watched) = (tx.clone(), stop.clone(), watched.clone());
        tokio::spawn(async move {
            let mut seen = None;
            loop {
                let step = tokio::select! {
                    step = reflector.next() => step,
                    () = stop.notified() => return,
                };
                let now = Instant::now();
                if step.is_err() {
                    continue; // the reflector backed off already
                }
                let port = reflector.snapshot().objects.get(&watched).and_then(|o| match &o.record {
                    Record::Endpoint(ep) => Some(ep.port),
                    _ => None,
                });
                if port.is_some() && port != seen {
                    seen = port;
                    let _ = tx.send((port.unwrap_or(0), now));
                }
            }
        });
    }
    // Let every long-poll reach the broker.
    tokio::time::sleep(Duration::from_millis(500 + u64::from(n))).await;
    let rss = brokers.iter().map(|b| rss_mib(b.0.id())).sum();
    let mut latencies = Vec::new();
    for round in 0..rounds {
        let port = 52000 + u16::try_from(round).unwrap_or(0);
        let start = Instant::now();
        clients[0].put_endpoint(&endpoint("c0", port)).await?;
        let mut got = 0;
        let deadline = start + Duration::from_secs(30);
        while got < n {
            match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
                Ok(Some((p, at))) if p == port => {
                    latencies.push(at.duration_since(start).as_secs_f64() * 1000.0);
                    got += 1;
                }
                Ok(Some(_)) => {}
                _ => bail!("only {got} of {n} watchers saw the change within 30 s"),
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.notify_waiters();
    drop(brokers);
    drop(scratch);
    latencies.sort_by(f64::total_cmp);
    Ok(SizeResult {
        clusters: n,
        watchers: n,
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
        max_ms: latencies.last().copied().unwrap_or(0.0),
        broker_rss_mib: rss,
        replicas: replicas.max(1),
        setup_secs,
    })
}

fn svg(results: &[SizeResult]) -> String {
    let (w, h, left, bottom) = (560.0, 300.0, 60.0, 40.0);
    let max = results.iter().map(|r| r.p99_ms).fold(1.0_f64, f64::max) * 1.2;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<text x="{x}" y="18" text-anchor="middle">Broker: change → every watcher (ms)</text>
<line x1="{left}" y1="{y0}" x2="{xr}" y2="{y0}" stroke="black"/><line x1="{left}" y1="30" x2="{left}" y2="{y0}" stroke="black"/>
"#,
        x = w / 2.0,
        y0 = h - bottom,
        xr = w - 10.0
    );
    #[expect(clippy::cast_precision_loss, reason = "a handful of bars")]
    let slot = (w - left - 20.0) / results.len().max(1) as f64;
    for (i, r) in results.iter().enumerate() {
        #[expect(clippy::cast_precision_loss, reason = "a handful of bars")]
        let x = left + 10.0 + slot * i as f64;
        for (k, (v, color, label)) in
            [(r.p50_ms, "#4878d0", "p50"), (r.p99_ms, "#ee854a", "p99")].iter().enumerate()
        {
            let bh = (h - bottom - 30.0) * v / max;
            #[expect(clippy::cast_precision_loss, reason = "two bars")]
            let bx = x + (slot / 2.5) * k as f64;
            s.push_str(&format!(
                r#"<rect x="{bx:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="{color}"><title>{label} {v:.1} ms</title></rect><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{v:.0}</text>
"#,
                h - bottom - bh,
                slot / 2.5 - 4.0,
                bx + slot / 5.0 - 2.0,
                h - bottom - bh - 4.0
            ));
        }
        s.push_str(&format!(
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{} clusters</text>
"#,
            x + slot / 2.5,
            h - bottom + 16.0,
            r.clusters
        ));
    }
    s.push_str(&format!(
        r##"<rect x="{a}" y="34" width="10" height="10" fill="#4878d0"/><text x="{b}" y="43">p50</text><rect x="{c}" y="34" width="10" height="10" fill="#ee854a"/><text x="{d}" y="43">p99</text>
</svg>
"##,
        a = left + 10.0,
        b = left + 24.0,
        c = left + 60.0,
        d = left + 74.0
    ));
    s
}

pub async fn broker(a: BrokerBenchArgs) -> anyhow::Result<()> {
    if a.replicas > 1 && matches!(a.store, BenchStore::Redb) {
        bail!("--replicas {} needs --store etcd (the embedded store serves one broker)", a.replicas);
    }
    let etcd = match a.store {
        BenchStore::Redb => None,
        BenchStore::Etcd => {
            if !causeway_broker::testing::etcd_installed() {
                bail!("--store etcd needs /usr/bin/etcd (apt-get install etcd-server)");
            }
            eprintln!("==> starting a 3-member etcd cluster on loopback");
            Some(tokio::task::spawn_blocking(|| causeway_broker::testing::EtcdCluster::start(3)).await?)
        }
    };
    let endpoints = etcd.as_ref().map(causeway_broker::testing::EtcdCluster::endpoints);
    let mut results = Vec::new();
    for n in &a.clusters {
        results.push(measure(*n, a.rounds, endpoints.as_deref(), a.replicas).await?);
    }
    drop(etcd);
    match a.output {
        causeway_cli_format::Output::Json => println!("{}", serde_json::to_string_pretty(&results)?),
        causeway_cli_format::Output::Table => {
            let rows: Vec<Vec<String>> = results
                .iter()
                .map(|r| {
                    vec![
                        r.clusters.to_string(),
                        r.watchers.to_string(),
                        format!("{:.1}", r.p50_ms),
                        format!("{:.1}", r.p99_ms),
                        format!("{:.1}", r.max_ms),
                        format!("{:.1}", r.broker_rss_mib),
                        format!("{:.1}", r.setup_secs),
                    ]
                })
                .collect();
            print!(
                "{}",
                causeway_cli_format::table(
                    &["CLUSTERS", "WATCHERS", "P50 MS", "P99 MS", "MAX MS", "BROKER RSS MIB", "SETUP S"],
                    &rows
                )
            );
        }
    }
    if let Some(path) = a.plot {
        std::fs::write(&path, svg(&results)).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(())
}
