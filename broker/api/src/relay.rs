//! The relay's wire format, sans IO: what a gateway and the broker's relay (on the STUN port)
//! exchange when two gateways cannot reach each other directly. The relay forwards WireGuard
//! datagrams, already encrypted end to end, between registered gateways: it never holds a
//! key that opens them.
//!
//! Every frame starts with [`MAGIC`] and a type byte (never a WireGuard message, whose first
//! byte is 1–4 followed by three zeros, nor STUN, whose first two bits are zero):
//!
//! - `Register` (gateway → relay): a credential id (the first 6 bytes of its token's SHA-256),
//!   the WireGuard public key it speaks for, a millisecond timestamp, a random nonce, and an
//!   HMAC-SHA256 of all that keyed by the token's SHA-256 (which the broker stores). The relay
//!   checks the MAC, that the credential is the cluster's whose gateway has that key, and that
//!   the timestamp is newer than the last one it took for the key (no replays); then frames
//!   for the key go to the address the registration came from.
//! - `Registered` (relay → gateway): the key and the nonce, so a forger must guess 64 bits.
//! - `Refused` (relay → gateway): the same, for a registration the relay did not take (its
//!   cluster has not published the key yet, a bad MAC, a replay): the gateway learns that the
//!   relay is reachable by that transport and keeps trying there.
//! - `Send` (gateway → relay): the destination's key id (the first 8 bytes of its key) and a
//!   datagram; the sender is whoever registered from the frame's source address.
//! - `Deliver` (relay → gateway): the sender's key id and the datagram.
//!
//! A data frame adds [`DATA_OVERHEAD`] (12) bytes: within the 20 bytes an IPv4 underlay leaves
//! spare of the tunnel's 80-byte allowance (sized for IPv6), so relayed datagrams of a full
//! tunnel MTU still fit the underlay's.
//!
//! Where UDP to the relay is blocked, the same frames travel over the broker's HTTPS port: a
//! `GET` of [`STREAM_PATH`] with `Upgrade: causeway-relay` (and the cluster's bearer token)
//! turns the connection into a stream of frames, each preceded by its length (2 bytes,
//! big-endian; [`stream_frame`], [`StreamDecoder`]). The relay treats a stream as one more
//! address: a registration on it is checked exactly as one by UDP.

use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256};

/// First three bytes of every relay frame.
pub const MAGIC: [u8; 3] = [0xCA, 0x5E, 0x72];
/// The largest datagram a frame carries (a WireGuard datagram of a 64 KiB packet).
pub const MAX_PAYLOAD: usize = 65_535 - 8 - 20 - DATA_OVERHEAD;
const HEADER: usize = 4;
/// What a `Send` or `Deliver` frame adds to a datagram.
pub const DATA_OVERHEAD: usize = HEADER + 8;
const REGISTER_LEN: usize = HEADER + 6 + 32 + 8 + 8 + 16;
const REGISTERED_LEN: usize = HEADER + 32 + 8;

const REGISTER: u8 = 1;
const REGISTERED: u8 = 2;
const SEND: u8 = 3;
const DELIVER: u8 = 4;
const REFUSED: u8 = 5;

/// A parsed frame; datagrams are borrowed from the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Register(Register),
    Registered { key: [u8; 32], nonce: [u8; 8] },
    Refused { key: [u8; 32], nonce: [u8; 8] },
    Send { dst: [u8; 8], datagram: &'a [u8] },
    Deliver { src: [u8; 8], datagram: &'a [u8] },
}

/// A registration as sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Register {
    pub credential: [u8; 6],
    pub key: [u8; 32],
    pub timestamp_ms: u64,
    pub nonce: [u8; 8],
    mac: [u8; 16],
    /// The bytes the MAC covers.
    signed: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    #[error("not a relay frame")]
    NotRelay,
    #[error("relay frame of type {0} is unknown")]
    UnknownType(u8),
    #[error("relay frame of type {kind} has {len} bytes")]
    BadLength { kind: u8, len: usize },
    #[error("a relay stream announced a frame of {0} bytes")]
    StreamLength(usize),
}

/// The path a gateway upgrades to a relay stream on the broker's API port.
pub const STREAM_PATH: &str = "/v1/relay";
/// The path a relay run outside the broker asks whether a registration is genuine on: the
/// registration frame as the body, `{"genuine": bool}` back.
pub const CHECK_PATH: &str = "/v1/relay/check";
/// The protocol named in the upgrade (`Upgrade:` header).
pub const STREAM_PROTOCOL: &str = "causeway-relay";
/// The longest frame (a data frame of [`MAX_PAYLOAD`]).
pub const MAX_FRAME: usize = DATA_OVERHEAD + MAX_PAYLOAD;

/// `frame` as it goes on a stream: its length (2 bytes, big-endian), then the frame. `None`
/// for a frame longer than [`MAX_FRAME`].
#[must_use]
pub fn stream_frame(frame: &[u8]) -> Option<Vec<u8>> {
    if frame.len() > MAX_FRAME {
        return None;
    }
    let len = u16::try_from(frame.len()).ok()?;
    let mut out = Vec::with_capacity(2 + frame.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(frame);
    Some(out)
}

/// Splits a relay stream back into frames, sans IO: feed it what was read, take the frames.
/// A length shorter than a frame header or longer than [`MAX_FRAME`] is an error, after which
/// the stream is useless (its framing is lost) and should be closed.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    buf: Vec<u8>,
    /// Where the first unread byte is: frames are taken without moving what follows them.
    start: usize,
}

impl StreamDecoder {
    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        // Compact once the consumed part dominates, so the buffer stays about one read long.
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, RelayError> {
        let rest = &self.buf[self.start..];
        let Some(head) = rest.get(..2) else { return Ok(None) };
        let len = usize::from(u16::from_be_bytes([head[0], head[1]]));
        if !(HEADER..=MAX_FRAME).contains(&len) {
            return Err(RelayError::StreamLength(len));
        }
        if rest.len() < 2 + len {
            return Ok(None);
        }
        let at = self.start + 2;
        self.start = at + len;
        Ok(Some(&self.buf[at..at + len]))
    }

    /// Bytes held that are not yet a whole frame.
    #[must_use]
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
}

/// Whether a datagram starts like a relay frame.
#[must_use]
pub fn is_relay(datagram: &[u8]) -> bool {
    datagram.len() >= HEADER && datagram[..3] == MAGIC
}

/// Parses one frame.
pub fn parse(d: &[u8]) -> Result<Frame<'_>, RelayError> {
    if !is_relay(d) {
        return Err(RelayError::NotRelay);
    }
    let kind = d[3];
    let bad = || RelayError::BadLength { kind, len: d.len() };
    let key_at = |at: usize| -> [u8; 32] { d[at..at + 32].try_into().unwrap_or([0; 32]) };
    match kind {
        REGISTER => {
            if d.len() != REGISTER_LEN {
                return Err(bad());
            }
            let b = &d[HEADER..];
            Ok(Frame::Register(Register {
                credential: b[..6].try_into().unwrap_or_default(),
                key: key_at(HEADER + 6),
                timestamp_ms: u64::from_be_bytes(b[38..46].try_into().unwrap_or_default()),
                nonce: b[46..54].try_into().unwrap_or_default(),
                mac: b[54..70].try_into().unwrap_or_default(),
                signed: d[..REGISTER_LEN - 16].to_vec(),
            }))
        }
        REGISTERED | REFUSED => {
            if d.len() != REGISTERED_LEN {
                return Err(bad());
            }
            let (key, nonce) = (key_at(HEADER), d[HEADER + 32..].try_into().unwrap_or_default());
            Ok(if kind == REGISTERED {
                Frame::Registered { key, nonce }
            } else {
                Frame::Refused { key, nonce }
            })
        }
        SEND | DELIVER => {
            if d.len() < DATA_OVERHEAD + 1 || d.len() > DATA_OVERHEAD + MAX_PAYLOAD {
                return Err(bad());
            }
            let key: [u8; 8] = d[HEADER..DATA_OVERHEAD].try_into().unwrap_or_default();
            let datagram = &d[DATA_OVERHEAD..];
            Ok(if kind == SEND {
                Frame::Send { dst: key, datagram }
            } else {
                Frame::Deliver { src: key, datagram }
            })
        }
        other => Err(RelayError::UnknownType(other)),
    }
}

/// The id data frames name a WireGuard key by: its first 8 bytes.
#[must_use]
pub fn key_id(key: &[u8; 32]) -> [u8; 8] {
    key[..8].try_into().unwrap_or_default()
}

/// The credential id a registration names: the first 6 bytes of the token's SHA-256.
#[must_use]
pub fn credential_id(token_sha256: &[u8; 32]) -> [u8; 6] {
    token_sha256[..6].try_into().unwrap_or_default()
}

/// SHA-256 of a token, the registration's MAC key (what the broker stores of a token).
#[must_use]
pub fn token_sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn mac(key: &[u8; 32], signed: &[u8]) -> [u8; 16] {
    let mut m = <Hmac<Sha256>>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(signed);
    m.finalize().into_bytes()[..16].try_into().unwrap_or_default()
}

/// A registration of `key` with the token whose SHA-256 is `token_sha256`.
#[must_use]
pub fn register(token_sha256: &[u8; 32], key: [u8; 32], timestamp_ms: u64, nonce: [u8; 8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(REGISTER_LEN);
    f.extend_from_slice(&MAGIC);
    f.push(REGISTER);
    f.extend_from_slice(&credential_id(token_sha256));
    f.extend_from_slice(&key);
    f.extend_from_slice(&timestamp_ms.to_be_bytes());
    f.extend_from_slice(&nonce);
    let m = mac(token_sha256, &f);
    f.extend_from_slice(&m);
    f
}

impl Register {
    /// The frame as it was sent.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut f = self.signed.clone();
        f.extend_from_slice(&self.mac);
        f
    }

    /// Whether the MAC is right for the token whose SHA-256 is `token_sha256` (constant time).
    #[must_use]
    pub fn verify(&self, token_sha256: &[u8; 32]) -> bool {
        let mut m = <Hmac<Sha256>>::new_from_slice(token_sha256).expect("HMAC takes any key length");
        m.update(&self.signed);
        m.verify_truncated_left(&self.mac).is_ok()
    }
}

#[must_use]
pub fn registered(key: [u8; 32], nonce: [u8; 8]) -> Vec<u8> {
    answer(REGISTERED, key, nonce)
}

/// The answer to a registration the relay did not take.
#[must_use]
pub fn refused(key: [u8; 32], nonce: [u8; 8]) -> Vec<u8> {
    answer(REFUSED, key, nonce)
}

fn answer(kind: u8, key: [u8; 32], nonce: [u8; 8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(REGISTERED_LEN);
    f.extend_from_slice(&MAGIC);
    f.push(kind);
    f.extend_from_slice(&key);
    f.extend_from_slice(&nonce);
    f
}

fn with_key(kind: u8, key: &[u8; 8], datagram: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(DATA_OVERHEAD + datagram.len());
    f.extend_from_slice(&MAGIC);
    f.push(kind);
    f.extend_from_slice(key);
    f.extend_from_slice(datagram);
    f
}

/// A datagram for the gateway whose key has id `dst` ([`key_id`]).
#[must_use]
pub fn send(dst: &[u8; 8], datagram: &[u8]) -> Vec<u8> {
    with_key(SEND, dst, datagram)
}

/// A datagram from the gateway whose key has id `src`.
#[must_use]
pub fn deliver(src: &[u8; 8], datagram: &[u8]) -> Vec<u8> {
    with_key(DELIVER, src, datagram)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let token = token_sha256("cw1_secret");
        let f = register(&token, [7; 32], 1_700_000_000_000, [9; 8]);
        let Ok(Frame::Register(r)) = parse(&f) else { panic!("{:?}", parse(&f)) };
        assert_eq!(
            (r.credential, r.key, r.timestamp_ms, r.nonce),
            (credential_id(&token), [7; 32], 1_700_000_000_000, [9; 8])
        );
        assert!(r.verify(&token));
        assert_eq!(r.to_bytes(), f);
        assert_eq!(
            parse(&registered([7; 32], [9; 8])),
            Ok(Frame::Registered { key: [7; 32], nonce: [9; 8] })
        );
        assert_eq!(parse(&refused([7; 32], [9; 8])), Ok(Frame::Refused { key: [7; 32], nonce: [9; 8] }));
        assert!(matches!(parse(&refused([0; 32], [0; 8])[..30]), Err(RelayError::BadLength { .. })));
        let wg = [4u8, 0, 0, 0, 1, 2, 3, 4];
        assert_eq!(parse(&send(&[1; 8], &wg)), Ok(Frame::Send { dst: [1; 8], datagram: &wg }));
        assert_eq!(parse(&deliver(&[2; 8], &wg)), Ok(Frame::Deliver { src: [2; 8], datagram: &wg }));
        assert_eq!(send(&[1; 8], &wg).len(), wg.len() + DATA_OVERHEAD);
    }

    #[test]
    fn forged_or_malformed_frames_are_refused() {
        let token = token_sha256("cw1_secret");
        let f = register(&token, [7; 32], 1, [9; 8]);
        // Another token's MAC, or any byte changed after signing.
        let Ok(Frame::Register(r)) = parse(&f) else { panic!() };
        assert!(!r.verify(&token_sha256("cw1_other")));
        for i in 4..f.len() {
            let mut g = f.clone();
            g[i] ^= 1;
            let Ok(Frame::Register(r)) = parse(&g) else { panic!() };
            assert!(!r.verify(&token), "byte {i} changed");
        }
        // Lengths, types, and what is not a relay frame at all (WireGuard, STUN).
        assert_eq!(parse(&f[..f.len() - 1]), Err(RelayError::BadLength { kind: REGISTER, len: f.len() - 1 }));
        assert!(matches!(parse(&registered([0; 32], [0; 8])[..30]), Err(RelayError::BadLength { .. })));
        assert!(matches!(parse(&send(&[1; 8], &[])), Err(RelayError::BadLength { .. })));
        assert_eq!(parse(&[0xCA, 0x5E, 0x72, 9, 0, 0]), Err(RelayError::UnknownType(9)));
        assert_eq!(parse(&[0xCA, 0x5E, 0x72, 6, 0, 0]), Err(RelayError::UnknownType(6)));
        assert_eq!(parse(&[1, 0, 0, 0, 5, 5, 5, 5]), Err(RelayError::NotRelay));
        assert_eq!(parse(&crate::stun::binding_request([1; 12])), Err(RelayError::NotRelay));
        let mut huge = send(&[1; 8], &[0]);
        huge.resize(DATA_OVERHEAD + MAX_PAYLOAD + 1, 0);
        assert!(matches!(parse(&huge), Err(RelayError::BadLength { .. })));
    }

    #[test]
    fn streams_split_back_into_the_frames_sent_however_they_are_cut() {
        let frames = [send(&[1; 8], &[7; 1400]), registered([3; 32], [4; 8]), deliver(&[2; 8], &[9])];
        let wire: Vec<u8> = frames.iter().flat_map(|f| stream_frame(f).unwrap()).collect();
        for cut in [1, 2, 3, 100, 1413, wire.len()] {
            let mut d = StreamDecoder::default();
            let mut got = Vec::new();
            for chunk in wire.chunks(cut) {
                d.push(chunk);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f.to_vec());
                }
            }
            assert_eq!(got, frames, "cut every {cut} bytes");
            assert_eq!(d.pending(), 0);
        }
        assert!(stream_frame(&vec![0; MAX_FRAME + 1]).is_none());
        assert_eq!(stream_frame(&vec![0; MAX_FRAME]).unwrap().len(), MAX_FRAME + 2);
    }

    #[test]
    fn a_stream_announcing_an_impossible_length_is_refused() {
        for bad in [[0u8, 0], [0, 3], [0xFF, 0xFF]] {
            let mut d = StreamDecoder::default();
            d.push(&bad);
            assert!(matches!(d.next_frame(), Err(RelayError::StreamLength(_))), "{bad:?}");
        }
        // A length that is possible waits for its bytes.
        let mut d = StreamDecoder::default();
        d.push(&[0x10, 0x00, 0xCA]);
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.pending(), 3);
    }

    proptest::proptest! {
        #[test]
        fn garbage_streams_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let mut d = StreamDecoder::default();
            d.push(&bytes);
            while let Ok(Some(_)) = d.next_frame() {}
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let mut b = bytes;
            if b.len() >= 3 { b[..3].copy_from_slice(&MAGIC); }
            let _ = parse(&b);
        }
    }
}
