//! `custodia bench`: the hot paths measured in one run on one machine, so the
//! figures compare with each other.
//!
//! Raw kernels first: QUIC bulk transfer over loopback with the cluster's
//! mutual TLS, BLAKE3 + SHA-256 + Reed-Solomon over stripes, durable shard-sized
//! file writes (temp file, fsync, rename, fsync dir). Then end to end on a fresh local
//! cluster (node processes, a gateway): ingest and read MB/s through the evidence
//! API. The ratios BENCHMARKS.md tracks are printed last:
//! `ingest / (min(QUIC, disk) / ((k+m)/k))` and `read / QUIC`.

use crate::cluster::{self, Cluster, InitOptions};
use anyhow::{bail, Context, Result};
use sha2::Digest;
use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Storage nodes of the end-to-end cluster.
    #[arg(long, default_value_t = 8)]
    nodes: u32,
    #[arg(long, default_value_t = 4)]
    k: u8,
    #[arg(long, default_value_t = 2)]
    m: u8,
    /// Evidence sizes to file and read, in MiB.
    #[arg(long, value_delimiter = ',', default_values_t = [64u64, 1024])]
    sizes_mib: Vec<u64>,
    /// Filings per size.
    #[arg(long, default_value_t = 2)]
    repeat: u32,
    /// Where the cluster keeps its data (default: a temporary directory).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// The nodes' `small_shard_bytes` (default: the nodes' default): shards
    /// up to this size are packed into segments with group commit.
    #[arg(long)]
    small_shard_bytes: Option<u32>,
    /// Bytes per shard (default: the gateway's default, 1 MiB).
    #[arg(long)]
    shard_size: Option<u32>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// One size's end-to-end figures.
struct Row {
    mib: u64,
    ingest: f64,
    read: f64,
    /// Busy CPU seconds of the whole machine per GiB filed / read.
    ingest_cpu: f64,
    read_cpu: f64,
}

/// Busy CPU seconds of the whole machine so far (`/proc/stat`: user, nice,
/// system, irq, softirq; not idle, iowait or time stolen by a hypervisor).
pub(crate) fn machine_busy() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let ticks = clock_ticks()?;
    busy_seconds(&stat, ticks).context("unreadable /proc/stat")
}

/// [`machine_busy`] from the text of `/proc/stat`.
fn busy_seconds(stat: &str, ticks_per_s: f64) -> Option<f64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal ...
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)?;
    Some(busy as f64 / ticks_per_s)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 where it cannot say).
pub(crate) fn clock_ticks() -> Result<f64> {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    Ok(*TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    }))
}

/// QUIC bulk's CPU per GiB over a read's; 0 when the read's could not be
/// measured (a clock tick coarser than the run), never infinite.
fn cpu_ratio(quic: f64, read: f64) -> f64 {
    if read > 0.0 {
        quic / read
    } else {
        0.0
    }
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9)
}

/// MB/s moved over QUIC from one endpoint to another on loopback, 4 streams:
/// the better of two runs, one on sockets with the cluster's buffers
/// (`storage_node::udp`) and one with the kernel's default buffers. A
/// single flow goes faster with small buffers (its data stays in cache);
/// the cluster's many flows need large ones to avoid drops. The better run
/// is the fair denominator either way.
pub(crate) async fn quic_bulk(dir: &Path) -> Result<f64> {
    Ok(quic_bulk_cost(dir).await?.0)
}

/// [`quic_bulk`]'s MB/s with the busy CPU seconds of the whole machine per
/// GiB moved (both ends, of the faster run): what a read's own CPU cost per
/// GiB compares with, steadier than MB/s when other tenants load the machine.
pub(crate) async fn quic_bulk_cost(dir: &Path) -> Result<(f64, f64)> {
    let sized = quic_bulk_run(dir, true).await?;
    let default = quic_bulk_run(dir, false).await?;
    Ok(if sized.0 >= default.0 { sized } else { default })
}

/// One [`quic_bulk_cost`] run; `sized`: with the cluster's socket buffers.
async fn quic_bulk_run(dir: &Path, sized: bool) -> Result<(f64, f64)> {
    let ca = storage_node::tls::ClusterCa::generate("bench CA")?;
    let (ca_pem, _) = ca.to_pem();
    std::fs::write(dir.join("ca.pem"), ca_pem)?;
    let loopback = [std::net::IpAddr::from([127, 0, 0, 1])];
    let mut files = Vec::new();
    for who in ["server", "client"] {
        let (cert, key) = ca.issue(
            who,
            &[storage_node::tls::NODE_SERVER_NAME.to_string()],
            &loopback,
        )?;
        std::fs::write(dir.join(format!("{who}.pem")), cert)?;
        storage_node::tls::write_private(&dir.join(format!("{who}.key")), key.as_bytes())?;
        files.push(storage_node::tls::TlsFiles {
            ca_cert: dir.join("ca.pem"),
            cert: dir.join(format!("{who}.pem")),
            key: dir.join(format!("{who}.key")),
        });
    }
    let local: std::net::SocketAddr = ([127, 0, 0, 1], 0).into();
    let server_config = storage_node::tls::server_config(&files[0])?;
    let server = if sized {
        let endpoint_config = storage_node::tls::endpoint_config(&files[0], protocol::NodeId(0))?;
        storage_node::udp::endpoint(local, Some((endpoint_config, server_config)))?
    } else {
        quinn::Endpoint::server(server_config, local)?
    };
    let addr = server.local_addr()?;
    let sink = tokio::spawn(async move {
        let Some(incoming) = server.accept().await else {
            return;
        };
        let Ok(conn) = incoming.await else { return };
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            tokio::spawn(async move {
                while let Ok(Some(_)) = recv.read_chunk(1 << 20, false).await {}
                let _ = send.write_all(b"k").await;
                let _ = send.finish();
            });
        }
    });
    let mut client = if sized {
        storage_node::udp::endpoint(local, None)?
    } else {
        quinn::Endpoint::client(local)?
    };
    client.set_default_client_config(storage_node::tls::client_config(&files[1])?);
    let conn = client
        .connect(addr, storage_node::tls::NODE_SERVER_NAME)?
        .await?;
    let chunk = bytes::Bytes::from(vec![0x5au8; 1 << 20]);
    let per_stream: u64 = 512;
    let streams = 4;
    let (start, busy) = (Instant::now(), machine_busy()?);
    let sends = (0..streams).map(|_| {
        let conn = conn.clone();
        let chunk = chunk.clone();
        async move {
            let (mut send, mut recv) = conn.open_bi().await?;
            for _ in 0..per_stream {
                send.write_chunk(chunk.clone()).await?;
            }
            send.finish()?;
            let mut ack = [0u8; 1];
            recv.read_exact(&mut ack).await?;
            anyhow::Ok(())
        }
    });
    for r in futures::future::join_all(sends).await {
        r?;
    }
    let elapsed = start.elapsed();
    let cpu = (machine_busy()? - busy) / ((streams * per_stream) as f64 / 1024.0);
    conn.close(0u32.into(), b"done");
    sink.abort();
    Ok((mbps((streams * per_stream) << 20, elapsed), cpu))
}

/// MB/s of content through BLAKE3 + SHA-256 (the ingest's one pass) and
/// Reed-Solomon coding with shard hashes, on one core, for 256 MiB of
/// stripes of `shard`-byte shards.
fn hash_and_code(k: usize, m: usize, shard: usize) -> Result<f64> {
    let rs = reed_solomon_erasure::galois_8::ReedSolomon::new(k, m)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let stripe: Vec<u8> = (0..k * shard).map(|i| (i * 31 % 251) as u8).collect();
    let rounds = ((256usize << 20) / stripe.len()).max(1);
    let pool = storage_node::buffers::BufferPool::new((k + m) * shard);
    let start = Instant::now();
    let mut b3 = blake3::Hasher::new();
    let mut sha = sha2::Sha256::new();
    for _ in 0..rounds {
        b3.update(&stripe);
        sha.update(&stripe);
        let shards = gateway::ingest::encode_stripe(&rs, k, m, &stripe, shard, &pool)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        for s in shards {
            std::hint::black_box(blake3::hash(&s));
            pool.give(s);
        }
    }
    std::hint::black_box((b3.finalize(), sha.finalize()));
    Ok(mbps((rounds * stripe.len()) as u64, start.elapsed()))
}

/// MB/s of `shard`-byte files (256 MiB of them) written durably the way
/// nodes write shards.
fn durable_disk(dir: &Path, shard: usize) -> Result<f64> {
    let target = dir.join("disk");
    std::fs::create_dir_all(&target)?;
    let body = vec![0xa5u8; shard];
    let files = ((256usize << 20) / shard.max(1)).max(1);
    let start = Instant::now();
    for i in 0..files {
        storage_node::store::write_durably(&target, &format!("f{i}"), &[&body])?;
    }
    Ok(mbps((files * shard) as u64, start.elapsed()))
}

pub(crate) struct LocalCluster {
    /// Node processes, in node order; dropping the cluster kills them.
    pub(crate) children: Vec<Child>,
    pub(crate) cluster: Cluster,
}

impl LocalCluster {
    pub(crate) async fn start(dir: &Path, nodes: u32, k: u8, m: u8) -> Result<Self> {
        Self::start_with(dir, nodes, k, m, ([127, 0, 0, 1], 0).into(), None, None).await
    }

    /// [`LocalCluster::start`] with the evidence API's address in the
    /// cluster file set to `api`, the S3 API on `s3` when given, and the
    /// nodes' `small_shard_bytes` when given.
    pub(crate) async fn start_with(
        dir: &Path,
        nodes: u32,
        k: u8,
        m: u8,
        api: std::net::SocketAddr,
        s3: Option<std::net::SocketAddr>,
        small_shard_bytes: Option<u32>,
    ) -> Result<Self> {
        let opts = InitOptions {
            nodes,
            k,
            m,
            shard_size: protocol::ErasureCode::DEFAULT_SHARD_SIZE,
            api,
            s3,
            node_base_port: 0,
            metrics: None,
            node_metrics_base_port: 0,
            min_write_shards: None,
            log_origin: "custodia.local/bench".into(),
            s3_tls: false,
            api_tls: false,
        };
        let mut cluster = cluster::init(dir, &opts).await?;
        if small_shard_bytes.is_some() {
            for n in &mut cluster.nodes {
                n.small_shard_bytes = small_shard_bytes;
            }
            std::fs::write(
                dir.join(cluster::CLUSTER_FILE),
                toml::to_string_pretty(&cluster)?,
            )?;
        }
        let exe = std::env::current_exe()?;
        let mut children = Vec::new();
        for n in &cluster.nodes {
            children.push(
                Command::new(&exe)
                    .args(["node", "--id", &n.id.to_string(), "--cluster"])
                    .arg(dir.join(cluster::CLUSTER_FILE))
                    .env("RUST_LOG", "warn")
                    .envs(
                        cluster::colocated_node_workers(cluster.nodes.len())
                            .map(|w| ("TOKIO_WORKER_THREADS", w)),
                    )
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .kill_on_drop(true)
                    .spawn()?,
            );
        }
        Ok(LocalCluster { children, cluster })
    }
}

/// Waits until the gateway at `api` sees `nodes` healthy nodes.
pub(crate) async fn wait_healthy(api: &str, nodes: u32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let healthy = crate::client::agent()?
            .get(format!("{api}/healthz"))
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_json::<serde_json::Value>().ok())
            .and_then(|v| v["nodes_healthy"].as_u64())
            .unwrap_or(0);
        if healthy >= nodes as u64 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the bench cluster did not become healthy");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(crate) fn http_put(api: &str, token: &str, data: Arc<Vec<u8>>) -> Result<()> {
    let mut resp = crate::client::agent()?
        .post(format!("{api}/v1/evidence"))
        .header("authorization", format!("Bearer {token}"))
        .send(&data[..])?;
    if resp.status().as_u16() != 201 {
        bail!(
            "filing answered {}: {}",
            resp.status(),
            resp.body_mut().read_to_string().unwrap_or_default()
        );
    }
    let v: serde_json::Value = resp.body_mut().read_json()?;
    let _ = v["id"].as_str().context("no id")?;
    Ok(())
}

fn http_put_id(api: &str, token: &str, data: &[u8]) -> Result<String> {
    let mut resp = crate::client::agent()?
        .post(format!("{api}/v1/evidence"))
        .header("authorization", format!("Bearer {token}"))
        .send(data)?;
    if resp.status().as_u16() != 201 {
        bail!("filing answered {}", resp.status());
    }
    let v: serde_json::Value = resp.body_mut().read_json()?;
    Ok(v["id"].as_str().context("no id")?.to_string())
}

fn http_get(api: &str, token: &str, id: &str) -> Result<u64> {
    let mut resp = crate::client::agent()?
        .get(format!("{api}/v1/evidence/{id}"))
        .header("authorization", format!("Bearer {token}"))
        .call()?;
    if resp.status().as_u16() != 200 {
        bail!("read answered {}", resp.status());
    }
    let mut reader = resp.body_mut().as_reader();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

pub async fn run(args: BenchArgs) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let (k, m) = (args.k as usize, args.m as usize);
    eprintln!("measuring raw kernels...");
    let (quic, quic_cpu) = quic_bulk_cost(&dir).await?;
    // The kernels at the shards the cluster will cut: a 4 MiB shard file
    // is written (and coded) faster per byte than a 1 MiB one, and the
    // ceiling must be the one the nodes face.
    let shard = args
        .shard_size
        .unwrap_or(protocol::ErasureCode::DEFAULT_SHARD_SIZE) as usize;
    let coding = tokio::task::spawn_blocking(move || hash_and_code(k, m, shard)).await??;
    let disk = {
        let d = dir.clone();
        tokio::task::spawn_blocking(move || durable_disk(&d, shard)).await??
    };

    eprintln!(
        "starting a local {}-node RS({k},{m}) cluster...",
        args.nodes
    );
    let cdir = dir.join("cluster");
    let mut local = LocalCluster::start_with(
        &cdir,
        args.nodes,
        args.k,
        args.m,
        ([127, 0, 0, 1], 0).into(),
        None,
        args.small_shard_bytes,
    )
    .await?;
    if let Some(size) = args.shard_size {
        local.cluster.gateway.shard_size_bytes = size;
    }
    let store = indexer::EmbeddedStore::open(&local.cluster.gateway.index_path)?;
    let gw = gateway::serve(
        local.cluster.gateway.clone(),
        store,
        prometheus::Registry::new(),
    )
    .await?;
    let api = format!("http://{}", gw.local_addr);
    let token = std::fs::read_to_string(cdir.join(cluster::ADMIN_TOKEN_FILE))?
        .trim()
        .to_string();
    wait_healthy(&api, args.nodes).await?;

    let mut rows = Vec::new();
    for &mib in &args.sizes_mib {
        let data: Arc<Vec<u8>> = Arc::new(
            (0..(mib << 20))
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
        );
        let (a, t, d) = (api.clone(), token.clone(), data.clone());
        // Warm-up filing, also the one we read back.
        let id = tokio::task::spawn_blocking(move || http_put_id(&a, &t, &d)).await??;
        let gib = (args.repeat as u64 * (mib << 20)) as f64 / (1u64 << 30) as f64;
        let (start, busy) = (Instant::now(), machine_busy()?);
        for _ in 0..args.repeat {
            let (a, t, d) = (api.clone(), token.clone(), data.clone());
            tokio::task::spawn_blocking(move || http_put(&a, &t, d)).await??;
        }
        let ingest = mbps(args.repeat as u64 * (mib << 20), start.elapsed());
        let ingest_cpu = (machine_busy()? - busy) / gib;
        let (start, busy) = (Instant::now(), machine_busy()?);
        for _ in 0..args.repeat {
            let (a, t, i) = (api.clone(), token.clone(), id.clone());
            let n = tokio::task::spawn_blocking(move || http_get(&a, &t, &i)).await??;
            if n != mib << 20 {
                bail!("read returned {n} bytes, expected {}", mib << 20);
            }
        }
        let read = mbps(args.repeat as u64 * (mib << 20), start.elapsed());
        let read_cpu = (machine_busy()? - busy) / gib;
        rows.push(Row {
            mib,
            ingest,
            read,
            ingest_cpu,
            read_cpu,
        });
    }
    gw.abort();
    drop(local);

    let expansion = (k + m) as f64 / k as f64;
    let ingest_ceiling = quic.min(disk) / expansion;
    if args.json {
        let sizes: Vec<_> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "size_mib": r.mib, "ingest_mbps": r.ingest, "read_mbps": r.read,
                    "ingest_ratio": r.ingest / ingest_ceiling, "read_ratio": r.read / quic,
                    "read_cpu_ratio": cpu_ratio(quic_cpu, r.read_cpu),
                    "ingest_cpu_s_per_gib": r.ingest_cpu, "read_cpu_s_per_gib": r.read_cpu,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "quic_bulk_mbps": quic, "quic_bulk_cpu_s_per_gib": quic_cpu, "blake3_sha256_rs_mbps": coding, "durable_disk_mbps": disk,
                "k": k, "m": m, "nodes": args.nodes, "ingest_ceiling_mbps": ingest_ceiling, "sizes": sizes,
            })
        );
    } else {
        println!("raw kernels (this machine, this run)");
        println!(
            "  QUIC bulk, loopback, mutual TLS        {quic:>9.0} MB/s  ({quic_cpu:.2} cpu s/GiB)"
        );
        println!("  BLAKE3+SHA-256+RS({k},{m}) one core        {coding:>9.0} MB/s");
        let size = match shard % (1 << 20) {
            0 => format!("{} MiB", shard >> 20),
            _ => format!("{} KiB", shard >> 10),
        };
        let label = format!("durable {size} writes (fsync, rename)");
        println!("  {label:<39}{disk:>9.0} MB/s");
        println!("  ingest ceiling min(QUIC,disk)/{expansion:.2}     {ingest_ceiling:>9.0} MB/s");
        println!(
            "end to end, {}-node RS({k},{m}) cluster, {} filings per size",
            args.nodes, args.repeat
        );
        println!(
            "  {:>8}  {:>12}  {:>7}  {:>9}  {:>10}  {:>7}  {:>9}  {:>9}",
            "size",
            "ingest MB/s",
            "ratio",
            "cpu s/GiB",
            "read MB/s",
            "ratio",
            "cpu s/GiB",
            "cpu ratio"
        );
        for r in &rows {
            println!(
                "  {:>5} MiB  {:>12.0}  {:>7.2}  {:>9.2}  {:>10.0}  {:>7.2}  {:>9.2}  {:>9.2}",
                r.mib,
                r.ingest,
                r.ingest / ingest_ceiling,
                r.ingest_cpu,
                r.read,
                r.read / quic,
                r.read_cpu,
                cpu_ratio(quic_cpu, r.read_cpu)
            );
        }
        println!("ratios: ingest / (min(QUIC, disk) / ((k+m)/k)) and read / QUIC bulk");
        println!(
            "cpu s/GiB: busy CPU seconds of the whole machine (nodes, gateway, client) per GiB; \
             steadier than MB/s on a shared machine; cpu ratio: QUIC bulk's cpu s/GiB over the read's"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_counts_user_system_and_interrupts_only() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        let stat =
            "cpu  100 20 30 5000 70 4 6 900 0 0\ncpu0 50 10 15 2500 35 2 3 450 0 0\nintr 1 2\n";
        assert_eq!(busy_seconds(stat, 100.0), Some(1.6));
        assert_eq!(busy_seconds("cpu0 1 2 3\n", 100.0), None, "no total line");
        assert_eq!(busy_seconds("cpu  1 2\n", 100.0), None, "too few fields");
    }
}
