//! The route agent on a node with two candidate gateways on its LAN: every remote prefix goes
//! through one nexthop, and switching the active gateway at the broker moves the very next
//! packet to the new gateway with one nexthop replace (the routes themselves do not change).
//! Privileged (network namespaces); the broker runs for real inside the node's namespace.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use causeway_broker_api::{ClusterRecord, EndpointRecord, GatewayRole, Record};
use causeway_netns::{
    causeway_bin,
    exec::{in_ns, in_ns_with_input, ip, run},
    require_privileges,
};

/// Namespace names unique to this test process, so two runs on one machine cannot collide.
static NAMES: std::sync::LazyLock<[String; 3]> = std::sync::LazyLock::new(|| {
    let pid = std::process::id();
    [format!("cwra{pid}-node"), format!("cwra{pid}-gw1"), format!("cwra{pid}-gw2")]
});

fn node() -> &'static str {
    &NAMES[0]
}

fn gw1() -> &'static str {
    &NAMES[1]
}

fn gw2() -> &'static str {
    &NAMES[2]
}

/// The broker's port: inside the node's own namespace, so no other process can hold it.
const BROKER_PORT: &str = "7790";
const REMOTE: &str = "10.9.0.1";

struct Cleanup(Vec<Child>, std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [node(), gw1(), gw2()] {
            let _ = run(&["ip", "netns", "del", ns]);
        }
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn build() {
    for ns in [node(), gw1(), gw2()] {
        let _ = run(&["ip", "netns", "del", ns]);
        run(&["ip", "netns", "add", ns]).unwrap();
        ip(ns, &["link", "set", "lo", "up"]).unwrap();
    }
    ip(node(), &["link", "add", "br0", "type", "bridge"]).unwrap();
    ip(node(), &["addr", "add", "192.168.50.10/24", "dev", "br0"]).unwrap();
    ip(node(), &["link", "set", "br0", "up"]).unwrap();
    for (ns, port, addr) in [(gw1(), "p1", "192.168.50.11/24"), (gw2(), "p2", "192.168.50.12/24")] {
        ip(node(), &["link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns]).unwrap();
        ip(node(), &["link", "set", port, "master", "br0", "up"]).unwrap();
        ip(ns, &["addr", "add", addr, "dev", "eth0"]).unwrap();
        ip(ns, &["link", "set", "eth0", "up"]).unwrap();
        // Both gateways answer for the remote address: which one gets a packet shows the path.
        ip(ns, &["addr", "add", &format!("{REMOTE}/32"), "dev", "lo"]).unwrap();
    }
}

/// UDP datagrams this namespace received for a port nobody listens on (`Udp: NoPorts`).
fn udp_no_ports(ns: &str) -> u64 {
    let snmp = String::from_utf8(in_ns(ns, &["cat", "/proc/net/snmp"]).unwrap().stdout).unwrap();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (names, values) = (udp.next().unwrap(), udp.next().unwrap());
    let i = names.split_whitespace().position(|n| n == "NoPorts").unwrap();
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

fn send_one_datagram() {
    in_ns(node(), &["bash", "-c", &format!("echo probe > /dev/udp/{REMOTE}/9")]).unwrap();
}

fn nexthop_via() -> String {
    let out = in_ns(node(), &["ip", "nexthop", "show", "id", "202001"])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    out.unwrap_or_default()
}

fn our_routes() -> String {
    String::from_utf8(in_ns(node(), &["ip", "route", "show", "proto", "202"]).unwrap().stdout).unwrap()
}

/// Our routes without what `ip` shows of their nexthop: prefix and nexthop id.
fn route_keys(routes: &str) -> Vec<String> {
    routes.lines().map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).collect()
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Instant::now()
}

fn put(dir: &std::path::Path, record: &Record) {
    let admin = dir.join("admin-credentials.json");
    in_ns_with_input(
        node(),
        &[causeway_bin().to_str().unwrap(), "debug", "put", "--credentials", admin.to_str().unwrap()],
        &[],
        serde_json::to_string(record).unwrap().as_bytes(),
    )
    .unwrap();
}

fn endpoint(host: &str, ip: &str, role: GatewayRole, generation: u64) -> Record {
    Record::Endpoint(EndpointRecord {
        cluster_id: "east".into(),
        hostname: host.into(),
        private_ips: vec![ip.parse().unwrap()],
        public_ips: vec![],
        port: 51820,
        public_key: "oL9ZAbBp+BhK4uWWrNgb4V1rBDVKtYwNJEU4UwQmLmA=".parse().unwrap(),
        backend: "wireguard".into(),
        role,
        priority: 0,
        health_check_ip: None,
        reachable: None,
        candidates: Vec::new(),
        generation,
    })
}

#[test]
#[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
fn switching_the_active_gateway_moves_the_next_packet() {
    require_privileges!();
    let dir = std::env::temp_dir().join(format!("cw-route-agent-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    build();
    let mut guard = Cleanup(Vec::new(), dir.clone());
    let bin = causeway_bin();
    let bin = bin.to_str().unwrap();
    let d = dir.to_str().unwrap();
    in_ns(
        node(),
        &[bin, "deploy-broker", "--local", "--data-dir", d, "--address", "127.0.0.1", "--port", BROKER_PORT],
    )
    .unwrap();
    let spawn = |args: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", node(), bin])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap()
    };
    guard.0.push(spawn(&[
        "broker",
        "--data-dir",
        d,
        "--listen",
        &format!("127.0.0.1:{BROKER_PORT}"),
        "--endpoint-lease-seconds",
        "600",
    ]));
    let info = dir.join("broker-info.json");
    let creds = dir.join("east.json");
    let joined = wait_for("the broker", || {
        in_ns(
            node(),
            &[
                bin,
                "join",
                info.to_str().unwrap(),
                "--cluster-id",
                "east",
                "--pod-cidr",
                "10.1.0.0/16",
                "--output",
                creds.to_str().unwrap(),
            ],
        )
        .is_ok()
    });
    let _ = joined;
    put(
        &dir,
        &Record::Cluster(ClusterRecord {
            cluster_id: "west".into(),
            pod_cidrs: vec!["10.9.0.0/16".parse().unwrap()],
            service_cidrs: vec!["10.109.0.0/16".parse().unwrap()],
            global_cidrs: Vec::new(),
            labels: Default::default(),
            generation: 1,
        }),
    );
    // West's gateway (on an address nobody here uses: only its existence matters to routing).
    put(
        &dir,
        &Record::Endpoint(EndpointRecord {
            cluster_id: "west".into(),
            hostname: "west-gw".into(),
            private_ips: vec!["172.31.0.9".parse().unwrap()],
            // A key of its own: the broker refuses one another cluster's gateway uses.
            public_key: causeway_broker_api::WireGuardKey([9; 32]),
            ..match endpoint("x", "172.31.0.9", GatewayRole::Active, 1) {
                Record::Endpoint(e) => e,
                _ => unreachable!(),
            }
        }),
    );
    put(&dir, &endpoint("gw-1", "192.168.50.11", GatewayRole::Active, 1));
    put(&dir, &endpoint("gw-2", "192.168.50.12", GatewayRole::Standby, 1));
    // Two more remote clusters: "south", one of whose prefixes the node already routes
    // (somebody else's route, which must survive), and "evil", whose /32 is this node's own
    // address (the broker cannot know node addresses; the agent must refuse it).
    for (id, pod, svc, gw, key) in [
        ("south", "10.8.0.0/16", "10.108.0.0/16", "172.31.0.8", [8u8; 32]),
        ("evil", "192.168.50.10/32", "10.107.0.0/16", "172.31.0.7", [7u8; 32]),
    ] {
        put(
            &dir,
            &Record::Cluster(ClusterRecord {
                cluster_id: id.into(),
                pod_cidrs: vec![pod.parse().unwrap()],
                service_cidrs: vec![svc.parse().unwrap()],
                global_cidrs: Vec::new(),
                labels: Default::default(),
                generation: 1,
            }),
        );
        let Record::Endpoint(mut e) = endpoint("x", gw, GatewayRole::Active, 1) else { unreachable!() };
        e.cluster_id = id.into();
        e.hostname = format!("{id}-gw");
        e.public_key = causeway_broker_api::WireGuardKey(key);
        put(&dir, &Record::Endpoint(e));
    }
    ip(node(), &["route", "add", "10.8.0.0/16", "via", "192.168.50.12"]).unwrap();
    ip(node(), &["route", "add", "default", "via", "192.168.50.12"]).unwrap();
    let foreign = || {
        let out = |args: &[&str]| String::from_utf8(in_ns(node(), args).unwrap().stdout).unwrap();
        (
            out(&["ip", "route", "show", "exact", "10.8.0.0/16"]),
            out(&["ip", "route", "show", "exact", "0.0.0.0/0"]),
        )
    };
    let foreign_before = foreign();
    assert!(foreign_before.0.contains("via 192.168.50.12") && foreign_before.1.contains("default via"));

    // Without node probes: this is about following the records (the gateways here are bare
    // namespaces, and every probe would count as a datagram at them).
    // `netns-tests/tests/failover.rs` runs the agent with probes against real gateways.
    guard.0.push(spawn(&[
        "route-agent",
        "--broker-credentials",
        creds.to_str().unwrap(),
        "--node-probe-port",
        "0",
    ]));
    wait_for("the nexthop via gw-1", || nexthop_via().contains("via 192.168.50.11"));
    wait_for("the remote routes", || {
        our_routes().contains("10.109.0.0/16") && our_routes().contains("10.108.0.0/16")
    });
    let routes = our_routes();
    assert!(
        routes.contains("10.9.0.0/16 nhid 202001") && routes.contains("10.109.0.0/16 nhid 202001"),
        "{routes}"
    );
    // Exactly west's and south's prefixes, less the one somebody else routes; nothing of evil's.
    assert_eq!(
        route_keys(&routes),
        ["10.9.0.0/16 nhid 202001", "10.108.0.0/16 nhid 202001", "10.109.0.0/16 nhid 202001"],
        "{routes}"
    );
    assert_eq!(foreign(), foreign_before, "routes Causeway did not create are left as they were");
    let (g1, g2) = (udp_no_ports(gw1()), udp_no_ports(gw2()));
    send_one_datagram();
    wait_for("the datagram at gw-1", || udp_no_ports(gw1()) == g1 + 1);
    assert_eq!(udp_no_ports(gw2()), g2);

    // Failover: gw-2 becomes active at the broker.
    put(&dir, &endpoint("gw-2", "192.168.50.12", GatewayRole::Active, 2));
    put(&dir, &endpoint("gw-1", "192.168.50.11", GatewayRole::Standby, 2));
    let switched = wait_for("the nexthop via gw-2", || nexthop_via().contains("via 192.168.50.12"));
    // The very next packet takes the new path.
    send_one_datagram();
    wait_for("the datagram at gw-2", || udp_no_ports(gw2()) == g2 + 1);
    assert_eq!(udp_no_ports(gw1()), g1 + 1, "nothing more reached gw-1");
    eprintln!(
        "switch observed; first packet after it went to gw-2 ({:?} after the switch)",
        switched.elapsed()
    );
    // The switch touched the nexthop only: the routes are the same ones, now shown via gw-2.
    assert_eq!(route_keys(&our_routes()), route_keys(&routes));
    assert!(our_routes().contains("via 192.168.50.12"));
    assert_eq!(foreign(), foreign_before, "a reconcile after the switch left them too");

    // A stopped agent takes its nexthop and routes with it.
    let agent = guard.0.pop().unwrap();
    run(&["kill", "-TERM", &agent.id().to_string()]).unwrap();
    guard.0.push(agent);
    wait_for("the routes to go", || our_routes().trim().is_empty() && nexthop_via().is_empty());
    assert_eq!(foreign(), foreign_before, "and so did the agent's own cleanup");
}
