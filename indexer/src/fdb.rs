//! The FoundationDB index backend (cargo feature `fdb`): [`FdbStore`] maps the
//! [`KvStore`] trait onto the `foundationdb` crate, for deployments whose
//! metadata outgrows one machine. The gateway reaches it only through the
//! trait and `schema`; `tests/contract_fdb.rs` runs the shared contract on it
//! when `FDB_CLUSTER_FILE` names a cluster.
//!
//! Main types: [`FdbStore`] (a database handle) and [`FdbTx`] (an Arc'd
//! `foundationdb::Transaction`).
//!
//! Process-wide state: FoundationDB's client network can be started once per
//! process. The first [`FdbStore::open`] starts it and keeps its guard in a
//! static; call [`shutdown_network`] once at the end of `main` (FoundationDB
//! wants the network stopped before exit). No store can be opened after that.
//!
//! Errors keep FoundationDB's semantics: `not_committed` (1020) becomes
//! [`KvError::Conflict`], `transaction_too_old` (1007) [`KvError::TooOld`], so
//! callers match one set of variants on both backends; every other error stays
//! an [`FdbError`] inside [`KvError::Fdb`], whose own `is_retryable` drives
//! [`crate::run`]. Size limits are checked here before FoundationDB sees the
//! write, so both backends report the same sizes. Every transaction times
//! out after [`TRANSACTION_TIMEOUT_MS`] (`transaction_timed_out`, 1031,
//! becomes [`KvError::Storage`]), so an unreachable cluster is an error,
//! not a wait without end; the check of a commit whose outcome is unknown
//! has [`RESOLVE_TIMEOUT_MS`], after which it answers the unknown outcome.
//!
//! A commit whose outcome FoundationDB cannot tell (`commit_unknown_result`,
//! 1021, and the other "maybe committed" errors) is resolved here, never
//! retried blind: [`crate::run`] would run the closure again, and a ledger
//! entry, a custody event or a queued notarization would be written twice.
//! Every commit that writes carries a marker key (see [`MARKERS`]) that it also reads;
//! after an unknown result a new transaction reads the marker. Present: the
//! commit landed, and `commit` returns `Ok`. Absent: it writes the marker
//! itself, which makes the first commit conflict should it still be in
//! flight, and returns [`KvError::Conflict`] so that `run` tries again
//! knowing the first attempt wrote nothing. Markers are named by the read
//! version they were written at (FoundationDB's versions advance about a
//! million a second) and swept once they are [`MARKER_LIFETIME`] old.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use std::sync::atomic::{AtomicI64, Ordering};

use foundationdb::api::{FdbApiBuilder, NetworkAutoStop};
use foundationdb::options::{ConflictRangeType, MutationType, StreamingMode};
use foundationdb::{Database, FdbError, RangeOption};

use crate::kv::{KeyValues, KvError, KvStore, Transaction, WriteBudget, VERSIONSTAMP_BYTES};

const NOT_COMMITTED: i32 = 1020;
const TRANSACTION_TOO_OLD: i32 = 1007;
const TRANSACTION_TOO_LARGE: i32 = 2101;
const TRANSACTION_TIMED_OUT: i32 = 1031;

/// Longest any one transaction may take, reads and commit, before
/// FoundationDB gives it up with `transaction_timed_out`: a little over its
/// own 5 s limit on a transaction's age. Without it, a cluster that cannot
/// be reached makes every read and commit wait forever (the client retries
/// inside the call), and [`crate::run`]'s budget, checked only between
/// attempts, never fires.
const TRANSACTION_TIMEOUT_MS: i32 = 8_000;

/// Where commit markers live: `MARKERS ++ read version (i64 BE) ++ 16 random
/// bytes`. No schema tag starts with 0xfe.
pub const MARKERS: &[u8] = &[0xfe, b'c'];
/// A marker's value when its own commit wrote it, and when the check after
/// an unknown result wrote it in the commit's stead.
const LANDED: &[u8] = b"c";
const ABANDONED: &[u8] = b"a";
/// Versions a marker is kept: about ten minutes. The check that reads it
/// runs at once after the commit it belongs to.
const MARKER_LIFETIME: i64 = 600_000_000;
/// Versions between sweeps of old markers by one process (about a minute).
const SWEEP_EVERY: i64 = 60_000_000;
/// Read version of this process's last sweep.
static LAST_SWEEP: AtomicI64 = AtomicI64::new(0);
/// Most checks of one marker before the outcome is given up as unknown.
const RESOLVE_ATTEMPTS: u32 = 20;
/// Longest the checks of one marker take, all attempts together.
const RESOLVE_TIMEOUT_MS: i32 = 60_000;

type Network = Result<Mutex<Option<NetworkAutoStop>>, FdbError>;

static NETWORK: OnceLock<Network> = OnceLock::new();

/// Starts FoundationDB's client network the first time it is called.
fn ensure_network() -> Result<(), KvError> {
    let network = NETWORK.get_or_init(|| {
        let builder = FdbApiBuilder::default().build()?;
        // SAFETY: `boot` requires the returned guard to be dropped before the
        // process exits. It lives in NETWORK, and `shutdown_network` (which
        // the binary calls at the end of main) drops it; a process that exits
        // without calling it is no worse than an abort, which the crate allows.
        let guard = unsafe { builder.boot() }?;
        Ok(Mutex::new(Some(guard)))
    });
    match network {
        Ok(guard) if lock(guard).is_some() => Ok(()),
        Ok(_) => Err(KvError::Closed),
        Err(e) => Err(KvError::Fdb(*e)),
    }
}

/// Stops FoundationDB's client network, waiting for its thread. Call once,
/// at the end of `main`, after every store and transaction is dropped;
/// afterwards [`FdbStore::open`] fails with [`KvError::Closed`].
pub fn shutdown_network() {
    if let Some(Ok(network)) = NETWORK.get() {
        let guard = lock(network).take();
        drop(guard);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// A FoundationDB database handle. Cheap to clone.
#[derive(Clone)]
pub struct FdbStore {
    db: Arc<Database>,
}

impl std::fmt::Debug for FdbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdbStore").finish_non_exhaustive()
    }
}

impl FdbStore {
    /// Connects to the cluster named by `cluster_file` (FoundationDB's default
    /// cluster file when `None`), starting the client network if needed.
    pub fn open(cluster_file: Option<&str>) -> Result<Self, KvError> {
        ensure_network()?;
        let db = Database::new(cluster_file)?;
        db.set_option(foundationdb::options::DatabaseOption::TransactionTimeout(
            TRANSACTION_TIMEOUT_MS,
        ))?;
        Ok(FdbStore { db: Arc::new(db) })
    }
}

impl KvStore for FdbStore {
    type Tx = FdbTx;

    fn begin(&self) -> Result<FdbTx, KvError> {
        let tx = self.db.create_trx()?;
        Ok(FdbTx {
            inner: Arc::new(FdbTxInner {
                db: self.db.clone(),
                tx: Mutex::new(Some(tx)),
                budget: Mutex::new(WriteBudget::default()),
            }),
        })
    }
}

/// A FoundationDB transaction shared by its clones.
#[derive(Clone)]
pub struct FdbTx {
    inner: Arc<FdbTxInner>,
}

struct FdbTxInner {
    /// For the check after a commit's outcome is unknown.
    db: Arc<Database>,
    /// `None` once committed: foundationdb's `commit` consumes the transaction.
    tx: Mutex<Option<foundationdb::Transaction>>,
    budget: Mutex<WriteBudget>,
}

/// A read on a transaction that was already committed.
#[derive(Debug, thiserror::Error)]
#[error("transaction used after commit")]
pub struct UsedAfterCommit;

impl FdbTx {
    /// Runs `f` on the live transaction. The futures foundationdb returns do
    /// not borrow the transaction, so the lock is never held across an await.
    fn with_tx<R>(&self, f: impl FnOnce(&foundationdb::Transaction) -> R) -> Result<R, KvError> {
        match lock(&self.inner.tx).as_ref() {
            Some(tx) => Ok(f(tx)),
            None => Err(KvError::Storage(Box::new(UsedAfterCommit))),
        }
    }

    /// Checks a write against the size limits, then hands it to foundationdb.
    fn write(&self, keys: &[usize], value: usize, f: impl FnOnce(&foundationdb::Transaction)) {
        if !lock(&self.inner.budget).charge(keys, value) {
            return;
        }
        if self.with_tx(f).is_err() {
            tracing::warn!("write to a committed FoundationDB transaction ignored");
        }
    }

    fn map_error(&self, e: FdbError) -> KvError {
        match e.code() {
            NOT_COMMITTED => KvError::Conflict,
            TRANSACTION_TOO_OLD => KvError::TooOld,
            TRANSACTION_TOO_LARGE => KvError::TransactionTooLarge(lock(&self.inner.budget).bytes()),
            // The cluster did not answer in time: not retried at once (the
            // time is spent), but passing, as the embedded store's failing
            // disk is to the callers that wait such errors out.
            TRANSACTION_TIMED_OUT => KvError::Storage(Box::new(e)),
            _ => KvError::Fdb(e),
        }
    }
}

impl Transaction for FdbTx {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        lock(&self.inner.budget).charge_read(key.len(), None);
        let read = self.with_tx(|tx| tx.get(key, false))?;
        let value = read.await.map_err(|e| self.map_error(e))?;
        Ok(value.map(|v| v.to_vec()))
    }

    async fn get_range(
        &self,
        begin: &[u8],
        end: &[u8],
        limit: usize,
        reverse: bool,
    ) -> Result<KeyValues, KvError> {
        // FoundationDB rejects inverted ranges; the trait reads them as empty.
        if begin >= end {
            return Ok(Vec::new());
        }
        lock(&self.inner.budget).charge_read(begin.len(), Some(end.len()));
        let mut opt = RangeOption {
            limit: (limit > 0).then_some(limit),
            reverse,
            mode: StreamingMode::WantAll,
            ..RangeOption::from(begin.to_vec()..end.to_vec())
        };
        let mut rows = Vec::new();
        let mut iteration = 1;
        loop {
            let read = self.with_tx(|tx| tx.get_range(&opt, iteration, false))?;
            let batch = read.await.map_err(|e| self.map_error(e))?;
            rows.extend(
                batch
                    .iter()
                    .map(|kv| (kv.key().to_vec(), kv.value().to_vec())),
            );
            opt = match opt.next_range(&batch) {
                Some(next) => next,
                None => break,
            };
            iteration += 1;
        }
        if limit > 0 {
            rows.truncate(limit);
        }
        Ok(rows)
    }

    fn set(&self, key: &[u8], value: &[u8]) {
        self.write(&[key.len()], value.len(), |tx| tx.set(key, value));
    }

    fn clear(&self, key: &[u8]) {
        // FoundationDB records a clear as one of [key, key + 0x00).
        if !lock(&self.inner.budget).charge_clear(key.len()) {
            return;
        }
        if self.with_tx(|tx| tx.clear(key)).is_err() {
            tracing::warn!("write to a committed FoundationDB transaction ignored");
        }
    }

    fn clear_range(&self, begin: &[u8], end: &[u8]) {
        // FoundationDB fails the commit on an inverted range; the trait clears nothing.
        if begin >= end {
            return;
        }
        self.write(&[begin.len(), end.len()], 0, |tx| {
            tx.clear_range(begin, end)
        });
    }

    fn atomic_add(&self, key: &[u8], delta: i64) {
        self.write(&[key.len()], 8, |tx| {
            tx.atomic_op(key, &delta.to_le_bytes(), MutationType::Add)
        });
    }

    fn set_versionstamped_key(&self, prefix: &[u8], suffix: &[u8], value: &[u8]) {
        let key_len = prefix.len() + VERSIONSTAMP_BYTES + suffix.len();
        // FoundationDB's format: the key with a placeholder where the stamp
        // goes, then the placeholder's offset as 4 little-endian bytes.
        let Ok(offset) = u32::try_from(prefix.len()) else {
            // Longer than any allowed key, so the budget records KeyTooLarge.
            lock(&self.inner.budget).charge(&[key_len], value.len());
            return;
        };
        let mut param = Vec::with_capacity(key_len + 4);
        param.extend_from_slice(prefix);
        param.extend_from_slice(&[0u8; VERSIONSTAMP_BYTES]);
        param.extend_from_slice(suffix);
        param.extend_from_slice(&offset.to_le_bytes());
        self.write(&[key_len], value.len(), |tx| {
            tx.atomic_op(&param, value, MutationType::SetVersionstampedKey)
        });
    }

    async fn commit(&self) -> Result<(), KvError> {
        let Some(tx) = lock(&self.inner.tx).take() else {
            return Err(KvError::Finished);
        };
        if !lock(&self.inner.budget).wrote() {
            // Read-only: nothing to land twice, its reads' size is not
            // counted, and FoundationDB answers without asking the cluster.
            return match tx.commit().await {
                Ok(_) => Ok(()),
                Err(e) => Err(self.map_error(FdbError::from(e))),
            };
        }
        {
            // The marker and its read (below) count too.
            let mut budget = lock(&self.inner.budget);
            let marker_len = MARKERS.len() + 8 + 16;
            budget.charge(&[marker_len], LANDED.len());
            budget.charge_read(marker_len, None);
            if let Some(e) = budget.error() {
                return Err(e);
            }
        }
        // The marker, read (so a later write of it makes this commit
        // conflict) and written. Named by the read version, which a
        // transaction that read anything already holds.
        let version = tx.get_read_version().await.map_err(|e| self.map_error(e))?;
        let marker = marker_key(version);
        let mut marker_end = marker.clone();
        marker_end.push(0);
        tx.add_conflict_range(&marker, &marker_end, ConflictRangeType::Read)
            .map_err(|e| self.map_error(e))?;
        tx.set(&marker, LANDED);
        // Once a minute per process, the markers no check can still need.
        let last = LAST_SWEEP.load(Ordering::Relaxed);
        if version - last > SWEEP_EVERY
            && LAST_SWEEP
                .compare_exchange(last, version, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let old = marker_key_prefix(version - MARKER_LIFETIME);
            tx.clear_range(MARKERS, &old);
        }
        match tx.commit().await {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = FdbError::from(e);
                // A commit timed out may have landed as well.
                if e.is_maybe_committed() || e.code() == TRANSACTION_TIMED_OUT {
                    resolve(&self.inner.db, &marker, e).await
                } else {
                    Err(self.map_error(e))
                }
            }
        }
    }
}

/// `MARKERS ++ version`: markers sort by the version they were written at.
fn marker_key_prefix(version: i64) -> Vec<u8> {
    let mut key = MARKERS.to_vec();
    key.extend_from_slice(&version.max(0).to_be_bytes());
    key
}

/// A marker no other transaction shares: its read version, then 16 bytes
/// from this process's random seed (the OS's, through `RandomState`), its
/// id and a counter.
fn marker_key(version: i64) -> Vec<u8> {
    use std::hash::{BuildHasher, Hasher};
    static SEED: OnceLock<[u64; 2]> = OnceLock::new();
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seed = SEED.get_or_init(|| {
        let random = || {
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
        };
        [random(), random()]
    });
    let mut unique = blake3::Hasher::new();
    unique.update(&seed[0].to_le_bytes());
    unique.update(&seed[1].to_le_bytes());
    unique.update(&std::process::id().to_le_bytes());
    unique.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    let mut key = marker_key_prefix(version);
    key.extend_from_slice(&unique.finalize().as_bytes()[..16]);
    key
}

/// Whether the commit that wrote `marker` landed, after FoundationDB said it
/// could not tell (`unknown`): `Ok` if it did, [`KvError::Conflict`] (which
/// [`crate::run`] retries) once it certainly never will.
async fn resolve(db: &Database, marker: &[u8], unknown: FdbError) -> Result<(), KvError> {
    tracing::warn!(
        code = unknown.code(),
        "commit outcome unknown; checking its marker"
    );
    let mut tx = db.create_trx()?;
    // Longer than a transaction's own limit (a cluster recovering takes
    // its time), and not reset by the retries below; spent, the outcome
    // stays unknown, which is said as such, never as a passing error.
    tx.set_option(foundationdb::options::TransactionOption::Timeout(
        RESOLVE_TIMEOUT_MS,
    ))?;
    for _ in 0..RESOLVE_ATTEMPTS {
        let found = match tx.get(marker, false).await {
            Ok(found) => found,
            Err(e) => {
                tx = match tx.on_error(e).await {
                    Ok(tx) => tx,
                    Err(_) => return Err(unresolved(unknown)),
                };
                continue;
            }
        };
        match found.as_deref() {
            // It landed. Clearing the marker is tidiness (the sweep would).
            Some(value) if value == LANDED => {
                tx.clear(marker);
                let _ = tx.commit().await;
                return Ok(());
            }
            // A check of ours (whose own outcome was unknown) abandoned it.
            Some(_) => return Err(KvError::Conflict),
            None => {
                tx.set(marker, ABANDONED);
                match tx.commit().await {
                    Ok(_) => return Err(KvError::Conflict),
                    // Conflicted (the commit landed meanwhile) or unknown
                    // itself: read again.
                    Err(e) => {
                        tx = match e.on_error().await {
                            Ok(tx) => tx,
                            Err(_) => return Err(unresolved(unknown)),
                        }
                    }
                }
            }
        }
    }
    Err(unresolved(unknown))
}

/// A commit whose outcome stays unknown: said as the embedded store says
/// its own (a storage failure: the service unavailable, 503 with a retry
/// under the same Idempotency-Key), not as an error of the request.
fn unresolved(unknown: FdbError) -> KvError {
    KvError::Storage(Box::new(unknown))
}
