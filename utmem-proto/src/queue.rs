//! A queue of outgoing frames for vectored writes: headers and small payloads
//! are appended into one growing buffer, large payloads are queued as shared
//! [`Bytes`] without copying, and the writer drains it with as many `IoSlice`s
//! as one writev takes. The queue does no I/O itself.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};

/// Payloads at least this long are queued by reference instead of copied.
pub const SHARE_AT_LEAST: usize = 1024;

/// Frames waiting to be written.
#[derive(Debug, Default)]
pub struct OutQueue {
    parts: VecDeque<Bytes>,
    tail: BytesMut,
    len: usize,
}

impl OutQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends bytes by copying them (headers, small payloads).
    pub fn push_copy(&mut self, b: &[u8]) {
        self.tail.extend_from_slice(b);
        self.len += b.len();
    }

    /// Appends a payload: copied when small, shared when large.
    pub fn push_payload(&mut self, b: Bytes) {
        if b.len() < SHARE_AT_LEAST {
            self.push_copy(&b);
            return;
        }
        self.seal();
        self.len += b.len();
        self.parts.push_back(b);
    }

    fn seal(&mut self) {
        if !self.tail.is_empty() {
            self.parts.push_back(self.tail.split().freeze());
        }
    }

    /// Hands up to `max` slices covering the front of the queue to `write` (one
    /// writev) and drops the bytes it reports written.
    pub fn write_with<E>(
        &mut self,
        max: usize,
        write: impl FnOnce(&[IoSlice<'_>]) -> Result<usize, E>,
    ) -> Result<usize, E> {
        self.seal();
        let iov: Vec<IoSlice<'_>> = self
            .parts
            .iter()
            .take(max)
            .map(|p| IoSlice::new(p))
            .collect();
        let n = write(&iov)?;
        drop(iov);
        self.advance(n);
        Ok(n)
    }

    /// Drops `n` written bytes from the front.
    fn advance(&mut self, mut n: usize) {
        self.len -= n.min(self.len);
        while n > 0 {
            let Some(front) = self.parts.front_mut() else {
                break;
            };
            if n < front.len() {
                front.advance(n);
                return;
            }
            n -= front.len();
            self.parts.pop_front();
        }
        if self.parts.is_empty() && self.len == 0 {
            // Reuse the tail's allocation once everything went out.
            self.tail.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(q: &mut OutQueue, chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while !q.is_empty() {
            q.write_with(3, |iov| {
                let mut take = chunk;
                for s in iov {
                    let n = s.len().min(take);
                    out.extend_from_slice(&s[..n]);
                    take -= n;
                }
                Ok::<_, ()>(chunk - take)
            })
            .unwrap();
        }
        out
    }

    #[test]
    fn order_is_kept_across_partial_writes() {
        for chunk in [1, 7, 100, 5000] {
            let mut q = OutQueue::new();
            let mut want = Vec::new();
            for i in 0..20u8 {
                let small = vec![i; 10];
                let big = vec![i; 2000 + usize::from(i)];
                q.push_copy(&small);
                q.push_payload(Bytes::from(big.clone()));
                want.extend(small);
                want.extend(big);
            }
            assert_eq!(q.len(), want.len());
            assert_eq!(drain(&mut q, chunk), want);
            assert!(q.is_empty());
        }
    }
}
