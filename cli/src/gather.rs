//! `causeway gather`: a support bundle (a `.tar.gz`) of what a bug report needs — versions,
//! the broker's records, every gateway's status, metrics and log, the eBPF maps, and each
//! node's links, addresses, routes, rules and firewall — with every secret redacted.
//!
//! Nothing is copied whole from a directory: every file of the bundle is one named piece of
//! output, and every piece passes through [`Redactor`] on the way in, which removes the
//! tokens and private keys it was told about and anything shaped like one.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;

#[derive(clap::Args)]
pub struct GatherArgs {
    /// Where to write the bundle; `-` (with --local) writes its files to stdout as a text
    /// stream instead (what `gather --context` reads from the Jobs it runs on gateway nodes).
    #[arg(long, short, default_value = "causeway-gather.tar.gz")]
    output: PathBuf,
    /// Gather this node only (a gateway node, e.g. in the gateway's pod); without it, the whole
    /// local sandbox.
    #[arg(long)]
    local: bool,
    /// The gateway's status socket (with --local).
    #[arg(long, env = "CAUSEWAY_STATUS_SOCKET", default_value = "/run/causeway/gateway.sock")]
    status_socket: PathBuf,
    /// The gateway's pinned eBPF maps (with --local).
    #[arg(long, env = "CAUSEWAY_BPF_DIR", default_value = "/sys/fs/bpf/causeway")]
    bpf_dir: PathBuf,
    /// The gateway's state directory (with --local): its private key is redacted from
    /// everything gathered.
    #[arg(long, env = "CAUSEWAY_STATE_DIR", default_value = "/var/lib/causeway")]
    state_dir: PathBuf,
    /// Credentials to read the broker's records with (default: the local sandbox's admin).
    /// Their token is redacted from everything gathered.
    #[arg(long, env = "CAUSEWAY_CREDENTIALS")]
    credentials: Option<PathBuf>,
    #[command(flatten)]
    members: crate::kubernetes::MemberArgs,
}

/// How each file starts in the text stream of `gather --local --output -`: the marker, the
/// file's name and its length in bytes, on one line.
const STREAM_MARKER: &str = "=== causeway-gather";

/// The files of a text stream, as `(name, content)`; a stream cut short yields what came whole.
#[must_use]
pub fn parse_stream(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(STREAM_MARKER) {
        let after = &rest[at + STREAM_MARKER.len()..];
        let Some(eol) = after.find('\n') else { break };
        let mut words = after[..eol].split_whitespace();
        let (Some(name), Some(len)) = (words.next(), words.next().and_then(|l| l.parse::<usize>().ok()))
        else {
            rest = &after[eol..];
            continue;
        };
        let body = &after[eol + 1..];
        let Some(content) = body.get(..len) else { break };
        // Names come from another machine: no way out of the node's directory.
        if !name.split('/').any(|p| p.is_empty() || p == "." || p == "..") {
            out.push((name.to_owned(), content.to_owned()));
        }
        rest = &body[len..];
    }
    out
}

const REDACTED: &str = "<redacted>";

/// Removes secrets from text: the literal ones it knows (tokens and keys read from the
/// credentials and key files in reach) and any broker token (`cw1_…`) or PEM private key.
#[derive(Default)]
pub struct Redactor {
    known: Vec<String>,
}

impl Redactor {
    /// Adds a secret to remove wherever it appears (too short ones are refused: they would
    /// blank out ordinary text).
    pub fn know(&mut self, secret: &str) {
        let secret = secret.trim();
        if secret.len() >= 16 && !self.known.iter().any(|k| k == secret) {
            self.known.push(secret.to_owned());
        }
    }

    /// Learns the secrets of every credentials file and WireGuard key file under `dir`.
    pub fn know_files_under(&mut self, dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(kind) = e.file_type() else { continue };
            if kind.is_dir() {
                self.know_files_under(&path);
            } else if kind.is_file() {
                self.know_file(&path);
            }
        }
    }

    /// Learns a credentials file's token, or a key file's key.
    pub fn know_file(&mut self, path: &Path) {
        if let Ok(c) = causeway_broker_api::Credentials::load(path) {
            self.know(&c.token.0);
        } else if path.file_name().is_some_and(|n| n.to_string_lossy().ends_with(".key"))
            && let Ok(text) = std::fs::read_to_string(path)
        {
            self.know(&text);
        }
    }

    #[must_use]
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for k in &self.known {
            out = out.replace(k.as_str(), REDACTED);
        }
        out = redact_tokens(&out);
        redact_pem_keys(&out)
    }
}

/// `cw1_` and the URL-safe base64 that follows it: a broker token, whoever's.
fn redact_tokens(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("cw1_") {
        out.push_str(&rest[..at]);
        let tail = &rest[at + 4..];
        let len =
            tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_')).unwrap_or(tail.len());
        if len >= 16 {
            out.push_str("cw1_");
            out.push_str(REDACTED);
        } else {
            out.push_str(&rest[at..at + 4 + len]);
        }
        rest = &tail[len..];
    }
    out.push_str(rest);
    out
}

/// Every `-----BEGIN … PRIVATE KEY-----` block, whole.
fn redact_pem_keys(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(begin) = rest.find("-----BEGIN ") {
        let head_end =
            rest[begin..].find("-----\n").or_else(|| rest[begin + 11..].find("-----").map(|i| i + 11));
        let is_key = head_end.is_some_and(|e| rest[begin..begin + e].ends_with("PRIVATE KEY"));
        if !is_key {
            out.push_str(&rest[..begin + 11]);
            rest = &rest[begin + 11..];
            continue;
        }
        out.push_str(&rest[..begin]);
        out.push_str(REDACTED);
        let after = &rest[begin..];
        let end = after.find("-----END ").and_then(|e| after[e + 9..].find("-----").map(|f| e + 9 + f + 5));
        rest = match end {
            Some(e) => &after[e..],
            None => "",
        };
    }
    out.push_str(rest);
    out
}

/// The bundle being written: every file goes through the redactor.
struct Bundle {
    sink: Sink,
    redactor: Redactor,
    root: String,
    files: Vec<String>,
}

impl Bundle {
    fn create(path: &Path, redactor: Redactor) -> anyhow::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
        Ok(Self {
            sink: Sink::Tar(tar::Builder::new(gz)),
            redactor,
            root: "causeway-gather".into(),
            files: Vec::new(),
        })
    }

    /// The text stream on stdout (see [`parse_stream`]).
    fn stream(redactor: Redactor) -> Self {
        Self { sink: Sink::Text(std::io::stdout()), redactor, root: String::new(), files: Vec::new() }
    }

    fn add(&mut self, name: &str, text: &str) -> anyhow::Result<()> {
        let body = self.redactor.redact(text);
        match &mut self.sink {
            Sink::Tar(tar) => {
                let mut header = tar::Header::new_gnu();
                header.set_size(body.len() as u64);
                header.set_mode(0o600);
                header.set_mtime(
                    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
                );
                header.set_cksum();
                let path = format!("{}/{name}", self.root);
                tar.append_data(&mut header, &path, body.as_bytes())
                    .with_context(|| format!("adding {path}"))?;
            }
            Sink::Text(out) => {
                write!(out, "{STREAM_MARKER} {name} {}\n{body}", body.len())?;
            }
        }
        self.files.push(name.to_owned());
        Ok(())
    }

    /// A command's output (or why there is none) as one file.
    fn command(&mut self, name: &str, ns: Option<&str>, args: &[&str]) -> anyhow::Result<()> {
        let text = run(ns, args);
        self.add(name, &text)
    }

    fn finish(self) -> anyhow::Result<Vec<String>> {
        match self.sink {
            Sink::Tar(tar) => {
                let gz = tar.into_inner().context("finishing the archive")?;
                let mut file = gz.finish().context("finishing the compression")?;
                file.flush()?;
            }
            Sink::Text(mut out) => out.flush()?,
        }
        Ok(self.files)
    }
}

/// Where a bundle's files go.
enum Sink {
    Tar(tar::Builder<flate2::write::GzEncoder<std::fs::File>>),
    Text(std::io::Stdout),
}

/// `args` (in namespace `ns`), stdout then stderr; a failure is written down, not fatal.
fn run(ns: Option<&str>, args: &[&str]) -> String {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).args(args);
            c
        }
        None => {
            let mut c = Command::new(args[0]);
            c.args(&args[1..]);
            c
        }
    };
    match cmd.output() {
        Ok(o) => {
            let mut text = format!("$ {}\n{}", args.join(" "), String::from_utf8_lossy(&o.stdout));
            if !o.stderr.is_empty() {
                text.push_str(&format!("--- stderr\n{}", String::from_utf8_lossy(&o.stderr)));
            }
            if !o.status.success() {
                text.push_str(&format!("--- exit: {}\n", o.status));
            }
            text
        }
        Err(e) => format!("$ {}\ncould not run: {e}\n", args.join(" ")),
    }
}

/// A name usable as a directory: `cluster-1 (standby)` → `cluster-1-standby`.
fn slug(name: &str) -> String {
    let s: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).collect();
    s.split('-').filter(|p| !p.is_empty()).collect::<Vec<_>>().join("-")
}

/// The node-level pieces: links (with their XDP programs), addresses, routes, rules, firewall.
fn node_network(b: &mut Bundle, dir: &str, ns: Option<&str>) -> anyhow::Result<()> {
    b.command(&format!("{dir}/links.txt"), ns, &["ip", "-d", "-s", "link", "show"])?;
    b.command(&format!("{dir}/addresses.txt"), ns, &["ip", "addr", "show"])?;
    b.command(&format!("{dir}/routes.txt"), ns, &["ip", "route", "show", "table", "all"])?;
    b.command(&format!("{dir}/routes6.txt"), ns, &["ip", "-6", "route", "show", "table", "all"])?;
    b.command(&format!("{dir}/rules.txt"), ns, &["ip", "rule", "show"])?;
    b.command(&format!("{dir}/nftables.txt"), ns, &["nft", "list", "ruleset"])?;
    Ok(())
}

/// One gateway's status, metrics and (when given) log.
fn gateway(b: &mut Bundle, dir: &str, socket: &Path, log: Option<&Path>) -> anyhow::Result<()> {
    use causeway_broker_api::status;
    let st = status::fetch_raw(socket, "/status")
        .unwrap_or_else(|e| format!("no status from {}: {e}\n", socket.display()));
    b.add(&format!("{dir}/status.json"), &st)?;
    let m = status::fetch_raw(socket, "/metrics")
        .unwrap_or_else(|e| format!("no metrics from {}: {e}\n", socket.display()));
    b.add(&format!("{dir}/metrics.txt"), &m)?;
    if let Some(log) = log {
        let text = std::fs::read_to_string(log).unwrap_or_else(|e| format!("{}: {e}\n", log.display()));
        b.add(&format!("{dir}/gateway.log"), &text)?;
    }
    Ok(())
}

/// Every pinned map under `dir`, dumped by bpftool as JSON (one file each).
fn bpf_maps(b: &mut Bundle, dir: &Path) -> anyhow::Result<usize> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => walk(&e.path(), out),
                Ok(_) => out.push(e.path()),
                Err(_) => {}
            }
        }
    }
    // The programs and their attachments (XDP and tcx links) are machine-wide.
    b.command("bpf/programs.txt", None, &["bpftool", "prog", "show"])?;
    b.command("bpf/links.txt", None, &["bpftool", "link", "show"])?;
    let mut pins = Vec::new();
    walk(dir, &mut pins);
    pins.sort();
    let mut maps = 0;
    for pin in pins {
        let info = Command::new("bpftool").args(["-j", "map", "show", "pinned"]).arg(&pin).output();
        // Pinned programs and links live beside the maps: only maps are dumped.
        if !info.as_ref().is_ok_and(|o| o.status.success()) {
            continue;
        }
        let rel = pin.strip_prefix(dir).unwrap_or(&pin).display().to_string();
        let path = pin.display().to_string();
        b.command(&format!("bpf/{rel}.txt"), None, &["bpftool", "-j", "map", "dump", "pinned", &path])?;
        maps += 1;
    }
    Ok(maps)
}

fn versions() -> String {
    let mut text = format!("causeway {}\n", env!("CARGO_PKG_VERSION"));
    text.push_str(&std::fs::read_to_string("/proc/version").unwrap_or_default());
    for tool in [&["ip", "-V"][..], &["nft", "--version"], &["bpftool", "version"]] {
        text.push_str(&run(None, tool));
    }
    text
}

async fn broker_pieces(b: &mut Bundle, credentials: &Path) -> anyhow::Result<()> {
    let listed = async {
        let creds = causeway_broker_api::Credentials::load(credentials).map_err(anyhow::Error::msg)?;
        let client = causeway_broker_api::BrokerClient::from_credentials(&creds)?;
        let records = client.list().await?;
        let creds_list = client.list_credentials().await.map(|l| serde_json::to_string_pretty(&l));
        anyhow::Ok((serde_json::to_string_pretty(&records)?, creds_list))
    };
    match listed.await {
        Ok((records, creds_list)) => {
            b.add("broker/records.json", &records)?;
            let text = match creds_list {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => format!("unreadable: {e}\n"),
                Err(e) => format!("not listed (admin credentials only): {e}\n"),
            };
            b.add("broker/credentials.json", &text)?;
        }
        Err(e) => b.add("broker/records.json", &format!("not read: {e:#}\n"))?,
    }
    Ok(())
}

pub async fn run_gather(a: GatherArgs) -> anyhow::Result<()> {
    let mut redactor = Redactor::default();
    if let Some(c) = &a.credentials {
        redactor.know_file(c);
    }
    let files;
    let mut maps = 0;
    if a.local {
        redactor.know_files_under(&a.state_dir);
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "node".into());
        let dir = format!("nodes/{}", slug(host.trim()));
        let to_stdout = a.output.as_os_str() == "-";
        let (mut b, dir) = if to_stdout {
            (Bundle::stream(redactor), ".".to_owned())
        } else {
            (Bundle::create(&a.output, redactor)?, dir)
        };
        b.add("versions.txt", &versions())?;
        if let Some(c) = &a.credentials {
            broker_pieces(&mut b, c).await?;
        }
        gateway(&mut b, &dir, &a.status_socket, None)?;
        node_network(&mut b, &dir, None)?;
        maps += bpf_maps(&mut b, &a.bpf_dir)?;
        files = b.finish()?;
        if to_stdout {
            return Ok(());
        }
    } else if !a.members.contexts.is_empty() {
        let clusters = a.members.connect().await?;
        let settings = a.members.settings();
        let mut b = Bundle::create(&a.output, redactor)?;
        b.add("versions.txt", &versions())?;
        if let Some(c) = &a.credentials {
            broker_pieces(&mut b, c).await?;
        }
        let timeout = std::time::Duration::from_secs(150);
        kubernetes(&mut b, &clusters, &settings, timeout, std::time::Duration::from_secs(2)).await?;
        files = b.finish()?;
    } else {
        files = sandbox(a, redactor, &mut maps).await?;
    }
    println!("wrote {} files ({maps} eBPF maps), secrets redacted", files.len());
    Ok(())
}

/// Each cluster's Causeway pods (their list and logs) and events, and each gateway node's
/// pieces from a Job running `gather --local --output -` on it, under `clusters/<context>/`.
async fn kubernetes(
    b: &mut Bundle,
    clusters: &[(String, causeway_deploy::Client)],
    settings: &causeway_deploy::Settings,
    timeout: std::time::Duration,
    poll: std::time::Duration,
) -> anyhow::Result<()> {
    use causeway_deploy::apply;
    let ns = settings.namespace.as_str();
    for (ctx, client) in clusters {
        let dir = format!("clusters/{}", slug(ctx));
        match apply::pods_and_logs(client, ns, "app.kubernetes.io/name=causeway", 10_000).await {
            Ok((pods, logs)) => {
                b.add(&format!("{dir}/pods.json"), &pods)?;
                for (pod, log) in logs {
                    b.add(&format!("{dir}/logs/{}.log", slug(&pod)), &log)?;
                }
            }
            Err(e) => b.add(&format!("{dir}/pods.json"), &format!("not listed: {e}\n"))?,
        }
        let events = apply::events(client, ns).await.unwrap_or_else(|e| format!("not listed: {e}\n"));
        b.add(&format!("{dir}/events.json"), &events)?;
        let command = ["causeway", "gather", "--local", "--output", "-"];
        let runs = apply::run_on_gateway_nodes(
            client,
            settings,
            "causeway-gather",
            &command,
            false,
            timeout,
            poll,
            |_| {},
        )
        .await?;
        for run in runs {
            let node = slug(&run.node);
            let files = parse_stream(&run.log);
            if files.is_empty() {
                let why = format!("the Job {} gave nothing ({:?})\n{}", run.job, run.outcome, run.log);
                b.add(&format!("{dir}/nodes/{node}/missing.txt"), &why)?;
            }
            for (name, content) in files {
                b.add(&format!("{dir}/nodes/{node}/{name}"), &content)?;
            }
        }
    }
    Ok(())
}

#[cfg(feature = "sandbox")]
async fn sandbox(a: GatherArgs, mut redactor: Redactor, maps: &mut usize) -> anyhow::Result<Vec<String>> {
    let layout = causeway_lab::sandbox::layout()?;
    // Every credentials file and key the sandbox holds: none may appear in the bundle.
    redactor.know_files_under(&layout.run_dir);
    let credentials = a.credentials.unwrap_or_else(causeway_lab::sandbox::admin_credentials);
    redactor.know_file(&credentials);
    let mut b = Bundle::create(&a.output, redactor)?;
    b.add("versions.txt", &versions())?;
    broker_pieces(&mut b, &credentials).await?;
    let log = std::fs::read_to_string(&layout.broker_log).unwrap_or_else(|e| format!("{e}\n"));
    b.add("broker/broker.log", &log)?;
    let metrics = ["curl", "-sS", "--max-time", "3", "http://127.0.0.1:9466/metrics"];
    b.command("broker/metrics.txt", Some(&layout.broker_ns), &metrics)?;
    for g in &layout.gateways {
        let dir = format!("gateways/{}", slug(&g.name));
        gateway(&mut b, &dir, &g.status_socket, Some(&g.log))?;
    }
    for ns in &layout.namespaces {
        node_network(&mut b, &format!("namespaces/{ns}"), Some(ns))?;
    }
    *maps += bpf_maps(&mut b, &layout.run_dir.join("bpf"))?;
    b.finish()
}

#[cfg(not(feature = "sandbox"))]
async fn sandbox(_: GatherArgs, _: Redactor, _: &mut usize) -> anyhow::Result<Vec<String>> {
    anyhow::bail!("this build has no sandbox: run `causeway gather --local` on a gateway node")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "cw1_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789-_abcde";

    #[test]
    fn tokens_keys_and_known_secrets_are_removed() {
        let mut r = Redactor::default();
        r.know("c2VjcmV0LXdpcmVndWFyZC1wcml2YXRlLWtleQ==\n");
        r.know("short");
        let text = format!(
            "authorization: Bearer {TOKEN}\nkey c2VjcmV0LXdpcmVndWFyZC1wcml2YXRlLWtleQ== end\nshort stays\n\
             -----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n\
             -----BEGIN PRIVATE KEY-----\nMIIEvQ\nabc\n-----END PRIVATE KEY-----\nafter\n\
             -----BEGIN EC PRIVATE KEY-----\nxyz"
        );
        let out = r.redact(&text);
        assert_eq!(
            out,
            "authorization: Bearer cw1_<redacted>\nkey <redacted> end\nshort stays\n\
             -----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n<redacted>\nafter\n<redacted>"
        );
    }

    #[test]
    fn text_without_secrets_is_unchanged() {
        let r = Redactor::default();
        for text in ["", "cw1_", "cw1_short and more", "-----BEGIN ", "plain\ntext\n", "ünïcode cw1_x"] {
            assert_eq!(r.redact(text), text);
        }
    }

    #[test]
    fn credentials_and_key_files_teach_the_redactor() {
        let dir = std::env::temp_dir().join(format!("causeway-gather-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("c1")).unwrap();
        let creds = causeway_broker_api::Credentials {
            broker_url: "https://192.0.2.1:7780".into(),
            ca_pem: None,
            kind: causeway_broker_api::CredentialKind::Admin,
            cluster_id: None,
            token: causeway_broker_api::Token("not-shaped-like-a-token-0123456789".into()),
        };
        creds.save(&dir.join("admin.json")).unwrap();
        std::fs::write(dir.join("c1/private.key"), "aGVsbG8td2lyZWd1YXJkLWtleS1ieXRlcy0wMTIzNDU2Nzg5\n")
            .unwrap();
        let mut r = Redactor::default();
        r.know_files_under(&dir);
        let out = r.redact(
            "t=not-shaped-like-a-token-0123456789 k=aGVsbG8td2lyZWd1YXJkLWtleS1ieXRlcy0wMTIzNDU2Nzg5",
        );
        assert_eq!(out, "t=<redacted> k=<redacted>");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_text_stream_round_trips_and_hostile_names_or_lengths_are_dropped() {
        let stream = format!(
            "{m} versions.txt 4\nv1.0{m} node/routes.txt 12\n10.2.0.0/16\n{m} ../../etc/passwd 2\nxx{m} a//b 1\nx{m} bad len\n{m} cut.txt 99\nshort",
            m = STREAM_MARKER
        );
        let files = parse_stream(&stream);
        assert_eq!(
            files,
            vec![
                ("versions.txt".to_owned(), "v1.0".to_owned()),
                ("node/routes.txt".to_owned(), "10.2.0.0/16\n".to_owned())
            ]
        );
        assert!(parse_stream("").is_empty());
        assert!(parse_stream("garbage without a marker").is_empty());
    }

    #[tokio::test]
    async fn on_kubernetes_pods_logs_events_and_each_gateway_nodes_pieces_are_gathered_redacted() {
        use causeway_deploy::testing::{Reply, Seen, client, list, not_found};
        use serde_json::json;
        let entry = |name: &str, body: &str| format!("{STREAM_MARKER} {name} {}\n{body}", body.len());
        let node_stream = entry("status.json", "{\"clusterId\":\"east\"}\n")
            + &entry("routes.txt", &format!("10.2.0.0/16 dev causeway0 proto 202 {TOKEN}\n"));
        let pod = |name: &str| json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}});
        let (kube, seen) = client(move |r: &Seen| match (r.method.as_str(), r.path()) {
            ("GET", "/api/v1/nodes") => Reply::Json(
                200,
                list(
                    "Node",
                    "v1",
                    vec![json!({"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": "gw-1", "labels": {"causeway.io/gateway": "true"}}})],
                ),
            ),
            ("GET", "/api/v1/namespaces/causeway-system/pods") if r.uri.contains("job-name") => {
                Reply::Json(200, list("Pod", "v1", vec![pod("causeway-gather-gw-1-abcde")]))
            }
            ("GET", "/api/v1/namespaces/causeway-system/pods") => {
                Reply::Json(200, list("Pod", "v1", vec![pod("causeway-gateway-x1")]))
            }
            ("GET", "/api/v1/namespaces/causeway-system/pods/causeway-gateway-x1/log") => {
                Reply::Text(200, format!("INFO gateway started with token {TOKEN}\n"))
            }
            ("GET", "/api/v1/namespaces/causeway-system/pods/causeway-gather-gw-1-abcde/log") => {
                Reply::Text(200, node_stream.clone())
            }
            ("GET", "/api/v1/namespaces/causeway-system/events") => {
                Reply::Json(200, list("Event", "v1", vec![]))
            }
            ("PATCH", p) if p.contains("/jobs/") => Reply::Json(200, r.body.clone()),
            ("GET", p) if p.contains("/jobs/") => Reply::Json(
                200,
                json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"}, "status": {"succeeded": 1}}),
            ),
            ("DELETE", _) => Reply::Json(200, causeway_deploy::testing::status(200, "", "")),
            _ => not_found("it"),
        });
        let out = std::env::temp_dir().join(format!("cw-gather-k8s-{}.tar.gz", std::process::id()));
        let mut b = Bundle::create(&out, Redactor::default()).unwrap();
        let settings = causeway_deploy::Settings::default();
        let d = std::time::Duration::from_millis(10);
        kubernetes(&mut b, &[("east".to_owned(), kube)], &settings, std::time::Duration::from_secs(5), d)
            .await
            .unwrap();
        let files = b.finish().unwrap();
        assert_eq!(
            files,
            [
                "clusters/east/pods.json",
                "clusters/east/logs/causeway-gateway-x1.log",
                "clusters/east/events.json",
                "clusters/east/nodes/gw-1/status.json",
                "clusters/east/nodes/gw-1/routes.txt",
            ]
        );
        let bytes = std::fs::read(&out).unwrap();
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
        let mut all = String::new();
        for entry in archive.entries().unwrap() {
            let mut e = entry.unwrap();
            std::io::Read::read_to_string(&mut e, &mut all).unwrap();
        }
        assert!(all.contains("proto 202") && all.contains("gateway started"), "{all}");
        assert!(!all.contains(TOKEN), "a token went into the bundle");
        let seen = seen.lock().unwrap();
        let job = seen
            .iter()
            .find(|r| r.method == "PATCH" && r.path().ends_with("/jobs/causeway-gather-gw-1"))
            .unwrap();
        assert_eq!(
            job.body["spec"]["template"]["spec"]["containers"][0]["command"],
            json!(["causeway", "gather", "--local", "--output", "-"])
        );
        assert!(
            seen.iter().any(|r| r.method == "DELETE" && r.path().ends_with("/jobs/causeway-gather-gw-1"))
        );
        std::fs::remove_file(&out).unwrap();
    }

    #[test]
    fn names_become_directories() {
        assert_eq!(slug("cluster-1 (standby)"), "cluster-1-standby");
        assert_eq!(slug("../etc"), "etc");
    }
}
