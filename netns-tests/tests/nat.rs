//! Gateways behind NAT routers (nftables masquerade in a namespace of their own, new flows
//! from outside dropped): each gateway learns its reflexive address from the broker's STUN
//! responder through the WireGuard socket and publishes it; the peers send handshakes to every
//! candidate and use the one that answers. One side behind a NAT: the other is reached
//! directly and the NATed one at its reflexive address. Both behind NATs: both send at once
//! and the NATs open (simultaneous open). The NAT's mappings flushed and moved to other ports
//! in the middle of a transfer: the tunnel follows and the bytes arrive intact. Both behind
//! hard NATs: the broker's relay, which sees only ciphertext. Both in sites that block UDP:
//! the relay again, over a stream on the broker's HTTPS port. Each test asserts the path kind
//! and the time to the first packet.
//! Privileged: `#[ignore]`d unless run with `--run-ignored all`, as `scripts/test.sh` does.

use std::{
    process::Stdio,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use causeway_netns::{
    NatKind, Topology, TopologySpec, causeway_bin,
    exec::{self, Bg},
    ready::{self, Proto},
    require_privileges,
    topology::wait_for,
};

static N: AtomicUsize = AtomicUsize::new(0);

/// Two clusters, those in `nat` behind NAT routers; broker and gateways started. Returns the
/// topology and the time from the gateways' start to the first pod-to-pod ping answered.
fn nat_topology(nat: &[usize], kind: NatKind) -> (Topology, Duration) {
    let prefix = format!("cwn{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
    let mut spec = TopologySpec::new(&prefix, 2, causeway_bin());
    spec.nat = nat.to_vec();
    spec.nat_kind = kind;
    let mut t = Topology::build(spec).expect("building the topology");
    t.start_broker().expect("starting the broker");
    let started = Instant::now();
    for i in 1..=2 {
        t.start_gateway(i).unwrap_or_else(|e| panic!("gateway {i}: {e:#}"));
    }
    let (a, b) = (t.clusters[0].clone(), t.clusters[1].clone());
    wait_for(Duration::from_secs(30), "the first ping from pod 1 to pod 2 answered", || {
        exec::in_ns(&a.pod_ns, &["ping", "-n", "-q", "-c", "1", "-W", "1", &b.pod_ip]).is_ok()
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway_logs(&t)));
    let first = started.elapsed();
    t.wait_connected(Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e:#}\n{}", gateway_logs(&t)));
    (t, first)
}

fn gateway_logs(t: &Topology) -> String {
    t.clusters
        .iter()
        .map(|c| {
            let log = std::fs::read_to_string(&c.gw_log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(25).collect();
            format!("--- {} ---\n{}", c.cluster_id, tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Gateway `i`'s view of its one connection: (endpoint, path).
fn connection(t: &Topology, i: usize) -> (String, String) {
    let s = t.gateway_status(i).unwrap();
    let c = &s.connections[0];
    (c.endpoint.clone(), c.path.clone().unwrap_or_default())
}

#[test]
#[ignore = "needs root and network namespaces; run with --run-ignored all"]
fn one_side_behind_an_easy_nat_is_reached_at_its_reflexive_address() {
    require_privileges!();
    let (t, first) = nat_topology(&[1], NatKind::Easy);
    eprintln!("time to the first packet, one side behind a NAT: {first:?}");
    assert!(first < Duration::from_secs(10), "first packet after {first:?}");
    let nat = t.clusters[0].nat_ip.clone().unwrap();
    // The STUN answer came through the NAT to the WireGuard socket: the masquerade kept the
    // port.
    wait_for(Duration::from_secs(10), "gateway 1 to know its reflexive address", || {
        t.gateway_status(1).unwrap().reflexive == Some(format!("{nat}:51820"))
    })
    .unwrap();
    assert_eq!(t.gateway_status(2).unwrap().reflexive, Some(format!("{}:51820", t.clusters[1].gw_ip)));
    // Each reaches the other directly: cluster 2 at its public address, cluster 1 through its
    // NAT's mapping.
    assert_eq!(connection(&t, 1), (format!("{}:51820", t.clusters[1].gw_ip), "direct-public".into()));
    assert_eq!(connection(&t, 2), (format!("{nat}:51820"), "direct-public".into()));
    let (a, b) = (&t.clusters[0], &t.clusters[1]);
    assert!(exec::ping(&b.pod_ns, &a.pod_ip, 3), "pod 2 → pod 1, into the NATed site");
    // The metric says the same.
    let metrics = t.gateway_metrics(2).unwrap();
    assert!(
        metrics.contains("causeway_connection_path{cluster=\"cluster-1\",path=\"direct-public\"} 1"),
        "{metrics}"
    );

    // The NAT forgets its mappings in the middle of a transfer and maps to other ports from
    // then on (a NAT that rebinds): cluster 2 follows the new mapping as soon as authenticated
    // traffic arrives from it, and the bytes arrive intact.
    let took = transfer_across(&t, |t| {
        let ns = t.nat_ns(1);
        exec::in_ns(&ns, &["nft", "flush", "chain", "ip", "causeway_nat", "outbound"]).unwrap();
        // UDP (the tunnel and STUN) to other ports; the rest (the broker's TCP) as before.
        for rule in [
            "add rule ip causeway_nat outbound oifname wan meta l4proto udp masquerade to :40000-40099",
            "add rule ip causeway_nat outbound oifname wan masquerade",
        ] {
            exec::in_ns(&ns, &["nft", rule]).unwrap();
        }
        exec::in_ns(&ns, &["conntrack", "-F"]).unwrap();
    });
    eprintln!("NAT rebound to other ports: the transfer finished {took:?} later");
    assert!(took < Duration::from_secs(8), "recovered only after {took:?}");
    let (endpoint, path) = connection(&t, 2);
    let port: u16 = endpoint.rsplit(':').next().unwrap().parse().unwrap();
    assert!(endpoint.starts_with(&format!("{nat}:")) && (40000..40100).contains(&port), "{endpoint}");
    assert_eq!(path, "direct-public");
}

/// 10 MB from pod 1 to pod 2 at 40 Mb/s, with `disturb` run 0.7 s into it: asserts the
/// bytes arrived intact and returns how long after the disturbance the transfer ended.
fn transfer_across(t: &Topology, disturb: impl FnOnce(&Topology)) -> Duration {
    let (a, b) = (&t.clusters[0], &t.clusters[1]);
    let bin = causeway_bin().display().to_string();
    let listen = format!("{}:9800", b.pod_ip);
    let sink = Bg::start(&b.pod_ns, &[&bin, "debug", "tcp-sink", "--listen", &listen], Stdio::piped());
    ready::wait_listening(&b.pod_ns, &listen, Proto::Tcp).unwrap();
    let source = Bg::start(
        &a.pod_ns,
        &[&bin, "debug", "tcp-source", "--connect", &listen, "--bytes", "10000000", "--mbps", "40"],
        Stdio::piped(),
    );
    std::thread::sleep(Duration::from_millis(700));
    let at = Instant::now();
    disturb(t);
    let sent = source.output();
    assert!(sent.contains("\"bytes\":10000000"), "{sent}");
    assert_eq!(sink.output(), sent, "length and SHA-256 match");
    at.elapsed()
}

#[test]
#[ignore = "needs root and network namespaces; run with --run-ignored all"]
fn both_sides_behind_easy_nats_open_a_direct_path_by_sending_at_once() {
    require_privileges!();
    let (t, first) = nat_topology(&[1, 2], NatKind::Easy);
    eprintln!("time to the first packet, both sides behind NATs: {first:?}");
    assert!(first < Duration::from_secs(10), "first packet after {first:?}");
    let (nat1, nat2) = (t.clusters[0].nat_ip.clone().unwrap(), t.clusters[1].nat_ip.clone().unwrap());
    // Neither gateway has an address the other could reach but its NAT's mapping: the
    // tunnel runs between the two reflexive addresses.
    assert_eq!(connection(&t, 1), (format!("{nat2}:51820"), "direct-public".into()));
    assert_eq!(connection(&t, 2), (format!("{nat1}:51820"), "direct-public".into()));
    let (a, b) = (t.clusters[0].clone(), t.clusters[1].clone());
    assert!(exec::ping(&b.pod_ns, &a.pod_ip, 3));

    // Both NATs forget every mapping in the middle of a transfer: both sides keep sending
    // (traffic and probes), so both NATs open again, on the same ports.
    let took = transfer_across(&t, |t| {
        for i in 1..=2 {
            exec::in_ns(&t.nat_ns(i), &["conntrack", "-F"]).unwrap();
        }
    });
    eprintln!("both NATs flushed: the transfer finished {took:?} later");
    assert!(took < Duration::from_secs(8), "recovered only after {took:?}");
    assert_eq!(connection(&t, 1), (format!("{nat2}:51820"), "direct-public".into()));
    assert_eq!(connection(&t, 2), (format!("{nat1}:51820"), "direct-public".into()));
}

#[test]
#[ignore = "needs root and network namespaces; run with --run-ignored all"]
fn both_sides_behind_hard_nats_talk_through_the_relay_then_go_direct_when_they_can() {
    require_privileges!();
    let (t, first) = nat_topology(&[1, 2], NatKind::Hard);
    eprintln!("time to the first packet, both sides behind hard NATs: {first:?}");
    assert!(first < Duration::from_secs(15), "first packet after {first:?}");
    // Every destination gets a new port at a hard NAT: the reflexive addresses are no use, and
    // both gateways use the broker's relay.
    let relay = "172.31.0.2:3478".to_owned();
    wait_for(Duration::from_secs(10), "both tunnels on the relay", || {
        connection(&t, 1) == (relay.clone(), "relayed".into())
            && connection(&t, 2) == (relay.clone(), "relayed".into())
    })
    .unwrap_or_else(|e| panic!("{e:#}: {:?} {:?}", connection(&t, 1), connection(&t, 2)));
    let (a, b) = (t.clusters[0].clone(), t.clusters[1].clone());
    assert!(exec::ping(&b.pod_ns, &a.pod_ip, 3));
    for i in 1..=2 {
        assert_eq!(t.gateway_status(i).unwrap().relay_transport.as_deref(), Some("udp"));
    }
    relay_sees_only_ciphertext(&t);
    // A transfer through the relay, intact.
    let took = transfer_across(&t, |_| {});
    eprintln!("10 MB at 40 Mb/s through the relay: {took:?} after the start mark");

    // The NATs become easy ones: the reflexive addresses (refreshed within 20 s) work now,
    // both sides check them, and the tunnels leave the relay.
    for i in 1..=2 {
        let ns = t.nat_ns(i);
        exec::in_ns(&ns, &["nft", "flush", "chain", "ip", "causeway_nat", "outbound"]).unwrap();
        exec::in_ns(&ns, &["nft", "add rule ip causeway_nat outbound oifname wan masquerade"]).unwrap();
        exec::in_ns(&ns, &["conntrack", "-F"]).unwrap();
    }
    let opened = Instant::now();
    let (nat1, nat2) = (a.nat_ip.clone().unwrap(), b.nat_ip.clone().unwrap());
    wait_for(Duration::from_secs(60), "both tunnels back on a direct path", || {
        connection(&t, 1) == (format!("{nat2}:51820"), "direct-public".into())
            && connection(&t, 2) == (format!("{nat1}:51820"), "direct-public".into())
    })
    .unwrap_or_else(|e| {
        panic!("{e:#}: {:?} {:?}\n{}", connection(&t, 1), connection(&t, 2), gateway_logs(&t))
    });
    eprintln!("direct again {:?} after the NATs allowed it", opened.elapsed());
    assert!(exec::ping(&b.pod_ns, &a.pod_ip, 3));
}

/// A pattern pinged from pod 2 to pod 1 shows in a capture of gateway 1's tunnel device
/// (plaintext), and nowhere in a capture at the broker, which relays it.
fn relay_sees_only_ciphertext(t: &Topology) {
    let (a, b) = (&t.clusters[0], &t.clusters[1]);
    let dir = t.spec.run_dir.clone();
    let (at_broker, at_tunnel) = (dir.join("broker.pcap"), dir.join("tunnel.pcap"));
    let pattern = "c0ffee15deadbeef";
    let cap = |ns: &str, dev: &str, file: &std::path::Path| {
        let c = Bg::start(
            ns,
            &["tcpdump", "-i", dev, "-U", "-n", "-s", "0", "-w", &file.display().to_string()],
            Stdio::null(),
        );
        ready::wait_capturing(file).unwrap();
        c
    };
    let broker_cap = cap(&t.broker_ns, "eth0", &at_broker);
    let tunnel_cap = cap(&a.gw_ns, &a.device, &at_tunnel);
    exec::in_ns(&b.pod_ns, &["ping", "-n", "-q", "-c", "5", "-i", "0.2", "-p", pattern, &a.pod_ip]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    broker_cap.interrupt();
    tunnel_cap.interrupt();
    let bytes: Vec<u8> =
        (0..pattern.len()).step_by(2).map(|i| u8::from_str_radix(&pattern[i..i + 2], 16).unwrap()).collect();
    let has = |file: &std::path::Path| {
        std::fs::read(file).unwrap().windows(bytes.len()).any(|w| w == bytes.as_slice())
    };
    assert!(has(&at_tunnel), "the pattern crossed the tunnel device (the capture works)");
    assert!(std::fs::metadata(&at_broker).unwrap().len() > 24 + 5 * 100, "the relay carried the pings");
    assert!(!has(&at_broker), "the relay saw the plaintext");
}

#[test]
#[ignore = "needs root and network namespaces; run with --run-ignored all"]
fn sites_that_block_udp_talk_through_the_relay_over_the_brokers_https_port() {
    require_privileges!();
    let (t, first) = nat_topology(&[1, 2], NatKind::Blocked);
    eprintln!("time to the first packet, both sites blocking UDP: {first:?}");
    // Three seconds of unanswered UDP to the relay, then the stream.
    assert!(first < Duration::from_secs(15), "first packet after {first:?}");
    let relay = "172.31.0.2:3478".to_owned();
    wait_for(Duration::from_secs(10), "both tunnels on the relay, over HTTPS", || {
        (1..=2).all(|i| {
            let s = t.gateway_status(i).unwrap();
            connection(&t, i) == (relay.clone(), "relayed".into())
                && s.relay.as_deref() == Some(relay.as_str())
                && s.relay_transport.as_deref() == Some("https")
        })
    })
    .unwrap_or_else(|e| {
        panic!("{e:#}: {:?} {:?}\n{}", connection(&t, 1), connection(&t, 2), gateway_logs(&t))
    });
    // Nothing learnt by STUN (no UDP leaves the site): no reflexive address.
    assert_eq!(t.gateway_status(1).unwrap().reflexive, None);
    let (a, b) = (t.clusters[0].clone(), t.clusters[1].clone());
    assert!(exec::ping(&b.pod_ns, &a.pod_ip, 3));
    relay_sees_only_ciphertext(&t);
    // Each site's NAT dropped the UDP its gateway tried (STUN, the relay, handshakes): the
    // tunnel really runs on the stream.
    for i in 1..=2 {
        let out =
            exec::in_ns(&t.nat_ns(i), &["nft", "list", "chain", "ip", "causeway_nat", "forwarding"]).unwrap();
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        let dropped: u64 = out
            .lines()
            .find(|l| l.contains("meta l4proto udp counter"))
            .and_then(|l| l.split_whitespace().skip_while(|w| *w != "packets").nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no UDP drop counter in {out}"));
        assert!(dropped > 0, "site {i} dropped no UDP: {out}");
    }
    let took = transfer_across(&t, |_| {});
    eprintln!("10 MB at 40 Mb/s through the relay over HTTPS: {took:?} after the start mark");
}

#[test]
#[ignore = "needs root and network namespaces; run with --run-ignored all"]
fn a_relay_run_on_a_node_with_a_public_address_carries_what_nothing_else_can() {
    require_privileges!();
    // Both gateways behind hard NATs, told to use a relay of the set's own on the underlay
    // (`causeway relay`, which asks the broker about every registration).
    let relay = "172.31.0.50:3478";
    let prefix = format!("cwn{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
    let mut spec = TopologySpec::new(&prefix, 2, causeway_bin());
    spec.nat = vec![1, 2];
    spec.nat_kind = NatKind::Hard;
    spec.gateway_args = vec!["--relay".into(), relay.into()];
    let mut t = Topology::build(spec).expect("building the topology");
    t.start_broker().expect("starting the broker");
    let ns = t.add_underlay_host("relay", "172.31.0.50").unwrap();
    let started = Instant::now();
    t.start_gateway(1).unwrap();
    let bin = causeway_bin().display().to_string();
    let creds = t.cluster_credentials(1).display().to_string();
    let _relay =
        Bg::start(&ns, &[&bin, "relay", "--listen", relay, "--broker-credentials", &creds], Stdio::null());
    t.start_gateway(2).unwrap();
    let (a, b) = (t.clusters[0].clone(), t.clusters[1].clone());
    wait_for(Duration::from_secs(30), "the first ping from pod 1 to pod 2 answered", || {
        exec::in_ns(&a.pod_ns, &["ping", "-n", "-q", "-c", "1", "-W", "1", &b.pod_ip]).is_ok()
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", gateway_logs(&t)));
    let first = started.elapsed();
    eprintln!("time to the first packet through a relay of the set's own: {first:?}");
    assert!(first < Duration::from_secs(20), "first packet after {first:?}");
    wait_for(Duration::from_secs(10), "both tunnels on the set's own relay", || {
        (1..=2).all(|i| {
            let s = t.gateway_status(i).unwrap();
            connection(&t, i) == (relay.to_owned(), "relayed".into())
                && s.relay.as_deref() == Some(relay)
                && s.relay_transport.as_deref() == Some("udp")
        })
    })
    .unwrap_or_else(|e| {
        panic!("{e:#}: {:?} {:?}\n{}", connection(&t, 1), connection(&t, 2), gateway_logs(&t))
    });
    // The relay answered STUN too: each gateway knows its NAT's mapping from it.
    for (i, c) in t.clusters.iter().enumerate() {
        let reflexive = t.gateway_status(i + 1).unwrap().reflexive.unwrap_or_default();
        assert!(reflexive.starts_with(&format!("{}:", c.nat_ip.clone().unwrap())), "{reflexive}");
    }
    assert!(exec::ping(&b.pod_ns, &a.pod_ip, 3));
    let took = transfer_across(&t, |_| {});
    eprintln!("10 MB at 40 Mb/s through the set's own relay: {took:?} after the start mark");
}
