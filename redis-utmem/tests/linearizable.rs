//! 16 concurrent clients × 5,000 random UTMEM.SET/UTMEM.GET on 32 shared keys,
//! checked against a register model: no read returns a value older than the last
//! write acknowledged before the read began, nor one written after it ended.

#![allow(clippy::cast_possible_truncation)] // test data patterns

use std::collections::HashMap;
use std::thread;
use std::time::Instant;

use utmem_testkit::{pattern, Daemon, Redis};

const CLIENTS: u64 = 16;
const OPS: u64 = 5000;
const KEYS: u64 = 32;

#[derive(Debug, Clone, Copy)]
struct Op {
    key: u64,
    write: bool,
    /// The written value's id, or the id a read returned (0: nil).
    id: u64,
    start: Instant,
    end: Instant,
}

/// Values are large or small (both paths), and say which write they are.
fn value(id: u64) -> Vec<u8> {
    let len = if id.is_multiple_of(3) {
        100
    } else {
        3000 + (id % 5000) as usize
    };
    let mut v = id.to_le_bytes().to_vec();
    v.extend(pattern(id, len));
    v
}

fn id_of(v: &[u8]) -> u64 {
    let id = u64::from_le_bytes(v[..8].try_into().expect("8 bytes"));
    assert_eq!(v, &value(id)[..], "a read returned bytes no write wrote");
    id
}

#[test]
fn every_read_is_linearizable() {
    let d = Daemon::start(&[]);
    let r = Redis::start(&["transport", &d.spec(), "threshold", "1024"], &[]);
    let workers: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let mut c = r.conn();
            thread::spawn(move || {
                let mut ops = Vec::with_capacity(OPS as usize);
                let mut x = client * 7919 + 1;
                for n in 0..OPS {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let key = x % KEYS;
                    let write = (x >> 8) % 2 == 0;
                    let start = Instant::now();
                    let id = if write {
                        let id = (client + 1) * 1_000_000 + n + 1;
                        let _: () = redis::cmd("UTMEM.SET")
                            .arg(format!("r{key}"))
                            .arg(value(id))
                            .query(&mut c)
                            .expect("set");
                        id
                    } else {
                        let v: Option<Vec<u8>> = redis::cmd("UTMEM.GET")
                            .arg(format!("r{key}"))
                            .query(&mut c)
                            .expect("get");
                        v.map_or(0, |v| id_of(&v))
                    };
                    ops.push(Op {
                        key,
                        write,
                        id,
                        start,
                        end: Instant::now(),
                    });
                }
                ops
            })
        })
        .collect();
    let ops: Vec<Op> = workers
        .into_iter()
        .flat_map(|w| w.join().expect("client"))
        .collect();
    let mut checked = 0;
    for key in 0..KEYS {
        let mut writes: Vec<&Op> = ops.iter().filter(|o| o.key == key && o.write).collect();
        writes.sort_by_key(|w| w.end);
        let by_id: HashMap<u64, &Op> = writes.iter().map(|w| (w.id, *w)).collect();
        // prefix_max_start[i] = latest start among the i+1 earliest-ending writes.
        let mut prefix_max_start = Vec::with_capacity(writes.len());
        let mut m: Option<Instant> = None;
        for w in &writes {
            m = Some(m.map_or(w.start, |x| x.max(w.start)));
            prefix_max_start.push(m.expect("set"));
        }
        for r in ops.iter().filter(|o| o.key == key && !o.write) {
            // Writes that finished before the read began.
            let done_before = writes.partition_point(|w| w.end < r.start);
            if r.id == 0 {
                assert_eq!(done_before, 0, "key {key}: nil after an acknowledged write");
                continue;
            }
            let w = by_id.get(&r.id).expect("read a value some write wrote");
            assert!(
                w.start < r.end,
                "key {key}: read a value written after the read ended"
            );
            // Stale: a whole later write fits between this write and the read.
            if done_before > 0 {
                assert!(
                    prefix_max_start[done_before - 1] <= w.end,
                    "key {key}: read {} although a later write had been acknowledged",
                    r.id
                );
            }
            checked += 1;
        }
    }
    eprintln!("{} operations, {checked} non-nil reads checked", ops.len());
    assert!(checked > 10_000);
}
