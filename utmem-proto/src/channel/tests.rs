use std::sync::Arc;

use proptest::prelude::*;

use super::*;

fn region(geo: Geometry) -> ChannelMem {
    let f = tempfile::tempfile().expect("a temporary file");
    f.set_len(geo.region_len()).expect("sized");
    let m = ChannelMem::map(f, geo).expect("mapped");
    m.init_header();
    m
}

const SMALL: Geometry = Geometry {
    sq_entries: 8,
    cq_entries: 8,
    staging_len: 4096,
};

#[test]
fn layout_offsets_and_sizes() {
    assert_eq!(off::SQ_TAIL % 64, 0);
    for w in [
        off::SQ_HEAD,
        off::CQ_TAIL,
        off::CQ_HEAD,
        off::HOST_FLAGS,
        off::CLIENT_FLAGS,
    ] {
        assert_eq!(w % 64, 0, "each index word has its own cache line");
    }
    assert_eq!(off::CLIENT_FLAGS + 64, 512);
    assert_eq!(sqe_off::DST_OID + 8, SQE_LEN);
    assert_eq!(cqe_off::ARG1 + 8, CQE_LEN);
    let g = Geometry {
        sq_entries: 1024,
        cq_entries: 1024,
        staging_len: 16 << 20,
    };
    assert_eq!(g.sq_off(), 4096);
    assert_eq!(g.cq_off(), 4096 + 1024 * 64);
    assert_eq!(g.staging_off(), 4096 + 1024 * 64 + 1024 * 32);
    assert_eq!(g.staging_off() % 4096, 0);
    assert_eq!(g.region_len(), g.staging_off() + (16 << 20));
}

#[test]
fn descriptors_round_trip_at_their_offsets() {
    let s = Sqe {
        op: Op::Copy as u8,
        flags: SQE_MORE,
        reserved: 0,
        pool: PoolId(0x0102_0304),
        id: RequestId(0x1112_1314_1516_1718),
        key: Key::new(0x2122_2324_2526_2728, 0x3132_3334),
        dst: Key::new(0x4142_4344_4546_4748, 0x5152_5354),
        offset: 0x6162_6364_6566_6768,
        len: 0x7172_7374_7576_7778,
        total: 0x8182_8384_8586_8788,
    };
    let b = s.encode();
    assert_eq!(b[sqe_off::OP], 8);
    assert_eq!(b[sqe_off::FLAGS], SQE_MORE);
    assert_eq!(b[sqe_off::POOL], 0x04);
    assert_eq!(b[sqe_off::ID], 0x18);
    assert_eq!(b[sqe_off::OID], 0x28);
    assert_eq!(b[sqe_off::INDEX], 0x34);
    assert_eq!(b[sqe_off::DST_INDEX], 0x54);
    assert_eq!(b[sqe_off::OFFSET], 0x68);
    assert_eq!(b[sqe_off::LEN], 0x78);
    assert_eq!(b[sqe_off::TOTAL], 0x88);
    assert_eq!(b[sqe_off::DST_OID], 0x48);
    assert_eq!(Sqe::decode(&b), s);
    assert_eq!(s.op(), Some(Op::Copy));
    let c = Cqe {
        id: RequestId(7),
        op: Op::Put as u8,
        status: Status::NoSpace,
        arg0: 64,
        arg1: 99,
    };
    let b = c.encode();
    assert_eq!(b[cqe_off::STATUS], Status::NoSpace as u8);
    assert_eq!(b[cqe_off::ARG1], 99);
    assert_eq!(Cqe::decode(&b), Some(c));
}

#[test]
fn control_ops_and_stray_bits_are_not_channel_ops() {
    for op in [
        Op::Hello,
        Op::NewPool,
        Op::DestroyPool,
        Op::Stats,
        Op::Map,
        Op::Channel,
        Op::Device,
    ] {
        let s = Sqe {
            op: op as u8,
            ..Sqe::default()
        };
        assert_eq!(s.op(), None, "{op:?}");
    }
    let put = Sqe {
        op: Op::Put as u8,
        ..Sqe::default()
    };
    assert_eq!(put.op(), Some(Op::Put));
    assert_eq!(Sqe { reserved: 1, ..put }.op(), None);
    assert_eq!(Sqe { flags: 2, ..put }.op(), None);
    assert_eq!(Sqe { op: 200, ..put }.op(), None);
}

#[test]
fn a_header_is_read_back_and_checked() {
    let f = tempfile::tempfile().unwrap();
    f.set_len(SMALL.region_len()).unwrap();
    let m = ChannelMem::map(f.try_clone().unwrap(), SMALL).unwrap();
    m.init_header();
    assert_eq!(ChannelMem::read_geometry(&f), Ok(SMALL));
    // A header that lies about its offsets is refused.
    std::os::unix::fs::FileExt::write_all_at(&f, &77u64.to_le_bytes(), off::CQ_OFF as u64).unwrap();
    assert!(ChannelMem::read_geometry(&f).is_err());
    std::os::unix::fs::FileExt::write_all_at(&f, &3u32.to_le_bytes(), off::SQ_ENTRIES as u64)
        .unwrap();
    assert!(ChannelMem::read_geometry(&f).is_err());
}

#[test]
fn indices_running_ahead_are_corruption() {
    let m = region(SMALL);
    let c = m.sq_consumer();
    m.word(off::SQ_TAIL).store(9, Ordering::Relaxed);
    assert_eq!(c.ready(), Err(RingCorrupt(9)));
    m.word(off::SQ_TAIL).store(8, Ordering::Relaxed);
    assert_eq!(c.ready(), Ok(8));
    let p = m.cq_producer().at(3);
    m.word(off::CQ_HEAD).store(5, Ordering::Relaxed);
    assert!(p.room().is_err(), "a head past our tail");
}

#[test]
fn notification_flags_kick_once() {
    let m = region(SMALL);
    let w = m.host_flags();
    assert!(!wants_kick(w, HOST_NEED_WAKEUP));
    arm(w, HOST_NEED_WAKEUP);
    assert!(wants_kick(w, HOST_NEED_WAKEUP));
    assert!(!wants_kick(w, HOST_NEED_WAKEUP), "the flag is consumed");
}

#[derive(Debug, Clone)]
enum Step {
    Push(u8),
    Publish,
    Pop(u8),
    Release,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (1u8..10).prop_map(Step::Push),
        Just(Step::Publish),
        (1u8..10).prop_map(Step::Pop),
        Just(Step::Release),
    ]
}

proptest! {
    /// Any interleaving of producer and consumer steps, against a model: the consumer
    /// sees exactly the published entries, in order, and the producer never gets room
    /// that the consumer has not released.
    #[test]
    fn ring_matches_its_model(start in any::<u32>(), steps in prop::collection::vec(step(), 1..200)) {
        let m = region(SMALL);
        // Any starting index: the wrap at 2^32 must not matter.
        m.word(off::SQ_TAIL).store(start, Ordering::Relaxed);
        m.word(off::SQ_HEAD).store(start, Ordering::Relaxed);
        let mut p = m.sq_producer().at(start);
        let mut c = m.sq_consumer().at(start);
        let (mut written, mut published, mut taken, mut released) = (0u64, 0u64, 0u64, 0u64);
        for s in steps {
            match s {
                Step::Push(n) => for _ in 0..n {
                    let room = p.room().unwrap();
                    prop_assert_eq!(u64::from(room), 8 - (written - released));
                    if room == 0 { break; }
                    let mut e = [0u8; SQE_LEN];
                    e[..8].copy_from_slice(&written.to_le_bytes());
                    p.push(&e);
                    written += 1;
                },
                Step::Publish => { p.publish(); published = written; }
                Step::Pop(n) => for _ in 0..n {
                    let ready = c.ready().unwrap();
                    prop_assert_eq!(u64::from(ready), published - taken);
                    if ready == 0 { break; }
                    let e = c.pop();
                    prop_assert_eq!(u64::from_le_bytes(e[..8].try_into().unwrap()), taken);
                    taken += 1;
                },
                Step::Release => { c.release(); released = taken; }
            }
        }
    }
}

#[test]
fn ring_across_threads_keeps_order() {
    let m = Arc::new(region(Geometry {
        sq_entries: 64,
        cq_entries: 64,
        staging_len: 4096,
    }));
    const N: u64 = 200_000;
    let m2 = Arc::clone(&m);
    let producer = std::thread::spawn(move || {
        let mut p = m2.sq_producer();
        let mut i = 0u64;
        while i < N {
            let room = p.room().unwrap();
            for _ in 0..room.min(7) {
                let mut e = [0u8; SQE_LEN];
                e[..8].copy_from_slice(&i.to_le_bytes());
                e[56..].copy_from_slice(&(!i).to_le_bytes());
                p.push(&e);
                i += 1;
                if i == N {
                    break;
                }
            }
            p.publish();
            std::hint::spin_loop();
        }
    });
    let mut c = m.sq_consumer();
    let mut want = 0u64;
    while want < N {
        let n = c.ready().unwrap();
        for _ in 0..n {
            let e = c.pop();
            assert_eq!(u64::from_le_bytes(e[..8].try_into().unwrap()), want);
            assert_eq!(u64::from_le_bytes(e[56..].try_into().unwrap()), !want);
            want += 1;
        }
        c.release();
        std::hint::spin_loop();
    }
    producer.join().unwrap();
}
