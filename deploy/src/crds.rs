//! CustomResourceDefinitions: the Multi-Cluster Services API's `ServiceExport` and
//! `ServiceImport` (group `multicluster.x-k8s.io`, v1alpha1, the shape every MCS
//! implementation serves) and Causeway's own `ClusterSetPolicy`.
//!
//! Schemas are written as JSON and parsed into k8s-openapi's `JSONSchemaProps`, so a
//! misspelt schema keyword fails the manifest tests instead of an apply.

use k8s_openapi::{
    apiextensions_apiserver::pkg::apis::apiextensions::v1::{
        CustomResourceColumnDefinition, CustomResourceDefinition, CustomResourceDefinitionNames,
        CustomResourceDefinitionSpec, CustomResourceDefinitionVersion, CustomResourceSubresourceStatus,
        CustomResourceSubresources, CustomResourceValidation, JSONSchemaProps,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde_json::json;

use crate::manifests::{Manifest, ManifestError, manifest};

pub const MCS_GROUP: &str = "multicluster.x-k8s.io";
pub const MCS_VERSION: &str = "v1alpha1";
pub const CAUSEWAY_GROUP: &str = "causeway.io";

struct Crd<'a> {
    group: &'a str,
    version: &'a str,
    kind: &'a str,
    plural: &'a str,
    short: &'a [&'a str],
    namespaced: bool,
    schema: serde_json::Value,
    columns: Vec<(&'a str, &'a str, &'a str)>,
}

fn build(c: Crd<'_>) -> Result<CustomResourceDefinition, ManifestError> {
    let schema: JSONSchemaProps = serde_json::from_value(c.schema).map_err(|e| ManifestError::Serialise {
        what: format!("the schema of {}", c.kind),
        message: e.to_string(),
    })?;
    Ok(CustomResourceDefinition {
        metadata: ObjectMeta {
            name: Some(format!("{}.{}", c.plural, c.group)),
            labels: Some(
                [
                    ("app.kubernetes.io/name".to_owned(), "causeway".to_owned()),
                    ("app.kubernetes.io/managed-by".to_owned(), crate::manifests::MANAGER.to_owned()),
                ]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec: CustomResourceDefinitionSpec {
            group: c.group.into(),
            names: CustomResourceDefinitionNames {
                kind: c.kind.into(),
                list_kind: Some(format!("{}List", c.kind)),
                plural: c.plural.into(),
                singular: Some(c.kind.to_lowercase()),
                short_names: Some(c.short.iter().map(|s| (*s).to_owned()).collect()),
                ..CustomResourceDefinitionNames::default()
            },
            scope: if c.namespaced { "Namespaced" } else { "Cluster" }.into(),
            versions: vec![CustomResourceDefinitionVersion {
                name: c.version.into(),
                served: true,
                storage: true,
                schema: Some(CustomResourceValidation { open_api_v3_schema: Some(schema) }),
                subresources: Some(CustomResourceSubresources {
                    status: Some(CustomResourceSubresourceStatus(serde_json::Value::Object(
                        Default::default(),
                    ))),
                    ..CustomResourceSubresources::default()
                }),
                additional_printer_columns: Some(
                    c.columns
                        .into_iter()
                        .map(|(name, type_, path)| CustomResourceColumnDefinition {
                            name: name.into(),
                            type_: type_.into(),
                            json_path: path.into(),
                            ..CustomResourceColumnDefinition::default()
                        })
                        .collect(),
                ),
                ..CustomResourceDefinitionVersion::default()
            }],
            ..CustomResourceDefinitionSpec::default()
        },
        ..CustomResourceDefinition::default()
    })
}

fn conditions() -> serde_json::Value {
    json!({
        "type": "array",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": {
            "type": "object",
            "required": ["type", "status"],
            "properties": {
                "type": {"type": "string"},
                "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                "reason": {"type": "string"},
                "message": {"type": "string"},
                "lastTransitionTime": {"type": "string", "format": "date-time"}
            }
        }
    })
}

fn service_export() -> Crd<'static> {
    Crd {
        group: MCS_GROUP,
        version: MCS_VERSION,
        kind: "ServiceExport",
        plural: "serviceexports",
        short: &["svcex"],
        namespaced: true,
        // A ServiceExport names the Service it exports by having the same name and namespace;
        // it carries no spec.
        schema: json!({
            "type": "object",
            "description": "Exports the Service of the same name and namespace to the cluster set.",
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"type": "object"},
                "status": {"type": "object", "properties": {"conditions": conditions()}}
            }
        }),
        columns: vec![("Age", "date", ".metadata.creationTimestamp")],
    }
}

fn service_import() -> Crd<'static> {
    Crd {
        group: MCS_GROUP,
        version: MCS_VERSION,
        kind: "ServiceImport",
        plural: "serviceimports",
        short: &["svcim"],
        namespaced: true,
        schema: json!({
            "type": "object",
            "description": "A service exported by one or more clusters of the set, as seen in this cluster.",
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"type": "object"},
                "spec": {
                    "type": "object",
                    "required": ["ports", "type"],
                    "properties": {
                        "type": {"type": "string", "enum": ["ClusterSetIP", "Headless"]},
                        "ips": {"type": "array", "maxItems": 1, "items": {"type": "string"}},
                        "sessionAffinity": {"type": "string", "enum": ["None", "ClientIP"]},
                        "ports": {
                            "type": "array",
                            "x-kubernetes-list-type": "atomic",
                            "items": {
                                "type": "object",
                                "required": ["port"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "port": {"type": "integer", "format": "int32", "minimum": 1, "maximum": 65535},
                                    "protocol": {"type": "string", "enum": ["TCP", "UDP", "SCTP"]},
                                    "appProtocol": {"type": "string"}
                                }
                            }
                        }
                    }
                },
                "status": {
                    "type": "object",
                    "properties": {
                        "clusters": {
                            "type": "array",
                            "x-kubernetes-list-type": "map",
                            "x-kubernetes-list-map-keys": ["cluster"],
                            "items": {
                                "type": "object",
                                "required": ["cluster"],
                                "properties": {"cluster": {"type": "string"}}
                            }
                        }
                    }
                }
            }
        }),
        columns: vec![
            ("Type", "string", ".spec.type"),
            ("IP", "string", ".spec.ips"),
            ("Age", "date", ".metadata.creationTimestamp"),
        ],
    }
}

/// The declarative form of `causeway policy apply` (the broker record `PolicyRecord`).
fn cluster_set_policy() -> Crd<'static> {
    let peer = json!({
        "type": "object",
        "properties": {
            "cluster": {"type": "string", "maxLength": 63},
            "cidrs": {"type": "array", "items": {"type": "string"}}
        }
    });
    Crd {
        group: CAUSEWAY_GROUP,
        version: "v1alpha1",
        kind: "ClusterSetPolicy",
        plural: "clustersetpolicies",
        short: &["csp"],
        namespaced: false,
        schema: json!({
            "type": "object",
            "description": "One cluster-set network policy rule: from a cluster/CIDR to a cluster/CIDR, protocol, ports, allow or deny. Rules are evaluated by ascending priority, then name.",
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"type": "object"},
                "spec": {
                    "type": "object",
                    "required": ["action"],
                    "properties": {
                        "priority": {"type": "integer", "format": "int32", "minimum": 0, "default": 1000},
                        "from": peer.clone(),
                        "to": peer,
                        "protocol": {"type": "string", "enum": ["any", "tcp", "udp", "icmp"]},
                        "ports": {"type": "array", "items": {"type": "string", "pattern": "^[0-9]+(-[0-9]+)?$"}},
                        "action": {"type": "string", "enum": ["allow", "deny"]}
                    }
                },
                "status": {"type": "object", "properties": {"conditions": conditions()}}
            }
        }),
        columns: vec![
            ("Action", "string", ".spec.action"),
            ("Priority", "integer", ".spec.priority"),
            ("Age", "date", ".metadata.creationTimestamp"),
        ],
    }
}

pub(crate) fn manifests() -> Result<Vec<Manifest>, ManifestError> {
    [service_export(), service_import(), cluster_set_policy()]
        .into_iter()
        .map(|c| manifest(&build(c)?))
        .collect()
}

/// The priority of a rule that names none (as `causeway policy apply`).
pub const DEFAULT_POLICY_PRIORITY: u32 = 1000;

/// Reads `ClusterSetPolicy` objects (a multi-document YAML file, as kept in Git or applied to
/// the cluster) into broker policy records. Any other kind, a misspelt field or a bad value is
/// an error naming the document; nothing is returned unless every document is good.
pub fn policies_from_yaml(text: &str) -> Result<Vec<causeway_broker_api::PolicyRecord>, String> {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(text).map_err(|e| format!("not YAML: {e}"))?;
    let mut out = Vec::new();
    for (i, doc) in docs.into_iter().enumerate().filter(|(_, d)| !d.is_null()) {
        let n = i + 1;
        let (api, kind) =
            (doc["apiVersion"].as_str().unwrap_or_default(), doc["kind"].as_str().unwrap_or_default());
        if api != format!("{CAUSEWAY_GROUP}/v1alpha1") || kind != "ClusterSetPolicy" {
            return Err(format!(
                "document {n} is {api}/{kind}, not {CAUSEWAY_GROUP}/v1alpha1 ClusterSetPolicy"
            ));
        }
        if doc["metadata"]["name"].as_str().is_none() {
            return Err(format!("document {n} has no metadata.name"));
        }
        out.push(policy_from_object(&doc)?);
    }
    Ok(out)
}

/// One `ClusterSetPolicy` object (as JSON) as a broker policy record: its name, and its spec
/// with the default priority filled in; misspelt fields and bad values are errors naming it.
pub fn policy_from_object(doc: &serde_json::Value) -> Result<causeway_broker_api::PolicyRecord, String> {
    let name = doc["metadata"]["name"].as_str().ok_or("a ClusterSetPolicy without metadata.name")?;
    let mut spec = match doc.get("spec") {
        Some(serde_json::Value::Object(m)) => m.clone(),
        _ => return Err(format!("ClusterSetPolicy {name}: no spec")),
    };
    spec.entry("priority").or_insert(DEFAULT_POLICY_PRIORITY.into());
    spec.insert("name".into(), name.into());
    let record: causeway_broker_api::PolicyRecord = serde_json::from_value(serde_json::Value::Object(spec))
        .map_err(|e| format!("ClusterSetPolicy {name}: {e}"))?;
    causeway_broker_api::validate_policy(&record).map_err(|e| format!("ClusterSetPolicy {name}: {e}"))?;
    Ok(record)
}
