//! The broker's STUN responder: tells a gateway which address and port its WireGuard socket
//! has on the far side of any NAT (no third-party lookup service). It answers binding
//! requests and nothing else, one response per request of about the request's size, and at
//! most [`PER_SOURCE_PER_SECOND`] a second to one source address: a spoofed source gets it
//! little to reflect at a victim.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use causeway_broker_api::stun;
use tokio::net::UdpSocket;
use tracing::{debug, info, warn};

use crate::rate::WriteRate;

/// Requests answered per second to one source address (a gateway asks every 20 s, and at
/// start every second until answered).
pub const PER_SOURCE_PER_SECOND: u32 = 5;
/// Requests answered at once to one source address.
pub const PER_SOURCE_BURST: u32 = 20;
/// The per-source budgets start afresh this often, so spoofed sources cannot grow them
/// without bound.
const FORGET_SOURCES: Duration = Duration::from_secs(60);

/// What the responder did, for tests and logs.
#[derive(Debug, Default)]
pub struct StunCounters {
    pub answered: AtomicU64,
    /// Not a binding request (garbage, responses, oversized datagrams).
    pub ignored: AtomicU64,
    /// Binding requests past their source's budget.
    pub limited: AtomicU64,
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

/// Answers binding requests on `socket` until the task is dropped.
pub async fn serve(socket: UdpSocket, counters: Arc<StunCounters>) {
    let local = socket.local_addr().ok();
    info!(listen = ?local, "STUN responder up");
    let mut budget = WriteRate::new(PER_SOURCE_PER_SECOND, PER_SOURCE_BURST);
    let mut fresh_since = Instant::now();
    // One byte more than any message we answer: a longer datagram shows as too long.
    let mut buf = vec![0u8; stun::MAX_MESSAGE + 1];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors from earlier answers surface here on Linux; keep serving.
                debug!(error = %e, "STUN receive error");
                continue;
            }
        };
        let now = Instant::now();
        if now.duration_since(fresh_since) > FORGET_SOURCES {
            budget = WriteRate::new(PER_SOURCE_PER_SECOND, PER_SOURCE_BURST);
            fresh_since = now;
        }
        let answer = match stun::answer(&buf[..n], from) {
            Ok(a) => a,
            Err(e) => {
                counters.ignored.fetch_add(1, Ordering::Relaxed);
                debug!(%from, error = %e, "STUN datagram ignored");
                continue;
            }
        };
        if budget.take(&from.ip().to_string(), now).is_err() {
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

/// Binds `listen` and starts the responder; returns the bound address.
pub async fn start(listen: SocketAddr, counters: Arc<StunCounters>) -> std::io::Result<SocketAddr> {
    let socket = UdpSocket::bind(listen).await?;
    let bound = socket.local_addr()?;
    tokio::spawn(serve(socket, counters));
    Ok(bound)
}

#[cfg(test)]
mod tests {
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
        let server = start("127.0.0.1:0".parse().unwrap(), counters.clone()).await.unwrap();
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

    #[tokio::test]
    async fn one_source_gets_its_burst_then_its_rate() {
        let counters = Arc::new(StunCounters::default());
        let server = start("127.0.0.1:0".parse().unwrap(), counters.clone()).await.unwrap();
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
