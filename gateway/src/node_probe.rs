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

/// Answers node probes on `socket` until the task is dropped: `forwarding` says what to answer.
pub async fn serve(socket: tokio::net::UdpSocket, forwarding: Arc<AtomicBool>) {
    let mut buf = [0u8; 64];
    loop {
        let (n, from): (usize, SocketAddr) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "node probe socket");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(nonce) = parse_request(&buf[..n]) else { continue };
        if let Err(e) = socket.send_to(&reply(nonce, forwarding.load(Ordering::Relaxed)), from).await {
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

    #[tokio::test]
    async fn the_responder_answers_requests_with_what_the_gateway_says_and_ignores_the_rest() {
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let forwarding = Arc::new(AtomicBool::new(true));
        let task = tokio::spawn(serve(server, forwarding.clone()));
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
}
