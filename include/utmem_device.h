/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * utmem guest device (/dev/utmem): the region layout behind BAR2 of an
 * ivshmem-doorbell device (1af4:1110) and the driver's ioctl ABI, version 1.
 *
 * This is utmem-proto's `device` module in C. utmem-proto/tests/c_header.rs
 * compiles a program against it and checks every offset and constant against
 * the Rust definitions. All integers in the region are little-endian.
 *
 * The region (one per VM identity, a power of two long):
 *   [0, 4096)                 struct utmem_device_header (written by the host)
 *   slot i at slot_off + i * slot_stride:
 *     [word_off, +4096)       the slot's reader word (the arena's reader protocol)
 *     [chan_off, +chan_len)   a channel (utmem_channel.h)
 *   [arena_off, region_len)   the identity's arena; placements are region offsets
 *
 * A process claims one slot (UTMEM_IOC_CLAIM) for as long as its file is open:
 * the slot's channel and reader word are then its own.
 */
#ifndef UTMEM_DEVICE_H
#define UTMEM_DEVICE_H

/* __u32/__u64 come from <linux/types.h> in user space too (defining them here
 * would clash with it: uint64_t is unsigned long, __u64 unsigned long long). */
#include <linux/types.h>
#ifdef __KERNEL__
#include <linux/ioctl.h>
#else
#include <sys/ioctl.h>
#endif

#define UTMEM_DEVICE_MAGIC 0x56445455u /* "UTDV" little-endian */
#define UTMEM_DEVICE_VERSION 1u
#define UTMEM_DEVICE_HEADER_LEN 4096u
/* The driver claims at most this many slots, whatever the header says. */
#define UTMEM_DEVICE_MAX_SLOTS 64u

/* Values of the header's state word. */
#define UTMEM_DEVICE_STATE_NONE 0u    /* not set up yet */
#define UTMEM_DEVICE_STATE_SERVING 1u /* a host serves the channels */
#define UTMEM_DEVICE_STATE_GONE 2u    /* the host let go of this VM */

/* PCI identity (QEMU's ivshmem-doorbell) and its BAR0 registers. */
#define UTMEM_PCI_VENDOR 0x1af4u
#define UTMEM_PCI_DEVICE 0x1110u
#define UTMEM_REG_INTR_MASK 0u
#define UTMEM_REG_INTR_STATUS 4u
#define UTMEM_REG_IV_POSITION 8u
#define UTMEM_REG_DOORBELL 12u
/* The host is ivshmem peer 0; a doorbell is (peer << 16) | vector. */
#define UTMEM_HOST_PEER 0u

struct utmem_device_header {
	__u32 magic;
	__u32 version;
	__u64 region_len;
	__u32 slots;
	__u32 reserved;
	__u64 slot_off;
	__u64 slot_stride;
	__u64 word_off;
	__u64 chan_off;
	__u64 chan_len;
	__u64 arena_off;
	__u64 instance; /* random per host region; the socket op DEVICE returns it */
	__u64 pad[6];
	__u32 state; /* offset 128, its own line */
};

/* UTMEM_IOC_INFO: what the driver knows. */
struct utmem_dev_info {
	__u64 region_len; /* BAR2 length */
	__u64 events;     /* interrupts from the host so far */
	__u32 version;    /* the header's layout version (0: no valid header) */
	__u32 peer_id;    /* this VM's ivshmem peer id (IVPosition) */
	__u32 slots;      /* channel slots the driver hands out */
	__u32 state;      /* the header's state word */
};

/* UTMEM_IOC_WAIT: sleep until the interrupt count differs from `seen`. */
struct utmem_dev_wait {
	__u64 seen;        /* in: the count last seen; out: the count now */
	__u32 timeout_ms;  /* 0: do not sleep */
	__u32 reserved;    /* must be 0 */
};

#define UTMEM_IOC_MAGIC 0xB5
#define UTMEM_IOC_INFO _IOR(UTMEM_IOC_MAGIC, 0, struct utmem_dev_info)
#define UTMEM_IOC_KICK _IO(UTMEM_IOC_MAGIC, 1)
#define UTMEM_IOC_WAIT _IOWR(UTMEM_IOC_MAGIC, 2, struct utmem_dev_wait)
#define UTMEM_IOC_CLAIM _IOR(UTMEM_IOC_MAGIC, 3, __u32)

#endif /* UTMEM_DEVICE_H */
