//! Two in-memory `WgCore`s under boringtun's mocked clock: rekey, keepalives and session
//! expiry, without waiting minutes.

use std::{net::SocketAddr, time::Duration};

use boringtun::x25519::StaticSecret;
use causeway_gateway::cable::wireguard::core::{Output, PeerConfig, WgCore};
use mock_instant::MockClock;
use rand_core::OsRng;

const HANDSHAKE_INIT: u8 = 1;
const DATA: u8 = 4;

struct Pair {
    a: WgCore,
    b: WgCore,
    a_addr: SocketAddr,
    b_addr: SocketAddr,
    /// Every datagram sent so far: its sender ('a' or 'b'), the mocked time and the bytes.
    log: Vec<(char, Duration, Vec<u8>)>,
    /// Packets that came out of each side's TUN.
    tun_a: Vec<Vec<u8>>,
    tun_b: Vec<Vec<u8>>,
    link_up: bool,
}

fn ipv4(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&u16::try_from(total).unwrap().to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[20..].copy_from_slice(payload);
    p
}

impl Pair {
    fn new() -> Self {
        let mut a = WgCore::new(StaticSecret::random_from_rng(OsRng));
        let mut b = WgCore::new(StaticSecret::random_from_rng(OsRng));
        let a_addr: SocketAddr = "172.31.0.11:51820".parse().unwrap();
        let b_addr: SocketAddr = "172.31.0.12:51820".parse().unwrap();
        let mut out_a = Vec::new();
        let mut out_b = Vec::new();
        a.upsert_peer(
            PeerConfig {
                cluster_id: "b".into(),
                public_key: b.public_key(),
                endpoint: b_addr,
                candidates: Vec::new(),
                allowed: vec!["10.2.0.0/16".parse().unwrap()],
                health_ip: None,
            },
            &mut out_a,
        )
        .unwrap();
        b.upsert_peer(
            PeerConfig {
                cluster_id: "a".into(),
                public_key: a.public_key(),
                endpoint: a_addr,
                candidates: Vec::new(),
                allowed: vec!["10.1.0.0/16".parse().unwrap()],
                health_ip: None,
            },
            &mut out_b,
        )
        .unwrap();
        let mut p = Pair {
            a,
            b,
            a_addr,
            b_addr,
            log: Vec::new(),
            tun_a: Vec::new(),
            tun_b: Vec::new(),
            link_up: true,
        };
        // Only A's initiation is delivered: B's crossing one is lost, as if B started later.
        p.deliver('a', out_a);
        p
    }

    /// Delivers `from`'s outputs (and everything they cause) until quiet.
    fn deliver(&mut self, from: char, out: Vec<Output>) {
        let mut queue: Vec<(char, Output)> = out.into_iter().map(|o| (from, o)).collect();
        while !queue.is_empty() {
            let mut next = Vec::new();
            for (sender, o) in queue {
                match o {
                    Output::Udp(_, d) => {
                        self.log.push((sender, MockClock::time(), d.clone()));
                        if !self.link_up {
                            continue;
                        }
                        let mut produced = Vec::new();
                        let now = std::time::Instant::now();
                        let receiver = if sender == 'a' {
                            self.b.on_datagram(self.a_addr, &d, now, &mut produced);
                            'b'
                        } else {
                            self.a.on_datagram(self.b_addr, &d, now, &mut produced);
                            'a'
                        };
                        next.extend(produced.into_iter().map(|o| (receiver, o)));
                    }
                    Output::Tun(pkt) => {
                        if sender == 'a' {
                            self.tun_a.push(pkt)
                        } else {
                            self.tun_b.push(pkt)
                        }
                    }
                }
            }
            queue = next;
        }
    }

    /// Advances the mocked clock in ticks, as the I/O loop would.
    fn run_for(&mut self, d: Duration) {
        let ticks = d.as_millis() / TICK.as_millis();
        for _ in 0..ticks {
            MockClock::advance(TICK);
            let now = std::time::Instant::now();
            let (mut oa, mut ob) = (Vec::new(), Vec::new());
            self.a.tick(now, &mut oa);
            self.b.tick(now, &mut ob);
            self.deliver('a', oa);
            self.deliver('b', ob);
        }
    }

    fn send_a_to_b(&mut self, payload: &[u8]) -> Vec<u8> {
        // Real packets are never sent in the same instant as the handshake.
        MockClock::advance(Duration::from_millis(50));
        let pkt = ipv4([10, 1, 0, 5], [10, 2, 0, 7], payload);
        let mut out = Vec::new();
        self.a.on_tun_packet(&pkt, &mut out);
        self.deliver('a', out);
        pkt
    }

    fn count(&self, sender: char, kind: u8, len: Option<usize>) -> usize {
        self.times(sender, kind, len).len()
    }

    /// When `sender` sent datagrams of this type (and length).
    fn times(&self, sender: char, kind: u8, len: Option<usize>) -> Vec<Duration> {
        self.log
            .iter()
            .filter(|(s, _, d)| *s == sender && d[0] == kind && len.is_none_or(|l| d.len() == l))
            .map(|(_, t, _)| *t)
            .collect()
    }
}

/// The I/O loop's timer tick (the cable's control thread ticks every 50 ms): every deadline
/// is met within one tick.
const TICK: Duration = Duration::from_millis(50);

/// `t` lies within one tick after `due`.
fn on_schedule(t: Duration, due: Duration) -> bool {
    t >= due && t <= due + TICK
}

/// A keepalive is a data message with an empty payload: 16 header + 16 tag bytes.
const KEEPALIVE_LEN: usize = 32;

#[test]
fn rekeys_after_two_minutes_and_keeps_data_flowing() {
    let mut p = Pair::new();
    let handshake = p.times('a', HANDSHAKE_INIT, None);
    assert_eq!(handshake.len(), 1, "one initiation opens the session");
    let first = p.send_a_to_b(b"before");
    assert_eq!(p.tun_b, vec![first]);
    // Keep traffic going (every 5 s) for just over REKEY_AFTER_TIME (120 s).
    for _ in 0..25 {
        p.run_for(Duration::from_secs(5));
        p.send_a_to_b(b"steady");
    }
    // Exactly one new handshake, started by the sender (A) with the first packet it sends
    // once the session is 120 s old: that packet goes out at most 5 s (one send interval)
    // after the session's rekey age, plus one tick.
    let inits = p.times('a', HANDSHAKE_INIT, None);
    assert_eq!(inits.len(), 2, "exactly one rekey in 130 s: {inits:?}");
    assert_eq!(
        p.count('b', HANDSHAKE_INIT, None),
        0,
        "the receiver does not rekey a session it only receives on"
    );
    let due = handshake[0] + Duration::from_secs(120);
    assert!(
        inits[1] >= due && inits[1] <= due + Duration::from_secs(5) + TICK,
        "the rekey started at {:?}, {:?} after the first handshake (due at 120 s)",
        inits[1],
        inits[1] - handshake[0]
    );
    let last = p.send_a_to_b(b"after the rekey");
    assert_eq!(p.tun_b.last(), Some(&last), "data flows on the new session");
    assert_eq!(p.tun_b.len(), 27, "no packet lost across the rekey");
}

#[test]
fn passive_keepalive_answers_one_way_traffic() {
    let mut p = Pair::new();
    // boringtun stamps events with the time of its last timer tick: let one pass after the
    // handshake, as the timer loop always does.
    p.run_for(Duration::from_secs(1));
    let b_sent_last = p.log.iter().filter(|e| e.0 == 'b').map(|e| e.1).max().expect("B's handshake response");
    p.send_a_to_b(b"one-way");
    let received = MockClock::time();
    assert_eq!(p.count('b', DATA, Some(KEEPALIVE_LEN)), 0);
    // B received data and has sent nothing since: once KEEPALIVE_TIMEOUT (10 s) has passed
    // since its last send (boringtun counts from the send, as wireguard-go does), it
    // acknowledges, once; with nothing more received it stays quiet until its persistent
    // keepalive (25 s after that send).
    p.run_for(Duration::from_secs(20));
    let sent = p.times('b', DATA, Some(KEEPALIVE_LEN));
    assert_eq!(sent.len(), 1, "exactly one passive keepalive: {sent:?}");
    let due = (b_sent_last + Duration::from_secs(10)).max(received);
    assert!(
        on_schedule(sent[0], due),
        "the keepalive went at {:?}, due at {due:?} (10 s after B's last send at {b_sent_last:?})",
        sent[0]
    );
}

#[test]
fn persistent_keepalive_every_25_seconds_when_idle() {
    let mut p = Pair::new();
    // A's last send before going idle: the keepalive that confirms the new session.
    let confirm = p.times('a', DATA, Some(KEEPALIVE_LEN));
    assert_eq!(confirm.len(), 1, "the initiator confirms the session with one keepalive");
    p.run_for(Duration::from_secs(101));
    let sent = p.times('a', DATA, Some(KEEPALIVE_LEN));
    // Idle for 101 s: one keepalive every 25 s, each one interval after the previous send.
    assert_eq!(sent.len(), 5, "the confirmation and then one per 25 s: {sent:?}");
    for w in sent.windows(2) {
        assert!(
            on_schedule(w[1], w[0] + Duration::from_secs(25)),
            "keepalives {:?} apart (due every 25 s): {sent:?}",
            w[1] - w[0]
        );
    }
    assert_eq!(p.count('a', HANDSHAKE_INIT, None), 1, "idling needs no new handshake");
}

#[test]
fn session_expires_when_the_path_is_gone_and_recovers() {
    let mut p = Pair::new();
    p.send_a_to_b(b"hello");
    assert!(p.a.peers(std::time::Instant::now())[0].has_session());
    p.link_up = false;
    // REJECT_AFTER_TIME is 180 s: keep trying to send so rekeys are attempted (and lost).
    for _ in 0..40 {
        p.run_for(Duration::from_secs(5));
        p.send_a_to_b(b"into the void");
    }
    let stats = &p.a.peers(std::time::Instant::now())[0];
    assert!(!stats.has_session(), "no session survives 200 s without a handshake");
    p.link_up = true;
    p.run_for(Duration::from_secs(6));
    let back = p.send_a_to_b(b"back");
    p.run_for(Duration::from_secs(6));
    assert!(p.tun_b.contains(&back), "a new handshake brings the tunnel back");
}
