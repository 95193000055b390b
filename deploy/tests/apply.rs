//! Applying and removing manifests against kube's mock service: the requests are server-side
//! applies with Causeway's field manager, to the right paths, in order; removal runs every step
//! and reports the failures together.

use causeway_deploy::testing::{Reply, Seen, not_found, status};
use causeway_deploy::{Bundle, Settings, apply};

#[tokio::test]
async fn every_manifest_is_server_side_applied_in_order() {
    let (client, log) = causeway_deploy::testing::client(|r: &Seen| Reply::Json(200, r.body.clone()));
    let mut all = Bundle::Crds.manifests(&Settings::default()).unwrap();
    all.extend(Bundle::Member.manifests(&Settings::default()).unwrap());
    all.push(
        apply::secret(
            "causeway-system",
            "causeway-broker-credentials",
            "Opaque",
            [("credentials.json".into(), b"{}".to_vec())].into(),
        )
        .unwrap(),
    );
    let mut lines = Vec::new();
    apply::apply(&client, &all, |l| lines.push(l.to_owned())).await.unwrap();
    let log = log.lock().unwrap();
    assert_eq!(log.len(), all.len());
    for (r, m) in log.iter().zip(&all) {
        assert_eq!(r.method, "PATCH", "{}", m.describe());
        assert_eq!(r.content_type.as_deref(), Some("application/apply-patch+yaml"));
        assert!(r.uri.contains("fieldManager=causeway") && r.uri.contains("force=true"), "{}", r.uri);
        assert_eq!(r.body, m.json, "the applied body is the generated object");
    }
    let paths: Vec<&str> = log.iter().map(Seen::path).collect();
    assert_eq!(
        paths[0],
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/serviceexports.multicluster.x-k8s.io"
    );
    assert!(paths.contains(&"/api/v1/namespaces/causeway-system"));
    assert!(paths.contains(&"/apis/rbac.authorization.k8s.io/v1/clusterroles/causeway-gateway"));
    assert!(paths.contains(
        &"/apis/rbac.authorization.k8s.io/v1/namespaces/kube-system/roles/causeway-gateway-cidr-discovery"
    ));
    assert!(paths.contains(&"/apis/apps/v1/namespaces/causeway-system/daemonsets/causeway-gateway"));
    assert!(
        paths.contains(&"/apis/policy/v1/namespaces/causeway-system/poddisruptionbudgets/causeway-gateway")
    );
    assert!(paths.contains(&"/api/v1/namespaces/causeway-system/secrets/causeway-broker-credentials"));
    assert_eq!(lines.len(), all.len());
    assert!(lines[0].starts_with("applied CustomResourceDefinition/"));
}

#[tokio::test]
async fn a_refused_apply_names_the_object() {
    let (client, _log) = causeway_deploy::testing::client(|r: &Seen| {
        if r.path().ends_with("/daemonsets/causeway-gateway") {
            Reply::Json(422, status(422, "Invalid", "spec.template.spec.containers[0].image: Required value"))
        } else {
            Reply::Json(200, r.body.clone())
        }
    });
    let all = Bundle::Member.manifests(&Settings::default()).unwrap();
    let e = apply::apply(&client, &all, |_| {}).await.unwrap_err().to_string();
    assert!(e.contains("DaemonSet/causeway-gateway in causeway-system") && e.contains("image"), "{e}");
}

#[tokio::test]
async fn removal_runs_every_step_in_reverse_and_collects_failures() {
    let (client, log) = causeway_deploy::testing::client(|r: &Seen| {
        assert_eq!(r.method, "DELETE");
        if r.path().ends_with("/serviceaccounts/causeway-gateway") {
            Reply::Json(403, status(403, "Forbidden", "serviceaccounts is forbidden"))
        } else if r.path().ends_with("/poddisruptionbudgets/causeway-gateway") {
            not_found("poddisruptionbudgets.policy \"causeway-gateway\"")
        } else {
            Reply::Json(200, causeway_deploy::testing::status(200, "", ""))
        }
    });
    let all = Bundle::Member.manifests(&Settings::default()).unwrap();
    let mut lines = Vec::new();
    let e = apply::remove(&client, &all, |l| lines.push(l.to_owned())).await.unwrap_err().to_string();
    assert!(e.contains("1 step(s)") && e.contains("ServiceAccount/causeway-gateway"), "{e}");
    let log = log.lock().unwrap();
    assert_eq!(log.len(), all.len(), "every step ran");
    assert!(log[0].path().ends_with("/daemonsets/causeway-route-agent"), "reverse order");
    assert_eq!(log.last().unwrap().path(), "/api/v1/namespaces/causeway-system");
    assert!(lines.iter().any(|l| l.contains("already gone")));
}

#[tokio::test]
async fn labelling_is_a_merge_patch_of_one_label() {
    let (client, log) = causeway_deploy::testing::client(|_: &Seen| {
        Reply::Json(
            200,
            serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "gw-1"}}),
        )
    });
    apply::label_gateway(&client, "gw-1", true).await.unwrap();
    apply::label_gateway(&client, "gw-1", false).await.unwrap();
    let log = log.lock().unwrap();
    assert!(log[0].is("PATCH", "/api/v1/nodes/gw-1"));
    assert_eq!(log[0].content_type.as_deref(), Some("application/merge-patch+json"));
    assert_eq!(log[0].body, serde_json::json!({"metadata": {"labels": {"causeway.io/gateway": "true"}}}));
    assert_eq!(log[1].body, serde_json::json!({"metadata": {"labels": {"causeway.io/gateway": null}}}));
}

#[test]
fn dry_run_output_never_shows_secret_values() {
    let m = apply::secret("ns", "s", "Opaque", [("token".into(), b"cw1_secret".to_vec())].into()).unwrap();
    let shown = apply::redacted(&m);
    assert!(!shown.contains("Y3cxX3NlY3JldA") && !shown.contains("cw1_secret"), "{shown}");
    assert!(shown.contains("<redacted>"));
}
