//! The pool store alone: PUT and GET by value size, on 1 and 2 threads, beside a
//! memcpy of the same size (the floor of any copy).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use utmem_host::{Policy, Store};
use utmem_proto::{Key, NewPool, PoolKind};

const SIZES: [usize; 5] = [64, 4096, 65536, 262_144, 1 << 20];

fn store_ops(c: &mut Criterion) {
    let mut g = c.benchmark_group("store");
    for size in SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        let value = Bytes::from(vec![7u8; size]);
        g.bench_with_input(BenchmarkId::new("memcpy", size), &size, |b, _| {
            let mut dst = vec![0u8; size];
            b.iter(|| dst.copy_from_slice(&value))
        });
        for threads in [1usize, 2] {
            let store = Arc::new(Store::new(8 << 30, 1 << 30, Policy::new(8 << 30)));
            g.bench_with_input(
                BenchmarkId::new(format!("put_get_{threads}t"), size),
                &size,
                |b, _| {
                    b.iter_custom(|iters| {
                        let per = iters / threads as u64 + 1;
                        let t0 = Instant::now();
                        std::thread::scope(|s| {
                            for t in 0..threads {
                                let (store, value) = (Arc::clone(&store), value.clone());
                                s.spawn(move || {
                                    let ident = store.identity(&format!("t{t}"));
                                    let req = NewPool {
                                        kind: PoolKind::Private("bench".into()),
                                        ephemeral: false,
                                        durable: false,
                                    };
                                    let id = store.open_pool(&ident, &req).expect("pool");
                                    let pool = ident.pool(id).expect("pool");
                                    for i in 0..per {
                                        let k = Key::new(i % 1024, 0);
                                        store.put(&ident, &pool, k, value.clone());
                                        let _ = store.get(&ident, &pool, k);
                                    }
                                });
                            }
                        });
                        // Per PUT+GET pair across all threads.
                        t0.elapsed()
                            .mul_f64(1.0 / threads as f64)
                            .max(Duration::from_nanos(1))
                    })
                },
            );
        }
    }
    g.finish();
}

criterion_group!(benches, store_ops);
criterion_main!(benches);
