//! Overlap mode end to end: three clusters made from one template (the same pod CIDR, the same
//! service CIDR, the same pod address in each), their gateways translating to the global
//! prefixes the broker allocated. Pods ping each other both ways at the global addresses; a
//! 12 MB TCP stream arrives with the sender's SHA-256 while the receiving cluster's gateway
//! is restarted under it; a capture on the tunnel device shows only global addresses; a port
//! unreachable error crosses the translation and reaches the sending socket; with
//! a smaller underlay, a pod learns the tunnel's path MTU from ICMP and the largest packet
//! that fits goes through the translation; a real route agent routes the global prefixes,
//! and a ClusterSetIP served by cluster 2 (exported at its global ClusterIP) answers.
//! Privileged: `#[ignore]`d unless run with `--run-ignored all`, as `scripts/test.sh` does.

use std::{process::Stdio, time::Duration};

use causeway_netns::{
    Topology, TopologySpec, causeway_bin, exec,
    exec::Bg,
    ready::{self, Proto},
    require_privileges,
    topology::wait_for,
};

const UNDERLAY_MTU: u16 = 1400;

#[test]
#[ignore = "needs root and network namespaces; run with --run-ignored all"]
fn clusters_with_the_same_cidrs_reach_each_other_at_their_global_prefixes() {
    require_privileges!();
    let prefix = format!("cwov{}", std::process::id());
    let mut spec = TopologySpec::new(&prefix, 3, causeway_bin());
    spec.overlapping = true;
    spec.underlay_mtu = UNDERLAY_MTU;
    let mut t = Topology::build(spec).expect("building the topology");
    let pods: Vec<String> = t.clusters.iter().map(|c| c.pod_ip.clone()).collect();
    assert!(pods.iter().all(|p| *p == pods[0]), "the template gives every pod one address: {pods:?}");
    assert!(t.clusters.iter().all(|c| c.pod_cidr == "10.1.0.0/16" && c.service_cidr == "10.101.0.0/16"));
    t.start_broker().expect("starting the broker");
    for i in 1..=3 {
        t.start_gateway(i).unwrap_or_else(|e| panic!("gateway {i}: {e:#}"));
    }
    t.wait_connected(Duration::from_secs(40)).unwrap_or_else(|e| {
        let log = std::fs::read_to_string(&t.clusters[0].gw_log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "{e:#}\ncluster 1's gateway, last lines:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    });
    let global: Vec<String> = (1..=3).map(|i| t.reach_ip(i).unwrap()).collect();
    for (i, g) in global.iter().enumerate() {
        assert!(g.starts_with("242."), "cluster {}'s pod at {g}", i + 1);
        assert!(g.ends_with(&pods[0][pods[0].find(".2.").unwrap()..]), "host bits kept: {g} for {}", pods[0]);
    }
    assert!(global[0] != global[1] && global[1] != global[2] && global[0] != global[2], "{global:?}");

    // Both ways, every pair.
    wait_for(Duration::from_secs(20), "every pod reaching every other at its global address", || {
        let m = t.connectivity_matrix();
        m.iter().all(|row| row.iter().all(|ok| *ok))
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", t.render_matrix(&t.connectivity_matrix()).0));

    // What crosses cluster 1's tunnel device carries global addresses only (the capture is
    // of the plaintext side: the device between the kernel and the cable).
    let (a, b) = (t.clusters[0].clone(), t.clusters[1].clone());
    let pcap = t.spec.run_dir.join("tunnel.pcap").display().to_string();
    let tcpdump = Bg::start(
        &a.gw_ns,
        &["tcpdump", "-i", &a.device, "-U", "-n", "-s", "128", "-w", &pcap, "ip"],
        Stdio::null(),
    );
    ready::wait_capturing(std::path::Path::new(&pcap)).unwrap();
    assert!(exec::ping(&a.pod_ns, &global[1], 3));
    assert!(exec::ping(&b.pod_ns, &global[0], 3));

    // 12 MB from cluster 1's pod to cluster 2's, while cluster 2's gateway is stopped and
    // started again (its pinned programs and translation tries carry on without it).
    let bin = causeway_bin().display().to_string();
    let listen = format!("{}:9700", b.pod_ip);
    let sink = Bg::start(&b.pod_ns, &[&bin, "debug", "tcp-sink", "--listen", &listen], Stdio::piped());
    ready::wait_listening(&b.pod_ns, &listen, Proto::Tcp).unwrap();
    let target = format!("{}:9700", global[1]);
    let source = Bg::start(
        &a.pod_ns,
        &[&bin, "debug", "tcp-source", "--connect", &target, "--bytes", "12000000", "--mbps", "40"],
        Stdio::piped(),
    );
    std::thread::sleep(Duration::from_millis(800));
    t.stop_gateway(2).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    t.start_gateway(2).unwrap();
    let sent = source.output();
    let received = sink.output();
    assert!(sent.contains("\"bytes\":12000000"), "{sent}");
    assert_eq!(received.trim(), sent.trim(), "length and SHA-256 match across the restart");
    tcpdump.interrupt();

    let out = exec::run(&["tcpdump", "-r", &pcap, "-n", "ip"]).unwrap();
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
    assert!(lines.len() > 100, "the capture saw the traffic: {} packets", lines.len());
    let real = "10.1.";
    let leaked: Vec<&String> = lines.iter().filter(|l| l.contains(&format!(" {real}"))).collect();
    assert!(leaked.is_empty(), "real addresses on the tunnel: {:?}", &leaked[..leaked.len().min(5)]);
    assert!(lines.iter().any(|l| l.contains(&global[0]) && l.contains(&global[1])), "{:?}", &lines[..3]);

    // An ICMP error crosses the translation both ways: cluster 2's pod answers a datagram to
    // a closed port with "port unreachable", quoting it; cluster 2's gateway moves the error's
    // source and the quoted destination to global, cluster 1's moves the error's destination
    // and the quoted source back, and the sending socket, connected to the global address,
    // recognises its datagram: the next write fails with "Connection refused".
    let script = format!("exec 3<>/dev/udp/{}/9999 && echo a >&3 && sleep 0.5 && echo b >&3", global[1]);
    let refused = std::process::Command::new("ip")
        .args(["netns", "exec", &a.pod_ns, "bash", "-c", &script])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(!refused.status.success() && said.contains("Connection refused"), "{said}");

    // Path MTU: the tunnel is smaller than the pod's link. A don't-fragment packet one byte
    // too big is answered with the tunnel's MTU; the largest that fits crosses the
    // translation both ways.
    let mtu = tunnel_mtu(&t, 1);
    let payload = |total: u16| (total - 28).to_string();
    let ping = |size: String, count: &str| {
        std::process::Command::new("ip")
            .args([
                "netns", "exec", &a.pod_ns, "ping", "-c", count, "-W", "2", "-M", "do", "-s", &size,
                &global[1],
            ])
            .output()
            .unwrap()
    };
    let too_big = ping(payload(mtu + 1), "2");
    let said =
        format!("{}{}", String::from_utf8_lossy(&too_big.stdout), String::from_utf8_lossy(&too_big.stderr));
    assert!(!too_big.status.success(), "{said}");
    assert!(said.contains(&format!("mtu={mtu}")) || said.contains(&format!("mtu = {mtu}")), "{said}");
    let fits = ping(payload(mtu), "3");
    assert!(fits.status.success(), "{}", String::from_utf8_lossy(&fits.stdout));

    // Cluster 1's worker gets its real route agent: it routes the other clusters' global
    // prefixes (not their CIDRs, which are its own), and its socket programs send a
    // ClusterSetIP served by cluster 2 to cluster 2's global ClusterIP.
    t.start_route_agent(1).unwrap();
    wait_for(Duration::from_secs(20), "cluster 1's pod routed by its agent to the global prefixes", || {
        exec::ping(&a.pod_ns, &global[1], 1) && exec::ping(&a.pod_ns, &global[2], 1)
    })
    .unwrap();
    let routes = exec::run(&["ip", "-n", &a.node_ns, "route", "show", "proto", "202"]).unwrap();
    let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
    assert!(routes.contains("242.") && !routes.contains("10.1.0.0/16"), "{routes}");
    t.start_dns(1).unwrap();
    let svc = t.serve(2, "echo", 7).unwrap();
    t.export(&svc, "demo").unwrap();
    let mut vip = String::new();
    wait_for(Duration::from_secs(10), "echo.demo resolving to its ClusterSetIP", || {
        vip = t
            .pod_exec(1, &["dig", "+short", "+time=1", "echo.demo.svc.clusterset.local", "A"])
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        vip.starts_with("241.")
    })
    .unwrap();
    let script = format!("exec 3<>/dev/tcp/{vip}/7 && read -r line <&3 && echo $line");
    wait_for(Duration::from_secs(10), "the ClusterSetIP answered by cluster 2", || {
        t.pod_exec(1, &["timeout", "3", "bash", "-c", &script])
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "cluster-2")
    })
    .unwrap();
}

/// The MTU of cluster `index`'s tunnel device.
fn tunnel_mtu(t: &Topology, index: usize) -> u16 {
    let c = &t.clusters[index - 1];
    let out = exec::run(&["ip", "-n", &c.gw_ns, "-o", "link", "show", "dev", &c.device]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mtu = text.split_whitespace().skip_while(|w| *w != "mtu").nth(1).expect("an MTU");
    mtu.parse().unwrap()
}

/// A failover keeps every flow: cluster 2 (the same CIDRs as cluster 1) gets a standby gateway,
/// which loads the same translation from the same record. Cluster 2's active gateway is
/// killed while a datagram stream and a TCP transfer run to its pod's global address; the
/// stream reaches its end through the standby and the transfer arrives whole.
#[test]
#[ignore = "needs root and network namespaces; run with --run-ignored all"]
fn a_failover_keeps_translated_flows() {
    require_privileges!();
    let prefix = format!("cwovf{}", std::process::id());
    let mut spec = TopologySpec::new(&prefix, 2, causeway_bin());
    spec.overlapping = true;
    let mut t = Topology::build(spec).expect("building the topology");
    t.start_broker().expect("starting the broker");
    t.start_gateway(1).expect("gateway 1");
    t.start_gateway(2).expect("gateway 2");
    t.wait_connected(Duration::from_secs(30)).expect("tunnels up");
    let sb = t.start_standby_gateway(2).expect("cluster 2's standby");
    t.start_route_agent(2).expect("cluster 2's route agent");
    let (a, b) = (t.clusters[0].clone(), t.clusters[1].clone());
    let to = t.reach_ip(2).unwrap();
    wait_for(Duration::from_secs(30), "cluster 1's pod reaching cluster 2's through its agent", || {
        t.worker_nexthop(2).contains("via 172.20.2.1 ") && exec::ping(&a.pod_ns, &to, 1)
    })
    .unwrap();
    let endpoint = format!("{}:51820", sb.ip);
    wait_for(Duration::from_secs(30), "gateway 1's probes of cluster-2's standby answered", || {
        t.gateway_status(1).is_ok_and(|s| {
            s.standbys
                .iter()
                .any(|x| x.cluster_id == "cluster-2" && x.endpoint == endpoint && x.status == "connected")
        })
    })
    .unwrap_or_else(|e| panic!("{e:#}; standby log: {}", sb.log.display()));

    let bin = causeway_bin().display().to_string();
    let listen = format!("{}:9200", b.pod_ip);
    let sink = Bg::start(&b.pod_ns, &[&bin, "debug", "tcp-sink", "--listen", &listen], Stdio::piped());
    ready::wait_listening(&b.pod_ns, &listen, Proto::Tcp).unwrap();
    let target = format!("{to}:9200");
    let source = Bg::start(
        &a.pod_ns,
        &[&bin, "debug", "tcp-source", "--connect", &target, "--bytes", "6000000", "--mbps", "8"],
        Stdio::piped(),
    );
    let s = t
        .sequence_stream((1, 2), (200, 8), Duration::from_secs(2), |t| {
            t.fail_gateway(2, causeway_netns::topology::Failure::Kill).unwrap()
        })
        .unwrap();
    eprintln!("failover with translation: {s:?}");
    let (sent, received) = (source.output(), sink.output());
    assert!(sent.contains("\"bytes\":6000000"), "the TCP transfer broke: {sent:?}");
    assert_eq!(received, sent, "the TCP transfer arrived damaged");
    assert_eq!(s.last_seq, Some(200 * 8 - 1), "the stream did not get through to the end: {s:?}");
    assert!(s.max_gap_ms < 3_000.0, "a gap of {} ms", s.max_gap_ms);
    assert!(t.worker_nexthop(2).contains("via 172.21.2.1 "), "{}", t.worker_nexthop(2));
    let carrier = t.gateway_status(1).unwrap();
    let c = carrier.connections.iter().find(|c| c.cluster_id == "cluster-2").unwrap();
    assert_eq!(c.endpoint, endpoint, "cluster 2 is carried by its standby");
}
