//! `causeway benchmark services`: what cluster-set service discovery costs.
//!
//! Two clusters, real route agents (socket programs on the pods' cgroups) and cluster 1's
//! `causeway dns`; both clusters serve and export `demo/echo`.
//! - **DNS**: `causeway debug dns-load` from cluster 1's pod, closed loop (`--window` queries in
//!   flight) for `--secs`, against `causeway dns` (its per-client budget lifted) and against
//!   `dnsmasq` answering the same name from a static record on the same worker: the ceiling
//!   of a plain server on this machine. Answers per second and latency p50/p99.
//! - **Connect rate**: `causeway debug tcp-connect-rate` from cluster 1's pod (connect, read the
//!   first line, close) to the same backend, cluster 1's own echo: by its ClusterIP from
//!   outside the pod cgroup (no socket program runs), by its ClusterIP from inside it (the
//!   program runs and finds nothing to translate), and by the ClusterSetIP (translated; local
//!   affinity sends it to that same backend). The ratios are the translation's cost.

use std::time::Duration;

use anyhow::{Context as _, bail};
use causeway_netns::{Topology, TopologySpec, exec, topology::wait_for};
use serde::{Deserialize, Serialize};

#[derive(clap::Args)]
pub struct ServicesBenchArgs {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Rounds of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// DNS queries in flight.
    #[arg(long, default_value_t = 64)]
    window: u32,
    /// `table` for people, `json` for scripts.
    #[arg(long, value_enum, default_value = "table")]
    output: causeway_cli_format::Output,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Measure {
    what: String,
    per_sec: f64,
    p50: f64,
    p99: f64,
    failed: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    dns: Vec<Measure>,
    connect: Vec<Measure>,
}

const NAME: &str = "echo.demo.svc.clusterset.local";
const DNSMASQ_PORT: u16 = 5353;

pub fn run(a: ServicesBenchArgs) -> anyhow::Result<()> {
    if which("dnsmasq").is_none() {
        bail!("dnsmasq is needed as the ceiling (apt install dnsmasq-base)");
    }
    let bin = std::env::current_exe().context("locating the causeway binary")?;
    let prefix = format!("cwbs{}", std::process::id());
    let mut t = Topology::build(TopologySpec::new(&prefix, 2, bin.clone()))?;
    t.start_broker()?;
    t.start_gateway(1)?;
    t.start_gateway(2)?;
    t.wait_connected(Duration::from_secs(60))?;
    for i in 1..=2 {
        t.start_route_agent(i)?;
    }
    t.start_dns_with(1, &["--client-qps", "1000000000"])?;
    let mut cluster_ip = String::new();
    for i in 1..=2 {
        let svc = t.serve(i, "echo", 7)?;
        t.export(&svc, "demo")?;
        if i == 1 {
            cluster_ip = svc.cluster_ip;
        }
    }
    let mut vip = String::new();
    wait_for(Duration::from_secs(20), "the ClusterSetIP answered by cluster 1", || {
        vip = t
            .pod_exec(1, &["dig", "+short", "+time=1", NAME, "A"])
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        !vip.is_empty()
            && t.pod_exec(
                1,
                &["bash", "-c", &format!("exec 3<>/dev/tcp/{vip}/7 && read -r -t 2 l <&3 && echo $l")],
            )
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "cluster-1")
    })?;

    // The ceiling: dnsmasq on the same worker, answering the same name from a static record.
    let dns_addr = t.dns_address(1);
    let dnsmasq = exec::Bg::start(
        &t.clusters[0].node_ns,
        &[
            "dnsmasq",
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &format!("--listen-address={dns_addr}"),
            &format!("--port={DNSMASQ_PORT}"),
            &format!("--host-record={NAME},{vip}"),
            "--cache-size=0",
        ],
        std::process::Stdio::null(),
    );
    std::thread::sleep(Duration::from_millis(500));

    let bin_s = bin.display().to_string();
    let secs = a.secs.to_string();
    let window = a.window.to_string();
    let dns_round = |server: String| -> anyhow::Result<Measure> {
        let out = t.pod_exec(
            1,
            &[
                &bin_s, "debug", "dns-load", "--server", &server, "--name", NAME, "--secs", &secs,
                "--window", &window,
            ],
        )?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("dns-load output")?;
        let (sent, answered) = (v["sent"].as_u64().unwrap_or(0), v["answered"].as_u64().unwrap_or(0));
        Ok(Measure {
            what: String::new(),
            per_sec: v["answers_per_sec"].as_f64().unwrap_or(0.0),
            p50: v["p50_ms"].as_f64().unwrap_or(0.0),
            p99: v["p99_ms"].as_f64().unwrap_or(0.0),
            failed: sent.saturating_sub(answered),
        })
    };
    let connect_round = |addr: &str, in_cgroup: bool| -> anyhow::Result<Measure> {
        let args = [bin_s.as_str(), "debug", "tcp-connect-rate", "--connect", addr, "--secs", &secs];
        let out = if in_cgroup { t.pod_exec(1, &args)? } else { exec::in_ns(&t.clusters[0].pod_ns, &args)? };
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("tcp-connect-rate output")?;
        Ok(Measure {
            what: String::new(),
            per_sec: v["per_sec"].as_f64().unwrap_or(0.0),
            p50: v["p50_us"].as_f64().unwrap_or(0.0),
            p99: v["p99_us"].as_f64().unwrap_or(0.0),
            failed: v["failed"].as_u64().unwrap_or(0),
        })
    };
    let median = |what: &str, mut rounds: Vec<Measure>| {
        rounds.sort_by(|x, y| x.per_sec.total_cmp(&y.per_sec));
        let mut m = rounds.swap_remove(rounds.len() / 2);
        m.what = what.to_owned();
        m
    };
    let mut report = Report { dns: Vec::new(), connect: Vec::new() };
    let direct = format!("{cluster_ip}:7");
    let via_vip = format!("{vip}:7");
    let (mut ours, mut ceiling, mut plain, mut miss, mut translated) =
        (vec![], vec![], vec![], vec![], vec![]);
    for r in 0..a.rounds {
        eprintln!("==> round {}/{}", r + 1, a.rounds);
        ours.push(dns_round(format!("{dns_addr}:53"))?);
        ceiling.push(dns_round(format!("{dns_addr}:{DNSMASQ_PORT}"))?);
        plain.push(connect_round(&direct, false)?);
        miss.push(connect_round(&direct, true)?);
        translated.push(connect_round(&via_vip, true)?);
    }
    drop(dnsmasq);
    report.dns.push(median("causeway dns", ours));
    report.dns.push(median("dnsmasq (static record, no cache)", ceiling));
    report.connect.push(median("ClusterIP, outside the pod cgroup (no program)", plain));
    report.connect.push(median("ClusterIP, inside the cgroup (program, no match)", miss));
    report.connect.push(median("ClusterSetIP (translated to that ClusterIP)", translated));
    t.teardown()?;
    match a.output {
        causeway_cli_format::Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        causeway_cli_format::Output::Table => print!("{}", render(&report)),
    }
    Ok(())
}

fn render(r: &Report) -> String {
    let ratio = |v: f64, base: f64| if base > 0.0 { format!("{:.2}", v / base) } else { "-".into() };
    let dns_base = r.dns.last().map_or(0.0, |m| m.per_sec);
    let rows: Vec<Vec<String>> = r
        .dns
        .iter()
        .map(|m| {
            vec![
                m.what.clone(),
                format!("{:.0}", m.per_sec),
                ratio(m.per_sec, dns_base),
                format!("{:.3}", m.p50),
                format!("{:.3}", m.p99),
                m.failed.to_string(),
            ]
        })
        .collect();
    let conn_base = r.connect.first().map_or(0.0, |m| m.per_sec);
    let crows: Vec<Vec<String>> = r
        .connect
        .iter()
        .map(|m| {
            vec![
                m.what.clone(),
                format!("{:.0}", m.per_sec),
                ratio(m.per_sec, conn_base),
                format!("{:.0}", m.p50),
                format!("{:.0}", m.p99),
                m.failed.to_string(),
            ]
        })
        .collect();
    format!(
        "DNS, closed loop from a pod ({NAME}):\n{}\nTCP connections to one backend (connect, first line, close):\n{}",
        causeway_cli_format::table(
            &["SERVER", "ANSWERS/S", "VS DNSMASQ", "P50 MS", "P99 MS", "UNANSWERED"],
            &rows
        ),
        causeway_cli_format::table(
            &["ADDRESS", "CONN/S", "VS NO PROGRAM", "P50 µS", "P99 µS", "FAILED"],
            &crows
        )
    )
}

fn which(cmd: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join(cmd)).find(|p| p.is_file()))
}
