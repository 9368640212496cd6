//! The gateway's Prometheus metrics, on a registry the caller passes in (see
//! `storage_node::metrics` for the exporter and the conventions).
//!
//! Counters are bumped where the work happens; gauges that describe the
//! cluster (nodes, degraded stripes, ledger) are refreshed by
//! [`spawn_refresher`] from the gateway's own view and the index, so a scrape
//! never touches the index or a node.

use crate::api::{Gateway, Store};
use prometheus::{
    Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage_node::metrics::{clamp, LATENCY_BUCKETS};

/// Longest the degraded-stripe count walks the index; beyond it the gauge
/// says "at least this many".
const DEGRADED_SCAN_LIMIT: usize = 100_000;
/// The same for the lost-stripe count, read [`LOST_SCAN_BATCH`] marks a
/// transaction.
const LOST_SCAN_LIMIT: usize = 100_000;
const LOST_SCAN_BATCH: usize = 10_000;
/// Request durations: a filing's response head comes after its whole body,
/// so large uploads take minutes, up to an hour for a 10 GiB video on a
/// slow link.
fn http_buckets() -> Vec<f64> {
    let mut b = LATENCY_BUCKETS.to_vec();
    b.extend_from_slice(&[60.0, 300.0, 900.0, 3600.0]);
    b
}

/// How often the cluster gauges are refreshed.
const REFRESH: Duration = Duration::from_secs(5);

/// Everything the gateway counts.
#[derive(Clone, Debug)]
pub struct GatewayMetrics {
    /// `custodia_http_requests_total{api, route, status}`: `api` is
    /// `evidence` or `s3`; `route` the matched route (S3: the method);
    /// `status` the response's, or `499` for a request whose client left
    /// before the response head (see [`HttpRequest`]).
    pub http_requests: IntCounterVec,
    /// `custodia_http_request_duration_seconds{api, route}`, until the
    /// response head (bodies stream after), or until the client left.
    pub http_seconds: HistogramVec,
    /// `custodia_ingest_bytes_total`: evidence bytes clients sent and the
    /// cluster filed (S3 and its parts included; not what a copy or a
    /// multipart completion files again from stored bytes).
    pub ingest_bytes: IntCounter,
    /// `custodia_received_bytes_total`: body bytes of filings (S3 parts
    /// included) as they arrive, whether or not their filing commits: what
    /// an upload of hours shows as it comes, where `ingest_bytes` counts it
    /// all at its commit (and never, if it fails).
    pub received_bytes: IntCounter,
    /// `custodia_filings_total`: filings committed (S3 parts excluded).
    pub filings: IntCounter,
    /// `custodia_read_bytes_total`: evidence bytes served to clients, each once its
    /// 1 MiB group matched the Bao outboard (or, for evidence whose
    /// outboard is being rebuilt, once its shards matched the manifest; the
    /// root is checked as the read streams).
    pub read_bytes: IntCounter,
    /// `custodia_ledger_archive_gap_leaves`: leaves up to the newest signed
    /// checkpoint that the openings archive lacks (0: complete), as last
    /// checked; `custodia_ledger_archive_checked_timestamp_seconds`: when;
    /// `custodia_ledger_archive_check_interval_seconds`: how often it is
    /// to be, 0 with no ledger or checks turned off (a check that stops,
    /// say on a credential that may write but not list, leaves the gap at
    /// its last figure, 0 if none).
    pub archive_gap: IntGauge,
    pub archive_checked: IntGauge,
    pub archive_check_interval: IntGauge,
    /// `custodia_reads_failed_total{reason}`: reads of evidence (clients'
    /// and the cluster's own: copies, multipart completions) that failed,
    /// however far they got: `unrecoverable` (a stripe short of good
    /// shards), `root_mismatch` (content not matching its root even from
    /// checked shards: the index and the shards disagree), `bad_outboard`,
    /// `index`, `expunged` (during the read), `internal`. A failure after
    /// the answer's head is a 200 in `http_requests`, and a cut-off body.
    pub reads_failed: IntCounterVec,
    /// `custodia_shards_written_total`: shards fsynced on a node.
    pub shards_written: IntCounter,
    /// `custodia_shards_read_total`: shards fetched and verified for reads.
    pub shards_read: IntCounter,
    /// `custodia_shards_damaged_total`: shards a read found missing or corrupt.
    pub shards_damaged: IntCounter,
    /// `custodia_stripes_reconstructed_total`: stripes a read rebuilt from parity.
    pub stripes_reconstructed: IntCounter,
    /// `custodia_ingest_memory_waits_total`: stripes that waited for the
    /// gateway's ingest memory (`ingest_memory_mib`) held by other uploads.
    pub ingest_memory_waits: IntCounter,
    /// `custodia_read_memory_waits_total`: stripes a read waited to fetch
    /// while other reads' read-ahead held the gateway's read memory
    /// (`read_memory_mib`).
    pub read_memory_waits: IntCounter,
    /// `custodia_gateway_memory_held_bytes{budget}` and
    /// `custodia_gateway_memory_budget_bytes{budget}`: what each of the
    /// gateway's memory budgets (`receive`: stripes uploads are filling;
    /// `ingest`: stripes being coded and stored; `read`: stripes read
    /// ahead) holds now, and its size.
    pub memory_held: IntGaugeVec,
    pub memory_budget: IntGaugeVec,
    /// `custodia_degraded_stripes_written_total`: stripes acknowledged with
    /// fewer than k+m shards (allowed by `min_write_shards`).
    pub degraded_written: IntCounter,
    /// `custodia_shards_repaired_total`: shards rebuilt, written, re-read and
    /// committed by repair.
    pub shards_repaired: IntCounter,
    /// `custodia_stripes_lost_total`: stripes found with fewer than k shards
    /// (counted once, when first marked lost).
    pub stripes_lost: IntCounter,
    /// `custodia_lost_stripes`: stripes marked lost in the index now (their
    /// evidence cannot be read whole until k good shards are back), counted
    /// up to [`LOST_SCAN_LIMIT`] (100,000).
    pub lost: IntGauge,
    /// `custodia_repair_scanned_stripes_total`: stripe records the repair
    /// scanner (and `custodia repair`'s walks) read looking for stripes to
    /// queue: the index load they make.
    pub repair_scanned: IntCounter,
    /// `custodia_degraded_stripes`: stripes waiting for repair (the backlog),
    /// counted up to [`DEGRADED_SCAN_LIMIT`] (100,000): at that figure it
    /// means "at least", and an alert says so.
    pub degraded: IntGauge,
    /// `custodia_stripe_counts_timestamp_seconds`: when `degraded` and
    /// `lost` were last both read from the index (the gateway's start until
    /// then). While the index cannot be read they keep their last values,
    /// often 0, and the alerts on them cannot fire: this ages instead.
    pub stripes_counted: Gauge,
    /// `custodia_ledger_entries`: size of the newest signed checkpoint.
    pub ledger_entries: IntGauge,
    /// `custodia_ledger_entries_integrated_total`: entries this gateway's
    /// integrator added to the tree (summed over gateways: the ledger's
    /// growth, whichever holds the integrator's lease).
    pub entries_integrated: IntCounter,
    /// `custodia_ledger_integrated_timestamp_seconds`: when a signed
    /// checkpoint last covered every entry waiting (the integrator checks
    /// each second, idle or not), so
    /// `time() - custodia_ledger_integrated_timestamp_seconds` is how far
    /// behind notarization is, and stays small on an idle ledger. Only the
    /// integrator sets it, and only gateways with a ledger export it, so
    /// the cluster's is the `max` over gateways. Exported from when this
    /// gateway first holds the integrator's lease ([`LateGauge`]), set to
    /// that moment until its first checkpoint: never 0 (which would read
    /// as "55 years behind"), never a time from a gateway that does not
    /// integrate, and a first checkpoint that never comes still ages and
    /// pages.
    pub checkpoint_time: LateGauge,
    /// `custodia_s3_journal_synced_timestamp_seconds`: when the last drain
    /// of the S3 records' journal that left nothing behind began
    /// (`crate::s3_journal`): every S3 record change committed before then
    /// is in the archive `recover-index` replays. Exported only by gateways
    /// with a ledger (without one there is no archive). Starts at the
    /// gateway's start, as `checkpoint_time` does (the first drain waits
    /// for the seed, which may take long on an index written before
    /// records were journaled).
    pub s3_journal_synced: Gauge,
    /// Witnesses that cosigned the newest checkpoint any witness cosigned
    /// (`custodia_ledger_checkpoint_cosignatures`), that checkpoint's size
    /// (`custodia_ledger_cosigned_entries`), and the number of witnesses
    /// configured (`custodia_ledger_witness_quorum`; the verifier's default
    /// quorum is all of them).
    pub cosignatures: IntGauge,
    pub cosigned_entries: IntGauge,
    pub witness_quorum: IntGauge,
    /// `custodia_witness_cosign_duration_seconds{witness, result}`.
    pub cosign_seconds: HistogramVec,
    /// `custodia_witness_inconsistent_total{witness}`: answers by which a
    /// witness showed it holds another tree than ours (it refused our
    /// consistency proof from its size, or holds another tree of our
    /// size): this log may have forked.
    pub witness_inconsistent: IntCounterVec,
    /// `custodia_cluster_node_up{node, domain}` and the node's disk as the
    /// gateway last saw it: `custodia_cluster_node_{capacity,used,free}_bytes{node}`.
    pub node_up: IntGaugeVec,
    pub node_capacity: IntGaugeVec,
    pub node_used: IntGaugeVec,
    pub node_free: IntGaugeVec,
    pub node_reserve: IntGaugeVec,
    pub node_full: IntGaugeVec,
    pub node_writes_failing: IntGaugeVec,
    pub node_write_failures: IntCounterVec,
    /// `custodia_quic_connections`: open connections to nodes;
    /// `custodia_quic_rtt_seconds{node}`: each one's smoothed RTT.
    pub quic_connections: IntGauge,
    pub quic_rtt: prometheus::GaugeVec,
    /// `custodia_node_clock_offset_seconds{node}`: a node's clock minus the
    /// gateway's, measured at each probe (error within half the RTT).
    pub node_clock_offset: prometheus::GaugeVec,
    /// `custodia_tsa_clock_offset_seconds`: the RFC 3161 TSA's genTime minus
    /// the gateway's clock at the newest token (whole seconds).
    pub tsa_clock_offset: prometheus::Gauge,
    /// `custodia_witness_clock_offset_seconds{witness}`: the time a witness
    /// dated its newest cosignature minus the gateway's stamping clock as
    /// it arrived (whole seconds; a little below 0 when both are right).
    /// Well below 0, statements are stamped after the witness cosigned
    /// their checkpoints, which `custodia verify` warns of.
    pub witness_clock_offset: prometheus::GaugeVec,
    /// `custodia_tsa_stamps_total{result="ok"|"failed"}`: time-stamp tokens
    /// obtained (and verified, and stored) for checkpoints, and attempts that
    /// failed (the TSA unreachable, its certificate expired, its answer not
    /// verifying). Receipts carry no token while it fails.
    pub tsa_stamps: IntCounterVec,
    /// `custodia_compliance_clock_offset_seconds`: the compliance clock
    /// (which retention is judged by) minus the system clock. Negative: it
    /// lags (time no gateway ran, not yet confirmed); positive: the system
    /// clock was stepped back.
    pub compliance_clock_offset: prometheus::Gauge,
    /// `custodia_orphan_shards_deleted_total` and
    /// `custodia_orphan_shards_pending` (unreferenced, within their grace).
    pub orphans_deleted: IntCounter,
    pub orphans_pending: IntGauge,
    /// `custodia_orphan_sweep_refused`: 1 while the orphan sweep refuses to
    /// delete (shards of more evidence than `orphan_sweep_max_evidence`
    /// unknown to the index: it may be behind the nodes).
    pub orphan_sweep_refused: IntGauge,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: T,
) -> Result<T, prometheus::Error> {
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

/// An HTTP method as a label: the standard ones by name, any other as
/// `other` (a method is any token a client sends).
pub fn method_label(m: &http::Method) -> &'static str {
    match *m {
        http::Method::GET => "GET",
        http::Method::PUT => "PUT",
        http::Method::POST => "POST",
        http::Method::HEAD => "HEAD",
        http::Method::DELETE => "DELETE",
        http::Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Registers `metric` only when `on`: a gauge that would never be set is
/// better absent than a constant 0 an alert reads as "long ago".
fn reg_if<T: prometheus::core::Collector + Clone + 'static>(
    on: bool,
    registry: &Registry,
    metric: T,
) -> Result<T, prometheus::Error> {
    if on {
        reg(registry, metric)
    } else {
        Ok(metric)
    }
}

/// A timestamp gauge exported only from its first value on (see
/// [`GatewayMetrics::checkpoint_time`]); a placeholder value
/// ([`LateGauge::start_at`]) is told apart from a real one
/// ([`LateGauge::known`]).
#[derive(Clone, Debug)]
pub struct LateGauge {
    gauge: Gauge,
    /// Where it goes at its first value; `None`: never exported.
    registry: Option<Registry>,
    registered: Arc<std::sync::OnceLock<()>>,
    known: Arc<std::sync::atomic::AtomicBool>,
}

impl LateGauge {
    /// `gauge`, to be registered on `registry` at its first value if `on`.
    fn new(on: bool, registry: &Registry, gauge: Gauge) -> Self {
        LateGauge {
            gauge,
            registry: on.then(|| registry.clone()),
            registered: Arc::default(),
            known: Arc::default(),
        }
    }

    fn export(&self) {
        if let Some(r) = &self.registry {
            self.registered.get_or_init(|| {
                if let Err(e) = r.register(Box::new(self.gauge.clone())) {
                    tracing::warn!(error = %e, "could not export a gauge");
                }
            });
        }
    }

    /// A real value.
    pub fn set(&self, v: f64) {
        self.gauge.set(v);
        self.known.store(true, std::sync::atomic::Ordering::Relaxed);
        self.export();
    }

    /// Exported as `v` until a real value comes, if none has yet.
    pub fn start_at(&self, v: f64) {
        if !self.known.load(std::sync::atomic::Ordering::Relaxed) && self.gauge.get() == 0.0 {
            self.gauge.set(v);
            self.export();
        }
    }

    /// The real value, once there is one.
    pub fn known(&self) -> Option<f64> {
        self.known
            .load(std::sync::atomic::Ordering::Relaxed)
            .then(|| self.gauge.get())
    }
}

/// A timestamp gauge set to now (the gateway's start) until its first
/// real value: exported as 0 it would read as "55 years ago", and left out
/// until set, a checkpoint or journal drain that never comes after a
/// restart would never page.
fn since_start(g: Gauge) -> Gauge {
    g.set(crate::ledger::unix_now_secs_f64());
    g
}

impl GatewayMetrics {
    /// `ledger`: whether this gateway runs one (the ledger's gauges are
    /// exported only then); `tsa`: whether that ledger has a time-stamping
    /// authority (its clock offset is exported only then).
    pub fn new(r: &Registry, ledger: bool, tsa: bool) -> Result<Self, prometheus::Error> {
        let counter = |name: &str, help: &str| reg(r, IntCounter::new(name, help)?);
        let gauge = |name: &str, help: &str| reg(r, IntGauge::new(name, help)?);
        let node_gauge =
            |name: &str, help: &str| reg(r, IntGaugeVec::new(Opts::new(name, help), &["node"])?);
        let m = GatewayMetrics {
            http_requests: reg(
                r,
                IntCounterVec::new(
                    Opts::new("custodia_http_requests_total", "HTTP requests answered."),
                    &["api", "route", "status"],
                )?,
            )?,
            http_seconds: reg(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "custodia_http_request_duration_seconds",
                        "Time to the response head of an HTTP request.",
                    )
                    .buckets(http_buckets()),
                    &["api", "route"],
                )?,
            )?,
            ingest_bytes: counter("custodia_ingest_bytes_total", "Evidence bytes filed.")?,
            received_bytes: counter(
                "custodia_received_bytes_total",
                "Filings' body bytes as they arrive from clients, committed or not.",
            )?,
            filings: counter("custodia_filings_total", "Filings committed.")?,
            read_bytes: counter("custodia_read_bytes_total", "Evidence bytes served.")?,
            archive_gap: gauge(
                "custodia_ledger_archive_gap_leaves",
                "Leaves up to the newest signed checkpoint the openings archive lacks (0: complete), as last checked.",
            )?,
            archive_checked: gauge(
                "custodia_ledger_archive_checked_timestamp_seconds",
                "When the openings archive was last checked (Unix seconds; 0: not yet).",
            )?,
            archive_check_interval: gauge(
                "custodia_ledger_archive_check_interval_seconds",
                "How often the gateway integrating the ledger checks the openings archive (0: no ledger, or checks turned off).",
            )?,
            reads_failed: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "custodia_reads_failed_total",
                        "Reads of evidence that failed, however far they got, by reason.",
                    ),
                    &["reason"],
                )?,
            )?,
            shards_written: counter(
                "custodia_shards_written_total",
                "Shards written and fsynced on nodes.",
            )?,
            shards_read: counter(
                "custodia_shards_read_total",
                "Shards fetched and verified for reads.",
            )?,
            shards_damaged: counter(
                "custodia_shards_damaged_total",
                "Shards a read found missing or corrupt.",
            )?,
            stripes_reconstructed: counter(
                "custodia_stripes_reconstructed_total",
                "Stripes a read rebuilt from parity.",
            )?,
            ingest_memory_waits: counter(
                "custodia_ingest_memory_waits_total",
                "Stripes that waited for ingest memory other uploads held.",
            )?,
            read_memory_waits: counter(
                "custodia_read_memory_waits_total",
                "Stripes a read waited to fetch for read memory other reads held.",
            )?,
            degraded_written: counter(
                "custodia_degraded_stripes_written_total",
                "Stripes acknowledged with fewer than k+m shards.",
            )?,
            shards_repaired: counter(
                "custodia_shards_repaired_total",
                "Shards rebuilt, written, re-read and committed by repair.",
            )?,
            stripes_lost: counter(
                "custodia_stripes_lost_total",
                "Stripes found with fewer than k good shards.",
            )?,
            lost: gauge(
                "custodia_lost_stripes",
                "Stripes marked lost now: fewer than k good shards (counted up to 100000).",
            )?,
            repair_scanned: counter(
                "custodia_repair_scanned_stripes_total",
                "Stripe records read by the repair scanner looking for stripes to queue.",
            )?,
            degraded: gauge(
                "custodia_degraded_stripes",
                "Stripes waiting for repair (counted up to 100000: at least that many then).",
            )?,
            stripes_counted: reg(
                r,
                since_start(Gauge::new(
                    "custodia_stripe_counts_timestamp_seconds",
                    "When the degraded and lost stripe counts were last read from the index \
                     (Unix seconds; the gateway's start until then).",
                )?),
            )?,
            ledger_entries: gauge(
                "custodia_ledger_entries",
                "Entries covered by the newest signed checkpoint.",
            )?,
            entries_integrated: counter(
                "custodia_ledger_entries_integrated_total",
                "Ledger entries this gateway integrated into the tree.",
            )?,
            checkpoint_time: LateGauge::new(
                ledger,
                r,
                Gauge::new(
                    "custodia_ledger_integrated_timestamp_seconds",
                    "When a signed checkpoint last covered every waiting entry (Unix seconds; \
                     from when this gateway took the integrator's lease until then).",
                )?,
            ),
            s3_journal_synced: reg_if(
                ledger,
                r,
                since_start(Gauge::new(
                    "custodia_s3_journal_synced_timestamp_seconds",
                    "When the S3 records' journal was last archived whole (Unix seconds; the \
                     gateway's start until then).",
                )?),
            )?,
            cosigned_entries: gauge(
                "custodia_ledger_cosigned_entries",
                "Size of the newest checkpoint a witness cosigned.",
            )?,
            cosignatures: gauge(
                "custodia_ledger_checkpoint_cosignatures",
                "Witness cosignatures gathered on the newest cosigned checkpoint.",
            )?,
            witness_quorum: gauge(
                "custodia_ledger_witness_quorum",
                "Witness cosignatures the operator requires.",
            )?,
            cosign_seconds: reg(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "custodia_witness_cosign_duration_seconds",
                        "Time a witness took to answer add-checkpoint.",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                    &["witness", "result"],
                )?,
            )?,
            node_write_failures: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "custodia_cluster_node_write_failures_total",
                        "Spells of shard writes to a node failing for its disk (an I/O error, not a full disk or a lost connection): failures less than two minutes after the last are one spell.",
                    ),
                    &["node"],
                )?,
            )?,
            witness_inconsistent: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "custodia_witness_inconsistent_total",
                        "Answers showing a witness holds another tree than this log's: it may have forked.",
                    ),
                    &["witness"],
                )?,
            )?,
            memory_held: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "custodia_gateway_memory_held_bytes",
                        "Memory a gateway budget holds now.",
                    ),
                    &["budget"],
                )?,
            )?,
            memory_budget: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "custodia_gateway_memory_budget_bytes",
                        "The size of a gateway memory budget.",
                    ),
                    &["budget"],
                )?,
            )?,
            node_up: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "custodia_cluster_node_up",
                        "1 when the node answered the gateway's last probe.",
                    ),
                    &["node", "domain"],
                )?,
            )?,
            node_capacity: node_gauge(
                "custodia_cluster_node_capacity_bytes",
                "A node's disk size, as last reported to the gateway.",
            )?,
            node_used: node_gauge(
                "custodia_cluster_node_used_bytes",
                "A node's shard bytes, as last reported to the gateway.",
            )?,
            node_free: node_gauge(
                "custodia_cluster_node_free_bytes",
                "A node's free bytes, as last reported to the gateway.",
            )?,
            node_reserve: node_gauge(
                "custodia_cluster_node_reserve_bytes",
                "Free bytes a node keeps for deletes and compaction: it refuses new shards that would leave less.",
            )?,
            node_full: node_gauge(
                "custodia_cluster_node_full",
                "1 while a node takes no new shards because its free space is within its reserve.",
            )?,
            node_writes_failing: node_gauge(
                "custodia_cluster_node_writes_failing",
                "1 while a node passes over new shards and rebuilds because its disk failed a write in the last two minutes.",
            )?,
            quic_connections: gauge(
                "custodia_quic_connections",
                "Open QUIC connections from the gateway to nodes.",
            )?,
            quic_rtt: reg(
                r,
                prometheus::GaugeVec::new(
                    Opts::new(
                        "custodia_quic_rtt_seconds",
                        "Smoothed round-trip time of the connection to a node.",
                    ),
                    &["node"],
                )?,
            )?,
            node_clock_offset: reg(
                r,
                prometheus::GaugeVec::new(
                    Opts::new(
                        "custodia_node_clock_offset_seconds",
                        "A node's clock minus the gateway's, measured at each probe.",
                    ),
                    &["node"],
                )?,
            )?,
            witness_clock_offset: reg(
                r,
                prometheus::GaugeVec::new(
                    Opts::new(
                        "custodia_witness_clock_offset_seconds",
                        "A witness's newest cosignature time minus the gateway's stamping clock as it arrived.",
                    ),
                    &["witness"],
                )?,
            )?,
            tsa_clock_offset: reg_if(
                tsa,
                r,
                prometheus::Gauge::new(
                    "custodia_tsa_clock_offset_seconds",
                    "The time-stamping authority's genTime minus the gateway's clock at the newest token.",
                )?,
            )?,
            tsa_stamps: reg_if(tsa, r, {
                let stamps = IntCounterVec::new(
                    Opts::new(
                        "custodia_tsa_stamps_total",
                        "Time-stamp tokens obtained for checkpoints (result=ok) and attempts that failed.",
                    ),
                    &["result"],
                )?;
                // Both series from the start: an alert compares them.
                stamps.with_label_values(&["ok"]);
                stamps.with_label_values(&["failed"]);
                stamps
            })?,
            compliance_clock_offset: reg(
                r,
                prometheus::Gauge::new(
                    "custodia_compliance_clock_offset_seconds",
                    "The compliance clock (retention is judged by it) minus the system clock.",
                )?,
            )?,
            orphans_deleted: reg(
                r,
                IntCounter::new(
                    "custodia_orphan_shards_deleted_total",
                    "Shards no record named, deleted after their grace (failed uploads, interrupted repairs).",
                )?,
            )?,
            orphan_sweep_refused: gauge(
                "custodia_orphan_sweep_refused",
                "1 while the orphan sweep deletes nothing: shards of too much evidence unknown to the index.",
            )?,
            orphans_pending: gauge(
                "custodia_orphan_shards_pending",
                "Unreferenced shards found by the last sweep, still within their grace.",
            )?,
        };
        // Each reason exported from the start, so the first failure is an
        // increase an alert sees.
        for reason in crate::read::READ_FAILURE_REASONS {
            m.reads_failed.with_label_values(&[reason]);
        }
        Ok(m)
    }

    /// A checkpoint of `size` was published; `covers_queue_at`: it covers
    /// every statement queued before then (Unix seconds). A batch cut short
    /// by the batch limits (a backlog) says nothing of what it left behind,
    /// so the age keeps growing until one takes the whole queue.
    pub fn ledger_integrated(&self, size: u64, covers_queue_at: Option<f64>) {
        self.ledger_entries.set(clamp(size));
        if let Some(at) = covers_queue_at {
            self.checkpoint_time.set(at);
        }
    }

    /// `witnesses` of those configured have cosigned the checkpoint of
    /// `size`, counted once a round has asked them all. None says nothing:
    /// the newest cosigned checkpoint is then still an older one.
    pub fn cosigned(&self, size: u64, witnesses: usize) {
        let size = clamp(size);
        if witnesses == 0 || size < self.cosigned_entries.get() {
            return;
        }
        self.cosigned_entries.set(size);
        self.cosignatures
            .set(i64::try_from(witnesses).unwrap_or(i64::MAX));
    }

    /// Starts counting one HTTP request, from now: see [`HttpRequest`].
    pub fn http_request(&self, api: &'static str, route: String) -> HttpRequest {
        HttpRequest {
            requests: self.http_requests.clone(),
            seconds: self.http_seconds.clone(),
            api,
            route,
            started: Instant::now(),
            counted: false,
        }
    }
}

/// The status a request is counted under when its client left before the
/// response head (nginx's "client closed request").
pub const CLIENT_CLOSED: u16 = 499;

/// One HTTP request being answered. [`HttpRequest::answered`] counts it
/// with its status; dropped before that it counts it as [`CLIENT_CLOSED`]
/// (499): hyper drops the handler when the client closes its connection
/// while the handler works without reading (a filing stored or waiting for
/// its receipt, a read fetching its first stripe), or at shutdown. Either
/// way once, with its duration. (A body cut off while the handler reads
/// it is answered, 400 `BodyIncomplete`, and counted so.)
#[derive(Debug)]
pub struct HttpRequest {
    requests: IntCounterVec,
    seconds: HistogramVec,
    api: &'static str,
    route: String,
    started: Instant,
    counted: bool,
}

impl HttpRequest {
    /// The response head is ready: counts the request with `status`.
    pub fn answered(mut self, status: u16) {
        self.count(status);
    }

    fn count(&mut self, status: u16) {
        if std::mem::replace(&mut self.counted, true) {
            return;
        }
        let status = status.to_string();
        self.requests
            .with_label_values(&[self.api, self.route.as_str(), status.as_str()])
            .inc();
        self.seconds
            .with_label_values(&[self.api, self.route.as_str()])
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for HttpRequest {
    fn drop(&mut self) {
        self.count(CLIENT_CLOSED);
    }
}

/// Axum middleware counting every evidence-API request by matched route.
pub async fn track_http<S: Store>(
    axum::extract::State(gw): axum::extract::State<Arc<Gateway<S>>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    // Counted as 499 if this future is dropped first (the client left).
    let request = gw.metrics.http_request("evidence", route);
    let resp = next.run(req).await;
    request.answered(resp.status().as_u16());
    resp
}

/// Refreshes the cluster gauges every few seconds for the gateway's life.
pub fn spawn_refresher<S: Store>(gw: Arc<Gateway<S>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REFRESH);
        loop {
            tick.tick().await;
            refresh(&gw).await;
        }
    })
}

/// One refresh of the gauges that describe the cluster.
pub async fn refresh<S: Store>(gw: &Gateway<S>) {
    let m = &gw.metrics;
    for n in gw.nodes.view() {
        // The bare number, as the nodes label their own metrics (`node="3"`).
        let id = n.id.0.to_string();
        if n.lifecycle == indexer::schema::Lifecycle::Removed {
            // Out of the cluster: not a node that is down.
            let _ = m
                .node_up
                .remove_label_values(&[id.as_str(), n.domain.as_deref().unwrap_or("")]);
            for g in [
                &m.node_capacity,
                &m.node_used,
                &m.node_free,
                &m.node_reserve,
                &m.node_full,
                &m.node_writes_failing,
            ] {
                let _ = g.remove_label_values(&[id.as_str()]);
            }
            let _ = m.node_clock_offset.remove_label_values(&[id.as_str()]);
            let _ = m.quic_rtt.remove_label_values(&[id.as_str()]);
            let _ = m.node_write_failures.remove_label_values(&[id.as_str()]);
            continue;
        }
        m.node_up
            .with_label_values(&[id.as_str(), n.domain.as_deref().unwrap_or("")])
            .set(i64::from(n.healthy));
        if let Some(d) = n.disk {
            m.node_capacity
                .with_label_values(&[id.as_str()])
                .set(clamp(d.capacity_bytes));
            m.node_used
                .with_label_values(&[id.as_str()])
                .set(clamp(d.used_bytes));
            m.node_free
                .with_label_values(&[id.as_str()])
                .set(clamp(d.free_bytes));
            m.node_reserve
                .with_label_values(&[id.as_str()])
                .set(clamp(d.reserve_bytes));
        }
        m.node_full
            .with_label_values(&[id.as_str()])
            .set(i64::from(n.full));
        m.node_writes_failing
            .with_label_values(&[id.as_str()])
            .set(i64::from(n.writes_failing));
        let failures = m.node_write_failures.with_label_values(&[id.as_str()]);
        failures.inc_by(n.write_failures.saturating_sub(failures.get()));
        // A node that is not answering has no current offset: its last
        // one would keep a skew alert firing for a node that is down.
        match n.clock_offset_ms.filter(|_| n.healthy) {
            Some(ms) => m
                .node_clock_offset
                .with_label_values(&[id.as_str()])
                .set(ms as f64 / 1000.0),
            None => {
                let _ = m.node_clock_offset.remove_label_values(&[id.as_str()]);
            }
        }
        match n.rtt {
            Some(rtt) => m
                .quic_rtt
                .with_label_values(&[id.as_str()])
                .set(rtt.as_secs_f64()),
            None => {
                let _ = m.quic_rtt.remove_label_values(&[id.as_str()]);
            }
        }
    }
    m.quic_connections
        .set(gw.nodes.client.connection_rtts().len() as i64);
    for (budget, gate, kib) in [
        ("receive", &gw.receive_memory, gw.receive_memory_kib),
        ("ingest", &gw.ingest_memory, gw.ingest_memory_kib),
        ("read", &gw.read_memory, gw.read_memory_kib),
    ] {
        let bytes = |kib: usize| i64::try_from(kib).unwrap_or(i64::MAX / 1024) * 1024;
        m.memory_budget.with_label_values(&[budget]).set(bytes(kib));
        m.memory_held
            .with_label_values(&[budget])
            .set(bytes(kib.saturating_sub(gate.available_permits())));
    }
    let degraded = indexer::run(&gw.store, |tx| async move {
        indexer::schema::degraded_stripes_tx(&tx, DEGRADED_SCAN_LIMIT).await
    })
    .await;
    let degraded_read = match degraded {
        Ok(d) => {
            m.degraded.set(d.len() as i64);
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not count degraded stripes");
            false
        }
    };
    let lost_read = match count_lost(&gw.store).await {
        Ok(n) => {
            m.lost.set(n as i64);
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not count lost stripes");
            false
        }
    };
    if degraded_read && lost_read {
        m.stripes_counted.set(crate::ledger::unix_now_secs_f64());
    }
}

/// Stripes marked lost in the index (`indexer::schema::mark_lost_tx`), up
/// to [`LOST_SCAN_LIMIT`], read [`LOST_SCAN_BATCH`] marks a transaction.
async fn count_lost<S: Store>(store: &S) -> Result<usize, indexer::schema::SchemaError> {
    let mut after = None;
    let mut count = 0;
    while count < LOST_SCAN_LIMIT {
        let batch = LOST_SCAN_BATCH.min(LOST_SCAN_LIMIT - count);
        let from = after.clone();
        let (n, next) = indexer::run(store, |tx| {
            let from = from.clone();
            async move { indexer::schema::count_lost_tx(&tx, from, batch).await }
        })
        .await?;
        count += n;
        match next {
            Some(k) => after = Some(k),
            None => break,
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counted(m: &GatewayMetrics, status: &str) -> (u64, u64) {
        (
            m.http_requests
                .with_label_values(&["evidence", "/v1/evidence", status])
                .get(),
            m.http_seconds
                .with_label_values(&["evidence", "/v1/evidence"])
                .get_sample_count(),
        )
    }

    #[test]
    fn a_request_is_counted_once_answered_or_as_499_when_dropped() {
        let r = Registry::new();
        let m = GatewayMetrics::new(&r, false, false).unwrap();
        m.http_request("evidence", "/v1/evidence".into())
            .answered(201);
        assert_eq!(counted(&m, "201"), (1, 1));
        assert_eq!(counted(&m, "499"), (0, 1));
        // The client left: the handler's future, and the guard, dropped.
        drop(m.http_request("evidence", "/v1/evidence".into()));
        assert_eq!(counted(&m, "201"), (1, 2));
        assert_eq!(counted(&m, "499"), (1, 2));
    }

    #[test]
    fn timestamps_start_at_the_gateways_start_not_zero() {
        let r = Registry::new();
        let before = crate::ledger::unix_now_secs_f64();
        let m = GatewayMetrics::new(&r, true, false).unwrap();
        let g = m.s3_journal_synced.get();
        assert!(g >= before.floor() && g <= before + 60.0, "{g}");
        // The checkpoint's only where this gateway integrates: from when it
        // took the lease, a placeholder until its first checkpoint.
        let exported = |name: &str| r.gather().iter().any(|f| f.name() == name);
        let name = "custodia_ledger_integrated_timestamp_seconds";
        assert!(!exported(name));
        m.ledger_integrated(3, None);
        assert!(!exported(name));
        m.checkpoint_time.start_at(1.5e9);
        assert!(exported(name));
        assert_eq!(m.checkpoint_time.known(), None);
        m.ledger_integrated(3, Some(2.0e9));
        assert_eq!(m.checkpoint_time.known(), Some(2.0e9));
        m.checkpoint_time.start_at(1.0e9);
        assert_eq!(m.checkpoint_time.known(), Some(2.0e9), "a real value stays");
        assert!(r
            .gather()
            .iter()
            .any(|f| f.name() == "custodia_lost_stripes"));
    }
}
