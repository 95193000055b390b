//! The topology: namespaces, links, CNI pods, and the broker and gateway processes.

use std::{
    fs::File,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::exec::{self, in_ns, in_ns_with_input, ip, sysctl};

/// Port the sandbox broker listens on.
pub const BROKER_PORT: u16 = 7780;
/// WireGuard port of every sandbox gateway.
pub const WG_PORT: u16 = 51820;
const BROKER_IP: &str = "172.31.0.2";
const HOST_IP: &str = "172.31.0.1";
const CNI_DIR: &str = "/usr/lib/cni";

/// What to build.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TopologySpec {
    /// Prefix of every namespace name (and of the root-namespace veth, if any).
    pub prefix: String,
    pub clusters: usize,
    /// The `causeway` binary to run for the broker and gateways.
    pub causeway_bin: PathBuf,
    /// Logs, keys, stores and sockets live here; removed on teardown.
    pub run_dir: PathBuf,
    /// Give the root namespace a veth with a /32 route to the broker.
    pub host_link: bool,
    /// MTU of the underlay links.
    pub underlay_mtu: u16,
    /// Extra arguments for `causeway broker` and `causeway gateway`.
    #[serde(default)]
    pub broker_args: Vec<String>,
    #[serde(default)]
    pub gateway_args: Vec<String>,
    /// Overlap mode: every cluster gets the same pod and service CIDRs (cluster 1's), the
    /// broker gives them global prefixes, and pods reach each other at those.
    #[serde(default)]
    pub overlapping: bool,
    /// Clusters (1-based) whose gateway sits behind a NAT router of its own.
    #[serde(default)]
    pub nat: Vec<usize>,
    /// What kind of NAT those routers are.
    #[serde(default)]
    pub nat_kind: NatKind,
}

/// The NAT in front of a gateway.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NatKind {
    /// One mapping per socket, kept port ([`NAT_RULES`]).
    #[default]
    Easy,
    /// A new random port for every destination ("fully-random"): what STUN learns is no use
    /// to a peer, so only the relay connects two of them.
    Hard,
    /// An easy NAT that lets no UDP through at all (to the other sites or the broker): only
    /// the relay's stream on the broker's HTTPS port connects.
    Blocked,
}

/// A site NAT in front of a gateway: masquerade with the port kept where it is free (so the
/// mapping is the same for every destination: "endpoint-independent"), and only replies let
/// in (a new flow from outside is dropped silently, leaving no state behind that would make
/// the next mapping take another port), as a home or cloud NAT gateway does. The router's
/// namespace is `<prefix>-c<i>-nat`, its outside address `172.31.0.<100+i>`.
const NAT_RULES: &str = r#"
table ip causeway_nat {
    chain outbound {
        type nat hook postrouting priority srcnat;
        oifname "wan" masquerade
    }
    chain forwarding {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan" oifname "wan" accept
    }
    chain inbound {
        type filter hook input priority filter; policy accept;
        iifname "wan" ct state new drop
    }
}
"#;

impl TopologySpec {
    /// A spec with defaults: no host link, underlay MTU 1500.
    #[must_use]
    pub fn new(prefix: &str, clusters: usize, causeway_bin: PathBuf) -> Self {
        Self {
            prefix: prefix.to_owned(),
            clusters,
            causeway_bin,
            run_dir: PathBuf::from("/run/causeway").join(prefix),
            host_link: false,
            underlay_mtu: 1500,
            broker_args: Vec::new(),
            gateway_args: Vec::new(),
            overlapping: false,
            nat: Vec::new(),
            nat_kind: NatKind::Easy,
        }
    }
}

/// One cluster of the topology.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub index: usize,
    pub cluster_id: String,
    pub gw_ns: String,
    pub node_ns: String,
    pub pod_ns: String,
    pub pod_ip: String,
    pub pod_cidr: String,
    pub service_cidr: String,
    /// The gateway's address on its uplink: on the underlay, or behind its NAT router.
    pub gw_ip: String,
    /// The NAT router's outside address, when the gateway is behind one.
    #[serde(default)]
    pub nat_ip: Option<String>,
    pub status_socket: PathBuf,
    pub gw_log: PathBuf,
    /// Tunnel device name, unique on the host (the UAPI socket path is host-wide).
    pub device: String,
}

impl ClusterInfo {
    /// The number in this cluster's own addresses (`10.<net>.2.0/24` for the worker's pods):
    /// its index, or 1 for every cluster when they overlap.
    #[must_use]
    pub fn net(&self) -> usize {
        self.pod_cidr.split('.').nth(1).and_then(|n| n.parse().ok()).unwrap_or(self.index)
    }
}

/// A built topology. Dropping it tears everything down unless [`Topology::detach`] was called.
#[derive(Debug, Serialize, Deserialize)]
pub struct Topology {
    pub spec: TopologySpec,
    pub clusters: Vec<ClusterInfo>,
    pub broker_ns: String,
    pub underlay_ns: String,
    /// Every namespace created, in creation order.
    pub namespaces: Vec<String>,
    /// Second gateway nodes ([`Topology::start_standby_gateway`]).
    #[serde(default)]
    pub standbys: Vec<StandbyNode>,
    /// Services started in pods ([`Topology::serve`]).
    #[serde(default)]
    pub services: Vec<PodService>,
    #[serde(skip)]
    children: Vec<(String, Child)>,
    #[serde(skip)]
    detached: bool,
}

impl Topology {
    /// Builds namespaces, links and pods (no processes yet). On error, what was built is torn
    /// down before the error is returned.
    pub fn build(spec: TopologySpec) -> anyhow::Result<Self> {
        preflight(&spec)?;
        if spec.clusters == 0 || spec.clusters > 50 {
            bail!("--clusters must be between 1 and 50 (got {})", spec.clusters);
        }
        let p = &spec.prefix;
        // The number in a cluster's own addresses: its index, or 1 for all when they overlap.
        let net = |i: usize| if spec.overlapping { 1 } else { i };
        let mut topo = Topology {
            broker_ns: format!("{p}-broker"),
            underlay_ns: format!("{p}-underlay"),
            clusters: (1..=spec.clusters)
                .map(|i| ClusterInfo {
                    index: i,
                    cluster_id: format!("cluster-{i}"),
                    gw_ns: format!("{p}-c{i}-gw"),
                    node_ns: format!("{p}-c{i}-node"),
                    pod_ns: format!("{p}-c{i}-pod"),
                    pod_ip: String::new(),
                    pod_cidr: format!("10.{}.0.0/16", net(i)),
                    service_cidr: format!("10.{}.0.0/16", 100 + net(i)),
                    gw_ip: if spec.nat.contains(&i) {
                        format!("192.168.{i}.2")
                    } else {
                        format!("172.31.0.{}", 10 + i)
                    },
                    nat_ip: spec.nat.contains(&i).then(|| format!("172.31.0.{}", 100 + i)),
                    status_socket: spec.run_dir.join(format!("c{i}-gw.sock")),
                    gw_log: spec.run_dir.join(format!("c{i}-gw.log")),
                    device: {
                        let mut d = format!("{}c{i}", p.replace('-', ""));
                        d.truncate(15);
                        d
                    },
                })
                .collect(),
            namespaces: Vec::new(),
            standbys: Vec::new(),
            services: Vec::new(),
            children: Vec::new(),
            detached: false,
            spec,
        };
        if let Err(e) = topo.build_inner() {
            let _ = topo.teardown();
            return Err(e);
        }
        Ok(topo)
    }

    fn add_ns(&mut self, name: &str) -> anyhow::Result<()> {
        if exec::namespaces().iter().any(|n| n == name) {
            bail!("namespace {name} already exists: run `causeway sandbox down` (or delete it) first");
        }
        exec::run(&["ip", "netns", "add", name])?;
        self.namespaces.push(name.to_owned());
        ip(name, &["link", "set", "lo", "up"])
    }

    fn build_inner(&mut self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.spec.run_dir)
            .with_context(|| format!("creating {}", self.spec.run_dir.display()))?;
        self.mount_bpffs()?;
        let (u, b) = (self.underlay_ns.clone(), self.broker_ns.clone());
        let mtu = self.spec.underlay_mtu.to_string();
        self.add_ns(&u)?;
        ip(&u, &["link", "add", "br0", "type", "bridge"])?;
        ip(&u, &["link", "set", "br0", "mtu", &mtu, "up"])?;
        self.add_ns(&b)?;
        veth(&b, "eth0", &u, "broker")?;
        ip(&u, &["link", "set", "broker", "master", "br0", "mtu", &mtu, "up"])?;
        ip(&b, &["link", "set", "eth0", "mtu", &mtu])?;
        ip(&b, &["addr", "add", &format!("{BROKER_IP}/24"), "dev", "eth0"])?;
        ip(&b, &["link", "set", "eth0", "up"])?;

        let all: Vec<ClusterInfo> = self.clusters.clone();
        for (k, c) in all.iter().enumerate() {
            let i = c.index;
            for ns in [&c.gw_ns, &c.node_ns, &c.pod_ns] {
                self.add_ns(ns)?;
            }
            // Uplink of the gateway node to the underlay bridge, or to its NAT router.
            match &c.nat_ip {
                None => {
                    let port = format!("gw{i}");
                    veth(&c.gw_ns, "uplink", &u, &port)?;
                    ip(&u, &["link", "set", &port, "master", "br0", "mtu", &mtu, "up"])?;
                }
                Some(outside) => self.add_nat_router(c, outside)?,
            }
            ip(&c.gw_ns, &["link", "set", "uplink", "mtu", &mtu])?;
            ip(&c.gw_ns, &["addr", "add", &format!("{}/24", c.gw_ip), "dev", "uplink"])?;
            ip(&c.gw_ns, &["link", "set", "uplink", "up"])?;
            if c.nat_ip.is_some() {
                // Only the underlay is behind the router: nothing can follow a default route.
                ip(&c.gw_ns, &["route", "add", "172.31.0.0/24", "via", &format!("192.168.{i}.1")])?;
            }
            // The cluster's node LAN.
            veth(&c.gw_ns, "lan0", &c.node_ns, "lan0")?;
            ip(&c.gw_ns, &["addr", "add", &format!("172.20.{i}.1/24"), "dev", "lan0"])?;
            ip(&c.node_ns, &["addr", "add", &format!("172.20.{i}.2/24"), "dev", "lan0"])?;
            ip(&c.gw_ns, &["link", "set", "lan0", "up"])?;
            ip(&c.node_ns, &["link", "set", "lan0", "up"])?;
            for ns in [&c.gw_ns, &c.node_ns] {
                sysctl(ns, "net.ipv4.ip_forward", "1")?;
            }
            // The gateway node reaches the worker's pods via the worker (what the CNI's
            // host routes do in a real cluster).
            ip(
                &c.gw_ns,
                &["route", "add", &format!("10.{}.2.0/24", c.net()), "via", &format!("172.20.{i}.2")],
            )?;
            // Route-agent stand-in: the worker sends remote clusters' prefixes to its gateway.
            for cidr in self.stand_in_routes(c) {
                ip(&c.node_ns, &["route", "add", &cidr, "via", &format!("172.20.{i}.1")])?;
            }
            // A pod on the worker, wired by the real CNI bridge + host-local plugins.
            let pod_ip = self.cni_add(c)?;
            self.clusters[k].pod_ip = pod_ip;
        }
        if self.spec.host_link {
            let host_if = self.host_if();
            exec::run(&["ip", "link", "add", &host_if, "type", "veth", "peer", "name", "host", "netns", &u])?;
            ip(&u, &["link", "set", "host", "master", "br0", "up"])?;
            exec::run(&["ip", "addr", "add", &format!("{HOST_IP}/32"), "dev", &host_if])?;
            exec::run(&["ip", "link", "set", &host_if, "up"])?;
            exec::run(&["ip", "route", "add", &format!("{BROKER_IP}/32"), "dev", &host_if])?;
        }
        Ok(())
    }

    /// Cluster `c`'s NAT router: `lan` faces the gateway's uplink (192.168.<i>.1/24), `wan`
    /// the underlay bridge at `outside`; the gateway's uplink veth is created here.
    fn add_nat_router(&mut self, c: &ClusterInfo, outside: &str) -> anyhow::Result<()> {
        let (i, u) = (c.index, self.underlay_ns.clone());
        let mtu = self.spec.underlay_mtu.to_string();
        let nat = self.nat_ns(i);
        self.add_ns(&nat)?;
        veth(&c.gw_ns, "uplink", &nat, "lan")?;
        let port = format!("nat{i}");
        veth(&nat, "wan", &u, &port)?;
        ip(&u, &["link", "set", &port, "master", "br0", "mtu", &mtu, "up"])?;
        ip(&nat, &["addr", "add", &format!("192.168.{i}.1/24"), "dev", "lan"])?;
        ip(&nat, &["addr", "add", &format!("{outside}/24"), "dev", "wan"])?;
        for dev in ["lan", "wan"] {
            ip(&nat, &["link", "set", dev, "mtu", &mtu, "up"])?;
        }
        sysctl(&nat, "net.ipv4.ip_forward", "1")?;
        let rules = match self.spec.nat_kind {
            NatKind::Easy => NAT_RULES.to_owned(),
            NatKind::Hard => {
                NAT_RULES.replace("oifname \"wan\" masquerade", "oifname \"wan\" masquerade fully-random")
            }
            NatKind::Blocked => NAT_RULES.replace(
                "ct state established,related accept",
                "meta l4proto udp counter drop\n        ct state established,related accept",
            ),
        };
        in_ns_with_input(&nat, &["nft", "-f", "-"], &[], rules.as_bytes())
            .with_context(|| format!("installing the NAT rules in {nat}"))?;
        Ok(())
    }

    /// The namespace of cluster `index`'s NAT router (when it has one).
    #[must_use]
    pub fn nat_ns(&self, index: usize) -> String {
        format!("{}-c{index}-nat", self.spec.prefix)
    }

    /// Adds a namespace `<prefix>-<name>` on the underlay with address `ip/24` on its
    /// `uplink`, e.g. a stock WireGuard peer for interop tests. Torn down with the rest.
    pub fn add_underlay_host(&mut self, name: &str, addr: &str) -> anyhow::Result<String> {
        let ns = format!("{}-{name}", self.spec.prefix);
        let mtu = self.spec.underlay_mtu.to_string();
        let u = self.underlay_ns.clone();
        self.add_ns(&ns)?;
        let mut port = format!("h-{name}");
        port.truncate(15);
        veth(&ns, "uplink", &u, &port)?;
        ip(&u, &["link", "set", &port, "master", "br0", "mtu", &mtu, "up"])?;
        ip(&ns, &["link", "set", "uplink", "mtu", &mtu])?;
        ip(&ns, &["addr", "add", &format!("{addr}/24"), "dev", "uplink"])?;
        ip(&ns, &["link", "set", "uplink", "up"])?;
        Ok(ns)
    }

    fn host_if(&self) -> String {
        let mut s = format!("{}-host", self.spec.prefix);
        s.truncate(15);
        s
    }

    fn cni_config(&self, c: &ClusterInfo) -> serde_json::Value {
        causeway_cni_config::bridge_config(
            "causeway-sandbox",
            "cni0",
            format!("10.{}.2.0/24", c.net()).parse().expect("valid subnet"),
            &self.spec.run_dir.join("cni").join(&c.node_ns),
            1500,
        )
    }

    fn cni(&self, c: &ClusterInfo, command: &str) -> anyhow::Result<Vec<u8>> {
        let netns = format!("/var/run/netns/{}", c.pod_ns);
        let env = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", c.pod_ns.as_str()),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", CNI_DIR),
        ];
        let conf = serde_json::to_vec(&self.cni_config(c))?;
        let out = in_ns_with_input(&c.node_ns, &[&format!("{CNI_DIR}/bridge")], &env, &conf)
            .with_context(|| format!("CNI {command} for pod {}", c.pod_ns))?;
        Ok(out.stdout)
    }

    fn cni_add(&self, c: &ClusterInfo) -> anyhow::Result<String> {
        let out = self.cni(c, "ADD")?;
        let ips = causeway_cni_config::parse_add_result(&out)?;
        Ok(ips[0].ip().to_string())
    }

    /// The broker's URL as seen from inside the topology (and, with a host link, from root).
    #[must_use]
    pub fn broker_url(&self) -> String {
        format!("https://{BROKER_IP}:{BROKER_PORT}")
    }

    /// The broker's data directory (store, certificates, admin and broker-info files).
    #[must_use]
    pub fn broker_dir(&self) -> PathBuf {
        self.spec.run_dir.join("broker")
    }

    /// The admin credentials file written by `deploy-broker`.
    #[must_use]
    pub fn admin_credentials(&self) -> PathBuf {
        self.broker_dir().join("admin-credentials.json")
    }

    /// Cluster `index`'s own credentials file (written by `join`).
    #[must_use]
    pub fn cluster_credentials(&self, index: usize) -> PathBuf {
        self.spec.run_dir.join(format!("c{index}-credentials.json"))
    }

    fn bin(&self) -> String {
        self.spec.causeway_bin.display().to_string()
    }

    fn spawn(&mut self, ns: &str, log: &Path, args: &[String]) -> anyhow::Result<()> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&self.spec.causeway_bin)
            .args(args)
            .env("RUST_LOG", std::env::var("CAUSEWAY_SANDBOX_LOG").unwrap_or_else(|_| "info".into()))
            .env_remove("CAUSEWAY_LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Own process group: a Ctrl-C on the CLI does not take the sandbox down with it.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {} in {ns}", self.spec.causeway_bin.display()))?;
        self.children.push((ns.to_owned(), child));
        Ok(())
    }

    /// Sets the broker up (`deploy-broker`: CA, certificate, admin and join credentials) on
    /// first use, starts it over HTTPS and waits until it answers.
    pub fn start_broker(&mut self) -> anyhow::Result<()> {
        let ns = self.broker_ns.clone();
        let dir = self.broker_dir();
        if !self.admin_credentials().exists() {
            exec::run(&[
                &self.bin(),
                "deploy-broker",
                "--local",
                "--data-dir",
                &dir.display().to_string(),
                "--address",
                BROKER_IP,
                "--port",
                &BROKER_PORT.to_string(),
            ])?;
        }
        let log = self.spec.run_dir.join("broker.log");
        let mut args = vec![
            "broker".into(),
            "--listen".into(),
            format!("{BROKER_IP}:{BROKER_PORT}"),
            "--data-dir".into(),
            dir.display().to_string(),
        ];
        args.extend(self.spec.broker_args.iter().cloned());
        self.spawn(&ns, &log, &args)?;
        let admin = self.admin_credentials().display().to_string();
        wait_for(Duration::from_secs(15), "the broker to answer", || {
            in_ns(&ns, &[&self.bin(), "show", "clusters", "--credentials", &admin]).is_ok()
        })
        .with_context(|| format!("see {}", log.display()))?;
        if self.spec.overlapping {
            // Before any cluster joins: every one then gets its global prefixes as it does.
            in_ns(&ns, &[&self.bin(), "cluster-set", "--overlap-mode", "--credentials", &admin])
                .context("switching the cluster set to overlap mode")?;
        }
        Ok(())
    }

    /// Registers cluster `index` with `causeway join` (once), from inside the topology.
    pub fn join(&self, index: usize) -> anyhow::Result<()> {
        let out = self.cluster_credentials(index);
        if out.exists() {
            return Ok(());
        }
        let c = &self.clusters[index - 1];
        let info = self.broker_dir().join("broker-info.json").display().to_string();
        in_ns(
            &self.broker_ns,
            &[
                &self.bin(),
                "join",
                &info,
                "--cluster-id",
                &c.cluster_id,
                "--pod-cidr",
                &c.pod_cidr,
                "--service-cidr",
                &c.service_cidr,
                "--output",
                &out.display().to_string(),
            ],
        )
        .map(|_| ())
    }

    /// The command line of gateway `index` (1-based).
    #[must_use]
    /// The bpffs that gateway pins live on: mounted from the root mount namespace so that it
    /// outlives each gateway process (`ip netns exec` gives every process its own /sys, whose
    /// /sys/fs/bpf is an empty sysfs directory), unmounted by the teardown.
    pub fn bpf_root(&self) -> PathBuf {
        bpf_root(&self.spec.run_dir)
    }

    fn mount_bpffs(&self) -> anyhow::Result<()> {
        let dir = self.bpf_root();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        if !is_mount_point(&dir) {
            exec::run(&["mount", "-t", "bpf", "bpffs", &dir.display().to_string()])?;
        }
        Ok(())
    }

    /// Gateway `index`'s pin directory.
    pub fn gateway_bpf_dir(&self, index: usize) -> PathBuf {
        self.bpf_root().join(format!("c{index}-gw"))
    }

    /// Gateway `index`'s arguments. The gateway translates ClusterSetIPs for its node's own
    /// processes (its cgroup, [`Self::gateway_cgroup`]), as on a real gateway node.
    pub fn gateway_args(&self, index: usize) -> anyhow::Result<Vec<String>> {
        let c = &self.clusters[index - 1];
        let run = GatewayRun {
            hostname: format!("gw-{}", c.index),
            node_ip: format!("172.20.{}.1", c.index),
            // Behind a NAT the gateway has no address of its own outside: it learns its
            // reflexive one from the broker's STUN responder.
            public_ip: c.nat_ip.is_none().then(|| c.gw_ip.clone()),
            state: self.spec.run_dir.join(format!("c{}-gw", c.index)),
            socket: c.status_socket.clone(),
            device: c.device.clone(),
            bpf: self.gateway_bpf_dir(index),
        };
        let mut args = self.gateway_command(index, &run);
        args.extend(["--cluster-interface".into(), "lan0".into()]);
        args.extend([
            "--service-cgroup".into(),
            self.gateway_cgroup(index)?.display().to_string(),
            "--service-bpf-dir".into(),
            self.bpf_root().join(format!("c{index}-gw-services")).display().to_string(),
        ]);
        args.extend(self.spec.gateway_args.iter().cloned());
        Ok(args)
    }

    /// The `causeway gateway` arguments every gateway of cluster `index` shares, for one run.
    fn gateway_command(&self, index: usize, run: &GatewayRun) -> Vec<String> {
        let c = &self.clusters[index - 1];
        [
            "gateway",
            "--broker-credentials",
            &self.cluster_credentials(index).display().to_string(),
            "--cluster-id",
            &c.cluster_id,
            "--pod-cidr",
            &c.pod_cidr,
            "--service-cidr",
            &c.service_cidr,
            "--hostname",
            &run.hostname,
            // The node's address inside the cluster (what its route agents point at) and the
            // one other clusters reach it at, as on a real node.
            "--node-ip",
            &run.node_ip,
            "--listen-port",
            &WG_PORT.to_string(),
            "--underlay-mtu",
            &self.spec.underlay_mtu.to_string(),
            "--state-dir",
            &run.state.display().to_string(),
            "--status-socket",
            &run.socket.display().to_string(),
            "--device",
            &run.device,
            "--uplink",
            "uplink",
            // Two lanes whatever the machine: every test runs the multi-queue path.
            "--tunnel-lanes",
            "2",
            "--bpf-dir",
            &run.bpf.display().to_string(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .chain(run.public_ip.iter().flat_map(|ip| ["--public-ip".to_owned(), ip.clone()]))
        .collect()
    }

    /// Builds a second gateway node for cluster `index` and starts a standby gateway on it: a
    /// namespace `<prefix>-c<index>-gwb` with an uplink on the underlay (172.31.0.(40+index))
    /// and its own link to the cluster's worker node (172.21.<index>.0/24), so that it can
    /// carry the cluster's traffic when a remote gateway moves it there. The worker's routes to
    /// other clusters still point at the first gateway.
    pub fn start_standby_gateway(&mut self, index: usize) -> anyhow::Result<StandbyNode> {
        let c = self.clusters[index - 1].clone();
        let ns = format!("{}-c{index}-gwb", self.spec.prefix);
        let addr = format!("172.31.0.{}", 40 + index);
        let mtu = self.spec.underlay_mtu.to_string();
        let u = self.underlay_ns.clone();
        self.add_ns(&ns)?;
        let port = format!("gw{index}b");
        veth(&ns, "uplink", &u, &port)?;
        ip(&u, &["link", "set", &port, "master", "br0", "mtu", &mtu, "up"])?;
        ip(&ns, &["link", "set", "uplink", "mtu", &mtu])?;
        ip(&ns, &["addr", "add", &format!("{addr}/24"), "dev", "uplink"])?;
        ip(&ns, &["link", "set", "uplink", "up"])?;
        veth(&ns, "lan0", &c.node_ns, "lan1")?;
        ip(&ns, &["addr", "add", &format!("172.21.{index}.1/24"), "dev", "lan0"])?;
        ip(&c.node_ns, &["addr", "add", &format!("172.21.{index}.2/24"), "dev", "lan1"])?;
        ip(&ns, &["link", "set", "lan0", "up"])?;
        ip(&c.node_ns, &["link", "set", "lan1", "up"])?;
        sysctl(&ns, "net.ipv4.ip_forward", "1")?;
        ip(&ns, &["route", "add", &format!("10.{}.2.0/24", c.net()), "via", &format!("172.21.{index}.2")])?;

        let dir = |what: &str| self.spec.run_dir.join(format!("c{index}-gwb{what}"));
        let mut device = format!("{}b", c.device);
        device.truncate(15);
        let run = GatewayRun {
            hostname: format!("gw-{index}-b"),
            node_ip: format!("172.21.{index}.1"),
            public_ip: Some(addr.clone()),
            state: dir(""),
            socket: dir(".sock"),
            device,
            bpf: self.bpf_root().join(format!("c{index}-gwb")),
        };
        let mut args = self.gateway_command(index, &run);
        args.extend(
            ["--cluster-interface", "lan0", "--metrics-listen", "off", "--role", "standby"].map(String::from),
        );
        args.extend(self.spec.gateway_args.iter().cloned());
        let log = dir(".log");
        self.spawn(&ns, &log, &args)?;
        let node = StandbyNode { index, ns, ip: addr, socket: run.socket, log };
        self.standbys.push(node.clone());
        Ok(node)
    }

    /// Fails cluster `index`'s first gateway (the one its records name active) `how`.
    pub fn fail_gateway(&mut self, index: usize, how: Failure) -> anyhow::Result<()> {
        let ns = self.clusters[index - 1].gw_ns.clone();
        match how {
            Failure::Kill => self.kill_in(&ns),
            Failure::Link => ip(&ns, &["link", "set", "uplink", "down"]),
            Failure::Drop => {
                let rules = format!(
                    "table inet {FAIL_TABLE} {{\n  chain in {{ type filter hook input priority 0; udp dport {WG_PORT} drop; }}\n  \
                     chain out {{ type filter hook output priority 0; udp sport {WG_PORT} drop; }}\n}}\n"
                );
                in_ns_with_input(&ns, &["nft", "-f", "-"], &[], rules.as_bytes()).map(drop)
            }
        }
    }

    /// Undoes every [`Failure`] of cluster `index`'s first gateway: the nftables drop goes, the
    /// uplink comes up, and a gateway that is not running is started again (same key, same
    /// state).
    pub fn heal_gateway(&mut self, index: usize) -> anyhow::Result<()> {
        let ns = self.clusters[index - 1].gw_ns.clone();
        if in_ns(&ns, &["nft", "list", "table", "inet", FAIL_TABLE]).is_ok() {
            in_ns(&ns, &["nft", "delete", "table", "inet", FAIL_TABLE])?;
        }
        ip(&ns, &["link", "set", "uplink", "up"])?;
        if exec::ns_pids(&ns).is_empty() {
            self.start_gateway(index)?;
        }
        Ok(())
    }

    /// The prefixes a worker's stand-in routes send to its gateway: the other clusters' CIDRs,
    /// or, when they overlap, the global pool they are all reached in.
    fn stand_in_routes(&self, c: &ClusterInfo) -> Vec<String> {
        if self.spec.overlapping {
            return vec![causeway_broker_api::DEFAULT_GLOBAL_POOL.to_owned()];
        }
        self.clusters
            .iter()
            .filter(|r| r.index != c.index)
            .flat_map(|r| [r.pod_cidr.clone(), r.service_cidr.clone()])
            .collect()
    }

    /// Where other clusters reach cluster `index`'s pod: its own address, or when clusters
    /// overlap, the address in its global prefix (from its record at the broker).
    pub fn reach_ip(&self, index: usize) -> anyhow::Result<String> {
        let c = &self.clusters[index - 1];
        self.reached_at(index, &c.pod_cidr, &c.pod_ip)
    }

    /// `ip` of cluster `index`'s `cidr` as the other clusters reach it: itself, or when
    /// clusters overlap, moved to the CIDR's global prefix (from the record at the broker).
    fn reached_at(&self, index: usize, cidr: &str, ip: &str) -> anyhow::Result<String> {
        if !self.spec.overlapping {
            return Ok(ip.to_owned());
        }
        let c = &self.clusters[index - 1];
        let admin = self.admin_credentials().display().to_string();
        let bin = self.spec.causeway_bin.display().to_string();
        let out = in_ns(&self.broker_ns, &[&bin, "show", "clusters", "-o", "json", "--credentials", &admin])?;
        let objects: Vec<causeway_broker_api::Object> = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("reading `show clusters`: {}", String::from_utf8_lossy(&out.stdout)))?;
        let record = objects.iter().find_map(|o| match &o.record {
            causeway_broker_api::Record::Cluster(r) if r.cluster_id == c.cluster_id => Some(r),
            _ => None,
        });
        let real: ipnetwork::IpNetwork = cidr.parse()?;
        let global = record
            .and_then(|r| r.global_of(&real))
            .with_context(|| format!("{} has no global prefix for {real} yet", c.cluster_id))?;
        causeway_broker_api::GlobalCidr::map(&real, &global, ip.parse()?)
            .map(|a| a.to_string())
            .with_context(|| format!("{ip} is outside {real}"))
    }

    /// Replaces cluster `index`'s stand-in routes on its worker with a real route agent: the
    /// worker gets a link to the underlay (172.31.0.(60+index)) to reach the broker, and
    /// `causeway route-agent` points the remote prefixes at a gateway node of the cluster (the
    /// records' active one, or a live one when it stops answering). Returns the agent's log.
    pub fn start_route_agent(&mut self, index: usize) -> anyhow::Result<PathBuf> {
        let c = self.clusters[index - 1].clone();
        self.node_uplink(index)?;
        for cidr in self.stand_in_routes(&c) {
            ip(&c.node_ns, &["route", "del", &cidr, "via", &format!("172.20.{index}.1")])?;
        }
        let log = self.spec.run_dir.join(format!("c{index}-agent.log"));
        self.spawn_route_agent(index, &log)?;
        Ok(log)
    }

    fn spawn_route_agent(&mut self, index: usize, log: &Path) -> anyhow::Result<()> {
        let ns = self.clusters[index - 1].node_ns.clone();
        let args = [
            "route-agent".to_owned(),
            "--broker-credentials".to_owned(),
            self.cluster_credentials(index).display().to_string(),
            "--service-cgroup".to_owned(),
            self.pod_cgroup(index)?.display().to_string(),
            // On the shared bpffs: the pins outlive the agent (`ip netns exec` gives it a /sys
            // of its own, whose bpffs would die with it).
            "--service-bpf-dir".to_owned(),
            self.bpf_root().join(format!("c{index}-agent-services")).display().to_string(),
        ];
        self.spawn(&ns, log, &args)
    }

    /// Kills cluster `index`'s route agent with SIGKILL, as a crash or an OOM kill would: its
    /// routes and its pinned socket programs stay. The node's other processes (its DNS server)
    /// keep running.
    pub fn kill_route_agent(&mut self, index: usize) -> anyhow::Result<()> {
        let ns = self.clusters[index - 1].node_ns.clone();
        let is_agent = |pid: u32| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"route-agent"))
        };
        let before = self.children.len();
        self.children.retain_mut(|(n, child)| {
            if *n == ns && is_agent(child.id()) {
                let _ = child.kill();
                let _ = child.wait();
                false
            } else {
                true
            }
        });
        anyhow::ensure!(self.children.len() < before, "cluster {index} runs no route agent");
        Ok(())
    }

    /// Starts cluster `index`'s route agent again (after [`Self::kill_route_agent`]); returns
    /// the new run's log.
    pub fn restart_route_agent(&mut self, index: usize) -> anyhow::Result<PathBuf> {
        let runs = std::fs::read_dir(&self.spec.run_dir)?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("c{index}-agent")))
            .count();
        let log = self.spec.run_dir.join(format!("c{index}-agent-{}.log", runs + 1));
        self.spawn_route_agent(index, &log)?;
        Ok(log)
    }

    /// Cluster `index`'s pod cgroup (v2), created on first use: all namespaces share one
    /// kernel, so each cluster's pod processes live in their own cgroup, which its route
    /// agent's ClusterSetIP socket programs are attached to. [`Self::pod_command`] puts a
    /// command in it.
    pub fn pod_cgroup(&self, index: usize) -> anyhow::Result<PathBuf> {
        self.cgroup(&format!("c{index}"))
    }

    /// The cgroup of the pods of cluster `index`'s gateway node, which the gateway's socket
    /// programs are attached to.
    pub fn gateway_cgroup(&self, index: usize) -> anyhow::Result<PathBuf> {
        self.cgroup(&format!("c{index}-gw"))
    }

    fn cgroup(&self, name: &str) -> anyhow::Result<PathBuf> {
        ensure_cgroup2_mount()?;
        let dir = cgroup_dir(&self.spec.prefix).join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating the cgroup {}", dir.display()))?;
        Ok(dir)
    }

    /// `args` as run in cluster `index`'s pod: inside its cgroup (so ClusterSetIPs are
    /// translated), to be run in the pod's namespace (`in_ns(&pod_ns, …)`, `Bg::start`).
    pub fn pod_command(&self, index: usize, args: &[&str]) -> anyhow::Result<Vec<String>> {
        Ok(in_cgroup(&self.pod_cgroup(index)?, args))
    }

    /// A pod on cluster `index`'s gateway node, made on first use: a namespace
    /// `<prefix>-c<index>-gwpod` at `10.<index>.1.2` (the gateway node's pod subnet,
    /// `10.<index>.1.0/24`, which the worker routes via the gateway node). Returns the
    /// namespace; [`Self::gateway_pod_command`] runs a command in its cgroup.
    pub fn gateway_pod(&mut self, index: usize) -> anyhow::Result<String> {
        let ns = format!("{}-c{index}-gwpod", self.spec.prefix);
        if self.namespaces.contains(&ns) {
            return Ok(ns);
        }
        let c = self.clusters[index - 1].clone();
        self.add_ns(&ns)?;
        veth(&c.gw_ns, "pod0", &ns, "eth0")?;
        ip(&c.gw_ns, &["addr", "add", &format!("10.{}.1.1/24", c.net()), "dev", "pod0"])?;
        ip(&c.gw_ns, &["link", "set", "pod0", "up"])?;
        ip(&ns, &["addr", "add", &format!("10.{}.1.2/24", c.net()), "dev", "eth0"])?;
        ip(&ns, &["link", "set", "eth0", "up"])?;
        ip(&ns, &["route", "add", "default", "via", &format!("10.{}.1.1", c.net())])?;
        ip(
            &c.node_ns,
            &["route", "add", &format!("10.{}.1.0/24", c.net()), "via", &format!("172.20.{index}.1")],
        )?;
        Ok(ns)
    }

    /// `args` as run in cluster `index`'s gateway-node pod: inside the gateway node's cgroup,
    /// where the gateway's own socket programs translate (no route agent runs on a gateway
    /// node), to be run in [`Self::gateway_pod`]'s namespace.
    pub fn gateway_pod_command(&self, index: usize, args: &[&str]) -> anyhow::Result<Vec<String>> {
        Ok(in_cgroup(&self.gateway_cgroup(index)?, args))
    }

    /// Starts a TCP service `name` in cluster `index`'s pod on `port` (`causeway debug
    /// tcp-echo`: the cluster's id as the first line, then an echo), reachable at a ClusterIP of
    /// the cluster's service CIDR (`10.(100+index).0.(10+n)`), as kube-proxy would make it: the
    /// pod holds the address, the worker and the gateway node route it to the pod. Returns the
    /// service; the server runs until teardown.
    pub fn serve(&mut self, index: usize, name: &str, port: u16) -> anyhow::Result<PodService> {
        if let Some(s) = self.services.iter().find(|s| s.index == index && s.name == name) {
            bail!("{} already serves {name} (port {})", s.cluster_ip, s.port);
        }
        let c = self.clusters[index - 1].clone();
        let n = self.services.iter().filter(|s| s.index == index).count();
        anyhow::ensure!(n < 200, "cluster-{index} serves 200 services already");
        let cluster_ip = format!("10.{}.0.{}", 100 + c.net(), 10 + n);
        let host = format!("{cluster_ip}/32");
        ip(&c.pod_ns, &["addr", "replace", &host, "dev", "lo"])?;
        ip(&c.node_ns, &["route", "replace", &host, "via", &c.pod_ip])?;
        ip(&c.gw_ns, &["route", "replace", &host, "via", &format!("172.20.{index}.2")])?;
        let listen = format!("{cluster_ip}:{port}");
        let log = self.spec.run_dir.join(format!("c{index}-svc-{name}.log"));
        let args = ["debug", "tcp-echo", "--listen", &listen, "--banner", &c.cluster_id].map(str::to_owned);
        self.spawn(&c.pod_ns, &log, &args)?;
        crate::ready::wait_listening(&c.pod_ns, &listen, crate::ready::Proto::Tcp)?;
        let svc = PodService { index, name: name.to_owned(), cluster_ip, port };
        self.services.push(svc.clone());
        Ok(svc)
    }

    /// Gives cluster `index`'s worker a link to the underlay (172.31.0.(60+index)), so that
    /// what runs there (route agent, cluster-set DNS) reaches the broker. Idempotent.
    fn node_uplink(&mut self, index: usize) -> anyhow::Result<()> {
        let c = self.clusters[index - 1].clone();
        if ip(&c.node_ns, &["link", "show", "uplink"]).is_ok() {
            return Ok(());
        }
        let mtu = self.spec.underlay_mtu.to_string();
        let u = self.underlay_ns.clone();
        let port = format!("n{index}");
        veth(&c.node_ns, "uplink", &u, &port)?;
        ip(&u, &["link", "set", &port, "master", "br0", "mtu", &mtu, "up"])?;
        ip(&c.node_ns, &["link", "set", "uplink", "mtu", &mtu])?;
        ip(&c.node_ns, &["addr", "add", &format!("172.31.0.{}/24", 60 + index), "dev", "uplink"])?;
        ip(&c.node_ns, &["link", "set", "uplink", "up"])
    }

    /// Where cluster `index`'s cluster-set DNS answers: its worker's LAN address.
    #[must_use]
    pub fn dns_address(&self, index: usize) -> String {
        format!("172.20.{index}.2")
    }

    /// Starts cluster `index`'s cluster-set DNS (`causeway dns`) on its worker, makes the
    /// cluster's pod resolve through it (`/etc/netns/<pod>/resolv.conf`, which `ip netns exec`
    /// mounts over `/etc/resolv.conf`), and waits until it answers. Returns its log.
    pub fn start_dns(&mut self, index: usize) -> anyhow::Result<PathBuf> {
        self.start_dns_with(index, &[])
    }

    /// [`Self::start_dns`] with extra arguments for `causeway dns`.
    pub fn start_dns_with(&mut self, index: usize, extra: &[&str]) -> anyhow::Result<PathBuf> {
        self.node_uplink(index)?;
        let c = self.clusters[index - 1].clone();
        let addr = self.dns_address(index);
        let log = self.spec.run_dir.join(format!("c{index}-dns.log"));
        let args = [
            "dns".to_owned(),
            "--broker-credentials".to_owned(),
            self.cluster_credentials(index).display().to_string(),
            "--listen".to_owned(),
            format!("{addr}:53"),
        ];
        let args: Vec<String> = args.into_iter().chain(extra.iter().map(|a| (*a).to_owned())).collect();
        self.spawn(&c.node_ns, &log, &args)?;
        let etc = Path::new("/etc/netns").join(&c.pod_ns);
        std::fs::create_dir_all(&etc).with_context(|| format!("creating {}", etc.display()))?;
        std::fs::write(etc.join("resolv.conf"), format!("nameserver {addr}\noptions timeout:1 attempts:2\n"))
            .with_context(|| format!("writing {}/resolv.conf", etc.display()))?;
        let pod = c.pod_ns.clone();
        wait_for(Duration::from_secs(20), "cluster-set DNS to answer", || {
            in_ns(&pod, &["dig", "+short", "+time=1", "+tries=1", "dns-version.clusterset.local", "TXT"])
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("1.0.0"))
        })?;
        Ok(log)
    }

    /// Runs `causeway ARGS` from cluster `index`'s gateway node (it reaches the broker);
    /// returns its stdout, or its stderr as the error.
    pub fn causeway(&self, index: usize, args: &[&str]) -> anyhow::Result<String> {
        let bin = self.spec.causeway_bin.display().to_string();
        let mut full = vec![bin.as_str()];
        full.extend_from_slice(args);
        let out = in_ns(&self.clusters[index - 1].gw_ns, &full)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Exports a service [`Self::serve`] started, as `<name>.<namespace>.svc.clusterset.local`
    /// with its ClusterIP and its port (named after the service), with its cluster's
    /// credentials.
    pub fn export(&self, svc: &PodService, namespace: &str) -> anyhow::Result<()> {
        let creds = self.cluster_credentials(svc.index).display().to_string();
        let port = format!("{}/TCP:{}", svc.port, svc.name);
        // Overlapping clusters export the global address of their ClusterIP.
        let service_cidr = self.clusters[svc.index - 1].service_cidr.clone();
        let ip = self.reached_at(svc.index, &service_cidr, &svc.cluster_ip)?;
        self.causeway(
            svc.index,
            &[
                "export",
                "--credentials",
                &creds,
                "--namespace",
                namespace,
                &svc.name,
                "--ip",
                &ip,
                "--port",
                &port,
            ],
        )
        .map(drop)
        .with_context(|| format!("exporting {namespace}/{} from cluster-{}", svc.name, svc.index))
    }

    /// Runs `args` in cluster `index`'s pod (its namespace and its cgroup).
    pub fn pod_exec(&self, index: usize, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let cmd = self.pod_command(index, args)?;
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        in_ns(&self.clusters[index - 1].pod_ns, &cmd)
    }

    /// Streams `rate` sequence-numbered datagrams per second for `secs` seconds from cluster
    /// `from`'s pod to cluster `to`'s (`causeway debug udp-stream` → `udp-sequence-sink`);
    /// runs `during` `after` into it; returns what the sink saw.
    pub fn sequence_stream(
        &mut self,
        (from, to): (usize, usize),
        (rate, secs): (u32, u32),
        after: Duration,
        during: impl FnOnce(&mut Topology),
    ) -> anyhow::Result<StreamStats> {
        let (a, b) = (self.clusters[from - 1].clone(), self.clusters[to - 1].clone());
        let bin = self.bin();
        let addr = format!("{}:9100", b.pod_ip);
        // The sender addresses the pod as its cluster is reached (globally, when they overlap).
        let target = format!("{}:9100", self.reach_ip(to)?);
        let listen = (secs + 2).to_string();
        let sink = exec::Bg::start(
            &b.pod_ns,
            &[&bin, "debug", "udp-sequence-sink", "--listen", &addr, "--secs", &listen],
            Stdio::piped(),
        );
        crate::ready::wait_listening(&b.pod_ns, &addr, crate::ready::Proto::Udp)?;
        let (rate, secs) = (rate.to_string(), secs.to_string());
        let _source = exec::Bg::start(
            &a.pod_ns,
            &[&bin, "debug", "udp-stream", "--connect", &target, "--rate", &rate, "--secs", &secs],
            Stdio::null(),
        );
        std::thread::sleep(after);
        during(self);
        let out = sink.output();
        serde_json::from_str(&out).with_context(|| format!("the sequence sink printed {out:?}"))
    }

    /// Cluster `index`'s worker's nexthop toward its gateway (`ip nexthop show id 202001`).
    #[must_use]
    pub fn worker_nexthop(&self, index: usize) -> String {
        in_ns(&self.clusters[index - 1].node_ns, &["ip", "nexthop", "show", "id", "202001"])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Kills every process in namespace `ns` with SIGKILL (no cleanup), as a crash would.
    pub fn kill_namespace(&mut self, ns: &str) {
        let _ = self.kill_in(ns);
    }

    /// Starts gateway `index` (1-based), joining its cluster first if needed.
    pub fn start_gateway(&mut self, index: usize) -> anyhow::Result<()> {
        self.join(index)?;
        let c = self.clusters[index - 1].clone();
        let args = self.gateway_args(index)?;
        self.spawn(&c.gw_ns, &c.gw_log, &args)
    }

    /// Kills the broker with SIGKILL.
    pub fn kill_broker(&mut self) -> anyhow::Result<()> {
        let ns = self.broker_ns.clone();
        self.kill_in(&ns)
    }

    /// Kills gateway `index` with SIGKILL (no cleanup), as a crash would.
    pub fn kill_gateway(&mut self, index: usize) -> anyhow::Result<()> {
        let ns = self.clusters[index - 1].gw_ns.clone();
        self.kill_in(&ns)
    }

    /// Stops gateway `index` with SIGTERM (a clean stop, as a rolling update does) and waits
    /// for it to exit.
    pub fn stop_gateway(&mut self, index: usize) -> anyhow::Result<()> {
        let ns = self.clusters[index - 1].gw_ns.clone();
        self.signal_in(&ns, "TERM")
    }

    fn kill_in(&mut self, ns: &str) -> anyhow::Result<()> {
        self.signal_in(ns, "KILL")
    }

    fn signal_in(&mut self, ns: &str, signal: &str) -> anyhow::Result<()> {
        let ns = ns.to_owned();
        kill_ns_processes(&ns, signal);
        self.children.retain_mut(|(n, child)| {
            if *n == ns {
                let _ = child.wait();
                false
            } else {
                true
            }
        });
        Ok(())
    }

    /// Status of gateway `index` (1-based).
    pub fn gateway_status(&self, index: usize) -> anyhow::Result<causeway_broker_api::status::GatewayStatus> {
        Ok(causeway_broker_api::status::fetch(&self.clusters[index - 1].status_socket)?)
    }

    /// Gateway `index`'s Prometheus metrics, from its status socket.
    pub fn gateway_metrics(&self, index: usize) -> anyhow::Result<String> {
        Ok(causeway_broker_api::status::fetch_raw(&self.clusters[index - 1].status_socket, "/metrics")?)
    }

    /// Waits until every running gateway reports every other cluster connected.
    pub fn wait_connected(&self, timeout: Duration) -> anyhow::Result<()> {
        let n = self.clusters.len();
        wait_for(timeout, "all gateways to connect", || {
            (1..=n).all(|i| {
                self.gateway_status(i).is_ok_and(|s| {
                    s.connections.len() == n - 1 && s.connections.iter().all(|c| c.status == "connected")
                })
            })
        })
        .with_context(|| {
            let logs: Vec<String> = self.clusters.iter().map(|c| c.gw_log.display().to_string()).collect();
            format!("gateway logs: {}", logs.join(", "))
        })
    }

    /// Pod-to-pod reachability for every ordered pair: `result[i][j]` is i → j.
    #[must_use]
    pub fn connectivity_matrix(&self) -> Vec<Vec<bool>> {
        let targets: Vec<Option<String>> = self
            .clusters
            .iter()
            .map(|to| {
                // A pod reaches its own cluster at its own address.
                self.reach_ip(to.index).ok()
            })
            .collect();
        self.clusters
            .iter()
            .map(|from| {
                self.clusters
                    .iter()
                    .zip(&targets)
                    .map(|(to, at)| {
                        let at = if to.index == from.index { Some(&to.pod_ip) } else { at.as_ref() };
                        at.is_some_and(|a| exec::ping(&from.pod_ns, a, 2))
                    })
                    .collect()
            })
            .collect()
    }

    /// Renders the matrix as a table; the bool says whether every cell is OK.
    #[must_use]
    pub fn render_matrix(&self, m: &[Vec<bool>]) -> (String, bool) {
        let w = self.clusters.iter().map(|c| c.cluster_id.len()).max().unwrap_or(8) + 2;
        let mut s = format!("{:w$}", "from \\ to");
        for c in &self.clusters {
            s.push_str(&format!("{:>w$}", c.cluster_id));
        }
        s.push('\n');
        let mut all = true;
        for (i, row) in m.iter().enumerate() {
            s.push_str(&format!("{:w$}", self.clusters[i].cluster_id));
            for ok in row {
                all &= ok;
                s.push_str(&format!("{:>w$}", if *ok { "OK" } else { "FAIL" }));
            }
            s.push('\n');
        }
        (s, all)
    }

    /// Leaves the processes and namespaces running when this value is dropped (the sandbox).
    pub fn detach(&mut self) {
        self.detached = true;
        self.children.clear();
    }

    /// Stops every process, deletes every namespace, link and file this topology made. Runs
    /// every step and reports every failure.
    pub fn teardown(&mut self) -> anyhow::Result<()> {
        teardown_by_prefix(
            &self.spec.prefix,
            &self.spec.run_dir,
            self.spec.host_link.then(|| self.host_if()),
        )?;
        for (_, mut child) in self.children.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.namespaces.clear();
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if !self.detached
            && !self.namespaces.is_empty()
            && let Err(e) = self.teardown()
        {
            eprintln!("teardown of {}: {e:#}", self.spec.prefix);
        }
    }
}

/// A TCP service in a pod ([`Topology::serve`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodService {
    pub index: usize,
    pub name: String,
    pub cluster_ip: String,
    pub port: u16,
}

/// What a sequence stream's sink saw ([`Topology::sequence_stream`]).
#[derive(Clone, Debug, Deserialize)]
pub struct StreamStats {
    pub received: u64,
    /// Sequence numbers between the first and the last received that never arrived.
    pub lost: u64,
    /// The longest time between two consecutive arrivals.
    pub max_gap_ms: f64,
    pub last_seq: Option<u64>,
}

/// How [`Topology::fail_gateway`] fails a gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// SIGKILL the gateway process.
    Kill,
    /// Take its uplink down.
    Link,
    /// Drop its WireGuard traffic with nftables.
    Drop,
}

impl Failure {
    pub const ALL: [Failure; 3] = [Failure::Kill, Failure::Link, Failure::Drop];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Kill => "kill",
            Failure::Link => "link",
            Failure::Drop => "drop",
        }
    }
}

impl std::str::FromStr for Failure {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Failure::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| anyhow::anyhow!("{s:?} is no way to fail a gateway: kill, link or drop"))
    }
}

/// The nftables table [`Failure::Drop`] adds.
const FAIL_TABLE: &str = "cwfail";

/// A cluster's second gateway node (see [`Topology::start_standby_gateway`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StandbyNode {
    /// Its cluster (1-based).
    pub index: usize,
    pub ns: String,
    /// Its address on the underlay (its endpoint).
    pub ip: String,
    pub socket: PathBuf,
    pub log: PathBuf,
}

/// What differs between the gateway processes of one cluster.
struct GatewayRun {
    hostname: String,
    /// In the cluster (its LAN address).
    node_ip: String,
    /// On the underlay.
    public_ip: Option<String>,
    state: PathBuf,
    socket: PathBuf,
    device: String,
    bpf: PathBuf,
}

fn bpf_root(run_dir: &Path) -> PathBuf {
    run_dir.join("bpf")
}

/// Whether `path` is a mount point (of the calling process's mount namespace).
pub fn is_mount_point(path: &Path) -> bool {
    let want = path.display().to_string();
    std::fs::read_to_string("/proc/self/mounts")
        .is_ok_and(|m| m.lines().any(|l| l.split_whitespace().nth(1) == Some(want.as_str())))
}

/// A veth pair with each end created directly in its namespace (no name clash in root).
fn veth(ns_a: &str, name_a: &str, ns_b: &str, name_b: &str) -> anyhow::Result<()> {
    exec::run(&[
        "ip", "link", "add", name_a, "netns", ns_a, "type", "veth", "peer", "name", name_b, "netns", ns_b,
    ])
    .map(|_| ())
}

fn kill_ns_processes(ns: &str, signal: &str) {
    let pids = exec::ns_pids(ns);
    if pids.is_empty() {
        return;
    }
    let mut args = vec!["kill", "-s", signal];
    args.extend(pids.iter().map(String::as_str));
    let _ = exec::run(&args);
}

/// Removes everything under `prefix`: processes in its namespaces (SIGTERM, then SIGKILL),
/// the namespaces, the root-namespace veth, and `run_dir`. Works from names alone, so it also
/// cleans up after a crashed or killed test or CLI.
pub fn teardown_by_prefix(prefix: &str, run_dir: &Path, host_if: Option<String>) -> anyhow::Result<()> {
    let ours: Vec<String> =
        exec::namespaces().into_iter().filter(|n| n.starts_with(&format!("{prefix}-"))).collect();
    let mut errors = Vec::new();
    for ns in &ours {
        kill_ns_processes(ns, "TERM");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while ours.iter().any(|ns| !exec::ns_pids(ns).is_empty()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    for ns in &ours {
        kill_ns_processes(ns, "KILL");
    }
    for ns in ours.iter().rev() {
        if let Err(e) = exec::run(&["ip", "netns", "del", ns]) {
            errors.push(format!("{e:#}"));
        }
    }
    if let Some(host_if) = host_if {
        // Usually gone with the underlay namespace already (veth pairs die together).
        if exec::run(&["ip", "link", "show", &host_if]).is_ok()
            && let Err(e) = exec::run(&["ip", "link", "del", &host_if])
        {
            errors.push(format!("{e:#}"));
        }
    }
    // UAPI sockets of gateways that died without cleaning up (host-wide path).
    let device_prefix = format!("{}c", prefix.replace('-', ""));
    if let Ok(entries) = std::fs::read_dir("/var/run/wireguard") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&device_prefix)
                && name.ends_with(".sock")
                && let Err(err) = std::fs::remove_file(e.path())
            {
                errors.push(format!("removing {}: {err}", e.path().display()));
            }
        }
    }
    // The pods' cgroups: their processes are gone with the namespaces' (a straggler is
    // killed), then the directories go, children first.
    let cgroups = cgroup_dir(prefix);
    if cgroups.exists() {
        let children: Vec<PathBuf> = std::fs::read_dir(&cgroups)
            .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect())
            .unwrap_or_default();
        for dir in children.iter().chain(std::iter::once(&cgroups)) {
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                for pid in procs.split_whitespace() {
                    let _ = exec::run(&["kill", "-KILL", pid]);
                }
            }
        }
        for dir in children.iter().chain(std::iter::once(&cgroups)) {
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if Instant::now() >= deadline => {
                        errors.push(format!("removing the cgroup {}: {e}", dir.display()));
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
    }
    // The pods' resolver files (`ip netns exec` mounts them).
    if let Ok(entries) = std::fs::read_dir("/etc/netns") {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&format!("{prefix}-"))
                && let Err(err) = std::fs::remove_dir_all(e.path())
            {
                errors.push(format!("removing {}: {err}", e.path().display()));
            }
        }
    }
    // The gateways' pins: unmounting the bpffs frees every pinned map and link.
    let bpf = bpf_root(run_dir);
    if is_mount_point(&bpf)
        && let Err(e) = exec::run(&["umount", &bpf.display().to_string()])
    {
        errors.push(format!("{e:#}"));
    }
    match std::fs::remove_dir_all(run_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            errors.push(format!("removing {}: {e}", run_dir.display()))
        }
        _ => {}
    }
    if errors.is_empty() {
        info!(prefix, "torn down");
        Ok(())
    } else {
        warn!(prefix, errors = errors.len(), "teardown incomplete");
        bail!("teardown incomplete: {}", errors.join("; "))
    }
}

/// Where the harness mounts the cgroup v2 hierarchy (again) for itself: `ip netns exec`
/// mounts a fresh `/sys`, so inside a namespace `/sys/fs/cgroup` is not there; `/run` stays.
const CGROUP2_MOUNT: &str = "/run/causeway/cgroup2";

/// Mounts the cgroup v2 hierarchy at [`CGROUP2_MOUNT`] unless it is there already. Shared by
/// every topology on the host and never unmounted (a second mount of the same hierarchy
/// costs nothing); two topologies mounting at once is fine (one gets EBUSY and finds it).
fn ensure_cgroup2_mount() -> anyhow::Result<PathBuf> {
    let path = PathBuf::from(CGROUP2_MOUNT);
    let mounted = |p: &Path| {
        std::fs::read_to_string("/proc/mounts").is_ok_and(|m| {
            m.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(1) == Some(&p.to_str().unwrap_or_default()) && f.get(2) == Some(&"cgroup2")
            })
        })
    };
    if !mounted(&path) {
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        if let Err(e) = exec::run(&["mount", "-t", "cgroup2", "none", CGROUP2_MOUNT])
            && !mounted(&path)
        {
            return Err(e.context("mounting cgroup2 (is cgroup v2 available on this kernel?)"));
        }
    }
    Ok(path)
}

/// Where a topology's pod cgroups live.
/// `args` run by a shell that first moves itself into the cgroup `dir`.
fn in_cgroup(dir: &Path, args: &[&str]) -> Vec<String> {
    let mut cmd = vec![
        "bash".to_owned(),
        "-c".to_owned(),
        format!("echo $$ > {} && exec \"$@\"", dir.join("cgroup.procs").display()),
        "pod".to_owned(),
    ];
    cmd.extend(args.iter().map(|a| (*a).to_owned()));
    cmd
}

fn cgroup_dir(prefix: &str) -> PathBuf {
    PathBuf::from(CGROUP2_MOUNT).join(format!("causeway-{prefix}"))
}

fn preflight(spec: &TopologySpec) -> anyhow::Result<()> {
    if !exec::is_root() {
        bail!("building network namespaces needs root; run as root (sudo -E)");
    }
    for (path, pkg) in [
        (format!("{CNI_DIR}/bridge"), "containernetworking-plugins"),
        (format!("{CNI_DIR}/host-local"), "containernetworking-plugins"),
        ("/usr/bin/ping".to_owned(), "iputils-ping"),
    ] {
        if !Path::new(&path).exists() {
            bail!("{path} is missing: install {pkg} (scripts/install-deps.sh installs everything)");
        }
    }
    if !spec.causeway_bin.exists() {
        bail!("{} does not exist: build it with `cargo build -p causeway`", spec.causeway_bin.display());
    }
    Ok(())
}

/// Polls `f` every 200 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
