//! `custodia bench-repair`: repair throughput after a node holding several
//! GB dies, and foreground ingest during repair against ingest on the
//! healthy cluster, in one run, beside QUIC bulk on the same machine.
//!
//! Rebuilding one shard moves k shards in and one out, so the ceiling is
//! about QUIC bulk / (k+1); the target is repair >= 0.4 of that
//! while ingest keeps >= 50% of its healthy rate.

use crate::bench::{http_put, quic_bulk, wait_healthy, LocalCluster};
use crate::cluster;
use anyhow::{bail, Result};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct BenchRepairArgs {
    #[arg(long, default_value_t = 8)]
    nodes: u32,
    #[arg(long, default_value_t = 4)]
    k: u8,
    #[arg(long, default_value_t = 2)]
    m: u8,
    /// Evidence filed before the node dies, in GiB.
    #[arg(long, default_value_t = 4)]
    gib: u64,
    /// Size of each filing, in MiB.
    #[arg(long, default_value_t = 64)]
    file_mib: u64,
    /// Repair alone: no filing while the repair runs (its throughput with
    /// the machine to itself).
    #[arg(long)]
    no_ingest: bool,
    /// Where the cluster keeps its data (default: a temporary directory).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

fn status(api: &str, token: &str) -> Result<serde_json::Value> {
    crate::status::fetch(api, token)
}

/// Files `data` over and over from two threads until `stop`; counts bytes.
fn ingest_until(
    api: &str,
    token: &str,
    data: &Arc<Vec<u8>>,
    stop: &AtomicBool,
    limit: Option<u64>,
) -> Result<u64> {
    let filed = AtomicU64::new(0);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    while !stop.load(Ordering::Relaxed)
                        && limit.is_none_or(|l| filed.load(Ordering::Relaxed) < l)
                    {
                        http_put(api, token, data.clone())?;
                        filed.fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("an ingest thread panicked"))??;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(filed.load(Ordering::Relaxed))
}

pub async fn run(args: BenchRepairArgs) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    eprintln!("measuring QUIC bulk...");
    let quic = quic_bulk(&dir).await?;
    let cdir = dir.join("cluster");
    let mut local = LocalCluster::start(&cdir, args.nodes, args.k, args.m).await?;
    let mut config = local.cluster.gateway.clone();
    // Rebuild as soon as the node is known down.
    config.node_down_after_ms = 1_000;
    config.repair_after_down_ms = 0;
    config.repair_interval_ms = 200;
    let store = indexer::EmbeddedStore::open(&config.index_path)?;
    let gw = gateway::serve(config, store, prometheus::Registry::new()).await?;
    let api = format!("http://{}", gw.local_addr);
    let token = std::fs::read_to_string(cdir.join(cluster::ADMIN_TOKEN_FILE))?
        .trim()
        .to_string();
    wait_healthy(&api, args.nodes).await?;

    let data: Arc<Vec<u8>> = Arc::new(
        (0..(args.file_mib << 20))
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect(),
    );
    eprintln!("filing {} GiB...", args.gib);
    let (a, t, d) = (api.clone(), token.clone(), data.clone());
    let started = Instant::now();
    let filed = tokio::task::spawn_blocking(move || {
        ingest_until(&a, &t, &d, &AtomicBool::new(false), Some(args.gib << 30))
    })
    .await??;
    let healthy_ingest = filed as f64 / 1e6 / started.elapsed().as_secs_f64();

    // Let a probe see every node's shards, then kill the fullest node's
    // process for good.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let before = status(&api, &token)?;
    let victim = 0usize;
    let rebuild_bytes = before["nodes"][victim]["used_bytes"].as_u64().unwrap_or(0);
    let shards = before["nodes"][victim]["shards"].as_u64().unwrap_or(0);
    eprintln!(
        "killing node {victim} ({shards} shards, {:.2} GB)...",
        rebuild_bytes as f64 / 1e9
    );
    if let Some(child) = local.children.get_mut(victim) {
        child.kill().await?;
    }

    // Wait for the backlog to appear, then ingest while it drains.
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(&api, &token)?["degraded_stripes"]
        .as_u64()
        .unwrap_or(0)
        == 0
    {
        if Instant::now() > deadline {
            bail!("the dead node's stripes were never queued");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let (a, t, d, s) = (api.clone(), token.clone(), data.clone(), stop.clone());
    // Capped at what was filed before, so a slow repair cannot fill the disk.
    let cap = if args.no_ingest { 0 } else { filed };
    let during = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        ingest_until(&a, &t, &d, &s, Some(cap)).map(|b| (b, started.elapsed()))
    });
    let mut last_report = Instant::now();
    let mut peak = 0u64;
    loop {
        let left = status(&api, &token)?["degraded_stripes"]
            .as_u64()
            .unwrap_or(0);
        peak = peak.max(left);
        if left == 0 {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "  {left} stripes left after {:.0} s",
                t0.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        if t0.elapsed() > Duration::from_secs(1800) {
            bail!("repair did not finish within 30 minutes ({left} stripes left)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let repair_time = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (during_bytes, during_time) = during.await??;
    let ingest_during = during_bytes as f64 / 1e6 / during_time.min(repair_time).as_secs_f64();
    gw.abort();
    drop(local);

    let k = args.k as f64;
    let repair = rebuild_bytes as f64 / 1e6 / repair_time.as_secs_f64();
    let ceiling = quic / (k + 1.0);
    println!(
        "repair benchmark, {}-node RS({},{}) cluster, {} GiB filed in {} MiB filings",
        args.nodes, args.k, args.m, args.gib, args.file_mib
    );
    println!("  QUIC bulk, loopback, mutual TLS          {quic:>9.0} MB/s");
    println!("  repair ceiling QUIC / (k+1)              {ceiling:>9.0} MB/s");
    println!(
        "  rebuilt: {shards} shards, {:.2} GB in {:.1} s ({peak} stripes queued at peak)",
        rebuild_bytes as f64 / 1e9,
        repair_time.as_secs_f64()
    );
    println!("  repair throughput                        {repair:>9.0} MB/s   {:.2} x ceiling (target >= 0.4)", repair / ceiling);
    println!("  ingest, healthy cluster                  {healthy_ingest:>9.0} MB/s");
    println!("  ingest during repair                     {ingest_during:>9.0} MB/s   {:.2} x healthy (target >= 0.5)", ingest_during / healthy_ingest);
    Ok(())
}
