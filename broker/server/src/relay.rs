//! The broker's relay: forwards WireGuard datagrams, encrypted end to end, between gateways
//! that cannot reach each other directly (both behind NATs that map every destination to a
//! new port, or UDP blocked between them). It runs on the STUN socket and, for gateways that
//! cannot send UDP to the broker at all, on streams upgraded from the HTTPS port
//! ([`Relay::serve_stream`]). A gateway registers its WireGuard key with a MAC made from its
//! cluster's token (see `causeway_broker_api::relay`); frames for that key then go to the
//! address (or stream) it registered from, and frames it sends are delivered as coming from
//! that key. The table is sans IO; [`Relay`] drives it.

use std::{
    collections::HashMap,
    hash::Hash,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use causeway_broker_api::relay;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::UdpSocket,
    sync::mpsc,
};
use tracing::{debug, info};

use crate::{
    rate::WriteRate,
    stun::{PER_SOURCE_BURST, PER_SOURCE_PER_SECOND, RelayAuth, StunCounters},
};

/// A registration not renewed for this long is forgotten (gateways renew every 20 s).
pub const EXPIRE: Duration = Duration::from_secs(90);
/// A registration's timestamp may be this far from the broker's clock.
pub const CLOCK_WINDOW_MS: u64 = 10 * 60 * 1000;
/// Registrations held at most.
pub const MAX_ENTRIES: usize = 65_536;
/// Streams held open at once (each is a gateway that cannot send UDP to the broker).
pub const MAX_STREAMS: usize = 4_096;
/// A stream must carry a registration the relay takes within this of opening.
pub const STREAM_REGISTER_WITHIN: Duration = Duration::from_secs(10);
/// Frames queued for one stream; past it they are dropped, as a full socket buffer drops
/// datagrams (the tunnel's own congestion control backs off).
const STREAM_QUEUE: usize = 1_024;
/// The per-source budgets start afresh this often, so spoofed sources cannot grow them
/// without bound.
const FORGET_SOURCES: Duration = Duration::from_secs(60);

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
struct Entry<A> {
    addr: A,
    seen: Instant,
    timestamp_ms: u64,
}

/// Who is registered where: `A` is where frames reach a gateway (a UDP address, or a stream).
#[derive(Debug)]
pub struct RelayTable<A = SocketAddr> {
    by_key: HashMap<[u8; 8], Entry<A>>,
    by_addr: HashMap<A, [u8; 8]>,
}

impl<A> Default for RelayTable<A> {
    fn default() -> Self {
        Self { by_key: HashMap::new(), by_addr: HashMap::new() }
    }
}

impl<A: Copy + Eq + Hash> RelayTable<A> {
    /// Takes a registration (already authenticated) of the key with id `key` from `addr`.
    pub fn admit(
        &mut self,
        key: [u8; 8],
        addr: A,
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
    pub fn route(&self, from: A, dst: &[u8; 8], now: Instant) -> Option<(A, [u8; 8])> {
        let src = self.by_addr.get(&from)?;
        let fresh = |e: &Entry<A>| now.saturating_duration_since(e.seen) < EXPIRE;
        if !self.by_key.get(src).is_some_and(fresh) {
            return None;
        }
        let to = self.by_key.get(dst).filter(|e| fresh(e))?;
        Some((to.addr, *src))
    }

    /// Forgets whoever registered from `addr` (a stream that closed).
    pub fn forget(&mut self, addr: A) {
        if let Some(key) = self.by_addr.remove(&addr) {
            self.by_key.remove(&key);
        }
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

/// Where the relay reaches a gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Via {
    Udp(SocketAddr),
    /// A stream upgraded from the HTTPS port, by its number.
    Stream(u64),
}

/// What a frame did, for the stream that carried it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Registered,
    Other,
}

/// The relay: its table, the UDP socket it shares with the STUN responder, and its streams.
pub struct Relay {
    auth: RelayAuth,
    counters: Arc<StunCounters>,
    /// Never held across an await.
    state: Mutex<State>,
    /// Per-source budget of registrations (shared with STUN answers on the UDP socket).
    budget: Arc<Mutex<Budget>>,
    udp: OnceLock<Arc<UdpSocket>>,
    next_stream: AtomicU64,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    table: RelayTable<Via>,
    streams: HashMap<u64, mpsc::Sender<Vec<u8>>>,
    /// When the table last dropped what expired.
    expired_at: Option<Instant>,
}

/// Per-source token buckets, started afresh every [`FORGET_SOURCES`].
pub(crate) struct Budget {
    rate: WriteRate,
    since: Instant,
}

impl Budget {
    pub(crate) fn new() -> Self {
        Self { rate: WriteRate::new(PER_SOURCE_PER_SECOND, PER_SOURCE_BURST), since: Instant::now() }
    }

    /// Takes one token for `source`; `true` when it had one.
    pub(crate) fn take(&mut self, source: &str, now: Instant) -> bool {
        if now.saturating_duration_since(self.since) > FORGET_SOURCES {
            *self = Self::new();
        }
        self.rate.take(source, now).is_ok()
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Relay {
    /// A relay that checks registrations with `auth`; its counters are `counters`.
    #[must_use]
    pub fn new(auth: RelayAuth, counters: Arc<StunCounters>) -> Arc<Self> {
        Arc::new(Self {
            auth,
            counters,
            state: Mutex::default(),
            budget: Arc::new(Mutex::new(Budget::new())),
            udp: OnceLock::new(),
            next_stream: AtomicU64::new(1),
        })
    }

    pub fn counters(&self) -> &Arc<StunCounters> {
        &self.counters
    }

    pub(crate) fn budget(&self) -> Arc<Mutex<Budget>> {
        Arc::clone(&self.budget)
    }

    /// The UDP socket frames to UDP addresses leave by (the STUN socket); set once.
    pub(crate) fn attach_udp(&self, socket: Arc<UdpSocket>) {
        let _ = self.udp.set(socket);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn count(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether another stream may open.
    #[must_use]
    pub fn has_room(&self) -> bool {
        self.state().streams.len() < MAX_STREAMS
    }

    /// One relay frame from `from`: registers, relays, or drops it (counted).
    pub async fn on_frame(&self, frame: &[u8], from: Via) -> Outcome {
        let now = Instant::now();
        match relay::parse(frame) {
            Ok(relay::Frame::Register(r)) => {
                let source = match from {
                    Via::Udp(a) => a.ip().to_string(),
                    Via::Stream(id) => format!("stream {id}"),
                };
                if !self.budget.lock().unwrap_or_else(PoisonError::into_inner).take(&source, now) {
                    Self::count(&self.counters.limited);
                    return Outcome::Other;
                }
                let genuine = (self.auth)(r.clone()).await;
                let taken = genuine.then(|| {
                    let mut st = self.state();
                    if st.expired_at.is_none_or(|t| now.saturating_duration_since(t) > FORGET_SOURCES) {
                        st.table.expire(now);
                        st.expired_at = Some(now);
                    }
                    st.table.admit(relay::key_id(&r.key), from, r.timestamp_ms, now, unix_ms())
                });
                if let Some(Ok(())) = taken {
                    Self::count(&self.counters.registered);
                    self.send(from, relay::registered(r.key, r.nonce)).await;
                    Outcome::Registered
                } else {
                    Self::count(&self.counters.refused);
                    debug!(?from, outcome = ?taken, "relay registration refused");
                    // Said, so a gateway whose cluster has not published the key yet knows
                    // the relay is reachable this way (no larger than the registration, and
                    // within the same per-source budget).
                    self.send(from, relay::refused(r.key, r.nonce)).await;
                    Outcome::Other
                }
            }
            Ok(relay::Frame::Send { dst, datagram }) => {
                let route = self.state().table.route(from, &dst, now);
                match route {
                    Some((to, src)) => {
                        Self::count(&self.counters.relayed);
                        self.send(to, relay::deliver(&src, datagram)).await;
                    }
                    None => Self::count(&self.counters.unroutable),
                }
                Outcome::Other
            }
            // What only the relay sends, or garbage.
            _ => {
                Self::count(&self.counters.ignored);
                Outcome::Other
            }
        }
    }

    async fn send(&self, to: Via, frame: Vec<u8>) {
        match to {
            Via::Udp(addr) => {
                if let Some(udp) = self.udp.get()
                    && let Err(e) = udp.send_to(&frame, addr).await
                {
                    debug!(%addr, error = %e, "relay frame not sent");
                }
            }
            Via::Stream(id) => {
                let tx = self.state().streams.get(&id).cloned();
                if tx.is_none_or(|tx| tx.try_send(frame).is_err()) {
                    Self::count(&self.counters.overflow);
                }
            }
        }
    }

    /// Serves one stream (an upgraded HTTPS connection) until it closes, breaks its framing,
    /// or carries no registration the relay takes for [`EXPIRE`] (the first within
    /// [`STREAM_REGISTER_WITHIN`]); then forgets who registered on it.
    pub async fn serve_stream<S>(self: Arc<Self>, io: S)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(STREAM_QUEUE);
        self.state().streams.insert(id, tx);
        let (mut reader, mut writer) = tokio::io::split(io);
        let writing = tokio::spawn(async move {
            let mut out = Vec::new();
            while let Some(frame) = rx.recv().await {
                // Everything queued goes in one write.
                out.clear();
                out.extend(relay::stream_frame(&frame).unwrap_or_default());
                while let Ok(more) = rx.try_recv() {
                    out.extend(relay::stream_frame(&more).unwrap_or_default());
                }
                if writer.write_all(&out).await.is_err() || writer.flush().await.is_err() {
                    break;
                }
            }
        });
        info!(stream = id, "relay stream opened");
        let opened = Instant::now();
        // Counted from before the stream opened, so the first registration is due early.
        let mut registered = opened.checked_sub(EXPIRE - STREAM_REGISTER_WITHIN).unwrap_or(opened);
        let mut decoder = relay::StreamDecoder::default();
        let mut buf = vec![0u8; 64 * 1024];
        let why = 'serve: loop {
            let left = EXPIRE.saturating_sub(registered.elapsed());
            let n = match tokio::time::timeout(left, reader.read(&mut buf)).await {
                Err(_) => break "no registration",
                Ok(Ok(0)) => break "closed",
                Ok(Err(_)) => break "read failed",
                Ok(Ok(n)) => n,
            };
            decoder.push(&buf[..n]);
            loop {
                let frame = match decoder.next_frame() {
                    Ok(Some(f)) => f.to_vec(),
                    Ok(None) => break,
                    Err(e) => {
                        Self::count(&self.counters.ignored);
                        debug!(stream = id, error = %e, "relay stream framing broken");
                        break 'serve "framing broken";
                    }
                };
                if self.on_frame(&frame, Via::Stream(id)).await == Outcome::Registered {
                    registered = Instant::now();
                }
            }
        };
        {
            let mut st = self.state();
            st.streams.remove(&id);
            st.table.forget(Via::Stream(id));
        }
        writing.abort();
        info!(stream = id, why, "relay stream closed");
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
