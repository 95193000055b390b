//! `causeway verify` on Kubernetes: an end-to-end check of a running cluster set from the
//! operator's machine, with short-lived objects in each member cluster.
//!
//! Each cluster gets a test pod serving HTTP on 8080, a Service over it and a ServiceExport of
//! that Service (so the set has one service exported by every cluster). Then a Job per ordered
//! pair of clusters fetches from the other cluster's pod (pod to pod), and a Job per cluster
//! fetches from `<service>.<namespace>.svc.clusterset.local` (pod to exported service). The Jobs'
//! outcomes make the matrix. Everything is removed at the end, whatever happened. Each run has
//! its own id, so two runs never share names.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::{
        batch::v1::{Job, JobSpec},
        core::v1::{
            Container, ContainerPort, Pod, PodSpec, PodTemplateSpec, Service, ServicePort, ServiceSpec,
        },
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use kube::Api;

use crate::{
    Client,
    apply::{self, ApplyError, JobOutcome},
    manifests::{Manifest, ManifestError, manifest},
};

/// The port the test pods serve on.
pub const PORT: u16 = 8080;
/// The line a test pod serves (a fetch that returns anything else is a failure).
pub const ANSWER: &str = "causeway-verify";

/// What a run uses.
#[derive(Clone, Debug)]
pub struct Plan {
    pub namespace: String,
    /// An image with `sh`, `httpd` and `wget` (busybox).
    pub image: String,
    /// This run's id: part of every name.
    pub id: String,
    pub timeout: Duration,
    pub poll: Duration,
}

/// One cell of the result: `from` reaching `to` (a cluster) or the exported service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub from: String,
    /// A cluster's name, or `None` for the exported service.
    pub to: Option<String>,
    pub outcome: JobOutcome,
}

fn labels(plan: &Plan) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "causeway".into()),
        ("app.kubernetes.io/component".into(), "verify".into()),
        ("causeway.io/verify".into(), plan.id.clone()),
    ])
}

fn meta(plan: &Plan, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(plan.namespace.clone()),
        labels: Some(labels(plan)),
        ..ObjectMeta::default()
    }
}

/// The name of the test pod, Service and ServiceExport.
#[must_use]
pub fn server_name(plan: &Plan) -> String {
    format!("causeway-verify-{}", plan.id)
}

/// The test pod, its Service and the ServiceExport, for one cluster.
pub fn server(plan: &Plan) -> Result<Vec<Manifest>, ManifestError> {
    let name = server_name(plan);
    let script =
        format!("mkdir -p /www && echo {ANSWER} > /www/index.html && exec httpd -f -p {PORT} -h /www");
    let pod = Pod {
        metadata: meta(plan, &name),
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "server".into(),
                image: Some(plan.image.clone()),
                command: Some(vec!["sh".into(), "-c".into(), script]),
                ports: Some(vec![ContainerPort {
                    container_port: PORT.into(),
                    protocol: Some("TCP".into()),
                    ..ContainerPort::default()
                }]),
                ..Container::default()
            }],
            automount_service_account_token: Some(false),
            termination_grace_period_seconds: Some(1),
            ..PodSpec::default()
        }),
        ..Pod::default()
    };
    let service = Service {
        metadata: meta(plan, &name),
        spec: Some(ServiceSpec {
            selector: Some(BTreeMap::from([("causeway.io/verify".into(), plan.id.clone())])),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: PORT.into(),
                target_port: Some(IntOrString::Int(PORT.into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    let export = serde_json::json!({
        "apiVersion": format!("{}/{}", crate::crds::MCS_GROUP, crate::crds::MCS_VERSION),
        "kind": "ServiceExport",
        "metadata": {"name": name, "namespace": plan.namespace, "labels": labels(plan)},
    });
    Ok(vec![
        manifest(&pod)?,
        manifest(&service)?,
        Manifest {
            api_version: format!("{}/{}", crate::crds::MCS_GROUP, crate::crds::MCS_VERSION),
            kind: "ServiceExport".into(),
            name,
            namespace: Some(plan.namespace.clone()),
            yaml: serde_saphyr::to_string(&export).unwrap_or_default(),
            json: export,
        },
    ])
}

/// A Job that fetches `url` up to `tries` times, a second apart, and succeeds only when the
/// test pod's answer comes back.
pub fn probe(plan: &Plan, name: &str, url: &str, tries: u32) -> Result<Manifest, ManifestError> {
    let script = format!(
        "i=0; while [ $i -lt {tries} ]; do wget -q -O- -T 3 {url} | grep -qx {ANSWER} && exit 0; i=$((i+1)); sleep 1; done; exit 1"
    );
    let job = Job {
        metadata: meta(plan, name),
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            active_deadline_seconds: Some(i64::try_from(plan.timeout.as_secs()).unwrap_or(120)),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels(plan)), ..ObjectMeta::default() }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "probe".into(),
                        image: Some(plan.image.clone()),
                        command: Some(vec!["sh".into(), "-c".into(), script]),
                        ..Container::default()
                    }],
                    restart_policy: Some("Never".into()),
                    automount_service_account_token: Some(false),
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        ..Job::default()
    };
    manifest(&job)
}

/// Waits until the test pod runs and has an address.
async fn pod_ip(client: &Client, plan: &Plan) -> Result<Option<String>, ApplyError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &plan.namespace);
    let name = server_name(plan);
    let deadline = tokio::time::Instant::now() + plan.timeout;
    loop {
        let pod = pods
            .get_opt(&name)
            .await
            .map_err(|source| ApplyError::Api { what: format!("reading Pod/{name}"), source })?;
        let status = pod.and_then(|p| p.status);
        if let Some(s) = status
            && s.phase.as_deref() == Some("Running")
            && let Some(ip) = s.pod_ip
        {
            return Ok(Some(ip));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(plan.poll).await;
    }
}

/// Runs the check on `clusters` (name, client) and removes everything it made. `progress`
/// hears each step.
pub async fn run(
    clusters: &[(String, Client)],
    plan: &Plan,
    mut progress: impl FnMut(&str),
) -> Result<Vec<Check>, ApplyError> {
    let servers = server(plan)?;
    let result = async {
        for (name, client) in clusters {
            apply::apply(client, &servers, |l| progress(&format!("{name}: {l}"))).await?;
        }
        let mut ips = Vec::new();
        for (name, client) in clusters {
            let ip = pod_ip(client, plan).await?;
            match &ip {
                Some(ip) => progress(&format!("{name}: test pod running at {ip}")),
                None => progress(&format!("{name}: test pod not running after {:?}", plan.timeout)),
            }
            ips.push(ip);
        }
        let service = format!("{}.{}.svc.clusterset.local", server_name(plan), plan.namespace);
        let mut checks = Vec::new();
        // One batch of Jobs per cluster, all running at once; then the next cluster.
        for (i, (from, client)) in clusters.iter().enumerate() {
            let mut jobs = Vec::new();
            let mut targets = Vec::new();
            for (j, (to, _)) in clusters.iter().enumerate().filter(|(j, _)| *j != i) {
                match &ips[j] {
                    Some(ip) => {
                        let url = format!("http://{}:{PORT}/", bracket(ip));
                        jobs.push(probe(plan, &format!("{}-{i}-{j}", server_name(plan)), &url, 5)?);
                        targets.push(Some(to.clone()));
                    }
                    None => checks.push(Check {
                        from: from.clone(),
                        to: Some(to.clone()),
                        outcome: JobOutcome::Failed("its test pod never ran".into()),
                    }),
                }
            }
            // The export reaches the other clusters' DNS through the broker: give it time.
            let url = format!("http://{service}:{PORT}/");
            jobs.push(probe(plan, &format!("{}-{i}-svc", server_name(plan)), &url, 30)?);
            targets.push(None);
            let outcomes = apply::run_jobs(client, &jobs, plan.timeout, plan.poll, |_| {}).await?;
            for ((_, outcome), to) in outcomes.into_iter().zip(targets) {
                checks.push(Check { from: from.clone(), to, outcome });
            }
            progress(&format!("{from}: probed"));
        }
        Ok(checks)
    }
    .await;
    for (name, client) in clusters {
        if let Err(e) = apply::remove(client, &servers, |_| {}).await {
            progress(&format!("{name}: cleaning up: {e}"));
        }
    }
    result
}

fn bracket(ip: &str) -> String {
    if ip.contains(':') { format!("[{ip}]") } else { ip.to_owned() }
}

/// A fresh run id: 6 hex digits from the clock and the process (no two runs in a second collide
/// unless they share a process id).
#[must_use]
pub fn new_id() -> String {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{:06x}", (nanos ^ u128::from(std::process::id()) << 20) & 0xff_ffff)
}
