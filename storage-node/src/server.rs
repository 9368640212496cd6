//! The storage node's QUIC server.
//!
//! [`serve`] opens the [`ShardStore`], binds a quinn endpoint with the node's
//! mutual-TLS configuration and returns a [`RunningNode`]; `custodia node`,
//! `custodia up` and the tests call it. Each connection gets a task and each
//! bidirectional stream a task carrying exactly one request (see
//! `protocol::wire`): the request frame, for `PutShard` the body, then one
//! response frame, for `Shard` followed by the body. The `handle_*` functions
//! here answer the `rpc_*` methods of [`crate::client::NodeClient`].
//!
//! Nothing a peer sends can panic the node: bad frames are answered with
//! `Error(code)` and the stream is finished; body sizes are checked against the
//! shard's code before anything is allocated, and the memory held by bodies in
//! flight is bounded across all connections.

use crate::buffers::BufferPool;
use crate::client::NodeClient;
use crate::metrics::NodeMetrics;
use crate::store::{BodyCheck, ShardStore, StoreError};
use crate::tls::{self, TlsError, TlsFiles};
use protocol::wire::{decode_frame_prefix, RebuildShard, FRAME_PREFIX};
use protocol::{
    Blake3Hash, DecodeError, ErrorCode, NodeId, Request, Response, ShardHeader, ShardKey,
};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

/// Longest one request may take, body transfer included: a stalled peer must
/// not hold a stream (and its body buffer) forever on a live connection.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Put bodies held in memory at once, across all connections, in MiB: bounds a
/// node's memory whatever many gateways send at once.
pub const BODY_MEMORY_MIB: usize = 1024;
/// Shard bodies being read and sent at once, across all connections, in
/// KiB: a peer that asks for many shards and never takes them (flow control
/// holds each body until it does) cannot make a node hold more.
const READ_MEMORY_KIB: usize = 1 << 20;
/// How long shutdown waits for connection tasks to end after the endpoint is
/// closed (they end at once unless a request is stuck on disk).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// How long shutdown waits for closed connections to finish draining. The
/// close itself is sent at once; a peer that was mid-handshake can keep a
/// connection draining for seconds, and nothing is lost by not waiting for it.
const DRAIN_GRACE: Duration = Duration::from_secs(1);
/// Application close / stream reset codes (informational to the peer).
const CODE_SHUTDOWN: u32 = 0;
const CODE_REFUSED: u32 = 1;
const CODE_TIMEOUT: u32 = 2;
/// Longest a `RebuildShard` waits for memory and its sources: well inside a client's
/// request timeout (30 s by default), so a slow source fails the rebuild
/// here, answered, rather than leave the caller guessing whether the shard
/// was stored.
const REBUILD_FETCH_TIMEOUT: Duration = Duration::from_secs(20);

/// What a node needs to run.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Directory holding the shard store (created if missing).
    pub data_dir: PathBuf,
    /// UDP address to listen on; port 0 picks a free one (see
    /// [`RunningNode::local_addr`]).
    pub listen: SocketAddr,
    /// This node's id, reported in `NodeInfo`.
    pub node_id: NodeId,
    /// The node's certificate and key, and the cluster CA its clients must
    /// chain to.
    pub tls: TlsFiles,
    /// How hard the node scrubs its shards.
    pub scrub: crate::scrub::ScrubConfig,
    /// Which shards are packed into segments.
    pub store: crate::store::StoreConfig,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeServerError {
    /// The data directory could not be opened as a shard store.
    #[error("opening the shard store: {0}")]
    Store(#[from] StoreError),
    /// The TLS files could not be loaded or do not form a valid configuration.
    #[error("TLS setup: {0}")]
    Tls(#[from] TlsError),
    /// The UDP socket could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The metrics could not be registered (a name taken twice: a bug).
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// Opening the store panicked (a bug); the node did not start.
    #[error("opening the shard store panicked")]
    Panicked,
    /// Another process serves this data directory.
    #[error("{0} is in use by another node process; stop it first")]
    InUse(std::path::PathBuf),
    /// The data directory's lock could not be taken.
    #[error("locking {path}: {source}")]
    Lock {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Locked by a node process for its life in its data directory: two
/// processes on one store would delete each other's shards in flight.
pub const NODE_LOCK_FILE: &str = "node.lock";

fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File, NodeServerError> {
    let path = dir.join(NODE_LOCK_FILE);
    match crate::store::lock_file(&path) {
        Ok(Some(file)) => Ok(file),
        Ok(None) => Err(NodeServerError::InUse(dir.to_path_buf())),
        Err(source) => Err(NodeServerError::Lock { path, source }),
    }
}

/// A node that is serving. Call [`RunningNode::shutdown`] to stop it; dropping
/// it also stops accepting and closes the endpoint, without waiting.
#[derive(Debug)]
pub struct RunningNode {
    /// The address the node actually listens on.
    pub local_addr: SocketAddr,
    endpoint: quinn::Endpoint,
    stop: watch::Sender<bool>,
    accept: JoinHandle<()>,
    store: Arc<ShardStore>,
    /// Why the node can no longer serve, once it cannot (see
    /// [`RunningNode::failed`]).
    failed: watch::Receiver<Option<String>>,
    /// Held until the node is dropped ([`NODE_LOCK_FILE`]).
    _lock: std::fs::File,
}

impl RunningNode {
    /// The store this node serves (tests, scrubbing).
    pub fn store(&self) -> &Arc<ShardStore> {
        &self.store
    }

    /// Resolves, with the reason, once the node can no longer serve: its
    /// data directory changed under it ([`ShardStore::check_identity`]).
    /// The process should then shut the node down and exit with an error,
    /// to be restarted on what the directory holds now.
    pub async fn failed(&mut self) -> String {
        loop {
            if let Some(why) = self.failed.borrow_and_update().clone() {
                return why;
            }
            if self.failed.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Stops accepting, closes every connection (requests in flight fail on the
    /// client, which retries elsewhere: puts are idempotent) and waits, briefly,
    /// for the endpoint to go idle so the port is free for a restart.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.accept.await {
            tracing::warn!(error = %e, "node accept loop ended abnormally");
        }
        self.endpoint
            .close(CODE_SHUTDOWN.into(), b"node shutting down");
        let _ = tokio::time::timeout(DRAIN_GRACE, self.endpoint.wait_idle()).await;
        tracing::info!(addr = %self.local_addr, "storage node stopped");
    }
}

/// What every connection and stream task shares.
struct NodeState {
    store: Arc<ShardStore>,
    node_id: NodeId,
    body_memory: Arc<Semaphore>,
    /// See [`READ_MEMORY_KIB`].
    read_memory: Arc<Semaphore>,
    /// Shard receive buffers, reused (see [`crate::buffers`]).
    buffers: BufferPool,
    metrics: NodeMetrics,
    /// This node's certificate, which it also presents as a client when it
    /// reads other nodes' shards for a `RebuildShard`.
    tls: TlsFiles,
    /// The client for those reads, made on the first rebuild.
    peers: tokio::sync::OnceCell<NodeClient>,
    /// Nodes removed from the cluster, whose certificates are served
    /// nothing ([`Request::DenyNodes`]); kept in [`DENIED_FILE`].
    denied: std::sync::RwLock<Denied>,
    /// One `DenyNodes` at a time: its file and the set above change
    /// together.
    denying: tokio::sync::Mutex<()>,
    data_dir: PathBuf,
}

/// Which nodes' certificates are served nothing.
#[derive(Debug, Default)]
struct Denied {
    ids: std::collections::HashSet<u32>,
    /// Every node's: the list on disk could not be read, so none is
    /// served anything but who it is and the time until a gateway sends
    /// the list again (failing closed: a removed node's key must not read
    /// again because a file was damaged).
    all: bool,
    /// `ids` holds ids the list on disk does not (its write failed): the
    /// next `DenyNodes` writes it again even if it names the same ids.
    unkept: bool,
}

impl Denied {
    /// Whether a node certificate naming `ids` is served nothing. One that
    /// names no node of its own (issued before nodes had names) cannot be
    /// told from a removed one once any node was removed.
    fn refuses(&self, ids: &[u32]) -> bool {
        self.all
            || ids.iter().any(|id| self.ids.contains(id))
            || (ids.is_empty() && !self.ids.is_empty())
    }
}

/// The ids of removed nodes this node serves nothing, one per line, in its
/// data directory (as the last `DenyNodes` named them).
pub const DENIED_FILE: &str = "denied-nodes";

/// The removed nodes `data_dir` holds, as [`DENIED_FILE`] lists them.
fn read_denied(data_dir: &std::path::Path) -> std::io::Result<std::collections::HashSet<u32>> {
    match std::fs::read_to_string(data_dir.join(DENIED_FILE)) {
        Ok(text) => text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                l.trim().parse().map_err(|_| {
                    std::io::Error::other(format!("{DENIED_FILE}: {l:?} is not a node id"))
                })
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
        Err(e) => Err(e),
    }
}

/// How often the node looks for a segment worth compacting.
const COMPACT_PERIOD: Duration = Duration::from_secs(30);
/// Most segments compacted per look (each rewrites at most 64 MiB).
const COMPACTIONS_PER_ROUND: usize = 16;

/// Reclaims the space of replaced and deleted small shards, one segment at a
/// time, off the request path.
async fn compact_segments(store: Arc<ShardStore>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(COMPACT_PERIOD) => {}
        }
        // The erasures of records deleted or replaced since, made durable
        // (and their bookkeeping let go) without waiting for an expunge.
        let s = store.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || s.sync_erasures()).await {
            tracing::warn!(error = %e, "dead records' erasures could not be made durable; will retry");
        }
        // A bounded number each time, so the erasures above are made
        // durable between rounds whatever there is to compact.
        for _ in 0..COMPACTIONS_PER_ROUND {
            let s = store.clone();
            match tokio::task::spawn_blocking(move || s.compact()).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => break,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "segment compaction failed; will retry");
                    break;
                }
                Err(_) => break,
            }
            if *stop.borrow() {
                return;
            }
        }
    }
}

/// How often the disk gauges are refreshed.
const DISK_GAUGE_PERIOD: Duration = Duration::from_secs(5);

/// Opens the store in `config.data_dir`, binds `config.listen` and starts
/// serving, counting on `registry` (see [`crate::metrics`]). Returns once the
/// node accepts connections.
pub async fn serve(
    config: NodeConfig,
    registry: &prometheus::Registry,
) -> Result<RunningNode, NodeServerError> {
    let metrics = NodeMetrics::new(registry)?;
    let lock = lock_data_dir(&config.data_dir)?;
    let data_dir = config.data_dir.clone();
    let store_config = config.store;
    let store = tokio::task::spawn_blocking(move || ShardStore::open_with(&data_dir, store_config))
        .await
        .map_err(|_| NodeServerError::Panicked)??;
    let store = Arc::new(store);
    let denied = match read_denied(&config.data_dir) {
        Ok(ids) => Denied {
            ids,
            ..Denied::default()
        },
        Err(e) => {
            tracing::error!(
                file = %config.data_dir.join(DENIED_FILE).display(),
                error = %e,
                "the list of removed nodes is unreadable: no node is served shards until a \
                 gateway sends it again (within a probe)"
            );
            Denied {
                all: true,
                ..Denied::default()
            }
        }
    };
    let server_config = tls::server_config(&config.tls)?;
    let bind = |source| NodeServerError::Bind {
        addr: config.listen,
        source,
    };
    let endpoint_config = tls::endpoint_config(&config.tls, config.node_id)?;
    let endpoint = crate::udp::endpoint(config.listen, Some((endpoint_config, server_config)))
        .map_err(bind)?;
    let local_addr = endpoint.local_addr().map_err(bind)?;
    let state = Arc::new(NodeState {
        store: store.clone(),
        node_id: config.node_id,
        body_memory: Arc::new(Semaphore::new(BODY_MEMORY_MIB)),
        read_memory: Arc::new(Semaphore::new(READ_MEMORY_KIB)),
        // Idle receive buffers stay within a quarter of the in-flight body budget.
        buffers: BufferPool::new((BODY_MEMORY_MIB / 4) << 20),
        metrics,
        tls: config.tls.clone(),
        peers: tokio::sync::OnceCell::new(),
        denied: std::sync::RwLock::new(denied),
        denying: tokio::sync::Mutex::new(()),
        data_dir: config.data_dir.clone(),
    });
    let (stop, stopped) = watch::channel(false);
    let (fail, failed) = watch::channel(None);
    tokio::spawn(disk_gauges(state.clone(), stopped.clone(), fail));
    tokio::spawn(crate::scrub::run(
        store.clone(),
        state.metrics.clone(),
        config.scrub,
        stopped.clone(),
    ));
    tokio::spawn(compact_segments(store.clone(), stopped.clone()));
    let accept = tokio::spawn(accept_loop(endpoint.clone(), state, stopped));
    tracing::info!(node = %config.node_id, addr = %local_addr, "storage node listening");
    Ok(RunningNode {
        local_addr,
        endpoint,
        stop,
        accept,
        store,
        failed,
        _lock: lock,
    })
}

/// Keeps the capacity, used and free gauges current until the node stops,
/// and looks each time whether the data directory is still the one opened:
/// changed at two looks in a row, the node reports that it failed.
async fn disk_gauges(
    state: Arc<NodeState>,
    mut stop: watch::Receiver<bool>,
    fail: watch::Sender<Option<String>>,
) {
    let mut tick = tokio::time::interval(DISK_GAUGE_PERIOD);
    let mut changed_before = false;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = tick.tick() => {
                let store = state.store.clone();
                match blocking(move || store.check_identity()).await {
                    Ok(()) => changed_before = false,
                    Err(StoreError::DiskChanged(why)) if changed_before => {
                        tracing::error!(%why, "the data directory changed under the running node; stopping it");
                        let _ = fail.send(Some(why));
                        break;
                    }
                    Err(StoreError::DiskChanged(why)) => {
                        tracing::warn!(%why, "the data directory looks changed; looking again");
                        changed_before = true;
                    }
                    Err(e) => tracing::warn!(error = %e, "could not check the data directory's identity"),
                }
                // Damage found by listing (the scrubber's walk, an orphan
                // sweep) is corruption found like any other.
                state
                    .metrics
                    .corrupt_shards
                    .inc_by(state.store.take_listed_corrupt());
                let store = state.store.clone();
                match blocking(move || store.info()).await {
                    Ok(info) => state.metrics.set_disk(&info),
                    Err(e) => tracing::warn!(error = %e, "could not read the disk's figures"),
                }
            }
        }
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    state: Arc<NodeState>,
    mut stop: watch::Receiver<bool>,
) {
    // Connection tasks live in a JoinSet so that stopping the node also stops
    // them (and, through their own sets, their streams).
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                // A client must first show it receives at its address (a
                // QUIC Retry, one round trip on a connection that then
                // lives long): a spoofed source cannot make the node run
                // a TLS handshake, and sign, for each packet it sends.
                if !incoming.remote_address_validated() {
                    if let Err(e) = incoming.retry() {
                        tracing::debug!(error = %e, "could not ask a client to retry");
                    }
                    continue;
                }
                connections.spawn(serve_connection(incoming, state.clone()));
            }
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, "connection task failed");
                }
            }
        }
    }
    endpoint.close(CODE_SHUTDOWN.into(), b"node shutting down");
    let drain = async { while connections.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, drain).await;
}

async fn serve_connection(incoming: quinn::Incoming, state: Arc<NodeState>) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => {
            // Includes clients whose certificate the cluster CA did not issue.
            tracing::info!(%remote, error = %e, "refused or failed connection");
            return;
        }
    };
    // Any certificate the cluster CA issued gets this far; only the
    // gateway's may write or delete shards. Other nodes (and any other
    // leaf: a node's key taken from its host) only read.
    let peer = peer_role(&conn);
    tracing::debug!(%remote, ?peer, "connection established");
    // Only a gateway needs many requests at once (its uploads, reads and
    // repairs); a node reads a few shards to rebuild, another leaf asks
    // the time. A stolen node key must not hold the read memory with
    // hundreds of stalled reads per connection.
    let at_once = match peer {
        Peer::Gateway => crate::tls::GATEWAY_STREAMS,
        Peer::Node(_) => PEER_NODE_STREAMS,
        Peer::Other => crate::tls::INITIAL_STREAMS,
    };
    conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(at_once));
    state.metrics.connections.inc();
    let _open = scopeguard(&state.metrics.connections);
    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(serve_stream(state.clone(), peer, send, recv));
                }
                Err(e) => {
                    tracing::debug!(%remote, reason = %e, "connection closed");
                    break;
                }
            },
            Some(done) = streams.join_next(), if !streams.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(%remote, error = %e, "request task failed");
                }
            }
        }
    }
}

/// Requests at once on a connection from another node (rebuild reads).
const PEER_NODE_STREAMS: u32 = 32;

/// Decrements a gauge when dropped (the connection task ends however it ends).
struct GaugeGuard(prometheus::IntGauge);

fn scopeguard(g: &prometheus::IntGauge) -> GaugeGuard {
    GaugeGuard(g.clone())
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Why a stream could not be served; logged, never sent (the peer is gone or
/// misbehaving).
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("reading: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("writing: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream already closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
}

/// The node ids a node's certificate names (one, as issued; a few at most
/// are kept).
type NodeIds = [Option<u32>; 4];

/// Who is on the other end of a connection, by its certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    /// A certificate for [`crate::tls::GATEWAY_NAME`].
    Gateway,
    /// A node's ([`crate::tls::NODE_SERVER_NAME`]): reads shards to rebuild.
    /// With the ids its certificate names it by
    /// ([`crate::tls::node_server_name`]; none in certificates issued before
    /// nodes had names of their own).
    Node(NodeIds),
    /// Any other the cluster CA issued (an HTTPS API's, whose key may sit
    /// on a TLS proxy): says who it is and reads the time, nothing more.
    Other,
}

fn peer_role(conn: &quinn::Connection) -> Peer {
    let Some(leaf) = conn
        .peer_identity()
        .and_then(|id| {
            id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|chain| chain.first().cloned())
    else {
        return Peer::Other;
    };
    // The chain to the cluster CA was verified in the handshake.
    let Ok(cert) = webpki::EndEntityCert::try_from(&leaf) else {
        return Peer::Other;
    };
    let named = |name: &'static str| {
        rustls::pki_types::ServerName::try_from(name)
            .is_ok_and(|name| cert.verify_is_valid_for_subject_name(&name).is_ok())
    };
    if named(crate::tls::GATEWAY_NAME) {
        Peer::Gateway
    } else if named(crate::tls::NODE_SERVER_NAME) {
        match node_id_of(&leaf) {
            Some(ids) => Peer::Node(ids),
            // Names past counting: only what any certificate may ask.
            None => Peer::Other,
        }
    } else {
        Peer::Other
    }
}

/// The node ids a node's certificate names it by (names compared as TLS
/// does, without regard to case); `None` for more than fit, which is then
/// taken for no node's (the set a [`Denied`] check sees must be all).
fn node_id_of(leaf: &rustls::pki_types::CertificateDer<'_>) -> Option<NodeIds> {
    let mut out: NodeIds = [None; 4];
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) else {
        return Some(out);
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Some(out);
    };
    let ids = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(d) => {
            crate::tls::node_id_of_name(&d.to_ascii_lowercase())
        }
        _ => None,
    });
    for (i, id) in ids.enumerate() {
        *out.get_mut(i)? = Some(id);
    }
    Some(out)
}

async fn serve_stream(
    state: Arc<NodeState>,
    peer: Peer,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let served = tokio::time::timeout(
        REQUEST_TIMEOUT,
        handle_request(&state, peer, &mut send, &mut recv),
    )
    .await;
    match served {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "request stream failed"),
        Err(_) => {
            tracing::info!("request timed out; resetting its stream");
            let _ = send.reset(CODE_TIMEOUT.into());
            let _ = recv.stop(CODE_TIMEOUT.into());
        }
    }
}

/// Why a request frame was not read.
enum RequestError {
    /// The peer sent bytes that are not a request: answer with a code.
    Bad(ErrorCode),
    /// The stream broke: nobody to answer.
    Stream(StreamError),
}

async fn read_request(recv: &mut quinn::RecvStream) -> Result<Request, RequestError> {
    let mut prefix = [0u8; FRAME_PREFIX];
    read_or_refuse(recv, &mut prefix).await?;
    let len = decode_frame_prefix(&prefix).map_err(|e| RequestError::Bad(decode_error_code(&e)))?;
    let mut body = vec![0u8; len];
    read_or_refuse(recv, &mut body).await?;
    Request::decode_body(&body).map_err(|e| RequestError::Bad(decode_error_code(&e)))
}

/// Reads exactly `buf.len()` bytes; a stream that ends early is a bad request
/// (answerable), any other failure a broken stream.
async fn read_or_refuse(recv: &mut quinn::RecvStream, buf: &mut [u8]) -> Result<(), RequestError> {
    match recv.read_exact(buf).await {
        Ok(()) => Ok(()),
        Err(quinn::ReadExactError::FinishedEarly(_)) => {
            Err(RequestError::Bad(ErrorCode::BadRequest))
        }
        Err(e) => Err(RequestError::Stream(e.into())),
    }
}

fn decode_error_code(e: &DecodeError) -> ErrorCode {
    match e {
        DecodeError::UnknownVersion(_) => ErrorCode::UnsupportedVersion,
        _ => ErrorCode::BadRequest,
    }
}

async fn handle_request(
    state: &NodeState,
    peer: Peer,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> Result<(), StreamError> {
    let started = Instant::now();
    let request = match read_request(recv).await {
        Ok(request) => request,
        Err(RequestError::Bad(code)) => {
            tracing::debug!(%code, "refusing a malformed request");
            let result = refuse(send, recv, code).await?;
            state
                .metrics
                .requests
                .with_label_values(&["bad", result])
                .inc();
            return Ok(());
        }
        Err(RequestError::Stream(e)) => return Err(e),
    };
    let harmless = matches!(request, Request::NodeInfo | Request::Time);
    // What a rebuild on another node reads from this one, and nothing
    // more: a node's key taken from its host (or its disposed-of disk) must
    // not list this node's inventory, nor stat, verify or change what it
    // holds. It can still read a shard whose key it already knows.
    let rebuild_reads = matches!(
        request,
        Request::GetShard(_) | Request::GetShardUnchecked(_)
    );
    // A node removed from the cluster is served nothing at all.
    let removed = match peer {
        Peer::Node(ids) => {
            let ids: Vec<u32> = ids.iter().flatten().copied().collect();
            state
                .denied
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .refuses(&ids)
        }
        _ => false,
    };
    let allowed = match peer {
        _ if removed => false,
        Peer::Gateway => true,
        Peer::Node(_) => harmless || rebuild_reads,
        Peer::Other => harmless,
    };
    if !allowed {
        tracing::warn!(
            ?peer,
            "refusing a request this peer's certificate does not allow (only the gateway \
             writes or lists; a node only reads shards it names, for a rebuild)"
        );
        let result = refuse(send, recv, ErrorCode::Forbidden).await?;
        state
            .metrics
            .requests
            .with_label_values(&["forbidden", result])
            .inc();
        return Ok(());
    }
    let (op, answered) = match request {
        Request::PutShard(header) => ("put", handle_put_shard(state, header, send, recv).await),
        Request::GetShard(key) => (
            "get",
            handle_get_shard(state, key, BodyCheck::Hash, send).await,
        ),
        Request::GetShardUnchecked(key) => (
            "get_unchecked",
            handle_get_shard(state, key, BodyCheck::Length, send).await,
        ),
        Request::StatShard(key) => ("stat", handle_stat_shard(state, key, send).await),
        Request::DeleteShard(key) => ("delete", handle_delete_shard(state, key, None, send).await),
        Request::DeleteShardBefore { key, not_after_ms } => (
            "delete",
            handle_delete_shard(state, key, Some(not_after_ms), send).await,
        ),
        Request::EraseEvidence(evidence) => {
            ("erase", handle_erase_evidence(state, evidence, send).await)
        }
        Request::NodeInfo => ("info", handle_node_info(state, send).await),
        Request::DenyNodes(ids) => ("deny", handle_deny_nodes(state, ids, send).await),
        Request::Space => ("space", handle_space(state, send).await),
        Request::ListShards { after, limit } => {
            ("list", handle_list_shards(state, after, limit, send).await)
        }
        Request::ListQuarantined { after } => (
            "quarantined",
            handle_list_quarantined(state, after, send).await,
        ),
        Request::VerifyShard(key) => ("verify", handle_verify_shard(state, key, send).await),
        Request::RebuildShard(rebuild) => {
            ("rebuild", handle_rebuild_shard(state, rebuild, send).await)
        }
        Request::Time => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            ("time", respond(send, &Response::Time(now)).await)
        }
    };
    // A stream that failed (reset by the client, timed out, cut by a
    // write error) is counted and timed too, or node error rates and
    // latencies would leave out the requests that went worst.
    let result = *answered.as_ref().unwrap_or(&"stream_error");
    state
        .metrics
        .requests
        .with_label_values(&[op, result])
        .inc();
    state
        .metrics
        .request_seconds
        .with_label_values(&[op])
        .observe(started.elapsed().as_secs_f64());
    answered.map(|_| ())
}

/// A response's result label: `ok` or the error code's name.
fn result_label(response: &Response) -> &'static str {
    match response {
        Response::Error(code) => match code {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::NotFound => "not_found",
            ErrorCode::HashMismatch => "hash_mismatch",
            ErrorCode::Corrupt => "corrupt",
            ErrorCode::DiskFull => "disk_full",
            ErrorCode::Io => "io",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::SourceUnavailable => "source_unavailable",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Late => "late",
            ErrorCode::Other(_) => "other",
        },
        _ => "ok",
    }
}

/// Stores a shard. Answers `Stored` only after the store has fsynced it.
async fn handle_put_shard(
    state: &NodeState,
    header: ShardHeader,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> Result<&'static str, StreamError> {
    // Checked before allocating: `len` comes from the peer.
    if !header.is_well_formed() {
        tracing::info!(shard = %header.key, len = header.len, "refusing a put with an impossible header");
        return refuse(send, recv, ErrorCode::BadRequest).await;
    }
    let mib = (header.len as usize)
        .div_ceil(1 << 20)
        .clamp(1, BODY_MEMORY_MIB);
    // The semaphore is never closed, so acquiring only fails on a bug.
    let Ok(memory) = state
        .body_memory
        .clone()
        .acquire_many_owned(mib as u32)
        .await
    else {
        return refuse(send, recv, ErrorCode::Io).await;
    };
    // Every byte is overwritten by the read (or the buffer is not used).
    let mut body = state.buffers.take(header.len as usize);
    match read_or_refuse(recv, &mut body).await {
        Ok(()) => {}
        Err(RequestError::Bad(code)) => return refuse(send, recv, code).await,
        Err(RequestError::Stream(e)) => return Err(e),
    }
    let store = state.store.clone();
    let key = header.key;
    let stored = tokio::task::spawn_blocking(move || {
        // The body's memory stays counted while the write holds it, even
        // if this request is dropped meanwhile (timed out, its connection
        // gone): a blocking write cannot be cancelled.
        let _memory = memory;
        let stored = store.put(&header, &body);
        (stored, body)
    })
    .await
    .map(|(stored, body)| {
        state.buffers.give(body);
        stored
    });
    let response = match stored {
        Ok(Ok(())) => {
            tracing::debug!(shard = %key, len = header.len, "shard stored");
            state.metrics.shards_written.inc();
            state.metrics.bytes_written.inc_by(u64::from(header.len));
            Response::Stored
        }
        Ok(Err(e)) => {
            if e.code() == ErrorCode::HashMismatch {
                // Nothing on this disk is damaged: the body came so.
                state.metrics.refused_puts.inc();
            }
            tracing::warn!(shard = %key, error = %e, "shard not stored");
            Response::Error(e.code())
        }
        Err(e) => {
            tracing::error!(shard = %key, error = %e, "shard store task failed");
            Response::Error(ErrorCode::Io)
        }
    };
    respond(send, &response).await
}

/// The node's read memory for reading `key` whole, waited for while other
/// reads hold it (a shard not here costs nothing: it is answered at once).
/// A packed shard's length is in memory; a file's is a `stat`, made on the
/// blocking pool like every other touch of a shard file.
async fn read_memory_for(
    state: &NodeState,
    key: ShardKey,
) -> Result<tokio::sync::OwnedSemaphorePermit, tokio::sync::AcquireError> {
    let len = match state.store.packed_len(&key) {
        Some(len) => Some(len),
        None => {
            let store = state.store.clone();
            blocking(move || Ok(store.stored_len(&key)))
                .await
                .unwrap_or(None)
        }
    };
    let kib = len
        .map_or(1, |len| {
            usize::try_from(len.div_ceil(1024)).unwrap_or(usize::MAX)
        })
        .clamp(1, READ_MEMORY_KIB);
    match state.read_memory.clone().try_acquire_many_owned(kib as u32) {
        Ok(permit) => Ok(permit),
        Err(_) => {
            state.metrics.read_memory_waits.inc();
            state
                .read_memory
                .clone()
                .acquire_many_owned(kib as u32)
                .await
        }
    }
}

/// Sends a shard's header and body, verified on the way out of the store as
/// far as `check` says.
async fn handle_get_shard(
    state: &NodeState,
    key: ShardKey,
    check: BodyCheck,
    send: &mut quinn::SendStream,
) -> Result<&'static str, StreamError> {
    // Charged before the read, held until the body is sent.
    let Ok(memory) = read_memory_for(state, key).await else {
        return respond(send, &Response::Error(ErrorCode::Io)).await;
    };
    let store = state.store.clone();
    // A small shard in the page cache is read right here (never a wait for
    // the disk: see `get_small_fast`): handing a read of a few KiB to the
    // blocking pool costs two thread wake-ups, more than the read itself.
    // Anything slower (a file, a quarantine's fsyncs, a record compaction
    // moved) goes to the blocking pool, off the threads serving QUIC.
    let (got, _memory) = match state.store.get_small_fast(&key) {
        Some(got) => (Ok(got), Some(memory)),
        // The buffer's memory stays counted while the read fills it, even
        // if this request is dropped meanwhile (timed out, its connection
        // gone): a blocking read cannot be cancelled.
        None => match tokio::task::spawn_blocking(move || {
            let got = match store.get_small_shared(&key) {
                Some(got) => got,
                None => store.get_shared_checked(&key, check),
            };
            (got, memory)
        })
        .await
        {
            Ok((got, memory)) => (got, Some(memory)),
            Err(e) => (
                Err(StoreError::Io(std::io::Error::other(e.to_string()))),
                None,
            ),
        },
    };
    match got {
        Ok((header, body)) => {
            state.metrics.shards_read.inc();
            state.metrics.bytes_read.inc_by(body.len() as u64);
            respond_with(send, &Response::Shard(header), body).await
        }
        Err(e) => {
            if matches!(e, StoreError::Corrupt(_)) {
                state.metrics.corrupt_shards.inc();
            }
            log_store_error(&key, &e);
            respond(send, &Response::Error(e.code())).await
        }
    }
}

/// Builds a shard from `k` others of its stripe read from their nodes (or
/// copies it from one node) and stores it; answers `Stored` after the
/// fsync (see [`Request::RebuildShard`]).
async fn handle_rebuild_shard(
    state: &NodeState,
    rebuild: RebuildShard,
    send: &mut quinn::SendStream,
) -> Result<&'static str, StreamError> {
    let response = match rebuild_shard(state, rebuild).await {
        Ok(()) => Response::Stored,
        Err(code) => Response::Error(code),
    };
    respond(send, &response).await
}

async fn rebuild_shard(state: &NodeState, rebuild: RebuildShard) -> Result<(), ErrorCode> {
    // Checked before allocating or connecting: the request comes from a peer.
    if !rebuild.is_well_formed() {
        tracing::info!(shard = %rebuild.header.key, "refusing an impossible rebuild");
        return Err(ErrorCode::BadRequest);
    }
    let header = rebuild.header;
    let code = header.code;
    let (k, m) = (code.data_shards(), code.parity_shards());
    // The sources and the result, within the memory all bodies share. One
    // that needs more than all of it is refused: the gateway then rebuilds
    // the shard itself.
    let mib = (rebuild.sources.len() + 1) * (header.len as usize).div_ceil(1 << 20).max(1);
    if mib > BODY_MEMORY_MIB {
        tracing::info!(shard = %header.key, mib, "refusing a rebuild larger than the node's body memory");
        return Err(ErrorCode::BadRequest);
    }
    // The wait for memory counts towards the same deadline as the
    // sources: a rebuild still waiting when its caller gives up would
    // store a shard nobody expects (see REBUILD_FETCH_TIMEOUT).
    let deadline = tokio::time::Instant::now() + REBUILD_FETCH_TIMEOUT;
    let Ok(_memory) = tokio::time::timeout_at(
        deadline,
        state.body_memory.clone().acquire_many_owned(mib as u32),
    )
    .await
    .map_err(|_| ErrorCode::SourceUnavailable)?
    else {
        return Err(ErrorCode::Io);
    };
    let peers = state
        .peers
        .get_or_try_init(|| async { NodeClient::new(&state.tls) })
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "cannot make a client to read other nodes");
            ErrorCode::Io
        })?;
    let fetch = futures::future::join_all(rebuild.sources.iter().map(|source| {
        let key = ShardKey {
            index: source.index,
            ..header.key
        };
        async move {
            // Unchecked first (the hash is checked here, against the
            // manifest's); a copy that fails it is read again checked, as
            // the protocol asks of a caller whose own check failed: its
            // node hashes it, and quarantines and reports a damaged copy.
            for checked in [false, true] {
                match peers
                    .rpc_read_shard(source.addr, key, checked, header.len)
                    .await
                {
                    Ok((_, body))
                        if body.len() == header.len as usize
                            && Blake3Hash::of(&body) == source.blake3 =>
                    {
                        return Ok((source.index, body));
                    }
                    Ok((_, body)) => {
                        tracing::warn!(shard = %key, addr = %source.addr, checked, "a rebuild source is not the manifest's shard");
                        peers.recycle(body);
                    }
                    Err(e) => {
                        tracing::info!(shard = %key, addr = %source.addr, checked, error = %e, "a rebuild source could not be read");
                        return Err(());
                    }
                }
            }
            Err(())
        }
    }));
    let fetched = tokio::time::timeout_at(deadline, fetch)
        .await
        .map_err(|_| ErrorCode::SourceUnavailable)?;
    let mut shards: Vec<Option<Vec<u8>>> = vec![None; k + m];
    let mut missing = false;
    for got in fetched {
        match got {
            Ok((index, body)) => shards[usize::from(index)] = Some(body),
            Err(()) => missing = true,
        }
    }
    if missing {
        for body in shards.into_iter().flatten() {
            peers.recycle(body);
        }
        return Err(ErrorCode::SourceUnavailable);
    }
    let store = state.store.clone();
    let index = usize::from(header.key.index);
    let copy = rebuild.is_copy();
    // Overwritten whole by the decode (unused for a copy).
    let out = if copy {
        Vec::new()
    } else {
        state.buffers.take(header.len as usize)
    };
    let stored = tokio::task::spawn_blocking(move || {
        if copy {
            // The one source is the shard itself, already in its place.
            let body = shards[index].take().unwrap_or_default();
            return store.put(&header, &body).map(|()| (body, shards));
        }
        let mut body = out;
        decode_one(k, m, &shards, index, &mut body)
            .map_err(|e| StoreError::BadHeader(rs_error(e)))?;
        // Checks the body against the manifest's hash, then writes durably.
        store.put(&header, &body).map(|()| (body, shards))
    })
    .await;
    match stored {
        Ok(Ok((body, rest))) => {
            tracing::debug!(shard = %header.key, len = header.len, "shard rebuilt and stored");
            state.metrics.shards_written.inc();
            state.metrics.bytes_written.inc_by(u64::from(header.len));
            for b in rest.into_iter().flatten() {
                peers.recycle(b);
            }
            if copy {
                peers.recycle(body);
            } else {
                state.buffers.give(body);
            }
            Ok(())
        }
        Ok(Err(e)) => {
            tracing::warn!(shard = %header.key, error = %e, "rebuilt shard not stored");
            Err(e.code())
        }
        Err(e) => {
            tracing::error!(shard = %header.key, error = %e, "shard rebuild task failed");
            Err(ErrorCode::Io)
        }
    }
}

/// Decodes shard `target` of a stripe coded RS(`k`, `m`) into `out` (as
/// long as the sources) from exactly `k` present `shards`, and nothing
/// else: `ReedSolomon::reconstruct` would rebuild every missing shard
/// into fresh zeroed buffers, `m` of them where one is wanted.
///
/// The target is a fixed linear combination of the sources, the same at
/// every byte, so its coefficients come from the crate's own decoder run
/// on `k`-byte unit vectors (source j holds 1 at byte j, 0 elsewhere: byte
/// j of the result is source j's coefficient); the shard is then `k`
/// multiply-accumulate passes.
fn decode_one(
    k: usize,
    m: usize,
    shards: &[Option<Vec<u8>>],
    target: usize,
    out: &mut [u8],
) -> Result<(), reed_solomon_erasure::Error> {
    use reed_solomon_erasure::galois_8;
    let sources: Vec<(usize, &[u8])> = shards
        .iter()
        .enumerate()
        .filter_map(|(i, s)| Some((i, s.as_deref()?)))
        .collect();
    if shards.len() != k + m || sources.len() != k || target >= k + m {
        return Err(reed_solomon_erasure::Error::TooFewShardsPresent);
    }
    if sources
        .iter()
        .any(|(i, s)| *i == target || s.len() != out.len())
    {
        return Err(reed_solomon_erasure::Error::IncorrectShardSize);
    }
    if out.is_empty() {
        // Nothing to decode (and the SIMD kernels index the first byte).
        return Ok(());
    }
    let mut probe: Vec<Option<Vec<u8>>> = vec![None; k + m];
    for (j, (i, _)) in sources.iter().enumerate() {
        let mut unit = vec![0u8; k];
        unit[j] = 1;
        probe[*i] = Some(unit);
    }
    galois_8::ReedSolomon::new(k, m)?.reconstruct(&mut probe)?;
    let coefficients = probe[target]
        .take()
        .ok_or(reed_solomon_erasure::Error::TooFewShardsPresent)?;
    for (j, (_, source)) in sources.iter().enumerate() {
        if j == 0 {
            galois_8::mul_slice(coefficients[j], source, out);
        } else {
            galois_8::mul_slice_xor(coefficients[j], source, out);
        }
    }
    Ok(())
}

/// A Reed-Solomon error as a static reason (the sources were checked, so
/// any is a bug or an impossible code).
fn rs_error(e: reed_solomon_erasure::Error) -> &'static str {
    tracing::error!(error = ?e, "reconstruction failed");
    "reconstruction failed"
}

async fn handle_stat_shard(
    state: &NodeState,
    key: ShardKey,
    send: &mut quinn::SendStream,
) -> Result<&'static str, StreamError> {
    let store = state.store.clone();
    let response = match blocking(move || store.stat(&key)).await {
        Ok(header) => Response::Stat(header),
        Err(e) => {
            log_store_error(&key, &e);
            Response::Error(e.code())
        }
    };
    respond(send, &response).await
}

/// Deletes a shard; with `not_after_ms`, only while this node's wall clock
/// has not passed it, checked under the shard's lock right before it goes.
async fn handle_delete_shard(
    state: &NodeState,
    key: ShardKey,
    not_after_ms: Option<u64>,
    send: &mut quinn::SendStream,
) -> Result<&'static str, StreamError> {
    let store = state.store.clone();
    let in_time = move || {
        not_after_ms.is_none_or(|t| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .is_ok_and(|d| d.as_millis() as u64 <= t)
        })
    };
    let response = match blocking(move || store.delete_while(&key, in_time)).await {
        Ok(existed) => {
            tracing::debug!(shard = %key, existed, "shard deleted");
            Response::Deleted { existed }
        }
        Err(e) => {
            log_store_error(&key, &e);
            Response::Error(e.code())
        }
    };
    respond(send, &response).await
}

async fn handle_erase_evidence(
    state: &NodeState,
    evidence: protocol::EvidenceId,
    send: &mut quinn::SendStream,
) -> Result<&'static str, StreamError> {
    let store = state.store.clone();
    let response = match blocking(move || store.erase_evidence(evidence)).await {
        Ok(erased) => {
            tracing::info!(
                %evidence,
                shards = erased.shards,
                forensic_copies = erased.copies,
                "erased an expunged evidence's shards"
            );
            Response::Erased {
                shards: erased.shards,
                copies: erased.copies,
            }
        }
        Err(e) => {
            tracing::warn!(%evidence, error = %e, "could not erase an expunged evidence's shards");
            Response::Error(e.code())
        }
    };
    respond(send, &response).await
}

/// Serves none of `ids` from now on, and keeps them so (durably, before
/// the answer), beside those it had: a node is removed for good (added
/// again only under a new id), and gateways each send the list their probe
/// read, so one read before a removal may arrive after a newer one; taken
/// as the whole list, it would serve the node just removed again until the
/// next probe.
async fn handle_deny_nodes(
    state: &NodeState,
    ids: Vec<u32>,
    send: &mut quinn::SendStream,
) -> Result<&'static str, StreamError> {
    if ids.len() > protocol::wire::MAX_DENIED {
        return respond(send, &Response::Error(ErrorCode::BadRequest)).await;
    }
    let mut ids: std::collections::BTreeSet<u32> = ids.into_iter().collect();
    let _one_at_a_time = state.denying.lock().await;
    let unchanged = {
        let now = state.denied.read().unwrap_or_else(|e| e.into_inner());
        if !now.all {
            ids.extend(now.ids.iter().copied());
        }
        !now.all && !now.unkept && now.ids.len() == ids.len()
    };
    if !unchanged {
        // Refused at once, before the list is kept: a disk too full to keep
        // it must not leave the removed nodes served until it has room (an
        // unreadable list already refuses everyone). Only added to here;
        // the whole set (those it had and those sent) replaces it once it
        // is kept.
        {
            let mut now = state.denied.write().unwrap_or_else(|e| e.into_inner());
            now.ids.extend(ids.iter().copied());
            now.unkept = true;
        }
        let text: String = ids.iter().map(|id| format!("{id}\n")).collect();
        let dir = state.data_dir.clone();
        let written = blocking(move || {
            // Through the store's tmp/, which its open clears of what a
            // crash left.
            crate::store::durable_write(
                &dir.join(crate::store::TMP_DIR),
                &dir,
                DENIED_FILE,
                &[text.as_bytes()],
                0o644,
            )
            .map(|_| ())
            .map_err(StoreError::from)
        })
        .await;
        if let Err(e) = written {
            tracing::warn!(error = %e, "could not keep the removed nodes' ids");
            return respond(send, &Response::Error(e.code())).await;
        }
        tracing::info!(nodes = ?ids, "serving nothing to removed nodes");
        *state.denied.write().unwrap_or_else(|e| e.into_inner()) = Denied {
            ids: ids.iter().copied().collect(),
            ..Denied::default()
        };
    }
    respond(send, &Response::Denied(ids.len() as u32)).await
}

async fn handle_list_shards(
    state: &NodeState,
    after: Option<ShardKey>,
    limit: u16,
    send: &mut quinn::SendStream,
) -> Result<&'static str, StreamError> {
    let store = state.store.clone();
    let limit = limit.clamp(1, protocol::wire::MAX_LIST) as usize;
    let response = match blocking(move || store.list(after.as_ref(), limit)).await {
        Ok(headers) => Response::Shards(headers),
        Err(e) => {
            tracing::warn!(error = %e, "could not list shards");
            Response::Error(e.code())
        }
    };
    respond(send, &response).await
}

async fn handle_list_quarantined(
    state: &NodeState,
    after: Option<ShardKey>,
    send: &mut quinn::SendStream,
) -> Result<&'static str, StreamError> {
    let store = state.store.clone();
    let limit = protocol::wire::MAX_LIST as usize;
    let response = match blocking(move || store.quarantined(after.as_ref(), limit)).await {
        Ok(keys) => Response::Keys(keys),
        Err(e) => {
            tracing::warn!(error = %e, "could not list quarantined shards");
            Response::Error(e.code())
        }
    };
    respond(send, &response).await
}

async fn handle_verify_shard(
    state: &NodeState,
    key: ShardKey,
    send: &mut quinn::SendStream,
) -> Result<&'static str, StreamError> {
    // The whole shard is read to be hashed: charged as a read, and held by
    // the read itself (see `handle_get_shard`).
    let Ok(memory) = read_memory_for(state, key).await else {
        return respond(send, &Response::Error(ErrorCode::Io)).await;
    };
    let store = state.store.clone();
    let response = match blocking(move || {
        let _memory = memory;
        // The copy on the disk: what a verify pass asks about.
        store.get_from_disk(&key)
    })
    .await
    {
        Ok((header, body)) => {
            state.metrics.shards_read.inc();
            state.metrics.bytes_read.inc_by(body.len() as u64);
            Response::Stat(header)
        }
        Err(e) => {
            if matches!(e, StoreError::Corrupt(_)) {
                state.metrics.corrupt_shards.inc();
            }
            log_store_error(&key, &e);
            Response::Error(e.code())
        }
    };
    respond(send, &response).await
}

async fn handle_space(
    state: &NodeState,
    send: &mut quinn::SendStream,
) -> Result<&'static str, StreamError> {
    answer_from_info(state, send, |info| {
        Response::Space(protocol::wire::SpaceInfo {
            free_bytes: info.free_bytes,
            reserve_bytes: info.reserve_bytes,
        })
    })
    .await
}

/// Answers with what `answer` makes of the store's info (`NodeInfo`,
/// `Space`), or the store's error code.
async fn answer_from_info(
    state: &NodeState,
    send: &mut quinn::SendStream,
    answer: impl FnOnce(crate::store::StoreInfo) -> Response,
) -> Result<&'static str, StreamError> {
    let store = state.store.clone();
    let response = match blocking(move || store.info()).await {
        Ok(info) => answer(info),
        Err(e) => {
            tracing::warn!(error = %e, "could not read the node's disk figures");
            Response::Error(e.code())
        }
    };
    respond(send, &response).await
}

async fn handle_node_info(
    state: &NodeState,
    send: &mut quinn::SendStream,
) -> Result<&'static str, StreamError> {
    let node = state.node_id;
    answer_from_info(state, send, |info| {
        Response::Info(protocol::wire::NodeInfo {
            node,
            disk_uuid: info.disk_uuid,
            capacity_bytes: info.capacity_bytes,
            free_bytes: info.free_bytes,
            used_bytes: info.used_bytes,
            shards: info.shards,
        })
    })
    .await
}

/// Runs a store call on the blocking pool; a panic there becomes an I/O error
/// for this request rather than taking the node down.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) => Err(StoreError::Io(std::io::Error::other(e.to_string()))),
    }
}

fn log_store_error(key: &ShardKey, e: &StoreError) {
    match e {
        StoreError::NotFound => tracing::debug!(shard = %key, "shard not found"),
        // The store already warned when it quarantined the shard.
        StoreError::Corrupt(_) => {}
        _ => tracing::warn!(shard = %key, error = %e, "shard request failed"),
    }
}

/// Writes one response frame (and a body, for `Shard`) and finishes the stream.
async fn respond(
    send: &mut quinn::SendStream,
    response: &Response,
) -> Result<&'static str, StreamError> {
    respond_with(send, response, bytes::Bytes::new()).await
}

/// Sends a response frame and its body; the body goes to quinn as it is
/// (`write_all` would copy it).
async fn respond_with(
    send: &mut quinn::SendStream,
    response: &Response,
    body: bytes::Bytes,
) -> Result<&'static str, StreamError> {
    send.write_all(&response.encode()).await?;
    if !body.is_empty() {
        send.write_chunk(body).await?;
    }
    send.finish()?;
    Ok(result_label(response))
}

/// Answers `Error(code)` and tells the peer to stop sending whatever body it
/// still has in flight.
async fn refuse(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    code: ErrorCode,
) -> Result<&'static str, StreamError> {
    let _ = recv.stop(CODE_REFUSED.into());
    respond(send, &Response::Error(code)).await
}

#[cfg(test)]
mod tests {
    /// A removed node's certificate is refused, by any of the ids it
    /// names; one naming none is refused once any node was removed; a list
    /// that could not be read refuses every node.
    #[test]
    fn removed_nodes_are_refused_and_an_unreadable_list_refuses_all() {
        let denied = super::Denied {
            ids: [3, 9].into_iter().collect(),
            ..super::Denied::default()
        };
        assert!(denied.refuses(&[3]));
        assert!(denied.refuses(&[1, 9]));
        assert!(!denied.refuses(&[1]));
        assert!(denied.refuses(&[]), "a certificate naming no node");
        let none = super::Denied::default();
        assert!(!none.refuses(&[]) && !none.refuses(&[3]));
        let all = super::Denied {
            all: true,
            ..super::Denied::default()
        };
        assert!(all.refuses(&[1]) && all.refuses(&[]));
        assert_eq!(
            crate::tls::node_id_of_name("node-12.custodia.internal"),
            Some(12)
        );
        assert_eq!(
            crate::tls::node_id_of_name("node-012.custodia.internal"),
            None
        );
        assert_eq!(crate::tls::node_id_of_name("node.custodia.internal"), None);
        assert_eq!(
            crate::tls::node_id_of_name("node-0.custodia.internal"),
            Some(0)
        );
    }

    use super::decode_one;
    use reed_solomon_erasure::galois_8::ReedSolomon;

    /// Every shard, from every choice of `k` sources that leaves it out,
    /// decodes to what the encoder made.
    #[test]
    fn one_shard_decodes_from_any_k_others() {
        for (k, m, len) in [
            (4usize, 2usize, 1000usize),
            (2, 1, 7),
            (3, 3, 64),
            (10, 4, 33),
            (2, 2, 0),
        ] {
            let mut shards: Vec<Vec<u8>> = (0..k + m)
                .map(|i| (0..len).map(|b| (b * 31 + i * 7 + b / 5) as u8).collect())
                .collect();
            if len > 0 {
                ReedSolomon::new(k, m).unwrap().encode(&mut shards).unwrap();
            }
            for mask in 0u32..(1 << (k + m)) {
                if mask.count_ones() as usize != k {
                    continue;
                }
                let present: Vec<Option<Vec<u8>>> = (0..k + m)
                    .map(|i| (mask & (1 << i) != 0).then(|| shards[i].clone()))
                    .collect();
                for target in (0..k + m).filter(|t| mask & (1 << t) == 0) {
                    let mut out = vec![0xee; len];
                    decode_one(k, m, &present, target, &mut out).unwrap();
                    assert_eq!(
                        out, shards[target],
                        "RS({k},{m}) sources {mask:b} target {target}"
                    );
                }
                // The target among the sources, or a short output: refused.
                let source = (0..k + m).find(|i| mask & (1 << i) != 0).unwrap();
                assert!(decode_one(k, m, &present, source, &mut vec![0; len]).is_err());
                if let Some(target) = (0..k + m).find(|t| mask & (1 << t) == 0) {
                    assert!(decode_one(k, m, &present, target, &mut vec![0; len + 1]).is_err());
                }
            }
        }
    }

    /// Fewer or more than `k` sources are refused, not decoded wrong.
    #[test]
    fn only_exactly_k_sources_decode() {
        let (k, m, len) = (4, 2, 16);
        let mut shards: Vec<Vec<u8>> = (0..k + m).map(|i| vec![i as u8 + 1; len]).collect();
        ReedSolomon::new(k, m).unwrap().encode(&mut shards).unwrap();
        let mut three: Vec<Option<Vec<u8>>> = shards.iter().cloned().map(Some).collect();
        three[0] = None;
        three[1] = None;
        three[2] = None;
        assert!(decode_one(k, m, &three, 0, &mut vec![0; len]).is_err());
        let mut five: Vec<Option<Vec<u8>>> = shards.iter().cloned().map(Some).collect();
        five[0] = None;
        assert!(decode_one(k, m, &five, 0, &mut vec![0; len]).is_err());
    }
}
