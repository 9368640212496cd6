//! Custodia's records on the ordered KV store: nodes, upload intents,
//! manifests and the content-hash lookup. The gateway calls only this module;
//! every function that takes a transaction ends in `_tx`.
//!
//! Key layout (integers big-endian so keys sort numerically; tenants are
//! validated to `[a-z0-9_-]{1,64}` so a 0x00 terminator is unambiguous; values
//! are `protocol::wire::encode_versioned` records):
//!
//! ```text
//! ("N", node u32)                                 = NodeRecord
//! ("n", node u32)                                 = LifecycleRecord    an operator's last decision (absent: none, active)
//! ("I", evidence 16)                              = IntentRecord       upload in flight
//! ("K", tenant, 0x00, blake3(idempotency key) 32) = evidence 16 [request 32]  retry finds the first filing
//! ("E", evidence 16)                              = ManifestHeader     visible evidence
//! ("S", evidence 16, stripe u64)                  = StripeRecord       one key per stripe
//! ("B", evidence 16, tree node u64)               = 64-byte hash pair  Bao outboard, verified ranges
//! ("H", tenant, 0x00, blake3 root 32, evidence 16) = ""                 lookup by content, per tenant
//! ("D", evidence 16, stripe u64)                  = i64 LE (nonces)    degraded: waits for repair
//! ("T", blake3(bearer token) 32)                  = TokenRecord        never the token itself
//! ("X", evidence 16)                              = ManifestHeader     expunged: metadata kept, bytes gone
//! ("Y", evidence 16)                              = ""                 expunged, shards still to delete
//! ("Z", evidence 16, stripe u64)                  = ""                 lost: fewer than k shards left
//! ("C")                                           = ClockRecord        the compliance clock
//! ("R", evidence 16, stripe u64)                  = RepairLease        the task repairing it
//! ("A")                                           = ""                 recovery left shards with no node: copies to adopt
//! ("W", evidence 16)                              = ""                 shards recovery found no record of: kept, not swept
//! ("F")                                           = u32                the index format (see [`INDEX_FORMAT`])
//! ```
//!
//! The ledger's keys ("Q", "L", "N", "T", "V", "O", "P", "M") are laid out in
//! [`crate::ledger`]. Two of its tags are also used here, with keys of other
//! lengths ("N": a node id u32 here, a leaf u64 there; "T": a 32-byte token
//! hash here, a level and tile number there), so a scan over either tag
//! must step over the other side's keys: the node registry is read by id,
//! or listed as [`nodes_tx`] does; the ledger's group lookup steps over node
//! keys (`ledger::leaves_at_tx`).
//!
//! A 1 TiB filing is ~260,000 small `S` keys and ~1,000,000 64-byte `B` keys
//! (one per MiB: `protocol::bao`) written in batches as the upload proceeds, and made visible by the small `E` key in the last transaction,
//! which also checks that garbage collection did not abort the intent.

use crate::kv::{KvError, Retryable, Transaction};
use protocol::wire::{decode_versioned, encode_versioned};
use protocol::{
    Blake3Hash, DecodeError, EvidenceId, ManifestHeader, NodeId, ShardKey, StripeRecord,
};
use serde::{Deserialize, Serialize};

const NODE: u8 = b'N';
const LIFECYCLE: u8 = b'n';
const INTENT: u8 = b'I';
const IDEMPOTENCY: u8 = b'K';
const EVIDENCE: u8 = b'E';
const STRIPE: u8 = b'S';
const OUTBOARD: u8 = b'B';
const BY_HASH: u8 = b'H';
const DEGRADED: u8 = b'D';
const TOKEN: u8 = b'T';
const EXPUNGED: u8 = b'X';
const EXPUNGING: u8 = b'Y';
const LOST: u8 = b'Z';
const CLOCK: u8 = b'C';
const REPAIR_LEASE: u8 = b'R';
const ADOPTION_PENDING: u8 = b'A';
const UNCLAIMED: u8 = b'W';
const FORMAT: u8 = b'F';

/// The index format this version writes, and the newest it reads. Raised
/// when a version writes records whose meaning an older version would
/// miss to harm (a mark that keeps shards from the orphan sweep, say):
/// an index a newer version wrote is then refused by this one, rather than
/// served by code that ignores what it cannot know. (Indexes of versions
/// before the marker have none: format 0.)
pub const INDEX_FORMAT: u32 = 1;

const RECORD_V1: u8 = 1;

/// The format of the newest version that served the index (0: none that
/// marked it): this version may serve it if that is at most
/// [`INDEX_FORMAT`].
pub async fn index_format_tx<T: Transaction>(tx: &T) -> Result<u32, SchemaError> {
    Ok(match tx.get(&[FORMAT]).await? {
        None => 0,
        Some(v) => u32::from_be_bytes(
            v.as_slice()
                .try_into()
                .map_err(|_| DecodeError::Malformed)?,
        ),
    })
}

/// Marks the index with this version's format, once this version serves
/// it (not before: a version that failed to start has served nothing, and
/// must not keep an older one from serving it); never lowers it.
pub async fn mark_format_tx<T: Transaction>(tx: &T) -> Result<(), SchemaError> {
    if index_format_tx(tx).await? < INDEX_FORMAT {
        tx.set(&[FORMAT], &INDEX_FORMAT.to_be_bytes());
    }
    Ok(())
}

/// Errors of schema operations. Only `Kv` errors may be retried.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The store failed or the transaction must be retried.
    #[error(transparent)]
    Kv(#[from] KvError),
    /// A stored record could not be decoded: corruption or a newer format.
    #[error("stored record is unreadable: {0}")]
    Decode(#[from] DecodeError),
    /// Garbage collection (or a failed upload) aborted this intent; the filing
    /// must not become visible.
    #[error("upload intent {0} was aborted")]
    IntentAborted(EvidenceId),
    /// No intent exists for this evidence.
    #[error("no upload intent for {0}")]
    NoIntent(EvidenceId),
    /// A tenant name outside `[a-z0-9_-]{1,64}`.
    #[error("invalid tenant name")]
    BadTenant,
    /// No visible evidence with this id.
    #[error("no such evidence {0}")]
    NoEvidence(EvidenceId),
    /// COMPLIANCE retention or a legal hold forbids this, for every role.
    #[error("{0}")]
    Locked(String),
    /// The admin role reaches every tenant's evidence, holds and nodes:
    /// only the operators' tenant ([`OPERATOR_TENANT`]) holds it.
    #[error("the admin role is only the operators' (tenant {OPERATOR_TENANT:?}); another tenant's credentials are reader or clerk")]
    AdminOutsideOperators,
}

/// The operators' tenant, which `custodia init` creates with the first
/// admin credentials: the only tenant whose credentials may be admin.
pub const OPERATOR_TENANT: &str = "admin";

/// The role a stored credential acts with: admin credentials another
/// tenant holds (issued before admin was the operators' alone) act as
/// clerks, within their tenant.
pub fn effective_role(tenant: &str, role: Role) -> Role {
    if role == Role::Admin && tenant != OPERATOR_TENANT {
        Role::Clerk
    } else {
        role
    }
}

impl Retryable for SchemaError {
    fn is_retryable(&self) -> bool {
        matches!(self, SchemaError::Kv(e) if e.is_retryable())
    }
}

/// Whether `name` is a valid tenant name.
pub fn valid_tenant(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// A tag and an evidence id: the key of every record kept per evidence
/// (here and in [`crate::ledger`]).
pub(crate) fn evidence_key(tag: u8, id: &EvidenceId) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(tag);
    k.extend_from_slice(id.as_bytes());
    k
}

fn stripe_key(tag: u8, id: &EvidenceId, stripe: u64) -> Vec<u8> {
    let mut k = evidence_key(tag, id);
    k.extend_from_slice(&stripe.to_be_bytes());
    k
}

fn tenant_key(tag: u8, tenant: &str) -> Result<Vec<u8>, SchemaError> {
    if !valid_tenant(tenant) {
        return Err(SchemaError::BadTenant);
    }
    let mut k = Vec::with_capacity(2 + tenant.len() + 48);
    k.push(tag);
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    Ok(k)
}

fn idempotency_key(tenant: &str, key: &str) -> Result<Vec<u8>, SchemaError> {
    let mut k = tenant_key(IDEMPOTENCY, tenant)?;
    k.extend_from_slice(blake3::hash(key.as_bytes()).as_bytes());
    Ok(k)
}

fn hash_prefix(tenant: &str, root: &Blake3Hash) -> Result<Vec<u8>, SchemaError> {
    let mut k = tenant_key(BY_HASH, tenant)?;
    k.extend_from_slice(&root.0);
    Ok(k)
}

/// The smallest key greater than every key starting with `prefix`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xff]
}

fn evidence_from(bytes: &[u8]) -> Result<EvidenceId, SchemaError> {
    let arr: [u8; 16] = bytes.try_into().map_err(|_| DecodeError::Malformed)?;
    Ok(EvidenceId(arr))
}

/// An idempotency record: the evidence, then (since the request digest was
/// added) 32 bytes of request digest.
fn idempotent_from(bytes: &[u8]) -> Result<(EvidenceId, Option<[u8; 32]>), SchemaError> {
    match bytes.len() {
        16 => Ok((evidence_from(bytes)?, None)),
        48 => {
            let (e, r) = bytes.split_at(16);
            let r: [u8; 32] = r.try_into().map_err(|_| DecodeError::Malformed)?;
            Ok((evidence_from(e)?, Some(r)))
        }
        _ => Err(DecodeError::Malformed.into()),
    }
}

// ---------------------------------------------------------------- nodes

/// What the index knows of a storage node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node: NodeId,
    /// QUIC address, `host:port`.
    pub addr: String,
    /// Failure domain label (rack, host, site); placement spreads shards over them.
    pub failure_domain: Option<String>,
    /// The disk UUID the node last reported; a different one means a new or wiped disk.
    pub disk_uuid: Option<[u8; 16]>,
    pub capacity_bytes: u64,
    pub free_bytes: u64,
    pub used_bytes: u64,
    pub last_seen_ms: u64,
}

pub fn put_node_tx<T: Transaction>(tx: &T, rec: &NodeRecord) {
    let mut k = vec![NODE];
    k.extend_from_slice(&rec.node.0.to_be_bytes());
    tx.set(&k, &encode_versioned(RECORD_V1, rec));
}

/// Every node the index has a record of (each gateway records the nodes
/// its configuration lists), in id order.
///
/// The ledger's openings groups share the "N" tag with 8-byte keys (see the
/// layout above). Every one whose first leaf is below 2^32 sorts between
/// node 0's key, a prefix of them, and node 1's: node 0 is read by id and
/// the rest from node 1 on, where only 5-byte keys are node records.
pub async fn nodes_tx<T: Transaction>(tx: &T) -> Result<Vec<NodeRecord>, SchemaError> {
    let mut nodes: Vec<NodeRecord> = get_node_tx(tx, NodeId(0)).await?.into_iter().collect();
    let rows = tx
        .get_range(&[NODE, 0, 0, 0, 1], &[NODE + 1], 0, false)
        .await?;
    for (k, v) in rows.iter().filter(|(k, _)| k.len() == 5) {
        let rec: NodeRecord = decode_versioned(RECORD_V1, v)?;
        if k[1..] != rec.node.0.to_be_bytes() {
            return Err(DecodeError::Malformed.into());
        }
        nodes.push(rec);
    }
    Ok(nodes)
}

pub async fn get_node_tx<T: Transaction>(
    tx: &T,
    node: NodeId,
) -> Result<Option<NodeRecord>, SchemaError> {
    let mut k = vec![NODE];
    k.extend_from_slice(&node.0.to_be_bytes());
    match tx.get(&k).await? {
        Some(v) => Ok(Some(decode_versioned(RECORD_V1, &v)?)),
        None => Ok(None),
    }
}

/// The compliance clock (see `gateway::clock`): the time retention is
/// judged by, which only gateways' monotonic clocks and independent time
/// sources move.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockRecord {
    /// Milliseconds since the Unix epoch.
    pub compliance_ms: u64,
}

/// The stored compliance clock, if a gateway has started one.
pub async fn clock_tx<T: Transaction>(tx: &T) -> Result<Option<ClockRecord>, SchemaError> {
    match tx.get(&[CLOCK]).await? {
        Some(v) => Ok(Some(decode_versioned(RECORD_V1, &v)?)),
        None => Ok(None),
    }
}

/// When the newest visible evidence was filed (ms since the Unix epoch, from
/// its time-ordered id), if there is any: where a compliance clock starts in
/// an index that has evidence but no clock (an upgrade, `recover-index`).
pub async fn newest_filing_ms_tx<T: Transaction>(tx: &T) -> Result<Option<u64>, SchemaError> {
    let rows = tx.get_range(&[EVIDENCE], &[EVIDENCE + 1], 1, true).await?;
    Ok(rows.first().and_then(|(k, _)| {
        let id: [u8; 16] = k.get(1..17)?.try_into().ok()?;
        Some(EvidenceId(id).unix_millis())
    }))
}

/// Stores the compliance clock, never moving it back (several gateways
/// each advance their own reading of it).
pub async fn advance_clock_tx<T: Transaction>(
    tx: &T,
    rec: ClockRecord,
) -> Result<ClockRecord, SchemaError> {
    let stored = clock_tx(tx).await?;
    let next = ClockRecord {
        compliance_ms: stored.map_or(0, |r| r.compliance_ms).max(rec.compliance_ms),
    };
    if stored != Some(next) {
        tx.set(&[CLOCK], &encode_versioned(RECORD_V1, &next));
    }
    Ok(next)
}

/// Where a node is in its life: what an operator decided, beside the
/// health the gateway measures (up, suspect, down).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Lifecycle {
    /// Takes new shards (no record: every node starts active).
    #[default]
    Active,
    /// Takes no new shards; repair moves its shards to other nodes while it
    /// still serves them.
    Draining,
    /// Out of the cluster: takes nothing, and its shards count as missing.
    Removed,
}

impl Lifecycle {
    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Active => "active",
            Lifecycle::Draining => "draining",
            Lifecycle::Removed => "removed",
        }
    }
}

/// A lifecycle decision and when it was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleRecord {
    pub state: Lifecycle,
    pub changed_ms: u64,
}

/// Records an operator's decision about `node`, an activation too: with
/// its time, so copies of the decisions elsewhere (the ledger's openings
/// archive) can tell the newer one.
pub fn set_lifecycle_tx<T: Transaction>(tx: &T, node: NodeId, rec: &LifecycleRecord) {
    let mut k = vec![LIFECYCLE];
    k.extend_from_slice(&node.0.to_be_bytes());
    tx.set(&k, &encode_versioned(RECORD_V1, rec));
}

/// Says that `recover-index` left shards with no node (their nodes did
/// not answer), whose copies the orphan sweep adopts when it finds them.
pub fn set_adoption_pending_tx<T: Transaction>(tx: &T) {
    tx.set(&[ADOPTION_PENDING], b"");
}

/// Says that a complete orphan sweep has looked on every node since.
pub fn clear_adoption_pending_tx<T: Transaction>(tx: &T) {
    tx.clear(&[ADOPTION_PENDING]);
}

/// Marks evidence whose shards `recover-index` found with no record of it
/// in the ledger's archive: an upload that failed, or a filing answered
/// 201 that the archive had not caught up with when the index was lost.
/// The orphan sweep keeps their shards until an operator releases them
/// ([`release_unclaimed_tx`]).
pub fn hold_unclaimed_tx<T: Transaction>(tx: &T, evidence: EvidenceId) {
    tx.set(&evidence_key(UNCLAIMED, &evidence), b"");
}

/// Whether [`hold_unclaimed_tx`] holds `evidence`'s shards.
pub async fn is_unclaimed_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
) -> Result<bool, SchemaError> {
    Ok(tx.get(&evidence_key(UNCLAIMED, &evidence)).await?.is_some())
}

/// Up to `limit` held evidence ids, in order (see [`hold_unclaimed_tx`]).
pub async fn unclaimed_tx<T: Transaction>(
    tx: &T,
    limit: usize,
) -> Result<Vec<EvidenceId>, SchemaError> {
    tx.get_range(&[UNCLAIMED], &[UNCLAIMED + 1], limit, false)
        .await?
        .iter()
        .map(|(k, _)| evidence_from(&k[1..]))
        .collect()
}

/// Lets the orphan sweep collect the shards of held evidence (an
/// operator's decision, after recovering what was worth recovering).
pub fn release_unclaimed_tx<T: Transaction>(tx: &T, evidence: EvidenceId) {
    tx.clear(&evidence_key(UNCLAIMED, &evidence));
}

/// Whether copies left by `recover-index` may still await adoption (see
/// [`set_adoption_pending_tx`]).
pub async fn adoption_pending_tx<T: Transaction>(tx: &T) -> Result<bool, SchemaError> {
    Ok(tx.get(&[ADOPTION_PENDING]).await?.is_some())
}

/// Every node an operator decided about (absent: active).
pub async fn lifecycles_tx<T: Transaction>(
    tx: &T,
) -> Result<Vec<(NodeId, LifecycleRecord)>, SchemaError> {
    let rows = tx
        .get_range(&[LIFECYCLE], &[LIFECYCLE + 1], 0, false)
        .await?;
    rows.iter()
        .map(|(k, v)| {
            let id: [u8; 4] = k
                .get(1..5)
                .and_then(|b| b.try_into().ok())
                .ok_or(DecodeError::Truncated)?;
            Ok((
                NodeId(u32::from_be_bytes(id)),
                decode_versioned(RECORD_V1, v)?,
            ))
        })
        .collect()
}

// ---------------------------------------------------------------- credentials

/// What a caller may do: see [`Role::may`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Reads evidence and receipts of its tenant.
    Reader,
    /// Files and reads evidence of its tenant.
    Clerk,
    /// Everything, including cluster administration, except expunging.
    Admin,
    /// Expunges evidence on a court order, and nothing else: a dedicated role
    /// that no other role includes (see [`Role::may`]).
    Expunger,
}

impl Role {
    /// Whether this role may do what `needed` may. Reader < Clerk < Admin
    /// are ordered; `Expunger` stands apart.
    pub fn may(self, needed: Role) -> bool {
        let rank = |r: Role| match r {
            Role::Reader => Some(0),
            Role::Clerk => Some(1),
            Role::Admin => Some(2),
            Role::Expunger => None,
        };
        match (rank(self), rank(needed)) {
            (Some(have), Some(need)) => have >= need,
            _ => self == needed,
        }
    }

    /// The role named as in the API and CLI (`reader`, `clerk`, `admin`,
    /// `expunger`).
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "reader" => Some(Role::Reader),
            "clerk" => Some(Role::Clerk),
            "admin" => Some(Role::Admin),
            "expunger" => Some(Role::Expunger),
            _ => None,
        }
    }
}

/// The tenant and role a bearer token stands for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub tenant: String,
    pub role: Role,
}

/// The hash a bearer token is stored (and revoked) by: its BLAKE3.
pub fn token_hash(token: &str) -> [u8; 32] {
    *blake3::hash(token.as_bytes()).as_bytes()
}

/// A credential as the index keeps it (a bearer token by its hash, an S3
/// access key by its id): what a long operation checks again in the
/// transaction that commits it, without holding the secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialRef(pub(crate) Vec<u8>);

impl CredentialRef {
    /// A bearer token's.
    pub fn token(token: &str) -> Self {
        CredentialRef(token_key(token))
    }
}

/// Whether the credential still exists (not revoked). Read in a
/// transaction, a revocation committing meanwhile is a conflict, and the
/// retry sees it.
pub async fn credential_live_tx<T: Transaction>(
    tx: &T,
    credential: &CredentialRef,
) -> Result<bool, SchemaError> {
    Ok(tx.get(&credential.0).await?.is_some())
}

fn token_key(token: &str) -> Vec<u8> {
    token_hash_key(&token_hash(token))
}

fn token_hash_key(hash: &[u8; 32]) -> Vec<u8> {
    let mut k = vec![TOKEN];
    k.extend_from_slice(hash);
    k
}

/// Stores a credential; only the token's hash is kept.
pub fn put_token_tx<T: Transaction>(
    tx: &T,
    token: &str,
    rec: &TokenRecord,
) -> Result<(), SchemaError> {
    if !valid_tenant(&rec.tenant) {
        return Err(SchemaError::BadTenant);
    }
    if rec.role == Role::Admin && rec.tenant != OPERATOR_TENANT {
        return Err(SchemaError::AdminOutsideOperators);
    }
    tx.set(&token_key(token), &encode_versioned(RECORD_V1, rec));
    Ok(())
}

/// Revokes a credential: the token stops working with this transaction's
/// commit. False if no such token was stored.
pub async fn revoke_token_tx<T: Transaction>(tx: &T, token: &str) -> Result<bool, SchemaError> {
    revoke_token_hash_tx(tx, &token_hash(token)).await
}

/// [`revoke_token_tx`] by the token's hash ([`token_hash`]), for an
/// operator who knows a token only by how custody names it.
pub async fn revoke_token_hash_tx<T: Transaction>(
    tx: &T,
    hash: &[u8; 32],
) -> Result<bool, SchemaError> {
    let key = token_hash_key(hash);
    let existed = tx.get(&key).await?.is_some();
    tx.clear(&key);
    Ok(existed)
}

/// The hashes of stored tokens whose hash begins with `prefix` (custody
/// names a token by the first 8 bytes of its hash), at most `limit`.
pub async fn tokens_by_hash_prefix_tx<T: Transaction>(
    tx: &T,
    prefix: &[u8],
    limit: usize,
) -> Result<Vec<[u8; 32]>, SchemaError> {
    let mut begin = vec![TOKEN];
    begin.extend_from_slice(prefix);
    let end = prefix_end(&begin);
    Ok(tx
        .get_range(&begin, &end, limit, false)
        .await?
        .into_iter()
        .filter_map(|(k, _)| k.get(1..).and_then(|h| <[u8; 32]>::try_from(h).ok()))
        .collect())
}

pub async fn get_token_tx<T: Transaction>(
    tx: &T,
    token: &str,
) -> Result<Option<TokenRecord>, SchemaError> {
    match tx.get(&token_key(token)).await? {
        Some(v) => Ok(Some(decode_versioned(RECORD_V1, &v)?)),
        None => Ok(None),
    }
}

// ---------------------------------------------------------------- intents

/// An upload in flight. Its lease tells garbage collection a live upload (even
/// a day-long one, renewed as it goes) from an orphan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentRecord {
    pub tenant: String,
    pub lease_until_ms: u64,
    pub aborted: bool,
    /// The lease period its uploader renews by (a third of it at a time):
    /// GC waits at least this long for a renewal, whatever its own
    /// gateway's period, so gateways configured differently never take
    /// each other's live uploads for abandoned. 0 in intents recorded
    /// before it was kept.
    pub lease_ms: u64,
}

/// [`IntentRecord`] as first stored (`RECORD_V1`), without `lease_ms`.
#[derive(Deserialize)]
struct IntentRecordV1 {
    tenant: String,
    lease_until_ms: u64,
    aborted: bool,
}

/// Intents are stored as `INTENT_V2` since they carry `lease_ms`.
const INTENT_V2: u8 = 2;

fn encode_intent(rec: &IntentRecord) -> Vec<u8> {
    encode_versioned(INTENT_V2, rec)
}

fn decode_intent(v: &[u8]) -> Result<IntentRecord, SchemaError> {
    if v.first() == Some(&INTENT_V2) {
        return Ok(decode_versioned(INTENT_V2, v)?);
    }
    let old: IntentRecordV1 = decode_versioned(RECORD_V1, v)?;
    Ok(IntentRecord {
        tenant: old.tenant,
        lease_until_ms: old.lease_until_ms,
        aborted: old.aborted,
        lease_ms: 0,
    })
}

/// What starting an upload found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IntentStart {
    /// A new intent was recorded; go ahead.
    Started,
    /// The idempotency key already names a completed filing: answer with
    /// it, once the request is known to repeat it. The second field is the
    /// digest of what that filing's request said that its manifest does not
    /// keep ([`Idempotency::request`]); `None` for a key recorded before
    /// digests were.
    AlreadyFiled(EvidenceId, Option<[u8; 32]>),
    /// The idempotency key names an upload still in flight.
    InFlight(EvidenceId),
    /// The idempotency key names a filing since expunged: a retry must not
    /// file again what a court ordered removed.
    Expunged(EvidenceId),
}

/// An upload's `Idempotency-Key` and the digest of the parts of its request
/// that a retry must repeat and the manifest does not keep (the gateway's
/// choice: the declared provenance, which only the ledger records).
#[derive(Clone, Copy, Debug)]
pub struct Idempotency<'a> {
    pub key: &'a str,
    pub request: [u8; 32],
}

/// Records an upload intent for `evidence`, unless `idempotency` already names
/// a completed or live filing of this tenant.
pub async fn begin_intent_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
    tenant: &str,
    idempotency: Option<Idempotency<'_>>,
    lease_until_ms: u64,
    lease_ms: u64,
) -> Result<IntentStart, SchemaError> {
    if let Some(idem) = idempotency {
        let ik = idempotency_key(tenant, idem.key)?;
        match tx.get(&ik).await? {
            // This very transaction, run again after a commit whose outcome
            // was unknown (FoundationDB) and which did commit: ours.
            Some(prev) if idempotent_from(&prev)?.0 == evidence => {}
            Some(prev) => {
                let (prev, request) = idempotent_from(&prev)?;
                if tx.get(&evidence_key(EVIDENCE, &prev)).await?.is_some() {
                    return Ok(IntentStart::AlreadyFiled(prev, request));
                }
                if tx.get(&evidence_key(EXPUNGED, &prev)).await?.is_some() {
                    return Ok(IntentStart::Expunged(prev));
                }
                if let Some(intent) = get_intent_tx(tx, prev).await? {
                    if !intent.aborted {
                        return Ok(IntentStart::InFlight(prev));
                    }
                }
                // The earlier attempt failed: this retry files anew.
            }
            None => {}
        }
        let mut value = evidence.as_bytes().to_vec();
        value.extend_from_slice(&idem.request);
        tx.set(&ik, &value);
    } else if !valid_tenant(tenant) {
        return Err(SchemaError::BadTenant);
    }
    let rec = IntentRecord {
        tenant: tenant.to_string(),
        lease_until_ms,
        aborted: false,
        lease_ms,
    };
    tx.set(&evidence_key(INTENT, &evidence), &encode_intent(&rec));
    Ok(IntentStart::Started)
}

pub async fn get_intent_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
) -> Result<Option<IntentRecord>, SchemaError> {
    match tx.get(&evidence_key(INTENT, &evidence)).await? {
        Some(v) => Ok(Some(decode_intent(&v)?)),
        None => Ok(None),
    }
}

/// Checks the intent is live and extends its lease; reads the intent so an
/// abort committed meanwhile makes this transaction conflict. Every renewal
/// moves `lease_until_ms` forward, by at least 1 ms even when the renewing
/// gateway's clock is behind: GC takes a lease that stopped changing for a
/// whole lease period (by its own monotonic clock) as abandoned
/// ([`abort_if_stale_tx`]), never a wall-clock comparison.
pub async fn renew_intent_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
    lease_until_ms: u64,
) -> Result<(), SchemaError> {
    let mut rec = live_intent_tx(tx, evidence).await?;
    rec.lease_until_ms = lease_until_ms.max(rec.lease_until_ms.saturating_add(1));
    tx.set(&evidence_key(INTENT, &evidence), &encode_intent(&rec));
    Ok(())
}

async fn live_intent_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
) -> Result<IntentRecord, SchemaError> {
    match get_intent_tx(tx, evidence).await? {
        None => Err(SchemaError::NoIntent(evidence)),
        Some(rec) if rec.aborted => Err(SchemaError::IntentAborted(evidence)),
        Some(rec) => Ok(rec),
    }
}

/// Ends a live intent without making a manifest visible: the upload's
/// stripes now belong to a multipart part ([`crate::s3`]), which deletes
/// them when the multipart upload completes or is aborted. Fails if GC
/// aborted the intent.
pub async fn end_intent_as_part_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
) -> Result<(), SchemaError> {
    live_intent_tx(tx, evidence).await?;
    tx.clear(&evidence_key(INTENT, &evidence));
    Ok(())
}

/// Forgets the stripe records of a finished or abandoned multipart part
/// once its shards are deleted.
pub fn forget_part_stripes_tx<T: Transaction>(tx: &T, evidence: EvidenceId, stripes: &[u64]) {
    clear_stripes(tx, evidence, stripes);
    // Range verification data goes with the bytes.
    clear_outboard_tx(tx, evidence);
}

/// Forgets all of `evidence`'s Bao outboard pairs. Its ranges can no longer
/// be verified (whole reads still can: against the content root).
pub fn clear_outboard_tx<T: Transaction>(tx: &T, evidence: EvidenceId) {
    let prefix = evidence_key(OUTBOARD, &evidence);
    tx.clear_range(&prefix, &prefix_end(&prefix));
}

/// Clears the records (and repair and loss marks) of `stripes`.
fn clear_stripes<T: Transaction>(tx: &T, evidence: EvidenceId, stripes: &[u64]) {
    for stripe in stripes {
        tx.clear(&stripe_key(STRIPE, &evidence, *stripe));
        tx.clear(&stripe_key(DEGRADED, &evidence, *stripe));
        tx.clear(&stripe_key(REPAIR_LEASE, &evidence, *stripe));
        tx.clear(&stripe_key(LOST, &evidence, *stripe));
    }
}

/// Marks an intent aborted: its filing can never become visible. Its stripe
/// records stay until the shards they name are deleted ([`forget_aborted_tx`]).
pub async fn abort_intent_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
) -> Result<bool, SchemaError> {
    let Some(mut rec) = get_intent_tx(tx, evidence).await? else {
        return Ok(false);
    };
    rec.aborted = true;
    tx.set(&evidence_key(INTENT, &evidence), &encode_intent(&rec));
    Ok(true)
}

/// GC's abort of an upload it watched stop renewing: marks the intent
/// aborted only if it already is or its lease still reads `seen_lease_ms`
/// (what GC saw a lease period ago), checked in this same transaction, so an
/// upload that renewed in the meantime is left alone. No clock is read:
/// clocks set forward or back, or skewed between gateways, cannot make a live
/// upload look abandoned. Returns whether the intent is (now) aborted.
pub async fn abort_if_stale_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
    seen_lease_ms: u64,
) -> Result<bool, SchemaError> {
    match get_intent_tx(tx, evidence).await? {
        None => Ok(false),
        Some(rec) if rec.aborted => Ok(true),
        Some(rec) if rec.lease_until_ms != seen_lease_ms => Ok(false),
        Some(_) => abort_intent_tx(tx, evidence).await,
    }
}

/// Checks `evidence`'s intent is an aborted one; the store's errors (a
/// transaction to retry) are passed on as they are, not taken for a
/// missing intent.
async fn aborted_intent_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
) -> Result<(), SchemaError> {
    match live_intent_tx(tx, evidence).await {
        Err(SchemaError::IntentAborted(_)) => Ok(()),
        Err(e @ SchemaError::Kv(_)) => Err(e),
        _ => Err(SchemaError::NoIntent(evidence)),
    }
}

/// Forgets the records of some stripes of an aborted upload whose shards are
/// deleted, so later GC passes retry only the rest.
pub async fn forget_aborted_stripes_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
    stripes: &[u64],
) -> Result<(), SchemaError> {
    aborted_intent_tx(tx, evidence).await?;
    clear_stripes(tx, evidence, stripes);
    Ok(())
}

/// Up to `limit` upload intents after `after` (from the first when `None`),
/// in evidence order: live ones GC watches for renewals, aborted ones it
/// collects. A record this version cannot decode (damaged, or a newer
/// version's) is `None`: one such must not stop the walk past it.
pub async fn intents_tx<T: Transaction>(
    tx: &T,
    after: Option<EvidenceId>,
    limit: usize,
) -> Result<Vec<(EvidenceId, Option<IntentRecord>)>, SchemaError> {
    let from = match after {
        Some(id) => {
            let mut k = evidence_key(INTENT, &id);
            k.push(0);
            k
        }
        None => vec![INTENT],
    };
    let rows = tx.get_range(&from, &[INTENT + 1], limit, false).await?;
    rows.into_iter()
        .map(|(k, v)| Ok((evidence_from(&k[1..])?, decode_intent(&v).ok())))
        .collect()
}

/// Removes an aborted intent and its stripe records, once GC deleted the shards.
pub async fn forget_aborted_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
) -> Result<(), SchemaError> {
    aborted_intent_tx(tx, evidence).await?;
    tx.clear(&evidence_key(INTENT, &evidence));
    for tag in [STRIPE, OUTBOARD, DEGRADED, REPAIR_LEASE, LOST] {
        let prefix = evidence_key(tag, &evidence);
        tx.clear_range(&prefix, &prefix_end(&prefix));
    }
    Ok(())
}

// ---------------------------------------------------------------- Bao outboard

/// Stores Bao outboard hash pairs (`protocol::bao`) as the upload proceeds.
pub fn put_outboard_pairs_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
    pairs: &[(u64, protocol::bao::HashPair)],
) {
    for (node, (l, r)) in pairs {
        let mut v = [0u8; 64];
        v[..32].copy_from_slice(l);
        v[32..].copy_from_slice(r);
        tx.set(&stripe_key(OUTBOARD, &evidence, *node), &v);
    }
}

/// The stored outboard pairs of `nodes`; absent ones are left out (and then
/// fail verification).
pub async fn get_outboard_pairs_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
    nodes: &[u64],
) -> Result<Vec<(u64, protocol::bao::HashPair)>, SchemaError> {
    let reads = nodes.iter().map(|n| async move {
        let v = tx.get(&stripe_key(OUTBOARD, &evidence, *n)).await?;
        Ok::<_, SchemaError>(v.map(|v| (*n, v)))
    });
    let mut out = Vec::with_capacity(nodes.len());
    for found in futures::future::try_join_all(reads)
        .await?
        .into_iter()
        .flatten()
    {
        let (n, v) = found;
        let (l, r) = v.split_at_checked(32).ok_or(DecodeError::Truncated)?;
        let l: [u8; 32] = l.try_into().map_err(|_| DecodeError::Malformed)?;
        let r: [u8; 32] = r.try_into().map_err(|_| DecodeError::Malformed)?;
        out.push((n, (l, r)));
    }
    Ok(out)
}

// ---------------------------------------------------------------- stripes and manifests

/// Writes one stripe's record, as the upload proceeds; marks it degraded when
/// shards are missing.
pub fn put_stripe_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
    stripe: u64,
    rec: &StripeRecord,
) {
    tx.set(&stripe_key(STRIPE, &evidence, stripe), &rec.encode());
    if rec.missing() > 0 {
        mark_degraded_tx(tx, evidence, stripe);
    } else {
        tx.clear(&stripe_key(DEGRADED, &evidence, stripe));
    }
}

/// Queues a stripe for repair (a read found a missing or corrupt shard, a
/// scrub quarantined one, `--verify-all`). Each marking adds a random
/// nonce to the mark with an atomic add, so markers never conflict and a
/// repair takes the stripe off the queue only if no one marked it again
/// while it worked
/// ([`clear_degraded_if_tx`], [`commit_repair_tx`]).
pub fn mark_degraded_tx<T: Transaction>(tx: &T, evidence: EvidenceId, stripe: u64) {
    tx.atomic_add(&stripe_key(DEGRADED, &evidence, stripe), mark_nonce());
}

/// [`mark_degraded_tx`] unless the stripe is already queued (a write, and
/// its fsync, saved when reads keep meeting a stripe known to be short of
/// shards). Says whether it marked.
pub async fn mark_degraded_unless_queued_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
    stripe: u64,
) -> Result<bool, SchemaError> {
    if tx
        .get(&stripe_key(DEGRADED, &evidence, stripe))
        .await?
        .is_some()
    {
        return Ok(false);
    }
    mark_degraded_tx(tx, evidence, stripe);
    Ok(true)
}

/// What one marking adds: random and odd, so a mark set again after a
/// clear (or by another gateway sharing the index) is never the value an
/// older repair read (adding 1 would make almost every mark 1).
fn mark_nonce() -> i64 {
    use std::hash::BuildHasher as _;
    static MARKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = MARKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // RandomState's keys are random per process and thread.
    (std::hash::RandomState::new().hash_one(n) | 1) as i64
}

/// Takes a stripe off the repair queue whatever its mark (its evidence is
/// gone).
pub fn clear_degraded_tx<T: Transaction>(tx: &T, evidence: EvidenceId, stripe: u64) {
    tx.clear(&stripe_key(DEGRADED, &evidence, stripe));
}

/// Takes a stripe off the repair queue if its mark is still `seen`, the mark
/// [`degraded_queue_tx`] gave the repair that found every shard good; a mark
/// set since then (damage a read met after the repair's reads) keeps it
/// queued. Says whether it cleared.
pub async fn clear_degraded_if_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
    stripe: u64,
    seen: &[u8],
) -> Result<bool, SchemaError> {
    let key = stripe_key(DEGRADED, &evidence, stripe);
    let same = tx.get(&key).await?.as_deref() == Some(seen);
    if same {
        tx.clear(&key);
    }
    Ok(same)
}

/// Which task (a repair, or a deletion of shard copies) holds a stripe, and
/// how many times it has renewed its hold. No time is stored: another task
/// takes a lease over only once it has watched it unchanged (same owner,
/// same `beat`) for a whole lease period by its own monotonic clock, as
/// garbage collection watches upload intents, so clocks set wrong or apart
/// neither steal a live lease nor keep a dead one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairLease {
    /// Random per task.
    pub owner: [u8; 16],
    /// Renewals so far: what changes while its holder lives.
    pub beat: u64,
}

/// Takes a stripe's repair lease for `owner` if nobody holds it, or if its
/// holder's lease is still exactly `stale` (the value the caller watched
/// unchanged for a lease period). Otherwise returns the lease as it is,
/// for the caller to watch.
///
/// One task at a time works on a stripe: two repairs rank the same nodes
/// for a rebuilt shard, so one's cleanup after a failure (or a late
/// deletion of old copies) could delete the copy the other is about to
/// commit.
pub async fn take_repair_lease_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
    stripe: u64,
    owner: [u8; 16],
    stale: Option<RepairLease>,
) -> Result<Option<RepairLease>, SchemaError> {
    if let Some(held) = get_repair_lease_tx(tx, evidence, stripe).await? {
        if held.owner != owner && Some(held) != stale {
            return Ok(Some(held));
        }
    }
    tx.set(
        &stripe_key(REPAIR_LEASE, &evidence, stripe),
        &encode_versioned(RECORD_V1, &RepairLease { owner, beat: 0 }),
    );
    Ok(None)
}

/// Renews `owner`'s repair lease on a stripe (a new `beat`), if `owner`
/// still holds it; never takes one given up or taken over. Says whether it
/// did.
pub async fn renew_repair_lease_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
    stripe: u64,
    owner: [u8; 16],
) -> Result<bool, SchemaError> {
    let Some(held) = get_repair_lease_tx(tx, evidence, stripe)
        .await?
        .filter(|l| l.owner == owner)
    else {
        return Ok(false);
    };
    let next = RepairLease {
        owner,
        beat: held.beat.wrapping_add(1),
    };
    tx.set(
        &stripe_key(REPAIR_LEASE, &evidence, stripe),
        &encode_versioned(RECORD_V1, &next),
    );
    Ok(true)
}

/// Whether `owner` still holds the stripe's repair lease (nobody took it
/// over). The holder also keeps to its own lease period by its monotonic
/// clock (the gateway's `StripeLease`).
pub async fn holds_repair_lease_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
    stripe: u64,
    owner: [u8; 16],
) -> Result<bool, SchemaError> {
    Ok(get_repair_lease_tx(tx, evidence, stripe)
        .await?
        .is_some_and(|l| l.owner == owner))
}

/// The stripe's repair lease, live or lapsed.
pub async fn get_repair_lease_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
    stripe: u64,
) -> Result<Option<RepairLease>, SchemaError> {
    match tx.get(&stripe_key(REPAIR_LEASE, &evidence, stripe)).await? {
        None => Ok(None),
        Some(v) => Ok(Some(decode_versioned(RECORD_V1, &v)?)),
    }
}

/// Gives the stripe's repair lease up if `owner` holds it.
pub async fn release_repair_lease_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
    stripe: u64,
    owner: [u8; 16],
) -> Result<(), SchemaError> {
    if get_repair_lease_tx(tx, evidence, stripe)
        .await?
        .is_some_and(|l| l.owner == owner)
    {
        tx.clear(&stripe_key(REPAIR_LEASE, &evidence, stripe));
    }
    Ok(())
}

/// Records that a stripe has fewer than k shards left; it stays queued (a
/// node may come back with its shards) and its `lost` statement is made once.
pub fn mark_lost_tx<T: Transaction>(tx: &T, evidence: EvidenceId, stripe: u64) {
    tx.set(&stripe_key(LOST, &evidence, stripe), b"");
}

/// Ends a [`mark_lost_tx`] record: k good shards of the stripe were read
/// again (a node back with its disk, a repair that rebuilt from them), so a
/// later loss is a new one, recorded and counted as such. The caller puts
/// the statement that says so on the ledger in the same transaction.
pub fn clear_lost_tx<T: Transaction>(tx: &T, evidence: EvidenceId, stripe: u64) {
    tx.clear(&stripe_key(LOST, &evidence, stripe));
}

/// How many stripes [`mark_lost_tx`] records as lost after `after` (the
/// last key an earlier page returned; from the first when `None`), at most
/// `limit`, and where the next page starts (`None`: no more). For a gauge
/// of what is lost now.
pub async fn count_lost_tx<T: Transaction>(
    tx: &T,
    after: Option<Vec<u8>>,
    limit: usize,
) -> Result<(usize, Option<Vec<u8>>), SchemaError> {
    let begin = match after {
        Some(mut k) => {
            k.push(0);
            k
        }
        None => vec![LOST],
    };
    let limit = limit.max(1);
    let keys = tx.get_range(&begin, &[LOST + 1], limit, false).await?;
    let next = match keys.len() == limit {
        true => keys.last().map(|(k, _)| k.clone()),
        false => None,
    };
    Ok((keys.len(), next))
}

/// Whether [`mark_lost_tx`] recorded this stripe as lost.
pub async fn is_lost_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
    stripe: u64,
) -> Result<bool, SchemaError> {
    Ok(tx
        .get(&stripe_key(LOST, &evidence, stripe))
        .await?
        .is_some())
}

/// What [`commit_repair_tx`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairCommit {
    /// The new placement is recorded (version + 1; the queue mark cleared
    /// only as `verified` allows; a lost mark left to the caller).
    Done,
    /// The evidence is no longer visible (expunged), or the part no longer
    /// its upload's ([`stripes_of_tx`]): nothing is written, so an expunged
    /// stripe is never resurrected.
    Gone,
    /// The record changed since the repair read it (another repair, a drain,
    /// a GC): nothing is written.
    Changed,
}

/// Commits a repaired stripe with a compare-and-set on its record: `new`
/// replaces `seen` only if the evidence is still visible (or the multipart
/// part still its upload's) and the record is still exactly `seen`.
///
/// `verified` is the queue mark the repair was given, when it verified every
/// shard of the stripe (read and checked, checked on its node, or rebuilt
/// and read back): only then, and only if the mark is unchanged, does the
/// stripe leave the queue. A repair that rebuilt only what it had to (k
/// shards in, the missing ones out) leaves it queued for a full check.
pub async fn commit_repair_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
    stripe: u64,
    seen: &StripeRecord,
    new: &StripeRecord,
    verified: Option<&[u8]>,
) -> Result<RepairCommit, SchemaError> {
    if stripes_of_tx(tx, evidence).await?.is_none() {
        return Ok(RepairCommit::Gone);
    }
    let current = match tx.get(&stripe_key(STRIPE, &evidence, stripe)).await? {
        None => return Ok(RepairCommit::Gone),
        Some(v) => StripeRecord::decode(&v)?,
    };
    if current != *seen {
        return Ok(RepairCommit::Changed);
    }
    let mut next = new.clone();
    next.version = seen.version + 1;
    tx.set(&stripe_key(STRIPE, &evidence, stripe), &next.encode());
    if next.missing() > 0 {
        mark_degraded_tx(tx, evidence, stripe);
    } else if let Some(mark) = verified {
        clear_degraded_if_tx(tx, evidence, stripe, mark).await?;
    }
    // A lost mark stays: placed shards are not good ones (an adoption may
    // place a copy while the stripe is still short). The caller that knows
    // k good shards were read (a repair that rebuilt from them) clears it.
    Ok(RepairCommit::Done)
}

/// Up to `limit` stripe records of any evidence after `(evidence, stripe)`
/// (from the start when `None`), in key order: the repair scanner's walk.
/// A record that does not decode (damage, or a newer version than this
/// build reads) comes as `None`, so a walk passes it instead of stopping
/// there for good.
pub async fn stripes_scan_tx<T: Transaction>(
    tx: &T,
    after: Option<(EvidenceId, u64)>,
    limit: usize,
) -> Result<Vec<(EvidenceId, u64, Option<StripeRecord>)>, SchemaError> {
    let begin = match after {
        None => vec![STRIPE],
        Some((e, s)) => match s.checked_add(1) {
            Some(next) => stripe_key(STRIPE, &e, next),
            None => prefix_end(&evidence_key(STRIPE, &e)),
        },
    };
    let rows = tx.get_range(&begin, &[STRIPE + 1], limit, false).await?;
    rows.iter()
        .map(|(k, v)| {
            let id = evidence_from(k.get(1..17).ok_or(DecodeError::Truncated)?)?;
            let s: [u8; 8] = k
                .get(17..25)
                .and_then(|s| s.try_into().ok())
                .ok_or(DecodeError::Truncated)?;
            Ok((id, u64::from_be_bytes(s), StripeRecord::decode(v).ok()))
        })
        .collect()
}

/// Whether the stripe record of `key` places that shard on `node` (false
/// when no such stripe is recorded). Index errors are returned, never read
/// as "not placed": callers delete or rebuild what is not placed.
pub async fn shard_placed_on_tx<T: Transaction>(
    tx: &T,
    key: &ShardKey,
    node: NodeId,
) -> Result<bool, SchemaError> {
    let Some(v) = tx
        .get(&stripe_key(STRIPE, &key.evidence, key.stripe))
        .await?
    else {
        return Ok(false);
    };
    let rec = StripeRecord::decode(&v)?;
    Ok(rec.shards.get(key.index as usize).and_then(|s| s.node) == Some(node))
}

/// Stripe records `range` of one evidence, in order.
pub async fn get_stripes_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
    range: std::ops::Range<u64>,
) -> Result<Vec<StripeRecord>, SchemaError> {
    if range.is_empty() {
        return Ok(Vec::new());
    }
    let begin = stripe_key(STRIPE, &evidence, range.start);
    let end = stripe_key(STRIPE, &evidence, range.end);
    let rows = tx.get_range(&begin, &end, 0, false).await?;
    let out = rows
        .iter()
        .map(|(_, v)| StripeRecord::decode(v))
        .collect::<Result<Vec<_>, _>>()?;
    if out.len() as u64 != range.end - range.start {
        return Err(DecodeError::Truncated.into());
    }
    Ok(out)
}

/// Stripe `stripe`'s record, if there is one.
pub async fn get_stripe_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
    stripe: u64,
) -> Result<Option<StripeRecord>, SchemaError> {
    match tx.get(&stripe_key(STRIPE, &evidence, stripe)).await? {
        Some(v) => Ok(Some(StripeRecord::decode(&v)?)),
        None => Ok(None),
    }
}

/// Up to `limit` stripe records of `evidence` from stripe `from` on, with their
/// numbers; unlike [`get_stripes_tx`] it tolerates gaps (aborted uploads),
/// and a record this build cannot decode (a newer version's, or damaged)
/// comes as `None`, so one record does not stop the walk of the others
/// (garbage collection deleting an expunged evidence's shards).
pub async fn stripes_after_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
    from: u64,
    limit: usize,
) -> Result<Vec<(u64, Option<StripeRecord>)>, SchemaError> {
    let begin = stripe_key(STRIPE, &evidence, from);
    let end = prefix_end(&evidence_key(STRIPE, &evidence));
    let rows = tx.get_range(&begin, &end, limit, false).await?;
    rows.iter()
        .map(|(k, v)| {
            let s: [u8; 8] = k
                .get(17..25)
                .and_then(|s| s.try_into().ok())
                .ok_or(DecodeError::Truncated)?;
            Ok((u64::from_be_bytes(s), StripeRecord::decode(v).ok()))
        })
        .collect()
}

/// What [`commit_manifest_tx`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// This transaction makes the evidence visible.
    Now,
    /// An earlier attempt of the same commit already landed (a retry after
    /// FoundationDB's `commit_unknown_result`). Whatever was meant to commit
    /// with it (the `filed` statement) committed then; adding it again would
    /// log the filing twice.
    Earlier,
}

/// The last transaction of a filing: makes the evidence visible, indexes its
/// content root and ends the intent, failing if the intent was aborted.
pub async fn commit_manifest_tx<T: Transaction>(
    tx: &T,
    header: &ManifestHeader,
) -> Result<Commit, SchemaError> {
    if let Err(e) = live_intent_tx(tx, header.evidence).await {
        // A retried commit whose first attempt did commit: the intent is gone
        // and this very manifest is there. Anything else is the error.
        let ours = matches!(e, SchemaError::NoIntent(_))
            && get_manifest_tx(tx, header.evidence).await?.as_ref() == Some(header);
        return if ours { Ok(Commit::Earlier) } else { Err(e) };
    }
    tx.clear(&evidence_key(INTENT, &header.evidence));
    tx.set(&evidence_key(EVIDENCE, &header.evidence), &header.encode());
    let mut hk = hash_prefix(&header.tenant, &header.blake3)?;
    hk.extend_from_slice(header.evidence.as_bytes());
    tx.set(&hk, b"");
    Ok(Commit::Now)
}

/// Whose stripes a stripe record's are: visible evidence's, or a stored
/// part's of a multipart upload in progress (no manifest; filed anew as
/// evidence at its Complete).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StripesOf {
    Evidence(ManifestHeader),
    Part(crate::s3::LivePart),
}

impl StripesOf {
    /// The header the stripes are read, checked and rebuilt by.
    pub fn header(&self) -> &ManifestHeader {
        match self {
            StripesOf::Evidence(h) => h,
            StripesOf::Part(p) => &p.header,
        }
    }
}

/// Whose the stripes stored under `evidence` are, if anyone's that repair
/// keeps: none for an upload still in flight, an aborted one, expunged
/// evidence or a part of an ended upload.
pub async fn stripes_of_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
) -> Result<Option<StripesOf>, SchemaError> {
    if let Some(h) = get_manifest_tx(tx, evidence).await? {
        return Ok(Some(StripesOf::Evidence(h)));
    }
    Ok(crate::s3::live_part_tx(tx, evidence)
        .await?
        .map(StripesOf::Part))
}

pub async fn get_manifest_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
) -> Result<Option<ManifestHeader>, SchemaError> {
    match tx.get(&evidence_key(EVIDENCE, &evidence)).await? {
        Some(v) => Ok(Some(ManifestHeader::decode(&v)?)),
        None => Ok(None),
    }
}

/// Writes a manifest recovered by `recover-index` (no intent): the header and
/// the content lookup, as [`commit_manifest_tx`] leaves them.
pub fn restore_manifest_tx<T: Transaction>(
    tx: &T,
    header: &ManifestHeader,
) -> Result<(), SchemaError> {
    tx.set(&evidence_key(EVIDENCE, &header.evidence), &header.encode());
    let mut hk = hash_prefix(&header.tenant, &header.blake3)?;
    hk.extend_from_slice(header.evidence.as_bytes());
    tx.set(&hk, b"");
    Ok(())
}

/// Writes the tombstone of evidence that `recover-index` found expunged,
/// its erasure unfinished: garbage collection deletes the shards still on
/// nodes (their stripe records written alongside) and has every node erase
/// what else it holds, as after [`expunge_tx`].
pub fn restore_expunged_tx<T: Transaction>(tx: &T, header: &ManifestHeader) {
    tx.set(&evidence_key(EXPUNGED, &header.evidence), &header.encode());
    tx.set(&evidence_key(EXPUNGING, &header.evidence), b"");
}

/// The header of evidence whether visible or expunged (the ledger's
/// openings archive keeps it for `recover-index`); `true` when expunged.
pub async fn get_any_manifest_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
) -> Result<Option<(ManifestHeader, bool)>, SchemaError> {
    if let Some(h) = get_manifest_tx(tx, evidence).await? {
        return Ok(Some((h, false)));
    }
    match tx.get(&evidence_key(EXPUNGED, &evidence)).await? {
        Some(v) => Ok(Some((ManifestHeader::decode(&v)?, true))),
        None => Ok(None),
    }
}

/// Whether the index holds any evidence, live or expunged (`recover-index`
/// refuses to write into an index that does).
pub async fn any_evidence_tx<T: Transaction>(tx: &T) -> Result<bool, SchemaError> {
    for tag in [EVIDENCE, EXPUNGED] {
        if !tx.get_range(&[tag], &[tag + 1], 1, false).await?.is_empty() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// "Was this exact file filed, when, in which cases?" — answered only within
/// `tenant`.
pub async fn lookup_by_hash_tx<T: Transaction>(
    tx: &T,
    tenant: &str,
    root: &Blake3Hash,
    limit: usize,
) -> Result<Vec<ManifestHeader>, SchemaError> {
    Ok(lookup_by_hash_page_tx(tx, tenant, root, None, limit)
        .await?
        .0)
}

/// One page of [`lookup_by_hash_tx`]: the filings of `root` after
/// evidence `after` (in filing order), looking at up to `limit` of them,
/// and where the next page begins (`None` once there is no more). A page
/// may hold fewer than `limit` while more follow.
pub async fn lookup_by_hash_page_tx<T: Transaction>(
    tx: &T,
    tenant: &str,
    root: &Blake3Hash,
    after: Option<EvidenceId>,
    limit: usize,
) -> Result<(Vec<ManifestHeader>, Option<EvidenceId>), SchemaError> {
    let prefix = hash_prefix(tenant, root)?;
    let from = match after {
        Some(id) => {
            let mut k = prefix.clone();
            k.extend_from_slice(&id.0);
            k.push(0);
            k
        }
        None => prefix.clone(),
    };
    let rows = tx
        .get_range(&from, &prefix_end(&prefix), limit, false)
        .await?;
    let full = rows.len() == limit;
    let mut out = Vec::with_capacity(rows.len());
    let mut last = None;
    for (k, _) in rows {
        let id = evidence_from(&k[prefix.len()..])?;
        last = Some(id);
        if let Some(h) = get_manifest_tx(tx, id).await? {
            out.push(h);
        }
    }
    Ok((out, last.filter(|_| full)))
}

/// Up to `limit` stripes waiting for repair after `after` (from the start
/// when `None`), with their marks, as (evidence, stripe, mark): the repair
/// worker's queue, walked round so stripes that wait long (a lost one, an
/// upload not yet visible) never keep the others from their turn.
pub async fn degraded_queue_tx<T: Transaction>(
    tx: &T,
    after: Option<(EvidenceId, u64)>,
    limit: usize,
) -> Result<Vec<(EvidenceId, u64, Vec<u8>)>, SchemaError> {
    let from = match after {
        Some((e, s)) => {
            let mut k = stripe_key(DEGRADED, &e, s);
            k.push(0);
            k
        }
        None => vec![DEGRADED],
    };
    let rows = tx.get_range(&from, &[DEGRADED + 1], limit, false).await?;
    rows.into_iter()
        .map(|(k, mark)| {
            let (id, stripe) = degraded_key(&k)?;
            Ok((id, stripe, mark))
        })
        .collect()
}

/// The (evidence, stripe) a `D` key names.
fn degraded_key(k: &[u8]) -> Result<(EvidenceId, u64), SchemaError> {
    let id = evidence_from(k.get(1..17).ok_or(DecodeError::Truncated)?)?;
    let s: [u8; 8] = k
        .get(17..25)
        .and_then(|s| s.try_into().ok())
        .ok_or(DecodeError::Truncated)?;
    Ok((id, u64::from_be_bytes(s)))
}

/// How many of `evidence`'s stripes are short of shards (a slot with no
/// node) and wait for repair now, looking at most `limit` queued stripes;
/// stripes queued only to move (off a draining node, out of a crowded
/// domain) are whole, and not counted. Also whether `limit` cut the look
/// short (there may be more).
pub async fn short_stripes_of_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
    limit: usize,
) -> Result<(u64, bool), SchemaError> {
    let from = evidence_key(DEGRADED, &evidence);
    let mut short = 0;
    let queued = tx
        .get_range(&from, &prefix_end(&from), limit, false)
        .await?;
    let capped = queued.len() >= limit;
    for (k, _) in queued {
        let (_, stripe) = degraded_key(&k)?;
        if get_stripe_tx(tx, evidence, stripe)
            .await?
            .is_some_and(|r| r.missing() > 0)
        {
            short += 1;
        }
    }
    Ok((short, capped))
}

/// Stripes waiting for repair, as (evidence, stripe).
pub async fn degraded_stripes_tx<T: Transaction>(
    tx: &T,
    limit: usize,
) -> Result<Vec<(EvidenceId, u64)>, SchemaError> {
    let queue = degraded_queue_tx(tx, None, limit).await?;
    Ok(queue.into_iter().map(|(e, s, _)| (e, s)).collect())
}

// ---------------------------------------------------------------- WORM

/// Sets or releases a legal hold, in the transaction that also queues its
/// ledger statement. Returns the updated header.
pub async fn set_legal_hold_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
    hold: bool,
) -> Result<ManifestHeader, SchemaError> {
    let mut h = get_manifest_tx(tx, evidence)
        .await?
        .ok_or(SchemaError::NoEvidence(evidence))?;
    h.legal_hold = hold;
    tx.set(&evidence_key(EVIDENCE, &evidence), &h.encode());
    Ok(h)
}

/// Extends COMPLIANCE retention to `until_ms`. Shortening or removing it is
/// refused here, whoever asks: this transaction is the only writer.
pub async fn extend_retention_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
    until_ms: u64,
) -> Result<ManifestHeader, SchemaError> {
    let mut h = get_manifest_tx(tx, evidence)
        .await?
        .ok_or(SchemaError::NoEvidence(evidence))?;
    if let Some(current) = h.retain_until_ms.filter(|c| *c > until_ms) {
        return Err(SchemaError::Locked(format!(
            "COMPLIANCE retention runs until {}; it cannot be shortened to {}",
            utc_ms(current),
            utc_ms(until_ms)
        )));
    }
    h.retain_until_ms = Some(until_ms);
    tx.set(&evidence_key(EVIDENCE, &evidence), &h.encode());
    Ok(h)
}

/// Expunges: refused while COMPLIANCE retention runs (against `now_ms`, the
/// gateway's compliance clock) or a
/// legal hold applies, checked in this transaction, which is the only one that
/// removes a manifest. The manifest moves to a tombstone (custody and
/// receipts stay answerable), the content lookup goes; stripe records stay
/// for the caller to delete the shards and then [`forget_stripes_tx`].
pub async fn expunge_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
    now_ms: u64,
) -> Result<ManifestHeader, SchemaError> {
    let h = get_manifest_tx(tx, evidence)
        .await?
        .ok_or(SchemaError::NoEvidence(evidence))?;
    if h.legal_hold {
        return Err(SchemaError::Locked(
            "a legal hold applies; release it before expunging".into(),
        ));
    }
    if let Some(until) = h.retain_until_ms.filter(|u| *u > now_ms) {
        return Err(SchemaError::Locked(format!(
            "COMPLIANCE retention runs until {}; nobody can expunge before then",
            utc_ms(until)
        )));
    }
    tx.clear(&evidence_key(EVIDENCE, &evidence));
    let mut hk = hash_prefix(&h.tenant, &h.blake3)?;
    hk.extend_from_slice(evidence.as_bytes());
    tx.clear(&hk);
    tx.set(&evidence_key(EXPUNGED, &evidence), &h.encode());
    tx.set(&evidence_key(EXPUNGING, &evidence), b"");
    // Its bytes copied into an S3 multipart upload in progress go too (the
    // first of them here, the rest by GC: see the function).
    crate::s3::drop_parts_copied_from_tx(tx, evidence, crate::s3::COPIES_DROPPED_WITH_EXPUNGE)
        .await?;
    Ok(h)
}

/// Expunged evidence whose shards are not all deleted yet (GC retries them).
pub async fn expunging_tx<T: Transaction>(
    tx: &T,
    after: Option<EvidenceId>,
    limit: usize,
) -> Result<Vec<EvidenceId>, SchemaError> {
    let begin = match after {
        Some(e) => {
            let mut k = evidence_key(EXPUNGING, &e);
            k.push(0);
            k
        }
        None => vec![EXPUNGING],
    };
    tx.get_range(&begin, &[EXPUNGING + 1], limit, false)
        .await?
        .iter()
        .map(|(k, _)| evidence_from(&k[1..]))
        .collect()
}

/// Marks an expunge complete: every shard is deleted and forgotten.
pub async fn expunge_done_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
) -> Result<(), SchemaError> {
    if !stripes_after_tx(tx, evidence, 0, 1).await?.is_empty() {
        return Err(SchemaError::Locked(
            "stripes of this expunged evidence are still recorded".into(),
        ));
    }
    tx.clear(&evidence_key(EXPUNGING, &evidence));
    Ok(())
}

/// The header of expunged evidence.
pub async fn get_expunged_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
) -> Result<Option<ManifestHeader>, SchemaError> {
    match tx.get(&evidence_key(EXPUNGED, &evidence)).await? {
        Some(v) => Ok(Some(ManifestHeader::decode(&v)?)),
        None => Ok(None),
    }
}

/// Forgets the records of stripes whose shards were deleted after an expunge.
pub async fn forget_stripes_tx<T: Transaction>(
    tx: &T,
    evidence: EvidenceId,
    stripes: &[u64],
) -> Result<(), SchemaError> {
    if get_expunged_tx(tx, evidence).await?.is_none() {
        return Err(SchemaError::NoEvidence(evidence));
    }
    forget_part_stripes_tx(tx, evidence, stripes);
    Ok(())
}

/// A time in milliseconds since the epoch as RFC 3339 UTC, for messages
/// people read (`1796243300378` is `2026-12-02T20:28:20.378Z`).
pub fn utc_ms(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms after the epoch"))
}

#[cfg(test)]
mod tests {

    /// A store's error while forgetting an aborted upload (here a
    /// transaction too old, which a fresh one cures) is passed on for the
    /// retry loop, not taken for an intent that is not there.
    #[tokio::test]
    async fn a_store_error_is_not_taken_for_a_missing_intent() {
        use crate::KvStore as _;
        let dir = tempfile::tempdir().unwrap();
        let s = crate::embedded::EmbeddedStore::open(&dir.path().join("index.redb")).unwrap();
        let id = EvidenceId::new(1, [6; 10]);
        let tx = s.begin().unwrap();
        assert!(matches!(
            super::forget_aborted_tx(&tx, id).await,
            Err(SchemaError::NoIntent(_))
        ));
        tokio::time::sleep(crate::kv::MAX_TRANSACTION_AGE + std::time::Duration::from_millis(50))
            .await;
        assert!(matches!(
            super::forget_aborted_tx(&tx, id).await,
            Err(SchemaError::Kv(crate::KvError::TooOld))
        ));
        assert!(matches!(
            super::forget_aborted_stripes_tx(&tx, id, &[0]).await,
            Err(SchemaError::Kv(crate::KvError::TooOld))
        ));
    }

    /// A stripe record this build cannot decode does not stop a walk of an
    /// evidence's stripes: it comes as `None`, the others as they are.
    #[tokio::test]
    async fn a_stripe_walk_passes_over_a_record_it_cannot_decode() {
        use crate::Transaction as _;
        let dir = tempfile::tempdir().unwrap();
        let s = crate::embedded::EmbeddedStore::open(&dir.path().join("index.redb")).unwrap();
        let id = EvidenceId::new(1, [5; 10]);
        let rec = StripeRecord {
            version: 1,
            shard_len: 0,
            shards: vec![],
        };
        let listed = crate::run(&s, |tx| {
            let rec = &rec;
            async move {
                super::put_stripe_tx(&tx, id, 0, rec);
                tx.set(
                    &super::stripe_key(super::STRIPE, &id, 1),
                    b"\xffnot a record",
                );
                super::put_stripe_tx(&tx, id, 2, rec);
                super::stripes_after_tx(&tx, id, 0, 10).await
            }
        })
        .await
        .unwrap();
        let got: Vec<(u64, bool)> = listed.iter().map(|(n, r)| (*n, r.is_some())).collect();
        assert_eq!(got, vec![(0, true), (1, false), (2, true)]);
    }

    /// Intents recorded before they kept their lease period still read (as
    /// period 0: GC then waits its own), and new ones keep it.
    #[test]
    fn intents_stored_before_they_kept_a_lease_period_still_read() {
        #[derive(serde::Serialize)]
        struct V1<'a> {
            tenant: &'a str,
            lease_until_ms: u64,
            aborted: bool,
        }
        let old = super::encode_versioned(
            super::RECORD_V1,
            &V1 {
                tenant: "court",
                lease_until_ms: 77,
                aborted: true,
            },
        );
        let rec = super::decode_intent(&old).unwrap();
        assert_eq!(
            rec,
            super::IntentRecord {
                tenant: "court".into(),
                lease_until_ms: 77,
                aborted: true,
                lease_ms: 0,
            }
        );
        let new = super::IntentRecord {
            lease_ms: 600_000,
            ..rec
        };
        assert_eq!(
            super::decode_intent(&super::encode_intent(&new)).unwrap(),
            new
        );
        assert!(
            super::decode_intent(&[9, 1, 2]).is_err(),
            "an unknown version"
        );
    }

    #[test]
    fn retention_dates_read_as_rfc3339() {
        assert_eq!(utc_ms(1_796_243_300_378), "2026-12-02T20:28:20.378Z");
        assert_eq!(utc_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_ms(u64::MAX), format!("{} ms after the epoch", u64::MAX));
    }
    use super::*;

    #[test]
    fn tenant_names_are_restricted() {
        assert!(valid_tenant("court-1_a"));
        assert!(!valid_tenant(""));
        assert!(!valid_tenant("Court"));
        assert!(!valid_tenant("a\0b"));
        assert!(!valid_tenant(&"a".repeat(65)));
    }

    #[test]
    fn prefix_end_bounds_every_extension() {
        assert_eq!(prefix_end(b"ab"), b"ac".to_vec());
        assert_eq!(prefix_end(&[1, 0xff]), vec![2]);
        assert!(b"ab\xff\xff".as_slice() < prefix_end(b"ab").as_slice());
    }

    #[test]
    fn stripe_keys_sort_numerically() {
        let id = EvidenceId([7; 16]);
        assert!(stripe_key(STRIPE, &id, 255) < stripe_key(STRIPE, &id, 256));
        assert!(stripe_key(STRIPE, &id, u64::MAX) < prefix_end(&evidence_key(STRIPE, &id)));
    }
}
