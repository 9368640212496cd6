//! The evidence API (axum) and the gateway's shared state.
//!
//! Its routes, parameters, bodies and answers are described in
//! `gateway/openapi.json` (OpenAPI 3.1), served at `GET /v1/openapi.json`;
//! a test holds it to the routes [`router`] serves.
//!
//! `/healthz`, this API's description (`/v1/openapi.json`), the published
//! log (`/ledger/*`), its key (`/v1/ledger/key`), its proofs
//! (`/v1/ledger/inclusion`, `/v1/ledger/consistency`) and the
//! time-stamping service (`/tsa`) need no credentials: they reveal nothing
//! of what was filed. Every other route needs
//! `Authorization: Bearer <token>`; tokens map to a
//! tenant and role in the index. Evidence of another tenant answers 404, so its
//! existence does not leak.

use crate::config::GatewayConfig;
use crate::error::ApiError;
use crate::ingest::{self, Filing, FilingMeta};
use crate::nodes::NodeSet;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use indexer::schema::{self, Role, TokenRecord};
use indexer::KvStore;
use protocol::ledger::{Kind, Statement};
use protocol::{Blake3Hash, EvidenceId, ManifestHeader, NodeId, Sha256Hash};
use reed_solomon_erasure::galois_8::ReedSolomon;
use serde_json::json;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

/// The index backends the gateway can run on.
pub trait Store: KvStore + Clone {}
impl<T: KvStore + Clone> Store for T {}

/// Largest body of a small JSON request (retention, expunge order, new
/// credential, time-stamp request): read whole before authentication, so
/// bounded.
const SMALL_BODY: usize = 16 * 1024;

/// Longest metadata header value accepted.
const MAX_META_LEN: usize = 1024;

pub use crate::clock::Clock;

/// Everything a request handler needs.
pub struct Gateway<S: Store> {
    pub config: GatewayConfig,
    pub store: S,
    pub nodes: NodeSet,
    /// The code new evidence is written with.
    pub rs: Arc<ReedSolomon>,
    /// Codecs for the codes older evidence was written with (reads use the
    /// manifest's code, which need not be today's configuration).
    codecs: std::sync::Mutex<std::collections::HashMap<(usize, usize), Arc<ReedSolomon>>>,
    pub clock: Clock,
    /// Stripe and shard buffers reused across uploads.
    pub buffers: Arc<storage_node::buffers::BufferPool>,
    /// The notarization ledger, when configured.
    pub ledger: Option<Arc<crate::ledger::Ledger>>,
    /// What the gateway counts (on the registry `new` was given).
    pub metrics: crate::metrics::GatewayMetrics,
    /// Wakes the repair loop (`POST /v1/admin/repair`).
    pub repair_wake: tokio::sync::Notify,
    /// Asks the orphan sweeper to sweep now (see [`Gateway::ask_for_sweep`]).
    pub sweep_wake: tokio::sync::Notify,
    sweep_asked: std::sync::Mutex<Option<std::time::Instant>>,
    /// What the ledger's openings archive holds of the node decisions.
    pub lifecycle_archive: crate::lifecycle_archive::Archived,
    /// How many stripes repair is reading and rebuilding here now: while
    /// any, ingest stores at most `repair_ingest_stripes` stripes at once
    /// (across all uploads), so repair gets its share of the machine. (A
    /// backlog that cannot move, with nowhere to put its shards or nodes
    /// within their grace, holds nothing back.)
    pub repairing: std::sync::atomic::AtomicUsize,
    pub ingest_gate: tokio::sync::Semaphore,
    /// KiB of stripes being coded and stored across all uploads
    /// ([`GatewayConfig::ingest_memory_bytes`]).
    pub ingest_memory: Arc<tokio::sync::Semaphore>,
    /// Its size, in KiB.
    pub ingest_memory_kib: usize,
    /// KiB of stripes being received across all uploads
    /// ([`GatewayConfig::receive_memory_bytes`]).
    pub receive_memory: Arc<tokio::sync::Semaphore>,
    /// How many times an upload has let go of receive memory.
    pub receive_released: Arc<std::sync::atomic::AtomicU64>,
    /// Its size, in KiB.
    pub receive_memory_kib: usize,
    /// KiB of stripes read ahead across all reads
    /// ([`GatewayConfig::read_memory_bytes`]).
    pub read_memory: Arc<tokio::sync::Semaphore>,
    /// Its size, in KiB.
    pub read_memory_kib: usize,
    /// Stripe fetches in flight across all reads
    /// ([`GatewayConfig::read_stripes`]).
    pub read_gate: tokio::sync::Semaphore,
    /// Reads rebuilding an evidence's missing Bao outboard, one per evidence
    /// at a time (`crate::read`); the others wait, then read by groups.
    pub outboard_rebuilds: std::sync::Mutex<
        std::collections::HashMap<EvidenceId, std::sync::Weak<tokio::sync::Mutex<()>>>,
    >,
    /// Whether repair asks nodes to build shards themselves just now.
    pub remote_builds: crate::repair::RemoteBuilds,
    /// Repair leases found held by other tasks, watched for staleness.
    pub repair_leases: crate::repair::LeaseSightings,
    /// Old shard copies repair moved away, to delete after their grace.
    pub old_copies: crate::repair::OldCopies,
    /// No copy left by `recover-index` of a shard its record has no node
    /// for can still turn up: none awaits adoption (the index says so at
    /// start), or an orphan sweep since this gateway started listed every
    /// active node and adopted every copy. Only then does a stripe short of
    /// such shards count as lost. (Slots a filing left empty, its stripe
    /// written with fewer than k+m shards, rarely have a copy anywhere: one
    /// whose node stored it but failed to answer may, and the sweep adopts
    /// it if it finds it, after which a `repaired` statement follows any
    /// `lost` one, as for every filing since the first sweep.)
    pub homeless_adopted: std::sync::atomic::AtomicBool,
    /// Stripes repair took out of its queue since this gateway started
    /// (found healthy, repaired, or gone): what `custodia repair` follows
    /// while the backlog is larger than the status counts.
    pub repair_settled: std::sync::atomic::AtomicU64,
    /// Stripes repair found with nowhere to move shards, and when each was
    /// last checked in place.
    pub no_home: crate::repair::NoHomeChecks,
    /// Set once the APIs' connections still open are cut off (the shutdown
    /// grace ran out, or the gateway was aborted). A body whose
    /// connection is aborted ends as if complete (hyper closes it
    /// normally), so an upload of unknown length (chunked) that sees its
    /// body end after this must not take it for the whole file.
    pub connections_cut_off: Arc<std::sync::atomic::AtomicBool>,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("TLS material: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("erasure code: {0:?}")]
    Code(reed_solomon_erasure::Error),
    #[error("{0}")]
    Ledger(String),
    #[error("reading the compliance clock from the index: {0}")]
    Clock(String),
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("indexing S3 multipart uploads by bucket: {0}")]
    Uploads(String),
    #[error("bringing older S3 records up to date: {0}")]
    Migrate(String),
    #[error(
        "the index was written by a newer version of Custodia (index format {found}; this \
         version reads up to {}): run that version or a newer one. Served by this one, records \
         it cannot know of would be ignored (shards kept from the orphan sweep, say)",
        indexer::schema::INDEX_FORMAT
    )]
    NewerIndex { found: u32 },
    #[error("the index: {0}")]
    Index(String),
}

/// A running gateway. Dropped, it stops accepting connections (as at
/// [`Self::shutdown`]) but leaves its tasks running: stop it with
/// [`Self::shutdown`] and [`Self::abort`].
pub struct RunningGateway {
    pub local_addr: SocketAddr,
    /// The S3 API's address, when it runs.
    pub s3_addr: Option<SocketAddr>,
    /// Where Prometheus scrapes `/metrics`, when configured.
    pub metrics_addr: Option<SocketAddr>,
    /// The evidence API's accept loop, until it has ended.
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    /// The S3 API's accept loop, when it runs and until it has ended.
    s3: Option<tokio::task::JoinHandle<()>>,
    /// Tells both APIs to stop accepting and drain ([`Self::shutdown`]).
    stop: Stopper,
    /// The background work, by name: probing nodes, GC, the ledger's
    /// integrator, repair, ... Each runs as long as the gateway; one that
    /// panics ends the gateway ([`Self::stopped`]).
    background: Vec<(&'static str, tokio::task::JoinHandle<()>)>,
}

impl RunningGateway {
    /// Stops cleanly: both APIs stop accepting connections at once, let
    /// the requests under way finish (an evidence upload streaming its body
    /// included) for up to `shutdown_grace_ms`, and close every connection
    /// as its response ends; a request still running when the grace ends
    /// is aborted, as by a crash (nothing of an unacknowledged filing
    /// becomes visible). Follow with [`Self::abort`], which also ends the
    /// background work, whether this finished or was given up on.
    pub async fn shutdown(&mut self) {
        self.stop.stop();
        if let Some(server) = self.server.as_mut() {
            let _ = server.await;
            self.server = None;
        }
        if let Some(s3) = self.s3.as_mut() {
            let _ = s3.await;
            self.s3 = None;
        }
    }

    /// Waits until the evidence API stops (it does not, unless it fails or
    /// is shut down) or a background task panics, and says why; the
    /// gateway is still to be stopped with [`Self::abort`]. A gateway
    /// whose integrator or prober died would otherwise serve on while
    /// receipts stop coming or node states freeze, and a supervisor would
    /// never know to restart it.
    pub async fn stopped(&mut self) -> std::io::Error {
        let Some(server) = self.server.as_mut() else {
            return std::io::Error::other("the server stopped");
        };
        let background = &mut self.background;
        let s3 = &mut self.s3;
        let died = std::future::poll_fn(|cx| {
            use std::future::Future as _;
            // The S3 API's accept loop ends only when told to, as the
            // evidence API's.
            if let Some(api) = s3.as_mut() {
                if let std::task::Poll::Ready(ended) = std::pin::Pin::new(api).poll(cx) {
                    *s3 = None;
                    let why = match ended {
                        Ok(()) => "it ended".to_owned(),
                        Err(e) => e.to_string(),
                    };
                    return std::task::Poll::Ready(("S3 API", why));
                }
            }
            let mut i = 0;
            while i < background.len() {
                if let std::task::Poll::Ready(ended) =
                    std::pin::Pin::new(&mut background[i].1).poll(cx)
                {
                    let (name, _) = background.swap_remove(i);
                    match ended {
                        // One that ends on its own (its work done) is no
                        // failure; the others go on.
                        Ok(()) => {
                            tracing::debug!(task = name, "background task ended");
                            continue;
                        }
                        Err(e) => return std::task::Poll::Ready((name, e.to_string())),
                    }
                }
                i += 1;
            }
            std::task::Poll::Pending
        });
        tokio::select! {
            ended = server => {
                self.server = None;
                match ended {
                    Ok(Ok(())) => std::io::Error::other("the server stopped"),
                    Ok(Err(e)) => e,
                    Err(e) => std::io::Error::other(e),
                }
            }
            (name, e) = died => {
                tracing::error!(task = name, error = %e, "a background task of the gateway died");
                std::io::Error::other(format!("its {name} task died: {e}"))
            }
        }
    }

    /// Ends everything at once: both APIs (their connections included) and
    /// the background work.
    pub fn abort(self) {
        self.stop.cut_off();
        self.stop.stop();
        if let Some(server) = self.server {
            server.abort();
        }
        for b in self
            .s3
            .into_iter()
            .chain(self.background.into_iter().map(|(_, b)| b))
        {
            b.abort();
        }
    }
}

/// Tells the APIs' accept loops to stop (see [`RunningGateway::shutdown`]).
pub(crate) struct Stopper {
    stop: tokio::sync::watch::Sender<bool>,
    /// [`Gateway::connections_cut_off`].
    cut_off: Arc<std::sync::atomic::AtomicBool>,
}

impl Stopper {
    fn new(cut_off: Arc<std::sync::atomic::AtomicBool>) -> Self {
        Stopper {
            stop: tokio::sync::watch::Sender::new(false),
            cut_off,
        }
    }

    fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Says the APIs' connections are being cut off; before they
    /// are, so an upload whose body ends for it sees it.
    fn cut_off(&self) {
        self.cut_off
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The accept loops' side: [`Drain::stopped`].
    pub(crate) fn drain(&self, api: &'static str, grace: Duration) -> Drain {
        Drain {
            stop: self.stop.subscribe(),
            graceful: hyper_util::server::graceful::GracefulShutdown::new(),
            connections: tokio::task::JoinSet::new(),
            api,
            grace,
            cut_off: None,
        }
    }

    /// [`Self::drain`], setting [`Gateway::connections_cut_off`] before it
    /// cuts connections off.
    fn drain_telling_cut_off(&self, api: &'static str, grace: Duration) -> Drain {
        Drain {
            cut_off: Some(self.cut_off.clone()),
            ..self.drain(api, grace)
        }
    }
}

/// One API's connections, for a clean stop: each connection is watched, and
/// once told to stop, each finishes the request it serves and closes. The
/// connections' tasks belong to the accept loop: aborted with it, and at
/// the end of the grace.
pub(crate) struct Drain {
    stop: tokio::sync::watch::Receiver<bool>,
    graceful: hyper_util::server::graceful::GracefulShutdown,
    connections: tokio::task::JoinSet<()>,
    api: &'static str,
    grace: Duration,
    /// Set before connections still open at the end of the grace are
    /// aborted (see [`Gateway::connections_cut_off`]).
    cut_off: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl Drain {
    /// Resolves once the gateway is told to stop, or its [`Stopper`] is
    /// dropped (the [`RunningGateway`] with it, or a start that failed).
    pub(crate) async fn stopped(&mut self) {
        let _ = self.stop.wait_for(|stop| *stop).await;
    }

    /// Serves a connection accepted now: `serve` gets the watcher to serve
    /// it under ([`hyper_util::server::graceful::Watcher::watch`]).
    pub(crate) fn spawn<F>(
        &mut self,
        serve: impl FnOnce(hyper_util::server::graceful::Watcher) -> F,
    ) where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        // Ended connections' tasks are let go of here, so the set holds
        // only the open ones.
        while self.connections.try_join_next().is_some() {}
        self.connections.spawn(serve(self.graceful.watcher()));
    }

    /// Has every connection finish its request and close, waiting up to the
    /// grace period for them, then aborts what still runs; call once the
    /// listener is closed.
    pub(crate) async fn finish(mut self) {
        let open = self.graceful.count();
        if open > 0 {
            tracing::info!(
                api = self.api,
                connections = open,
                grace_ms = self.grace.as_millis() as u64,
                "letting the requests under way finish"
            );
        }
        if tokio::time::timeout(self.grace, self.graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                api = self.api,
                connections = self.connections.len(),
                "requests still running at the end of shutdown_grace_ms are cut off"
            );
            if let Some(flag) = &self.cut_off {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        self.connections.shutdown().await;
    }
}

impl<S: Store> Gateway<S> {
    /// A gateway counting on `registry`.
    pub fn new(
        config: GatewayConfig,
        store: S,
        registry: &prometheus::Registry,
    ) -> Result<Self, StartError> {
        config.validate()?;
        for warning in config.warnings() {
            tracing::warn!("{warning}");
        }
        let metrics = crate::metrics::GatewayMetrics::new(
            registry,
            config.ledger.is_some(),
            config.ledger.as_ref().is_some_and(|l| l.tsa.is_some()),
        )?;
        metrics.witness_quorum.set(
            config
                .ledger
                .as_ref()
                .map_or(0, |l| l.witnesses.len() as i64),
        );
        let client = storage_node::client::NodeClient::new(&config.tls.files())
            .map_err(|e| StartError::Tls(e.to_string()))?;
        let rs =
            ReedSolomon::new(config.k as usize, config.m as usize).map_err(StartError::Code)?;
        let ledger = match &config.ledger {
            Some(c) => Some(Arc::new(
                crate::ledger::Ledger::open(
                    c,
                    &format!("{} {}", config.listen, config.index_path.display()),
                )
                .map_err(|e| StartError::Ledger(e.to_string()))?,
            )),
            None => {
                tracing::error!(
                    "no [ledger] configured: filings get no receipts and reads are NOT \
                     recorded as custody events (custody answers 503); configure one for \
                     any use beyond a test"
                );
                None
            }
        };
        // Idle buffers for a few uploads' pipelines: each stripe in flight holds
        // the stripe (k shards of data) and its k+m shards.
        let per_upload = config.pipeline_stripes
            * (2 * config.k as usize + config.m as usize)
            * config.shard_size_bytes as usize;
        let ingest_gate = tokio::sync::Semaphore::new(match config.repair_ingest_stripes {
            0 => tokio::sync::Semaphore::MAX_PERMITS,
            n => n,
        });
        let read_gate = tokio::sync::Semaphore::new(config.read_stripes());
        // A memory budget as permits of a KiB each.
        let kib = |bytes: u64| {
            usize::try_from(bytes.div_ceil(1024))
                .unwrap_or(usize::MAX)
                .min(tokio::sync::Semaphore::MAX_PERMITS)
        };
        let ingest_memory_kib = kib(config.ingest_memory_bytes());
        let ingest_memory = Arc::new(tokio::sync::Semaphore::new(ingest_memory_kib));
        let receive_memory_kib = kib(config.receive_memory_bytes());
        let receive_memory = Arc::new(tokio::sync::Semaphore::new(receive_memory_kib));
        let read_memory_kib = kib(config.read_memory_bytes());
        let read_memory = Arc::new(tokio::sync::Semaphore::new(read_memory_kib));
        Ok(Gateway {
            nodes: NodeSet::new(
                &config.nodes,
                client,
                Duration::from_millis(config.node_down_after_ms),
            ),
            buffers: Arc::new(storage_node::buffers::BufferPool::new(4 * per_upload)),
            config,
            store,
            rs: Arc::new(rs),
            codecs: Default::default(),
            clock: Clock::default(),
            ledger,
            metrics,
            repair_wake: tokio::sync::Notify::new(),
            sweep_wake: tokio::sync::Notify::new(),
            sweep_asked: std::sync::Mutex::new(None),
            lifecycle_archive: Default::default(),
            repairing: std::sync::atomic::AtomicUsize::new(0),
            ingest_gate,
            ingest_memory,
            read_memory,
            read_memory_kib,
            ingest_memory_kib,
            receive_memory,
            receive_memory_kib,
            receive_released: Default::default(),
            read_gate,
            outboard_rebuilds: Default::default(),
            remote_builds: Default::default(),
            repair_leases: Default::default(),
            old_copies: Default::default(),
            homeless_adopted: Default::default(),
            repair_settled: Default::default(),
            no_home: Default::default(),
            connections_cut_off: Default::default(),
        })
    }

    /// Asks the orphan sweeper for a sweep before its interval (copies
    /// `recover-index` could not place await one before a node may be
    /// removed): at most once a minute, since a sweep lists every shard on
    /// every node, and a drain's wait asks every half second.
    pub fn ask_for_sweep(&self) {
        let mut asked = self.sweep_asked.lock().unwrap_or_else(|p| p.into_inner());
        if asked.is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(60)) {
            *asked = Some(std::time::Instant::now());
            self.sweep_wake.notify_one();
        }
    }

    /// The Reed-Solomon codec for RS(k, m), built once and cached.
    pub fn codec(
        &self,
        k: usize,
        m: usize,
    ) -> Result<Arc<ReedSolomon>, reed_solomon_erasure::Error> {
        if (k, m) == (self.rs.data_shard_count(), self.rs.parity_shard_count()) {
            return Ok(self.rs.clone());
        }
        let mut codecs = self.codecs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rs) = codecs.get(&(k, m)) {
            return Ok(rs.clone());
        }
        let rs = Arc::new(ReedSolomon::new(k, m)?);
        codecs.insert((k, m), rs.clone());
        Ok(rs)
    }
}

/// Indexes by bucket the S3 multipart uploads begun before uploads were
/// (once, in small transactions; nothing to do on any later start).
async fn index_bucket_uploads<S: Store>(gw: &Gateway<S>) -> Result<(), indexer::s3::ObjectError> {
    let mut after = None;
    loop {
        after = indexer::run(&gw.store, |tx| async move {
            indexer::s3::index_bucket_uploads_tx(&tx, after, 500).await
        })
        .await?;
        if after.is_none() {
            return Ok(());
        }
    }
}

/// Binds every S3 version's Object Lock to its evidence, once (see
/// `indexer::s3::locks_to_carry_tx`): each COMPLIANCE date extended and
/// each hold placed with an `admin` statement on the ledger, in one
/// transaction, as the APIs do, so the openings archive (and an index
/// rebuilt from it) keeps them.
pub(crate) async fn carry_locks_to_evidence<S: Store>(gw: &Gateway<S>) -> Result<(), ApiError> {
    let (mut after, mut total) = (None, 0);
    loop {
        let now = gw.clock.compliance_ms();
        let (next, todo) = indexer::run(&gw.store, |tx| {
            let after = after.clone();
            async move { indexer::s3::locks_to_carry_tx(&tx, after, 200, now).await }
        })
        .await?;
        if !todo.is_empty() {
            tracing::info!(
                versions = todo.len(),
                so_far = total,
                "binding S3 Object Lock set by an older version to its evidence"
            );
        }
        for lock in todo {
            if carry_lock(gw, lock).await? {
                total += 1;
            }
        }
        match next {
            Some(k) => after = Some(k),
            None => break,
        }
    }
    indexer::run(&gw.store, |tx| async move {
        indexer::s3::set_locks_carried_tx(&tx);
        Ok::<_, indexer::KvError>(())
    })
    .await?;
    if total > 0 {
        tracing::warn!(
            evidence = total,
            "S3 Object Lock retention and legal holds set by an older version now bind their evidence, on the ledger"
        );
    }
    Ok(())
}

/// [`carry_locks_to_evidence`] for one version: whether it changed or
/// stated anything.
async fn carry_lock<S: Store>(
    gw: &Gateway<S>,
    lock: indexer::s3::LockToCarry,
) -> Result<bool, ApiError> {
    let evidence = lock.evidence;
    let Some(h) = indexer::run(&gw.store, |tx| async move {
        schema::get_manifest_tx(&tx, evidence).await
    })
    .await?
    else {
        return Ok(false);
    };
    let detail = json!({
        "s3_object_lock": "carried to the evidence on upgrade",
        "legal_hold": lock.hold || lock.restate_hold,
        "retain_until_ms": lock.compliance_until_ms,
    });
    let statement = event_statement(gw, &h, Kind::Admin, "custodia/upgrade".into(), &detail)?;
    Ok(indexer::run(&gw.store, |tx| {
        let statement = &statement;
        async move {
            let Some(h) = schema::get_manifest_tx(&tx, evidence).await? else {
                return Ok(false);
            };
            let mut changed = lock.restate_hold && h.legal_hold;
            if let Some(until) = lock.compliance_until_ms {
                if h.retain_until_ms.is_none_or(|u| u < until) {
                    schema::extend_retention_tx(&tx, evidence, until).await?;
                    changed = true;
                }
            }
            if lock.hold && !h.legal_hold {
                schema::set_legal_hold_tx(&tx, evidence, true).await?;
                changed = true;
            }
            if let (true, Some(p)) = (changed, statement) {
                indexer::ledger::enqueue_tx(&tx, 0, p);
            }
            Ok::<_, schema::SchemaError>(changed)
        }
    })
    .await?)
}

/// Refuses an index a newer version of Custodia wrote: records this
/// version cannot know of would be ignored (or overwritten) by it. Every
/// opener of an index calls this first, the gateway and the offline CLI
/// alike.
pub async fn check_index_format<S: Store>(store: &S) -> Result<(), StartError> {
    let found = indexer::run(
        store,
        |tx| async move { schema::index_format_tx(&tx).await },
    )
    .await
    .map_err(|e| StartError::Index(format!("reading its format: {e}")))?;
    if found > schema::INDEX_FORMAT {
        return Err(StartError::NewerIndex { found });
    }
    Ok(())
}

/// Starts the evidence API, the node prober and garbage collection.
pub async fn serve<S: Store>(
    config: GatewayConfig,
    store: S,
    registry: prometheus::Registry,
) -> Result<RunningGateway, StartError> {
    let listen = config.listen;
    let gw = Arc::new(Gateway::new(config, store, &registry)?);
    // First: nothing of a newer version's index is read or changed by this
    // one.
    check_index_format(&gw.store).await?;
    let adoption_pending = indexer::run(&gw.store, |tx| async move {
        schema::adoption_pending_tx(&tx).await
    })
    .await
    .map_err(|e| StartError::Index(format!("reading whether copies await adoption: {e}")))?;
    gw.homeless_adopted
        .store(!adoption_pending, std::sync::atomic::Ordering::Relaxed);
    if gw.ledger.is_none() {
        tracing::warn!(
            "no ledger ([gateway.ledger] in cluster.toml): filings get no receipts, reads are \
             recorded on no custody ledger, expunges and hold releases are refused, and nothing \
             tells an index restored from an older backup from the current one"
        );
    }
    if gw.ledger.is_some() {
        let current = indexer::run(&gw.store, |tx| async move {
            indexer::ledger::layout_current_tx(&tx).await
        })
        .await
        .map_err(|e| StartError::Ledger(format!("reading the ledger's state: {e}")))?;
        if !current {
            return Err(StartError::Ledger(
                "the index holds the ledger in an older layout (one key per opening and tree \
                 hash) that this version does not read: stop here and rebuild the index with \
                 `custodia recover-index`, which reads the openings archive and the nodes and \
                 keeps the old index file beside the new one"
                    .into(),
            ));
        }
    }
    // An index behind the published log (restored from an older backup,
    // or a new empty one beside a cluster's tiles and nodes) would sign a
    // fork, and its orphan sweep would take every shard filed since for an
    // orphan: refused here. A store that cannot be read now is checked
    // again by the integrator; the sweep deletes nothing until it passes.
    if let Some(ledger) = gw.ledger.clone() {
        match crate::ledger::check_published_tree(&gw, &ledger).await {
            Ok(()) => {}
            Err(crate::ledger::LedgerError::Forked(why)) => {
                return Err(StartError::Ledger(format!(
                    "the index does not hold the published log ({why}): it was restored from \
                     an older backup, or is new beside an existing cluster. Stop here: move the \
                     index file aside and rebuild it with `custodia recover-index`, which reads \
                     the nodes and the ledger's archive"
                )))
            }
            Err(e) => tracing::warn!(
                error = %e,
                "could not compare the published log with the index yet; \
                 the orphan sweep waits until it can"
            ),
        }
    }
    crate::clock::start(&gw)
        .await
        .map_err(|e| StartError::Clock(e.to_string()))?;
    let clock_keeper = crate::clock::spawn_keeper(gw.clone());
    index_bucket_uploads(&gw)
        .await
        .map_err(|e| StartError::Uploads(e.to_string()))?;
    carry_locks_to_evidence(&gw)
        .await
        .map_err(|e| StartError::Migrate(format!("S3 Object Lock: {e}")))?;
    if let Some(l) = &gw.ledger {
        l.queued();
    }
    let replaced = gw.nodes.probe_all(&gw.store, gw.clock.now_ms()).await;
    crate::repair::spawn_reconcile(gw.clone(), replaced);
    let tls = match &gw.config.api_tls {
        None => None,
        Some(t) => Some(tokio_rustls::TlsAcceptor::from(
            storage_node::tls::https_server_config(&t.cert, &t.key)
                .map_err(|e| StartError::Tls(format!("evidence API: {e}")))?,
        )),
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: listen,
        source,
    })?;
    let prober = {
        let gw = gw.clone();
        tokio::spawn(async move {
            let every = Duration::from_millis(gw.config.node_probe_interval_ms.max(100));
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let replaced = gw.nodes.probe_all(&gw.store, gw.clock.now_ms()).await;
                crate::repair::spawn_reconcile(gw.clone(), replaced);
            }
        })
    };
    let gc = crate::gc::spawn_gc_loop(
        gw.clone(),
        Duration::from_millis(gw.config.gc_interval_ms.max(100)),
    );
    let orphans = crate::gc::spawn_orphan_sweeper(gw.clone());
    let integrator = crate::ledger::spawn_integrator(gw.clone());
    let witnessing = crate::ledger::spawn_witnessing(gw.clone());
    let archive_check = crate::ledger::spawn_archive_check(gw.clone());
    let timestamping = crate::ledger::spawn_timestamping(gw.clone());
    let s3_journal = crate::s3_journal::spawn(gw.clone());
    let lifecycles = crate::lifecycle_archive::spawn(gw.clone());
    let stop = Stopper::new(gw.connections_cut_off.clone());
    let grace = Duration::from_millis(gw.config.shutdown_grace_ms);
    let s3 = match gw.config.s3_listen {
        None => None,
        Some(addr) => Some(
            crate::s3::serve(
                gw.clone(),
                addr,
                gw.config.s3_domain.as_deref(),
                gw.config.s3_tls.as_ref(),
                stop.drain_telling_cut_off("S3", grace),
            )
            .await
            .map_err(|source| StartError::Listen { addr, source })?,
        ),
    };
    let s3_addr = s3.as_ref().map(|(a, _)| *a);
    let metrics = match gw.config.metrics_listen {
        None => None,
        Some(addr) => Some(
            storage_node::metrics::serve_http(addr, registry)
                .await
                .map_err(|source| StartError::Listen { addr, source })?,
        ),
    };
    let metrics_addr = metrics.as_ref().map(|(a, _)| *a);
    let refresher = crate::metrics::spawn_refresher(gw.clone());
    let repair = crate::repair::spawn_repair_loop(
        gw.clone(),
        // Floored as the other loops are: 0 would scan back to back.
        Duration::from_millis(gw.config.repair_interval_ms.max(100)),
    );
    let old_copies = crate::repair::spawn_old_copy_deleter(gw.clone());
    let http = http1(Duration::from_millis(
        gw.config.client_idle_timeout_ms.max(1),
    ));
    // Serving now: the index is this version's to mark (see
    // `schema::mark_format_tx`).
    indexer::run(
        &gw.store,
        |tx| async move { schema::mark_format_tx(&tx).await },
    )
    .await
    .map_err(|e| StartError::Index(format!("marking its format: {e}")))?;
    let app = router(gw);
    let https = tls.is_some();
    let drain = stop.drain_telling_cut_off("evidence API", grace);
    let server = tokio::spawn(serve_api(listener, app, tls, http, drain));
    tracing::info!(%local_addr, https, "evidence API listening");
    Ok(RunningGateway {
        local_addr,
        s3_addr,
        metrics_addr,
        server: Some(server),
        s3: s3.map(|(_, task)| task),
        stop,
        background: [
            ("node prober", prober),
            ("GC", gc),
            ("orphan sweeper", orphans),
            ("ledger integrator", integrator),
            ("metrics refresher", refresher),
            ("repair", repair),
            ("old copy deleter", old_copies),
            ("compliance clock keeper", clock_keeper),
        ]
        .into_iter()
        .chain(witnessing.map(|t| ("witnessing", t)))
        .chain(archive_check.map(|t| ("openings archive check", t)))
        .chain(timestamping.map(|t| ("time-stamping", t)))
        .chain(s3_journal.map(|t| ("S3 journal", t)))
        .chain(lifecycles.map(|t| ("lifecycle archive", t)))
        .chain(metrics.map(|(_, task)| ("metrics listener", task)))
        .collect(),
    })
}

/// Most bytes of a request's head (request line and headers) the evidence
/// API reads; past it hyper answers 431 and closes the connection. The
/// metadata headers are 1 KiB each, tokens well under that.
const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// HTTP/1.1 as both APIs serve it (see [`http1`]).
#[derive(Clone)]
pub(crate) struct Http {
    builder: hyper::server::conn::http1::Builder,
    /// How long a response may make no progress into the connection.
    stall: Duration,
}

/// HTTP/1.1 as both APIs serve it. Request heads are bounded to
/// [`MAX_REQUEST_HEAD`] (hyper's default lets a client hold about 400 KiB
/// per connection in headers) and must arrive whole within `idle`, which
/// is also how long an idle keep-alive connection stays open: hyper
/// applies its head timeout only with a timer, and none is set by default,
/// so a client trickling a head byte by byte held its connection for ever.
/// A response the client takes nothing of for twice `idle` (its socket's
/// buffer full) ends the connection too: whatever the response (a small
/// read's buffered body, a listing, the last slices of a streamed read), a
/// client that stops reading must not hold its memory, task and connection
/// for as long as it keeps the TCP connection open. (Twice: a streamed
/// read gives up after `idle` itself, saying why, and this is the backstop.)
pub(crate) fn http1(idle: Duration) -> Http {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .max_buf_size(MAX_REQUEST_HEAD)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(idle);
    Http {
        builder,
        stall: idle.saturating_mul(2),
    }
}

/// `io` failing its writes once one has made no progress for `idle`.
fn stalls_after<T>(io: T, idle: Duration) -> std::pin::Pin<Box<tokio_io_timeout::TimeoutStream<T>>>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    let mut io = tokio_io_timeout::TimeoutStream::new(io);
    io.set_write_timeout(Some(idle));
    Box::pin(io)
}

/// Serves the evidence API (see [`serve_connections`]).
async fn serve_api(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    http: Http,
    drain: Drain,
) -> std::io::Result<()> {
    let service = hyper_util::service::TowerToHyperService::new(app);
    serve_connections(listener, tls, http, drain, service).await;
    Ok(())
}

/// Serves `service` on `listener` over HTTP/1.1 (over TLS with `tls`), as
/// both APIs do: what `axum::serve` does, with [`http1`]'s limits, until
/// `drain` is told to stop; then the connections drain (see
/// [`RunningGateway::shutdown`]).
pub(crate) async fn serve_connections<Svc, B>(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    http: Http,
    mut drain: Drain,
    service: Svc,
) where
    Svc: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<B>,
        > + Clone
        + Send
        + 'static,
    Svc::Future: Send + 'static,
    Svc::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let api = drain.api;
    // At most this many connections at once: past it, new ones wait in
    // the kernel's backlog until one ends, instead of taking descriptors
    // the gateway needs for its nodes, its index and its files.
    let open = Arc::new(tokio::sync::Semaphore::new(connection_cap()));
    loop {
        let permit = tokio::select! {
            permit = open.clone().acquire_owned() => permit,
            () = drain.stopped() => break,
        };
        let Ok(permit) = permit else { break };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = drain.stopped() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            // A connection reset before it was accepted is nothing to wait for.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                continue
            }
            Err(e) => {
                // Out of file descriptors and the like: wait, as axum does,
                // rather than spin.
                tracing::warn!(error = %e, "accepting an {api} connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Heads and small bodies go out at once, not after the client's
        // delayed ACK.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let (http, tls, service) = (http.clone(), tls.clone(), service.clone());
        drain.spawn(|watcher| async move {
            let _open = permit;
            let ended = match tls {
                None => {
                    let io = hyper_util::rt::TokioIo::new(stalls_after(stream, http.stall));
                    watcher
                        .watch(http.builder.serve_connection(io, service))
                        .await
                }
                Some(acceptor) => match tls_handshake(&acceptor, stream, peer, api).await {
                    Some(tls) => {
                        let io = hyper_util::rt::TokioIo::new(stalls_after(tls, http.stall));
                        watcher
                            .watch(http.builder.serve_connection(io, service))
                            .await
                    }
                    None => return,
                },
            };
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "{api} connection ended");
            }
        });
    }
    drop(listener);
    drain.finish().await;
}

/// How many connections each API (evidence, S3) serves at once: a quarter
/// of the descriptors this process may open (the two APIs, the rest for
/// nodes, the index, ledger files and outgoing calls), from 64 to 8192.
fn connection_cap() -> usize {
    let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    usize::try_from(nofile / 4)
        .unwrap_or(usize::MAX)
        .clamp(64, 8192)
}

/// Longest a client may take over its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS side of an accepted connection of `api` (the evidence API or
/// S3), or `None` (logged) if the handshake failed or took longer than
/// [`TLS_HANDSHAKE_TIMEOUT`]: a client that never finishes its handshake
/// must not hold a task forever.
pub(crate) async fn tls_handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    api: &str,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "{api} TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "{api} TLS handshake timed out");
            None
        }
    }
}

pub fn router<S: Store>(gw: Arc<Gateway<S>>) -> Router {
    Router::new()
        .route("/healthz", get(healthz::<S>))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/evidence", post(file_evidence::<S>))
        .route("/v1/evidence/by-hash/{blake3}", get(by_hash::<S>))
        .route(
            "/v1/evidence/{id}",
            get(read_evidence::<S>).head(head_evidence::<S>),
        )
        .route("/v1/evidence/{id}/manifest", get(manifest::<S>))
        .route("/v1/evidence/{id}/receipt", get(evidence_receipt::<S>))
        .route("/v1/evidence/{id}/custody", get(custody::<S>))
        .route(
            "/v1/evidence/{id}/legal-hold",
            axum::routing::put(legal_hold_on::<S>).delete(legal_hold_off::<S>),
        )
        .route(
            "/v1/evidence/{id}/retention",
            small(
                &gw,
                axum::routing::put(retention::<S>),
                SMALL_BODY,
                Callers::Credentialed,
            ),
        )
        .route(
            "/v1/evidence/{id}/expunge",
            small(&gw, post(expunge::<S>), SMALL_BODY, Callers::Credentialed),
        )
        .route(
            "/v1/notarize",
            small(
                &gw,
                post(notarize::<S>),
                MAX_NOTARIZE_BODY,
                Callers::Credentialed,
            ),
        )
        .route("/v1/ledger/inclusion", get(ledger_inclusion::<S>))
        .route("/v1/ledger/consistency", get(ledger_consistency::<S>))
        .route("/v1/ledger/key", get(ledger_key::<S>))
        .route("/ledger/{*path}", get(ledger_published::<S>))
        .route(
            "/tsa",
            small(&gw, post(dev_tsa::<S>), SMALL_BODY, Callers::Anyone),
        )
        .route("/v1/repair/queue", get(repair_queue::<S>))
        .route("/v1/admin/status", get(status::<S>))
        .route("/v1/admin/repair", post(repair_now::<S>))
        .route("/v1/admin/nodes/{id}", get(node_detail::<S>))
        .route("/v1/admin/nodes/{id}/{action}", post(node_lifecycle::<S>))
        .route(
            "/v1/admin/tokens",
            small(
                &gw,
                post(create_token::<S>),
                SMALL_BODY,
                Callers::Credentialed,
            ),
        )
        .route(
            "/v1/admin/tenants",
            small(
                &gw,
                post(create_tenant::<S>),
                SMALL_BODY,
                Callers::Credentialed,
            ),
        )
        .route(
            "/v1/admin/keys",
            small(
                &gw,
                post(create_key::<S>),
                SMALL_BODY,
                Callers::Credentialed,
            ),
        )
        .route(
            "/v1/admin/keys/revoke",
            small(
                &gw,
                post(revoke_key::<S>),
                SMALL_BODY,
                Callers::Credentialed,
            ),
        )
        // Uploads stream; their size is bounded by storage, not by memory.
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::map_response(json_errors))
        .layer(axum::middleware::from_fn_with_state(
            gw.clone(),
            crate::metrics::track_http::<S>,
        ))
        .with_state(gw)
}

/// A route whose request body is small and read whole by its handler: at
/// most `limit` bytes, with no pause of `client_idle_timeout_ms`, and, on
/// a route that takes credentials, only once they are good (see
/// [`body_deadline`]).
fn small<S: Store>(
    gw: &Arc<Gateway<S>>,
    route: axum::routing::MethodRouter<Arc<Gateway<S>>>,
    limit: usize,
    callers: Callers,
) -> axum::routing::MethodRouter<Arc<Gateway<S>>> {
    route
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            (gw.clone(), callers),
            body_deadline::<S>,
        ))
}

/// Who may call a route with a small body ([`small`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Callers {
    /// Holders of credentials, checked before the body is read.
    Credentialed,
    /// Anyone (the development TSA): the body is read without
    /// credentials, so all of it within one `client_idle_timeout_ms`.
    Anyone,
}

/// Holds a small body to `client_idle_timeout_ms` between its bytes, as an
/// upload is, and to [`SMALL_BODY_PATIENCE`] times that for all of it (one
/// time on a route anyone may call): hyper times out only the request head,
/// so a client that announced a body and sent none (or a byte a minute)
/// would hold its connection and task for ever. Past either the request
/// fails with 408 `body_timeout`. On a route that takes credentials they
/// are checked first (401/403 without reading the body), so a client
/// without any holds a connection no longer than its request head allows:
/// connections are capped, and anonymous trickles must not fill the cap.
async fn body_deadline<S: Store>(
    State((gw, callers)): State<(Arc<Gateway<S>>, Callers)>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let anonymous = callers == Callers::Anyone;
    if !anonymous {
        if let Err(e) = authenticate(&gw, req.headers()).await {
            // Refused unread, but what the client already sent is taken
            // (a little, briefly): closing on unread bytes resets the
            // connection, and the client may lose the 401 with it.
            let drain = axum::body::to_bytes(req.into_body(), REFUSED_BODY_DRAIN);
            let _ = tokio::time::timeout(REFUSED_BODY_PATIENCE, drain).await;
            return e.into_response();
        }
    }
    let patience = Duration::from_millis(gw.config.client_idle_timeout_ms.max(1));
    let all = match anonymous {
        true => patience,
        false => patience * SMALL_BODY_PATIENCE,
    };
    let expired = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let req = req.map(|inner| {
        Body::new(Deadline {
            inner,
            idle: patience,
            sleep: Box::pin(tokio::time::sleep(patience)),
            all: Box::pin(tokio::time::sleep(all)),
            expired: expired.clone(),
        })
    });
    let resp = next.run(req).await;
    match expired.load(std::sync::atomic::Ordering::Relaxed) {
        true => ApiError::BodyIdle(patience).into_response(),
        false => resp,
    }
}

/// What of a body refused for its credentials is read and dropped, at most
/// (so the refusal reaches the client), and for how long.
const REFUSED_BODY_DRAIN: usize = 1 << 20;
const REFUSED_BODY_PATIENCE: Duration = Duration::from_secs(2);

/// How many idle timeouts a small body may take in all (see
/// [`body_deadline`]): 4 MiB of notarization in 10 minutes is 7 KB/s.
const SMALL_BODY_PATIENCE: u32 = 10;

/// A body that fails after a pause of `idle`, or once `all` has passed
/// (see [`body_deadline`]).
struct Deadline {
    inner: Body,
    idle: Duration,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    all: std::pin::Pin<Box<tokio::time::Sleep>>,
    expired: Arc<std::sync::atomic::AtomicBool>,
}

impl http_body::Body for Deadline {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        use std::future::Future as _;
        use std::task::Poll;
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            let next = tokio::time::Instant::now() + self.idle;
            self.sleep.as_mut().reset(next);
            return Poll::Ready(frame);
        }
        if self.sleep.as_mut().poll(cx).is_ready() || self.all.as_mut().poll(cx).is_ready() {
            self.expired
                .store(true, std::sync::atomic::Ordering::Relaxed);
            return Poll::Ready(Some(Err(axum::Error::new(
                "the request body did not arrive in time",
            ))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Gives every error answer the API's JSON body, including those made
/// before a handler runs: axum's rejections of a malformed path or query
/// (plain text) and its bare 404 and 405.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let message = match String::from_utf8_lossy(&text).trim() {
        "" => status.canonical_reason().unwrap_or("error").to_string(),
        m => m.to_string(),
    };
    let body =
        serde_json::to_vec(&json!({ "error": code, "message": message })).unwrap_or_default();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}

/// Who is calling: from the bearer token.
/// The token of an `Authorization: Bearer` header, if well formed.
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme name is case-insensitive (RFC 9110 §11.1).
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|t| !t.is_empty() && t.len() <= 512)
}

/// The caller of the evidence API: what its token stands for, and which
/// token it is ([`crate::credentials::token_id`], never the token).
pub struct Caller {
    pub rec: TokenRecord,
    pub credential: String,
    /// The credential as the index keys it: checked again where a long
    /// operation commits (see [`FilingMeta::credential`]).
    pub live: schema::CredentialRef,
}

impl std::ops::Deref for Caller {
    type Target = TokenRecord;
    fn deref(&self) -> &TokenRecord {
        &self.rec
    }
}

pub async fn authenticate<S: Store>(
    gw: &Gateway<S>,
    headers: &HeaderMap,
) -> Result<Caller, ApiError> {
    let token = bearer_token(headers)
        .ok_or(ApiError::Unauthorized)?
        .to_string();
    let mut rec = indexer::run(&gw.store, |tx| {
        let token = &token;
        async move { schema::get_token_tx(&tx, token).await }
    })
    .await?
    .ok_or(ApiError::Unauthorized)?;
    rec.role = schema::effective_role(&rec.tenant, rec.role);
    Ok(Caller {
        rec,
        credential: crate::credentials::token_id(&token),
        live: schema::CredentialRef::token(&token),
    })
}

fn require(who: &TokenRecord, role: Role, action: &'static str) -> Result<(), ApiError> {
    if who.role.may(role) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(action))
    }
}

/// Liveness: 200 `ok` while the index answers a read, else 503
/// `index_unavailable` (a full or failing index disk: nothing can be filed
/// or read), so a load balancer sends clients elsewhere.
async fn healthz<S: Store>(State(gw): State<Arc<Gateway<S>>>) -> Response {
    use indexer::Transaction as _;
    let index = match gw.store.begin() {
        Ok(tx) => tx.get(b"").await.map(|_| ()),
        Err(e) => Err(e),
    };
    let (status, word) = match &index {
        Ok(()) => (StatusCode::OK, "ok"),
        Err(e) => {
            tracing::warn!(error = %e, "health check: the index does not answer");
            (StatusCode::SERVICE_UNAVAILABLE, "index_unavailable")
        }
    };
    let body = json!({
        "status": word,
        "nodes_total": gw.nodes.len(),
        "nodes_healthy": gw.nodes.healthy_count(),
    });
    (status, Json(body)).into_response()
}

/// This API's OpenAPI description.
pub const OPENAPI: &str = include_str!("../openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

fn meta_header(headers: &HeaderMap, name: &str) -> Result<Option<String>, ApiError> {
    let mut all = headers.get_all(name).iter();
    let Some(v) = all.next() else {
        return Ok(None);
    };
    // Two would leave which one was meant to chance (a proxy's order).
    if all.next().is_some() {
        return Err(ApiError::BadRequest(format!("header {name} is sent twice")));
    }
    if v.len() > MAX_META_LEN {
        return Err(ApiError::BadRequest(format!(
            "header {name} is longer than {MAX_META_LEN} bytes"
        )));
    }
    // `to_str` lets a TAB through; percent-encoded, it is refused below.
    let s = v
        .to_str()
        .ok()
        .filter(|s| !s.contains('\t'))
        .ok_or_else(|| ApiError::BadRequest(format!("header {name} is not visible ASCII")))?;
    Ok(Some(s.to_string()))
}

/// Characters that change how the text around them shows, or hide in it,
/// without showing themselves: every invisible format character (Unicode's
/// General_Category Cf: bidirectional embeddings, overrides and isolates,
/// so U+202E shows `invoice\u{202E}gpj.exe` as `invoiceexe.jpg`; zero-width
/// spaces; tag characters, which make `C-17` and `C-17` plus a tag two
/// cases that print alike), line and paragraph separators, and the Hangul
/// fillers, which show as blanks. The joiners and direction marks that
/// Persian, Arabic, Indic and Mongolian names need stay allowed, and so do
/// the Arabic and Syriac signs that show as marks.
pub fn is_deceptive(c: char) -> bool {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory as _};
    let shown_or_needed = matches!(
        c,
        '\u{200C}'..='\u{200F}'
            | '\u{180E}'
            | '\u{061C}'
            | '\u{0600}'..='\u{0605}'
            | '\u{06DD}'
            | '\u{070F}'
            | '\u{0890}'..='\u{0891}'
            | '\u{08E2}'
            | '\u{110BD}'
            | '\u{110CD}'
    );
    (c.general_category() == GeneralCategory::Format && !shown_or_needed)
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{115F}' | '\u{1160}' | '\u{3164}' | '\u{FFA0}'
        )
}

/// A text field of a filing: visible ASCII as sent, or UTF-8 in RFC 8187's
/// ext-value form, `UTF-8''` then percent-encoded bytes (as
/// Content-Disposition's `filename*` carries a name), for what no ASCII
/// header can hold: `UTF-8''Beweis_M%C3%BCller.mp4`.
fn meta_text(headers: &HeaderMap, name: &str) -> Result<Option<String>, ApiError> {
    let Some(raw) = meta_header(headers, name)? else {
        return Ok(None);
    };
    let Some(encoded) = raw
        .get(..7)
        .filter(|p| p.eq_ignore_ascii_case("utf-8''"))
        .map(|_| &raw[7..])
    else {
        return Ok(Some(raw));
    };
    let text = percent_encoding::percent_decode_str(encoded)
        .decode_utf8()
        .map_err(|_| {
            ApiError::BadRequest(format!(
                "header {name}: after UTF-8'' must come percent-encoded UTF-8"
            ))
        })?;
    if text.chars().any(|c| c.is_control() || is_deceptive(c)) {
        return Err(ApiError::BadRequest(format!(
            "header {name} holds control or invisible formatting characters (text that would not print as it is)"
        )));
    }
    Ok(Some(text.into_owned()))
}

fn hash_header<H: std::str::FromStr>(
    headers: &HeaderMap,
    name: &str,
) -> Result<Option<H>, ApiError> {
    meta_header(headers, name)?
        .map(|s| {
            s.parse()
                .map_err(|_| ApiError::BadRequest(format!("header {name} must be 64 hex digits")))
        })
        .transpose()
}

/// Evidence JSON as the API returns it.
pub fn evidence_json(h: &ManifestHeader) -> serde_json::Value {
    json!({
        "id": h.evidence.to_string(),
        "blake3": h.blake3.to_hex(),
        "sha256": h.sha256.to_hex(),
        "size": h.size,
        "stripes": h.stripes,
        "code": { "k": h.code.k, "m": h.code.m, "shard_size": h.code.shard_size },
        "tenant": h.tenant,
        "case": h.case,
        "file_name": h.file_name,
        "media_type": h.media_type,
        "submitter": h.submitter,
        "filed_at_ms": h.filed_at_ms,
        "legal_hold": h.legal_hold,
        "retain_until_ms": h.retain_until_ms,
    })
}

async fn file_evidence<S: Store>(
    State(gw): State<Arc<Gateway<S>>>,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    // Unauthenticated callers get their 401 at once (nothing of theirs is
    // read); a known caller's refusal is answered after its body, if small.
    let who = authenticate(&gw, &parts.headers).await?;
    let meta = match require(&who, Role::Clerk, "file evidence")
        .and_then(|()| with_query_metadata(&parts.headers, parts.uri.query()))
        .and_then(|headers| filing_meta(&gw, &who, &headers))
    {
        Ok(meta) => meta,
        Err(e) => {
            let idle = Duration::from_millis(gw.config.client_idle_timeout_ms.max(1));
            let waiting = expects_continue(&parts.headers);
            ingest::drain_unless_waiting(body.into_data_stream(), idle, waiting).await;
            return Err(e);
        }
    };
    file_evidence_rest(gw, meta, body).await
}

/// Whether the client waits for `100 Continue` before sending its body
/// (curl does for large uploads): a refusal is then answered without
/// reading it, which would be the go-ahead.
fn expects_continue(h: &HeaderMap) -> bool {
    h.get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// The `X-Custodia-*` headers a filing reads.
const FILING_HEADERS: [&str; 10] = [
    "x-custodia-case",
    "x-custodia-file-name",
    "x-custodia-submitter",
    "x-custodia-blake3",
    "x-custodia-sha256",
    "x-custodia-source-device",
    "x-custodia-capture-time",
    "x-custodia-capture-method",
    "x-custodia-prior-custody",
    "x-custodia-retain-until-ms",
];

/// Digests of the body in other conventions than this API's, which it
/// does not check.
const UNCHECKED_DIGESTS: [&str; 5] = [
    "content-md5",
    "digest",
    "content-digest",
    "repr-digest",
    "x-amz-content-sha256",
];

/// Refuses a filing that sends a header it would not read but its filer
/// may count on: an `X-Custodia-*` header it does not know (a misspelt
/// `X-Custodia-SHA-256` would leave the acquisition hash unchecked, and
/// the filing answered 201 all the same), or a digest of the body in
/// another convention.
fn refuse_unread_headers(h: &http::HeaderMap) -> Result<(), ApiError> {
    for name in h.keys().map(http::HeaderName::as_str) {
        if name.starts_with("x-custodia-") && !FILING_HEADERS.contains(&name) {
            return Err(ApiError::BadRequest(format!(
                "{name} is not a filing header (they are {}); nothing was filed",
                FILING_HEADERS.join(", ")
            )));
        }
        if name == "content-encoding"
            && h.get_all(name)
                .iter()
                .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
        {
            return Err(ApiError::UnsupportedMediaType(
                "Content-Encoding: the body is filed byte for byte as it arrives, so a \
                 compressed one would be the evidence, compressed; send the file itself; \
                 nothing was filed"
                    .into(),
            ));
        }
        // HTTP/1.1 servers decode only `chunked` and pass any other coding
        // (`gzip, chunked`) through as the body's bytes.
        if name == "transfer-encoding"
            && h.get_all(name).iter().any(|v| {
                v.to_str().map_or(true, |v| {
                    v.split(',')
                        .any(|coding| !coding.trim().eq_ignore_ascii_case("chunked"))
                })
            })
        {
            return Err(ApiError::UnsupportedMediaType(
                "Transfer-Encoding: only chunked is decoded, so a body in another transfer \
                 coding would be the evidence, coded; send the file itself; nothing was filed"
                    .into(),
            ));
        }
        // Whether a Content-Type names a media type beginning so.
        let typed = |prefix: &str| {
            name == "content-type"
                && h.get_all(name).iter().any(|v| {
                    v.to_str()
                        .is_ok_and(|t| t.trim_start().to_ascii_lowercase().starts_with(prefix))
                })
        };
        if typed("multipart/form-data") {
            return Err(ApiError::UnsupportedMediaType(
                "a form upload (curl -F) would file the form's envelope around the file as \
                 the evidence; send the file itself as the body (curl --data-binary @FILE \
                 -H 'Content-Type: its media type'); nothing was filed"
                    .into(),
            ));
        }
        // What curl --data-binary sends unless told otherwise: notarized
        // as the evidence's media type, and served with every read, it
        // would call a video a web form for good.
        if typed("application/x-www-form-urlencoded") {
            return Err(ApiError::UnsupportedMediaType(
                "Content-Type application/x-www-form-urlencoded is what curl --data-binary \
                 sends unless told the file's type, and would be notarized as this \
                 evidence's media type; say it (-H 'Content-Type: video/mp4', or \
                 application/octet-stream when unknown); nothing was filed"
                    .into(),
            ));
        }
        if UNCHECKED_DIGESTS.contains(&name) || name.starts_with("x-amz-checksum-") {
            return Err(ApiError::BadRequest(format!(
                "{name} is not checked here: send the acquisition hashes as \
                 X-Custodia-Sha256 and X-Custodia-Blake3 (hex); nothing was filed"
            )));
        }
    }
    Ok(())
}

/// The filing's headers with the metadata its query string carries added
/// as the headers of the same names would be (`?case=C-17&sha256=...` for
/// `X-Custodia-Case` and `X-Custodia-Sha256`), so both follow one set of
/// rules. A name that is not filing metadata, or one given twice (twice in
/// the query, or in the query and as a header), is refused: ignored, a
/// misspelt `sha256` would leave the acquisition hash unchecked and the
/// filing answered 201 all the same. Text that is not plain ASCII travels
/// on as a header's `UTF-8''` percent-encoding does.
fn with_query_metadata<'a>(
    headers: &'a http::HeaderMap,
    query: Option<&str>,
) -> Result<std::borrow::Cow<'a, http::HeaderMap>, ApiError> {
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return Ok(std::borrow::Cow::Borrowed(headers));
    };
    // A `+` is a space in HTML forms and itself in URIs: which one a
    // client meant cannot be told (a capture time's `+02:00`), so it is
    // refused rather than guessed.
    if query.contains('+') {
        return Err(ApiError::BadRequest(
            "a '+' in the query is ambiguous (a space in forms, a plus in URIs): write %20 \
             for a space and %2B for a plus; nothing was filed"
                .into(),
        ));
    }
    let decode = |part: &str| {
        percent_encoding::percent_decode_str(part)
            .decode_utf8()
            .map(std::borrow::Cow::into_owned)
            .map_err(|_| {
                ApiError::BadRequest(format!(
                    "query part {part:?} is not percent-encoded UTF-8; nothing was filed"
                ))
            })
    };
    let mut out = headers.clone();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode(name)?.to_ascii_lowercase();
        let value = decode(value)?;
        let header = format!("x-custodia-{name}");
        let Some(&header) = FILING_HEADERS.iter().find(|h| **h == header) else {
            return Err(ApiError::BadRequest(format!(
                "query parameter {name:?} is not filing metadata (it is {}); nothing was filed",
                FILING_HEADERS
                    .iter()
                    .map(|h| h.trim_start_matches("x-custodia-"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        if out.contains_key(header) {
            return Err(ApiError::BadRequest(format!(
                "{name} is given twice (in the query, or in the query and as {header}); nothing was filed"
            )));
        }
        let plain = value.bytes().all(|b| (0x20..0x7f).contains(&b));
        // Only what a header could not carry is encoded (controls, which
        // are then refused, non-ASCII, and `%` itself): the value stays as
        // long as the header a client would send.
        const ENCODED: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');
        let value = match plain {
            true => value,
            false => format!(
                "UTF-8''{}",
                percent_encoding::utf8_percent_encode(&value, ENCODED)
            ),
        };
        let value = http::HeaderValue::from_str(&value)
            .map_err(|_| ApiError::BadRequest(format!("query parameter {name}: bad value")))?;
        out.insert(header, value);
    }
    Ok(std::borrow::Cow::Owned(out))
}

/// A filing's metadata, from its request's headers.
fn filing_meta<S: Store>(
    gw: &Gateway<S>,
    who: &Caller,
    h: &http::HeaderMap,
) -> Result<FilingMeta, ApiError> {
    refuse_unread_headers(h)?;
    Ok(FilingMeta {
        tenant: who.tenant.clone(),
        actor: Some(actor(who)),
        credential: Some(who.live.clone()),
        expects_continue: expects_continue(h),
        case: meta_text(h, "x-custodia-case")?,
        file_name: meta_text(h, "x-custodia-file-name")?,
        media_type: meta_header(h, "content-type")?,
        submitter: meta_text(h, "x-custodia-submitter")?,
        expect_blake3: hash_header::<Blake3Hash>(h, "x-custodia-blake3")?,
        expect_sha256: hash_header::<Sha256Hash>(h, "x-custodia-sha256")?,
        idempotency_key: meta_header(h, "idempotency-key")?
            .map(|k| match k.is_empty() {
                // An empty key would make every later filing that sends
                // one a "retry" of the first.
                true => Err(ApiError::BadRequest("Idempotency-Key is empty".into())),
                false => Ok(k),
            })
            .transpose()?,
        provenance: protocol::ledger::Provenance {
            source_device: meta_text(h, "x-custodia-source-device")?,
            capture_time: meta_text(h, "x-custodia-capture-time")?,
            capture_method: meta_text(h, "x-custodia-capture-method")?,
            prior_custody: meta_text(h, "x-custodia-prior-custody")?,
        },
        retain_until_ms: meta_header(h, "x-custodia-retain-until-ms")?
            .map(|v| {
                let until = v.parse::<u64>().map_err(|_| {
                    ApiError::BadRequest(
                        "X-Custodia-Retain-Until-Ms must be milliseconds since the epoch".into(),
                    )
                })?;
                in_the_future(gw, until)
            })
            .transpose()?,
        ..Default::default()
    })
}

async fn file_evidence_rest<S: Store>(
    gw: Arc<Gateway<S>>,
    meta: FilingMeta,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    // As its framing says (a Content-Length): the body cannot run past it,
    // nor end short of it (a connection aborted at shutdown ends its body
    // as if complete).
    let mut meta = meta;
    let framing = axum::body::HttpBody::size_hint(&body);
    meta.body_len_at_most = framing.upper();
    meta.body_len_exact = framing.exact().is_some();
    // Run the upload in its own task: if the client disconnects, the body
    // stream fails and the upload cleans up after itself instead of being
    // dropped half-way.
    let stream = body.into_data_stream();
    let filing = tokio::spawn(ingest::file_evidence(gw.clone(), meta, stream))
        .await
        .map_err(|_| ApiError::Internal)??;
    let (header, replayed, (degraded, capped)) = match filing {
        Filing::New {
            header,
            degraded_stripes,
            ..
        } => (header, false, (degraded_stripes, false)),
        // A replay's: those still short of shards now (the first
        // attempt's answer, lost, may have said more; repair may have
        // mended some since), not a claim of full durability.
        // Looked for among a few thousand queued stripes at most: each is
        // a read of its own, and one transaction (on FoundationDB, 5 s of
        // round trips) cannot look at a 1 TiB filing's every stripe.
        Filing::Replayed(header) => {
            let evidence = header.evidence;
            let degraded = indexer::run(&gw.store, |tx| async move {
                schema::short_stripes_of_tx(&tx, evidence, REPLAY_DEGRADED_LIMIT).await
            })
            .await?;
            (header, true, degraded)
        }
        Filing::Part { .. } => return Err(ApiError::Internal),
    };
    let mut body = evidence_json(&header);
    body["degraded_stripes"] = json!(degraded);
    if replayed {
        // Perhaps more than it says: see above.
        body["degraded_count_capped"] = json!(capped);
    }
    // The receipt as soon as a signed checkpoint covers the statement; a
    // stalled or failing ledger never fails a durable filing: the evidence
    // is committed, and an error here would have the client file it again.
    // The receipt is then fetched later from its URL.
    let receipt = crate::ledger::wait_for_receipt(&gw, header.evidence, &[Kind::Filed])
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(evidence = %header.evidence, error = %e, "filed; its receipt could not be built yet");
            None
        });
    body["receipt_url"] = json!(format!("/v1/evidence/{}/receipt", header.evidence));
    body["receipt"] = receipt
        .and_then(|r| serde_json::to_value(r).ok())
        .unwrap_or(serde_json::Value::Null);
    let mut resp = (StatusCode::CREATED, Json(body)).into_response();
    if replayed {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/evidence/{}", header.evidence)) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// Loads evidence visible to the caller.
/// `until` (ms), if it is still ahead: a retention that would end before
/// it began is a mistake (a date in seconds, say), refused as S3 does.
fn in_the_future<S: Store>(gw: &Gateway<S>, until: u64) -> Result<u64, ApiError> {
    let now = gw.clock.now_ms();
    if until <= now {
        return Err(ApiError::BadRequest(format!(
            "a retention must end in the future: {} is before now ({})",
            schema::utc_ms(until),
            schema::utc_ms(now)
        )));
    }
    if until > now.saturating_add(MAX_RETENTION_AHEAD_MS) {
        return Err(ApiError::BadRequest(format!(
            "a retention may end at most 100 years from now, not {} (milliseconds since the \
             epoch are expected; for evidence kept indefinitely, use a legal hold)",
            schema::utc_ms(until)
        )));
    }
    Ok(until)
}

/// The furthest ahead a retention may end: 100 years, S3's bound for a
/// bucket's default. A COMPLIANCE date can never be brought forward, so a
/// date given in microseconds (year 57,900) would keep evidence from any
/// court-ordered expunge for ever; indefinite keeping is a legal hold's,
/// which can be lifted.
pub(crate) const MAX_RETENTION_AHEAD_MS: u64 = 36_525 * 86_400_000;

async fn load_visible<S: Store>(
    gw: &Gateway<S>,
    who: &TokenRecord,
    id: &str,
) -> Result<ManifestHeader, ApiError> {
    let id: EvidenceId = id
        .parse()
        .map_err(|_| ApiError::BadRequest("evidence id must be a UUID".into()))?;
    let (header, expunged) = indexer::run(&gw.store, |tx| async move {
        Ok::<_, schema::SchemaError>((
            schema::get_manifest_tx(&tx, id).await?,
            schema::get_expunged_tx(&tx, id).await?,
        ))
    })
    .await?;
    let mine = |h: &ManifestHeader| h.tenant == who.tenant || who.role == Role::Admin;
    match (header, expunged) {
        (Some(h), _) if mine(&h) => Ok(h),
        (None, Some(x)) if mine(&x) => Err(ApiError::Gone),
        _ => Err(ApiError::NotFound),
    }
}

/// Parses a single `bytes=` range (RFC 9110 §14.1.2). `Ok(None)` means serve the
/// whole content: no header, a range unit other than bytes (which a server
/// must ignore; unit names are case-insensitive), several ranges (which a
/// server may ignore), or a suffix range of zero-length content (the only
/// satisfiable form there, selecting all of nothing). Positions past
/// `u64::MAX` are valid and mean "past the end".
pub fn parse_range(value: Option<&HeaderValue>, size: u64) -> Result<Option<Range<u64>>, ApiError> {
    let Some(value) = value else { return Ok(None) };
    let malformed = || ApiError::BadRequest("malformed Range".into());
    let s = value.to_str().map_err(|_| malformed())?.trim();
    let Some((unit, spec)) = s.split_once('=') else {
        return Err(malformed());
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return Ok(None);
    }
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or_else(malformed)?;
    let num = |x: &str| {
        let x = x.trim();
        if x.is_empty() || !x.bytes().all(|c| c.is_ascii_digit()) {
            return Err(malformed());
        }
        // Only overflow can fail now: a position past any content.
        Ok(x.parse::<u64>().unwrap_or(u64::MAX))
    };
    let range = match (a.trim().is_empty(), b.trim().is_empty()) {
        (true, true) => return Err(malformed()),
        (true, false) => {
            let n = num(b)?;
            if n == 0 {
                return Err(ApiError::RangeNotSatisfiable { size });
            }
            if size == 0 {
                return Ok(None);
            }
            size.saturating_sub(n)..size
        }
        (false, true) => num(a)?..size,
        (false, false) => {
            let (first, last) = (num(a)?, num(b)?);
            if last < first {
                return Err(malformed());
            }
            first..last.saturating_add(1).min(size)
        }
    };
    if range.start >= size {
        return Err(ApiError::RangeNotSatisfiable { size });
    }
    Ok(Some(range))
}

/// Evidence's entity tag (RFC 9110 8.8.3): its content never changes under
/// its id, so its BLAKE3 content root is a strong validator.
fn etag_of(h: &ManifestHeader) -> String {
    format!("\"{}\"", h.blake3.to_hex())
}

use crate::s3::http_date;

/// Seconds since the epoch of a header's HTTP date; `None` where it is
/// absent or not a date (which RFC 9110 13.1.3 says to ignore).
fn header_date(headers: &HeaderMap, name: header::HeaderName) -> Option<u64> {
    let v = headers.get(name)?.to_str().ok()?;
    let at = httpdate::parse_http_date(v.trim()).ok()?;
    Some(at.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs())
}

/// What a request's conditions make of a read.
#[derive(Debug, PartialEq, Eq)]
enum Precondition {
    Proceed,
    /// 304: the client's copy is current.
    NotModified,
    /// 412.
    Failed,
}

/// The conditions of a GET or HEAD in RFC 9110 13.2.2's order: If-Match
/// (strong comparison) or else If-Unmodified-Since, then If-None-Match
/// (weak comparison) or else If-Modified-Since. Evidence is last modified
/// when filed; dates compare to the second.
fn precondition(headers: &HeaderMap, h: &ManifestHeader, etag: &str) -> Precondition {
    let etag = etag.trim_matches('"');
    let filed_s = h.filed_at_ms / 1000;
    let tags = |name: header::HeaderName| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let names = |t: &str, weak_allowed: bool| {
        if t == "*" {
            return true;
        }
        let (weak, tag) = match t.strip_prefix("W/") {
            Some(tag) => (true, tag),
            None => (false, t),
        };
        (weak_allowed || !weak)
            && tag.strip_prefix('"').and_then(|t| t.strip_suffix('"')) == Some(etag)
    };
    let if_match = tags(header::IF_MATCH);
    if !if_match.is_empty() {
        if !if_match.iter().any(|t| names(t, false)) {
            return Precondition::Failed;
        }
    } else if header_date(headers, header::IF_UNMODIFIED_SINCE).is_some_and(|at| filed_s > at) {
        return Precondition::Failed;
    }
    let if_none_match = tags(header::IF_NONE_MATCH);
    if !if_none_match.is_empty() {
        if if_none_match.iter().any(|t| names(t, true)) {
            return Precondition::NotModified;
        }
    } else if header_date(headers, header::IF_MODIFIED_SINCE).is_some_and(|at| filed_s <= at) {
        return Precondition::NotModified;
    }
    Precondition::Proceed
}

/// Whether a Range applies under `If-Range` (RFC 9110 13.1.5): with none,
/// yes; otherwise only if it names the evidence (its strong ETag, or its
/// filing time to the second). Evidence never changes under its id, so this
/// only matters to a client that asks it of the wrong id.
fn if_range_holds(headers: &HeaderMap, h: &ManifestHeader, etag: &str) -> bool {
    let Some(value) = headers.get(header::IF_RANGE) else {
        return true;
    };
    match value.to_str().map(str::trim) {
        Ok(v) if v.starts_with('"') || v.starts_with("W/") => v == etag,
        Ok(_) => header_date(headers, header::IF_RANGE) == Some(h.filed_at_ms / 1000),
        Err(_) => false,
    }
}

async fn read_evidence<S: Store>(
    State(gw): State<Arc<Gateway<S>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    evidence_response(gw, id, headers, true).await
}

/// `HEAD /v1/evidence/{id}`: the GET's headers from the manifest alone. No
/// byte is read, so no access is recorded: the custody record would
/// otherwise say the caller read evidence it never received.
async fn head_evidence<S: Store>(
    State(gw): State<Arc<Gateway<S>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    evidence_response(gw, id, headers, false).await
}

async fn evidence_response<S: Store>(
    gw: Arc<Gateway<S>>,
    id: String,
    headers: HeaderMap,
    with_body: bool,
) -> Result<Response, ApiError> {
    let who = authenticate(&gw, &headers).await?;
    require(&who, Role::Reader, "read evidence")?;
    let header = load_visible(&gw, &who, &id).await?;
    // Evaluated before anything is read: a 304 or 412 reads nothing, so
    // no access is recorded.
    let (etag, last_modified) = (etag_of(&header), http_date(header.filed_at_ms));
    match precondition(&headers, &header, &etag) {
        Precondition::Proceed => {}
        Precondition::Failed => return Err(ApiError::PreconditionFailed),
        Precondition::NotModified => {
            return Response::builder()
                .status(StatusCode::NOT_MODIFIED)
                .header(header::ETAG, &etag)
                .header(header::LAST_MODIFIED, &last_modified)
                .body(Body::empty())
                .map_err(|_| ApiError::Internal)
        }
    }
    let size = header.size;
    let partial = match if_range_holds(&headers, &header, &etag) {
        true => parse_range(headers.get(header::RANGE), size)?,
        false => None,
    };
    let range = partial.clone().unwrap_or(0..size);
    let media_type = header.media_type.clone();
    let (blake3, sha256) = (header.blake3, header.sha256);
    let body = if !with_body {
        Body::empty()
    } else {
        match recorded_read(&gw, header, actor(&who), range.clone()).await? {
            ReadBody::Verified(bytes) => Body::from(bytes),
            ReadBody::Streamed(stream) => Body::from_stream(stream),
        }
    };
    let len = range.end - range.start;
    let mut resp = Response::builder()
        .header(header::CONTENT_LENGTH, len)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(
            header::CONTENT_TYPE,
            // One no header can carry (filed before such were refused)
            // must not make the evidence unreadable.
            media_type
                .as_deref()
                .filter(|t| http::HeaderValue::from_str(t).is_ok())
                .unwrap_or("application/octet-stream"),
        )
        .header("x-custodia-blake3", blake3.to_hex())
        .header("x-custodia-sha256", sha256.to_hex())
        .header(header::ETAG, etag)
        .header(header::LAST_MODIFIED, last_modified);
    if let Some(r) = &partial {
        resp = resp.status(StatusCode::PARTIAL_CONTENT).header(
            header::CONTENT_RANGE,
            format!("bytes {}-{}/{}", r.start, r.end - 1, size),
        );
    }
    resp.body(body).map_err(|_| ApiError::Internal)
}

/// How long past its commit a small read's access record may wait for other
/// records to share its fsync. With 16 concurrent 4 KiB S3 GETs it halved
/// the index fsyncs per GET (BENCHMARKS.md). The record now follows the
/// read (a read that fails leaves none), so each small read waits this
/// much longer; concurrent readers share the wait.
const SMALL_READ_RECORD_SLACK: Duration = Duration::from_millis(2);

/// The body of a read, its access already recorded.
pub(crate) enum ReadBody<St> {
    /// Small evidence, fetched whole and checked against its content root.
    Verified(bytes::Bytes),
    /// Larger evidence, verified as it streams.
    Streamed(St),
}

/// Records the access to `range` (durable before any byte is answered) and
/// reads it, for every API. Evidence up to [`crate::read::SMALL_READ_BYTES`]
/// is fetched and verified whole, then the access recorded; larger evidence
/// streams once the access is recorded, its first piece (a checked 1 MiB
/// group) fetched first, and recorded only if that came. Either way a read
/// that fails before it could send a byte is an error status (503 with too
/// few nodes, 410 expunged), not a success cut short, and no access on the
/// record: the custody log names only reads that were answered.
pub(crate) async fn recorded_read<S: Store>(
    gw: &Arc<Gateway<S>>,
    header: ManifestHeader,
    actor: String,
    range: Range<u64>,
) -> Result<ReadBody<impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>>>, ApiError> {
    if header.size <= crate::read::SMALL_READ_BYTES {
        // The bytes first: a read that fails (too few nodes, content that
        // does not match its root) leaves no record of an access nobody
        // got. The record may then wait a little for other records to share
        // its fsync.
        let read = crate::read::read_small(gw, &header, range.clone()).await?;
        record_access(gw, &header, actor, &range, SMALL_READ_RECORD_SLACK).await?;
        // Counted once the access is on record and the bytes are in hand.
        gw.metrics.read_bytes.inc_by(read.len() as u64);
        return Ok(ReadBody::Verified(read));
    }
    // The first piece is fetched and checked before the access is
    // recorded, and held until it is: a read that fails before it could
    // send a byte (too few nodes) is no access on the record.
    let mut stream = Box::pin(crate::read::stream_range(
        gw.clone(),
        header.clone(),
        range.clone(),
        Some(Duration::from_millis(
            gw.config.client_idle_timeout_ms.max(1),
        )),
    ));
    let first = futures::StreamExt::next(&mut stream).await;
    if !matches!(first, Some(Err(_))) {
        record_access(gw, &header, actor, &range, Duration::ZERO).await?;
    }
    let first = match first {
        Some(Err(e)) => {
            return Err(match e.downcast::<crate::read::ReadError>() {
                Ok(read) => read.into(),
                Err(e) => {
                    tracing::error!(error = %e, "read failed");
                    ApiError::Internal
                }
            })
        }
        first => first,
    };
    Ok(ReadBody::Streamed(futures::StreamExt::chain(
        futures::stream::iter(first),
        stream,
    )))
}

/// Puts a read of `range` of the evidence on the ledger, durable in the
/// index: called before the first byte is sent, by every API (reads
/// answered to a client go through [`recorded_read`]).
pub(crate) async fn record_access<S: Store>(
    gw: &Gateway<S>,
    header: &ManifestHeader,
    actor: String,
    range: &Range<u64>,
    slack: Duration,
) -> Result<(), ApiError> {
    let accessed = statement_about(gw, header, Kind::Accessed, actor, &read_detail(range));
    crate::ledger::record(gw, header.evidence, &accessed, slack).await
}

/// The `accessed` statement of a read of `range` of the evidence by
/// `actor`, ready to be queued in another transaction (a copy's, which
/// commits it with the copy); `None` where no ledger is kept.
pub(crate) fn access_statement<S: Store>(
    gw: &Gateway<S>,
    header: &ManifestHeader,
    actor: String,
    range: &Range<u64>,
) -> Result<Option<indexer::ledger::PendingRecord>, ApiError> {
    event_statement(gw, header, Kind::Accessed, actor, &read_detail(range))
}

/// What an `accessed` statement's `metadata_sha256` is the hash of.
fn read_detail(range: &Range<u64>) -> serde_json::Value {
    json!({ "range": [range.start, range.end] })
}

async fn manifest<S: Store>(
    State(gw): State<Arc<Gateway<S>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let who = authenticate(&gw, &headers).await?;
    require(&who, Role::Reader, "read evidence")?;
    Ok(Json(evidence_json(&load_visible(&gw, &who, &id).await?)))
}

/// Filings per by-hash page, by default and at most: each is a manifest
/// read in one transaction, which must stay short.
const BY_HASH_PAGE: usize = 1000;

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ByHashQuery {
    /// The filings after this evidence (the previous page's `next_after`).
    after: Option<String>,
    limit: Option<usize>,
}

async fn by_hash<S: Store>(
    State(gw): State<Arc<Gateway<S>>>,
    Path(root): Path<String>,
    Query(q): Query<ByHashQuery>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let who = authenticate(&gw, &headers).await?;
    require(&who, Role::Reader, "look up evidence")?;
    let root: Blake3Hash = root
        .parse()
        .map_err(|_| ApiError::BadRequest("content root must be 64 hex digits".into()))?;
    let limit = q.limit.unwrap_or(BY_HASH_PAGE);
    if !(1..=BY_HASH_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be 1 to {BY_HASH_PAGE}"
        )));
    }
    let after = q
        .after
        .map(|a| {
            a.parse::<EvidenceId>().map_err(|_| {
                ApiError::BadRequest("after must be an evidence id (a page's next_after)".into())
            })
        })
        .transpose()?;
    let tenant = who.tenant.clone();
    let (found, next_after) = indexer::run(&gw.store, |tx| {
        let tenant = &tenant;
        async move { schema::lookup_by_hash_page_tx(&tx, tenant, &root, after, limit).await }
    })
    .await?;
    // Paged: one piece of content may be filed in many cases; a page that
    // stops short must not read as "filed only these times".
    Ok(Json(json!({
        "blake3": root.to_hex(),
        "filings": found.iter().map(evidence_json).collect::<Vec<_>>(),
        "next_after": next_after.map(|e| e.to_string()),
    })))
}

async fn repair_queue<S: Store>(
    State(gw): State<Arc<Gateway<S>>>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let who = authenticate(&gw, &headers).await?;
    require(&who, Role::Admin, "see the repair queue")?;
    let queued = indexer::run(&gw.store, |tx| async move {
        schema::degraded_stripes_tx(&tx, 10_000).await
    })
    .await?;
    let items: Vec<_> = queued
        .iter()
        .map(|(e, s)| json!({ "evidence": e.to_string(), "stripe": s }))
        .collect();
    Ok(Json(json!({ "stripes": items })))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RepairQuery {
    /// `all`: queue every stripe, so each one's k+m shards are read and
    /// checked (what a scrub finds, from the gateway).
    verify: Option<String>,
}

/// Wakes the repair worker now (`custodia repair`); answers with the
/// backlog, which `GET /v1/admin/status` then follows.
async fn repair_now<S: Store>(
    State(gw): State<Arc<Gateway<S>>>,
    Query(q): Query<RepairQuery>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let who = authenticate(&gw, &headers).await?;
    require(&who, Role::Admin, "start a repair pass")?;
    // Records the walk of every stripe could not read: what a pass that
    // verifies every stripe cannot vouch for.
    let mut unreadable = None;
    match q.verify.as_deref() {
        // Stripes on gone, draining and removed nodes, found now rather
        // than at the worker's next scan.
        None => {
            crate::repair::scan_all(&gw).await?;
            // A node that came back with another disk: its stripes are
            // queued by a walk in the background; walk them here too, so the
            // backlog answered (and then followed) already holds them.
            let reconciling = gw.nodes.reconciling();
            if !reconciling.is_empty() {
                crate::repair::queue_all(&gw, Some(&reconciling)).await;
            }
        }
        // Walks every stripe record before answering, so the backlog this
        // answers with includes them all.
        Some("all") => {
            unreadable = Some(crate::repair::queue_all(&gw, None).await.unreadable);
        }
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "verify={other:?}: the only value is \"all\""
            )))
        }
    }
    gw.repair_wake.notify_one();
    let queued = indexer::run(&gw.store, |tx| async move {
        schema::degraded_stripes_tx(&tx, STATUS_DEGRADED_LIMIT).await
    })
    .await?;
    Ok(Json(json!({
        "started": true,
        "degraded_stripes": queued.len(),
        "degraded_count_capped": queued.len() >= STATUS_DEGRADED_LIMIT,
        "repair_settled_stripes": gw.repair_settled.load(std::sync::atomic::Ordering::Relaxed),
        "stripe_records_unreadable": unreadable,
    })))
}

/// What a walk of every stripe record (in small transactions) finds about
/// one node: what a drain waits for.
#[derive(Debug, Default, Clone, Copy)]
struct NodeStripes {
    /// Stripes whose record places a shard on the node.
    placed: u64,
    /// Of those, stripes that are neither visible evidence's nor a part's
    /// of an S3 multipart upload in progress, which repair does not move:
    /// uploads under way (they become one or the other), parts of ended
    /// uploads awaiting deletion, and parts stored by a build before
    /// parts could be found by id (they move once their upload completes,
    /// and go once it is aborted or expires).
    of_pending: u64,
    /// Stripes with a shard no node is recorded for while copies
    /// `recover-index` could not place (their nodes did not answer) await
    /// an orphan sweep that lists every node to adopt them: the node may
    /// hold some, and once removed it is never listed again.
    awaiting_adoption: u64,
    /// Stripe records that do not decode: whether they place a shard on
    /// the node is unknown.
    unreadable: u64,
}

async fn stripes_on_node<S: Store>(gw: &Gateway<S>, node: NodeId) -> Result<NodeStripes, ApiError> {
    const BATCH: usize = 4096;
    let mut after = None;
    let mut count = NodeStripes::default();
    loop {
        // In one transaction with the batch: a sweep that completed before
        // it cleared the flag after committing its adoptions.
        let (batch, pending, invisible) = indexer::run(&gw.store, |tx| async move {
            let batch = schema::stripes_scan_tx(&tx, after, BATCH).await?;
            // Which stripes placing a shard here are of no evidence or live
            // part (checked once per id: a batch is mostly a few pieces of
            // evidence's stripes).
            let mut invisible = std::collections::HashSet::new();
            let mut seen = std::collections::HashSet::new();
            for (e, _, rec) in &batch {
                let here = rec
                    .as_ref()
                    .is_some_and(|r| r.shards.iter().any(|s| s.node == Some(node)));
                if here && seen.insert(*e) && schema::stripes_of_tx(&tx, *e).await?.is_none() {
                    invisible.insert(*e);
                }
            }
            Ok::<_, schema::SchemaError>((
                batch,
                schema::adoption_pending_tx(&tx).await?,
                invisible,
            ))
        })
        .await?;
        for (e, stripe, rec) in &batch {
            // A record that does not decode (damage, or one a newer build
            // wrote) may place a shard here: the node is not known to hold
            // nothing until it is read. The first of a walk is named (a
            // drain asks for this walk every half second).
            let Some(rec) = rec.as_ref() else {
                if count.unreadable == 0 {
                    tracing::warn!(evidence = %e, stripe, %node, "a stripe record does not decode: whether it places a shard on this node is unknown (the first such of this walk)");
                }
                count.unreadable += 1;
                continue;
            };
            if rec.shards.iter().any(|s| s.node == Some(node)) {
                count.placed += 1;
                if invisible.contains(e) {
                    count.of_pending += 1;
                }
            } else if pending && rec.shards.iter().any(|s| s.node.is_none()) {
                count.awaiting_adoption += 1;
            }
        }
        match batch.last() {
            Some((e, s, _)) if batch.len() == BATCH => after = Some((*e, *s)),
            _ => return Ok(count),
        }
    }
}

/// Uploads still under way that may have put shards on `node` before its
/// drain or removal took effect everywhere: their stripe records are
/// written in batches, so [`stripes_on_node`] cannot count those shards
/// yet. Those begun before the decision, or within two probe intervals
/// after it (another gateway learns of it at its next probe), count.
async fn uploads_before_lifecycle<S: Store>(
    gw: &Gateway<S>,
    decided: Option<schema::LifecycleRecord>,
) -> Result<u64, ApiError> {
    let Some(decided) = decided else {
        return Ok(0);
    };
    let cutoff = decided
        .changed_ms
        .saturating_add(gw.config.node_probe_interval_ms.saturating_mul(2));
    Ok(crate::repair::live_intents(gw)
        .await?
        .iter()
        .filter(|e| e.unix_millis() <= cutoff)
        .count() as u64)
}

/// A node in this gateway's configuration, or (with `unlisted`) one only
/// the index knows: a dead node taken out of cluster.toml before it was
/// removed, which still places shards that repair waits for until it is
/// removed (forced).
async fn node_id_param<S: Store>(
    gw: &Gateway<S>,
    id: &str,
    unlisted: bool,
) -> Result<NodeId, ApiError> {
    let id = NodeId(
        id.strip_prefix('n')
            .unwrap_or(id)
            .parse()
            .map_err(|_| ApiError::BadRequest(format!("{id:?} is not a node id")))?,
    );
    if gw.nodes.addr(id).is_some() {
        return Ok(id);
    }
    let known = indexer::run(
        &gw.store,
        |tx| async move { schema::get_node_tx(&tx, id).await },
    )
    .await?
    .is_some();
    match (known, unlisted) {
        (true, true) => Ok(id),
        (true, false) => Err(ApiError::Conflict(format!(
            "node {id} is not in this gateway's configuration (cluster.toml), though the index knows it: a dead node taken out of the configuration is removed with `custodia node remove {} --force`; a live one is listed again to be drained",
            id.0
        ))),
        (false, _) => Err(ApiError::NoSuchNode(id)),
    }
}

/// One node's lifecycle and how many stripes still place a shard on it.
async fn node_detail<S: Store>(
    State(gw): State<Arc<Gateway<S>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let who = authenticate(&gw, &headers).await?;
    require(&who, Role::Admin, "see a node")?;
    let node = node_id_param(&gw, &id, true).await?;
    // As the index has it (this gateway's view lists configured nodes only:
    // one taken out of cluster.toml would read as removed).
    let decided = decided_record(&current_decisions(&gw).await?, node);
    let lifecycle = decided.map_or(schema::Lifecycle::Active, |r| r.state);
    // Uploads before stripes: one that ends meanwhile has written its
    // records before the walk of stripes begins.
    let uploads = match lifecycle {
        schema::Lifecycle::Active => 0,
        _ => uploads_before_lifecycle(&gw, decided).await?,
    };
    let stripes = stripes_on_node(&gw, node).await?;
    if stripes.awaiting_adoption > 0 {
        // What a drain waits for: sooner than the sweep's own interval.
        gw.ask_for_sweep();
    }
    Ok(Json(json!({
        "id": node.0,
        "lifecycle": lifecycle.as_str(),
        "stripes": stripes.placed,
        "stripes_of_unfinished_uploads": stripes.of_pending,
        "uploads_in_flight": uploads,
        "stripes_awaiting_adoption": stripes.awaiting_adoption,
        "stripe_records_unreadable": stripes.unreadable,
    })))
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LifecycleQuery {
    /// `remove` a node that still holds shards (a dead one: refused while
    /// it answers, or has within `node_down_after_ms`): its shards count as
    /// missing and repair rebuilds them elsewhere.
    force: Option<bool>,
}

/// `drain`, `activate` (undo a drain) or `remove` a node. A drain moves
/// every shard off the node while it keeps serving them; `remove` is refused
/// while any stripe still places a shard on it, unless forced.
async fn node_lifecycle<S: Store>(
    State(gw): State<Arc<Gateway<S>>>,
    Path((id, action)): Path<(String, String)>,
    Query(q): Query<LifecycleQuery>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    use schema::{Lifecycle, LifecycleRecord};
    let who = authenticate(&gw, &headers).await?;
    require(&who, Role::Admin, "change a node's lifecycle")?;
    let state = match action.as_str() {
        "drain" => Lifecycle::Draining,
        "activate" => Lifecycle::Active,
        "remove" => Lifecycle::Removed,
        other => {
            return Err(ApiError::BadRequest(format!(
                "{other:?}: the actions are drain, activate and remove"
            )))
        }
    };
    // A node only the index knows can only be forced out: nothing here can
    // reach it to drain it, or to check it holds nothing.
    let forcing = state == Lifecycle::Removed && q.force.unwrap_or(false);
    let node = node_id_param(&gw, &id, forcing).await?;
    // From the index, not this gateway's view (which another gateway's
    // decision reaches only at its next probe); the transaction below
    // reads them again, so a decision made meanwhile makes it fail rather
    // than be overwritten.
    // The whole record, its time too: a drain undone and made again
    // meanwhile changes which uploads may hold shards on the node.
    let current_record = decided_record(&current_decisions(&gw).await?, node);
    let current = current_record.map_or(Lifecycle::Active, |r| r.state);
    if current == Lifecycle::Removed && state != Lifecycle::Removed {
        return Err(ApiError::Conflict(format!(
            "node {node} was removed; add it again as a new node"
        )));
    }
    let mut stripes = None;
    let forced = state == Lifecycle::Removed && q.force.unwrap_or(false);
    if forced && current != Lifecycle::Removed {
        // For a dead node only: its shards count as missing at once, and a
        // live node forced out with others (each drain leaving enough
        // active) could take stripes below k with it, evidence under
        // retention or hold included. A node that answers is drained.
        // Silent to every gateway, too: each records in the index when its
        // probe last reached the node (one cut off from a node by a network
        // split must not take it out from under the others). As long as a
        // node takes to be called down: one silent for less, which status
        // shows as suspect, may be restarting (a reboot), and forced out
        // beside others still being rebuilt it would take stripes below k,
        // their loss on the ledger for good, although it comes back whole.
        let quiet = Duration::from_millis(
            gw.config
                .node_probe_interval_ms
                .saturating_mul(2)
                .max(gw.config.node_down_after_ms),
        );
        let seen = gw.nodes.view().into_iter().find(|n| n.id == node);
        let record = indexer::run(&gw.store, |tx| async move {
            schema::get_node_tx(&tx, node).await
        })
        .await?;
        // By the wall clock, as the other gateways' stamps mostly are (this
        // one's compliance clock may run ahead of it): clocks apart by more
        // than the window defeat this check, and the clock-skew alerts say
        // so.
        let wall_ms = crate::clock::wall_ms();
        let recorded_silence =
            record.map(|r| Duration::from_millis(wall_ms.saturating_sub(r.last_seen_ms)));
        let how = match (seen, recorded_silence) {
            (Some(n), _) if n.healthy => Some("answers".to_owned()),
            (Some(n), _) if n.silent_for < quiet => {
                Some(format!("was heard from {} s ago", n.silent_for.as_secs()))
            }
            (_, Some(silence)) if silence < quiet => Some(format!(
                "was heard from by a gateway {} s ago",
                silence.as_secs()
            )),
            _ => None,
        };
        if let Some(how) = how {
            return Err(ApiError::Conflict(format!(
                "node {node} {how}: a forced removal is for a dead node (one silent for {} s); drain it (custodia node drain {} --wait) and remove it once drained, or stop it (or cut it off) first",
                quiet.as_secs(),
                node.0
            )));
        }
    }
    if state == Lifecycle::Removed && !forced {
        // An active node may be taking shards of uploads under way that
        // no stripe record names yet: only a drain's start tells which
        // uploads could still hold some there.
        if current == Lifecycle::Active {
            return Err(ApiError::Conflict(format!(
                "node {node} is active and may be taking shards of uploads under way; drain it first (custodia node drain {} --wait), or force the removal of a dead node",
                node.0
            )));
        }
        // Uploads before stripes: one that ends meanwhile has written its
        // records before the walk of stripes begins, so it is counted by one
        // of the two.
        if current == Lifecycle::Draining {
            let uploads = uploads_before_lifecycle(&gw, current_record).await?;
            if uploads > 0 {
                return Err(ApiError::Conflict(format!(
                    "{uploads} uploads begun before node {node}'s drain are still under way and may hold shards on it; wait for them"
                )));
            }
        }
        let left = stripes_on_node(&gw, node).await?;
        if left.placed > 0 {
            let parts = if left.of_pending > 0 {
                format!(
                    " ({} of them of uploads that repair does not move: S3 multipart parts stored before this version, which move once their upload completes, or go once it is aborted or expires, and parts of ended uploads awaiting deletion)",
                    left.of_pending
                )
            } else {
                String::new()
            };
            return Err(ApiError::Conflict(format!(
                "{} stripes still place a shard on node {node}{parts}; drain it and let repair move them, or force the removal of a dead node",
                left.placed
            )));
        }
        if left.unreadable > 0 {
            return Err(ApiError::Conflict(format!(
                "{} stripe records do not decode (damaged, or written by a newer version), so whether they place a shard on node {node} is unknown; see the gateway's log, or force the removal of a dead node",
                left.unreadable
            )));
        }
        if left.awaiting_adoption > 0 {
            gw.ask_for_sweep();
            return Err(ApiError::Conflict(format!(
                "{} stripes have a shard no node is recorded for (recover-index ran while nodes were away), and no orphan sweep has yet listed every node to find those copies; node {node} may hold some. A sweep has been asked for: try again once it has run (every node must answer), or force the removal of a dead node",
                left.awaiting_adoption
            )));
        }
        stripes = Some(left.placed);
    }
    // Later than the decision it replaces (which the transaction checks is
    // still the stored one), whatever this gateway's clock says: the
    // archive keeps only the later of two decisions, so one stamped
    // earlier by a gateway whose clock is behind would never reach it.
    let rec = LifecycleRecord {
        state,
        changed_ms: gw
            .clock
            .now_ms()
            .max(current_record.map_or(0, |r| r.changed_ms.saturating_add(1))),
    };
    let others: Vec<NodeId> = gw
        .nodes
        .view()
        .iter()
        .map(|n| n.id)
        .filter(|id| *id != node)
        .collect();
    let (k, m) = (gw.config.k, gw.config.m);
    let need = k as usize + m as usize;
    let refused = indexer::run(&gw.store, |tx| {
        let others = &others;
        async move {
            // Read in the transaction: two drains of two nodes at once
            // conflict, so they cannot both leave fewer than k+m active.
            let now = schema::lifecycles_tx(&tx).await?;
            if decided_record(&now, node) != current_record {
                return Ok(Some(format!(
                    "node {node}'s lifecycle changed meanwhile (to {}); look again",
                    stored_lifecycle(&now, node).as_str()
                )));
            }
            // Never below k+m active nodes: new stripes could not be placed.
            let active = others
                .iter()
                .filter(|n| stored_lifecycle(&now, **n) == Lifecycle::Active)
                .count();
            if state != Lifecycle::Active && current == Lifecycle::Active && active < need {
                return Ok(Some(format!(
                    "only {active} other active nodes would remain; RS({k},{m}) needs {need}"
                )));
            }
            schema::set_lifecycle_tx(&tx, node, &rec);
            Ok::<_, schema::SchemaError>(None)
        }
    })
    .await?;
    if let Some(refused) = refused {
        return Err(ApiError::Conflict(refused));
    }
    gw.nodes.set_lifecycles(&current_decisions(&gw).await?);
    tracing::warn!(%node, state = state.as_str(), actor = %actor(&who), "node lifecycle changed by an operator");
    // Into the archive at once, for `recover-index`; a failure (or an
    // archive too slow to wait for) is made up for by the archive's
    // comparison loop within seconds. Run as a task of its own, which only
    // the waiting gives up on: dropped at the timeout, its write could land
    // after a later, newer one while what it knew of the archive said the
    // newer one was there.
    let archiving = tokio::spawn({
        let gw = gw.clone();
        async move { crate::lifecycle_archive::sync(&gw).await }
    });
    match tokio::time::timeout(Duration::from_secs(5), archiving).await {
        Ok(archived) => {
            let failed = match archived {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(e.to_string()),
            };
            if let Some(e) = failed {
                tracing::warn!(%node, error = %e, "node decision not archived yet; retried shortly")
            }
        }
        Err(_) => tracing::warn!(%node, "node decision not archived within 5 s; retried shortly"),
    }
    // A drain or removal queues the node's stripes at once.
    gw.repair_wake.notify_one();
    Ok(Json(json!({
        "id": node.0,
        "lifecycle": state.as_str(),
        "stripes": stripes,
    })))
}

/// A node's decision as `decided` records it, if one was ever made.
fn decided_record(
    decided: &[(NodeId, schema::LifecycleRecord)],
    node: NodeId,
) -> Option<schema::LifecycleRecord> {
    decided.iter().find(|(n, _)| *n == node).map(|(_, r)| *r)
}

/// A node's lifecycle as `decided` records it (active if never decided).
fn stored_lifecycle(
    decided: &[(NodeId, schema::LifecycleRecord)],
    node: NodeId,
) -> schema::Lifecycle {
    decided_record(decided, node).map_or(schema::Lifecycle::Active, |r| r.state)
}

async fn current_decisions<S: Store>(
    gw: &Gateway<S>,
) -> Result<Vec<(NodeId, schema::LifecycleRecord)>, ApiError> {
    Ok(indexer::run(
        &gw.store,
        |tx| async move { schema::lifecycles_tx(&tx).await },
    )
    .await?)
}

/// How far the degraded-stripe count walks the index for `status`.
const STATUS_DEGRADED_LIMIT: usize = 100_000;
/// Queued stripes a replayed filing's answer looks at for those still short.
const REPLAY_DEGRADED_LIMIT: usize = 2_000;

/// The cluster at a glance (`custodia status`): nodes with their state and
/// disks, the repair backlog, the ledger's size and freshness.
async fn status<S: Store>(
    State(gw): State<Arc<Gateway<S>>>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let who = authenticate(&gw, &headers).await?;
    require(&who, Role::Admin, "see the cluster's status")?;
    let (degraded, ledger_size) = indexer::run(&gw.store, |tx| async move {
        Ok::<_, schema::SchemaError>((
            schema::degraded_stripes_tx(&tx, STATUS_DEGRADED_LIMIT).await?,
            indexer::ledger::checkpoint_size_tx(&tx).await?,
        ))
    })
    .await?;
    let nodes: Vec<_> = gw
        .nodes
        .view()
        .into_iter()
        .map(|n| {
            json!({
                "id": n.id.0,
                "addr": n.addr.to_string(),
                "failure_domain": n.domain,
                "state": n.state.as_str(),
                "lifecycle": n.lifecycle.as_str(),
                "last_seen_s": n.last_seen.map(|d| d.as_secs_f64()),
                "capacity_bytes": n.disk.map(|d| d.capacity_bytes),
                "used_bytes": n.disk.map(|d| d.used_bytes),
                "free_bytes": n.disk.map(|d| d.free_bytes),
                "reserve_bytes": n.disk.map(|d| d.reserve_bytes),
                "full": n.full,
                "writes_failing": n.writes_failing,
                "shards": n.disk.map(|d| d.shards),
                "rtt_ms": n.rtt.map(|d| d.as_secs_f64() * 1000.0),
                // Measured at each answered probe: a node not answering
                // has no current skew (its last one would read as now's).
                "clock_offset_ms": n.clock_offset_ms.filter(|_| n.healthy),
                "reconciling": n.reconciling,
                "awaiting_grace": crate::repair::awaiting_grace(&gw, &n),
            })
        })
        .collect();
    // Known here only on the gateway integrating the ledger (another's
    // figure would be stale and grow without end), and measured with the
    // clock it was taken by (the system clock: the stamping clock may be
    // held ahead of it after a step back).
    let integrating = gw.ledger.as_ref().is_some_and(|l| l.integrating());
    let integrated = match integrating {
        true => gw.metrics.checkpoint_time.known().unwrap_or(0.0),
        false => 0.0,
    };
    let now_s = crate::ledger::unix_now_secs_f64();
    let clock = gw.clock.reading();
    let mut stripes: Vec<_> = degraded.iter().map(|(e, _)| *e).collect();
    stripes.dedup();
    Ok(Json(json!({
        "code": { "k": gw.config.k, "m": gw.config.m },
        "nodes": nodes,
        "degraded_stripes": degraded.len(),
        "degraded_evidence": stripes.len(),
        "degraded_count_capped": degraded.len() >= STATUS_DEGRADED_LIMIT,
        // Since this gateway started: how a backlog past the cap shrinks.
        "repair_settled_stripes": gw.repair_settled.load(std::sync::atomic::Ordering::Relaxed),
        "ledger": {
            "entries": ledger_size,
            // Seconds since a signed checkpoint last covered every waiting
            // entry (the integrator checks each second): small when healthy.
            "checkpoint_age_s": (integrated > 0.0).then(|| (now_s - integrated).max(0.0)),
            // Whether this gateway integrates the ledger (if not, the age
            // is another gateway's to tell).
            "integrating": integrating,
            "witnesses": gw.metrics.witness_quorum.get(),
            "cosigned_entries": gw.metrics.cosigned_entries.get(),
        },
        // Retention is judged by the compliance clock (`crate::clock`).
        "clock": {
            "system_ms": clock.system_ms,
            "compliance_ms": clock.compliance_ms,
            "compliance_offset_s": (clock.compliance_ms as f64 - clock.system_ms as f64) / 1000.0,
            "confirmed_by": clock.confirmed.map(|(s, _)| s.as_str()),
            "confirmed_s_ago": clock.confirmed.map(|(_, age)| age.as_secs_f64()),
        },
    })))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    tenant: String,
    role: String,
}

/// What every admin `POST` with a JSON body starts with: the caller must be
/// an admin, and the body must be `T` (`shape` says what was expected).
async fn admin_request<S: Store, T: serde::de::DeserializeOwned>(
    gw: &Gateway<S>,
    headers: &HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
    action: &'static str,
    shape: &str,
) -> Result<(Caller, T), ApiError> {
    let body = body?;
    let who = authenticate(gw, headers).await?;
    require(&who, Role::Admin, action)?;
    let req = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("expected {shape}: {e}")))?;
    Ok((who, req))
}

async fn create_token<S: Store>(
    State(gw): State<Arc<Gateway<S>>>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let (who, req): (_, NewToken) = admin_request(
        &gw,
        &headers,
        body,
        "create credentials",
        r#"{"tenant", "role"}"#,
    )
    .await?;
    let role = grantable_role(&req.role)?;
    let token = hex::encode(rand::random::<[u8; 32]>());
    let rec = TokenRecord {
        tenant: req.tenant.clone(),
        role,
    };
    // Only for a registered tenant (as S3 keys): a typo would otherwise
    // file evidence under a tenant nobody else can see.
    indexer::run(&gw.store, |tx| {
        let (token, rec) = (&token, &rec);
        async move {
            if !indexer::s3::tenant_exists_tx(&tx, &rec.tenant).await? {
                return Err(ApiError::Object(indexer::s3::ObjectError::NoSuchTenant));
            }
            schema::put_token_tx(&tx, token, rec)?;
            Ok::<_, ApiError>(())
        }
    })
    .await?;
    tracing::info!(tenant = %req.tenant, role = %req.role, by = %who.tenant, "credential created");
    Ok((
        StatusCode::CREATED,
        Json(json!({ "tenant": req.tenant, "role": req.role, "token": token })),
    )
        .into_response())
}

/// A role the admin API may grant. Separation of duties: whoever administers
/// the service cannot give itself the power to expunge; expunger credentials
/// are issued on the index host (`custodia key create --role expunger`).
fn grantable_role(role: &str) -> Result<Role, ApiError> {
    match Role::parse(role) {
        Some(Role::Expunger) => Err(ApiError::Forbidden(
            "grant the expunger role: expunger credentials are issued only on the index host \
             with `custodia key create --role expunger` (gateway stopped)",
        )),
        Some(role) => Ok(role),
        None => Err(ApiError::BadRequest(format!(
            "unknown role {role:?}: reader, clerk or admin"
        ))),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTenant {
    name: String,
}

/// `POST /v1/admin/tenants`: registers a tenant on a running cluster.
/// 201 when created, 200 when it already existed.
async fn create_tenant<S: Store>(
    State(gw): State<Arc<Gateway<S>>>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let (who, req): (_, NewTenant) =
        admin_request(&gw, &headers, body, "create tenants", r#"{"name"}"#).await?;
    let created =
        crate::credentials::create_tenant(&gw.store, &req.name, gw.clock.now_ms()).await?;
    if created {
        tracing::info!(tenant = %req.name, by = %who.tenant, "tenant created");
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(json!({ "tenant": req.name, "created": created })),
    )
        .into_response())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    tenant: String,
    role: String,
    #[serde(default)]
    bypass_governance: bool,
}

/// `POST /v1/admin/keys`: a bearer token and an S3 access key for an
/// existing tenant, on a running cluster. The secrets are in this answer
/// only.
async fn create_key<S: Store>(
    State(gw): State<Arc<Gateway<S>>>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let (who, req): (_, NewKey) = admin_request(
        &gw,
        &headers,
        body,
        "create credentials",
        r#"{"tenant", "role", "bypass_governance"?}"#,
    )
    .await?;
    let role = grantable_role(&req.role)?;
    let creds =
        crate::credentials::issue(&gw.store, &req.tenant, role, req.bypass_governance).await?;
    tracing::info!(
        tenant = %req.tenant,
        role = %req.role,
        access_key = %creds.access_key,
        bypass_governance = req.bypass_governance,
        by = %who.tenant,
        "credentials created"
    );
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "tenant": creds.tenant,
            "role": req.role,
            "token": creds.token,
            "access_key": creds.access_key,
            "secret_access_key": creds.secret,
            "bypass_governance": creds.bypass_governance,
        })),
    )
        .into_response())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeKey {
    token: Option<String>,
    /// A token as custody records name it (`token:` and 16 hex digits),
    /// for one the operator never held.
    token_id: Option<String>,
    access_key: Option<String>,
}

/// `POST /v1/admin/keys/revoke`: a leaked or retired credential stops
/// working now, presigned URLs signed with the access key included.
async fn revoke_key<S: Store>(
    State(gw): State<Arc<Gateway<S>>>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let (who, req): (_, RevokeKey) = admin_request(
        &gw,
        &headers,
        body,
        "revoke credentials",
        r#"{"token"? or "token_id"?, "access_key"?}"#,
    )
    .await?;
    let token = match (req.token.as_deref(), req.token_id.as_deref()) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "name a \"token\" or a \"token_id\", not both".into(),
            ))
        }
        (Some(t), None) => Some(indexer::schema::token_hash(t.trim())),
        (None, Some(id)) => match crate::credentials::resolve_token_id(&gw.store, id).await {
            Ok(hash) => Some(hash),
            Err(crate::credentials::TokenIdError::Index(e)) => return Err(e.into()),
            Err(e @ crate::credentials::TokenIdError::Malformed(_)) => {
                return Err(ApiError::BadRequest(e.to_string()))
            }
            // Not stored (any more): as for a token, unless an access key
            // named beside it is found and revoked.
            Err(crate::credentials::TokenIdError::Unknown(_)) => None,
            Err(e @ crate::credentials::TokenIdError::Ambiguous(_)) => {
                return Err(ApiError::Conflict(e.to_string()))
            }
        },
        (None, None) => None,
    };
    let token_named = req.token.is_some() || req.token_id.is_some();
    if !token_named && req.access_key.is_none() {
        return Err(ApiError::BadRequest(
            "name a \"token\" (or \"token_id\"), an \"access_key\" or both".into(),
        ));
    }
    // Not the credential this request is made with: an administrator
    // revoking its own token (DATA_DIR/admin.token, say) would lock every
    // administrative command out. Another admin's token revokes it.
    if token.is_some() && token == bearer_token(&headers).map(indexer::schema::token_hash) {
        return Err(ApiError::Conflict(
            "this is the token the request is made with: revoke it with another \
             administrator's token"
                .into(),
        ));
    }
    // Into the ledger's openings archive first: `recover-index` restores
    // the credentials DATA_DIR's files hold, and must not restore these.
    if let Some(ledger) = &gw.ledger {
        crate::credentials::archive_revocation(ledger, token.as_ref(), req.access_key.as_deref())
            .await
            .map_err(|e| {
                ApiError::Unavailable(format!(
                    "the revocation could not be archived, so nothing was revoked: {e}"
                ))
            })?;
    }
    let revoked =
        crate::credentials::revoke(&gw.store, token.as_ref(), req.access_key.as_deref()).await?;
    if !revoked.token && !revoked.access_key {
        return Err(ApiError::NoSuchCredential);
    }
    // The token itself is a secret: never logged, even revoked.
    tracing::info!(
        token = revoked.token,
        access_key = req.access_key.as_deref().filter(|_| revoked.access_key),
        by = %who.tenant,
        "credentials revoked"
    );
    Ok((
        StatusCode::OK,
        Json(json!({
            "token_revoked": revoked.token,
            "access_key_revoked": revoked.access_key,
        })),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GET and HEAD conditions in RFC 9110 13.2.2's order, against the
    /// evidence's BLAKE3 entity tag and its filing time (to the second).
    #[test]
    fn evidence_reads_meet_conditions_in_the_rfc_order() {
        let h = ManifestHeader {
            evidence: protocol::EvidenceId([1; 16]),
            tenant: "t".into(),
            case: None,
            blake3: protocol::Blake3Hash([0xab; 32]),
            sha256: protocol::Sha256Hash([0; 32]),
            size: 10,
            media_type: None,
            file_name: None,
            submitter: None,
            filed_at_ms: 1_796_000_000_700,
            code: protocol::ErasureCode::new(4, 2, 4096).expect("code"),
            stripes: 1,
            retain_until_ms: None,
            legal_hold: false,
        };
        let tag = etag_of(&h);
        let (before, same, after) = (
            http_date(1_795_999_999_000),
            http_date(1_796_000_000_000),
            http_date(1_796_000_001_000),
        );
        let with = |pairs: &[(&'static str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(*k, v.parse().unwrap());
            }
            m
        };
        let p = |pairs: &[(&'static str, &str)]| precondition(&with(pairs), &h, &tag);
        use Precondition::*;
        assert_eq!(p(&[]), Proceed);
        assert_eq!(p(&[("if-match", &tag)]), Proceed);
        assert_eq!(p(&[("if-match", "\"x\", *")]), Proceed);
        assert_eq!(p(&[("if-match", "\"x\"")]), Failed);
        assert_eq!(p(&[("if-match", &format!("W/{tag}"))]), Failed, "strong");
        assert_eq!(p(&[("if-unmodified-since", &before)]), Failed);
        assert_eq!(p(&[("if-unmodified-since", &same)]), Proceed);
        assert_eq!(p(&[("if-unmodified-since", "not a date")]), Proceed);
        // If-Match decides over If-Unmodified-Since.
        assert_eq!(
            p(&[("if-match", &tag), ("if-unmodified-since", &before)]),
            Proceed
        );
        assert_eq!(p(&[("if-none-match", "*")]), NotModified);
        assert_eq!(
            p(&[("if-none-match", &format!("W/{tag}"))]),
            NotModified,
            "weak"
        );
        assert_eq!(p(&[("if-none-match", "\"x\"")]), Proceed);
        assert_eq!(p(&[("if-modified-since", &same)]), NotModified);
        assert_eq!(p(&[("if-modified-since", &after)]), NotModified);
        assert_eq!(p(&[("if-modified-since", &before)]), Proceed);
        // If-None-Match decides over If-Modified-Since.
        assert_eq!(
            p(&[("if-none-match", "\"x\""), ("if-modified-since", &after)]),
            Proceed
        );
        // A failed If-Match comes before a matching If-None-Match.
        assert_eq!(p(&[("if-match", "\"x\""), ("if-none-match", "*")]), Failed);
        // If-Range: the tag or the filing time, or the Range is ignored.
        let r = |v: &str| if_range_holds(&with(&[("if-range", v)]), &h, &tag);
        assert!(if_range_holds(&HeaderMap::new(), &h, &tag));
        assert!(r(&tag) && r(&same));
        assert!(!r("\"x\"") && !r(&format!("W/{tag}")) && !r(&after) && !r("soon"));
    }

    /// A background task that panics stops the gateway, saying which; one
    /// that ends on its own does not.
    #[tokio::test]
    async fn a_background_task_that_dies_stops_the_gateway() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut gw = RunningGateway {
            local_addr: addr,
            s3_addr: None,
            metrics_addr: None,
            server: Some(tokio::spawn(std::future::pending())),
            s3: None,
            stop: Stopper::new(Default::default()),
            background: vec![
                ("done early", tokio::spawn(async {})),
                ("forever", tokio::spawn(std::future::pending())),
                (
                    "doomed",
                    tokio::spawn(async {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        panic!("a bug");
                    }),
                ),
            ],
        };
        let why = tokio::time::timeout(Duration::from_secs(10), gw.stopped())
            .await
            .expect("the gateway stops when a task dies");
        assert!(why.to_string().contains("doomed"), "{why}");
        assert_eq!(gw.background.len(), 1, "only the one still running is left");
        gw.abort();
    }

    /// Invisible format characters are refused wherever they would hide in
    /// printed metadata (tag characters, soft hyphens, invisible operators,
    /// bidirectional overrides), while the marks real names need are not.
    #[test]
    fn invisible_format_characters_are_deceptive_and_needed_marks_are_not() {
        for c in [
            '\u{202E}',
            '\u{2066}',
            '\u{200B}',
            '\u{2060}',
            '\u{FEFF}',
            '\u{E0001}',
            '\u{E0041}',
            '\u{00AD}',
            '\u{2062}',
            '\u{206A}',
            '\u{FFF9}',
            '\u{2028}',
            '\u{3164}',
            '\u{115F}',
        ] {
            assert!(is_deceptive(c), "U+{:04X} passes", c as u32);
        }
        for c in [
            'a', 'ü', 'ی', '\u{200C}', '\u{200D}', '\u{200E}', '\u{200F}', '\u{061C}', '\u{0600}',
            '\u{180E}', ' ', '-',
        ] {
            assert!(!is_deceptive(c), "U+{:04X} is refused", c as u32);
        }
    }

    /// `openapi.json` describes exactly the routes and methods [`router`]
    /// serves (read from its source: axum's router does not list them),
    /// and every operation answers errors with the one error schema.
    #[test]
    fn the_openapi_document_describes_every_route_and_no_other() {
        use std::collections::BTreeSet;
        const METHODS: [&str; 5] = ["get", "post", "put", "delete", "head"];
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().unwrap();
        let documented: BTreeSet<(String, String)> = paths
            .iter()
            .flat_map(|(path, ops)| {
                let ops = ops.as_object().unwrap();
                ops.keys()
                    .filter(|m| METHODS.contains(&m.as_str()))
                    .map(move |m| (m.clone(), path.clone()))
            })
            .collect();
        let source = include_str!("api.rs");
        let start = source.find("pub fn router<").unwrap();
        let end = start + source[start..].find(".with_state(gw)").unwrap();
        let mut served = BTreeSet::new();
        for chunk in source[start..end].split(".route(").skip(1) {
            let path = chunk
                .split('"')
                .nth(1)
                .unwrap()
                .replace("{*path}", "{path}");
            for m in METHODS {
                let called = chunk.match_indices(&format!("{m}(")).any(|(at, _)| {
                    chunk[..at]
                        .chars()
                        .next_back()
                        .is_none_or(|c| !c.is_alphanumeric() && c != '_')
                });
                if called {
                    served.insert((m.to_owned(), path.clone()));
                }
            }
        }
        assert!(
            served.len() > 20,
            "the router's source was not read: {served:?}"
        );
        assert_eq!(documented, served, "documented vs served");
        for (method, path) in &documented {
            let op = &paths[path][method];
            assert!(
                op["operationId"].is_string(),
                "{method} {path}: no operationId"
            );
            assert!(op["responses"].is_object(), "{method} {path}: no responses");
        }
        assert!(doc["components"]["schemas"]["Error"].is_object());
    }

    /// A client that stops reading a response (far larger than the sockets'
    /// buffers) is cut off once the response has made no progress for the
    /// idle time; it gets what the buffers held, never the whole body.
    #[tokio::test]
    async fn a_client_that_stops_reading_is_cut_off() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const BODY: usize = 64 << 20;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = hyper::service::service_fn(|_req| async {
            let body = http_body_util::Full::new(bytes::Bytes::from(vec![7u8; BODY]));
            Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
        });
        let stop = Stopper::new(Default::default());
        let drain = stop.drain("test", Duration::from_secs(1));
        let http = http1(Duration::from_millis(300));
        let server = tokio::spawn(serve_connections(listener, None, http, drain, service));
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut got = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(20), client.read_to_end(&mut got)).await;
        assert!(read.is_ok(), "the connection stayed open");
        assert!(got.len() < BODY, "{} bytes: the whole response", got.len());
        stop.stop();
        server.abort();
    }

    #[test]
    fn tile_paths_are_told_from_anything_else() {
        for ok in [
            "tile/0/000",
            "tile/0/x001/234",
            "tile/1/x001/x234/067.p/8",
            "tile/entries/000.p/1",
            "tile/entries/x012/345",
            "tile/63/999.p/255",
        ] {
            assert!(is_tile_path(ok), "{ok}");
        }
        for bad in [
            "tile/",
            "tile/0",
            "tile/0/",
            "tile/0/00",
            "tile/0/0000",
            "tile/0/x001",
            "tile/0/001/234",
            "tile/0/000.p",
            "tile/0/000.p/",
            "tile/0/000.p/1/x",
            "tile/0/000.p/1000",
            "tile/100/000",
            "tile/data/000",
            "tile/x%231",
            "tile/0/000#1",
            "checkpoint",
        ] {
            assert!(!is_tile_path(bad), "{bad}");
        }
        let long = format!("tile/{}", "a".repeat(300));
        assert!(!is_tile_path(&long));
    }

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn ranges_follow_rfc_9110() {
        assert_eq!(parse_range(None, 10).unwrap(), None);
        assert_eq!(parse_range(Some(&hv("bytes=0-0")), 10).unwrap(), Some(0..1));
        assert_eq!(parse_range(Some(&hv("bytes=2-")), 10).unwrap(), Some(2..10));
        assert_eq!(parse_range(Some(&hv("bytes=-3")), 10).unwrap(), Some(7..10));
        assert_eq!(
            parse_range(Some(&hv("bytes=-30")), 10).unwrap(),
            Some(0..10)
        );
        assert_eq!(
            parse_range(Some(&hv("bytes=5-100")), 10).unwrap(),
            Some(5..10)
        );
        assert_eq!(parse_range(Some(&hv("bytes=0-1,4-5")), 10).unwrap(), None);
        assert!(matches!(
            parse_range(Some(&hv("bytes=10-")), 10),
            Err(ApiError::RangeNotSatisfiable { size: 10 })
        ));
        assert!(matches!(
            parse_range(Some(&hv("bytes=0-")), 0),
            Err(ApiError::RangeNotSatisfiable { .. })
        ));
        // Units: case-insensitive; one not understood is ignored.
        assert_eq!(parse_range(Some(&hv("Bytes=0-1")), 10).unwrap(), Some(0..2));
        assert_eq!(parse_range(Some(&hv("items=0-1")), 10).unwrap(), None);
        // Positions past u64::MAX: valid, past any end.
        let huge = "99999999999999999999";
        assert_eq!(
            parse_range(Some(&hv(&format!("bytes=0-{huge}"))), 10).unwrap(),
            Some(0..10)
        );
        assert_eq!(
            parse_range(Some(&hv(&format!("bytes=-{huge}"))), 10).unwrap(),
            Some(0..10)
        );
        assert!(matches!(
            parse_range(Some(&hv(&format!("bytes={huge}-"))), 10),
            Err(ApiError::RangeNotSatisfiable { size: 10 })
        ));
        // Zero-length content: a non-zero suffix is satisfiable (all of it).
        assert_eq!(parse_range(Some(&hv("bytes=-5")), 0).unwrap(), None);
        assert!(matches!(
            parse_range(Some(&hv("bytes=-0")), 0),
            Err(ApiError::RangeNotSatisfiable { size: 0 })
        ));
        for bad in [
            "bytes=+1-2",
            "bytes=1-+2",
            "bytes=-",
            "bytes=a-1",
            "bytes 0-1",
        ] {
            assert!(
                matches!(
                    parse_range(Some(&hv(bad)), 10),
                    Err(ApiError::BadRequest(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_range(Some(&hv("bytes=5-2")), 10),
            Err(ApiError::BadRequest(_))
        ));
    }
}

/// Who acted, as the ledger records it: the credential's tenant and role,
/// and which token it was (by its id, never the token): two clerks of one
/// tenant are told apart in the custody record.
pub(crate) fn actor(who: &Caller) -> String {
    let role = format!("{:?}", who.role).to_lowercase();
    format!("{}/{role}/{}", who.tenant, who.credential)
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Evidence or a hash-only notarization visible to the caller.
async fn visible_subject<S: Store>(
    gw: &Gateway<S>,
    who: &TokenRecord,
    id: &str,
) -> Result<EvidenceId, ApiError> {
    match load_visible(gw, who, id).await {
        Ok(h) => Ok(h.evidence),
        // Expunged: the bytes are gone, the record of what happened is not.
        Err(ApiError::Gone) => id
            .parse()
            .map_err(|_| ApiError::BadRequest("evidence id must be a UUID".into())),
        Err(ApiError::NotFound) => {
            let id: EvidenceId = id
                .parse()
                .map_err(|_| ApiError::BadRequest("evidence id must be a UUID".into()))?;
            let tenant = indexer::run(&gw.store, |tx| async move {
                indexer::ledger::notarization_tenant_tx(&tx, id).await
            })
            .await?;
            match tenant {
                Some(t) if t == who.tenant || who.role == Role::Admin => Ok(id),
                _ => Err(ApiError::NotFound),
            }
        }
        Err(e) => Err(e),
    }
}

async fn evidence_receipt<S: Store>(
    State(gw): State<Arc<Gateway<S>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<protocol::Receipt>, ApiError> {
    let who = authenticate(&gw, &headers).await?;
    require(&who, Role::Reader, "read receipts")?;
    let id = visible_subject(&gw, &who, &id).await?;
    if gw.ledger.is_none() {
        // Not "pending": no receipt will ever come.
        return Err(no_ledger());
    }
    crate::ledger::receipt(&gw, id, &[Kind::Filed, Kind::Notarized])
        .await?
        .map(Json)
        .ok_or(ApiError::ReceiptPending)
}

/// Custody events per page, by default and at most: each carries a
/// receipt of its own (a few KB, built with its own index reads), so a
/// larger page asked for is cut to this, its `next_after` saying where the
/// rest begins.
const CUSTODY_PAGE: usize = 1000;

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CustodyQuery {
    /// The events after this leaf (the previous page's `next_after`).
    after: Option<u64>,
    limit: Option<usize>,
}

async fn custody<S: Store>(
    State(gw): State<Arc<Gateway<S>>>,
    Path(id): Path<String>,
    Query(q): Query<CustodyQuery>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let who = authenticate(&gw, &headers).await?;
    require(&who, Role::Reader, "read custody events")?;
    let id = visible_subject(&gw, &who, &id).await?;
    // Without a ledger nothing is recorded: an empty list would read as
    // "nobody accessed it".
    if gw.ledger.is_none() {
        return Err(ApiError::Unavailable(
            "this gateway runs without a ledger: accesses are not recorded".into(),
        ));
    }
    // Paged: every read adds an event, so one evidence may have millions.
    let limit = q.limit.unwrap_or(CUSTODY_PAGE);
    if limit == 0 {
        return Err(ApiError::BadRequest("limit must be at least 1".to_owned()));
    }
    let limit = limit.min(CUSTODY_PAGE);
    let events = crate::ledger::custody(&gw, id, q.after, limit).await?;
    // A full page may have more after it.
    let next_after = (events.len() == limit)
        .then(|| events.last().map(|(index, _, _)| *index))
        .flatten();
    Ok(Json(json!({
        "id": id.to_string(),
        "events": events
            .into_iter()
            .map(|(index, kind, receipt)| json!({
                "leaf_index": index,
                "kind": kind,
                "receipt": receipt,
            }))
            .collect::<Vec<_>>(),
        "next_after": next_after,
    })))
}

/// Largest `POST /v1/notarize` body.
const MAX_NOTARIZE_BODY: usize = 4 << 20;
/// Most items per `POST /v1/notarize`.
const MAX_NOTARIZE_ITEMS: usize = 1000;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NotarizeRequest {
    items: Vec<NotarizeItem>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NotarizeItem {
    blake3: String,
    #[serde(default)]
    sha256: Option<String>,
    size: u64,
    #[serde(default)]
    case: Option<String>,
    /// SHA-256 (hex) of whatever metadata the agency keeps with the bytes.
    #[serde(default)]
    metadata_sha256: Option<String>,
    #[serde(default)]
    provenance: protocol::ledger::Provenance,
}

/// Hash-only notarization: statements about content whose bytes the agency
/// keeps. One transaction queues them all; they share a checkpoint.
async fn notarize<S: Store>(
    State(gw): State<Arc<Gateway<S>>>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    // Who asks before the body is read: up to 4 MiB of it would otherwise
    // be held for anyone, credentials or not.
    let who = authenticate(&gw, request.headers()).await?;
    require(&who, Role::Clerk, "notarize")?;
    if gw.ledger.is_none() {
        return Err(no_ledger());
    }
    let body =
        <axum::body::Bytes as axum::extract::FromRequest<()>>::from_request(request, &()).await?;
    let req: NotarizeRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("notarize body: {e}")))?;
    if req.items.is_empty() || req.items.len() > MAX_NOTARIZE_ITEMS {
        return Err(ApiError::BadRequest(format!(
            "notarize takes 1 to {MAX_NOTARIZE_ITEMS} items"
        )));
    }
    let now = gw.clock.now_ms();
    let mut ids = Vec::with_capacity(req.items.len());
    let mut pending = Vec::with_capacity(req.items.len());
    for (i, item) in req.items.into_iter().enumerate() {
        let bad =
            |what: &str| ApiError::BadRequest(format!("item {i}: {what} must be 64 hex digits"));
        let blake3: Blake3Hash = item.blake3.parse().map_err(|_| bad("blake3"))?;
        let sha256: Option<Sha256Hash> = item
            .sha256
            .map(|s| s.parse().map_err(|_| bad("sha256")))
            .transpose()?;
        if let Some(m) = &item.metadata_sha256 {
            m.parse::<Sha256Hash>()
                .map_err(|_| bad("metadata_sha256"))?;
        }
        // The same rules as a filing's headers: these go into the signed
        // statement, which a court reads (and `custodia verify` prints).
        let text = |field: &str, value: &Option<String>| -> Result<(), ApiError> {
            match value {
                Some(v) if v.len() > MAX_META_LEN => Err(ApiError::BadRequest(format!(
                    "items[{i}].{field} is longer than {MAX_META_LEN} bytes"
                ))),
                // Lines and tabs are text in a JSON document (a custody
                // history over several lines), unlike in a header.
                Some(v)
                    if v.chars()
                        .any(|c| (c.is_control() && c != '\n' && c != '\t') || is_deceptive(c)) =>
                {
                    Err(ApiError::BadRequest(format!(
                        "items[{i}].{field} holds control or invisible formatting characters"
                    )))
                }
                _ => Ok(()),
            }
        };
        text("case", &item.case)?;
        let p = &item.provenance;
        text("provenance.source_device", &p.source_device)?;
        text("provenance.capture_time", &p.capture_time)?;
        text("provenance.capture_method", &p.capture_method)?;
        text("provenance.prior_custody", &p.prior_custody)?;
        let id = EvidenceId::new(now, rand::random());
        let mut s = Statement::new(
            Kind::Notarized,
            id,
            &blake3,
            sha256.as_ref(),
            item.size,
            &who.tenant,
            item.case,
            Some(actor(&who)),
            now,
        );
        s.metadata_sha256 = item.metadata_sha256;
        s.provenance = item.provenance;
        ids.push(id);
        pending.push(crate::ledger::pending(id, &s)?);
    }
    let tenant = who.tenant.clone();
    let placed = indexer::run(&gw.store, |tx| {
        let (pending, tenant, live) = (&pending, &tenant, &who.live);
        async move {
            // The body may have taken minutes: a token revoked meanwhile
            // notarizes nothing (as for a filing).
            crate::ingest::still_authorized_tx(&tx, Some(live)).await?;
            Ok::<_, ApiError>(indexer::ledger::enqueue_notarizations_tx(
                &tx, pending, tenant,
            ))
        }
    })
    .await?;
    if let Some(l) = &gw.ledger {
        l.queued();
    }
    let receipts = crate::ledger::wait_for_receipts(&gw, &ids, &placed).await?;
    // Serialised straight from the receipts (a JSON value tree would copy
    // every string of up to 1,000 receipts once more).
    #[derive(serde::Serialize)]
    struct Item {
        id: String,
        receipt_url: String,
        receipt: Option<protocol::Receipt>,
    }
    #[derive(serde::Serialize)]
    struct Answer {
        items: Vec<Item>,
    }
    let items: Vec<Item> = ids
        .iter()
        .zip(receipts)
        .map(|(id, receipt)| Item {
            id: id.to_string(),
            receipt_url: format!("/v1/evidence/{id}/receipt"),
            receipt,
        })
        .collect();
    // Into a buffer sized for the answer up front (a receipt is ~3 kB):
    // growing it from empty copied megabytes per request.
    let mut body = Vec::with_capacity(64 + items.len() * 3200);
    serde_json::to_writer(&mut body, &Answer { items }).map_err(|e| {
        tracing::error!(error = %e, "could not serialise a notarize answer");
        ApiError::Internal
    })?;
    Ok((
        StatusCode::CREATED,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

#[derive(serde::Deserialize)]
struct InclusionQuery {
    index: u64,
    size: u64,
}

#[derive(serde::Deserialize)]
struct ConsistencyQuery {
    old: u64,
    new: u64,
}

fn proof_json(proof: &[protocol::ledger::TreeHash]) -> serde_json::Value {
    json!({ "proof": proof.iter().map(|h| h.to_string()).collect::<Vec<_>>() })
}

/// Public, like the tiles they are computed from: an auditor who is no
/// tenant checks the log with them (nothing in them reveals what was filed).
async fn ledger_inclusion<S: Store>(
    State(gw): State<Arc<Gateway<S>>>,
    Query(q): Query<InclusionQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if gw.ledger.is_none() {
        return Err(no_ledger());
    }
    let proof = crate::ledger::inclusion_proof(&gw, q.index, q.size).await?;
    Ok(Json(proof_json(&proof)))
}

/// Public, as [`ledger_inclusion`]: how anyone holding two checkpoints
/// checks that the log only grew (`custodia verify --consistency`).
async fn ledger_consistency<S: Store>(
    State(gw): State<Arc<Gateway<S>>>,
    Query(q): Query<ConsistencyQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if gw.ledger.is_none() {
        return Err(no_ledger());
    }
    let proof = crate::ledger::consistency_proof(&gw, q.old, q.new).await?;
    // With the sizes it is for: an auditor pairing it with a checkpoint of
    // another size is told so, rather than that the log forked.
    let mut answer = proof_json(&proof);
    answer["old"] = q.old.into();
    answer["new"] = q.new.into();
    Ok(Json(answer))
}

/// The log's public verifier key (C2SP signed-note format). Public, like the
/// tiles: it is what a court pins to verify receipts offline.
async fn ledger_key<S: Store>(State(gw): State<Arc<Gateway<S>>>) -> Result<String, ApiError> {
    gw.ledger
        .as_ref()
        .map(|l| format!("{}\n", l.verifier_key))
        .ok_or_else(no_ledger)
}

/// What the ledger's routes answer on a gateway configured without one.
fn no_ledger() -> ApiError {
    ApiError::Unavailable(
        "this gateway keeps no ledger ([gateway.ledger] in cluster.toml): filings get no \
         receipts and nothing is notarized"
            .into(),
    )
}

/// Whether `path` names a tile as C2SP tlog-tiles does: `tile/<L>/<N>` or
/// `tile/entries/<N>`, `<N>` in 3-digit groups all but the last prefixed
/// with `x`, and `.p/<W>` for a partial tile. Anything else is not looked
/// up (a path through a tile, or a name the file system refuses, would
/// otherwise be a 500).
fn is_tile_path(path: &str) -> bool {
    let digits = |s: &str, max: usize| {
        !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_digit())
    };
    let Some(rest) = path.strip_prefix("tile/") else {
        return false;
    };
    let mut parts: Vec<&str> = rest.split('/').collect();
    let level = parts.remove(0);
    if level != "entries" && !digits(level, 2) {
        return false;
    }
    // `.p/<W>`: the last group ends in `.p`, then the width.
    let partial = parts.len() >= 2 && parts[parts.len() - 2].ends_with(".p");
    if partial {
        let Some(width) = parts.pop() else {
            return false;
        };
        if !digits(width, 3) {
            return false;
        }
    }
    let Some((last, groups)) = parts.split_last() else {
        return false;
    };
    let last = if partial {
        last.strip_suffix(".p").unwrap_or(last)
    } else {
        last
    };
    groups.iter().all(|g| {
        g.strip_prefix('x')
            .is_some_and(|n| digits(n, 3) && n.len() == 3)
    }) && digits(last, 3)
        && last.len() == 3
}

/// The published log, read-only and public (C2SP tlog-tiles): `checkpoint`,
/// `tile/<L>/<N>[.p/<W>]`, `tile/entries/<N>[.p/<W>]`. Entries are salted
/// commitments: nothing here reveals what was filed.
async fn ledger_published<S: Store>(
    State(gw): State<Arc<Gateway<S>>>,
    Path(path): Path<String>,
) -> Result<Response, ApiError> {
    let ledger = gw.ledger.as_ref().ok_or(ApiError::NotFound)?;
    if !(path == "checkpoint" || is_tile_path(&path)) {
        return Err(ApiError::NotFound);
    }
    let bytes = ledger
        .read_published(&path)
        .await?
        .ok_or(ApiError::NotFound)?;
    let (content_type, cache) = if path == "checkpoint" {
        ("text/plain; charset=utf-8", "no-store")
    } else if path.contains(".p/") {
        ("application/octet-stream", "no-cache")
    } else {
        // Full tiles never change.
        (
            "application/octet-stream",
            "public, max-age=31536000, immutable",
        )
    };
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, cache)
        .body(Body::from(bytes))
        .map_err(|_| ApiError::Internal)
}

/// The statement recording a WORM change or an expunge of `h`.
fn worm_statement<S: Store>(
    gw: &Gateway<S>,
    who: &Caller,
    h: &ManifestHeader,
    kind: Kind,
    detail: serde_json::Value,
) -> Result<Option<indexer::ledger::PendingRecord>, ApiError> {
    event_statement(gw, h, kind, actor(who), &detail)
}

/// A statement of `kind` about `h`'s evidence by `actor`, with the hash of
/// `detail` (what changed, which court order, which shards): ready for the
/// outbox; `None` where no ledger is configured.
pub(crate) fn event_statement<S: Store>(
    gw: &Gateway<S>,
    h: &ManifestHeader,
    kind: Kind,
    actor: String,
    detail: &serde_json::Value,
) -> Result<Option<indexer::ledger::PendingRecord>, ApiError> {
    if gw.ledger.is_none() {
        // Only the ledger makes an expunge or a release answerable for:
        // without one it would leave no trace anywhere but a log line.
        if matches!(kind, Kind::Expunged | Kind::Released) {
            // Final, not retryable (409; S3's InvalidRequest): only a
            // configuration with a ledger changes it.
            return Err(ApiError::Conflict(format!(
                "this gateway keeps no ledger ([gateway.ledger] in cluster.toml), and an {} \
                 is done only on the ledger: refused",
                match kind {
                    Kind::Expunged => "expunge",
                    _ => "legal hold's release",
                }
            )));
        }
        return Ok(None);
    }
    crate::ledger::pending(h.evidence, &statement_about(gw, h, kind, actor, detail)).map(Some)
}

/// A statement of `kind` about `h`'s evidence by `actor`, now, with the
/// hash of `detail`.
fn statement_about<S: Store>(
    gw: &Gateway<S>,
    h: &ManifestHeader,
    kind: Kind,
    actor: String,
    detail: &serde_json::Value,
) -> Statement {
    let mut s = Statement::new(
        kind,
        h.evidence,
        &h.blake3,
        Some(&h.sha256),
        h.size,
        &h.tenant,
        h.case.clone(),
        Some(actor),
        gw.clock.now_ms(),
    );
    s.metadata_sha256 = Some(sha256_hex(detail.to_string().as_bytes()));
    s
}

/// What [`worm`] committed: the evidence as it now stands, and (with a
/// ledger) where to look for its statement: at the tree's size when it was
/// queued or later, the leaf with its salt.
pub(crate) struct Wormed {
    pub header: ManifestHeader,
    queued: Option<(u64, [u8; 32])>,
}

/// Runs `change` and queues `kind`'s statement in the same transaction.
pub(crate) async fn worm<S, F, Fut, E>(
    gw: &Gateway<S>,
    who: &Caller,
    h: &ManifestHeader,
    kind: Kind,
    detail: serde_json::Value,
    change: F,
) -> Result<Wormed, ApiError>
where
    S: Store,
    F: Fn(<S as KvStore>::Tx) -> Fut,
    Fut: std::future::Future<Output = Result<ManifestHeader, E>>,
    E: From<indexer::KvError> + indexer::Retryable,
    ApiError: From<E>,
{
    let pending = worm_statement(gw, who, h, kind, detail)?;
    // Its leaf comes at the tree's present size or after, and is the one
    // with its salt (not an earlier statement of its kind still queued).
    let queued = match &pending {
        Some(p) => Some((crate::ledger::tree_size(gw).await?, p.salt)),
        None => None,
    };
    let header = indexer::run(&gw.store, |tx| {
        let pending = &pending;
        let change = &change;
        async move {
            let updated = change(tx.clone()).await?;
            if let Some(p) = pending {
                indexer::ledger::enqueue_tx(&tx, 0, p);
            }
            Ok::<_, E>(updated)
        }
    })
    .await?;
    if let Some(l) = &gw.ledger {
        l.queued();
    }
    Ok(Wormed { header, queued })
}

/// The receipt of what [`worm`] committed, waited for as a filing waits
/// for its receipt: once it comes, the change is in the ledger's openings
/// archive, and an index lost and rebuilt from it keeps the hold or the
/// retention. `None` while the ledger has not published it within the wait
/// (the index holds the change; the archive will once the ledger catches
/// up), or where no ledger runs.
async fn notarized<S: Store>(gw: &Gateway<S>, w: &Wormed) -> Option<protocol::ledger::Receipt> {
    let (since, salt) = w.queued?;
    let evidence = w.header.evidence;
    crate::ledger::wait_for_statement(gw, evidence, since, salt)
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(%evidence, error = %e, "its receipt could not be built yet");
            None
        })
}

/// A hold's or retention's answer: 200 with its receipt, or 202 (accepted,
/// in force, not yet notarized) while the ledger has not published it.
fn worm_answer<S: Store>(
    gw: &Gateway<S>,
    h: &ManifestHeader,
    receipt: Option<protocol::ledger::Receipt>,
) -> Response {
    let status = match (&receipt, &gw.ledger) {
        (None, Some(_)) => StatusCode::ACCEPTED,
        _ => StatusCode::OK,
    };
    let body = json!({
        "id": h.evidence.to_string(),
        "legal_hold": h.legal_hold,
        "retain_until_ms": h.retain_until_ms,
        "receipt": receipt.and_then(|r| serde_json::to_value(r).ok()),
    });
    (status, Json(body)).into_response()
}

async fn legal_hold_on<S: Store>(
    State(gw): State<Arc<Gateway<S>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    set_hold(gw, id, headers, true).await
}

async fn legal_hold_off<S: Store>(
    State(gw): State<Arc<Gateway<S>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    set_hold(gw, id, headers, false).await
}

async fn set_hold<S: Store>(
    gw: Arc<Gateway<S>>,
    id: String,
    headers: HeaderMap,
    hold: bool,
) -> Result<Response, ApiError> {
    let who = authenticate(&gw, &headers).await?;
    // A clerk may place a hold; lifting one (which may make evidence
    // expungeable) takes an administrator.
    if hold {
        require(&who, Role::Clerk, "place legal holds")?;
    } else {
        require(&who, Role::Admin, "release legal holds")?;
    }
    let h = load_visible(&gw, &who, &id).await?;
    let kind = if hold {
        Kind::LegalHold
    } else {
        Kind::Released
    };
    let evidence = h.evidence;
    let w = worm(
        &gw,
        &who,
        &h,
        kind,
        json!({ "legal_hold": hold }),
        |tx| async move { schema::set_legal_hold_tx(&tx, evidence, hold).await },
    )
    .await?;
    Ok(worm_answer(&gw, &w.header, notarized(&gw, &w).await))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionRequest {
    retain_until_ms: u64,
}

/// Sets or extends COMPLIANCE retention; shortening is refused for everyone.
async fn retention<S: Store>(
    State(gw): State<Arc<Gateway<S>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    let who = authenticate(&gw, &headers).await?;
    require(&who, Role::Clerk, "set retention")?;
    let req: RetentionRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("expected {{\"retain_until_ms\": N}}: {e}")))?;
    let h = load_visible(&gw, &who, &id).await?;
    let evidence = h.evidence;
    let until = req.retain_until_ms;
    // A date in the past: 409 if it would shorten the retention there is
    // (the transaction refuses it), else 400.
    if h.retain_until_ms.is_none_or(|current| current <= until) {
        in_the_future(&gw, until)?;
    }
    let w = worm(
        &gw,
        &who,
        &h,
        Kind::Admin,
        json!({ "retention": "compliance", "retain_until_ms": until }),
        |tx| async move { schema::extend_retention_tx(&tx, evidence, until).await },
    )
    .await?;
    Ok(worm_answer(&gw, &w.header, notarized(&gw, &w).await))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpungeRequest {
    /// The court order's reference; its hash goes on the ledger.
    order: String,
}

/// Expunges evidence on a court order (the dedicated `expunger` role only):
/// refused while COMPLIANCE retention or a legal hold applies, checked inside
/// the index transaction that removes it. The filing's receipt still verifies;
/// the bytes are deleted from every node.
async fn expunge<S: Store>(
    State(gw): State<Arc<Gateway<S>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body = body?;
    let who = authenticate(&gw, &headers).await?;
    require(&who, Role::Expunger, "expunge evidence")?;
    let req: ExpungeRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("expected {{\"order\": \"...\"}}: {e}")))?;
    if req.order.trim().is_empty() || req.order.len() > MAX_META_LEN {
        return Err(ApiError::BadRequest(
            "order must name the court order".into(),
        ));
    }
    let h = load_visible(&gw, &who, &id).await?;
    let evidence = h.evidence;
    // Retention ends by the compliance clock: setting the system clock
    // forward expunges nothing early.
    let compliance = gw.clock.compliance_ms();
    worm(
        &gw,
        &who,
        &h,
        Kind::Expunged,
        json!({ "order": req.order }),
        |tx| async move { schema::expunge_tx(&tx, evidence, compliance).await },
    )
    .await?;
    // The shards go once the expunge is notarized (in the ledger's archive,
    // so a lost index cannot bring the evidence back): waited for here as a
    // filing waits for its receipt; with the ledger stalled, GC deletes
    // them when it catches up.
    let receipt = crate::ledger::wait_for_receipt(&gw, evidence, &[Kind::Expunged])
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(%evidence, error = %e, "expunged; its receipt could not be built yet");
            None
        });
    tracing::info!(%evidence, by = %actor(&who), "expunged; deleting its shards");
    let erasure = crate::gc::delete_expunged(&gw, evidence).await;
    Ok(Json(json!({
        "id": evidence.to_string(),
        "expunged": true,
        "erased": erasure.done,
        "stripes_left_to_delete": erasure.stripes_left,
        "nodes_left_to_erase": erasure.nodes_left,
        "receipt": receipt.and_then(|r| serde_json::to_value(r).ok()),
    })))
}

/// The development RFC 3161 TSA (`custodia up` runs one; no credentials, like
/// any TSA). 404 where none is configured.
async fn dev_tsa<S: Store>(
    State(gw): State<Arc<Gateway<S>>>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    match crate::ledger::dev_tsa_answer(&gw, &body) {
        None => Err(ApiError::NotFound),
        Some(Err(e)) => {
            tracing::error!(error = %e, "development TSA failed");
            Err(ApiError::Internal)
        }
        Some(Ok(der)) => Response::builder()
            .header(header::CONTENT_TYPE, protocol::tsa::CONTENT_TYPE_REPLY)
            .body(Body::from(der))
            .map_err(|_| ApiError::Internal),
    }
}
