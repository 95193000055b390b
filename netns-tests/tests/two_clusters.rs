//! End-to-end on real namespaces, real CNI plugins, the real broker and gateway processes.
//! Privileged: `#[ignore]`d (reported as skipped) unless run with `--run-ignored all`, as
//! `scripts/test.sh` does; then not being root fails it.

use std::{
    process::{Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use causeway_netns::{
    Topology, TopologySpec, causeway_bin,
    exec::{self, Bg},
    ready::{self, Proto},
    require_privileges,
    topology::wait_for,
};

static N: AtomicUsize = AtomicUsize::new(0);

fn spec(clusters: usize) -> TopologySpec {
    let prefix = format!("cwt{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
    TopologySpec::new(&prefix, clusters, causeway_bin())
}

/// A topology with a name unique to this test process, every gateway connected.
fn topology(clusters: usize, underlay_mtu: u16) -> Topology {
    let mut spec = spec(clusters);
    spec.underlay_mtu = underlay_mtu;
    start(spec, clusters)
}

/// Builds `spec`, starts the broker and the first `gateways` gateways, waits for their tunnels.
fn start(spec: TopologySpec, gateways: usize) -> Topology {
    let mut t = Topology::build(spec).expect("building the topology");
    t.start_broker().expect("starting the broker");
    for i in 1..=gateways {
        t.start_gateway(i).expect("starting a gateway");
    }
    wait_for(Duration::from_secs(30), "the started gateways to connect", || {
        (1..=gateways).all(|i| {
            t.gateway_status(i).is_ok_and(|s| {
                s.connections.len() == gateways - 1 && s.connections.iter().all(|c| c.status == "connected")
            })
        })
    })
    .expect("tunnels up");
    for i in 1..=gateways {
        let failures = t.gateway_status(i).unwrap().reconcile_failures;
        assert!(failures.is_empty(), "gateway {i}: reconcile steps failed: {failures:?}");
    }
    t
}

/// `causeway debug tcp-sink` on `listen` in `ns`, listening when this returns.
fn tcp_sink(ns: &str, listen: &str) -> Bg {
    let bin = causeway_bin().display().to_string();
    let sink = Bg::start(ns, &[&bin, "debug", "tcp-sink", "--listen", listen], Stdio::piped());
    ready::wait_listening(ns, listen, Proto::Tcp).unwrap();
    sink
}

fn capture(ns: &str, iface: &str, file: &str, filter: &[&str]) -> Bg {
    let mut args = vec!["tcpdump", "-i", iface, "-U", "-n", "-s", "0", "-w", file];
    args.extend_from_slice(filter);
    let bg = Bg::start(ns, &args, Stdio::null());
    ready::wait_capturing(std::path::Path::new(file)).unwrap();
    bg
}

fn pcap_lines(file: &str, filter: &[&str]) -> Vec<String> {
    let mut args = vec!["tcpdump", "-r", file, "-n"];
    args.extend_from_slice(filter);
    let out = exec::run(&args).expect("reading the capture");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

const MARKER: &[u8] = b"CAUSEWAY-PLAINTEXT-MARKER:";

#[test]
#[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
fn pod_to_pod_across_the_tunnel_encrypted_and_counted() {
    require_privileges!();
    let mut t = topology(2, 1500);
    let (a, b) = (t.clusters[0].clone(), t.clusters[1].clone());

    assert!(exec::ping(&a.pod_ns, &b.pod_ip, 3), "pod A cannot ping pod B");
    assert!(exec::ping(&b.pod_ns, &a.pod_ip, 3), "pod B cannot ping pod A");
    // Each record lists the node's cluster-LAN address too (private, preferred), which the
    // other site cannot reach: its checks go unanswered and the tunnel stays on the public one.
    for (i, other) in [(1, &b), (2, &a)] {
        let c = &t.gateway_status(i).unwrap().connections[0];
        assert_eq!(
            (c.endpoint.clone(), c.path.as_deref()),
            (format!("{}:51820", other.gw_ip), Some("direct-public")),
            "gateway {i}"
        );
    }

    // Independent counts of the same packets, by netfilter: what pod A sends to cluster B (its
    // output hook) and what gateway B forwards from cluster A (after the tunnel's ingress).
    // Both see the skbs the eBPF programs count, at their IP length, GSO runs unsplit.
    exec::in_ns(
        &a.pod_ns,
        &["nft", &format!("table ip cwcount {{ chain cwout {{ type filter hook output priority 0; ip daddr {} counter; }}; }}", b.pod_cidr)],
    )
    .unwrap();
    exec::in_ns(
        &b.gw_ns,
        &["nft", &format!("table ip cwcount {{ chain cwfwd {{ type filter hook forward priority 0; ip saddr {} counter; }}; }}", a.pod_cidr)],
    )
    .unwrap();
    let nft_bytes = |ns: &str| -> u64 {
        let out = exec::in_ns(ns, &["nft", "-j", "list", "table", "ip", "cwcount"]).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|o| o["rule"]["expr"].as_array().cloned().unwrap_or_default())
            .find_map(|e| e["counter"]["bytes"].as_u64())
            .unwrap_or_else(|| panic!("no counter in {v}"))
    };
    let tx_before = t.gateway_status(1).unwrap().connections[0].datapath.tx_bytes;
    let rx_before = t.gateway_status(2).unwrap().connections[0].datapath.rx_bytes;
    let (sent_before, forwarded_before) = (nft_bytes(&a.pod_ns), nft_bytes(&b.gw_ns));
    let redirected_before = t.gateway_status(1).unwrap().datapath_events["redirected"];
    // Counters on gateway A's forwarding path, one per direction: the redirect stage hands
    // A → B packets to the tunnel before the stack sees them, so only B → A is forwarded.
    let nft = format!(
        "table inet cwtest {{ chain cwfwd {{ type filter hook forward priority 0; \
         ip daddr {} counter comment \"to-b\"; ip daddr {} counter comment \"to-a\"; }}; }}",
        b.pod_cidr, a.pod_cidr
    );
    exec::in_ns(&a.gw_ns, &["nft", &nft]).unwrap();

    let dir = t.spec.run_dir.clone();
    let underlay_pcap = dir.join("underlay.pcap").display().to_string();
    let pod_pcap = dir.join("pod.pcap").display().to_string();
    // Gateway-to-gateway traffic on gateway A's underlay port; the pod's own view as control.
    let cap_underlay =
        capture(&t.underlay_ns, "gw1", &underlay_pcap, &["host", &a.gw_ip, "and", "host", &b.gw_ip]);
    let cap_pod = capture(&b.pod_ns, "eth0", &pod_pcap, &["-c", "200", "tcp"]);

    let bin = causeway_bin().display().to_string();
    let listen = format!("{}:9000", b.pod_ip);
    let sink = tcp_sink(&b.pod_ns, &listen);
    let bytes: u64 = 12 * 1024 * 1024;
    let sent = exec::in_ns(
        &a.pod_ns,
        &[&bin, "debug", "tcp-source", "--connect", &listen, "--bytes", &bytes.to_string()],
    )
    .expect("sending 12 MiB");
    let received = sink.output();
    let sent = String::from_utf8_lossy(&sent.stdout).trim().to_owned();
    assert_eq!(received, sent, "the receiver must get exactly the bytes sent (length and SHA-256)");
    assert!(sent.contains(&format!("\"bytes\":{bytes}")), "{sent}");

    cap_underlay.interrupt();
    cap_pod.interrupt();

    // On the underlay, the gateways exchanged only WireGuard UDP, lots of it, and never the
    // plaintext; the same marker is visible inside the pod (so the check can see it at all).
    // (ARP between the two is link-layer housekeeping, not traffic.)
    let others =
        pcap_lines(&underlay_pcap, &["(ip", "or", "ip6)", "and", "not", "(udp", "and", "port", "51820)"]);
    assert!(others.is_empty(), "non-WireGuard packets between the gateways:\n{}", others.join("\n"));
    // Frame bytes, not packets: the gateways send runs of datagrams as one GSO buffer, which
    // the capture sees as one frame. 12 MiB plus overhead; tcpdump may drop some under load.
    let wg_bytes: u64 = pcap_lines(&underlay_pcap, &["-e", "udp", "port", "51820"])
        .iter()
        .filter_map(|l| l.split(", length ").nth(1)?.split(':').next()?.trim().parse::<u64>().ok())
        .sum();
    assert!(wg_bytes > bytes * 6 / 10, "only {wg_bytes} bytes of WireGuard for {bytes} bytes sent");
    assert!(!contains(&std::fs::read(&underlay_pcap).unwrap(), MARKER), "plaintext leaked onto the underlay");
    assert!(
        contains(&std::fs::read(&pod_pcap).unwrap(), MARKER),
        "control: the pod capture shows the plaintext"
    );

    // The eBPF counters grew by exactly what netfilter counted for the same packets: gateway
    // A's tx by what pod A sent to cluster B, gateway B's rx by what it forwarded from A.
    let tx = t.gateway_status(1).unwrap().connections[0].datapath.tx_bytes - tx_before;
    let rx = t.gateway_status(2).unwrap().connections[0].datapath.rx_bytes - rx_before;
    let sent_ip = nft_bytes(&a.pod_ns) - sent_before;
    let forwarded_ip = nft_bytes(&b.gw_ns) - forwarded_before;
    assert!(sent_ip > bytes, "control: pod A sent {sent_ip} IP bytes for {bytes} of payload");
    assert_eq!(tx, sent_ip, "gateway A's eBPF tx bytes vs the bytes pod A sent to cluster B");
    assert_eq!(rx, forwarded_ip, "gateway B's eBPF rx bytes vs the bytes it forwarded from cluster A");

    // The redirect stage carried A → B past netfilter: nothing to B on the forward hook, while
    // B's replies were forwarded (and counted) as usual.
    let rules = exec::in_ns(&a.gw_ns, &["nft", "-j", "list", "chain", "inet", "cwtest", "cwfwd"]).unwrap();
    let rules: serde_json::Value = serde_json::from_slice(&rules.stdout).unwrap();
    let counted = |comment: &str| -> u64 {
        rules["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|o| o["rule"]["comment"] == comment)
            .flat_map(|o| o["rule"]["expr"].as_array().unwrap().clone())
            .find_map(|e| e["counter"]["packets"].as_u64())
            .unwrap_or_else(|| panic!("no counter {comment} in {rules}"))
    };
    assert_eq!(counted("to-b"), 0, "A → B packets took the kernel's forwarding path");
    assert!(counted("to-a") > 100, "control: B → A replies were not forwarded ({})", counted("to-a"));
    let redirected = t.gateway_status(1).unwrap().datapath_events["redirected"] - redirected_before;
    assert!(redirected > 100, "only {redirected} packets redirected");

    // No secret ever reaches a log: not the tokens, not the WireGuard private keys.
    let mut secrets = Vec::new();
    for f in [t.admin_credentials(), t.cluster_credentials(1), t.cluster_credentials(2)] {
        let c: serde_json::Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
        secrets.push(c["token"].as_str().unwrap().to_owned());
    }
    for i in 1..=2 {
        let key = std::fs::read_to_string(dir.join(format!("c{i}-gw/private.key"))).unwrap();
        secrets.push(key.trim().to_owned());
    }
    let mut logs = String::new();
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        if entry.path().extension().is_some_and(|e| e == "log") {
            logs.push_str(&std::fs::read_to_string(entry.path()).unwrap());
        }
    }
    assert!(logs.len() > 1000, "the logs are not empty");
    for s in &secrets {
        assert!(!logs.contains(s.as_str()), "a secret appears in the logs");
    }
    assert!(!logs.contains("cw1_"), "a token appears in the logs");

    // Teardown leaves nothing behind.
    let prefix = t.spec.prefix.clone();
    t.teardown().unwrap();
    assert!(exec::namespaces().iter().all(|n| !n.starts_with(&prefix)), "namespaces left behind");
    assert!(!dir.exists(), "run dir left behind");
}

fn causeway_routes(ns: &str) -> String {
    String::from_utf8_lossy(&exec::run(&["ip", "-n", ns, "route", "show", "proto", "202"]).unwrap().stdout)
        .into_owned()
}

#[test]
#[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
fn removing_a_clusters_records_removes_its_peer_and_routes() {
    require_privileges!();
    let mut t = topology(3, 1500);
    let gw1 = t.clusters[0].gw_ns.clone();
    assert!(causeway_routes(&gw1).contains("10.3.0.0/16"));
    // Cluster 3's gateway dies (so it cannot re-register), then its records are removed.
    t.kill_gateway(3).unwrap();
    let bin = causeway_bin().display().to_string();
    let broker_ns = t.broker_ns.clone();
    let admin = t.admin_credentials().display().to_string();
    exec::in_ns(&broker_ns, &[&bin, "leave", "--credentials", &admin, "--cluster-id", "cluster-3", "--yes"])
        .expect("causeway leave");
    wait_for(Duration::from_secs(10), "gateway 1 to drop cluster-3", || {
        let s = t.gateway_status(1).unwrap();
        s.connections.iter().all(|c| c.cluster_id != "cluster-3")
            && !causeway_routes(&gw1).contains("10.3.0.0/16")
    })
    .unwrap();
    let routes = causeway_routes(&gw1);
    assert!(!routes.contains("10.103.0.0/16"), "{routes}");
    assert!(routes.contains("10.2.0.0/16") && routes.contains("10.102.0.0/16"), "{routes}");
    let s = t.gateway_status(1).unwrap();
    assert_eq!(s.connections.iter().map(|c| c.cluster_id.as_str()).collect::<Vec<_>>(), vec!["cluster-2"]);
    // The remaining clusters still talk.
    assert!(exec::ping(&t.clusters[0].pod_ns, &t.clusters[1].pod_ip, 2));
}

#[test]
#[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
fn sandbox_up_then_down_leaves_nothing_behind() {
    require_privileges!();
    let bin = causeway_bin();
    assert!(
        !exec::namespaces().iter().any(|n| n.starts_with("cw-")),
        "a sandbox is already up on this machine; run `causeway sandbox down` first"
    );
    let up =
        Command::new(&bin).args(["sandbox", "up", "--clusters", "3", "--gateways", "2"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&up.stdout);
    // With two gateway nodes per cluster, a cluster outlives its active gateway: fail it from
    // the CLI, ping across, heal it.
    let cli = |args: &[&str]| {
        let out = Command::new(&bin).args(args).output().unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };
    // `verify` passes on the sandbox as it came up, and fails naming the pairs once cluster-1's
    // pod is cut off from cluster-3's.
    let verified = cli(&["verify"]);
    // `status --wait` from the operator's side (the broker's records): every active gateway
    // reports reaching the two other clusters.
    let waited = cli(&["status", "--wait", "--timeout", "60"]);
    exec::in_ns("cw-c1-pod", &["ip", "route", "add", "blackhole", "10.3.2.2/32"]).unwrap();
    let cut = cli(&["verify"]);
    exec::in_ns("cw-c1-pod", &["ip", "route", "del", "blackhole", "10.3.2.2/32"]).unwrap();
    // `diagnose` passes on the healthy sandbox, then names a firewalled WireGuard port
    // (cluster-2's gateway) and an uplink MTU below the tunnel's (cluster-3's).
    let diagnosed = cli(&["diagnose"]);
    // `gather` bundles the healthy sandbox; no secret of it may appear in the bundle.
    let bundle = std::env::temp_dir().join(format!("cw-gather-{}.tar.gz", std::process::id()));
    let gathered = cli(&["gather", "--output", &bundle.display().to_string()]);
    let secrets = sandbox_secrets(std::path::Path::new("/run/causeway/cw"));
    for cmd in [
        &["nft", "add", "table", "inet", "cwtest"][..],
        &["nft", "add", "chain", "inet", "cwtest", "input", "{ type filter hook input priority 0 ; }"],
        &["nft", "add", "rule", "inet", "cwtest", "input", "udp", "dport", "51820", "drop"],
    ] {
        exec::in_ns("cw-c2-gw", cmd).unwrap();
    }
    exec::in_ns("cw-c3-gw", &["ip", "link", "set", "uplink", "mtu", "1400"]).unwrap();
    let broken = cli(&["diagnose"]);
    exec::in_ns("cw-c2-gw", &["nft", "delete", "table", "inet", "cwtest"]).unwrap();
    exec::in_ns("cw-c3-gw", &["ip", "link", "set", "uplink", "mtu", "1500"]).unwrap();
    let failed = up.status.success().then(|| cli(&["sandbox", "fail", "cluster-2", "--how", "kill"]));
    let reachable = failed.as_ref().is_some_and(|(ok, _)| *ok) && exec::ping("cw-c1-pod", "10.2.2.2", 5);
    let status_failed = cli(&["sandbox", "status"]);
    let healed = cli(&["sandbox", "heal", "cluster-2"]);
    let unknown = cli(&["sandbox", "fail", "cluster-9", "--how", "kill"]);
    // A service of cluster 3 only, resolved and reached from cluster 1's pod by name.
    let served = cli(&["sandbox", "serve", "cluster-3", "hello", "--port", "8080"]);
    // DNS and the nodes' socket programs follow the broker each on its own watch: the name
    // may resolve a moment before cluster 1's node translates the new ClusterSetIP.
    let mut reached = (false, String::new());
    for _ in 0..20 {
        reached = cli(&[
            "sandbox",
            "exec",
            "cluster-1",
            "--",
            "bash",
            "-c",
            "exec 3<>/dev/tcp/$(dig +short hello.demo.svc.clusterset.local)/8080 && read -r -t 3 l <&3 && echo $l",
        ]);
        if reached.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let exit_code =
        Command::new(&bin).args(["sandbox", "exec", "cluster-1", "--", "false"]).status().unwrap().code();
    let down = Command::new(&bin).args(["sandbox", "down"]).output().unwrap();
    assert!(up.status.success(), "sandbox up failed:\n{stdout}\n{}", String::from_utf8_lossy(&up.stderr));
    assert!(verified.0 && verified.1.contains("verified: 9 pod-to-pod pairs"), "{}", verified.1);
    assert!(waited.0 && waited.1.contains("every tunnel is up"), "{}", waited.1);
    assert_eq!(waited.1.matches("2/2").count(), 3, "{}", waited.1);
    assert!(!cut.0, "verify passed with a pair cut: {}", cut.1);
    for pair in ["cluster-1 → cluster-3: pod unreachable", "cluster-3 → cluster-1: pod unreachable"] {
        assert!(cut.1.contains(pair), "{pair} not named: {}", cut.1);
    }
    assert!(!cut.1.contains("cluster-1 → cluster-2"), "{}", cut.1);
    assert!(diagnosed.0, "diagnose failed on a healthy sandbox:\n{}", diagnosed.1);
    for node in ["cluster-1 ", "cluster-3 ", "cluster-2 (standby)"] {
        assert!(diagnosed.1.contains(node), "{node} not checked:\n{}", diagnosed.1);
    }
    assert!(diagnosed.1.contains("no nftables rule drops UDP on port 51820"), "{}", diagnosed.1);
    assert!(!broken.0, "diagnose passed a firewalled port and a short MTU:\n{}", broken.1);
    assert!(broken.1.contains("cluster-2: firewall") && broken.1.contains("cluster-3: mtu"), "{}", broken.1);
    assert!(
        broken.1.contains("table inet cwtest, chain input (hook input): rule")
            && broken.1.contains("drops all UDP to port 51820"),
        "{}",
        broken.1
    );
    assert!(broken.1.contains("= 1480 > 1400, the MTU of uplink toward"), "{}", broken.1);
    assert!(!broken.1.contains("cluster-1: firewall"), "{}", broken.1);
    check_bundle(&gathered, &bundle, &secrets);
    assert!(failed.as_ref().is_some_and(|(ok, _)| *ok), "sandbox fail: {failed:?}");
    assert!(reachable, "cluster-2's pod unreachable with its active gateway killed");
    assert!(
        status_failed.1.lines().any(|l| l.starts_with("cluster-2 ") && l.contains("not running"))
            && status_failed.1.lines().any(|l| l.starts_with("cluster-2 (standby)") && l.contains("running")),
        "{}",
        status_failed.1
    );
    assert!(healed.0, "sandbox heal: {}", healed.1);
    assert!(!unknown.0 && unknown.1.contains("no cluster \"cluster-9\""), "{}", unknown.1);
    // A 3×3 matrix, every cell OK, and the service every cluster exports reached from every
    // pod (its own cluster answering: local affinity).
    assert_eq!(stdout.matches("OK").count(), 12, "{stdout}");
    for i in 1..=3 {
        assert!(stdout.contains(&format!("OK (cluster-{i})")), "{stdout}");
    }
    assert!(!stdout.contains("FAIL"), "{stdout}");
    assert!(served.0, "sandbox serve: {}", served.1);
    assert!(reached.0 && reached.1.trim() == "cluster-3", "sandbox exec: {}", reached.1);
    assert_eq!(exit_code, Some(1), "sandbox exec passes the command's exit code on");
    assert!(down.status.success(), "{}", String::from_utf8_lossy(&down.stderr));
    assert!(!exec::namespaces().iter().any(|n| n.starts_with("cw-")), "namespaces left behind");
    assert!(exec::run(&["ip", "link", "show", "cw-host"]).is_err(), "host veth left behind");
    assert!(!std::path::Path::new("/run/causeway/cw").exists(), "run dir left behind");
    assert!(!std::path::Path::new("/run/causeway/cgroup2/causeway-cw").exists(), "pod cgroups left behind");
    assert!(!std::path::Path::new("/etc/netns/cw-c1-pod").exists(), "resolver files left behind");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains("/run/causeway/cw/"), "the gateways' bpffs left mounted:\n{mounts}");
    assert!(!std::path::Path::new("/sys/fs/bpf/causeway").exists(), "bpffs pins left behind");
    let uapi_left: Vec<_> = std::fs::read_dir("/var/run/wireguard")
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(
        !uapi_left.iter().any(|n: &String| n.starts_with("cwc")),
        "UAPI sockets left behind: {uapi_left:?}"
    );
    let procs = exec::run(&["ps", "-eo", "args"]).unwrap();
    let procs = String::from_utf8_lossy(&procs.stdout);
    assert!(
        !procs.lines().any(|l| l.contains("--status-socket /run/causeway/cw/")),
        "gateway processes left behind"
    );
}

/// Every token and private key under the sandbox's run directory: credentials files,
/// WireGuard keys, the broker's TLS key.
fn sandbox_secrets(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if entry.file_type().unwrap().is_dir() {
            out.extend(sandbox_secrets(&path));
            continue;
        }
        if let Ok(c) = causeway_broker_api::Credentials::load(&path) {
            out.push(c.token.0);
        } else if let Ok(text) = std::fs::read_to_string(&path) {
            if path.extension().is_some_and(|e| e == "key") {
                out.push(text.trim().to_owned());
            } else if text.contains("PRIVATE KEY-----") {
                // Each base64 line of the PEM body.
                out.extend(
                    text.lines().filter(|l| !l.starts_with("-----") && l.len() > 20).map(str::to_owned),
                );
            }
        }
    }
    out
}

/// `gather` wrote a bundle with the pieces a bug report needs and none of `secrets`.
fn check_bundle(gathered: &(bool, String), bundle: &std::path::Path, secrets: &[String]) {
    assert!(gathered.0, "gather failed: {}", gathered.1);
    assert!(
        secrets.iter().filter(|s| s.starts_with("cw1_")).count() >= 4,
        "too few tokens found to scan for"
    );
    assert!(secrets.iter().any(|s| s.len() == 44), "no WireGuard private key found to scan for");
    let dir = std::env::temp_dir().join(format!("cw-gather-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    exec::run(&["tar", "-xzf", &bundle.display().to_string(), "-C", &dir.display().to_string()]).unwrap();
    let root = dir.join("causeway-gather");
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert!(read("broker/records.json").contains("\"clusterId\": \"cluster-3\""), "records missing");
    assert!(read("gateways/cluster-1/status.json").contains("\"publicKey\""));
    assert!(read("gateways/cluster-2-standby/status.json").contains("cluster-2"));
    assert!(read("gateways/cluster-1/metrics.txt").contains("causeway_"));
    // The broker's own metrics, from its metrics port: three clusters, six gateways.
    let broker = read("broker/metrics.txt");
    assert!(broker.contains("causeway_broker_records{kind=\"cluster\"} 3\n"), "{broker}");
    assert!(broker.contains("causeway_broker_records{kind=\"endpoint\"} 6\n"), "{broker}");
    assert!(broker.contains("causeway_broker_ready{} 1\n"), "{broker}");
    assert!(!read("gateways/cluster-3/gateway.log").is_empty());
    assert!(read("namespaces/cw-c1-gw/routes.txt").contains("10.2.0.0/16"));
    assert!(read("namespaces/cw-c3-gw/links.txt").contains("uplink"));
    assert!(read("bpf/links.txt").contains("prog "), "{}", read("bpf/links.txt"));
    for map in ["CONFIG", "PEER_SESSIONS_V4"] {
        let dump = read(&format!("bpf/c1-gw/maps/{map}.txt"));
        assert!(dump.contains("\"key\""), "{map}: {dump}");
    }
    let mut leaked = Vec::new();
    let mut files = 0;
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
                continue;
            }
            files += 1;
            let text = String::from_utf8_lossy(&std::fs::read(e.path()).unwrap()).into_owned();
            for s in secrets {
                if text.contains(s.as_str()) {
                    leaked.push(format!("{}: {}…", e.path().display(), &s[..8]));
                }
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_file(bundle).unwrap();
    assert!(files > 50, "only {files} files in the bundle");
    assert!(leaked.is_empty(), "secrets in the bundle: {leaked:?}");
}

#[test]
#[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
fn wg_show_reports_the_userspace_device_and_wg_set_is_refused() {
    require_privileges!();
    let t = topology(2, 1500);
    let (a, b) = (&t.clusters[0], &t.clusters[1]);
    assert!(exec::ping(&a.pod_ns, &b.pod_ip, 2));
    let status_a = t.gateway_status(1).unwrap();
    let status_b = t.gateway_status(2).unwrap();
    // `wg` finds the socket by device name, from any namespace.
    let out = exec::run(&["wg", "show", &a.device]).expect("wg show");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("interface: {}", a.device)), "{text}");
    assert!(text.contains(&format!("public key: {}", status_a.public_key)), "{text}");
    assert!(text.contains("listening port: 51820"), "{text}");
    assert!(text.contains(&format!("peer: {}", status_b.public_key)), "{text}");
    assert!(text.contains(&format!("endpoint: {}:51820", b.gw_ip)), "{text}");
    assert!(text.contains("allowed ips: 10.2.0.0/16, 10.102.0.0/16"), "{text}");
    // A real, recent handshake time (boringtun's own UAPI would say "56 years ago").
    let hs = text.lines().find(|l| l.contains("latest handshake:")).expect("a handshake line").to_owned();
    assert!(
        (hs.contains("second") || hs.contains("Now")) && !hs.contains("year") && !hs.contains("minute"),
        "{hs}"
    );
    assert!(text.contains("transfer:"), "{text}");
    // Changes through the UAPI are refused: the reconcile loop owns the peers.
    let set = exec::run(&["wg", "set", &a.device, "peer", &status_b.public_key, "remove"]);
    assert!(set.is_err(), "wg set must be refused");
    let again = exec::run(&["wg", "show", &a.device, "peers"]).unwrap();
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), status_b.public_key);
}

/// Runs `wg` with a private key given on stdin, returns its stdout.
fn wg_with_stdin(args: &[&str], stdin: &str) -> String {
    use std::io::Write as _;
    let mut child =
        Command::new("wg").args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "wg {args:?} failed");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
#[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
fn interoperates_with_stock_wireguard_go() {
    require_privileges!();
    let mut t = topology(1, 1500);
    let c1 = t.clusters[0].clone();
    let gw1_key = t.gateway_status(1).unwrap().public_key;
    let bin = causeway_bin().display().to_string();

    // A site running Debian's wireguard-go, configured with `wg`, on the underlay.
    let site_ip = "172.31.0.99";
    let ns = t.add_underlay_host("wggo", site_ip).unwrap();
    // Under the topology's device pattern, so teardown also removes a stale UAPI socket.
    let dev = format!("{}c99", t.spec.prefix.replace('-', ""));
    let private = wg_with_stdin(&["genkey"], "");
    let public = wg_with_stdin(&["pubkey"], &format!("{private}\n"));
    let key_file = t.spec.run_dir.join("wggo.key");
    std::fs::write(&key_file, format!("{private}\n")).unwrap();
    let _wggo = Bg::start(&ns, &["env", "WG_PROCESS_FOREGROUND=1", "wireguard-go", &dev], Stdio::null());
    wait_for(Duration::from_secs(10), "wireguard-go's UAPI socket", || {
        std::path::Path::new(&format!("/var/run/wireguard/{dev}.sock")).exists()
    })
    .unwrap();
    let gw1_endpoint = format!("{}:51820", c1.gw_ip);
    exec::in_ns(
        &ns,
        &[
            "wg",
            "set",
            &dev,
            "private-key",
            &key_file.display().to_string(),
            "listen-port",
            "51820",
            "peer",
            &gw1_key,
            "endpoint",
            &gw1_endpoint,
            "allowed-ips",
            "10.1.0.0/16,10.101.0.0/16",
            "persistent-keepalive",
            "5",
        ],
    )
    .unwrap();
    exec::ip(&ns, &["addr", "add", "10.99.0.1/16", "dev", &dev]).unwrap();
    exec::ip(&ns, &["link", "set", &dev, "mtu", "1420", "up"]).unwrap();
    exec::ip(&ns, &["route", "add", "10.1.0.0/16", "dev", &dev]).unwrap();

    // The worker node sends the site's prefix to its gateway (the route agent's job).
    exec::ip(&c1.node_ns, &["route", "add", "10.99.0.0/16", "via", "172.20.1.1"]).unwrap();

    // Register the site with the broker like any cluster.
    let cluster =
        r#"{"kind":"Cluster","spec":{"clusterId":"stock-site","podCidrs":["10.99.0.0/16"],"serviceCidrs":[]}}"#
            .to_owned();
    let endpoint = format!(
        r#"{{"kind":"Endpoint","spec":{{"clusterId":"stock-site","hostname":"wggo","privateIps":["{site_ip}"],"port":51820,"publicKey":"{public}","backend":"wireguard","healthCheckIp":"10.99.0.1"}}}}"#
    );
    let admin = t.admin_credentials().display().to_string();
    for record in [cluster, endpoint] {
        exec::in_ns_with_input(
            &t.broker_ns,
            &[&bin, "debug", "put", "--credentials", &admin],
            &[],
            record.as_bytes(),
        )
        .expect("registering the stock site");
    }

    // Causeway gateway ↔ wireguard-go: a handshake, pings both ways, a checksummed transfer.
    wait_for(Duration::from_secs(20), "pod-1 to reach the wireguard-go site", || {
        exec::ping(&c1.pod_ns, "10.99.0.1", 1)
    })
    .unwrap();
    assert!(exec::ping(&ns, &c1.pod_ip, 3), "wireguard-go site cannot reach pod-1");
    let listen = "10.99.0.1:9100";
    let sink = tcp_sink(&ns, listen);
    let sent =
        exec::in_ns(&c1.pod_ns, &[&bin, "debug", "tcp-source", "--connect", listen, "--bytes", "4000000"])
            .expect("sending to the wireguard-go site");
    assert_eq!(sink.output(), String::from_utf8_lossy(&sent.stdout).trim());

    let conn = t.gateway_status(1).unwrap();
    let site =
        conn.connections.iter().find(|c| c.cluster_id == "stock-site").expect("a connection to the site");
    // Probes to the site's health address are answered by wireguard-go's kernel: "connected"
    // here means forwarding works, not just that a handshake happened.
    assert_eq!(site.status, "connected");
    assert!(site.rtt_secs.is_some(), "in-band probes answered by the stock peer");
    let shown = exec::run(&["wg", "show", &dev]).unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains(&format!("peer: {gw1_key}")) && shown.contains("latest handshake"), "{shown}");
}

/// Drops ICMP "fragmentation needed" that a gateway sends, as many real networks do.
fn block_frag_needed(ns: &str) {
    let rules = "table inet cwtest {\n  chain out {\n    type filter hook output priority 0;\n    \
                 icmp type destination-unreachable icmp code frag-needed counter drop\n  }\n}\n";
    exec::in_ns_with_input(ns, &["nft", "-f", "-"], &[], rules.as_bytes()).expect("nft");
}

fn datapath_event(t: &Topology, gw: usize, event: &str) -> u64 {
    t.gateway_status(gw).unwrap().datapath_events.get(event).copied().unwrap_or(0)
}

#[test]
#[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
fn mtu_safe_by_construction_with_a_smaller_underlay() {
    require_privileges!();
    // Pods keep MTU 1500; the underlay has 1400, so the tunnel gets 1320.
    let t = topology(2, 1400);
    let (a, b) = (t.clusters[0].clone(), t.clusters[1].clone());
    let link = exec::run(&["ip", "-n", &a.gw_ns, "link", "show", &a.device]).unwrap();
    assert!(String::from_utf8_lossy(&link.stdout).contains("mtu 1320"), "tunnel MTU = underlay − 80");
    let bin = causeway_bin().display().to_string();

    // 1. TCP without any ICMP help: only the MSS clamp (SYN and SYN-ACK) makes it fit.
    block_frag_needed(&a.gw_ns);
    block_frag_needed(&b.gw_ns);
    let listen = format!("{}:9200", b.pod_ip);
    let sink = tcp_sink(&b.pod_ns, &listen);
    let sent =
        exec::in_ns(&a.pod_ns, &[&bin, "debug", "tcp-source", "--connect", &listen, "--bytes", "50000000"])
            .expect("50 MB over a 1320-byte tunnel");
    assert_eq!(sink.output(), String::from_utf8_lossy(&sent.stdout).trim());
    // Each side's gateway clamps what leaves through its tunnel: A the SYN, B the SYN-ACK.
    // (The ingress side clamps too, for peers that do not, e.g. stock WireGuard.)
    assert!(datapath_event(&t, 1, "mss_clamped") >= 1, "gateway A clamped the SYN");
    assert!(datapath_event(&t, 2, "mss_clamped") >= 1, "gateway B clamped the SYN-ACK");
    exec::in_ns(&a.gw_ns, &["nft", "delete", "table", "inet", "cwtest"]).unwrap();
    exec::in_ns(&b.gw_ns, &["nft", "delete", "table", "inet", "cwtest"]).unwrap();

    // 2. Non-TCP: the gateway's ICMP "fragmentation needed" reaches the sender, whose kernel
    // learns the path MTU for that destination.
    let _ =
        exec::in_ns(&a.pod_ns, &["ping", "-n", "-c", "2", "-W", "1", "-M", "do", "-s", "1400", &b.pod_ip]);
    let route = exec::in_ns(&a.pod_ns, &["ip", "route", "get", &b.pod_ip]).unwrap();
    let route = String::from_utf8_lossy(&route.stdout);
    assert!(route.contains("mtu 1320"), "pod A never learned the path MTU: {route}");

    // 3. Large UDP datagrams both ways (fragmented by the pods, carried through the tunnel).
    let echo_addr = format!("{}:9300", b.pod_ip);
    let _echo = Bg::start(&b.pod_ns, &[&bin, "debug", "udp-echo", "--listen", &echo_addr], Stdio::null());
    ready::wait_listening(&b.pod_ns, &echo_addr, Proto::Udp).unwrap();
    for size in ["1400", "8000", "30000"] {
        exec::in_ns(
            &a.pod_ns,
            &[&bin, "debug", "udp-ping", "--connect", &echo_addr, "--size", size, "--count", "5"],
        )
        .unwrap_or_else(|e| panic!("UDP {size} bytes: {e:#}"));
    }
}

fn connection_status(t: &Topology, gw: usize, remote: &str) -> String {
    t.gateway_status(gw)
        .ok()
        .and_then(|s| s.connections.into_iter().find(|c| c.cluster_id == remote))
        .map(|c| c.status)
        .unwrap_or_default()
}

#[test]
#[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
fn liveness_fails_while_the_daemon_is_held_and_readiness_without_a_tunnel() {
    require_privileges!();
    let mut spec = spec(2);
    spec.gateway_args = vec!["--debug-hooks".into()];
    let t = start(spec, 2);
    let a = t.clusters[0].clone();
    // As the kubelet probes: over TCP, on the metrics port.
    let get = |path: &str| {
        let req =
            format!("exec 3<>/dev/tcp/127.0.0.1/9464; printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3");
        let out = exec::in_ns(&a.gw_ns, &["bash", "-c", &req]).unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ok = |r: &str| r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200");
    let unavailable = |r: &str| r.starts_with("HTTP/1.1 503") || r.starts_with("HTTP/1.0 503");
    wait_for(Duration::from_secs(5), "live and ready", || ok(&get("/healthz")) && ok(&get("/readyz")))
        .unwrap();
    // A reconcile step that never returns, as the test hook holds the daemon's lock.
    let held = std::time::Instant::now();
    let answer =
        causeway_broker_api::status::fetch_raw(&a.status_socket, "/debug/hold-daemon?secs=16").unwrap();
    assert_eq!(answer, "holding the daemon for 16 s\n");
    wait_for(Duration::from_secs(14), "/healthz to fail while the daemon is held", || {
        unavailable(&get("/healthz"))
    })
    .unwrap();
    let failed_after = held.elapsed();
    // Not before the newest reading is 10 s old: a busy second is no failure.
    assert!(failed_after >= Duration::from_secs(9), "failed after {failed_after:?}");
    let body = get("/healthz");
    assert!(body.contains("a reconcile step is stuck"), "{body}");
    wait_for(Duration::from_secs(12), "/healthz to pass once the daemon is free", || ok(&get("/healthz")))
        .unwrap();
    assert!(held.elapsed() >= Duration::from_secs(16), "passed again after {:?}, while held", held.elapsed());
    // Cut the tunnel: still live, no longer ready.
    let rules = "table inet cwcut {\n  chain in { type filter hook input priority 0; udp dport 51820 drop; }\n  \
                 chain out { type filter hook output priority 0; udp dport 51820 drop; }\n}\n";
    exec::in_ns_with_input(&a.gw_ns, &["nft", "-f", "-"], &[], rules.as_bytes()).unwrap();
    wait_for(Duration::from_secs(5), "/readyz to fail without a working tunnel", || {
        unavailable(&get("/readyz"))
    })
    .unwrap();
    let body = get("/readyz");
    assert!(body.contains("no working tunnel: none of 1 remote clusters is connected"), "{body}");
    assert!(ok(&get("/healthz")), "a cut tunnel is not a dead gateway");
}

#[test]
#[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
fn connected_means_forwarding_works() {
    require_privileges!();
    let t = topology(2, 1500);
    let a = t.clusters[0].clone();
    let s = t.gateway_status(1).unwrap();
    let c = &s.connections[0];
    assert_eq!(c.status, "connected");
    assert!(c.rtt_secs.is_some_and(|r| r > 0.0 && r < 0.5), "an in-band RTT: {:?}", c.rtt_secs);

    // Black-hole the path between the gateways (the handshake state stays: only probes notice).
    let rules = "table inet cwcut {\n  chain in { type filter hook input priority 0; udp dport 51820 drop; }\n  \
                 chain out { type filter hook output priority 0; udp dport 51820 drop; }\n}\n";
    exec::in_ns_with_input(&a.gw_ns, &["nft", "-f", "-"], &[], rules.as_bytes()).unwrap();
    let cut = std::time::Instant::now();
    wait_for(Duration::from_secs(3), "status down within 3 s", || {
        connection_status(&t, 1, "cluster-2") == "down"
    })
    .unwrap();
    eprintln!("detected the broken path after {:?}", cut.elapsed());
    // The same metrics, scraped over TCP as Prometheus would (default port 9464).
    // Metrics come from a snapshot refreshed every second: wait for it to catch up.
    let scrape = "exec 3<>/dev/tcp/127.0.0.1/9464; printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3";
    let scraped = || {
        let out = exec::in_ns(&a.gw_ns, &["bash", "-c", scrape]).unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait_for(Duration::from_secs(3), "the scraped metrics to show the path down", || {
        scraped().contains("causeway_connection_up{cluster=\"cluster-2\"} 0")
    })
    .unwrap();
    let metrics = scraped();
    assert!(metrics.starts_with("HTTP/1.1 200") || metrics.starts_with("HTTP/1.0 200"), "{metrics}");
    assert!(metrics.contains("causeway_connection_up{cluster=\"cluster-2\"} 0"), "{metrics}");
    assert!(metrics.contains("causeway_rtt_seconds{cluster=\"cluster-2\"}"), "{metrics}");
    // The status (keys, endpoints, refusals) is not served over the network, only on the
    // owner-only socket.
    let status_tcp = scrape.replace("/metrics", "/status");
    let status_tcp = exec::in_ns(&a.gw_ns, &["bash", "-c", &status_tcp]).unwrap();
    let status_tcp = String::from_utf8_lossy(&status_tcp.stdout);
    assert!(status_tcp.starts_with("HTTP/1.1 404") || status_tcp.starts_with("HTTP/1.0 404"), "{status_tcp}");
    let mode = std::fs::metadata(&a.status_socket)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()));
    assert_eq!(mode.unwrap() & 0o777, 0o600);
    let bin = causeway_bin().display().to_string();
    let shown =
        exec::run(&[&bin, "show", "connections", "--status-socket", &a.status_socket.display().to_string()])
            .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.lines().any(|l| l.contains("cluster-2") && l.contains(" down ")), "{shown}");
    let json = exec::run(&[
        &bin,
        "show",
        "connections",
        "--output",
        "json",
        "--status-socket",
        &a.status_socket.display().to_string(),
    ])
    .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).expect("valid JSON");
    assert_eq!(json[0]["connections"][0]["clusterId"], "cluster-2");
    assert_eq!(json[0]["connections"][0]["status"], "down");

    // Restore: connected again, and traffic flows.
    exec::in_ns(&a.gw_ns, &["nft", "delete", "table", "inet", "cwcut"]).unwrap();
    wait_for(Duration::from_secs(5), "status connected again", || {
        connection_status(&t, 1, "cluster-2") == "connected"
    })
    .unwrap();
    wait_for(Duration::from_secs(3), "the metrics snapshot to show the path up", || {
        causeway_broker_api::status::fetch_raw(&a.status_socket, "/metrics")
            .is_ok_and(|m| m.contains("causeway_connection_up{cluster=\"cluster-2\"} 1"))
    })
    .unwrap();
    assert!(exec::ping(&a.pod_ns, &t.clusters[1].pod_ip, 2));
}

/// Timestamps (seconds) of the echo replies in `ping -D` output.
fn reply_times(ping_output: &str) -> Vec<f64> {
    ping_output
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .collect()
}

/// `bpftool`'s view of a pinned link: (link id, attached program id).
fn pinned_link(path: &std::path::Path) -> (u64, u64) {
    let out = exec::run(&["bpftool", "-j", "link", "show", "pinned", &path.display().to_string()])
        .unwrap_or_else(|e| panic!("no link pinned at {}: {e:#}", path.display()));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let field = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} missing in {v}"));
    (field("id"), field("prog_id"))
}

/// Packets sent into the tunnel as the pinned per-cluster counters hold them, read by
/// `bpftool` with no gateway involved (`tx_packets` is the first u64 of each CPU's value).
fn pinned_tx_packets(bpf_dir: &std::path::Path) -> u64 {
    let map = bpf_dir.join("maps/CLUSTER_COUNTERS").display().to_string();
    let out = exec::run(&["bpftool", "-j", "map", "dump", "pinned", &map]).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut total = 0;
    for entry in v.as_array().unwrap() {
        for cpu in entry["values"].as_array().unwrap() {
            let bytes: Vec<u8> = cpu["value"].as_array().unwrap()[..8]
                .iter()
                .map(|b| u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap())
                .collect();
            total += u64::from_le_bytes(bytes.try_into().unwrap());
        }
    }
    total
}

#[test]
#[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
fn gateway_restart_keeps_the_pinned_state_and_forwarding() {
    require_privileges!();
    let mut t = topology(2, 1500);
    let (a, b) = (t.clusters[0].clone(), t.clusters[1].clone());
    let routes_before = causeway_routes(&a.gw_ns);
    let ifindex = |ns: &str, dev: &str| -> String {
        let out = exec::run(&["ip", "-n", ns, "-o", "link", "show", "dev", dev]).unwrap();
        String::from_utf8_lossy(&out.stdout).split(':').next().unwrap_or_default().to_owned()
    };
    let old_ifindex = ifindex(&a.gw_ns, &a.device);
    let links = t.gateway_bpf_dir(1).join("links");
    let egress = links.join(format!("tunnel_egress@{}", a.device));
    let ingress = links.join(format!("tunnel_ingress@{}", a.device));
    // The uplink is a veth: the guard runs at TC (see `--uplink-hook`).
    let guard = links.join("uplink_guard_tc@uplink");
    let before: Vec<_> = [&egress, &ingress, &guard].map(|p| pinned_link(p)).into();
    assert!(t.gateway_bpf_dir(1).join("maps/CLUSTER_COUNTERS").exists());

    // A steady ping from pod A to pod B, 50 per second, for the whole exercise.
    let ping = Bg::start(
        &a.pod_ns,
        &["ping", "-D", "-n", "-i", "0.02", "-W", "1", "-c", "600", &b.pod_ip],
        Stdio::piped(),
    );
    std::thread::sleep(Duration::from_millis(1000));

    // The broker goes away for good, then gateway A is stopped as a rolling update stops it.
    t.kill_broker().unwrap();
    let counted_before = t.gateway_status(1).unwrap().connections[0].datapath;
    let stopping = std::time::Instant::now();
    t.stop_gateway(1).unwrap();
    let stopped = std::time::Instant::now();

    // No process runs, and the kernel holds everything: the same device, its routes, the
    // same links with the same programs attached (a link detaches when no pin holds it).
    assert!(exec::ns_pids(&a.gw_ns).is_empty(), "the gateway is still running");
    assert_eq!(ifindex(&a.gw_ns, &a.device), old_ifindex, "the tunnel device went");
    // (Marked `linkdown`: with no reader the device has no carrier. They are still used, so
    // remote traffic keeps going into the device, where it waits or is dropped, and never
    // leaks onto the underlay unencrypted.)
    assert_eq!(
        causeway_routes(&a.gw_ns).replace(" linkdown", ""),
        routes_before,
        "routes changed while the gateway was down"
    );
    let down: Vec<_> = [&egress, &ingress, &guard].map(|p| pinned_link(p)).into();
    assert_eq!(down, before, "links or programs changed while the gateway was down");
    // Attached, not just pinned: the egress program keeps counting the pod's pings.
    let tx0 = pinned_tx_packets(&t.gateway_bpf_dir(1));
    std::thread::sleep(Duration::from_millis(500));
    let tx1 = pinned_tx_packets(&t.gateway_bpf_dir(1));
    assert!(tx1 >= tx0 + 10, "the egress program stopped counting while no gateway ran: {tx0} → {tx1}");

    t.start_gateway(1).unwrap();
    wait_for(Duration::from_secs(10), "the restarted gateway to answer", || t.gateway_status(1).is_ok())
        .unwrap();
    let restart_time = stopped.elapsed();
    wait_for(Duration::from_secs(10), "cluster-2 connected again, from cached records", || {
        connection_status(&t, 1, "cluster-2") == "connected"
    })
    .unwrap();
    // Traffic can stop no earlier than the stop began and must flow again once the tunnel is
    // back: the gap is bounded by that measured outage plus one status poll (200 ms), one
    // ping interval and ping's own clock granularity.
    let outage = stopping.elapsed();
    std::thread::sleep(Duration::from_millis(1500));
    let out = {
        let _ = exec::run(&["kill", "-INT", &ping.pid().unwrap().to_string()]);
        ping.output()
    };
    let times = reply_times(&out);
    assert!(times.len() > 50, "ping barely ran:\n{out}");
    let gap = times.windows(2).map(|w| w[1] - w[0]).fold(0.0_f64, f64::max);
    eprintln!(
        "gateway restart: process back after {restart_time:?}; largest traffic gap {:.0} ms",
        gap * 1000.0
    );
    let bound = outage.as_secs_f64() + 0.25;
    assert!(
        gap <= bound,
        "traffic resumed {gap:.2} s after it stopped; the gateway was out for {outage:?} (process back after {restart_time:?})"
    );
    assert!(gap > 0.1, "control: the stop interrupted the pings ({gap:.2} s gap)");

    // The new process swapped its programs into the same links (new program ids, same link
    // ids) and adopted the pinned maps: the counters carry on instead of starting from zero,
    // and the packets sent while no process ran were counted too.
    let after: Vec<_> = [&egress, &ingress, &guard].map(|p| pinned_link(p)).into();
    for ((id0, prog0), (id1, prog1)) in before.iter().zip(&after) {
        assert_eq!(id0, id1, "a link was replaced instead of updated");
        assert_ne!(prog0, prog1, "the restarted gateway did not load its own program");
    }
    let counted = t.gateway_status(1).unwrap().connections[0].datapath;
    assert!(
        counted.tx_packets > counted_before.tx_packets + 25,
        "the pinned counters were reset: {} before the stop, {} after the restart",
        counted_before.tx_packets,
        counted.tx_packets
    );
    // Nothing doubled: one tunnel device, the same routes, each packet counted exactly once.
    let links = exec::run(&["ip", "-n", &a.gw_ns, "-o", "link", "show"]).unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert_eq!(links.lines().filter(|l| l.contains(&format!(": {}:", a.device))).count(), 1, "{links}");
    assert_eq!(ifindex(&a.gw_ns, &a.device), old_ifindex, "the same tunnel device");
    assert_eq!(causeway_routes(&a.gw_ns), routes_before);
    let before = t.gateway_status(1).unwrap().connections[0].datapath;
    assert!(
        exec::in_ns(&a.pod_ns, &["ping", "-n", "-q", "-c", "5", "-i", "0.1", "-s", "100", &b.pod_ip]).is_ok()
    );
    let after = t.gateway_status(1).unwrap().connections[0].datapath;
    assert_eq!(after.tx_packets - before.tx_packets, 5, "each request counted once");
    assert_eq!(after.tx_bytes - before.tx_bytes, 5 * 128, "20 IP + 8 ICMP + 100 bytes each");
    assert_eq!(after.rx_packets - before.rx_packets, 5, "each reply counted once");

    // A crash (SIGKILL) leaves the same state behind, and `causeway cleanup` removes it all.
    t.kill_gateway(1).unwrap();
    assert_eq!(ifindex(&a.gw_ns, &a.device), old_ifindex);
    let cleanup = exec::in_ns(
        &a.gw_ns,
        &[
            &causeway_bin().display().to_string(),
            "cleanup",
            "--device",
            &a.device,
            "--bpf-dir",
            &t.gateway_bpf_dir(1).display().to_string(),
        ],
    );
    assert!(cleanup.is_ok(), "{cleanup:?}");
    assert!(exec::run(&["ip", "-n", &a.gw_ns, "link", "show", "dev", &a.device]).is_err(), "device left");
    assert!(causeway_routes(&a.gw_ns).is_empty(), "routes left");
    assert!(!t.gateway_bpf_dir(1).exists(), "pins left");
    for (id, _) in &down {
        assert!(exec::run(&["bpftool", "link", "show", "id", &id.to_string()]).is_err(), "link {id} left");
    }
    let uplink = exec::run(&["ip", "-n", &a.gw_ns, "link", "show", "dev", "uplink"]).unwrap();
    assert!(!String::from_utf8_lossy(&uplink.stdout).contains("xdp"), "the uplink guard is still attached");
}

#[test]
#[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
fn a_cluster_cannot_inject_packets_with_another_clusters_source() {
    require_privileges!();
    let t = topology(3, 1500);
    let (a, b) = (t.clusters[0].clone(), t.clusters[1].clone());
    // On gateway B, one address of B's own range (the control) and one of cluster 3's.
    exec::ip(&b.gw_ns, &["addr", "add", "10.2.250.1/32", "dev", "lo"]).unwrap();
    exec::ip(&b.gw_ns, &["addr", "add", "10.3.250.1/32", "dev", "lo"]).unwrap();
    let drops = |t: &Topology| {
        t.gateway_status(1).unwrap().cable_drops.get("source_not_allowed").copied().unwrap_or(0)
    };
    let ping_from = |src: &str| {
        exec::in_ns(&b.gw_ns, &["ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "1", "-I", src, &a.pod_ip])
            .is_ok()
    };
    let before = drops(&t);
    assert!(ping_from("10.2.250.1"), "control: B's own source addresses pass");
    assert_eq!(drops(&t), before);
    // Claiming cluster 3's addresses through B's tunnel: gateway A drops every packet.
    assert!(!ping_from("10.3.250.1"), "a forged source must not get through");
    assert_eq!(drops(&t), before + 3, "each of the 3 forged packets is counted as source_not_allowed, once");
}

#[test]
#[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
fn traffic_follows_a_gateway_whose_address_changes() {
    require_privileges!();
    let t = topology(2, 1500);
    let (a, b) = (t.clusters[0].clone(), t.clusters[1].clone());
    assert!(exec::ping(&a.pod_ns, &b.pod_ip, 2));
    // Gateway B's underlay address changes (a new lease, a NAT rebinding…); the broker still
    // has the old one. B's next authenticated packets tell A where it is now.
    // (Delete first: removing a primary address also removes its secondaries.)
    exec::ip(&b.gw_ns, &["addr", "del", &format!("{}/24", b.gw_ip), "dev", "uplink"]).unwrap();
    exec::ip(&b.gw_ns, &["addr", "add", "172.31.0.42/24", "dev", "uplink"]).unwrap();
    // With the uplink guard, A accepts B's data from the new address once B's next handshake
    // (sent after KEEPALIVE + REKEY_TIMEOUT = 15 s without answers) authenticates it there.
    wait_for(Duration::from_secs(30), "gateway A to follow B to its new address", || {
        t.gateway_status(1).is_ok_and(|s| s.connections[0].endpoint == "172.31.0.42:51820")
            && connection_status(&t, 1, "cluster-2") == "connected"
    })
    .unwrap();
    assert!(exec::ping(&a.pod_ns, &b.pod_ip, 3), "pods talk again over the new path");
}

#[test]
#[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
fn a_dead_gateways_endpoint_expires_and_its_peer_and_routes_go() {
    require_privileges!();
    let mut spec = spec(3);
    spec.broker_args = vec!["--endpoint-lease-seconds".into(), "3".into()];
    spec.gateway_args = vec!["--heartbeat-seconds".into(), "1".into()];
    let mut t = start(spec, 3);
    let gw1 = t.clusters[0].gw_ns.clone();
    // Heartbeats keep everyone alive well past the lease.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(t.gateway_status(1).unwrap().connections.len(), 2);
    // Gateway 3 dies without a word; its lease runs out and the others forget it.
    t.kill_gateway(3).unwrap();
    let died = std::time::Instant::now();
    wait_for(Duration::from_secs(15), "gateway 1 to drop the dead cluster-3 gateway", || {
        t.gateway_status(1).is_ok_and(|s| s.connections.iter().all(|c| c.cluster_id != "cluster-3"))
            && !causeway_routes(&gw1).contains("10.3.0.0/16")
    })
    .unwrap();
    eprintln!("dead gateway forgotten after {:?} (lease 3 s)", died.elapsed());
    assert!(died.elapsed() >= Duration::from_secs(2), "not before the lease could run out");
    // Its cluster record stays (the cluster did not leave); the live tunnel is untouched.
    let admin = t.admin_credentials().display().to_string();
    let bin = causeway_bin().display().to_string();
    let shown = exec::in_ns(&t.broker_ns, &[&bin, "show", "clusters", "--credentials", &admin]).unwrap();
    assert!(String::from_utf8_lossy(&shown.stdout).contains("cluster-3"));
    assert!(exec::ping(&t.clusters[0].pod_ns, &t.clusters[1].pod_ip, 2));
}

#[test]
#[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
fn the_data_plane_outlives_the_broker_and_resyncs_when_it_returns() {
    require_privileges!();
    let mut t = start(spec(3), 2);
    let (a, b) = (t.clusters[0].clone(), t.clusters[1].clone());
    t.kill_broker().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(exec::ping(&a.pod_ns, &b.pod_ip, 3), "tunnels keep working with the broker down");
    assert_eq!(connection_status(&t, 1, "cluster-2"), "connected");
    // The broker comes back (same store); a new cluster joins; everyone converges.
    t.start_broker().unwrap();
    t.start_gateway(3).unwrap();
    t.wait_connected(Duration::from_secs(30)).expect("all three connected after the broker returned");
    assert!(exec::ping(&a.pod_ns, &t.clusters[2].pod_ip, 2));
}

#[test]
#[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
fn the_uplink_guard_drops_junk_and_floods_while_traffic_flows_at_tc() {
    require_privileges!();
    uplink_guard_under_attack("tc");
}

#[test]
#[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
fn the_uplink_guard_drops_junk_and_floods_while_traffic_flows_at_xdp() {
    require_privileges!();
    uplink_guard_under_attack("xdp");
}

fn uplink_guard_under_attack(hook: &str) {
    let mut spec = spec(2);
    spec.gateway_args = vec!["--uplink-hook".into(), hook.into()];
    let mut t = start(spec, 2);
    let prog = exec::in_ns(&t.clusters[0].gw_ns, &["ip", "-d", "link", "show", "uplink"]).unwrap();
    let prog = String::from_utf8_lossy(&prog.stdout).into_owned();
    assert_eq!(prog.contains("prog/xdp"), hook == "xdp", "{prog}");
    let (a, b) = (t.clusters[0].clone(), t.clusters[1].clone());
    let attacker = t.add_underlay_host("attacker", "172.31.0.66").unwrap();
    let bin = causeway_bin().display().to_string();
    let events = |t: &Topology| t.gateway_status(1).unwrap().datapath_events;
    let grew_since = |t: &Topology, from: &std::collections::BTreeMap<String, u64>, k: &str| {
        events(t).get(k).copied().unwrap_or(0) - from.get(k).copied().unwrap_or(0)
    };

    // A run of initiations pays one token per datagram. 50 in one run are more than a fresh
    // source's burst of 40: at TC (the run arrives whole) all die together; the veth segments
    // the run for XDP, where 40 pass and 10 are dropped. Either way only 40 can reach the cable.
    let runner = t.add_underlay_host("runner", "172.31.0.67").unwrap();
    let target = format!("{}:51820", a.gw_ip);
    let run = |n: &str| {
        let flood =
            [&bin, "debug", "udp-flood", "--target", &target, "--kind", "init", "--count", n, "--gso", n];
        let out = exec::in_ns(&runner, &flood).unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("\"sent\":{n}")), "{out:?}");
    };
    let (cable0, events0) = (settled_junk(&t), events(&t));
    run("50");
    let cable1 = settled_junk(&t);
    let (dropped, passed) = if hook == "tc" { (1, 0) } else { (10, 40) };
    assert_eq!(grew_since(&t, &events0, "xdp_handshake_flood"), dropped, "a run over the burst");
    assert_eq!(cable1 - cable0, passed, "what of a run over the burst reached the cable");
    if hook == "tc" {
        // The bucket is still full: a run within it passes whole, paying for all ten.
        run("10");
        assert_eq!(settled_junk(&t) - cable1, 10, "a run within the burst reached the cable");
    }

    let before = events(&t);

    // A 20 MB transfer from pod B to pod A, into gateway A, while gateway A is attacked.
    let listen = format!("{}:9400", a.pod_ip);
    let sink = tcp_sink(&a.pod_ns, &listen);
    let source = Bg::start(
        &b.pod_ns,
        &[&bin, "debug", "tcp-source", "--connect", &listen, "--bytes", "20000000"],
        Stdio::piped(),
    );
    // The guard lets one source's handshake messages through at 20/s after a burst of 40:
    // what reaches the cable is bounded by how long the floods take.
    let flooding = std::time::Instant::now();
    for (kind, count) in [("garbage", "3000"), ("data", "3000"), ("init", "3000")] {
        exec::in_ns(
            &attacker,
            &[&bin, "debug", "udp-flood", "--target", &target, "--kind", kind, "--count", count],
        )
        .unwrap();
    }
    // Garbage in GSO runs of 10: a veth passes a run whole to a TC guard (dropped as one), and
    // segments it for an XDP guard (ten drops).
    let flood = [
        &bin,
        "debug",
        "udp-flood",
        "--target",
        &target,
        "--kind",
        "garbage",
        "--count",
        "3000",
        "--gso",
        "10",
    ];
    let out = exec::in_ns(&attacker, &flood).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"sent\":3000"), "{out:?}");
    // Initiations in runs of 10 (148 bytes each): a run is judged by its segment size, so at TC
    // it is a (rate-limited) handshake, not a 1,480-byte malformed message.
    let flood =
        [&bin, "debug", "udp-flood", "--target", &target, "--kind", "init", "--count", "100", "--gso", "10"];
    exec::in_ns(&attacker, &flood).unwrap();
    // Forged responses and cookie replies: the same per-source budget as initiations.
    for kind in ["response", "cookie"] {
        exec::in_ns(
            &attacker,
            &[&bin, "debug", "udp-flood", "--target", &target, "--kind", kind, "--count", "3000"],
        )
        .unwrap();
    }
    // Data messages forged with the real peer's address and port: a known source, but no
    // session of its (the index is a random guess), so they die in the guard, not the cable.
    // The earlier floods' last datagrams (handshakes within the budget) may still be on their
    // way to the cable: start counting once its drop counters have settled.
    let cable_drops = |t: &Topology| t.gateway_status(1).unwrap().cable_drops;
    settled_junk(&t);
    let cable_before = cable_drops(&t);
    let peer = format!("{}:51820", b.gw_ip);
    let spoofed = [
        &bin,
        "debug",
        "udp-flood",
        "--target",
        &target,
        "--kind",
        "data",
        "--count",
        "3000",
        "--spoof-source",
        &peer,
    ];
    let out = exec::in_ns(&attacker, &spoofed).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"sent\":3000"), "{out:?}");
    let sent = source.output();
    assert_eq!(sink.output(), sent, "the transfer completed intact under attack");

    let after = events(&t);
    let grew = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
    let malformed = grew("xdp_malformed");
    if hook == "tc" {
        assert!((3300..3310).contains(&malformed), "3,000 datagrams and 300 runs of garbage: {malformed}");
        assert!(
            grew("xdp_handshake_flood") >= 2900 + 10,
            "initiation runs limited: {}",
            grew("xdp_handshake_flood")
        );
    } else {
        assert!(malformed >= 6000, "6,000 datagrams of garbage: {malformed}");
    }
    assert!(grew("xdp_unknown_source") >= 3000, "forged data dropped: {}", grew("xdp_unknown_source"));
    assert_eq!(
        grew("xdp_unknown_session"),
        3000,
        "every datagram spoofed from the peer's address, and no real one"
    );
    let cable_after = cable_drops(&t);
    for reason in ["invalid_packet", "unknown_peer"] {
        let d =
            cable_after.get(reason).copied().unwrap_or(0) - cable_before.get(reason).copied().unwrap_or(0);
        assert_eq!(d, 0, "the spoofed data never reached the cable ({reason})");
    }
    // 40 handshake messages of burst, then 20 per second, for initiations, responses and
    // cookie replies alike: nearly all of 9,000 are dropped.
    assert!(grew("xdp_handshake_flood") >= 8900, "handshake flood limited: {}", grew("xdp_handshake_flood"));
    // At TC the real peer's runs arrive whole: one verdict per run of up to 64 datagrams.
    let passed = if hook == "tc" { 100 } else { 1000 };
    assert!(grew("xdp_passed") > passed, "the real peer's traffic passed: {}", grew("xdp_passed"));
    // The cable saw at most the few initiations the limit let through (the attacker's own
    // bucket: the runner's is another source's).
    let reached = settled_junk(&t) - cable1 - if hook == "tc" { 10 } else { 0 };
    let budget = 40 + (20.0 * flooding.elapsed().as_secs_f64()).ceil() as u64;
    assert!(reached <= budget, "only rate-limited junk reached userspace: {reached} (budget {budget})");
    assert_eq!(connection_status(&t, 1, "cluster-2"), "connected");
}

/// Junk that reached gateway 1's cable (failed authentication, or no such peer), once the
/// count has stopped moving: datagrams the guard let through may still be on their way.
fn settled_junk(t: &Topology) -> u64 {
    let junk = || {
        let drops = t.gateway_status(1).unwrap().cable_drops;
        drops.get("invalid_packet").copied().unwrap_or(0) + drops.get("unknown_peer").copied().unwrap_or(0)
    };
    let mut last = junk();
    wait_for(Duration::from_secs(5), "the cable's drop counters to settle", || {
        std::thread::sleep(Duration::from_millis(300));
        let now = junk();
        let settled = now == last;
        last = now;
        settled
    })
    .unwrap();
    last
}

/// A TCP transfer of `bytes` from `from_ns` to `to_ip:port` (a sink started in `to_ns`):
/// whether it arrived intact within a few seconds.
fn tcp_transfer(from_ns: &str, to_ns: &str, to_ip: &str, port: u16, bytes: u64) -> bool {
    let bin = causeway_bin().display().to_string();
    let listen = format!("{to_ip}:{port}");
    let sink = tcp_sink(to_ns, &listen);
    let sent = exec::in_ns(
        from_ns,
        &["timeout", "5", &bin, "debug", "tcp-source", "--connect", &listen, "--bytes", &bytes.to_string()],
    );
    let Ok(sent) = sent else { return false };
    let received = sink.output();
    let sent = String::from_utf8_lossy(&sent.stdout).trim().to_owned();
    !sent.is_empty() && received == sent
}

#[test]
#[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
fn cluster_set_policy_is_enforced_in_the_kernel_and_changes_live() {
    require_privileges!();
    let t = topology(2, 1500);
    let (a, b) = (t.clusters[0].clone(), t.clusters[1].clone());
    let bin = causeway_bin().display().to_string();
    let admin = t.admin_credentials().display().to_string();
    let policy = |args: &[&str]| {
        let mut cmd = vec![bin.as_str(), "policy"];
        cmd.extend_from_slice(args);
        cmd.extend_from_slice(&["--credentials", &admin]);
        exec::in_ns(&t.broker_ns, &cmd).unwrap_or_else(|e| panic!("causeway policy {args:?}: {e}"));
    };
    let drops =
        |gw: usize, rule: &str| t.gateway_status(gw).unwrap().policy_drops.get(rule).copied().unwrap_or(0);

    // No policy: anything goes.
    assert!(tcp_transfer(&a.pod_ns, &b.pod_ns, &b.pod_ip, 9002, 100_000));

    // Deny by default, allow cluster-1 → cluster-2 TCP 9001 only.
    policy(&["default", "deny"]);
    policy(&[
        "apply",
        "web",
        "--action",
        "allow",
        "--from-cluster",
        "cluster-1",
        "--to-cluster",
        "cluster-2",
        "--protocol",
        "tcp",
        "--port",
        "9001",
    ]);
    wait_for(Duration::from_secs(10), "both gateways to enforce deny-by-default", || {
        !exec::ping(&a.pod_ns, &b.pod_ip, 1) && !exec::ping(&b.pod_ns, &a.pod_ip, 1)
    })
    .unwrap();
    let listed = exec::in_ns(&t.broker_ns, &[&bin, "show", "policies", "--credentials", &admin]).unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(
        listed.contains("web") && listed.contains("9001") && listed.contains("default: deny"),
        "{listed}"
    );

    // The allowed port carries a transfer intact (its replies pass as replies); the tunnels
    // stay up (the gateways' probes are always allowed).
    assert!(tcp_transfer(&a.pod_ns, &b.pod_ns, &b.pod_ip, 9001, 2_000_000), "allowed port");
    assert!(t.gateway_status(1).unwrap().connections.iter().all(|c| c.status == "connected"));
    assert!(t.gateway_status(1).unwrap().datapath_events["policy_reply_allowed"] > 0);
    // Another port, and the reverse direction, are dropped in the kernel and counted.
    let before = drops(1, "(default)");
    assert!(!tcp_transfer(&a.pod_ns, &b.pod_ns, &b.pod_ip, 9002, 100_000), "denied port");
    assert!(drops(1, "(default)") > before, "egress drops counted on gateway 1");
    let before = drops(2, "(default)");
    assert!(!tcp_transfer(&b.pod_ns, &a.pod_ns, &a.pod_ip, 9001, 100_000), "cluster-2 may not start flows");
    assert!(drops(2, "(default)") > before, "counted on gateway 2");
    assert!(t.gateway_status(1).unwrap().datapath_events["policy_denied_tx"] > 0);

    // A named deny rule is counted under its own name, in metrics too.
    policy(&["apply", "no-ping", "--action", "deny", "--protocol", "icmp", "--priority", "1"]);
    policy(&["default", "allow"]);
    wait_for(Duration::from_secs(10), "the new policy to take effect without a restart", || {
        tcp_transfer(&a.pod_ns, &b.pod_ns, &b.pod_ip, 9002, 10_000)
    })
    .unwrap();
    assert!(!exec::ping(&a.pod_ns, &b.pod_ip, 2));
    assert!(drops(1, "no-ping") >= 2, "{:?}", t.gateway_status(1).unwrap().policy_drops);
    wait_for(Duration::from_secs(3), "the metrics snapshot to show the rule's drops", || {
        causeway_broker_api::status::fetch_raw(&a.status_socket, "/metrics")
            .is_ok_and(|m| m.contains("causeway_policy_drops_total{rule=\"no-ping\"}"))
    })
    .unwrap();

    // Deleting the rules restores everything.
    policy(&["delete", "no-ping"]);
    policy(&["delete", "web"]);
    wait_for(Duration::from_secs(10), "pings to pass again", || exec::ping(&a.pod_ns, &b.pod_ip, 1)).unwrap();
}

/// Tunnel datagrams (or GSO runs of them) the loss rule in a gateway's namespace dropped.
fn loss_dropped(ns: &str) -> u64 {
    let out = exec::in_ns(ns, &["nft", "list", "table", "inet", "cwloss"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("counter packets ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A TCP counter of namespace `ns` (`/proc/net/netstat`, e.g. `TcpExt` `TCPOFOQueue`).
fn netstat(ns: &str, group: &str, name: &str) -> u64 {
    proc_counter(ns, "/proc/net/netstat", group, name)
}

/// One counter of a `/proc/net/{netstat,snmp}`-style file in namespace `ns`.
fn proc_counter(ns: &str, file: &str, group: &str, name: &str) -> u64 {
    let out = exec::in_ns(ns, &["cat", file]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rows: Vec<Vec<&str>> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{group}:")))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let (names, values) = (&rows[0], &rows[1]);
    let at = names.iter().position(|n| *n == name).unwrap_or_else(|| panic!("no {group} {name}"));
    values[at].parse().unwrap()
}

/// CPU ticks each cable lane thread of the gateway in `ns` has used, by thread name.
fn lane_ticks(ns: &str) -> std::collections::BTreeMap<String, u64> {
    let pids = exec::run(&["ip", "netns", "pids", ns]).unwrap();
    let mut ticks = std::collections::BTreeMap::new();
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        for task in tasks.flatten() {
            let comm =
                std::fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim().to_owned();
            if !comm.starts_with("cw-lane-") {
                continue;
            }
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // Fields after the command name: utime and stime are the 12th and 13th.
            let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
            let f: Vec<u64> = after.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            ticks.insert(comm, f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0));
        }
    }
    ticks
}

#[test]
#[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
fn parallel_flows_share_the_lanes_and_none_is_reordered() {
    require_privileges!();
    let t = topology(2, 1500);
    let (a, b) = (t.clusters[0].clone(), t.clusters[1].clone());
    for (i, c) in [&a, &b].into_iter().enumerate() {
        assert_eq!(t.gateway_status(i + 1).unwrap().cable_lanes, 2, "{}", c.cluster_id);
        let tuntap = exec::in_ns(&c.gw_ns, &["ip", "tuntap", "show"]).unwrap();
        let tuntap = String::from_utf8_lossy(&tuntap.stdout).into_owned();
        assert!(tuntap.contains(&format!("{}: tun multi_queue vnet_hdr persist", c.device)), "{tuntap}");
    }
    // Reordering the senders detected (SACK, timestamps, Reno), segments they sent again, and
    // segments the receiver queued out of order.
    let reordered = || -> u64 {
        ["TCPSACKReorder", "TCPTSReorder", "TCPRenoReorder"]
            .iter()
            .map(|n| netstat(&a.pod_ns, "TcpExt", n))
            .sum()
    };
    let retransmitted = || proc_counter(&a.pod_ns, "/proc/net/snmp", "Tcp", "RetransSegs");
    let (reordered_before, retrans_before) = (reordered(), retransmitted());
    let ofo_before = netstat(&b.pod_ns, "TcpExt", "TCPOFOQueue");
    let ticks_before = lane_ticks(&b.gw_ns);
    // Eight flows at once, A → B (a lane is picked per flow by hash: with eight, the chance
    // that every flow lands on one lane, leaving the other idle, is under 1 %): each must arrive intact, and, with nothing lost on the way,
    // in order — a lane that raced another on one flow would show up as out-of-order segments.
    let bin = causeway_bin().display().to_string();
    let flows: Vec<_> = (0..8)
        .map(|i| {
            let listen = format!("{}:{}", b.pod_ip, 9500 + i);
            let sink = tcp_sink(&b.pod_ns, &listen);
            let source = Command::new("ip")
                .args(["netns", "exec", &a.pod_ns, "timeout", "60", &bin, "debug", "tcp-source"])
                .args(["--connect", &listen, "--bytes", "10000000"])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            (sink, source)
        })
        .collect();
    for (i, (sink, source)) in flows.into_iter().enumerate() {
        let sent = source.wait_with_output().unwrap();
        let sent = String::from_utf8_lossy(&sent.stdout).trim().to_owned();
        assert!(sent.contains("\"bytes\":10000000"), "flow {i}: {sent}");
        assert_eq!(sink.output(), sent, "flow {i}: length and SHA-256 match");
    }
    let ofo = netstat(&b.pod_ns, "TcpExt", "TCPOFOQueue") - ofo_before;
    let (reordered, retransmitted) = (reordered() - reordered_before, retransmitted() - retrans_before);
    let drops = t.gateway_status(2).unwrap().cable_drops;
    assert_eq!(drops.get("lane_backlog").copied().unwrap_or(0), 0, "{drops:?}");
    // A lane that raced another on a flow shows as reordering the senders detect. Segments
    // queued out of order at pod B must each follow a loss the sender repaired (a debug build
    // on two busy cores can overflow a socket buffer): never without a retransmission.
    assert_eq!(reordered, 0, "the senders saw segments reordered ({ofo} queued out of order at pod B)");
    assert!(
        ofo == 0 || retransmitted > 0,
        "{ofo} segments queued out of order at pod B with nothing lost and sent again: reordered on the way"
    );
    if ofo > 0 {
        eprintln!(
            "{ofo} segments queued out of order after {retransmitted} retransmitted (losses, not reordering)"
        );
    }
    // Receiving took both lanes of gateway B: one decrypting, the other writing to the device.
    let ticks = lane_ticks(&b.gw_ns);
    for (lane, used) in &ticks {
        let before = ticks_before.get(lane).copied().unwrap_or(0);
        assert!(*used > before, "{lane} of gateway B did no work: {ticks_before:?} → {ticks:?}");
    }
    assert_eq!(ticks.len(), 2, "{ticks:?}");
    eprintln!("8 × 10 MB in order over 2 lanes; lane CPU ticks {ticks_before:?} → {ticks:?}");
}

/// WireGuard data messages in a capture whose counter is below one already seen from the same
/// sender index: each is a datagram (or the head of a GSO run) that the underlay reordered.
fn reordered_data_messages(pcap: &[u8]) -> (usize, usize) {
    let (mut seen, mut late) = (0, 0);
    let mut highest: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
    for d in causeway_netns::pcap::udp_datagrams(pcap) {
        let wg = d.payload;
        if wg.len() < 16 || wg[..4] != [4, 0, 0, 0] {
            continue;
        }
        let receiver = u32::from_le_bytes(wg[4..8].try_into().unwrap());
        let counter = u64::from_le_bytes(wg[8..16].try_into().unwrap());
        seen += 1;
        let top = highest.entry(receiver).or_insert(counter);
        if counter < *top {
            late += 1;
        }
        *top = (*top).max(counter);
    }
    (seen, late)
}

#[test]
fn reordered_data_messages_are_found_in_a_capture() {
    // Two data messages to receiver 7 (counters 5, then 3) and a handshake message between.
    let frame = |kind: u8, counter: u64| {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00, 0x45]);
        f.extend_from_slice(&[0; 8]);
        f.push(17); // UDP
        f.extend_from_slice(&[0; 10 + 8]);
        f.extend_from_slice(&[kind, 0, 0, 0]);
        f.extend_from_slice(&7u32.to_le_bytes());
        f.extend_from_slice(&counter.to_le_bytes());
        f
    };
    let mut pcap = vec![0u8; 24];
    for f in [frame(4, 5), frame(1, 0), frame(4, 3), frame(4, 6)] {
        let mut rec = vec![0u8; 16];
        rec[8..12].copy_from_slice(&u32::try_from(f.len()).unwrap().to_le_bytes());
        pcap.extend(rec);
        pcap.extend(f);
    }
    assert_eq!(reordered_data_messages(&pcap), (3, 1));
}

#[test]
#[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
fn long_transfers_stay_intact_under_loss_and_reordering_on_the_underlay() {
    require_privileges!();
    let t = topology(2, 1500);
    let (a, b) = (t.clusters[0].clone(), t.clusters[1].clone());
    // Both gateways lose 2 % of what they send on the WireGuard port: the rule sees what the
    // socket sends, so a dropped GSO run is a burst of up to 64 datagrams (and the send fails
    // with EPERM, which must not turn segmentation off). Their uplinks take runs of one
    // segment, so the kernel cuts each run up as it leaves, and the underlay bridge holds back
    // 5 % of the datagrams toward each gateway in a slow HTB class, so that later ones overtake
    // them. Batched sends, GSO, GRO and the replay window must never corrupt, duplicate or
    // lose data that TCP cannot recover. (tc netem would be the usual tool; this kernel lacks
    // it.)
    for c in [&a, &b] {
        for cmd in [
            &["nft", "add", "table", "inet", "cwloss"][..],
            &["nft", "add", "chain", "inet", "cwloss", "out", "{ type filter hook output priority 0; }"],
            &[
                "nft", "add", "rule", "inet", "cwloss", "out", "udp", "dport", "51820", "numgen", "random",
                "mod", "100", "<", "2", "counter", "drop",
            ],
            &["ip", "link", "set", "dev", "uplink", "gso_max_segs", "1"],
        ] {
            let out = exec::in_ns(&c.gw_ns, cmd).unwrap();
            assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let port = format!("gw{}", c.index);
        let chain = format!("to{}", c.index);
        let hook = format!("{{ type filter hook egress device \"{port}\" priority 0; }}");
        for cmd in [
            &["tc", "qdisc", "add", "dev", &port, "root", "handle", "1:", "htb", "default", "10"][..],
            &["tc", "class", "add", "dev", &port, "parent", "1:", "classid", "1:10", "htb", "rate", "10gbit"],
            &[
                "tc", "class", "add", "dev", &port, "parent", "1:", "classid", "1:20", "htb", "rate",
                "50mbit", "ceil", "50mbit", "burst", "1600", "cburst", "1600",
            ],
            &["nft", "add", "table", "netdev", "cwreorder"],
            &["nft", "add", "chain", "netdev", "cwreorder", &chain, &hook],
            // HTB files a packet whose priority names one of its classes into that class.
            &[
                "nft",
                "add",
                "rule",
                "netdev",
                "cwreorder",
                &chain,
                "udp",
                "dport",
                "51820",
                "numgen",
                "random",
                "mod",
                "100",
                "<",
                "5",
                "meta",
                "priority",
                "set",
                "1:20",
            ],
        ] {
            let out = exec::in_ns(&t.underlay_ns, cmd).unwrap();
            assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let pcap = t.spec.run_dir.join("reorder.pcap").display().to_string();
    let cap = Bg::start(
        &b.gw_ns,
        &["tcpdump", "-i", "uplink", "-Q", "in", "-U", "-n", "-s", "96", "-w", &pcap, "udp", "port", "51820"],
        Stdio::null(),
    );
    ready::wait_capturing(std::path::Path::new(&pcap)).unwrap();
    let bin = causeway_bin().display().to_string();
    for (from, to, port) in [(&a, &b, 9400), (&b, &a, 9401)] {
        let listen = format!("{}:{port}", to.pod_ip);
        let sink = tcp_sink(&to.pod_ns, &listen);
        let sent = exec::in_ns(
            &from.pod_ns,
            &["timeout", "120", &bin, "debug", "tcp-source", "--connect", &listen, "--bytes", "30000000"],
        )
        .expect("30 MB through a lossy, reordering underlay");
        let sent = String::from_utf8_lossy(&sent.stdout).trim().to_owned();
        assert!(sent.contains("\"bytes\":30000000"), "{sent}");
        assert_eq!(sink.output(), sent, "{} → {}: length and SHA-256 match", from.cluster_id, to.cluster_id);
    }
    cap.interrupt();
    // The loss and the reordering were real.
    let dropped = loss_dropped(&a.gw_ns) + loss_dropped(&b.gw_ns);
    assert!(dropped > 10, "only {dropped} sends dropped");
    // A send the firewall drops fails with EPERM: counted as refused, and no reason to stop
    // segmenting (which would cost every later datagram its own trip through the stack).
    for (i, c) in [&a, &b].into_iter().enumerate() {
        let status = t.gateway_status(i + 1).unwrap();
        assert!(status.cable_udp_segmentation, "{}: UDP segmentation turned off", c.cluster_id);
        let refused = status.cable_drops.get("send_refused").copied().unwrap_or(0);
        let dropped_here = loss_dropped(&c.gw_ns);
        assert!(
            refused >= dropped_here,
            "{}: {refused} datagrams counted refused, {dropped_here} sends dropped",
            c.cluster_id
        );
    }
    let (seen, late) = reordered_data_messages(&std::fs::read(&pcap).expect("the capture"));
    assert!(late > 10, "only {late} of {seen} data messages from A arrived after a later one");
    eprintln!(
        "60 MB intact with {dropped} tunnel sends dropped; {late} of {seen} captured A → B data \
         messages overtaken"
    );
}
