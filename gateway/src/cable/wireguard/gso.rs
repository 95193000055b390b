//! UDP offloads and batched calls on the cable's socket (the only user of these socket calls).
//!
//! Sending: a run of equal-size datagrams to one peer (what one 64 KB TUN read becomes) is one
//! message with `UDP_SEGMENT`, so the kernel's network path — routing, netfilter, the underlay
//! device — runs once per run instead of once per datagram; and the runs of one wake-up, to
//! whichever peers, leave together in one `sendmmsg`. Receiving: with `UDP_GRO` the kernel
//! hands over coalesced runs with their segment size, and one `recvmmsg` takes up to
//! [`RECV_SLOTS`] of them, from whichever peers. Profiling showed that the per-datagram kernel
//! path, not crypto, is where a gateway spends its time; the batched calls take the
//! per-syscall cost off traffic that cannot be coalesced (many peers, each sending little).

use std::{
    io::{self, IoSlice},
    mem,
    net::{SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket},
    os::fd::AsRawFd as _,
};

use nix::sys::socket::{setsockopt, sockopt};

/// Largest run sent at once (the kernel's limit is 64 segments and 64 KB).
pub const MAX_SEGMENTS: usize = 64;
pub const MAX_RUN_BYTES: usize = 65_000;

/// Asks the kernel for coalesced receives; `false` if it cannot.
pub fn enable_gro(udp: &UdpSocket) -> bool {
    setsockopt(udp, sockopt::UdpGroSegment, &true).is_ok()
}

/// Messages (runs) handed to one `sendmmsg`.
pub const MAX_RUNS: usize = 32;

/// A run of datagrams to one peer, as a range of the iovec list given to [`try_send_runs`]:
/// their bytes, concatenated, are cut into datagrams of `segment` bytes (the last may be
/// shorter). Usually a slice per datagram, handed over where each lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub dst: SocketAddr,
    /// Index of its first slice in the iovec list.
    pub start: usize,
    /// Slices in the run.
    pub count: usize,
    /// Size of every datagram but the last; 0 (or the run's whole size): one datagram.
    pub segment: u16,
}

/// Sends up to [`MAX_RUNS`] runs in one `sendmmsg`, without blocking; a run of more than one
/// datagram carries `UDP_SEGMENT`. Returns how many runs, from the first, the kernel took (at
/// least one). An error is the first run's: the caller skips or retries it, then calls again
/// for the rest (the kernel reports a later run's error on that next call).
#[expect(unsafe_code, reason = "sendmmsg(2): headers pointing at buffers alive for the call")]
pub fn try_send_runs(udp: &UdpSocket, iov: &[IoSlice<'_>], runs: &[Run]) -> io::Result<usize> {
    let n = runs.len().min(MAX_RUNS);
    if n == 0 {
        return Ok(0);
    }
    // SAFETY: plain C structs, for which all-zero bytes are a valid (empty) value.
    let mut names: [libc::sockaddr_storage; MAX_RUNS] = unsafe { mem::zeroed() };
    let mut hdrs: [libc::mmsghdr; MAX_RUNS] = unsafe { mem::zeroed() };
    // One aligned `UDP_SEGMENT` control message per run (CMSG_SPACE(2) is 24 bytes).
    let mut control = [[0u64; 4]; MAX_RUNS];
    for (i, run) in runs[..n].iter().enumerate() {
        let datagrams = iov
            .get(run.start..run.start + run.count)
            .filter(|d| !d.is_empty())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "run outside the iovec list"))?;
        let h = &mut hdrs[i].msg_hdr;
        h.msg_namelen = write_sockaddr(&mut names[i], run.dst);
        h.msg_name = (&raw mut names[i]).cast();
        // `IoSlice` is ABI-compatible with `iovec` on Unix; the kernel only reads through it.
        h.msg_iov = datagrams.as_ptr().cast_mut().cast();
        h.msg_iovlen = datagrams.len();
        let bytes: usize = datagrams.iter().map(|d| d.len()).sum();
        if run.segment > 0 && bytes > usize::from(run.segment) {
            h.msg_control = control[i].as_mut_ptr().cast();
            // SAFETY: CMSG_* on a header whose control buffer (32 bytes, 8-aligned) holds one
            // control message of two data bytes.
            unsafe {
                h.msg_controllen = libc::CMSG_SPACE(2) as usize;
                let c = libc::CMSG_FIRSTHDR(h);
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = libc::UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
                libc::CMSG_DATA(c).cast::<u16>().write_unaligned(run.segment);
            }
        }
    }
    // SAFETY: `hdrs[..n]` point at `names`, `control` and `iov`, all alive for the call.
    let sent =
        unsafe { libc::sendmmsg(udp.as_raw_fd(), hdrs.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT) };
    match usize::try_from(sent) {
        Ok(k) if k > 0 => Ok(k),
        Ok(_) => Err(io::Error::other("sendmmsg sent nothing")),
        Err(_) => Err(io::Error::last_os_error()),
    }
}

/// Whether a send error means the kernel will not segment runs on this socket (as opposed to
/// the run being refused on its way out, by netfilter, routing or a full device: those say
/// nothing about the next run).
#[must_use]
pub fn refuses_segmentation(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOPROTOOPT))
}

#[expect(unsafe_code, reason = "a sockaddr_in(6) written into a sockaddr_storage")]
fn write_sockaddr(storage: &mut libc::sockaddr_storage, addr: SocketAddr) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than, and aligned for, every sockaddr type.
            unsafe { (&raw mut *storage).cast::<libc::sockaddr_in>().write(sin) };
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo().to_be(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { (&raw mut *storage).cast::<libc::sockaddr_in6>().write(sin6) };
            mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

#[expect(unsafe_code, reason = "the sockaddr the kernel wrote, read as the type its family names")]
fn read_sockaddr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says which sockaddr the kernel wrote.
            let sin = unsafe { &*(&raw const *storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddrV4::new(ip, u16::from_be(sin.sin_port)).into())
        }
        libc::AF_INET6 => {
            // SAFETY: as above.
            let sin6 = unsafe { &*(&raw const *storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(
                SocketAddrV6::new(
                    ip,
                    u16::from_be(sin6.sin6_port),
                    u32::from_be(sin6.sin6_flowinfo),
                    sin6.sin6_scope_id,
                )
                .into(),
            )
        }
        _ => None,
    }
}

/// Runs received together by one `recvmmsg`.
pub const RECV_SLOTS: usize = 16;

/// Buffers for [`Receiver::try_recv`]: a coalesced run (up to 64 KB) per slot, reused.
pub struct Receiver {
    bufs: Vec<Vec<u8>>,
    names: Vec<libc::sockaddr_storage>,
    control: Vec<[u64; 8]>,
    /// Per slot, after a receive: (bytes, source, segment size if coalesced).
    got: Vec<(usize, Option<SocketAddr>, Option<usize>)>,
}

impl Default for Receiver {
    fn default() -> Self {
        Self::new(RECV_SLOTS, 65_536)
    }
}

impl Receiver {
    #[must_use]
    #[expect(unsafe_code, reason = "an all-zero sockaddr_storage")]
    pub fn new(slots: usize, size: usize) -> Self {
        let slots = slots.max(1);
        Self {
            bufs: vec![vec![0u8; size]; slots],
            // SAFETY: all-zero bytes are a valid sockaddr_storage.
            names: vec![unsafe { mem::zeroed() }; slots],
            control: vec![[0u64; 8]; slots],
            got: Vec::with_capacity(slots),
        }
    }

    /// Receives up to one run per slot without blocking (`WouldBlock` when there is none);
    /// returns how many. Read them with [`Self::run`].
    #[expect(unsafe_code, reason = "recvmmsg(2) into buffers owned by self, and its control messages")]
    pub fn try_recv(&mut self, udp: &UdpSocket) -> io::Result<usize> {
        let slots = self.bufs.len();
        // SAFETY: all-zero bytes are a valid (empty) mmsghdr; every pointer set below stays
        // valid for the call (the buffers are owned by `self` and not moved meanwhile).
        let mut hdrs: [libc::mmsghdr; RECV_SLOTS] = unsafe { mem::zeroed() };
        let mut iovs: [libc::iovec; RECV_SLOTS] = unsafe { mem::zeroed() };
        let n = slots.min(RECV_SLOTS);
        for i in 0..n {
            iovs[i] = libc::iovec { iov_base: self.bufs[i].as_mut_ptr().cast(), iov_len: self.bufs[i].len() };
            let h = &mut hdrs[i].msg_hdr;
            h.msg_name = (&raw mut self.names[i]).cast();
            h.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &raw mut iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = self.control[i].as_mut_ptr().cast();
            h.msg_controllen = mem::size_of::<[u64; 8]>();
        }
        // SAFETY: see above.
        let got = unsafe {
            libc::recvmmsg(
                udp.as_raw_fd(),
                hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        let got = usize::try_from(got).map_err(|_| io::Error::last_os_error())?;
        self.got.clear();
        for h in &hdrs[..got] {
            let mut segment = None;
            // SAFETY: CMSG_* over the control buffer the kernel filled, within `msg_controllen`.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                        let size = libc::CMSG_DATA(c).cast::<i32>().read_unaligned();
                        segment = usize::try_from(size).ok().filter(|s| *s > 0);
                    }
                    c = libc::CMSG_NXTHDR(&h.msg_hdr, c);
                }
            }
            let i = self.got.len();
            self.got.push((h.msg_len as usize, read_sockaddr(&self.names[i]), segment));
        }
        Ok(got)
    }

    /// Run `i` of the last receive: its source, its bytes and its segment size (the bytes
    /// are datagrams of that size, the last maybe shorter; `None`: one datagram). A slot
    /// whose source the kernel did not give is `None`.
    #[must_use]
    pub fn run(&self, i: usize) -> Option<(SocketAddr, &[u8], Option<usize>)> {
        let (len, src, segment) = *self.got.get(i)?;
        Some((src?, &self.bufs[i][..len], segment))
    }
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

    #[test]
    fn one_receive_takes_the_runs_of_several_peers_with_their_sources() {
        // Loopback only: a GSO run of three datagrams from one peer, then one datagram from
        // another, then one more from the first; one recvmmsg takes all three runs.
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(enable_gro(&rx), "loopback sockets take UDP_GRO");
        let to = rx.local_addr().unwrap();
        let (p, q) = (UdpSocket::bind("127.0.0.1:0").unwrap(), UdpSocket::bind("127.0.0.1:0").unwrap());
        let datagrams = [[1u8; 100], [2; 100], [3; 100]];
        let iov: Vec<IoSlice<'_>> = datagrams.iter().map(|d| IoSlice::new(d)).collect();
        let run = Run { dst: to, start: 0, count: 3, segment: 100 };
        assert_eq!(try_send_runs(&p, &iov, &[run]).unwrap(), 1);
        q.send_to(&[7; 60], to).unwrap();
        p.send_to(&[8; 40], to).unwrap();
        let mut r = Receiver::new(4, 2048);
        assert_eq!(r.try_recv(&rx).unwrap(), 3);
        let (psrc, qsrc) = (p.local_addr().unwrap(), q.local_addr().unwrap());
        let (src, bytes, segment) = r.run(0).unwrap();
        assert_eq!((src, bytes.len(), segment), (psrc, 300, Some(100)), "one coalesced run");
        assert_eq!(bytes.chunks(100).map(|c| c[0]).collect::<Vec<_>>(), vec![1, 2, 3]);
        let (src, bytes, segment) = r.run(1).unwrap();
        assert_eq!((src, bytes, segment.filter(|s| *s < bytes.len())), (qsrc, &[7u8; 60][..], None));
        let (src, bytes, _) = r.run(2).unwrap();
        assert_eq!((src, bytes), (psrc, &[8u8; 40][..]));
        assert!(r.run(3).is_none());
        assert_eq!(r.try_recv(&rx).unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }

    /// The send and receive halves through the real kernel, on loopback: any stream of
    /// datagrams (sizes from 1 byte to a full MTU, runs ended by a shorter one, by the
    /// segment limit or by the byte limit), gathered into runs as the lanes gather them, sent
    /// with `UDP_SEGMENT`, taken back with `UDP_GRO` and cut at the segment size the kernel
    /// reports, arrives as exactly the datagrams sent, byte for byte, in order.
    mod round_trip {
        use proptest::prelude::*;

        use super::*;

        fn drain(rx: &UdpSocket, r: &mut Receiver, into: &mut Vec<Vec<u8>>) {
            loop {
                match r.try_recv(rx) {
                    Ok(n) => {
                        for i in 0..n {
                            let (_, bytes, segment) = r.run(i).expect("a source");
                            into.extend(
                                bytes.chunks(segment.unwrap_or(bytes.len()).max(1)).map(<[u8]>::to_vec),
                            );
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) => panic!("receiving: {e}"),
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

            #[test]
            fn datagrams_sent_as_runs_come_back_as_sent(
                sizes in prop::collection::vec(prop_oneof![4 => Just(1400usize), 2 => 1usize..1400, 1 => Just(1)], 1..150),
            ) {
                let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
                prop_assert!(enable_gro(&rx));
                let to = rx.local_addr().unwrap();
                let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
                // Each datagram's bytes name it: a swap or a cut in the wrong place shows.
                let sent: Vec<Vec<u8>> = sizes
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (0..*n).map(|j| (i * 7 + j) as u8).collect())
                    .collect();
                let mut got = Vec::new();
                let mut r = Receiver::default();
                let mut batch = Batcher::default();
                let mut start = 0;
                let iov: Vec<IoSlice<'_>> = sent.iter().map(|d| IoSlice::new(d)).collect();
                let mut flush = |batch: &mut Batcher, start: usize, got: &mut Vec<Vec<u8>>| {
                    if batch.count == 0 {
                        return;
                    }
                    let segment = if batch.count > 1 { u16::try_from(batch.segment).unwrap() } else { 0 };
                    let run = Run { dst: to, start, count: batch.count, segment };
                    assert_eq!(try_send_runs(&tx, &iov, &[run]).unwrap(), 1);
                    // Taken back at once: the socket's buffer never overflows.
                    drain(&rx, &mut r, got);
                    batch.reset();
                };
                for (i, d) in sent.iter().enumerate() {
                    if batch.count > 0 && !batch.fits(to, d.len()) {
                        flush(&mut batch, start, &mut got);
                    }
                    if batch.count == 0 {
                        start = i;
                    }
                    batch.push(to, d.len());
                }
                flush(&mut batch, start, &mut got);
                // Loopback delivers through the softirq backlog: what was not yet queued when
                // a drain ran arrives a moment later.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
                while got.len() < sent.len() && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    drain(&rx, &mut r, &mut got);
                }
                prop_assert_eq!(got.len(), sent.len());
                for (i, (g, s)) in got.iter().zip(&sent).enumerate() {
                    prop_assert_eq!(g, s, "datagram {} differs", i);
                }
            }
        }
    }
}
