//! The gateway's reflexive address, sans IO: STUN binding requests sent from the WireGuard
//! socket to the broker's responder, so the mapping learnt is the very one a NAT keeps for the
//! tunnels. Asked every second until answered, then every [`REFRESH`] (well inside the
//! shortest common NAT UDP timeout, 30 s, so the mapping never lapses between keepalives
//! either); forgotten when unanswered for [`FORGET_AFTER`].

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use causeway_broker_api::stun;

/// How often the address is asked for once known.
pub const REFRESH: Duration = Duration::from_secs(20);
/// How often it is asked for while unknown (or while the last request is unanswered).
pub const RETRY: Duration = Duration::from_secs(1);
/// An address not confirmed for this long is no longer published.
pub const FORGET_AFTER: Duration = Duration::from_secs(60);

/// Why a STUN datagram was not taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Not from the responder we ask (anyone can send to the WireGuard port).
    NotFromServer,
    /// From its address, but not the answer to our outstanding request (a forger guessing,
    /// a stale or replayed answer), or not a well-formed one.
    NotOurs(stun::StunError),
}

#[derive(Debug)]
pub struct Reflexive {
    server: Option<SocketAddr>,
    /// The outstanding request.
    pending: Option<[u8; 12]>,
    last_sent: Option<Instant>,
    /// The address, and when it was last confirmed.
    known: Option<(SocketAddr, Instant)>,
}

impl Reflexive {
    #[must_use]
    pub fn new(server: Option<SocketAddr>) -> Self {
        Self { server, pending: None, last_sent: None, known: None }
    }

    /// The address to publish at `now`.
    #[must_use]
    pub fn address(&self, now: Instant) -> Option<SocketAddr> {
        self.known.filter(|(_, at)| now.saturating_duration_since(*at) < FORGET_AFTER).map(|(a, _)| a)
    }

    /// A binding request to send at `now`, if one is due, with a transaction id from `id`
    /// (random: a forger must guess 96 bits).
    pub fn poll(&mut self, now: Instant, id: impl FnOnce() -> [u8; 12]) -> Option<(SocketAddr, Vec<u8>)> {
        let server = self.server?;
        let every = match (self.address(now), self.pending) {
            (Some(_), None) => REFRESH,
            _ => RETRY,
        };
        if self.last_sent.is_some_and(|t| now.saturating_duration_since(t) < every) {
            return None;
        }
        let id = id();
        self.last_sent = Some(now);
        self.pending = Some(id);
        Some((server, stun::binding_request(id)))
    }

    /// A STUN datagram from `src` at `now`. Returns the address when it changed.
    pub fn on_datagram(
        &mut self,
        src: SocketAddr,
        datagram: &[u8],
        now: Instant,
    ) -> Result<Option<SocketAddr>, Refused> {
        if Some(src) != self.server {
            return Err(Refused::NotFromServer);
        }
        let Some(id) = self.pending else {
            return Err(Refused::NotOurs(stun::StunError::WrongTransaction));
        };
        let addr = stun::reflexive(datagram, &id).map_err(Refused::NotOurs)?;
        self.pending = None;
        let before = self.address(now);
        self.known = Some((addr, now));
        Ok((before != Some(addr)).then_some(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: &str = "172.31.0.2:3478";

    fn answer(req: &[u8], mapped: &str) -> Vec<u8> {
        stun::answer(req, mapped.parse().unwrap()).unwrap()
    }

    #[test]
    fn asks_until_answered_then_refreshes_and_forgets_when_unanswered() {
        let t0 = Instant::now();
        let server: SocketAddr = SERVER.parse().unwrap();
        let mut r = Reflexive::new(Some(server));
        let (to, first) = r.poll(t0, || [1; 12]).unwrap();
        assert_eq!(to, server);
        assert!(r.poll(t0 + Duration::from_millis(500), || [2; 12]).is_none());
        // Unanswered: again after a second, with a new transaction.
        let (_, req) = r.poll(t0 + RETRY, || [3; 12]).unwrap();
        // The answer to the first request no longer counts.
        assert!(r.on_datagram(server, &answer(&first, "203.0.113.9:40001"), t0 + RETRY).is_err());
        let got = r.on_datagram(server, &answer(&req, "203.0.113.9:40001"), t0 + RETRY).unwrap();
        assert_eq!(got, Some("203.0.113.9:40001".parse().unwrap()));
        assert_eq!(r.address(t0 + RETRY), got);
        // Known: refreshed every 20 s, an unchanged answer is no change.
        assert!(r.poll(t0 + RETRY * 2, || [4; 12]).is_none());
        let t1 = t0 + RETRY + REFRESH;
        r.poll(t1, || [5; 12]).unwrap();
        assert_eq!(
            r.on_datagram(server, &stun::answer(&stun::binding_request([5; 12]), got.unwrap()).unwrap(), t1),
            Ok(None)
        );
        // A NAT that rebound: the new mapping is a change.
        let t2 = t1 + REFRESH;
        r.poll(t2, || [6; 12]).unwrap();
        let moved = r.on_datagram(server, &answer(&stun::binding_request([6; 12]), "203.0.113.9:40777"), t2);
        assert_eq!(moved, Ok(Some("203.0.113.9:40777".parse().unwrap())));
        // Unanswered from then on: retried every second, forgotten after a minute.
        assert!(r.poll(t2 + RETRY, || [7; 12]).is_none(), "the refresh interval runs from the last answer");
        assert!(r.poll(t2 + REFRESH, || [8; 12]).is_some());
        assert!(r.poll(t2 + REFRESH + RETRY, || [9; 12]).is_some(), "unanswered: every second");
        assert!(r.address(t2 + FORGET_AFTER - Duration::from_millis(1)).is_some());
        assert_eq!(r.address(t2 + FORGET_AFTER), None);
    }

    #[test]
    fn forged_answers_move_nothing() {
        let t0 = Instant::now();
        let server: SocketAddr = SERVER.parse().unwrap();
        let mut r = Reflexive::new(Some(server));
        let (_, req) = r.poll(t0, || [1; 12]).unwrap();
        // A correct-looking answer from elsewhere; one from the server's address for another
        // transaction; garbage from the server's address.
        let elsewhere = r.on_datagram("172.31.0.66:3478".parse().unwrap(), &answer(&req, "192.0.2.1:1"), t0);
        assert_eq!(elsewhere, Err(Refused::NotFromServer));
        let guessed = answer(&stun::binding_request([9; 12]), "192.0.2.1:1");
        assert_eq!(
            r.on_datagram(server, &guessed, t0),
            Err(Refused::NotOurs(stun::StunError::WrongTransaction))
        );
        assert!(matches!(r.on_datagram(server, &[0u8; 20], t0), Err(Refused::NotOurs(_))));
        assert_eq!(r.address(t0), None);
        // The real answer is still taken, once: a replay of it is refused.
        let real = answer(&req, "203.0.113.9:40001");
        assert!(r.on_datagram(server, &real, t0).unwrap().is_some());
        assert!(r.on_datagram(server, &answer(&req, "192.0.2.1:1"), t0).is_err());
        assert_eq!(r.address(t0), Some("203.0.113.9:40001".parse().unwrap()));
        // No server configured: nothing is asked, nothing accepted.
        let mut off = Reflexive::new(None);
        assert!(off.poll(t0, || [1; 12]).is_none());
        assert_eq!(off.on_datagram(server, &real, t0), Err(Refused::NotFromServer));
    }
}
