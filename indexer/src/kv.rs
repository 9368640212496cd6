//! The ordered, transactional key-value trait every index backend implements,
//! shaped like FoundationDB so that code written against the embedded backend
//! behaves the same on a FoundationDB cluster.
//!
//! Main types: [`KvStore`] (begins transactions), [`Transaction`] (reads,
//! buffered writes, commit), [`KvError`] and the retry loop [`run`]. The
//! `schema` module and the gateway call [`run`] with a closure that does one
//! transaction's work; backends live in `embedded` and `fdb`.
//!
//! FoundationDB's limits are part of the contract (see the `MAX_*` constants):
//! a backend that let larger transactions through would hide bugs that only
//! show up in production.

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

/// Largest key a transaction may write, in bytes (FoundationDB's limit).
pub const MAX_KEY_BYTES: usize = 10_000;
/// Largest value a transaction may write, in bytes (FoundationDB's limit).
pub const MAX_VALUE_BYTES: usize = 100_000;
/// Most bytes of keys plus values one transaction may write (FoundationDB's limit).
pub const MAX_TRANSACTION_BYTES: usize = 10_000_000;
/// Oldest a transaction may be when it reads or commits (FoundationDB's MVCC window).
pub const MAX_TRANSACTION_AGE: Duration = Duration::from_secs(5);
/// Length of the versionstamp written by [`Transaction::set_versionstamped_key`]:
/// 8 bytes of big-endian commit version, 2 bytes of big-endian order in the batch.
pub const VERSIONSTAMP_BYTES: usize = 10;

/// Rows of a range read: (key, value) in the order read.
pub type KeyValues = Vec<(Vec<u8>, Vec<u8>)>;

/// Errors of the key-value layer. Only [`KvError::is_retryable`] ones should be retried.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// A transaction that committed after this one's read version wrote a key this
    /// one read. Retryable: a fresh attempt sees the new value.
    #[error("transaction conflicted with a concurrent commit")]
    Conflict,
    /// The transaction outlived [`MAX_TRANSACTION_AGE`]. Retryable with a fresh transaction.
    #[error("transaction is older than {} s", MAX_TRANSACTION_AGE.as_secs())]
    TooOld,
    /// A written key is longer than [`MAX_KEY_BYTES`]; the size is attached.
    #[error("key of {0} bytes exceeds the {MAX_KEY_BYTES} byte limit")]
    KeyTooLarge(usize),
    /// A written value is longer than [`MAX_VALUE_BYTES`]; the size is attached.
    #[error("value of {0} bytes exceeds the {MAX_VALUE_BYTES} byte limit")]
    ValueTooLarge(usize),
    /// The transaction wrote more than [`MAX_TRANSACTION_BYTES`] of keys and values.
    #[error("transaction writes {0} bytes, over the {MAX_TRANSACTION_BYTES} byte limit")]
    TransactionTooLarge(usize),
    /// The underlying storage failed (I/O, corruption). Not retryable.
    #[error("storage failure")]
    Storage(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The store was shut down, or its committer stopped.
    #[error("store is closed")]
    Closed,
    /// `commit` was called again on a transaction that had already
    /// committed or failed. Not retryable: a second commit would write
    /// whatever part of it the first did not (a bug in the caller).
    #[error("transaction already committed or failed")]
    Finished,
    /// FoundationDB reported an error not mapped onto a variant above; its own
    /// `is_retryable` decides whether [`run`] retries.
    #[cfg(feature = "fdb")]
    #[error("FoundationDB error")]
    Fdb(#[from] foundationdb::FdbError),
}

/// Whether an error is transient, so that [`run`] should try again with a fresh transaction.
pub trait Retryable {
    fn is_retryable(&self) -> bool;
}

impl Retryable for KvError {
    fn is_retryable(&self) -> bool {
        match self {
            KvError::Conflict | KvError::TooOld => true,
            #[cfg(feature = "fdb")]
            // A commit that may have landed is resolved by the backend
            // (its marker); one it could not resolve must not run again.
            KvError::Fdb(e) => e.is_retryable() && !e.is_maybe_committed(),
            _ => false,
        }
    }
}

impl KvError {
    /// Same as [`Retryable::is_retryable`], without importing the trait.
    pub fn is_retryable(&self) -> bool {
        Retryable::is_retryable(self)
    }
}

/// A database that hands out transactions.
pub trait KvStore: Send + Sync + 'static {
    type Tx: Transaction;
    /// Starts a transaction. Its snapshot is taken no later than its first read.
    fn begin(&self) -> Result<Self::Tx, KvError>;
}

/// One optimistic transaction: snapshot reads that see its own writes, writes
/// buffered until [`Transaction::commit`].
///
/// Cheap to clone (Arc inside); all methods take `&self` (like foundationdb's
/// Transaction), so a closure given to [`run`] can hand copies to helpers.
/// Limit violations from the write methods are recorded and reported by `commit`.
pub trait Transaction: Clone + Send + Sync + 'static {
    /// The value of `key`, or `None`. Adds `key` to the read-conflict set.
    fn get(&self, key: &[u8]) -> impl Future<Output = Result<Option<Vec<u8>>, KvError>> + Send;
    /// Keys in [begin, end), ascending (or descending if reverse), at most `limit` (0 = no limit).
    fn get_range(
        &self,
        begin: &[u8],
        end: &[u8],
        limit: usize,
        reverse: bool,
    ) -> impl Future<Output = Result<KeyValues, KvError>> + Send;
    fn set(&self, key: &[u8], value: &[u8]);
    fn clear(&self, key: &[u8]);
    /// Clears every key in [begin, end); an empty or inverted range clears nothing.
    fn clear_range(&self, begin: &[u8], end: &[u8]);
    /// Little-endian i64 add, no read conflict (FoundationDB's ADD mutation on 8-byte values).
    fn atomic_add(&self, key: &[u8], delta: i64);
    /// Writes key = prefix ++ 10-byte versionstamp ++ suffix at commit. Versionstamps are
    /// unique and strictly increasing in commit order across the life of the store (restarts included).
    fn set_versionstamped_key(&self, prefix: &[u8], suffix: &[u8], value: &[u8]);
    /// Says the caller has other work in flight and will not need the commit
    /// sooner than `slack` after calling [`Transaction::commit`], so the store
    /// may hold it that long to share one durable write with other commits.
    /// A hint only: `commit` returns as durable as ever. The embedded store
    /// honours up to half a second; the default ignores it (FoundationDB
    /// batches commits on its own proxies).
    fn set_commit_slack(&self, slack: Duration) {
        let _ = slack;
    }
    /// Makes the writes durable and visible, or fails with nothing written.
    fn commit(&self) -> impl Future<Output = Result<(), KvError>> + Send;
}

/// Runs `f` in a transaction and commits it, retrying on retryable errors.
///
/// `f` gets a clone of the transaction; its writes are committed only if it
/// returns `Ok`. Retryable errors (from `f` or from the commit) start over
/// with a fresh transaction after a short jittered backoff (1 ms doubling to
/// 100 ms), for at most [`RETRY_BUDGET`] or [`MAX_ATTEMPTS`]; then the last
/// error is returned. Other errors from `f` return at once, uncommitted.
pub async fn run<S, T, E, F, Fut>(store: &S, mut f: F) -> Result<T, E>
where
    S: KvStore,
    E: From<KvError> + Retryable,
    F: FnMut(S::Tx) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + RETRY_BUDGET;
    let mut backoff = Duration::from_millis(1);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let err = match attempt_once(store, &mut f).await {
            Ok(value) => return Ok(value),
            Err(err) => err,
        };
        if !err.is_retryable() || attempt >= MAX_ATTEMPTS || Instant::now() + backoff > deadline {
            return Err(err);
        }
        tracing::debug!(attempt, "retrying transaction");
        tokio::time::sleep(jittered(backoff)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// How long [`run`] keeps retrying one piece of work.
pub const RETRY_BUDGET: Duration = Duration::from_secs(10);
/// Most attempts [`run`] makes at one piece of work.
pub const MAX_ATTEMPTS: u32 = 100;
const MAX_BACKOFF: Duration = Duration::from_millis(100);

async fn attempt_once<S, T, E, F, Fut>(store: &S, f: &mut F) -> Result<T, E>
where
    S: KvStore,
    E: From<KvError> + Retryable,
    F: FnMut(S::Tx) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let tx = store.begin()?;
    let value = f(tx.clone()).await?;
    tx.commit().await?;
    Ok(value)
}

/// Between half and all of `backoff`, so that transactions that conflicted
/// with each other do not retry in lockstep.
fn jittered(backoff: Duration) -> Duration {
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let half = backoff / 2;
    half + half.mul_f64((random % 1024) as f64 / 1024.0)
}

/// FoundationDB's ADD on an 8-byte operand: the existing value is zero-padded
/// or truncated to 8 bytes, read little-endian, and added with wraparound.
pub(crate) fn add_le(existing: Option<&[u8]>, delta: i64) -> Vec<u8> {
    let mut base = [0u8; 8];
    if let Some(existing) = existing {
        let n = existing.len().min(8);
        base[..n].copy_from_slice(&existing[..n]);
    }
    i64::from_le_bytes(base)
        .wrapping_add(delta)
        .to_le_bytes()
        .to_vec()
}

/// Tracks one transaction's size against FoundationDB's limits and
/// remembers the first violation, which `commit` reports (writes return
/// nothing).
///
/// Sizes are counted as FoundationDB counts them: every key and value
/// written, every range cleared, and every read and write conflict range.
/// A set of key K costs K + value for the mutation and K + (K + 1) for its
/// write conflict range; a clear of [B, E) costs B + E twice; a read of one
/// key, K + (K + 1); a range read, its two ends. Counting only the keys
/// and values written let 100,000 small sets through that FoundationDB
/// refuses (error 2101) at half again the size.
#[derive(Debug, Default)]
pub(crate) struct WriteBudget {
    bytes: usize,
    writes: usize,
    error: Option<KvError>,
}

impl WriteBudget {
    /// Accounts for one write of `keys` (one key, or a range's two ends) and
    /// `value`; false if it broke a limit.
    pub(crate) fn charge(&mut self, keys: &[usize], value: usize) -> bool {
        // Counted first: a write refused still makes the transaction one
        // that writes (its commit fails rather than pass as read-only).
        self.writes += 1;
        if self.error.is_some() {
            return false;
        }
        if let Some(&too_long) = keys.iter().find(|&&k| k > MAX_KEY_BYTES) {
            self.error = Some(KvError::KeyTooLarge(too_long));
            return false;
        }
        if value > MAX_VALUE_BYTES {
            self.error = Some(KvError::ValueTooLarge(value));
            return false;
        }
        let keys_len: usize = keys.iter().sum();
        // The write conflict range: [key, key + 0x00), or the range itself.
        let conflict = match keys {
            [key] => 2 * key + 1,
            _ => keys_len,
        };
        self.add(keys_len + value + conflict)
    }

    /// Accounts for a clear of one key: the range `[key, key + 0x00)` it
    /// is on FoundationDB, counted as written and as a conflict range; the
    /// key limit is the key's own length (a key at the limit that could be
    /// set can be cleared).
    pub(crate) fn charge_clear(&mut self, key: usize) -> bool {
        self.writes += 1;
        if self.error.is_some() {
            return false;
        }
        if key > MAX_KEY_BYTES {
            self.error = Some(KvError::KeyTooLarge(key));
            return false;
        }
        let range = 2 * key + 1;
        self.add(range + range)
    }

    /// Accounts for a read's conflict range: one key (`end` None) or a
    /// range's two ends. A read is refused by FoundationDB only at commit,
    /// so it is here too.
    pub(crate) fn charge_read(&mut self, begin: usize, end: Option<usize>) {
        if self.error.is_none() {
            self.add(match end {
                None => 2 * begin + 1,
                Some(end) => begin + end,
            });
        }
    }

    fn add(&mut self, bytes: usize) -> bool {
        self.bytes += bytes;
        if self.bytes > MAX_TRANSACTION_BYTES {
            self.error = Some(KvError::TransactionTooLarge(self.bytes));
            return false;
        }
        true
    }

    /// Bytes written so far.
    #[allow(dead_code)] // used by the fdb backend only
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether the transaction wrote anything, or tried to: a read-only one
    /// commits whatever the size of its reads (and, on FoundationDB,
    /// without a round trip).
    pub(crate) fn wrote(&self) -> bool {
        self.writes > 0
    }

    /// The first limit this transaction broke, if any, as often as asked:
    /// a transaction that broke one never commits.
    pub(crate) fn error(&self) -> Option<KvError> {
        match self.error {
            Some(KvError::KeyTooLarge(n)) => Some(KvError::KeyTooLarge(n)),
            Some(KvError::ValueTooLarge(n)) => Some(KvError::ValueTooLarge(n)),
            Some(KvError::TransactionTooLarge(n)) => Some(KvError::TransactionTooLarge(n)),
            // `charge` records only the limits above.
            Some(_) => Some(KvError::Finished),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_le_pads_truncates_and_wraps() {
        assert_eq!(add_le(None, 5), 5i64.to_le_bytes().to_vec());
        assert_eq!(add_le(Some(&[1]), 1), 2i64.to_le_bytes().to_vec());
        let long = [1u8, 0, 0, 0, 0, 0, 0, 0, 9, 9];
        assert_eq!(add_le(Some(&long), 1), 2i64.to_le_bytes().to_vec());
        assert_eq!(
            add_le(Some(&i64::MAX.to_le_bytes()), 1),
            i64::MIN.to_le_bytes().to_vec()
        );
    }

    #[test]
    fn budget_reports_first_violation() {
        let mut b = WriteBudget::default();
        assert!(b.charge(&[10], 10));
        assert!(!b.charge(&[MAX_KEY_BYTES + 1], 0));
        assert!(!b.charge(&[1], MAX_VALUE_BYTES + 1));
        // As often as asked: a transaction that broke a limit never commits.
        for _ in 0..2 {
            assert!(matches!(b.error(), Some(KvError::KeyTooLarge(n)) if n == MAX_KEY_BYTES + 1));
        }
    }

    #[test]
    fn jitter_stays_within_backoff() {
        for _ in 0..100 {
            let d = jittered(Duration::from_millis(8));
            assert!(d >= Duration::from_millis(4) && d <= Duration::from_millis(8));
        }
    }
}
