//! The Kubernetes flavour of the setup verbs: `manifests`, `deploy-broker --kubeconfig`,
//! `join --kubeconfig` and `uninstall`. The Kubernetes work itself is in `causeway-deploy`.

use std::path::PathBuf;

use anyhow::Context as _;
use causeway_deploy::{Bundle, Settings};

/// Options shared by every verb that generates manifests.
#[derive(clap::Args, Clone, Debug)]
pub struct ManifestArgs {
    /// Namespace Causeway runs in.
    #[arg(long, env = "CAUSEWAY_NAMESPACE", default_value = "causeway-system")]
    pub namespace: String,
    /// Container image of the `causeway` binary (see deploy/Containerfile).
    #[arg(long, env = "CAUSEWAY_IMAGE")]
    pub image: Option<String>,
}

impl ManifestArgs {
    pub fn settings(&self) -> Settings {
        let mut s = Settings { namespace: self.namespace.clone(), ..Settings::default() };
        if let Some(image) = &self.image {
            s.image.clone_from(image);
        }
        s
    }
}

#[derive(clap::Args)]
pub struct ManifestsArgs {
    /// Write crds.yaml, broker.yaml, member.yaml, monitoring.yaml and grafana-dashboard.json
    /// here (default: print the YAML bundles).
    #[arg(long)]
    output_dir: Option<PathBuf>,
    #[command(flatten)]
    manifests: ManifestArgs,
}

pub fn manifests(a: ManifestsArgs) -> anyhow::Result<()> {
    let settings = a.manifests.settings();
    for bundle in Bundle::ALL {
        let yaml = causeway_deploy::render(bundle, &settings)?;
        match &a.output_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                let path = dir.join(bundle.file_name());
                std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
                println!("wrote {}", path.display());
            }
            None => print!("{yaml}"),
        }
    }
    if let Some(dir) = &a.output_dir {
        let path = dir.join(causeway_deploy::monitoring::DASHBOARD_FILE);
        let json = causeway_deploy::monitoring::dashboard_json(&settings)?;
        std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Which cluster to talk to.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct KubeArgs {
    /// Kubeconfig file (default: $KUBECONFIG or ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Context in the kubeconfig (default: its current context).
    #[arg(long)]
    pub context: Option<String>,
}

impl KubeArgs {
    pub async fn connect(&self) -> anyhow::Result<causeway_deploy::Client> {
        Ok(causeway_deploy::connect(self.kubeconfig.as_deref(), self.context.as_deref()).await?)
    }
}

/// The member clusters a support verb (`diagnose`, `gather`) works on, and how its node Jobs run.
#[derive(clap::Args, Clone, Debug)]
pub struct MemberArgs {
    /// A member cluster's context in the kubeconfig (repeatable): work on it from here, with a
    /// short-lived Job on each of its gateway nodes running the verb's `--local` form.
    #[arg(long = "context", conflicts_with = "local")]
    pub contexts: Vec<String>,
    /// The kubeconfig holding the contexts (default: $KUBECONFIG or ~/.kube/config).
    #[arg(long, requires = "contexts")]
    pub kubeconfig: Option<PathBuf>,
    /// The Causeway image the node Jobs run (default: the one the manifests use).
    #[arg(long, requires = "contexts")]
    pub image: Option<String>,
    /// Causeway's namespace in the member clusters.
    #[arg(long, default_value = "causeway-system")]
    pub namespace: String,
}

impl MemberArgs {
    /// One client per context, named by it.
    pub async fn connect(&self) -> anyhow::Result<Vec<(String, causeway_deploy::Client)>> {
        let mut clusters = Vec::new();
        for ctx in &self.contexts {
            clusters
                .push((ctx.clone(), causeway_deploy::connect(self.kubeconfig.as_deref(), Some(ctx)).await?));
        }
        Ok(clusters)
    }

    /// The settings the node Jobs are built with.
    pub fn settings(&self) -> causeway_deploy::Settings {
        let mut settings =
            causeway_deploy::Settings { namespace: self.namespace.clone(), ..Default::default() };
        if let Some(image) = &self.image {
            settings.image.clone_from(image);
        }
        settings
    }
}

fn progress(line: &str) {
    eprintln!("  {line}");
}

fn print_dry_run(manifests: &[causeway_deploy::Manifest]) {
    for m in manifests {
        println!("---");
        print!("{}", causeway_deploy::apply::redacted(m));
    }
}

/// `deploy-broker --kubeconfig …`: certificates and tokens made here, only the token hashes and
/// the serving certificate go into the cluster.
pub async fn deploy_broker(
    connect: impl AsyncFnOnce() -> anyhow::Result<causeway_deploy::Client>,
    manifests: &ManifestArgs,
    addresses: &[String],
    data_dir: &std::path::Path,
    dry_run: bool,
) -> anyhow::Result<()> {
    use causeway_broker::auth::{BootstrapCredential, BootstrapFile, Identity};
    use causeway_broker_api::{CredentialKind, Credentials};
    let settings = manifests.settings();
    let ns = settings.namespace.clone();
    if !dry_run && data_dir.join(crate::setup::ADMIN_FILE).exists() {
        anyhow::bail!(
            "{} already holds a broker's admin credentials; pass another --data-dir, or remove it to start over",
            data_dir.display()
        );
    }
    // The in-cluster name too, so that a member cluster that is also the broker's can use it.
    let mut names = addresses.to_vec();
    names.push(format!("causeway-broker.{ns}.svc"));
    let tls = causeway_broker::tls::generate(&names).context("generating the broker's certificates")?;
    let admin = causeway_broker::auth::new_token();
    let join = causeway_broker::auth::new_token();
    let bootstrap = BootstrapFile {
        credentials: vec![
            BootstrapCredential {
                identity: Identity::Admin,
                token_sha256: causeway_broker::auth::hash(&admin.0),
            },
            BootstrapCredential {
                identity: Identity::Join,
                token_sha256: causeway_broker::auth::hash(&join.0),
            },
        ],
    };
    use causeway_deploy::manifests::{BOOTSTRAP_KEY, BROKER_BOOTSTRAP_SECRET, BROKER_TLS_SECRET};
    let mut all = causeway_deploy::Bundle::Crds.manifests(&settings)?;
    let broker = causeway_deploy::Bundle::Broker.manifests(&settings)?;
    // Namespace first, then the Secrets the Deployment mounts, then the rest.
    all.push(broker[0].clone());
    all.push(causeway_deploy::apply::secret(
        &ns,
        BROKER_TLS_SECRET,
        "kubernetes.io/tls",
        [
            ("tls.crt".into(), tls.cert_pem.clone().into_bytes()),
            ("tls.key".into(), tls.key_pem.clone().into_bytes()),
        ]
        .into(),
    )?);
    all.push(causeway_deploy::apply::secret(
        &ns,
        BROKER_BOOTSTRAP_SECRET,
        "Opaque",
        [(BOOTSTRAP_KEY.into(), serde_json::to_vec_pretty(&bootstrap)?)].into(),
    )?);
    all.extend(broker.into_iter().skip(1));
    if dry_run {
        print_dry_run(&all);
        return Ok(());
    }
    let client = connect().await?;
    leave_foreign_crds(&client, &mut all).await?;
    eprintln!("deploying the broker into namespace {ns}:");
    causeway_deploy::apply::apply(&client, &all, progress).await?;
    {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(data_dir)?;
    }
    let url = format!("https://{}:{}", host_for_url(&addresses[0]), settings.broker_port);
    let admin_creds = Credentials {
        broker_url: url,
        ca_pem: Some(tls.ca_pem.clone()),
        kind: CredentialKind::Admin,
        cluster_id: None,
        token: admin,
    };
    let info = Credentials { kind: CredentialKind::Join, token: join, ..admin_creds.clone() };
    admin_creds.save(&data_dir.join(crate::setup::ADMIN_FILE))?;
    info.save(&data_dir.join(crate::setup::BROKER_INFO_FILE))?;
    std::fs::write(data_dir.join(crate::setup::CA_FILE), &tls.ca_pem)?;
    println!(
        "broker deployed; point {} at Service {ns}/causeway-broker (port {})",
        addresses[0], settings.broker_port
    );
    println!("  admin:           {} (keep it safe)", data_dir.join(crate::setup::ADMIN_FILE).display());
    println!(
        "  join a cluster:  causeway join {} --cluster-id … --kubeconfig …",
        data_dir.join(crate::setup::BROKER_INFO_FILE).display()
    );
    Ok(())
}

fn host_for_url(addr: &str) -> String {
    match addr.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]"),
        _ => addr.to_owned(),
    }
}

pub struct JoinPlan<'a> {
    pub info_path: &'a std::path::Path,
    pub cluster_id: &'a str,
    pub pod_cidrs: &'a [ipnetwork::IpNetwork],
    pub service_cidrs: &'a [ipnetwork::IpNetwork],
    pub gateway_nodes: &'a [String],
    pub output: PathBuf,
    pub dry_run: bool,
    /// Wait this long for every tunnel of the set once applied (`status --wait`).
    pub wait: Option<std::time::Duration>,
}

/// Picks the gateway nodes: the flag, else the nodes already labelled, else a prompt.
fn choose_gateways(flag: &[String], nodes: &[(String, bool)]) -> anyhow::Result<Vec<String>> {
    use std::io::IsTerminal as _;
    let names: Vec<&str> = nodes.iter().map(|(n, _)| n.as_str()).collect();
    if !flag.is_empty() {
        if let Some(bad) = flag.iter().find(|n| !names.contains(&n.as_str())) {
            anyhow::bail!("--gateway-node {bad}: no such node (nodes: {})", names.join(", "));
        }
        return Ok(flag.to_vec());
    }
    let labelled: Vec<String> = nodes.iter().filter(|(_, l)| *l).map(|(n, _)| n.clone()).collect();
    if !labelled.is_empty() {
        return Ok(labelled);
    }
    if !std::io::stdin().is_terminal() {
        anyhow::bail!(
            "no node is labelled {}=true: pass --gateway-node NAME (one or two of: {})",
            causeway_deploy::manifests::GATEWAY_LABEL,
            names.join(", ")
        );
    }
    eprint!("gateway node(s), comma-separated [{}]: ", names.join(", "));
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let chosen: Vec<String> =
        line.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect();
    if chosen.is_empty() {
        anyhow::bail!("no gateway node chosen");
    }
    choose_gateways(&chosen, nodes)
}

/// `join --kubeconfig …`: discover, register with the broker (or reuse this cluster's
/// credentials from an earlier run), label the gateway nodes, apply the member manifests.
pub async fn join(
    connect: impl AsyncFnOnce() -> anyhow::Result<causeway_deploy::Client>,
    manifests: &ManifestArgs,
    p: JoinPlan<'_>,
) -> anyhow::Result<()> {
    use causeway_broker_api::{BrokerClient, ClusterRecord, CredentialKind, Credentials};
    let settings = manifests.settings();
    let ns = settings.namespace.clone();
    let info = Credentials::load(p.info_path).map_err(anyhow::Error::msg)?;
    if info.kind == CredentialKind::Cluster {
        anyhow::bail!(
            "{} is a cluster's credentials file; join needs the broker-info file",
            p.info_path.display()
        );
    }
    let client = connect().await?;
    eprintln!("discovering cluster {}:", p.cluster_id);
    let observed = causeway_deploy::source::observe(&client).await?;
    let found = causeway_deploy::source::discover(&observed, p.pod_cidrs, p.service_cidrs)?;
    progress(&format!("pod CIDRs {:?} (from {})", found.pod_cidrs, found.pod_from));
    progress(&format!("service CIDRs {:?} (from {})", found.service_cidrs, found.service_from));
    let record = ClusterRecord {
        cluster_id: p.cluster_id.into(),
        pod_cidrs: found.pod_cidrs.clone(),
        service_cidrs: found.service_cidrs.clone(),
        global_cidrs: Vec::new(),
        labels: Default::default(),
        generation: 1,
    };
    causeway_broker_api::validate_cluster(&record).context("checking the cluster's settings")?;
    let gateways = choose_gateways(p.gateway_nodes, &causeway_deploy::apply::nodes(&client).await?)?;
    progress(&format!("gateway node(s): {}", gateways.join(", ")));

    let mut all = causeway_deploy::Bundle::Crds.manifests(&settings)?;
    leave_foreign_crds(&client, &mut all).await?;
    all.extend(causeway_deploy::Bundle::Member.manifests(&settings)?);
    // Discovery ran here with the operator's rights; the gateway repeats it with its own, and
    // these values keep both in agreement when they were given explicitly.
    let mut overrides = std::collections::BTreeMap::new();
    let join_list =
        |v: &[ipnetwork::IpNetwork]| v.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    if !p.pod_cidrs.is_empty() {
        overrides.insert("CAUSEWAY_POD_CIDRS".to_owned(), join_list(p.pod_cidrs));
    }
    if !p.service_cidrs.is_empty() {
        overrides.insert("CAUSEWAY_SERVICE_CIDRS".to_owned(), join_list(p.service_cidrs));
    }
    all.push(causeway_deploy::apply::config_map(&ns, causeway_deploy::manifests::GATEWAY_CONFIG, overrides)?);
    if p.dry_run {
        for node in &gateways {
            println!("# would label node {node} {}=true", causeway_deploy::manifests::GATEWAY_LABEL);
        }
        println!("# would register cluster {} with {}", p.cluster_id, info.broker_url);
        print_dry_run(&all);
        println!("# would forward clusterset.local in kube-system/coredns to Service {ns}/causeway-dns");
        return Ok(());
    }

    // A re-run after a failed apply reuses the credentials the first run obtained.
    let creds = match Credentials::load(&p.output) {
        Ok(c) if c.cluster_id.as_deref() == Some(p.cluster_id) && c.broker_url == info.broker_url => {
            progress(&format!("reusing this cluster's credentials in {}", p.output.display()));
            c
        }
        _ => {
            let joined = BrokerClient::from_credentials(&info)?
                .join(&record)
                .await
                .with_context(|| format!("registering cluster {} with {}", p.cluster_id, info.broker_url))?;
            let c = Credentials {
                broker_url: info.broker_url.clone(),
                ca_pem: info.ca_pem.clone(),
                kind: CredentialKind::Cluster,
                cluster_id: Some(p.cluster_id.into()),
                token: joined.token,
            };
            c.save(&p.output).with_context(|| format!("writing {}", p.output.display()))?;
            progress(&format!("registered with the broker; credentials saved in {}", p.output.display()));
            c
        }
    };
    // The route agents' own credential: read-only, so a node that is not a gateway never
    // holds what writes the cluster's records. Kept beside the cluster's (a re-run reuses it).
    let reader_path = p.output.with_extension("reader.json");
    let reader = match Credentials::load(&reader_path) {
        Ok(c)
            if c.kind == CredentialKind::Reader
                && c.cluster_id == creds.cluster_id
                && c.broker_url == creds.broker_url =>
        {
            c
        }
        _ => {
            let issued =
                BrokerClient::from_credentials(&creds)?.issue_reader(p.cluster_id).await.with_context(
                    || format!("issuing the route agents' read-only credential for {}", p.cluster_id),
                )?;
            let c = Credentials { kind: CredentialKind::Reader, token: issued.token, ..creds.clone() };
            c.save(&reader_path).with_context(|| format!("writing {}", reader_path.display()))?;
            c
        }
    };
    let namespace_first = all.iter().position(|m| m.kind == "Namespace").unwrap_or(0) + 1;
    for (name, file) in [
        (causeway_deploy::manifests::CREDENTIALS_SECRET, &creds),
        (causeway_deploy::manifests::READER_SECRET, &reader),
    ] {
        all.insert(
            namespace_first,
            causeway_deploy::apply::secret(
                &ns,
                name,
                "Opaque",
                [(causeway_deploy::manifests::CREDENTIALS_KEY.into(), serde_json::to_vec_pretty(file)?)]
                    .into(),
            )?,
        );
    }
    for node in &gateways {
        causeway_deploy::apply::label_gateway(&client, node, true).await?;
        progress(&format!("labelled node {node} {}=true", causeway_deploy::manifests::GATEWAY_LABEL));
    }
    causeway_deploy::apply::apply(&client, &all, progress).await?;
    // Pods resolve clusterset.local through the cluster's CoreDNS, which forwards the zone to
    // causeway-dns.
    match causeway_deploy::coredns::dns_service_ip(&client, &ns).await? {
        Some(ip) => {
            if causeway_deploy::coredns::set_forward(&client, Some(&ip)).await? {
                progress(&format!("CoreDNS forwards clusterset.local to {ip} (Service {ns}/causeway-dns)"));
            } else {
                progress(&format!(
                    "no kube-system/coredns ConfigMap: make the cluster's DNS forward clusterset.local to {ip}"
                ));
            }
        }
        None => progress(&format!(
            "Service {ns}/causeway-dns has no cluster IP yet: run join again to point CoreDNS at it"
        )),
    }
    println!("cluster {} joined; its gateways start on {}", p.cluster_id, gateways.join(", "));
    let Some(timeout) = p.wait else {
        println!("  check: causeway status --wait --credentials {}", p.output.display());
        println!("         kubectl -n {ns} exec ds/causeway-gateway -- causeway diagnose --local");
        return Ok(());
    };
    progress(&format!("waiting up to {}s for every tunnel of the cluster set", timeout.as_secs()));
    let broker = BrokerClient::from_credentials(&creds)?;
    let fetch = || async { Ok(broker.list().await?) };
    let rows = crate::status::wait_until_connected(fetch, timeout, std::time::Duration::from_secs(2))
        .await
        .with_context(|| {
            format!(
                "the cluster joined, but its tunnels are not all up: see `causeway status --credentials {}` and `kubectl -n {ns} exec ds/causeway-gateway -- causeway diagnose --local`",
                p.output.display()
            )
        })?;
    print!("{}", crate::status::render(&rows));
    println!("every tunnel is up");
    Ok(())
}

/// Takes the CRDs another implementation installed out of `all` (neither applied over nor
/// removed), saying so.
async fn leave_foreign_crds(
    client: &causeway_deploy::Client,
    all: &mut Vec<causeway_deploy::manifests::Manifest>,
) -> anyhow::Result<()> {
    let foreign = causeway_deploy::apply::foreign_crds(client, all).await?;
    for (name, manager) in &foreign {
        progress(&format!(
            "CustomResourceDefinition {name} is not Causeway's (managed-by: {manager}): left as it is"
        ));
    }
    all.retain(|m| m.kind != "CustomResourceDefinition" || !foreign.iter().any(|(n, _)| *n == m.name));
    Ok(())
}

#[derive(clap::Args)]
pub struct UninstallArgs {
    #[command(flatten)]
    kube: KubeArgs,
    #[command(flatten)]
    manifests: ManifestArgs,
    /// Also remove the broker (in the cluster it was deployed to).
    #[arg(long)]
    broker: bool,
    /// Also remove the CRDs — and with them every ServiceExport and ClusterSetPolicy object.
    #[arg(long)]
    crds: bool,
    /// Print what would be removed.
    #[arg(long)]
    dry_run: bool,
    /// Do not ask for confirmation (needed when stdin is not a terminal).
    #[arg(long, short)]
    yes: bool,
    /// Leave the nodes' kernel state (routes, the tunnel device, pinned eBPF objects) instead
    /// of running `causeway cleanup` on every node in a Job once the DaemonSets are gone.
    #[arg(long)]
    keep_node_state: bool,
    /// How often the pods and Jobs are looked at (tests shorten it).
    #[arg(skip = std::time::Duration::from_secs(2))]
    poll: std::time::Duration,
}

/// How long uninstall waits for the DaemonSets' pods to go, and for the cleanup Jobs.
const NODE_CLEANUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Deletes the gateway and route-agent DaemonSets, waits for their pods to go, then runs
/// `causeway cleanup` on every node in a Job (so nothing races the process it cleans up after).
/// Returns what went wrong; a node left as it was is named.
async fn clean_nodes(
    client: &causeway_deploy::Client,
    settings: &causeway_deploy::Settings,
    member: &[causeway_deploy::manifests::Manifest],
    poll: std::time::Duration,
) -> Vec<String> {
    let daemonsets: Vec<_> = member.iter().filter(|m| m.kind == "DaemonSet").cloned().collect();
    if let Err(e) = causeway_deploy::apply::remove(client, &daemonsets, progress).await {
        return vec![format!("{e}; the nodes' kernel state was left (run `causeway cleanup` on each node)")];
    }
    let ns = &settings.namespace;
    for component in ["gateway", "route-agent"] {
        let selector = format!("app.kubernetes.io/name=causeway,app.kubernetes.io/component={component}");
        match causeway_deploy::apply::wait_pods_gone(client, ns, &selector, NODE_CLEANUP_TIMEOUT, poll).await
        {
            Ok(true) => {}
            Ok(false) => {
                return vec![format!(
                    "the {component} pods are still there after {NODE_CLEANUP_TIMEOUT:?}; the nodes' kernel state was left (run `causeway cleanup` on each node)"
                )];
            }
            Err(e) => return vec![e.to_string()],
        }
    }
    let nodes = match causeway_deploy::apply::nodes(client).await {
        Ok(n) => n,
        Err(e) => return vec![e.to_string()],
    };
    let mut jobs = Vec::new();
    for (node, _) in &nodes {
        match causeway_deploy::manifests::cleanup_job(settings, node) {
            Ok(j) => jobs.push(j),
            Err(e) => return vec![e.to_string()],
        }
    }
    progress(&format!("running `causeway cleanup` on {} node(s)", jobs.len()));
    match causeway_deploy::apply::run_jobs(client, &jobs, NODE_CLEANUP_TIMEOUT, poll, progress).await {
        Ok(outcomes) => outcomes
            .into_iter()
            .zip(&nodes)
            .filter_map(|((job, outcome), (node, _))| match outcome {
                causeway_deploy::apply::JobOutcome::Succeeded => None,
                causeway_deploy::apply::JobOutcome::Failed(why) => {
                    Some(format!("cleanup on node {node} failed ({job}: {why})"))
                }
                causeway_deploy::apply::JobOutcome::TimedOut => Some(format!(
                    "cleanup on node {node} did not finish within {NODE_CLEANUP_TIMEOUT:?} ({job})"
                )),
            })
            .collect(),
        Err(e) => vec![e.to_string()],
    }
}

/// Removes what `join` (and with --broker, `deploy-broker`) created. Leaving the broker's
/// records is `causeway leave`'s job.
pub async fn uninstall(a: UninstallArgs) -> anyhow::Result<()> {
    let kube = a.kube.clone();
    uninstall_with(async || kube.connect().await, a).await
}

async fn uninstall_with(
    connect: impl AsyncFnOnce() -> anyhow::Result<causeway_deploy::Client>,
    a: UninstallArgs,
) -> anyhow::Result<()> {
    use causeway_deploy::manifests::{
        BROKER_BOOTSTRAP_SECRET, BROKER_TLS_SECRET, CREDENTIALS_SECRET, GATEWAY_CONFIG, READER_SECRET,
    };
    let settings = a.manifests.settings();
    let ns = settings.namespace.clone();
    let mut all = Vec::new();
    if a.crds {
        all.extend(causeway_deploy::Bundle::Crds.manifests(&settings)?);
    }
    let mut member = causeway_deploy::Bundle::Member.manifests(&settings)?;
    let member_objects = member.clone();
    // The namespace goes last (removal runs in reverse), and only when nothing else stays in it.
    let namespace = member.remove(0);
    if a.broker {
        all.push(namespace);
    }
    all.extend(member);
    all.push(causeway_deploy::apply::lease(&ns)?);
    all.push(causeway_deploy::apply::secret(&ns, CREDENTIALS_SECRET, "Opaque", Default::default())?);
    all.push(causeway_deploy::apply::secret(&ns, READER_SECRET, "Opaque", Default::default())?);
    all.push(causeway_deploy::apply::config_map(&ns, GATEWAY_CONFIG, Default::default())?);
    if a.broker {
        all.extend(causeway_deploy::Bundle::Broker.manifests(&settings)?.into_iter().skip(1));
        all.push(causeway_deploy::apply::secret(&ns, BROKER_TLS_SECRET, "Opaque", Default::default())?);
        all.push(causeway_deploy::apply::secret(&ns, BROKER_BOOTSTRAP_SECRET, "Opaque", Default::default())?);
    }
    if a.dry_run {
        println!("# would remove the {} label from every node", causeway_deploy::manifests::GATEWAY_LABEL);
        println!("# would remove the clusterset.local block join added to kube-system/coredns");
        for m in all.iter().rev() {
            println!("# would delete {}", m.describe());
        }
        if !a.keep_node_state {
            println!("# would run `causeway cleanup` on every node in a Job, once the DaemonSets are gone");
        }
        return Ok(());
    }
    let mut what = format!("remove Causeway from namespace {ns} of this Kubernetes cluster");
    if a.broker {
        what.push_str(", the broker with its records included");
    }
    if a.crds {
        what.push_str(", and the CRDs with every ServiceExport and ClusterSetPolicy object in the cluster");
    }
    crate::confirm::confirm(a.yes, &what)?;
    let client = connect().await?;
    leave_foreign_crds(&client, &mut all).await?;
    eprintln!("removing Causeway from namespace {ns}:");
    let mut failed = Vec::new();
    match causeway_deploy::coredns::set_forward(&client, None).await {
        Ok(true) => progress("removed the clusterset.local block from kube-system/coredns"),
        Ok(false) => {}
        Err(e) => failed.push(e.to_string()),
    }
    if !a.keep_node_state {
        failed.extend(clean_nodes(&client, &settings, &member_objects, a.poll).await);
    }
    if let Err(e) = causeway_deploy::apply::remove(&client, &all, progress).await {
        failed.push(e.to_string());
    }
    for (node, labelled) in causeway_deploy::apply::nodes(&client).await? {
        if labelled {
            match causeway_deploy::apply::label_gateway(&client, &node, false).await {
                Ok(()) => progress(&format!("removed the gateway label from {node}")),
                Err(e) => failed.push(e.to_string()),
            }
        }
    }
    if !failed.is_empty() {
        anyhow::bail!("uninstall finished with errors: {}", failed.join("; "));
    }
    println!("Causeway removed");
    Ok(())
}

/// The broker in this process as the store of mirrored ClusterSetPolicies (admin rights: the
/// objects' authors are whoever the cluster's RBAC lets create them).
pub struct BrokerPolicies(pub std::sync::Arc<causeway_broker::Broker>);

#[async_trait::async_trait]
impl causeway_deploy::policies::PolicyStore for BrokerPolicies {
    async fn apply(&self, p: causeway_broker_api::PolicyRecord) -> Result<(), String> {
        let admin = causeway_broker::auth::Identity::Admin;
        let list = self.0.list(&admin).map_err(|e| e.to_string())?;
        let same = list.items.iter().any(|o| {
            matches!(&o.record, causeway_broker_api::Record::Policy(have)
                if causeway_broker_api::PolicyRecord { generation: p.generation, ..have.clone() } == p)
        });
        if same {
            return Ok(());
        }
        self.0.put_policy(&admin, p).await.map(drop).map_err(|e| e.to_string())
    }

    async fn remove(&self, name: &str) -> Result<(), String> {
        match self.0.delete_policy(&causeway_broker::auth::Identity::Admin, name).await {
            Ok(_) | Err(causeway_broker::BrokerError::NotFound(_)) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use causeway_deploy::testing::{Reply, Seen, client, list, not_found};
    use serde_json::{Value, json};

    #[test]
    fn gateway_nodes_come_from_the_flag_or_the_label() {
        let nodes = vec![("a".to_owned(), false), ("b".to_owned(), true), ("c".to_owned(), true)];
        assert_eq!(choose_gateways(&["a".into()], &nodes).unwrap(), ["a"]);
        assert_eq!(choose_gateways(&[], &nodes).unwrap(), ["b", "c"]);
        let e = choose_gateways(&["zz".into()], &nodes).unwrap_err().to_string();
        assert!(e.contains("no such node") && e.contains("a, b, c"), "{e}");
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cw-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn secret_value(body: &Value, key: &str) -> Vec<u8> {
        causeway_deploy::testing::secret_data(body, key)
    }

    #[tokio::test]
    async fn deploy_broker_puts_only_token_hashes_in_the_cluster_and_they_work() {
        let dir = temp_dir("deploy-broker");
        let (kube, log) = client(|r: &Seen| match r.method.as_str() {
            "GET" => not_found("it"),
            _ => Reply::Json(200, r.body.clone()),
        });
        let args = ManifestArgs { namespace: "causeway-system".into(), image: None };
        deploy_broker(async || Ok(kube), &args, &["broker.example.com".into()], &dir, false).await.unwrap();
        // The CRD reads (none is there) aside, every request writes an object.
        let log: Vec<Seen> = log.lock().unwrap().iter().filter(|r| r.method != "GET").cloned().collect();
        let kinds: Vec<&str> = log.iter().map(|r| r.body["kind"].as_str().unwrap()).collect();
        let at = |k: &str| kinds.iter().position(|x| *x == k).unwrap();
        assert!(at("Namespace") < at("Secret") && at("Secret") < at("Deployment"), "{kinds:?}");
        let bootstrap =
            log.iter().find(|r| r.body["metadata"]["name"] == "causeway-broker-bootstrap").unwrap();
        let file: causeway_broker::auth::BootstrapFile =
            serde_json::from_slice(&secret_value(&bootstrap.body, "bootstrap.json")).unwrap();
        let admin = causeway_broker_api::Credentials::load(&dir.join(crate::setup::ADMIN_FILE)).unwrap();
        let info = causeway_broker_api::Credentials::load(&dir.join(crate::setup::BROKER_INFO_FILE)).unwrap();
        assert_eq!(admin.broker_url, "https://broker.example.com:7780");
        for body in log.iter().map(|r| r.body.to_string()) {
            assert!(
                !body.contains(&admin.token.0) && !body.contains(&info.token.0),
                "a token went into the cluster"
            );
        }
        // A broker that registers the Secret's hashes accepts exactly the operator's tokens.
        let broker = causeway_broker::Broker::new(causeway_broker::MemStore::default()).await.unwrap();
        for c in &file.credentials {
            broker.bootstrap(&c.token_sha256, &c.identity).await.unwrap();
        }
        assert_eq!(
            broker.authenticate(Some(&admin.token.0)).await.unwrap(),
            causeway_broker::Identity::Admin
        );
        assert_eq!(broker.authenticate(Some(&info.token.0)).await.unwrap(), causeway_broker::Identity::Join);
        // The TLS Secret holds a working certificate and key.
        let tls = log.iter().find(|r| r.body["metadata"]["name"] == "causeway-broker-tls").unwrap();
        std::fs::write(dir.join("tls.crt"), secret_value(&tls.body, "tls.crt")).unwrap();
        std::fs::write(dir.join("tls.key"), secret_value(&tls.body, "tls.key")).unwrap();
        causeway_broker::tls::server_config(&dir.join("tls.crt"), &dir.join("tls.key")).unwrap();
        // Twice into the same directory: refused before touching the cluster.
        let (kube, log2) = client(|r: &Seen| Reply::Json(200, r.body.clone()));
        let e = deploy_broker(async || Ok(kube), &args, &["b".into()], &dir, false)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("already holds"), "{e}");
        assert!(log2.lock().unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn node(name: &str, labelled: bool) -> Value {
        let mut labels = json!({});
        if labelled {
            labels["causeway.io/gateway"] = json!("true");
        }
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels},
               "spec": {"podCIDRs": [if name == "gw-1" { "10.244.1.0/24" } else { "10.244.2.0/24" }]},
               "status": {"addresses": [{"type": "InternalIP", "address": "192.168.10.11"}]}})
    }

    fn member_cluster() -> (causeway_deploy::Client, causeway_deploy::testing::Log) {
        member_cluster_with(&[])
    }

    /// The CRD of another MCS implementation, as the API server would return it.
    fn foreign_crd(name: &str) -> Value {
        json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
               "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "other-mcs"}}})
    }

    const CRDS: &str = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/";

    /// A member cluster in which the CRDs named in `foreign` exist, installed by someone else.
    fn member_cluster_with(
        foreign: &'static [&'static str],
    ) -> (causeway_deploy::Client, causeway_deploy::testing::Log) {
        client(move |r: &Seen| match (r.method.as_str(), r.path()) {
            ("GET", p) if p.strip_prefix(CRDS).is_some_and(|n| foreign.contains(&n)) => {
                Reply::Json(200, foreign_crd(p.strip_prefix(CRDS).unwrap()))
            }
            ("GET", "/api/v1/nodes") => {
                Reply::Json(200, list("Node", "v1", vec![node("gw-1", false), node("w-1", false)]))
            }
            ("GET", "/api/v1/namespaces/kube-system/configmaps/kubeadm-config") => Reply::Json(
                200,
                json!({
                    "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kubeadm-config"},
                    "data": {"ClusterConfiguration": "networking:\n  podSubnet: 10.244.0.0/16\n  serviceSubnet: 10.96.0.0/12\n"}
                }),
            ),
            ("GET", "/api/v1/namespaces/kube-system/configmaps/coredns") => Reply::Json(
                200,
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "coredns", "namespace": "kube-system"},
                       "data": {"Corefile": ".:53 {\n    errors\n    forward . /etc/resolv.conf\n    reload\n}\n"}}),
            ),
            ("GET", "/api/v1/namespaces/causeway-system/services/causeway-dns") => Reply::Json(
                200,
                json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "causeway-dns", "namespace": "causeway-system"},
                       "spec": {"clusterIP": "10.96.0.53"}}),
            ),
            ("GET", _) => not_found("it"),
            ("PATCH", "/api/v1/nodes/gw-1") => Reply::Json(200, node("gw-1", true)),
            ("PATCH", _) => Reply::Json(200, r.body.clone()),
            other => panic!("unexpected {other:?}"),
        })
    }

    #[tokio::test]
    async fn join_registers_labels_and_applies_and_a_rerun_converges() {
        let dir = temp_dir("join");
        let broker = causeway_broker::Broker::new(causeway_broker::MemStore::default()).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(causeway_broker::run(listener, broker.clone(), std::future::pending()));
        let info = causeway_broker_api::Credentials {
            broker_url: url.clone(),
            ca_pem: None,
            kind: causeway_broker_api::CredentialKind::Join,
            cluster_id: None,
            token: broker.issue(&causeway_broker::Identity::Join).await.unwrap(),
        };
        info.save(&dir.join("broker-info.json")).unwrap();
        let args = ManifestArgs {
            namespace: "causeway-system".into(),
            image: Some("registry.example.com/causeway:1".into()),
        };
        let info_path = dir.join("broker-info.json");
        let plan = |out: &str, gateways: &'static [String]| JoinPlan {
            info_path: &info_path,
            cluster_id: "east",
            pod_cidrs: &[],
            service_cidrs: &[],
            gateway_nodes: gateways,
            output: dir.join(out),
            dry_run: false,
            wait: None,
        };
        let gateways: &'static [String] = Box::leak(Box::new(["gw-1".to_owned()]));
        let (kube, log) = member_cluster();
        join(async || Ok(kube), &args, plan("east.json", gateways)).await.unwrap();

        // The broker has the cluster with the discovered CIDRs, and the saved credential works.
        let creds = causeway_broker_api::Credentials::load(&dir.join("east.json")).unwrap();
        let records =
            causeway_broker_api::BrokerClient::from_credentials(&creds).unwrap().list().await.unwrap();
        let east = records.items.iter().find_map(|o| match &o.record {
            causeway_broker_api::Record::Cluster(c) if c.cluster_id == "east" => Some(c.clone()),
            _ => None,
        });
        let east = east.expect("east registered");
        let mut readers = Vec::new();
        assert_eq!(east.pod_cidrs, vec!["10.244.0.0/16".parse().unwrap()]);
        assert_eq!(east.service_cidrs, vec!["10.96.0.0/12".parse().unwrap()]);
        {
            let log = log.lock().unwrap();
            let label = log.iter().find(|r| r.is("PATCH", "/api/v1/nodes/gw-1")).expect("gw-1 labelled");
            assert_eq!(label.body["metadata"]["labels"]["causeway.io/gateway"], "true");
            assert!(!log.iter().any(|r| r.path() == "/api/v1/nodes/w-1"), "only the chosen node is labelled");
            let secret =
                log.iter().find(|r| r.body["metadata"]["name"] == "causeway-broker-credentials").unwrap();
            let stored: causeway_broker_api::Credentials =
                serde_json::from_slice(&secret_value(&secret.body, "credentials.json")).unwrap();
            assert_eq!(stored.token, creds.token);
            // The route agents get a read-only credential of their own: it reads, it cannot write.
            let secret = log
                .iter()
                .find(|r| r.body["metadata"]["name"] == "causeway-route-agent-credentials")
                .unwrap();
            let reader: causeway_broker_api::Credentials =
                serde_json::from_slice(&secret_value(&secret.body, "credentials.json")).unwrap();
            assert_eq!(reader.kind, causeway_broker_api::CredentialKind::Reader);
            assert_ne!(reader.token, creds.token);
            readers.push(reader);
            let ds = log
                .iter()
                .find(|r| r.body["kind"] == "DaemonSet" && r.body["metadata"]["name"] == "causeway-gateway")
                .unwrap();
            assert_eq!(
                ds.body["spec"]["template"]["spec"]["containers"][0]["image"],
                "registry.example.com/causeway:1"
            );
            assert!(
                log.iter()
                    .filter(|r| r.method == "PATCH")
                    .all(|r| r.uri.contains("fieldManager") || r.path().starts_with("/api/v1/nodes/"))
            );
            // CoreDNS forwards clusterset.local to the causeway-dns Service; its own zone stays.
            let coredns = log
                .iter()
                .find(|r| r.is("PATCH", "/api/v1/namespaces/kube-system/configmaps/coredns"))
                .expect("CoreDNS told about clusterset.local");
            let corefile = coredns.body["data"]["Corefile"].as_str().unwrap();
            assert!(corefile.starts_with(".:53 {\n    errors\n    forward . /etc/resolv.conf"), "{corefile}");
            assert!(
                corefile.contains("clusterset.local:53 {\n    errors\n    forward . 10.96.0.53\n}"),
                "{corefile}"
            );
        }

        let reader = causeway_broker_api::BrokerClient::from_credentials(&readers[0]).unwrap();
        reader.list().await.unwrap();
        let mut hijack = east.clone();
        hijack.generation += 1;
        assert_eq!(reader.put_cluster(&hijack).await.unwrap_err().status(), Some(403));
        // Re-running reuses the credential (a second registration would be refused), and the
        // reader's.
        let (kube, _log) = member_cluster();
        join(async || Ok(kube), &args, plan("east.json", gateways)).await.unwrap();
        let again = causeway_broker_api::Credentials::load(&dir.join("east.reader.json")).unwrap();
        assert_eq!(again.token, readers[0].token);
        // Join ends with `status --wait`: with no gateway reporting it fails naming what is
        // missing; once east's active gateway reports (the only cluster: nothing to reach), it
        // returns.
        let waiting = |timeout_ms| JoinPlan {
            wait: Some(std::time::Duration::from_millis(timeout_ms)),
            ..plan("east.json", gateways)
        };
        let (kube, _log) = member_cluster();
        let e = join(async || Ok(kube), &args, waiting(300)).await.unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("its tunnels are not all up") && e.contains("east has no active gateway"), "{e}");
        let mut gw = causeway_broker_api::EndpointRecord::new(
            "east",
            "gw-1",
            "192.168.10.11".parse().unwrap(),
            causeway_broker_api::WireGuardKey([7; 32]),
        );
        gw.reachable = Some(Vec::new());
        causeway_broker_api::BrokerClient::from_credentials(&creds).unwrap().put_endpoint(&gw).await.unwrap();
        let (kube, _log) = member_cluster();
        join(async || Ok(kube), &args, waiting(5_000)).await.unwrap();
        // ServiceExport's CRD installed by another MCS implementation: join uses it as it is
        // and applies only its own CRDs (a forced apply would take the other one over).
        let (kube, log) = member_cluster_with(&["serviceexports.multicluster.x-k8s.io"]);
        join(async || Ok(kube), &args, plan("east.json", gateways)).await.unwrap();
        {
            let log = log.lock().unwrap();
            let patched: Vec<&str> = log.iter().filter(|r| r.method == "PATCH").map(Seen::path).collect();
            assert!(
                !patched.iter().any(|p| p.ends_with("serviceexports.multicluster.x-k8s.io")),
                "{patched:?}"
            );
            assert!(
                patched.contains(&format!("{CRDS}serviceimports.multicluster.x-k8s.io").as_str()),
                "{patched:?}"
            );
        }
        // Another cluster (another join token) claiming the id gets the broker's refusal, and
        // nothing is applied. (The same token and record again is the same caller re-running:
        // it gets a fresh credential; give each organisation its own, single-use, token.)
        let other_info = causeway_broker_api::Credentials {
            token: broker.issue(&causeway_broker::Identity::Join).await.unwrap(),
            ..info.clone()
        };
        other_info.save(&info_path).unwrap();
        let (kube, log) = member_cluster();
        let e = join(async || Ok(kube), &args, plan("other.json", gateways)).await.unwrap_err();
        assert!(format!("{e:#}").contains("already registered"), "{e:#}");
        assert!(!log.lock().unwrap().iter().any(|r| r.method == "PATCH"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A cluster join set up, as uninstall finds it; the CRD of ServiceExport is another
    /// implementation's.
    fn uninstalled_cluster() -> (causeway_deploy::Client, causeway_deploy::testing::Log) {
        uninstalled_cluster_with(true)
    }

    const JOBS: &str = "/apis/batch/v1/namespaces/causeway-system/jobs/";

    /// As above; with `gateway_ds_fails` false the DaemonSets go, their pods are gone, and the
    /// cleanup Job succeeds on gw-1 and fails on w-1.
    fn uninstalled_cluster_with(
        gateway_ds_fails: bool,
    ) -> (causeway_deploy::Client, causeway_deploy::testing::Log) {
        client(move |r: &Seen| match (r.method.as_str(), r.path()) {
            ("GET", "/api/v1/namespaces/causeway-system/pods") => Reply::Json(200, list("Pod", "v1", vec![])),
            ("PATCH", p) if p.starts_with(JOBS) => Reply::Json(200, r.body.clone()),
            ("GET", p) if p.starts_with(JOBS) => {
                let name = p.strip_prefix(JOBS).unwrap();
                let status = if name.ends_with("gw-1") {
                    json!({"succeeded": 1})
                } else {
                    json!({"failed": 3, "conditions": [{"type": "Failed", "status": "True",
                        "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]})
                };
                Reply::Json(
                    200,
                    json!({"apiVersion": "batch/v1", "kind": "Job",
                    "metadata": {"name": name, "namespace": "causeway-system"}, "status": status}),
                )
            }
            ("DELETE", p) if gateway_ds_fails && p.ends_with("/daemonsets/causeway-gateway") => Reply::Json(
                500,
                causeway_deploy::testing::status(500, "InternalError", "etcdserver: request timed out"),
            ),
            ("GET", p) if p == format!("{CRDS}serviceexports.multicluster.x-k8s.io") => {
                Reply::Json(200, foreign_crd("serviceexports.multicluster.x-k8s.io"))
            }
            ("GET", p) if p.starts_with(CRDS) => not_found("crd"),
            ("GET", "/api/v1/nodes") => {
                Reply::Json(200, list("Node", "v1", vec![node("gw-1", true), node("w-1", false)]))
            }
            ("PATCH", "/api/v1/nodes/gw-1") => Reply::Json(200, node("gw-1", false)),
            // The Corefile join left: CoreDNS's own zone and Causeway's block.
            ("GET", "/api/v1/namespaces/kube-system/configmaps/coredns") => Reply::Json(
                200,
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "coredns", "namespace": "kube-system"},
                       "data": {"Corefile": causeway_deploy::coredns::with_zone(".:53 {\n    reload\n}\n", "10.96.0.53")}}),
            ),
            ("PATCH", "/api/v1/namespaces/kube-system/configmaps/coredns") => {
                Reply::Json(200, r.body.clone())
            }
            ("DELETE", p) if p.ends_with("/leases/causeway-gateway") => not_found("lease"),
            ("DELETE", _) => Reply::Json(200, causeway_deploy::testing::status(200, "", "")),
            other => panic!("unexpected {other:?}"),
        })
    }

    /// `uninstall --yes` (and `--crds`), as the tests run it: node Jobs polled every 10 ms.
    fn uninstall_args(crds: bool, image: Option<&str>) -> UninstallArgs {
        UninstallArgs {
            kube: KubeArgs::default(),
            manifests: ManifestArgs { namespace: "causeway-system".into(), image: image.map(Into::into) },
            broker: false,
            crds,
            dry_run: false,
            yes: true,
            keep_node_state: false,
            poll: std::time::Duration::from_millis(10),
        }
    }

    #[tokio::test]
    async fn uninstall_cleans_every_node_once_the_daemonsets_are_gone() {
        let (kube, log) = uninstalled_cluster_with(false);
        let a = uninstall_args(false, Some("reg/causeway:2"));
        let e = uninstall_with(async || Ok(kube), a).await.unwrap_err().to_string();
        // The failed node is named with the Job's reason; the other one is clean.
        assert!(e.contains("cleanup on node w-1 failed (causeway-cleanup-w-1: Job has reached"), "{e}");
        assert!(!e.contains("gw-1"), "{e}");
        let log = log.lock().unwrap();
        let at = |method: &str, path: &str| log.iter().position(|r| r.is(method, path));
        let ds =
            at("DELETE", "/apis/apps/v1/namespaces/causeway-system/daemonsets/causeway-gateway").unwrap();
        let job = at("PATCH", &format!("{JOBS}causeway-cleanup-gw-1")).expect("a Job on gw-1");
        let pods = log.iter().position(|r| r.is("GET", "/api/v1/namespaces/causeway-system/pods")).unwrap();
        assert!(ds < pods && pods < job, "DaemonSets deleted and their pods gone before the cleanup");
        let spec = &log[job].body["spec"]["template"]["spec"];
        assert_eq!(spec["nodeName"], "gw-1");
        assert_eq!(spec["hostNetwork"], true);
        assert_eq!(spec["containers"][0]["command"], json!(["causeway", "cleanup"]));
        assert_eq!(spec["containers"][0]["image"], "reg/causeway:2");
        assert!(
            at("PATCH", &format!("{JOBS}causeway-cleanup-w-1")).is_some(),
            "every node, route-agent nodes too"
        );
        // The Jobs are removed afterwards, and the rest of the uninstall still ran.
        assert!(at("DELETE", &format!("{JOBS}causeway-cleanup-gw-1")).is_some());
        assert!(
            at("DELETE", "/api/v1/namespaces/causeway-system/secrets/causeway-broker-credentials").is_some()
        );
    }

    #[tokio::test]
    async fn uninstall_removes_what_join_created_and_keeps_going_past_failures() {
        let (kube, log) = uninstalled_cluster();
        let a = uninstall_args(false, None);
        let e = uninstall_with(async || Ok(kube), a).await.unwrap_err().to_string();
        assert!(e.contains("DaemonSet/causeway-gateway"), "{e}");
        let log = log.lock().unwrap();
        let deleted: Vec<&str> = log.iter().filter(|r| r.method == "DELETE").map(Seen::path).collect();
        for gone in [
            "/apis/apps/v1/namespaces/causeway-system/daemonsets/causeway-route-agent",
            "/api/v1/namespaces/causeway-system/secrets/causeway-broker-credentials",
            "/apis/rbac.authorization.k8s.io/v1/clusterroles/causeway-gateway",
            "/apis/rbac.authorization.k8s.io/v1/namespaces/kube-system/roles/causeway-gateway-cidr-discovery",
        ] {
            assert!(deleted.contains(&gone), "{gone} not deleted: {deleted:?}");
        }
        // Without --broker the namespace (which may hold the broker) stays, and so do the CRDs.
        assert!(!deleted.contains(&"/api/v1/namespaces/causeway-system"));
        assert!(!deleted.iter().any(|p| p.contains("customresourcedefinitions")));
        // The failed step did not stop the label removal.
        let unlabel = log.iter().find(|r| r.is("PATCH", "/api/v1/nodes/gw-1")).expect("label removed");
        assert_eq!(unlabel.body["metadata"]["labels"]["causeway.io/gateway"], Value::Null);
        // CoreDNS is back to its own Corefile.
        let coredns = log
            .iter()
            .find(|r| r.is("PATCH", "/api/v1/namespaces/kube-system/configmaps/coredns"))
            .expect("Causeway's block removed");
        assert_eq!(coredns.body["data"]["Corefile"], ".:53 {\n    reload\n}\n");
    }

    #[tokio::test]
    async fn uninstall_crds_removes_causeways_and_leaves_another_implementations() {
        let (kube, log) = uninstalled_cluster();
        let a = uninstall_args(true, None);
        uninstall_with(async || Ok(kube), a).await.unwrap_err();
        let log = log.lock().unwrap();
        let deleted: Vec<&str> = log.iter().filter(|r| r.method == "DELETE").map(Seen::path).collect();
        assert!(
            deleted.contains(&format!("{CRDS}serviceimports.multicluster.x-k8s.io").as_str()),
            "{deleted:?}"
        );
        assert!(deleted.contains(&format!("{CRDS}clustersetpolicies.causeway.io").as_str()), "{deleted:?}");
        assert!(!deleted.iter().any(|p| p.ends_with("serviceexports.multicluster.x-k8s.io")), "{deleted:?}");
    }

    #[tokio::test]
    async fn mirrored_policies_reach_the_broker_once_and_go() {
        use causeway_deploy::policies::PolicyStore as _;
        let broker = causeway_broker::Broker::new(causeway_broker::store::MemStore::default()).await.unwrap();
        let store = BrokerPolicies(broker.clone());
        let admin = causeway_broker::auth::Identity::Admin;
        let rule = causeway_deploy::crds::policy_from_object(&serde_json::json!({
            "metadata": {"name": "web"}, "spec": {"action": "deny", "protocol": "tcp", "ports": ["80"]}
        }))
        .unwrap();
        store.apply(rule.clone()).await.unwrap();
        let rev = broker.list(&admin).unwrap().resource_version;
        // Re-applying the same object (every re-list does) writes nothing.
        store.apply(rule.clone()).await.unwrap();
        assert_eq!(broker.list(&admin).unwrap().resource_version, rev);
        let policies = |b: &causeway_broker::Broker| -> Vec<causeway_broker_api::PolicyRecord> {
            b.list(&admin)
                .unwrap()
                .items
                .into_iter()
                .filter_map(|o| match o.record {
                    causeway_broker_api::Record::Policy(p) => Some(p),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(policies(&broker).len(), 1);
        assert_eq!(policies(&broker)[0].ports, rule.ports);
        store.remove("web").await.unwrap();
        store.remove("web").await.unwrap();
        assert!(policies(&broker).is_empty());
    }
}

#[cfg(test)]
mod dashboard_tests {
    /// The metric families each daemon exposes, from their `# TYPE` lines (present with no
    /// samples too): counters as their `_total` sample names, info as `_info`.
    fn exposed(text: &str) -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_once(' '))
            .map(|(name, kind)| match kind {
                "counter" => format!("{name}_total"),
                "info" => format!("{name}_info"),
                _ => name.to_owned(),
            })
            .collect()
    }

    #[tokio::test]
    async fn the_dashboard_charts_only_metrics_that_exist() {
        let status: causeway_broker_api::status::GatewayStatus = serde_json::from_value(serde_json::json!({
            "clusterId": "east", "hostname": "gw", "publicKey": "k", "cable": "wireguard", "device": "causeway0",
            "listenPort": 51820, "brokerUrl": "https://b", "revision": 1, "connections": [],
            "cableDrops": {}, "datapathEvents": {}
        }))
        .unwrap();
        let broker = causeway_broker::Broker::new(causeway_broker::MemStore::default()).await.unwrap();
        let mut all = exposed(&causeway_gateway::status::render_metrics(&status));
        all.extend(exposed(&causeway_gateway::agent::render_agent_metrics(&Default::default())));
        all.extend(exposed(&causeway_metrics_render(&broker)));
        let missing: Vec<String> = causeway_deploy::monitoring::dashboard_metrics()
            .into_iter()
            .filter(|m| !all.contains(m))
            .collect();
        assert!(missing.is_empty(), "the dashboard charts metrics no daemon exposes: {missing:?}");
        assert!(causeway_deploy::monitoring::dashboard_metrics().len() > 25);
    }

    fn causeway_metrics_render(b: &causeway_broker::Broker) -> String {
        let families = causeway_broker::metrics::families(b, &Default::default(), true);
        // Through the broker crate's own rendering dependency.
        causeway_broker::metrics::render(families)
    }
}
