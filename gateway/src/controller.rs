//! The gateway as a controller: the desired state ([`Desired`]) in, one reconciler per
//! resource — `peers` (the cable), `datapath` (counter slots, the prefix map), `policy`,
//! `guard` (the uplink guard's known peers and sessions) and `routes` — each idempotent and
//! each failing alone. A failed step is logged, shown in the status (`reconcileFailures`) and
//! in the metrics, and retried on the next pass, while the other steps still run: a full eBPF
//! map stops neither the peers nor the routes, and one peer that cannot be configured stops
//! neither the other peers nor their routes.
//!
//! Generic over its seams ([`CableDriver`], [`Tables`], [`Routes`]) so that each reconciler is
//! tested against fakes, without root (the tests below).

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    time::Instant,
};

use causeway_datapath::{Datapath, DatapathError, PolicyTables, RemoteCidr};
use ipnetwork::IpNetwork;
use tracing::{debug, info, warn};

use crate::{
    cable::{CableDriver, CableError},
    desired::Desired,
    failover::{Carriers, Change, Evidence},
    model::{RemoteEndpoint, plan},
    policy::PolicyInput,
    route::{RouteError, RouteManager, SyncReport},
};

/// The datapath's tables, as the reconcilers use them.
pub trait Tables {
    fn remote_cidrs(&self) -> Result<BTreeMap<IpNetwork, RemoteCidr>, DatapathError>;
    fn set_remote_cidr(&mut self, net: IpNetwork, value: RemoteCidr) -> Result<(), DatapathError>;
    fn remove_remote_cidr(&mut self, net: IpNetwork) -> Result<(), DatapathError>;
    fn ensure_counters(&mut self, slot: u32) -> Result<(), DatapathError>;
    fn counter_slots(&self) -> Result<Vec<u32>, DatapathError>;
    fn remove_counters(&mut self, slot: u32) -> Result<(), DatapathError>;
    fn set_policy(&mut self, t: &PolicyTables) -> Result<(), DatapathError>;
    fn set_translation(&mut self, pairs: &[(IpNetwork, IpNetwork)]) -> Result<(), DatapathError>;
    fn set_known_peers(&mut self, ips: &BTreeSet<std::net::Ipv4Addr>) -> Result<(), DatapathError>;
    fn set_peer_sessions(
        &mut self,
        sessions: &BTreeSet<(std::net::Ipv4Addr, u32)>,
    ) -> Result<(), DatapathError>;
}

impl Tables for Datapath {
    fn remote_cidrs(&self) -> Result<BTreeMap<IpNetwork, RemoteCidr>, DatapathError> {
        Datapath::remote_cidrs(self)
    }
    fn set_remote_cidr(&mut self, net: IpNetwork, value: RemoteCidr) -> Result<(), DatapathError> {
        Datapath::set_remote_cidr(self, net, value)
    }
    fn remove_remote_cidr(&mut self, net: IpNetwork) -> Result<(), DatapathError> {
        Datapath::remove_remote_cidr(self, net)
    }
    fn ensure_counters(&mut self, slot: u32) -> Result<(), DatapathError> {
        Datapath::ensure_counters(self, slot)
    }
    fn counter_slots(&self) -> Result<Vec<u32>, DatapathError> {
        Datapath::counter_slots(self)
    }
    fn remove_counters(&mut self, slot: u32) -> Result<(), DatapathError> {
        Datapath::remove_counters(self, slot)
    }
    fn set_policy(&mut self, t: &PolicyTables) -> Result<(), DatapathError> {
        Datapath::set_policy(self, t)
    }
    fn set_translation(&mut self, pairs: &[(IpNetwork, IpNetwork)]) -> Result<(), DatapathError> {
        Datapath::set_translation(self, pairs)
    }
    fn set_known_peers(&mut self, ips: &BTreeSet<std::net::Ipv4Addr>) -> Result<(), DatapathError> {
        Datapath::set_known_peers(self, ips)
    }
    fn set_peer_sessions(
        &mut self,
        sessions: &BTreeSet<(std::net::Ipv4Addr, u32)>,
    ) -> Result<(), DatapathError> {
        Datapath::set_peer_sessions(self, sessions)
    }
}

/// The node's routes into the tunnel.
pub trait Routes {
    /// Makes Causeway's routes exactly `want` (never touching routes it did not create).
    fn sync(&self, want: &BTreeSet<IpNetwork>)
    -> impl Future<Output = Result<SyncReport, RouteError>> + Send;
}

impl Routes for RouteManager {
    fn sync(
        &self,
        want: &BTreeSet<IpNetwork>,
    ) -> impl Future<Output = Result<SyncReport, RouteError>> + Send {
        RouteManager::sync(self, want)
    }
}

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Cable(#[from] CableError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("{0}")]
    Policy(#[from] crate::policy::PolicyError),
}

/// The step names a failure is reported under (a peer's under `peer/<cluster>`).
pub const STEPS: [&str; 5] = ["translation", "datapath", "policy", "guard", "routes"];

/// Reconciles a gateway's resources with the desired state. See the module docs.
pub struct Controller<C, T, R> {
    pub cable: C,
    pub tables: T,
    pub routes: R,
    /// Where the redirect stage sends remote-bound packets (the tunnel device's ifindex).
    tunnel: u32,
    /// Remote cluster id → slot in the datapath's counter map.
    slots: BTreeMap<String, u32>,
    next_slot: u32,
    /// What the last pass put in place: a peer that could not be configured is left out (or
    /// kept at its previous version), so the next pass retries it. Each remote cluster's
    /// prefixes on the gateway that carries it ([`Carriers::carried`]).
    applied: Desired,
    /// What the records say (each cluster's prefixes on the gateway the control plane names).
    authority: Desired,
    /// Which gateway of each remote cluster carries it, decided on the probes' evidence.
    carriers: Carriers,
    /// The translation pairs in the datapath (`None`: not written yet by this process).
    applied_translation: Option<Vec<(IpNetwork, IpNetwork)>>,
    /// See [`Self::forwarding`].
    forwarding: bool,
    reachable: BTreeSet<String>,
    /// The policy in force and its rules' names by index (the kernel counts drops per index).
    policy: Option<(PolicyInput, Vec<String>)>,
    /// Remote prefixes left out because a route Causeway did not create holds them.
    route_conflicts: Vec<IpNetwork>,
    /// Failed steps of the last pass, with why.
    failures: BTreeMap<String, String>,
}

impl<C: CableDriver, T: Tables, R: Routes> Controller<C, T, R> {
    pub fn new(cable: C, tables: T, routes: R, tunnel: u32) -> Self {
        Self {
            cable,
            tables,
            routes,
            tunnel,
            slots: BTreeMap::new(),
            next_slot: 1,
            applied: Desired::default(),
            authority: Desired::default(),
            carriers: Carriers::default(),
            applied_translation: None,
            forwarding: true,
            reachable: BTreeSet::new(),
            policy: None,
            route_conflicts: Vec::new(),
            failures: BTreeMap::new(),
        }
    }

    /// One pass: every step runs, whatever the others did. Returns the failures (also kept
    /// for the status until the next pass).
    pub async fn reconcile(&mut self, desired: Desired) -> &BTreeMap<String, String> {
        let mut failures = BTreeMap::new();
        // The records name each cluster's active gateway; a failover the data plane made
        // stays in place until the switch itself decides otherwise.
        let mut carried = desired.clone();
        for r in carried.remotes.values_mut() {
            *r = self.carriers.carried(r);
        }
        self.authority = desired;
        let desired = carried;
        for (id, why) in &desired.refused {
            if self.applied.refused.get(id) != Some(why) {
                warn!(cluster = %id, reason = %why, "remote cluster refused: not routed");
            }
        }
        // Translation before anything can carry global addresses: a packet for this cluster's
        // global prefix must never arrive untranslated (or leave with a real source).
        if self.applied_translation.as_ref() != Some(&desired.translation) {
            match self.tables.set_translation(&desired.translation) {
                Ok(()) => {
                    if !desired.translation.is_empty() {
                        info!(
                            pairs = desired.translation.len(),
                            "overlap mode: prefix translation installed"
                        );
                    }
                    self.applied_translation = Some(desired.translation.clone());
                }
                Err(e) => {
                    warn!(step = "translation", error = %e, "reconcile step failed; retried on the next pass");
                    failures.insert("translation".to_owned(), e.to_string());
                }
            }
        }
        // Peers first: what the other steps steer traffic to must be able to carry it.
        let routed = self.reconcile_peers(&desired, &mut failures).await;
        let mut fail = |step: &str, e: StepError| {
            warn!(step, error = %e, "reconcile step failed; the others went on, it is retried on the next pass");
            failures.insert(step.to_owned(), e.to_string());
        };
        if let Err(e) = self.reconcile_datapath(&routed) {
            fail("datapath", e);
        }
        if let Err(e) = self.reconcile_policy(&desired.policy) {
            fail("policy", e);
        }
        self.applied = routed;
        if let Err(e) = self.reconcile_guard().await {
            fail("guard", e);
        }
        // Routes last: traffic is only steered into the tunnel once a peer can carry it.
        match self.routes.sync(&self.applied.routes()).await {
            Ok(report) => {
                if report.added + report.removed > 0 {
                    info!(routes_added = report.added, routes_removed = report.removed, "routes reconciled");
                }
                self.route_conflicts = report.conflicts;
            }
            Err(e) => fail("routes", e.into()),
        }
        self.failures = failures;
        &self.failures
    }

    /// Connects, updates and disconnects peers, each on its own. Returns the desired state
    /// restricted to what the cable now carries: a remote whose update failed keeps its
    /// previous version, one that could not be connected at all is left out.
    async fn reconcile_peers(
        &mut self,
        desired: &Desired,
        failures: &mut BTreeMap<String, String>,
    ) -> Desired {
        let mut routed = desired.clone();
        let mut fail = |id: &str, e: CableError| {
            warn!(cluster = %id, error = %e, "configuring the peer failed; its prefixes stay as they were");
            failures.insert(format!("peer/{id}"), e.to_string());
        };
        let gone: Vec<&RemoteEndpoint> =
            self.applied.remotes.values().filter(|r| !desired.remotes.contains_key(&r.cluster_id)).collect();
        let mut removed = 0;
        for r in gone {
            match self.cable.disconnect(&r.cluster_id).await {
                Ok(()) => removed += 1,
                Err(e) => {
                    fail(&r.cluster_id, e);
                    // Still configured: tried again next pass (no prefixes, nothing routed).
                    let mut kept = r.clone();
                    kept.cidrs.clear();
                    routed.remotes.insert(r.cluster_id.clone(), kept);
                }
            }
        }
        for ep in desired.remotes.values() {
            if self.applied.remotes.get(&ep.cluster_id) == Some(ep) {
                continue;
            }
            if let Err(e) = self.cable.connect(ep).await {
                fail(&ep.cluster_id, e);
                match self.applied.remotes.get(&ep.cluster_id) {
                    Some(previous) => routed.remotes.insert(ep.cluster_id.clone(), previous.clone()),
                    None => routed.remotes.remove(&ep.cluster_id),
                };
            }
        }
        if removed > 0 {
            info!(peers_removed = removed, "peers reconciled");
        }
        routed
    }

    /// Counter slots and the prefix map: prefix → (slot, tunnel), compared with what the map
    /// holds (level-triggered: a restart with pinned maps converges the same way).
    fn reconcile_datapath(&mut self, routed: &Desired) -> Result<(), StepError> {
        let have = self.tables.remote_cidrs()?;
        let have_slots = have.iter().map(|(n, v)| (*n, v.cluster_slot)).collect();
        assign_slots(&mut self.slots, &mut self.next_slot, routed, &have_slots);
        let stale: Vec<(String, u32)> = self
            .slots
            .iter()
            .filter(|(id, _)| !routed.remotes.contains_key(*id))
            .map(|(id, s)| (id.clone(), *s))
            .collect();
        let tunnel = self.tunnel;
        let want: BTreeMap<IpNetwork, RemoteCidr> = routed
            .remotes
            .values()
            .flat_map(|r| {
                let value = RemoteCidr { cluster_slot: self.slots[&r.cluster_id], tunnel };
                r.cidrs.iter().map(move |c| (*c, value))
            })
            .collect();
        for v in want.values() {
            self.tables.ensure_counters(v.cluster_slot)?;
        }
        let want_set: BTreeSet<(IpNetwork, RemoteCidr)> = want.iter().map(|(n, v)| (*n, *v)).collect();
        let have_set: BTreeSet<(IpNetwork, RemoteCidr)> = have.iter().map(|(n, v)| (*n, *v)).collect();
        let p = plan(&want_set, &have_set);
        for (net, _) in &p.remove {
            if !want.contains_key(net) {
                self.tables.remove_remote_cidr(*net)?;
            }
        }
        for (net, value) in &p.add {
            self.tables.set_remote_cidr(*net, *value)?;
        }
        for (id, slot) in stale {
            self.tables.remove_counters(slot)?;
            self.slots.remove(&id);
        }
        // Pinned counters of clusters that left while no gateway ran: gone before their slot
        // numbers can be handed out again.
        for slot in self.tables.counter_slots()? {
            if !self.slots.values().any(|s| *s == slot) {
                self.tables.remove_counters(slot)?;
            }
        }
        Ok(())
    }

    /// Compiles the cluster-set policy into the kernel's tables when it changed. A policy that
    /// does not compile, or does not fit, fails this step and the one in force stays (never
    /// fail open by accident).
    fn reconcile_policy(&mut self, input: &PolicyInput) -> Result<(), StepError> {
        if self.policy.as_ref().is_some_and(|(installed, _)| installed == input) {
            return Ok(());
        }
        let c = crate::policy::compile(input)?;
        self.tables.set_policy(&c.tables)?;
        info!(
            rules = c.rule_names.len(),
            entries = c.tables.verdicts.len(),
            default_deny = c.tables.default_deny,
            enforced = c.tables.enabled,
            "policy installed"
        );
        self.policy = Some((input.clone(), c.rule_names));
        Ok(())
    }

    /// The uplink guard accepts data messages from the peers we expect (every candidate address
    /// their records give) and from where they actually are (the cable follows roaming peers
    /// after authenticated traffic), and only for that peer's session index: spoofed data from
    /// a peer's address dies there.
    pub async fn reconcile_guard(&mut self) -> Result<(), StepError> {
        let conns = self.cable.connections().await?;
        let index_of: BTreeMap<&str, u32> =
            conns.iter().map(|c| (c.public_key.as_str(), c.local_index)).collect();
        let mut ips: BTreeSet<std::net::Ipv4Addr> = BTreeSet::new();
        let mut sessions: BTreeSet<(std::net::Ipv4Addr, u32)> = BTreeSet::new();
        for r in self.applied.remotes.values() {
            let recorded = std::iter::once((r.public_key, r.endpoint))
                .chain(r.candidates.iter().map(|c| (r.public_key, c.address)))
                .chain(r.standbys.iter().map(|s| (s.public_key, s.endpoint)))
                .chain(
                    r.standbys.iter().flat_map(|s| s.candidates.iter().map(|c| (s.public_key, c.address))),
                );
            for (key, endpoint) in recorded {
                if let std::net::IpAddr::V4(v4) = endpoint.ip() {
                    ips.insert(v4);
                    if let Some(index) = index_of.get(key.to_string().as_str()) {
                        sessions.insert((v4, *index));
                    }
                }
            }
        }
        for c in &conns {
            if let std::net::IpAddr::V4(v4) = c.endpoint.ip() {
                ips.insert(v4);
                sessions.insert((v4, c.local_index));
            }
        }
        self.tables.set_known_peers(&ips)?;
        self.tables.set_peer_sessions(&sessions)?;
        Ok(())
    }

    /// Decides which gateway carries each remote cluster from the probes' evidence at `now`,
    /// and moves the prefixes of every cluster whose carrier changed: one in-place peer update
    /// on sessions that are up already; no broker round trip, no handshake. Called on every
    /// probe interval. Returns the changes.
    pub async fn failover(&mut self, now: Instant) -> Vec<(String, Change)> {
        if self.authority.remotes.is_empty() {
            self.forwarding = true;
            self.reachable.clear();
            return Vec::new();
        }
        let conns = match self.cable.connections().await {
            Ok(conns) => conns,
            Err(e) => {
                warn!(error = %e, "reading the probes' evidence failed; no failover decision this time");
                return Vec::new();
            }
        };
        let evidence: BTreeMap<_, Evidence> =
            conns.iter().filter_map(|c| Some((c.public_key.parse().ok()?, c.evidence))).collect();
        // This gateway forwards if a tunnel it probes answers (or it probes none: nothing to
        // judge by). What it tells its own cluster's nodes; a gateway whose sessions are not
        // up yet probes, and is not forwarding until an answer comes.
        self.forwarding = !conns.iter().any(|c| c.probed)
            || evidence.values().any(|e| e.alive(now, &crate::failover::Timers::DEFAULT));
        // A remote cluster is reachable when one of its gateways answers its probes (or, with
        // nothing to probe, has a session): what cluster-set DNS and the nodes' service
        // programs read, the same evidence the carriers are chosen by.
        self.reachable = conns
            .iter()
            .filter(|c| self.authority.remotes.contains_key(&c.cluster_id))
            .filter(|c| {
                if c.probed {
                    c.evidence.alive(now, &crate::failover::Timers::DEFAULT)
                } else {
                    c.status == crate::cable::ConnectionStatus::Connected
                }
            })
            .map(|c| c.cluster_id.clone())
            .collect();
        let changes = self.carriers.decide(self.authority.remotes.values(), &evidence, now);
        for (id, change) in &changes {
            let Some(authority) = self.authority.remotes.get(id) else { continue };
            let provisional = change.to != authority.public_key;
            if change.reason == crate::failover::Reason::Initial {
                debug!(cluster = %id, carrier = %change.to, provisional, "remote cluster's first carrier");
            } else {
                info!(cluster = %id, from = ?change.from.map(|k| k.to_string()), to = %change.to,
                    reason = change.reason.as_str(), provisional, "remote cluster's carrier changed");
            }
            let want = self.carriers.carried(authority);
            // A cluster the last pass could not configure is left to the next pass.
            match self.applied.remotes.get(id) {
                Some(have) if *have != want => {}
                _ => continue,
            }
            match self.cable.connect(&want).await {
                Ok(()) => {
                    self.applied.remotes.insert(id.clone(), want);
                }
                Err(e) => {
                    warn!(cluster = %id, error = %e, "moving the prefixes to the new carrier failed; retried on the next pass");
                    self.failures.insert(format!("peer/{id}"), e.to_string());
                }
            }
        }
        changes
    }

    /// Whether this gateway can carry its cluster's traffic, as of the last
    /// [`failover`](Self::failover) pass: a tunnel it probes answers, or it has none to probe.
    pub fn forwarding(&self) -> bool {
        self.forwarding
    }

    /// The remote clusters a working tunnel reaches, as of the last
    /// [`failover`](Self::failover) pass.
    pub fn reachable(&self) -> &BTreeSet<String> {
        &self.reachable
    }

    /// Which gateway carries each remote cluster, and the failovers so far.
    pub fn carriers(&self) -> &Carriers {
        &self.carriers
    }

    /// What the records say each remote cluster should look like.
    pub fn authority(&self) -> &Desired {
        &self.authority
    }

    /// What the last pass put in place.
    pub fn applied(&self) -> &Desired {
        &self.applied
    }

    /// The counter slot of a remote cluster.
    pub fn slot(&self, cluster_id: &str) -> Option<u32> {
        self.slots.get(cluster_id).copied()
    }

    /// The rules of the policy in force, by index.
    pub fn policy_rules(&self) -> &[String] {
        self.policy.as_ref().map_or(&[], |(_, names)| names)
    }

    pub fn route_conflicts(&self) -> &[IpNetwork] {
        &self.route_conflicts
    }

    /// Failed steps of the last pass (`datapath`, `policy`, `guard`, `routes`, `peer/<id>`).
    pub fn failures(&self) -> &BTreeMap<String, String> {
        &self.failures
    }
}

/// Gives every remote cluster a counter slot: the one its prefixes already use in the (maybe
/// pinned) map if free, else the next unused number.
fn assign_slots(
    slots: &mut BTreeMap<String, u32>,
    next_slot: &mut u32,
    desired: &Desired,
    have: &BTreeMap<IpNetwork, u32>,
) {
    *next_slot = (*next_slot).max(have.values().chain(slots.values()).max().map_or(1, |m| m + 1));
    for r in desired.remotes.values() {
        if slots.contains_key(&r.cluster_id) {
            continue;
        }
        let taken: BTreeSet<u32> = slots.values().copied().collect();
        let slot = r.cidrs.iter().filter_map(|c| have.get(c)).copied().find(|s| !taken.contains(s));
        let slot = slot.unwrap_or_else(|| {
            *next_slot += 1;
            *next_slot - 1
        });
        slots.insert(r.cluster_id.clone(), slot);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use causeway_broker_api::{PolicyAction, PolicyPeer, PolicyProtocol, PolicyRecord, WireGuardKey};

    use super::*;
    use crate::cable::Connection;

    /// A remote cluster with a key of its own.
    fn remote(id: &str, cidr: &str) -> RemoteEndpoint {
        let mut key = [0u8; 32];
        key[..id.len()].copy_from_slice(id.as_bytes());
        RemoteEndpoint {
            cluster_id: id.to_owned(),
            public_key: WireGuardKey(key),
            endpoint: "192.0.2.1:51820".parse().unwrap(),
            candidates: Vec::new(),
            cidrs: vec![cidr.parse().unwrap()],
            health_ip: None,
            priority: 0,
            standbys: Vec::new(),
        }
    }

    fn desired(clusters: &[(&str, &str)]) -> Desired {
        let mut d = Desired::default();
        for (id, cidr) in clusters {
            d.remotes.insert((*id).to_owned(), remote(id, cidr));
        }
        d
    }

    #[test]
    fn a_fresh_start_numbers_slots_from_one() {
        let (mut slots, mut next) = (BTreeMap::new(), 1);
        assign_slots(
            &mut slots,
            &mut next,
            &desired(&[("b", "10.2.0.0/16"), ("c", "10.3.0.0/16")]),
            &BTreeMap::new(),
        );
        assert_eq!(slots, BTreeMap::from([("b".into(), 1), ("c".into(), 2)]));
        assert_eq!(next, 3);
    }

    #[test]
    fn a_restart_keeps_the_slots_its_pinned_prefixes_point_at() {
        // The earlier run gave c slot 1 and b slot 4 (others came and went).
        let have = BTreeMap::from([("10.3.0.0/16".parse().unwrap(), 1), ("10.2.0.0/16".parse().unwrap(), 4)]);
        let (mut slots, mut next) = (BTreeMap::new(), 1);
        let d = desired(&[("b", "10.2.0.0/16"), ("c", "10.3.0.0/16"), ("d", "10.4.0.0/16")]);
        assign_slots(&mut slots, &mut next, &d, &have);
        assert_eq!(slots["b"], 4);
        assert_eq!(slots["c"], 1);
        // A new cluster never lands on a slot whose counters belong to another.
        assert_eq!(slots["d"], 5);
        assert_eq!(next, 6);
        // Stable from then on.
        let before = slots.clone();
        assign_slots(&mut slots, &mut next, &d, &have);
        assert_eq!(slots, before);
    }

    /// A cable that records its peers; connecting the clusters in `refuse` fails. `evidence`
    /// is what its probes say of each gateway.
    #[derive(Default)]
    struct FakeCable {
        peers: BTreeMap<String, RemoteEndpoint>,
        refuse: BTreeSet<String>,
        connects: usize,
        evidence: BTreeMap<WireGuardKey, Evidence>,
    }

    impl CableDriver for FakeCable {
        fn info(&self) -> crate::cable::CableInfo {
            crate::cable::CableInfo {
                name: "fake",
                device: "fake0".into(),
                mtu: 1420,
                details: crate::cable::CableDetails::default(),
            }
        }
        async fn connect(&mut self, ep: &RemoteEndpoint) -> Result<(), CableError> {
            self.connects += 1;
            if self.refuse.contains(&ep.cluster_id) {
                // What the core answers when a key moves to another cluster.
                return Err(CableError::PeerRefused(
                    crate::cable::wireguard::core::PeerRefused::KeyOfAnotherCluster {
                        key: ep.public_key,
                        owner: "other".into(),
                        claimant: ep.cluster_id.clone(),
                    },
                ));
            }
            self.peers.insert(ep.cluster_id.clone(), ep.clone());
            Ok(())
        }
        async fn disconnect(&mut self, cluster_id: &str) -> Result<(), CableError> {
            self.peers.remove(cluster_id);
            Ok(())
        }
        async fn connections(&self) -> Result<Vec<Connection>, CableError> {
            let gateways = self.peers.values().flat_map(|r| {
                std::iter::once((r, r.public_key, r.endpoint, false))
                    .chain(r.standbys.iter().map(move |s| (r, s.public_key, s.endpoint, true)))
            });
            Ok(gateways
                .map(|(r, key, endpoint, standby)| Connection {
                    cluster_id: r.cluster_id.clone(),
                    endpoint,
                    public_key: key.to_string(),
                    status: crate::cable::ConnectionStatus::Connected,
                    rtt_secs: None,
                    loss: 0.0,
                    probed: true,
                    path: None,
                    last_handshake_secs: None,
                    tx_bytes: 0,
                    rx_bytes: 0,
                    tx_packets: 0,
                    rx_packets: 0,
                    standby,
                    local_index: 0,
                    evidence: self.evidence.get(&key).copied().unwrap_or_default(),
                })
                .collect())
        }
        async fn drops(&self) -> Result<Vec<(&'static str, u64)>, CableError> {
            Ok(Vec::new())
        }
        async fn cleanup(&mut self) -> Result<(), CableError> {
            Ok(())
        }
    }

    /// Datapath tables in memory, with a capacity for the prefix map (as the kernel's has)
    /// and a policy table that can be made to refuse.
    struct FakeTables {
        cidrs: BTreeMap<IpNetwork, RemoteCidr>,
        capacity: usize,
        counters: BTreeSet<u32>,
        policy: Option<PolicyTables>,
        refuse_policy: bool,
        known: BTreeSet<std::net::Ipv4Addr>,
        translation: Vec<(IpNetwork, IpNetwork)>,
    }

    impl FakeTables {
        fn with_capacity(capacity: usize) -> Self {
            Self {
                cidrs: BTreeMap::new(),
                capacity,
                counters: BTreeSet::new(),
                policy: None,
                refuse_policy: false,
                known: BTreeSet::new(),
                translation: Vec::new(),
            }
        }
    }

    /// What a full BPF map answers (E2BIG from the update syscall).
    fn map_full(name: &'static str) -> DatapathError {
        DatapathError::Map {
            name,
            source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_update_elem",
                io_error: std::io::Error::from_raw_os_error(7),
            }),
        }
    }

    impl Tables for FakeTables {
        fn remote_cidrs(&self) -> Result<BTreeMap<IpNetwork, RemoteCidr>, DatapathError> {
            Ok(self.cidrs.clone())
        }
        fn set_remote_cidr(&mut self, net: IpNetwork, value: RemoteCidr) -> Result<(), DatapathError> {
            if !self.cidrs.contains_key(&net) && self.cidrs.len() >= self.capacity {
                return Err(map_full("REMOTE_CIDRS_V4"));
            }
            self.cidrs.insert(net, value);
            Ok(())
        }
        fn remove_remote_cidr(&mut self, net: IpNetwork) -> Result<(), DatapathError> {
            self.cidrs.remove(&net);
            Ok(())
        }
        fn ensure_counters(&mut self, slot: u32) -> Result<(), DatapathError> {
            self.counters.insert(slot);
            Ok(())
        }
        fn counter_slots(&self) -> Result<Vec<u32>, DatapathError> {
            Ok(self.counters.iter().copied().collect())
        }
        fn remove_counters(&mut self, slot: u32) -> Result<(), DatapathError> {
            self.counters.remove(&slot);
            Ok(())
        }
        fn set_policy(&mut self, t: &PolicyTables) -> Result<(), DatapathError> {
            if self.refuse_policy {
                return Err(map_full("POLICY_VERDICTS"));
            }
            self.policy = Some(t.clone());
            Ok(())
        }
        fn set_translation(&mut self, pairs: &[(IpNetwork, IpNetwork)]) -> Result<(), DatapathError> {
            self.translation = pairs.to_vec();
            Ok(())
        }
        fn set_known_peers(&mut self, ips: &BTreeSet<std::net::Ipv4Addr>) -> Result<(), DatapathError> {
            self.known = ips.clone();
            Ok(())
        }
        fn set_peer_sessions(
            &mut self,
            _: &BTreeSet<(std::net::Ipv4Addr, u32)>,
        ) -> Result<(), DatapathError> {
            Ok(())
        }
    }

    /// Routes in memory; every sync is recorded.
    #[derive(Clone, Default)]
    struct FakeRoutes {
        installed: Arc<Mutex<BTreeSet<IpNetwork>>>,
        fail: Arc<Mutex<bool>>,
    }

    impl Routes for FakeRoutes {
        fn sync(
            &self,
            want: &BTreeSet<IpNetwork>,
        ) -> impl Future<Output = Result<SyncReport, RouteError>> + Send {
            let result = if *self.fail.lock().unwrap() {
                Err(RouteError::NoInterface { name: "cw-fake".into() })
            } else {
                let mut have = self.installed.lock().unwrap();
                let report = SyncReport {
                    added: want.difference(&have).count(),
                    removed: have.difference(want).count(),
                    conflicts: Vec::new(),
                };
                *have = want.clone();
                Ok(report)
            };
            std::future::ready(result)
        }
    }

    fn controller(capacity: usize) -> (Controller<FakeCable, FakeTables, FakeRoutes>, FakeRoutes) {
        let routes = FakeRoutes::default();
        (
            Controller::new(FakeCable::default(), FakeTables::with_capacity(capacity), routes.clone(), 9),
            routes,
        )
    }

    fn nets(list: &[&str]) -> BTreeSet<IpNetwork> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[tokio::test]
    async fn a_full_datapath_map_stops_neither_the_peers_nor_the_routes() {
        // Room for one prefix in the map; three clusters want one each.
        let (mut ctl, routes) = controller(1);
        let d = desired(&[("b", "10.2.0.0/16"), ("c", "10.3.0.0/16"), ("d", "10.4.0.0/16")]);
        let failures = ctl.reconcile(d.clone()).await.clone();
        assert_eq!(failures.keys().collect::<Vec<_>>(), ["datapath"], "{failures:?}");
        assert!(failures["datapath"].contains("REMOTE_CIDRS_V4"), "{failures:?}");
        assert_eq!(ctl.cable.peers.len(), 3, "every peer configured");
        assert_eq!(*routes.installed.lock().unwrap(), nets(&["10.2.0.0/16", "10.3.0.0/16", "10.4.0.0/16"]));
        assert!(ctl.tables.policy.is_some(), "the policy step ran too");
        // With room again, the next pass completes and the failure is gone.
        ctl.tables.capacity = 16;
        assert!(ctl.reconcile(d).await.is_empty());
        assert_eq!(ctl.tables.cidrs.len(), 3);
    }

    #[tokio::test]
    async fn a_peer_that_cannot_be_configured_stops_only_itself() {
        let (mut ctl, routes) = controller(16);
        ctl.cable.refuse.insert("c".into());
        let d = desired(&[("b", "10.2.0.0/16"), ("c", "10.3.0.0/16")]);
        let failures = ctl.reconcile(d.clone()).await.clone();
        assert_eq!(failures.keys().collect::<Vec<_>>(), ["peer/c"], "{failures:?}");
        assert_eq!(ctl.cable.peers.keys().collect::<Vec<_>>(), ["b"]);
        // Nothing is steered into the tunnel for a cluster without a peer.
        assert_eq!(*routes.installed.lock().unwrap(), nets(&["10.2.0.0/16"]));
        assert_eq!(ctl.tables.cidrs.keys().copied().collect::<BTreeSet<_>>(), nets(&["10.2.0.0/16"]));
        // Retried on the next pass (and only it: b is already in place).
        ctl.cable.refuse.clear();
        let connects = ctl.cable.connects;
        assert!(ctl.reconcile(d).await.is_empty());
        assert_eq!(ctl.cable.connects, connects + 1);
        assert_eq!(*routes.installed.lock().unwrap(), nets(&["10.2.0.0/16", "10.3.0.0/16"]));
    }

    #[tokio::test]
    async fn a_failed_update_keeps_the_peers_previous_version_routed() {
        let (mut ctl, routes) = controller(16);
        ctl.reconcile(desired(&[("b", "10.2.0.0/16")])).await;
        ctl.cable.refuse.insert("b".into());
        let failures = ctl.reconcile(desired(&[("b", "10.22.0.0/16")])).await.clone();
        assert_eq!(failures.keys().collect::<Vec<_>>(), ["peer/b"]);
        assert_eq!(
            *routes.installed.lock().unwrap(),
            nets(&["10.2.0.0/16"]),
            "the version the cable carries"
        );
    }

    #[tokio::test]
    async fn a_policy_that_cannot_be_installed_stops_nothing_else_and_the_old_one_stays() {
        let (mut ctl, routes) = controller(16);
        let mut d = desired(&[("b", "10.2.0.0/16")]);
        ctl.reconcile(d.clone()).await;
        let installed = ctl.tables.policy.clone();
        // A new rule, but the verdict table refuses it (full).
        d.policy.rules.push(PolicyRecord {
            name: "deny-b".into(),
            priority: 1,
            from: PolicyPeer { cluster: Some("b".into()), cidrs: vec![] },
            to: PolicyPeer::default(),
            protocol: PolicyProtocol::Any,
            ports: vec![],
            action: PolicyAction::Deny,
            generation: 1,
        });
        d.policy.clusters.insert("b".into(), vec!["10.2.0.0/16".parse().unwrap()]);
        d.remotes.insert("c".into(), remote("c", "10.3.0.0/16"));
        ctl.tables.refuse_policy = true;
        let failures = ctl.reconcile(d.clone()).await.clone();
        assert_eq!(failures.keys().collect::<Vec<_>>(), ["policy"], "{failures:?}");
        assert_eq!(ctl.tables.policy, installed, "the policy in force stays");
        assert_eq!(*routes.installed.lock().unwrap(), nets(&["10.2.0.0/16", "10.3.0.0/16"]));
        // Retried on the next pass even though the records did not change.
        ctl.tables.refuse_policy = false;
        assert!(ctl.reconcile(d).await.is_empty());
        assert_eq!(ctl.policy_rules(), ["deny-b"]);
    }

    #[tokio::test]
    async fn failing_routes_leave_peers_datapath_and_guard_done() {
        let (mut ctl, routes) = controller(16);
        *routes.fail.lock().unwrap() = true;
        let failures = ctl.reconcile(desired(&[("b", "10.2.0.0/16")])).await.clone();
        assert_eq!(failures.keys().collect::<Vec<_>>(), ["routes"]);
        assert_eq!(ctl.cable.peers.len(), 1);
        assert_eq!(ctl.tables.cidrs.len(), 1);
        assert_eq!(
            ctl.tables.known,
            BTreeSet::from(["192.0.2.1".parse().unwrap()]),
            "the guard knows the peer"
        );
        *routes.fail.lock().unwrap() = false;
        assert!(ctl.reconcile(desired(&[("b", "10.2.0.0/16")])).await.is_empty());
        assert_eq!(*routes.installed.lock().unwrap(), nets(&["10.2.0.0/16"]));
    }

    /// Cluster b with an active gateway (key 1, the records' pick) and a standby (key 2).
    fn with_standby() -> Desired {
        let mut d = desired(&[("b", "10.2.0.0/16")]);
        let b = d.remotes.get_mut("b").unwrap();
        b.public_key = WireGuardKey([1; 32]);
        b.standbys.push(crate::model::StandbyGateway {
            public_key: WireGuardKey([2; 32]),
            endpoint: "192.0.2.2:51820".parse().unwrap(),
            candidates: Vec::new(),
            health_ip: None,
            priority: 0,
        });
        d
    }

    #[tokio::test]
    async fn a_dead_carrier_moves_the_prefixes_to_a_live_standby_and_the_records_do_not_undo_it() {
        let (mut ctl, _) = controller(16);
        let (k1, k2) = (WireGuardKey([1; 32]), WireGuardKey([2; 32]));
        let t0 = Instant::now();
        let at = |ms: u64| t0 + std::time::Duration::from_millis(ms);
        let answer = |ctl: &mut Controller<FakeCable, FakeTables, FakeRoutes>, key, ms| {
            ctl.cable.evidence.insert(key, Evidence { probing_since: Some(t0), last_answer: Some(at(ms)) });
        };
        assert!(ctl.reconcile(with_standby()).await.is_empty());
        assert_eq!(ctl.cable.peers["b"].public_key, k1);
        // Both answer: the first decision is the records' pick; nothing moves.
        answer(&mut ctl, k1, 0);
        answer(&mut ctl, k2, 0);
        assert_eq!(ctl.failover(at(0)).await.len(), 1);
        let connects = ctl.cable.connects;
        // Gateway 1 stops answering; 2 goes on.
        for ms in (50..=250).step_by(50) {
            answer(&mut ctl, k2, ms);
            assert!(ctl.failover(at(ms)).await.is_empty(), "not dead before {ms} ms");
        }
        answer(&mut ctl, k2, 300);
        let changes = ctl.failover(at(300)).await;
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(changes[0].1.reason, crate::failover::Reason::Unreachable);
        // One peer update: gateway 2 carries the prefixes, gateway 1 is kept as a standby.
        assert_eq!(ctl.cable.connects, connects + 1);
        let b = &ctl.cable.peers["b"];
        assert_eq!((b.public_key, b.endpoint), (k2, "192.0.2.2:51820".parse().unwrap()));
        assert_eq!(b.cidrs, vec!["10.2.0.0/16".parse().unwrap()]);
        assert_eq!(b.standbys.iter().map(|s| s.public_key).collect::<Vec<_>>(), vec![k1]);
        let view = ctl.carriers().view("b", k1).unwrap();
        assert!(view.provisional && view.carrier == k2);
        // The records still name gateway 1 (its lease has not lapsed): a pass keeps gateway 2.
        assert!(ctl.reconcile(with_standby()).await.is_empty());
        assert_eq!(ctl.cable.connects, connects + 1, "nothing to change");
        assert_eq!(ctl.applied().remotes["b"].public_key, k2);
        // Gateway 1 answers again: traffic goes back after the hold-down, not before.
        for ms in (350..5_350).step_by(50) {
            answer(&mut ctl, k1, ms);
            answer(&mut ctl, k2, ms);
            assert!(ctl.failover(at(ms)).await.is_empty(), "fail-back at {ms} ms is early");
        }
        answer(&mut ctl, k1, 5_350);
        answer(&mut ctl, k2, 5_350);
        let changes = ctl.failover(at(5_350)).await;
        assert_eq!(
            changes.iter().map(|(_, c)| c.reason).collect::<Vec<_>>(),
            [crate::failover::Reason::FailBack]
        );
        assert_eq!(ctl.cable.peers["b"].public_key, k1);
        assert_eq!(
            ctl.carriers().failovers()["b"],
            BTreeMap::from([("unreachable".into(), 1), ("fail_back".into(), 1)])
        );
    }

    #[tokio::test]
    async fn without_a_live_standby_the_carrier_stays() {
        let (mut ctl, _) = controller(16);
        let t0 = Instant::now();
        ctl.reconcile(with_standby()).await;
        // The standby never answered (no session yet): a silent active is not left for it.
        ctl.cable
            .evidence
            .insert(WireGuardKey([1; 32]), Evidence { probing_since: Some(t0), last_answer: Some(t0) });
        ctl.cable
            .evidence
            .insert(WireGuardKey([2; 32]), Evidence { probing_since: Some(t0), last_answer: None });
        for ms in (0..3_000).step_by(50) {
            ctl.failover(t0 + std::time::Duration::from_millis(ms)).await;
        }
        assert_eq!(ctl.cable.peers["b"].public_key, WireGuardKey([1; 32]));
    }
}
