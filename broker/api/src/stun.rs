//! The one part of STUN (RFC 5389) Causeway speaks: a binding request and its answer, which
//! tells a gateway the address and port its WireGuard socket has on the far side of a NAT.
//! The broker answers; a gateway asks from the WireGuard socket itself, so that the mapping
//! it learns is the one its tunnels use. This module owns the STUN codec.

use std::net::SocketAddr;

use bytecodec::{DecodeExt, EncodeExt};
use stun_codec::{
    Message, MessageClass, MessageDecoder, MessageEncoder, TransactionId,
    rfc5389::{Attribute, attributes::XorMappedAddress, methods::BINDING},
};

/// The port a STUN responder listens on unless told otherwise (RFC 5389 §9).
pub const DEFAULT_PORT: u16 = 3478;

/// A binding request or response is 20 bytes of header and one or two small attributes; a
/// datagram longer than this is not one we asked for or answer.
pub const MAX_MESSAGE: usize = 548;

/// The fixed value in every RFC 5389 message (bytes 4..8).
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    #[error("not a STUN message")]
    NotStun,
    #[error("a STUN message of {0} bytes is longer than any binding message ({MAX_MESSAGE})")]
    TooLong(usize),
    #[error("malformed STUN message: {0}")]
    Malformed(String),
    #[error("not a binding request")]
    NotBindingRequest,
    #[error("not a binding success response")]
    NotBindingResponse,
    #[error("the response answers another transaction")]
    WrongTransaction,
    #[error("the response carries no XOR-MAPPED-ADDRESS")]
    NoMappedAddress,
}

/// Whether a datagram has a STUN message's shape: the two leading zero bits, the magic
/// cookie, and a length that matches (RFC 5389 §6). WireGuard messages never do: their first
/// byte is 1–4 and the next three are zero, never the cookie.
#[must_use]
pub fn is_stun(datagram: &[u8]) -> bool {
    datagram.len() >= 20
        && datagram[0] & 0xC0 == 0
        && datagram[4..8] == MAGIC_COOKIE
        && usize::from(u16::from_be_bytes([datagram[2], datagram[3]])) + 20 == datagram.len()
}

/// A binding request for transaction `id` (no attributes: the responder needs none).
#[must_use]
pub fn binding_request(id: [u8; 12]) -> Vec<u8> {
    encode(Message::new(MessageClass::Request, BINDING, TransactionId::new(id)))
}

/// The success response to a binding request received from `from`: its XOR-MAPPED-ADDRESS
/// is `from`, the address the request came from as this side sees it.
pub fn answer(request: &[u8], from: SocketAddr) -> Result<Vec<u8>, StunError> {
    let m = decode(request)?;
    if m.class() != MessageClass::Request || m.method() != BINDING {
        return Err(StunError::NotBindingRequest);
    }
    let mut r = Message::new(MessageClass::SuccessResponse, BINDING, m.transaction_id());
    r.add_attribute(XorMappedAddress::new(from));
    Ok(encode(r))
}

/// The reflexive address a binding success response for transaction `id` reports.
pub fn reflexive(response: &[u8], id: &[u8; 12]) -> Result<SocketAddr, StunError> {
    let m = decode(response)?;
    if m.class() != MessageClass::SuccessResponse || m.method() != BINDING {
        return Err(StunError::NotBindingResponse);
    }
    if m.transaction_id().as_bytes() != id {
        return Err(StunError::WrongTransaction);
    }
    m.get_attribute::<XorMappedAddress>().map(XorMappedAddress::address).ok_or(StunError::NoMappedAddress)
}

fn decode(datagram: &[u8]) -> Result<Message<Attribute>, StunError> {
    if datagram.len() > MAX_MESSAGE {
        return Err(StunError::TooLong(datagram.len()));
    }
    if !is_stun(datagram) {
        return Err(StunError::NotStun);
    }
    MessageDecoder::<Attribute>::new()
        .decode_from_bytes(datagram)
        .map_err(|e| StunError::Malformed(e.to_string()))?
        .map_err(|broken| StunError::Malformed(format!("{:?}", broken.error().kind())))
}

fn encode(m: Message<Attribute>) -> Vec<u8> {
    // Encoding a message we built from known attributes cannot fail.
    MessageEncoder::<Attribute>::new().encode_into_bytes(m).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: [u8; 12] = [7; 12];

    #[test]
    fn a_request_is_answered_with_the_address_it_came_from() {
        let req = binding_request(ID);
        assert_eq!(req.len(), 20);
        assert!(is_stun(&req));
        for from in ["203.0.113.7:40000", "[2001:db8::5]:51820"] {
            let from: SocketAddr = from.parse().unwrap();
            let resp = answer(&req, from).unwrap();
            assert!(is_stun(&resp));
            assert_eq!(reflexive(&resp, &ID), Ok(from));
        }
    }

    #[test]
    fn the_rfc_5769_ipv4_response_decodes() {
        // RFC 5769 §2.2 (the sample IPv4 response; its MESSAGE-INTEGRITY and FINGERPRINT are
        // not checked: binding answers carry no credentials).
        let resp: [u8; 80] = [
            0x01, 0x01, 0x00, 0x3c, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86,
            0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76, 0x65, 0x63,
            0x74, 0x6f, 0x72, 0x20, 0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43,
            0x00, 0x08, 0x00, 0x14, 0x2b, 0x91, 0xf5, 0x99, 0xfd, 0x9e, 0x90, 0xc3, 0x8c, 0x74, 0x89, 0xf9,
            0x2a, 0xf9, 0xba, 0x53, 0xf0, 0x6b, 0xe7, 0xd7, 0x80, 0x28, 0x00, 0x04, 0xc0, 0x7d, 0x4c, 0x96,
        ];
        let id = [0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae];
        assert_eq!(reflexive(&resp, &id), Ok("192.0.2.1:32853".parse().unwrap()));
    }

    #[test]
    fn hostile_or_foreign_messages_are_refused() {
        let from: SocketAddr = "198.51.100.1:1".parse().unwrap();
        let resp = answer(&binding_request(ID), from).unwrap();
        // Another transaction's answer (a forger guessing, or a stale reply).
        assert_eq!(reflexive(&resp, &[8; 12]), Err(StunError::WrongTransaction));
        // A request where a response was awaited, and the other way round.
        assert_eq!(reflexive(&binding_request(ID), &ID), Err(StunError::NotBindingResponse));
        assert_eq!(answer(&resp, from), Err(StunError::NotBindingRequest));
        // A success response without the address.
        let bare = encode(Message::new(MessageClass::SuccessResponse, BINDING, TransactionId::new(ID)));
        assert_eq!(reflexive(&bare, &ID), Err(StunError::NoMappedAddress));
        // WireGuard messages are never taken for STUN.
        for wg in [[1u8, 0, 0, 0], [2, 0, 0, 0], [3, 0, 0, 0], [4, 0, 0, 0]] {
            let mut m = vec![0u8; 148];
            m[..4].copy_from_slice(&wg);
            assert!(!is_stun(&m));
            assert_eq!(answer(&m, from), Err(StunError::NotStun));
        }
        // A length field that lies, a truncated attribute, an oversized datagram.
        let mut lying = resp.clone();
        lying[3] = lying[3].wrapping_add(4);
        assert_eq!(reflexive(&lying, &ID), Err(StunError::NotStun));
        let mut truncated = resp.clone();
        truncated[22..24].copy_from_slice(&200u16.to_be_bytes());
        assert!(
            matches!(reflexive(&truncated, &ID), Err(StunError::Malformed(_))),
            "{:?}",
            reflexive(&truncated, &ID)
        );
        let mut big = binding_request(ID);
        big.resize(MAX_MESSAGE + 4, 0);
        big[2..4].copy_from_slice(&u16::try_from(MAX_MESSAGE + 4 - 20).unwrap().to_be_bytes());
        assert_eq!(answer(&big, from), Err(StunError::TooLong(MAX_MESSAGE + 4)));
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics_and_never_yields_an_address(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
        ) {
            let from: SocketAddr = "198.51.100.1:1".parse().unwrap();
            let _ = answer(&bytes, from);
            // Random bytes name our transaction (and hold a well-formed address) only by
            // a 2^-96 chance.
            proptest::prop_assert!(reflexive(&bytes, &ID).is_err());
        }
    }
}
