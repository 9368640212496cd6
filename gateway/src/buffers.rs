//! Reused stripe and shard buffers.
//!
//! A fresh multi-MiB `Vec` is a fresh `mmap`: every page faults in and is
//! zeroed by the kernel, then zeroed again or overwritten by us. Measured with
//! `cargo bench -p gateway --bench kernels`, allocating the six 1 MiB shards of
//! an RS(4,2) stripe cost more than the coding and hashing together. Ingest
//! therefore takes its buffers from a small pool and gives them back when a
//! stripe is stored; the pool keeps at most `max` buffers, so memory stays
//! bounded by the pipeline depth whatever the upload size.

use std::sync::Mutex;

pub struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
    max: usize,
}

impl BufferPool {
    pub fn new(max: usize) -> Self {
        BufferPool {
            free: Mutex::new(Vec::new()),
            max,
        }
    }

    /// A buffer of exactly `len` bytes with unspecified contents (stale bytes
    /// of an earlier stripe, never uninitialised memory): callers overwrite it.
    pub fn take(&self, len: usize) -> Vec<u8> {
        let reused = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut buf = reused.unwrap_or_default();
        // Same-sized reuse (the common case) neither frees nor zeroes.
        buf.resize(len, 0);
        buf
    }

    /// An empty buffer with room for `cap` bytes.
    pub fn take_empty(&self, cap: usize) -> Vec<u8> {
        let mut buf = self.take(0);
        buf.reserve(cap);
        buf
    }

    /// Returns a buffer for reuse (dropped when the pool is full).
    pub fn give(&self, buf: Vec<u8>) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.max && buf.capacity() > 0 {
            free.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_up_to_max_and_sizes_exactly() {
        let pool = BufferPool::new(2);
        let a = pool.take(10);
        let ptr = a.as_ptr();
        pool.give(a);
        let b = pool.take(10);
        assert_eq!(b.as_ptr(), ptr, "the same allocation comes back");
        assert_eq!(b.len(), 10);
        pool.give(b);
        pool.give(vec![1; 3]);
        pool.give(vec![1; 3]);
        assert_eq!(pool.free.lock().map(|f| f.len()).unwrap_or(0), 2);
        let c = pool.take(5);
        assert_eq!(c.len(), 5);
        let e = pool.take_empty(64);
        assert!(e.is_empty() && e.capacity() >= 64);
    }
}
