//! The embedded index backend: [`EmbeddedStore`] implements the
//! FoundationDB-shaped [`KvStore`] trait on one redb file. `custodia up` and
//! every test use it; it must accept and reject exactly what FoundationDB
//! would, so that code which passes here passes on a cluster.
//!
//! How it matches FoundationDB:
//! - Snapshot isolation: a transaction ([`EmbeddedTx`]) reads one redb read
//!   snapshot plus its own buffered writes. The commit version is stored in
//!   the same redb file (table `meta`), so reading it from the snapshot gives
//!   the transaction's read version with no lock: snapshot and version can
//!   never disagree.
//! - Optimistic concurrency: reads record read-conflict keys and ranges. One
//!   committer thread owns all writes and keeps the write sets of the commits
//!   of the last few seconds; a transaction whose reads intersect a write set
//!   committed after its read version fails with [`KvError::Conflict`].
//! - Group commit: the committer drains every queued commit (up to
//!   [`MAX_BATCH`]), checks them in order, and applies the survivors in one redb
//!   write transaction, so one fsync serves the whole batch. A batch whose
//!   every commit has slack ([`Transaction::set_commit_slack`]: a caller with
//!   other work in flight) may be held for company until the first is due,
//!   while commits arrive often enough to expect some. Each batch is one
//!   commit version; versionstamps are that version (8 bytes, big-endian) and
//!   the transaction's place in the batch (2 bytes, big-endian).
//! - FoundationDB's limits (see `kv`): key, value and transaction sizes, and the
//!   5 s transaction age.
//! - A failed write (a full disk, an I/O error) fails its batch, and redb then
//!   refuses every later operation on that handle (it latches the failure,
//!   `PreviousIo`). The committer closes the handle, drops the file's pages
//!   from the page cache (pages whose write-back failed stay there, marked
//!   clean) and opens the file again, so the store recovers once the disk
//!   does, without a restart, from what the disk holds. The failed
//!   batch is reported failed even if the reopened file holds it (a failed
//!   fsync may come after the write it was to make durable): its callers
//!   must treat the outcome as unknown, as FoundationDB's
//!   `commit_unknown_result`; its version is never used again, and
//!   transactions that read before the reopen fail with a conflict and
//!   start over (see [`Committer::reopen`]).
//!
//! Key layout of the redb file:
//!
//! ```text
//! table "kv":   user key = user value
//! table "meta": "commit_version" = u64, the version of the last committed batch
//! ```

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, ReadOnlyTable, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use crate::kv::{
    add_le, KeyValues, KvError, KvStore, Transaction, WriteBudget, MAX_TRANSACTION_AGE,
    VERSIONSTAMP_BYTES,
};

const DATA: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const VERSION_KEY: &str = "commit_version";

/// Most commits applied in one redb write transaction. Bounded so that one
/// batch's fsync does not grow without limit, and so the batch position fits
/// the versionstamp's 2 bytes.
pub const MAX_BATCH: usize = 1024;

/// How long the committer remembers a commit's write set. Longer than
/// [`MAX_TRANSACTION_AGE`]: any transaction that could still commit began less
/// than 5 s ago, so every commit after its read version is still remembered.
const CONFLICT_WINDOW: Duration = Duration::from_secs(6);

/// An index store in one redb file. Cheap to clone; the file closes when the
/// last clone and the last transaction are dropped.
#[derive(Clone)]
pub struct EmbeddedStore {
    shared: Arc<Shared>,
}

/// The open database, shared by readers and the committer; `None` while the
/// committer opens it again after an I/O failure.
type Slot = Arc<RwLock<Option<Arc<Database>>>>;

/// Opens (or creates) the database file: once at [`EmbeddedStore::open`],
/// again after an I/O failure.
type Opener = Box<dyn Fn() -> Result<Database, redb::DatabaseError> + Send>;

struct Shared {
    db: Slot,
    commits: Option<mpsc::Sender<CommitRequest>>,
    committer: Option<JoinHandle<()>>,
    disk_commits: Arc<AtomicU64>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Closing the channel stops the committer; joining it releases the redb
        // file, so the same path can be reopened as soon as this returns.
        self.commits.take();
        if let Some(committer) = self.committer.take() {
            if committer.join().is_err() {
                tracing::error!("index committer thread panicked");
            }
        }
    }
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("disk_commits", &self.disk_commits())
            .finish_non_exhaustive()
    }
}

/// Drops what the page cache holds of the file at `path`, so that what is
/// opened next is read from the disk. Opened again after a failed commit,
/// the file would otherwise be read through pages whose write-back failed:
/// Linux marks them clean and keeps them, and reports the failure once, so
/// the reopened file would show the failed batch as written, later batches
/// would be built on pages that never reached the disk, and each later
/// fsync would succeed. Best effort (a page being written stays).
fn drop_cached_pages(path: &Path) {
    let Ok(file) = std::fs::File::open(path) else {
        return; // created by the open
    };
    if let Err(e) = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed) {
        tracing::debug!(path = %path.display(), error = %e, "could not drop the index file's cached pages");
    }
}

impl EmbeddedStore {
    /// Opens the store at `path`, creating the file if it does not exist.
    pub fn open(path: &Path) -> Result<Self, KvError> {
        let file = path.to_path_buf();
        Self::open_with(
            path,
            Box::new(move || {
                drop_cached_pages(&file);
                Database::create(&file)
            }),
        )
    }

    /// Opens the store at `path` with `opener` (a test's failing disk).
    fn open_with(path: &Path, opener: Opener) -> Result<Self, KvError> {
        // It holds S3 secret keys (and every tenant's records): its owner's
        // alone from its first byte, whatever the umask (made private only
        // after redb created it, another user could open it in between and
        // read every secret written later through that handle).
        {
            use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
            {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(storage(e)),
            }
            // An existing file made by an older version: tightened if this
            // process may (one it may not is warned about, as before).
            if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
                tracing::warn!(path = %path.display(), error = %e, "could not make the index file private");
            }
        }
        let db = Arc::new(opener().map_err(storage)?);
        let version = prepare_tables(&db).map_err(storage)?;
        let db: Slot = Arc::new(RwLock::new(Some(db)));
        let disk_commits = Arc::new(AtomicU64::new(0));
        let (commits, requests) = mpsc::channel();
        let committer = Committer {
            db: db.clone(),
            opener,
            next_reopen: None,
            read_floor: 0,
            requests,
            version,
            recent: VecDeque::new(),
            disk_commits: disk_commits.clone(),
            arrivals: Arrivals::default(),
        };
        let committer = std::thread::Builder::new()
            .name("index-committer".into())
            .spawn(move || committer.run())
            .map_err(storage)?;
        Ok(EmbeddedStore {
            shared: Arc::new(Shared {
                db,
                commits: Some(commits),
                committer: Some(committer),
                disk_commits,
            }),
        })
    }

    /// How many redb write transactions (each one fsync) the committer has
    /// made since open. Far fewer than commits when group commit works.
    pub fn disk_commits(&self) -> u64 {
        self.shared.disk_commits.load(Ordering::Relaxed)
    }
}

/// Creates both tables so read snapshots can always open them; returns the
/// last commit version.
fn prepare_tables(db: &Database) -> Result<u64, redb::Error> {
    let write = db.begin_write()?;
    let version = {
        write.open_table(DATA)?;
        let meta = write.open_table(META)?;
        let version = meta.get(VERSION_KEY)?.map(|v| v.value()).unwrap_or(0);
        version
    };
    write.commit()?;
    Ok(version)
}

/// The database is being opened again after an I/O failure.
#[derive(Debug, thiserror::Error)]
#[error("the index file is being reopened after an I/O failure (a full disk?)")]
struct Unavailable;

/// How long the callers of a batch whose write failed wait for the file to
/// be opened again, which says whether their commit landed.
const REOPEN_PATIENCE: Duration = Duration::from_secs(2);

/// Between attempts to open the file again.
const REOPEN_EVERY: Duration = Duration::from_millis(250);

fn storage<E: std::error::Error + Send + Sync + 'static>(e: E) -> KvError {
    KvError::Storage(Box::new(e))
}

fn redb_storage(e: impl Into<redb::Error>) -> KvError {
    storage(e.into())
}

impl KvStore for EmbeddedStore {
    type Tx = EmbeddedTx;

    fn begin(&self) -> Result<EmbeddedTx, KvError> {
        // Before the snapshot: the conflict window (`CONFLICT_WINDOW`) outlasts
        // the age limit only if the age is counted from no later than it.
        let started = Instant::now();
        let db = self
            .shared
            .db
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| storage(Unavailable))?;
        let read = db.begin_read().map_err(redb_storage)?;
        let snapshot = read.open_table(DATA).map_err(redb_storage)?;
        let meta = read.open_table(META).map_err(redb_storage)?;
        let read_version = meta
            .get(VERSION_KEY)
            .map_err(redb_storage)?
            .map(|v| v.value())
            .unwrap_or(0);
        Ok(EmbeddedTx {
            inner: Arc::new(TxInner {
                store: self.shared.clone(),
                snapshot,
                read_version,
                started,
                state: Mutex::new(TxState::default()),
            }),
        })
    }
}

/// A transaction of [`EmbeddedStore`]: a read snapshot plus buffered writes.
#[derive(Clone)]
pub struct EmbeddedTx {
    inner: Arc<TxInner>,
}

struct TxInner {
    store: Arc<Shared>,
    snapshot: ReadOnlyTable<&'static [u8], &'static [u8]>,
    read_version: u64,
    started: Instant,
    state: Mutex<TxState>,
}

#[derive(Default)]
struct TxState {
    /// What this transaction's writes say about single keys, for reads.
    overlay: BTreeMap<Vec<u8>, Pending>,
    /// Ranges this transaction cleared: snapshot keys in them are gone.
    cleared: Vec<(Vec<u8>, Vec<u8>)>,
    /// The writes in program order, replayed at commit.
    mutations: Vec<Mutation>,
    reads: ConflictSet,
    budget: WriteBudget,
    /// See [`Transaction::set_commit_slack`].
    slack: Duration,
    /// `commit` was called: a second call fails with [`KvError::Finished`].
    finished: bool,
}

enum Pending {
    Value(Vec<u8>),
    Cleared,
    /// An add onto a value this transaction has not seen.
    Add(i64),
}

enum Mutation {
    Set(Vec<u8>, Vec<u8>),
    Clear(Vec<u8>),
    ClearRange(Vec<u8>, Vec<u8>),
    Add(Vec<u8>, i64),
    VersionstampedKey {
        prefix: Vec<u8>,
        suffix: Vec<u8>,
        value: Vec<u8>,
    },
}

/// Keys and half-open ranges; used for both read and write conflict sets.
#[derive(Default)]
struct ConflictSet {
    keys: BTreeSet<Vec<u8>>,
    ranges: Vec<(Vec<u8>, Vec<u8>)>,
}

impl ConflictSet {
    fn add_range(&mut self, begin: &[u8], end: &[u8]) {
        if begin < end {
            self.ranges.push((begin.to_vec(), end.to_vec()));
        }
    }

    fn intersects(&self, other: &ConflictSet) -> bool {
        let (small, large) = if self.keys.len() <= other.keys.len() {
            (&self.keys, &other.keys)
        } else {
            (&other.keys, &self.keys)
        };
        small.iter().any(|k| large.contains(k))
            || self.ranges_hit_keys(&other.keys)
            || other.ranges_hit_keys(&self.keys)
            || self.ranges.iter().any(|(b, e)| {
                other
                    .ranges
                    .iter()
                    .any(|(ob, oe)| b.as_slice() < oe.as_slice() && ob.as_slice() < e.as_slice())
            })
    }

    fn ranges_hit_keys(&self, keys: &BTreeSet<Vec<u8>>) -> bool {
        self.ranges.iter().any(|(b, e)| {
            keys.range::<[u8], _>((Bound::Included(b.as_slice()), Bound::Excluded(e.as_slice())))
                .next()
                .is_some()
        })
    }

    fn absorb(&mut self, other: ConflictSet) {
        self.keys.extend(other.keys);
        self.ranges.extend(other.ranges);
    }
}

fn in_ranges(ranges: &[(Vec<u8>, Vec<u8>)], key: &[u8]) -> bool {
    ranges
        .iter()
        .any(|(b, e)| b.as_slice() <= key && key < e.as_slice())
}

/// The smallest key after `key`.
fn key_after(key: &[u8]) -> Vec<u8> {
    let mut next = Vec::with_capacity(key.len() + 1);
    next.extend_from_slice(key);
    next.push(0);
    next
}

impl Pending {
    /// The value a read sees, given the snapshot's value under this write.
    fn resolve(&self, base: Option<&[u8]>) -> Option<Vec<u8>> {
        match self {
            Pending::Value(v) => Some(v.clone()),
            Pending::Cleared => None,
            Pending::Add(delta) => Some(add_le(base, *delta)),
        }
    }
}

impl TxInner {
    fn lock(&self) -> MutexGuard<'_, TxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_age(&self) -> Result<(), KvError> {
        if self.started.elapsed() > MAX_TRANSACTION_AGE {
            return Err(KvError::TooOld);
        }
        Ok(())
    }

    fn snapshot_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self
            .snapshot
            .get(key)
            .map_err(redb_storage)?
            .map(|v| v.value().to_vec()))
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.check_age()?;
        let mut state = self.lock();
        // A value fully decided by this transaction's own writes needs no
        // read conflict: no concurrent commit can change what it reads.
        match state.overlay.get(key) {
            Some(Pending::Value(v)) => return Ok(Some(v.clone())),
            Some(Pending::Cleared) => return Ok(None),
            Some(Pending::Add(_)) | None => {}
        }
        if in_ranges(&state.cleared, key) {
            return Ok(state.overlay.get(key).and_then(|p| p.resolve(None)));
        }
        let base = self.snapshot_get(key)?;
        state.reads.keys.insert(key.to_vec());
        state.budget.charge_read(key.len(), None);
        Ok(match state.overlay.get(key) {
            Some(pending) => pending.resolve(base.as_deref()),
            None => base,
        })
    }

    fn get_range(
        &self,
        begin: &[u8],
        end: &[u8],
        limit: usize,
        reverse: bool,
    ) -> Result<KeyValues, KvError> {
        self.check_age()?;
        if begin >= end {
            return Ok(Vec::new());
        }
        let mut state = self.lock();
        let out = self.merged_range(&state, begin, end, limit, reverse)?;
        state.budget.charge_read(begin.len(), Some(end.len()));
        // Only what the caller saw can make its decision stale: a read that
        // stopped at the limit conflicts only up to the last key it returned.
        match out.last() {
            Some((last, _)) if limit != 0 && out.len() >= limit => {
                if reverse {
                    state.reads.add_range(last, end);
                } else {
                    state.reads.add_range(begin, &key_after(last));
                }
            }
            _ => state.reads.add_range(begin, end),
        }
        Ok(out)
    }

    /// The snapshot's range merged with this transaction's writes.
    fn merged_range(
        &self,
        state: &TxState,
        begin: &[u8],
        end: &[u8],
        limit: usize,
        reverse: bool,
    ) -> Result<KeyValues, KvError> {
        let range = self
            .snapshot
            .range::<&[u8]>(begin..end)
            .map_err(redb_storage)?;
        let snapshot: Box<dyn Iterator<Item = _>> = if reverse {
            Box::new(range.rev())
        } else {
            Box::new(range)
        };
        let mut snapshot = snapshot.filter_map(|item| match item {
            Ok((k, v)) if !in_ranges(&state.cleared, k.value()) => {
                Some(Ok((k.value().to_vec(), v.value().to_vec())))
            }
            Ok(_) => None,
            Err(e) => Some(Err(redb_storage(e))),
        });
        let bounds = (Bound::Included(begin), Bound::Excluded(end));
        let overlay = state.overlay.range::<[u8], _>(bounds);
        let mut overlay: Box<dyn Iterator<Item = _>> = if reverse {
            Box::new(overlay.rev())
        } else {
            Box::new(overlay)
        };

        let mut out = Vec::new();
        let mut snap_head = snapshot.next().transpose()?;
        let mut own_head = overlay.next();
        while limit == 0 || out.len() < limit {
            let order = match (&snap_head, &own_head) {
                (None, None) => break,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some((sk, _)), Some((ok, _))) => {
                    let order = sk.as_slice().cmp(ok.as_slice());
                    if reverse {
                        order.reverse()
                    } else {
                        order
                    }
                }
            };
            match order {
                std::cmp::Ordering::Less => {
                    out.extend(snap_head.take());
                    snap_head = snapshot.next().transpose()?;
                }
                std::cmp::Ordering::Greater => {
                    if let Some((k, pending)) = own_head.take() {
                        if let Some(v) = pending.resolve(None) {
                            out.push((k.clone(), v));
                        }
                    }
                    own_head = overlay.next();
                }
                std::cmp::Ordering::Equal => {
                    let base = snap_head.take().map(|(_, v)| v);
                    if let Some((k, pending)) = own_head.take() {
                        if let Some(v) = pending.resolve(base.as_deref()) {
                            out.push((k.clone(), v));
                        }
                    }
                    snap_head = snapshot.next().transpose()?;
                    own_head = overlay.next();
                }
            }
        }
        Ok(out)
    }

    fn set(&self, key: &[u8], value: &[u8]) {
        let mut state = self.lock();
        if !state.budget.charge(&[key.len()], value.len()) {
            return;
        }
        state
            .overlay
            .insert(key.to_vec(), Pending::Value(value.to_vec()));
        state
            .mutations
            .push(Mutation::Set(key.to_vec(), value.to_vec()));
    }

    fn clear(&self, key: &[u8]) {
        let mut state = self.lock();
        // FoundationDB records a clear as one of [key, key + 0x00).
        if !state.budget.charge_clear(key.len()) {
            return;
        }
        state.overlay.insert(key.to_vec(), Pending::Cleared);
        state.mutations.push(Mutation::Clear(key.to_vec()));
    }

    fn clear_range(&self, begin: &[u8], end: &[u8]) {
        let mut state = self.lock();
        // An inverted range clears nothing and costs nothing, as on
        // FoundationDB's backend.
        if begin >= end || !state.budget.charge(&[begin.len(), end.len()], 0) {
            return;
        }
        let mut from_begin = state.overlay.split_off(begin);
        let mut from_end = from_begin.split_off(end);
        state.overlay.append(&mut from_end);
        state.cleared.push((begin.to_vec(), end.to_vec()));
        state
            .mutations
            .push(Mutation::ClearRange(begin.to_vec(), end.to_vec()));
    }

    fn atomic_add(&self, key: &[u8], delta: i64) {
        let mut state = self.lock();
        if !state.budget.charge(&[key.len()], 8) {
            return;
        }
        let cleared = in_ranges(&state.cleared, key);
        let next = match state.overlay.get(key) {
            Some(Pending::Value(v)) => Pending::Value(add_le(Some(v), delta)),
            Some(Pending::Cleared) => Pending::Value(add_le(None, delta)),
            Some(Pending::Add(d)) => Pending::Add(d.wrapping_add(delta)),
            None if cleared => Pending::Value(add_le(None, delta)),
            None => Pending::Add(delta),
        };
        state.overlay.insert(key.to_vec(), next);
        state.mutations.push(Mutation::Add(key.to_vec(), delta));
    }

    fn set_versionstamped_key(&self, prefix: &[u8], suffix: &[u8], value: &[u8]) {
        let mut state = self.lock();
        let key_len = prefix.len() + VERSIONSTAMP_BYTES + suffix.len();
        if !state.budget.charge(&[key_len], value.len()) {
            return;
        }
        // Like FoundationDB, the key is unknown until commit, so reads in this
        // transaction do not see it.
        state.mutations.push(Mutation::VersionstampedKey {
            prefix: prefix.to_vec(),
            suffix: suffix.to_vec(),
            value: value.to_vec(),
        });
    }

    /// Takes the pending writes for the committer; `None` when there is
    /// nothing to write, so read-only transactions never touch disk.
    fn take_commit(&self) -> Result<Option<CommitRequestBody>, KvError> {
        let mut state = self.lock();
        if std::mem::replace(&mut state.finished, true) {
            return Err(KvError::Finished);
        }
        // Read-only (no write even tried): FoundationDB commits it without
        // counting its reads' size, and so does this store.
        if !state.budget.wrote() {
            return Ok(None);
        }
        if let Some(e) = state.budget.error() {
            return Err(e);
        }
        // Like FoundationDB, a read-only commit succeeds whatever its age:
        // there is nothing to check, and its reads were checked when made.
        if state.mutations.is_empty() {
            return Ok(None);
        }
        self.check_age()?;
        Ok(Some(CommitRequestBody {
            read_version: self.read_version,
            started: self.started,
            reads: std::mem::take(&mut state.reads),
            mutations: std::mem::take(&mut state.mutations),
            slack: state.slack,
        }))
    }

    async fn commit(&self) -> Result<(), KvError> {
        let Some(body) = self.take_commit()? else {
            return Ok(());
        };
        let (reply, answer) = oneshot::channel();
        let commits = self.store.commits.as_ref().ok_or(KvError::Closed)?;
        commits
            .send(CommitRequest {
                body,
                submitted: Instant::now(),
                reply,
            })
            .map_err(|_| KvError::Closed)?;
        answer.await.map_err(|_| KvError::Closed)?
    }
}

impl Transaction for EmbeddedTx {
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.inner.get(key)
    }

    async fn get_range(
        &self,
        begin: &[u8],
        end: &[u8],
        limit: usize,
        reverse: bool,
    ) -> Result<KeyValues, KvError> {
        self.inner.get_range(begin, end, limit, reverse)
    }

    fn set(&self, key: &[u8], value: &[u8]) {
        self.inner.set(key, value);
    }

    fn clear(&self, key: &[u8]) {
        self.inner.clear(key);
    }

    fn clear_range(&self, begin: &[u8], end: &[u8]) {
        self.inner.clear_range(begin, end);
    }

    fn atomic_add(&self, key: &[u8], delta: i64) {
        self.inner.atomic_add(key, delta);
    }

    fn set_versionstamped_key(&self, prefix: &[u8], suffix: &[u8], value: &[u8]) {
        self.inner.set_versionstamped_key(prefix, suffix, value);
    }

    fn set_commit_slack(&self, slack: Duration) {
        self.inner.lock().slack = slack;
    }

    async fn commit(&self) -> Result<(), KvError> {
        self.inner.commit().await
    }
}

// ---------------------------------------------------------------- committer

struct CommitRequestBody {
    read_version: u64,
    started: Instant,
    reads: ConflictSet,
    mutations: Vec<Mutation>,
    slack: Duration,
}

struct CommitRequest {
    body: CommitRequestBody,
    /// When `commit` was called; with the slack, when the reply is due.
    submitted: Instant,
    reply: oneshot::Sender<Result<(), KvError>>,
}

impl CommitRequest {
    /// When the reply is due: the caller's slack (at most
    /// [`MAX_COMMIT_SLACK`]) after submission, and never so late that
    /// holding it could make the transaction too old to commit.
    fn due(&self) -> Instant {
        let wanted = self.submitted + self.body.slack.min(MAX_COMMIT_SLACK);
        let latest = self.body.started + (MAX_TRANSACTION_AGE - 2 * MAX_COMMIT_SLACK);
        wanted.min(latest.max(self.submitted))
    }
}

/// The write sets of one committed batch.
struct RecentCommit {
    version: u64,
    at: Instant,
    writes: ConflictSet,
}

/// The one thread that writes to redb. It owns the commit version and the
/// recent write sets, so conflict checks need no locks.
struct Committer {
    db: Slot,
    opener: Opener,
    /// While the file is closed after an I/O failure: when to try to open
    /// it again.
    next_reopen: Option<Instant>,
    /// Transactions that read before this version fail with a conflict:
    /// the version the file had when it was last opened again (see
    /// [`Committer::reopen`]).
    read_floor: u64,
    requests: mpsc::Receiver<CommitRequest>,
    version: u64,
    recent: VecDeque<RecentCommit>,
    disk_commits: Arc<AtomicU64>,
    /// How fast other callers' commits arrive while a batch is written or
    /// held.
    arrivals: Arrivals,
}

/// The rate at which commits arrive from callers other than those waiting on
/// the batch in hand: counted only while a batch is being written (from the
/// write's start to its fsync's end, before any reply goes out) or held, when
/// its own callers cannot add to it. So a lone caller waiting on its own
/// commit does not make the committer hold a batch for company that cannot
/// come. After a burst of concurrency it may be held a few times, each for at
/// most two of the burst's mean gaps: a hold that finds nobody doubles the
/// expected gap, and a second without any observation forgets the estimate.
///
/// Writes can be too short to see anyone: with a fast disk and callers that
/// arrive together (woken by the same timer tick or network poll), every
/// arrival lands in the batch being drained and none during its write, so no
/// estimate would ever form and slack would never be used. With no estimate,
/// a batch whose every commit has slack is therefore held once in a while
/// ([`PROBE_EVERY`]) for about one write's time (from [`MIN_HOLD`] to
/// [`MAX_PROBE`]) to look for company: within the slack its callers
/// granted, and at most a fraction of a lone caller's time.
#[derive(Default)]
struct Arrivals {
    /// The last write's start and end.
    write: Option<(Instant, Instant)>,
    /// How long the last write took.
    last_write: Duration,
    /// When a batch was last held with no estimate.
    probed: Option<Instant>,
    /// Commits seen and seconds watched, older windows decayed by
    /// [`ARRIVALS_HALF_LIFE`] of watched time.
    arrived: f64,
    watched: f64,
    /// When the last observation ended.
    last: Option<Instant>,
}

/// How much watched time halves the weight of what was seen before it.
const ARRIVALS_HALF_LIFE: Duration = Duration::from_millis(20);

/// An estimate older than this (no write or hold since) is forgotten.
const ARRIVALS_STALE: Duration = Duration::from_secs(1);

/// With no estimate, a batch with slack is held to look for company at
/// most this often...
const PROBE_EVERY: Duration = Duration::from_millis(20);

/// ...and for at most this long (a write's time, on a slow disk whose
/// writes see arrivals anyway).
const MAX_PROBE: Duration = Duration::from_millis(5);

/// The shortest hold: the granularity of the runtime timers that wake
/// callers together. Arrivals come in bursts, so the mean gap within one
/// (all an estimate may have seen) can be far shorter than the time to the
/// next.
const MIN_HOLD: Duration = Duration::from_millis(1);

/// The most slack a commit is granted, whatever it asks for: holding a batch
/// must never come near [`MAX_TRANSACTION_AGE`].
pub const MAX_COMMIT_SLACK: Duration = Duration::from_millis(500);

impl Arrivals {
    fn observe(&mut self, arrived: usize, over: Duration) {
        let t = over.as_secs_f64();
        let keep = 0.5f64.powf(t / ARRIVALS_HALF_LIFE.as_secs_f64());
        self.arrived = self.arrived * keep + arrived as f64;
        self.watched = self.watched * keep + t;
        self.last = Some(Instant::now());
    }

    /// Learns from the batch taken after the last write: how many of its
    /// commits were submitted while that write ran.
    fn after_write(&mut self, batch: &[CommitRequest]) {
        let Some((start, end)) = self.write.take() else {
            return;
        };
        self.last_write = end.saturating_duration_since(start);
        let during = batch
            .iter()
            .filter(|r| r.submitted >= start && r.submitted <= end)
            .count();
        self.observe(during, end.saturating_duration_since(start));
    }

    /// The mean time between arrivals, when at least one arrival's worth was
    /// seen recently.
    fn mean_gap(&self) -> Option<Duration> {
        let recent = self.last.is_some_and(|at| at.elapsed() < ARRIVALS_STALE);
        if !recent || self.arrived < 1.0 {
            return None;
        }
        Duration::try_from_secs_f64(self.watched / self.arrived).ok()
    }

    /// How long to hold a batch with no estimate to look for company: about
    /// one write's time; none when that was done less than [`PROBE_EVERY`]
    /// ago.
    fn probe(&mut self, now: Instant) -> Option<Duration> {
        if self
            .probed
            .is_some_and(|at| now.saturating_duration_since(at) < PROBE_EVERY)
        {
            return None;
        }
        self.probed = Some(now);
        Some(self.last_write.clamp(MIN_HOLD, MAX_PROBE))
    }
}

impl Committer {
    fn run(mut self) {
        loop {
            if let Some(at) = self.next_reopen {
                // Closed after an I/O failure: every commit fails at once
                // (as a read does) until the file opens again.
                match self
                    .requests
                    .recv_timeout(at.saturating_duration_since(Instant::now()))
                {
                    Ok(request) => {
                        let _ = request.reply.send(Err(storage(Unavailable)));
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.reopen(Instant::now());
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
                continue;
            }
            let Ok(first) = self.requests.recv() else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match self.requests.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            self.arrivals.after_write(&batch);
            self.gather(&mut batch);
            self.commit_batch(batch);
        }
    }

    /// Holds a batch whose every commit has slack (its caller has other work
    /// in flight) for more commits to share its fsync, until the earliest is
    /// due. Holds only while commits keep coming about as often as they have
    /// from other callers (see [`Arrivals`]), so a lone caller, or callers
    /// that are all in the batch already, are not held for company that
    /// cannot come; a commit without slack ends the hold at once.
    fn gather(&mut self, batch: &mut Vec<CommitRequest>) {
        let Some(mut due) = batch.iter().map(CommitRequest::due).min() else {
            return;
        };
        let started = Instant::now();
        let mut arrived = 0;
        let mut waited = false;
        while batch.len() < MAX_BATCH {
            let now = Instant::now();
            let left = due.saturating_duration_since(now);
            // Two mean gaps without an arrival: the callers are all waiting
            // on this batch, or gone.
            let hold = match self.arrivals.mean_gap() {
                Some(gap) if gap <= left => gap.saturating_mul(2).max(MIN_HOLD),
                Some(_) => break,
                // One probe per hold, and only with slack to spare (a
                // probe used up on a batch that cannot wait would find
                // nothing): what it finds forms the estimate that later
                // batches are held by.
                None if !waited && left > MIN_HOLD => match self.arrivals.probe(now) {
                    Some(hold) => hold,
                    None => break,
                },
                None => break,
            };
            waited = true;
            match self.requests.recv_timeout(left.min(hold)) {
                Ok(request) => {
                    arrived += 1;
                    due = due.min(request.due());
                    batch.push(request);
                }
                Err(_) => break,
            }
        }
        if !waited {
            return;
        }
        self.arrivals.observe(arrived, started.elapsed());
        if arrived == 0 {
            // Nobody came: whoever made commits frequent may be gone. Each
            // such hold doubles the expected gap, so a lone caller stops
            // being held after a few.
            self.arrivals.arrived /= 2.0;
        }
    }

    fn commit_batch(&mut self, batch: Vec<CommitRequest>) {
        self.forget_old_commits();
        let version = self.version + 1;
        // One union for the batch keeps admission linear in the batch size;
        // the log needs only the union too, as the batch shares one version.
        let mut batch_writes = ConflictSet::default();
        let mut accepted = Vec::with_capacity(batch.len());
        for request in batch {
            if let Err(e) = self.admit(&request.body, &batch_writes) {
                let _ = request.reply.send(Err(e));
                continue;
            }
            let stamp = versionstamp(version, accepted.len());
            batch_writes.absorb(write_set(&request.body.mutations, &stamp));
            accepted.push(request);
        }
        if accepted.is_empty() {
            return;
        }
        let started = Instant::now();
        let written = self.write_batch(version, &accepted);
        // Before any reply: a caller that resubmits at once must not count
        // as another caller arriving during the write.
        self.arrivals.write = Some((started, Instant::now()));
        if let Err(e) = &written {
            tracing::error!(error = %e, version, "index batch commit failed");
            // redb refuses every write on a handle after a failed commit
            // (`PreviousIo` after I/O, a discarded allocator state after
            // others): open the file again.
            if self.reopen(Instant::now() + REOPEN_PATIENCE) >= Some(version) {
                // In the file as read back, but its write failed: it may
                // not be on the disk. Reported failed all the same (never
                // acknowledged as durable), its outcome unknown.
                tracing::error!(
                    version,
                    "the failed index batch is in the reopened file; its callers were told it \
                     failed (its outcome is unknown)"
                );
            }
        }
        match written {
            Ok(()) => {
                self.version = version;
                self.disk_commits.fetch_add(1, Ordering::Relaxed);
                tracing::trace!(version, commits = accepted.len(), "index batch committed");
                self.recent.push_back(RecentCommit {
                    version,
                    at: Instant::now(),
                    writes: batch_writes,
                });
                for request in accepted {
                    let _ = request.reply.send(Ok(()));
                }
            }
            Err(e) => {
                let e = Arc::new(e);
                for request in accepted {
                    let _ = request
                        .reply
                        .send(Err(KvError::Storage(Box::new(e.clone()))));
                }
            }
        }
    }

    fn forget_old_commits(&mut self) {
        while self
            .recent
            .front()
            .is_some_and(|c| c.at.elapsed() > CONFLICT_WINDOW)
        {
            self.recent.pop_front();
        }
    }

    /// Whether `body` may commit after everything already committed and the
    /// commits accepted earlier in this batch (which commit after its read version).
    fn admit(&self, body: &CommitRequestBody, batch_writes: &ConflictSet) -> Result<(), KvError> {
        if body.started.elapsed() > MAX_TRANSACTION_AGE {
            return Err(KvError::TooOld);
        }
        if body.read_version < self.read_floor {
            return Err(KvError::Conflict);
        }
        let committed_since = self
            .recent
            .iter()
            .filter(|c| c.version > body.read_version)
            .map(|c| &c.writes);
        let mut writers = committed_since.chain(std::iter::once(batch_writes));
        if writers.any(|writes| writes.intersects(&body.reads)) {
            return Err(KvError::Conflict);
        }
        Ok(())
    }

    /// Closes the database after an I/O failure and opens it again,
    /// trying until `until` (once when that has passed); while it is closed,
    /// reads and commits fail at once. Returns the version of the last batch
    /// in the file when it opened: the version of a batch whose write failed
    /// says that it landed. Left closed, it is tried again every
    /// [`REOPEN_EVERY`] from [`Committer::run`].
    ///
    /// Keeps the commit versions sound whatever the file holds: the next
    /// batch takes a version past the file's (a failed batch found in it
    /// keeps its own, and its versionstamps are never reused), and since
    /// such a batch's writes are in no conflict set, every transaction
    /// that read before the reopen fails with [`KvError::Conflict`] and
    /// starts over.
    fn reopen(&mut self, until: Instant) -> Option<u64> {
        // Readers that began on the old handle fail when they next touch
        // the file; the handle closes once the last clone (one a `begin`
        // is using now) is dropped, and the file cannot open before.
        let old = self.db.write().unwrap_or_else(|e| e.into_inner()).take();
        drop(old);
        loop {
            let opened = (self.opener)()
                .map_err(redb::Error::from)
                .and_then(|db| Ok((prepare_tables(&db)?, db)));
            match opened {
                Ok((durable, db)) => {
                    self.version = self.version.max(durable);
                    self.read_floor = durable;
                    *self.db.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(db));
                    self.next_reopen = None;
                    tracing::warn!(durable, "index file reopened after an I/O failure");
                    return Some(durable);
                }
                Err(e) if Instant::now() >= until => {
                    tracing::error!(error = %e, "the index file cannot be opened again yet");
                    self.next_reopen = Some(Instant::now() + REOPEN_EVERY);
                    return None;
                }
                Err(_) => std::thread::sleep(REOPEN_EVERY / 5),
            }
        }
    }

    fn write_batch(&self, version: u64, accepted: &[CommitRequest]) -> Result<(), redb::Error> {
        let db = self
            .db
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| redb::Error::Io(std::io::Error::other(Unavailable)))?;
        let write = db.begin_write()?;
        {
            let mut data = write.open_table(DATA)?;
            for (order, request) in accepted.iter().enumerate() {
                let stamp = versionstamp(version, order);
                for mutation in &request.body.mutations {
                    apply(&mut data, mutation, &stamp)?;
                }
            }
            let mut meta = write.open_table(META)?;
            meta.insert(VERSION_KEY, version)?;
        }
        write.commit()?;
        Ok(())
    }
}

fn versionstamp(version: u64, order: usize) -> [u8; VERSIONSTAMP_BYTES] {
    let mut stamp = [0u8; VERSIONSTAMP_BYTES];
    stamp[..8].copy_from_slice(&version.to_be_bytes());
    // `order` < MAX_BATCH <= u16::MAX + 1, so the cast cannot truncate.
    stamp[8..].copy_from_slice(&(order as u16).to_be_bytes());
    stamp
}

fn stamped_key(prefix: &[u8], stamp: &[u8], suffix: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + stamp.len() + suffix.len());
    key.extend_from_slice(prefix);
    key.extend_from_slice(stamp);
    key.extend_from_slice(suffix);
    key
}

fn write_set(mutations: &[Mutation], stamp: &[u8]) -> ConflictSet {
    let mut writes = ConflictSet::default();
    for mutation in mutations {
        match mutation {
            Mutation::Set(k, _) | Mutation::Clear(k) | Mutation::Add(k, _) => {
                writes.keys.insert(k.clone());
            }
            Mutation::ClearRange(b, e) => writes.add_range(b, e),
            Mutation::VersionstampedKey { prefix, suffix, .. } => {
                writes.keys.insert(stamped_key(prefix, stamp, suffix));
            }
        }
    }
    writes
}

fn apply(
    data: &mut redb::Table<&[u8], &[u8]>,
    mutation: &Mutation,
    stamp: &[u8],
) -> Result<(), redb::Error> {
    match mutation {
        Mutation::Set(k, v) => {
            data.insert(k.as_slice(), v.as_slice())?;
        }
        Mutation::Clear(k) => {
            data.remove(k.as_slice())?;
        }
        Mutation::ClearRange(b, e) => {
            data.retain_in::<&[u8], _>(b.as_slice()..e.as_slice(), |_, _| false)?;
        }
        Mutation::Add(k, delta) => {
            let current = data.get(k.as_slice())?.map(|v| v.value().to_vec());
            let sum = add_le(current.as_deref(), *delta);
            data.insert(k.as_slice(), sum.as_slice())?;
        }
        Mutation::VersionstampedKey {
            prefix,
            suffix,
            value,
        } => {
            let key = stamped_key(prefix, stamp, suffix);
            data.insert(key.as_slice(), value.as_slice())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(keys: &[&[u8]], ranges: &[(&[u8], &[u8])]) -> ConflictSet {
        let mut s = ConflictSet::default();
        for k in keys {
            s.keys.insert(k.to_vec());
        }
        for (b, e) in ranges {
            s.add_range(b, e);
        }
        s
    }

    #[test]
    fn conflict_sets_intersect_on_keys_and_ranges() {
        assert!(set(&[b"a"], &[]).intersects(&set(&[b"a"], &[])));
        assert!(!set(&[b"a"], &[]).intersects(&set(&[b"b"], &[])));
        assert!(set(&[b"b"], &[]).intersects(&set(&[], &[(b"a", b"c")])));
        assert!(!set(&[b"c"], &[]).intersects(&set(&[], &[(b"a", b"c")])));
        assert!(set(&[], &[(b"a", b"c")]).intersects(&set(&[], &[(b"b", b"d")])));
        assert!(!set(&[], &[(b"a", b"b")]).intersects(&set(&[], &[(b"b", b"d")])));
    }

    #[test]
    fn the_arrival_estimate_survives_long_quiet_windows() {
        let mut a = Arrivals::default();
        assert_eq!(a.mean_gap(), None, "nothing seen yet");
        a.observe(10, Duration::from_millis(1));
        let gap = a.mean_gap().expect("ten arrivals in a millisecond");
        assert!(gap <= Duration::from_micros(100), "{gap:?}");
        // A long window with nobody decays what was seen to nothing: no
        // estimate, and no overflow or panic on the way.
        a.observe(0, Duration::from_secs(2));
        assert_eq!(a.mean_gap(), None);
        a.observe(0, Duration::from_secs(3600));
        assert_eq!(a.mean_gap(), None);
        a.observe(1, Duration::ZERO);
        assert!(a.mean_gap().is_some_and(|g| g < Duration::from_secs(3601)));
    }

    #[test]
    fn with_no_estimate_a_hold_is_tried_now_and_then_for_about_a_write() {
        let mut a = Arrivals::default();
        let now = Instant::now();
        assert_eq!(a.probe(now), Some(MIN_HOLD), "no write seen yet");
        assert_eq!(a.probe(now + PROBE_EVERY / 2), None, "too soon");
        a.write = Some((now, now + 3 * MIN_HOLD));
        a.after_write(&[]);
        assert_eq!(
            a.probe(now + PROBE_EVERY),
            Some(3 * MIN_HOLD),
            "one write's time"
        );
        a.write = Some((now, now + Duration::from_secs(1)));
        a.after_write(&[]);
        assert_eq!(a.probe(now + 2 * PROBE_EVERY), Some(MAX_PROBE), "at most");
    }

    /// A file whose writes fail while `full` is set, as on a full disk,
    /// and whose fsyncs fail while `unsynced` is (delayed allocation
    /// finding no room at writeback, or a failing disk).
    #[derive(Debug)]
    struct FillingDisk {
        file: redb::backends::FileBackend,
        full: Arc<std::sync::atomic::AtomicBool>,
        unsynced: Arc<std::sync::atomic::AtomicBool>,
    }

    impl FillingDisk {
        fn refuse(&self) -> std::io::Result<()> {
            match self.full.load(Ordering::SeqCst) {
                true => Err(std::io::Error::from_raw_os_error(28)), // ENOSPC
                false => Ok(()),
            }
        }
    }

    impl redb::StorageBackend for FillingDisk {
        fn len(&self) -> std::io::Result<u64> {
            self.file.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            self.file.read(offset, out)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.refuse()?;
            self.file.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            self.refuse()?;
            if self.unsynced.load(Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(5)); // EIO
            }
            self.file.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.refuse()?;
            self.file.write(offset, data)
        }
        fn close(&self) -> std::io::Result<()> {
            self.file.close()
        }
        fn try_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, redb::BackendError> {
            self.file.try_lock_range(s, e)
        }
        fn try_lock_shared_range(
            &self,
            s: Bound<u64>,
            e: Bound<u64>,
        ) -> Result<bool, redb::BackendError> {
            self.file.try_lock_shared_range(s, e)
        }
        fn lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), redb::BackendError> {
            self.file.lock_range(s, e)
        }
        fn lock_shared_range(
            &self,
            s: Bound<u64>,
            e: Bound<u64>,
        ) -> Result<(), redb::BackendError> {
            self.file.lock_shared_range(s, e)
        }
        fn unlock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), redb::BackendError> {
            self.file.unlock_range(s, e)
        }
        fn query_lock_range(
            &self,
            s: Bound<u64>,
            e: Bound<u64>,
        ) -> Result<bool, redb::BackendError> {
            self.file.query_lock_range(s, e)
        }
    }

    async fn put(store: &EmbeddedStore, key: &[u8]) -> Result<(), KvError> {
        let tx = store.begin()?;
        tx.set(key, b"v");
        tx.commit().await
    }

    async fn has(store: &EmbeddedStore, key: &[u8]) -> Result<bool, KvError> {
        Ok(store.begin()?.get(key).await?.is_some())
    }

    /// A disk that fills fails the commits made meanwhile, with nothing of
    /// them written; once it has room again the store commits and reads
    /// without a restart (redb refuses everything on a handle after an I/O
    /// failure, so the file must be opened again), and what was committed
    /// before is all there.
    type Flag = Arc<std::sync::atomic::AtomicBool>;

    /// A store on a [`FillingDisk`] at `path`, and its two switches.
    fn store_on_filling_disk(path: &Path) -> (EmbeddedStore, Flag, Flag) {
        let (full, unsynced) = (Flag::default(), Flag::default());
        let opener = {
            let (path, full, unsynced) = (path.to_path_buf(), full.clone(), unsynced.clone());
            Box::new(move || {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)?;
                let file = redb::backends::FileBackend::new(file)?;
                let (full, unsynced) = (full.clone(), unsynced.clone());
                redb::Builder::new().create_with_backend(FillingDisk {
                    file,
                    full,
                    unsynced,
                })
            })
        };
        let store = EmbeddedStore::open_with(path, opener).expect("the store opens");
        (store, full, unsynced)
    }

    /// A batch whose fsync failed is reported failed, whatever the
    /// reopened file shows of it; its version is never used again (the
    /// next batch's versionstamps sort after it), and a transaction that
    /// read before the reopen fails with a conflict instead of committing
    /// over writes no conflict set holds.
    #[tokio::test]
    async fn a_batch_whose_fsync_failed_is_never_acknowledged_nor_its_version_reused() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (store, _full, unsynced) = store_on_filling_disk(&dir.path().join("index.redb"));
        let stamped = |suffix: &'static [u8]| {
            let store = store.clone();
            async move {
                let tx = store.begin()?;
                tx.set_versionstamped_key(b"vs", suffix, suffix);
                tx.commit().await
            }
        };
        stamped(b"1").await.expect("a commit");
        let old = store.begin().expect("a transaction");
        old.get(b"vs").await.expect("a read before the failure");
        unsynced.store(true, Ordering::SeqCst);
        let failed = stamped(b"2").await;
        assert!(matches!(failed, Err(KvError::Storage(_))), "{failed:?}");
        unsynced.store(false, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        while stamped(b"3").await.is_err() {
            assert!(Instant::now() < deadline, "the store did not recover");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let rows = store
            .begin()
            .expect("a transaction")
            .get_range(b"vs", b"vt", 0, false)
            .await
            .expect("a read");
        let stamps: Vec<&[u8]> = rows.iter().map(|(k, _)| &k[2..12]).collect();
        let values: Vec<&[u8]> = rows.iter().map(|(_, v)| v.as_slice()).collect();
        // "2" may be in the file or not; either way no stamp is reused.
        assert!(stamps.windows(2).all(|w| w[0] < w[1]), "{rows:?}");
        assert_eq!(values.first(), Some(&&b"1"[..]));
        assert_eq!(values.last(), Some(&&b"3"[..]));
        old.set(b"late", b"v");
        let late = old.commit().await;
        assert!(matches!(late, Err(KvError::Conflict)), "{late:?}");
    }

    #[tokio::test]
    async fn the_store_recovers_when_a_full_disk_has_room_again() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("index.redb");
        let (store, full, _) = store_on_filling_disk(&path);
        put(&store, b"before")
            .await
            .expect("a commit on a disk with room");
        full.store(true, Ordering::SeqCst);
        let failed = put(&store, b"while-full").await;
        assert!(matches!(failed, Err(KvError::Storage(_))), "{failed:?}");
        // Still full: refused at once, reads included, not hung.
        let started = Instant::now();
        assert!(put(&store, b"still-full").await.is_err());
        assert!(has(&store, b"before").await.is_err());
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        full.store(false, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        while put(&store, b"after").await.is_err() {
            assert!(Instant::now() < deadline, "the store did not recover");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(has(&store, b"before").await.expect("a read after recovery"));
        assert!(has(&store, b"after").await.expect("a read after recovery"));
        assert!(!has(&store, b"while-full").await.unwrap_or(true));
        assert!(!has(&store, b"still-full").await.unwrap_or(true));
        // And the file opens as it was left.
        drop(store);
        let store = EmbeddedStore::open(&path).expect("the store opens again");
        assert!(has(&store, b"before").await.expect("a read"));
        assert!(has(&store, b"after").await.expect("a read"));
    }

    #[test]
    fn versionstamps_order_by_version_then_batch_position() {
        assert!(versionstamp(1, 5) < versionstamp(2, 0));
        assert!(versionstamp(2, 0) < versionstamp(2, 1));
        assert!(versionstamp(1, 256) > versionstamp(1, 255));
    }
}
