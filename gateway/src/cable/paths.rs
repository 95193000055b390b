//! Which of a remote gateway's candidate addresses a peer's traffic goes to, sans IO.
//!
//! Tunnel setup never waits on discovery: every handshake initiation goes to every candidate
//! at once (both sides do so, which also opens endpoint-independent NATs: simultaneous open),
//! and the first authenticated answer decides where traffic goes. From then on the path is
//! re-evaluated: candidates better than the current one (private before public before
//! reflexive) are checked with in-band probes sent to them through the session, and the
//! first one answered becomes the path. Authenticated traffic from a new address (a NAT that
//! rebound, a gateway that moved) moves the path there, as WireGuard's roaming does, except
//! back to a worse candidate while the current path is proven (the far side keeps sending on
//! the old path until our traffic on the new one reaches it).

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use causeway_broker_api::records::{Candidate, CandidateKind};
use serde::Serialize;

/// How often a better candidate than the current path is checked.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// A check not answered within this long failed.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// The current path counts as proven for this long after traffic from it authenticated (the
/// in-band probes confirm it ten times a second).
pub const PROVEN_FOR: Duration = Duration::from_secs(1);

/// What kind of path a tunnel uses, as `show connections` and the metrics say it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PathKind {
    /// To a private address of the remote gateway (same site, or a routed underlay).
    DirectPrivate,
    /// To a public address: configured, reflexive (through the remote's NAT), or learnt from
    /// where its authenticated traffic comes from.
    DirectPublic,
    /// Through the broker's relay (datagrams stay encrypted end to end).
    Relayed,
}

impl PathKind {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::DirectPrivate => "direct-private",
            Self::DirectPublic => "direct-public",
            Self::Relayed => "relayed",
        }
    }
}

/// A change of path, for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathChange {
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub kind: PathKind,
    pub reason: &'static str,
}

#[derive(Clone, Debug)]
struct Check {
    seq: u16,
    sent: Instant,
}

/// One peer's candidates and the path in use.
#[derive(Clone, Debug)]
pub struct Paths {
    /// The remote gateway's candidates, in preference order.
    candidates: Vec<Candidate>,
    current: SocketAddr,
    /// When authenticated traffic last came from `current`.
    proven: Option<Instant>,
    /// Outstanding and last checks, per candidate address.
    checks: Vec<(SocketAddr, Option<Check>, Option<Instant>)>,
    next_seq: u16,
}

impl Paths {
    /// Candidates in preference order; traffic starts at `initial` (the record's preferred
    /// address) until an answer says otherwise.
    #[must_use]
    pub fn new(candidates: Vec<Candidate>, initial: SocketAddr) -> Self {
        let mut p =
            Self { candidates: Vec::new(), current: initial, proven: None, checks: Vec::new(), next_seq: 1 };
        p.set_candidates(candidates, initial);
        p
    }

    /// The remote's candidates changed (its record did): the path stays if it is still one of
    /// them, else traffic goes to `initial` until the next answer.
    pub fn set_candidates(&mut self, mut candidates: Vec<Candidate>, initial: SocketAddr) {
        if candidates.is_empty() {
            candidates.push(Candidate { address: initial, kind: kind_of_address(initial.ip()) });
        }
        if !candidates.iter().any(|c| c.address == self.current) {
            self.current = initial;
            self.proven = None;
        }
        self.checks.retain(|(a, _, _)| candidates.iter().any(|c| c.address == *a));
        self.candidates = candidates;
    }

    /// Where traffic goes now.
    #[must_use]
    pub fn current(&self) -> SocketAddr {
        self.current
    }

    /// The kind of the path in use.
    #[must_use]
    pub fn kind(&self) -> PathKind {
        // An address learnt from traffic: a candidate's address on another port is that
        // candidate's NAT with a new mapping; otherwise its range says.
        let kind = self
            .candidate(self.current)
            .or_else(|| {
                self.candidates
                    .iter()
                    .find(|c| c.kind != CandidateKind::Relay && c.address.ip() == self.current.ip())
            })
            .map_or_else(|| kind_of_address(self.current.ip()), |c| c.kind);
        match kind {
            CandidateKind::Private => PathKind::DirectPrivate,
            CandidateKind::Public | CandidateKind::Reflexive => PathKind::DirectPublic,
            CandidateKind::Relay => PathKind::Relayed,
        }
    }

    /// Whether `addr` is the relay the remote gateway is registered with (what goes there is
    /// framed for the relay).
    #[must_use]
    pub fn is_relay(&self, addr: SocketAddr) -> bool {
        self.candidate(addr).is_some_and(|c| c.kind == CandidateKind::Relay)
    }

    /// Whether there is any address to try besides the current path.
    #[must_use]
    pub fn has_alternatives(&self) -> bool {
        self.candidates.iter().any(|c| c.address != self.current)
    }

    /// Where a handshake initiation goes: the current path first, then every other candidate.
    #[must_use]
    pub fn handshake_targets(&self) -> Vec<SocketAddr> {
        let mut v = vec![self.current];
        v.extend(self.candidates.iter().map(|c| c.address).filter(|a| *a != self.current));
        v
    }

    /// Authenticated traffic (not a path check) came from `src` at `now`: the peer is there
    /// now, unless `src` is a worse candidate than a path proven a moment ago.
    pub fn on_authenticated(&mut self, src: SocketAddr, now: Instant) -> Option<PathChange> {
        if src == self.current {
            self.proven = Some(now);
            return None;
        }
        let proven = self.proven.is_some_and(|t| now.saturating_duration_since(t) < PROVEN_FOR);
        if proven && self.candidate(src).is_some() && self.rank(src) > self.rank(self.current) {
            return None;
        }
        let change = self.switch(src, "authenticated traffic arrived from there");
        self.proven = Some(now);
        Some(change)
    }

    /// Checks due at `now`: each candidate better than the current path, at most once per
    /// [`CHECK_INTERVAL`]. Returns the address and the probe sequence number to send there.
    pub fn due_checks(&mut self, now: Instant) -> Vec<(SocketAddr, u16)> {
        let rank = self.rank(self.current);
        let better: Vec<SocketAddr> = self
            .candidates
            .iter()
            .filter(|c| c.kind < rank && c.address != self.current)
            .map(|c| c.address)
            .collect();
        let mut due = Vec::new();
        for addr in better {
            let i = match self.checks.iter().position(|(a, _, _)| *a == addr) {
                Some(i) => i,
                None => {
                    self.checks.push((addr, None, None));
                    self.checks.len() - 1
                }
            };
            let last = self.checks[i].1.as_ref().map(|c| c.sent);
            if last.is_some_and(|t| now.saturating_duration_since(t) < CHECK_INTERVAL) {
                continue;
            }
            let seq = self.next_seq;
            self.next_seq = self.next_seq.wrapping_add(1).max(1);
            self.checks[i].1 = Some(Check { seq, sent: now });
            due.push((addr, seq));
        }
        due
    }

    /// A path check's answer (probe `seq`) arrived from `src` at `now`: the path to `src`
    /// works both ways. Moves there if it is better than the current one.
    pub fn on_check_reply(&mut self, src: SocketAddr, seq: u16, now: Instant) -> Option<PathChange> {
        let i = self.checks.iter().position(|(a, _, _)| *a == src)?;
        let check = self.checks[i].1.as_ref()?;
        // Only the answer to the check outstanding there, in time: an old or forged sequence
        // number (already authenticated, but perhaps replayed by the path) moves nothing.
        if check.seq != seq || now.saturating_duration_since(check.sent) > CHECK_TIMEOUT {
            return None;
        }
        self.checks[i].2 = Some(now);
        self.checks[i].1 = None;
        if self.rank(src) >= self.rank(self.current) {
            return None;
        }
        let change = self.switch(src, "a better path answered its check");
        self.proven = Some(now);
        Some(change)
    }

    fn switch(&mut self, to: SocketAddr, reason: &'static str) -> PathChange {
        let from = std::mem::replace(&mut self.current, to);
        PathChange { from, to, kind: self.kind(), reason }
    }

    fn candidate(&self, addr: SocketAddr) -> Option<&Candidate> {
        self.candidates.iter().find(|c| c.address == addr)
    }

    /// A candidate's kind; an address learnt from traffic ranks with the reflexive ones.
    fn rank(&self, addr: SocketAddr) -> CandidateKind {
        self.candidate(addr).map_or(CandidateKind::Reflexive, |c| c.kind)
    }
}

/// The kind of an address no candidate names: private ranges are private.
fn kind_of_address(ip: IpAddr) -> CandidateKind {
    let private = match ip {
        IpAddr::V4(v4) => v4.is_private() || (v4.octets()[0] == 100 && v4.octets()[1] & 0xC0 == 64),
        IpAddr::V6(v6) => v6.is_unique_local(),
    };
    if private { CandidateKind::Private } else { CandidateKind::Public }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(addr: &str, kind: CandidateKind) -> Candidate {
        Candidate { address: addr.parse().unwrap(), kind }
    }

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn three() -> Vec<Candidate> {
        vec![
            c("172.31.0.5:51820", CandidateKind::Private),
            c("198.51.100.5:51820", CandidateKind::Public),
            c("203.0.113.9:40001", CandidateKind::Reflexive),
        ]
    }

    #[test]
    fn handshakes_go_to_every_candidate_current_first() {
        let p = Paths::new(three(), a("198.51.100.5:51820"));
        assert_eq!(
            p.handshake_targets(),
            vec![a("198.51.100.5:51820"), a("172.31.0.5:51820"), a("203.0.113.9:40001")]
        );
        assert_eq!(p.kind(), PathKind::DirectPublic);
        // A record without candidates: its one address, classified by its range.
        let lone = Paths::new(Vec::new(), a("10.0.0.1:51820"));
        assert_eq!(lone.handshake_targets(), vec![a("10.0.0.1:51820")]);
        assert_eq!(lone.kind(), PathKind::DirectPrivate);
    }

    #[test]
    fn the_first_answer_is_used_then_better_paths_are_checked_and_taken() {
        let t0 = Instant::now();
        let mut p = Paths::new(three(), a("198.51.100.5:51820"));
        // The reflexive candidate answered the handshake first.
        let change = p.on_authenticated(a("203.0.113.9:40001"), t0).unwrap();
        assert_eq!((change.to, change.kind), (a("203.0.113.9:40001"), PathKind::DirectPublic));
        assert_eq!(p.on_authenticated(a("203.0.113.9:40001"), t0), None, "no change, no log line");
        // Both better candidates are checked, once per interval.
        let due = p.due_checks(t0);
        assert_eq!(
            due.iter().map(|d| d.0).collect::<Vec<_>>(),
            vec![a("172.31.0.5:51820"), a("198.51.100.5:51820")]
        );
        assert!(p.due_checks(t0 + Duration::from_secs(1)).is_empty());
        // The public one answers: better than reflexive, taken.
        let (public, seq) = due[1];
        let change = p.on_check_reply(public, seq, t0 + Duration::from_millis(30)).unwrap();
        assert_eq!(change.reason, "a better path answered its check");
        assert_eq!(p.current(), public);
        // Only the private one is checked now, at its interval.
        let due = p.due_checks(t0 + CHECK_INTERVAL);
        assert_eq!(due.iter().map(|d| d.0).collect::<Vec<_>>(), vec![a("172.31.0.5:51820")]);
        let change = p.on_check_reply(due[0].0, due[0].1, t0 + CHECK_INTERVAL).unwrap();
        assert_eq!(change.kind, PathKind::DirectPrivate);
        // On the best path nothing is checked.
        assert!(p.due_checks(t0 + CHECK_INTERVAL * 3).is_empty());
        // The far side still sends along the old path for a moment: that moves nothing back
        // while the new path is proven ...
        let t1 = t0 + CHECK_INTERVAL;
        assert_eq!(p.on_authenticated(public, t1 + Duration::from_millis(100)), None);
        assert_eq!(p.current(), a("172.31.0.5:51820"));
        // ... but once it has been silent for a while, traffic from elsewhere is followed.
        let change = p.on_authenticated(public, t1 + PROVEN_FOR).unwrap();
        assert_eq!(change.reason, "authenticated traffic arrived from there");
        assert_eq!(p.current(), public);
    }

    #[test]
    fn late_stale_or_unasked_answers_move_nothing() {
        let t0 = Instant::now();
        let mut p = Paths::new(three(), a("203.0.113.9:40001"));
        let due = p.due_checks(t0);
        let (private, seq) = due[0];
        // Another sequence number, an address never checked, a reply after the timeout.
        assert_eq!(p.on_check_reply(private, seq.wrapping_add(7), t0), None);
        assert_eq!(p.on_check_reply(a("192.0.2.99:1"), seq, t0), None);
        assert_eq!(p.on_check_reply(private, seq, t0 + CHECK_TIMEOUT + Duration::from_millis(1)), None);
        assert_eq!(p.current(), a("203.0.113.9:40001"));
        // A worse path's answer does not move a better one.
        let mut q = Paths::new(three(), a("172.31.0.5:51820"));
        assert!(q.due_checks(t0).is_empty());
        assert_eq!(q.on_check_reply(a("203.0.113.9:40001"), 1, t0), None);
    }

    #[test]
    fn new_candidates_keep_a_path_still_listed_and_leave_one_that_is_not() {
        let t0 = Instant::now();
        let mut p = Paths::new(three(), a("198.51.100.5:51820"));
        p.on_authenticated(a("203.0.113.9:40001"), t0);
        p.set_candidates(three()[..2].to_vec(), a("198.51.100.5:51820"));
        assert_eq!(p.current(), a("198.51.100.5:51820"), "the reflexive address is gone");
        p.set_candidates(three(), a("172.31.0.5:51820"));
        assert_eq!(p.current(), a("198.51.100.5:51820"), "still a candidate: kept");
        // A NAT that rebound: traffic from a port nobody published is followed at once,
        // however proven the old mapping was, as the kind of the candidate at that address
        // (even in a private range, as on the sandbox's underlay).
        p.on_authenticated(a("198.51.100.5:51820"), t0);
        p.on_authenticated(a("203.0.113.9:40777"), t0);
        assert_eq!((p.current(), p.kind()), (a("203.0.113.9:40777"), PathKind::DirectPublic));
        let mut q =
            Paths::new(vec![c("172.31.0.101:51820", CandidateKind::Reflexive)], a("172.31.0.101:51820"));
        q.on_authenticated(a("172.31.0.101:40007"), t0);
        assert_eq!(q.kind(), PathKind::DirectPublic);
        q.on_authenticated(a("172.31.0.77:51820"), t0 + PROVEN_FOR);
        assert_eq!(q.kind(), PathKind::DirectPrivate, "an address nobody published: its range");
    }
}
