//! `causeway diagnose`: what breaks cross-cluster networking on a gateway node, and what to do
//! about it. `--local` checks the node it runs on (kernel features, forwarding, the tunnels
//! its gateway reports, firewall rules on the WireGuard port, the MTU toward every peer, CIDR
//! overlaps with the node's networks and routes, the clock against the broker's); without it,
//! every gateway of the local sandbox is checked in its own namespace by the same code.
//!
//! The analyses are pure functions of what the kernel tools print (`ip -j`, `nft -j`), so
//! they are tested on captured output; the I/O around them only runs the tools.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use causeway_broker_api::status::GatewayStatus;
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(clap::Args)]
pub struct DiagnoseArgs {
    /// Check only the node this runs on: a gateway node, e.g. `kubectl -n causeway-system
    /// exec ds/causeway-gateway -- causeway diagnose --local`. Without it, every gateway of the
    /// local sandbox is checked.
    #[arg(long)]
    local: bool,
    /// The gateway's status socket (with --local).
    #[arg(long, env = "CAUSEWAY_STATUS_SOCKET", default_value = "/run/causeway/gateway.sock")]
    status_socket: PathBuf,
    /// Credentials whose broker's clock this node's is compared with (with --local; without
    /// them the clock is not checked).
    #[arg(long, env = "CAUSEWAY_CREDENTIALS")]
    credentials: Option<PathBuf>,
    /// Print the findings as a JSON array instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    members: crate::kubernetes::MemberArgs,
}

/// How bad a finding is: `Fail` breaks traffic, `Warn` may, `Ok` is a check that passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "OK",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        }
    }
}

/// One check's result on one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub check: String,
    pub level: Level,
    pub detail: String,
    /// What to do (empty for `Ok`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub advice: String,
}

impl Finding {
    fn ok(check: &str, detail: impl Into<String>) -> Self {
        Self { check: check.into(), level: Level::Ok, detail: detail.into(), advice: String::new() }
    }
    fn warn(check: &str, detail: impl Into<String>, advice: impl Into<String>) -> Self {
        Self { check: check.into(), level: Level::Warn, detail: detail.into(), advice: advice.into() }
    }
    fn fail(check: &str, detail: impl Into<String>, advice: impl Into<String>) -> Self {
        Self { check: check.into(), level: Level::Fail, detail: detail.into(), advice: advice.into() }
    }
}

/// Bytes WireGuard adds to a packet on an IPv4 (60) or IPv6 (80) underlay.
fn wireguard_overhead(endpoint: IpAddr) -> u32 {
    match endpoint {
        IpAddr::V4(_) => 20 + 8 + 32,
        IpAddr::V6(_) => 40 + 8 + 32,
    }
}

// ---------------------------------------------------------------------------------------
// Pure analyses.

/// Where a chain's packets go relative to this node: in (dport matters) or out (sport).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    In,
    Out,
}

/// How one rule relates to UDP traffic on `port`.
#[derive(Debug, PartialEq, Eq)]
enum RuleEffect {
    /// Matches every such packet and drops or rejects it.
    Blocks,
    /// Matches every such packet and accepts it.
    Accepts,
    /// Drops or rejects some of them (other conditions too).
    MayBlock,
    /// Accepts some of them.
    MayAccept,
    /// Does not decide (no verdict, another protocol or port, a jump).
    Other,
}

/// Does an nft JSON right-hand side (number, set, range) contain `port`?
fn covers_port(right: &Value, port: u16) -> bool {
    let port = u64::from(port);
    match right {
        Value::Number(n) => n.as_u64() == Some(port),
        Value::Object(o) => {
            if let Some(Value::Array(items)) = o.get("set") {
                items.iter().any(|i| covers_port(i, port as u16))
            } else if let Some(Value::Array(r)) = o.get("range") {
                matches!((r.first().and_then(Value::as_u64), r.get(1).and_then(Value::as_u64)),
                    (Some(lo), Some(hi)) if lo <= port && port <= hi)
            } else {
                false
            }
        }
        Value::Array(items) => items.iter().any(|i| covers_port(i, port as u16)),
        _ => false,
    }
}

/// One match expression against UDP traffic on `port` in `dir`: `Some(true)` it matches all
/// of it, `Some(false)` none of it, `None` it depends on something else.
fn match_covers(m: &Value, port: u16, dir: Direction) -> Option<bool> {
    let op = m.get("op").and_then(Value::as_str).unwrap_or("==");
    let left = m.get("left")?;
    let right = m.get("right")?;
    let negate = op == "!=";
    if let Some(p) = left.get("payload") {
        let proto = p.get("protocol").and_then(Value::as_str).unwrap_or_default();
        let field = p.get("field").and_then(Value::as_str).unwrap_or_default();
        let ours = match dir {
            Direction::In => "dport",
            Direction::Out => "sport",
        };
        if matches!(proto, "udp" | "th") && field == ours {
            return Some(covers_port(right, port) != negate);
        }
        if matches!((proto, field), ("ip", "protocol") | ("ip6", "nexthdr")) {
            return Some((right.as_str() == Some("udp")) != negate);
        }
        return None;
    }
    if left.get("meta").and_then(|m| m.get("key")).and_then(Value::as_str) == Some("l4proto") {
        let udp = right.as_str() == Some("udp")
            || right.get("set").and_then(Value::as_array).is_some_and(|s| s.iter().any(|v| v == "udp"));
        return Some(udp != negate);
    }
    None
}

fn rule_effect(exprs: &[Value], port: u16, dir: Direction) -> RuleEffect {
    let mut conditional = false;
    for e in exprs {
        if let Some(m) = e.get("match") {
            match match_covers(m, port, dir) {
                Some(true) => {}
                Some(false) => return RuleEffect::Other,
                None => conditional = true,
            }
            continue;
        }
        let verdict = e.as_object().and_then(|o| o.keys().next()).map(String::as_str);
        match verdict {
            Some("drop" | "reject") => {
                return if conditional { RuleEffect::MayBlock } else { RuleEffect::Blocks };
            }
            Some("accept") => {
                return if conditional { RuleEffect::MayAccept } else { RuleEffect::Accepts };
            }
            Some("jump" | "goto" | "return" | "queue") => return RuleEffect::Other,
            // counter, log, limit, mangle, …: no verdict, go on.
            _ => {}
        }
    }
    RuleEffect::Other
}

/// What `nft -j list ruleset` says about UDP to and from `port`: rules (or chain policies)
/// that drop all of it (`Fail`) or some of it (`Warn`).
pub fn firewall_findings(ruleset: &Value, port: u16) -> Vec<Finding> {
    struct Chain {
        hook: String,
        policy: String,
        rules: Vec<(u64, Vec<Value>)>,
    }
    let mut chains: BTreeMap<(String, String, String), Chain> = BTreeMap::new();
    let items = ruleset.get("nftables").and_then(Value::as_array).cloned().unwrap_or_default();
    let key = |o: &Value, name: &str| {
        let s = |k: &str| o.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
        (s("family"), s("table"), s(name))
    };
    for item in &items {
        if let Some(c) = item.get("chain") {
            let hook = c.get("hook").and_then(Value::as_str).unwrap_or_default().to_owned();
            let policy = c.get("policy").and_then(Value::as_str).unwrap_or("accept").to_owned();
            chains.insert(key(c, "name"), Chain { hook, policy, rules: Vec::new() });
        }
    }
    for item in &items {
        if let Some(r) = item.get("rule")
            && let Some(chain) = chains.get_mut(&key(r, "chain"))
        {
            let handle = r.get("handle").and_then(Value::as_u64).unwrap_or(0);
            let exprs = r.get("expr").and_then(Value::as_array).cloned().unwrap_or_default();
            chain.rules.push((handle, exprs));
        }
    }
    let mut out = Vec::new();
    for ((family, table, name), chain) in &chains {
        let dir = match chain.hook.as_str() {
            "input" | "prerouting" | "ingress" => Direction::In,
            "output" | "postrouting" => Direction::Out,
            _ => continue,
        };
        let what = match dir {
            Direction::In => format!("UDP to port {port}"),
            Direction::Out => format!("UDP from port {port}"),
        };
        let at = format!("table {family} {table}, chain {name} (hook {})", chain.hook);
        let mut accepted = false;
        let mut maybe_accepted = false;
        for (handle, exprs) in &chain.rules {
            match rule_effect(exprs, port, dir) {
                RuleEffect::Blocks => {
                    out.push(Finding::fail(
                        "firewall",
                        format!("{at}: rule {handle} drops all {what}"),
                        format!(
                            "the tunnels need {what} in both directions: remove the rule (`nft delete rule {family} {table} {name} handle {handle}`) or accept the port before it"
                        ),
                    ));
                    accepted = true; // decided: later rules never see it
                    break;
                }
                RuleEffect::Accepts => {
                    accepted = true;
                    break;
                }
                RuleEffect::MayBlock => out.push(Finding::warn(
                    "firewall",
                    format!("{at}: rule {handle} drops some {what}"),
                    "check that it spares the other clusters' gateways (and the broker's relay)",
                )),
                RuleEffect::MayAccept => maybe_accepted = true,
                RuleEffect::Other => {}
            }
        }
        if !accepted && chain.policy == "drop" {
            if maybe_accepted {
                out.push(Finding::warn(
                    "firewall",
                    format!("{at}: policy drop, and only some {what} is accepted (e.g. replies)"),
                    format!("accept {what} from every peer, or the peers cannot start handshakes"),
                ));
            } else {
                out.push(Finding::fail(
                    "firewall",
                    format!("{at}: policy drop, and no rule accepts {what}"),
                    format!("add a rule accepting {what} to {family} {table} {name}"),
                ));
            }
        }
    }
    if out.is_empty() {
        out.push(Finding::ok("firewall", format!("no nftables rule drops UDP on port {port}")));
    }
    out
}

/// `ip -j link show` → each interface's MTU by name.
pub fn link_mtus(links: &Value) -> BTreeMap<String, u32> {
    links
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| {
            let name = l.get("ifname")?.as_str()?.to_owned();
            let mtu = u32::try_from(l.get("mtu")?.as_u64()?).ok()?;
            Some((name, mtu))
        })
        .collect()
}

/// `ip -j route get` → the interface the route leaves through.
pub fn route_dev(route: &Value) -> Option<String> {
    route.as_array()?.first()?.get("dev")?.as_str().map(str::to_owned)
}

/// `ip -j addr show` → (interface, address) for every address.
pub fn addresses(addrs: &Value) -> Vec<(String, IpAddr)> {
    let mut out = Vec::new();
    for link in addrs.as_array().into_iter().flatten() {
        let Some(name) = link.get("ifname").and_then(Value::as_str) else { continue };
        for a in link.get("addr_info").and_then(Value::as_array).into_iter().flatten() {
            if let Some(ip) = a.get("local").and_then(Value::as_str).and_then(|s| s.parse().ok()) {
                out.push((name.to_owned(), ip));
            }
        }
    }
    out
}

/// The MTU check toward one peer: the tunnel device's MTU plus WireGuard's overhead must fit
/// the underlay interface the peer's endpoint is reached through.
pub fn mtu_finding(
    peer: &str,
    endpoint: IpAddr,
    device: &str,
    device_mtu: u32,
    underlay: &str,
    underlay_mtu: u32,
) -> Finding {
    let need = device_mtu + wireguard_overhead(endpoint);
    if need <= underlay_mtu {
        Finding::ok(
            "mtu",
            format!("{peer}: {device} {device_mtu} + WireGuard fits {underlay} ({underlay_mtu})"),
        )
    } else {
        Finding::fail(
            "mtu",
            format!(
                "{peer}: {device}'s MTU {device_mtu} + {} bytes of WireGuard = {need} > {underlay_mtu}, the MTU of {underlay} toward {endpoint}",
                wireguard_overhead(endpoint)
            ),
            format!(
                "run the gateway with --underlay-mtu {underlay_mtu} (or less), or raise {underlay}'s MTU: large packets are dropped"
            ),
        )
    }
}

/// Addresses of this node (outside the tunnel device) inside another cluster's CIDR: its
/// traffic for them would stay here.
pub fn overlap_findings(
    local: &[(String, IpAddr)],
    device: &str,
    remote: &[(String, IpNetwork)],
) -> Vec<Finding> {
    let mut out = Vec::new();
    for (cluster, cidr) in remote {
        for (ifname, ip) in local {
            if ifname != device && cidr.contains(*ip) {
                out.push(Finding::fail(
                    "cidr-overlap",
                    format!("{ip} on {ifname} lies in {cluster}'s {cidr}"),
                    format!(
                        "this node's network overlaps {cluster}'s: renumber one of them, or run the cluster set in overlap mode (global CIDRs)"
                    ),
                ));
            }
        }
    }
    out
}

/// The clock check: this node against the broker (relay registrations are refused past 10
/// minutes, credential expiry and handshake logs drift with it).
pub fn clock_finding(local: SystemTime, broker: SystemTime) -> Finding {
    let skew = match local.duration_since(broker) {
        Ok(d) => d,
        Err(e) => e.duration(),
    };
    let secs = skew.as_secs();
    let detail = format!("this node's clock is {secs} s from the broker's");
    if skew <= Duration::from_secs(5) {
        Finding::ok("clock", detail)
    } else if skew <= Duration::from_secs(600) {
        Finding::warn("clock", detail, "synchronise the node's clock (chrony or systemd-timesyncd)")
    } else {
        Finding::fail(
            "clock",
            detail,
            "synchronise the node's clock: the broker's relay refuses registrations more than 10 minutes off",
        )
    }
}

/// What the gateway's own status says: its tunnels, refused records, route conflicts and
/// reconcile failures.
pub fn status_findings(s: &GatewayStatus) -> Vec<Finding> {
    let mut out = Vec::new();
    if s.connections.is_empty() {
        out.push(Finding::warn(
            "tunnels",
            "no tunnel: the gateway knows no other cluster (or is a standby)",
            "join another cluster to the set (`causeway show clusters`)",
        ));
    }
    for c in &s.connections {
        let handshake = c.last_handshake_secs.map_or_else(|| "never".to_owned(), |t| format!("{t:.0} s ago"));
        if c.status == "connected" {
            let path = c.path.as_deref().unwrap_or("direct");
            out.push(Finding::ok(
                "tunnels",
                format!("{}: connected ({path}, handshake {handshake})", c.cluster_id),
            ));
        } else {
            out.push(Finding::fail(
                "tunnels",
                format!("{}: {} via {} (handshake {handshake})", c.cluster_id, c.status, c.endpoint),
                format!(
                    "UDP {} must reach {} and come back: check the firewalls and security groups at both ends (run diagnose on {} too)",
                    s.listen_port, c.endpoint, c.cluster_id
                ),
            ));
        }
    }
    for (what, why) in &s.refused {
        out.push(Finding::fail(
            "records",
            format!("refused {what}: {why}"),
            "fix the other cluster's settings",
        ));
    }
    for conflict in &s.route_conflicts {
        out.push(Finding::fail(
            "routes",
            format!("route conflict: {conflict}"),
            "a route on this node claims part of another cluster's range: remove it or renumber",
        ));
    }
    for (what, why) in &s.reconcile_failures {
        out.push(Finding::fail("reconcile", format!("{what}: {why}"), "see the gateway's log"));
    }
    out
}

// ---------------------------------------------------------------------------------------
// The node's side: run the tools, feed the analyses.

fn tool_json(args: &[&str]) -> anyhow::Result<Value> {
    let out =
        Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("reading the output of {}", args.join(" ")))
}

fn ping(endpoint: IpAddr, payload: Option<u32>) -> bool {
    let mut cmd = Command::new("ping");
    cmd.args(["-c", "1", "-W", "1", "-q"]);
    if endpoint.is_ipv6() {
        cmd.arg("-6");
    }
    if let Some(size) = payload {
        cmd.args(["-M", "do", "-s", &size.to_string()]);
    }
    cmd.arg(endpoint.to_string()).output().is_ok_and(|o| o.status.success())
}

fn kernel_findings() -> Vec<Finding> {
    let mut out = Vec::new();
    out.push(match std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun") {
        Ok(_) => Finding::ok("kernel", "TUN: /dev/net/tun opens"),
        Err(e) => Finding::fail(
            "kernel",
            format!("TUN: /dev/net/tun: {e}"),
            "load the tun module (`modprobe tun`); in a pod, mount /dev/net/tun (the gateway DaemonSet does)",
        ),
    });
    out.push(if Path::new("/sys/kernel/btf/vmlinux").exists() {
        Finding::ok("kernel", "BTF: /sys/kernel/btf/vmlinux present")
    } else {
        Finding::fail(
            "kernel",
            "BTF: /sys/kernel/btf/vmlinux missing",
            "the eBPF programs need a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        )
    });
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let bpffs: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').collect::<Vec<_>>().get(1..3).map(|f| (f[0], f[1])))
        .filter(|(_, t)| *t == "bpf")
        .map(|(m, _)| m)
        .collect();
    out.push(match bpffs.first() {
        Some(at) => Finding::ok("kernel", format!("bpffs mounted at {at}")),
        None => Finding::warn(
            "kernel",
            "no bpf filesystem is mounted",
            "mount one (`mount -t bpf bpf /sys/fs/bpf`) so that routes and counters survive gateway restarts",
        ),
    });
    out.push(match std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").map(|s| s.trim().to_owned()) {
        Ok(v) if v == "1" => Finding::ok("kernel", "IPv4 forwarding on"),
        Ok(v) => Finding::fail(
            "kernel",
            format!("IPv4 forwarding off (net.ipv4.ip_forward = {v})"),
            "sysctl -w net.ipv4.ip_forward=1: the gateway forwards other nodes' pod traffic",
        ),
        Err(e) => Finding::warn("kernel", format!("net.ipv4.ip_forward unreadable: {e}"), "check /proc/sys"),
    });
    out
}

fn network_findings(s: &GatewayStatus) -> Vec<Finding> {
    let mut out = Vec::new();
    match tool_json(&["nft", "-j", "list", "ruleset"]) {
        Ok(ruleset) => out.extend(firewall_findings(&ruleset, s.listen_port)),
        Err(e) => out.push(Finding::warn("firewall", format!("not checked: {e:#}"), "install nftables")),
    }
    let links = tool_json(&["ip", "-j", "link", "show"]).map(|v| link_mtus(&v)).unwrap_or_default();
    let device_mtu = links.get(&s.device).copied();
    for c in &s.connections {
        let Some(endpoint) = c.endpoint.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()) else {
            continue;
        };
        let underlay =
            tool_json(&["ip", "-j", "route", "get", &endpoint.to_string()]).ok().and_then(|r| route_dev(&r));
        let (Some(device_mtu), Some(underlay)) = (device_mtu, underlay) else {
            out.push(Finding::warn(
                "mtu",
                format!("{}: the device or the route to {endpoint} is unknown", c.cluster_id),
                "is the gateway running here?",
            ));
            continue;
        };
        let Some(&underlay_mtu) = links.get(&underlay) else { continue };
        let link = mtu_finding(&c.cluster_id, endpoint, &s.device, device_mtu, &underlay, underlay_mtu);
        let fits = link.level == Level::Ok;
        out.push(link);
        // The path beyond the link: a full-size tunnel packet, don't fragment. Only a path
        // that answers small pings says anything when the large one is lost.
        let header = if endpoint.is_ipv6() { 48 } else { 28 };
        let size = device_mtu + wireguard_overhead(endpoint) - header;
        if fits && ping(endpoint, None) && !ping(endpoint, Some(size)) {
            out.push(Finding::fail(
                "mtu",
                format!(
                    "{}: a {}-byte packet with don't-fragment does not reach {endpoint}; small ones do",
                    c.cluster_id,
                    size + header
                ),
                "the path's MTU is below the tunnel's: lower --underlay-mtu on both ends (or fix the hop that drops it)",
            ));
        }
    }
    let remote: Vec<(String, IpNetwork)> = s
        .connections
        .iter()
        .flat_map(|c| c.cidrs.iter().filter_map(|x| x.parse().ok()).map(|n| (c.cluster_id.clone(), n)))
        .collect();
    match tool_json(&["ip", "-j", "addr", "show"]) {
        Ok(a) => {
            let found = overlap_findings(&addresses(&a), &s.device, &remote);
            if found.is_empty() {
                out.push(Finding::ok(
                    "cidr-overlap",
                    "no address of this node lies in another cluster's CIDR",
                ));
            }
            out.extend(found);
        }
        Err(e) => out.push(Finding::warn("cidr-overlap", format!("not checked: {e:#}"), "install iproute2")),
    }
    for (cluster, cidr) in &remote {
        // The first host of the range: where the node's routing sends the cluster's traffic.
        let probe = match cidr {
            IpNetwork::V4(n) => IpAddr::V4(n.nth(1).unwrap_or(n.network())),
            IpNetwork::V6(n) => IpAddr::V6(n.nth(1).unwrap_or(n.network())),
        };
        match tool_json(&["ip", "-j", "route", "get", &probe.to_string()]).ok().and_then(|r| route_dev(&r)) {
            Some(dev) if dev == s.device => {
                out.push(Finding::ok("routes", format!("{cluster}'s {cidr} goes into {dev}")));
            }
            Some(dev) => out.push(Finding::fail(
                "routes",
                format!("traffic to {cluster}'s {cidr} ({probe}) leaves through {dev}, not {}", s.device),
                "a more specific route (the node network or the CNI's) shadows that range: remove it or renumber",
            )),
            None => out.push(Finding::fail(
                "routes",
                format!("no route to {cluster}'s {cidr} ({probe})"),
                "the gateway installs these routes: see its log",
            )),
        }
    }
    out
}

/// Every check on this node.
pub async fn local(socket: &Path, credentials: Option<&Path>) -> Vec<Finding> {
    let mut out = kernel_findings();
    match causeway_broker_api::status::fetch(socket) {
        Ok(s) => {
            out.extend(status_findings(&s));
            out.extend(tokio::task::spawn_blocking(move || network_findings(&s)).await.unwrap_or_default());
        }
        Err(e) => out.push(Finding::fail(
            "gateway",
            format!("no status from {}: {e}", socket.display()),
            "is the gateway running on this node? (`--status-socket`)",
        )),
    }
    if let Some(path) = credentials {
        let clock = async {
            let creds = causeway_broker_api::Credentials::load(path).map_err(anyhow::Error::msg)?;
            let client = causeway_broker_api::BrokerClient::from_credentials(&creds)?;
            anyhow::Ok(client.clock().await?)
        };
        out.push(match clock.await {
            Ok(broker) => clock_finding(SystemTime::now(), broker),
            Err(e) => Finding::warn(
                "clock",
                format!("the broker's clock is unreadable: {e:#}"),
                "check the credentials",
            ),
        });
    }
    out
}

/// The findings of several nodes as a table (every finding) and advice lines (the others).
pub fn render(nodes: &[(String, Vec<Finding>)]) -> String {
    let mut rows = Vec::new();
    let mut advice = Vec::new();
    for (node, findings) in nodes {
        for f in findings {
            rows.push(vec![node.clone(), f.check.clone(), f.level.as_str().to_owned(), f.detail.clone()]);
            if f.level != Level::Ok {
                advice.push(format!("{node} {} ({}): {}", f.level.as_str(), f.check, f.advice));
            }
        }
    }
    let mut text = causeway_cli_format::table(&["NODE", "CHECK", "RESULT", "DETAIL"], &rows);
    if !advice.is_empty() {
        text.push_str("\nwhat to do:\n");
        for a in advice {
            text.push_str(&format!("  {a}\n"));
        }
    }
    text
}

/// An error naming every failed check, or nothing.
pub fn verdict(nodes: &[(String, Vec<Finding>)]) -> anyhow::Result<()> {
    let failed: Vec<String> = nodes
        .iter()
        .flat_map(|(node, f)| {
            f.iter().filter(|f| f.level == Level::Fail).map(move |f| format!("{node}: {}", f.check))
        })
        .collect();
    if failed.is_empty() {
        return Ok(());
    }
    // Each node's check once, in the order found.
    let mut unique: Vec<String> = Vec::new();
    for f in failed {
        if !unique.contains(&f) {
            unique.push(f);
        }
    }
    bail!("diagnose found what breaks cross-cluster traffic: {}", unique.join(", "))
}

pub async fn run(a: DiagnoseArgs) -> anyhow::Result<()> {
    let nodes = if a.local {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
        vec![(host, local(&a.status_socket, a.credentials.as_deref()).await)]
    } else if !a.members.contexts.is_empty() {
        let clusters = a.members.connect().await?;
        let settings = a.members.settings();
        kubernetes_nodes(&clusters, &settings, Duration::from_secs(150), Duration::from_secs(2)).await?
    } else {
        sandbox_nodes().await?
    };
    if a.json {
        let all: Vec<&Finding> = nodes.iter().flat_map(|(_, f)| f).collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        print!("{}", render(&nodes));
    }
    verdict(&nodes)
}

/// Runs `diagnose --local` on every gateway node of each cluster, each in a Job on that node
/// (host network, the gateway's run directory and credentials), and reads the findings from the
/// Jobs' logs; a node whose Job gave none gets a finding that says so.
pub async fn kubernetes_nodes(
    clusters: &[(String, causeway_deploy::Client)],
    settings: &causeway_deploy::Settings,
    timeout: Duration,
    poll: Duration,
) -> anyhow::Result<Vec<(String, Vec<Finding>)>> {
    use causeway_deploy::{apply, manifests};
    let command = [
        "causeway",
        "diagnose",
        "--local",
        "--json",
        "--credentials",
        "/etc/causeway/broker/credentials.json",
    ];
    let mut out = Vec::new();
    for (ctx, client) in clusters {
        eprintln!("  {ctx}: diagnosing its gateway nodes in Jobs");
        let runs = apply::run_on_gateway_nodes(
            client,
            settings,
            "causeway-diagnose",
            &command,
            true,
            timeout,
            poll,
            |l| {
                eprintln!("  {ctx}: {l}");
            },
        )
        .await?;
        if runs.is_empty() {
            out.push((
                ctx.clone(),
                vec![Finding::fail(
                    "gateway",
                    format!("no node carries {}=true", manifests::GATEWAY_LABEL),
                    "join the cluster (`causeway join --gateway-node …`), which labels its gateway nodes",
                )],
            ));
        }
        for run in runs {
            // The JSON array first; `diagnose` writes its verdict line after it.
            let findings =
                match serde_json::Deserializer::from_str(&run.log).into_iter::<Vec<Finding>>().next() {
                    Some(Ok(f)) => f,
                    _ => vec![Finding::fail(
                        "diagnose",
                        format!("the Job on {} gave no findings ({:?})", run.node, run.outcome),
                        format!("look at it: kubectl -n {} describe job {}", settings.namespace, run.job),
                    )],
                };
            out.push((format!("{ctx}/{}", run.node), findings));
        }
    }
    Ok(out)
}

/// Runs `diagnose --local` in every sandbox gateway's namespace (the checks read that
/// namespace's interfaces, routes, firewall and sysctls).
#[cfg(feature = "sandbox")]
async fn sandbox_nodes() -> anyhow::Result<Vec<(String, Vec<Finding>)>> {
    let gateways = causeway_lab::sandbox::gateways()?;
    let exe = std::env::current_exe().context("locating the causeway binary")?;
    let admin = causeway_lab::sandbox::admin_credentials();
    tokio::task::spawn_blocking(move || {
        let mut nodes = Vec::new();
        for g in gateways {
            let out = Command::new("ip")
                .args(["netns", "exec", &g.ns])
                .arg(&exe)
                .args(["diagnose", "--local", "--json", "--status-socket"])
                .arg(&g.status_socket)
                .arg("--credentials")
                .arg(&admin)
                .output()
                .with_context(|| format!("running diagnose in {}", g.ns))?;
            let findings: Vec<Finding> = serde_json::from_slice(&out.stdout).with_context(|| {
                format!("diagnose in {} printed no findings: {}", g.ns, String::from_utf8_lossy(&out.stderr))
            })?;
            nodes.push((g.name, findings));
        }
        anyhow::Ok(nodes)
    })
    .await?
}

#[cfg(not(feature = "sandbox"))]
async fn sandbox_nodes() -> anyhow::Result<Vec<(String, Vec<Finding>)>> {
    bail!(
        "this build has no sandbox: run `causeway diagnose --local` on each gateway node (e.g. `kubectl -n causeway-system exec ds/causeway-gateway -- causeway diagnose --local`)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn on_kubernetes_each_gateway_node_is_diagnosed_in_a_job_and_its_findings_read() {
        use causeway_deploy::testing::{Reply, Seen, client, list, not_found};
        use serde_json::json;
        let findings = serde_json::to_string_pretty(&vec![
            Finding::ok("kernel", "TUN: /dev/net/tun opens"),
            Finding::fail(
                "firewall",
                "table inet f, chain input (hook input): rule 3 drops all UDP to port 51820",
                "remove it",
            ),
        ])
        .unwrap();
        let log =
            format!("{findings}\nError: diagnose found what breaks cross-cluster traffic: gw-1: firewall\n");
        let node = |name: &str, gateway: bool| {
            let labels = if gateway { json!({"causeway.io/gateway": "true"}) } else { json!({}) };
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}})
        };
        let (kube, seen) = client(move |r: &Seen| match (r.method.as_str(), r.path()) {
            ("GET", "/api/v1/nodes") => {
                Reply::Json(200, list("Node", "v1", vec![node("gw-1", true), node("w-1", false)]))
            }
            ("PATCH", p) if p.contains("/jobs/") => Reply::Json(200, r.body.clone()),
            ("GET", p) if p.ends_with("/jobs/causeway-diagnose-gw-1") => Reply::Json(
                200,
                json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "causeway-diagnose-gw-1"},
                       "status": {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}}),
            ),
            ("GET", "/api/v1/namespaces/causeway-system/pods") => Reply::Json(
                200,
                list(
                    "Pod",
                    "v1",
                    vec![
                        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "causeway-diagnose-gw-1-x7k2p"}}),
                    ],
                ),
            ),
            ("GET", "/api/v1/namespaces/causeway-system/pods/causeway-diagnose-gw-1-x7k2p/log") => {
                Reply::Text(200, log.clone())
            }
            ("DELETE", _) => Reply::Json(200, causeway_deploy::testing::status(200, "", "")),
            _ => not_found("it"),
        });
        let settings = causeway_deploy::Settings::default();
        let clusters = vec![("east".to_owned(), kube)];
        let nodes = kubernetes_nodes(&clusters, &settings, Duration::from_secs(5), Duration::from_millis(10))
            .await
            .unwrap();
        assert_eq!(nodes.len(), 1, "only the gateway node");
        assert_eq!(nodes[0].0, "east/gw-1");
        assert_eq!(levels(&nodes[0].1), vec![Level::Ok, Level::Fail]);
        assert_eq!(
            verdict(&nodes).unwrap_err().to_string(),
            "diagnose found what breaks cross-cluster traffic: east/gw-1: firewall"
        );
        let seen = seen.lock().unwrap();
        let job = seen
            .iter()
            .find(|r| r.method == "PATCH" && r.path().ends_with("/jobs/causeway-diagnose-gw-1"))
            .unwrap();
        let spec = &job.body["spec"]["template"]["spec"];
        assert_eq!(spec["nodeName"], "gw-1");
        assert_eq!(spec["hostNetwork"], true);
        assert_eq!(spec["containers"][0]["command"][1], "diagnose");
        assert!(
            seen.iter().any(|r| r.uri.contains("labelSelector=job-name%3Dcauseway-diagnose-gw-1")),
            "pod looked up"
        );
        assert!(
            seen.iter().any(|r| r.method == "DELETE" && r.path().ends_with("/jobs/causeway-diagnose-gw-1")),
            "Job removed"
        );
    }

    fn nft(rules: Value) -> Value {
        serde_json::json!({ "nftables": rules })
    }

    fn chain(name: &str, hook: &str, policy: &str) -> Value {
        serde_json::json!({"chain": {"family": "inet", "table": "t", "name": name, "handle": 1,
            "type": "filter", "hook": hook, "prio": 0, "policy": policy}})
    }

    fn rule(chain: &str, handle: u64, expr: Value) -> Value {
        serde_json::json!({"rule": {"family": "inet", "table": "t", "chain": chain, "handle": handle, "expr": expr}})
    }

    fn udp_dport(right: Value) -> Value {
        serde_json::json!({"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": right}})
    }

    fn levels(f: &[Finding]) -> Vec<Level> {
        f.iter().map(|f| f.level).collect()
    }

    #[test]
    fn a_rule_dropping_the_port_fails_and_names_the_rule() {
        let set = nft(serde_json::json!([
            chain("input", "input", "accept"),
            rule(
                "input",
                7,
                serde_json::json!([udp_dport(51820.into()), {"counter": {"packets": 0, "bytes": 0}}, {"drop": null}])
            ),
        ]));
        let f = firewall_findings(&set, 51820);
        assert_eq!(levels(&f), vec![Level::Fail]);
        assert_eq!(f[0].detail, "table inet t, chain input (hook input): rule 7 drops all UDP to port 51820");
        assert!(f[0].advice.contains("nft delete rule inet t input handle 7"), "{}", f[0].advice);
        // Another port, a set without ours, a range around it.
        let other = nft(serde_json::json!([
            chain("input", "input", "accept"),
            rule("input", 2, serde_json::json!([udp_dport(53.into()), {"drop": null}])),
            rule(
                "input",
                3,
                serde_json::json!([udp_dport(serde_json::json!({"set": [53, 4500]})), {"drop": null}])
            )
        ]));
        assert_eq!(levels(&firewall_findings(&other, 51820)), vec![Level::Ok]);
        let range = nft(serde_json::json!([
            chain("input", "input", "accept"),
            rule(
                "input",
                2,
                serde_json::json!([udp_dport(serde_json::json!({"range": [51000, 52000]})), {"reject": {"type": "icmpx"}}])
            )
        ]));
        assert_eq!(levels(&firewall_findings(&range, 51820)), vec![Level::Fail]);
    }

    #[test]
    fn all_udp_dropped_on_output_fails_too() {
        let set = nft(serde_json::json!([
            chain("out", "output", "accept"),
            rule(
                "out",
                4,
                serde_json::json!([{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}}, {"drop": null}])
            )
        ]));
        let f = firewall_findings(&set, 51820);
        assert_eq!(levels(&f), vec![Level::Fail]);
        assert!(f[0].detail.contains("drops all UDP from port 51820"), "{}", f[0].detail);
    }

    #[test]
    fn an_accept_before_the_drop_and_policy_drop_are_told_apart() {
        // Accepted first: the later drop never sees it.
        let accepted = nft(serde_json::json!([
            chain("input", "input", "drop"),
            rule(
                "input",
                2,
                serde_json::json!([udp_dport(serde_json::json!({"set": [4500, 51820]})), {"accept": null}])
            ),
            rule(
                "input",
                3,
                serde_json::json!([{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}}, {"drop": null}])
            )
        ]));
        assert_eq!(levels(&firewall_findings(&accepted, 51820)), vec![Level::Ok]);
        // Policy drop with nothing for the port: fail; with only replies accepted: warn.
        let dropped = nft(serde_json::json!([chain("input", "input", "drop")]));
        assert_eq!(levels(&firewall_findings(&dropped, 51820)), vec![Level::Fail]);
        let replies = nft(serde_json::json!([
            chain("input", "input", "drop"),
            rule(
                "input",
                2,
                serde_json::json!([{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}, {"accept": null}])
            )
        ]));
        assert_eq!(levels(&firewall_findings(&replies, 51820)), vec![Level::Warn]);
        // A conditional drop (one source) warns; a chain without a hook is not looked at.
        let some = nft(serde_json::json!([
            chain("input", "input", "accept"),
            chain("other", "", "drop"),
            rule(
                "input",
                5,
                serde_json::json!([{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "1.2.3.4"}}, udp_dport(51820.into()), {"drop": null}])
            )
        ]));
        assert_eq!(levels(&firewall_findings(&some, 51820)), vec![Level::Warn]);
        // Garbage or nothing: nothing found.
        assert_eq!(levels(&firewall_findings(&serde_json::json!({"x": 1}), 51820)), vec![Level::Ok]);
        assert_eq!(
            levels(&firewall_findings(&nft(serde_json::json!([1, "a", {"rule": {}}])), 51820)),
            vec![Level::Ok]
        );
    }

    #[test]
    fn the_mtu_check_counts_the_underlays_own_header() {
        let v4: IpAddr = "172.31.0.12".parse().unwrap();
        let v6: IpAddr = "fd00::12".parse().unwrap();
        assert_eq!(mtu_finding("c2", v4, "cw0", 1420, "eth0", 1480).level, Level::Ok);
        let f = mtu_finding("c2", v4, "cw0", 1420, "eth0", 1400);
        assert_eq!(f.level, Level::Fail);
        assert_eq!(
            f.detail,
            "c2: cw0's MTU 1420 + 60 bytes of WireGuard = 1480 > 1400, the MTU of eth0 toward 172.31.0.12"
        );
        assert!(f.advice.contains("--underlay-mtu 1400"), "{}", f.advice);
        assert_eq!(mtu_finding("c2", v6, "cw0", 1420, "eth0", 1500).level, Level::Ok);
        assert_eq!(mtu_finding("c2", v6, "cw0", 1420, "eth0", 1499).level, Level::Fail);
    }

    #[test]
    fn tool_output_is_read_and_garbage_yields_nothing() {
        let links = serde_json::json!([{"ifname": "lo", "mtu": 65536}, {"ifname": "uplink", "mtu": 1400}, {"mtu": 1}]);
        assert_eq!(link_mtus(&links), BTreeMap::from([("lo".into(), 65536), ("uplink".into(), 1400)]));
        assert_eq!(route_dev(&serde_json::json!([{"dst": "10.2.0.1", "dev": "cwc1"}])), Some("cwc1".into()));
        assert_eq!(route_dev(&serde_json::json!({"dev": "x"})), None);
        let addrs = serde_json::json!([{"ifname": "eth0", "addr_info": [{"local": "10.2.0.5", "prefixlen": 24}, {"local": "nope"}]}]);
        let local = addresses(&addrs);
        assert_eq!(local, vec![("eth0".to_owned(), "10.2.0.5".parse().unwrap())]);
        let remote = vec![("cluster-2".to_owned(), "10.2.0.0/16".parse().unwrap())];
        let f = overlap_findings(&local, "cw0", &remote);
        assert_eq!(levels(&f), vec![Level::Fail]);
        assert_eq!(f[0].detail, "10.2.0.5 on eth0 lies in cluster-2's 10.2.0.0/16");
        // The tunnel device's own addresses are the point of it.
        assert!(overlap_findings(&[("cw0".into(), "10.2.0.5".parse().unwrap())], "cw0", &remote).is_empty());
        assert!(link_mtus(&serde_json::json!("garbage")).is_empty());
    }

    #[test]
    fn clock_skew_is_graded_both_ways() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(clock_finding(t, t + Duration::from_secs(3)).level, Level::Ok);
        assert_eq!(clock_finding(t + Duration::from_secs(60), t).level, Level::Warn);
        let f = clock_finding(t, t + Duration::from_secs(601));
        assert_eq!(
            (f.level, f.detail.as_str()),
            (Level::Fail, "this node's clock is 601 s from the broker's")
        );
    }

    #[test]
    fn the_verdict_names_each_failed_check_once() {
        let nodes = vec![
            ("cluster-1".to_owned(), vec![Finding::ok("mtu", "fine")]),
            (
                "cluster-2".to_owned(),
                vec![
                    Finding::fail("firewall", "a", "b"),
                    Finding::fail("mtu", "x", "y"),
                    Finding::fail("firewall", "c", "d"),
                    Finding::warn("clock", "e", "f"),
                ],
            ),
        ];
        let e = verdict(&nodes).unwrap_err().to_string();
        assert_eq!(
            e,
            "diagnose found what breaks cross-cluster traffic: cluster-2: firewall, cluster-2: mtu"
        );
        let text = render(&nodes);
        assert!(text.contains("cluster-2 FAIL (firewall): b"), "{text}");
        assert!(text.contains("cluster-2 WARN (clock): f"), "{text}");
        assert!(!text.contains("cluster-1 OK"), "{text}");
        assert!(verdict(&nodes[..1]).is_ok());
    }
}
