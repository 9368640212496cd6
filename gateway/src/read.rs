//! The verified read path.
//!
//! For each stripe a range touches: ask the `k` data shards' nodes, take the
//! first `k` shards that arrive whole, asking parity shards' nodes when a
//! shard is missing, corrupt or slower than the hedge delay; rebuild the data
//! shards with Reed-Solomon when a data shard is not among them; and queue the
//! stripe for repair when a shard was missing or corrupt. Stripes are fetched
//! `pipeline_stripes` ahead of the client, and no more than
//! `read_stripes_in_flight` are fetched at once across all reads.
//!
//! Every read is checked against the content root itself, in one BLAKE3 pass:
//! it is widened to whole 1 MiB groups, and each group is hashed as it
//! arrives and sent only once it matches the chaining value the Bao outboard
//! (`protocol::bao`) gives for it, verified down from the root. So the
//! nodes do not hash the data shards they serve to a read (they check each
//! one's header and length); parity shards are hashed by their node and
//! against the manifest here before a rebuild uses them. A group that fails
//! is read again with every shard hashed by its node and checked against the
//! manifest, which has the node quarantine and report a shard damaged on
//! its disk, finds a shard a node served wrong under a right header, and
//! rebuilds without it (and the rest of the read then checks every shard); a group
//! still wrong ends the read with an error, so no client ever receives a
//! byte that does not verify. Evidence without a usable outboard (filed
//! before outboards were kept, or restored by `recover-index` while a node
//! was down) is read whole, even for a `Range`: every shard is checked and
//! the content hashed against the root as it streams, the last bytes the
//! client asked for held back until it matches. That pass also rebuilds the
//! outboard, which is stored once the root matches, so later ranges are
//! checked group by group again.

use crate::api::Gateway;
use crate::api::Store;
use bytes::Bytes;
use futures::channel::mpsc;
use futures::stream::FuturesUnordered;
use futures::{SinkExt, Stream, StreamExt};
use indexer::schema;
use protocol::bao;
use protocol::{Blake3Hash, ErrorCode, EvidenceId, ManifestHeader, ShardKey, StripeRecord};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use storage_node::client::NodeError;

/// Stripe records read per index transaction.
const STRIPES_PER_TXN: u64 = 1024;
/// The first batch of a long read's stripe records, before its pace is
/// known (see `send_range`).
const FIRST_STRIPES_PER_TXN: u64 = 16;

/// Why a read could not be completed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Fewer than `k` good shards of a stripe could be found.
    #[error("stripe {stripe} of {evidence}: only {good} good shards of the {k} needed")]
    Unrecoverable {
        evidence: EvidenceId,
        stripe: u64,
        good: usize,
        k: usize,
    },
    /// The index could not be read.
    #[error("index: {0}")]
    Index(#[from] schema::SchemaError),
    /// Reassembled content does not hash to the content root.
    #[error("content of {0} does not match its content root")]
    RootMismatch(EvidenceId),
    /// Reconstruction failed (a bug: shards had been verified).
    #[error("reconstruction failed: {0:?}")]
    Reconstruct(reed_solomon_erasure::Error),
    #[error("internal task failed")]
    Internal,
    /// The evidence was expunged while it was being read.
    #[error("{0} was expunged during the read")]
    Expunged(EvidenceId),
    /// The stored Bao outboard is missing values, does not decode, or does
    /// not verify against the content root: the content may be intact.
    #[error("the stored outboard of {0} cannot be used (it is rebuilt by the next read)")]
    BadOutboard(EvidenceId),
}

/// Every `reason` label of `custodia_reads_failed_total` (each exported
/// from the start, see `metrics`).
pub const READ_FAILURE_REASONS: [&str; 6] = [
    "unrecoverable",
    "index",
    "root_mismatch",
    "internal",
    "expunged",
    "bad_outboard",
];

impl ReadError {
    /// `custodia_reads_failed_total`'s `reason` label (one of
    /// [`READ_FAILURE_REASONS`]).
    pub fn reason(&self) -> &'static str {
        match self {
            ReadError::Unrecoverable { .. } => "unrecoverable",
            ReadError::Index(_) => "index",
            ReadError::RootMismatch(_) => "root_mismatch",
            ReadError::Reconstruct(_) | ReadError::Internal => "internal",
            ReadError::Expunged(_) => "expunged",
            ReadError::BadOutboard(_) => "bad_outboard",
        }
    }
}

impl From<ReadError> for crate::error::ApiError {
    fn from(e: ReadError) -> Self {
        use crate::error::ApiError;
        match e {
            ReadError::Unrecoverable { .. } => ApiError::Unavailable(e.to_string()),
            ReadError::Index(e) => ApiError::Index(e),
            ReadError::Expunged(_) => ApiError::Gone,
            ReadError::RootMismatch(_)
            | ReadError::BadOutboard(_)
            | ReadError::Reconstruct(_)
            | ReadError::Internal => {
                tracing::error!(error = %e, "read failed");
                ApiError::Internal
            }
        }
    }
}

/// Evidence up to this size is read whole and checked against its content
/// root before any byte is answered ([`read_small`]); larger evidence is
/// streamed ([`stream_range`]).
pub const SMALL_READ_BYTES: u64 = 1 << 20;

/// Bytes `range` of `header`'s content (at most [`SMALL_READ_BYTES`]),
/// verified before it is returned: the whole content is fetched and hashed
/// against its content root. So a failed small read is an error status, not
/// a response cut off part way, and it needs no Bao outboard lookups, no
/// task and no channel to the client.
pub async fn read_small<S: Store>(
    gw: &Arc<Gateway<S>>,
    header: &ManifestHeader,
    range: Range<u64>,
) -> Result<Bytes, ReadError> {
    let (mut tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let fetch = async move {
        let fetched =
            send_range(gw, header, 0..header.size, &mut tx, None, Visible::Evidence).await;
        drop(tx); // ends the collection below
        fetched
    };
    let (fetched, pieces) = futures::join!(fetch, rx.collect::<Vec<_>>());
    fetched?;
    let mut pieces = pieces
        .into_iter()
        .collect::<Result<Vec<Bytes>, _>>()
        .map_err(|_| ReadError::Internal)?;
    let content = if pieces.len() == 1 {
        pieces.pop().unwrap_or_default()
    } else {
        Bytes::from(pieces.concat())
    };
    if content.len() as u64 != header.size || range.end > header.size || range.start > range.end {
        return Err(ReadError::Internal);
    }
    // Held until the client has it (its stripes' memory went back as they
    // were read), charged as a stream's bytes are (see `deliver`): taken
    // while holding nothing else, so the wait cannot be on itself.
    let memory = read_memory(gw, content.len()).await;
    Ok(Bytes::from_owner(Charged {
        bytes: content.slice(range.start as usize..range.end as usize),
        _memory: Arc::new(memory),
    }))
}

/// Streams bytes `range` of `header`'s content, verified. `idle`: for a
/// client's read, how long it may take nothing before the read is
/// abandoned (see [`deliver`]); `None` for the cluster's own reads (copies),
/// which wait for their consumer however long it takes.
///
/// A stream that ends short of the range, for whatever reason, ends with an
/// error rather than quietly: a copy must never file a prefix as the whole.
pub fn stream_range<S: Store>(
    gw: Arc<Gateway<S>>,
    header: ManifestHeader,
    range: Range<u64>,
    idle: Option<std::time::Duration>,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> {
    stream(gw, header, range, idle, Visible::Evidence)
}

/// [`stream_range`] of a multipart part (`header` made from its record),
/// which has no manifest: read to complete its upload.
pub fn stream_part<S: Store>(
    gw: Arc<Gateway<S>>,
    header: ManifestHeader,
    range: Range<u64>,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> {
    stream(gw, header, range, None, Visible::Part)
}

/// What is read: evidence, which stops being readable once expunged, or a
/// multipart part, which has no manifest to look at.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Visible {
    Evidence,
    Part,
}

fn stream<S: Store>(
    gw: Arc<Gateway<S>>,
    header: ManifestHeader,
    range: Range<u64>,
    idle: Option<std::time::Duration>,
    what: Visible,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> {
    let (mut tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    // Evidence served is what clients read; the cluster's own reads (a
    // copy, a multipart completion: `idle` None) serve nobody.
    let served = idle.map(|_| gw.metrics.read_bytes.clone());
    let want = range.end.saturating_sub(range.start);
    let got = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = got.clone();
    tokio::spawn(async move {
        if let Err(e) = send_range(&gw, &header, range, &mut tx, idle, what).await {
            tracing::error!(evidence = %header.evidence, error = %e, "read failed");
            // The error itself, which a reader that has sent nothing yet
            // turns into its status (`io::Error::downcast`).
            let _ = tx.send(Err(std::io::Error::other(e))).await;
        }
    });
    let short = futures::stream::once(async move {
        let got = counted.load(Ordering::Relaxed);
        (got < want).then(|| {
            Err(std::io::Error::other(format!(
                "the read ended after {got} of {want} bytes"
            )))
        })
    })
    .filter_map(futures::future::ready);
    rx.inspect(move |piece| {
        if let Ok(bytes) = piece {
            got.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            if let Some(served) = &served {
                served.inc_by(bytes.len() as u64);
            }
        }
    })
    .chain(short)
}

async fn send_range<S: Store>(
    gw: &Arc<Gateway<S>>,
    header: &ManifestHeader,
    range: Range<u64>,
    tx: &mut mpsc::Sender<Result<Bytes, std::io::Error>>,
    idle: Option<std::time::Duration>,
    what: Visible,
) -> Result<(), ReadError> {
    let sent = send_range_of(gw, header, range, tx, idle, what).await;
    let sent = match sent {
        Err(e) if what == Visible::Evidence && !matches!(e, ReadError::Expunged(_)) => {
            // Evidence expunged while it was read loses its shards, stripe
            // records and outboard under the read, which then fails in
            // whatever way it met that first (shards missing, a record or
            // outboard gone): it is the 410 it is, not damage.
            let evidence = header.evidence;
            let visible = indexer::run(&gw.store, |t| async move {
                schema::get_manifest_tx(&t, evidence).await
            })
            .await;
            if matches!(visible, Ok(None)) {
                tracing::info!(%evidence, error = %e, "evidence expunged while it was read; the read stops");
                return Err(ReadError::Expunged(evidence));
            }
            Err(e)
        }
        sent => sent,
    };
    // Counted however far the read got: one that fails after its answer's
    // head (a stripe lost mid-stream, content not matching its root) is a
    // 200 in the request counts, and a cut-off body to its client.
    if let Err(e) = &sent {
        gw.metrics
            .reads_failed
            .with_label_values(&[e.reason()])
            .inc();
    }
    sent
}

async fn send_range_of<S: Store>(
    gw: &Arc<Gateway<S>>,
    header: &ManifestHeader,
    range: Range<u64>,
    tx: &mut mpsc::Sender<Result<Bytes, std::io::Error>>,
    idle: Option<std::time::Duration>,
    what: Visible,
) -> Result<(), ReadError> {
    if header.size == 0 {
        // No group to check: the root must be that of no bytes.
        return if Blake3Hash::of(&[]) == header.blake3 {
            Ok(())
        } else {
            Err(ReadError::RootMismatch(header.evidence))
        };
    }
    // Whole 1 MiB groups are read, and each is checked against the content
    // root (through the Bao outboard) before any byte of it is sent.
    let mut read = bao::group_aligned(range.clone(), header.size);
    let mut check = GroupCheck::new(header, read.start);
    let mut _rebuilding = None;
    if !check.has_outboard(gw, header).await? {
        // One read per evidence rebuilds it; the others wait for that one
        // and then find the outboard.
        let slot = rebuild_slot(gw, header.evidence).lock_owned().await;
        // Its reader gone while it waited (a client's timeout): no rebuild
        // for nobody. Only a rebuild begun for a reader goes on without it.
        if tx.is_closed() {
            return Ok(());
        }
        check = GroupCheck::new(header, read.start);
        if !check.has_outboard(gw, header).await? {
            tracing::warn!(evidence = %header.evidence, "no usable Bao outboard; reading the whole content against its root to rebuild it");
            // Every byte is read and hashed against the root, which also
            // rebuilds the outboard.
            read = 0..header.size;
            check = GroupCheck::whole(header);
            _rebuilding = Some(slot);
        }
    }
    let strict = check.strict.clone();
    // With no outboard, the piece holding the range's last byte waits for
    // the root to match (unless it is the content's last piece, which
    // `accept` returns only after it matched).
    let mut last_piece = None;
    let layout = header.code.layout(header.size);
    let stripes = layout.stripes_for(read.clone());
    let evidence = header.evidence;
    // Shared by the fetch tasks.
    let shared = Arc::new(header.clone());
    let mut first = stripes.start;
    // The reader went away (or stopped taking bytes). A read rebuilding the
    // outboard goes on to its end without it: the next reader (a client's
    // retry waits for this rebuild) then finds the outboard, instead of
    // starting over from byte 0 and, if it too gives up before the whole
    // content is read (a range of 100 GiB recovered evidence, a 60 s client
    // timeout), never getting an answer.
    let mut gone = false;
    // Stripe records are read a batch at a time, each batch no older, by
    // the time its last stripe is fetched, than a fraction of the grace
    // repair gives old copies (`repair_old_copy_grace_ms`): a slow client
    // must not be read from placements repair has since moved and deleted.
    // The batch starts small and follows the pace the client keeps.
    let fresh_for = Duration::from_millis(gw.config.repair_old_copy_grace_ms / 4);
    let mut per_txn = FIRST_STRIPES_PER_TXN;
    // Evidence expunged while it streams (its stripe records stay until its
    // shards are deleted) stops at the next batch, or at the first if it
    // went since its manifest was read. A multipart part, read to complete
    // its upload, has no manifest of its own to look at.
    while first < stripes.end {
        let loaded = std::time::Instant::now();
        // A client gone while nothing was sent (a rebuild reading past its
        // range) is noticed here.
        if tx.is_closed() && !gone {
            if !check.rebuilding() {
                return Ok(());
            }
            tracing::info!(%evidence, "the reader went away; reading on to finish the outboard");
            gone = true;
            tx.close_channel();
        }
        let last = (first + per_txn).min(stripes.end);
        let (records, now_visible) = indexer::run(&gw.store, |t| async move {
            // Visibility first: an expunge forgets the stripe records once
            // their shards are deleted, and reading them then would fail as
            // a damaged index (500) rather than as the 410 it is.
            let visible = schema::get_manifest_tx(&t, evidence).await?.is_some();
            if what == Visible::Evidence && !visible {
                return Ok((Vec::new(), false));
            }
            let records = schema::get_stripes_tx(&t, evidence, first..last).await?;
            Ok::<_, schema::SchemaError>((records, visible))
        })
        .await?;
        if what == Visible::Evidence && !now_visible {
            tracing::info!(%evidence, "evidence expunged while it was read; the read stops");
            return Err(ReadError::Expunged(evidence));
        }
        let mut fetched =
            std::pin::pin!(futures::stream::iter(records.into_iter().zip(first..last))
                // The memory each stripe holds until its bytes are handed over,
                // taken before its fetch starts (a read waiting for it holds no
                // fetch slot), one stripe after another: what a read holds is
                // always its next stripes, never later ones while the next
                // waits, which could leave every read waiting on another's.
                .then(|(rec, stripe)| {
                    let (gw, header) = (gw.clone(), shared.clone());
                    async move {
                        let code = header.code;
                        let stripe_data = code.data_shards() * code.shard_size as usize;
                        (rec, stripe, read_memory(&gw, stripe_data).await)
                    }
                })
                .map(|(rec, stripe, memory)| {
                    let (gw, strict, header) = (gw.clone(), strict.clone(), shared.clone());
                    // A task of its own: a fetch runs to its end, and gives its
                    // gate permit back, however slowly this read's client takes
                    // what came before (an unpolled fetch would hold the permit
                    // from every other read, and its node requests would time
                    // out unread).
                    fetch_task(async move {
                        // Taken in turn (the semaphore is fair): a large read
                        // never holds back another for more than a few fetches.
                        let permit = gw.read_gate.acquire().await.ok();
                        let shards = if strict.load(Ordering::Relaxed) {
                            ShardCheck::All
                        } else {
                            ShardCheck::Parity
                        };
                        // Waited for memory and a permit past the records'
                        // freshness (an overloaded gateway): read afresh,
                        // or repair may have deleted the copies it names,
                        // and their rebuild from parity would send a
                        // healthy stripe back to repair as damaged.
                        let mut rec = rec;
                        if loaded.elapsed() > fresh_for {
                            let evidence = header.evidence;
                            let now = indexer::run(&gw.store, |t| async move {
                                schema::get_stripe_tx(&t, evidence, stripe).await
                            })
                            .await;
                            if let Ok(Some(now)) = now {
                                rec = now;
                            }
                        }
                        let mut data = fetch_stripe(&gw, &header, stripe, &rec, shards).await;
                        if matches!(data, Err(ReadError::Unrecoverable { .. })) {
                            // Repair may have moved shards since this record was
                            // read (and deleted the old copies after its grace,
                            // which a slow client can outlast): read the stripe
                            // again from its record as it is now.
                            let evidence = header.evidence;
                            let now = indexer::run(&gw.store, |t| async move {
                                schema::get_stripe_tx(&t, evidence, stripe).await
                            })
                            .await;
                            if let Ok(Some(now)) = now {
                                if now != rec {
                                    data = fetch_stripe(&gw, &header, stripe, &now, shards).await;
                                }
                            }
                        }
                        drop(permit);
                        let data = data?;
                        Ok::<_, ReadError>((stripe, data, memory))
                    })
                })
                .buffered(gw.config.pipeline_stripes));
        // Where the next batch starts: past the last stripe handled, once
        // this batch is stale (see below); else where this one ends.
        let mut next_first = last;
        while let Some(next) = fetched.next().await {
            // The stripe's memory goes back, a piece's share at a time,
            // once the bytes handed over with that piece are gone: sent to
            // the client, or dropped with its connection (see `Charged`).
            let (stripe, pieces, mut memory) = next?;
            let count = pieces.len();
            // The stripe's data, piece by piece (a data shard each).
            let mut at = layout.stripe_range(stripe).start;
            for (n, piece) in pieces.into_iter().enumerate() {
                // This piece's share (the last takes what is left): a
                // slice a slow client holds keeps its piece's buffer, not
                // the whole stripe's.
                let share = match memory.as_mut() {
                    Some(_) if n + 1 == count => memory.take(),
                    Some(m) => m.split(piece.len().div_ceil(1024).min(m.num_permits())),
                    None => None,
                };
                let share = Arc::new(share);
                let end = at + piece.len() as u64;
                let from = read.start.clamp(at, end) - at;
                let to = read.end.clamp(at, end) - at;
                if from < to {
                    let slice = piece.slice(from as usize..to as usize);
                    let ready = check.accept(gw, header, at + from, slice).await?;
                    if let Some(pairs) = check.rebuilt.take() {
                        // Stored before the last bytes go: once the client
                        // has them all, the outboard is back.
                        store_outboard(gw, evidence, &pairs).await;
                    }
                    for (at, bytes) in ready {
                        let reaches_end = at + bytes.len() as u64 >= range.end;
                        let want = clip(&range, at, bytes);
                        if want.is_empty() {
                            continue;
                        }
                        if gone {
                            continue;
                        }
                        if check.rebuilding() && reaches_end && check.at < header.size {
                            last_piece = Some(want);
                        } else if !deliver(evidence, tx, want, idle, &share).await {
                            if !check.rebuilding() {
                                return Ok(());
                            }
                            tracing::info!(%evidence, "the reader went away; reading on to finish the outboard");
                            gone = true;
                            // Ended for the client now (short of its length,
                            // as an abandoned read's is), not when the
                            // rebuild is done; nor does an error later wait
                            // on a reader that is not there.
                            tx.close_channel();
                        }
                    }
                }
                at = end;
            }
            // A client slower than the pace this batch was sized for must
            // not be read from records older than `fresh_for` (repair may
            // have moved and deleted their copies, an expunge may have
            // ordered the bytes destroyed): the rest of the batch is read
            // from records loaded afresh, the evidence's visibility checked
            // again. Fetches under way for it are dropped.
            if loaded.elapsed() > fresh_for && stripe + 1 < last {
                next_first = stripe + 1;
                break;
            }
        }
        let per_stripe = loaded.elapsed() / ((next_first - first).max(1) as u32);
        per_txn = (fresh_for.as_nanos() / per_stripe.as_nanos().max(1)).clamp(
            u128::from(FIRST_STRIPES_PER_TXN),
            u128::from(STRIPES_PER_TXN),
        ) as u64;
        first = next_first;
    }
    if check.at != read.end {
        tracing::error!(%evidence, at = check.at, end = read.end, "read ended short of its range");
        return Err(ReadError::Internal);
    }
    if let Some(piece) = last_piece.filter(|_| !gone) {
        // Its stripes' memory went back as the whole pass went on.
        deliver(evidence, tx, piece, idle, &Arc::new(None)).await;
    }
    Ok(())
}

/// The gateway's read memory for `bytes` (a stripe's k data shards, or a
/// small read's content), waited for while other reads hold it all (`None`
/// only once the gateway is stopping).
async fn read_memory<S: Store>(
    gw: &Gateway<S>,
    bytes: usize,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    // Never more than the whole budget (a code with larger stripes than
    // the gateway's own, filed before its settings changed).
    let kib = bytes.div_ceil(1024).clamp(1, gw.read_memory_kib);
    let kib = u32::try_from(kib).unwrap_or(u32::MAX);
    let gate = gw.read_memory.clone();
    if let Ok(permit) = gate.clone().try_acquire_many_owned(kib) {
        return Some(permit);
    }
    gw.metrics.read_memory_waits.inc();
    gate.acquire_many_owned(kib).await.ok()
}

/// A spawned fetch, aborted when the read that wanted it is dropped (its
/// client went away): its result is nobody's.
fn fetch_task<T: Send + 'static>(
    fetch: impl std::future::Future<Output = Result<T, ReadError>> + Send + 'static,
) -> impl std::future::Future<Output = Result<T, ReadError>> {
    futures::FutureExt::map(
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(fetch)),
        |joined| {
            joined.unwrap_or_else(|e| {
                tracing::error!(error = %e, "a stripe fetch task failed");
                Err(ReadError::Internal)
            })
        },
    )
}

/// Slices a client's read is handed over in: the idle limit is measured
/// per slice, so a client that reads slowly but steadily is not cut off
/// because a whole 1 MiB piece took it longer than the limit.
const DELIVER_SLICE: usize = 256 * 1024;

/// Hands `piece` to the reader. False when the reader went away, or (with
/// `idle`, a client's read) took none of a [`DELIVER_SLICE`] for `idle`:
/// the read is then abandoned (the response ends short of its length), so
/// a client that stops reading with its connection open does not hold the
/// read's stripes, nor an outboard rebuild that other readers of the
/// evidence wait for.
///
/// What is handed to a client holds `memory` (its stripe's read memory)
/// until the HTTP layer has sent or dropped it: what a slow client has not
/// taken yet (in this read's channel, in the response being written) is
/// still charged to the read budget, or thousands of stalled connections
/// would each hold stripes outside it. The cluster's own reads (a copy's
/// source) are not: their reader files what it takes, under the receive
/// budget, and a filing holding one budget while it waits for the other
/// could wait on a copy doing the opposite.
async fn deliver(
    evidence: EvidenceId,
    tx: &mut mpsc::Sender<Result<Bytes, std::io::Error>>,
    piece: Bytes,
    idle: Option<std::time::Duration>,
    memory: &Arc<Option<tokio::sync::OwnedSemaphorePermit>>,
) -> bool {
    let charged = |bytes: Bytes| {
        Bytes::from_owner(Charged {
            bytes,
            _memory: memory.clone(),
        })
    };
    let Some(idle) = idle else {
        return tx.send(Ok(piece)).await.is_ok();
    };
    let mut at = 0;
    while at < piece.len() {
        let end = (at + DELIVER_SLICE).min(piece.len());
        match tokio::time::timeout(idle, tx.send(Ok(charged(piece.slice(at..end))))).await {
            Ok(Ok(())) => at = end,
            Ok(Err(_)) => return false,
            Err(_) => {
                tracing::warn!(%evidence, idle_s = idle.as_secs_f64(), "the reader took nothing for client_idle_timeout_ms; read abandoned");
                return false;
            }
        }
    }
    true
}

/// Bytes handed to a reader, with the read memory that covers them: given
/// back when the last of them is dropped.
struct Charged {
    bytes: Bytes,
    _memory: Arc<Option<tokio::sync::OwnedSemaphorePermit>>,
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// The lock a read holds while it rebuilds `evidence`'s outboard.
fn rebuild_slot<S: Store>(gw: &Gateway<S>, evidence: EvidenceId) -> Arc<tokio::sync::Mutex<()>> {
    let mut slots = gw
        .outboard_rebuilds
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(slot) = slots.get(&evidence).and_then(std::sync::Weak::upgrade) {
        return slot;
    }
    slots.retain(|_, slot| slot.strong_count() > 0);
    let slot = Arc::new(tokio::sync::Mutex::new(()));
    slots.insert(evidence, Arc::downgrade(&slot));
    slot
}

/// Stores an outboard a read rebuilt (its root matched the manifest's), in
/// transactions of a few thousand pairs, each only while the evidence is
/// still visible (not expunged meanwhile). The first clears whatever
/// unusable pairs were there, and the pairs go in the order they were
/// built, which ends with the root's own pair
/// ([`bao::OutboardBuilder::finish`]): a store cut short (a crash, an index
/// error, logged, not the read's) verifies no group, so the next read
/// rebuilds it again rather than failing part way on a half outboard.
async fn store_outboard<S: Store>(
    gw: &Gateway<S>,
    evidence: EvidenceId,
    pairs: &[(u64, bao::HashPair)],
) {
    for (i, chunk) in pairs.chunks(4096).enumerate() {
        let stored = indexer::run(&gw.store, |tx| async move {
            let visible = schema::get_manifest_tx(&tx, evidence).await?.is_some();
            if visible {
                if i == 0 {
                    schema::clear_outboard_tx(&tx, evidence);
                }
                schema::put_outboard_pairs_tx(&tx, evidence, chunk);
            }
            Ok::<_, schema::SchemaError>(visible)
        })
        .await;
        match stored {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::warn!(%evidence, error = %e, "could not store the rebuilt Bao outboard");
                return;
            }
        }
    }
    tracing::info!(%evidence, pairs = pairs.len(), "rebuilt and stored the Bao outboard");
}

/// The part of `bytes` (which start at content offset `at`) inside `range`.
fn clip(range: &Range<u64>, at: u64, mut bytes: Bytes) -> Bytes {
    let end = at + bytes.len() as u64;
    let from = range.start.clamp(at, end) - at;
    let to = range.end.clamp(at, end) - at;
    bytes.truncate(to as usize);
    bytes.split_off(from as usize)
}

/// Groups whose expected chaining values are loaded per index transaction.
const GROUPS_PER_LOAD: u64 = 64;

/// Checks a read's bytes against the content root one 1 MiB group at a time,
/// in the one BLAKE3 pass the read makes over them: each group is hashed as
/// its pieces arrive and held (shared, not copied) until its chaining value
/// matches the one the Bao outboard gives for it, verified down from the root
/// ([`bao::expected_group_cvs`]). Data shards are therefore not hashed one by
/// one on the way in ([`ShardCheck::Parity`]); a group that fails is read again
/// with every shard checked against the manifest ([`GroupCheck::recheck_group`]), which
/// finds the bad shard, rebuilds without it and queues its stripe for repair.
struct GroupCheck {
    size: u64,
    root: [u8; 32],
    /// The group being received, and its hash so far.
    group: u64,
    hasher: bao::GroupHasher,
    /// Its pieces so far, with their content offsets.
    held: Vec<(u64, Bytes)>,
    /// Content offset of the next byte expected.
    at: u64,
    /// Expected chaining values of the groups loaded so far.
    expected: HashMap<u64, [u8; 32]>,
    /// Set once a group has failed: the read's later stripes are fetched with
    /// every shard checked ([`ShardCheck::All`]), since a node that served
    /// one wrong shard may serve more.
    strict: Arc<AtomicBool>,
    /// Stripes the last [`recheck_group`](Self::recheck_group) fetched that
    /// reach into the next group (a stripe of several groups is fetched and
    /// checked once, not once per group).
    checked: Vec<(u64, Vec<Bytes>)>,
    /// Set for a read of evidence without a usable outboard (filed before
    /// outboards were kept, or restored by `recover-index` while a node was
    /// down): the whole content is hashed against the root instead, every
    /// shard checked, and the outboard rebuilt on the way.
    whole: Option<Box<bao::OutboardBuilder>>,
    /// The outboard pairs `whole` rebuilt, once the root matched.
    rebuilt: Option<Vec<(u64, bao::HashPair)>>,
}

impl GroupCheck {
    /// For a read starting at `start`, a group boundary.
    fn new(header: &ManifestHeader, start: u64) -> Self {
        let group = start / bao::GROUP_SIZE;
        GroupCheck {
            size: header.size,
            root: header.blake3.0,
            group,
            hasher: bao::GroupHasher::new(header.size, group),
            held: Vec::new(),
            at: start,
            expected: HashMap::new(),
            strict: Arc::new(AtomicBool::new(false)),
            checked: Vec::new(),
            whole: None,
            rebuilt: None,
        }
    }

    /// For a whole read of evidence without a usable outboard: the content
    /// is hashed against the root as it streams (and the outboard rebuilt),
    /// every shard checked against the manifest.
    fn whole(header: &ManifestHeader) -> Self {
        let check = GroupCheck {
            whole: Some(Box::new(bao::OutboardBuilder::new())),
            ..GroupCheck::new(header, 0)
        };
        check.strict.store(true, Ordering::Relaxed);
        check
    }

    /// Whether the stored outboard gives the first group's value (loading
    /// it); false when it is missing or does not verify against the root.
    async fn has_outboard<S: Store>(
        &mut self,
        gw: &Gateway<S>,
        header: &ManifestHeader,
    ) -> Result<bool, ReadError> {
        match self.expected_cv(gw, header).await {
            Ok(_) => Ok(true),
            Err(ReadError::BadOutboard(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether this read is rebuilding the outboard (see [`Self::whole`]).
    fn rebuilding(&self) -> bool {
        self.whole.is_some()
    }

    /// Takes the next bytes (at content offset `at`); returns those that may
    /// be sent now, in order.
    async fn accept<S: Store>(
        &mut self,
        gw: &Arc<Gateway<S>>,
        header: &ManifestHeader,
        at: u64,
        mut bytes: Bytes,
    ) -> Result<Vec<(u64, Bytes)>, ReadError> {
        if at != self.at {
            tracing::error!(evidence = %header.evidence, at, expected = self.at, "read pieces out of order");
            return Err(ReadError::Internal);
        }
        if let Some(h) = &mut self.whole {
            h.update(&bytes);
            let at = self.at;
            self.at += bytes.len() as u64;
            // The final bytes go only once the root matches: a response cut
            // short of its Content-Length, never a wrong complete download.
            if self.at == self.size {
                let (root, pairs) = self.whole.take().map(|h| h.finish()).unwrap_or_default();
                if root != self.root {
                    return Err(ReadError::RootMismatch(header.evidence));
                }
                self.rebuilt = Some(pairs);
            }
            return Ok(vec![(at, bytes)]);
        }
        let mut ready = Vec::new();
        while !bytes.is_empty() {
            let end = bao::group_range(self.size, self.group).end;
            let take = bytes.len().min((end - self.at) as usize);
            let part = bytes.split_to(take);
            self.hasher.update(&part);
            self.held.push((self.at, part));
            self.at += take as u64;
            if self.at < end {
                continue;
            }
            let good = match self.expected_cv(gw, header).await {
                Ok(good) => good,
                // Past the window the read began with: its bytes so far
                // went out, so this read cannot turn into a whole one. It
                // ends, and the outboard is cleared for the next read to
                // rebuild (it is derived from the content, which may well
                // be intact): not a content-root alarm, and not every read
                // failing here for good.
                Err(ReadError::BadOutboard(evidence)) => {
                    // Not while a read rebuilds it: that one writes the new
                    // outboard in chunks (clearing before the first), and a
                    // clear between two chunks would leave it partial. The
                    // slot is held across the clear, so a rebuild starting
                    // now finds the outboard gone, as it should.
                    let slot = rebuild_slot(gw, evidence);
                    if let Ok(_slot) = slot.try_lock() {
                        let cleared = indexer::run(&gw.store, |t| async move {
                            schema::clear_outboard_tx(&t, evidence);
                            Ok::<_, schema::SchemaError>(())
                        })
                        .await;
                        if let Err(e) = cleared {
                            tracing::warn!(%evidence, error = %e, "could not clear an outboard that does not verify");
                        }
                    }
                    return Err(ReadError::BadOutboard(evidence));
                }
                Err(e) => return Err(e),
            };
            if self.hasher.finish() == good {
                ready.append(&mut self.held);
            } else {
                self.held.clear();
                self.strict.store(true, Ordering::Relaxed);
                let start = bao::group_range(self.size, self.group).start;
                ready.push((start, self.recheck_group(gw, header, good).await?));
            }
            self.group += 1;
            self.hasher = bao::GroupHasher::new(self.size, self.group);
        }
        Ok(ready)
    }

    /// The chaining value the current group must hash to, loading the next
    /// [`GROUPS_PER_LOAD`] groups' values when it is not known yet.
    async fn expected_cv<S: Store>(
        &mut self,
        gw: &Gateway<S>,
        header: &ManifestHeader,
    ) -> Result<[u8; 32], ReadError> {
        if let Some(cv) = self.expected.get(&self.group) {
            return Ok(*cv);
        }
        let groups = self.group..(self.group + GROUPS_PER_LOAD).min(bao::group_count(self.size));
        let bytes = bao::group_range(self.size, groups.start).start
            ..bao::group_range(self.size, groups.end - 1).end;
        let needed = bao::nodes_for(self.size, bytes);
        let pairs = if needed.is_empty() {
            HashMap::new() // a single group: its value is the root
        } else {
            let evidence = header.evidence;
            match indexer::run(&gw.store, |t| {
                let needed = &needed;
                async move { schema::get_outboard_pairs_tx(&t, evidence, needed).await }
            })
            .await
            {
                Ok(pairs) => pairs.into_iter().collect(),
                // A stored value that does not decode is an outboard that
                // cannot be used, like one that does not verify: the read
                // goes the whole way and rebuilds it, rather than failing
                // every read of the evidence for good.
                Err(schema::SchemaError::Decode(e)) => {
                    tracing::error!(evidence = %header.evidence, error = %e, "the stored outboard does not decode");
                    return Err(ReadError::BadOutboard(header.evidence));
                }
                Err(e) => return Err(e.into()),
            }
        };
        let expected = bao::expected_group_cvs(&self.root, self.size, &pairs, groups)
            .map_err(|e| {
                tracing::error!(evidence = %header.evidence, error = %e, "the stored outboard does not verify against the content root");
                ReadError::BadOutboard(header.evidence)
            })?;
        // Only the window's values are kept: the map stays small however
        // long the read.
        self.expected = expected.into_iter().collect();
        self.expected
            .get(&self.group)
            .copied()
            .ok_or(ReadError::BadOutboard(header.evidence))
    }

    /// Reads the current group again from shards each checked against the
    /// manifest, after its bytes failed the content root: a node that served
    /// wrong bytes under a right header is found this way (its stripe is
    /// queued for repair and rebuilt around it). The group must then hash to
    /// `good`.
    async fn recheck_group<S: Store>(
        &mut self,
        gw: &Arc<Gateway<S>>,
        header: &ManifestHeader,
        good: [u8; 32],
    ) -> Result<Bytes, ReadError> {
        let (evidence, group) = (header.evidence, self.group);
        tracing::warn!(%evidence, group, "group does not match the content root; reading it again with every shard checked");
        let bytes = bao::group_range(header.size, group);
        let layout = header.code.layout(header.size);
        let stripes = layout.stripes_for(bytes.clone());
        let mut kept = std::mem::take(&mut self.checked);
        kept.retain(|(stripe, _)| stripes.contains(stripe));
        let missing: Vec<u64> = stripes
            .clone()
            .filter(|s| !kept.iter().any(|(k, _)| k == s))
            .collect();
        if let (Some(&first), Some(&last)) = (missing.first(), missing.last()) {
            let records = indexer::run(&gw.store, |t| async move {
                schema::get_stripes_tx(&t, evidence, first..last + 1).await
            })
            .await?;
            for (rec, stripe) in records.iter().zip(first..last + 1) {
                if missing.contains(&stripe) {
                    let pieces = fetch_stripe(gw, header, stripe, rec, ShardCheck::All).await?;
                    kept.push((stripe, pieces));
                }
            }
        }
        kept.sort_by_key(|(stripe, _)| *stripe);
        let mut out = Vec::with_capacity((bytes.end - bytes.start) as usize);
        for (stripe, pieces) in &kept {
            let mut at = layout.stripe_range(*stripe).start;
            for piece in pieces {
                let end = at + piece.len() as u64;
                let from = bytes.start.clamp(at, end) - at;
                let to = bytes.end.clamp(at, end) - at;
                out.extend_from_slice(&piece[from as usize..to as usize]);
                at = end;
            }
        }
        // A stripe that reaches into the next group serves it too.
        kept.retain(|(stripe, _)| layout.stripe_range(*stripe).end > bytes.end);
        self.checked = kept;
        let mut hasher = bao::GroupHasher::new(header.size, group);
        hasher.update(&out);
        if hasher.finish() != good {
            tracing::error!(%evidence, group, "group does not match the content root even from checked shards");
            return Err(ReadError::RootMismatch(evidence));
        }
        Ok(Bytes::from(out))
    }
}

/// Which of a stripe's fetched shards are hashed against the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ShardCheck {
    /// Every shard.
    All,
    /// Parity shards only: a read checks the data shards' bytes against the
    /// content root instead ([`GroupCheck`]), which costs one BLAKE3 pass
    /// rather than two.
    Parity,
}

/// What fetching one shard gave.
pub(crate) enum ShardOutcome {
    Good(Vec<u8>),
    /// Missing or failed its hash: the stripe needs repair.
    Damaged,
    /// The node did not answer; says nothing about the shard.
    Unreachable,
    /// The node answered that it could not read the shard from its disk
    /// (`Io`): rebuilt around and repaired, but not proof of loss (the
    /// cause may pass: a full file table, a moment's EIO).
    Unreadable,
}

/// Returns the content bytes of one stripe (in pieces: the data shards as
/// received, or the rebuilt stripe), reading `k` shards the nodes vouch for,
/// checked against the manifest as `check` says.
pub(crate) async fn fetch_stripe<S: Store>(
    gw: &Gateway<S>,
    header: &ManifestHeader,
    stripe: u64,
    rec: &StripeRecord,
    check: ShardCheck,
) -> Result<Vec<Bytes>, ReadError> {
    let k = header.code.data_shards();
    let total = header.code.total();
    if rec.shards.len() != total {
        tracing::error!(evidence = %header.evidence, stripe, shards = rec.shards.len(), "stripe record does not match the manifest's code");
        return Err(ReadError::Unrecoverable {
            evidence: header.evidence,
            stripe,
            good: 0,
            k,
        });
    }
    let stripe_len = {
        let r = header.code.layout(header.size).stripe_range(stripe);
        (r.end - r.start) as usize
    };
    let mut shards: Vec<Option<Vec<u8>>> = vec![None; total];
    let mut good = 0usize;
    // Shards the record lacks (a degraded write, a node gone), and shards
    // found damaged or gone by this read.
    let missing = rec.missing() > 0;
    let mut damaged = false;
    // Data shards first (no decoding), then parity; shards on nodes believed
    // down go last, so a dead node costs nothing once it is known.
    let order: Vec<usize> = {
        let placed = |i: &usize| rec.shards[*i].node;
        let (up, down): (Vec<usize>, Vec<usize>) = (0..total)
            .filter(|i| placed(i).is_some())
            .partition(|i| placed(i).is_some_and(|n| gw.nodes.is_healthy(n)));
        up.into_iter().chain(down).collect()
    };
    // Position in `order` of the next shard to ask for.
    let mut next = 0usize;
    // Shards whose node did not answer; asked once more before the stripe is
    // called unrecoverable (a connection being replaced, a node restarting).
    let mut unanswered: Vec<usize> = Vec::new();
    let mut retried = false;
    let mut pending = FuturesUnordered::new();
    // Shards asked for and not answered yet.
    let mut in_flight: Vec<usize> = Vec::with_capacity(total);
    let fetch = |i: usize| async move {
        let hash = check == ShardCheck::All || i >= k;
        (
            i,
            fetch_shard(gw, header.evidence, stripe, i, rec, hash).await,
        )
    };

    let hedge_every = Duration::from_millis(gw.config.hedge_after_ms);
    let hedge = tokio::time::sleep(hedge_every);
    tokio::pin!(hedge);
    loop {
        // Keep exactly enough requests in flight to reach k.
        while good + pending.len() < k && next < order.len() {
            pending.push(fetch(order[next]));
            in_flight.push(order[next]);
            next += 1;
        }
        if good >= k {
            break;
        }
        if pending.is_empty() && !retried && !unanswered.is_empty() {
            retried = true;
            tracing::debug!(evidence = %header.evidence, stripe, shards = unanswered.len(), "asking unanswered shards once more");
            in_flight.extend_from_slice(&unanswered);
            pending.extend(unanswered.drain(..).map(fetch));
            continue;
        }
        if pending.is_empty() {
            // Only shards found damaged or gone say the stripe needs repair:
            // nodes that did not answer (a network blip) say nothing of
            // their shards, and one down for good has its stripes found by
            // the repair scanner after its grace. Queued for every such
            // read, a blip would flood the repair queue.
            if damaged || missing {
                report_damage(gw, header.evidence, stripe, damaged);
            }
            return Err(ReadError::Unrecoverable {
                evidence: header.evidence,
                stripe,
                good,
                k,
            });
        }
        tokio::select! {
            Some((i, outcome)) = pending.next() => {
                in_flight.retain(|&j| j != i);
                match outcome {
                    ShardOutcome::Good(body) => {
                        shards[i] = Some(body);
                        good += 1;
                    }
                    ShardOutcome::Damaged | ShardOutcome::Unreadable => damaged = true,
                    ShardOutcome::Unreachable => {
                        if let Some(node) = rec.shards[i].node {
                            gw.nodes.mark(node, false);
                        }
                        unanswered.push(i);
                    }
                }
            }
            _ = &mut hedge, if next < order.len() => {
                // Something is slow: ask one more shard beside it, and again
                // each period while the stripe is still short. Whoever is
                // slow gets a liveness check: a node killed a moment ago
                // would otherwise cost every read a hedge delay per stripe
                // until the next probe.
                for &i in &in_flight {
                    if let Some(node) = rec.shards[i].node {
                        gw.nodes.suspect(node);
                    }
                }
                pending.push(fetch(order[next]));
                in_flight.push(order[next]);
                next += 1;
                hedge.as_mut().reset(tokio::time::Instant::now() + hedge_every);
            }
        }
    }
    if damaged || missing {
        report_damage(gw, header.evidence, stripe, damaged);
    }
    let pieces = if shards[..k].iter().all(Option::is_some) {
        // The data shards go to the client as they are, each back to the
        // receive pool once sent.
        let mut out = Vec::with_capacity(k);
        for (i, s) in shards.into_iter().enumerate() {
            if let Some(s) = s {
                if i < k {
                    out.push(gw.nodes.client.share(s));
                } else {
                    gw.nodes.client.recycle(s);
                }
            }
        }
        out
    } else {
        let rs = gw
            .codec(k, header.code.parity_shards())
            .map_err(ReadError::Reconstruct)?;
        let reconstructed = gw.metrics.stripes_reconstructed.clone();
        tokio::task::spawn_blocking(move || {
            rs.reconstruct_data(&mut shards)
                .map_err(ReadError::Reconstruct)?;
            reconstructed.inc();
            let mut out = Vec::with_capacity(k * rec_len(&shards));
            for s in shards.iter().take(k) {
                // reconstruct_data fills every data shard or fails.
                let s = s.as_ref().ok_or(ReadError::Reconstruct(
                    reed_solomon_erasure::Error::TooFewShardsPresent,
                ))?;
                out.extend_from_slice(s);
            }
            Ok::<_, ReadError>(vec![Bytes::from(out)])
        })
        .await
        .map_err(|_| ReadError::Internal)??
    };
    // The last stripe's shards are padded: keep `stripe_len` bytes.
    let mut left = stripe_len;
    Ok(pieces
        .into_iter()
        .filter_map(|mut p| {
            p.truncate(left);
            left -= p.len();
            (!p.is_empty()).then_some(p)
        })
        .collect())
}

/// The length of the shards present.
fn rec_len(shards: &[Option<Vec<u8>>]) -> usize {
    shards.iter().flatten().map(Vec::len).next().unwrap_or(0)
}

/// Where shard `index` of a stripe lives and its key; `None` when its
/// record names no node, or one that left the cluster.
fn shard_at<S: Store>(
    gw: &Gateway<S>,
    evidence: EvidenceId,
    stripe: u64,
    index: usize,
    rec: &StripeRecord,
) -> Option<(std::net::SocketAddr, ShardKey)> {
    let addr = rec.shards[index].node.and_then(|n| gw.nodes.addr(n))?;
    let key = ShardKey {
        evidence,
        stripe,
        index: index as u8,
    };
    Some((addr, key))
}

/// Fetches one shard. With `hash` the node checks it against its stored
/// header and it is checked here against the manifest's hash. Without, the
/// caller checks the bytes against the content root ([`ShardCheck::Parity`]),
/// so neither hashes it: the node checks only its header and length, and a
/// group that fails is read again with `hash`, which has the node find and
/// quarantine a damaged shard.
pub(crate) async fn fetch_shard<S: Store>(
    gw: &Gateway<S>,
    evidence: EvidenceId,
    stripe: u64,
    index: usize,
    rec: &StripeRecord,
    hash: bool,
) -> ShardOutcome {
    let placement = rec.shards[index];
    let Some((addr, key)) = shard_at(gw, evidence, stripe, index, rec) else {
        return ShardOutcome::Damaged;
    };
    let client = &gw.nodes.client;
    let got = client.rpc_read_shard(addr, key, hash, rec.shard_len).await;
    match got {
        Ok((_, body))
            if body.len() == rec.shard_len as usize
                && (!hash || Blake3Hash::of(&body) == placement.blake3) =>
        {
            gw.metrics.shards_read.inc();
            ShardOutcome::Good(body)
        }
        Ok(_) => {
            gw.metrics.shards_damaged.inc();
            tracing::warn!(shard = %key, "shard does not match the manifest's hash");
            ShardOutcome::Damaged
        }
        Err(NodeError::Remote(ErrorCode::Corrupt | ErrorCode::NotFound)) => {
            gw.metrics.shards_damaged.inc();
            tracing::warn!(shard = %key, "shard missing or corrupt on its node");
            ShardOutcome::Damaged
        }
        Err(e @ NodeError::ShardLength { .. }) => {
            gw.metrics.shards_damaged.inc();
            tracing::warn!(shard = %key, error = %e, "shard does not match the manifest");
            ShardOutcome::Damaged
        }
        // The node answered: it is up, and this shard is what it could not
        // read (a bad sector). Damaged, so the stripe is repaired; not
        // unreachable, which would mark a live node down at every read.
        Err(NodeError::Remote(ErrorCode::Io)) => {
            gw.metrics.shards_damaged.inc();
            tracing::warn!(shard = %key, "the node could not read the shard from its disk");
            ShardOutcome::Unreadable
        }
        // The node answered, but not with the shard (a request it refused,
        // a frame it garbled, a header for another shard): it is up, and
        // this shard is to be read elsewhere and repaired. Marked down, a
        // live node would be passed over by every read and repair until
        // the next probe for one shard's sake.
        Err(
            e @ (NodeError::Remote(_) | NodeError::Protocol(_) | NodeError::UnexpectedResponse),
        ) => {
            tracing::warn!(shard = %key, error = %e, "the node answered without the shard");
            ShardOutcome::Unreadable
        }
        Err(e) => {
            tracing::debug!(shard = %key, error = %e, "shard read failed");
            ShardOutcome::Unreachable
        }
    }
}

/// What a node's own check of one shard found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Checked {
    Good,
    /// Missing, corrupt, or not the bytes the manifest names.
    Damaged,
    Unreachable,
}

/// Has the shard's node read the shard and hash it against its header (the
/// body stays on the node), then checks that header against the manifest:
/// how a repair that reads only k shards still re-counts the rest.
pub(crate) async fn check_shard<S: Store>(
    gw: &Gateway<S>,
    evidence: EvidenceId,
    stripe: u64,
    index: usize,
    rec: &StripeRecord,
) -> Checked {
    let placement = rec.shards[index];
    let Some((addr, key)) = shard_at(gw, evidence, stripe, index, rec) else {
        return Checked::Damaged;
    };
    match gw.nodes.client.rpc_verify_shard(addr, key).await {
        Ok(h) if h.blake3 == placement.blake3 && h.len == rec.shard_len => Checked::Good,
        Ok(_) => {
            gw.metrics.shards_damaged.inc();
            tracing::warn!(shard = %key, "shard on its node is not the manifest's");
            Checked::Damaged
        }
        Err(NodeError::Remote(ErrorCode::Corrupt | ErrorCode::NotFound)) => {
            gw.metrics.shards_damaged.inc();
            tracing::warn!(shard = %key, "shard missing or corrupt on its node");
            Checked::Damaged
        }
        Err(e) => {
            tracing::debug!(shard = %key, error = %e, "shard check failed");
            Checked::Unreachable
        }
    }
}

/// Queues a stripe for repair, off the read's critical path: only while
/// its record is there (an expunge forgets it once its shards are deleted,
/// which is then why they were missing).
///
/// `found`: this read found a shard damaged or gone, which marks the stripe
/// again even if it is queued (a repair that read it before must not take
/// it off the queue). Otherwise its record only lacks shards, which is
/// queued already unless the queue lost it: marked only then, not at every
/// read of it.
fn report_damage<S: Store>(gw: &Gateway<S>, evidence: EvidenceId, stripe: u64, found: bool) {
    gw.no_home.damaged(evidence, stripe);
    let store = gw.store.clone();
    tokio::spawn(async move {
        let r = indexer::run(&store, |tx| async move {
            if schema::get_stripe_tx(&tx, evidence, stripe)
                .await?
                .is_none()
            {
                return Ok(None);
            }
            if !found {
                return Ok(Some(
                    schema::mark_degraded_unless_queued_tx(&tx, evidence, stripe).await?,
                ));
            }
            schema::mark_degraded_tx(&tx, evidence, stripe);
            Ok::<_, schema::SchemaError>(Some(true))
        })
        .await;
        match r {
            Ok(Some(true)) => {
                tracing::warn!(%evidence, stripe, "stripe has missing or corrupt shards; queued for repair")
            }
            Ok(Some(false)) => {}
            Ok(None) => {
                tracing::info!(%evidence, stripe, "shards missing from a stripe since forgotten (expunged)")
            }
            Err(e) => {
                tracing::error!(%evidence, stripe, error = %e, "could not queue stripe for repair")
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client's bytes hold their stripe's read memory until the last of
    /// them is dropped (sent, or gone with the connection), not only until
    /// they are in the channel; the cluster's own reads' do not.
    #[tokio::test]
    async fn bytes_handed_to_a_client_hold_their_read_memory_until_dropped() {
        let budget = Arc::new(tokio::sync::Semaphore::new(4));
        let evidence = EvidenceId::new(1, [1; 10]);
        let piece = Bytes::from(vec![7u8; 2 * DELIVER_SLICE]);
        let idle = Some(Duration::from_secs(5));
        let (mut tx, mut rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(2);
        let memory = Arc::new(budget.clone().try_acquire_many_owned(4).ok());
        assert!(deliver(evidence, &mut tx, piece.clone(), idle, &memory).await);
        // The stripe is done with (its loop iteration ended).
        drop(memory);
        assert_eq!(budget.available_permits(), 0, "held while in the channel");
        let mut taken = Vec::new();
        for _ in 0..2 {
            taken.push(rx.next().await.unwrap().unwrap());
        }
        assert_eq!(taken.concat(), piece.to_vec());
        assert_eq!(budget.available_permits(), 0, "held while being sent");
        taken.pop();
        assert_eq!(budget.available_permits(), 0, "held by the last slice");
        taken.clear();
        assert_eq!(budget.available_permits(), 4, "back once all are gone");
        // A copy's source read: its memory goes with the stripe.
        let memory = Arc::new(budget.clone().try_acquire_many_owned(4).ok());
        assert!(deliver(evidence, &mut tx, piece.clone(), None, &memory).await);
        drop(memory);
        assert_eq!(budget.available_permits(), 4);
        assert_eq!(rx.next().await.unwrap().unwrap(), piece);
    }

    /// Every failure's label is one exported from the start (an alert's
    /// `increase` misses a series' first sample).
    #[test]
    fn every_read_failure_reason_is_exported_from_the_start() {
        let id = EvidenceId([1; 16]);
        for e in [
            ReadError::Unrecoverable {
                evidence: id,
                stripe: 0,
                good: 0,
                k: 1,
            },
            ReadError::Index(schema::SchemaError::NoEvidence(id)),
            ReadError::RootMismatch(id),
            ReadError::Reconstruct(reed_solomon_erasure::Error::TooFewShards),
            ReadError::Internal,
            ReadError::Expunged(id),
            ReadError::BadOutboard(id),
        ] {
            assert!(READ_FAILURE_REASONS.contains(&e.reason()), "{e}");
        }
    }
}
