//! Repair: brings every stripe back to k+m verified shards.
//!
//! The queue is the index's degraded marks (`D` keys): set by reads that met
//! a missing or corrupt shard, by degraded writes, and by the scanner here,
//! which walks the stripe records and queues those with a shard on a node
//! that has been down longer than the grace period, draining or removed,
//! and those with more shards in one failure domain than an even spread
//! over the domains open to writes would put there (filed while a rack was
//! down, say). For each queued stripe the worker:
//!
//! 1. reads every shard and checks it against the manifest's hash (or, when
//!    shards sit on a gone node, reads k and has each other shard's node
//!    check it in place): a stripe with all k+m good leaves the queue, unless
//!    it was marked again meanwhile;
//! 2. with fewer than k good shards and more than m that can never be read
//!    again (damaged, or on no node or a removed one: a node merely down may
//!    come back), appends a `lost` statement once (the stripe stays queued);
//!    with shards merely unreachable on nodes still in their grace period,
//!    waits;
//! 3. otherwise rebuilds the bad shards from k good ones, checks each against
//!    the hash the manifest recorded, writes it to a node chosen by the
//!    placement ranking (a node and failure domain not already holding a
//!    shard of the stripe), and reads it back to re-count it. When the one
//!    bad shard is one lost with its node (the common case: a dead node's
//!    thousands of stripes), the chosen node rebuilds it itself from k
//!    others it reads from their nodes (`RebuildShard`), each checked
//!    against the manifest's hash: k shards move instead of k in to this
//!    gateway and one out, and the gateway is not the hub every rebuilt
//!    byte passes through. Likewise a shard on a draining node, or one
//!    crowded into a failure domain (once nothing else ails the stripe, and
//!    only while the move makes the spread more even), is copied by its
//!    new node straight from the old one (one shard moves, not k+m in and
//!    one out), the stripe's other shards checked in place. If that
//!    fails (a source unreadable or damaged, an older node), the stripe is
//!    rebuilt here as above;
//! 4. commits the new placement with a compare-and-set on the stripe's
//!    record (version + 1), in the transaction that checks the evidence is
//!    still visible (an expunged stripe is never resurrected) and queues the
//!    `repaired` statement; the stripe leaves the queue in it only if every
//!    shard was counted in step 1 or rebuilt, and no one marked it since. A
//!    lost race deletes the copies just written;
//! 5. deletes the old copies still reachable only after [`OLD_COPY_GRACE`]
//!    (`repair_old_copy_grace_ms`),
//!    so a read that began on the old placement can finish, and only those
//!    the stripe's record does not place there again by then.
//!
//! One task works on a stripe at a time, across all gateways sharing the
//! index: each repair holds the stripe's lease
//! (`indexer::schema::RepairLease`) from its first step to its commit,
//! renewing it every [`LEASE_RENEW`], and a stripe held by another task is
//! left to it (`elsewhere` in the pass report); the deletion of a repair's
//! old copies after the grace and the orphan sweep's deletions take it too.
//! Two repairs would rank the same node for a rebuilt shard, so without it
//! one's cleanup after a failure (or a late deletion of old copies) could
//! delete the copy the other was about to commit, and a healed stripe would
//! be short of a shard it was just counted with. A task commits, and
//! deletes a copy, only while it holds the lease with [`LEASE_MARGIN`] to
//! spare by its own monotonic clock; a copy it can no longer delete safely
//! is left for the orphan sweep. A lease seen unchanged for
//! [`REPAIR_LEASE`] (its holder died) is taken over; wall clocks play no
//! part.

use crate::api::{Gateway, Store};
use crate::error::ApiError;
use crate::nodes::{NodeHealth, NodeView};
use crate::placement;
use crate::read::{check_shard, fetch_shard, Checked, ShardOutcome};
use indexer::schema::Lifecycle;
use indexer::schema::RepairLease;
use indexer::schema::{self, RepairCommit};
use protocol::ledger::Kind;
use protocol::wire::{RebuildShard, RebuildSource};
use protocol::{
    Blake3Hash, ErrorCode, EvidenceId, ManifestHeader, NodeId, ShardHeader, ShardKey, StripeRecord,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage_node::NodeError;

/// Queued stripes taken per pass.
pub const PASS_STRIPES: usize = 4096;
/// Stripes repaired at once.
const CONCURRENT_STRIPES: usize = 8;
/// Stripe records the scanner reads per transaction.
const SCAN_BATCH: usize = 2048;
/// How long an old shard copy outlives the commit that replaced it, unless
/// the gateway's `repair_old_copy_grace_ms` says otherwise: longer than any
/// read that began before it (a node request times out sooner).
pub const OLD_COPY_GRACE: Duration = Duration::from_secs(300);

/// How long a claim on a stripe must be seen unchanged before another task
/// takes it over: the task holding it renews it every [`LEASE_RENEW`] while
/// it works, so one that died (its gateway killed) keeps the stripe from
/// the others at least this long after they first look, until their next
/// look after that (measured by each gateway's monotonic clock; wall
/// clocks play no part).
pub const REPAIR_LEASE: Duration = Duration::from_secs(30);
/// How often a task renews the lease it works under.
pub const LEASE_RENEW: Duration = Duration::from_secs(5);
/// Lease a task must have left, by its own count, to commit or to delete a
/// copy.
pub const LEASE_MARGIN: Duration = Duration::from_secs(10);
/// When a delete sent now (`now_ms`, this gateway's wall clock) with `left`
/// of its lease must have landed by the node's clock, which reads
/// `offset_ms` ahead of this one: the lease's end less
/// [`DELETE_FENCE_MARGIN`]. `None` when the lease has less left than that.
fn delete_fence(now_ms: u64, left: Duration, offset_ms: i64) -> Option<u64> {
    let fence = left.checked_sub(DELETE_FENCE_MARGIN)?;
    let at = (now_ms as i64)
        .saturating_add(fence.as_millis() as i64)
        .saturating_add(offset_ms);
    u64::try_from(at).ok()
}

/// How much sooner than the lease's end a fenced delete's time runs out on
/// the node: room for the error in the measured clock offset (up to half a
/// round trip) and clocks drifting since it was measured.
pub const DELETE_FENCE_MARGIN: Duration = Duration::from_secs(2);

/// Remote builds that fail in a row, none succeeding, before repair stops
/// asking nodes for them for [`REMOTE_PAUSE`].
const REMOTE_FAILURES_TO_PAUSE: u32 = 16;
/// How long repair rebuilds everything itself after that.
const REMOTE_PAUSE: Duration = Duration::from_secs(600);

/// Whether repair asks nodes to build shards themselves (`RebuildShard`).
/// Nodes that cannot reach each other, or too old to know the request,
/// fail every such build, each only after its sources' connection timeout:
/// after [`REMOTE_FAILURES_TO_PAUSE`] failures in a row the gateway
/// rebuilds everything itself for [`REMOTE_PAUSE`], then tries again.
#[derive(Debug, Default)]
pub struct RemoteBuilds {
    failures: std::sync::atomic::AtomicU32,
    paused_until: std::sync::Mutex<Option<std::time::Instant>>,
}

impl RemoteBuilds {
    fn allowed(&self) -> bool {
        let mut paused = self
            .paused_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match *paused {
            Some(until) if std::time::Instant::now() < until => false,
            Some(_) => {
                *paused = None;
                self.failures.store(0, std::sync::atomic::Ordering::Relaxed);
                true
            }
            None => true,
        }
    }

    fn succeeded(&self) {
        self.failures.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    fn failed(&self) {
        let n = self
            .failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if n == REMOTE_FAILURES_TO_PAUSE {
            tracing::warn!(
                failures = n,
                pause_secs = REMOTE_PAUSE.as_secs(),
                "nodes failed every shard build asked of them (can they reach each other's QUIC ports?); \
                 the gateway rebuilds shards itself for a while"
            );
            *self
                .paused_until
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some(std::time::Instant::now() + REMOTE_PAUSE);
        }
    }
}

/// What one stripe's repair did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// All k+m shards were good; it left the queue.
    Healthy,
    /// `n` shards were rebuilt, written, re-read and committed.
    Repaired(usize),
    /// Fewer than k good shards: recorded as lost (once), still queued.
    Lost,
    /// Shards unreachable on nodes still within their grace period, or a
    /// race with another change: try again later.
    Waiting,
    /// The evidence is gone (expunged) or the stripe no longer exists.
    Gone,
    /// Another task (another gateway's repair, a deletion of old copies,
    /// the orphan sweep) holds the stripe's repair lease.
    Elsewhere,
    /// Too few nodes could take its shards that need new homes (a cluster
    /// of exactly k+m nodes with one gone, or every other node full):
    /// nothing was read; still queued.
    NoHome,
}

/// What a pass did, for logs, metrics and `custodia repair`.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct PassReport {
    pub examined: u64,
    pub healthy: u64,
    pub repaired_stripes: u64,
    pub rebuilt_shards: u64,
    pub lost: u64,
    pub waiting: u64,
    pub gone: u64,
    /// Stripes another task held (its lease live).
    pub elsewhere: u64,
    /// Repairs that failed with an error (logged; retried by a later pass).
    pub failed: u64,
    /// Stripes with shards to rehome and too few nodes to take them.
    pub no_home: u64,
}

/// Runs repair passes every `every` (or at once when woken) for the
/// gateway's life.
pub fn spawn_repair_loop<S: Store>(
    gw: Arc<Gateway<S>>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut cursor = None;
        let mut queue_cursor = None;
        let mut reported = HashMap::new();
        let mut spread_walk = SpreadWalk::default();
        let mut homes_walk = HomesWalk::default();
        loop {
            tokio::select! {
                _ = gw.repair_wake.notified() => {}
                _ = tokio::time::sleep(every) => {}
            }
            match collect_quarantined(&gw, &mut reported).await {
                n if n > 0 => {
                    tracing::info!(
                        stripes = n,
                        "queued stripes with shards the nodes quarantined"
                    )
                }
                _ => {}
            }
            match scan(&gw, &mut cursor, &mut spread_walk, &mut homes_walk).await {
                Ok(n) if n > 0 => {
                    tracing::info!(
                        stripes = n,
                        "queued stripes for repair: with shards on down, draining or removed \
                         nodes, or crowded into one failure domain"
                    )
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "repair scan failed"),
            }
            match pass(&gw, &mut queue_cursor).await {
                Ok(r) if r.no_home > 0 => tracing::warn!(
                    ?r,
                    "repair pass: {} stripes have shards to move and too few nodes \
                     (healthy, not full, in the stripe's placement) to take them; \
                     add nodes or free space",
                    r.no_home
                ),
                Ok(r) if r.examined > 0 => tracing::info!(?r, "repair pass"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "repair pass failed"),
            }
        }
    })
}

/// Asks every healthy node for the shards it quarantined (found corrupt by
/// its scrubber or on a read) and queues each stripe whose record still
/// places that shard on that node, which holds no good copy of it.
/// `reported` remembers what was handled: the stripe record's version when
/// the shard was found placed there and missing, and queued (`None`: nothing
/// to act on), so a quarantine entry (kept on the node for forensics, and
/// named once however often the key was quarantined) is acted on once per
/// loss: a shard repaired away and later placed on the same node again, or
/// rebuilt onto that very node, and found corrupt there again, is queued
/// again. Returns the stripes queued.
///
/// A quarantine entry already handled is looked at again only every
/// `quarantine_recheck_ms`: entries stay on the nodes for good, and reading
/// the index for each of them on every pass would grow without bound.
pub async fn collect_quarantined<S: Store>(
    gw: &Gateway<S>,
    reported: &mut HashMap<(NodeId, ShardKey), (Option<u64>, std::time::Instant)>,
) -> u64 {
    let mut queued = 0;
    let recheck = Duration::from_millis(gw.config.quarantine_recheck_ms);
    for entry in &gw.config.nodes {
        let node = entry.node_id();
        if !gw.nodes.is_healthy(node) {
            continue;
        }
        let mut after = None;
        loop {
            let keys = match gw
                .nodes
                .client
                .rpc_list_quarantined(entry.addr, after)
                .await
            {
                Ok(keys) => keys,
                Err(e) => {
                    tracing::debug!(%node, error = %e, "could not list quarantined shards");
                    break;
                }
            };
            let Some(last) = keys.last() else { break };
            after = Some(*last);
            let listed: Vec<(ShardKey, Option<u64>)> = keys
                .into_iter()
                .filter_map(|k| match reported.get(&(node, k)) {
                    Some((_, at)) if at.elapsed() < recheck => None,
                    seen => Some((k, seen.and_then(|(queued, _)| *queued))),
                })
                .collect();
            if listed.is_empty() {
                continue;
            }
            let result = indexer::run(&gw.store, |tx| {
                let listed = &listed;
                async move {
                    // Settled: placed on this node (looked at below), or
                    // the stripe's record exists and places the shard
                    // elsewhere, or the evidence has no record and no
                    // upload in flight. A shard with neither yet (its
                    // upload's records still to be written) is looked at
                    // again. (key, as it was, the record's version if
                    // placed here)
                    let mut settled = Vec::new();
                    for (k, was) in listed {
                        match schema::get_stripe_tx(&tx, k.evidence, k.stripe).await? {
                            Some(rec) => {
                                let here = rec.shards.get(k.index as usize).and_then(|p| p.node)
                                    == Some(node);
                                settled.push((*k, *was, here.then_some(rec.version)));
                            }
                            None if schema::get_intent_tx(&tx, k.evidence).await?.is_none() => {
                                settled.push((*k, *was, None));
                            }
                            None => {}
                        }
                    }
                    Ok::<_, schema::SchemaError>(settled)
                }
            })
            .await;
            let settled = match result {
                Ok(settled) => settled,
                Err(e) => {
                    tracing::warn!(%node, error = %e, "could not queue quarantined shards");
                    break;
                }
            };
            // Placed here, the entry counts only while the node holds no
            // good copy: one rebuilt onto this very node (a cluster of k+m
            // nodes) supersedes it, and a copy found corrupt again later
            // (the key still named once) is then queued again, as is one
            // missing under a record changed since it was queued.
            // (key, version if placed here and missing, queue now)
            let mut done = Vec::new();
            for (k, was, version) in settled {
                let Some(version) = version else {
                    done.push((k, None, false));
                    continue;
                };
                match gw.nodes.client.rpc_stat_shard(entry.addr, k).await {
                    Ok(_) => done.push((k, None, false)),
                    // Gone, damaged, or unreadable where it lies: missing.
                    Err(NodeError::Remote(
                        protocol::wire::ErrorCode::NotFound
                        | protocol::wire::ErrorCode::Corrupt
                        | protocol::wire::ErrorCode::Io,
                    )) => done.push((k, Some(version), was != Some(version))),
                    // Unknown (the node did not answer): as it was, looked
                    // at again at the recheck's pace.
                    Err(e) => {
                        tracing::debug!(%node, shard = %k, error = %e, "could not see whether a quarantined shard was rebuilt");
                        done.push((k, was, false));
                    }
                }
            }
            let again: Vec<(EvidenceId, u64)> = done
                .iter()
                .filter(|(.., q)| *q)
                .map(|(k, ..)| (k.evidence, k.stripe))
                .collect();
            for &(evidence, stripe) in &again {
                gw.no_home.damaged(evidence, stripe);
            }
            if !again.is_empty() {
                if let Err(e) = mark_degraded(gw, &again).await {
                    tracing::warn!(%node, error = %e, "could not queue quarantined shards");
                    break;
                }
            }
            queued += again.len() as u64;
            let now = std::time::Instant::now();
            reported.extend(
                done.into_iter()
                    .map(|(k, queued, _)| ((node, k), (queued, now))),
            );
        }
    }
    queued
}

/// Nodes down for longer than the configured grace, and removed nodes:
/// their shards count as missing.
fn gone_nodes<S: Store>(gw: &Gateway<S>) -> HashSet<NodeId> {
    let mut gone: HashSet<NodeId> = gw
        .nodes
        .view()
        .into_iter()
        .filter(|n| is_gone(gw, n))
        .map(|n| n.id)
        .collect();
    // Removed, then dropped from the configuration: still gone.
    gone.extend(gw.nodes.removed_unlisted());
    gone
}

/// Whether `n`'s shards are given up on: removed, or down past the grace.
fn is_gone<S: Store>(gw: &Gateway<S>, n: &NodeView) -> bool {
    let grace = Duration::from_millis(gw.config.repair_after_down_ms);
    n.lifecycle == Lifecycle::Removed || (n.state == NodeHealth::Down && n.silent_for >= grace)
}

/// Whether `n` is not up but not yet given up on: its shards are neither
/// readable now nor queued for new homes, so nothing is verified about them
/// until it is back or past its grace (`custodia repair` says so).
pub fn awaiting_grace<S: Store>(gw: &Gateway<S>, n: &NodeView) -> bool {
    // A draining node's stripes are queued to move whatever its health.
    n.state != NodeHealth::Up && n.lifecycle == Lifecycle::Active && !is_gone(gw, n)
}

/// Nodes whose shards need new homes: gone past their grace, draining or
/// removed.
fn homeless_nodes<S: Store>(gw: &Gateway<S>) -> HashSet<NodeId> {
    let mut homeless = gone_nodes(gw);
    homeless.extend(gw.nodes.evacuating());
    homeless
}

/// The scanner's walks for stripes crowded into one failure domain. Only
/// a node opening to writes (a rack back, a node with room again or up
/// again, one added) can let a crowded stripe spread, so a whole walk is
/// made once after the gateway starts and then again only when a node
/// opens that has not stayed open since the last whole walk began.
/// (Stripes an upload crowds while every domain is open, its write having
/// fallen back to a node in a domain the stripe used, are queued by the
/// upload itself.)
#[derive(Debug, Default)]
pub struct SpreadWalk {
    /// [`NodeSet::openings`](crate::nodes::NodeSet::openings) when the last
    /// whole walk began: a walk is due once it moves on.
    done_at: Option<u64>,
    /// Its count when the walk under way began.
    walking: Option<u64>,
    /// When the last whole walk ended.
    ended: Option<std::time::Instant>,
    /// The walk under way passed stripes by unlooked at (it had queued its
    /// share for the pass while the search for homeless stripes went on):
    /// it is due again once it ends.
    skipped: bool,
}

impl SpreadWalk {
    /// Whether a walk is under way, beginning one now if one is due: the
    /// first, or one since a node came (back) to take new shards (`openings`
    /// moved on since the last whole walk began), no sooner than `gap`
    /// after the last ended. Never while nothing can be crowded.
    fn walking(&mut self, openings: u64, may_crowd: bool, gap: Duration) -> bool {
        if !may_crowd {
            self.walking = None;
            self.skipped = false;
            return false;
        }
        if self.walking.is_none()
            && self.done_at != Some(openings)
            && self.ended.is_none_or(|at| at.elapsed() >= gap)
        {
            self.walking = Some(openings);
        }
        self.walking.is_some()
    }

    /// The walk under way reached the end of the records.
    fn finished(&mut self) {
        if let Some(began) = self.walking.take() {
            if !std::mem::take(&mut self.skipped) {
                self.done_at = Some(began);
            }
            self.ended = Some(std::time::Instant::now());
        }
    }
}

/// The scanner's walks for stripes with shards on homeless nodes (gone past
/// their grace, draining, removed). Once a whole walk, begun after a node
/// became homeless, finds no shard on it, nothing is searched for it again
/// while it stays homeless, until `repair_rewalk_ms` has passed: a node
/// removed for good costs one walk of the index per that period, not one
/// walk after another for ever. (Uploads under way when that walk began
/// may place shards on the node in records they write later: each is
/// followed to its end and its stripes checked then, as for a replaced
/// disk.)
#[derive(Debug, Default)]
pub struct HomesWalk {
    /// Homeless nodes a whole walk found no shard on: when it ended, and
    /// the node's [`openings`](crate::nodes::NodeSet::openings_of) when it
    /// began.
    clean: HashMap<NodeId, (Instant, u64)>,
    /// The whole walk under way, begun at the start of the records.
    under_way: Option<HomesSearch>,
}

#[derive(Debug)]
struct HomesSearch {
    /// The nodes it searches for, homeless since it began, with their
    /// openings then.
    nodes: HashMap<NodeId, u64>,
    /// The uploads under way when it began.
    uploads: Vec<EvidenceId>,
    /// Those of `nodes` it found a shard on.
    found: HashSet<NodeId>,
}

impl HomesWalk {
    /// Of `homeless`, the nodes to search for now: all but those a walk
    /// found clean less than `rewalk` ago that stayed homeless since. The
    /// walk under way goes on only while it searches for every one of them
    /// and they have stayed homeless since it began (a node back for a
    /// while may have taken shards it already passed). A node that came
    /// back to take shards and left again between two looks is seen by its
    /// `openings` (how often it opened to writes) having moved on.
    fn search_now(
        &mut self,
        homeless: &HashSet<NodeId>,
        rewalk: Duration,
        openings: &dyn Fn(NodeId) -> u64,
    ) -> HashSet<NodeId> {
        self.clean.retain(|n, (at, seen)| {
            homeless.contains(n) && at.elapsed() < rewalk && openings(*n) == *seen
        });
        let search: HashSet<NodeId> = homeless
            .iter()
            .filter(|n| !self.clean.contains_key(n))
            .copied()
            .collect();
        if let Some(w) = &mut self.under_way {
            w.nodes
                .retain(|n, seen| homeless.contains(n) && openings(*n) == *seen);
            if !search.iter().all(|n| w.nodes.contains_key(n)) {
                self.under_way = None;
            }
        }
        search
    }

    /// A whole walk for `nodes` begins at the start of the records, with
    /// `uploads` under way.
    fn begin(
        &mut self,
        nodes: &HashSet<NodeId>,
        uploads: Vec<EvidenceId>,
        openings: &dyn Fn(NodeId) -> u64,
    ) {
        self.under_way = Some(HomesSearch {
            nodes: nodes.iter().map(|n| (*n, openings(*n))).collect(),
            uploads,
            found: HashSet::new(),
        });
    }

    /// The walk reached the end of the records: the nodes it found clean
    /// (now counted so) and the uploads to follow for them, if it was
    /// whole.
    fn finished(&mut self) -> Option<(HashSet<NodeId>, Vec<EvidenceId>)> {
        let w = self.under_way.take()?;
        let now = Instant::now();
        let mut clean = HashSet::new();
        for (n, seen) in w.nodes {
            if !w.found.contains(&n) {
                self.clean.insert(n, (now, seen));
                clean.insert(n);
            }
        }
        (!clean.is_empty()).then_some((clean, w.uploads))
    }
}

/// Walks up to 16 batches of stripe records from `cursor` (wrapping
/// around) and queues those with a shard on a node gone past its grace,
/// draining or removed, or with no node at all; and, in a walk `walk`
/// decides on, those with shards crowded into one failure domain while an
/// emptier one could take them ([`Spread::crowded`], which passes over a
/// stripe with a shard on a node not open: its other needs come first).
/// Skipped entirely while there is neither to look for; homeless nodes
/// already walked clean are not looked for ([`HomesWalk`]).
pub async fn scan<S: Store>(
    gw: &Arc<Gateway<S>>,
    cursor: &mut Option<(EvidenceId, u64)>,
    walk: &mut SpreadWalk,
    homes: &mut HomesWalk,
) -> Result<u64, ApiError> {
    // Read before the nodes are: a node that opens in between is counted
    // in the next look, not lost.
    let openings = gw.nodes.openings();
    let rewalk = Duration::from_millis(gw.config.repair_rewalk_ms);
    let openings_of = |n: NodeId| gw.nodes.openings_of(n);
    let homeless = homes.search_now(&homeless_nodes(gw), rewalk, &openings_of);
    let spread = Spread::now(gw, &gone_nodes(gw));
    let was_walking = walk.walking.is_some();
    let gap = Duration::from_millis(gw.config.crowding_walk_gap_ms);
    let crowding = walk.walking(openings, spread.may_crowd(), gap);
    if crowding && !was_walking {
        *cursor = None;
        // Back at the start: a homeless walk under way is not whole.
        homes.under_way = None;
    }
    if homeless.is_empty() && !crowding {
        return Ok(0);
    }
    if !homeless.is_empty() && homes.under_way.is_none() && cursor.is_none() {
        // Listed before the walk reads a record: an upload that ends after
        // this wrote its records after, and is followed instead.
        homes.begin(&homeless, live_intents(gw).await?, &openings_of);
    }
    let mut queued = 0u64;
    let crowded = std::sync::atomic::AtomicUsize::new(0);
    let found = std::sync::Mutex::new(HashSet::new());
    // At most 16 batches per call; each transaction stays small.
    for _ in 0..16 {
        // Crowded stripes lack no redundancy: about a quarter of a pass of
        // them is queued between two passes (counted between batches, so
        // up to a batch more), so a stripe that lost a shard never waits
        // long behind them however many there are.
        let crowd_now =
            crowding && crowded.load(std::sync::atomic::Ordering::Relaxed) < CROWDED_PER_PASS;
        if crowding && !crowd_now {
            if homeless.is_empty() {
                // Paused where it is, until the next pass.
                break;
            }
            // The search for homeless stripes goes on past stripes the
            // walk does not look at: it is walked again.
            walk.skipped = true;
        }
        let hit = |rec: &StripeRecord| {
            if needs_home(rec, &homeless) {
                let on = rec
                    .shards
                    .iter()
                    .filter_map(|p| p.node.filter(|n| homeless.contains(n)));
                if let Ok(mut found) = found.lock() {
                    found.extend(on);
                }
                return true;
            }
            let hit = crowd_now && !spread.crowded(rec).is_empty();
            if hit {
                crowded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            hit
        };
        let (n, more) = queue_stripes(gw, &hit, cursor).await?;
        queued += n.queued;
        if let (Some(w), Ok(mut found)) = (&mut homes.under_way, found.lock()) {
            w.found.extend(found.drain());
        }
        if !more {
            if crowding {
                walk.finished();
            }
            if let Some((clean, uploads)) = homes.finished() {
                tracing::info!(
                    nodes = ?clean,
                    "no stripe left with a shard on these homeless nodes; not searched \
                     for again for repair_rewalk_ms"
                );
                let gw = gw.clone();
                tokio::spawn(async move {
                    queue_after_uploads(&gw, uploads, &clean, "their nodes lost their homes").await;
                });
            }
            break;
        }
    }
    Ok(queued)
}

/// Crowded stripes the scanner queues per call (the repair loop runs a
/// pass of up to [`PASS_STRIPES`] after each).
const CROWDED_PER_PASS: usize = PASS_STRIPES / 4;

/// One whole walk of the stripe records, queueing every stripe with a shard
/// on a node gone past its grace, draining or removed (what
/// `POST /v1/admin/repair` does before it reports the backlog, so the
/// backlog it reports is complete). Returns the stripes queued. (Crowded
/// stripes are left to the scanner: not lost redundancy, and a walk of the
/// whole index each time would be dear.)
pub async fn scan_all<S: Store>(gw: &Gateway<S>) -> Result<u64, ApiError> {
    let homeless = homeless_nodes(gw);
    if homeless.is_empty() {
        return Ok(0);
    }
    let mut cursor = None;
    let mut queued = 0;
    loop {
        let (n, more) = queue_stripes(gw, &|rec| needs_home(rec, &homeless), &mut cursor).await?;
        queued += n.queued;
        if !more {
            return Ok(queued);
        }
    }
}

/// Queues for re-checking every stripe with a shard on `nodes`, which came
/// back with another disk: what they held is presumed gone until the repair
/// worker has read it (a wiped disk must never go unnoticed).
pub fn spawn_reconcile<S: Store>(gw: Arc<Gateway<S>>, nodes: Vec<(NodeId, [u8; 16])>) {
    if nodes.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let ids: HashSet<NodeId> = nodes.iter().map(|(n, _)| *n).collect();
        // Uploads under way may have put shards on the old disk whose stripe
        // records they have not written yet (they write them in batches):
        // the walk below cannot see those, so each such upload is waited
        // for and its stripes checked once it has ended.
        let in_flight = retry_index("listing uploads in flight", || live_intents(&gw)).await;
        queue_all(&gw, Some(&ids)).await;
        queue_after_uploads(&gw, in_flight, &ids, "the disk was replaced").await;
        // Only now does the index take the new disks (each on its own, so
        // one whose write keeps failing holds back no other).
        futures::future::join_all(
            nodes
                .into_iter()
                .map(|(node, uuid)| gw.nodes.reconciled(&gw.store, node, uuid)),
        )
        .await;
    });
}

/// Runs `f` until it succeeds, a second apart, saying why it failed.
async fn retry_index<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ApiError>>,
{
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                tracing::warn!(error = %e, "{what} failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The uploads (intents) not ended nor aborted.
pub(crate) async fn live_intents<S: Store>(gw: &Gateway<S>) -> Result<Vec<EvidenceId>, ApiError> {
    let mut live = Vec::new();
    let mut after = None;
    loop {
        let batch = indexer::run(&gw.store, |tx| async move {
            schema::intents_tx(&tx, after, SCAN_BATCH).await
        })
        .await?;
        let Some(&(last, _)) = batch.last() else {
            return Ok(live);
        };
        for (evidence, rec) in &batch {
            match rec {
                Some(r) if r.aborted => {}
                Some(_) => live.push(*evidence),
                // A newer gateway's (or damaged): taken as an upload under
                // way, whose shards may be on any node, until its record
                // is gone.
                None => {
                    tracing::warn!(%evidence, "an upload intent this gateway cannot decode; taken as under way");
                    live.push(*evidence);
                }
            }
        }
        after = Some(last);
    }
}

/// Waits until each upload of `uploads` has ended, then queues the
/// stripes of those that became evidence with a shard on one of `nodes`.
async fn queue_after_uploads<S: Store>(
    gw: &Gateway<S>,
    mut uploads: Vec<EvidenceId>,
    nodes: &HashSet<NodeId>,
    since: &str,
) {
    let mut said = false;
    while !uploads.is_empty() {
        let mut still = Vec::new();
        for e in uploads {
            // Under way (true), aborted (false), or ended (None).
            let intent = retry_index("reading an upload's intent", || async move {
                match indexer::run(&gw.store, |tx| async move {
                    schema::get_intent_tx(&tx, e).await
                })
                .await
                {
                    Ok(i) => Ok(i.map(|i| !i.aborted)),
                    // One this gateway cannot decode: under way until its
                    // record is gone (see `live_intents`).
                    Err(schema::SchemaError::Decode(_)) => Ok(Some(true)),
                    Err(e) => Err(e.into()),
                }
            })
            .await;
            match intent {
                Some(true) => still.push(e),
                // Aborted: never evidence; its shards go with it.
                Some(false) => {}
                None => {
                    retry_index("queueing an ended upload's stripes", || {
                        queue_stripes_of(gw, e, nodes)
                    })
                    .await;
                }
            }
        }
        uploads = still;
        if !uploads.is_empty() {
            if !std::mem::replace(&mut said, true) {
                tracing::info!(
                    uploads = uploads.len(),
                    ?nodes,
                    "waiting for uploads begun before {since}, to check their stripes"
                );
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
}

/// Queues the stripes of evidence `e` (if it is evidence, or a multipart
/// part in progress) with a shard on one of `nodes`.
async fn queue_stripes_of<S: Store>(
    gw: &Gateway<S>,
    e: EvidenceId,
    nodes: &HashSet<NodeId>,
) -> Result<(), ApiError> {
    let Some(owner) = indexer::run(&gw.store, |tx| async move {
        schema::stripes_of_tx(&tx, e).await
    })
    .await?
    else {
        return Ok(());
    };
    let header = owner.header();
    let mut from = 0;
    while from < header.stripes {
        let to = header.stripes.min(from + SCAN_BATCH as u64);
        let recs = indexer::run(&gw.store, |tx| async move {
            schema::get_stripes_tx(&tx, e, from..to).await
        })
        .await?;
        let hit: Vec<u64> = (from..to)
            .zip(&recs)
            .filter(|(_, rec)| needs_home(rec, nodes))
            .map(|(s, _)| s)
            .collect();
        if !hit.is_empty() {
            let hit: Vec<(EvidenceId, u64)> = hit.into_iter().map(|s| (e, s)).collect();
            mark_degraded(gw, &hit).await?;
            tracing::warn!(evidence = %e, stripes = hit.len(), "stripes of an upload that ended after the disk was replaced queued for repair");
            gw.repair_wake.notify_one();
        }
        from = to;
    }
    Ok(())
}

/// Queues every stripe with a shard on one of `nodes` (every stripe when
/// `None`: `custodia repair --verify-all` reads and checks all k+m shards of
/// everything) in the background, then wakes the repair worker.
pub fn spawn_queue_all<S: Store>(gw: Arc<Gateway<S>>, nodes: Option<HashSet<NodeId>>) {
    tokio::spawn(async move {
        queue_all(&gw, nodes.as_ref()).await;
    });
}

/// [`spawn_queue_all`]'s walk, awaited; returns how many stripes it queued.
pub async fn queue_all<S: Store>(gw: &Gateway<S>, nodes: Option<&HashSet<NodeId>>) -> Walked {
    let mut cursor = None;
    let mut walked = Walked::default();
    let hit = |rec: &StripeRecord| nodes.is_none_or(|nodes| needs_home(rec, nodes));
    loop {
        match queue_stripes(gw, &hit, &mut cursor).await {
            Ok((n, more)) => {
                walked.queued += n.queued;
                walked.unreadable += n.unreadable;
                if !more {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "queueing stripes for repair failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    match nodes {
        Some(nodes) => tracing::warn!(
            ?nodes,
            stripes = walked.queued,
            "stripes on a replaced disk queued for repair"
        ),
        None => tracing::info!(
            stripes = walked.queued,
            unreadable = walked.unreadable,
            "every stripe queued for verification"
        ),
    }
    gw.repair_wake.notify_one();
    walked
}

/// What a walk of every stripe record ([`queue_all`]) did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Walked {
    /// Stripes queued.
    pub queued: u64,
    /// Records that do not decode (damage, or a newer version's): passed
    /// over, so nothing is known of their shards.
    pub unreadable: u64,
}

/// Whether a stripe has a shard with no node, or on one of `nodes`.
fn needs_home(rec: &StripeRecord, nodes: &HashSet<NodeId>) -> bool {
    rec.shards
        .iter()
        .any(|p| p.node.is_none_or(|n| nodes.contains(&n)))
}

/// One batch of the walk over stripe records from `cursor`: queues those
/// `hit` picks. Returns (what it did, more to walk).
async fn queue_stripes<S: Store>(
    gw: &Gateway<S>,
    hit: &(dyn Fn(&StripeRecord) -> bool + Sync),
    cursor: &mut Option<(EvidenceId, u64)>,
) -> Result<(Walked, bool), ApiError> {
    let after = *cursor;
    let batch = indexer::run(&gw.store, |tx| async move {
        schema::stripes_scan_tx(&tx, after, SCAN_BATCH).await
    })
    .await?;
    gw.metrics.repair_scanned.inc_by(batch.len() as u64);
    let Some(&(e, s, _)) = batch.last() else {
        *cursor = None;
        return Ok((Walked::default(), false));
    };
    let unreadable = batch.iter().filter(|(_, _, rec)| rec.is_none()).count() as u64;
    let last = (e, s);
    let hit: Vec<(EvidenceId, u64)> = batch
        .iter()
        .filter(|(e, s, rec)| match rec {
            Some(rec) => hit(rec),
            None => {
                tracing::error!(evidence = %e, stripe = s, "a stripe record does not decode; passed over");
                false
            }
        })
        .map(|(e, s, _)| (*e, *s))
        .collect();
    if !hit.is_empty() {
        mark_degraded(gw, &hit).await?;
    }
    // Only past a batch that is marked: one whose marking failed is read
    // again on the retry, not passed over (a replaced disk's stripes would
    // otherwise stay a shard short, unqueued, once the new disk is recorded).
    *cursor = Some(last);
    let walked = Walked {
        queued: hit.len() as u64,
        unreadable,
    };
    Ok((walked, true))
}

/// Queues `stripes` for repair, in one transaction.
pub(crate) async fn mark_degraded<S: Store>(
    gw: &Gateway<S>,
    stripes: &[(EvidenceId, u64)],
) -> Result<(), ApiError> {
    indexer::run(&gw.store, |tx| async move {
        for (e, s) in stripes {
            schema::mark_degraded_tx(&tx, *e, *s);
        }
        Ok::<_, schema::SchemaError>(())
    })
    .await?;
    Ok(())
}

/// Counts a stripe in [`Gateway::repairing`] for as long as it lives.
struct Repairing<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Repairing<'a> {
    fn start<S: Store>(gw: &'a Gateway<S>) -> Self {
        gw.repairing
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Repairing(&gw.repairing)
    }
}

impl Drop for Repairing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A failure domain as placement counts it: a labelled one, or an
/// unlabelled node on its own.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Domain {
    Label(String),
    Node(NodeId),
}

impl Domain {
    pub(crate) fn of(label: Option<String>, node: NodeId) -> Self {
        label.map_or(Domain::Node(node), Domain::Label)
    }
}

/// Where the cluster's nodes stand, for spreading a stripe's shards over
/// failure domains: each node's domain, and which nodes could take a shard
/// now (active, answering, with room, not gone).
#[derive(Debug, Default)]
pub struct Spread {
    domains: HashMap<NodeId, Domain>,
    open: HashSet<NodeId>,
    /// How many open nodes each domain has.
    open_in: BTreeMap<Domain, usize>,
    /// Whether any node has a domain label. Without labels every node is
    /// its own domain and placement never puts two shards on one node, so
    /// there is nothing to look for.
    labelled: bool,
}

impl Spread {
    pub fn now<S: Store>(gw: &Gateway<S>, gone: &HashSet<NodeId>) -> Self {
        let view = gw.nodes.view();
        let labelled = view.iter().any(|n| n.domain.is_some());
        let open: HashSet<NodeId> = view
            .iter()
            .filter(|n| n.lifecycle == Lifecycle::Active && !gone.contains(&n.id))
            .filter(|n| gw.nodes.is_healthy(n.id) && !gw.nodes.is_full(n.id))
            .map(|n| n.id)
            .collect();
        let domains: HashMap<NodeId, Domain> = view
            .into_iter()
            .map(|n| (n.id, Domain::of(n.domain, n.id)))
            .collect();
        let mut open_in = BTreeMap::new();
        for n in &open {
            if let Some(d) = domains.get(n) {
                *open_in.entry(d.clone()).or_default() += 1;
            }
        }
        Spread {
            domains,
            open,
            open_in,
            labelled,
        }
    }

    /// Whether a stripe could be crowded at all: some labelled domain has
    /// two nodes or more (with one node per domain, placement never puts
    /// two shards in one).
    pub fn may_crowd(&self) -> bool {
        let mut seen = HashSet::new();
        self.labelled
            && self
                .domains
                .values()
                .filter(|d| matches!(d, Domain::Label(_)))
                .any(|d| !seen.insert(d))
    }

    /// `node`'s failure domain (one the view does not list is a domain of
    /// its own, as placement counts it).
    fn domain<S: Store>(&self, gw: &Gateway<S>, node: NodeId) -> Domain {
        self.domains
            .get(&node)
            .cloned()
            .unwrap_or_else(|| Domain::of(gw.nodes.domain(node), node))
    }

    /// The shards of `rec` to move so that its failure domains hold them as
    /// evenly as the nodes that could take one allow (see [`crowded`]).
    /// None while a shard has no node, or sits on a node not open to
    /// writes (down, draining, full): the stripe has other needs first, and
    /// every shard must be readable to move one.
    pub fn crowded(&self, rec: &StripeRecord) -> Vec<usize> {
        if !self.labelled {
            return Vec::new();
        }
        let mut held = Vec::with_capacity(rec.shards.len());
        for p in &rec.shards {
            match p.node.and_then(|n| Some((n, self.domains.get(&n)?))) {
                Some((n, d)) if self.open.contains(&n) => held.push(d.clone()),
                _ => return Vec::new(),
            }
        }
        // Open nodes not holding a shard of it: every holder is open, so
        // each takes one from its domain's count (twice if it holds two).
        let mut free = self.open_in.clone();
        let mut holders: Vec<NodeId> = rec.shards.iter().filter_map(|p| p.node).collect();
        holders.sort_unstable();
        holders.dedup();
        for n in holders {
            if let Some(c) = self.domains.get(&n).and_then(|d| free.get_mut(d)) {
                *c = c.saturating_sub(1);
            }
        }
        crowded(&held, &free)
    }
}

/// Which shards to move (indexes into `held`, the failure domain of each
/// shard's node) so that no domain holds two more of them than another
/// domain that could take one (`free`: domains with nodes open to a new
/// shard, and how many). Each move takes a shard from a fullest domain to
/// an emptiest open one, while that leaves both better off; every move
/// lowers the sum of the squared counts, so the moves end, and a spread
/// that cannot improve asks for none. With at least k+m open domains that
/// is one shard per domain, as placement put it; with fewer, as even as
/// they allow.
pub fn crowded(held: &[Domain], free: &BTreeMap<Domain, usize>) -> Vec<usize> {
    let mut members: BTreeMap<&Domain, Vec<usize>> = BTreeMap::new();
    for (i, d) in held.iter().enumerate() {
        members.entry(d).or_default().push(i);
    }
    let mut count: BTreeMap<&Domain, usize> = members.iter().map(|(d, m)| (*d, m.len())).collect();
    let mut free: BTreeMap<&Domain, usize> = free.iter().map(|(d, n)| (d, *n)).collect();
    let mut moves = Vec::new();
    while let Some((&from, &most)) = count.iter().max_by_key(|(_, c)| **c) {
        let Some((&to, least)) = free
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(d, _)| (d, count.get(d).copied().unwrap_or(0)))
            .min_by_key(|(_, c)| *c)
        else {
            break;
        };
        if least + 2 > most {
            break;
        }
        // The highest index of the fullest domain moves (any would do).
        let Some(i) = members.get_mut(from).and_then(|m| m.pop()) else {
            break;
        };
        moves.push(i);
        *count.entry(from).or_default() -= 1;
        *count.entry(to).or_default() += 1;
        *free.entry(to).or_default() -= 1;
    }
    moves.sort_unstable();
    moves
}

/// Whether placing `rebuild`'s shards on `homes` (in order) spreads the
/// stripe `rec` over failure domains more evenly than it is now.
fn evens_spread(
    rec: &StripeRecord,
    rebuild: &[usize],
    homes: &[NodeId],
    domain: impl Fn(NodeId) -> Domain,
) -> bool {
    let now = rec.shards.iter().filter_map(|p| p.node);
    let then = rec.shards.iter().enumerate().filter_map(|(i, p)| {
        match rebuild.iter().position(|&r| r == i) {
            Some(at) => homes.get(at).copied(),
            None => p.node,
        }
    });
    spread_cost(then.map(&domain)) < spread_cost(now.map(&domain))
}

/// The sum of the squared number of shards per failure domain: lower is
/// more even (what a move out of a crowded domain must lower).
fn spread_cost(domains: impl Iterator<Item = Domain>) -> usize {
    let mut count: HashMap<Domain, usize> = HashMap::new();
    for d in domains {
        *count.entry(d).or_default() += 1;
    }
    count.values().map(|c| c * c).sum()
}

/// The nodes a pass treats specially, as they were when it began.
#[derive(Debug, Default)]
pub struct PassNodes {
    /// Down past their grace, or removed: their shards need new homes.
    pub gone: HashSet<NodeId>,
    /// Removed from the cluster: their shards never come back. (A node
    /// merely down may return with its shards, so they do not count towards
    /// declaring a stripe lost.)
    pub removed: HashSet<NodeId>,
    /// Draining or removed: their shards move.
    pub draining: HashSet<NodeId>,
    /// Failure domains, and the nodes open to new shards.
    pub spread: Spread,
}

impl PassNodes {
    /// The gateway's view now.
    pub fn now<S: Store>(gw: &Gateway<S>) -> Self {
        let gone = gone_nodes(gw);
        PassNodes {
            spread: Spread::now(gw, &gone),
            gone,
            removed: gw
                .nodes
                .view()
                .into_iter()
                .filter(|n| n.lifecycle == Lifecycle::Removed)
                .map(|n| n.id)
                .chain(gw.nodes.removed_unlisted())
                .collect(),
            draining: gw.nodes.evacuating(),
        }
    }
}

/// One pass over up to [`PASS_STRIPES`] queued stripes from `cursor`, which
/// it moves on (wrapping round at the queue's end).
pub async fn pass<S: Store>(
    gw: &Arc<Gateway<S>>,
    cursor: &mut Option<(EvidenceId, u64)>,
) -> Result<PassReport, ApiError> {
    use futures::StreamExt as _;
    let take = |after: Option<(EvidenceId, u64)>| {
        indexer::run(&gw.store, move |tx| async move {
            schema::degraded_queue_tx(&tx, after, PASS_STRIPES).await
        })
    };
    let mut queued = take(*cursor).await?;
    if queued.is_empty() && cursor.is_some() {
        queued = take(None).await?;
    }
    *cursor = match queued.last() {
        Some((e, s, _)) if queued.len() == PASS_STRIPES => Some((*e, *s)),
        _ => None,
    };
    let nodes = Arc::new(PassNodes::now(gw));
    let mut report = PassReport::default();
    let mut outcomes = futures::stream::iter(queued)
        .map(|(evidence, stripe, mark)| {
            let (gw, nodes) = (gw.clone(), nodes.clone());
            async move {
                (
                    evidence,
                    stripe,
                    repair_stripe(&gw, evidence, stripe, &mark, &nodes).await,
                )
            }
        })
        .buffer_unordered(CONCURRENT_STRIPES);
    while let Some((evidence, stripe, outcome)) = outcomes.next().await {
        report.examined += 1;
        if matches!(
            outcome,
            Ok(Outcome::Healthy | Outcome::Repaired(_) | Outcome::Gone)
        ) {
            gw.repair_settled
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        match outcome {
            Ok(Outcome::Healthy) => report.healthy += 1,
            Ok(Outcome::Repaired(n)) => {
                report.repaired_stripes += 1;
                report.rebuilt_shards += n as u64;
            }
            Ok(Outcome::Lost) => report.lost += 1,
            Ok(Outcome::Waiting) => report.waiting += 1,
            Ok(Outcome::Gone) => report.gone += 1,
            Ok(Outcome::Elsewhere) => report.elsewhere += 1,
            Ok(Outcome::NoHome) => report.no_home += 1,
            Err(e) => {
                report.failed += 1;
                tracing::warn!(%evidence, stripe, error = %e, "stripe repair failed; will retry");
            }
        }
    }
    Ok(report)
}

/// Repairs one queued stripe; `mark` is its queue mark as the pass read it.
/// Holds the stripe's repair lease while it works, or leaves the stripe to
/// the task that holds it.
pub async fn repair_stripe<S: Store>(
    gw: &Arc<Gateway<S>>,
    evidence: EvidenceId,
    stripe: u64,
    mark: &[u8],
    nodes: &PassNodes,
) -> Result<Outcome, ApiError> {
    let Some(lease) = StripeLease::take(gw, evidence, stripe).await? else {
        return Ok(Outcome::Elsewhere);
    };
    let outcome = lease
        .renewed(gw, repair_leased(gw, &lease, mark, nodes))
        .await;
    // A repair that committed gave the lease up in its commit.
    if !matches!(outcome, Ok(Outcome::Repaired(_))) {
        lease.release(gw).await;
    }
    outcome
}

/// Stripes a read or a scrub here found damaged, for repair to check in
/// place while their shards have nowhere to move: their nodes hash their
/// shards (nothing moves), and only damage found goes on to be rebuilt.
/// Nothing else is checked so, so a pass while a node of a k+m cluster
/// stays gone reads nothing; latent damage is scrub's to find, and its
/// quarantine reports it here. (The stripe's queue mark is no such signal:
/// each walk for shards on gone nodes marks the stripe again.)
#[derive(Debug, Default)]
pub struct NoHomeChecks {
    damaged: std::sync::Mutex<std::collections::HashSet<(EvidenceId, u64)>>,
}

/// Stripes remembered (about 40 bytes each); past it, damage reported in
/// more waits for a home, as all did before.
const NO_HOME_KEPT: usize = 262_144;

impl NoHomeChecks {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<(EvidenceId, u64)>> {
        self.damaged
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the stripe off the list: whether damage was reported in it
    /// (with nowhere to move its shards, it is then checked in place; one
    /// repaired in full reads or checks every shard anyway).
    fn take(&self, evidence: EvidenceId, stripe: u64) -> bool {
        self.lock().remove(&(evidence, stripe))
    }

    /// A read or a scrub found a shard of the stripe damaged.
    pub(crate) fn damaged(&self, evidence: EvidenceId, stripe: u64) {
        let mut damaged = self.lock();
        if damaged.len() < NO_HOME_KEPT {
            damaged.insert((evidence, stripe));
        }
    }
}

/// Whether a node holding one of the stripe's shards (of `order`) finds it
/// damaged in place.
async fn damaged_in_place<S: Store>(
    gw: &Gateway<S>,
    evidence: EvidenceId,
    stripe: u64,
    rec: &StripeRecord,
    order: &[usize],
) -> bool {
    let checks = order
        .iter()
        .map(|&i| check_shard(gw, evidence, stripe, i, rec));
    futures::future::join_all(checks)
        .await
        .contains(&Checked::Damaged)
}

/// Repair leases this gateway found held by another task, and since when
/// (by its monotonic clock) each has read the same: one unchanged for
/// [`REPAIR_LEASE`] belongs to a task that died, and is taken over.
#[derive(Debug, Default)]
pub struct LeaseSightings {
    /// The lease as last found, when first found so, and when last looked.
    seen: std::sync::Mutex<Sightings>,
}

/// Sightings kept before those of stripes not looked at lately are dropped.
const SIGHTINGS_KEPT: usize = 65_536;

type Sightings = HashMap<(EvidenceId, u64), (RepairLease, Instant, Instant)>;

impl LeaseSightings {
    fn lock(&self) -> std::sync::MutexGuard<'_, Sightings> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The stripe's lease as watched unchanged for a whole lease period by
    /// `now`.
    fn stale(&self, evidence: EvidenceId, stripe: u64, now: Instant) -> Option<RepairLease> {
        self.lock()
            .get(&(evidence, stripe))
            .filter(|(_, since, _)| now.saturating_duration_since(*since) >= REPAIR_LEASE)
            .map(|(lease, ..)| *lease)
    }

    /// Notes the stripe's lease as found held at `now`.
    fn saw(&self, evidence: EvidenceId, stripe: u64, lease: RepairLease, now: Instant) {
        let mut seen = self.lock();
        if let Some((same, _, last)) = seen.get_mut(&(evidence, stripe)) {
            if *same == lease {
                *last = now;
                return;
            }
        }
        if seen.len() >= SIGHTINGS_KEPT {
            // Stripes not looked at for a while (their repair ended, or
            // nothing queues them any more).
            seen.retain(|_, (_, _, last)| now.saturating_duration_since(*last) < 4 * REPAIR_LEASE);
        }
        seen.insert((evidence, stripe), (lease, now, now));
    }

    fn forget(&self, evidence: EvidenceId, stripe: u64) {
        self.lock().remove(&(evidence, stripe));
    }
}

/// A stripe's repair lease as one task holds it. The owner is random per
/// task, not per gateway: a gateway's own tasks (a repair, the deletion of
/// an earlier repair's old copies, the orphan sweep) exclude each other too.
///
/// No clock is compared across machines. The holder counts its lease from
/// the start of its last renewal that succeeded, by its monotonic clock;
/// another task starts counting only once it sees that renewal, and takes
/// over only after [`REPAIR_LEASE`] more. So a holder that stays within
/// `REPAIR_LEASE - LEASE_MARGIN` of its last renewal still has the stripe
/// to itself.
pub(crate) struct StripeLease {
    evidence: EvidenceId,
    stripe: u64,
    owner: [u8; 16],
    /// When its last take or renewal that succeeded began.
    since: std::sync::Mutex<Instant>,
    /// A renewal found it taken over.
    lost: std::sync::atomic::AtomicBool,
    /// A delete it sent went unanswered: the node may still carry it out,
    /// so the lease is not given back but left to run out (see
    /// [`release`](Self::release)).
    unanswered: std::sync::atomic::AtomicBool,
}

impl StripeLease {
    /// Takes the stripe's lease; `None` while another task holds it (taking
    /// it over once it has read the same for [`REPAIR_LEASE`]).
    pub(crate) async fn take<S: Store>(
        gw: &Gateway<S>,
        evidence: EvidenceId,
        stripe: u64,
    ) -> Result<Option<Self>, ApiError> {
        let owner: [u8; 16] = rand::random();
        let stale = gw.repair_leases.stale(evidence, stripe, Instant::now());
        let began = Instant::now();
        let holder = indexer::run(&gw.store, |tx| async move {
            schema::take_repair_lease_tx(&tx, evidence, stripe, owner, stale).await
        })
        .await?;
        if let Some(holder) = holder {
            gw.repair_leases
                .saw(evidence, stripe, holder, Instant::now());
            return Ok(None);
        }
        if let Some(dead) = stale {
            tracing::debug!(%evidence, stripe, beat = dead.beat, "repair lease taken (over, if its holder had not given it up)");
        }
        gw.repair_leases.forget(evidence, stripe);
        Ok(Some(StripeLease {
            evidence,
            stripe,
            owner,
            since: std::sync::Mutex::new(began),
            lost: std::sync::atomic::AtomicBool::new(false),
            unanswered: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// Whether it is still this task's by its own clock, with
    /// [`LEASE_MARGIN`] to spare, and no renewal found it gone (no index
    /// read; [`held_tx`](Self::held_tx) adds one).
    fn fresh(&self) -> bool {
        !self.lost.load(std::sync::atomic::Ordering::Relaxed)
            && self.counted() + LEASE_MARGIN < REPAIR_LEASE
    }

    /// Time since its last take or renewal that succeeded began.
    fn counted(&self) -> Duration {
        self.since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .elapsed()
    }

    /// Runs `work`, renewing the lease every [`LEASE_RENEW`] until it ends
    /// (or until the lease is found taken over: the work's commit and
    /// deletes then find it not held, and do nothing).
    pub(crate) async fn renewed<S: Store, T>(
        &self,
        gw: &Gateway<S>,
        work: impl std::future::Future<Output = T>,
    ) -> T {
        let renew = async {
            loop {
                tokio::time::sleep(LEASE_RENEW).await;
                let (evidence, stripe, owner) = (self.evidence, self.stripe, self.owner);
                let began = Instant::now();
                match indexer::run(&gw.store, |tx| async move {
                    schema::renew_repair_lease_tx(&tx, evidence, stripe, owner).await
                })
                .await
                {
                    Ok(true) => {
                        *self
                            .since
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = began;
                    }
                    Ok(false) => {
                        self.lost.store(true, std::sync::atomic::Ordering::Relaxed);
                        tracing::info!(%evidence, stripe, "repair lease no longer this task's (given up, or taken over): it commits and deletes nothing more");
                        return;
                    }
                    // Tried again at the next renewal.
                    Err(e) => {
                        tracing::warn!(%evidence, stripe, error = %e, "could not renew a repair lease")
                    }
                }
            }
        };
        let work = std::pin::pin!(work);
        let renew = std::pin::pin!(renew);
        match futures::future::select(work, renew).await {
            futures::future::Either::Left((out, _)) => out,
            futures::future::Either::Right(((), work)) => work.await,
        }
    }

    /// Whether it is still held, with [`LEASE_MARGIN`] to spare, checked in
    /// `tx` (what a commit checks in its own transaction).
    async fn held_tx<T: indexer::Transaction>(&self, tx: &T) -> Result<bool, schema::SchemaError> {
        Ok(self.fresh()
            && schema::holds_repair_lease_tx(tx, self.evidence, self.stripe, self.owner).await?)
    }

    /// Whether it is still held with [`LEASE_MARGIN`] to spare (false when
    /// the index cannot say).
    async fn held<S: Store>(&self, gw: &Gateway<S>) -> bool {
        match indexer::run(&gw.store, |tx| async move { self.held_tx(&tx).await }).await {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(evidence = %self.evidence, stripe = self.stripe, error = %e, "could not read a repair lease");
                false
            }
        }
    }

    /// Gives it up in `tx`, if it is still this task's.
    async fn release_tx<T: indexer::Transaction>(&self, tx: &T) -> Result<(), schema::SchemaError> {
        schema::release_repair_lease_tx(tx, self.evidence, self.stripe, self.owner).await
    }

    /// Gives it up (a failure only leaves it to be taken over). Not after a
    /// delete that went unanswered: that delete may still land on its node,
    /// and a repair taking the stripe at once could have just placed the
    /// shard there again. Left to run out, the lease keeps every other
    /// task off the stripe for [`REPAIR_LEASE`] first.
    pub(crate) async fn release<S: Store>(&self, gw: &Gateway<S>) {
        if self.unanswered.load(std::sync::atomic::Ordering::Relaxed) {
            tracing::debug!(evidence = %self.evidence, stripe = self.stripe, "a delete went unanswered: the repair lease is left to run out");
            return;
        }
        if let Err(e) =
            indexer::run(&gw.store, |tx| async move { self.release_tx(&tx).await }).await
        {
            tracing::warn!(evidence = %self.evidence, stripe = self.stripe, error = %e, "could not give a repair lease up; another task takes it over later");
        }
    }

    /// Adopts the copy of shard `key` on `node` into its stripe's record,
    /// once the node has just re-hashed it to the record's BLAKE3: in the
    /// slot of a copy the record has no node for (`replacing` `None`: a
    /// copy the index lost track of, left on a node that was down while
    /// `recover-index` ran, say), or of the copy on node `replacing`, found
    /// missing or damaged there. Committed under the lease, with the
    /// stripe's compare-and-set, like a repair; the stripe stays queued for
    /// repair to re-count. Returns whether it was adopted.
    pub(crate) async fn adopt<S: Store>(
        &self,
        gw: &Gateway<S>,
        addr: std::net::SocketAddr,
        node: NodeId,
        key: ShardKey,
        replacing: Option<NodeId>,
    ) -> Result<bool, ApiError> {
        if key.evidence != self.evidence || key.stripe != self.stripe {
            return Ok(false);
        }
        let back = match gw.nodes.client.rpc_verify_shard(addr, key).await {
            Ok(back) => back,
            // The node answered: the copy is gone or does not verify.
            Err(storage_node::client::NodeError::Remote(
                code @ (ErrorCode::NotFound | ErrorCode::Corrupt | ErrorCode::HashMismatch),
            )) => {
                tracing::debug!(%node, shard = %key, ?code, "a copy to adopt did not verify");
                return Ok(false);
            }
            // Not looked at: the sweep that asked is not complete.
            Err(e) => {
                return Err(ApiError::Unavailable(format!(
                    "node {node} did not verify a copy of {key} to adopt: {e}"
                )))
            }
        };
        let adopted = indexer::run(&gw.store, |tx| {
            let back = &back;
            async move {
                let Some(seen) = schema::get_stripe_tx(&tx, key.evidence, key.stripe).await? else {
                    return Ok(false);
                };
                // The record's hash of the shard, or none known (zeros:
                // recovery could not read the stripe back). Then the node's
                // own check of the copy against its header is what there
                // is, as in recovery; reads still check the content root.
                let fits = seen.shards.get(key.index as usize).is_some_and(|slot| {
                    slot.node == replacing
                        && (slot.blake3 == back.blake3
                            || (replacing.is_none()
                                && slot.blake3 == protocol::ShardPlacement::UNKNOWN_HASH))
                        && seen.shard_len == back.len
                });
                let Some(owner) = schema::stripes_of_tx(&tx, key.evidence).await? else {
                    return Ok(false);
                };
                let fits = fits && back.code == owner.header().code;
                if !fits
                    || seen.shards.iter().any(|s| s.node == Some(node))
                    || !self.held_tx(&tx).await?
                {
                    return Ok(false);
                }
                let mut new = seen.clone();
                new.shards[key.index as usize].node = Some(node);
                new.shards[key.index as usize].blake3 = back.blake3;
                let done =
                    schema::commit_repair_tx(&tx, key.evidence, key.stripe, &seen, &new, None)
                        .await?;
                if done == schema::RepairCommit::Done {
                    schema::mark_degraded_tx(&tx, key.evidence, key.stripe);
                }
                Ok::<_, schema::SchemaError>(done == schema::RepairCommit::Done)
            }
        })
        .await?;
        match (adopted, replacing) {
            (false, _) => {}
            (true, None) => {
                tracing::info!(%node, shard = %key, "a copy the index had no node for was adopted")
            }
            (true, Some(bad)) => {
                tracing::warn!(%node, shard = %key, %bad, "a copy was adopted in place of the recorded one, missing or damaged on its node")
            }
        }
        Ok(adopted)
    }

    /// Deletes one copy of a shard of its stripe: only while the index still
    /// names this task and its own count leaves [`LEASE_MARGIN`]. The
    /// gateway waits for the answer only as long as the lease has left (no
    /// other task can take it over before then), and the node carries the
    /// delete out only until then by its own clock (corrected by the offset
    /// last measured, less [`DELETE_FENCE_MARGIN`]): a request the network,
    /// a pause of this process or the node's busy disk holds past the lease
    /// is refused there, never landing on a copy another gateway has placed
    /// there again since. `None`: not attempted.
    pub(crate) async fn delete_shard<S: Store>(
        &self,
        gw: &Gateway<S>,
        (node, addr): (NodeId, std::net::SocketAddr),
        key: ShardKey,
    ) -> Option<Result<bool, String>> {
        if key.evidence != self.evidence || key.stripe != self.stripe || !self.held(gw).await {
            return None;
        }
        let left = REPAIR_LEASE
            .saturating_sub(self.counted())
            .saturating_sub(LEASE_MARGIN / 4);
        // No usable offset now (its probe did not answer the time, or too
        // slowly to bound the error, for a while), or too little of the
        // lease left: not attempted, the copy left for the orphan sweep.
        let not_after_ms = delete_fence(
            crate::clock::wall_ms(),
            left,
            gw.nodes.clock_offset_ms(node)?,
        )?;
        let delete = gw
            .nodes
            .client
            .rpc_delete_shard_before(addr, key, not_after_ms);
        Some(match tokio::time::timeout(left, delete).await {
            Ok(Ok(existed)) => Ok(existed),
            Ok(Err(e)) => {
                // Answered with an error, or never sent: nothing left to
                // land later. Anything else may have reached the node.
                use storage_node::client::NodeError as E;
                let settled =
                    matches!(e, E::Remote(_) | E::Tls(_) | E::Endpoint(_) | E::Connect(_));
                if !settled {
                    self.unanswered
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e.to_string())
            }
            Err(_) => {
                self.unanswered
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                Err("no answer within the lease".to_owned())
            }
        })
    }

    /// Deletes `copies` of shards of its stripe, each as [`delete_shard`]
    /// (Self::delete_shard) does; the rest are left for the orphan sweep
    /// once the lease is not held.
    async fn delete<S: Store>(&self, gw: &Gateway<S>, copies: &[(usize, NodeId)]) {
        for (n, &(i, node)) in copies.iter().enumerate() {
            let Some(addr) = gw.nodes.addr(node) else {
                continue;
            };
            let key = ShardKey {
                evidence: self.evidence,
                stripe: self.stripe,
                index: i as u8,
            };
            match self.delete_shard(gw, (node, addr), key).await {
                // Not sent, the lease still held: no usable clock offset
                // for the node now (see `delete_shard`), so no fenced
                // delete. Its copy is left for the orphan sweep; the
                // others still go.
                None if self.held(gw).await => {
                    tracing::debug!(shard = %key, %node, "node's clock offset not known now: its copy is left for the orphan sweep");
                }
                None => {
                    tracing::warn!(evidence = %self.evidence, stripe = self.stripe, left = copies.len() - n, "repair lease no longer held: copies left for the orphan sweep");
                    return;
                }
                Some(Ok(_)) => {}
                // Left behind: an orphan for the sweep.
                Some(Err(e)) => {
                    tracing::debug!(shard = %key, %node, error = %e, "could not delete a shard copy")
                }
            }
        }
    }
}

async fn repair_leased<S: Store>(
    gw: &Arc<Gateway<S>>,
    lease: &StripeLease,
    mark: &[u8],
    nodes: &PassNodes,
) -> Result<Outcome, ApiError> {
    let (evidence, stripe) = (lease.evidence, lease.stripe);
    let (gone, draining) = (&nodes.gone, &nodes.draining);
    let started = std::time::Instant::now();
    let (owner, rec, pending) = indexer::run(&gw.store, |tx| async move {
        // Visible evidence's stripes, or a stored part's of a multipart
        // upload in progress (repaired alike, so a drain or a lost node
        // does not wait on uploads left open for days).
        let owner = schema::stripes_of_tx(&tx, evidence).await?;
        let rec = schema::get_stripe_tx(&tx, evidence, stripe).await?;
        // Records of neither: an upload still in flight (its intent live)
        // will become visible (or a part); an aborted one is the
        // collector's, and so are expunged evidence and the parts of an
        // ended upload (their records stay until their shards are
        // deleted). A part stored by a build before parts could be found
        // by id waits for its upload to end.
        let pending = owner.is_none()
            && rec.is_some()
            && !schema::get_intent_tx(&tx, evidence)
                .await?
                .is_some_and(|i| i.aborted)
            && schema::get_expunged_tx(&tx, evidence).await?.is_none();
        Ok::<_, schema::SchemaError>((owner, rec, pending))
    })
    .await?;
    if pending {
        return Ok(Outcome::Waiting);
    }
    let (Some(owner), Some(rec)) = (owner, rec) else {
        // Expunged, or an upload that never became visible: not ours.
        indexer::run(&gw.store, |tx| async move {
            schema::clear_degraded_tx(&tx, evidence, stripe);
            Ok::<_, schema::SchemaError>(())
        })
        .await?;
        return Ok(Outcome::Gone);
    };
    let header = owner.header();
    let (k, m) = (header.code.data_shards(), header.code.parity_shards());
    let total = k + m;
    if rec.shards.len() != total {
        tracing::error!(%evidence, stripe, "stripe record does not match its code; not repairing");
        return Ok(Outcome::Waiting);
    }

    // 1. Read and check shards against the manifest's hashes. A node that is
    // gone or not answering is not asked (each request would wait for its
    // timeout). A stripe queued because shards sit on gone nodes (a dead
    // node's thousands of stripes) reads only k good shards, data first and
    // draining nodes last: the k in of "k in, one out"; each other shard is
    // checked where it lies, by its node (a local read and hash, no
    // transfer), at the same time. Any other stripe (a read or scrub met
    // damage, a disk was replaced, --verify-all) reads every shard, since
    // which one is bad is not known. Either way every shard is re-counted
    // before the stripe leaves the queue.
    // A node removed and dropped from the configuration is in `gone`. One
    // this gateway does not list but the index does not call removed (a
    // node added since this gateway started) is only waited for: another
    // gateway may be writing to it.
    let homeless: Vec<usize> = (0..total)
        .filter(|i| rec.shards[*i].node.is_none_or(|n| gone.contains(&n)))
        .collect();
    let mut order: Vec<usize> = (0..total)
        .filter(|i| {
            rec.shards[*i]
                .node
                .is_some_and(|n| !gone.contains(&n) && gw.nodes.is_healthy(n))
        })
        .collect();
    order.sort_by_key(|i| {
        (
            rec.shards[*i].node.is_some_and(|n| draining.contains(&n)),
            *i,
        )
    });
    // Shards to move with nowhere to go: found before any shard is read or
    // decoded, or every pass would read and decode each such stripe (a
    // whole dataset, while a node of a k+m cluster stays gone) for nothing.
    // A loss only damage could reveal waits for a home too; one the
    // shards' homes already show (more than m gone) is recorded below.
    // Shards on draining nodes need homes as much as lost ones (a drain
    // with nowhere to go otherwise read and decoded every stripe of it,
    // every pass, to fail at the end).
    let on_draining: Vec<usize> = (0..total)
        .filter(|i| rec.shards[*i].node.is_some_and(|n| draining.contains(&n)))
        .collect();
    let moving: Vec<usize> = homeless
        .iter()
        .chain(on_draining.iter().filter(|i| !homeless.contains(i)))
        .copied()
        .collect();
    // Some homes but too few: those there are are used, and the stripe
    // stays queued for the rest. None at all: a shard rotting on its own
    // node can still be rebuilt there (rather than leave the stripe short
    // of two shards until a node is added), so once a read or a scrub
    // reports damage in the stripe its nodes check their shards in place
    // (they hash them; nothing moves), and only damage found goes on.
    if !moving.is_empty() && homeless.len() <= m {
        let holders = holders_except(&rec, &moving);
        let targets = choose_targets(gw, evidence, stripe, &holders, &rec, nodes, moving.len());
        if targets.is_empty()
            && (!gw.no_home.take(evidence, stripe)
                || !damaged_in_place(gw, evidence, stripe, &rec, &order).await)
        {
            return Ok(Outcome::NoHome);
        }
    }
    gw.no_home.take(evidence, stripe);
    // Shards crowded into one failure domain (placed while another domain
    // was down or full, or before one was added) move as a drain's do,
    // each copied from its node to one in an emptier domain: only once
    // nothing else ails the stripe, and only while the move makes its
    // spread more even, so that no shard moves back and forth.
    let mut relocating = on_draining;
    // Whether `relocating` are crowded shards (moved only to even the
    // spread, which their final homes must then still do).
    let mut crowding = false;
    if moving.is_empty() && order.len() == total {
        let crowded = nodes.spread.crowded(&rec);
        if !crowded.is_empty() {
            let holders = holders_except(&rec, &crowded);
            let targets =
                choose_targets(gw, evidence, stripe, &holders, &rec, nodes, crowded.len());
            let domain = |n: &NodeId| nodes.spread.domain(gw, *n);
            let before = spread_cost(
                rec.shards
                    .iter()
                    .filter_map(|p| p.node.as_ref())
                    .map(domain),
            );
            let after = spread_cost(holders.iter().chain(&targets).map(domain));
            if targets.len() == crowded.len() && after < before {
                relocating = crowded;
                crowding = true;
            }
        }
    }
    let want = if homeless.is_empty() { order.len() } else { k };
    let mut shards: Vec<Option<Vec<u8>>> = vec![None; total];
    let mut rebuild: Vec<usize> = homeless.clone();
    // Of `rebuild`, the shards their own (reachable) node reported damaged.
    let mut damaged: Vec<usize> = Vec::new();
    // Shards that can never be read again: damaged, or on a removed node,
    // or with no node once no copy left by a recovery awaits adoption (see
    // `Gateway::homeless_adopted`). (Those on nodes merely down may come
    // back, and so may a copy recovery could not place, on a node down
    // while it ran.)
    let swept = gw
        .homeless_adopted
        .load(std::sync::atomic::Ordering::Relaxed);
    let mut bad_for_good = homeless
        .iter()
        .filter(|i| match rec.shards[**i].node {
            None => swept,
            Some(n) => nodes.removed.contains(&n),
        })
        .count();
    let spare: Vec<usize> = order.iter().skip(want).copied().collect();
    // Two common cases need no shard to pass through this gateway. One
    // shard lost with its node, every other in place: the node that will
    // hold it rebuilds it from k others itself, so k shards move instead
    // of k in and one back out. Shards on draining nodes or crowded into
    // one domain, every shard reachable: each is copied by its new node
    // from its old one, one shard moving instead of all k+m in and one
    // out. The rest is checked in place by its nodes either way. Anything
    // else (damage found, an older node, a source that cannot be read) is
    // rebuilt here.
    let remote = match (&homeless[..], relocating.is_empty()) {
        ([lost], true) if order.len() >= k => {
            Some((vec![(*lost, order[..k].to_vec())], spare.clone()))
        }
        ([], false) if order.len() == total => Some((
            relocating.iter().map(|&i| (i, vec![i])).collect(),
            order
                .iter()
                .copied()
                .filter(|i| !relocating.contains(i))
                .collect(),
        )),
        _ => None,
    };
    // A shard whose hash nobody knows (a slot `recover-index` found no copy
    // of) cannot be checked by the node that would build it: it is rebuilt
    // here, from k shards that each matched their hash, and takes the hash
    // of what they give.
    let unknown = |moves: &[(usize, Vec<usize>)]| {
        moves
            .iter()
            .any(|(i, _)| rec.shards[*i].blake3 == protocol::ShardPlacement::UNKNOWN_HASH)
    };
    // A build a node would refuse (its sources and result past the memory
    // all its bodies share: a code of many large shards) is done here, not
    // asked for and counted as a failure of node-side builds.
    let shard_mib = (header.code.shard_size as usize).div_ceil(1 << 20).max(1);
    let fits = |moves: &[(usize, Vec<usize>)]| {
        moves
            .iter()
            .all(|(_, from)| (from.len() + 1) * shard_mib <= storage_node::server::BODY_MEMORY_MIB)
    };
    if let Some((moves, in_place)) = remote
        .filter(|(moves, _)| !unknown(moves))
        .filter(|(moves, _)| fits(moves))
        .filter(|_| gw.remote_builds.allowed())
    {
        if let Some(outcome) =
            rebuild_on_targets(gw, lease, &owner, &rec, &moves, &in_place, mark, nodes).await?
        {
            return Ok(outcome);
        }
        // Its cleanup sent a delete that got no answer: that delete may yet
        // land on the very node a rebuild here would choose again, after
        // the new copy was counted. The next pass, under a new lease, does it.
        if lease.unanswered.load(std::sync::atomic::Ordering::Relaxed) {
            recycle(gw, shards);
            return Ok(Outcome::Waiting);
        }
    }
    // Filings yield part of the machine while shards pass through here.
    let _yield = Repairing::start(gw);
    let checks = futures::future::join_all(spare.iter().map(|&i| {
        let rec = &rec;
        async move { (i, check_shard(gw, evidence, stripe, i, rec).await) }
    }));
    let reads = async {
        let mut next = 0usize;
        loop {
            let good = shards.iter().flatten().count();
            let ask = want.saturating_sub(good).min(order.len() - next);
            if ask == 0 {
                break;
            }
            let batch = &order[next..next + ask];
            next += ask;
            let fetched = futures::future::join_all(batch.iter().map(|&i| {
                let rec = &rec;
                async move { (i, fetch_shard(gw, evidence, stripe, i, rec, true).await) }
            }))
            .await;
            for (i, outcome) in fetched {
                match outcome {
                    ShardOutcome::Good(b) => shards[i] = Some(b),
                    ShardOutcome::Damaged => {
                        bad_for_good += 1;
                        rebuild.push(i);
                        damaged.push(i);
                    }
                    // Rebuilt elsewhere, but no proof it is gone for good.
                    ShardOutcome::Unreadable => rebuild.push(i),
                    // Within its node's grace period a shard is only waited for.
                    ShardOutcome::Unreachable => {}
                }
            }
        }
    };
    let (checked, ()) = futures::join!(checks, reads);
    let mut checked_good = vec![false; total];
    for (i, c) in checked {
        match c {
            Checked::Good => checked_good[i] = true,
            Checked::Damaged if !rebuild.contains(&i) => {
                bad_for_good += 1;
                rebuild.push(i);
                damaged.push(i);
            }
            Checked::Damaged | Checked::Unreachable => {}
        }
    }
    // Shards on draining nodes or crowded into one domain move (their
    // bodies were read or are rebuilt).
    for &i in &relocating {
        if !rebuild.contains(&i) {
            rebuild.push(i);
        }
    }
    rebuild.sort_unstable();
    // Whether every shard was read or checked good, or is about to be
    // rebuilt and read back: only then may the stripe leave the queue.
    let all_counted =
        (0..total).all(|i| shards[i].is_some() || checked_good[i] || rebuild.contains(&i));
    let good = shards.iter().flatten().count();
    if rebuild.is_empty() && all_counted {
        recycle(gw, shards);
        found_whole(gw, &owner, stripe, mark).await?;
        return Ok(Outcome::Healthy);
    }
    if good < k {
        recycle(gw, shards);
        if bad_for_good > m {
            record_lost(gw, &owner, stripe).await?;
            return Ok(Outcome::Lost);
        }
        return Ok(Outcome::Waiting);
    }
    if rebuild.is_empty() {
        recycle(gw, shards);
        return Ok(Outcome::Waiting); // only unreachable shards, within grace
    }

    // The stripe's records and its shards read (`read_ms`).
    let read = started.elapsed();
    // 2. Rebuild from k good shards.
    let rs = gw
        .codec(k, m)
        .map_err(|e| ApiError::Unavailable(format!("codec RS({k},{m}): {e:?}")))?;
    let mut shards =
        tokio::task::spawn_blocking(move || rs.reconstruct(&mut shards).map(|()| shards))
            .await
            .map_err(|_| ApiError::Internal)?
            .map_err(|e| ApiError::Unavailable(format!("reconstruction: {e:?}")))?;

    let rebuilt = started.elapsed();
    let rebuilt_wanted = rebuild.len();
    // 3. New homes, then write, then re-read.
    let holders = holders_except(&rec, &rebuild);
    let targets = choose_targets(gw, evidence, stripe, &holders, &rec, nodes, rebuild.len());
    let homes = homes_for(gw, &rec, &rebuild, &damaged, &relocating, nodes, targets);
    if homes.iter().all(Option::is_none) {
        recycle(gw, shards);
        return Err(ApiError::Unavailable(format!(
            "too few nodes can take the {} rebuilt shards",
            rebuild.len()
        )));
    }
    // Shards left without a home keep the stripe queued.
    let (rebuild, homes): (Vec<usize>, Vec<NodeId>) = rebuild
        .iter()
        .zip(homes)
        .filter_map(|(&i, home)| Some((i, home?)))
        .unzip();
    // Crowded shards move only to a more even spread. The homes chosen
    // here may not be those the move was judged by (its node-to-node copy
    // failed: the target full, or its disk failing, and passed over now):
    // moved to the next node free, three shards could share one domain
    // where two did. Such shards stay; damage found meanwhile is still
    // rebuilt, its homes chosen again with those shards staying (they
    // were chosen as if the crowded shards left their domain).
    let (rebuild, homes) =
        if crowding && !evens_spread(&rec, &rebuild, &homes, |n| nodes.spread.domain(gw, n)) {
            let keep: Vec<usize> = rebuild
                .iter()
                .copied()
                .filter(|i| !relocating.contains(i) || damaged.contains(i))
                .collect();
            let holders = holders_except(&rec, &keep);
            let targets = choose_targets(gw, evidence, stripe, &holders, &rec, nodes, keep.len());
            let homes = homes_for(gw, &rec, &keep, &damaged, &[], nodes, targets);
            keep.iter()
                .zip(homes)
                .filter_map(|(&i, home)| Some((i, home?)))
                .unzip()
        } else {
            (rebuild, homes)
        };
    if rebuild.is_empty() {
        recycle(gw, shards);
        return Ok(Outcome::Waiting);
    }
    let all_counted = all_counted && rebuild.len() == rebuilt_wanted;
    let mut next = rec.clone();
    let mut written: Vec<(usize, NodeId)> = Vec::new();
    for &i in &rebuild {
        if rec.shards[i].blake3 == protocol::ShardPlacement::UNKNOWN_HASH {
            if let Some(body) = &shards[i] {
                next.shards[i].blake3 = Blake3Hash::of(body);
            }
        }
    }
    let writes = rebuild.iter().zip(&homes).map(|(&i, &node)| {
        // Back to the receive pool the next stripe's reads take from.
        let body = gw.nodes.client.share(shards[i].take().unwrap_or_default());
        let header = shard_header(header, stripe, &next, i);
        async move { (i, node, put_and_verify(gw, node, &header, body).await) }
    });
    let results = futures::future::join_all(writes).await;
    recycle(gw, std::mem::take(&mut shards));
    let mut failed = None;
    for (i, node, r) in results {
        match r {
            Ok(()) => {
                written.push((i, node));
                next.shards[i].node = Some(node);
            }
            Err(e) => failed = Some(e),
        }
    }
    if let Some(e) = failed {
        // Copies this repair will not commit (left for the orphan sweep if
        // the lease is no longer held).
        lease.delete(gw, &written).await;
        return Err(e);
    }

    let stored = started.elapsed();
    let outcome = commit_repair(
        gw,
        lease,
        &owner,
        &rec,
        &next,
        &written,
        &rebuild,
        all_counted,
        mark,
        gone,
    )
    .await?;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    tracing::debug!(
        %evidence,
        stripe,
        read_ms = ms(read),
        rebuild_ms = ms(rebuilt - read),
        store_ms = ms(stored - rebuilt),
        commit_ms = ms(started.elapsed() - stored),
        "stripe repair timings"
    );
    Ok(outcome)
}

/// Has a node chosen for each shard in `moves` build it from the shards
/// listed beside it (k others: a rebuild; the shard itself: a copy) and
/// re-read it, while the `in_place` shards are checked by their own nodes;
/// then commits as a rebuild here would. `None` when it could not: the
/// caller rebuilds through this gateway.
#[allow(clippy::too_many_arguments)]
async fn rebuild_on_targets<S: Store>(
    gw: &Arc<Gateway<S>>,
    lease: &StripeLease,
    owner: &schema::StripesOf,
    rec: &StripeRecord,
    moves: &[(usize, Vec<usize>)],
    in_place: &[usize],
    mark: &[u8],
    nodes: &PassNodes,
) -> Result<Option<Outcome>, ApiError> {
    let header = owner.header();
    let (evidence, stripe) = (header.evidence, lease.stripe);
    let gone = &nodes.gone;
    let moved: Vec<usize> = moves.iter().map(|(i, _)| *i).collect();
    let holders = holders_except(rec, &moved);
    let targets = choose_targets(gw, evidence, stripe, &holders, rec, nodes, moves.len());
    if targets.len() < moves.len() {
        return Ok(None);
    }
    let mut requests = Vec::with_capacity(moves.len());
    for ((index, sources), &target) in moves.iter().zip(&targets) {
        let Some(target_addr) = gw.nodes.addr(target) else {
            return Ok(None);
        };
        let mut from = Vec::with_capacity(sources.len());
        for &i in sources {
            let Some(addr) = rec.shards[i].node.and_then(|n| gw.nodes.addr(n)) else {
                return Ok(None);
            };
            from.push(RebuildSource {
                addr,
                index: i as u8,
                blake3: rec.shards[i].blake3,
            });
        }
        let request = RebuildShard {
            header: shard_header(header, stripe, rec, *index),
            sources: from,
        };
        requests.push((*index, target, target_addr, request));
    }
    let client = &gw.nodes.client;
    let checks = futures::future::join_all(
        in_place
            .iter()
            .map(|&i| async move { (i, check_shard(gw, evidence, stripe, i, rec).await) }),
    );
    let builds = futures::future::join_all(requests.iter().map(
        |(_, target, addr, request)| async move {
            client
                .rpc_rebuild_shard(*addr, request)
                .await
                // Full, or its own disk failing (a source's is
                // SourceUnavailable): the next pass chooses another.
                .inspect_err(|e| gw.nodes.write_refused(*target, e))?;
            gw.nodes.write_succeeded(*target);
            // Re-counted from the disk, as a shard written from here is.
            let key = request.header.key;
            let back = client.rpc_verify_shard(*addr, key).await?;
            Ok::<_, NodeError>(
                back.blake3 == request.header.blake3 && back.len == request.header.len,
            )
        },
    ));
    let (checked, built) = futures::join!(checks, builds);
    let written: Vec<(usize, NodeId)> = requests.iter().map(|(i, t, ..)| (*i, *t)).collect();
    let failed = built.iter().any(|b| !matches!(b, Ok(true)));
    if failed {
        gw.remote_builds.failed();
    } else {
        gw.remote_builds.succeeded();
    }
    if failed || checked.iter().any(|(_, c)| *c == Checked::Damaged) {
        tracing::debug!(%evidence, stripe, outcome = ?built, "building on the target nodes failed or met damage; rebuilding here");
        // A refusal stored nothing; anything else may have stored a copy,
        // and the rebuild here may choose other nodes.
        let stored: Vec<(usize, NodeId)> = written
            .iter()
            .zip(&built)
            .filter(|(_, b)| {
                !matches!(
                    b,
                    Err(NodeError::Remote(
                        ErrorCode::SourceUnavailable
                            | ErrorCode::BadRequest
                            | ErrorCode::HashMismatch
                    ))
                )
            })
            .map(|(w, _)| *w)
            .collect();
        lease.delete(gw, &stored).await;
        return Ok(None);
    }
    // Every shard counted: built and read back, hashed as a source by the
    // node that read it, or checked good in place. A shard none of these
    // reached (its node not healthy just now) keeps the stripe queued.
    let all_counted = (0..rec.shards.len()).all(|i| {
        moved.contains(&i)
            || moves.iter().any(|(_, sources)| sources.contains(&i))
            || checked.iter().any(|(j, c)| *j == i && *c == Checked::Good)
    });
    let mut next = rec.clone();
    for &(i, target) in &written {
        next.shards[i].node = Some(target);
    }
    let outcome = commit_repair(
        gw,
        lease,
        owner,
        rec,
        &next,
        &written,
        &moved,
        all_counted,
        mark,
        gone,
    )
    .await?;
    Ok(Some(outcome))
}

/// The nodes holding the stripe's shards other than those in `moving`.
fn holders_except(rec: &StripeRecord, moving: &[usize]) -> Vec<NodeId> {
    rec.shards
        .iter()
        .enumerate()
        .filter(|(i, _)| !moving.contains(i))
        .filter_map(|(_, p)| p.node)
        .collect()
}

/// The header of shard `index` of `stripe`, as its manifest names it.
fn shard_header(
    header: &ManifestHeader,
    stripe: u64,
    rec: &StripeRecord,
    index: usize,
) -> ShardHeader {
    let sr = header.code.layout(header.size).stripe_range(stripe);
    ShardHeader {
        key: ShardKey {
            evidence: header.evidence,
            stripe,
            index: index as u8,
        },
        code: header.code,
        stripe_len: sr.end - sr.start,
        len: rec.shard_len,
        blake3: rec.shards[index].blake3,
    }
}

/// Steps 4 and 5: commits the new placement `next` (the shards `written`
/// in place of `rebuilt`) with a compare-and-set against `rec` and the
/// `repaired` statement, taking the stripe off the queue if every shard was
/// counted; then deletes the old copies still reachable after the grace.
/// A lost race deletes the copies just written.
#[allow(clippy::too_many_arguments)]
async fn commit_repair<S: Store>(
    gw: &Arc<Gateway<S>>,
    lease: &StripeLease,
    owner: &schema::StripesOf,
    rec: &StripeRecord,
    next: &StripeRecord,
    written: &[(usize, NodeId)],
    rebuilt: &[usize],
    all_counted: bool,
    mark: &[u8],
    gone: &HashSet<NodeId>,
) -> Result<Outcome, ApiError> {
    let (evidence, stripe) = (owner.header().evidence, lease.stripe);
    let detail = serde_json::json!({
        "stripe": stripe,
        "shards": written.iter().map(|(i, n)| serde_json::json!({"index": i, "node": n.0})).collect::<Vec<_>>(),
    });
    let pending = statement(gw, owner, Kind::Repaired, &detail)?;
    let commit = indexer::run(&gw.store, |tx| {
        let pending = &pending;
        async move {
            if !lease.held_tx(&tx).await? {
                // An earlier attempt of this transaction may have committed
                // (giving the lease up) with its result unknown.
                let now = schema::get_stripe_tx(&tx, evidence, stripe).await?;
                // Or the evidence was expunged (the part's upload ended)
                // meanwhile, its stripes (and their leases) forgotten: the
                // copies just written are of nothing, and go now rather
                // than at the orphan sweep, hours later.
                if now.is_none() && schema::stripes_of_tx(&tx, evidence).await?.is_none() {
                    return Ok(Some(RepairCommit::Gone));
                }
                let done = StripeRecord {
                    version: rec.version + 1,
                    ..next.clone()
                };
                return Ok((now.as_ref() == Some(&done)).then_some(RepairCommit::Done));
            }
            let verified = all_counted.then_some(mark);
            let c = schema::commit_repair_tx(&tx, evidence, stripe, rec, next, verified).await?;
            if c == RepairCommit::Done {
                // Rebuilt from k good shards: whatever was recorded lost
                // was not (its `repaired` statement says so).
                schema::clear_lost_tx(&tx, evidence, stripe);
                if let Some(p) = pending {
                    indexer::ledger::enqueue_tx(&tx, 0, p);
                }
                lease.release_tx(&tx).await?;
            }
            Ok::<_, schema::SchemaError>(Some(c))
        }
    })
    .await?;
    let Some(commit) = commit else {
        // Another gateway may hold the stripe now and be placing the same
        // shards on the same nodes: nothing here is deleted.
        tracing::warn!(%evidence, stripe, copies = written.len(), "repair lease lapsed before the commit: not committed, copies left for the orphan sweep");
        return Ok(Outcome::Waiting);
    };
    match commit {
        RepairCommit::Done => {}
        RepairCommit::Gone => {
            delete_copies(gw, evidence, stripe, written).await;
            return Ok(Outcome::Gone);
        }
        RepairCommit::Changed => {
            // The record changed while this task held the lease (another
            // writer): a placement it names now is not ours to delete.
            let placed = indexer::run(&gw.store, |tx| async move {
                schema::get_stripe_tx(&tx, evidence, stripe).await
            })
            .await?;
            lease.delete(gw, &unplaced(written, placed.as_ref())).await;
            return Ok(Outcome::Waiting);
        }
    }
    if let Some(l) = &gw.ledger {
        l.queued();
    }
    gw.metrics.shards_repaired.inc_by(written.len() as u64);
    tracing::info!(%evidence, stripe, shards = written.len(), "stripe repaired");

    // 5. Old copies that are still reachable go after the grace.
    let old: Vec<(usize, NodeId)> = rebuilt
        .iter()
        .filter_map(|&i| rec.shards[i].node.map(|n| (i, n)))
        .filter(|(_, n)| !gone.contains(n))
        .collect();
    if !old.is_empty() {
        let due =
            tokio::time::Instant::now() + Duration::from_millis(gw.config.repair_old_copy_grace_ms);
        gw.old_copies.queue(
            gw,
            OldCopy {
                due,
                evidence,
                stripe,
                old,
            },
        );
    }
    Ok(Outcome::Repaired(written.len()))
}

/// A repaired stripe's old shard copies, to delete once `due`.
#[derive(Debug)]
pub struct OldCopy {
    due: tokio::time::Instant,
    evidence: EvidenceId,
    stripe: u64,
    old: Vec<(usize, NodeId)>,
}

/// The queue of [`OldCopy`]s, in the order they are due (one grace for
/// all), drained by one task ([`spawn_old_copy_deleter`]) a few at a time:
/// a task sleeping out the grace per repaired stripe held memory that grew
/// with repair's pace (a drain repairs hundreds of stripes a second, and
/// the grace is minutes).
#[derive(Debug, Default)]
pub struct OldCopies {
    queue: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<OldCopy>>,
}

/// Old copies deleted at once, at most.
const OLD_COPY_DELETES_AT_ONCE: usize = 64;

impl OldCopies {
    /// Queues `copy`; without a deleter (a gateway not started whole), a
    /// task of its own waits out the grace.
    fn queue<S: Store>(&self, gw: &Arc<Gateway<S>>, copy: OldCopy) {
        let copy = match self.queue.get() {
            Some(q) => match q.send(copy) {
                Ok(()) => return,
                Err(e) => e.0,
            },
            None => copy,
        };
        let gw = gw.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(copy.due).await;
            delete_old_copies(&gw, copy.evidence, copy.stripe, &copy.old).await;
        });
    }
}

/// Starts the task that deletes repaired stripes' old copies as they come
/// due ([`OldCopies`]).
pub fn spawn_old_copy_deleter<S: Store>(gw: Arc<Gateway<S>>) -> tokio::task::JoinHandle<()> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<OldCopy>();
    if gw.old_copies.queue.set(tx).is_err() {
        tracing::warn!("a second old-copy deleter was started; the first keeps the queue");
    }
    tokio::spawn(async move {
        let mut deleting = tokio::task::JoinSet::new();
        while let Some(copy) = rx.recv().await {
            tokio::time::sleep_until(copy.due).await;
            while deleting.len() >= OLD_COPY_DELETES_AT_ONCE {
                deleting.join_next().await;
            }
            let gw = gw.clone();
            deleting.spawn(async move {
                delete_old_copies(&gw, copy.evidence, copy.stripe, &copy.old).await;
            });
            // Finished ones, so the set does not keep their results.
            while deleting.try_join_next().is_some() {}
        }
    })
}

/// A home for each shard of `rebuild`, in its order: `targets` (from
/// [`choose_targets`]) while they last; with too few of them (a cluster of
/// k+m nodes, every one holding a shard of the stripe), a shard its own node
/// reported damaged goes back to that node, where the put replaces the bad
/// copy, if the node is healthy, open to writes, with room, and holds no
/// other shard of the stripe. `None` for a shard left homeless: the stripe
/// is repaired as far as it can be and stays queued.
fn homes_for<S: Store>(
    gw: &Gateway<S>,
    rec: &StripeRecord,
    rebuild: &[usize],
    damaged: &[usize],
    relocating: &[usize],
    nodes: &PassNodes,
    targets: Vec<NodeId>,
) -> Vec<Option<NodeId>> {
    if targets.len() >= rebuild.len() {
        return targets.into_iter().map(Some).collect();
    }
    let evacuating = gw.nodes.evacuating();
    let own = |i: usize| {
        let n = rec.shards[i].node?;
        let alone = rec.shards.iter().filter(|p| p.node == Some(n)).count() == 1;
        (damaged.contains(&i)
            && !relocating.contains(&i)
            && alone
            && gw.nodes.is_healthy(n)
            && !gw.nodes.is_full(n)
            && !nodes.gone.contains(&n)
            && !evacuating.contains(&n))
        .then_some(n)
    };
    // Shards that can go back home do, so the others get the targets;
    // of those, lost and damaged shards before ones merely moving (off a
    // draining node, out of a crowded domain), which are still there.
    let elsewhere = rebuild.iter().filter(|&&i| own(i).is_none()).count();
    let mut targets = targets.into_iter();
    let mut spare = targets.len().saturating_sub(elsewhere);
    let mut order: Vec<usize> = (0..rebuild.len()).collect();
    order.sort_by_key(|&at| relocating.contains(&rebuild[at]));
    let mut homes = vec![None; rebuild.len()];
    for at in order {
        homes[at] = match own(rebuild[at]) {
            // A target left over is still preferred: a shard on a node
            // whose copy went bad is better moved.
            Some(n) if spare == 0 => Some(n),
            Some(_) => {
                spare -= 1;
                targets.next()
            }
            None => targets.next(),
        };
    }
    homes
}

/// Nodes to take `n` rebuilt shards: healthy, with room, not already
/// holding one of the stripe's shards, each in the failure domain holding
/// fewest of the stripe's shards so far (a domain it does not use yet
/// first; an unlabelled node is a domain of its own), and in the stripe's
/// placement order among those.
fn choose_targets<S: Store>(
    gw: &Gateway<S>,
    evidence: EvidenceId,
    stripe: u64,
    holders: &[NodeId],
    rec: &StripeRecord,
    nodes: &PassNodes,
    n: usize,
) -> Vec<NodeId> {
    let total = rec.shards.len();
    let ranked = placement::rank(&evidence, stripe, &gw.nodes.write_candidates(total));
    let mut free: Vec<(NodeId, Domain)> = ranked
        .into_iter()
        .filter(|c| !holders.contains(c) && !nodes.gone.contains(c) && gw.nodes.is_healthy(*c))
        .filter(|c| !gw.nodes.is_full(*c) && !gw.nodes.writes_failing(*c))
        .filter(|c| !rec.shards.iter().any(|p| p.node == Some(*c)))
        .map(|c| (c, nodes.spread.domain(gw, c)))
        .collect();
    let mut count: HashMap<Domain, usize> = HashMap::new();
    for h in holders {
        *count.entry(nodes.spread.domain(gw, *h)).or_default() += 1;
    }
    let mut out: Vec<NodeId> = Vec::with_capacity(n);
    while out.len() < n {
        // `min_by_key` keeps the first of equals: placement order.
        let Some((best, _)) = free
            .iter()
            .enumerate()
            .min_by_key(|(_, (_, d))| count.get(d).copied().unwrap_or(0))
        else {
            break;
        };
        let (node, domain) = free.remove(best);
        *count.entry(domain).or_default() += 1;
        out.push(node);
    }
    out
}

/// Writes one rebuilt shard and reads it back: only a shard that comes back
/// with the manifest's hash counts.
async fn put_and_verify<S: Store>(
    gw: &Gateway<S>,
    node: NodeId,
    header: &ShardHeader,
    body: bytes::Bytes,
) -> Result<(), ApiError> {
    if Blake3Hash::of(&body) != header.blake3 {
        return Err(ApiError::Unavailable(format!(
            "rebuilt shard {} does not match the manifest's hash",
            header.key
        )));
    }
    let addr = gw
        .nodes
        .addr(node)
        .ok_or_else(|| ApiError::Unavailable(format!("node {node} left the cluster")))?;
    gw.nodes
        .client
        .rpc_put_shard(addr, header, body)
        .await
        .map_err(|e| {
            // Full, or its disk failing: the next pass chooses another.
            gw.nodes.write_refused(node, &e);
            ApiError::Unavailable(format!("writing {} to node {node}: {e}", header.key))
        })?;
    gw.nodes.write_succeeded(node);
    // Re-counted from the disk: the node reads the shard back and hashes it
    // against its header, which must be the manifest's hash.
    let back = gw
        .nodes
        .client
        .rpc_verify_shard(addr, header.key)
        .await
        .map_err(|e| {
            ApiError::Unavailable(format!("re-reading {} from node {node}: {e}", header.key))
        })?;
    if back.blake3 != header.blake3 || back.len != header.len {
        return Err(ApiError::Unavailable(format!(
            "{} read back from node {node} does not match",
            header.key
        )));
    }
    Ok(())
}

/// Attempts [`delete_old_copies`] makes to get the stripe's lease, one per
/// [`LEASE_RENEW`] (a dead holder's lease is taken over after
/// [`REPAIR_LEASE`]).
const OLD_COPY_ATTEMPTS: u32 = 60;

/// Deletes the copies a committed repair replaced, under the stripe's
/// lease, skipping any the stripe's record places on its node again (a
/// later repair may have chosen the same node). While another task holds
/// the stripe it waits; copies it still cannot delete are left for the
/// orphan sweep (which lists active nodes only: a drained node's leftovers
/// are then removed with the node).
async fn delete_old_copies<S: Store>(
    gw: &Gateway<S>,
    evidence: EvidenceId,
    stripe: u64,
    old: &[(usize, NodeId)],
) {
    let mut attempts = 0;
    let lease = loop {
        match StripeLease::take(gw, evidence, stripe).await {
            Ok(Some(lease)) => break lease,
            Ok(None) if attempts < OLD_COPY_ATTEMPTS => {}
            Ok(None) => {
                tracing::warn!(%evidence, stripe, "the stripe stayed leased; its old copies are left for the orphan sweep");
                return;
            }
            Err(e) if attempts < OLD_COPY_ATTEMPTS => {
                tracing::debug!(%evidence, stripe, error = %e, "old shard copies wait for the index");
            }
            Err(e) => {
                tracing::warn!(%evidence, stripe, error = %e, "old shard copies not deleted; left for the orphan sweep");
                return;
            }
        }
        attempts += 1;
        tokio::time::sleep(LEASE_RENEW).await;
    };
    // Read under the lease; each delete checks it is still held (so no
    // repair can have changed the placement in between).
    let placed = indexer::run(&gw.store, |tx| async move {
        schema::get_stripe_tx(&tx, evidence, stripe).await
    })
    .await;
    match placed {
        Ok(placed) => {
            let unplaced = unplaced(old, placed.as_ref());
            lease.renewed(gw, lease.delete(gw, &unplaced)).await;
        }
        Err(e) => {
            tracing::warn!(%evidence, stripe, error = %e, "old shard copies not deleted; left for the orphan sweep");
        }
    }
    lease.release(gw).await;
}

/// The `copies` (shard index, node) that `placed` (the stripe's record
/// now, if any) does not place: those not in use, to delete.
fn unplaced(copies: &[(usize, NodeId)], placed: Option<&StripeRecord>) -> Vec<(usize, NodeId)> {
    copies
        .iter()
        .copied()
        .filter(|&(i, n)| {
            placed
                .and_then(|r| r.shards.get(i))
                .is_none_or(|p| p.node != Some(n))
        })
        .collect()
}

async fn delete_copies<S: Store>(
    gw: &Gateway<S>,
    evidence: EvidenceId,
    stripe: u64,
    copies: &[(usize, NodeId)],
) {
    for &(i, node) in copies {
        let Some(addr) = gw.nodes.addr(node) else {
            continue;
        };
        let key = ShardKey {
            evidence,
            stripe,
            index: i as u8,
        };
        if let Err(e) = gw.nodes.client.rpc_delete_shard(addr, key).await {
            // Left behind: an orphan for the sweep.
            tracing::debug!(shard = %key, %node, error = %e, "could not delete a superseded shard copy");
        }
    }
}

fn recycle<S: Store>(gw: &Gateway<S>, shards: Vec<Option<Vec<u8>>>) {
    for s in shards.into_iter().flatten() {
        gw.nodes.client.recycle(s);
    }
}

/// A repair statement about `owner`'s evidence, by the system; none for a
/// multipart part, which is not evidence (yet): the ledger speaks of what
/// was filed.
fn statement<S: Store>(
    gw: &Gateway<S>,
    owner: &schema::StripesOf,
    kind: Kind,
    detail: &serde_json::Value,
) -> Result<Option<indexer::ledger::PendingRecord>, ApiError> {
    match owner {
        schema::StripesOf::Evidence(header) => {
            crate::api::event_statement(gw, header, kind, "custodia/repair".to_owned(), detail)
        }
        schema::StripesOf::Part(_) => Ok(None),
    }
}

/// Records a stripe as lost, once: the `lost` statement and the mark commit
/// together.
async fn record_lost<S: Store>(
    gw: &Gateway<S>,
    owner: &schema::StripesOf,
    stripe: u64,
) -> Result<(), ApiError> {
    let evidence = owner.header().evidence;
    // A multipart part's loss is marked and counted alike, with no
    // statement (it is not evidence): its Complete fails until the client
    // uploads the part again, which replaces it.
    let pending = statement(
        gw,
        owner,
        Kind::Lost,
        &serde_json::json!({ "stripe": stripe }),
    )?;
    let first = indexer::run(&gw.store, |tx| {
        let pending = &pending;
        async move {
            // Expunged (the part's upload ended) meanwhile, its shards
            // deleted, which is what this pass may have met: nothing was
            // lost.
            if schema::stripes_of_tx(&tx, evidence).await?.is_none()
                || schema::get_stripe_tx(&tx, evidence, stripe)
                    .await?
                    .is_none()
            {
                return Ok::<_, schema::SchemaError>(false);
            }
            if schema::is_lost_tx(&tx, evidence, stripe).await? {
                return Ok(false);
            }
            schema::mark_lost_tx(&tx, evidence, stripe);
            if let Some(p) = pending {
                indexer::ledger::enqueue_tx(&tx, 0, p);
            }
            Ok(true)
        }
    })
    .await?;
    if first {
        gw.metrics.stripes_lost.inc();
        match owner {
            schema::StripesOf::Evidence(_) => {
                tracing::error!(%evidence, stripe, "stripe lost: fewer than k good shards remain")
            }
            schema::StripesOf::Part(p) => {
                tracing::error!(part = %evidence, upload = %p.upload, number = p.number, stripe, "stripe of a multipart part lost: fewer than k good shards remain; the upload must send the part again")
            }
        }
        if let Some(l) = &gw.ledger {
            l.queued();
        }
    }
    Ok(())
}

/// Every shard of a stripe counted good: it leaves the queue (if its mark
/// is still `mark`). One recorded lost (the nodes whose shards went missing
/// came back with them: a disk mounted late, a directory restored) gets a
/// statement too: the ledger said `lost`, which cannot be taken back, so it
/// says `repaired` now, found whole. The lost mark, the queue's and the
/// statement change in one transaction: a stripe never leaves the queue
/// still marked lost (a later real loss would then go unrecorded).
async fn found_whole<S: Store>(
    gw: &Gateway<S>,
    owner: &schema::StripesOf,
    stripe: u64,
    mark: &[u8],
) -> Result<(), ApiError> {
    let evidence = owner.header().evidence;
    // One transaction for a stripe not recorded lost (every stripe of a
    // --verify-all pass); one more, first, to make the statement for one
    // that was.
    let mut statement_made: Option<Option<indexer::ledger::PendingRecord>> = None;
    let cleared = loop {
        let done = indexer::run(&gw.store, |tx| {
            let made = &statement_made;
            async move {
                let lost = schema::is_lost_tx(&tx, evidence, stripe).await?;
                if lost {
                    let Some(pending) = made else {
                        return Ok::<_, schema::SchemaError>(None);
                    };
                    schema::clear_lost_tx(&tx, evidence, stripe);
                    if let Some(p) = pending {
                        indexer::ledger::enqueue_tx(&tx, 0, p);
                    }
                }
                schema::clear_degraded_if_tx(&tx, evidence, stripe, mark).await?;
                Ok(Some(lost))
            }
        })
        .await?;
        match done {
            Some(lost) => break lost,
            None => {
                statement_made = Some(statement(
                    gw,
                    owner,
                    Kind::Repaired,
                    &serde_json::json!({ "stripe": stripe, "found_whole": true }),
                )?)
            }
        }
    };
    if cleared {
        tracing::warn!(%evidence, stripe, "a stripe recorded lost was found whole: its shards are back");
        if let Some(l) = &gw.ledger {
            l.queued();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A crowded shard's move is judged again by the home it finally gets:
    /// racks A (nodes 1-3), B (4, 5), C (6), D (7), E (8), RS(4,2) on
    /// 1, 2, 4, 5, 6, 7. B's shard to E evens the spread; to A's free
    /// node (E refused the copy) it would crowd A with three.
    #[test]
    fn a_crowded_shard_moves_only_to_an_emptier_domain() {
        let rack = |n: NodeId| {
            Domain::Label(
                match n.0 {
                    1..=3 => "a",
                    4 | 5 => "b",
                    6 => "c",
                    7 => "d",
                    _ => "e",
                }
                .into(),
            )
        };
        let rec = protocol::StripeRecord {
            version: 1,
            shard_len: 1,
            shards: [1, 2, 4, 5, 6, 7]
                .map(|n| protocol::ShardPlacement {
                    node: Some(NodeId(n)),
                    blake3: Blake3Hash([n as u8; 32]),
                })
                .to_vec(),
        };
        assert!(evens_spread(&rec, &[2], &[NodeId(8)], rack));
        assert!(!evens_spread(&rec, &[2], &[NodeId(3)], rack));
        // Within B, or to a node of a domain as full: no better.
        assert!(!evens_spread(&rec, &[2], &[NodeId(5)], rack));
        assert!(!evens_spread(&rec, &[4], &[NodeId(7)], rack));
    }

    /// A fenced delete's time is the lease's end less the margin, by the
    /// node's clock: later for a node whose clock runs ahead, earlier for
    /// one behind; none when the lease has less left than the margin.
    #[test]
    fn a_deletes_fence_is_the_leases_end_by_the_nodes_clock() {
        let left = Duration::from_secs(20);
        let fence = (left - DELETE_FENCE_MARGIN).as_millis() as u64;
        assert_eq!(delete_fence(1_000_000, left, 0), Some(1_000_000 + fence));
        assert_eq!(delete_fence(1_000_000, left, 700), Some(1_000_700 + fence));
        assert_eq!(delete_fence(1_000_000, left, -700), Some(999_300 + fence));
        assert_eq!(delete_fence(1_000_000, DELETE_FENCE_MARGIN / 2, 0), None);
        assert_eq!(delete_fence(10, left, -1_000_000), None);
    }

    /// A crowding walk begins at start, again once a node opened since the
    /// last began (however briefly it was closed), never twice for the same
    /// openings, never while nothing can be crowded, and no sooner than the
    /// gap after the last ended.
    #[test]
    fn crowding_walks_begin_when_a_node_opened_and_not_too_often() {
        let mut walk = SpreadWalk::default();
        let gap = Duration::from_millis(200);
        assert!(!walk.walking(0, false, gap), "a walk with nothing to crowd");
        assert!(walk.walking(0, true, gap), "no first walk");
        assert!(walk.walking(3, true, gap), "a walk under way stopped");
        walk.finished();
        assert!(!walk.walking(0, true, gap), "walked again for nothing");
        // Opened meanwhile: due, but not within the gap.
        assert!(!walk.walking(1, true, gap), "walked again within the gap");
        std::thread::sleep(gap);
        assert!(walk.walking(1, true, Duration::ZERO));
        walk.finished();
        assert!(
            !walk.walking(1, true, Duration::ZERO),
            "walked twice for one opening"
        );
        assert!(walk.walking(2, true, Duration::ZERO));
    }

    /// A homeless node is searched for until a whole walk begun after it
    /// became homeless finds none of its shards; then no more while it
    /// stays homeless and the rewalk period lasts. A walk under way stops
    /// counting once a node it does not search for needs searching, or one
    /// it does left the homeless in between.
    #[test]
    fn homeless_nodes_walked_clean_are_not_searched_again() {
        let hour = Duration::from_secs(3600);
        let set = |ids: &[u32]| ids.iter().map(|i| NodeId(*i)).collect::<HashSet<_>>();
        let none = |_: NodeId| 0u64;
        let mut w = HomesWalk::default();
        assert_eq!(w.search_now(&set(&[1, 2]), hour, &none), set(&[1, 2]));
        w.begin(&set(&[1, 2]), vec![EvidenceId::new(5, [5; 10])], &none);
        w.under_way.as_mut().map(|u| u.found.insert(NodeId(2)));
        let (clean, uploads) = w.finished().expect("node 1 walked clean");
        assert_eq!(clean, set(&[1]));
        assert_eq!(
            uploads,
            vec![EvidenceId::new(5, [5; 10])],
            "uploads to follow"
        );
        assert_eq!(w.search_now(&set(&[1, 2]), hour, &none), set(&[2]));
        // Back (for a while: it may take shards), then homeless again.
        assert_eq!(w.search_now(&set(&[2]), hour, &none), set(&[2]));
        assert_eq!(w.search_now(&set(&[1, 2]), hour, &none), set(&[1, 2]));
        // Past the rewalk period, searched again.
        w.begin(&set(&[1, 2]), Vec::new(), &none);
        assert_eq!(w.finished().map(|(c, _)| c), Some(set(&[1, 2])));
        assert!(w.search_now(&set(&[1, 2]), hour, &none).is_empty());
        assert_eq!(
            w.search_now(&set(&[1, 2]), Duration::ZERO, &none),
            set(&[1, 2])
        );
        // Node 1 opened to writes meanwhile (back for a while between two
        // looks, taking shards): nothing walked for it before holds. Node
        // 2 opening says nothing about node 1.
        let mut w = HomesWalk::default();
        w.begin(&set(&[1]), Vec::new(), &none);
        assert_eq!(w.finished().map(|(c, _)| c), Some(set(&[1])));
        let node_2_opened = |n: NodeId| u64::from(n == NodeId(2));
        assert!(w.search_now(&set(&[1]), hour, &node_2_opened).is_empty());
        let node_1_opened = |n: NodeId| u64::from(n == NodeId(1));
        assert_eq!(w.search_now(&set(&[1]), hour, &node_1_opened), set(&[1]));
        w.begin(&set(&[1]), Vec::new(), &node_1_opened);
        w.search_now(&set(&[1]), hour, &|_| 2);
        assert!(w.finished().is_none(), "a walk across an opening counted");
        // A walk under way: one more homeless node, and it is not whole.
        let mut w = HomesWalk::default();
        w.begin(&set(&[1]), Vec::new(), &none);
        w.search_now(&set(&[1, 3]), hour, &none);
        assert!(w.finished().is_none(), "a walk that missed node 3 counted");
        // One of its nodes back then homeless again: not whole for it.
        w.begin(&set(&[1, 3]), Vec::new(), &none);
        w.search_now(&set(&[1]), hour, &none);
        w.search_now(&set(&[1, 3]), hour, &none);
        assert!(w.finished().is_none(), "a walk that node 3 left counted");
        // One of its nodes no longer homeless: whole for the others.
        w.begin(&set(&[1, 3]), Vec::new(), &none);
        w.search_now(&set(&[1]), hour, &none);
        assert_eq!(w.finished().map(|(c, _)| c), Some(set(&[1])));
    }

    fn domains(names: &str) -> Vec<Domain> {
        names
            .chars()
            .map(|c| Domain::Label(c.to_string()))
            .collect()
    }

    fn free(open: &[(char, usize)]) -> BTreeMap<Domain, usize> {
        open.iter()
            .map(|(c, n)| (Domain::Label(c.to_string()), *n))
            .collect()
    }

    /// Where `held` ends once `moves` went, each to the emptiest open
    /// domain, and the room left in each.
    fn apply(
        held: &[Domain],
        moves: &[usize],
        open: &BTreeMap<Domain, usize>,
    ) -> (Vec<Domain>, BTreeMap<Domain, usize>) {
        let mut out = held.to_vec();
        let mut open = open.clone();
        for &i in moves {
            let count = |d: &Domain| {
                out.iter()
                    .enumerate()
                    .filter(|(j, h)| *h == d && (!moves.contains(j) || *j < i))
                    .count()
            };
            let to = open
                .iter()
                .filter(|(_, n)| **n > 0)
                .min_by_key(|(d, _)| count(d))
                .map(|(d, _)| d.clone())
                .expect("an open domain for every move");
            if let Some(n) = open.get_mut(&to) {
                *n -= 1;
            }
            out[i] = to;
        }
        (out, open)
    }

    /// Shards per domain, largest first.
    fn after(held: &[Domain], moves: &[usize], open: &BTreeMap<Domain, usize>) -> Vec<usize> {
        let mut count: BTreeMap<Domain, usize> = BTreeMap::new();
        for d in apply(held, moves, open).0 {
            *count.entry(d).or_default() += 1;
        }
        let mut counts: Vec<usize> = count.into_values().collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        counts
    }

    #[test]
    fn crowded_shards_move_to_domains_the_stripe_does_not_use() {
        // RS(4,2) placed over three racks while three others were down.
        let held = domains("aabbcc");
        let open = free(&[('d', 1), ('e', 2), ('f', 1)]);
        let moves = crowded(&held, &open);
        assert_eq!(moves.len(), 3, "{moves:?}");
        assert_eq!(after(&held, &moves, &open), vec![1; 6]);
    }

    #[test]
    fn with_fewer_domains_than_shards_the_spread_is_made_even_and_no_more() {
        // Four shards in one of three racks: two move, leaving two each.
        let held = domains("aaaabb");
        let open = free(&[('c', 5)]);
        let moves = crowded(&held, &open);
        assert_eq!(moves, vec![2, 3]);
        assert_eq!(after(&held, &moves, &open), vec![2, 2, 2]);
        // Already even over the domains there are: nothing moves, whatever
        // room they have.
        let held = domains("aabbcc");
        assert!(crowded(&held, &free(&[('a', 3), ('b', 3), ('c', 3)])).is_empty());
        // One more than another is as even as six shards in four domains get.
        assert!(crowded(&domains("aabbcd"), &free(&[('c', 2), ('d', 2)])).is_empty());
    }

    #[test]
    fn moves_are_limited_by_the_open_nodes_and_need_one() {
        let held = domains("aaa");
        // One open node in another rack takes one shard.
        assert_eq!(crowded(&held, &free(&[('b', 1)])), vec![2]);
        // None open (down, full or already holding one): nothing moves.
        assert!(crowded(&held, &free(&[('b', 0)])).is_empty());
        assert!(crowded(&held, &BTreeMap::new()).is_empty());
        // Two shards on one unlabelled node: one moves to any other node.
        let held = vec![
            Domain::Node(NodeId(1)),
            Domain::Node(NodeId(1)),
            Domain::Node(NodeId(2)),
        ];
        let open: BTreeMap<Domain, usize> = [(Domain::Node(NodeId(3)), 1)].into();
        assert_eq!(crowded(&held, &open), vec![1]);
    }

    #[test]
    fn every_move_lowers_the_spread_cost_and_none_is_left_to_make() {
        // Every placement of six shards over four racks, with every room
        // of up to two open nodes per rack: each plan makes the spread
        // more even, and the placement it leaves asks for no more moves.
        for code in 0..4u32.pow(6) {
            let held: Vec<Domain> = (0..6)
                .map(|i| Domain::Label(((code / 4u32.pow(i)) % 4).to_string()))
                .collect();
            for room in 0..3u32.pow(4) {
                let open: BTreeMap<Domain, usize> = (0..4)
                    .map(|d| {
                        let n = (room / 3u32.pow(d)) % 3;
                        (Domain::Label(d.to_string()), n as usize)
                    })
                    .collect();
                let moves = crowded(&held, &open);
                if moves.is_empty() {
                    continue;
                }
                let (placed, left) = apply(&held, &moves, &open);
                assert!(
                    spread_cost(placed.iter().cloned()) < spread_cost(held.iter().cloned()),
                    "{held:?} with {open:?}: {moves:?}"
                );
                assert!(
                    crowded(&placed, &left).is_empty(),
                    "{held:?} with {open:?}: {moves:?} leaves {placed:?} crowded"
                );
            }
        }
    }

    #[test]
    fn remote_builds_pause_after_failures_in_a_row_and_a_success_resets_the_count() {
        let r = RemoteBuilds::default();
        for _ in 0..REMOTE_FAILURES_TO_PAUSE - 1 {
            assert!(r.allowed());
            r.failed();
        }
        // A success in between: the count starts again.
        r.succeeded();
        for _ in 0..REMOTE_FAILURES_TO_PAUSE - 1 {
            r.failed();
        }
        assert!(
            r.allowed(),
            "no pause before {REMOTE_FAILURES_TO_PAUSE} in a row"
        );
        r.failed();
        assert!(
            !r.allowed(),
            "paused after {REMOTE_FAILURES_TO_PAUSE} in a row"
        );
        // When the pause has passed, builds are asked for again.
        *r.paused_until.lock().unwrap() = Some(std::time::Instant::now());
        assert!(r.allowed());
        r.failed();
        assert!(r.allowed(), "the count started again after the pause");
    }

    /// A lease is stale once it has read the same for a whole lease period
    /// of this gateway's own clock, counted from when it was first seen
    /// so; a renewal (a new beat) starts the count again.
    #[test]
    fn a_lease_is_taken_over_only_after_reading_the_same_for_a_whole_period() {
        let w = LeaseSightings::default();
        let e = EvidenceId::new(1, [1; 10]);
        let t0 = Instant::now();
        let first = RepairLease {
            owner: [3; 16],
            beat: 7,
        };
        assert_eq!(w.stale(e, 0, t0 + REPAIR_LEASE * 9), None, "never seen");
        w.saw(e, 0, first, t0);
        w.saw(e, 0, first, t0 + REPAIR_LEASE / 2);
        assert_eq!(
            w.stale(e, 0, t0 + REPAIR_LEASE - Duration::from_millis(1)),
            None
        );
        assert_eq!(
            w.stale(e, 0, t0 + REPAIR_LEASE),
            Some(first),
            "counted from the first sighting"
        );
        assert_eq!(w.stale(e, 1, t0 + REPAIR_LEASE), None, "per stripe");
        let renewed = RepairLease { beat: 8, ..first };
        w.saw(e, 0, renewed, t0 + REPAIR_LEASE);
        assert_eq!(
            w.stale(e, 0, t0 + REPAIR_LEASE * 2 - Duration::from_millis(1)),
            None
        );
        assert_eq!(w.stale(e, 0, t0 + REPAIR_LEASE * 2), Some(renewed));
        w.forget(e, 0);
        assert_eq!(
            w.stale(e, 0, t0 + REPAIR_LEASE * 9),
            None,
            "forgotten once taken"
        );
    }

    /// A full map drops the stripes not looked at lately, never one that
    /// keeps being looked at (its first sighting, which take-over counts
    /// from, is kept).
    #[test]
    fn sightings_of_stripes_still_looked_at_survive_pruning() {
        let w = LeaseSightings::default();
        let e = EvidenceId::new(1, [2; 10]);
        let t0 = Instant::now();
        let dead = RepairLease {
            owner: [4; 16],
            beat: 0,
        };
        w.saw(e, u64::MAX, dead, t0);
        for stripe in 0..(SIGHTINGS_KEPT as u64 - 1) {
            w.saw(e, stripe, dead, t0);
        }
        let later = t0 + REPAIR_LEASE * 5;
        w.saw(e, u64::MAX, dead, later);
        // Full: the next new sighting prunes.
        w.saw(
            EvidenceId::new(2, [2; 10]),
            0,
            dead,
            later + Duration::from_secs(1),
        );
        assert_eq!(
            w.lock().len(),
            2,
            "only the stripes looked at lately are kept"
        );
        assert_eq!(
            w.stale(e, u64::MAX, later),
            Some(dead),
            "counted from its first sighting"
        );
        assert_eq!(w.stale(e, 0, later), None, "dropped");
    }
}
