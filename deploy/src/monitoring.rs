//! Monitoring for clusters that run the Prometheus Operator and Grafana: headless Services in
//! front of every metrics port (the gateways' 9464, the route agents' 9465, the broker's 9466),
//! one `ServiceMonitor` that scrapes them all, and the Grafana dashboard, as a ConfigMap for
//! Grafana's dashboard sidecar (label `grafana_dashboard: "1"`) and as a JSON file to import.
//! Generated like the other manifests (`deploy/manifests/monitoring.yaml`,
//! `deploy/manifests/grafana-dashboard.json`) and drift-checked.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{ConfigMap, Service, ServicePort, ServiceSpec},
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::manifests::{BROKER_METRICS_PORT, Manifest, ManifestError, Settings, manifest};

/// The dashboard's file under `deploy/manifests/`.
pub const DASHBOARD_FILE: &str = "grafana-dashboard.json";

/// The label the ServiceMonitor selects the metrics Services by.
pub const METRICS_LABEL: &str = "causeway.io/metrics";

/// `monitoring.coreos.com/v1` `ServiceMonitor`: the fields Causeway sets (unknown ones are
/// refused on parse, so a typo fails the manifest tests).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceMonitor {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: ServiceMonitorSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceMonitorSpec {
    pub selector: Selector,
    pub namespace_selector: NamespaceSelector,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceSelector {
    pub match_names: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    pub port: String,
    pub path: String,
    pub interval: String,
    pub scheme: String,
}

impl k8s_openapi::Resource for ServiceMonitor {
    const API_VERSION: &'static str = "monitoring.coreos.com/v1";
    const GROUP: &'static str = "monitoring.coreos.com";
    const KIND: &'static str = "ServiceMonitor";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "servicemonitors";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for ServiceMonitor {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

fn labels(component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "causeway".into()),
        ("app.kubernetes.io/component".into(), component.into()),
        ("app.kubernetes.io/managed-by".into(), crate::manifests::MANAGER.into()),
        (METRICS_LABEL.into(), "true".into()),
    ])
}

/// A headless Service over one component's metrics port.
fn metrics_service(ns: &str, component: &str, port: u16) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(format!("causeway-{component}-metrics")),
            namespace: Some(ns.into()),
            labels: Some(labels(component)),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(BTreeMap::from([
                ("app.kubernetes.io/name".into(), "causeway".into()),
                ("app.kubernetes.io/component".into(), component.into()),
            ])),
            ports: Some(vec![ServicePort {
                name: Some("metrics".into()),
                port: port.into(),
                target_port: Some(IntOrString::Int(port.into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// A dashboard panel: a time series of PromQL expressions, each with its legend.
fn panel(id: u32, title: &str, unit: &str, targets: &[(&str, &str)]) -> Value {
    // Two panels a row, 8 units high, in the order given.
    let (x, y) = (if id % 2 == 1 { 0 } else { 12 }, (id - 1) / 2 * 8);
    json!({
        "id": id,
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": 12, "h": 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": targets.iter().enumerate().map(|(i, (expr, legend))| json!({
            "refId": char::from(b'A' + u8::try_from(i).unwrap_or(0)).to_string(),
            "expr": expr,
            "legendFormat": legend,
        })).collect::<Vec<_>>(),
    })
}

/// A panel: its title, its unit and its (PromQL expression, legend) pairs.
pub type Panel = (&'static str, &'static str, &'static [(&'static str, &'static str)]);

/// Every panel, in the dashboard's order.
pub const PANELS: &[Panel] = &[
    (
        "Tunnels up, by remote cluster",
        "none",
        &[("sum by (cluster) (causeway_connection_up)", "{{cluster}}")],
    ),
    ("Standby sessions up", "none", &[("sum by (cluster) (causeway_standby_up)", "{{cluster}}")]),
    (
        "Traffic to each remote cluster",
        "bps",
        &[("sum by (cluster) (rate(causeway_tx_bytes_total[5m])) * 8", "{{cluster}}")],
    ),
    (
        "Traffic from each remote cluster",
        "bps",
        &[("sum by (cluster) (rate(causeway_rx_bytes_total[5m])) * 8", "{{cluster}}")],
    ),
    (
        "Round-trip time through the tunnel",
        "s",
        &[("max by (cluster) (causeway_rtt_seconds)", "{{cluster}}")],
    ),
    ("Probe loss", "percentunit", &[("max by (cluster) (causeway_probe_loss_ratio)", "{{cluster}}")]),
    (
        "Seconds since the last handshake",
        "s",
        &[("max by (cluster) (causeway_last_handshake_seconds)", "{{cluster}}")],
    ),
    (
        "Failovers (per hour)",
        "none",
        &[("sum by (cluster, reason) (increase(causeway_failovers_total[1h]))", "{{cluster}} {{reason}}")],
    ),
    (
        "Tunnel drops, by reason",
        "pps",
        &[("sum by (reason) (rate(causeway_cable_drops_total[5m]))", "{{reason}}")],
    ),
    (
        "Uplink guard and datapath events",
        "pps",
        &[("sum by (event) (rate(causeway_datapath_events_total[5m]))", "{{event}}")],
    ),
    (
        "Policy drops, by rule",
        "pps",
        &[("sum by (rule) (rate(causeway_policy_drops_total[5m]))", "{{rule}}")],
    ),
    (
        "Gateway trouble",
        "none",
        &[
            ("sum(causeway_cable_stalled_lanes)", "stalled lanes"),
            ("count(causeway_reconcile_failed) or vector(0)", "failed reconcile steps"),
            ("sum(causeway_route_conflicts)", "route conflicts"),
            ("count(causeway_remote_refused) or vector(0)", "refused clusters"),
            ("min(causeway_cable_udp_segmentation)", "UDP segmentation on"),
        ],
    ),
    (
        "Route agents: nodes per gateway node",
        "none",
        &[
            ("sum by (gateway) (causeway_node_nexthop)", "{{gateway}}"),
            ("sum(increase(causeway_node_nexthop_changes_total[1h]))", "nexthop moves (per hour)"),
        ],
    ),
    (
        "Route agents: answering gateways and sync",
        "none",
        &[
            ("sum by (gateway) (causeway_node_gateway_answering)", "{{gateway}} answering"),
            ("count(causeway_node_synced == 0) or vector(0)", "agents not synced"),
            ("sum(causeway_node_routes)", "routes"),
        ],
    ),
    (
        "Broker: records and watchers",
        "none",
        &[
            ("sum by (kind) (causeway_broker_records)", "{{kind}}"),
            ("sum(causeway_broker_watchers)", "watchers"),
            ("min(causeway_broker_ready)", "ready"),
        ],
    ),
    (
        "Broker: STUN and relay",
        "pps",
        &[
            ("sum(rate(causeway_broker_stun_answered_total[5m]))", "STUN answered"),
            ("sum(rate(causeway_broker_relay_relayed_total[5m]))", "relayed"),
            ("sum(rate(causeway_broker_relay_refused_total[5m]))", "registrations refused"),
            ("sum(rate(causeway_broker_udp_limited_total[5m]))", "over budget"),
        ],
    ),
    (
        "Resident memory",
        "bytes",
        &[("sum by (pod) (process_resident_memory_bytes{namespace=\"$namespace\"})", "{{pod}}")],
    ),
    (
        "CPU",
        "percentunit",
        &[("sum by (pod) (rate(process_cpu_seconds_total{namespace=\"$namespace\"}[5m]))", "{{pod}}")],
    ),
];

/// The Grafana dashboard (schema 39), with a data source and a namespace variable.
#[must_use]
pub fn dashboard(s: &Settings) -> Value {
    let panels: Vec<Value> = PANELS
        .iter()
        .enumerate()
        .map(|(i, (title, unit, targets))| panel(u32::try_from(i).unwrap_or(0) + 1, title, unit, targets))
        .collect();
    json!({
        "uid": "causeway",
        "title": "Causeway",
        "description": "Cross-cluster tunnels, failovers, drops, route agents and the broker (generated by deploy/src/monitoring.rs)",
        "tags": ["causeway", "multi-cluster"],
        "schemaVersion": 39,
        "version": 1,
        "editable": true,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
            {"name": "namespace", "type": "constant", "query": s.namespace, "hide": 2},
        ]},
        "panels": panels,
    })
}

/// The dashboard as the JSON file operators import.
pub fn dashboard_json(s: &Settings) -> Result<String, ManifestError> {
    serde_json::to_string_pretty(&dashboard(s))
        .map(|t| t + "\n")
        .map_err(|e| ManifestError::Serialise { what: "the dashboard".into(), message: e.to_string() })
}

/// The `monitoring.yaml` bundle: three metrics Services, the ServiceMonitor, the dashboard
/// ConfigMap.
pub fn manifests(s: &Settings) -> Result<Vec<Manifest>, ManifestError> {
    let ns = s.namespace.as_str();
    let monitor = ServiceMonitor {
        api_version: "monitoring.coreos.com/v1".into(),
        kind: "ServiceMonitor".into(),
        metadata: ObjectMeta {
            name: Some("causeway".into()),
            namespace: Some(ns.into()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/name".into(), "causeway".into()),
                ("app.kubernetes.io/managed-by".into(), crate::manifests::MANAGER.into()),
            ])),
            ..ObjectMeta::default()
        },
        spec: ServiceMonitorSpec {
            selector: Selector {
                match_labels: BTreeMap::from([
                    ("app.kubernetes.io/name".into(), "causeway".into()),
                    (METRICS_LABEL.into(), "true".into()),
                ]),
            },
            namespace_selector: NamespaceSelector { match_names: vec![ns.into()] },
            endpoints: vec![Endpoint {
                port: "metrics".into(),
                path: "/metrics".into(),
                interval: "30s".into(),
                scheme: "http".into(),
            }],
        },
    };
    let mut cm_labels = labels("dashboard");
    cm_labels.remove(METRICS_LABEL);
    cm_labels.insert("grafana_dashboard".into(), "1".into());
    let dashboard = ConfigMap {
        metadata: ObjectMeta {
            name: Some("causeway-grafana-dashboard".into()),
            namespace: Some(ns.into()),
            labels: Some(cm_labels),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([("causeway.json".into(), dashboard_json(s)?)])),
        ..ConfigMap::default()
    };
    Ok(vec![
        manifest(&metrics_service(ns, "gateway", s.metrics_port))?,
        manifest(&metrics_service(ns, "route-agent", s.agent_metrics_port))?,
        manifest(&metrics_service(ns, "broker", BROKER_METRICS_PORT))?,
        manifest(&monitor)?,
        manifest(&dashboard)?,
    ])
}

/// Every metric name the dashboard's expressions use.
#[must_use]
pub fn dashboard_metrics() -> Vec<String> {
    let mut names: Vec<String> = PANELS
        .iter()
        .flat_map(|(_, _, targets)| targets.iter())
        .flat_map(|(expr, _)| {
            expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("causeway_") || w.starts_with("process_"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}
