//! Server-side apply of [`Manifest`]s, and their removal. Every object is applied with field
//! manager `causeway`, so re-running `deploy-broker`/`join` converges instead of failing, and
//! `uninstall` deletes exactly the objects the generator names.

use std::collections::BTreeMap;

use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Node, Secret},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client,
    api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams},
};

use crate::manifests::{GATEWAY_LABEL, MANAGER, Manifest, ManifestError, manifest};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("applying {what}: {source}")]
    Apply {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{} step(s) of the removal failed: {}", .0.len(), .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Removal(Vec<ApplyError>),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

fn resource(m: &Manifest) -> ApiResource {
    let (group, version) = m.api_version.rsplit_once('/').unwrap_or(("", &m.api_version));
    let gvk = GroupVersionKind::gvk(group, version, &m.kind);
    // Every kind Causeway applies pluralises by adding "s".
    ApiResource::from_gvk_with_plural(&gvk, &format!("{}s", m.kind.to_lowercase()))
}

fn api(client: &Client, m: &Manifest) -> Api<DynamicObject> {
    match &m.namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource(m)),
        None => Api::all_with(client.clone(), &resource(m)),
    }
}

/// Server-side applies `manifests` in order, reporting each to `progress`.
pub async fn apply(
    client: &Client,
    manifests: &[Manifest],
    mut progress: impl FnMut(&str),
) -> Result<(), ApplyError> {
    let params = PatchParams::apply(MANAGER).force();
    for m in manifests {
        api(client, m)
            .patch(&m.name, &params, &Patch::Apply(&m.json))
            .await
            .map_err(|source| ApplyError::Apply { what: m.describe(), source })?;
        progress(&format!("applied {}", m.describe()));
    }
    Ok(())
}

/// The CustomResourceDefinitions among `manifests` that exist in the cluster without
/// Causeway's `app.kubernetes.io/managed-by` label, with the manager they name: another
/// Multi-Cluster Services implementation (or the operator) installed them. Applying ours (a
/// forced server-side apply) would take them over, and removing them would delete every object
/// of theirs: callers leave them out of both.
pub async fn foreign_crds(
    client: &Client,
    manifests: &[Manifest],
) -> Result<Vec<(String, String)>, ApplyError> {
    let mut out = Vec::new();
    for m in manifests.iter().filter(|m| m.kind == "CustomResourceDefinition") {
        let found = api(client, m)
            .get_opt(&m.name)
            .await
            .map_err(|source| ApplyError::Api { what: format!("reading {}", m.describe()), source })?;
        if let Some(obj) = found {
            let manager = obj.metadata.labels.as_ref().and_then(|l| l.get("app.kubernetes.io/managed-by"));
            if manager.map(String::as_str) != Some(MANAGER) {
                out.push((m.name.clone(), manager.cloned().unwrap_or_else(|| "unlabelled".into())));
            }
        }
    }
    Ok(out)
}

/// How a node's cleanup Job ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobOutcome {
    Succeeded,
    Failed(String),
    TimedOut,
}

/// Runs each Job (one per node) to its end: applies them all, then polls their status every
/// `every` until each has succeeded or failed or `timeout` has passed; deletes them (and their
/// pods) afterwards whatever happened. Returns each Job's name and outcome, in order.
pub async fn run_jobs(
    client: &Client,
    jobs: &[Manifest],
    timeout: std::time::Duration,
    every: std::time::Duration,
    mut progress: impl FnMut(&str),
) -> Result<Vec<(String, JobOutcome)>, ApplyError> {
    let outcomes = wait_jobs(client, jobs, timeout, every, &mut progress).await;
    delete_jobs(client, jobs, &mut progress).await;
    outcomes
}

/// Applies the Jobs and polls them until each has ended or `timeout` has passed; leaves them.
pub async fn wait_jobs(
    client: &Client,
    jobs: &[Manifest],
    timeout: std::time::Duration,
    every: std::time::Duration,
    mut progress: impl FnMut(&str),
) -> Result<Vec<(String, JobOutcome)>, ApplyError> {
    apply(client, jobs, &mut progress).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut outcomes: Vec<Option<JobOutcome>> = vec![None; jobs.len()];
    while outcomes.iter().any(Option::is_none) && tokio::time::Instant::now() < deadline {
        for (m, outcome) in jobs.iter().zip(outcomes.iter_mut()).filter(|(_, o)| o.is_none()) {
            let job = api(client, m)
                .get_opt(&m.name)
                .await
                .map_err(|source| ApplyError::Api { what: format!("reading {}", m.describe()), source })?;
            let status = job.map(|j| j.data["status"].clone()).unwrap_or_default();
            if status["succeeded"].as_u64().unwrap_or(0) > 0 {
                progress(&format!("{} succeeded", m.describe()));
                *outcome = Some(JobOutcome::Succeeded);
            } else if let Some(failed) = status["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == "Failed" && c["status"] == "True"))
            {
                let why =
                    failed["message"].as_str().or(failed["reason"].as_str()).unwrap_or("failed").to_owned();
                progress(&format!("{} failed: {why}", m.describe()));
                *outcome = Some(JobOutcome::Failed(why));
            }
        }
        if outcomes.iter().any(Option::is_none) {
            tokio::time::sleep(every).await;
        }
    }
    Ok(jobs.iter().zip(outcomes).map(|(m, o)| (m.name.clone(), o.unwrap_or(JobOutcome::TimedOut))).collect())
}

/// Deletes the Jobs and their pods. The Jobs' TTL removes them later anyway: a failed delete
/// is only reported.
pub async fn delete_jobs(client: &Client, jobs: &[Manifest], mut progress: impl FnMut(&str)) {
    let params = DeleteParams::background();
    for m in jobs {
        if let Err(e) = api(client, m).delete(&m.name, &params).await {
            progress(&format!("could not delete {}: {e}", m.describe()));
        }
    }
}

/// The pods of `namespace` carrying `selector` (as JSON) and each one's log (its last `lines`
/// lines; a log that cannot be read says why).
pub async fn pods_and_logs(
    client: &Client,
    namespace: &str,
    selector: &str,
    lines: i64,
) -> Result<(String, Vec<(String, String)>), ApplyError> {
    use k8s_openapi::api::core::v1::Pod;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = pods
        .list(&ListParams::default().labels(selector))
        .await
        .map_err(|source| ApplyError::Api { what: format!("listing pods {selector}"), source })?;
    let json = serde_json::to_string_pretty(&list.items).unwrap_or_default();
    let mut logs = Vec::new();
    for p in &list.items {
        let Some(name) = p.metadata.name.clone() else { continue };
        let params = kube::api::LogParams { tail_lines: Some(lines), ..Default::default() };
        let log = pods.logs(&name, &params).await.unwrap_or_else(|e| format!("no log: {e}\n"));
        logs.push((name, log));
    }
    Ok((json, logs))
}

/// The events of `namespace`, as JSON.
pub async fn events(client: &Client, namespace: &str) -> Result<String, ApplyError> {
    use k8s_openapi::api::core::v1::Event;
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    let list = events
        .list(&ListParams::default())
        .await
        .map_err(|source| ApplyError::Api { what: "listing events".into(), source })?;
    Ok(serde_json::to_string_pretty(&list.items).unwrap_or_default())
}

/// What a command run on one gateway node gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRun {
    pub node: String,
    pub job: String,
    pub outcome: JobOutcome,
    /// The Job's log (empty when it had no pod or the log could not be read).
    pub log: String,
}

/// Runs `command` once on every node labelled as a gateway, in a Job pinned to each
/// (`<prefix>-<node>`, see [`crate::manifests::node_job`]), waits for them, reads their logs
/// and deletes them whatever happened. No gateway node: nothing runs, an empty list.
#[expect(clippy::too_many_arguments, reason = "one call per verb, each argument its own")]
pub async fn run_on_gateway_nodes(
    client: &Client,
    settings: &crate::Settings,
    prefix: &str,
    command: &[&str],
    credentials: bool,
    timeout: std::time::Duration,
    every: std::time::Duration,
    mut progress: impl FnMut(&str),
) -> Result<Vec<NodeRun>, ApplyError> {
    let gateways: Vec<String> =
        nodes(client).await?.into_iter().filter(|(_, labelled)| *labelled).map(|(n, _)| n).collect();
    let mut jobs = Vec::new();
    for node in &gateways {
        let name = crate::manifests::node_job_name(prefix, node);
        jobs.push(crate::manifests::node_job(settings, &name, node, command, credentials)?);
    }
    let outcomes = wait_jobs(client, &jobs, timeout, every, &mut progress).await;
    let mut runs = Vec::new();
    if let Ok(outcomes) = &outcomes {
        for ((job, outcome), node) in outcomes.iter().zip(&gateways) {
            let log = job_log(client, &settings.namespace, job).await.ok().flatten().unwrap_or_default();
            runs.push(NodeRun { node: node.clone(), job: job.clone(), outcome: outcome.clone(), log });
        }
    }
    delete_jobs(client, &jobs, &mut progress).await;
    outcomes?;
    Ok(runs)
}

/// The log of a Job's (last) pod, or `None` when it has no pod.
pub async fn job_log(client: &Client, namespace: &str, job: &str) -> Result<Option<String>, ApplyError> {
    use k8s_openapi::api::core::v1::Pod;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = pods
        .list(&ListParams::default().labels(&format!("job-name={job}")))
        .await
        .map_err(|source| ApplyError::Api { what: format!("listing the pods of Job/{job}"), source })?;
    let Some(name) = list.items.last().and_then(|p| p.metadata.name.clone()) else { return Ok(None) };
    let log = pods
        .logs(&name, &kube::api::LogParams::default())
        .await
        .map_err(|source| ApplyError::Api { what: format!("reading the log of Pod/{name}"), source })?;
    Ok(Some(log))
}

/// Waits until no pod of `namespace` carries `selector` (`key=value,…`), so that a node's
/// cleanup does not race the process it cleans up after.
pub async fn wait_pods_gone(
    client: &Client,
    namespace: &str,
    selector: &str,
    timeout: std::time::Duration,
    every: std::time::Duration,
) -> Result<bool, ApplyError> {
    use k8s_openapi::api::core::v1::Pod;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let list = pods
            .list(&kube::api::ListParams::default().labels(selector))
            .await
            .map_err(|source| ApplyError::Api { what: format!("listing pods {selector}"), source })?;
        if list.items.is_empty() {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(every).await;
    }
}

/// Deletes `manifests` in reverse order. Objects already gone are fine; every other failure is
/// collected and reported together, after every step has run.
pub async fn remove(
    client: &Client,
    manifests: &[Manifest],
    mut progress: impl FnMut(&str),
) -> Result<(), ApplyError> {
    let mut errors = Vec::new();
    for m in manifests.iter().rev() {
        match api(client, m).delete(&m.name, &DeleteParams::background()).await {
            Ok(_) => progress(&format!("deleted {}", m.describe())),
            Err(kube::Error::Api(s)) if s.is_not_found() => {
                progress(&format!("{} was already gone", m.describe()))
            }
            Err(source) => {
                errors.push(ApplyError::Api { what: format!("deleting {}", m.describe()), source })
            }
        }
    }
    if errors.is_empty() { Ok(()) } else { Err(ApplyError::Removal(errors)) }
}

/// A Secret as a manifest (its values never go into `deploy/`).
pub fn secret(
    namespace: &str,
    name: &str,
    type_: &str,
    data: BTreeMap<String, Vec<u8>>,
) -> Result<Manifest, ManifestError> {
    manifest(&Secret {
        metadata: owned_meta(namespace, name),
        type_: Some(type_.into()),
        data: Some(data.into_iter().map(|(k, v)| (k, ByteString(v))).collect()),
        ..Secret::default()
    })
}

/// The gateway Lease, for removal.
pub fn lease(namespace: &str) -> Result<Manifest, ManifestError> {
    manifest(&k8s_openapi::api::coordination::v1::Lease {
        metadata: owned_meta(namespace, crate::manifests::GATEWAY_LEASE),
        spec: None,
    })
}

pub fn config_map(
    namespace: &str,
    name: &str,
    data: BTreeMap<String, String>,
) -> Result<Manifest, ManifestError> {
    manifest(&ConfigMap { metadata: owned_meta(namespace, name), data: Some(data), ..ConfigMap::default() })
}

fn owned_meta(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(namespace.into()),
        labels: Some(BTreeMap::from([
            ("app.kubernetes.io/name".into(), "causeway".into()),
            ("app.kubernetes.io/managed-by".into(), MANAGER.into()),
        ])),
        ..ObjectMeta::default()
    }
}

/// The same manifest with Secret values replaced, for `--dry-run` output.
#[must_use]
pub fn redacted(m: &Manifest) -> String {
    if m.kind != "Secret" {
        return m.yaml.clone();
    }
    let mut v = m.json.clone();
    if let Some(data) = v.get_mut("data").and_then(|d| d.as_object_mut()) {
        for value in data.values_mut() {
            *value = serde_json::Value::String("<redacted>".into());
        }
    }
    serde_saphyr::to_string(&v).unwrap_or_default()
}

/// Node names, and which of them carry the gateway label.
pub async fn nodes(client: &Client) -> Result<Vec<(String, bool)>, ApplyError> {
    let list = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|source| ApplyError::Api { what: "listing nodes".into(), source })?;
    Ok(list
        .items
        .into_iter()
        .map(|n| {
            let labelled =
                n.metadata.labels.as_ref().and_then(|l| l.get(GATEWAY_LABEL)).is_some_and(|v| v == "true");
            (n.metadata.name.unwrap_or_default(), labelled)
        })
        .collect())
}

/// Sets (`true`) or removes (`false`) the gateway label on a node with a merge patch, which
/// leaves every other label alone.
pub async fn label_gateway(client: &Client, node: &str, on: bool) -> Result<(), ApplyError> {
    let value = if on { serde_json::json!("true") } else { serde_json::Value::Null };
    let patch = serde_json::json!({"metadata": {"labels": {GATEWAY_LABEL: value}}});
    Api::<Node>::all(client.clone())
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| ApplyError::Api { what: format!("labelling node {node}"), source })?;
    Ok(())
}
