//! `causeway benchmark dataplane`: the same two-cluster namespace topology three ways — raw
//! veth routing (the ceiling), Causeway, and Debian's wireguard-go configured with `wg` — and
//! pod-to-pod measurements taken interleaved round by round: iperf3 TCP with 1 and 4 streams,
//! 64-byte UDP packet rate, ping RTT. Prints medians, spreads and ratios.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use causeway_netns::{Topology, TopologySpec, exec};
use serde::Serialize;

#[derive(clap::Args)]
pub struct DataplaneBenchArgs {
    /// Rounds; every figure is measured once per configuration per round.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 3)]
    seconds: u32,
    #[arg(long, value_enum, default_value = "table")]
    output: crate::show::Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Config {
    Raw,
    Causeway,
    WireguardGo,
}

impl Config {
    const ALL: [Config; 3] = [Config::Raw, Config::Causeway, Config::WireguardGo];
    fn name(self) -> &'static str {
        match self {
            Config::Raw => "raw veth",
            Config::Causeway => "causeway",
            Config::WireguardGo => "wireguard-go",
        }
    }
    fn prefix(self) -> &'static str {
        match self {
            Config::Raw => "cwbr",
            Config::Causeway => "cwbc",
            Config::WireguardGo => "cwbw",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) enum Metric {
    Tcp1Gbps,
    Tcp4Gbps,
    Udp64Kpps,
    PingP50Us,
    PingP99Us,
}

impl Metric {
    const ALL: [Metric; 5] =
        [Metric::Tcp1Gbps, Metric::Tcp4Gbps, Metric::Udp64Kpps, Metric::PingP50Us, Metric::PingP99Us];
    fn label(self) -> &'static str {
        match self {
            Metric::Tcp1Gbps => "TCP 1 stream (Gb/s)",
            Metric::Tcp4Gbps => "TCP 4 streams (Gb/s)",
            Metric::Udp64Kpps => "UDP 64 B (kpps recv)",
            Metric::PingP50Us => "ping p50 (µs)",
            Metric::PingP99Us => "ping p99 (µs)",
        }
    }
    fn higher_is_better(self) -> bool {
        !matches!(self, Metric::PingP50Us | Metric::PingP99Us)
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Figure {
    config: Config,
    metric: Metric,
    samples: Vec<f64>,
    median: f64,
    min: f64,
    max: f64,
}

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() { 0.0 } else { s[s.len() / 2] }
}

/// Builds the topology of one configuration and starts its data plane.
fn build(config: Config) -> anyhow::Result<Topology> {
    let bin = std::env::current_exe()?;
    let mut spec = TopologySpec::new(config.prefix(), 2, bin);
    spec.gateway_args = vec!["--metrics-listen".into(), "off".into()];
    let mut t = Topology::build(spec)?;
    match config {
        Config::Raw => {
            // Plain IP forwarding between the gateways over the underlay.
            for (me, other) in [(0, 1), (1, 0)] {
                let (ns, via) = (t.clusters[me].gw_ns.clone(), t.clusters[other].gw_ip.clone());
                for cidr in [&t.clusters[other].pod_cidr, &t.clusters[other].service_cidr] {
                    exec::ip(&ns, &["route", "add", cidr, "via", &via])?;
                }
            }
        }
        Config::Causeway => {
            t.start_broker()?;
            t.start_gateway(1)?;
            t.start_gateway(2)?;
            t.wait_connected(Duration::from_secs(30))?;
        }
        Config::WireguardGo => wireguard_go(&t)?,
    }
    Ok(t)
}

fn wg_stdin(args: &[&str], input: &str) -> anyhow::Result<String> {
    use std::io::Write as _;
    let mut child = Command::new("wg").args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("wg {args:?} failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Both gateways run Debian's wireguard-go, configured with `wg` like a stock deployment.
fn wireguard_go(t: &Topology) -> anyhow::Result<()> {
    let keys: Vec<(String, String)> = (0..2)
        .map(|_| {
            let private = wg_stdin(&["genkey"], "")?;
            let public = wg_stdin(&["pubkey"], &format!("{private}\n"))?;
            Ok((private, public))
        })
        .collect::<anyhow::Result<_>>()?;
    for (me, other) in [(0usize, 1usize), (1, 0)] {
        let c = &t.clusters[me];
        let r = &t.clusters[other];
        let key_file = t.spec.run_dir.join(format!("wggo{me}.key"));
        std::fs::write(&key_file, format!("{}\n", keys[me].0))?;
        Command::new("ip")
            .args(["netns", "exec", &c.gw_ns, "wireguard-go", &c.device])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("starting wireguard-go")?;
        let endpoint = format!("{}:51820", r.gw_ip);
        let allowed = format!("{},{}", r.pod_cidr, r.service_cidr);
        exec::in_ns(
            &c.gw_ns,
            &[
                "wg",
                "set",
                &c.device,
                "private-key",
                &key_file.display().to_string(),
                "listen-port",
                "51820",
                "peer",
                &keys[other].1,
                "endpoint",
                &endpoint,
                "allowed-ips",
                &allowed,
            ],
        )?;
        exec::ip(&c.gw_ns, &["link", "set", &c.device, "mtu", "1420", "up"])?;
        for cidr in [&r.pod_cidr, &r.service_cidr] {
            exec::ip(&c.gw_ns, &["route", "add", cidr, "dev", &c.device])?;
        }
    }
    if !exec::ping(&t.clusters[0].pod_ns, &t.clusters[1].pod_ip, 3) {
        bail!("the wireguard-go tunnel does not carry traffic");
    }
    Ok(())
}

fn iperf(t: &Topology, extra: &[&str], seconds: u32) -> anyhow::Result<serde_json::Value> {
    let (a, b) = (&t.clusters[0], &t.clusters[1]);
    let mut server = Command::new("ip")
        .args(["netns", "exec", &b.pod_ns, "iperf3", "-s", "-1", "-B", &b.pod_ip])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s")?;
    std::thread::sleep(Duration::from_millis(300));
    let secs = seconds.to_string();
    let mut args = vec!["iperf3", "-c", &b.pod_ip, "-t", &secs, "-J"];
    args.extend_from_slice(extra);
    let out = exec::in_ns(&a.pod_ns, &args);
    let _ = server.kill();
    let _ = server.wait();
    Ok(serde_json::from_slice(&out?.stdout)?)
}

pub(crate) fn measure(t: &Topology, metric: Metric, seconds: u32) -> anyhow::Result<f64> {
    match metric {
        Metric::Tcp1Gbps | Metric::Tcp4Gbps => {
            let streams = if metric == Metric::Tcp1Gbps { "1" } else { "4" };
            let j = iperf(t, &["-P", streams], seconds)?;
            Ok(j["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9)
        }
        Metric::Udp64Kpps => {
            let j = iperf(t, &["-u", "-b", "0", "-l", "64"], seconds)?;
            let sum = &j["end"]["sum"];
            let packets = sum["packets"].as_f64().unwrap_or(0.0);
            let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
            let secs = sum["seconds"].as_f64().unwrap_or(f64::from(seconds)).max(0.001);
            Ok((packets - lost).max(0.0) / secs / 1000.0)
        }
        Metric::PingP50Us | Metric::PingP99Us => {
            let (a, b) = (&t.clusters[0], &t.clusters[1]);
            let out = exec::in_ns(&a.pod_ns, &["ping", "-n", "-c", "200", "-i", "0.005", &b.pod_ip])?;
            let mut rtts: Vec<f64> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.split("time=").nth(1)?.split(' ').next()?.parse::<f64>().ok())
                .map(|ms| ms * 1000.0)
                .collect();
            rtts.sort_by(f64::total_cmp);
            if rtts.is_empty() {
                bail!("no ping replies");
            }
            Ok(crate::bench::percentile(&rtts, if metric == Metric::PingP50Us { 0.5 } else { 0.99 }))
        }
    }
}

pub fn run(a: DataplaneBenchArgs) -> anyhow::Result<()> {
    let mut topologies = Vec::new();
    for c in Config::ALL {
        eprintln!("==> building the {} topology", c.name());
        topologies.push((c, build(c).with_context(|| format!("setting up {}", c.name()))?));
    }
    let mut samples: Vec<(Config, Metric, Vec<f64>)> = Vec::new();
    for round in 1..=a.rounds {
        for metric in Metric::ALL {
            for (c, t) in &topologies {
                eprintln!("==> round {round}/{}: {} over {}", a.rounds, metric.label(), c.name());
                let v = measure(t, metric, a.seconds)
                    .with_context(|| format!("{} over {}", metric.label(), c.name()))?;
                match samples.iter_mut().find(|(sc, sm, _)| sc == c && *sm == metric) {
                    Some((_, _, s)) => s.push(v),
                    None => samples.push((*c, metric, vec![v])),
                }
            }
        }
    }
    drop(topologies);
    let figures: Vec<Figure> = samples
        .into_iter()
        .map(|(config, metric, s)| Figure {
            config,
            metric,
            median: median(&s),
            min: s.iter().copied().fold(f64::INFINITY, f64::min),
            max: s.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            samples: s,
        })
        .collect();
    let get = |c: Config, m: Metric| {
        figures.iter().find(|f| f.config == c && f.metric == m).map_or(0.0, |f| f.median)
    };
    match a.output {
        crate::show::Output::Json => println!("{}", serde_json::to_string_pretty(&figures)?),
        crate::show::Output::Table => {
            let mut rows = Vec::new();
            for m in Metric::ALL {
                let mut row = vec![m.label().to_owned()];
                for c in Config::ALL {
                    let f = figures.iter().find(|f| f.config == c && f.metric == m).expect("measured");
                    row.push(format!("{:.2} ({:.2}–{:.2})", f.median, f.min, f.max));
                }
                // Ratios: > 1 means Causeway is better, whatever the metric's direction.
                let ratio = |other: Config| {
                    let (ours, theirs) = (get(Config::Causeway, m), get(other, m));
                    let r = if m.higher_is_better() { ours / theirs } else { theirs / ours };
                    format!("{r:.2}×")
                };
                row.push(ratio(Config::WireguardGo));
                row.push(ratio(Config::Raw));
                rows.push(row);
            }
            print!(
                "{}",
                crate::show::table(
                    &[
                        "METRIC (median, min–max)",
                        "RAW VETH",
                        "CAUSEWAY",
                        "WIREGUARD-GO",
                        "CW vs WG-GO",
                        "CW vs RAW"
                    ],
                    &rows
                )
            );
            println!("ratios > 1 favour Causeway ({} rounds, interleaved)", a.rounds);
        }
    }
    Ok(())
}
