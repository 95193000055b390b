//! The relay over real sockets on loopback: a gateway that cannot send UDP to the relay opens a
//! stream on the broker's HTTP port instead and talks with gateways on UDP through it. Only a
//! cluster's credential opens a stream; what it may register is checked as on UDP; a stream
//! that breaks its framing, or registers nothing, is closed, and whoever registered on it is
//! forgotten.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use causeway_broker::{Broker, Identity, MemStore};
use causeway_broker_api::{BrokerClient, ClusterRecord, EndpointRecord, Token, WireGuardKey, relay};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::UdpSocket,
};

struct Set {
    admin: BrokerClient,
    east: (BrokerClient, Token, [u8; 32]),
    west: (BrokerClient, Token, [u8; 32]),
    relay_udp: SocketAddr,
    broker: Arc<Broker>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// A broker on loopback with its relay on UDP, and two member clusters with a gateway each.
async fn set() -> Set {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let broker = Broker::new(MemStore::default()).await.unwrap();
    let admin = BrokerClient::new(url).with_token(broker.issue(&Identity::Admin).await.unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(causeway_broker::run(listener, broker.clone(), async {
        let _ = rx.await;
    }));
    let relay = broker.relay();
    let relay_udp = causeway_broker::stun::start(
        "127.0.0.1:0".parse().unwrap(),
        relay.counters().clone(),
        Some(relay.clone()),
    )
    .await
    .unwrap();
    let joiner = admin.with_token(broker.issue(&Identity::Join).await.unwrap());
    let mut member = Vec::new();
    for (id, n) in [("east", 1u8), ("west", 2)] {
        let c = ClusterRecord::new(
            id,
            vec![format!("10.{n}.0.0/16").parse().unwrap()],
            vec![format!("10.10{n}.0.0/16").parse().unwrap()],
        );
        let token = joiner.join(&c).await.unwrap().token;
        let client = admin.with_token(token.clone());
        let key = [n; 32];
        client.put_endpoint(&endpoint(id, key)).await.unwrap();
        member.push((client, token, key));
    }
    let west = member.pop().unwrap();
    let east = member.pop().unwrap();
    Set { admin, east, west, relay_udp, broker, _stop: tx }
}

fn endpoint(id: &str, key: [u8; 32]) -> EndpointRecord {
    EndpointRecord::new(id, "gw-1", "172.31.0.11".parse().unwrap(), WireGuardKey(key))
}

fn now_ms() -> u64 {
    u64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis())
        .unwrap()
}

async fn write(s: &mut reqwest::Upgraded, frame: &[u8]) {
    s.write_all(&relay::stream_frame(frame).unwrap()).await.unwrap();
}

/// The next frame on a stream within `within`; `None` when nothing came (or it closed).
async fn read(s: &mut reqwest::Upgraded, within: Duration) -> Option<Vec<u8>> {
    let mut d = relay::StreamDecoder::default();
    let mut buf = vec![0u8; 70_000];
    tokio::time::timeout(within, async {
        loop {
            if let Ok(Some(f)) = d.next_frame() {
                return Some(f.to_vec());
            }
            let n = s.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            d.push(&buf[..n]);
        }
    })
    .await
    .ok()
    .flatten()
}

/// Whether the stream is closed by the other side within `within`.
async fn closed(s: &mut reqwest::Upgraded, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    matches!(tokio::time::timeout(within, s.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

async fn recv_udp(s: &UdpSocket) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 2048];
    let (n, _) = tokio::time::timeout(Duration::from_millis(500), s.recv_from(&mut buf)).await.ok()?.ok()?;
    buf.truncate(n);
    Some(buf)
}

#[tokio::test]
async fn a_gateway_on_a_stream_and_one_on_udp_talk_through_the_relay() {
    let s = set().await;
    let (east, east_token, east_key) = &s.east;
    let (_, west_token, west_key) = &s.west;
    let mut stream = east.relay_stream().await.unwrap();
    write(&mut stream, &relay::register(&relay::token_sha256(&east_token.0), *east_key, now_ms(), [5; 8]))
        .await;
    assert_eq!(read(&mut stream, Duration::from_secs(2)).await, Some(relay::registered(*east_key, [5; 8])));
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp.send_to(
        &relay::register(&relay::token_sha256(&west_token.0), *west_key, now_ms(), [6; 8]),
        s.relay_udp,
    )
    .await
    .unwrap();
    assert_eq!(recv_udp(&udp).await, Some(relay::registered(*west_key, [6; 8])));

    // UDP → stream and stream → UDP, each delivered as from the sender's key; a datagram of
    // the largest size crosses whole.
    let big = vec![0x5Au8; relay::MAX_PAYLOAD];
    for datagram in [b"ciphertext".to_vec(), big] {
        udp.send_to(&relay::send(&relay::key_id(east_key), &datagram), s.relay_udp).await.unwrap();
        let got = read(&mut stream, Duration::from_secs(2)).await.unwrap_or_default();
        // Compared without printing 64 KiB on a failure.
        assert!(
            got == relay::deliver(&relay::key_id(west_key), &datagram),
            "{} bytes arrived for {} sent",
            got.len(),
            datagram.len()
        );
    }
    write(&mut stream, &relay::send(&relay::key_id(west_key), b"reply")).await;
    assert_eq!(recv_udp(&udp).await, Some(relay::deliver(&relay::key_id(east_key), b"reply")));

    // West's token cannot register east's key, on a stream of its own either.
    let (west, ..) = &s.west;
    let mut evil = west.relay_stream().await.unwrap();
    write(&mut evil, &relay::register(&relay::token_sha256(&west_token.0), *east_key, now_ms() + 1, [7; 8]))
        .await;
    assert_eq!(read(&mut evil, Duration::from_secs(2)).await, Some(relay::refused(*east_key, [7; 8])));
    // Nor can it send as anyone without registering.
    write(&mut evil, &relay::send(&relay::key_id(west_key), b"forged")).await;
    assert_eq!(read(&mut evil, Duration::from_millis(500)).await, None);
    assert_eq!(recv_udp(&udp).await, None, "nothing of the attacker's reached west");
    // East's registration stands.
    udp.send_to(&relay::send(&relay::key_id(east_key), b"still east"), s.relay_udp).await.unwrap();
    assert_eq!(
        read(&mut stream, Duration::from_secs(2)).await,
        Some(relay::deliver(&relay::key_id(west_key), b"still east"))
    );

    // East's stream goes: the relay forgets east at once (no frames into a dead stream).
    drop(stream);
    let counters = s.broker.relay().counters().clone();
    let unroutable = || counters.unroutable.load(std::sync::atomic::Ordering::Relaxed);
    let before = unroutable();
    let mut forgotten = false;
    for _ in 0..20 {
        udp.send_to(&relay::send(&relay::key_id(east_key), b"anyone?"), s.relay_udp).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        if unroutable() > before {
            forgotten = true;
            break;
        }
    }
    assert!(forgotten, "frames for a closed stream's gateway are unroutable");
}

#[tokio::test]
async fn only_a_cluster_opens_a_stream_and_a_stream_that_misbehaves_is_closed() {
    let s = set().await;
    // No credential, a made-up one, the admin's: refused before any upgrade.
    let anonymous = BrokerClient::new(s.admin.base_url());
    assert_eq!(anonymous.relay_stream().await.unwrap_err().status(), Some(401));
    let forged = s.admin.with_token(Token("cw1_not-a-real-token".into()));
    assert_eq!(forged.relay_stream().await.unwrap_err().status(), Some(401));
    assert_eq!(s.admin.relay_stream().await.unwrap_err().status(), Some(403));
    // A plain GET (no upgrade asked for): 400.
    let (east, east_token, east_key) = &s.east;
    let plain = reqwest::Client::new()
        .get(format!("{}{}", s.admin.base_url(), relay::STREAM_PATH))
        .bearer_auth(&east_token.0)
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 400);

    // A length no frame has: the stream is closed.
    let mut garbage = east.relay_stream().await.unwrap();
    garbage.write_all(&[0xFF, 0xFF, 0xCA, 0x5E]).await.unwrap();
    assert!(closed(&mut garbage, Duration::from_secs(2)).await, "a stream with broken framing is closed");
    // Frames that are not registrations do not keep a stream open: the first registration is
    // due within 10 s.
    let started = std::time::Instant::now();
    let mut idle = east.relay_stream().await.unwrap();
    write(&mut idle, &relay::send(&relay::key_id(east_key), b"x")).await;
    assert!(closed(&mut idle, Duration::from_secs(15)).await, "a stream that registers nothing is closed");
    let took = started.elapsed();
    assert!((Duration::from_secs(9)..Duration::from_secs(13)).contains(&took), "{took:?}");
    // The broker still serves.
    let mut ok = east.relay_stream().await.unwrap();
    write(&mut ok, &relay::register(&relay::token_sha256(&east_token.0), *east_key, now_ms(), [1; 8])).await;
    assert_eq!(read(&mut ok, Duration::from_secs(2)).await, Some(relay::registered(*east_key, [1; 8])));
}

/// Polls the broker's relay authority until it answers `want` for (`token`, `key`), for at
/// most 3 s; returns how long that took.
async fn authority_says(
    broker: &Broker,
    token: &Token,
    key: &[u8; 32],
    want: bool,
) -> Result<Duration, String> {
    let hash = relay::token_sha256(&token.0);
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let got = broker.relay_key(&relay::credential_id(&hash), key).await.unwrap();
        if got.is_some() == want {
            assert!(got.is_none_or(|k| k == hash));
            return Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("still not {want} after 3 s"))
}

#[tokio::test]
async fn the_relay_knows_a_new_cluster_within_a_second_and_forgets_a_revoked_credential_at_once() {
    let s = set().await;
    let (east, east_token, east_key) = &s.east;
    authority_says(&s.broker, east_token, east_key, true).await.unwrap();
    // East's credential does not vouch for west's key.
    authority_says(&s.broker, east_token, &s.west.2, false).await.unwrap();
    // A cluster that joins after the index was built: known within the refresh interval.
    let joiner = s.admin.with_token(s.broker.issue(&Identity::Join).await.unwrap());
    let north = ClusterRecord::new(
        "north",
        vec!["10.3.0.0/16".parse().unwrap()],
        vec!["10.103.0.0/16".parse().unwrap()],
    );
    let north_token = joiner.join(&north).await.unwrap().token;
    s.admin.with_token(north_token.clone()).put_endpoint(&endpoint("north", [3; 32])).await.unwrap();
    let took = authority_says(&s.broker, &north_token, &[3; 32], true).await.unwrap();
    assert!(took < Duration::from_millis(1_500), "{took:?}");
    // Rotating east's credential revokes the old one: it stops counting at once, and the new
    // one counts within the refresh interval.
    let rotated = east.rotate("east").await.unwrap().token;
    let took = authority_says(&s.broker, east_token, east_key, false).await.unwrap();
    assert!(took < Duration::from_millis(50), "the revoked credential counted for {took:?}");
    authority_says(&s.broker, &rotated, east_key, true).await.unwrap();
}

#[tokio::test]
async fn a_relay_run_elsewhere_asks_the_broker_and_forwards_only_for_genuine_registrations() {
    use causeway_broker::stun::{RelayAuth, StunCounters};
    let s = set().await;
    let (east, east_token, east_key) = &s.east;
    let (_, west_token, west_key) = &s.west;
    // The check itself: only a cluster's credential asks, and only a registration is asked
    // about.
    let frame = relay::register(&relay::token_sha256(&east_token.0), *east_key, now_ms(), [1; 8]);
    assert!(east.relay_check(&frame).await.unwrap());
    let forged = relay::register(&relay::token_sha256("cw1_guess"), *east_key, now_ms(), [1; 8]);
    assert!(!east.relay_check(&forged).await.unwrap());
    let anonymous = BrokerClient::new(s.admin.base_url());
    assert_eq!(anonymous.relay_check(&frame).await.unwrap_err().status(), Some(401));
    assert_eq!(s.admin.relay_check(&frame).await.unwrap_err().status(), Some(403));
    assert_eq!(east.relay_check(&relay::send(&[1; 8], b"x")).await.unwrap_err().status(), Some(400));
    assert_eq!(east.relay_check(&[0xFF; 70]).await.unwrap_err().status(), Some(400));

    // A relay on another socket with east's credentials (what `causeway relay` runs).
    let asker = east.clone();
    let auth: RelayAuth = Arc::new(move |r| {
        let c = asker.clone();
        Box::pin(async move { c.relay_check(&r.to_bytes()).await.unwrap_or(false) })
    });
    let counters = Arc::new(StunCounters::default());
    let own = causeway_broker::relay::Relay::new(auth, counters.clone());
    let at = causeway_broker::stun::start("127.0.0.1:0".parse().unwrap(), counters.clone(), Some(own))
        .await
        .unwrap();
    let (a, b, evil) = (
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    );
    let reg_a = relay::register(&relay::token_sha256(&east_token.0), *east_key, now_ms(), [5; 8]);
    a.send_to(&reg_a, at).await.unwrap();
    assert_eq!(recv_udp(&a).await, Some(relay::registered(*east_key, [5; 8])));
    b.send_to(&relay::register(&relay::token_sha256(&west_token.0), *west_key, now_ms(), [6; 8]), at)
        .await
        .unwrap();
    assert_eq!(recv_udp(&b).await, Some(relay::registered(*west_key, [6; 8])));
    a.send_to(&relay::send(&relay::key_id(west_key), b"ciphertext"), at).await.unwrap();
    assert_eq!(recv_udp(&b).await, Some(relay::deliver(&relay::key_id(east_key), b"ciphertext")));
    // The attacker: east's registration replayed, west's token for east's key, a send
    // without registering: refused, and nothing reaches west.
    evil.send_to(&reg_a, at).await.unwrap();
    evil.send_to(&relay::register(&relay::token_sha256(&west_token.0), *east_key, now_ms() + 5, [7; 8]), at)
        .await
        .unwrap();
    evil.send_to(&relay::send(&relay::key_id(west_key), b"forged"), at).await.unwrap();
    assert_eq!(recv_udp(&evil).await, Some(relay::refused(*east_key, [5; 8])));
    assert_eq!(recv_udp(&evil).await, Some(relay::refused(*east_key, [7; 8])));
    assert_eq!(recv_udp(&evil).await, None);
    assert_eq!(recv_udp(&b).await, None, "nothing of the attacker's reached west");
}
