//! The client gateways (and repair, and `custodia up`) use to reach storage
//! nodes.
//!
//! [`NodeClient`] holds one quinn client endpoint and caches one connection per
//! node address, reconnecting when a connection has closed. Each `rpc_*` method
//! opens one bidirectional stream, sends one request and reads one response; it
//! pairs with the server's `handle_*` function of the same name. Failures are a
//! [`NodeError`]; [`NodeError::is_retryable`] tells the caller whether trying
//! again (on this node or another) may help.
//!
//! Timeouts: connecting (waiting for a shared connection included) is bounded by
//! [`ClientTimeouts::connect`], each request by [`ClientTimeouts::request`].

use crate::tls::{self, TlsError, TlsFiles, NODE_SERVER_NAME};
use protocol::code::MAX_SHARD_SIZE;
use protocol::wire::{decode_frame_prefix, NodeInfo, SpaceInfo, FRAME_PREFIX};
use protocol::{DecodeError, ErrorCode, Request, Response, ShardHeader, ShardKey};
use std::collections::HashMap;
use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Why a call to a node failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The node answered with an error code.
    #[error("node refused: {0}")]
    Remote(ErrorCode),
    /// The client's TLS files could not be loaded (only from `NodeClient::new`).
    #[error("client TLS setup: {0}")]
    Tls(#[from] TlsError),
    /// The client's UDP socket could not be bound.
    #[error("binding the client endpoint: {0}")]
    Endpoint(#[source] std::io::Error),
    /// The connection could not even be attempted (e.g. an unusable address).
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The handshake failed (including a certificate either side refused) or
    /// an established connection was lost.
    #[error("connection failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Connecting or the request took longer than its timeout.
    #[error("timed out")]
    Timeout,
    /// A request stalled and the node did not answer a liveness check on the
    /// same connection (a node that died without closing it): the connection
    /// was closed rather than waiting out its idle timeout.
    #[error("the node stopped answering")]
    Unresponsive,
    /// Sending the request or body failed.
    #[error("sending: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading the response failed, or the node ended it early.
    #[error("receiving: {0}")]
    Read(#[from] quinn::ReadExactError),
    /// The request stream was already closed when finishing it.
    #[error("request stream closed early: {0}")]
    Finish(#[from] quinn::ClosedStream),
    /// The node's response frame could not be decoded.
    #[error("bad response frame: {0}")]
    Protocol(#[from] DecodeError),
    /// A well-formed response that does not answer the request: another kind,
    /// a header for another shard, or an impossible body length.
    #[error("unexpected response from the node")]
    UnexpectedResponse,
    /// The caller passed a body whose length differs from `header.len`; nothing
    /// was sent.
    #[error("body is {actual} bytes but the header says {expected}")]
    BodyLength { expected: u32, actual: usize },
    /// The node holds a shard under that key of another length than the
    /// caller's record says (not this shard); nothing of it was read.
    #[error("the node's shard is {held} bytes, not {expected}")]
    ShardLength { expected: u32, held: u32 },
}

impl NodeError {
    /// True when the failure lies with the node or the network rather than the
    /// request, so the same request may succeed later or on another node.
    pub fn is_retryable(&self) -> bool {
        match self {
            NodeError::Remote(code) => matches!(
                code,
                ErrorCode::Io | ErrorCode::DiskFull | ErrorCode::Other(_)
            ),
            NodeError::Connection(_)
            | NodeError::Timeout
            | NodeError::Unresponsive
            | NodeError::Write(_)
            | NodeError::Read(_)
            | NodeError::Finish(_) => true,
            NodeError::Tls(_)
            | NodeError::Endpoint(_)
            | NodeError::Connect(_)
            | NodeError::Protocol(_)
            | NodeError::UnexpectedResponse
            | NodeError::BodyLength { .. }
            | NodeError::ShardLength { .. } => false,
        }
    }

    /// True when the node refused because its disk is at its reserve: it is
    /// up and serving, only out of room for new shards.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, NodeError::Remote(ErrorCode::DiskFull))
    }

    /// True when this client closed the connection (a liveness check failed).
    fn closed_by_us(&self) -> bool {
        use quinn::{ConnectionError::LocallyClosed, ReadError, ReadExactError, WriteError};
        matches!(
            self,
            NodeError::Connection(LocallyClosed)
                | NodeError::Write(WriteError::ConnectionLost(LocallyClosed))
                | NodeError::Read(ReadExactError::ReadError(ReadError::ConnectionLost(
                    LocallyClosed
                )))
        )
    }

    /// True when the connection itself broke, so a cached connection should be
    /// dropped and the request may be retried on a new one.
    fn is_connection_lost(&self) -> bool {
        use quinn::{ReadError, ReadExactError, WriteError};
        matches!(
            self,
            NodeError::Connection(_)
                | NodeError::Write(WriteError::ConnectionLost(_))
                | NodeError::Read(ReadExactError::ReadError(ReadError::ConnectionLost(_)))
        )
    }
}

/// How long a [`NodeClient`] waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientTimeouts {
    /// To get a connection: waiting for one being set up, the QUIC handshake.
    pub connect: Duration,
    /// For one request, from opening its stream to the last response byte.
    pub request: Duration,
    /// A request still running after this long, and again after each such
    /// period, has its node asked on the same connection whether it is
    /// there at all; a node that neither answers nor sends anything else on
    /// the connection within `stall` more is taken for dead and the
    /// connection closed, failing its requests with
    /// [`NodeError::Unresponsive`] at once (a node killed without closing
    /// its connections otherwise holds them until QUIC's idle timeout, and a
    /// filing with them).
    pub stall: Duration,
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        ClientTimeouts {
            connect: Duration::from_secs(5),
            request: Duration::from_secs(30),
            stall: Duration::from_secs(1),
        }
    }
}

/// A connection to one node, shared by all requests to it; the async mutex
/// makes concurrent first requests share one handshake.
type Slot = Arc<tokio::sync::Mutex<Option<quinn::Connection>>>;

/// Talks to storage nodes. Clone it freely: clones share the endpoint and the
/// connections.
#[derive(Clone)]
pub struct NodeClient {
    inner: Arc<Inner>,
}

/// Idle shard receive buffers the client keeps for reuse.
const CLIENT_IDLE_BUFFER_BYTES: usize = 64 << 20;

struct Inner {
    config: quinn::ClientConfig,
    v4: quinn::Endpoint,
    /// Bound on first use: many hosts have no IPv6, and nodes usually listen on
    /// IPv4 only.
    v6: Mutex<Option<quinn::Endpoint>>,
    connections: Mutex<HashMap<SocketAddr, Slot>>,
    /// The name each node's certificate must carry, by address, where it
    /// has one of its own ([`NodeClient::expect_name`]); any other node is
    /// dialled by [`NODE_SERVER_NAME`], which every node's carries.
    names: Mutex<HashMap<SocketAddr, String>>,
    /// The last shard each node said it stored (see
    /// [`NodeClient::last_stored`]).
    stored: Mutex<HashMap<SocketAddr, ShardKey>>,
    timeouts: ClientTimeouts,
    /// Receive buffers for shard bodies; see [`NodeClient::recycle`].
    buffers: Arc<crate::buffers::BufferPool>,
}

impl std::fmt::Debug for NodeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeClient")
            .field("timeouts", &self.inner.timeouts)
            .finish_non_exhaustive()
    }
}

impl NodeClient {
    /// A client presenting the certificate in `tls`, with default timeouts.
    /// Must be called inside a Tokio runtime.
    pub fn new(tls: &TlsFiles) -> Result<Self, NodeError> {
        Self::with_timeouts(tls, ClientTimeouts::default())
    }

    /// A client with explicit timeouts.
    pub fn with_timeouts(tls: &TlsFiles, timeouts: ClientTimeouts) -> Result<Self, NodeError> {
        let config = tls::client_config(tls)?;
        let v4 = crate::udp::endpoint((Ipv4Addr::UNSPECIFIED, 0).into(), None)
            .map_err(NodeError::Endpoint)?;
        Ok(NodeClient {
            inner: Arc::new(Inner {
                config,
                v4,
                v6: Mutex::new(None),
                connections: Mutex::new(HashMap::new()),
                names: Mutex::new(HashMap::new()),
                stored: Mutex::new(HashMap::new()),
                timeouts,
                buffers: Arc::new(crate::buffers::BufferPool::new(CLIENT_IDLE_BUFFER_BYTES)),
            }),
        })
    }

    /// Has the node at `addr` prove it is that node: its certificate must
    /// be issued for `name` (see [`tls::node_server_name`]), not merely for
    /// the name every node shares, so a key stolen from one node cannot
    /// pass for another. Takes effect at the next connection.
    pub fn expect_name(&self, addr: SocketAddr, name: String) {
        self.inner
            .names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr, name);
    }

    /// Stores a shard on the node at `addr`; returns once the node has fsynced
    /// it. Idempotent: putting the same shard again is harmless. QUIC sends
    /// straight from `body` (no copy into its send buffer; it holds the
    /// `Bytes` until the node has acknowledged them): pooled buffers come as
    /// [`BufferPool::share`](crate::buffers::BufferPool::share) makes them.
    pub async fn rpc_put_shard(
        &self,
        addr: SocketAddr,
        header: &ShardHeader,
        body: bytes::Bytes,
    ) -> Result<(), NodeError> {
        if body.len() != header.len as usize {
            return Err(NodeError::BodyLength {
                expected: header.len,
                actual: body.len(),
            });
        }
        let frame = Request::PutShard(*header).encode();
        let (frame, body) = (&frame, &body);
        self.call(addr, |conn| async move {
            let (response, _) = exchange(&conn, frame, body.clone()).await?;
            match response {
                Response::Stored => Ok(()),
                other => Err(unexpected(other)),
            }
        })
        .await?;
        self.inner
            .stored
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr, header.key);
        Ok(())
    }

    /// The last shard the node at `addr` said it stored (durably), through
    /// this client: one it must still hold unless it was deleted since. A
    /// node whose data directory was put back from an older copy (a
    /// snapshot restored: the same disk identity, the shards since gone)
    /// no longer does.
    pub fn last_stored(&self, addr: SocketAddr) -> Option<ShardKey> {
        self.inner
            .stored
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&addr)
            .copied()
    }

    /// Forgets [`last_stored`](Self::last_stored) for `addr` (checked).
    pub fn forget_stored(&self, addr: SocketAddr, key: ShardKey) {
        let mut stored = self.inner.stored.lock().unwrap_or_else(|p| p.into_inner());
        if stored.get(&addr) == Some(&key) {
            stored.remove(&addr);
        }
    }

    /// Hands a shard body from [`rpc_get_shard`](Self::rpc_get_shard) back
    /// for reuse once the caller is done with it (optional: dropping is fine).
    pub fn recycle(&self, body: Vec<u8>) {
        self.inner.buffers.give(body);
    }

    /// A body from [`rpc_get_shard`](Self::rpc_get_shard) as `Bytes`
    /// without a copy, back to the receive pool when the last clone goes.
    pub fn share(&self, body: Vec<u8>) -> bytes::Bytes {
        self.inner.buffers.share(body)
    }

    /// Reads a shard: its stored header (checked to name `key`) and body
    /// (exactly `header.len` bytes). The caller verifies the body's hash against
    /// its manifest; the node has verified it against the header.
    pub async fn rpc_get_shard(
        &self,
        addr: SocketAddr,
        key: ShardKey,
    ) -> Result<(ShardHeader, Vec<u8>), NodeError> {
        self.get_shard(addr, Request::GetShard(key), key, None)
            .await
    }

    /// Reads a shard the caller knows the length of (from its stripe's
    /// record), hashed by its node (`hash`) or not: an answer announcing
    /// any other length is refused before a byte of it is buffered, so a
    /// faulty node cannot make the caller allocate a maximal shard.
    pub async fn rpc_read_shard(
        &self,
        addr: SocketAddr,
        key: ShardKey,
        hash: bool,
        len: u32,
    ) -> Result<(ShardHeader, Vec<u8>), NodeError> {
        if hash {
            return self
                .get_shard(addr, Request::GetShard(key), key, Some(len))
                .await;
        }
        match self
            .get_shard(addr, Request::GetShardUnchecked(key), key, Some(len))
            .await
        {
            Err(NodeError::Remote(ErrorCode::BadRequest)) => {
                self.get_shard(addr, Request::GetShard(key), key, Some(len))
                    .await
            }
            other => other,
        }
    }

    /// As [`rpc_get_shard`](Self::rpc_get_shard), but the node does not hash
    /// the body (it checks the header and the length): for a caller that
    /// hashes every byte itself against the content root, and reads again
    /// with `rpc_get_shard` when that fails so the node finds the damage. A
    /// node too old to know the request is asked with `GetShard` instead.
    pub async fn rpc_get_shard_unchecked(
        &self,
        addr: SocketAddr,
        key: ShardKey,
    ) -> Result<(ShardHeader, Vec<u8>), NodeError> {
        match self
            .get_shard(addr, Request::GetShardUnchecked(key), key, None)
            .await
        {
            Err(NodeError::Remote(ErrorCode::BadRequest)) => self.rpc_get_shard(addr, key).await,
            other => other,
        }
    }

    async fn get_shard(
        &self,
        addr: SocketAddr,
        request: Request,
        key: ShardKey,
        expect_len: Option<u32>,
    ) -> Result<(ShardHeader, Vec<u8>), NodeError> {
        let frame = request.encode();
        let frame = &frame;
        self.call(addr, |conn| async move {
            let (response, mut recv) = exchange(&conn, frame, bytes::Bytes::new()).await?;
            let header = match response {
                Response::Shard(header) => header,
                other => return Err(unexpected(other)),
            };
            if header.key != key
                || header.len > header.code.shard_size
                || header.len > MAX_SHARD_SIZE
            {
                return Err(NodeError::UnexpectedResponse);
            }
            if let Some(expected) = expect_len.filter(|len| header.len != *len) {
                return Err(NodeError::ShardLength {
                    expected,
                    held: header.len,
                });
            }
            // Overwritten in full by the read, or not used.
            let mut body = self.inner.buffers.take(header.len as usize);
            recv.read_exact(&mut body).await?;
            Ok((header, body))
        })
        .await
    }

    /// One request without a body either way; `pick` takes the answer it
    /// expects and hands any other back (an error code becomes
    /// [`NodeError::Remote`]).
    async fn ask<T>(
        &self,
        addr: SocketAddr,
        request: Request,
        pick: impl Fn(Response) -> Result<T, Response>,
    ) -> Result<T, NodeError> {
        let frame = request.encode();
        let (frame, pick) = (&frame, &pick);
        self.call(addr, |conn| async move {
            pick(exchange(&conn, frame, bytes::Bytes::new()).await?.0).map_err(unexpected)
        })
        .await
    }

    /// The stored header of a shard, without its body.
    pub async fn rpc_stat_shard(
        &self,
        addr: SocketAddr,
        key: ShardKey,
    ) -> Result<ShardHeader, NodeError> {
        self.ask(addr, Request::StatShard(key), |r| match r {
            Response::Stat(header) if header.key == key => Ok(header),
            other => Err(other),
        })
        .await
    }

    /// Has the node re-read shard `key` from disk and check its body against
    /// its header; returns the header.
    pub async fn rpc_verify_shard(
        &self,
        addr: SocketAddr,
        key: ShardKey,
    ) -> Result<ShardHeader, NodeError> {
        self.ask(addr, Request::VerifyShard(key), |r| match r {
            Response::Stat(header) if header.key == key => Ok(header),
            other => Err(other),
        })
        .await
    }

    /// Has the node at `addr` build `rebuild.header`'s shard from the k
    /// sources named, read from their nodes, and store it; returns once it
    /// is fsynced. Idempotent, as a put is. A node that could not read a
    /// source, or found one not matching its hash, answers
    /// [`ErrorCode::SourceUnavailable`]; an older node, `BadRequest`.
    pub async fn rpc_rebuild_shard(
        &self,
        addr: SocketAddr,
        rebuild: &protocol::wire::RebuildShard,
    ) -> Result<(), NodeError> {
        self.ask(addr, Request::RebuildShard(rebuild.clone()), |r| match r {
            Response::Stored => Ok(()),
            other => Err(other),
        })
        .await
    }

    /// Deletes a shard; says whether the node had it. (If the connection breaks
    /// mid-call the request is retried, and a delete that had already happened
    /// then reports `false`.)
    pub async fn rpc_delete_shard(
        &self,
        addr: SocketAddr,
        key: ShardKey,
    ) -> Result<bool, NodeError> {
        self.ask(addr, Request::DeleteShard(key), |r| match r {
            Response::Deleted { existed } => Ok(existed),
            other => Err(other),
        })
        .await
    }

    /// Deletes a shard only while the node's wall clock has not passed
    /// `not_after_ms` (see [`Request::DeleteShardBefore`]); says whether
    /// the node had it. Late: `NodeError::Remote(ErrorCode::Late)`, nothing
    /// deleted. A retry after a broken connection is fenced the same way.
    pub async fn rpc_delete_shard_before(
        &self,
        addr: SocketAddr,
        key: ShardKey,
        not_after_ms: u64,
    ) -> Result<bool, NodeError> {
        self.ask(
            addr,
            Request::DeleteShardBefore { key, not_after_ms },
            |r| match r {
                Response::Deleted { existed } => Ok(existed),
                other => Err(other),
            },
        )
        .await
    }

    /// Has the node erase every trace of `evidence`'s shards (an expunge:
    /// see [`Request::EraseEvidence`]); returns how many shards and forensic
    /// copies it removed. Idempotent.
    pub async fn rpc_erase_evidence(
        &self,
        addr: SocketAddr,
        evidence: protocol::EvidenceId,
    ) -> Result<(u64, u64), NodeError> {
        self.ask(addr, Request::EraseEvidence(evidence), |r| match r {
            Response::Erased { shards, copies } => Ok((shards, copies)),
            other => Err(other),
        })
        .await
    }

    /// Has the node serve none of the removed nodes `ids` (added to those it
    /// refuses already), durably; see [`Request::DenyNodes`]. Returns how
    /// many it refuses now.
    pub async fn rpc_deny_nodes(&self, addr: SocketAddr, ids: Vec<u32>) -> Result<u32, NodeError> {
        self.ask(addr, Request::DenyNodes(ids), |r| match r {
            Response::Denied(n) => Ok(n),
            other => Err(other),
        })
        .await
    }

    /// One page of the node's shard headers after `after` (an empty page:
    /// the listing ended).
    pub async fn rpc_list_shards(
        &self,
        addr: SocketAddr,
        after: Option<ShardKey>,
    ) -> Result<Vec<ShardHeader>, NodeError> {
        let request = Request::ListShards {
            after,
            limit: protocol::wire::MAX_LIST,
        };
        self.ask(addr, request, |r| match r {
            Response::Shards(headers) => Ok(headers),
            other => Err(other),
        })
        .await
    }

    /// One page of the keys of shards the node quarantined, after `after`.
    pub async fn rpc_list_quarantined(
        &self,
        addr: SocketAddr,
        after: Option<ShardKey>,
    ) -> Result<Vec<ShardKey>, NodeError> {
        self.ask(addr, Request::ListQuarantined { after }, |r| match r {
            Response::Keys(keys) => Ok(keys),
            other => Err(other),
        })
        .await
    }

    /// The node's clock against ours: (node time − the midpoint of our
    /// request, in ms; the round trip in ms, which bounds the error to ±half).
    pub async fn rpc_clock_offset(&self, addr: SocketAddr) -> Result<(i64, u64), NodeError> {
        let now_ms = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0)
        };
        let (sent, started) = (now_ms(), std::time::Instant::now());
        let node = self
            .ask(addr, Request::Time, |r| match r {
                Response::Time(t) => Ok(t),
                other => Err(other),
            })
            .await?;
        let rtt = started.elapsed().as_millis() as i64;
        // A node's answer is not trusted to fit: a time past i64's range
        // is no time at all.
        let offset = i64::try_from(node)
            .ok()
            .and_then(|node| node.checked_sub(sent.checked_add(rtt / 2)?))
            .ok_or(NodeError::UnexpectedResponse)?;
        Ok((offset, rtt as u64))
    }

    /// The node's free space and the reserve it keeps. A node older than
    /// the request answers `Remote(BadRequest)`.
    pub async fn rpc_space(&self, addr: SocketAddr) -> Result<SpaceInfo, NodeError> {
        self.ask(addr, Request::Space, |r| match r {
            Response::Space(space) => Ok(space),
            other => Err(other),
        })
        .await
    }

    /// The node's identity, capacity and usage.
    pub async fn rpc_node_info(&self, addr: SocketAddr) -> Result<NodeInfo, NodeError> {
        self.ask(addr, Request::NodeInfo, |r| match r {
            Response::Info(info) => Ok(info),
            other => Err(other),
        })
        .await
    }

    /// Runs one request on the connection to `addr`, under the request timeout.
    /// A cached connection that turns out to be dead (the node restarted, say)
    /// is dropped and the request retried once on a fresh one; every request is
    /// idempotent, so the retry is safe.
    async fn call<T, F, Fut>(&self, addr: SocketAddr, request: F) -> Result<T, NodeError>
    where
        F: Fn(quinn::Connection) -> Fut,
        Fut: Future<Output = Result<T, NodeError>>,
    {
        let (conn, fresh) = self.connection(addr).await?;
        match self.timed(addr, &conn, request(conn.clone())).await {
            Err(e) if e.is_connection_lost() && !fresh => {
                tracing::debug!(%addr, error = %e, "cached connection was dead; reconnecting");
                let (conn, _) = self.connection(addr).await?;
                self.timed(addr, &conn, request(conn.clone())).await
            }
            result => result,
        }
    }

    async fn timed<T>(
        &self,
        addr: SocketAddr,
        conn: &quinn::Connection,
        request: impl Future<Output = Result<T, NodeError>>,
    ) -> Result<T, NodeError> {
        let (stall, limit) = (self.inner.timeouts.stall, self.inner.timeouts.request);
        let deadline = tokio::time::Instant::now() + limit;
        tokio::pin!(request);
        // One timer per request (a second per shard request would be a
        // cost the check does not need): it fires at each stall, when the
        // node is checked, and at the request's own limit.
        let timer = tokio::time::sleep(stall.min(limit));
        tokio::pin!(timer);
        let result = loop {
            // The answer first: one that arrived while this future was not
            // polled (its caller busy) is no timeout.
            tokio::select! {
                biased;
                result = &mut request => break result,
                () = &mut timer => {
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        break Err(NodeError::Timeout);
                    }
                    // The request is still polled while its node is asked,
                    // and no longer than the request's own limit.
                    let check = tokio::time::timeout_at(deadline, answers(conn, stall));
                    tokio::pin!(check);
                    tokio::select! {
                        biased;
                        result = &mut request => break result,
                        alive = &mut check => match alive {
                            Err(_) => break Err(NodeError::Timeout),
                            Ok(false) => {
                                give_up(addr, conn);
                                break Err(NodeError::Unresponsive);
                            }
                            Ok(true) => {}
                        }
                    }
                    // Checked again at the next stall: a node may die while
                    // a long request runs.
                    timer.as_mut().reset((tokio::time::Instant::now() + stall).min(deadline));
                }
            }
        };
        // Requests that shared the connection another request's watch closed
        // fail the same way (not as a lost connection worth a reconnect).
        let result = result.map_err(|e| {
            if e.closed_by_us() {
                NodeError::Unresponsive
            } else {
                e
            }
        });
        if let Err(e) = &result {
            // A request that times out may be on a connection to a node that
            // died without closing it; the next request should not wait for
            // the idle timeout to find out.
            if e.is_connection_lost() || matches!(e, NodeError::Timeout | NodeError::Unresponsive) {
                self.forget(addr, conn).await;
            }
        }
        result
    }

    /// The cached connection to `addr`, or a new one; says whether it is new.
    async fn connection(&self, addr: SocketAddr) -> Result<(quinn::Connection, bool), NodeError> {
        let slot = self.slot(addr);
        let connect = async {
            let mut cached = slot.lock().await;
            if let Some(conn) = cached.as_ref() {
                if conn.close_reason().is_none() {
                    return Ok((conn.clone(), false));
                }
            }
            let endpoint = self.endpoint_for(addr)?;
            let name = self
                .inner
                .names
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&addr)
                .cloned();
            let name = name.as_deref().unwrap_or(NODE_SERVER_NAME);
            let conn = endpoint
                .connect_with(self.inner.config.clone(), addr, name)?
                .await?;
            tracing::debug!(%addr, "connected to node");
            *cached = Some(conn.clone());
            Ok((conn, true))
        };
        // Waiting behind another caller's handshake counts too, so requests to
        // a dead node all fail within the connect timeout instead of queueing.
        tokio::time::timeout(self.inner.timeouts.connect, connect)
            .await
            .unwrap_or(Err(NodeError::Timeout))
    }

    /// Whether the node at `addr` answers on the open connection to it
    /// within the stall timeout; a node that does not has that connection
    /// closed (failing whatever else waits on it, as a stalled request's own
    /// check would). True when no connection is open: nothing is waiting.
    pub async fn check_alive(&self, addr: SocketAddr) -> bool {
        let slot = self.slot(addr);
        let conn = match slot.try_lock() {
            Ok(cached) => cached
                .as_ref()
                .filter(|c| c.close_reason().is_none())
                .cloned(),
            // A handshake is under way: the connect timeout covers it.
            Err(_) => None,
        };
        let Some(conn) = conn else { return true };
        if answers(&conn, self.inner.timeouts.stall).await {
            return true;
        }
        give_up(addr, &conn);
        self.forget(addr, &conn).await;
        false
    }

    /// Drops the cached connection to `addr` if it is still `conn`.
    async fn forget(&self, addr: SocketAddr, conn: &quinn::Connection) {
        let slot = self.slot(addr);
        let mut cached = slot.lock().await;
        if cached.as_ref().map(|c| c.stable_id()) == Some(conn.stable_id()) {
            *cached = None;
        }
    }

    /// The open connections and their smoothed round-trip times (for
    /// metrics; a connection busy handshaking is skipped).
    pub fn connection_rtts(&self) -> Vec<(SocketAddr, Duration)> {
        let map = self
            .inner
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.iter()
            .filter_map(|(addr, slot)| {
                let cached = slot.try_lock().ok()?;
                let conn = cached.as_ref()?;
                conn.close_reason().is_none().then(|| (*addr, conn.rtt()))
            })
            .collect()
    }

    fn slot(&self, addr: SocketAddr) -> Slot {
        let mut map = self
            .inner
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.entry(addr).or_default().clone()
    }

    fn endpoint_for(&self, addr: SocketAddr) -> Result<quinn::Endpoint, NodeError> {
        if addr.is_ipv4() {
            return Ok(self.inner.v4.clone());
        }
        let mut v6 = self.inner.v6.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(endpoint) = v6.as_ref() {
            return Ok(endpoint.clone());
        }
        let endpoint = crate::udp::endpoint((Ipv6Addr::UNSPECIFIED, 0).into(), None)
            .map_err(NodeError::Endpoint)?;
        *v6 = Some(endpoint.clone());
        Ok(endpoint)
    }
}

/// Sends one request frame (and body) on a new stream and reads the response
/// frame; returns the stream so a `Shard` body can be read from it. If sending
/// fails, the node may still have answered (it stops reading a request it
/// refuses), and its answer is the better error.
async fn exchange(
    conn: &quinn::Connection,
    frame: &[u8],
    body: bytes::Bytes,
) -> Result<(Response, quinn::RecvStream), NodeError> {
    exchange_on(conn.open_bi().await?, frame, body).await
}

/// [`exchange`] on a stream already opened.
async fn exchange_on(
    (mut send, mut recv): (quinn::SendStream, quinn::RecvStream),
    frame: &[u8],
    body: bytes::Bytes,
) -> Result<(Response, quinn::RecvStream), NodeError> {
    let sent = async {
        send.write_all(frame).await?;
        if !body.is_empty() {
            send.write_chunk(body).await?;
        }
        send.finish()?;
        Ok::<(), NodeError>(())
    }
    .await;
    match read_response(&mut recv).await {
        Ok(Response::Error(code)) => Err(NodeError::Remote(code)),
        Ok(response) => match sent {
            Ok(()) => Ok((response, recv)),
            Err(e) => Err(e),
        },
        Err(read_error) => Err(sent.err().unwrap_or(read_error)),
    }
}

/// Whether the node at the other end of `conn` shows it is there within
/// `within`: it answers a clock request of our own (any answer will do, an
/// error code from a node too old to know the request included), or the
/// connection receives anything meanwhile (a node busy enough that our
/// request waits for a stream still acknowledges and answers the others).
///
/// When every stream the node allows the connection already holds a
/// request of ours (a busy node, a disk pausing while hundreds of puts
/// wait for their fsync), no request can be sent: nothing of ours awaits
/// an acknowledgement, and the connection hears only the answers to its
/// keep-alives, one each [`crate::tls::KEEP_ALIVE`]. It waits that long
/// more for one then, rather than calling a node gone that is only busy
/// (and failing all its requests with it).
async fn answers(conn: &quinn::Connection, within: Duration) -> bool {
    let received = conn.stats().udp_rx.datagrams;
    let heard = || conn.stats().udp_rx.datagrams > received;
    let frame = Request::Time.encode();
    let stream = match futures::FutureExt::now_or_never(conn.open_bi()) {
        Some(Ok(stream)) => stream,
        Some(Err(_)) => return false,
        None => {
            let deadline = tokio::time::Instant::now() + crate::tls::KEEP_ALIVE + within;
            while tokio::time::Instant::now() < deadline {
                if heard() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            return heard();
        }
    };
    let ask = exchange_on(stream, &frame, bytes::Bytes::new());
    match tokio::time::timeout(within, ask).await {
        Ok(Ok(_) | Err(NodeError::Remote(_))) => true,
        _ => heard(),
    }
}

/// Gives up on a connection whose node did not show it is there: closes it,
/// so every request on it fails at once (as [`NodeError::Unresponsive`]).
fn give_up(addr: SocketAddr, conn: &quinn::Connection) {
    tracing::warn!(%addr, "the node did not answer a liveness check; closing the connection");
    conn.close(quinn::VarInt::from_u32(2), b"no answer to a liveness check");
}

async fn read_response(recv: &mut quinn::RecvStream) -> Result<Response, NodeError> {
    let mut prefix = [0u8; FRAME_PREFIX];
    recv.read_exact(&mut prefix).await?;
    let len = decode_frame_prefix(&prefix)?;
    let mut frame = vec![0u8; len];
    recv.read_exact(&mut frame).await?;
    Ok(Response::decode_body(&frame)?)
}

fn unexpected(response: Response) -> NodeError {
    match response {
        Response::Error(code) => NodeError::Remote(code),
        _ => NodeError::UnexpectedResponse,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>(_: &T) {}
    fn assert_error<E: std::error::Error + Send + Sync + 'static>() {}

    /// Gateways spawn these calls on a multi-threaded runtime and wrap errors in
    /// `anyhow`; a non-`Send` future or error type would only show up there.
    #[allow(dead_code, unused_must_use)]
    fn futures_and_errors_are_send(
        client: &NodeClient,
        addr: SocketAddr,
        header: &ShardHeader,
        key: ShardKey,
        config: crate::server::NodeConfig,
    ) {
        assert_send(&client.rpc_put_shard(addr, header, bytes::Bytes::new()));
        assert_send(&client.rpc_get_shard(addr, key));
        assert_send(&client.rpc_stat_shard(addr, key));
        assert_send(&client.rpc_delete_shard(addr, key));
        assert_send(&client.rpc_node_info(addr));
        assert_error::<NodeError>();
        assert_error::<crate::server::NodeServerError>();
        assert_error::<crate::store::StoreError>();
        assert_error::<crate::tls::TlsError>();
        let registry = prometheus::Registry::new();
        assert_send(&crate::server::serve(config, &registry));
    }

    #[test]
    fn retryability_follows_the_cause() {
        assert!(NodeError::Timeout.is_retryable());
        assert!(NodeError::Remote(ErrorCode::Io).is_retryable());
        assert!(NodeError::Remote(ErrorCode::DiskFull).is_retryable());
        assert!(!NodeError::Remote(ErrorCode::HashMismatch).is_retryable());
        assert!(!NodeError::Remote(ErrorCode::BadRequest).is_retryable());
        assert!(!NodeError::UnexpectedResponse.is_retryable());
        assert!(!NodeError::Protocol(DecodeError::Malformed).is_retryable());
    }
}
