//! The cluster's CoreDNS forwards `clusterset.local` to `causeway dns`: `join` adds one
//! marked server block to the `coredns` ConfigMap's Corefile (CoreDNS's `reload` plugin picks
//! it up), `uninstall` takes exactly that block out again. The rest of the Corefile is never
//! touched, and a second `join` replaces the block rather than adding another.

use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};

use crate::apply::ApplyError;

const BEGIN: &str =
    "# causeway: clusterset.local (added by `causeway join`; `causeway uninstall` removes it)";
const END: &str = "# causeway: end";
const NAMESPACE: &str = "kube-system";
const CONFIG_MAP: &str = "coredns";

/// `corefile` without Causeway's block (unchanged when it has none).
#[must_use]
pub fn without_zone(corefile: &str) -> String {
    let mut out = Vec::new();
    let mut inside = false;
    for line in corefile.lines() {
        match line.trim() {
            l if l == BEGIN => inside = true,
            l if l == END && inside => inside = false,
            _ if inside => {}
            _ => out.push(line),
        }
    }
    while out.last().is_some_and(|l| l.trim().is_empty()) {
        out.pop();
    }
    let mut s = out.join("\n");
    s.push('\n');
    s
}

/// `corefile` with Causeway's block forwarding `clusterset.local` to `server` (an address).
#[must_use]
pub fn with_zone(corefile: &str, server: &str) -> String {
    format!(
        "{}\n{BEGIN}\nclusterset.local:53 {{\n    errors\n    forward . {server}\n}}\n{END}\n",
        without_zone(corefile)
    )
}

/// Points CoreDNS's `clusterset.local` at `server`, or removes Causeway's block (`None`).
/// Returns whether the cluster has a `coredns` ConfigMap at all (a cluster with another DNS
/// needs the zone added by hand).
pub async fn set_forward(client: &Client, server: Option<&str>) -> Result<bool, ApplyError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
    let what = || format!("ConfigMap {NAMESPACE}/{CONFIG_MAP}");
    let Some(cm) =
        api.get_opt(CONFIG_MAP).await.map_err(|source| ApplyError::Api { what: what(), source })?
    else {
        return Ok(false);
    };
    let Some(corefile) = cm.data.as_ref().and_then(|d| d.get("Corefile")) else { return Ok(false) };
    let want = match server {
        Some(s) => with_zone(corefile, s),
        None => without_zone(corefile),
    };
    if want != *corefile {
        let patch = serde_json::json!({"data": {"Corefile": want}});
        api.patch(
            CONFIG_MAP,
            &PatchParams { field_manager: Some("causeway".into()), ..PatchParams::default() },
            &Patch::Merge(&patch),
        )
        .await
        .map_err(|source| ApplyError::Api { what: what(), source })?;
    }
    Ok(true)
}

/// The cluster IP of the `causeway-dns` Service (assigned when it was applied).
pub async fn dns_service_ip(client: &Client, namespace: &str) -> Result<Option<String>, ApplyError> {
    let api: Api<Service> = Api::namespaced(client.clone(), namespace);
    let svc = api
        .get_opt("causeway-dns")
        .await
        .map_err(|source| ApplyError::Api { what: format!("Service {namespace}/causeway-dns"), source })?;
    Ok(svc.and_then(|s| s.spec?.cluster_ip).filter(|ip| !ip.is_empty() && ip != "None"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBEADM: &str = ".:53 {\n    errors\n    health\n    kubernetes cluster.local in-addr.arpa ip6.arpa {\n       pods insecure\n    }\n    forward . /etc/resolv.conf\n    cache 30\n    reload\n}\n";

    #[test]
    fn the_block_is_added_once_replaced_and_removed_exactly() {
        let with = with_zone(KUBEADM, "10.96.0.53");
        assert!(with.starts_with(KUBEADM), "the rest stays as it was:\n{with}");
        assert!(with.contains("clusterset.local:53 {\n    errors\n    forward . 10.96.0.53\n}"), "{with}");
        // Again, or with another address: still one block.
        let again = with_zone(&with, "10.96.0.54");
        assert_eq!(again.matches("clusterset.local:53").count(), 1);
        assert!(again.contains("forward . 10.96.0.54") && !again.contains("10.96.0.53"));
        // Removed: the original, byte for byte.
        assert_eq!(without_zone(&again), KUBEADM);
        assert_eq!(without_zone(KUBEADM), KUBEADM, "nothing to remove");
    }
}
