//! ClusterSetPolicy objects in the broker's cluster, mirrored into the broker's policy
//! records (`causeway broker --kubernetes-policies`): `kubectl apply -f policy.yaml` is then
//! how the cluster set's policy changes, and GitOps tools work as with any other object.
//!
//! The mirror writes only what objects say and removes only the records of objects it saw go:
//! rules made with `causeway policy apply` live beside them untouched. An object whose spec is
//! invalid is logged by name and skipped; the record it had before stays (a typo never opens
//! or closes the cluster set by accident).

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use causeway_broker_api::PolicyRecord;
use futures::StreamExt as _;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{WatchStreamExt as _, watcher},
};
use tracing::{info, warn};

use crate::crds::{CAUSEWAY_GROUP, policy_from_object};

/// Where mirrored rules go (the broker in the same process, with admin rights).
#[async_trait::async_trait]
pub trait PolicyStore: Send + Sync {
    /// Creates or replaces a rule; an unchanged rule should not be rewritten.
    async fn apply(&self, p: PolicyRecord) -> Result<(), String>;
    /// Removes a rule; absent is success.
    async fn remove(&self, name: &str) -> Result<(), String>;
}

fn resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(CAUSEWAY_GROUP, "v1alpha1", "ClusterSetPolicy"),
        "clustersetpolicies",
    )
}

/// Mirrors every ClusterSetPolicy object into `store`.
pub struct PolicyMirror {
    client: Client,
    store: Arc<dyn PolicyStore>,
    /// Names of the objects seen in the current list-and-watch (their records are ours).
    managed: BTreeSet<String>,
}

impl PolicyMirror {
    #[must_use]
    pub fn new(client: Client, store: Arc<dyn PolicyStore>) -> Self {
        Self { client, store, managed: BTreeSet::new() }
    }

    async fn write(&self, obj: &DynamicObject) {
        let name = obj.metadata.name.clone().unwrap_or_default();
        let json = match serde_json::to_value(obj) {
            Ok(mut v) => {
                // A DynamicObject serialises its type fields only if they were in the stream.
                v["apiVersion"] = format!("{CAUSEWAY_GROUP}/v1alpha1").into();
                v["kind"] = "ClusterSetPolicy".into();
                v
            }
            Err(e) => return warn!(policy = %name, error = %e, "ClusterSetPolicy not readable"),
        };
        match policy_from_object(&json) {
            Ok(record) => match self.store.apply(record).await {
                Ok(()) => info!(policy = %name, "ClusterSetPolicy mirrored to the broker"),
                Err(e) => warn!(policy = %name, error = %e, "the broker refused the ClusterSetPolicy"),
            },
            Err(e) => {
                warn!(policy = %name, error = %e, "invalid ClusterSetPolicy skipped; its previous rule stays")
            }
        }
    }

    async fn remove(&self, name: &str) {
        match self.store.remove(name).await {
            Ok(()) => info!(policy = %name, "ClusterSetPolicy deleted; rule removed from the broker"),
            Err(e) => {
                warn!(policy = %name, error = %e, "removing the rule of a deleted ClusterSetPolicy failed")
            }
        }
    }

    /// Lists and watches until the stream ends (never, unless the client is dropped).
    pub async fn run(mut self) {
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource());
        let mut events = watcher(api, watcher::Config::default()).default_backoff().boxed();
        let mut listing: Option<BTreeSet<String>> = None;
        while let Some(event) = events.next().await {
            let name = |o: &DynamicObject| o.metadata.name.clone().unwrap_or_default();
            match event {
                Ok(watcher::Event::Init) => listing = Some(BTreeSet::new()),
                Ok(watcher::Event::InitApply(o)) => {
                    self.write(&o).await;
                    if let Some(l) = &mut listing {
                        l.insert(name(&o));
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    let now = listing.take().unwrap_or_default();
                    // Objects deleted while the watch was broken.
                    for gone in self.managed.difference(&now) {
                        self.remove(gone).await;
                    }
                    self.managed = now;
                }
                Ok(watcher::Event::Apply(o)) => {
                    self.write(&o).await;
                    self.managed.insert(name(&o));
                }
                Ok(watcher::Event::Delete(o)) => {
                    let n = name(&o);
                    self.remove(&n).await;
                    self.managed.remove(&n);
                }
                Err(e) => {
                    warn!(error = %e, "watching ClusterSetPolicies failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}
