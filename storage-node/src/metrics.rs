//! Prometheus metrics: a storage node's own ([`NodeMetrics`]) and the small
//! HTTP exporter ([`serve_http`]) that every Custodia process uses to expose
//! its registry at `GET /metrics`.
//!
//! Metrics live on a [`Registry`] the caller passes in, never the global one:
//! tests run several nodes in one process, and the binary labels each node's
//! registry with its id. Names carry the `custodia_` prefix and their unit.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus::{
    Encoder as _, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::task::JoinHandle;

/// Latency buckets for one request, in seconds: 100 µs to 30 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// What a storage node counts.
#[derive(Clone, Debug)]
pub struct NodeMetrics {
    /// `custodia_node_requests_total{op, result}`: requests answered, by
    /// operation (put, get, stat, delete, info, bad) and result (ok or the
    /// wire error code's name).
    pub requests: IntCounterVec,
    /// `custodia_node_request_duration_seconds{op}`.
    pub request_seconds: HistogramVec,
    /// `custodia_node_shards_written_total`, fsynced.
    pub shards_written: IntCounter,
    /// `custodia_node_shards_read_total`, verified on the way out.
    pub shards_read: IntCounter,
    /// `custodia_node_shard_bytes_written_total`.
    pub bytes_written: IntCounter,
    /// `custodia_node_shard_bytes_read_total`.
    pub bytes_read: IntCounter,
    /// `custodia_node_corrupt_shards_total`: stored shards whose bytes did
    /// not match their hash, found on read (and quarantined).
    pub corrupt_shards: IntCounter,
    /// `custodia_node_refused_puts_total`: shard puts refused because the
    /// body did not match its hash (nothing stored: damaged in transit or
    /// by the sender, not on this disk).
    pub refused_puts: IntCounter,
    /// `custodia_node_read_memory_waits_total`: shard reads that waited for
    /// memory other reads' bodies held (peers slow to take them).
    pub read_memory_waits: IntCounter,
    /// `custodia_node_capacity_bytes`, `custodia_node_used_bytes`,
    /// `custodia_node_free_bytes`, `custodia_node_shards`: the disk, refreshed
    /// by [`NodeMetrics::set_disk`].
    pub capacity: IntGauge,
    pub used: IntGauge,
    pub free: IntGauge,
    pub shards: IntGauge,
    /// `custodia_node_segment_bytes`: bytes of segment files, dead space
    /// not yet compacted included; `custodia_node_segment_fsyncs_total`:
    /// fsyncs that acknowledged small shards (compare with shards written).
    pub segment_bytes: IntGauge,
    pub segment_fsyncs: IntCounter,
    /// `custodia_node_quic_connections`: open client connections.
    pub connections: IntGauge,
    /// `custodia_node_scrub_shards_total`, `custodia_node_scrub_bytes_total`:
    /// shards and bytes the scrubber re-read and checked.
    pub scrub_shards: IntCounter,
    pub scrub_bytes: IntCounter,
    /// `custodia_node_scrub_corrupt_shards_total`: corruption the scrubber
    /// found (and quarantined).
    pub scrub_corrupt: IntCounter,
    /// `custodia_node_scrub_progress_ratio`: how far the current pass is.
    pub scrub_progress: Gauge,
    /// `custodia_node_scrub_passes_total` and
    /// `custodia_node_scrub_last_pass_timestamp_seconds` (when the last pass
    /// ended, kept across restarts in the data directory; 0 until a node's
    /// first pass ends; alert on `time() - ...`).
    pub scrub_passes: IntCounter,
    pub scrub_last_pass: Gauge,
    /// `custodia_node_scrub_pass_started_timestamp_seconds`: when the pass
    /// under way began (kept across restarts; 0 between passes): a pass
    /// that never ends, a node's first one too, is seen by its age.
    pub scrub_pass_started: Gauge,
    /// `custodia_node_scrub_rate_bytes_per_second`: the configured scrub
    /// rate, 0 when scrubbing is off (a stalled-scrub alert must not fire
    /// on a node that was told not to scrub).
    pub scrub_rate: IntGauge,
    /// `custodia_node_scrub_pass_interval_seconds`: the configured least
    /// time between the starts of two passes (what an overdue pass is
    /// judged against).
    pub scrub_interval: IntGauge,
}

impl NodeMetrics {
    /// Creates the node's metrics on `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = NodeMetrics {
            requests: IntCounterVec::new(
                Opts::new("custodia_node_requests_total", "Requests a storage node answered."),
                &["op", "result"],
            )?,
            request_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "custodia_node_request_duration_seconds",
                    "Time a storage node took to answer a request, body transfer included.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["op"],
            )?,
            shards_written: IntCounter::new(
                "custodia_node_shards_written_total",
                "Shards stored and fsynced.",
            )?,
            shards_read: IntCounter::new(
                "custodia_node_shards_read_total",
                "Shards read and verified.",
            )?,
            bytes_written: IntCounter::new(
                "custodia_node_shard_bytes_written_total",
                "Shard bytes stored and fsynced.",
            )?,
            bytes_read: IntCounter::new(
                "custodia_node_shard_bytes_read_total",
                "Shard bytes read and verified.",
            )?,
            corrupt_shards: IntCounter::new(
                "custodia_node_corrupt_shards_total",
                "Stored shards whose bytes did not match their hash, found on read (quarantined).",
            )?,
            refused_puts: IntCounter::new(
                "custodia_node_refused_puts_total",
                "Shard puts refused because the body did not match its hash (nothing stored).",
            )?,
            read_memory_waits: IntCounter::new(
                "custodia_node_read_memory_waits_total",
                "Shard reads that waited for memory other reads' bodies held.",
            )?,
            capacity: IntGauge::new("custodia_node_capacity_bytes", "Size of the node's disk.")?,
            used: IntGauge::new("custodia_node_used_bytes", "Bytes of shards the node holds.")?,
            free: IntGauge::new("custodia_node_free_bytes", "Free bytes on the node's disk.")?,
            shards: IntGauge::new("custodia_node_shards", "Shards the node holds.")?,
            segment_bytes: IntGauge::new(
                "custodia_node_segment_bytes",
                "Bytes of the segment files small shards are packed into, space not yet compacted included.",
            )?,
            segment_fsyncs: IntCounter::new(
                "custodia_node_segment_fsyncs_total",
                "Fsyncs of segment files; each acknowledges every small shard appended before it.",
            )?,
            connections: IntGauge::new(
                "custodia_node_quic_connections",
                "Open QUIC connections from gateways.",
            )?,
            scrub_shards: IntCounter::new(
                "custodia_node_scrub_shards_total",
                "Shards the scrubber re-read and checked.",
            )?,
            scrub_bytes: IntCounter::new(
                "custodia_node_scrub_bytes_total",
                "Shard bytes the scrubber re-read and checked.",
            )?,
            scrub_corrupt: IntCounter::new(
                "custodia_node_scrub_corrupt_shards_total",
                "Corrupt shards the scrubber found and quarantined.",
            )?,
            scrub_progress: Gauge::new(
                "custodia_node_scrub_progress_ratio",
                "Fraction of the node's shards the current scrub pass has checked.",
            )?,
            scrub_passes: IntCounter::new(
                "custodia_node_scrub_passes_total",
                "Scrub passes completed.",
            )?,
            scrub_rate: IntGauge::new(
                "custodia_node_scrub_rate_bytes_per_second",
                "The configured scrub rate; 0 when scrubbing is off.",
            )?,
            scrub_interval: IntGauge::new(
                "custodia_node_scrub_pass_interval_seconds",
                "The configured least time between the starts of two scrub passes.",
            )?,
            scrub_last_pass: Gauge::new(
                "custodia_node_scrub_last_pass_timestamp_seconds",
                "When the last scrub pass ended (Unix seconds; 0 before the first).",
            )?,
            scrub_pass_started: Gauge::new(
                "custodia_node_scrub_pass_started_timestamp_seconds",
                "When the scrub pass under way began (Unix seconds; 0 between passes).",
            )?,
        };
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.request_seconds.clone()))?;
        registry.register(Box::new(m.shards_written.clone()))?;
        registry.register(Box::new(m.shards_read.clone()))?;
        registry.register(Box::new(m.read_memory_waits.clone()))?;
        registry.register(Box::new(m.bytes_written.clone()))?;
        registry.register(Box::new(m.bytes_read.clone()))?;
        registry.register(Box::new(m.corrupt_shards.clone()))?;
        registry.register(Box::new(m.refused_puts.clone()))?;
        registry.register(Box::new(m.capacity.clone()))?;
        registry.register(Box::new(m.used.clone()))?;
        registry.register(Box::new(m.free.clone()))?;
        registry.register(Box::new(m.shards.clone()))?;
        registry.register(Box::new(m.segment_bytes.clone()))?;
        registry.register(Box::new(m.segment_fsyncs.clone()))?;
        registry.register(Box::new(m.connections.clone()))?;
        registry.register(Box::new(m.scrub_shards.clone()))?;
        registry.register(Box::new(m.scrub_bytes.clone()))?;
        registry.register(Box::new(m.scrub_corrupt.clone()))?;
        registry.register(Box::new(m.scrub_progress.clone()))?;
        registry.register(Box::new(m.scrub_passes.clone()))?;
        registry.register(Box::new(m.scrub_last_pass.clone()))?;
        registry.register(Box::new(m.scrub_pass_started.clone()))?;
        registry.register(Box::new(m.scrub_rate.clone()))?;
        registry.register(Box::new(m.scrub_interval.clone()))?;
        Ok(m)
    }

    /// Records the disk figures the store reports.
    pub fn set_disk(&self, info: &crate::store::StoreInfo) {
        self.capacity.set(clamp(info.capacity_bytes));
        self.used.set(clamp(info.used_bytes));
        self.free.set(clamp(info.free_bytes));
        self.shards.set(clamp(info.shards));
        self.segment_bytes.set(clamp(info.segment_bytes));
        let syncs = info.segment_syncs.saturating_sub(self.segment_fsyncs.get());
        self.segment_fsyncs.inc_by(syncs);
    }
}

/// A u64 as a gauge value (gauges are i64; a disk is never 8 EiB).
pub fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The registry in Prometheus' text exposition format.
pub fn render(registry: &Registry) -> Vec<u8> {
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut out) {
        tracing::warn!(error = %e, "could not encode metrics");
    }
    out
}

/// Serves `registry` at `GET /metrics` on `addr` (plain HTTP/1.1, for
/// Prometheus; no secret is ever a metric). Returns the bound address and
/// the accept loop's task.
pub async fn serve_http(
    addr: SocketAddr,
    registry: Registry,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    // Unauthenticated and often reachable from other hosts (for a
    // Prometheus elsewhere): a bounded number of connections, each with a
    // deadline for its request head and a lifetime, so clients that connect
    // and say nothing cannot take the process's file descriptors, which
    // shard puts need. Bounded per peer address too, and one over either
    // bound is closed at once rather than left unaccepted: otherwise a
    // few well-behaved keep-alive clients on one host could hold every
    // connection, and Prometheus's scrape would wait in the backlog until
    // it timed out (the process "down", and no other alert able to fire).
    let open = Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS));
    let peers: Arc<std::sync::Mutex<HashMap<std::net::IpAddr, usize>>> = Arc::default();
    let task = tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(held) = PeerConnection::take(&peers, peer.ip()) else {
                tracing::debug!(%peer, "metrics connection refused: too many from its address");
                continue;
            };
            let Ok(permit) = open.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "metrics connection refused: too many open");
                continue;
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let registry = registry.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(&req, &registry)) }
                    });
                let io = hyper_util::rt::TokioIo::new(stream);
                let serve = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(METRICS_HEAD_TIMEOUT)
                    .serve_connection(io, service);
                match tokio::time::timeout(METRICS_CONNECTION_LIFETIME, serve).await {
                    Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection ended"),
                    Err(_) => tracing::debug!("metrics connection closed after its lifetime"),
                    Ok(Ok(())) => {}
                }
                drop((permit, held));
            });
        }
    });
    tracing::info!(addr = %local, "metrics at /metrics");
    Ok((local, task))
}

/// Metrics connections open at once; more are closed at once.
const METRICS_CONNECTIONS: usize = 64;
/// Metrics connections open at once from one address.
const METRICS_CONNECTIONS_PER_PEER: usize = 8;

/// One of a peer address's open metrics connections, counted while held.
struct PeerConnection {
    peers: Arc<std::sync::Mutex<HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl PeerConnection {
    /// One more for `ip`, unless it has its share open already.
    fn take(
        peers: &Arc<std::sync::Mutex<HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
    ) -> Option<Self> {
        let mut open = peers.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_default();
        if *n >= METRICS_CONNECTIONS_PER_PEER {
            return None;
        }
        *n += 1;
        Some(PeerConnection {
            peers: peers.clone(),
            ip,
        })
    }
}

impl Drop for PeerConnection {
    fn drop(&mut self) {
        let mut open = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}
/// How long a metrics client has to send its request head.
const METRICS_HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a metrics connection (kept alive between scrapes) lasts.
const METRICS_CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(300);

fn answer<B>(req: &Request<B>, registry: &Registry) -> Response<Full<Bytes>> {
    let (status, body, kind) = match (req.method().as_str(), req.uri().path()) {
        ("GET", "/metrics") => (
            StatusCode::OK,
            render(registry),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        ("GET", _) => (
            StatusCode::NOT_FOUND,
            br#"{"error":"not_found","message":"metrics are at /metrics"}"#.to_vec(),
            "application/json",
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            br#"{"error":"method_not_allowed","message":"GET /metrics"}"#.to_vec(),
            "application/json",
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(kind) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}
