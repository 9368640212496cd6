//! Garbage collection of failed uploads, the shards of expunged evidence, and
//! orphan shards that no record names ([`sweep_orphans`]).
//!
//! An upload that fails, or whose lease runs out (its gateway died, its client
//! vanished), is aborted in a transaction *before* any of its shards is deleted,
//! so a filing can never become visible with shards missing: the manifest commit
//! checks the intent and fails once it is aborted. A lease has run out when GC
//! has watched it stay unchanged for a whole lease period by its own monotonic
//! clock ([`LeaseWatch`]); its time stamps are never compared with a clock, so
//! a clock set forward or back, or skewed between gateways, neither aborts a
//! live upload nor keeps a dead one. The abort re-checks in its transaction
//! that the lease is still the one watched, so an upload that renewed it in
//! the meantime goes on. Then the shards named by its stripe records are deleted,
//! and each record is forgotten only once all its shards are gone.

use crate::api::Gateway;
use crate::api::Store;
use crate::repair::StripeLease;
use indexer::schema;
use protocol::{EvidenceId, NodeId, ShardKey, StripeRecord};
use std::sync::Arc;
use std::time::Duration;

/// Stripe records read per transaction while deleting.
const STRIPES_PER_READ: usize = 1024;

/// Deletes the shards of one stripe; returns whether every shard is gone (a
/// shard already absent counts). A shard on an unreachable node stays named
/// by its record, so a later GC pass tries again; so does one on a node
/// known to be down, which is not asked at all (each request would wait
/// out the connect timeout, stripe after stripe, holding up the failed
/// upload's answer, the expunge and every other collection behind it), and
/// one on a node this gateway does not know and the index does not call
/// removed (added since this gateway started: its bytes may be there).
pub async fn delete_stripe_shards<S: Store>(
    gw: &Gateway<S>,
    evidence: EvidenceId,
    stripe: u64,
    record: &StripeRecord,
) -> bool {
    let deletes = record.shards.iter().enumerate().filter_map(|(i, p)| {
        let node = p.node?;
        let key = ShardKey { evidence, stripe, index: i as u8 };
        Some(async move {
            let Some(addr) = gw.nodes.addr(node) else {
                // Removed from the cluster: nothing left to delete there.
                return gw.nodes.removed_unlisted().contains(&node);
            };
            if !gw.nodes.is_healthy(node) {
                // Removed and gone: its shards never come back either.
                return gw.nodes.lifecycle(node) == schema::Lifecycle::Removed;
            }
            match gw.nodes.client.rpc_delete_shard(addr, key).await {
                Ok(_) => true,
                Err(e) => {
                    tracing::debug!(shard = %key, error = %e, "could not delete shard of an aborted upload");
                    false
                }
            }
        })
    });
    futures::future::join_all(deletes)
        .await
        .into_iter()
        .all(|ok| ok)
}

/// Deletes the shards of every stripe recorded for `evidence`, a batch at a
/// time, and has `forget` drop the records of the stripes whose shards are
/// all gone. Returns how many stripes keep their records (a shard on an
/// unreachable node, or a record this gateway cannot decode, whose stripe
/// number goes to `unreadable`): running it again continues. Used for
/// aborted uploads, expunged evidence and finished multipart parts.
pub async fn delete_recorded_stripes<S, F, Fut>(
    gw: &Gateway<S>,
    evidence: EvidenceId,
    forget: F,
    unreadable: &mut Vec<u64>,
) -> Result<u64, schema::SchemaError>
where
    S: Store,
    F: Fn(<S as indexer::KvStore>::Tx, Vec<u64>) -> Fut,
    Fut: std::future::Future<Output = Result<(), schema::SchemaError>>,
{
    let mut next = 0u64;
    let mut kept = 0u64;
    loop {
        // Stripe records may have gaps (aborted uploads): read by key range.
        let batch = indexer::run(&gw.store, |tx| async move {
            schema::stripes_after_tx(&tx, evidence, next, STRIPES_PER_READ).await
        })
        .await?;
        let Some(&(last, _)) = batch.last() else {
            return Ok(kept);
        };
        let done = delete_each(gw, evidence, &batch).await;
        let deleted: Vec<u64> = batch
            .iter()
            .zip(done)
            .filter(|(_, ok)| *ok)
            .map(|((s, _), _)| *s)
            .collect();
        unreadable.extend(batch.iter().filter(|(_, r)| r.is_none()).map(|(s, _)| *s));
        kept += (batch.len() - deleted.len()) as u64;
        indexer::run(&gw.store, |tx| forget(tx, deleted.clone())).await?;
        next = last + 1;
    }
}

/// Deletes the shards of each stripe (eight at a time); says of each
/// whether all its shards are gone. A record this gateway could not decode
/// (`None`) names shards unknown here: kept (a newer gateway reads it), the
/// rest go on. The nodes' erase of an expunged evidence reaches its shards
/// anyway.
pub(crate) async fn delete_each<S: Store>(
    gw: &Gateway<S>,
    evidence: EvidenceId,
    stripes: &[(u64, Option<StripeRecord>)],
) -> Vec<bool> {
    let mut done = Vec::with_capacity(stripes.len());
    for group in stripes.chunks(8) {
        done.extend(
            futures::future::join_all(group.iter().map(|(stripe, rec)| async move {
                match rec {
                    Some(rec) => delete_stripe_shards(gw, evidence, *stripe, rec).await,
                    None => {
                        tracing::warn!(%evidence, stripe, "a stripe record this gateway cannot read: its shards are left to a gateway that can");
                        false
                    }
                }
            }))
            .await,
        );
    }
    done
}

/// Why [`abort_and_delete`] is running.
#[derive(Clone, Copy, Debug)]
pub enum Abort {
    /// The upload itself failed: abort unconditionally.
    Failed,
    /// GC watched the lease stay at this value for a lease period: abort
    /// only if it still does.
    Stale { lease_until_ms: u64 },
}

/// Aborts `evidence`'s intent, deletes every shard its stripe records name, and
/// forgets it once all are deleted (stripes whose shards could not all be
/// deleted stay recorded, and the next GC pass retries them). Safe to run
/// twice or concurrently with a dying upload. Says whether it is all gone
/// (false also when it could not be aborted now).
pub async fn abort_and_delete<S: Store>(gw: &Gateway<S>, evidence: EvidenceId, why: Abort) -> bool {
    abort(gw, evidence, why).await && delete_aborted(gw, evidence).await
}

/// Aborts `evidence`'s intent: its filing can never become visible. True
/// if this call aborted it (its shards are then the caller's to delete,
/// [`delete_aborted`]); false if it was not live (or, for a stale one,
/// renewed since), or could not be aborted now (GC retries).
pub async fn abort<S: Store>(gw: &Gateway<S>, evidence: EvidenceId, why: Abort) -> bool {
    let aborted = indexer::run(&gw.store, |tx| async move {
        match why {
            Abort::Failed => schema::abort_intent_tx(&tx, evidence).await,
            Abort::Stale { lease_until_ms } => {
                schema::abort_if_stale_tx(&tx, evidence, lease_until_ms).await
            }
        }
    })
    .await;
    match aborted {
        Ok(aborted) => aborted,
        Err(e) => {
            tracing::warn!(%evidence, error = %e, "could not abort intent; GC will retry");
            false
        }
    }
}

/// Deletes every shard the stripe records of aborted `evidence` name, and
/// forgets it once all are deleted (stripes whose shards could not all be
/// deleted stay recorded, and the next GC pass retries them). Says whether
/// it is forgotten.
pub async fn delete_aborted<S: Store>(gw: &Gateway<S>, evidence: EvidenceId) -> bool {
    let kept = match delete_recorded_stripes(
        gw,
        evidence,
        |tx, gone| async move { schema::forget_aborted_stripes_tx(&tx, evidence, &gone).await },
        &mut Vec::new(),
    )
    .await
    {
        Ok(kept) => kept,
        Err(e) => {
            tracing::warn!(%evidence, error = %e, "could not delete the stripes of an aborted upload; GC will retry");
            return false;
        }
    };
    if kept > 0 {
        tracing::warn!(%evidence, stripes = kept, "some shards of an aborted upload could not be deleted; GC will retry");
        return false;
    }
    match indexer::run(&gw.store, |tx| async move {
        schema::forget_aborted_tx(&tx, evidence).await
    })
    .await
    {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(%evidence, error = %e, "could not forget aborted upload");
            false
        }
    }
}

/// Intents listed per index transaction.
const INTENTS_PER_READ: usize = 1024;

/// Upload intents GC has seen, each with its lease as last seen and since
/// when (monotonic) it has read so. A live upload renews its lease every
/// third of a lease period, and every renewal changes the value
/// ([`schema::renew_intent_tx`]); one unchanged for a whole period is
/// abandoned. Judged on this gateway's monotonic clock alone, whatever the
/// wall clocks say. A gateway that restarts watches afresh: it collects an
/// abandoned upload a lease period after it started, not sooner.
#[derive(Debug, Default)]
pub struct LeaseWatch {
    seen: std::collections::HashMap<EvidenceId, (u64, std::time::Instant)>,
}

impl LeaseWatch {
    /// Takes in every live intent listed now (`(evidence, lease_until_ms,
    /// lease period)`) and returns those whose lease has read the same for
    /// at least their period: abort them with [`Abort::Stale`]. Intents no
    /// longer listed are forgotten.
    pub fn observe(
        &mut self,
        now: std::time::Instant,
        live: &[(EvidenceId, u64, Duration)],
    ) -> Vec<(EvidenceId, u64)> {
        let mut next = std::collections::HashMap::with_capacity(live.len());
        let mut stale = Vec::new();
        for &(evidence, until, lease) in live {
            let since = match self.seen.get(&evidence) {
                Some(&(seen, since)) if seen == until => since,
                _ => now,
            };
            if now.saturating_duration_since(since) >= lease {
                stale.push((evidence, until));
            }
            next.insert(evidence, (until, since));
        }
        self.seen = next;
        stale
    }
}

/// When GC asks again about an expunge or an aborted upload it could not
/// finish (a node that holds some of it down, or one that cannot erase
/// yet): at once when the
/// nodes that answer are not those of its last try (one came back, or was
/// added), otherwise after a wait that doubles from one pass up to an
/// hour. Each try deletes every recorded shard left and has every node
/// walk what it holds: every pass, for every unfinished expunge (all those
/// `recover-index` restored, say), that was a load for nothing while the
/// node holding them stayed down.
#[derive(Debug, Default)]
pub struct UnfinishedRetries {
    /// Per expunge or aborted upload (both keyed by their evidence): when
    /// it is due again, the wait that led there, and the nodes answering
    /// when it was last tried.
    next: std::collections::HashMap<EvidenceId, (std::time::Instant, Duration, u64)>,
}

/// The longest an unfinished expunge or aborted upload waits between tries while the nodes
/// answering stay the same.
const UNFINISHED_RETRY_MAX: Duration = Duration::from_secs(3600);

impl UnfinishedRetries {
    /// Whether `evidence`'s expunge is to be tried now, `nodes` answering.
    fn due(&self, evidence: EvidenceId, now: std::time::Instant, nodes: u64) -> bool {
        self.next
            .get(&evidence)
            .is_none_or(|&(at, _, seen)| seen != nodes || now >= at)
    }

    /// Notes a try of `evidence`'s expunge, at `now` with `nodes`
    /// answering: forgotten once done, else due again after twice the last
    /// wait (`first` the first time).
    fn tried(
        &mut self,
        evidence: EvidenceId,
        now: std::time::Instant,
        nodes: u64,
        done: bool,
        first: Duration,
    ) {
        if done {
            self.next.remove(&evidence);
            return;
        }
        let wait = self
            .next
            .get(&evidence)
            .map_or(first, |&(_, w, _)| (w * 2).min(UNFINISHED_RETRY_MAX));
        self.next.insert(evidence, (now + wait, wait, nodes));
    }
}

/// Which of this gateway's nodes answer now, as one number (to tell that
/// it changed).
fn answering<S: Store>(gw: &Gateway<S>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for entry in &gw.config.nodes {
        let node = entry.node_id();
        (node.0, gw.nodes.is_healthy(node)).hash(&mut h);
    }
    h.finish()
}

/// One GC pass: intents `watch` found abandoned are aborted and collected,
/// and aborted uploads and expunges left unfinished are tried again when
/// `retries` says they are due; returns how many aborted or abandoned
/// intents it found (due or not).
pub async fn collect_once<S: Store>(
    gw: &Gateway<S>,
    watch: &mut LeaseWatch,
    retries: &mut UnfinishedRetries,
) -> usize {
    let (mut aborted, mut live, mut after) = (Vec::new(), Vec::new(), None);
    let mut intents_listed = true;
    loop {
        let page = indexer::run(&gw.store, |tx| async move {
            schema::intents_tx(&tx, after, INTENTS_PER_READ).await
        })
        .await;
        let page = match page {
            Ok(page) => page,
            Err(e) => {
                // The rest of the pass (expunges, multipart expiry) does
                // not depend on the intents: it runs all the same.
                tracing::warn!(error = %e, "GC could not list upload intents");
                intents_listed = false;
                break;
            }
        };
        let full = page.len() == INTENTS_PER_READ;
        after = page.last().map(|(id, _)| *id);
        for (evidence, rec) in page {
            let Some(rec) = rec else {
                // Damaged, or a newer gateway's: that gateway collects it.
                tracing::warn!(%evidence, "an upload intent this gateway cannot decode; left to a gateway that can");
                continue;
            };
            if rec.aborted {
                aborted.push(evidence);
            } else {
                // The longer of this gateway's period and the one its
                // uploader renews by (gateways may be configured apart).
                let lease = gw.config.intent_lease_ms.max(rec.lease_ms);
                live.push((evidence, rec.lease_until_ms, Duration::from_millis(lease)));
            }
        }
        if !full {
            break;
        }
    }
    // A partial list would restart the watch of the intents it missed.
    let stale = match intents_listed {
        true => watch.observe(std::time::Instant::now(), &live),
        false => Vec::new(),
    };
    // An aborted upload some of whose shards sat on a node down: each try
    // sends a delete for every shard still recorded (a large upload's
    // hundreds of thousands, the deleted ones again), so it is tried again
    // as an unfinished expunge is (see `UnfinishedRetries`), not every pass.
    let nodes = answering(gw);
    let mut listed = std::collections::HashSet::new();
    for &evidence in &aborted {
        listed.insert(evidence);
        if !retries.due(evidence, std::time::Instant::now(), nodes) {
            continue;
        }
        tracing::info!(%evidence, "collecting an aborted upload");
        let done = abort_and_delete(gw, evidence, Abort::Failed).await;
        let first = Duration::from_millis(gw.config.gc_interval_ms.max(1));
        retries.tried(evidence, std::time::Instant::now(), nodes, done, first);
    }
    for &(evidence, lease_until_ms) in &stale {
        tracing::info!(%evidence, "collecting an abandoned upload (its lease stopped being renewed)");
        abort_and_delete(gw, evidence, Abort::Stale { lease_until_ms }).await;
    }
    // Expunges whose shards sat on unreachable nodes: all of them, a page
    // at a time (the first page alone could be held by a node down for
    // good, and starve the rest).
    let mut after = None;
    let mut whole = true;
    loop {
        let page = match indexer::run(&gw.store, |tx| async move {
            schema::expunging_tx(&tx, after, 64).await
        })
        .await
        {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(error = %e, "GC could not list unfinished expunges");
                whole = false;
                break;
            }
        };
        for &evidence in &page {
            listed.insert(evidence);
            if !retries.due(evidence, std::time::Instant::now(), nodes) {
                continue;
            }
            let erasure = delete_expunged(gw, evidence).await;
            // Not begun (its entry not notarized yet, the index not read):
            // asked again next pass, as cheap as that is.
            if erasure.stripes_left.is_some() || erasure.done {
                let first = Duration::from_millis(gw.config.gc_interval_ms.max(1));
                retries.tried(
                    evidence,
                    std::time::Instant::now(),
                    nodes,
                    erasure.done,
                    first,
                );
            }
        }
        match page.last() {
            Some(&last) if page.len() == 64 => after = Some(last),
            _ => break,
        }
    }
    // Finished (by any gateway) or gone: forgotten. (A partial list of
    // intents or expunges would forget the waits of those it missed.)
    if whole && intents_listed {
        retries.next.retain(|e, _| listed.contains(e));
    }
    expire_completed_uploads(gw).await;
    expire_incomplete_uploads(gw).await;
    delete_queued_parts(gw).await;
    aborted.len() + stale.len()
}

/// Drops every part still copied from expunged `evidence`, a transaction
/// at a time; says whether none is left.
async fn drop_copies<S: Store>(gw: &Gateway<S>, evidence: EvidenceId) -> bool {
    loop {
        let dropped = indexer::run(&gw.store, |tx| async move {
            indexer::s3::drop_parts_copied_from_tx(
                &tx,
                evidence,
                indexer::s3::COPIES_DROPPED_AT_ONCE,
            )
            .await
        })
        .await;
        match dropped {
            Ok((n, more)) => {
                if n > 0 {
                    tracing::info!(%evidence, parts = n, "dropped parts copied from expunged evidence");
                }
                if !more {
                    return true;
                }
            }
            Err(e) => {
                tracing::warn!(%evidence, error = %e, "GC could not drop the parts copied from expunged evidence");
                return false;
            }
        }
    }
}

/// Aborts multipart uploads idle for more than `multipart_expiry_ms` (no
/// part stored, no Complete begun) and never completed (a client that
/// crashed, or gave up): their parts are not evidence, but stored they
/// would be for good, and would keep every node holding them from
/// draining. 0: never.
async fn expire_incomplete_uploads<S: Store>(gw: &Gateway<S>) {
    let expiry = gw.config.multipart_expiry_ms;
    if expiry == 0 {
        return;
    }
    // By the compliance clock, which never jumps forward: a gateway whose
    // wall clock ran days ahead would otherwise abort every upload in the
    // cluster still under way, and delete its parts.
    let before = gw.clock.compliance_ms().saturating_sub(expiry);
    let mut after = None;
    loop {
        let (stale, next) = match indexer::run(&gw.store, |tx| async move {
            indexer::s3::stale_uploads_tx(&tx, after, before, 64).await
        })
        .await
        {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(error = %e, "GC could not list incomplete multipart uploads");
                return;
            }
        };
        // One transaction each: an upload of 10,000 parts queues 10,000
        // deletions.
        for &upload in &stale {
            // Its sign of life read again in the transaction that ends it.
            let ended = indexer::run(&gw.store, |tx| async move {
                indexer::s3::expire_upload_tx(&tx, upload, before).await
            })
            .await;
            match ended {
                // Alive again since it was listed.
                Ok(None) => {}
                Ok(Some(parts)) => tracing::info!(
                    %upload,
                    parts = parts.len(),
                    expiry_ms = expiry,
                    "aborted a multipart upload left incomplete past multipart_expiry_ms"
                ),
                // Completed or aborted meanwhile.
                Err(indexer::s3::ObjectError::NoSuchUpload) => {}
                Err(e) => {
                    tracing::warn!(%upload, error = %e, "GC could not expire a multipart upload");
                    return;
                }
            }
        }
        match next {
            Some(n) => after = Some(n),
            None => return,
        }
    }
}

/// Deletes the parts queued for deletion that are left: those whose upload
/// ended while a node was unreachable, or whose deletion a crash cut short
/// (the request deletes them at once otherwise).
async fn delete_queued_parts<S: Store>(gw: &Gateway<S>) {
    // All of them, a page at a time: the first page alone could be held by
    // a node down for good, and starve the rest.
    let mut after = None;
    loop {
        let page = match indexer::run(&gw.store, |tx| async move {
            indexer::s3::parts_to_delete_tx(&tx, after, 256).await
        })
        .await
        {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(error = %e, "GC could not list the parts to delete");
                return;
            }
        };
        for &part in &page {
            crate::s3::delete_part(gw, part).await;
        }
        match page.last() {
            Some(&last) if page.len() == 256 => after = Some(last),
            _ => return,
        }
    }
}

/// How long a completed multipart upload's answer is kept for a client
/// retrying its Complete.
pub const COMPLETED_UPLOADS_KEPT_MS: u64 = 24 * 3600 * 1000;

/// Forgets the answers of multipart uploads completed more than
/// [`COMPLETED_UPLOADS_KEPT_MS`] ago, a page per transaction.
async fn expire_completed_uploads<S: Store>(gw: &Gateway<S>) {
    // (The compliance clock, as for incomplete uploads above.)
    let before = gw
        .clock
        .compliance_ms()
        .saturating_sub(COMPLETED_UPLOADS_KEPT_MS);
    loop {
        match indexer::run(&gw.store, |tx| async move {
            indexer::s3::expire_completed_tx(&tx, before, 256).await
        })
        .await
        {
            Ok(256) => continue,
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(error = %e, "GC could not expire completed multipart uploads");
                break;
            }
        }
    }
}

/// Runs [`collect_once`] every `every`.
pub fn spawn_gc_loop<S: Store>(
    gw: Arc<Gateway<S>>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut watch, mut retries) = (LeaseWatch::default(), UnfinishedRetries::default());
        loop {
            tick.tick().await;
            collect_once(&gw, &mut watch, &mut retries).await;
        }
    })
}

/// How far erasing an expunged evidence's bytes got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Erasure {
    /// Stripes whose recorded shards are not all deleted yet (`None`: not
    /// known yet: the expunge is not notarized yet, or the index could not
    /// be read).
    pub stripes_left: Option<u64>,
    /// Nodes that have not yet confirmed they hold nothing of it (`None`:
    /// not asked yet).
    pub nodes_left: Option<u64>,
    /// Nothing of it is left on any node (every node not removed said so).
    pub done: bool,
}

impl Erasure {
    /// Not started.
    const WAITING: Erasure = Erasure {
        stripes_left: None,
        nodes_left: None,
        done: false,
    };
}

/// Deletes the shards of expunged evidence, forgetting each stripe record
/// once its shards are gone, then has every node erase whatever else it
/// holds of it ([`erase_everywhere`]); marks the expunge complete once
/// nothing is left. Says how far it got; running it again continues (GC
/// does, until it is complete).
pub async fn delete_expunged<S: Store>(gw: &Gateway<S>, evidence: EvidenceId) -> Erasure {
    // Not before the expunge is in the ledger's archive: an index lost
    // before then is rebuilt from the archive, which would restore the
    // evidence as filed, and with its bytes deleted it would come back as
    // unreadable evidence instead of an expunge on the record.
    match crate::ledger::statement_published(gw, evidence, protocol::ledger::Kind::Expunged).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::debug!(%evidence, "expunge not notarized yet: its shards wait for it");
            return Erasure::WAITING;
        }
        Err(e) => {
            tracing::warn!(%evidence, error = %e, "could not read the ledger; GC will retry the expunge");
            return Erasure::WAITING;
        }
    }
    // Parts copied from it that its own transaction left (more than it
    // could take): dropped before it can be finished, after which it is
    // listed no more (by GC, and by the expunge's request alike).
    if !drop_copies(gw, evidence).await {
        return Erasure::WAITING;
    }
    let mut unreadable = Vec::new();
    let stripes_left = match delete_recorded_stripes(
        gw,
        evidence,
        |tx, gone| async move { schema::forget_stripes_tx(&tx, evidence, &gone).await },
        &mut unreadable,
    )
    .await
    {
        Ok(left) => left,
        Err(e) => {
            tracing::warn!(%evidence, error = %e, "could not delete the stripes of expunged evidence; GC will retry");
            return Erasure::WAITING;
        }
    };
    // Whatever stripes are left (a node holding some is down, say): the
    // nodes that answer erase what they hold now, copies no record names
    // included, not once the last node down comes back.
    let nodes_left = erase_everywhere(gw, evidence).await;
    // Records this gateway cannot decode (damaged, or a newer version's):
    // which shards they name is unknown, but every node has erased all it
    // holds of the evidence, theirs included, so they are forgotten. (Kept,
    // they would hold the expunge open for ever.)
    let mut stripes_left = stripes_left;
    if nodes_left == 0 && !unreadable.is_empty() {
        // A batch per transaction, as the deletes forget theirs.
        for batch in unreadable.chunks(STRIPES_PER_READ) {
            let forgotten = indexer::run(&gw.store, |tx| async move {
                schema::forget_stripes_tx(&tx, evidence, batch).await
            })
            .await;
            match forgotten {
                Ok(()) => stripes_left = stripes_left.saturating_sub(batch.len() as u64),
                Err(e) => {
                    tracing::warn!(%evidence, error = %e, "could not forget unreadable stripe records of expunged evidence; GC will retry");
                    break;
                }
            }
        }
        tracing::warn!(%evidence, stripes = unreadable.len(), "forgot stripe records of expunged evidence this gateway cannot read, once every node had erased it");
    }
    let left = Erasure {
        stripes_left: Some(stripes_left),
        nodes_left: Some(nodes_left),
        done: false,
    };
    if stripes_left > 0 {
        tracing::warn!(%evidence, stripes = stripes_left, "some shards of expunged evidence could not be deleted yet; GC will retry");
        return left;
    }
    if nodes_left > 0 {
        tracing::warn!(%evidence, nodes = nodes_left, "some nodes could not erase what they hold of expunged evidence yet; GC will retry");
        return left;
    }
    match indexer::run(&gw.store, |tx| async move {
        schema::expunge_done_tx(&tx, evidence).await
    })
    .await
    {
        Ok(()) => Erasure { done: true, ..left },
        Err(e) => {
            tracing::warn!(%evidence, error = %e, "could not mark the expunge complete; GC will retry");
            left
        }
    }
}

/// Has every node not removed erase all it holds of expunged `evidence`
/// (and, at best effort, removed ones that still answer):
/// besides the shards its stripe records name, copies no record names
/// (moved away by repair or drain, quarantined by scrub, in a damaged
/// segment, left by an upload cut short); see
/// [`protocol::wire::Request::EraseEvidence`]. Returns how many nodes could
/// not (down, unreachable, or too old to know the request): the expunge is
/// complete only once none is left.
///
/// "Every node" is every node the index knows, not only those this
/// gateway's configuration lists: another gateway's may list one more (a
/// node added while this gateway was not restarted), and what a repair
/// moved there must go too. Such a node is asked at the address its record
/// holds, and must prove it is that node.
async fn erase_everywhere<S: Store>(gw: &Gateway<S>, evidence: EvidenceId) -> u64 {
    let mut targets: Vec<(NodeId, std::net::SocketAddr)> = gw
        .config
        .nodes
        .iter()
        .map(|entry| (entry.node_id(), entry.addr))
        .filter(|&(node, _)| gw.nodes.lifecycle(node) != schema::Lifecycle::Removed)
        .collect();
    let mut left = 0u64;
    match unlisted_nodes(gw).await {
        Ok(unlisted) => {
            for (node, addr) in unlisted {
                match addr {
                    Some(addr) => {
                        gw.nodes
                            .client
                            .expect_name(addr, storage_node::tls::node_server_name(node.0));
                        targets.push((node, addr));
                    }
                    None => left += 1,
                }
            }
        }
        Err(e) => {
            tracing::warn!(%evidence, error = %e, "could not read which nodes the index knows; GC will retry the expunge");
            left += 1;
        }
    }
    // One known to be down now is not waited for (a connect timeout per
    // expunge per GC pass): it stays to do. (Only a listed node's health is
    // watched; one only the index knows is tried.)
    let (targets, down): (Vec<_>, Vec<_>) = targets
        .into_iter()
        .partition(|&(node, _)| !gw.nodes.knows(node) || gw.nodes.is_healthy(node));
    for (node, _) in &down {
        tracing::debug!(%evidence, %node, "a node that is down erases expunged evidence once it is back");
    }
    left += down.len() as u64;
    left += erase_on_each(gw, &targets, evidence).await;
    // Removed nodes this gateway lists that still answer (drained and left
    // running, not yet wiped) may hold copies no record names (quarantined
    // ones, old copies whose deletion failed): asked too, at best effort.
    // One that does not answer is not waited for: a removed node's disk is
    // its operator's to wipe.
    let removed: Vec<(NodeId, std::net::SocketAddr)> = gw
        .config
        .nodes
        .iter()
        .map(|entry| (entry.node_id(), entry.addr))
        .filter(|&(node, _)| {
            gw.nodes.lifecycle(node) == schema::Lifecycle::Removed && gw.nodes.is_healthy(node)
        })
        .collect();
    erase_on_each(gw, &removed, evidence).await;
    left
}

/// [`erase_on`] each of `targets`, sixteen at a time; returns how many
/// could not erase.
async fn erase_on_each<S: Store>(
    gw: &Gateway<S>,
    targets: &[(NodeId, std::net::SocketAddr)],
    evidence: EvidenceId,
) -> u64 {
    let mut failed = 0;
    for group in targets.chunks(16) {
        let done = futures::future::join_all(
            group
                .iter()
                .map(|&(node, addr)| erase_on(gw, node, addr, evidence)),
        )
        .await;
        failed += done.iter().filter(|ok| !**ok).count() as u64;
    }
    failed
}

/// The nodes the index has a record of that this gateway's configuration
/// does not list and that were not removed, each with the address its
/// record holds. `None` for one not to be dialled now, counted as left:
/// an address that does not resolve, or that a listed node has (records
/// are each gateway's view; a name expected at an address is by address),
/// and one its own gateway has not seen up for longer than a node is
/// called down after (a connect timeout per expunge per pass otherwise).
async fn unlisted_nodes<S: Store>(
    gw: &Gateway<S>,
) -> Result<Vec<(NodeId, Option<std::net::SocketAddr>)>, schema::SchemaError> {
    let (records, lifecycles) = indexer::run(&gw.store, |tx| async move {
        Ok::<_, schema::SchemaError>((
            schema::nodes_tx(&tx).await?,
            schema::lifecycles_tx(&tx).await?,
        ))
    })
    .await?;
    let removed: std::collections::HashSet<NodeId> = lifecycles
        .iter()
        .filter(|(_, r)| r.state == schema::Lifecycle::Removed)
        .map(|(id, _)| *id)
        .collect();
    let listed: std::collections::HashSet<std::net::SocketAddr> =
        gw.config.nodes.iter().map(|e| e.addr).collect();
    let now_ms = gw.clock.now_ms();
    let down_after = gw.config.node_down_after_ms;
    let mut seen = std::collections::HashSet::new();
    let mut unlisted = Vec::new();
    for rec in records {
        if gw.nodes.knows(rec.node) || removed.contains(&rec.node) {
            continue;
        }
        let addr = match tokio::net::lookup_host(rec.addr.as_str()).await {
            Ok(mut addrs) => addrs.next(),
            Err(_) => None,
        };
        let addr = match addr {
            None => {
                tracing::warn!(node = %rec.node, addr = %rec.addr, "a node the index knows, which this gateway's configuration does not list, has an address that does not resolve");
                None
            }
            Some(a) if listed.contains(&a) || !seen.insert(a) => {
                tracing::warn!(node = %rec.node, addr = %a, "a node the index knows, which this gateway's configuration does not list, is recorded at another node's address: left to the gateway that lists it");
                None
            }
            Some(_) if now_ms.saturating_sub(rec.last_seen_ms) > down_after => {
                tracing::debug!(node = %rec.node, "a node only the index knows was not seen up lately: left for now");
                None
            }
            a => a,
        };
        unlisted.push((rec.node, addr));
    }
    Ok(unlisted)
}

/// Has node `node` at `addr` erase what it holds of `evidence`; says
/// whether it did.
async fn erase_on<S: Store>(
    gw: &Gateway<S>,
    node: NodeId,
    addr: std::net::SocketAddr,
    evidence: EvidenceId,
) -> bool {
    match gw.nodes.client.rpc_erase_evidence(addr, evidence).await {
        Ok((shards, copies)) => {
            if shards + copies > 0 {
                tracing::info!(%evidence, %node, shards, forensic_copies = copies, "a node erased what it held of expunged evidence");
            }
            true
        }
        Err(e) => {
            tracing::warn!(%evidence, %node, error = %e, "a node could not erase what it holds of expunged evidence");
            false
        }
    }
}

/// Orphan shards seen unreferenced, and when first seen so.
pub type OrphanCandidates = std::collections::HashMap<(NodeId, ShardKey), std::time::Instant>;

/// What one orphan sweep found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sweep {
    pub listed: u64,
    /// Unreferenced shards still within their grace.
    pub pending: u64,
    pub deleted: u64,
    /// Copies of shards their stripe's record had no node for, placed.
    pub adopted: u64,
    /// Every active node was listed whole and every such copy found was
    /// adopted (or found not to be one): a stripe still short of a shard
    /// no node holds is then really short.
    pub complete: bool,
    /// Shards of more pieces of evidence than `orphan_sweep_max_evidence`
    /// were due: none was deleted.
    pub refused: bool,
}

/// Compares every active, healthy node's inventory with the index and
/// deletes shards that no stripe record places on that node and no upload
/// in flight can still claim, once two sweeps at least `grace` apart found
/// them so (`candidates` carries the first sighting between sweeps). A shard
/// that became referenced in between (a batch of stripe records written, a
/// repair committed) is dropped from the candidates, never deleted; each is
/// checked once more under its stripe's repair lease just before it goes,
/// and one a repair holds waits for the next sweep.
pub async fn sweep_orphans<S: Store>(
    gw: &Gateway<S>,
    candidates: &mut OrphanCandidates,
    grace: Duration,
) -> Sweep {
    let mut sweep = Sweep {
        complete: true,
        ..Sweep::default()
    };
    let mut still = OrphanCandidates::new();
    // Past their grace, deleted once every node was listed and their
    // number found plausible; and of those, the shards of evidence the
    // index has no stripe of at all.
    // (Each with whether the index knows its stripe.)
    let mut due: Vec<(
        NodeId,
        std::net::SocketAddr,
        ShardKey,
        std::time::Instant,
        bool,
    )> = Vec::new();
    let mut unknown_evidence: std::collections::HashSet<EvidenceId> =
        std::collections::HashSet::new();
    for entry in &gw.config.nodes {
        let node = entry.node_id();
        let lifecycle = gw.nodes.lifecycle(node);
        // A draining node still holds copies that may be adoptable (a
        // flaky node, down while recover-index ran, is the one an operator
        // drains): it is listed for those alone, and adopted copies leave
        // it with the drain. Nothing on it is deleted as an orphan.
        let adopt_only = lifecycle == schema::Lifecycle::Draining;
        let listable = gw.nodes.is_healthy(node)
            && matches!(
                lifecycle,
                schema::Lifecycle::Active | schema::Lifecycle::Draining
            );
        // The sweep is complete only once every node not removed was listed.
        if lifecycle != schema::Lifecycle::Removed && !listable {
            sweep.complete = false;
        }
        if !listable || adopt_only {
            // Its entries stay as they were until it can be listed again.
            still.extend(candidates.iter().filter(|((n, _), _)| *n == node));
        }
        if !listable {
            continue;
        }
        let mut after = None;
        loop {
            let page = match gw.nodes.client.rpc_list_shards(entry.addr, after).await {
                Ok(page) => page,
                Err(e) => {
                    tracing::debug!(%node, error = %e, "orphan sweep could not list a node");
                    sweep.complete = false;
                    break;
                }
            };
            let Some(last) = page.last() else { break };
            after = Some(last.key);
            sweep.listed += page.len() as u64;
            let unreferenced = indexer::run(&gw.store, |tx| {
                let page = &page;
                async move {
                    let (mut orphans, mut homeless, mut unreadable) =
                        (Vec::new(), Vec::new(), 0u64);
                    // A record that does not decode (damage, or a newer
                    // version's) says nothing of its shards: they are
                    // kept, and the sweep goes on past them. (Failing the
                    // page would fail every sweep from then on, at the
                    // same shard: no orphan deleted, no copy adopted, on
                    // any node, for good.) An intent that does not decode
                    // is an intent: its shards are claimed.
                    let has_intent = |e| {
                        let tx = &tx;
                        async move {
                            match schema::get_intent_tx(tx, e).await {
                                Ok(found) => Ok(found.is_some()),
                                Err(schema::SchemaError::Decode(_)) => Ok(true),
                                Err(e) => Err(e),
                            }
                        }
                    };
                    for h in page {
                        let k = &h.key;
                        let rec = match schema::get_stripe_tx(&tx, k.evidence, k.stripe).await {
                            Ok(rec) => rec,
                            Err(schema::SchemaError::Decode(_)) => {
                                unreadable += 1;
                                continue;
                            }
                            Err(e) => return Err(e),
                        };
                        let Some(rec) = rec else {
                            // An upload in flight writes its stripe records
                            // in batches after the shards: its intent covers
                            // them.
                            // Nor is evidence recovery found no record of
                            // (perhaps a filing the archive had not caught
                            // up with) swept before an operator says so.
                            if !has_intent(k.evidence).await?
                                && !schema::is_unclaimed_tx(&tx, k.evidence).await?
                            {
                                orphans.push((*k, true));
                            }
                            continue;
                        };
                        let slot = rec.shards.get(k.index as usize);
                        if slot.is_some_and(|s| s.node == Some(node)) {
                            continue;
                        }
                        // A copy of a shard the record has no node for (the
                        // index lost track of it: a node down while
                        // recover-index ran) is adopted, never deleted.
                        // (A record whose hash for it is unknown, zeros,
                        // as recovery writes one it could not read back.)
                        let unknown = protocol::ShardPlacement::UNKNOWN_HASH;
                        if slot.is_some_and(|s| {
                            s.node.is_none() && (s.blake3 == h.blake3 || s.blake3 == unknown)
                        }) {
                            homeless.push(*k);
                        } else if !has_intent(k.evidence).await? {
                            // A copy of a stripe the index knows, placed
                            // elsewhere now (a repair's old copy on a node
                            // that was away).
                            orphans.push((*k, false));
                        }
                    }
                    Ok::<_, schema::SchemaError>((orphans, homeless, unreadable))
                }
            })
            .await;
            let (unreferenced, homeless) = match unreferenced {
                Ok((u, h, 0)) => (u, h),
                Ok((u, h, unreadable)) => {
                    tracing::warn!(
                        %node,
                        shards = unreadable,
                        "orphan sweep kept shards whose stripe records do not decode (damaged, \
                         or a newer version's): `custodia repair --verify-all` names them"
                    );
                    sweep.complete = false;
                    (u, h)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "orphan sweep could not read the index");
                    sweep.complete = false;
                    return sweep;
                }
            };
            for key in homeless {
                let Ok(Some(lease)) = StripeLease::take(gw, key.evidence, key.stripe).await else {
                    sweep.complete = false;
                    continue;
                };
                match lease
                    .renewed(gw, lease.adopt(gw, entry.addr, node, key, None))
                    .await
                {
                    Ok(true) => sweep.adopted += 1,
                    Ok(false) => {}
                    Err(e) => {
                        sweep.complete = false;
                        tracing::debug!(%node, shard = %key, error = %e, "could not adopt a copy")
                    }
                }
                lease.release(gw).await;
            }
            if adopt_only {
                continue;
            }
            let now = std::time::Instant::now();
            for (key, unknown) in unreferenced {
                let first = candidates.get(&(node, key)).copied().unwrap_or(now);
                if now.duration_since(first) < grace {
                    still.insert((node, key), first);
                    sweep.pending += 1;
                    continue;
                }
                if unknown {
                    unknown_evidence.insert(key.evidence);
                }
                due.push((node, entry.addr, key, first, !unknown));
            }
        }
    }
    // Failed uploads leave a few pieces of evidence the index has no stripe
    // of; an index behind its nodes (a backup restored, an index lost and
    // begun anew) leaves everything filed since, each with its receipt.
    // Those must not go: not one is deleted then. (Old copies of stripes
    // the index knows, however many a node back from a long absence holds,
    // are not counted.)
    let evidence = unknown_evidence;
    let limit = gw.config.orphan_sweep_max_evidence;
    sweep.refused = evidence.len() as u64 > limit;
    gw.metrics
        .orphan_sweep_refused
        .set(i64::from(sweep.refused));
    if sweep.refused {
        tracing::error!(
            evidence = evidence.len(),
            shards = due.len(),
            limit,
            "the orphan sweep found shards of more evidence than orphan_sweep_max_evidence \
             that the index knows nothing of, and deletes none: is the index behind the nodes \
             (restored from a backup, or begun anew)? `custodia recover-index` rebuilds it \
             from the nodes; raise the limit only if these are failed uploads"
        );
        still.extend(
            due.iter()
                .map(|(node, _, key, first, _)| ((*node, *key), *first)),
        );
        due.clear();
    }
    for (node, addr, key, first, known) in due {
        // Under the stripe's repair lease, checked again: a repair
        // may be about to commit this very shard on this node.
        let lease = match StripeLease::take(gw, key.evidence, key.stripe).await {
            Ok(Some(lease)) => lease,
            Ok(None) | Err(_) => {
                still.insert((node, key), first);
                continue;
            }
        };
        // delete_shard checks the lease is still held right before
        // it deletes, so no repair changed the placement since.
        let claimed = indexer::run(&gw.store, |tx| async move {
            Ok::<_, schema::SchemaError>(
                schema::shard_placed_on_tx(&tx, &key, node).await?
                    || schema::get_intent_tx(&tx, key.evidence).await?.is_some(),
            )
        })
        .await;
        // A copy of a stripe the index places elsewhere goes only once the
        // copy the record names is found good on its node: an index
        // restored from an older backup names copies that repairs and
        // drains have since moved and deleted, and this one may be the
        // last good copy (it is adopted in their place).
        let claimed = match claimed {
            Ok(false) if known => match recorded_copy(gw, key).await {
                Recorded::Good => Ok(false),
                Recorded::Bad(bad) => {
                    match lease
                        .renewed(gw, lease.adopt(gw, addr, node, key, Some(bad)))
                        .await
                    {
                        Ok(true) => sweep.adopted += 1,
                        // Not adoptable (its node holds another shard of
                        // the stripe, or it is not the record's copy after
                        // all, or the record changed meanwhile): looked at
                        // again next sweep, and the recorded copy, missing
                        // or damaged, is repair's to rebuild (nothing else
                        // would queue it: scrub cannot find a file that is
                        // not there).
                        Ok(false) => {
                            still.insert((node, key), first);
                            gw.no_home.damaged(key.evidence, key.stripe);
                            if let Err(e) =
                                crate::repair::mark_degraded(gw, &[(key.evidence, key.stripe)])
                                    .await
                            {
                                tracing::warn!(shard = %key, error = %e, "could not queue a stripe whose recorded copy is missing");
                            }
                        }
                        Err(e) => {
                            tracing::debug!(%node, shard = %key, error = %e, "could not adopt a copy");
                            still.insert((node, key), first);
                        }
                    }
                    Ok(true)
                }
                Recorded::Unknown => {
                    still.insert((node, key), first);
                    Ok(true)
                }
            },
            other => other,
        };
        match claimed {
            Ok(false) => match lease
                .renewed(gw, lease.delete_shard(gw, (node, addr), key))
                .await
            {
                // Gone already (another gateway's sweep, on the same
                // hourly phase, took it): not counted twice.
                Some(Ok(false)) => {}
                Some(Ok(true)) => {
                    sweep.deleted += 1;
                    gw.metrics.orphans_deleted.inc();
                    tracing::info!(%node, shard = %key, "orphan shard deleted");
                }
                Some(Err(e)) => {
                    tracing::debug!(%node, shard = %key, error = %e, "could not delete an orphan shard");
                    still.insert((node, key), first);
                }
                None => {
                    tracing::debug!(%node, shard = %key, "not deleted now (the stripe's lease lost, or the node's clock offset not known): left for the next sweep");
                    still.insert((node, key), first);
                }
            },
            Ok(true) => {}
            Err(_) => {
                still.insert((node, key), first);
            }
        }
        lease.release(gw).await;
    }
    *candidates = still;
    gw.metrics.orphans_pending.set(sweep.pending as i64);
    sweep
}

/// What the node a stripe record names for a shard holds of it.
enum Recorded {
    /// The record's copy, checked whole by the node.
    Good,
    /// Nothing, or not the record's bytes, on this node.
    Bad(NodeId),
    /// Not known now (the node did not answer, or the index could not be
    /// read).
    Unknown,
}

/// Asks the node the stripe record names for shard `key` to check its copy.
async fn recorded_copy<S: Store>(gw: &Gateway<S>, key: ShardKey) -> Recorded {
    let rec = indexer::run(&gw.store, |tx| async move {
        schema::get_stripe_tx(&tx, key.evidence, key.stripe).await
    })
    .await;
    let Ok(Some(rec)) = rec else {
        return Recorded::Unknown;
    };
    let Some(slot) = rec.shards.get(key.index as usize) else {
        return Recorded::Unknown;
    };
    let Some(node) = slot.node else {
        // The homeless copies' adoption is the sweep's listing's to do.
        return Recorded::Unknown;
    };
    // A removed node's copy counts for nothing (repair rebuilds it
    // elsewhere, and its disk is its operator's to wipe), however well it
    // still answers, and whether or not it is still listed: the copy found
    // here is adopted in its place, not deleted as a spare. A node this
    // gateway does not list and the index does not say removed is one
    // another gateway added (this one not yet restarted): its copy is
    // not known to be bad, so nothing is adopted over it.
    if gw.nodes.removed_unlisted().contains(&node) {
        return Recorded::Bad(node);
    }
    if !gw.nodes.knows(node) {
        return Recorded::Unknown;
    }
    if gw.nodes.lifecycle(node) == schema::Lifecycle::Removed {
        return Recorded::Bad(node);
    }
    if gw.nodes.addr(node).is_none() {
        return Recorded::Unknown;
    }
    // The node hashes its copy against its header, and the header is
    // checked against the record, as repair re-counts a shard.
    match crate::read::check_shard(gw, key.evidence, key.stripe, key.index as usize, &rec).await {
        crate::read::Checked::Good => Recorded::Good,
        crate::read::Checked::Damaged => Recorded::Bad(node),
        crate::read::Checked::Unreachable => Recorded::Unknown,
    }
}

/// Runs [`sweep_orphans`] every `orphan_sweep_interval_ms`.
pub fn spawn_orphan_sweeper<S: Store>(gw: Arc<Gateway<S>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let every = Duration::from_millis(gw.config.orphan_sweep_interval_ms.max(100));
        let grace = Duration::from_millis(gw.config.orphan_grace_ms);
        let mut candidates = OrphanCandidates::new();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // not at start: let nodes be probed first
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                // Asked for now (a node's removal waits on it).
                () = gw.sweep_wake.notified() => {}
            }
            // Nothing is an orphan before the index is known to hold the
            // published log: an empty or rolled-back index has no record of
            // shards filed since, and would have them all deleted.
            if gw.ledger.as_ref().is_some_and(|l| !l.published_checked()) {
                tracing::warn!(
                    "orphan sweep waits: the index is not yet known to hold the published log"
                );
                continue;
            }
            let s = sweep_orphans(&gw, &mut candidates, grace).await;
            if s.complete
                && !gw
                    .homeless_adopted
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                // Every node looked on since recovery (if it left copies to
                // adopt): nodes may be removed again.
                let cleared = indexer::run(&gw.store, |tx| async move {
                    schema::clear_adoption_pending_tx(&tx);
                    Ok::<_, schema::SchemaError>(())
                })
                .await;
                if let Err(e) = cleared {
                    tracing::warn!(error = %e, "could not record the completed sweep; the next one does");
                    gw.homeless_adopted
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                }
                // Stripes that waited on copies no node turned up with.
                gw.repair_wake.notify_one();
            }
            if s.deleted > 0 || s.pending > 0 || s.adopted > 0 {
                tracing::info!(
                    listed = s.listed,
                    pending = s.pending,
                    deleted = s.deleted,
                    adopted = s.adopted,
                    "orphan sweep"
                );
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// An unfinished expunge is tried again after a wait doubling up to an
    /// hour, at once when the nodes answering change, and not once done.
    #[test]
    fn unfinished_expunges_back_off_until_the_nodes_change() {
        let mut r = UnfinishedRetries::default();
        let e = EvidenceId::new(1, [1; 10]);
        let t0 = Instant::now();
        let pass = Duration::from_secs(30);
        assert!(r.due(e, t0, 7), "never tried: due");
        r.tried(e, t0, 7, false, pass);
        assert!(!r.due(e, t0 + Duration::from_secs(29), 7));
        assert!(r.due(e, t0 + pass, 7));
        r.tried(e, t0 + pass, 7, false, pass);
        assert!(!r.due(e, t0 + pass + Duration::from_secs(59), 7));
        assert!(r.due(e, t0 + pass * 3, 7), "then a minute");
        // Another node answers (one came back): at once.
        assert!(r.due(e, t0 + pass + Duration::from_secs(1), 8));
        let mut at = t0;
        for _ in 0..20 {
            r.tried(e, at, 7, false, pass);
            at += UNFINISHED_RETRY_MAX;
        }
        assert_eq!(r.next[&e].1, UNFINISHED_RETRY_MAX, "an hour at most");
        r.tried(e, at, 7, true, pass);
        assert!(r.next.is_empty(), "done: forgotten");
    }

    #[test]
    fn a_lease_is_stale_after_a_period_unchanged_whatever_its_stamp_says() {
        let lease = Duration::from_secs(120);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let (renewing, dead, behind) = (
            EvidenceId::new(1, [1; 10]),
            EvidenceId::new(2, [2; 10]),
            EvidenceId::new(3, [3; 10]),
        );
        let mut w = LeaseWatch::default();
        // Stamps in the past (a GC clock set forward) are not stale by
        // themselves, and one far in the future (set back) is not safe.
        assert!(w
            .observe(
                at(0),
                &[
                    (renewing, 10, lease),
                    (dead, 20, lease),
                    (behind, u64::MAX - 1, lease)
                ]
            )
            .is_empty());
        assert!(w
            .observe(
                at(60),
                &[
                    (renewing, 11, lease),
                    (dead, 20, lease),
                    (behind, u64::MAX - 1, lease)
                ]
            )
            .is_empty());
        // A period after first seen: the unchanged ones, not the renewed.
        assert_eq!(
            w.observe(
                at(120),
                &[
                    (renewing, 12, lease),
                    (dead, 20, lease),
                    (behind, u64::MAX - 1, lease)
                ]
            ),
            vec![(dead, 20), (behind, u64::MAX - 1)]
        );
        // The renewing upload's lease changed at 120 s, so a period of
        // silence counts from there.
        assert!(w.observe(at(239), &[(renewing, 12, lease)]).is_empty());
        assert_eq!(
            w.observe(at(240), &[(renewing, 12, lease)]),
            vec![(renewing, 12)]
        );
        // Gone from the list (committed or collected): forgotten, and seen
        // afresh if it ever came back.
        assert!(w.observe(at(241), &[]).is_empty());
        assert!(w.observe(at(500), &[(dead, 20, lease)]).is_empty());
    }

    /// Each intent is judged by its own period: one renewed by a gateway
    /// with a longer lease (every third of ten minutes) is not taken for
    /// abandoned after this gateway's two.
    #[test]
    fn an_intent_is_waited_for_as_long_as_its_uploader_renews_by() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let (long, short) = (EvidenceId::new(1, [1; 10]), EvidenceId::new(2, [2; 10]));
        let live = [
            (long, 5, Duration::from_secs(600)),
            (short, 5, Duration::from_secs(120)),
        ];
        let mut w = LeaseWatch::default();
        assert!(w.observe(at(0), &live).is_empty());
        assert_eq!(w.observe(at(199), &live), vec![(short, 5)]);
        assert!(w.observe(at(599), &live[..1]).is_empty());
        assert_eq!(w.observe(at(600), &live[..1]), vec![(long, 5)]);
    }
}
