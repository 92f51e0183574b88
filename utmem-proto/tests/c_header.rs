//! `include/utmem_channel.h` against the Rust layout: a C program built against the
//! header prints every offset, size and constant, and each must equal the Rust one.

use std::collections::HashMap;
use std::process::Command;

use utmem_proto::channel::{self, cqe_off, off, sqe_off};
use utmem_proto::device::{self, ioctl};
use utmem_proto::{Op, Status};

const PROGRAM: &str = r#"
#include <stddef.h>
#include <stdio.h>
#include "utmem_channel.h"
#define F(s, f) printf(#s "." #f " %zu\n", offsetof(struct s, f))
#define C(c) printf(#c " %llu\n", (unsigned long long)(c))
int main(void) {
	F(utmem_channel_header, magic); F(utmem_channel_header, version);
	F(utmem_channel_header, features); F(utmem_channel_header, sq_entries);
	F(utmem_channel_header, cq_entries); F(utmem_channel_header, sq_off);
	F(utmem_channel_header, cq_off); F(utmem_channel_header, staging_off);
	F(utmem_channel_header, staging_len); F(utmem_channel_header, region_len);
	F(utmem_channel_header, sq_tail); F(utmem_channel_header, sq_head);
	F(utmem_channel_header, cq_tail); F(utmem_channel_header, cq_head);
	F(utmem_channel_header, host_flags); F(utmem_channel_header, client_flags);
	F(utmem_sqe, op); F(utmem_sqe, flags); F(utmem_sqe, reserved); F(utmem_sqe, pool);
	F(utmem_sqe, id); F(utmem_sqe, oid); F(utmem_sqe, index); F(utmem_sqe, dst_index);
	F(utmem_sqe, offset); F(utmem_sqe, len); F(utmem_sqe, total); F(utmem_sqe, dst_oid);
	F(utmem_cqe, id); F(utmem_cqe, op); F(utmem_cqe, status); F(utmem_cqe, arg0);
	F(utmem_cqe, arg1);
	printf("sizeof.sqe %zu\nsizeof.cqe %zu\n", sizeof(struct utmem_sqe), sizeof(struct utmem_cqe));
	C(UTMEM_CHANNEL_MAGIC); C(UTMEM_CHANNEL_VERSION); C(UTMEM_CHANNEL_HEADER_LEN);
	C(UTMEM_FEAT_CHUNKS); C(UTMEM_FEAT_NEED_WAKEUP); C(UTMEM_HOST_NEED_WAKEUP);
	C(UTMEM_HOST_DEAD); C(UTMEM_CLIENT_NEED_WAKEUP); C(UTMEM_SQE_MORE);
	C(UTMEM_OP_PUT); C(UTMEM_OP_GET); C(UTMEM_OP_FLUSH); C(UTMEM_OP_FLUSH_OBJECT);
	C(UTMEM_OP_COPY); C(UTMEM_OP_PING);
	C(UTMEM_STATUS_OK); C(UTMEM_STATUS_MISS); C(UTMEM_STATUS_NO_SPACE);
	C(UTMEM_STATUS_TOO_LARGE); C(UTMEM_STATUS_BAD_REQUEST); C(UTMEM_STATUS_UNKNOWN_POOL);
	return 0;
}
"#;

fn c_values(program: &str) -> HashMap<String, u64> {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("layout.c");
    let bin = dir.path().join("layout");
    std::fs::write(&src, program).unwrap();
    let include = concat!(env!("CARGO_MANIFEST_DIR"), "/../include");
    let cc = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Werror", "-I", include, "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .expect("a C compiler (cc) to check the header with");
    assert!(
        cc.status.success(),
        "{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let out = Command::new(&bin).output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap();
            (k.to_owned(), v.parse().unwrap())
        })
        .collect()
}

#[test]
fn the_c_header_matches_the_rust_layout() {
    let c = c_values(PROGRAM);
    let want: Vec<(&str, u64)> = vec![
        ("utmem_channel_header.magic", off::MAGIC as u64),
        ("utmem_channel_header.version", off::VERSION as u64),
        ("utmem_channel_header.features", off::FEATURES as u64),
        ("utmem_channel_header.sq_entries", off::SQ_ENTRIES as u64),
        ("utmem_channel_header.cq_entries", off::CQ_ENTRIES as u64),
        ("utmem_channel_header.sq_off", off::SQ_OFF as u64),
        ("utmem_channel_header.cq_off", off::CQ_OFF as u64),
        ("utmem_channel_header.staging_off", off::STAGING_OFF as u64),
        ("utmem_channel_header.staging_len", off::STAGING_LEN as u64),
        ("utmem_channel_header.region_len", off::REGION_LEN as u64),
        ("utmem_channel_header.sq_tail", off::SQ_TAIL as u64),
        ("utmem_channel_header.sq_head", off::SQ_HEAD as u64),
        ("utmem_channel_header.cq_tail", off::CQ_TAIL as u64),
        ("utmem_channel_header.cq_head", off::CQ_HEAD as u64),
        ("utmem_channel_header.host_flags", off::HOST_FLAGS as u64),
        (
            "utmem_channel_header.client_flags",
            off::CLIENT_FLAGS as u64,
        ),
        ("utmem_sqe.op", sqe_off::OP as u64),
        ("utmem_sqe.flags", sqe_off::FLAGS as u64),
        ("utmem_sqe.reserved", sqe_off::RESERVED as u64),
        ("utmem_sqe.pool", sqe_off::POOL as u64),
        ("utmem_sqe.id", sqe_off::ID as u64),
        ("utmem_sqe.oid", sqe_off::OID as u64),
        ("utmem_sqe.index", sqe_off::INDEX as u64),
        ("utmem_sqe.dst_index", sqe_off::DST_INDEX as u64),
        ("utmem_sqe.offset", sqe_off::OFFSET as u64),
        ("utmem_sqe.len", sqe_off::LEN as u64),
        ("utmem_sqe.total", sqe_off::TOTAL as u64),
        ("utmem_sqe.dst_oid", sqe_off::DST_OID as u64),
        ("utmem_cqe.id", cqe_off::ID as u64),
        ("utmem_cqe.op", cqe_off::OP as u64),
        ("utmem_cqe.status", cqe_off::STATUS as u64),
        ("utmem_cqe.arg0", cqe_off::ARG0 as u64),
        ("utmem_cqe.arg1", cqe_off::ARG1 as u64),
        ("sizeof.sqe", channel::SQE_LEN as u64),
        ("sizeof.cqe", channel::CQE_LEN as u64),
        ("UTMEM_CHANNEL_MAGIC", u64::from(channel::CHANNEL_MAGIC)),
        ("UTMEM_CHANNEL_VERSION", u64::from(channel::CHANNEL_VERSION)),
        ("UTMEM_CHANNEL_HEADER_LEN", channel::CHANNEL_HEADER_LEN),
        ("UTMEM_FEAT_CHUNKS", channel::FEAT_CHUNKS),
        ("UTMEM_FEAT_NEED_WAKEUP", channel::FEAT_NEED_WAKEUP),
        (
            "UTMEM_HOST_NEED_WAKEUP",
            u64::from(channel::HOST_NEED_WAKEUP),
        ),
        ("UTMEM_HOST_DEAD", u64::from(channel::HOST_DEAD)),
        (
            "UTMEM_CLIENT_NEED_WAKEUP",
            u64::from(channel::CLIENT_NEED_WAKEUP),
        ),
        ("UTMEM_SQE_MORE", u64::from(channel::SQE_MORE)),
        ("UTMEM_OP_PUT", Op::Put as u64),
        ("UTMEM_OP_GET", Op::Get as u64),
        ("UTMEM_OP_FLUSH", Op::Flush as u64),
        ("UTMEM_OP_FLUSH_OBJECT", Op::FlushObject as u64),
        ("UTMEM_OP_COPY", Op::Copy as u64),
        ("UTMEM_OP_PING", Op::Ping as u64),
        ("UTMEM_STATUS_OK", Status::Ok as u64),
        ("UTMEM_STATUS_MISS", Status::Miss as u64),
        ("UTMEM_STATUS_NO_SPACE", Status::NoSpace as u64),
        ("UTMEM_STATUS_TOO_LARGE", Status::TooLarge as u64),
        ("UTMEM_STATUS_BAD_REQUEST", Status::BadRequest as u64),
        ("UTMEM_STATUS_UNKNOWN_POOL", Status::UnknownPool as u64),
    ];
    for (name, v) in &want {
        assert_eq!(c.get(*name), Some(v), "{name} in include/utmem_channel.h");
    }
    assert_eq!(
        c.len(),
        want.len(),
        "every line of the C program is checked"
    );
}

const DEVICE_PROGRAM: &str = r#"
#include <stddef.h>
#include <stdio.h>
#include "utmem_device.h"
#define F(s, f) printf(#s "." #f " %zu\n", offsetof(struct s, f))
#define C(c) printf(#c " %llu\n", (unsigned long long)(c))
int main(void) {
	F(utmem_device_header, magic); F(utmem_device_header, version);
	F(utmem_device_header, region_len); F(utmem_device_header, slots);
	F(utmem_device_header, slot_off); F(utmem_device_header, slot_stride);
	F(utmem_device_header, word_off); F(utmem_device_header, chan_off);
	F(utmem_device_header, chan_len); F(utmem_device_header, arena_off);
	F(utmem_device_header, instance); F(utmem_device_header, state);
	F(utmem_dev_info, region_len); F(utmem_dev_info, events); F(utmem_dev_info, version);
	F(utmem_dev_info, peer_id); F(utmem_dev_info, slots); F(utmem_dev_info, state);
	F(utmem_dev_wait, seen); F(utmem_dev_wait, timeout_ms); F(utmem_dev_wait, reserved);
	printf("sizeof.info %zu\nsizeof.wait %zu\n", sizeof(struct utmem_dev_info), sizeof(struct utmem_dev_wait));
	C(UTMEM_DEVICE_MAGIC); C(UTMEM_DEVICE_VERSION); C(UTMEM_DEVICE_HEADER_LEN);
	C(UTMEM_DEVICE_MAX_SLOTS); C(UTMEM_DEVICE_STATE_NONE); C(UTMEM_DEVICE_STATE_SERVING);
	C(UTMEM_DEVICE_STATE_GONE); C(UTMEM_PCI_VENDOR); C(UTMEM_PCI_DEVICE);
	C(UTMEM_REG_INTR_MASK); C(UTMEM_REG_INTR_STATUS); C(UTMEM_REG_IV_POSITION);
	C(UTMEM_REG_DOORBELL); C(UTMEM_HOST_PEER);
	C(UTMEM_IOC_INFO); C(UTMEM_IOC_KICK); C(UTMEM_IOC_WAIT); C(UTMEM_IOC_CLAIM);
	return 0;
}
"#;

#[test]
fn the_device_header_matches_the_rust_abi() {
    use device::off as d;
    let c = c_values(DEVICE_PROGRAM);
    let want: Vec<(&str, u64)> = vec![
        ("utmem_device_header.magic", d::MAGIC as u64),
        ("utmem_device_header.version", d::VERSION as u64),
        ("utmem_device_header.region_len", d::REGION_LEN as u64),
        ("utmem_device_header.slots", d::SLOTS as u64),
        ("utmem_device_header.slot_off", d::SLOT_OFF as u64),
        ("utmem_device_header.slot_stride", d::SLOT_STRIDE as u64),
        ("utmem_device_header.word_off", d::WORD_OFF as u64),
        ("utmem_device_header.chan_off", d::CHAN_OFF as u64),
        ("utmem_device_header.chan_len", d::CHAN_LEN as u64),
        ("utmem_device_header.arena_off", d::ARENA_OFF as u64),
        ("utmem_device_header.instance", d::INSTANCE as u64),
        ("utmem_device_header.state", d::STATE as u64),
        ("utmem_dev_info.region_len", 0),
        ("utmem_dev_info.events", 8),
        ("utmem_dev_info.version", 16),
        ("utmem_dev_info.peer_id", 20),
        ("utmem_dev_info.slots", 24),
        ("utmem_dev_info.state", 28),
        ("utmem_dev_wait.seen", 0),
        ("utmem_dev_wait.timeout_ms", 8),
        ("utmem_dev_wait.reserved", 12),
        ("sizeof.info", u64::from(ioctl::INFO_LEN)),
        ("sizeof.wait", u64::from(ioctl::WAIT_LEN)),
        ("UTMEM_DEVICE_MAGIC", u64::from(device::DEVICE_MAGIC)),
        ("UTMEM_DEVICE_VERSION", u64::from(device::DEVICE_VERSION)),
        ("UTMEM_DEVICE_HEADER_LEN", device::HEADER_LEN),
        ("UTMEM_DEVICE_MAX_SLOTS", u64::from(device::MAX_SLOTS)),
        ("UTMEM_DEVICE_STATE_NONE", u64::from(device::STATE_NONE)),
        (
            "UTMEM_DEVICE_STATE_SERVING",
            u64::from(device::STATE_SERVING),
        ),
        ("UTMEM_DEVICE_STATE_GONE", u64::from(device::STATE_GONE)),
        ("UTMEM_PCI_VENDOR", u64::from(device::PCI_VENDOR)),
        ("UTMEM_PCI_DEVICE", u64::from(device::PCI_DEVICE)),
        ("UTMEM_REG_INTR_MASK", u64::from(device::REG_INTR_MASK)),
        ("UTMEM_REG_INTR_STATUS", u64::from(device::REG_INTR_STATUS)),
        ("UTMEM_REG_IV_POSITION", u64::from(device::REG_IV_POSITION)),
        ("UTMEM_REG_DOORBELL", u64::from(device::REG_DOORBELL)),
        ("UTMEM_HOST_PEER", u64::from(device::HOST_PEER)),
        ("UTMEM_IOC_INFO", u64::from(ioctl::INFO)),
        ("UTMEM_IOC_KICK", u64::from(ioctl::KICK)),
        ("UTMEM_IOC_WAIT", u64::from(ioctl::WAIT)),
        ("UTMEM_IOC_CLAIM", u64::from(ioctl::CLAIM)),
    ];
    for (name, v) in &want {
        assert_eq!(c.get(*name), Some(v), "{name} in include/utmem_device.h");
    }
    assert_eq!(
        c.len(),
        want.len(),
        "every line of the C program is checked"
    );
    assert_eq!(std::mem::size_of::<ioctl::Info>(), ioctl::INFO_LEN as usize);
    assert_eq!(std::mem::size_of::<ioctl::Wait>(), ioctl::WAIT_LEN as usize);
}
