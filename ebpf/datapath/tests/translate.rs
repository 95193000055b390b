//! Overlap mode's stateless prefix translation on the tunnel programs, packet by packet through
//! `BPF_PROG_TEST_RUN`: TCP, UDP (with and without a checksum), ICMP echo and ICMP errors
//! (embedded headers rewritten too), fragments, and packets that must not be touched. Every
//! checksum is verified by recomputing it from scratch over the packet the program left.
//! Needs root: `#[ignore]`d (reported as skipped) unless run with `--run-ignored all`, as
//! `scripts/test.sh` does; then not being root fails it.

use std::net::Ipv4Addr;

use causeway_datapath::{Datapath, Stat};

const PASS: i32 = 0;
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;

/// The one's-complement sum of `data` (odd lengths padded), folded.
fn sum(data: &[u8], mut acc: u32) -> u32 {
    for c in data.chunks(2) {
        acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc
}

fn checksum(data: &[u8]) -> u16 {
    !(sum(data, 0) as u16)
}

/// The checksum of a TCP or UDP `segment` (its checksum field zeroed) under these addresses.
fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&u16::try_from(segment.len()).unwrap().to_be_bytes());
    !(sum(segment, sum(&pseudo, 0)) as u16)
}

fn ip(a: &str) -> Ipv4Addr {
    a.parse().unwrap()
}

/// An IPv4 packet around `payload` (fragment offset in 8-byte units, more-fragments flag).
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8], frag: (u16, bool)) -> Vec<u8> {
    let total = u16::try_from(20 + payload.len()).unwrap();
    let flags = frag.0 | if frag.1 { 0x2000 } else { 0 };
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0x12, 0x34]);
    p.extend_from_slice(&flags.to_be_bytes());
    p.extend_from_slice(&[64, proto, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let c = checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

fn tcp_segment(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let mut s = vec![0x9c, 0x40, 0x1f, 0x90, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0];
    s.extend_from_slice(payload);
    let c = l4_checksum(src, dst, TCP, &s);
    s[16..18].copy_from_slice(&c.to_be_bytes());
    s
}

fn udp_datagram(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8], with_checksum: bool) -> Vec<u8> {
    let len = u16::try_from(8 + payload.len()).unwrap();
    let mut d = vec![0x30, 0x39, 0x00, 0x35];
    d.extend_from_slice(&len.to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(payload);
    if with_checksum {
        let mut c = l4_checksum(src, dst, UDP, &d);
        if c == 0 {
            c = 0xffff;
        }
        d[6..8].copy_from_slice(&c.to_be_bytes());
    }
    d
}

fn tcp(src: &str, dst: &str) -> Vec<u8> {
    let (s, d) = (ip(src), ip(dst));
    ipv4(s, d, TCP, &tcp_segment(s, d, b"hello, translated world"), (0, false))
}

fn udp(src: &str, dst: &str, with_checksum: bool) -> Vec<u8> {
    let (s, d) = (ip(src), ip(dst));
    ipv4(s, d, UDP, &udp_datagram(s, d, b"datagram!", with_checksum), (0, false))
}

/// An ICMP message of `kind`/`code` with `body` after the 4 bytes of rest-of-header.
fn icmp(src: &str, dst: &str, kind: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(body);
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4(ip(src), ip(dst), ICMP, &m, (0, false))
}

fn src(p: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(p[12], p[13], p[14], p[15])
}

fn dst(p: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(p[16], p[17], p[18], p[19])
}

/// Every checksum of an (unfragmented) IPv4 packet is right: the header's, and TCP's, UDP's
/// (unless it is 0, "none") or ICMP's over the whole message, recomputed from scratch. An
/// ICMP error's embedded packet is checked the same way (its transport checksum when it is
/// there whole).
fn assert_checksums(p: &[u8], what: &str) {
    let ihl = usize::from(p[0] & 0x0f) * 4;
    assert_eq!(checksum(&p[..ihl]), 0, "{what}: IPv4 header checksum");
    let l4 = &p[ihl..];
    match p[9] {
        TCP => assert_eq!(l4_checksum(src(p), dst(p), TCP, l4), 0, "{what}: TCP checksum"),
        UDP if l4[6..8] != [0, 0] => {
            assert_eq!(l4_checksum(src(p), dst(p), UDP, l4), 0, "{what}: UDP checksum")
        }
        UDP => {}
        ICMP => {
            assert_eq!(checksum(l4), 0, "{what}: ICMP checksum");
            if matches!(l4[0], 3 | 11 | 12) {
                let inner = &l4[8..];
                let inner_ihl = usize::from(inner[0] & 0x0f) * 4;
                let whole = usize::from(u16::from_be_bytes([inner[2], inner[3]])) == inner.len();
                assert_eq!(checksum(&inner[..inner_ihl]), 0, "{what}: embedded IPv4 header checksum");
                if whole && inner[9] != ICMP {
                    assert_checksums(inner, &format!("{what} (embedded)"));
                }
            }
        }
        other => panic!("{what}: protocol {other}"),
    }
}

fn stat(dp: &Datapath, s: Stat) -> u64 {
    dp.stats().unwrap().into_iter().find(|(k, _)| *k == s).unwrap().1
}

fn run(dp: &mut Datapath, egress: bool, p: &[u8]) -> Vec<u8> {
    let (verdict, out) = dp.test_tunnel_packet(egress, p).expect("test run");
    assert_eq!(verdict, PASS);
    // The test run pads short packets to an Ethernet header's length: compare what was sent.
    out[..p.len()].to_vec()
}

fn loaded() -> Datapath {
    causeway_datapath::testing::require_root();
    let mut dp = Datapath::load().expect("loading the datapath (root, BPF)");
    // Cluster 1's pods 10.244.0.0/16 are 242.1.0.0/16 to the set, its services 10.96.0.0/12
    // are 242.16.0.0/12.
    dp.set_translation(&[
        ("10.244.0.0/16".parse().unwrap(), "242.1.0.0/16".parse().unwrap()),
        ("10.96.0.0/12".parse().unwrap(), "242.16.0.0/12".parse().unwrap()),
    ])
    .unwrap();
    dp
}

#[tokio::test]
#[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
async fn tcp_udp_and_icmp_leave_with_global_sources_and_arrive_with_real_destinations() {
    let mut dp = loaded();
    let (tx0, rx0) = (stat(&dp, Stat::TranslatedTx), stat(&dp, Stat::TranslatedRx));

    // Leaving: a pod's source moves to the global prefix, host bits kept; the remote
    // (global) destination stays.
    for (p, what) in [
        (tcp("10.244.3.7", "242.2.0.9"), "tcp"),
        (udp("10.244.3.7", "242.2.0.9", true), "udp"),
        (icmp("10.244.3.7", "242.2.0.9", 8, 0, [0, 1, 0, 1], b"ping payload"), "echo request"),
    ] {
        let out = run(&mut dp, true, &p);
        assert_eq!(src(&out), ip("242.1.3.7"), "{what}");
        assert_eq!(dst(&out), ip("242.2.0.9"), "{what}");
        let header = 20 + if p[9] == TCP { 20 } else { 8 };
        assert_eq!(out[header..], p[header..], "{what}: payload untouched");
        assert_checksums(&out, what);
    }
    // UDP without a checksum keeps none (0 is not a checksum to update).
    let out = run(&mut dp, true, &udp("10.244.3.7", "242.2.0.9", false));
    assert_eq!(src(&out), ip("242.1.3.7"));
    assert_eq!(out[26..28], [0, 0], "a zero UDP checksum stays zero");
    assert_checksums(&out, "udp without checksum");

    // Arriving: the destination moves back to the real prefix (pods and services alike); the
    // remote source stays global.
    for (p, real) in [
        (tcp("242.2.0.9", "242.1.3.7"), "10.244.3.7"),
        (udp("242.2.0.9", "242.16.0.10", true), "10.96.0.10"),
        (udp("242.2.0.9", "242.31.255.254", true), "10.111.255.254"),
        (icmp("242.2.0.9", "242.1.3.7", 0, 0, [0, 1, 0, 1], b"pong payload"), "10.244.3.7"),
    ] {
        let out = run(&mut dp, false, &p);
        assert_eq!(dst(&out), ip(real));
        assert_eq!(src(&out), ip("242.2.0.9"));
        assert_checksums(&out, real);
    }
    assert_eq!(stat(&dp, Stat::TranslatedTx) - tx0, 4);
    assert_eq!(stat(&dp, Stat::TranslatedRx) - rx0, 4);
}

#[tokio::test]
#[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
async fn icmp_errors_have_their_embedded_packet_translated_too() {
    let mut dp = loaded();
    // A pod answers a remote pod's UDP datagram with "port unreachable": the error leaves
    // from the pod's global address, and the datagram it quotes (which arrived translated,
    // to the real address) names the global one again.
    let quoted = udp("242.2.0.9", "10.244.3.7", true);
    let err = icmp("10.244.3.7", "242.2.0.9", 3, 3, [0; 4], &quoted);
    let out = run(&mut dp, true, &err);
    assert_eq!(src(&out), ip("242.1.3.7"));
    let inner = &out[28..];
    assert_eq!(src(inner), ip("242.2.0.9"));
    assert_eq!(dst(inner), ip("242.1.3.7"), "the quoted destination is global again");
    assert_checksums(&out, "port unreachable, leaving");

    // A remote router says "fragmentation needed" (MTU 1300) about a TCP segment a pod sent:
    // it arrives to the pod's global address quoting the global source; both move back.
    let quoted = tcp("242.1.3.7", "242.2.0.9");
    let err = icmp("242.2.0.1", "242.1.3.7", 3, 4, [0, 0, 0x05, 0x14], &quoted);
    let out = run(&mut dp, false, &err);
    assert_eq!(dst(&out), ip("10.244.3.7"));
    assert_eq!(src(&out), ip("242.2.0.1"));
    let inner = &out[28..];
    assert_eq!(src(inner), ip("10.244.3.7"), "the quoted source is real again");
    assert_eq!(dst(inner), ip("242.2.0.9"));
    assert_eq!(out[24..28], [0, 0, 0x05, 0x14], "the next-hop MTU is kept");
    assert_checksums(&out, "fragmentation needed, arriving");

    // Time exceeded (traceroute) from a router of the cluster itself: its source is no pod,
    // so only the quoted packet moves. Only the first 8 bytes of the quoted segment came
    // back: its checksum is not there to update, the rest still must be right.
    let quoted = tcp("242.2.0.9", "10.244.3.7");
    let err = icmp("172.20.1.1", "242.2.0.9", 11, 0, [0; 4], &quoted[..28]);
    let out = run(&mut dp, true, &err);
    assert_eq!(src(&out), ip("172.20.1.1"), "not a translated prefix");
    assert_eq!(dst(&out[28..]), ip("242.1.3.7"));
    assert_checksums(&out, "time exceeded, leaving");
}

#[tokio::test]
#[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
async fn fragments_and_foreign_packets() {
    let mut dp = loaded();
    // A UDP datagram in two fragments: the first carries the header, whose checksum covers
    // the whole datagram and is updated; the second is IP header only.
    let (s, d) = (ip("10.244.3.7"), ip("242.2.0.9"));
    let datagram = udp_datagram(s, d, &[0xab; 40], true);
    let first = ipv4(s, d, UDP, &datagram[..24], (0, true));
    let second = ipv4(s, d, UDP, &datagram[24..], (3, false));
    let out1 = run(&mut dp, true, &first);
    let out2 = run(&mut dp, true, &second);
    for out in [&out1, &out2] {
        assert_eq!(src(out), ip("242.1.3.7"));
        assert_eq!(checksum(&out[..20]), 0, "IPv4 header checksum");
    }
    let mut whole = out1[20..].to_vec();
    whole.extend_from_slice(&out2[20..]);
    assert_eq!(l4_checksum(ip("242.1.3.7"), d, UDP, &whole), 0, "the reassembled datagram's checksum");
    assert_eq!(out2[20..], second[20..], "a later fragment's payload is untouched");

    // Not from or to a translated prefix: byte for byte the same.
    for (egress, p) in [
        (true, tcp("172.20.1.1", "242.2.0.9")),
        (true, tcp("10.245.0.1", "242.2.0.9")),
        (false, tcp("242.2.0.9", "242.3.0.1")),
        (false, tcp("242.2.0.9", "10.244.3.7")),
        (false, udp("242.1.3.7", "172.20.1.2", true)),
    ] {
        assert_eq!(run(&mut dp, egress, &p), p, "{} {}", src(&p), dst(&p));
    }
    // IPv6 is not translated (overlap mode is IPv4).
    let mut v6 = vec![0x60, 0, 0, 0, 0, 8, 17, 64];
    v6.extend_from_slice(&[0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    v6.extend_from_slice(&[0xfd, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    v6.extend_from_slice(&[0x55; 8]);
    assert_eq!(run(&mut dp, true, &v6), v6);

    // Outside overlap mode the maps are empty and nothing moves.
    dp.set_translation(&[]).unwrap();
    assert!(dp.translation().unwrap().is_empty());
    let p = tcp("10.244.3.7", "242.2.0.9");
    assert_eq!(run(&mut dp, true, &p), p);
    let p = tcp("242.2.0.9", "242.1.3.7");
    assert_eq!(run(&mut dp, false, &p), p);
    // A pair of different lengths is refused before anything is written.
    let err = dp
        .set_translation(&[("10.244.0.0/16".parse().unwrap(), "242.1.0.0/24".parse().unwrap())])
        .unwrap_err();
    assert!(err.to_string().contains("same length"), "{err}");
    assert!(dp.translation().unwrap().is_empty());
}
