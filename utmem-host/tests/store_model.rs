//! The store against a reference model: random sequences of NEW_POOL, PUT, GET,
//! FLUSH, FLUSH_OBJECT, COPY and DESTROY_POOL over persistent and ephemeral
//! pools of two identities with small quotas and a small host capacity.
//!
//! The model is deliberately naive (vectors, linear scans) and spells out the
//! contract: persistent pools keep every acknowledged value and refuse what does
//! not fit, leaving the old value; ephemeral pools drop the old value, then
//! least-recently-used values of the same pool, then the identity's other
//! ephemeral pools (in pool-id order) are drained before a PUT is refused.

#![allow(clippy::cast_possible_truncation)] // test data patterns wrap on purpose

use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use utmem_host::{Policy, Store};
use utmem_proto::{Key, NewPool, ObjectId, PoolId, PoolKind, Status};

const IDENTS: [&str; 2] = ["vm-a", "vm-b"];
const POOLS: [(&str, bool); 3] = [("p", false), ("e", true), ("f", true)];
const QUOTA: u64 = 1000;
const CAPACITY: u64 = 1600;

#[derive(Debug, Clone)]
enum Op {
    Open(usize, usize),
    Destroy(usize, usize),
    Put(usize, usize, Key, usize, u8),
    Get(usize, usize, Key),
    Flush(usize, usize, Key),
    FlushObject(usize, usize, u64),
    Copy(usize, usize, Key, Key),
}

fn key() -> impl Strategy<Value = Key> {
    (0u64..4, 0u32..3).prop_map(|(o, i)| Key::new(o, i))
}

fn op() -> impl Strategy<Value = Op> {
    let ip = (0..IDENTS.len(), 0..POOLS.len());
    prop_oneof![
        1 => ip.clone().prop_map(|(i, p)| Op::Open(i, p)),
        1 => ip.clone().prop_map(|(i, p)| Op::Destroy(i, p)),
        8 => (ip.clone(), key(), 0usize..450, any::<u8>())
            .prop_map(|((i, p), k, l, s)| Op::Put(i, p, k, l, s)),
        6 => (ip.clone(), key()).prop_map(|((i, p), k)| Op::Get(i, p, k)),
        2 => (ip.clone(), key()).prop_map(|((i, p), k)| Op::Flush(i, p, k)),
        1 => (ip.clone(), 0u64..4).prop_map(|((i, p), o)| Op::FlushObject(i, p, o)),
        2 => (ip, key(), key()).prop_map(|((i, p), a, b)| Op::Copy(i, p, a, b)),
    ]
}

fn value(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
}

#[derive(Debug, Clone, Default)]
struct MPool {
    id: u32,
    /// Insertion/use order: least recently used first.
    values: Vec<(Key, Vec<u8>)>,
}

impl MPool {
    fn bytes(&self) -> u64 {
        self.values.iter().map(|(_, v)| v.len() as u64).sum()
    }
    fn find(&self, k: Key) -> Option<usize> {
        self.values.iter().position(|(x, _)| *x == k)
    }
}

#[derive(Debug, Default)]
struct Model {
    pools: [[Option<MPool>; 3]; 2],
    next_id: [u32; 2],
    hits: [u64; 2],
    misses: [u64; 2],
}

impl Model {
    fn used(&self, i: usize) -> u64 {
        self.pools[i].iter().flatten().map(MPool::bytes).sum()
    }
    fn host_used(&self) -> u64 {
        (0..2).map(|i| self.used(i)).sum()
    }
    fn fits(&self, i: usize, need: u64) -> bool {
        self.used(i) + need <= QUOTA && self.host_used() + need <= CAPACITY
    }
    /// Evict the least-recently-used value of pool p; false if it is empty.
    fn evict_one(&mut self, i: usize, p: usize) -> bool {
        let pool = self.pools[i][p].as_mut().expect("open");
        if pool.values.is_empty() {
            return false;
        }
        pool.values.remove(0);
        true
    }
    /// Other ephemeral pools of identity i, by pool id, until `need` fits.
    fn make_room(&mut self, i: usize, except: usize, need: u64) -> u64 {
        let mut order: Vec<(u32, usize)> = (0..3)
            .filter(|q| *q != except && POOLS[*q].1)
            .filter_map(|q| self.pools[i][q].as_ref().map(|mp| (mp.id, q)))
            .collect();
        order.sort();
        let before = self.used(i);
        for (_, q) in order {
            while !self.fits(i, need) && self.evict_one(i, q) {}
            if self.fits(i, need) {
                break;
            }
        }
        before - self.used(i)
    }
    fn put(&mut self, i: usize, p: usize, k: Key, v: Vec<u8>) -> Status {
        let eph = POOLS[p].1;
        let len = v.len() as u64;
        for attempt in 0..2 {
            let pool = self.pools[i][p].as_mut().expect("open");
            if eph {
                if let Some(at) = pool.find(k) {
                    pool.values.remove(at);
                }
            }
            let pool = self.pools[i][p].as_ref().expect("open");
            let old = pool.find(k).map(|at| pool.values[at].1.len() as u64);
            let need = len.saturating_sub(old.unwrap_or(0));
            let mut fits = self.fits(i, need);
            if !fits && eph {
                while self.evict_one(i, p) {
                    if self.fits(i, need) {
                        fits = true;
                        break;
                    }
                }
            }
            if fits {
                let pool = self.pools[i][p].as_mut().expect("open");
                match pool.find(k) {
                    Some(at) => {
                        // A persistent replace keeps its place in no LRU; keep order simple.
                        pool.values[at].1 = v;
                    }
                    None => pool.values.push((k, v)),
                }
                return Status::Ok;
            }
            if attempt == 1 || self.make_room(i, p, need) == 0 {
                break;
            }
        }
        Status::NoSpace
    }
    fn get(&mut self, i: usize, p: usize, k: Key) -> Option<Vec<u8>> {
        let pool = self.pools[i][p].as_mut().expect("open");
        let at = pool.find(k)?;
        let e = pool.values.remove(at);
        let v = e.1.clone();
        pool.values.push(e);
        Some(v)
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let store = Store::new(CAPACITY, 1 << 20, Policy::new(QUOTA));
    let idents: Vec<Arc<_>> = IDENTS.iter().map(|n| store.identity(n)).collect();
    let mut m = Model::default();
    let mut handles: [[Option<PoolId>; 3]; 2] = Default::default();
    for op in ops {
        match op {
            Op::Open(i, p) => {
                let (name, eph) = POOLS[p];
                let req = NewPool {
                    kind: PoolKind::Private(name.into()),
                    ephemeral: eph,
                    durable: false,
                };
                let id = store
                    .open_pool(&idents[i], &req)
                    .map_err(|s| TestCaseError::fail(format!("open failed: {s}")))?;
                if m.pools[i][p].is_none() {
                    m.next_id[i] += 1;
                    m.pools[i][p] = Some(MPool {
                        id: m.next_id[i],
                        values: vec![],
                    });
                }
                prop_assert_eq!(id.0, m.pools[i][p].as_ref().map(|x| x.id).unwrap_or(0));
                handles[i][p] = Some(id);
            }
            Op::Destroy(i, p) => {
                if let Some(id) = handles[i][p].take() {
                    store.destroy_pool(&idents[i], id);
                    store.destroy_pool(&idents[i], id); // idempotent
                    m.pools[i][p] = None;
                }
            }
            Op::Put(i, p, k, len, seed) => {
                let Some(id) = handles[i][p] else { continue };
                let pool = idents[i].pool(id).expect("open pool");
                let v = value(len, seed);
                let got = store.put(&idents[i], &pool, k, Bytes::from(v.clone()));
                prop_assert_eq!(got, m.put(i, p, k, v), "put {:?}", (i, p, k, len));
            }
            Op::Get(i, p, k) => {
                let Some(id) = handles[i][p] else { continue };
                let pool = idents[i].pool(id).expect("open pool");
                let got = store.get(&idents[i], &pool, k).ok().map(|b| b.to_vec());
                let want = m.get(i, p, k);
                if want.is_some() {
                    m.hits[i] += 1
                } else {
                    m.misses[i] += 1
                }
                prop_assert_eq!(got, want, "get {:?}", (i, p, k));
            }
            Op::Flush(i, p, k) => {
                let Some(id) = handles[i][p] else { continue };
                let pool = idents[i].pool(id).expect("open pool");
                prop_assert_eq!(store.flush(&pool, k), Status::Ok);
                prop_assert_eq!(store.flush(&pool, k), Status::Ok);
                let mp = m.pools[i][p].as_mut().expect("open");
                mp.values.retain(|(x, _)| *x != k);
            }
            Op::FlushObject(i, p, o) => {
                let Some(id) = handles[i][p] else { continue };
                let pool = idents[i].pool(id).expect("open pool");
                prop_assert_eq!(store.flush_object(&pool, ObjectId(o)), Status::Ok);
                let mp = m.pools[i][p].as_mut().expect("open");
                mp.values.retain(|(x, _)| x.oid.0 != o);
            }
            Op::Copy(i, p, a, b) => {
                let Some(id) = handles[i][p] else { continue };
                let pool = idents[i].pool(id).expect("open pool");
                let got = store.copy(&idents[i], &pool, a, b);
                let want = match m.get(i, p, a) {
                    Some(v) => m.put(i, p, b, v),
                    None => Status::Miss,
                };
                prop_assert_eq!(got, want, "copy {:?}", (i, p, a, b));
            }
        }
        // Exact accounting after every step.
        let snap = store.snapshot();
        let mut host = 0;
        for (i, name) in IDENTS.iter().enumerate() {
            let s = store.stats(&idents[i]);
            prop_assert_eq!(s.bytes, m.used(i), "bytes of {}", name);
            let nvals: usize = m.pools[i].iter().flatten().map(|p| p.values.len()).sum();
            prop_assert_eq!(s.values, nvals as u64);
            prop_assert!(s.bytes <= QUOTA);
            prop_assert_eq!((s.hits, s.misses), (m.hits[i], m.misses[i]));
            let si = snap
                .identities
                .iter()
                .find(|x| x.name == *name)
                .expect("listed");
            for (p, mp) in m.pools[i].iter().enumerate() {
                if let Some(mp) = mp {
                    let sp = si
                        .pools
                        .iter()
                        .find(|x| x.id == mp.id)
                        .expect("pool listed");
                    prop_assert_eq!(sp.name.as_str(), POOLS[p].0);
                    prop_assert_eq!((sp.values, sp.bytes), (mp.values.len() as u64, mp.bytes()));
                }
            }
            host += s.bytes;
        }
        prop_assert_eq!(store.used(), host);
        prop_assert!(host <= CAPACITY);
    }
    // Flushing everything leaves nothing behind.
    for (i, hs) in handles.iter().enumerate() {
        for id in hs.iter().flatten() {
            {
                let id = *id;
                let pool = idents[i].pool(id).expect("open pool");
                for o in 0..4 {
                    store.flush_object(&pool, ObjectId(o));
                }
            }
        }
        let s = store.stats(&idents[i]);
        prop_assert_eq!((s.values, s.bytes), (0, 0));
    }
    prop_assert_eq!(store.used(), 0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn store_matches_model(
        opens in prop::collection::vec((0..IDENTS.len(), 0..POOLS.len()), 6),
        ops in prop::collection::vec(op(), 1..120),
    ) {
        let mut all: Vec<Op> = opens.into_iter().map(|(i, p)| Op::Open(i, p)).collect();
        all.extend(ops);
        run(all)?;
    }
}
