//! `causeway`: one binary for the broker and gateway daemons, the operator verbs and the
//! local sandbox. Every flag can also be set through its `CAUSEWAY_…` environment variable.

#[cfg(feature = "sandbox")]
use causeway_lab::{
    bench, bench_attack, bench_dataplane, bench_failover, bench_policy, bench_services, bench_translation,
    sandbox,
};
mod confirm;
mod diagnose;
mod dns;
mod gather;
mod kubernetes;
mod policy;
#[cfg(test)]
mod reference;
mod services;
mod setup;
mod show;
mod status;
mod telemetry;
mod tools;
mod verify;

use std::{net::IpAddr, path::PathBuf};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ipnetwork::IpNetwork;

#[derive(Parser)]
#[command(
    name = "causeway",
    version,
    about = "Joins Kubernetes clusters at layer 3: encrypted, policy-checked, fast"
)]
struct Cli {
    /// Log lines as text, or as one JSON object per line (for log collectors).
    #[arg(long, global = true, value_enum, env = "CAUSEWAY_LOG_FORMAT", default_value = "text")]
    log_format: telemetry::LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the broker (the cluster set's shared control plane).
    Broker(BrokerArgs),
    /// Run a gateway (on a gateway node of a cluster).
    Gateway(Box<GatewayArgs>),
    /// Remove what a restart-safe gateway leaves on its node when it stops: routes, tunnel
    /// device, pinned eBPF maps and links (run in the gateway's network namespace).
    Cleanup(CleanupArgs),
    /// Run a relay (STUN and the relay on one UDP port) on a node with a public address, for
    /// gateways that cannot reach each other directly; every registration is checked with the
    /// broker. Gateways use it with `--relay ADDR:PORT` (all of a set's gateways the same one).
    Relay(RelayArgs),
    /// Run the route agent (on the cluster's other nodes): remote clusters' prefixes through one
    /// nexthop that follows the active gateway.
    RouteAgent(RouteAgentArgs),
    /// Set up a broker: certificates, the admin credential and the broker-info file.
    DeployBroker(setup::DeployBrokerArgs),
    /// Register a cluster with the broker and obtain its own credential.
    Join(setup::JoinArgs),
    /// Print or write the Kubernetes manifests (CRDs, broker, member clusters).
    Manifests(kubernetes::ManifestsArgs),
    /// Remove what `join --kubeconfig` (and with --broker, `deploy-broker --kubeconfig`) created
    /// from a Kubernetes cluster.
    Uninstall(kubernetes::UninstallArgs),
    /// Rotate or revoke credentials.
    Credentials {
        #[command(subcommand)]
        command: setup::CredentialsCmd,
    },
    /// Show the cluster set's state.
    Show(show::ShowArgs),
    /// The cluster set's tunnels, as every active gateway reports them through the broker
    /// (from anywhere the broker is reachable); `--wait` until all are up.
    Status(status::StatusArgs),
    /// Check gateway nodes for what breaks cross-cluster networking (kernel features,
    /// forwarding, tunnels, firewall rules on the WireGuard port, MTU toward every peer, CIDR
    /// overlaps and shadowing routes, clock skew against the broker) and say what to do. Every
    /// gateway of the local sandbox, or with `--local` the node it runs on; fails on any FAIL.
    Diagnose(diagnose::DiagnoseArgs),
    /// Write a support bundle (.tar.gz): versions, the broker's records, every gateway's
    /// status, metrics and log, eBPF map dumps, and each node's links, routes and firewall;
    /// tokens and private keys redacted.
    Gather(gather::GatherArgs),
    /// Cluster-set DNS: answers `clusterset.local` (MCS DNS specification) for this cluster
    /// from the broker's service imports, leaving out clusters its gateways cannot reach.
    Dns(dns::DnsArgs),
    /// Export a service of this cluster to the cluster set (`<name>.<namespace>.svc.clusterset.local`).
    Export(services::ExportArgs),
    /// Withdraw an exported service.
    Unexport(services::UnexportArgs),
    /// Settings of the whole cluster set (admin credential).
    ClusterSet(services::ClusterSetArgs),
    /// Cluster-set network policy (admin credential).
    Policy {
        #[command(subcommand)]
        command: policy::PolicyCmd,
    },
    /// Benchmarks (on loopback and local namespaces only).
    #[cfg(feature = "sandbox")]
    Benchmark {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// Print a shell completion script, e.g. `causeway completion bash >
    /// /etc/bash_completion.d/causeway`.
    Completion {
        /// The shell the script is for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Remove a cluster's records from the broker and revoke its credentials; the other
    /// gateways drop its tunnel and routes.
    Leave {
        /// The cluster's own credentials, or the admin's (default: the local sandbox's admin).
        #[arg(long, env = "CAUSEWAY_CREDENTIALS")]
        credentials: Option<PathBuf>,
        /// The cluster that leaves.
        #[arg(long, env = "CAUSEWAY_CLUSTER_ID")]
        cluster_id: String,
        /// Do not ask for confirmation (needed when stdin is not a terminal).
        #[arg(long, short)]
        yes: bool,
    },
    /// End-to-end check of a running cluster set: every pod reaches every other cluster's
    /// pod, and an exported service from every cluster; prints the matrix and fails naming
    /// every pair that did not work. Kubernetes (`--context` per member cluster: short-lived
    /// test pods, a Service exported by each, a Job per check), or the local sandbox.
    Verify(verify::VerifyArgs),
    /// A local cluster set built from network namespaces (needs root).
    #[cfg(feature = "sandbox")]
    Sandbox {
        #[command(subcommand)]
        command: sandbox::SandboxCmd,
    },
    /// Test tools used by the sandbox and the end-to-end tests.
    #[command(hide = true)]
    Debug {
        #[command(subcommand)]
        command: DebugCmd,
    },
}

#[cfg(feature = "sandbox")]
#[derive(Subcommand)]
enum BenchCmd {
    /// Propagation of one change to every watcher of a large cluster set, and broker memory.
    Broker(bench::BrokerBenchArgs),
    /// Pod-to-pod throughput, packet rate and latency: raw veth vs Causeway vs wireguard-go.
    Dataplane(bench_dataplane::DataplaneBenchArgs),
    /// A TCP stream's rate while the receiving gateway's WireGuard port is flooded with
    /// spoofed data and forged handshake messages, against its undisturbed rate.
    Attack(bench_attack::AttackBenchArgs),
    /// Forwarding cost of 10 … 100,000 policy rules: Causeway's eBPF tables vs iptables.
    Policy(bench_policy::PolicyBenchArgs),
    /// Traffic lost when a cluster's active gateway is killed, cut off or has its WireGuard
    /// dropped, and when it comes back.
    Failover(bench_failover::FailoverBenchArgs),
    /// Cluster-set DNS answers per second and latency against dnsmasq with a static zone, and
    /// the connection rate to a ClusterSetIP against the same backend's own address.
    Services(bench_services::ServicesBenchArgs),
    /// Overlap mode's prefix translation on vs off on one topology: throughput, packet rate
    /// and latency at the real and at the global addresses, rounds interleaved.
    Translation(bench_translation::TranslationBenchArgs),
}

#[derive(Subcommand)]
enum DebugCmd {
    /// Install N synthetic policy rules behind `policy_eth` on an interface's egress and
    /// switch enforcement with `on`/`off` lines on stdin (the policy benchmark's helper).
    #[cfg(feature = "sandbox")]
    PolicyHold {
        #[arg(long)]
        interface: String,
        #[arg(long)]
        entries: u32,
        #[arg(long)]
        from_cidr: ipnetwork::Ipv4Network,
        #[arg(long)]
        to_cidr: ipnetwork::Ipv4Network,
    },
    /// A TCP service: every connection gets `--banner` as its first line, then an echo of
    /// what it sends (the sandbox's `serve`, and the ClusterSetIP tests: the banner says which
    /// backend answered).
    TcpEcho {
        #[arg(long)]
        listen: String,
        #[arg(long)]
        banner: String,
    },
    /// Receive one TCP stream; print its length and SHA-256.
    TcpSink {
        #[arg(long)]
        listen: String,
    },
    /// PUT one raw record (JSON `{"kind": …, "spec": …}` on stdin) to the broker, e.g. to
    /// register a site that runs stock WireGuard.
    Put {
        #[arg(long, env = "CAUSEWAY_CREDENTIALS")]
        credentials: Option<PathBuf>,
    },
    /// Send hostile datagrams (garbage, forged data, handshake floods) to a WireGuard port.
    UdpFlood {
        #[arg(long)]
        target: String,
        #[arg(long)]
        kind: String,
        #[arg(long, default_value_t = 1000)]
        count: u32,
        /// Send runs of this many equal-size datagrams, each run in one `UDP_SEGMENT` send
        /// (what a local sender's GSO run looks like on the wire side of a veth).
        #[arg(long)]
        gso: Option<u16>,
        /// Send from this IPv4 ADDR:PORT instead of our own (a raw socket: the underlay is
        /// hostile, and any source can be forged).
        #[arg(long)]
        spoof_source: Option<std::net::SocketAddrV4>,
        /// Pace the datagrams at this many per second (default: as fast as the socket takes
        /// them).
        #[arg(long)]
        rate: Option<u32>,
        /// With `--kind replay`: the datagram to send again and again, as raw bytes in a file
        /// (e.g. a genuine handshake initiation captured on the underlay).
        #[arg(long)]
        replay: Option<PathBuf>,
    },
    /// Echo UDP datagrams back to their sender.
    UdpEcho {
        #[arg(long)]
        listen: String,
    },
    /// Send datagrams to an echo server and check they come back intact.
    UdpPing {
        #[arg(long)]
        connect: String,
        #[arg(long, default_value_t = 8000)]
        size: usize,
        #[arg(long, default_value_t = 10)]
        count: u32,
    },
    /// Query a DNS server for one name at a rate (0: as fast as answers come back, with
    /// `--window` queries in flight); print how many were answered and the latency (JSON).
    DnsLoad {
        #[arg(long)]
        server: String,
        #[arg(long)]
        name: String,
        /// Queries per second (0: closed loop).
        #[arg(long, default_value_t = 0)]
        rate: u32,
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
        /// Queries in flight in closed-loop mode.
        #[arg(long, default_value_t = 64)]
        window: u32,
    },
    /// Connect to a TCP server over and over (connect, read its first line, close) for a
    /// while; print the rate and the time per connection (JSON).
    TcpConnectRate {
        #[arg(long)]
        connect: String,
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
    },
    /// Send sequence-numbered datagrams at a steady rate (the other end: udp-sequence-sink).
    UdpStream {
        #[arg(long)]
        connect: String,
        /// Datagrams per second.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// Receive a sequence stream for a while; print what arrived, what was lost and the longest
    /// gap between arrivals (JSON).
    UdpSequenceSink {
        #[arg(long)]
        listen: String,
        #[arg(long)]
        secs: f64,
    },
    /// Send N bytes over TCP; print their length and SHA-256.
    TcpSource {
        #[arg(long)]
        connect: String,
        #[arg(long)]
        bytes: u64,
        /// Pace the sending to this many megabits per second (unset: as fast as it goes).
        #[arg(long)]
        mbps: Option<f64>,
    },
}

#[derive(clap::Args)]
struct BrokerArgs {
    /// Address to listen on.
    #[arg(long, env = "CAUSEWAY_BROKER_LISTEN", default_value = "0.0.0.0:7780")]
    listen: String,
    /// Addresses gateways reach this broker at (repeatable; the listen address counts too):
    /// no member cluster may claim a prefix covering them.
    #[arg(long = "advertise-address", env = "CAUSEWAY_BROKER_ADVERTISE_ADDRESSES", value_delimiter = ',')]
    advertise_addresses: Vec<std::net::IpAddr>,
    /// Directory of the embedded store and the TLS certificate (see `deploy-broker`).
    #[arg(long, env = "CAUSEWAY_BROKER_DATA_DIR", default_value = "/var/lib/causeway-broker")]
    data_dir: PathBuf,
    /// Serve plain HTTP (development only: tokens then cross the network in the clear).
    #[arg(long)]
    plain_http: bool,
    /// UDP address of the STUN responder that tells gateways their address beyond a NAT (the
    /// reflexive candidate they publish): `auto` (0.0.0.0:3478, skipped with a warning when
    /// another process holds it, as a second broker on one host does), ADDR:PORT (an error if
    /// it cannot be bound), or `off`.
    #[arg(long, env = "CAUSEWAY_BROKER_STUN_LISTEN", default_value = "auto")]
    stun_listen: String,
    /// Serve Prometheus metrics, `/healthz` and `/readyz` (the store answers) over plain HTTP
    /// here: `auto` (127.0.0.1:9466, skipped with a warning when taken, as by a second broker
    /// on one host), ADDR:PORT (an error if it cannot be bound; the broker Deployment uses
    /// the pod's address), or `off`. `/healthz` and `/readyz` are on the API port too.
    #[arg(long, env = "CAUSEWAY_BROKER_METRICS_LISTEN", default_value = "auto")]
    metrics_listen: String,
    /// Seconds an endpoint record lives without a heartbeat from its gateway.
    #[arg(long, env = "CAUSEWAY_ENDPOINT_LEASE_SECONDS", default_value_t = 30)]
    endpoint_lease_seconds: u64,
    /// Connections served at once; past it new ones are closed.
    #[arg(long, env = "CAUSEWAY_BROKER_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,
    /// Seconds a connection may take to send a request's head (an idle connection that sends
    /// nothing is closed when they run out; requests in flight are not affected).
    #[arg(long, env = "CAUSEWAY_BROKER_HEADER_READ_TIMEOUT_SECONDS", default_value_t = 30)]
    header_read_timeout_seconds: u64,
    /// TLS certificate (PEM) to serve (default: server.pem in --data-dir).
    #[arg(long, env = "CAUSEWAY_BROKER_TLS_CERT_FILE", requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert-file (default: server.key in --data-dir).
    #[arg(long, env = "CAUSEWAY_BROKER_TLS_KEY_FILE", requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
    /// Credentials to register at startup, by token hash (written by `deploy-broker
    /// --kubeconfig` into the broker's Secret).
    #[arg(long, env = "CAUSEWAY_BROKER_BOOTSTRAP_FILE")]
    bootstrap_file: Option<PathBuf>,
    /// Mirror the ClusterSetPolicy objects of the cluster this broker runs in into its policy
    /// rules (in a pod of the broker Deployment). Rules made with `causeway policy apply` stay.
    #[arg(long, env = "CAUSEWAY_KUBERNETES_POLICIES")]
    kubernetes_policies: bool,
    #[command(flatten)]
    store: setup::StoreArgs,
}

#[derive(clap::Args)]
struct RouteAgentArgs {
    /// This cluster's credentials file, written by `causeway join`.
    #[arg(long, env = "CAUSEWAY_BROKER_CREDENTIALS")]
    broker_credentials: PathBuf,
    /// Follow the `causeway-gateway` Lease to find the active gateway (its node's InternalIP)
    /// instead of the cluster's active endpoint record.
    #[arg(long, env = "CAUSEWAY_KUBERNETES")]
    kubernetes: bool,
    /// Namespace of the gateway Lease (with --kubernetes).
    #[arg(long, env = "CAUSEWAY_NAMESPACE", default_value = "causeway-system")]
    namespace: String,
    /// UDP port of the gateway nodes' probe responders: every 100 ms this node asks each
    /// gateway node whether it forwards, and moves its nexthop off one that stops answering
    /// without waiting for the control plane (0: no probes; follow the control plane alone).
    #[arg(long, env = "CAUSEWAY_NODE_PROBE_PORT", default_value_t = causeway_gateway::node_probe::DEFAULT_PORT)]
    node_probe_port: u16,
    /// Serve `/metrics` and `/healthz` here (TCP ADDR:PORT, or off).
    #[arg(long, env = "CAUSEWAY_METRICS_LISTEN", default_value = "127.0.0.1:9465")]
    metrics_listen: String,
    #[command(flatten)]
    services: ServiceArgs,
}

/// ClusterSetIP translation on this node: the route agent's on worker nodes, the gateway's on
/// gateway nodes.
#[derive(clap::Args)]
struct ServiceArgs {
    /// Translate ClusterSetIPs for the processes of this cgroup (v2) directory, e.g.
    /// /sys/fs/cgroup for every pod of the node: connections to a ClusterSetIP port go to a
    /// backend in a cluster the gateways reach, chosen at connect(). `off`: no translation.
    #[arg(long, env = "CAUSEWAY_SERVICE_CGROUP", default_value = "off")]
    service_cgroup: String,
    /// `local`: a ClusterSetIP served by this cluster stays in it; `none`: every serving
    /// cluster gets connections.
    #[arg(long, env = "CAUSEWAY_SERVICE_AFFINITY", default_value = "local")]
    service_affinity: causeway_gateway::services::Affinity,
    /// Where the socket programs' maps and links are pinned (a bpffs; mounted if missing), so
    /// that they keep translating while the process restarts (`causeway cleanup` removes
    /// them). `off`: they are detached when the process exits.
    #[arg(long, env = "CAUSEWAY_SERVICE_BPF_DIR", default_value = DEFAULT_SERVICE_BPF_DIR)]
    service_bpf_dir: String,
}

impl ServiceArgs {
    fn config(&self) -> Option<causeway_gateway::services::ServiceConfig> {
        match self.service_cgroup.as_str() {
            "off" | "" => None,
            path => Some(causeway_gateway::services::ServiceConfig {
                cgroup: PathBuf::from(path),
                affinity: self.service_affinity,
                pins: match self.service_bpf_dir.as_str() {
                    "off" | "" => None,
                    dir => Some(PathBuf::from(dir)),
                },
            }),
        }
    }
}

/// Where the socket programs pin their state by default.
const DEFAULT_SERVICE_BPF_DIR: &str = "/sys/fs/bpf/causeway-services";

#[derive(clap::Args)]
struct GatewayArgs {
    /// This cluster's credentials file, written by `causeway join`.
    #[arg(long, env = "CAUSEWAY_BROKER_CREDENTIALS")]
    broker_credentials: PathBuf,
    /// This cluster's id (default: the one in the credentials file, which it must match).
    #[arg(long, env = "CAUSEWAY_CLUSTER_ID")]
    cluster_id: Option<String>,
    /// Learn this node's facts from the Kubernetes API (in a pod of the gateway DaemonSet):
    /// addresses and gateway label from the Node, pod and service CIDRs by discovery (the flags
    /// below override it), active/standby from the `causeway-gateway` Lease; and publish the
    /// cluster's ServiceExports while active.
    #[arg(long, env = "CAUSEWAY_KUBERNETES")]
    kubernetes: bool,
    /// Namespace of the gateway Lease (with --kubernetes).
    #[arg(long, env = "CAUSEWAY_NAMESPACE", default_value = "causeway-system")]
    namespace: String,
    /// Pod CIDR of this cluster (repeatable).
    #[arg(
        long = "pod-cidr",
        env = "CAUSEWAY_POD_CIDRS",
        value_delimiter = ',',
        required_unless_present = "kubernetes"
    )]
    pod_cidrs: Vec<IpNetwork>,
    /// Service CIDR of this cluster (repeatable).
    #[arg(long = "service-cidr", env = "CAUSEWAY_SERVICE_CIDRS", value_delimiter = ',')]
    service_cidrs: Vec<IpNetwork>,
    /// This node's name (default: the kernel hostname).
    #[arg(long, env = "CAUSEWAY_HOSTNAME")]
    hostname: Option<String>,
    /// Address of this node that other gateways can reach (repeatable).
    #[arg(
        long = "node-ip",
        env = "CAUSEWAY_NODE_IPS",
        value_delimiter = ',',
        required_unless_present = "kubernetes"
    )]
    node_ips: Vec<IpAddr>,
    /// Public (NATed) address of this node, if any (repeatable).
    #[arg(long = "public-ip", env = "CAUSEWAY_PUBLIC_IPS", value_delimiter = ',')]
    public_ips: Vec<IpAddr>,
    /// Cable backend.
    #[arg(long, env = "CAUSEWAY_CABLE", default_value = "wireguard")]
    cable: String,
    /// Tunnel device name.
    #[arg(long, env = "CAUSEWAY_DEVICE", default_value = "causeway0")]
    device: String,
    /// UDP port of the tunnel (WireGuard), on every address of the node.
    #[arg(long, env = "CAUSEWAY_LISTEN_PORT", default_value_t = 51820)]
    listen_port: u16,
    /// MTU of the underlay; the tunnel gets this minus 80.
    #[arg(long, env = "CAUSEWAY_UNDERLAY_MTU", default_value_t = 1500)]
    underlay_mtu: u16,
    /// Keys and cached records.
    #[arg(long, env = "CAUSEWAY_STATE_DIR", default_value = "/var/lib/causeway")]
    state_dir: PathBuf,
    /// Unix socket (0600) serving `/status`, `/metrics` and the health checks to `causeway
    /// show connections`, `diagnose` and `gather` on this node.
    #[arg(long, env = "CAUSEWAY_STATUS_SOCKET", default_value = "/run/causeway/gateway.sock")]
    status_socket: PathBuf,
    /// Serve Prometheus metrics and `/healthz` on this TCP address ("off" to serve them only
    /// on the status socket). Loopback by default: the DaemonSet sets the node's own address
    /// (`$(CAUSEWAY_NODE_IP):9464`), never every interface, so the underlay cannot scrape it.
    #[arg(long, env = "CAUSEWAY_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    metrics_listen: String,
    /// Underlay interface to guard with XDP: only well-formed WireGuard messages from known
    /// peers (and rate-limited handshakes) reach the WireGuard port. Unset: no guard.
    #[arg(long, env = "CAUSEWAY_UPLINK")]
    uplink: Option<String>,
    /// Where the uplink guard runs: XDP (drops before the kernel allocates anything; for a
    /// NIC), TC ingress (for a veth, where XDP makes the peer segment every GSO run), or auto
    /// (TC on a veth, XDP otherwise).
    #[arg(long, env = "CAUSEWAY_UPLINK_HOOK", value_enum, default_value = "auto")]
    uplink_hook: UplinkHookArg,
    /// Seconds between heartbeats to the broker (keep it well under the broker's lease).
    #[arg(long, env = "CAUSEWAY_HEARTBEAT_SECONDS", default_value_t = 10)]
    heartbeat_seconds: u64,
    /// Do not serve the WireGuard UAPI socket (/var/run/wireguard/<device>.sock, for `wg show`).
    #[arg(long, env = "CAUSEWAY_NO_UAPI")]
    no_uapi: bool,
    /// Where the eBPF maps and program links are pinned (a bpffs; mounted if missing). A
    /// restart finds them there, with the persistent tunnel device and its routes, and carries
    /// on: stopping the gateway does not stop the data plane (`causeway cleanup` does).
    #[arg(long, env = "CAUSEWAY_BPF_DIR", default_value = DEFAULT_BPF_DIR)]
    bpf_dir: PathBuf,
    /// This gateway's role without --kubernetes (where the Lease decides): the cluster set
    /// routes through the active gateway and keeps warm tunnels to the standbys.
    #[arg(long, env = "CAUSEWAY_ROLE", value_enum, default_value = "active", conflicts_with = "kubernetes")]
    role: Role,
    /// Interfaces that carry this cluster's traffic to the gateway (repeatable): packets for
    /// remote clusters arriving there are handed straight to the tunnel device by eBPF,
    /// skipping the kernel's forwarding path (netfilter and conntrack included). Unset: the
    /// kernel routes them into the tunnel.
    #[arg(long = "cluster-interface", env = "CAUSEWAY_CLUSTER_INTERFACES", value_delimiter = ',')]
    cluster_interfaces: Vec<String>,
    /// This gateway's rank among its cluster's gateways, published in its endpoint record
    /// (higher first): the standby that takes over when the active one is gone.
    #[arg(long, env = "CAUSEWAY_PRIORITY", default_value_t = 0)]
    priority: u32,
    /// Where this gateway tells its cluster's nodes (route agents) whether it forwards: UDP
    /// ADDR:PORT, or off. Best on the node's address inside the cluster (the uplink faces the
    /// underlay); the route agents' --node-probe-port must match.
    #[arg(long, env = "CAUSEWAY_NODE_PROBE_LISTEN", default_value = "0.0.0.0:51821")]
    node_probe_listen: String,
    /// The STUN responder that tells this gateway its address beyond a NAT (asked from the
    /// WireGuard socket; published as its reflexive candidate): `auto` (the broker's host,
    /// port 3478), `off`, or HOST:PORT.
    #[arg(long, env = "CAUSEWAY_STUN_SERVER", default_value = "auto")]
    stun_server: String,
    /// The relay this gateway registers with, so that peers no direct path reaches (both
    /// behind NATs that map every destination anew, or UDP blocked between them) reach it
    /// through it: `auto` (the STUN server, which the broker runs with its relay), `off`, or
    /// HOST:PORT (a `causeway relay` on a node with a public address; `--stun-server auto`
    /// then asks it too). The relay forwards WireGuard datagrams as they are: it never sees
    /// plaintext.
    #[arg(long, env = "CAUSEWAY_RELAY", default_value = "auto")]
    relay: String,
    /// Where UDP to the relay gets no answer (a site that blocks it), carry the relay's frames
    /// on a stream over the broker's HTTPS port instead, and try UDP again every 2 minutes:
    /// `auto` or `off`.
    #[arg(long, env = "CAUSEWAY_RELAY_OVER_HTTPS", default_value = "auto", value_parser = ["auto", "off"])]
    relay_over_https: String,
    /// I/O threads of the tunnel, each with its own device queue and UDP socket; the kernel
    /// keeps every flow on one of them (0: one per CPU, up to 64).
    #[arg(long, env = "CAUSEWAY_TUNNEL_LANES", default_value_t = 0)]
    tunnel_lanes: usize,
    /// Test hooks on the status socket (`/debug/hold-daemon?secs=N`); sandbox builds only.
    #[cfg(feature = "sandbox")]
    #[arg(long, hide = true)]
    debug_hooks: bool,
    /// Pin nothing and remove the tunnel device, routes and programs on exit (the data plane
    /// lives exactly as long as the process).
    #[arg(long, env = "CAUSEWAY_EPHEMERAL", conflicts_with = "bpf_dir")]
    ephemeral: bool,
    /// The gateway node's pods reach ClusterSetIPs through the gateway's socket programs (no
    /// route agent runs there).
    #[command(flatten)]
    services: ServiceArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Role {
    Active,
    Standby,
}

/// Where a gateway pins its eBPF state by default (the DaemonSet mounts the host's bpffs).
const DEFAULT_BPF_DIR: &str = "/sys/fs/bpf/causeway";

#[derive(clap::Args)]
struct CleanupArgs {
    /// The gateway's tunnel device.
    #[arg(long, env = "CAUSEWAY_DEVICE", default_value = "causeway0")]
    device: String,
    /// The gateway's pin directory.
    #[arg(long, env = "CAUSEWAY_BPF_DIR", default_value = DEFAULT_BPF_DIR)]
    bpf_dir: PathBuf,
    /// The socket programs' pin directory (ClusterSetIP translation, on any node).
    #[arg(long, env = "CAUSEWAY_SERVICE_BPF_DIR", default_value = DEFAULT_SERVICE_BPF_DIR)]
    service_bpf_dir: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let log = cli.log_format;
    match cli.command {
        Cmd::Broker(a) => {
            telemetry::init("info", log);
            runtime()?.block_on(broker(a))
        }
        Cmd::Gateway(a) => {
            telemetry::init("info", log);
            runtime()?.block_on(gateway(*a))
        }
        Cmd::Cleanup(a) => {
            telemetry::init("info", log);
            runtime()?.block_on(async {
                causeway_gateway::daemon::cleanup(&a.device, &[&a.bpf_dir, &a.service_bpf_dir])
                    .await
                    .context("cleanup failed")
            })?;
            eprintln!(
                "removed {}, its routes and the pins under {} and {}",
                a.device,
                a.bpf_dir.display(),
                a.service_bpf_dir.display()
            );
            Ok(())
        }
        Cmd::Relay(a) => {
            telemetry::init("info", log);
            runtime()?.block_on(relay(a))
        }
        Cmd::RouteAgent(a) => {
            telemetry::init("info", log);
            runtime()?.block_on(route_agent(a))
        }
        Cmd::Show(a) => {
            telemetry::init("warn", log);
            runtime()?.block_on(show::run(a))
        }
        Cmd::Status(a) => {
            telemetry::init("warn", log);
            runtime()?.block_on(status::run(a))
        }
        Cmd::Diagnose(a) => {
            telemetry::init("warn", log);
            runtime()?.block_on(diagnose::run(a))
        }
        Cmd::Gather(a) => {
            telemetry::init("warn", log);
            runtime()?.block_on(gather::run_gather(a))
        }
        Cmd::Dns(a) => {
            // hickory-server logs every query at info.
            telemetry::init("info,hickory_server=warn,hickory_net=warn,hickory_proto=warn", log);
            runtime()?.block_on(dns::run(a, shutdown_signal()))
        }
        Cmd::Export(a) => {
            telemetry::init("warn", log);
            runtime()?.block_on(services::export(a))
        }
        Cmd::Unexport(a) => {
            telemetry::init("warn", log);
            runtime()?.block_on(services::unexport(a))
        }
        Cmd::ClusterSet(a) => {
            telemetry::init("warn", log);
            runtime()?.block_on(services::cluster_set(a))
        }
        Cmd::Policy { command } => {
            telemetry::init("warn", log);
            runtime()?.block_on(policy::run(command))
        }
        #[cfg(feature = "sandbox")]
        Cmd::Benchmark { what: BenchCmd::Dataplane(a) } => {
            telemetry::init("warn", log);
            bench_dataplane::run(a)
        }
        #[cfg(feature = "sandbox")]
        Cmd::Benchmark { what: BenchCmd::Attack(a) } => {
            telemetry::init("warn", log);
            bench_attack::run(a)
        }
        #[cfg(feature = "sandbox")]
        Cmd::Benchmark { what: BenchCmd::Policy(a) } => {
            telemetry::init("warn", log);
            bench_policy::run(a)
        }
        #[cfg(feature = "sandbox")]
        Cmd::Benchmark { what: BenchCmd::Failover(a) } => {
            telemetry::init("warn", log);
            bench_failover::run(a)
        }
        #[cfg(feature = "sandbox")]
        Cmd::Benchmark { what: BenchCmd::Services(a) } => {
            telemetry::init("warn", log);
            bench_services::run(a)
        }
        #[cfg(feature = "sandbox")]
        Cmd::Benchmark { what: BenchCmd::Translation(a) } => {
            telemetry::init("warn", log);
            bench_translation::run(a)
        }
        #[cfg(feature = "sandbox")]
        Cmd::Benchmark { what: BenchCmd::Broker(a) } => {
            telemetry::init("warn", log);
            runtime()?.block_on(bench::broker(a))
        }
        Cmd::DeployBroker(a) => {
            telemetry::init("warn", log);
            setup::deploy_broker(a)
        }
        Cmd::Manifests(a) => kubernetes::manifests(a),
        Cmd::Uninstall(a) => {
            telemetry::init("warn", log);
            runtime()?.block_on(kubernetes::uninstall(a))
        }
        Cmd::Join(a) => {
            telemetry::init("warn", log);
            runtime()?.block_on(setup::join(a))
        }
        Cmd::Credentials { command } => {
            telemetry::init("warn", log);
            runtime()?.block_on(setup::credentials(command))
        }
        Cmd::Completion { shell } => {
            completion(shell, &mut std::io::stdout());
            Ok(())
        }
        Cmd::Leave { credentials, cluster_id, yes } => {
            telemetry::init("warn", log);
            confirm::confirm(
                yes,
                &format!(
                    "remove cluster {cluster_id}'s records from the broker and revoke its credentials (every other cluster drops its tunnel and routes)"
                ),
            )?;
            let creds = setup::operator_credentials(credentials)?;
            runtime()?.block_on(async {
                let client = causeway_broker_api::BrokerClient::from_credentials(&creds)?;
                let removed = client.delete_cluster(&cluster_id).await?;
                println!(
                    "removed {} record(s) of cluster {cluster_id} and revoked its credentials",
                    removed.len()
                );
                Ok(())
            })
        }
        Cmd::Verify(a) => {
            telemetry::init("warn", log);
            runtime()?.block_on(verify::run(a))
        }
        #[cfg(feature = "sandbox")]
        Cmd::Sandbox { command } => {
            telemetry::init("warn", log);
            sandbox::run(command)
        }
        Cmd::Debug { command } => match command {
            DebugCmd::TcpSink { listen } => tools::tcp_sink(&listen),
            DebugCmd::TcpEcho { listen, banner } => tools::tcp_echo(&listen, &banner),
            DebugCmd::TcpSource { connect, bytes, mbps } => tools::tcp_source(&connect, bytes, mbps),
            DebugCmd::UdpEcho { listen } => tools::udp_echo(&listen),
            DebugCmd::UdpStream { connect, rate, secs, size } => {
                tools::udp_stream(&connect, rate, secs, size)
            }
            DebugCmd::UdpSequenceSink { listen, secs } => tools::udp_sequence_sink(&listen, secs),
            #[cfg(feature = "sandbox")]
            DebugCmd::PolicyHold { interface, entries, from_cidr, to_cidr } => {
                telemetry::init("warn", log);
                bench_policy::hold(&interface, entries, from_cidr, to_cidr)
            }
            DebugCmd::UdpFlood { target, kind, count, gso, spoof_source, rate, replay } => {
                let replay = match (kind.as_str(), replay) {
                    ("replay", Some(path)) => {
                        Some(std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?)
                    }
                    ("replay", None) => anyhow::bail!("--kind replay needs --replay FILE"),
                    (_, Some(_)) => anyhow::bail!("--replay goes with --kind replay"),
                    (_, None) => None,
                };
                tools::udp_flood(&target, &kind, count, gso, spoof_source, rate, replay.as_deref())
            }
            DebugCmd::UdpPing { connect, size, count } => tools::udp_ping(&connect, size, count),
            DebugCmd::TcpConnectRate { connect, secs } => {
                let stats = tools::tcp_connect_rate(&connect, secs)?;
                println!("{}", serde_json::to_string(&stats)?);
                Ok(())
            }
            DebugCmd::DnsLoad { server, name, rate, secs, window } => {
                let stats = tools::dns_load(&server, &name, rate, secs, window)?;
                println!("{}", serde_json::to_string(&stats)?);
                Ok(())
            }
            DebugCmd::Put { credentials } => {
                telemetry::init("warn", log);
                let creds = setup::operator_credentials(credentials)?;
                let record: causeway_broker_api::Record =
                    serde_json::from_reader(std::io::stdin()).context("reading a record from stdin")?;
                runtime()?.block_on(async {
                    let client = causeway_broker_api::BrokerClient::from_credentials(&creds)?;
                    let obj = match &record {
                        causeway_broker_api::Record::Cluster(c) => client.put_cluster(c).await?,
                        causeway_broker_api::Record::Endpoint(e) => client.put_endpoint(e).await?,
                        causeway_broker_api::Record::Policy(p) => client.put_policy(p).await?,
                        causeway_broker_api::Record::PolicyDefault(d) => client.put_policy_default(d).await?,
                        causeway_broker_api::Record::ServiceExport(s) => client.put_service(s).await?,
                        causeway_broker_api::Record::ClusterSet(c) => client.put_cluster_set(c).await?,
                        causeway_broker_api::Record::ServiceImport(_) => anyhow::bail!(
                            "service imports are written by the broker alone (it merges the clusters' exports)"
                        ),
                    };
                    println!("{}", serde_json::to_string(&obj)?);
                    Ok(())
                })
            }
        },
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the tokio runtime")
}

#[derive(clap::Args)]
struct RelayArgs {
    /// UDP address to serve STUN and the relay on.
    #[arg(long, env = "CAUSEWAY_RELAY_LISTEN", default_value = "0.0.0.0:3478")]
    listen: String,
    /// A member cluster's credentials file: the relay asks the broker whether each
    /// registration is genuine (it holds no tokens itself).
    #[arg(long, env = "CAUSEWAY_BROKER_CREDENTIALS")]
    broker_credentials: PathBuf,
}

async fn relay(a: RelayArgs) -> anyhow::Result<()> {
    use causeway_broker::stun::{RelayAuth, StunCounters};
    let creds = causeway_broker_api::Credentials::load(&a.broker_credentials).map_err(anyhow::Error::msg)?;
    if creds.cluster_id.is_none() {
        anyhow::bail!("{} is not a cluster's credentials file", a.broker_credentials.display());
    }
    let client = causeway_broker_api::BrokerClient::from_credentials(&creds)?;
    let auth: RelayAuth = std::sync::Arc::new(move |r| {
        let client = client.clone();
        Box::pin(async move {
            match client.relay_check(&r.to_bytes()).await {
                Ok(genuine) => genuine,
                Err(e) => {
                    // Refused: the gateway retries every second until the broker answers.
                    tracing::warn!(error = %e, "could not ask the broker about a relay registration");
                    false
                }
            }
        })
    });
    let addr =
        listen_address(&a.listen).with_context(|| format!("--listen {:?} is not ADDR:PORT", a.listen))?;
    let counters = std::sync::Arc::new(StunCounters::default());
    let relay = causeway_broker::relay::Relay::new(auth, counters.clone());
    let bound = causeway_broker::stun::start(addr, counters, Some(relay))
        .await
        .with_context(|| format!("serving the relay on UDP {addr}"))?;
    tracing::info!(listen = %bound, broker = %creds.broker_url, "relay up");
    shutdown_signal().await;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}

async fn broker(a: BrokerArgs) -> anyhow::Result<()> {
    let cert = a.tls_cert_file.clone().unwrap_or_else(|| a.data_dir.join(setup::CERT_FILE));
    let key = a.tls_key_file.clone().unwrap_or_else(|| a.data_dir.join(setup::KEY_FILE));
    let tls = if a.plain_http {
        None
    } else if cert.exists() {
        Some(causeway_broker::tls::server_config(&cert, &key)?)
    } else {
        anyhow::bail!(
            "{} has no TLS certificate: run `causeway deploy-broker --local --data-dir {} --address <addr>` first \
             (or pass --plain-http for a development broker)",
            a.data_dir.display(),
            a.data_dir.display()
        );
    };
    std::fs::create_dir_all(&a.data_dir).with_context(|| format!("creating {}", a.data_dir.display()))?;
    let store = a.store.open(&a.data_dir).await?;
    tracing::info!(store = %a.store.describe(&a.data_dir), listen = %a.listen, "broker starting");
    let broker = causeway_broker::Broker::with_lease(
        store,
        std::time::Duration::from_secs(a.endpoint_lease_seconds.max(1)),
    )
    .await?;
    let listen_ip =
        a.listen.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()).filter(|ip| !ip.is_unspecified());
    broker.protect_addresses(a.advertise_addresses.iter().copied().chain(listen_ip));
    if let Some(path) = &a.bootstrap_file {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let file: causeway_broker::auth::BootstrapFile = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a bootstrap file", path.display()))?;
        for c in &file.credentials {
            broker.bootstrap(&c.token_sha256, &c.identity).await?;
        }
        tracing::info!(count = file.credentials.len(), "bootstrap credentials registered");
    }
    tokio::spawn(broker.clone().run_expiry());
    match a.stun_listen.as_str() {
        "off" | "" => {}
        "auto" => {
            let addr = std::net::SocketAddr::from(([0, 0, 0, 0], causeway_broker_api::stun::DEFAULT_PORT));
            if let Err(e) =
                causeway_broker::stun::start(addr, broker.relay().counters().clone(), Some(broker.relay()))
                    .await
            {
                tracing::warn!(%addr, error = %e, "no STUN responder: gateways behind NAT learn no reflexive address from this broker (set --stun-listen)");
            }
        }
        other => {
            let addr = listen_address(other)
                .with_context(|| format!("--stun-listen {other:?} is not ADDR:PORT, auto or off"))?;
            causeway_broker::stun::start(addr, broker.relay().counters().clone(), Some(broker.relay()))
                .await
                .with_context(|| format!("serving STUN on UDP {addr}"))?;
        }
    }
    match a.metrics_listen.as_str() {
        "off" | "" => {}
        "auto" => {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 9466));
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => drop(causeway_broker::metrics::serve(l, broker.clone())),
                Err(e) => tracing::warn!(%addr, error = %e, "no metrics server (set --metrics-listen)"),
            }
        }
        other => {
            let addr = listen_address(other)
                .with_context(|| format!("--metrics-listen {other:?} is not ADDR:PORT, auto or off"))?;
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("serving the broker's metrics on {addr}"))?;
            drop(causeway_broker::metrics::serve(l, broker.clone()));
        }
    }
    if a.kubernetes_policies {
        let client = causeway_deploy::connect(None, None).await?;
        let store = std::sync::Arc::new(kubernetes::BrokerPolicies(broker.clone()));
        tokio::spawn(causeway_deploy::policies::PolicyMirror::new(client, store).run());
        tracing::info!("mirroring this cluster's ClusterSetPolicy objects into the policy rules");
    }
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("listening on {} (is another broker running?)", a.listen))?;
    let limits = causeway_broker::Limits {
        max_connections: a.max_connections.max(1),
        header_read_timeout: std::time::Duration::from_secs(a.header_read_timeout_seconds.max(1)),
    };
    match tls {
        Some(tls) => causeway_broker::run_tls_with(listener, tls, broker, shutdown_signal(), limits).await,
        None => causeway_broker::run_with(listener, broker, shutdown_signal(), limits).await,
    }
    .context("serving the broker API")
}

/// `ADDR:PORT`, also with an unbracketed IPv6 address (what `$(NODE_IP):9464` gives in a pod
/// spec on an IPv6 node).
fn listen_address(s: &str) -> Option<std::net::SocketAddr> {
    s.parse().ok().or_else(|| {
        let (ip, port) = s.rsplit_once(':')?;
        Some(std::net::SocketAddr::new(ip.parse().ok()?, port.parse().ok()?))
    })
}

async fn route_agent(a: RouteAgentArgs) -> anyhow::Result<()> {
    let creds = causeway_broker_api::Credentials::load(&a.broker_credentials).map_err(anyhow::Error::msg)?;
    let Some(cluster_id) = creds.cluster_id.clone() else {
        anyhow::bail!("{} is not a cluster's credentials file", a.broker_credentials.display());
    };
    let client = causeway_broker_api::BrokerClient::from_credentials(&creds)?;
    let gateways = if a.kubernetes {
        let kube = causeway_deploy::connect(None, None).await?;
        Some(causeway_deploy::election::follow_active_gateway(
            kube,
            a.namespace,
            std::time::Duration::from_secs(1),
        ))
    } else {
        None
    };
    let probe_port = (a.node_probe_port != 0).then_some(a.node_probe_port);
    let report = match a.metrics_listen.as_str() {
        "off" | "" => None,
        addr => {
            let addr = listen_address(addr).with_context(|| {
                format!("--metrics-listen {addr:?} is not ADDR:PORT (IPv6: [ADDR]:PORT or ADDR:PORT) or off")
            })?;
            let (tx, rx) = tokio::sync::watch::channel((std::time::Instant::now(), Default::default()));
            causeway_gateway::agent::serve_agent_metrics(addr, rx)
                .await
                .with_context(|| format!("serving the route agent's metrics on {addr}"))?;
            Some(tx)
        }
    };
    let services = a.services.config();
    anyhow::ensure!(
        services.is_none() || probe_port.is_some(),
        "--service-cgroup needs the gateways' probe port (--node-probe-port) for their reachability"
    );
    causeway_gateway::agent::run(
        client,
        cluster_id,
        gateways,
        probe_port,
        services,
        report,
        shutdown_signal(),
    )
    .await
    .context("route agent failed")
}

async fn gateway(a: GatewayArgs) -> anyhow::Result<()> {
    let hostname = match a.hostname.clone() {
        Some(h) => h,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("reading the hostname; pass --hostname")?
            .trim()
            .to_owned(),
    };
    let broker = causeway_broker_api::Credentials::load(&a.broker_credentials).map_err(anyhow::Error::msg)?;
    let Some(own_id) = broker.cluster_id.clone() else {
        anyhow::bail!(
            "{} is not a cluster's credentials file; use the one `causeway join` wrote",
            a.broker_credentials.display()
        );
    };
    let cluster_id = a.cluster_id.clone().unwrap_or_else(|| own_id.clone());
    if cluster_id != own_id {
        anyhow::bail!(
            "--cluster-id {cluster_id} does not match the credentials, which are cluster {own_id}'s"
        );
    }
    let config = gateway_config(&a, broker.clone())?;
    if a.kubernetes {
        let client = causeway_deploy::connect(None, None).await?;
        let overrides = causeway_deploy::source::Overrides {
            cluster_id,
            pod_cidrs: a.pod_cidrs,
            service_cidrs: a.service_cidrs,
            node_ips: a.node_ips,
            public_ips: a.public_ips,
        };
        let publisher = causeway_broker_api::BrokerClient::from_credentials(&broker)?;
        let (source, services) =
            causeway_deploy::start_gateway_services(client, &hostname, &a.namespace, overrides, publisher);
        let result = causeway_gateway::run(config, source, shutdown_signal()).await;
        services.stop().await;
        return result.context("gateway failed");
    }
    let local = causeway_gateway::cluster::LocalCluster {
        cluster_id,
        pod_cidrs: a.pod_cidrs,
        service_cidrs: a.service_cidrs,
        hostname,
        private_ips: a.node_ips,
        public_ips: a.public_ips,
        active: a.role == Role::Active,
    };
    causeway_gateway::run(config, causeway_gateway::cluster::StaticSource(local), shutdown_signal())
        .await
        .context("gateway failed")
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum UplinkHookArg {
    Auto,
    Xdp,
    Tc,
}

fn gateway_config(
    a: &GatewayArgs,
    broker: causeway_broker_api::Credentials,
) -> anyhow::Result<causeway_gateway::GatewayConfig> {
    use causeway_gateway::cable::wireguard::relay_client::{RelayIo, StreamOpener};
    // A relay of its own (`causeway relay`) also answers STUN: with `--stun-server auto` the
    // gateway asks it, so the guard's one responder address passes both. The relay's frames
    // take the broker's HTTPS port only when the relay is the broker's.
    let own_relay = !matches!(a.relay.as_str(), "auto" | "off" | "");
    let relay_stream: Option<StreamOpener> = if a.relay_over_https == "auto" && !own_relay {
        let client = causeway_broker_api::BrokerClient::from_credentials(&broker)?;
        Some(std::sync::Arc::new(move || {
            let client = client.clone();
            Box::pin(async move {
                let io = client.relay_stream().await.map_err(std::io::Error::other)?;
                Ok(Box::new(io) as Box<dyn RelayIo>)
            })
        }))
    } else {
        None
    };
    Ok(causeway_gateway::GatewayConfig {
        cable: a.cable.clone(),
        device: a.device.clone(),
        listen_port: a.listen_port,
        underlay_mtu: a.underlay_mtu,
        key_file: a.state_dir.join("private.key"),
        state_dir: a.state_dir.clone(),
        status_socket: a.status_socket.clone(),
        uapi: !a.no_uapi,
        heartbeat: std::time::Duration::from_secs(a.heartbeat_seconds.max(1)),
        uplink: a.uplink.clone(),
        uplink_hook: match a.uplink_hook {
            UplinkHookArg::Auto => None,
            UplinkHookArg::Xdp => Some(causeway_gateway::UplinkHook::Xdp),
            UplinkHookArg::Tc => Some(causeway_gateway::UplinkHook::Tc),
        },
        bpf_dir: (!a.ephemeral).then(|| a.bpf_dir.clone()),
        cluster_interfaces: a.cluster_interfaces.clone(),
        lanes: a.tunnel_lanes,
        priority: a.priority,
        node_probe_listen: match a.node_probe_listen.as_str() {
            "off" | "" => None,
            addr => Some(listen_address(addr).with_context(|| {
                format!(
                    "--node-probe-listen {addr:?} is not ADDR:PORT (IPv6: [ADDR]:PORT or ADDR:PORT) or off"
                )
            })?),
        },
        #[cfg(feature = "sandbox")]
        debug_hooks: a.debug_hooks,
        #[cfg(not(feature = "sandbox"))]
        debug_hooks: false,
        services: a.services.config().map(|mut c| {
            if a.ephemeral {
                c.pins = None;
            }
            c
        }),
        metrics_listen: match a.metrics_listen.as_str() {
            "off" | "" => None,
            addr => Some(listen_address(addr).with_context(|| {
                format!("--metrics-listen {addr:?} is not ADDR:PORT (IPv6: [ADDR]:PORT or ADDR:PORT) or off")
            })?),
        },
        stun_server: if own_relay && a.stun_server == "auto" {
            stun_server(&a.relay, &broker.broker_url)?
        } else {
            stun_server(&a.stun_server, &broker.broker_url)?
        },
        relay: match a.relay.as_str() {
            "off" | "" => None,
            "auto" => stun_server(&a.stun_server, &broker.broker_url)?,
            other => stun_server(other, &broker.broker_url)?,
        }
        .map(|server| causeway_gateway::cable::wireguard::relay_client::RelaySettings {
            server,
            token_sha256: causeway_broker_api::relay::token_sha256(&broker.token.0),
            stream: relay_stream.clone(),
        }),
        broker,
    })
}

/// The STUN responder a gateway asks for its reflexive address: `auto` is the broker's host
/// on the STUN port, `off` none, anything else `HOST:PORT` (a name is resolved once, here).
fn stun_server(arg: &str, broker_url: &str) -> anyhow::Result<Option<std::net::SocketAddr>> {
    let target = match arg {
        "off" | "" => return Ok(None),
        "auto" => {
            let rest = broker_url.split_once("://").map_or(broker_url, |(_, r)| r);
            let authority = rest.split('/').next().unwrap_or(rest);
            let host = match authority.strip_prefix('[') {
                Some(v6) => format!("[{}]", v6.split(']').next().unwrap_or(v6)),
                None => authority.rsplit_once(':').map_or(authority, |(h, _)| h).to_owned(),
            };
            format!("{host}:{}", causeway_broker_api::stun::DEFAULT_PORT)
        }
        other => other.to_owned(),
    };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&target)
        .with_context(|| format!("--stun-server: {target:?} is not HOST:PORT, auto or off"))?
        .next()
        .with_context(|| format!("--stun-server: {target:?} resolves to no address"))?;
    Ok(Some(addr))
}

/// Writes the completion script of every command and flag for `shell`.
fn completion(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    clap_complete::generate(shell, &mut cmd, "causeway", out);
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::{Cli, telemetry::LogFormat};

    #[test]
    fn the_stun_server_follows_the_broker_or_says_what_is_wrong() {
        let auto = |url: &str| super::stun_server("auto", url).unwrap();
        assert_eq!(auto("https://172.31.0.2:7780"), Some("172.31.0.2:3478".parse().unwrap()));
        assert_eq!(auto("https://[::1]:7780/"), Some("[::1]:3478".parse().unwrap()));
        assert_eq!(auto("http://127.0.0.1"), Some("127.0.0.1:3478".parse().unwrap()));
        assert_eq!(super::stun_server("off", "https://x:1").unwrap(), None);
        assert_eq!(
            super::stun_server("10.0.0.1:9", "https://x:1").unwrap(),
            Some("10.0.0.1:9".parse().unwrap())
        );
        for bad in ["nonsense", "10.0.0.1", "10.0.0.1:99999"] {
            let err = super::stun_server(bad, "https://x:1").unwrap_err().to_string();
            assert!(err.starts_with("--stun-server: "), "{bad}: {err}");
        }
    }

    #[test]
    fn completion_scripts_know_the_commands_and_flags() {
        for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
            let mut out = Vec::new();
            super::completion(shell, &mut out);
            let script = String::from_utf8(out).unwrap();
            for word in ["deploy-broker", "join", "show", "connections", "log-format", "credentials"] {
                assert!(script.contains(word), "{shell:?} completion lacks {word}");
            }
        }
        // The bash script is valid bash.
        let mut out = Vec::new();
        super::completion(clap_complete::Shell::Bash, &mut out);
        let mut bash = std::process::Command::new("bash")
            .arg("-n")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("bash (Debian has it)");
        std::io::Write::write_all(&mut bash.stdin.take().unwrap(), &out).unwrap();
        assert!(bash.wait().unwrap().success(), "bash -n refused the completion script");
        let err = Cli::try_parse_from(["causeway", "completion", "tcsh"]).err().unwrap().to_string();
        assert!(err.contains("bash") && err.contains("zsh"), "{err}");
    }

    #[test]
    fn log_format_is_a_global_flag_with_a_clear_error() {
        let cli = Cli::try_parse_from(["causeway", "show", "clusters", "--log-format", "json"]).unwrap();
        assert_eq!(cli.log_format, LogFormat::Json);
        let cli = Cli::try_parse_from(["causeway", "--log-format", "text", "show", "clusters"]).unwrap();
        assert_eq!(cli.log_format, LogFormat::Text);
        let err = Cli::try_parse_from(["causeway", "--log-format", "xml", "show", "clusters"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("'xml'") && err.contains("text") && err.contains("json"), "{err}");
    }
}
