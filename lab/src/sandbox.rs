//! `causeway sandbox up|status|down`: a local cluster set made of network namespaces, built
//! by the same harness as the end-to-end tests, with the real broker and gateways.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use causeway_netns::{
    Topology, TopologySpec,
    topology::{Failure, teardown_by_prefix, wait_for},
};
use clap::Subcommand;

/// Namespace prefix of the sandbox.
const PREFIX: &str = "cw";
const STATE_FILE: &str = "/run/causeway/sandbox.json";

#[derive(Subcommand)]
pub enum SandboxCmd {
    /// Build N clusters, start the broker and gateways, print the connectivity matrix.
    Up {
        /// How many clusters.
        #[arg(long, default_value_t = 3)]
        clusters: usize,
        /// Gateway nodes per cluster: 2 adds a standby gateway node to each cluster and runs a
        /// real route agent on its worker, so that a cluster survives losing its active
        /// gateway (`sandbox fail`).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
        gateways: u8,
        /// Make every cluster from one template: the same pod and service CIDRs (and the same
        /// pod address). The cluster set runs in overlap mode, and pods reach each other at
        /// the global addresses the broker allocated and the gateways translate to.
        #[arg(long)]
        overlapping: bool,
        /// Put every cluster's gateway behind a NAT router of its own. `easy`: nftables
        /// masquerade keeping ports (one mapping for every destination), new flows from outside
        /// dropped; the gateways learn their reflexive addresses from the broker's STUN
        /// responder and open direct paths by sending at once. `hard`: a new random port for
        /// every destination; the tunnels go through the broker's relay. `blocked`: no UDP
        /// through at all; the tunnels go through the relay over the broker's HTTPS port.
        #[arg(long, value_enum)]
        nat: Option<Nat>,
    },
    /// Show the sandbox's gateways and tunnels.
    Status,
    /// Fail a cluster's active gateway: SIGKILL it, take its uplink down, or drop its
    /// WireGuard traffic with nftables.
    Fail {
        /// The cluster (`cluster-2`).
        cluster: String,
        /// `kill`: SIGKILL the gateway; `link`: take its uplink down; `drop`: drop its WireGuard
        /// traffic with nftables.
        #[arg(long, value_enum)]
        how: How,
    },
    /// Undo every `sandbox fail` of a cluster: the drop goes, the uplink comes up, a killed
    /// gateway starts again.
    Heal {
        /// The cluster (`cluster-2`).
        cluster: String,
    },
    /// Run a command in a cluster's pod (its network namespace and cgroup, so names resolve
    /// through the cluster's DNS and ClusterSetIPs are translated): `sandbox exec cluster-1 --
    /// dig echo.demo.svc.clusterset.local`.
    Exec {
        /// The cluster (`cluster-1`).
        cluster: String,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Start a small TCP service in a cluster's pod (first line: the cluster's id, then an
    /// echo) and export it as `<name>.<namespace>.svc.clusterset.local`.
    Serve {
        /// The cluster whose pod serves it.
        cluster: String,
        /// The service's name.
        name: String,
        /// The TCP port it listens on.
        #[arg(long, default_value_t = 7)]
        port: u16,
        /// The namespace it is exported from.
        #[arg(long, short, default_value = "demo")]
        namespace: String,
    },
    /// Stop everything and delete every namespace, link and file of the sandbox.
    Down,
}

/// The service every sandbox cluster serves and exports (`up`).
const DEMO_SERVICE: &str = "echo";
const DEMO_NAMESPACE: &str = "demo";
const DEMO_PORT: u16 = 7;

/// How `sandbox fail` fails a gateway.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum How {
    Kill,
    Link,
    Drop,
}

impl From<How> for Failure {
    fn from(h: How) -> Self {
        match h {
            How::Kill => Failure::Kill,
            How::Link => Failure::Link,
            How::Drop => Failure::Drop,
        }
    }
}

fn run_dir() -> PathBuf {
    PathBuf::from("/run/causeway").join(PREFIX)
}

fn load() -> Option<Topology> {
    let bytes = std::fs::read(STATE_FILE).ok()?;
    let mut t: Topology = serde_json::from_slice(&bytes).ok()?;
    t.detach();
    Some(t)
}

/// The sandbox broker's admin credentials file.
pub fn admin_credentials() -> PathBuf {
    run_dir().join("broker").join(causeway_broker_api::ADMIN_FILE)
}

/// One gateway of the sandbox, as `diagnose` and `gather` look at it.
pub struct GatewayNode {
    /// `cluster-1`, or `cluster-1 (standby)`.
    pub name: String,
    /// Its network namespace.
    pub ns: String,
    pub status_socket: PathBuf,
    pub log: PathBuf,
}

/// What `gather` collects from the sandbox beyond the gateways.
pub struct Layout {
    pub gateways: Vec<GatewayNode>,
    /// Every namespace of the sandbox (routes, rules, firewall of each).
    pub namespaces: Vec<String>,
    /// Its run directory (logs, pinned eBPF maps under `bpf/`, credentials: never copied).
    pub run_dir: PathBuf,
    pub broker_log: PathBuf,
    /// The broker's namespace (its metrics answer on 127.0.0.1:9466 there).
    pub broker_ns: String,
}

/// The running sandbox's gateways, active ones first.
pub fn gateways() -> anyhow::Result<Vec<GatewayNode>> {
    Ok(layout()?.gateways)
}

/// The running sandbox, for `gather`.
pub fn layout() -> anyhow::Result<Layout> {
    let Some(topo) = load() else { bail!("no sandbox is up (start one with `causeway sandbox up`)") };
    let mut gateways: Vec<GatewayNode> = topo
        .clusters
        .iter()
        .map(|c| GatewayNode {
            name: c.cluster_id.clone(),
            ns: c.gw_ns.clone(),
            status_socket: c.status_socket.clone(),
            log: c.gw_log.clone(),
        })
        .collect();
    for sb in &topo.standbys {
        gateways.push(GatewayNode {
            name: format!("{} (standby)", topo.clusters[sb.index - 1].cluster_id),
            ns: sb.ns.clone(),
            status_socket: sb.socket.clone(),
            log: sb.log.clone(),
        });
    }
    Ok(Layout {
        gateways,
        namespaces: topo.namespaces.clone(),
        run_dir: run_dir(),
        broker_log: topo.spec.run_dir.join("broker.log"),
        broker_ns: topo.broker_ns.clone(),
    })
}

/// Status sockets of the sandbox's gateways (for `show connections`), or the default socket.
pub fn status_sockets() -> Vec<PathBuf> {
    match load() {
        Some(t) => t.clusters.iter().map(|c| c.status_socket.clone()).collect(),
        None => vec![PathBuf::from("/run/causeway/gateway.sock")],
    }
}

fn step(msg: &str) {
    eprintln!("==> {msg}");
}

pub fn run(cmd: SandboxCmd) -> anyhow::Result<()> {
    match cmd {
        SandboxCmd::Up { clusters, gateways, overlapping, nat } => up(clusters, gateways, overlapping, nat),
        SandboxCmd::Status => status(),
        SandboxCmd::Down => down(),
        SandboxCmd::Fail { cluster, how } => fail_or_heal(&cluster, Some(how.into())),
        SandboxCmd::Heal { cluster } => fail_or_heal(&cluster, None),
        SandboxCmd::Exec { cluster, command } => exec_in_pod(&cluster, &command),
        SandboxCmd::Serve { cluster, name, port, namespace } => serve(&cluster, &name, port, &namespace),
    }
}

fn cluster_index(topo: &Topology, cluster: &str) -> anyhow::Result<usize> {
    topo.clusters.iter().position(|c| c.cluster_id == cluster).map(|i| i + 1).ok_or_else(|| {
        let ids: Vec<&str> = topo.clusters.iter().map(|c| c.cluster_id.as_str()).collect();
        anyhow::anyhow!("the sandbox has no cluster {cluster:?} (it has {})", ids.join(", "))
    })
}

fn exec_in_pod(cluster: &str, command: &[String]) -> anyhow::Result<()> {
    let Some(topo) = load() else { bail!("no sandbox is up (start one with `causeway sandbox up`)") };
    let index = cluster_index(&topo, cluster)?;
    let args: Vec<&str> = command.iter().map(String::as_str).collect();
    let cmd = topo.pod_command(index, &args)?;
    let status = std::process::Command::new("ip")
        .args(["netns", "exec", &topo.clusters[index - 1].pod_ns])
        .args(&cmd)
        .status()
        .with_context(|| format!("running {command:?} in {cluster}'s pod"))?;
    match status.code() {
        Some(0) => Ok(()),
        Some(code) => std::process::exit(code),
        None => bail!("{command:?} was killed by a signal"),
    }
}

/// Serves `name` in `cluster`'s pod and exports it with the cluster's credentials.
fn serve_and_export(
    topo: &mut Topology,
    index: usize,
    name: &str,
    port: u16,
    namespace: &str,
) -> anyhow::Result<String> {
    let svc = topo.serve(index, name, port)?;
    topo.export(&svc, namespace)?;
    Ok(svc.cluster_ip)
}

fn serve(cluster: &str, name: &str, port: u16, namespace: &str) -> anyhow::Result<()> {
    let Some(mut topo) = load() else { bail!("no sandbox is up (start one with `causeway sandbox up`)") };
    let index = cluster_index(&topo, cluster)?;
    step(&format!("serving {namespace}/{name} in {cluster}'s pod on port {port} and exporting it"));
    let ip = serve_and_export(&mut topo, index, name, port, namespace)?;
    std::fs::write(STATE_FILE, serde_json::to_vec_pretty(&topo)?).context("saving the sandbox state")?;
    topo.detach();
    println!("{name}.{namespace}.svc.clusterset.local: {cluster} serves it at {ip}:{port}");
    println!("try `causeway sandbox exec cluster-1 -- dig +short {name}.{namespace}.svc.clusterset.local`");
    Ok(())
}

/// From every cluster's pod: resolve the demo service through the cluster's DNS and connect
/// to its ClusterSetIP. One cell per cluster: `OK (who answered)` or what failed; and the
/// clusters whose pod failed.
fn service_row(topo: &Topology) -> (String, Vec<String>) {
    let name = format!("{DEMO_SERVICE}.{DEMO_NAMESPACE}.svc.clusterset.local");
    let mut cells = Vec::new();
    let mut failed = Vec::new();
    for c in &topo.clusters {
        let run = |args: &[&str]| {
            topo.pod_command(c.index, args)
                .and_then(|cmd| {
                    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
                    causeway_netns::exec::in_ns(&c.pod_ns, &cmd)
                })
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        };
        let vip = run(&["dig", "+short", "+time=1", "+tries=2", &name, "A"]).unwrap_or_default();
        let cell = if vip.is_empty() {
            "FAIL (no answer)".to_owned()
        } else {
            let script = format!("exec 3<>/dev/tcp/{vip}/{DEMO_PORT} && read -r -t 2 line <&3 && echo $line");
            match run(&["timeout", "3", "bash", "-c", &script]) {
                Ok(who) if !who.is_empty() => format!("OK ({who})"),
                _ => "FAIL (no connection)".to_owned(),
            }
        };
        if !cell.starts_with("OK") {
            failed.push(c.cluster_id.clone());
        }
        cells.push(vec![c.cluster_id.clone(), name.clone(), vip, cell]);
    }
    (causeway_cli_format::table(&["FROM", "NAME", "CLUSTERSET IP", "CONNECT"], &cells), failed)
}

fn fail_or_heal(cluster: &str, how: Option<Failure>) -> anyhow::Result<()> {
    let Some(mut topo) = load() else { bail!("no sandbox is up (start one with `causeway sandbox up`)") };
    let Some(index) = topo.clusters.iter().position(|c| c.cluster_id == cluster).map(|i| i + 1) else {
        let ids: Vec<&str> = topo.clusters.iter().map(|c| c.cluster_id.as_str()).collect();
        bail!("the sandbox has no cluster {cluster:?} (it has {})", ids.join(", "));
    };
    match how {
        Some(how) => {
            if !topo.standbys.iter().any(|s| s.index == index) {
                eprintln!(
                    "note: {cluster} has no standby gateway (`sandbox up --gateways 2`): it stays unreachable until healed"
                );
            }
            step(&format!("failing {cluster}'s active gateway ({})", how.as_str()));
            topo.fail_gateway(index, how)
        }
        None => {
            step(&format!("healing {cluster}'s active gateway"));
            topo.heal_gateway(index)?;
            // A restarted gateway is a new child of this process: leave it running.
            topo.detach();
            Ok(())
        }
    }
}

/// The NATs `sandbox up --nat` can put gateways behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Nat {
    /// Masquerade keeping ports (endpoint-independent mapping), new inbound flows dropped.
    Easy,
    /// `masquerade fully-random` (a new port per destination), new inbound flows dropped.
    Hard,
    /// Easy, and no UDP leaves or enters the site: tunnels run through the broker's relay
    /// over its HTTPS port.
    Blocked,
}

fn up(clusters: usize, gateways: u8, overlapping: bool, nat: Option<Nat>) -> anyhow::Result<()> {
    if load().is_some() {
        bail!("a sandbox is already up (see `causeway sandbox status`); run `causeway sandbox down` first");
    }
    let bin = std::env::current_exe().context("locating the causeway binary")?;
    let mut spec = TopologySpec::new(PREFIX, clusters, bin);
    spec.run_dir = run_dir();
    spec.host_link = true;
    spec.overlapping = overlapping;
    if let Some(kind) = nat {
        spec.nat = (1..=clusters).collect();
        spec.nat_kind = match kind {
            Nat::Easy => causeway_netns::NatKind::Easy,
            Nat::Hard => causeway_netns::NatKind::Hard,
            Nat::Blocked => causeway_netns::NatKind::Blocked,
        };
    }
    step(&format!(
        "building {clusters} clusters from network namespaces (CNI bridge + host-local pods){}{}",
        if overlapping { ", all with the same CIDRs (overlap mode)" } else { "" },
        if nat.is_some() { ", each gateway behind its own NAT" } else { "" }
    ));
    let mut topo = Topology::build(spec)?;
    let started = (|| {
        step(&format!("starting the broker at {}", topo.broker_url()));
        topo.start_broker()?;
        for i in 1..=clusters {
            step(&format!("starting the gateway of cluster-{i}"));
            topo.start_gateway(i)?;
        }
        step("waiting for every tunnel to come up");
        topo.wait_connected(Duration::from_secs(60))?;
        for i in 1..=clusters {
            if gateways >= 2 {
                step(&format!("starting cluster-{i}'s standby gateway"));
                topo.start_standby_gateway(i)?;
            }
            step(&format!("starting cluster-{i}'s route agent and cluster-set DNS on its worker"));
            topo.start_route_agent(i)?;
            topo.start_dns(i)?;
        }
        if gateways >= 2 {
            step("waiting for every standby to be warm (probed and answering)");
            wait_for(Duration::from_secs(60), "every gateway to see every other cluster's standby", || {
                (1..=clusters).all(|i| {
                    topo.gateway_status(i).is_ok_and(|s| {
                        s.standbys.len() == clusters - 1 && s.standbys.iter().all(|x| x.status == "connected")
                    })
                })
            })?;
        }
        for i in 1..=clusters {
            step(&format!("serving and exporting {DEMO_NAMESPACE}/{DEMO_SERVICE} in cluster-{i}"));
            serve_and_export(&mut topo, i, DEMO_SERVICE, DEMO_PORT, DEMO_NAMESPACE)?;
        }
        Ok(())
    })();
    if let Err(e) = started {
        // The teardown below removes the logs: show their ends first.
        for c in &topo.clusters {
            if let Ok(log) = std::fs::read_to_string(&c.gw_log) {
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                eprintln!("--- last lines of the {} gateway's log:", c.cluster_id);
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        return Err(e);
    }
    std::fs::write(STATE_FILE, serde_json::to_vec_pretty(&topo)?).context("saving the sandbox state")?;
    // The route agents pick the imports up within a watch round trip: give the service a moment.
    let report = check(&topo, Duration::from_secs(10));
    let addresses: Vec<String> = topo
        .clusters
        .iter()
        .map(|c| match topo.reach_ip(c.index) {
            Ok(at) if at != c.pod_ip => format!("{}: {} (reached at {at})", c.cluster_id, c.pod_ip),
            _ => format!("{}: {}", c.cluster_id, c.pod_ip),
        })
        .collect();
    topo.detach();
    println!("\npods: {}", addresses.join(", "));
    report.print();
    println!("broker: {} (try `causeway show clusters`, `causeway show connections`)", topo.broker_url());
    println!("tear down with `causeway sandbox down`");
    report.result()
}

/// What [`check`] found.
struct Report {
    matrix: String,
    service: String,
    /// Each pair or pod that failed, named.
    failures: Vec<String>,
}

impl Report {
    fn print(&self) {
        println!("pod-to-pod connectivity:\n{}", self.matrix);
        println!(
            "cluster-set service (every cluster exports it; each pod's own cluster answers first):\n{}",
            self.service
        );
    }

    fn result(&self) -> anyhow::Result<()> {
        if self.failures.is_empty() {
            return Ok(());
        }
        bail!("{}; gateway logs are in {}", self.failures.join("; "), run_dir().display())
    }
}

/// Pings every pod from every pod and connects to the demo service from every pod (retrying
/// the service for up to `service_within`).
fn check(topo: &Topology, service_within: Duration) -> Report {
    step("pinging every pod from every pod");
    let m = topo.connectivity_matrix();
    let (matrix, _) = topo.render_matrix(&m);
    let mut failures = Vec::new();
    for (from, row) in topo.clusters.iter().zip(&m) {
        for (to, ok) in topo.clusters.iter().zip(row) {
            if !ok {
                failures.push(format!("{} → {}: pod unreachable", from.cluster_id, to.cluster_id));
            }
        }
    }
    step("resolving and connecting to the service every cluster exports, from every pod");
    let mut service = (String::new(), Vec::new());
    let _ = wait_for(service_within, "the demo service answered from every pod", || {
        service = service_row(topo);
        service.1.is_empty()
    });
    failures.extend(
        service.1.iter().map(|c| format!("{c} → {DEMO_SERVICE}.{DEMO_NAMESPACE}: service unreachable")),
    );
    Report { matrix, service: service.0, failures }
}

/// `causeway verify` on the sandbox: the matrix and the service row, and an error naming every
/// pair that failed.
pub fn verify() -> anyhow::Result<()> {
    let Some(mut topo) = load() else { bail!("no sandbox is up (start one with `causeway sandbox up`)") };
    topo.detach();
    let report = check(&topo, Duration::from_secs(5));
    report.print();
    report.result()?;
    let n = topo.clusters.len();
    println!("verified: {} pod-to-pod pairs and the service from {n} pods", n * n);
    Ok(())
}

fn status() -> anyhow::Result<()> {
    let Some(topo) = load() else {
        println!("no sandbox is up (start one with `causeway sandbox up`)");
        return Ok(());
    };
    println!("broker: {}", topo.broker_url());
    let mut rows = Vec::new();
    let others = topo.clusters.len() - 1;
    let describe = |socket: &std::path::Path| match causeway_broker_api::status::fetch(socket) {
        Ok(s) => {
            let up = s.connections.iter().filter(|c| c.status == "connected").count();
            ("running".to_owned(), format!("{up}/{others} connected"))
        }
        Err(causeway_broker_api::status::FetchError::Connect { .. }) => {
            ("not running".to_owned(), "-".to_owned())
        }
        Err(e) => (format!("unreadable: {e}"), "-".to_owned()),
    };
    for c in &topo.clusters {
        let (state, conns) = describe(&c.status_socket);
        let gateway =
            c.nat_ip.as_ref().map_or_else(|| c.gw_ip.clone(), |nat| format!("{} (NAT {nat})", c.gw_ip));
        rows.push(vec![c.cluster_id.clone(), gateway, c.pod_ip.clone(), state, conns]);
        for sb in topo.standbys.iter().filter(|s| s.index == c.index) {
            let (state, conns) = describe(&sb.socket);
            rows.push(vec![
                format!("{} (standby)", c.cluster_id),
                sb.ip.clone(),
                c.pod_ip.clone(),
                state,
                conns,
            ]);
        }
    }
    print!(
        "{}",
        causeway_cli_format::table(&["CLUSTER", "GATEWAY NODE", "POD IP", "GATEWAY", "TUNNELS"], &rows)
    );
    Ok(())
}

fn down() -> anyhow::Result<()> {
    step("stopping the sandbox's processes and deleting its namespaces");
    let mut host_if = format!("{PREFIX}-host");
    host_if.truncate(15);
    let res = teardown_by_prefix(PREFIX, &run_dir(), Some(host_if));
    match std::fs::remove_file(STATE_FILE) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).context("removing the sandbox state");
        }
        _ => {}
    }
    res?;
    println!("sandbox down: no namespace, link or process of it is left");
    Ok(())
}
