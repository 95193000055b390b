//! The gateway's registration with the broker's relay, sans IO: sent from the WireGuard socket
//! (so the relay delivers to the NAT mapping the tunnels use), every second until
//! acknowledged, then every [`RENEW`] (inside the relay's 90 s expiry and the shortest common
//! NAT UDP timeout). Its MAC is keyed by the SHA-256 of the cluster's broker token. Where UDP
//! to the relay goes unanswered, the frames take a stream on the broker's HTTPS port instead
//! ([`Transport::Stream`], carried by the cable's proxy), and UDP is tried again now and then.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use causeway_broker_api::relay;
use tracing::{debug, info};

/// How often a registration is renewed once acknowledged.
pub const RENEW: Duration = Duration::from_secs(20);
/// How often it is sent while unacknowledged.
pub const RETRY: Duration = Duration::from_secs(1);
/// An acknowledgement older than this no longer counts (the relay forgets after 90 s).
pub const FORGET_AFTER: Duration = Duration::from_secs(60);
/// A transport that has left a registration unanswered this long gives way to the other
/// (when the stream is allowed): UDP to the relay blocked → the stream; the stream broken →
/// UDP again.
pub const SWITCH_AFTER: Duration = Duration::from_secs(3);
/// While on the stream, UDP is tried again this often (a firewall opened, a path healed).
pub const UDP_RETRY: Duration = Duration::from_secs(120);
/// A UDP try unanswered this long: the stream registers again at once (the relay may have
/// moved us to the UDP address, whose answers do not reach us).
pub const PROBE_WAIT: Duration = Duration::from_secs(2);

/// How relay frames travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Datagrams to the relay's UDP address, from the WireGuard socket.
    Udp,
    /// A stream on the broker's HTTPS port (for sites whose UDP to the relay is blocked).
    Stream,
}

impl Transport {
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Stream => "https",
        }
    }
}

/// Opens a relay stream (an upgraded connection to the broker's API port).
pub type StreamOpener = std::sync::Arc<
    dyn Fn() -> futures::future::BoxFuture<'static, std::io::Result<Box<dyn RelayIo>>> + Send + Sync,
>;

/// What a relay stream is: bytes both ways.
pub trait RelayIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> RelayIo for T {}

/// Where the relay is and what to register with.
#[derive(Clone)]
pub struct RelaySettings {
    pub server: SocketAddr,
    /// SHA-256 of the cluster's broker token: the registration's MAC key.
    pub token_sha256: [u8; 32],
    /// How to reach the relay when UDP to it is blocked (none: UDP only).
    pub stream: Option<StreamOpener>,
}

impl std::fmt::Debug for RelaySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelaySettings")
            .field("server", &self.server)
            .field("stream", &self.stream.is_some())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub struct RelayClient {
    settings: Option<RelaySettings>,
    key: [u8; 32],
    /// Whether the stream may carry frames (the cable runs its proxy).
    stream: bool,
    transport: Transport,
    /// The registration outstanding: its transport and nonce.
    pending: Option<(Transport, [u8; 8])>,
    /// A UDP try while on the stream: its nonce and when it left.
    probe: Option<([u8; 8], Instant)>,
    last_probe: Option<Instant>,
    last_sent: Option<Instant>,
    /// Since when the current transport has left a registration unanswered.
    unanswered_since: Option<Instant>,
    acknowledged: Option<Instant>,
    /// The last registration's timestamp: each is newer than the one before (the relay
    /// refuses any other as a replay), whatever the clock does.
    last_timestamp: u64,
}

impl Default for RelayClient {
    fn default() -> Self {
        Self::new(None, [0; 32])
    }
}

impl RelayClient {
    #[must_use]
    pub fn new(settings: Option<RelaySettings>, key: [u8; 32]) -> Self {
        Self {
            settings,
            key,
            stream: false,
            transport: Transport::Udp,
            pending: None,
            probe: None,
            last_probe: None,
            last_sent: None,
            unanswered_since: None,
            acknowledged: None,
            last_timestamp: 0,
        }
    }

    /// Lets the stream carry frames when UDP gets no answer.
    #[must_use]
    pub fn with_stream(mut self) -> Self {
        self.stream = true;
        self
    }

    /// The relay's address, when it holds a current registration of ours.
    #[must_use]
    pub fn server(&self) -> Option<SocketAddr> {
        self.settings.as_ref().map(|s| s.server)
    }

    /// How frames travel now.
    #[must_use]
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// The relay, while our registration is acknowledged and current at `now`.
    #[must_use]
    pub fn registered(&self, now: Instant) -> Option<SocketAddr> {
        self.acknowledged.filter(|t| now.saturating_duration_since(*t) < FORGET_AFTER).and(self.server())
    }

    fn timestamp(&mut self, unix_ms: u64) -> u64 {
        self.last_timestamp = unix_ms.max(self.last_timestamp + 1);
        self.last_timestamp
    }

    /// The registrations to send at `now` (`unix_ms`: the wall clock), each with the
    /// transport it goes by; `nonce` is drawn for each.
    pub fn poll(
        &mut self,
        now: Instant,
        unix_ms: u64,
        mut nonce: impl FnMut() -> [u8; 8],
    ) -> Vec<(Transport, Vec<u8>)> {
        let Some(s) = self.settings.clone() else { return Vec::new() };
        let mut out = Vec::new();
        if self.stream
            && self.unanswered_since.is_some_and(|t| now.saturating_duration_since(t) >= SWITCH_AFTER)
        {
            let from = self.transport;
            self.transport = match from {
                Transport::Udp => Transport::Stream,
                Transport::Stream => Transport::Udp,
            };
            info!(
                from = from.name(),
                to = self.transport.name(),
                "relay unanswered; trying the other transport"
            );
            (self.unanswered_since, self.pending, self.last_sent, self.probe) = (None, None, None, None);
            self.last_probe = Some(now);
        }
        // A UDP try that went unanswered: the stream registers again now.
        if self.probe.is_some_and(|(_, at)| now.saturating_duration_since(at) >= PROBE_WAIT) {
            self.probe = None;
            self.last_sent = None;
        }
        let every = if self.registered(now).is_some() && self.pending.is_none() { RENEW } else { RETRY };
        if self.last_sent.is_none_or(|t| now.saturating_duration_since(t) >= every) {
            let n = nonce();
            self.pending = Some((self.transport, n));
            self.last_sent = Some(now);
            self.unanswered_since.get_or_insert(now);
            let ts = self.timestamp(unix_ms);
            out.push((self.transport, relay::register(&s.token_sha256, self.key, ts, n)));
        }
        if self.transport == Transport::Stream
            && self.registered(now).is_some()
            && self.probe.is_none()
            && self.last_probe.is_none_or(|t| now.saturating_duration_since(t) >= UDP_RETRY)
        {
            let n = nonce();
            self.probe = Some((n, now));
            self.last_probe = Some(now);
            let ts = self.timestamp(unix_ms);
            out.push((Transport::Udp, relay::register(&s.token_sha256, self.key, ts, n)));
        }
        out
    }

    /// A refusal that came by `via` of the registration outstanding there (the relay does not
    /// know our key yet, say): the relay is reachable that way, so no switch of transport;
    /// the registration is retried every second. Returns whether it was ours.
    pub fn on_refused(&mut self, via: Transport, key: &[u8; 32], nonce: &[u8; 8]) -> bool {
        if self.settings.is_none() || *key != self.key || self.pending != Some((via, *nonce)) {
            return false;
        }
        debug!(transport = via.name(), "relay refused our registration; retrying");
        self.pending = None;
        self.unanswered_since = None;
        true
    }

    /// An acknowledgement that came by `via`: taken only for our key and the nonce of a
    /// registration outstanding on that transport. One answering a UDP try moves us back to
    /// UDP. Returns whether it was taken.
    pub fn on_registered(&mut self, via: Transport, key: &[u8; 32], nonce: &[u8; 8], now: Instant) -> bool {
        if self.settings.is_none() || *key != self.key {
            return false;
        }
        if self.pending == Some((via, *nonce)) {
            self.pending = None;
        } else if via == Transport::Udp && self.probe.is_some_and(|(n, _)| n == *nonce) {
            info!("relay answers on UDP again; leaving the stream");
            (self.transport, self.probe, self.pending) = (Transport::Udp, None, None);
        } else {
            return false;
        }
        self.acknowledged = Some(now);
        self.unanswered_since = None;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> RelaySettings {
        RelaySettings {
            server: "172.31.0.2:3478".parse().unwrap(),
            token_sha256: relay::token_sha256("cw1_x"),
            stream: None,
        }
    }

    fn one(mut v: Vec<(Transport, Vec<u8>)>) -> Option<(Transport, Vec<u8>)> {
        assert!(v.len() <= 1, "{} registrations at once", v.len());
        v.pop()
    }

    fn parsed(frame: &[u8]) -> relay::Register {
        let Ok(relay::Frame::Register(r)) = relay::parse(frame) else { panic!("not a registration") };
        r
    }

    #[test]
    fn registers_until_acknowledged_then_renews_and_lapses() {
        let t0 = Instant::now();
        let mut c = RelayClient::new(Some(settings()), [1; 32]);
        let (via, frame) = one(c.poll(t0, 1_000, || [3; 8])).unwrap();
        assert_eq!(via, Transport::Udp);
        let r = parsed(&frame);
        assert!(r.verify(&settings().token_sha256));
        assert_eq!((r.key, r.timestamp_ms, r.nonce), ([1; 32], 1_000, [3; 8]));
        assert!(c.poll(t0 + Duration::from_millis(500), 1_500, || [4; 8]).is_empty());
        assert!(c.registered(t0).is_none());
        // Forged acknowledgements: by the stream we never used, for another key, with another
        // nonce.
        assert!(!c.on_registered(Transport::Stream, &[1; 32], &[3; 8], t0));
        assert!(!c.on_registered(Transport::Udp, &[2; 32], &[3; 8], t0));
        assert!(!c.on_registered(Transport::Udp, &[1; 32], &[4; 8], t0));
        assert!(c.registered(t0).is_none());
        assert!(c.on_registered(Transport::Udp, &[1; 32], &[3; 8], t0));
        assert_eq!(c.registered(t0), Some(settings().server));
        // Replayed: the same acknowledgement again is not taken.
        assert!(!c.on_registered(Transport::Udp, &[1; 32], &[3; 8], t0));
        // Renewed every 20 s; a lapse of a minute without an answer unregisters.
        assert!(c.poll(t0 + RETRY, 2_000, || [5; 8]).is_empty());
        assert!(one(c.poll(t0 + RENEW, 21_000, || [6; 8])).is_some());
        assert!(one(c.poll(t0 + RENEW + RETRY, 22_000, || [7; 8])).is_some(), "unanswered: every second");
        // Without a stream, UDP it stays however long it goes unanswered.
        for s in 2..10 {
            let (via, _) = one(c.poll(t0 + RENEW + RETRY * s, 23_000, || [8; 8])).unwrap();
            assert_eq!(via, Transport::Udp);
        }
        assert!(c.registered(t0 + FORGET_AFTER).is_none());
        // Without settings, nothing.
        assert!(RelayClient::new(None, [1; 32]).poll(t0, 0, || [0; 8]).is_empty());
    }

    #[test]
    fn udp_unanswered_moves_to_the_stream_and_a_udp_answer_moves_back() {
        let t0 = Instant::now();
        let mut c = RelayClient::new(Some(settings()), [1; 32]).with_stream();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // UDP, three times a second apart, unanswered...
        for s in 0..3 {
            assert_eq!(one(c.poll(at(s * 1000), 0, || [1; 8])).unwrap().0, Transport::Udp);
        }
        // ...then the stream, at once.
        let (via, frame) = one(c.poll(at(3000), 0, || [2; 8])).unwrap();
        assert_eq!((via, c.transport()), (Transport::Stream, Transport::Stream));
        // Timestamps only grow, even with a clock that stands still.
        assert_eq!(parsed(&frame).timestamp_ms, 4);
        // An answer by UDP to the stream's registration is not taken.
        assert!(!c.on_registered(Transport::Udp, &[1; 32], &[2; 8], at(3100)));
        assert!(c.on_registered(Transport::Stream, &[1; 32], &[2; 8], at(3100)));
        assert_eq!(c.registered(at(3100)), Some(settings().server));
        // Renewed on the stream (every renewal answered); UDP is tried again two minutes after
        // the switch, and not answered.
        let mut udp_tries = Vec::new();
        let mut n = 10u8;
        for ms in (3200..=3000 + 121_000).step_by(100) {
            for (via, frame) in c.poll(at(ms), 0, || {
                n = n.wrapping_add(1);
                [n; 8]
            }) {
                let r = parsed(&frame);
                match via {
                    Transport::Stream => assert!(c.on_registered(via, &[1; 32], &r.nonce, at(ms))),
                    Transport::Udp => udp_tries.push((ms, r.timestamp_ms)),
                }
            }
            assert_eq!(c.transport(), Transport::Stream);
        }
        let probe_at = 3000 + UDP_RETRY.as_millis() as u64;
        assert_eq!(udp_tries.iter().map(|(ms, _)| *ms).collect::<Vec<_>>(), [probe_at]);
        // Unanswered within 2 s: the stream registers again at once (the relay may have moved
        // us to a UDP address whose answers do not come back), with a newer timestamp.
        let (via, frame) = one(c.poll(at(probe_at + 2_000), 0, || [5; 8])).unwrap();
        assert_eq!((via, c.transport()), (Transport::Stream, Transport::Stream));
        assert!(parsed(&frame).timestamp_ms > udp_tries[0].1, "the relay would refuse it as a replay");
        assert!(c.on_registered(Transport::Stream, &[1; 32], &[5; 8], at(probe_at + 2_050)));
        // The next try is answered: back on UDP.
        let mut moved = false;
        for ms in (probe_at + 2_100..=probe_at + 2_000 + UDP_RETRY.as_millis() as u64).step_by(100) {
            for (via, frame) in c.poll(at(ms), 0, || [6; 8]) {
                assert!(c.on_registered(via, &[1; 32], &parsed(&frame).nonce, at(ms)));
                moved |= via == Transport::Udp;
            }
        }
        assert!(moved);
        assert_eq!(c.transport(), Transport::Udp);
    }

    #[test]
    fn a_relay_that_refuses_over_udp_is_not_left_for_the_stream() {
        let t0 = Instant::now();
        let mut c = RelayClient::new(Some(settings()), [1; 32]).with_stream();
        // Our cluster has not published the key yet: every registration is refused, by UDP.
        for s in 0..10 {
            let (via, frame) = one(c.poll(t0 + RETRY * s, 0, || [s as u8; 8])).unwrap();
            assert_eq!(via, Transport::Udp, "second {s}");
            let r = parsed(&frame);
            // A refusal for another nonce or by the other transport is not ours.
            assert!(!c.on_refused(Transport::Stream, &[1; 32], &r.nonce));
            assert!(!c.on_refused(Transport::Udp, &[1; 32], &[0xEE; 8]));
            assert!(c.on_refused(Transport::Udp, &[1; 32], &r.nonce));
        }
        assert!(c.registered(t0 + RETRY * 10).is_none());
    }

    #[test]
    fn a_broken_stream_gives_way_to_udp() {
        let t0 = Instant::now();
        let mut c = RelayClient::new(Some(settings()), [1; 32]).with_stream();
        for s in 0..3 {
            one(c.poll(t0 + RETRY * s, 0, || [1; 8])).unwrap();
        }
        assert_eq!(one(c.poll(t0 + SWITCH_AFTER, 0, || [2; 8])).unwrap().0, Transport::Stream);
        assert!(c.on_registered(Transport::Stream, &[1; 32], &[2; 8], t0 + SWITCH_AFTER));
        // The stream stops answering at a renewal: three seconds later UDP is tried.
        let renew = t0 + SWITCH_AFTER + RENEW;
        assert_eq!(one(c.poll(renew, 0, || [3; 8])).unwrap().0, Transport::Stream);
        one(c.poll(renew + RETRY, 0, || [3; 8])).unwrap();
        one(c.poll(renew + RETRY * 2, 0, || [3; 8])).unwrap();
        assert_eq!(one(c.poll(renew + SWITCH_AFTER, 0, || [4; 8])).unwrap().0, Transport::Udp);
    }
}
