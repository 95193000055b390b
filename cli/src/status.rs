//! `causeway status [--wait [--timeout S]]`: the whole cluster set's tunnels from the
//! operator's machine, as the gateways report them through the broker (each active gateway's
//! endpoint record carries `reachable`, the clusters its in-band probes reach now). With
//! `--wait`, it returns when every cluster's active gateway reaches every other cluster, and
//! fails naming what is still missing when the timeout runs out.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::bail;
use causeway_broker_api::{BrokerClient, GatewayRole, ListResponse, Record};

#[derive(clap::Args)]
pub struct StatusArgs {
    /// Admin or cluster credentials (default: the local sandbox's admin).
    #[arg(long, env = "CAUSEWAY_CREDENTIALS")]
    credentials: Option<PathBuf>,
    /// Wait until every cluster's active gateway reaches every other cluster.
    #[arg(long)]
    wait: bool,
    /// How long `--wait` waits, in seconds.
    #[arg(long, default_value_t = 120, requires = "wait")]
    timeout: u64,
}

/// One cluster's line: its active gateway and what that gateway reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub cluster: String,
    /// The active gateway's host, if the cluster has one.
    pub gateway: Option<String>,
    /// The other clusters it reaches, if it reported any.
    pub reaches: Option<Vec<String>>,
    /// The other clusters it does not reach (all of them without a gateway or a report).
    pub missing: Vec<String>,
}

/// A cluster's active gateway: its host and what it reported reaching.
type Active = (String, Option<Vec<String>>);

/// The cluster set as the broker's records say, one row per cluster, by id.
#[must_use]
pub fn summarize(list: &ListResponse) -> Vec<Row> {
    let mut clusters: BTreeMap<String, Option<Active>> = BTreeMap::new();
    for o in &list.items {
        if let Record::Cluster(c) = &o.record {
            clusters.entry(c.cluster_id.clone()).or_default();
        }
    }
    for o in &list.items {
        if let Record::Endpoint(e) = &o.record
            && e.role == GatewayRole::Active
            && let Some(slot) = clusters.get_mut(&e.cluster_id)
        {
            *slot = Some((e.hostname.clone(), e.reachable.clone()));
        }
    }
    let ids: Vec<String> = clusters.keys().cloned().collect();
    clusters
        .into_iter()
        .map(|(cluster, active)| {
            let (gateway, reaches) = active.map_or((None, None), |(h, r)| (Some(h), r));
            let missing = ids
                .iter()
                .filter(|other| **other != cluster)
                .filter(|other| !reaches.as_ref().is_some_and(|r| r.contains(other)))
                .cloned()
                .collect();
            Row { cluster, gateway, reaches, missing }
        })
        .collect()
}

/// What is still missing, in words, or `None` when every tunnel is up. A cluster without an
/// active gateway, or whose gateway has not reported, is missing even when it is the set's
/// only one (`join` waits for its gateway).
#[must_use]
pub fn missing(rows: &[Row]) -> Option<String> {
    let gaps: Vec<String> = rows
        .iter()
        .filter(|r| !r.missing.is_empty() || r.reaches.is_none())
        .map(|r| match (&r.gateway, &r.reaches) {
            (None, _) => format!("{} has no active gateway", r.cluster),
            (Some(g), None) => format!("{}'s gateway {g} has not reported its tunnels yet", r.cluster),
            (Some(_), Some(_)) => format!("{} does not reach {}", r.cluster, r.missing.join(", ")),
        })
        .collect();
    (!gaps.is_empty()).then(|| gaps.join("; "))
}

pub fn render(rows: &[Row]) -> String {
    let others = rows.len().saturating_sub(1);
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.cluster.clone(),
                r.gateway.clone().unwrap_or_else(|| "-".into()),
                match &r.reaches {
                    None => "?".into(),
                    Some(_) => format!("{}/{others}", others - r.missing.len()),
                },
                if r.missing.is_empty() { "-".into() } else { r.missing.join(",") },
            ]
        })
        .collect();
    causeway_cli_format::table(&["CLUSTER", "ACTIVE GATEWAY", "CONNECTED", "MISSING"], &cells)
}

/// Polls `fetch` every `every` until nothing is missing or `timeout` has passed; returns the
/// last rows, or an error naming what was still missing.
pub async fn wait_until_connected<F, Fut>(
    mut fetch: F,
    timeout: Duration,
    every: Duration,
) -> anyhow::Result<Vec<Row>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<ListResponse>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let rows = summarize(&fetch().await?);
        let Some(gaps) = missing(&rows) else { return Ok(rows) };
        if tokio::time::Instant::now() >= deadline {
            bail!("not every tunnel is up after {timeout:?}: {gaps}");
        }
        tokio::time::sleep(every).await;
    }
}

pub async fn run(a: StatusArgs) -> anyhow::Result<()> {
    let creds = crate::setup::operator_credentials(a.credentials)?;
    let client = BrokerClient::from_credentials(&creds)?;
    let fetch = || async { Ok(client.list().await?) };
    let rows = if a.wait {
        match wait_until_connected(fetch, Duration::from_secs(a.timeout), Duration::from_secs(1)).await {
            Ok(rows) => rows,
            Err(e) => {
                print!("{}", render(&summarize(&client.list().await?)));
                return Err(e);
            }
        }
    } else {
        summarize(&fetch().await?)
    };
    print!("{}", render(&rows));
    if a.wait {
        println!("every tunnel is up");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use causeway_broker_api::{ClusterRecord, EndpointRecord, Object, WireGuardKey};

    use super::*;

    /// A cluster, its gateway's role (none: no gateway), and what that gateway reports.
    type Report<'a> = (&'a str, Option<GatewayRole>, Option<&'a [&'a str]>);

    fn list(reports: &[Report<'_>]) -> ListResponse {
        let mut items = Vec::new();
        for (i, (id, role, reaches)) in reports.iter().enumerate() {
            let n = u8::try_from(i + 1).unwrap();
            let c = ClusterRecord::new(id, vec![format!("10.{n}.0.0/16").parse().unwrap()], Vec::new());
            items.push(Object::new(1, Record::Cluster(c)));
            if let Some(role) = role {
                let mut e = EndpointRecord::new(
                    id,
                    &format!("{id}-gw"),
                    format!("172.31.0.{n}").parse().unwrap(),
                    WireGuardKey([n; 32]),
                );
                e.role = *role;
                e.reachable = reaches.map(|r| r.iter().map(|s| (*s).to_owned()).collect());
                items.push(Object::new(1, Record::Endpoint(e)));
            }
        }
        ListResponse { resource_version: 1, items }
    }

    #[test]
    fn a_set_whose_gateways_reach_every_other_cluster_is_connected() {
        let l = list(&[
            ("east", Some(GatewayRole::Active), Some(&["west", "north"])),
            ("north", Some(GatewayRole::Active), Some(&["east", "west"])),
            ("west", Some(GatewayRole::Active), Some(&["east", "north"])),
        ]);
        let rows = summarize(&l);
        assert_eq!(rows.iter().map(|r| r.cluster.as_str()).collect::<Vec<_>>(), ["east", "north", "west"]);
        assert!(rows.iter().all(|r| r.missing.is_empty()));
        assert_eq!(missing(&rows), None);
        assert!(render(&rows).contains("east     east-gw         2/2        -"), "{}", render(&rows));
    }

    #[test]
    fn what_is_missing_is_named() {
        let l = list(&[
            ("east", Some(GatewayRole::Active), Some(&["west"])),
            ("north", None, None),
            ("south", Some(GatewayRole::Standby), Some(&["east"])),
            ("west", Some(GatewayRole::Active), None),
        ]);
        let rows = summarize(&l);
        assert_eq!(rows[0].missing, ["north", "south"]);
        assert_eq!(rows[0].reaches.as_deref(), Some(&["west".to_owned()][..]));
        assert_eq!(
            missing(&rows).unwrap(),
            "east does not reach north, south; north has no active gateway; \
             south has no active gateway; west's gateway west-gw has not reported its tunnels yet"
        );
        let table = render(&rows);
        assert!(table.contains("1/3") && table.contains("north,south") && table.contains('?'), "{table}");
    }

    #[tokio::test]
    async fn wait_returns_once_connected_and_times_out_naming_the_gap() {
        let before = list(&[
            ("east", Some(GatewayRole::Active), Some(&[])),
            ("west", Some(GatewayRole::Active), Some(&["east"])),
        ]);
        let after = list(&[
            ("east", Some(GatewayRole::Active), Some(&["west"])),
            ("west", Some(GatewayRole::Active), Some(&["east"])),
        ]);
        // Connected at the third reading.
        let mut calls = 0;
        let rows = wait_until_connected(
            || {
                calls += 1;
                let l = if calls >= 3 { after.clone() } else { before.clone() };
                async move { Ok(l) }
            },
            Duration::from_secs(5),
            Duration::from_millis(10),
        )
        .await
        .unwrap();
        assert_eq!((calls, missing(&rows)), (3, None));
        // Never connected: an error naming the gap, after the timeout.
        let started = std::time::Instant::now();
        let err = wait_until_connected(
            || {
                let l = before.clone();
                async move { Ok(l) }
            },
            Duration::from_millis(300),
            Duration::from_millis(10),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(err, "not every tunnel is up after 300ms: east does not reach west");
        // A broker that cannot be read is an error at once.
        let err = wait_until_connected(
            || async { Err(anyhow::anyhow!("cannot reach the broker")) },
            Duration::from_secs(5),
            Duration::from_millis(10),
        )
        .await
        .unwrap_err();
        assert_eq!(err.to_string(), "cannot reach the broker");
    }
}
