//! Whole frames over a byte buffer: the streaming decoders check a header's
//! length against the limits before reserving room for its payload, and split
//! the payload out of the buffer without copying it.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::DecodeError;
use crate::header::{Limits, ReplyHeader, RequestHeader, REPLY_HEADER_LEN, REQUEST_HEADER_LEN};

/// A request with its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The header; `header.len == payload.len()`.
    pub header: RequestHeader,
    /// The payload (the value of a PUT).
    pub payload: Bytes,
}

/// A reply with its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The header; `header.len == payload.len()`.
    pub header: ReplyHeader,
    /// The payload (the value of a GET).
    pub payload: Bytes,
}

/// Appends a request; `header.len` is set from the payload.
pub fn encode_request(header: &RequestHeader, payload: &[u8], out: &mut BytesMut) {
    let mut h = *header;
    h.len = payload.len() as u64;
    out.reserve(REQUEST_HEADER_LEN + payload.len());
    out.put_slice(&h.encode());
    out.put_slice(payload);
}

/// Appends a reply; `header.len` is set from the payload.
pub fn encode_reply(header: &ReplyHeader, payload: &[u8], out: &mut BytesMut) {
    let mut h = *header;
    h.len = payload.len() as u64;
    out.reserve(REPLY_HEADER_LEN + payload.len());
    out.put_slice(&h.encode());
    out.put_slice(payload);
}

/// Takes one request off the front of `buf` if it is there whole.
///
/// `Ok(None)` means more bytes are needed; the buffer then has room reserved
/// for the rest of the frame, which is never more than the limits allow.
pub fn decode_request(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Request>, DecodeError> {
    let Some(head) = buf.get(..REQUEST_HEADER_LEN) else {
        return Ok(None);
    };
    let mut h = [0u8; REQUEST_HEADER_LEN];
    h.copy_from_slice(head);
    let header = RequestHeader::decode(&h, limits)?;
    let payload = take_payload(buf, REQUEST_HEADER_LEN, header.len);
    Ok(payload.map(|payload| Request { header, payload }))
}

/// Takes one reply off the front of `buf` if it is there whole; see [`decode_request`].
pub fn decode_reply(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Reply>, DecodeError> {
    let Some(head) = buf.get(..REPLY_HEADER_LEN) else {
        return Ok(None);
    };
    let mut h = [0u8; REPLY_HEADER_LEN];
    h.copy_from_slice(head);
    let header = ReplyHeader::decode(&h, limits)?;
    let payload = take_payload(buf, REPLY_HEADER_LEN, header.len);
    Ok(payload.map(|payload| Reply { header, payload }))
}

/// `len` was checked against the limits, which fit in memory, before this is called.
fn take_payload(buf: &mut BytesMut, header_len: usize, len: u64) -> Option<Bytes> {
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    let total = header_len.saturating_add(len);
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return None;
    }
    buf.advance(header_len);
    Some(buf.split_to(len).freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::{Op, Status};
    use crate::payload::{
        CopyTarget, HelloReply, HelloRequest, IdentityStats, MapReply, NewPool, Placement,
        PoolKind, CAP_COPY,
    };
    use crate::types::{Key, PoolId, PoolUuid, RequestId};
    use proptest::prelude::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn req(op: Op, flags: u16, pool: u32, key: Key, payload: &[u8]) -> String {
        let h = RequestHeader {
            flags,
            pool: PoolId(pool),
            key,
            ..RequestHeader::new(op, RequestId(0x0102_0304_0506_0708))
        };
        let mut out = BytesMut::new();
        encode_request(&h, payload, &mut out);
        hex(&out)
    }

    // Golden bytes: one request per op. A change here is a wire-format change.
    #[test]
    fn golden_requests() {
        let id = "0807060504030201";
        let k = Key::new(0x1122_3344_5566_7788, 0x99aa_bbcc);
        let hello = HelloRequest {
            min_version: 1,
            max_version: 1,
            capabilities: CAP_COPY,
        };
        assert_eq!(
            req(Op::Hello, 0, 0, Key::default(), &hello.encode()),
            format!(
                "55544d4d01010000{id}00000000000000000000000000000000\
                 1000000000000000\
                 01010000000000000100000000000000"
            )
        );
        let (flags, name) = NewPool {
            kind: PoolKind::Private("ab".into()),
            ephemeral: true,
            durable: false,
        }
        .encode();
        assert_eq!(
            req(Op::NewPool, flags, 0, Key::default(), &name),
            format!("55544d4d01020100{id}000000000000000000000000000000000200000000000000")
                + "6162"
        );
        let (flags, uuid) = NewPool {
            kind: PoolKind::Shared(PoolUuid([0xee; 16])),
            ephemeral: false,
            durable: false,
        }
        .encode();
        assert_eq!(
            req(Op::NewPool, flags, 0, Key::default(), &uuid),
            format!("55544d4d01020200{id}000000000000000000000000000000001000000000000000")
                + &"ee".repeat(16)
        );
        assert_eq!(
            req(Op::DestroyPool, 0, 7, Key::default(), &[]),
            format!("55544d4d01030000{id}07000000000000000000000000000000") + "0000000000000000"
        );
        let keyhex = "ccbbaa998877665544332211";
        assert_eq!(
            req(Op::Put, 0, 7, k, b"xyz"),
            format!("55544d4d01040000{id}07000000{keyhex}0300000000000000") + "78797a"
        );
        for (op, b) in [(Op::Get, 5), (Op::Flush, 6), (Op::FlushObject, 7)] {
            assert_eq!(
                req(op, 0, 7, k, &[]),
                format!("55544d4d010{b}0000{id}07000000{keyhex}0000000000000000")
            );
        }
        let dst = CopyTarget(Key::new(9, 10)).encode();
        assert_eq!(
            req(Op::Copy, 0, 7, k, &dst),
            format!("55544d4d01080000{id}07000000{keyhex}0c00000000000000")
                + "09000000000000000a000000"
        );
        assert_eq!(
            req(Op::Stats, 0, 0, Key::default(), &[]),
            format!("55544d4d01090000{id}{}", "00".repeat(24))
        );
        assert_eq!(
            req(Op::Ping, 0, 0, Key::default(), &[]),
            format!("55544d4d010a0000{id}{}", "00".repeat(24))
        );
        assert_eq!(
            req(Op::Map, 0, 0, Key::default(), &[]),
            format!("55544d4d010b0000{id}{}", "00".repeat(24))
        );
    }

    #[test]
    fn golden_replies() {
        let mut out = BytesMut::new();
        let h = ReplyHeader::new(Op::Get, RequestId(5), Status::Ok);
        encode_reply(&h, b"hi", &mut out);
        assert_eq!(
            hex(&out),
            "55544d4d01050000050000000000000002000000000000006869"
        );
        for s in Status::ALL {
            let mut out = BytesMut::new();
            encode_reply(&ReplyHeader::new(Op::Put, RequestId(1), s), &[], &mut out);
            assert_eq!(out[6], s as u8);
            let back = decode_reply(&mut out, &Limits::default()).unwrap().unwrap();
            assert_eq!(back.header.status, s);
        }
        let hello = HelloReply {
            version: 1,
            capabilities: 7,
            max_value: 512 << 20,
            quota: 1 << 30,
            identity: "cid:3".into(),
        };
        assert_eq!(
            hex(&hello.encode()),
            "0100000000000000\
             0700000000000000\
             0000002000000000\
             0000004000000000\
             0500636964 3a33"
                .replace(' ', "")
        );
        let stats = IdentityStats {
            values: 2,
            ..Default::default()
        };
        assert_eq!(hex(&stats.encode()[8..16]), "0200000000000000");
        let placed = Placement {
            offset: 0x40,
            stamp: 0x0102,
        };
        assert_eq!(hex(&placed.encode()), "40000000000000000201000000000000");
        assert_eq!(Placement::decode(&placed.encode()), Ok(placed));
        assert!(
            Placement::decode(&[0u8; 16]).is_err(),
            "stamp 0 is never valid"
        );
        assert_eq!(hex(&MapReply { len: 1 << 30 }.encode()), "0000004000000000");
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let mut whole = BytesMut::new();
        let h = RequestHeader::new(Op::Put, RequestId(3));
        encode_request(&h, &[7u8; 100], &mut whole);
        for cut in 0..whole.len() {
            let mut part = BytesMut::from(&whole[..cut]);
            assert_eq!(decode_request(&mut part, &Limits::default()), Ok(None));
        }
        let r = decode_request(&mut whole, &Limits::default())
            .unwrap()
            .unwrap();
        assert_eq!(r.payload.len(), 100);
        assert!(whole.is_empty());
    }

    fn any_op() -> impl Strategy<Value = Op> {
        prop::sample::select(Op::ALL.to_vec())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn request_round_trip(op in any_op(), flags: u16, id: u64, pool: u32, oid: u64,
                              index: u32, payload in prop::collection::vec(any::<u8>(), 0..64)) {
            let limits = Limits::default();
            let payload = if (payload.len() as u64) <= limits.request_payload(op) {
                payload
            } else {
                Vec::new()
            };
            let h = RequestHeader { flags, pool: PoolId(pool), key: Key::new(oid, index),
                                    ..RequestHeader::new(op, RequestId(id)) };
            let mut buf = BytesMut::new();
            encode_request(&h, &payload, &mut buf);
            encode_request(&h, &payload, &mut buf);
            for _ in 0..2 {
                let r = decode_request(&mut buf, &limits).unwrap().unwrap();
                prop_assert_eq!(r.header, RequestHeader { len: payload.len() as u64, ..h });
                prop_assert_eq!(&r.payload[..], &payload[..]);
            }
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn reply_round_trip(op in any_op(), s in prop::sample::select(Status::ALL.to_vec()),
                            id: u64, payload in prop::collection::vec(any::<u8>(), 0..64)) {
            let limits = Limits::default();
            let payload = if (payload.len() as u64) <= limits.reply_payload(op) {
                payload
            } else {
                Vec::new()
            };
            let h = ReplyHeader::new(op, RequestId(id), s);
            let mut buf = BytesMut::new();
            encode_reply(&h, &payload, &mut buf);
            let r = decode_reply(&mut buf, &limits).unwrap().unwrap();
            prop_assert_eq!(r.header, ReplyHeader { len: payload.len() as u64, ..h });
            prop_assert_eq!(&r.payload[..], &payload[..]);
        }

        #[test]
        fn payloads_round_trip(min in 0u8..4, extra in 0u8..4, caps: u64, quota: u64,
                               name in "[a-z:0-9-]{1,40}", eph: bool, uuid: [u8; 16],
                               oid: u64, index: u32, f in any::<[u64; 10]>()) {
            let h = HelloRequest { min_version: min, max_version: min + extra, capabilities: caps };
            prop_assert_eq!(HelloRequest::decode(&h.encode()), Ok(h));
            let r = HelloReply { version: min, capabilities: caps, max_value: quota, quota,
                                 identity: name.clone() };
            prop_assert_eq!(HelloReply::decode(&r.encode()), Ok(r));
            for kind in [PoolKind::Private(name.clone()), PoolKind::Shared(PoolUuid(uuid))] {
                let p = NewPool { kind, ephemeral: eph, durable: !eph && uuid[0] & 1 == 1 };
                let (flags, b) = p.encode();
                prop_assert_eq!(NewPool::decode(flags, &b), Ok(p));
            }
            let c = CopyTarget(Key::new(oid, index));
            prop_assert_eq!(CopyTarget::decode(&c.encode()), Ok(c));
            let s = IdentityStats { pools: f[0], values: f[1], bytes: f[2], quota: f[3],
                puts: f[4], gets: f[5], hits: f[6], misses: f[7], evictions: f[8], refusals: f[9] };
            prop_assert_eq!(IdentityStats::decode(&s.encode()), Ok(s));
        }

        // Arbitrary bytes never panic and never make the decoder reserve more than the limit.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256),
                                       flags: u16) {
            let limits = Limits { max_value: 1 << 20 };
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode_request(&mut buf, &limits) {}
            prop_assert!(buf.capacity() <= (1 << 20) + 4096);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode_reply(&mut buf, &limits) {}
            prop_assert!(buf.capacity() <= (1 << 20) + 4096);
            let _ = HelloRequest::decode(&bytes);
            let _ = HelloReply::decode(&bytes);
            let _ = NewPool::decode(flags, &bytes);
            let _ = CopyTarget::decode(&bytes);
            let _ = IdentityStats::decode(&bytes);
        }

        // Valid magic and op with random fields: decoding must still never panic.
        #[test]
        fn random_headers_never_panic(op in any_op(), rest in any::<[u8; 34]>()) {
            let mut b = [0u8; REQUEST_HEADER_LEN];
            b[0..4].copy_from_slice(b"UTMM");
            b[5] = op as u8;
            b[4] = rest[0];
            b[6..].copy_from_slice(&rest[..34]);
            let mut buf = BytesMut::from(&b[..]);
            let _ = decode_request(&mut buf, &Limits::default());
        }
    }
}
