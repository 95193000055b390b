//! The gateway's registration with the broker's relay, sans IO: sent from the WireGuard socket
//! (so the relay delivers to the NAT mapping the tunnels use), every second until
//! acknowledged, then every [`RENEW`] (inside the relay's 90 s expiry and the shortest common
//! NAT UDP timeout). Its MAC is keyed by the SHA-256 of the cluster's broker token.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use causeway_broker_api::relay;

/// How often a registration is renewed once acknowledged.
pub const RENEW: Duration = Duration::from_secs(20);
/// How often it is sent while unacknowledged.
pub const RETRY: Duration = Duration::from_secs(1);
/// An acknowledgement older than this no longer counts (the relay forgets after 90 s).
pub const FORGET_AFTER: Duration = Duration::from_secs(60);

/// Where the relay is and what to register with.
#[derive(Clone)]
pub struct RelaySettings {
    pub server: SocketAddr,
    /// SHA-256 of the cluster's broker token: the registration's MAC key.
    pub token_sha256: [u8; 32],
}

impl std::fmt::Debug for RelaySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelaySettings").field("server", &self.server).finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
pub struct RelayClient {
    settings: Option<RelaySettings>,
    key: [u8; 32],
    pending: Option<[u8; 8]>,
    last_sent: Option<Instant>,
    acknowledged: Option<Instant>,
}

impl RelayClient {
    #[must_use]
    pub fn new(settings: Option<RelaySettings>, key: [u8; 32]) -> Self {
        Self { settings, key, ..Self::default() }
    }

    /// The relay's address, when it holds a current registration of ours.
    #[must_use]
    pub fn server(&self) -> Option<SocketAddr> {
        self.settings.as_ref().map(|s| s.server)
    }

    /// The relay, while our registration is acknowledged and current at `now`.
    #[must_use]
    pub fn registered(&self, now: Instant) -> Option<SocketAddr> {
        self.acknowledged.filter(|t| now.saturating_duration_since(*t) < FORGET_AFTER).and(self.server())
    }

    /// A registration to send at `now` (`unix_ms`: the wall clock), if one is due; `nonce` is
    /// drawn only then.
    pub fn poll(
        &mut self,
        now: Instant,
        unix_ms: u64,
        nonce: impl FnOnce() -> [u8; 8],
    ) -> Option<(SocketAddr, Vec<u8>)> {
        let s = self.settings.as_ref()?;
        let every = if self.registered(now).is_some() && self.pending.is_none() { RENEW } else { RETRY };
        if self.last_sent.is_some_and(|t| now.saturating_duration_since(t) < every) {
            return None;
        }
        let nonce = nonce();
        self.pending = Some(nonce);
        self.last_sent = Some(now);
        Some((s.server, relay::register(&s.token_sha256, self.key, unix_ms, nonce)))
    }

    /// An acknowledgement from `src`: taken only from the relay, for our key and the nonce of
    /// the registration outstanding. Returns whether it was.
    pub fn on_registered(&mut self, src: SocketAddr, key: &[u8; 32], nonce: &[u8; 8], now: Instant) -> bool {
        let ours = Some(src) == self.server() && *key == self.key && self.pending.as_ref() == Some(nonce);
        if ours {
            self.pending = None;
            self.acknowledged = Some(now);
        }
        ours
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> RelaySettings {
        RelaySettings {
            server: "172.31.0.2:3478".parse().unwrap(),
            token_sha256: relay::token_sha256("cw1_x"),
        }
    }

    #[test]
    fn registers_until_acknowledged_then_renews_and_lapses() {
        let t0 = Instant::now();
        let mut c = RelayClient::new(Some(settings()), [1; 32]);
        let (to, frame) = c.poll(t0, 1_000, || [3; 8]).unwrap();
        assert_eq!(to, settings().server);
        let Ok(relay::Frame::Register(r)) = relay::parse(&frame) else { panic!() };
        assert!(r.verify(&settings().token_sha256));
        assert_eq!((r.key, r.timestamp_ms, r.nonce), ([1; 32], 1_000, [3; 8]));
        assert!(c.poll(t0 + Duration::from_millis(500), 1_500, || [4; 8]).is_none());
        assert!(c.registered(t0).is_none());
        // Forged acknowledgements: from elsewhere, for another key, with another nonce.
        assert!(!c.on_registered("172.31.0.66:3478".parse().unwrap(), &[1; 32], &[3; 8], t0));
        assert!(!c.on_registered(settings().server, &[2; 32], &[3; 8], t0));
        assert!(!c.on_registered(settings().server, &[1; 32], &[4; 8], t0));
        assert!(c.registered(t0).is_none());
        assert!(c.on_registered(settings().server, &[1; 32], &[3; 8], t0));
        assert_eq!(c.registered(t0), Some(settings().server));
        // Renewed every 20 s; a lapse of a minute without an answer unregisters.
        assert!(c.poll(t0 + RETRY, 2_000, || [5; 8]).is_none());
        assert!(c.poll(t0 + RENEW, 21_000, || [6; 8]).is_some());
        assert!(c.poll(t0 + RENEW + RETRY, 22_000, || [7; 8]).is_some(), "unanswered: every second");
        assert!(c.registered(t0 + FORGET_AFTER).is_none());
        // Without settings, nothing.
        assert!(RelayClient::new(None, [1; 32]).poll(t0, 0, || [0; 8]).is_none());
    }
}
