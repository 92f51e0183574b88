//! Durable pools against a model: random PUT/FLUSH/FLUSH_OBJECT/COPY/DESTROY_POOL on
//! two identities' durable pools, with compactions on every dead byte, and the store
//! reopened from its data directory at random points: after each reopen every key of
//! every pool holds exactly what the model says, and the accounting matches.

#![allow(clippy::cast_possible_truncation)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use utmem_host::{DurableOptions, FsyncPolicy, Identity, Policy, Pool, Store};
use utmem_proto::{Key, NewPool, ObjectId, PoolKind, Status};

const IDENTS: [&str; 2] = ["uid:1", "vm-a"];
const POOLS: [&str; 2] = ["p", "q"];

#[derive(Debug, Clone)]
enum Op {
    Put(usize, usize, Key, usize, u8),
    Flush(usize, usize, Key),
    FlushObject(usize, usize, u64),
    Copy(usize, usize, Key, Key),
    Destroy(usize, usize),
    Reopen,
}

fn key() -> impl Strategy<Value = Key> {
    (0u64..6, 0u32..3).prop_map(|(o, i)| Key::new(o, i))
}

fn op() -> impl Strategy<Value = Op> {
    let ip = (0usize..2, 0usize..2);
    prop_oneof![
        8 => (ip.clone(), key(), 0usize..3000, any::<u8>())
            .prop_map(|((i, p), k, len, b)| Op::Put(i, p, k, len, b)),
        2 => (ip.clone(), key()).prop_map(|((i, p), k)| Op::Flush(i, p, k)),
        1 => (ip.clone(), 0u64..6).prop_map(|((i, p), o)| Op::FlushObject(i, p, o)),
        1 => (ip.clone(), key(), key()).prop_map(|((i, p), a, b)| Op::Copy(i, p, a, b)),
        1 => ip.prop_map(|(i, p)| Op::Destroy(i, p)),
        1 => Just(Op::Reopen),
    ]
}

type Model = [[BTreeMap<Key, Vec<u8>>; 2]; 2];

fn open(dir: &std::path::Path) -> (Store, Vec<Arc<Identity>>) {
    let store = Store::new(1 << 30, 1 << 20, Policy::new(1 << 30));
    let mut opts = DurableOptions::new(dir, FsyncPolicy::Never);
    opts.compact_floor = 0;
    store.open_data_dir(opts).expect("open data dir");
    let idents = IDENTS.iter().map(|n| store.identity(n)).collect();
    (store, idents)
}

fn pool(store: &Store, ident: &Arc<Identity>, p: usize) -> Arc<Pool> {
    let req = NewPool {
        kind: PoolKind::Private(POOLS[p].into()),
        ephemeral: false,
        durable: true,
    };
    let id = store.open_pool(ident, &req).expect("open durable pool");
    ident.pool(id).expect("pool")
}

fn settle(store: &Store) {
    let t0 = Instant::now();
    while store.compacting() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "compaction never ends"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn check(store: &Store, idents: &[Arc<Identity>], m: &Model) -> Result<(), TestCaseError> {
    for (i, ident) in idents.iter().enumerate() {
        let mut bytes = 0;
        let mut values = 0;
        for (p, want) in m[i].iter().enumerate() {
            let pool = pool(store, ident, p);
            for o in 0..6 {
                for x in 0..3 {
                    let k = Key::new(o, x);
                    let got = store.get(ident, &pool, k).ok().map(|b| b.to_vec());
                    prop_assert_eq!(
                        got.as_ref(),
                        want.get(&k),
                        "{} {} {}",
                        IDENTS[i],
                        POOLS[p],
                        k
                    );
                }
            }
            bytes += want.values().map(|v| v.len() as u64).sum::<u64>();
            values += want.len() as u64;
        }
        prop_assert_eq!(ident.used(), bytes);
        prop_assert_eq!(store.stats(ident).values, values);
    }
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut store, mut idents) = open(dir.path());
    let mut m: Model = Default::default();
    for op in ops {
        match op {
            Op::Put(i, p, k, len, b) => {
                let v: Vec<u8> = (0..len).map(|j| b.wrapping_add(j as u8)).collect();
                let pl = pool(&store, &idents[i], p);
                prop_assert_eq!(
                    store.put(&idents[i], &pl, k, Bytes::from(v.clone())),
                    Status::Ok
                );
                m[i][p].insert(k, v);
            }
            Op::Flush(i, p, k) => {
                let pl = pool(&store, &idents[i], p);
                prop_assert_eq!(store.flush(&pl, k), Status::Ok);
                m[i][p].remove(&k);
            }
            Op::FlushObject(i, p, o) => {
                let pl = pool(&store, &idents[i], p);
                prop_assert_eq!(store.flush_object(&pl, ObjectId(o)), Status::Ok);
                m[i][p].retain(|k, _| k.oid.0 != o);
            }
            Op::Copy(i, p, a, b) => {
                let pl = pool(&store, &idents[i], p);
                let want = match m[i][p].get(&a).cloned() {
                    Some(v) => {
                        m[i][p].insert(b, v);
                        Status::Ok
                    }
                    None => Status::Miss,
                };
                prop_assert_eq!(store.copy(&idents[i], &pl, a, b), want);
            }
            Op::Destroy(i, p) => {
                let pl = pool(&store, &idents[i], p);
                let id = idents[i]
                    .open_pools()
                    .into_iter()
                    .find(|(_, x)| Arc::ptr_eq(x, &pl))
                    .map(|(id, _)| id)
                    .expect("id");
                store.destroy_pool(&idents[i], id);
                m[i][p].clear();
            }
            Op::Reopen => {
                settle(&store);
                drop(idents);
                drop(store);
                (store, idents) = open(dir.path());
                check(&store, &idents, &m)?;
            }
        }
    }
    settle(&store);
    drop(idents);
    drop(store);
    let (store, idents) = open(dir.path());
    check(&store, &idents, &m)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn durable_pools_match_the_model_across_reopens(ops in prop::collection::vec(op(), 1..120)) {
        run(ops)?;
    }
}
