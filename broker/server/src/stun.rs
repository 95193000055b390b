//! The broker's UDP service: its STUN responder and its relay ([`crate::relay`]), on one
//! socket. STUN tells a gateway which address and port its WireGuard socket has on the far side
//! of any NAT (no third-party lookup service): binding requests only, one response per request
//! of about the request's size, at most [`PER_SOURCE_PER_SECOND`] a second to one source
//! address (registrations with the relay share that budget), so a spoofed source gets little
//! reflected at a victim.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use causeway_broker_api::{relay, stun};
use futures::future::BoxFuture;
use tokio::net::UdpSocket;
use tracing::{debug, info, warn};

use crate::relay::{Budget, Relay, Via};

/// Requests answered per second to one source address (a gateway asks every 20 s, and at
/// start every second until answered).
pub const PER_SOURCE_PER_SECOND: u32 = 5;
/// Requests answered at once to one source address.
pub const PER_SOURCE_BURST: u32 = 20;

/// What the responder did, for tests and logs.
#[derive(Debug, Default)]
pub struct StunCounters {
    pub answered: AtomicU64,
    /// Not a binding request (garbage, responses, oversized datagrams).
    pub ignored: AtomicU64,
    /// Binding requests and relay registrations past their source's budget.
    pub limited: AtomicU64,
    /// Relay registrations taken, and refused (bad MAC, unknown credential or key, replayed).
    pub registered: AtomicU64,
    pub refused: AtomicU64,
    /// Datagrams relayed, and relay frames that had nowhere to go (sender or receiver not
    /// registered).
    pub relayed: AtomicU64,
    pub unroutable: AtomicU64,
    /// Frames for a stream whose queue was full (or that had just closed): dropped.
    pub overflow: AtomicU64,
}

/// Whether a registration is genuine: its MAC made with a valid cluster credential whose
/// cluster has a gateway with the key it names. The broker answers from its own credentials
/// ([`crate::Broker::relay_check`]); a relay run elsewhere asks the broker.
pub type RelayAuth = std::sync::Arc<dyn Fn(relay::Register) -> BoxFuture<'static, bool> + Send + Sync>;

impl crate::Broker {
    /// This broker's relay, made on first use: registrations are checked against its
    /// credentials and endpoint records (held weakly: the relay does not keep a dropped broker
    /// alive). The STUN socket and the HTTPS port's relay streams share it.
    #[must_use]
    pub fn relay(self: &Arc<Self>) -> Arc<Relay> {
        Arc::clone(self.relay_cell().get_or_init(|| {
            let b = Arc::downgrade(self);
            let auth: RelayAuth = Arc::new(move |r| {
                let b = b.clone();
                Box::pin(async move {
                    let Some(b) = b.upgrade() else { return false };
                    b.relay_check(&r).await.unwrap_or(false)
                })
            });
            Relay::new(auth, Arc::default())
        }))
    }
}

impl StunCounters {
    #[must_use]
    pub fn get(&self) -> (u64, u64, u64) {
        (
            self.answered.load(Ordering::Relaxed),
            self.ignored.load(Ordering::Relaxed),
            self.limited.load(Ordering::Relaxed),
        )
    }
}

/// Answers binding requests (and relays, with `relay`) on `socket` until the task is dropped.
pub async fn serve(socket: UdpSocket, counters: Arc<StunCounters>, relay: Option<Arc<Relay>>) {
    let local = socket.local_addr().ok();
    info!(listen = ?local, relay = relay.is_some(), "STUN responder up");
    let socket = Arc::new(socket);
    // Registrations with the relay and binding requests draw on one budget per source.
    let budget = match &relay {
        Some(r) => {
            r.attach_udp(Arc::clone(&socket));
            r.budget()
        }
        None => Arc::new(std::sync::Mutex::new(Budget::new())),
    };
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors from earlier answers surface here on Linux; keep serving.
                debug!(error = %e, "STUN receive error");
                continue;
            }
        };
        if let Some(relay) = &relay
            && relay::is_relay(&buf[..n])
        {
            relay.on_frame(&buf[..n], Via::Udp(from)).await;
            continue;
        }
        let answer = match stun::answer(&buf[..n], from) {
            Ok(a) => a,
            Err(e) => {
                counters.ignored.fetch_add(1, Ordering::Relaxed);
                debug!(%from, error = %e, "STUN datagram ignored");
                continue;
            }
        };
        let allowed = budget
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take(&from.ip().to_string(), Instant::now());
        if !allowed {
            counters.limited.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        match socket.send_to(&answer, from).await {
            Ok(_) => {
                counters.answered.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => warn!(%from, error = %e, "STUN answer not sent"),
        }
    }
}

/// Binds `listen` and starts the responder (and, with `relay`, the relay on the same socket);
/// returns the bound address.
pub async fn start(
    listen: SocketAddr,
    counters: Arc<StunCounters>,
    relay: Option<Arc<Relay>>,
) -> std::io::Result<SocketAddr> {
    let socket = UdpSocket::bind(listen).await?;
    let bound = socket.local_addr()?;
    tokio::spawn(serve(socket, counters, relay));
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn client() -> UdpSocket {
        UdpSocket::bind("127.0.0.1:0").await.unwrap()
    }

    async fn ask(c: &UdpSocket, server: SocketAddr, id: [u8; 12]) -> Option<SocketAddr> {
        c.send_to(&stun::binding_request(id), server).await.unwrap();
        let mut buf = [0u8; 600];
        let (n, _) =
            tokio::time::timeout(Duration::from_millis(500), c.recv_from(&mut buf)).await.ok()?.ok()?;
        stun::reflexive(&buf[..n], &id).ok()
    }

    #[tokio::test]
    async fn answers_with_the_source_and_ignores_everything_else() {
        let counters = Arc::new(StunCounters::default());
        let server = start("127.0.0.1:0".parse().unwrap(), counters.clone(), None).await.unwrap();
        let c = client().await;
        assert_eq!(ask(&c, server, [1; 12]).await, Some(c.local_addr().unwrap()));
        // Garbage, a WireGuard initiation, a response, an oversized request: no answer, and
        // the responder keeps serving.
        let mut oversized = stun::binding_request([2; 12]);
        oversized.resize(stun::MAX_MESSAGE + 8, 0);
        let len = u16::try_from(oversized.len() - 20).unwrap();
        oversized[2..4].copy_from_slice(&len.to_be_bytes());
        let response = stun::answer(&stun::binding_request([3; 12]), server).unwrap();
        let mut init = vec![0u8; 148];
        init[0] = 1;
        for junk in [vec![0xFFu8; 64], init, response, oversized, Vec::new()] {
            c.send_to(&junk, server).await.unwrap();
        }
        assert_eq!(ask(&c, server, [4; 12]).await, Some(c.local_addr().unwrap()));
        assert_eq!(counters.get(), (2, 5, 0));
    }

    async fn recv(s: &UdpSocket) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 2048];
        let (n, _) =
            tokio::time::timeout(Duration::from_millis(300), s.recv_from(&mut buf)).await.ok()?.ok()?;
        buf.truncate(n);
        Some(buf)
    }

    #[tokio::test]
    async fn the_relay_forwards_between_registered_gateways_only() {
        let token = relay::token_sha256("cw1_east");
        let (east, west) = ([1u8; 32], [2u8; 32]);
        // The authority knows east's credential, for east's key only (west shares it here).
        let auth: RelayAuth = Arc::new(move |r| {
            Box::pin(async move {
                r.credential == relay::credential_id(&token)
                    && (r.key == east || r.key == west)
                    && r.verify(&token)
            })
        });
        let counters = Arc::new(StunCounters::default());
        let relay = Relay::new(auth, counters.clone());
        let server = start("127.0.0.1:0".parse().unwrap(), counters.clone(), Some(relay)).await.unwrap();
        let (a, b, evil) = (client().await, client().await, client().await);
        let ms = u64::try_from(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis(),
        )
        .unwrap();
        let reg_a = relay::register(&token, east, ms, [5; 8]);
        a.send_to(&reg_a, server).await.unwrap();
        assert_eq!(recv(&a).await, Some(relay::registered(east, [5; 8])));
        b.send_to(&relay::register(&token, west, ms, [6; 8]), server).await.unwrap();
        assert_eq!(recv(&b).await, Some(relay::registered(west, [6; 8])));
        // a → b, delivered as from east's key.
        a.send_to(&relay::send(&relay::key_id(&west), b"ciphertext"), server).await.unwrap();
        assert_eq!(recv(&b).await, Some(relay::deliver(&relay::key_id(&east), b"ciphertext")));
        // The attacker: replays east's registration from its own address, registers with a
        // token it does not have, sends without registering, sends frames only the relay sends.
        evil.send_to(&reg_a, server).await.unwrap();
        evil.send_to(&relay::register(&relay::token_sha256("cw1_guess"), east, ms + 1, [7; 8]), server)
            .await
            .unwrap();
        evil.send_to(&relay::send(&relay::key_id(&west), b"forged"), server).await.unwrap();
        evil.send_to(&relay::deliver(&relay::key_id(&east), b"forged"), server).await.unwrap();
        // Told no twice (echoing only what it sent), and nothing else.
        assert_eq!(recv(&evil).await, Some(relay::refused(east, [5; 8])));
        assert_eq!(recv(&evil).await, Some(relay::refused(east, [7; 8])));
        assert_eq!(recv(&evil).await, None);
        assert_eq!(recv(&b).await, None, "nothing of the attacker's reached west");
        // East's path is still east's.
        b.send_to(&relay::send(&relay::key_id(&east), b"reply"), server).await.unwrap();
        assert_eq!(recv(&a).await, Some(relay::deliver(&relay::key_id(&west), b"reply")));
        let c = &counters;
        let get = |x: &AtomicU64| x.load(Ordering::Relaxed);
        assert_eq!(
            (get(&c.registered), get(&c.refused), get(&c.relayed), get(&c.unroutable), get(&c.ignored)),
            (2, 2, 2, 1, 1)
        );
    }

    #[tokio::test]
    async fn one_source_gets_its_burst_then_its_rate() {
        let counters = Arc::new(StunCounters::default());
        let server = start("127.0.0.1:0".parse().unwrap(), counters.clone(), None).await.unwrap();
        let c = client().await;
        let burst = PER_SOURCE_BURST as usize;
        for i in 0..burst + 10 {
            c.send_to(&stun::binding_request([u8::try_from(i).unwrap(); 12]), server).await.unwrap();
        }
        let mut buf = [0u8; 600];
        let mut answered = 0;
        while tokio::time::timeout(Duration::from_millis(300), c.recv_from(&mut buf)).await.is_ok() {
            answered += 1;
        }
        // The burst, and what the rate refilled while they were sent (well under a second).
        assert!((burst..burst + 5).contains(&answered), "{answered}");
        let (a, _, limited) = counters.get();
        assert_eq!(a + limited, burst as u64 + 10);
    }
}
