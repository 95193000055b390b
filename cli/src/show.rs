//! `causeway show …`: tables for people, `--output json` for scripts.

use std::path::PathBuf;

use anyhow::Context as _;
use causeway_broker_api::{BrokerClient, Record};
use clap::Subcommand;

pub use causeway_cli_format::{Output, table};

#[derive(clap::Args)]
pub struct ShowArgs {
    #[command(subcommand)]
    what: What,
    /// `table` for people, `json` for scripts.
    #[arg(long, short, global = true, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Subcommand)]
enum What {
    /// Clusters registered with the broker.
    Clusters {
        /// Admin or cluster credentials (default: the local sandbox's admin).
        #[arg(long, env = "CAUSEWAY_CREDENTIALS")]
        credentials: Option<PathBuf>,
    },
    /// Gateway endpoints registered with the broker.
    Endpoints {
        /// Admin or cluster credentials (default: the local sandbox's admin).
        #[arg(long, env = "CAUSEWAY_CREDENTIALS")]
        credentials: Option<PathBuf>,
    },
    /// The cluster set's services (each name's merged import: type, ClusterSetIP, ports,
    /// clusters), then every cluster's export with its KEP-1645 condition.
    Services {
        /// Admin or cluster credentials (default: the local sandbox's admin).
        #[arg(long, env = "CAUSEWAY_CREDENTIALS")]
        credentials: Option<PathBuf>,
    },
    /// Cluster-set policy rules in evaluation order, and the default action (drops per rule:
    /// the gateways' `causeway_policy_drops_total` metric).
    Policies {
        /// Admin or cluster credentials (default: the local sandbox's admin).
        #[arg(long, env = "CAUSEWAY_CREDENTIALS")]
        credentials: Option<PathBuf>,
    },
    /// A gateway's tunnels to the other clusters, as the gateway sees them.
    Connections {
        /// Status socket of the gateway (repeatable; default: the sandbox's gateways, else
        /// /run/causeway/gateway.sock).
        #[arg(long = "status-socket", env = "CAUSEWAY_STATUS_SOCKET")]
        sockets: Vec<PathBuf>,
    },
}

fn join<T: ToString>(v: &[T]) -> String {
    if v.is_empty() { "-".into() } else { v.iter().map(ToString::to_string).collect::<Vec<_>>().join(",") }
}

pub async fn run(a: ShowArgs) -> anyhow::Result<()> {
    match a.what {
        What::Clusters { credentials } => {
            let creds = crate::setup::operator_credentials(credentials)?;
            let list = BrokerClient::from_credentials(&creds)?.list().await?;
            let clusters: Vec<_> = list
                .items
                .iter()
                .filter_map(|o| match &o.record {
                    Record::Cluster(c) => Some((o, c)),
                    _ => None,
                })
                .collect();
            match a.output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&clusters.iter().map(|(o, _)| o).collect::<Vec<_>>())?
                ),
                Output::Table => print!(
                    "{}",
                    table(
                        &["CLUSTER", "POD CIDRS", "SERVICE CIDRS", "GLOBAL", "GENERATION", "REVISION"],
                        &clusters
                            .iter()
                            .map(|(o, c)| vec![
                                c.cluster_id.clone(),
                                join(&c.pod_cidrs),
                                join(&c.service_cidrs),
                                // Overlap mode: each CIDR's global prefix.
                                if c.global_cidrs.is_empty() {
                                    "-".to_owned()
                                } else {
                                    c.global_cidrs
                                        .iter()
                                        .map(|g| format!("{}→{}", g.cidr, g.global))
                                        .collect::<Vec<_>>()
                                        .join(",")
                                },
                                c.generation.to_string(),
                                o.resource_version.to_string(),
                            ])
                            .collect::<Vec<_>>()
                    )
                ),
            }
        }
        What::Services { credentials } => {
            let creds = crate::setup::operator_credentials(credentials)?;
            let list = BrokerClient::from_credentials(&creds)?.list().await?;
            let services: Vec<_> = list
                .items
                .iter()
                .filter(|o| matches!(o.record, Record::ServiceImport(_) | Record::ServiceExport(_)))
                .collect();
            match a.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&services)?),
                // With the endpoints: which clusters reach each serving cluster.
                Output::Table => print!(
                    "{}",
                    crate::services::table(
                        &list
                            .items
                            .iter()
                            .filter(|o| matches!(
                                o.record,
                                Record::ServiceImport(_) | Record::ServiceExport(_) | Record::Endpoint(_)
                            ))
                            .collect::<Vec<_>>()
                    )
                ),
            }
        }
        What::Policies { credentials } => {
            let creds = crate::setup::operator_credentials(credentials)?;
            let list = BrokerClient::from_credentials(&creds)?.list().await?;
            let policy: Vec<_> = list
                .items
                .iter()
                .filter(|o| matches!(o.record, Record::Policy(_) | Record::PolicyDefault(_)))
                .collect();
            match a.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&policy)?),
                Output::Table => {
                    let records: Vec<Record> = policy.iter().map(|o| o.record.clone()).collect();
                    print!("{}", crate::policy::table(&records));
                }
            }
        }
        What::Endpoints { credentials } => {
            let creds = crate::setup::operator_credentials(credentials)?;
            let list = BrokerClient::from_credentials(&creds)?.list().await?;
            let eps: Vec<_> = list
                .items
                .iter()
                .filter_map(|o| match &o.record {
                    Record::Endpoint(e) => Some((o, e)),
                    _ => None,
                })
                .collect();
            match a.output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&eps.iter().map(|(o, _)| o).collect::<Vec<_>>())?
                ),
                Output::Table => print!(
                    "{}",
                    table(
                        &[
                            "CLUSTER",
                            "HOST",
                            "PRIVATE IPS",
                            "PUBLIC IPS",
                            "FOUND",
                            "PORT",
                            "BACKEND",
                            "ROLE",
                            "REACHES",
                            "PUBLIC KEY"
                        ],
                        &eps.iter()
                            .map(|(_, e)| vec![
                                e.cluster_id.clone(),
                                e.hostname.clone(),
                                join(&e.private_ips),
                                join(&e.public_ips),
                                // Found by the gateway: where its NAT maps its WireGuard socket
                                // (STUN), and the relay it is registered with.
                                join(
                                    &e.candidates
                                        .iter()
                                        .map(|c| format!(
                                            "{} ({})",
                                            c.address,
                                            format!("{:?}", c.kind).to_lowercase()
                                        ))
                                        .collect::<Vec<_>>()
                                ),
                                e.port.to_string(),
                                e.backend.clone(),
                                format!("{:?}", e.role).to_lowercase(),
                                e.reachable.as_ref().map_or_else(
                                    || "?".to_owned(),
                                    |r| if r.is_empty() { "-".to_owned() } else { r.join(",") }
                                ),
                                e.public_key.to_string(),
                            ])
                            .collect::<Vec<_>>()
                    )
                ),
            }
        }
        What::Connections { sockets } => {
            let sockets = if sockets.is_empty() { default_status_sockets() } else { sockets };
            let mut statuses = Vec::new();
            let mut failed = Vec::new();
            for s in &sockets {
                match causeway_gateway::status::fetch(s) {
                    Ok(status) => statuses.push(status),
                    Err(e) => failed.push((s, e)),
                }
            }
            // Several gateways (the sandbox): one that is down is reported and the others shown.
            if statuses.is_empty()
                && let Some((s, e)) = failed.pop()
            {
                return Err(e).with_context(|| format!("reading gateway status from {}", s.display()));
            }
            for (s, e) in &failed {
                eprintln!("{}: {e}", s.display());
            }
            match a.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&statuses)?),
                Output::Table => {
                    let rows: Vec<Vec<String>> = statuses
                        .iter()
                        .flat_map(|s| {
                            s.connections
                                .iter()
                                .map(|c| {
                                    vec![
                                        s.cluster_id.clone(),
                                        c.cluster_id.clone(),
                                        c.endpoint.clone(),
                                        c.path.clone().unwrap_or_else(|| "-".into()),
                                        c.status.clone(),
                                        c.carrier.as_ref().map_or("-".into(), |k| {
                                            let provisional =
                                                if k.provisional { ", provisional" } else { "" };
                                            format!("{:.0}s ({}{provisional})", k.since_secs, k.reason)
                                        }),
                                        c.rtt_secs.map_or("-".into(), |v| format!("{:.3} ms", v * 1000.0)),
                                        format!("{:.0}%", c.loss * 100.0),
                                        c.last_handshake_secs.map_or("-".into(), |v| format!("{v:.0}s ago")),
                                        c.datapath.tx_bytes.to_string(),
                                        c.datapath.rx_bytes.to_string(),
                                    ]
                                })
                                .chain(s.standbys.iter().map(|c| {
                                    // Warm standbys: sessions ready for a failover, no traffic.
                                    vec![
                                        s.cluster_id.clone(),
                                        format!("{} (standby)", c.cluster_id),
                                        c.endpoint.clone(),
                                        "-".into(),
                                        c.status.clone(),
                                        "-".into(),
                                        "-".into(),
                                        "-".into(),
                                        c.last_handshake_secs.map_or("-".into(), |v| format!("{v:.0}s ago")),
                                        "-".into(),
                                        "-".into(),
                                    ]
                                }))
                        })
                        .collect();
                    print!(
                        "{}",
                        table(
                            &[
                                "LOCAL",
                                "REMOTE",
                                "ENDPOINT",
                                "PATH",
                                "STATUS",
                                "CARRIER SINCE",
                                "RTT",
                                "LOSS",
                                "HANDSHAKE",
                                "TX BYTES",
                                "RX BYTES"
                            ],
                            &rows
                        )
                    );
                    // Refusals are the operator's to fix (a member's records), so they are
                    // shown where the connections are, not only in the gateway's log.
                    for s in &statuses {
                        for (cluster, why) in &s.refused {
                            println!("{}: not routing {cluster}: {why}", s.cluster_id);
                        }
                        for prefix in &s.route_conflicts {
                            println!(
                                "{}: {prefix} not routed: a route Causeway did not create holds it",
                                s.cluster_id
                            );
                        }
                        for (step, why) in &s.reconcile_failures {
                            println!(
                                "{}: reconcile step {step} failed (retried on the next pass): {why}",
                                s.cluster_id
                            );
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Where `show connections` looks without `--status-socket`: the sandbox's gateways when one
/// runs here, else the gateway's default socket.
fn default_status_sockets() -> Vec<std::path::PathBuf> {
    #[cfg(feature = "sandbox")]
    return causeway_lab::sandbox::status_sockets();
    #[cfg(not(feature = "sandbox"))]
    vec![std::path::PathBuf::from("/run/causeway/gateway.sock")]
}
