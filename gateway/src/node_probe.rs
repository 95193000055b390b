//! Node probes: how a cluster's nodes tell which of their gateway nodes can carry traffic
//! right now, without waiting for the Lease or the broker. The route agent sends a 16-byte UDP
//! request to each gateway node's probe port every probe interval; the gateway answers with
//! as many bytes (nothing to amplify) saying whether it forwards: whether its own tunnels
//! answer their in-band probes. A killed gateway does not answer; one cut off the underlay or
//! whose WireGuard traffic is dropped answers "not forwarding". The agent feeds the answers to
//! the same [`Switch`](crate::failover::Switch) the gateways use for remote clusters.
//!
//! The codec and the prober's bookkeeping are sans IO (unit-tested); [`serve`] and the
//! agent's loop are the I/O.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tracing::{debug, warn};

use crate::failover::Evidence;

/// The gateway's probe port (UDP), unless configured otherwise.
pub const DEFAULT_PORT: u16 = 51821;
/// Length of a request and of a reply.
pub const LEN: usize = 16;
const REQUEST: [u8; 4] = *b"CWNQ";
const REPLY: [u8; 4] = *b"CWNA";
const VERSION: u8 = 1;
/// A request not answered within this long is forgotten (its reply would say nothing new).
const ANSWER_WITHIN: Duration = Duration::from_secs(2);

fn message(magic: [u8; 4], flags: u8, nonce: u64) -> [u8; LEN] {
    let mut m = [0u8; LEN];
    m[..4].copy_from_slice(&magic);
    m[4] = VERSION;
    m[5] = flags;
    m[8..].copy_from_slice(&nonce.to_be_bytes());
    m
}

fn parse(magic: [u8; 4], b: &[u8]) -> Option<(u8, u64)> {
    if b.len() != LEN || b[..4] != magic || b[4] != VERSION || b[6..8] != [0, 0] {
        return None;
    }
    Some((b[5], u64::from_be_bytes(b[8..].try_into().ok()?)))
}

/// A request carrying `nonce`.
#[must_use]
pub fn request(nonce: u64) -> [u8; LEN] {
    message(REQUEST, 0, nonce)
}

/// The nonce of a well-formed request; anything else is `None`.
#[must_use]
pub fn parse_request(b: &[u8]) -> Option<u64> {
    parse(REQUEST, b).filter(|(flags, _)| *flags == 0).map(|(_, nonce)| nonce)
}

/// The answer to the request that carried `nonce`.
#[must_use]
pub fn reply(nonce: u64, forwarding: bool) -> [u8; LEN] {
    message(REPLY, u8::from(forwarding), nonce)
}

/// `(nonce, forwarding)` of a well-formed reply; anything else is `None`.
#[must_use]
pub fn parse_reply(b: &[u8]) -> Option<(u64, bool)> {
    match parse(REPLY, b)? {
        (0, nonce) => Some((nonce, false)),
        (1, nonce) => Some((nonce, true)),
        _ => None,
    }
}

// Reachability: which remote clusters a gateway's tunnels reach, for cluster-set DNS and the
// nodes' service programs. The list can be longer than one datagram, so it comes in pages,
// each the answer to a request of the same size (the request is padded: still nothing to
// amplify). A gateway numbers each version of its list (the epoch); a reader that has the
// current one gets a short "unchanged" answer.

/// Length of a reachability request, and the most a reply may take.
pub const HEALTH_LEN: usize = 1200;
const HEALTH_REQUEST: [u8; 4] = *b"CWNH";
const HEALTH_REPLY: [u8; 4] = *b"CWNR";
const HEALTH_HEADER: usize = 32;
const UNCHANGED: u8 = 1;

/// The remote clusters a gateway reaches, numbered by version.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reachable {
    pub epoch: u64,
    /// Sorted cluster ids.
    pub clusters: Vec<String>,
}

impl Reachable {
    /// Replaces the list, moving to a new epoch when it changed.
    pub fn set(&mut self, clusters: impl IntoIterator<Item = String>) {
        let mut clusters: Vec<String> = clusters.into_iter().collect();
        clusters.sort();
        clusters.dedup();
        if clusters != self.clusters || self.epoch == 0 {
            self.clusters = clusters;
            self.epoch += 1;
        }
    }

    /// The list cut into pages that fit a reply.
    fn pages(&self) -> Vec<&[String]> {
        let mut pages = Vec::new();
        let (mut start, mut used) = (0, HEALTH_HEADER);
        for (i, c) in self.clusters.iter().enumerate() {
            let need = 1 + c.len().min(255);
            if used + need > HEALTH_LEN {
                pages.push(&self.clusters[start..i]);
                (start, used) = (i, HEALTH_HEADER);
            }
            used += need;
        }
        pages.push(&self.clusters[start..]);
        pages
    }
}

/// A request for `page` of the list, from a reader that has `known_epoch` (0: none).
#[must_use]
pub fn health_request(nonce: u64, known_epoch: u64, page: u16) -> [u8; HEALTH_LEN] {
    let mut m = [0u8; HEALTH_LEN];
    m[..4].copy_from_slice(&HEALTH_REQUEST);
    m[4] = VERSION;
    m[8..16].copy_from_slice(&nonce.to_be_bytes());
    m[16..24].copy_from_slice(&known_epoch.to_be_bytes());
    m[24..26].copy_from_slice(&page.to_be_bytes());
    m
}

/// `(nonce, known_epoch, page)` of a well-formed request (full length, zero padding).
#[must_use]
pub fn parse_health_request(b: &[u8]) -> Option<(u64, u64, u16)> {
    if b.len() != HEALTH_LEN || b[..4] != HEALTH_REQUEST || b[4] != VERSION || b[5..8] != [0, 0, 0] {
        return None;
    }
    if b[26..].iter().any(|x| *x != 0) {
        return None;
    }
    Some((
        u64::from_be_bytes(b[8..16].try_into().ok()?),
        u64::from_be_bytes(b[16..24].try_into().ok()?),
        u16::from_be_bytes(b[24..26].try_into().ok()?),
    ))
}

/// One page of a gateway's list, as a reader gets it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthPage {
    pub nonce: u64,
    pub epoch: u64,
    pub page: u16,
    pub pages: u16,
    /// The reader's epoch is current: no clusters sent.
    pub unchanged: bool,
    pub clusters: Vec<String>,
}

/// The answer to a request: "unchanged" when the reader has the current epoch, else the page
/// asked for (an empty last page past the end).
#[must_use]
pub fn health_reply(nonce: u64, known_epoch: u64, page: u16, r: &Reachable) -> Vec<u8> {
    let pages = r.pages();
    let unchanged = known_epoch == r.epoch;
    let mut m = vec![0u8; HEALTH_HEADER];
    m[..4].copy_from_slice(&HEALTH_REPLY);
    m[4] = VERSION;
    m[5] = if unchanged { UNCHANGED } else { 0 };
    m[8..16].copy_from_slice(&nonce.to_be_bytes());
    m[16..24].copy_from_slice(&r.epoch.to_be_bytes());
    m[24..26].copy_from_slice(&page.to_be_bytes());
    m[26..28].copy_from_slice(&u16::try_from(pages.len()).unwrap_or(u16::MAX).to_be_bytes());
    let body: &[String] = if unchanged { &[] } else { pages.get(usize::from(page)).copied().unwrap_or(&[]) };
    m[28..30].copy_from_slice(&u16::try_from(body.len()).unwrap_or(u16::MAX).to_be_bytes());
    for c in body {
        let bytes = &c.as_bytes()[..c.len().min(255)];
        m.push(u8::try_from(bytes.len()).unwrap_or(u8::MAX));
        m.extend_from_slice(bytes);
    }
    m
}

/// A well-formed reply: cluster ids are DNS labels, the count matches, nothing trails.
#[must_use]
pub fn parse_health_reply(b: &[u8]) -> Option<HealthPage> {
    if b.len() < HEALTH_HEADER || b.len() > HEALTH_LEN || b[..4] != HEALTH_REPLY || b[4] != VERSION {
        return None;
    }
    let unchanged = match b[5] {
        0 => false,
        UNCHANGED => true,
        _ => return None,
    };
    let nonce = u64::from_be_bytes(b[8..16].try_into().ok()?);
    let epoch = u64::from_be_bytes(b[16..24].try_into().ok()?);
    let page = u16::from_be_bytes(b[24..26].try_into().ok()?);
    let pages = u16::from_be_bytes(b[26..28].try_into().ok()?);
    let count = usize::from(u16::from_be_bytes(b[28..30].try_into().ok()?));
    let mut rest = &b[HEALTH_HEADER..];
    let mut clusters = Vec::with_capacity(count.min(HEALTH_LEN));
    for _ in 0..count {
        let (&len, tail) = rest.split_first()?;
        let (id, tail) = tail.split_at_checked(usize::from(len))?;
        let id = std::str::from_utf8(id).ok()?;
        let label = !id.is_empty()
            && id.len() <= 63
            && id.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
            && !id.starts_with('-')
            && !id.ends_with('-');
        if !label {
            return None;
        }
        clusters.push(id.to_owned());
        rest = tail;
    }
    if !rest.is_empty() || (unchanged && count != 0) || page >= pages.max(1) {
        return None;
    }
    Some(HealthPage { nonce, epoch, page, pages, unchanged, clusters })
}

/// How long a gateway's list counts after its last answer: the probes' detection time plus
/// slack for one late answer. Readers (route agents, cluster-set DNS) pass it to
/// [`HealthReader::reachable`].
pub const HEALTH_WITHIN: Duration = Duration::from_millis(350);

/// A reader's view of its cluster's gateways' lists (sans IO): ask each gateway every probe
/// interval; a remote cluster is reachable when a gateway that answered within the detection
/// time lists it.
#[derive(Debug, Default)]
pub struct HealthReader {
    outstanding: BTreeMap<u64, (IpAddr, u16, Instant)>,
    gateways: BTreeMap<IpAddr, GatewayList>,
}

#[derive(Debug, Default, Clone)]
struct GatewayList {
    /// The complete list at `epoch`.
    epoch: u64,
    clusters: Vec<String>,
    /// Pages of a newer epoch being gathered.
    gathering: Option<(u64, u16, BTreeMap<u16, Vec<String>>)>,
    last_answer: Option<Instant>,
}

impl HealthReader {
    /// The next request to `gateway`: page 0 with the epoch held, or the next missing page of
    /// a newer list being gathered.
    pub fn request(&mut self, gateway: IpAddr, now: Instant) -> [u8; HEALTH_LEN] {
        self.outstanding.retain(|_, (_, _, at)| now.saturating_duration_since(*at) < ANSWER_WITHIN);
        let g = self.gateways.entry(gateway).or_default();
        let (known, page) = match &g.gathering {
            Some((_, pages, got)) => (g.epoch, (0..*pages).find(|p| !got.contains_key(p)).unwrap_or(0)),
            None => (g.epoch, 0),
        };
        let nonce = rand_core::RngCore::next_u64(&mut rand_core::OsRng);
        self.outstanding.insert(nonce, (gateway, page, now));
        health_request(nonce, known, page)
    }

    /// A datagram from `from`: counts only as the answer to one of our requests to it.
    /// Returns whether a gateway's complete list changed.
    pub fn on_reply(&mut self, from: IpAddr, b: &[u8], now: Instant) -> bool {
        let Some(p) = parse_health_reply(b) else {
            debug!(%from, len = b.len(), "ignoring a datagram that is no reachability reply");
            return false;
        };
        match self.outstanding.get(&p.nonce) {
            Some((to, page, _)) if *to == from && *page == p.page => {}
            _ => return false,
        }
        self.outstanding.remove(&p.nonce);
        let Some(g) = self.gateways.get_mut(&from) else { return false };
        g.last_answer = Some(now);
        if p.unchanged && p.epoch == g.epoch {
            return false;
        }
        if p.unchanged {
            // "Unchanged" against an epoch we do not hold: a confused or lying gateway; ask
            // afresh.
            g.epoch = 0;
            return false;
        }
        let gathering = match &mut g.gathering {
            Some((epoch, pages, got)) if *epoch == p.epoch && *pages == p.pages => got,
            _ => {
                g.gathering = Some((p.epoch, p.pages.max(1), BTreeMap::new()));
                &mut g.gathering.as_mut().expect("just set").2
            }
        };
        gathering.insert(p.page, p.clusters);
        let pages = p.pages.max(1);
        if gathering.len() < usize::from(pages) {
            return false;
        }
        let clusters: Vec<String> = gathering.values().flatten().cloned().collect();
        g.gathering = None;
        g.epoch = p.epoch;
        let changed = clusters != g.clusters;
        g.clusters = clusters;
        changed
    }

    /// The remote clusters reachable at `now` through any gateway that answered within
    /// `within`; `None` while no gateway has ever answered (nothing to judge by).
    #[must_use]
    pub fn reachable(&self, now: Instant, within: Duration) -> Option<std::collections::BTreeSet<String>> {
        if self.gateways.values().all(|g| g.last_answer.is_none()) {
            return None;
        }
        Some(
            self.gateways
                .values()
                .filter(|g| g.last_answer.is_some_and(|t| now.saturating_duration_since(t) <= within))
                .flat_map(|g| g.clusters.iter().cloned())
                .collect(),
        )
    }

    /// Whether pages of a newer list from `gateway` are still missing (ask again at once).
    #[must_use]
    pub fn gathering(&self, gateway: IpAddr) -> bool {
        self.gateways.get(&gateway).is_some_and(|g| g.gathering.is_some())
    }

    /// Forgets gateways not in `keep`.
    pub fn retain(&mut self, keep: &[IpAddr]) {
        self.gateways.retain(|ip, _| keep.contains(ip));
        self.outstanding.retain(|_, (ip, _, _)| keep.contains(ip));
    }
}

/// The agent's probes and what they found, per gateway node address.
#[derive(Debug, Default)]
pub struct Prober {
    /// Requests awaiting their answer: nonce → (gateway, sent at).
    outstanding: BTreeMap<u64, (IpAddr, Instant)>,
    evidence: BTreeMap<IpAddr, Evidence>,
    /// Whether any gateway ever answered: a node whose probes nobody answers (gateways without
    /// the probe port, or a firewall in between) follows the control plane alone.
    answered: bool,
}

impl Prober {
    /// A request to `gateway`, with a fresh random nonce (a spoofer on the LAN has to guess
    /// it to speak for a gateway).
    pub fn probe(&mut self, gateway: IpAddr, now: Instant) -> [u8; LEN] {
        self.outstanding.retain(|_, (_, at)| now.saturating_duration_since(*at) < ANSWER_WITHIN);
        let nonce = rand_core::RngCore::next_u64(&mut rand_core::OsRng);
        self.outstanding.insert(nonce, (gateway, now));
        self.evidence.entry(gateway).or_default().probing_since.get_or_insert(now);
        request(nonce)
    }

    /// A datagram from `from`: counts only as the answer to one of our requests to that very
    /// address, and only when the gateway says it forwards.
    pub fn on_reply(&mut self, from: IpAddr, b: &[u8], now: Instant) {
        let Some((nonce, forwarding)) = parse_reply(b) else {
            debug!(%from, len = b.len(), "ignoring a datagram that is no probe reply");
            return;
        };
        match self.outstanding.get(&nonce) {
            Some((to, _)) if *to == from => {}
            _ => {
                debug!(%from, "ignoring a probe reply to no request of ours");
                return;
            }
        }
        self.outstanding.remove(&nonce);
        self.answered = true;
        if forwarding && let Some(e) = self.evidence.get_mut(&from) {
            e.last_answer = Some(now);
        }
    }

    #[must_use]
    pub fn evidence(&self, gateway: IpAddr) -> Evidence {
        self.evidence.get(&gateway).copied().unwrap_or_default()
    }

    /// Whether any gateway has ever answered.
    #[must_use]
    pub fn answered(&self) -> bool {
        self.answered
    }

    /// Forgets gateways not in `keep`.
    pub fn retain(&mut self, keep: &[IpAddr]) {
        self.evidence.retain(|ip, _| keep.contains(ip));
        self.outstanding.retain(|_, (ip, _)| keep.contains(ip));
    }
}

/// Answers node probes and reachability requests on `socket` until the task is dropped:
/// `forwarding` and `reachable` say what to answer.
pub async fn serve(
    socket: tokio::net::UdpSocket,
    forwarding: Arc<AtomicBool>,
    reachable: Arc<std::sync::RwLock<Reachable>>,
) {
    let mut buf = [0u8; HEALTH_LEN + 1];
    loop {
        let (n, from): (usize, SocketAddr) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "node probe socket");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let answer = if let Some(nonce) = parse_request(&buf[..n]) {
            reply(nonce, forwarding.load(Ordering::Relaxed)).to_vec()
        } else if let Some((nonce, known, page)) = parse_health_request(&buf[..n]) {
            health_reply(nonce, known, page, &reachable.read().expect("reachable lock"))
        } else {
            continue;
        };
        if let Err(e) = socket.send_to(&answer, from).await {
            debug!(%from, error = %e, "answering a node probe failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_round_trip_and_anything_else_is_refused() {
        assert_eq!(parse_request(&request(42)), Some(42));
        assert_eq!(parse_reply(&reply(42, true)), Some((42, true)));
        assert_eq!(parse_reply(&reply(7, false)), Some((7, false)));
        // A reply is no request and the other way round; the answer is never longer.
        assert_eq!(parse_request(&reply(42, true)), None);
        assert_eq!(parse_reply(&request(42)), None);
        assert_eq!(reply(1, true).len(), request(1).len());
        // Wrong length, version, reserved bytes or flags: refused.
        let good = request(9);
        assert_eq!(parse_request(&good[..15]), None);
        assert_eq!(parse_request(&[good.as_slice(), &[0]].concat()), None);
        for (at, value) in [(4, 2), (5, 1), (6, 1), (7, 9), (0, b'X')] {
            let mut bad = good;
            bad[at] = value;
            assert_eq!(parse_request(&bad), None, "byte {at} = {value}");
        }
        let mut bad = reply(9, true);
        bad[5] = 2;
        assert_eq!(parse_reply(&bad), None, "unknown flags");
        assert_eq!(parse_request(&[]), None);
        assert_eq!(parse_reply(b"garbage garbage!"), None);
    }

    #[test]
    fn only_answers_to_our_own_requests_from_the_gateway_asked_count() {
        let t0 = Instant::now();
        let (gw1, gw2): (IpAddr, IpAddr) = ("172.20.1.1".parse().unwrap(), "172.21.1.1".parse().unwrap());
        let mut p = Prober::default();
        let q1 = p.probe(gw1, t0);
        let q2 = p.probe(gw2, t0);
        let n1 = parse_request(&q1).unwrap();
        let n2 = parse_request(&q2).unwrap();
        assert_ne!(n1, n2, "fresh nonces");
        assert_eq!(p.evidence(gw1).probing_since, Some(t0));
        // gw2 answers gw1's nonce (a spoofer that saw it, or a confused host): ignored.
        p.on_reply(gw2, &reply(n1, true), t0);
        assert_eq!(p.evidence(gw2).last_answer, None);
        assert!(!p.answered());
        // An unknown nonce, garbage, a request: ignored.
        p.on_reply(gw1, &reply(n1 ^ 1, true), t0);
        p.on_reply(gw1, b"not a probe reply", t0);
        p.on_reply(gw1, &q1, t0);
        assert_eq!(p.evidence(gw1).last_answer, None);
        // The real answers: gw1 forwards, gw2 is up but says it does not.
        let t1 = t0 + Duration::from_millis(3);
        p.on_reply(gw1, &reply(n1, true), t1);
        p.on_reply(gw2, &reply(n2, false), t1);
        assert_eq!(p.evidence(gw1).last_answer, Some(t1));
        assert_eq!(p.evidence(gw2).last_answer, None, "not forwarding is no answer");
        assert!(p.answered());
        // A replayed answer counts once.
        let t2 = t1 + Duration::from_millis(500);
        p.on_reply(gw1, &reply(n1, true), t2);
        assert_eq!(p.evidence(gw1).last_answer, Some(t1));
    }

    #[test]
    fn unanswered_requests_are_forgotten_and_so_are_gateways_that_leave() {
        let t0 = Instant::now();
        let gw: IpAddr = "172.20.1.1".parse().unwrap();
        let mut p = Prober::default();
        let n = parse_request(&p.probe(gw, t0)).unwrap();
        // Long after: the next probe drops the stale request, so its late answer is no answer.
        p.probe(gw, t0 + ANSWER_WITHIN);
        p.on_reply(gw, &reply(n, true), t0 + ANSWER_WITHIN);
        assert_eq!(p.evidence(gw).last_answer, None);
        assert_eq!(p.outstanding.len(), 1);
        p.retain(&[]);
        assert!(p.outstanding.is_empty());
        assert_eq!(p.evidence(gw), Evidence::default());
    }

    fn ids(n: usize, len: usize) -> Vec<String> {
        (0..n).map(|i| format!("{i:0>len$}")).collect()
    }

    #[test]
    fn reachability_pages_round_trip_and_never_outgrow_the_request() {
        let mut r = Reachable::default();
        r.set(ids(300, 40));
        assert_eq!(r.epoch, 1);
        r.set(ids(300, 40));
        assert_eq!(r.epoch, 1, "the same list keeps its epoch");
        let pages = r.pages().len();
        assert!(pages > 1, "300 ids of 40 bytes take several pages");
        let mut got = Vec::new();
        for page in 0..pages {
            let req = health_request(9, 0, u16::try_from(page).unwrap());
            assert_eq!(parse_health_request(&req), Some((9, 0, u16::try_from(page).unwrap())));
            let reply = health_reply(9, 0, u16::try_from(page).unwrap(), &r);
            assert!(reply.len() <= req.len(), "a reply is never larger than its request");
            let p = parse_health_reply(&reply).unwrap();
            assert_eq!((p.epoch, p.pages, p.unchanged), (1, u16::try_from(pages).unwrap(), false));
            got.extend(p.clusters);
        }
        assert_eq!(got, r.clusters);
        // A reader with the current epoch gets "unchanged" and no ids.
        let p = parse_health_reply(&health_reply(9, 1, 0, &r)).unwrap();
        assert!(p.unchanged && p.clusters.is_empty());
        // An empty list is one empty page.
        let empty = Reachable { epoch: 3, clusters: vec![] };
        let p = parse_health_reply(&health_reply(1, 0, 0, &empty)).unwrap();
        assert_eq!((p.pages, p.clusters.len()), (1, 0));
    }

    #[test]
    fn malformed_reachability_messages_are_refused() {
        let req = health_request(1, 2, 3);
        assert_eq!(parse_health_request(&req[..HEALTH_LEN - 1]), None, "short");
        let mut bad = req;
        bad[HEALTH_LEN - 1] = 1;
        assert_eq!(parse_health_request(&bad), None, "padding must be zero");
        assert_eq!(parse_health_request(&request(1)), None, "a node probe is no health request");
        let r = Reachable { epoch: 1, clusters: vec!["east".into(), "west".into()] };
        let good = health_reply(5, 0, 0, &r);
        assert!(parse_health_reply(&good).is_some());
        for (what, bytes) in [
            ("trailing", [good.as_slice(), b"x"].concat()),
            ("count too high", {
                let mut b = good.clone();
                b[29] = 3;
                b
            }),
            ("an id that is no DNS label", {
                let mut b = good.clone();
                b[HEALTH_HEADER + 1] = b'E';
                b
            }),
            ("length past the end", {
                let mut b = good.clone();
                b[HEALTH_HEADER] = 200;
                b
            }),
            ("unknown flags", {
                let mut b = good.clone();
                b[5] = 7;
                b
            }),
            ("page past the pages", {
                let mut b = good.clone();
                b[25] = 4;
                b
            }),
            ("too long", vec![0u8; HEALTH_LEN + 1]),
        ] {
            assert_eq!(parse_health_reply(&bytes), None, "{what}");
        }
    }

    #[test]
    fn a_reader_gathers_pages_trusts_only_its_own_requests_and_forgets_silent_gateways() {
        let t0 = Instant::now();
        let (gw1, gw2): (IpAddr, IpAddr) = ("172.20.1.1".parse().unwrap(), "172.21.1.1".parse().unwrap());
        let mut r1 = Reachable::default();
        r1.set(ids(300, 40));
        let mut reader = HealthReader::default();
        assert_eq!(reader.reachable(t0, Duration::from_millis(300)), None, "nothing heard yet");
        // gw1's list takes several requests, each for the next missing page.
        let mut rounds = 0;
        loop {
            let req = reader.request(gw1, t0);
            let (nonce, known, page) = parse_health_request(&req).unwrap();
            // A spoofed answer from gw2 to gw1's request, and a reply to no request: ignored.
            assert!(!reader.on_reply(gw2, &health_reply(nonce, known, page, &r1), t0));
            assert!(!reader.on_reply(gw1, &health_reply(nonce ^ 1, known, page, &r1), t0));
            let complete = reader.on_reply(gw1, &health_reply(nonce, known, page, &r1), t0);
            rounds += 1;
            if complete {
                break;
            }
            assert!(rounds < 20);
        }
        assert_eq!(rounds, r1.pages().len());
        assert_eq!(reader.reachable(t0, Duration::from_millis(300)).unwrap().len(), 300);
        // The next request carries the epoch and gets "unchanged".
        let req = reader.request(gw1, t0);
        let (nonce, known, page) = parse_health_request(&req).unwrap();
        assert_eq!((known, page), (1, 0));
        assert!(!reader.on_reply(gw1, &health_reply(nonce, known, page, &r1), t0));
        // A list that shrinks is taken in one page.
        r1.set(vec!["west".to_owned()]);
        let req = reader.request(gw1, t0);
        let (nonce, known, page) = parse_health_request(&req).unwrap();
        assert!(reader.on_reply(gw1, &health_reply(nonce, known, page, &r1), t0));
        assert_eq!(reader.reachable(t0, Duration::from_millis(300)), Some(["west".to_owned()].into()));
        // gw1 goes silent: past the detection time nothing is reachable through it.
        let later = t0 + Duration::from_millis(301);
        assert_eq!(reader.reachable(later, Duration::from_millis(300)), Some(Default::default()));
    }

    #[tokio::test]
    async fn the_responder_answers_requests_with_what_the_gateway_says_and_ignores_the_rest() {
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let forwarding = Arc::new(AtomicBool::new(true));
        let task = tokio::spawn(serve(server, forwarding.clone(), Arc::default()));
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = [0u8; 64];
        let ask = |nonce: u64| request(nonce);
        // Junk first: no answer to it (the next datagram read is the answer to the request).
        client.send_to(b"junk", addr).await.unwrap();
        client.send_to(&reply(1, true), addr).await.unwrap();
        client.send_to(&ask(5), addr).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf)).await.unwrap().unwrap();
        assert_eq!(parse_reply(&buf[..n]), Some((5, true)));
        forwarding.store(false, Ordering::Relaxed);
        client.send_to(&ask(6), addr).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf)).await.unwrap().unwrap();
        assert_eq!(parse_reply(&buf[..n]), Some((6, false)));
        task.abort();
    }

    #[tokio::test]
    async fn the_responder_serves_reachability_pages_and_ignores_short_requests() {
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let reachable = Arc::new(std::sync::RwLock::new(Reachable::default()));
        reachable.write().unwrap().set(["west".to_owned(), "east".to_owned()]);
        let task = tokio::spawn(serve(server, Arc::default(), reachable.clone()));
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = vec![0u8; HEALTH_LEN + 1];
        // A short (unpadded) request would be an amplifier: no answer. Then a real one: the
        // next datagram is its answer.
        client.send_to(&health_request(1, 0, 0)[..64], addr).await.unwrap();
        client.send_to(&health_request(2, 0, 0), addr).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf)).await.unwrap().unwrap();
        let page = parse_health_reply(&buf[..n]).unwrap();
        assert_eq!(
            (page.nonce, page.epoch, page.clusters.clone()),
            (2, 1, vec!["east".to_owned(), "west".to_owned()])
        );
        // The list changes: a new epoch, and a reader with the old one gets it whole.
        reachable.write().unwrap().set(["east".to_owned()]);
        client.send_to(&health_request(3, 1, 0), addr).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf)).await.unwrap().unwrap();
        let page = parse_health_reply(&buf[..n]).unwrap();
        assert_eq!((page.epoch, page.unchanged, page.clusters), (2, false, vec!["east".to_owned()]));
        task.abort();
    }
}
