//! `causeway dns`: cluster-set DNS for one member cluster. Three loops feed one answer table:
//! the broker's records (a [`Reflector`]) make the [`Catalog`]; the cluster's gateways, asked
//! every probe interval which remote clusters their tunnels reach, make the [`Health`]; the
//! hickory-server front end answers from whatever the two last produced, never waiting on
//! either.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use causeway_broker_api::{BrokerClient, Record, Reflector};
use causeway_dns::{
    server::{Budget, Snapshot, Stats},
    zone::{Catalog, Health},
};
use causeway_gateway::node_probe::{HEALTH_LEN, HEALTH_WITHIN, HealthReader};
use tokio::sync::watch;
use tracing::{info, warn};

#[derive(clap::Args)]
pub struct DnsArgs {
    /// This cluster's credentials (a cluster or reader credentials file).
    #[arg(long, env = "CAUSEWAY_BROKER_CREDENTIALS")]
    broker_credentials: PathBuf,
    /// Where to answer, on UDP and TCP.
    #[arg(long, env = "CAUSEWAY_DNS_LISTEN", default_value = "0.0.0.0:53")]
    listen: SocketAddr,
    /// TTL of every answer, in seconds (negative answers too).
    #[arg(long, env = "CAUSEWAY_DNS_TTL", default_value_t = causeway_dns::zone::DEFAULT_TTL)]
    ttl: u32,
    /// UDP port of the gateway nodes' probe responders, asked every 100 ms which clusters
    /// their tunnels reach: a headless service's endpoints in a cluster they cannot reach
    /// leave the answers (0: no health; every cluster counts as reachable).
    #[arg(long, env = "CAUSEWAY_NODE_PROBE_PORT", default_value_t = causeway_gateway::node_probe::DEFAULT_PORT)]
    node_probe_port: u16,
    /// Queries per second one client may send before its queries are dropped.
    #[arg(long, env = "CAUSEWAY_DNS_CLIENT_QPS", default_value_t = Budget::default().per_second)]
    client_qps: f64,
}

pub async fn run(a: DnsArgs, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    anyhow::ensure!(a.client_qps > 0.0, "--client-qps must be above 0");
    let creds = causeway_broker_api::Credentials::load(&a.broker_credentials).map_err(anyhow::Error::msg)?;
    let Some(cluster_id) = creds.cluster_id.clone() else {
        anyhow::bail!("{} is not a cluster's credentials file", a.broker_credentials.display());
    };
    let client = BrokerClient::from_credentials(&creds)?;
    let (tx, rx) = watch::channel(Snapshot {
        catalog: Arc::new(Catalog::new(&[], &cluster_id, a.ttl, 0)),
        health: Health::Unknown,
    });
    // The gateways of this cluster, for the health loop.
    let (gw_tx, gw_rx) = watch::channel(Vec::<IpAddr>::new());
    let records = tokio::spawn(follow_records(client, cluster_id.clone(), a.ttl, tx.clone(), gw_tx));
    let health = (a.node_probe_port != 0).then(|| tokio::spawn(follow_health(a.node_probe_port, gw_rx, tx)));
    let stats = Arc::new(Stats::default());
    let budget = Budget { per_second: a.client_qps, burst: a.client_qps * 2.0 };
    info!(listen = %a.listen, cluster = %cluster_id, ttl = a.ttl, "serving clusterset.local");
    let served = causeway_dns::server::serve(a.listen, rx, budget, stats, shutdown)
        .await
        .with_context(|| format!("serving DNS on {} (UDP and TCP)", a.listen));
    records.abort();
    if let Some(h) = health {
        h.abort();
    }
    served
}

/// Rebuilds the catalog on every change of the records.
async fn follow_records(
    client: BrokerClient,
    cluster_id: String,
    ttl: u32,
    tx: watch::Sender<Snapshot>,
    gateways: watch::Sender<Vec<IpAddr>>,
) {
    let mut reflector = Reflector::new(client, Duration::from_secs(20));
    loop {
        match reflector.next().await {
            Ok(_) => {
                let snap = reflector.snapshot();
                let objects = snap.objects();
                let catalog = Catalog::new(&objects, &cluster_id, ttl, snap.revision);
                let services = catalog.len();
                tx.send_modify(|s| s.catalog = Arc::new(catalog));
                let mut gws: Vec<IpAddr> = objects
                    .iter()
                    .filter_map(|o| match &o.record {
                        Record::Endpoint(e) if e.cluster_id == cluster_id => e.private_ips.first().copied(),
                        _ => None,
                    })
                    .collect();
                gws.sort_unstable();
                gws.dedup();
                gateways.send_if_modified(|g| {
                    let changed = *g != gws;
                    *g = gws;
                    changed
                });
                tracing::debug!(revision = snap.revision, services, "catalog rebuilt");
            }
            Err(e) => warn!(error = %e, "watching the broker failed; answering from the last records"),
        }
    }
}

/// Asks every gateway of the cluster which clusters it reaches, every probe interval.
async fn follow_health(port: u16, gateways: watch::Receiver<Vec<IpAddr>>, tx: watch::Sender<Snapshot>) {
    let socket = match tokio::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0)).await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "no socket for asking the gateways; every cluster counts as reachable");
            return;
        }
    };
    let mut reader = HealthReader::default();
    let mut tick = tokio::time::interval(causeway_gateway::cable::wireguard::probe::PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = vec![0u8; HEALTH_LEN + 1];
    let publish = |reader: &HealthReader, now: Instant| {
        let health = reader.reachable(now, HEALTH_WITHIN).map_or(Health::Unknown, Health::Reachable);
        tx.send_if_modified(|s| {
            if s.health == health {
                return false;
            }
            info!(health = ?health, "reachable clusters changed");
            s.health = health;
            true
        });
    };
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = Instant::now();
                let gws = gateways.borrow().clone();
                reader.retain(&gws);
                for gw in gws {
                    let req = reader.request(gw, now);
                    if let Err(e) = socket.send_to(&req, SocketAddr::new(gw, port)).await {
                        tracing::debug!(%gw, error = %e, "asking a gateway failed");
                    }
                }
                publish(&reader, now);
            }
            r = socket.recv_from(&mut buf) => {
                if let Ok((n, from)) = r && from.port() == port {
                    let now = Instant::now();
                    if reader.on_reply(from.ip(), &buf[..n], now) {
                        publish(&reader, now);
                    }
                    if reader.gathering(from.ip()) {
                        // A newer list has more pages: ask for the next one at once.
                        let req = reader.request(from.ip(), now);
                        let _ = socket.send_to(&req, from).await;
                    }
                }
            }
        }
    }
}
