//! The S3 API's records: tenants, access keys, buckets and object versions.
//! Every object version names a piece of evidence (its bytes, receipt and
//! custody live there); these records are the bucket's view of it.
//!
//! Key layout (values are `encode_versioned` records; bucket names are S3's
//! `[a-z0-9.-]{3,63}`; object keys are UTF-8 without NUL, <= 1024 bytes, so a
//! 0x00 terminator is unambiguous):
//!
//! ```text
//! ("3t", tenant)                                    = TenantRecord
//! ("3a", access key id)                             = AccessKeyRecord  secret kept for SigV4
//! ("3b", bucket)                                    = BucketRecord
//! ("3B", tenant, 0x00, bucket)                      = ""               a tenant's buckets
//! ("3v", bucket, 0x00, key, 0x00, !version id 16)   = ObjectVersion    newest first
//! ("3c", bucket, 0x00, key)                         = ObjectVersion    current, unless a delete marker
//! ("3u", upload id 16)                              = MultipartRecord  a multipart upload in progress
//! ("3U", bucket, 0x00, key, 0x00, upload id 16)     = ""               a bucket's uploads, as S3 lists them
//! ("3q")                                            = ""               every upload is in "3U"
//! ("3p", upload id 16, part number u32)             = PartRecord       its parts (stripes under the part's id)
//! ("3o", part id 16)                                = upload id 16 ++ part number u32 BE: where a stored part is recorded, for repair
//! ("3k", source evidence id 16, part id 16)         = ""               a stored part copied from evidence (UploadPartCopy), dropped if it is expunged
//! ("3w", upload id 16)                              = u64 BE ms        its last sign of life: a part stored, a Complete begun
//! ("3x", part id 16)                                = ""               a part of an ended upload (or a replaced one): its shards to delete
//! ("3d", upload id 16)                              = CompletedUpload  a completed upload, for a retried Complete
//! ("3D", completed ms u64 BE, 0x00, upload id 16)   = ""               the same, oldest first, to expire them
//! ("3j", versionstamp 10, record key)               = 1 ++ value | 0   journal of 3t/3b/3v changes, for recovery
//! ("3J")                                            = u64              the journal's epoch
//! ("3Js")                                           = ""               every record is journaled (or archived)
//! ("3Jk")                                           = ""               a seed began: the journal is kept for an archive
//! ("3h")                                            = ""               every version's legal hold is its evidence's
//! ("3l")                                            = ""               every version's lock is its evidence's, on the ledger
//! ("3r")                                            = ""               the evidence's holds are the ledger's (a recovered index)
//! ```
//!
//! Version ids are time-ordered UUIDs (for a PUT, its evidence id, unless
//! that would not sort after the newest version when it commits: then a
//! millisecond past it, see `add_version`), stored bit-inverted so a key's
//! versions read newest first. `3c` duplicates the newest non-marker
//! version so listings are one range read.
//!
//! Every change to a tenant (`3t`), bucket (`3b`) or version (`3v`) record
//! is also written to the journal (`3j`) in the same transaction, keyed by
//! its commit's versionstamp and the record's key, so a transaction leaves
//! each record's final value; the gateway moves the journal durably to the
//! ledger's openings archive ([`journal_tx`], [`clear_journal_tx`]), and
//! `custodia recover-index` replays it ([`replay`]). Versionstamps start
//! again in a new index, so every entry also carries the journal's epoch,
//! which each recovery sets past every epoch in the archive: replay orders
//! by epoch, then versionstamp. The other records are
//! derived (`3B`, `3c`, `3U`), secret (`3a`: access keys are issued anew) or
//! transient (`3u`, `3p`, `3o`, `3k`, `3w`, `3x`: an upload in progress is lost with the index;
//! `3d`, `3D`: what a completed upload answers a retried Complete, kept a
//! day).
//!
//! Object Lock is enforced here, in the transaction that removes a version
//! or changes its retention: COMPLIANCE retention and legal holds refuse
//! every caller; GOVERNANCE only callers the S3 layer says may bypass it.

use crate::kv::{Retryable, Transaction};
use crate::schema::{prefix_end, valid_tenant, Role, SchemaError};
use protocol::wire::{decode_versioned, encode_versioned};
use protocol::EvidenceId;
use serde::{Deserialize, Serialize};

const TENANT: &[u8] = b"3t";
const ACCESS_KEY: &[u8] = b"3a";
const BUCKET: &[u8] = b"3b";
const TENANT_BUCKET: &[u8] = b"3B";
const VERSION: &[u8] = b"3v";
const CURRENT: &[u8] = b"3c";
const MULTIPART: &[u8] = b"3u";
const PART: &[u8] = b"3p";
const PART_PLACE: &[u8] = b"3o";
const COPIED_PART: &[u8] = b"3k";
const UPLOAD_ACTIVE: &[u8] = b"3w";
const PART_DELETION: &[u8] = b"3x";
const BUCKET_UPLOAD: &[u8] = b"3U";
const BUCKET_UPLOADS_INDEXED: &[u8] = b"3q";
const HOLDS_ON_EVIDENCE: &[u8] = b"3h";
const LOCKS_ON_EVIDENCE: &[u8] = b"3l";
const HOLDS_ON_LEDGER: &[u8] = b"3r";
const COMPLETED: &[u8] = b"3d";
const COMPLETED_BY_TIME: &[u8] = b"3D";
const JOURNAL: &[u8] = b"3j";
const JOURNAL_EPOCH: &[u8] = b"3J";
const JOURNAL_SEEDED: &[u8] = b"3Js";
const JOURNAL_KEPT: &[u8] = b"3Jk";

const RECORD_V1: u8 = 1;
/// Bucket records since default retention kept Years apart from Days.
const BUCKET_V2: u8 = 2;

/// Errors of bucket and object records.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error("no such tenant")]
    NoSuchTenant,
    #[error("no such bucket")]
    NoSuchBucket,
    /// `mine`: the caller's tenant already owns it.
    #[error("the bucket already exists")]
    BucketExists { mine: bool },
    #[error("the bucket is not empty")]
    BucketNotEmpty,
    /// The tenant has [`MAX_BUCKETS_PER_TENANT`] buckets already.
    #[error("a tenant has at most {MAX_BUCKETS_PER_TENANT} buckets")]
    TooManyBuckets,
    #[error("no such key")]
    NoSuchKey,
    #[error("no such version")]
    NoSuchVersion,
    /// Object Lock forbids it (retention or legal hold).
    #[error("{0}")]
    Locked(String),
    #[error("invalid name: {0}")]
    BadName(&'static str),
    #[error("no such multipart upload")]
    NoSuchUpload,
    /// A conditional write's condition (`If-Match`, `If-None-Match`) no
    /// longer holds.
    #[error("{0}")]
    PreconditionFailed(String),
    /// A concurrent change made this one impossible as asked; sending the
    /// request again resolves it.
    #[error("{0}")]
    Conflict(String),
    /// A journal entry (in the index or an archived journal file) is not one
    /// this version writes.
    #[error("the S3 records' journal is unreadable: {0}")]
    Journal(&'static str),
}

impl From<crate::kv::KvError> for ObjectError {
    fn from(e: crate::kv::KvError) -> Self {
        ObjectError::Schema(SchemaError::Kv(e))
    }
}

impl From<protocol::DecodeError> for ObjectError {
    fn from(e: protocol::DecodeError) -> Self {
        ObjectError::Schema(SchemaError::Decode(e))
    }
}

impl Retryable for ObjectError {
    fn is_retryable(&self) -> bool {
        matches!(self, ObjectError::Schema(e) if e.is_retryable())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    pub created_ms: u64,
}

/// An S3 access key. The secret is stored because SigV4 verification needs
/// it (as in every S3 implementation); it is never logged.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessKeyRecord {
    pub tenant: String,
    pub role: Role,
    pub secret: String,
    /// May bypass GOVERNANCE retention (`s3:BypassGovernanceRetention`).
    pub bypass_governance: bool,
}

impl std::fmt::Debug for AccessKeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessKeyRecord")
            .field("tenant", &self.tenant)
            .field("role", &self.role)
            .field("bypass_governance", &self.bypass_governance)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Versioning {
    /// Never enabled: one ("null") version per key, replaced by each PUT.
    Unversioned,
    Enabled,
    Suspended,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockMode {
    Governance,
    Compliance,
}

/// A retention period: mode and end (ms since the epoch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    pub mode: LockMode,
    pub until_ms: u64,
}

/// A bucket's default retention: mode and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefaultRetention {
    pub mode: LockMode,
    pub period: RetentionPeriod,
}

/// How long a default retention lasts, kept in the unit the bucket's owner
/// gave (and answered back in it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RetentionPeriod {
    Days(u32),
    /// Calendar years: a version filed on 2024-03-01 is kept until
    /// 2031-03-01 for seven, never 365-day years that would end a day or two
    /// early across leap years. From 29 February, to 1 March.
    Years(u32),
}

impl DefaultRetention {
    /// When a version filed at `filed_ms` (ms since the epoch) may first be
    /// removed.
    pub fn until_ms(&self, filed_ms: u64) -> u64 {
        const DAY_MS: u64 = 86_400_000;
        match self.period {
            RetentionPeriod::Days(n) => filed_ms.saturating_add(u64::from(n) * DAY_MS),
            RetentionPeriod::Years(n) => calendar_years_on(filed_ms, n)
                // Past the calendar's range: 366-day years, longer if anything.
                .unwrap_or_else(|| filed_ms.saturating_add(u64::from(n) * 366 * DAY_MS)),
        }
    }
}

/// `ms` moved `years` calendar years on (29 February to 1 March), or `None`
/// outside what the calendar type represents.
fn calendar_years_on(ms: u64, years: u32) -> Option<u64> {
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()?;
    let year = at.year().checked_add(i32::try_from(years).ok()?)?;
    let moved = match at.replace_year(year) {
        Ok(t) => t,
        // Only 29 February has no counterpart in a common year.
        Err(_) => at.replace_day(28).ok()?.replace_year(year).ok()? + time::Duration::DAY,
    };
    u64::try_from(moved.unix_timestamp_nanos() / 1_000_000).ok()
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketRecord {
    pub tenant: String,
    pub created_ms: u64,
    pub versioning: Versioning,
    /// Object Lock, which can only be enabled at creation.
    pub object_lock: bool,
    pub default_retention: Option<DefaultRetention>,
}

/// A bucket record as version 1 wrote it: default retention in days only
/// (Years were stored as 365 days each). Read, never written.
#[derive(Deserialize)]
struct BucketRecordV1 {
    tenant: String,
    created_ms: u64,
    versioning: Versioning,
    object_lock: bool,
    default_retention: Option<(LockMode, u32)>,
}

impl From<BucketRecordV1> for BucketRecord {
    fn from(v1: BucketRecordV1) -> Self {
        BucketRecord {
            tenant: v1.tenant,
            created_ms: v1.created_ms,
            versioning: v1.versioning,
            object_lock: v1.object_lock,
            default_retention: v1.default_retention.map(|(mode, days)| DefaultRetention {
                mode,
                period: RetentionPeriod::Days(days),
            }),
        }
    }
}

/// One version of an object: a piece of evidence, or a delete marker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectVersion {
    pub version_id: EvidenceId,
    /// Written while versioning was not enabled: S3's "null" version.
    pub null_version: bool,
    /// `None` for a delete marker.
    pub evidence: Option<EvidenceId>,
    pub size: u64,
    /// The ETag's value (unquoted): the body's MD5 in hex for a single PUT.
    pub etag: String,
    pub last_modified_ms: u64,
    pub content_type: Option<String>,
    pub user_metadata: Vec<(String, String)>,
    pub retention: Option<Retention>,
    pub legal_hold: bool,
    /// The standard headers S3 keeps with an object and answers with.
    pub content: ContentHeaders,
}

/// The standard headers an S3 object is written with, kept and answered
/// on GET and HEAD as S3 does (its "system metadata" beyond the type).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentHeaders {
    pub encoding: Option<String>,
    pub disposition: Option<String>,
    pub language: Option<String>,
    pub cache_control: Option<String>,
    /// `Expires`, as the instant it names (ms after the Unix epoch).
    pub expires_ms: Option<u64>,
}

impl ContentHeaders {
    /// Bytes they take, counted with user metadata against S3's limit.
    pub fn len(&self) -> usize {
        [
            &self.encoding,
            &self.disposition,
            &self.language,
            &self.cache_control,
        ]
        .iter()
        .map(|v| v.as_ref().map_or(0, String::len))
        .sum()
    }

    pub fn is_empty(&self) -> bool {
        *self == ContentHeaders::default()
    }
}

/// Version records before [`ContentHeaders`]. Read, never written.
#[derive(Deserialize)]
struct ObjectVersionV1 {
    version_id: EvidenceId,
    null_version: bool,
    evidence: Option<EvidenceId>,
    size: u64,
    etag: String,
    last_modified_ms: u64,
    content_type: Option<String>,
    user_metadata: Vec<(String, String)>,
    retention: Option<Retention>,
    legal_hold: bool,
}

impl From<ObjectVersionV1> for ObjectVersion {
    fn from(v1: ObjectVersionV1) -> Self {
        ObjectVersion {
            version_id: v1.version_id,
            null_version: v1.null_version,
            evidence: v1.evidence,
            size: v1.size,
            etag: v1.etag,
            last_modified_ms: v1.last_modified_ms,
            content_type: v1.content_type,
            user_metadata: v1.user_metadata,
            retention: v1.retention,
            legal_hold: v1.legal_hold,
            content: ContentHeaders::default(),
        }
    }
}

/// Object versions (`3v`, `3c`) with their [`ContentHeaders`].
const VERSION_V2: u8 = 2;

fn encode_version(v: &ObjectVersion) -> Vec<u8> {
    encode_versioned(VERSION_V2, v)
}

/// A version record of either layout.
pub fn decode_version(bytes: &[u8]) -> Result<ObjectVersion, protocol::DecodeError> {
    match bytes.first() {
        Some(&RECORD_V1) => Ok(decode_versioned::<ObjectVersionV1>(RECORD_V1, bytes)?.into()),
        _ => decode_versioned(VERSION_V2, bytes),
    }
}

impl ObjectVersion {
    pub fn is_delete_marker(&self) -> bool {
        self.evidence.is_none()
    }

    /// Why this version's retention forbids removing it (or shortening the
    /// retention) at `now_ms`, if it does; `bypass`: the caller may bypass
    /// GOVERNANCE. Every `now_ms` that decides a lock here is the gateway's
    /// compliance clock (`gateway::clock`), not the system clock. Legal
    /// holds are its evidence's ([`removal_refused`]).
    pub fn retention_reason(&self, now_ms: u64, bypass: bool) -> Option<String> {
        match self.retention {
            Some(r) if r.until_ms > now_ms => match r.mode {
                LockMode::Compliance => Some(format!(
                    "COMPLIANCE retention runs until {}; nobody can remove this version before then",
                    crate::schema::utc_ms(r.until_ms)
                )),
                LockMode::Governance if !bypass => Some(format!(
                    "GOVERNANCE retention runs until {}; only a key with the bypass permission may remove it",
                    crate::schema::utc_ms(r.until_ms)
                )),
                LockMode::Governance => None,
            },
            _ => None,
        }
    }
}

/// S3's bucket naming rules (the DNS-compatible subset).
pub fn valid_bucket(name: &str) -> bool {
    let b = name.as_bytes();
    (3..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'.')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && !name.contains("..")
        && name.parse::<std::net::Ipv4Addr>().is_err()
}

/// Object keys: 1..=1024 bytes of UTF-8 without NUL.
pub fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= 1024 && !key.contains('\0')
}

fn key_of(tag: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut k = tag.to_vec();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p);
    }
    k
}

fn inverted(id: &EvidenceId) -> [u8; 16] {
    let mut b = *id.as_bytes();
    for x in &mut b {
        *x = !*x;
    }
    b
}

fn check_names(bucket: &str, key: Option<&str>) -> Result<(), ObjectError> {
    if !valid_bucket(bucket) {
        return Err(ObjectError::BadName("bucket"));
    }
    if key.is_some_and(|k| !valid_key(k)) {
        return Err(ObjectError::BadName("key"));
    }
    Ok(())
}

async fn get_record<T: Transaction, R: serde::de::DeserializeOwned>(
    tx: &T,
    key: &[u8],
) -> Result<Option<R>, ObjectError> {
    match tx.get(key).await? {
        Some(v) => Ok(Some(decode_versioned(RECORD_V1, &v)?)),
        None => Ok(None),
    }
}

// ---------------------------------------------------------------- journal

/// Sets a journaled record (`3t`, `3b`, `3v`) and journals its new value.
fn set_journaled<T: Transaction>(tx: &T, key: &[u8], value: &[u8]) {
    tx.set(key, value);
    journal(tx, key, value);
}

fn journal<T: Transaction>(tx: &T, key: &[u8], value: &[u8]) {
    let mut entry = Vec::with_capacity(value.len() + 1);
    entry.push(1);
    entry.extend_from_slice(value);
    tx.set_versionstamped_key(JOURNAL, key, &entry);
}

/// Whether every record is journaled: the index was journaled from its
/// start, was seeded ([`seed_journal_tx`]) or was recovered from an archive.
pub async fn journal_seeded_tx<T: Transaction>(tx: &T) -> Result<bool, ObjectError> {
    Ok(tx.get(JOURNAL_SEEDED).await?.is_some())
}

/// Whether the journal is kept for an archive: seeded, or a seed has
/// begun ([`seed_journal_tx`]). A gateway without a ledger clears the
/// journal only where it is not.
pub async fn journal_kept_tx<T: Transaction>(tx: &T) -> Result<bool, ObjectError> {
    Ok(tx.get(JOURNAL_KEPT).await?.is_some() || journal_seeded_tx(tx).await?)
}

/// Says every record is journaled (recovery, which restores them from the
/// archived journal).
pub fn set_journal_seeded_tx<T: Transaction>(tx: &T) {
    tx.set(JOURNAL_SEEDED, b"");
}

/// Seeds the journal of an index written before records were journaled:
/// journals the current value of up to `limit` records after the key
/// `after` (none: from the first), and returns the last one journaled, or
/// `None` once all are (and says so in the index). Records changed while it
/// runs are journaled by their change too; either way the newest value has
/// the later versionstamp.
pub async fn seed_journal_tx<T: Transaction>(
    tx: &T,
    after: Option<&[u8]>,
    limit: usize,
) -> Result<Option<Vec<u8>>, ObjectError> {
    // From the first batch on, the journal is the archive's: a gateway
    // without a ledger must not clear what the seed journals.
    if after.is_none() {
        tx.set(JOURNAL_KEPT, b"");
    }
    // In key order: "3b" < "3t" < "3v".
    for p in [BUCKET, TENANT, VERSION] {
        let end = prefix_end(p);
        let begin = match after {
            Some(a) if a >= end.as_slice() => continue,
            Some(a) if a >= p => [a, &[0]].concat(),
            _ => p.to_vec(),
        };
        let rows = tx.get_range(&begin, &end, limit, false).await?;
        let Some((last, _)) = rows.last() else {
            continue;
        };
        for (k, v) in &rows {
            journal(tx, k, v);
        }
        return Ok(Some(last.clone()));
    }
    set_journal_seeded_tx(tx);
    Ok(None)
}

/// Clears a journaled record and journals that it is gone.
fn clear_journaled<T: Transaction>(tx: &T, key: &[u8]) {
    tx.clear(key);
    tx.set_versionstamped_key(JOURNAL, key, &[0]);
}

/// One journaled change: the record `key` became `value` (`None`: cleared)
/// in the transaction committed at `stamp`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub epoch: u64,
    pub stamp: [u8; crate::kv::VERSIONSTAMP_BYTES],
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
}

/// The oldest journal entries, at most `limit`, in commit order.
pub async fn journal_tx<T: Transaction>(
    tx: &T,
    limit: usize,
) -> Result<Vec<JournalEntry>, ObjectError> {
    let epoch = journal_epoch_tx(tx).await?;
    let rows = tx
        .get_range(JOURNAL, &prefix_end(JOURNAL), limit, false)
        .await?;
    let at = JOURNAL.len();
    let end = at + crate::kv::VERSIONSTAMP_BYTES;
    rows.into_iter()
        .map(|(k, v)| {
            let stamp = k
                .get(at..end)
                .and_then(|s| s.try_into().ok())
                .ok_or(ObjectError::Journal("key"))?;
            let value = match v.split_first() {
                Some((1, rest)) => Some(rest.to_vec()),
                Some((0, [])) => None,
                _ => return Err(ObjectError::Journal("value")),
            };
            Ok(JournalEntry {
                epoch,
                stamp,
                key: k[end..].to_vec(),
                value,
            })
        })
        .collect()
}

/// The journal's epoch (0 until a recovery sets one).
pub async fn journal_epoch_tx<T: Transaction>(tx: &T) -> Result<u64, ObjectError> {
    match tx.get(JOURNAL_EPOCH).await? {
        None => Ok(0),
        Some(v) => Ok(u64::from_be_bytes(
            v.try_into().map_err(|_| ObjectError::Journal("epoch"))?,
        )),
    }
}

/// Sets the journal's epoch (recovery: past every epoch archived).
pub fn set_journal_epoch_tx<T: Transaction>(tx: &T, epoch: u64) {
    tx.set(JOURNAL_EPOCH, &epoch.to_be_bytes());
}

/// Clears the journal up to and including `last` (once it is stored
/// elsewhere).
pub fn clear_journal_tx<T: Transaction>(tx: &T, last: &JournalEntry) {
    let mut end = JOURNAL.to_vec();
    end.extend_from_slice(&last.stamp);
    end.extend_from_slice(&last.key);
    end.push(0);
    tx.clear_range(JOURNAL, &end);
}

/// What replaying a journal gives: the records to write into an empty
/// index, derived ones included.
#[derive(Debug, Default)]
pub struct Replayed {
    /// Every record to set, in key order.
    pub records: Vec<(Vec<u8>, Vec<u8>)>,
    pub tenants: usize,
    pub buckets: usize,
    /// Versions kept (delete markers included).
    pub versions: usize,
    /// Versions dropped because their evidence is not in the recovered index.
    pub dropped: Vec<(String, String, EvidenceId)>,
    /// The evidence of the versions kept that are under a legal hold.
    pub held: Vec<EvidenceId>,
}

/// Each record's newest entry among `entries` (by epoch, then versionstamp),
/// in commit order: what a set of journal files can be merged into without
/// changing what [`replay`] makes of the whole journal. A cleared record
/// keeps its clearing entry, since an older value for it may lie in a file
/// not merged (another gateway's, written late).
pub fn compact(mut entries: Vec<JournalEntry>) -> Vec<JournalEntry> {
    entries.sort_by(|a, b| (&a.key, a.epoch, a.stamp).cmp(&(&b.key, b.epoch, b.stamp)));
    // The last of each key's run is its newest.
    let mut newest: Vec<JournalEntry> = Vec::with_capacity(entries.len());
    for e in entries {
        match newest.last_mut() {
            Some(last) if last.key == e.key => *last = e,
            _ => newest.push(e),
        }
    }
    newest.sort_by(|a, b| (a.epoch, a.stamp, &a.key).cmp(&(b.epoch, b.stamp, &b.key)));
    newest
}

/// Replays journal entries (in any order, repeats allowed: each file of the
/// journal may overlap another) into the final records: each record's
/// newest value by commit order, versions whose evidence `exists` does not
/// know dropped, and the derived records (`3B`, `3c`) rebuilt. Entries
/// naming anything but a journaled record are refused.
pub fn replay(
    mut entries: Vec<JournalEntry>,
    exists: impl Fn(EvidenceId) -> bool,
) -> Result<Replayed, ObjectError> {
    entries.sort_by(|a, b| (a.epoch, a.stamp, &a.key).cmp(&(b.epoch, b.stamp, &b.key)));
    let mut last: std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>> =
        std::collections::BTreeMap::new();
    for e in entries {
        if ![TENANT, BUCKET, VERSION].contains(&&e.key[..2.min(e.key.len())]) {
            return Err(ObjectError::Journal("an entry for an unjournaled record"));
        }
        last.insert(e.key, e.value);
    }
    let mut out = Replayed::default();
    let mut derived = Vec::new();
    let mut newest_of: Option<Vec<u8>> = None;
    for (key, value) in last {
        let Some(value) = value else { continue };
        match &key[..2] {
            t if t == TENANT => out.tenants += 1,
            t if t == BUCKET => {
                let name = std::str::from_utf8(&key[2..])
                    .map_err(|_| ObjectError::Journal("a bucket name"))?;
                let rec: BucketRecord = match value.first() {
                    Some(&RECORD_V1) => {
                        decode_versioned::<BucketRecordV1>(RECORD_V1, &value)?.into()
                    }
                    _ => decode_versioned(BUCKET_V2, &value)?,
                };
                derived.push((
                    key_of(TENANT_BUCKET, &[rec.tenant.as_bytes(), name.as_bytes()]),
                    Vec::new(),
                ));
                out.buckets += 1;
            }
            _ => {
                // ("3v", bucket, 0, key, 0, inverted id 16): the object's
                // versions sort newest first, so the first one seen of each
                // object decides its current record.
                let object = key
                    .len()
                    .checked_sub(16)
                    .map(|n| &key[..n])
                    .filter(|o| o.len() > 3 && o.ends_with(&[0]))
                    .ok_or(ObjectError::Journal("a version key"))?;
                let names = &object[2..object.len() - 1];
                let split = names
                    .iter()
                    .position(|b| *b == 0)
                    .ok_or(ObjectError::Journal("a version key"))?;
                let v = decode_version(&value)?;
                if let Some(id) = v.evidence.filter(|id| !exists(*id)) {
                    out.dropped.push((
                        String::from_utf8_lossy(&names[..split]).into_owned(),
                        String::from_utf8_lossy(&names[split + 1..]).into_owned(),
                        id,
                    ));
                    continue;
                }
                if let Some(id) = v.evidence.filter(|_| v.legal_hold) {
                    out.held.push(id);
                }
                if newest_of.as_deref() != Some(object) {
                    newest_of = Some(object.to_vec());
                    if !v.is_delete_marker() {
                        let mut current = CURRENT.to_vec();
                        current.extend_from_slice(names);
                        derived.push((current, value.clone()));
                    }
                }
                out.versions += 1;
            }
        }
        out.records.push((key, value));
    }
    out.records.extend(derived);
    out.records.sort();
    Ok(out)
}

/// Writes replayed records (a slice of [`Replayed::records`]).
pub fn restore_records_tx<T: Transaction>(tx: &T, records: &[(Vec<u8>, Vec<u8>)]) {
    for (k, v) in records {
        tx.set(k, v);
    }
}

// ---------------------------------------------------------------- tenants and keys

/// Registers a tenant; returns false if it already existed.
pub async fn create_tenant_tx<T: Transaction>(
    tx: &T,
    name: &str,
    now_ms: u64,
) -> Result<bool, ObjectError> {
    if !valid_tenant(name) {
        return Err(SchemaError::BadTenant.into());
    }
    let k = key_of(TENANT, &[name.as_bytes()]);
    if tx.get(&k).await?.is_some() {
        return Ok(false);
    }
    set_journaled(
        tx,
        &k,
        &encode_versioned(RECORD_V1, &TenantRecord { created_ms: now_ms }),
    );
    Ok(true)
}

pub async fn tenant_exists_tx<T: Transaction>(tx: &T, name: &str) -> Result<bool, ObjectError> {
    Ok(tx.get(&key_of(TENANT, &[name.as_bytes()])).await?.is_some())
}

/// Stores an access key for an existing tenant.
pub async fn put_access_key_tx<T: Transaction>(
    tx: &T,
    key_id: &str,
    rec: &AccessKeyRecord,
) -> Result<(), ObjectError> {
    if !tenant_exists_tx(tx, &rec.tenant).await? {
        return Err(ObjectError::NoSuchTenant);
    }
    tx.set(
        &key_of(ACCESS_KEY, &[key_id.as_bytes()]),
        &encode_versioned(RECORD_V1, rec),
    );
    Ok(())
}

/// Revokes an access key: requests signed with it, presigned URLs
/// included, fail from this transaction's commit on. False if there was none.
pub async fn revoke_access_key_tx<T: Transaction>(
    tx: &T,
    key_id: &str,
) -> Result<bool, ObjectError> {
    let key = key_of(ACCESS_KEY, &[key_id.as_bytes()]);
    let existed = tx.get(&key).await?.is_some();
    tx.clear(&key);
    Ok(existed)
}

/// An access key as [`crate::schema::credential_live_tx`] checks it.
pub fn access_key_ref(key_id: &str) -> crate::schema::CredentialRef {
    crate::schema::CredentialRef(key_of(ACCESS_KEY, &[key_id.as_bytes()]))
}

pub async fn get_access_key_tx<T: Transaction>(
    tx: &T,
    key_id: &str,
) -> Result<Option<AccessKeyRecord>, ObjectError> {
    if key_id.is_empty() || key_id.len() > 128 {
        return Ok(None);
    }
    get_record(tx, &key_of(ACCESS_KEY, &[key_id.as_bytes()])).await
}

// ---------------------------------------------------------------- buckets

pub async fn create_bucket_tx<T: Transaction>(
    tx: &T,
    name: &str,
    rec: &BucketRecord,
) -> Result<(), ObjectError> {
    check_names(name, None)?;
    if let Some(have) = get_bucket_tx(tx, name).await? {
        return Err(ObjectError::BucketExists {
            mine: have.tenant == rec.tenant,
        });
    }
    if !tenant_exists_tx(tx, &rec.tenant).await? {
        return Err(ObjectError::NoSuchTenant);
    }
    // As S3's own limit: a listing holds them all (see `list_buckets_tx`).
    let prefix = key_of(TENANT_BUCKET, &[rec.tenant.as_bytes(), b""]);
    let have = tx
        .get_range(&prefix, &prefix_end(&prefix), MAX_BUCKETS_PER_TENANT, false)
        .await?;
    if have.len() >= MAX_BUCKETS_PER_TENANT {
        return Err(ObjectError::TooManyBuckets);
    }
    set_journaled(
        tx,
        &key_of(BUCKET, &[name.as_bytes()]),
        &encode_versioned(BUCKET_V2, rec),
    );
    tx.set(
        &key_of(TENANT_BUCKET, &[rec.tenant.as_bytes(), name.as_bytes()]),
        b"",
    );
    Ok(())
}

pub async fn get_bucket_tx<T: Transaction>(
    tx: &T,
    name: &str,
) -> Result<Option<BucketRecord>, ObjectError> {
    if !valid_bucket(name) {
        return Ok(None);
    }
    let Some(v) = tx.get(&key_of(BUCKET, &[name.as_bytes()])).await? else {
        return Ok(None);
    };
    Ok(Some(match v.first() {
        Some(&RECORD_V1) => decode_versioned::<BucketRecordV1>(RECORD_V1, &v)?.into(),
        _ => decode_versioned(BUCKET_V2, &v)?,
    }))
}

pub async fn put_bucket_tx<T: Transaction>(
    tx: &T,
    name: &str,
    rec: &BucketRecord,
) -> Result<(), ObjectError> {
    if get_bucket_tx(tx, name).await?.is_none() {
        return Err(ObjectError::NoSuchBucket);
    }
    set_journaled(
        tx,
        &key_of(BUCKET, &[name.as_bytes()]),
        &encode_versioned(BUCKET_V2, rec),
    );
    Ok(())
}

/// Most buckets one tenant may have (S3's own quota's most): all of them
/// come in one listing.
pub const MAX_BUCKETS_PER_TENANT: usize = 10_000;

/// A tenant's buckets, by name.
pub async fn list_buckets_tx<T: Transaction>(
    tx: &T,
    tenant: &str,
) -> Result<Vec<(String, BucketRecord)>, ObjectError> {
    let prefix = key_of(TENANT_BUCKET, &[tenant.as_bytes(), b""]);
    let rows = tx
        .get_range(&prefix, &prefix_end(&prefix), MAX_BUCKETS_PER_TENANT, false)
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for (k, _) in rows {
        let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
        if let Some(b) = get_bucket_tx(tx, &name).await? {
            out.push((name, b));
        }
    }
    Ok(out)
}

/// The bucket `name`, as the request saw it, if it holds no version at all
/// (delete markers count, as in S3): one DeleteBucket may remove.
async fn deletable_bucket<T: Transaction>(
    tx: &T,
    name: &str,
    seen: &BucketRecord,
) -> Result<BucketRecord, ObjectError> {
    let b = bucket_as_seen(tx, name, seen).await?;
    let prefix = key_of(VERSION, &[name.as_bytes(), b""]);
    if !tx
        .get_range(&prefix, &prefix_end(&prefix), 1, false)
        .await?
        .is_empty()
    {
        return Err(ObjectError::BucketNotEmpty);
    }
    Ok(b)
}

/// Ends one multipart upload in progress in bucket `name`, if the bucket
/// may be deleted, returning its parts for the caller to delete; `None`
/// once none is left. DeleteBucket runs it, a transaction each, until
/// `None` before [`delete_bucket_tx`]: an upload of 10,000 parts is a
/// transaction's worth of writes by itself, and a bucket may hold many
/// (all in one transaction, they passed FoundationDB's limits and the
/// bucket could never be deleted).
pub async fn end_an_upload_of_bucket_tx<T: Transaction>(
    tx: &T,
    name: &str,
    seen: &BucketRecord,
) -> Result<Option<Vec<PartRecord>>, ObjectError> {
    deletable_bucket(tx, name, seen).await?;
    let first = list_multipart_tx(tx, name, None, "", None, 1).await?;
    match first.into_iter().next() {
        Some((upload, _)) => Ok(Some(end_multipart_tx(tx, upload).await?)),
        None => Ok(None),
    }
}

/// Deletes a bucket that holds no version at all (delete markers count, as
/// in S3). Call [`end_an_upload_of_bucket_tx`] until it finds none first:
/// the uploads begun since are few.
pub async fn delete_bucket_tx<T: Transaction>(
    tx: &T,
    name: &str,
    seen: &BucketRecord,
) -> Result<Vec<PartRecord>, ObjectError> {
    let b = deletable_bucket(tx, name, seen).await?;
    // Uploads in progress go with the bucket, as in S3: left behind, they
    // would show in (and complete into) a bucket of the same name created
    // later, perhaps by another tenant. Their parts are returned for the
    // caller to delete.
    let mut parts = Vec::new();
    for (upload, _) in list_multipart_tx(tx, name, None, "", None, usize::MAX).await? {
        parts.extend(end_multipart_tx(tx, upload).await?);
    }
    clear_journaled(tx, &key_of(BUCKET, &[name.as_bytes()]));
    tx.clear(&key_of(
        TENANT_BUCKET,
        &[b.tenant.as_bytes(), name.as_bytes()],
    ));
    Ok(parts)
}

// ---------------------------------------------------------------- objects

fn versions_prefix(bucket: &str, key: &str) -> Vec<u8> {
    key_of(VERSION, &[bucket.as_bytes(), key.as_bytes(), b""])
}

fn version_key(bucket: &str, key: &str, id: &EvidenceId) -> Vec<u8> {
    let mut k = versions_prefix(bucket, key);
    k.extend_from_slice(&inverted(id));
    k
}

fn current_key(bucket: &str, key: &str) -> Vec<u8> {
    key_of(CURRENT, &[bucket.as_bytes(), key.as_bytes()])
}

/// Every version of `key`, newest first (at most `limit`).
pub async fn versions_tx<T: Transaction>(
    tx: &T,
    bucket: &str,
    key: &str,
    limit: usize,
) -> Result<Vec<ObjectVersion>, ObjectError> {
    check_names(bucket, Some(key))?;
    let prefix = versions_prefix(bucket, key);
    tx.get_range(&prefix, &prefix_end(&prefix), limit, false)
        .await?
        .iter()
        .map(|(_, v)| Ok(decode_version(v)?))
        .collect()
}

/// Re-derives `3c` from the newest remaining version.
async fn refresh_current<T: Transaction>(
    tx: &T,
    bucket: &str,
    key: &str,
) -> Result<(), ObjectError> {
    match versions_tx(tx, bucket, key, 1).await?.first() {
        Some(v) if !v.is_delete_marker() => tx.set(&current_key(bucket, key), &encode_version(v)),
        _ => tx.clear(&current_key(bucket, key)),
    }
    Ok(())
}

/// Removes the "null" version of `key`, if any, unless locked; returns it.
async fn remove_null_version<T: Transaction>(
    tx: &T,
    bucket: &str,
    key: &str,
    now_ms: u64,
    bypass: bool,
) -> Result<Option<ObjectVersion>, ObjectError> {
    let Some(v) = null_version_tx(tx, bucket, key).await? else {
        return Ok(None);
    };
    if let Some(why) = removal_refused(tx, &v, now_ms, bypass).await? {
        return Err(ObjectError::Locked(why));
    }
    clear_journaled(tx, &version_key(bucket, key, &v.version_id));
    Ok(Some(v))
}

/// Versions read per page when looking for a key's "null" version.
const NULL_SCAN_PAGE: usize = 10_000;
/// Versions looked through at most for a key's "null" version: a key's
/// whole history read in one transaction would outlive it (5 s) past a
/// few hundred thousand versions, and refuse every write to the key.
const NULL_SCAN_MAX: usize = 100_000;

/// The "null" version of `key` (written while versioning was not enabled;
/// one at most, as S3 has it), delete marker or not, if there is one:
/// looked for newest first, a page at a time, among its newest [`NULL_SCAN_MAX`]
/// versions. A key written before versioning was enabled keeps its null
/// version under every version since; looked for among the newest 10,000
/// only, it was lost to `?versionId=null`, and to the next write while
/// versioning is suspended (which then left two). One further back still
/// is not found (said in the log): a pointer to it is not kept.
pub async fn null_version_tx<T: Transaction>(
    tx: &T,
    bucket: &str,
    key: &str,
) -> Result<Option<ObjectVersion>, ObjectError> {
    check_names(bucket, Some(key))?;
    let prefix = versions_prefix(bucket, key);
    let end = prefix_end(&prefix);
    let mut from = prefix;
    let mut read = 0;
    while read < NULL_SCAN_MAX {
        let page = tx.get_range(&from, &end, NULL_SCAN_PAGE, false).await?;
        read += page.len();
        for (_, v) in &page {
            let v = decode_version(v)?;
            if v.null_version {
                return Ok(Some(v));
            }
        }
        match page.last() {
            Some((last, _)) if page.len() == NULL_SCAN_PAGE => {
                from = last.clone();
                from.push(0);
            }
            _ => return Ok(None),
        }
    }
    tracing::warn!(
        bucket,
        key,
        versions = read,
        "a null version is looked for among a key's newest versions only"
    );
    Ok(None)
}

/// Adds a version (a PUT's evidence, or a delete marker) as the newest of
/// `key`. Where versioning is not enabled it replaces the "null" version —
/// refused if that one is locked (a locked bucket is always versioned, so
/// this only matters for a bucket whose versioning was suspended).
///
/// `seen` is the bucket as the caller checked it (owner, creation): a bucket
/// deleted and created again since, by any tenant, is not this one.
///
/// Returns the version as stored (its id may have moved to sort after the
/// newest version already there, [`add_version`]), and the null version
/// it replaced, if any (its evidence stays, without this S3 name).
pub async fn put_version_tx<T: Transaction>(
    tx: &T,
    bucket: &str,
    key: &str,
    version: &ObjectVersion,
    now_ms: u64,
    seen: &BucketRecord,
) -> Result<(ObjectVersion, Option<ObjectVersion>), ObjectError> {
    check_names(bucket, Some(key))?;
    let b = bucket_as_seen(tx, bucket, seen).await?;
    if version.null_version != (b.versioning != Versioning::Enabled) {
        return Err(ObjectError::Conflict(
            "the bucket's versioning changed during the upload; send it again".into(),
        ));
    }
    // The version's retention was decided by the bucket as it was seen: a
    // default retention set (or Object Lock enabled) since would not bind
    // it, and any key could delete what the bucket now says is retained.
    if (b.object_lock, b.default_retention) != (seen.object_lock, seen.default_retention) {
        return Err(ObjectError::Conflict(
            "the bucket's Object Lock configuration changed during the upload; send it again"
                .into(),
        ));
    }
    let replaced = match version.null_version {
        true => remove_null_version(tx, bucket, key, now_ms, false).await?,
        false => None,
    };
    Ok((add_version(tx, bucket, key, version).await?, replaced))
}

/// The version `version_id` of `key`, or the newest; delete markers
/// included (the caller decides what a marker means).
pub async fn get_version_tx<T: Transaction>(
    tx: &T,
    bucket: &str,
    key: &str,
    version_id: Option<EvidenceId>,
) -> Result<ObjectVersion, ObjectError> {
    check_names(bucket, Some(key))?;
    match version_id {
        Some(id) => match tx.get(&version_key(bucket, key, &id)).await? {
            Some(v) => Ok(decode_version(&v)?),
            None => Err(ObjectError::NoSuchVersion),
        },
        None => versions_tx(tx, bucket, key, 1)
            .await?
            .into_iter()
            .next()
            .ok_or(ObjectError::NoSuchKey),
    }
}

/// Permanently removes one version, enforcing Object Lock in this
/// transaction. Returns the removed version.
pub async fn delete_version_tx<T: Transaction>(
    tx: &T,
    bucket: &str,
    key: &str,
    version_id: EvidenceId,
    now_ms: u64,
    bypass_governance: bool,
    seen: &BucketRecord,
) -> Result<ObjectVersion, ObjectError> {
    bucket_as_seen(tx, bucket, seen).await?;
    let v = get_version_tx(tx, bucket, key, Some(version_id)).await?;
    if let Some(why) = removal_refused(tx, &v, now_ms, bypass_governance).await? {
        return Err(ObjectError::Locked(why));
    }
    clear_journaled(tx, &version_key(bucket, key, &version_id));
    refresh_current(tx, bucket, key).await?;
    Ok(v)
}

/// Bucket `name` if it is still the one the caller checked (`seen`: same
/// owner, same creation); otherwise, as far as the caller is concerned, its
/// bucket is gone. Checked in the transaction that changes the bucket, so
/// a bucket deleted and created again while a request ran (an upload can
/// take minutes) never receives what was meant for the old one.
pub async fn bucket_as_seen<T: Transaction>(
    tx: &T,
    name: &str,
    seen: &BucketRecord,
) -> Result<BucketRecord, ObjectError> {
    match get_bucket_tx(tx, name).await? {
        Some(b) if b.tenant == seen.tenant && b.created_ms == seen.created_ms => Ok(b),
        _ => Err(ObjectError::NoSuchBucket),
    }
}

/// Why version `v` may not be removed now, if it may not: its retention,
/// or its evidence's legal hold and retention (set through either API: a
/// retention set through the evidence API lives on the manifest and binds
/// the S3 view of the same evidence as well).
///
/// A legal hold is one per evidence, the manifest's, whichever API placed
/// or lifted it (each lifting is an administrator's, on the ledger); the
/// version's flag mirrors it and decides only once the evidence is gone.
/// Two holds lifted apart would let an expunge through while S3 still
/// showed the object held.
async fn removal_refused<T: Transaction>(
    tx: &T,
    v: &ObjectVersion,
    now_ms: u64,
    bypass: bool,
) -> Result<Option<String>, ObjectError> {
    // An expunged evidence's record too: its hold was lifted before the
    // expunge (which refuses a held evidence), whatever the version says.
    let header = match v.evidence {
        Some(evidence) => crate::schema::get_any_manifest_tx(tx, evidence)
            .await?
            .map(|(h, _)| h),
        None => None,
    };
    if header.as_ref().map_or(v.legal_hold, |h| h.legal_hold) {
        return Ok(Some(
            "a legal hold applies to this object version (its evidence is held)".into(),
        ));
    }
    if let Some(why) = v.retention_reason(now_ms, bypass) {
        return Ok(Some(why));
    }
    let Some(header) = header else {
        return Ok(None);
    };
    let evidence = header.evidence;
    match header.retain_until_ms {
        Some(until) if until > now_ms => Ok(Some(format!(
            "evidence {evidence}, which this version is, is retained until {}; nobody can remove it before then",
            crate::schema::utc_ms(until)
        ))),
        _ => Ok(None),
    }
}

/// Sets a version's retention: never shorter for COMPLIANCE, nor for
/// GOVERNANCE without the bypass permission, and never removed while it runs.
/// A GOVERNANCE lock's mode is its settings too: made COMPLIANCE (which
/// nobody could then undo) only with the bypass permission, as in S3.
pub async fn set_retention_tx<T: Transaction>(
    tx: &T,
    bucket: &str,
    key: &str,
    version_id: EvidenceId,
    retention: Option<Retention>,
    now_ms: u64,
    bypass_governance: bool,
) -> Result<ObjectVersion, ObjectError> {
    let mut v = get_version_tx(tx, bucket, key, Some(version_id)).await?;
    if v.is_delete_marker() {
        return Err(ObjectError::NoSuchVersion);
    }
    if let Some(old) = v.retention.filter(|r| r.until_ms > now_ms) {
        let weaker = match retention {
            None => true,
            Some(new) => {
                new.until_ms < old.until_ms
                    || (old.mode == LockMode::Compliance && new.mode != LockMode::Compliance)
            }
        };
        let hardened = retention.is_some_and(|new| {
            old.mode == LockMode::Governance && new.mode == LockMode::Compliance
        });
        let allowed = old.mode == LockMode::Governance && bypass_governance;
        if (weaker || hardened) && !allowed {
            let what = match hardened {
                true => "cannot be made COMPLIANCE without the permission to bypass it",
                false => "cannot be shortened or removed",
            };
            return Err(ObjectError::Locked(format!(
                "{:?} retention runs until {} and {what}",
                old.mode,
                crate::schema::utc_ms(old.until_ms)
            )));
        }
    }
    v.retention = retention;
    write_version(tx, bucket, key, &v).await?;
    Ok(v)
}

/// Places or lifts a version's legal hold.
pub async fn set_legal_hold_tx<T: Transaction>(
    tx: &T,
    bucket: &str,
    key: &str,
    version_id: EvidenceId,
    on: bool,
) -> Result<ObjectVersion, ObjectError> {
    let mut v = get_version_tx(tx, bucket, key, Some(version_id)).await?;
    if v.is_delete_marker() {
        return Err(ObjectError::NoSuchVersion);
    }
    v.legal_hold = on;
    write_version(tx, bucket, key, &v).await?;
    Ok(v)
}

/// `id` if it sorts after `newest`; otherwise the same random part a
/// millisecond past `newest` (see [`add_version`]).
fn after_newest(id: EvidenceId, newest: EvidenceId) -> EvidenceId {
    if id > newest {
        return id;
    }
    let mut random = [0u8; 10];
    random.copy_from_slice(&id.as_bytes()[6..]);
    EvidenceId::new(newest.unix_millis().saturating_add(1), random)
}

/// Adds `v` as the newest version of `key`, and returns it as stored. The
/// newest version is the one committed last, as in S3, whatever the clock
/// that minted its id said: a gateway's clock stepped back, another
/// gateway's clock behind, or a request begun before another that
/// committed first (a long Complete or Copy, a DELETE racing a PUT). An id
/// that would not sort after the newest version's is moved to a
/// millisecond past it, so the version the client was told it created is
/// the one it gets back.
async fn add_version<T: Transaction>(
    tx: &T,
    bucket: &str,
    key: &str,
    v: &ObjectVersion,
) -> Result<ObjectVersion, ObjectError> {
    let mut v = v.clone();
    if let Some(newest) = versions_tx(tx, bucket, key, 1).await?.first() {
        v.version_id = after_newest(v.version_id, newest.version_id);
    }
    set_journaled(
        tx,
        &version_key(bucket, key, &v.version_id),
        &encode_version(&v),
    );
    // The newest now: the current view is it (read no more than before).
    match v.is_delete_marker() {
        false => tx.set(&current_key(bucket, key), &encode_version(&v)),
        true => tx.clear(&current_key(bucket, key)),
    }
    Ok(v)
}

/// Writes `v` under its own id (a new version, or an existing one's new
/// settings) and re-derives the current version.
async fn write_version<T: Transaction>(
    tx: &T,
    bucket: &str,
    key: &str,
    v: &ObjectVersion,
) -> Result<(), ObjectError> {
    set_journaled(
        tx,
        &version_key(bucket, key, &v.version_id),
        &encode_version(v),
    );
    refresh_current(tx, bucket, key).await
}

/// Current objects of `bucket` whose keys start with `prefix`, in key
/// order, after the key bytes `after` (exclusive; bytes so that a caller can
/// skip a whole common prefix with `prefix + 0xFF`, which no UTF-8 key
/// reaches), at most `limit`.
pub async fn list_current_tx<T: Transaction>(
    tx: &T,
    bucket: &str,
    prefix: &str,
    after: Option<&[u8]>,
    limit: usize,
) -> Result<Vec<(String, ObjectVersion)>, ObjectError> {
    check_names(bucket, None)?;
    let base = key_of(CURRENT, &[bucket.as_bytes(), b""]);
    let mut from = base.clone();
    from.extend_from_slice(prefix.as_bytes());
    let end = prefix_end(&from);
    if let Some(after) = after.filter(|a| *a >= prefix.as_bytes()) {
        let mut k = base.clone();
        k.extend_from_slice(after);
        k.push(0); // the first key after `after`
        from = k;
    }
    if from >= end {
        return Ok(Vec::new());
    }
    tx.get_range(&from, &end, limit, false)
        .await?
        .iter()
        .map(|(k, v)| {
            Ok((
                String::from_utf8_lossy(&k[base.len()..]).into_owned(),
                decode_version(v)?,
            ))
        })
        .collect()
}

/// Every version of the keys of `bucket` starting with `prefix`, by key
/// and newest first within a key, after the position `after` (exclusive):
/// `(key, None)` skips all of that key's versions, `(key, Some(id))` resumes
/// after that version. At most `limit`.
pub async fn list_versions_tx<T: Transaction>(
    tx: &T,
    bucket: &str,
    prefix: &str,
    after: Option<(&str, Option<EvidenceId>)>,
    limit: usize,
) -> Result<Vec<(String, ObjectVersion)>, ObjectError> {
    let after = match after {
        None => VersionsAfter::Start,
        Some((key, version)) => VersionsAfter::Version(key, version),
    };
    list_versions_after_tx(tx, bucket, prefix, after, limit).await
}

/// Where a version listing resumes.
#[derive(Clone, Copy, Debug)]
pub enum VersionsAfter<'a> {
    /// From the first key under the prefix.
    Start,
    /// After this version of this key (`None`: after every version of it).
    Version(&'a str, Option<EvidenceId>),
    /// After every key that starts with this (a common prefix already listed).
    Prefix(&'a str),
    /// From the first (newest) version of this key: where a listing resumes
    /// whose marker version is gone, listing some of the key's versions
    /// again rather than skip the rest of them.
    KeyStart(&'a str),
}

/// [`list_versions_tx`], resuming anywhere [`VersionsAfter`] says.
pub async fn list_versions_after_tx<T: Transaction>(
    tx: &T,
    bucket: &str,
    prefix: &str,
    after: VersionsAfter<'_>,
    limit: usize,
) -> Result<Vec<(String, ObjectVersion)>, ObjectError> {
    check_names(bucket, None)?;
    let base = key_of(VERSION, &[bucket.as_bytes(), b""]);
    let mut from = base.clone();
    from.extend_from_slice(prefix.as_bytes());
    let end = prefix_end(&from);
    let resume = match after {
        VersionsAfter::Start => None,
        VersionsAfter::Version(key, version) => Some((
            key,
            version.map_or(vec![1], |id| {
                // Just after this version's key; `1`: past every version of the
                // key (they all start key + 0x00).
                let mut tail = vec![0];
                tail.extend_from_slice(&inverted(&id));
                tail.push(0);
                tail
            }),
        )),
        // Keys are UTF-8, which never holds 0xff: past every key under it.
        VersionsAfter::Prefix(p) => Some((p, vec![0xff])),
        VersionsAfter::KeyStart(key) => Some((key, vec![])),
    };
    if let Some((key, tail)) = resume.filter(|(k, _)| k.as_bytes() >= prefix.as_bytes()) {
        let mut k = base.clone();
        k.extend_from_slice(key.as_bytes());
        k.extend_from_slice(&tail);
        from = from.max(k);
    }
    if from >= end {
        return Ok(Vec::new());
    }
    tx.get_range(&from, &end, limit, false)
        .await?
        .iter()
        .map(|(k, v)| {
            let rest = &k[base.len()..];
            let key = &rest[..rest.len().saturating_sub(17)];
            Ok((
                String::from_utf8_lossy(key).into_owned(),
                decode_version(v)?,
            ))
        })
        .collect()
}

/// What a DELETE without a version id did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Deleted {
    /// A delete marker was added (versioning enabled or suspended).
    Marker(Box<ObjectVersion>),
    /// The "null" version was removed (never-versioned bucket), or there
    /// was nothing to delete.
    Removed,
}

/// S3's DELETE without a version id: where versioning is enabled, a delete
/// marker becomes the newest version (allowed over locked versions: nothing
/// is removed); where it is suspended, a "null" marker replaces the null
/// version; where it was never enabled, the null version is removed. Locked
/// versions are never removed.
pub async fn delete_current_tx<T: Transaction>(
    tx: &T,
    bucket: &str,
    key: &str,
    marker: &ObjectVersion,
    now_ms: u64,
    bypass_governance: bool,
    seen: &BucketRecord,
) -> Result<Deleted, ObjectError> {
    check_names(bucket, Some(key))?;
    let b = bucket_as_seen(tx, bucket, seen).await?;
    match b.versioning {
        Versioning::Enabled | Versioning::Suspended => {
            let mut m = marker.clone();
            m.null_version = b.versioning == Versioning::Suspended;
            if m.null_version {
                remove_null_version(tx, bucket, key, now_ms, bypass_governance).await?;
            }
            let m = add_version(tx, bucket, key, &m).await?;
            Ok(Deleted::Marker(Box::new(m)))
        }
        Versioning::Unversioned => {
            remove_null_version(tx, bucket, key, now_ms, bypass_governance).await?;
            refresh_current(tx, bucket, key).await?;
            Ok(Deleted::Removed)
        }
    }
}

// ---------------------------------------------------------------- multipart

/// A multipart upload in progress: what the object will be.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MultipartRecord {
    pub bucket: String,
    pub key: String,
    pub tenant: String,
    pub created_ms: u64,
    /// The version to write at completion (evidence, size and ETag filled then).
    pub version: ObjectVersion,
    /// The request named no retention: the bucket's default applies, taken
    /// at completion (when the object comes to be, as in S3), not from when
    /// the upload began.
    pub default_retention: bool,
}

/// Multipart records before `default_retention` (their retention is kept
/// as it was taken).
#[derive(Deserialize)]
struct MultipartRecordV1 {
    bucket: String,
    key: String,
    tenant: String,
    created_ms: u64,
    version: ObjectVersionV1,
}

/// Multipart records before [`ContentHeaders`].
#[derive(Deserialize)]
struct MultipartRecordV2 {
    bucket: String,
    key: String,
    tenant: String,
    created_ms: u64,
    version: ObjectVersionV1,
    default_retention: bool,
}

const MULTIPART_V2: u8 = 2;
const MULTIPART_V3: u8 = 3;

fn decode_multipart(v: &[u8]) -> Result<MultipartRecord, protocol::DecodeError> {
    match v.first() {
        Some(&RECORD_V1) => {
            let old: MultipartRecordV1 = decode_versioned(RECORD_V1, v)?;
            Ok(MultipartRecord {
                bucket: old.bucket,
                key: old.key,
                tenant: old.tenant,
                created_ms: old.created_ms,
                version: old.version.into(),
                default_retention: false,
            })
        }
        Some(&MULTIPART_V2) => {
            let old: MultipartRecordV2 = decode_versioned(MULTIPART_V2, v)?;
            Ok(MultipartRecord {
                bucket: old.bucket,
                key: old.key,
                tenant: old.tenant,
                created_ms: old.created_ms,
                version: old.version.into(),
                default_retention: old.default_retention,
            })
        }
        _ => decode_versioned(MULTIPART_V3, v),
    }
}

/// One uploaded part: its bytes are stored as stripes under `part_id` (an
/// upload whose intent ended without a manifest), with what a verified read
/// of them needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRecord {
    pub part_id: EvidenceId,
    pub size: u64,
    /// MD5 of the part, hex (the part's ETag).
    pub md5: String,
    pub blake3: [u8; 32],
    pub sha256: [u8; 32],
    pub code: protocol::ErasureCode,
    pub stripes: u64,
    pub uploaded_ms: u64,
    /// The evidence an UploadPartCopy copied the part's bytes from: its
    /// expunge drops the part, and the upload's Complete files only while
    /// it is still filed, so expunged bytes never live on as a new filing.
    pub copied_from: Option<EvidenceId>,
}

/// Part records before [`PartRecord::copied_from`].
#[derive(Deserialize)]
struct PartRecordV1 {
    part_id: EvidenceId,
    size: u64,
    md5: String,
    blake3: [u8; 32],
    sha256: [u8; 32],
    code: protocol::ErasureCode,
    stripes: u64,
    uploaded_ms: u64,
}

const PART_V2: u8 = 2;

fn decode_part(v: &[u8]) -> Result<PartRecord, protocol::DecodeError> {
    match v.first() {
        Some(&RECORD_V1) => {
            let old: PartRecordV1 = decode_versioned(RECORD_V1, v)?;
            Ok(PartRecord {
                part_id: old.part_id,
                size: old.size,
                md5: old.md5,
                blake3: old.blake3,
                sha256: old.sha256,
                code: old.code,
                stripes: old.stripes,
                uploaded_ms: old.uploaded_ms,
                copied_from: None,
            })
        }
        _ => decode_versioned(PART_V2, v),
    }
}

impl PartRecord {
    /// What a verified read (or a repair) of the part's stripes needs; the
    /// tenant is its upload's. Parts are never visible as evidence: this
    /// header exists only in memory.
    pub fn read_header(&self, tenant: &str) -> protocol::ManifestHeader {
        protocol::ManifestHeader {
            evidence: self.part_id,
            tenant: tenant.to_owned(),
            case: None,
            blake3: protocol::Blake3Hash(self.blake3),
            sha256: protocol::Sha256Hash(self.sha256),
            size: self.size,
            media_type: None,
            file_name: None,
            submitter: None,
            filed_at_ms: self.uploaded_ms,
            code: self.code,
            stripes: self.stripes,
            retain_until_ms: None,
            legal_hold: false,
        }
    }
}

/// A part of an upload in progress, found by its id: what repair needs to
/// rebuild its stripes, which have no manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LivePart {
    pub upload: EvidenceId,
    pub number: u32,
    /// The header its stripes are read and rebuilt by.
    pub header: protocol::ManifestHeader,
    /// Its record, as its upload holds it.
    pub record: PartRecord,
}

fn part_place_key(part: &EvidenceId) -> Vec<u8> {
    key_of(PART_PLACE, &[part.as_bytes()])
}

/// The stored part `part` of an upload in progress, if it is one: its
/// upload is open and still records this part under its number (not one
/// replaced by another upload of that number, nor of an ended upload,
/// whose stripes are the collector's). Parts stored before this record
/// existed are not found (their upload expires or completes).
pub async fn live_part_tx<T: Transaction>(
    tx: &T,
    part: EvidenceId,
) -> Result<Option<LivePart>, SchemaError> {
    let Some(place) = tx.get(&part_place_key(&part)).await? else {
        return Ok(None);
    };
    let (Some(upload), Some(number)) = (
        place
            .get(..16)
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
            .map(EvidenceId),
        place
            .get(16..)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_be_bytes),
    ) else {
        return Err(protocol::DecodeError::Malformed.into());
    };
    let Some(rec) = tx.get(&key_of(MULTIPART, &[upload.as_bytes()])).await? else {
        return Ok(None);
    };
    let rec = decode_multipart(&rec)?;
    let Some(p) = tx.get(&part_key(&upload, number)).await? else {
        return Ok(None);
    };
    let p = decode_part(&p)?;
    Ok((p.part_id == part).then(|| LivePart {
        upload,
        number,
        header: p.read_header(&rec.tenant),
        record: p,
    }))
}

fn part_key(upload: &EvidenceId, part: u32) -> Vec<u8> {
    let mut k = key_of(PART, &[upload.as_bytes()]);
    k.extend_from_slice(&part.to_be_bytes());
    k
}

pub async fn create_multipart_tx<T: Transaction>(
    tx: &T,
    upload: EvidenceId,
    rec: &MultipartRecord,
    seen: &BucketRecord,
) -> Result<(), ObjectError> {
    check_names(&rec.bucket, Some(&rec.key))?;
    // In the bucket the request checked, not one deleted (taking its
    // uploads) and created again since.
    bucket_as_seen(tx, &rec.bucket, seen).await?;
    tx.set(
        &key_of(MULTIPART, &[upload.as_bytes()]),
        &encode_versioned(MULTIPART_V3, rec),
    );
    tx.set(&bucket_upload_key(&rec.bucket, &rec.key, &upload), b"");
    Ok(())
}

fn bucket_upload_key(bucket: &str, key: &str, upload: &EvidenceId) -> Vec<u8> {
    key_of(
        BUCKET_UPLOAD,
        &[bucket.as_bytes(), key.as_bytes(), upload.as_bytes()],
    )
}

pub async fn get_multipart_tx<T: Transaction>(
    tx: &T,
    upload: EvidenceId,
) -> Result<Option<MultipartRecord>, ObjectError> {
    match tx.get(&key_of(MULTIPART, &[upload.as_bytes()])).await? {
        Some(v) => Ok(Some(decode_multipart(&v)?)),
        None => Ok(None),
    }
}

/// Says that every version's legal hold is on its evidence already: for
/// an index rebuilt by `recover-index`, whose manifests carry the holds
/// the ledger recorded, placed and lifted through either API. Carried
/// again (see [`locks_to_carry_tx`]), a version's flag from before a hold
/// was lifted through the evidence API would put the hold back.
pub fn set_holds_carried_tx<T: Transaction>(tx: &T) {
    tx.set(HOLDS_ON_EVIDENCE, b"");
    // Restored from the ledger's archive: stated there already.
    tx.set(HOLDS_ON_LEDGER, b"");
}

/// Says that every version's lock binds its evidence, each on the ledger
/// (see [`locks_to_carry_tx`]).
pub fn set_locks_carried_tx<T: Transaction>(tx: &T) {
    tx.set(HOLDS_ON_EVIDENCE, b"");
    tx.set(LOCKS_ON_EVIDENCE, b"");
}

/// What one version's Object Lock asks of its evidence (see
/// [`locks_to_carry_tx`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockToCarry {
    pub evidence: EvidenceId,
    /// The version's COMPLIANCE date.
    pub compliance_until_ms: Option<u64>,
    /// The version's legal hold, to be placed on the evidence (never on an
    /// index whose holds are its evidence's already, see
    /// [`set_holds_carried_tx`]).
    pub hold: bool,
    /// A hold the evidence already has, placed by an earlier upgrade that
    /// wrote no ledger statement: stated now, so the openings archive (and
    /// an index rebuilt from it) keeps it.
    pub restate_hold: bool,
}

/// Up to `limit` versions after the version key `after` (none: from the
/// first) whose Object Lock their evidence does not carry, or not on the
/// ledger, and the last key looked at; `None` once every version is done
/// or none is left to do. COMPLIANCE retention and legal holds bind the
/// evidence itself (an expunge checks the manifest, and `recover-index`
/// restores manifests from the ledger's archive), but versions written by
/// older gateways carried them only on the version record: their evidence
/// could be expunged under a running COMPLIANCE lock. The caller extends
/// the retention or places the hold (only ever stricter) with a ledger
/// statement in the same transaction, then [`set_locks_carried_tx`].
pub async fn locks_to_carry_tx<T: Transaction>(
    tx: &T,
    after: Option<Vec<u8>>,
    limit: usize,
    now_ms: u64,
) -> Result<(Option<Vec<u8>>, Vec<LockToCarry>), ObjectError> {
    if tx.get(LOCKS_ON_EVIDENCE).await?.is_some() {
        return Ok((None, Vec::new()));
    }
    // Holds carried by the upgrade before this one (with no statement), or
    // by an index rebuilt from the ledger (whose holds are the ledger's
    // already: nothing to state).
    let holds_carried = tx.get(HOLDS_ON_EVIDENCE).await?.is_some();
    let holds_stated = tx.get(HOLDS_ON_LEDGER).await?.is_some();
    let begin = match after {
        Some(k) => [&k[..], &[0]].concat(),
        None => VERSION.to_vec(),
    };
    let rows = tx
        .get_range(&begin, &prefix_end(VERSION), limit.max(1), false)
        .await?;
    let Some((last, _)) = rows.last() else {
        return Ok((None, Vec::new()));
    };
    let last = last.clone();
    let mut todo = Vec::new();
    for (_, value) in &rows {
        let Ok(v) = decode_version(value) else {
            continue;
        };
        let Some(evidence) = v.evidence else { continue };
        let Some(h) = crate::schema::get_manifest_tx(tx, evidence).await? else {
            continue;
        };
        let compliance_until_ms = v
            .retention
            .filter(|r| r.mode == LockMode::Compliance)
            .map(|r| r.until_ms)
            // (One already past binds nothing.)
            .filter(|&until| until > now_ms && h.retain_until_ms.is_none_or(|u| u < until));
        let hold = v.legal_hold && !holds_carried && !h.legal_hold;
        let restate_hold = v.legal_hold && holds_carried && !holds_stated && h.legal_hold;
        if compliance_until_ms.is_some() || hold || restate_hold {
            todo.push(LockToCarry {
                evidence,
                compliance_until_ms,
                hold,
                restate_hold,
            });
        }
    }
    Ok((Some(last), todo))
}

/// Where a listing of a bucket's uploads resumes: after this key's uploads
/// (`upload: None`), or after this upload of it.
#[derive(Clone, Debug, Default)]
pub struct UploadMarker {
    pub key: String,
    pub upload: Option<EvidenceId>,
    /// `key` is a common prefix (a delimited listing's page ended on it):
    /// past every upload whose key begins with it; `upload` is unused.
    pub past_prefix: bool,
}

/// Up to `limit` multipart uploads in `bucket` under `prefix`, past
/// `after`, in the order S3 lists them: by key, then by upload id (which
/// is time-ordered). Reads only the bucket's own uploads, and only as many
/// as it returns, however many uploads the cluster holds. With `tenant`,
/// only that tenant's (an upload another tenant left under this bucket
/// name, before uploads went with their bucket, is not this bucket's).
pub async fn list_multipart_tx<T: Transaction>(
    tx: &T,
    bucket: &str,
    tenant: Option<&str>,
    prefix: &str,
    after: Option<&UploadMarker>,
    limit: usize,
) -> Result<Vec<(EvidenceId, MultipartRecord)>, ObjectError> {
    check_names(bucket, None)?;
    let base = key_of(BUCKET_UPLOAD, &[bucket.as_bytes(), b""]);
    let mut under = base.clone();
    under.extend_from_slice(prefix.as_bytes());
    let end = prefix_end(&under);
    let mut begin = under;
    if let Some(m) = after {
        let mut from = base.clone();
        from.extend_from_slice(m.key.as_bytes());
        if m.past_prefix {
            from = prefix_end(&from);
        } else {
            from.push(0);
            match m.upload {
                Some(id) => {
                    from.extend_from_slice(id.as_bytes());
                    from.push(0);
                }
                // Past every upload of the key: ids are 16 bytes, all below this.
                None => from.extend_from_slice(&[0xff; 17]),
            }
        }
        begin = begin.max(from);
    }
    let mut out = Vec::new();
    while out.len() < limit && begin < end {
        let rows = tx
            .get_range(&begin, &end, (limit - out.len()).min(1000), false)
            .await?;
        let Some((last, _)) = rows.last() else { break };
        begin = [last.as_slice(), &[0]].concat();
        for (k, _) in &rows {
            let id: [u8; 16] = k
                .len()
                .checked_sub(16)
                .and_then(|at| k[at..].try_into().ok())
                .ok_or(protocol::DecodeError::Malformed)?;
            let id = EvidenceId(id);
            match get_multipart_tx(tx, id).await? {
                Some(rec) if tenant.is_none_or(|t| t == rec.tenant) => out.push((id, rec)),
                _ => {}
            }
        }
    }
    Ok(out)
}

/// Indexes by bucket (`3U`) up to `limit` uploads begun before that index
/// existed, after upload `after` (none: from the first), and returns the
/// last one looked at, or `None` once all are (and says so in the index).
pub async fn index_bucket_uploads_tx<T: Transaction>(
    tx: &T,
    after: Option<EvidenceId>,
    limit: usize,
) -> Result<Option<EvidenceId>, ObjectError> {
    if tx.get(BUCKET_UPLOADS_INDEXED).await?.is_some() {
        return Ok(None);
    }
    let begin = match after {
        Some(id) => [&key_of(MULTIPART, &[id.as_bytes()])[..], &[0]].concat(),
        None => MULTIPART.to_vec(),
    };
    let rows = tx
        .get_range(&begin, &prefix_end(MULTIPART), limit.max(1), false)
        .await?;
    let Some((last, _)) = rows.last() else {
        tx.set(BUCKET_UPLOADS_INDEXED, b"");
        return Ok(None);
    };
    let last = upload_id_of(last)?;
    for (k, v) in &rows {
        // One that does not decode is passed over (listings never showed
        // it either), not a gateway that cannot start.
        let Ok(rec) = decode_multipart(v) else {
            continue;
        };
        tx.set(
            &bucket_upload_key(&rec.bucket, &rec.key, &upload_id_of(k)?),
            b"",
        );
    }
    Ok(Some(last))
}

fn upload_id_of(k: &[u8]) -> Result<EvidenceId, ObjectError> {
    let id: [u8; 16] = k
        .get(MULTIPART.len()..)
        .and_then(|b| b.try_into().ok())
        .ok_or(protocol::DecodeError::Malformed)?;
    Ok(EvidenceId(id))
}

/// Records a part in the transaction that ends its upload intent; returns
/// the part it replaced (whose stripes the caller deletes).
pub async fn put_part_tx<T: Transaction>(
    tx: &T,
    upload: EvidenceId,
    number: u32,
    part: &PartRecord,
) -> Result<Option<PartRecord>, ObjectError> {
    if get_multipart_tx(tx, upload).await?.is_none() {
        return Err(ObjectError::NoSuchUpload);
    }
    crate::schema::end_intent_as_part_tx(tx, part.part_id).await?;
    let key = part_key(&upload, number);
    let old = match tx.get(&key).await? {
        Some(v) => Some(decode_part(&v)?),
        None => None,
    };
    if let Some(old) = &old {
        queue_part_deletion_tx(tx, old);
    }
    tx.set(&key, &encode_versioned(PART_V2, part));
    if let Some(source) = part.copied_from {
        tx.set(&copied_part_key(&source, &part.part_id), b"");
    }
    let mut place = upload.as_bytes().to_vec();
    place.extend_from_slice(&number.to_be_bytes());
    tx.set(&part_place_key(&part.part_id), &place);
    touch_upload_tx(tx, upload, part.uploaded_ms);
    Ok(old)
}

/// Notes a sign of life of an upload at `now_ms` (a part stored, a Complete
/// begun): the collector expires uploads idle for `multipart_expiry_ms`,
/// not those begun that long ago (a large upload over a slow link, or a
/// Complete filing many GiB of parts, is not abandoned). A blind write, so
/// parts stored at once do not conflict over it.
pub fn touch_upload_tx<T: Transaction>(tx: &T, upload: EvidenceId, now_ms: u64) {
    tx.set(
        &key_of(UPLOAD_ACTIVE, &[upload.as_bytes()]),
        &now_ms.to_be_bytes(),
    );
}

/// The parts of an upload, by number.
pub async fn parts_tx<T: Transaction>(
    tx: &T,
    upload: EvidenceId,
) -> Result<Vec<(u32, PartRecord)>, ObjectError> {
    let prefix = key_of(PART, &[upload.as_bytes()]);
    tx.get_range(&prefix, &prefix_end(&prefix), 0, false)
        .await?
        .iter()
        .map(|(k, v)| {
            let n: [u8; 4] = k[prefix.len()..]
                .try_into()
                .map_err(|_| protocol::DecodeError::Malformed)?;
            Ok((u32::from_be_bytes(n), decode_part(v)?))
        })
        .collect()
}

/// Ends a multipart upload (completed, aborted, expired, or gone with its
/// bucket): its records go, and every part it has now is queued for
/// deletion ([`parts_to_delete_tx`]) in the same transaction. So no part
/// outlives its upload: not one uploaded while a Complete was filing the
/// others, nor one whose deletion a crash or a client gone cut short.
/// Returns the parts, for the caller to delete at once.
pub async fn end_multipart_tx<T: Transaction>(
    tx: &T,
    upload: EvidenceId,
) -> Result<Vec<PartRecord>, ObjectError> {
    let parts = parts_tx(tx, upload).await?;
    for (_, p) in &parts {
        queue_part_deletion_tx(tx, p);
    }
    if let Some(rec) = get_multipart_tx(tx, upload).await? {
        tx.clear(&bucket_upload_key(&rec.bucket, &rec.key, &upload));
    }
    tx.clear(&key_of(MULTIPART, &[upload.as_bytes()]));
    tx.clear(&key_of(UPLOAD_ACTIVE, &[upload.as_bytes()]));
    let prefix = key_of(PART, &[upload.as_bytes()]);
    tx.clear_range(&prefix, &prefix_end(&prefix));
    Ok(parts.into_iter().map(|(_, p)| p).collect())
}

/// The upload's last sign of life ([`touch_upload_tx`]), if any.
async fn upload_active_tx<T: Transaction>(
    tx: &T,
    upload: EvidenceId,
) -> Result<Option<u64>, ObjectError> {
    Ok(tx
        .get(&key_of(UPLOAD_ACTIVE, &[upload.as_bytes()]))
        .await?
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map(u64::from_be_bytes))
}

/// [`touch_upload_tx`] for an upload still open (a Complete beginning):
/// `NoSuchUpload` when it ended, so no sign of life outlives its upload;
/// and read, so a collector expiring it at the same moment conflicts.
pub async fn touch_open_upload_tx<T: Transaction>(
    tx: &T,
    upload: EvidenceId,
    now_ms: u64,
) -> Result<(), ObjectError> {
    if get_multipart_tx(tx, upload).await?.is_none() {
        return Err(ObjectError::NoSuchUpload);
    }
    touch_upload_tx(tx, upload, now_ms);
    Ok(())
}

/// Expires an upload [`stale_uploads_tx`] found, unless it showed a sign
/// of life since (read again here, so a part or a Complete that touches it
/// meanwhile conflicts with this instead of losing its parts): `Ok(None)`
/// then; `NoSuchUpload` when it ended.
pub async fn expire_upload_tx<T: Transaction>(
    tx: &T,
    upload: EvidenceId,
    before_ms: u64,
) -> Result<Option<Vec<PartRecord>>, ObjectError> {
    let Some(rec) = get_multipart_tx(tx, upload).await? else {
        return Err(ObjectError::NoSuchUpload);
    };
    let active = upload_active_tx(tx, upload).await?;
    if rec.created_ms >= before_ms || active.is_some_and(|ms| ms >= before_ms) {
        return Ok(None);
    }
    end_multipart_tx(tx, upload).await.map(Some)
}

/// Aborts a multipart upload: [`end_multipart_tx`], or `NoSuchUpload` when
/// it already ended (an Abort racing a Complete that committed first must
/// not answer that it aborted).
pub async fn abort_multipart_tx<T: Transaction>(
    tx: &T,
    upload: EvidenceId,
) -> Result<Vec<PartRecord>, ObjectError> {
    if get_multipart_tx(tx, upload).await?.is_none() {
        return Err(ObjectError::NoSuchUpload);
    }
    end_multipart_tx(tx, upload).await
}

/// A page of uploads for the collector to abort: those after `after` (from
/// the first when `None`), among the next `limit`, that began before
/// `before_ms` and show no sign of life since ([`touch_upload_tx`]), never
/// completed nor aborted. Also where the next page starts: `None` when no
/// upload after these began before `before_ms` (upload ids are
/// time-ordered, so the walk stops at the first one begun since).
pub async fn stale_uploads_tx<T: Transaction>(
    tx: &T,
    after: Option<EvidenceId>,
    before_ms: u64,
    limit: usize,
) -> Result<(Vec<EvidenceId>, Option<EvidenceId>), ObjectError> {
    let begin = match after {
        Some(id) => {
            let mut k = key_of(MULTIPART, &[id.as_bytes()]);
            k.push(0);
            k
        }
        None => MULTIPART.to_vec(),
    };
    let limit = limit.max(1);
    let rows = tx
        .get_range(&begin, &prefix_end(MULTIPART), limit, false)
        .await?;
    let mut stale = Vec::new();
    for (k, v) in &rows {
        let id = k
            .get(MULTIPART.len()..)
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
            .map(EvidenceId)
            .ok_or(protocol::DecodeError::Malformed)?;
        if decode_multipart(v)?.created_ms >= before_ms {
            return Ok((stale, None));
        }
        let active = upload_active_tx(tx, id).await?;
        if active.is_none_or(|ms| ms < before_ms) {
            stale.push(id);
        }
    }
    let next = match rows.len() == limit {
        true => rows.last().and_then(|(k, _)| {
            <[u8; 16]>::try_from(k.get(MULTIPART.len()..)?)
                .ok()
                .map(EvidenceId)
        }),
        false => None,
    };
    Ok((stale, next))
}

fn queue_part_deletion_tx<T: Transaction>(tx: &T, part: &PartRecord) {
    tx.clear(&part_place_key(&part.part_id));
    if let Some(source) = part.copied_from {
        tx.clear(&copied_part_key(&source, &part.part_id));
    }
    tx.set(&key_of(PART_DELETION, &[part.part_id.as_bytes()]), b"");
}

fn copied_part_key(source: &EvidenceId, part: &EvidenceId) -> Vec<u8> {
    let mut k = key_of(COPIED_PART, &[source.as_bytes()]);
    k.extend_from_slice(part.as_bytes());
    k
}

/// Copied parts one transaction drops at most ([`drop_parts_copied_from_tx`]):
/// each costs a few reads and writes, and a transaction is held to 10 MB
/// and 5 s.
pub const COPIES_DROPPED_AT_ONCE: usize = 1_000;
/// Copied parts the expunge's own transaction drops (it does its own work
/// too; each copy is a few reads in turn).
pub const COPIES_DROPPED_WITH_EXPUNGE: usize = 100;

/// Drops up to `limit` stored parts copied from `source` (being expunged)
/// out of their uploads: a Complete naming one is refused (InvalidPart;
/// it is refused all the same while not dropped yet, its source gone),
/// and its shards are queued for deletion, so the expunged bytes do not
/// stay on the nodes in an upload nobody completes. The expunge's
/// transaction drops the first [`COPIES_DROPPED_WITH_EXPUNGE`]; the
/// erasure that follows (the request's, or GC's) the rest, a transaction
/// of [`COPIES_DROPPED_AT_ONCE`] at a time, before the expunge can be
/// finished (any number of uploads may copy one object). Returns how many were dropped, and
/// whether there may be more.
pub async fn drop_parts_copied_from_tx<T: Transaction>(
    tx: &T,
    source: EvidenceId,
    limit: usize,
) -> Result<(usize, bool), SchemaError> {
    let prefix = key_of(COPIED_PART, &[source.as_bytes()]);
    let copies = tx
        .get_range(&prefix, &prefix_end(&prefix), limit, false)
        .await?;
    let more = limit > 0 && copies.len() >= limit;
    let mut dropped = 0;
    for (k, _) in &copies {
        let Some(part) = k
            .get(prefix.len()..)
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
            .map(EvidenceId)
        else {
            return Err(protocol::DecodeError::Malformed.into());
        };
        tx.clear(k);
        let live = match live_part_tx(tx, part).await {
            Ok(Some(live)) => live,
            Ok(None) => continue,
            // Its upload's records do not decode: the part's bytes go all
            // the same (an expunge must not fail on a damaged record of
            // another object, nor leave the bytes it orders erased).
            Err(SchemaError::Decode(_)) => {
                tx.clear(&part_place_key(&part));
                tx.set(&key_of(PART_DELETION, &[part.as_bytes()]), b"");
                dropped += 1;
                continue;
            }
            Err(e) => return Err(e),
        };
        // Read with it: the record `live_part_tx` found under its number.
        tx.clear(&part_key(&live.upload, live.number));
        queue_part_deletion_tx(tx, &live.record);
        dropped += 1;
    }
    Ok((dropped, more))
}

/// Up to `limit` parts queued for deletion after `after` (from the first
/// when `None`), in id order: parts of ended uploads and parts replaced by
/// another upload of their number.
pub async fn parts_to_delete_tx<T: Transaction>(
    tx: &T,
    after: Option<EvidenceId>,
    limit: usize,
) -> Result<Vec<EvidenceId>, ObjectError> {
    let begin = match after {
        Some(id) => {
            let mut k = key_of(PART_DELETION, &[id.as_bytes()]);
            k.push(0);
            k
        }
        None => PART_DELETION.to_vec(),
    };
    tx.get_range(&begin, &prefix_end(PART_DELETION), limit.max(1), false)
        .await?
        .iter()
        .map(|(k, _)| {
            k.get(PART_DELETION.len()..)
                .and_then(|b| <[u8; 16]>::try_from(b).ok())
                .map(EvidenceId)
                .ok_or_else(|| protocol::DecodeError::Malformed.into())
        })
        .collect()
}

/// A queued part's shards are all deleted and its stripe records forgotten.
pub fn part_deleted_tx<T: Transaction>(tx: &T, part: EvidenceId) {
    tx.clear(&key_of(PART_DELETION, &[part.as_bytes()]));
}

/// What a completed multipart upload answered, kept so that a client
/// retrying its Complete (the first answer lost on the way) gets the same
/// answer instead of NoSuchUpload, as S3 gives it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletedUpload {
    pub tenant: String,
    pub bucket: String,
    pub key: String,
    /// The object's ETag (MD5 of the parts' MD5s, then "-N").
    pub etag: String,
    pub version_id: EvidenceId,
    pub null_version: bool,
    pub completed_ms: u64,
}

/// Ends a multipart upload that completed (see [`end_multipart_tx`]) and
/// keeps what it answered for [`completed_upload_tx`]. Fails with
/// `NoSuchUpload` if the upload already ended (completed by a concurrent
/// request, or aborted), so an upload completes once.
pub async fn complete_multipart_tx<T: Transaction>(
    tx: &T,
    upload: EvidenceId,
    done: &CompletedUpload,
) -> Result<(), ObjectError> {
    if get_multipart_tx(tx, upload).await?.is_none() {
        return Err(ObjectError::NoSuchUpload);
    }
    end_multipart_tx(tx, upload).await?;
    tx.set(
        &key_of(COMPLETED, &[upload.as_bytes()]),
        &encode_versioned(RECORD_V1, done),
    );
    tx.set(&completed_by_time(done.completed_ms, &upload), b"");
    Ok(())
}

fn completed_by_time(ms: u64, upload: &EvidenceId) -> Vec<u8> {
    key_of(COMPLETED_BY_TIME, &[&ms.to_be_bytes(), upload.as_bytes()])
}

/// What `upload` answered when it completed, if it did (and that answer is
/// still kept).
pub async fn completed_upload_tx<T: Transaction>(
    tx: &T,
    upload: EvidenceId,
) -> Result<Option<CompletedUpload>, ObjectError> {
    get_record(tx, &key_of(COMPLETED, &[upload.as_bytes()])).await
}

/// Forgets up to `limit` completed uploads that completed before
/// `before_ms`, oldest first; returns how many.
pub async fn expire_completed_tx<T: Transaction>(
    tx: &T,
    before_ms: u64,
    limit: usize,
) -> Result<usize, ObjectError> {
    let end = key_of(COMPLETED_BY_TIME, &[&before_ms.to_be_bytes()]);
    let rows = tx
        .get_range(COMPLETED_BY_TIME, &end, limit.max(1), false)
        .await?;
    for (k, _) in &rows {
        // "3D", 8 bytes of time, 0x00, then the upload id.
        let id = k
            .get(COMPLETED_BY_TIME.len() + 9..)
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
            .ok_or(protocol::DecodeError::Malformed)?;
        tx.clear(&key_of(COMPLETED, &[&id]));
        tx.clear(k);
    }
    Ok(rows.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tenant's buckets stop at S3's most, so one listing holds them all;
    /// another tenant's count apart.
    #[tokio::test]
    async fn a_tenant_has_at_most_ten_thousand_buckets() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::EmbeddedStore::open(&dir.path().join("index.redb")).unwrap();
        let rec = |tenant: &str| BucketRecord {
            tenant: tenant.into(),
            created_ms: 1,
            versioning: Versioning::Unversioned,
            object_lock: false,
            default_retention: None,
        };
        crate::run(&store, |tx| async move {
            create_tenant_tx(&tx, "court", 1).await?;
            create_tenant_tx(&tx, "other", 1).await?;
            create_bucket_tx(&tx, "first", &rec("court")).await
        })
        .await
        .unwrap();
        // The rest of the most, as their listing keys alone (what counts).
        crate::run(&store, |tx| async move {
            for i in 1..MAX_BUCKETS_PER_TENANT {
                let name = format!("b{i:05}");
                tx.set(&key_of(TENANT_BUCKET, &[b"court", name.as_bytes()]), b"");
            }
            Ok::<_, ObjectError>(())
        })
        .await
        .unwrap();
        let one_more = crate::run(&store, |tx| async move {
            create_bucket_tx(&tx, "one-more", &rec("court")).await
        })
        .await;
        assert!(
            matches!(one_more, Err(ObjectError::TooManyBuckets)),
            "{one_more:?}"
        );
        crate::run(&store, |tx| async move {
            create_bucket_tx(&tx, "theirs", &rec("other")).await
        })
        .await
        .unwrap();
    }

    /// ms since the epoch of a UTC date at noon.
    fn noon(y: i32, m: u8, d: u8) -> u64 {
        let date = time::Date::from_calendar_date(y, time::Month::try_from(m).unwrap(), d).unwrap();
        (date
            .with_hms(12, 0, 0)
            .unwrap()
            .assume_utc()
            .unix_timestamp()
            * 1000) as u64
    }

    #[test]
    fn default_retention_in_years_keeps_to_the_calendar() {
        let years = |n| DefaultRetention {
            mode: LockMode::Compliance,
            period: RetentionPeriod::Years(n),
        };
        // Seven years across 29 February 2028: 2,556 days, where 7 x 365
        // would end on 28 February 2031.
        assert_eq!(years(7).until_ms(noon(2024, 3, 1)), noon(2031, 3, 1));
        assert_eq!(years(1).until_ms(noon(2023, 6, 15)), noon(2024, 6, 15));
        // 29 February has no date in a common year: 1 March, never earlier.
        assert_eq!(years(1).until_ms(noon(2024, 2, 29)), noon(2025, 3, 1));
        assert_eq!(years(4).until_ms(noon(2024, 2, 29)), noon(2028, 2, 29));
        let days = DefaultRetention {
            mode: LockMode::Governance,
            period: RetentionPeriod::Days(30),
        };
        assert_eq!(days.until_ms(noon(2024, 2, 15)), noon(2024, 3, 16));
        // Beyond the calendar's range: still later, never wrapped.
        assert!(years(100).until_ms(u64::MAX / 2) >= u64::MAX / 2);
        assert_eq!(years(1).until_ms(u64::MAX), u64::MAX);
    }

    #[test]
    fn version_1_bucket_records_still_read() {
        #[derive(Serialize)]
        struct V1 {
            tenant: String,
            created_ms: u64,
            versioning: Versioning,
            object_lock: bool,
            default_retention: Option<(LockMode, u32)>,
        }
        let bytes = encode_versioned(
            RECORD_V1,
            &V1 {
                tenant: "court".into(),
                created_ms: 5,
                versioning: Versioning::Enabled,
                object_lock: true,
                default_retention: Some((LockMode::Compliance, 30)),
            },
        );
        let rec: BucketRecord = decode_versioned::<BucketRecordV1>(RECORD_V1, &bytes)
            .unwrap()
            .into();
        assert_eq!(
            rec.default_retention,
            Some(DefaultRetention {
                mode: LockMode::Compliance,
                period: RetentionPeriod::Days(30)
            })
        );
        assert_eq!((rec.tenant.as_str(), rec.created_ms), ("court", 5));
        // A version 2 record is not read as version 1.
        let v2 = encode_versioned(BUCKET_V2, &rec);
        assert!(decode_versioned::<BucketRecordV1>(RECORD_V1, &v2).is_err());
        assert_eq!(
            decode_versioned::<BucketRecord>(BUCKET_V2, &v2).unwrap(),
            rec
        );
    }

    #[test]
    fn version_and_multipart_records_before_content_headers_still_read() {
        #[derive(Serialize)]
        struct V1 {
            version_id: EvidenceId,
            null_version: bool,
            evidence: Option<EvidenceId>,
            size: u64,
            etag: String,
            last_modified_ms: u64,
            content_type: Option<String>,
            user_metadata: Vec<(String, String)>,
            retention: Option<Retention>,
            legal_hold: bool,
        }
        let old = V1 {
            version_id: EvidenceId::new(7, [1; 10]),
            null_version: false,
            evidence: Some(EvidenceId::new(7, [2; 10])),
            size: 42,
            etag: "abc".into(),
            last_modified_ms: 7,
            content_type: Some("video/mp4".into()),
            user_metadata: vec![("case".into(), "17".into())],
            retention: Some(Retention {
                mode: LockMode::Compliance,
                until_ms: 99,
            }),
            legal_hold: true,
        };
        let v = decode_version(&encode_versioned(RECORD_V1, &old)).unwrap();
        assert_eq!(
            (
                v.size,
                v.etag.as_str(),
                v.content_type.as_deref(),
                v.legal_hold
            ),
            (42, "abc", Some("video/mp4"), true)
        );
        assert_eq!(v.user_metadata, old.user_metadata);
        assert!(v.content.is_empty());
        // Written now, with its headers, and read back whole.
        let mut new = v.clone();
        new.content.disposition = Some("attachment".into());
        new.content.expires_ms = Some(5);
        assert_eq!(decode_version(&encode_version(&new)).unwrap(), new);

        #[derive(Serialize)]
        struct MultipartV2 {
            bucket: String,
            key: String,
            tenant: String,
            created_ms: u64,
            version: V1,
            default_retention: bool,
        }
        let m = encode_versioned(
            MULTIPART_V2,
            &MultipartV2 {
                bucket: "b".into(),
                key: "k".into(),
                tenant: "court".into(),
                created_ms: 3,
                version: old,
                default_retention: true,
            },
        );
        let m = decode_multipart(&m).unwrap();
        assert!(m.default_retention && m.version == v, "{m:?}");
        let again = encode_versioned(MULTIPART_V3, &m);
        assert_eq!(decode_multipart(&again).unwrap(), m);
    }

    #[test]
    fn bucket_names_follow_s3() {
        for ok in ["abc", "my-bucket.2026", "a1b"] {
            assert!(valid_bucket(ok), "{ok}");
        }
        for bad in [
            "ab",
            "-abc",
            "abc-",
            "a..b",
            "ABC",
            "192.168.1.1",
            &"a".repeat(64),
        ] {
            assert!(!valid_bucket(bad), "{bad}");
        }
        assert!(valid_key("a/b c.txt") && !valid_key("") && !valid_key("a\0b"));
    }

    #[test]
    fn an_id_minted_before_the_newest_moves_just_past_it() {
        let newest = EvidenceId::new(5_000, [3; 10]);
        let later = EvidenceId::new(6_000, [1; 10]);
        assert_eq!(after_newest(later, newest), later, "a later id stays");
        for behind in [
            EvidenceId::new(4_000, [7; 10]),
            EvidenceId::new(5_000, [1; 10]),
            newest,
        ] {
            let moved = after_newest(behind, newest);
            assert!(moved > newest, "{behind:?} -> {moved:?}");
            assert_eq!(moved.unix_millis(), 5_001);
            assert_eq!(
                moved.as_bytes()[6..],
                behind.as_bytes()[6..],
                "its random part kept"
            );
        }
    }

    #[test]
    fn inverted_ids_sort_newest_first() {
        let old = EvidenceId::new(1_000, [9; 10]);
        let new = EvidenceId::new(2_000, [0; 10]);
        assert!(inverted(&new) < inverted(&old));
    }
}
