//! `deploy-broker`, `join` and `credentials`: setting up a cluster set's trust.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use causeway_broker::{Broker, Identity, RedbStore};
use causeway_broker_api::{BrokerClient, ClusterRecord, CredentialKind, Credentials};
use ipnetwork::IpNetwork;

/// Files `deploy-broker` writes into its data directory.
pub use causeway_broker_api::records::{ADMIN_FILE, BROKER_INFO_FILE};
pub const CA_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
pub const CERT_FILE: &str = "server.pem";
pub const KEY_FILE: &str = "server.key";
pub const STORE_FILE: &str = "broker.redb";

/// Where the broker keeps the cluster set (shared by `broker` and `deploy-broker`).
#[derive(clap::Args, Clone, Debug)]
pub struct StoreArgs {
    /// etcd v3 client URLs (comma-separated): keep the cluster set in etcd, so several broker
    /// replicas can serve it. Default: the embedded store file in --data-dir.
    #[arg(long = "etcd-endpoints", env = "CAUSEWAY_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// Key prefix of this cluster set in etcd.
    #[arg(long, env = "CAUSEWAY_ETCD_PREFIX", default_value = "/causeway/")]
    etcd_prefix: String,
    /// CA bundle (PEM) of etcd's serving certificates, for https:// endpoints.
    #[arg(long, env = "CAUSEWAY_ETCD_CA_FILE")]
    etcd_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) when etcd requires one (with --etcd-key-file).
    #[arg(long, env = "CAUSEWAY_ETCD_CERT_FILE", requires = "etcd_key_file")]
    etcd_cert_file: Option<PathBuf>,
    /// The private key (PEM) of --etcd-cert-file.
    #[arg(long, env = "CAUSEWAY_ETCD_KEY_FILE", requires = "etcd_cert_file")]
    etcd_key_file: Option<PathBuf>,
    /// Accept etcd without TLS or without a client certificate (testing only: whoever reaches
    /// that etcd can rewrite the whole cluster set, every member's routes with it).
    #[arg(long, env = "CAUSEWAY_ETCD_INSECURE")]
    etcd_insecure: bool,
}

/// The store is the cluster set's truth: an etcd anyone can reach in the clear, or without
/// authenticating, is as good as no broker checks at all. Refused unless asked for.
fn check_etcd_security(endpoints: &[String], client_cert: bool, insecure: bool) -> anyhow::Result<()> {
    if insecure {
        return Ok(());
    }
    if let Some(plain) = endpoints.iter().find(|e| !e.starts_with("https://")) {
        anyhow::bail!(
            "etcd endpoint {plain} is not https://: the cluster set would travel and be writable \
             in the clear. Serve etcd with TLS (--etcd-ca-file, --etcd-cert-file, --etcd-key-file), \
             or pass --etcd-insecure for a test setup"
        );
    }
    if !client_cert {
        anyhow::bail!(
            "etcd without a client certificate: anyone who reaches etcd could rewrite the cluster \
             set. Give --etcd-cert-file and --etcd-key-file, or pass --etcd-insecure for a test setup"
        );
    }
    Ok(())
}

impl StoreArgs {
    /// Opens the configured store: etcd when endpoints are given, else `data_dir`'s file.
    pub async fn open(&self, data_dir: &Path) -> anyhow::Result<Box<dyn causeway_broker::Store>> {
        if self.etcd_endpoints.is_empty() {
            return Ok(Box::new(RedbStore::open(&data_dir.join(STORE_FILE))?));
        }
        self.check()?;
        let read =
            |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
        let mut o = causeway_broker::EtcdOptions::new(self.etcd_endpoints.clone());
        o.prefix.clone_from(&self.etcd_prefix);
        o.ca_pem = self.etcd_ca_file.as_ref().map(read).transpose()?;
        if let (Some(c), Some(k)) = (&self.etcd_cert_file, &self.etcd_key_file) {
            o.client_identity = Some((read(c)?, read(k)?));
        }
        let store = causeway_broker::EtcdStore::connect(&o).await.with_context(|| {
            format!(
                "opening the etcd store at {} (check that etcd runs there and that the URLs, \
                 certificates and --etcd-prefix are right)",
                self.etcd_endpoints.join(",")
            )
        })?;
        Ok(Box::new(store))
    }

    /// Refuses an unsafe store before anything is written (see `check_etcd_security`).
    pub fn check(&self) -> anyhow::Result<()> {
        if self.etcd_endpoints.is_empty() {
            return Ok(());
        }
        check_etcd_security(&self.etcd_endpoints, self.etcd_cert_file.is_some(), self.etcd_insecure)
    }

    #[must_use]
    pub fn describe(&self, data_dir: &Path) -> String {
        if self.etcd_endpoints.is_empty() {
            data_dir.join(STORE_FILE).display().to_string()
        } else {
            format!("etcd {} under {}", self.etcd_endpoints.join(","), self.etcd_prefix)
        }
    }
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["local", "kubernetes", "kubeconfig", "context"])))]
pub struct DeployBrokerArgs {
    /// Set the broker up on this machine.
    #[arg(long)]
    local: bool,
    /// Deploy the broker into a Kubernetes cluster (implied by --kubeconfig/--context).
    #[arg(long)]
    kubernetes: bool,
    #[command(flatten)]
    kube: crate::kubernetes::KubeArgs,
    #[command(flatten)]
    manifests: crate::kubernetes::ManifestArgs,
    /// With Kubernetes: print what would be applied (Secrets redacted) and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Where the store, certificates and credentials go (created 0700). With Kubernetes only
    /// the admin credentials, broker-info file and CA go here (default ./causeway-broker).
    #[arg(long, env = "CAUSEWAY_BROKER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address (IP or DNS name) the gateways will use to reach the broker (repeatable; the
    /// first one goes into the broker-info file). Certificates are issued for all of them.
    #[arg(long = "address", required = true)]
    addresses: Vec<String>,
    /// The broker's HTTPS port (what the broker-info file names).
    #[arg(long, default_value_t = 7780)]
    port: u16,
    /// Use the operator's certificate instead of generating a CA (needs --tls-key, --ca-cert).
    #[arg(long, requires_all = ["tls_key", "ca_cert"])]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// The CA that signed --tls-cert (given to the gateways so they trust the broker).
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    #[command(flatten)]
    store: StoreArgs,
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

pub fn deploy_broker(a: DeployBrokerArgs) -> anyhow::Result<()> {
    if !a.local {
        let dir = a.data_dir.clone().unwrap_or_else(|| PathBuf::from("causeway-broker"));
        return tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(
            crate::kubernetes::deploy_broker(
                async || a.kube.connect().await,
                &a.manifests,
                &a.addresses,
                &dir,
                a.dry_run,
            ),
        );
    }
    // A dry run that would quietly do the real thing is worse than none.
    if a.dry_run {
        bail!(
            "--dry-run applies to Kubernetes deployments; deploy-broker --local has nothing to preview (nothing was written)"
        );
    }
    let dir = &a.data_dir.clone().unwrap_or_else(|| PathBuf::from("/var/lib/causeway-broker"));
    // Before anything is written: a refused store must leave no half-made broker behind.
    a.store.check()?;
    if dir.join(STORE_FILE).exists() || dir.join(CERT_FILE).exists() {
        bail!(
            "{} already holds a broker; to start over, stop it and remove the directory (its clusters will have to join again)",
            dir.display()
        );
    }
    {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let ca_pem = match (&a.tls_cert, &a.tls_key, &a.ca_cert) {
        (Some(cert), Some(key), Some(ca)) => {
            std::fs::copy(cert, dir.join(CERT_FILE))
                .with_context(|| format!("copying {}", cert.display()))?;
            let key_pem =
                std::fs::read_to_string(key).with_context(|| format!("reading {}", key.display()))?;
            write_private(&dir.join(KEY_FILE), &key_pem)?;
            let ca_pem = std::fs::read_to_string(ca).with_context(|| format!("reading {}", ca.display()))?;
            std::fs::write(dir.join(CA_FILE), &ca_pem)?;
            ca_pem
        }
        _ => {
            let g = causeway_broker::tls::generate(&a.addresses)
                .context("generating the broker's certificates")?;
            std::fs::write(dir.join(CA_FILE), &g.ca_pem)?;
            write_private(&dir.join(CA_KEY_FILE), &g.ca_key_pem)?;
            std::fs::write(dir.join(CERT_FILE), &g.cert_pem)?;
            write_private(&dir.join(KEY_FILE), &g.key_pem)?;
            g.ca_pem
        }
    };
    // Fail now, not when the broker starts, if the certificate and key do not match.
    causeway_broker::tls::server_config(&dir.join(CERT_FILE), &dir.join(KEY_FILE))?;
    // The store's first credentials, written here once; the broker serves them when started.
    let (admin_token, join_token) =
        tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
            let broker = Broker::new(a.store.open(dir).await?).await?;
            anyhow::Ok((broker.issue(&Identity::Admin).await?, broker.issue(&Identity::Join).await?))
        })?;
    let url = format!("https://{}:{}", host_for_url(&a.addresses[0]), a.port);
    let admin = Credentials {
        broker_url: url.clone(),
        ca_pem: Some(ca_pem.clone()),
        kind: CredentialKind::Admin,
        cluster_id: None,
        token: admin_token,
    };
    let join = Credentials { kind: CredentialKind::Join, token: join_token, ..admin.clone() };
    admin.save(&dir.join(ADMIN_FILE))?;
    join.save(&dir.join(BROKER_INFO_FILE))?;
    println!("broker set up in {} (store: {})", dir.display(), a.store.describe(dir));
    let etcd = if a.store.etcd_endpoints.is_empty() {
        String::new()
    } else {
        format!(
            " --etcd-endpoints {} --etcd-prefix {}{}",
            a.store.etcd_endpoints.join(","),
            a.store.etcd_prefix,
            if a.store.etcd_insecure { " --etcd-insecure" } else { "" }
        )
    };
    println!(
        "  start it:        causeway broker --data-dir {} --listen 0.0.0.0:{}{etcd}",
        dir.display(),
        a.port
    );
    if !etcd.is_empty() {
        println!(
            "  replicas:        copy {} to each replica's host and start it there the same way",
            dir.display()
        );
    }
    println!("  admin:           {} (keep it safe)", dir.join(ADMIN_FILE).display());
    println!(
        "  join a cluster:  causeway join {} --cluster-id … --pod-cidr … --service-cidr …",
        dir.join(BROKER_INFO_FILE).display()
    );
    Ok(())
}

fn host_for_url(addr: &str) -> String {
    match addr.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]"),
        _ => addr.to_owned(),
    }
}

#[derive(clap::Args)]
pub struct JoinArgs {
    /// The broker-info file written by `deploy-broker`.
    broker_info: PathBuf,
    /// The cluster's id in the set (DNS-1123 label, unique in the set).
    #[arg(long, env = "CAUSEWAY_CLUSTER_ID")]
    cluster_id: String,
    /// Pod CIDRs (repeatable). Required without Kubernetes; with it they override discovery.
    #[arg(long = "pod-cidr", value_delimiter = ',')]
    pod_cidrs: Vec<IpNetwork>,
    /// Service CIDRs (repeatable). Without Kubernetes they are optional; with it they override
    /// discovery.
    #[arg(long = "service-cidr", value_delimiter = ',')]
    service_cidrs: Vec<IpNetwork>,
    /// Where to write this cluster's credentials (0600); give it to the gateway with
    /// --broker-credentials. Default: ./<cluster-id>-credentials.json
    #[arg(long)]
    output: Option<PathBuf>,
    /// Join a Kubernetes cluster: discover its CIDRs, label its gateway node(s), store the
    /// credentials in a Secret and apply the member manifests (implied by --kubeconfig/--context).
    #[arg(long)]
    kubernetes: bool,
    #[command(flatten)]
    kube: crate::kubernetes::KubeArgs,
    #[command(flatten)]
    manifests: crate::kubernetes::ManifestArgs,
    /// Node(s) to run the gateway on (repeatable; default: the nodes already labelled, or a prompt).
    #[arg(long = "gateway-node", value_delimiter = ',')]
    gateway_nodes: Vec<String>,
    /// With Kubernetes: print what would be applied and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// With Kubernetes: after applying, wait this many seconds for every tunnel of the cluster
    /// set to come up (what `causeway status --wait` waits for); 0 does not wait.
    #[arg(long, default_value_t = 300)]
    wait_timeout: u64,
}

pub async fn join(a: JoinArgs) -> anyhow::Result<()> {
    if a.kubernetes || a.kube.kubeconfig.is_some() || a.kube.context.is_some() {
        let output =
            a.output.clone().unwrap_or_else(|| PathBuf::from(format!("{}-credentials.json", a.cluster_id)));
        return crate::kubernetes::join(
            async || a.kube.connect().await,
            &a.manifests,
            crate::kubernetes::JoinPlan {
                info_path: &a.broker_info,
                cluster_id: &a.cluster_id,
                pod_cidrs: &a.pod_cidrs,
                service_cidrs: &a.service_cidrs,
                gateway_nodes: &a.gateway_nodes,
                output,
                dry_run: a.dry_run,
                wait: (a.wait_timeout > 0).then(|| std::time::Duration::from_secs(a.wait_timeout)),
            },
        )
        .await;
    }
    if a.dry_run {
        bail!(
            "--dry-run applies to joining a Kubernetes cluster (--kubeconfig/--context); without one, join registers at once (nothing was registered)"
        );
    }
    if a.pod_cidrs.is_empty() {
        bail!(
            "--pod-cidr is required (or join a Kubernetes cluster with --kubeconfig/--context, which discovers it)"
        );
    }
    let info = Credentials::load(&a.broker_info).map_err(anyhow::Error::msg)?;
    if info.kind == CredentialKind::Cluster {
        bail!(
            "{} is a cluster's credentials file; join needs the broker-info file from deploy-broker",
            a.broker_info.display()
        );
    }
    let record = ClusterRecord {
        cluster_id: a.cluster_id.clone(),
        pod_cidrs: a.pod_cidrs,
        service_cidrs: a.service_cidrs,
        global_cidrs: Vec::new(),
        labels: Default::default(),
        generation: 1,
    };
    causeway_broker_api::validate_cluster(&record).context("checking the cluster's settings")?;
    let client = BrokerClient::from_credentials(&info)?;
    let joined = client.join(&record).await.with_context(|| format!("joining {}", info.broker_url))?;
    let creds = Credentials {
        broker_url: info.broker_url,
        ca_pem: info.ca_pem,
        kind: CredentialKind::Cluster,
        cluster_id: Some(a.cluster_id.clone()),
        token: joined.token,
    };
    let out = a.output.unwrap_or_else(|| PathBuf::from(format!("{}-credentials.json", a.cluster_id)));
    creds.save(&out).with_context(|| format!("writing {}", out.display()))?;
    println!("cluster {} joined; its credentials are in {}", a.cluster_id, out.display());
    println!("  run its gateway with --broker-credentials {}", out.display());
    println!("  then wait for its tunnels: causeway status --wait --credentials {}", out.display());
    Ok(())
}

#[derive(clap::Subcommand)]
pub enum CredentialsCmd {
    /// Replace a cluster's credential with a new one; the old one keeps working for
    /// --overlap seconds (default 0: it stops at once).
    Rotate {
        /// The cluster's credentials file; rewritten in place.
        #[arg(long, env = "CAUSEWAY_CREDENTIALS")]
        credentials: PathBuf,
        /// Seconds the old credential keeps working (time to move gateways and agents over).
        #[arg(long, default_value_t = 0)]
        overlap: u64,
    },
    /// Revoke every credential of a cluster, its readers' too (needs the admin credentials).
    Revoke {
        /// The admin credentials.
        #[arg(long, env = "CAUSEWAY_CREDENTIALS")]
        credentials: PathBuf,
        /// The cluster whose credentials go.
        #[arg(long)]
        cluster_id: String,
        /// Do not ask for confirmation (needed when stdin is not a terminal).
        #[arg(long, short)]
        yes: bool,
    },
    /// Issue a join or admin credential (needs the admin credentials).
    Issue {
        /// The admin credentials.
        #[arg(long, env = "CAUSEWAY_CREDENTIALS")]
        credentials: PathBuf,
        /// join or admin.
        #[arg(long, default_value = "join")]
        kind: String,
        /// Seconds until it stops working (default: until revoked).
        #[arg(long)]
        ttl: Option<u64>,
        /// A join token good for one registration.
        #[arg(long)]
        single_use: bool,
        /// Where to write the new credentials file (0600).
        #[arg(long)]
        output: PathBuf,
    },
    /// Issue a read-only credential for a cluster's route agents (with the cluster's or the
    /// admin credentials): it reads the cluster set and can write nothing.
    Reader {
        /// The cluster's or the admin credentials.
        #[arg(long, env = "CAUSEWAY_CREDENTIALS")]
        credentials: PathBuf,
        /// The cluster (default: the one the credentials file belongs to).
        #[arg(long)]
        cluster_id: Option<String>,
        /// Where to write the new credentials file (0600).
        #[arg(long)]
        output: PathBuf,
    },
    /// List every credential the broker holds: id, kind, cluster, expiry (never tokens).
    List {
        /// The admin credentials.
        #[arg(long, env = "CAUSEWAY_CREDENTIALS")]
        credentials: PathBuf,
    },
    /// Revoke one credential by the id `list` shows (needs the admin credentials).
    RevokeId {
        /// The admin credentials.
        #[arg(long, env = "CAUSEWAY_CREDENTIALS")]
        credentials: PathBuf,
        /// The credential's id (`credentials list`).
        id: String,
        /// Do not ask for confirmation (needed when stdin is not a terminal).
        #[arg(long, short)]
        yes: bool,
    },
}

fn when(unix: u64) -> String {
    let now = causeway_broker::auth::now_unix();
    if unix <= now { "now".into() } else { format!("in {} s (unix {unix})", unix - now) }
}

pub async fn credentials(cmd: CredentialsCmd) -> anyhow::Result<()> {
    let client = |path: &Path| -> anyhow::Result<(Credentials, BrokerClient)> {
        let creds = Credentials::load(path).map_err(anyhow::Error::msg)?;
        let client = BrokerClient::from_credentials(&creds)?;
        Ok((creds, client))
    };
    match cmd {
        CredentialsCmd::Rotate { credentials, overlap } => {
            let (mut creds, client) = client(&credentials)?;
            let Some(id) = creds.cluster_id.clone().filter(|_| creds.kind == CredentialKind::Cluster) else {
                bail!("{} is not a cluster's credentials file", credentials.display());
            };
            let rotated = client.rotate_with_overlap(&id, std::time::Duration::from_secs(overlap)).await?;
            creds.token = rotated.token;
            creds.save(&credentials).with_context(|| format!("writing {}", credentials.display()))?;
            println!("rotated the credential of cluster {id}; {} holds the new one", credentials.display());
            if let Some(until) = rotated.old_valid_until {
                println!("the old credential stops working {}", when(until));
            }
        }
        CredentialsCmd::Revoke { credentials, cluster_id, yes } => {
            crate::confirm::confirm(
                yes,
                &format!(
                    "revoke every credential of cluster {cluster_id} (its gateways and route agents lose the broker)"
                ),
            )?;
            let (_, client) = client(&credentials)?;
            let out = client.revoke(&cluster_id).await?;
            println!("revoked {} credential(s) of cluster {cluster_id}", out["revoked"]);
        }
        CredentialsCmd::Issue { credentials, kind, ttl, single_use, output } => {
            let (creds, client) = client(&credentials)?;
            let kind = match kind.as_str() {
                "join" => CredentialKind::Join,
                "admin" => CredentialKind::Admin,
                other => bail!("--kind {other:?}: join or admin (cluster credentials come from join)"),
            };
            let issued = client
                .issue(&causeway_broker_api::IssueRequest { kind, ttl_seconds: ttl, single_use })
                .await?;
            let file = Credentials { kind, cluster_id: None, token: issued.token, ..creds };
            file.save(&output).with_context(|| format!("writing {}", output.display()))?;
            println!("issued {kind:?} credential {} into {}", issued.id, output.display());
            if let Some(t) = issued.expires_at {
                println!("it stops working {}", when(t));
            }
        }
        CredentialsCmd::Reader { credentials, cluster_id, output } => {
            let (creds, client) = client(&credentials)?;
            let Some(id) = cluster_id.or_else(|| creds.cluster_id.clone()) else {
                bail!("--cluster-id is needed with {}", credentials.display());
            };
            let issued = client.issue_reader(&id).await?;
            let file = Credentials {
                kind: CredentialKind::Reader,
                cluster_id: Some(id.clone()),
                token: issued.token,
                ..creds
            };
            file.save(&output).with_context(|| format!("writing {}", output.display()))?;
            println!("issued read-only credential {} for cluster {id} into {}", issued.id, output.display());
        }
        CredentialsCmd::List { credentials } => {
            let (_, client) = client(&credentials)?;
            let rows: Vec<Vec<String>> = client
                .list_credentials()
                .await?
                .into_iter()
                .map(|c| {
                    vec![
                        c.id,
                        format!("{:?}", c.kind).to_lowercase(),
                        c.cluster_id.unwrap_or_else(|| "-".into()),
                        c.expires_at.map_or_else(|| "-".into(), when),
                        if c.single_use { "single use".into() } else { String::new() },
                    ]
                })
                .collect();
            print!("{}", crate::show::table(&["ID", "KIND", "CLUSTER", "EXPIRES", ""], &rows));
        }
        CredentialsCmd::RevokeId { credentials, id, yes } => {
            crate::confirm::confirm(yes, &format!("revoke credential {id}"))?;
            let (_, client) = client(&credentials)?;
            let out = client.revoke_credential(&id).await?;
            println!("revoked {} credential(s) with id {id}", out["revoked"]);
        }
    }
    Ok(())
}

/// The credentials to use for operator verbs: the flag, else the local sandbox's admin file.
pub fn operator_credentials(flag: Option<PathBuf>) -> anyhow::Result<Credentials> {
    #[cfg(feature = "sandbox")]
    let path = flag.unwrap_or_else(causeway_lab::sandbox::admin_credentials);
    #[cfg(not(feature = "sandbox"))]
    let path = flag.ok_or_else(|| {
        anyhow::anyhow!(
            "pass --credentials FILE: the admin file from deploy-broker, or a cluster's from join"
        )
    })?;
    Credentials::load(&path).map_err(|e| {
        anyhow::anyhow!(
            "{e}\n(pass --credentials FILE: the admin file from deploy-broker, or a cluster's from join)"
        )
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn etcd_in_the_clear_or_unauthenticated_is_refused_unless_asked_for() {
        let plain = vec!["http://127.0.0.1:2379".to_owned()];
        let tls = vec!["https://etcd-0:2379".to_owned(), "https://etcd-1:2379".to_owned()];
        let err = super::check_etcd_security(&plain, true, false).unwrap_err().to_string();
        assert!(
            err.contains("http://127.0.0.1:2379 is not https://") && err.contains("--etcd-insecure"),
            "{err}"
        );
        let err = super::check_etcd_security(&tls, false, false).unwrap_err().to_string();
        assert!(err.contains("without a client certificate"), "{err}");
        super::check_etcd_security(&tls, true, false).unwrap();
        super::check_etcd_security(&plain, false, true).unwrap();
    }
}
