//! In-band health probes, sans IO: ICMP echo requests sent *through* the tunnel from the local
//! health address to the remote gateway's, so a reply proves that packets are forwarded end to
//! end, not just that a handshake once happened. A Causeway peer answers in its cable core; a
//! stock WireGuard peer answers with its kernel if its health address is local there.

use std::{
    collections::VecDeque,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

/// ICMP identifier of our probes (replies with another id are not ours).
pub const PROBE_ID: u16 = 0xca05;
/// How often a probe is sent on a live session: the failover switch's interval (a gateway
/// that misses three in a row is left for a standby that answers).
pub const PROBE_INTERVAL: Duration = crate::failover::Timers::DEFAULT.interval;
/// A probe is due this much before a full interval has passed: the timer that sends probes
/// runs twice per interval and may wake a little early, which must not cost a whole tick.
const PROBE_SLACK: Duration = Duration::from_millis(20);
/// No reply for this long: the connection is shown down (the switch decides faster, on its own
/// timers; a status that flickers on every late reply would tell an operator nothing).
pub const DOWN_AFTER: Duration = Duration::from_millis(1600);
/// Probes remembered for RTT and loss (two seconds' worth).
const WINDOW: usize = 20;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;

/// An ICMP echo inside an IPv4 packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Echo {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub reply: bool,
    pub id: u16,
    pub seq: u16,
    pub payload: Vec<u8>,
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(0xffff)
}

impl Echo {
    /// The IPv4 packet, with valid IP and ICMP checksums (stock kernels check both).
    #[must_use]
    pub fn to_packet(&self) -> Vec<u8> {
        let icmp_len = 8 + self.payload.len();
        let total = 20 + icmp_len;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&u16::try_from(total).unwrap_or(u16::MAX).to_be_bytes());
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = 1; // ICMP
        p[12..16].copy_from_slice(&self.src.octets());
        p[16..20].copy_from_slice(&self.dst.octets());
        let ip_sum = checksum(&p[..20]);
        p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
        p[20] = if self.reply { ICMP_ECHO_REPLY } else { ICMP_ECHO_REQUEST };
        p[24..26].copy_from_slice(&self.id.to_be_bytes());
        p[26..28].copy_from_slice(&self.seq.to_be_bytes());
        p[28..].copy_from_slice(&self.payload);
        let icmp_sum = checksum(&p[20..]);
        p[22..24].copy_from_slice(&icmp_sum.to_be_bytes());
        p
    }

    /// Parses an IPv4 ICMP echo request or reply; anything else is `None`.
    #[must_use]
    pub fn parse(p: &[u8]) -> Option<Self> {
        if p.len() < 28 || p[0] >> 4 != 4 || p[9] != 1 {
            return None;
        }
        let ihl = usize::from(p[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
        if ihl < 20 || total > p.len() || total < ihl + 8 {
            return None;
        }
        let icmp = &p[ihl..total];
        let reply = match icmp[0] {
            ICMP_ECHO_REPLY => true,
            ICMP_ECHO_REQUEST => false,
            _ => return None,
        };
        if icmp[1] != 0 || checksum(icmp) != 0 {
            return None;
        }
        Some(Self {
            src: Ipv4Addr::new(p[12], p[13], p[14], p[15]),
            dst: Ipv4Addr::new(p[16], p[17], p[18], p[19]),
            reply,
            id: u16::from_be_bytes([icmp[4], icmp[5]]),
            seq: u16::from_be_bytes([icmp[6], icmp[7]]),
            payload: icmp[8..].to_vec(),
        })
    }

    /// The answer to this request.
    #[must_use]
    pub fn answer(&self) -> Self {
        Self { src: self.dst, dst: self.src, reply: true, ..self.clone() }
    }
}

/// Health of one tunnel as the probes see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// A probe was answered within [`DOWN_AFTER`].
    Up,
    /// Probes go unanswered.
    Down,
    /// No probe sent yet.
    Unknown,
}

/// Probe bookkeeping of one peer.
#[derive(Debug, Default)]
pub struct ProbeState {
    next_seq: u16,
    last_sent: Option<Instant>,
    first_sent: Option<Instant>,
    last_reply: Option<Instant>,
    /// (seq, sent at, answered) of the last [`WINDOW`] probes.
    window: VecDeque<(u16, Instant, bool)>,
    rtt: Option<Duration>,
}

impl ProbeState {
    /// The next probe if one is due at `now`.
    pub fn next(&mut self, now: Instant, src: Ipv4Addr, dst: Ipv4Addr) -> Option<Echo> {
        if self.last_sent.is_some_and(|t| now.duration_since(t) < PROBE_INTERVAL - PROBE_SLACK) {
            return None;
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.last_sent = Some(now);
        self.first_sent.get_or_insert(now);
        if self.window.len() == WINDOW {
            self.window.pop_front();
        }
        self.window.push_back((seq, now, false));
        Some(Echo { src, dst, reply: false, id: PROBE_ID, seq, payload: b"causeway-probe".to_vec() })
    }

    /// Records a reply; unknown or repeated sequence numbers are ignored.
    pub fn on_reply(&mut self, seq: u16, now: Instant) {
        if let Some(entry) = self.window.iter_mut().find(|(s, _, answered)| *s == seq && !answered) {
            entry.2 = true;
            let rtt = now.duration_since(entry.1);
            self.rtt = Some(rtt);
            self.last_reply = Some(now);
        }
    }

    #[must_use]
    pub fn health(&self, now: Instant) -> Health {
        match (self.first_sent, self.last_reply) {
            (None, _) => Health::Unknown,
            (_, Some(r)) if now.duration_since(r) < DOWN_AFTER => Health::Up,
            // Give the very first probe its chance before calling the tunnel down.
            (Some(first), None) if now.duration_since(first) < DOWN_AFTER => Health::Unknown,
            _ => Health::Down,
        }
    }

    /// What the failover switch needs: since when probes go out, and when one was last
    /// answered.
    #[must_use]
    pub fn evidence(&self) -> crate::failover::Evidence {
        crate::failover::Evidence { probing_since: self.first_sent, last_answer: self.last_reply }
    }

    #[must_use]
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// Fraction of the probes in the window, old enough to have been answered, that were not.
    #[must_use]
    pub fn loss(&self, now: Instant) -> f64 {
        let settled: Vec<bool> = self
            .window
            .iter()
            .filter(|(_, t, _)| now.duration_since(*t) >= DOWN_AFTER)
            .map(|e| e.2)
            .collect();
        if settled.is_empty() {
            return 0.0;
        }
        let lost = settled.iter().filter(|a| !**a).count();
        #[expect(clippy::cast_precision_loss, reason = "at most WINDOW entries")]
        let frac = lost as f64 / settled.len() as f64;
        frac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_round_trips_with_valid_checksums() {
        let e = Echo {
            src: "10.1.0.0".parse().unwrap(),
            dst: "10.2.0.0".parse().unwrap(),
            reply: false,
            id: PROBE_ID,
            seq: 7,
            payload: b"xyz".to_vec(),
        };
        let p = e.to_packet();
        assert_eq!(checksum(&p[..20]), 0, "IP header checksum");
        assert_eq!(Echo::parse(&p), Some(e.clone()));
        let a = e.answer();
        assert!(a.reply && a.src == e.dst && a.dst == e.src && a.seq == 7);
        let mut bad = p.clone();
        bad[30] ^= 1;
        assert_eq!(Echo::parse(&bad), None, "corrupt ICMP is not a probe");
        assert_eq!(Echo::parse(&p[..20]), None);
    }

    #[test]
    fn health_rtt_and_loss_follow_replies() {
        let t0 = Instant::now();
        let (a, b) = ("10.1.0.0".parse().unwrap(), "10.2.0.0".parse().unwrap());
        let mut s = ProbeState::default();
        assert_eq!(s.health(t0), Health::Unknown);
        let p = s.next(t0, a, b).unwrap();
        assert!(s.next(t0 + Duration::from_millis(50), a, b).is_none(), "not due yet");
        s.on_reply(p.seq, t0 + Duration::from_millis(3));
        assert_eq!(s.rtt(), Some(Duration::from_millis(3)));
        assert_eq!(s.health(t0 + Duration::from_millis(500)), Health::Up);
        // The path breaks: probes keep going unanswered.
        let mut t = t0;
        while t < t0 + DOWN_AFTER + PROBE_INTERVAL * 2 {
            t += PROBE_INTERVAL;
            s.next(t, a, b).unwrap();
        }
        assert_eq!(s.health(t), Health::Down);
        assert!(s.loss(t) > 0.5, "{}", s.loss(t));
        // It heals.
        t += PROBE_INTERVAL;
        let p = s.next(t, a, b).unwrap();
        s.on_reply(p.seq, t + Duration::from_millis(1));
        assert_eq!(s.health(t + Duration::from_millis(2)), Health::Up);
    }

    #[test]
    fn first_probe_gets_its_chance() {
        let t0 = Instant::now();
        let mut s = ProbeState::default();
        s.next(t0, "10.1.0.0".parse().unwrap(), "10.2.0.0".parse().unwrap()).unwrap();
        assert_eq!(s.health(t0 + Duration::from_millis(100)), Health::Unknown);
        assert_eq!(s.health(t0 + DOWN_AFTER), Health::Down);
    }
}
