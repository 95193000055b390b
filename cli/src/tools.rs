//! Test tools shipped in the binary (hidden `causeway debug …`), so that the sandbox and the
//! end-to-end tests need nothing beyond iproute2 and ping inside pods.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
};

use anyhow::Context as _;
use causeway_gateway::cable::wireguard::gso;
use sha2::{Digest as _, Sha256};

/// How long a transfer may make no progress before it fails.
const IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// A recognisable plaintext, so a capture of the underlay can prove it never shows up there.
pub const MARKER: &[u8] = b"CAUSEWAY-PLAINTEXT-MARKER:";

fn report(bytes: u64, hash: Sha256) -> String {
    let digest: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    serde_json::json!({ "bytes": bytes, "sha256": digest }).to_string()
}

/// Serves until killed: each connection gets `banner` and a newline, then its own bytes back.
pub fn tcp_echo(listen: &str, banner: &str) -> anyhow::Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    eprintln!("listening on {listen}");
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        let banner = format!("{banner}\n");
        std::thread::spawn(move || {
            if s.write_all(banner.as_bytes()).is_err() {
                return;
            }
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// Accepts one connection, reads it to the end, prints `{"bytes":…,"sha256":…}`.
pub fn tcp_sink(listen: &str) -> anyhow::Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    // Tell the caller we are listening (stdout is line-buffered into the caller's pipe).
    eprintln!("listening on {listen}");
    let (mut s, _) = l.accept()?;
    // A black-holed path must fail the transfer, not hang it.
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut hash = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        total += n as u64;
    }
    println!("{}", report(total, hash));
    Ok(())
}

/// Connects, sends `bytes` bytes of marker-laden data (paced to `mbps` megabits per second
/// when given), prints `{"bytes":…,"sha256":…}`.
pub fn tcp_source(connect: &str, bytes: u64, mbps: Option<f64>) -> anyhow::Result<()> {
    if let Some(m) = mbps {
        anyhow::ensure!(m.is_finite() && m > 0.0, "--mbps must be a positive number");
    }
    let start = std::time::Instant::now();
    let addr: std::net::SocketAddr =
        connect.parse().with_context(|| format!("{connect} is not ADDR:PORT"))?;
    let mut s =
        TcpStream::connect_timeout(&addr, IO_TIMEOUT).with_context(|| format!("connecting to {connect}"))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut hash = Sha256::new();
    let mut sent = 0u64;
    let mut block = Vec::with_capacity(64 * 1024);
    let mut counter = 0u64;
    while sent < bytes {
        block.clear();
        while block.len() < 60 * 1024 {
            block.extend_from_slice(MARKER);
            block.extend_from_slice(format!("{counter:016}\n").as_bytes());
            counter += 1;
        }
        let take = usize::try_from((bytes - sent).min(block.len() as u64)).unwrap_or(block.len());
        s.write_all(&block[..take])?;
        hash.update(&block[..take]);
        sent += take as u64;
        if let Some(m) = mbps {
            #[expect(clippy::cast_precision_loss, reason = "a pace, not an exact figure")]
            let due = start + std::time::Duration::from_secs_f64(sent as f64 * 8.0 / (m * 1e6));
            if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
    s.shutdown(std::net::Shutdown::Write)?;
    println!("{}", report(sent, hash));
    Ok(())
}

/// Echoes UDP datagrams back to their sender until killed.
pub fn udp_echo(listen: &str) -> anyhow::Result<()> {
    let s = std::net::UdpSocket::bind(listen).with_context(|| format!("binding {listen}"))?;
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = s.recv_from(&mut buf)?;
        s.send_to(&buf[..n], from)?;
    }
}

/// Sends `count` datagrams of `size` bytes and checks each echo is identical; prints
/// `{"sent":…,"echoed":…}` and fails unless every one came back intact.
pub fn udp_ping(connect: &str, size: usize, count: u32) -> anyhow::Result<()> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
    s.connect(connect).with_context(|| format!("connecting to {connect}"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
    let mut echoed = 0u32;
    let mut buf = vec![0u8; 65_536];
    for i in 0..count {
        let payload: Vec<u8> = (0..size).map(|j| u8::try_from((j + i as usize) % 251).unwrap_or(0)).collect();
        // A lost first datagram (PMTU being learned) is retried once.
        for _attempt in 0..2 {
            if s.send(&payload).is_err() {
                continue;
            }
            match s.recv(&mut buf) {
                Ok(n) if buf[..n] == payload[..] => {
                    echoed += 1;
                    break;
                }
                _ => {}
            }
        }
    }
    println!("{}", serde_json::json!({ "sent": count, "echoed": echoed }));
    anyhow::ensure!(echoed == count, "only {echoed} of {count} datagrams of {size} bytes came back intact");
    Ok(())
}

/// Sends sequence-numbered datagrams (an 8-byte big-endian number, then padding to `size`)
/// at `rate` per second for `secs` seconds; prints `{"sent":…}`. Paced against the clock, not
/// by sleeping a fixed step, so a late wake-up does not lower the rate.
pub fn udp_stream(connect: &str, rate: u32, secs: f64, size: usize) -> anyhow::Result<()> {
    anyhow::ensure!(rate > 0, "--rate must be at least 1");
    anyhow::ensure!((8..=1400).contains(&size), "--size must be between 8 and 1400");
    let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
    s.connect(connect).with_context(|| format!("connecting to {connect}"))?;
    let start = std::time::Instant::now();
    let total = (f64::from(rate) * secs).round();
    anyhow::ensure!((1.0..1e9).contains(&total), "--secs × --rate must be between 1 and 10⁹ datagrams");
    #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "checked just above")]
    let total = total as u64;
    let mut payload = vec![0u8; size];
    for seq in 0..total {
        #[expect(clippy::cast_precision_loss, reason = "sequence numbers stay far below 2^52")]
        let due = start + std::time::Duration::from_secs_f64(seq as f64 / f64::from(rate));
        if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
            std::thread::sleep(wait);
        }
        payload[..8].copy_from_slice(&seq.to_be_bytes());
        // An unreachable path (a failover in progress) refuses some sends: they count as lost.
        let _ = s.send(&payload);
    }
    println!("{}", serde_json::json!({ "sent": total }));
    Ok(())
}

/// What a sequence stream's receiver saw.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct StreamStats {
    pub received: u64,
    /// Sequence numbers between the first and the last received that never arrived.
    pub lost: u64,
    /// The longest time between two consecutive arrivals.
    pub max_gap_ms: f64,
    /// The sequence number that ended the longest gap.
    pub max_gap_before_seq: Option<u64>,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
}

/// Statistics of `(sequence number, arrival)` pairs in arrival order; duplicates count once.
#[must_use]
pub fn stream_stats(arrivals: &[(u64, std::time::Instant)]) -> StreamStats {
    let seqs: std::collections::BTreeSet<u64> = arrivals.iter().map(|(s, _)| *s).collect();
    let (first, last) = (seqs.first().copied(), seqs.last().copied());
    let span = first.zip(last).map_or(0, |(f, l)| l - f + 1);
    let gap = arrivals.windows(2).map(|w| (w[1].1.duration_since(w[0].1), w[1].0)).max_by_key(|(d, _)| *d);
    StreamStats {
        received: seqs.len() as u64,
        lost: span - seqs.len() as u64,
        max_gap_ms: gap.map_or(0.0, |(d, _)| d.as_secs_f64() * 1000.0),
        max_gap_before_seq: gap.map(|(_, s)| s),
        first_seq: first,
        last_seq: last,
    }
}

/// Receives a sequence stream for `secs` seconds; prints its [`StreamStats`] as JSON.
pub fn udp_sequence_sink(listen: &str, secs: f64) -> anyhow::Result<()> {
    let s = std::net::UdpSocket::bind(listen).with_context(|| format!("binding {listen}"))?;
    eprintln!("listening on {listen}");
    let end = std::time::Instant::now() + std::time::Duration::from_secs_f64(secs);
    let mut arrivals = Vec::new();
    let mut buf = [0u8; 2048];
    while let Some(left) = end.checked_duration_since(std::time::Instant::now()) {
        s.set_read_timeout(Some(left.max(std::time::Duration::from_millis(1))))?;
        match s.recv(&mut buf) {
            Ok(n) if n >= 8 => {
                let seq = u64::from_be_bytes(buf[..8].try_into().unwrap_or_default());
                arrivals.push((seq, std::time::Instant::now()));
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e.into()),
        }
    }
    println!("{}", serde_json::to_string(&stream_stats(&arrivals))?);
    Ok(())
}

#[cfg(test)]
mod stream_tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn the_longest_gap_and_the_losses_come_from_the_arrivals() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // 0..=4 every 10 ms, then nothing until 7 arrives 300 ms later; 6 arrives late, 5 never.
        let arrivals = [
            (0, ms(0)),
            (1, ms(10)),
            (2, ms(20)),
            (3, ms(30)),
            (4, ms(40)),
            (7, ms(340)),
            (6, ms(345)),
            (6, ms(346)),
        ];
        let s = stream_stats(&arrivals);
        assert_eq!(s.received, 7, "0..=4, 6 and 7");
        assert_eq!(s.lost, 1, "5 never came");
        assert!((s.max_gap_ms - 300.0).abs() < 1e-6, "{s:?}");
        assert_eq!(s.max_gap_before_seq, Some(7));
        assert_eq!((s.first_seq, s.last_seq), (Some(0), Some(7)));
        assert_eq!(
            stream_stats(&[]),
            StreamStats {
                received: 0,
                lost: 0,
                max_gap_ms: 0.0,
                max_gap_before_seq: None,
                first_seq: None,
                last_seq: None
            }
        );
    }
}

/// A raw IPv4 socket that sends whole packets (`IPPROTO_RAW`: the header is ours, so the
/// source address can be anyone's; the kernel fills in length, id and checksum).
fn spoofer() -> anyhow::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, socket};
    socket(AddressFamily::Inet, SockType::Raw, SockFlag::empty(), SockProtocol::Raw)
        .context("opening a raw socket (needs CAP_NET_RAW)")
}

/// One UDP datagram from `src` (whoever that is) to `dst`, UDP checksum 0 (allowed on IPv4).
fn send_spoofed(
    fd: &std::os::fd::OwnedFd,
    src: std::net::SocketAddrV4,
    dst: std::net::SocketAddrV4,
    payload: &[u8],
) -> nix::Result<usize> {
    let udp_len = u16::try_from(8 + payload.len()).unwrap_or(u16::MAX);
    let mut p = Vec::with_capacity(28 + payload.len());
    p.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&src.ip().octets());
    p.extend_from_slice(&dst.ip().octets());
    p.extend_from_slice(&src.port().to_be_bytes());
    p.extend_from_slice(&dst.port().to_be_bytes());
    p.extend_from_slice(&udp_len.to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    let total = u16::try_from(p.len()).unwrap_or(u16::MAX);
    p[2..4].copy_from_slice(&total.to_be_bytes());
    let to = nix::sys::socket::SockaddrIn::from(dst);
    nix::sys::socket::sendto(
        std::os::fd::AsRawFd::as_raw_fd(fd),
        &p,
        &to,
        nix::sys::socket::MsgFlags::empty(),
    )
}

/// Sends `count` hostile datagrams to `target` (a test of the uplink guard): `garbage` (random
/// bytes), `data` (forged WireGuard data messages), `init`, `response` or `cookie` (handshake
/// messages with random contents). With `gso`, they leave in runs of that many (garbage then has
/// a fixed length), or `replay` (the datagram `replay`, again and again); with `spoof`, one at
/// a time from that address (a raw socket); with `rate`, paced at that many per second. Prints
/// how many were sent.
pub fn udp_flood(
    target: &str,
    kind: &str,
    count: u32,
    gso: Option<u16>,
    spoof: Option<std::net::SocketAddrV4>,
    rate: Option<u32>,
    replay: Option<&[u8]>,
) -> anyhow::Result<()> {
    anyhow::ensure!(rate != Some(0), "--rate must be at least 1 datagram per second");
    let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
    s.connect(target).with_context(|| format!("connecting to {target}"))?;
    let dst: std::net::SocketAddr = s.peer_addr()?;
    let raw = match spoof {
        Some(src) => {
            anyhow::ensure!(gso.is_none(), "--spoof-source sends one datagram at a time (no --gso)");
            let std::net::SocketAddr::V4(dst) = dst else {
                anyhow::bail!("--spoof-source needs an IPv4 target")
            };
            Some((spoofer()?, src, dst))
        }
        None => None,
    };
    let mut run: Vec<u8> = Vec::new();
    let mut in_run = 0u16;
    let mut x: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x9e37_79b9, |d| u64::from(d.subsec_nanos()) | 1);
    let mut next = || {
        // xorshift64: fast, good enough for junk.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut sent = 0u32;
    let started = std::time::Instant::now();
    for i in 0..count {
        if let Some(rate) = rate {
            // Sleep whenever we are ahead of the schedule (a steady attacker, not a burst
            // then silence), checked every 32 datagrams to keep the sender cheap.
            if i % 32 == 0 {
                let due = std::time::Duration::from_secs_f64(f64::from(i) / f64::from(rate));
                if let Some(ahead) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(ahead);
                }
            }
        }
        // Eight random bytes per draw: the attacker's own CPU is part of what a benchmark on
        // one machine measures, so keep it small.
        let mut random = |header: [u8; 4], len: usize| -> Vec<u8> {
            let mut m = Vec::with_capacity(len + 8);
            m.extend_from_slice(&header);
            while m.len() < len {
                m.extend_from_slice(&next().to_le_bytes());
            }
            m.truncate(len);
            m
        };
        let mut msg: Vec<u8> = match kind {
            "garbage" => {
                let mut m = random([0x42, 0, 0, 0], 208);
                let len = if gso.is_some() { 100 } else { 1 + usize::from(m[4]) % 200 };
                m.drain(1..4); // random bytes after the type
                m.truncate(len);
                m[0] = 0x42; // never a WireGuard message type
                m
            }
            "data" => random([4, 0, 0, 0], 64),
            "init" => random([1, 0, 0, 0], 148),
            "response" => random([2, 0, 0, 0], 92),
            "cookie" => random([3, 0, 0, 0], 64),
            "replay" => replay.context("--kind replay needs the datagram to replay")?.to_vec(),
            other => {
                anyhow::bail!("unknown --kind {other:?}: garbage, data, init, response, cookie or replay")
            }
        };
        msg.truncate(1500);
        if let Some((fd, src, dst)) = &raw {
            if send_spoofed(fd, *src, *dst, &msg).is_ok() {
                sent += 1;
            }
            continue;
        }
        let Some(per_run) = gso else {
            if s.send(&msg).is_ok() {
                sent += 1;
            }
            continue;
        };
        run.extend_from_slice(&msg);
        in_run += 1;
        if in_run == per_run {
            let segment = u16::try_from(msg.len()).unwrap_or(u16::MAX);
            loop {
                let one = gso::Run { dst, start: 0, count: 1, segment };
                match gso::try_send_runs(&s, &[std::io::IoSlice::new(&run)], &[one]) {
                    Ok(_) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    Err(e) => return Err(e).context("sending a GSO run"),
                }
            }
            sent += u32::from(in_run);
            run.clear();
            in_run = 0;
        }
    }
    println!("{}", serde_json::json!({ "sent": sent, "kind": kind }));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_refuses_bad_options_before_sending_anything() {
        // A closed port on loopback: nothing would listen even if a datagram left.
        let target = "127.0.0.1:9";
        let err = udp_flood(target, "data", 10, None, None, Some(0), None).unwrap_err();
        assert_eq!(err.to_string(), "--rate must be at least 1 datagram per second");
        let err = udp_flood(target, "replay", 10, None, None, None, None).unwrap_err();
        assert_eq!(err.to_string(), "--kind replay needs the datagram to replay");
        let err = udp_flood(target, "ping", 10, None, None, None, None).unwrap_err();
        assert!(err.to_string().starts_with("unknown --kind \"ping\""), "{err}");
        let spoofed_gso =
            udp_flood(target, "data", 10, Some(4), Some("127.0.0.2:1".parse().unwrap()), None, None);
        assert!(spoofed_gso.unwrap_err().to_string().contains("one datagram at a time"));
    }

    #[test]
    fn a_paced_flood_keeps_to_its_rate() {
        // 65 datagrams at 200/s: the 65th is due 0.32 s after the first (the schedule is
        // checked every 32 datagrams, at the 33rd and the 65th).
        let started = std::time::Instant::now();
        udp_flood("127.0.0.1:9", "replay", 65, None, None, Some(200), Some(b"\x01\x00\x00\x00")).unwrap();
        let took = started.elapsed();
        assert!(took >= std::time::Duration::from_millis(320), "{took:?}");
        assert!(took < std::time::Duration::from_secs(3), "{took:?}");
    }
}

/// What [`dns_load`] saw.
#[derive(Debug, serde::Serialize)]
pub struct DnsLoadStats {
    pub sent: u64,
    pub answered: u64,
    /// Answers whose code was not NOERROR (NXDOMAIN, REFUSED…).
    pub negative: u64,
    pub answers_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// A standard query for `name` IN A with id `id`, encoded by hand (no resolver library: the
/// load tool must not cache, retry or pace).
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(64);
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD, one question
    for label in name.trim_end_matches('.').split('.') {
        m.push(u8::try_from(label.len()).unwrap_or(63).min(63));
        m.extend_from_slice(&label.as_bytes()[..label.len().min(63)]);
    }
    m.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    m
}

/// Queries `server` for `name` for `secs` seconds: at `rate` per second, or closed-loop with
/// `window` queries in flight. Latency is from send to answer, per query id.
pub fn dns_load(server: &str, name: &str, rate: u32, secs: f64, window: u32) -> anyhow::Result<DnsLoadStats> {
    use std::time::{Duration, Instant};
    anyhow::ensure!(secs > 0.0 && secs <= 600.0, "--secs must be in (0, 600]");
    let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
    s.connect(server).with_context(|| format!("connecting to {server}"))?;
    s.set_read_timeout(Some(Duration::from_millis(if rate == 0 { 200 } else { 1 })))?;
    let mut sent_at: Vec<Option<Instant>> = vec![None; 65_536];
    let (mut sent, mut answered, mut negative) = (0u64, 0u64, 0u64);
    let mut latencies = Vec::new();
    let mut buf = [0u8; 4096];
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut next_id: u16 = 0;
    let mut in_flight = 0u32;
    let send = |sent: &mut u64, next_id: &mut u16, sent_at: &mut Vec<Option<Instant>>| {
        let id = *next_id;
        *next_id = next_id.wrapping_add(1);
        sent_at[usize::from(id)] = Some(Instant::now());
        let _ = s.send(&dns_query(id, name));
        *sent += 1;
    };
    while Instant::now() < end {
        if rate == 0 {
            while in_flight < window {
                send(&mut sent, &mut next_id, &mut sent_at);
                in_flight += 1;
            }
        } else {
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "bounded by secs × rate"
            )]
            let due = (start.elapsed().as_secs_f64() * f64::from(rate)) as u64;
            while sent < due {
                send(&mut sent, &mut next_id, &mut sent_at);
            }
        }
        match s.recv(&mut buf) {
            Ok(n) if n >= 12 => {
                let id = u16::from_be_bytes([buf[0], buf[1]]);
                if let Some(t) = sent_at[usize::from(id)].take() {
                    answered += 1;
                    in_flight = in_flight.saturating_sub(1);
                    latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                    if buf[3] & 0x0f != 0 {
                        negative += 1;
                    }
                }
            }
            Ok(_) => {}
            // Closed loop: a lost query (dropped over budget) frees its slot after the timeout.
            Err(_) => in_flight = 0,
        }
    }
    // The answers to the last queries still on their way count (not as throughput).
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    while sent_at.iter().any(Option::is_some) {
        let Ok(n) = s.recv(&mut buf) else { break };
        if n >= 12 && sent_at[usize::from(u16::from_be_bytes([buf[0], buf[1]]))].take().is_some() {
            answered += 1;
        }
    }
    latencies.sort_by(f64::total_cmp);
    #[expect(clippy::cast_precision_loss, reason = "a count of queries")]
    let answers_per_sec = answered as f64 / secs;
    Ok(DnsLoadStats {
        sent,
        answered,
        negative,
        answers_per_sec,
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
    })
}

/// What [`tcp_connect_rate`] saw.
#[derive(Debug, serde::Serialize)]
pub struct ConnectRateStats {
    pub connections: u64,
    pub failed: u64,
    pub per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Connects to `connect` over and over for `secs` seconds (closed loop: connect, read the
/// server's first line, close with a reset), timing each connection from `connect()` to that
/// line.
pub fn tcp_connect_rate(connect: &str, secs: f64) -> anyhow::Result<ConnectRateStats> {
    use std::{
        io::{BufRead as _, BufReader},
        time::{Duration, Instant},
    };
    anyhow::ensure!(secs > 0.0 && secs <= 600.0, "--secs must be in (0, 600]");
    let addr: std::net::SocketAddr =
        connect.parse().with_context(|| format!("{connect} is not ADDR:PORT"))?;
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut times = Vec::new();
    while Instant::now() < end {
        let t = Instant::now();
        let got = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).and_then(|s| {
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            // Close with a reset: thousands of connections a second in TIME_WAIT would use up
            // the ephemeral ports, and the port search, not the path, would be measured.
            let abort = nix::libc::linger { l_onoff: 1, l_linger: 0 };
            nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &abort)
                .map_err(std::io::Error::from)?;
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line)?;
            Ok(line)
        });
        match got {
            Ok(l) if !l.is_empty() => {
                ok += 1;
                times.push(t.elapsed().as_secs_f64() * 1e6);
            }
            _ => failed += 1,
        }
    }
    times.sort_by(f64::total_cmp);
    #[expect(clippy::cast_precision_loss, reason = "a count of connections")]
    let per_sec = ok as f64 / secs;
    Ok(ConnectRateStats {
        connections: ok,
        failed,
        per_sec,
        p50_us: percentile(&times, 0.5),
        p99_us: percentile(&times, 0.99),
    })
}

/// The `p` quantile (0..=1) of `sorted`, nearest rank; 0 for no samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "an index into sorted")]
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}
