//! UDP segmentation offloads on the cable's socket (the only user of these socket calls).
//!
//! Sending: a run of equal-size datagrams to one peer (what one 64 KB TUN read becomes) leaves
//! in one `sendmsg` with `UDP_SEGMENT`, so the kernel's network path — routing, netfilter,
//! the underlay device — runs once per run instead of once per datagram. Receiving: with
//! `UDP_GRO` the kernel hands over coalesced runs with their segment size. Profiling showed
//! that per-datagram kernel path, not crypto, is where a gateway spends its time.

use std::{
    io::{self, IoSlice, IoSliceMut},
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
};

use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, sendmsg, setsockopt, sockopt,
};

/// Largest run sent at once (the kernel's limit is 64 segments and 64 KB).
pub const MAX_SEGMENTS: usize = 64;
pub const MAX_RUN_BYTES: usize = 65_000;

/// Asks the kernel for coalesced receives; `false` if it cannot.
pub fn enable_gro(udp: &UdpSocket) -> bool {
    setsockopt(udp, sockopt::UdpGroSegment, &true).is_ok()
}

/// Sends the bytes of `iov`, concatenated, as datagrams of `segment` bytes (the last may be
/// shorter) to `dst`, without blocking (`WouldBlock` when the socket buffer is full). The
/// datagrams can be handed over where they lie, one slice each: the kernel copies them once.
pub fn try_send_run(
    udp: &UdpSocket,
    dst: SocketAddr,
    iov: &[IoSlice<'_>],
    segment: u16,
) -> io::Result<usize> {
    let addr = SockaddrStorage::from(dst);
    let cmsg = [ControlMessage::UdpGsoSegments(&segment)];
    sendmsg(udp.as_raw_fd(), iov, &cmsg, MsgFlags::MSG_DONTWAIT, Some(&addr)).map_err(io::Error::from)
}

/// Receives one datagram or coalesced run without blocking: (bytes, source, segment size if
/// coalesced).
pub fn try_recv_run(
    udp: &UdpSocket,
    buf: &mut [u8],
    cmsg: &mut Vec<u8>,
) -> io::Result<(usize, SocketAddr, Option<usize>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(udp.as_raw_fd(), &mut iov, Some(&mut *cmsg), MsgFlags::MSG_DONTWAIT)
        .map_err(io::Error::from)?;
    let mut segment = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::UdpGroSegments(size) = c {
                segment = usize::try_from(size).ok().filter(|s| *s > 0);
            }
        }
    }
    let src = msg
        .address
        .and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| SocketAddr::from((v4.ip(), v4.port())))
                .or_else(|| a.as_sockaddr_in6().map(|v6| SocketAddr::from((v6.ip(), v6.port()))))
        })
        .ok_or_else(|| io::Error::other("datagram without a source address"))?;
    Ok((msg.bytes, src, segment))
}

/// The run of datagrams being gathered from the core's output, in order (its bookkeeping:
/// the datagrams stay where they are).
#[derive(Debug, Default)]
pub struct Batcher {
    pub dst: Option<SocketAddr>,
    pub bytes: usize,
    pub segment: usize,
    pub count: usize,
    /// A shorter datagram ended the run: nothing may follow it.
    pub closed: bool,
}

impl Batcher {
    /// Whether `data` to `dst` can join the current run.
    #[must_use]
    pub fn fits(&self, dst: SocketAddr, len: usize) -> bool {
        self.dst == Some(dst)
            && !self.closed
            && len <= self.segment
            && self.count < MAX_SEGMENTS
            && self.bytes + len <= MAX_RUN_BYTES
    }

    /// Adds a datagram of `len` bytes to `dst` (after [`Self::fits`], or to an empty run).
    pub fn push(&mut self, dst: SocketAddr, len: usize) {
        if self.count == 0 {
            self.dst = Some(dst);
            self.segment = len;
        } else if len < self.segment {
            self.closed = true;
        }
        self.bytes += len;
        self.count += 1;
    }

    pub fn reset(&mut self) {
        self.dst = None;
        self.bytes = 0;
        self.segment = 0;
        self.count = 0;
        self.closed = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_hold_equal_datagrams_and_end_with_a_shorter_one() {
        let a: SocketAddr = "10.0.0.1:51820".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:51820".parse().unwrap();
        let mut r = Batcher::default();
        r.push(a, 100);
        assert!(r.fits(a, 100));
        assert!(!r.fits(b, 100), "another peer");
        assert!(!r.fits(a, 101), "a longer datagram");
        r.push(a, 100);
        assert!(r.fits(a, 40));
        r.push(a, 40);
        assert!(!r.fits(a, 40), "nothing after the shorter one");
        assert_eq!((r.count, r.segment, r.bytes), (3, 100, 240));
        r.reset();
        for _ in 0..MAX_SEGMENTS {
            r.push(a, 10);
        }
        assert!(!r.fits(a, 10), "at most {MAX_SEGMENTS} segments");
    }
}
