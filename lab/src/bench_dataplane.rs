//! `causeway benchmark dataplane`: the same two-cluster namespace topology four ways — raw
//! veth routing (the ceiling), Causeway, Debian's wireguard-go and boringtun-cli (both
//! configured with `wg`; boringtun-cli when it is installed) — and pod-to-pod measurements
//! taken interleaved round by round: iperf3 TCP with 1 and 4 streams, 64-byte and 1,400-byte
//! UDP packet rates, ping RTT, and the machine's CPU time per gigabit during the single-stream
//! run. Prints medians, spreads and ratios; optionally an SVG of the ratios.

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
    /// `table` for people, `json` for scripts.
    #[arg(long, value_enum, default_value = "table")]
    output: causeway_cli_format::Output,
    /// Also write an SVG plot of Causeway's and boringtun-cli's figures relative to
    /// wireguard-go's.
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
    /// Measure nothing: print (and plot) the figures of an earlier `--output json` run.
    #[arg(long)]
    from_json: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Config {
    Raw,
    Causeway,
    WireguardGo,
    BoringtunCli,
}

impl Config {
    const ALL: [Config; 4] = [Config::Raw, Config::Causeway, Config::WireguardGo, Config::BoringtunCli];
    fn name(self) -> &'static str {
        match self {
            Config::Raw => "raw veth",
            Config::Causeway => "causeway",
            Config::WireguardGo => "wireguard-go",
            Config::BoringtunCli => "boringtun-cli",
        }
    }
    fn prefix(self) -> &'static str {
        match self {
            Config::Raw => "cwbr",
            Config::Causeway => "cwbc",
            Config::WireguardGo => "cwbw",
            Config::BoringtunCli => "cwbb",
        }
    }
    /// The userspace WireGuard command of a peer configuration (device name appended).
    fn userspace(self) -> Option<&'static [&'static str]> {
        match self {
            Config::WireguardGo => Some(&["wireguard-go"]),
            // As root it would drop to `nobody` and lose the right to configure its device.
            Config::BoringtunCli => Some(&["boringtun-cli", "--disable-drop-privileges"]),
            Config::Raw | Config::Causeway => None,
        }
    }
}

fn installed(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) enum Metric {
    Tcp1Gbps,
    Tcp4Gbps,
    Udp64Kpps,
    Udp1400Kpps,
    PingP50Us,
    PingP99Us,
    CpuSecsPerGb,
}

impl Metric {
    const ALL: [Metric; 7] = [
        Metric::Tcp1Gbps,
        Metric::Tcp4Gbps,
        Metric::Udp64Kpps,
        Metric::Udp1400Kpps,
        Metric::PingP50Us,
        Metric::PingP99Us,
        Metric::CpuSecsPerGb,
    ];
    pub(crate) fn label(self) -> &'static str {
        match self {
            Metric::Tcp1Gbps => "TCP 1 stream (Gb/s)",
            Metric::Tcp4Gbps => "TCP 4 streams (Gb/s)",
            Metric::Udp64Kpps => "UDP 64 B (kpps recv)",
            Metric::Udp1400Kpps => "UDP 1400 B packets (kpps recv)",
            Metric::PingP50Us => "ping p50 (µs)",
            Metric::PingP99Us => "ping p99 (µs)",
            Metric::CpuSecsPerGb => "CPU s per Gb, TCP 1 stream",
        }
    }
    /// For the plot's axis.
    fn short(self) -> &'static str {
        match self {
            Metric::Tcp1Gbps => "TCP 1",
            Metric::Tcp4Gbps => "TCP 4",
            Metric::Udp64Kpps => "UDP 64 B",
            Metric::Udp1400Kpps => "UDP 1400 B",
            Metric::PingP50Us => "ping p50",
            Metric::PingP99Us => "ping p99",
            Metric::CpuSecsPerGb => "CPU per Gb",
        }
    }
    fn higher_is_better(self) -> bool {
        !matches!(self, Metric::PingP50Us | Metric::PingP99Us | Metric::CpuSecsPerGb)
    }
}

#[derive(Debug, Serialize, serde::Deserialize)]
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

/// The two-cluster topology every benchmark measures, named `prefix`…, with no metrics
/// listeners (nothing but the measured traffic).
pub(crate) fn topology(prefix: &str) -> anyhow::Result<Topology> {
    let mut spec = TopologySpec::new(prefix, 2, std::env::current_exe()?);
    spec.gateway_args = vec!["--metrics-listen".into(), "off".into()];
    Topology::build(spec)
}

/// Starts a broker and both clusters' Causeway gateways, and waits for the tunnel.
pub(crate) fn start_causeway(t: &mut Topology) -> anyhow::Result<()> {
    t.start_broker()?;
    t.start_gateway(1)?;
    t.start_gateway(2)?;
    t.wait_connected(Duration::from_secs(30))
}

/// Builds the topology of one configuration and starts its data plane.
fn build(config: Config) -> anyhow::Result<Topology> {
    let mut t = topology(config.prefix())?;
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
        Config::Causeway => start_causeway(&mut t)?,
        Config::WireguardGo | Config::BoringtunCli => userspace_wireguard(&t, config)?,
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

/// Both gateways run a userspace WireGuard (wireguard-go or boringtun-cli), configured with
/// `wg` like a stock deployment.
fn userspace_wireguard(t: &Topology, config: Config) -> anyhow::Result<()> {
    let command = config.userspace().context("not a userspace WireGuard configuration")?;
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
        // Both daemonise once the device and its UAPI socket are up.
        let started = Command::new("ip")
            .args(["netns", "exec", &c.gw_ns])
            .args(command)
            .arg(&c.device)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .with_context(|| format!("starting {}", config.name()))?;
        if !started.success() {
            bail!("{} exited with {started}", config.name());
        }
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
        bail!("the {} tunnel does not carry traffic", config.name());
    }
    Ok(())
}

fn iperf(t: &Topology, extra: &[&str], seconds: u32, to: &str) -> anyhow::Result<serde_json::Value> {
    let (a, b) = (&t.clusters[0], &t.clusters[1]);
    let mut server = Command::new("ip")
        .args(["netns", "exec", &b.pod_ns, "iperf3", "-s", "-1", "-B", &b.pod_ip])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s")?;
    std::thread::sleep(Duration::from_millis(300));
    let secs = seconds.to_string();
    let mut args = vec!["iperf3", "-c", to, "-t", &secs, "-J"];
    args.extend_from_slice(extra);
    let out = exec::in_ns(&a.pod_ns, &args);
    let _ = server.kill();
    let _ = server.wait();
    Ok(serde_json::from_slice(&out?.stdout)?)
}

pub(crate) fn measure(t: &Topology, metric: Metric, seconds: u32) -> anyhow::Result<f64> {
    measure_to(t, metric, seconds, &t.clusters[1].pod_ip)
}

/// [`measure`] with cluster 2's pod addressed as `to` (its global address in overlap mode).
pub(crate) fn measure_to(t: &Topology, metric: Metric, seconds: u32, to: &str) -> anyhow::Result<f64> {
    match metric {
        Metric::Tcp1Gbps | Metric::Tcp4Gbps => {
            let streams = if metric == Metric::Tcp1Gbps { "1" } else { "4" };
            let j = iperf(t, &["-P", streams], seconds, to)?;
            Ok(j["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9)
        }
        Metric::Udp64Kpps | Metric::Udp1400Kpps => {
            // 1,400-byte IP packets: 1,372 bytes of payload (fits every tunnel's 1,420 MTU).
            let len = if metric == Metric::Udp64Kpps { "64" } else { "1372" };
            let j = iperf(t, &["-u", "-b", "0", "-l", len], seconds, to)?;
            let sum = &j["end"]["sum"];
            let packets = sum["packets"].as_f64().unwrap_or(0.0);
            let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
            let secs = sum["seconds"].as_f64().unwrap_or(f64::from(seconds)).max(0.001);
            Ok((packets - lost).max(0.0) / secs / 1000.0)
        }
        Metric::CpuSecsPerGb => {
            // The whole machine's busy time while one stream runs: both gateways, both pods'
            // stacks, iperf3 itself — the same overheads for every configuration.
            let before = cpu_busy_secs()?;
            let j = iperf(t, &["-P", "1"], seconds, to)?;
            let busy = cpu_busy_secs()? - before;
            let gigabits = j["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0) * 8.0 / 1e9;
            if gigabits <= 0.0 {
                bail!("nothing received");
            }
            Ok(busy / gigabits)
        }
        Metric::PingP50Us | Metric::PingP99Us => {
            let a = &t.clusters[0];
            let out = exec::in_ns(&a.pod_ns, &["ping", "-n", "-c", "200", "-i", "0.005", to])?;
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

/// CPU seconds spent busy (not idle, not waiting for I/O) by all CPUs since boot.
fn cpu_busy_secs() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .context("no cpu line in /proc/stat")?
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …, in USER_HZ (100 on Linux).
    let total: f64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0.0) + fields.get(4).copied().unwrap_or(0.0);
    Ok((total - idle) / 100.0)
}

pub fn run(a: DataplaneBenchArgs) -> anyhow::Result<()> {
    let figures = match &a.from_json {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not a benchmark's JSON", path.display()))?
        }
        None => measure_all(&a)?,
    };
    report(&a, &figures)
}

fn measure_all(a: &DataplaneBenchArgs) -> anyhow::Result<Vec<Figure>> {
    let configs: Vec<Config> = Config::ALL
        .into_iter()
        .filter(|c| {
            let missing = c.userspace().and_then(|cmd| (!installed(cmd[0])).then_some(cmd[0]));
            if let Some(program) = missing {
                eprintln!(
                    "==> skipping {}: `{program}` is not installed (scripts/install-bench-peers.sh)",
                    c.name()
                );
            }
            missing.is_none()
        })
        .collect();
    let mut topologies = Vec::new();
    for c in configs.iter().copied() {
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
    Ok(samples
        .into_iter()
        .map(|(config, metric, s)| Figure {
            config,
            metric,
            median: median(&s),
            min: s.iter().copied().fold(f64::INFINITY, f64::min),
            max: s.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            samples: s,
        })
        .collect())
}

fn report(a: &DataplaneBenchArgs, figures: &[Figure]) -> anyhow::Result<()> {
    let configs: Vec<Config> =
        Config::ALL.into_iter().filter(|c| figures.iter().any(|f| f.config == *c)).collect();
    if !configs.contains(&Config::Causeway) || !configs.contains(&Config::WireguardGo) {
        bail!("the figures lack Causeway's or wireguard-go's");
    }
    let get = |c: Config, m: Metric| {
        figures.iter().find(|f| f.config == c && f.metric == m).map_or(0.0, |f| f.median)
    };
    match a.output {
        causeway_cli_format::Output::Json => println!("{}", serde_json::to_string_pretty(&figures)?),
        causeway_cli_format::Output::Table => {
            let others: Vec<Config> = configs.iter().copied().filter(|c| *c != Config::Causeway).collect();
            let mut rows = Vec::new();
            for m in Metric::ALL {
                let mut row = vec![m.label().to_owned()];
                for c in &configs {
                    let f = figures.iter().find(|f| f.config == *c && f.metric == m).expect("measured");
                    row.push(format!("{:.2} ({:.2}–{:.2})", f.median, f.min, f.max));
                }
                for other in &others {
                    row.push(format!("{:.2}×", ratio(get(Config::Causeway, m), get(*other, m), m)));
                }
                rows.push(row);
            }
            let mut headers = vec!["METRIC (median, min–max)".to_owned()];
            headers.extend(configs.iter().map(|c| c.name().to_uppercase()));
            headers.extend(others.iter().map(|c| format!("CW vs {}", c.name().to_uppercase())));
            let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
            print!("{}", causeway_cli_format::table(&headers, &rows));
            let rounds = figures.first().map_or(0, |f| f.samples.len());
            println!("ratios > 1 favour Causeway ({rounds} rounds, interleaved)");
            let added: Vec<String> = configs
                .iter()
                .filter(|c| **c != Config::Raw)
                .map(|c| format!("{} {:.0} µs", c.name(), added_rtt(&get, *c)))
                .collect();
            if configs.contains(&Config::Raw) {
                println!("ping p50 added over raw veth: {}", added.join(", "));
            }
            let rows: Vec<Vec<String>> = targets(&configs, &get)
                .into_iter()
                .map(|t| vec![t.what, t.goal, t.reached, (if t.met { "met" } else { "NOT MET" }).to_owned()])
                .collect();
            println!("\ntargets (docs/benchmarks.md), this run:");
            print!("{}", causeway_cli_format::table(&["TARGET", "GOAL", "REACHED", ""], &rows));
        }
    }
    if let Some(path) = &a.plot {
        std::fs::write(path, svg(&configs, &get)).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(())
}

/// What the data plane adds to a pod-to-pod round trip: p50 over raw veth's p50.
fn added_rtt(get: &dyn Fn(Config, Metric) -> f64, c: Config) -> f64 {
    get(c, Metric::PingP50Us) - get(Config::Raw, Metric::PingP50Us)
}

/// One of the data plane's performance targets, checked against this run's medians.
struct Target {
    what: String,
    goal: String,
    reached: String,
    met: bool,
}

/// The targets of docs/benchmarks.md, for the configurations that were measured: TCP single
/// stream ≥ 4× wireguard-go, ≥ 5× boringtun-cli and ≥ 25 % of raw veth; the 64-byte packet
/// rate ahead of both peers; under 100 µs added to the p50 round trip.
fn targets(configs: &[Config], get: &dyn Fn(Config, Metric) -> f64) -> Vec<Target> {
    let ours = |m| get(Config::Causeway, m);
    let mut out = Vec::new();
    let mut at_least = |what: String, goal: f64, reached: f64| {
        out.push(Target {
            what,
            goal: format!("≥ {goal:.2}×"),
            reached: format!("{reached:.2}×"),
            met: reached >= goal,
        });
    };
    for (peer, goal) in [(Config::WireguardGo, 4.0), (Config::BoringtunCli, 5.0), (Config::Raw, 0.25)] {
        if configs.contains(&peer) {
            let r = ratio(ours(Metric::Tcp1Gbps), get(peer, Metric::Tcp1Gbps), Metric::Tcp1Gbps);
            at_least(format!("TCP 1 stream vs {}", peer.name()), goal, r);
        }
    }
    for peer in [Config::WireguardGo, Config::BoringtunCli] {
        if configs.contains(&peer) {
            let r = ratio(ours(Metric::Udp64Kpps), get(peer, Metric::Udp64Kpps), Metric::Udp64Kpps);
            out.push(Target {
                what: format!("UDP 64 B rate vs {}", peer.name()),
                goal: "> 1.00×".to_owned(),
                reached: format!("{r:.2}×"),
                met: r > 1.0,
            });
        }
    }
    if configs.contains(&Config::Raw) {
        let added = added_rtt(get, Config::Causeway);
        out.push(Target {
            what: "ping p50 added over raw veth".to_owned(),
            goal: "< 100 µs".to_owned(),
            reached: format!("{added:.0} µs"),
            met: added < 100.0,
        });
    }
    out
}

/// `ours` over `theirs`, oriented so that > 1 means "ours is better".
fn ratio(ours: f64, theirs: f64, m: Metric) -> f64 {
    if m.higher_is_better() { ours / theirs } else { theirs / ours }
}

/// Bars: each userspace configuration's figures as a multiple of wireguard-go's (oriented so
/// that higher is better), one group per metric.
fn svg(configs: &[Config], get: &dyn Fn(Config, Metric) -> f64) -> String {
    use std::fmt::Write as _;
    let shown: Vec<(Config, &str)> = [(Config::Causeway, "#4878d0"), (Config::BoringtunCli, "#ee854a")]
        .into_iter()
        .filter(|(c, _)| configs.contains(c))
        .collect();
    let (w, h, left, bottom, top) = (760.0, 340.0, 50.0, 60.0, 40.0);
    let values: Vec<f64> = Metric::ALL
        .iter()
        .flat_map(|m| shown.iter().map(|(c, _)| ratio(get(*c, *m), get(Config::WireguardGo, *m), *m)))
        .collect();
    let max = values.iter().copied().fold(1.0_f64, f64::max) * 1.15;
    let y = |v: f64| h - bottom - (h - bottom - top) * v / max;
    let mut s = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">
<text x="{x}" y="18" text-anchor="middle" font-size="13">Data plane, relative to wireguard-go (higher is better; 1 = wireguard-go)</text>
<line x1="{left}" y1="{y0}" x2="{xr}" y2="{y0}" stroke="black"/><line x1="{left}" y1="{top}" x2="{left}" y2="{y0}" stroke="black"/>
<line x1="{left}" y1="{y1:.1}" x2="{xr}" y2="{y1:.1}" stroke="#888" stroke-dasharray="4 3"/><text x="{lx}" y="{y1t:.1}" text-anchor="end">1×</text>
"##,
        x = w / 2.0,
        y0 = h - bottom,
        xr = w - 10.0,
        y1 = y(1.0),
        y1t = y(1.0) + 4.0,
        lx = left - 4.0,
    );
    #[expect(clippy::cast_precision_loss, reason = "a handful of bars")]
    let slot = (w - left - 20.0) / Metric::ALL.len() as f64;
    #[expect(clippy::cast_precision_loss, reason = "a handful of bars")]
    let bar = slot * 0.8 / shown.len().max(1) as f64;
    for (i, m) in Metric::ALL.iter().enumerate() {
        #[expect(clippy::cast_precision_loss, reason = "a handful of bars")]
        let x0 = left + 10.0 + slot * i as f64;
        for (k, (c, color)) in shown.iter().enumerate() {
            let v = ratio(get(*c, *m), get(Config::WireguardGo, *m), *m);
            #[expect(clippy::cast_precision_loss, reason = "a handful of bars")]
            let bx = x0 + bar * k as f64;
            let _ = writeln!(
                s,
                r#"<rect x="{bx:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{color}"><title>{} {}: {v:.2}×</title></rect><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{v:.1}</text>"#,
                y(v),
                bar - 3.0,
                h - bottom - y(v),
                c.name(),
                m.label(),
                bx + bar / 2.0,
                y(v) - 3.0,
            );
        }
        let label = m.short();
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
            x0 + slot * 0.4,
            h - bottom + 16.0
        );
    }
    for (k, (c, color)) in shown.iter().enumerate() {
        #[expect(clippy::cast_precision_loss, reason = "two entries")]
        let lx = left + 10.0 + 140.0 * k as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="{:.1}" width="10" height="10" fill="{color}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            h - 22.0,
            lx + 14.0,
            h - 13.0,
            c.name()
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_favour_the_better_side_whatever_the_direction() {
        assert!((ratio(2.0, 1.0, Metric::Tcp1Gbps) - 2.0).abs() < 1e-9);
        // Lower is better for latency and CPU: half the time is twice as good.
        assert!((ratio(100.0, 200.0, Metric::PingP50Us) - 2.0).abs() < 1e-9);
        assert!((ratio(3.0, 1.5, Metric::CpuSecsPerGb) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn the_plot_has_a_bar_per_peer_and_metric_relative_to_wireguard_go() {
        let get = |c: Config, m: Metric| match (c, m.higher_is_better()) {
            (Config::WireguardGo, _) => 1.0,
            (Config::Causeway, true) => 2.0,
            (Config::Causeway, false) => 0.25,
            (_, _) => 1.5,
        };
        let svg = svg(&Config::ALL, &get);
        assert_eq!(svg.matches("<rect x=").count(), 2 * Metric::ALL.len() + 2, "bars plus legend");
        assert!(svg.contains("causeway TCP 1 stream (Gb/s): 2.00×"), "{svg}");
        assert!(svg.contains("causeway ping p50 (µs): 4.00×"), "{svg}");
        assert!(svg.contains("boringtun-cli CPU s per Gb, TCP 1 stream: 0.67×"), "{svg}");
        // Without boringtun-cli installed, only Causeway's bars.
        let svg = svg_without_boringtun(&get);
        assert!(!svg.contains("boringtun-cli"));
    }

    #[test]
    fn targets_are_checked_against_the_medians_of_the_measured_configurations() {
        let get = |c: Config, m: Metric| match (c, m) {
            (Config::Raw, Metric::Tcp1Gbps) => 12.0,
            (Config::Causeway, Metric::Tcp1Gbps) => 3.0,
            (Config::WireguardGo | Config::BoringtunCli, Metric::Tcp1Gbps) => 0.5,
            (Config::Causeway, Metric::Udp64Kpps) => 90.0,
            (Config::WireguardGo, Metric::Udp64Kpps) => 30.0,
            (Config::BoringtunCli, Metric::Udp64Kpps) => 95.0,
            (Config::Raw, Metric::PingP50Us) => 70.0,
            (Config::Causeway, Metric::PingP50Us) => 160.0,
            _ => 1.0,
        };
        let all = targets(&Config::ALL, &get);
        let verdicts: Vec<(&str, &str, bool)> =
            all.iter().map(|t| (t.what.as_str(), t.reached.as_str(), t.met)).collect();
        assert_eq!(
            verdicts,
            [
                ("TCP 1 stream vs wireguard-go", "6.00×", true),
                ("TCP 1 stream vs boringtun-cli", "6.00×", true),
                ("TCP 1 stream vs raw veth", "0.25×", true),
                ("UDP 64 B rate vs wireguard-go", "3.00×", true),
                ("UDP 64 B rate vs boringtun-cli", "0.95×", false),
                ("ping p50 added over raw veth", "90 µs", true),
            ]
        );
        // Without boringtun-cli its targets are left out, not counted as met or missed.
        let without = targets(&[Config::Raw, Config::Causeway, Config::WireguardGo], &get);
        assert_eq!(without.len(), 4);
        assert!(without.iter().all(|t| !t.what.contains("boringtun")));
    }

    fn svg_without_boringtun(get: &dyn Fn(Config, Metric) -> f64) -> String {
        svg(&[Config::Raw, Config::Causeway, Config::WireguardGo], get)
    }

    #[test]
    fn busy_cpu_time_is_read_and_grows() {
        let a = cpu_busy_secs().unwrap();
        // Spin for 300 ms: at least ~0.3 CPU-seconds of busy time (accounting has 10 ms ticks).
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let grew = cpu_busy_secs().unwrap() - a;
        assert!(grew >= 0.2, "busy time grew by {grew} s during a 300 ms spin");
    }
}
