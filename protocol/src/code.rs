//! The erasure-code layout: how content is cut into stripes of `k x shard_size`
//! bytes and each stripe into `k` data and `m` parity shards.
//!
//! The last stripe is shorter; its shards are `ceil(len / k)` bytes and the last
//! data shard is zero-padded, so every shard of a stripe has the same length (what
//! Reed-Solomon needs) and no stripe stores more than `k - 1` padding bytes.

use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Most shards a stripe may have: far beyond any sane layout, and keeps the shard
/// index in one byte.
pub const MAX_TOTAL_SHARDS: usize = 64;
/// Smallest and largest shard sizes accepted.
pub const MIN_SHARD_SIZE: u32 = 4 * 1024;
pub const MAX_SHARD_SIZE: u32 = 64 * 1024 * 1024;

/// A Reed-Solomon code and its shard size, as stored in every manifest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct ErasureCode {
    /// Data shards per stripe.
    pub k: u8,
    /// Parity shards per stripe: how many shards may be lost.
    pub m: u8,
    /// Bytes per full shard.
    pub shard_size: u32,
}

/// Why a code was refused; names the bad field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodeError {
    /// `k` must be at least 1.
    #[error("k must be at least 1")]
    NoDataShards,
    /// `m` must be at least 1: a code without parity survives no loss.
    #[error("m must be at least 1")]
    NoParityShards,
    /// `k + m` exceeds [`MAX_TOTAL_SHARDS`].
    #[error("k + m = {0} exceeds {MAX_TOTAL_SHARDS}")]
    TooManyShards(usize),
    /// `shard_size` is outside [`MIN_SHARD_SIZE`]..=[`MAX_SHARD_SIZE`].
    #[error("shard_size {0} is outside {MIN_SHARD_SIZE}..={MAX_SHARD_SIZE} bytes")]
    ShardSize(u32),
}

impl ErasureCode {
    pub const DEFAULT_SHARD_SIZE: u32 = 1024 * 1024;

    pub fn new(k: u8, m: u8, shard_size: u32) -> Result<Self, CodeError> {
        let code = ErasureCode { k, m, shard_size };
        code.validate()?;
        Ok(code)
    }

    pub fn validate(&self) -> Result<(), CodeError> {
        if self.k == 0 {
            return Err(CodeError::NoDataShards);
        }
        if self.m == 0 {
            return Err(CodeError::NoParityShards);
        }
        if self.total() > MAX_TOTAL_SHARDS {
            return Err(CodeError::TooManyShards(self.total()));
        }
        if !(MIN_SHARD_SIZE..=MAX_SHARD_SIZE).contains(&self.shard_size) {
            return Err(CodeError::ShardSize(self.shard_size));
        }
        Ok(())
    }

    pub fn data_shards(&self) -> usize {
        self.k as usize
    }

    pub fn parity_shards(&self) -> usize {
        self.m as usize
    }

    pub fn total(&self) -> usize {
        self.k as usize + self.m as usize
    }

    /// Content bytes in a full stripe.
    pub fn stripe_size(&self) -> u64 {
        self.k as u64 * self.shard_size as u64
    }

    /// The layout of content of `size` bytes under this code.
    pub fn layout(&self, size: u64) -> StripeLayout {
        StripeLayout { code: *self, size }
    }
}

/// Stripe arithmetic for one piece of content.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct StripeLayout {
    pub code: ErasureCode,
    pub size: u64,
}

impl StripeLayout {
    /// Number of stripes; zero for empty content.
    pub fn stripe_count(&self) -> u64 {
        self.size.div_ceil(self.code.stripe_size())
    }

    /// The content byte range stripe `stripe` covers.
    pub fn stripe_range(&self, stripe: u64) -> Range<u64> {
        let start = stripe
            .saturating_mul(self.code.stripe_size())
            .min(self.size);
        let end = start.saturating_add(self.code.stripe_size()).min(self.size);
        start..end
    }

    /// Bytes in each shard of stripe `stripe` (all shards of a stripe are equal).
    pub fn shard_len(&self, stripe: u64) -> usize {
        let r = self.stripe_range(stripe);
        ((r.end - r.start).div_ceil(self.code.k as u64)) as usize
    }

    /// The stripes a content byte range touches.
    pub fn stripes_for(&self, range: Range<u64>) -> Range<u64> {
        if range.start >= range.end {
            return 0..0;
        }
        let ss = self.code.stripe_size();
        range.start / ss..range.end.div_ceil(ss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rs42() -> ErasureCode {
        ErasureCode::new(4, 2, 4096).unwrap()
    }

    #[test]
    fn validate_names_the_bad_field() {
        assert_eq!(ErasureCode::new(0, 2, 4096), Err(CodeError::NoDataShards));
        assert_eq!(ErasureCode::new(4, 0, 4096), Err(CodeError::NoParityShards));
        assert_eq!(
            ErasureCode::new(60, 10, 4096),
            Err(CodeError::TooManyShards(70))
        );
        assert_eq!(ErasureCode::new(4, 2, 10), Err(CodeError::ShardSize(10)));
    }

    #[test]
    fn layout_at_the_edges() {
        let c = rs42();
        assert_eq!(c.layout(0).stripe_count(), 0);
        assert_eq!(c.layout(1).stripe_count(), 1);
        assert_eq!(c.layout(1).shard_len(0), 1);
        assert_eq!(c.layout(16384).stripe_count(), 1);
        assert_eq!(c.layout(16384).shard_len(0), 4096);
        assert_eq!(c.layout(16385).stripe_count(), 2);
        assert_eq!(c.layout(16385).stripe_range(1), 16384..16385);
        assert_eq!(c.layout(16385).shard_len(1), 1);
        assert_eq!(c.layout(16383).shard_len(0), 4096);
        assert_eq!(c.layout(100_000).stripes_for(16383..16385), 0..2);
        assert_eq!(c.layout(100_000).stripes_for(5..5), 0..0);
    }

    proptest! {
        #[test]
        fn stripes_tile_the_content_exactly(size in 0u64..10_000_000, k in 1u8..12, m in 1u8..6) {
            let code = ErasureCode::new(k, m, 4096).unwrap();
            let l = code.layout(size);
            let mut next = 0;
            for s in 0..l.stripe_count() {
                let r = l.stripe_range(s);
                prop_assert_eq!(r.start, next);
                prop_assert!(r.end > r.start);
                prop_assert!(l.shard_len(s) * k as usize >= (r.end - r.start) as usize);
                prop_assert!(l.shard_len(s) <= 4096);
                next = r.end;
            }
            prop_assert_eq!(next, size);
        }
    }
}
