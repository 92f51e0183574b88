//! utmem-proto encode/decode cost per frame.

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion};
use utmem_proto::{
    decode_request, encode_request, Key, Limits, Op, PoolId, RequestHeader, RequestId,
};

fn codec(c: &mut Criterion) {
    let h = RequestHeader {
        pool: PoolId(1),
        key: Key::new(42, 0),
        ..RequestHeader::new(Op::Get, RequestId(7))
    };
    let limits = Limits::default();
    c.bench_function("encode_get_header", |b| {
        b.iter(|| std::hint::black_box(h).encode())
    });
    let mut buf = BytesMut::with_capacity(4096);
    c.bench_function("encode_decode_get", |b| {
        b.iter(|| {
            encode_request(&h, &[], &mut buf);
            decode_request(&mut buf, &limits)
                .expect("decode")
                .expect("whole")
        })
    });
}

criterion_group!(benches, codec);
criterion_main!(benches);
