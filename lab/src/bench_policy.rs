//! `causeway benchmark policy`: what policy costs on the forwarding path as the rule count
//! grows, Causeway's eBPF tables side by side with iptables (the Submariner-style datapath)
//! holding the same rules, on the same routed two-cluster topology.
//!
//! Pod A → gateway 1 → underlay → gateway 2 → pod B, plain IP forwarding. On gateway 1 the
//! same N rules are installed twice: compiled into Causeway's maps behind `policy_eth` on
//! the uplink's egress (a helper process in gateway 1's namespace holds the datapath and
//! switches enforcement on and off), and as an iptables chain that FORWARD jumps to or not.
//! The rules deny N (destination, port) pairs the benchmark traffic never matches and the
//! default allows — every packet is judged against all of them, the worst case for a rule
//! list. A last rule in both denies TCP port 9 to the whole destination network: before each
//! measurement the benchmark checks that port 9 is refused (no policy) or silently dropped
//! (eBPF, iptables), so it never measures a datapath that is not there.
//! Configurations are interleaved round by round; medians, spreads, ratios.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::Ipv4Addr,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use anyhow::{Context as _, bail};
use causeway_broker_api::{PolicyAction, PolicyPeer, PolicyProtocol, PolicyRecord, PortRange};
use causeway_netns::{Topology, TopologySpec, exec};
use ipnetwork::Ipv4Network;
use serde::Serialize;

#[derive(clap::Args)]
pub struct PolicyBenchArgs {
    /// Rule counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "10,1000,100000")]
    entries: Vec<u32>,
    /// Rounds of every mode, interleaved (the medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 3)]
    seconds: u32,
    /// `table` for people, `json` for scripts.
    #[arg(long, value_enum, default_value = "table")]
    output: causeway_cli_format::Output,
    /// Also write an SVG plot of the results here.
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
}

/// The rules both datapaths hold: deny TCP to N (host, port) pairs in the upper half of the
/// destination network (pods live in the lower half, so the traffic matches none).
#[must_use]
pub fn synthetic_rules(n: u32, to: Ipv4Network) -> Vec<(Ipv4Addr, u16)> {
    let size = 1u32 << (32 - u32::from(to.prefix()));
    let half = (size / 2).max(1);
    (0..n)
        .map(|i| {
            let host = u32::from(to.network()) + half + (i % half);
            (Ipv4Addr::from(host), 1000 + u16::try_from(i / half).unwrap_or(u16::MAX - 1000))
        })
        .collect()
}

/// `causeway debug policy-hold`: compiles the synthetic rules, installs them (enforcement
/// off), attaches `policy_eth` to `interface`'s egress, prints one JSON line, then obeys
/// `on` / `off` lines on stdin until it closes.
pub fn hold(interface: &str, entries: u32, from: Ipv4Network, to: Ipv4Network) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let _guard = rt.enter();
    let rules: Vec<PolicyRecord> = synthetic_rules(entries, to)
        .into_iter()
        .enumerate()
        .map(|(i, (host, port))| PolicyRecord {
            name: format!("r{i}"),
            priority: 1,
            from: PolicyPeer { cluster: None, cidrs: vec![from.into()] },
            to: PolicyPeer { cluster: None, cidrs: vec![Ipv4Network::new(host, 32).expect("/32").into()] },
            protocol: PolicyProtocol::Tcp,
            ports: vec![PortRange { first: port, last: port }],
            action: PolicyAction::Deny,
            generation: 1,
        })
        .chain(std::iter::once(PolicyRecord {
            name: "probe".into(),
            priority: 2,
            from: PolicyPeer { cluster: None, cidrs: vec![from.into()] },
            to: PolicyPeer { cluster: None, cidrs: vec![to.into()] },
            protocol: PolicyProtocol::Tcp,
            ports: vec![PortRange { first: PROBE_PORT, last: PROBE_PORT }],
            action: PolicyAction::Deny,
            generation: 1,
        }))
        .collect();
    let started = std::time::Instant::now();
    let compiled = causeway_gateway::policy::compile(&causeway_gateway::policy::PolicyInput {
        rules,
        default: PolicyAction::Allow,
        ..Default::default()
    })?;
    let compile_ms = started.elapsed().as_secs_f64() * 1000.0;
    let mut dp = causeway_datapath::Datapath::load()?;
    let started = std::time::Instant::now();
    dp.set_policy(&compiled.tables)?;
    dp.set_policy_enabled(false)?;
    let install_ms = started.elapsed().as_secs_f64() * 1000.0;
    dp.attach_policy_eth(interface, true)?;
    println!(
        "{}",
        serde_json::json!({"entries": compiled.tables.verdicts.len(), "compileMs": compile_ms, "installMs": install_ms})
    );
    std::io::stdout().flush()?;
    for line in std::io::stdin().lines() {
        match line?.trim() {
            "on" => dp.set_policy_enabled(true)?,
            "off" => dp.set_policy_enabled(false)?,
            other => bail!("unknown command {other:?}"),
        }
        println!("ok");
        std::io::stdout().flush()?;
    }
    Ok(())
}

/// Denied by the last rule of both datapaths; nothing listens there.
const PROBE_PORT: u16 = 9;

/// Whether a TCP connection to `ip:PROBE_PORT` is silently dropped (`true`) or refused.
fn probe_dropped(ns: &str, ip: &str) -> bool {
    let script = format!("exec 3<>/dev/tcp/{ip}/{PROBE_PORT}");
    // `timeout` exits 124 when the connect hangs (dropped); a refusal fails at once.
    Command::new("ip")
        .args(["netns", "exec", ns, "timeout", "1", "bash", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.code() == Some(124))
}

struct Holder {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Holder {
    fn start(ns: &str, entries: u32, from: &str, to: &str) -> anyhow::Result<(Self, serde_json::Value)> {
        let bin = std::env::current_exe()?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&bin)
            .args(["debug", "policy-hold", "--interface", "uplink", "--entries", &entries.to_string()])
            .args(["--from-cidr", from, "--to-cidr", to])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the policy holder")?;
        let stdin = child.stdin.take().context("stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let info: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("policy holder said {line:?}"))?;
        Ok((Self { child, stdin, stdout }, info))
    }

    fn set(&mut self, on: bool) -> anyhow::Result<()> {
        writeln!(self.stdin, "{}", if on { "on" } else { "off" })?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        if line.trim() != "ok" {
            bail!("policy holder: {line:?}");
        }
        Ok(())
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Mode {
    NoPolicy,
    Ebpf,
    Iptables,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::NoPolicy, Mode::Ebpf, Mode::Iptables];
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Row {
    entries: u32,
    mode: Mode,
    tcp_gbps: Vec<f64>,
    udp64_kpps: Vec<f64>,
    tcp_gbps_median: f64,
    udp64_kpps_median: f64,
}

fn iptables_restore(ns: &str, input: &str) -> anyhow::Result<()> {
    exec::in_ns_with_input(ns, &["iptables-restore", "--noflush"], &[], input.as_bytes())
        .context("iptables-restore")?;
    Ok(())
}

fn set_mode(ns: &str, holder: &mut Holder, mode: Mode) -> anyhow::Result<()> {
    holder.set(mode == Mode::Ebpf)?;
    let _ = exec::in_ns(ns, &["iptables", "-D", "FORWARD", "-j", "CWBENCH"]);
    if mode == Mode::Iptables {
        exec::in_ns(ns, &["iptables", "-A", "FORWARD", "-j", "CWBENCH"])?;
    }
    Ok(())
}

pub fn run(a: PolicyBenchArgs) -> anyhow::Result<()> {
    if !causeway_netns::exec::is_root() {
        bail!("benchmark policy builds network namespaces: run it as root");
    }
    let bin = std::env::current_exe()?;
    let spec = TopologySpec::new("cwbp", 2, bin);
    eprintln!("==> building the routed two-cluster topology");
    let t = Topology::build(spec)?;
    for (me, other) in [(0, 1), (1, 0)] {
        let (ns, via) = (t.clusters[me].gw_ns.clone(), t.clusters[other].gw_ip.clone());
        for cidr in [&t.clusters[other].pod_cidr, &t.clusters[other].service_cidr] {
            exec::ip(&ns, &["route", "add", cidr, "via", &via])?;
        }
    }
    let gw = t.clusters[0].gw_ns.clone();
    let (from, to) = (t.clusters[0].pod_cidr.clone(), t.clusters[1].pod_cidr.clone());
    let to_net: Ipv4Network = to.parse()?;
    let mut rows = Vec::new();
    for &n in &a.entries {
        eprintln!("==> {n} rules: compiling and installing both ways");
        let (mut holder, info) = Holder::start(&gw, n, &from, &to)?;
        let mut rules = String::from("*filter\n:CWBENCH - [0:0]\n-F CWBENCH\n");
        for (host, port) in synthetic_rules(n, to_net) {
            rules.push_str(&format!("-A CWBENCH -s {from} -d {host}/32 -p tcp --dport {port} -j DROP\n"));
        }
        rules.push_str(&format!("-A CWBENCH -s {from} -d {to} -p tcp --dport {PROBE_PORT} -j DROP\n"));
        rules.push_str("COMMIT\n");
        let started = std::time::Instant::now();
        iptables_restore(&gw, &rules)?;
        eprintln!(
            "    eBPF: {} verdict entries, compiled in {:.0} ms, installed in {:.0} ms; iptables: {n} rules loaded in {:.0} ms",
            info["entries"],
            info["compileMs"].as_f64().unwrap_or(0.0),
            info["installMs"].as_f64().unwrap_or(0.0),
            started.elapsed().as_secs_f64() * 1000.0
        );
        let mut samples: Vec<(Mode, Vec<f64>, Vec<f64>)> =
            Mode::ALL.iter().map(|m| (*m, vec![], vec![])).collect();
        for round in 1..=a.rounds {
            for (mode, tcp, udp) in &mut samples {
                eprintln!("==> {n} rules, round {round}/{}: {mode:?}", a.rounds);
                set_mode(&gw, &mut holder, *mode)?;
                if !exec::ping(&t.clusters[0].pod_ns, &t.clusters[1].pod_ip, 1) {
                    bail!("pod B unreachable with {mode:?}: the benchmark rules must not match its traffic");
                }
                let dropped = probe_dropped(&t.clusters[0].pod_ns, &t.clusters[1].pod_ip);
                if dropped != (*mode != Mode::NoPolicy) {
                    bail!(
                        "{mode:?}: the probe port was {}dropped: that datapath is not in force as expected",
                        if dropped { "" } else { "not " }
                    );
                }
                tcp.push(crate::bench_dataplane::measure(
                    &t,
                    crate::bench_dataplane::Metric::Tcp1Gbps,
                    a.seconds,
                )?);
                udp.push(crate::bench_dataplane::measure(
                    &t,
                    crate::bench_dataplane::Metric::Udp64Kpps,
                    a.seconds,
                )?);
            }
        }
        set_mode(&gw, &mut holder, Mode::NoPolicy)?;
        exec::in_ns(&gw, &["iptables", "-F", "CWBENCH"])?;
        drop(holder);
        for (mode, tcp, udp) in samples {
            rows.push(Row {
                entries: n,
                mode,
                tcp_gbps_median: crate::bench_dataplane::median(&tcp),
                udp64_kpps_median: crate::bench_dataplane::median(&udp),
                tcp_gbps: tcp,
                udp64_kpps: udp,
            });
        }
    }
    drop(t);
    let spread = |v: &[f64]| {
        let (lo, hi) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), x| (l.min(*x), h.max(*x)));
        format!("{:.2}–{:.2}", lo, hi)
    };
    match a.output {
        causeway_cli_format::Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        causeway_cli_format::Output::Table => {
            let base = |n: u32| rows.iter().find(|r| r.entries == n && r.mode == Mode::NoPolicy);
            let table: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    let b = base(r.entries).expect("measured");
                    vec![
                        r.entries.to_string(),
                        format!("{:?}", r.mode).to_lowercase(),
                        format!("{:.2} ({})", r.tcp_gbps_median, spread(&r.tcp_gbps)),
                        format!("{:.1} ({})", r.udp64_kpps_median, spread(&r.udp64_kpps)),
                        format!("{:.2}×", r.udp64_kpps_median / b.udp64_kpps_median.max(0.001)),
                    ]
                })
                .collect();
            print!(
                "{}",
                causeway_cli_format::table(
                    &[
                        "RULES",
                        "POLICY",
                        "TCP 1 STREAM GB/S (min–max)",
                        "UDP 64 B KPPS (min–max)",
                        "UDP VS NO POLICY"
                    ],
                    &table
                )
            );
            println!(
                "{} rounds, interleaved; every packet is judged against all rules (none match)",
                a.rounds
            );
        }
    }
    if let Some(path) = a.plot {
        std::fs::write(&path, svg(&rows)).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(())
}

/// UDP 64 B packet rate against the rule count (log scale), one line per datapath.
fn svg(rows: &[Row]) -> String {
    let (w, h, left, bottom, top) = (560.0, 300.0, 60.0, 40.0, 30.0);
    let max = rows.iter().map(|r| r.udp64_kpps_median).fold(1.0_f64, f64::max) * 1.15;
    let ns: Vec<u32> = {
        let mut v: Vec<u32> = rows.iter().map(|r| r.entries).collect();
        v.dedup();
        v
    };
    let (lo, hi) = (
        f64::from(*ns.first().unwrap_or(&1)).max(1.0).log10(),
        f64::from(*ns.last().unwrap_or(&10)).max(10.0).log10(),
    );
    let x =
        |n: u32| left + 20.0 + (w - left - 60.0) * (f64::from(n).max(1.0).log10() - lo) / (hi - lo).max(0.1);
    let y = |v: f64| h - bottom - (h - bottom - top) * v / max;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<text x="{cx}" y="18" text-anchor="middle">Policy on the forwarding path: UDP 64 B (kpps) vs rules</text>
<line x1="{left}" y1="{y0}" x2="{xr}" y2="{y0}" stroke="black"/><line x1="{left}" y1="{top}" x2="{left}" y2="{y0}" stroke="black"/>
"#,
        cx = w / 2.0,
        y0 = h - bottom,
        xr = w - 10.0
    );
    for frac in [0.0, 0.5, 1.0] {
        let v = max / 1.15 * frac;
        s.push_str(&format!(
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="10">{v:.0}</text>
"#,
            left - 4.0,
            y(v) + 3.0
        ));
    }
    for n in &ns {
        s.push_str(&format!(
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{n}</text>
"#,
            x(*n),
            h - bottom + 15.0
        ));
    }
    for (mode, color) in [(Mode::NoPolicy, "#999999"), (Mode::Ebpf, "#4878d0"), (Mode::Iptables, "#ee854a")] {
        let pts: Vec<String> = rows
            .iter()
            .filter(|r| r.mode == mode)
            .map(|r| format!("{:.1},{:.1}", x(r.entries), y(r.udp64_kpps_median)))
            .collect();
        s.push_str(&format!(
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>
"#,
            pts.join(" ")
        ));
        for r in rows.iter().filter(|r| r.mode == mode) {
            s.push_str(&format!(
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"><title>{:?} {} rules: {:.1} kpps</title></circle>
"#,
                x(r.entries),
                y(r.udp64_kpps_median),
                r.mode,
                r.entries,
                r.udp64_kpps_median
            ));
        }
    }
    for (i, (label, color)) in
        [("no policy", "#999999"), ("Causeway eBPF", "#4878d0"), ("iptables", "#ee854a")].iter().enumerate()
    {
        let ly = top + 14.0 * f64::from(u8::try_from(i).unwrap_or(0));
        s.push_str(&format!(
            r#"<rect x="{:.1}" y="{:.1}" width="10" height="10" fill="{color}"/><text x="{:.1}" y="{:.1}">{label}</text>
"#,
            w - 150.0,
            ly,
            w - 135.0,
            ly + 9.0
        ));
    }
    s.push_str(&format!(
        r#"<text x="14" y="{:.1}" transform="rotate(-90 14 {:.1})" text-anchor="middle">kpps</text>
<text x="{:.1}" y="{:.1}" text-anchor="middle">rules (log scale)</text>
</svg>
"#,
        (h - bottom + top) / 2.0,
        (h - bottom + top) / 2.0,
        w / 2.0,
        h - 5.0
    ));
    s
}
