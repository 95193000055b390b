//! The checked-in manifests are the generator's output, parse back into their typed structs,
//! and say what an operator relies on (least privilege, one gateway down at a time …).

use std::path::PathBuf;

use causeway_deploy::{Bundle, Settings, manifests::GATEWAY_LABEL, manifests::check_typed, render};
use serde_json::Value;

fn checked_in(bundle: Bundle) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("manifests").join(bundle.file_name());
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml).expect("the manifests are valid YAML")
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name}"))
}

#[test]
fn the_checked_in_dashboard_matches_the_generator_and_its_config_map() {
    use causeway_deploy::monitoring::{DASHBOARD_FILE, dashboard_json};
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("manifests").join(DASHBOARD_FILE);
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    let want = dashboard_json(&Settings::default()).unwrap();
    assert!(
        have == want,
        "deploy/manifests/{DASHBOARD_FILE} differs from the generator: run `cargo run -p causeway -- manifests --output-dir deploy/manifests` and commit the result"
    );
    // The ConfigMap Grafana's sidecar loads carries the same JSON; the ServiceMonitor selects
    // exactly the three metrics Services, on their named port.
    let docs = docs(&checked_in(Bundle::Monitoring));
    let cm = find(&docs, "ConfigMap", "causeway-grafana-dashboard");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(cm["data"]["causeway.json"].as_str(), Some(want.as_str()));
    let monitor = find(&docs, "ServiceMonitor", "causeway");
    let wanted = &monitor["spec"]["selector"]["matchLabels"];
    let selected: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "Service")
        .filter(|d| wanted.as_object().unwrap().iter().all(|(k, v)| &d["metadata"]["labels"][k] == v))
        .collect();
    assert_eq!(selected.len(), 3);
    for svc in selected {
        assert_eq!(svc["spec"]["clusterIP"], "None");
        assert_eq!(svc["spec"]["ports"][0]["name"], monitor["spec"]["endpoints"][0]["port"]);
    }
    let dashboard: Value = serde_json::from_str(&want).unwrap();
    assert_eq!(dashboard["panels"].as_array().unwrap().len(), causeway_deploy::monitoring::PANELS.len());
}

#[test]
fn checked_in_manifests_match_the_generator() {
    for bundle in Bundle::ALL {
        let want = render(bundle, &Settings::default()).unwrap();
        assert!(
            checked_in(bundle) == want,
            "deploy/manifests/{} differs from the generator: run `cargo run -p causeway -- manifests --output-dir deploy/manifests` and commit the result",
            bundle.file_name()
        );
    }
}

#[test]
fn every_manifest_parses_back_into_its_typed_struct() {
    let mut count = 0;
    for bundle in Bundle::ALL {
        for doc in docs(&checked_in(bundle)) {
            check_typed(&doc).unwrap_or_else(|e| panic!("{}: {e}", bundle.file_name()));
            count += 1;
        }
    }
    assert!(count >= 15, "only {count} objects");
}

#[test]
fn an_unknown_or_misspelt_field_is_caught() {
    let member = docs(&checked_in(Bundle::Member));
    let mut ds = find(&member, "DaemonSet", "causeway-gateway").clone();
    ds["spec"]["template"]["spec"]["hostNetwrok"] = Value::Bool(true);
    let err = check_typed(&ds).unwrap_err();
    assert!(err.contains("hostNetwrok"), "{err}");
    let mut ds = find(&member, "DaemonSet", "causeway-gateway").clone();
    ds["spec"]["minReadySeconds"] = Value::String("ten".into());
    assert!(check_typed(&ds).is_err());
    assert!(check_typed(&serde_json::json!({"kind": "Pod2", "apiVersion": "v1"})).is_err());
}

#[test]
fn the_gateway_runs_on_gateway_nodes_with_only_the_capabilities_it_needs() {
    let member = docs(&checked_in(Bundle::Member));
    let ds = find(&member, "DaemonSet", "causeway-gateway");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["nodeSelector"][GATEWAY_LABEL], "true");
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(
        c["securityContext"]["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN", "BPF", "PERFMON", "SYS_ADMIN"])
    );
    assert!(c["securityContext"].get("privileged").is_none());
    let mounts: Vec<&str> =
        c["volumeMounts"].as_array().unwrap().iter().map(|m| m["mountPath"].as_str().unwrap()).collect();
    assert!(mounts.contains(&"/sys/fs/bpf") && mounts.contains(&"/dev/net/tun"), "{mounts:?}");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    // Metrics and health on the node's own address (the probes' default host), never on every
    // interface: the uplink faces the underlay.
    let env = c["env"].as_array().unwrap();
    let var = |name: &str| env.iter().find(|e| e["name"] == name).unwrap_or_else(|| panic!("{name}"));
    assert_eq!(var("CAUSEWAY_NODE_IP")["valueFrom"]["fieldRef"]["fieldPath"], "status.hostIP");
    assert_eq!(var("CAUSEWAY_METRICS_LISTEN")["value"], "$(CAUSEWAY_NODE_IP):9464");
    assert!(c["livenessProbe"]["httpGet"].get("host").is_none());
    // Never both gateways of a cluster down: one at a time, and only once the previous is ready.
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 1);
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"], 0);
    assert!(ds["spec"]["minReadySeconds"].as_i64().unwrap() > 0);
    assert_eq!(find(&member, "PodDisruptionBudget", "causeway-gateway")["spec"]["maxUnavailable"], 1);

    // The route agent runs everywhere else, with NET_ADMIN (routes, cgroup attach) and BPF
    // (the ClusterSetIP socket programs) only.
    let agent = find(&member, "DaemonSet", "causeway-route-agent");
    let term = &agent["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"][0]["matchExpressions"][0];
    assert_eq!(term["key"], GATEWAY_LABEL);
    assert_eq!(term["operator"], "NotIn");
    let c = &agent["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["securityContext"]["capabilities"]["add"], serde_json::json!(["NET_ADMIN", "BPF"]));
    assert_eq!(c["command"], serde_json::json!(["causeway", "route-agent", "--kubernetes"]));
    // Route agents run on every node: they mount the read-only credential, never the one
    // that writes the cluster's records, the node's cgroup v2 root, read-only, and the host's
    // bpffs (the socket programs' pins outlive the pod).
    let volumes = agent["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
    assert_eq!(volumes.len(), 3);
    assert_eq!(volumes[0]["secret"]["secretName"], "causeway-route-agent-credentials");
    assert_eq!(volumes[1]["hostPath"]["path"], "/sys/fs/cgroup");
    assert_eq!(volumes[2]["hostPath"]["path"], "/sys/fs/bpf");
    let mount = |c: &serde_json::Value, name: &str| {
        c["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == name).cloned().unwrap()
    };
    assert_eq!(mount(c, "cgroup")["readOnly"], true);
    assert_eq!(mount(c, "bpffs")["mountPath"], "/sys/fs/bpf");
    let service_cgroup = |c: &serde_json::Value| {
        c["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "CAUSEWAY_SERVICE_CGROUP" && e["value"] == "/host/sys/fs/cgroup")
    };
    assert!(service_cgroup(c));
    // No route agent on gateway nodes: the gateway translates for their pods itself.
    let gw = &find(&member, "DaemonSet", "causeway-gateway")["spec"]["template"]["spec"]["containers"][0];
    assert!(service_cgroup(gw));
    assert_eq!(mount(gw, "cgroup")["readOnly"], true);

    // Cluster-set DNS: unprivileged, the read-only credential, 53 → 5353 on UDP and TCP.
    let dns = find(&member, "Deployment", "causeway-dns");
    let pod = &dns["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["containers"][0]["securityContext"]["capabilities"]["add"], serde_json::json!([]));
    assert_eq!(pod["volumes"][0]["secret"]["secretName"], "causeway-route-agent-credentials");
    let svc = find(&member, "Service", "causeway-dns");
    let ports: Vec<(i64, i64, &str)> = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (p["port"].as_i64().unwrap(), p["targetPort"].as_i64().unwrap(), p["protocol"].as_str().unwrap())
        })
        .collect();
    assert_eq!(ports, [(53, 5353, "UDP"), (53, 5353, "TCP")]);
}

#[test]
fn rbac_is_least_privilege() {
    for bundle in Bundle::ALL {
        for doc in docs(&checked_in(bundle)) {
            let Some(rules) = doc["rules"].as_array() else { continue };
            for r in rules {
                let all = |field: &str| {
                    r[field].as_array().into_iter().flatten().map(|v| v.as_str().unwrap().to_owned())
                };
                for v in all("verbs").chain(all("resources")).chain(all("apiGroups")) {
                    assert_ne!(v, "*", "{}: wildcard in {r}", doc["metadata"]["name"]);
                }
                assert!(
                    !all("resources").any(|x| x == "secrets"),
                    "{}: reads secrets",
                    doc["metadata"]["name"]
                );
                // The only thing Causeway may delete: the ServiceImports it writes (it deletes
                // only those carrying its label; see deploy/src/imports.rs).
                if all("verbs").any(|x| x == "delete") {
                    assert_eq!(
                        all("resources").collect::<Vec<_>>(),
                        ["serviceimports"],
                        "{}: may delete {r}",
                        doc["metadata"]["name"]
                    );
                }
            }
        }
    }
    let member = docs(&checked_in(Bundle::Member));
    let discovery = find(&member, "Role", "causeway-gateway-cidr-discovery");
    assert_eq!(discovery["metadata"]["namespace"], "kube-system");
    assert_eq!(discovery["rules"][0]["resourceNames"], serde_json::json!(["kubeadm-config", "kube-proxy"]));
}

#[test]
fn the_broker_keeps_its_state_on_a_volume_and_runs_unprivileged() {
    let broker = docs(&checked_in(Bundle::Broker));
    let d = find(&broker, "Deployment", "causeway-broker");
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    // Its API token serves one purpose: reading ClusterSetPolicy objects, and nothing else.
    assert_eq!(pod["automountServiceAccountToken"], true);
    assert!(pod["containers"][0]["command"].as_array().unwrap().iter().any(|a| a == "--kubernetes-policies"));
    let roles: Vec<&serde_json::Value> =
        broker.iter().filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role").collect();
    assert_eq!(roles.len(), 1);
    assert_eq!(
        roles[0]["rules"],
        serde_json::json!([{"apiGroups": ["causeway.io"], "resources": ["clustersetpolicies"], "verbs": ["get", "list", "watch"]}])
    );
    let binding = find(&broker, "ClusterRoleBinding", "causeway-broker");
    assert_eq!(binding["subjects"][0]["name"], "causeway-broker");
    assert_eq!(d["spec"]["strategy"]["type"], "Recreate");
    let claim = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "data").unwrap();
    let pvc =
        find(&broker, "PersistentVolumeClaim", claim["persistentVolumeClaim"]["claimName"].as_str().unwrap());
    assert_eq!(pvc["spec"]["accessModes"], serde_json::json!(["ReadWriteOnce"]));
    let svc = find(&broker, "Service", "causeway-broker");
    assert_eq!(svc["spec"]["ports"][0]["port"], 7780);
}

#[test]
fn the_crds_are_the_mcs_api_and_causeways_own() {
    let crds = docs(&checked_in(Bundle::Crds));
    let names: Vec<&str> = crds.iter().map(|d| d["metadata"]["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "serviceexports.multicluster.x-k8s.io",
            "serviceimports.multicluster.x-k8s.io",
            "clustersetpolicies.causeway.io"
        ]
    );
    let policy = find(&crds, "CustomResourceDefinition", "clustersetpolicies.causeway.io");
    assert_eq!(policy["spec"]["scope"], "Cluster");
    let props =
        &policy["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    // The spec is the broker's PolicyRecord without name and generation.
    let sample = serde_json::json!({
        "name": "web", "priority": 5, "from": {"cluster": "east"}, "to": {"cidrs": ["10.2.0.0/16"]},
        "protocol": "tcp", "ports": ["80", "8000-8080"], "action": "allow"
    });
    let record: causeway_broker_api::PolicyRecord = serde_json::from_value(sample.clone()).unwrap();
    for key in sample.as_object().unwrap().keys().filter(|k| *k != "name") {
        assert!(props.get(key).is_some(), "the CRD lacks {key}");
    }
    assert_eq!(record.ports.len(), 2);
}

#[test]
fn cluster_set_policy_objects_become_broker_records() {
    let yaml = "apiVersion: causeway.io/v1alpha1\nkind: ClusterSetPolicy\nmetadata:\n  name: web\nspec:\n  from: {cluster: east}\n  to: {cidrs: [10.2.0.0/16]}\n  protocol: tcp\n  ports: [\"80\", \"8000-8080\"]\n  action: allow\n---\napiVersion: causeway.io/v1alpha1\nkind: ClusterSetPolicy\nmetadata:\n  name: rest\nspec:\n  priority: 5000\n  action: deny\n";
    let rules = causeway_deploy::crds::policies_from_yaml(yaml).unwrap();
    assert_eq!(rules.len(), 2);
    assert_eq!(rules[0].name, "web");
    assert_eq!(rules[0].priority, causeway_deploy::crds::DEFAULT_POLICY_PRIORITY);
    assert_eq!(rules[0].from.cluster.as_deref(), Some("east"));
    assert_eq!(rules[0].ports.len(), 2);
    assert_eq!(rules[1].priority, 5000);
    assert_eq!(rules[1].action, causeway_broker_api::PolicyAction::Deny);
    // A misspelt field, another kind, a bad name or a bad port: refused, naming the document.
    for (bad, says) in [
        (yaml.replace("protocol: tcp", "protocl: tcp"), "protocl"),
        (
            yaml.replace(
                "kind: ClusterSetPolicy\nmetadata:\n  name: rest",
                "kind: Policy\nmetadata:\n  name: rest",
            ),
            "document 2",
        ),
        (yaml.replace("name: web", "name: Web!"), "Web!"),
        (yaml.replace("8000-8080", "8000-99999"), "web"),
    ] {
        let e = causeway_deploy::crds::policies_from_yaml(&bad).unwrap_err();
        assert!(e.contains(says), "{e}");
    }
}

#[test]
fn the_cleanup_job_is_pinned_to_its_node_and_named_within_limits() {
    use causeway_deploy::manifests::{cleanup_job, cleanup_job_name};
    let job = cleanup_job(&Settings::default(), "gw-1.example.com").unwrap();
    check_typed(&job.json).unwrap();
    assert_eq!(job.name, "causeway-cleanup-gw-1-example-com");
    let spec = &job.json["spec"]["template"]["spec"];
    assert_eq!(spec["nodeName"], "gw-1.example.com");
    assert_eq!(spec["restartPolicy"], "Never");
    assert_eq!(spec["automountServiceAccountToken"], false);
    assert_eq!(job.json["spec"]["backoffLimit"], 2);
    let long = "n".repeat(200);
    let name = cleanup_job_name(&long);
    assert!(name.len() <= 63 && name.starts_with("causeway-cleanup-n"), "{name}");
    assert_ne!(name, cleanup_job_name(&"n".repeat(199)), "long names stay apart");
}
