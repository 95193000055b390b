//! ClusterSetIPs end to end, on three clusters with real route agents (their socket programs
//! attached to each cluster's pod cgroup): cluster 1's pod resolves a service exported by
//! clusters 2 and 3 through cluster-set DNS and connects to its ClusterSetIP. 100 connections
//! are all answered, by both clusters; a connection opened earlier stays on its backend while
//! the backend list changes; cluster 2's tunnel is cut and new connections all reach cluster
//! 3 within a bound, and `show services` says no cluster reaches cluster 2; healed, both
//! again. A pod on cluster 1's gateway node (no route agent
//! there) reaches it through the gateway's own socket programs. The route agent is
//! killed and its pinned programs keep translating; restarted, it takes them over. Once
//! cluster 1 serves the name itself, its connections stay local.
//! Privileged: `#[ignore]`d unless run with `--run-ignored all`, as `scripts/test.sh` does.

use std::{
    collections::BTreeMap,
    process::Stdio,
    time::{Duration, Instant},
};

use causeway_netns::{
    Topology, TopologySpec, causeway_bin, exec, require_privileges,
    topology::{Failure, wait_for},
};

/// `n` connections from cluster 1's pod to `addr`, each reading the banner within 2 s:
/// banner → count ("failed" for a connection that got none). A connection made while a dead
/// cluster was still a backend (inside the detection time) fails by the timeout instead of
/// hanging in SYN retries.
fn connect_many(t: &Topology, addr: &str, n: usize) -> BTreeMap<String, usize> {
    let script = connect_script(addr, n);
    let out =
        t.pod_exec(1, &["bash", "-c", &script]).map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    count_lines(&out.unwrap_or_default())
}

/// The same from a pod on cluster 1's gateway node (where the gateway's own socket programs
/// translate: no route agent runs on a gateway node).
fn connect_many_from_gateway_node(t: &mut Topology, addr: &str, n: usize) -> BTreeMap<String, usize> {
    let script = connect_script(addr, n);
    let ns = t.gateway_pod(1).unwrap();
    let cmd = t.gateway_pod_command(1, &["bash", "-c", &script]).unwrap();
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let out = exec::in_ns(&ns, &cmd).map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    count_lines(&out.unwrap_or_default())
}

fn connect_script(addr: &str, n: usize) -> String {
    let (host, port) = addr.split_once(':').unwrap();
    let one = format!("exec 3<>/dev/tcp/{host}/{port} && read -r line <&3 && echo $line");
    format!("for i in $(seq {n}); do timeout 2 bash -c '{one}' 2>/dev/null || echo failed; done")
}

/// The REACHED BY cell of `causeway show services` for demo/echo, as the operator sees it
/// (the gateways' connection summaries through the broker).
fn reached_by(t: &Topology) -> String {
    let admin = t.admin_credentials().display().to_string();
    let out = t.causeway(1, &["show", "services", "--credentials", &admin]).unwrap_or_default();
    out.lines()
        .find(|l| l.starts_with("demo ") && l.contains("echo"))
        .and_then(|l| l.split("  ").map(str::trim).filter(|c| !c.is_empty()).last().map(str::to_owned))
        .unwrap_or_else(|| format!("no import row in:\n{out}"))
}

/// Programs attached to `cgroup`, as `bpftool` lists them.
fn attached_programs(cgroup: &std::path::Path) -> usize {
    let out = exec::run(&["bpftool", "cgroup", "show", &cgroup.display().to_string()]).unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("service_")).count()
}

fn count_lines(out: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for line in out.lines() {
        *counts.entry(line.to_owned()).or_default() += 1;
    }
    counts
}

#[test]
#[ignore = "needs root and network namespaces; run with --run-ignored all"]
fn connections_to_a_clusterset_ip_reach_healthy_clusters_and_stay_on_their_backend() {
    require_privileges!();
    let prefix = format!("cwcs{}", std::process::id());
    let mut t =
        Topology::build(TopologySpec::new(&prefix, 3, causeway_bin())).expect("building the topology");
    t.start_broker().expect("starting the broker");
    for i in 1..=3 {
        t.start_gateway(i).unwrap_or_else(|e| panic!("gateway {i}: {e:#}"));
    }
    t.wait_connected(Duration::from_secs(40)).expect("tunnels up");
    for i in 1..=3 {
        t.start_route_agent(i).unwrap_or_else(|e| panic!("route agent {i}: {e:#}"));
    }
    let agent_log = t.spec.run_dir.join("c1-agent.log");
    wait_for(Duration::from_secs(30), "cluster 1's worker routing through its route agent", || {
        exec::ping(&t.clusters[0].pod_ns, &t.clusters[1].pod_ip, 1)
            && exec::ping(&t.clusters[0].pod_ns, &t.clusters[2].pod_ip, 1)
    })
    .unwrap_or_else(|e| {
        panic!("{e:#}; agent log: {}", std::fs::read_to_string(&agent_log).unwrap_or_default())
    });
    t.start_dns(1).expect("cluster 1's DNS");

    // Cluster 3 serves demo/echo first.
    let svc = t.serve(3, "echo", 7).unwrap();
    t.export(&svc, "demo").unwrap();
    let mut vip = String::new();
    wait_for(Duration::from_secs(10), "echo.demo resolving to its ClusterSetIP", || {
        vip = t
            .pod_exec(1, &["dig", "+short", "+time=1", "echo.demo.svc.clusterset.local", "A"])
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        vip.starts_with("241.0.")
    })
    .unwrap();
    let addr = format!("{vip}:7");
    wait_for(Duration::from_secs(10), "the ClusterSetIP answered by cluster 3", || {
        connect_many(&t, &addr, 1).contains_key("cluster-3")
    })
    .unwrap_or_else(|e| panic!("{e:#}; agent log {}", agent_log.display()));

    // A long connection, opened while only cluster 3 serves: it must stay there.
    let fifo = t.spec.run_dir.join("go");
    exec::run(&["mkfifo", &fifo.display().to_string()]).unwrap();
    let (host, port) = addr.split_once(':').unwrap();
    let script = format!(
        "exec 3<>/dev/tcp/{host}/{port}; read -r b <&3; echo $b; read -r go < {}; echo ping >&3; read -r -t 3 r <&3; echo $r",
        fifo.display()
    );
    let long_cmd = t.pod_command(1, &["bash", "-c", &script]).unwrap();
    let long_cmd: Vec<&str> = long_cmd.iter().map(String::as_str).collect();
    let long = exec::Bg::start(&t.clusters[0].pod_ns, &long_cmd, Stdio::piped());

    // Cluster 2 serves it too: 100 connections, every one answered, by both.
    let svc = t.serve(2, "echo", 7).unwrap();
    t.export(&svc, "demo").unwrap();
    wait_for(Duration::from_secs(10), "cluster 2 among the backends", || {
        connect_many(&t, &addr, 6).contains_key("cluster-2")
    })
    .unwrap();
    let counts = connect_many(&t, &addr, 100);
    assert_eq!(counts.values().sum::<usize>(), 100, "{counts:?}");
    assert!(!counts.contains_key("failed"), "every connection answered: {counts:?}");
    assert!(counts.get("cluster-2").copied().unwrap_or(0) >= 20, "{counts:?}");
    assert!(counts.get("cluster-3").copied().unwrap_or(0) >= 20, "{counts:?}");

    // A pod on cluster 1's gateway node reaches it too, through the gateway's programs.
    let counts = connect_many_from_gateway_node(&mut t, &addr, 20);
    assert_eq!(counts.values().sum::<usize>(), 20, "{counts:?}");
    assert!(!counts.contains_key("failed"), "every connection from the gateway node answered: {counts:?}");
    assert!(counts.contains_key("cluster-2") && counts.contains_key("cluster-3"), "{counts:?}");

    // Cluster 2's tunnel is cut: within the bound, new connections all reach cluster 3.
    let cut = Instant::now();
    t.fail_gateway(2, Failure::Link).unwrap();
    let mut last = BTreeMap::new();
    // When the first round that went all to cluster 3 began: by then cluster 2 was out.
    let mut clean_from = Duration::ZERO;
    wait_for(Duration::from_secs(5), "new connections all on cluster 3", || {
        clean_from = cut.elapsed();
        last = connect_many(&t, &addr, 10);
        last == BTreeMap::from([("cluster-3".to_owned(), 10)])
    })
    .map_err(|e| e.context(format!("last round: {last:?}")))
    .unwrap_or_else(|e| {
        panic!("{e:#}; agent log: {}", std::fs::read_to_string(&agent_log).unwrap_or_default())
    });
    eprintln!(
        "new connections avoided cluster 2 from {} ms after its uplink went down (rounds of 10, 2 s timeout each)",
        clean_from.as_millis()
    );
    let counts = connect_many(&t, &addr, 30);
    assert_eq!(counts, BTreeMap::from([("cluster-3".to_owned(), 30)]));
    // The operator sees it too: no other cluster reaches cluster 2, both reach cluster 3.
    let mut cell = String::new();
    wait_for(Duration::from_secs(5), "show services saying cluster 2 is unreached", || {
        cell = reached_by(&t);
        cell == "cluster-3 2/2, cluster-2 0/2"
    })
    .map_err(|e| e.context(format!("REACHED BY: {cell}")))
    .unwrap();

    // The long connection is still on cluster 3, and still works.
    std::fs::write(&fifo, "go\n").unwrap();
    let out = long.output();
    assert_eq!(out.lines().collect::<Vec<_>>(), ["cluster-3", "ping"], "the long connection: {out}");

    // Healed: both again.
    t.heal_gateway(2).unwrap();
    wait_for(Duration::from_secs(20), "cluster 2 back among the backends", || {
        connect_many(&t, &addr, 10).contains_key("cluster-2")
    })
    .unwrap();
    wait_for(Duration::from_secs(5), "show services saying cluster 2 is reached again", || {
        cell = reached_by(&t);
        cell == "cluster-3 2/2, cluster-2 2/2"
    })
    .map_err(|e| e.context(format!("REACHED BY: {cell}")))
    .unwrap();

    // The route agent crashes: its pinned programs keep translating while it is gone, and the
    // next run takes them over (still four programs on the cgroup, not eight).
    t.kill_route_agent(1).unwrap();
    let counts = connect_many(&t, &addr, 10);
    assert_eq!(counts.values().sum::<usize>(), 10, "{counts:?}");
    assert!(!counts.contains_key("failed"), "translation stopped with the agent: {counts:?}");
    let agent_log = t.restart_route_agent(1).unwrap();
    wait_for(Duration::from_secs(10), "the restarted agent's socket programs", || {
        std::fs::read_to_string(&agent_log).is_ok_and(|l| l.contains("socket programs attached"))
    })
    .unwrap();
    assert_eq!(attached_programs(&t.pod_cgroup(1).unwrap()), 4, "the first run's programs were not replaced");
    let counts = connect_many(&t, &addr, 10);
    assert!(!counts.contains_key("failed"), "after the restart: {counts:?}");

    // Cluster 1 serves the name too: its own connections stay in the cluster (the restarted
    // agent writes the map it took over), on the gateway node as on the worker.
    let svc = t.serve(1, "echo", 7).unwrap();
    t.export(&svc, "demo").unwrap();
    wait_for(Duration::from_secs(10), "local preference", || {
        connect_many(&t, &addr, 20) == BTreeMap::from([("cluster-1".to_owned(), 20)])
    })
    .unwrap();
    wait_for(Duration::from_secs(10), "local preference on the gateway node", || {
        connect_many_from_gateway_node(&mut t, &addr, 10) == BTreeMap::from([("cluster-1".to_owned(), 10)])
    })
    .unwrap();
}
