//! `causeway verify`: the cluster set's end-to-end check. On Kubernetes (one `--context` per
//! member cluster) it runs `causeway_deploy::verify` and prints its matrix; without contexts
//! it checks the local sandbox.

use std::{path::PathBuf, time::Duration};

use anyhow::bail;
use causeway_deploy::{apply::JobOutcome, verify::Check};

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// A member cluster's context in the kubeconfig (repeatable; two or more): verify that
    /// cluster set on Kubernetes. Without any: the local sandbox.
    #[arg(long = "context")]
    contexts: Vec<String>,
    /// The kubeconfig holding the contexts (default: $KUBECONFIG or ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Image of the test pods and probes: it needs `sh`, `httpd` and `wget` (busybox has them).
    #[arg(long, default_value = "busybox:1.36")]
    image: String,
    /// Namespace of the test objects in every member cluster.
    #[arg(long, default_value = "causeway-system")]
    namespace: String,
    /// Seconds to wait for the test pods, and for each cluster's probes.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

pub async fn run(a: VerifyArgs) -> anyhow::Result<()> {
    if a.contexts.is_empty() {
        return sandbox();
    }
    if a.contexts.len() < 2 {
        bail!("verify needs two member clusters or more (--context per cluster); got {}", a.contexts.len());
    }
    let mut clusters = Vec::new();
    for ctx in &a.contexts {
        let client = causeway_deploy::connect(a.kubeconfig.as_deref(), Some(ctx)).await?;
        clusters.push((ctx.clone(), client));
    }
    let plan = causeway_deploy::verify::Plan {
        namespace: a.namespace,
        image: a.image,
        id: causeway_deploy::verify::new_id(),
        timeout: Duration::from_secs(a.timeout.max(10)),
        poll: Duration::from_secs(2),
    };
    verify_clusters(&clusters, &plan).await
}

#[cfg(feature = "sandbox")]
fn sandbox() -> anyhow::Result<()> {
    causeway_lab::sandbox::verify()
}

#[cfg(not(feature = "sandbox"))]
fn sandbox() -> anyhow::Result<()> {
    bail!("this build has no sandbox: name the member clusters with --context (one per cluster)")
}

/// Runs the check on `clusters`, prints the matrix, fails naming every pair that failed.
pub async fn verify_clusters(
    clusters: &[(String, causeway_deploy::Client)],
    plan: &causeway_deploy::verify::Plan,
) -> anyhow::Result<()> {
    eprintln!("verifying {} clusters (run {}):", clusters.len(), plan.id);
    let checks = causeway_deploy::verify::run(clusters, plan, |l| eprintln!("  {l}")).await?;
    let names: Vec<String> = clusters.iter().map(|(n, _)| n.clone()).collect();
    print!("{}", matrix(&names, &checks));
    let failures: Vec<String> = checks
        .iter()
        .filter(|c| c.outcome != JobOutcome::Succeeded)
        .map(|c| {
            let what = match &c.to {
                Some(to) => format!("{} → {to}: pod unreachable", c.from),
                None => format!("{} → the exported service: unreachable", c.from),
            };
            match &c.outcome {
                JobOutcome::Failed(why) => format!("{what} ({why})"),
                JobOutcome::TimedOut => format!("{what} (no answer within the timeout)"),
                JobOutcome::Succeeded => what,
            }
        })
        .collect();
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    let n = names.len();
    println!("verified: {} pod-to-pod pairs and the exported service from {n} clusters", n * (n - 1));
    Ok(())
}

/// FROM \ TO table: OK or FAIL per pair, `-` on the diagonal, and the exported service.
#[must_use]
pub fn matrix(names: &[String], checks: &[Check]) -> String {
    let cell = |from: &str, to: Option<&str>| {
        checks
            .iter()
            .find(|c| c.from == from && c.to.as_deref() == to)
            .map_or("?", |c| if c.outcome == JobOutcome::Succeeded { "OK" } else { "FAIL" })
            .to_owned()
    };
    let mut header = vec!["FROM \\ TO"];
    header.extend(names.iter().map(String::as_str));
    header.push("EXPORTED SERVICE");
    let rows: Vec<Vec<String>> = names
        .iter()
        .map(|from| {
            let mut row = vec![from.clone()];
            row.extend(names.iter().map(|to| if to == from { "-".to_owned() } else { cell(from, Some(to)) }));
            row.push(cell(from, None));
            row
        })
        .collect();
    causeway_cli_format::table(&header, &rows)
}

#[cfg(test)]
mod tests {
    use causeway_deploy::testing::{Reply, Seen, client, not_found};
    use serde_json::json;

    use super::*;

    /// A member cluster whose test pod runs at `ip`; its probe Jobs succeed except those whose
    /// name ends with one of `failing`.
    fn member(
        ip: &'static str,
        failing: &'static [&'static str],
    ) -> (causeway_deploy::Client, causeway_deploy::testing::Log) {
        client(move |r: &Seen| {
            let path = r.path();
            match r.method.as_str() {
                "PATCH" => Reply::Json(200, r.body.clone()),
                "GET" if path.contains("/pods/") => Reply::Json(
                    200,
                    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                           "status": {"phase": "Running", "podIP": ip}}),
                ),
                "GET" if path.contains("/jobs/") => {
                    let status = if failing.iter().any(|f| path.ends_with(f)) {
                        json!({"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]})
                    } else {
                        json!({"succeeded": 1})
                    };
                    Reply::Json(
                        200,
                        json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"}, "status": status}),
                    )
                }
                "DELETE" => Reply::Json(200, causeway_deploy::testing::status(200, "", "")),
                _ => not_found("it"),
            }
        })
    }

    fn plan() -> causeway_deploy::verify::Plan {
        causeway_deploy::verify::Plan {
            namespace: "causeway-system".into(),
            image: "busybox:1.36".into(),
            id: "abc123".into(),
            timeout: Duration::from_secs(5),
            poll: Duration::from_millis(10),
        }
    }

    #[tokio::test]
    async fn every_pair_and_the_service_are_probed_and_a_failure_is_named() {
        let (east, east_log) = member("10.1.0.5", &[]);
        let (west, west_log) = member("10.2.0.7", &["-1-0"]);
        let clusters = vec![("east".to_owned(), east), ("west".to_owned(), west)];
        let e = verify_clusters(&clusters, &plan()).await.unwrap_err().to_string();
        assert_eq!(e, "west → east: pod unreachable (BackoffLimitExceeded)");
        let east_log = east_log.lock().unwrap();
        // East's probe of west fetches from west's pod; its service probe uses the set's name.
        let job = |log: &[Seen], name: &str| {
            log.iter()
                .find(|r| r.method == "PATCH" && r.path().ends_with(name))
                .map(|r| {
                    r.body["spec"]["template"]["spec"]["containers"][0]["command"][2]
                        .as_str()
                        .unwrap()
                        .to_owned()
                })
                .unwrap_or_else(|| panic!("no Job {name}"))
        };
        assert!(
            job(&east_log, "causeway-verify-abc123-0-1").contains("wget -q -O- -T 3 http://10.2.0.7:8080/")
        );
        assert!(
            job(&east_log, "causeway-verify-abc123-0-svc")
                .contains("http://causeway-verify-abc123.causeway-system.svc.clusterset.local:8080/")
        );
        // The test pod, its Service and the ServiceExport were made, then removed with the Jobs.
        for kind in ["pods", "services", "serviceexports", "jobs"] {
            assert!(
                east_log
                    .iter()
                    .any(|r| r.method == "DELETE"
                        && r.path().contains(&format!("/{kind}/causeway-verify-abc123"))),
                "{kind} not removed"
            );
        }
        let export =
            east_log.iter().find(|r| r.method == "PATCH" && r.path().contains("/serviceexports/")).unwrap();
        assert_eq!(export.body["apiVersion"], "multicluster.x-k8s.io/v1alpha1");
        assert!(west_log.lock().unwrap().iter().any(|r| r.path().ends_with("causeway-verify-abc123-1-0")));
    }

    #[test]
    fn the_matrix_marks_each_pair() {
        let names = vec!["east".to_owned(), "west".to_owned()];
        let checks = vec![
            Check { from: "east".into(), to: Some("west".into()), outcome: JobOutcome::Succeeded },
            Check { from: "east".into(), to: None, outcome: JobOutcome::Succeeded },
            Check { from: "west".into(), to: Some("east".into()), outcome: JobOutcome::TimedOut },
            Check { from: "west".into(), to: None, outcome: JobOutcome::Failed("x".into()) },
        ];
        let text = matrix(&names, &checks);
        let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
        assert_eq!(lines[1].split_whitespace().collect::<Vec<_>>(), ["east", "-", "OK", "OK"]);
        assert_eq!(lines[2].split_whitespace().collect::<Vec<_>>(), ["west", "FAIL", "-", "FAIL"]);
    }
}
