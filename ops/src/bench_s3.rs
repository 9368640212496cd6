//! `custodia bench-s3`: the S3 API against a peer, same client, same run.
//!
//! Starts a local Custodia cluster (nodes and gateway as their own processes)
//! and, given `--garage PATH`, a single-node Garage twice: once durable
//! (`data_fsync` and `metadata_fsync` on, compression off: the comparison
//! issue 4 asks for) and once with Garage's defaults (for information). One
//! client (the `object_store` crate's S3 client, as an agency's Rust code
//! would use) runs the same phases against each: PUT and GET of 64 MiB
//! objects (MB/s) and of 4 KiB objects (operations/s), at a fixed
//! concurrency. Server CPU is read from `/proc/PID/stat` of the server
//! processes before and after each phase (the client's own CPU is not
//! counted), and reported per GiB moved and per small operation.

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use object_store::{aws::AmazonS3Builder, path::Path as ObjectPath, ObjectStore, PutPayload};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

#[derive(clap::Args)]
pub struct BenchS3Args {
    /// A `garage` binary (v2) to compare against; without it only Custodia
    /// is measured.
    #[arg(long)]
    garage: Option<PathBuf>,
    /// Size of the large objects, MiB.
    #[arg(long, default_value_t = 64)]
    large_mib: u64,
    /// Large objects put (and got) per server.
    #[arg(long, default_value_t = 8)]
    large_count: usize,
    /// Small (4 KiB) objects put (and got) per server.
    #[arg(long, default_value_t = 2000)]
    small_count: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Storage nodes of the Custodia cluster.
    #[arg(long, default_value_t = 8)]
    nodes: u32,
    #[arg(long, default_value_t = 4)]
    k: u8,
    #[arg(long, default_value_t = 2)]
    m: u8,
    /// The nodes' `small_shard_bytes` (default: the nodes' default).
    #[arg(long)]
    small_shard_bytes: Option<u32>,
    /// Where the servers keep their data (default: a temporary directory on
    /// the same disk for all of them).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

const SMALL: usize = 4096;
const REGION: &str = "us-east-1";
const BUCKET: &str = "bench";

/// One server's figures.
#[derive(Clone, Debug, serde::Serialize)]
struct Figures {
    server: String,
    put_large_mbps: f64,
    get_large_mbps: f64,
    put_small_ops: f64,
    get_small_ops: f64,
    /// Server CPU seconds per GiB put / got.
    cpu_s_per_gib_put: f64,
    cpu_s_per_gib_get: f64,
    /// Server CPU milliseconds per 4 KiB put / get.
    cpu_ms_per_small_put: f64,
    cpu_ms_per_small_get: f64,
}

/// A server under test: where to reach it and which processes to charge.
struct Target {
    name: String,
    endpoint: String,
    access_key: String,
    secret: String,
    pids: Vec<u32>,
    children: Vec<Child>,
}

pub async fn run(args: BenchS3Args) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let ticks = crate::bench::clock_ticks()?;
    let mut results = Vec::new();

    eprintln!("custodia: starting {} nodes and a gateway...", args.nodes);
    let target = start_custodia(&dir.join("custodia"), &args).await?;
    results.push(measure(target, &args, ticks).await?);
    if let Some(garage) = &args.garage {
        for durable in [true, false] {
            let name = if durable {
                "garage (fsync, no compression)"
            } else {
                "garage (defaults)"
            };
            eprintln!("{name}: starting...");
            let sub = if durable {
                "garage-durable"
            } else {
                "garage-defaults"
            };
            let target = start_garage(garage, &dir.join(sub), durable, name).await?;
            results.push(measure(target, &args, ticks).await?);
        }
    }
    report(&args, &results);
    Ok(())
}

async fn measure(mut t: Target, args: &BenchS3Args, ticks: f64) -> Result<Figures> {
    let store: Arc<dyn ObjectStore> = Arc::new(
        AmazonS3Builder::new()
            // Client options first: setting them replaces `allow_http`.
            .with_client_options(
                object_store::ClientOptions::new().with_timeout(Duration::from_secs(600)),
            )
            .with_endpoint(&t.endpoint)
            .with_allow_http(true)
            .with_region(REGION)
            .with_bucket_name(BUCKET)
            .with_access_key_id(&t.access_key)
            .with_secret_access_key(&t.secret)
            .build()?,
    );
    let large: Bytes = (0..(args.large_mib << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect::<Vec<u8>>()
        .into();
    let large_bytes = (args.large_mib << 20) as f64 * args.large_count as f64;
    let gib = large_bytes / (1u64 << 30) as f64;

    let (put_large, cpu_put_large) = phase(&t, ticks, || {
        many(&store, args.large_count, args.concurrency.min(4), |s, i| {
            let body = large.clone();
            async move { put(&s, &format!("large/{i}"), body).await }
        })
    })
    .await?;
    let (get_large, cpu_get_large) = phase(&t, ticks, || {
        many(&store, args.large_count, args.concurrency.min(4), |s, i| {
            let want = large.len();
            async move { get(&s, &format!("large/{i}"), want).await }
        })
    })
    .await?;
    let small: Bytes = vec![0x5a; SMALL].into();
    let (put_small, cpu_put_small) = phase(&t, ticks, || {
        many(&store, args.small_count, args.concurrency, |s, i| {
            // Distinct content per object: nothing may be deduplicated.
            let mut body = small.to_vec();
            body[..8].copy_from_slice(&(i as u64).to_le_bytes());
            async move { put(&s, &format!("small/{i}"), body.into()).await }
        })
    })
    .await?;
    let (get_small, cpu_get_small) = phase(&t, ticks, || {
        many(
            &store,
            args.small_count,
            args.concurrency,
            |s, i| async move { get(&s, &format!("small/{i}"), SMALL).await },
        )
    })
    .await?;
    for c in &mut t.children {
        let _ = c.kill().await;
    }
    let n = args.small_count as f64;
    Ok(Figures {
        server: t.name.clone(),
        put_large_mbps: large_bytes / 1e6 / put_large.as_secs_f64(),
        get_large_mbps: large_bytes / 1e6 / get_large.as_secs_f64(),
        put_small_ops: n / put_small.as_secs_f64(),
        get_small_ops: n / get_small.as_secs_f64(),
        cpu_s_per_gib_put: cpu_put_large / gib,
        cpu_s_per_gib_get: cpu_get_large / gib,
        cpu_ms_per_small_put: cpu_put_small * 1e3 / n,
        cpu_ms_per_small_get: cpu_get_small * 1e3 / n,
    })
}

/// Runs `work`, returning its wall time and the server CPU seconds it cost.
async fn phase<F, Fut>(t: &Target, ticks: f64, work: F) -> Result<(Duration, f64)>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let before = cpu_ticks(&t.pids)?;
    let start = Instant::now();
    work().await?;
    let wall = start.elapsed();
    let after = cpu_ticks(&t.pids)?;
    Ok((wall, (after - before) as f64 / ticks))
}

/// Runs `op(store, i)` for `i` in `0..count`, `concurrency` at a time.
async fn many<F, Fut>(
    store: &Arc<dyn ObjectStore>,
    count: usize,
    concurrency: usize,
    op: F,
) -> Result<()>
where
    F: Fn(Arc<dyn ObjectStore>, usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    use futures::StreamExt;
    let mut results = futures::stream::iter((0..count).map(|i| op(store.clone(), i)))
        .buffer_unordered(concurrency.max(1));
    while let Some(r) = results.next().await {
        r?;
    }
    Ok(())
}

async fn put(store: &Arc<dyn ObjectStore>, key: &str, body: Bytes) -> Result<()> {
    store
        .put(&ObjectPath::from(key), PutPayload::from_bytes(body))
        .await
        .with_context(|| format!("PUT {key}"))?;
    Ok(())
}

async fn get(store: &Arc<dyn ObjectStore>, key: &str, want: usize) -> Result<()> {
    let got = store
        .get(&ObjectPath::from(key))
        .await
        .with_context(|| format!("GET {key}"))?
        .bytes()
        .await?;
    if got.len() != want {
        bail!("GET {key}: {} bytes, expected {want}", got.len());
    }
    Ok(())
}

/// utime + stime of `pids`, in clock ticks.
fn cpu_ticks(pids: &[u32]) -> Result<u64> {
    let mut total = 0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("server process {pid} is gone"))?;
        // The command name (field 2) may hold spaces; fields after its ')'.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the whole line.
        let field = |n: usize| -> Result<u64> {
            fields
                .get(n - 3)
                .and_then(|v| v.parse().ok())
                .context("unreadable /proc/PID/stat")
        };
        total += field(14)? + field(15)?;
    }
    Ok(total)
}

async fn start_custodia(dir: &Path, args: &BenchS3Args) -> Result<Target> {
    std::fs::create_dir_all(dir)?;
    let port =
        || -> Result<SocketAddr> { Ok(([127, 0, 0, 1], crate::cluster::free_tcp_port()?).into()) };
    let (api, s3) = (port()?, port()?);
    let mut local = crate::bench::LocalCluster::start_with(
        dir,
        args.nodes,
        args.k,
        args.m,
        api,
        Some(s3),
        args.small_shard_bytes,
    )
    .await?;
    let exe = std::env::current_exe()?;
    let gateway = Command::new(&exe)
        .args(["gateway", "--data-dir"])
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let api = format!("http://{api}");
    crate::bench::wait_healthy(&api, args.nodes).await?;
    let creds = std::fs::read_to_string(dir.join(crate::cluster::S3_CREDENTIALS_FILE))?;
    let field = |name: &str| {
        creds
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} = ")))
            .map(str::to_owned)
            .with_context(|| format!("{name} missing from s3.credentials"))
    };
    let (access_key, secret) = (field("aws_access_key_id")?, field("aws_secret_access_key")?);
    let endpoint = format!("http://{s3}");
    // object_store cannot create buckets; curl signs SigV4 itself.
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-f",
            "-X",
            "PUT",
            "--aws-sigv4",
            &format!("aws:amz:{REGION}:s3"),
        ])
        .args(["--user", &format!("{access_key}:{secret}")])
        .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
        .arg(format!("{endpoint}/{BUCKET}"))
        .output()
        .context("running curl to create the bucket")?;
    if !out.status.success() {
        bail!(
            "creating the bucket failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let mut pids: Vec<u32> = local.children.iter().filter_map(Child::id).collect();
    pids.extend(gateway.id());
    let mut children = std::mem::take(&mut local.children);
    children.push(gateway);
    Ok(Target {
        name: format!("custodia RS({},{})", args.k, args.m),
        endpoint,
        access_key,
        secret,
        pids,
        children,
    })
}

async fn start_garage(bin: &Path, dir: &Path, durable: bool, name: &str) -> Result<Target> {
    std::fs::create_dir_all(dir)?;
    let port = |()| crate::cluster::free_tcp_port();
    let (s3, rpc, admin) = (port(())?, port(())?, port(())?);
    let secret: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let tuning = if durable {
        "metadata_fsync = true\ndata_fsync = true\ncompression_level = \"none\"\n"
    } else {
        ""
    };
    let config = format!(
        "metadata_dir = \"{meta}\"\ndata_dir = \"{data}\"\ndb_engine = \"lmdb\"\n\
         replication_factor = 1\n{tuning}\
         rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\n\
         [s3_api]\ns3_region = \"{REGION}\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\n\
         [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
        meta = dir.join("meta").display(),
        data = dir.join("data").display(),
    );
    let config_path = dir.join("garage.toml");
    std::fs::write(&config_path, config)?;
    let server = Command::new(bin)
        .arg("-c")
        .arg(&config_path)
        .arg("server")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("garage.log"))?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let garage = |args: &[&str]| -> Result<String> {
        let out = std::process::Command::new(bin)
            .arg("-c")
            .arg(&config_path)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "garage {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // The server takes a moment to answer its own CLI.
    let mut node_id = None;
    for _ in 0..100 {
        if let Ok(out) = garage(&["node", "id", "-q"]) {
            node_id = out.trim().split('@').next().map(str::to_owned);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let node_id = node_id.context("garage never answered `node id`")?;
    garage(&["layout", "assign", "-z", "dc1", "-c", "100G", &node_id])?;
    garage(&["layout", "apply", "--version", "1"])?;
    let access_key = format!(
        "GK{}",
        (0..12)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect::<String>()
    );
    let key_secret: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    garage(&[
        "key",
        "import",
        "--yes",
        &access_key,
        &key_secret,
        "-n",
        "bench",
    ])?;
    // The layout takes effect asynchronously; retry until the bucket exists.
    let mut created = Err(anyhow::anyhow!("never tried"));
    for _ in 0..100 {
        created = garage(&["bucket", "create", BUCKET]);
        if created.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    created?;
    garage(&[
        "bucket",
        "allow",
        "--read",
        "--write",
        "--owner",
        BUCKET,
        "--key",
        &access_key,
    ])?;
    let pids = server.id().into_iter().collect();
    Ok(Target {
        name: name.to_owned(),
        endpoint: format!("http://127.0.0.1:{s3}"),
        access_key,
        secret: key_secret,
        pids,
        children: vec![server],
    })
}

fn report(args: &BenchS3Args, results: &[Figures]) {
    let ratios: Option<serde_json::Value> = match results {
        [ours, garage, ..] => Some(serde_json::json!({
            "put_large": ours.put_large_mbps / garage.put_large_mbps,
            "get_large": ours.get_large_mbps / garage.get_large_mbps,
            "put_small": ours.put_small_ops / garage.put_small_ops,
            "get_small": ours.get_small_ops / garage.get_small_ops,
            "cpu_per_gib_put": ours.cpu_s_per_gib_put / garage.cpu_s_per_gib_put,
            "cpu_per_gib_get": ours.cpu_s_per_gib_get / garage.cpu_s_per_gib_get,
            "cpu_per_small_put": ours.cpu_ms_per_small_put / garage.cpu_ms_per_small_put,
            "cpu_per_small_get": ours.cpu_ms_per_small_get / garage.cpu_ms_per_small_get,
        })),
        _ => None,
    };
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "large_mib": args.large_mib, "large_count": args.large_count,
                "small_bytes": SMALL, "small_count": args.small_count,
                "concurrency": args.concurrency, "servers": results,
                "custodia_over_garage_durable": ratios,
            })
        );
        return;
    }
    println!(
        "S3, one object_store client, {} x {} MiB and {} x 4 KiB objects, {} in flight",
        args.large_count, args.large_mib, args.small_count, args.concurrency
    );
    println!(
        "  {:<32} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10} {:>10}",
        "server",
        "PUT MB/s",
        "GET MB/s",
        "PUT/s",
        "GET/s",
        "cpu s/GiB",
        "cpu s/GiB",
        "cpu ms/op",
        "cpu ms/op"
    );
    println!(
        "  {:<32} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10} {:>10}",
        "",
        format!("{} MiB", args.large_mib),
        format!("{} MiB", args.large_mib),
        "4 KiB",
        "4 KiB",
        "PUT",
        "GET",
        "PUT 4K",
        "GET 4K"
    );
    for f in results {
        println!(
            "  {:<32} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>10.2} {:>10.2} {:>10.3} {:>10.3}",
            f.server,
            f.put_large_mbps,
            f.get_large_mbps,
            f.put_small_ops,
            f.get_small_ops,
            f.cpu_s_per_gib_put,
            f.cpu_s_per_gib_get,
            f.cpu_ms_per_small_put,
            f.cpu_ms_per_small_get
        );
    }
    if let Some(r) = ratios {
        println!("custodia / garage (fsync, no compression): {r}");
    }
}
