//! The cluster set's services as MCS API objects in this cluster: one `ServiceImport` per
//! import the broker merged (type, ClusterSetIP, ports; `status.clusters` the clusters serving
//! it), and KEP-1645's conditions on this cluster's own `ServiceExport`s (`Valid`, `Conflict`
//! with the broker's reason, `Ready` from the export's ready endpoints). Written by the active
//! gateway with server-side apply; it deletes only the ServiceImports it made (its label), so
//! another MCS implementation's objects are never touched.

use std::collections::{BTreeMap, BTreeSet};

use causeway_broker_api::{Object, Record, ServiceImportRecord, ServiceType};
use kube::{
    Api, Client,
    api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams},
};
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use crate::{
    crds::{MCS_GROUP, MCS_VERSION},
    exports::service_export_resource,
};

/// Label on every ServiceImport this module writes.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "causeway");
const FIELD_MANAGER: &str = "causeway-imports";

fn service_import_resource() -> kube::api::ApiResource {
    kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk(MCS_GROUP, MCS_VERSION, "ServiceImport"),
        "serviceimports",
    )
}

/// The ServiceImport object of an import, and its status.
#[must_use]
pub fn service_import(i: &ServiceImportRecord) -> (Value, Value) {
    let ports: Vec<Value> = i
        .ports
        .iter()
        .map(|p| {
            let mut v = json!({"port": p.port, "protocol": p.protocol});
            if let Some(n) = &p.name {
                v["name"] = json!(n);
            }
            v
        })
        .collect();
    let mut spec = json!({
        "type": match i.service_type { ServiceType::ClusterSetIP => "ClusterSetIP", ServiceType::Headless => "Headless" },
        "ports": ports,
    });
    if !i.ips.is_empty() {
        spec["ips"] = json!(i.ips.iter().map(ToString::to_string).collect::<Vec<_>>());
    }
    let object = json!({
        "apiVersion": format!("{MCS_GROUP}/{MCS_VERSION}"),
        "kind": "ServiceImport",
        "metadata": {"name": i.name, "namespace": i.namespace, "labels": {MANAGED_BY.0: MANAGED_BY.1}},
        "spec": spec,
    });
    let clusters: Vec<Value> =
        i.clusters.iter().filter(|c| !c.excluded).map(|c| json!({"cluster": c.cluster_id})).collect();
    let status = json!({
        "apiVersion": format!("{MCS_GROUP}/{MCS_VERSION}"),
        "kind": "ServiceImport",
        "metadata": {"name": i.name, "namespace": i.namespace},
        "status": {"clusters": clusters},
    });
    (object, status)
}

/// The status of this cluster's ServiceExport `<namespace>/<name>`, from the import that holds
/// it (none yet: the broker has not merged it) and its record's readiness. A condition whose
/// status is unchanged keeps its `lastTransitionTime` from `previous` (type → (status, time));
/// a new or changed one gets `now`.
#[must_use]
pub fn export_status(
    cluster_id: &str,
    import: Option<&ServiceImportRecord>,
    ready: Option<u32>,
    previous: &BTreeMap<String, (String, String)>,
    now: &str,
) -> Value {
    let part = import.and_then(|i| i.clusters.iter().find(|c| c.cluster_id == cluster_id));
    let cond = |kind: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" };
        let since = match previous.get(kind) {
            Some((was, at)) if was == status => at.clone(),
            _ => now.to_owned(),
        };
        json!({"type": kind, "status": status, "reason": reason, "message": message, "lastTransitionTime": since})
    };
    let valid = cond(
        "Valid",
        part.is_some(),
        if part.is_some() { "Exported" } else { "Pending" },
        if part.is_some() {
            "merged into the cluster set's ServiceImport".into()
        } else {
            "not merged by the broker yet".into()
        },
    );
    let conflict = match part.and_then(|c| c.conflict.as_ref()) {
        Some(why) => cond("Conflict", true, "Conflict", why.clone()),
        None => cond("Conflict", false, "NoConflict", "no conflict with older exports".into()),
    };
    let is_ready = part.is_some_and(|c| !c.excluded) && ready != Some(0);
    let ready = cond(
        "Ready",
        is_ready,
        if is_ready { "Ready" } else { "NotReady" },
        match ready {
            Some(n) => format!("{n} ready endpoints"),
            None => "readiness not reported".into(),
        },
    );
    json!({"status": {"conditions": [valid, conflict, ready]}})
}

/// Writes the imports and this cluster's export conditions into Kubernetes.
pub struct ImportSync {
    client: Client,
    cluster_id: String,
}

impl ImportSync {
    #[must_use]
    pub fn new(client: Client, cluster_id: String) -> Self {
        Self { client, cluster_id }
    }

    /// Makes the cluster's ServiceImports (those this module made) equal to `objects`'
    /// imports, and sets the conditions of this cluster's ServiceExports. An import in a
    /// namespace this cluster does not have is skipped (namespace sameness: it appears when
    /// the namespace does). Returns (applied, deleted).
    pub async fn reconcile(&self, objects: &[Object]) -> Result<(usize, usize), kube::Error> {
        let imports: BTreeMap<(String, String), &ServiceImportRecord> = objects
            .iter()
            .filter_map(|o| match &o.record {
                Record::ServiceImport(i) => Some(((i.namespace.clone(), i.name.clone()), i)),
                _ => None,
            })
            .collect();
        let apply = PatchParams::apply(FIELD_MANAGER).force();
        let mut applied = 0;
        for ((ns, name), i) in &imports {
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), ns, &service_import_resource());
            let (object, status) = service_import(i);
            match api.patch(name, &apply, &Patch::Apply(&object)).await {
                Ok(_) => {
                    api.patch_status(name, &apply, &Patch::Apply(&status)).await?;
                    applied += 1;
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    debug!(namespace = %ns, %name, "no such namespace here; the import waits for it");
                }
                Err(e) => return Err(e),
            }
        }
        let all: Api<DynamicObject> = Api::all_with(self.client.clone(), &service_import_resource());
        let ours =
            all.list(&ListParams::default().labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1))).await?;
        let mut deleted = 0;
        for o in ours.items {
            let key = (
                o.metadata.namespace.clone().unwrap_or_default(),
                o.metadata.name.clone().unwrap_or_default(),
            );
            if imports.contains_key(&key) {
                continue;
            }
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), &key.0, &service_import_resource());
            info!(namespace = %key.0, name = %key.1, "removing a ServiceImport the cluster set no longer has");
            match api.delete(&key.1, &DeleteParams::default()).await {
                Ok(_) => deleted += 1,
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        // Conditions on this cluster's own ServiceExport objects (the ones the publisher made).
        let exports: BTreeSet<(String, String, Option<u32>)> = objects
            .iter()
            .filter_map(|o| match &o.record {
                Record::ServiceExport(s)
                    if s.cluster_id == self.cluster_id
                        && s.source == causeway_broker_api::ExportSource::Kubernetes =>
                {
                    Some((s.namespace.clone(), s.name.clone(), s.ready_endpoints))
                }
                _ => None,
            })
            .collect();
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        for (ns, name, ready) in exports {
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), &ns, &service_export_resource());
            let Some(current) = api.get_opt(&name).await? else { continue };
            let previous: BTreeMap<String, (String, String)> = current.data["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| {
                    Some((
                        c["type"].as_str()?.to_owned(),
                        (c["status"].as_str()?.to_owned(), c["lastTransitionTime"].as_str()?.to_owned()),
                    ))
                })
                .collect();
            let import = imports.get(&(ns.clone(), name.clone())).copied();
            let mut status = export_status(&self.cluster_id, import, ready, &previous, &now);
            status["apiVersion"] = json!(format!("{MCS_GROUP}/{MCS_VERSION}"));
            status["kind"] = json!("ServiceExport");
            status["metadata"] = json!({"name": name, "namespace": ns});
            if let Err(e) = api.patch_status(&name, &apply, &Patch::Apply(&status)).await {
                warn!(namespace = %ns, %name, error = %e, "setting the ServiceExport's conditions failed");
            }
        }
        Ok((applied, deleted))
    }

    /// Follows the broker and reconciles on every change. Never returns.
    pub async fn run(&self, broker: causeway_broker_api::BrokerClient) {
        let mut reflector = causeway_broker_api::Reflector::new(broker, std::time::Duration::from_secs(20));
        loop {
            match reflector.next().await {
                Ok(_) => match self.reconcile(&reflector.snapshot().objects()).await {
                    Ok((a, d)) => debug!(applied = a, deleted = d, "ServiceImports reconciled"),
                    Err(e) => warn!(error = %e, "writing ServiceImports failed; retrying at the next change"),
                },
                Err(e) => warn!(error = %e, "watching the broker failed; ServiceImports stay as they are"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use causeway_broker_api::{ImportedCluster, ServicePort};

    use super::*;

    fn import() -> ServiceImportRecord {
        ServiceImportRecord {
            namespace: "shop".into(),
            name: "cart".into(),
            service_type: ServiceType::ClusterSetIP,
            ips: vec!["241.0.0.7".parse().unwrap()],
            ports: vec![ServicePort { name: Some("http".into()), port: 80, protocol: "TCP".into() }],
            clusters: vec![
                ImportedCluster { cluster_id: "east".into(), ports: vec![], excluded: false, conflict: None },
                ImportedCluster {
                    cluster_id: "west".into(),
                    ports: vec![],
                    excluded: false,
                    conflict: Some("port 80/TCP (\"web\") conflicts".into()),
                },
                ImportedCluster {
                    cluster_id: "north".into(),
                    ports: vec![],
                    excluded: true,
                    conflict: Some("type".into()),
                },
            ],
            generation: 3,
        }
    }

    #[test]
    fn an_import_becomes_a_service_import_object() {
        let (o, s) = service_import(&import());
        assert_eq!(
            o["spec"],
            json!({"type": "ClusterSetIP", "ips": ["241.0.0.7"], "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]})
        );
        assert_eq!(o["metadata"]["labels"]["app.kubernetes.io/managed-by"], "causeway");
        assert_eq!(
            s["status"]["clusters"],
            json!([{"cluster": "east"}, {"cluster": "west"}]),
            "the excluded one is not serving"
        );
    }

    #[test]
    fn export_conditions_say_valid_conflict_and_ready() {
        let i = import();
        let types = |v: &Value| -> Vec<(String, String)> {
            v["status"]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| (c["type"].as_str().unwrap().to_owned(), c["status"].as_str().unwrap().to_owned()))
                .collect()
        };
        let t = |a: &str, b: &str| (a.to_owned(), b.to_owned());
        let none = BTreeMap::new();
        let now = "2026-12-02T08:00:00Z";
        assert_eq!(
            types(&export_status("east", Some(&i), Some(2), &none, now)),
            vec![t("Valid", "True"), t("Conflict", "False"), t("Ready", "True")]
        );
        let west = export_status("west", Some(&i), Some(0), &none, now);
        assert_eq!(types(&west), vec![t("Valid", "True"), t("Conflict", "True"), t("Ready", "False")]);
        assert!(west["status"]["conditions"][1]["message"].as_str().unwrap().contains("conflicts"));
        assert_eq!(
            types(&export_status("north", Some(&i), None, &none, now)),
            vec![t("Valid", "True"), t("Conflict", "True"), t("Ready", "False")]
        );
        assert_eq!(
            types(&export_status("south", None, None, &none, now)),
            vec![t("Valid", "False"), t("Conflict", "False"), t("Ready", "False")]
        );
        // An unchanged condition keeps its transition time; a changed one gets now.
        let before = BTreeMap::from([
            ("Valid".to_owned(), ("True".to_owned(), "2026-01-01T00:00:00Z".to_owned())),
            ("Ready".to_owned(), ("False".to_owned(), "2026-01-01T00:00:00Z".to_owned())),
        ]);
        let s = export_status("east", Some(&i), Some(2), &before, now);
        assert_eq!(s["status"]["conditions"][0]["lastTransitionTime"], "2026-01-01T00:00:00Z");
        assert_eq!(s["status"]["conditions"][2]["lastTransitionTime"], now);
    }
}
