//! The route agent, for the nodes of a cluster that are not gateways: it routes every remote
//! cluster's prefixes through one nexthop that points at a gateway node of the cluster.
//!
//! What to route comes from the broker (the same [`desired`] the gateways compute, so a node
//! routes exactly the prefixes its gateway tunnels). Which gateway the control plane names
//! comes from the broker's endpoint records of this cluster, or from a caller-supplied source
//! (the Kubernetes Lease). The node does not wait for it when that gateway fails: it probes
//! every gateway node of its cluster ([`node_probe`]) and runs the same
//! [`Switch`](crate::failover::Switch) as the gateways, so it leaves a gateway that stops
//! answering (or says it no longer forwards) within the detection time, and comes back to the
//! named one once it has answered for the hold-down. A failover is one nexthop replace; the
//! routes do not change.

use std::{
    collections::BTreeSet,
    future::Future,
    net::IpAddr,
    time::{Duration, Instant},
};

use causeway_broker_api::{BrokerClient, GatewayRole, Object, Record, Reflector};
use ipnetwork::IpNetwork;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    desired::{LocalFacts, desired},
    failover::{Candidate, Liveness, Reason, Switch, Timers},
    node_probe::Prober,
    route::{Netlink, RouteError, node::NodeRoutes},
    services::{ServiceConfig, Translator},
};

/// What a node should have.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeView {
    pub remote_prefixes: BTreeSet<IpNetwork>,
    /// The node address of this cluster's active gateway, as its endpoint record says.
    pub active_gateway: Option<IpAddr>,
    /// Every gateway node of this cluster (its first node address) with its priority.
    pub gateways: Vec<(IpAddr, u32)>,
}

/// The node's view of the records. Among several endpoints marked active (a failover in
/// progress), the most recently written wins; with none (the active gateway died and its
/// endpoint lease at the broker lapsed), the standby the gateways of other clusters pick too:
/// the highest priority, then the lowest host name.
#[must_use]
pub fn node_view(objects: &[Object], local_cluster: &str, facts: &LocalFacts) -> NodeView {
    let ours = || {
        objects.iter().filter_map(|o| match &o.record {
            Record::Endpoint(e) if e.cluster_id == local_cluster => {
                e.private_ips.first().map(|ip| (o.resource_version, e, *ip))
            }
            _ => None,
        })
    };
    let active_gateway = ours()
        .filter(|(_, e, _)| e.role == GatewayRole::Active)
        .max_by_key(|(rv, _, _)| *rv)
        .or_else(|| {
            ours().filter(|(_, e, _)| e.role == GatewayRole::Standby).max_by(|(_, a, _), (_, b, _)| {
                a.priority.cmp(&b.priority).then_with(|| b.hostname.cmp(&a.hostname))
            })
        })
        .map(|(_, _, ip)| ip);
    let mut gateways: Vec<(IpAddr, u32)> = ours().map(|(_, e, ip)| (ip, e.priority)).collect();
    gateways.sort_unstable();
    gateways.dedup_by_key(|(ip, _)| *ip);
    NodeView { remote_prefixes: desired(objects, local_cluster, facts).routes(), active_gateway, gateways }
}

/// Which gateway node this node routes through (sans IO: the probes' answers and the clock are
/// passed in).
#[derive(Debug, Default)]
pub struct NodeFailover {
    pub prober: Prober,
    switch: Switch<IpAddr>,
}

impl NodeFailover {
    /// The gateway to route through at `now`: the control plane's pick (`authority`; without
    /// one, the gateway with the highest priority) unless the switch has moved off it. When no
    /// gateway answers at all (gateways without a probe responder, a firewall in between,
    /// every gateway cut off) the control plane's pick, as if there were no probes.
    pub fn choose(
        &mut self,
        authority: Option<IpAddr>,
        gateways: &[(IpAddr, u32)],
        now: Instant,
    ) -> Option<IpAddr> {
        let authority = authority.or_else(|| gateways.iter().max_by_key(|(_, p)| *p).map(|(ip, _)| *ip))?;
        let mut candidates: Vec<Candidate<IpAddr>> = gateways
            .iter()
            .map(|(ip, priority)| {
                let e = self.prober.evidence(*ip);
                Candidate {
                    key: *ip,
                    priority: *priority,
                    probing_since: e.probing_since,
                    last_answer: e.last_answer,
                }
            })
            .collect();
        if !candidates.iter().any(|c| c.key == authority) {
            let e = self.prober.evidence(authority);
            candidates.push(Candidate {
                key: authority,
                priority: 0,
                probing_since: e.probing_since,
                last_answer: e.last_answer,
            });
        }
        let t = Timers::DEFAULT;
        if let Some(c) = self.switch.decide(authority, &candidates, now, &t) {
            if c.reason == Reason::Initial {
                debug!(gateway = %c.to, "first gateway");
            } else {
                info!(from = ?c.from, to = %c.to, reason = c.reason.as_str(), provisional = c.to != authority,
                    "this node's gateway changed");
            }
        }
        if !candidates.iter().any(|c| c.liveness(now, &t) == Liveness::Alive) {
            return Some(authority);
        }
        self.switch.carrier()
    }

    /// The gateways to probe now: every gateway node of the cluster and the control plane's
    /// pick.
    #[must_use]
    pub fn targets(authority: Option<IpAddr>, gateways: &[(IpAddr, u32)]) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = gateways.iter().map(|(ip, _)| *ip).chain(authority).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("broker: {0}")]
    Broker(String),
    #[error("opening the node probe socket: {0}")]
    Probe(#[source] std::io::Error),
    #[error("ClusterSetIP socket programs: {0}")]
    Services(#[source] causeway_datapath::DatapathError),
}

struct Agent {
    routes: NodeRoutes,
    applied: NodeView,
    /// Nexthop replacements after the first.
    nexthop_changes: u64,
}

/// What the route agent reports on `/metrics` and `/healthz`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentReport {
    /// The gateway node the nexthop points at.
    pub gateway: Option<IpAddr>,
    /// The gateway node the control plane names.
    pub authority: Option<IpAddr>,
    /// Each gateway node of the cluster, and whether it answers the node's probes.
    pub gateways: Vec<(IpAddr, bool)>,
    /// Nexthop replacements after the first (failovers and moves of the authority).
    pub nexthop_changes: u64,
    /// Remote prefixes routed through the nexthop.
    pub routes: usize,
    /// Whether the records have been read from the broker at least once.
    pub synced: bool,
}

/// Prometheus exposition (OpenMetrics) of the agent's report.
#[must_use]
pub fn render_agent_metrics(r: &AgentReport) -> String {
    use causeway_metrics::Family;
    causeway_metrics::render(vec![
        Family::gauge(
            "causeway_node_nexthop",
            "1 for the gateway node this node's remote-cluster routes go through",
        )
        .each(r.gateway, |ip| Some((vec![("gateway", ip.to_string())], 1u64))),
        Family::gauge(
            "causeway_node_gateway_answering",
            "1 while a gateway node of this cluster answers this node's probes saying it forwards",
        )
        .each(&r.gateways, |(ip, up)| Some((vec![("gateway", ip.to_string())], *up))),
        Family::counter(
            "causeway_node_nexthop_changes_total",
            "Times the nexthop moved to another gateway node (failovers and moves of the active gateway)",
        )
        .with(&[], r.nexthop_changes),
        Family::gauge("causeway_node_routes", "Remote-cluster prefixes routed through the nexthop")
            .with(&[], r.routes),
        Family::gauge("causeway_node_synced", "1 once the records have been read from the broker")
            .with(&[], r.synced),
    ])
}

/// How long the agent's loop may go without a turn before `/healthz` fails (it turns every
/// 50 ms).
pub const AGENT_STALL: Duration = Duration::from_secs(5);

/// Serves `/metrics` and `/healthz` for the route agent on `addr`. `/healthz` fails once the
/// loop has not turned for [`AGENT_STALL`].
pub async fn serve_agent_metrics(
    addr: std::net::SocketAddr,
    report: watch::Receiver<(Instant, AgentReport)>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use axum::{Router, extract::State, http::StatusCode, routing::get};
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(%addr, "route agent metrics listening");
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(r): State<watch::Receiver<(Instant, AgentReport)>>| async move {
                let text = render_agent_metrics(&r.borrow().1);
                ([(axum::http::header::CONTENT_TYPE, causeway_metrics::CONTENT_TYPE)], text)
            }),
        )
        .route(
            "/healthz",
            get(|State(r): State<watch::Receiver<(Instant, AgentReport)>>| async move {
                let since = r.borrow().0.elapsed();
                if since < AGENT_STALL {
                    (StatusCode::OK, "ok\n".to_owned())
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("the agent's loop has not turned for {since:?}\n"),
                    )
                }
            }),
        )
        .with_state(report);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!(error = %e, "route agent metrics server stopped");
        }
    }))
}

impl Agent {
    /// Points the nexthop at `gateway` if it moved; syncs the routes when `sync` (the records
    /// changed) or when the first nexthop was just made.
    async fn apply(&mut self, view: &NodeView, gateway: Option<IpAddr>, sync: bool) {
        let first = self.applied.active_gateway.is_none();
        if let Some(gw) = gateway
            && (self.applied.active_gateway != Some(gw))
        {
            match self.routes.set_gateway(gw).await {
                Ok(()) => {
                    info!(gateway = %gw, "nexthop points at this gateway node");
                    if self.applied.active_gateway.is_some() {
                        self.nexthop_changes += 1;
                    }
                    self.applied.active_gateway = Some(gw);
                }
                Err(e) => {
                    warn!(error = %e, gateway = %gw, "pointing the nexthop at the gateway failed")
                }
            }
        }
        if self.applied.active_gateway.is_none() {
            // Nothing to route through yet; keep whatever a previous run left until we know.
            return;
        }
        if !(sync || first) {
            return;
        }
        match self.routes.sync(&view.remote_prefixes).await {
            Ok(report) => {
                if report.added + report.removed > 0 {
                    info!(added = report.added, removed = report.removed, "remote-cluster routes updated");
                }
                self.applied.remote_prefixes.clone_from(&view.remote_prefixes);
            }
            Err(e) => warn!(error = %e, "syncing remote-cluster routes failed; retrying on the next change"),
        }
    }
}

/// Runs the route agent until `shutdown`, then removes its nexthop and routes. `gateways`, when
/// given, says which node the control plane names (e.g. the Lease holder's address) and
/// overrides the endpoint records. `probe_port`, when given, is where the gateway nodes answer
/// probes (see the module docs); without it the node follows the control plane alone.
///
/// With `services`, it also attaches the ClusterSetIP socket programs to that cgroup and keeps
/// their backends what [`crate::services::backends`] says: the records, and which remote
/// clusters the cluster's gateways reach (asked on the probe port with every probe).
pub async fn run(
    client: BrokerClient,
    local_cluster: String,
    mut gateways: Option<watch::Receiver<Option<IpAddr>>>,
    probe_port: Option<u16>,
    services: Option<ServiceConfig>,
    report: Option<watch::Sender<(Instant, AgentReport)>>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    let netlink = Netlink::open()?;
    let mut sockets = services.map(Translator::attach).transpose().map_err(AgentError::Services)?;
    let mut health = crate::node_probe::HealthReader::default();
    let mut agent =
        Agent { routes: NodeRoutes::new(&netlink), applied: NodeView::default(), nexthop_changes: 0 };
    let mut shutdown = std::pin::pin!(shutdown);
    // The shared reflector: list once, then watch; after broker trouble it backs off (with
    // jitter) and resumes from the last revision. Routes stay as they are meanwhile.
    let mut reflector = Reflector::new(client, Duration::from_secs(20));
    let socket = match probe_port {
        Some(_) => Some(
            tokio::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))
                .await
                .map_err(AgentError::Probe)?,
        ),
        None => None,
    };
    let mut failover = NodeFailover::default();
    let probe_interval = crate::cable::wireguard::probe::PROBE_INTERVAL;
    let mut tick = tokio::time::interval(probe_interval / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_probe: Option<Instant> = None;
    let mut buf = vec![0u8; crate::node_probe::HEALTH_LEN + 1];
    // `dirty`: the records changed since the view was computed; `stale`: since the routes
    // were synced.
    let (mut view, mut dirty, mut stale, mut synced) = (NodeView::default(), true, true, false);
    info!(cluster = %local_cluster, probes = probe_port.is_some(), "route agent started");
    loop {
        if dirty {
            let facts = match netlink.local_addresses().await {
                Ok(addresses) => LocalFacts { addresses, public_key: None },
                Err(e) => {
                    warn!(error = %e, "listing this node's addresses failed; remote prefixes are checked without them");
                    LocalFacts::default()
                }
            };
            view = node_view(&reflector.snapshot().objects(), &local_cluster, &facts);
            dirty = false;
            stale = true;
        }
        let authority = match &gateways {
            Some(rx) => *rx.borrow(),
            None => view.active_gateway,
        };
        let gateway = match socket {
            Some(_) => failover.choose(authority, &view.gateways, Instant::now()),
            None => authority,
        };
        if synced {
            agent.apply(&view, gateway, stale).await;
            stale = false;
        }
        if let (Some(s), true) = (&mut sockets, synced) {
            s.sync(&reflector.snapshot().objects(), &local_cluster);
        }
        if let Some(tx) = &report {
            let now = Instant::now();
            let t = Timers::DEFAULT;
            tx.send_replace((
                now,
                AgentReport {
                    gateway: agent.applied.active_gateway,
                    authority,
                    gateways: view
                        .gateways
                        .iter()
                        .map(|(ip, _)| (*ip, failover.prober.evidence(*ip).alive(now, &t)))
                        .collect(),
                    nexthop_changes: agent.nexthop_changes,
                    routes: agent.applied.remote_prefixes.len(),
                    synced,
                },
            ));
        }
        let gateway_changed = async {
            match &mut gateways {
                Some(rx) => {
                    if rx.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        let reply = async {
            match &socket {
                Some(s) => s.recv_from(&mut buf).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = &mut shutdown => break,
            () = gateway_changed => {}
            result = reflector.next() => match result {
                Ok(_) => {
                    synced = true;
                    dirty = true;
                    if let Some(s) = &mut sockets {
                        s.records_changed();
                    }
                }
                Err(e) => warn!(error = %e, "broker unavailable; resuming from the last revision"),
            },
            received = reply => match received {
                Ok((n, from)) if n == crate::node_probe::LEN => {
                    failover.prober.on_reply(from.ip(), &buf[..n], Instant::now());
                }
                Ok((n, from)) => {
                    let now = Instant::now();
                    health.on_reply(from.ip(), &buf[..n], now);
                    if health.gathering(from.ip())
                        && let (Some(s), Some(port)) = (&socket, probe_port)
                    {
                        let request = health.request(from.ip(), now);
                        let _ = s.send_to(&request, (from.ip(), port)).await;
                    }
                }
                Err(e) => debug!(error = %e, "node probe socket"),
            },
            // Every 50 ms, probes or not: the loop's turns are its liveness.
            _ = tick.tick() => {
                let now = Instant::now();
                let due = last_probe.is_none_or(|t| now.duration_since(t) + probe_interval / 5 >= probe_interval);
                if let (Some(s), Some(port), true) = (&socket, probe_port, due) {
                    last_probe = Some(now);
                    let targets = NodeFailover::targets(authority, &view.gateways);
                    failover.prober.retain(&targets);
                    for ip in &targets {
                        let request = failover.prober.probe(*ip, now);
                        if let Err(e) = s.send_to(&request, (*ip, port)).await {
                            debug!(gateway = %ip, error = %e, "sending a node probe failed");
                        }
                    }
                    // Which clusters the gateways reach, for the ClusterSetIP backends.
                    if sockets.is_some() {
                        let all: Vec<IpAddr> = view.gateways.iter().map(|(ip, _)| *ip).collect();
                        health.retain(&all);
                        for ip in all {
                            let request = health.request(ip, now);
                            let _ = s.send_to(&request, (ip, port)).await;
                        }
                    }
                }
                if let Some(s) = &mut sockets {
                    s.set_reachable(health.reachable(now, crate::node_probe::HEALTH_WITHIN));
                }
            }
        }
    }
    info!("route agent stopping; removing its routes");
    if sockets.as_ref().is_some_and(Translator::pinned) {
        info!(
            "leaving the pinned ClusterSetIP socket programs in place for the next start (`causeway cleanup` removes them)"
        );
    }
    agent.routes.clear()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use causeway_broker_api::{ClusterRecord, EndpointRecord};

    fn obj(rv: u64, record: Record) -> Object {
        Object { api_version: "causeway.io/v1".into(), resource_version: rv, record }
    }

    fn cluster(id: &str, pods: &str) -> Record {
        Record::Cluster(ClusterRecord {
            cluster_id: id.into(),
            pod_cidrs: vec![pods.parse().unwrap()],
            service_cidrs: vec![],
            global_cidrs: Vec::new(),
            labels: Default::default(),
            generation: 1,
        })
    }

    fn endpoint(cluster: &str, host: &str, ip: &str, role: GatewayRole) -> Record {
        Record::Endpoint(EndpointRecord {
            cluster_id: cluster.into(),
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
            generation: 1,
        })
    }

    #[test]
    fn a_node_routes_the_remote_prefixes_through_the_newest_active_gateway() {
        let objects = vec![
            obj(1, cluster("east", "10.1.0.0/16")),
            obj(2, cluster("west", "10.9.0.0/16")),
            obj(3, endpoint("west", "w-gw", "172.31.0.9", GatewayRole::Active)),
            obj(4, endpoint("east", "gw-1", "192.168.50.11", GatewayRole::Active)),
            obj(5, endpoint("east", "gw-2", "192.168.50.12", GatewayRole::Standby)),
        ];
        let v = node_view(&objects, "east", &LocalFacts::default());
        assert_eq!(v.remote_prefixes, ["10.9.0.0/16".parse().unwrap()].into());
        assert_eq!(v.active_gateway, Some("192.168.50.11".parse().unwrap()));
        // gw-2 takes over and writes its endpoint before gw-1's record is updated.
        let mut objects = objects;
        objects[4] = obj(6, endpoint("east", "gw-2", "192.168.50.12", GatewayRole::Active));
        assert_eq!(
            node_view(&objects, "east", &LocalFacts::default()).active_gateway,
            Some("192.168.50.12".parse().unwrap())
        );
        // No gateway at all: nothing to point at.
        assert_eq!(node_view(&objects[..3], "east", &LocalFacts::default()).active_gateway, None);
        // Only a standby left (the active one's record lapsed): the standby.
        let only_standby =
            [&objects[..3], &[obj(7, endpoint("east", "gw-3", "192.168.50.13", GatewayRole::Standby))]]
                .concat();
        assert_eq!(
            node_view(&only_standby, "east", &LocalFacts::default()).active_gateway,
            Some("192.168.50.13".parse().unwrap())
        );
        // Every gateway node of the cluster is a candidate, other clusters' are not.
        let ips: Vec<String> = node_view(&objects, "east", &LocalFacts::default())
            .gateways
            .iter()
            .map(|(ip, _)| ip.to_string())
            .collect();
        assert_eq!(ips, ["192.168.50.11", "192.168.50.12"]);
    }

    /// Runs the node's failover from `from` to `to` ms, every 50 ms: the gateways in `answer`
    /// answer every probe (saying they forward); returns the gateway chosen at each step.
    fn drive(
        f: &mut NodeFailover,
        t0: Instant,
        authority: IpAddr,
        gateways: &[(IpAddr, u32)],
        answer: &[IpAddr],
        (from, to): (u64, u64),
    ) -> Vec<(u64, IpAddr)> {
        let mut out = Vec::new();
        for ms in (from..=to).step_by(50) {
            let now = t0 + Duration::from_millis(ms);
            if ms % 100 == 0 {
                for ip in NodeFailover::targets(Some(authority), gateways) {
                    let q = f.prober.probe(ip, now);
                    if answer.contains(&ip) {
                        let nonce = crate::node_probe::parse_request(&q).unwrap();
                        f.prober.on_reply(ip, &crate::node_probe::reply(nonce, true), now);
                    }
                }
            }
            out.push((ms, f.choose(Some(authority), gateways, now).unwrap()));
        }
        out
    }

    #[test]
    fn a_node_leaves_a_silent_gateway_for_a_live_one_and_comes_back_after_the_hold_down() {
        let (gw1, gw2): (IpAddr, IpAddr) =
            ("192.168.50.11".parse().unwrap(), "192.168.50.12".parse().unwrap());
        let gateways = [(gw1, 0), (gw2, 0)];
        let t0 = Instant::now();
        let mut f = NodeFailover::default();
        let steps = drive(&mut f, t0, gw1, &gateways, &[gw1, gw2], (0, 1_000));
        assert!(steps.iter().all(|(_, gw)| *gw == gw1), "{steps:?}");
        // gw1 stops answering after 1,000 ms: the node moves to gw2 once 300 ms have passed.
        let steps = drive(&mut f, t0, gw1, &gateways, &[gw2], (1_050, 2_000));
        let moved = steps.iter().find(|(_, gw)| *gw == gw2).map(|(ms, _)| *ms);
        assert_eq!(moved, Some(1_300), "{steps:?}");
        assert!(steps.iter().skip_while(|(ms, _)| *ms < 1_300).all(|(_, gw)| *gw == gw2));
        // gw1 is back: the node returns to it (the control plane's pick) after 5 s of answers.
        let steps = drive(&mut f, t0, gw1, &gateways, &[gw1, gw2], (2_100, 8_000));
        let back = steps.iter().find(|(_, gw)| *gw == gw1).map(|(ms, _)| *ms);
        assert_eq!(back, Some(7_100), "{steps:?}");
    }

    #[test]
    fn the_agents_metrics_name_its_nexthop_and_what_answers() {
        let r = AgentReport {
            gateway: Some("192.168.50.12".parse().unwrap()),
            authority: Some("192.168.50.11".parse().unwrap()),
            gateways: vec![
                ("192.168.50.11".parse().unwrap(), false),
                ("192.168.50.12".parse().unwrap(), true),
            ],
            nexthop_changes: 2,
            routes: 3,
            synced: true,
        };
        let text = render_agent_metrics(&r);
        for line in [
            "causeway_node_nexthop{gateway=\"192.168.50.12\"} 1\n",
            "causeway_node_gateway_answering{gateway=\"192.168.50.11\"} 0\n",
            "causeway_node_gateway_answering{gateway=\"192.168.50.12\"} 1\n",
            "causeway_node_nexthop_changes_total{} 2\n",
            "causeway_node_routes{} 3\n",
            "causeway_node_synced{} 1\n",
            "# TYPE causeway_node_nexthop_changes counter\n",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert!(!render_agent_metrics(&AgentReport::default()).contains("causeway_node_nexthop{"));
    }

    #[tokio::test]
    async fn the_agents_health_fails_once_its_loop_stops_turning() {
        let (tx, rx) = watch::channel((Instant::now(), AgentReport::default()));
        // A port that was free a moment ago (the server takes an address, not a listener).
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let task = serve_agent_metrics(addr, rx).await.unwrap();
        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.0 200"), "a loop that just turned is healthy");
        assert!(get("/metrics").await.contains("causeway_node_synced{} 0"));
        tx.send_replace((Instant::now() - AGENT_STALL - Duration::from_secs(1), AgentReport::default()));
        let stuck = get("/healthz").await;
        assert!(stuck.starts_with("HTTP/1.0 503") && stuck.contains("has not turned"), "{stuck}");
        task.abort();
    }

    #[test]
    fn a_node_whose_probes_nobody_answers_follows_the_control_plane() {
        let (gw1, gw2): (IpAddr, IpAddr) =
            ("192.168.50.11".parse().unwrap(), "192.168.50.12".parse().unwrap());
        let gateways = [(gw1, 0), (gw2, 0)];
        let t0 = Instant::now();
        let mut f = NodeFailover::default();
        // No responder anywhere (an older gateway, a firewall): the Lease moves, the node follows.
        assert!(drive(&mut f, t0, gw1, &gateways, &[], (0, 1_000)).iter().all(|(_, gw)| *gw == gw1));
        let steps = drive(&mut f, t0, gw2, &gateways, &[], (1_050, 1_100));
        assert!(steps.iter().all(|(_, gw)| *gw == gw2), "{steps:?}");
        // Gateways that answer but say they do not forward count as silent.
        let now = t0 + Duration::from_millis(1_200);
        let q = f.prober.probe(gw1, now);
        let nonce = crate::node_probe::parse_request(&q).unwrap();
        f.prober.on_reply(gw1, &crate::node_probe::reply(nonce, false), now);
        assert_eq!(f.choose(Some(gw2), &gateways, now), Some(gw2));
        // Without any record or Lease naming one: the highest priority.
        assert_eq!(NodeFailover::default().choose(None, &[(gw1, 1), (gw2, 5)], now), Some(gw2));
        assert_eq!(NodeFailover::default().choose(None, &[], now), None);
    }
}
