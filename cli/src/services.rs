//! `causeway export|unexport` (a cluster's services) and `causeway cluster-set` (settings of
//! the whole set), written to the broker.

use std::path::PathBuf;

use anyhow::Context as _;
use causeway_broker_api::{BrokerClient, Record, ServiceExportRecord, ServicePort};

#[derive(clap::Args)]
pub struct ExportArgs {
    /// The cluster's own credentials (written by `causeway join`).
    #[arg(long, env = "CAUSEWAY_CREDENTIALS")]
    credentials: PathBuf,
    /// The service's namespace.
    #[arg(long, short)]
    namespace: String,
    /// The service's name.
    name: String,
    /// The service's virtual IPs (ClusterIPs; repeatable). Not for a headless service.
    #[arg(
        long = "ip",
        value_delimiter = ',',
        required_unless_present = "headless",
        conflicts_with = "headless"
    )]
    ips: Vec<std::net::IpAddr>,
    /// A headless service: DNS answers with its endpoints instead of a ClusterSetIP.
    #[arg(long, requires = "endpoints")]
    headless: bool,
    /// A headless service's ready endpoint as IP[=HOSTNAME] (repeatable).
    #[arg(long = "endpoint", value_delimiter = ',', value_parser = parse_endpoint)]
    endpoints: Vec<causeway_broker_api::ServiceEndpoint>,
    /// Ports as PORT[/PROTOCOL][:NAME], e.g. 80/TCP:http (repeatable).
    #[arg(long = "port", value_delimiter = ',', value_parser = parse_port)]
    ports: Vec<ServicePort>,
}

fn parse_endpoint(s: &str) -> Result<causeway_broker_api::ServiceEndpoint, String> {
    let (ip, hostname) = match s.split_once('=') {
        Some((ip, h)) => (ip, Some(h.to_owned())),
        None => (s, None),
    };
    let ip = ip.parse().map_err(|_| format!("{s:?}: expected IP[=HOSTNAME], e.g. 10.1.0.5=db-0"))?;
    Ok(causeway_broker_api::ServiceEndpoint { ip, hostname })
}

fn parse_port(s: &str) -> Result<ServicePort, String> {
    let (rest, name) = match s.split_once(':') {
        Some((r, n)) => (r, Some(n.to_owned())),
        None => (s, None),
    };
    let (port, protocol) = match rest.split_once('/') {
        Some((p, proto)) => (p, proto.to_uppercase()),
        None => (rest, "TCP".to_owned()),
    };
    let port =
        port.parse().map_err(|_| format!("{s:?}: expected PORT[/PROTOCOL][:NAME], e.g. 80/TCP:http"))?;
    Ok(ServicePort { name, port, protocol })
}

#[derive(clap::Args)]
pub struct UnexportArgs {
    /// The cluster's own credentials (written by `causeway join`).
    #[arg(long, env = "CAUSEWAY_CREDENTIALS")]
    credentials: PathBuf,
    /// The service's namespace.
    #[arg(long, short)]
    namespace: String,
    /// The service's name.
    name: String,
}

#[derive(clap::Args)]
pub struct ClusterSetArgs {
    /// Overlap mode on: clusters may share pod/service CIDRs, and the broker gives each of them
    /// a unique global prefix of the same length (kept in the cluster's record). (The
    /// gateways' address translation is not there yet, so clusters that really overlap are
    /// not routed to each other.)
    #[arg(long, conflicts_with = "no_overlap_mode")]
    overlap_mode: bool,
    /// Overlap mode off (needs every cluster's CIDRs to be disjoint).
    #[arg(long)]
    no_overlap_mode: bool,
    /// Where member clusters' pod CIDRs may lie (repeatable; replaces the list; default: the
    /// private ranges of RFC 1918 and RFC 6598, and IPv6 ULA).
    #[arg(long = "pod-pool", value_name = "CIDR")]
    pod_pools: Vec<ipnetwork::IpNetwork>,
    /// Where service CIDRs may lie (repeatable; replaces the list).
    #[arg(long = "service-pool", value_name = "CIDR")]
    service_pools: Vec<ipnetwork::IpNetwork>,
    /// Where global prefixes (overlap mode) may lie, and where the broker allocates the ones a
    /// cluster leaves out, in order (repeatable; replaces the list; default 242.0.0.0/8, then
    /// the private ranges).
    #[arg(long = "global-pool", value_name = "CIDR")]
    global_pools: Vec<ipnetwork::IpNetwork>,
    /// Where ClusterSetIPs come from (IPv4, /8 to /28; default 241.0.0.0/16). It cannot move
    /// away from a ClusterSetIP a service holds.
    #[arg(long, value_name = "CIDR")]
    cluster_set_ip_pool: Option<ipnetwork::IpNetwork>,
    /// Gateway endpoints one cluster may publish.
    #[arg(long)]
    max_endpoints: Option<u32>,
    /// Services one cluster may export.
    #[arg(long)]
    max_services: Option<u32>,
    /// Admin credentials (default: the local sandbox's admin).
    #[arg(long, env = "CAUSEWAY_CREDENTIALS")]
    credentials: Option<PathBuf>,
}

/// The generation to write a record under `key` with: one past the stored one (1 if none),
/// since the broker refuses to go back.
pub async fn next_generation(client: &BrokerClient, key: &str) -> anyhow::Result<u64> {
    Ok(client
        .list()
        .await?
        .items
        .iter()
        .find(|o| o.record.key() == key)
        .map_or(1, |o| o.record.generation() + 1))
}

fn cluster_client(path: &std::path::Path) -> anyhow::Result<(BrokerClient, String)> {
    let creds = causeway_broker_api::Credentials::load(path).map_err(anyhow::Error::msg)?;
    let id = creds.cluster_id.clone().with_context(|| {
        format!("{} is not a cluster's credentials file (see causeway join)", path.display())
    })?;
    Ok((BrokerClient::from_credentials(&creds)?, id))
}

pub async fn export(a: ExportArgs) -> anyhow::Result<()> {
    let (client, cluster_id) = cluster_client(&a.credentials)?;
    let key = causeway_broker_api::service_key(&cluster_id, &a.namespace, &a.name);
    let generation = next_generation(&client, &key).await?;
    let svc = ServiceExportRecord {
        cluster_id,
        namespace: a.namespace,
        name: a.name,
        ips: a.ips,
        ports: a.ports,
        service_type: if a.headless {
            causeway_broker_api::ServiceType::Headless
        } else {
            causeway_broker_api::ServiceType::ClusterSetIP
        },
        endpoints: a.endpoints,
        ready_endpoints: None,
        source: causeway_broker_api::ExportSource::Cli,
        generation,
    };
    let obj = client.put_service(&svc).await?;
    println!(
        "exported {}.{}.svc.clusterset.local (revision {})",
        svc.name, svc.namespace, obj.resource_version
    );
    // The broker merged the import in the same revision: say what the set sees.
    let list = client.list().await?;
    let import = list.items.iter().find_map(|o| match &o.record {
        Record::ServiceImport(i) if i.namespace == svc.namespace && i.name == svc.name => Some(i),
        _ => None,
    });
    if let Some(i) = import {
        if let Some(ip) = i.ips.first() {
            println!("ClusterSetIP {ip}");
        }
        if let Some(why) =
            i.clusters.iter().find(|c| c.cluster_id == svc.cluster_id).and_then(|c| c.conflict.as_ref())
        {
            println!("Conflict: {why}");
        }
    }
    Ok(())
}

pub async fn unexport(a: UnexportArgs) -> anyhow::Result<()> {
    let (client, cluster_id) = cluster_client(&a.credentials)?;
    client.delete_service(&cluster_id, &a.namespace, &a.name).await?;
    println!("unexported {}/{}", a.namespace, a.name);
    Ok(())
}

/// Changes the settings given on the command line, keeps the others, prints the result
/// (with no flags: only prints).
pub async fn cluster_set(a: ClusterSetArgs) -> anyhow::Result<()> {
    let creds = crate::setup::operator_credentials(a.credentials.clone())?;
    let client = BrokerClient::from_credentials(&creds)?;
    let list = client.list().await?;
    let stored = list.items.iter().find_map(|o| match &o.record {
        Record::ClusterSet(s) => Some(s.clone()),
        _ => None,
    });
    let mut settings = stored.clone().unwrap_or_default();
    if a.overlap_mode || a.no_overlap_mode {
        settings.overlap_mode = a.overlap_mode;
    }
    for (flag, given, pool) in [
        ("--pod-pool", &a.pod_pools, &mut settings.pools.pod_cidrs),
        ("--service-pool", &a.service_pools, &mut settings.pools.service_cidrs),
        ("--global-pool", &a.global_pools, &mut settings.pools.global_cidrs),
    ] {
        if !given.is_empty() {
            for n in given {
                anyhow::ensure!(
                    n.network() == n.ip(),
                    "{flag} {n}: host bits set; did you mean {}/{}?",
                    n.network(),
                    n.prefix()
                );
            }
            pool.clone_from(given);
        }
    }
    if let Some(pool) = a.cluster_set_ip_pool {
        settings.cluster_set_ip_pool = pool;
    }
    if let Some(n) = a.max_endpoints {
        settings.quotas.max_endpoints = n;
    }
    if let Some(n) = a.max_services {
        settings.quotas.max_services = n;
    }
    let changed = stored.as_ref().map_or_else(
        || settings != causeway_broker_api::ClusterSetRecord::default(),
        |old| {
            let mut old = old.clone();
            old.generation = settings.generation;
            old != settings
        },
    );
    if changed {
        settings.generation = stored.map_or(1, |s| s.generation + 1);
        client.put_cluster_set(&settings).await?;
    }
    let list = |v: &[ipnetwork::IpNetwork]| v.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    println!("overlap mode:   {}", if settings.overlap_mode { "on" } else { "off" });
    println!("pod pools:      {}", list(&settings.pools.pod_cidrs));
    println!("service pools:  {}", list(&settings.pools.service_cidrs));
    println!("global pools:   {}", list(&settings.pools.global_cidrs));
    println!("ClusterSetIPs:  {}", settings.cluster_set_ip_pool);
    println!("max endpoints:  {} per cluster", settings.quotas.max_endpoints);
    println!("max services:   {} per cluster", settings.quotas.max_services);
    Ok(())
}

/// `show services`: the imports, then the exports with their condition (`Valid`, or
/// `Conflict` and why, as the broker merged them).
/// Of the other member clusters whose active gateway reports what it reaches, how many reach
/// `cluster` (their probes through the tunnel answer): `(reached, reporting)`, or `None` when
/// none reports.
#[must_use]
pub fn reached_by(records: &[&causeway_broker_api::Object], cluster: &str) -> Option<(usize, usize)> {
    let mut reports: std::collections::BTreeMap<&str, bool> = std::collections::BTreeMap::new();
    for o in records {
        if let Record::Endpoint(e) = &o.record
            && e.cluster_id != cluster
            && e.role == causeway_broker_api::GatewayRole::Active
            && let Some(list) = &e.reachable
        {
            *reports.entry(&e.cluster_id).or_default() |= list.iter().any(|c| c == cluster);
        }
    }
    (!reports.is_empty()).then(|| (reports.values().filter(|r| **r).count(), reports.len()))
}

/// The imports (with each serving cluster's health, from the endpoints among `records`) and
/// the exports.
pub fn table(records: &[&causeway_broker_api::Object]) -> String {
    let ports = |ports: &[ServicePort]| {
        if ports.is_empty() {
            "-".to_owned()
        } else {
            ports
                .iter()
                .map(|p| match &p.name {
                    Some(n) => format!("{}/{}({n})", p.port, p.protocol),
                    None => format!("{}/{}", p.port, p.protocol),
                })
                .collect::<Vec<_>>()
                .join(",")
        }
    };
    let imports: Vec<&causeway_broker_api::ServiceImportRecord> = records
        .iter()
        .filter_map(|o| match &o.record {
            Record::ServiceImport(i) => Some(i),
            _ => None,
        })
        .collect();
    let import_rows: Vec<Vec<String>> = imports
        .iter()
        .map(|i| {
            vec![
                i.namespace.clone(),
                i.name.clone(),
                i.service_type.to_string(),
                if i.ips.is_empty() {
                    "-".into()
                } else {
                    i.ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
                },
                ports(&i.ports),
                i.clusters
                    .iter()
                    .map(|c| match (&c.conflict, c.excluded) {
                        (_, true) => format!("{}(excluded)", c.cluster_id),
                        (Some(_), false) => format!("{}(conflict)", c.cluster_id),
                        (None, false) => c.cluster_id.clone(),
                    })
                    .collect::<Vec<_>>()
                    .join(","),
                i.clusters
                    .iter()
                    .filter(|c| !c.excluded)
                    .map(|c| match reached_by(records, &c.cluster_id) {
                        Some((k, n)) => format!("{} {k}/{n}", c.cluster_id),
                        None => format!("{} ?", c.cluster_id),
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            ]
        })
        .collect();
    let export_rows: Vec<Vec<String>> = records
        .iter()
        .filter_map(|o| match &o.record {
            Record::ServiceExport(s) => {
                let merged = imports
                    .iter()
                    .find(|i| i.namespace == s.namespace && i.name == s.name)
                    .and_then(|i| i.clusters.iter().find(|c| c.cluster_id == s.cluster_id));
                let condition = match merged.and_then(|c| c.conflict.as_deref()) {
                    Some(why) => format!("Conflict: {why}"),
                    None if merged.is_some() => "Valid".into(),
                    None => "Pending".into(),
                };
                Some(vec![
                    s.cluster_id.clone(),
                    s.namespace.clone(),
                    s.name.clone(),
                    match s.service_type {
                        causeway_broker_api::ServiceType::ClusterSetIP => {
                            s.ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
                        }
                        causeway_broker_api::ServiceType::Headless => {
                            format!("{} endpoints", s.endpoints.len())
                        }
                    },
                    ports(&s.ports),
                    s.ready_endpoints.map_or_else(|| "-".into(), |n| n.to_string()),
                    condition,
                ])
            }
            _ => None,
        })
        .collect();
    format!(
        "{}\n{}",
        crate::show::table(
            &["NAMESPACE", "NAME", "TYPE", "CLUSTERSET IP", "PORTS", "CLUSTERS", "REACHED BY"],
            &import_rows
        ),
        crate::show::table(
            &["CLUSTER", "NAMESPACE", "NAME", "EXPORTS", "PORTS", "READY", "CONDITION"],
            &export_rows
        )
    )
}

#[cfg(test)]
mod tests {
    use causeway_broker_api::{EndpointRecord, GatewayRole, Object, WireGuardKey};

    use super::*;

    fn endpoint(cluster: &str, host: &str, role: GatewayRole, reachable: Option<&[&str]>) -> Object {
        let mut e = EndpointRecord::new(cluster, host, "192.0.2.1".parse().unwrap(), WireGuardKey([1; 32]));
        e.role = role;
        e.reachable = reachable.map(|r| r.iter().map(|s| (*s).to_owned()).collect());
        Object { api_version: "causeway.io/v1".into(), resource_version: 1, record: Record::Endpoint(e) }
    }

    #[test]
    fn a_cluster_is_reached_by_the_active_gateways_that_say_so() {
        let objects = [
            endpoint("a", "gw-a", GatewayRole::Active, Some(&["b", "c"])),
            endpoint("b", "gw-b", GatewayRole::Active, Some(&["a"])),
            // A standby's view does not count: traffic goes through the active one.
            endpoint("b", "gw-b2", GatewayRole::Standby, Some(&["a", "c"])),
            // Two active gateways of one cluster (a handover) count once, reached if either says so.
            endpoint("d", "gw-d1", GatewayRole::Active, Some(&[])),
            endpoint("d", "gw-d2", GatewayRole::Active, Some(&["c"])),
            // Not reporting: left out of the count.
            endpoint("e", "gw-e", GatewayRole::Active, None),
        ];
        let refs: Vec<&Object> = objects.iter().collect();
        assert_eq!(reached_by(&refs, "c"), Some((2, 3)), "a and d reach c; b does not");
        assert_eq!(reached_by(&refs, "a"), Some((1, 2)), "b reaches a; d does not");
        assert_eq!(reached_by(&refs, "b"), Some((1, 2)));
        assert_eq!(reached_by(&[&objects[5]], "a"), None, "nobody reports");
    }
}
