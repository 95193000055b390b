//! Decrypted packets into as few TUN writes as possible, without copying them: consecutive
//! segments of one TCP flow, or datagrams of one UDP flow, leave as one GSO packet (a virtio
//! header, the first packet's headers fixed up, then every payload where it lies, in one
//! `writev`), as the kernel's GRO would have built it. Everything else is written as it is.
//!
//! This replaces tun-rs' GRO table on the write side, which copies every packet it examines
//! into a fresh `Vec` and coalesces by copying again into a 64 KB buffer per run.

use std::io::{self, IoSlice};

/// `struct virtio_net_hdr` (little-endian, as the TUN device is set up).
const VNET_HDR_LEN: usize = 10;
const VNET_NEEDS_CSUM: u8 = 1;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
/// Segments per GSO packet at most (the kernel's UDP limit is 64 for GRO'd runs; TCP is
/// bounded by the 64 KB length first).
const MAX_SEGMENTS: usize = 64;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;

/// What a packet is, as far as coalescing goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    v6: bool,
    tcp: bool,
    /// IP header length, then IP + TCP/UDP header length.
    ip_len: usize,
    hdr_len: usize,
    payload: usize,
}

/// Parses `p` as a packet that could join or lead a run: IPv4 without options or fragments,
/// or IPv6 without extension headers, carrying TCP (only ACK, maybe PSH, and a payload) or UDP.
fn segment(p: &[u8]) -> Option<Segment> {
    let (v6, ip_len, proto) = match p.first()? >> 4 {
        4 if p.len() >= 20 && p[0] & 0x0f == 5 && u16::from_be_bytes([p[6], p[7]]) & 0x3fff == 0 => {
            if usize::from(u16::from_be_bytes([p[2], p[3]])) != p.len() {
                return None;
            }
            (false, 20, p[9])
        }
        6 if p.len() >= 40 => {
            if usize::from(u16::from_be_bytes([p[4], p[5]])) + 40 != p.len() {
                return None;
            }
            (true, 40, p[6])
        }
        _ => return None,
    };
    let (tcp, hdr_len) = match proto {
        6 if p.len() >= ip_len + 20 => {
            let flags = p[ip_len + 13];
            if flags & !TCP_PSH != TCP_ACK || p[ip_len + 12] >> 4 < 5 {
                return None;
            }
            (true, ip_len + usize::from(p[ip_len + 12] >> 4) * 4)
        }
        17 if p.len() >= ip_len + 8 => {
            if usize::from(u16::from_be_bytes([p[ip_len + 4], p[ip_len + 5]])) != p.len() - ip_len {
                return None;
            }
            (false, ip_len + 8)
        }
        _ => return None,
    };
    if hdr_len < ip_len + 8 || p.len() <= hdr_len {
        return None;
    }
    Some(Segment { v6, tcp, ip_len, hdr_len, payload: p.len() - hdr_len })
}

/// A run being built: its first packet, and where the next one must fit. Its payloads are
/// the first `count` of the caller's slices.
struct Run<'a> {
    head: &'a [u8],
    seg: Segment,
    count: usize,
    total: usize,
    /// TCP: the sequence number the next segment must carry.
    next_seq: u32,
    /// A shorter (or TCP PSH) segment ended it.
    closed: bool,
    psh: bool,
}

impl<'a> Run<'a> {
    fn start(head: &'a [u8], seg: Segment, payloads: &mut [IoSlice<'a>]) -> Self {
        payloads[0] = IoSlice::new(&head[seg.hdr_len..]);
        let psh = seg.tcp && head[seg.ip_len + 13] & TCP_PSH != 0;
        Self {
            head,
            seg,
            count: 1,
            total: head.len(),
            next_seq: if seg.tcp { tcp_seq(head, seg.ip_len).wrapping_add(payload_u32(seg)) } else { 0 },
            closed: psh,
            psh,
        }
    }

    /// A packet that joins nothing and leads nothing: written as it is.
    fn lone(p: &'a [u8]) -> Self {
        let seg = Segment { v6: false, tcp: false, ip_len: 0, hdr_len: 0, payload: 0 };
        Self { head: p, seg, count: 1, total: p.len(), next_seq: 0, closed: true, psh: false }
    }

    /// Writes the run and counts it: a refused write loses the run, like any packet on the
    /// way, and the next ones are still written.
    fn write(
        &self,
        payloads: &[IoSlice<'_>],
        write: &mut impl FnMut(&[IoSlice<'_>]) -> io::Result<usize>,
        done: &mut Written,
    ) {
        done.writes += 1;
        if let Err(e) = self.flush(payloads, write) {
            done.failed += 1;
            tracing::debug!(error = %e, packets = self.count, "writing the tunnel device failed");
        }
    }

    /// Appends `p` if the kernel can take it as the next segment of this run.
    fn join(&mut self, p: &'a [u8], seg: Segment, payloads: &mut [IoSlice<'a>]) -> bool {
        let (h, s) = (self.head, self.seg);
        let fits = !self.closed
            && self.count < MAX_SEGMENTS
            && seg.v6 == s.v6
            && seg.tcp == s.tcp
            && seg.hdr_len == s.hdr_len
            && seg.payload <= s.payload
            && self.total + seg.payload <= usize::from(u16::MAX)
            && same_ip_flow(h, p, s)
            && if s.tcp {
                let (hi, pi) = (&h[s.ip_len..s.hdr_len], &p[s.ip_len..s.hdr_len]);
                // Ports, then the acknowledgment number, data offset, then the options.
                hi[..4] == pi[..4]
                    && hi[8..13] == pi[8..13]
                    && hi[20..] == pi[20..]
                    && tcp_seq(p, s.ip_len) == self.next_seq
            } else {
                h[s.ip_len..s.ip_len + 4] == p[s.ip_len..s.ip_len + 4]
            };
        if !fits {
            return false;
        }
        payloads[self.count] = IoSlice::new(&p[s.hdr_len..]);
        self.count += 1;
        self.total += seg.payload;
        if s.tcp {
            self.next_seq = self.next_seq.wrapping_add(payload_u32(seg));
            self.psh |= p[s.ip_len + 13] & TCP_PSH != 0;
        }
        self.closed = seg.payload < s.payload || self.psh;
        true
    }

    /// Writes the run with `write`: as it is when alone, as one GSO packet otherwise.
    fn flush(
        &self,
        payloads: &[IoSlice<'_>],
        write: &mut impl FnMut(&[IoSlice<'_>]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        if self.count == 1 {
            return write(&[IoSlice::new(&[0; VNET_HDR_LEN]), IoSlice::new(self.head)]);
        }
        let s = self.seg;
        let mut hdr = [0u8; VNET_HDR_LEN + 40 + 60];
        let (vnet, headers) = hdr.split_at_mut(VNET_HDR_LEN);
        let headers = &mut headers[..s.hdr_len];
        headers.copy_from_slice(&self.head[..s.hdr_len]);
        let total = u16::try_from(self.total).expect("runs stay within 64 KB");
        let l4_len = total - u16::try_from(s.ip_len).expect("a short header");
        let (src, dst) = if s.v6 {
            headers[4..6].copy_from_slice(&l4_len.to_be_bytes());
            (&self.head[8..24], &self.head[24..40])
        } else {
            headers[2..4].copy_from_slice(&total.to_be_bytes());
            headers[10..12].fill(0);
            let sum = !fold(sum_be(&headers[..20], 0));
            headers[10..12].copy_from_slice(&sum.to_be_bytes());
            (&self.head[12..16], &self.head[16..20])
        };
        let proto: u8 = if s.tcp { 6 } else { 17 };
        // With NEEDS_CSUM the kernel completes the checksum from the pseudo-header's sum.
        let pseudo = fold(sum_be(src, sum_be(dst, u32::from(proto) + u32::from(l4_len))));
        let l4 = &mut headers[s.ip_len..];
        let csum_offset: u16 = if s.tcp {
            if self.psh {
                l4[13] |= TCP_PSH;
            }
            l4[16..18].copy_from_slice(&pseudo.to_be_bytes());
            16
        } else {
            l4[4..6].copy_from_slice(&l4_len.to_be_bytes());
            l4[6..8].copy_from_slice(&pseudo.to_be_bytes());
            6
        };
        vnet[0] = VNET_NEEDS_CSUM;
        vnet[1] = match (s.tcp, s.v6) {
            (true, false) => GSO_TCPV4,
            (true, true) => GSO_TCPV6,
            (false, _) => GSO_UDP_L4,
        };
        let le = |v: usize| u16::try_from(v).expect("header fields fit").to_le_bytes();
        vnet[2..4].copy_from_slice(&le(s.hdr_len));
        vnet[4..6].copy_from_slice(&le(s.payload));
        vnet[6..8].copy_from_slice(&le(s.ip_len));
        vnet[8..10].copy_from_slice(&csum_offset.to_le_bytes());
        let mut iov = [IoSlice::new(&[]); MAX_SEGMENTS + 1];
        iov[0] = IoSlice::new(&hdr[..VNET_HDR_LEN + s.hdr_len]);
        iov[1..=self.count].copy_from_slice(&payloads[..self.count]);
        write(&iov[..=self.count])
    }
}

/// Same addresses and protocol, and the fields GRO keeps equal within a run (TOS/traffic
/// class and flow label, TTL/hop limit, IPv4's don't-fragment bit).
fn same_ip_flow(h: &[u8], p: &[u8], s: Segment) -> bool {
    if s.v6 {
        h[..4] == p[..4] && h[6..8] == p[6..8] && h[8..40] == p[8..40]
    } else {
        h[1] == p[1] && h[6] & 0x40 == p[6] & 0x40 && h[8..10] == p[8..10] && h[12..20] == p[12..20]
    }
}

fn tcp_seq(p: &[u8], ip_len: usize) -> u32 {
    u32::from_be_bytes([p[ip_len + 4], p[ip_len + 5], p[ip_len + 6], p[ip_len + 7]])
}

fn payload_u32(s: Segment) -> u32 {
    u32::try_from(s.payload).expect("packets are under 64 KB")
}

/// The ones' complement sum of `data` as big-endian 16-bit words, added to `init`.
fn sum_be(data: &[u8], init: u32) -> u32 {
    data.chunks(2).fold(init, |s, c| s + u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    u16::try_from(s).expect("folded")
}

/// What [`write_packets`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Written {
    /// Device writes (one per run).
    pub writes: usize,
    /// Writes the device refused.
    pub failed: usize,
}

/// Writes `packets` (whole IP packets, in order) with `write`, one call per run of packets
/// that coalesce; UDP runs only when `udp_runs` (the device takes USO).
pub(super) fn write_packets<'a>(
    packets: impl IntoIterator<Item = &'a [u8]>,
    udp_runs: bool,
    mut write: impl FnMut(&[IoSlice<'_>]) -> io::Result<usize>,
) -> Written {
    let mut done = Written::default();
    let mut payloads = [IoSlice::new(&[]); MAX_SEGMENTS];
    let mut run: Option<Run<'a>> = None;
    for p in packets {
        let seg = segment(p).filter(|s| s.tcp || udp_runs);
        if let (Some(r), Some(seg)) = (run.as_mut(), seg)
            && r.join(p, seg, &mut payloads)
        {
            continue;
        }
        if let Some(r) = run.take() {
            r.write(&payloads, &mut write, &mut done);
        }
        run = Some(match seg {
            Some(seg) => Run::start(p, seg, &mut payloads),
            None => Run::lone(p),
        });
    }
    if let Some(r) = run {
        r.write(&payloads, &mut write, &mut done);
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 4] = [10, 1, 2, 2];
    const B: [u8; 4] = [10, 2, 2, 2];

    /// An IPv4 packet from A to B (don't-fragment set, header checksum valid) around `l4`.
    fn ipv4(proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        let total = u16::try_from(20 + l4.len()).unwrap();
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[6] = 0x40;
        p[8] = 63;
        p[9] = proto;
        p[12..16].copy_from_slice(&A);
        p[16..20].copy_from_slice(&B);
        let ip = !fold(sum_be(&p, 0));
        p[10..12].copy_from_slice(&ip.to_be_bytes());
        p.extend_from_slice(l4);
        p
    }

    /// An IPv4 TCP segment with valid checksums.
    fn tcp4(sport: u16, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&5201u16.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&ack.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&512u16.to_be_bytes());
        t.extend_from_slice(payload);
        let l4 = u32::try_from(t.len()).unwrap();
        let tcp = !fold(sum_be(&t, sum_be(&A, sum_be(&B, 6 + l4))));
        t[16..18].copy_from_slice(&tcp.to_be_bytes());
        ipv4(6, &t)
    }

    fn udp4(sport: u16, payload: &[u8]) -> Vec<u8> {
        let mut u = vec![0u8; 8];
        u[0..2].copy_from_slice(&sport.to_be_bytes());
        u[2..4].copy_from_slice(&5201u16.to_be_bytes());
        u[4..6].copy_from_slice(&u16::try_from(8 + payload.len()).unwrap().to_be_bytes());
        u.extend_from_slice(payload);
        ipv4(17, &u)
    }

    /// An IPv6 TCP segment (checksums are not what these tests look at).
    fn tcp6(seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 60 + payload.len()];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&u16::try_from(20 + payload.len()).unwrap().to_be_bytes());
        p[6] = 6;
        p[7] = 63;
        p[8] = 0xfd;
        p[24] = 0xfd;
        p[39] = 1;
        p[44..48].copy_from_slice(&seq.to_be_bytes());
        p[52] = 5 << 4;
        p[53] = TCP_ACK;
        p[60..].copy_from_slice(payload);
        p
    }

    /// Runs `packets` through the coalescer; returns every write, flattened.
    fn writes(packets: &[Vec<u8>], udp_runs: bool) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let done = write_packets(packets.iter().map(Vec::as_slice), udp_runs, |iov| {
            out.push(iov.iter().flat_map(|s| s.to_vec()).collect::<Vec<u8>>());
            Ok(0)
        });
        assert_eq!(done, Written { writes: out.len(), failed: 0 });
        out
    }

    fn le(b: &[u8]) -> u16 {
        u16::from_le_bytes([b[0], b[1]])
    }

    #[test]
    fn a_flows_consecutive_segments_become_one_gso_packet_without_their_copies() {
        let mut packets: Vec<Vec<u8>> =
            (0..4u8).map(|i| tcp4(40000, 1000 + u32::from(i) * 1000, 7, TCP_ACK, &[i; 1000])).collect();
        packets.push(tcp4(40000, 5000, 7, TCP_ACK, &[4; 500])); // shorter: ends the run
        packets.push(tcp4(40000, 5500, 7, TCP_ACK, &[5; 1000]));
        let w = writes(&packets, true);
        assert_eq!(w.len(), 2, "one GSO packet, then a lone segment");

        let (vnet, p) = w[0].split_at(VNET_HDR_LEN);
        assert_eq!((vnet[0], vnet[1]), (VNET_NEEDS_CSUM, GSO_TCPV4));
        assert_eq!((le(&vnet[2..]), le(&vnet[4..]), le(&vnet[6..]), le(&vnet[8..])), (40, 1000, 20, 16));
        assert_eq!(p.len(), 40 + 4500);
        assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])), p.len(), "IP total length");
        assert_eq!(fold(sum_be(&p[..20], 0)), 0xffff, "IP header checksum valid");
        assert_eq!(
            &p[20..40],
            &{
                let mut h = packets[0][20..40].to_vec();
                h[16..18].copy_from_slice(&p[36..38]);
                h
            }[..]
        );
        for i in 0..4u8 {
            let at = 40 + usize::from(i) * 1000;
            assert!(p[at..at + 1000].iter().all(|b| *b == i), "segment {i} in order");
        }
        assert!(p[4040..].iter().all(|b| *b == 4));
        // The checksum field holds the pseudo-header's sum: completing it over the segment as
        // the kernel does gives the checksum of the whole coalesced segment.
        let l4 = u32::try_from(p.len() - 20).unwrap();
        let mut zeroed = p[20..].to_vec();
        zeroed[16..18].fill(0);
        let whole = !fold(sum_be(&zeroed, sum_be(&A, sum_be(&B, 6 + l4))));
        assert_eq!(!fold(sum_be(&p[20..], 0)), whole);

        // A segment written alone goes as it is, behind an empty header.
        assert_eq!(w[1], [&[0u8; VNET_HDR_LEN][..], &packets[5]].concat());
    }

    #[test]
    fn runs_end_where_the_kernel_would_not_merge() {
        let seg = |sport, seq, ack, flags| tcp4(sport, seq, ack, flags, &[1; 100]);
        let cases: [(&str, Vec<Vec<u8>>, usize); 7] = [
            ("a gap in the sequence", vec![seg(1, 0, 7, TCP_ACK), seg(1, 200, 7, TCP_ACK)], 2),
            ("another acknowledgment", vec![seg(1, 0, 7, TCP_ACK), seg(1, 100, 8, TCP_ACK)], 2),
            ("another flow", vec![seg(1, 0, 7, TCP_ACK), seg(2, 100, 7, TCP_ACK)], 2),
            ("FIN", vec![seg(1, 0, 7, TCP_ACK), seg(1, 100, 7, TCP_ACK | 0x01)], 2),
            ("a retransmission", vec![seg(1, 100, 7, TCP_ACK), seg(1, 0, 7, TCP_ACK)], 2),
            (
                "PSH closes the run it ends",
                vec![seg(1, 0, 7, TCP_ACK), seg(1, 100, 7, TCP_ACK | TCP_PSH), seg(1, 200, 7, TCP_ACK)],
                2,
            ),
            ("pure ACKs", vec![tcp4(1, 0, 7, TCP_ACK, &[]), tcp4(1, 0, 8, TCP_ACK, &[])], 2),
        ];
        for (what, packets, n) in cases {
            assert_eq!(writes(&packets, true).len(), n, "{what}");
        }
        // PSH travels to the merged header.
        let w = writes(&[seg(1, 0, 7, TCP_ACK), seg(1, 100, 7, TCP_ACK | TCP_PSH)], true);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0][VNET_HDR_LEN + 33], TCP_ACK | TCP_PSH);
    }

    #[test]
    fn a_run_stays_within_64_kb() {
        let packets: Vec<Vec<u8>> =
            (0..60u32).map(|i| tcp4(1, i * 1400, 7, TCP_ACK, &[u8::try_from(i).unwrap(); 1400])).collect();
        let w = writes(&packets, true);
        let lens: Vec<usize> = w.iter().map(|p| p.len() - VNET_HDR_LEN).collect();
        assert_eq!(lens, vec![40 + 46 * 1400, 40 + 14 * 1400], "46 segments fit in 65,535 bytes");
    }

    #[test]
    fn udp_datagrams_coalesce_only_where_the_device_takes_uso() {
        let packets: Vec<Vec<u8>> =
            (0..3u8).map(|i| udp4(9, &[i; 1372])).chain([udp4(9, &[9; 10])]).collect();
        assert_eq!(writes(&packets, false).len(), 4, "no USO: one write per datagram");
        let w = writes(&packets, true);
        assert_eq!(w.len(), 1);
        let (vnet, p) = w[0].split_at(VNET_HDR_LEN);
        assert_eq!((vnet[1], le(&vnet[2..]), le(&vnet[4..]), le(&vnet[8..])), (GSO_UDP_L4, 28, 1372, 6));
        assert_eq!(usize::from(u16::from_be_bytes([p[24], p[25]])), 8 + 3 * 1372 + 10, "UDP length");
        assert_eq!(p.len(), 28 + 3 * 1372 + 10);
    }

    #[test]
    fn ipv6_segments_coalesce_with_their_payload_length() {
        let packets: Vec<Vec<u8>> = (0..3u32).map(|i| tcp6(i * 800, &[1; 800])).collect();
        let w = writes(&packets, true);
        assert_eq!(w.len(), 1);
        let (vnet, p) = w[0].split_at(VNET_HDR_LEN);
        assert_eq!((vnet[1], le(&vnet[2..]), le(&vnet[6..])), (GSO_TCPV6, 60, 40));
        assert_eq!(usize::from(u16::from_be_bytes([p[4], p[5]])), 20 + 2400);
    }

    #[test]
    fn what_is_not_a_clean_tcp_or_udp_packet_is_written_alone_and_failures_are_counted() {
        let mut fragment = udp4(9, &[1; 100]);
        fragment[6] = 0x20; // more fragments
        let mut options = tcp4(1, 0, 7, TCP_ACK, &[1; 100]);
        options[0] = 0x46;
        let packets = vec![fragment.clone(), fragment, options.clone(), options, vec![0x45, 0, 0]];
        assert_eq!(writes(&packets, true).len(), 5);
        let done =
            write_packets(packets.iter().map(Vec::as_slice), true, |_| Err(io::Error::other("refused")));
        assert_eq!(done, Written { writes: 5, failed: 5 });
    }

    /// Round trip against an independent model of the kernel's segmentation: for any stream
    /// of packets (several TCP and UDP flows over IPv4 and IPv6, full and short segments, PSH,
    /// sequence gaps, packets that join nothing), cutting every write back into segments the
    /// way the kernel does (headers copied, lengths, IPv4 ids, sequence numbers and checksums
    /// recomputed, PSH only on the last) gives back exactly the packets, byte for byte, in
    /// order; and no write breaks the kernel's bounds.
    mod round_trip {
        use proptest::prelude::*;

        use super::{super::*, A, B};

        const SRC6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        const DST6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

        #[derive(Clone, Copy, Debug)]
        struct Flow {
            v6: bool,
            tcp: bool,
            sport: u16,
            mss: usize,
        }

        const FLOWS: [Flow; 5] = [
            Flow { v6: false, tcp: true, sport: 1001, mss: 1000 },
            Flow { v6: false, tcp: true, sport: 1002, mss: 1200 },
            Flow { v6: true, tcp: true, sport: 1003, mss: 980 },
            Flow { v6: false, tcp: false, sport: 1004, mss: 900 },
            Flow { v6: true, tcp: false, sport: 1005, mss: 700 },
        ];

        fn csum(data: &[u8], init: u32) -> u16 {
            !fold(sum_be(data, init))
        }

        /// The L4 checksum with its pseudo-header; `l4` has a zero checksum field.
        fn l4_csum(v6: bool, ip: &[u8], proto: u8, l4: &[u8]) -> u16 {
            let len = u32::try_from(l4.len()).unwrap();
            let pseudo = if v6 {
                sum_be(&ip[8..40], u32::from(proto) + len)
            } else {
                sum_be(&ip[12..20], u32::from(proto) + len)
            };
            let c = csum(l4, pseudo);
            if proto == 17 && c == 0 { 0xffff } else { c }
        }

        /// A packet as a sender's stack would build it, every checksum valid. `flags` is the
        /// TCP flags byte.
        fn build(f: Flow, id: u16, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
            let proto: u8 = if f.tcp { 6 } else { 17 };
            let mut l4 = vec![0u8; if f.tcp { 20 } else { 8 }];
            l4[0..2].copy_from_slice(&f.sport.to_be_bytes());
            l4[2..4].copy_from_slice(&5201u16.to_be_bytes());
            if f.tcp {
                l4[4..8].copy_from_slice(&seq.to_be_bytes());
                l4[8..12].copy_from_slice(&7u32.to_be_bytes());
                l4[12] = 5 << 4;
                l4[13] = flags;
                l4[14..16].copy_from_slice(&512u16.to_be_bytes());
            } else {
                l4[4..6].copy_from_slice(&u16::try_from(8 + payload.len()).unwrap().to_be_bytes());
            }
            l4.extend_from_slice(payload);
            let mut ip = if f.v6 {
                let mut h = vec![0u8; 40];
                h[0] = 0x60;
                h[4..6].copy_from_slice(&u16::try_from(l4.len()).unwrap().to_be_bytes());
                h[6] = proto;
                h[7] = 63;
                h[8..24].copy_from_slice(&SRC6);
                h[24..40].copy_from_slice(&DST6);
                h
            } else {
                let mut h = vec![0u8; 20];
                h[0] = 0x45;
                h[2..4].copy_from_slice(&u16::try_from(20 + l4.len()).unwrap().to_be_bytes());
                h[4..6].copy_from_slice(&id.to_be_bytes());
                h[6] = 0x40;
                h[8] = 63;
                h[9] = proto;
                h[12..16].copy_from_slice(&A);
                h[16..20].copy_from_slice(&B);
                let c = csum(&h, 0);
                h[10..12].copy_from_slice(&c.to_be_bytes());
                h
            };
            let c = l4_csum(f.v6, &ip, proto, &l4);
            let at = if f.tcp { 16 } else { 6 };
            l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
            ip.extend_from_slice(&l4);
            ip
        }

        /// The kernel's side: one write (virtio header + packet) back into packets.
        fn segment_write(w: &[u8]) -> Vec<Vec<u8>> {
            let (vnet, p) = w.split_at(VNET_HDR_LEN);
            if vnet[1] == 0 {
                return vec![p.to_vec()];
            }
            assert_eq!(vnet[0], VNET_NEEDS_CSUM);
            let le = |b: &[u8]| usize::from(u16::from_le_bytes([b[0], b[1]]));
            let (hdr_len, gso_size, ip_len) = (le(&vnet[2..]), le(&vnet[4..]), le(&vnet[6..]));
            let v6 = p[0] >> 4 == 6;
            let tcp = matches!(vnet[1], GSO_TCPV4 | GSO_TCPV6);
            assert_eq!(vnet[1] == GSO_TCPV6, v6 && tcp);
            assert_eq!(ip_len, if v6 { 40 } else { 20 });
            assert!(p.len() <= usize::from(u16::MAX), "a GSO packet within 64 KB");
            // What the kernel checks of the packet it is handed: lengths and the IPv4 header
            // checksum of the whole, and the L4 checksum field holding the pseudo-header's sum
            // (it completes it over each segment).
            let l4_total = p.len() - ip_len;
            if v6 {
                assert_eq!(usize::from(u16::from_be_bytes([p[4], p[5]])), l4_total, "IPv6 payload length");
            } else {
                assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])), p.len(), "IPv4 total length");
                assert_eq!(fold(sum_be(&p[..20], 0)), 0xffff, "IPv4 header checksum");
            }
            let csum_at = ip_len + le(&vnet[8..]);
            let (src, dst) = if v6 { (&p[8..24], &p[24..40]) } else { (&p[12..16], &p[16..20]) };
            let proto = if tcp { 6u32 } else { 17 };
            let pseudo = fold(sum_be(src, sum_be(dst, proto + u32::try_from(l4_total).unwrap())));
            assert_eq!(u16::from_be_bytes([p[csum_at], p[csum_at + 1]]), pseudo, "partial checksum");
            let chunks: Vec<&[u8]> = p[hdr_len..].chunks(gso_size).collect();
            assert!(chunks.len() <= MAX_SEGMENTS, "{} segments", chunks.len());
            let (head_id, head_seq) = (
                u16::from_be_bytes([p[4], p[5]]),
                u32::from_be_bytes([p[ip_len + 4], p[ip_len + 5], p[ip_len + 6], p[ip_len + 7]]),
            );
            let n = chunks.len();
            chunks
                .into_iter()
                .enumerate()
                .map(|(i, chunk)| {
                    let mut ip = p[..ip_len].to_vec();
                    let mut l4 = p[ip_len..hdr_len].to_vec();
                    let l4_len = l4.len() + chunk.len();
                    if v6 {
                        ip[4..6].copy_from_slice(&u16::try_from(l4_len).unwrap().to_be_bytes());
                    } else {
                        ip[2..4].copy_from_slice(&u16::try_from(ip_len + l4_len).unwrap().to_be_bytes());
                        let id = head_id.wrapping_add(u16::try_from(i).unwrap());
                        ip[4..6].copy_from_slice(&id.to_be_bytes());
                        ip[10..12].fill(0);
                        let c = csum(&ip, 0);
                        ip[10..12].copy_from_slice(&c.to_be_bytes());
                    }
                    let proto = if tcp { 6 } else { 17 };
                    if tcp {
                        let seq = head_seq.wrapping_add(u32::try_from(i * gso_size).unwrap());
                        l4[4..8].copy_from_slice(&seq.to_be_bytes());
                        if i + 1 < n {
                            l4[13] &= !TCP_PSH;
                        }
                        l4[16..18].fill(0);
                    } else {
                        l4[4..6].copy_from_slice(&u16::try_from(l4_len).unwrap().to_be_bytes());
                        l4[6..8].fill(0);
                    }
                    l4.extend_from_slice(chunk);
                    let c = l4_csum(v6, &ip, proto, &l4);
                    let at = if tcp { 16 } else { 6 };
                    l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
                    ip.extend_from_slice(&l4);
                    ip
                })
                .collect()
        }

        #[derive(Clone, Copy, Debug)]
        enum Step {
            Full,
            Short(usize),
            Push,
            Gap,
            Syn,
        }

        fn step() -> impl Strategy<Value = (usize, Step)> {
            let kind = prop_oneof![
                6 => Just(Step::Full),
                2 => (1usize..700).prop_map(Step::Short),
                1 => Just(Step::Push),
                1 => Just(Step::Gap),
                1 => Just(Step::Syn),
            ];
            (0..FLOWS.len(), kind)
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            #[test]
            fn what_the_kernel_cuts_back_out_is_exactly_what_went_in(
                steps in prop::collection::vec(step(), 1..200),
                udp_runs in any::<bool>(),
                fill in any::<u8>(),
            ) {
                // Two full segments of one flow in a row (TCP, or UDP where the device
                // takes USO) must share a write.
                let mergeable = steps.windows(2).any(|w| {
                    w[0].0 == w[1].0
                        && (FLOWS[w[0].0].tcp || udp_runs)
                        && matches!((w[0].1, w[1].1), (Step::Full, Step::Full))
                });
                let mut seq = [1_000_000u32; FLOWS.len()];
                let mut id = [100u16; FLOWS.len()];
                let mut packets = Vec::new();
                for (n, (flow, kind)) in steps.into_iter().enumerate() {
                    let f = FLOWS[flow];
                    let (len, flags) = match kind {
                        Step::Full => (f.mss, TCP_ACK),
                        Step::Short(l) => (l, TCP_ACK),
                        Step::Push => (f.mss, TCP_ACK | TCP_PSH),
                        Step::Gap => {
                            seq[flow] = seq[flow].wrapping_add(1);
                            (f.mss, TCP_ACK)
                        }
                        Step::Syn => (0, 0x02),
                    };
                    // Payload bytes that differ per packet: a reordering would show.
                    let payload: Vec<u8> = (0..len).map(|i| fill ^ (n as u8).wrapping_add(i as u8)).collect();
                    packets.push(build(f, id[flow], seq[flow], flags, &payload));
                    id[flow] = id[flow].wrapping_add(1);
                    seq[flow] = seq[flow].wrapping_add(u32::try_from(len).unwrap());
                }
                let mut back = Vec::new();
                let mut writes = 0;
                let done = write_packets(packets.iter().map(Vec::as_slice), udp_runs, |iov| {
                    writes += 1;
                    back.extend(segment_write(&iov.iter().flat_map(|s| s.to_vec()).collect::<Vec<u8>>()));
                    Ok(0)
                });
                prop_assert_eq!(done, Written { writes, failed: 0 });
                prop_assert_eq!(back.len(), packets.len());
                prop_assert!(!mergeable || writes < packets.len(), "nothing was coalesced");
                for (i, (got, sent)) in back.iter().zip(&packets).enumerate() {
                    prop_assert_eq!(got, sent, "packet {} differs after the round trip", i);
                }
            }
        }
    }
}
