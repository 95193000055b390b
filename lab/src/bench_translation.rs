//! `causeway benchmark translation`: what overlap mode's prefix translation costs, on one
//! two-cluster topology. Each round measures with overlap mode off (pods address each other
//! at their own addresses, the translation tries empty), switches the cluster set to overlap
//! mode (the broker allocates global prefixes, the gateways fill the tries and reroute), and
//! measures again at the global addresses; rounds alternate which goes first, so drift on the
//! machine hits both alike. Prints medians and the on/off ratio per figure.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use causeway_netns::{Topology, exec, topology::wait_for};

use crate::bench_dataplane::{Metric, measure_to, median, start_causeway, topology};

#[derive(clap::Args)]
pub struct TranslationBenchArgs {
    /// Rounds; every figure is measured once each way per round.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 3)]
    seconds: u32,
}

const METRICS: [Metric; 4] = [Metric::Tcp1Gbps, Metric::Tcp4Gbps, Metric::Udp64Kpps, Metric::PingP50Us];

/// Switches overlap mode and waits until cluster 1's pod reaches cluster 2's at the address
/// that mode uses; returns that address.
fn switch(t: &Topology, on: bool) -> anyhow::Result<String> {
    let admin = t.admin_credentials().display().to_string();
    let flag = if on { "--overlap-mode" } else { "--no-overlap-mode" };
    let bin = t.spec.causeway_bin.display().to_string();
    exec::in_ns(&t.broker_ns, &[&bin, "cluster-set", flag, "--credentials", &admin])
        .with_context(|| format!("cluster-set {flag}"))?;
    let b = &t.clusters[1];
    let to = if on { global_pod_address(t)? } else { b.pod_ip.clone() };
    let since = Instant::now();
    wait_for(Duration::from_secs(20), &format!("cluster 2's pod answering at {to}"), || {
        exec::ping(&t.clusters[0].pod_ns, &to, 1)
    })?;
    eprintln!("  overlap mode {}: {to} answers after {:?}", if on { "on" } else { "off" }, since.elapsed());
    Ok(to)
}

/// Cluster 2's pod at its global address (the broker allocated it when overlap mode came on).
fn global_pod_address(t: &Topology) -> anyhow::Result<String> {
    let admin = t.admin_credentials().display().to_string();
    let bin = t.spec.causeway_bin.display().to_string();
    let out = exec::in_ns(&t.broker_ns, &[&bin, "show", "clusters", "-o", "json", "--credentials", &admin])?;
    let objects: Vec<causeway_broker_api::Object> = serde_json::from_slice(&out.stdout)?;
    let b = &t.clusters[1];
    let pods: ipnetwork::IpNetwork = b.pod_cidr.parse()?;
    let global = objects
        .iter()
        .find_map(|o| match &o.record {
            causeway_broker_api::Record::Cluster(c) if c.cluster_id == b.cluster_id => c.global_of(&pods),
            _ => None,
        })
        .context("cluster 2 has no global prefix")?;
    causeway_broker_api::GlobalCidr::map(&pods, &global, b.pod_ip.parse()?)
        .map(|a| a.to_string())
        .context("the pod is outside its CIDR")
}

pub fn run(a: TranslationBenchArgs) -> anyhow::Result<()> {
    if a.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    eprintln!("==> building two clusters and starting Causeway");
    let mut t = topology("cwbt")?;
    start_causeway(&mut t)?;
    // The workers' stand-in routes know the other cluster's CIDRs; in overlap mode it is
    // reached at a global prefix from 242.0.0.0/8, which they send to their gateway too.
    for c in &t.clusters {
        let via = format!("172.20.{}.1", c.index);
        exec::ip(&c.node_ns, &["route", "add", causeway_broker_api::DEFAULT_GLOBAL_POOL, "via", &via])?;
    }
    let mut off: Vec<Vec<f64>> = vec![Vec::new(); METRICS.len()];
    let mut on: Vec<Vec<f64>> = vec![Vec::new(); METRICS.len()];
    for round in 1..=a.rounds {
        // Alternate the order: odd rounds off first, even rounds on first.
        let order = if round % 2 == 1 { [false, true] } else { [true, false] };
        for mode in order {
            eprintln!("==> round {round}/{}: translation {}", a.rounds, if mode { "on" } else { "off" });
            let to = switch(&t, mode)?;
            for (i, m) in METRICS.iter().enumerate() {
                let v = measure_to(&t, *m, a.seconds, &to)?;
                if mode { on[i].push(v) } else { off[i].push(v) }
            }
        }
    }
    let rows: Vec<Vec<String>> = METRICS
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let (x, y) = (median(&off[i]), median(&on[i]));
            let spread = |v: &[f64]| {
                let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                format!("{lo:.2}–{hi:.2}")
            };
            vec![
                m.label().to_owned(),
                format!("{x:.2} ({})", spread(&off[i])),
                format!("{y:.2} ({})", spread(&on[i])),
                format!("{:.3}", if x > 0.0 { y / x } else { 0.0 }),
            ]
        })
        .collect();
    println!(
        "{}",
        causeway_cli_format::table(&["FIGURE", "TRANSLATION OFF", "TRANSLATION ON", "ON / OFF"], &rows)
    );
    println!(
        "medians of {} interleaved rounds (min–max in parentheses), {} s per iperf3 run",
        a.rounds, a.seconds
    );
    t.teardown()?;
    Ok(())
}
