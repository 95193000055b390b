//! The Kubernetes objects Causeway runs as, built from typed structs (k8s-openapi) so that a
//! typo is a compile error, not a rejected apply. `causeway manifests` writes them to
//! `deploy/manifests/`; a test fails when the checked-in files drift from this code.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{
            DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, Deployment, DeploymentSpec,
            DeploymentStrategy, RollingUpdateDaemonSet,
        },
        batch::v1::{Job, JobSpec},
        core::v1::{
            Affinity, Capabilities, ConfigMapEnvSource, Container, ContainerPort, EnvFromSource, EnvVar,
            EnvVarSource, HTTPGetAction, HostPathVolumeSource, Namespace, NodeAffinity, NodeSelector,
            NodeSelectorRequirement, NodeSelectorTerm, ObjectFieldSelector, PersistentVolumeClaim,
            PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec,
            PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretVolumeSource,
            SecurityContext, Service, ServiceAccount, ServicePort, ServiceSpec, Toleration, Volume,
            VolumeMount, VolumeResourceRequirements,
        },
        policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec},
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject},
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
};
use serde::Serialize;

/// The label that marks a node as a gateway node.
pub const GATEWAY_LABEL: &str = "causeway.io/gateway";
/// The field manager of Causeway's server-side applies (and the `app.kubernetes.io/managed-by`
/// value), so that `uninstall` finds exactly what it created.
pub const MANAGER: &str = "causeway";
/// Secrets the CLI writes (never checked in: they hold keys and tokens).
pub const CREDENTIALS_SECRET: &str = "causeway-broker-credentials";
/// The route agents' read-only credential (they run on every node: none of them may write the
/// cluster's records).
pub const READER_SECRET: &str = "causeway-route-agent-credentials";
pub const BROKER_TLS_SECRET: &str = "causeway-broker-tls";
pub const BROKER_BOOTSTRAP_SECRET: &str = "causeway-broker-bootstrap";
/// Optional per-cluster overrides (`CAUSEWAY_*` variables) for the gateway.
pub const GATEWAY_CONFIG: &str = "causeway-gateway-config";
/// The Lease the gateways of a cluster elect the active one with.
pub const GATEWAY_LEASE: &str = "causeway-gateway";
/// The key of the credentials file inside [`CREDENTIALS_SECRET`].
pub const CREDENTIALS_KEY: &str = "credentials.json";
/// The key of the bootstrap token hashes inside [`BROKER_BOOTSTRAP_SECRET`].
pub const BOOTSTRAP_KEY: &str = "bootstrap.json";
/// The broker's `/metrics` (plain HTTP on the pod's address; the API port stays HTTPS).
pub const BROKER_METRICS_PORT: u16 = 9466;

/// What the generated objects depend on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub namespace: String,
    pub image: String,
    /// Where the broker listens, and the port of its Service.
    pub broker_port: u16,
    /// `LoadBalancer` (default: the gateways of other clusters must reach it), `NodePort` or
    /// `ClusterIP` (behind an operator's own ingress).
    pub broker_service_type: String,
    pub broker_storage: String,
    pub wireguard_port: u16,
    pub metrics_port: u16,
    /// Where gateways answer their nodes' route agents (UDP).
    pub node_probe_port: u16,
    /// The route agents' `/metrics` and `/healthz` (TCP, on each node's address).
    pub agent_metrics_port: u16,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            namespace: "causeway-system".into(),
            image: format!("ghcr.io/causeway-net/causeway:{}", env!("CARGO_PKG_VERSION")),
            broker_port: 7780,
            broker_service_type: "LoadBalancer".into(),
            broker_storage: "1Gi".into(),
            wireguard_port: 51820,
            metrics_port: 9464,
            node_probe_port: 51821,
            agent_metrics_port: 9465,
        }
    }
}

/// One object, ready to write as YAML or to server-side apply.
#[derive(Clone, Debug, PartialEq)]
pub struct Manifest {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    pub namespace: Option<String>,
    /// The object as the API server receives it.
    pub json: serde_json::Value,
    /// The same object as YAML, fields in the API's order.
    pub yaml: String,
}

impl Manifest {
    /// `kind/name` (with the namespace when there is one), for progress lines and errors.
    #[must_use]
    pub fn describe(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{}/{} in {ns}", self.kind, self.name),
            None => format!("{}/{}", self.kind, self.name),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("serialising {what}: {message}")]
    Serialise { what: String, message: String },
}

pub(crate) fn manifest<K>(object: &K) -> Result<Manifest, ManifestError>
where
    K: k8s_openapi::Resource + k8s_openapi::Metadata<Ty = ObjectMeta> + Serialize,
{
    let meta = object.metadata();
    let name = meta.name.clone().unwrap_or_default();
    let what = format!("{}/{name}", K::KIND);
    let json = serde_json::to_value(object)
        .map_err(|e| ManifestError::Serialise { what: what.clone(), message: e.to_string() })?;
    let yaml = serde_saphyr::to_string(object)
        .map_err(|e| ManifestError::Serialise { what, message: e.to_string() })?;
    Ok(Manifest {
        api_version: K::API_VERSION.into(),
        kind: K::KIND.into(),
        name,
        namespace: meta.namespace.clone(),
        json,
        yaml,
    })
}

/// The groups of objects, applied and written separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bundle {
    /// The MCS API CRDs and Causeway's own; applied by both `deploy-broker` and `join`.
    Crds,
    /// The broker, in the cluster `deploy-broker` targets.
    Broker,
    /// What `join` applies to every member cluster: RBAC, the gateway and route-agent DaemonSets.
    Member,
    /// For the Prometheus Operator and Grafana: metrics Services, a ServiceMonitor and the
    /// dashboard (applied by hand where those run; neither `join` nor `deploy-broker` does).
    Monitoring,
}

impl Bundle {
    pub const ALL: [Bundle; 4] = [Bundle::Crds, Bundle::Broker, Bundle::Member, Bundle::Monitoring];

    /// The file under `deploy/manifests/`.
    #[must_use]
    pub fn file_name(self) -> &'static str {
        match self {
            Bundle::Crds => "crds.yaml",
            Bundle::Broker => "broker.yaml",
            Bundle::Member => "member.yaml",
            Bundle::Monitoring => "monitoring.yaml",
        }
    }

    pub fn manifests(self, s: &Settings) -> Result<Vec<Manifest>, ManifestError> {
        match self {
            Bundle::Crds => crate::crds::manifests(),
            Bundle::Broker => broker(s),
            Bundle::Member => member(s),
            Bundle::Monitoring => crate::monitoring::manifests(s),
        }
    }
}

/// The multi-document YAML file of a bundle.
pub fn render(bundle: Bundle, s: &Settings) -> Result<String, ManifestError> {
    let mut out = String::from(
        "# Generated by `causeway manifests` from deploy/src/manifests.rs and deploy/src/crds.rs: do not edit.\n\
         # Secrets holding keys and tokens are not here; `causeway deploy-broker` and `causeway join` create them.\n",
    );
    for m in bundle.manifests(s)? {
        out.push_str("---\n");
        out.push_str(&m.yaml);
        if !m.yaml.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok(out)
}

fn labels(component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "causeway".into()),
        ("app.kubernetes.io/component".into(), component.into()),
        ("app.kubernetes.io/managed-by".into(), MANAGER.into()),
    ])
}

fn selector(component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "causeway".into()),
        ("app.kubernetes.io/component".into(), component.into()),
    ])
}

fn meta(name: &str, namespace: Option<&str>, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: namespace.map(Into::into),
        labels: Some(labels(component)),
        ..ObjectMeta::default()
    }
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
    let v = |xs: &[&str]| xs.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    PolicyRule {
        api_groups: Some(v(groups)),
        resources: Some(v(resources)),
        verbs: v(verbs),
        ..PolicyRule::default()
    }
}

fn named_rule(groups: &[&str], resources: &[&str], names: &[&str], verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        resource_names: Some(names.iter().map(|x| (*x).to_owned()).collect()),
        ..rule(groups, resources, verbs)
    }
}

fn subject(name: &str, ns: &str) -> Vec<Subject> {
    vec![Subject {
        kind: "ServiceAccount".into(),
        name: name.into(),
        namespace: Some(ns.into()),
        ..Subject::default()
    }]
}

fn role_ref(kind: &str, name: &str) -> RoleRef {
    RoleRef { api_group: "rbac.authorization.k8s.io".into(), kind: kind.into(), name: name.into() }
}

fn host_path(name: &str, path: &str, kind: &str) -> Volume {
    Volume {
        name: name.into(),
        host_path: Some(HostPathVolumeSource { path: path.into(), type_: Some(kind.into()) }),
        ..Volume::default()
    }
}

fn secret_volume(name: &str, secret: &str) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            default_mode: Some(0o400),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

fn env_field(name: &str, field: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), ..EnvVar::default() }
}

fn http_probe(path: &str, port: u16, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(port.into()),
            // No host: the kubelet probes the pod's IP, which on the host network is the
            // node address the gateway serves metrics and health on.
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

fn capabilities(add: &[&str]) -> SecurityContext {
    SecurityContext {
        capabilities: Some(Capabilities {
            add: Some(add.iter().map(|c| (*c).to_owned()).collect()),
            drop: Some(vec!["ALL".into()]),
        }),
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        ..SecurityContext::default()
    }
}

fn resources(cpu: &str, memory: &str, memory_limit: &str) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".into(), Quantity(cpu.into())),
            ("memory".into(), Quantity(memory.into())),
        ])),
        limits: Some(BTreeMap::from([("memory".into(), Quantity(memory_limit.into()))])),
        ..ResourceRequirements::default()
    }
}

/// The gateway and the route agent run on every node they are meant for, tainted or not.
fn tolerate_everything() -> Vec<Toleration> {
    vec![Toleration { operator: Some("Exists".into()), ..Toleration::default() }]
}

/// The image runs as an unprivileged user (the broker's); node agents need root, because added
/// capabilities only take effect for uid 0 without ambient-capability support in the runtime.
fn node_agent_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_user: Some(0),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }),
        ..PodSecurityContext::default()
    }
}

fn namespace(s: &Settings) -> Namespace {
    // Shared by the broker and member bundles (a cluster may hold both): one label set.
    let mut meta = meta(&s.namespace, None, "system");
    // The gateway needs host networking and capabilities: the baseline profile refuses those.
    meta.labels
        .get_or_insert_default()
        .insert("pod-security.kubernetes.io/enforce".into(), "privileged".into());
    Namespace { metadata: meta, ..Namespace::default() }
}

fn member(s: &Settings) -> Result<Vec<Manifest>, ManifestError> {
    let ns = s.namespace.as_str();
    let gw = "causeway-gateway";
    let ra = "causeway-route-agent";
    let gateway_role = ClusterRole {
        metadata: meta(gw, None, "gateway"),
        rules: Some(vec![
            // The cluster source: gateway label, podCIDRs and addresses of the nodes.
            rule(&[""], &["nodes"], &["get", "list", "watch"]),
            // ServiceExports are published to the broker with their Service's cluster IPs.
            rule(&["networking.k8s.io"], &["servicecidrs"], &["get", "list"]),
            rule(&[""], &["services"], &["get", "list", "watch"]),
            rule(&["multicluster.x-k8s.io"], &["serviceexports"], &["get", "list", "watch"]),
            rule(&["discovery.k8s.io"], &["endpointslices"], &["get", "list", "watch"]),
            // The cluster set's services as ServiceImports, and the exports' conditions.
            rule(
                &["multicluster.x-k8s.io"],
                &["serviceimports"],
                &["get", "list", "create", "patch", "delete"],
            ),
            rule(&["multicluster.x-k8s.io"], &["serviceimports/status", "serviceexports/status"], &["patch"]),
        ]),
        ..ClusterRole::default()
    };
    let gateway_binding = ClusterRoleBinding {
        metadata: meta(gw, None, "gateway"),
        role_ref: role_ref("ClusterRole", gw),
        subjects: Some(subject(gw, ns)),
    };
    // Leases cannot be narrowed by name for `create`, so the election gets its own namespace's
    // leases and nothing else.
    let gateway_ns_role = Role {
        metadata: meta(gw, Some(ns), "gateway"),
        rules: Some(vec![rule(
            &["coordination.k8s.io"],
            &["leases"],
            &["get", "list", "watch", "create", "update"],
        )]),
    };
    let gateway_ns_binding = RoleBinding {
        metadata: meta(gw, Some(ns), "gateway"),
        role_ref: role_ref("Role", gw),
        subjects: Some(subject(gw, ns)),
    };
    // CIDR discovery reads exactly two well-known config maps.
    let gateway_kube_system = Role {
        metadata: meta("causeway-gateway-cidr-discovery", Some("kube-system"), "gateway"),
        rules: Some(vec![named_rule(&[""], &["configmaps"], &["kubeadm-config", "kube-proxy"], &["get"])]),
    };
    let gateway_kube_system_binding = RoleBinding {
        metadata: meta("causeway-gateway-cidr-discovery", Some("kube-system"), "gateway"),
        role_ref: role_ref("Role", "causeway-gateway-cidr-discovery"),
        subjects: Some(subject(gw, ns)),
    };
    let agent_role = ClusterRole {
        metadata: meta(ra, None, "route-agent"),
        // The Lease holder's node address.
        rules: Some(vec![rule(&[""], &["nodes"], &["get"])]),
        ..ClusterRole::default()
    };
    let agent_binding = ClusterRoleBinding {
        metadata: meta(ra, None, "route-agent"),
        role_ref: role_ref("ClusterRole", ra),
        subjects: Some(subject(ra, ns)),
    };
    let agent_ns_role = Role {
        metadata: meta(ra, Some(ns), "route-agent"),
        rules: Some(vec![named_rule(&["coordination.k8s.io"], &["leases"], &[GATEWAY_LEASE], &["get"])]),
    };
    let agent_ns_binding = RoleBinding {
        metadata: meta(ra, Some(ns), "route-agent"),
        role_ref: role_ref("Role", ra),
        subjects: Some(subject(ra, ns)),
    };

    let config_env = EnvFromSource {
        config_map_ref: Some(ConfigMapEnvSource { name: GATEWAY_CONFIG.into(), optional: Some(true) }),
        ..EnvFromSource::default()
    };
    let gateway_container = Container {
        name: "gateway".into(),
        image: Some(s.image.clone()),
        command: Some(vec!["causeway".into(), "gateway".into(), "--kubernetes".into()]),
        env: Some(vec![
            env_field("CAUSEWAY_HOSTNAME", "spec.nodeName"),
            env_field("CAUSEWAY_NAMESPACE", "metadata.namespace"),
            env_field("CAUSEWAY_POD_NAME", "metadata.name"),
            env("CAUSEWAY_BROKER_CREDENTIALS", &format!("/etc/causeway/broker/{CREDENTIALS_KEY}")),
            env("CAUSEWAY_LISTEN_PORT", &s.wireguard_port.to_string()),
            // Metrics and health on the node's own address, not on every interface (the
            // uplink faces the underlay). Kubernetes expands $(…) from the entry above.
            env_field("CAUSEWAY_NODE_IP", "status.hostIP"),
            env("CAUSEWAY_METRICS_LISTEN", &format!("$(CAUSEWAY_NODE_IP):{}", s.metrics_port)),
            // The route agents of the cluster's nodes ask here whether this gateway forwards.
            env("CAUSEWAY_NODE_PROBE_LISTEN", &format!("$(CAUSEWAY_NODE_IP):{}", s.node_probe_port)),
            env("CAUSEWAY_STATE_DIR", "/var/lib/causeway"),
            env("CAUSEWAY_STATUS_SOCKET", "/run/causeway/gateway.sock"),
            // ClusterSetIPs for the gateway node's processes: no route agent runs there.
            env("CAUSEWAY_SERVICE_CGROUP", "/host/sys/fs/cgroup"),
        ]),
        env_from: Some(vec![config_env]),
        ports: Some(vec![
            ContainerPort {
                name: Some("wireguard".into()),
                container_port: s.wireguard_port.into(),
                protocol: Some("UDP".into()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("metrics".into()),
                container_port: s.metrics_port.into(),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("node-probe".into()),
                container_port: s.node_probe_port.into(),
                protocol: Some("UDP".into()),
                ..ContainerPort::default()
            },
        ]),
        // NET_ADMIN: TUN, routes, TC/XDP attach. BPF + PERFMON: load programs and maps.
        // SYS_ADMIN: pin maps on bpffs and open pinned objects on older kernels.
        security_context: Some(capabilities(&["NET_ADMIN", "BPF", "PERFMON", "SYS_ADMIN"])),
        liveness_probe: Some(http_probe("/healthz", s.metrics_port, 10, 3)),
        readiness_probe: Some(http_probe("/readyz", s.metrics_port, 5, 1)),
        resources: Some(resources("100m", "64Mi", "512Mi")),
        volume_mounts: Some(vec![
            mount("bpffs", "/sys/fs/bpf", false),
            mount("tun", "/dev/net/tun", false),
            mount("state", "/var/lib/causeway", false),
            mount("run", "/run/causeway", false),
            mount("wireguard-uapi", "/var/run/wireguard", false),
            mount("broker-credentials", "/etc/causeway/broker", true),
            mount("cgroup", "/host/sys/fs/cgroup", true),
        ]),
        ..Container::default()
    };
    let gateway_pod = PodSpec {
        service_account_name: Some(gw.into()),
        host_network: Some(true),
        dns_policy: Some("ClusterFirstWithHostNet".into()),
        priority_class_name: Some("system-node-critical".into()),
        node_selector: Some(BTreeMap::from([(GATEWAY_LABEL.into(), "true".into())])),
        tolerations: Some(tolerate_everything()),
        // Time to remove routes and say goodbye to the broker, so the standby takes over at once.
        termination_grace_period_seconds: Some(30),
        security_context: Some(node_agent_security()),
        containers: vec![gateway_container],
        volumes: Some(vec![
            host_path("bpffs", "/sys/fs/bpf", "DirectoryOrCreate"),
            host_path("tun", "/dev/net/tun", "CharDevice"),
            host_path("state", "/var/lib/causeway", "DirectoryOrCreate"),
            host_path("run", "/run/causeway", "DirectoryOrCreate"),
            host_path("wireguard-uapi", "/var/run/wireguard", "DirectoryOrCreate"),
            secret_volume("broker-credentials", CREDENTIALS_SECRET),
            host_path("cgroup", "/sys/fs/cgroup", "Directory"),
        ]),
        ..PodSpec::default()
    };
    // One gateway pod down at a time, and the next only after the replaced one has been ready
    // for a while: the two gateways of a cluster are never down together.
    let one_at_a_time = DaemonSetUpdateStrategy {
        type_: Some("RollingUpdate".into()),
        rolling_update: Some(RollingUpdateDaemonSet {
            max_unavailable: Some(IntOrString::Int(1)),
            max_surge: Some(IntOrString::Int(0)),
        }),
    };
    let gateway_ds = DaemonSet {
        metadata: meta(gw, Some(ns), "gateway"),
        spec: Some(DaemonSetSpec {
            selector: LabelSelector { match_labels: Some(selector("gateway")), ..LabelSelector::default() },
            min_ready_seconds: Some(10),
            update_strategy: Some(one_at_a_time.clone()),
            template: PodTemplateSpec { metadata: Some(meta_template("gateway")), spec: Some(gateway_pod) },
            ..DaemonSetSpec::default()
        }),
        ..DaemonSet::default()
    };
    // Drains, too, take at most one gateway at a time.
    let gateway_pdb = PodDisruptionBudget {
        metadata: meta(gw, Some(ns), "gateway"),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector("gateway")),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    };

    let agent_container = Container {
        name: "route-agent".into(),
        image: Some(s.image.clone()),
        command: Some(vec!["causeway".into(), "route-agent".into(), "--kubernetes".into()]),
        env: Some(vec![
            env_field("CAUSEWAY_NAMESPACE", "metadata.namespace"),
            env("CAUSEWAY_BROKER_CREDENTIALS", &format!("/etc/causeway/broker/{CREDENTIALS_KEY}")),
            env("CAUSEWAY_NODE_PROBE_PORT", &s.node_probe_port.to_string()),
            env_field("CAUSEWAY_NODE_IP", "status.hostIP"),
            env("CAUSEWAY_METRICS_LISTEN", &format!("$(CAUSEWAY_NODE_IP):{}", s.agent_metrics_port)),
            // ClusterSetIPs, for every process of the node (pods and host).
            env("CAUSEWAY_SERVICE_CGROUP", "/host/sys/fs/cgroup"),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".into()),
            container_port: s.agent_metrics_port.into(),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        liveness_probe: Some(http_probe("/healthz", s.agent_metrics_port, 10, 3)),
        // NET_ADMIN: the nexthop and the routes through it, and attaching the ClusterSetIP
        // socket programs to the node's cgroup; BPF: loading and pinning them (the host's
        // bpffs, so that they keep translating while the agent restarts).
        security_context: Some(capabilities(&["NET_ADMIN", "BPF"])),
        resources: Some(resources("10m", "16Mi", "128Mi")),
        volume_mounts: Some(vec![
            mount("broker-credentials", "/etc/causeway/broker", true),
            mount("cgroup", "/host/sys/fs/cgroup", true),
            mount("bpffs", "/sys/fs/bpf", false),
        ]),
        ..Container::default()
    };
    let not_a_gateway = NodeAffinity {
        required_during_scheduling_ignored_during_execution: Some(NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm {
                match_expressions: Some(vec![NodeSelectorRequirement {
                    key: GATEWAY_LABEL.into(),
                    operator: "NotIn".into(),
                    values: Some(vec!["true".into()]),
                }]),
                ..NodeSelectorTerm::default()
            }],
        }),
        ..NodeAffinity::default()
    };
    let agent_ds = DaemonSet {
        metadata: meta(ra, Some(ns), "route-agent"),
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(selector("route-agent")),
                ..LabelSelector::default()
            },
            update_strategy: Some(one_at_a_time),
            template: PodTemplateSpec {
                metadata: Some(meta_template("route-agent")),
                spec: Some(PodSpec {
                    service_account_name: Some(ra.into()),
                    host_network: Some(true),
                    dns_policy: Some("ClusterFirstWithHostNet".into()),
                    priority_class_name: Some("system-node-critical".into()),
                    affinity: Some(Affinity { node_affinity: Some(not_a_gateway), ..Affinity::default() }),
                    tolerations: Some(tolerate_everything()),
                    security_context: Some(node_agent_security()),
                    containers: vec![agent_container],
                    volumes: Some(vec![
                        secret_volume("broker-credentials", READER_SECRET),
                        host_path("cgroup", "/sys/fs/cgroup", "Directory"),
                        host_path("bpffs", "/sys/fs/bpf", "DirectoryOrCreate"),
                    ]),
                    ..PodSpec::default()
                }),
            },
            ..DaemonSetSpec::default()
        }),
        ..DaemonSet::default()
    };

    // Cluster-set DNS: `clusterset.local` for the cluster's pods (CoreDNS forwards the zone to
    // this Service). Unprivileged: it listens on 5353 and the Service maps 53 to it.
    let dns = "causeway-dns";
    let dns_container = Container {
        name: "dns".into(),
        image: Some(s.image.clone()),
        command: Some(vec!["causeway".into(), "dns".into()]),
        env: Some(vec![
            env("CAUSEWAY_BROKER_CREDENTIALS", &format!("/etc/causeway/broker/{CREDENTIALS_KEY}")),
            env("CAUSEWAY_DNS_LISTEN", "0.0.0.0:5353"),
            env("CAUSEWAY_NODE_PROBE_PORT", &s.node_probe_port.to_string()),
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some("dns".into()),
                container_port: 5353,
                protocol: Some("UDP".into()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("dns-tcp".into()),
                container_port: 5353,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
        ]),
        liveness_probe: Some(Probe {
            tcp_socket: Some(k8s_openapi::api::core::v1::TCPSocketAction {
                port: IntOrString::Int(5353),
                ..k8s_openapi::api::core::v1::TCPSocketAction::default()
            }),
            period_seconds: Some(10),
            ..Probe::default()
        }),
        security_context: Some(capabilities(&[])),
        resources: Some(resources("20m", "32Mi", "256Mi")),
        volume_mounts: Some(vec![mount("broker-credentials", "/etc/causeway/broker", true)]),
        ..Container::default()
    };
    let dns_deployment = Deployment {
        metadata: meta(dns, Some(ns), "dns"),
        spec: Some(DeploymentSpec {
            replicas: Some(2),
            selector: LabelSelector { match_labels: Some(selector("dns")), ..LabelSelector::default() },
            template: PodTemplateSpec {
                metadata: Some(meta_template("dns")),
                spec: Some(PodSpec {
                    automount_service_account_token: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![dns_container],
                    volumes: Some(vec![secret_volume("broker-credentials", READER_SECRET)]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    };
    let dns_port = |name: &str, proto: &str| ServicePort {
        name: Some(name.into()),
        port: 53,
        target_port: Some(IntOrString::Int(5353)),
        protocol: Some(proto.into()),
        ..ServicePort::default()
    };
    let dns_service = Service {
        metadata: meta(dns, Some(ns), "dns"),
        spec: Some(ServiceSpec {
            selector: Some(selector("dns")),
            ports: Some(vec![dns_port("dns", "UDP"), dns_port("dns-tcp", "TCP")]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };

    Ok(vec![
        manifest(&namespace(s))?,
        manifest(&ServiceAccount { metadata: meta(gw, Some(ns), "gateway"), ..ServiceAccount::default() })?,
        manifest(&ServiceAccount {
            metadata: meta(ra, Some(ns), "route-agent"),
            ..ServiceAccount::default()
        })?,
        manifest(&gateway_role)?,
        manifest(&gateway_binding)?,
        manifest(&gateway_ns_role)?,
        manifest(&gateway_ns_binding)?,
        manifest(&gateway_kube_system)?,
        manifest(&gateway_kube_system_binding)?,
        manifest(&gateway_ds)?,
        manifest(&gateway_pdb)?,
        manifest(&agent_role)?,
        manifest(&agent_binding)?,
        manifest(&agent_ns_role)?,
        manifest(&agent_ns_binding)?,
        manifest(&dns_deployment)?,
        manifest(&dns_service)?,
        manifest(&agent_ds)?,
    ])
}

/// The Job `uninstall` runs on `node` once the DaemonSets are gone: `causeway cleanup` in the
/// host's network namespace removes what a restart-safe gateway (or route agent) leaves there —
/// the routes, the tunnel device and the pinned eBPF maps, programs and links.
pub fn cleanup_job(s: &Settings, node: &str) -> Result<Manifest, ManifestError> {
    node_job(s, &cleanup_job_name(node), node, &["causeway", "cleanup"], false)
}

/// A Job that runs `command` once on `node`, in the host's network namespace, with what a
/// gateway node's tools need: bpffs, the gateway's run directory (its status socket) and, with
/// `credentials`, the cluster's broker credentials at `/etc/causeway/broker/credentials.json`.
/// No service-account token; two retries at most; gone 10 minutes after it ends.
pub fn node_job(
    s: &Settings,
    name: &str,
    node: &str,
    command: &[&str],
    credentials: bool,
) -> Result<Manifest, ManifestError> {
    let ns = s.namespace.as_str();
    let mut mounts = vec![mount("bpffs", "/sys/fs/bpf", false), mount("run", "/run/causeway", false)];
    let mut volumes = vec![
        host_path("bpffs", "/sys/fs/bpf", "DirectoryOrCreate"),
        host_path("run", "/run/causeway", "DirectoryOrCreate"),
    ];
    if credentials {
        mounts.push(mount("broker-credentials", "/etc/causeway/broker", true));
        volumes.push(secret_volume("broker-credentials", CREDENTIALS_SECRET));
    }
    let container = Container {
        name: "node".into(),
        image: Some(s.image.clone()),
        command: Some(command.iter().map(|c| (*c).to_owned()).collect()),
        // NET_RAW: ping (diagnose's path probe); the rest as the gateway's.
        security_context: Some(capabilities(&["NET_ADMIN", "NET_RAW", "BPF", "SYS_ADMIN"])),
        resources: Some(resources("10m", "32Mi", "128Mi")),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    let pod = PodSpec {
        node_name: Some(node.into()),
        host_network: Some(true),
        restart_policy: Some("Never".into()),
        automount_service_account_token: Some(false),
        tolerations: Some(tolerate_everything()),
        security_context: Some(node_agent_security()),
        containers: vec![container],
        volumes: Some(volumes),
        ..PodSpec::default()
    };
    let job = Job {
        metadata: meta(name, Some(ns), "node-job"),
        spec: Some(JobSpec {
            backoff_limit: Some(2),
            active_deadline_seconds: Some(120),
            ttl_seconds_after_finished: Some(600),
            template: PodTemplateSpec { metadata: Some(meta_template("node-job")), spec: Some(pod) },
            ..JobSpec::default()
        }),
        ..Job::default()
    };
    manifest(&job)
}

/// `causeway-cleanup-<node>`, within the 63 characters of a label value.
#[must_use]
pub fn cleanup_job_name(node: &str) -> String {
    node_job_name("causeway-cleanup", node)
}

/// `<prefix>-<node>`, within the 63 characters of a label value (a long node name is cut and
/// told apart by a hash of the whole).
#[must_use]
pub fn node_job_name(prefix: &str, node: &str) -> String {
    let clean: String = node
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' })
        .collect();
    let name = format!("{prefix}-{clean}");
    if name.len() <= 63 {
        return name;
    }
    let hash =
        node.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    format!("{}-{:08x}", name[..54].trim_end_matches('-'), hash as u32)
}

fn meta_template(component: &str) -> ObjectMeta {
    ObjectMeta { labels: Some(labels(component)), ..ObjectMeta::default() }
}

fn broker(s: &Settings) -> Result<Vec<Manifest>, ManifestError> {
    let ns = s.namespace.as_str();
    let name = "causeway-broker";
    let pvc = PersistentVolumeClaim {
        metadata: meta(name, Some(ns), "broker"),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".into(), Quantity(s.broker_storage.clone()))])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    };
    let container = Container {
        name: "broker".into(),
        image: Some(s.image.clone()),
        // The broker mirrors this cluster's ClusterSetPolicy objects into its policy rules.
        command: Some(vec!["causeway".into(), "broker".into(), "--kubernetes-policies".into()]),
        env: Some(vec![
            env("CAUSEWAY_BROKER_LISTEN", &format!("0.0.0.0:{}", s.broker_port)),
            env("CAUSEWAY_BROKER_DATA_DIR", "/var/lib/causeway-broker"),
            env("CAUSEWAY_BROKER_TLS_CERT_FILE", "/etc/causeway/tls/tls.crt"),
            env("CAUSEWAY_BROKER_TLS_KEY_FILE", "/etc/causeway/tls/tls.key"),
            env("CAUSEWAY_BROKER_BOOTSTRAP_FILE", &format!("/etc/causeway/bootstrap/{BOOTSTRAP_KEY}")),
            env_field("CAUSEWAY_POD_IP", "status.podIP"),
            env("CAUSEWAY_BROKER_METRICS_LISTEN", &format!("$(CAUSEWAY_POD_IP):{BROKER_METRICS_PORT}")),
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some("https".into()),
                container_port: s.broker_port.into(),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
            // The STUN responder (`--stun-listen`, default 0.0.0.0:3478): gateways learn their
            // addresses beyond a NAT from it.
            ContainerPort {
                name: Some("metrics".into()),
                container_port: BROKER_METRICS_PORT.into(),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("stun".into()),
                container_port: causeway_broker_api::stun::DEFAULT_PORT.into(),
                protocol: Some("UDP".into()),
                ..ContainerPort::default()
            },
        ]),
        security_context: Some(capabilities(&[])),
        liveness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz".into()),
                port: IntOrString::String("https".into()),
                scheme: Some("HTTPS".into()),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(10),
            ..Probe::default()
        }),
        // Ready while the store answers (etcd reachable, the embedded file readable).
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/readyz".into()),
                port: IntOrString::String("https".into()),
                scheme: Some("HTTPS".into()),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(5),
            ..Probe::default()
        }),
        resources: Some(resources("50m", "64Mi", "1Gi")),
        volume_mounts: Some(vec![
            mount("data", "/var/lib/causeway-broker", false),
            mount("tls", "/etc/causeway/tls", true),
            mount("bootstrap", "/etc/causeway/bootstrap", true),
        ]),
        ..Container::default()
    };
    let deployment = Deployment {
        metadata: meta(name, Some(ns), "broker"),
        spec: Some(DeploymentSpec {
            // The embedded store has one writer: replicas come with the etcd store.
            replicas: Some(1),
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".into()),
                ..DeploymentStrategy::default()
            }),
            selector: LabelSelector { match_labels: Some(selector("broker")), ..LabelSelector::default() },
            template: PodTemplateSpec {
                metadata: Some(meta_template("broker")),
                spec: Some(PodSpec {
                    service_account_name: Some(name.into()),
                    // For the ClusterSetPolicy watch, and nothing else (see its ClusterRole).
                    automount_service_account_token: Some(true),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        fs_group: Some(65532),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container],
                    volumes: Some(vec![
                        Volume {
                            name: "data".into(),
                            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                                claim_name: name.into(),
                                ..PersistentVolumeClaimVolumeSource::default()
                            }),
                            ..Volume::default()
                        },
                        secret_volume("tls", BROKER_TLS_SECRET),
                        secret_volume("bootstrap", BROKER_BOOTSTRAP_SECRET),
                    ]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    };
    let service = Service {
        metadata: meta(name, Some(ns), "broker"),
        spec: Some(ServiceSpec {
            type_: Some(s.broker_service_type.clone()),
            selector: Some(selector("broker")),
            ports: Some(vec![
                ServicePort {
                    name: Some("https".into()),
                    port: s.broker_port.into(),
                    target_port: Some(IntOrString::String("https".into())),
                    protocol: Some("TCP".into()),
                    ..ServicePort::default()
                },
                ServicePort {
                    name: Some("stun".into()),
                    port: causeway_broker_api::stun::DEFAULT_PORT.into(),
                    target_port: Some(IntOrString::String("stun".into())),
                    protocol: Some("UDP".into()),
                    ..ServicePort::default()
                },
            ]),
            // STUN answers with the address a request came from: traffic from outside must
            // reach the pod with its source address, not the node's.
            external_traffic_policy: matches!(s.broker_service_type.as_str(), "LoadBalancer" | "NodePort")
                .then(|| "Local".into()),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    let role = ClusterRole {
        metadata: meta(name, None, "broker"),
        rules: Some(vec![rule(
            &[crate::crds::CAUSEWAY_GROUP],
            &["clustersetpolicies"],
            &["get", "list", "watch"],
        )]),
        ..ClusterRole::default()
    };
    let binding = ClusterRoleBinding {
        metadata: meta(name, None, "broker"),
        role_ref: role_ref("ClusterRole", name),
        subjects: Some(subject(name, ns)),
    };
    Ok(vec![
        manifest(&namespace(s))?,
        manifest(&ServiceAccount {
            metadata: meta(name, Some(ns), "broker"),
            automount_service_account_token: Some(false),
            ..ServiceAccount::default()
        })?,
        manifest(&role)?,
        manifest(&binding)?,
        manifest(&pvc)?,
        manifest(&deployment)?,
        manifest(&service)?,
    ])
}

/// Parses `doc` into the typed struct of its kind and back, and fails when anything is lost
/// on the way: an unknown or misspelt field, or a value of the wrong type.
pub fn check_typed(doc: &serde_json::Value) -> Result<(), String> {
    fn round<K: serde::de::DeserializeOwned + Serialize>(
        doc: &serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let typed: K = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
        serde_json::to_value(&typed).map_err(|e| e.to_string())
    }
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let kind = doc["kind"].as_str().unwrap_or_default();
    let back = match kind {
        "Namespace" => round::<Namespace>(doc),
        "ServiceAccount" => round::<ServiceAccount>(doc),
        "ClusterRole" => round::<ClusterRole>(doc),
        "ClusterRoleBinding" => round::<ClusterRoleBinding>(doc),
        "Role" => round::<Role>(doc),
        "RoleBinding" => round::<RoleBinding>(doc),
        "DaemonSet" => round::<DaemonSet>(doc),
        "Deployment" => round::<Deployment>(doc),
        "Service" => round::<Service>(doc),
        "PersistentVolumeClaim" => round::<PersistentVolumeClaim>(doc),
        "PodDisruptionBudget" => round::<PodDisruptionBudget>(doc),
        "Secret" => round::<k8s_openapi::api::core::v1::Secret>(doc),
        "ConfigMap" => round::<k8s_openapi::api::core::v1::ConfigMap>(doc),
        "CustomResourceDefinition" => round::<CustomResourceDefinition>(doc),
        "Job" => round::<Job>(doc),
        "ServiceMonitor" => round::<crate::monitoring::ServiceMonitor>(doc),
        other => return Err(format!("no typed struct known for kind {other:?}")),
    }?;
    if &back == doc {
        Ok(())
    } else {
        Err(format!("{kind} does not survive a typed round trip: {}", first_difference(doc, &back, "")))
    }
}

fn first_difference(a: &serde_json::Value, b: &serde_json::Value, path: &str) -> String {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                match y.get(k) {
                    None => return format!("{path}.{k} is not a field of the type"),
                    Some(w) if v != w => return first_difference(v, w, &format!("{path}.{k}")),
                    Some(_) => {}
                }
            }
            format!("{path} gained fields")
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find(|(_, (v, w))| v != w)
            .map(|(i, (v, w))| first_difference(v, w, &format!("{path}[{i}]")))
            .unwrap_or_else(|| path.to_owned()),
        _ => format!("{path}: {a} became {b}"),
    }
}
