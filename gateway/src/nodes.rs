//! The gateway's live view of its storage nodes: addresses, failure domains,
//! health. Health comes from a periodic `NodeInfo` probe and from failed calls,
//! and only steers where new shards go; reads try every placed shard anyway.
//! Each probe also records the node's capacity and disk UUID in the index, and
//! warns when a node comes back with a different disk, and reads back each
//! node's lifecycle (active, draining, removed) that operators set in the
//! index: only active nodes take new shards.

use crate::api::Store;
use crate::config::NodeEntry;
use crate::placement::Candidate;
use indexer::schema::{self, Lifecycle, NodeRecord};
use protocol::wire::SpaceInfo;
use protocol::{EvidenceId, NodeId, ShardKey};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use storage_node::client::NodeClient;

struct NodeState {
    entry: NodeEntry,
    /// This node's share of [`NodeSet::openings`].
    openings: AtomicU64,
    healthy: AtomicBool,
    /// Takes no new shards: its free space is within its reserve, as its last
    /// probe said or a put it refused with `DiskFull` since.
    full: AtomicBool,
    /// A liveness check of this node is running (see [`NodeSet::suspect`]).
    checking: AtomicBool,
    /// When the last liveness check started.
    last_check: Mutex<Option<Instant>>,
    /// The node's disk as its last answered probe reported it.
    disk: Mutex<Option<DiskView>>,
    /// When the node last answered a probe.
    last_ok: Mutex<Option<Instant>>,
    /// The operator's decision, as the index last said.
    lifecycle: Mutex<Lifecycle>,
    /// The node's clock minus ours, in ms, from its last usable sample,
    /// and when that was taken.
    clock: Mutex<Option<(i64, Instant)>>,
    /// Why its last probe failed, if it did: logged when it changes (a
    /// node that was killed and came back with a certificate the gateway
    /// refuses fails anew, for another reason worth saying), not at every
    /// probe.
    probe_failure: Mutex<Option<String>>,
    /// Whether telling it which nodes were removed failed at its last
    /// probe: said when that starts, not at every probe.
    deny_failing: AtomicBool,
    /// When a write to it last failed other than for room (see
    /// [`NodeSet::write_failed`]), if none has succeeded since: ms since
    /// [`CLOCK_BASE`] plus one, 0 for none. An atomic, not a lock: it is
    /// read for every node at every stripe filed, and cleared at every put.
    write_failed: AtomicU64,
    /// Spells of failing writes (see [`NodeSet::write_failed`]) since this
    /// gateway started: a failure while one holds is the same spell.
    write_failures: AtomicU64,
}

/// The longest round trip a clock sample may take to be used: its offset
/// is off by up to half of it, and repair's fenced deletes allow for 2 s
/// of error and drift in all (`repair::DELETE_FENCE_MARGIN`).
const MAX_CLOCK_SAMPLE_RTT_MS: u64 = 1_000;

/// How long a node's last usable clock sample stands in for samples too
/// slow to use (drift over it is far within the fenced deletes' margin).
const CLOCK_SAMPLE_KEPT: Duration = Duration::from_secs(30);

/// A clock sample's offset (ms), if its round trip (ms) was short enough to
/// bound its error; none otherwise (an overloaded node, a congested link):
/// the last usable one while recent, then no figure, so no fenced delete,
/// rather than one whose error could let a delete land after its lease.
fn usable_offset((offset, rtt): (i64, u64)) -> Option<i64> {
    (rtt <= MAX_CLOCK_SAMPLE_RTT_MS).then_some(offset)
}

/// How long a node whose writes fail is passed over for new shards and
/// rebuilds, unless one succeeds meanwhile. Its probes (a `statvfs`)
/// answer all the while: a disk remounted read-only after an error still
/// reports its space, and every repair pass picked it again as the first
/// target of the same stripes, which stayed degraded for as long as it
/// lasted.
const WRITE_FAILURE_HOLD: Duration = Duration::from_secs(120);

/// Least time between two liveness checks of one node that reads asked for.
const SUSPECT_EVERY: Duration = Duration::from_secs(1);

/// Free bytes above its reserve a full node must report before it takes new
/// shards again (or half of what its disk holds above the reserve, on a
/// disk too small for that, else it could never clear).
const FULL_HEADROOM: u64 = 64 << 20;

/// A node's disk as it last reported it.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct DiskView {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    pub shards: u64,
    /// Free bytes the node keeps; it takes no new shard that would leave
    /// less.
    pub reserve_bytes: u64,
}

/// How the gateway sees a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeHealth {
    /// Answered the last probe or request.
    Up,
    /// Missed its last probe, but answered within the configured
    /// `node_down_after_ms` (it may be restarting).
    Suspect,
    /// Has not answered for `node_down_after_ms` (or since the gateway
    /// started).
    Down,
}

impl NodeHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeHealth::Up => "up",
            NodeHealth::Suspect => "suspect",
            NodeHealth::Down => "down",
        }
    }
}

/// One node as the gateway sees it now (for metrics and status).
#[derive(Clone, Debug)]
pub struct NodeView {
    pub id: NodeId,
    pub addr: SocketAddr,
    pub domain: Option<String>,
    pub healthy: bool,
    pub state: NodeHealth,
    /// How long ago it last answered a probe.
    pub last_seen: Option<Duration>,
    /// How long it has been silent as far as this gateway knows: since it
    /// last answered, or, if it never has, since this gateway started (a
    /// node still rebooting when the gateway restarts has not been down
    /// for long).
    pub silent_for: Duration,
    pub disk: Option<DiskView>,
    /// Takes no new shards (its disk is down to its reserve).
    pub full: bool,
    /// Its disk failed a write lately: new shards and rebuilds pass it
    /// over for a while (see [`NodeSet::write_failed`]).
    pub writes_failing: bool,
    /// How many spells of failing writes it had since this gateway started.
    pub write_failures: u64,
    /// Smoothed RTT of the open connection, if one is open.
    pub rtt: Option<Duration>,
    pub lifecycle: Lifecycle,
    /// The node's clock minus the gateway's at the last probe, in ms.
    pub clock_offset_ms: Option<i64>,
    /// Came back with another disk, and its stripes are still being queued
    /// for checking: the repair backlog is not complete yet.
    pub reconciling: bool,
}

/// The nodes and a client to reach them.
pub struct NodeSet {
    /// Shared with liveness checks running in their own tasks.
    nodes: Arc<Vec<NodeState>>,
    pub client: NodeClient,
    /// Nodes with a new disk whose stripes are being queued for checking;
    /// the index keeps their old disk UUID until that is done.
    reconciling: Mutex<std::collections::HashSet<NodeId>>,
    /// Silence after which a node is `down`.
    down_after: Duration,
    /// When this gateway began watching its nodes.
    started: std::time::Instant,
    /// How long each node had been silent while the cluster was watched,
    /// as the index said when this gateway first read it: the time since
    /// the node was last seen up to when any node was last seen (by any
    /// gateway). A node that died before this gateway started is then not
    /// given a fresh grace by each restart, and a cluster that was shut
    /// down as a whole does not count its downtime as anyone's silence.
    /// `None` until the index could be read.
    silent_before: Mutex<Option<std::collections::HashMap<NodeId, Duration>>>,
    /// Nodes the index says were removed that this gateway's configuration
    /// no longer lists: their shards still need new homes.
    removed_unlisted: Mutex<std::collections::HashSet<NodeId>>,
    /// Each labelled node's failure domain.
    labels: std::collections::HashMap<NodeId, String>,
    /// How many times a node has come (back) to take new shards: back up,
    /// room again, active again. See [`NodeSet::openings`].
    openings: AtomicU64,
}

impl NodeSet {
    pub fn new(entries: &[NodeEntry], client: NodeClient, down_after: Duration) -> Self {
        for e in entries {
            if let Some(name) = &e.server_name {
                client.expect_name(e.addr, name.clone());
            }
        }
        let nodes = entries
            .iter()
            .map(|e| NodeState {
                entry: e.clone(),
                openings: AtomicU64::new(0),
                healthy: AtomicBool::new(true),
                full: AtomicBool::new(false),
                checking: AtomicBool::new(false),
                last_check: Mutex::new(None),
                disk: Mutex::new(None),
                last_ok: Mutex::new(None),
                lifecycle: Mutex::new(Lifecycle::Active),
                clock: Mutex::new(None),
                probe_failure: Mutex::new(None),
                deny_failing: AtomicBool::new(false),
                write_failed: AtomicU64::new(0),
                write_failures: AtomicU64::new(0),
            })
            .collect::<Vec<_>>();
        let labels = entries
            .iter()
            .filter_map(|e| Some((e.node_id(), e.failure_domain.clone()?)))
            .collect();
        NodeSet {
            labels,
            nodes: Arc::new(nodes),
            client,
            reconciling: Mutex::new(Default::default()),
            down_after,
            started: std::time::Instant::now(),
            silent_before: Mutex::new(None),
            removed_unlisted: Mutex::new(Default::default()),
            openings: AtomicU64::new(0),
        }
    }

    /// How many times so far a node has come (back) to take new shards:
    /// marked up after down, given room after full, made active after a
    /// drain. Counted as it happens, so a watcher that compares counts
    /// sees a node that went down and came back between two looks.
    pub fn openings(&self) -> u64 {
        self.openings.load(Ordering::Relaxed)
    }

    /// [`NodeSet::openings`] of node `id` alone.
    pub fn openings_of(&self, id: NodeId) -> u64 {
        self.get(id)
            .map_or(0, |n| n.openings.load(Ordering::Relaxed))
    }

    fn opened(&self, n: &NodeState) {
        n.openings.fetch_add(1, Ordering::Relaxed);
        self.openings.fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self, id: NodeId) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.entry.id == id.0)
    }

    /// Whether a write left `rec` crowded: with shards repair would spread
    /// over the failure domains open to writes now ([`crate::repair::crowded`],
    /// the one rule), as when a write fell back to a node in a domain the
    /// stripe used already. (A stripe crowded because a domain is down is
    /// the scanner's, once the domain is back.)
    pub fn crowds(&self, rec: &protocol::StripeRecord) -> bool {
        use crate::repair::{crowded, Domain};
        let domain = |n: NodeId| Domain::of(self.domain(n), n);
        let held: Vec<Domain> = rec
            .shards
            .iter()
            .filter_map(|p| p.node)
            .map(domain)
            .collect();
        // Most stripes hold one shard per domain: nothing to spread, and no
        // need to look at every node.
        let mut seen = std::collections::HashSet::new();
        if held.iter().all(|d| seen.insert(d)) {
            return false;
        }
        let mut free: std::collections::BTreeMap<Domain, usize> = Default::default();
        for n in self.nodes.iter() {
            let id = n.entry.node_id();
            let open = *lock(&n.lifecycle) == Lifecycle::Active
                && n.healthy.load(Ordering::Relaxed)
                && !n.full.load(Ordering::Relaxed)
                && !rec.shards.iter().any(|p| p.node == Some(id));
            if open {
                *free.entry(domain(id)).or_default() += 1;
            }
        }
        !crowded(&held, &free).is_empty()
    }

    /// The node's failure domain (`None`: unlabelled, its own domain).
    pub fn domain(&self, id: NodeId) -> Option<String> {
        self.labels.get(&id).cloned()
    }

    /// The node's wall clock minus this gateway's, as last measured (ms).
    pub fn clock_offset_ms(&self, id: NodeId) -> Option<i64> {
        self.get(id).and_then(|n| lock(&n.clock).map(|(ms, _)| ms))
    }

    pub fn addr(&self, id: NodeId) -> Option<SocketAddr> {
        self.get(id).map(|n| n.entry.addr)
    }

    pub fn mark(&self, id: NodeId, healthy: bool) {
        if let Some(n) = self.get(id) {
            if n.mark(healthy) && healthy {
                self.opened(n);
            }
        }
    }

    /// Has `id` checked in the background when a request to it is slower
    /// than a read can wait for (a read hedged past it): a node that does
    /// not answer on its connection is marked down at once, so later reads
    /// stop waiting for it, instead of at the next probe. At most one check
    /// per node at a time and per [`SUSPECT_EVERY`]; a node already down is
    /// left to the prober.
    pub fn suspect(&self, id: NodeId) {
        let Some(pos) = self.nodes.iter().position(|n| n.entry.id == id.0) else {
            return;
        };
        let n = &self.nodes[pos];
        if !n.healthy.load(Ordering::Relaxed) {
            return;
        }
        {
            let mut last = lock(&n.last_check);
            if last.is_some_and(|t| t.elapsed() < SUSPECT_EVERY) {
                return;
            }
            if n.checking.swap(true, Ordering::AcqRel) {
                return;
            }
            *last = Some(Instant::now());
        }
        let (nodes, client, addr) = (self.nodes.clone(), self.client.clone(), n.entry.addr);
        tokio::spawn(async move {
            let n = &nodes[pos];
            if !client.check_alive(addr).await {
                n.mark(false);
            }
            n.checking.store(false, Ordering::Release);
        });
    }

    /// Notes whether `id` takes new shards. A full node still serves reads
    /// and deletes: it is not marked unhealthy for being full.
    pub fn mark_full(&self, id: NodeId, full: bool) {
        if let Some(n) = self.get(id) {
            if n.full.swap(full, Ordering::Relaxed) != full {
                if full {
                    tracing::warn!(node = %id, "node is full: no new shards go to it until it has room above its reserve");
                } else {
                    tracing::info!(node = %id, "node has room again: it takes new shards");
                    self.opened(n);
                }
            }
        }
    }

    /// Whether `id` is full for new shards, as last seen.
    pub fn is_full(&self, id: NodeId) -> bool {
        self.get(id).is_some_and(|n| n.full.load(Ordering::Relaxed))
    }

    /// A write to `id` (a shard put, a rebuild) failed with `e`: if the
    /// node answered that its disk failed (not for room, not a connection
    /// lost, which its next probe settles), it takes no new shards for
    /// [`WRITE_FAILURE_HOLD`] unless one succeeds (said once when it starts).
    pub fn write_failed(&self, id: NodeId, e: &storage_node::client::NodeError) {
        if !matches!(
            e,
            storage_node::client::NodeError::Remote(protocol::wire::ErrorCode::Io)
        ) {
            return;
        }
        if let Some(n) = self.get(id) {
            let now = CLOCK_BASE.elapsed().as_millis() as u64 + 1;
            let was = n.write_failed.swap(now, Ordering::Relaxed);
            if was == 0 || now - was >= WRITE_FAILURE_HOLD.as_millis() as u64 {
                // Counted once per spell: one failed fsync fails every
                // put it would have acknowledged (a batch, several stripes
                // of one filing), which is one failure, not several.
                n.write_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(node = %id, "writes to this node fail: new shards and rebuilds pass it over for a while");
            }
        }
    }

    /// A write to `id` was refused with `e`: full (it takes no new shards
    /// until it has room), or its disk failing (see [`Self::write_failed`]).
    pub fn write_refused(&self, id: NodeId, e: &storage_node::client::NodeError) {
        if e.is_disk_full() {
            self.mark_full(id, true);
        } else {
            self.write_failed(id, e);
        }
    }

    /// A write to `id` succeeded: its writes are not failing.
    pub fn write_succeeded(&self, id: NodeId) {
        if let Some(n) = self.get(id) {
            if n.write_failed.load(Ordering::Relaxed) != 0
                && n.write_failed.swap(0, Ordering::Relaxed) != 0
            {
                tracing::info!(node = %id, "writes to this node succeed again");
            }
        }
    }

    /// Whether writes to `id` failed within [`WRITE_FAILURE_HOLD`].
    pub fn writes_failing(&self, id: NodeId) -> bool {
        self.get(id).is_some_and(writes_failing)
    }

    /// `ranked` (placement order) with the nodes likeliest to take a shard
    /// first: healthy with room, then with room, then the rest, each in
    /// placement order. The same order when all are healthy with room;
    /// with too few of those (the candidates then include nodes down),
    /// a down node no longer takes a home slot, and its connect timeout,
    /// ahead of a healthy spare.
    ///
    /// On every stripe filed: one pass over the nodes (`get` is a search,
    /// once per ranked node it was quadratic in the cluster's size), and
    /// nothing sorted when every node is ready.
    pub fn in_write_order(&self, mut ranked: Vec<NodeId>) -> Vec<NodeId> {
        let later: std::collections::HashMap<NodeId, u8> = self
            .nodes
            .iter()
            .filter_map(|n| {
                let tier = match () {
                    _ if n.full.load(Ordering::Relaxed) => 2,
                    _ if n.healthy.load(Ordering::Relaxed) && !writes_failing(n) => return None,
                    _ => 1,
                };
                Some((n.entry.node_id(), tier))
            })
            .collect();
        if !later.is_empty() {
            ranked.sort_by_key(|id| later.get(id).copied().unwrap_or(0));
        }
        ranked
    }

    /// Whether `id` answered its last probe or request.
    pub fn is_healthy(&self, id: NodeId) -> bool {
        self.get(id)
            .is_some_and(|n| n.healthy.load(Ordering::Relaxed))
    }

    /// Every node, with its health, disk and connection as last seen.
    pub fn view(&self) -> Vec<NodeView> {
        let rtts = self.client.connection_rtts();
        let reconciling = self.reconciling();
        let silent_before = lock(&self.silent_before).clone().unwrap_or_default();
        self.nodes
            .iter()
            .map(|n| {
                let healthy = n.healthy.load(Ordering::Relaxed);
                let last_seen = lock(&n.last_ok).map(|t| t.elapsed());
                let state = match (healthy, last_seen) {
                    (true, Some(_)) => NodeHealth::Up,
                    (_, Some(ago)) if ago < self.down_after => NodeHealth::Suspect,
                    _ => NodeHealth::Down,
                };
                (n, healthy, state, last_seen)
            })
            .map(|(n, healthy, state, last_seen)| NodeView {
                id: n.entry.node_id(),
                addr: n.entry.addr,
                domain: n.entry.failure_domain.clone(),
                healthy,
                state,
                last_seen,
                silent_for: last_seen.unwrap_or_else(|| {
                    self.started.elapsed()
                        + silent_before
                            .get(&n.entry.node_id())
                            .copied()
                            .unwrap_or_default()
                }),
                disk: *lock(&n.disk),
                full: n.full.load(Ordering::Relaxed),
                writes_failing: writes_failing(n),
                write_failures: n.write_failures.load(Ordering::Relaxed),
                rtt: rtts
                    .iter()
                    .find(|(a, _)| *a == n.entry.addr)
                    .map(|(_, rtt)| *rtt),
                lifecycle: *lock(&n.lifecycle),
                clock_offset_ms: lock(&n.clock).map(|(ms, _)| ms),
                reconciling: reconciling.contains(&n.entry.node_id()),
            })
            .collect()
    }

    /// Fills [`NodeSet::silent_before`] from the nodes' records.
    async fn read_silences<S: Store>(&self, store: &S) {
        let ids: Vec<NodeId> = self.nodes.iter().map(|n| n.entry.node_id()).collect();
        let seen = indexer::run(store, |tx| {
            let ids = &ids;
            async move {
                let mut seen = Vec::new();
                for id in ids {
                    if let Some(rec) = schema::get_node_tx(&tx, *id).await? {
                        seen.push((*id, rec.last_seen_ms));
                    }
                }
                Ok::<_, schema::SchemaError>(seen)
            }
        })
        .await;
        match seen {
            Ok(seen) => {
                let latest = seen.iter().map(|(_, t)| *t).max().unwrap_or(0);
                let silences = seen
                    .into_iter()
                    .map(|(id, t)| (id, Duration::from_millis(latest.saturating_sub(t))))
                    .collect();
                *lock(&self.silent_before) = Some(silences);
            }
            Err(e) => tracing::warn!(error = %e, "could not read when nodes were last seen"),
        }
    }

    /// Nodes that came back with another disk and whose stripes are not all
    /// queued for checking yet.
    pub fn reconciling(&self) -> std::collections::HashSet<NodeId> {
        lock(&self.reconciling).clone()
    }

    pub fn healthy_count(&self) -> usize {
        self.nodes
            .iter()
            .filter(|n| n.healthy.load(Ordering::Relaxed))
            .count()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Records that node `id`'s new disk `uuid` has had every stripe of its
    /// queued for checking: the index takes the new UUID. Until it has, the
    /// node stays reconciling (`custodia repair` does not call the cluster
    /// healthy), so a failed write is tried again, backing off to every
    /// 30 s, rather than left for a restart to find.
    pub async fn reconciled<S: Store>(&self, store: &S, id: NodeId, uuid: [u8; 16]) {
        let mut pause = Duration::from_secs(1);
        loop {
            let result = indexer::run(store, |tx| async move {
                if let Some(mut rec) = schema::get_node_tx(&tx, id).await? {
                    rec.disk_uuid = Some(uuid);
                    schema::put_node_tx(&tx, &rec);
                }
                Ok::<_, schema::SchemaError>(())
            })
            .await;
            match result {
                Ok(()) => {
                    lock(&self.reconciling).remove(&id);
                    return;
                }
                Err(e) => {
                    tracing::warn!(node = %id, error = %e, retry_in_s = pause.as_secs(), "could not record the new disk");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// The operator's lifecycle decision for `id`.
    pub fn lifecycle(&self, id: NodeId) -> Lifecycle {
        self.get(id)
            .map_or(Lifecycle::Removed, |n| *lock(&n.lifecycle))
    }

    /// Whether this gateway's configuration lists `id`.
    pub fn knows(&self, id: NodeId) -> bool {
        self.get(id).is_some()
    }

    /// Removed nodes this gateway's configuration no longer lists.
    pub fn removed_unlisted(&self) -> std::collections::HashSet<NodeId> {
        lock(&self.removed_unlisted).clone()
    }

    /// Takes the lifecycle decisions the index holds (nodes not named are active).
    pub fn set_lifecycles(&self, decided: &[(NodeId, schema::LifecycleRecord)]) {
        *lock(&self.removed_unlisted) = decided
            .iter()
            .filter(|(id, r)| r.state == Lifecycle::Removed && !self.knows(*id))
            .map(|(id, _)| *id)
            .collect();
        for n in self.nodes.iter() {
            let id = n.entry.node_id();
            let state = decided
                .iter()
                .find(|(d, _)| *d == id)
                .map_or(Lifecycle::Active, |(_, r)| r.state);
            let mut current = lock(&n.lifecycle);
            if *current != state {
                tracing::info!(node = %id, state = state.as_str(), "node lifecycle changed");
                *current = state;
                if state == Lifecycle::Active {
                    self.opened(n);
                }
            }
        }
    }

    /// Nodes that are draining or removed: their shards need new homes.
    pub fn evacuating(&self) -> std::collections::HashSet<NodeId> {
        self.nodes
            .iter()
            .filter(|n| *lock(&n.lifecycle) != Lifecycle::Active)
            .map(|n| n.entry.node_id())
            .collect()
    }

    /// Nodes new shards may go to: the active, healthy ones with room; when
    /// too few of those can hold a stripe, the active ones with room
    /// whatever their health, then every active one (a stale health or full
    /// flag must not refuse writes: a node that is really full or down
    /// refuses the shard and the next ranked node takes it). A node whose
    /// writes failed lately (see [`Self::write_failed`]) counts as not
    /// healthy here. Draining and removed nodes never take new shards.
    pub fn write_candidates(&self, need: usize) -> Vec<Candidate> {
        let active = || {
            self.nodes
                .iter()
                .filter(|n| *lock(&n.lifecycle) == Lifecycle::Active)
        };
        let with_room = || active().filter(|n| !n.full.load(Ordering::Relaxed));
        let healthy: Vec<Candidate> = with_room()
            .filter(|n| n.healthy.load(Ordering::Relaxed) && !writes_failing(n))
            .map(|n| candidate(&n.entry))
            .collect();
        if healthy.len() >= need {
            return healthy;
        }
        let roomy: Vec<Candidate> = with_room().map(|n| candidate(&n.entry)).collect();
        if roomy.len() >= need {
            roomy
        } else {
            active().map(|n| candidate(&n.entry)).collect()
        }
    }

    /// Asks every node who it is; records it in the index and updates health.
    /// Returns the nodes that answered with another disk than the index
    /// knows (wiped or replaced), with the new disk's UUID: their inventory
    /// must be reconciled. The index keeps the old UUID until the caller
    /// has queued every stripe of theirs and calls [`NodeSet::reconciled`],
    /// so a gateway that dies half-way finds the new disk again on restart
    /// (a wiped disk must never go unnoticed).
    pub async fn probe_all<S: Store>(&self, store: &S, now_ms: u64) -> Vec<(NodeId, [u8; 16])> {
        // Every node removed, listed here or not: each node serves them
        // nothing (see `Request::DenyNodes`).
        let removed: Option<Vec<u32>> =
            match indexer::run(store, |tx| async move { schema::lifecycles_tx(&tx).await }).await {
                Ok(decided) => {
                    self.set_lifecycles(&decided);
                    Some(
                        decided
                            .iter()
                            .filter(|(_, r)| r.state == Lifecycle::Removed)
                            .map(|(id, _)| id.0)
                            .collect(),
                    )
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not read node lifecycles");
                    None
                }
            };
        let removed = &removed;
        // Before this probe records anyone as seen now.
        if lock(&self.silent_before).is_none() {
            self.read_silences(store).await;
        }
        let probes = self.nodes.iter().map(|n| async move {
            let info = tokio::time::timeout(
                Duration::from_secs(3),
                self.client.rpc_node_info(n.entry.addr),
            )
            .await;
            if !matches!(info, Ok(Ok(_))) {
                return (n, info, None);
            }
            // The rest at once (each may take its 3 s): a round as long as
            // their sum would outlast the probe interval.
            let addr = n.entry.addr;
            // A node too old to know the request keeps no reserve: it is
            // full only when a put finds its disk full (`Some(None)`). One
            // that did not answer it (`None`) is not judged on it.
            let space = async {
                match tokio::time::timeout(Duration::from_secs(3), self.client.rpc_space(addr)).await
                {
                    Ok(Ok(space)) => Some(Some(space)),
                    Ok(Err(storage_node::client::NodeError::Remote(
                        protocol::wire::ErrorCode::BadRequest,
                    ))) => Some(None),
                    _ => None,
                }
            };
            let clock = async {
                let clock =
                    tokio::time::timeout(Duration::from_secs(3), self.client.rpc_clock_offset(addr))
                        .await;
                // A node too old to answer keeps no figure rather than a stale one.
                // A sample too slow to use leaves the last usable one while
                // it is recent (one slow probe of a loaded node must not
                // stop fenced deletes or reset a skew alert), none after.
                let mut kept = lock(&n.clock);
                *kept = match clock.ok().and_then(Result::ok) {
                    Some(sample) => match usable_offset(sample) {
                        Some(ms) => Some((ms, Instant::now())),
                        None => kept.filter(|(_, at)| at.elapsed() <= CLOCK_SAMPLE_KEPT),
                    },
                    None => None,
                };
            };
            // Each probe (the node keeps the set on its disk, and rewrites
            // it only when it changes): a node back with a new disk, or one
            // that missed a removal, is told again.
            let deny = async {
                let Some(ids) = removed.as_ref().filter(|ids| !ids.is_empty()) else {
                    return;
                };
                let denied = tokio::time::timeout(
                    Duration::from_secs(3),
                    self.client.rpc_deny_nodes(addr, ids.clone()),
                )
                .await;
                let failed = match denied {
                    Ok(Ok(_)) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(_) => Some("no answer within 3 s".to_owned()),
                };
                let was = n.deny_failing.swap(failed.is_some(), Ordering::Relaxed);
                match failed {
                    Some(e) if !was => tracing::warn!(node = %n.entry.node_id(), error = %e, "could not tell a node which nodes were removed (they may still read its shards; an older node does not know the request); tried at each probe"),
                    Some(e) => tracing::debug!(node = %n.entry.node_id(), error = %e, "could not tell a node which nodes were removed"),
                    None if was => tracing::info!(node = %n.entry.node_id(), "a node now serves removed nodes nothing"),
                    None => {}
                }
            };
            let (space, (), ()) = tokio::join!(space, clock, deny);
            (n, info, space)
        });
        // Each node's answer is taken in at once (its index record, the
        // check of the last shard stored there, each up to seconds): one
        // after another, a round would outlast the probe interval that
        // drains and forced removals count on.
        let answers = futures::future::join_all(probes).await;
        let taken = answers.into_iter().map(|(n, info, space)| async move {
            let id = n.entry.node_id();
            let info = match info {
                Ok(Ok(info)) => info,
                Ok(Err(e)) => {
                    // Why the probes fail, when that changes (a certificate
                    // one side refuses, an old version, no route): the
                    // operator's first question when a node is down.
                    if n.probe_failed(e.to_string()) {
                        tracing::warn!(node = %id, addr = %n.entry.addr, error = %e, "node probe failed");
                    } else {
                        tracing::debug!(node = %id, error = %e, "node probe failed");
                    }
                    self.mark(id, false);
                    return None;
                }
                Err(_) => {
                    if n.probe_failed("no answer within 3 s".into()) {
                        tracing::warn!(node = %id, addr = %n.entry.addr, "node probe got no answer within 3 s");
                    }
                    self.mark(id, false);
                    return None;
                }
            };
            *lock(&n.probe_failure) = None;
            if info.node != id {
                tracing::error!(node = %id, reported = %info.node, "node at this address reports another id; not using it");
                self.mark(id, false);
                return None;
            }
            self.mark(id, true);
            let last_reserve = lock(&n.disk).as_ref().map_or(0, |d| d.reserve_bytes);
            let (space, full) = fullness(space, &info, last_reserve);
            if let Some(full) = full {
                self.mark_full(id, full);
            }
            *lock(&n.last_ok) = Some(Instant::now());
            *lock(&n.disk) = Some(DiskView {
                capacity_bytes: info.capacity_bytes,
                used_bytes: info.used_bytes,
                free_bytes: info.free_bytes,
                shards: info.shards,
                reserve_bytes: space.reserve_bytes,
            });
            // Nobody is recorded as seen now before the earlier sightings
            // were read: a later read would take this probe's time for the
            // cluster's last, and count a whole-cluster shutdown as the
            // silence of every node not yet back (repairing them all at
            // once). Its disk is still checked; it is recorded as seen at
            // the next probe, which reads the sightings first.
            let sightings_read = lock(&self.silent_before).is_some();
            let entry = n.entry.clone();
            let result = indexer::run(store, |tx| {
                let entry = entry.clone();
                let info = info.clone();
                async move {
                    let prev = schema::get_node_tx(&tx, id).await?;
                    let last_seen_ms = match (&prev, sightings_read) {
                        (_, true) => now_ms,
                        (Some(p), false) => p.last_seen_ms,
                        // Never recorded: nothing to compare, nothing to keep.
                        (None, false) => return Ok(false),
                    };
                    let old = prev.as_ref().and_then(|p| p.disk_uuid);
                    let changed = old.is_some_and(|old| old != info.disk_uuid);
                    schema::put_node_tx(
                        &tx,
                        &NodeRecord {
                            node: id,
                            addr: entry.addr.to_string(),
                            failure_domain: entry.failure_domain.clone(),
                            disk_uuid: if changed { old } else { Some(info.disk_uuid) },
                            capacity_bytes: info.capacity_bytes,
                            free_bytes: info.free_bytes,
                            used_bytes: info.used_bytes,
                            last_seen_ms,
                        },
                    );
                    Ok::<_, schema::SchemaError>(changed)
                }
            })
            .await;
            match result {
                Ok(true) => {
                    // What the old disk stored is not this one's to hold: a
                    // probe must not take its absence for a restored copy.
                    if let Some(key) = self.client.last_stored(n.entry.addr) {
                        self.client.forget_stored(n.entry.addr, key);
                    }
                    if lock(&self.reconciling).insert(id) {
                        tracing::warn!(node = %id, "node came back with a different disk (wiped or replaced); reconciling its shards");
                        return Some((id, info.disk_uuid));
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(node = %id, error = %e, "could not record node in the index")
                }
            }
            // The same disk, without a shard it said it stored: its data
            // directory was put back from an older copy (a snapshot or a
            // backup restored), or it lost writes. Everything stored on it
            // since is gone; its inventory is reconciled as a new disk's.
            if !lock(&self.reconciling).contains(&id)
                && self.lost_a_stored_shard(store, n.entry.addr, id).await
                && lock(&self.reconciling).insert(id)
            {
                tracing::warn!(node = %id, "node no longer holds a shard it stored, which the index still places on it (its data directory restored from an older copy?); reconciling its shards");
                // Kept in the index until the reconciliation is done (as a
                // new disk's old UUID is): a gateway that dies half-way, or
                // restarts, finds the node's disk unreconciled again, where
                // the shard that told it so is not checked any more.
                let marked = indexer::run(store, |tx| async move {
                    if let Some(mut rec) = schema::get_node_tx(&tx, id).await? {
                        rec.disk_uuid = Some(UNRECONCILED_DISK);
                        schema::put_node_tx(&tx, &rec);
                    }
                    Ok::<_, schema::SchemaError>(())
                })
                .await;
                if let Err(e) = marked {
                    tracing::warn!(node = %id, error = %e, "could not record that the node's disk is being reconciled; a restart before it is done would not resume it");
                }
                return Some((id, info.disk_uuid));
            }
            None
        });
        futures::future::join_all(taken)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Whether the node at `addr` has lost the last shard it said it stored
    /// through this gateway while the index still places that shard on it
    /// (one moved or deleted since, or of evidence not visible, is not
    /// missed). Checked once a probe,
    /// one header read; the shard is not checked again once found missing.
    async fn lost_a_stored_shard<S: Store>(&self, store: &S, addr: SocketAddr, id: NodeId) -> bool {
        let Some(key) = self.client.last_stored(addr) else {
            return false;
        };
        let stat = tokio::time::timeout(
            Duration::from_secs(3),
            self.client.rpc_stat_shard(addr, key),
        )
        .await;
        if !matches!(
            stat,
            Ok(Err(storage_node::client::NodeError::Remote(
                protocol::wire::ErrorCode::NotFound
            )))
        ) {
            return false;
        }
        // Not lost but quarantined: a scrub or a read found it corrupt and
        // moved it aside (repair collects it from there). One bad shard is
        // not a disk put back from an older copy, whose reconciliation
        // re-reads every stripe the node holds.
        let quarantined = tokio::time::timeout(
            Duration::from_secs(3),
            self.client.rpc_list_quarantined(addr, just_before(key)),
        )
        .await;
        if let Ok(Ok(keys)) = quarantined {
            if keys.first() == Some(&key) {
                self.client.forget_stored(addr, key);
                return false;
            }
        }
        // Of visible evidence (or a multipart upload's part in progress)
        // only: an aborted upload's shards are deleted before its records
        // are forgotten, and so are an ended upload's parts'.
        let placed = indexer::run(store, |tx| async move {
            if schema::stripes_of_tx(&tx, key.evidence).await?.is_none() {
                return Ok(None);
            }
            schema::get_stripe_tx(&tx, key.evidence, key.stripe).await
        })
        .await;
        self.client.forget_stored(addr, key);
        match placed {
            Ok(Some(rec)) => rec
                .shards
                .get(usize::from(key.index))
                .is_some_and(|p| p.node == Some(id)),
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(node = %id, error = %e, "could not read the record of a shard a node no longer holds");
                false
            }
        }
    }
}

fn writes_failing(n: &NodeState) -> bool {
    match n.write_failed.load(Ordering::Relaxed) {
        0 => false,
        at => {
            CLOCK_BASE.elapsed().as_millis() as u64 + 1 - at < WRITE_FAILURE_HOLD.as_millis() as u64
        }
    }
}

/// What [`NodeState::write_failed`] counts from.
static CLOCK_BASE: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

/// A probe's view of a node's room: its space (a Space answer, `Some(None)`
/// from a node too old to know the request, `None` when it failed or timed
/// out) and whether to mark it full (`Some(true)`), with room
/// (`Some(false)`) or leave it as it is. Full at the reserve; room again
/// only well above it, so a node at the edge does not flip with every probe
/// (and every put it refuses). A Space request that failed says nothing:
/// taken for a reserve of 0, it put a full node back into service (each put
/// then refused) and zeroed its figure; the last reserve known is kept.
fn fullness(
    space: Option<Option<SpaceInfo>>,
    info: &protocol::wire::NodeInfo,
    last_reserve: u64,
) -> (SpaceInfo, Option<bool>) {
    let (space, judged) = match space {
        Some(Some(space)) => (space, true),
        Some(None) => (
            SpaceInfo {
                free_bytes: info.free_bytes,
                reserve_bytes: 0,
            },
            true,
        ),
        None => (
            SpaceInfo {
                free_bytes: info.free_bytes,
                reserve_bytes: last_reserve,
            },
            false,
        ),
    };
    let headroom = FULL_HEADROOM.min(info.capacity_bytes.saturating_sub(space.reserve_bytes) / 2);
    let full = match judged {
        false => None,
        true if space.is_full() => Some(true),
        true if space.free_bytes > space.reserve_bytes.saturating_add(headroom) => Some(false),
        true => None,
    };
    (space, full)
}

/// The disk UUID the index records for a node whose disk is being
/// reconciled though it kept its UUID (its data directory put back from an
/// older copy): no disk has it, so until [`NodeSet::reconciled`] records
/// the real one, every probe, after a restart too, sees another disk.
const UNRECONCILED_DISK: [u8; 16] = [0; 16];

/// The shard key just before `key` in key order (none before the first),
/// so a listing "after" it begins at `key`.
fn just_before(key: ShardKey) -> Option<ShardKey> {
    if key.index > 0 {
        return Some(ShardKey {
            index: key.index - 1,
            ..key
        });
    }
    if key.stripe > 0 {
        return Some(ShardKey {
            stripe: key.stripe - 1,
            index: u8::MAX,
            ..key
        });
    }
    let id = u128::from_be_bytes(key.evidence.0).checked_sub(1)?;
    Some(ShardKey {
        evidence: EvidenceId(id.to_be_bytes()),
        stripe: u64::MAX,
        index: u8::MAX,
    })
}

impl NodeState {
    /// Records why a probe failed; true if that is news (the first
    /// failure, or another reason than the last).
    fn probe_failed(&self, why: String) -> bool {
        let mut last = lock(&self.probe_failure);
        let news = last.as_deref() != Some(why.as_str());
        *last = Some(why);
        news
    }

    /// Marks the node's health; says whether it changed.
    fn mark(&self, healthy: bool) -> bool {
        let changed = self.healthy.swap(healthy, Ordering::Relaxed) != healthy;
        if changed {
            tracing::info!(node = %self.entry.node_id(), healthy, "node health changed");
        }
        changed
    }
}

/// A lock that a panicking holder cannot poison for good (the data are
/// plain figures, valid whatever the holder was doing).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn candidate(e: &NodeEntry) -> Candidate {
    Candidate {
        node: e.node_id(),
        failure_domain: e.failure_domain.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use storage_node::tls::{ClusterCa, TlsFiles};

    /// A Space probe that failed leaves a full node full, its reserve as
    /// last known; a node too old to answer it keeps no reserve; an answer
    /// decides, with headroom before room again.
    #[test]
    fn a_failed_space_probe_puts_no_full_node_back() {
        let gib = 1u64 << 30;
        let info = protocol::wire::NodeInfo {
            node: NodeId(1),
            disk_uuid: [0; 16],
            capacity_bytes: 100 * gib,
            free_bytes: 5 * gib,
            used_bytes: 95 * gib,
            shards: 1,
        };
        let (space, full) = fullness(None, &info, 10 * gib);
        assert_eq!(full, None, "judged on no answer");
        assert_eq!(space.reserve_bytes, 10 * gib, "its reserve forgotten");
        let answer = |free, reserve| {
            Some(Some(SpaceInfo {
                free_bytes: free,
                reserve_bytes: reserve,
            }))
        };
        assert_eq!(fullness(answer(5 * gib, 10 * gib), &info, 0).1, Some(true));
        assert_eq!(fullness(answer(10 * gib + 1, 10 * gib), &info, 0).1, None);
        assert_eq!(
            fullness(answer(20 * gib, 10 * gib), &info, 0).1,
            Some(false)
        );
        assert_eq!(fullness(Some(None), &info, 10 * gib).1, Some(false));
    }

    /// A listing "after" the key just before a key begins at that key,
    /// whichever of its parts has to borrow.
    #[test]
    fn just_before_a_key_is_the_greatest_key_under_it() {
        let e = EvidenceId([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        let key = |evidence, stripe, index| ShardKey {
            evidence,
            stripe,
            index,
        };
        for k in [key(e, 7, 3), key(e, 7, 0), key(e, 0, 0)] {
            let before = just_before(k).unwrap();
            assert!(before < k, "{before:?} {k:?}");
        }
        assert_eq!(just_before(key(e, 7, 3)), Some(key(e, 7, 2)));
        assert_eq!(just_before(key(e, 7, 0)), Some(key(e, 6, u8::MAX)));
        let below = EvidenceId([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255]);
        assert_eq!(
            just_before(key(e, 0, 0)),
            Some(key(below, u64::MAX, u8::MAX))
        );
        assert_eq!(just_before(key(EvidenceId([0; 16]), 0, 0)), None);
    }

    /// Eight nodes, all up and active, and a client that never connects.
    fn set(dir: &std::path::Path) -> NodeSet {
        set_in(dir, |_| None)
    }

    /// Eight nodes, node `i` in failure domain `domain(i)`.
    fn set_in(dir: &std::path::Path, domain: impl Fn(u32) -> Option<String>) -> NodeSet {
        let ca = ClusterCa::generate("test CA").unwrap();
        let (ca_pem, _) = ca.to_pem();
        let (cert, key) = ca
            .issue("gateway", &["gateway.custodia.internal".into()], &[])
            .unwrap();
        let files = TlsFiles {
            ca_cert: dir.join("ca.pem"),
            cert: dir.join("gw.pem"),
            key: dir.join("gw.key"),
        };
        std::fs::write(&files.ca_cert, ca_pem).unwrap();
        std::fs::write(&files.cert, cert).unwrap();
        std::fs::write(&files.key, key).unwrap();
        let entries: Vec<NodeEntry> = (0..8)
            .map(|id| NodeEntry {
                id,
                addr: SocketAddr::from(([127, 0, 0, 1], 7100 + id as u16)),
                failure_domain: domain(id),
                server_name: None,
            })
            .collect();
        NodeSet::new(
            &entries,
            NodeClient::new(&files).unwrap(),
            Duration::from_secs(10),
        )
    }

    /// A stripe is crowded when a write put two of its shards on one node,
    /// or two more in one rack than in another; two per rack is even when
    /// there are fewer racks than shards.
    #[tokio::test]
    async fn stripes_crowded_by_a_write_are_told_from_even_ones() {
        let dir = tempfile::tempdir().unwrap();
        let rec = |nodes: &[u32]| protocol::StripeRecord {
            version: 0,
            shard_len: 1,
            shards: nodes
                .iter()
                .map(|n| protocol::ShardPlacement {
                    node: Some(NodeId(*n)),
                    blake3: protocol::Blake3Hash([0; 32]),
                })
                .collect(),
        };
        // Three racks of nodes 0-2, 3-5, 6-7.
        let racks = set_in(dir.path(), |i| Some(format!("rack-{}", i / 3)));
        assert!(
            !racks.crowds(&rec(&[0, 1, 3, 4, 6, 7])),
            "two per rack is even"
        );
        assert!(
            racks.crowds(&rec(&[0, 1, 2, 3, 4, 6])),
            "three in one, one in another"
        );
        assert!(!racks.crowds(&rec(&[0, 3, 6])));
        assert!(
            racks.crowds(&rec(&[0, 1, 3])),
            "two in one, none in another"
        );
        // The empty rack down (or full): crowded because it is, which the
        // scanner sees to once it is back.
        racks.mark(NodeId(6), false);
        racks.mark_full(NodeId(7), true);
        assert!(!racks.crowds(&rec(&[0, 1, 3])));
        // Unlabelled: only two shards on one node.
        let plain = set(dir.path());
        assert!(!plain.crowds(&rec(&[0, 1, 2, 3, 4, 5])));
        assert!(plain.crowds(&rec(&[0, 1, 1])));
    }

    fn ids(c: &[Candidate]) -> Vec<u32> {
        c.iter().map(|c| c.node.0).collect()
    }

    #[tokio::test]
    async fn full_nodes_take_new_shards_only_when_too_few_others_have_room() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = set(dir.path());
        nodes.mark_full(NodeId(2), true);
        assert!(nodes.is_full(NodeId(2)) && nodes.is_healthy(NodeId(2)));
        assert_eq!(ids(&nodes.write_candidates(6)), [0, 1, 3, 4, 5, 6, 7]);
        // Two down: six healthy, of which one full; the five healthy ones
        // with room are too few, so the down ones with room are candidates
        // too (the full one still is not).
        nodes.mark(NodeId(0), false);
        nodes.mark(NodeId(1), false);
        assert_eq!(ids(&nodes.write_candidates(6)), [0, 1, 3, 4, 5, 6, 7]);
        // Three full: five with room is too few for six shards, so every
        // active node is a candidate (a really full one refuses, cleanly).
        nodes.mark_full(NodeId(3), true);
        nodes.mark_full(NodeId(4), true);
        assert_eq!(ids(&nodes.write_candidates(6)).len(), 8);
        // Room again.
        for id in [2, 3, 4] {
            nodes.mark_full(NodeId(id), false);
        }
        nodes.mark(NodeId(0), true);
        nodes.mark(NodeId(1), true);
        assert_eq!(ids(&nodes.write_candidates(6)).len(), 8);
        assert!(nodes.view().iter().all(|v| !v.full));
    }

    /// A node whose disk refuses writes (it answers probes all the while:
    /// a file system remounted read-only) is passed over for new shards
    /// until a write succeeds; a lost connection or a full disk is not
    /// such a failure.
    #[tokio::test]
    async fn a_node_whose_writes_fail_takes_no_new_shards() {
        use protocol::wire::ErrorCode;
        use storage_node::client::NodeError;
        let dir = tempfile::tempdir().unwrap();
        let nodes = set(dir.path());
        nodes.write_failed(NodeId(2), &NodeError::Timeout);
        nodes.write_failed(NodeId(2), &NodeError::Remote(ErrorCode::DiskFull));
        assert!(!nodes.writes_failing(NodeId(2)));
        // One failed fsync fails every put it batched: one spell.
        for _ in 0..3 {
            nodes.write_failed(NodeId(2), &NodeError::Remote(ErrorCode::Io));
        }
        assert!(nodes.writes_failing(NodeId(2)) && nodes.is_healthy(NodeId(2)));
        assert_eq!(ids(&nodes.write_candidates(6)), [0, 1, 3, 4, 5, 6, 7]);
        // What status and the metrics show.
        let failing = |nodes: &NodeSet| -> Vec<u32> {
            let v = nodes.view();
            v.iter()
                .filter(|v| v.writes_failing)
                .map(|v| v.id.0)
                .collect()
        };
        assert_eq!(failing(&nodes), [2]);
        let failures = nodes.view().iter().map(|v| v.write_failures).sum::<u64>();
        assert_eq!(
            failures, 1,
            "one spell, and a lost connection or a full disk is none"
        );
        nodes.write_succeeded(NodeId(2));
        assert!(!nodes.writes_failing(NodeId(2)));
        assert!(failing(&nodes).is_empty());
        assert_eq!(ids(&nodes.write_candidates(6)).len(), 8);
    }

    /// A clock sample whose round trip took too long to bound its error is
    /// not used.
    #[test]
    fn a_slow_clock_sample_is_not_used() {
        assert_eq!(usable_offset((-250, 4)), Some(-250));
        assert_eq!(usable_offset((40, MAX_CLOCK_SAMPLE_RTT_MS)), Some(40));
        assert_eq!(usable_offset((40, MAX_CLOCK_SAMPLE_RTT_MS + 1)), None);
        // Within the fenced deletes' margin, drift aside.
        assert!(
            Duration::from_millis(MAX_CLOCK_SAMPLE_RTT_MS / 2) * 2
                <= crate::repair::DELETE_FENCE_MARGIN
        );
    }

    /// With too few healthy nodes, the candidates include nodes down; the
    /// healthy ones still take the first places, in placement order.
    #[tokio::test]
    async fn nodes_down_come_after_healthy_ones_in_write_order() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = set(dir.path());
        for id in [1, 4, 6] {
            nodes.mark(NodeId(id), false);
        }
        for stripe in 0..200u64 {
            let ranked =
                crate::placement::rank(&EvidenceId([9; 16]), stripe, &nodes.write_candidates(6));
            assert_eq!(ranked.len(), 8, "down nodes are candidates");
            let ordered = nodes.in_write_order(ranked.clone());
            assert!(
                ordered[..5].iter().all(|n| nodes.is_healthy(*n)),
                "{ordered:?}"
            );
            let healthy: Vec<NodeId> = ranked
                .iter()
                .copied()
                .filter(|n| nodes.is_healthy(*n))
                .collect();
            assert_eq!(ordered[..5], healthy[..], "placement order kept");
        }
    }

    /// Every time a node comes (back) to take new shards is counted, and
    /// nothing else is: a look before and after sees a node that went and
    /// came back in between.
    #[tokio::test]
    async fn a_node_opening_to_new_shards_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = set(dir.path());
        let seen = nodes.openings();
        nodes.mark(NodeId(1), true);
        nodes.mark_full(NodeId(2), false);
        nodes.mark(NodeId(3), false);
        nodes.mark_full(NodeId(4), true);
        assert_eq!(nodes.openings(), seen, "nothing opened");
        // Down and up, full and with room, draining and active.
        nodes.mark(NodeId(3), true);
        nodes.mark_full(NodeId(4), false);
        let draining = schema::LifecycleRecord {
            state: Lifecycle::Draining,
            changed_ms: 1,
        };
        nodes.set_lifecycles(&[(NodeId(5), draining)]);
        assert_eq!(nodes.openings(), seen + 2);
        nodes.set_lifecycles(&[]);
        assert_eq!(nodes.openings(), seen + 3);
    }
}
