//! Segments: small shards packed into append-only files with group commit.
//!
//! A file per shard costs two fsyncs (file and directory) per shard, and a
//! 4 KiB object is k+m shards: thousands of small filings a second would be
//! tens of thousands of fsyncs. Shards up to [`crate::store::StoreConfig`]'s
//! `small_shard_max` bytes are appended instead to the node's *active segment*
//! (`segments/seg-<id>`, 16 hex digits), and every put waits until an fsync
//! covers its record. Whoever finds no fsync running starts one for everything
//! appended so far, so one fsync acknowledges every put that arrived while the
//! previous one ran (group commit); a put is still acknowledged only once it is
//! durable.
//!
//! A segment is a header and a sequence of records:
//!
//! ```text
//! "CSTDSGH1" | key [32]                                    the segment header
//! "CSTDSEG1" | kind u8 | head length u16 LE | body length u32 LE | check [16] | head | body
//! ```
//!
//! `check` is the first 16 bytes of BLAKE3, keyed with the segment's random
//! key, over the kind, both lengths and the head: a damaged head is never
//! read as another shard's name, and bytes a client put in a shard body can
//! never pass for a record, even to a scan resynchronising after damage (the
//! key never leaves the node). A shard
//! record (`kind` 1) has the shard's encoded [`ShardHeader`] as head and the
//! body, whose BLAKE3 is in that header: segments are self-describing like
//! shard files, and the index can be rebuilt from them. A delete record
//! (`kind` 2) has a [`Tombstone`] head and no body.
//!
//! Records are appended, and only one thing is ever rewritten in place: the
//! body of a shard record once it is dead (deleted, replaced, or a torn
//! copy) is overwritten with zeros, after whatever made it dead is durable.
//! A deleted shard's bytes (an expunged one's above all) do not linger in a
//! segment until compaction removes it, which may be never for a segment
//! that stays mostly live. Its frame and head stay as they were (the
//! frame's check does not cover the body), so a write torn by a crash
//! leaves at worst part of the body unerased, never a record a scan cannot
//! find: an open erases again every dead record whose body is not all
//! zeros. The zeros are fsynced when an erase asks for it
//! ([`SegmentLog::sync_erasures`]). At open the node reads every segment in
//! order (segment id, then offset), so the last record for a key wins, and
//! starts a fresh active segment. A damaged record is skipped, the scan
//! resuming at the next record magic. In the last segment (the one an
//! earlier run appended to, unsynced when it stopped) that and a torn
//! record at its end are what a crash mid-append leaves, never
//! acknowledged, and are mended at once: cut off at the end, otherwise
//! overwritten with a filler record (`kind` 3) of zeros; unless it lies
//! before the segment's durable mark (`kind` 4 records: each fsync round
//! appends the offset the round before made durable), where the records
//! were acknowledged. That damage, and any in an earlier segment (made
//! durable whole before a later one was made, so everything in it was
//! acknowledged), lost shards no one can name: the store renews the disk's
//! identity (the gateway re-checks everything it placed there), and only
//! then mends it ([`SegmentLog::mend_damage`]). Space of replaced and deleted
//! shards is reclaimed by compaction (`ShardStore::compact`), which copies the
//! live records of a mostly-dead sealed segment to the active segment, fsyncs,
//! and only then removes it. A tombstone is copied too while it may still hide
//! something: all records of its key are in segments up to the one holding the
//! record it deleted (a record only ever moves forward while it is the newest),
//! so it is kept while any such segment exists and its key has no newer record.
//! A segment removed by compaction takes its records with it as a deleted
//! shard file does (unlinked, the directory fsynced): an erasure still owed
//! in it (one that failed, or whose zeros were not yet fsynced) is done then,
//! since no file holds those bytes any more.
//!
//! Every put, delete and copy of one key runs under that key's lock in the
//! store, so records of one key reach a segment in the order they happened.
//! The in-memory index costs about 100 bytes per small shard; a node with
//! hundreds of millions of them would want it on disk (a later change).

use protocol::{EvidenceId, ShardHeader, ShardKey};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

pub(crate) const SEGMENTS_DIR: &str = "segments";
const MAGIC: &[u8; 8] = b"CSTDSEG1";
/// First bytes of every segment file, before its key.
const HEADER_MAGIC: &[u8; 8] = b"CSTDSGH1";
/// The segment header: magic and the key of its record checks.
const HEADER_LEN: usize = 8 + 32;
const KIND_SHARD: u8 = 1;
const KIND_DELETE: u8 = 2;
/// Filler over a stretch an open found damaged in a sealed segment, once
/// that was reported: no head, a body of zeros.
const KIND_PAD: u8 = 3;
/// A durable mark: the head is the offset (u64 LE) up to which the segment
/// was durable (an fsync had returned) when the record was written. Each
/// fsync round of the active segment appends one, naming the last round's
/// mark, just before it syncs: whoever finds the record knows everything
/// before that offset was acknowledged, even if the record itself never
/// became durable.
const KIND_DURABLE: u8 = 4;
/// Bytes before the head: magic, kind, two lengths, check.
const FRAME: usize = 8 + 1 + 2 + 4 + 16;
/// A segment is sealed once it reaches this size.
const SEGMENT_TARGET: u64 = 64 << 20;
/// The longest a segment can be: sealed past its target by one record at
/// most, itself no longer than a shard file. A segment file longer than
/// this (its size damaged, or not a segment) is never read whole: its
/// length would be an allocation of any size.
pub(crate) const MAX_SEGMENT_FILE: u64 = SEGMENT_TARGET + 2 * crate::store::MAX_SHARD_FILE;
/// Version byte of the tombstone encoding.
const TOMBSTONE_V1: u8 = 1;

/// What compacting a segment must keep: its current shard records, and the
/// tombstones that still hide an older record.
pub(crate) type Survivors = (Vec<(ShardKey, Loc)>, Vec<Tombstone>);

/// Where a shard record lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Loc {
    pub seg: u64,
    pub off: u64,
    /// Length of the whole record, frame included.
    pub len: u32,
}

impl Loc {
    /// Where the record ends in its segment.
    pub fn end(&self) -> u64 {
        self.off + u64::from(self.len)
    }
}

/// The head of a delete record: which key, and a bound: every record of the
/// key written before the delete (indexed or not: a copy whose fsync failed
/// may still be on disk) is in a segment no newer than `segment`, the active
/// one when the delete was made. Once no such segment is left, the tombstone
/// hides nothing and compaction drops it.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
pub(crate) struct Tombstone {
    pub key: ShardKey,
    pub segment: u64,
}

/// The key of a segment's record checks.
type SegKey = [u8; 32];

fn encode_record(key: &SegKey, kind: u8, head: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME + head.len() + body.len());
    out.extend_from_slice(MAGIC);
    out.push(kind);
    out.extend_from_slice(&(head.len() as u16).to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&check(key, kind, head.len(), body.len(), head));
    out.extend_from_slice(head);
    out.extend_from_slice(body);
    out
}

fn check(key: &SegKey, kind: u8, head_len: usize, body_len: usize, head: &[u8]) -> [u8; 16] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(&[kind]);
    h.update(&(head_len as u16).to_le_bytes());
    h.update(&(body_len as u32).to_le_bytes());
    h.update(head);
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

/// A record's frame, checked: kind, head length, body length.
fn parse_frame(key: &SegKey, bytes: &[u8]) -> Option<(u8, usize, usize)> {
    let frame = bytes.get(..FRAME)?;
    if &frame[..8] != MAGIC {
        return None;
    }
    let kind = frame[8];
    let head_len = u16::from_le_bytes([frame[9], frame[10]]) as usize;
    let body_len = u32::from_le_bytes([frame[11], frame[12], frame[13], frame[14]]) as usize;
    let head = bytes.get(FRAME..FRAME + head_len)?;
    if frame[15..FRAME] != check(key, kind, head_len, body_len, head) {
        return None;
    }
    Some((kind, head_len, body_len))
}

/// What a stored shard record holds.
pub(crate) enum ReadRecord {
    Shard(ShardHeader, Vec<u8>),
    /// The record no longer reads back as a shard named `key` (the reason).
    Damaged(&'static str, Vec<u8>),
}

struct Active {
    id: u64,
    key: SegKey,
    /// `None` until the segment could be created: a node started on a full
    /// disk serves what it holds, and creates its active segment at the
    /// first append (which fails while the disk stays full).
    file: Option<Arc<File>>,
    len: u64,
}

#[derive(Default)]
struct SyncState {
    /// Everything before (segment, offset) is durable.
    durable: (u64, u64),
    /// A thread is fsyncing.
    leader: bool,
    /// Segments whose fsync failed: nothing more of them is acknowledged.
    failed: std::collections::BTreeSet<u64>,
}

struct SegStat {
    key: SegKey,
    file: Arc<File>,
    /// Length when sealed (the active segment's grows).
    len: u64,
    /// Bytes of records that are the current copy of their key.
    live: u64,
    /// Bytes of tombstones, and the highest segment any of them may hide
    /// a record in (its `segment` bound): while a segment that old or
    /// older is left, they may still be needed, and count as live for
    /// [`SegmentLog::compaction_candidate`]. (Compacting a segment of
    /// needed tombstones only copies them to the next: a node that deletes
    /// much while an old segment stays would rewrite them for ever.)
    tombstones: u64,
    tombstone_bound: u64,
    /// Records appended here whose writer has not yet indexed them (or
    /// given up): while any are, the segment must not be compacted away.
    /// Counted under the index's read lock (only the active segment gains
    /// any, and only sealed ones are dropped, under the write lock).
    pending: AtomicU64,
}

impl SegStat {
    /// A segment just created, as the index counts it.
    fn fresh(key: SegKey, file: &Arc<File>) -> SegStat {
        SegStat {
            key,
            file: file.clone(),
            len: HEADER_LEN as u64,
            live: 0,
            tombstones: 0,
            tombstone_bound: 0,
            pending: AtomicU64::new(0),
        }
    }
}

#[derive(Default)]
struct Index {
    /// Keyed like the shard tree's listing order: fan-out byte, then key.
    entries: BTreeMap<(u8, ShardKey), Loc>,
    segments: BTreeMap<u64, SegStat>,
}

/// Usage of the small shards, as the store counts it.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub(crate) struct LogUsage {
    pub shards: u64,
    pub live_bytes: u64,
    pub file_bytes: u64,
    /// Segment fsyncs so far: with `shards` written, the group commit's gain.
    pub syncs: u64,
}

fn fanout_key(key: &ShardKey) -> (u8, ShardKey) {
    (key.evidence.0[15], *key)
}

fn segment_name(id: u64) -> String {
    format!("seg-{id:016x}")
}

/// By segment: each record erased there since its last fsync, the
/// evidence it held, and whether an fsync of the segment had failed
/// before (see `SegmentLog::unsynced_erasures`).
type UnsyncedErasures = BTreeMap<u64, Vec<(Loc, EvidenceId, bool)>>;

/// The segments of one data directory.
pub(crate) struct SegmentLog {
    dir: PathBuf,
    active: Mutex<Active>,
    sync: Mutex<SyncState>,
    synced: Condvar,
    index: RwLock<Index>,
    syncs: AtomicU64,
    /// Segments compaction passes over (see [`SegmentLog::skip_compaction`]).
    stuck: Mutex<std::collections::BTreeSet<u64>>,
    /// Segments whose tombstones a compaction copied forward (durably) in
    /// this process: tried again (one that could not be dropped), it does
    /// not copy them once more. Without this, each retry of a segment held
    /// by a damaged record appended all its tombstones again.
    carried: Mutex<std::collections::BTreeSet<u64>>,
    /// See [`SegmentLog::damaged_segments`].
    damaged: Vec<u64>,
    /// See [`SegmentLog::damage_to_mend`].
    to_mend: Mutex<Vec<(u64, Mend)>>,
    /// Segments with records erased since their last fsync, and those
    /// records: if the fsync fails, the kernel may have dropped the zeros
    /// (and the next fsync "succeed"), so they are written again.
    /// Each with the evidence it held, so a failure fails only that
    /// evidence's expunges, and whether it was written after an fsync of
    /// its segment had failed (one written before may have been dropped by
    /// that failure, whoever's fsync met it: it is written again).
    unsynced_erasures: Mutex<UnsyncedErasures>,
    /// Held through [`SegmentLog::sync_erasures`].
    erasure_sync: Mutex<()>,
    /// Held through every fsync of a segment and the recording of its
    /// outcome: Linux reports a writeback error to one fsync of a file
    /// only, so of two at once the other could "succeed" and mark durable
    /// appends whose pages were dropped.
    fsync: Mutex<()>,
    /// Dead records whose erasure failed (a full copy-on-write file system,
    /// a disk error), tried again by [`SegmentLog::sync_erasures`], with
    /// the evidence each held.
    unerased: Mutex<Vec<(Loc, EvidenceId)>>,
    /// Dead records an open found still holding a shard's bytes, not yet
    /// erased: [`SegmentLog::sync_erasures`] fsyncs every segment before it
    /// erases them (erased first, a crash could lose both a shard and its
    /// only later copy).
    dead_at_open: Mutex<Vec<(Loc, EvidenceId)>>,
    /// Records appended whose fsync failed: never indexed (the put failed),
    /// yet on the disk, where the next open may find them. Their bodies are
    /// erased at once, at best effort only (nothing can make a write to a
    /// segment whose fsync failed durable), and a delete of the key writes
    /// a durable tombstone for them though nothing is indexed, so a shard
    /// deleted or expunged later is not served again after a restart.
    failed_puts: Mutex<Vec<(ShardKey, Loc)>>,
}

impl SegmentLog {
    /// Opens `root/segments`, indexing every record, and starts a new active
    /// segment after the last.
    pub fn open(root: &Path) -> io::Result<SegmentLog> {
        let dir = root.join(SEGMENTS_DIR);
        crate::store::create_dir_durably(&dir)?;
        let mut ids = Vec::new();
        for entry in fs::read_dir(&dir)? {
            let name = entry?.file_name();
            // Only canonical names: `seg-1` beside `seg-0000000000000001`
            // would otherwise be the same segment twice.
            match name
                .to_str()
                .and_then(|n| n.strip_prefix("seg-"))
                .and_then(|hex| u64::from_str_radix(hex, 16).ok())
                .filter(|id| name.to_str() == Some(segment_name(*id).as_str()))
            {
                Some(id) => ids.push(id),
                None => tracing::warn!(file = ?name, "unexpected file among segments"),
            }
        }
        ids.sort_unstable();
        let mut index = Index::default();
        let mut damaged = Vec::new();
        // Records found dead (replaced, deleted, torn copies) that still hold
        // a shard's bytes: a crash came before they were erased.
        let mut dead = Dead::default();
        let mut to_mend = Vec::new();
        // The last segment whose file begins with a whole header: only
        // files after it can be creations cut short (segments are made in
        // order, each after the one before was made durable).
        let last_headed = ids
            .iter()
            .rev()
            .find(|&&id| {
                let mut header = [0u8; HEADER_LEN];
                File::open(dir.join(segment_name(id)))
                    .and_then(|f| f.read_exact_at(&mut header, 0))
                    .is_ok_and(|()| segment_key(&header).is_some())
            })
            .copied();
        for &id in &ids {
            // A segment the disk cannot read (a bad sector anywhere in it)
            // is treated like one whose header is damaged: not served, left
            // for forensics; the node starts and serves everything else.
            // A read error is tried twice more before the segment is taken
            // out of service (and the disk's identity renewed): one that
            // passes must not cost every shard in it a rebuild.
            let path = dir.join(segment_name(id));
            if fs::metadata(&path).is_ok_and(|m| m.len() > MAX_SEGMENT_FILE) {
                tracing::error!(
                    segment = id,
                    max = MAX_SEGMENT_FILE,
                    "this segment is longer than any segment can be (its size damaged?); its \
                     shards are not served"
                );
                damaged.push(id);
                continue;
            }
            let media = crate::store::is_media_error;
            let mut read = fs::read(&path);
            for _ in 0..2 {
                match &read {
                    Err(e) if media(e) => read = fs::read(&path),
                    _ => break,
                }
            }
            let bytes = match read {
                Ok(bytes) => bytes,
                // (Or not a file at all: a directory under its name.)
                Err(e) if crate::store::is_broken_file(&e) => {
                    tracing::error!(
                        segment = id,
                        error = %e,
                        "the disk cannot read this segment; its shards are not served"
                    );
                    damaged.push(id);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let after_headed = last_headed.is_none_or(|l| id > l);
            if after_headed && bytes.len() <= HEADER_LEN && segment_key(&bytes).is_none() {
                // No whole header: a creation cut short (a crash before the
                // header was durable, a full disk). Records follow only a
                // header made durable, so it never held one. Only segments
                // after every one with a whole header can be one (segments
                // are made in order); an earlier one so short has lost what
                // it held (truncated by a file system repair, say): it is
                // taken for damaged below, never quietly removed.
                tracing::warn!(
                    segment = id,
                    len = bytes.len(),
                    "removing a segment file without a header (its creation was cut short)"
                );
                if let Err(e) = fs::remove_file(dir.join(segment_name(id))) {
                    tracing::warn!(segment = id, error = %e, "could not remove it; passing over it");
                }
                continue;
            }
            let Some(key) = segment_key(&bytes) else {
                // Its records cannot be checked: leave the file for
                // forensics, serve nothing from it (repair rebuilds what it
                // held from the other shards) and never reuse its id.
                tracing::error!(
                    segment = id,
                    "segment header unreadable; its shards are not served"
                );
                damaged.push(id);
                continue;
            };
            // Writable: dead records are erased in place.
            let file = Arc::new(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(dir.join(segment_name(id)))?,
            );
            index.segments.insert(
                id,
                SegStat {
                    key,
                    file: file.clone(),
                    len: bytes.len() as u64,
                    live: 0,
                    tombstones: 0,
                    tombstone_bound: 0,
                    pending: AtomicU64::new(0),
                },
            );
            let mut skipped = Vec::new();
            let mut durable = HEADER_LEN as u64;
            let torn = scan_segment(
                id,
                &key,
                &bytes,
                (&mut index, &mut dead),
                &mut skipped,
                &mut durable,
            );
            // A segment with a later one beside it was made durable whole
            // before that one was made (by the seal that made it, or by the
            // open that mended what a crash left in it, then made the next:
            // either way, the last segment file is the only one an earlier
            // run appended to unsynced). A stretch of it no longer read as
            // records, or a record it ends in cut short, held acknowledged
            // shards this open cannot name. Mended (cut off or padded with
            // zeros) only once the store has reported it
            // ([`SegmentLog::mend_damage`]), so a crash before that finds
            // it again.
            let len = bytes.len() as u64;
            let last = ids.last().is_none_or(|&last| id == last);
            // In the last segment, only what lies past its durable mark is a
            // crash's leftovers; before it, the records were acknowledged.
            let (leftovers, acknowledged): (Vec<_>, Vec<_>) = skipped
                .into_iter()
                .partition(|&(start, _)| last && start >= durable);
            to_mend.extend(
                acknowledged
                    .into_iter()
                    .map(|(start, end)| (id, Mend::of(start, end, len))),
            );
            let mends: Vec<Mend> = leftovers
                .into_iter()
                .map(|(start, end)| Mend::of(start, end, len))
                .chain(torn.map(Mend::Cut))
                .collect();
            if !last {
                to_mend.extend(mends.into_iter().map(|m| (id, m)));
                continue;
            }
            // The last segment's damage is what a crash mid-append leaves,
            // never acknowledged: a torn record at its end, or stretches
            // never written whose later pages were. Mended now, unreported
            // (left, it would pass for a sealed segment's damage once the
            // segment this open makes follows it). A torn record cut off
            // goes with its part of a shard's body, which would otherwise
            // outlive any expunge of that evidence (one erases only records
            // it finds). Made durable whole now, mended or not, before the
            // segment this open makes follows it (what a killed process
            // wrote unsynced is in the page cache, not yet on the disk).
            let mended = mends
                .iter()
                .try_for_each(|m| m.apply(&file, &key))
                .and_then(|()| file.sync_all());
            match mended {
                Ok(()) if mends.is_empty() => {}
                Ok(()) => {
                    tracing::warn!(segment = id, mends = ?mends, "mended what a crash left in the last segment");
                    if let (Some(s), Some(cut)) =
                        (index.segments.get_mut(&id), Mend::cut_at(&mends))
                    {
                        s.len = cut;
                    }
                }
                Err(e) => {
                    tracing::warn!(segment = id, error = %e, "could not mend what a crash left in the last segment; it stays on the disk");
                }
            }
        }
        let next = match ids.last() {
            None => 1,
            Some(id) => id
                .checked_add(1)
                .ok_or_else(|| io::Error::other("segment ids exhausted"))?,
        };
        let active = match create_segment(&dir, next) {
            Ok((active, stat)) => {
                index.segments.insert(next, stat);
                active
            }
            // Not even a segment header fits: start anyway, to serve every
            // shard there is (the disk filled up under the node, by others'
            // files or its logs); small puts fail as a full disk's do until
            // there is room.
            Err(e) if crate::store::is_disk_full(&e) => {
                tracing::warn!(
                    segment = next,
                    "no room for a new segment on this disk: serving what it holds, \
                     taking no small shards until there is room"
                );
                Active {
                    id: next,
                    key: rand::random(),
                    file: None,
                    len: HEADER_LEN as u64,
                }
            }
            Err(e) => return Err(e),
        };
        let log = SegmentLog {
            dir,
            active: Mutex::new(active),
            sync: Mutex::new(SyncState {
                durable: (next, HEADER_LEN as u64),
                ..SyncState::default()
            }),
            synced: Condvar::new(),
            index: RwLock::new(index),
            syncs: AtomicU64::new(0),
            stuck: Mutex::default(),
            carried: Mutex::default(),
            damaged,
            to_mend: Mutex::new(to_mend),
            unsynced_erasures: Mutex::default(),
            erasure_sync: Mutex::default(),
            fsync: Mutex::default(),
            unerased: Mutex::default(),
            dead_at_open: Mutex::new(dead.erase),
            failed_puts: Mutex::default(),
        };
        // Records found dead that still hold a shard's bytes (a crash came
        // before they were erased) go now, as any erasure does: every
        // segment fsynced first, so what made them dead is durable. One
        // that cannot is kept, and fails its evidence's expunges until it
        // is erased.
        let found = lock(&log.dead_at_open).len();
        match log.sync_erasures(None) {
            Ok(()) if found > 0 => tracing::info!(
                records = found,
                "erased dead shard records an earlier run left in segments"
            ),
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(error = %e, "dead shard records an earlier run left stay unerased for now")
            }
        }
        Ok(log)
    }

    /// Segments found unreadable at open (a bad sector, a damaged header):
    /// nothing of them is served, and which shards they held is unknown.
    pub fn damaged_segments(&self) -> &[u64] {
        &self.damaged
    }

    /// How many stretches of sealed segments the open could not read as
    /// records (damaged, or cut short at the end): each held acknowledged
    /// shards no one can name, so the disk must take a new identity (the
    /// gateway then re-checks every shard it placed here) before they are
    /// mended ([`Self::mend_damage`]). Otherwise those shards would be
    /// gone without a word: scrub walks only what is indexed.
    pub fn damage_to_mend(&self) -> usize {
        lock(&self.to_mend).len()
    }

    /// Mends the stretches [`Self::damage_to_mend`] counts, once reported:
    /// one running to the end is cut off, any other is overwritten with a
    /// filler record of zeros (whatever evidence bytes it held go with it,
    /// out of reach of an expunge otherwise), so the next open finds
    /// nothing to report again. Durable when it returns.
    pub fn mend_damage(&self) -> io::Result<()> {
        let mut to_mend = lock(&self.to_mend);
        let mut segments = std::collections::BTreeSet::new();
        for &(seg, mend) in to_mend.iter() {
            let mut index = self.write_index();
            let Some(stat) = index.segments.get_mut(&seg) else {
                continue;
            };
            if mend == Mend::Leave {
                tracing::error!(
                    segment = seg,
                    "a damaged stretch too short to mend stays: it is reported at every start"
                );
                continue;
            }
            mend.apply(&stat.file, &stat.key)?;
            if let Some(cut) = Mend::cut_at(&[mend]) {
                stat.len = stat.len.min(cut);
            }
            segments.insert(seg);
        }
        for seg in segments {
            if let Some(stat) = self.read_index().segments.get(&seg) {
                stat.file.sync_all()?;
            }
            tracing::warn!(
                segment = seg,
                "mended the damage found in this sealed segment"
            );
        }
        to_mend.clear();
        Ok(())
    }

    /// The file of segment `id`.
    pub fn segment_path(&self, id: u64) -> PathBuf {
        self.dir.join(segment_name(id))
    }

    /// Counts of what the segments hold.
    pub fn usage(&self) -> LogUsage {
        // Lock order: the active segment before the index (as `seal`).
        let (active_id, active_len) = {
            let a = lock(&self.active);
            (a.id, a.len)
        };
        let index = self.read_index();
        LogUsage {
            shards: index.entries.len() as u64,
            live_bytes: index.segments.values().map(|s| s.live).sum(),
            file_bytes: index
                .segments
                .iter()
                .map(|(&id, s)| if id == active_id { active_len } else { s.len })
                .sum(),
            syncs: self.syncs.load(Ordering::Relaxed),
        }
    }

    /// Where `key`'s record is, if it is in a segment.
    pub fn locate(&self, key: &ShardKey) -> Option<Loc> {
        self.read_index().entries.get(&fanout_key(key)).copied()
    }

    /// The keys in segments with fan-out byte `fanout`, in order.
    pub fn keys_in(&self, fanout: u8) -> Vec<ShardKey> {
        let index = self.read_index();
        let lo = (
            fanout,
            ShardKey {
                evidence: protocol::EvidenceId([0; 16]),
                stripe: 0,
                index: 0,
            },
        );
        index
            .entries
            .range(lo..)
            .take_while(|((f, _), _)| *f == fanout)
            .map(|((_, k), _)| *k)
            .collect()
    }

    /// Reads the record at `loc` and checks it is a whole shard named `key`
    /// (the body against its header's BLAKE3 too, unless `head_only`).
    pub fn read(&self, key: &ShardKey, loc: Loc, head_only: bool) -> io::Result<ReadRecord> {
        self.read_record(key, loc, head_only, false)
    }

    /// [`read`](Self::read) of a whole record from the page cache alone:
    /// `Err(WouldBlock)` rather than wait for the disk (a page evicted, a
    /// failing sector retried for seconds), for a caller on an async
    /// thread that must not stall every connection it serves.
    pub fn read_cached(&self, key: &ShardKey, loc: Loc) -> io::Result<ReadRecord> {
        self.read_record(key, loc, false, true)
    }

    fn read_record(
        &self,
        key: &ShardKey,
        loc: Loc,
        head_only: bool,
        cached_only: bool,
    ) -> io::Result<ReadRecord> {
        let (file, seg_key) = match self.read_index().segments.get(&loc.seg) {
            Some(s) => (s.file.clone(), s.key),
            None => return Err(io::ErrorKind::NotFound.into()),
        };
        let want = if head_only {
            (FRAME + protocol::shard::MAX_HEADER_LEN).min(loc.len as usize)
        } else {
            loc.len as usize
        };
        let mut bytes = vec![0u8; want];
        if cached_only {
            // RWF_NOWAIT: EAGAIN, or a short read, where a page is not in
            // the cache (EOPNOTSUPP on kernels before 4.14).
            let n = rustix::io::preadv2(
                &*file,
                &mut [io::IoSliceMut::new(&mut bytes)],
                loc.off,
                rustix::io::ReadWriteFlags::NOWAIT,
            )
            .map_err(io::Error::from)?;
            if n != want {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        } else {
            #[cfg(test)]
            if tests::READS_FAIL.with(|f| f.replace(f.get().saturating_sub(1))) > 0 {
                return Err(io::Error::from_raw_os_error(
                    rustix::io::Errno::IO.raw_os_error(),
                ));
            }
            file.read_exact_at(&mut bytes, loc.off)?;
        }
        let Some((kind, head_len, body_len)) = parse_frame(&seg_key, &bytes) else {
            return Ok(ReadRecord::Damaged("record frame fails its check", bytes));
        };
        if kind != KIND_SHARD || FRAME + head_len + body_len != loc.len as usize {
            return Ok(ReadRecord::Damaged(
                "record is not the shard indexed",
                bytes,
            ));
        }
        let header = match ShardHeader::decode(&bytes[FRAME..FRAME + head_len]) {
            Ok(h) if h.key == *key && h.len as usize == body_len => h,
            _ => return Ok(ReadRecord::Damaged("header names another shard", bytes)),
        };
        if head_only {
            return Ok(ReadRecord::Shard(header, Vec::new()));
        }
        let body = bytes[FRAME + head_len..].to_vec();
        if !header.matches(&body) {
            return Ok(ReadRecord::Damaged(
                "body does not match its header's length or BLAKE3",
                bytes,
            ));
        }
        Ok(ReadRecord::Shard(header, body))
    }

    /// Drops the page cache's copy of the record at `loc` (its clean pages,
    /// and so its neighbours' on the same pages), so that the next read of
    /// it comes from the disk: what scrub checks is the copy that lasts.
    pub fn drop_cached(&self, loc: Loc) {
        let Some(file) = self
            .read_index()
            .segments
            .get(&loc.seg)
            .map(|s| s.file.clone())
        else {
            return;
        };
        drop_cached_pages(&file, loc.off, Some(u64::from(loc.len)));
    }

    /// Appends `header` and `body` and waits until they are durable; returns
    /// the record this one replaced. The caller holds the key's lock.
    pub fn put(&self, header: &ShardHeader, body: &[u8]) -> io::Result<(Loc, Option<Loc>)> {
        let (seg, off, len, pending) = self.append(KIND_SHARD, &header.encode(), body)?;
        let loc = Loc { seg, off, len };
        if let Err(e) = self.wait_durable(seg, off + len as u64) {
            lock(&self.failed_puts).push((header.key, loc));
            // Erased as any dead record, so an expunge of its evidence waits
            // until the zeros are durable (a failed segment is fsynced on
            // its own then, and a failure there fails only that evidence's
            // expunges).
            self.erase(loc, header.key.evidence);
            drop(pending);
            return Err(e);
        }
        // A later record of the key wins at every open: a failed put of it
        // is dead now.
        {
            let mut failed = lock(&self.failed_puts);
            if !failed.is_empty() {
                failed.retain(|(k, _)| *k != header.key);
            }
        }
        let mut index = self.write_index();
        let old = index.entries.insert(fanout_key(&header.key), loc);
        index.add_live(seg, loc.len as i64);
        if let Some(old) = old {
            index.add_live(old.seg, -(old.len as i64));
        }
        drop(index);
        drop(pending);
        if let Some(old) = old {
            self.erase(old, header.key.evidence);
        }
        Ok((loc, old))
    }

    /// Durably deletes `key` if its record is still `expect` (any record when
    /// `None`); returns the record deleted. The caller holds the key's lock.
    ///
    /// The record leaves the index as its tombstone is appended, before
    /// the tombstone is durable: a read, stat or verify meanwhile finds
    /// nothing, as after the delete. A fenced delete (see
    /// `protocol::Request::DeleteShardBefore`) is so seen within its fence,
    /// however long the fsync takes (a busy disk's group commit), not once
    /// another gateway may have counted the shard. A tombstone that cannot
    /// be made durable fails the delete with the record still out of the
    /// index: it may be on the disk, and a restart would honour it, so the
    /// shard is served no more either way (what asked for the delete
    /// wanted it gone, and is told to ask again: the record is kept with
    /// the failed puts', for the next delete of its key to bury).
    pub fn delete(&self, key: &ShardKey, expect: Option<Loc>) -> io::Result<Option<Loc>> {
        let Some(loc) = self.locate(key) else {
            if expect.is_none() && lock(&self.failed_puts).iter().any(|(k, _)| k == key) {
                self.bury(key)?;
            }
            return Ok(None);
        };
        if expect.is_some_and(|e| e != loc) {
            return Ok(None);
        }
        // Every record of the key so far is in this segment or an older one.
        let bound = lock(&self.active).id;
        let (seg, off, len, pending) = self.append_tombstone(&Tombstone {
            key: *key,
            segment: bound,
        })?;
        {
            let mut index = self.write_index();
            if index.entries.get(&fanout_key(key)) == Some(&loc) {
                index.entries.remove(&fanout_key(key));
                index.add_live(loc.seg, -(loc.len as i64));
            }
        }
        if let Err(e) = self.wait_durable(seg, off + len as u64) {
            // Kept as a failed put's record is: a delete asked again (an
            // expunge's too) finds it there and buries it durably, where it
            // would otherwise find nothing and say done, and a restart
            // that lost the tombstone would serve the shard again.
            lock(&self.failed_puts).push((*key, loc));
            return Err(e);
        }
        // The tombstone covers any failed put of the key too.
        lock(&self.failed_puts).retain(|(k, _)| k != key);
        drop(pending);
        self.erase(loc, key.evidence);
        Ok(Some(loc))
    }

    /// Durably appends a tombstone for `key`, which has nothing indexed but
    /// records of failed puts on the disk, and forgets those.
    fn bury(&self, key: &ShardKey) -> io::Result<()> {
        let bound = lock(&self.active).id;
        let (seg, off, len, pending) = self.append_tombstone(&Tombstone {
            key: *key,
            segment: bound,
        })?;
        self.wait_durable(seg, off + len as u64)?;
        drop(pending);
        let dead: Vec<Loc> = {
            let mut failed = lock(&self.failed_puts);
            let dead = failed
                .iter()
                .filter(|(k, _)| k == key)
                .map(|(_, loc)| *loc)
                .collect();
            failed.retain(|(k, _)| k != key);
            dead
        };
        // Now dead for good: a delete whose tombstone failed left its
        // record's bytes (a failed put's were erased as it failed, and are
        // zeroed again, harmlessly); an expunge syncs the erasure.
        for loc in dead {
            self.erase(loc, key.evidence);
        }
        Ok(())
    }

    /// Keys of `evidence` with records of failed puts on the disk (see
    /// `failed_puts`): an expunge deletes them too.
    pub fn failed_puts_of(&self, evidence: protocol::EvidenceId) -> Vec<ShardKey> {
        lock(&self.failed_puts)
            .iter()
            .filter(|(k, _)| k.evidence == evidence)
            .map(|(k, _)| *k)
            .collect()
    }

    /// Erases the dead shard record at `loc` (see [`erase_at`]), a shard of
    /// `evidence`, once what made it dead is durable. One that fails is kept
    /// to be tried again by [`Self::sync_erasures`] (and found again by the
    /// next open).
    pub fn erase(&self, loc: Loc, evidence: EvidenceId) {
        let Some((file, key)) = self
            .read_index()
            .segments
            .get(&loc.seg)
            .map(|s| (s.file.clone(), s.key))
        else {
            // Compacted away: its file is gone.
            return;
        };
        let after_failure = lock(&self.sync).failed.contains(&loc.seg);
        #[cfg(test)]
        let result = match tests::ERASE_FAILS.with(std::cell::Cell::get) == Some(evidence) {
            true => Err(io::Error::from_raw_os_error(
                rustix::io::Errno::IO.raw_os_error(),
            )),
            false => erase_at(&file, &key, loc),
        };
        #[cfg(not(test))]
        let result = erase_at(&file, &key, loc);
        match result {
            Ok(()) => {
                lock(&self.unsynced_erasures)
                    .entry(loc.seg)
                    .or_default()
                    .push((loc, evidence, after_failure));
            }
            Err(e) => {
                tracing::warn!(segment = loc.seg, offset = loc.off, %evidence, error = %e, "could not erase a dead record; trying again later");
                lock(&self.unerased).push((loc, evidence));
            }
        }
    }

    /// Makes every erase so far durable: tries again those that failed,
    /// then fsyncs the segments records were erased in since their last
    /// fsync. An error while any dead record of `evidence` (of any
    /// evidence when `None`) is left unerased, or not yet durably: one
    /// record a damaged sector keeps fails the expunges of its own evidence,
    /// not every later one on this disk.
    pub fn sync_erasures(&self, evidence: Option<EvidenceId>) -> io::Result<()> {
        let concerned = |of: &EvidenceId| evidence.is_none_or(|e| e == *of);
        // One at a time: a second caller (another expunge, the periodic
        // sync) must not find the work taken by the first and return
        // before it is durable.
        let _one = lock(&self.erasure_sync);
        let at_open = std::mem::take(&mut *lock(&self.dead_at_open));
        if !at_open.is_empty() {
            match self.sync_all_segments() {
                Ok(()) => lock(&self.unerased).extend(at_open),
                Err(e) => {
                    tracing::warn!(error = %e, "could not fsync the segments; dead records found at the start stay unerased");
                    lock(&self.dead_at_open).extend(at_open);
                }
            }
        }
        let failed = std::mem::take(&mut *lock(&self.unerased));
        for (loc, of) in failed {
            self.erase(loc, of);
        }
        let segments = std::mem::take(&mut *lock(&self.unsynced_erasures));
        let mut failed = None;
        for (id, mut locs) in segments {
            // Twice at most: zeros written before an fsync of their segment
            // failed are written again, after it, and synced once more.
            for round in 0..2 {
                if let Err(e) = self.sync_segment(id) {
                    // Erased since this sync began: the failed fsync may
                    // have dropped those zeros too, and the next one
                    // "succeed".
                    if let Some(since) = lock(&self.unsynced_erasures).remove(&id) {
                        locs.extend(since);
                    }
                    if locs.iter().any(|(_, of, _)| concerned(of)) {
                        failed.get_or_insert(e);
                    } else {
                        tracing::warn!(segment = id, error = %e, "could not fsync the erasure of dead records; trying again later");
                    }
                    // Written again at the next try: new dirty pages, which
                    // an fsync that succeeds does make durable.
                    lock(&self.unerased).extend(locs.iter().map(|(l, of, _)| (*l, *of)));
                    break;
                }
                let seg_failed = lock(&self.sync).failed.contains(&id);
                let stale: Vec<(Loc, EvidenceId)> = locs
                    .iter()
                    .filter(|(.., after)| seg_failed && !after)
                    .map(|(l, of, _)| (*l, *of))
                    .collect();
                if stale.is_empty() {
                    break;
                }
                if round == 1 {
                    lock(&self.unerased).extend(stale);
                    break;
                }
                tracing::warn!(
                    segment = id,
                    records = stale.len(),
                    "erasures written before a failed fsync of their segment are written again"
                );
                for (loc, of) in stale {
                    self.erase(loc, of);
                }
                locs = lock(&self.unsynced_erasures)
                    .remove(&id)
                    .unwrap_or_default();
            }
        }
        let left = lock(&self.unerased)
            .iter()
            .chain(lock(&self.dead_at_open).iter())
            .filter(|(_, of)| concerned(of))
            .count();
        if let Some(e) = failed {
            return Err(e);
        }
        match left {
            0 => Ok(()),
            n => Err(io::Error::other(format!(
                "{n} dead records could not be erased"
            ))),
        }
    }

    /// Fsyncs every segment there is (the active one in a round of its
    /// own, see [`Self::sync_segment`]).
    fn sync_all_segments(&self) -> io::Result<()> {
        let ids: Vec<u64> = self.read_index().segments.keys().copied().collect();
        ids.into_iter().try_for_each(|id| self.sync_segment(id))
    }

    /// Fsyncs segment `id` after a write in place (an erasure): the active
    /// one in a round of appends' fsyncs begun after the write (so a failure
    /// there is never lost to them: after a failed fsync the kernel may
    /// have dropped its dirty pages, and the next fsync would "succeed"),
    /// a sealed one directly (one gone since has nothing left to sync).
    fn sync_segment(&self, id: u64) -> io::Result<()> {
        let active = lock(&self.active).id == id;
        if active && self.sync_active_now(id)? {
            return Ok(());
        }
        // Sealed (or failed: its zeros are new dirty pages, which a
        // successful fsync does make durable, and one failed fsync must not
        // fail every expunge after it): synced directly.
        let file = self.read_index().segments.get(&id).map(|s| s.file.clone());
        let _fsync = lock(&self.fsync);
        file.map_or(Ok(()), |f| f.sync_data())
    }

    /// Takes `key`'s record at `loc` out of service in this process only,
    /// when its tombstone cannot be written (a full disk): reads and
    /// listings no longer find it, and compaction does not carry it over.
    /// Until then a restart finds it again (and its check fails again).
    pub fn forget(&self, key: &ShardKey, loc: Loc) {
        let mut index = self.write_index();
        if index.entries.get(&fanout_key(key)) == Some(&loc) {
            index.entries.remove(&fanout_key(key));
            index.add_live(loc.seg, -(loc.len as i64));
        }
    }

    /// A sealed segment worth compacting (live records under half its
    /// length), oldest first.
    ///
    /// Only segments older than the active one qualify: the active id is
    /// read first, and a segment sealed after that (with the next one
    /// created, empty) has an id no older than it. Segments whose
    /// compaction left something behind (see [`Self::skip_compaction`]) are
    /// passed over, so one of them cannot hold up all the others.
    pub fn compaction_candidate(&self) -> Option<u64> {
        let active = lock(&self.active).id;
        let mut skipped = lock(&self.stuck).clone();
        // Nor those with damage found at open and not yet mended: the
        // damage is the record of shards lost there, until the disk's
        // identity is renewed and the gateway checks them all again; a
        // compaction would drop it with the file.
        skipped.extend(self.segments_to_mend());
        let index = self.read_index();
        let found = index
            .segments
            .range(..active)
            .find(|(id, s)| {
                // Its tombstones, while a segment they may hide records in
                // is left (a bound, not a check of each: that is for the
                // compaction itself, in `survivors`).
                let needed = index
                    .segments
                    .range(..=s.tombstone_bound)
                    .any(|(other, _)| other != *id);
                let kept = if needed { s.tombstones } else { 0 };
                !skipped.contains(id)
                    && s.pending.load(Ordering::Acquire) == 0
                    && (s.live + kept) * 2 < s.len.max(1)
            })
            .map(|(&id, _)| id);
        // Once nothing else is left, those passed over are tried again (a
        // failure may have been passing: a full disk, a failed fsync).
        if found.is_none() {
            lock(&self.stuck).clear();
        }
        found
    }

    /// The segments holding damage still to mend (see
    /// [`Self::damage_to_mend`]).
    fn segments_to_mend(&self) -> std::collections::BTreeSet<u64> {
        lock(&self.to_mend).iter().map(|(seg, _)| *seg).collect()
    }

    /// Passes over segment `id` in later [`Self::compaction_candidate`]s
    /// (until the node restarts): compacting it left a record that could not
    /// be copied (damaged, for a read or the scrubber to quarantine) or the
    /// file could not be removed.
    pub fn skip_compaction(&self, id: u64) {
        lock(&self.stuck).insert(id);
    }

    /// Whether segment `id`'s tombstones were copied forward already.
    pub fn tombstones_carried(&self, id: u64) -> bool {
        lock(&self.carried).contains(&id)
    }

    /// Notes that segment `id`'s tombstones are copied forward, durably.
    pub fn carried_tombstones(&self, id: u64) {
        lock(&self.carried).insert(id);
    }

    /// The shard records still current in segment `id`, and the tombstones
    /// there that hide a record in a segment that still exists.
    pub fn survivors(&self, id: u64) -> io::Result<Survivors> {
        // Read through the file this process holds open, not by its name:
        // a segment whose name is gone (unlinked by an operator, or by an
        // earlier compaction whose directory fsync failed, so that it may
        // be back after a crash) still has its tombstones carried forward.
        let Some(file) = self.read_index().segments.get(&id).map(|s| s.file.clone()) else {
            return Ok((Vec::new(), Vec::new()));
        };
        let len = file.metadata()?.len();
        if len > MAX_SEGMENT_FILE {
            return Err(io::Error::other(format!(
                "segment {id} is {len} bytes, longer than any segment can be"
            )));
        }
        let len = usize::try_from(len).map_err(|_| io::Error::other("segment too large"))?;
        let mut bytes = vec![0u8; len];
        file.read_exact_at(&mut bytes, 0)?;
        let Some(seg_key) = self.read_index().segments.get(&id).map(|s| s.key) else {
            return Ok((Vec::new(), Vec::new()));
        };
        let mut live = Vec::new();
        self.scan_entries(|key, loc| {
            if loc.seg == id {
                live.push((*key, *loc));
            }
            true
        });
        // The segment's tombstones are found without the index's lock (a
        // walk of up to 64 MiB of records), then judged against the index
        // a chunk at a time under it.
        let mut found = Vec::new();
        for_each_record(&seg_key, &bytes, |kind, head, off, _| {
            if kind != KIND_DELETE {
                return;
            }
            if let Ok(t) = protocol::wire::decode_versioned::<Tombstone>(TOMBSTONE_V1, head) {
                found.push((t, off));
            }
        });
        drop(bytes);
        let mut tombstones = Vec::new();
        let mut found = found.into_iter().peekable();
        while found.peek().is_some() {
            let index = self.read_index();
            for (t, off) in found.by_ref().take(4096) {
                let hides = index.segments.range(..=t.segment).any(|(&s, _)| s != id);
                // A record of the key written after this tombstone makes it
                // moot; one written before it (never the case once its delete
                // finished) must stay hidden.
                let superseded = index
                    .entries
                    .get(&fanout_key(&t.key))
                    .is_some_and(|l| (l.seg, l.off) > (id, off));
                if hides && !superseded {
                    tombstones.push(t);
                }
            }
        }
        Ok((live, tombstones))
    }

    /// Calls `f` on every index entry in order until it returns false, a
    /// chunk at a time under the index's read lock, released between
    /// chunks: a scan of a large node's whole index (hundreds of millions
    /// of entries) must not hold up puts and small reads for seconds (a
    /// waiting writer also blocks new readers). Entries may change between
    /// chunks, so this answers only questions about a *sealed* segment,
    /// which entries can leave but never enter: one that still points into
    /// it at the end was seen.
    fn scan_entries(&self, mut f: impl FnMut(&ShardKey, &Loc) -> bool) {
        const CHUNK: usize = 16_384;
        let mut after: Option<(u8, ShardKey)> = None;
        loop {
            let index = self.read_index();
            let rest = match after {
                None => index.entries.range(..),
                Some(k) => index
                    .entries
                    .range((std::ops::Bound::Excluded(k), std::ops::Bound::Unbounded)),
            };
            let mut seen = 0;
            for (k, loc) in rest.take(CHUNK) {
                seen += 1;
                after = Some(*k);
                if !f(&k.1, loc) {
                    return;
                }
            }
            if seen < CHUNK {
                return;
            }
        }
    }

    /// Copies the record at `loc` (still `key`'s current one: the caller holds
    /// the key's lock and has checked) to the active segment, without waiting
    /// for durability; returns the new location, pending until the caller
    /// drops the guard (after [`Self::moved`]).
    pub fn copy_forward(&self, key: &ShardKey, loc: Loc) -> io::Result<Option<(Loc, Pending<'_>)>> {
        if self.locate(key) != Some(loc) {
            return Ok(None);
        }
        let (file, seg_key) = match self.read_index().segments.get(&loc.seg) {
            Some(s) => (s.file.clone(), s.key),
            None => return Ok(None),
        };
        let mut bytes = vec![0u8; loc.len as usize];
        file.read_exact_at(&mut bytes, loc.off)?;
        // Re-framed under the new segment's key. A record whose frame fails
        // stays where it is, for a read (or the scrubber) to quarantine.
        let Some((kind, head_len, _)) = parse_frame(&seg_key, &bytes) else {
            tracing::warn!(shard = %key, segment = loc.seg, "not compacting a damaged record");
            return Ok(None);
        };
        let (head, body) = bytes[FRAME..].split_at(head_len);
        let (seg, off, len, pending) = self.append(kind, head, body)?;
        Ok(Some((Loc { seg, off, len }, pending)))
    }

    /// Re-appends a tombstone that still hides an older record.
    pub fn copy_tombstone(&self, t: &Tombstone) -> io::Result<Option<(u64, u64, Pending<'_>)>> {
        if self.locate(&t.key).is_some() {
            return Ok(None);
        }
        let (seg, off, len, pending) = self.append_tombstone(t)?;
        Ok(Some((seg, off + len as u64, pending)))
    }

    /// Points `key` at `to` if it still points at `from`.
    pub fn moved(&self, key: &ShardKey, from: Loc, to: Loc) {
        let mut index = self.write_index();
        if index.entries.get(&fanout_key(key)) == Some(&from) {
            index.entries.insert(fanout_key(key), to);
            index.add_live(from.seg, -(from.len as i64));
            index.add_live(to.seg, to.len as i64);
        }
    }

    /// Removes segment `id` once nothing current or in flight is left in it.
    /// The index forgets it only once the removal is durable: while the file
    /// may still exist, tombstones that hide its records are kept.
    ///
    /// Never the active segment, nor one sealed after `id` was chosen: only
    /// segments older than the active one are removed (ids only grow, so
    /// one older now stays older).
    pub fn drop_segment(&self, id: u64) -> io::Result<bool> {
        // Nor one with damage to mend (see `compaction_candidate`).
        if self.segments_to_mend().contains(&id) {
            return Ok(false);
        }
        // Lock order: the active segment before the index (as `seal`).
        if id >= lock(&self.active).id {
            return Ok(false);
        }
        {
            let index = self.read_index();
            let busy = index
                .segments
                .get(&id)
                .is_some_and(|s| s.pending.load(Ordering::Acquire) > 0);
            if busy {
                return Ok(false);
            }
        }
        let mut current = false;
        self.scan_entries(|_, loc| {
            current = loc.seg == id;
            !current
        });
        if current {
            return Ok(false);
        }
        // Nothing can enter the segment now: it is sealed (only the active
        // one gains records or pending appends), and nothing current is in
        // it (a record only moves forward). So the file goes without the
        // index lock held across the unlink and fsync, which small reads on
        // the QUIC threads would wait for.
        match fs::remove_file(self.dir.join(segment_name(id))) {
            // Gone already: an earlier removal whose directory fsync failed.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            r => r?,
        }
        File::open(&self.dir)?.sync_all()?;
        let mut index = self.write_index();
        index.segments.remove(&id);
        Ok(true)
    }

    /// Appends tombstone `t` (see [`Self::append`]), counted as its
    /// segment's.
    fn append_tombstone(&self, t: &Tombstone) -> io::Result<(u64, u64, u32, Pending<'_>)> {
        let head = protocol::wire::encode_versioned(TOMBSTONE_V1, t);
        let appended = self.append(KIND_DELETE, &head, &[])?;
        let (seg, _, len, _) = &appended;
        self.write_index()
            .add_tombstone(*seg, u64::from(*len), t.segment);
        Ok(appended)
    }

    /// Appends `record` to the active segment (sealing it first if full);
    /// returns where the record starts, and a guard that keeps the segment
    /// from being compacted away until the caller has indexed the record
    /// (or given up). Not durable until [`Self::wait_durable`].
    fn append(
        &self,
        kind: u8,
        head: &[u8],
        body: &[u8],
    ) -> io::Result<(u64, u64, u32, Pending<'_>)> {
        let mut active = lock(&self.active);
        if active.file.is_none() {
            // Started on a full disk: the active segment is made now.
            let (made, stat) = create_segment(&self.dir, active.id)?;
            self.write_index().segments.insert(made.id, stat);
            *active = made;
        }
        let failed = lock(&self.sync).failed.contains(&active.id);
        let len = (FRAME + head.len() + body.len()) as u64;
        if failed || (active.len > HEADER_LEN as u64 && active.len + len > SEGMENT_TARGET) {
            self.seal(&mut active, failed)?;
        }
        let Some(file) = active.file.clone() else {
            return Err(io::Error::other("no active segment"));
        };
        // Framed under the lock: the check is keyed by the segment it lands in.
        let record = encode_record(&active.key, kind, head, body);
        let off = active.len;
        // Lock order: the active segment, then the index (as `seal`).
        if let Some(s) = self.read_index().segments.get(&active.id) {
            s.pending.fetch_add(1, Ordering::AcqRel);
        }
        let pending = Pending {
            log: self,
            seg: active.id,
        };
        #[cfg(test)]
        let written = match tests::SHORT_WRITE.with(std::cell::Cell::get) {
            true => file
                .write_all_at(&record[..record.len() / 2], off)
                .and(Err(io::ErrorKind::StorageFull.into())),
            false => file.write_all_at(&record, off),
        };
        #[cfg(not(test))]
        let written = file.write_all_at(&record, off);
        if let Err(e) = written {
            // Part of the record may be on disk (a full disk takes some of
            // it): cut it off, or it would lie unindexed past the last
            // record, out of reach of an expunge of its evidence. Where
            // even that fails, the segment takes no more records.
            if let Err(cut) = file.set_len(off) {
                tracing::error!(segment = active.id, error = %cut, "cutting a failed append off failed");
                lock(&self.sync).failed.insert(active.id);
                self.synced.notify_all();
            }
            return Err(e);
        }
        active.len += record.len() as u64;
        Ok((active.id, off, record.len() as u32, pending))
    }

    /// Appends a durable mark ([`KIND_DURABLE`]) saying the active segment
    /// was durable up to `mark`. Best effort: one that cannot be written
    /// (a full disk) is cut off again, and an open then takes less of the
    /// segment for acknowledged, as before marks existed.
    fn note_durable(&self, active: &mut Active, mark: u64) {
        let Some(file) = &active.file else {
            return;
        };
        let record = encode_record(&active.key, KIND_DURABLE, &mark.to_le_bytes(), &[]);
        let off = active.len;
        match file.write_all_at(&record, off) {
            Ok(()) => active.len += record.len() as u64,
            Err(e) => {
                tracing::warn!(segment = active.id, error = %e, "could not write a durable mark");
                if let Err(cut) = file.set_len(off) {
                    tracing::error!(segment = active.id, error = %cut, "cutting a failed durable mark off failed");
                    lock(&self.sync).failed.insert(active.id);
                    self.synced.notify_all();
                }
            }
        }
    }

    /// Seals the active segment (fsynced, unless its fsync already failed)
    /// and starts the next one.
    fn seal(&self, active: &mut Active, failed: bool) -> io::Result<()> {
        if let (false, Some(file)) = (failed, &active.file) {
            let _fsync = lock(&self.fsync);
            if let Err(e) = file.sync_data() {
                // As in `wait_durable`: a retried fsync may "succeed" over
                // dropped pages, so nothing more of this segment counts.
                tracing::error!(segment = active.id, error = %e, "segment fsync failed");
                lock(&self.sync).failed.insert(active.id);
                self.synced.notify_all();
                return Err(e);
            }
            self.syncs.fetch_add(1, Ordering::Relaxed);
        }
        let (next, stat) = create_segment(&self.dir, active.id + 1)?;
        {
            let mut index = self.write_index();
            if let Some(s) = index.segments.get_mut(&active.id) {
                s.len = active.len;
            }
            index.segments.insert(next.id, stat);
        }
        {
            let mut sync = lock(&self.sync);
            if !failed {
                sync.durable = sync.durable.max((active.id, active.len));
            }
            // Everything of the sealed segment that will ever be durable is
            // (the new one's header was fsynced when it was made).
            sync.durable = sync.durable.max((next.id, HEADER_LEN as u64));
        }
        self.synced.notify_all();
        *active = next;
        Ok(())
    }

    /// Returns once every record ending at one of `ends` (segment, end
    /// offset) is durable. Each segment is waited on, not only the newest:
    /// records appended together can straddle a seal, and a failed fsync of
    /// the earlier segment shows only when that segment is waited on (the
    /// seal after a failure raises the durable mark past it).
    pub fn wait_all_durable(&self, ends: impl IntoIterator<Item = (u64, u64)>) -> io::Result<()> {
        let mut last = BTreeMap::new();
        for (seg, end) in ends {
            let e = last.entry(seg).or_insert(0);
            *e = end.max(*e);
        }
        for (seg, end) in last {
            self.wait_durable(seg, end)?;
        }
        Ok(())
    }

    /// Returns once everything before `(seg, end)` is durable: fsyncs itself
    /// if no one else is, else waits for the fsync in flight (and then maybe
    /// leads the next).
    pub fn wait_durable(&self, seg: u64, end: u64) -> io::Result<()> {
        let mut sync = lock(&self.sync);
        loop {
            if sync.failed.contains(&seg) {
                return Err(io::Error::other("fsync of the segment failed earlier"));
            }
            if sync.durable >= (seg, end) {
                return Ok(());
            }
            if sync.leader {
                sync = self.synced.wait(sync).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            let (id, result);
            (sync, id, result) = self.lead_sync(sync);
            if let Err(e) = result {
                if id == seg {
                    return Err(e);
                }
            }
        }
    }

    /// Fsyncs the active segment `seg` in a round of its own, begun after
    /// this call: for writes in place (an erasure), which the durable mark
    /// cannot tell covered, since it counts appends. (A round already in
    /// flight may have begun before the write.)
    /// False if `seg` was sealed meanwhile, or its appends' fsync failed
    /// (not synced here: the caller syncs its file directly).
    fn sync_active_now(&self, seg: u64) -> io::Result<bool> {
        let mut sync = lock(&self.sync);
        while sync.leader {
            sync = self.synced.wait(sync).unwrap_or_else(|p| p.into_inner());
        }
        if sync.failed.contains(&seg) {
            return Ok(false);
        }
        let (_sync, id, result) = self.lead_sync(sync);
        match result {
            Err(e) if id == seg => Err(e),
            _ => Ok(id == seg),
        }
    }

    /// One fsync round of the active segment, led by the caller (who holds
    /// `sync`, with no other leader): advances the durable mark, or marks
    /// the segment failed. Returns the lock again, the segment synced and
    /// the outcome.
    fn lead_sync<'a>(
        &'a self,
        mut sync: MutexGuard<'a, SyncState>,
    ) -> (MutexGuard<'a, SyncState>, u64, io::Result<()>) {
        sync.leader = true;
        let mark = sync.durable;
        drop(sync);
        let (id, file, len) = {
            let mut a = lock(&self.active);
            if mark.0 == a.id && mark.1 > HEADER_LEN as u64 {
                self.note_durable(&mut a, mark.1);
            }
            (a.id, a.file.clone(), a.len)
        };
        // No active file: nothing was appended since the start.
        let fsync = lock(&self.fsync);
        let result = file.map_or(Ok(()), |f| f.sync_data());
        #[cfg(test)]
        let result = match tests::FSYNC_FAILS.with(std::cell::Cell::get) {
            true => Err(io::Error::from_raw_os_error(
                rustix::io::Errno::IO.raw_os_error(),
            )),
            false => result,
        };
        let mut sync = lock(&self.sync);
        sync.leader = false;
        match &result {
            Ok(()) => {
                sync.durable = sync.durable.max((id, len));
                self.syncs.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                // After a failed fsync the kernel may have dropped the
                // dirty pages: nothing more of this segment is trusted.
                tracing::error!(segment = id, error = %e, "segment fsync failed");
                sync.failed.insert(id);
            }
        }
        drop(fsync);
        self.synced.notify_all();
        (sync, id, result)
    }

    fn read_index(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_index(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// A record appended but not yet indexed (see [`SegmentLog::append`]).
pub(crate) struct Pending<'a> {
    log: &'a SegmentLog,
    seg: u64,
}

impl Drop for SegmentLog {
    /// A clean close writes the durable mark as it stands and makes it
    /// durable: damage found later in the newest segment's last records
    /// (which no fsync round after them named) is then known for an
    /// acknowledged shard's loss, not a crash's leftovers.
    fn drop(&mut self) {
        let (mark, failed) = {
            let sync = lock(&self.sync);
            (sync.durable, sync.failed.clone())
        };
        let mut active = lock(&self.active);
        if mark.0 != active.id || mark.1 <= HEADER_LEN as u64 || failed.contains(&active.id) {
            return;
        }
        self.note_durable(&mut active, mark.1);
        if let Some(file) = &active.file {
            if let Err(e) = file.sync_data() {
                tracing::warn!(segment = active.id, error = %e, "the closing durable mark may not be durable");
            }
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.log.read_index().segments.get(&self.seg) {
            s.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Index {
    fn add_live(&mut self, seg: u64, delta: i64) {
        if let Some(s) = self.segments.get_mut(&seg) {
            s.live = s.live.saturating_add_signed(delta);
        }
    }

    /// Counts a tombstone of `len` bytes in `seg` hiding records in
    /// segments up to `bound`.
    fn add_tombstone(&mut self, seg: u64, len: u64, bound: u64) {
        if let Some(s) = self.segments.get_mut(&seg) {
            s.tombstones += len;
            s.tombstone_bound = s.tombstone_bound.max(bound);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing a panicking holder leaves half-done is unsafe to see: records
    // are only indexed once durable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Creates segment `id` (header written and fsynced): the active segment,
/// and the index's count of it, so neither is made without the other.
fn create_segment(dir: &Path, id: u64) -> io::Result<(Active, SegStat)> {
    #[cfg(test)]
    if tests::DISK_FULL.with(std::cell::Cell::get) {
        return Err(io::ErrorKind::StorageFull.into());
    }
    // A file of this id holding no more than a header is what a failed
    // earlier attempt left (its header written, an fsync failed): it never
    // held a record, so it is started again with a fresh key.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(segment_name(id)))?;
    if file.metadata()?.len() > HEADER_LEN as u64 {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("segment {id} already holds records"),
        ));
    }
    let key: SegKey = rand::random();
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(HEADER_MAGIC);
    header.extend_from_slice(&key);
    file.write_all_at(&header, 0)?;
    file.sync_data()?;
    File::open(dir)?.sync_all()?;
    let file = Arc::new(file);
    let stat = SegStat::fresh(key, &file);
    Ok((
        Active {
            id,
            key,
            file: Some(file),
            len: HEADER_LEN as u64,
        },
        stat,
    ))
}

/// Calls `f(kind, head, offset, record length)` for every record of a
/// segment that passes its frame check, skipping damage; returns the offset
/// of a torn record the segment ends in, if it does.
fn for_each_record(key: &SegKey, bytes: &[u8], f: impl FnMut(u8, &[u8], u64, u32)) -> Option<u64> {
    for_each_record_noting(key, bytes, f, &mut Vec::new())
}

/// [`for_each_record`], noting in `skipped` each stretch (start, end) it
/// could not read as records.
fn for_each_record_noting(
    key: &SegKey,
    bytes: &[u8],
    mut f: impl FnMut(u8, &[u8], u64, u32),
    skipped: &mut Vec<(u64, u64)>,
) -> Option<u64> {
    let mut at = HEADER_LEN.min(bytes.len());
    while at < bytes.len() {
        match parse_frame(key, &bytes[at..]) {
            Some((kind, head_len, body_len)) if at + FRAME + head_len + body_len <= bytes.len() => {
                let len = FRAME + head_len + body_len;
                f(
                    kind,
                    &bytes[at + FRAME..at + FRAME + head_len],
                    at as u64,
                    len as u32,
                );
                at += len;
            }
            Some(_) => {
                // A whole frame whose record runs past the end: the torn
                // tail of a crash mid-append. Nothing after it was written;
                // never look for records inside its (client-chosen) body.
                tracing::warn!(offset = at, "segment ends in a torn record");
                return Some(at as u64);
            }
            None => {
                // Damage: resume at the next record magic.
                let next = bytes[at + 1..]
                    .windows(MAGIC.len())
                    .position(|w| w == MAGIC)
                    .map(|p| at + 1 + p);
                if bytes.len() - at > 0 {
                    tracing::warn!(offset = at, "skipping an unreadable stretch of a segment");
                }
                // One stretch however many record magics in it fail (a
                // body holding record magics, say).
                let end = next.unwrap_or(bytes.len()) as u64;
                match skipped.last_mut() {
                    Some(last) if last.1 == at as u64 => last.1 = end,
                    _ => skipped.push((at as u64, end)),
                }
                match next {
                    Some(n) => at = n,
                    None => break,
                }
            }
        }
    }
    None
}

/// How an open mends a stretch of a sealed segment it could not read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mend {
    /// Cut the segment off at this offset (the stretch runs to its end).
    Cut(u64),
    /// Overwrite `start..end` with a filler record.
    Pad(u64, u64),
    /// Nothing this can do.
    Leave,
}

impl Mend {
    /// How to mend the stretch `start..end` a scan skipped in a segment
    /// `len` bytes long.
    fn of(start: u64, end: u64, len: u64) -> Mend {
        match (end < len, end - start >= FRAME as u64) {
            (false, _) => Mend::Cut(start),
            (true, true) => Mend::Pad(start, end),
            // Too short for a filler record (a record magic within a
            // damaged frame).
            (true, false) => Mend::Leave,
        }
    }

    /// Where the segment ends once `mends` are applied, if one cuts it.
    fn cut_at(mends: &[Mend]) -> Option<u64> {
        mends
            .iter()
            .filter_map(|m| match m {
                Mend::Cut(at) => Some(*at),
                _ => None,
            })
            .min()
    }

    /// Applies this to `file`, the segment keyed `key` (not made durable).
    fn apply(self, file: &File, key: &SegKey) -> io::Result<()> {
        match self {
            Mend::Cut(at) => file.set_len(at),
            Mend::Pad(start, end) => {
                let body = vec![0u8; (end - start) as usize - FRAME];
                file.write_all_at(&encode_record(key, KIND_PAD, &[], &body), start)
            }
            Mend::Leave => Ok(()),
        }
    }
}

/// The key in a segment's header, if the header is whole.
fn segment_key(bytes: &[u8]) -> Option<SegKey> {
    let header = bytes.get(..HEADER_LEN)?;
    if &header[..8] != HEADER_MAGIC {
        return None;
    }
    header[8..].try_into().ok()
}

/// Indexes the records of segment `id`. A shard record that would replace
/// an older record of its key and whose body does not match its header is
/// not indexed, so the older one stays current: compaction's copies and
/// re-puts are appended before their fsync, and a crash may keep a copy's
/// frame and head but not its body; that torn copy must not hide (and, once
/// a read quarantined it, delete) the intact record it was copied from.
///
/// Shard records found dead on the way (replaced by a later one, deleted by a
/// tombstone, or a torn copy passed over) whose bodies are not all zeros
/// are added to `dead.erase`, to be erased.
/// Returns the offset of a torn record the segment ends in, if it does.
/// `durable` is raised to the segment's durable mark (see
/// [`KIND_DURABLE`]), if it records one higher.
fn scan_segment(
    id: u64,
    key: &SegKey,
    bytes: &[u8],
    (index, dead): (&mut Index, &mut Dead),
    skipped: &mut Vec<(u64, u64)>,
    durable: &mut u64,
) -> Option<u64> {
    let f = |kind, head: &[u8], off, len| match kind {
        KIND_SHARD => match ShardHeader::decode(head) {
            Ok(h) if FRAME + head.len() + h.len as usize == len as usize => {
                let body = &bytes[off as usize + FRAME + head.len()..off as usize + len as usize];
                if body.iter().all(|b| *b == 0) {
                    dead.zeroed.insert((id, off));
                }
                // Only a record that would replace an older one is hashed
                // here (a copy or a re-put): a torn one keeps the older
                // record current. One with nothing older is indexed
                // whatever its body, so a read or the scrubber finds it
                // damaged, quarantines it and has it repaired.
                if index.entries.contains_key(&fanout_key(&h.key)) && !h.matches(body) {
                    // (An erased one is a copy that died later, quietly.)
                    if !dead.zeroed.contains(&(id, off)) {
                        tracing::warn!(
                            segment = id,
                            offset = off,
                            shard = %h.key,
                            "a later copy of a shard fails its BLAKE3; the earlier record stays"
                        );
                    }
                    dead.push(Loc { seg: id, off, len }, h.key.evidence);
                    return;
                }
                let loc = Loc { seg: id, off, len };
                if let Some(old) = index.entries.insert(fanout_key(&h.key), loc) {
                    index.add_live(old.seg, -(old.len as i64));
                    dead.push(old, h.key.evidence);
                }
                index.add_live(id, len as i64);
            }
            _ => tracing::warn!(
                segment = id,
                offset = off,
                "segment record with a bad shard header"
            ),
        },
        KIND_DELETE => match protocol::wire::decode_versioned::<Tombstone>(TOMBSTONE_V1, head) {
            Ok(t) => {
                index.add_tombstone(id, u64::from(len), t.segment);
                if let Some(old) = index.entries.remove(&fanout_key(&t.key)) {
                    index.add_live(old.seg, -(old.len as i64));
                    dead.push(old, t.key.evidence);
                }
            }
            Err(_) => tracing::warn!(
                segment = id,
                offset = off,
                "segment record with a bad tombstone"
            ),
        },
        KIND_PAD => {}
        KIND_DURABLE => match <[u8; 8]>::try_from(head) {
            // (Never past the record itself: it was written after.)
            Ok(mark) => *durable = (*durable).max(u64::from_le_bytes(mark).min(off)),
            Err(_) => tracing::warn!(segment = id, offset = off, "bad durable mark"),
        },
        other => tracing::warn!(
            segment = id,
            offset = off,
            kind = other,
            "unknown segment record kind"
        ),
    };
    for_each_record_noting(key, bytes, f, skipped)
}

/// The shard records an open found dead, and which records have bodies of
/// zeros (erased already, or nothing to erase).
#[derive(Default)]
struct Dead {
    /// With the evidence each held.
    erase: Vec<(Loc, EvidenceId)>,
    zeroed: std::collections::HashSet<(u64, u64)>,
}

impl Dead {
    fn push(&mut self, loc: Loc, evidence: EvidenceId) {
        if !self.zeroed.contains(&(loc.seg, loc.off)) {
            self.erase.push((loc, evidence));
        }
    }
}

/// Drops the page cache's clean pages of `file` from `off` for `len`
/// bytes (to its end: `None`), so that the next read of them comes from the
/// disk. Whole pages: the kernel keeps a page the range only partly covers,
/// and a record of a few KiB lies mostly on such pages.
pub(crate) fn drop_cached_pages(file: &File, off: u64, len: Option<u64>) {
    let page = rustix::param::page_size() as u64;
    let start = off / page * page;
    let len =
        len.and_then(|len| std::num::NonZeroU64::new((off + len).div_ceil(page) * page - start));
    if let Err(e) = rustix::fs::fadvise(file, start, len, rustix::fs::Advice::DontNeed) {
        tracing::debug!(error = %e, "could not drop cached pages");
    }
}

/// Overwrites the body of the dead shard record at `loc` in `file` (a
/// segment whose records are checked with `key`) with zeros; its frame and
/// head stay. A record whose frame no longer passes its check (damaged
/// since it was indexed) has its head zeroed too. One whose frame cannot
/// even be read (a bad sector) is zeroed whole, unread: its bytes must go
/// whatever the frame says (an expunge waits for them), and a blind write
/// is what gets a failing sector remapped; the next open reads the zeros
/// as damage, reported once. Not durable until the file is fsynced.
fn erase_at(file: &File, key: &SegKey, loc: Loc) -> io::Result<()> {
    let mut frame = vec![0u8; (FRAME + protocol::shard::MAX_HEADER_LEN).min(loc.len as usize)];
    #[cfg(test)]
    let read = match tests::ERASE_READ_FAILS.with(std::cell::Cell::get) {
        true => Err(io::Error::from_raw_os_error(
            rustix::io::Errno::IO.raw_os_error(),
        )),
        false => file.read_exact_at(&mut frame, loc.off),
    };
    #[cfg(not(test))]
    let read = file.read_exact_at(&mut frame, loc.off);
    let from = match read.map(|()| parse_frame(key, &frame)) {
        Ok(Some((_, head_len, body_len))) if FRAME + head_len + body_len == loc.len as usize => {
            FRAME + head_len
        }
        Ok(_) => FRAME.min(loc.len as usize),
        Err(e) => {
            tracing::warn!(offset = loc.off, error = %e, "a dead record's frame is unreadable: zeroing it whole");
            0
        }
    };
    let zeros = vec![0u8; loc.len as usize - from];
    file.write_all_at(&zeros, loc.off + from as u64)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    thread_local! {
        /// Makes [`create_segment`] fail as on a full disk (this thread only).
        pub(super) static DISK_FULL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        /// Makes appends on this thread write half their record and fail,
        /// as on a disk that fills up under a write.
        pub(super) static SHORT_WRITE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        /// Makes segment fsyncs led on this thread fail, as on a disk error.
        pub(crate) static FSYNC_FAILS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        /// Makes erasures of this evidence's records on this thread fail,
        /// as on a damaged sector.
        pub(super) static ERASE_FAILS: std::cell::Cell<Option<EvidenceId>> = const { std::cell::Cell::new(None) };
        /// Makes erasures on this thread fail to read the record's frame
        /// (their writes still work), as on a sector that fails reads.
        pub(super) static ERASE_READ_FAILS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        /// Makes this many record reads on this thread fail with EIO, as a
        /// failing sector or a controller reset does.
        pub(crate) static READS_FAIL: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }

    /// A dead record whose frame cannot be read is erased whole, unread:
    /// an expunge of its evidence does not fail for ever on a sector that
    /// fails reads.
    #[test]
    fn a_dead_record_with_an_unreadable_frame_is_erased_whole() {
        let dir = tempfile::tempdir().unwrap();
        let body = b"ordered destroyed, on a failing sector".to_vec();
        let h = shard(8, &body);
        let log = SegmentLog::open(dir.path()).unwrap();
        let (at, _) = log.put(&h, &body).unwrap();
        let path = log.segment_path(at.seg);
        ERASE_READ_FAILS.with(|f| f.set(true));
        log.delete(&h.key, None).unwrap();
        ERASE_READ_FAILS.with(|f| f.set(false));
        log.sync_erasures(Some(h.key.evidence))
            .expect("the expunge failed on an unreadable frame");
        assert!(!holds(&path, &body), "the expunged shard's bytes stayed");
        let bytes = fs::read(&path).unwrap();
        assert!(bytes[at.off as usize..at.end() as usize]
            .iter()
            .all(|b| *b == 0));
    }

    /// A dead record that cannot be erased fails the expunges of its own
    /// evidence until it is, and no other evidence's.
    #[test]
    fn an_unerasable_record_fails_only_its_own_evidence_expunges() {
        let dir = tempfile::tempdir().unwrap();
        let (stuck_body, other_body) = (
            b"held by a bad sector".to_vec(),
            b"ordered destroyed".to_vec(),
        );
        let (stuck, other) = (shard(6, &stuck_body), shard(7, &other_body));
        let log = SegmentLog::open(dir.path()).unwrap();
        log.put(&stuck, &stuck_body).unwrap();
        let (at, _) = log.put(&other, &other_body).unwrap();
        let path = log.segment_path(at.seg);
        ERASE_FAILS.with(|f| f.set(Some(stuck.key.evidence)));
        log.delete(&stuck.key, None).unwrap();
        log.delete(&other.key, None).unwrap();
        log.sync_erasures(Some(other.key.evidence))
            .expect("another evidence's unerasable record failed this expunge");
        assert!(
            !holds(&path, &other_body),
            "the expunged shard's bytes stayed"
        );
        assert!(
            log.sync_erasures(Some(stuck.key.evidence)).is_err(),
            "an expunge passed with its bytes on the disk"
        );
        assert!(
            log.sync_erasures(None).is_err(),
            "the periodic sync hid the failure"
        );
        assert!(holds(&path, &stuck_body));
        // The sector is mended (or remapped): the next try erases it.
        ERASE_FAILS.with(|f| f.set(None));
        log.sync_erasures(Some(stuck.key.evidence)).unwrap();
        assert!(!holds(&path, &stuck_body));
    }

    /// A delete's record leaves the index before its tombstone is durable:
    /// one whose tombstone's fsync fails serves the shard no more (a
    /// restart may honour the tombstone), and is not erased until a
    /// delete does so durably.
    #[test]
    fn a_delete_is_seen_before_its_tombstone_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let body = b"to be deleted".to_vec();
        let h = shard(5, &body);
        let log = SegmentLog::open(dir.path()).unwrap();
        let (loc, _) = log.put(&h, &body).unwrap();
        FSYNC_FAILS.with(|f| f.set(true));
        let failed = log.delete(&h.key, None);
        FSYNC_FAILS.with(|f| f.set(false));
        assert!(failed.is_err(), "a delete whose tombstone failed passed");
        assert_eq!(log.locate(&h.key), None, "the shard is still served");
        assert!(
            log.read(&h.key, loc, false).is_ok(),
            "its bytes were erased before a durable tombstone"
        );
        // Asked again, the delete buries it durably (and an expunge of its
        // evidence finds it): not "nothing there".
        assert_eq!(log.failed_puts_of(h.key.evidence), vec![h.key]);
        assert_eq!(log.delete(&h.key, None).unwrap(), None);
        assert!(log.failed_puts_of(h.key.evidence).is_empty());
        assert!(
            !holds(&log.segment_path(loc.seg), &body),
            "the buried record's bytes were left"
        );
        log.sync_erasures(Some(h.key.evidence)).unwrap();
        drop(log);
        let log = SegmentLog::open(dir.path()).unwrap();
        assert_eq!(log.locate(&h.key), None, "the shard came back");
    }

    /// An erasure whose fsync fails is written again and synced at the next
    /// try (the kernel may have dropped the zeros with the failed fsync),
    /// and the failure does not stay: the next try succeeds.
    #[test]
    fn an_erasure_whose_fsync_failed_is_written_again_and_synced() {
        let dir = tempfile::tempdir().unwrap();
        let body = b"to be expunged".to_vec();
        let h = shard(5, &body);
        let log = SegmentLog::open(dir.path()).unwrap();
        let (loc, _) = log.put(&h, &body).unwrap();
        // The tombstone is durable; the erasure's fsync fails.
        assert_eq!(log.delete(&h.key, None).unwrap(), Some(loc));
        FSYNC_FAILS.with(|f| f.set(true));
        assert!(log.sync_erasures(None).is_err(), "a failed fsync passed");
        FSYNC_FAILS.with(|f| f.set(false));
        assert_eq!(
            lock(&log.unerased).len(),
            1,
            "the erasure is not kept to write again"
        );
        log.sync_erasures(None).unwrap();
        assert!(lock(&log.unerased).is_empty());
        assert!(lock(&log.unsynced_erasures).is_empty());
    }

    /// Zeros written in the active segment before an append's fsync of it
    /// failed (another thread's, which met the error): that failure may
    /// have dropped them too, so the next sync of erasures writes them
    /// again rather than trust an fsync that now "succeeds". (Here the
    /// rewrite is made to fail, which shows it is attempted: before, the
    /// expunge was told its bytes were durably gone.)
    #[test]
    fn zeros_written_before_another_fsync_failed_are_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let log = SegmentLog::open(dir.path()).unwrap();
        let body = b"erased before the failure".to_vec();
        let h = shard(5, &body);
        log.put(&h, &body).unwrap();
        assert!(log.delete(&h.key, None).unwrap().is_some());
        let other = b"a put whose fsync fails".to_vec();
        let h2 = shard(6, &other);
        FSYNC_FAILS.with(|f| f.set(true));
        assert!(log.put(&h2, &other).is_err());
        FSYNC_FAILS.with(|f| f.set(false));
        ERASE_FAILS.with(|f| f.set(Some(h.key.evidence)));
        let synced = log.sync_erasures(Some(h.key.evidence));
        ERASE_FAILS.with(|f| f.set(None));
        assert!(
            synced.is_err(),
            "zeros the failure may have dropped were trusted"
        );
        log.sync_erasures(Some(h.key.evidence)).unwrap();
        assert!(lock(&log.unerased).is_empty());
    }

    /// A put whose fsync failed is not indexed, but its record may be on
    /// the disk: a later delete of the key (GC, an expunge) writes a
    /// tombstone for it all the same, and an expunge finds it, so it cannot
    /// come back with a restart.
    #[test]
    fn a_put_whose_fsync_failed_is_buried_when_its_key_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let body = b"never acknowledged".to_vec();
        let h = shard(4, &body);
        let log = SegmentLog::open(dir.path()).unwrap();
        FSYNC_FAILS.with(|f| f.set(true));
        let put = log.put(&h, &body);
        FSYNC_FAILS.with(|f| f.set(false));
        assert!(put.is_err(), "a failed fsync acknowledged");
        assert_eq!(log.locate(&h.key), None);
        assert_eq!(log.failed_puts_of(h.key.evidence), vec![h.key]);
        // Its body erased as any dead record's, the zeros made durable by
        // the next sync of erasures (which an expunge waits for).
        let seg = log.segment_path(lock(&log.failed_puts)[0].1.seg);
        assert!(!holds(&seg, &body), "the failed put's body is on the disk");
        assert_eq!(
            lock(&log.unsynced_erasures)
                .values()
                .flatten()
                .filter(|(_, of, _)| *of == h.key.evidence)
                .count(),
            1,
            "its erasure is not tracked"
        );
        log.sync_erasures(Some(h.key.evidence)).unwrap();
        let syncs = log.syncs.load(Ordering::Relaxed);
        assert_eq!(log.delete(&h.key, None).unwrap(), None);
        assert!(
            log.syncs.load(Ordering::Relaxed) > syncs,
            "no tombstone was made durable"
        );
        assert!(log.failed_puts_of(h.key.evidence).is_empty());
        drop(log);
        let log = SegmentLog::open(dir.path()).unwrap();
        assert_eq!(log.locate(&h.key), None, "the failed put came back");
    }

    /// A node whose disk filled up under it starts again: it serves every
    /// small shard it holds, refuses new ones as a full disk does, and takes
    /// them again once there is room; nothing it held is lost.
    #[test]
    fn a_log_opened_on_a_full_disk_serves_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let (h, body) = {
            let body = b"filed before the disk filled".to_vec();
            (shard(1, &body), body)
        };
        let loc = {
            let log = SegmentLog::open(dir.path()).unwrap();
            log.put(&h, &body).unwrap().0
        };
        DISK_FULL.with(|f| f.set(true));
        let log = SegmentLog::open(dir.path()).unwrap();
        assert_eq!(log.locate(&h.key), Some(loc));
        assert!(matches!(
            log.read(&h.key, loc, false).unwrap(),
            ReadRecord::Shard(got, b) if got == h && b == body
        ));
        let (h2, body2) = {
            let body = b"filed while full".to_vec();
            (shard(2, &body), body)
        };
        let refused = log.put(&h2, &body2).unwrap_err();
        assert!(crate::store::is_disk_full(&refused), "{refused}");
        assert_eq!(log.locate(&h2.key), None);
        DISK_FULL.with(|f| f.set(false));
        let (loc2, _) = log.put(&h2, &body2).unwrap();
        assert!(matches!(
            log.read(&h2.key, loc2, false).unwrap(),
            ReadRecord::Shard(got, b) if got == h2 && b == body2
        ));
        drop(log);
        // What a real full disk leaves: the next segment's file created,
        // its header not (or not wholly) written. Removed at the next open.
        let segments = dir.path().join(SEGMENTS_DIR);
        std::fs::write(segments.join(segment_name(loc2.seg + 1)), b"").unwrap();
        std::fs::write(
            segments.join(segment_name(loc2.seg + 2)),
            &HEADER_MAGIC[..5],
        )
        .unwrap();
        // Or a header's length of zeros (a crash before its fsync).
        std::fs::write(segments.join(segment_name(loc2.seg + 3)), [0u8; HEADER_LEN]).unwrap();
        let log = SegmentLog::open(dir.path()).unwrap();
        assert_eq!(log.locate(&h.key), Some(loc));
        assert_eq!(log.locate(&h2.key), Some(loc2));
        assert!(!segments.join(segment_name(loc2.seg + 1)).exists());
        assert!(!segments.join(segment_name(loc2.seg + 2)).exists());
        assert!(!segments.join(segment_name(loc2.seg + 3)).exists());
    }

    /// A record the disk took only part of is cut off: nothing of it lies
    /// past the last record (where no expunge of its evidence would find
    /// it), and the segment goes on taking records.
    #[test]
    fn a_record_written_in_part_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let log = SegmentLog::open(dir.path()).unwrap();
        let (h1, b1) = {
            let body = b"filed before".to_vec();
            (shard(1, &body), body)
        };
        let loc1 = log.put(&h1, &b1).unwrap().0;
        let path = dir.path().join(SEGMENTS_DIR).join(segment_name(loc1.seg));
        let before = std::fs::metadata(&path).unwrap().len();
        let secret = b"bytes of evidence the disk took only half of".repeat(8);
        let h2 = shard(2, &secret);
        SHORT_WRITE.with(|f| f.set(true));
        let refused = log.put(&h2, &secret).unwrap_err();
        SHORT_WRITE.with(|f| f.set(false));
        assert!(crate::store::is_disk_full(&refused), "{refused}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), before);
        let half = &secret[..16];
        let held = std::fs::read(&path).unwrap();
        assert!(
            !held.windows(half.len()).any(|w| w == half),
            "part of the record is left"
        );
        let (h3, b3) = {
            let body = b"filed after".to_vec();
            (shard(3, &body), body)
        };
        let loc3 = log.put(&h3, &b3).unwrap().0;
        drop(log);
        let log = SegmentLog::open(dir.path()).unwrap();
        assert_eq!(log.locate(&h1.key), Some(loc1));
        assert_eq!(log.locate(&h2.key), None);
        assert_eq!(log.locate(&h3.key), Some(loc3));
        assert!(matches!(
            log.read(&h3.key, loc3, false).unwrap(),
            ReadRecord::Shard(got, b) if got == h3 && b == b3
        ));
    }

    #[test]
    fn a_segment_with_a_record_in_flight_is_never_compacted_away() {
        let dir = tempfile::tempdir().unwrap();
        let log = SegmentLog::open(dir.path()).unwrap();
        let (seg, _, _, pending) = log.append(KIND_DELETE, b"x", &[]).unwrap();
        {
            let mut active = lock(&log.active);
            log.seal(&mut active, false).unwrap();
        }
        // Sealed and holding nothing current, but its writer has not yet
        // indexed what it appended.
        assert_eq!(log.compaction_candidate(), None);
        assert!(!log.drop_segment(seg).unwrap());
        drop(pending);
        assert_eq!(log.compaction_candidate(), Some(seg));
        assert!(log.drop_segment(seg).unwrap());
        assert!(!dir
            .path()
            .join(SEGMENTS_DIR)
            .join(segment_name(seg))
            .exists());
    }

    /// A sealed segment whose open found damage (acknowledged shards it can
    /// no longer name) is neither compacted nor dropped until the damage is
    /// mended, after the store reported it: the damage is the only record
    /// of those shards, and a compaction would take it away with the file.
    #[test]
    fn a_segment_with_damage_to_mend_is_never_compacted_away() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![0x44; 4000];
        let loc = {
            let log = SegmentLog::open(dir.path()).unwrap();
            let (loc, _) = log.put(&shard(8, &big), &big).unwrap();
            let mut active = lock(&log.active);
            log.seal(&mut active, false).unwrap();
            loc
        };
        // Its only record's frame damaged at its start: a stretch the next
        // open no longer reads as a record, and nothing current left in it.
        let path = dir.path().join(SEGMENTS_DIR).join(segment_name(loc.seg));
        let mut bytes = fs::read(&path).unwrap();
        for b in &mut bytes[loc.off as usize..loc.off as usize + 8] {
            *b ^= 0xff;
        }
        fs::write(&path, bytes).unwrap();
        let log = SegmentLog::open(dir.path()).unwrap();
        assert!(log.damage_to_mend() > 0);
        assert_ne!(log.compaction_candidate(), Some(loc.seg));
        assert!(!log.drop_segment(loc.seg).unwrap());
        assert!(path.exists());
        log.mend_damage().unwrap();
        assert_eq!(log.compaction_candidate(), Some(loc.seg));
    }

    /// A segment sealed while compaction chose its candidate is the new
    /// active one, empty: neither the choice nor the removal may take it.
    #[test]
    fn the_active_segment_is_never_compacted_away() {
        let dir = tempfile::tempdir().unwrap();
        let log = SegmentLog::open(dir.path()).unwrap();
        let (sealed, _, _, pending) = log.append(KIND_DELETE, b"x", &[]).unwrap();
        drop(pending);
        {
            let mut active = lock(&log.active);
            log.seal(&mut active, false).unwrap();
        }
        let active = lock(&log.active).id;
        assert!(active > sealed);
        // The new active segment holds nothing current and nothing in
        // flight, like the one just sealed.
        assert!(
            !log.drop_segment(active).unwrap(),
            "dropped the active segment"
        );
        let file = dir.path().join(SEGMENTS_DIR).join(segment_name(active));
        assert!(file.exists());
        assert_eq!(log.compaction_candidate(), Some(sealed));
        // A put after all that lands in a file that is still there.
        let body = b"after".to_vec();
        let h = shard(3, &body);
        let (loc, _) = log.put(&h, &body).unwrap();
        assert_eq!(loc.seg, active);
        let reopened = SegmentLog::open(dir.path()).unwrap();
        assert!(matches!(
            reopened.read(&h.key, loc, false).unwrap(),
            ReadRecord::Shard(_, b) if b == body
        ));
    }

    /// A crash can keep a copy's frame and head without its body (appended,
    /// never fsynced). At the next open the intact older record must stay
    /// the key's, not be hidden by the torn copy.
    #[test]
    fn a_torn_copy_does_not_hide_the_intact_record() {
        let dir = tempfile::tempdir().unwrap();
        let body = vec![0x5a; 3000];
        let h = shard(4, &body);
        let (first, torn) = {
            let log = SegmentLog::open(dir.path()).unwrap();
            let (first, _) = log.put(&h, &body).unwrap();
            {
                let mut active = lock(&log.active);
                log.seal(&mut active, false).unwrap();
            }
            let (seg, off, len, pending) = log.append(KIND_SHARD, &h.encode(), &body).unwrap();
            drop(pending);
            log.wait_durable(seg, off + len as u64).unwrap();
            (first, Loc { seg, off, len })
        };
        assert!(torn.seg > first.seg);
        // The copy's body pages never reached the disk.
        let path = dir.path().join(SEGMENTS_DIR).join(segment_name(torn.seg));
        let mut bytes = fs::read(&path).unwrap();
        let body_at = (torn.off + torn.len as u64) as usize - body.len();
        bytes[body_at..body_at + 2048].fill(0);
        fs::write(&path, bytes).unwrap();

        let log = SegmentLog::open(dir.path()).unwrap();
        assert_eq!(log.locate(&h.key), Some(first));
        assert!(matches!(
            log.read(&h.key, first, false).unwrap(),
            ReadRecord::Shard(_, b) if b == body
        ));
    }

    /// A record torn by a crash mid-append (never acknowledged) is cut off
    /// at the next open: its part of a shard's body, which no expunge can
    /// find (it is not a record), does not stay on the disk.
    #[test]
    fn a_torn_record_at_a_segments_end_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let body: Vec<u8> = (0..4000u32).map(|i| (i * 31 % 241) as u8 | 1).collect();
        let h = shard(9, &body);
        let loc = {
            let log = SegmentLog::open(dir.path()).unwrap();
            let loc = log.put(&h, &body).unwrap().0;
            // A crash: no clean close (which would write a durable mark).
            std::mem::forget(log);
            loc
        };
        let path = dir.path().join(SEGMENTS_DIR).join(segment_name(loc.seg));
        let full = fs::read(&path).unwrap();
        let end = (loc.off + loc.len as u64) as usize;
        assert_eq!(full.len(), end);
        // The crash: only the first half of the body reached the disk.
        fs::write(&path, &full[..end - body.len() / 2]).unwrap();
        let half = &body[..body.len() / 2];
        let holds = |bytes: &[u8]| bytes.windows(half.len()).any(|w| w == half);
        assert!(holds(&fs::read(&path).unwrap()));

        let log = SegmentLog::open(dir.path()).unwrap();
        assert_eq!(log.locate(&h.key), None, "a torn record was indexed");
        let now = fs::read(&path).unwrap();
        assert_eq!(now.len() as u64, loc.off, "the torn record was not cut off");
        assert!(!holds(&now));
        // The log goes on: a new put, read back after another open.
        log.put(&h, &body).unwrap();
        drop(log);
        let log = SegmentLog::open(dir.path()).unwrap();
        let at = log.locate(&h.key).unwrap();
        assert!(matches!(
            log.read(&h.key, at, false).unwrap(),
            ReadRecord::Shard(_, b) if b == body
        ));
    }

    /// A damaged record with no older copy stays indexed, so a read finds
    /// it damaged (and the store quarantines and reports it for repair)
    /// instead of the shard quietly vanishing at the next open.
    #[test]
    fn a_damaged_only_copy_stays_indexed_to_be_found() {
        let dir = tempfile::tempdir().unwrap();
        let body = vec![0x33; 2000];
        let h = shard(7, &body);
        let loc = {
            let log = SegmentLog::open(dir.path()).unwrap();
            log.put(&h, &body).unwrap().0
        };
        let path = dir.path().join(SEGMENTS_DIR).join(segment_name(loc.seg));
        let mut bytes = fs::read(&path).unwrap();
        bytes[(loc.end() - 10) as usize] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        let log = SegmentLog::open(dir.path()).unwrap();
        assert_eq!(log.locate(&h.key), Some(loc));
        assert!(matches!(
            log.read(&h.key, loc, false).unwrap(),
            ReadRecord::Damaged(..)
        ));
    }

    /// A segment whose header was written but whose fsync failed held no
    /// record: the next attempt at that id starts it again instead of
    /// refusing every small put until a restart.
    #[test]
    fn a_header_only_leftover_segment_is_started_again() {
        let dir = tempfile::tempdir().unwrap();
        let segments = dir.path().join(SEGMENTS_DIR);
        fs::create_dir_all(&segments).unwrap();
        let mut header = HEADER_MAGIC.to_vec();
        header.extend_from_slice(&[1; 32]);
        fs::write(segments.join(segment_name(1)), &header).unwrap();
        let (again, _) = create_segment(&segments, 1).unwrap();
        assert_ne!(again.key, [1; 32]);
        // One holding a record is never started again.
        let log = SegmentLog::open(dir.path()).unwrap();
        let body = b"kept".to_vec();
        let (loc, _) = log.put(&shard(5, &body), &body).unwrap();
        assert!(create_segment(&segments, loc.seg).is_err());
    }

    /// Records appended together across a seal are durable only if every
    /// segment they went to is: a failed fsync of the earlier one is not
    /// hidden by the later one's success.
    #[test]
    fn records_straddling_a_failed_segment_are_not_durable() {
        let dir = tempfile::tempdir().unwrap();
        let log = SegmentLog::open(dir.path()).unwrap();
        let body = b"copy".to_vec();
        let h = shard(6, &body);
        let (a, a_off, a_len, pa) = log.append(KIND_SHARD, &h.encode(), &body).unwrap();
        // Its fsync failed (as `wait_durable` records it); the next append
        // seals it without an fsync and goes on in a new segment.
        lock(&log.sync).failed.insert(a);
        let (b, b_off, b_len, pb) = log.append(KIND_SHARD, &h.encode(), &body).unwrap();
        assert!(b > a);
        assert!(log.wait_durable(b, b_off + b_len as u64).is_ok());
        assert!(log
            .wait_all_durable([(a, a_off + a_len as u64), (b, b_off + b_len as u64)])
            .is_err());
        drop((pa, pb));
    }

    fn shard(n: u8, body: &[u8]) -> ShardHeader {
        ShardHeader {
            key: ShardKey {
                evidence: protocol::EvidenceId([n; 16]),
                stripe: 0,
                index: 0,
            },
            code: protocol::ErasureCode::new(4, 2, 1 << 20).unwrap(),
            stripe_len: body.len() as u64,
            len: body.len() as u32,
            blake3: protocol::Blake3Hash::of(body),
        }
    }

    /// A scan of the whole index a chunk at a time sees every entry once,
    /// across chunk boundaries, and stops when told.
    #[test]
    fn the_index_is_scanned_whole_a_chunk_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let log = SegmentLog::open(dir.path()).unwrap();
        let n = 40_000u64;
        {
            let mut index = log.write_index();
            for i in 0..n {
                let key = ShardKey {
                    evidence: protocol::EvidenceId([(i % 251) as u8; 16]),
                    stripe: i,
                    index: 0,
                };
                let loc = Loc {
                    seg: 1 + i % 3,
                    off: i,
                    len: 1,
                };
                index.entries.insert(fanout_key(&key), loc);
            }
        }
        let mut seen = std::collections::HashSet::new();
        let mut in_seg_2 = 0;
        log.scan_entries(|k, loc| {
            assert!(seen.insert(*k), "{k} twice");
            in_seg_2 += usize::from(loc.seg == 2);
            true
        });
        assert_eq!(seen.len() as u64, n);
        assert_eq!(in_seg_2 as u64, n / 3);
        let mut calls = 0;
        log.scan_entries(|_, _| {
            calls += 1;
            calls < 20_000
        });
        assert_eq!(calls, 20_000);
    }

    /// A client controls shard bodies. A record it forges inside one (it
    /// cannot know the segment's key) is not indexed, even when damage
    /// right before it sends the scan looking for the next record.
    #[test]
    fn a_record_forged_inside_a_body_is_never_indexed() {
        let dir = tempfile::tempdir().unwrap();
        let victim_body = b"planted".to_vec();
        let victim = shard(9, &victim_body);
        let seg = {
            let log = SegmentLog::open(dir.path()).unwrap();
            let mut body = Vec::new();
            for guess in [[0u8; 32], [0xff; 32]] {
                body.extend(encode_record(
                    &guess,
                    KIND_SHARD,
                    &victim.encode(),
                    &victim_body,
                ));
            }
            let carrier = shard(1, &body);
            let (loc, _) = log.put(&carrier, &body).unwrap();
            loc
        };
        let path = dir.path().join(SEGMENTS_DIR).join(segment_name(seg.seg));
        let mut bytes = fs::read(&path).unwrap();
        // Damage the carrier's frame: the scan resynchronises past it.
        bytes[seg.off as usize + 20] ^= 1;
        fs::write(&path, bytes).unwrap();
        let log = SegmentLog::open(dir.path()).unwrap();
        assert_eq!(log.locate(&victim.key), None, "a forged record was indexed");
        assert_eq!(log.usage().shards, 0);
    }

    fn holds(path: &Path, needle: &[u8]) -> bool {
        fs::read(path)
            .unwrap()
            .windows(needle.len())
            .any(|w| w == needle)
    }

    /// A shard record's bytes leave the segment when it dies: replaced by a
    /// later copy, or deleted; and one a crash left behind (its tombstone
    /// durable, its erasure not) is erased at the next open. What stays
    /// current reads back whole throughout.
    #[test]
    fn dead_records_are_erased_and_a_crash_does_not_keep_one() {
        let dir = tempfile::tempdir().unwrap();
        let secret = |tag: u8| -> Vec<u8> {
            let mut out = vec![0u8; 3000];
            blake3::Hasher::new()
                .update(&[tag])
                .finalize_xof()
                .fill(&mut out);
            out
        };
        let (kept, gone) = (secret(1), secret(2));
        let (hk, hg) = (shard(1, &kept), shard(2, &gone));
        let log = SegmentLog::open(dir.path()).unwrap();
        let (first, _) = log.put(&hk, &kept).unwrap();
        let (again, old) = log.put(&hk, &kept).unwrap();
        assert_eq!(old, Some(first));
        let (dead, _) = log.put(&hg, &gone).unwrap();
        let path = log.segment_path(dead.seg);
        let record = {
            let mut b = vec![0u8; dead.len as usize];
            File::open(&path)
                .unwrap()
                .read_exact_at(&mut b, dead.off)
                .unwrap();
            b
        };
        let syncs = log.syncs.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(log.delete(&hg.key, None).unwrap(), Some(dead));
        log.sync_erasures(None).unwrap();
        assert!(!holds(&path, &gone[..64]), "a deleted shard's bytes stayed");
        // The tombstone's fsync came before the erasure was written: the
        // erasure, in the active segment, has an fsync of its own.
        assert!(
            log.syncs.load(std::sync::atomic::Ordering::Relaxed) >= syncs + 2,
            "the erasure was not made durable"
        );
        let copies = fs::read(&path)
            .unwrap()
            .windows(64)
            .filter(|w| *w == &kept[..64])
            .count();
        assert_eq!(copies, 1, "the replaced copy stayed beside the current one");
        assert!(
            matches!(log.read(&hk.key, again, false).unwrap(), ReadRecord::Shard(_, b) if b == kept)
        );
        drop(log);

        // A crash between the tombstone and the erasure: the record is back.
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&record, dead.off)
            .unwrap();
        assert!(holds(&path, &gone[..64]));
        let log = SegmentLog::open(dir.path()).unwrap();
        assert!(!holds(&path, &gone[..64]), "not erased at open");
        assert_eq!(log.locate(&hg.key), None);
        let now = log.locate(&hk.key).unwrap();
        assert!(
            matches!(log.read(&hk.key, now, false).unwrap(), ReadRecord::Shard(_, b) if b == kept)
        );
        drop(log);
        // An erasure torn by a crash (part of the body zeros, part not):
        // erased at the next open too.
        let half = record.len() / 2;
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&record[half..], dead.off + half as u64)
            .unwrap();
        let tail = &gone[gone.len() - 64..];
        assert!(holds(&path, tail));
        let log = SegmentLog::open(dir.path()).unwrap();
        assert!(!holds(&path, tail), "a torn erasure was not erased again");
        assert_eq!(log.usage().shards, 1);
        drop(log);
        // Erased records read as nothing at the next open.
        let log = SegmentLog::open(dir.path()).unwrap();
        assert_eq!(log.usage().shards, 1);
        let now = log.locate(&hk.key).unwrap();
        assert!(
            matches!(log.read(&hk.key, now, false).unwrap(), ReadRecord::Shard(_, b) if b == kept)
        );
    }

    /// A segment file longer than any segment can be (its size damaged) is
    /// never read whole: taken for damaged, its shards unserved, and the
    /// log opens and serves on. Compaction refuses it too.
    #[test]
    fn a_segment_longer_than_any_is_damaged_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let log = SegmentLog::open(dir.path()).unwrap();
        let body = b"in the grown segment".to_vec();
        let (loc, _) = log.put(&shard(5, &body), &body).unwrap();
        assert!(log.survivors(loc.seg).is_ok());
        let path = log.segment_path(loc.seg);
        // Sparse: no disk space, and no read of it.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(MAX_SEGMENT_FILE + 1).unwrap();
        let err = log.survivors(loc.seg).unwrap_err();
        assert!(err.to_string().contains("longer than any segment"), "{err}");
        drop(log);
        let log = SegmentLog::open(dir.path()).unwrap();
        assert_eq!(log.damaged_segments(), &[loc.seg]);
        assert_eq!(log.locate(&shard(5, &body).key), None);
        let other = b"after".to_vec();
        let (after, _) = log.put(&shard(6, &other), &other).unwrap();
        assert_ne!(after.seg, loc.seg);
        assert_eq!(log.locate(&shard(6, &other).key), Some(after));
    }

    #[test]
    fn only_canonical_segment_names_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let segments = dir.path().join(SEGMENTS_DIR);
        fs::create_dir_all(&segments).unwrap();
        fs::write(segments.join("seg-1"), b"junk").unwrap();
        fs::write(segments.join("seg-+2"), b"junk").unwrap();
        let log = SegmentLog::open(dir.path()).unwrap();
        assert_eq!(log.usage().shards, 0);
        assert_eq!(lock(&log.active).id, 1, "stray names take no id");
    }

    proptest! {
        #[test]
        fn scanning_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut seen = 0;
            for_each_record(&[7; 32], &bytes, |_, _, _, _| seen += 1);
            prop_assert!(seen <= bytes.len() / FRAME + 1);
        }

        /// Damage to one byte costs at most the record holding it: the scan
        /// finds every other record at its offset.
        #[test]
        fn damage_costs_only_the_damaged_record(
            records in proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 0..64), proptest::collection::vec(any::<u8>(), 0..300)),
                1..12,
            ),
            at in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let key = [7; 32];
            let mut bytes = vec![0; HEADER_LEN];
            let mut spans = Vec::new();
            for (head, body) in &records {
                let start = bytes.len();
                bytes.extend(encode_record(&key, KIND_SHARD, head, body));
                spans.push(start..bytes.len());
            }
            let hit = HEADER_LEN + at.index(bytes.len() - HEADER_LEN);
            bytes[hit] ^= 1 << bit;
            let mut found = Vec::new();
            for_each_record(&key, &bytes, |_, _, off, _| found.push(off as usize));
            for span in spans.iter().filter(|s| !s.contains(&hit)) {
                prop_assert!(found.contains(&span.start), "record at {} lost", span.start);
            }
        }
    }
}
