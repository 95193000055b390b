//! The broker's relay: forwards WireGuard datagrams, encrypted end to end, between gateways
//! that cannot reach each other directly (both behind NATs that map every destination to a
//! new port, or UDP blocked between them). It runs on the STUN socket. A gateway registers
//! its WireGuard key with a MAC made from its cluster's token (see
//! `causeway_broker_api::relay`); frames for that key then go to the address it registered
//! from, and frames it sends are delivered as coming from that key. The table is sans IO.

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

/// A registration not renewed for this long is forgotten (gateways renew every 20 s).
pub const EXPIRE: Duration = Duration::from_secs(90);
/// A registration's timestamp may be this far from the broker's clock.
pub const CLOCK_WINDOW_MS: u64 = 10 * 60 * 1000;
/// Registrations held at most.
pub const MAX_ENTRIES: usize = 65_536;

/// Why a registration was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Not newer than the last one taken for the key (a replay).
    Stale,
    /// Too far from the broker's clock.
    Clock,
    /// The table is full.
    Full,
}

#[derive(Clone, Debug)]
struct Entry {
    addr: SocketAddr,
    seen: Instant,
    timestamp_ms: u64,
}

/// Who is registered where.
#[derive(Debug, Default)]
pub struct RelayTable {
    by_key: HashMap<[u8; 8], Entry>,
    by_addr: HashMap<SocketAddr, [u8; 8]>,
}

impl RelayTable {
    /// Takes a registration (already authenticated) of the key with id `key` from `addr`.
    pub fn admit(
        &mut self,
        key: [u8; 8],
        addr: SocketAddr,
        timestamp_ms: u64,
        now: Instant,
        now_ms: u64,
    ) -> Result<(), Refused> {
        if timestamp_ms.abs_diff(now_ms) > CLOCK_WINDOW_MS {
            return Err(Refused::Clock);
        }
        if let Some(e) = self.by_key.get(&key)
            && timestamp_ms <= e.timestamp_ms
        {
            return Err(Refused::Stale);
        }
        if self.by_key.len() >= MAX_ENTRIES && !self.by_key.contains_key(&key) {
            self.expire(now);
            if self.by_key.len() >= MAX_ENTRIES {
                return Err(Refused::Full);
            }
        }
        if let Some(old) = self.by_key.insert(key, Entry { addr, seen: now, timestamp_ms }) {
            self.by_addr.remove(&old.addr);
        }
        // One key per address: a gateway that moved leaves its old address behind.
        if let Some(other) = self.by_addr.insert(addr, key)
            && other != key
        {
            self.by_key.remove(&other);
        }
        Ok(())
    }

    /// Where a frame from `from` for `dst` goes, and the sender's key: both registered and
    /// current.
    #[must_use]
    pub fn route(&self, from: SocketAddr, dst: &[u8; 8], now: Instant) -> Option<(SocketAddr, [u8; 8])> {
        let src = self.by_addr.get(&from)?;
        let fresh = |e: &Entry| now.saturating_duration_since(e.seen) < EXPIRE;
        if !self.by_key.get(src).is_some_and(fresh) {
            return None;
        }
        let to = self.by_key.get(dst).filter(|e| fresh(e))?;
        Some((to.addr, *src))
    }

    /// Forgets registrations not renewed within [`EXPIRE`].
    pub fn expire(&mut self, now: Instant) {
        self.by_key.retain(|_, e| now.saturating_duration_since(e.seen) < EXPIRE);
        let by_key = &self.by_key;
        self.by_addr.retain(|addr, key| by_key.get(key).is_some_and(|e| e.addr == *addr));
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn registered_gateways_reach_each_other_and_nobody_else_does() {
        let (t0, ms) = (Instant::now(), 1_700_000_000_000);
        let mut t = RelayTable::default();
        t.admit([1; 8], a("203.0.113.1:40001"), ms, t0, ms).unwrap();
        t.admit([2; 8], a("203.0.113.2:40002"), ms, t0, ms).unwrap();
        assert_eq!(t.route(a("203.0.113.1:40001"), &[2; 8], t0), Some((a("203.0.113.2:40002"), [1; 8])));
        assert_eq!(t.route(a("203.0.113.2:40002"), &[1; 8], t0), Some((a("203.0.113.1:40001"), [2; 8])));
        // An unregistered sender (a spoofer), an unknown destination.
        assert_eq!(t.route(a("203.0.113.66:1"), &[2; 8], t0), None);
        assert_eq!(t.route(a("203.0.113.1:40001"), &[3; 8], t0), None);
        // Expiry.
        assert_eq!(t.route(a("203.0.113.1:40001"), &[2; 8], t0 + EXPIRE), None);
        t.expire(t0 + EXPIRE);
        assert!(t.is_empty());
    }

    #[test]
    fn replays_old_clocks_and_moves() {
        let (t0, ms) = (Instant::now(), 1_700_000_000_000);
        let mut t = RelayTable::default();
        t.admit([1; 8], a("203.0.113.1:40001"), ms, t0, ms).unwrap();
        // The same registration again (replayed from elsewhere), or an older one: refused.
        assert_eq!(t.admit([1; 8], a("198.51.100.66:1"), ms, t0, ms), Err(Refused::Stale));
        assert_eq!(t.admit([1; 8], a("198.51.100.66:1"), ms - 1, t0, ms), Err(Refused::Stale));
        assert_eq!(
            t.admit([1; 8], a("198.51.100.66:1"), ms + CLOCK_WINDOW_MS + 1, t0, ms),
            Err(Refused::Clock)
        );
        t.admit([2; 8], a("203.0.113.2:40002"), ms, t0, ms).unwrap();
        assert_eq!(t.route(a("203.0.113.2:40002"), &[1; 8], t0).unwrap().0, a("203.0.113.1:40001"));
        // A newer one from a new address (its NAT rebound): frames follow; the old address
        // sends as nobody.
        t.admit([1; 8], a("203.0.113.1:40777"), ms + 1, t0, ms).unwrap();
        assert_eq!(t.route(a("203.0.113.2:40002"), &[1; 8], t0).unwrap().0, a("203.0.113.1:40777"));
        assert_eq!(t.route(a("203.0.113.1:40001"), &[2; 8], t0), None);
        assert_eq!(t.len(), 2);
    }
}
