//! `custodia node add|drain|activate|remove`: a node's lifecycle.
//!
//! `add` works on DATA_DIR offline (a certificate from the cluster CA, a
//! data dir and ports, recorded in cluster.toml); the others ask the running
//! gateway, which records the decision in the index so every gateway and
//! the repair worker follow it.

use crate::cluster::{Cluster, NodeSpec};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;

/// The ids of nodes given a certificate (`tls/node-ID.pem`) or a folder
/// (`nodes/nID`) in DATA_DIR, and those decided about (drained, removed)
/// as far as this host can read offline: the openings archive's copies of
/// the decisions (a local archive, where the gateway keeps it), and the removed nodes each node
/// of this host keeps refusing. An operator who deleted a removed node's
/// certificate and folder (to destroy its key) and its cluster.toml
/// entries leaves its id in these.
fn ids_used(data_dir: &Path, cluster: &Cluster) -> Vec<u32> {
    let mut ids = ids_issued(data_dir);
    let local_archive = cluster
        .gateway
        .ledger
        .as_ref()
        .filter(|l| l.openings_url.is_none())
        .map(|l| l.local_openings_dir());
    if let Some(dir) = local_archive {
        let decided = dir.join(gateway::lifecycle_archive::DIR);
        for e in std::fs::read_dir(decided).into_iter().flatten().flatten() {
            if let Ok(id) = e.file_name().to_string_lossy().parse::<u32>() {
                ids.push(id);
            }
        }
    }
    for n in &cluster.nodes {
        let denied = n.data_dir.join(storage_node::server::DENIED_FILE);
        if let Ok(text) = std::fs::read_to_string(denied) {
            ids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
    }
    ids
}

/// The ids of nodes given a certificate (`tls/node-ID.pem`) or a folder
/// (`nodes/nID`) in DATA_DIR.
fn ids_issued(data_dir: &Path) -> Vec<u32> {
    let names = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    let certs = names(&data_dir.join("tls")).into_iter().filter_map(|n| {
        n.strip_prefix("node-")?
            .strip_suffix(".pem")?
            .parse::<u32>()
            .ok()
    });
    let folders = names(&data_dir.join("nodes"))
        .into_iter()
        .filter_map(|n| n.strip_prefix('n')?.parse::<u32>().ok());
    certs.chain(folders).collect()
}

/// Adds a node to DATA_DIR's cluster file; returns its id.
pub fn add(
    data_dir: &Path,
    failure_domain: Option<String>,
    listen: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
) -> Result<u32> {
    let _edit = crate::cluster::lock_cluster_edits(data_dir)?;
    let mut cluster = Cluster::load(data_dir)?;
    let data_dir = data_dir.canonicalize()?;
    // Past every id either list holds (a file may list under [[nodes]]
    // only this host's nodes, and the gateway's list all of them), and
    // every id a node was ever given here: a node removed and taken out of
    // the file keeps its certificate and folder, and its id stays removed
    // in the index, so a new node under it could never take shards.
    let id = cluster
        .nodes
        .iter()
        .map(|n| n.id + 1)
        .chain(cluster.gateway.nodes.iter().map(|e| e.id + 1))
        .chain(ids_used(&data_dir, &cluster).into_iter().map(|id| id + 1))
        .max()
        .unwrap_or(0);
    // An address another node of the file has (a stopped node's port is
    // free to bind just now, but not to take): refused before anything is
    // written, since the file would then not load.
    // One address bound on all interfaces (0.0.0.0:P) takes P on every
    // one of them.
    let clash = |a: &SocketAddr, b: &SocketAddr| {
        a == b || (a.port() == b.port() && (a.ip().is_unspecified() || b.ip().is_unspecified()))
    };
    let listened = |a: &SocketAddr| {
        cluster
            .gateway
            .nodes
            .iter()
            .find(|e| clash(&e.addr, a))
            .map(|e| e.id)
            .or_else(|| {
                cluster
                    .nodes
                    .iter()
                    .find(|n| clash(&n.listen, a))
                    .map(|n| n.id)
            })
    };
    let scraped = |a: &SocketAddr| {
        cluster
            .nodes
            .iter()
            .find(|n| n.metrics_listen.is_some_and(|m| clash(&m, a)))
            .map(|n| n.id)
    };
    let pick = |given: Option<SocketAddr>,
                taken: &dyn Fn(&SocketAddr) -> Option<u32>,
                free: fn() -> Result<u16>,
                what: &str|
     -> Result<SocketAddr> {
        match given {
            Some(a) => match taken(&a) {
                Some(other) => {
                    anyhow::bail!("{a} is already node {other}'s {what}; choose another")
                }
                None => Ok(a),
            },
            None => {
                for _ in 0..100 {
                    let a: SocketAddr = ([127, 0, 0, 1], free()?).into();
                    if taken(&a).is_none() {
                        return Ok(a);
                    }
                }
                anyhow::bail!("found no free port for the node's {what}; give one")
            }
        }
    };
    let listen = pick(listen, &listened, crate::cluster::free_udp_port, "address")?;
    let metrics = pick(
        metrics,
        &scraped,
        crate::cluster::free_tcp_port,
        "metrics address",
    )?;
    let tls = data_dir.join("tls");
    // The CA the cluster file names (it may be kept elsewhere), its key
    // beside it, as `up` reads them.
    let ca_cert = cluster.ca_cert().to_path_buf();
    let ca_key = ca_cert.with_file_name("ca.key");
    let ca = storage_node::tls::ClusterCa::from_pem(
        &std::fs::read_to_string(&ca_cert)
            .with_context(|| format!("reading the cluster CA {}", ca_cert.display()))?,
        &std::fs::read_to_string(&ca_key)
            .with_context(|| format!("reading the cluster CA key {}", ca_key.display()))?,
    )?;
    // Only the names nodes are dialled by (see `cluster::init`).
    let names = storage_node::tls::node_names(id);
    let (cert, key) = ca.issue(&format!("custodia node {id}"), &names, &[])?;
    let cert_path = tls.join(format!("node-{id}.pem"));
    let key_path = tls.join(format!("node-{id}.key"));
    storage_node::store::write_durably(&tls, &format!("node-{id}.pem"), &[cert.as_bytes()])
        .with_context(|| format!("writing {}", cert_path.display()))?;
    storage_node::tls::write_private(&key_path, key.as_bytes())?;
    let node_dir = data_dir.join("nodes").join(format!("n{id}"));
    crate::cluster::create_private_dir(&node_dir)?;
    cluster.nodes.push(NodeSpec {
        id,
        listen,
        data_dir: node_dir,
        cert: cert_path,
        key: key_path,
        failure_domain: failure_domain.clone(),
        metrics_listen: Some(metrics),
        scrub_bytes_per_sec: None,
        scrub_pass_interval_secs: None,
        small_shard_bytes: None,
        direct_io: None,
        reserve_bytes: None,
    });
    cluster.gateway.nodes.push(gateway::config::NodeEntry {
        id,
        addr: listen,
        failure_domain,
        server_name: Some(storage_node::tls::node_server_name(id)),
    });
    cluster.gateway.validate()?;
    cluster.nodes_agree()?;
    cluster.save(&data_dir)?;
    Ok(id)
}

/// Posts a lifecycle action for node `id`; returns the gateway's answer.
pub fn act(api: &str, token: &str, id: u32, action: &str, force: bool) -> Result<Value> {
    let force = if force { "?force=true" } else { "" };
    crate::client::admin_call(
        api,
        token,
        "POST",
        &format!("/v1/admin/nodes/{id}/{action}{force}"),
    )
}

/// How many stripes still place a shard on node `id`, with the uploads
/// under way that may still hold shards on it unrecorded and the stripes
/// whose lost copies the orphan sweep has yet to look for.
pub fn stripes_left(api: &str, token: &str, id: u32) -> Result<u64> {
    left_of(&node_detail(api, token, id)?)
}

/// The gateway's account of node `id` (`GET /v1/admin/nodes/{id}`: a walk
/// of every stripe record).
fn node_detail(api: &str, token: &str, id: u32) -> Result<Value> {
    crate::client::admin_call(api, token, "GET", &format!("/v1/admin/nodes/{id}"))
}

/// [`stripes_left`], from the node's account `v`.
fn left_of(v: &Value) -> Result<u64> {
    let uploads = v["uploads_in_flight"].as_u64().unwrap_or(0);
    // Copies the node may hold that the index lost track of: the removal
    // waits for the orphan sweep to look for them.
    let unadopted = v["stripes_awaiting_adoption"].as_u64().unwrap_or(0);
    // Records the gateway could not read may place shards on it: a removal
    // refuses them, so the drain is not done while there are any.
    let unreadable = v["stripe_records_unreadable"].as_u64().unwrap_or(0);
    v["stripes"]
        .as_u64()
        .map(|s| s + uploads + unadopted + unreadable)
        .context("the gateway's answer has no stripe count")
}

/// Follows a drain with a progress bar until no stripe places a shard on
/// node `id`, or until the count stops shrinking for `patience`.
pub fn wait_drained(api: &str, token: &str, id: u32, patience: std::time::Duration) -> Result<()> {
    let asked = std::time::Instant::now();
    let mut detail = node_detail(api, token, id)?;
    let mut took = asked.elapsed();
    let first = left_of(&detail)?;
    let bar = indicatif::ProgressBar::new(first.max(1));
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "drain [{bar:40}] {pos}/{len} stripes moved {per_sec} eta {eta} {msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    let (mut best, mut since) = (first, std::time::Instant::now());
    loop {
        // Each answer is a walk of every stripe record: asked again after
        // four times as long as the last took (half a second at least, a
        // minute at most), so following a drain of a large index does not
        // keep the gateway walking it back to back.
        let pause = (took * 4).clamp(
            std::time::Duration::from_millis(500),
            std::time::Duration::from_secs(60),
        );
        let left = left_of(&detail)?;
        bar.set_position(first.saturating_sub(left));
        if left == 0 {
            bar.finish_with_message(format!("node {id} holds no shard any stripe needs"));
            return Ok(());
        }
        if left < best {
            (best, since) = (left, std::time::Instant::now());
        } else if since.elapsed() >= patience {
            bar.abandon_with_message(format!("{left} stripes left"));
            // Stripes repair does not move: parts of S3 multipart uploads
            // stored before parts could be found by id (they move once
            // completed, go once aborted or expired).
            let count = |field: &str| detail[field].as_u64().filter(|&n| n > 0);
            let mut parts = count("stripes_of_unfinished_uploads")
                .map(|n| {
                    format!(
                        "; {n} of them belong to S3 multipart uploads that repair does not move \
                         (parts stored by an older version, or of ended uploads awaiting \
                         deletion), which move once completed and go once aborted or expired \
                         (`aws s3api list-multipart-uploads`)"
                    )
                })
                .unwrap_or_default();
            if let Some(n) = count("stripe_records_unreadable") {
                parts.push_str(&format!(
                    "; {n} stripe records could not be read, and may place shards on it: \
                     the gateway's log names them"
                ));
            }
            bail!(
                "the drain of node {id} stopped with {left} stripes left{parts} (see the gateway's log)"
            );
        }
        std::thread::sleep(pause);
        let asked = std::time::Instant::now();
        detail = node_detail(api, token, id)?;
        took = asked.elapsed();
    }
}

#[cfg(test)]
mod tests {
    /// Ids once given here are found from what they left: a certificate, a
    /// folder; nothing else counts.
    #[test]
    fn ids_once_issued_are_found_from_their_certificates_and_folders() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("tls")).unwrap();
        std::fs::create_dir_all(d.join("nodes").join("n3")).unwrap();
        std::fs::create_dir_all(d.join("nodes").join("notes")).unwrap();
        for f in [
            "node-9.pem",
            "node-9.key",
            "ca.pem",
            "gateway.pem",
            "node-x.pem",
        ] {
            std::fs::write(d.join("tls").join(f), b"").unwrap();
        }
        let mut ids = super::ids_issued(d);
        ids.sort_unstable();
        assert_eq!(ids, [3, 9]);
    }
}
