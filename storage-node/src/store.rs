//! The shard store: durable, self-describing shards in one data directory.
//!
//! [`ShardStore`] keeps one file per shard, except small shards, which it packs
//! into append-only segments with group commit (`crate::segments`); [`StoreError`] says why an operation
//! failed and maps itself to a wire [`ErrorCode`]. The node server
//! (`crate::server`) calls it from `spawn_blocking` tasks; `custodia bench` calls
//! [`write_durably`] directly to measure the disk the way nodes write.
//!
//! Layout of a data directory:
//!
//! ```text
//! disk.uuid                                  this disk's identity (hyphenated UUID text)
//! shards/<xx>/<evidence>-<stripe>-<index>    MAGIC | header length | header | body
//! segments/seg-<id>                          small shards, appended (see `crate::segments`)
//! tmp/                                       files being written; emptied at open
//! quarantine/<name>.<uuid>                   shards that failed their hash, kept for forensics
//! damaged-segments/seg-<id>.<uuid>           segments found unreadable at open, kept for forensics
//! ```
//!
//! `<evidence>` is the evidence id as 32 lowercase hex digits and `<xx>` is the
//! hex of its *last* byte. The last byte is random in a UUIDv7, whereas the first
//! bytes are the filing time and would put every shard of a decade in one
//! directory.
//!
//! Every shard file is written through one recipe (`durable_write`): temporary
//! file, fsync, rename into place, fsync the directory. Files of 64 KiB and
//! more are written with `O_DIRECT` where the file system allows it, and
//! shard files are read with it: a node has no use for a shard in memory
//! once it is written or sent, and copying them through the page cache was
//! the largest single cost of filing. A shard is acknowledged
//! only after that, and a crash leaves either the old file, the new one, or a
//! temporary file that the next open removes. A small shard is acknowledged once
//! the fsync of its segment covers it. When a key is in a segment and also has a
//! file (a crash between writing one and removing the other), the segment's copy
//! is served; both are whole copies of the same shard.

use crate::buffers::BufferPool;
use crate::segments::{Loc, ReadRecord, SegmentLog};
use protocol::{ErrorCode, EvidenceId, ShardHeader, ShardKey};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const DISK_UUID_FILE: &str = "disk.uuid";
const DAMAGED_SEGMENTS_DIR: &str = "damaged-segments";
const SHARDS_DIR: &str = "shards";
pub(crate) const TMP_DIR: &str = "tmp";
const QUARANTINE_DIR: &str = "quarantine";
/// Shards are counted and replaced under one of these locks (chosen by key), so
/// usage accounting stays exact when the same shard is put twice at once, while
/// puts of different shards (almost always) fsync in parallel.
const KEY_LOCKS: usize = 256;
/// Longest possible shard file prefix: magic, length, header.
const MAX_PREFIX: usize = protocol::shard::MAGIC.len() + 2 + protocol::shard::MAX_HEADER_LEN;

/// The longest a shard file can be: a read never takes more than one byte
/// past it (a longer file fails its length check and is quarantined), so a
/// file whose size is damaged cannot make a read allocate all of memory.
pub(crate) const MAX_SHARD_FILE: u64 = MAX_PREFIX as u64 + protocol::code::MAX_SHARD_SIZE as u64;

/// Shard bodies up to this many bytes go to segments by default: a 4 KiB
/// object's shards, and the last stripe of most small files.
pub const DEFAULT_SMALL_SHARD_MAX: u32 = 64 << 10;
/// Free bytes a node keeps by default (see [`StoreConfig::reserve_bytes`]).
pub const DEFAULT_RESERVE_BYTES: u64 = 256 << 20;
/// Records copied per fsync when compacting a segment.
const COMPACT_BATCH: usize = 256;

/// What [`ShardStore::erase_evidence`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Erased {
    /// Shards (files and packed records).
    pub shards: u64,
    /// Forensic copies: quarantined shards and damaged segments.
    pub copies: u64,
}

/// How a store lays out what it keeps.
/// One page of the scrubber's listing ([`ShardStore::list_finding_damage`]).
#[derive(Debug, Default)]
pub struct ScrubPage {
    pub shards: Vec<ShardHeader>,
    /// Files the listing quarantined (torn, or naming another shard).
    pub damaged: u64,
    /// Fan-out directories it could not list, whose files it passed over.
    pub unlistable: Vec<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// Shards with bodies up to this size are packed into segments; 0 keeps
    /// every shard in its own file.
    pub small_shard_max: u32,
    /// Write and read shard files of 64 KiB and more with
    /// `O_DIRECT` (the default), bypassing the page cache; off, every shard
    /// goes through the page cache (for file systems where direct I/O is
    /// slow or emulated). A file system that refuses `O_DIRECT` turns it off
    /// by itself, once, with a warning.
    pub direct_io: bool,
    /// Free bytes kept on the file system: a new shard that would leave
    /// less free is refused with [`StoreError::DiskFull`] before anything is
    /// written. Deletes and compaction may use the reserve (a tombstone and
    /// the copies that let a segment go need room, and they are how space
    /// comes back), and so may the file system and anything sharing it.
    pub reserve_bytes: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            small_shard_max: DEFAULT_SMALL_SHARD_MAX,
            direct_io: true,
            reserve_bytes: DEFAULT_RESERVE_BYTES,
        }
    }
}

/// How much of a shard's body a read checks against its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyCheck {
    /// Length and BLAKE3: a failure quarantines the shard.
    Hash,
    /// Length only; the reader hashes the bytes itself.
    Length,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No shard is stored under this key.
    #[error("shard not found")]
    NotFound,
    /// The data directory is not the one the store opened (see
    /// [`ShardStore::check_identity`]).
    #[error("the data directory changed under the running node: {0}")]
    DiskChanged(String),
    /// The body's length or BLAKE3 differs from its header; nothing was stored.
    #[error("shard body does not match its header (length or BLAKE3)")]
    HashMismatch,
    /// The header's erasure code is invalid, or its body is longer than the
    /// code's shard size; nothing was stored.
    #[error("shard header is invalid: {0}")]
    BadHeader(&'static str),
    /// The stored shard failed its check on read and has been quarantined.
    #[error("stored shard {0} is corrupt and was quarantined")]
    Corrupt(ShardKey),
    /// The disk has no room; nothing was stored.
    #[error("disk full")]
    DiskFull,
    /// `disk.uuid` exists but does not hold a UUID: someone else's directory, or
    /// damage. Refuse to start rather than mint a new identity over it.
    #[error("{0} does not hold a disk UUID")]
    BadDiskUuid(PathBuf),
    /// Any other disk error.
    #[error("disk error: {0}")]
    Io(#[source] io::Error),
    /// A fenced delete came, or reached the disk, after its time: nothing
    /// was deleted.
    #[error("the delete came after its time: nothing was deleted")]
    Late,
    /// The shard's evidence was erased here lately (expunged); nothing was
    /// stored.
    #[error("the evidence of shard {0} was expunged: not stored")]
    Expunged(ShardKey),
}

impl StoreError {
    /// The code a node sends for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::NotFound => ErrorCode::NotFound,
            StoreError::Late => ErrorCode::Late,
            StoreError::HashMismatch => ErrorCode::HashMismatch,
            StoreError::BadHeader(_) | StoreError::Expunged(_) => ErrorCode::BadRequest,
            StoreError::Corrupt(_) => ErrorCode::Corrupt,
            StoreError::DiskFull => ErrorCode::DiskFull,
            StoreError::BadDiskUuid(_) | StoreError::DiskChanged(_) | StoreError::Io(_) => {
                ErrorCode::Io
            }
        }
    }
}

impl From<io::Error> for StoreError {
    fn from(e: io::Error) -> Self {
        if is_disk_full(&e) {
            StoreError::DiskFull
        } else {
            StoreError::Io(e)
        }
    }
}

/// A read the disk or the file system failed: EIO (a bad sector, a dying
/// drive), or a file system's own checksums refusing its metadata (ext4's
/// and XFS's EFSCORRUPTED, which is EUCLEAN, and EBADMSG). The shard is then
/// as good as corrupt: quarantined, so scrub and listings go on past it and
/// repair rebuilds it, instead of every pass stopping there.
pub(crate) fn is_media_error(e: &io::Error) -> bool {
    use rustix::io::Errno;
    [Errno::IO, Errno::UCLEAN, Errno::BADMSG]
        .iter()
        .any(|errno| e.raw_os_error() == Some(errno.raw_os_error()))
}

/// An error that is this file's for good: the disk or file system cannot
/// read it, or it is not a file (a link that loops, a directory).
pub(crate) fn is_broken_file(e: &io::Error) -> bool {
    use rustix::io::Errno;
    is_media_error(e)
        || [Errno::LOOP, Errno::ISDIR, Errno::NOTDIR]
            .iter()
            .any(|errno| e.raw_os_error() == Some(errno.raw_os_error()))
}

/// Out of space, or out of this user's quota on it (which `statvfs` does
/// not show, so the reserve check cannot see it coming): either way the
/// node is full, not failing.
pub(crate) fn is_disk_full(e: &io::Error) -> bool {
    use rustix::io::Errno;
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    ) || [Errno::NOSPC, Errno::DQUOT]
        .iter()
        .any(|errno| e.raw_os_error() == Some(errno.raw_os_error()))
}

/// A snapshot of the store's identity and usage.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct StoreInfo {
    pub disk_uuid: [u8; 16],
    /// Size of the file system holding the data dir.
    pub capacity_bytes: u64,
    /// Bytes available to this process on that file system.
    pub free_bytes: u64,
    /// Bytes of shards (headers included), in files and segments.
    pub used_bytes: u64,
    pub shards: u64,
    /// Bytes of segment files, including space of replaced and deleted shards
    /// that compaction has not reclaimed yet.
    pub segment_bytes: u64,
    /// Fsyncs of segments since the store opened (each acknowledges every
    /// small shard appended before it).
    pub segment_syncs: u64,
    /// Free bytes this store leaves for deletes, compaction and the file
    /// system ([`StoreConfig::reserve_bytes`]).
    pub reserve_bytes: u64,
}

#[derive(Default)]
struct Usage {
    bytes: u64,
    shards: u64,
}

impl Usage {
    fn add(&mut self, bytes: u64) {
        self.bytes += bytes;
        self.shards += 1;
    }

    fn remove(&mut self, bytes: u64) {
        self.bytes = self.bytes.saturating_sub(bytes);
        self.shards = self.shards.saturating_sub(1);
    }

    /// A shard file of `old` bytes (if any) replaced by one of `new` (if
    /// any).
    fn replace(&mut self, old: Option<u64>, new: Option<u64>) {
        if let Some(old) = old {
            self.remove(old);
        }
        if let Some(new) = new {
            self.add(new);
        }
    }
}

/// Shards on one local data directory. Cheap to share behind an `Arc`; all
/// methods take `&self` and block on disk I/O.
pub struct ShardStore {
    root: PathBuf,
    disk_uuid: [u8; 16],
    /// The data directory and the directories shards live in, with the
    /// device each was on when opened: see [`ShardStore::check_identity`].
    opened_dirs: Vec<(PathBuf, u64)>,
    /// Shards in their own files (segments count their own).
    usage: Mutex<Usage>,
    key_locks: Vec<Mutex<()>>,
    log: SegmentLog,
    small_max: u32,
    /// Whether shard files still go around the page cache (see
    /// [`StoreConfig::direct_io`]); cleared when the file system refuses.
    direct: std::sync::atomic::AtomicBool,
    reserve: u64,
    /// Free bytes claimed by puts in flight (see [`ShardStore::claim_space`]).
    claimed: AtomicU64,
    /// When a write was last refused as full while the file system showed
    /// room (a user or group quota, which `statvfs` does not see), as an
    /// `Instant` since `opened`: see [`ShardStore::quota_full`].
    quota_full_at: Mutex<Option<std::time::Instant>>,
    /// Buffers shard files are read into: a fresh one per read cost a zeroing
    /// and a page fault per page (see [`crate::buffers`]); a buffer sent to a
    /// reader ([`get_shared`](Self::get_shared)) comes back once sent.
    read_buffers: Arc<BufferPool>,
    /// Fan-out directories this process has made sure are durable (see
    /// [`create_dir_durably`]): one parent fsync each per process, not one
    /// per shard.
    fanouts_durable: [AtomicBool; 256],
    /// Shards [`list`](Self::list) found damaged and quarantined (its
    /// callers see them only as absent): counted by the node's metrics
    /// ([`take_listed_corrupt`](Self::take_listed_corrupt)).
    listed_corrupt: AtomicU64,
    /// Damaged segments were found at open and the disk's identity could
    /// not be renewed (no room): the segments left in place are what makes
    /// the next start renew it, so nothing moves them meanwhile.
    identity_owed: bool,
    /// Records a compaction under way has copied forward and not yet
    /// removed with their segment: an expunge erases those of its evidence
    /// too, rather than say erased while the originals are still in a file.
    compacting: Mutex<Vec<(Loc, ShardKey)>>,
    /// Segment records the disk failed to read, again and again (see
    /// [`ShardStore::unreadable_small`]), and when: answered as corrupt
    /// without another read, and left out of listings, for
    /// [`UNREADABLE_RETRY`], then read again (and unmarked if they read).
    /// Their index entries stay.
    unreadable_packed: Mutex<std::collections::HashMap<(ShardKey, Loc), std::time::Instant>>,
    /// Whether `unreadable_packed` holds any: a read of a packed shard
    /// (thousands a second) takes no lock when none does.
    any_unreadable: std::sync::atomic::AtomicBool,
    /// Shard files found unopenable and already counted as damage (see
    /// [`ShardStore::name_unreadable`]), should naming them fail.
    unreadable_counted: Mutex<std::collections::HashSet<ShardKey>>,
    /// Fan-out directories' listings kept for the pages that go on from
    /// them (see [`LISTING_KEPT`]).
    listings: Mutex<Vec<KeptListing>>,
    /// Fan-out directories read for listings (what keeping them saves).
    #[cfg(test)]
    fanout_reads: AtomicU64,
    /// Evidence erased lately ([`ShardStore::erase_evidence`]), and when: a
    /// put of it is refused. A put under way when the erase began (a
    /// repair's rebuild the gateway gave up on, still writing) holds the
    /// read side from its check until its shard is visible; an erase takes
    /// the write side to add its evidence, so the put either landed first
    /// (and the erase finds it) or is refused.
    expunged: std::sync::RwLock<std::collections::HashMap<EvidenceId, std::time::Instant>>,
}

/// How long a packed shard the disk could not read is answered corrupt
/// without reading it again: a controller reset or a path failing over
/// can last seconds, and a record that then reads again (perhaps the
/// stripe's last copy of that shard) is served again, not only after a
/// restart.
const UNREADABLE_RETRY: std::time::Duration = std::time::Duration::from_secs(600);

/// How long a fan-out directory's listing is kept for the next page of a
/// listing that stopped within it. Read again for every page, a directory
/// of 40,000 shards (10 million on a node) was read and sorted some 600
/// times for one scrub pass through it at 64 a page: a pass cost grew with
/// the square of a node's shards. A shard put in a directory after its
/// listing was read, past where the listing stands, is listed by the next
/// pass (scrub) or sweep (orphans); `recover-index` runs with no gateway
/// writing.
const LISTING_KEPT: std::time::Duration = std::time::Duration::from_secs(60);
/// Listings kept at once: scrub's, and a gateway's listing through the
/// node (recovery, orphan collection).
const LISTINGS_KEPT: usize = 2;

/// A fan-out directory's listing kept for the page that goes on after
/// `next_after`.
struct KeptListing {
    fanout: u8,
    next_after: ShardKey,
    read: std::time::Instant,
    keys: Arc<[ShardKey]>,
}

/// Reads of a segment record the disk failed, tried again before it is
/// called unreadable (see [`ShardStore::unreadable_small`]), this long
/// apart.
const MEDIA_RETRIES: usize = 2;
const MEDIA_RETRY_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// How long a node refuses puts of evidence it erased: longer than any put
/// under way then can last.
const EXPUNGED_REFUSED_FOR: std::time::Duration = std::time::Duration::from_secs(3600);

/// How long a node refused a write by a quota says it is full (see
/// [`ShardStore::quota_full`]) before it tries a write again.
const QUOTA_FULL_FOR: std::time::Duration = std::time::Duration::from_secs(600);

/// Free space a put in flight holds; released when dropped.
struct SpaceClaim<'a> {
    claimed: &'a AtomicU64,
    bytes: u64,
}

impl Drop for SpaceClaim<'_> {
    fn drop(&mut self) {
        self.claimed.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for ShardStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardStore")
            .field("root", &self.root)
            .field("disk_uuid", &uuid::Uuid::from_bytes(self.disk_uuid))
            .finish_non_exhaustive()
    }
}

impl ShardStore {
    /// Opens (creating if needed) the store in `data_dir`: makes its directories,
    /// reads or mints the disk UUID, removes leftover temporary files and counts
    /// the shards already there.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(data_dir, StoreConfig::default())
    }

    /// [`ShardStore::open`] with a layout other than the default. Shards already
    /// stored stay where they are whatever `config` says.
    pub fn open_with(data_dir: &Path, config: StoreConfig) -> Result<Self, StoreError> {
        // Durably, each directory made in its parent: shards acknowledged in
        // a data directory whose own entry a power cut then lost would be a
        // node come back empty.
        create_dir_all_durably(data_dir)?;
        // Shards are evidence: the node's data directory is its own (a
        // directory it may not restrict, a mount point owned by another
        // user, is only warned about).
        {
            use std::os::unix::fs::PermissionsExt;
            if let Err(e) = fs::set_permissions(data_dir, fs::Permissions::from_mode(0o700)) {
                tracing::warn!(dir = %data_dir.display(), error = %e, "could not make the data directory private");
            }
        }
        // A disk that has an identity but lost the directories its shards
        // live in (deleted by hand, a snapshot restored over part of it)
        // no longer holds what its identity stands for: it takes a new one,
        // so the gateway re-checks every shard it placed here.
        let had_identity = data_dir.join(DISK_UUID_FILE).exists();
        let lost: Vec<&str> = [SHARDS_DIR, crate::segments::SEGMENTS_DIR]
            .into_iter()
            .filter(|d| !data_dir.join(d).exists())
            .collect();
        for dir in [SHARDS_DIR, TMP_DIR, QUARANTINE_DIR] {
            create_dir_durably(&data_dir.join(dir))?;
        }
        let root = data_dir.to_path_buf();
        remove_temporary_files(&root)?;
        let mut disk_uuid = read_or_mint_disk_uuid(&root)?;
        if had_identity && !lost.is_empty() {
            disk_uuid = mint_disk_uuid(&root)?;
            tracing::error!(
                directories = ?lost,
                disk = %uuid::Uuid::from_bytes(disk_uuid),
                "the data directory lost where its shards live: the disk takes a new identity, \
                 so the gateway re-checks every shard it placed here"
            );
        }
        let usage = count_shards(&root.join(SHARDS_DIR))?;
        let log = SegmentLog::open(&root)?;
        let mut identity_owed = false;
        if !log.damaged_segments().is_empty() || log.damage_to_mend() > 0 {
            match renew_identity(&root, &log) {
                Ok(renewed) => {
                    disk_uuid = renewed;
                    // Reported (the new identity is durable): mended, so
                    // the next start does not report it again. Not mended
                    // (a disk error), it is reported again then.
                    if let Err(e) = log.mend_damage() {
                        tracing::error!(error = %e, "could not mend the damage found in sealed segments");
                    }
                }
                // No room even for the identity file: the node still starts
                // and serves what it can; the next start tries again (the
                // damaged segments left in place say it must).
                Err(StoreError::DiskFull) => {
                    identity_owed = true;
                    tracing::error!(
                        "no room to renew the disk's identity after unreadable segments; \
                         run `custodia repair --verify-all` once there is room"
                    )
                }
                Err(e) => return Err(e),
            }
        }
        let opened_dirs = [
            root.clone(),
            root.join(SHARDS_DIR),
            root.join(crate::segments::SEGMENTS_DIR),
        ]
        .into_iter()
        .map(|dir| {
            let id = dir_identity(&dir)?;
            Ok((dir, id))
        })
        .collect::<io::Result<Vec<_>>>()?;
        let small = log.usage();
        tracing::info!(
            dir = %root.display(),
            disk = %uuid::Uuid::from_bytes(disk_uuid),
            shards = usage.shards,
            bytes = usage.bytes,
            small_shards = small.shards,
            segment_bytes = small.file_bytes,
            "shard store opened"
        );
        Ok(ShardStore {
            root,
            disk_uuid,
            opened_dirs,
            usage: Mutex::new(usage),
            key_locks: (0..KEY_LOCKS).map(|_| Mutex::new(())).collect(),
            log,
            small_max: config.small_shard_max,
            direct: std::sync::atomic::AtomicBool::new(config.direct_io),
            reserve: config.reserve_bytes,
            claimed: AtomicU64::new(0),
            quota_full_at: Mutex::new(None),
            compacting: Mutex::default(),
            unreadable_packed: Mutex::default(),
            any_unreadable: std::sync::atomic::AtomicBool::new(false),
            unreadable_counted: Mutex::default(),
            listings: Mutex::default(),
            #[cfg(test)]
            fanout_reads: AtomicU64::new(0),
            expunged: Default::default(),
            read_buffers: Arc::new(BufferPool::new(READ_BUFFER_IDLE_BYTES)),
            fanouts_durable: std::array::from_fn(|_| AtomicBool::new(false)),
            listed_corrupt: AtomicU64::new(0),
            identity_owed,
        })
    }

    /// Shards listing quarantined since the last call.
    pub fn take_listed_corrupt(&self) -> u64 {
        self.listed_corrupt.swap(0, Ordering::Relaxed)
    }

    /// Makes sure the fan-out directory of `key` exists and its entry is
    /// durable before a shard file goes in it.
    fn fanout_dir_durably(&self, key: &ShardKey) -> io::Result<()> {
        let done = &self.fanouts_durable[usize::from(key.evidence.0[15])];
        if done.load(Ordering::Acquire) {
            return Ok(());
        }
        create_dir_durably(&self.shard_dir(key))?;
        done.store(true, Ordering::Release);
        Ok(())
    }

    /// Whether shard files are written and read with `O_DIRECT` now.
    pub fn direct_io(&self) -> bool {
        self.direct.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Notes that the file system refused `O_DIRECT`: later shards go
    /// through the page cache without asking again.
    fn direct_refused(&self) {
        if self
            .direct
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(dir = %self.root.display(), "the file system refuses O_DIRECT: shard files go through the page cache");
        }
    }

    /// The directory this store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The UUID minted when this data dir was first used.
    pub fn disk_uuid(&self) -> [u8; 16] {
        self.disk_uuid
    }

    /// Where the shard `key` lives (whether or not it exists).
    pub fn shard_path(&self, key: &ShardKey) -> PathBuf {
        self.shard_dir(key).join(shard_file_name(key))
    }

    fn shard_dir(&self, key: &ShardKey) -> PathBuf {
        let fanout = key.evidence.0[15];
        self.root.join(SHARDS_DIR).join(format!("{fanout:02x}"))
    }

    /// Stores `body` under `header`, replacing any earlier copy atomically.
    /// Returns only once the shard is fsynced; refuses (storing nothing) a body
    /// that does not match the header or is longer than the code's shard size.
    pub fn put(&self, header: &ShardHeader, body: &[u8]) -> Result<(), StoreError> {
        if header.code.validate().is_err() {
            return Err(StoreError::BadHeader("invalid erasure code"));
        }
        if header.len > header.code.shard_size || body.len() > header.code.shard_size as usize {
            return Err(StoreError::BadHeader(
                "body longer than the code's shard size",
            ));
        }
        if !header.matches(body) {
            return Err(StoreError::HashMismatch);
        }
        if self.quota_full() {
            return Err(StoreError::DiskFull);
        }
        // Checked before anything is written, so a full node refuses cleanly
        // and keeps its reserve for what frees space.
        // The body plus a block for its header and the file system's own.
        let _claim = self.claim_space(body.len() as u64 + 4096)?;
        let put = self.write_shard(header, body);
        match &put {
            Ok(()) => *self.lock_quota() = None,
            // Refused as full although the file system showed room: a
            // quota. Said full from now (free 0) until a delete, a write
            // that lands, or a while.
            Err(StoreError::DiskFull) => *self.lock_quota() = Some(std::time::Instant::now()),
            Err(_) => {}
        }
        put
    }

    /// Whether a quota refused a write lately: the node then reports no
    /// free space, so the gateway counts it full instead of seeing room at
    /// each probe and failing the next put (a node flapping between full
    /// and not). Forgotten after [`QUOTA_FULL_FOR`], at a delete, or once a
    /// write lands.
    fn quota_full(&self) -> bool {
        let mut at = self.lock_quota();
        match *at {
            Some(t) if t.elapsed() < QUOTA_FULL_FOR => true,
            Some(_) => {
                *at = None;
                false
            }
            None => false,
        }
    }

    fn lock_quota(&self) -> std::sync::MutexGuard<'_, Option<std::time::Instant>> {
        self.quota_full_at.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// [`put`](Self::put)'s writes, once the body is checked and its
    /// space claimed.
    fn write_shard(&self, header: &ShardHeader, body: &[u8]) -> Result<(), StoreError> {
        let key = header.key;
        let dir = self.shard_dir(&key);
        let name = shard_file_name(&key);
        let _guard = self.lock_key(&key);
        // Held until the shard is visible (see `expunged`).
        let expunged = self.expunged.read().unwrap_or_else(|e| e.into_inner());
        if expunged
            .get(&key.evidence)
            .is_some_and(|at| at.elapsed() < EXPUNGED_REFUSED_FOR)
        {
            return Err(StoreError::Expunged(key));
        }
        let old_len = file_len(&dir.join(&name))?;
        if self.small_max > 0 && body.len() <= self.small_max as usize {
            self.log.put(header, body)?;
            if let Some(old) = old_len {
                // Now served from the segment; the file is a stale copy.
                fs::remove_file(dir.join(&name))?;
                self.lock_usage().remove(old);
                sync_dir(&dir)?;
            }
            return Ok(());
        }
        if old_len.is_none() {
            // The fan-out directory is created on first use; a crash after this
            // leaves an empty directory, which is harmless.
            self.fanout_dir_durably(&key)?;
        }
        let prefix = header.file_prefix();
        let (written, refused) = match durable_write_with(
            &self.root.join(TMP_DIR),
            &dir,
            &name,
            &[&prefix, body],
            0o644,
            self.direct_io(),
        ) {
            Ok(done) => done,
            Err(e) => {
                // The rename may have been done (the directory's fsync
                // failed after it): the file there now is what is counted.
                if let Ok(now) = file_len(&dir.join(&name)) {
                    self.lock_usage().replace(old_len, now);
                }
                return Err(e.into());
            }
        };
        if refused {
            self.direct_refused();
        }
        self.lock_usage().replace(old_len, Some(written));
        // A small copy stored earlier would shadow the new file.
        self.log.delete(&key, None)?;
        Ok(())
    }

    /// Reads the shard `key`, checking that its header names `key` and that the
    /// body matches the header's length and BLAKE3. A shard that fails is moved
    /// to `quarantine/` and reported as [`StoreError::Corrupt`].
    pub fn get(&self, key: &ShardKey) -> Result<(ShardHeader, Vec<u8>), StoreError> {
        if let Some(loc) = self.log.locate(key) {
            return self.read_small(key, loc, false);
        }
        let (header, mut bytes, body_at) = self.read_file(key, BodyCheck::Hash)?;
        // Shift the body down in place: no second buffer to allocate.
        bytes.drain(..body_at);
        Ok((header, bytes))
    }

    /// [`get`](Self::get) of the copy on the disk rather than one the page
    /// cache holds: what scrub and a repair's verify read. A node with
    /// memory to spare keeps its small shards' segments cached, and each
    /// scrub pass reading them again keeps them there: a pass checking
    /// the cache would find no rot under them until a restart, perhaps on
    /// several nodes at once. (A file read with direct I/O is read from
    /// the disk already.)
    pub fn get_from_disk(&self, key: &ShardKey) -> Result<(ShardHeader, Vec<u8>), StoreError> {
        if let Some(loc) = self.log.locate(key) {
            self.log.drop_cached(loc);
            return self.read_small(key, loc, false);
        }
        if !self.direct_io() {
            if let Ok(file) = File::open(self.shard_path(key)) {
                crate::segments::drop_cached_pages(&file, 0, None);
            }
        }
        self.get(key)
    }

    /// As [`get`](Self::get), the body as `Bytes` sharing the buffer the file
    /// was read into (no copy: what the node sends to readers).
    pub fn get_shared(&self, key: &ShardKey) -> Result<(ShardHeader, bytes::Bytes), StoreError> {
        self.get_shared_checked(key, BodyCheck::Hash)
    }

    /// As [`get_shared`](Self::get_shared), checking of the body only what
    /// `check` says: [`BodyCheck::Length`] is for a reader that hashes every
    /// byte itself against something stronger than the header (the content
    /// root) and reads again with [`BodyCheck::Hash`] when that fails, which
    /// finds and quarantines the corruption here. A shard packed in a
    /// segment is always hashed (its record's checksum covers it anyway).
    pub fn get_shared_checked(
        &self,
        key: &ShardKey,
        check: BodyCheck,
    ) -> Result<(ShardHeader, bytes::Bytes), StoreError> {
        if let Some(small) = self.get_small_shared(key) {
            return small;
        }
        let (header, bytes, body_at) = self.read_file(key, check)?;
        Ok((header, self.read_buffers.share(bytes).slice(body_at..)))
    }

    /// The fast path of [`Self::get_small_shared`], for an async thread: a
    /// segment record that reads back whole from the page cache (no key
    /// lock; the segment index's read lock only briefly; never a wait for
    /// the disk). `None` when anything slower is needed (the shard is not in
    /// a segment, not all in the page cache, its record is damaged and must
    /// be quarantined, or compaction moved it), for the caller to do on the
    /// blocking pool.
    pub fn get_small_fast(&self, key: &ShardKey) -> Option<(ShardHeader, bytes::Bytes)> {
        let loc = self.log.locate(key)?;
        match self.log.read_cached(key, loc) {
            Ok(ReadRecord::Shard(header, body)) => Some((header, bytes::Bytes::from(body))),
            _ => None,
        }
    }

    /// [`get_shared`](Self::get_shared) for a shard packed in a segment
    /// (a small one: one positioned read of a few KiB, from the page cache
    /// when recently written); `None` for a shard in its own file.
    pub fn get_small_shared(
        &self,
        key: &ShardKey,
    ) -> Option<Result<(ShardHeader, bytes::Bytes), StoreError>> {
        let loc = self.log.locate(key)?;
        Some(
            self.read_small(key, loc, false)
                .map(|(h, body)| (h, bytes::Bytes::from(body))),
        )
    }

    /// Reads and verifies a shard file (its body as far as `check` says): its
    /// header, the whole file, and where the body starts in it.
    fn read_file(
        &self,
        key: &ShardKey,
        check: BodyCheck,
    ) -> Result<(ShardHeader, Vec<u8>, usize), StoreError> {
        let direct = if self.direct_io() {
            read_direct(&self.shard_path(key), &self.read_buffers)
        } else {
            Ok(None)
        };
        let (bytes, start, inode) = match direct {
            Ok(Some(read)) => read,
            Ok(None) => {
                let (file, inode) = self.open_shard(key)?;
                let mut bytes = Vec::new();
                if let Err(e) = file.take(MAX_SHARD_FILE + 1).read_to_end(&mut bytes) {
                    return Err(self.unreadable(key, Some(inode), e));
                }
                (bytes, 0, inode)
            }
            Err((e, _)) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::NotFound),
            Err((e, inode)) => return Err(self.unreadable(key, inode, e)),
        };
        let (header, body_at) = match ShardHeader::parse_file_prefix(&bytes[start..]) {
            Ok(parsed) => parsed,
            Err(e) => return Err(self.quarantine(key, inode, &format!("unreadable header: {e}"))),
        };
        if header.key != *key {
            return Err(self.quarantine(key, inode, "header names another shard"));
        }
        let body_at = start + body_at;
        let body = &bytes[body_at..];
        let good = match check {
            BodyCheck::Hash => header.matches(body),
            BodyCheck::Length => body.len() == header.len as usize,
        };
        if !good {
            return Err(self.quarantine(
                key,
                inode,
                "body does not match its header's length or BLAKE3",
            ));
        }
        Ok((header, bytes, body_at))
    }

    /// How many bytes reading `key` takes if it is packed in a segment (its
    /// record): known in memory, no disk touched.
    pub fn packed_len(&self, key: &ShardKey) -> Option<u64> {
        self.log.locate(key).map(|loc| u64::from(loc.len))
    }

    /// About how many bytes reading `key` takes (its segment record or its
    /// file, header included): what a read is charged before it is made.
    /// `None` if it is not here. A file's is a `stat`: call it where the
    /// disk may be waited for.
    pub fn stored_len(&self, key: &ShardKey) -> Option<u64> {
        self.packed_len(key)
            .or_else(|| file_len(&self.shard_path(key)).ok().flatten())
    }

    /// The stored header of `key`, without reading (or verifying) the body. Only
    /// checks what is cheap: the header parses, names `key`, and the file is as
    /// long as the header says.
    pub fn stat(&self, key: &ShardKey) -> Result<ShardHeader, StoreError> {
        if let Some(loc) = self.log.locate(key) {
            return self.read_small(key, loc, true).map(|(h, _)| h);
        }
        let (mut file, inode) = self.open_shard(key)?;
        let file_len = match file.metadata() {
            Ok(meta) => meta.len(),
            Err(e) => return Err(self.unreadable(key, Some(inode), e)),
        };
        let mut prefix = Vec::with_capacity(MAX_PREFIX);
        if let Err(e) = (&mut file).take(MAX_PREFIX as u64).read_to_end(&mut prefix) {
            return Err(self.unreadable(key, Some(inode), e));
        }
        let (header, body_at) = match ShardHeader::parse_file_prefix(&prefix) {
            Ok(parsed) => parsed,
            Err(e) => return Err(self.quarantine(key, inode, &format!("unreadable header: {e}"))),
        };
        if header.key != *key {
            return Err(self.quarantine(key, inode, "header names another shard"));
        }
        if file_len != body_at as u64 + header.len as u64 {
            return Err(self.quarantine(key, inode, "file length disagrees with its header"));
        }
        Ok(header)
    }

    /// Deletes the shard `key`; says whether it existed. Durable on return.
    pub fn delete(&self, key: &ShardKey) -> Result<bool, StoreError> {
        self.delete_while(key, || true)
    }

    /// [`Self::delete`] if `in_time` still holds once the shard's lock is
    /// taken (a fenced delete: see `protocol::Request::DeleteShardBefore`),
    /// else [`StoreError::Late`] with nothing deleted.
    pub fn delete_while(
        &self,
        key: &ShardKey,
        in_time: impl Fn() -> bool,
    ) -> Result<bool, StoreError> {
        let dir = self.shard_dir(key);
        let path = dir.join(shard_file_name(key));
        let _guard = self.lock_key(key);
        if !in_time() {
            return Err(StoreError::Late);
        }
        let small = self.log.delete(key, None)?.is_some();
        let Some(len) = file_len(&path)? else {
            return Ok(small);
        };
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(small),
            Err(e) => return Err(e.into()),
        }
        self.lock_usage().remove(len);
        sync_dir(&dir)?;
        // Room has come back under a quota too (a packed shard's bytes
        // come back only when its segment is compacted).
        *self.lock_quota() = None;
        Ok(true)
    }

    /// Erases every trace of `evidence`'s shards on this disk, for an
    /// expunge: its shard files and packed records (a packed record is
    /// overwritten, see `crate::segments`), the forensic copies of its
    /// shards in `quarantine/`, and every damaged segment in
    /// `damaged-segments/` that holds any of its bytes or cannot be read
    /// whole to show that it does not (a court's order to destroy evidence
    /// outweighs keeping a failed disk's leftovers for forensics; what those
    /// held was rebuilt elsewhere). Durable on return; running it again
    /// finds nothing more.
    pub fn erase_evidence(&self, evidence: EvidenceId) -> Result<Erased, StoreError> {
        // First: puts under way land before this (and are found below), and
        // later ones are refused.
        {
            let mut expunged = self.expunged.write().unwrap_or_else(|e| e.into_inner());
            expunged.retain(|_, at| at.elapsed() < EXPUNGED_REFUSED_FOR);
            expunged.insert(evidence, std::time::Instant::now());
        }
        let fanout = evidence.0[15];
        let prefix = format!("{}-", uuid::Uuid::from_bytes(evidence.0).simple());
        let mut keys: std::collections::BTreeSet<ShardKey> = self
            .log
            .keys_in(fanout)
            .into_iter()
            .filter(|k| k.evidence == evidence)
            .collect();
        // And those whose puts failed but may be on the disk.
        keys.extend(self.log.failed_puts_of(evidence));
        let dir = self.root.join(SHARDS_DIR).join(format!("{fanout:02x}"));
        keys.extend(
            names_starting(&dir, &prefix)?
                .iter()
                .filter_map(|name| parse_shard_file_name(name))
                .filter(|k| k.evidence == evidence),
        );
        let mut erased = Erased::default();
        for key in &keys {
            if self.delete(key)? {
                erased.shards += 1;
            }
        }
        // Originals of its records a compaction under way copied forward
        // (the copies were deleted above), still in their segment.
        let originals: Vec<Loc> = self
            .compacting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, k)| k.evidence == evidence)
            .map(|(from, _)| *from)
            .collect();
        for from in originals {
            self.log.erase(from, evidence);
        }
        // Records of its shards deleted earlier (a repair moved them, GC
        // collected a copy) were erased then, not yet durably. (A record of
        // other evidence that cannot be erased fails that one's expunges,
        // not this one.)
        self.log.sync_erasures(Some(evidence))?;
        let quarantine = self.root.join(QUARANTINE_DIR);
        let copies = names_starting(&quarantine, &prefix)?;
        for name in &copies {
            remove_if_there(&quarantine.join(name))?;
        }
        if !copies.is_empty() {
            sync_dir(&quarantine)?;
        }
        erased.copies += copies.len() as u64;
        let aside = self.root.join(DAMAGED_SEGMENTS_DIR);
        // Damaged stretches of sealed segments the open could not mend (no
        // room to report them first, or the mend failed) may hold some of
        // this evidence, unindexed: the erasure fails (the expunge waits and
        // is asked again) rather than say erased over them, until a start
        // mends them. (Mended here, beside the appends and erasures under
        // way, its fsync could take another's writeback error.)
        if self.log.damage_to_mend() > 0 {
            tracing::error!(%evidence, "damaged stretches of segments are not mended yet: erasing waits for a start that mends them (restart the node once its disk has room and reads)");
            return Err(match self.identity_owed {
                true => StoreError::DiskFull,
                false => StoreError::Io(io::Error::other(
                    "damaged stretches of segments wait to be mended at the next start",
                )),
            });
        }
        // A damaged segment the open could not move aside (no room then)
        // is still among the live ones, unindexed: what it holds of this
        // evidence is neither deleted above nor looked for below. Moved
        // aside now, or the erasure fails (the expunge waits and is asked
        // again) rather than say erased over bytes still on the disk.
        let stuck: Vec<(u64, PathBuf)> = self
            .log
            .damaged_segments()
            .iter()
            .map(|&seg| (seg, self.log.segment_path(seg)))
            .filter(|(_, path)| path.exists())
            .collect();
        if !stuck.is_empty() && self.identity_owed {
            // Moved, the next start would not renew the identity, and the
            // gateway would never re-check what the segments held: the
            // erasure waits for a start with room.
            return Err(StoreError::DiskFull);
        }
        if !stuck.is_empty() {
            if let Some((seg, e)) = move_segments_aside(&self.root, &stuck)?.into_iter().next() {
                tracing::error!(segment = seg, error = %e, "a damaged segment cannot be moved aside to be searched for expunged evidence");
                return Err(StoreError::Io(e));
            }
        }
        let mut removed_aside = false;
        for name in names_starting(&aside, "")? {
            let path = aside.join(&name);
            // A directory where a segment was (its entry damaged): what it
            // holds cannot be searched as one segment; it goes whole.
            if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                tracing::warn!(%evidence, file = %path.display(), "removing a directory kept among damaged segments");
                fs::remove_dir_all(&path)?;
                removed_aside = true;
                erased.copies += 1;
                continue;
            }
            let holds = match file_holds(&path, &evidence.0) {
                Ok(holds) => holds,
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "a damaged segment cannot be read to show it holds nothing of expunged evidence: removing it");
                    true
                }
            };
            if holds {
                tracing::info!(%evidence, file = %path.display(), "removing a damaged segment that holds shards of expunged evidence");
                remove_if_there(&path)?;
                removed_aside = true;
                erased.copies += 1;
            }
        }
        if removed_aside {
            sync_dir(&aside)?;
        }
        Ok(erased)
    }

    /// The headers of up to `limit` stored shards in listing order after
    /// `after` (fan-out directory, then key): pages through the inventory
    /// for `recover-index` and orphan collection. Each header is read and
    /// checked like [`ShardStore::stat`]; a file that fails is quarantined
    /// and skipped, so a listing never names a shard a read would refuse.
    pub fn list(
        &self,
        after: Option<&ShardKey>,
        limit: usize,
    ) -> Result<Vec<ShardHeader>, StoreError> {
        let mut damaged = 0;
        let out = self.list_counting(after, limit, &mut damaged, None);
        // What was quarantined (before any error) counts.
        self.listed_corrupt.fetch_add(damaged, Ordering::Relaxed);
        out
    }

    /// The scrubber's [`list`](Self::list): returns how many files it
    /// quarantined instead of counting them for
    /// [`take_listed_corrupt`](Self::take_listed_corrupt) (the scrubber
    /// counts what its own listing finds), and passes over the fan-out
    /// directories it cannot list, naming them, rather than fail: one bad
    /// directory must not stop every scrub pass there for good. (Recovery
    /// and orphan collection must not take such a listing for whole.)
    pub fn list_finding_damage(
        &self,
        after: Option<&ShardKey>,
        limit: usize,
    ) -> Result<ScrubPage, StoreError> {
        let mut damaged = 0;
        let mut unlistable = Vec::new();
        match self.list_counting(after, limit, &mut damaged, Some(&mut unlistable)) {
            Ok(shards) => Ok(ScrubPage {
                shards,
                damaged,
                unlistable,
            }),
            Err(e) => {
                // What was quarantined before the error still counts.
                self.listed_corrupt.fetch_add(damaged, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    fn list_counting(
        &self,
        after: Option<&ShardKey>,
        limit: usize,
        damaged: &mut u64,
        mut unlistable: Option<&mut Vec<PathBuf>>,
    ) -> Result<Vec<ShardHeader>, StoreError> {
        let mut out = Vec::new();
        let first = after.map_or(0, |k| k.evidence.0[15] as usize);
        for fanout in first..=255usize {
            // Within the first directory, the keys after `after`.
            let within = after.filter(|_| fanout == first);
            let (keys, read, whole) = match within.and_then(|a| self.kept_listing(fanout as u8, a))
            {
                Some((keys, read)) => (keys, read, true),
                None => {
                    let read = std::time::Instant::now();
                    let (keys, whole) = self.read_fanout(fanout, unlistable.as_deref_mut())?;
                    (keys, read, whole)
                }
            };
            let start = within.map_or(0, |a| keys.partition_point(|k| k <= a));
            for (at, &key) in keys.iter().enumerate().skip(start) {
                // A packed record the disk could not read is named in
                // quarantine already, and counted then: passed over while
                // marked, and not counted again when, the mark lapsed, it
                // still does not read.
                let loc = self.log.locate(&key);
                if loc.is_some_and(|loc| self.marked_unreadable(&key, loc)) {
                    continue;
                }
                let known = loc.is_some_and(|loc| self.known_unreadable(&key, loc));
                match self.stat(&key) {
                    Ok(header) => out.push(header),
                    // Deleted since the directory was read.
                    Err(StoreError::NotFound) => {}
                    // Quarantined by `stat` (a torn or truncated file, a
                    // header naming another shard): counted, then absent.
                    Err(StoreError::Corrupt(_)) if known => {}
                    Err(StoreError::Corrupt(_)) => *damaged += 1,
                    // One file that cannot even be opened or quarantined
                    // (its inode unreadable, a link where a file should be)
                    // must not stop every listing there for good: scrub,
                    // recovery and orphan collection page past it, and a
                    // read of it fails, so the gateway rebuilds it. Errors
                    // that pass (too many open files) still fail the
                    // listing: recovery must not take a short one as whole.
                    // It is damage all the same: named in quarantine, so the
                    // gateway hears of it and rebuilds it elsewhere without
                    // waiting for a read, and counted.
                    // Counted when first named: a file that stays unreadable
                    // is found at every listing, and counted each time it
                    // would keep the corrupt-shard alert up for good.
                    Err(StoreError::Io(e)) if is_broken_file(&e) => {
                        tracing::error!(shard = %key, error = %e, "a shard file could not be read; passed over");
                        if self.name_unreadable(&key) {
                            *damaged += 1;
                        }
                    }
                    Err(e) => return Err(e),
                }
                if out.len() >= limit {
                    // The next page goes on from `key`, in this listing.
                    if whole && at + 1 < keys.len() {
                        self.keep_listing(KeptListing {
                            fanout: fanout as u8,
                            next_after: key,
                            read,
                            keys,
                        });
                    }
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    /// The keys of the shards in fan-out directory `fanout` (its files and
    /// its packed shards), in order, once each; and whether the listing is
    /// whole (a directory that cannot be listed is passed over, naming it
    /// in `unlistable`, when that is given; an error otherwise).
    fn read_fanout(
        &self,
        fanout: usize,
        unlistable: Option<&mut Vec<PathBuf>>,
    ) -> Result<(Arc<[ShardKey]>, bool), StoreError> {
        #[cfg(test)]
        self.fanout_reads.fetch_add(1, Ordering::Relaxed);
        let dir = self.root.join(SHARDS_DIR).join(format!("{fanout:02x}"));
        let mut keys = self.log.keys_in(fanout as u8);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries.collect::<io::Result<Vec<_>>>(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        };
        let (entries, whole) = match (entries, unlistable) {
            (Ok(entries), _) => (entries, true),
            // Its files passed over; the shards in segments still listed.
            (Err(e), Some(skipped)) => {
                tracing::error!(dir = %dir.display(), error = %e, "a shard directory cannot be listed; its files are passed over");
                skipped.push(dir.clone());
                (Vec::new(), false)
            }
            (Err(e), None) => return Err(e.into()),
        };
        for entry in entries {
            let name = entry.file_name();
            match name.to_str().and_then(parse_shard_file_name) {
                Some(key) => keys.push(key),
                None => {
                    tracing::warn!(file = ?name, dir = %dir.display(), "unexpected file among shards")
                }
            }
        }
        keys.sort_unstable();
        keys.dedup();
        Ok((keys.into(), whole))
    }

    /// The listing of `fanout` a page that stopped at `after` kept, if it
    /// is fresh (see [`LISTING_KEPT`]); taken, with when it was read.
    fn kept_listing(
        &self,
        fanout: u8,
        after: &ShardKey,
    ) -> Option<(Arc<[ShardKey]>, std::time::Instant)> {
        let mut kept = self.listings.lock().unwrap_or_else(|e| e.into_inner());
        let at = kept.iter().position(|l| {
            l.fanout == fanout && l.next_after == *after && l.read.elapsed() < LISTING_KEPT
        })?;
        let l = kept.remove(at);
        Some((l.keys, l.read))
    }

    /// Keeps a listing for the page that goes on from it (the oldest of
    /// [`LISTINGS_KEPT`] goes).
    fn keep_listing(&self, listing: KeptListing) {
        let mut kept = self.listings.lock().unwrap_or_else(|e| e.into_inner());
        kept.retain(|l| l.read.elapsed() < LISTING_KEPT);
        if kept.len() >= LISTINGS_KEPT {
            kept.remove(0);
        }
        kept.push(listing);
    }

    /// The keys of quarantined shards after `after`, in key order, at most
    /// `limit` (a key quarantined twice is named once).
    pub fn quarantined(
        &self,
        after: Option<&ShardKey>,
        limit: usize,
    ) -> Result<Vec<ShardKey>, StoreError> {
        let mut keys = std::collections::BTreeSet::new();
        for entry in fs::read_dir(self.root.join(QUARANTINE_DIR))? {
            let name = entry?.file_name();
            // `<shard file name>.<uuid>`
            let key = name
                .to_str()
                .and_then(|n| n.rsplit_once('.'))
                .and_then(|(shard, _)| parse_shard_file_name(shard));
            if let Some(key) = key.filter(|k| after.is_none_or(|a| k > a)) {
                keys.insert(key);
            }
        }
        Ok(keys.into_iter().take(limit).collect())
    }

    /// Whether the data directory is still the one opened: its directories
    /// there, on the devices they were on, and `disk.uuid` the same. A
    /// directory wiped or replaced under the running node, or a file system
    /// unmounted from under it (writes then land on the one beneath), fails
    /// with [`StoreError::DiskChanged`]: what this process holds open and
    /// counts no longer matches the disk, and the node must stop and be
    /// restarted on what is there now, which the gateway then notices as
    /// another disk and checks against the index. Only a definite change
    /// counts: an error reading (a full file table, a failing disk) is
    /// returned as itself.
    pub fn check_identity(&self) -> Result<(), StoreError> {
        for (dir, opened) in &self.opened_dirs {
            match dir_identity(dir) {
                Ok(now) if now == *opened => {}
                Ok(_) => {
                    return Err(StoreError::DiskChanged(format!(
                        "{} is on another device than when opened",
                        dir.display()
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(StoreError::DiskChanged(format!(
                        "{} is gone",
                        dir.display()
                    )))
                }
                Err(e) => return Err(e.into()),
            }
        }
        let path = self.root.join(DISK_UUID_FILE);
        let now = match fs::read_to_string(&path) {
            Ok(text) => uuid::Uuid::parse_str(text.trim())
                .ok()
                .map(|u| *u.as_bytes()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        if now != Some(self.disk_uuid) {
            return Err(StoreError::DiskChanged(format!(
                "{} no longer holds {}",
                path.display(),
                uuid::Uuid::from_bytes(self.disk_uuid)
            )));
        }
        Ok(())
    }

    /// Identity, capacity and usage.
    pub fn info(&self) -> Result<StoreInfo, StoreError> {
        let vfs = rustix::fs::statvfs(&self.root).map_err(io::Error::from)?;
        let small = self.log.usage();
        let usage = self.lock_usage();
        Ok(StoreInfo {
            disk_uuid: self.disk_uuid,
            capacity_bytes: vfs.f_blocks.saturating_mul(vfs.f_frsize),
            free_bytes: match self.quota_full() {
                true => 0,
                false => vfs.f_bavail.saturating_mul(vfs.f_frsize),
            },
            used_bytes: usage.bytes + small.live_bytes,
            shards: usage.shards + small.shards,
            segment_bytes: small.file_bytes,
            segment_syncs: small.syncs,
            reserve_bytes: self.reserve,
        })
    }

    /// Claims `bytes` of free space for a put in flight until the claim is
    /// dropped: refused with [`StoreError::DiskFull`] if the free space, less
    /// what puts in flight have claimed, would fall under the reserve
    /// (puts running together must not pass the check together and then
    /// all write into the reserve).
    fn claim_space(&self, bytes: u64) -> Result<SpaceClaim<'_>, StoreError> {
        let claimed = self.claimed.fetch_add(bytes, Ordering::AcqRel) + bytes;
        let claim = SpaceClaim {
            claimed: &self.claimed,
            bytes,
        };
        if self.free_bytes()?.saturating_sub(claimed) < self.reserve {
            return Err(StoreError::DiskFull);
        }
        Ok(claim)
    }

    /// Bytes available to this process on the store's file system now.
    fn free_bytes(&self) -> Result<u64, StoreError> {
        let vfs = rustix::fs::statvfs(&self.root).map_err(io::Error::from)?;
        Ok(vfs.f_bavail.saturating_mul(vfs.f_frsize))
    }

    /// Makes the erasures of dead records so far durable (see
    /// `SegmentLog::sync_erasures`).
    pub fn sync_erasures(&self) -> Result<(), StoreError> {
        Ok(self.log.sync_erasures(None)?)
    }

    /// Reclaims the space of one sealed segment that is mostly replaced or
    /// deleted shards, if there is one: copies what is still current to the
    /// active segment, fsyncs, removes the old file. Says whether it did.
    /// Runs alongside puts and reads (a key's lock is held only while its
    /// record is copied).
    pub fn compact(&self) -> Result<bool, StoreError> {
        let Some(id) = self.log.compaction_candidate() else {
            return Ok(false);
        };
        // A segment whose compaction fails (a bad sector, a failed fsync) is
        // passed over from then on, so it cannot hold up all the others.
        self.compact_segment(id)
            .inspect_err(|_| self.log.skip_compaction(id))
    }

    fn compact_segment(&self, id: u64) -> Result<bool, StoreError> {
        let mut copied_from = Vec::new();
        let compacted = self.compact_segment_from(id, &mut copied_from);
        if !matches!(compacted, Ok(true)) {
            // The segment stays (something in it could not be copied, or
            // the compaction failed part way): the records copied out of it
            // are dead, and go as any dead record.
            for (from, key) in copied_from {
                self.log.erase(from, key.evidence);
            }
        }
        self.compacting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(from, _)| from.seg != id);
        compacted
    }

    /// [`Self::compact_segment`], noting in `copied_from` each record it
    /// copied forward.
    fn compact_segment_from(
        &self,
        id: u64,
        copied_from: &mut Vec<(Loc, ShardKey)>,
    ) -> Result<bool, StoreError> {
        let (live, tombstones) = self.log.survivors(id)?;
        let (copied, kept) = (live.len(), tombstones.len());
        for batch in live.chunks(COMPACT_BATCH) {
            let _guards = self.lock_keys(batch.iter().map(|(k, _)| k));
            let mut moved = Vec::with_capacity(batch.len());
            let copied = (|| {
                for &(key, from) in batch {
                    if let Some((to, pending)) = self.log.copy_forward(&key, from)? {
                        moved.push((key, from, to, pending));
                    }
                }
                self.log
                    .wait_all_durable(moved.iter().map(|(_, _, to, _)| (to.seg, to.end())))
            })();
            if let Err(e) = copied {
                // The copies made are never indexed (the originals stay
                // current, and an open passes over a later copy whose body
                // fails): dead, so erased as any dead record, which an
                // expunge of their evidence then waits for. Left as they
                // were, an expunge would erase only the original, and the
                // copy keep the bytes until the next open or compaction.
                for (key, _, to, pending) in moved {
                    self.log.erase(to, key.evidence);
                    drop(pending);
                }
                return Err(e.into());
            }
            // Noted while the keys' locks are held: an expunge deleting
            // one of them finds its original here.
            let mut compacting = self.compacting.lock().unwrap_or_else(|e| e.into_inner());
            for (key, from, to, pending) in moved {
                self.log.moved(&key, from, to);
                drop(pending);
                copied_from.push((from, key));
                compacting.push((from, key));
            }
        }
        // Once per segment: copies made by an earlier try (which could not
        // drop it) hide the same records, and are carried by compactions of
        // their own segments.
        if !self.log.tombstones_carried(id) {
            for batch in tombstones.chunks(COMPACT_BATCH) {
                let _guards = self.lock_keys(batch.iter().map(|t| &t.key));
                let mut copied = Vec::new();
                for t in batch {
                    copied.extend(self.log.copy_tombstone(t)?);
                }
                self.log
                    .wait_all_durable(copied.iter().map(|(seg, end, _)| (*seg, *end)))?;
            }
            self.log.carried_tombstones(id);
        }
        let dropped = self.log.drop_segment(id)?;
        if !dropped {
            self.log.skip_compaction(id);
        }
        tracing::info!(
            segment = id,
            copied,
            tombstones = kept,
            dropped,
            "compacted a segment"
        );
        Ok(dropped)
    }

    /// Reads a small shard from its segment (only its header when
    /// `head_only`); quarantines a record that fails.
    fn read_small(
        &self,
        key: &ShardKey,
        loc: Loc,
        head_only: bool,
    ) -> Result<(ShardHeader, Vec<u8>), StoreError> {
        // Read again and again already: not a fourth time at each read
        // (each a wait on a failing disk), nor named in quarantine anew.
        if self.marked_unreadable(key, loc) {
            return Err(StoreError::Corrupt(*key));
        }
        let mut read = self.log.read(key, loc, head_only);
        // A media error may pass (a controller reset, a path failing
        // over): read again before calling the record lost.
        for _ in 0..MEDIA_RETRIES {
            match &read {
                Err(e) if is_media_error(e) => {
                    std::thread::sleep(MEDIA_RETRY_WAIT);
                    read = self.log.read(key, loc, head_only);
                }
                _ => break,
            }
        }
        let moved = match &read {
            Ok(ReadRecord::Shard(..)) => false,
            Ok(ReadRecord::Damaged(..)) => true,
            Err(e) => e.kind() == io::ErrorKind::NotFound,
        };
        // Not what was indexed when the read began: compacted away,
        // replaced, or deleted (and erased) since. Look again.
        if moved {
            match self.log.locate(key) {
                Some(now) if now == loc => {}
                Some(now) => return self.read_small(key, now, head_only),
                // Deleted from the segments since: a file copy is all there may be.
                None if head_only => return self.stat(key).map(|h| (h, Vec::new())),
                None => return self.get(key),
            }
        }
        match read {
            Ok(ReadRecord::Shard(header, body)) => {
                self.readable_again(key, loc);
                Ok((header, body))
            }
            Ok(ReadRecord::Damaged(why, bytes)) => {
                // A head-only read holds the record's first bytes only: the
                // copy kept for forensics is the whole record.
                let bytes = match head_only {
                    true => match self.log.read(key, loc, false) {
                        Ok(ReadRecord::Damaged(_, all)) if all.len() > bytes.len() => all,
                        _ => bytes,
                    },
                    false => bytes,
                };
                Err(self.quarantine_small(key, loc, &bytes, why))
            }
            Err(e) if is_media_error(&e) => Err(self.unreadable_small(key, loc, &e)),
            Err(e) => Err(e.into()),
        }
    }

    /// A segment record the disk could not read, again and again: named in
    /// `quarantine/` (an empty copy: nothing of it could be read to keep),
    /// where the gateway's listing finds it and rebuilds the shard, and
    /// marked so that reads answer it corrupt and listings leave it out for
    /// [`UNREADABLE_RETRY`]; then it is read again, and unmarked if it
    /// reads (a restart forgets the mark too). Neither tombstoned nor erased, as a record
    /// found damaged is, nor dropped from the index: the error may yet
    /// pass, and until the rebuild is done its bytes may be the last copy
    /// of that shard the stripe has. Compaction carries it over if it then
    /// reads (and leaves its segment if not); the gateway's delete of this
    /// copy once the rebuild is done erases it, and so does an expunge.
    fn unreadable_small(&self, key: &ShardKey, loc: Loc, e: &io::Error) -> StoreError {
        let _guard = self.lock_key(key);
        if self.log.locate(key) != Some(loc) {
            return StoreError::Corrupt(*key);
        }
        let first = self
            .unreadable_packed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((*key, loc), std::time::Instant::now())
            .is_none();
        self.any_unreadable.store(true, Ordering::Relaxed);
        if first {
            tracing::error!(shard = %key, error = %e, "the disk could not read a packed shard; named in quarantine for repair, its record kept");
            self.name_in_quarantine(key, &uuid::Uuid::now_v7().simple().to_string());
        }
        StoreError::Corrupt(*key)
    }

    /// Names `key` in `quarantine/` with an empty `<shard file>.<suffix>`,
    /// where the gateway's listing of quarantined shards finds it (for a
    /// shard nothing of which could be read to keep); whether it did.
    fn name_in_quarantine(&self, key: &ShardKey, suffix: &str) -> bool {
        let name = format!("{}.{suffix}", shard_file_name(key));
        let quarantine = self.root.join(QUARANTINE_DIR);
        let named = durable_write(&self.root.join(TMP_DIR), &quarantine, &name, &[], 0o644);
        if let Err(e) = &named {
            tracing::warn!(shard = %key, error = %e, "could not name an unreadable shard in quarantine");
        }
        named.is_ok()
    }

    /// Whether the record of `key` at `loc` was marked unreadable, however
    /// long ago (see [`Self::unreadable_small`]): its damage is counted.
    fn known_unreadable(&self, key: &ShardKey, loc: Loc) -> bool {
        self.any_unreadable.load(Ordering::Relaxed)
            && self
                .unreadable_packed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&(*key, loc))
    }

    /// Whether the record of `key` at `loc` is one the disk could not read
    /// (see [`Self::unreadable_small`]) less than [`UNREADABLE_RETRY`] ago.
    fn marked_unreadable(&self, key: &ShardKey, loc: Loc) -> bool {
        if !self.any_unreadable.load(Ordering::Relaxed) {
            return false;
        }
        self.unreadable_packed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(*key, loc))
            .is_some_and(|at| at.elapsed() < UNREADABLE_RETRY)
    }

    /// The record of `key` at `loc` read whole: no longer unreadable (the
    /// error passed), if it was marked so.
    fn readable_again(&self, key: &ShardKey, loc: Loc) {
        if !self.any_unreadable.load(Ordering::Relaxed) {
            return;
        }
        let mut marked = self
            .unreadable_packed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if marked.remove(&(*key, loc)).is_some() {
            tracing::info!(shard = %key, "a packed shard the disk could not read reads again");
        }
        if marked.is_empty() {
            self.any_unreadable.store(false, Ordering::Relaxed);
        }
    }

    /// The error for a shard file that could not be read: a media error
    /// quarantines it (`inode`, when known, names the version that failed),
    /// anything else is reported as it is.
    fn unreadable(&self, key: &ShardKey, inode: Option<u64>, e: io::Error) -> StoreError {
        if !is_media_error(&e) {
            return e.into();
        }
        tracing::error!(shard = %key, error = %e, "the disk could not read a shard");
        // Not looked up by its path now: a repair may have put a good copy
        // there since. Unnamed (the file could not even be opened), it is
        // reported as unreadable, and the gateway rebuilds it; named in
        // quarantine too, for the gateway's listing.
        match inode {
            Some(inode) => self.quarantine(key, inode, "the disk could not read it"),
            None => {
                self.name_unreadable(key);
                e.into()
            }
        }
    }

    /// Names a shard whose file cannot even be opened in `quarantine/`
    /// (an empty `<shard file>.unreadable`, once), where the gateway's
    /// listing of quarantined shards finds it: the file itself cannot be
    /// moved there, and left unnamed its loss would wait for a read.
    /// Returns whether it is news: not named already, nor (naming failing,
    /// on a full or read-only disk) seen since this process started.
    fn name_unreadable(&self, key: &ShardKey) -> bool {
        let seen = !self
            .unreadable_counted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(*key);
        let name = format!("{}.unreadable", shard_file_name(key));
        if self.root.join(QUARANTINE_DIR).join(name).exists() {
            return false;
        }
        self.name_in_quarantine(key, "unreadable");
        !seen
    }

    /// Copies a failed segment record to `quarantine/` (kept for forensics)
    /// and deletes it from the segments, if it is still the key's record.
    fn quarantine_small(&self, key: &ShardKey, loc: Loc, bytes: &[u8], why: &str) -> StoreError {
        tracing::warn!(shard = %key, reason = why, "stored shard failed its check; quarantining");
        let _guard = self.lock_key(key);
        if self.log.locate(key) != Some(loc) {
            return StoreError::Corrupt(*key);
        }
        let name = format!("{}.{}", shard_file_name(key), uuid::Uuid::now_v7().simple());
        let quarantine = self.root.join(QUARANTINE_DIR);
        let write = |body: &[u8]| {
            durable_write_with(
                &self.root.join(TMP_DIR),
                &quarantine,
                &name,
                &[body],
                0o644,
                self.direct_io(),
            )
        };
        // On a full disk the forensic copy cannot be written: an empty file
        // (an inode, no blocks) still names the shard to the gateway's
        // quarantine listing, so repair hears of it, and the record is
        // still taken out of service. Kept in service, it would be found
        // by every scrub pass and repaired only if a read met it.
        let copied = write(bytes).or_else(|e| {
            if !is_disk_full(&e) {
                return Err(e);
            }
            tracing::warn!(shard = %key, "no room for a forensic copy of a corrupt shard; quarantining its name only");
            write(&[])
        });
        if let Err(e) = copied {
            tracing::warn!(shard = %key, error = %e, "could not quarantine corrupt shard");
            return StoreError::Corrupt(*key);
        }
        if let Err(e) = self.log.delete(key, Some(loc)) {
            // Its name is in quarantine: out of service now, found (and
            // quarantined again) after a restart if no tombstone gets
            // written meanwhile.
            tracing::warn!(shard = %key, error = %e, "could not write a corrupt shard's tombstone; dropping it from service until restart");
            self.log.forget(key, loc);
            // Its bytes go all the same (it is copied to quarantine, or
            // could not be read): found again at the next start, it reads
            // as damaged, as it is.
            self.log.erase(loc, key.evidence);
        }
        StoreError::Corrupt(*key)
    }

    /// Opens the shard file of `key`; returns it with its inode number, which
    /// identifies this version of the shard if it is later found corrupt.
    fn open_shard(&self, key: &ShardKey) -> Result<(File, u64), StoreError> {
        match File::open(self.shard_path(key)) {
            Ok(file) => match file.metadata() {
                Ok(meta) => Ok((file, meta.ino())),
                Err(e) => Err(self.unreadable(key, None, e)),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::NotFound),
            Err(e) => Err(self.unreadable(key, None, e)),
        }
    }

    /// Moves a failed shard aside (so it is neither served again nor lost to
    /// forensics) and returns the error to report. Only moves the file if it is
    /// still the one that failed (inode `inode`): a put may have replaced it
    /// with a good copy since it was read.
    fn quarantine(&self, key: &ShardKey, inode: u64, why: &str) -> StoreError {
        tracing::warn!(shard = %key, reason = why, "stored shard failed its check; quarantining");
        let _guard = self.lock_key(key);
        let dir = self.shard_dir(key);
        let name = shard_file_name(key);
        let from = dir.join(&name);
        let quarantine = self.root.join(QUARANTINE_DIR);
        let to = quarantine.join(format!("{name}.{}", uuid::Uuid::now_v7().simple()));
        let len = match fs::metadata(&from) {
            Ok(meta) if meta.ino() == inode => meta.len(),
            // Replaced, already moved by a concurrent reader, or deleted.
            Ok(_) => return StoreError::Corrupt(*key),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return StoreError::Corrupt(*key),
            Err(e) => {
                tracing::warn!(shard = %key, error = %e, "could not inspect corrupt shard");
                return StoreError::Corrupt(*key);
            }
        };
        let moved = fs::rename(&from, &to)
            .and_then(|()| sync_dir(&quarantine))
            .and_then(|()| sync_dir(&dir));
        match moved {
            Ok(()) => self.lock_usage().remove(len),
            Err(e) => {
                tracing::warn!(shard = %key, error = %e, "could not quarantine corrupt shard")
            }
        }
        StoreError::Corrupt(*key)
    }

    fn lock_key(&self, key: &ShardKey) -> std::sync::MutexGuard<'_, ()> {
        self.lock_slot(key_slot(key))
    }

    /// Locks the keys of a batch, each lock once and in slot order (so two
    /// batches never deadlock; single-key holders take only one lock).
    fn lock_keys<'a>(
        &self,
        keys: impl Iterator<Item = &'a ShardKey>,
    ) -> Vec<std::sync::MutexGuard<'_, ()>> {
        let mut slots: Vec<usize> = keys.map(key_slot).collect();
        slots.sort_unstable();
        slots.dedup();
        slots.into_iter().map(|s| self.lock_slot(s)).collect()
    }

    fn lock_slot(&self, slot: usize) -> std::sync::MutexGuard<'_, ()> {
        // A panic while holding a key lock leaves nothing half-done that the lock
        // protects (files are replaced atomically, records indexed once durable),
        // so a poisoned lock is usable.
        self.key_locks[slot]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn lock_usage(&self) -> std::sync::MutexGuard<'_, Usage> {
        self.usage.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn key_slot(key: &ShardKey) -> usize {
    let mut h = key.stripe ^ (key.index as u64).rotate_left(17);
    for b in key.evidence.0 {
        h = h.wrapping_mul(31).wrapping_add(b as u64);
    }
    (h % KEY_LOCKS as u64) as usize
}

fn shard_file_name(key: &ShardKey) -> String {
    format!(
        "{}-{}-{}",
        uuid::Uuid::from_bytes(key.evidence.0).simple(),
        key.stripe,
        key.index
    )
}

/// The names of the entries of `dir` that start with `prefix` (none when
/// `dir` does not exist).
fn names_starting(dir: &Path, prefix: &str) -> io::Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    for entry in entries {
        if let Some(name) = entry?.file_name().to_str() {
            if name.starts_with(prefix) {
                names.push(name.to_owned());
            }
        }
    }
    Ok(names)
}

/// Whether the file at `path` holds `needle` anywhere, read a window at a
/// time. A damaged segment kept aside may say it is of any size: one
/// longer than any segment can be is taken to hold it (searching it could
/// take hours, at every expunge).
fn file_holds(path: &Path, needle: &[u8]) -> io::Result<bool> {
    if fs::metadata(path)?.len() > crate::segments::MAX_SEGMENT_FILE {
        return Ok(true);
    }
    const WINDOW: usize = 1 << 20;
    if needle.is_empty() {
        return Ok(true);
    }
    let mut file = File::open(path)?;
    // The tail of the window before, so a needle across two windows is found.
    let keep = needle.len() - 1;
    let mut buf = vec![0u8; keep + WINDOW];
    let mut have = 0;
    loop {
        let n = file.read(&mut buf[have..])?;
        if n == 0 {
            return Ok(false);
        }
        have += n;
        if buf[..have].windows(needle.len()).any(|w| w == needle) {
            return Ok(true);
        }
        let tail = have.saturating_sub(keep);
        buf.copy_within(tail..have, 0);
        have -= tail;
    }
}

/// Removes the file at `path` if it is there.
fn remove_if_there(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The key a shard file name (`shard_file_name`) stands for.
fn parse_shard_file_name(name: &str) -> Option<ShardKey> {
    let mut parts = name.split('-');
    let evidence = uuid::Uuid::try_parse(parts.next()?).ok()?;
    let stripe = parts.next()?.parse().ok()?;
    let index = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some(ShardKey {
        evidence: protocol::EvidenceId(*evidence.as_bytes()),
        stripe,
        index,
    })
}

/// Writes `parts` durably as `dir/name`, with a temporary file in `dir` itself.
/// The same recipe the store uses for shards; `custodia bench` measures it.
pub fn write_durably(dir: &Path, name: &str, parts: &[&[u8]]) -> io::Result<()> {
    durable_write(dir, dir, name, parts, 0o644).map(|_| ())
}

/// The one durable-write recipe: writes `parts` to a fresh temporary file in
/// `tmp_dir` (created with `mode`), fsyncs it, renames it to `dir/name`
/// (atomically replacing any old file) and fsyncs `dir` so the rename survives a
/// crash. `tmp_dir` must be on the same file system as `dir`. Returns the bytes
/// written. On error the temporary file is removed.
pub(crate) fn durable_write(
    tmp_dir: &Path,
    dir: &Path,
    name: &str,
    parts: &[&[u8]],
    mode: u32,
) -> io::Result<u64> {
    durable_write_with(tmp_dir, dir, name, parts, mode, true).map(|(len, _)| len)
}

/// [`durable_write`], with `O_DIRECT` for large files only if `direct`;
/// also says whether the file system refused `O_DIRECT` (the file was then
/// written through the page cache).
pub(crate) fn durable_write_with(
    tmp_dir: &Path,
    dir: &Path,
    name: &str,
    parts: &[&[u8]],
    mode: u32,
    direct: bool,
) -> io::Result<(u64, bool)> {
    let tmp = tmp_dir.join(format!(".{name}.{}.tmp", uuid::Uuid::now_v7().simple()));
    let result = write_and_sync(&tmp, parts, mode, direct).and_then(|written| {
        fs::rename(&tmp, dir.join(name))?;
        sync_dir(dir)?;
        Ok(written)
    });
    if result.is_err() {
        // Best effort: the open after a crash removes what this misses.
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes of at least this many bytes bypass the page cache (see the module
/// doc): 1 GiB filings went 1.5x faster on the 2-core bench machine.
const DIRECT_MIN: usize = 64 << 10;
/// Memory address and length alignment for `O_DIRECT` (covers 512-byte and
/// 4 KiB logical blocks).
const DIRECT_ALIGN: usize = 4096;
/// Idle read buffers a store keeps (a few 1 MiB shards' worth).
const READ_BUFFER_IDLE_BYTES: usize = 16 << 20;
/// Bytes staged and written at a time: a thread's staging memory stays this
/// small whatever the shard size, and a default 1 MiB shard with its header
/// goes in one write.
const DIRECT_CHUNK: usize = 2 << 20;

thread_local! {
    /// Each writing thread's staging buffer for `O_DIRECT` writes
    /// (`DIRECT_CHUNK` plus room to align it).
    static DIRECT_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Whether `e` says the file system does not take `O_DIRECT` (or not with
/// this alignment).
fn direct_refused(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported
    )
}

/// Writes and fsyncs a new file; with `O_DIRECT` if `direct` and it is
/// large. Returns the bytes written and whether `O_DIRECT` was refused.
fn write_and_sync(
    path: &Path,
    parts: &[&[u8]],
    mode: u32,
    direct: bool,
) -> io::Result<(u64, bool)> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut refused = false;
    if direct && total >= DIRECT_MIN {
        match write_direct(path, parts, total, mode) {
            Ok(len) => return Ok((len, false)),
            // The file system does not take O_DIRECT (some FUSE and network
            // file systems, tmpfs before Linux 6.6): through the page cache.
            Err(e) if direct_refused(&e) => {
                let _ = fs::remove_file(path);
                refused = true;
            }
            Err(e) => return Err(e),
        }
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    let mut len = 0u64;
    for part in parts {
        file.write_all(part)?;
        len += part.len() as u64;
    }
    file.sync_all()?;
    Ok((len, refused))
}

/// [`write_and_sync`] without the page cache: `parts` staged through an
/// aligned buffer of [`DIRECT_CHUNK`] and written with `O_DIRECT` a chunk
/// at a time, the last padded to a whole block, then the file cut back to
/// `total` bytes and fsynced (the size is metadata). An error for which
/// [`direct_refused`] holds when the file system does not allow it.
#[cfg(target_os = "linux")]
fn write_direct(path: &Path, parts: &[&[u8]], total: usize, mode: u32) -> io::Result<u64> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(path)?;
    DIRECT_BUF.with(|cell| {
        let mut staged = cell.borrow_mut();
        if staged.len() < DIRECT_CHUNK + DIRECT_ALIGN {
            staged.resize(DIRECT_CHUNK + DIRECT_ALIGN, 0);
        }
        let start = staged.as_ptr().align_offset(DIRECT_ALIGN);
        let chunk = staged
            .get_mut(start..start + DIRECT_CHUNK)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let (mut filled, mut written) = (0usize, 0u64);
        for part in parts {
            let mut part: &[u8] = part;
            while !part.is_empty() {
                let n = part.len().min(DIRECT_CHUNK - filled);
                chunk[filled..filled + n].copy_from_slice(&part[..n]);
                (filled, part) = (filled + n, &part[n..]);
                if filled == DIRECT_CHUNK {
                    write_aligned(&file, chunk, written)?;
                    (filled, written) = (0, written + DIRECT_CHUNK as u64);
                }
            }
        }
        if filled > 0 {
            // Padding to a whole block, cut off below; zeros, so no stale
            // bytes of another shard reach the disk even for a moment.
            let padded = filled.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
            chunk[filled..padded].fill(0);
            write_aligned(&file, &chunk[..padded], written)?;
        }
        Ok::<_, io::Error>(())
    })?;
    file.set_len(total as u64)?;
    file.sync_all()?;
    Ok(total as u64)
}

/// One aligned `O_DIRECT` write, whole or an error: a short write (a full
/// disk) is not retried with the unaligned rest, whose `EINVAL` would read
/// as the file system refusing `O_DIRECT`.
#[cfg(target_os = "linux")]
fn write_aligned(file: &File, buf: &[u8], at: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    match file.write_at(buf, at)? {
        n if n == buf.len() => Ok(()),
        n => Err(io::Error::new(
            io::ErrorKind::StorageFull,
            format!("short O_DIRECT write: {n} of {} bytes", buf.len()),
        )),
    }
}

/// The whole file at `path` read with `O_DIRECT` (a shard read once gains
/// nothing from the page cache: the gateway checks it and passes it on):
/// the buffer, where the file starts in it (aligned), and the file's inode.
/// `None` when the file system does not take `O_DIRECT`.
#[cfg(target_os = "linux")]
///
/// An error comes with the inode of the file it met, once known: what
/// failed is that version of the shard, not whatever the path names by
/// the time the error is handled (a repair may have replaced it).
fn read_direct(
    path: &Path,
    pool: &BufferPool,
) -> Result<Option<DirectRead>, (io::Error, Option<u64>)> {
    use std::os::unix::fs::FileExt;
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if direct_refused(&e) => return Ok(None),
        Err(e) => return Err((e, None)),
    };
    let meta = file.metadata().map_err(|e| (e, None))?;
    let inode = Some(meta.ino());
    // Longer than any shard: read (its first bytes) the ordinary way, and
    // quarantined for its length.
    if meta.len() > MAX_SHARD_FILE {
        return Ok(None);
    }
    let len = usize::try_from(meta.len()).map_err(|e| (io::Error::other(e), inode))?;
    let padded = len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
    // Stale bytes of an earlier read at most, overwritten up to `start + len`,
    // and nothing before `start` is ever looked at.
    let mut buf = pool.take(padded + DIRECT_ALIGN);
    let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
    if start >= DIRECT_ALIGN {
        return Ok(None);
    }
    let mut read = 0;
    // Whole blocks until the end of the file; files are never changed in
    // place, only replaced. A read that comes back short of a block before
    // the end cannot go on aligned: the page cache reads the file instead
    // (a partial buffer must never reach the hash check, which would
    // quarantine a good shard).
    while read < len {
        let n = match file.read_at(&mut buf[start + read..start + padded], read as u64) {
            Ok(n) => n,
            Err(e) if direct_refused(&e) && read == 0 => return Ok(None),
            Err(e) => return Err((e, inode)),
        };
        read += n;
        if n == 0 || (read < len && read % DIRECT_ALIGN != 0) {
            break;
        }
    }
    if read < len {
        return Ok(None);
    }
    buf.truncate(start + len);
    Ok(Some((buf, start, meta.ino())))
}

/// What [`read_direct`] read: the buffer, where the file's bytes start in
/// it, and the file's inode.
type DirectRead = (Vec<u8>, usize, u64);

#[cfg(not(target_os = "linux"))]
fn read_direct(_: &Path, _: &BufferPool) -> Result<Option<DirectRead>, (io::Error, Option<u64>)> {
    Ok(None)
}

#[cfg(not(target_os = "linux"))]
fn write_direct(_: &Path, _: &[&[u8]], _: usize, _: u32) -> io::Result<u64> {
    Err(io::ErrorKind::InvalidInput.into())
}

/// Takes an exclusive lock on the file at `path` (created if missing, in a
/// directory created if missing), held for as long as the file is: one
/// process per data directory. `None`: another process holds it.
pub fn lock_file(path: &Path) -> io::Result<Option<File>> {
    // Durably: this is how a node's (or a cluster's) data directory is
    // first made, and shards acknowledged in a directory whose own entry a
    // power cut then lost would be a node come back empty.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_dir_all_durably(dir)?;
    }
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(fs::TryLockError::WouldBlock) => Ok(None),
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Writes a secret (private key, token) readable only by its owner, durably.
/// Replaces any existing file, so a key never exists with looser permissions.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let (dir, name) = split_path(path)?;
    durable_write(dir, dir, name, &[bytes], 0o600).map(|_| ())
}

/// Writes a file anyone may read (a certificate, a public key), durably.
pub fn write_public(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let (dir, name) = split_path(path)?;
    write_durably(dir, name, &[bytes])
}

fn split_path(path: &Path) -> io::Result<(&Path, &str)> {
    let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "path has no UTF-8 file name")
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Ok((dir, name))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// [`create_dir_durably`] for each missing ancestor of `dir`, outermost
/// first, and for `dir` itself (whose entry is made durable even when it
/// exists: an earlier process may have made it and crashed before its
/// parent's fsync).
pub(crate) fn create_dir_all_durably(dir: &Path) -> io::Result<()> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .skip(1)
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .collect();
    for d in missing.into_iter().rev() {
        create_dir_durably(d)?;
    }
    create_dir_durably(dir)
}

/// Creates `dir` if needed and makes its entry in its parent durable. The
/// parent is fsynced even when `dir` already exists: another thread's
/// `mkdir` may still be waiting on that fsync, or an earlier process may
/// have crashed before it (the directory visible, its entry not on disk).
pub(crate) fn create_dir_durably(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    // A relative path's parent may be "": the current directory.
    let parent = match dir.parent() {
        Some(parent) if parent.as_os_str().is_empty() => Path::new("."),
        Some(parent) => parent,
        None => return Ok(()),
    };
    match sync_dir(parent) {
        // A parent this user may not read (a mount point's, mode 711) cannot
        // be fsynced by it: said, and the directory used as it is.
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            tracing::warn!(dir = %parent.display(), error = %e, "could not make a directory's entry durable (no read access to its parent)");
            Ok(())
        }
        done => done,
    }
}

fn file_len(path: &Path) -> io::Result<Option<u64>> {
    match fs::metadata(path) {
        Ok(m) => Ok(Some(m.len())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The device a directory is on. Inode numbers are not compared: some file
/// systems do not keep them stable (FUSE without `use_ino`, CIFS with
/// `noserverino`, overlayfs without `xino`), and a healthy node must not be
/// stopped for that.
fn dir_identity(dir: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(fs::metadata(dir)?.dev())
}

/// A segment could not be read at open: it held small shards no one can
/// name now, and tombstones no one can honour. The disk takes a new
/// identity, which the gateway takes as a disk that lost what it held: it
/// re-checks every stripe with a shard placed here and rebuilds what is
/// missing (as for a wiped disk, which must never go unnoticed). The
/// segment is then moved aside for forensics, so the next start neither
/// finds it again nor renews the identity once more. The new identity is
/// durable before the segment moves: a crash between the two renews it
/// again at the next start, which costs a second check, not a missed one.
fn renew_identity(root: &Path, log: &SegmentLog) -> Result<[u8; 16], StoreError> {
    #[cfg(test)]
    if tests::RENEW_IDENTITY_FINDS_NO_ROOM.with(std::cell::Cell::get) {
        return Err(StoreError::DiskFull);
    }
    let id = uuid::Uuid::from_bytes(mint_disk_uuid(root)?);
    tracing::error!(
        segments = ?log.damaged_segments(),
        damaged_stretches = log.damage_to_mend(),
        disk = %id,
        "segments of small shards could not be read (whole, kept in {DAMAGED_SEGMENTS_DIR}/, \
         or stretches of them): the disk takes a new identity, so the gateway re-checks every \
         shard it placed here"
    );
    let segments: Vec<(u64, PathBuf)> = log
        .damaged_segments()
        .iter()
        .map(|&seg| (seg, log.segment_path(seg)))
        .collect();
    #[cfg(test)]
    let segments = if tests::RENAME_ASIDE_FAILS.with(std::cell::Cell::get) {
        tracing::warn!("could not move the damaged segments aside (test)");
        Vec::new()
    } else {
        segments
    };
    for (seg, e) in move_segments_aside(root, &segments)? {
        tracing::warn!(segment = seg, error = %e, "could not move a damaged segment aside");
    }
    Ok(*id.as_bytes())
}

/// Moves damaged segment files (id, path) into `damaged-segments/`, each
/// under a name of its own, and makes the moves durable. Returns those that
/// could not be moved, with why.
fn move_segments_aside(
    root: &Path,
    segments: &[(u64, PathBuf)],
) -> Result<Vec<(u64, io::Error)>, StoreError> {
    let aside = root.join(DAMAGED_SEGMENTS_DIR);
    create_dir_durably(&aside)?;
    let mut failed = Vec::new();
    for (seg, from) in segments {
        let name = from
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let to = aside.join(format!("{name}.{}", uuid::Uuid::now_v7().simple()));
        if let Err(e) = fs::rename(from, &to) {
            failed.push((*seg, e));
        }
    }
    sync_dir(&aside)?;
    sync_dir(&root.join(crate::segments::SEGMENTS_DIR))?;
    Ok(failed)
}

fn read_or_mint_disk_uuid(root: &Path) -> Result<[u8; 16], StoreError> {
    let path = root.join(DISK_UUID_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => uuid::Uuid::parse_str(text.trim())
            .map(|u| *u.as_bytes())
            .map_err(|_| StoreError::BadDiskUuid(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let id = mint_disk_uuid(root)?;
            tracing::info!(disk = %uuid::Uuid::from_bytes(id), "minted a disk UUID for a new data dir");
            Ok(id)
        }
        Err(e) => Err(e.into()),
    }
}

/// Writes a new disk UUID (durably), replacing any earlier one.
fn mint_disk_uuid(root: &Path) -> Result<[u8; 16], StoreError> {
    let id = uuid::Uuid::now_v7();
    let text = format!("{}\n", id.hyphenated());
    durable_write(
        &root.join(TMP_DIR),
        root,
        DISK_UUID_FILE,
        &[text.as_bytes()],
        0o644,
    )?;
    Ok(*id.as_bytes())
}

/// Removes what an earlier run left in `tmp/` (every entry), and the
/// temporary files (`.NAME.UUID.tmp`) that files written durably in the
/// data directory's root itself (the scrubber's place) left there in a
/// crash. An entry that cannot be removed (a directory put in `tmp/`, an
/// unreadable inode) is said and left: it holds no shard, and must not
/// stop the node.
fn remove_temporary_files(root: &Path) -> io::Result<()> {
    let leftover_in_root = |entry: &fs::DirEntry| -> io::Result<bool> {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        Ok(name.starts_with('.') && name.ends_with(".tmp") && entry.file_type()?.is_file())
    };
    let tmp = root.join(TMP_DIR);
    for (dir, everything) in [(tmp.as_path(), true), (root, false)] {
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if !everything && !leftover_in_root(&entry)? {
                continue;
            }
            tracing::debug!(file = %entry.path().display(), "removing a leftover temporary file");
            if let Err(e) = fs::remove_file(entry.path()) {
                tracing::warn!(file = %entry.path().display(), error = %e, "could not remove a leftover temporary file; left as it is");
            }
        }
    }
    Ok(())
}

/// The shard files' usage. One whose inode cannot be read is said and not
/// counted (reading it fails as damage, and repair rebuilds it): a bad
/// sector under one file must not keep the node from serving the rest.
fn count_shards(shards: &Path) -> io::Result<Usage> {
    let mut usage = Usage::default();
    for fanout in fs::read_dir(shards)? {
        let fanout = fanout?;
        if !fanout.file_type()?.is_dir() {
            continue;
        }
        for file in fs::read_dir(fanout.path())? {
            let file = file?;
            match file.metadata() {
                Ok(meta) if meta.is_file() => usage.add(meta.len()),
                Ok(_) => {}
                Err(e) if is_broken_file(&e) => {
                    tracing::warn!(file = %file.path().display(), error = %e, "a shard file's inode cannot be read; not counted")
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A needle is found wherever it lies, across two windows too, and not
    /// found where it does not.
    #[test]
    fn a_file_is_searched_a_window_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("aside");
        let needle = [0xabu8; 16];
        let window = 1usize << 20;
        for at in [0, window - 8, window - 1, window, 3 * window + 5] {
            let mut bytes = vec![0u8; 3 * window + 64];
            bytes[at..at + needle.len()].copy_from_slice(&needle);
            fs::write(&path, &bytes).unwrap();
            assert!(file_holds(&path, &needle).unwrap(), "at {at}");
            bytes[at + 15] = 0;
            fs::write(&path, &bytes).unwrap();
            assert!(!file_holds(&path, &needle).unwrap(), "cut at {at}");
        }
    }
    use protocol::{Blake3Hash, ErasureCode, EvidenceId};

    const SHARD_SIZE: u32 = 4096;

    fn key(n: u8) -> ShardKey {
        ShardKey {
            evidence: EvidenceId::new(1_700_000_000_000, [n; 10]),
            stripe: n as u64 * 7,
            index: n % 6,
        }
    }

    fn header(key: ShardKey, body: &[u8]) -> ShardHeader {
        ShardHeader {
            key,
            code: ErasureCode::new(4, 2, SHARD_SIZE).unwrap(),
            stripe_len: body.len() as u64 * 4,
            len: body.len() as u32,
            blake3: Blake3Hash::of(body),
        }
    }

    /// A quota running out is a full disk too: the node says `DiskFull`
    /// (and the gateway marks it full) rather than failing as if broken.
    #[test]
    fn out_of_quota_is_a_full_disk() {
        use rustix::io::Errno;
        for errno in [Errno::NOSPC, Errno::DQUOT] {
            let e = io::Error::from_raw_os_error(errno.raw_os_error());
            assert!(
                matches!(StoreError::from(e), StoreError::DiskFull),
                "{errno:?}"
            );
        }
        let e = io::Error::from_raw_os_error(Errno::IO.raw_os_error());
        assert!(matches!(StoreError::from(e), StoreError::Io(_)));
    }

    fn body(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 13 % 251) as u8).collect()
    }

    /// A read the disk failed quarantines the version of the shard it
    /// read, never the copy a repair has put in its place since (nor,
    /// when it cannot tell which version it read, whatever is there now).
    #[test]
    fn a_failed_read_never_quarantines_the_copy_put_since() {
        let eio = || io::Error::from_raw_os_error(rustix::io::Errno::IO.raw_os_error());
        let dir = tempfile::tempdir().unwrap();
        let store = open_unpacked(dir.path());
        let k = key(1);
        let b = body(1000);
        store.put(&header(k, &b), &b).unwrap();
        let failed = fs::metadata(store.shard_path(&k)).unwrap().ino();
        // The repair's copy: the same bytes, another file (the old one
        // held open elsewhere, as a reader holds it, so its inode number
        // is not handed out again).
        fs::hard_link(store.shard_path(&k), dir.path().join("held")).unwrap();
        store.delete(&k).unwrap();
        store.put(&header(k, &b), &b).unwrap();
        assert_ne!(fs::metadata(store.shard_path(&k)).unwrap().ino(), failed);
        for inode in [Some(failed), None] {
            store.unreadable(&k, inode, eio());
            assert!(
                store.get(&k).unwrap().1 == b,
                "{inode:?}: the good copy went"
            );
        }
        // The version that failed is quarantined when it is still there.
        let now = fs::metadata(store.shard_path(&k)).unwrap().ino();
        assert!(matches!(
            store.unreadable(&k, Some(now), eio()),
            StoreError::Corrupt(_)
        ));
        assert!(matches!(store.get(&k), Err(StoreError::NotFound)));
    }

    /// A shard of evidence erased here (expunged) is refused afterwards: a
    /// put that was under way (a rebuild its gateway gave up on) cannot
    /// land after the erase said nothing is left. Other evidence is stored.
    #[test]
    fn a_put_of_erased_evidence_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for small in [0, 64 * 1024] {
            let store = ShardStore::open_with(
                &dir.path().join(small.to_string()),
                StoreConfig {
                    small_shard_max: small,
                    ..StoreConfig::default()
                },
            )
            .unwrap();
            let b = body(3000);
            store.put(&header(key(1), &b), &b).unwrap();
            let erased = store.erase_evidence(key(1).evidence).unwrap();
            assert_eq!(erased.shards, 1);
            let again = ShardKey {
                stripe: 99,
                ..key(1)
            };
            assert!(matches!(
                store.put(&header(again, &b), &b),
                Err(StoreError::Expunged(k)) if k == again
            ));
            assert!(matches!(store.get(&again), Err(StoreError::NotFound)));
            store.put(&header(key(2), &b), &b).unwrap();
        }
    }

    /// A packed shard just written is served by the fast path (from the
    /// page cache, no wait for the disk); one whose pages the kernel
    /// dropped is left to the blocking path, which reads it the same.
    #[test]
    fn the_fast_path_reads_only_from_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        // A file system without RWF_NOWAIT reads (EOPNOTSUPP) has no fast
        // path: every read goes to the blocking pool.
        let probe = dir.path().join("probe");
        fs::write(&probe, b"x").unwrap();
        let nowait = rustix::io::preadv2(
            fs::File::open(&probe).unwrap(),
            &mut [io::IoSliceMut::new(&mut [0u8; 1])],
            0,
            rustix::io::ReadWriteFlags::NOWAIT,
        );
        if nowait == Err(rustix::io::Errno::OPNOTSUPP) {
            println!("SKIPPED: this file system does not read with RWF_NOWAIT");
            return;
        }
        fs::remove_file(&probe).unwrap();
        let store = ShardStore::open(dir.path()).unwrap();
        let b = body(3000);
        store.put(&header(key(1), &b), &b).unwrap();
        let (h, got) = store
            .get_small_fast(&key(1))
            .expect("served from the cache");
        assert_eq!((h.key, &got[..]), (key(1), &b[..]));
        // Every file dropped from the cache (written back first, so the
        // kernel can).
        let mut dirs = vec![dir.path().to_path_buf()];
        while let Some(d) = dirs.pop() {
            for e in fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else if let Ok(f) = fs::File::open(&p) {
                    f.sync_all().unwrap();
                    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
                }
            }
        }
        if let Some((_, got)) = store.get_small_fast(&key(1)) {
            // Some file systems keep their pages whatever is advised.
            assert_eq!(&got[..], &b[..]);
        }
        let (_, got) = store.get_small_shared(&key(1)).unwrap().unwrap();
        assert_eq!(&got[..], &b[..]);
    }

    /// A write a quota refused (room showing, as `statvfs` does not see
    /// quotas) leaves the node saying it is full, refusing puts without
    /// trying them, until a delete frees room (or a while passes): not
    /// showing room at each probe and failing the next put.
    #[test]
    fn a_quota_refusal_is_reported_as_full_until_room_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        // Shards in files of their own: deleting one frees its bytes at
        // once (a packed one's come back only at compaction).
        let store = open_unpacked(dir.path());
        let b = body(3000);
        store.put(&header(key(1), &b), &b).unwrap();
        assert!(store.info().unwrap().free_bytes > 0);
        // As `put` records a write refused as full past its space check.
        *store.lock_quota() = Some(std::time::Instant::now());
        assert_eq!(store.info().unwrap().free_bytes, 0);
        assert!(matches!(
            store.put(&header(key(2), &b), &b),
            Err(StoreError::DiskFull)
        ));
        // A delete of nothing frees nothing.
        assert!(!store.delete(&key(9)).unwrap());
        assert_eq!(store.info().unwrap().free_bytes, 0);
        assert!(store.delete(&key(1)).unwrap());
        assert!(store.info().unwrap().free_bytes > 0);
        store.put(&header(key(2), &b), &b).unwrap();
        // And it is forgotten after a while, to try a write again.
        *store.lock_quota() = Some(std::time::Instant::now() - QUOTA_FULL_FOR);
        assert!(store.info().unwrap().free_bytes > 0);
    }

    /// A store that keeps every shard in its own file.
    fn files_only(dir: &Path) -> ShardStore {
        ShardStore::open_with(
            dir,
            StoreConfig {
                small_shard_max: 0,
                ..StoreConfig::default()
            },
        )
        .unwrap()
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<_> = fs::read_dir(dir.join(crate::segments::SEGMENTS_DIR))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
    }

    /// A fan-out directory that cannot be listed fails the listing that
    /// recovery and orphan collection take for whole; the scrubber's
    /// passes over it, names it, and lists the rest.
    #[test]
    fn an_unlistable_directory_fails_listings_but_not_scrub_passes() {
        let dir = tempfile::tempdir().unwrap();
        let store = files_only(dir.path());
        let (a, b) = (key(1), key(2));
        for k in [a, b] {
            store.put(&header(k, &body(100)), &body(100)).unwrap();
        }
        // Its inode gone bad: here, a file where the directory was.
        let bad = store.shard_dir(&a);
        fs::remove_dir_all(&bad).unwrap();
        fs::write(&bad, b"not a directory").unwrap();
        assert!(
            store.list(None, 100).is_err(),
            "a short listing taken for whole"
        );
        let page = store.list_finding_damage(None, 100).unwrap();
        assert_eq!(page.unlistable, vec![bad]);
        let listed: Vec<ShardKey> = page.shards.iter().map(|h| h.key).collect();
        assert_eq!(listed, vec![b]);
    }

    #[test]
    fn sizes_round_trip_and_oversized_bodies_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = ShardStore::open(dir.path()).unwrap();
        let sizes = [0usize, 1, 4096 - 1, 4096];
        for (n, &len) in sizes.iter().enumerate() {
            let k = key(n as u8);
            let b = body(len);
            store.put(&header(k, &b), &b).unwrap();
            let (h, got) = store.get(&k).unwrap();
            assert_eq!(h, header(k, &b));
            assert_eq!(got, b, "size {len}");
            assert_eq!(store.stat(&k).unwrap(), h);
        }
        let k = key(40);
        let big = body(SHARD_SIZE as usize + 1);
        let err = store.put(&header(k, &big), &big).unwrap_err();
        assert_eq!(err.code(), ErrorCode::BadRequest);
        assert!(matches!(store.get(&k), Err(StoreError::NotFound)));
        assert_eq!(store.info().unwrap().shards, sizes.len() as u64);
    }

    /// A truncated shard file is quarantined by the listing that meets it
    /// (the scrubber's walk), and counted: listing alone would otherwise
    /// make the damage vanish from every figure an operator watches.
    #[test]
    fn damage_met_while_listing_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = files_only(dir.path());
        for n in 0..3u8 {
            let b = body(1000);
            store.put(&header(key(n), &b), &b).unwrap();
        }
        let torn = store.shard_path(&key(1));
        let len = fs::metadata(&torn).unwrap().len();
        fs::OpenOptions::new()
            .write(true)
            .open(&torn)
            .unwrap()
            .set_len(len - 10)
            .unwrap();
        let listed: Vec<ShardKey> = store
            .list(None, 100)
            .unwrap()
            .iter()
            .map(|h| h.key)
            .collect();
        assert_eq!(listed, vec![key(0), key(2)]);
        assert_eq!(store.take_listed_corrupt(), 1);
        assert_eq!(store.take_listed_corrupt(), 0, "counted once");
        assert_eq!(store.quarantined(None, 10).unwrap(), vec![key(1)]);
    }

    /// What cannot be read or removed at start (a directory where a
    /// segment or a temporary file should be) is said and passed over: the
    /// node starts and serves the rest.
    #[test]
    fn entries_that_cannot_be_read_or_removed_at_start_do_not_stop_the_node() {
        let dir = tempfile::tempdir().unwrap();
        let (small, large) = (body(1000), body(SHARD_SIZE as usize));
        {
            let store = ShardStore::open(dir.path()).unwrap();
            store.put(&header(key(1), &small), &small).unwrap();
            store.put(&header(key(2), &large), &large).unwrap();
        }
        fs::create_dir_all(dir.path().join(TMP_DIR).join("left/behind")).unwrap();
        fs::create_dir(
            dir.path()
                .join(crate::segments::SEGMENTS_DIR)
                .join(format!("seg-{:016x}", 999)),
        )
        .unwrap();
        let store = ShardStore::open(dir.path()).unwrap();
        assert_eq!(store.get(&key(1)).unwrap().1, small);
        assert_eq!(store.get(&key(2)).unwrap().1, large);
    }

    /// A crash's temporary files in the data directory's root (a durable
    /// write of the scrubber's place cut short) are removed at start, and
    /// nothing else there is.
    #[test]
    fn temporary_files_left_in_the_root_are_removed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        drop(ShardStore::open(dir.path()).unwrap());
        let root = dir.path();
        fs::write(root.join(".scrub.state.0190aa.tmp"), b"cut short").unwrap();
        fs::write(root.join(".kept"), b"not a temporary file").unwrap();
        fs::write(root.join("kept.tmp"), b"not one of ours").unwrap();
        let uuid = fs::read(root.join(DISK_UUID_FILE)).unwrap();
        drop(ShardStore::open(root).unwrap());
        assert!(!root.join(".scrub.state.0190aa.tmp").exists());
        assert!(root.join(".kept").exists() && root.join("kept.tmp").exists());
        assert_eq!(fs::read(root.join(DISK_UUID_FILE)).unwrap(), uuid);
    }

    /// A shard file that cannot be opened at all (here a link that loops;
    /// on a failing disk, an inode the file system cannot read) is passed
    /// over: every listing (scrub, recovery, orphan collection) would
    /// otherwise stop at it for good. It is named in quarantine.
    #[test]
    fn a_shard_file_that_cannot_be_opened_does_not_stop_listings() {
        let dir = tempfile::tempdir().unwrap();
        let store = files_only(dir.path());
        for n in 0..3u8 {
            let b = body(1000);
            store.put(&header(key(n), &b), &b).unwrap();
        }
        let broken = store.shard_path(&key(1));
        fs::remove_file(&broken).unwrap();
        std::os::unix::fs::symlink(&broken, &broken).unwrap();
        let listed: Vec<ShardKey> = store
            .list(None, 100)
            .unwrap()
            .iter()
            .map(|h| h.key)
            .collect();
        assert_eq!(listed, vec![key(0), key(2)]);
        assert_eq!(store.take_listed_corrupt(), 1);
        // Paged from just before it, too.
        let listed: Vec<ShardKey> = store
            .list(Some(&key(0)), 100)
            .unwrap()
            .iter()
            .map(|h| h.key)
            .collect();
        assert_eq!(listed, vec![key(2)]);
        // Counted as damage once, not at every listing (each scrub pass
        // counting it again kept the corrupt-shard alert up for good).
        assert_eq!(store.take_listed_corrupt(), 0);
        let page = store.list_finding_damage(None, 100).unwrap();
        assert_eq!(page.damaged, 0);
        assert!(store.get(&key(1)).is_err(), "its read fails");
        // Named in quarantine (once, however often listed), for the
        // gateway to rebuild it without waiting for a read.
        assert_eq!(store.quarantined(None, 10).unwrap(), vec![key(1)]);
        let named = fs::read_dir(dir.path().join(QUARANTINE_DIR))
            .unwrap()
            .count();
        assert_eq!(named, 1);
    }

    /// A shard file whose size is damaged (here grown sparse to 8 GiB) is
    /// quarantined for its length, reading at most one byte past the
    /// longest shard file, not its whole claimed size.
    #[test]
    fn a_shard_file_grown_past_any_shard_is_quarantined_without_reading_it_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = files_only(dir.path());
        let b = body(1000);
        store.put(&header(key(0), &b), &b).unwrap();
        let path = store.shard_path(&key(0));
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(8 << 30)
            .unwrap();
        assert!(matches!(store.get(&key(0)), Err(StoreError::Corrupt(_))));
        assert_eq!(store.quarantined(None, 10).unwrap(), vec![key(0)]);
    }

    /// Whether the file system of `dir` opens a file with `O_DIRECT`.
    fn takes_o_direct(dir: &Path) -> bool {
        let probe = dir.join("o-direct-probe");
        let opened = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(&probe);
        let _ = fs::remove_file(&probe);
        match opened {
            Ok(_) => true,
            Err(e) if direct_refused(&e) => false,
            Err(e) => panic!("probing O_DIRECT in {}: {e}", dir.display()),
        }
    }

    /// Shard files around the `O_DIRECT` sizes (the 64 KiB threshold, the
    /// 4 KiB block, the 2 MiB staging chunk) round-trip through `store`,
    /// also after reopening, and a flipped last byte is found.
    fn large_shards_round_trip(dir: &Path, config: StoreConfig) {
        let sizes = [
            DIRECT_MIN - 1,
            DIRECT_MIN,
            DIRECT_MIN + 1,
            DIRECT_ALIGN * 17 + 5,
            DIRECT_CHUNK - 100,
            DIRECT_CHUNK,
            DIRECT_CHUNK + DIRECT_ALIGN + 1,
            3 * DIRECT_CHUNK + 7,
        ];
        let code = ErasureCode::new(4, 2, 8 << 20).unwrap();
        let sized = |key: ShardKey, body: &[u8]| ShardHeader {
            code,
            stripe_len: body.len() as u64 * 4,
            ..header(key, body)
        };
        let direct = config.direct_io;
        {
            let store = ShardStore::open_with(dir, config).unwrap();
            for (n, &len) in sizes.iter().enumerate() {
                let k = key(n as u8);
                let b = body(len);
                store.put(&sized(k, &b), &b).unwrap();
                let (h, got) = store.get(&k).unwrap();
                assert_eq!((h, got.len()), (sized(k, &b), len));
                assert!(got == b, "size {len}");
                assert!(store.get_shared(&k).unwrap().1 == b, "size {len}, shared");
            }
            // Off stays off; on holds exactly where the file system takes
            // O_DIRECT (asked here apart from the store).
            assert_eq!(store.direct_io(), direct && takes_o_direct(dir));
        }
        let store = ShardStore::open_with(dir, config).unwrap();
        assert_eq!(store.info().unwrap().shards, sizes.len() as u64);
        for (n, &len) in sizes.iter().enumerate() {
            assert!(
                store.get(&key(n as u8)).unwrap().1 == body(len),
                "size {len} reopened"
            );
        }
        let k = key(6);
        let path = store.shard_path(&k);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, bytes).unwrap();
        assert!(matches!(store.get(&k), Err(StoreError::Corrupt(_))));
        assert_eq!(fs::read_dir(dir.join(TMP_DIR)).unwrap().count(), 0);
    }

    #[test]
    fn large_shards_round_trip_with_o_direct() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            small_shard_max: 0,
            ..StoreConfig::default()
        };
        large_shards_round_trip(dir.path(), config);
    }

    #[test]
    fn large_shards_round_trip_through_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            small_shard_max: 0,
            direct_io: false,
            ..StoreConfig::default()
        };
        large_shards_round_trip(dir.path(), config);
    }

    #[test]
    fn mismatched_bodies_are_refused_and_nothing_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = ShardStore::open(dir.path()).unwrap();
        let k = key(1);
        let b = body(100);
        let h = header(k, &b);
        let mut wrong = b.clone();
        wrong[3] ^= 1;
        assert!(matches!(
            store.put(&h, &wrong),
            Err(StoreError::HashMismatch)
        ));
        assert!(matches!(
            store.put(&h, &b[..99]),
            Err(StoreError::HashMismatch)
        ));
        assert!(matches!(store.stat(&k), Err(StoreError::NotFound)));
        assert_eq!(store.info().unwrap().shards, 0);
        assert_eq!(fs::read_dir(dir.path().join(TMP_DIR)).unwrap().count(), 0);
    }

    #[test]
    fn put_is_idempotent_and_delete_says_whether_it_existed() {
        let dir = tempfile::tempdir().unwrap();
        let store = ShardStore::open(dir.path()).unwrap();
        let k = key(2);
        let b = body(1000);
        store.put(&header(k, &b), &b).unwrap();
        let used = store.info().unwrap().used_bytes;
        store.put(&header(k, &b), &b).unwrap();
        let info = store.info().unwrap();
        assert_eq!((info.shards, info.used_bytes), (1, used));
        let b2 = body(10);
        store.put(&header(k, &b2), &b2).unwrap();
        assert_eq!(store.get(&k).unwrap().1, b2);
        assert_eq!(store.info().unwrap().shards, 1);
        assert!(store.delete(&k).unwrap());
        assert!(!store.delete(&k).unwrap());
        assert!(matches!(store.get(&k), Err(StoreError::NotFound)));
        let info = store.info().unwrap();
        assert_eq!((info.shards, info.used_bytes), (0, 0));
    }

    /// Stores a 4 KiB shard `k` as a file and flips its last byte on disk;
    /// returns the file's path and the body as stored.
    fn stored_then_flipped(store: &ShardStore, k: ShardKey) -> (PathBuf, Vec<u8>) {
        let b = body(4096);
        store.put(&header(k, &b), &b).unwrap();
        let path = store.shard_path(&k);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        fs::write(&path, bytes).unwrap();
        (path, b)
    }

    #[test]
    fn a_flipped_byte_is_reported_corrupt_and_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let store = files_only(dir.path());
        let k = key(3);
        let (path, _) = stored_then_flipped(&store, k);
        // A cheap stat does not read the body; a get does.
        assert!(store.stat(&k).is_ok());
        let err = store.get(&k).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)));
        assert_eq!(err.code(), ErrorCode::Corrupt);
        assert!(!path.exists(), "corrupt shard must leave the shard tree");
        assert_eq!(
            fs::read_dir(dir.path().join(QUARANTINE_DIR))
                .unwrap()
                .count(),
            1
        );
        assert!(matches!(store.get(&k), Err(StoreError::NotFound)));
        assert_eq!(store.info().unwrap().shards, 0);
    }

    /// A read that hashes the bytes itself gets them unhashed (a flipped
    /// byte passes), but a truncated body is still refused; the hashed read
    /// after it quarantines the shard.
    #[test]
    fn a_length_only_read_leaves_the_hash_to_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let store = files_only(dir.path());
        let k = key(3);
        let (path, b) = stored_then_flipped(&store, k);
        let (h, got) = store.get_shared_checked(&k, BodyCheck::Length).unwrap();
        assert_eq!(h.key, k);
        assert_eq!(got.len(), b.len());
        assert_ne!(&got[..], &b[..], "the flipped byte is served as stored");
        assert!(path.exists(), "a length-only read quarantines nothing");
        let err = store.get_shared_checked(&k, BodyCheck::Hash).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)));
        assert!(!path.exists(), "the hashed read quarantines it");

        // A short body fails even the length check.
        let k2 = key(4);
        store.put(&header(k2, &b), &b).unwrap();
        let path2 = store.shard_path(&k2);
        let whole = fs::read(&path2).unwrap();
        fs::write(&path2, &whole[..whole.len() - 1]).unwrap();
        let err = store
            .get_shared_checked(&k2, BodyCheck::Length)
            .unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)));
        assert!(!path2.exists());
    }

    #[test]
    fn a_damaged_header_is_quarantined_too() {
        let dir = tempfile::tempdir().unwrap();
        let store = files_only(dir.path());
        let k = key(4);
        let b = body(64);
        store.put(&header(k, &b), &b).unwrap();
        let path = store.shard_path(&k);
        let mut bytes = fs::read(&path).unwrap();
        bytes[0] = b'X';
        fs::write(&path, bytes).unwrap();
        assert!(matches!(store.stat(&k), Err(StoreError::Corrupt(_))));
        assert!(!path.exists());
    }

    #[test]
    fn listing_pages_through_every_good_shard_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        // Bodies of 16-18 bytes go to segments, longer ones to files: one
        // listing merges both.
        let store = ShardStore::open_with(
            dir.path(),
            StoreConfig {
                small_shard_max: 18,
                ..StoreConfig::default()
            },
        )
        .unwrap();
        let mut want = Vec::new();
        for e in 0..40u8 {
            for stripe in 0..3u64 {
                for index in 0..6u8 {
                    let k = ShardKey {
                        // Spread over fan-out directories (the last byte).
                        evidence: EvidenceId([
                            e,
                            1,
                            2,
                            3,
                            4,
                            5,
                            6,
                            7,
                            8,
                            9,
                            10,
                            11,
                            12,
                            13,
                            14,
                            e % 7,
                        ]),
                        stripe,
                        index,
                    };
                    let b = body(16 + index as usize);
                    store.put(&header(k, &b), &b).unwrap();
                    want.push(header(k, &b));
                }
            }
        }
        // A stray file is skipped; a shard with a broken header is quarantined
        // and never listed.
        let broken = want.remove(105).key;
        assert!(broken.index > 2, "a shard in its own file");
        let path = store.shard_path(&broken);
        let mut bytes = fs::read(&path).unwrap();
        bytes[0] = b'X';
        fs::write(&path, bytes).unwrap();
        fs::write(path.with_file_name("notes.txt"), b"x").unwrap();

        let mut got = Vec::new();
        let mut after = None;
        loop {
            let page = store.list(after.as_ref(), 97).unwrap();
            if page.is_empty() {
                break;
            }
            assert!(page.len() <= 97);
            after = page.last().map(|h| h.key);
            got.extend(page);
        }
        want.sort_by_key(|h| (h.key.evidence.0[15], h.key));
        assert_eq!(got.len(), want.len());
        assert_eq!(got, want);
        assert!(!path.exists(), "the broken shard was quarantined");
        assert!(store.info().unwrap().segment_bytes > 0);
    }

    #[test]
    fn small_shards_survive_reopening_replacement_and_deletion() {
        let dir = tempfile::tempdir().unwrap();
        let info = {
            let store = ShardStore::open(dir.path()).unwrap();
            for n in 0..20u8 {
                let b = body(n as usize * 50);
                store.put(&header(key(n), &b), &b).unwrap();
            }
            // Replaced, deleted, deleted and put back.
            let b = body(7);
            store.put(&header(key(3), &b), &b).unwrap();
            assert!(store.delete(&key(4)).unwrap());
            assert!(!store.delete(&key(4)).unwrap());
            assert!(store.delete(&key(5)).unwrap());
            let b = body(9);
            store.put(&header(key(5), &b), &b).unwrap();
            assert!(
                segment_files(dir.path()).len() == 1,
                "one segment, no shard files"
            );
            assert_eq!(
                fs::read_dir(dir.path().join(SHARDS_DIR)).unwrap().count(),
                0
            );
            store.info().unwrap()
        };
        let store = ShardStore::open(dir.path()).unwrap();
        let again = store.info().unwrap();
        assert_eq!(
            (again.shards, again.used_bytes),
            (info.shards, info.used_bytes)
        );
        assert_eq!(again.shards, 19);
        assert_eq!(store.get(&key(3)).unwrap().1, body(7));
        assert!(matches!(store.get(&key(4)), Err(StoreError::NotFound)));
        assert_eq!(store.get(&key(5)).unwrap().1, body(9));
        assert_eq!(store.get(&key(19)).unwrap().1, body(950));
        assert_eq!(store.stat(&key(19)).unwrap(), header(key(19), &body(950)));
        // A small shard replaced by a large one (and back) is served from
        // wherever the last put went.
        let small = ShardStore::open_with(
            dir.path(),
            StoreConfig {
                small_shard_max: 100,
                ..StoreConfig::default()
            },
        )
        .unwrap();
        drop(store);
        let b = body(500);
        small.put(&header(key(1), &b), &b).unwrap();
        assert!(small.shard_path(&key(1)).exists());
        assert_eq!(small.get(&key(1)).unwrap().1, b);
        let b = body(60);
        small.put(&header(key(1), &b), &b).unwrap();
        assert!(!small.shard_path(&key(1)).exists());
        assert_eq!(small.get(&key(1)).unwrap().1, b);
        assert_eq!(small.info().unwrap().shards, 19);
    }

    /// A packed shard the disk fails to read once is read again, and
    /// served; one it keeps failing is named in quarantine (so the gateway
    /// rebuilds it) and answered corrupt, but its bytes stay, in the index
    /// and on the disk: the error may pass, and they may be the stripe's
    /// last copy of that shard until the rebuild. An expunge, or the
    /// gateway's delete of the old copy once rebuilt, erases them.
    #[test]
    fn a_packed_shard_the_disk_cannot_read_is_kept_not_erased() {
        use crate::segments::tests::READS_FAIL;
        let dir = tempfile::tempdir().unwrap();
        let store = ShardStore::open(dir.path()).unwrap();
        let k = key(3);
        let b = body(4000);
        store.put(&header(k, &b), &b).unwrap();
        let loc = store.log.locate(&k).expect("packed");
        READS_FAIL.with(|f| f.set(1));
        assert_eq!(store.get(&k).unwrap().1, b, "one failed read is read again");
        READS_FAIL.with(|f| f.set(100));
        assert!(matches!(store.get(&k), Err(StoreError::Corrupt(_))));
        READS_FAIL.with(|f| f.set(0));
        assert_eq!(
            store.quarantined(None, 10).unwrap(),
            vec![k],
            "named for repair"
        );
        // Answered corrupt, without reading the disk again, and named once.
        READS_FAIL.with(|f| f.set(1));
        assert!(matches!(store.get(&k), Err(StoreError::Corrupt(_))));
        assert_eq!(READS_FAIL.with(|f| f.get()), 1, "read again");
        READS_FAIL.with(|f| f.set(0));
        assert!(store.list(None, 10).unwrap().is_empty(), "listed");
        assert_eq!(store.take_listed_corrupt(), 0);
        let named = fs::read_dir(dir.path().join(QUARANTINE_DIR))
            .unwrap()
            .count();
        assert_eq!(named, 1);
        let segment = store.log.segment_path(loc.seg);
        assert!(file_holds(&segment, &b).unwrap(), "its bytes were erased");
        assert_eq!(store.log.locate(&k), Some(loc), "dropped from the index");
        // Ten minutes on, it is read again, and served: the error passed.
        for at in store.unreadable_packed.lock().unwrap().values_mut() {
            *at -= UNREADABLE_RETRY;
        }
        assert_eq!(
            store.get(&k).unwrap().1,
            b,
            "still unreadable when it reads"
        );
        assert!(store.unreadable_packed.lock().unwrap().is_empty());
        assert_eq!(store.list(None, 10).unwrap().len(), 1);
        // Unreadable again, for the rest of the test: named and counted
        // once, not again when its mark lapses and it still fails.
        READS_FAIL.with(|f| f.set(100));
        assert!(matches!(store.get(&k), Err(StoreError::Corrupt(_))));
        for at in store.unreadable_packed.lock().unwrap().values_mut() {
            *at -= UNREADABLE_RETRY;
        }
        assert!(store.list(None, 10).unwrap().is_empty());
        assert_eq!(store.take_listed_corrupt(), 0, "counted again");
        READS_FAIL.with(|f| f.set(0));
        // A restart serves it again (the error passed).
        drop(store);
        let store = ShardStore::open(dir.path()).unwrap();
        assert_eq!(store.get(&k).unwrap().1, b);
        READS_FAIL.with(|f| f.set(100));
        assert!(matches!(store.get(&k), Err(StoreError::Corrupt(_))));
        READS_FAIL.with(|f| f.set(0));
        // Expunged while it does not read: its bytes go.
        let erased = store.erase_evidence(k.evidence).unwrap();
        assert_eq!(erased.shards, 1);
        assert!(
            !file_holds(&segment, &b).unwrap(),
            "expunged, its bytes stayed"
        );
        drop(store);
        let store = ShardStore::open(dir.path()).unwrap();
        assert!(
            matches!(store.get(&k), Err(StoreError::NotFound)),
            "a deleted shard came back"
        );
    }

    /// What scrub reads is the copy on the disk, not one the page cache
    /// holds (which each pass would keep there).
    #[test]
    fn scrub_reads_a_packed_shard_from_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let read_bytes = || -> Option<u64> {
            let io = fs::read_to_string("/proc/self/io").ok()?;
            io.lines()
                .find_map(|l| l.strip_prefix("read_bytes: "))
                .and_then(|v| v.trim().parse().ok())
        };
        // Where this can be seen at all: a file whose cached pages are
        // dropped is read from a disk (not on tmpfs, which keeps files in
        // the page cache alone, nor where the kernel keeps no I/O counts
        // or the file system ignores the advice).
        let control = dir.path().join("control");
        fs::write(&control, vec![1u8; 1 << 16]).unwrap();
        let file = File::open(&control).unwrap();
        file.sync_all().unwrap();
        crate::segments::drop_cached_pages(&file, 0, None);
        let seen = read_bytes().and_then(|before| {
            fs::read(&control).unwrap();
            Some(read_bytes()? - before)
        });
        if seen.is_none_or(|n| n < 1 << 16) {
            eprintln!("skipped: reads from the disk cannot be told from the page cache's here");
            return;
        }
        let store = ShardStore::open(dir.path()).unwrap();
        let k = key(4);
        let b = body(4096);
        store.put(&header(k, &b), &b).unwrap();
        // Another after it: the record's last page is shared, not the
        // file's end (the kernel keeps a page a range only partly covers).
        let after = body(3000);
        store.put(&header(key(5), &after), &after).unwrap();
        let loc = store.log.locate(&k).expect("packed");
        assert!(
            matches!(store.log.read_cached(&k, loc), Ok(ReadRecord::Shard(..))),
            "a shard just written is in the page cache"
        );
        let before = read_bytes().unwrap_or(0);
        assert_eq!(store.get_from_disk(&k).unwrap().1, b);
        assert!(
            read_bytes().unwrap_or(0) - before >= b.len() as u64,
            "scrub read the page cache's copy"
        );
    }

    /// Paging through a fan-out directory reads it once, not once a page
    /// (a scrub pass cost grew with the square of a node's shards), and
    /// lists every shard once, in order, files and packed shards alike. A
    /// listing begun anew reads it again, and finds what was put since.
    #[test]
    fn paging_through_a_directory_reads_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = ShardStore::open_with(
            dir.path(),
            StoreConfig {
                small_shard_max: 100,
                ..StoreConfig::default()
            },
        )
        .unwrap();
        // One piece of evidence: one fan-out directory.
        let evidence = key(7).evidence;
        let keys: Vec<ShardKey> = (0..40u64)
            .map(|stripe| ShardKey {
                evidence,
                stripe,
                index: 0,
            })
            .collect();
        for (n, k) in keys.iter().enumerate() {
            // Every other one packed.
            let b = body(if n % 2 == 0 { 50 } else { 500 });
            store.put(&header(*k, &b), &b).unwrap();
        }
        let reads = || store.fanout_reads.load(Ordering::Relaxed);
        let before = reads();
        let mut listed = Vec::new();
        let mut after = None;
        loop {
            let page = store.list(after.as_ref(), 1).unwrap();
            let Some(last) = page.last() else { break };
            after = Some(last.key);
            listed.extend(page.iter().map(|h| h.key));
        }
        assert_eq!(listed, keys);
        // 41 pages (the last finds nothing): each of the 256 directories
        // read once, its own twice (the last page begins there anew), not
        // once per page (296).
        let read = reads() - before;
        assert_eq!(read, 257, "the directory was read again per page");
        let more = ShardKey {
            evidence,
            stripe: 99,
            index: 1,
        };
        let b = body(500);
        store.put(&header(more, &b), &b).unwrap();
        let all = store.list(None, 1000).unwrap();
        assert_eq!(all.len(), 41, "a new listing misses a shard put since");
    }

    /// A store at `dir` keeping every shard in a file of its own.
    fn open_unpacked(dir: &Path) -> ShardStore {
        let config = StoreConfig {
            small_shard_max: 0,
            ..StoreConfig::default()
        };
        ShardStore::open_with(dir, config).unwrap()
    }

    /// Stores ten small shards (keys 0 to 9, bodies of 100 to 109 bytes)
    /// in a new store at `dir`; returns its disk identity.
    fn ten_small_shards(dir: &Path) -> [u8; 16] {
        let store = ShardStore::open(dir).unwrap();
        for n in 0..10u8 {
            let b = body(100 + n as usize);
            store.put(&header(key(n), &b), &b).unwrap();
        }
        store.disk_uuid()
    }

    /// [`ten_small_shards`] in a segment sealed by a start with nothing
    /// filed since (a later segment, holding nothing, follows the first,
    /// which that start made durable whole): the disk identity then, and
    /// the sealed segment's file.
    fn a_sealed_segment(dir: &Path) -> ([u8; 16], PathBuf) {
        ten_small_shards(dir);
        let identity = ShardStore::open(dir).unwrap().disk_uuid();
        (identity, segment_files(dir)[0].clone())
    }

    /// Where each shard or delete record of a segment's bytes begins
    /// (durable marks, kind 4, passed over).
    fn record_starts(bytes: &[u8]) -> Vec<usize> {
        bytes
            .windows(8)
            .enumerate()
            .filter(|(i, w)| w == b"CSTDSEG1" && bytes.get(i + 8) != Some(&4))
            .map(|(i, _)| i)
            .collect()
    }

    /// Where the record beginning at `start` ends: at the next record of any
    /// kind, or the end of the bytes.
    fn record_end(bytes: &[u8], start: usize) -> usize {
        bytes[start + 1..]
            .windows(8)
            .position(|w| w == b"CSTDSEG1")
            .map_or(bytes.len(), |p| start + 1 + p)
    }

    /// A sealed segment a file system repair emptied is damage, not a
    /// creation cut short: a segment with a whole header follows it.
    #[test]
    fn a_sealed_segment_emptied_is_reported_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (before, seg) = a_sealed_segment(dir.path());
        fs::write(&seg, b"").unwrap();
        let store = ShardStore::open(dir.path()).unwrap();
        assert_ne!(store.disk_uuid(), before, "its shards went in silence");
        assert!(matches!(store.get(&key(0)), Err(StoreError::NotFound)));
    }

    /// [`ten_small_shards`], left in the newest segment: the disk identity,
    /// the segment's file, its bytes and where its records begin.
    fn ten_in_the_newest_segment(dir: &Path) -> ([u8; 16], PathBuf, Vec<u8>, Vec<usize>) {
        let identity = ten_small_shards(dir);
        let seg = segment_files(dir)[0].clone();
        let bytes = fs::read(&seg).unwrap();
        let starts = record_starts(&bytes);
        (identity, seg, bytes, starts)
    }

    /// What a crash mid-append leaves past the newest segment's durable
    /// mark (a record damaged, one torn off at the end) was never
    /// acknowledged: mended at the open that finds it, the disk keeping its
    /// identity, and not taken for a sealed segment's damage once a newer
    /// segment holds records.
    #[test]
    fn a_crashs_leftovers_past_the_durable_mark_are_mended_quietly() {
        let dir = tempfile::tempdir().unwrap();
        let (identity, seg, mut bytes, starts) = ten_in_the_newest_segment(dir.path());
        assert_eq!(starts.len(), 10);
        // A copy of the first record with its head damaged, then another
        // torn off half way.
        let first = bytes[starts[0]..record_end(&bytes, starts[0])].to_vec();
        let mut damaged = first.clone();
        damaged[40] ^= 0x01;
        bytes.extend_from_slice(&damaged);
        bytes.extend_from_slice(&first[..first.len() / 2]);
        fs::write(&seg, bytes).unwrap();

        let store = ShardStore::open(dir.path()).unwrap();
        assert_eq!(
            store.disk_uuid(),
            identity,
            "a crash's leftovers renewed the identity"
        );
        assert_eq!(store.info().unwrap().shards, 10);
        for n in 0..10u8 {
            assert_eq!(
                store.get(&key(n)).unwrap().1,
                body(100 + n as usize),
                "shard {n}"
            );
        }
        // New puts go to a new segment after the mended one.
        let b = body(33);
        store.put(&header(key(3), &b), &b).unwrap();
        assert_eq!(segment_files(dir.path()).len(), 2);
        drop(store);
        let store = ShardStore::open(dir.path()).unwrap();
        assert_eq!(store.get(&key(3)).unwrap().1, b);
        assert_eq!(store.info().unwrap().shards, 10);
        assert_eq!(
            store.disk_uuid(),
            identity,
            "mended leftovers reported later"
        );
    }

    /// Damage in the newest segment before its durable mark (a media error
    /// in a record an fsync had made durable, found after a clean stop or a
    /// crash long after) lost an acknowledged shard: reported as a sealed
    /// segment's damage is (the disk takes a new identity, so the gateway
    /// re-checks what it placed here), never mended in silence as a crash's
    /// leftovers; every other record is still served.
    #[test]
    fn damage_before_the_newest_segments_durable_mark_renews_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let (identity, seg, mut bytes, starts) = ten_in_the_newest_segment(dir.path());
        // The fourth record (an fsync round after it named it durable),
        // and the last (which only the clean close's mark names).
        bytes[starts[3] + 40] ^= 0x01;
        bytes[starts[9] + 40] ^= 0x01;
        fs::write(&seg, bytes).unwrap();

        let store = ShardStore::open(dir.path()).unwrap();
        let renewed = store.disk_uuid();
        assert_ne!(renewed, identity, "an acknowledged shard went in silence");
        assert_eq!(store.info().unwrap().shards, 8);
        for n in [3u8, 9] {
            assert!(matches!(store.get(&key(n)), Err(StoreError::NotFound)));
        }
        for n in (0..9u8).filter(|&n| n != 3) {
            assert_eq!(
                store.get(&key(n)).unwrap().1,
                body(100 + n as usize),
                "shard {n}"
            );
        }
        drop(store);
        let store = ShardStore::open(dir.path()).unwrap();
        assert_eq!(
            store.disk_uuid(),
            renewed,
            "renewed again for the same damage"
        );
    }

    /// Damage found in a sealed segment (fsynced whole when sealed, so
    /// what it held was acknowledged) is never passed over in silence: the
    /// disk takes a new identity, so the gateway re-checks what it placed
    /// here, and the damage is mended so the next start does not report it
    /// again. Every readable record is still served.
    #[test]
    fn damage_in_a_sealed_segment_renews_the_disk_identity_once() {
        let dir = tempfile::tempdir().unwrap();
        let (before, seg) = a_sealed_segment(dir.path());
        let mut bytes = fs::read(&seg).unwrap();
        let starts = record_starts(&bytes);
        assert_eq!(starts.len(), 10);
        // The head of the fourth record damaged, the last record cut short
        // in its body (a file system repair truncated the file).
        bytes[starts[3] + 40] ^= 0x01;
        bytes.truncate(record_end(&bytes, starts[9]) - 50);
        fs::write(&seg, &bytes).unwrap();

        let store = ShardStore::open(dir.path()).unwrap();
        let renewed = store.disk_uuid();
        assert_ne!(renewed, before, "the damage was passed over in silence");
        for n in [3u8, 9] {
            assert!(matches!(store.get(&key(n)), Err(StoreError::NotFound)));
        }
        let served = |store: &ShardStore| {
            for n in (0..10u8).filter(|n| ![3, 9].contains(n)) {
                assert_eq!(store.get(&key(n)).unwrap().1, body(100 + n as usize));
            }
        };
        served(&store);
        // Mended: the damaged record's bytes are gone, the cut record too.
        let mended = fs::read(&seg).unwrap();
        assert_eq!(mended.len(), starts[9]);
        let end = record_end(&bytes, starts[3]);
        assert!(mended[starts[3] + 60..end].iter().all(|b| *b == 0));
        drop(store);
        let store = ShardStore::open(dir.path()).unwrap();
        assert_eq!(
            store.disk_uuid(),
            renewed,
            "renewed again for the same damage"
        );
        served(&store);
    }

    #[test]
    fn a_corrupt_small_shard_is_quarantined_and_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = ShardStore::open(dir.path()).unwrap();
        for n in 0..3u8 {
            let b = body(1000);
            store.put(&header(key(n), &b), &b).unwrap();
        }
        let seg = segment_files(dir.path())[0].clone();
        let mut bytes = fs::read(&seg).unwrap();
        // The last byte of the third shard's body.
        let starts = record_starts(&bytes);
        let last = record_end(&bytes, starts[2]) - 1;
        bytes[last] ^= 0x40;
        fs::write(&seg, bytes).unwrap();
        assert!(store.stat(&key(2)).is_ok(), "a stat reads only the header");
        let err = store.get(&key(2)).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)));
        assert!(matches!(store.get(&key(2)), Err(StoreError::NotFound)));
        assert_eq!(store.quarantined(None, 10).unwrap(), vec![key(2)]);
        assert_eq!(store.info().unwrap().shards, 2);
        assert_eq!(store.get(&key(1)).unwrap().1, body(1000));
        drop(store);
        let store = ShardStore::open(dir.path()).unwrap();
        assert!(
            matches!(store.get(&key(2)), Err(StoreError::NotFound)),
            "stays deleted"
        );
    }

    /// Concurrent small puts share fsyncs: a put waiting for its record to
    /// be durable rides on the fsync in flight or leads the next one for
    /// everything appended meanwhile. (End to end, a node sees only as
    /// many puts at once as filings overlap there; here they all do.)
    #[test]
    fn concurrent_small_puts_share_their_fsyncs() {
        const THREADS: u8 = 32;
        const EACH: u8 = 8;
        let dir = tempfile::tempdir().unwrap();
        let store = ShardStore::open(dir.path()).unwrap();
        let start = std::sync::Barrier::new(THREADS as usize);
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (store, start) = (&store, &start);
                s.spawn(move || {
                    start.wait();
                    for i in 0..EACH {
                        let mut k = key(t);
                        k.stripe = u64::from(i);
                        let b = body(4096);
                        store.put(&header(k, &b), &b).unwrap();
                    }
                });
            }
        });
        let info = store.info().unwrap();
        let puts = u64::from(THREADS) * u64::from(EACH);
        assert_eq!(info.shards, puts);
        assert!(
            info.segment_syncs * 4 <= puts,
            "{} fsyncs for {puts} concurrent puts",
            info.segment_syncs
        );
    }

    /// Damage in a record's head, met by a stat (what listings and scrub
    /// do first): the copy kept for forensics is the whole record, not the
    /// few bytes the stat read.
    #[test]
    fn a_small_shard_damaged_in_its_head_is_kept_whole_in_quarantine() {
        let dir = tempfile::tempdir().unwrap();
        let store = ShardStore::open(dir.path()).unwrap();
        for n in 0..3u8 {
            let b = body(4000);
            store.put(&header(key(n), &b), &b).unwrap();
        }
        let seg = segment_files(dir.path())[0].clone();
        let mut bytes = fs::read(&seg).unwrap();
        // Just before the third shard's body: its header.
        let starts = record_starts(&bytes);
        let at = record_end(&bytes, starts[2]) - 4000 - 5;
        bytes[at] ^= 0x40;
        fs::write(&seg, bytes).unwrap();
        assert!(matches!(store.stat(&key(2)), Err(StoreError::Corrupt(_))));
        assert_eq!(store.quarantined(None, 10).unwrap(), vec![key(2)]);
        let kept: Vec<u64> = fs::read_dir(dir.path().join(QUARANTINE_DIR))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .collect();
        assert_eq!(kept.len(), 1);
        assert!(kept[0] > 4000, "the whole record is kept: {kept:?}");
    }

    #[test]
    fn compaction_reclaims_dead_space_and_never_resurrects_a_deleted_shard() {
        let dir = tempfile::tempdir().unwrap();
        let victim = key(200);
        {
            // Segment 1: mostly live, and an old copy of the victim.
            let store = ShardStore::open(dir.path()).unwrap();
            for n in 0..50u8 {
                let b = body(500);
                store.put(&header(key(n), &b), &b).unwrap();
            }
            let b = body(10);
            store.put(&header(victim, &b), &b).unwrap();
        }
        {
            // Segment 2: the victim replaced then deleted, and shards that are
            // nearly all deleted again.
            let store = ShardStore::open(dir.path()).unwrap();
            let b = body(20);
            store.put(&header(victim, &b), &b).unwrap();
            assert!(store.delete(&victim).unwrap());
            for n in 100..140u8 {
                let b = body(800);
                store.put(&header(key(n), &b), &b).unwrap();
            }
            for n in 101..140u8 {
                assert!(store.delete(&key(n)).unwrap());
            }
        }
        let store = ShardStore::open(dir.path()).unwrap();
        let before = store.info().unwrap();
        assert_eq!(segment_files(dir.path()).len(), 3);
        assert!(store.compact().unwrap(), "segment 2 is mostly dead");
        assert!(!store.compact().unwrap(), "segment 1 is mostly live");
        let after = store.info().unwrap();
        assert_eq!(
            (after.shards, after.used_bytes),
            (before.shards, before.used_bytes)
        );
        assert!(
            after.segment_bytes < before.segment_bytes / 2,
            "{before:?} -> {after:?}"
        );
        assert_eq!(segment_files(dir.path()).len(), 2);
        drop(store);
        let store = ShardStore::open(dir.path()).unwrap();
        assert_eq!(store.info().unwrap().shards, 51);
        assert_eq!(store.get(&key(100)).unwrap().1, body(800));
        assert!(matches!(store.get(&key(101)), Err(StoreError::NotFound)));
        // The tombstone outlived its segment: segment 1's old copy stays hidden.
        assert!(matches!(store.get(&victim), Err(StoreError::NotFound)));
    }

    /// Two sealed segments as compaction finds them: the first mostly
    /// live (shards 0..50, and `victim`'s old copy), the second mostly dead
    /// (`victim` deleted, shard 100 and `extra` live, 101..140 put and
    /// deleted).
    fn a_mostly_dead_second_segment(
        dir: &Path,
        victim: Option<ShardKey>,
        extra: &[(ShardKey, &[u8])],
    ) {
        {
            let store = ShardStore::open(dir).unwrap();
            for n in 0..50u8 {
                let b = body(500);
                store.put(&header(key(n), &b), &b).unwrap();
            }
            if let Some(victim) = victim {
                let b = body(10);
                store.put(&header(victim, &b), &b).unwrap();
            }
        }
        let store = ShardStore::open(dir).unwrap();
        if let Some(victim) = victim {
            assert!(store.delete(&victim).unwrap());
        }
        let b = body(800);
        store.put(&header(key(100), &b), &b).unwrap();
        for (k, b) in extra {
            store.put(&header(*k, b), b).unwrap();
        }
        for n in 101..140u8 {
            store.put(&header(key(n), &b), &b).unwrap();
            assert!(store.delete(&key(n)).unwrap());
        }
    }

    /// A segment whose file an operator unlinked while the node runs is
    /// still compacted from the file the node holds open: its tombstones
    /// are carried forward, so a deleted shard's old copy in an older
    /// segment stays hidden after a restart. (Read by its name, the
    /// segment looked empty, its tombstones were dropped with it, and the
    /// deleted shard came back.)
    #[test]
    fn a_segment_unlinked_under_the_node_keeps_its_tombstones_through_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let victim = key(200);
        a_mostly_dead_second_segment(dir.path(), Some(victim), &[]);
        let store = ShardStore::open(dir.path()).unwrap();
        let files = segment_files(dir.path());
        assert_eq!(files.len(), 3);
        fs::remove_file(&files[1]).unwrap();
        assert!(store.compact().unwrap(), "segment 2 is mostly dead");
        drop(store);
        let store = ShardStore::open(dir.path()).unwrap();
        assert_eq!(store.get(&key(100)).unwrap().1, body(800));
        assert!(
            matches!(store.get(&victim), Err(StoreError::NotFound)),
            "the deleted shard came back"
        );
        assert_eq!(store.info().unwrap().shards, 51);
    }

    /// A compaction whose copies cannot be made durable (a failed fsync)
    /// leaves no second copy of a live shard's bytes behind: the copies are
    /// erased as dead records, the originals stay current and readable.
    #[test]
    fn a_failed_compaction_erases_the_copies_it_made() {
        let dir = tempfile::tempdir().unwrap();
        let kept = body(777);
        {
            let store = ShardStore::open(dir.path()).unwrap();
            store.put(&header(key(1), &kept), &kept).unwrap();
            let b = body(800);
            for n in 100..140u8 {
                store.put(&header(key(n), &b), &b).unwrap();
                assert!(store.delete(&key(n)).unwrap());
            }
        }
        let store = ShardStore::open(dir.path()).unwrap();
        let copies = || {
            segment_files(dir.path())
                .iter()
                .map(|f| {
                    let bytes = fs::read(f).unwrap();
                    bytes.windows(kept.len()).filter(|w| *w == kept).count()
                })
                .sum::<usize>()
        };
        assert_eq!(copies(), 1);
        crate::segments::tests::FSYNC_FAILS.with(|f| f.set(true));
        let compacted = store.compact();
        crate::segments::tests::FSYNC_FAILS.with(|f| f.set(false));
        assert!(compacted.is_err(), "{compacted:?}");
        assert_eq!(copies(), 1, "the copy of a live shard is left whole");
        assert_eq!(store.get(&key(1)).unwrap().1, kept);
        store.sync_erasures().unwrap();
        drop(store);
        let store = ShardStore::open(dir.path()).unwrap();
        assert_eq!(store.get(&key(1)).unwrap().1, kept);
    }

    /// Tombstones still needed (an old segment they may hide records in
    /// stays) count as live: a segment of them that compaction carried
    /// forward is not compacted again only to be copied once more, which
    /// on a node that deletes much went on without end.
    #[test]
    fn carried_tombstones_are_not_compacted_again_while_needed() {
        let dir = tempfile::tempdir().unwrap();
        {
            // Segment 1: live for good.
            let store = ShardStore::open(dir.path()).unwrap();
            for n in 0..50u8 {
                let b = body(500);
                store.put(&header(key(n), &b), &b).unwrap();
            }
        }
        {
            // Segment 2: shards put and deleted (their tombstones' bound is
            // segment 2, and segment 1 is older).
            let store = ShardStore::open(dir.path()).unwrap();
            let b = body(800);
            for n in 100..140u8 {
                store.put(&header(key(n), &b), &b).unwrap();
                assert!(store.delete(&key(n)).unwrap());
            }
        }
        {
            let store = ShardStore::open(dir.path()).unwrap();
            assert!(store.compact().unwrap(), "segment 2 is mostly dead");
        }
        // Segment 3, holding the carried tombstones, is sealed now.
        let store = ShardStore::open(dir.path()).unwrap();
        let files = segment_files(dir.path()).len();
        assert!(!store.compact().unwrap(), "tombstones compacted again");
        assert_eq!(segment_files(dir.path()).len(), files);
        drop(store);
        let store = ShardStore::open(dir.path()).unwrap();
        assert!(matches!(store.get(&key(100)), Err(StoreError::NotFound)));
        assert_eq!(store.info().unwrap().shards, 50);
    }

    /// A segment that compaction cannot drop (a record in it damaged since
    /// the node started, left for the scrubber) is tried again and again;
    /// its tombstones are copied forward once, not at every try (the disk
    /// would fill with copies).
    #[test]
    fn retrying_a_segment_held_by_a_damaged_record_copies_its_tombstones_once() {
        let dir = tempfile::tempdir().unwrap();
        let victim = key(200);
        a_mostly_dead_second_segment(dir.path(), Some(victim), &[]);
        let store = ShardStore::open(dir.path()).unwrap();
        // Rot under the running node: key(100)'s frame in segment 2.
        let loc = store.log.locate(&key(100)).unwrap();
        let seg = &segment_files(dir.path())[1];
        let mut bytes = fs::read(seg).unwrap();
        bytes[loc.off as usize + 1] ^= 0x10;
        fs::write(seg, bytes).unwrap();
        let size = |store: &ShardStore| store.info().unwrap().segment_bytes;
        for _ in 0..2 {
            let _ = store.compact();
        }
        let once = size(&store);
        for _ in 0..10 {
            let _ = store.compact();
        }
        assert_eq!(size(&store), once, "tombstones copied again by the retries");
        assert!(matches!(store.get(&victim), Err(StoreError::NotFound)));
        drop(store);
        let store = ShardStore::open(dir.path()).unwrap();
        assert!(matches!(store.get(&victim), Err(StoreError::NotFound)));
    }

    /// An expunge while a compaction has copied a record of its evidence
    /// forward but not yet removed the segment (here one a damaged record
    /// keeps) erases the original too: before, it erased only the copy and
    /// said the evidence was gone while the original's bytes were in a
    /// file.
    #[test]
    fn an_expunge_during_a_compaction_erases_the_original_too() {
        let dir = tempfile::tempdir().unwrap();
        let expunged = key(150);
        let secret: Vec<u8> = (0..600u32).map(|i| (i * 7 % 253) as u8 ^ 0x5a).collect();
        a_mostly_dead_second_segment(dir.path(), None, &[(expunged, &secret)]);
        let store = ShardStore::open(dir.path()).unwrap();
        let loc = store.log.locate(&key(100)).unwrap();
        let seg = segment_files(dir.path())[1].clone();
        let mut bytes = fs::read(&seg).unwrap();
        bytes[loc.off as usize + 1] ^= 0x10;
        fs::write(&seg, bytes).unwrap();
        let holds = |path: &Path| {
            fs::read(path)
                .unwrap()
                .windows(secret.len())
                .any(|w| w == secret)
        };
        let id = store.log.locate(&expunged).unwrap().seg;
        let mut copied = Vec::new();
        assert!(!store.compact_segment_from(id, &mut copied).unwrap());
        assert!(copied.iter().any(|(_, k)| *k == expunged));
        assert!(holds(&seg), "the original is still in its segment");
        store.erase_evidence(expunged.evidence).unwrap();
        assert!(!holds(&seg), "the expunged original outlived its erasure");
        assert!(
            segment_files(dir.path()).iter().all(|f| !holds(f)),
            "a copy outlived its erasure"
        );
    }

    /// A segment found unreadable at open (here its header damaged) held
    /// shards no one can name: the disk takes a new identity, which the
    /// gateway treats as a disk that lost its contents (it re-checks every
    /// stripe placed here), and the segment is moved aside, once.
    #[test]
    fn an_unreadable_segment_renews_the_disk_identity_once() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let store = ShardStore::open(dir.path()).unwrap();
            for n in 0..5u8 {
                let b = body(300);
                store.put(&header(key(n), &b), &b).unwrap();
            }
            store.disk_uuid()
        };
        let seg = segment_files(dir.path())[0].clone();
        let mut bytes = fs::read(&seg).unwrap();
        bytes[..8].fill(0xee);
        fs::write(&seg, bytes).unwrap();
        let second = {
            let store = ShardStore::open(dir.path()).unwrap();
            assert!(matches!(store.get(&key(0)), Err(StoreError::NotFound)));
            store.disk_uuid()
        };
        assert_ne!(first, second, "the disk took a new identity");
        assert!(!seg.exists(), "the damaged segment was moved aside");
        let aside: Vec<_> = fs::read_dir(dir.path().join(DAMAGED_SEGMENTS_DIR))
            .unwrap()
            .collect();
        assert_eq!(aside.len(), 1);
        let store = ShardStore::open(dir.path()).unwrap();
        assert_eq!(
            store.disk_uuid(),
            second,
            "renewed once, not at every start"
        );
        let b = body(300);
        store.put(&header(key(9), &b), &b).unwrap();
        assert_eq!(store.get(&key(9)).unwrap().1, b);
    }

    /// A sealed segment cut to no more than a header (a file system repair
    /// truncating it) lost acknowledged shards: it is taken for damaged, and
    /// the disk for one that lost contents, never removed quietly as a
    /// creation cut short (which only the last segment can be).
    #[test]
    fn a_sealed_segment_cut_to_nothing_renews_the_disk_identity() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let store = ShardStore::open(dir.path()).unwrap();
            let b = body(300);
            store.put(&header(key(1), &b), &b).unwrap();
            store.disk_uuid()
        };
        // Segment 2 made by this open, and holding a shard.
        {
            let store = ShardStore::open(dir.path()).unwrap();
            let b = body(400);
            store.put(&header(key(2), &b), &b).unwrap();
        }
        let seg = segment_files(dir.path())[0].clone();
        fs::write(&seg, b"").unwrap();
        let store = ShardStore::open(dir.path()).unwrap();
        assert_ne!(store.disk_uuid(), first, "the disk took a new identity");
        assert!(matches!(store.get(&key(1)), Err(StoreError::NotFound)));
        assert_eq!(store.get(&key(2)).unwrap().1, body(400));
    }

    thread_local! {
        /// Moving a damaged segment aside at open fails (as with no room).
        pub(super) static RENAME_ASIDE_FAILS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        /// Renewing the disk's identity at open finds the disk full.
        pub(super) static RENEW_IDENTITY_FINDS_NO_ROOM: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// A directory kept among damaged segments (a segment's entry damaged
    /// into one) does not make every expunge on the node fail for good.
    #[test]
    fn a_directory_among_damaged_segments_does_not_block_expunges() {
        let dir = tempfile::tempdir().unwrap();
        let store = ShardStore::open(dir.path()).unwrap();
        let odd = dir
            .path()
            .join(DAMAGED_SEGMENTS_DIR)
            .join("seg-0000000000000009.x");
        fs::create_dir_all(&odd).unwrap();
        fs::write(odd.join("inside"), b"whatever it held").unwrap();
        store.erase_evidence(key(1).evidence).unwrap();
        assert!(!odd.exists());
    }

    /// With no room to renew the disk's identity at open, the damaged
    /// segments stay where the next start finds them again: an expunge
    /// meanwhile waits (it would otherwise move them, and the identity would
    /// never be renewed); once a start had room, it goes through.
    #[test]
    fn an_expunge_waits_while_the_disk_identity_is_owed() {
        let dir = tempfile::tempdir().unwrap();
        let doomed = key(1).evidence;
        let b = secret(42, 700);
        let (first, seg) = packed_in_a_damaged_segment(dir.path(), &b);
        RENEW_IDENTITY_FINDS_NO_ROOM.with(|f| f.set(true));
        let store = ShardStore::open(dir.path());
        RENEW_IDENTITY_FINDS_NO_ROOM.with(|f| f.set(false));
        let store = store.unwrap();
        assert_eq!(store.disk_uuid(), first);
        assert!(matches!(
            store.erase_evidence(doomed),
            Err(StoreError::DiskFull)
        ));
        assert!(seg.exists(), "the segment the next start needs was moved");
        drop(store);
        let store = ShardStore::open(dir.path()).unwrap();
        assert_ne!(store.disk_uuid(), first, "the identity was renewed");
        store.erase_evidence(doomed).unwrap();
        let left = files_holding(dir.path(), &b[100..132]);
        assert!(left.is_empty(), "expunged bytes left in {left:?}");
    }

    /// A damaged segment the open could not move aside still holds shards
    /// of evidence expunged later: the erasure moves it aside then and
    /// removes it, so no byte of that evidence stays on the disk.
    #[test]
    fn a_damaged_segment_left_in_place_is_erased_with_its_evidence() {
        let dir = tempfile::tempdir().unwrap();
        let doomed = key(1).evidence;
        let b = secret(41, 700);
        let (_, seg) = packed_in_a_damaged_segment(dir.path(), &b);
        RENAME_ASIDE_FAILS.with(|f| f.set(true));
        let store = ShardStore::open(dir.path());
        RENAME_ASIDE_FAILS.with(|f| f.set(false));
        let store = store.unwrap();
        assert!(seg.exists(), "the segment stayed in place");
        store.erase_evidence(doomed).unwrap();
        let left = files_holding(dir.path(), &b[100..132]);
        assert!(left.is_empty(), "expunged bytes left in {left:?}");
        assert!(!seg.exists());
    }

    /// Stores `b` as shard `key(1)`, packed, in a store at `dir`, then
    /// damages its segment's header so the next open cannot read it.
    /// Returns the disk's identity before, and the segment's file.
    fn packed_in_a_damaged_segment(dir: &Path, b: &[u8]) -> ([u8; 16], PathBuf) {
        let first = {
            let store = ShardStore::open(dir).unwrap();
            store.put(&header(key(1), b), b).unwrap();
            store.disk_uuid()
        };
        let seg = segment_files(dir)[0].clone();
        let mut bytes = fs::read(&seg).unwrap();
        bytes[..8].fill(0xee);
        fs::write(&seg, bytes).unwrap();
        (first, seg)
    }

    /// Bytes no one can guess: the same nowhere else on the disk.
    fn secret(tag: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        blake3::Hasher::new()
            .update(&tag.to_le_bytes())
            .finalize_xof()
            .fill(&mut out);
        out
    }

    /// Every file under `dir` that holds `needle`.
    fn files_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut dirs = vec![dir.to_path_buf()];
        while let Some(d) = dirs.pop() {
            for entry in fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if fs::read(&path)
                    .unwrap()
                    .windows(needle.len())
                    .any(|w| w == needle)
                {
                    found.push(path);
                }
            }
        }
        found
    }

    /// An expunge leaves none of the evidence's bytes in any file of the
    /// data directory: not its shard files or packed records, not a copy a
    /// repair moved away or a re-put replaced, not the forensic copies of
    /// quarantined shards, not a damaged segment kept aside; another
    /// evidence's shards stay whole, and a second erase finds nothing.
    #[test]
    fn erasing_evidence_leaves_none_of_its_bytes_on_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            ShardStore::open_with(
                dir.path(),
                StoreConfig {
                    small_shard_max: 1000,
                    ..StoreConfig::default()
                },
            )
            .unwrap()
        };
        let store = open();
        let (doomed, other) = (key(1).evidence, key(2).evidence);
        let shard = |evidence, stripe: u64, len: usize| {
            let k = ShardKey {
                evidence,
                stripe,
                index: 0,
            };
            let b = secret(u64::from(evidence.0[15]) << 32 | stripe, len);
            (k, b)
        };
        // Stripes 0-1 packed, 2-3 in files; 4 replaced by a re-put; 5
        // deleted (moved away by a repair); 6 (packed) and 7 (a file)
        // quarantined by a read that found them damaged.
        let sizes = [500, 900, 3000, 4000, 600, 700, 800, 3500];
        let doomed_shards: Vec<_> = (0..8u64)
            .map(|s| shard(doomed, s, sizes[s as usize]))
            .collect();
        let other_shards: Vec<_> = (0..4u64)
            .map(|s| shard(other, s, sizes[s as usize]))
            .collect();
        for (k, b) in doomed_shards.iter().chain(&other_shards) {
            store.put(&header(*k, b), b).unwrap();
        }
        let (k4, b4) = &doomed_shards[4];
        store.put(&header(*k4, b4), b4).unwrap();
        assert!(store.delete(&doomed_shards[5].0).unwrap());
        for (k, b) in &doomed_shards[6..] {
            // Damage the copy on disk: the last 16 bytes of its body.
            let needle = &b[b.len() - 16..];
            let mut hit = files_holding(dir.path(), needle);
            assert_eq!(hit.len(), 1, "{k}");
            let path = hit.remove(0);
            let mut bytes = fs::read(&path).unwrap();
            let at = bytes.windows(16).position(|w| w == needle).unwrap();
            bytes[at] ^= 1;
            fs::write(&path, bytes).unwrap();
            assert!(matches!(store.get(k), Err(StoreError::Corrupt(_))), "{k}");
        }
        assert_eq!(store.quarantined(None, 10).unwrap().len(), 2);
        // A segment a failed disk left aside, holding shards of both.
        let aside = dir.path().join(DAMAGED_SEGMENTS_DIR);
        fs::create_dir_all(&aside).unwrap();
        let seg = segment_files(dir.path())[0].clone();
        fs::copy(&seg, aside.join("seg-0000000000000001.a")).unwrap();
        // And one holding nothing of the doomed evidence.
        fs::write(aside.join("seg-0000000000000002.b"), &other_shards[0].1).unwrap();

        let erased = store.erase_evidence(doomed).unwrap();
        assert_eq!(
            erased,
            Erased {
                shards: 5,
                copies: 3
            },
            "stripes 0-4, and two quarantined copies and a damaged segment"
        );
        let check = |store: &ShardStore| {
            for (k, b) in &doomed_shards {
                for part in [&b[..32], &b[b.len() - 32..]] {
                    let left = files_holding(dir.path(), part);
                    assert!(left.is_empty(), "{k} is still in {left:?}");
                }
                assert!(matches!(store.get(k), Err(StoreError::NotFound)), "{k}");
            }
            for (k, b) in &other_shards {
                assert_eq!(&store.get(k).unwrap().1, b, "{k}");
            }
            assert!(aside.join("seg-0000000000000002.b").exists());
        };
        check(&store);
        assert_eq!(store.erase_evidence(doomed).unwrap(), Erased::default());
        drop(store);
        check(&open());
    }

    /// A read that finds its record erased under it (the shard deleted
    /// between the lookup and the read) reports the shard gone, not
    /// corrupt: nothing is quarantined, no repair is asked for.
    #[test]
    fn a_read_racing_a_delete_finds_the_shard_gone_not_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = ShardStore::open(dir.path()).unwrap();
        let b = body(700);
        store.put(&header(key(3), &b), &b).unwrap();
        let loc = store.log.locate(&key(3)).unwrap();
        assert!(store.delete(&key(3)).unwrap());
        assert!(matches!(
            store.read_small(&key(3), loc, false),
            Err(StoreError::NotFound)
        ));
        // A stat that began before the delete may still answer with the
        // header (its frame and head stay); never with corruption.
        assert!(matches!(
            store.read_small(&key(3), loc, true),
            Err(StoreError::NotFound) | Ok(_)
        ));
        assert!(store.quarantined(None, 10).unwrap().is_empty());
        assert_eq!(store.take_listed_corrupt(), 0);
    }

    #[test]
    fn concurrent_small_puts_are_all_durable() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(ShardStore::open(dir.path()).unwrap());
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..25u8 {
                        let k = ShardKey {
                            evidence: EvidenceId::new(1_700_000_000_000, [t; 10]),
                            stripe: i as u64,
                            index: t,
                        };
                        let b = body(64 + i as usize);
                        store.put(&header(k, &b), &b).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(store);
        let store = ShardStore::open(dir.path()).unwrap();
        assert_eq!(store.info().unwrap().shards, 200);
        let mut after = None;
        let mut n = 0;
        loop {
            let page = store.list(after.as_ref(), 64).unwrap();
            let Some(last) = page.last() else { break };
            after = Some(last.key);
            for h in page {
                assert_eq!(store.get(&h.key).unwrap().0, h);
                n += 1;
            }
        }
        assert_eq!(n, 200);
    }

    #[test]
    fn reopening_keeps_shards_disk_uuid_and_usage_and_drops_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let (uuid, info) = {
            let store = ShardStore::open(dir.path()).unwrap();
            for n in 0..5 {
                let b = body(100 * n as usize);
                store.put(&header(key(n), &b), &b).unwrap();
            }
            (store.disk_uuid(), store.info().unwrap())
        };
        fs::write(dir.path().join(TMP_DIR).join(".leftover.tmp"), b"half").unwrap();
        let store = ShardStore::open(dir.path()).unwrap();
        assert_eq!(store.disk_uuid(), uuid);
        let again = store.info().unwrap();
        assert_eq!(
            (again.shards, again.used_bytes),
            (info.shards, info.used_bytes)
        );
        assert_eq!(again.shards, 5);
        assert!(again.capacity_bytes >= again.free_bytes && again.capacity_bytes > 0);
        assert_eq!(store.get(&key(3)).unwrap().1, body(300));
        assert_eq!(fs::read_dir(dir.path().join(TMP_DIR)).unwrap().count(), 0);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(ShardStore::open(other.path()).unwrap().disk_uuid(), uuid);
    }

    #[test]
    fn a_store_at_its_reserve_refuses_new_shards_but_serves_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let with_reserve = |reserve_bytes| {
            ShardStore::open_with(
                dir.path(),
                StoreConfig {
                    small_shard_max: 100,
                    reserve_bytes,
                    ..StoreConfig::default()
                },
            )
            .unwrap()
        };
        // One shard in a segment, one in its own file.
        let (small, large) = (body(50), body(SHARD_SIZE as usize));
        {
            let store = with_reserve(0);
            store.put(&header(key(1), &small), &small).unwrap();
            store.put(&header(key(2), &large), &large).unwrap();
        }
        // A reserve larger than the disk's free space: full for new shards.
        let free = with_reserve(0).info().unwrap().free_bytes;
        let reserve = free + (1 << 30);
        let store = with_reserve(reserve);
        assert_eq!(store.info().unwrap().reserve_bytes, reserve);
        for (n, b) in [(3, &small), (4, &large), (1, &small), (2, &large)] {
            let err = store.put(&header(key(n), b), b).unwrap_err();
            assert!(matches!(err, StoreError::DiskFull), "shard {n}: {err}");
            assert_eq!(err.code(), ErrorCode::DiskFull);
        }
        // Nothing new was stored or replaced, and no temporary file is left.
        for n in [3, 4] {
            assert!(matches!(store.get(&key(n)), Err(StoreError::NotFound)));
        }
        assert_eq!(store.get(&key(1)).unwrap().1, small);
        assert_eq!(store.get(&key(2)).unwrap().1, large);
        assert_eq!(store.info().unwrap().shards, 2);
        assert_eq!(fs::read_dir(dir.path().join(TMP_DIR)).unwrap().count(), 0);
        // Deletes use the reserve: they are how space comes back.
        assert!(store.delete(&key(1)).unwrap());
        assert!(store.delete(&key(2)).unwrap());
        assert_eq!(store.info().unwrap().shards, 0);
        drop(store);
        // With room again, the same shards are taken.
        let store = with_reserve(0);
        assert!(matches!(store.get(&key(1)), Err(StoreError::NotFound)));
        store.put(&header(key(3), &small), &small).unwrap();
        store.put(&header(key(4), &large), &large).unwrap();
        assert_eq!(store.info().unwrap().shards, 2);
    }

    #[test]
    fn puts_in_flight_claim_their_space_before_the_reserve_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let free = ShardStore::open(dir.path()).unwrap().free_bytes().unwrap();
        // Room above the reserve for one claim of a quarter of the free
        // space, not two (with an eighth of it to spare either way for
        // whatever else writes to this disk meanwhile).
        let quarter = free / 4;
        let store = ShardStore::open_with(
            dir.path(),
            StoreConfig {
                reserve_bytes: free - quarter * 3 / 2,
                ..StoreConfig::default()
            },
        )
        .unwrap();
        let first = store.claim_space(quarter).unwrap();
        assert!(matches!(
            store.claim_space(quarter),
            Err(StoreError::DiskFull)
        ));
        drop(first);
        let again = store.claim_space(quarter).unwrap();
        drop(again);
        assert_eq!(
            store.claimed.load(Ordering::Acquire),
            0,
            "claims are released"
        );
    }

    #[test]
    fn a_full_disk_maps_to_disk_full() {
        let enospc = io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error());
        let err = StoreError::from(enospc);
        assert!(matches!(err, StoreError::DiskFull));
        assert_eq!(err.code(), ErrorCode::DiskFull);
        assert_eq!(
            StoreError::from(io::Error::other("x")).code(),
            ErrorCode::Io
        );
    }

    #[test]
    fn a_garbled_disk_uuid_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(DISK_UUID_FILE), "not a uuid").unwrap();
        assert!(matches!(
            ShardStore::open(dir.path()),
            Err(StoreError::BadDiskUuid(_))
        ));
    }

    #[test]
    fn a_data_directory_changed_under_the_store_is_noticed() {
        let changed =
            |store: &ShardStore| matches!(store.check_identity(), Err(StoreError::DiskChanged(_)));
        // Wiped and made again (what a restore or `rm -rf` and a restart of
        // something else would leave).
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("node");
        let store = ShardStore::open(&dir).unwrap();
        store.check_identity().unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert!(changed(&store), "directory gone");
        fs::create_dir_all(dir.join(SHARDS_DIR)).unwrap();
        assert!(changed(&store), "another directory");
        // Shards wiped, the rest left.
        let dir = parent.path().join("node2");
        let store = ShardStore::open(&dir).unwrap();
        let before = store.disk_uuid();
        fs::remove_dir_all(dir.join(SHARDS_DIR)).unwrap();
        assert!(changed(&store), "shards directory gone");
        // Restarted on what is left, its disk.uuid kept: a new identity
        // all the same, so the gateway re-checks what it placed here.
        drop(store);
        let store = ShardStore::open(&dir).unwrap();
        assert_ne!(store.disk_uuid(), before, "shards gone, identity kept");
        let again = store.disk_uuid();
        drop(store);
        assert_eq!(
            ShardStore::open(&dir).unwrap().disk_uuid(),
            again,
            "renewed once, not at every start"
        );
        // The same for the segments small shards are packed into.
        let store = ShardStore::open(&dir).unwrap();
        fs::remove_dir_all(dir.join(crate::segments::SEGMENTS_DIR)).unwrap();
        drop(store);
        assert_ne!(ShardStore::open(&dir).unwrap().disk_uuid(), again);
        // Another disk's identity written over this one's.
        let dir = parent.path().join("node3");
        let store = ShardStore::open(&dir).unwrap();
        fs::write(
            dir.join(DISK_UUID_FILE),
            format!("{}\n", uuid::Uuid::now_v7()),
        )
        .unwrap();
        assert!(changed(&store), "another disk.uuid");
        // Reopened on what is there now, it is itself again.
        drop(store);
        ShardStore::open(&dir).unwrap().check_identity().unwrap();
    }

    #[test]
    fn private_files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.key");
        fs::write(&path, b"old").unwrap();
        write_private(&path, b"secret").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"secret");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        write_durably(dir.path(), "plain", &[b"a", b"b"]).unwrap();
        assert_eq!(fs::read(dir.path().join("plain")).unwrap(), b"ab");
    }

    #[test]
    fn large_files_written_past_the_page_cache_read_back_exactly() {
        // On this disk (O_DIRECT), and on tmpfs where the machine has one
        // (which refuses O_DIRECT before Linux 6.6: the page-cache fallback).
        let disk = tempfile::tempdir().unwrap();
        let shm = Path::new("/dev/shm");
        let tmpfs = shm
            .is_dir()
            .then(|| tempfile::tempdir_in(shm).ok())
            .flatten();
        for dir in std::iter::once(&disk).chain(tmpfs.as_ref()) {
            // Files (4-byte head + body) just under and at the threshold,
            // of odd lengths, of a whole number of blocks, and of several
            // staging chunks.
            for len in [
                DIRECT_MIN - 5,
                DIRECT_MIN - 4,
                DIRECT_MIN + 4097,
                4 * DIRECT_ALIGN - 4,
                2 * DIRECT_CHUNK + 3,
                DIRECT_CHUNK - 4,
            ] {
                let body: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
                write_durably(dir.path(), "big", &[b"head", &body]).unwrap();
                let back = fs::read(dir.path().join("big")).unwrap();
                assert_eq!(back.len(), 4 + len, "{}", dir.path().display());
                assert!(back[..4] == *b"head" && back[4..] == body[..]);
            }
            let names: Vec<_> = fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, ["big"], "no temporary file left behind");
        }
    }

    proptest::proptest! {
        // Each case fsyncs; a few dozen cover the sizes without a slow suite.
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
        #[test]
        fn any_body_within_the_shard_size_round_trips(len in 0usize..=SHARD_SIZE as usize, seed: u8) {
            let dir = tempfile::tempdir().unwrap();
            let store = ShardStore::open(dir.path()).unwrap();
            let b: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect();
            let k = key(seed);
            store.put(&header(k, &b), &b).unwrap();
            proptest::prop_assert_eq!(store.get(&k).unwrap().1, b);
        }
    }
}
