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
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
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

/// Where a rule's packets come from or go to: a cluster (its pod and service CIDRs), CIDRs
/// (inside that cluster when both are given), or anything when empty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyPeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub cluster: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cidrs: Vec<String>,
}

/// The packets' protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PolicyProtocol {
    Any,
    Tcp,
    Udp,
    Icmp,
}

/// What a matching packet gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PolicyAction {
    Allow,
    Deny,
}

/// A condition of the object (`type` is unique in the list).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyCondition {
    #[serde(rename = "type")]
    pub type_: String,
    #[schemars(extend("enum" = ["True", "False", "Unknown"]))]
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub last_transition_time: Option<String>,
}

/// Conditions the controller that reads the object reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSetPolicyStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<PolicyCondition>,
}

// The declarative form of `causeway policy apply` (the broker record `PolicyRecord`): the CRD
// and its schema are derived from these types (kube's `CustomResource`, schemars); the doc
// comments below become the schema's descriptions.
/// What the rule matches, and what it decides.
#[derive(CustomResource, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "causeway.io",
    version = "v1alpha1",
    kind = "ClusterSetPolicy",
    plural = "clustersetpolicies",
    shortname = "csp",
    status = "ClusterSetPolicyStatus",
    doc = "One cluster-set network policy rule: from a cluster/CIDR to a cluster/CIDR, protocol, ports, allow or deny. Rules are evaluated by ascending priority, then name.",
    label("app.kubernetes.io/name", "causeway"),
    label("app.kubernetes.io/managed-by", "causeway"),
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
    printcolumn(name = "Priority", type_ = "integer", json_path = ".spec.priority"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSetPolicySpec {
    #[serde(default = "default_priority")]
    #[schemars(range(min = 0), extend("default" = 1000))]
    pub priority: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<PolicyPeer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<PolicyPeer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<PolicyProtocol>,
    /// Destination ports or ranges (`80`, `8000-8080`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = r"^[0-9]+(-[0-9]+)?$")))]
    pub ports: Vec<String>,
    pub action: PolicyAction,
}

fn default_priority() -> i32 {
    1000
}

pub(crate) fn manifests() -> Result<Vec<Manifest>, ManifestError> {
    use kube::CustomResourceExt as _;
    let mut out: Vec<Manifest> = [service_export(), service_import()]
        .into_iter()
        .map(|c| manifest(&build(c)?))
        .collect::<Result<_, _>>()?;
    out.push(manifest(&ClusterSetPolicy::crd())?);
    Ok(out)
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

#[cfg(test)]
mod derived_tests {
    use super::*;

    #[test]
    fn a_typed_cluster_set_policy_is_what_the_policy_reader_takes() {
        let spec = ClusterSetPolicySpec {
            priority: 10,
            from: Some(PolicyPeer { cluster: Some("east".into()), cidrs: vec![] }),
            to: Some(PolicyPeer { cluster: None, cidrs: vec!["10.2.0.0/16".into()] }),
            protocol: Some(PolicyProtocol::Tcp),
            ports: vec!["80".into(), "8000-8080".into()],
            action: PolicyAction::Allow,
        };
        let object = serde_json::to_value(ClusterSetPolicy::new("web", spec)).unwrap();
        assert_eq!(object["apiVersion"], "causeway.io/v1alpha1");
        let record = policy_from_object(&object).unwrap();
        assert_eq!(record.name, "web");
        assert_eq!(record.priority, 10);
        assert_eq!(record.ports.len(), 2);
        // The reader's default priority is the schema's.
        let minimal = serde_json::json!({"apiVersion": "causeway.io/v1alpha1", "kind": "ClusterSetPolicy",
            "metadata": {"name": "d"}, "spec": {"action": "deny"}});
        let typed: ClusterSetPolicy = serde_json::from_value(minimal.clone()).unwrap();
        assert_eq!(typed.spec.priority, 1000);
        assert_eq!(i64::from(policy_from_object(&minimal).unwrap().priority), i64::from(typed.spec.priority));
    }

    #[test]
    fn the_derived_crd_keeps_the_schema_rules() {
        use kube::CustomResourceExt as _;
        let crd = serde_json::to_value(ClusterSetPolicy::crd()).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(schema["required"], serde_json::json!(["action"]));
        assert_eq!(schema["properties"]["action"]["enum"], serde_json::json!(["allow", "deny"]));
        assert_eq!(schema["properties"]["ports"]["items"]["pattern"], "^[0-9]+(-[0-9]+)?$");
        assert_eq!(schema["properties"]["from"]["properties"]["cluster"]["maxLength"], 63);
        assert_eq!(crd["spec"]["scope"], "Cluster");
        assert_eq!(crd["metadata"]["labels"]["app.kubernetes.io/managed-by"], "causeway");
        let status = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"];
        assert_eq!(status["properties"]["conditions"]["x-kubernetes-list-type"], "map");
    }
}
