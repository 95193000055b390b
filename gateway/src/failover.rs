//! Which gateway of a remote cluster carries its prefixes, decided on the data plane's own
//! evidence, sans IO (the clock and the probe answers are passed in).
//!
//! Two voices decide:
//! - the **authority**: the gateway the control plane names active (the Kubernetes Lease or
//!   the broker's records). It says who *should* carry the cluster;
//! - the **evidence**: when each of the cluster's gateways last answered an in-band probe
//!   through its tunnel. It says who *can*.
//!
//! The rules, in order:
//! 1. Safety first: a carrier that stopped answering for [`Timers::detect`] is left at once for
//!    the best live gateway (the authority's pick when it answers, else the highest priority,
//!    then the lowest key), whatever any hold-down says. A switch without the authority's word
//!    is *provisional* until the authority names the same gateway.
//! 2. The authority is followed when its pick has answered continuously for
//!    [`Timers::hold_down`] and the carrier has carried for as long: a standby that has been
//!    answering all along takes over at once on a planned move, an old active that comes back
//!    must prove itself for the hold-down before traffic fails back (no flapping on a gateway
//!    that is coming and going), and an authority that changes its mind every second (two
//!    gateways of a cluster that cannot see each other, both claiming the role) moves traffic
//!    at most once per hold-down.
//! 3. Otherwise nothing moves: a gateway without evidence yet (never probed, first probe
//!    pending) is neither abandoned nor chosen, and when no gateway answers the carrier stays
//!    (there is nothing better to move to).
//!
//! So the data plane switches in `detect` with no broker round trip, the control plane only
//! confirms; a control plane that names a gateway this side cannot reach is not obeyed until
//! it can; a broker that is down changes nothing but the confirmation.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use causeway_broker_api::WireGuardKey;

use crate::model::{RemoteEndpoint, StandbyGateway};

/// The switch's timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timers {
    /// How often a gateway is probed.
    pub interval: Duration,
    /// Probes missed in a row before a gateway counts as dead.
    pub misses: u32,
    /// How long a gateway must answer continuously before the authority's pick takes traffic
    /// back from a live carrier.
    pub hold_down: Duration,
}

impl Timers {
    /// BFD-like defaults: 100 ms × 3 detects a dead gateway in 300 ms, under a third of the
    /// 1 s target, while a probe reply may still be 200 ms late on a loaded underlay without a
    /// false switch; failing back waits 5 s of unbroken answers (more than one reboot loop of a
    /// flapping node, less than anyone waits on a planned move).
    pub const DEFAULT: Self =
        Self { interval: Duration::from_millis(100), misses: 3, hold_down: Duration::from_secs(5) };

    /// No answer for this long: dead.
    #[must_use]
    pub fn detect(&self) -> Duration {
        self.interval * self.misses
    }
}

/// One gateway of the remote cluster as the switch sees it. `K` names a gateway: its
/// WireGuard key for a remote gateway, its node address for a node's route agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate<K = WireGuardKey> {
    pub key: K,
    /// The authority's order among standbys (higher first).
    pub priority: u32,
    /// When probing this gateway began (`None`: not probed yet).
    pub probing_since: Option<Instant>,
    /// When it last answered a probe.
    pub last_answer: Option<Instant>,
}

/// What the evidence says of one gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    Dead,
    /// Not probed yet, or its first probes are still within the detection time.
    Unknown,
}

impl<K> Candidate<K> {
    #[must_use]
    pub fn liveness(&self, now: Instant, t: &Timers) -> Liveness {
        match (self.probing_since, self.last_answer) {
            (_, Some(a)) if now.saturating_duration_since(a) < t.detect() => Liveness::Alive,
            (None, None) => Liveness::Unknown,
            (Some(s), None) if now.saturating_duration_since(s) < t.detect() => Liveness::Unknown,
            _ => Liveness::Dead,
        }
    }
}

/// Why the carrier changed (the label of `causeway_failovers_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// The first carrier: the authority's pick.
    Initial,
    /// The carrier stopped answering.
    Unreachable,
    /// The authority named another gateway, which answers.
    Authority,
    /// The authority's pick answered again for the hold-down: traffic went back to it.
    FailBack,
}

impl Reason {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Initial => "initial",
            Self::Unreachable => "unreachable",
            Self::Authority => "authority",
            Self::FailBack => "fail_back",
        }
    }
}

/// A change of carrier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change<K = WireGuardKey> {
    pub from: Option<K>,
    pub to: K,
    pub reason: Reason,
}

/// The carrier of one remote cluster and what the switch remembers to decide the next one.
#[derive(Debug)]
pub struct Switch<K = WireGuardKey> {
    carrier: Option<K>,
    since: Option<Instant>,
    reason: Option<Reason>,
    /// The carrier before this one.
    previous: Option<K>,
    /// Since when each gateway has answered without a break (as sampled by `decide`).
    alive_since: BTreeMap<K, Instant>,
    /// Carrier changes by reason.
    counts: BTreeMap<Reason, u64>,
}

impl<K> Default for Switch<K> {
    fn default() -> Self {
        Self {
            carrier: None,
            since: None,
            reason: None,
            previous: None,
            alive_since: BTreeMap::new(),
            counts: BTreeMap::new(),
        }
    }
}

impl<K: Copy + Ord> Switch<K> {
    /// The gateway carrying the cluster now.
    #[must_use]
    pub fn carrier(&self) -> Option<K> {
        self.carrier
    }

    /// Since when, and why.
    #[must_use]
    pub fn since(&self) -> Option<(Instant, Reason)> {
        self.since.zip(self.reason)
    }

    /// True while the carrier is not the authority's pick (a switch the control plane has not
    /// confirmed, or a pick of the control plane this side cannot reach).
    #[must_use]
    pub fn provisional(&self, authority: K) -> bool {
        self.carrier.is_some_and(|c| c != authority)
    }

    /// Carrier changes so far, by reason.
    #[must_use]
    pub fn counts(&self) -> &BTreeMap<Reason, u64> {
        &self.counts
    }

    /// Decides the carrier at `now` from the authority's pick and the cluster's gateways (the
    /// authority's among them); returns the change, if any. Call it on every probe tick and on
    /// every change of the records.
    pub fn decide(
        &mut self,
        authority: K,
        candidates: &[Candidate<K>],
        now: Instant,
        t: &Timers,
    ) -> Option<Change<K>> {
        let live = |key: K| {
            candidates.iter().find(|c| c.key == key).map_or(Liveness::Unknown, |c| c.liveness(now, t))
        };
        // Continuous liveness, as sampled.
        for c in candidates {
            if c.liveness(now, t) == Liveness::Alive {
                self.alive_since.entry(c.key).or_insert(now);
            } else {
                self.alive_since.remove(&c.key);
            }
        }
        self.alive_since.retain(|k, _| candidates.iter().any(|c| c.key == *k));

        let Some(carrier) = self.carrier.filter(|c| candidates.iter().any(|x| x.key == *c)) else {
            // No carrier yet (or it left the records): the authority's pick, as the control
            // plane said, unless it is known dead and another answers.
            let to = if live(authority) == Liveness::Dead {
                self.best_alive(authority, candidates, now, t).unwrap_or(authority)
            } else {
                authority
            };
            let reason = if self.carrier.is_none() { Reason::Initial } else { Reason::Authority };
            return Some(self.switch(to, reason, now));
        };

        // 1. Safety: a dead carrier is left for the best live gateway.
        if live(carrier) == Liveness::Dead {
            return self
                .best_alive(authority, candidates, now, t)
                .map(|to| self.switch(to, Reason::Unreachable, now));
        }
        // 2. The authority, once its pick has answered for the hold-down.
        let settled =
            |since: Option<&Instant>| since.is_some_and(|s| now.saturating_duration_since(*s) >= t.hold_down);
        if carrier != authority && settled(self.alive_since.get(&authority)) && settled(self.since.as_ref()) {
            let reason = if self.reason == Some(Reason::Unreachable) && self.was_authority_before(authority) {
                Reason::FailBack
            } else {
                Reason::Authority
            };
            return Some(self.switch(authority, reason, now));
        }
        // 3. Nothing moves.
        None
    }

    /// The best live gateway: the authority's pick if it answers, else the highest priority
    /// (then the lowest key) among those that answer.
    fn best_alive(&self, authority: K, candidates: &[Candidate<K>], now: Instant, t: &Timers) -> Option<K> {
        let alive = candidates.iter().filter(|c| c.liveness(now, t) == Liveness::Alive);
        if alive.clone().any(|c| c.key == authority) {
            return Some(authority);
        }
        alive.max_by(|a, b| a.priority.cmp(&b.priority).then_with(|| b.key.cmp(&a.key))).map(|c| c.key)
    }

    /// Whether `authority` carried the cluster before the last (unreachable) switch.
    fn was_authority_before(&self, authority: K) -> bool {
        self.previous == Some(authority)
    }

    fn switch(&mut self, to: K, reason: Reason, now: Instant) -> Change<K> {
        let from = self.carrier;
        self.previous = from;
        self.carrier = Some(to);
        self.since = Some(now);
        self.reason = Some(reason);
        *self.counts.entry(reason).or_default() += 1;
        Change { from, to, reason }
    }
}

/// What the cable knows of one gateway's probes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Evidence {
    /// When probing it began (`None`: never probed: no health address, or no session yet).
    pub probing_since: Option<Instant>,
    /// When it last answered.
    pub last_answer: Option<Instant>,
}

impl Evidence {
    /// Answered within the detection time.
    #[must_use]
    pub fn alive(&self, now: Instant, t: &Timers) -> bool {
        self.last_answer.is_some_and(|a| now.saturating_duration_since(a) < t.detect())
    }
}

/// Where a remote cluster's traffic goes, for the status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CarrierView {
    pub carrier: WireGuardKey,
    pub since: Instant,
    pub reason: Reason,
    /// The control plane names another gateway (see [`Switch::provisional`]).
    pub provisional: bool,
}

/// A switch per remote cluster: the authority's view of each cluster (from the records) in,
/// the view the cable should carry out. Still no I/O: the caller brings the probes' evidence
/// and the clock, and applies what comes out.
#[derive(Debug)]
pub struct Carriers {
    timers: Timers,
    switches: BTreeMap<String, Switch>,
}

impl Default for Carriers {
    fn default() -> Self {
        Self::new(Timers::DEFAULT)
    }
}

impl Carriers {
    #[must_use]
    pub fn new(timers: Timers) -> Self {
        Self { timers, switches: BTreeMap::new() }
    }

    /// The authority's view of a cluster, with the prefixes on the gateway the switch chose:
    /// that gateway becomes the endpoint, the authority's pick one of the standbys. Unchanged
    /// while the switch agrees with the authority (or has not decided yet).
    #[must_use]
    pub fn carried(&self, authority: &RemoteEndpoint) -> RemoteEndpoint {
        let Some(carrier) = self.switches.get(&authority.cluster_id).and_then(Switch::carrier) else {
            return authority.clone();
        };
        let Some(chosen) = authority.standbys.iter().find(|s| s.public_key == carrier) else {
            return authority.clone();
        };
        let mut standbys: Vec<StandbyGateway> =
            authority.standbys.iter().filter(|s| s.public_key != carrier).cloned().collect();
        standbys.push(StandbyGateway {
            public_key: authority.public_key,
            endpoint: authority.endpoint,
            candidates: authority.candidates.clone(),
            health_ip: authority.health_ip,
            priority: authority.priority,
        });
        standbys.sort_by_key(|s| s.public_key.0);
        RemoteEndpoint {
            cluster_id: authority.cluster_id.clone(),
            public_key: chosen.public_key,
            endpoint: chosen.endpoint,
            candidates: chosen.candidates.clone(),
            cidrs: authority.cidrs.clone(),
            health_ip: chosen.health_ip,
            priority: chosen.priority,
            standbys,
        }
    }

    /// Decides every cluster's carrier at `now`; forgets clusters no longer in `authority`.
    /// Returns the clusters whose carrier changed, with the change.
    pub fn decide<'a>(
        &mut self,
        authority: impl IntoIterator<Item = &'a RemoteEndpoint>,
        evidence: &BTreeMap<WireGuardKey, Evidence>,
        now: Instant,
    ) -> Vec<(String, Change)> {
        let mut changes = Vec::new();
        let mut seen = Vec::new();
        for r in authority {
            let candidates: Vec<Candidate> = std::iter::once((r.public_key, r.priority))
                .chain(r.standbys.iter().map(|s| (s.public_key, s.priority)))
                .map(|(key, priority)| {
                    let e = evidence.get(&key).copied().unwrap_or_default();
                    Candidate { key, priority, probing_since: e.probing_since, last_answer: e.last_answer }
                })
                .collect();
            let switch = self.switches.entry(r.cluster_id.clone()).or_default();
            if let Some(change) = switch.decide(r.public_key, &candidates, now, &self.timers) {
                changes.push((r.cluster_id.clone(), change));
            }
            seen.push(r.cluster_id.clone());
        }
        self.switches.retain(|id, _| seen.contains(id));
        changes
    }

    /// Who carries `cluster_id`, given the authority's pick.
    #[must_use]
    pub fn view(&self, cluster_id: &str, authority: WireGuardKey) -> Option<CarrierView> {
        let s = self.switches.get(cluster_id)?;
        let (since, reason) = s.since()?;
        Some(CarrierView { carrier: s.carrier()?, since, reason, provisional: s.provisional(authority) })
    }

    /// Carrier changes so far, by cluster and reason name (the first carrier is no failover and
    /// is not counted).
    #[must_use]
    pub fn failovers(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        self.switches
            .iter()
            .map(|(id, s)| {
                let counts = s
                    .counts()
                    .iter()
                    .filter(|(r, _)| **r != Reason::Initial)
                    .map(|(r, n)| (r.as_str().to_owned(), *n))
                    .collect::<BTreeMap<_, _>>();
                (id.clone(), counts)
            })
            .filter(|(_, counts)| !counts.is_empty())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timers = Timers::DEFAULT;

    fn key(n: u8) -> WireGuardKey {
        WireGuardKey([n; 32])
    }

    /// Gateways of one remote cluster and when each last answered, on a mocked clock.
    struct Cluster {
        t0: Instant,
        gateways: Vec<Candidate>,
    }

    impl Cluster {
        /// Gateways 1 (priority 0) .. n, all probed and answering from `t0`.
        fn new(n: u8) -> Self {
            let t0 = Instant::now();
            let gateways = (1..=n)
                .map(|i| Candidate {
                    key: key(i),
                    priority: u32::from(n - i),
                    probing_since: Some(t0),
                    last_answer: Some(t0),
                })
                .collect();
            Self { t0, gateways }
        }

        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }

        /// Gateway `i` answers at `ms`.
        fn answer(&mut self, i: u8, ms: u64) {
            let at = self.at(ms);
            self.gateways[usize::from(i - 1)].last_answer = Some(at);
        }

        /// Every gateway in `alive` answers every probe from `from` to `to` (ms); then the
        /// switch decides at every tick. Returns the changes.
        fn run(
            &mut self,
            s: &mut Switch,
            authority: u8,
            alive: &[u8],
            from: u64,
            to: u64,
        ) -> Vec<(u64, Change)> {
            let mut out = Vec::new();
            let step = u64::try_from(T.interval.as_millis()).unwrap();
            let mut ms = from;
            while ms <= to {
                for &i in alive {
                    self.answer(i, ms);
                }
                if let Some(c) = s.decide(key(authority), &self.gateways, self.at(ms), &T) {
                    out.push((ms, c));
                }
                ms += step;
            }
            out
        }
    }

    fn started(c: &mut Cluster, authority: u8) -> Switch {
        let mut s = Switch::default();
        let first = s.decide(key(authority), &c.gateways, c.at(0), &T).unwrap();
        assert_eq!(first, Change { from: None, to: key(authority), reason: Reason::Initial });
        s
    }

    #[test]
    fn a_dead_active_is_left_for_a_live_standby_within_the_detection_time() {
        let mut c = Cluster::new(2);
        let mut s = started(&mut c, 1);
        assert!(c.run(&mut s, 1, &[1, 2], 0, 1_000).is_empty());
        // Gateway 1 answers its last probe at 1,000 ms.
        let changes = c.run(&mut s, 1, &[2], 1_100, 3_000);
        assert_eq!(changes.len(), 1, "{changes:?}");
        let (at, change) = changes[0];
        assert_eq!(change, Change { from: Some(key(1)), to: key(2), reason: Reason::Unreachable });
        // Dead once `detect` (300 ms) has passed without an answer: not one tick before.
        assert_eq!(at, 1_000 + 300);
        assert!(s.provisional(key(1)), "the authority has not confirmed it");
        assert_eq!(s.since(), Some((c.at(1_300), Reason::Unreachable)));
    }

    #[test]
    fn with_no_live_gateway_the_carrier_stays() {
        let mut c = Cluster::new(2);
        let mut s = started(&mut c, 1);
        assert!(c.run(&mut s, 1, &[], 100, 5_000).is_empty());
        assert_eq!(s.carrier(), Some(key(1)));
    }

    #[test]
    fn the_old_active_must_answer_for_the_hold_down_before_traffic_fails_back() {
        let mut c = Cluster::new(2);
        let mut s = started(&mut c, 1);
        c.run(&mut s, 1, &[2], 100, 1_000);
        assert_eq!(s.carrier(), Some(key(2)));
        // Gateway 1 flaps: up for a second, down for a second, three times. No fail-back.
        for k in 0..3 {
            let base = 2_000 + k * 2_000;
            assert!(c.run(&mut s, 1, &[1, 2], base, base + 1_000).is_empty());
            assert!(c.run(&mut s, 1, &[2], base + 1_100, base + 1_900).is_empty());
        }
        // Then it answers for good: traffic goes back exactly one hold-down after its first answer.
        let changes = c.run(&mut s, 1, &[1, 2], 8_000, 20_000);
        assert_eq!(
            changes,
            vec![(13_000, Change { from: Some(key(2)), to: key(1), reason: Reason::FailBack })]
        );
        assert!(!s.provisional(key(1)));
        assert_eq!(s.counts().get(&Reason::Unreachable), Some(&1));
        assert_eq!(s.counts().get(&Reason::FailBack), Some(&1));
    }

    #[test]
    fn an_authority_that_confirms_the_switch_keeps_traffic_where_it_is() {
        let mut c = Cluster::new(2);
        let mut s = started(&mut c, 1);
        c.run(&mut s, 1, &[2], 100, 1_000);
        // The Lease moved to gateway 2: confirmed, nothing moves.
        assert!(c.run(&mut s, 2, &[2], 1_100, 3_000).is_empty());
        assert!(!s.provisional(key(2)));
        // The old active comes back as a standby: traffic stays on gateway 2.
        assert!(c.run(&mut s, 2, &[1, 2], 3_100, 20_000).is_empty());
        assert_eq!(s.carrier(), Some(key(2)));
    }

    #[test]
    fn a_planned_move_to_a_standby_that_answers_all_along_is_immediate() {
        let mut c = Cluster::new(2);
        let mut s = started(&mut c, 1);
        assert!(c.run(&mut s, 1, &[1, 2], 100, 6_000).is_empty());
        let changes = c.run(&mut s, 2, &[1, 2], 6_100, 7_000);
        assert_eq!(
            changes,
            vec![(6_100, Change { from: Some(key(1)), to: key(2), reason: Reason::Authority })]
        );
    }

    #[test]
    fn an_authority_pick_this_side_cannot_reach_is_not_obeyed_until_it_answers() {
        let mut c = Cluster::new(3);
        let mut s = started(&mut c, 1);
        // The control plane names gateway 3, which never answers here (a partition between
        // this cluster and that gateway): traffic stays on gateway 1, which works.
        assert!(c.run(&mut s, 3, &[1, 2], 100, 10_000).is_empty());
        assert_eq!(s.carrier(), Some(key(1)));
        assert!(s.provisional(key(3)));
        // Gateway 3 starts answering: it gets traffic after the hold-down.
        let changes = c.run(&mut s, 3, &[1, 2, 3], 10_100, 20_000);
        assert_eq!(
            changes,
            vec![(15_100, Change { from: Some(key(1)), to: key(3), reason: Reason::Authority })]
        );
    }

    #[test]
    fn an_authority_that_flips_between_two_live_gateways_moves_traffic_at_most_once_per_hold_down() {
        // Both gateways of the cluster are alive but cannot see each other and both claim the
        // role: the authority this side reads alternates every second.
        let mut c = Cluster::new(2);
        let mut s = started(&mut c, 1);
        c.run(&mut s, 1, &[1, 2], 100, 6_000);
        let mut changes = Vec::new();
        for k in 0..20u64 {
            let authority = if k % 2 == 0 { 2 } else { 1 };
            changes.extend(c.run(&mut s, authority, &[1, 2], 6_100 + k * 1_000, 7_000 + k * 1_000));
        }
        let times: Vec<u64> = changes.iter().map(|(t, _)| *t).collect();
        assert!(times.windows(2).all(|w| w[1] - w[0] >= 5_000), "{times:?}");
        assert!(changes.len() <= 5, "{changes:?}");
    }

    #[test]
    fn a_dead_carrier_is_left_even_inside_the_hold_down() {
        let mut c = Cluster::new(3);
        let mut s = started(&mut c, 1);
        c.run(&mut s, 1, &[2, 3], 100, 1_000);
        assert_eq!(s.carrier(), Some(key(2)), "the higher priority of the live standbys");
        // Gateway 2 dies 1 s later, long before any hold-down: gateway 3 takes over at once.
        let changes = c.run(&mut s, 1, &[3], 1_100, 3_000);
        assert_eq!(
            changes,
            vec![(1_300, Change { from: Some(key(2)), to: key(3), reason: Reason::Unreachable })]
        );
    }

    #[test]
    fn a_dead_carrier_goes_to_the_authority_when_it_answers_again() {
        let mut c = Cluster::new(2);
        let mut s = started(&mut c, 1);
        c.run(&mut s, 1, &[2], 100, 1_000);
        // Gateway 1 is back (inside its hold-down) when gateway 2 dies: safety wins.
        c.run(&mut s, 1, &[1, 2], 1_100, 2_000);
        let changes = c.run(&mut s, 1, &[1], 2_100, 3_000);
        assert_eq!(
            changes,
            vec![(2_300, Change { from: Some(key(2)), to: key(1), reason: Reason::Unreachable })]
        );
    }

    #[test]
    fn without_evidence_nobody_is_abandoned_or_chosen() {
        let t0 = Instant::now();
        let never = |n| Candidate { key: key(n), priority: 0, probing_since: None, last_answer: None };
        let mut s = Switch::default();
        // Nothing probed yet: the authority's pick.
        assert_eq!(s.decide(key(1), &[never(1), never(2)], t0, &T).map(|c| c.to), Some(key(1)));
        // Probing began; the first answers are not due yet: nothing moves.
        let pending = |n| Candidate { probing_since: Some(t0), ..never(n) };
        assert_eq!(s.decide(key(1), &[pending(1), pending(2)], t0 + Duration::from_millis(200), &T), None);
        // A gateway never probed is unknown however long it has been.
        assert_eq!(never(2).liveness(t0 + Duration::from_secs(60), &T), Liveness::Unknown);
        assert_eq!(pending(2).liveness(t0 + Duration::from_millis(300), &T), Liveness::Dead);
    }

    #[test]
    fn a_carrier_that_leaves_the_records_is_replaced_by_the_authority() {
        let mut c = Cluster::new(2);
        let mut s = started(&mut c, 1);
        c.run(&mut s, 1, &[2], 100, 1_000);
        assert_eq!(s.carrier(), Some(key(2)));
        // Gateway 2's record is gone (it left); the authority names 1, which answers again.
        c.answer(1, 1_100);
        let only_1 = vec![c.gateways[0]];
        let change = s.decide(key(1), &only_1, c.at(1_100), &T).unwrap();
        assert_eq!(change, Change { from: Some(key(2)), to: key(1), reason: Reason::Authority });
    }

    fn remote(id: &str, active: u8, standbys: &[u8]) -> RemoteEndpoint {
        let gw = |n: u8| std::net::SocketAddr::from(([192, 0, 2, n], 51820));
        RemoteEndpoint {
            cluster_id: id.into(),
            public_key: key(active),
            endpoint: gw(active),
            candidates: Vec::new(),
            cidrs: vec!["10.2.0.0/16".parse().unwrap()],
            health_ip: Some("10.2.0.0".parse().unwrap()),
            priority: 7,
            standbys: standbys
                .iter()
                .map(|n| StandbyGateway {
                    public_key: key(*n),
                    endpoint: gw(*n),
                    candidates: Vec::new(),
                    health_ip: Some("10.2.0.0".parse().unwrap()),
                    priority: u32::from(*n),
                })
                .collect(),
        }
    }

    #[test]
    fn carriers_put_the_prefixes_on_the_chosen_gateway_and_keep_the_others_warm() {
        let t0 = Instant::now();
        let mut c = Carriers::default();
        let b = remote("b", 1, &[2, 3]);
        assert_eq!(c.carried(&b), b, "no decision yet: the records' view");
        let answered =
            |ms: u64| Evidence { probing_since: Some(t0), last_answer: Some(t0 + Duration::from_millis(ms)) };
        let mut evidence =
            BTreeMap::from([(key(1), answered(0)), (key(2), answered(0)), (key(3), answered(0))]);
        assert_eq!(c.decide([&b], &evidence, t0).len(), 1);
        assert_eq!(c.carried(&b), b, "the records' pick carries");
        // Gateway 1 goes silent: the live standby with the higher priority (3) takes over.
        evidence.insert(key(2), answered(400));
        evidence.insert(key(3), answered(400));
        let changes = c.decide([&b], &evidence, t0 + Duration::from_millis(400));
        assert_eq!(
            changes,
            vec![("b".to_owned(), Change { from: Some(key(1)), to: key(3), reason: Reason::Unreachable })]
        );
        let carried = c.carried(&b);
        assert_eq!(
            (carried.public_key, carried.endpoint, carried.priority),
            (key(3), b.standbys[1].endpoint, 3)
        );
        assert_eq!(carried.cidrs, b.cidrs);
        assert_eq!(carried.health_ip, b.health_ip);
        let warm: Vec<(WireGuardKey, u32)> =
            carried.standbys.iter().map(|s| (s.public_key, s.priority)).collect();
        assert_eq!(warm, vec![(key(1), 7), (key(2), 2)], "the records' pick among the standbys");
        let view = c.view("b", key(1)).unwrap();
        assert_eq!((view.carrier, view.reason, view.provisional), (key(3), Reason::Unreachable, true));
        assert_eq!(
            c.failovers(),
            BTreeMap::from([("b".to_owned(), BTreeMap::from([("unreachable".to_owned(), 1)]))])
        );
        // The cluster leaves the records: its switch is forgotten.
        assert!(c.decide([], &evidence, t0 + Duration::from_millis(450)).is_empty());
        assert_eq!(c.carried(&b), b);
        assert!(c.failovers().is_empty());
    }

    #[test]
    fn a_carrier_the_records_no_longer_list_gives_the_records_view() {
        let t0 = Instant::now();
        let mut c = Carriers::default();
        let evidence = BTreeMap::from([
            (key(1), Evidence { probing_since: Some(t0), last_answer: None }),
            (
                key(2),
                Evidence { probing_since: Some(t0), last_answer: Some(t0 + Duration::from_millis(400)) },
            ),
        ]);
        c.decide([&remote("b", 1, &[2])], &evidence, t0 + Duration::from_millis(400));
        assert_eq!(c.carried(&remote("b", 1, &[2])).public_key, key(2));
        // Gateway 2's record is gone before the switch has run again: the rewrite never names
        // a gateway the records do not list.
        assert_eq!(c.carried(&remote("b", 1, &[])), remote("b", 1, &[]));
    }
}
