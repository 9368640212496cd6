//! The write path: one streaming pass from request body to durable shards.
//!
//! 1. Record an upload intent with a lease (honouring an Idempotency-Key).
//! 2. Stream the body once: BLAKE3 and SHA-256 over every byte, cut stripes of
//!    `k x shard_size`, Reed-Solomon code each stripe off the async threads, and
//!    put its `k + m` shards in parallel on the nodes placement ranks first,
//!    falling back to the next ranked node when one fails. A node answers only
//!    after fsync. At most `pipeline_stripes` stripes are in flight, so memory is
//!    bounded whatever the size.
//! 3. Stripe records go to the index in batches as the upload proceeds. The
//!    intent's lease is renewed whenever a third of it has passed (and with each
//!    batch), failing if GC aborted it.
//! 4. One transaction commits the manifest header, making the evidence visible,
//!    and ends the intent. Any failure before that aborts the intent and deletes
//!    the shards written: no visible evidence, no receipt.

use crate::api::Gateway;
use crate::api::Store;
use crate::error::ApiError;
use crate::placement;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use indexer::schema::{self, IntentStart};
use protocol::{Blake3Hash, EvidenceId, ManifestHeader, Sha256Hash, ShardHeader, ShardKey};
use protocol::{ShardPlacement, StripeRecord};
use sha2::Digest;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use storage_node::buffers::BufferPool;
use tokio::task::JoinHandle;

/// Stripe records written per index transaction: well under FoundationDB's
/// 10 MB / 5 s limits, and few enough commits for a fast upload.
const STRIPES_PER_TXN: usize = 64;

/// Bao outboard pairs (64 bytes of value each) written per index transaction,
/// whatever the stripe size.
const PAIRS_PER_TXN: usize = 4096;

/// What the filer said about the evidence, from the request headers.
#[derive(Clone, Debug, Default)]
pub struct FilingMeta {
    pub tenant: String,
    pub case: Option<String>,
    pub file_name: Option<String>,
    pub media_type: Option<String>,
    /// Who the filer says submitted it (a person, a unit): metadata the
    /// receipt covers through `metadata_sha256`, not an identity checked.
    pub submitter: Option<String>,
    /// Who filed it as this gateway authenticated them
    /// (`tenant/role/token:ID` or `tenant/role/s3:ACCESS_KEY`, see
    /// `api::actor`): the `filed` statement's actor, as every
    /// other statement's actor is the authenticated caller.
    pub actor: Option<String>,
    /// The credential the filing was authenticated with: checked again in
    /// the transaction that commits it, so a token or access key revoked
    /// while a long body streams in (or a copy or Complete runs) files
    /// nothing: 401 (S3's AccessDenied), the shards collected as a failed
    /// upload's. `None`: nobody's (a test's).
    pub credential: Option<schema::CredentialRef>,
    /// Hashes the filer computed at acquisition; a mismatch rejects the filing.
    pub expect_blake3: Option<Blake3Hash>,
    pub expect_sha256: Option<Sha256Hash>,
    pub idempotency_key: Option<String>,
    /// Where the evidence came from, as the filer declares it; notarized.
    pub provenance: protocol::ledger::Provenance,
    /// COMPLIANCE retention from filing: nobody can expunge before then.
    pub retain_until_ms: Option<u64>,
    /// A legal hold from filing (an S3 object filed under one).
    pub legal_hold: bool,
    /// Filed through the S3 API: the object version committed with it.
    pub s3: Option<S3Put>,
    /// Content-MD5 sent by an S3 client; a mismatch rejects the filing.
    pub expect_md5: Option<[u8; 16]>,
    /// Run once the whole body has been read, before anything commits: a
    /// refusal rejects the filing (S3's `x-amz-checksum-*`, also as
    /// aws-chunked trailers, which exist only after the body).
    pub body_check: Option<BodyCheck>,
    /// A part of an S3 multipart upload: stored and recorded as the part
    /// `.1` of upload `.0`, never visible as evidence on its own.
    pub part: Option<(EvidenceId, u32)>,
    /// The body is read from this cluster's own storage (an S3 copy, or the
    /// parts of a multipart upload being completed), not sent by a client:
    /// `client_idle_timeout_ms` does not apply, since a pause means the
    /// source is still being read (a ranged copy of evidence without an
    /// outboard holds its last bytes until the whole source is checked).
    pub body_from_store: bool,
    /// The evidence whose bytes this filing copies (an S3 CopyObject or
    /// UploadPartCopy, or a Complete of parts so copied): it commits only
    /// while each is still filed, in the transaction that commits it, so a
    /// copy read just before an expunge committed cannot keep the expunged
    /// bytes alive under a new id (410 `gone`, S3's NoSuchKey, instead).
    pub copied_from: Vec<EvidenceId>,
    /// The copy source's `accessed` statement (see
    /// [`crate::api::access_statement`]), queued in the transaction that
    /// commits the copy: a copy that fails (too few nodes, its client gone,
    /// the source expunged meanwhile) leaves no record of a read nobody
    /// made use of, and one that commits always has its record.
    pub source_read: Option<indexer::ledger::PendingRecord>,
    /// At most how long the body is (its Content-Length, or the size of
    /// what a copy reads): each stripe being received is charged only what
    /// is left of it against the gateway's receive memory. `None`: a whole
    /// stripe. A body longer than this is refused.
    pub body_len_at_most: Option<u64>,
    /// `body_len_at_most` is what the body must hold, not only a bound (an
    /// S3 PUT's Content-Length, or its aws-chunked decoded length, which
    /// the chunk decoder does not hold the chunks to): a body that ends
    /// short is refused as cut off, never stored as the whole object.
    pub body_len_exact: bool,
    /// The client sent `Expect: 100-continue` and waits for a go-ahead
    /// before its body: a refusal answers at once, without reading it
    /// (reading is the go-ahead, and the client would then send all of a
    /// body nobody reads).
    pub expects_continue: bool,
}

/// Fails with 410 `gone` unless `source` (a copy's, see
/// [`FilingMeta::copied_from`]) is still filed: read in the transaction that
/// commits the copy, so an expunge that commits first, even while that
/// transaction runs (a conflict, then a retry), makes the copy fail.
/// Fails with 401 if `credential` (see [`FilingMeta::credential`]) was
/// revoked.
pub(crate) async fn still_authorized_tx<T: indexer::Transaction>(
    tx: &T,
    credential: Option<&schema::CredentialRef>,
) -> Result<(), ApiError> {
    match credential {
        Some(c) if !schema::credential_live_tx(tx, c).await? => Err(ApiError::Unauthorized),
        _ => Ok(()),
    }
}

async fn still_filed_tx<T: indexer::Transaction>(
    tx: &T,
    sources: &[EvidenceId],
) -> Result<(), ApiError> {
    for id in sources {
        if schema::get_manifest_tx(tx, *id).await?.is_none() {
            return Err(ApiError::Gone);
        }
    }
    Ok(())
}

/// A check of the complete body (see [`FilingMeta::body_check`]).
#[derive(Clone)]
pub struct BodyCheck(pub Arc<dyn Fn() -> Result<(), ApiError> + Send + Sync>);

impl std::fmt::Debug for BodyCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BodyCheck")
    }
}

/// The S3 object a filing becomes, committed in the same transaction as the
/// manifest, so the object is visible exactly when its evidence is.
#[derive(Clone, Debug)]
pub struct S3Put {
    pub bucket: String,
    pub key: String,
    /// The version record to write; `evidence`, `size`, `etag` and
    /// `version_id` are filled in at commit.
    pub version: indexer::s3::ObjectVersion,
    /// The ETag to record instead of the body's MD5 (a multipart object's).
    pub etag: Option<String>,
    /// A conditional write's check of the key's current version, run again
    /// in the transaction that makes this version current.
    pub condition: Option<PutCondition>,
    /// The bucket as the request found it: the version commits only into
    /// that bucket, not one deleted and created again meanwhile.
    pub seen: indexer::s3::BucketRecord,
    /// The multipart upload this filing completes: ended in the same
    /// transaction, which fails if it already ended (completed by a
    /// concurrent request, or aborted), so an upload completes once.
    pub completes: Option<EvidenceId>,
}

/// Checks a key's current version (`None`: no object, or a delete marker)
/// against a conditional write's condition.
#[derive(Clone)]
pub struct PutCondition(pub Arc<VersionCheck>);

/// What a [`PutCondition`] runs.
pub type VersionCheck = dyn Fn(Option<&indexer::s3::ObjectVersion>) -> Result<(), indexer::s3::ObjectError>
    + Send
    + Sync;

impl std::fmt::Debug for PutCondition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PutCondition")
    }
}

/// The outcome of a filing request.
#[derive(Debug)]
pub enum Filing {
    /// Newly filed.
    New {
        header: ManifestHeader,
        degraded_stripes: u64,
        /// The S3 object version committed with it (S3 filings): what the
        /// response describes, not re-read (a concurrent PUT of the key may
        /// already have replaced it).
        version: Option<Box<indexer::s3::ObjectVersion>>,
    },
    /// The Idempotency-Key named an earlier, completed filing.
    Replayed(ManifestHeader),
    /// A multipart part was stored; `replaced` is the part it superseded,
    /// whose shards the caller deletes.
    Part {
        record: indexer::s3::PartRecord,
        replaced: Option<indexer::s3::PartRecord>,
    },
}

/// Files the evidence whose bytes `body` yields.
pub async fn file_evidence<S, B, E>(
    gw: Arc<Gateway<S>>,
    meta: FilingMeta,
    body: B,
) -> Result<Filing, ApiError>
where
    S: Store,
    B: Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
    E: std::fmt::Display,
{
    let filed_at_ms = gw.clock.now_ms();
    let evidence = EvidenceId::new(filed_at_ms, rand::random());
    let lease = filed_at_ms + gw.config.intent_lease_ms;
    let lease_ms = gw.config.intent_lease_ms;
    let start = indexer::run(&gw.store, |tx| {
        let meta = &meta;
        async move {
            let idem = meta
                .idempotency_key
                .as_deref()
                .map(|key| schema::Idempotency {
                    key,
                    request: request_digest(meta),
                });
            schema::begin_intent_tx(&tx, evidence, &meta.tenant, idem, lease, lease_ms).await
        }
    })
    .await;
    // Refused before its body is read: a small body is read first, or the
    // client, still sending, may see the connection close instead of the
    // answer (a retry while the first attempt runs is the usual case).
    let idle = std::time::Duration::from_millis(gw.config.client_idle_timeout_ms.max(1));
    let expects_continue = meta.expects_continue;
    let refuse = |body: B, e: ApiError| async move {
        drain_unless_waiting(body, idle, expects_continue).await;
        Err(e)
    };
    match start {
        Err(e) => return refuse(body, e.into()).await,
        Ok(IntentStart::Started) => {}
        Ok(IntentStart::AlreadyFiled(prev, request)) => {
            let header = match indexer::run(&gw.store, |tx| async move {
                schema::get_manifest_tx(&tx, prev).await
            })
            .await
            {
                Ok(Some(header)) => header,
                // Expunged since the key was looked up.
                Ok(None) => return refuse(body, ApiError::Gone).await,
                Err(e) => return refuse(body, e.into()).await,
            };
            check_replay(&gw, &meta, &header, request, body).await?;
            return Ok(Filing::Replayed(header));
        }
        Ok(IntentStart::InFlight(prev)) => {
            // It ends, or (cut off by a crash) is aborted by GC, within
            // about a lease and a collection; a third of the lease is when
            // a live upload shows it is alive.
            let retry_after_s = gw.config.intent_lease_ms.div_ceil(3_000).max(1);
            let e = ApiError::UploadInProgress {
                evidence: prev.to_string(),
                retry_after_s,
            };
            return refuse(body, e).await;
        }
        Ok(IntentStart::Expunged(prev)) => {
            tracing::info!(evidence = %prev, "a retried filing names expunged evidence: refused");
            return refuse(body, ApiError::Gone).await;
        }
    }

    let mut upload = Upload::new(gw.clone(), evidence);
    match upload.run(meta, filed_at_ms, body).await {
        Ok(filing) => Ok(filing),
        Err(e) => {
            tracing::info!(%evidence, error = %e, "filing failed; aborting its intent");
            upload.abandon().await;
            Err(e)
        }
    }
}

/// The digest kept with an Idempotency-Key of what the request said that
/// the manifest does not keep, so that a replay can be checked against it:
/// the declared provenance and who filed (both notarized in the `filed`
/// statement only). A replay by another caller of the tenant would be told
/// of a filing it never made, one whose statement names someone else.
fn request_digest(meta: &FilingMeta) -> [u8; 32] {
    digest_of(
        meta,
        "custodia 2026 idempotent request v2",
        Some(&meta.actor),
    )
}

/// The digest keys stored before it named the caller: a replay of one of
/// those is checked on its provenance alone.
fn request_digest_v1(meta: &FilingMeta) -> [u8; 32] {
    digest_of(meta, "custodia 2026 idempotent request v1", None)
}

fn digest_of(meta: &FilingMeta, context: &str, actor: Option<&Option<String>>) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(context);
    for field in [
        &meta.provenance.source_device,
        &meta.provenance.capture_time,
        &meta.provenance.capture_method,
        &meta.provenance.prior_custody,
    ]
    .into_iter()
    .chain(actor)
    {
        // Length-prefixed, with absent distinct from empty.
        match field {
            None => h.update(&[0]),
            Some(v) => h
                .update(&[1])
                .update(&(v.len() as u64).to_be_bytes())
                .update(v.as_bytes()),
        };
    }
    *h.finalize().as_bytes()
}

/// Checks that a request whose Idempotency-Key names the filing `header`
/// repeats it: the same metadata, no retention or hold beyond what the
/// filing has, and the same content. The content is judged by a declared
/// hash when the client waits for 100 Continue before its body; otherwise
/// the body is read and hashed (a retry sends it anyway). A key reused for something else would
/// otherwise answer 201 for a filing that never happened.
async fn check_replay<S, B, E>(
    gw: &Gateway<S>,
    meta: &FilingMeta,
    header: &ManifestHeader,
    request: Option<[u8; 32]>,
    mut body: B,
) -> Result<(), ApiError>
where
    S: Store,
    B: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let differs = |what: &str| ApiError::IdempotencyMismatch {
        evidence: header.evidence.to_string(),
        what: what.to_string(),
    };
    let idle = std::time::Duration::from_millis(gw.config.client_idle_timeout_ms.max(1));
    let fields = [
        ("case", &meta.case, &header.case),
        ("file name", &meta.file_name, &header.file_name),
        ("media type", &meta.media_type, &header.media_type),
        ("submitter", &meta.submitter, &header.submitter),
    ];
    // Retention is only ever extended and a hold may be lifted later: a
    // retry asking no more than the filing has now is the same request.
    let refused = fields
        .iter()
        .find(|(_, asked, filed)| asked != filed)
        .map(|(what, _, _)| *what)
        .or_else(|| {
            meta.retain_until_ms
                .is_some_and(|asked| header.retain_until_ms.is_none_or(|r| r < asked))
                .then_some("retention")
        })
        .or_else(|| (meta.legal_hold && !header.legal_hold).then_some("legal hold"))
        .or_else(|| {
            request
                .is_some_and(|r| r != request_digest(meta) && r != request_digest_v1(meta))
                .then_some("provenance or filer (another caller of the tenant used this key)")
        })
        .or_else(|| {
            meta.expect_blake3
                .is_some_and(|h| h != header.blake3)
                .then_some("BLAKE3")
        })
        .or_else(|| {
            meta.expect_sha256
                .is_some_and(|h| h != header.sha256)
                .then_some("SHA-256")
        })
        // A body of another declared length is other content: said before
        // any of it is read (read until it ran past the filing's size, a
        // longer one was cut off mid-send, and the client saw a reset).
        .or_else(|| {
            meta.body_len_at_most
                .is_some_and(|n| n != header.size)
                .then_some("content")
        });
    if let Some(what) = refused {
        drain_unless_waiting(body, idle, meta.expects_continue).await;
        return Err(differs(what));
    }
    // A client that declared the content's hash and waits for 100
    // Continue has sent none of it: the declaration, matching the filing,
    // is the request, and no byte need travel. One sending its body is
    // read whole and checked, declared hash or not: a body other than the
    // declaration (and the filing) is no replay, and an answer given while
    // a large body is still coming would be lost with its unread bytes.
    if (meta.expect_blake3.is_some() || meta.expect_sha256.is_some()) && meta.expects_continue {
        return Ok(());
    }
    let mut hasher = blake3::Hasher::new();
    let mut size: u64 = 0;
    loop {
        let chunk = match tokio::time::timeout(idle, body.next()).await {
            Err(_) => return Err(ApiError::BodyIdle(idle)),
            Ok(None) => break,
            Ok(Some(chunk)) => chunk.map_err(|e| ApiError::BodyIncomplete(e.to_string()))?,
        };
        size += chunk.len() as u64;
        if size > header.size {
            // Read on (a little) as every refusal here is, so that the
            // answer is not lost with the rest of a body still coming.
            drain_small(body, idle).await;
            return Err(differs("content"));
        }
        hasher.update(&chunk);
    }
    if size != header.size || Blake3Hash(*hasher.finalize().as_bytes()) != header.blake3 {
        return Err(differs("content"));
    }
    Ok(())
}

/// Bodies up to this size are read (and dropped) before a refusal that
/// needs none of them is answered.
pub const DRAINED_BODY_BYTES: u64 = 4 << 20;

/// [`drain_small`], unless the client waits for `100 Continue` before its
/// body (reading it would be the go-ahead to send all of it): answered at
/// once instead.
pub async fn drain_unless_waiting<B, E>(body: B, idle: std::time::Duration, expects_continue: bool)
where
    B: Stream<Item = Result<Bytes, E>> + Unpin,
{
    if !expects_continue {
        drain_small(body, idle).await;
    }
}

/// Reads and drops what is left of a small request body, so that a client
/// still sending it gets the answer instead of a connection reset (an
/// answer given while the client sends is lost with the unread bytes when
/// the connection closes). Stops after [`DRAINED_BODY_BYTES`], at the first
/// error, or when the client pauses for `idle`: a large body is cut off.
pub async fn drain_small<B, E>(mut body: B, idle: std::time::Duration)
where
    B: Stream<Item = Result<Bytes, E>> + Unpin,
{
    let mut read = 0u64;
    while read < DRAINED_BODY_BYTES {
        match tokio::time::timeout(idle, body.next()).await {
            Ok(Some(Ok(chunk))) => read += chunk.len() as u64,
            _ => return,
        }
    }
}

struct Upload<S: Store> {
    gw: Arc<Gateway<S>>,
    evidence: EvidenceId,
    /// Stripes being coded and stored, oldest first, by stripe number.
    in_flight: VecDeque<(u64, JoinHandle<Result<StripeRecord, ApiError>>)>,
    /// Stored stripes whose records are not yet in the index.
    unflushed: Vec<(u64, StripeRecord)>,
    /// Bao outboard pairs not yet stored.
    pairs: Vec<(u64, protocol::bao::HashPair)>,
    degraded: u64,
    /// When the intent's lease was last extended (monotonic: a wall clock
    /// set back must not stop the renewals GC watches for).
    renewed_at: std::time::Instant,
    /// When to try again a renewal the index failed (it may be recovering):
    /// the upload goes on while a third of its lease is left.
    retry_renewal_at: Option<std::time::Instant>,
    /// The S3 multipart upload this filing is a part of, or completes: each
    /// renewal is a sign of its life too, so the collector does not expire
    /// an upload whose part (or Complete) streams for longer than
    /// `multipart_expiry_ms` over a slow link.
    keeps_alive: Option<EvidenceId>,
}

/// Whether an index error may pass (a conflict storm, a recovery, a
/// throttle, the store's disk failing a write) rather than say the upload
/// must stop (GC aborted its intent, or there is none) or never succeed (a
/// transaction too large, a record that does not decode).
fn transient(e: &ApiError) -> bool {
    use indexer::Retryable as _;
    e.is_retryable()
        || matches!(
            e,
            ApiError::Index(schema::SchemaError::Kv(indexer::KvError::Storage(_)))
        )
}

impl<S: Store> Upload<S> {
    fn new(gw: Arc<Gateway<S>>, evidence: EvidenceId) -> Self {
        Upload {
            gw,
            evidence,
            in_flight: VecDeque::new(),
            unflushed: Vec::new(),
            pairs: Vec::new(),
            degraded: 0,
            renewed_at: std::time::Instant::now(),
            retry_renewal_at: None,
            keeps_alive: None,
        }
    }

    async fn run<B, E>(
        &mut self,
        meta: FilingMeta,
        filed_at_ms: u64,
        mut body: B,
    ) -> Result<Filing, ApiError>
    where
        B: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let code = self.gw.config.code();
        let stripe_size = code.stripe_size() as usize;
        self.keeps_alive = meta
            .part
            .map(|(upload, _)| upload)
            .or(meta.s3.as_ref().and_then(|put| put.completes));
        // BLAKE3 root and Bao outboard in one pass; SHA-256 beside it.
        let mut bao = protocol::bao::OutboardBuilder::new();
        let mut sha = sha2::Sha256::new();
        // S3 ETags are the body's MD5: computed only for S3 filings.
        let mut md5 =
            (meta.s3.is_some() || meta.part.is_some()).then(<md5::Md5 as md5::Digest>::new);
        let mut size: u64 = 0;
        let (k, shard_size) = (code.data_shards(), code.shard_size as usize);
        let mut stripe = StripeFill::new(k, shard_size, 0);
        // The receive memory the stripe being filled holds, once its first
        // byte is in (its room is 0 until then).
        let mut receiving: Option<Receiving> = None;
        let mut next_stripe: u64 = 0;

        let idle = (!meta.body_from_store).then(|| {
            std::time::Duration::from_millis(self.gw.config.client_idle_timeout_ms.max(1))
        });
        // A body read back from the store (a copy, a multipart completion)
        // that fails is the cluster's failure, not a client's cut-off body.
        let from_store = meta.body_from_store;
        loop {
            let Some(chunk) = self.next_chunk(&mut body, idle).await? else {
                // Ended because its connection was cut off (see
                // `Gateway::connections_cut_off`): not the whole file. A
                // body of declared length is checked against it below.
                let held_to_length = meta.body_len_exact && meta.body_len_at_most.is_some();
                if !(from_store || held_to_length)
                    && self
                        .gw
                        .connections_cut_off
                        .load(std::sync::atomic::Ordering::SeqCst)
                {
                    return Err(ApiError::BodyIncomplete(
                        "the gateway stopped while the body was arriving".into(),
                    ));
                }
                break;
            };
            let mut chunk = chunk.map_err(|e| match from_store {
                true => ApiError::Unavailable(format!("reading the source back failed: {e}")),
                false => ApiError::BodyIncomplete(e.to_string()),
            })?;
            self.keep_lease().await?;
            if !from_store {
                self.gw.metrics.received_bytes.inc_by(chunk.len() as u64);
            }
            bao.update(&chunk);
            sha.update(&chunk);
            if let Some(m) = &mut md5 {
                md5::Digest::update(m, &chunk);
            }
            size += chunk.len() as u64;
            while !chunk.is_empty() {
                if stripe.room == 0 {
                    // What this stripe can hold: a whole one, or what is
                    // left of a body of declared length.
                    let placed = size - chunk.len() as u64;
                    let room = meta.body_len_at_most.map_or(stripe_size, |most| {
                        usize::try_from(most.saturating_sub(placed))
                            .unwrap_or(usize::MAX)
                            .min(stripe_size)
                    });
                    if room == 0 {
                        return Err(ApiError::BadRequest(
                            "the body is longer than its declared length".into(),
                        ));
                    }
                    // Not for a body read back from the store: its
                    // source holds read memory while it waits, and the two
                    // budgets must never wait on each other (the read
                    // budget bounds those).
                    if !from_store {
                        receiving = Some(self.receive_memory(room).await?);
                    }
                    stripe = StripeFill::new(k, shard_size, room);
                }
                let taken = stripe.fill(&self.gw.buffers, &chunk);
                bytes::Buf::advance(&mut chunk, taken);
                if stripe.len == stripe_size {
                    let full = std::mem::replace(&mut stripe, StripeFill::new(k, shard_size, 0));
                    self.pairs.extend(bao.take_pairs());
                    self.dispatch(next_stripe, StripeData::Full(full.shards))
                        .await?;
                    // Held by the stripe in flight, against the ingest
                    // budget, from here.
                    receiving = None;
                    next_stripe += 1;
                } else if taken == 0 {
                    return Err(ApiError::BadRequest(
                        "the body is longer than its declared length".into(),
                    ));
                }
            }
        }
        if stripe.len > 0 {
            let tail = stripe.into_tail(&self.gw.buffers);
            self.dispatch(next_stripe, StripeData::Tail(tail)).await?;
            next_stripe += 1;
        } else {
            stripe.give_back(&self.gw.buffers);
        }
        drop(receiving);
        while !self.in_flight.is_empty() {
            self.complete_oldest().await?;
        }
        let (root, last_pairs) = bao.finish();
        self.pairs.extend(last_pairs);
        self.flush().await?;

        let header = ManifestHeader {
            evidence: self.evidence,
            tenant: meta.tenant,
            case: meta.case,
            blake3: Blake3Hash(root),
            sha256: Sha256Hash(sha.finalize().into()),
            size,
            media_type: meta.media_type,
            file_name: meta.file_name,
            submitter: meta.submitter,
            filed_at_ms,
            code,
            stripes: next_stripe,
            retain_until_ms: meta.retain_until_ms,
            legal_hold: meta.legal_hold,
        };
        // Bytes a client sent count as ingest; bytes this cluster read back
        // from itself (an S3 copy, a multipart completion, whose parts were
        // counted as they came) do not.
        let from_client = !meta.body_from_store;
        if let Some(declared) = meta.body_len_at_most.filter(|_| meta.body_len_exact) {
            if size != declared {
                return Err(ApiError::BodyIncomplete(format!(
                    "{size} of the {declared} bytes declared arrived"
                )));
            }
        }
        check_declared(&header, meta.expect_blake3, meta.expect_sha256)?;
        if let Some(check) = &meta.body_check {
            (check.0)()?;
        }
        let digest: Option<[u8; 16]> = md5.map(|m| md5::Digest::finalize(m).into());
        if meta.expect_md5.is_some() && meta.expect_md5 != digest {
            return Err(ApiError::BadDigest);
        }
        if let Some((upload, number)) = meta.part {
            return self
                .commit_part(
                    header,
                    upload,
                    number,
                    digest,
                    from_client,
                    (meta.copied_from, meta.credential, meta.source_read),
                )
                .await;
        }
        let s3 = match (meta.s3, digest) {
            (Some(mut put), Some(digest)) => {
                put.version.version_id = self.evidence;
                put.version.evidence = Some(self.evidence);
                put.version.size = size;
                put.version.etag = put.etag.take().unwrap_or_else(|| hex::encode(digest));
                put.version.last_modified_ms = filed_at_ms;
                Some(put)
            }
            _ => None,
        };
        // The `filed` statement commits with the manifest (an outbox the
        // ledger drains): evidence is never visible without its statement.
        let replacer = meta.actor.clone().unwrap_or_default();
        let (copied_from, credential) = (meta.copied_from, meta.credential.clone());
        let source_read = meta.source_read;
        let pending = match &self.gw.ledger {
            Some(_) => Some(filed_statement(
                &header,
                meta.actor,
                meta.provenance,
                self.gw.clock.now_ms(),
            )?),
            None => None,
        };
        // Replacing a locked "null" version is judged by the compliance clock.
        let compliance_ms = self.gw.clock.compliance_ms();
        let stored = indexer::run(&self.gw.store, |tx| {
            let (header, pending, s3, replacer) = (&header, &pending, &s3, &replacer);
            let (copied_from, source_read) = (&copied_from, &source_read);
            let (gw, credential) = (&*self.gw, &credential);
            async move {
                let commit = schema::commit_manifest_tx(&tx, header).await?;
                let mut stored = None;
                if commit == schema::Commit::Now {
                    still_authorized_tx(&tx, credential.as_ref()).await?;
                    still_filed_tx(&tx, copied_from).await?;
                    // Each statement this transaction queues at a number of
                    // its own (one number is one key): the filing 0, the
                    // copy source's read 1, a replaced version's unlinking 2.
                    if let Some(p) = pending {
                        indexer::ledger::enqueue_tx(&tx, 0, p);
                    }
                    if let Some(p) = source_read {
                        indexer::ledger::enqueue_tx(&tx, 1, p);
                    }
                    if let Some(put) = s3 {
                        if let Some(check) = &put.condition {
                            let current =
                                match indexer::s3::get_version_tx(&tx, &put.bucket, &put.key, None)
                                    .await
                                {
                                    Ok(v) if !v.is_delete_marker() => Some(v),
                                    Ok(_) | Err(indexer::s3::ObjectError::NoSuchKey) => None,
                                    Err(e) => return Err(e.into()),
                                };
                            (check.0)(current.as_ref())?;
                        }
                        // As stored: its id may have moved to sort after
                        // a version committed since it was minted. The
                        // null version it replaced, if any, keeps its
                        // evidence but loses its S3 name: on the ledger,
                        // as a DELETE's removal would be.
                        let (v, replaced) = indexer::s3::put_version_tx(
                            &tx,
                            &put.bucket,
                            &put.key,
                            &put.version,
                            compliance_ms,
                            &put.seen,
                        )
                        .await?;
                        if let Some(old) = replaced {
                            let unlinked = crate::s3::unlinked_tx(
                                gw,
                                &tx,
                                replacer.clone(),
                                (&put.bucket, &put.key),
                                &old,
                                Some(v.version_id),
                            )
                            .await?;
                            if let Some(p) = unlinked {
                                indexer::ledger::enqueue_tx(&tx, 2, &p);
                            }
                        }
                        if let Some(upload) = put.completes {
                            let done = indexer::s3::CompletedUpload {
                                tenant: header.tenant.clone(),
                                bucket: put.bucket.clone(),
                                key: put.key.clone(),
                                etag: v.etag.clone(),
                                version_id: v.version_id,
                                null_version: v.null_version,
                                completed_ms: v.last_modified_ms,
                            };
                            indexer::s3::complete_multipart_tx(&tx, upload, &done).await?;
                        }
                        stored = Some(v);
                    }
                } else if let Some(put) = s3 {
                    // Stored by the earlier attempt: the version as it
                    // stored it (its id may have moved).
                    stored = indexer::s3::versions_tx(&tx, &put.bucket, &put.key, 1_000)
                        .await?
                        .into_iter()
                        .find(|v| v.evidence == Some(header.evidence));
                }
                Ok::<_, ApiError>(stored)
            }
        })
        .await?;
        if let Some(ledger) = &self.gw.ledger {
            ledger.queued();
        }
        self.gw.metrics.filings.inc();
        self.gw.metrics.degraded_written.inc_by(self.degraded);
        if from_client {
            self.gw.metrics.ingest_bytes.inc_by(size);
        }
        tracing::info!(evidence = %header.evidence, size, stripes = header.stripes, degraded = self.degraded, "filed");
        Ok(Filing::New {
            header,
            degraded_stripes: self.degraded,
            version: stored.or(s3.map(|put| put.version)).map(Box::new),
        })
    }

    /// Records a stored multipart part in the transaction that ends its
    /// intent (failing if GC or an abort got there first).
    async fn commit_part(
        &self,
        header: ManifestHeader,
        upload: EvidenceId,
        number: u32,
        md5: Option<[u8; 16]>,
        from_client: bool,
        // Checked where the part commits: its copy's source still filed,
        // its credential not revoked; and the source's read recorded (see
        // [`FilingMeta`]).
        (copied_from, credential, source_read): (
            Vec<EvidenceId>,
            Option<schema::CredentialRef>,
            Option<indexer::ledger::PendingRecord>,
        ),
    ) -> Result<Filing, ApiError> {
        let record = indexer::s3::PartRecord {
            part_id: self.evidence,
            size: header.size,
            md5: md5.map(hex::encode).unwrap_or_default(),
            blake3: header.blake3.0,
            sha256: header.sha256.0,
            code: header.code,
            stripes: header.stripes,
            uploaded_ms: header.filed_at_ms,
            copied_from: copied_from.first().copied(),
        };
        let now = gw_now(&self.gw);
        let replaced = indexer::run(&self.gw.store, |tx| {
            let (record, credential, copied_from) = (&record, &credential, &copied_from);
            let source_read = &source_read;
            async move {
                let replaced = indexer::s3::put_part_tx(&tx, upload, number, record).await?;
                // Its sign of life is when it commits, not when it began.
                indexer::s3::touch_upload_tx(&tx, upload, now);
                still_authorized_tx(&tx, credential.as_ref()).await?;
                still_filed_tx(&tx, copied_from).await?;
                if let Some(p) = source_read {
                    indexer::ledger::enqueue_tx(&tx, 0, p);
                }
                Ok::<_, ApiError>(replaced)
            }
        })
        .await?;
        if let (Some(_), Some(l)) = (&source_read, &self.gw.ledger) {
            l.queued();
        }
        self.gw.metrics.degraded_written.inc_by(self.degraded);
        if from_client {
            self.gw.metrics.ingest_bytes.inc_by(header.size);
        }
        tracing::info!(%upload, part = number, size = header.size, "multipart part stored");
        Ok(Filing::Part { record, replaced })
    }

    /// Cleans up after a failed upload: aborts the intent first (so nothing can
    /// commit it any more), then deletes the shards of every stripe, whether its
    /// record reached the index or was still in flight or unflushed here.
    ///
    /// Returns once the intent is aborted (a retry under its
    /// Idempotency-Key then files anew) and the shards no stripe record
    /// names are deleted; the recorded ones are deleted in the background,
    /// so the refusal does not wait on deleting a long upload's shards (a
    /// client's timeout would come first, and it would not learn why).
    /// What that misses, GC deletes.
    async fn abandon(mut self) {
        let gw = self.gw.clone();
        let evidence = self.evidence;
        // Let in-flight stripes finish so that none writes after we delete.
        while let Some((stripe, handle)) = self.in_flight.pop_front() {
            if let Ok(Ok(record)) = handle.await {
                self.unflushed.push((stripe, record));
            }
        }
        // Record what was stored so that GC keeps track of it even if a delete
        // below fails; then abort and delete everything recorded.
        if let Err(e) = self.flush().await {
            tracing::debug!(%evidence, error = %e, "could not record the stripes of a failed upload");
        }
        let aborted = crate::gc::abort(&gw, evidence, crate::gc::Abort::Failed).await;
        // Stripes no record names (a pipeline's, or a few batches the index
        // did not take), eight at a time: deleted before
        // the answer, since nothing but the orphan sweep, hours later,
        // would find them if this gateway stopped now.
        let unflushed: Vec<_> = std::mem::take(&mut self.unflushed)
            .into_iter()
            .map(|(stripe, record)| (stripe, Some(record)))
            .collect();
        crate::gc::delete_each(&gw, evidence, &unflushed).await;
        // Recorded ones, after it: GC knows them (the intent is aborted).
        if aborted {
            tokio::spawn(async move { crate::gc::delete_aborted(&gw, evidence).await });
        }
    }

    /// Starts coding and storing one stripe, first waiting for the oldest one if
    /// the pipeline is full.
    async fn dispatch(&mut self, stripe: u64, data: StripeData) -> Result<(), ApiError> {
        while self.in_flight.len() >= self.gw.config.pipeline_stripes {
            self.complete_oldest().await?;
        }
        let memory = self.memory_for(&data).await?;
        let gw = self.gw.clone();
        let evidence = self.evidence;
        self.in_flight.push_back((
            stripe,
            tokio::spawn(async move {
                let _memory = memory;
                store_stripe(gw, evidence, stripe, data).await
            }),
        ));
        Ok(())
    }

    /// The gateway-wide memory a stripe holds while it is coded and stored
    /// (its data and parity shards, and the data's copy in flight), waited
    /// for while other uploads hold it all, the lease kept meanwhile. An
    /// upload waiting here holds this stripe's data outside the budget and
    /// reads no more of its body: each upload holds at most one stripe of
    /// data beyond the budget, not its whole pipeline.
    async fn memory_for(
        &mut self,
        data: &StripeData,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        let code = self.gw.config.code();
        let (k, m) = (code.data_shards(), code.parity_shards());
        let shard_len = match data {
            StripeData::Full(_) => code.shard_size as usize,
            StripeData::Tail(tail) => tail.len().div_ceil(k),
        };
        // Never more than the whole budget (its size is rounded up from
        // at least one pipeline, but a stripe's cost is rounded up too).
        let total = self.gw.ingest_memory_kib;
        let kib = ((2 * k + m) * shard_len).div_ceil(1024).clamp(1, total);
        let kib = u32::try_from(kib).unwrap_or(u32::MAX);
        let gate = self.gw.ingest_memory.clone();
        self.wait_for_memory(gate, kib, None).await
    }

    /// The receive memory (see `receive_memory_mib`) for a stripe that can
    /// hold `room` bytes of the body, waited for as [`Self::memory_for`]
    /// waits. Nothing else is held while it waits: every holder can fill
    /// its stripe and hand it on (to the ingest budget, a pool of its
    /// own) without more, so waits always end. (A body read back from the
    /// store takes none: its source holds read memory meanwhile.)
    async fn receive_memory(&mut self, room: usize) -> Result<Receiving, ApiError> {
        let kib = room
            .div_ceil(1024)
            .clamp(1, self.gw.receive_memory_kib.max(1));
        let kib = u32::try_from(kib).unwrap_or(u32::MAX);
        let gate = self.gw.receive_memory.clone();
        // Held by other clients' stripes while they fill, at the pace those
        // clients send (slow ones, or many sending a byte now and then,
        // can hold all of it): waited for while it moves at all, but once
        // no holder has let go for as long as a client may go silent, 503,
        // for the client to try again later, instead of an upload that
        // hangs unanswered. (A queue that moves, however slowly storage
        // takes the stripes, is waited out.)
        let patience =
            std::time::Duration::from_millis(self.gw.config.client_idle_timeout_ms.max(1));
        let released = self.gw.receive_released.clone();
        let permit = self
            .wait_for_memory(gate, kib, Some((patience, released.clone())))
            .await?;
        Ok(Receiving {
            _permit: permit,
            released,
        })
    }

    /// `kib` permits of `gate`, waited for while other uploads hold them,
    /// the lease kept meanwhile; with `patience`, given up once the count
    /// of releases it names has not moved for that long.
    async fn wait_for_memory(
        &mut self,
        gate: Arc<tokio::sync::Semaphore>,
        kib: u32,
        patience: Option<(std::time::Duration, Arc<AtomicU64>)>,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        if let Ok(permit) = gate.clone().try_acquire_many_owned(kib) {
            return Ok(permit);
        }
        self.gw.metrics.ingest_memory_waits.inc();
        let mut seen = patience.as_ref().map(|(_, r)| r.load(Ordering::Relaxed));
        let mut give_up = patience
            .as_ref()
            .map(|(p, _)| tokio::time::Instant::now() + *p);
        // One wait, keeping its place in the queue while the lease is kept.
        let mut acquire = std::pin::pin!(gate.acquire_many_owned(kib));
        loop {
            let renew_at = tokio::time::Instant::from_std(self.renew_at());
            tokio::select! {
                biased;
                permit = &mut acquire => {
                    return permit.map_err(|_| ApiError::Unavailable("the gateway is stopping".into()));
                }
                () = sleep_until_some(give_up) => {
                    if let (Some((p, released)), Some(before)) = (&patience, seen) {
                        let now = released.load(Ordering::Relaxed);
                        if now != before {
                            // Others let go meanwhile: the queue moves.
                            seen = Some(now);
                            give_up = Some(tokio::time::Instant::now() + *p);
                            continue;
                        }
                    }
                    return Err(ApiError::Unavailable(
                        "the gateway's memory for receiving uploads is held by uploads that have \
                         not let go of it for a while; try again shortly"
                            .into(),
                    ));
                }
                () = tokio::time::sleep_until(renew_at) => self.keep_lease().await?,
            }
        }
    }

    async fn complete_oldest(&mut self) -> Result<(), ApiError> {
        let Some((stripe, mut handle)) = self.in_flight.pop_front() else {
            return Ok(());
        };
        // The lease is kept while the stripe waits (on a slow node, its
        // spares one after another, or the ingest gate while repair runs):
        // a live upload is never taken for abandoned.
        let joined = loop {
            let renew_at = tokio::time::Instant::from_std(self.renew_at());
            tokio::select! {
                biased;
                joined = &mut handle => break joined,
                () = tokio::time::sleep_until(renew_at) => {
                    if let Err(e) = self.keep_lease().await {
                        // Still in flight: `abandon` waits for it and
                        // deletes what it stored.
                        self.in_flight.push_front((stripe, handle));
                        return Err(e);
                    }
                }
            }
        };
        let record = joined.map_err(|e| {
            tracing::error!(error = %e, "stripe task failed");
            ApiError::Internal
        })??;
        // Counted in the metrics once the filing commits: a stripe of a
        // filing that then fails was never acknowledged.
        if record.missing() > 0 {
            self.degraded += 1;
        }
        self.unflushed.push((stripe, record));
        if self.unflushed.len() >= STRIPES_PER_TXN || self.pairs.len() >= PAIRS_PER_TXN {
            // A batch the index failed to take is kept (at most four
            // batches: a transaction stays far inside its limits) and
            // written with the next.
            if let Err(e) = self.flush().await {
                let room = self.unflushed.len() < 4 * STRIPES_PER_TXN
                    && self.pairs.len() < 4 * PAIRS_PER_TXN;
                if !(room && self.may_wait_out(&e, "recording the upload's stripes")) {
                    return Err(e);
                }
                return Ok(());
            }
        }
        self.keep_lease().await
    }

    /// The body's next chunk. While it is awaited the intent's lease is kept
    /// (the upload is alive, however slow its source); a client body that
    /// sends nothing for `idle` fails the filing.
    async fn next_chunk<B, E>(
        &mut self,
        body: &mut B,
        idle: Option<std::time::Duration>,
    ) -> Result<Option<Result<Bytes, E>>, ApiError>
    where
        B: Stream<Item = Result<Bytes, E>> + Unpin,
    {
        use tokio::time::{sleep_until, Instant};
        let give_up = idle.map(|d| Instant::now() + d);
        loop {
            let renew_at = Instant::from_std(self.renew_at());
            tokio::select! {
                biased;
                next = body.next() => return Ok(next),
                () = sleep_until(renew_at) => self.keep_lease().await?,
                () = async {
                    match give_up {
                        Some(at) => sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => return Err(ApiError::BodyIdle(idle.unwrap_or_default())),
            }
        }
    }

    fn lease_third(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.gw.config.intent_lease_ms / 3)
    }

    /// When the lease is next to be renewed.
    fn renew_at(&self) -> std::time::Instant {
        self.retry_renewal_at
            .unwrap_or(self.renewed_at + self.lease_third())
    }

    /// Whether an index failure to renew or record may pass for now: it is
    /// transient, and more than a third of the lease is left since the last
    /// renewal (GC takes an intent for abandoned only once a whole lease
    /// has passed unchanged).
    fn may_wait_out(&mut self, e: &ApiError, what: &str) -> bool {
        let lease = std::time::Duration::from_millis(self.gw.config.intent_lease_ms);
        if !transient(e) || self.renewed_at.elapsed() + self.lease_third() >= lease {
            return false;
        }
        tracing::warn!(evidence = %self.evidence, error = %e, "{what} failed; the upload goes on and tries again in a second");
        self.retry_renewal_at = Some(std::time::Instant::now() + std::time::Duration::from_secs(1));
        true
    }

    /// Extends the intent's lease once a third of it has passed, so a slow but
    /// live upload is never taken for abandoned by GC. Fails if GC aborted it,
    /// or if the index stays unreachable until a third of the lease is left
    /// (a renewal that fails before that is tried again a second later: an
    /// index recovering for longer than its own retries must not end every
    /// upload under way).
    async fn keep_lease(&mut self) -> Result<(), ApiError> {
        if std::time::Instant::now() < self.renew_at() {
            return Ok(());
        }
        let now = gw_now(&self.gw);
        let (evidence, lease) = (self.evidence, now + self.gw.config.intent_lease_ms);
        let upload = self.keeps_alive;
        let renewed = indexer::run(&self.gw.store, |tx| async move {
            schema::renew_intent_tx(&tx, evidence, lease).await?;
            // Ended meanwhile (aborted, expired, completed by another
            // request): this part or Complete cannot commit, so it stops.
            if let Some(upload) = upload {
                indexer::s3::touch_open_upload_tx(&tx, upload, now).await?;
            }
            Ok::<_, ApiError>(())
        })
        .await;
        match renewed {
            Ok(()) => {
                self.renewed_at = std::time::Instant::now();
                self.retry_renewal_at = None;
                Ok(())
            }
            Err(e) if self.may_wait_out(&e, "renewing the upload's lease") => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn flush(&mut self) -> Result<(), ApiError> {
        if self.unflushed.is_empty() && self.pairs.is_empty() {
            return Ok(());
        }
        let now = gw_now(&self.gw);
        let lease = now + self.gw.config.intent_lease_ms;
        let evidence = self.evidence;
        // Written from here and cleared only once committed: if the commit
        // fails, `abandon` still knows these stripes and deletes their shards.
        let (batch, pairs) = (&self.unflushed, &self.pairs);
        // Stripes a write put two shards of in one failure domain (a node
        // failed and the next one ranked was in a domain the stripe used):
        // queued, so repair spreads them once another domain can take one.
        let crowded: Vec<u64> = batch
            .iter()
            .filter(|(_, rec)| self.gw.nodes.crowds(rec))
            .map(|(s, _)| *s)
            .collect();
        let crowded = &crowded;
        let upload = self.keeps_alive;
        indexer::run(&self.gw.store, |tx| async move {
            schema::renew_intent_tx(&tx, evidence, lease).await?;
            // A renewal (see `keep_lease`): a sign of the upload's life.
            if let Some(upload) = upload {
                indexer::s3::touch_open_upload_tx(&tx, upload, now).await?;
            }
            for (stripe, rec) in batch {
                schema::put_stripe_tx(&tx, evidence, *stripe, rec);
            }
            for &stripe in crowded {
                schema::mark_degraded_tx(&tx, evidence, stripe);
            }
            schema::put_outboard_pairs_tx(&tx, evidence, pairs);
            Ok::<_, ApiError>(())
        })
        .await?;
        self.unflushed.clear();
        self.pairs.clear();
        self.renewed_at = std::time::Instant::now();
        self.retry_renewal_at = None;
        Ok(())
    }
}

fn gw_now<S: Store>(gw: &Gateway<S>) -> u64 {
    gw.clock.now_ms()
}

/// The ledger statement recording a filing, with a fresh salt.
fn filed_statement(
    h: &ManifestHeader,
    actor: Option<String>,
    provenance: protocol::ledger::Provenance,
    now_ms: u64,
) -> Result<indexer::ledger::PendingRecord, ApiError> {
    use protocol::ledger::{Kind, Statement};
    let mut s = Statement::new(
        Kind::Filed,
        h.evidence,
        &h.blake3,
        Some(&h.sha256),
        h.size,
        &h.tenant,
        h.case.clone(),
        actor,
        now_ms,
    );
    s.metadata_sha256 = Some(protocol::ledger::filing_metadata_sha256(
        h.case.as_deref(),
        h.file_name.as_deref(),
        h.media_type.as_deref(),
        h.submitter.as_deref(),
    ));
    s.provenance = provenance;
    let statement = s
        .encode()
        .map_err(|e| ApiError::BadRequest(format!("filing metadata: {e}")))?;
    Ok(indexer::ledger::PendingRecord {
        evidence: h.evidence,
        salt: rand::random(),
        statement,
    })
}

fn check_declared(
    header: &ManifestHeader,
    blake3: Option<Blake3Hash>,
    sha256: Option<Sha256Hash>,
) -> Result<(), ApiError> {
    if let Some(declared) = blake3.filter(|d| *d != header.blake3) {
        return Err(ApiError::HashMismatch {
            algorithm: "BLAKE3",
            declared: declared.to_hex(),
            actual: header.blake3.to_hex(),
        });
    }
    if let Some(declared) = sha256.filter(|d| *d != header.sha256) {
        return Err(ApiError::HashMismatch {
            algorithm: "SHA-256",
            declared: declared.to_hex(),
            actual: header.sha256.to_hex(),
        });
    }
    Ok(())
}

/// A stripe being filled from the body straight into its `k` data shards,
/// cut where a full stripe's layout cuts it, so a full stripe is coded
/// with no copy. It takes at most `room` bytes, and holds buffers for no
/// more: each shard's is taken when its first byte arrives.
struct StripeFill {
    shards: Vec<Vec<u8>>,
    shard_size: usize,
    room: usize,
    /// Bytes filled.
    len: usize,
}

impl StripeFill {
    fn new(k: usize, shard_size: usize, room: usize) -> Self {
        StripeFill {
            shards: (0..k).map(|_| Vec::new()).collect(),
            shard_size,
            room,
            len: 0,
        }
    }

    /// Copies from the front of `chunk` up to the stripe's end or its room;
    /// returns how many bytes it took.
    fn fill(&mut self, pool: &BufferPool, chunk: &[u8]) -> usize {
        let mut taken = 0;
        while taken < chunk.len() && self.len < self.room {
            let at = self.len / self.shard_size;
            let Some(shard) = self.shards.get_mut(at) else {
                break; // full
            };
            if shard.capacity() == 0 {
                let room = (self.room - at * self.shard_size).min(self.shard_size);
                // A whole shard from the pool; a short one (a body's last)
                // fresh, so it pins no pooled shard-sized buffer.
                *shard = match room == self.shard_size {
                    true => pool.take_empty(room),
                    false => Vec::with_capacity(room),
                };
            }
            let n = (self.shard_size - shard.len())
                .min(chunk.len() - taken)
                .min(self.room - self.len);
            shard.extend_from_slice(&chunk[taken..taken + n]);
            taken += n;
            self.len += n;
        }
        taken
    }

    /// A short last stripe, as one buffer: its layout cuts it into `k`
    /// shorter shards (one copy of at most one stripe per filing).
    fn into_tail(self, pool: &BufferPool) -> Vec<u8> {
        let mut tail = Vec::with_capacity(self.len);
        for shard in self.shards {
            tail.extend_from_slice(&shard);
            // Whole shards came from the pool (perhaps larger): back there.
            if shard.capacity() >= self.shard_size {
                pool.give(shard);
            }
        }
        tail
    }

    fn give_back(self, pool: &BufferPool) {
        for shard in self.shards {
            if shard.capacity() >= self.shard_size {
                pool.give(shard);
            }
        }
    }
}

/// What [`store_stripe`] codes.
enum StripeData {
    /// A full stripe: its `k` data shards, each `shard_size` long.
    Full(Vec<Vec<u8>>),
    /// A short last stripe, whole.
    Tail(Vec<u8>),
}

/// Codes one stripe into `k + m` equal shards: data shards are the stripe cut
/// in `k`, the last zero-padded.
pub fn encode_stripe(
    rs: &reed_solomon_erasure::galois_8::ReedSolomon,
    k: usize,
    m: usize,
    data: &[u8],
    shard_len: usize,
    pool: &BufferPool,
) -> Result<Vec<Vec<u8>>, reed_solomon_erasure::Error> {
    let mut shards: Vec<Vec<u8>> = (0..k + m).map(|_| pool.take(shard_len)).collect();
    for (i, shard) in shards.iter_mut().take(k).enumerate() {
        // Every byte is written: the piece, then zero padding (pooled buffers
        // hold stale bytes). Parity shards are overwritten by `encode`.
        let piece = data.get(i * shard_len..).unwrap_or_default();
        let piece = &piece[..piece.len().min(shard_len)];
        shard[..piece.len()].copy_from_slice(piece);
        shard[piece.len()..].fill(0);
    }
    rs.encode(&mut shards)?;
    Ok(shards)
}

/// Codes stripe `stripe` and puts its shards; returns its record once at least
/// the write quorum of shards is durable.
async fn store_stripe<S: Store>(
    gw: Arc<Gateway<S>>,
    evidence: EvidenceId,
    stripe: u64,
    data: StripeData,
) -> Result<StripeRecord, ApiError> {
    // While repair works, filings share the machine with it (see
    // `repair_ingest_stripes`): held until this stripe is stored.
    let _turn = if gw.repairing.load(std::sync::atomic::Ordering::Relaxed) > 0 {
        gw.ingest_gate.acquire().await.ok()
    } else {
        None
    };
    let code = gw.config.code();
    let (k, total) = (code.data_shards(), code.total());
    let (shard_len, data_len) = match &data {
        StripeData::Full(_) => (code.shard_size as usize, code.stripe_size()),
        StripeData::Tail(tail) => (tail.len().div_ceil(k), tail.len() as u64),
    };
    let rs = gw.rs.clone();
    let pool = gw.buffers.clone();
    let shards = tokio::task::spawn_blocking(move || {
        let shards = match data {
            StripeData::Full(mut shards) => {
                shards.extend((k..total).map(|_| pool.take(shard_len)));
                rs.encode(&mut shards)?;
                shards
            }
            StripeData::Tail(tail) => {
                let shards = encode_stripe(&rs, k, total - k, &tail, shard_len, &pool)?;
                pool.give(tail);
                shards
            }
        };
        let hashes: Vec<Blake3Hash> = shards.iter().map(|s| Blake3Hash::of(s)).collect();
        // Shared with QUIC's send buffers, back to the pool once acknowledged.
        let shared = shards.into_iter().map(|s| pool.share(s));
        Ok::<_, reed_solomon_erasure::Error>(shared.zip(hashes).collect::<Vec<_>>())
    })
    .await
    .map_err(|_| ApiError::Internal)?
    .map_err(|e| {
        tracing::error!(error = ?e, "erasure coding failed");
        ApiError::Internal
    })?;

    let ranked = gw.nodes.in_write_order(placement::rank(
        &evidence,
        stripe,
        &gw.nodes.write_candidates(total),
    ));
    let home = &ranked[..total.min(ranked.len())];
    let spares = Mutex::new(
        ranked[home.len()..]
            .iter()
            .copied()
            .collect::<VecDeque<_>>(),
    );
    let puts = shards.iter().enumerate().map(|(i, (body, hash))| {
        let header = ShardHeader {
            key: ShardKey { evidence, stripe, index: i as u8 },
            code,
            stripe_len: data_len,
            len: shard_len as u32,
            blake3: *hash,
        };
        let first = home.get(i).copied();
        let gw = &gw;
        let spares = &spares;
        async move {
            let mut target = first.or_else(|| pop(spares));
            let mut full = false;
            while let Some(node) = target {
                let Some(addr) = gw.nodes.addr(node) else { break };
                match gw.nodes.client.rpc_put_shard(addr, &header, body.clone()).await {
                    Ok(()) => {
                        gw.nodes.write_succeeded(node);
                        return (Some(node), full);
                    }
                    Err(e) => {
                        tracing::warn!(%node, shard = %header.key, error = %e, "shard put failed; trying the next ranked node");
                        // Full (up and serving reads, only out of room),
                        // or its disk failing (passed over for a while
                        // should it answer probes still).
                        gw.nodes.write_refused(node, &e);
                        if e.is_disk_full() {
                            full = true;
                        } else {
                            // Down until its next probe.
                            gw.nodes.mark(node, false);
                        }
                        target = pop(spares);
                    }
                }
            }
            (None, full)
        }
    });
    let (placed, full): (Vec<_>, Vec<_>) =
        futures::future::join_all(puts).await.into_iter().unzip();
    let stored = placed.iter().flatten().count();
    gw.metrics.shards_written.inc_by(stored as u64);
    let record = StripeRecord {
        version: 1,
        shard_len: shard_len as u32,
        shards: placed
            .iter()
            .zip(&shards)
            .map(|(node, (_, hash))| ShardPlacement {
                node: *node,
                blake3: *hash,
            })
            .collect(),
    };
    if stored < gw.config.write_quorum() {
        crate::gc::delete_stripe_shards(&gw, evidence, stripe, &record).await;
        // Lack of room is the cause only if the shards that met a full
        // node and found no other would have made the quorum.
        let roomless = placed
            .iter()
            .zip(&full)
            .filter(|(p, f)| p.is_none() && **f)
            .count();
        if stored + roomless >= gw.config.write_quorum() {
            return Err(ApiError::InsufficientStorage(format!(
                "only {stored} of {total} shards of stripe {stripe} found a node with room ({} needed): \
                 nodes are at their free-space reserve; add capacity or nodes",
                gw.config.write_quorum()
            )));
        }
        return Err(ApiError::Unavailable(format!(
            "only {stored} of {total} shards of stripe {stripe} could be stored durably; {} needed",
            gw.config.write_quorum()
        )));
    }
    Ok(record)
}

/// Receive memory an upload holds for the stripe it fills; its release is
/// counted (see [`Upload::wait_for_memory`]'s patience).
struct Receiving {
    _permit: tokio::sync::OwnedSemaphorePermit,
    released: Arc<AtomicU64>,
}

impl Drop for Receiving {
    fn drop(&mut self) {
        self.released.fetch_add(1, Ordering::Relaxed);
    }
}

/// Sleeps until `at`; for ever without one.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn pop(spares: &Mutex<VecDeque<protocol::NodeId>>) -> Option<protocol::NodeId> {
    spares.lock().unwrap_or_else(|e| e.into_inner()).pop_front()
}

#[cfg(test)]
mod tests {
    use super::*;
    use reed_solomon_erasure::galois_8::ReedSolomon;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    /// The embedded index, made unreachable at will: every transaction
    /// fails to start while `down` is set, as a store that is recovering.
    #[derive(Clone)]
    struct Flaky {
        inner: indexer::EmbeddedStore,
        down: Arc<AtomicBool>,
    }

    impl indexer::KvStore for Flaky {
        type Tx = <indexer::EmbeddedStore as indexer::KvStore>::Tx;
        fn begin(&self) -> Result<Self::Tx, indexer::KvError> {
            if self.down.load(Ordering::Relaxed) {
                return Err(indexer::KvError::Storage("the index is recovering".into()));
            }
            self.inner.begin()
        }
    }

    /// A gateway on `store` with three nodes it never reaches.
    fn gateway(dir: &std::path::Path, store: Flaky) -> Arc<Gateway<Flaky>> {
        gateway_with(dir, store, "")
    }

    /// [`gateway`], its configuration ending with `extra`.
    fn gateway_with(dir: &std::path::Path, store: Flaky, extra: &str) -> Arc<Gateway<Flaky>> {
        let ca = storage_node::tls::ClusterCa::generate("test CA").unwrap();
        let (cert, key) = ca
            .issue("gateway", &["gateway.custodia.internal".into()], &[])
            .unwrap();
        std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
        std::fs::write(dir.join("gw.pem"), cert).unwrap();
        std::fs::write(dir.join("gw.key"), key).unwrap();
        let config = format!(
            r#"
listen = "127.0.0.1:0"
index_path = "{index}"
k = 2
m = 1
intent_lease_ms = 30000

[tls]
ca_cert = "{dir}/ca.pem"
cert = "{dir}/gw.pem"
key = "{dir}/gw.key"

[[nodes]]
id = 0
addr = "127.0.0.1:9"

[[nodes]]
id = 1
addr = "127.0.0.1:10"

[[nodes]]
id = 2
addr = "127.0.0.1:11"
{extra}
"#,
            index = dir.join("index.redb").display(),
            dir = dir.display(),
        );
        let config = toml::from_str(&config).unwrap();
        Arc::new(Gateway::new(config, store, &prometheus::Registry::new()).unwrap())
    }

    /// An index unreachable for longer than its own retries does not end an
    /// upload while more than a third of its lease is left: the renewal is
    /// tried again a second later and succeeds once the index is back. With
    /// only a third left, or with the intent aborted by GC, it fails.
    #[tokio::test]
    async fn an_index_outage_shorter_than_the_lease_does_not_end_an_upload() {
        let dir = tempfile::tempdir().unwrap();
        let store = Flaky {
            inner: indexer::EmbeddedStore::open(&dir.path().join("index.redb")).unwrap(),
            down: Arc::new(AtomicBool::new(false)),
        };
        let gw = gateway(dir.path(), store.clone());
        let evidence = EvidenceId::new(gw.clock.now_ms(), [7; 10]);
        let lease = gw.clock.now_ms() + 30_000;
        indexer::run(&store, |tx| async move {
            schema::begin_intent_tx(&tx, evidence, "t", None, lease, 30_000).await
        })
        .await
        .unwrap();
        let ago = |d: Duration| std::time::Instant::now().checked_sub(d).unwrap();
        let mut up = Upload::new(gw.clone(), evidence);
        // A third of the lease has passed: due. The index is down.
        up.renewed_at = ago(Duration::from_secs(11));
        store.down.store(true, Ordering::Relaxed);
        assert!(up.keep_lease().await.is_ok(), "an outage ended the upload");
        let retry = up.retry_renewal_at.expect("a retry planned");
        assert!(
            retry > std::time::Instant::now(),
            "the retry is not put off"
        );
        // Not tried again before then.
        assert!(up.keep_lease().await.is_ok());
        // Back: the retry renews.
        store.down.store(false, Ordering::Relaxed);
        up.retry_renewal_at = Some(std::time::Instant::now());
        assert!(up.keep_lease().await.is_ok());
        assert!(up.retry_renewal_at.is_none());
        assert!(
            up.renewed_at.elapsed() < Duration::from_secs(1),
            "not renewed"
        );
        // Down again, with only a third of the lease left: it fails.
        up.renewed_at = ago(Duration::from_secs(21));
        store.down.store(true, Ordering::Relaxed);
        assert!(up.keep_lease().await.is_err(), "went on past two thirds");
        // Aborted by GC: it fails at once, however much lease is left.
        store.down.store(false, Ordering::Relaxed);
        indexer::run(&store, |tx| async move {
            schema::abort_intent_tx(&tx, evidence).await
        })
        .await
        .unwrap();
        up.renewed_at = ago(Duration::from_secs(11));
        up.retry_renewal_at = None;
        assert!(matches!(
            up.keep_lease().await,
            Err(ApiError::Index(schema::SchemaError::IntentAborted(_)))
        ));
    }

    /// A body of unknown length (chunked) that ends once the gateway has
    /// cut its connections off (hyper ends an aborted connection's body as
    /// if complete) is not filed as the whole file: refused as cut off, its
    /// intent aborted, nothing visible.
    #[tokio::test]
    async fn a_body_ended_by_its_connection_being_cut_off_is_not_filed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Flaky {
            inner: indexer::EmbeddedStore::open(&dir.path().join("index.redb")).unwrap(),
            down: Arc::new(AtomicBool::new(false)),
        };
        let gw = gateway(dir.path(), store.clone());
        gw.connections_cut_off.store(true, Ordering::SeqCst);
        let half = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(
            b"the first half of a file",
        ))]);
        let meta = FilingMeta {
            tenant: "t".into(),
            ..Default::default()
        };
        let filed = file_evidence(gw.clone(), meta, half).await;
        assert!(
            matches!(filed, Err(ApiError::BodyIncomplete(_))),
            "{filed:?}"
        );
        // An S3 body held to its length, but of no length known (chunked,
        // unsigned): the same.
        let half = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(
            b"the first half of a file",
        ))]);
        let meta = FilingMeta {
            tenant: "t".into(),
            body_len_exact: true,
            body_len_at_most: None,
            ..Default::default()
        };
        let filed = file_evidence(gw.clone(), meta, half).await;
        assert!(
            matches!(filed, Err(ApiError::BodyIncomplete(_))),
            "{filed:?}"
        );
        let hash = Blake3Hash::of(b"the first half of a file");
        let found = indexer::run(&store, |tx| async move {
            schema::lookup_by_hash_tx(&tx, "t", &hash, 10).await
        })
        .await
        .unwrap();
        assert!(found.is_empty(), "{found:?}");
    }

    /// A gateway with a ledger (and three nodes it never reaches) on an
    /// index of its own in `dir`.
    fn with_ledger(dir: &std::path::Path) -> (Flaky, Arc<Gateway<Flaky>>) {
        with_ledger_on(dir, &dir.join("index.redb"))
    }

    /// [`with_ledger`] on the index at `index`.
    fn with_ledger_on(
        dir: &std::path::Path,
        index: &std::path::Path,
    ) -> (Flaky, Arc<Gateway<Flaky>>) {
        let (skey, _) = protocol::ledger::note_keys("example.com/log", &[9u8; 32]);
        let key = dir.join("ledger.key");
        storage_node::tls::write_private(&key, skey.as_bytes()).unwrap();
        let ledger = format!(
            "[ledger]\norigin = \"example.com/log\"\nsigner_key = \"{}\"\ntiles_dir = \"{}\"\n",
            key.display(),
            dir.join("tiles").display()
        );
        let store = Flaky {
            inner: indexer::EmbeddedStore::open(index).unwrap(),
            down: Arc::new(AtomicBool::new(false)),
        };
        let gw = gateway_with(dir, store.clone(), &ledger);
        (store, gw)
    }

    /// Statements in the ledger's queue.
    async fn queued(store: &Flaky) -> usize {
        indexer::run(store, |tx| async move {
            indexer::ledger::pending_tx(&tx, 100, 1 << 20).await
        })
        .await
        .unwrap()
        .len()
    }

    /// A manifest for evidence filed at `ms` by tenant "court".
    fn manifest(gw: &Gateway<Flaky>, ms: u64) -> ManifestHeader {
        ManifestHeader {
            evidence: EvidenceId::new(ms, [3; 10]),
            tenant: "court".into(),
            case: None,
            blake3: protocol::Blake3Hash([1; 32]),
            sha256: protocol::Sha256Hash([2; 32]),
            size: 1,
            media_type: None,
            file_name: None,
            submitter: None,
            filed_at_ms: ms,
            code: gw.config.code(),
            stripes: 1,
            retain_until_ms: None,
            legal_hold: false,
        }
    }

    /// An S3 version locked by an older gateway (a COMPLIANCE date and a
    /// hold on the version record only) binds its evidence at the next
    /// start, with a statement on the ledger in the same transaction (so
    /// the openings archive keeps the lock); the start after does nothing.
    #[tokio::test]
    async fn old_s3_locks_bind_their_evidence_on_the_ledger() {
        use indexer::s3 as ix;
        let dir = tempfile::tempdir().unwrap();
        let (store, gw) = with_ledger(dir.path());
        let header = manifest(&gw, gw.clock.now_ms());
        let evidence = header.evidence;
        let until = gw.clock.now_ms() + 86_400_000;
        let bucket = ix::BucketRecord {
            tenant: "court".into(),
            created_ms: 1,
            versioning: ix::Versioning::Enabled,
            object_lock: true,
            default_retention: None,
        };
        let version = ix::ObjectVersion {
            version_id: evidence,
            null_version: false,
            evidence: Some(evidence),
            size: 1,
            etag: "0".repeat(32),
            last_modified_ms: 1,
            content_type: None,
            user_metadata: Vec::new(),
            retention: Some(ix::Retention {
                mode: ix::LockMode::Compliance,
                until_ms: until,
            }),
            legal_hold: true,
            content: Default::default(),
        };
        indexer::run(&store, |tx| {
            let (header, bucket, version) = (&header, &bucket, &version);
            async move {
                ix::create_tenant_tx(&tx, "court", 1).await?;
                ix::create_bucket_tx(&tx, "old", bucket).await?;
                ix::put_version_tx(&tx, "old", "k", version, 1, bucket).await?;
                schema::restore_manifest_tx(&tx, header)?;
                Ok::<_, ix::ObjectError>(())
            }
        })
        .await
        .unwrap();
        crate::api::carry_locks_to_evidence(&gw).await.unwrap();
        let h = indexer::run(&store, |tx| async move {
            schema::get_manifest_tx(&tx, evidence).await
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!((h.retain_until_ms, h.legal_hold), (Some(until), true));
        assert_eq!(queued(&store).await, 1, "one statement");
        crate::api::carry_locks_to_evidence(&gw).await.unwrap();
        assert_eq!(queued(&store).await, 1, "nothing more at the next start");
    }

    /// Node decisions reach the openings archive only when newer than its
    /// own, and a removal there is final: a gateway on a new, empty index
    /// (the old one lost) or on an older one writes nothing over what
    /// recovery will need.
    #[tokio::test]
    async fn only_newer_node_decisions_reach_the_archive() {
        use schema::{Lifecycle, LifecycleRecord};
        let dir = tempfile::tempdir().unwrap();
        let decide = |store: Flaky, node: u32, state, changed_ms| async move {
            indexer::run(&store, |tx| async move {
                let rec = LifecycleRecord { state, changed_ms };
                schema::set_lifecycle_tx(&tx, protocol::NodeId(node), &rec);
                Ok::<_, schema::SchemaError>(())
            })
            .await
            .unwrap()
        };
        let ready = |gw: Arc<Gateway<Flaky>>| async move {
            let ledger = gw.ledger.as_ref().unwrap();
            crate::ledger::check_published_tree(&gw, ledger)
                .await
                .unwrap();
        };
        let archived = |gw: Arc<Gateway<Flaky>>| async move {
            let ledger = gw.ledger.as_ref().unwrap();
            let mut a: Vec<_> = crate::lifecycle_archive::read_archived(ledger)
                .await
                .unwrap()
                .into_iter()
                .map(|(n, r)| (n.0, r.state, r.changed_ms))
                .collect();
            a.sort_unstable_by_key(|(n, _, _)| *n);
            a
        };
        let (store, gw) = with_ledger(dir.path());
        decide(store.clone(), 1, Lifecycle::Removed, 10).await;
        decide(store.clone(), 2, Lifecycle::Draining, 20).await;
        let sync = crate::lifecycle_archive::sync;
        assert_eq!(sync(&gw).await.unwrap(), 0, "before the index is checked");
        ready(gw.clone()).await;
        assert_eq!(sync(&gw).await.unwrap(), 2);
        let want = vec![(1, Lifecycle::Removed, 10), (2, Lifecycle::Draining, 20)];
        assert_eq!(archived(gw.clone()).await, want);
        // A new gateway on a new, empty index: nothing to write.
        let (empty, fresh) = with_ledger_on(dir.path(), &dir.path().join("new.redb"));
        ready(fresh.clone()).await;
        assert_eq!(sync(&fresh).await.unwrap(), 0);
        // An older decision, and one over a removal: nothing either.
        decide(empty.clone(), 2, Lifecycle::Active, 15).await;
        decide(empty.clone(), 1, Lifecycle::Active, 40).await;
        assert_eq!(sync(&fresh).await.unwrap(), 0);
        assert_eq!(archived(fresh.clone()).await, want);
        // A later one is written.
        decide(empty.clone(), 2, Lifecycle::Active, 30).await;
        assert_eq!(sync(&fresh).await.unwrap(), 1);
        assert_eq!(
            archived(fresh.clone()).await,
            vec![(1, Lifecycle::Removed, 10), (2, Lifecycle::Active, 30)]
        );
        // Two gateways on one archive: one removes node 3, and the other,
        // whose index still holds the drain before it, does not write the
        // drain over the removal it never read.
        decide(empty, 3, Lifecycle::Removed, 60).await;
        assert_eq!(sync(&fresh).await.unwrap(), 1);
        decide(store, 3, Lifecycle::Draining, 50).await;
        assert_eq!(
            sync(&gw).await.unwrap(),
            0,
            "an older decision went over a newer one"
        );
        assert_eq!(
            archived(fresh).await,
            vec![
                (1, Lifecycle::Removed, 10),
                (2, Lifecycle::Active, 30),
                (3, Lifecycle::Removed, 60)
            ]
        );
    }

    /// The S3 journal reaches its archive whatever else runs on the index:
    /// a gateway without a ledger does not clear a journal kept for an
    /// archive (a tenant created meanwhile would be lost to recovery), and
    /// a journal file in the archive that does not decode stops no merge:
    /// the rest are merged, it is left for recovery to name.
    #[tokio::test]
    async fn the_s3_journal_is_kept_for_its_archive_and_merged_past_damage() {
        use crate::s3_journal;
        use indexer::s3;
        let dir = tempfile::tempdir().unwrap();
        let (store, gw) = with_ledger(dir.path());
        let ledger = gw.ledger.as_ref().unwrap();
        let tenant = |name: &'static str| {
            let store = store.clone();
            async move {
                indexer::run(&store, |tx| async move {
                    s3::create_tenant_tx(&tx, name, 1).await
                })
                .await
                .unwrap()
            }
        };
        let journaled = || {
            let store = store.clone();
            async move {
                indexer::run(&store, |tx| async move { s3::journal_tx(&tx, 100).await })
                    .await
                    .unwrap()
                    .len()
            }
        };
        // Never journaled for an archive: a ledger-less gateway clears it.
        tenant("first").await;
        assert_eq!(journaled().await, 1);
        let cleared = s3_journal::clear_without_ledger(&gw).await.unwrap();
        assert_eq!(cleared.map(|d| d.entries), Some(1));
        assert_eq!(journaled().await, 0);
        // From the seed's first batch on (here one of two records), it is
        // kept, and archived by a drain with the ledger.
        tenant("first-b").await;
        let first_batch = indexer::run(&store, |tx| async move {
            s3::seed_journal_tx(&tx, None, 1).await
        })
        .await
        .unwrap();
        assert!(first_batch.is_some(), "the seed is done in one batch");
        assert!(s3_journal::clear_without_ledger(&gw)
            .await
            .unwrap()
            .is_none());
        assert!(journaled().await >= 2, "cleared during the seed");
        s3_journal::seed(&gw, ledger).await.unwrap();
        tenant("second").await;
        assert!(s3_journal::clear_without_ledger(&gw)
            .await
            .unwrap()
            .is_none());
        assert_eq!(journaled().await, 1, "cleared without reaching the archive");
        for name in ["third", "fourth"] {
            s3_journal::drain(&gw, ledger).await.unwrap();
            tenant(name).await;
        }
        s3_journal::drain(&gw, ledger).await.unwrap();
        let damaged = format!(
            "{}/{:020}-{}-{}-{}",
            s3_journal::DIR,
            0,
            "00".repeat(10),
            "00".repeat(10),
            "00".repeat(8)
        );
        // Just under the size a merge takes at once, and first by name:
        // counted against that size, it left room for one other file, and
        // no merge ever had two.
        let mut garbage = vec![0xff; s3_journal::MERGE_SMALL_BYTES as usize - 1];
        garbage[0] = 1;
        ledger.archive_file(&damaged, garbage).await.unwrap();
        let merged = s3_journal::merge(ledger, 2).await.unwrap().expect("merged");
        // The seed's file, and one for each tenant since.
        assert_eq!(merged.files, 4, "{merged:?}");
        let names: Vec<String> = ledger
            .archived_names(s3_journal::DIR)
            .await
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.contains(&damaged), "{names:?}");
        match s3_journal::read_archived(ledger).await {
            Err(s3_journal::JournalError::File { name, .. }) => assert_eq!(name, damaged),
            other => panic!("recovery read past a damaged journal file: {other:?}"),
        }
        ledger.delete_archived(&damaged).await.unwrap();
        let (entries, _) = s3_journal::read_archived(ledger).await.unwrap();
        for name in ["first", "first-b", "second", "third", "fourth"] {
            assert!(
                entries.iter().any(|e| e.key.ends_with(name.as_bytes())),
                "tenant {name} is not in the archive"
            );
        }
    }

    /// A read's `accessed` statement is queued only while its evidence is
    /// visible, checked in the same transaction: once an expunge has
    /// committed, the read is refused (410) and nothing is queued, so the
    /// log never says evidence was accessed after it was expunged.
    #[tokio::test]
    async fn no_access_is_recorded_once_evidence_is_expunged() {
        let dir = tempfile::tempdir().unwrap();
        let (store, gw) = with_ledger(dir.path());
        let header = manifest(&gw, gw.clock.now_ms());
        let queued = || queued(&store);
        let read = |h: ManifestHeader| {
            let gw = gw.clone();
            async move {
                crate::api::record_access(&gw, &h, "court/clerk".into(), &(0..1), Duration::ZERO)
                    .await
            }
        };
        let h = header.clone();
        indexer::run(&store, |tx| {
            let h = &h;
            async move { schema::restore_manifest_tx(&tx, h) }
        })
        .await
        .unwrap();
        read(header.clone()).await.unwrap();
        assert_eq!(queued().await, 1, "a read of visible evidence is recorded");
        let now = gw.clock.now_ms();
        indexer::run(&store, |tx| async move {
            schema::expunge_tx(&tx, header.evidence, now).await
        })
        .await
        .unwrap();
        let before = queued().await;
        assert!(matches!(read(header).await, Err(ApiError::Gone)));
        assert_eq!(queued().await, before, "nothing queued after the expunge");
    }

    #[test]
    fn encoded_stripes_rebuild_from_any_k_shards() {
        let rs = ReedSolomon::new(4, 2).unwrap();
        let data: Vec<u8> = (0..10_001u32).map(|i| (i * 7) as u8).collect();
        let shard_len = data.len().div_ceil(4);
        let shards = encode_stripe(&rs, 4, 2, &data, shard_len, &BufferPool::new(0)).unwrap();
        assert_eq!(shards.len(), 6);
        let mut partial: Vec<Option<Vec<u8>>> = shards.into_iter().map(Some).collect();
        partial[0] = None;
        partial[3] = None;
        rs.reconstruct_data(&mut partial).unwrap();
        let rebuilt: Vec<u8> = partial[..4]
            .iter()
            .flat_map(|s| s.clone().unwrap())
            .collect();
        assert_eq!(&rebuilt[..data.len()], &data[..]);
        assert!(rebuilt[data.len()..].iter().all(|&b| b == 0));
    }

    /// Filled chunk by chunk, whatever the chunk boundaries, a full stripe's
    /// data shards are the stripe cut in k (what `encode_stripe` codes), and
    /// a short one comes back whole. A stripe given the room a declared
    /// length leaves takes no more, and its buffers hold no more.
    #[test]
    fn a_stripe_fills_its_shards_in_layout_order() {
        let pool = BufferPool::new(1 << 20);
        let (k, shard) = (4, 1000);
        let stripe = k * shard;
        let data: Vec<u8> = (0..10_500u32).map(|i| (i * 31 % 251) as u8).collect();
        for declared in [None, Some(data.len())] {
            let room = |placed: usize| declared.map_or(stripe, |d| (d - placed).min(stripe));
            for chunk in [1, 7, 999, 1000, 1001, 4000, 10_500] {
                let mut fill = StripeFill::new(k, shard, room(0));
                let mut full = Vec::new();
                let mut rest: &[u8] = &data;
                while !rest.is_empty() {
                    let piece = &rest[..chunk.min(rest.len())];
                    let mut at = 0;
                    while at < piece.len() {
                        at += fill.fill(&pool, &piece[at..]);
                        if fill.len == stripe {
                            let placed = (full.len() + 1) * stripe;
                            let done = std::mem::replace(
                                &mut fill,
                                StripeFill::new(k, shard, room(placed)),
                            );
                            full.push(done.shards);
                        }
                    }
                    rest = &rest[piece.len()..];
                }
                assert_eq!(full.len(), 2, "chunks of {chunk}");
                for (n, shards) in full.iter().enumerate() {
                    for (i, s) in shards.iter().enumerate() {
                        let at = n * k * shard + i * shard;
                        assert_eq!(&s[..], &data[at..at + shard], "chunks of {chunk}");
                    }
                }
                assert_eq!(fill.len, 2500);
                if declared.is_some() {
                    let held: usize = fill.shards.iter().map(Vec::capacity).sum();
                    assert_eq!(
                        held, 2500,
                        "the last stripe holds more than the body's rest"
                    );
                    assert_eq!(
                        fill.fill(&pool, b"x"),
                        0,
                        "a byte past the declared length was taken"
                    );
                }
                assert_eq!(fill.into_tail(&pool), &data[8000..], "chunks of {chunk}");
            }
        }
    }
}
