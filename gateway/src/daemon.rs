//! The gateway daemon: starts the cable, loads and attaches the datapath, registers with the
//! broker, then keeps the actual state (peers, routes, datapath maps) equal to the desired
//! state computed from the broker's records (level-triggered: every pass compares everything,
//! so a missed event or a restart converges the same way).
//!
//! The last records seen are cached on disk, so the data plane comes back even when the
//! broker is down at start.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use causeway_broker_api::{
    BrokerClient, ClientError, EndpointRecord, GatewayRole, ListResponse, Reflector, Snapshot, Step,
    records::{Candidate, CandidateKind},
    reflector::Backoff,
};
use causeway_datapath::{Datapath, DatapathError, UplinkHook};
use tokio::sync::Mutex;
use tracing::{info, instrument, warn};

use crate::{
    cable::{AnyCable, CableDriver, CableError, CableSettings},
    cluster::{ClusterSource, LocalCluster, SourceError},
    controller::Controller,
    desired::{Desired, LocalFacts, desired},
    keys::{KeyError, KeyPair},
    route::{Netlink, RouteError, RouteManager},
    status::{CarrierView, ConnectionView, DatapathCounters, GatewayStatus},
};

/// Validated settings of one gateway.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Where the broker is, how to trust it, and this cluster's credential.
    pub broker: causeway_broker_api::Credentials,
    /// Cable backend name.
    pub cable: String,
    /// Tunnel device name.
    pub device: String,
    pub listen_port: u16,
    /// MTU of the underlay path; the tunnel MTU is this minus WireGuard's overhead.
    pub underlay_mtu: u16,
    pub key_file: PathBuf,
    /// Where the last known records are cached.
    pub state_dir: PathBuf,
    pub status_socket: PathBuf,
    /// Serve the WireGuard UAPI socket for `wg show`.
    pub uapi: bool,
    /// Where to serve Prometheus metrics over TCP (none: only on the status socket).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How often the endpoint record is renewed at the broker (its lease).
    pub heartbeat: Duration,
    /// The underlay interface to guard (none: no guard).
    pub uplink: Option<String>,
    /// Where the guard runs (none: TC on a veth, XDP on anything else).
    pub uplink_hook: Option<UplinkHook>,
    /// Restart-safe mode: the eBPF maps and program links are pinned here, the tunnel device
    /// is persistent, and exiting leaves the data plane in place for the next start (which
    /// reconciles it instead of rebuilding it). None: everything goes with the process.
    pub bpf_dir: Option<PathBuf>,
    /// Interfaces that carry the cluster's traffic to this gateway: their ingress gets the
    /// redirect stage (remote-bound packets straight to the tunnel device).
    pub cluster_interfaces: Vec<String>,
    /// The cable's I/O threads (0: one per CPU, up to 64).
    pub lanes: usize,
    /// This gateway's rank among its cluster's gateways (higher first): which standby takes
    /// over, and which of several active ones carries.
    pub priority: u32,
    /// Where this gateway answers its cluster's nodes' probes (UDP; none: it does not, and its
    /// nodes follow the control plane alone).
    pub node_probe_listen: Option<std::net::SocketAddr>,
    /// ClusterSetIP translation for the gateway node's own pods (no route agent runs there).
    pub services: Option<crate::services::ServiceConfig>,
    /// The STUN responder asked for this gateway's reflexive address (none: not asked).
    pub stun_server: Option<std::net::SocketAddr>,
    /// The relay this gateway registers with (none: it is reached directly only).
    pub relay: Option<crate::cable::wireguard::relay_client::RelaySettings>,
    /// Serve `/debug/hold-daemon?secs=N` on the status socket (tests: it takes the daemon's
    /// lock for N seconds, as a stuck reconcile would).
    pub debug_hooks: bool,
}

/// Handshake initiations allowed per second and per source address by the uplink guard, and
/// the burst: generous for real peers (a handful per two minutes), fatal for floods.
const HANDSHAKE_RATE: u32 = 20;
const HANDSHAKE_BURST: u32 = 40;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cable: {0}")]
    Cable(#[from] CableError),
    #[error("datapath: {0}")]
    Datapath(#[from] DatapathError),
    #[error("routes: {0}")]
    Route(#[from] RouteError),
    #[error("metrics listener {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("status socket {path}: {source}")]
    Status {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("node probe listener {addr}: {source}")]
    NodeProbe {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("broker settings: {0}")]
    Broker(String),
    #[error("reconcile steps failed: {}", .0.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join("; "))]
    Reconcile(BTreeMap<String, String>),
    #[error("teardown failed: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Teardown(Vec<GatewayError>),
}

/// Everything the reconcile loop and the status server share.
pub struct Shared {
    local: LocalCluster,
    config: GatewayConfig,
    public_key: String,
    netlink: Netlink,
    /// The reconcilers and the resources they own (cable, datapath tables, routes).
    ctl: Controller<AnyCable, Datapath, RouteManager>,
    revision: u64,
    /// What the endpoint record publishes (see [`Published`]).
    published: Published,
}

/// What the gateway publishes in its endpoint record beyond its flags, as it learns it: the
/// remote clusters it reaches (by its last failover pass) and where it answers probes (in
/// overlap mode, its pod prefix's global address, known once the broker has allocated it).
#[derive(Clone, Debug)]
struct Published {
    reachable: Arc<std::sync::RwLock<crate::node_probe::Reachable>>,
    health_ip: Arc<std::sync::RwLock<Option<std::net::Ipv4Addr>>>,
    /// Where a NAT maps the cable's socket (the cable's reflexive address, read by the
    /// failover task).
    reflexive: Arc<std::sync::RwLock<Option<std::net::SocketAddr>>>,
    /// The relay while it holds this gateway's registration.
    relay: Arc<std::sync::RwLock<Option<std::net::SocketAddr>>>,
}

impl Shared {
    /// Makes peers, datapath entries, policy and routes match `desired`: every step runs;
    /// the failed ones are reported and retried on the next pass.
    #[instrument(skip_all, fields(cluster = %self.local.cluster_id, remotes = desired.remotes.len()))]
    async fn reconcile(&mut self, desired: Desired) -> Result<(), GatewayError> {
        let failures = self.ctl.reconcile(desired).await;
        if failures.is_empty() { Ok(()) } else { Err(GatewayError::Reconcile(failures.clone())) }
    }

    fn policy_drops(&self) -> Result<BTreeMap<String, u64>, GatewayError> {
        let rules = self.ctl.policy_rules();
        let (per_rule, default) = self.ctl.tables.policy_drops(rules.len())?;
        let mut out: BTreeMap<String, u64> =
            rules.iter().cloned().zip(per_rule).filter(|(_, n)| *n > 0).collect();
        if default > 0 {
            out.insert("(default)".into(), default);
        }
        Ok(out)
    }

    /// A snapshot for `show connections` and metrics.
    pub async fn status(&self) -> Result<GatewayStatus, GatewayError> {
        let conns = self.ctl.cable.connections().await?;
        let mut connections = Vec::new();
        let mut standbys = Vec::new();
        let status_name = |s: crate::cable::ConnectionStatus| {
            serde_json::to_value(s).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
        };
        for c in conns {
            if c.standby {
                standbys.push(crate::status::StandbyView {
                    status: status_name(c.status),
                    cluster_id: c.cluster_id,
                    endpoint: c.endpoint.to_string(),
                    public_key: c.public_key,
                    last_handshake_secs: c.last_handshake_secs,
                });
                continue;
            }
            let counters = match self.ctl.slot(&c.cluster_id) {
                Some(slot) => self.ctl.tables.counters(slot)?,
                None => Default::default(),
            };
            let cidrs = self
                .ctl
                .applied()
                .remotes
                .get(&c.cluster_id)
                .map(|r| r.cidrs.iter().map(ToString::to_string).collect())
                .unwrap_or_default();
            let carrier = self.ctl.authority().remotes.get(&c.cluster_id).and_then(|authority| {
                let v = self.ctl.carriers().view(&c.cluster_id, authority.public_key)?;
                (v.carrier.to_string() == c.public_key).then(|| CarrierView {
                    since_secs: v.since.elapsed().as_secs_f64(),
                    reason: v.reason.as_str().to_owned(),
                    provisional: v.provisional,
                })
            });
            connections.push(ConnectionView {
                carrier,
                status: status_name(c.status),
                path: c.path.map(|p| p.name().to_owned()),
                cluster_id: c.cluster_id,
                endpoint: c.endpoint.to_string(),
                public_key: c.public_key,
                rtt_secs: c.rtt_secs,
                loss: c.loss,
                last_handshake_secs: c.last_handshake_secs,
                cidrs,
                tx_bytes: c.tx_bytes,
                rx_bytes: c.rx_bytes,
                datapath: DatapathCounters {
                    tx_packets: counters.tx_packets,
                    tx_bytes: counters.tx_bytes,
                    rx_packets: counters.rx_packets,
                    rx_bytes: counters.rx_bytes,
                },
            });
        }
        let cable = self.ctl.cable.info();
        Ok(GatewayStatus {
            cluster_id: self.local.cluster_id.clone(),
            hostname: self.local.hostname.clone(),
            public_key: self.public_key.clone(),
            cable: cable.name.to_owned(),
            cable_lanes: cable.details.lanes.unwrap_or(0),
            cable_udp_segmentation: cable.details.udp_segmentation.unwrap_or(false),
            cable_stalled_lanes: cable.details.stalled_lanes.unwrap_or(0),
            reflexive: cable.details.reflexive.map(|a| a.to_string()),
            relay: cable.details.relay.map(|a| a.to_string()),
            relay_transport: cable.details.relay_transport.map(str::to_owned),
            device: cable.device,
            listen_port: self.config.listen_port,
            broker_url: self.config.broker.broker_url.clone(),
            revision: self.revision,
            connections,
            cable_drops: self.ctl.cable.drops().await?.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            datapath_events: self
                .ctl
                .tables
                .stats()?
                .into_iter()
                .map(|(s, v)| (s.name().to_owned(), v))
                .collect(),
            policy_drops: self.policy_drops()?,
            standbys,
            refused: self.ctl.applied().refused.clone(),
            route_conflicts: self.ctl.route_conflicts().iter().map(ToString::to_string).collect(),
            reconcile_failures: self.ctl.failures().clone(),
            failovers: self.ctl.carriers().failovers(),
        })
    }
}

/// The last records seen, on disk, so the data plane comes back even when the broker is down
/// at start.
fn save_snapshot(snapshot: &Snapshot, dir: &std::path::Path) {
    let path = dir.join("records.json");
    let tmp = dir.join("records.json.tmp");
    let res = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&tmp, serde_json::to_vec(&snapshot.to_list()).unwrap_or_default()))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = res {
        warn!(path = %path.display(), error = %e, "caching records failed");
    }
}

fn load_snapshot(dir: &std::path::Path) -> Option<Snapshot> {
    let bytes = std::fs::read(dir.join("records.json")).ok()?;
    serde_json::from_slice::<ListResponse>(&bytes).ok().map(Snapshot::from_list)
}

/// This gateway's endpoint record; `backend` is the running cable driver's name.
fn endpoint_record(
    local: &LocalCluster,
    key: &KeyPair,
    config: &GatewayConfig,
    backend: &str,
) -> EndpointRecord {
    EndpointRecord {
        cluster_id: local.cluster_id.clone(),
        hostname: local.hostname.clone(),
        private_ips: local.private_ips.clone(),
        public_ips: local.public_ips.clone(),
        port: config.listen_port,
        public_key: key.public,
        backend: backend.to_owned(),
        role: if local.active { GatewayRole::Active } else { GatewayRole::Standby },
        priority: config.priority,
        health_check_ip: local.health_ip().map(std::net::IpAddr::V4),
        reachable: None,
        candidates: Vec::new(),
        generation: 1,
    }
}

async fn register(
    client: &BrokerClient,
    local: &LocalCluster,
    ep: &EndpointRecord,
) -> Result<(), ClientError> {
    client.put_cluster(&local.record(1)).await?;
    client.put_endpoint(ep).await?;
    Ok(())
}

/// TC for a veth uplink (an XDP program there makes the peer segment every GSO run, which
/// costs more than an early drop saves), XDP for anything else.
async fn auto_uplink_hook(netlink: &Netlink, uplink: &str) -> UplinkHook {
    match netlink.link_kind(uplink).await {
        Ok(Some(kind)) if kind == "veth" => UplinkHook::Tc,
        Ok(_) => UplinkHook::Xdp,
        Err(e) => {
            warn!(interface = uplink, error = %e, "could not tell the uplink's kind; guarding it with XDP");
            UplinkHook::Xdp
        }
    }
}

/// Runs the gateway until `shutdown` completes. Then, in restart-safe mode, leaves the data
/// plane as it is for the next start; otherwise removes its routes and tunnel.
pub async fn run(
    config: GatewayConfig,
    mut source: impl ClusterSource,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), GatewayError> {
    let local = source.local_cluster().await?;
    let key = crate::keys::load_or_generate(&config.key_file)?;
    let netlink = Netlink::open()?;
    let cable = AnyCable::start(
        &config.cable,
        &CableSettings {
            device: config.device.clone(),
            underlay_mtu: config.underlay_mtu,
            listen_port: config.listen_port,
            private_key: key.private.clone(),
            health_ip: local.health_ip(),
            persistent: config.bpf_dir.is_some(),
            lanes: config.lanes,
            uapi: config.uapi,
            netlink: netlink.clone(),
            stun_server: config.stun_server,
            relay: config.relay.clone(),
        },
    )
    .await?;
    let mut datapath = match &config.bpf_dir {
        Some(dir) => Datapath::load_pinned(dir)?,
        None => Datapath::load()?,
    };
    let info = cable.info();
    datapath.set_tunnel_mtu(info.mtu)?;
    datapath.attach_tunnel(&info.device)?;
    if let Some(uplink) = &config.uplink {
        let hook = match config.uplink_hook {
            Some(hook) => hook,
            None => auto_uplink_hook(&netlink, uplink).await,
        };
        info!(interface = %uplink, ?hook, "uplink guard");
        datapath.attach_uplink_guard(uplink, hook, config.listen_port, HANDSHAKE_RATE, HANDSHAKE_BURST)?;
        // The STUN responder's answers reach the WireGuard port too.
        let stun = config.stun_server.and_then(|s| match s {
            std::net::SocketAddr::V4(v4) => Some(v4),
            std::net::SocketAddr::V6(_) => None,
        });
        datapath.set_stun_server(stun)?;
    }
    for ifname in &config.cluster_interfaces {
        datapath.attach_cluster_redirect(ifname)?;
    }
    datapath.prune_links()?;
    let routes = RouteManager::new(&netlink, &info.device).await?;
    let tunnel_ifindex = routes.ifindex();
    let backend = info.name;
    let published = Published {
        reachable: Arc::new(std::sync::RwLock::new(crate::node_probe::Reachable::default())),
        health_ip: Arc::new(std::sync::RwLock::new(local.health_ip())),
        reflexive: Arc::new(std::sync::RwLock::new(None)),
        relay: Arc::new(std::sync::RwLock::new(None)),
    };
    let shared = Arc::new(Mutex::new(Shared {
        local: local.clone(),
        config: config.clone(),
        public_key: key.public.to_string(),
        netlink,
        ctl: Controller::new(cable, datapath, routes, tunnel_ifindex),
        revision: 0,
        published: published.clone(),
    }));
    let (snapshot, snapshot_task) = crate::status::start_snapshots(shared.clone(), Duration::from_secs(1));
    let status_task = crate::status::serve(
        &config.status_socket,
        snapshot.clone(),
        config.debug_hooks.then(|| shared.clone()),
    )
    .await
    .map_err(|source| GatewayError::Status { path: config.status_socket.display().to_string(), source })?;
    let metrics_task = match config.metrics_listen {
        Some(addr) => Some(
            crate::status::serve_tcp(addr, snapshot)
                .await
                .map_err(|source| GatewayError::Metrics { addr, source })?,
        ),
        None => None,
    };
    info!(cluster = %local.cluster_id, host = %local.hostname, public_key = %key.public, "gateway started");

    let client =
        BrokerClient::from_credentials(&config.broker).map_err(|e| GatewayError::Broker(e.to_string()))?;
    let mut local = local;
    let mut ep = endpoint_record(&local, &key, &config, backend);
    // Which remote clusters this gateway reaches, by its last failover pass: served to its
    // cluster's nodes and DNS, and published in its endpoint record.
    let reachable = published.reachable.clone();
    let mut heartbeat_task =
        tokio::spawn(heartbeat(client.clone(), ep.clone(), config.heartbeat, published.clone()));
    let peers_task = config.uplink.is_some().then(|| {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if let Err(e) = shared.lock().await.ctl.reconcile_guard().await {
                    warn!(error = %e, "syncing the uplink guard's peers failed");
                }
            }
        })
    });
    // What this gateway tells its cluster's nodes: whether its tunnels answer.
    let forwarding = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let node_probe_task = match config.node_probe_listen {
        Some(addr) => {
            let socket = tokio::net::UdpSocket::bind(addr)
                .await
                .map_err(|source| GatewayError::NodeProbe { addr, source })?;
            Some(tokio::spawn(crate::node_probe::serve(socket, forwarding.clone(), reachable.clone())))
        }
        None => None,
    };
    // The failover switch: twice per probe interval, so a dead gateway is left within a
    // tick of the detection time.
    let failover_task = {
        let shared = shared.clone();
        let reachable = reachable.clone();
        let reflexive = published.reflexive.clone();
        let relay = published.relay.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(crate::cable::wireguard::probe::PROBE_INTERVAL / 2);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let mut s = shared.lock().await;
                s.ctl.failover(std::time::Instant::now()).await;
                forwarding.store(s.ctl.forwarding(), std::sync::atomic::Ordering::Relaxed);
                let now_reachable = s.ctl.reachable().iter().cloned().collect::<Vec<_>>();
                reachable.write().expect("reachable lock").set(now_reachable);
                let details = s.ctl.cable.info().details;
                *reflexive.write().expect("reflexive lock") = details.reflexive;
                *relay.write().expect("relay lock") = details.relay;
            }
        })
    };
    let services_task = match &config.services {
        Some(cfg) => {
            let translator = crate::services::Translator::attach(cfg.clone())?;
            Some(tokio::spawn(translate_services(
                client.clone(),
                local.cluster_id.clone(),
                translator,
                reachable.clone(),
            )))
        }
        None => None,
    };
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = sync_loop(&client, &local, (&ep, &published), &config, &shared) => break,
            () = &mut shutdown => {
                info!("shutting down");
                break;
            }
            // A new role (or other facts): publish it at once and resume syncing with it.
            next = source.next_change() => match next {
                Ok(next) if next != local => {
                    info!(active = next.active, "this gateway's facts changed; re-registering");
                    local = next;
                    ep = endpoint_record(&local, &key, &config, backend);
                    shared.lock().await.local = local.clone();
                    heartbeat_task.abort();
                    heartbeat_task = tokio::spawn(heartbeat(
                        client.clone(),
                        ep.clone(),
                        config.heartbeat,
                        published.clone(),
                    ));
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "the cluster source failed; keeping the current facts"),
            },
        }
    }
    failover_task.abort();
    if let Some(t) = node_probe_task {
        t.abort();
    }
    if let Some(t) = services_task {
        // Pinned programs stay and keep translating; unpinned ones go with the translator.
        t.abort();
    }
    status_task.abort();
    snapshot_task.abort();
    heartbeat_task.abort();
    if let Some(t) = peers_task {
        t.abort();
    }
    if let Some(t) = metrics_task {
        t.abort();
    }
    let _ = std::fs::remove_file(&config.status_socket);
    if let Some(dir) = &config.bpf_dir {
        // A restart (rolling update, crash loop) must not take traffic down or fail open:
        // routes keep steering into the tunnel device, the programs stay attached.
        info!(
            device = %config.device,
            pins = %dir.display(),
            "leaving the data plane in place for the next start (`causeway cleanup` removes it)"
        );
        return Ok(());
    }
    teardown(&shared).await
}

/// Removes what a restart-safe gateway leaves behind when it stops: its routes, its tunnel
/// device and its pinned maps and links. Runs every step and reports all failures.
pub async fn cleanup(device: &str, bpf_dirs: &[&std::path::Path]) -> Result<(), GatewayError> {
    let mut errors = Vec::new();
    let netlink = Netlink::open()?;
    match RouteManager::new(&netlink, device).await {
        Ok(routes) => {
            if let Err(e) = routes.sync(&BTreeSet::new()).await {
                errors.push(e.into());
            }
        }
        Err(crate::route::RouteError::NoInterface { .. }) => {}
        Err(e) => errors.push(e.into()),
    }
    if let Err(e) = netlink.delete_link(device).await {
        errors.push(e.into());
    }
    for dir in bpf_dirs {
        if let Err(e) = causeway_datapath::PinDir::at(dir).remove() {
            errors.push(GatewayError::Datapath(e.into()));
        }
    }
    if errors.is_empty() { Ok(()) } else { Err(GatewayError::Teardown(errors)) }
}

/// Removes routes, datapath entries and the tunnel; runs every step and reports all failures.
async fn teardown(shared: &Arc<Mutex<Shared>>) -> Result<(), GatewayError> {
    let mut s = shared.lock().await;
    let mut errors = Vec::new();
    if let Err(e) = s.ctl.routes.sync(&BTreeSet::new()).await {
        errors.push(e.into());
    }
    if let Err(e) = s.ctl.cable.cleanup().await {
        errors.push(e.into());
    }
    if errors.is_empty() { Ok(()) } else { Err(GatewayError::Teardown(errors)) }
}

/// Keeps the gateway node's socket programs on what the records say and on which remote
/// clusters this gateway reaches (its own failover pass's verdict, read every 50 ms).
async fn translate_services(
    client: BrokerClient,
    cluster: String,
    mut translator: crate::services::Translator,
    reachable: Arc<std::sync::RwLock<crate::node_probe::Reachable>>,
) {
    let mut reflector = Reflector::new(client, Duration::from_secs(20));
    let mut tick = tokio::time::interval(crate::cable::wireguard::probe::PROBE_INTERVAL / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut synced = false;
    loop {
        tokio::select! {
            next = reflector.next() => match next {
                Ok(_) => {
                    synced = true;
                    translator.records_changed();
                }
                Err(e) => warn!(error = %e, "broker unavailable; ClusterSetIP backends stay as they are"),
            },
            _ = tick.tick() => {
                let now = reachable.read().expect("reachable lock").clone();
                // Epoch 0: no failover pass yet, so no verdict either way.
                translator.set_reachable((now.epoch > 0).then(|| now.clusters.into_iter().collect()));
            }
        }
        if synced {
            translator.sync(&reflector.snapshot().objects(), &cluster);
        }
    }
}

/// Renews the endpoint's lease at the broker every `every` (an unchanged PUT: no event), with
/// what the gateway reaches now; a change of that is published within two seconds (at most one
/// PUT a second, however often the verdict flaps).
async fn heartbeat(client: BrokerClient, ep: EndpointRecord, every: Duration, published: Published) {
    // Heartbeats on their own clock (a lease counts on them); changes checked every second.
    let mut beat = tokio::time::interval(every);
    let mut check = tokio::time::interval(Duration::from_secs(1));
    for t in [&mut beat, &mut check] {
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    let mut sent: Option<(std::time::Instant, EndpointRecord)> = None;
    loop {
        let heartbeat = tokio::select! {
            _ = beat.tick() => true,
            _ = check.tick() => false,
        };
        let ep = reporting(&ep, &published);
        let changed =
            sent.as_ref().is_none_or(|(at, last)| *last != ep && at.elapsed() >= Duration::from_secs(1));
        if !heartbeat && !changed {
            continue;
        }
        // A failed PUT counts as sent: the next try waits its turn like any other.
        sent = Some((std::time::Instant::now(), ep.clone()));
        if let Err(e) = client.put_endpoint(&ep).await {
            tracing::debug!(error = %e, "heartbeat failed; the sync loop re-registers when the broker is back");
        }
    }
}

async fn apply(shared: &Arc<Mutex<Shared>>, snapshot: &Snapshot, local: &LocalCluster) {
    let (netlink, public_key) = {
        let s = shared.lock().await;
        (s.netlink.clone(), s.public_key.parse().ok())
    };
    let addresses = match netlink.local_addresses().await {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %e, "listing this node's addresses failed; remote prefixes are checked without them");
            Vec::new()
        }
    };
    let d = desired(&snapshot.objects(), &local.cluster_id, &LocalFacts { addresses, public_key });
    let mut s = shared.lock().await;
    s.revision = snapshot.revision;
    // In overlap mode probes cross the tunnel at global addresses, and the cable answers
    // them itself (they never meet the translation): its probe address moves with the map.
    let health = local.health_ip().map(|ip| global_address(ip, &d.translation));
    let published = s.published.health_ip.clone();
    if *published.read().expect("health lock") != health {
        info!(health_ip = ?health, "probe address changed");
        *published.write().expect("health lock") = health;
        s.ctl.cable.set_health_ip(health);
    }
    if let Err(e) = s.reconcile(d).await {
        warn!(error = %e, "reconcile failed; will retry on the next change or resync");
    }
}

/// `ip` moved to its global prefix by `pairs` (real → global), or as it is.
fn global_address(
    ip: std::net::Ipv4Addr,
    pairs: &[(ipnetwork::IpNetwork, ipnetwork::IpNetwork)],
) -> std::net::Ipv4Addr {
    pairs
        .iter()
        .find_map(|(real, global)| causeway_broker_api::GlobalCidr::map(real, global, ip.into()))
        .and_then(|a| match a {
            std::net::IpAddr::V4(v4) => Some(v4),
            std::net::IpAddr::V6(_) => None,
        })
        .unwrap_or(ip)
}

/// `ep` with what the gateway reaches now (`None` before its first failover pass), where it
/// answers probes now, and its reflexive address when the STUN responder confirms one.
fn reporting(ep: &EndpointRecord, published: &Published) -> EndpointRecord {
    let now = published.reachable.read().expect("reachable lock");
    let health = *published.health_ip.read().expect("health lock");
    let reflexive = *published.reflexive.read().expect("reflexive lock");
    let relay = *published.relay.read().expect("relay lock");
    EndpointRecord {
        reachable: (now.epoch > 0).then(|| now.clusters.clone()),
        health_check_ip: health.map(std::net::IpAddr::V4),
        candidates: reflexive
            .map(|address| Candidate { address, kind: CandidateKind::Reflexive })
            .into_iter()
            .chain(relay.map(|address| Candidate { address, kind: CandidateKind::Relay }))
            .collect(),
        ..ep.clone()
    }
}

/// Register, then follow the records (the shared reflector: list once, watch from the last
/// revision, back off with jitter and resume after broker trouble); apply every change.
/// Never returns. `ep` is registered with what the gateway reaches at that moment (see
/// [`reporting`]).
async fn sync_loop(
    client: &BrokerClient,
    local: &LocalCluster,
    (ep, published): (&EndpointRecord, &Published),
    config: &GatewayConfig,
    shared: &Arc<Mutex<Shared>>,
) {
    if let Some(cached) = load_snapshot(&config.state_dir) {
        info!(revision = cached.revision, "restoring the data plane from cached records");
        apply(shared, &cached, local).await;
    }
    let mut reflector = Reflector::new(client.clone(), Duration::from_secs(20));
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut registered = false;
    loop {
        if !registered {
            if let Err(e) = register(client, local, &reporting(ep, published)).await {
                let retry_in = backoff.next_delay();
                warn!(error = %e, ?retry_in, "registering with the broker failed");
                tokio::time::sleep(retry_in).await;
                continue;
            }
            backoff.reset();
            registered = true;
        }
        match reflector.next().await {
            Ok(Step::Listed | Step::Changed) => {
                save_snapshot(reflector.snapshot(), &config.state_dir);
                apply(shared, reflector.snapshot(), local).await;
            }
            // A quiet broker: renew the registration, and retry a pass that left failed steps
            // now rather than on the next change.
            Ok(Step::Quiet) => {
                if let Err(e) = register(client, local, &reporting(ep, published)).await {
                    warn!(error = %e, "re-registering failed");
                    registered = false;
                    continue;
                }
                let failed = !shared.lock().await.ctl.failures().is_empty();
                if failed {
                    apply(shared, reflector.snapshot(), local).await;
                }
            }
            Err(e) => {
                warn!(error = %e, "following the broker failed; resuming from the last revision");
                registered = false;
            }
        }
    }
}
