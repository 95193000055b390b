//! `causeway benchmark attack`: the trust issue's bar, measured. Two clusters' Causeway
//! gateways on the benchmark topology and an attacker host on their underlay. Round by round,
//! one iperf3 TCP stream from cluster 1's pod to cluster 2's, undisturbed and while the
//! receiving gateway's WireGuard port takes four paced floods at once: data messages spoofed
//! from the sending gateway's own address and port (a known source with a guessed session
//! index), forged handshake responses, forged cookie replies, and a genuine handshake
//! initiation captured on the underlay and replayed. Prints both rates, their
//! ratio, and where the flood died (the uplink guard's counters against the cable's); with
//! `--min-ratio`, exits non-zero below it, or when the tunnel moved or went down.

use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use causeway_netns::Topology;
use serde::Serialize;

use crate::bench_dataplane::{Metric, measure, median, start_causeway, topology};

#[derive(clap::Args)]
pub struct AttackBenchArgs {
    /// Rounds; each measures the stream once undisturbed and once under attack.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 4)]
    seconds: u32,
    /// Datagrams per second of each of the four floods (the guard's per-source handshake
    /// budget is 20/s after a burst of 40). The default makes 15,000 datagrams/s in all.
    #[arg(long, default_value_t = 3_750)]
    rate: u32,
    /// `table` for people, `json` for scripts.
    #[arg(long, value_enum, default_value = "table")]
    output: causeway_cli_format::Output,
    /// Fail (exit 1) when the stream under attack keeps less than this fraction of its
    /// undisturbed rate (medians), e.g. 0.8.
    #[arg(long)]
    min_ratio: Option<f64>,
}

/// The floods: kind, and whether it is spoofed from the peer gateway's address. `replay` sends
/// the captured initiation again and again, from the attacker's address (it saw it go by).
const FLOODS: [(&str, bool); 4] = [("data", true), ("response", false), ("cookie", false), ("replay", false)];

/// Guard counters (datapath events) and cable drop reasons the report shows.
const GUARD: [&str; 3] = ["xdp_unknown_session", "xdp_handshake_flood", "xdp_unknown_source"];
const CABLE: [&str; 4] = ["invalid_packet", "unknown_peer", "handshake_under_load", "lane_backlog"];

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    rounds: u32,
    seconds: u32,
    rate_per_flood: u32,
    undisturbed_gbps: Vec<f64>,
    under_attack_gbps: Vec<f64>,
    /// While the same floods hit a bystander host instead.
    control_gbps: Vec<f64>,
    /// Median under attack / median undisturbed: the bar.
    ratio: f64,
    /// Median under attack / median while a bystander is flooded: the gateway's own share of
    /// the loss, without the attacker's sending (which shares this machine's cores).
    ratio_to_control: f64,
    /// Datagrams the floods sent, by kind.
    sent: BTreeMap<String, u64>,
    /// Growth of the receiving gateway's guard counters and cable drops over the run.
    guard: BTreeMap<String, u64>,
    cable: BTreeMap<String, u64>,
    /// The peer's endpoint and status after the last round (unchanged: nothing roamed).
    endpoint_before: String,
    endpoint_after: String,
    status_after: String,
}

pub fn run(a: AttackBenchArgs) -> anyhow::Result<()> {
    if a.rounds == 0 || a.seconds == 0 || a.rate == 0 {
        bail!("--rounds, --seconds and --rate must be at least 1");
    }
    eprintln!("==> building the topology (two clusters and an attacker on the underlay)");
    let mut t = topology("cwba")?;
    let replay = capture_initiation(&mut t)?;
    let attacker = t.add_underlay_host("attacker", "172.31.0.66")?;
    let bystander = "172.31.0.77";
    t.add_underlay_host("bystander", bystander)?;
    let report = measure_rounds(&t, &attacker, bystander, &replay, &a)?;
    drop(t);
    match a.output {
        causeway_cli_format::Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        causeway_cli_format::Output::Table => print_table(&report),
    }
    let Some(min) = a.min_ratio else { return Ok(()) };
    if report.endpoint_after != report.endpoint_before || report.status_after != "connected" {
        bail!(
            "the tunnel did not hold: endpoint {} → {}, status {}",
            report.endpoint_before,
            report.endpoint_after,
            report.status_after
        );
    }
    let spoofed = report.sent.get("data").copied().unwrap_or(0);
    let guarded = report.guard.get("xdp_unknown_session").copied().unwrap_or(0);
    if guarded < spoofed {
        bail!("the guard dropped {guarded} of {spoofed} spoofed data messages: the rest woke the cable");
    }
    if report.ratio < min {
        bail!(
            "under attack the stream kept {:.0} % of its undisturbed rate (bar: {:.0} %)",
            report.ratio * 100.0,
            min * 100.0
        );
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Run {
    Undisturbed,
    /// The same floods at a bystander host on the underlay: what the attacker's own sending
    /// costs this machine (it shares the cores), which a real attacker would not.
    Control,
    Attack,
}

impl Run {
    fn label(self) -> &'static str {
        match self {
            Run::Undisturbed => "undisturbed",
            Run::Control => "while a bystander is flooded",
            Run::Attack => "under attack",
        }
    }
}

/// Starts the gateways while capturing, at the receiving gateway's uplink, the first handshake
/// initiation that reaches it (a genuine one, from the sending gateway); returns the file that
/// holds that datagram, for the replay flood.
fn capture_initiation(t: &mut Topology) -> anyhow::Result<std::path::PathBuf> {
    let pcap = t.spec.run_dir.join("initiation.pcap");
    // Type 1 and three zero bytes: not the STUN answer (0x0101…) that also reaches the port.
    let filter = "udp dst port 51820 and udp[8:4] = 0x01000000";
    let mut tcpdump = Command::new("ip")
        .args(["netns", "exec", &t.clusters[1].gw_ns, "tcpdump", "-i", "uplink", "-U", "-c", "1", "-w"])
        .arg(&pcap)
        .arg(filter)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting tcpdump")?;
    causeway_netns::ready::wait_capturing(&pcap)?;
    start_causeway(t)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tcpdump.try_wait()?.is_none() {
        if std::time::Instant::now() > deadline {
            let _ = tcpdump.kill();
            let _ = tcpdump.wait();
            bail!("no handshake initiation reached the receiving gateway within 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let captured = std::fs::read(&pcap)?;
    let initiation = causeway_netns::pcap::udp_datagrams(&captured)
        .into_iter()
        .find(|d| d.payload.len() == 148 && d.payload[0] == 1)
        .context("the capture holds no handshake initiation")?
        .payload
        .to_vec();
    let file = t.spec.run_dir.join("initiation.bin");
    std::fs::write(&file, initiation)?;
    Ok(file)
}

/// Starts the paced floods from the attacker's namespace at `target`.
fn start_floods(
    attacker: &str,
    target: &str,
    peer: &str,
    replay: &std::path::Path,
    a: &AttackBenchArgs,
) -> anyhow::Result<Vec<(&'static str, std::process::Child)>> {
    let bin = std::env::current_exe()?.display().to_string();
    // Enough datagrams to outlast the stream (iperf3's server start and its run).
    let count = (u64::from(a.rate) * u64::from(a.seconds + 2)).to_string();
    let rate = a.rate.to_string();
    FLOODS
        .iter()
        .map(|(kind, spoofed)| {
            let mut args = vec![
                "netns",
                "exec",
                attacker,
                &bin,
                "debug",
                "udp-flood",
                "--target",
                target,
                "--kind",
                kind,
                "--count",
                &count,
                "--rate",
                &rate,
            ];
            if *spoofed {
                args.extend(["--spoof-source", peer]);
            }
            Command::new("ip")
                .args(args)
                .args(if *kind == "replay" { vec!["--replay".as_ref(), replay.as_os_str()] } else { vec![] })
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map(|child| (*kind, child))
                .context("starting a flood")
        })
        .collect()
}

fn measure_rounds(
    t: &Topology,
    attacker: &str,
    bystander: &str,
    replay: &std::path::Path,
    a: &AttackBenchArgs,
) -> anyhow::Result<Report> {
    // Cluster 1's pod sends to cluster 2's: the attack hits the gateway decrypting the stream.
    let (sender, receiver) = (&t.clusters[0], &t.clusters[1]);
    let target = format!("{}:51820", receiver.gw_ip);
    let peer = format!("{}:51820", sender.gw_ip);
    let status = || t.gateway_status(2);
    let before = status()?;
    let endpoint_before = before.connections.first().map(|c| c.endpoint.clone()).unwrap_or_default();
    let (mut quiet, mut attacked, mut control) = (Vec::new(), Vec::new(), Vec::new());
    let mut sent: BTreeMap<String, u64> = BTreeMap::new();
    let bystander_target = format!("{bystander}:51820");
    for round in 1..=a.rounds {
        // Rotate the order so drift (a warming cache, a busy neighbour) favours none.
        let mut order = [Run::Undisturbed, Run::Control, Run::Attack];
        order.rotate_left(usize::try_from(round).unwrap_or(0) % 3);
        for run in order {
            eprintln!("==> round {round}/{}: TCP 1 stream {}", a.rounds, run.label());
            let target = match run {
                Run::Undisturbed => {
                    quiet.push(measure(t, Metric::Tcp1Gbps, a.seconds)?);
                    continue;
                }
                Run::Control => &bystander_target,
                Run::Attack => &target,
            };
            let floods = start_floods(attacker, target, &peer, replay, a)?;
            std::thread::sleep(Duration::from_millis(200));
            let rate = measure(t, Metric::Tcp1Gbps, a.seconds);
            for (kind, child) in floods {
                let out = child.wait_with_output()?;
                if !out.status.success() {
                    bail!("the {kind} flood failed: {}", out.status);
                }
                let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                    .with_context(|| format!("the {kind} flood's report"))?;
                if run == Run::Attack {
                    *sent.entry(kind.to_owned()).or_default() += v["sent"].as_u64().unwrap_or(0);
                }
            }
            match run {
                Run::Attack => attacked.push(rate?),
                _ => control.push(rate?),
            }
        }
    }
    // The last datagrams of a flood may still be on their way through the guard.
    std::thread::sleep(Duration::from_millis(300));
    let after = status()?;
    let grew = |was: &BTreeMap<String, u64>, now: &BTreeMap<String, u64>, keys: &[&str]| {
        keys.iter()
            .map(|k| {
                let d = now.get(*k).copied().unwrap_or(0).saturating_sub(was.get(*k).copied().unwrap_or(0));
                ((*k).to_owned(), d)
            })
            .collect::<BTreeMap<_, _>>()
    };
    let peer_view = after.connections.first();
    let base = median(&quiet);
    Ok(Report {
        rounds: a.rounds,
        seconds: a.seconds,
        rate_per_flood: a.rate,
        ratio: if base > 0.0 { median(&attacked) / base } else { 0.0 },
        ratio_to_control: if median(&control) > 0.0 { median(&attacked) / median(&control) } else { 0.0 },
        undisturbed_gbps: quiet,
        under_attack_gbps: attacked,
        control_gbps: control,
        sent,
        guard: grew(&before.datapath_events, &after.datapath_events, &GUARD),
        cable: grew(&before.cable_drops, &after.cable_drops, &CABLE),
        endpoint_before,
        endpoint_after: peer_view.map(|c| c.endpoint.clone()).unwrap_or_default(),
        status_after: peer_view.map_or_else(|| "missing".to_owned(), |c| c.status.clone()),
    })
}

fn print_table(r: &Report) {
    let fmt = |v: &[f64]| {
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{:.3} ({min:.3}–{max:.3})", median(v))
    };
    let rows = vec![
        vec!["undisturbed".to_owned(), fmt(&r.undisturbed_gbps)],
        vec![
            format!("under attack ({} floods × {}/s)", FLOODS.len(), r.rate_per_flood),
            fmt(&r.under_attack_gbps),
        ],
        vec!["the same floods at a bystander".to_owned(), fmt(&r.control_gbps)],
    ];
    print!("{}", causeway_cli_format::table(&["TCP 1 STREAM", "Gb/s (median, min–max)"], &rows));
    println!(
        "under attack: {:.0} % of the undisturbed rate, {:.0} % of the rate while a bystander takes \
         the same floods ({} rounds, interleaved)",
        r.ratio * 100.0,
        r.ratio_to_control * 100.0,
        r.rounds
    );
    let list =
        |m: &BTreeMap<String, u64>| m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ");
    println!("sent: {}", list(&r.sent));
    println!("dropped by the guard: {}", list(&r.guard));
    println!("dropped by the cable: {}", list(&r.cable));
    println!("peer endpoint: {} → {} ({})", r.endpoint_before, r.endpoint_after, r.status_after);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_rounds_seconds_or_rate_are_refused_before_any_topology() {
        for (rounds, seconds, rate) in [(0, 4, 10), (5, 0, 10), (5, 4, 0)] {
            let a = AttackBenchArgs {
                rounds,
                seconds,
                rate,
                output: causeway_cli_format::Output::Table,
                min_ratio: Some(0.8),
            };
            let err = run(a).unwrap_err();
            assert_eq!(err.to_string(), "--rounds, --seconds and --rate must be at least 1");
        }
    }
}
