//! The cable's I/O threads, around the one sans-IO [`WgCore`].
//!
//! A *lane* is a dedicated OS thread that owns one queue of the multi-queue TUN device and one
//! UDP socket of a `SO_REUSEPORT` group on the WireGuard port, and moves packets both ways:
//! TUN reads (up to 64 KB, split into MTU-sized packets) are encrypted and leave as GSO runs;
//! datagram runs (GRO) are decrypted and written back coalesced. Lanes spread the work over
//! the cores, and the kernel gives them flow affinity, so a TCP stream is never reordered:
//!
//! - the socket group hashes each sender's address and port to one socket, so everything a
//!   remote gateway sends is read and decrypted, in order, by one lane;
//! - that lane hands each decrypted packet, chosen by a hash of its flow, to *another* lane,
//!   which writes it to the device (in order: one producer, one FIFO inbox). Writing is the
//!   heavy half of receiving (the kernel delivers the packet to the pod inside the write), so
//!   even a single stream from a single peer keeps two cores busy: one decrypting, one
//!   writing;
//! - the TUN device steers a flow's outbound packets to the queue of the lane that last wrote
//!   its inbound ones (the kernel's automatic queue selection), so each flow is read by one
//!   lane, and it is the lane that writes the flow's other direction.
//!
//! The protocol state stays in one place, the core, of which every lane holds a handle: a lane
//! locks only the peer a packet is for, so lanes working for different peers never wait on
//! each other, and the peer table is swapped whole by the control thread, which owns the
//! timers and the control calls. No tokio in the data path: lanes block in `poll(2)`, and every
//! socket is non-blocking, so one full queue never stalls the other direction for long.

use std::{
    io::{self, IoSlice},
    net::{SocketAddr, UdpSocket},
    os::{
        fd::{AsFd, BorrowedFd},
        unix::net::UnixDatagram,
    },
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use tracing::{debug, warn};

use super::{
    Command, coalesce,
    core::{BUF_SIZE, DropReason, Sink, WgCore},
    gso,
};

/// How often the core's timers run (handshakes, keepalives, expiry, probes): twice per probe
/// interval, so that probes leave on time.
const TICK: Duration = Duration::from_millis(50);
/// Datagram runs handled per wake-up before the TUN side gets a turn.
const UDP_BATCH: usize = 64;
/// TUN reads (each up to 64 KB) per wake-up before the socket side gets a turn.
const TUN_READS: usize = 16;
/// Decrypted packets waiting in a lane's inbox past which more are dropped (and counted): a
/// lane that falls this far behind is not going to catch up by queueing more.
const INBOX_LIMIT: usize = 4096;
/// A hand-off this small, to a lane with nothing left to write, is written by the decrypting
/// lane itself (through the other lane's queue): a ping or a request does not wait for a
/// second thread to wake up, and bulk traffic still takes two cores.
const DIRECT_MAX: usize = 8;

/// A lane waits at most this long (ms) in `poll(2)`, so even an idle lane turns (and beats).
const LANE_WAKE_MS: u16 = 1000;

/// When each lane last went round its loop: a lane that has not for a few seconds is stuck
/// (a deadlock, a write that never returns), which the gateway's liveness check reports.
#[derive(Clone, Debug)]
pub struct Beats {
    start: Instant,
    /// Milliseconds since `start`, per lane.
    last: Arc<[AtomicU64]>,
}

impl Beats {
    fn new(lanes: usize) -> Self {
        Self { start: Instant::now(), last: (0..lanes).map(|_| AtomicU64::new(0)).collect() }
    }

    fn beat(&self, lane: usize) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last[lane].store(ms, Ordering::Relaxed);
    }

    /// Lanes that have not turned for longer than `after`.
    #[must_use]
    pub fn stalled(&self, after: Duration) -> usize {
        let now = self.start.elapsed();
        self.last
            .iter()
            .filter(|t| now.saturating_sub(Duration::from_millis(t.load(Ordering::Relaxed))) > after)
            .count()
    }
}

/// One lane's endpoints.
pub(super) struct Lane {
    pub tun: tun_rs::SyncDevice,
    pub udp: UdpSocket,
}

/// Every lane's queue: a lane writes a small hand-off through its receiver's queue, so the
/// kernel keeps steering that flow to the receiver.
type Queues = Arc<[Arc<tun_rs::SyncDevice>]>;

/// Where a packet goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dest {
    Udp(SocketAddr),
    Tun,
}

/// Packets in order, in one buffer that is reused: once warm, moving a packet through the
/// core, the lanes' hand-off and the writers allocates nothing, and the core seals and opens
/// packets in place here (its sink room), so they are not copied out of a scratch buffer.
#[derive(Debug, Default)]
struct Outputs {
    /// The packets, back to back in `bytes[..end]`. Past `end` the buffer stays initialized
    /// across clears, so lending it as room costs nothing once warm.
    bytes: Vec<u8>,
    end: usize,
    items: Vec<(Dest, usize, usize)>,
}

impl Sink for Outputs {
    fn udp(&mut self, dst: SocketAddr, datagram: &[u8]) {
        self.push(Dest::Udp(dst), datagram);
    }
    fn tun(&mut self, packet: &[u8]) {
        self.push(Dest::Tun, packet);
    }
    fn room(&mut self) -> Option<&mut [u8]> {
        self.grow(BUF_SIZE);
        Some(&mut self.bytes[self.end..])
    }
    fn commit(&mut self, dst: Option<SocketAddr>, range: std::ops::Range<usize>) {
        let len = range.len();
        if range.start != 0 {
            // boringtun builds at the start of what it is given; keep the packets contiguous
            // should that ever change.
            self.bytes.copy_within(self.end + range.start..self.end + range.end, self.end);
        }
        self.items.push((dst.map_or(Dest::Tun, Dest::Udp), self.end, self.end + len));
        self.end += len;
    }
}

impl Outputs {
    /// Makes `bytes[end..end + n]` exist (zeroed only the first time the buffer gets this big).
    fn grow(&mut self, n: usize) {
        if self.bytes.len() < self.end + n {
            self.bytes.resize(self.end + n, 0);
        }
    }

    fn push(&mut self, dest: Dest, data: &[u8]) {
        self.grow(data.len());
        let start = self.end;
        self.end += data.len();
        self.bytes[start..self.end].copy_from_slice(data);
        self.items.push((dest, start, self.end));
    }

    fn iter(&self) -> impl Iterator<Item = (Dest, &[u8])> {
        self.items.iter().map(|(d, s, e)| (*d, &self.bytes[*s..*e]))
    }

    fn len(&self) -> usize {
        self.items.len()
    }

    fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    fn clear(&mut self) {
        self.end = 0;
        self.items.clear();
    }

    /// Appends `other`'s packets until this holds `limit`; empties `other` and returns how
    /// many of its packets did not fit.
    fn take_from(&mut self, other: &mut Outputs, limit: usize) -> usize {
        if self.is_empty() && other.len() <= limit {
            // The usual case: the lane drained its inbox; trade buffers instead of copying.
            std::mem::swap(self, other);
            other.clear();
            return 0;
        }
        let fit = limit.saturating_sub(self.len()).min(other.len());
        for (dest, data) in other.iter().take(fit) {
            self.push(dest, data);
        }
        let refused = other.len() - fit;
        other.clear();
        refused
    }
}

/// Decrypted packets handed to a lane for writing, and the doorbell that wakes it.
struct Inbox {
    packets: Mutex<Outputs>,
    bell: UnixDatagram,
    /// Packets handed over and not yet written: at zero, every packet handed to this lane is
    /// in the kernel, and another lane may write the next ones itself without reordering.
    unwritten: AtomicUsize,
}

impl Inbox {
    fn new(bell: UnixDatagram) -> Self {
        Self { packets: Mutex::new(Outputs::default()), bell, unwritten: AtomicUsize::new(0) }
    }

    /// Appends `packets` (in order) and rings; returns how many did not fit. Empties `packets`.
    fn deliver(&self, packets: &mut Outputs) -> usize {
        let offered = packets.len();
        let refused = {
            let mut q = self.packets.lock().unwrap_or_else(PoisonError::into_inner);
            let refused = q.take_from(packets, INBOX_LIMIT);
            self.unwritten.fetch_add(offered - refused, Ordering::Release);
            refused
        };
        // A full doorbell already has a wake-up pending.
        let _ = self.bell.send(&[1]);
        refused
    }

    /// Whether everything handed to this lane has been written.
    fn idle(&self) -> bool {
        self.unwritten.load(Ordering::Acquire) == 0
    }
}

/// The lane (other than `own`, when there are others) that writes `packet`'s flow to the
/// device.
fn writer_lane(own: usize, lanes: usize, packet: &[u8]) -> usize {
    if lanes < 2 {
        return own;
    }
    let others = u32::try_from(lanes - 1).unwrap_or(u32::MAX);
    (own + 1 + (flow_hash(packet) % others) as usize) % lanes
}

/// A hash of the packet's addresses, protocol and (TCP/UDP, unfragmented) ports: equal for
/// every packet of one flow.
fn flow_hash(p: &[u8]) -> u32 {
    let (fields, proto, l4): (&[u8], u8, Option<usize>) = match p.first().map(|b| b >> 4) {
        Some(4) if p.len() >= 20 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let unfragmented = u16::from_be_bytes([p[6], p[7]]) & 0x3fff == 0;
            (&p[12..20], p[9], unfragmented.then_some(ihl))
        }
        Some(6) if p.len() >= 40 => (&p[8..40], p[6], Some(40)),
        _ => return 0,
    };
    let ports = match (proto, l4) {
        (6 | 17, Some(at)) if p.len() >= at + 4 => &p[at..at + 4],
        _ => &[][..],
    };
    // FNV-1a: cheap, and good enough to spread flows over a handful of lanes.
    let mut h: u32 = 0x811c_9dc5;
    for b in fields.iter().chain(ports).chain(std::iter::once(&proto)) {
        h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    h
}

/// Starts one thread per lane and the control thread, which serves `commands` until `Stop`
/// (or until every sender is gone), then stops the lanes and waits for them: when `Stop` is
/// answered, every queue and socket is closed.
pub(super) fn start(
    core: WgCore,
    lanes: Vec<Lane>,
    commands: mpsc::Receiver<Command>,
    mtu: usize,
    segmentation: Arc<AtomicBool>,
) -> io::Result<Beats> {
    let control_udp = lanes.first().ok_or_else(|| io::Error::other("no lane"))?.udp.try_clone()?;
    // Closing the write end wakes every lane's poll at once (POLLHUP): the stop signal.
    let (stop_rx, stop_tx) = std::io::pipe()?;
    let stop_rx = Arc::new(stop_rx);
    let mut inboxes = Vec::with_capacity(lanes.len());
    let mut bells = Vec::with_capacity(lanes.len());
    for _ in &lanes {
        let (ring, hear) = UnixDatagram::pair()?;
        ring.set_nonblocking(true)?;
        hear.set_nonblocking(true)?;
        inboxes.push(Inbox::new(ring));
        bells.push(hear);
    }
    let inboxes: Arc<[Inbox]> = inboxes.into();
    let (queues, sockets): (Vec<_>, Vec<_>) = lanes.into_iter().map(|l| (Arc::new(l.tun), l.udp)).unzip();
    let queues: Queues = queues.into();
    let mut threads = Vec::with_capacity(sockets.len());
    let beats = Beats::new(sockets.len());
    for (i, (udp, bell)) in sockets.into_iter().zip(bells).enumerate() {
        let (core, stop_rx, inboxes, queues, segmentation, beats) = (
            core.handle(),
            stop_rx.clone(),
            inboxes.clone(),
            queues.clone(),
            segmentation.clone(),
            beats.clone(),
        );
        let lane = LaneIo { tun: queues[i].clone(), udp };
        let ctx = LaneCtx { index: i, inboxes, queues, bell, mtu, segmentation, beats };
        let t = std::thread::Builder::new()
            .name(format!("cw-lane-{i}"))
            .spawn(move || run_lane(core, &ctx, &lane, stop_rx.as_fd()))?;
        threads.push(t);
    }
    std::thread::Builder::new()
        .name("cw-cable-ctl".into())
        .spawn(move || control(core, &control_udp, &segmentation, &commands, stop_tx, threads))?;
    Ok(beats)
}

/// The control thread: timers and control calls. Their output is only handshakes, probes
/// and keepalives, sent from the socket group's first socket.
fn control(
    mut core: WgCore,
    udp: &UdpSocket,
    segmentation: &AtomicBool,
    commands: &mpsc::Receiver<Command>,
    stop: std::io::PipeWriter,
    lanes: Vec<JoinHandle<()>>,
) {
    let mut out = Outputs::default();
    let mut next_tick = Instant::now() + TICK;
    let stopped = loop {
        match commands.recv_timeout(next_tick.saturating_duration_since(Instant::now())) {
            Ok(Command::Upsert(cfg, done)) => {
                let _ = done.send(core.upsert_peer(cfg, &mut out));
            }
            Ok(Command::Remove(key, done)) => {
                let _ = done.send(core.remove_peer(&key));
            }
            Ok(Command::Stats(reply)) => {
                let drops = core.drops().into_iter().map(|(r, n)| (r.name(), n)).collect();
                let _ = reply.send((core.peers(Instant::now()), drops));
            }
            Ok(Command::SetHealthIp(ip)) => core.set_health_ip(ip),
            Ok(Command::Stop(done)) => break Some(done),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                core.tick(now, &mut out);
                next_tick = now + TICK;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break None,
        }
        // Timers and control calls only ever produce datagrams.
        let refused = send_datagrams(udp, &out, segmentation).refused;
        if refused > 0 {
            core.count_drops(DropReason::SendRefused, refused as u64);
        }
        out.clear();
    };
    drop(stop);
    for t in lanes {
        if t.join().is_err() {
            warn!("a cable lane panicked");
        }
    }
    if let Some(done) = stopped {
        let _ = done.send(());
    }
}

fn readable(fd: &PollFd<'_>) -> bool {
    fd.revents().is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLERR | PollFlags::POLLHUP))
}

/// Waits until `fd` can take more (a full socket buffer or TUN queue drains quickly).
fn wait_writable(fd: BorrowedFd<'_>) {
    let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
    let _ = poll(&mut fds, PollTimeout::from(100u16));
}

/// What a lane thread owns besides its endpoints.
struct LaneCtx {
    index: usize,
    inboxes: Arc<[Inbox]>,
    queues: Queues,
    /// This lane's end of its inbox's doorbell.
    bell: UnixDatagram,
    mtu: usize,
    /// Whether runs still leave as `UDP_SEGMENT` messages (shared: the kernel's answer holds
    /// for every socket of the group).
    segmentation: Arc<AtomicBool>,
    beats: Beats,
}

/// A lane's loop: wait for either side or the inbox, drain each in bounded batches, write
/// what the core returns.
/// A lane thread's own endpoints.
struct LaneIo {
    tun: Arc<tun_rs::SyncDevice>,
    udp: UdpSocket,
}

fn run_lane(mut core: WgCore, ctx: &LaneCtx, lane: &LaneIo, stop: BorrowedFd<'_>) {
    let index = ctx.index;
    // Room for a batch of coalesced runs of datagrams (UDP GRO), or of single datagrams.
    let mut rx = gso::Receiver::new(gso::RECV_SLOTS, BUF_SIZE.max(65_536));
    // One TUN read: the virtio header plus up to 64 KB, split into MTU-sized packets.
    let mut original = vec![0u8; tun_rs::VIRTIO_NET_HDR_LEN + 65_535];
    let mut segments = vec![vec![0u8; ctx.mtu.max(1280) + 64]; tun_rs::IDEAL_BATCH_SIZE];
    let mut sizes = vec![0usize; tun_rs::IDEAL_BATCH_SIZE];
    let mut out = Outputs::default();
    // Decrypted packets bound for other lanes, per lane; and what this lane's inbox held.
    let mut outgoing: Vec<Outputs> =
        std::iter::repeat_with(Outputs::default).take(ctx.inboxes.len()).collect();
    let mut incoming = Outputs::default();
    let mut ring = [0u8; 64];
    debug!(lane = index, "cable lane running");
    loop {
        ctx.beats.beat(index);
        let mut fds = [
            PollFd::new(lane.tun.as_fd(), PollFlags::POLLIN),
            PollFd::new(lane.udp.as_fd(), PollFlags::POLLIN),
            PollFd::new(ctx.bell.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop, PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::from(LANE_WAKE_MS)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                warn!(lane = index, error = %e, "waiting on the tunnel device and socket failed");
                return;
            }
        }
        if fds[3].revents().is_some_and(|r| !r.is_empty()) {
            debug!(lane = index, "cable lane stopping");
            return;
        }
        let (tun_ready, udp_ready, rung) = (readable(&fds[0]), readable(&fds[1]), readable(&fds[2]));
        if rung {
            while ctx.bell.recv(&mut ring).is_ok() {}
            std::mem::swap(
                &mut *ctx.inboxes[index].packets.lock().unwrap_or_else(PoisonError::into_inner),
                &mut incoming,
            );
            write_to(&lane.tun, incoming.iter().map(|(_, p)| p));
            ctx.inboxes[index].unwritten.fetch_sub(incoming.len(), Ordering::Release);
            incoming.clear();
        }
        if tun_ready {
            for _ in 0..TUN_READS {
                match lane.tun.recv_multiple(&mut original, &mut segments, &mut sizes, 0) {
                    Ok(n) => {
                        for (seg, len) in segments.iter().zip(&sizes).take(n) {
                            core.on_tun_packet(&seg[..*len], &mut out);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        warn!(lane = index, error = %e, "reading the tunnel device failed");
                        break;
                    }
                }
            }
        }
        if udp_ready {
            let now = Instant::now();
            let mut runs = 0;
            while runs < UDP_BATCH {
                match rx.try_recv(&lane.udp) {
                    Ok(n) => {
                        runs += n;
                        for (src, bytes, segment) in (0..n).filter_map(|i| rx.run(i)) {
                            for d in bytes.chunks(segment.unwrap_or(bytes.len()).max(1)) {
                                core.on_datagram(src, d, now, &mut out);
                            }
                        }
                        if n < gso::RECV_SLOTS {
                            // The socket is drained: no need for a call that says so.
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        debug!(lane = index, error = %e, "udp receive failed");
                        break;
                    }
                }
            }
        }
        // Datagrams and device writes are independent: datagrams first, in one pass.
        let refused = send_datagrams(&lane.udp, &out, &ctx.segmentation).refused;
        if refused > 0 {
            core.count_drops(DropReason::SendRefused, refused as u64);
        }
        let decrypted = out.iter().filter(|(dest, _)| *dest == Dest::Tun).map(|(_, p)| p);
        let lanes = outgoing.len();
        if lanes < 2 {
            // A single lane writes what it decrypts.
            write_to(&lane.tun, decrypted);
        } else {
            for data in decrypted {
                outgoing[writer_lane(index, lanes, data)].tun(data);
            }
        }
        out.clear();
        let mut refused = 0;
        for (i, packets) in outgoing.iter_mut().enumerate().filter(|(_, p)| !p.is_empty()) {
            let inbox = &ctx.inboxes[i];
            if packets.len() <= DIRECT_MAX && inbox.idle() {
                write_to(&ctx.queues[i], packets.iter().map(|(_, p)| p));
                packets.clear();
            } else {
                refused += inbox.deliver(packets);
            }
        }
        if refused > 0 {
            core.count_drops(DropReason::LaneBacklog, refused as u64);
        }
    }
}

/// Datagrams handed to the kernel by one [`send_datagrams`] batch (their iovec list).
const SEND_DATAGRAMS: usize = 256;

/// Sends the datagrams in `out`, in order: each run to one peer (equal sizes, the last maybe
/// shorter) is one `UDP_SEGMENT` message while `segmentation` holds, and up to
/// [`gso::MAX_RUNS`] messages, to whichever peers, leave in one `sendmmsg`; the datagrams are
/// handed over where they lie (no copy into a run buffer). Waits while the socket buffer is
/// full. Datagrams the kernel refuses (netfilter, no route) are lost, like any datagram on the
/// way, and counted. A kernel that refuses segmentation clears `segmentation` for good, and
/// its runs go one datagram per message.
fn send_datagrams(udp: &UdpSocket, out: &Outputs, segmentation: &AtomicBool) -> Sent {
    let mut iov = [IoSlice::new(&[]); SEND_DATAGRAMS];
    let mut runs = [gso::Run { dst: SocketAddr::from(([0, 0, 0, 0], 0)), start: 0, count: 0, segment: 0 };
        gso::MAX_RUNS];
    let (mut filled, mut queued) = (0, 0);
    let mut run = gso::Batcher::default();
    let mut sent = Sent::default();
    let segment = segmentation.load(Ordering::Relaxed);
    for (dest, data) in out.iter() {
        let Dest::Udp(dst) = dest else { continue };
        let joins = segment && run.count > 0 && run.fits(dst, data.len()) && filled < SEND_DATAGRAMS;
        if !joins && run.count > 0 {
            runs[queued] = close_run(&run, filled);
            queued += 1;
            run.reset();
        }
        if queued == gso::MAX_RUNS || filled == SEND_DATAGRAMS {
            sent.add(send_runs(udp, &iov[..filled], &runs[..queued], segmentation));
            (filled, queued) = (0, 0);
        }
        iov[filled] = IoSlice::new(data);
        filled += 1;
        run.push(dst, data.len());
    }
    if run.count > 0 {
        runs[queued] = close_run(&run, filled);
        queued += 1;
    }
    sent.add(send_runs(udp, &iov[..filled], &runs[..queued], segmentation));
    sent
}

/// What a send took: system calls, and datagrams the kernel refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Sent {
    calls: usize,
    refused: usize,
}

impl Sent {
    fn add(&mut self, other: Sent) {
        self.calls += other.calls;
        self.refused += other.refused;
    }
}

/// The finished run `run`, whose last datagram is `iov[end - 1]`.
fn close_run(run: &gso::Batcher, end: usize) -> gso::Run {
    gso::Run {
        dst: run.dst.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
        start: end - run.count,
        count: run.count,
        segment: u16::try_from(run.segment).unwrap_or(u16::MAX),
    }
}

/// Sends `runs` (ranges of `iov`, a slice per datagram) with as few `sendmmsg` calls as the
/// kernel allows.
fn send_runs(udp: &UdpSocket, iov: &[IoSlice<'_>], runs: &[gso::Run], segmentation: &AtomicBool) -> Sent {
    let mut sent = Sent::default();
    let mut first = 0;
    while first < runs.len() {
        sent.calls += 1;
        match gso::try_send_runs(udp, iov, &runs[first..]) {
            Ok(n) => first += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_writable(udp.as_fd()),
            Err(e) => {
                let r = runs[first];
                if r.count > 1 && gso::refuses_segmentation(&e) {
                    if segmentation.swap(false, Ordering::Relaxed) {
                        warn!(error = %e, "UDP segmentation offload refused; sending datagrams one by one");
                    }
                    let singles: Vec<gso::Run> = (r.start..r.start + r.count)
                        .map(|i| gso::Run { start: i, count: 1, segment: 0, ..r })
                        .collect();
                    sent.add(send_runs(udp, iov, &singles, segmentation));
                } else {
                    debug!(dst = %r.dst, datagrams = r.count, error = %e, "udp send refused");
                    sent.refused += r.count;
                }
                first += 1;
            }
        }
    }
    sent
}

/// Writes decrypted packets (in order) to the device through `queue`: runs of one flow's
/// segments coalesced into GSO packets, each written from where its packets lie.
fn write_to<'a>(queue: &tun_rs::SyncDevice, packets: impl IntoIterator<Item = &'a [u8]>) {
    if !queue.tcp_gso() {
        // No virtio header on this device (the cable always asks for one; this keeps a device
        // without it working, one packet per write).
        for p in packets {
            if let Err(e) = queue.send(p) {
                debug!(error = %e, "writing the tunnel device failed");
            }
        }
        return;
    }
    coalesce::write_packets(packets, queue.udp_gso(), |iov| queue.send_vectored(iov));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 TCP segment (ACK) with valid checksums.
    fn tcp_segment(src: [u8; 4], dst: [u8; 4], sport: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let total = 40 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&u16::try_from(total).unwrap().to_be_bytes());
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        let sum = |data: &[u8], init: u32| {
            let mut s = init;
            for c in data.chunks(2) {
                s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
            }
            while s > 0xffff {
                s = (s & 0xffff) + (s >> 16);
            }
            !u16::try_from(s).unwrap()
        };
        let ip_csum = sum(&p[..20], 0);
        p[10..12].copy_from_slice(&ip_csum.to_be_bytes());
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = 0x10;
        p[34..36].copy_from_slice(&512u16.to_be_bytes());
        p[40..].copy_from_slice(payload);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src);
        pseudo.extend_from_slice(&dst);
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&u16::try_from(total - 20).unwrap().to_be_bytes());
        pseudo.extend_from_slice(&p[20..]);
        let tcp_csum = sum(&pseudo, 0);
        p[36..38].copy_from_slice(&tcp_csum.to_be_bytes());
        p
    }

    #[test]
    fn each_flow_has_one_writer_and_it_is_never_the_decrypting_lane() {
        let (a, b) = ([10, 1, 0, 2], [10, 2, 0, 2]);
        for lanes in [2, 3, 4] {
            let mut used = std::collections::BTreeSet::new();
            for port in 40000..40064 {
                let first = writer_lane(0, lanes, &tcp_segment(a, b, port, 1, b"x"));
                let later = writer_lane(0, lanes, &tcp_segment(a, b, port, 999, b"yyyy"));
                assert_eq!(first, later, "one flow, one writer");
                assert_ne!(first, 0, "the decrypting lane hands off");
                used.insert(first);
            }
            assert_eq!(used.len(), lanes - 1, "flows spread over every other lane");
        }
        assert_eq!(writer_lane(0, 1, &tcp_segment(a, b, 1, 1, b"x")), 0, "a single lane writes itself");
        // Fragments carry no ports: all of a datagram's fragments go the same way.
        let mut frag = tcp_segment(a, b, 40000, 1, b"x");
        frag[6] = 0x20;
        let mut other = tcp_segment(a, b, 40001, 1, b"x");
        other[6] = 0x20;
        assert_eq!(flow_hash(&frag), flow_hash(&other));
        assert_eq!(flow_hash(&[0x45]), 0, "too short to be IPv4");
    }

    #[test]
    fn a_full_inbox_refuses_the_excess_and_keeps_the_order() {
        let (ring, hear) = UnixDatagram::pair().unwrap();
        ring.set_nonblocking(true).unwrap();
        let inbox = Inbox::new(ring);
        let mut batch = Outputs::default();
        for i in 0..INBOX_LIMIT - 2 {
            batch.tun(&i.to_le_bytes());
        }
        assert_eq!(inbox.deliver(&mut batch), 0);
        for i in 0..5usize {
            batch.tun(&(INBOX_LIMIT + i).to_le_bytes());
        }
        assert_eq!(inbox.deliver(&mut batch), 3, "two fit");
        assert!(batch.is_empty());
        let q = inbox.packets.lock().unwrap();
        assert_eq!(q.len(), INBOX_LIMIT);
        let last: Vec<&[u8]> = q.iter().skip(INBOX_LIMIT - 3).map(|(_, p)| p).collect();
        let want: Vec<Vec<u8>> = [INBOX_LIMIT - 3, INBOX_LIMIT, INBOX_LIMIT + 1]
            .iter()
            .map(|i| i.to_le_bytes().to_vec())
            .collect();
        assert_eq!(last, want.iter().map(Vec::as_slice).collect::<Vec<_>>(), "the first ones kept, in order");
        let mut rung = [0u8; 8];
        assert!(hear.recv(&mut rung).is_ok(), "the doorbell rang");
        drop(q);
        assert_eq!(inbox.unwritten.load(Ordering::Acquire), INBOX_LIMIT, "what was taken is owed a write");
        assert!(!inbox.idle(), "a lane with packets to write is not idle");
    }

    /// `n` loopback receivers and their addresses, and a non-blocking sender.
    fn loopback(n: usize) -> (Vec<UdpSocket>, Vec<SocketAddr>, UdpSocket) {
        let rx: Vec<UdpSocket> = (0..n).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
        let addrs = rx.iter().map(|s| s.local_addr().unwrap()).collect();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.set_nonblocking(true).unwrap();
        (rx, addrs, tx)
    }

    fn recv_all(sock: &UdpSocket, n: usize) -> Vec<(u8, usize)> {
        let mut buf = [0u8; 2048];
        (0..n)
            .map(|_| {
                let len = sock.recv(&mut buf).unwrap();
                (buf[0], len)
            })
            .collect()
    }

    #[test]
    fn runs_to_several_peers_leave_in_one_call_as_their_datagrams_in_order() {
        // Loopback only. Three equal datagrams and a shorter one to A (one GSO run), one to B,
        // a device packet in between (not sent), then one more to A: three runs, one call.
        let (rx, to, tx) = loopback(2);
        let (a, b, to_a, to_b) = (&rx[0], &rx[1], to[0], to[1]);
        let mut out = Outputs::default();
        for (i, len) in [(1u8, 300), (2, 300), (3, 300), (4, 120)] {
            out.udp(to_a, &vec![i; len]);
        }
        out.tun(&[9; 40]);
        out.udp(to_b, &[5; 200]);
        out.udp(to_a, &[6; 300]);
        let segmentation = AtomicBool::new(true);
        let sent = send_datagrams(&tx, &out, &segmentation);
        assert_eq!(sent, Sent { calls: 1, refused: 0 });
        assert!(segmentation.load(Ordering::Relaxed), "loopback takes UDP_SEGMENT");
        assert_eq!(recv_all(a, 5), vec![(1, 300), (2, 300), (3, 300), (4, 120), (6, 300)]);
        assert_eq!(recv_all(b, 1), vec![(5, 200)]);
    }

    #[test]
    fn a_refused_run_is_counted_and_neither_stops_the_rest_nor_turns_segmentation_off() {
        // The limited broadcast address without SO_BROADCAST: the kernel refuses the run
        // (EACCES, or no route), as a firewall rule would (EPERM), before any segmentation.
        let (rx, to, tx) = loopback(1);
        let (a, to_a) = (&rx[0], to[0]);
        let nowhere: SocketAddr = "255.255.255.255:9".parse().unwrap();
        let mut out = Outputs::default();
        out.udp(to_a, &[1; 100]);
        out.udp(nowhere, &[2; 100]);
        out.udp(nowhere, &[3; 100]);
        out.udp(to_a, &[4; 100]);
        out.udp(to_a, &[5; 100]);
        let segmentation = AtomicBool::new(true);
        let sent = send_datagrams(&tx, &out, &segmentation);
        assert_eq!(sent.refused, 2, "{sent:?}");
        assert!(segmentation.load(Ordering::Relaxed), "a refused run says nothing about offloads");
        assert_eq!(recv_all(a, 3), vec![(1, 100), (4, 100), (5, 100)]);
    }

    #[test]
    fn without_segmentation_every_datagram_is_its_own_message_in_one_call() {
        let (rx, to, tx) = loopback(1);
        let (a, to_a) = (&rx[0], to[0]);
        let mut out = Outputs::default();
        for i in 1..=4u8 {
            out.udp(to_a, &[i; 64]);
        }
        let segmentation = AtomicBool::new(false);
        assert_eq!(send_datagrams(&tx, &out, &segmentation), Sent { calls: 1, refused: 0 });
        assert_eq!(recv_all(a, 4), vec![(1, 64), (2, 64), (3, 64), (4, 64)]);
    }

    #[test]
    fn more_runs_than_one_call_takes_leave_in_order() {
        // Alternating peers: every datagram is its own run; MAX_RUNS per call.
        let (rx, to, tx) = loopback(2);
        let (a, b, to_a, to_b) = (&rx[0], &rx[1], to[0], to[1]);
        let mut out = Outputs::default();
        let total = gso::MAX_RUNS * 2 + 3;
        for i in 0..total {
            let to = if i % 2 == 0 { to_a } else { to_b };
            out.udp(to, &[u8::try_from(i).unwrap(); 50]);
        }
        let segmentation = AtomicBool::new(true);
        let sent = send_datagrams(&tx, &out, &segmentation);
        assert_eq!(sent, Sent { calls: total.div_ceil(gso::MAX_RUNS), refused: 0 });
        let want = |parity: usize| {
            (0..total).filter(move |i| i % 2 == parity).map(|i| (u8::try_from(i).unwrap(), 50))
        };
        assert_eq!(recv_all(a, total.div_ceil(2)), want(0).collect::<Vec<_>>());
        assert_eq!(recv_all(b, total / 2), want(1).collect::<Vec<_>>());
    }

    #[test]
    fn outputs_lend_room_and_keep_packets_back_to_back() {
        let dst: SocketAddr = "172.31.0.12:51820".parse().unwrap();
        let mut out = Outputs::default();
        out.tun(&[1; 10]);
        let room = out.room().expect("the lanes' sink lends room");
        assert!(room.len() >= BUF_SIZE);
        room[..5].copy_from_slice(&[2; 5]);
        out.commit(Some(dst), 0..5);
        // Built further in: moved down so the packets stay contiguous for the GSO runs.
        let room = out.room().unwrap();
        room[8..11].copy_from_slice(&[3; 3]);
        out.commit(None, 8..11);
        let got: Vec<(Dest, Vec<u8>)> = out.iter().map(|(d, p)| (d, p.to_vec())).collect();
        assert_eq!(
            got,
            vec![(Dest::Tun, vec![1; 10]), (Dest::Udp(dst), vec![2; 5]), (Dest::Tun, vec![3; 3])]
        );
        assert_eq!(out.end, 18);

        // Warm: clearing keeps the room, so lending it again neither allocates nor zeroes.
        let at = out.bytes.as_ptr();
        out.clear();
        let room = out.room().unwrap();
        assert_eq!(room[0], 1, "the old bytes are still there: nothing was zeroed");
        room[..4].copy_from_slice(&[4; 4]);
        out.commit(None, 0..4);
        assert_eq!(out.bytes.as_ptr(), at, "no new allocation");
        assert_eq!(out.iter().map(|(_, p)| p.to_vec()).collect::<Vec<_>>(), vec![vec![4; 4]]);
    }

    #[test]
    fn outputs_reuse_their_buffers() {
        let dst: SocketAddr = "172.31.0.12:51820".parse().unwrap();
        let mut out = Outputs::default();
        out.udp(dst, &[1; 100]);
        out.tun(&[2; 50]);
        let got: Vec<(Dest, usize)> = out.iter().map(|(d, p)| (d, p.len())).collect();
        assert_eq!(got, vec![(Dest::Udp(dst), 100), (Dest::Tun, 50)]);
        let (bytes, items) = (out.bytes.capacity(), out.items.capacity());
        out.clear();
        out.udp(dst, &[3; 100]);
        out.tun(&[4; 50]);
        assert_eq!((out.bytes.capacity(), out.items.capacity()), (bytes, items), "no new allocation");
    }
}
