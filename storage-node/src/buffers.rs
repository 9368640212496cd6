//! Reused shard-sized buffers.
//!
//! A fresh multi-MiB `Vec` is a fresh `mmap`: every page faults in and is
//! zeroed by the kernel, then zeroed again or overwritten by us. Measured with
//! `cargo bench -p gateway --bench kernels`, allocating the six 1 MiB shards of
//! an RS(4,2) stripe cost more than the coding and hashing together. The
//! gateway's ingest and the node's shard receive path therefore take buffers
//! from a small pool and give them back when done.
//!
//! A pool holds at most `max_bytes` of idle capacity, so memory stays bounded
//! however much flows through and whatever mix of sizes it sees (stripes and
//! shards, small and large codes). `take` prefers an idle buffer that already
//! fits, so a small request does not grow or pin a large buffer needlessly.

use std::sync::{Arc, Mutex};

pub struct BufferPool {
    free: Mutex<Free>,
    max_bytes: usize,
}

#[derive(Default)]
struct Free {
    buffers: Vec<Vec<u8>>,
    bytes: usize,
}

impl BufferPool {
    /// A pool that keeps at most `max_bytes` of idle buffer capacity.
    pub fn new(max_bytes: usize) -> Self {
        BufferPool {
            free: Mutex::new(Free::default()),
            max_bytes,
        }
    }

    fn pop(&self, len: usize) -> Vec<u8> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        // The smallest idle buffer that fits; else the largest (it grows once).
        let pick = free
            .buffers
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len)
            .min_by_key(|(_, b)| b.capacity())
            .or_else(|| {
                free.buffers
                    .iter()
                    .enumerate()
                    .max_by_key(|(_, b)| b.capacity())
            })
            .map(|(i, _)| i);
        match pick {
            Some(i) => {
                let buf = free.buffers.swap_remove(i);
                free.bytes -= buf.capacity();
                buf
            }
            None => Vec::new(),
        }
    }

    /// A buffer of exactly `len` bytes with unspecified contents (stale bytes
    /// of an earlier use, never uninitialised memory): callers overwrite it.
    pub fn take(&self, len: usize) -> Vec<u8> {
        let mut buf = self.pop(len);
        // Same-sized reuse (the common case) neither frees nor zeroes.
        buf.resize(len, 0);
        buf
    }

    /// An empty buffer with room for `cap` bytes.
    pub fn take_empty(&self, cap: usize) -> Vec<u8> {
        let mut buf = self.pop(cap);
        buf.clear();
        buf.reserve(cap);
        buf
    }

    /// Returns a buffer for reuse (dropped when the pool would exceed its
    /// byte bound).
    pub fn give(&self, buf: Vec<u8>) {
        let cap = buf.capacity();
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if cap > 0 && free.bytes + cap <= self.max_bytes {
            free.bytes += cap;
            free.buffers.push(buf);
        }
    }

    /// `buf` as [`bytes::Bytes`] without a copy (what QUIC sends from: a
    /// slice it would otherwise copy into its own buffer); the buffer comes
    /// back to this pool when the last clone is dropped.
    pub fn share(self: &Arc<Self>, buf: Vec<u8>) -> bytes::Bytes {
        bytes::Bytes::from_owner(Pooled {
            buf,
            pool: Arc::clone(self),
        })
    }

    /// Idle capacity currently held, in bytes.
    pub fn idle_bytes(&self) -> usize {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }
}

/// A pooled buffer owned by `Bytes` ([`BufferPool::share`]).
struct Pooled {
    buf: Vec<u8>,
    pool: Arc<BufferPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_buffer_comes_back_when_its_last_clone_goes() {
        let pool = Arc::new(BufferPool::new(1 << 20));
        let buf = pool.take(1000);
        let ptr = buf.as_ptr();
        let shared = pool.share(buf);
        assert_eq!((shared.as_ptr(), shared.len()), (ptr, 1000), "no copy");
        let clone = shared.slice(10..20);
        drop(shared);
        assert_eq!(pool.idle_bytes(), 0, "a clone still holds it");
        drop(clone);
        assert!(pool.idle_bytes() >= 1000);
        let again = pool.take(1000);
        assert_eq!(again.as_ptr(), ptr);
    }

    #[test]
    fn reuses_the_same_allocation_and_sizes_exactly() {
        let pool = BufferPool::new(1 << 20);
        let a = pool.take(10);
        let ptr = a.as_ptr();
        pool.give(a);
        let b = pool.take(10);
        assert_eq!(b.as_ptr(), ptr, "the same allocation comes back");
        assert_eq!(b.len(), 10);
        let e = pool.take_empty(64);
        assert!(e.is_empty() && e.capacity() >= 64);
    }

    #[test]
    fn idle_memory_stays_under_the_byte_bound() {
        let pool = BufferPool::new(100);
        for _ in 0..10 {
            pool.give(Vec::with_capacity(40));
        }
        assert!(pool.idle_bytes() <= 100, "held {}", pool.idle_bytes());
        assert_eq!(pool.idle_bytes(), 80);
        pool.give(Vec::with_capacity(1000));
        assert_eq!(pool.idle_bytes(), 80, "an oversized buffer is dropped");
    }

    #[test]
    fn prefers_a_buffer_that_fits() {
        let pool = BufferPool::new(1 << 20);
        let small = Vec::with_capacity(16);
        let large = Vec::with_capacity(4096);
        let large_ptr = large.as_ptr();
        pool.give(small);
        pool.give(large);
        let got = pool.take(1000);
        assert_eq!(got.as_ptr(), large_ptr);
        let got_small = pool.take(8);
        assert!(
            got_small.capacity() < 4096,
            "the small buffer serves the small request"
        );
    }
}
