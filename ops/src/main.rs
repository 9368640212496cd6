//! `custodia`: the one binary operators and clerks use.
//!
//! - `init` / `up`: create a cluster (CA, certificates, index, admin token) and
//!   run it locally: N storage-node processes and a gateway.
//! - `node`, `gateway`: run one component (what `up` starts, and what a real
//!   deployment runs under its supervisor).
//! - `put`, `get`: a thin client of the evidence API with progress bars.
//! - `bench`: raw kernels and end-to-end throughput in one run.
//! - `recover-index`: the index rebuilt from the ledger archive and the nodes.

mod bench;
mod bench_ledger;
mod bench_repair;
mod bench_s3;
mod client;
mod cluster;
mod ledger_admin;
mod node_admin;
mod recover;
mod sim;
mod status;
mod up;
mod verify;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

/// mimalloc instead of glibc malloc: the ledger, the S3 API and the evidence
/// API allocate many small buffers per request, and glibc's free lists were a
/// fifth of their CPU in profiles.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "custodia",
    version,
    about = "Evidence storage: file, keep, prove."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct ClusterShape {
    /// Storage nodes to create.
    #[arg(long, default_value_t = 8)]
    nodes: u32,
    /// Data shards per stripe.
    #[arg(long, default_value_t = 4)]
    k: u8,
    /// Parity shards per stripe.
    #[arg(long, default_value_t = 2)]
    m: u8,
    /// Bytes per shard.
    #[arg(long, default_value_t = protocol::ErasureCode::DEFAULT_SHARD_SIZE)]
    shard_size: u32,
    /// Evidence API address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    api: SocketAddr,
    /// S3 API address ("off": none).
    #[arg(long, default_value = "127.0.0.1:9000")]
    s3: String,
    /// First storage node's UDP port (the others follow); 0 picks free ports.
    #[arg(long, default_value_t = 7100)]
    node_base_port: u16,
    /// The gateway's Prometheus `/metrics` address ("off": none).
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics: String,
    /// First storage node's Prometheus `/metrics` TCP port (the others
    /// follow); 0 picks free ports.
    #[arg(long, default_value_t = 9500)]
    node_metrics_base_port: u16,
    /// Allow degraded writes: fewest durable shards per stripe (k+1..=k+m).
    #[arg(long)]
    min_write_shards: Option<u8>,
    /// The ledger's origin line (C2SP tlog-checkpoint) and key name.
    #[arg(long, default_value = "custodia.local/ledger")]
    log_origin: String,
    /// Serve S3 over HTTPS with a certificate from the cluster CA (clients
    /// trust `tls/ca.pem`, e.g. `AWS_CA_BUNDLE`). Current boto3 and the AWS
    /// CLI send checksums as aws-chunked trailers only over HTTPS.
    #[arg(long)]
    s3_tls: bool,
    /// Serve the evidence API over HTTPS with a certificate from the
    /// cluster CA (`tls/ca.pem`; `curl --cacert`, and the CLI trusts it).
    #[arg(long)]
    api_tls: bool,
}

impl ClusterShape {
    fn options(&self) -> Result<cluster::InitOptions> {
        let addr_or_off = |flag: &str, v: &str| -> Result<Option<SocketAddr>> {
            match v {
                "off" => Ok(None),
                a => Ok(Some(a.parse().with_context(|| {
                    format!("--{flag} {a:?}: an address or \"off\"")
                })?)),
            }
        };
        let s3 = addr_or_off("s3", &self.s3)?;
        let metrics = addr_or_off("metrics", &self.metrics)?;
        Ok(cluster::InitOptions {
            nodes: self.nodes,
            k: self.k,
            m: self.m,
            shard_size: self.shard_size,
            api: self.api,
            s3,
            node_base_port: self.node_base_port,
            metrics,
            node_metrics_base_port: self.node_metrics_base_port,
            min_write_shards: self.min_write_shards,
            log_origin: self.log_origin.clone(),
            s3_tls: self.s3_tls,
            api_tls: self.api_tls,
        })
    }
}

#[derive(clap::Args, Clone)]
struct ApiArgs {
    /// Evidence API base URL (default: the gateway of the cluster beside
    /// the token file, from its `cluster.toml`, over HTTPS if it serves
    /// that; without one, http://127.0.0.1:8080).
    #[arg(long, env = "CUSTODIA_API")]
    api: Option<String>,
    /// File holding the bearer token (default: ./custodia-data/admin.token).
    #[arg(long, env = "CUSTODIA_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The CA an `https://` API's certificate must chain to, or `public`
    /// for the public web roots (default: the cluster CA beside the token
    /// file, `tls/ca.pem`, if there is one; else the public web roots).
    #[arg(long, env = "CUSTODIA_CA_CERT")]
    ca_cert: Option<PathBuf>,
}

impl ApiArgs {
    /// The API's URL ([`client::default_api`] unless `--api` or
    /// `CUSTODIA_API` names one) and the bearer token; also settles which
    /// CA the client trusts (the cluster CA beside the token file, as the
    /// URL from its cluster file needs). Refused for a plain `http://` API
    /// on another machine: the token (and the evidence) would cross the
    /// network in clear.
    fn connect(&self) -> Result<(String, String)> {
        let (api, here) = match &self.api {
            Some(api) => (api.clone(), false),
            None => client::default_api(self.token_file.as_deref())?,
        };
        if !here {
            client::refuse_clear_text(&api)?;
        }
        client::trust(self.ca_cert.as_deref(), self.token_file.as_deref());
        Ok((api, client::token(self.token_file.as_deref())?))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Create a cluster in DATA_DIR: CA, certificates, index, admin token.
    Init {
        #[arg(long, default_value = "custodia-data")]
        data_dir: PathBuf,
        #[command(flatten)]
        shape: ClusterShape,
    },
    /// Manage credentials: through the running gateway, or directly in the
    /// embedded index with it stopped. The only way to issue `expunger`
    /// credentials (on the index host, gateway stopped): no API caller,
    /// admins included, can mint one.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Manage tenants: through the running gateway if it holds the index,
    /// else directly in the embedded index.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// The transparency ledger's keys.
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// Run a local cluster (initialising DATA_DIR first if needed) until Ctrl-C.
    Up {
        #[arg(long, default_value = "custodia-data")]
        data_dir: PathBuf,
        #[command(flatten)]
        shape: ClusterShape,
    },
    /// Run one storage node; or, with a subcommand, change a node's
    /// lifecycle (add, drain, activate, remove).
    #[command(args_conflicts_with_subcommands = true)]
    Node {
        #[command(subcommand)]
        action: Option<NodeAction>,
        /// Take the node's settings from this cluster file...
        #[arg(long, requires = "id")]
        cluster: Option<PathBuf>,
        /// ...for this node id.
        #[arg(long)]
        id: Option<u32>,
        /// Or give them explicitly:
        #[arg(long, conflicts_with = "cluster", requires_all = ["listen", "ca", "cert", "key", "id"])]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        listen: Option<SocketAddr>,
        #[arg(long)]
        ca: Option<PathBuf>,
        #[arg(long)]
        cert: Option<PathBuf>,
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Run the gateway of a cluster.
    Gateway {
        /// DATA_DIR holding cluster.toml.
        #[arg(long, default_value = "custodia-data")]
        data_dir: PathBuf,
    },
    /// File a piece of evidence.
    Put {
        file: PathBuf,
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        filing: client::Filing,
        /// Retry-safe filing key (default: a random one for this put, sent with
        /// each of its attempts and printed before the first, to run it again under).
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        acquired: client::Acquired,
        #[command(flatten)]
        idle: client::Idle,
    },
    /// The cluster at a glance: nodes (state, capacity, used, shards), the
    /// repair backlog, the ledger's size and checkpoint age.
    Status {
        #[command(flatten)]
        api: ApiArgs,
        /// Print the gateway's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Start a repair pass now and follow the backlog with a progress bar
    /// until every stripe queued for repair (every stripe, with
    /// --verify-all) has k+m verified shards.
    Repair {
        #[command(flatten)]
        api: ApiArgs,
        /// Give up when the backlog has not shrunk for this many seconds.
        #[arg(long, default_value_t = 60)]
        patience_secs: u64,
        /// Read and check all k+m shards of every stripe, not only the
        /// queued ones (finds corruption no read has met yet).
        #[arg(long)]
        verify_all: bool,
    },
    /// Rebuild a lost or corrupt index from the ledger's openings archive,
    /// the published checkpoint and the storage nodes' shard headers, reading
    /// every piece of evidence back to verify it. The gateway must be stopped
    /// and the nodes running; the old index file is kept, renamed.
    RecoverIndex {
        #[arg(long, default_value = "custodia-data")]
        data_dir: PathBuf,
        /// Proceed with nodes that do not answer: their shards count as
        /// missing and repair rebuilds them once the gateway runs.
        #[arg(long)]
        allow_down_nodes: bool,
        /// Restore the openings archive even where no published checkpoint
        /// covers it (a log that never published one, or whose tiles were
        /// lost): its leaves are not checked against a signed root. Also
        /// accepts shards on the nodes when the ledger names no evidence.
        #[arg(long)]
        trust_archive: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Let garbage collection have the shards `recover-index` found of
    /// evidence no filing in the ledger's archive names (held until now:
    /// some may be filings the archive had not caught up with). Run with
    /// the gateway stopped.
    ReleaseUnclaimed {
        #[arg(long, default_value = "custodia-data")]
        data_dir: PathBuf,
        /// Only list the held evidence ids; release nothing.
        #[arg(long)]
        list: bool,
        /// Release every held evidence id.
        #[arg(long, conflicts_with_all = ["list", "ids"])]
        all: bool,
        /// The evidence ids to release.
        ids: Vec<String>,
    },
    /// Simulations of the real code at scales no test machine has.
    #[command(subcommand)]
    Sim(SimCommand),
    /// Fetch evidence to a file.
    Get {
        id: String,
        #[arg(short, long)]
        output: PathBuf,
        /// Replace FILE if it exists (by default an existing file, perhaps
        /// an earlier verified copy, is never overwritten).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        idle: client::Idle,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Verify a receipt offline: the checkpoint's signature by the log key,
    /// the statement's opening and inclusion proof, witness cosignatures, and
    /// with --file that the file is the evidence it names. Exit 0 only when all
    /// of it holds. With --consistency OLD NEW --proof P: that NEW extends OLD.
    Verify {
        /// The receipt (JSON, as `GET .../receipt` returns it; a saved filing
        /// response with a `receipt` field works too).
        #[arg(long, required_unless_present = "consistency")]
        receipt: Option<PathBuf>,
        /// The evidence file to check against the statement (streamed, any size).
        #[arg(long)]
        file: Option<PathBuf>,
        /// The log's verifier key, or a file holding it (`DATA_DIR/ledger.vkey`).
        #[arg(long)]
        log_key: String,
        /// A trusted witness's verifier key, or a file holding it; repeatable.
        #[arg(long = "witness-key")]
        witness_keys: Vec<String>,
        /// Witness cosignatures required (default: every witness key given).
        #[arg(long)]
        quorum: Option<usize>,
        /// The TSA certificate (`DATA_DIR/tsa.pem`) to check the receipt's
        /// RFC 3161 time-stamp token with.
        #[arg(long)]
        tsa_cert: Option<PathBuf>,
        /// Print the verdict as JSON.
        #[arg(long)]
        json: bool,
        /// Two checkpoints (note or receipt files): check NEW extends OLD.
        #[arg(long, num_args = 2, value_names = ["OLD", "NEW"], requires = "proof",
              conflicts_with_all = ["receipt", "file", "witness_keys", "quorum", "tsa_cert", "json"])]
        consistency: Option<Vec<PathBuf>>,
        /// The consistency proof, as `GET /v1/ledger/consistency` returns it.
        #[arg(long)]
        proof: Option<PathBuf>,
        /// With --consistency: the verifier key OLD is signed with, when
        /// the log's key was rotated since (`DATA_DIR/ledger.vkey.<old
        /// origin>`, `/` and the like written `_`, as `ledger rotate-key`
        /// prints it); NEW is checked with --log-key. The tree goes on
        /// across a rotation, so NEW must still extend OLD.
        #[arg(long, requires = "consistency")]
        old_log_key: Option<String>,
    },
    /// Run a C2SP tlog-witness for other courts' logs: it cosigns each log's
    /// checkpoints only when they extend what it cosigned before.
    Witness {
        /// Where its key and its view of each log are kept.
        #[arg(long, default_value = "custodia-witness")]
        data_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: SocketAddr,
        /// The witness's name (its key name), used when its key is created.
        #[arg(long, default_value = "custodia-witness.local")]
        name: String,
        /// A log's verifier key, or a file holding it (`DATA_DIR/ledger.vkey`); repeat per log.
        #[arg(long = "log-key", required = true)]
        log_keys: Vec<String>,
        /// Start with no memory of what was cosigned, when the key exists
        /// but its state file does not: only for a witness that never
        /// cosigned anything (otherwise it could cosign a fork).
        #[arg(long)]
        reset_state: bool,
        /// The date (Unix seconds, as its refusal says it) of the last
        /// cosignature, dated by a clock gone wrong: the clock is right
        /// now, and the next is dated by it (the witness refuses to cosign
        /// until its clock passes that date). Only that date is dropped:
        /// left on, the flag does nothing at later starts.
        #[arg(long, value_name = "LAST_DATE")]
        accept_clock: Option<u64>,
    },
    /// Measure raw kernels and end-to-end throughput on a fresh local cluster.
    Bench(bench::BenchArgs),
    /// Measure the notarization ledger: sequencer entries/s in process,
    /// `POST /v1/notarize` entries/s over HTTP, and request-to-receipt latency.
    BenchLedger(bench_ledger::BenchLedgerArgs),
    /// Repair throughput after a node dies, and ingest during repair.
    BenchRepair(bench_repair::BenchRepairArgs),
    /// The S3 API against Garage (given `--garage PATH`), one client, one run:
    /// 64 MiB and 4 KiB PUT/GET rates and server CPU per GiB and per operation.
    BenchS3(bench_s3::BenchS3Args),
}

#[derive(Subcommand)]
enum NodeAction {
    /// Add a storage node to DATA_DIR's cluster: a certificate from the
    /// cluster CA, a data dir and ports, recorded in cluster.toml. Start it
    /// with `custodia node --cluster DATA_DIR/cluster.toml --id N`, then
    /// restart the gateway, which places new shards on it from then on.
    Add {
        #[arg(long, default_value = "custodia-data")]
        data_dir: PathBuf,
        /// Failure domain label (rack, host, site).
        #[arg(long)]
        failure_domain: Option<String>,
        /// QUIC address (default: a free port on 127.0.0.1).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Prometheus address (default: a free port on 127.0.0.1).
        #[arg(long)]
        metrics: Option<SocketAddr>,
    },
    /// Stop placing shards on node ID and move its shards to other nodes
    /// while it keeps serving them.
    Drain {
        id: u32,
        #[command(flatten)]
        api: ApiArgs,
        /// Follow the drain with a progress bar until nothing is left on it.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up when nothing moved for this many seconds.
        #[arg(long, default_value_t = 120)]
        patience_secs: u64,
    },
    /// Undo a drain: node ID takes new shards again.
    Activate {
        id: u32,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Take node ID out of the cluster. Refused while any stripe still places
    /// a shard on it (drain it first), unless --force: for a dead node, whose
    /// shards then count as missing and are rebuilt elsewhere by repair
    /// (refused while the node answers, or has within node_down_after_ms).
    Remove {
        id: u32,
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum SimCommand {
    /// Placement on many nodes: fill, failure domains, movement on growth,
    /// repair fan-out.
    Placement(sim::PlacementArgs),
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create credentials for TENANT with ROLE: a bearer token for the
    /// evidence API and an S3 access key. Prints them in the AWS
    /// shared-credentials format, the token as `custodia_token`. With the
    /// gateway running, asks it (`POST /v1/admin/keys`, DATA_DIR/admin.token);
    /// `expunger` only on the index host with the gateway stopped.
    Create {
        #[arg(long, default_value = "custodia-data")]
        data_dir: PathBuf,
        #[arg(long)]
        tenant: String,
        /// reader, clerk, admin or expunger.
        #[arg(long, default_value = "clerk")]
        role: String,
        /// The S3 key may bypass GOVERNANCE retention (with the request header).
        #[arg(long)]
        bypass_governance: bool,
        /// The running gateway's evidence API, e.g. https://evidence.example:8443
        /// when its certificate names a host (default: the listen address in
        /// DATA_DIR/cluster.toml). DATA_DIR's admin token is sent there.
        #[arg(long)]
        api: Option<String>,
    },
    /// Revoke credentials at once: an S3 access key (and every presigned
    /// URL signed with it), a bearer token, or both. Through the running
    /// gateway if it holds the index.
    #[command(group(clap::ArgGroup::new("what").required(true).multiple(true).args(["access_key", "token_file", "token_id"])))]
    Revoke {
        #[arg(long, default_value = "custodia-data")]
        data_dir: PathBuf,
        /// The S3 access key id.
        #[arg(long)]
        access_key: Option<String>,
        /// A file holding the bearer token (never on the command line,
        /// where other users' `ps` and the shell's history would see it).
        #[arg(long, conflicts_with = "token_id")]
        token_file: Option<PathBuf>,
        /// A bearer token by its id, as custody records and `key create`
        /// name it (`token:` and 16 hex digits): for a token seen misused
        /// that you never held.
        #[arg(long)]
        token_id: Option<String>,
        /// The running gateway's evidence API (see `key create --api`).
        #[arg(long)]
        api: Option<String>,
    },
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Replace the log's signing key, under a new origin (the gateway
    /// stopped): the tree goes on, re-signed with the new key from its
    /// newest checkpoint; receipts issued before still verify with the old
    /// verifier key, kept beside the new one.
    RotateKey {
        /// The new origin (the log's name in checkpoints and its key's
        /// name): another than the current one.
        #[arg(long)]
        origin: String,
        #[arg(long, default_value = "custodia-data")]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Register a tenant (`[a-z0-9_-]{1,64}`); through the running gateway
    /// if it holds the index.
    Create {
        name: String,
        #[arg(long, default_value = "custodia-data")]
        data_dir: PathBuf,
        /// The running gateway's evidence API (see `key create --api`).
        #[arg(long)]
        api: Option<String>,
    },
}

/// Standard error for the log, where a failed write is dropped rather than
/// reported: a log nobody reads any more (`custodia up 2>&1 | tee up.log`
/// with `tee` gone at Ctrl-C, a dead log shipper) must not stop the
/// process (tracing reports a failed write with `eprintln!`, which panics
/// on a closed pipe, midway through a clean stop or in a background task).
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

fn init_tracing(default: &str) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // s3s logs whole requests at debug level, Authorization headers and
    // presigned URLs' signatures included: `RUST_LOG=debug` must not write
    // credentials to the log. Only an operator naming s3s gets its debug.
    let names_s3s = std::env::var("RUST_LOG").is_ok_and(|v| v.contains("s3s"));
    if !names_s3s {
        if let Ok(quiet) = "s3s=info".parse() {
            filter = filter.add_directive(quiet);
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LossyStderr)
        // Colour codes only on a terminal, never in node.log or a CI log.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Exit code 2 ("nothing was verified") is verify's contract; another
    // command's mistaken argument is an ordinary failure.
    let verifying = matches!(cli.command, Command::Verify { .. });
    if !cli.command.serves() {
        end_quietly_on_a_closed_pipe();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            if verifying && e.downcast_ref::<verify::NothingVerified>().is_some() {
                std::process::ExitCode::from(verify::NOTHING_VERIFIED)
            } else if e.downcast_ref::<client::FiledButChanged>().is_some() {
                std::process::ExitCode::from(client::FILED_BUT_CHANGED)
            } else {
                std::process::ExitCode::from(1)
            }
        }
    }
}

impl Command {
    /// Whether it runs until stopped (a cluster, a node, a gateway, a
    /// witness, or a benchmark's cluster), rather than answer and exit.
    fn serves(&self) -> bool {
        matches!(
            self,
            Command::Up { .. }
                | Command::Node { .. }
                | Command::Gateway { .. }
                | Command::Witness { .. }
                | Command::Bench(_)
                | Command::BenchS3(_)
                | Command::BenchLedger(_)
                | Command::BenchRepair(_)
        )
    }
}

/// A command that answers and exits, its output piped into a reader that
/// stopped reading (`| head`), ends as Unix tools do, by SIGPIPE, silently,
/// rather than panic in `println!` with exit code 101 (Rust ignores
/// SIGPIPE). Commands that serve, or run clusters of child processes (the
/// benchmarks), keep ignoring it: a closed stdout must not stop a cluster,
/// nor end a parent without its clean-up (children it kills on drop would
/// be left running).
fn end_quietly_on_a_closed_pipe() {
    // SAFETY: called first thing in `main`, before any other thread exists;
    // `signal` with SIG_DFL installs no handler.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// The error and its causes, outermost first, each said once: many error
/// types repeat their cause in their own message ("k must be at least 1:
/// k must be at least 1" with `{:#}`).
fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        // A cause its outer message already ends with ("context: cause").
        if text.is_empty() || out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn node_action(action: NodeAction) -> Result<()> {
    match action {
        NodeAction::Add {
            data_dir,
            failure_domain,
            listen,
            metrics,
        } => {
            let id = node_admin::add(&data_dir, failure_domain, listen, metrics)?;
            println!(
                "node {id} added to {}
under `custodia up`: restart `custodia up`, which starts it with the others
otherwise: start it with  custodia node --cluster {} --id {id}
           then restart the gateway so it places new shards there",
                data_dir.join(cluster::CLUSTER_FILE).display(),
                data_dir.join(cluster::CLUSTER_FILE).display()
            );
            Ok(())
        }
        NodeAction::Drain {
            id,
            api,
            wait,
            patience_secs,
        } => {
            let (api, token) = api.connect()?;
            node_admin::act(&api, &token, id, "drain", false)?;
            println!("node {id} is draining: no new shards; repair moves its shards elsewhere");
            if wait {
                node_admin::wait_drained(
                    &api,
                    &token,
                    id,
                    std::time::Duration::from_secs(patience_secs),
                )?;
                println!("node {id} is drained; `custodia node remove {id}` takes it out");
            }
            Ok(())
        }
        NodeAction::Activate { id, api } => {
            let (api, token) = api.connect()?;
            node_admin::act(&api, &token, id, "activate", false)?;
            println!("node {id} is active");
            Ok(())
        }
        NodeAction::Remove { id, api, force } => {
            let (api, token) = api.connect()?;
            node_admin::act(&api, &token, id, "remove", force)?;
            println!("node {id} is removed from the cluster");
            Ok(())
        }
    }
}

/// Raises this process's soft limit on open files to its hard limit: a
/// node keeps a descriptor open per segment (64 MiB of small shards each)
/// besides its connections, and a gateway one per client and node
/// connection, and the usual soft limit of 1024 is met at about 64 GB of
/// packed shards (every node of a balanced cluster at once). Said, not
/// fatal, where it cannot be raised.
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    // (No hard limit: left as it is; "unlimited" is refused for files.)
    if matches!((limit.current, limit.maximum), (Some(soft), Some(hard)) if soft < hard) {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {
                tracing::info!(from = ?limit.current, to = ?limit.maximum, "raised the open-file limit")
            }
            Err(e) => {
                tracing::warn!(limit = ?limit.current, error = %e, "could not raise the open-file limit")
            }
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init { data_dir, shape } => {
            init_tracing("warn");
            // Not beside an `up` making the same directory's keys.
            std::fs::create_dir_all(&data_dir)
                .with_context(|| format!("creating {}", data_dir.display()))?;
            let _lock = cluster::lock_data_dir(&data_dir)?;
            let c = cluster::init(&data_dir, &shape.options()?).await?;
            println!(
                "initialised {} nodes, RS({},{}) in {}\nadmin token: {}",
                c.nodes.len(),
                c.gateway.k,
                c.gateway.m,
                data_dir.display(),
                data_dir.join(cluster::ADMIN_TOKEN_FILE).display()
            );
            Ok(())
        }
        Command::Key(KeyCommand::Create {
            data_dir,
            tenant,
            role,
            bypass_governance,
            api,
        }) => {
            let parsed = indexer::schema::Role::parse(&role).with_context(|| {
                format!("unknown role {role:?}: reader, clerk, admin or expunger")
            })?;
            let profile = format!("{tenant}-{role}");
            let c = match cluster::open_index_unless_in_use(&data_dir).await? {
                cluster::Offline::Opened(index) => {
                    cluster::issue_credentials(&index.store, &tenant, parsed, bypass_governance).await?
                }
                // Separation of duties: the admin API never grants expunger.
                cluster::Offline::InUse(e) if matches!(parsed, indexer::schema::Role::Expunger) => {
                    return Err(e.context(
                        "expunger credentials are issued only on the index host with the gateway stopped",
                    ))
                }
                cluster::Offline::InUse(offline) => {
                    // The gateway holds the index: ask it, as the admin.
                    let (api, token) = cluster::running_gateway(&data_dir, api.as_deref())
                        .map_err(|e| offline.context(e))?;
                    let answer = client::admin_post_json(
                        &api,
                        &token,
                        "/v1/admin/keys",
                        &serde_json::json!({
                            "tenant": tenant, "role": role, "bypass_governance": bypass_governance,
                        }),
                    )
                    .map_err(|e| {
                        if e.to_string().contains("no such tenant") {
                            e.context(format!(
                                "no tenant {tenant:?}: create it first with `custodia tenant create {tenant}`"
                            ))
                        } else {
                            e
                        }
                    })?;
                    // An answer without them (a proxy's, another service's)
                    // must not become a profile of empty secrets.
                    // Said without the answer itself: it may hold a live
                    // secret (the other credential, issued already).
                    let field = |k: &str| {
                        answer[k]
                            .as_str()
                            .filter(|v| !v.is_empty())
                            .map(str::to_owned)
                            .with_context(|| {
                                format!(
                                    "the gateway's answer has no {k}; credentials may have been \
                                     issued all the same (access key {}): revoke them with \
                                     `custodia key revoke`",
                                    answer["access_key"].as_str().unwrap_or("unknown")
                                )
                            })
                    };
                    gateway::credentials::Credentials {
                        tenant: tenant.clone(),
                        role: parsed,
                        token: field("token")?,
                        access_key: field("access_key")?,
                        secret: field("secret_access_key")?,
                        bypass_governance,
                    }
                }
            };
            print!("{}", c.aws_profile(&profile));
            println!("custodia_token = {}", c.token);
            // How custody records name the token (they never hold it):
            // note who holds it.
            println!(
                "custodia_token_id = {}",
                gateway::credentials::token_id(&c.token)
            );
            Ok(())
        }
        Command::Key(KeyCommand::Revoke {
            data_dir,
            access_key,
            token_file,
            token_id,
            api,
        }) => {
            let token = match &token_file {
                Some(f) => Some(
                    std::fs::read_to_string(f)
                        .with_context(|| format!("reading the token from {}", f.display()))?
                        .trim()
                        .to_owned(),
                ),
                None => None,
            };
            // The hash of the token revoked, once known: what DATA_DIR's
            // token file is compared with.
            let mut token_hash = token.as_deref().map(indexer::schema::token_hash);
            let revoked = match cluster::open_index_unless_in_use(&data_dir).await? {
                cluster::Offline::Opened(index) => {
                    if let Some(id) = &token_id {
                        token_hash =
                            match gateway::credentials::resolve_token_id(&index.store, id).await {
                                Ok(hash) => Some(hash),
                                Err(gateway::credentials::TokenIdError::Unknown(_)) => None,
                                Err(e) => return Err(e.into()),
                            };
                    }
                    // Into the ledger's openings archive first, as the API
                    // does: `recover-index` restores the credentials
                    // DATA_DIR's files (or a backup of them) hold, and must
                    // not restore this one.
                    let config = cluster::Cluster::load(&data_dir)?.gateway;
                    if let Some(ledger) = &config.ledger {
                        let ledger = gateway::ledger::Ledger::open(ledger, "custodia key revoke")
                            .context("opening the ledger's openings archive")?;
                        gateway::credentials::archive_revocation(
                            &ledger,
                            token_hash.as_ref(),
                            access_key.as_deref(),
                        )
                        .await
                        .context("the revocation could not be archived, so nothing was revoked")?;
                    }
                    gateway::credentials::revoke(
                        &index.store,
                        token_hash.as_ref(),
                        access_key.as_deref(),
                    )
                    .await?
                }
                cluster::Offline::InUse(offline) => {
                    let (api, admin) = cluster::running_gateway(&data_dir, api.as_deref())
                        .map_err(|e| offline.context(e))?;
                    let answer = client::admin_post_json(
                        &api,
                        &admin,
                        "/v1/admin/keys/revoke",
                        // Only what is named: a gateway older than
                        // `token_id` refuses fields it does not know.
                        &serde_json::Value::Object(
                            [
                                ("token", &token),
                                ("token_id", &token_id),
                                ("access_key", &access_key),
                            ]
                            .into_iter()
                            .filter_map(|(k, v)| Some((k.to_owned(), v.clone()?.into())))
                            .collect(),
                        ),
                    )?;
                    if let Some(id) = &token_id {
                        // The revoked token's file, if DATA_DIR holds it:
                        // by its id (this side never learns its hash).
                        let held =
                            std::fs::read_to_string(data_dir.join(cluster::ADMIN_TOKEN_FILE))
                                .ok()
                                .filter(|t| gateway::credentials::token_id(t.trim()) == id.trim());
                        token_hash = held.map(|t| indexer::schema::token_hash(t.trim()));
                    }
                    gateway::credentials::Revoked {
                        token: answer["token_revoked"].as_bool().unwrap_or(false),
                        access_key: answer["access_key_revoked"].as_bool().unwrap_or(false),
                    }
                }
            };
            if let Some(k) = &access_key {
                let said = if revoked.access_key {
                    "revoked"
                } else {
                    "not found"
                };
                println!("access key {k}: {said}");
            }
            let token_named = token.is_some() || token_id.is_some();
            if token_named {
                let said = if revoked.token {
                    "revoked"
                } else {
                    "not found"
                };
                match &token_id {
                    Some(id) => println!("token {}: {said}", id.trim()),
                    None => println!("token: {said}"),
                }
            }
            // DATA_DIR's own files must not keep a dead credential.
            let mut retired = Vec::new();
            if let (true, Some(hash)) = (revoked.token, &token_hash) {
                if cluster::retire_credential_file(&data_dir, cluster::ADMIN_TOKEN_FILE, |text| {
                    indexer::schema::token_hash(text.trim()) == *hash
                })? {
                    retired.push(cluster::ADMIN_TOKEN_FILE);
                }
            }
            if let (true, Some(k)) = (revoked.access_key, &access_key) {
                if cluster::retire_credential_file(
                    &data_dir,
                    cluster::S3_CREDENTIALS_FILE,
                    |text| cluster::names_access_key(text, k),
                )? {
                    retired.push(cluster::S3_CREDENTIALS_FILE);
                }
            }
            for name in retired {
                println!(
                    "{} held it: moved to {name}.revoked, so no tool uses it and recover-index \
                     does not bring it back (`custodia key create --tenant admin --role admin` \
                     makes a new credential to put there)",
                    data_dir.join(name).display()
                );
            }
            if !revoked.token && !revoked.access_key {
                anyhow::bail!("no such credential: nothing was revoked");
            }
            // One of two named not found (a mistyped key beside a leaked
            // token): a script must not take that for done.
            if (access_key.is_some() && !revoked.access_key) || (token_named && !revoked.token) {
                anyhow::bail!(
                    "not every credential named was found: only the one said revoked was"
                );
            }
            Ok(())
        }
        Command::Ledger(LedgerCommand::RotateKey { origin, data_dir }) => {
            init_tracing("warn");
            ledger_admin::rotate_key(&data_dir, &origin).await
        }
        Command::Tenant(TenantCommand::Create {
            name,
            data_dir,
            api,
        }) => {
            let index = match cluster::open_index_unless_in_use(&data_dir).await? {
                cluster::Offline::Opened(index) => index,
                cluster::Offline::InUse(offline) => {
                    // The gateway holds the index: ask it, as the admin.
                    let (api, token) = cluster::running_gateway(&data_dir, api.as_deref())
                        .map_err(|e| offline.context(e))?;
                    let answer = client::admin_post_json(
                        &api,
                        &token,
                        "/v1/admin/tenants",
                        &serde_json::json!({ "name": name }),
                    )?;
                    match answer["created"].as_bool() {
                        Some(true) => println!("tenant {name} created"),
                        Some(false) => println!("tenant {name} already exists"),
                        None => anyhow::bail!(
                            "the gateway's answer does not say whether tenant {name} was created: {answer}"
                        ),
                    }
                    return Ok(());
                }
            };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            if cluster::create_tenant(&index.store, &name, now).await? {
                println!("tenant {name} created");
            } else {
                println!("tenant {name} already exists");
            }
            Ok(())
        }
        Command::RecoverIndex {
            data_dir,
            allow_down_nodes,
            trust_archive,
            json,
        } => {
            init_tracing("warn");
            recover::run(&data_dir, allow_down_nodes, trust_archive, json).await
        }
        Command::ReleaseUnclaimed {
            data_dir,
            list,
            all,
            ids,
        } => {
            init_tracing("warn");
            if !list && !all && ids.is_empty() {
                anyhow::bail!("name the evidence ids to release, or --all (--list shows them)");
            }
            recover::release_unclaimed(&data_dir, list, &ids).await
        }
        Command::Up { data_dir, shape } => {
            init_tracing("info");
            raise_open_file_limit();
            up::up(&data_dir, &shape.options()?).await
        }
        Command::Node {
            action: Some(action),
            ..
        } => node_action(action),
        Command::Node {
            action: None,
            cluster: cluster_file,
            id,
            data_dir,
            listen,
            ca,
            cert,
            key,
        } => {
            init_tracing("info");
            raise_open_file_limit();
            let mut metrics = None;
            let config = match (cluster_file, data_dir) {
                (Some(file), _) => {
                    let c = cluster::Cluster::load_file(&file)?;
                    // A copy's cluster file naming the original's folders
                    // would have this node serve, scrub and change those.
                    // (Its real folder: `--cluster cluster.toml` has an
                    // empty parent, a symlinked file another.)
                    let real = std::fs::canonicalize(&file)
                        .with_context(|| format!("reading {}", file.display()))?;
                    c.own_paths(&real)?;
                    let id = id.context("--id is required")?;
                    let n = c.node(id)?;
                    metrics = n.metrics_listen;
                    storage_node::server::NodeConfig {
                        data_dir: n.data_dir.clone(),
                        listen: n.listen,
                        node_id: protocol::NodeId(id),
                        tls: storage_node::tls::TlsFiles {
                            ca_cert: c.ca_cert().to_path_buf(),
                            cert: n.cert.clone(),
                            key: n.key.clone(),
                        },
                        scrub: n.scrub(),
                        store: n.store(),
                    }
                }
                (None, Some(data_dir)) => storage_node::server::NodeConfig {
                    data_dir,
                    listen: listen.context("--listen is required")?,
                    node_id: protocol::NodeId(id.context("--id is required")?),
                    tls: storage_node::tls::TlsFiles {
                        ca_cert: ca.context("--ca is required")?,
                        cert: cert.context("--cert is required")?,
                        key: key.context("--key is required")?,
                    },
                    scrub: Default::default(),
                    store: Default::default(),
                },
                (None, None) => anyhow::bail!("give --cluster FILE --id N, or --data-dir with --listen, --id, --ca, --cert, --key"),
            };
            up::run_node(config, metrics).await
        }
        Command::Gateway { data_dir } => {
            init_tracing("info");
            raise_open_file_limit();
            up::run_gateway(&data_dir).await
        }
        Command::Put {
            file,
            api,
            filing,
            idempotency_key,
            acquired,
            idle,
        } => {
            let (api, token) = api.connect()?;
            client::put(
                &api,
                &token,
                &file,
                &filing,
                idempotency_key,
                &acquired,
                idle.duration(),
            )
        }
        Command::Verify {
            receipt,
            file,
            log_key,
            witness_keys,
            quorum,
            tsa_cert,
            json,
            consistency,
            proof,
            old_log_key,
        } => {
            let ok = match (consistency.as_deref(), proof.as_deref(), receipt.as_deref()) {
                (Some([old, new]), Some(proof), _) => verify::consistency(
                    old,
                    new,
                    proof,
                    old_log_key.as_deref().unwrap_or(&log_key),
                    &log_key,
                )?,
                (_, _, Some(receipt)) => verify::receipt(&verify::ReceiptArgs {
                    receipt,
                    file: file.as_deref(),
                    log_key: &log_key,
                    witness_keys: &witness_keys,
                    quorum,
                    tsa_cert: tsa_cert.as_deref(),
                    json,
                })
                .inspect_err(|e| {
                    // A script reading --json gets JSON on every exit:
                    // here, that nothing was verified, and why.
                    if json && e.downcast_ref::<verify::NothingVerified>().is_some() {
                        println!(
                            "{}",
                            serde_json::json!({ "valid": false, "verified": false, "error": describe(e) })
                        );
                    }
                })?,
                _ => {
                    return Err(verify::NothingVerified(
                        "give --receipt R, or --consistency OLD NEW --proof P".into(),
                    )
                    .into())
                }
            };
            if ok {
                Ok(())
            } else {
                Err(anyhow::anyhow!("verification failed"))
            }
        }
        Command::Witness {
            data_dir,
            listen,
            name,
            log_keys,
            reset_state,
            accept_clock,
        } => {
            init_tracing("info");
            let keys = log_keys
                .iter()
                .map(|k| verify::key_arg(k))
                .collect::<Result<Vec<_>>>()?;
            let (router, vkey) =
                gateway::witness::open(&data_dir, &name, &keys, reset_state, accept_clock)?;
            let (addr, server) = gateway::witness::serve(listen, router).await?;
            println!("witness listening on http://{addr}");
            println!("witness key: {vkey}");
            println!(
                "  (also in {})",
                data_dir.join(gateway::witness::WITNESS_PUB_FILE).display()
            );
            tokio::select! {
                r = server => { r.context("witness task")?.context("witness server")?; }
                _ = tokio::signal::ctrl_c() => {}
            }
            Ok(())
        }
        Command::Get {
            id,
            output,
            force,
            idle,
            api,
        } => {
            // Interrupted, it leaves no partial download behind (the
            // process ends on Ctrl-C, past any destructor).
            let (api, token) = api.connect()?;
            let partial = client::Partial::default();
            let work = {
                let partial = partial.clone();
                tokio::task::spawn_blocking(move || {
                    client::get(&api, &token, &id, &output, force, idle.duration(), &partial)
                })
            };
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).context("catching SIGTERM")?;
            // The terminal closed (an SSH session dropped): as SIGTERM,
            // rather than ending by the default with the partial file left.
            // Not where it was started ignoring hangups (`nohup`).
            let mut hup = up::hangup().context("catching SIGHUP")?;
            // Stopped: what is left of the download goes, and what was
            // written is said (the file asked for, if the rename came first;
            // to a terminal that may be gone, so a failed write is dropped).
            let stop = |how: &str, code: i32| -> ! {
                use std::io::Write as _;
                let mut state = partial.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(path) = state.temp.take() {
                    let _ = std::fs::remove_file(path);
                }
                let _ = if state.written {
                    writeln!(std::io::stderr(), "{how} after the file was written")
                } else {
                    writeln!(std::io::stderr(), "{how}; nothing written")
                };
                std::process::exit(code);
            };
            tokio::select! {
                done = work => done.context("the download task")?,
                _ = term.recv() => stop("stopped", 143),
                () = up::hung_up(&mut hup) => stop("hung up", 129),
                _ = tokio::signal::ctrl_c() => stop("interrupted", 130),
            }
        }
        Command::Status { api, json } => {
            let (api, token) = api.connect()?;
            let s = status::fetch(&api, &token)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", status::render(&s));
            }
            Ok(())
        }
        Command::Repair {
            api,
            patience_secs,
            verify_all,
        } => {
            let (api, token) = api.connect()?;
            status::repair(
                &api,
                &token,
                verify_all,
                std::time::Duration::from_secs(patience_secs),
            )
        }
        Command::Sim(SimCommand::Placement(args)) => sim::placement(&args),
        Command::Bench(args) => {
            init_tracing("warn");
            bench::run(args).await
        }
        Command::BenchRepair(args) => {
            init_tracing("warn");
            bench_repair::run(args).await
        }
        Command::BenchLedger(args) => {
            init_tracing("warn");
            bench_ledger::run(args).await
        }
        Command::BenchS3(args) => {
            init_tracing("warn");
            bench_s3::run(args).await
        }
    }
}
