//! The Kubernetes code against kube's mock service: node discovery, the gateway Lease
//! (acquire, renew, follow, take over, lose a race, step down, release), the ServiceExport
//! watch publishing to a real in-process broker (readiness from EndpointSlices), and the
//! cluster set's imports written as ServiceImports with the exports' conditions.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use causeway_deploy::testing::{Reply, Seen, list, not_found, status};
use causeway_deploy::{
    election::{ElectionConfig, Elector, Role},
    exports::ExportSync,
    source::{KubernetesSource, Overrides},
};
use causeway_gateway::cluster::ClusterSource as _;
use serde_json::{Value, json};

fn node(name: &str, gateway: bool, internal: &str, pod_cidr: &str) -> Value {
    let mut labels = json!({"kubernetes.io/hostname": name});
    if gateway {
        labels["causeway.io/gateway"] = json!("true");
    }
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "resourceVersion": "7", "labels": labels},
        "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
        "status": {"addresses": [{"type": "InternalIP", "address": internal}, {"type": "Hostname", "address": name}]}
    })
}

fn kubeadm_config() -> Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "kubeadm-config", "namespace": "kube-system"},
        "data": {"ClusterConfiguration": "apiServer: {}\nkind: ClusterConfiguration\nkubernetesVersion: v1.33.1\nnetworking:\n  dnsDomain: cluster.local\n  podSubnet: 10.244.0.0/16\n  serviceSubnet: 10.96.0.0/12\n"}
    })
}

fn roles(role: Role) -> tokio::sync::watch::Receiver<Role> {
    let (tx, rx) = tokio::sync::watch::channel(role);
    std::mem::forget(tx);
    rx
}

#[tokio::test]
async fn the_cluster_source_reads_the_node_and_discovers_cidrs() {
    let (client, log) = causeway_deploy::testing::client(|r: &Seen| match r.path() {
        "/api/v1/nodes/gw-1" => Reply::Json(200, node("gw-1", true, "192.168.10.11", "10.244.1.0/24")),
        "/api/v1/nodes" => Reply::Json(
            200,
            list(
                "Node",
                "v1",
                vec![
                    node("gw-1", true, "192.168.10.11", "10.244.1.0/24"),
                    node("w-1", false, "192.168.10.12", "10.244.2.0/24"),
                ],
            ),
        ),
        "/api/v1/namespaces/kube-system/configmaps/kube-proxy" => {
            Reply::Json(403, status(403, "Forbidden", "configmaps \"kube-proxy\" is forbidden"))
        }
        "/api/v1/namespaces/kube-system/configmaps/kubeadm-config" => Reply::Json(200, kubeadm_config()),
        "/apis/networking.k8s.io/v1/servicecidrs" => Reply::Json(
            200,
            list(
                "ServiceCIDR",
                "networking.k8s.io/v1",
                vec![json!({"metadata": {"name": "kubernetes"}, "spec": {"cidrs": ["10.96.0.0/16"]}})],
            ),
        ),
        other => panic!("unexpected request {other}"),
    });
    let overrides = Overrides { cluster_id: "east".into(), ..Overrides::default() };
    let mut source = KubernetesSource::new(client, "gw-1".into(), overrides, roles(Role::Active));
    let local = source.local_cluster().await.unwrap();
    assert_eq!(local.cluster_id, "east");
    assert_eq!(local.hostname, "gw-1");
    assert_eq!(local.private_ips, vec!["192.168.10.11".parse::<std::net::IpAddr>().unwrap()]);
    assert!(local.public_ips.is_empty());
    // Both nodes' /24s lie in kubeadm's podSubnet, which is what gets published.
    assert_eq!(local.pod_cidrs, vec!["10.244.0.0/16".parse().unwrap()]);
    // The ServiceCIDR API wins over kubeadm's serviceSubnet.
    assert_eq!(local.service_cidrs, vec!["10.96.0.0/16".parse().unwrap()]);
    assert!(local.active);
    let log = log.lock().unwrap();
    assert!(log.iter().all(|r| r.method == "GET"), "discovery only reads: {log:?}");
    assert!(log.iter().any(|r| r.is("GET", "/api/v1/nodes")));
}

#[tokio::test]
async fn the_node_watch_reports_fact_changes_and_absorbs_the_rest() {
    let with = |mut n: Value, path: &str, v: Value| {
        n.pointer_mut(path).map(|slot| *slot = v).expect("path exists");
        n
    };
    let gw = node("gw-1", true, "192.168.10.11", "10.244.1.0/24");
    let watches = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let w = watches.clone();
    let (gw_, w1) = (gw.clone(), node("w-1", false, "192.168.10.12", "10.244.2.0/24"));
    let (client, log) = causeway_deploy::testing::client(move |r: &Seen| match r.path() {
        "/api/v1/nodes/gw-1" => Reply::Json(200, gw_.clone()),
        "/api/v1/nodes" if r.uri.contains("watch=true") => {
            if w.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0 {
                return Reply::Hang;
            }
            Reply::Events(vec![
                // No fact changes: another label on a worker; a new node inside the pod subnet.
                json!({"type": "MODIFIED", "object": with(w1.clone(), "/metadata/labels", json!({"team": "a"}))}),
                json!({"type": "ADDED", "object": node("w-2", false, "192.168.10.13", "10.244.3.0/24")}),
                // This node's address changes.
                json!({"type": "MODIFIED", "object": with(gw_.clone(), "/status/addresses/0/address", json!("192.168.10.99"))}),
                // A node outside kubeadm's podSubnet: the nodes' own CIDRs are published.
                json!({"type": "ADDED", "object": node("w-3", false, "192.168.10.14", "10.250.0.0/24")}),
                // The gateway label goes.
                json!({"type": "MODIFIED", "object": with(gw_.clone(), "/metadata/labels", json!({}))}),
            ])
        }
        "/api/v1/nodes" => Reply::Json(200, list("Node", "v1", vec![gw_.clone(), w1.clone()])),
        "/api/v1/namespaces/kube-system/configmaps/kube-proxy" => not_found("configmaps \"kube-proxy\""),
        "/api/v1/namespaces/kube-system/configmaps/kubeadm-config" => Reply::Json(200, kubeadm_config()),
        "/apis/networking.k8s.io/v1/servicecidrs" => not_found("servicecidrs"),
        other => panic!("unexpected request {other}"),
    });
    let overrides = Overrides { cluster_id: "east".into(), ..Overrides::default() };
    let mut source = KubernetesSource::new(client, "gw-1".into(), overrides, roles(Role::Active));
    let first = source.local_cluster().await.unwrap();
    assert_eq!(first.pod_cidrs, vec!["10.244.0.0/16".parse().unwrap()]);

    // The first change reported is the address: the label and the covered node were absorbed.
    let moved = next(&mut source).await.unwrap();
    assert_eq!(moved.private_ips, vec!["192.168.10.99".parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!(moved.pod_cidrs, first.pod_cidrs);
    let wider = next(&mut source).await.unwrap();
    let want: Vec<ipnetwork::IpNetwork> =
        ["10.244.1.0/24", "10.244.2.0/24", "10.244.3.0/24", "10.250.0.0/24"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
    assert_eq!(wider.pod_cidrs, want);
    let err = next(&mut source).await.unwrap_err();
    assert!(err.contains("is not labelled causeway.io/gateway=true"), "{err}");
    // Nothing more to say: no change and no repeated error.
    assert!(tokio::time::timeout(Duration::from_millis(300), source.next_change()).await.is_err());
    let log = log.lock().unwrap();
    assert!(log.iter().all(|r| r.method == "GET"), "the source only reads: {log:?}");
    assert!(log.iter().any(|r| r.path() == "/api/v1/nodes" && r.uri.contains("watch=true")));
    drop(watches);
}

async fn next(source: &mut KubernetesSource) -> Result<causeway_gateway::cluster::LocalCluster, String> {
    tokio::time::timeout(Duration::from_secs(5), source.next_change())
        .await
        .expect("a change within 5 s")
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn an_unlabelled_node_is_refused_with_the_fix() {
    let (client, _log) = causeway_deploy::testing::client(|r: &Seen| match r.path() {
        "/api/v1/nodes/w-1" => Reply::Json(200, node("w-1", false, "192.168.10.12", "10.244.2.0/24")),
        _ => not_found("anything"),
    });
    let mut source = KubernetesSource::new(
        client,
        "w-1".into(),
        Overrides { cluster_id: "east".into(), ..Overrides::default() },
        roles(Role::Standby),
    );
    let e = source.local_cluster().await.unwrap_err().to_string();
    assert!(e.contains("causeway.io/gateway=true") && e.contains("kubectl label node w-1"), "{e}");
}

#[tokio::test]
async fn missing_service_cidrs_are_explained() {
    let (client, _log) = causeway_deploy::testing::client(|r: &Seen| match r.path() {
        "/api/v1/nodes/gw-1" => Reply::Json(200, node("gw-1", true, "192.168.10.11", "10.244.1.0/24")),
        "/api/v1/nodes" => {
            Reply::Json(200, list("Node", "v1", vec![node("gw-1", true, "192.168.10.11", "10.244.1.0/24")]))
        }
        // An older cluster without the ServiceCIDR API, and not built by kubeadm.
        _ => not_found("the resource"),
    });
    let mut source = KubernetesSource::new(
        client,
        "gw-1".into(),
        Overrides { cluster_id: "east".into(), ..Overrides::default() },
        roles(Role::Standby),
    );
    let e = source.local_cluster().await.unwrap_err().to_string();
    assert!(e.contains("service CIDRs") && e.contains("CAUSEWAY_SERVICE_CIDRS"), "{e}");
}

fn lease(holder: Option<&str>, renewed_secs_ago: i64, rv: &str, transitions: i32) -> Value {
    let renew =
        k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(renewed_secs_ago);
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "causeway-gateway", "namespace": "causeway-system", "resourceVersion": rv},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 6, "renewTime": renew.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(), "leaseTransitions": transitions}
    })
}

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/causeway-system/leases/causeway-gateway";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/causeway-system/leases";

fn elector(client: kube::Client, me: &str) -> Elector {
    Elector::new(client, ElectionConfig::new("causeway-system", me))
}

/// Echoes a written Lease back with a new resourceVersion, as the API server does.
fn written(r: &Seen, rv: &str) -> Reply {
    let mut v = r.body.clone();
    v["metadata"]["resourceVersion"] = json!(rv);
    Reply::Json(if r.method == "POST" { 201 } else { 200 }, v)
}

#[tokio::test]
async fn the_first_gateway_creates_the_lease_then_renews_it() {
    let state = std::sync::Arc::new(std::sync::Mutex::new(None::<Value>));
    let s = state.clone();
    let (client, log) = causeway_deploy::testing::client(move |r: &Seen| {
        let mut current = s.lock().unwrap();
        match (r.method.as_str(), r.path()) {
            ("GET", LEASE) => current.clone().map_or_else(|| not_found("lease"), |l| Reply::Json(200, l)),
            ("POST", LEASES) | ("PUT", LEASE) => {
                let Reply::Json(code, v) = written(r, &format!("{}", 10 + r.uri.len())) else {
                    unreachable!()
                };
                *current = Some(v.clone());
                Reply::Json(code, v)
            }
            other => panic!("unexpected {other:?}"),
        }
    });
    let mut e = elector(client, "gw-1");
    assert_eq!(e.step().await, Role::Active);
    assert_eq!(e.step().await, Role::Active);
    let log = log.lock().unwrap();
    let writes: Vec<&Seen> = log.iter().filter(|r| r.method != "GET").collect();
    assert_eq!(writes.len(), 2, "{log:?}");
    assert!(writes[0].is("POST", LEASES));
    assert_eq!(writes[0].body["spec"]["holderIdentity"], "gw-1");
    assert_eq!(writes[0].body["spec"]["leaseDurationSeconds"], 6);
    // The renewal is a replace that carries the resourceVersion it read (optimistic concurrency).
    assert!(writes[1].is("PUT", LEASE));
    assert!(writes[1].body["metadata"]["resourceVersion"].is_string());
    assert_eq!(writes[1].body["spec"]["leaseTransitions"], 0);
    assert_ne!(writes[1].body["spec"]["renewTime"], writes[0].body["spec"]["renewTime"]);
}

#[tokio::test]
async fn a_live_lease_of_another_gateway_is_followed_without_writing() {
    let (client, log) = causeway_deploy::testing::client(|r: &Seen| match (r.method.as_str(), r.path()) {
        ("GET", LEASE) => Reply::Json(200, lease(Some("gw-2"), 1, "55", 3)),
        other => panic!("a follower must not write: {other:?}"),
    });
    let mut e = elector(client, "gw-1");
    assert_eq!(e.step().await, Role::Standby);
    assert_eq!(e.step().await, Role::Standby);
    assert_eq!(log.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_and_a_lost_race_means_standby() {
    let (client, log) = causeway_deploy::testing::client(|r: &Seen| match (r.method.as_str(), r.path()) {
        ("GET", LEASE) => Reply::Json(200, lease(Some("gw-2"), 30, "55", 3)),
        ("PUT", LEASE) => written(r, "56"),
        other => panic!("unexpected {other:?}"),
    });
    let mut e = elector(client, "gw-1");
    assert_eq!(e.step().await, Role::Active);
    let put = log.lock().unwrap().iter().find(|r| r.method == "PUT").cloned().unwrap();
    assert_eq!(put.body["metadata"]["resourceVersion"], "55");
    assert_eq!(put.body["spec"]["holderIdentity"], "gw-1");
    assert_eq!(put.body["spec"]["leaseTransitions"], 4);

    // Two standbys see the same expired Lease; the API server lets one write through.
    let (client, _log) = causeway_deploy::testing::client(|r: &Seen| match (r.method.as_str(), r.path()) {
        ("GET", LEASE) => Reply::Json(200, lease(Some("gw-2"), 30, "55", 3)),
        ("PUT", LEASE) => Reply::Json(409, status(409, "Conflict", "the object has been modified")),
        other => panic!("unexpected {other:?}"),
    });
    let mut e = elector(client, "gw-3");
    assert_eq!(e.step().await, Role::Standby);
}

#[tokio::test(start_paused = true)]
async fn an_active_gateway_that_cannot_renew_steps_down_before_its_lease_expires() {
    let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f = fail.clone();
    let (client, _log) = causeway_deploy::testing::client(move |r: &Seen| {
        if f.load(std::sync::atomic::Ordering::SeqCst) {
            return Reply::Json(500, status(500, "InternalError", "etcdserver: request timed out"));
        }
        match (r.method.as_str(), r.path()) {
            ("GET", LEASE) => Reply::Json(200, lease(Some("gw-1"), 0, "60", 0)),
            ("PUT", LEASE) => written(r, "61"),
            other => panic!("unexpected {other:?}"),
        }
    });
    let mut e = elector(client, "gw-1");
    assert_eq!(e.step().await, Role::Active);
    fail.store(true, std::sync::atomic::Ordering::SeqCst);
    // Within duration - retry (6 s - 2 s) of the last renewal it keeps the role …
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(e.step().await, Role::Active);
    // … after that it steps down, before anyone else may take the Lease.
    tokio::time::advance(Duration::from_millis(2500)).await;
    assert_eq!(e.step().await, Role::Standby);
}

#[tokio::test]
async fn shutdown_releases_the_lease_for_an_immediate_takeover() {
    let (client, log) = causeway_deploy::testing::client(|r: &Seen| match (r.method.as_str(), r.path()) {
        ("GET", LEASE) => Reply::Json(200, lease(Some("gw-1"), 0, "70", 2)),
        ("PUT", LEASE) => written(r, "71"),
        other => panic!("unexpected {other:?}"),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (mut roles, task) = elector(client, "gw-1").spawn(stop_rx);
    roles.wait_for(|r| *r == Role::Active).await.unwrap();
    stop_tx.send(true).unwrap();
    task.await.unwrap();
    assert_eq!(*roles.borrow(), Role::Standby);
    let log = log.lock().unwrap();
    let last = log.iter().rfind(|r| r.method == "PUT").unwrap();
    assert!(last.body["spec"].get("holderIdentity").is_none_or(Value::is_null), "{:?}", last.body);
    // A standby reading that Lease takes it at once.
    let spec: k8s_openapi::api::coordination::v1::LeaseSpec =
        serde_json::from_value(last.body["spec"].clone()).unwrap();
    assert_eq!(
        causeway_deploy::election::decide(Some(&spec), "gw-2", k8s_openapi::jiff::Timestamp::now()),
        causeway_deploy::election::Decision::Acquire
    );
}

fn service(ns: &str, name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
           "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}})
}

fn service_export(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
           "metadata": {"name": name, "namespace": ns, "resourceVersion": "5"}})
}

#[tokio::test]
async fn service_exports_are_published_to_the_broker_and_withdrawn() {
    use causeway_broker_api::{BrokerClient, ClusterRecord, Record};
    // A real broker with a real cluster credential.
    let broker = causeway_broker::Broker::new(causeway_broker::MemStore::default()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(causeway_broker::run(listener, broker.clone(), std::future::pending()));
    let join = BrokerClient::new(url.clone())
        .with_token(broker.issue(&causeway_broker::Identity::Join).await.unwrap());
    let east = ClusterRecord {
        cluster_id: "east".into(),
        pod_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        service_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
        global_cidrs: Vec::new(),
        labels: Default::default(),
        generation: 1,
    };
    let token = join.join(&east).await.unwrap().token;
    let cluster = BrokerClient::new(url).with_token(token);
    // A record the publisher made earlier whose ServiceExport is gone by now, and one an
    // operator made with `causeway export` (no ServiceExport object: the publisher leaves it).
    for (name, ip, source) in [
        ("gone", "10.96.0.99", causeway_broker_api::ExportSource::Kubernetes),
        ("by-hand", "10.96.0.98", causeway_broker_api::ExportSource::Cli),
    ] {
        cluster
            .put_service(&causeway_broker_api::ServiceExportRecord {
                cluster_id: "east".into(),
                namespace: "old".into(),
                name: name.into(),
                ips: vec![ip.parse().unwrap()],
                ports: vec![],
                service_type: Default::default(),
                endpoints: Vec::new(),
                ready_endpoints: None,
                source,
                generation: 1,
            })
            .await
            .unwrap();
    }

    let watches = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let w = watches.clone();
    let (client, log) = causeway_deploy::testing::client(move |r: &Seen| match r.path() {
        "/apis/multicluster.x-k8s.io/v1alpha1/serviceexports" if r.uri.contains("watch=true") => {
            if w.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                Reply::Events(vec![
                    json!({"type": "ADDED", "object": service_export("shop", "cart")}),
                    json!({"type": "DELETED", "object": service_export("shop", "web")}),
                ])
            } else {
                Reply::Hang
            }
        }
        "/apis/multicluster.x-k8s.io/v1alpha1/serviceexports" => Reply::Json(
            200,
            list(
                "ServiceExport",
                "multicluster.x-k8s.io/v1alpha1",
                vec![service_export("shop", "web"), service_export("shop", "nosvc")],
            ),
        ),
        "/api/v1/namespaces/shop/services/web" => Reply::Json(200, service("shop", "web", "10.96.0.10")),
        "/api/v1/namespaces/shop/services/cart" => Reply::Json(200, service("shop", "cart", "10.96.0.11")),
        "/api/v1/namespaces/shop/services/nosvc" => not_found("services \"nosvc\""),
        // The cluster-wide EndpointSlice watch (changes trigger a reconcile): nothing happens.
        "/apis/discovery.k8s.io/v1/endpointslices" if r.uri.contains("watch=true") => Reply::Hang,
        "/apis/discovery.k8s.io/v1/endpointslices" => {
            Reply::Json(200, list("EndpointSliceList", "discovery.k8s.io/v1", vec![]))
        }
        // cart's slice: two ready endpoints and one that is not.
        "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices" => {
            assert!(r.uri.contains("labelSelector=kubernetes.io%2Fservice-name%3D"), "{}", r.uri);
            let items = if r.uri.contains("%3Dcart") {
                vec![json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": "cart-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "cart"}},
                    "addressType": "IPv4",
                    "endpoints": [
                        {"addresses": ["10.244.1.5"], "conditions": {"ready": true}},
                        {"addresses": ["10.244.1.6"], "conditions": {"ready": true}},
                        {"addresses": ["10.244.1.7"], "conditions": {"ready": false}}]})]
            } else {
                vec![]
            };
            Reply::Json(200, list("EndpointSliceList", "discovery.k8s.io/v1", items))
        }
        other => panic!("unexpected request {other}"),
    });
    let mut sync = ExportSync::new(client, cluster.clone(), "east".into());
    sync.resync = Duration::from_secs(3600);
    let task = tokio::spawn(async move { sync.run().await });

    let services = |cluster: BrokerClient| async move {
        let mut v: Vec<(String, String, Vec<std::net::IpAddr>, Option<u32>)> = cluster
            .list()
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|o| match o.record {
                Record::ServiceExport(s) => Some((s.namespace, s.name, s.ips, s.ready_endpoints)),
                _ => None,
            })
            .collect();
        v.sort();
        v
    };
    // After the initial list: web is published, the export without a Service is not, and the
    // stale record is withdrawn. After the watch events: cart is added and web withdrawn. The
    // operator's export stays throughout.
    // cart's record says how many of its endpoints are ready (from its EndpointSlice).
    let want = vec![
        ("old".to_owned(), "by-hand".to_owned(), vec!["10.96.0.98".parse().unwrap()], None),
        ("shop".to_owned(), "cart".to_owned(), vec!["10.96.0.11".parse().unwrap()], Some(2)),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while services(cluster.clone()).await != want {
        assert!(tokio::time::Instant::now() < deadline, "broker holds {:?}", services(cluster.clone()).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    task.abort();
    let log = log.lock().unwrap();
    assert!(log.iter().all(|r| r.method == "GET"), "the export sync only reads Kubernetes");
    assert!(log.iter().any(|r| r.uri.contains("watch=true")));
    assert!(log.iter().any(|r| r.is("GET", "/api/v1/namespaces/shop/services/web")));
}

#[tokio::test]
async fn route_agents_follow_the_lease_holder_to_its_node_address() {
    let holder = std::sync::Arc::new(std::sync::Mutex::new(("gw-1", 0i64)));
    let h = holder.clone();
    let (client, log) = causeway_deploy::testing::client(move |r: &Seen| {
        let (name, age) = *h.lock().unwrap();
        match r.path() {
            LEASE => Reply::Json(200, lease(Some(name), age, "80", 0)),
            "/api/v1/nodes/gw-1" => Reply::Json(200, node("gw-1", true, "192.168.10.11", "10.244.1.0/24")),
            "/api/v1/nodes/gw-2" => Reply::Json(200, node("gw-2", true, "192.168.10.12", "10.244.2.0/24")),
            other => panic!("unexpected {other}"),
        }
    });
    let addr = |s: &str| Some(s.parse::<std::net::IpAddr>().unwrap());
    assert_eq!(
        causeway_deploy::election::active_gateway_address(&client, "causeway-system").await.unwrap(),
        addr("192.168.10.11")
    );
    // An expired Lease names nobody live: the agents keep their current route.
    *holder.lock().unwrap() = ("gw-1", 60);
    assert_eq!(
        causeway_deploy::election::active_gateway_address(&client, "causeway-system").await.unwrap(),
        None
    );
    *holder.lock().unwrap() = ("gw-2", 0);
    let mut rx = causeway_deploy::election::follow_active_gateway(
        client,
        "causeway-system".into(),
        Duration::from_millis(20),
    );
    rx.wait_for(|a| *a == addr("192.168.10.12")).await.unwrap();
    assert!(log.lock().unwrap().iter().all(|r| r.method == "GET"), "route agents only read");
}

/// The broker's policy records as a map (the store the mirror writes to).
#[derive(Default)]
struct Rules(std::sync::Mutex<std::collections::BTreeMap<String, causeway_broker_api::PolicyRecord>>);

#[async_trait::async_trait]
impl causeway_deploy::policies::PolicyStore for Rules {
    async fn apply(&self, p: causeway_broker_api::PolicyRecord) -> Result<(), String> {
        self.0.lock().unwrap().insert(p.name.clone(), p);
        Ok(())
    }
    async fn remove(&self, name: &str) -> Result<(), String> {
        self.0.lock().unwrap().remove(name);
        Ok(())
    }
}

fn cluster_set_policy(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "causeway.io/v1alpha1", "kind": "ClusterSetPolicy",
           "metadata": {"name": name, "resourceVersion": "5"}, "spec": spec})
}

#[tokio::test]
async fn cluster_set_policy_objects_are_mirrored_to_the_broker() {
    let web = |port: u16| {
        cluster_set_policy(
            "allow-web",
            json!({"to": {"cluster": "east"}, "protocol": "tcp", "ports": [port.to_string()], "action": "allow"}),
        )
    };
    let db = cluster_set_policy(
        "deny-db",
        json!({"to": {"cidrs": ["10.2.5.0/24"]}, "action": "deny", "priority": 10}),
    );
    let broken = cluster_set_policy("broken", json!({"action": "allow", "prots": [80]}));
    let (lists, watches) =
        (std::sync::Arc::new(AtomicUsize::new(0)), std::sync::Arc::new(AtomicUsize::new(0)));
    let (l, w) = (lists.clone(), watches.clone());
    let (web_, db_) = (web, db.clone());
    let path = "/apis/causeway.io/v1alpha1/clustersetpolicies";
    let (client, log) = causeway_deploy::testing::client(move |r: &Seen| {
        assert_eq!(r.path(), path, "unexpected request {}", r.uri);
        if r.uri.contains("watch=true") {
            return match w.fetch_add(1, Ordering::SeqCst) {
                0 => Reply::Events(vec![
                    json!({"type": "MODIFIED", "object": web_(8080)}),
                    json!({"type": "ADDED", "object": db_.clone()}),
                ]),
                // The watch expired: the mirror lists again, and allow-web is gone meanwhile.
                1 => Reply::Events(vec![
                    json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")}),
                ]),
                _ => Reply::Hang,
            };
        }
        let items = if l.fetch_add(1, Ordering::SeqCst) == 0 {
            vec![web_(80), broken.clone()]
        } else {
            vec![db_.clone()]
        };
        Reply::Json(200, list("ClusterSetPolicy", "causeway.io/v1alpha1", items))
    });
    let rules = std::sync::Arc::new(Rules::default());
    // A rule made with `causeway policy apply`: no object, never touched.
    let cli_rule =
        causeway_deploy::crds::policy_from_object(&cluster_set_policy("cli-rule", json!({"action": "deny"})))
            .unwrap();
    rules.0.lock().unwrap().insert("cli-rule".into(), cli_rule.clone());
    let mirror = causeway_deploy::policies::PolicyMirror::new(client, rules.clone());
    let task = tokio::spawn(mirror.run());

    let names = || rules.0.lock().unwrap().keys().cloned().collect::<Vec<_>>();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while names() != ["cli-rule", "deny-db"] || lists.load(Ordering::SeqCst) < 2 {
        assert!(std::time::Instant::now() < deadline, "mirror did not converge: {:?}", names());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
    let r = rules.0.lock().unwrap();
    assert_eq!(r["deny-db"].priority, 10);
    assert_eq!(r["deny-db"].action, causeway_broker_api::PolicyAction::Deny);
    assert_eq!(r["cli-rule"], cli_rule, "a rule without an object is left alone");
    assert!(!r.contains_key("broken"), "an invalid object is never written");
    let log = log.lock().unwrap();
    assert!(log.iter().all(|r| r.method == "GET"), "the mirror only reads the cluster: {log:?}");
}

/// The cluster set's imports become ServiceImport objects (server-side apply, status too); an
/// import of a namespace this cluster lacks is skipped; a ServiceImport Causeway made that the
/// set no longer has is deleted; this cluster's ServiceExport gets its conditions, keeping the
/// transition time of a condition that did not change.
#[tokio::test]
async fn imports_become_service_imports_and_exports_get_their_conditions() {
    use causeway_broker_api::{
        ExportSource, ImportedCluster, Object, Record, ServiceExportRecord, ServiceImportRecord, ServicePort,
        ServiceType,
    };
    let import = |ns: &str, name: &str| ServiceImportRecord {
        namespace: ns.into(),
        name: name.into(),
        service_type: ServiceType::ClusterSetIP,
        ips: vec!["241.0.0.7".parse().unwrap()],
        ports: vec![ServicePort { name: Some("http".into()), port: 80, protocol: "TCP".into() }],
        clusters: vec![
            ImportedCluster { cluster_id: "east".into(), ports: vec![], excluded: false, conflict: None },
            ImportedCluster { cluster_id: "west".into(), ports: vec![], excluded: false, conflict: None },
        ],
        generation: 1,
    };
    let objects = vec![
        Object::new(1, Record::ServiceImport(import("shop", "cart"))),
        Object::new(2, Record::ServiceImport(import("ghost", "x"))),
        Object::new(
            3,
            Record::ServiceExport(ServiceExportRecord {
                cluster_id: "east".into(),
                namespace: "shop".into(),
                name: "cart".into(),
                ips: vec!["10.96.0.11".parse().unwrap()],
                ports: vec![],
                service_type: ServiceType::ClusterSetIP,
                endpoints: vec![],
                ready_endpoints: Some(2),
                source: ExportSource::Kubernetes,
                generation: 1,
            }),
        ),
    ];
    const BASE: &str = "/apis/multicluster.x-k8s.io/v1alpha1";
    let (client, log) = causeway_deploy::testing::client(move |r: &Seen| {
        match (r.method.as_str(), r.path()) {
            ("PATCH", p) if p == format!("{BASE}/namespaces/shop/serviceimports/cart") => {
                Reply::Json(200, r.body.clone())
            }
            ("PATCH", p) if p == format!("{BASE}/namespaces/shop/serviceimports/cart/status") => {
                Reply::Json(200, r.body.clone())
            }
            ("PATCH", p) if p == format!("{BASE}/namespaces/ghost/serviceimports/x") => {
                not_found("namespaces \"ghost\"")
            }
            ("GET", p) if p == format!("{BASE}/serviceimports") => Reply::Json(
                200,
                list(
                    "ServiceImportList",
                    "multicluster.x-k8s.io/v1alpha1",
                    vec![
                        json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
                           "metadata": {"name": "cart", "namespace": "shop", "labels": {"app.kubernetes.io/managed-by": "causeway"}}}),
                        json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
                           "metadata": {"name": "gone", "namespace": "old", "labels": {"app.kubernetes.io/managed-by": "causeway"}}}),
                    ],
                ),
            ),
            ("DELETE", p) if p == format!("{BASE}/namespaces/old/serviceimports/gone") => {
                Reply::Json(200, status(200, "Success", ""))
            }
            ("GET", p) if p == format!("{BASE}/namespaces/shop/serviceexports/cart") => Reply::Json(
                200,
                json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
                   "metadata": {"name": "cart", "namespace": "shop"},
                   "status": {"conditions": [{"type": "Valid", "status": "True", "reason": "Exported", "message": "",
                                               "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}),
            ),
            ("PATCH", p) if p == format!("{BASE}/namespaces/shop/serviceexports/cart/status") => {
                Reply::Json(200, r.body.clone())
            }
            (m, other) => panic!("unexpected {m} {other}"),
        }
    });
    let sync = causeway_deploy::imports::ImportSync::new(client, "east".into());
    assert_eq!(
        sync.reconcile(&objects).await.unwrap(),
        (1, 1),
        "one applied (ghost has no namespace), one deleted"
    );
    let log = log.lock().unwrap();
    let applied =
        log.iter().find(|r| r.is("PATCH", &format!("{BASE}/namespaces/shop/serviceimports/cart"))).unwrap();
    assert!(
        applied.uri.contains("fieldManager=causeway-imports") && applied.uri.contains("force=true"),
        "{}",
        applied.uri
    );
    assert_eq!(applied.content_type.as_deref(), Some("application/apply-patch+yaml"));
    assert_eq!(
        applied.body["spec"],
        json!({"type": "ClusterSetIP", "ips": ["241.0.0.7"], "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]})
    );
    let status = log
        .iter()
        .find(|r| r.is("PATCH", &format!("{BASE}/namespaces/shop/serviceimports/cart/status")))
        .unwrap();
    assert_eq!(status.body["status"]["clusters"], json!([{"cluster": "east"}, {"cluster": "west"}]));
    assert!(log.iter().any(|r| r.is("DELETE", &format!("{BASE}/namespaces/old/serviceimports/gone"))));
    assert!(
        log.iter().any(|r| r.is("GET", &format!("{BASE}/serviceimports"))
            && r.uri.contains("labelSelector=app.kubernetes.io%2Fmanaged-by%3Dcauseway")),
        "only Causeway's own ServiceImports are candidates for deletion"
    );
    let conditions = &log
        .iter()
        .find(|r| r.is("PATCH", &format!("{BASE}/namespaces/shop/serviceexports/cart/status")))
        .unwrap()
        .body["status"]["conditions"];
    let by_type = |t: &str| conditions.as_array().unwrap().iter().find(|c| c["type"] == t).unwrap().clone();
    assert_eq!(by_type("Valid")["status"], "True");
    assert_eq!(by_type("Valid")["lastTransitionTime"], "2026-01-01T00:00:00Z", "unchanged: time kept");
    assert_eq!(by_type("Conflict")["status"], "False");
    assert_eq!(by_type("Ready")["status"], "True");
    assert_ne!(by_type("Ready")["lastTransitionTime"], "2026-01-01T00:00:00Z");
}
