//! The redirect stage (`cluster_redirect`) frame by frame through `BPF_PROG_TEST_RUN`: what it
//! hands to the tunnel (TTL lowered, checksum still right) and what it leaves to the stack.
//! Needs root: `#[ignore]`d (reported as skipped) unless run with `--run-ignored all`, as
//! `scripts/test.sh` does; then not being root fails it.

use causeway_datapath::{Datapath, RemoteCidr, Stat};

const TO_STACK: i32 = 0;
const REDIRECT: i32 = 7;
/// The loopback device: present in every namespace, MTU 65,536 (`bpf_check_mtu` needs a real
/// device; nothing is sent, `BPF_PROG_TEST_RUN` only reports the verdict).
const LO: u32 = 1;

fn checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Ethernet + IPv4 (`options` extra header bytes) + 16 bytes of UDP-ish payload.
fn ipv4(dst: [u8; 4], ttl: u8, options: usize) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ihl = 20 + options;
    let total = u16::try_from(ihl + 16).unwrap();
    let mut ip = vec![0x40 | u8::try_from(ihl / 4).unwrap(), 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, ttl, 17, 0, 0, 10, 1, 2, 3]);
    ip.extend_from_slice(&dst);
    ip.resize(ihl, 1); // NOP options
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[0x55; 16]);
    f
}

fn ipv6(dst: [u8; 16], hop_limit: u8) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0, 0, 8, 17, hop_limit]);
    f.extend_from_slice(&[0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&[0x55; 8]);
    f
}

#[tokio::test]
#[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
async fn redirect_stage_verdicts() {
    causeway_datapath::testing::require_root();
    let mut dp = Datapath::load().expect("loading the datapath (root, BPF)");
    dp.set_remote_cidr("10.2.0.0/16".parse().unwrap(), RemoteCidr { cluster_slot: 1, tunnel: LO }).unwrap();
    dp.set_remote_cidr("10.3.0.0/16".parse().unwrap(), RemoteCidr { cluster_slot: 2, tunnel: 0 }).unwrap();
    dp.set_remote_cidr("fd00:2::/32".parse().unwrap(), RemoteCidr { cluster_slot: 1, tunnel: LO }).unwrap();
    let redirected =
        |dp: &Datapath| dp.stats().unwrap().into_iter().find(|(s, _)| *s == Stat::Redirected).unwrap().1;

    // A remote prefix with a tunnel: redirected, TTL 64 → 63, checksum still valid.
    let (verdict, out) = dp.test_cluster_redirect(&ipv4([10, 2, 0, 9], 64, 0)).unwrap();
    assert_eq!(verdict, REDIRECT);
    assert_eq!(out[14 + 8], 63, "TTL not lowered");
    assert_eq!(checksum(&out[14..34]), 0, "IPv4 header checksum broken");
    assert_eq!(redirected(&dp), 1);

    // With IP options too (the header length comes from IHL).
    let (verdict, out) = dp.test_cluster_redirect(&ipv4([10, 2, 7, 7], 2, 8)).unwrap();
    assert_eq!(verdict, REDIRECT);
    assert_eq!(out[14 + 8], 1);
    assert_eq!(checksum(&out[14..42]), 0);

    // Left to the stack, untouched: TTL about to expire (ICMP time exceeded is the router's
    // job), not a remote prefix, a prefix without a tunnel, lengths that lie, ARP,
    // VLAN-tagged, a lying version nibble.
    for (what, frame) in [
        ("TTL 1", ipv4([10, 2, 0, 9], 1, 0)),
        ("TTL 0", ipv4([10, 2, 0, 9], 0, 0)),
        ("not remote", ipv4([10, 9, 0, 9], 64, 0)),
        ("no tunnel", ipv4([10, 3, 0, 9], 64, 0)),
        ("total length past the frame", ipv4([10, 2, 0, 9], 64, 0)[..40].to_vec()),
        ("total length shorter than the header", {
            let mut f = ipv4([10, 2, 0, 9], 64, 0);
            f[16..18].copy_from_slice(&19u16.to_be_bytes());
            f
        }),
        ("IHL under 5", {
            let mut f = ipv4([10, 2, 0, 9], 64, 0);
            f[14] = 0x44;
            f
        }),
        ("ARP", {
            let mut f = ipv4([10, 2, 0, 9], 64, 0);
            f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
            f
        }),
        ("VLAN", {
            let mut f = ipv4([10, 2, 0, 9], 64, 0);
            f[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
            f
        }),
        ("IPv6 in an IPv4 ethertype", {
            let mut f = ipv4([10, 2, 0, 9], 64, 0);
            f[14] = 0x65;
            f
        }),
    ] {
        let (verdict, out) = dp.test_cluster_redirect(&frame).unwrap_or_else(|e| panic!("{what}: {e:?}"));
        assert_eq!(verdict, TO_STACK, "{what}");
        assert_eq!(
            out[..frame.len().min(out.len())],
            frame[..frame.len().min(out.len())],
            "{what}: modified"
        );
    }
    assert_eq!(redirected(&dp), 2, "only the two remote-bound frames were redirected");

    // IPv6: hop limit lowered (no header checksum), and left alone when it would expire.
    let remote6 = [0xfd, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
    let (verdict, out) = dp.test_cluster_redirect(&ipv6(remote6, 64)).unwrap();
    assert_eq!(verdict, REDIRECT);
    assert_eq!(out[14 + 7], 63);
    assert_eq!(dp.test_cluster_redirect(&ipv6(remote6, 1)).unwrap().0, TO_STACK);
    let mut other6 = remote6;
    other6[3] = 9;
    assert_eq!(dp.test_cluster_redirect(&ipv6(other6, 64)).unwrap().0, TO_STACK);
}
