//! Reading what `tcpdump -w` captured on a veth: the UDP datagrams over IPv4 in a classic pcap
//! savefile of Ethernet frames (little-endian, as tcpdump writes on x86).

use std::net::{Ipv4Addr, SocketAddrV4};

/// One captured UDP datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram<'a> {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub payload: &'a [u8],
}

/// The IPv4 UDP datagrams of a capture, in order; other frames are skipped, and a truncated
/// last record ends the list.
#[must_use]
pub fn udp_datagrams(pcap: &[u8]) -> Vec<Datagram<'_>> {
    // A 24-byte file header, then records: a 16-byte header (captured length at 8..12) and
    // the frame.
    let mut at = 24;
    let mut out = Vec::new();
    while at + 16 <= pcap.len() {
        let caplen = u32::from_le_bytes([pcap[at + 8], pcap[at + 9], pcap[at + 10], pcap[at + 11]]) as usize;
        let frame = &pcap[(at + 16).min(pcap.len())..(at + 16 + caplen).min(pcap.len())];
        at += 16 + caplen;
        if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] || frame[14 + 9] != 17 {
            continue;
        }
        let ip = &frame[14..];
        let udp = usize::from(ip[0] & 0x0f) * 4;
        if ip.len() < udp + 8 {
            continue;
        }
        let addr = |o: usize| Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]);
        let port = |o: usize| u16::from_be_bytes([ip[udp + o], ip[udp + o + 1]]);
        out.push(Datagram {
            src: SocketAddrV4::new(addr(12), port(0)),
            dst: SocketAddrV4::new(addr(16), port(2)),
            payload: &ip[udp + 8..],
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_come_out_with_addresses_ports_and_payloads() {
        let frame = |proto: u8, payload: &[u8]| {
            let mut f = vec![0u8; 12];
            f.extend_from_slice(&[0x08, 0x00]);
            let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0, 172, 31, 0, 11, 172, 31, 0, 12];
            ip.extend_from_slice(&51820u16.to_be_bytes());
            ip.extend_from_slice(&40000u16.to_be_bytes());
            ip.extend_from_slice(&[0, 0, 0, 0]);
            ip.extend_from_slice(payload);
            f.extend(ip);
            f
        };
        let mut pcap = vec![0u8; 24];
        for f in [frame(17, b"one"), frame(6, b"tcp"), frame(17, b"two")] {
            let mut rec = vec![0u8; 16];
            rec[8..12].copy_from_slice(&u32::try_from(f.len()).unwrap().to_le_bytes());
            pcap.extend(rec);
            pcap.extend(f);
        }
        let got = udp_datagrams(&pcap);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].src, "172.31.0.11:51820".parse().unwrap());
        assert_eq!(got[0].dst, "172.31.0.12:40000".parse().unwrap());
        assert_eq!((got[0].payload, got[1].payload), (&b"one"[..], &b"two"[..]));
        // A record cut short ends the list.
        pcap.truncate(pcap.len() - 10);
        assert_eq!(udp_datagrams(&pcap).len(), 1);
    }
}
