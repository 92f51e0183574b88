/* SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0) */
/*
 * utmem shared-memory channel layout, version 1.
 *
 * This is utmem-proto's `channel` module in C, for the guest driver and for
 * other VMMs. utmem-proto/tests/c_header.rs compiles a program against it and
 * checks every offset and constant against the Rust definitions. The rules
 * (ordering, notification suppression, chunked PUTs) are in the Rust module's
 * documentation; all integers are little-endian.
 */
#ifndef UTMEM_CHANNEL_H
#define UTMEM_CHANNEL_H

#ifdef __KERNEL__
#include <linux/types.h>
typedef __u8 utmem_u8;
typedef __u16 utmem_u16;
typedef __u32 utmem_u32;
typedef __u64 utmem_u64;
#else
#include <stdint.h>
typedef uint8_t utmem_u8;
typedef uint16_t utmem_u16;
typedef uint32_t utmem_u32;
typedef uint64_t utmem_u64;
#endif

#define UTMEM_CHANNEL_MAGIC 0x48435455u /* "UTCH" little-endian */
#define UTMEM_CHANNEL_VERSION 1u
#define UTMEM_CHANNEL_HEADER_LEN 4096u

#define UTMEM_FEAT_CHUNKS (1ull << 0)
#define UTMEM_FEAT_NEED_WAKEUP (1ull << 1)

#define UTMEM_HOST_NEED_WAKEUP (1u << 0)
#define UTMEM_HOST_DEAD (1u << 1)
#define UTMEM_CLIENT_NEED_WAKEUP (1u << 0)

#define UTMEM_SQE_MORE (1u << 0)

/* Ops carried by a channel (the socket protocol's numbers). */
#define UTMEM_OP_PUT 4u
#define UTMEM_OP_GET 5u
#define UTMEM_OP_FLUSH 6u
#define UTMEM_OP_FLUSH_OBJECT 7u
#define UTMEM_OP_COPY 8u
#define UTMEM_OP_PING 10u

/* Statuses. */
#define UTMEM_STATUS_OK 0u
#define UTMEM_STATUS_MISS 1u
#define UTMEM_STATUS_NO_SPACE 2u
#define UTMEM_STATUS_TOO_LARGE 3u
#define UTMEM_STATUS_BAD_REQUEST 4u
#define UTMEM_STATUS_UNKNOWN_POOL 5u

/* The region's first page. Each index word sits in its own 64-byte line. */
struct utmem_channel_header {
	utmem_u32 magic;
	utmem_u32 version;
	utmem_u64 features;
	utmem_u32 sq_entries;
	utmem_u32 cq_entries;
	utmem_u64 sq_off;
	utmem_u64 cq_off;
	utmem_u64 staging_off;
	utmem_u64 staging_len;
	utmem_u64 region_len;
	utmem_u8 pad0[64];
	utmem_u32 sq_tail; /* client */
	utmem_u8 pad1[60];
	utmem_u32 sq_head; /* host */
	utmem_u8 pad2[60];
	utmem_u32 cq_tail; /* host */
	utmem_u8 pad3[60];
	utmem_u32 cq_head; /* client */
	utmem_u8 pad4[60];
	utmem_u32 host_flags;
	utmem_u8 pad5[60];
	utmem_u32 client_flags;
	utmem_u8 pad6[60];
};

/* A submission descriptor (64 bytes). */
struct utmem_sqe {
	utmem_u8 op;
	utmem_u8 flags;
	utmem_u16 reserved; /* zero */
	utmem_u32 pool;
	utmem_u64 id;
	utmem_u64 oid;
	utmem_u32 index;
	utmem_u32 dst_index; /* COPY */
	utmem_u64 offset;    /* in staging */
	utmem_u64 len;
	utmem_u64 total;     /* PUT: the whole value's length */
	utmem_u64 dst_oid;   /* COPY */
};

/* A completion (32 bytes). */
struct utmem_cqe {
	utmem_u64 id;
	utmem_u8 op;
	utmem_u8 status;
	utmem_u8 reserved[6];
	utmem_u64 arg0; /* PUT: placement offset; GET: value length */
	utmem_u64 arg1; /* PUT: placement stamp, 0 if not in the arena */
};

#if defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
_Static_assert(sizeof(struct utmem_sqe) == 64, "utmem_sqe is 64 bytes");
_Static_assert(sizeof(struct utmem_cqe) == 32, "utmem_cqe is 32 bytes");
_Static_assert(sizeof(struct utmem_channel_header) == 512, "header fields take 512 bytes");
#endif

#endif /* UTMEM_CHANNEL_H */
