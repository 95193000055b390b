//! `causeway benchmark failover`: what losing a cluster's active gateway costs the traffic
//! that crosses it, for each way of losing it (SIGKILL, uplink down, WireGuard dropped), and
//! what failing back costs once it is healed.
//!
//! Two clusters; cluster 2 has a second (standby) gateway node and a real route agent on its
//! worker. Each round: a UDP sequence stream at `--rate` datagrams/s and an iperf3 TCP stream
//! from cluster 1's pod to cluster 2's; two seconds in, cluster 2's active gateway fails. The
//! sink reports the longest gap between arrivals and the datagrams lost; iperf3 says whether
//! the TCP stream survived; gateway 1's status says when the control plane named the gateway
//! the data plane had already moved to (the broker's endpoint lease is 3 s here, heartbeats
//! every second, so a dead gateway's record lapses quickly; a gateway whose WireGuard alone is
//! dropped keeps heartbeating, so the records never agree). Then the gateway is healed during
//! a second stream, and the largest gap of failing back is measured the same way.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use causeway_netns::{
    Topology, TopologySpec,
    exec::{self, Bg},
    ready::{self, Proto},
    topology::{Failure, StandbyNode, StreamStats, wait_for},
};
use serde::{Deserialize, Serialize};

use crate::bench::percentile;

#[derive(clap::Args)]
pub struct FailoverBenchArgs {
    /// Rounds per way of failing.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Ways of failing the active gateway: kill (SIGKILL), link (uplink down), drop (its
    /// WireGuard traffic dropped by nftables).
    #[arg(long, value_delimiter = ',', default_value = "kill,link,drop")]
    how: Vec<String>,
    /// Datagrams per second of the sequence stream.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// `table` for people, `json` for scripts.
    #[arg(long, value_enum, default_value = "table")]
    output: causeway_cli_format::Output,
    /// Also write an SVG plot of every round's largest gap here.
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
    /// Render a saved `--output json` run instead of measuring.
    #[arg(long)]
    from_json: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Round {
    gap_ms: f64,
    lost: u64,
    tcp_survived: bool,
    /// From the failure until gateway 1's records named the gateway it had moved to (none: they
    /// did not within the round).
    agreed_after_secs: Option<f64>,
    fail_back_gap_ms: f64,
    fail_back_lost: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Way {
    how: String,
    rounds: Vec<Round>,
    gap_p50_ms: f64,
    gap_p99_ms: f64,
    gap_max_ms: f64,
    lost_max: u64,
    tcp_survived: usize,
    fail_back_gap_max_ms: f64,
    fail_back_lost_max: u64,
}

/// Seconds of stream before the failure, and after it.
const BEFORE: u32 = 2;
const AFTER: u32 = 6;

pub fn run(a: FailoverBenchArgs) -> anyhow::Result<()> {
    if let Some(path) = &a.from_json {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let ways: Vec<Way> =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        return report(&ways, &a);
    }
    if a.rounds == 0 || a.rate == 0 {
        bail!("--rounds and --rate must be at least 1");
    }
    let hows: Vec<Failure> = a.how.iter().map(|h| h.parse()).collect::<anyhow::Result<_>>()?;
    for tool in ["iperf3", "nft"] {
        if exec::run(&["which", tool]).is_err() {
            bail!("{tool} is missing: scripts/install-deps.sh installs it");
        }
    }
    eprintln!("==> building two clusters; cluster-2 with a standby gateway node and a route agent");
    let (mut t, standby) = topology()?;
    let mut ways = Vec::new();
    for how in hows {
        let mut rounds = Vec::new();
        for r in 1..=a.rounds {
            eprintln!("==> {} round {r}/{}", how.as_str(), a.rounds);
            let round = measure(&mut t, &standby, how, a.rate)?;
            eprintln!(
                "    gap {:.0} ms, lost {}, TCP {}, records agreed {}, fail-back gap {:.0} ms",
                round.gap_ms,
                round.lost,
                if round.tcp_survived { "survived" } else { "broke" },
                round.agreed_after_secs.map_or("never".into(), |s| format!("after {s:.1} s")),
                round.fail_back_gap_ms
            );
            rounds.push(round);
        }
        ways.push(summarize(how, rounds));
    }
    drop(t);
    report(&ways, &a)
}

fn report(ways: &[Way], a: &FailoverBenchArgs) -> anyhow::Result<()> {
    match a.output {
        causeway_cli_format::Output::Json => println!("{}", serde_json::to_string_pretty(ways)?),
        causeway_cli_format::Output::Table => print_table(ways, a.rate),
    }
    if let Some(path) = &a.plot {
        std::fs::write(path, svg(ways)).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(())
}

/// Every round's largest gap, failing over (dots) and failing back (crosses), one column per way
/// of failing, with the 300 ms aim and the 1 s target drawn across.
fn svg(ways: &[Way]) -> String {
    let (w, h, left, bottom, top) = (560.0, 300.0, 60.0, 40.0, 30.0);
    let max = ways.iter().map(|x| x.gap_max_ms).fold(1_000.0_f64, f64::max) * 1.1;
    let y = |v: f64| h - bottom - (h - bottom - top) * v / max;
    #[expect(clippy::cast_precision_loss, reason = "a handful of columns")]
    let slot = (w - left - 20.0) / ways.len().max(1) as f64;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<text x="{cx}" y="18" text-anchor="middle">Largest gap in a 1,000/s stream when the active gateway fails (ms)</text>
<line x1="{left}" y1="{y0}" x2="{xr}" y2="{y0}" stroke="black"/><line x1="{left}" y1="{top}" x2="{left}" y2="{y0}" stroke="black"/>
"#,
        cx = w / 2.0,
        y0 = h - bottom,
        xr = w - 10.0
    );
    for (v, label, color) in [(300.0, "aim 300 ms", "#6acc64"), (1_000.0, "target 1 s", "#d65f5f")] {
        s.push_str(&format!(
            r#"<line x1="{left}" y1="{yy:.1}" x2="{xr}" y2="{yy:.1}" stroke="{color}" stroke-dasharray="4 3"/><text x="{xt}" y="{yt:.1}" font-size="10" fill="{color}">{label}</text>
"#,
            yy = y(v),
            xr = w - 10.0,
            xt = w - 80.0,
            yt = y(v) - 3.0
        ));
    }
    for frac in [0.0, 0.5, 1.0] {
        let v = max / 1.1 * frac;
        s.push_str(&format!(
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="10">{v:.0}</text>
"#,
            left - 4.0,
            y(v) + 3.0
        ));
    }
    for (i, way) in ways.iter().enumerate() {
        #[expect(clippy::cast_precision_loss, reason = "a handful of columns")]
        let cx = left + slot * (i as f64 + 0.5);
        for (k, r) in way.rounds.iter().enumerate() {
            #[expect(clippy::cast_precision_loss, reason = "a handful of rounds")]
            let dx = (k as f64 - (way.rounds.len() as f64 - 1.0) / 2.0) * 6.0;
            s.push_str(&format!(
                r##"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="#4878d0"><title>{} round {}: {:.0} ms</title></circle><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10" fill="#ee854a">×</text>
"##,
                cx - 12.0 + dx,
                y(r.gap_ms),
                way.how,
                k + 1,
                r.gap_ms,
                cx + 24.0 + dx,
                y(r.fail_back_gap_ms) + 3.0
            ));
        }
        s.push_str(&format!(
            r#"<text x="{cx:.1}" y="{:.1}" text-anchor="middle">{}</text>
"#,
            h - bottom + 16.0,
            way.how
        ));
    }
    s.push_str(&format!(
        r##"<circle cx="{a}" cy="39" r="3.5" fill="#4878d0"/><text x="{b}" y="43">failing over</text><text x="{c}" y="43" fill="#ee854a">× failing back</text>
</svg>
"##,
        a = left + 15.0,
        b = left + 24.0,
        c = left + 110.0
    ));
    s
}

fn topology() -> anyhow::Result<(Topology, StandbyNode)> {
    let bin = std::env::current_exe().context("locating the causeway binary")?;
    let mut spec = TopologySpec::new("cwbf", 2, bin);
    spec.broker_args = vec!["--endpoint-lease-seconds".into(), "3".into()];
    spec.gateway_args = vec!["--heartbeat-seconds".into(), "1".into()];
    let mut t = Topology::build(spec)?;
    t.start_broker()?;
    t.start_gateway(1)?;
    t.start_gateway(2)?;
    t.wait_connected(Duration::from_secs(60))?;
    let standby = t.start_standby_gateway(2)?;
    t.start_route_agent(2)?;
    settled(&t, &standby, Duration::from_secs(60))?;
    Ok((t, standby))
}

/// Waits until gateway 1 sends cluster 2's traffic to its first gateway, on the records' word,
/// with the standby warm, and cluster 2's worker routes through the first gateway too.
fn settled(t: &Topology, standby: &StandbyNode, timeout: Duration) -> anyhow::Result<()> {
    let (b, sb) = (t.clusters[1].clone(), format!("{}:51820", standby.ip));
    wait_for(timeout, "cluster-2 carried by its first gateway again", || {
        t.gateway_status(1).is_ok_and(|s| {
            s.connections.iter().any(|c| {
                c.cluster_id == "cluster-2"
                    && c.endpoint == format!("{}:51820", b.gw_ip)
                    && c.status == "connected"
                    && c.carrier.as_ref().is_some_and(|v| !v.provisional)
            }) && s.standbys.iter().any(|x| x.endpoint == sb && x.status == "connected")
        }) && t.worker_nexthop(2).contains("via 172.20.2.1 ")
    })
}

/// A sequence stream of `secs` seconds from cluster 1's pod to cluster 2's; `during` runs
/// `after` into it. Returns what the sink saw.
fn stream(
    t: &mut Topology,
    rate: u32,
    secs: u32,
    after: Duration,
    during: impl FnOnce(&mut Topology),
) -> anyhow::Result<StreamStats> {
    let s = t.sequence_stream((1, 2), (rate, secs), after, during)?;
    let last = u64::from(rate) * u64::from(secs) - 1;
    if s.last_seq.is_none_or(|l| l + u64::from(rate) < last) {
        bail!("the stream stopped at {:?} of {last}: the traffic did not come back", s.last_seq);
    }
    Ok(s)
}

fn measure(t: &mut Topology, standby: &StandbyNode, how: Failure, rate: u32) -> anyhow::Result<Round> {
    let (a, b) = (t.clusters[0].clone(), t.clusters[1].clone());
    // TCP alongside, paced so that it does not starve the probes of this 2-core machine.
    let server = Bg::start(&b.pod_ns, &["iperf3", "-s", "-1", "-B", &b.pod_ip], Stdio::null());
    ready::wait_listening(&b.pod_ns, &format!("{}:5201", b.pod_ip), Proto::Tcp)?;
    let secs = (BEFORE + AFTER).to_string();
    let client =
        Bg::start(&a.pod_ns, &["iperf3", "-c", &b.pod_ip, "-t", &secs, "-b", "100M", "-J"], Stdio::piped());
    let socket = t.clusters[0].status_socket.clone();
    let want = format!("{}:51820", standby.ip);
    let mut watcher = None;
    let s = stream(t, rate, BEFORE + AFTER, Duration::from_secs(BEFORE.into()), |t| {
        let failed_at = Instant::now();
        if let Err(e) = t.fail_gateway(2, how) {
            eprintln!("failing the gateway: {e:#}");
        }
        // The records' agreement, as gateway 1 sees it, polled from the failure on.
        watcher = Some(std::thread::spawn(move || agreed(&socket, &want, failed_at)));
    })?;
    let agreed_after_secs = watcher.and_then(|w| w.join().ok()).flatten();
    let report = client.output();
    drop(server);
    let tcp_survived = serde_json::from_str::<serde_json::Value>(&report).is_ok_and(|v| {
        v.get("error").is_none() && v["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0) > 0
    });
    let back = stream(t, rate, 10, Duration::from_secs(1), |t| {
        if let Err(e) = t.heal_gateway(2) {
            eprintln!("healing the gateway: {e:#}");
        }
    })?;
    settled(t, standby, Duration::from_secs(30))?;
    Ok(Round {
        gap_ms: s.max_gap_ms,
        lost: s.lost,
        tcp_survived,
        agreed_after_secs,
        fail_back_gap_ms: back.max_gap_ms,
        fail_back_lost: back.lost,
    })
}

/// Seconds from `failed_at` until gateway 1 (status socket `socket`) carries cluster 2 on the
/// standby (`want`) and no longer provisionally (the records name it), if that happens within
/// 10 s of the failure.
fn agreed(socket: &std::path::Path, want: &str, failed_at: Instant) -> Option<f64> {
    while failed_at.elapsed() < Duration::from_secs(10) {
        let confirmed = causeway_broker_api::status::fetch(socket).is_ok_and(|s| {
            s.connections.iter().any(|c| {
                c.cluster_id == "cluster-2"
                    && c.endpoint == want
                    && c.carrier.as_ref().is_some_and(|v| !v.provisional)
            })
        });
        if confirmed {
            return Some(failed_at.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

fn summarize(how: Failure, rounds: Vec<Round>) -> Way {
    let mut gaps: Vec<f64> = rounds.iter().map(|r| r.gap_ms).collect();
    gaps.sort_by(f64::total_cmp);
    Way {
        how: how.as_str().to_owned(),
        gap_p50_ms: percentile(&gaps, 0.5),
        gap_p99_ms: percentile(&gaps, 0.99),
        gap_max_ms: gaps.last().copied().unwrap_or(0.0),
        lost_max: rounds.iter().map(|r| r.lost).max().unwrap_or(0),
        tcp_survived: rounds.iter().filter(|r| r.tcp_survived).count(),
        fail_back_gap_max_ms: rounds.iter().map(|r| r.fail_back_gap_ms).fold(0.0, f64::max),
        fail_back_lost_max: rounds.iter().map(|r| r.fail_back_lost).max().unwrap_or(0),
        rounds,
    }
}

fn print_table(ways: &[Way], rate: u32) {
    let rows: Vec<Vec<String>> = ways
        .iter()
        .map(|w| {
            let mut agreed: Vec<f64> = w.rounds.iter().filter_map(|r| r.agreed_after_secs).collect();
            agreed.sort_by(f64::total_cmp);
            vec![
                w.how.clone(),
                w.rounds.len().to_string(),
                format!("{:.0} / {:.0} / {:.0}", w.gap_p50_ms, w.gap_p99_ms, w.gap_max_ms),
                w.lost_max.to_string(),
                format!("{}/{}", w.tcp_survived, w.rounds.len()),
                if agreed.is_empty() { "never".into() } else { format!("{:.1} s", percentile(&agreed, 0.5)) },
                format!("{:.0}", w.fail_back_gap_max_ms),
                w.fail_back_lost_max.to_string(),
            ]
        })
        .collect();
    println!("\nfailover of cluster-2's active gateway ({rate} datagrams/s and iperf3 TCP from cluster-1):");
    print!(
        "{}",
        causeway_cli_format::table(
            &[
                "FAILURE",
                "ROUNDS",
                "LARGEST GAP p50/p99/max (ms)",
                "LOST (max)",
                "TCP SURVIVED",
                "RECORDS AGREED (median)",
                "FAIL-BACK GAP max (ms)",
                "FAIL-BACK LOST (max)"
            ],
            &rows
        )
    );
    println!(
        "detection: 3 probes missed at 100 ms; fail-back after 5 s of answers \
         (Submariner: health check every 1 s, 5 misses; gateway Lease 15 s, renewed every 10 s)"
    );
}
