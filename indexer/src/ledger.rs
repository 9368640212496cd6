//! The notarization ledger's state on the ordered KV store: the outbox of
//! pending statements, the integrator's lease, the tree, the private openings
//! and the latest signed checkpoint.
//!
//! Key layout (integers big-endian; values are `encode_versioned` records
//! unless said otherwise):
//!
//! ```text
//! ("Q", versionstamp 10, seq u16)    = PendingRecord   outbox, ordered by commit (v1: one statement,
//!                                    | [PendingRecord]   v2: a chunk one transaction queued together)
//! ("L", "state")                     = TreeState       size, root, fence of the last integration
//! ("L", "lease")                     = LeaseRecord     the one integrator allowed to append
//! ("L", "checkpoint")                = signed note     newest checkpoint (raw bytes)
//! ("L", "checkpoint_size")           = u64             its tree size
//! ("L", "witnessed")                 = WitnessedRecord newest checkpoint with witness cosignatures
//! ("L", "stamped")                   = WitnessedRecord newest checkpoint with an RFC 3161 token
//! ("L", "tsa", size u64)             = TimeStampResp   RFC 3161 token over that checkpoint's text
//! ("N", first leaf u64)              = [LeafRecord]    openings of leaves first.. (a group); private
//! ("T", level u8, n u64)             = tile data       hash tile (level, n) at its current width
//! ("V", evidence 16, leaf u64)       = kind            the leaves that name a piece of evidence
//!                                                      (statements queued singly)
//! ("O", id 16)                       = tenant          a hash-only notarization (no bytes stored),
//!                                                      as `recover-index` restores them
//! ("P", id 16)                       = NotarizedRecord a hash-only notarization queued in a chunk:
//!                                                      tenant, chunk, position in the chunk
//! ("M", chunk 16)                    = leaf u64        the leaf of a chunk's first statement
//! ```
//!
//! A chunk ([`enqueue_notarizations_tx`]) is named by its first statement's
//! evidence id. Its statements get no "V" links: the integration writes one
//! "M" key per chunk, and a statement's leaf is the chunk's plus its position
//! ("P"), so an integration of 8,192 notarizations writes a few dozen keys
//! for them instead of 8,192.
//!
//! A statement is enqueued in the same transaction as the change it records
//! (the manifest commit for `filed`), so evidence is never visible without its
//! statement. Versionstamps only order the queue; dense leaf indices are
//! assigned by one integrator holding the lease, and every integration checks
//! in its own transaction that its fencing token is still the lease's and that
//! the tree is the one it extended. The tree hashes live here, so tiles and
//! checkpoints can always be re-published from the index after a crash.
//!
//! Both the openings and the tree hashes are stored in groups rather than one
//! key each, because an integration writes thousands of leaves at once and
//! the cost of a transaction is mostly per key. Openings: each integration
//! cuts its leaves into groups of at most [`GROUP_LEAVES`] leaves and
//! [`GROUP_BYTES`] bytes (a lone statement of 64 KiB always fits under
//! FoundationDB's 100 kB value limit); leaf `n` is in the group with the
//! greatest first leaf `<= n`. Tree hashes: the C2SP tlog-tiles tiles of
//! height 8 (the same bytes as the published `tile/` files), rewritten as a
//! partial tile grows; every stored hash is a tile entry or the root of a run
//! of entries of one tile (`tlog_tiles::Tile::hash_at_index`).

use crate::kv::Transaction;
use crate::schema::{evidence_key, SchemaError};
use protocol::wire::{decode_versioned, encode_versioned};
use protocol::EvidenceId;
use serde::{Deserialize, Serialize};

const QUEUE: u8 = b'Q';
const LEDGER: u8 = b'L';
const GROUP: u8 = b'N';
const TILE: u8 = b'T';

/// Most leaves in one openings group.
pub const GROUP_LEAVES: usize = 64;
/// Most statement bytes in one openings group (unless it holds one leaf).
pub const GROUP_BYTES: usize = 90_000;
const BY_EVIDENCE: u8 = b'V';
const NOTARIZED: u8 = b'O';
const NOTARIZED_IN_CHUNK: u8 = b'P';
const CHUNK_START: u8 = b'M';

const RECORD_V1: u8 = 1;
/// The archive's record version (1 was one file per tile, without `first`).
const ARCHIVE_V2: u8 = 2;
/// A queue value holding several statements ([`enqueue_notarizations_tx`]).
const QUEUE_CHUNK_V2: u8 = 2;
/// The first queue-key suffix of a transaction's chunks; single statements
/// ([`enqueue_tx`]) use the suffixes below it.
pub const CHUNK_SEQ: u16 = 0x8000;
/// The first suffix of chunks whose statements have "P" records (numbered
/// apart from chunks queued by the previous version, without them, whose
/// statements the integration still links with "V" keys).
const NAMED_CHUNK_SEQ: u16 = 0xC000;
/// What a queued statement's record adds to its length (evidence id, salt,
/// length prefixes), counted when cutting chunks under the value limit.
const RECORD_OVERHEAD: usize = 64;

/// Where a hash-only notarization was queued: its tenant, the chunk (named
/// by the chunk's first statement's evidence id) and its position there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotarizedRecord {
    pub tenant: String,
    pub chunk: EvidenceId,
    pub position: u32,
}

/// A statement waiting for a leaf index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRecord {
    pub evidence: EvidenceId,
    pub salt: [u8; 32],
    // serde_bytes: postcard then copies the bytes in one go instead of one
    // `u8` at a time (the encoding is the same: a varint length, the bytes).
    #[serde(with = "serde_bytes")]
    pub statement: Vec<u8>,
}

/// One leaf as the private openings archive keeps it (beside the public
/// tiles, never served): the opening, and for statements about stored
/// evidence the manifest header as it stood when the leaf was integrated,
/// so `recover-index` can rebuild the index from the archive and the nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedLeaf {
    pub evidence: EvidenceId,
    pub salt: [u8; 32],
    #[serde(with = "serde_bytes")]
    pub statement: Vec<u8>,
    /// `ManifestHeader::encode()`; `None` for hash-only notarizations.
    #[serde(with = "serde_bytes")]
    pub manifest: Option<Vec<u8>>,
    /// The manifest had been expunged by then.
    pub expunged: bool,
}

/// One file of the openings archive: the leaves `first..first + leaves.len()`
/// as one integration published them. Its name is [`archive_name`], so a
/// file is only ever rewritten with the same leaves (an integrator that lost
/// its lease can at worst rewrite a run another integrator also wrote, never
/// replace a longer run with a shorter one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveRun {
    pub first: u64,
    pub leaves: Vec<ArchivedLeaf>,
}

/// Encodes a run of archived leaves.
pub fn encode_archive(run: &ArchiveRun) -> Vec<u8> {
    encode_versioned(ARCHIVE_V2, run)
}

/// Decodes [`encode_archive`]'s bytes.
pub fn decode_archive(bytes: &[u8]) -> Result<ArchiveRun, protocol::DecodeError> {
    decode_versioned(ARCHIVE_V2, bytes)
}

/// The archive file of leaves `first..end`: `DDDDDDD/FFFF...-EEEE...`, a
/// directory per 65,536 leaves and zero-padded decimal indexes, so names
/// sort in leaf order.
pub fn archive_name(first: u64, end: u64) -> String {
    format!("{:07}/{first:020}-{end:020}", first >> 16)
}

/// The leaf range an archive file name stands for (`None`: not an archive
/// file, such as a store's temporary file).
pub fn parse_archive_name(name: &str) -> Option<std::ops::Range<u64>> {
    let (dir, file) = name.rsplit_once('/')?;
    let (first, end) = file.split_once('-')?;
    if first.len() != 20 || end.len() != 20 || dir.len() != 7 {
        return None;
    }
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !digits(first) || !digits(end) || !digits(dir) {
        return None;
    }
    let (first, end): (u64, u64) = (first.parse().ok()?, end.parse().ok()?);
    (first < end && dir.parse::<u64>().ok()? == first >> 16).then_some(first..end)
}

/// From archive files' leaf ranges (in any order), the files to read to
/// cover leaves `0..n` for the greatest `n` they cover without a gap, in
/// leaf order: each file with the leaf it is read from. Overlapping runs
/// (a run re-published after a crash, say) are fine: the one reaching
/// furthest wins.
pub fn archive_chain(ranges: &[std::ops::Range<u64>]) -> Vec<(usize, u64)> {
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    order.sort_by_key(|&i| ranges[i].start);
    let mut chain = Vec::new();
    let (mut pos, mut next) = (0u64, 0usize);
    loop {
        let mut best: Option<usize> = None;
        while let Some(&i) = order.get(next) {
            if ranges[i].start > pos {
                break;
            }
            if best.is_none_or(|b| ranges[i].end > ranges[b].end) {
                best = Some(i);
            }
            next += 1;
        }
        match best {
            Some(b) if ranges[b].end > pos => {
                chain.push((b, pos));
                pos = ranges[b].end;
            }
            _ => return chain,
        }
    }
}

/// The opening of an integrated leaf.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeafRecord {
    pub evidence: EvidenceId,
    pub salt: [u8; 32],
    #[serde(with = "serde_bytes")]
    pub statement: Vec<u8>,
    /// The log entry: `SHA-256(salt || statement)`.
    pub commitment: [u8; 32],
}

/// The tree as of the last integration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeState {
    pub size: u64,
    pub root: [u8; 32],
    /// The fencing token of the integrator that wrote it.
    pub fence: u64,
}

/// Who may integrate, until when.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub owner: u128,
    pub until_ms: u64,
    /// Grows by one whenever the lease changes hands.
    pub fence: u64,
}

fn ledger_key(name: &str) -> Vec<u8> {
    let mut k = vec![LEDGER];
    k.extend_from_slice(name.as_bytes());
    k
}

fn u64_key(tag: u8, n: u64) -> Vec<u8> {
    let mut k = vec![tag];
    k.extend_from_slice(&n.to_be_bytes());
    k
}

fn by_evidence_prefix(evidence: &EvidenceId) -> Vec<u8> {
    evidence_key(BY_EVIDENCE, evidence)
}

/// Queues a statement; it is integrated after this transaction commits.
/// Every key a transaction versionstamps gets the same stamp (as in
/// FoundationDB), so `seq` must differ between the statements one transaction
/// queues; it also orders them, and stays below [`CHUNK_SEQ`], where the
/// chunks of [`enqueue_notarizations_tx`] start (so the two never share a key).
pub fn enqueue_tx<T: Transaction>(tx: &T, seq: u16, rec: &PendingRecord) {
    // A bug if not: a statement queued at a chunk's number would be taken for
    // a chunk and get no "V" link (found by nobody).
    assert!(
        seq < CHUNK_SEQ,
        "single statements are queued below CHUNK_SEQ"
    );
    tx.set_versionstamped_key(
        &[QUEUE],
        &seq.to_be_bytes(),
        &encode_versioned(RECORD_V1, rec),
    );
}

/// Queues hash-only notarizations of `tenant` in order, as chunks of up to
/// [`GROUP_BYTES`] (a statement and its record overhead counted) under one
/// queue key each: the queue then costs a key per chunk, not per statement,
/// both here and when the integration dequeues it. Chunk keys are numbered
/// from `NAMED_CHUNK_SEQ` (above [`CHUNK_SEQ`]), after any statement the same
/// transaction queues singly. Each statement gets a "P" record naming its
/// chunk and position, returned in order (the integration gives each chunk
/// one "M" key, not a "V" link per statement). A gateway of a version before
/// chunks cannot read them: upgrade every gateway before any of them queues
/// chunks.
pub fn enqueue_notarizations_tx<T: Transaction>(
    tx: &T,
    recs: &[PendingRecord],
    tenant: &str,
) -> Vec<(EvidenceId, u32)> {
    let mut placed = Vec::with_capacity(recs.len());
    for (seq, range) in (NAMED_CHUNK_SEQ..).zip(chunk_ranges(recs)) {
        let chunk = &recs[range];
        tx.set_versionstamped_key(
            &[QUEUE],
            &seq.to_be_bytes(),
            &encode_versioned(QUEUE_CHUNK_V2, &chunk),
        );
        let name = chunk[0].evidence;
        for (position, r) in (0u32..).zip(chunk) {
            let rec = NotarizedRecord {
                tenant: tenant.to_owned(),
                chunk: name,
                position,
            };
            tx.set(
                &evidence_key(NOTARIZED_IN_CHUNK, &r.evidence),
                &encode_versioned(RECORD_V1, &rec),
            );
            placed.push((name, position));
        }
    }
    placed
}

/// `recs` cut into chunks of at most [`GROUP_BYTES`] (each holds at least
/// one statement). Every chunk but the last holds over 24 kB and a
/// transaction at most 10 MB, so a transaction's chunk numbers stay far
/// below `u16::MAX - NAMED_CHUNK_SEQ`.
fn chunk_ranges(recs: &[PendingRecord]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0usize, 0usize);
    for (i, r) in recs.iter().enumerate() {
        let len = r.statement.len() + RECORD_OVERHEAD;
        if i > start && bytes + len > GROUP_BYTES {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += len;
    }
    if start < recs.len() {
        out.push(start..recs.len());
    }
    out
}

/// Whether a queue key is a chunk's whose statements have "P" records.
fn is_named_chunk_key(key: &[u8]) -> bool {
    key.len() == 1 + crate::kv::VERSIONSTAMP_BYTES + 2
        && u16::from_be_bytes([key[key.len() - 2], key[key.len() - 1]]) >= NAMED_CHUNK_SEQ
}

/// The oldest pending statements (at most `limit`, at most `max_bytes` of
/// statements, but always at least one queue key's worth, also when `limit`
/// is 0), with their queue keys. A chunk of [`enqueue_notarizations_tx`] is taken
/// whole or not at all, since the integration dequeues with one range clear
/// up to the last key.
pub async fn pending_tx<T: Transaction>(
    tx: &T,
    limit: usize,
    max_bytes: usize,
) -> Result<Vec<(Vec<u8>, PendingRecord)>, SchemaError> {
    Ok(pending_batch_tx(tx, None, limit, max_bytes).await?.records)
}

/// As [`pending_tx`], for the statements queued after the queue key `after`
/// (the last key of a batch whose integration is still committing).
pub async fn pending_after_tx<T: Transaction>(
    tx: &T,
    after: &[u8],
    limit: usize,
    max_bytes: usize,
) -> Result<Vec<(Vec<u8>, PendingRecord)>, SchemaError> {
    Ok(pending_batch_tx(tx, Some(after), limit, max_bytes)
        .await?
        .records)
}

/// A batch of pending statements.
#[derive(Debug)]
pub struct PendingBatch {
    pub records: Vec<(Vec<u8>, PendingRecord)>,
    /// The batch holds everything queued (after `after`) when it was read;
    /// false when a limit may have left some behind (a backlog).
    pub whole: bool,
}

/// As [`pending_tx`] (after the queue key `after`, if given), saying
/// whether the batch took the whole queue.
pub async fn pending_batch_tx<T: Transaction>(
    tx: &T,
    after: Option<&[u8]>,
    limit: usize,
    max_bytes: usize,
) -> Result<PendingBatch, SchemaError> {
    let from = match after {
        Some(after) => {
            let mut from = after.to_vec();
            from.push(0);
            from
        }
        None => vec![QUEUE],
    };
    pending_from_tx(tx, from, limit, max_bytes).await
}

async fn pending_from_tx<T: Transaction>(
    tx: &T,
    mut from: Vec<u8>,
    limit: usize,
    max_bytes: usize,
) -> Result<PendingBatch, SchemaError> {
    let cut = |records| PendingBatch {
        records,
        whole: false,
    };
    // Read in growing pages: a key holds one statement or a few hundred, and
    // reading `limit` keys at once could read the whole queue.
    let mut page = 16usize;
    let mut out = Vec::new();
    let mut bytes = 0;
    loop {
        let want = page.min(limit.max(1));
        let rows = tx.get_range(&from, &[QUEUE + 1], want, false).await?;
        let exhausted = rows.len() < want;
        if let Some((last, _)) = rows.last() {
            from = last.clone();
            from.push(0);
        }
        for (k, v) in rows {
            let recs: Vec<PendingRecord> = match v.first() {
                Some(&QUEUE_CHUNK_V2) => decode_versioned(QUEUE_CHUNK_V2, &v)?,
                _ => vec![decode_versioned(RECORD_V1, &v)?],
            };
            let chunk: usize = recs.iter().map(|r| r.statement.len()).sum();
            if !out.is_empty() && (out.len() + recs.len() > limit || bytes + chunk > max_bytes) {
                return Ok(cut(out));
            }
            bytes += chunk;
            out.extend(recs.into_iter().map(|r| (k.clone(), r)));
            if out.len() >= limit || bytes >= max_bytes {
                return Ok(cut(out));
            }
        }
        if exhausted {
            return Ok(PendingBatch {
                records: out,
                whole: true,
            });
        }
        page = (page * 2).min(1024);
    }
}

pub async fn tree_state_tx<T: Transaction>(tx: &T) -> Result<TreeState, SchemaError> {
    match tx.get(&ledger_key("state")).await? {
        Some(v) => Ok(decode_versioned(RECORD_V1, &v)?),
        None => Ok(TreeState {
            size: 0,
            root: protocol::ledger::empty_root().0,
            fence: 0,
        }),
    }
}

/// Takes or renews the integrator lease for `owner`; returns its fencing
/// token, or (as `Err`) the other owner's lease that is live by `now_ms`.
///
/// `stale`: a lease the caller has watched go unrenewed, unchanged, for a
/// whole lease term of its own monotonic clock. That one is taken over even
/// if its `until_ms` is ahead by `now_ms`: a holder whose system clock ran
/// ahead and then died would otherwise keep every other gateway from
/// integrating for as long as its clock was wrong. The fence grows, so a
/// holder that was only slow finds its next commit refused.
pub async fn acquire_lease_tx<T: Transaction>(
    tx: &T,
    owner: u128,
    now_ms: u64,
    lease_ms: u64,
    stale: Option<LeaseRecord>,
) -> Result<Result<u64, LeaseRecord>, SchemaError> {
    let key = ledger_key("lease");
    let current: Option<LeaseRecord> = match tx.get(&key).await? {
        Some(v) => Some(decode_versioned(RECORD_V1, &v)?),
        None => None,
    };
    let fence = match current {
        Some(l) if l.owner == owner => l.fence,
        Some(l) if l.until_ms >= now_ms && Some(l) != stale => return Ok(Err(l)),
        Some(l) => l.fence + 1,
        None => 1,
    };
    renew_lease_tx(tx, owner, fence, now_ms, lease_ms);
    Ok(Ok(fence))
}

/// Extends the lease of `owner`, who holds it under `fence` (checked in the
/// same transaction with [`check_fence_tx`]), to `now_ms + lease_ms`.
pub fn renew_lease_tx<T: Transaction>(tx: &T, owner: u128, fence: u64, now_ms: u64, lease_ms: u64) {
    let rec = LeaseRecord {
        owner,
        until_ms: now_ms.saturating_add(lease_ms),
        fence,
    };
    tx.set(&ledger_key("lease"), &encode_versioned(RECORD_V1, &rec));
}

/// Why an integration was refused.
#[derive(Debug, thiserror::Error)]
pub enum IntegrateError {
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// Another integrator holds the lease now.
    #[error("integrator lease lost (fence {0})")]
    Fenced(u64),
    /// The tree moved since this integrator read it.
    #[error("tree is at size {found}, expected {expected}")]
    Moved { expected: u64, found: u64 },
}

impl crate::kv::Retryable for IntegrateError {
    fn is_retryable(&self) -> bool {
        matches!(self, IntegrateError::Schema(e) if crate::kv::Retryable::is_retryable(e))
    }
}

impl From<crate::kv::KvError> for IntegrateError {
    fn from(e: crate::kv::KvError) -> Self {
        IntegrateError::Schema(SchemaError::Kv(e))
    }
}

/// Checks that `fence` still holds the lease and the tree is at `expected`.
pub async fn check_fence_tx<T: Transaction>(
    tx: &T,
    fence: u64,
    expected: u64,
) -> Result<TreeState, IntegrateError> {
    let lease: Option<LeaseRecord> = match tx.get(&ledger_key("lease")).await? {
        Some(v) => Some(decode_versioned(RECORD_V1, &v).map_err(SchemaError::from)?),
        None => None,
    };
    if lease.map(|l| l.fence) != Some(fence) {
        return Err(IntegrateError::Fenced(fence));
    }
    let state = tree_state_tx(tx).await?;
    if state.size != expected {
        return Err(IntegrateError::Moved {
            expected,
            found: state.size,
        });
    }
    Ok(state)
}

/// A hash tile to store: level, index within the level, tile data.
pub type TileData = (u8, u64, Vec<u8>);

/// Writes integrated leaves `first..` in openings groups with the hash tiles
/// they change, removes them from the queue and moves the tree to `state`.
/// Call after [`check_fence_tx`] in the same transaction.
pub fn integrate_tx<T: Transaction>(
    tx: &T,
    first: u64,
    leaves: &[(Vec<u8>, LeafRecord, protocol::ledger::Kind)],
    tiles: &[TileData],
    state: &TreeState,
) {
    // The batch is a prefix of the queue: one range clear dequeues it.
    if let (Some((from, ..)), Some((to, ..))) = (leaves.first(), leaves.last()) {
        let mut end = to.clone();
        end.push(0);
        tx.clear_range(from, &end);
    }
    let mut group: Vec<&LeafRecord> = Vec::new();
    let mut group_first = first;
    let mut group_bytes = 0;
    for (i, (_, leaf, kind)) in leaves.iter().enumerate() {
        let n = first + i as u64;
        if !group.is_empty()
            && (group.len() >= GROUP_LEAVES || group_bytes + leaf.statement.len() > GROUP_BYTES)
        {
            tx.set(
                &u64_key(GROUP, group_first),
                &encode_versioned(RECORD_V1, &group),
            );
            group.clear();
            group_first = n;
            group_bytes = 0;
        }
        group.push(leaf);
        group_bytes += leaf.statement.len();
        let key = &leaves[i].0;
        if is_named_chunk_key(key) {
            // A chunk's statements are found through its first leaf.
            if i == 0 || leaves[i - 1].0 != *key {
                tx.set(&evidence_key(CHUNK_START, &leaf.evidence), &n.to_be_bytes());
            }
        } else {
            let mut v = by_evidence_prefix(&leaf.evidence);
            v.extend_from_slice(&n.to_be_bytes());
            tx.set(&v, &encode_versioned(RECORD_V1, kind));
        }
    }
    if !group.is_empty() {
        tx.set(
            &u64_key(GROUP, group_first),
            &encode_versioned(RECORD_V1, &group),
        );
    }
    for (level, n, data) in tiles {
        tx.set(&tile_key(*level, *n), data);
    }
    tx.set(&ledger_key("state"), &encode_versioned(RECORD_V1, state));
}

fn tile_key(level: u8, n: u64) -> Vec<u8> {
    let mut k = vec![TILE, level];
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// Whether the ledger in this index is in the layout above: an empty tree,
/// or a tree whose first hash tile is stored. (Indexes written before
/// December 2026 kept one key per opening and per tree hash, which this
/// version does not read.)
pub async fn layout_current_tx<T: Transaction>(tx: &T) -> Result<bool, SchemaError> {
    if tree_state_tx(tx).await?.size == 0 {
        return Ok(true);
    }
    Ok(tx.get(&tile_key(0, 0)).await?.is_some())
}

/// Hash tiles by (level, index) at their stored width; `None` for tiles not
/// (yet) stored.
pub async fn tiles_tx<T: Transaction>(
    tx: &T,
    tiles: &[(u8, u64)],
) -> Result<Vec<Option<Vec<u8>>>, SchemaError> {
    let reads = tiles.iter().map(|(level, n)| {
        let key = tile_key(*level, *n);
        async move { tx.get(&key).await }
    });
    Ok(futures::future::try_join_all(reads).await?)
}

/// The first leaf of an openings group from its key.
fn group_first(key: &[u8]) -> Result<u64, SchemaError> {
    let n: [u8; 8] = key
        .get(1..)
        .and_then(|k| k.try_into().ok())
        .ok_or(protocol::DecodeError::Malformed)?;
    Ok(u64::from_be_bytes(n))
}

/// The opening of leaf `n`.
pub async fn leaf_tx<T: Transaction>(tx: &T, n: u64) -> Result<Option<LeafRecord>, SchemaError> {
    Ok(leaves_at_tx(tx, &[n]).await?.pop().map(|(_, l)| l))
}

/// The openings of leaves `indexes` that are stored, by index, in index
/// order; each group is read and decoded once however many of its leaves
/// are asked for.
pub async fn leaves_at_tx<T: Transaction>(
    tx: &T,
    indexes: &[u64],
) -> Result<Vec<(u64, LeafRecord)>, SchemaError> {
    let mut wanted = indexes.to_vec();
    wanted.sort_unstable();
    wanted.dedup();
    let mut out = Vec::with_capacity(wanted.len());
    let mut next = 0;
    while let Some(&n) = wanted.get(next) {
        // The group holding leaf `n` is the last one starting at or before
        // it. The node registry shares the tag with shorter keys (see
        // `schema`'s layout): node `x`'s key sorts just before the groups
        // from leaf x * 2^32 on, so one found in the way is stepped over.
        let mut end = u64_key(GROUP, n.saturating_add(1));
        let row = loop {
            let row = tx.get_range(&u64_key(GROUP, 0), &end, 1, true).await?;
            match row.into_iter().next() {
                Some((key, _)) if key.len() != 9 => end = key,
                row => break row,
            }
        };
        let Some((key, value)) = row.as_ref() else {
            next += 1;
            continue;
        };
        let first = group_first(key)?;
        let group: Vec<LeafRecord> = decode_versioned(RECORD_V1, value)?;
        let end = first + group.len() as u64;
        let mut group: Vec<Option<LeafRecord>> = group.into_iter().map(Some).collect();
        while let Some(&m) = wanted.get(next) {
            if m >= end {
                break;
            }
            if let Some(leaf) = group.get_mut((m - first) as usize).and_then(Option::take) {
                out.push((m, leaf));
            }
            next += 1;
        }
        // `n` itself lies past this group (a hole): skip it.
        if wanted.get(next) == Some(&n) {
            next += 1;
        }
    }
    Ok(out)
}

/// The openings of leaves `range` that are stored, in order and without a
/// gap from `range.start`: all of them for a range inside the tree.
pub async fn leaves_tx<T: Transaction>(
    tx: &T,
    range: std::ops::Range<u64>,
) -> Result<Vec<LeafRecord>, SchemaError> {
    let wanted: Vec<u64> = range.clone().collect();
    Ok(leaves_at_tx(tx, &wanted)
        .await?
        .into_iter()
        .zip(range)
        .take_while(|((n, _), want)| n == want)
        .map(|((_, leaf), _)| leaf)
        .collect())
}

/// The leaves that name `evidence`, oldest first, with their kinds. All of
/// them: every read adds one, so callers serving requests page with
/// [`leaves_of_page_tx`] or stop at the first with [`first_leaf_of_tx`].
pub async fn leaves_of_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
) -> Result<Vec<(u64, protocol::ledger::Kind)>, SchemaError> {
    leaves_of_page_tx(tx, evidence, None, 0).await
}

/// The first leaf about `evidence` of one of `kinds`, if any, read a page
/// at a time (a filing's own statement comes before its reads').
pub async fn first_leaf_of_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
    kinds: &[protocol::ledger::Kind],
) -> Result<Option<(u64, protocol::ledger::Kind)>, SchemaError> {
    const PAGE: usize = 256;
    let mut after = None;
    loop {
        let page = leaves_of_page_tx(tx, evidence, after, PAGE).await?;
        if let Some(found) = page.iter().find(|(_, k)| kinds.contains(k)) {
            return Ok(Some(*found));
        }
        match page.last() {
            Some(&(last, _)) if page.len() == PAGE => after = Some(last),
            _ => return Ok(None),
        }
    }
}

/// The leaf about `evidence`, at index `since` or later, whose opening has
/// `salt`: one statement's own leaf, whatever others of its kind precede
/// it (salts are random per statement).
pub async fn leaf_with_salt_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
    since: u64,
    salt: &[u8; 32],
) -> Result<Option<u64>, SchemaError> {
    const PAGE: usize = 256;
    let mut after = since.checked_sub(1);
    loop {
        let page = leaves_of_page_tx(tx, evidence, after, PAGE).await?;
        let indexes: Vec<u64> = page.iter().map(|(i, _)| *i).collect();
        let found = leaves_at_tx(tx, &indexes)
            .await?
            .into_iter()
            .find(|(_, leaf)| leaf.salt == *salt);
        if let Some((index, _)) = found {
            return Ok(Some(index));
        }
        match page.last() {
            Some(&(last, _)) if page.len() == PAGE => after = Some(last),
            _ => return Ok(None),
        }
    }
}

/// Up to `limit` (0: all) of the leaves about `evidence` after leaf
/// `after`, oldest first, with their kinds.
pub async fn leaves_of_page_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
    after: Option<u64>,
    limit: usize,
) -> Result<Vec<(u64, protocol::ledger::Kind)>, SchemaError> {
    let prefix = by_evidence_prefix(&evidence);
    let mut end = prefix.clone();
    end.extend_from_slice(&[0xff; 9]);
    let begin = match after {
        None => prefix.clone(),
        Some(n) => match n.checked_add(1) {
            Some(next) => [&prefix[..], &next.to_be_bytes()].concat(),
            None => return Ok(Vec::new()),
        },
    };
    let rows = tx.get_range(&begin, &end, limit, false).await?;
    if rows.is_empty() && after.is_none() {
        // A notarization queued in a chunk has no "V" link.
        let leaf = notarized_leaf_tx(tx, evidence).await?;
        return Ok(leaf
            .map(|n| (n, protocol::ledger::Kind::Notarized))
            .into_iter()
            .collect());
    }
    rows.iter()
        .map(|(k, v)| {
            let n: [u8; 8] = k[prefix.len()..]
                .try_into()
                .map_err(|_| protocol::DecodeError::Malformed)?;
            Ok((u64::from_be_bytes(n), decode_versioned(RECORD_V1, v)?))
        })
        .collect()
}

/// Where a notarization was queued in a chunk, if it was.
pub async fn notarized_record_tx<T: Transaction>(
    tx: &T,
    id: EvidenceId,
) -> Result<Option<NotarizedRecord>, SchemaError> {
    match tx.get(&evidence_key(NOTARIZED_IN_CHUNK, &id)).await? {
        Some(v) => Ok(Some(decode_versioned(RECORD_V1, &v)?)),
        None => Ok(None),
    }
}

/// The leaf of a chunk's first statement, once the chunk is integrated.
pub async fn chunk_start_tx<T: Transaction>(
    tx: &T,
    chunk: EvidenceId,
) -> Result<Option<u64>, SchemaError> {
    let Some(v) = tx.get(&evidence_key(CHUNK_START, &chunk)).await? else {
        return Ok(None);
    };
    let n: [u8; 8] = v
        .as_slice()
        .try_into()
        .map_err(|_| protocol::DecodeError::Malformed)?;
    Ok(Some(u64::from_be_bytes(n)))
}

/// The leaf of a notarization queued in a chunk, once integrated.
pub async fn notarized_leaf_tx<T: Transaction>(
    tx: &T,
    id: EvidenceId,
) -> Result<Option<u64>, SchemaError> {
    let Some(rec) = notarized_record_tx(tx, id).await? else {
        return Ok(None);
    };
    Ok(chunk_start_tx(tx, rec.chunk)
        .await?
        .map(|first| first + u64::from(rec.position)))
}

/// The newest signed checkpoint.
pub async fn checkpoint_tx<T: Transaction>(tx: &T) -> Result<Option<Vec<u8>>, SchemaError> {
    Ok(tx.get(&ledger_key("checkpoint")).await?)
}

/// The tree size of the newest signed checkpoint.
pub async fn checkpoint_size_tx<T: Transaction>(tx: &T) -> Result<Option<u64>, SchemaError> {
    Ok(tx
        .get(&ledger_key("checkpoint_size"))
        .await?
        .and_then(|v| v.as_slice().try_into().ok().map(u64::from_be_bytes)))
}

/// Stores a signed checkpoint of `size` unless one at least as large is
/// stored (a slow integrator never rolls the published checkpoint back).
pub async fn put_checkpoint_tx<T: Transaction>(
    tx: &T,
    size: u64,
    note: &[u8],
) -> Result<bool, SchemaError> {
    let key = ledger_key("checkpoint");
    let newer = match tx.get(&ledger_key("checkpoint_size")).await? {
        Some(v) => v.as_slice().try_into().map(u64::from_be_bytes).unwrap_or(0) >= size,
        None => false,
    };
    let have = tx.get(&key).await?.is_some();
    if newer && have {
        return Ok(false);
    }
    tx.set(&key, note);
    tx.set(&ledger_key("checkpoint_size"), &size.to_be_bytes());
    Ok(true)
}

/// Replaces the newest checkpoint's note by `note`, another signature of
/// the same tree at the same `size` (a log key rotated: the tree re-signed
/// under the new key and origin). What was gathered over the old note at
/// that size goes with it: its RFC 3161 token and its witnessed and
/// time-stamped records (each over the old note's text, which names the old
/// origin), for the background tasks to gather again over the new one.
/// Says whether it did: nothing is replaced unless the newest checkpoint is
/// of `size`.
pub async fn replace_checkpoint_tx<T: Transaction>(
    tx: &T,
    size: u64,
    note: &[u8],
) -> Result<bool, SchemaError> {
    if checkpoint_size_tx(tx).await? != Some(size) {
        return Ok(false);
    }
    tx.set(&ledger_key("checkpoint"), note);
    tx.clear(&tsa_key(size));
    if witnessed_tx(tx).await?.is_some_and(|w| w.size == size) {
        tx.clear(&ledger_key("witnessed"));
    }
    if kept_witnessed_tx(tx).await?.is_some_and(|w| w.size == size) {
        tx.clear(&ledger_key("witnessed-kept"));
    }
    if stamped_tx(tx).await?.is_some_and(|s| s.size == size) {
        tx.clear(&ledger_key("stamped"));
    }
    Ok(true)
}

/// Records a hash-only notarization under `id` for `tenant`.
pub fn put_notarization_tx<T: Transaction>(tx: &T, id: EvidenceId, tenant: &str) {
    tx.set(&evidence_key(NOTARIZED, &id), tenant.as_bytes());
}

/// The tenant of a hash-only notarization.
pub async fn notarization_tenant_tx<T: Transaction>(
    tx: &T,
    id: EvidenceId,
) -> Result<Option<String>, SchemaError> {
    if let Some(rec) = notarized_record_tx(tx, id).await? {
        return Ok(Some(rec.tenant));
    }
    Ok(tx
        .get(&evidence_key(NOTARIZED, &id))
        .await?
        .map(|v| String::from_utf8_lossy(&v).into_owned()))
}

/// The newest checkpoint that witnesses cosigned, with their lines merged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessedRecord {
    pub size: u64,
    /// The checkpoint note with every cosignature gathered for this size.
    pub note: String,
}

/// Merges a witness's cosignature lines for the checkpoint `note` of `size`:
/// appended when that size is the one stored, replacing it when newer,
/// ignored when older.
///
/// The record a newer size replaces is kept aside (`witnessed-kept`) when
/// it weighs at least as much as the one kept before (`weight`: how many
/// of the witnesses configured now vouch for a note, nothing for one the
/// log's key no longer verifies): the first witness to cosign a newer
/// checkpoint must not take from every earlier leaf the receipt its full
/// quorum had signed, nor for as long as another witness stays down.
pub async fn add_cosignature_tx<T: Transaction>(
    tx: &T,
    size: u64,
    note: &str,
    lines: &str,
    weight: impl Fn(&str) -> usize,
) -> Result<(), SchemaError> {
    let key = ledger_key("witnessed");
    let current = witnessed_tx(tx).await?;
    let base = match current {
        Some(c) if c.size == size => c.note,
        Some(c) if c.size > size => return Ok(()),
        Some(c) => {
            let kept = kept_witnessed_tx(tx).await?;
            if kept.is_none_or(|k| weight(&c.note) >= weight(&k.note)) {
                tx.set(
                    &ledger_key("witnessed-kept"),
                    &encode_versioned(RECORD_V1, &c),
                );
            }
            note.to_owned()
        }
        None => note.to_owned(),
    };
    let merged = protocol::witness::add_signature_lines(&base, lines);
    tx.set(
        &key,
        &encode_versioned(RECORD_V1, &WitnessedRecord { size, note: merged }),
    );
    Ok(())
}

/// The newest witnessed checkpoint, whose cosignatures are being gathered.
pub async fn witnessed_tx<T: Transaction>(tx: &T) -> Result<Option<WitnessedRecord>, SchemaError> {
    match tx.get(&ledger_key("witnessed")).await? {
        Some(v) => Ok(Some(decode_versioned(RECORD_V1, &v)?)),
        None => Ok(None),
    }
}

/// The best-cosigned earlier checkpoint a newer one replaced (see
/// [`add_cosignature_tx`]).
pub async fn kept_witnessed_tx<T: Transaction>(
    tx: &T,
) -> Result<Option<WitnessedRecord>, SchemaError> {
    match tx.get(&ledger_key("witnessed-kept")).await? {
        Some(v) => Ok(Some(decode_versioned(RECORD_V1, &v)?)),
        None => Ok(None),
    }
}

/// How many of the newest RFC 3161 tokens stay (besides those over the
/// witnessed checkpoints); older ones are cleared as new ones come.
const TSA_TOKENS_KEPT: usize = 16;

fn tsa_key(size: u64) -> Vec<u8> {
    let mut k = ledger_key("tsa");
    k.extend_from_slice(&size.to_be_bytes());
    k
}

/// Stores an RFC 3161 response over the checkpoint `note` of `size`; the
/// newest time-stamped checkpoint only moves forward (an older one stamped
/// late does not replace it).
pub async fn put_timestamp_tx<T: Transaction>(
    tx: &T,
    size: u64,
    note: &str,
    response: &[u8],
) -> Result<(), SchemaError> {
    tx.set(&tsa_key(size), response);
    if stamped_tx(tx).await?.is_some_and(|s| s.size > size) {
        return Ok(());
    }
    // One token a stamping interval, for ever, would grow the index without
    // bound: only those a receipt can still be made with stay (over the
    // checkpoints witnessed and kept aside, which receipts prefer, and the
    // newest few, which a witness round under way may yet make witnessed).
    let newest = tx
        .get_range(&tsa_key(0), &tsa_key(size), TSA_TOKENS_KEPT, true)
        .await?;
    if newest.len() == TSA_TOKENS_KEPT {
        let Some((oldest_kept, _)) = newest.last() else {
            return Ok(());
        };
        // The gaps around those kept are cleared (not everything, then the
        // kept ones written again: a rewrite at every stamp while a
        // witness is away).
        let mut keep: Vec<u64> = [witnessed_tx(tx).await?, kept_witnessed_tx(tx).await?]
            .into_iter()
            .flatten()
            .map(|w| w.size)
            .filter(|&s| tsa_key(s) < *oldest_kept)
            .collect();
        keep.sort_unstable();
        keep.dedup();
        let mut from = tsa_key(0);
        for s in keep {
            tx.clear_range(&from, &tsa_key(s));
            from = tsa_key(s.saturating_add(1));
        }
        tx.clear_range(&from, oldest_kept);
    }
    tx.set(
        &ledger_key("stamped"),
        &encode_versioned(
            RECORD_V1,
            &WitnessedRecord {
                size,
                note: note.to_owned(),
            },
        ),
    );
    Ok(())
}

/// The RFC 3161 response over the checkpoint of `size`, if any.
pub async fn timestamp_tx<T: Transaction>(
    tx: &T,
    size: u64,
) -> Result<Option<Vec<u8>>, SchemaError> {
    Ok(tx.get(&tsa_key(size)).await?)
}

/// The newest time-stamped checkpoint.
pub async fn stamped_tx<T: Transaction>(tx: &T) -> Result<Option<WitnessedRecord>, SchemaError> {
    match tx.get(&ledger_key("stamped")).await? {
        Some(v) => Ok(Some(decode_versioned(RECORD_V1, &v)?)),
        None => Ok(None),
    }
}
