//! The cluster file (`DATA_DIR/cluster.toml`) that `custodia init` writes and
//! `up`, `node` and `gateway` read: the gateway's configuration and, per node,
//! its id, address, data dir and TLS files. All paths inside are absolute.

use anyhow::{bail, Context, Result};
use gateway::config::{GatewayConfig, NodeEntry, TlsPaths};
use serde::{Deserialize, Serialize};
use std::fs;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use storage_node::tls::ClusterCa;

pub const CLUSTER_FILE: &str = "cluster.toml";
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The admin tenant's S3 keys, in the AWS shared-credentials format.
pub const S3_CREDENTIALS_FILE: &str = "s3.credentials";

/// Writes a certificate or public key durably: `init` is done only once
/// what it wrote survives a power cut.
fn write_public(path: impl AsRef<Path>, bytes: impl AsRef<[u8]>) -> std::io::Result<()> {
    storage_node::store::write_public(path.as_ref(), bytes.as_ref())
}

/// Moves DATA_DIR's credential file `name` aside (to `NAME.revoked`,
/// durably) when `holds` says it holds a credential just revoked: no tool
/// should use it, and `recover-index`, which registers what these files
/// hold, must not bring it back. Returns whether it was moved.
pub fn retire_credential_file(
    data_dir: &Path,
    name: &str,
    holds: impl Fn(&str) -> bool,
) -> Result<bool> {
    let path = data_dir.join(name);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if !holds(&text) {
        return Ok(false);
    }
    let aside = data_dir.join(format!("{name}.revoked"));
    fs::rename(&path, &aside)
        .and_then(|()| fs::File::open(data_dir)?.sync_all())
        .with_context(|| format!("moving {} to {}", path.display(), aside.display()))?;
    Ok(true)
}

/// The value of `field` (`aws_access_key_id`, ...) in AWS shared-credentials
/// `text`, as `s3.credentials` holds it.
pub fn credentials_field(text: &str, field: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == field).then(|| v.trim().to_owned())
    })
}

/// Whether AWS shared-credentials `text` names `access_key`.
pub fn names_access_key(text: &str, access_key: &str) -> bool {
    credentials_field(text, "aws_access_key_id").is_some_and(|k| k == access_key)
}
/// The ledger's signer key, under `DATA_DIR/ledger/`.
pub const LOG_KEY_FILE: &str = "log.key";
/// The ledger's public verifier key (C2SP signed-note form), `DATA_DIR/ledger.vkey`.
pub const LEDGER_VKEY_FILE: &str = "ledger.vkey";
/// The development TSA's certificate, `DATA_DIR/tsa.pem`.
pub const TSA_CERT_FILE: &str = "tsa.pem";
/// Locked for its life by every process that owns DATA_DIR's index and
/// nodes (`up`, `gateway`, `recover-index`).
pub const LOCK_FILE: &str = "custodia.lock";
/// Present while `init` writes a new cluster, until its cluster file is
/// saved (the last step): what an init cut short (killed, power lost)
/// left is then told from an earlier cluster, and taken away by the next
/// init. It says whether `tls/` was there before (an operator's own).
const INIT_MARKER_FILE: &str = ".init-in-progress";

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub id: u32,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default)]
    pub failure_domain: Option<String>,
    /// Where Prometheus scrapes this node's `/metrics` (plain HTTP).
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Scrub read rate in bytes/s (default 32 MiB/s; 0 turns scrubbing off).
    #[serde(default)]
    pub scrub_bytes_per_sec: Option<u64>,
    /// Least seconds between the starts of two scrub passes (default a day).
    #[serde(default)]
    pub scrub_pass_interval_secs: Option<u64>,
    /// Shards up to this many bytes are packed into segments with group
    /// commit (default 64 KiB; 0 keeps every shard in its own file).
    #[serde(default)]
    pub small_shard_bytes: Option<u32>,
    /// Shard files of 64 KiB and more bypass the page cache with `O_DIRECT`
    /// (default true; false for file systems where direct I/O is slow).
    #[serde(default)]
    pub direct_io: Option<bool>,
    /// Free bytes the node keeps on its file system (default 256 MiB): it
    /// refuses new shards that would leave less, and the gateway sends new
    /// shards elsewhere while it is that full; deletes and compaction may
    /// still use the reserve.
    #[serde(default)]
    pub reserve_bytes: Option<u64>,
}

impl NodeSpec {
    /// The node's scrub settings, defaults filled in.
    pub fn scrub(&self) -> storage_node::scrub::ScrubConfig {
        let d = storage_node::scrub::ScrubConfig::default();
        storage_node::scrub::ScrubConfig {
            bytes_per_sec: self.scrub_bytes_per_sec.unwrap_or(d.bytes_per_sec),
            pass_interval: self
                .scrub_pass_interval_secs
                .map_or(d.pass_interval, std::time::Duration::from_secs),
        }
    }

    /// The node's store layout, defaults filled in.
    pub fn store(&self) -> storage_node::store::StoreConfig {
        let d = storage_node::store::StoreConfig::default();
        storage_node::store::StoreConfig {
            small_shard_max: self.small_shard_bytes.unwrap_or(d.small_shard_max),
            direct_io: self.direct_io.unwrap_or(d.direct_io),
            reserve_bytes: self.reserve_bytes.unwrap_or(d.reserve_bytes),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub gateway: GatewayConfig,
    pub nodes: Vec<NodeSpec>,
}

impl Cluster {
    pub fn load(data_dir: &Path) -> Result<Self> {
        let path = data_dir.join(CLUSTER_FILE);
        let cluster = Self::load_file(&path)?;
        // Here, where the gateway, `up` and `node add` read the file; not in
        // a node process, which has no use for a domain and must not stop
        // serving over one.
        cluster
            .domains_agree()
            .with_context(|| format!("in {}", path.display()))?;
        cluster.own_paths(&path)?;
        // An init that saved its file and was stopped before it took its
        // marker away: this cluster is whole, and may serve; the marker
        // must not outlive that (a later init would take it for its own).
        // (Looked for first: removing what is not there fails with EROFS,
        // not ENOENT, on a read-only mount, where `status` must still run.)
        let marker = data_dir.join(INIT_MARKER_FILE);
        if marker.try_exists().unwrap_or(false) {
            fs::remove_file(&marker).context("removing an init's marker")?;
        }
        Ok(cluster)
    }

    /// Refuses a cluster file that names another cluster's files: `init`
    /// writes absolute paths, so a data dir copied or restored elsewhere
    /// (to move it to a new disk, or to look into a backup) would serve the
    /// original's index, nodes and keys, and whatever was done to the copy
    /// would be done to the original. Paths outside DATA_DIR are fine (a
    /// node on a disk of its own, the index on an SSD); paths inside a
    /// directory holding another cluster file that names them too are not.
    /// Where it cannot tell (a relative path, a file it cannot read), it
    /// lets the path be. `file` is this cluster file, in its real folder
    /// (DATA_DIR), as the refusal names it.
    pub fn own_paths(&self, file: &Path) -> Result<()> {
        let data_dir = file.parent().unwrap_or(Path::new("/"));
        use std::os::unix::fs::MetadataExt as _;
        // The same directory by any name (a bind mount, a symlink).
        let identity = |dir: &Path| fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()));
        let home = identity(data_dir);
        let g = &self.gateway;
        let mut paths: Vec<&Path> = vec![&g.index_path, &g.tls.ca_cert, &g.tls.cert, &g.tls.key];
        if let Some(l) = &g.ledger {
            paths.extend([l.signer_key.as_path(), l.tiles_dir.as_path()]);
            paths.extend(l.openings_dir.as_deref());
        }
        for n in &self.nodes {
            paths.extend([n.data_dir.as_path(), n.cert.as_path(), n.key.as_path()]);
        }
        for p in paths.into_iter().filter(|p| p.is_absolute()) {
            let Some(nearest) = p
                .ancestors()
                .skip(1)
                .find(|a| a.join(CLUSTER_FILE).is_file())
            else {
                continue;
            };
            let theirs = identity(nearest).is_some_and(|id| Some(id) != home)
                && fs::read_to_string(nearest.join(CLUSTER_FILE))
                    .is_ok_and(|text| text.contains(&*p.to_string_lossy()));
            if theirs {
                let other = nearest;
                bail!(
                    "{} names {}, in the cluster at {}: this data dir was copied or moved from \
                     there (cluster.toml holds absolute paths), and would serve and change that \
                     cluster's files. Point the paths in {} at this directory's own files first",
                    file.display(),
                    p.display(),
                    other.display(),
                    file.display()
                );
            }
        }
        Ok(())
    }

    /// Writes `DATA_DIR/cluster.toml` durably, replacing it whole: a crash
    /// leaves the old file or the new one, never a torn one (without it the
    /// cluster does not start).
    pub fn save(&self, data_dir: &Path) -> Result<()> {
        storage_node::store::write_durably(
            data_dir,
            CLUSTER_FILE,
            &[toml::to_string_pretty(self)?.as_bytes()],
        )
        .with_context(|| format!("writing {}", data_dir.join(CLUSTER_FILE).display()))
    }

    /// Gives each node certificate made before they carried a name of their
    /// own (`node-ID.custodia.internal`) one that does, and records it for
    /// the gateway, which from then on requires it of that node: a key
    /// stolen from one node no longer passes for another. The node's key is
    /// kept, so only its certificate file changes, in one durable rename;
    /// cut short, the node still has a certificate its key matches, and the
    /// next run finishes. Run before the nodes start. Returns the nodes so
    /// named; none without the CA key beside the CA certificate (a CA kept
    /// elsewhere). Nodes this cluster file does not describe are left as
    /// they are; one whose key cannot be read is an error.
    pub fn name_node_certs(&mut self, data_dir: &Path) -> Result<Vec<u32>> {
        let unnamed: Vec<u32> = self
            .gateway
            .nodes
            .iter()
            .filter(|e| e.server_name.is_none())
            .map(|e| e.id)
            .collect();
        if unnamed.is_empty() {
            return Ok(Vec::new());
        }
        let Ok(ca_key) = fs::read_to_string(self.ca_cert().with_file_name("ca.key")) else {
            return Ok(Vec::new());
        };
        let ca_cert = fs::read_to_string(self.ca_cert())
            .with_context(|| format!("reading {}", self.ca_cert().display()))?;
        let ca = ClusterCa::from_pem(&ca_cert, &ca_key)?;
        let mut named = Vec::new();
        for id in unnamed {
            let Ok(spec) = self.node(id) else { continue };
            let (Some(dir), Some(file)) = (
                spec.cert.parent(),
                spec.cert.file_name().and_then(|f| f.to_str()),
            ) else {
                continue;
            };
            let key = fs::read_to_string(&spec.key)
                .with_context(|| format!("reading {}", spec.key.display()))?;
            let names = storage_node::tls::node_names(id);
            let cert = ca.reissue(&format!("custodia node {id}"), &names, &[], &key)?;
            storage_node::store::write_durably(dir, file, &[cert.as_bytes()])
                .with_context(|| format!("writing {}", spec.cert.display()))?;
            if let Some(e) = self.gateway.nodes.iter_mut().find(|e| e.id == id) {
                e.server_name = Some(storage_node::tls::node_server_name(id));
            }
            named.push(id);
        }
        if !named.is_empty() {
            self.save(data_dir)?;
        }
        Ok(named)
    }

    /// The cluster file at `path` (whatever its name).
    pub fn load_file(path: &Path) -> Result<Self> {
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cluster: Cluster =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        cluster
            .gateway
            .validate()
            .with_context(|| format!("in {}", path.display()))?;
        cluster
            .nodes_agree()
            .with_context(|| format!("in {}", path.display()))?;
        Ok(cluster)
    }

    /// A failure domain is placement's, which reads the `[[gateway.nodes]]`
    /// entry's: one set under `[[nodes]]` alone (beside the node's other
    /// settings) would be silently unused, and stripes would crowd into
    /// one rack. Refused, naming where to set it.
    pub(crate) fn domains_agree(&self) -> Result<()> {
        for n in &self.nodes {
            let Some(domain) = &n.failure_domain else {
                continue;
            };
            let dialled = self.gateway.nodes.iter().find(|e| e.id == n.id);
            if dialled.is_some_and(|e| e.failure_domain.as_ref() != Some(domain)) {
                anyhow::bail!(
                    "node {}'s [[nodes]] entry has failure_domain = {domain:?} but its \
                     [[gateway.nodes]] entry {}: placement reads the [[gateway.nodes]] one, so \
                     set it there (the two must agree)",
                    n.id,
                    match dialled.and_then(|e| e.failure_domain.as_deref()) {
                        Some(other) => format!("has {other:?}"),
                        None => "has none".to_owned(),
                    }
                );
            }
        }
        Ok(())
    }

    /// Each node is listed twice, where it listens (`[[nodes]]`) and where
    /// the gateway dials it (`[[gateway.nodes]]`). Where that is checkable
    /// the two must agree, or `up` starts a node where the gateway never
    /// finds it: a node listening on a loopback address (as `up` makes
    /// them) is dialled at that address. A node on another host, on every
    /// address (`0.0.0.0`) or behind a port mapping is dialled wherever its
    /// network says, and a file may list only the nodes of one host under
    /// `[[nodes]]`. No two nodes are dialled at one address.
    pub(crate) fn nodes_agree(&self) -> Result<()> {
        let mut dialled = std::collections::HashMap::new();
        for e in &self.gateway.nodes {
            if let Some(other) = dialled.insert(e.addr, e.id) {
                anyhow::bail!("nodes {other} and {} are both dialled at {}", e.id, e.addr);
            }
        }
        for n in self.nodes.iter().filter(|n| n.listen.ip().is_loopback()) {
            match self.gateway.nodes.iter().find(|e| e.id == n.id) {
                Some(e) if e.addr != n.listen => anyhow::bail!(
                    "node {} listens on {} but the gateway dials it at {}",
                    n.id,
                    n.listen,
                    e.addr
                ),
                Some(_) => {}
                None => anyhow::bail!("node {} has no [[gateway.nodes]] entry", n.id),
            }
        }
        Ok(())
    }

    pub fn node(&self, id: u32) -> Result<&NodeSpec> {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .with_context(|| format!("no node {id} in the cluster file"))
    }

    pub fn ca_cert(&self) -> &Path {
        &self.gateway.tls.ca_cert
    }

    /// The evidence API as this machine reaches this cluster's gateway: the
    /// scheme it serves (`https` under `api_tls`, which serves nothing in
    /// clear) and its listen address, an unspecified one dialled on
    /// loopback. Also whether that address is this machine's own (it binds
    /// here): plain HTTP to it crosses no network, as on the gateway's host
    /// with `listen` on a LAN address.
    pub fn local_api(&self) -> (String, bool) {
        let mut addr = self.gateway.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let scheme = if self.gateway.api_tls.is_some() {
            "https"
        } else {
            "http"
        };
        let here = UdpSocket::bind(SocketAddr::new(addr.ip(), 0)).is_ok();
        (format!("{scheme}://{addr}"), here)
    }
}

/// What `init` should create.
pub struct InitOptions {
    pub nodes: u32,
    pub k: u8,
    pub m: u8,
    pub shard_size: u32,
    pub api: SocketAddr,
    /// The S3 API's address, if any.
    pub s3: Option<SocketAddr>,
    /// First node's UDP port; 0 picks free ports now.
    pub node_base_port: u16,
    /// The gateway's `/metrics` address, if any.
    pub metrics: Option<SocketAddr>,
    /// First node's `/metrics` TCP port; 0 picks free ports now.
    pub node_metrics_base_port: u16,
    pub min_write_shards: Option<u8>,
    /// The ledger's origin (C2SP tlog-checkpoint) and key name.
    pub log_origin: String,
    /// Serve S3 over HTTPS with a certificate from the cluster CA.
    pub s3_tls: bool,
    /// Serve the evidence API over HTTPS with a certificate from the
    /// cluster CA.
    pub api_tls: bool,
}

/// A loopback UDP port free now, for a process started next to bind.
pub fn free_udp_port() -> Result<u16> {
    free_local_port(|port| UdpSocket::bind(("127.0.0.1", port)).is_ok())
}

/// A loopback TCP port free now, for a process started next to bind.
pub fn free_tcp_port() -> Result<u16> {
    free_local_port(|port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
}

/// Ports handed to child processes come from below Linux's default
/// ephemeral range (`ip_local_port_range`, 32768-60999): a port the kernel
/// picked for `bind(0)` could be handed to any socket bound to port 0 (a QUIC
/// client endpoint, an outgoing connection) between our check and the
/// child's bind, which made `custodia bench-s3` fail now and then with
/// "Address already in use". Each process walks its own sequence from a start
/// derived from its pid, so concurrent processes rarely try the same ports.
fn free_local_port(free: impl Fn(u16) -> bool) -> Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (start + n % SPAN) % SPAN) as u16;
        if free(port) {
            return Ok(port);
        }
    }
    bail!("no free loopback port from {LOW} to {}", LOW + SPAN - 1)
}

/// Creates the cluster CA, node and gateway certificates, the cluster file, the
/// index with an admin credential, and `admin.token`. Refuses to touch an
/// initialised directory.
pub async fn init(data_dir: &Path, opts: &InitOptions) -> Result<Cluster> {
    if data_dir.join(CLUSTER_FILE).exists() {
        bail!(
            "{} is already initialised (found {CLUSTER_FILE})",
            data_dir.display()
        );
    }
    // What an earlier cluster leaves: initialising over it would replace
    // the keys its evidence and receipts depend on (the CA, the ledger's
    // signing key, the one local copy of the key courts pin).
    let earlier: Vec<&str> = [
        "index.redb",
        "nodes",
        "ledger",
        "tls/ca.key",
        LEDGER_VKEY_FILE,
        ADMIN_TOKEN_FILE,
    ]
    .into_iter()
    .filter(|p| data_dir.join(p).exists())
    .collect();
    let marker = data_dir.join(INIT_MARKER_FILE);
    if !earlier.is_empty() && marker.exists() {
        // Not an earlier cluster: an init cut short before it saved its
        // cluster file, which nothing has served from.
        let tls_existed = fs::read_to_string(&marker).is_ok_and(|t| t.contains("tls-existed"));
        eprintln!(
            "note: an init of {} was cut short ({}); starting it again",
            data_dir.display(),
            earlier.join(", ")
        );
        remove_partial_init(data_dir, tls_existed);
    } else if !earlier.is_empty() {
        bail!(
            "{} holds an earlier cluster ({}) but no {CLUSTER_FILE}; initialising would replace \
             its keys and leave its evidence and receipts unverifiable. Restore {CLUSTER_FILE} \
             from a backup, or use an empty directory",
            data_dir.display(),
            earlier.join(", ")
        );
    }
    refuse_foreign_entries(data_dir)?;
    // Before anything is written: a shape refused after the keys were
    // made would leave them in a `tls/` the operator provided, and every
    // later init would take them for an earlier cluster's.
    check_options(opts)?;
    let tls_existed = data_dir.join("tls").exists();
    fs::create_dir_all(data_dir)?;
    storage_node::store::write_durably(
        data_dir,
        INIT_MARKER_FILE,
        &[if tls_existed {
            &b"tls-existed\n"[..]
        } else {
            &b"\n"[..]
        }],
    )
    .context("marking the init under way")?;
    let made = init_fresh(data_dir, opts).await;
    match &made {
        // Saved: whole.
        Ok(_) => {
            let _ = fs::remove_file(&marker);
        }
        // None of these existed (checked above): what a failed init wrote
        // goes, so it is not taken for an earlier cluster next time.
        Err(_) => remove_partial_init(data_dir, tls_existed),
    }
    made
}

/// Why `origin` cannot name a log, for a message.
pub fn origin_problem(origin: &str) -> String {
    format!(
        "the log origin {origin:?} is not one word without '+' (give a name like \
         example.org/custodia/2027): it is the first line of every checkpoint and the name of \
         the log's key"
    )
}

/// The options' shape, refused as the cluster file would be: the code,
/// enough nodes for it, the write quorum, and the log's origin.
fn check_options(opts: &InitOptions) -> Result<()> {
    let code = protocol::ErasureCode {
        k: opts.k,
        m: opts.m,
        shard_size: opts.shard_size,
    };
    gateway::config::check_shape(&code, opts.nodes as usize, opts.min_write_shards)?;
    if !protocol::ledger::origin_is_valid(&opts.log_origin) {
        bail!("{}", origin_problem(&opts.log_origin));
    }
    if let Some((a, b, addr)) = gateway::config::first_clash(&[
        ("--api", Some(opts.api)),
        ("--s3", opts.s3),
        ("--metrics", opts.metrics),
    ]) {
        bail!("{a} and {b} would both listen on {addr}: give one of them another address");
    }
    for (base, flag) in [
        (opts.node_base_port, "--node-base-port"),
        (opts.node_metrics_base_port, "--node-metrics-base-port"),
    ] {
        if base != 0 && u64::from(base) + u64::from(opts.nodes) > 65_536 {
            bail!(
                "{flag} {base}: the ports of {} nodes run past 65535",
                opts.nodes
            );
        }
    }
    Ok(())
}

/// What a directory may hold before a cluster is made in it: its locks,
/// an init's marker, `tls/` (certificates an operator put there for the
/// cluster to use), and a file system's `lost+found` (a volume given whole
/// to the cluster). Also the `.NAME.ID.tmp` files of a durable write an
/// init cut short left (see [`remove_partial_init`]).
const BEFORE_INIT: [&str; 5] = [
    LOCK_FILE,
    EDIT_LOCK_FILE,
    INIT_MARKER_FILE,
    "tls",
    "lost+found",
];

/// A durable write's temporary file (`.NAME.ID.tmp`), left by a process
/// killed while it wrote.
fn durable_leftover(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

/// Refuses to make a cluster in a directory that holds anything else: a
/// slip such as `--data-dir ~` or `--data-dir /srv` would otherwise put a
/// cluster among other files and make the whole directory its operator's
/// alone (0700), locking other users and services out of it.
fn refuse_foreign_entries(data_dir: &Path) -> Result<()> {
    let Ok(entries) = fs::read_dir(data_dir) else {
        return Ok(()); // made by the init itself
    };
    let mut foreign: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| !BEFORE_INIT.contains(&name.as_str()) && !durable_leftover(name))
        .collect();
    if foreign.is_empty() {
        return Ok(());
    }
    foreign.sort();
    let shown = foreign
        .iter()
        .take(5)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    bail!(
        "{} is not empty ({shown}{}): a cluster is made only in a new or empty directory \
         (which it makes its operator's alone, 0700), so give one, for example {}",
        data_dir.display(),
        if foreign.len() > 5 { ", ..." } else { "" },
        data_dir.join("custodia-data").display()
    )
}

/// Removes what an init that did not finish wrote (none of it existed
/// before; `tls/` unless it did), its marker last.
fn remove_partial_init(data_dir: &Path, tls_existed: bool) {
    for dir in ["nodes", "ledger"] {
        let _ = fs::remove_dir_all(data_dir.join(dir));
    }
    if !tls_existed {
        let _ = fs::remove_dir_all(data_dir.join("tls"));
    }
    for file in [
        "index.redb",
        LEDGER_VKEY_FILE,
        ADMIN_TOKEN_FILE,
        S3_CREDENTIALS_FILE,
        TSA_CERT_FILE,
    ] {
        let _ = fs::remove_file(data_dir.join(file));
    }
    // A write the kill cut short left its temporary file.
    if let Ok(entries) = fs::read_dir(data_dir) {
        for e in entries.filter_map(|e| e.ok()) {
            if durable_leftover(&e.file_name().to_string_lossy()) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    let _ = fs::remove_file(data_dir.join(INIT_MARKER_FILE));
}

async fn init_fresh(data_dir: &Path, opts: &InitOptions) -> Result<Cluster> {
    fs::create_dir_all(data_dir)?;
    let data_dir = data_dir.canonicalize()?;
    let tls = data_dir.join("tls");
    fs::create_dir_all(&tls)?;
    make_private(&data_dir);
    let ca = ClusterCa::generate("Custodia cluster CA")?;
    let (ca_pem, ca_key) = ca.to_pem();
    write_public(tls.join("ca.pem"), &ca_pem)?;
    storage_node::tls::write_private(&tls.join("ca.key"), ca_key.as_bytes())?;
    let loopback = vec![std::net::IpAddr::from([127, 0, 0, 1])];

    let mut nodes = Vec::new();
    let mut entries = Vec::new();
    for id in 0..opts.nodes {
        let port = if opts.node_base_port == 0 {
            free_udp_port()?
        } else {
            opts.node_base_port
                .checked_add(id as u16)
                .context("node ports run past 65535")?
        };
        let listen: SocketAddr = ([127, 0, 0, 1], port).into();
        let metrics_port = if opts.node_metrics_base_port == 0 {
            free_tcp_port()?
        } else {
            opts.node_metrics_base_port
                .checked_add(id as u16)
                .context("node metrics ports run past 65535")?
        };
        // Only the names gateways and nodes dial each other by: no address
        // or `localhost`, so a node's certificate can never pass for an
        // HTTPS API under the same CA (the CLI trusts it for the evidence
        // API), whoever holds a node's key; and one of its own, so it
        // cannot pass for another node either.
        let (cert, key) = ca.issue(
            &format!("custodia node {id}"),
            &storage_node::tls::node_names(id),
            &[],
        )?;
        let cert_path = tls.join(format!("node-{id}.pem"));
        let key_path = tls.join(format!("node-{id}.key"));
        write_public(&cert_path, cert)?;
        storage_node::tls::write_private(&key_path, key.as_bytes())?;
        let node_dir = data_dir.join("nodes").join(format!("n{id}"));
        create_private_dir(&node_dir)?;
        nodes.push(NodeSpec {
            id,
            listen,
            data_dir: node_dir,
            cert: cert_path,
            key: key_path,
            failure_domain: None,
            metrics_listen: Some(([127, 0, 0, 1], metrics_port).into()),
            scrub_bytes_per_sec: None,
            scrub_pass_interval_secs: None,
            small_shard_bytes: None,
            direct_io: None,
            reserve_bytes: None,
        });
        entries.push(NodeEntry {
            id,
            addr: listen,
            failure_domain: None,
            server_name: Some(storage_node::tls::node_server_name(id)),
        });
    }
    // The gateway's identity towards nodes: a name, no address (it serves
    // nothing under it; see the nodes' above).
    let (cert, key) = ca.issue(
        "custodia gateway",
        &["gateway.custodia.internal".to_string()],
        &[],
    )?;
    write_public(tls.join("gateway.pem"), cert)?;
    storage_node::tls::write_private(&tls.join("gateway.key"), key.as_bytes())?;
    let s3_tls = match opts.s3 {
        Some(addr) if opts.s3_tls => {
            // Path-style on localhost or the address, virtual-host style on
            // BUCKET.localhost.
            let mut ips = loopback.clone();
            if !addr.ip().is_unspecified() && !ips.contains(&addr.ip()) {
                ips.push(addr.ip());
            }
            let names = ["localhost".to_string(), "*.localhost".to_string()];
            let (cert, key) = ca.issue_server("custodia S3 API", &names, &ips)?;
            write_public(tls.join("s3.pem"), cert)?;
            storage_node::tls::write_private(&tls.join("s3.key"), key.as_bytes())?;
            Some(gateway::config::ServerTlsPaths {
                cert: tls.join("s3.pem"),
                key: tls.join("s3.key"),
            })
        }
        _ => None,
    };
    let api_tls = if opts.api_tls {
        let mut ips = loopback.clone();
        if !opts.api.ip().is_unspecified() && !ips.contains(&opts.api.ip()) {
            ips.push(opts.api.ip());
        }
        let (cert, key) =
            ca.issue_server("custodia evidence API", &["localhost".to_string()], &ips)?;
        write_public(tls.join("api.pem"), cert)?;
        storage_node::tls::write_private(&tls.join("api.key"), key.as_bytes())?;
        Some(gateway::config::ServerTlsPaths {
            cert: tls.join("api.pem"),
            key: tls.join("api.key"),
        })
    } else {
        None
    };

    // The ledger's signing key: C2SP signed-note Ed25519, owner-only; the
    // verifier key beside it is public (courts pin it).
    let ledger_dir = data_dir.join("ledger");
    fs::create_dir_all(&ledger_dir)?;
    let (skey, vkey) = protocol::ledger::note_keys(&opts.log_origin, &rand::random());
    storage_node::tls::write_private(&ledger_dir.join(LOG_KEY_FILE), skey.as_bytes())?;
    write_public(data_dir.join(LEDGER_VKEY_FILE), format!("{vkey}\n"))?;
    // A development TSA (RFC 3161): long-lived certificate for verifiers, key
    // for the gateway. Point `tsa.url` at a real TSA in production.
    let (tsa_cert, tsa_key) = protocol::tsa::make_tsa(protocol::tsa::DEVELOPMENT_TSA_NAME)
        .map_err(|e| anyhow::anyhow!("making the development TSA: {e}"))?;
    write_public(data_dir.join(TSA_CERT_FILE), tsa_cert)?;
    storage_node::tls::write_private(&ledger_dir.join("tsa.key"), tsa_key.as_bytes())?;
    let ledger = gateway::ledger::LedgerConfig {
        origin: opts.log_origin.clone(),
        signer_key: ledger_dir.join(LOG_KEY_FILE),
        tiles_dir: ledger_dir.join("tiles"),
        tiles_url: None,
        tiles_options: Default::default(),
        openings_dir: Some(ledger_dir.join("openings")),
        openings_url: None,
        receipt_wait_ms: 10_000,
        round_interval_ms: 25,
        witnesses: Vec::new(),
        witness_interval_ms: 2_000,
        archive_check_interval_ms: gateway::ledger::default_archive_check_interval(),
        tsa: Some(gateway::ledger::TsaConfig {
            url: None,
            cert: data_dir.join(TSA_CERT_FILE),
            dev_key: Some(ledger_dir.join("tsa.key")),
            interval_ms: 1_000,
        }),
    };

    let gateway = GatewayConfig {
        listen: opts.api,
        index_path: data_dir.join("index.redb"),
        tls: TlsPaths {
            ca_cert: tls.join("ca.pem"),
            cert: tls.join("gateway.pem"),
            key: tls.join("gateway.key"),
        },
        k: opts.k,
        m: opts.m,
        shard_size_bytes: opts.shard_size,
        min_write_shards: opts.min_write_shards,
        pipeline_stripes: 4,
        hedge_after_ms: 250,
        intent_lease_ms: 120_000,
        gc_interval_ms: 30_000,
        multipart_expiry_ms: 7 * 24 * 3_600_000,
        client_idle_timeout_ms: 60_000,
        shutdown_grace_ms: 20_000,
        s3_keep_alive_after_ms: 15_000,
        node_down_after_ms: 30_000,
        node_probe_interval_ms: 5_000,
        repair_interval_ms: 10_000,
        repair_after_down_ms: 600_000,
        repair_old_copy_grace_ms: gateway::repair::OLD_COPY_GRACE.as_millis() as u64,
        crowding_walk_gap_ms: 600_000,
        repair_rewalk_ms: 3_600_000,
        quarantine_recheck_ms: 600_000,
        ledger: Some(ledger),
        s3_listen: opts.s3,
        s3_domain: opts.s3.map(|_| "localhost".to_owned()),
        s3_tls,
        api_tls,
        metrics_listen: opts.metrics,
        orphan_sweep_interval_ms: 3_600_000,
        orphan_grace_ms: 6 * 3_600_000,
        orphan_sweep_max_evidence: 100,
        repair_ingest_stripes: 3,
        read_stripes_in_flight: 0,
        ingest_memory_mib: 0,
        receive_memory_mib: 0,
        read_memory_mib: 0,
        s3_journal_merge_files: 256,
        nodes: entries,
    };
    gateway.validate()?;
    let cluster = Cluster { gateway, nodes };

    let store = indexer::EmbeddedStore::open(&cluster.gateway.index_path)?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    create_tenant(&store, "admin", now_ms).await?;
    let admin = issue_credentials(&store, "admin", indexer::schema::Role::Admin, false).await?;
    drop(store);
    storage_node::tls::write_private(&data_dir.join(ADMIN_TOKEN_FILE), admin.token.as_bytes())?;
    storage_node::tls::write_private(
        &data_dir.join(S3_CREDENTIALS_FILE),
        admin.aws_profile("default").as_bytes(),
    )?;
    // The cluster file goes last: its presence means "initialised".
    cluster.save(&data_dir)?;
    Ok(cluster)
}

/// Stores new credentials for an existing tenant in one transaction, with a
/// message that says how to make a missing tenant.
pub async fn issue_credentials<S: indexer::KvStore>(
    store: &S,
    tenant: &str,
    role: indexer::schema::Role,
    bypass_governance: bool,
) -> Result<gateway::credentials::Credentials> {
    gateway::credentials::issue(store, tenant, role, bypass_governance)
        .await
        .map_err(|e| match e {
            indexer::s3::ObjectError::NoSuchTenant => anyhow::anyhow!(
                "no tenant {tenant:?}: create it first with `custodia tenant create {tenant}`"
            ),
            e => e.into(),
        })
}

/// Opens DATA_DIR's embedded index directly, which the gateway must not
/// hold open. An index a newer version of Custodia wrote is refused, as the
/// gateway refuses it.
pub async fn open_index_offline(data_dir: &Path) -> Result<OfflineIndex> {
    match open_index_unless_in_use(data_dir).await? {
        Offline::Opened(index) => Ok(index),
        Offline::InUse(why) => Err(why),
    }
}

/// DATA_DIR's index opened offline, with DATA_DIR's lock held as long as
/// it lives.
pub struct OfflineIndex {
    /// Declared before the lock: fields drop in order, so the index closes
    /// before the lock is released, and a gateway taking the lock at once
    /// can open it.
    pub store: indexer::EmbeddedStore,
    _lock: fs::File,
}

/// DATA_DIR's index, opened offline, or why another process has it.
pub enum Offline {
    Opened(OfflineIndex),
    /// Another custodia process (a gateway, most likely) holds DATA_DIR:
    /// the commands that can, ask the running gateway instead.
    InUse(anyhow::Error),
}

/// As [`open_index_offline`], telling a DATA_DIR another process holds
/// (ask its gateway) from every other failure (no cluster, a missing
/// index or one of a newer version), which no gateway would answer better.
pub async fn open_index_unless_in_use(data_dir: &Path) -> Result<Offline> {
    // DATA_DIR's lock first: `up` holds it from before its gateway opens the
    // index, and an index opened here in between would keep that gateway
    // from starting (the whole cluster would stop).
    require_cluster(data_dir)?;
    let Some(lock) = try_lock_data_dir(data_dir)? else {
        return Ok(Offline::InUse(
            in_use(data_dir).context("opening the index offline (stop the gateway first)"),
        ));
    };
    let cluster = Cluster::load(data_dir)?;
    let store = open_index(&cluster.gateway.index_path).with_context(|| {
        format!(
            "opening the index {} (stop the gateway first)",
            cluster.gateway.index_path.display()
        )
    })?;
    gateway::api::check_index_format(&store).await?;
    Ok(Offline::Opened(OfflineIndex { store, _lock: lock }))
}

/// Opens an initialised cluster's index, which must be there: opened where
/// it is missing, it would be made anew, empty, and the cluster taken for
/// one with no evidence (its shards for orphans to collect).
pub fn open_index(path: &Path) -> Result<indexer::EmbeddedStore> {
    if !path
        .try_exists()
        .with_context(|| format!("looking for the index {}", path.display()))?
    {
        anyhow::bail!(
            "the index {} is missing: if it was lost, rebuild it from the nodes and the ledger \
             with `custodia recover-index` (start the nodes first, each with `custodia node \
             --cluster DATA_DIR/cluster.toml --id N`)",
            path.display()
        );
    }
    indexer::EmbeddedStore::open(path)
        .with_context(|| format!("opening the index {}", path.display()))
}

/// The evidence API of the gateway that holds DATA_DIR's index, and the
/// admin token `init` wrote: how the CLI reaches a running cluster. The
/// address is the gateway's listen address unless `api` gives the URL (a
/// certificate issued for a host name does not match a bare IP). Only an
/// explicit argument, never the environment (`CUSTODIA_API` may name
/// another cluster, and this sends DATA_DIR's admin token).
pub fn running_gateway(data_dir: &Path, api: Option<&str>) -> Result<(String, String)> {
    let cluster = Cluster::load(data_dir)?;
    let named = api
        .map(|url| url.trim().trim_end_matches('/').to_owned())
        .filter(|url| !url.is_empty());
    let token = fs::read_to_string(data_dir.join(ADMIN_TOKEN_FILE))
        .with_context(|| format!("reading {}", data_dir.join(ADMIN_TOKEN_FILE).display()))?;
    // The cluster CA, unless CUSTODIA_CA_CERT names another (or `public`).
    let ca = std::env::var_os("CUSTODIA_CA_CERT").map(std::path::PathBuf::from);
    crate::client::trust(
        Some(ca.as_deref().unwrap_or(&cluster.gateway.tls.ca_cert)),
        None,
    );
    // The admin token goes out, and new secrets come back: never in clear
    // across a network. The gateway's own address from cluster.toml is
    // fine when it is this machine's.
    let (own, here) = cluster.local_api();
    let local = named.is_none() && here;
    let api = named.unwrap_or(own);
    if !local {
        crate::client::refuse_clear_text(&api)?;
    }
    Ok((api, token.trim().to_owned()))
}

/// Registers a tenant; false if it already existed.
pub async fn create_tenant<S: indexer::KvStore>(
    store: &S,
    name: &str,
    now_ms: u64,
) -> Result<bool> {
    Ok(gateway::credentials::create_tenant(store, name, now_ms).await?)
}

/// Worker threads for each of `nodes` storage nodes that share this machine
/// (`custodia up`, the benchmarks): the cores split between them, at least
/// one each. Every node runtime defaulting to one worker per core puts
/// nodes x cores threads on the cores, each parked worker woken for new
/// tasks only to find them taken. `TOKIO_WORKER_THREADS`, when the operator
/// sets it, wins.
pub fn colocated_node_workers(nodes: usize) -> Option<String> {
    if std::env::var_os("TOKIO_WORKER_THREADS").is_some() {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some((cores / nodes.max(1)).max(1).to_string())
}

/// Takes the lock on editing `DATA_DIR/cluster.toml` (a file beside it),
/// waiting for another edit to finish, for as long as the returned file
/// lives: each edit reads the file, changes it and writes it back whole
/// under the lock, so two at once (`node add` twice, or beside `up`
/// naming certificates, or a key rotation) never lose one another's
/// change. Apart from the data directory's lock, which `up` holds for its
/// whole run.
pub fn lock_cluster_edits(data_dir: &Path) -> Result<fs::File> {
    require_cluster(data_dir)?;
    let path = data_dir.join(EDIT_LOCK_FILE);
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.lock()
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(file)
}

/// See [`lock_cluster_edits`].
pub const EDIT_LOCK_FILE: &str = "cluster.toml.lock";

/// [`lock_data_dir`] for a command that needs the cluster there: a
/// mistyped DATA_DIR is said so, and no directory or lock file is made.
pub fn lock_cluster_dir(data_dir: &Path) -> Result<fs::File> {
    require_cluster(data_dir)?;
    lock_data_dir(data_dir)
}

/// Refuses a DATA_DIR with no cluster in it (a mistyped one), saying so.
fn require_cluster(data_dir: &Path) -> Result<()> {
    if !data_dir.join(CLUSTER_FILE).exists() {
        bail!(
            "no cluster in {} (no {CLUSTER_FILE}; `custodia init` or `custodia up` makes one, \
             --data-dir names another)",
            data_dir.display()
        );
    }
    Ok(())
}

/// Takes DATA_DIR's lock ([`LOCK_FILE`]) for as long as the returned file
/// lives: one process at a time owns a data directory's index, nodes and
/// logs. Refuses when another holds it.
pub fn lock_data_dir(data_dir: &Path) -> Result<fs::File> {
    try_lock_data_dir(data_dir)?.ok_or_else(|| in_use(data_dir))
}

/// DATA_DIR's lock, or `None` while another process holds it.
fn try_lock_data_dir(data_dir: &Path) -> Result<Option<fs::File>> {
    let path = data_dir.join(LOCK_FILE);
    storage_node::store::lock_file(&path).with_context(|| format!("locking {}", path.display()))
}

/// That another process holds DATA_DIR's lock.
fn in_use(data_dir: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "{} is in use by another custodia process (up, gateway or recover-index); stop it first",
        data_dir.display()
    )
}

/// Creates `dir` (and its parents) with the node's own 0700 from the
/// start, as the node itself keeps it: it will hold evidence.
pub(crate) fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// Makes a cluster's directory and its `tls/` its operator's alone (0700):
/// the index holds S3 secret keys, node directories hold evidence and the
/// ledger's archive opens sealed statements. `init` and every `up` do it
/// (so a cluster made by an older version is tightened too); a directory
/// this process may not restrict is warned about.
pub(crate) fn make_private(data_dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for dir in [data_dir.to_path_buf(), data_dir.join("tls")] {
        if let Err(e) = fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)) {
            tracing::warn!(dir = %dir.display(), error = %e, "could not make the directory private");
        }
    }
}

#[cfg(test)]
mod port_tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let tcp = free_tcp_port().expect("tcp port");
            let udp = free_udp_port().expect("udp port");
            for port in [tcp, udp] {
                assert!((10_000..32_000).contains(&port), "port {port}");
                assert!(seen.insert(port), "port {port} handed out twice");
            }
            std::net::TcpListener::bind(("127.0.0.1", tcp)).expect("tcp port is free");
            UdpSocket::bind(("127.0.0.1", udp)).expect("udp port is free");
        }
    }
}
