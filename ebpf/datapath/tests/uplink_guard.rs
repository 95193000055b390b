//! Packet-level tests of the uplink guard, at XDP and at TC, through `BPF_PROG_TEST_RUN`:
//! frames built here, verdicts and counters read back.
//! Needs root: `#[ignore]`d (reported as skipped) unless run with `--run-ignored all`, as
//! `scripts/test.sh` does; then not being root fails it.

use std::{collections::BTreeSet, net::Ipv4Addr};

use causeway_datapath::{Datapath, GuardVerdict, Stat, UplinkHook};

const DROP: GuardVerdict = GuardVerdict::Drop;
const PASS: GuardVerdict = GuardVerdict::Pass;
const PORT: u16 = 51820;

#[derive(Clone)]
struct Frame {
    src: Ipv4Addr,
    proto: u8,
    dport: u16,
    ihl_words: u8,
    frag_offset: u16,
    payload: Vec<u8>,
    /// Overrides the UDP length field (to lie about it).
    udp_len: Option<u16>,
    ethertype: u16,
    sport: u16,
}

impl Frame {
    fn wg(src: [u8; 4], payload: Vec<u8>) -> Self {
        Frame {
            src: Ipv4Addr::from(src),
            proto: 17,
            dport: PORT,
            ihl_words: 5,
            frag_offset: 0,
            payload,
            udp_len: None,
            ethertype: 0x0800,
            sport: 40000,
        }
    }

    /// Like [`Frame::bytes`], also for header lengths below the minimum (the UDP header is
    /// then written after 20 bytes, where a reader that trusts the length would not look).
    fn bytes_any_ihl(&self) -> Vec<u8> {
        if self.ihl_words >= 5 {
            return self.bytes();
        }
        let mut f = Frame { ihl_words: 5, ..self.clone() }.bytes();
        f[14] = 0x40 | self.ihl_words;
        f
    }

    fn bytes(&self) -> Vec<u8> {
        let ihl = usize::from(self.ihl_words) * 4;
        let udp_len = 8 + self.payload.len();
        let mut f = vec![0u8; 14 + ihl + udp_len];
        f[12..14].copy_from_slice(&self.ethertype.to_be_bytes());
        let ip = &mut f[14..];
        ip[0] = 0x40 | self.ihl_words;
        ip[2..4].copy_from_slice(&u16::try_from(ihl + udp_len).unwrap().to_be_bytes());
        ip[6..8].copy_from_slice(&self.frag_offset.to_be_bytes());
        ip[8] = 64;
        ip[9] = self.proto;
        ip[12..16].copy_from_slice(&self.src.octets());
        ip[16..20].copy_from_slice(&[172, 31, 0, 11]);
        let udp = &mut ip[ihl..];
        udp[0..2].copy_from_slice(&self.sport.to_be_bytes());
        udp[2..4].copy_from_slice(&self.dport.to_be_bytes());
        let len = self.udp_len.unwrap_or(u16::try_from(udp_len).unwrap());
        udp[4..6].copy_from_slice(&len.to_be_bytes());
        udp[8..].copy_from_slice(&self.payload);
        f
    }
}

fn msg(kind: u8, len: usize) -> Vec<u8> {
    let mut m = vec![0xabu8; len];
    m[0] = kind;
    m[1..4].fill(0);
    m
}

fn stat(dp: &Datapath, s: Stat) -> u64 {
    dp.stats().unwrap().into_iter().find(|(k, _)| *k == s).map_or(0, |(_, v)| v)
}

#[tokio::test]
#[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
async fn uplink_guard_verdicts_at_xdp() {
    causeway_datapath::testing::require_root();
    verdicts(UplinkHook::Xdp);
}

#[tokio::test]
#[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
async fn uplink_guard_verdicts_at_tc() {
    causeway_datapath::testing::require_root();
    verdicts(UplinkHook::Tc);
}

fn verdicts(hook: UplinkHook) {
    let mut dp = Datapath::load().expect("loading the datapath (root, BPF)");
    let run = |dp: &mut Datapath, f: &Frame| dp.test_uplink_guard(hook, &f.bytes(), PORT, 20, 40).unwrap();
    let peer = [172, 31, 0, 12];
    let stranger = [172, 31, 0, 66];

    // Well-formed handshake messages pass; so does anything not for the WireGuard port.
    assert_eq!(run(&mut dp, &Frame::wg(stranger, msg(1, 148))), PASS, "initiation");
    assert_eq!(run(&mut dp, &Frame::wg(stranger, msg(2, 92))), PASS, "response");
    assert_eq!(run(&mut dp, &Frame::wg(stranger, msg(3, 64))), PASS, "cookie reply");
    assert_eq!(run(&mut dp, &Frame { dport: 53, ..Frame::wg(stranger, vec![1, 2, 3]) }), PASS, "other port");
    assert_eq!(run(&mut dp, &Frame { proto: 6, ..Frame::wg(stranger, vec![0; 40]) }), PASS, "TCP");
    assert_eq!(
        run(&mut dp, &Frame { ethertype: 0x86dd, ..Frame::wg(stranger, vec![0; 60]) }),
        PASS,
        "IPv6: not inspected"
    );
    assert_eq!(
        run(&mut dp, &Frame { frag_offset: 100, ..Frame::wg(stranger, vec![0x42; 60]) }),
        PASS,
        "non-first fragment"
    );
    assert_eq!(
        dp.test_uplink_guard(hook, &[0u8; 20], PORT, 20, 40).unwrap(),
        PASS,
        "truncated frame: not ours"
    );

    // Malformed messages to the port are dropped and counted.
    let before = stat(&dp, Stat::XdpMalformed);
    for f in [
        Frame::wg(stranger, msg(1, 147)), // wrong length for an initiation
        Frame::wg(stranger, msg(2, 93)),
        Frame::wg(stranger, msg(4, 31)),  // data shorter than header + tag
        Frame::wg(stranger, msg(9, 148)), // no such type
        Frame::wg(stranger, {
            let mut m = msg(1, 148);
            m[2] = 7; // reserved bytes must be zero
            m
        }),
        Frame::wg(stranger, vec![1]), // too short for a type
        Frame { udp_len: Some(4000), ..Frame::wg(stranger, msg(1, 148)) }, // UDP length lies
        // It claims an initiation's exact length, but the frame holds 100 bytes of it.
        Frame { udp_len: Some(8 + 148), ..Frame::wg(stranger, msg(1, 100)) },
    ] {
        assert_eq!(run(&mut dp, &f), DROP, "malformed: {:?}", &f.payload[..f.payload.len().min(4)]);
    }
    assert_eq!(stat(&dp, Stat::XdpMalformed) - before, 8);
    // IPv4 options shift the UDP header: still parsed correctly.
    assert_eq!(run(&mut dp, &Frame { ihl_words: 6, ..Frame::wg(stranger, msg(2, 92)) }), PASS, "IP options");
    assert_eq!(
        run(&mut dp, &Frame { ihl_words: 6, ..Frame::wg(stranger, msg(9, 92)) }),
        DROP,
        "IP options, junk"
    );

    // Data messages only from known peers, and only for that peer's session index.
    let data = msg(4, 64); // receiver index 0xabababab: peer index 0xababab, session slot 0xab
    let (unknown_source, unknown_session) =
        (stat(&dp, Stat::XdpUnknownSource), stat(&dp, Stat::XdpUnknownSession));
    assert_eq!(run(&mut dp, &Frame::wg(peer, data.clone())), DROP, "unknown source");
    dp.set_known_peers(&BTreeSet::from([Ipv4Addr::from(peer)])).unwrap();
    assert_eq!(run(&mut dp, &Frame::wg(peer, data.clone())), DROP, "known address, no session of its");
    dp.set_peer_sessions(&BTreeSet::from([(Ipv4Addr::from(peer), 0x00ab_abab)])).unwrap();
    assert_eq!(run(&mut dp, &Frame::wg(peer, data.clone())), PASS, "known peer, its session");
    let mut other_slot = data.clone();
    other_slot[4] = 0x01; // the low byte is boringtun's rotating slot: same peer index
    assert_eq!(run(&mut dp, &Frame::wg(peer, other_slot)), PASS, "another session slot of the same peer");
    let mut spoofed = data.clone();
    spoofed[5] = 0x00; // another peer index, from the peer's own address
    assert_eq!(run(&mut dp, &Frame::wg(peer, spoofed)), DROP, "spoofed session index");
    assert_eq!(run(&mut dp, &Frame::wg(peer, msg(4, 74))), PASS, "unpadded data (boringtun does not pad)");
    assert_eq!(run(&mut dp, &Frame::wg(stranger, data.clone())), DROP, "still unknown");
    assert_eq!(stat(&dp, Stat::XdpUnknownSource) - unknown_source, 2, "the two from unknown addresses");
    assert_eq!(
        stat(&dp, Stat::XdpUnknownSession) - unknown_session,
        2,
        "the two for no session of the peer's"
    );
    dp.set_known_peers(&BTreeSet::new()).unwrap();
    dp.set_peer_sessions(&BTreeSet::new()).unwrap();
    assert_eq!(run(&mut dp, &Frame::wg(peer, data)), DROP, "forgotten again");

    // Handshake floods: a burst of 40 per source (one already spent above), then ~20/s.
    let flooder = [172, 31, 0, 77];
    let verdicts: Vec<GuardVerdict> =
        (0..60).map(|_| run(&mut dp, &Frame::wg(flooder, msg(1, 148)))).collect();
    let passed = verdicts.iter().filter(|v| **v == PASS).count();
    assert!((40..=42).contains(&passed), "burst of 40, then limited: {passed} passed");
    assert_eq!(verdicts[..40].iter().filter(|v| **v == PASS).count(), 40, "the burst passes first");
    // Another source has its own bucket.
    assert_eq!(run(&mut dp, &Frame::wg([172, 31, 0, 78], msg(1, 148))), PASS);
    // Responses and cookie replies share the source's budget: a flood of them is cut too.
    let mut cut = 60 - passed;
    for (kind, len, src) in [(2u8, 92usize, [172, 31, 0, 79]), (3, 64, [172, 31, 0, 80])] {
        let verdicts: Vec<GuardVerdict> =
            (0..60).map(|_| run(&mut dp, &Frame::wg(src, msg(kind, len)))).collect();
        let passed = verdicts.iter().filter(|v| **v == PASS).count();
        assert!((40..=42).contains(&passed), "type {kind}: burst of 40, then limited: {passed} passed");
        assert!(verdicts[..40].iter().all(|v| *v == PASS), "type {kind}: the burst passes first");
        cut += 60 - passed;
    }
    // Every handshake message the limiter cut is counted as a flood, and nothing else is.
    assert_eq!(stat(&dp, Stat::XdpHandshakeFlood), cut as u64);

    // STUN binding answers pass from the configured responder's address and port only.
    let server = [172, 31, 0, 2];
    let answer = |class: [u8; 2]| {
        let mut m = vec![class[0], class[1], 0x00, 0x0c, 0x21, 0x12, 0xa4, 0x42];
        m.extend([7u8; 12]);
        m.extend([0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43]);
        m
    };
    let from_server = Frame { sport: 3478, ..Frame::wg(server, answer([0x01, 0x01])) };
    let malformed = stat(&dp, Stat::XdpMalformed);
    assert_eq!(run(&mut dp, &from_server), DROP, "no responder configured");
    dp.set_stun_server(Some(std::net::SocketAddrV4::new(server.into(), 3478))).unwrap();
    assert_eq!(run(&mut dp, &from_server), PASS, "the responder's answer");
    assert_eq!(run(&mut dp, &Frame { sport: 3479, ..from_server.clone() }), DROP, "from another port");
    assert_eq!(
        run(&mut dp, &Frame { src: stranger.into(), ..from_server.clone() }),
        DROP,
        "from another address"
    );
    let request = Frame { sport: 3478, ..Frame::wg(server, answer([0x00, 0x01])) };
    assert_eq!(run(&mut dp, &request), DROP, "a binding request is no answer");
    let mut no_cookie = from_server.clone();
    no_cookie.payload[4] = 0x22;
    assert_eq!(run(&mut dp, &no_cookie), DROP, "no magic cookie");
    // The relay's frames (same socket): from it only.
    let mut frame = vec![0xCA, 0x5E, 0x72, 4];
    frame.extend([1u8; 32]);
    frame.extend(msg(4, 64));
    let relayed = Frame { sport: 3478, ..Frame::wg(server, frame) };
    assert_eq!(run(&mut dp, &relayed), PASS, "a relay frame from the relay");
    assert_eq!(
        run(&mut dp, &Frame { src: stranger.into(), ..relayed.clone() }),
        DROP,
        "a relay frame from elsewhere"
    );
    dp.set_stun_server(None).unwrap();
    assert_eq!(run(&mut dp, &from_server), DROP, "responder unset");
    assert_eq!(run(&mut dp, &relayed), DROP, "relay unset");
    assert_eq!(stat(&dp, Stat::XdpMalformed) - malformed, 8, "each refused one counted as malformed");
}

/// The guard's parser against a reference parser written from the wire formats, on random
/// frames: Ethernet types, IPv4 header lengths (options, and lengths below the minimum),
/// protocols, fragment fields, ports, UDP length fields that lie, message types with their
/// reserved bytes, lengths around each type's exact one, receiver indices of known and
/// unknown sessions, and frames cut short anywhere. For each frame the verdict and the one
/// counter that moved (or none) must be the reference's.
mod against_a_reference {
    use std::collections::BTreeSet;

    use proptest::{
        prelude::*,
        strategy::ValueTree as _,
        test_runner::{Config, TestRunner},
    };

    use super::*;

    const PEER: [u8; 4] = [172, 31, 0, 12];
    /// The peer's one session (24-bit index; the low byte of the receiver field is the slot).
    const SESSION: u32 = 0x00ab_abab;

    #[derive(Debug, PartialEq, Eq)]
    enum Expected {
        NotOurs,
        Accept,
        Drop(Stat),
    }

    fn be16(f: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([f[at], f[at + 1]])
    }

    /// Reads the frame as the wire formats say, with no reference to the program's code.
    fn reference(f: &[u8]) -> Expected {
        if f.len() < 14 + 20 || be16(f, 12) != 0x0800 {
            return Expected::NotOurs;
        }
        let ihl = usize::from(f[14] & 0x0f) * 4;
        if f[14 + 9] != 17 || ihl < 20 || be16(f, 14 + 6) & 0x1fff != 0 {
            return Expected::NotOurs;
        }
        let src = [f[26], f[27], f[28], f[29]];
        let udp = 14 + ihl;
        if f.len() < udp + 4 || be16(f, udp + 2) != PORT {
            return Expected::NotOurs;
        }
        // For the WireGuard port from here on: what is not a whole message is malformed.
        if f.len() < udp + 16 {
            return Expected::Drop(Stat::XdpMalformed);
        }
        let len = usize::from(be16(f, udp + 4)).saturating_sub(8);
        if udp + 8 + len > f.len() {
            return Expected::Drop(Stat::XdpMalformed);
        }
        let m = &f[udp + 8..];
        if m[1..4] != [0, 0, 0] {
            return Expected::Drop(Stat::XdpMalformed);
        }
        match (m[0], len) {
            (1, 148) | (2, 92) | (3, 64) => Expected::Accept,
            (4, l) if l >= 32 => {
                let receiver = u32::from_le_bytes([m[4], m[5], m[6], m[7]]);
                if src == PEER && receiver >> 8 == SESSION {
                    Expected::Accept
                } else if src == PEER {
                    Expected::Drop(Stat::XdpUnknownSession)
                } else {
                    Expected::Drop(Stat::XdpUnknownSource)
                }
            }
            _ => Expected::Drop(Stat::XdpMalformed),
        }
    }

    fn frame() -> impl Strategy<Value = Vec<u8>> {
        let kind = prop_oneof![
            Just((1u8, 148usize)),
            Just((2, 92)),
            Just((3, 64)),
            (Just(4u8), 28usize..120),
            (any::<u8>(), 0usize..160),
            (
                1u8..=4,
                prop_oneof![Just(147usize), Just(149), Just(91), Just(93), Just(63), Just(65), Just(31)]
            ),
        ];
        (
            prop_oneof![8 => Just(0x0800u16), 1 => Just(0x86dd), 1 => any::<u16>()],
            prop_oneof![8 => Just(5u8), 2 => 6u8..=15, 1 => 0u8..5],
            prop_oneof![8 => Just(17u8), 1 => Just(6), 1 => any::<u8>()],
            prop_oneof![8 => Just(0u16), 1 => Just(0x4000), 1 => any::<u16>()],
            prop_oneof![Just(PEER), Just([172, 31, 0, 66])],
            prop_oneof![8 => Just(PORT), 1 => any::<u16>()],
            kind,
            prop_oneof![8 => Just([0u8; 3]), 1 => any::<[u8; 3]>()],
            prop_oneof![Just(SESSION << 8), (0u32..=255).prop_map(|slot| SESSION << 8 | slot), any::<u32>()],
            prop_oneof![8 => Just(None), 1 => any::<u16>().prop_map(Some)],
            prop_oneof![8 => Just(None), 2 => any::<usize>().prop_map(Some)],
        )
            .prop_map(
                |(
                    ethertype,
                    ihl_words,
                    proto,
                    frag,
                    src,
                    dport,
                    (kind, len),
                    reserved,
                    receiver,
                    udp_len,
                    cut,
                )| {
                    let mut payload = vec![0x5au8; len];
                    if let Some(b) = payload.first_mut() {
                        *b = kind;
                    }
                    for (i, r) in reserved.iter().enumerate() {
                        if let Some(b) = payload.get_mut(1 + i) {
                            *b = *r;
                        }
                    }
                    for (i, r) in receiver.to_le_bytes().iter().enumerate() {
                        if let Some(b) = payload.get_mut(4 + i) {
                            *b = *r;
                        }
                    }
                    let mut f = Frame {
                        src: Ipv4Addr::from(src),
                        proto,
                        dport,
                        ihl_words,
                        frag_offset: frag,
                        payload,
                        udp_len,
                        ethertype,
                        sport: 40000,
                    }
                    .bytes_any_ihl();
                    if let Some(cut) = cut {
                        // Never below what BPF_PROG_TEST_RUN accepts for an IPv4 frame.
                        f.truncate((34 + cut % f.len().max(1)).min(f.len()));
                    }
                    f
                },
            )
    }

    fn all_stats(dp: &Datapath) -> Vec<(Stat, u64)> {
        dp.stats().unwrap()
    }

    fn random_frames(hook: UplinkHook) {
        let mut dp = Datapath::load().expect("loading the datapath (root, BPF)");
        dp.set_known_peers(&BTreeSet::from([Ipv4Addr::from(PEER)])).unwrap();
        dp.set_peer_sessions(&BTreeSet::from([(Ipv4Addr::from(PEER), SESSION)])).unwrap();
        // Deterministic, so that a failing frame is the same on the next run.
        let mut runner = TestRunner::new_with_rng(
            Config::default(),
            proptest::test_runner::TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha),
        );
        let strategy = frame();
        let mut seen = std::collections::BTreeMap::<String, usize>::new();
        for _ in 0..3_000 {
            let f = strategy.new_tree(&mut runner).unwrap().current();
            let expected = reference(&f);
            let before = all_stats(&dp);
            // Rate 0: the handshake limiter is off here (it has tests of its own above).
            let verdict = match dp.test_uplink_guard(hook, &f, PORT, 0, 0) {
                Ok(v) => v,
                // The kernel's test run builds a socket buffer and refuses an IPv6 frame
                // without a whole IPv6 header (EINVAL): the program never sees it.
                Err(_) if hook == UplinkHook::Tc && be16(&f, 12) == 0x86dd && f.len() < 14 + 40 => continue,
                Err(e) => panic!("{hook:?}, frame {f:02x?}: {e}"),
            };
            let after = all_stats(&dp);
            let moved: Vec<(Stat, u64)> = after
                .iter()
                .zip(&before)
                .filter(|(a, b)| a.1 != b.1)
                .map(|(a, b)| (a.0, a.1 - b.1))
                .collect();
            let (want_verdict, want_moved) = match expected {
                Expected::NotOurs => (PASS, vec![]),
                Expected::Accept => (PASS, vec![(Stat::XdpPassed, 1)]),
                Expected::Drop(s) => (DROP, vec![(s, 1)]),
            };
            assert_eq!(
                (verdict, &moved),
                (want_verdict, &want_moved),
                "{hook:?}, frame {f:02x?}: expected {expected:?}"
            );
            *seen.entry(format!("{expected:?}")).or_default() += 1;
        }
        // The sample reached every outcome, or it proves little.
        for outcome in
            ["NotOurs", "Accept", "Drop(XdpMalformed)", "Drop(XdpUnknownSource)", "Drop(XdpUnknownSession)"]
        {
            assert!(seen.get(outcome).is_some_and(|n| *n >= 20), "{outcome} barely sampled: {seen:?}");
        }
    }

    #[tokio::test]
    #[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
    async fn random_frames_at_xdp() {
        causeway_datapath::testing::require_root();
        random_frames(UplinkHook::Xdp);
    }

    #[tokio::test]
    #[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
    async fn random_frames_at_tc() {
        causeway_datapath::testing::require_root();
        random_frames(UplinkHook::Tc);
    }
}
