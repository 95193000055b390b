//! `causeway policy apply|delete|default`: cluster-set network policy, written to the broker
//! with the admin credential; every gateway compiles it into its eBPF maps.

use std::path::PathBuf;

use anyhow::Context as _;

use causeway_broker_api::{
    BrokerClient, PolicyAction, PolicyDefaultRecord, PolicyPeer, PolicyProtocol, PolicyRecord, PortRange,
    Record,
};
use clap::{Subcommand, ValueEnum};
use ipnetwork::IpNetwork;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Protocol {
    Any,
    Tcp,
    Udp,
    Icmp,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Action {
    Allow,
    Deny,
}

impl From<Action> for PolicyAction {
    fn from(a: Action) -> Self {
        match a {
            Action::Allow => Self::Allow,
            Action::Deny => Self::Deny,
        }
    }
}

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// Create or replace a rule. Rules run by ascending --priority (then name); the first
    /// that matches a packet decides; `policy default` decides when none matches.
    Apply {
        /// The rule's name (DNS-1123 label).
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        name: Option<String>,
        /// What a matching packet gets.
        #[arg(long, value_enum, required_unless_present = "file")]
        action: Option<Action>,
        /// Apply the ClusterSetPolicy objects of this YAML file instead (the CRD's format, see
        /// deploy/manifests/crds.yaml); all are checked before any is written.
        #[arg(long, short = 'f')]
        file: Option<PathBuf>,
        /// Source cluster (its pod and service CIDRs); omit for any.
        #[arg(long)]
        from_cluster: Option<String>,
        /// Source CIDRs (repeatable; inside --from-cluster if both are given).
        #[arg(long = "from-cidr", value_delimiter = ',')]
        from_cidrs: Vec<IpNetwork>,
        /// Destination cluster (its pod and service CIDRs); omit for any.
        #[arg(long)]
        to_cluster: Option<String>,
        /// Destination CIDRs (repeatable; inside --to-cluster if both are given).
        #[arg(long = "to-cidr", value_delimiter = ',')]
        to_cidrs: Vec<IpNetwork>,
        /// The packets' protocol.
        #[arg(long, value_enum, default_value = "any")]
        protocol: Protocol,
        /// Destination ports or ranges, e.g. 80,8000-8080 (TCP/UDP only; omit for all).
        #[arg(long = "port", value_delimiter = ',', value_parser = parse_ports)]
        ports: Vec<PortRange>,
        /// Lower runs first.
        #[arg(long, default_value_t = 1000)]
        priority: u32,
        /// The admin credentials (default: the local sandbox's admin).
        #[arg(long, env = "CAUSEWAY_CREDENTIALS")]
        credentials: Option<PathBuf>,
    },
    /// Delete a rule.
    Delete {
        /// The rule's name.
        name: String,
        /// The admin credentials (default: the local sandbox's admin).
        #[arg(long, env = "CAUSEWAY_CREDENTIALS")]
        credentials: Option<PathBuf>,
    },
    /// Set what happens to traffic no rule matches (the set starts with allow).
    Default {
        /// What a packet no rule matches gets.
        #[arg(value_enum)]
        action: Action,
        /// The admin credentials (default: the local sandbox's admin).
        #[arg(long, env = "CAUSEWAY_CREDENTIALS")]
        credentials: Option<PathBuf>,
    },
}

/// A port or range, refused here when the broker would refuse it (port 0, a range that runs
/// backwards), so the error names the flag.
fn parse_ports(s: &str) -> Result<PortRange, String> {
    let r: PortRange = s.parse()?;
    if r.first == 0 || r.first > r.last {
        return Err(format!("{s:?}: ports are 1-65535, and a range's first port is no larger than its last"));
    }
    Ok(r)
}

async fn admin(credentials: Option<PathBuf>) -> anyhow::Result<BrokerClient> {
    let creds = crate::setup::operator_credentials(credentials)?;
    Ok(BrokerClient::from_credentials(&creds)?)
}

pub async fn run(cmd: PolicyCmd) -> anyhow::Result<()> {
    match cmd {
        PolicyCmd::Apply { file: Some(file), credentials, .. } => {
            let text =
                std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let rules = causeway_deploy::crds::policies_from_yaml(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let client = admin(credentials).await?;
            let stored: std::collections::BTreeMap<String, PolicyRecord> = client
                .list()
                .await?
                .items
                .into_iter()
                .filter_map(|o| match o.record {
                    Record::Policy(p) => Some((p.name.clone(), p)),
                    _ => None,
                })
                .collect();
            for mut rule in rules {
                // Re-applying the same file writes nothing (and wakes no gateway).
                let previous = stored.get(&rule.name);
                rule.generation = previous.map_or(1, |p| p.generation);
                if previous == Some(&rule) {
                    println!("policy {} unchanged", rule.name);
                    continue;
                }
                rule.generation = previous.map_or(1, |p| p.generation + 1);
                let obj = client.put_policy(&rule).await?;
                println!("policy {} stored at revision {}", rule.name, obj.resource_version);
            }
        }
        PolicyCmd::Apply {
            name: Some(name),
            action: Some(action),
            from_cluster,
            from_cidrs,
            to_cluster,
            to_cidrs,
            protocol,
            ports,
            priority,
            credentials,
            file: None,
        } => {
            let client = admin(credentials).await?;
            // Keep the generation moving forward over an existing rule of that name.
            let generation =
                crate::services::next_generation(&client, &causeway_broker_api::policy_key(&name)).await?;
            let rule = PolicyRecord {
                name,
                priority,
                from: PolicyPeer { cluster: from_cluster, cidrs: from_cidrs },
                to: PolicyPeer { cluster: to_cluster, cidrs: to_cidrs },
                protocol: match protocol {
                    Protocol::Any => PolicyProtocol::Any,
                    Protocol::Tcp => PolicyProtocol::Tcp,
                    Protocol::Udp => PolicyProtocol::Udp,
                    Protocol::Icmp => PolicyProtocol::Icmp,
                },
                ports,
                action: action.into(),
                generation,
            };
            let obj = client.put_policy(&rule).await?;
            println!("policy {} stored at revision {}", rule.name, obj.resource_version);
        }
        PolicyCmd::Apply { .. } => anyhow::bail!("give a rule's NAME and --action, or -f FILE"),
        PolicyCmd::Delete { name, credentials } => {
            admin(credentials).await?.delete_policy(&name).await?;
            println!("policy {name} deleted");
        }
        PolicyCmd::Default { action, credentials } => {
            let client = admin(credentials).await?;
            let generation =
                crate::services::next_generation(&client, causeway_broker_api::POLICY_DEFAULT_KEY).await?;
            let d = PolicyDefaultRecord { action: action.into(), generation };
            client.put_policy_default(&d).await?;
            println!("default policy action: {action:?}");
        }
    }
    Ok(())
}

fn peer(p: &PolicyPeer) -> String {
    let mut parts = Vec::new();
    if let Some(c) = &p.cluster {
        parts.push(format!("cluster {c}"));
    }
    if !p.cidrs.is_empty() {
        parts.push(p.cidrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(","));
    }
    if parts.is_empty() { "*".into() } else { parts.join(" ") }
}

/// `show policies`: the rules in evaluation order, and the default.
pub fn table(records: &[Record]) -> String {
    let mut rules: Vec<&PolicyRecord> = records
        .iter()
        .filter_map(|r| match r {
            Record::Policy(p) => Some(p),
            _ => None,
        })
        .collect();
    rules.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
    let default = records
        .iter()
        .find_map(|r| match r {
            Record::PolicyDefault(d) => Some(d.action),
            _ => None,
        })
        .unwrap_or_default();
    let rows: Vec<Vec<String>> = rules
        .iter()
        .map(|p| {
            vec![
                p.priority.to_string(),
                p.name.clone(),
                peer(&p.from),
                peer(&p.to),
                format!("{:?}", p.protocol).to_lowercase(),
                if p.ports.is_empty() {
                    "*".into()
                } else {
                    p.ports.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
                },
                format!("{:?}", p.action).to_lowercase(),
            ]
        })
        .collect();
    let mut out =
        crate::show::table(&["PRIORITY", "NAME", "FROM", "TO", "PROTOCOL", "PORTS", "ACTION"], &rows);
    out.push_str(&format!("default: {}\n", format!("{default:?}").to_lowercase()));
    out
}
