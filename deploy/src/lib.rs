//! Causeway on Kubernetes. This crate owns `kube` and `k8s-openapi`: the typed manifests and
//! CRDs (`manifests`, `crds`), applying and removing them (`apply`), and what the gateway
//! learns from the API server — its cluster's facts (`source`), the active-gateway Lease
//! (`election`) and the ServiceExports to publish (`exports`). Everything else in Causeway sees
//! plain values and the gateway's `ClusterSource` trait.

pub mod apply;
pub mod coredns;
pub mod crds;
pub mod election;
pub mod exports;
pub mod imports;
pub mod manifests;
pub mod monitoring;
pub mod policies;
pub mod source;
#[cfg(feature = "testing")]
pub mod testing;
pub mod verify;

pub use manifests::{Bundle, Manifest, ManifestError, Settings, render};

pub use kube::Client;

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes credentials found (not in a pod, no $KUBECONFIG or ~/.kube/config): {0}; pass --kubeconfig"
    )]
    Infer(#[source] kube::config::InferConfigError),
    #[error("context {context:?}: {source}")]
    Context {
        context: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("building the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client for the cluster named by `kubeconfig`/`context`; without either, the pod's
/// service account in a cluster, else `$KUBECONFIG` or `~/.kube/config`.
pub async fn connect(kubeconfig: Option<&Path>, context: Option<&str>) -> Result<Client, ConnectError> {
    let options = kube::config::KubeConfigOptions { context: context.map(Into::into), ..Default::default() };
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|source| ConnectError::Kubeconfig { path: path.display().to_string(), source })?;
            kube::Config::from_custom_kubeconfig(kc, &options).await.map_err(|source| {
                ConnectError::Context { context: context.unwrap_or("(current)").into(), source }
            })?
        }
        None if context.is_some() => kube::Config::from_kubeconfig(&options).await.map_err(|source| {
            ConnectError::Context { context: context.unwrap_or_default().into(), source }
        })?,
        None => kube::Config::infer().await.map_err(ConnectError::Infer)?,
    };
    Ok(Client::try_from(config)?)
}

/// What a gateway on Kubernetes runs beside the daemon: the Lease election and, while active,
/// the ServiceExport publisher and the ServiceImport writer.
pub struct GatewayServices {
    stop: tokio::sync::watch::Sender<bool>,
    election: tokio::task::JoinHandle<()>,
    exports: tokio::task::JoinHandle<()>,
}

/// Starts the election and export publisher and returns the gateway's cluster source.
#[must_use]
pub fn start_gateway_services(
    client: Client,
    node: &str,
    namespace: &str,
    overrides: source::Overrides,
    broker: causeway_broker_api::BrokerClient,
) -> (source::KubernetesSource, GatewayServices) {
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let elector = election::Elector::new(client.clone(), election::ElectionConfig::new(namespace, node));
    let (roles, election) = elector.spawn(stop_rx);
    let sync = exports::ExportSync::new(client.clone(), broker.clone(), overrides.cluster_id.clone());
    let imports = imports::ImportSync::new(client.clone(), overrides.cluster_id.clone());
    let mut export_roles = roles.clone();
    let exports = tokio::spawn(async move {
        use election::Role;
        loop {
            if export_roles.wait_for(|r| *r == Role::Active).await.is_err() {
                return;
            }
            // Only the active gateway publishes and writes the ServiceImports, so two gateways
            // never race on the records or the objects.
            tokio::select! {
                () = sync.run() => return,
                () = imports.run(broker.clone()) => return,
                _ = export_roles.wait_for(|r| *r == Role::Standby) => {}
            }
        }
    });
    let source = source::KubernetesSource::new(client, node.into(), overrides, roles);
    (source, GatewayServices { stop, election, exports })
}

impl GatewayServices {
    /// Stops publishing and releases the Lease (so a standby takes over at once).
    pub async fn stop(self) {
        self.exports.abort();
        let _ = self.stop.send(true);
        let _ = self.election.await;
    }
}
