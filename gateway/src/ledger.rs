//! The ledger sequencer: integrates queued statements into the C2SP
//! transparency log, publishes tiles and signed checkpoints, and builds
//! receipts and proofs.
//!
//! One integrator at a time holds a lease in the index (`indexer::ledger`).
//! Each round, in this order:
//! 1. take a batch of queued statements (many entries, one signature);
//! 2. compute their leaves and the new tree hashes, and in one transaction
//!    check the fencing token and that the tree has not moved, store the hashes
//!    and the openings, dequeue, and move the tree to (size, root);
//! 3. write the new tiles and entry bundles through `object_store`, durably
//!    (the local store is fsynced: it does not do so itself);
//! 4. sign the checkpoint, store it in the index unless a larger one is there,
//!    and publish it as `checkpoint`.
//!
//! Up to three batches are in flight at once: while batch N's step-2
//! transaction commits, batch N+1 is read (from the queue key after N's last)
//! and hashed on top of N's tree hashes kept in memory, and batch N-1 is
//! published (steps 3 and 4, by the task that committed it). N+1's
//! transaction starts only after N's committed, and checks the tree size it
//! extends, so a batch read ahead of a failed commit is never integrated; and
//! only once N-1's publication is done, so a slow publication holds
//! integration back rather than letting unpublished batches pile up.
//! Publications go out strictly in order (a batch's publication starts only
//! after its commit and the previous publication); a failed publication is
//! redone from the index by the next round. The lease is renewed inside step
//! 2's transaction, so holding it costs no transaction of its own while
//! batches keep coming (and a stuck publication, which stops commits, lets
//! the lease lapse to another gateway).
//!
//! A crash anywhere leaves the index ahead of the published checkpoint at
//! worst; the next round re-publishes from the index, which holds every hash,
//! so tiles and checkpoints are always rebuilt for a tree that was committed
//! once: two checkpoints can never contradict each other.

use crate::api::{Gateway, Store};
use crate::error::ApiError;
use indexer::ledger::{self as lx, IntegrateError, LeafRecord, TreeState};
use indexer::schema;
use object_store::{local::LocalFileSystem, path::Path as StorePath, ObjectStore, PutPayload};
use protocol::ledger::{self as pl, Kind, Receipt, TreeHash, TILE_HEIGHT};
use protocol::EvidenceId;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tlog_tiles::{HashReader, Tile};
use tokio::sync::{oneshot, watch, Notify};

/// Statements integrated per round at most (one checkpoint signature each).
pub const BATCH_ENTRIES: usize = 8192;
/// Statement bytes per integration transaction at most (FoundationDB: 10 MB).
const BATCH_BYTES: usize = 4 << 20;
/// The integrator lease.
const LEASE_MS: u64 = 10_000;

/// The ledger's configuration in the gateway's config file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    /// The log's origin line (C2SP tlog-checkpoint), also the key name.
    pub origin: String,
    /// The log's signer key (C2SP signed-note `PRIVATE+KEY+...`), owner-only.
    pub signer_key: PathBuf,
    /// Where tiles and checkpoints are published: a local directory...
    pub tiles_dir: PathBuf,
    /// ...or, when set, an S3-compatible bucket (`s3://bucket/prefix`).
    /// Credentials and region come from the usual `AWS_*` environment
    /// variables; `tiles_options` adds object_store S3 settings (for example
    /// `aws_endpoint`, `aws_allow_http`), never secrets in this file.
    #[serde(default)]
    pub tiles_url: Option<String>,
    #[serde(default)]
    pub tiles_options: std::collections::BTreeMap<String, String>,
    /// The private openings archive: every leaf's salt and statement, and the
    /// manifest of the evidence it names, one file per tile, written before
    /// the checkpoint that covers them. `custodia recover-index` rebuilds the
    /// index from it, the tiles and the nodes. It opens every commitment (sealed
    /// cases included), so it is never served: keep it private, ideally off
    /// this machine. A local directory (default: `openings` beside
    /// `tiles_dir`)...
    #[serde(default)]
    pub openings_dir: Option<PathBuf>,
    /// ...or an S3-compatible bucket (`s3://bucket/prefix`, with `tiles_options`).
    #[serde(default)]
    pub openings_url: Option<String>,
    /// How long `POST /v1/evidence` waits for a checkpoint covering the filing
    /// before answering without a receipt (it can be fetched later).
    #[serde(default = "default_receipt_wait")]
    pub receipt_wait_ms: u64,
    /// While nobody waits for a receipt, a round of a few statements (2 to
    /// 63) makes the next start no sooner than this after it started, so that
    /// statements queued meanwhile (reads' `accessed` records, under load)
    /// share one round: a round's fixed costs (an index commit, tiles and
    /// openings written durably, a signed checkpoint) are then paid per batch,
    /// not per few statements. A round of one statement (nobody to batch
    /// with) or of 64 or more (costs already spread) is followed at once, and
    /// so is any round while a filing waits for its receipt: a waiting client
    /// sends nothing more until it is answered, so waiting would only slow it.
    /// At most 1,000; 0 never waits.
    #[serde(default = "default_round_interval")]
    pub round_interval_ms: u64,
    /// C2SP tlog-witnesses to send checkpoints to, off the filing path.
    #[serde(default)]
    pub witnesses: Vec<WitnessEntry>,
    /// How often the newest checkpoint goes to the witnesses.
    #[serde(default = "default_witness_interval")]
    pub witness_interval_ms: u64,
    /// How often the openings archive is checked to cover every leaf from
    /// the first to the newest signed checkpoint without a gap (by its
    /// files' names: nothing is read, but every name is listed, so not
    /// often), by the gateway integrating the ledger: `recover-index` can
    /// rebuild an index only as far as it does. Default a day; 0 never
    /// checks.
    #[serde(default = "default_archive_check_interval")]
    pub archive_check_interval_ms: u64,
    /// Independent time: RFC 3161 tokens over checkpoints.
    #[serde(default)]
    pub tsa: Option<TsaConfig>,
}

impl LedgerConfig {
    /// The openings archive's folder when it is kept on this machine (no
    /// `openings_url`): `openings_dir`, or `openings` beside the tiles.
    pub fn local_openings_dir(&self) -> PathBuf {
        self.openings_dir.clone().unwrap_or_else(|| {
            self.tiles_dir
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join("openings")
        })
    }
}

/// Where RFC 3161 tokens come from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TsaConfig {
    /// An external TSA (RFC 3161 over HTTP, `application/timestamp-query`).
    /// Without it the development TSA's key below signs in process.
    #[serde(default)]
    pub url: Option<String>,
    /// The TSA certificate (PEM) every token is checked against before it is
    /// stored; verifiers use the same file (`DATA_DIR/tsa.pem` for `up`).
    pub cert: PathBuf,
    /// The development TSA's key (`init` makes it): `up` runs its own TSA,
    /// also served to others at `POST /tsa`. For development only.
    #[serde(default)]
    pub dev_key: Option<PathBuf>,
    /// How often the newest checkpoint is time-stamped.
    #[serde(default = "default_tsa_interval")]
    pub interval_ms: u64,
}

fn default_tsa_interval() -> u64 {
    1_000
}

/// The loaded TSA settings.
struct Tsa {
    url: Option<String>,
    cert_pem: String,
    dev_key_pem: Option<String>,
    /// The certificate is a development TSA's (see
    /// `protocol::tsa::is_development_cert`): its times confirm nothing.
    development: bool,
    interval: Duration,
}

/// A witness: where it listens and its `cosignature/v1` verifier key.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessEntry {
    /// Base URL; `add-checkpoint` is posted under it (plain HTTP).
    pub url: String,
    pub key: String,
}

fn default_witness_interval() -> u64 {
    2_000
}

pub fn default_archive_check_interval() -> u64 {
    24 * 3_600_000
}

fn default_receipt_wait() -> u64 {
    10_000
}

fn default_round_interval() -> u64 {
    25
}

/// Rounds of at least this many statements are followed at once: their
/// fixed costs are already spread (see [`LedgerConfig::round_interval_ms`]).
const PACED_BELOW: usize = 64;

/// Spaces the integration rounds (see [`LedgerConfig::round_interval_ms`]).
#[derive(Debug)]
struct RoundPacer {
    interval: Duration,
    /// When the last round that found statements started, and how many.
    last: std::sync::Mutex<Option<(tokio::time::Instant, usize)>>,
    /// Callers waiting for a receipt, and a wake-up for a paced wait when
    /// one starts waiting.
    waiters: std::sync::atomic::AtomicUsize,
    waiter_came: Notify,
}

/// A caller waiting for a receipt (see [`RoundPacer::waiting`]).
struct Waiting<'a>(&'a RoundPacer);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0
            .waiters
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl RoundPacer {
    fn new(interval: Duration) -> Self {
        RoundPacer {
            interval,
            last: std::sync::Mutex::new(None),
            waiters: std::sync::atomic::AtomicUsize::new(0),
            waiter_came: Notify::new(),
        }
    }

    /// Counts a caller waiting for a receipt until the guard drops: while
    /// any waits, rounds are not paced, and a paced wait under way ends.
    fn waiting(&self) -> Waiting<'_> {
        self.waiters
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.waiter_came.notify_waiters();
        Waiting(self)
    }

    /// The earliest the next round may start, asked at `now`.
    fn next_start(&self, now: tokio::time::Instant) -> tokio::time::Instant {
        if self.waiters.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            return now;
        }
        let last = *self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match last {
            Some((started, n)) if (2..PACED_BELOW).contains(&n) => {
                (started + self.interval).max(now)
            }
            _ => now,
        }
    }

    /// Waits until the next round may start, or until a caller starts
    /// waiting for a receipt; returns the round's start.
    async fn pace(&self) -> tokio::time::Instant {
        // Registered before the check, so a waiter counted after it still
        // wakes this wait.
        let came = self.waiter_came.notified();
        tokio::pin!(came);
        came.as_mut().enable();
        let until = self.next_start(tokio::time::Instant::now());
        tokio::select! {
            _ = tokio::time::sleep_until(until) => {}
            _ = came => {}
        }
        tokio::time::Instant::now()
    }

    /// Notes a round that started at `started` and found `statements`
    /// (none: a look at an empty queue, which changes nothing).
    fn found(&self, started: tokio::time::Instant, statements: usize) {
        if statements > 0 {
            *self
                .last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((started, statements));
        }
    }
}

/// Why the ledger could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger signer key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error(
        "ledger origin {0:?}: an origin is one word without '+' (a name like \
         example.org/custodia), the first line of every checkpoint and its key's name; no \
         checkpoint can be signed under this one: give the log a new origin with `custodia \
         ledger rotate-key --origin NAME`"
    )]
    Origin(String),
    #[error("ledger tiles store: {0}")]
    Store(#[from] object_store::Error),
    #[error("ledger I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Integrate(#[from] IntegrateError),
    #[error("ledger index: {0}")]
    Index(#[from] indexer::schema::SchemaError),
    #[error("ledger: {0}")]
    Format(#[from] pl::LedgerError),
    #[error("tree hashes missing from the index: {0}")]
    Tree(String),
    /// The published checkpoint is not a tree the index holds: writing
    /// tiles or signing now would fork the log.
    #[error(
        "the published log is not this index's tree ({0}); refusing to write tiles or sign: \
         was the index restored from an older backup, or does another index publish here?"
    )]
    Forked(String),
}

/// The running ledger.
pub struct Ledger {
    pub origin: String,
    /// The signer key; never logged (see the Debug impl).
    signer_key: String,
    /// The verifier key (`<origin>+<id>+<key>`), public.
    pub verifier_key: String,
    tiles: Arc<dyn ObjectStore>,
    /// The local directory of `tiles`, which needs syncing; `None` for a
    /// bucket, where a completed PUT is durable.
    tiles_dir: Option<PathBuf>,
    /// The private openings archive (see [`LedgerConfig::openings_dir`]).
    openings: Arc<dyn ObjectStore>,
    openings_dir: Option<PathBuf>,
    wake: Notify,
    published: watch::Sender<u64>,
    /// The size of the checkpoint this process last wrote to the published
    /// `checkpoint` file (0: none yet).
    checkpoint_file: std::sync::atomic::AtomicU64,
    /// Whether the published checkpoint was found to be a tree the index
    /// holds (see [`check_published_tree`]).
    published_checked: std::sync::atomic::AtomicBool,
    /// A conditional write of the published checkpoint has succeeded on
    /// the tiles bucket: it takes them, so one failing later is a failure
    /// of the moment, never a reason to write unconditionally.
    conditional_puts: std::sync::atomic::AtomicBool,
    owner: u128,
    /// The integrator lease this process last stored: fencing token and
    /// when (monotonic) it was taken or renewed. Each integration renews it in its own
    /// transaction, so a round only takes the lease in a transaction of its
    /// own when less than half of it is left; every integration still checks
    /// the fence, so a stale belief here costs a retry, never a fork.
    lease: std::sync::Mutex<Option<(u64, std::time::Instant)>>,
    /// Another gateway's lease as last found, and since when it has been
    /// found unchanged (see `lx::acquire_lease_tx`'s `stale`).
    watched: std::sync::Mutex<Option<(lx::LeaseRecord, std::time::Instant)>>,
    pub receipt_wait: Duration,
    pacer: RoundPacer,
    witnesses: Vec<WitnessEntry>,
    witness_interval: Duration,
    archive_check_interval: Duration,
    tsa: Option<Tsa>,
    /// The last few notes [`Ledger::witness_weight`] weighed (by their
    /// BLAKE3), and their weights: a page of receipts weighs the same two
    /// notes for each, a signature check per witness each time otherwise.
    weighed: std::sync::Mutex<Vec<([u8; 32], usize)>>,
}

/// A path in the tiles or openings store from a name this module made (or
/// listed).
fn store_path(name: &str) -> Result<StorePath, LedgerError> {
    StorePath::parse(name).map_err(|e| LedgerError::Tree(e.to_string()))
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("origin", &self.origin)
            .field("verifier_key", &self.verifier_key)
            .finish_non_exhaustive()
    }
}

impl Ledger {
    /// Opens the ledger. `identity` names this gateway stably across restarts
    /// (a restarted gateway takes its own lease back at once instead of
    /// waiting for it to expire; safety never rests on the lease alone: every
    /// integration also checks the tree it extends).
    pub fn open(config: &LedgerConfig, identity: &str) -> Result<Self, LedgerError> {
        let key_err = |reason: String| LedgerError::Key {
            path: config.signer_key.clone(),
            reason,
        };
        // Checked here, not at the first checkpoint: signing under such a
        // name fails at every round, and every filing would wait out its
        // receipt and get none.
        if !pl::origin_is_valid(&config.origin) {
            return Err(LedgerError::Origin(config.origin.clone()));
        }
        let signer_key = std::fs::read_to_string(&config.signer_key)
            .map_err(|e| key_err(e.to_string()))?
            .trim()
            .to_owned();
        let verifier_key = verifier_key_of(&signer_key)
            .ok_or_else(|| key_err("not a C2SP signed-note Ed25519 signer key".into()))?;
        if !verifier_key.starts_with(&format!("{}+", config.origin)) {
            return Err(key_err(format!(
                "its name is not the origin {:?}",
                config.origin
            )));
        }
        // A witness counts once toward the quorum that confirms the
        // compliance clock and the log's consistency: listed twice (under
        // one name or two: its cosignature does not sign its name), one
        // witness alone would pass for two.
        let mut keys = std::collections::HashMap::new();
        for w in &config.witnesses {
            // One that does not parse would fail every round and still
            // count toward the majority the clock needs.
            let Some(pk) = protocol::witness::public_key(&w.key) else {
                return Err(LedgerError::Tree(format!(
                    "witnesses: {:?} (for {}) is not a witness verifier key (name+id+base64)",
                    w.key.trim(),
                    w.url
                )));
            };
            if let Some(first) = keys.get(&pk) {
                return Err(LedgerError::Tree(format!(
                    "witnesses: {} and {} hold the same public key; each witness counts once",
                    first,
                    w.key.trim()
                )));
            }
            // Signature lines are told apart by name and a 4-byte key ID,
            // which a key can be ground to match: a witness named as the
            // log could have its line take the place of the log's own
            // signature in a stored note, and every receipt would lose its
            // cosignatures. (Witnesses sharing a name, two courts keeping
            // the default, can at worst displace each other's line.)
            let name = w.key.trim().split('+').next().unwrap_or_default();
            if name == config.origin {
                return Err(LedgerError::Tree(format!(
                    "witnesses: {} is named as the log itself",
                    w.key.trim()
                )));
            }
            keys.insert(pk, w.key.trim());
        }
        let tsa = match &config.tsa {
            None => None,
            Some(t) => {
                let read = |p: &PathBuf| {
                    std::fs::read_to_string(p).map_err(|e| LedgerError::Key {
                        path: p.clone(),
                        reason: e.to_string(),
                    })
                };
                if t.url.is_none() && t.dev_key.is_none() {
                    return Err(LedgerError::Tree(
                        "tsa: give an external url or a development dev_key".into(),
                    ));
                }
                let cert_pem = read(&t.cert)?;
                Some(Tsa {
                    url: t.url.clone(),
                    development: protocol::tsa::is_development_cert(&cert_pem),
                    cert_pem,
                    dev_key_pem: t.dev_key.as_ref().map(read).transpose()?,
                    interval: Duration::from_millis(t.interval_ms.clamp(100, 3_600_000)),
                })
            }
        };
        let (tiles, local): (Arc<dyn ObjectStore>, _) = match &config.tiles_url {
            None => {
                std::fs::create_dir_all(&config.tiles_dir)?;
                (
                    Arc::new(LocalFileSystem::new_with_prefix(&config.tiles_dir)?),
                    Some(config.tiles_dir.clone()),
                )
            }
            Some(url) => (bucket(url, &config.tiles_options)?, None),
        };
        let (openings, openings_dir): (Arc<dyn ObjectStore>, _) = match &config.openings_url {
            None => {
                let dir = config.local_openings_dir();
                // Made its owner's only from the start; one that was there
                // already is tightened, and said so.
                use std::os::unix::fs::DirBuilderExt as _;
                let made = !dir.try_exists()?;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&dir)?;
                // Not fatal (a folder another user owns, a file system
                // without modes): said, loudly, and the archive still kept.
                if let Err(e) = keep_private(&dir, !made) {
                    tracing::error!(dir = %dir.display(), error = %e, "could not make the private openings archive its owner's only: check who can read it");
                }
                (Arc::new(LocalFileSystem::new_with_prefix(&dir)?), Some(dir))
            }
            Some(url) => (bucket(url, &config.tiles_options)?, None),
        };
        Ok(Ledger {
            origin: config.origin.clone(),
            signer_key,
            verifier_key,
            tiles,
            tiles_dir: local,
            openings,
            openings_dir,
            wake: Notify::new(),
            published: watch::channel(0).0,
            checkpoint_file: std::sync::atomic::AtomicU64::new(0),
            published_checked: std::sync::atomic::AtomicBool::new(false),
            conditional_puts: std::sync::atomic::AtomicBool::new(false),
            lease: std::sync::Mutex::new(None),
            watched: std::sync::Mutex::new(None),
            owner: {
                let h = blake3::hash(identity.as_bytes());
                let mut b = [0u8; 16];
                b.copy_from_slice(&h.as_bytes()[..16]);
                u128::from_be_bytes(b)
            },
            receipt_wait: Duration::from_millis(config.receipt_wait_ms),
            pacer: RoundPacer::new(Duration::from_millis(config.round_interval_ms.min(1_000))),
            // Each key as checked above, trimmed (a pasted key with a
            // trailing space or newline passed the check, and then no
            // cosignature verified with it).
            witnesses: config
                .witnesses
                .iter()
                .map(|w| WitnessEntry {
                    url: w.url.clone(),
                    key: w.key.trim().to_owned(),
                })
                .collect(),
            witness_interval: Duration::from_millis(config.witness_interval_ms.clamp(100, 60_000)),
            archive_check_interval: Duration::from_millis(config.archive_check_interval_ms),
            tsa,
            weighed: Default::default(),
        })
    }

    /// Whether the published log was found to be a tree the index holds
    /// (see `check_published_tree`): until then the index may be one
    /// restored from an older backup, or empty, and the orphan sweep must
    /// delete nothing (every shard filed since would look like an orphan).
    pub fn published_checked(&self) -> bool {
        self.published_checked
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Wakes the integrator: a statement was queued.
    pub fn queued(&self) {
        self.wake.notify_one();
    }

    /// Size of the newest checkpoint this gateway published.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.published.subscribe()
    }

    /// Reads a published object (`checkpoint`, `tile/...`).
    pub async fn read_published(&self, path: &str) -> Result<Option<bytes::Bytes>, ApiError> {
        let path = StorePath::parse(path).map_err(|_| ApiError::NotFound)?;
        match self.tiles.get(&path).await {
            Ok(got) => Ok(Some(got.bytes().await.map_err(|_| ApiError::Internal)?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => {
                tracing::error!(error = %e, "reading the published ledger failed");
                Err(ApiError::Internal)
            }
        }
    }

    /// Writes published tiles durably, each only where none is or the same
    /// bytes are (see [`put_immutable`]).
    async fn publish_all(&self, files: Vec<(String, Vec<u8>)>) -> Result<(), LedgerError> {
        put_immutable(&self.tiles, self.tiles_dir.clone(), files).await
    }

    /// Publishes `note`, a checkpoint of tree size `size`, as the
    /// `checkpoint` file unless that file already holds one at least as
    /// large: the published checkpoint never goes back, whoever else writes
    /// it (another gateway on the same index and bucket, or an integrator
    /// fenced off while publishing, whose write lands after its successor's).
    /// A local directory is guarded by a lock on it held around the read and
    /// the write; a bucket by a conditional PUT (`If-Match` on the version
    /// read, `If-None-Match: *` when there is none), read again when another
    /// writer got in between. Returns whether it wrote.
    async fn publish_checkpoint_note(&self, size: u64, note: Vec<u8>) -> Result<bool, LedgerError> {
        match &self.tiles_dir {
            Some(dir) => publish_local_if_newer(dir, &self.verifier_key, size, note).await,
            None => {
                publish_if_newer(
                    self.tiles.as_ref(),
                    &self.verifier_key,
                    size,
                    note,
                    &self.conditional_puts,
                )
                .await
            }
        }
    }

    /// Writes one file to the private openings archive durably (a local
    /// directory: temporary file, fsync, rename, fsync of the directory).
    pub async fn archive_file(&self, name: &str, bytes: Vec<u8>) -> Result<(), LedgerError> {
        let Some(root) = self.openings_dir.clone() else {
            return put_durably(&self.openings, None, vec![(name.to_owned(), bytes)]).await;
        };
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            let path = root.join(&name);
            let (Some(dir), Some(file)) = (path.parent(), path.file_name()) else {
                return Err(std::io::Error::other(format!("archive file name {name:?}")));
            };
            std::fs::create_dir_all(dir)?;
            // The folder's own entry too, every time: a crash between its
            // creation and a sync would otherwise leave it unsynced for ever.
            if let Some(up) = dir.parent() {
                std::fs::File::open(up)?.sync_all()?;
            }
            storage_node::store::write_private(&dir.join(file), &bytes)
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
        Ok(())
    }

    /// Every file of the private openings archive under `folder`, whole,
    /// in name order.
    pub async fn archived_files(
        &self,
        folder: &str,
    ) -> Result<Vec<(String, bytes::Bytes)>, LedgerError> {
        let names = self.archived_names(folder).await?;
        let mut files = Vec::with_capacity(names.len());
        for (name, _) in names {
            let bytes = self
                .openings
                .get(&store_path(&name)?)
                .await?
                .bytes()
                .await?;
            files.push((name, bytes));
        }
        Ok(files)
    }

    /// The names and sizes of the private openings archive's files under
    /// `folder`, in name order.
    pub async fn archived_names(&self, folder: &str) -> Result<Vec<(String, u64)>, LedgerError> {
        names_in(&*self.openings, folder).await
    }

    /// One file of the private openings archive; `None` if there is none
    /// by that name (another gateway may have just replaced it).
    pub async fn archived_file(&self, name: &str) -> Result<Option<bytes::Bytes>, LedgerError> {
        match self.openings.get(&store_path(name)?).await {
            Ok(got) => Ok(Some(got.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes one file of the private openings archive, one whose content
    /// another file now holds (a file already gone is no error).
    pub async fn delete_archived(&self, name: &str) -> Result<(), LedgerError> {
        match self.openings.delete(&store_path(name)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The openings archive's files and the leaves each holds, by their
    /// names (nothing is read), in no particular order.
    async fn archive_runs(&self) -> Result<Vec<(StorePath, std::ops::Range<u64>)>, LedgerError> {
        use futures::TryStreamExt;
        Ok(self
            .openings
            .list(None)
            .try_filter_map(|meta| {
                let run = lx::parse_archive_name(meta.location.as_ref());
                futures::future::ready(Ok(run.map(|r| (meta.location, r))))
            })
            .try_collect()
            .await?)
    }

    /// Every archived leaf from leaf 0 up to the first gap, in order (see
    /// [`lx::archive_chain`]).
    pub async fn read_archive(&self) -> Result<Vec<lx::ArchivedLeaf>, LedgerError> {
        let runs = self.archive_runs().await?;
        let ranges: Vec<std::ops::Range<u64>> = runs.iter().map(|(_, r)| r.clone()).collect();
        let mut archive = Vec::new();
        for (i, from) in lx::archive_chain(&ranges) {
            let (name, range) = &runs[i];
            let got = self.openings.get(name).await?;
            let run = lx::decode_archive(&got.bytes().await?)
                .map_err(|e| LedgerError::Tree(format!("openings archive {name}: {e}")))?;
            if run.first != range.start || run.leaves.len() as u64 != range.end - range.start {
                return Err(LedgerError::Tree(format!(
                    "openings archive {name} holds leaves {}..{}",
                    run.first,
                    run.first + run.leaves.len() as u64
                )));
            }
            archive.extend(run.leaves.into_iter().skip((from - range.start) as usize));
        }
        Ok(archive)
    }

    /// Reads a published file for `recover-index` (`None`: no such file).
    pub async fn read_tile_file(&self, path: &str) -> Result<Option<bytes::Bytes>, LedgerError> {
        let path = store_path(path)?;
        match self.tiles.get(&path).await {
            Ok(got) => Ok(Some(got.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// A leaf with its commitment, and its statement's kind (`admin` for a
/// statement that does not decode, which the outbox never holds).
fn leaf_of(evidence: EvidenceId, salt: [u8; 32], statement: Vec<u8>) -> (LeafRecord, Kind) {
    let kind = statement_kind(&statement).unwrap_or(Kind::Admin);
    let commitment = pl::commitment(&salt, &statement);
    let leaf = LeafRecord {
        evidence,
        salt,
        statement,
        commitment,
    };
    (leaf, kind)
}

/// Appends `leaves` to the tree of size `first`: the new root, and the hash
/// tiles that change with their data.
async fn extend_tree<S: Store>(
    gw: &Gateway<S>,
    known: &mut HashMap<u64, TreeHash>,
    first: u64,
    leaves: &[(Vec<u8>, LeafRecord, Kind)],
) -> Result<(TreeHash, Vec<(Tile, Vec<u8>)>), LedgerError> {
    let new_size = first + leaves.len() as u64;
    let base = tlog_tiles::stored_hash_index(0, first);
    let (root, hashes) = with_hashes(gw, known, base, |r| {
        for (i, (_, leaf, _)) in leaves.iter().enumerate() {
            let hs = tlog_tiles::stored_hashes(first + i as u64, &leaf.commitment, r)?;
            r.new.borrow_mut().extend(hs);
        }
        tlog_tiles::tree_hash(new_size, r)
    })
    .await?;
    known.extend(
        hashes
            .iter()
            .enumerate()
            .map(|(i, h)| (base + i as u64, *h)),
    );
    let tiles = changed_tiles(gw, known, first, new_size).await?;
    Ok((root, tiles))
}

/// A statement's kind without decoding the rest (`None`: not a statement).
/// `Statement::encode` writes `{"v":N,"kind":"..."` first, so the kind is
/// read there; any other layout is parsed in full.
fn statement_kind(statement: &[u8]) -> Option<Kind> {
    #[derive(serde::Deserialize)]
    struct KindOnly {
        kind: Kind,
    }
    let fast = statement.strip_prefix(b"{\"v\":").and_then(|rest| {
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let quoted = rest[digits..].strip_prefix(b",\"kind\":")?;
        let end = quoted.iter().skip(1).position(|b| *b == b'"')? + 2;
        serde_json::from_slice::<Kind>(&quoted[..end]).ok()
    });
    fast.or_else(|| {
        serde_json::from_slice::<KindOnly>(statement)
            .ok()
            .map(|k| k.kind)
    })
}

/// Makes the private openings archive's folder readable by its owner only
/// (it holds every statement's salt, and with them the sealed case names,
/// submitters and file names the published log hides): created so, and
/// tightened at each start if an operator's folder let others in.
fn keep_private(dir: &std::path::Path, say: bool) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o700))?;
        if say {
            tracing::warn!(dir = %dir.display(), was = format!("{:o}", mode & 0o777), "the private openings archive was readable by others: now its owner's only");
        }
    }
    Ok(())
}

/// Writes files durably: object_store's local store writes each to a
/// temporary file and renames it into place, without fsync; one `syncfs` of
/// the directory's filesystem then makes every file and rename durable at
/// once (far cheaper than an fsync per file and directory). For a bucket
/// (`dir` is `None`) a completed PUT is durable.
async fn put_durably(
    store: &Arc<dyn ObjectStore>,
    dir: Option<PathBuf>,
    files: Vec<(String, Vec<u8>)>,
) -> Result<(), LedgerError> {
    if files.is_empty() {
        return Ok(());
    }
    let puts = files.into_iter().map(|(path, bytes)| async move {
        let path = store_path(&path)?;
        store.put(&path, PutPayload::from(bytes)).await?;
        Ok::<_, LedgerError>(())
    });
    futures::future::try_join_all(puts).await?;
    sync_filesystem(dir).await
}

/// Writes tiles, which never change once published, as [`put_durably`] does
/// but each created only where there is none (`If-None-Match: *` on a
/// bucket; on a directory, [`create_local`]). One already there must hold the same
/// bytes (the same publication again, after a crash or a re-run); other bytes
/// mean that another tree was published at the same indexes, by another
/// index publishing into the same place or by this one after a rollback, and
/// publication stops with [`LedgerError::Forked`] rather than overwrite what
/// monitors and receipt holders already fetched. A transient failure is
/// tried again; a bucket that keeps refusing the conditional write is read
/// first instead (which two publishers could race).
async fn put_immutable(
    store: &Arc<dyn ObjectStore>,
    dir: Option<PathBuf>,
    files: Vec<(String, Vec<u8>)>,
) -> Result<(), LedgerError> {
    use object_store::{Error as OsError, PutMode};
    if files.is_empty() {
        return Ok(());
    }
    let dir = &dir;
    let puts = files.into_iter().map(|(name, bytes)| async move {
        let path = store_path(&name)?;
        let bytes = bytes::Bytes::from(bytes);
        if let Some(dir) = dir {
            let (file, body) = (dir.join(path.as_ref()), bytes.clone());
            let existing = tokio::task::spawn_blocking(move || create_local(&file, &body))
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))??;
            return match existing {
                None => Ok(()),
                Some(existing) => same_tile(&name, &existing, &bytes),
            };
        }
        let create = || store.put_opts(&path, PutPayload::from(bytes.clone()), PutMode::Create.into());
        let mut created = create().await;
        // A transient failure (a 503, a reset) is tried again as it was: only
        // a store that keeps refusing a conditional write is read first
        // instead, which two publishers could race.
        for retry in 1..=2u32 {
            if !matches!(created, Err(OsError::Generic { .. })) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200 << retry)).await;
            created = create().await;
        }
        let existing = match created {
            Ok(_) => return Ok(()),
            Err(OsError::AlreadyExists { .. } | OsError::Precondition { .. }) => {
                store.get(&path).await?.bytes().await?
            }
            Err(OsError::NotImplemented | OsError::Generic { .. }) => {
                tracing::warn!(tile = %name, "a create-only write of a tile was refused; checking for it and writing it unconditionally");
                match store.get(&path).await {
                    Ok(got) => got.bytes().await?,
                    Err(OsError::NotFound { .. }) => {
                        store.put(&path, PutPayload::from(bytes)).await?;
                        return Ok(());
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        };
        same_tile(&name, &existing, &bytes)
    });
    futures::future::try_join_all(puts).await?;
    sync_filesystem(dir.clone()).await
}

/// Whether the tile `name` already published as `existing` is the one
/// about to be published as `bytes`: [`LedgerError::Forked`] if not.
fn same_tile(name: &str, existing: &[u8], bytes: &[u8]) -> Result<(), LedgerError> {
    if existing == bytes {
        return Ok(());
    }
    let why = format!(
        "{name} is published with other bytes ({} against {} here)",
        existing.len(),
        bytes.len()
    );
    tracing::error!(%why, "a published tile differs; integration stopped");
    Err(LedgerError::Forked(why))
}

/// Creates `path` holding `bytes` unless a file is there already, whose
/// bytes it returns. The file appears under its name only once its bytes
/// are on disk: written to a temporary file beside it and fsynced, then
/// hard-linked into place (which fails where a file is). object_store's
/// local create links before any fsync, so a power cut before the
/// directory's `syncfs` could leave a tile of zeros or of part of its bytes
/// under its final name, and every later publication would take it for a
/// fork and stop the ledger for good. The link itself is made durable by
/// the `syncfs` after the batch.
fn create_local(path: &Path, bytes: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Write;
    if let Ok(existing) = std::fs::read(path) {
        return Ok(Some(existing));
    }
    let parent = path
        .parent()
        .ok_or_else(|| std::io::Error::other("a tile path without a directory"))?;
    std::fs::create_dir_all(parent)?;
    let tmp = parent.join(format!(".tmp-{:016x}", rand::random::<u64>()));
    let linked = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::hard_link(&tmp, path)
    })();
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => std::fs::read(path).map(Some),
        Err(e) => Err(e),
    }
}

/// One `syncfs` of `dir`'s filesystem (nothing for a bucket, `None`).
async fn sync_filesystem(dir: Option<PathBuf>) -> Result<(), LedgerError> {
    let Some(dir) = dir else {
        return Ok(());
    };
    tokio::task::spawn_blocking(move || {
        let d = std::fs::File::open(&dir)?;
        rustix::fs::syncfs(&d).map_err(std::io::Error::from)
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()))??;
    Ok(())
}

/// An S3-compatible bucket for tiles: `AWS_*` environment, then the URL,
/// then explicit options.
fn bucket(
    url: &str,
    options: &std::collections::BTreeMap<String, String>,
) -> Result<Arc<dyn ObjectStore>, LedgerError> {
    use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
    let parsed = url::Url::parse(url).map_err(|e| LedgerError::Tree(format!("tiles_url: {e}")))?;
    if parsed.scheme() != "s3" {
        return Err(LedgerError::Tree(format!(
            "tiles_url: only s3:// buckets are supported, not {url:?}"
        )));
    }
    let mut b = AmazonS3Builder::from_env().with_url(url);
    for (k, v) in options {
        let key: AmazonS3ConfigKey = k
            .parse()
            .map_err(|_| LedgerError::Tree(format!("tiles_options: unknown S3 setting {k:?}")))?;
        b = b.with_config(key, v);
    }
    let store = b.build()?;
    let prefix = StorePath::parse(parsed.path().trim_start_matches('/'))
        .map_err(|e| LedgerError::Tree(format!("tiles_url path: {e}")))?;
    Ok(Arc::new(object_store::prefix::PrefixStore::new(
        store, prefix,
    )))
}

/// The verifier key matching a signer key.
pub fn verifier_key_of(skey: &str) -> Option<String> {
    use base64::Engine as _;
    let mut parts = skey.splitn(5, '+');
    let (Some("PRIVATE"), Some("KEY"), Some(name), Some(_id), Some(key)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let bytes = base64::engine::general_purpose::STANDARD.decode(key).ok()?;
    let seed: [u8; 32] = bytes.strip_prefix(&[0x01])?.try_into().ok()?;
    let (s, v) = pl::note_keys(name, &seed);
    (s == skey).then_some(v)
}

/// A [`HashReader`] over hashes fetched so far plus hashes being appended,
/// recording what it lacks: sync `tlog_tiles` calls are retried after the
/// missing hashes are fetched from the index (a few rounds, O(log n) each).
struct Fetched<'a> {
    known: &'a HashMap<u64, TreeHash>,
    /// Hashes appended in this batch, from stored index `base`.
    base: u64,
    new: RefCell<Vec<TreeHash>>,
    missing: RefCell<Vec<u64>>,
}

impl HashReader for Fetched<'_> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<TreeHash>, tlog_tiles::Error> {
        let new = self.new.borrow();
        let mut out = Vec::with_capacity(indexes.len());
        let mut missing = self.missing.borrow_mut();
        for &i in indexes {
            let h = if i >= self.base {
                new.get((i - self.base) as usize).copied()
            } else {
                self.known.get(&i).copied()
            };
            match h {
                Some(h) => out.push(h),
                None => missing.push(i),
            }
        }
        if missing.is_empty() {
            Ok(out)
        } else {
            Err(tlog_tiles::Error::IndexesNotInTree)
        }
    }
}

/// Runs `f` against the index's tree hashes, fetching whatever it asks for
/// that is not yet known, until it succeeds.
async fn with_hashes<S: Store, T>(
    gw: &Gateway<S>,
    known: &mut HashMap<u64, TreeHash>,
    base: u64,
    mut f: impl FnMut(&Fetched<'_>) -> Result<T, tlog_tiles::Error>,
) -> Result<(T, Vec<TreeHash>), LedgerError> {
    for _ in 0..128 {
        let reader = Fetched {
            known,
            base,
            new: RefCell::new(Vec::new()),
            missing: RefCell::new(Vec::new()),
        };
        match f(&reader) {
            Ok(v) => return Ok((v, reader.new.into_inner())),
            Err(e) => {
                let mut missing = reader.missing.into_inner();
                if missing.is_empty() {
                    return Err(LedgerError::Tree(e.to_string()));
                }
                missing.sort_unstable();
                missing.dedup();
                fetch_hashes(gw, known, &missing).await?;
            }
        }
    }
    Err(LedgerError::Tree("too many fetch rounds".into()))
}

/// Reads stored hashes `indexes` from the hash tiles in the index into
/// `known` (one read per tile, however many of its hashes are asked for).
async fn fetch_hashes<S: Store>(
    gw: &Gateway<S>,
    known: &mut HashMap<u64, TreeHash>,
    indexes: &[u64],
) -> Result<(), LedgerError> {
    let mut tiles: Vec<(u8, u64)> = indexes
        .iter()
        .map(|i| {
            let t = Tile::from_index(TILE_HEIGHT, *i);
            (t.level(), t.level_index())
        })
        .collect();
    tiles.sort_unstable();
    tiles.dedup();
    let got = indexer::run(&gw.store, |tx| {
        let tiles = &tiles;
        async move { lx::tiles_tx(&tx, tiles).await }
    })
    .await?;
    let data: HashMap<(u8, u64), Vec<u8>> = tiles
        .into_iter()
        .zip(got)
        .filter_map(|(t, d)| Some((t, d?)))
        .collect();
    for &i in indexes {
        let tile = Tile::from_index(TILE_HEIGHT, i);
        let h = data
            .get(&(tile.level(), tile.level_index()))
            .and_then(|d| tile.hash_at_index(d, i).ok())
            .ok_or_else(|| LedgerError::Tree(format!("stored hash {i}")))?;
        known.insert(i, h);
    }
    Ok(())
}

/// The hash tiles that change when the tree grows from `old` to `new`, with
/// their data; `known` holds the hashes appended since `old`.
async fn changed_tiles<S: Store>(
    gw: &Gateway<S>,
    known: &mut HashMap<u64, TreeHash>,
    old: u64,
    new: u64,
) -> Result<Vec<(Tile, Vec<u8>)>, LedgerError> {
    let tiles = Tile::new_tiles(TILE_HEIGHT, old, new);
    // Every tile's reads in one round, so their missing hashes are fetched
    // together.
    let (data, _) = with_hashes(gw, known, u64::MAX, |r| {
        let mut out = Vec::with_capacity(tiles.len());
        let mut failed = None;
        for tile in &tiles {
            match tile.read_data(r) {
                Ok(d) => out.push(d),
                Err(e) => failed = Some(e),
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(out),
        }
    })
    .await?;
    Ok(tiles.into_iter().zip(data).collect())
}

fn tile_rows(tiles: &[(Tile, Vec<u8>)]) -> Vec<lx::TileData> {
    tiles
        .iter()
        .map(|(t, d)| (t.level(), t.level_index(), d.clone()))
        .collect()
}

/// Checks, before this process first writes tiles or signs, that the
/// published checkpoint is a tree the index holds: as large as the index's
/// at most, with the root the index's tree has at its size. An index
/// restored from an older backup (or another log's index publishing into
/// the same place) would otherwise integrate new leaves at published
/// indexes: tiles served as immutable rewritten with other bytes, and a
/// second tree signed at a size already signed, a fork. Integration stops
/// with [`LedgerError::Forked`] until an operator resolves it.
pub(crate) async fn check_published_tree<S: Store>(
    gw: &Gateway<S>,
    ledger: &Ledger,
) -> Result<(), LedgerError> {
    use std::sync::atomic::Ordering;
    if ledger.published_checked.load(Ordering::Acquire) {
        return Ok(());
    }
    // The openings archive first: a batch's run is written once the index
    // has integrated it and before its checkpoint is signed, receipts for
    // it handed out, or the checkpoint file written. A run reaching past
    // the index's tree is the trace of integrated leaves the index no
    // longer has, even when the checkpoint file lags behind them.
    // In this order: the signed size, the archive, then the tree. Another
    // gateway integrating meanwhile writes a run only after committing its
    // leaves, so a run listed here is in the tree read after it.
    let signed_size = || async {
        Ok::<_, LedgerError>(
            newest_checkpoint(gw, ledger)
                .await
                .map_err(|e| LedgerError::Tree(format!("the index's checkpoint: {e}")))?
                .map_or(0, |(_, c)| c.size),
        )
    };
    let index_size = signed_size().await?;
    let archived = archived_end(&*ledger.openings, index_size).await?;
    let tree = indexer::run(&gw.store, |tx| async move { lx::tree_state_tx(&tx).await })
        .await
        .map_err(|e| LedgerError::Tree(format!("the index's tree: {e}")))?
        .size;
    if let Some(end) = archived.filter(|&end| end > tree) {
        let why = format!(
            "the openings archive holds leaves up to {end}, beyond the index's tree of {tree}"
        );
        tracing::error!(%why, "the ledger's archive and the index disagree; integration stopped");
        return Err(LedgerError::Forked(why));
    }
    let published = match ledger.tiles.get(&StorePath::from(CHECKPOINT_FILE)).await {
        Ok(got) => Some(got.bytes().await?),
        Err(object_store::Error::NotFound { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    // Nothing published, or a note that is not this log's (replaced, as
    // `published_size` says).
    let Some(cp) = published.as_deref().and_then(|note| {
        std::str::from_utf8(note)
            .ok()
            .and_then(|n| pl::verify_checkpoint(n, &ledger.verifier_key).ok())
    }) else {
        ledger.published_checked.store(true, Ordering::Release);
        return Ok(());
    };
    // Another gateway may have signed (in the index, then in the file)
    // since the index's size was read above: read again, the file being
    // written only after the index, before taking a larger file for a fork.
    let index_size = match cp.size > index_size {
        true => signed_size().await?,
        false => index_size,
    };
    let fork = if cp.size > index_size {
        Some(format!(
            "published size {} is beyond the index's {index_size}",
            cp.size
        ))
    } else {
        let mut known = HashMap::new();
        let base = tlog_tiles::stored_hash_index(0, cp.size);
        let (root, _) =
            with_hashes(gw, &mut known, base, |r| tlog_tiles::tree_hash(cp.size, r)).await?;
        (root != cp.root).then(|| {
            format!(
                "at size {} the published root differs from the index's",
                cp.size
            )
        })
    };
    if let Some(why) = fork {
        tracing::error!(%why, "the published ledger and the index disagree; integration stopped");
        return Err(LedgerError::Forked(why));
    }
    ledger.published_checked.store(true, Ordering::Release);
    Ok(())
}

/// The end of the furthest run of the openings archive filed from the
/// folder of leaf `signed` on. Every run is written by a round publishing
/// from the index's checkpoint size then, which only grows: so every run
/// the index could have lost starts at `signed` (the index's checkpoint
/// size now) or later. Runs are filed by the folder of their first leaf
/// (`first >> 16`) and follow each other without gaps, so the folders are
/// listed from `signed`'s on, each next one where the furthest run so far
/// ends, until one holds nothing.
async fn archived_end(openings: &dyn ObjectStore, signed: u64) -> Result<Option<u64>, LedgerError> {
    let mut furthest: Option<u64> = None;
    let mut folder = signed >> 16;
    loop {
        let ends = folder_runs(openings, folder)
            .await?
            .into_iter()
            .map(|run| run.end)
            .max();
        let Some(end) = ends else {
            return Ok(furthest);
        };
        furthest = furthest.max(Some(end));
        folder = (folder + 1).max(end >> 16);
    }
}

/// How many leaves from leaf 0 the openings archive `openings` covers
/// without a gap, by its files' names (as [`lx::archive_chain`] would chain
/// them). Listed folder by folder, with one folder's names in memory at a
/// time: an archive of years holds hundreds of millions of files. Folder
/// `f` files the runs that start in leaves `f << 16..(f + 1) << 16`, so a
/// folder that starts past the coverage so far can add nothing to it, and
/// the walk stops there.
async fn archive_coverage(openings: &dyn ObjectStore) -> Result<u64, LedgerError> {
    let (mut covered, mut folder) = (0u64, 0u64);
    while folder << 16 <= covered {
        let mut ranges = folder_runs(openings, folder).await?;
        ranges.sort_by_key(|r| r.start);
        for r in ranges {
            if r.start <= covered {
                covered = covered.max(r.end);
            }
        }
        folder += 1;
    }
    Ok(covered)
}

/// The leaf ranges of the runs the openings archive files in `folder`
/// (those whose first leaf is in `folder << 16..(folder + 1) << 16`).
async fn folder_runs(
    openings: &dyn ObjectStore,
    folder: u64,
) -> Result<Vec<std::ops::Range<u64>>, LedgerError> {
    Ok(names_in(openings, &format!("{folder:07}"))
        .await?
        .iter()
        .filter_map(|(name, _)| lx::parse_archive_name(name))
        .collect())
}

/// The names and sizes of the files of `store` under `folder`, in name
/// order.
async fn names_in(
    store: &dyn ObjectStore,
    folder: &str,
) -> Result<Vec<(String, u64)>, LedgerError> {
    use futures::TryStreamExt;
    let prefix = store_path(folder)?;
    let mut names: Vec<(String, u64)> = store
        .list(Some(&prefix))
        .map_ok(|meta| (meta.location.to_string(), meta.size))
        .try_collect()
        .await?;
    names.sort();
    Ok(names)
}

/// Starts the integrator.
pub fn spawn_integrator<S: Store>(gw: Arc<Gateway<S>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Some(ledger) = gw.ledger.clone() else {
            return;
        };
        loop {
            match integrate_pending(&gw, &ledger).await {
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "ledger integration failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            tokio::select! {
                _ = ledger.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(1000)) => {}
            }
        }
    })
}

/// Integrates until the queue is empty; returns whether anything was
/// integrated. Batch N+1 is read and hashed while batch N's integration
/// transaction commits; the task that commits a batch then publishes it
/// (tiles, openings, signature) as soon as the publication before it is
/// done, beside the next batches' work. Publications run one after another
/// in order, and each starts only once its batch has committed, so every
/// checkpoint is signed only once the tiles and openings of all the leaves
/// it covers are durable; a batch read ahead is integrated only if the one
/// before it committed (its transaction checks the tree size it extends).
/// A failed commit or publication stops the run: at most one batch after the
/// failed one commits (the one already under way beside it). The next run
/// starts from the index and first publishes what the index holds.
pub async fn integrate_pending<S: Store>(
    gw: &Arc<Gateway<S>>,
    ledger: &Arc<Ledger>,
) -> Result<bool, LedgerError> {
    check_published_tree(gw, ledger).await?;
    // The newest batch's commit-then-publish task (it awaits the publication
    // before it, so awaiting it awaits them all), and its commit's outcome.
    let mut publishing: Option<tokio::task::JoinHandle<Result<(), LedgerError>>> = None;
    let mut committing: Option<oneshot::Receiver<bool>> = None;
    // The loop takes a permit for each commit-then-publish task, which holds
    // it until its publication is done: one batch publishing and one
    // committing at most, so a slow publication (a slow disk or bucket)
    // holds integration back instead of letting unpublished batches pile up
    // in memory, and a stuck one stops lease renewals so another gateway can
    // take over.
    let in_flight = Arc::new(tokio::sync::Semaphore::new(2));
    // Set by a commit-then-publish task that fails or panics, before its
    // permit goes back: a task given that permit commits nothing, so at most
    // one batch after a failed one commits (the one already holding the
    // other permit).
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Where the next batch starts while the previous one is committing.
    let mut ahead: Option<Ahead> = None;
    // Tree hashes of the batches not yet known to be in the index, and
    // others read from it.
    let mut known: HashMap<u64, TreeHash> = HashMap::new();
    let mut any = false;
    let outcome = loop {
        let started = ledger.pacer.pace().await;
        let catch_up = publishing.is_none() && committing.is_none();
        let prepared = prepare_round(gw, ledger, catch_up, ahead.take(), &mut known).await;
        if let Ok(Some(p)) = &prepared {
            ledger.pacer.found(started, p.leaves.len());
        }
        if prepared.is_err() {
            ledger.forget_lease();
        }
        if let Some(commit) = committing.take() {
            if !commit.await.unwrap_or(false) {
                break Err(earliest_failure(publishing.take(), "ledger commit failed").await);
            }
            // Everything before the batch just prepared is in the index now.
            if let Ok(Some(p)) = &prepared {
                let base = tlog_tiles::stored_hash_index(0, p.first);
                known.retain(|i, _| *i >= base);
            }
            // A failed publication fails every one after it: stop early.
            if publishing.as_ref().is_some_and(|p| p.is_finished()) {
                if let Some(done) = publishing.take() {
                    if let Err(e) = joined(done).await {
                        break Err(e);
                    }
                }
            }
        }
        match prepared {
            Ok(Some(p)) => {
                any = true;
                ahead = p.leaves.last().map(|(key, ..)| Ahead {
                    size: p.next.size,
                    after: key.clone(),
                    fence: p.next.fence,
                });
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break Err(LedgerError::Tree("ledger publication gate closed".into()));
                };
                if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    // A task failed while this batch waited for its permit.
                    let fallback = "ledger integration stopped after a failure";
                    break Err(earliest_failure(publishing.take(), fallback).await);
                }
                let (done, commit) = oneshot::channel();
                committing = Some(commit);
                let previous = publishing.take();
                let (gw, ledger, stopped) = (gw.clone(), ledger.clone(), stopped.clone());
                publishing = Some(tokio::spawn(async move {
                    let _permit = permit;
                    // Dropped before the permit, on return and on a panic.
                    let mut stop = StopUnlessDone {
                        flag: stopped.clone(),
                        done: false,
                    };
                    let outcome =
                        commit_then_publish(&gw, &ledger, p, done, previous, &stopped).await;
                    stop.done = outcome.is_ok();
                    outcome
                }));
            }
            Ok(None) => break Ok(any),
            Err(e) => break Err(e),
        }
    };
    // Every way out of the loop has awaited the commit in flight.
    debug_assert!(committing.is_none());
    // On failure the batches stay integrated and unpublished: the next run's
    // first round publishes them.
    let last = match publishing {
        Some(task) => joined(task).await,
        None => Ok(()),
    };
    match (outcome, last) {
        (Err(e), Err(later)) => {
            tracing::debug!(error = %later, "ledger publication also failed");
            Err(e)
        }
        (Err(e), Ok(())) => Err(e),
        (Ok(any), last) => last.map(|()| any),
    }
}

/// Why the run stops: the newest task's outcome (a task returns the
/// earliest failure of the chain before it), else `fallback`.
async fn earliest_failure(
    newest: Option<tokio::task::JoinHandle<Result<(), LedgerError>>>,
    fallback: &str,
) -> LedgerError {
    let why = match newest {
        Some(task) => joined(task).await.err(),
        None => None,
    };
    why.unwrap_or_else(|| LedgerError::Tree(fallback.into()))
}

/// Sets `flag` when dropped before `done`: a commit-then-publish task that
/// fails or panics stops the commits after it.
struct StopUnlessDone {
    flag: Arc<std::sync::atomic::AtomicBool>,
    done: bool,
}

impl Drop for StopUnlessDone {
    fn drop(&mut self) {
        if !self.done {
            self.flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// Commits batch `p` (telling the loop on `done` whether it did), waits
/// for the publication before it (`previous`), then publishes the batch.
/// Commits nothing once an earlier task has `stopped`. Returns the earliest
/// failure of the chain.
async fn commit_then_publish<S: Store>(
    gw: &Arc<Gateway<S>>,
    ledger: &Arc<Ledger>,
    p: Prepared,
    done: oneshot::Sender<bool>,
    previous: Option<tokio::task::JoinHandle<Result<(), LedgerError>>>,
    stopped: &std::sync::atomic::AtomicBool,
) -> Result<(), LedgerError> {
    let committed = if stopped.load(std::sync::atomic::Ordering::SeqCst) {
        None
    } else {
        Some(commit_round(gw.clone(), ledger.clone(), p).await)
    };
    let _ = done.send(matches!(committed, Some(Ok(_))));
    // Publications in order: this one only after the last.
    if let Some(previous) = previous {
        joined(previous).await?;
    }
    let batch = match committed {
        Some(Ok(batch)) => batch,
        Some(Err(e)) => return Err(e),
        None => {
            return Err(LedgerError::Tree(
                "integration stopped after an earlier failure".into(),
            ))
        }
    };
    gw.metrics
        .entries_integrated
        .inc_by(batch.leaves.len() as u64);
    publish_state(
        gw,
        ledger,
        batch.first,
        &batch.state,
        Some(batch.tiles),
        &batch.leaves,
    )
    .await?;
    gw.metrics
        .ledger_integrated(batch.state.size, batch.covers_queue_at);
    Ok(())
}

/// A publication task's outcome.
async fn joined(task: tokio::task::JoinHandle<Result<(), LedgerError>>) -> Result<(), LedgerError> {
    task.await
        .map_err(|e| LedgerError::Tree(format!("ledger publication task: {e}")))?
}

/// A batch integrated into the index, still to publish.
struct Integrated {
    first: u64,
    state: TreeState,
    tiles: Vec<(Tile, Vec<u8>)>,
    leaves: Vec<(Vec<u8>, LeafRecord, Kind)>,
    covers_queue_at: Option<f64>,
}

/// A batch read and hashed, to integrate.
struct Prepared {
    first: u64,
    /// The tree after this batch, with the fencing token its commit checks.
    next: TreeState,
    tiles: Vec<(Tile, Vec<u8>)>,
    leaves: Vec<(Vec<u8>, LeafRecord, Kind)>,
    /// When the batch was read, if it took the whole queue: once it is
    /// published, every statement queued before then is covered.
    covers_queue_at: Option<f64>,
    started: std::time::Instant,
    read: Duration,
    hashed: Duration,
}

/// The end of a batch whose integration is still committing: the tree size
/// it makes, its last queue key, and the fencing token it holds.
struct Ahead {
    size: u64,
    after: Vec<u8>,
    fence: u64,
}

impl Ledger {
    /// The lease's fencing token if this process holds it with more than
    /// half of its term left.
    ///
    /// Timed by the monotonic clock, as other gateways watch the lease
    /// (`watch_lease`): a holder whose system clock steps back still renews
    /// on time instead of losing the lease to a watcher.
    fn held_lease(&self) -> Option<u64> {
        let held = *self.lease.lock().unwrap_or_else(|e| e.into_inner());
        held.and_then(|(fence, renewed)| {
            (renewed.elapsed() < Duration::from_millis(LEASE_MS / 2)).then_some(fence)
        })
    }

    /// Notes the lease taken or renewed (for a term) now.
    fn remember_lease(&self, fence: u64) {
        *self.lease.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((fence, std::time::Instant::now()));
    }

    fn forget_lease(&self) {
        *self.lease.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Notes another gateway's lease as found now; the watch restarts
    /// whenever it changes (each renewal does).
    fn watch_lease(&self, theirs: lx::LeaseRecord) {
        let mut w = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        if w.is_none_or(|(seen, _)| seen != theirs) {
            *w = Some((theirs, std::time::Instant::now()));
        }
    }

    /// Whether this gateway holds the integrator lease, as far as it knows
    /// (taken or renewed within a term): only the integrator sees each
    /// checkpoint as it is signed.
    pub fn integrating(&self) -> bool {
        self.lease
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|(_, at)| at.elapsed() < Duration::from_millis(LEASE_MS))
    }

    /// The watched lease, if it has gone a whole term unchanged by this
    /// process's monotonic clock (its holder is gone, whatever its
    /// `until_ms` says).
    fn stale_lease(&self) -> Option<lx::LeaseRecord> {
        let w = *self.watched.lock().unwrap_or_else(|e| e.into_inner());
        w.filter(|(_, since)| since.elapsed() >= Duration::from_millis(LEASE_MS))
            .map(|(l, _)| l)
    }
}

/// Reads and hashes the next batch (`None`: this gateway does not hold the
/// lease, or nothing is queued). Without `ahead` it starts from the index's
/// tree; with `ahead`, from the end of the batch still committing. With
/// `catch_up` (nothing in flight) it first publishes whatever the index holds
/// beyond the newest checkpoint, as after a crash.
async fn prepare_round<S: Store>(
    gw: &Gateway<S>,
    ledger: &Ledger,
    catch_up: bool,
    ahead: Option<Ahead>,
    known: &mut HashMap<u64, TreeHash>,
) -> Result<Option<Prepared>, LedgerError> {
    let started = std::time::Instant::now();
    // Every statement queued before now is in this batch or an earlier one,
    // if the batch takes the whole queue.
    let read_at = unix_now_secs_f64();
    let (first, fence, pending) = match ahead {
        Some(Ahead { size, after, fence }) => {
            let after = &after;
            let pending = indexer::run(&gw.store, |tx| async move {
                lx::pending_batch_tx(&tx, Some(after), BATCH_ENTRIES, BATCH_BYTES).await
            })
            .await?;
            (size, fence, pending)
        }
        None => {
            let Some(fence) = current_lease(gw, ledger).await? else {
                return Ok(None); // another gateway integrates
            };
            let (state, cp_size, pending) = indexer::run(&gw.store, |tx| async move {
                let state = lx::tree_state_tx(&tx).await?;
                let cp_size = lx::checkpoint_size_tx(&tx).await?;
                let pending = lx::pending_batch_tx(&tx, None, BATCH_ENTRIES, BATCH_BYTES).await?;
                Ok::<_, indexer::schema::SchemaError>((state, cp_size, pending))
            })
            .await?;
            if catch_up {
                match cp_size {
                    // After a crash between integration and publication, or
                    // on the first start: publish what the index holds.
                    Some(cp) if cp >= state.size => {
                        publish_checkpoint(gw, ledger).await?;
                        ledger.published.send_if_modified(|s| {
                            let grew = *s < cp;
                            *s = (*s).max(cp);
                            grew
                        });
                    }
                    cp => publish_state(gw, ledger, cp.unwrap_or(0), &state, None, &[]).await?,
                }
                if pending.records.is_empty() {
                    gw.metrics
                        .ledger_integrated(state.size.max(cp_size.unwrap_or(0)), Some(read_at));
                }
            }
            // Hashes kept from an earlier run may predate another
            // integrator's batches.
            known.clear();
            (state.size, fence, pending)
        }
    };
    if pending.records.is_empty() {
        return Ok(None);
    }
    let covers_queue_at = pending.whole.then_some(read_at);

    // Leaves and new tree hashes.
    let read = started.elapsed();
    let leaves: Vec<(Vec<u8>, LeafRecord, Kind)> = pending
        .records
        .into_iter()
        .map(|(key, p)| {
            let (leaf, kind) = leaf_of(p.evidence, p.salt, p.statement);
            (key, leaf, kind)
        })
        .collect();
    let new_size = first + leaves.len() as u64;
    let (root, tiles) = extend_tree(gw, known, first, &leaves).await?;
    let hashed = started.elapsed();
    Ok(Some(Prepared {
        first,
        next: TreeState {
            size: new_size,
            root: root.0,
            fence,
        },
        tiles,
        leaves,
        covers_queue_at,
        started,
        read,
        hashed,
    }))
}

/// The fencing token of the integrator lease, taken or renewed when less
/// than half of it is left (`None`: another gateway holds it).
async fn current_lease<S: Store>(
    gw: &Gateway<S>,
    ledger: &Ledger,
) -> Result<Option<u64>, LedgerError> {
    let now = gw.clock.now_ms();
    if let Some(fence) = ledger.held_lease() {
        return Ok(Some(fence));
    }
    let owner = ledger.owner;
    let stale = ledger.stale_lease();
    let lease = indexer::run(&gw.store, |tx| async move {
        lx::acquire_lease_tx(&tx, owner, now, LEASE_MS, stale).await
    })
    .await?;
    match lease {
        Ok(fence) => {
            if let Some(s) = stale.filter(|s| s.fence < fence && s.until_ms >= now) {
                tracing::warn!(
                    fence,
                    until_ms = s.until_ms,
                    "took over an integrator lease left unrenewed for a whole term (its \
                     holder's clock ran ahead, and it stopped)"
                );
            }
            ledger.remember_lease(fence);
            // From now on this gateway's checkpoint time is the cluster's:
            // exported, and until its first checkpoint, aging from when
            // the oldest entry still waiting was made (from now when none
            // waits), so an integrator restarting over a stuck queue does
            // not start the age again.
            if gw.metrics.checkpoint_time.known().is_none() {
                gw.metrics.checkpoint_time.start_at(
                    oldest_waiting_secs(gw)
                        .await
                        .unwrap_or_else(unix_now_secs_f64),
                );
            }
            Ok(Some(fence))
        }
        Err(theirs) => {
            ledger.forget_lease();
            ledger.watch_lease(theirs);
            Ok(None)
        }
    }
}

/// When the oldest statement still waiting for the ledger was made (Unix
/// seconds, by its own stamp), if any waits and it can be read.
async fn oldest_waiting_secs<S: Store>(gw: &Gateway<S>) -> Option<f64> {
    let oldest = indexer::run(&gw.store, |tx| async move {
        lx::pending_tx(&tx, 1, 1 << 20).await
    })
    .await
    .ok()?;
    let (_, record) = oldest.into_iter().next()?;
    let statement = pl::Statement::decode(&record.statement).ok()?;
    Some((statement.time_ms as f64 / 1e3).min(unix_now_secs_f64()))
}

/// Integrates a prepared batch in one transaction: checks the fence and that
/// the tree is still the size the batch extends, renews the lease, writes
/// the openings and tiles and dequeues the batch.
async fn commit_round<S: Store>(
    gw: Arc<Gateway<S>>,
    ledger: Arc<Ledger>,
    p: Prepared,
) -> Result<Integrated, LedgerError> {
    let (first, fence, owner) = (p.first, p.next.fence, ledger.owner);
    let now = gw.clock.now_ms();
    let committing = p.started.elapsed();
    let outcome = indexer::run(&gw.store, |tx| {
        let (leaves, rows, next) = (&p.leaves, tile_rows(&p.tiles), &p.next);
        async move {
            lx::check_fence_tx(&tx, fence, first).await?;
            lx::renew_lease_tx(&tx, owner, fence, now, LEASE_MS);
            lx::integrate_tx(&tx, first, leaves, &rows, next);
            Ok::<_, IntegrateError>(())
        }
    })
    .await;
    if let Err(e) = outcome {
        ledger.forget_lease();
        return Err(e.into());
    }
    ledger.remember_lease(fence);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    tracing::debug!(
        size = p.next.size,
        entries = p.leaves.len(),
        read_ms = ms(p.read),
        hash_ms = ms(p.hashed - p.read),
        wait_ms = ms(committing - p.hashed),
        integrate_ms = ms(p.started.elapsed() - committing),
        "ledger integrated"
    );
    // The tiles and openings were just computed: publication needs not read
    // them back.
    Ok(Integrated {
        first,
        state: p.next,
        tiles: p.tiles,
        leaves: p.leaves,
        covers_queue_at: p.covers_queue_at,
    })
}

/// Writes the tiles and entry bundles that change from `old` to `state.size`,
/// then signs and publishes the checkpoint. `tiles` and `fresh` (the openings
/// of leaves `old..`) are what the integration just computed; whatever is not
/// given is read from the index.
async fn publish_state<S: Store>(
    gw: &Gateway<S>,
    ledger: &Ledger,
    old: u64,
    state: &TreeState,
    tiles: Option<Vec<(Tile, Vec<u8>)>>,
    fresh: &[(Vec<u8>, LeafRecord, Kind)],
) -> Result<(), LedgerError> {
    let started = std::time::Instant::now();
    match tiles {
        Some(tiles) => write_published(gw, ledger, old, state.size, tiles, fresh).await?,
        // A catch-up from the index (after a crash: a few batches; after a
        // restore whose tiles were lost: the whole log) is written a
        // bounded piece at a time, so that no piece holds more than a few
        // thousand leaves in memory nor makes one archive file of them
        // all. Each piece's tiles are the tree's at its end (partial tiles
        // have paths of their own, by width); only the last is signed.
        None => {
            let mut at = old;
            while at < state.size {
                let to = state.size.min((at / CATCH_UP_LEAVES + 1) * CATCH_UP_LEAVES);
                let tiles = stored_tiles(gw, at, to).await?;
                write_published(gw, ledger, at, to, tiles, &[]).await?;
                at = to;
            }
        }
    }
    let written = started.elapsed();
    let note = pl::sign_checkpoint(
        &ledger.signer_key,
        &ledger.origin,
        state.size,
        TreeHash(state.root),
    )?;
    let size = state.size;
    indexer::run(&gw.store, |tx| {
        let note = note.as_bytes();
        async move { lx::put_checkpoint_tx(&tx, size, note).await }
    })
    .await?;
    publish_checkpoint(gw, ledger).await?;
    ledger.published.send_if_modified(|s| {
        let grew = *s < size;
        *s = (*s).max(size);
        grew
    });
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    tracing::debug!(
        size,
        write_ms = ms(written),
        sign_ms = ms(started.elapsed() - written),
        "ledger published"
    );
    Ok(())
}

/// Leaves a catch-up publishes per piece (see [`publish_state`]): a whole
/// number of tiles.
const CATCH_UP_LEAVES: u64 = 16 << TILE_HEIGHT;

/// Writes what a checkpoint of size `size` needs beyond one of size `old`,
/// durably: the openings archive's run for leaves `old..size`, then the
/// hash `tiles` and the entry bundles (`fresh`: the leaves' openings when
/// just integrated; otherwise read from the index).
async fn write_published<S: Store>(
    gw: &Gateway<S>,
    ledger: &Ledger,
    old: u64,
    size: u64,
    tiles: Vec<(Tile, Vec<u8>)>,
    fresh: &[(Vec<u8>, LeafRecord, Kind)],
) -> Result<(), LedgerError> {
    let started = std::time::Instant::now();
    let mut files = Vec::new();
    for (tile, data) in tiles {
        files.push((pl::tile_path(&tile), data));
        if tile.level() != 0 {
            continue;
        }
        let start = tile.level_index() << TILE_HEIGHT;
        let end = start + u64::from(tile.width());
        // A partial tile's head (or all of it when nothing fresh is given)
        // comes from the index; `fresh` starts at `old`.
        let split = if fresh.is_empty() {
            end
        } else {
            old.clamp(start, end)
        };
        let stored = if split > start {
            indexer::run(&gw.store, |tx| async move {
                lx::leaves_tx(&tx, start..split).await
            })
            .await?
        } else {
            Vec::new()
        };
        let from_fresh = fresh
            .get((split.saturating_sub(old)) as usize..(end.saturating_sub(old)) as usize)
            .unwrap_or(&[]);
        let commitments: Vec<&[u8]> = stored
            .iter()
            .map(|l| &l.commitment[..])
            .chain(from_fresh.iter().map(|(_, l, _)| &l.commitment[..]))
            .collect();
        if commitments.len() as u64 != end - start {
            return Err(LedgerError::Tree(format!(
                "leaves {start}..{end}: {} openings found",
                commitments.len()
            )));
        }
        let mut data_tile = tile;
        data_tile.set_is_data();
        files.push((pl::tile_path(&data_tile), pl::entry_bundle(commitments)));
    }
    let openings = match archive_run(gw, old, size, fresh).await? {
        Some(run) => vec![(lx::archive_name(old, size), lx::encode_archive(&run))],
        None => Vec::new(),
    };
    let prepared = started.elapsed();
    // Openings and tiles durable before the checkpoint that names them is
    // signed: every leaf a checkpoint covers can be recovered. The openings
    // first: a tile published for leaves the archive lacks would, after a
    // lost index, be overwritten by different leaves at the same indexes
    // (recovery rebuilds only as far as the archive goes), and published
    // tiles never change.
    put_durably(&ledger.openings, ledger.openings_dir.clone(), openings).await?;
    ledger.publish_all(files).await?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    tracing::debug!(
        old,
        size,
        prepare_ms = ms(prepared),
        write_ms = ms(started.elapsed() - prepared),
        "ledger tiles and openings written"
    );
    Ok(())
}

/// The openings archive's run for leaves `old..size` (`None`: no leaves):
/// `fresh` when given (the leaves just integrated), else read from the index,
/// each with its manifest header as it stands now.
async fn archive_run<S: Store>(
    gw: &Gateway<S>,
    old: u64,
    size: u64,
    fresh: &[(Vec<u8>, LeafRecord, Kind)],
) -> Result<Option<lx::ArchiveRun>, LedgerError> {
    if size <= old {
        return Ok(None);
    }
    let mut read = Vec::new();
    if fresh.is_empty() {
        // Only after a crash or a restore (a few batches; a whole log
        // when its tiles were lost): a tile per transaction keeps each read
        // short whatever the statements' sizes.
        let mut at = old;
        while at < size {
            let to = size.min(at + (1 << TILE_HEIGHT));
            let got = indexer::run(
                &gw.store,
                |tx| async move { lx::leaves_tx(&tx, at..to).await },
            )
            .await?;
            if got.len() as u64 != to - at {
                return Err(LedgerError::Tree(format!(
                    "leaves {at}..{to}: {} openings found",
                    got.len()
                )));
            }
            read.extend(got.into_iter().map(|l| {
                let kind = statement_kind(&l.statement).unwrap_or(Kind::Admin);
                (l, kind)
            }));
            at = to;
        }
    }
    let leaves: Vec<(&LeafRecord, Kind)> = if fresh.is_empty() {
        read.iter().map(|(l, k)| (l, *k)).collect()
    } else {
        fresh.iter().map(|(_, l, k)| (l, *k)).collect()
    };
    if leaves.len() as u64 != size - old {
        return Err(LedgerError::Tree(format!(
            "leaves {old}..{size}: {} openings given",
            leaves.len()
        )));
    }
    // Hash-only notarizations have no manifest to archive. A tile's worth
    // per transaction: a catch-up over a whole log (its tiles lost, then
    // `recover-index --trust-archive`) must not outlive one transaction.
    let mut manifests = Vec::with_capacity(leaves.len());
    for chunk in leaves.chunks(1 << TILE_HEIGHT) {
        if chunk.iter().all(|(_, k)| *k == Kind::Notarized) {
            manifests.extend(std::iter::repeat_n(None, chunk.len()));
            continue;
        }
        let got = indexer::run(&gw.store, |tx| async move {
            futures::future::try_join_all(chunk.iter().map(|(l, kind)| {
                let tx = &tx;
                async move {
                    if *kind == Kind::Notarized {
                        return Ok(None);
                    }
                    schema::get_any_manifest_tx(tx, l.evidence).await
                }
            }))
            .await
        })
        .await?;
        manifests.extend(got);
    }
    let leaves = leaves
        .iter()
        .zip(manifests)
        .map(|((l, _), m)| lx::ArchivedLeaf {
            evidence: l.evidence,
            salt: l.salt,
            statement: l.statement.clone(),
            expunged: m.as_ref().is_some_and(|(_, x)| *x),
            manifest: m.map(|(h, _)| h.encode()),
        })
        .collect();
    Ok(Some(lx::ArchiveRun { first: old, leaves }))
}

/// The hash tiles that changed from `old` to `size`, as the index holds them.
async fn stored_tiles<S: Store>(
    gw: &Gateway<S>,
    old: u64,
    size: u64,
) -> Result<Vec<(Tile, Vec<u8>)>, LedgerError> {
    let tiles = Tile::new_tiles(TILE_HEIGHT, old, size);
    let ids: Vec<(u8, u64)> = tiles.iter().map(|t| (t.level(), t.level_index())).collect();
    let got = indexer::run(&gw.store, |tx| {
        let ids = &ids;
        async move { lx::tiles_tx(&tx, ids).await }
    })
    .await?;
    tiles
        .into_iter()
        .zip(got)
        .map(|(tile, data)| {
            let want = tile.width() as usize * tlog_tiles::HASH_SIZE;
            match data {
                Some(mut d) if d.len() >= want => {
                    d.truncate(want);
                    Ok((tile, d))
                }
                _ => Err(LedgerError::Tree(format!(
                    "hash tile {} is not in the index",
                    pl::tile_path(&tile)
                ))),
            }
        })
        .collect()
}

/// Writes the index's newest checkpoint to the published `checkpoint` file
/// unless this process already wrote that one. Called every round, so after a
/// crash between storing a checkpoint and publishing it the file catches up
/// on the next round (receipts and proofs are served from the index, never
/// from this file).
async fn publish_checkpoint<S: Store>(gw: &Gateway<S>, ledger: &Ledger) -> Result<(), LedgerError> {
    use std::sync::atomic::Ordering;
    // Again while the index moved on meanwhile: another gateway's newer
    // checkpoint, stored in the index before it is published, may have been
    // written over (a bucket without conditional writes; see
    // `publish_if_newer`), and is published again.
    let mut published = None;
    for _ in 0..3 {
        let (size, note) = indexer::run(&gw.store, |tx| async move {
            Ok::<_, indexer::schema::SchemaError>((
                lx::checkpoint_size_tx(&tx).await?,
                lx::checkpoint_tx(&tx).await?,
            ))
        })
        .await?;
        let (Some(size), Some(note)) = (size, note) else {
            return Ok(());
        };
        if published == Some(size) || ledger.checkpoint_file.load(Ordering::Acquire) >= size {
            return Ok(());
        }
        if !ledger.publish_checkpoint_note(size, note).await? {
            tracing::debug!(size, "the published checkpoint is already at least as new");
        }
        ledger.checkpoint_file.fetch_max(size, Ordering::AcqRel);
        published = Some(size);
    }
    Ok(())
}

/// The local-directory half of [`Ledger::publish_checkpoint_note`]: under
/// an exclusive advisory lock (`flock`) on the directory itself, which every
/// gateway publishing there takes whatever path it names the directory by,
/// reads the published checkpoint and, if it is smaller, writes the new one
/// to a temporary file, fsyncs it, renames it into place and fsyncs the
/// directory, all before the lock goes (one blocking task: nothing lands
/// after the lock is released).
async fn publish_local_if_newer(
    dir: &std::path::Path,
    vkey: &str,
    size: u64,
    note: Vec<u8>,
) -> Result<bool, LedgerError> {
    use std::io::Write as _;
    let (dir, vkey) = (dir.to_path_buf(), vkey.to_owned());
    let wrote = tokio::task::spawn_blocking(move || {
        let lock = std::fs::File::open(&dir)?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)?;
        let published = match std::fs::read(dir.join(CHECKPOINT_FILE)) {
            Ok(bytes) => published_size(&bytes, &vkey),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        if published >= size {
            return Ok(false);
        }
        let tmp = dir.join(format!(
            ".{CHECKPOINT_FILE}.{:016x}.tmp",
            rand::random::<u64>()
        ));
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&note).and_then(|()| f.sync_all()))
            .and_then(|()| std::fs::rename(&tmp, dir.join(CHECKPOINT_FILE)));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        // The directory's own fsync makes the rename durable.
        lock.sync_all()?;
        Ok(true)
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()))??;
    Ok(wrote)
}

/// The bucket half of [`Ledger::publish_checkpoint_note`]: reads the
/// published checkpoint and its version, and writes `note` only over that
/// version (or only where there is none), again after any other writer got
/// in between; unconditionally, with a warning, when the conditional write
/// fails otherwise (a store that takes no conditional writes), unless one
/// has succeeded before (`takes_conditional`, set here): then the failure is
/// returned, and the next round tries again.
async fn publish_if_newer(
    store: &dyn ObjectStore,
    vkey: &str,
    size: u64,
    note: Vec<u8>,
    takes_conditional: &std::sync::atomic::AtomicBool,
) -> Result<bool, LedgerError> {
    use object_store::{Error as OsError, PutMode, UpdateVersion};
    use std::sync::atomic::Ordering;
    let path = StorePath::from(CHECKPOINT_FILE);
    // Conditional writes that failed other than by losing a race.
    let mut refused = 0;
    for _ in 0..16 {
        let (published, mode) = match store.get(&path).await {
            Ok(got) => {
                let version = UpdateVersion {
                    e_tag: got.meta.e_tag.clone(),
                    version: got.meta.version.clone(),
                };
                let bytes = got.bytes().await?;
                (published_size(&bytes, vkey), PutMode::Update(version))
            }
            Err(OsError::NotFound { .. }) => (0, PutMode::Create),
            Err(e) => return Err(e.into()),
        };
        if published >= size {
            return Ok(false);
        }
        let conditional = match &mode {
            PutMode::Update(v) => v.e_tag.is_some() || v.version.is_some(),
            _ => true,
        };
        let payload = PutPayload::from(note.clone());
        // Only an `If-Match` that worked shows the bucket takes what every
        // later write needs (some take `If-None-Match` alone).
        let update = matches!(mode, PutMode::Update(_));
        let put = if conditional {
            store.put_opts(&path, payload, mode.into()).await
        } else {
            Err(OsError::NotImplemented)
        };
        match put {
            Ok(_) => {
                if update && conditional {
                    takes_conditional.store(true, Ordering::Relaxed);
                }
                return Ok(true);
            }
            // Another writer got in between: read what it wrote.
            Err(OsError::Precondition { .. } | OsError::AlreadyExists { .. }) => continue,
            // A transient failure (a 503, a timeout) is tried again: written
            // unconditionally over another gateway's newer checkpoint, it
            // would make the published tree shrink.
            Err(OsError::Generic { .. }) if refused < 2 => {
                refused += 1;
                tokio::time::sleep(std::time::Duration::from_millis(200 << refused)).await;
                continue;
            }
            // The store took conditional writes before: this one failed for
            // now (a longer outage), not for good.
            Err(e) if takes_conditional.load(Ordering::Relaxed) => {
                tracing::warn!(
                    error = %e,
                    "a conditional write of the published checkpoint failed on a bucket \
                     that took them before; trying again next round rather than writing \
                     over whatever is there"
                );
                return Err(e.into());
            }
            // A store that takes no conditional writes says so with an error
            // object_store cannot tell from any other (a 400 or 501), every
            // time: write as before conditional writes were used, so the
            // ledger goes on, and say that the checkpoint can then go back.
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "a conditional write of the published checkpoint failed; \
                     writing it unconditionally (if the tiles bucket takes no \
                     If-Match, the checkpoint can go back when several gateways publish)"
                );
                store.put(&path, PutPayload::from(note)).await?;
                return Ok(true);
            }
        }
    }
    Err(LedgerError::Tree(
        "the published checkpoint kept changing under 16 conditional writes".into(),
    ))
}

/// The published checkpoint's file name in the tiles store.
const CHECKPOINT_FILE: &str = "checkpoint";

/// The tree size of a published checkpoint note; 0 for one that does not
/// verify under this ledger's key (garbled, or another log's), which is then
/// replaced.
fn published_size(note: &[u8], vkey: &str) -> u64 {
    match std::str::from_utf8(note)
        .ok()
        .and_then(|n| pl::verify_checkpoint(n, vkey).ok())
    {
        Some(cp) => cp.size,
        None => {
            tracing::warn!(
                "the published checkpoint does not verify under this ledger's key; replacing it"
            );
            0
        }
    }
}

/// The newest checkpoint note and what it says.
async fn newest_checkpoint<S: Store>(
    gw: &Gateway<S>,
    ledger: &Ledger,
) -> Result<Option<(String, pl::VerifiedCheckpoint)>, ApiError> {
    let note = indexer::run(&gw.store, |tx| async move { lx::checkpoint_tx(&tx).await }).await?;
    let Some(note) = note else { return Ok(None) };
    let note = String::from_utf8(note).map_err(|_| ApiError::Internal)?;
    let cp = pl::verify_checkpoint(&note, &ledger.verifier_key).map_err(|e| {
        tracing::error!(error = %e, "stored checkpoint does not verify");
        ApiError::Internal
    })?;
    Ok(Some((note, cp)))
}

fn proof_err(e: LedgerError) -> ApiError {
    tracing::error!(error = %e, "ledger proof failed");
    ApiError::Internal
}

/// The receipt of the first statement of `kinds` about `evidence`, against the
/// newest checkpoint; `None` while no checkpoint covers it yet.
pub async fn receipt<S: Store>(
    gw: &Gateway<S>,
    evidence: EvidenceId,
    kinds: &[Kind],
) -> Result<Option<Receipt>, ApiError> {
    let first = indexer::run(&gw.store, |tx| async move {
        lx::first_leaf_of_tx(&tx, evidence, kinds).await
    })
    .await?;
    let Some((index, _)) = first else {
        return Ok(None);
    };
    leaf_receipt(gw, evidence, index).await
}

/// Whether a statement of `kind` about `evidence` is under a signed
/// checkpoint, and so in the openings archive (written before any
/// checkpoint that covers it is signed): a lost index rebuilt from the
/// archive will know of it. True where no ledger is configured.
pub async fn statement_published<S: Store>(
    gw: &Gateway<S>,
    evidence: EvidenceId,
    kind: Kind,
) -> Result<bool, ApiError> {
    if gw.ledger.is_none() {
        return Ok(true);
    }
    Ok(indexer::run(&gw.store, |tx| async move {
        let size = lx::checkpoint_size_tx(&tx).await?.unwrap_or(0);
        // The first of its kind: it is under the checkpoint if any is.
        let first = lx::first_leaf_of_tx(&tx, evidence, &[kind]).await?;
        Ok::<_, indexer::schema::SchemaError>(first.is_some_and(|(index, _)| index < size))
    })
    .await?)
}

/// Re-signs the index's newest checkpoint, signed for `old_vkey`, with
/// `new_skey` under `new_origin`: the same tree at the same size, for a log
/// key rotated with a new origin (`custodia ledger rotate-key`, the gateway
/// stopped). Receipts are then served against checkpoints of the new
/// origin and key, every later checkpoint is signed so, and the checkpoint
/// file is published anew when the gateway starts; receipts issued before
/// still verify with the old key. Returns the size re-signed (`None`: no
/// checkpoint yet). Run again after a crash, it finds the checkpoint
/// signed with the new key already and leaves it.
pub async fn resign_newest_checkpoint<S: indexer::KvStore>(
    store: &S,
    old_vkey: &str,
    new_skey: &str,
    new_origin: &str,
) -> Result<Option<u64>, LedgerError> {
    let note = indexer::run(store, |tx| async move { lx::checkpoint_tx(&tx).await })
        .await
        .map_err(|e| LedgerError::Tree(format!("the index's checkpoint: {e}")))?;
    let Some(note) = note else { return Ok(None) };
    let note = String::from_utf8(note)
        .map_err(|_| LedgerError::Tree("the index's checkpoint is not text".into()))?;
    let new_vkey = verifier_key_of(new_skey)
        .ok_or_else(|| LedgerError::Tree("not a log signing key".into()))?;
    if let Ok(done) = pl::verify_checkpoint(&note, &new_vkey) {
        return Ok(Some(done.size));
    }
    let cp = pl::verify_checkpoint(&note, old_vkey).map_err(|e| {
        LedgerError::Tree(format!(
            "the index's checkpoint does not verify with the current key: {e}"
        ))
    })?;
    let resigned = pl::sign_checkpoint(new_skey, new_origin, cp.size, cp.root)?;
    let size = cp.size;
    let replaced = indexer::run(store, |tx| {
        let resigned = resigned.as_bytes();
        async move { lx::replace_checkpoint_tx(&tx, size, resigned).await }
    })
    .await
    .map_err(|e| LedgerError::Tree(format!("storing the re-signed checkpoint: {e}")))?;
    if !replaced {
        return Err(LedgerError::Tree(
            "the index's checkpoint changed meanwhile (is a gateway running?)".into(),
        ));
    }
    Ok(Some(size))
}

impl Ledger {
    /// How many of the witnesses configured now vouch for `note` (0 for a
    /// note this log's key does not verify, one signed before a rotation):
    /// what decides which witnessed checkpoint a receipt takes, and which
    /// one is kept aside for earlier leaves.
    pub fn witness_weight(&self, note: &str) -> usize {
        let id = *blake3::hash(note.as_bytes()).as_bytes();
        let lock = || self.weighed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&(_, w)) = lock().iter().find(|(n, _)| *n == id) {
            return w;
        }
        let weight = if pl::verify_checkpoint(note, &self.verifier_key).is_err() {
            0
        } else {
            let keys: Vec<String> = self
                .witnesses
                .iter()
                .map(|w| w.key.trim().to_owned())
                .collect();
            protocol::witness::cosigned_by(note, &keys).len()
        };
        let mut weighed = lock();
        if weighed.len() >= 4 {
            weighed.remove(0);
        }
        weighed.push((id, weight));
        weight
    }
}

/// The receipt of leaf `index` against the newest checkpoint; `None` while no
/// checkpoint covers it.
pub async fn leaf_receipt<S: Store>(
    gw: &Gateway<S>,
    subject: EvidenceId,
    index: u64,
) -> Result<Option<Receipt>, ApiError> {
    let Some(ledger) = gw.ledger.as_ref() else {
        return Ok(None);
    };
    // Of the witnessed checkpoints that cover the leaf (the newest, and the
    // best-cosigned earlier one kept aside), the one most witnesses signed,
    // the newer of two as well signed: the receipt is then upgraded with
    // cosignatures, and never loses any it had because a newer checkpoint
    // has so far fewer. Else the newest checkpoint.
    let witnessed = indexer::run(&gw.store, |tx| async move {
        Ok::<_, indexer::schema::SchemaError>([
            lx::witnessed_tx(&tx).await?,
            lx::kept_witnessed_tx(&tx).await?,
        ])
    })
    .await?;
    let chosen = witnessed
        .into_iter()
        .flatten()
        .filter(|w| w.size > index)
        .filter_map(|w| {
            let cp = pl::verify_checkpoint(&w.note, &ledger.verifier_key).ok()?;
            Some((ledger.witness_weight(&w.note), w.note, cp))
        })
        .max_by_key(|(weight, _, cp)| (*weight, cp.size))
        .map(|(_, note, cp)| (note, cp));
    let chosen = match chosen {
        Some(c) => Some(c),
        None => newest_checkpoint(gw, ledger).await?,
    };
    let chosen = match chosen {
        Some(c) if c.1.size > index => Some(c),
        // The newest time-stamped checkpoint, when it covers the leaf.
        other => {
            let stamped =
                indexer::run(&gw.store, |tx| async move { lx::stamped_tx(&tx).await }).await?;
            match stamped {
                Some(s) if s.size > index => pl::verify_checkpoint(&s.note, &ledger.verifier_key)
                    .ok()
                    .map(|cp| (s.note, cp))
                    .or(other),
                _ => other,
            }
        }
    };
    let Some((note, cp)) = chosen else {
        return Ok(None);
    };
    if index >= cp.size {
        return Ok(None);
    }
    let leaf = indexer::run(&gw.store, |tx| async move { lx::leaf_tx(&tx, index).await })
        .await?
        .ok_or(ApiError::Internal)?;
    if leaf.evidence != subject {
        // Never a receipt for another statement than the one asked.
        tracing::error!(leaf = index, evidence = %subject, found = %leaf.evidence, "index links an id to another statement's leaf");
        return Err(ApiError::Internal);
    }
    let mut known = HashMap::new();
    let base = tlog_tiles::stored_hash_index(0, cp.size);
    let (proof, _) = with_hashes(gw, &mut known, base, |r| {
        tlog_tiles::prove_record(cp.size, index, r)
    })
    .await
    .map_err(proof_err)?;
    let mut receipt = Receipt::new(&leaf.statement, &leaf.salt, index, &note, &proof);
    receipt.timestamp = timestamp_for(gw, cp.size).await?;
    Ok(Some(receipt))
}

/// The stored RFC 3161 response over the checkpoint of `size`, base64.
async fn timestamp_for<S: Store>(gw: &Gateway<S>, size: u64) -> Result<Option<String>, ApiError> {
    use base64::Engine as _;
    let der = indexer::run(
        &gw.store,
        |tx| async move { lx::timestamp_tx(&tx, size).await },
    )
    .await?;
    Ok(der.map(|d| base64::engine::general_purpose::STANDARD.encode(d)))
}

/// Receipts for many subjects at once (one statement of `kind` each), against
/// one checkpoint, sharing index reads: the hash-only notarization path.
pub async fn receipts_for<S: Store>(
    gw: &Gateway<S>,
    ids: &[EvidenceId],
    kind: Kind,
) -> Result<Vec<Option<Receipt>>, ApiError> {
    let indexes = indexer::run(&gw.store, |tx| async move {
        leaf_indexes_tx(&tx, ids.iter().copied(), kind).await
    })
    .await?;
    receipts_at(gw, ids, &indexes).await
}

/// The leaf of the first statement of `kind` about each of `ids`, if any.
async fn leaf_indexes_tx<T: indexer::kv::Transaction>(
    tx: &T,
    ids: impl Iterator<Item = EvidenceId>,
    kind: Kind,
) -> Result<Vec<Option<u64>>, indexer::schema::SchemaError> {
    let reads = ids.map(|id| async move { lx::first_leaf_of_tx(tx, id, &[kind]).await });
    let found = futures::future::try_join_all(reads).await?;
    Ok(found.into_iter().map(|l| l.map(|(i, _)| i)).collect())
}

/// The receipts of leaves `indexes` about `subjects` against the newest
/// checkpoint (`None` where it does not cover the leaf, no leaf is given, or
/// the leaf is about another subject).
async fn receipts_at<S: Store>(
    gw: &Gateway<S>,
    subjects: &[EvidenceId],
    indexes: &[Option<u64>],
) -> Result<Vec<Option<Receipt>>, ApiError> {
    let Some(ledger) = gw.ledger.as_ref() else {
        return Ok(vec![None; indexes.len()]);
    };
    let Some((note, cp)) = newest_checkpoint(gw, ledger).await? else {
        return Ok(vec![None; indexes.len()]);
    };
    let covered: Vec<u64> = indexes
        .iter()
        .flatten()
        .copied()
        .filter(|i| *i < cp.size)
        .collect();
    let leaves: HashMap<u64, LeafRecord> = indexer::run(&gw.store, |tx| {
        let covered = &covered;
        async move { lx::leaves_at_tx(&tx, covered).await }
    })
    .await?
    .into_iter()
    .collect();
    let mut known = HashMap::new();
    let base = tlog_tiles::stored_hash_index(0, cp.size);
    // Every proof in one pass: missing hashes of all of them are fetched
    // together, a few rounds for the whole batch.
    let (proofs, _) = with_hashes(gw, &mut known, base, |r| {
        let all: Vec<_> = covered
            .iter()
            .map(|i| tlog_tiles::prove_record(cp.size, *i, r))
            .collect();
        if all.iter().any(Result::is_err) {
            return Err(tlog_tiles::Error::IndexesNotInTree);
        }
        Ok(all.into_iter().flatten().collect::<Vec<_>>())
    })
    .await
    .map_err(proof_err)?;
    let proofs: HashMap<u64, Vec<TreeHash>> = covered.iter().copied().zip(proofs).collect();
    Ok(indexes
        .iter()
        .zip(subjects)
        .map(|(i, subject)| {
            let i = (*i)?;
            let leaf = leaves.get(&i)?;
            if leaf.evidence != *subject {
                // Never a receipt for another statement than the one asked.
                tracing::error!(leaf = i, evidence = %subject, found = %leaf.evidence, "index links an id to another statement's leaf");
                return None;
            }
            let proof = proofs.get(&i)?;
            Some(Receipt::new(&leaf.statement, &leaf.salt, i, &note, proof))
        })
        .collect())
}

/// Waits until this gateway publishes a newer checkpoint, or a quarter second
/// has passed (another gateway may hold the integrator lease, and its
/// checkpoints wake no one here), or `deadline`; `false` once the deadline has
/// passed or the ledger stopped.
async fn next_checkpoint(
    published: &mut watch::Receiver<u64>,
    deadline: tokio::time::Instant,
) -> bool {
    let poll = (tokio::time::Instant::now() + Duration::from_millis(250)).min(deadline);
    match tokio::time::timeout_at(poll, published.changed()).await {
        Ok(Ok(())) => true,
        Ok(Err(_)) => false,
        Err(_) => tokio::time::Instant::now() < deadline,
    }
}

/// Waits (up to the configured time) until a checkpoint covers every one of
/// the notarizations `ids`, queued at `placed` (chunk, position: what
/// `lx::enqueue_notarizations_tx` returned); returns the receipts there are
/// by then.
pub async fn wait_for_receipts<S: Store>(
    gw: &Gateway<S>,
    ids: &[EvidenceId],
    placed: &[(EvidenceId, u32)],
) -> Result<Vec<Option<Receipt>>, ApiError> {
    let kind = Kind::Notarized;
    let Some(ledger) = gw.ledger.as_ref() else {
        return Ok(vec![None; ids.len()]);
    };
    let _waiting = ledger.pacer.waiting();
    let mut published = ledger.subscribe();
    let deadline = tokio::time::Instant::now() + ledger.receipt_wait;
    // Until a checkpoint covers every statement, only look up leaf indexes
    // (cheap); the proofs are built once, when all of them are covered.
    let mut found: Vec<Option<u64>> = vec![None; ids.len()];
    loop {
        let missing: Vec<(usize, EvidenceId)> = found
            .iter()
            .zip(ids)
            .enumerate()
            .filter(|(_, (f, _))| f.is_none())
            .map(|(i, (_, id))| (i, *id))
            .collect();
        let (size, got) = indexer::run(&gw.store, |tx| {
            let missing = &missing;
            async move {
                let size = lx::checkpoint_size_tx(&tx).await?;
                // One read per chunk: a statement's leaf is its chunk's first
                // plus its position.
                let mut starts: HashMap<EvidenceId, Option<u64>> = HashMap::new();
                let mut got = Vec::with_capacity(missing.len());
                for (slot, _) in missing {
                    let (chunk, position) = placed[*slot];
                    let start = match starts.get(&chunk) {
                        Some(s) => *s,
                        None => {
                            let s = lx::chunk_start_tx(&tx, chunk).await?;
                            starts.insert(chunk, s);
                            s
                        }
                    };
                    got.push(start.map(|s| s + u64::from(position)));
                }
                Ok::<_, indexer::schema::SchemaError>((size, got))
            }
        })
        .await?;
        for ((slot, _), index) in missing.iter().zip(got) {
            found[*slot] = index;
        }
        let size = size.unwrap_or(0);
        if found.iter().all(|f| f.is_some_and(|i| i < size)) {
            return receipts_at(gw, ids, &found).await;
        }
        if !next_checkpoint(&mut published, deadline).await {
            return receipts_for(gw, ids, kind).await;
        }
    }
}

/// The custody events of `evidence`: every ledger entry naming it, oldest
/// first, each with its receipt once a checkpoint covers it.
pub async fn custody<S: Store>(
    gw: &Gateway<S>,
    evidence: EvidenceId,
    after: Option<u64>,
    limit: usize,
) -> Result<Vec<(u64, Kind, Option<Receipt>)>, ApiError> {
    let leaves = indexer::run(&gw.store, |tx| async move {
        lx::leaves_of_page_tx(&tx, evidence, after, limit.max(1)).await
    })
    .await?;
    let mut out = Vec::with_capacity(leaves.len());
    for (index, kind) in leaves {
        out.push((index, kind, leaf_receipt(gw, evidence, index).await?));
    }
    Ok(out)
}

/// A statement about `evidence` with a fresh salt, for the outbox.
pub fn pending(
    evidence: EvidenceId,
    statement: &pl::Statement,
) -> Result<lx::PendingRecord, ApiError> {
    Ok(lx::PendingRecord {
        evidence,
        salt: rand::random(),
        statement: statement
            .encode()
            .map_err(|e| ApiError::BadRequest(format!("statement: {e}")))?,
    })
}

/// Appends a statement and returns once it is durable in the index (the
/// outbox), before the caller acts on it: e.g. before the first byte of a
/// read is sent. Refused with [`ApiError::Gone`] once the evidence is no
/// longer visible (expunged). `slack`: how long past its commit the caller can wait,
/// because it has other work in flight (a small read fetching its shards);
/// the index may use it to share one fsync among many records.
pub async fn record<S: Store>(
    gw: &Gateway<S>,
    evidence: EvidenceId,
    statement: &pl::Statement,
    slack: Duration,
) -> Result<(), ApiError> {
    let Some(ledger) = gw.ledger.as_ref() else {
        return Ok(());
    };
    let p = pending(evidence, statement)?;
    // Only while the evidence is visible, read in the same transaction: an
    // expunge (which clears that key and queues its own statement) and
    // this record then conflict, so the log never says the evidence was
    // accessed after it was expunged.
    let visible = indexer::run(&gw.store, |tx| {
        let p = &p;
        async move {
            if indexer::schema::get_manifest_tx(&tx, evidence)
                .await?
                .is_none()
            {
                return Ok(false);
            }
            indexer::kv::Transaction::set_commit_slack(&tx, slack);
            lx::enqueue_tx(&tx, 0, p);
            Ok::<_, indexer::schema::SchemaError>(true)
        }
    })
    .await?;
    if !visible {
        return Err(ApiError::Gone);
    }
    ledger.queued();
    Ok(())
}

/// Waits (up to the configured time) for a checkpoint covering `evidence`'s
/// statement, and returns its receipt.
pub async fn wait_for_receipt<S: Store>(
    gw: &Gateway<S>,
    evidence: EvidenceId,
    kinds: &[Kind],
) -> Result<Option<Receipt>, ApiError> {
    wait_for(
        gw,
        || async {
            let first = indexer::run(&gw.store, |tx| async move {
                lx::first_leaf_of_tx(&tx, evidence, kinds).await
            })
            .await?;
            Ok(first.map(|(index, _)| index))
        },
        evidence,
    )
    .await
}

/// The tree's size now: a statement queued after this call becomes a leaf
/// at this index or later.
pub async fn tree_size<S: Store>(gw: &Gateway<S>) -> Result<u64, ApiError> {
    Ok(
        indexer::run(&gw.store, |tx| async move { lx::tree_state_tx(&tx).await })
            .await?
            .size,
    )
}

/// As [`wait_for_receipt`], for the one statement about `evidence` queued
/// with `salt` after [`tree_size`] said `since`.
pub async fn wait_for_statement<S: Store>(
    gw: &Gateway<S>,
    evidence: EvidenceId,
    since: u64,
    salt: [u8; 32],
) -> Result<Option<Receipt>, ApiError> {
    wait_for(
        gw,
        || async {
            Ok(indexer::run(&gw.store, |tx| async move {
                lx::leaf_with_salt_tx(&tx, evidence, since, &salt).await
            })
            .await?)
        },
        evidence,
    )
    .await
}

/// Until the leaf `find` names (once integrated) is under a published
/// checkpoint, or the receipt wait ends: its receipt.
async fn wait_for<S, F, Fut>(
    gw: &Gateway<S>,
    find: F,
    evidence: EvidenceId,
) -> Result<Option<Receipt>, ApiError>
where
    S: Store,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Option<u64>, ApiError>>,
{
    let Some(ledger) = gw.ledger.as_ref() else {
        return Ok(None);
    };
    let _waiting = ledger.pacer.waiting();
    let mut published = ledger.subscribe();
    let deadline = tokio::time::Instant::now() + ledger.receipt_wait;
    loop {
        if let Some(index) = find().await? {
            if let Some(r) = leaf_receipt(gw, evidence, index).await? {
                return Ok(Some(r));
            }
        }
        if !next_checkpoint(&mut published, deadline).await {
            return Ok(None);
        }
    }
}

/// An inclusion proof for leaf `index` in the tree of `size` (at most the
/// newest checkpoint's).
pub async fn inclusion_proof<S: Store>(
    gw: &Gateway<S>,
    index: u64,
    size: u64,
) -> Result<Vec<TreeHash>, ApiError> {
    let size = checked_size(gw, size).await?;
    if index >= size {
        return Err(ApiError::BadRequest(format!(
            "index {index} is not below size {size}"
        )));
    }
    let mut known = HashMap::new();
    let base = tlog_tiles::stored_hash_index(0, size);
    let (proof, _) = with_hashes(gw, &mut known, base, |r| {
        tlog_tiles::prove_record(size, index, r)
    })
    .await
    .map_err(proof_err)?;
    Ok(proof)
}

/// A consistency proof from the tree of `old` to the tree of `new`.
pub async fn consistency_proof<S: Store>(
    gw: &Gateway<S>,
    old: u64,
    new: u64,
) -> Result<Vec<TreeHash>, ApiError> {
    if old == 0 {
        return Err(ApiError::BadRequest(
            "old size 0: every tree extends the empty one; no proof exists (RFC 9162)".into(),
        ));
    }
    let new = checked_size(gw, new).await?;
    if old > new {
        return Err(ApiError::BadRequest(format!(
            "old size {old} is above new size {new}"
        )));
    }
    let mut known = HashMap::new();
    let base = tlog_tiles::stored_hash_index(0, new);
    let (proof, _) = with_hashes(gw, &mut known, base, |r| {
        tlog_tiles::prove_tree(new, old, r)
    })
    .await
    .map_err(proof_err)?;
    Ok(proof)
}

async fn checked_size<S: Store>(gw: &Gateway<S>, size: u64) -> Result<u64, ApiError> {
    let ledger = gw.ledger.as_ref().ok_or(ApiError::NotFound)?;
    let (_, cp) = newest_checkpoint(gw, ledger).await?.ok_or_else(|| {
        ApiError::Unavailable("no checkpoint is signed yet: there is nothing to prove".into())
    })?;
    if size > cp.size {
        return Err(ApiError::BadRequest(format!(
            "size {size} is beyond the newest checkpoint ({})",
            cp.size
        )));
    }
    Ok(size)
}

/// An HTTP(S) client for witnesses and time-stamping authorities: HTTPS
/// against the public web roots, with rustls' ring provider chosen here
/// (two providers are linked in, and rustls will not pick one).
fn outside_agent(timeout: Duration, status_as_error: bool) -> ureq::Agent {
    let tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .build();
    ureq::Agent::config_builder()
        .http_status_as_error(status_as_error)
        .timeout_global(Some(timeout))
        .tls_config(tls)
        .build()
        .into()
}

/// Checks every `archive_check_interval_ms` (the first a minute after
/// start, or sooner where the interval is shorter) that the openings
/// archive covers the ledger from leaf 0 to the newest signed checkpoint: a gap (a file deleted by a bucket's lifecycle
/// rule, one never written) is otherwise found only when `recover-index`
/// needs it. `custodia_ledger_archive_gap_leaves` says how many leaves the
/// archive lacks, for an alert.
pub fn spawn_archive_check<S: Store>(gw: Arc<Gateway<S>>) -> Option<tokio::task::JoinHandle<()>> {
    let ledger = gw.ledger.clone()?;
    if ledger.archive_check_interval.is_zero() {
        return None;
    }
    let every = ledger.archive_check_interval.max(Duration::from_secs(1));
    gw.metrics
        .archive_check_interval
        .set(i64::try_from(every.as_secs()).unwrap_or(i64::MAX));
    // Only the gateway integrating the ledger lists the archive (the same
    // for all, and long to list): the others look each minute whether
    // they have become it.
    let look = every.min(Duration::from_secs(60));
    Some(tokio::spawn(async move {
        tokio::time::sleep(look).await;
        // When the next check is due: kept across a lease lost and taken
        // back, so a lease that flaps does not list the archive each time.
        let mut due = tokio::time::Instant::now();
        loop {
            if !ledger.integrating() {
                // A gap found while integrating is the integrator's to say
                // now: kept here, an alert on the largest gap any gateway
                // says would stay up after the files were restored.
                gw.metrics.archive_gap.set(0);
                tokio::time::sleep(look).await;
                continue;
            }
            // A minute at a time: a lease lost meanwhile (the gap no longer
            // this gateway's to say) is seen within one, not a day.
            let now = tokio::time::Instant::now();
            if now < due {
                tokio::time::sleep_until(due.min(now + look)).await;
                continue;
            }
            let signed = newest_checkpoint(&gw, &ledger).await;
            let covered = archive_coverage(&*ledger.openings).await;
            // A check that failed is tried again in a minute, not a day.
            let mut next = every;
            match (signed, covered) {
                (Ok(signed), Ok(covered)) => {
                    let signed = signed.map_or(0, |(_, c)| c.size);
                    let gap = signed.saturating_sub(covered);
                    gw.metrics
                        .archive_gap
                        .set(i64::try_from(gap).unwrap_or(i64::MAX));
                    gw.metrics.archive_checked.set(unix_now() as i64);
                    if gap > 0 {
                        tracing::error!(
                            covered,
                            signed,
                            "the openings archive covers the ledger only to leaf {covered} of the {signed} signed: an index lost now could be rebuilt only that far; restore the missing files from a backup"
                        );
                    }
                }
                (Err(e), _) => {
                    next = look;
                    tracing::warn!(error = %e, "could not read the newest checkpoint to check the openings archive")
                }
                (_, Err(e)) => {
                    next = look;
                    tracing::warn!(error = %e, "could not list the openings archive to check it")
                }
            }
            due = tokio::time::Instant::now() + next;
        }
    }))
}

/// Sends the newest checkpoint to every configured witness every interval,
/// with a consistency proof from the size each last saw, and stores the
/// cosignatures. Runs beside filing, never in its way: a dead witness only
/// costs a log line.
pub fn spawn_witnessing<S: Store>(gw: Arc<Gateway<S>>) -> Option<tokio::task::JoinHandle<()>> {
    let ledger = gw.ledger.clone()?;
    if ledger.witnesses.is_empty() {
        return None;
    }
    Some(tokio::spawn(async move {
        let agent = outside_agent(Duration::from_secs(5), false);
        // Where each witness is, as far as we know (it tells us on 409).
        let mut seen = vec![WitnessAt::Unknown; ledger.witnesses.len()];
        let mut tick = tokio::time::interval(ledger.witness_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Ok(Some(newest)) = newest_checkpoint(&gw, &ledger).await else {
                continue;
            };
            // All witnesses at once: a slow one delays no other.
            let count = ledger.witnesses.len();
            let rounds = ledger.witnesses.iter().zip(seen.iter()).enumerate().map(|(i, (w, seen))| {
                let (gw, agent, newest, ledger) = (&gw, &agent, &newest, &ledger);
                let seen = *seen;
                let which = (i, count, w);
                async move {
                    if seen == WitnessAt::Cosigned(newest.1.size) {
                        return seen;
                    }
                    if seen.size() > newest.1.size {
                        return beyond(gw, ledger, w, seen.size()).await;
                    }
                    match witness_once(gw, agent, which, seen.size(), newest).await {
                        Ok(Cosigned::Yes) => WitnessAt::Cosigned(newest.1.size),
                        Ok(Cosigned::Inconsistent) => {
                            forked(gw, w, seen.size(), newest.1.size);
                            WitnessAt::Unknown
                        }
                        Ok(Cosigned::Behind(size)) if size > newest.1.size => {
                            beyond(gw, ledger, w, size).await
                        }
                        // It is at another size: retry at once from there.
                        Ok(Cosigned::Behind(size)) => {
                            match witness_once(gw, agent, which, size, newest).await {
                                Ok(Cosigned::Yes) => WitnessAt::Cosigned(newest.1.size),
                                // Sent from its own size and refused again at
                                // ours: it holds another tree of our size.
                                // (Beyond ours is another gateway of this log
                                // ahead of this one.) Or it refused our proof
                                // from its size: it holds another tree of its
                                // size. Never marked seen: said at every round.
                                // At our size: asked once more from there
                                // (no proof), so a witness another gateway
                                // of this log got there first with the same
                                // tree cosigns; only another tree is refused.
                                Ok(Cosigned::Behind(s)) if s == newest.1.size => {
                                    match witness_once(gw, agent, which, s, newest).await {
                                        Ok(Cosigned::Yes) => WitnessAt::Cosigned(s),
                                        Ok(Cosigned::Behind(again)) if again == s => {
                                            forked(gw, w, s, newest.1.size);
                                            WitnessAt::Unknown
                                        }
                                        Ok(_) => WitnessAt::Unknown,
                                        Err(e) => {
                                            tracing::warn!(witness = %w.url, error = %e, "witness did not cosign");
                                            WitnessAt::Unknown
                                        }
                                    }
                                }
                                Ok(Cosigned::Inconsistent) => {
                                    forked(gw, w, size, newest.1.size);
                                    WitnessAt::Unknown
                                }
                                Ok(Cosigned::Behind(s)) => WitnessAt::At(s),
                                Err(e) => {
                                    tracing::warn!(witness = %w.url, error = %e, "witness did not cosign");
                                    WitnessAt::At(size)
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(witness = %w.url, error = %e, "witness did not cosign");
                            seen.uncosigned()
                        }
                    }
                }
            });
            seen = futures::future::join_all(rounds).await;
            // Counted once every witness has had its say on this
            // checkpoint: counted as each answered, a quick witness's
            // cosignature on the next checkpoint would hide a slow one's
            // on this, and the count would read short whenever the log grows.
            let cosigned = seen
                .iter()
                .filter(|s| **s == WitnessAt::Cosigned(newest.1.size))
                .count();
            gw.metrics.cosigned(newest.1.size, cosigned);
        }
    }))
}

/// Where a witness is, as far as this gateway knows: a size it said it
/// is at (another gateway of this log got it there), or one it cosigned
/// for this gateway. Only a size cosigned is not sent again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WitnessAt {
    Unknown,
    At(u64),
    Cosigned(u64),
}

impl WitnessAt {
    /// The size a checkpoint is sent from (its consistency proof's old size).
    fn size(self) -> u64 {
        match self {
            WitnessAt::Unknown => 0,
            WitnessAt::At(s) | WitnessAt::Cosigned(s) => s,
        }
    }

    /// The same size, not (or no longer) known cosigned.
    fn uncosigned(self) -> Self {
        match self {
            WitnessAt::Cosigned(s) => WitnessAt::At(s),
            other => other,
        }
    }
}

enum Cosigned {
    Yes,
    /// The witness is at another size (409).
    Behind(u64),
    /// The witness refused our consistency proof from its size (422): the
    /// tree it cosigned at that size is not ours.
    Inconsistent,
}

/// Where witness `w` is when it says it is at `size`, beyond the newest
/// checkpoint this gateway read. Every checkpoint a gateway of this log
/// sends is read from the index first, so another gateway may just have
/// signed a newer one: the index is read again. Still beyond it, the
/// witness cosigned a checkpoint this log no longer has: its index was
/// restored from an older backup or otherwise rolled back, and every
/// receipt it signs from here on is on a fork. Said at each round, as
/// [`forked`] says it (the witness is asked afresh each time). Left
/// unsaid, it would be found only once the log grew past the witness's
/// size again, which may be weeks of receipts later.
async fn beyond<S: Store>(
    gw: &Gateway<S>,
    ledger: &Ledger,
    w: &WitnessEntry,
    size: u64,
) -> WitnessAt {
    match newest_checkpoint(gw, ledger).await {
        Ok(Some((_, cp))) if cp.size >= size => WitnessAt::At(size),
        Ok(newest) => {
            let ours = newest.map_or(0, |(_, cp)| cp.size);
            forked(gw, w, size, ours);
            WitnessAt::Unknown
        }
        Err(e) => {
            tracing::warn!(witness = %w.url, error = %e, "could not read the newest checkpoint again");
            WitnessAt::At(size)
        }
    }
}

/// Says, as loudly as it can, that witness `w` holds a tree of `its_size`
/// entries that is not this log's (whose newest has `our_size`): another
/// tree of that size, or one larger than this log's newest.
fn forked<S: Store>(gw: &Gateway<S>, w: &WitnessEntry, its_size: u64, our_size: u64) {
    gw.metrics
        .witness_inconsistent
        .with_label_values(&[w.url.as_str()])
        .inc();
    let how = match its_size > our_size {
        true => "the witness cosigned a checkpoint of this log larger than its newest",
        false => "the witness holds a different tree of its size than this log",
    };
    tracing::error!(
        witness = %w.url,
        witness_size = its_size,
        our_size,
        "{how}: this log may have forked (an index restored from an older backup?)"
    );
}

async fn witness_once<S: Store>(
    gw: &Gateway<S>,
    agent: &ureq::Agent,
    (index, count, w): (usize, usize, &WitnessEntry),
    old: u64,
    (note, cp): &(String, pl::VerifiedCheckpoint),
) -> Result<Cosigned, String> {
    if old > cp.size {
        return Err(format!(
            "witness is at size {old}, beyond our checkpoint {}",
            cp.size
        ));
    }
    let proof = if old == 0 || old == cp.size {
        Vec::new()
    } else {
        consistency_proof(gw, old, cp.size)
            .await
            .map_err(|e| e.to_string())?
    };
    let body = protocol::witness::add_checkpoint_body(old, &proof, note);
    let url = format!("{}/add-checkpoint", w.url.trim_end_matches('/'));
    let agent = agent.clone();
    let started = std::time::Instant::now();
    let observe = |result: &str| {
        gw.metrics
            .cosign_seconds
            .with_label_values(&[w.url.as_str(), result])
            .observe(started.elapsed().as_secs_f64());
    };
    let answer = tokio::task::spawn_blocking(move || {
        let mut resp = agent
            .post(&url)
            .send(body.as_bytes())
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 * 1024)
            .read_to_string()
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((status, text))
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    let (status, text) = match answer {
        Ok(a) => a,
        Err(e) => {
            observe("unreachable");
            return Err(e);
        }
    };
    observe(match status {
        200 => "cosigned",
        409 => "conflict",
        422 => "inconsistent",
        _ => "error",
    });
    match status {
        200 => {
            // Keep only this witness's own valid cosignatures: a response
            // must not be able to add lines in another witness's name.
            let text = protocol::witness::own_cosignatures(note, &text, &w.key);
            if text.is_empty() {
                return Err("its cosignature does not verify with its configured key".into());
            }
            let size = cp.size;
            let ledger = gw.ledger.as_ref().ok_or("no ledger is configured")?;
            indexer::run(&gw.store, |tx| {
                let (note, text) = (note.as_str(), text.as_str());
                async move {
                    lx::add_cosignature_tx(&tx, size, note, text, |n| ledger.witness_weight(n))
                        .await
                }
            })
            .await
            .map_err(|e| e.to_string())?;
            // The time it cosigned at: a majority of witnesses vouching for
            // a time lets the compliance clock catch up to it.
            if let Some(t) = text
                .lines()
                .filter_map(protocol::witness::cosignature_time)
                .max()
            {
                gw.clock.witnessed(index, count, t.saturating_mul(1000));
                // Against the clock that stamps statements: a receipt is
                // dated after its checkpoint's cosignature when either
                // runs wrong, and `custodia verify` warns of it.
                gw.metrics
                    .witness_clock_offset
                    .with_label_values(&[w.url.as_str()])
                    .set(t as f64 - gw.clock.now_ms() as f64 / 1000.0);
            }
            tracing::debug!(witness = %w.url, size, ms = started.elapsed().as_millis() as u64, "cosigned");
            Ok(Cosigned::Yes)
        }
        409 => text
            .trim()
            .parse()
            .map(Cosigned::Behind)
            .map_err(|_| format!("409 with an unreadable size {text:?}")),
        // Only when a proof was sent: without one (from size 0, or at its
        // own size) there is nothing it could have found inconsistent.
        422 if old != 0 && old != cp.size => Ok(Cosigned::Inconsistent),
        s => Err(format!("HTTP {s}: {}", text.trim())),
    }
}

/// Obtains RFC 3161 tokens over new checkpoints (the newest, and the newest
/// witnessed) every interval, off the filing path; each is verified against
/// the configured TSA certificate before it is stored.
pub fn spawn_timestamping<S: Store>(gw: Arc<Gateway<S>>) -> Option<tokio::task::JoinHandle<()>> {
    let ledger = gw.ledger.clone()?;
    ledger.tsa.as_ref()?;
    Some(tokio::spawn(async move {
        let Some(tsa) = ledger.tsa.as_ref() else {
            return;
        };
        let mut tick = tokio::time::interval(tsa.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let mut candidates = Vec::new();
            if let Ok(Some(w)) =
                indexer::run(&gw.store, |tx| async move { lx::witnessed_tx(&tx).await }).await
            {
                candidates.push((w.note, w.size));
            }
            if let Ok(Some((note, cp))) = newest_checkpoint(&gw, &ledger).await {
                candidates.push((note, cp.size));
            }
            for (note, size) in candidates {
                if size == 0 {
                    continue;
                }
                match timestamp_for(&gw, size).await {
                    Ok(None) => {}
                    _ => continue, // stamped already, or the index is busy
                }
                match stamp(&gw, tsa, &note, size).await {
                    Ok(()) => gw.metrics.tsa_stamps.with_label_values(&["ok"]).inc(),
                    Err(e) => {
                        gw.metrics.tsa_stamps.with_label_values(&["failed"]).inc();
                        tracing::warn!(size, error = %e, "could not time-stamp the checkpoint");
                    }
                }
            }
        }
    }))
}

async fn stamp<S: Store>(gw: &Gateway<S>, tsa: &Tsa, note: &str, size: u64) -> Result<(), String> {
    let imprint = pl::checkpoint_text_sha256(note);
    let nonce = protocol::tsa::random_nonce();
    let request = protocol::tsa::request(imprint, nonce);
    let response = match (&tsa.url, &tsa.dev_key_pem) {
        (Some(url), _) => {
            let url = url.clone();
            tokio::task::spawn_blocking(move || {
                let agent = outside_agent(Duration::from_secs(10), true);
                let mut resp = agent
                    .post(&url)
                    .header("content-type", protocol::tsa::CONTENT_TYPE_QUERY)
                    .send(&request[..])
                    .map_err(|e| e.to_string())?;
                resp.body_mut()
                    .with_config()
                    .limit(1 << 20)
                    .read_to_vec()
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())??
        }
        (None, Some(key)) => {
            protocol::tsa::timestamp(&request, &tsa.cert_pem, key, unix_now()).map_err(|e| e.0)?
        }
        (None, None) => return Err("no TSA configured".into()),
    };
    let gen_time = protocol::tsa::verify_response(&response, &imprint, Some(nonce), &tsa.cert_pem)
        .map_err(|e| e.0)?;
    // The TSA's clock against ours (genTime has whole seconds): the
    // operator's clock, which stamps every statement, checked against an
    // independent one.
    gw.metrics
        .tsa_clock_offset
        .set(gen_time as f64 - gw.clock.now_ms() as f64 / 1000.0);
    // An outside TSA's time lets the compliance clock catch up; a
    // development TSA signs with its machine's clock, so it does not, also
    // when asked over HTTP (another gateway's `/tsa`, or this one's): its
    // certificate says what it is.
    if tsa.url.is_some() && !tsa.development {
        gw.clock
            .confirm(gen_time.saturating_mul(1000), crate::clock::Source::Tsa);
    }
    indexer::run(&gw.store, |tx| {
        let response = &response;
        async move { lx::put_timestamp_tx(&tx, size, note, response).await }
    })
    .await
    .map_err(|e| e.to_string())?;
    tracing::debug!(size, "checkpoint time-stamped");
    Ok(())
}

/// The system clock in Unix seconds, with their fraction (0 before 1970).
pub(crate) fn unix_now_secs_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The system clock in whole Unix seconds (0 before 1970).
pub(crate) fn unix_now() -> u64 {
    unix_now_secs_f64() as u64
}

/// The development TSA's answer to an RFC 3161 request, when `up` runs one.
pub fn dev_tsa_answer<S: Store>(
    gw: &Gateway<S>,
    request: &[u8],
) -> Option<Result<Vec<u8>, String>> {
    let tsa = gw.ledger.as_ref()?.tsa.as_ref()?;
    let key = tsa.dev_key_pem.as_ref()?;
    Some(protocol::tsa::timestamp(request, &tsa.cert_pem, key, unix_now()).map_err(|e| e.0))
}

/// The RFC 6962 root of a tree of these leaf hashes, in order, kept in
/// memory as one perfect subtree per level (the tiles' stored hashes would
/// be two per leaf).
fn merkle_root(leaves: impl Iterator<Item = TreeHash>) -> TreeHash {
    // Perfect subtrees, largest (leftmost) first, each of a height below
    // the one before it.
    let mut stack: Vec<(u32, TreeHash)> = Vec::new();
    for leaf in leaves {
        let mut node = (0, leaf);
        while let Some(&(height, left)) = stack.last() {
            if height != node.0 {
                break;
            }
            stack.pop();
            node = (height + 1, tlog_tiles::node_hash(left, node.1));
        }
        stack.push(node);
    }
    // A tree of n leaves splits at the largest power of two below n: the
    // subtrees fold from the right.
    let mut subtrees = stack.into_iter().rev().map(|(_, h)| h);
    match subtrees.next() {
        None => tlog_tiles::EMPTY_HASH,
        Some(last) => subtrees.fold(last, |right, left| tlog_tiles::node_hash(left, right)),
    }
}

/// What [`restore`] rebuilt.
#[derive(Debug, Default)]
pub struct RestoredLedger {
    /// Leaves restored from the archive.
    pub leaves: u64,
    /// The tree size of the published checkpoint they were checked against.
    pub checkpoint_size: u64,
    /// Every archived leaf, in order.
    pub archive: Vec<lx::ArchivedLeaf>,
}

/// Rebuilds the ledger's index records (openings, tree hashes, state and
/// the newest published checkpoint) from the openings archive and the
/// published checkpoint, into an index that has none. The leaves' tree must
/// reproduce the checkpoint's root, signed by this log's key: a damaged or
/// foreign archive is refused, never half-restored. Leaves archived past
/// the published checkpoint (integrated just before a crash) are kept; the
/// integrator signs a checkpoint over them on start, extending this one.
///
/// With `trust_archive`, an archive no published checkpoint covers (a log
/// that crashed before its first checkpoint, or whose tiles were lost) is
/// restored as it is, its leaves unchecked against a signed root; the
/// integrator signs a checkpoint over them on start.
pub async fn restore<S: Store>(
    gw: &Gateway<S>,
    trust_archive: bool,
) -> Result<RestoredLedger, LedgerError> {
    let ledger = gw
        .ledger
        .as_ref()
        .ok_or_else(|| LedgerError::Tree("no ledger is configured".into()))?;
    let note = match ledger.read_tile_file(CHECKPOINT_FILE).await? {
        Some(n) => String::from_utf8(n.to_vec())
            .map_err(|_| LedgerError::Tree("the published checkpoint is not text".into()))?,
        // Nothing published: a log that never signed a checkpoint, or the
        // tiles' location is wrong. An archive with leaves says the latter;
        // restoring nothing would leave every shard an orphan.
        None => {
            let archived = ledger.read_archive().await?.len();
            if archived > 0 && !trust_archive {
                return Err(LedgerError::Tree(format!(
                    "no published checkpoint at the tiles location, yet the openings archive \
                     holds {archived} leaves: check tiles_dir / tiles_url (or, if the log never \
                     published one, restore the archive as it is with --trust-archive)"
                )));
            }
            if archived == 0 {
                return Ok(RestoredLedger::default());
            }
            String::new()
        }
    };
    let cp = match note.is_empty() {
        true => None,
        false => Some(
            pl::verify_checkpoint(&note, &ledger.verifier_key)
                .map_err(|e| LedgerError::Tree(format!("the published checkpoint: {e}")))?,
        ),
    };
    let archive = ledger.read_archive().await?;
    let covered = cp.as_ref().map_or(0, |cp| cp.size);
    if (archive.len() as u64) < covered {
        return Err(LedgerError::Tree(format!(
            "the openings archive holds {} leaves; the published checkpoint covers {}",
            archive.len(),
            covered
        )));
    }

    // The check against the signed root, before anything is written: a
    // damaged archive leaves the index as empty as it was, so recovery can
    // be run again once the archive is mended.
    if let Some(cp) = &cp {
        let root = merkle_root(
            archive
                .iter()
                .take(covered as usize)
                .map(|a| tlog_tiles::record_hash(&pl::commitment(&a.salt, &a.statement))),
        );
        if root.0 != cp.root.0 {
            return Err(LedgerError::Tree(format!(
                "the archived leaves do not reproduce the signed checkpoint's root at size {}; \
                 nothing was restored",
                cp.size
            )));
        }
    }

    let mut known = HashMap::new();
    let mut size = 0u64;
    // Chunks of at most a tile and at most BATCH_BYTES of statements, so each
    // transaction stays under FoundationDB's 10 MB whatever the statements'
    // sizes (256 statements of 64 KiB would be 16 MiB).
    let chunks = restore_chunks(&archive, 1 << TILE_HEIGHT, BATCH_BYTES);
    for chunk in chunks {
        let leaves: Vec<(Vec<u8>, LeafRecord, Kind)> = chunk
            .iter()
            .map(|a| {
                let (leaf, kind) = leaf_of(a.evidence, a.salt, a.statement.clone());
                (vec![b'Q'], leaf, kind)
            })
            .collect();
        let first = size;
        let new_size = first + leaves.len() as u64;
        let (root, tiles) = extend_tree(gw, &mut known, first, &leaves).await?;
        let state = TreeState {
            size: new_size,
            root: root.0,
            fence: 0,
        };
        indexer::run(&gw.store, |tx| {
            let (leaves, rows, state) = (&leaves, tile_rows(&tiles), &state);
            async move {
                lx::integrate_tx(&tx, first, leaves, &rows, state);
                for (_, leaf, kind) in leaves {
                    if *kind == Kind::Notarized {
                        if let Ok(s) = pl::Statement::decode(&leaf.statement) {
                            lx::put_notarization_tx(&tx, leaf.evidence, &s.tenant);
                        }
                    }
                }
                Ok::<_, schema::SchemaError>(())
            }
        })
        .await?;
        known.clear();
        size = new_size;
    }
    let Some(cp) = cp else {
        // Nothing signed to check against (see `trust_archive`).
        return Ok(RestoredLedger {
            leaves: size,
            checkpoint_size: 0,
            archive,
        });
    };
    let (root, _) = with_hashes(gw, &mut known, u64::MAX, |r| {
        tlog_tiles::tree_hash(cp.size, r)
    })
    .await?;
    if root.0 != cp.root.0 {
        return Err(LedgerError::Tree(format!(
            "the archived leaves do not reproduce the signed checkpoint's root at size {}",
            cp.size
        )));
    }
    let cp_size = cp.size;
    indexer::run(&gw.store, |tx| {
        let note = note.as_bytes();
        async move { lx::put_checkpoint_tx(&tx, cp_size, note).await }
    })
    .await?;
    Ok(RestoredLedger {
        leaves: size,
        checkpoint_size: cp.size,
        archive,
    })
}

/// `archive` cut into runs of at most `max_leaves` leaves and at most
/// `max_bytes` of statements (a longer statement alone).
fn restore_chunks(
    archive: &[lx::ArchivedLeaf],
    max_leaves: usize,
    max_bytes: usize,
) -> Vec<&[lx::ArchivedLeaf]> {
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0usize, 0usize);
    for (i, a) in archive.iter().enumerate() {
        if i > start && (i - start >= max_leaves || bytes + a.statement.len() > max_bytes) {
            chunks.push(&archive[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += a.statement.len();
    }
    if start < archive.len() {
        chunks.push(&archive[start..]);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::Blake3Hash;

    /// A round of a few statements makes the next wait out the interval from
    /// its start; one of a single statement, of `PACED_BELOW` or more, or a
    /// look at an empty queue does not, nor does anything with interval 0
    /// or while a caller waits for a receipt.
    #[test]
    fn rounds_of_a_few_statements_space_the_next() {
        let ms = Duration::from_millis;
        let pacer = RoundPacer::new(ms(25));
        let t0 = tokio::time::Instant::now();
        assert_eq!(pacer.next_start(t0), t0, "first round");
        pacer.found(t0, 5);
        assert_eq!(pacer.next_start(t0 + ms(3)), t0 + ms(25));
        assert_eq!(pacer.next_start(t0 + ms(40)), t0 + ms(40), "already waited");
        pacer.found(t0 + ms(1), 0);
        assert_eq!(
            pacer.next_start(t0 + ms(10)),
            t0 + ms(25),
            "a look at an empty queue changes nothing"
        );
        let started = t0 + ms(25);
        pacer.found(started, PACED_BELOW - 1);
        assert_eq!(pacer.next_start(started), started + ms(25));
        for n in [1, PACED_BELOW, 8192] {
            pacer.found(started, n);
            assert_eq!(pacer.next_start(started), started, "{n} statements");
        }
        pacer.found(started, 5);
        let waiting = pacer.waiting();
        assert_eq!(pacer.next_start(started), started, "a filing waits");
        drop(waiting);
        assert_eq!(pacer.next_start(started), started + ms(25));
        let unpaced = RoundPacer::new(Duration::ZERO);
        unpaced.found(t0, 5);
        assert_eq!(unpaced.next_start(t0 + ms(1)), t0 + ms(1));
    }

    /// The root kept one subtree per level is the tiles' root, for every
    /// size around the powers of two and a tile's width.
    #[test]
    fn the_restore_check_computes_the_trees_root() {
        struct Stored(Vec<TreeHash>);
        impl tlog_tiles::HashReader for Stored {
            fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<TreeHash>, tlog_tiles::Error> {
                indexes
                    .iter()
                    .map(|&i| {
                        self.0
                            .get(i as usize)
                            .copied()
                            .ok_or(tlog_tiles::Error::IndexesNotInTree)
                    })
                    .collect()
            }
        }
        let mut stored = Stored(Vec::new());
        let leaf = |i: u64| tlog_tiles::record_hash(&i.to_le_bytes());
        assert_eq!(merkle_root(std::iter::empty()), tlog_tiles::EMPTY_HASH);
        for n in 0..300u64 {
            let hs = tlog_tiles::stored_hashes(n, &n.to_le_bytes(), &stored).unwrap();
            stored.0.extend(hs);
            let want = tlog_tiles::tree_hash(n + 1, &stored).unwrap();
            assert_eq!(merkle_root((0..=n).map(leaf)), want, "size {}", n + 1);
        }
    }

    /// A witness listed twice, under its name or another, is refused: it
    /// would count twice toward a quorum.
    #[test]
    fn a_witness_listed_twice_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (skey, _) = pl::note_keys("example.com/log", &[9u8; 32]);
        let key = dir.path().join("log.key");
        std::fs::write(&key, &skey).unwrap();
        let (_, witness) = protocol::witness::witness_keys("witness.example", &[7u8; 32]);
        let (_, other) = protocol::witness::witness_keys("other.example", &[8u8; 32]);
        // The same key under another name (a witness renamed).
        let (_, renamed) = protocol::witness::witness_keys("renamed.example", &[7u8; 32]);
        let config = |keys: &[&str]| -> LedgerConfig {
            let witnesses: String = keys
                .iter()
                .map(|k| format!("[[witnesses]]\nurl = \"http://127.0.0.1:9\"\nkey = \"{k}\"\n"))
                .collect();
            toml::from_str(&format!(
                "origin = \"example.com/log\"\nsigner_key = \"{}\"\ntiles_dir = \"{}\"\n{witnesses}",
                key.display(),
                dir.path().join("tiles").display()
            ))
            .unwrap()
        };
        assert!(Ledger::open(&config(&[&witness, &other]), "gw").is_ok());
        let unreadable = Ledger::open(&config(&[&witness, "witness.example+0badc0de+AAAA"]), "gw");
        assert!(
            matches!(&unreadable, Err(LedgerError::Tree(m)) if m.contains("not a witness verifier key")),
            "{:?}",
            unreadable.err()
        );
        let (_, as_log) = protocol::witness::witness_keys("example.com/log", &[6u8; 32]);
        let refused = Ledger::open(&config(&[&witness, &as_log]), "gw");
        assert!(
            matches!(&refused, Err(LedgerError::Tree(m)) if m.contains("named as the log itself")),
            "{:?}",
            refused.err()
        );
        for keys in [[&*witness, &other, &witness], [&*witness, &other, &renamed]] {
            let twice = Ledger::open(&config(&keys), "gw");
            assert!(
                matches!(&twice, Err(LedgerError::Tree(m)) if m.contains("hold the same public key")),
                "{:?}",
                twice.err()
            );
        }
    }

    /// A test log's verifier key, and its checkpoint of size `n` (any root).
    fn test_log() -> (String, impl Fn(u64) -> Vec<u8>) {
        let origin = "example.com/log";
        let (skey, vkey) = pl::note_keys(origin, &[9u8; 32]);
        let note = move |n: u64| {
            pl::sign_checkpoint(&skey, origin, n, TreeHash([n as u8; 32]))
                .unwrap()
                .into_bytes()
        };
        (vkey, note)
    }

    /// A bucket's published checkpoint only grows: a smaller one is not
    /// written over a larger one, a larger one replaces it, a garbled one is
    /// replaced, and writers racing with sizes 1 to 8 leave the largest.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_checkpoint_in_a_bucket_only_grows() {
        use object_store::memory::InMemory;
        let (vkey, note) = test_log();
        let published = |store: Arc<InMemory>| {
            let vkey = vkey.clone();
            async move {
                let got = store.get(&StorePath::from(CHECKPOINT_FILE)).await.unwrap();
                let note = String::from_utf8(got.bytes().await.unwrap().to_vec()).unwrap();
                pl::verify_checkpoint(&note, &vkey).unwrap().size
            }
        };
        let store = Arc::new(InMemory::new());
        let cond = std::sync::atomic::AtomicBool::new(false);
        assert!(publish_if_newer(store.as_ref(), &vkey, 5, note(5), &cond)
            .await
            .unwrap());
        assert!(!publish_if_newer(store.as_ref(), &vkey, 3, note(3), &cond)
            .await
            .unwrap());
        assert!(!publish_if_newer(store.as_ref(), &vkey, 5, note(5), &cond)
            .await
            .unwrap());
        assert_eq!(published(store.clone()).await, 5);
        assert!(publish_if_newer(store.as_ref(), &vkey, 9, note(9), &cond)
            .await
            .unwrap());
        assert_eq!(published(store.clone()).await, 9);
        store
            .put(
                &StorePath::from(CHECKPOINT_FILE),
                PutPayload::from(&b"garbage"[..]),
            )
            .await
            .unwrap();
        assert!(publish_if_newer(store.as_ref(), &vkey, 2, note(2), &cond)
            .await
            .unwrap());
        assert_eq!(published(store.clone()).await, 2);

        for round in 0..20 {
            let store = Arc::new(InMemory::new());
            let writers: Vec<_> = (1..=8u64)
                .map(|n| {
                    let (store, vkey, note) = (store.clone(), vkey.clone(), note(n));
                    tokio::spawn(async move {
                        let cond = std::sync::atomic::AtomicBool::new(false);
                        publish_if_newer(store.as_ref(), &vkey, n, note, &cond)
                            .await
                            .unwrap()
                    })
                })
                .collect();
            for w in writers {
                w.await.unwrap();
            }
            assert_eq!(published(store).await, 8, "round {round}");
        }
    }

    /// A bucket whose conditional writes fail for a while (503s), after one
    /// has succeeded: the checkpoint is not written unconditionally (which
    /// could land over a newer one another gateway published meanwhile);
    /// the failure is returned, for the next round to try again.
    #[tokio::test]
    async fn a_bucket_failing_for_a_while_never_takes_an_older_checkpoint() {
        use object_store::memory::InMemory;
        let (vkey, note) = test_log();
        let inner = Arc::new(InMemory::new());
        let store = Flaky {
            inner: inner.clone(),
            failing: std::sync::atomic::AtomicBool::new(false),
        };
        let cond = std::sync::atomic::AtomicBool::new(false);
        // The first is a create (`If-None-Match`), which some buckets take
        // without taking `If-Match`: only the update after it counts.
        assert!(publish_if_newer(&store, &vkey, 4, note(4), &cond)
            .await
            .unwrap());
        assert!(!cond.load(std::sync::atomic::Ordering::Relaxed));
        assert!(publish_if_newer(&store, &vkey, 5, note(5), &cond)
            .await
            .unwrap());
        assert!(cond.load(std::sync::atomic::Ordering::Relaxed));
        // Another gateway publishes a newer one; then the bucket fails
        // every conditional write for a while.
        inner
            .put(&StorePath::from(CHECKPOINT_FILE), PutPayload::from(note(9)))
            .await
            .unwrap();
        store
            .failing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(publish_if_newer(&store, &vkey, 12, note(12), &cond)
            .await
            .is_err());
        let got = inner.get(&StorePath::from(CHECKPOINT_FILE)).await.unwrap();
        let text = String::from_utf8(got.bytes().await.unwrap().to_vec()).unwrap();
        assert_eq!(pl::verify_checkpoint(&text, &vkey).unwrap().size, 9);
        // A store never seen to take them is written as before.
        let fresh = std::sync::atomic::AtomicBool::new(false);
        assert!(publish_if_newer(&store, &vkey, 11, note(11), &fresh)
            .await
            .unwrap());
    }

    /// An in-memory bucket whose conditional writes fail (as a 503 would)
    /// while `failing` is set.
    #[derive(Debug)]
    struct Flaky {
        inner: Arc<object_store::memory::InMemory>,
        failing: std::sync::atomic::AtomicBool,
    }

    impl std::fmt::Display for Flaky {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Flaky")
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for Flaky {
        async fn put_opts(
            &self,
            location: &StorePath,
            payload: PutPayload,
            opts: object_store::PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            let conditional = !matches!(opts.mode, object_store::PutMode::Overwrite);
            if conditional && self.failing.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(object_store::Error::Generic {
                    store: "Flaky",
                    source: "503 Slow Down".into(),
                });
            }
            self.inner.put_opts(location, payload, opts).await
        }
        async fn put_multipart_opts(
            &self,
            location: &StorePath,
            opts: object_store::PutMultipartOptions,
        ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }
        async fn get_opts(
            &self,
            location: &StorePath,
            options: object_store::GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            self.inner.get_opts(location, options).await
        }
        async fn delete(&self, location: &StorePath) -> object_store::Result<()> {
            self.inner.delete(location).await
        }
        fn list(
            &self,
            prefix: Option<&StorePath>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
        {
            self.inner.list(prefix)
        }
        async fn list_with_delimiter(
            &self,
            prefix: Option<&StorePath>,
        ) -> object_store::Result<object_store::ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy(&self, from: &StorePath, to: &StorePath) -> object_store::Result<()> {
            self.inner.copy(from, to).await
        }
        async fn copy_if_not_exists(
            &self,
            from: &StorePath,
            to: &StorePath,
        ) -> object_store::Result<()> {
            self.inner.copy_if_not_exists(from, to).await
        }
    }

    /// An openings archive of files named for these runs (first, end).
    async fn archive_of(runs: &[(u64, u64)]) -> object_store::memory::InMemory {
        let store = object_store::memory::InMemory::new();
        for &(first, end) in runs {
            store
                .put(
                    &StorePath::from(lx::archive_name(first, end)),
                    PutPayload::from_static(b"run"),
                )
                .await
                .unwrap();
        }
        store
    }

    /// The archive's coverage, walked folder by folder, is what chaining
    /// every run at once finds: runs spanning folders, overlapping ones,
    /// and a gap, after which nothing counts.
    #[tokio::test]
    async fn the_archive_coverage_walks_folders_as_the_chain_does() {
        let cases: [&[(u64, u64)]; 5] = [
            &[],
            &[(0, 10), (10, 70_000), (70_000, 70_001), (65_000, 200_000)],
            &[
                (0, 65_536),
                (65_536, 65_600),
                (65_600, 300_000),
                (131_072, 140_000),
            ],
            &[(0, 5), (6, 70_000)],
            &[
                (0, 100),
                (50, 66_000),
                (66_000, 131_072),
                (131_072, 131_073),
                (200_000, 300_000),
            ],
        ];
        for runs in cases {
            let store = archive_of(runs).await;
            let ranges: Vec<std::ops::Range<u64>> = runs.iter().map(|&(a, b)| a..b).collect();
            let chained = lx::archive_chain(&ranges)
                .last()
                .map_or(0, |&(i, _)| ranges[i].end);
            assert_eq!(archive_coverage(&store).await.unwrap(), chained, "{runs:?}");
        }
    }

    /// The archive's runs betray leaves an index lost (restored from an
    /// older backup) even where the checkpoint file lags: found past the
    /// index's tree wherever they are filed, runs spanning folders
    /// included; an archive that ends at the tree (or short of it) is no
    /// sign of anything.
    #[tokio::test]
    async fn archived_runs_past_the_index_tree_are_found() {
        let store = archive_of(&[(0, 70_000), (70_000, 200_000), (200_000, 200_010)]).await;
        let store = &store;
        let found = |signed, tree| async move {
            archived_end(store, signed)
                .await
                .map(|end| end.filter(|&end| end > tree))
        };
        assert_eq!(found(0, 200_010).await.unwrap(), None);
        assert_eq!(found(70_000, 300_000).await.unwrap(), None);
        // Signed at 0, the tree lost everything past 100 (or 199,999): the
        // run at folder 3 is reached over the empty folder 2.
        assert_eq!(found(0, 100).await.unwrap(), Some(200_010));
        assert_eq!(found(70_000, 199_999).await.unwrap(), Some(200_010));
        assert_eq!(found(200_000, 200_005).await.unwrap(), Some(200_010));
    }

    /// A tile is written once: the same bytes again are taken (a re-run),
    /// other bytes are a fork and leave the published tile as it was, in a
    /// bucket and in a directory alike.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn published_tiles_are_never_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let local: Arc<dyn ObjectStore> =
            Arc::new(LocalFileSystem::new_with_prefix(tmp.path()).unwrap());
        let stores = [
            (
                Arc::new(object_store::memory::InMemory::new()) as Arc<dyn ObjectStore>,
                None,
            ),
            (local, Some(tmp.path().to_path_buf())),
        ];
        for (store, dir) in stores {
            let tile = |bytes: &[u8]| vec![("tile/0/000".to_owned(), bytes.to_vec())];
            put_immutable(&store, dir.clone(), tile(b"first"))
                .await
                .unwrap();
            put_immutable(&store, dir.clone(), tile(b"first"))
                .await
                .unwrap();
            let err = put_immutable(&store, dir.clone(), tile(b"other")).await;
            assert!(
                matches!(&err, Err(LedgerError::Forked(why)) if why.contains("tile/0/000")),
                "{err:?}"
            );
            let kept = store.get(&StorePath::from("tile/0/000")).await.unwrap();
            assert_eq!(&kept.bytes().await.unwrap()[..], b"first");
            if let Some(dir) = dir {
                let beside: Vec<_> = std::fs::read_dir(dir.join("tile/0"))
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                assert_eq!(beside, ["000"], "temporary files left beside the tile");
            }
        }
    }

    /// The same for a local tiles directory, with writers racing as
    /// separate gateway processes would; nothing is left beside the
    /// checkpoint.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_checkpoint_in_a_directory_only_grows() {
        let (vkey, note) = test_log();
        let tmp = tempfile::tempdir().unwrap();
        for round in 0..20 {
            let dir = tmp.path().join(format!("tiles{round}"));
            std::fs::create_dir_all(&dir).unwrap();
            let writers: Vec<_> = (1..=8u64)
                .map(|n| {
                    let (dir, vkey, note) = (dir.clone(), vkey.clone(), note(n));
                    tokio::spawn(async move {
                        publish_local_if_newer(&dir, &vkey, n, note).await.unwrap()
                    })
                })
                .collect();
            for w in writers {
                w.await.unwrap();
            }
            let got = std::fs::read_to_string(dir.join(CHECKPOINT_FILE)).unwrap();
            assert_eq!(
                pl::verify_checkpoint(&got, &vkey).unwrap().size,
                8,
                "round {round}"
            );
            let names: Vec<_> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, vec![CHECKPOINT_FILE], "round {round}");
        }
        // A smaller one is not written over it.
        let dir = tmp.path().join("tiles0");
        assert!(!publish_local_if_newer(&dir, &vkey, 3, note(3))
            .await
            .unwrap());
        let got = std::fs::read_to_string(dir.join(CHECKPOINT_FILE)).unwrap();
        assert_eq!(pl::verify_checkpoint(&got, &vkey).unwrap().size, 8);
    }

    #[test]
    fn restore_chunks_hold_a_tile_and_stay_under_the_byte_budget() {
        let leaf = |len: usize| lx::ArchivedLeaf {
            evidence: EvidenceId::new(1, [0; 10]),
            salt: [0; 32],
            statement: vec![b'x'; len],
            manifest: None,
            expunged: false,
        };
        let lens =
            |chunks: Vec<&[lx::ArchivedLeaf]>| chunks.iter().map(|c| c.len()).collect::<Vec<_>>();
        let small: Vec<_> = (0..600).map(|_| leaf(100)).collect();
        assert_eq!(
            lens(restore_chunks(&small, 256, 1 << 20)),
            vec![256, 256, 88]
        );
        // 64 KiB statements: a tile of them would be 16 MiB.
        let big: Vec<_> = (0..300).map(|_| leaf(64 << 10)).collect();
        let chunks = restore_chunks(&big, 256, 4 << 20);
        assert_eq!(lens(chunks.clone()), vec![64, 64, 64, 64, 44]);
        assert!(chunks.iter().all(|c| c.len() * (64 << 10) <= 4 << 20));
        // A statement over the budget still gets a chunk of its own.
        let odd = vec![leaf(10), leaf(5 << 20), leaf(10)];
        assert_eq!(lens(restore_chunks(&odd, 256, 4 << 20)), vec![1, 1, 1]);
        assert!(restore_chunks(&[], 256, 4 << 20).is_empty());
    }

    #[test]
    fn statement_kind_reads_what_a_full_decode_reads() {
        for kind in Kind::ALL {
            let s = pl::Statement::new(
                kind,
                EvidenceId::new(7, [3; 10]),
                &Blake3Hash([1; 32]),
                None,
                9,
                "county-court",
                Some("C-1".into()),
                None,
                11,
            );
            let bytes = s.encode().unwrap();
            assert_eq!(statement_kind(&bytes), Some(kind));
            assert_eq!(pl::Statement::decode(&bytes).unwrap().kind, kind);
            // The same statement with its fields in another (alphabetical)
            // order still parses, through the full decoder.
            let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            let fields: Vec<(String, serde_json::Value)> =
                value.as_object().unwrap().clone().into_iter().collect();
            let mut reordered = String::from("{");
            for (i, (k, v)) in fields.iter().enumerate() {
                if i > 0 {
                    reordered.push(',');
                }
                reordered.push_str(&format!("{}:{}", serde_json::json!(k), v));
            }
            reordered.push('}');
            assert!(!reordered.starts_with("{\"v\""));
            assert_eq!(statement_kind(reordered.as_bytes()), Some(kind));
        }
        assert_eq!(statement_kind(b"{\"v\":1,\"kind\":\"no-such\"}"), None);
        assert_eq!(statement_kind(b"{\"v\":1,\"kind\":\"filed"), None);
        assert_eq!(statement_kind(b"not json"), None);
    }
}
