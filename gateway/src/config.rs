//! Gateway configuration: what `custodia init` writes into `cluster.toml` and
//! `custodia gateway` reads back. Sizes in bytes and durations in milliseconds,
//! with the unit in each field's name.

use protocol::{ErasureCode, NodeId};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

/// One storage node the gateway may place shards on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    pub id: u32,
    pub addr: SocketAddr,
    /// Rack, host or site; placement puts no two shards of a stripe in one domain
    /// while there are enough domains.
    #[serde(default)]
    pub failure_domain: Option<String>,
    /// The name the node's certificate carries for it alone
    /// (`node-ID.custodia.internal`, see
    /// `storage_node::tls::node_server_name`), which the gateway then
    /// requires of it: a key stolen from another node cannot pass for this
    /// one. Absent in clusters made before certificates carried one: the
    /// node is then held only to the name every node's carries (`custodia
    /// up` reissues such certificates and fills this in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

impl NodeEntry {
    pub fn node_id(&self) -> NodeId {
        NodeId(self.id)
    }
}

/// Paths of the gateway's TLS material under the cluster CA.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsPaths {
    pub fn files(&self) -> storage_node::tls::TlsFiles {
        storage_node::tls::TlsFiles {
            ca_cert: self.ca_cert.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }
}

/// A TLS server's certificate chain and private key, PEM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Everything `serve` needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Evidence API address.
    pub listen: SocketAddr,
    /// The embedded index file.
    pub index_path: PathBuf,
    pub tls: TlsPaths,
    /// Data shards per stripe.
    pub k: u8,
    /// Parity shards per stripe.
    pub m: u8,
    #[serde(default = "default_shard_size")]
    pub shard_size_bytes: u32,
    /// Fewest shards of a stripe that must be durable before a filing is
    /// acknowledged. `None` means all `k + m`; a smaller value (at least `k + 1`)
    /// allows degraded writes, whose stripes are queued for repair.
    #[serde(default)]
    pub min_write_shards: Option<u8>,
    /// Stripes in flight per upload or read: bounds memory per request to about
    /// `pipeline_stripes x (k + m) x shard size`.
    #[serde(default = "default_pipeline")]
    pub pipeline_stripes: usize,
    /// A shard read slower than this gets a parity shard requested beside it.
    #[serde(default = "default_hedge")]
    pub hedge_after_ms: u64,
    /// How long an upload intent lives without progress before GC may abort it.
    #[serde(default = "default_lease")]
    pub intent_lease_ms: u64,
    /// How often abandoned uploads and unfinished expunges are collected.
    #[serde(default = "default_gc_interval")]
    pub gc_interval_ms: u64,
    /// An S3 multipart upload neither completed nor aborted, idle this long
    /// (no part stored, no Complete begun), is aborted and its parts
    /// deleted (7 days; 0: never), as S3's AbortIncompleteMultipartUpload
    /// lifecycle rule does (which counts from the start: a large upload
    /// over a slow link is not cut off here while its parts keep coming).
    #[serde(default = "default_multipart_expiry")]
    pub multipart_expiry_ms: u64,
    /// An upload whose client sends no body bytes for this long fails
    /// (408 `body_timeout`; S3 `RequestTimeout`) and releases its buffers,
    /// instead of holding them while a stalled client keeps its connection;
    /// a read whose client takes nothing of a 256 KiB slice for this long
    /// is abandoned; a request head must arrive whole within it, and an
    /// idle keep-alive connection is closed after it (both APIs). The
    /// cluster's own reads and copies have no such limit.
    #[serde(default = "default_client_idle_timeout")]
    pub client_idle_timeout_ms: u64,
    /// How long a gateway told to stop (SIGTERM, Ctrl-C) lets the requests
    /// under way finish, an upload's body included, after it stops
    /// accepting connections; what still runs then is cut off. A supervisor
    /// should wait longer than this before it kills the gateway.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace_ms: u64,
    /// How long an S3 CopyObject, UploadPartCopy or CompleteMultipartUpload
    /// may run before the S3 API answers 200 and keeps the connection alive
    /// with spaces until its XML (or its error, inside the 200, as S3 does),
    /// so that a client's read timeout (60 s for the AWS CLI and boto3) does
    /// not cut off one of many GiB. The response's headers (version id,
    /// evidence id) are then sent before they are known, so without them.
    #[serde(default = "default_s3_keep_alive_after")]
    pub s3_keep_alive_after_ms: u64,
    /// The notarization ledger; without it filings get no receipts.
    #[serde(default)]
    pub ledger: Option<crate::ledger::LedgerConfig>,
    /// The S3 API's address; none: no S3 API.
    #[serde(default)]
    pub s3_listen: Option<SocketAddr>,
    /// The domain for virtual-host-style S3 addressing
    /// (`BUCKET.DOMAIN`); path-style works always.
    #[serde(default)]
    pub s3_domain: Option<String>,
    /// Serve the S3 API over HTTPS (only) with this certificate and key.
    #[serde(default)]
    pub s3_tls: Option<ServerTlsPaths>,
    /// Serve the evidence API over HTTPS (only) with this certificate and
    /// key: bearer tokens and evidence never cross the network in clear.
    #[serde(default)]
    pub api_tls: Option<ServerTlsPaths>,
    /// Silence after which a node counts as down (before: suspect).
    #[serde(default = "default_down_after")]
    pub node_down_after_ms: u64,
    /// How often every node is asked who it is, how full and what time it
    /// has (health, disk, clock skew). Between probes, a node is marked down
    /// by a request that fails or a liveness check that goes unanswered.
    #[serde(default = "default_probe_interval")]
    pub node_probe_interval_ms: u64,
    /// How often the repair worker looks at its queue.
    #[serde(default = "default_repair_interval")]
    pub repair_interval_ms: u64,
    /// How long a node must be down before its shards are rebuilt elsewhere
    /// (a restart or a short outage should not cause a flood of repairs).
    #[serde(default = "default_repair_after_down")]
    pub repair_after_down_ms: u64,
    /// How long an old shard copy outlives the repair commit that replaced
    /// it (moved off a draining node, or rebuilt elsewhere): longer than
    /// any read that began on the old placement.
    #[serde(default = "default_old_copy_grace")]
    pub repair_old_copy_grace_ms: u64,
    /// Least time from the end of one walk of the stripe records for
    /// shards crowded into one failure domain to the start of the next.
    /// A walk begins when a node comes (back) to take new shards; a node
    /// that keeps going and coming back then costs one walk of the whole
    /// index per this period at most, not one after another.
    #[serde(default = "default_crowding_walk_gap")]
    pub crowding_walk_gap_ms: u64,
    /// How long a node gone past its grace, draining or removed, once a
    /// whole walk of the stripe records found no shard left on it, goes
    /// unsearched for (while it stays so): a node removed for good then
    /// costs one walk of the index per this period, not a walk after
    /// another for ever.
    #[serde(default = "default_repair_rewalk")]
    pub repair_rewalk_ms: u64,
    /// How often a node's quarantine entry already acted on is looked at
    /// again (is the shard placed there still missing, or rebuilt and lost
    /// again?): entries stay on the nodes for good, so each look reads the
    /// index for every one of them.
    #[serde(default = "default_quarantine_recheck")]
    pub quarantine_recheck_ms: u64,
    /// Where Prometheus scrapes the gateway's `/metrics` (plain HTTP);
    /// none: not exported.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// How often every node's inventory is compared with the index to find
    /// orphan shards (left by failed uploads or interrupted repairs).
    #[serde(default = "default_orphan_sweep")]
    pub orphan_sweep_interval_ms: u64,
    /// How long a shard must stay unreferenced, seen by two sweeps at least
    /// this far apart, before it is deleted: well above the longest upload
    /// batch and repair commit.
    #[serde(default = "default_orphan_grace")]
    pub orphan_grace_ms: u64,
    /// Most pieces of evidence the index has no stripe of that one orphan
    /// sweep may delete shards of (old copies of known stripes are not
    /// counted). More means the index is behind the nodes (restored from a backup, or a
    /// fresh one where the old was lost) rather than a few failed uploads:
    /// the sweep then deletes nothing, says so, and sets
    /// `custodia_orphan_sweep_refused`, until an operator who has checked
    /// (`custodia recover-index` rebuilds an index from the nodes) raises it.
    #[serde(default = "default_orphan_sweep_max_evidence")]
    pub orphan_sweep_max_evidence: u64,
    /// While repair reads and rebuilds stripes here (not while its backlog
    /// waits: nowhere to put shards, nodes within their grace), ingest
    /// stores at most this many
    /// stripes at once across all uploads (0: no limit), leaving repair its
    /// share of CPU and network. Lower favours healing, higher favours filing.
    #[serde(default = "default_repair_ingest_stripes")]
    pub repair_ingest_stripes: usize,
    /// Stripe fetches in flight across all reads at once (each read still
    /// fetches at most `pipeline_stripes` ahead). 0, the default: twice the
    /// machine's cores, at least `pipeline_stripes`. Fetches beyond what the
    /// cores can verify and send only spread the data in flight over more
    /// memory than the caches hold: on two cores, four 64 MiB S3 GETs at a
    /// time took 6-13 % less CPU per GiB with 4 in flight than with 16 (and
    /// with 8 no less than with 16).
    #[serde(default)]
    pub read_stripes_in_flight: usize,
    /// Memory, in MiB, that the stripes being coded and stored may hold
    /// across all uploads at once (each holds its data and parity shards
    /// while its puts run). An upload whose next stripe would go over waits
    /// (its client is slowed through TCP, and it holds that one stripe's
    /// data meanwhile) instead of the gateway running out of memory under
    /// many large uploads (`custodia_ingest_memory_waits_total` counts the
    /// waits). 0, the default: 1024. Never less than one upload's whole
    /// pipeline.
    #[serde(default)]
    pub ingest_memory_mib: u64,
    /// Memory, in MiB, that the stripes uploads are receiving (filled from
    /// their bodies, not yet coded) may hold across all uploads at once.
    /// Each stripe is charged, when its first byte arrives, what it can
    /// hold: a whole stripe's data, or only what is left of a body whose
    /// length is declared (so thousands of small uploads fit where a few
    /// hundred stripes would). An upload whose next stripe does not fit
    /// waits before reading more of its body
    /// (`custodia_ingest_memory_waits_total` counts these waits too): so a
    /// few hundred clients trickling large bodies can hold it all (the
    /// default fits 256 whole stripes of RS(4,2) with 1 MiB shards) and
    /// make others wait, where they would otherwise run the gateway out of
    /// memory. Bodies a copy or multipart completion reads back from the
    /// store are bounded by `read_memory_mib` instead. 0, the default:
    /// 1024. Never less than one stripe's data.
    #[serde(default)]
    pub receive_memory_mib: u64,
    /// Memory, in MiB, that stripes read ahead may hold across all reads at
    /// once, from their fetch until the client has taken their bytes (or
    /// its connection is gone): what waits in a response being written is
    /// still counted.
    /// A read whose next stripe would go over waits for one that a client
    /// took, instead of many slow readers (each holding its read-ahead)
    /// running the gateway out of memory
    /// (`custodia_read_memory_waits_total` counts the waits). 0, the
    /// default: 1024. Never less than one read's whole pipeline.
    #[serde(default)]
    pub read_memory_mib: u64,
    /// The S3 records' journal files (`ledger/openings/s3-journal/`, one
    /// per second with changes) are merged into one, each record's newest
    /// entry, once a gateway has written this many since it last merged
    /// (and once at start). Files of 64 MiB or more are left as they are,
    /// and one merge takes about 64 MiB of small files at most (merging
    /// again at once while more are left), so it holds a bounded amount.
    #[serde(default = "default_s3_journal_merge_files")]
    pub s3_journal_merge_files: usize,
    pub nodes: Vec<NodeEntry>,
}

fn default_s3_journal_merge_files() -> usize {
    256
}

fn default_repair_ingest_stripes() -> usize {
    3
}
fn default_multipart_expiry() -> u64 {
    7 * 24 * 3_600_000
}
fn default_orphan_sweep() -> u64 {
    3_600_000
}
fn default_orphan_grace() -> u64 {
    6 * 3_600_000
}

fn default_down_after() -> u64 {
    30_000
}
fn default_probe_interval() -> u64 {
    5_000
}
fn default_repair_interval() -> u64 {
    10_000
}
fn default_crowding_walk_gap() -> u64 {
    600_000
}
fn default_repair_rewalk() -> u64 {
    3_600_000
}
fn default_quarantine_recheck() -> u64 {
    600_000
}
fn default_repair_after_down() -> u64 {
    600_000
}
fn default_orphan_sweep_max_evidence() -> u64 {
    100
}

fn default_old_copy_grace() -> u64 {
    crate::repair::OLD_COPY_GRACE.as_millis() as u64
}
fn default_shard_size() -> u32 {
    ErasureCode::DEFAULT_SHARD_SIZE
}
fn default_pipeline() -> usize {
    4
}
fn default_hedge() -> u64 {
    250
}
fn default_shutdown_grace() -> u64 {
    20_000
}
fn default_s3_keep_alive_after() -> u64 {
    15_000
}
fn default_lease() -> u64 {
    120_000
}
fn default_client_idle_timeout() -> u64 {
    60_000
}

fn default_gc_interval() -> u64 {
    30_000
}

/// A configuration value that cannot work; names the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("k/m/shard_size_bytes: {0}")]
    Code(#[from] protocol::CodeError),
    #[error("nodes: {have} configured, the code needs at least k + m = {need}")]
    TooFewNodes { have: usize, need: usize },
    #[error("nodes: id {0} appears twice")]
    DuplicateNode(u32),
    #[error("nodes: id {0}'s server_name {1:?} is not a DNS name")]
    ServerName(u32, String),
    #[error("min_write_shards: {got} is outside k + 1 ..= k + m ({min}..={max})")]
    MinWrite { got: u8, min: u8, max: u8 },
    #[error("{0} and {1} both listen on {2}")]
    SameAddress(&'static str, &'static str, SocketAddr),
    #[error("pipeline_stripes: must be 1..=64")]
    Pipeline,
    #[error("client_idle_timeout_ms: must be positive")]
    ClientIdle,
    #[error(
        "intent_lease_ms: {0} is under the 1000 ms minimum (uploads renew a third of it at a time)"
    )]
    Lease(u64),
}

/// Whether two listeners (of one protocol) would want the same port: one
/// port, and one address, or either on all addresses of the other's family
/// (`[::]` takes IPv4's too, as Linux binds it by default; `0.0.0.0` takes
/// no IPv6 address). Port 0 is any free one, so never the same.
pub fn same_port(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |all: SocketAddr, other: SocketAddr| {
        all.ip().is_unspecified() && (all.is_ipv6() || other.is_ipv4())
    };
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

/// A cluster's shape as a configuration must have it: a valid code, at
/// least k + m nodes, and a write quorum (if set) within k + 1 ..= k + m.
/// Also what `init` checks before it writes anything.
pub fn check_shape(
    code: &ErasureCode,
    nodes: usize,
    min_write_shards: Option<u8>,
) -> Result<(), ConfigError> {
    code.validate()?;
    if nodes < code.total() {
        return Err(ConfigError::TooFewNodes {
            have: nodes,
            need: code.total(),
        });
    }
    if let Some(got) = min_write_shards {
        let (min, max) = (code.k.saturating_add(1), code.k.saturating_add(code.m));
        if got < min || got > max {
            return Err(ConfigError::MinWrite { got, min, max });
        }
    }
    Ok(())
}

/// The first two of `listeners` (each named, and perhaps off) that would
/// want the same port ([`same_port`]), with the address.
pub fn first_clash(
    listeners: &[(&'static str, Option<SocketAddr>)],
) -> Option<(&'static str, &'static str, SocketAddr)> {
    let on: Vec<_> = listeners
        .iter()
        .filter_map(|(name, addr)| addr.map(|a| (*name, a)))
        .collect();
    on.iter().enumerate().find_map(|(i, (a, addr))| {
        on[i + 1..]
            .iter()
            .find(|(_, other)| same_port(*addr, *other))
            .map(|(b, _)| (*a, *b, *addr))
    })
}

impl GatewayConfig {
    /// [`read_stripes_in_flight`](Self::read_stripes_in_flight) with its
    /// default filled in.
    pub fn read_stripes(&self) -> usize {
        match self.read_stripes_in_flight {
            0 => {
                let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
                (2 * cores).max(self.pipeline_stripes)
            }
            n => n,
        }
    }

    /// [`ingest_memory_mib`](Self::ingest_memory_mib) in bytes, with its
    /// default and floor applied.
    pub fn ingest_memory_bytes(&self) -> u64 {
        // A stripe in flight holds its data twice and its parity.
        self.memory_budget(
            self.ingest_memory_mib,
            2 * u64::from(self.k) + u64::from(self.m),
        )
    }

    /// [`receive_memory_mib`](Self::receive_memory_mib) in bytes, with its
    /// default and floor applied.
    pub fn receive_memory_bytes(&self) -> u64 {
        let asked = match self.receive_memory_mib {
            0 => 1024,
            n => n,
        };
        (asked << 20).max(self.code().stripe_size())
    }

    /// [`read_memory_mib`](Self::read_memory_mib) in bytes, with its
    /// default and floor applied.
    pub fn read_memory_bytes(&self) -> u64 {
        // A stripe read ahead holds its data shards.
        self.memory_budget(self.read_memory_mib, u64::from(self.k))
    }

    /// A memory budget of `mib` (0: the default, 1 GiB) in bytes, never
    /// less than one pipeline of stripes that each hold `shards` shards.
    fn memory_budget(&self, mib: u64, shards: u64) -> u64 {
        let asked = match mib {
            0 => 1024,
            n => n,
        };
        let one_pipeline = self.pipeline_stripes as u64 * shards * u64::from(self.shard_size_bytes);
        (asked << 20).max(one_pipeline)
    }

    pub fn code(&self) -> ErasureCode {
        ErasureCode {
            k: self.k,
            m: self.m,
            shard_size: self.shard_size_bytes,
        }
    }

    /// Shards of a stripe that must be durable before a filing is acknowledged.
    pub fn write_quorum(&self) -> usize {
        self.min_write_shards
            .map(usize::from)
            .unwrap_or(self.code().total())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        check_shape(&self.code(), self.nodes.len(), self.min_write_shards)?;
        let mut ids: Vec<u32> = self.nodes.iter().map(|n| n.id).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError::DuplicateNode(w[0]));
        }
        for n in &self.nodes {
            if let Some(name) = &n.server_name {
                if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                    return Err(ConfigError::ServerName(n.id, name.clone()));
                }
            }
        }
        if let Some((a, b, addr)) = first_clash(&[
            ("listen", Some(self.listen)),
            ("s3_listen", self.s3_listen),
            ("metrics_listen", self.metrics_listen),
        ]) {
            return Err(ConfigError::SameAddress(a, b, addr));
        }
        if !(1..=64).contains(&self.pipeline_stripes) {
            return Err(ConfigError::Pipeline);
        }
        if self.client_idle_timeout_ms == 0 {
            return Err(ConfigError::ClientIdle);
        }
        if self.intent_lease_ms < 1000 {
            return Err(ConfigError::Lease(self.intent_lease_ms));
        }
        Ok(())
    }

    /// Settings that work but that an operator should hear about, each as
    /// a sentence for the log.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.orphan_grace_ms < self.repair_old_copy_grace_ms {
            out.push(format!(
                "orphan_grace_ms ({}) is shorter than repair_old_copy_grace_ms ({}): the orphan \
                 sweep may delete a repaired shard's old copy while a read that began on the old \
                 placement still needs it",
                self.orphan_grace_ms, self.repair_old_copy_grace_ms
            ));
        }
        let cleartext = |what: &str, addr: &SocketAddr, setting: &str| {
            format!(
                "the {what} listens on {addr}, beyond this host, without TLS ({setting}): what \
                 it is sent and answers crosses the network in clear; set {setting}, or listen \
                 on loopback behind a TLS proxy"
            )
        };
        if self.api_tls.is_none() && !self.listen.ip().is_loopback() {
            out.push(cleartext(
                "evidence API (bearer tokens in every request)",
                &self.listen,
                "api_tls",
            ));
        }
        if let Some(s3) = self.s3_listen.filter(|a| !a.ip().is_loopback()) {
            if self.s3_tls.is_none() {
                out.push(cleartext("S3 API", &s3, "s3_tls"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
listen = "127.0.0.1:8080"
index_path = "/var/lib/custodia/index.redb"
k = 4
m = 2
min_write_shards = 5

[tls]
ca_cert = "/var/lib/custodia/tls/ca.pem"
cert = "/var/lib/custodia/tls/gateway.pem"
key = "/var/lib/custodia/tls/gateway.key"

[[nodes]]
id = 0
addr = "127.0.0.1:7100"
failure_domain = "rack-a"
"#;

    fn example() -> GatewayConfig {
        let mut c: GatewayConfig = toml::from_str(EXAMPLE).expect("example parses");
        for id in 1..6 {
            c.nodes.push(NodeEntry {
                id,
                addr: ([127, 0, 0, 1], 7100 + id as u16).into(),
                failure_domain: None,
                server_name: None,
            });
        }
        c
    }

    #[test]
    fn documented_example_parses_with_defaults() {
        let c = example();
        assert_eq!(c.shard_size_bytes, 1 << 20);
        assert_eq!(c.write_quorum(), 5);
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn ingest_memory_defaults_to_a_gib_and_holds_one_pipeline_at_least() {
        let mut c = example();
        assert_eq!(c.ingest_memory_bytes(), 1 << 30);
        c.ingest_memory_mib = 64;
        assert_eq!(c.ingest_memory_bytes(), 64 << 20);
        // 4 stripes of (2x4 + 2) MiB-shards: 40 MiB, whatever was asked.
        c.ingest_memory_mib = 1;
        assert_eq!(c.ingest_memory_bytes(), 40 << 20);
    }

    #[test]
    fn receive_memory_defaults_to_a_gib_and_holds_one_stripe_at_least() {
        let mut c = example();
        assert_eq!(c.receive_memory_bytes(), 1 << 30);
        c.receive_memory_mib = 64;
        assert_eq!(c.receive_memory_bytes(), 64 << 20);
        // One stripe of 4 data shards of 32 MiB, whatever was asked.
        c.shard_size_bytes = 32 << 20;
        assert_eq!(c.receive_memory_bytes(), 128 << 20);
    }

    #[test]
    fn read_memory_defaults_to_a_gib_and_holds_one_pipeline_at_least() {
        let mut c = example();
        assert_eq!(c.read_memory_bytes(), 1 << 30);
        c.read_memory_mib = 64;
        assert_eq!(c.read_memory_bytes(), 64 << 20);
        // 4 stripes of 4 MiB-shards: 16 MiB, whatever was asked.
        c.read_memory_mib = 1;
        assert_eq!(c.read_memory_bytes(), 16 << 20);
    }

    #[test]
    fn idle_timeouts_and_leases_have_floors() {
        let mut c = example();
        assert_eq!(
            (c.client_idle_timeout_ms, c.intent_lease_ms),
            (60_000, 120_000)
        );
        c.client_idle_timeout_ms = 0;
        assert_eq!(c.validate(), Err(ConfigError::ClientIdle));
        // A lease shorter than the idle timeout is fine: pauses renew it.
        c.client_idle_timeout_ms = 60_000;
        c.intent_lease_ms = 3_000;
        assert_eq!(c.validate(), Ok(()));
        // A lease of a few ms would have uploads renew it without pause.
        c.intent_lease_ms = 2;
        assert_eq!(c.validate(), Err(ConfigError::Lease(2)));
    }

    #[test]
    fn reads_in_flight_default_to_the_cores_and_never_below_one_read() {
        let mut c = example();
        assert_eq!(c.read_stripes_in_flight, 0, "the default is 0: sized here");
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        assert_eq!(c.read_stripes(), (2 * cores).max(c.pipeline_stripes));
        c.pipeline_stripes = 64;
        assert!(c.read_stripes() >= 64, "one read's pipeline always fits");
        c.read_stripes_in_flight = 3;
        assert_eq!(c.read_stripes(), 3);
    }

    #[test]
    fn cleartext_beyond_loopback_and_a_short_orphan_grace_are_warned_of() {
        let c = example();
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
        let mut c = example();
        c.listen = "0.0.0.0:8080".parse().unwrap();
        c.orphan_grace_ms = 1_000;
        let w = c.warnings();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w.iter().any(|w| w.contains("without TLS")), "{w:?}");
        assert!(w.iter().any(|w| w.contains("orphan_grace_ms")), "{w:?}");
    }

    #[test]
    fn validate_names_the_bad_field() {
        let mut c = example();
        c.min_write_shards = Some(4);
        assert_eq!(
            c.validate(),
            Err(ConfigError::MinWrite {
                got: 4,
                min: 5,
                max: 6
            })
        );
        let mut c = example();
        c.nodes.truncate(5);
        assert_eq!(
            c.validate(),
            Err(ConfigError::TooFewNodes { have: 5, need: 6 })
        );
        let mut c = example();
        c.nodes[1].id = 0;
        assert_eq!(c.validate(), Err(ConfigError::DuplicateNode(0)));
        // Two listeners on one port: the same address, or one on all.
        let mut c = example();
        c.s3_listen = Some(c.listen);
        assert_eq!(
            c.validate(),
            Err(ConfigError::SameAddress("listen", "s3_listen", c.listen))
        );
        let mut c = example();
        let all: SocketAddr = ([0, 0, 0, 0], c.listen.port()).into();
        c.metrics_listen = Some(all);
        assert_eq!(
            c.validate(),
            Err(ConfigError::SameAddress(
                "listen",
                "metrics_listen",
                c.listen
            ))
        );
        // IPv4's every address takes no IPv6 one; IPv6's takes both.
        let v6_loopback: SocketAddr = "[::1]:9000".parse().expect("addr");
        let v6_all: SocketAddr = "[::]:9000".parse().expect("addr");
        let v4_all: SocketAddr = ([0, 0, 0, 0], 9000).into();
        assert!(!same_port(v4_all, v6_loopback) && !same_port(v6_loopback, v4_all));
        assert!(same_port(v6_all, ([127, 0, 0, 1], 9000).into()));
        assert!(same_port(v4_all, v4_all) && same_port(v6_loopback, v6_all));
        // Another port, or port 0 (any free one) twice, is not the same.
        let mut c = example();
        c.s3_listen = Some(([0, 0, 0, 0], c.listen.port() + 1).into());
        c.metrics_listen = Some(([127, 0, 0, 1], 0).into());
        c.listen = ([127, 0, 0, 1], 0).into();
        assert_eq!(c.validate(), Ok(()));
    }
}
