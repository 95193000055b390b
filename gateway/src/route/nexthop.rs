//! Kernel nexthop objects (`ip nexthop`, Linux ≥ 5.3), which rtnetlink 0.24 cannot create.
//! Routes that name a nexthop by id (`nhid`) all follow it, so pointing every remote-cluster
//! route of a node at a new active gateway is one `RTM_NEWNEXTHOP` with `NLM_F_REPLACE`.
//!
//! The messages are built and acks parsed by plain functions (unit-tested); [`NexthopSocket`]
//! only sends and receives them.

use std::{net::IpAddr, os::fd::AsRawFd as _};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send, socket,
};

const RTM_NEWNEXTHOP: u16 = 104;
const RTM_DELNEXTHOP: u16 = 105;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const NHA_ID: u16 = 1;
const NHA_OIF: u16 = 5;
const NHA_GATEWAY: u16 = 6;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

#[derive(Debug, thiserror::Error)]
pub enum NexthopError {
    #[error("netlink socket: {0}")]
    Socket(#[from] nix::Error),
    #[error("the kernel refused {op} of nexthop {id}: {}", std::io::Error::from_raw_os_error(*.errno))]
    Refused { op: &'static str, id: u32, errno: i32 },
    #[error("no netlink acknowledgement for {op} of nexthop {id}")]
    NoAck { op: &'static str, id: u32 },
}

fn header(buf: &mut Vec<u8>, kind: u16, flags: u16, seq: u32) {
    buf.extend(0u32.to_ne_bytes()); // length, patched at the end
    buf.extend(kind.to_ne_bytes());
    buf.extend(flags.to_ne_bytes());
    buf.extend(seq.to_ne_bytes());
    buf.extend(0u32.to_ne_bytes()); // port id: the kernel fills it in
}

fn nhmsg(buf: &mut Vec<u8>, family: u8, protocol: u8) {
    buf.extend([family, 0 /* scope */, protocol, 0]);
    buf.extend(0u32.to_ne_bytes()); // flags
}

fn attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = u16::try_from(4 + value.len()).expect("small attribute");
    buf.extend(len.to_ne_bytes());
    buf.extend(kind.to_ne_bytes());
    buf.extend(value);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

fn finish(mut buf: Vec<u8>) -> Vec<u8> {
    let len = u32::try_from(buf.len()).expect("small message");
    buf[..4].copy_from_slice(&len.to_ne_bytes());
    buf
}

/// `ip nexthop replace id ID via GATEWAY dev OIF proto PROTOCOL`.
#[must_use]
pub fn encode_replace(seq: u32, id: u32, gateway: IpAddr, oif: u32, protocol: u8) -> Vec<u8> {
    let mut buf = Vec::with_capacity(64);
    header(&mut buf, RTM_NEWNEXTHOP, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, seq);
    let (family, addr) = match gateway {
        IpAddr::V4(a) => (AF_INET, a.octets().to_vec()),
        IpAddr::V6(a) => (AF_INET6, a.octets().to_vec()),
    };
    nhmsg(&mut buf, family, protocol);
    attr(&mut buf, NHA_ID, &id.to_ne_bytes());
    attr(&mut buf, NHA_OIF, &oif.to_ne_bytes());
    attr(&mut buf, NHA_GATEWAY, &addr);
    finish(buf)
}

/// `ip nexthop del id ID`.
#[must_use]
pub fn encode_delete(seq: u32, id: u32) -> Vec<u8> {
    let mut buf = Vec::with_capacity(32);
    header(&mut buf, RTM_DELNEXTHOP, NLM_F_REQUEST | NLM_F_ACK, seq);
    nhmsg(&mut buf, 0, 0);
    attr(&mut buf, NHA_ID, &id.to_ne_bytes());
    finish(buf)
}

/// The errno of the acknowledgement of request `seq` in `buf` (0: success), if there is one.
#[must_use]
pub fn parse_ack(buf: &[u8], seq: u32) -> Option<i32> {
    let mut at = 0;
    while at + 16 <= buf.len() {
        let word = |o: usize| u32::from_ne_bytes(buf[at + o..at + o + 4].try_into().expect("4 bytes"));
        let len = word(0) as usize;
        let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
        if len < 16 || at + len > buf.len() {
            return None;
        }
        if kind == NLMSG_ERROR && word(8) == seq && len >= 20 {
            return Some(-i32::from_ne_bytes(buf[at + 16..at + 20].try_into().expect("4 bytes")));
        }
        at += (len + 3) & !3;
    }
    None
}

/// A NETLINK_ROUTE socket for nexthop requests, in the namespace of the thread that opens it.
pub struct NexthopSocket {
    fd: std::os::fd::OwnedFd,
    seq: u32,
}

impl NexthopSocket {
    pub fn open() -> Result<Self, NexthopError> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        Ok(Self { fd, seq: 1 })
    }

    fn request(&mut self, op: &'static str, id: u32, msg: &[u8], seq: u32) -> Result<(), NexthopError> {
        send(self.fd.as_raw_fd(), msg, MsgFlags::empty())?;
        let mut buf = vec![0u8; 8192];
        for _ in 0..8 {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            match parse_ack(&buf[..n], seq) {
                Some(0) => return Ok(()),
                Some(errno) => return Err(NexthopError::Refused { op, id, errno }),
                None => {}
            }
        }
        Err(NexthopError::NoAck { op, id })
    }

    /// Creates nexthop `id` or repoints it at `gateway` (reached through interface `oif`).
    pub fn replace(&mut self, id: u32, gateway: IpAddr, oif: u32, protocol: u8) -> Result<(), NexthopError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        self.request("replace", id, &encode_replace(seq, id, gateway, oif, protocol), seq)
    }

    /// Deletes nexthop `id` (and with it every route that uses it); absent is fine.
    pub fn delete(&mut self, id: u32) -> Result<(), NexthopError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        match self.request("delete", id, &encode_delete(seq, id), seq) {
            Err(NexthopError::Refused { errno, .. }) if errno == libc::ENOENT => Ok(()),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_is_a_well_formed_rtm_newnexthop() {
        let m = encode_replace(7, 202_001, "10.0.0.2".parse().unwrap(), 3, 202);
        assert_eq!(m.len(), 16 + 8 + 8 + 8 + 8);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize, m.len());
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), RTM_NEWNEXTHOP);
        assert_eq!(u16::from_ne_bytes([m[6], m[7]]), 0x505);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 7);
        assert_eq!(&m[16..20], &[AF_INET, 0, 202, 0]);
        // NHA_ID, NHA_OIF, NHA_GATEWAY: each 8 bytes (4 header + 4 value).
        assert_eq!(&m[24..28], &[8, 0, 1, 0]);
        assert_eq!(u32::from_ne_bytes(m[28..32].try_into().unwrap()), 202_001);
        assert_eq!(&m[32..36], &[8, 0, 5, 0]);
        assert_eq!(&m[44..48], &[10, 0, 0, 2]);
        let v6 = encode_replace(8, 1, "fd00::2".parse().unwrap(), 3, 202);
        assert_eq!(v6[16], AF_INET6);
        assert_eq!(v6.len(), 16 + 8 + 8 + 8 + 20);
    }

    #[test]
    fn acks_are_matched_by_sequence_number() {
        let ack = |seq: u32, err: i32| {
            let mut b = Vec::new();
            b.extend(36u32.to_ne_bytes());
            b.extend(NLMSG_ERROR.to_ne_bytes());
            b.extend(0u16.to_ne_bytes());
            b.extend(seq.to_ne_bytes());
            b.extend(0u32.to_ne_bytes());
            b.extend(err.to_ne_bytes());
            b.extend([0u8; 16]);
            b
        };
        assert_eq!(parse_ack(&ack(5, 0), 5), Some(0));
        assert_eq!(parse_ack(&ack(5, -libc::ENODEV), 5), Some(libc::ENODEV));
        assert_eq!(parse_ack(&ack(4, 0), 5), None);
        let mut two = ack(4, 0);
        two.extend(ack(5, -libc::EINVAL));
        assert_eq!(parse_ack(&two, 5), Some(libc::EINVAL));
        assert_eq!(parse_ack(&[1, 2, 3], 5), None);
        assert_eq!(parse_ack(&two[..30], 4), None);
    }
}
