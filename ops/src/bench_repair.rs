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
    /// Drain the node instead of killing it: its shards are moved while it
    /// still serves them (the time until no stripe places a shard on it).
    #[arg(long)]
    drain: bool,
    /// The gateway's `repair_ingest_stripes` (default: the gateway's own).
    #[arg(long)]
    repair_ingest_stripes: Option<usize>,
}

fn status(api: &str, token: &str) -> Result<serde_json::Value> {
    crate::status::fetch(api, token)
}

/// Files `data` over and over from two threads until `stop` (or `limit`
/// bytes are filed); returns when each filing completed.
fn ingest_until(
    api: &str,
    token: &str,
    data: &Arc<Vec<u8>>,
    stop: &AtomicBool,
    limit: Option<u64>,
) -> Result<Vec<Instant>> {
    let filed = AtomicU64::new(0);
    let done = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    while !stop.load(Ordering::Relaxed)
                        && limit.is_none_or(|l| filed.load(Ordering::Relaxed) < l)
                    {
                        http_put(api, token, data.clone())?;
                        filed.fetch_add(data.len() as u64, Ordering::Relaxed);
                        done.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(Instant::now());
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
    Ok(done.into_inner().unwrap_or_else(|e| e.into_inner()))
}

/// MB/s of the filings of `len` bytes each that completed at `done`, in
/// the window from `start` to `end`: those completed after `end` (the
/// filings under way when the window closed) are not the window's.
fn rate_within(done: &[Instant], len: u64, start: Instant, end: Instant) -> f64 {
    let within = done.iter().filter(|t| **t <= end).count() as u64;
    let secs = end.saturating_duration_since(start).as_secs_f64();
    match secs > 0.0 {
        true => (within * len) as f64 / 1e6 / secs,
        false => 0.0,
    }
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
    if let Some(n) = args.repair_ingest_stripes {
        config.repair_ingest_stripes = n;
    }
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
    let done = tokio::task::spawn_blocking(move || {
        ingest_until(&a, &t, &d, &AtomicBool::new(false), Some(args.gib << 30))
    })
    .await??;
    let filed = done.len() as u64 * data.len() as u64;
    let healthy_ingest = filed as f64 / 1e6 / started.elapsed().as_secs_f64();

    // Let a probe see every node's shards, then kill node 0's process for
    // good.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let before = status(&api, &token)?;
    let victim = 0usize;
    let rebuild_bytes = before["nodes"][victim]["used_bytes"].as_u64().unwrap_or(0);
    let shards = before["nodes"][victim]["shards"].as_u64().unwrap_or(0);
    let what = if args.drain { "draining" } else { "killing" };
    eprintln!(
        "{what} node {victim} ({shards} shards, {:.2} GB)...",
        rebuild_bytes as f64 / 1e9
    );
    if args.drain {
        crate::node_admin::act(&api, &token, victim as u32, "drain", false)?;
    } else if let Some(child) = local.children.get_mut(victim) {
        child.kill().await?;
    }
    // Stripes still to move: queued for repair, or (a drain) placing a
    // shard on the node.
    let left = || -> Result<u64> {
        if args.drain {
            crate::node_admin::stripes_left(&api, &token, victim as u32)
        } else {
            Ok(status(&api, &token)?["degraded_stripes"]
                .as_u64()
                .unwrap_or(0))
        }
    };

    // Wait for the backlog to appear, then ingest while it drains.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !args.drain && left()? == 0 {
        if Instant::now() > deadline {
            bail!("the dead node's stripes were never queued");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t0 = Instant::now();
    let busy0 = crate::bench::machine_busy()?;
    let stop = Arc::new(AtomicBool::new(false));
    let (a, t, d, s) = (api.clone(), token.clone(), data.clone(), stop.clone());
    // Capped at what was filed before, so a slow repair cannot fill the disk.
    let cap = if args.no_ingest { 0 } else { filed };
    let during = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        ingest_until(&a, &t, &d, &s, Some(cap)).map(|done| (done, started))
    });
    let mut last_report = Instant::now();
    let mut peak = 0u64;
    loop {
        let left = left()?;
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
    let repair_end = Instant::now();
    let busy = crate::bench::machine_busy()? - busy0;
    stop.store(true, Ordering::Relaxed);
    // Filings still under way as the repair ended finish after it: not the
    // repair's (counted, they lifted the figure by up to two filings).
    let (during_done, during_start) = during.await??;
    let ingest_during = rate_within(&during_done, data.len() as u64, during_start, repair_end);
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
    if args.drain {
        // One shard moves per shard: the ceiling is QUIC bulk itself.
        println!(
            "  drained: {shards} shards, {:.2} GB in {:.1} s",
            rebuild_bytes as f64 / 1e9,
            repair_time.as_secs_f64()
        );
        println!(
            "  drain throughput                         {repair:>9.0} MB/s   {:.2} x QUIC bulk",
            repair / quic
        );
        println!("  ingest, healthy cluster                  {healthy_ingest:>9.0} MB/s");
        if !args.no_ingest {
            println!("  ingest during the drain                  {ingest_during:>9.0} MB/s   {:.2} x healthy", ingest_during / healthy_ingest);
        }
        return Ok(());
    }
    println!(
        "  rebuilt: {shards} shards, {:.2} GB in {:.1} s ({peak} stripes queued at peak)",
        rebuild_bytes as f64 / 1e9,
        repair_time.as_secs_f64()
    );
    println!("  repair throughput                        {repair:>9.0} MB/s   {:.2} x ceiling (target >= 0.4)", repair / ceiling);
    if args.no_ingest {
        // Nothing else runs: the whole machine's busy CPU is the repair's.
        println!(
            "  repair CPU (whole machine)               {:>9.2} cpu s per GB rebuilt",
            busy / (rebuild_bytes as f64 / 1e9)
        );
    }
    println!("  ingest, healthy cluster                  {healthy_ingest:>9.0} MB/s");
    // With --no-ingest nothing was filed during it: no figure (0 would read
    // as a missed target).
    if !args.no_ingest {
        println!("  ingest during repair                     {ingest_during:>9.0} MB/s   {:.2} x healthy (target >= 0.5)", ingest_during / healthy_ingest);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench_ledger::{in_process, init};
    use indexer::schema;
    use protocol::{Blake3Hash, EvidenceId, NodeId, ShardPlacement, StripeRecord};

    /// Ingest during repair counts only filings done by the repair's end:
    /// one finishing two seconds after it adds nothing.
    #[test]
    fn ingest_during_repair_counts_only_filings_done_within_it() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let end = at(10_000);
        let done = [at(2_000), at(6_000), at(10_000)];
        let rate = rate_within(&done, 10_000_000, start, end);
        assert!((rate - 3.0).abs() < 1e-9, "{rate}");
        let late = [at(2_000), at(6_000), at(10_000), at(12_000)];
        assert_eq!(rate_within(&late, 10_000_000, start, end), rate);
        assert_eq!(rate_within(&late, 10_000_000, end, end), 0.0);
    }

    type Gw = gateway::Gateway<indexer::EmbeddedStore>;

    /// A stripe record as an upload writes it when one node did not take
    /// its shard: queued for repair before the filing has a manifest.
    fn degraded_record() -> StripeRecord {
        let mut shards: Vec<ShardPlacement> = (0..6u32)
            .map(|i| ShardPlacement {
                node: Some(NodeId(i)),
                blake3: Blake3Hash([i as u8; 32]),
            })
            .collect();
        shards[5].node = None;
        StripeRecord {
            version: 1,
            shard_len: 1024,
            shards,
        }
    }

    /// What the repair queue holds, in order.
    async fn queue(gw: &Gw) -> Result<Vec<(EvidenceId, u64)>> {
        let rows = indexer::run(&gw.store, |tx| async move {
            schema::degraded_queue_tx(&tx, None, 100_000).await
        })
        .await?;
        Ok(rows.into_iter().map(|(e, s, _)| (e, s)).collect())
    }

    /// Uploads write their stripes (a degraded one queued) before their
    /// manifest: a pass leaves such a stripe queued while its upload is in
    /// flight or its S3 part awaits completion, and drops it only once the
    /// upload is aborted (the orphan collector's then).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stripes_of_unfinished_uploads_wait_in_the_repair_queue() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let c = init(dir.path()).await?;
        let (gw, _) = in_process(&c)?;
        let at = 1_800_000_000_000;
        let (live, part, aborted) = (
            EvidenceId::new(at, [1; 10]),
            EvidenceId::new(at, [2; 10]),
            EvidenceId::new(at, [3; 10]),
        );
        indexer::run(&gw.store, |tx| async move {
            for e in [live, part, aborted] {
                schema::begin_intent_tx(&tx, e, "admin", None, u64::MAX, 0).await?;
                schema::put_stripe_tx(&tx, e, 0, &degraded_record());
            }
            Ok::<_, schema::SchemaError>(())
        })
        .await?;
        indexer::run(&gw.store, |tx| async move {
            schema::end_intent_as_part_tx(&tx, part).await?;
            schema::abort_intent_tx(&tx, aborted).await?;
            Ok::<_, schema::SchemaError>(())
        })
        .await?;
        assert_eq!(queue(&gw).await?, vec![(live, 0), (part, 0), (aborted, 0)]);
        let mut cursor = None;
        let r = gateway::repair::pass(&gw, &mut cursor).await?;
        assert_eq!(
            (r.examined, r.waiting, r.gone, r.failed),
            (3, 2, 1, 0),
            "{r:?}"
        );
        assert_eq!(queue(&gw).await?, vec![(live, 0), (part, 0)]);

        // Aborted later (a lease lapsed): dropped by the next pass.
        indexer::run(&gw.store, |tx| async move {
            schema::abort_intent_tx(&tx, live).await?;
            Ok::<_, schema::SchemaError>(())
        })
        .await?;
        let r = gateway::repair::pass(&gw, &mut cursor).await?;
        assert_eq!(
            (r.examined, r.waiting, r.gone, r.failed),
            (2, 1, 1, 0),
            "{r:?}"
        );
        assert_eq!(queue(&gw).await?, vec![(part, 0)]);
        Ok(())
    }

    /// A queue longer than one pass is walked round: each pass takes the
    /// stripes after the last one's, so stripes that keep waiting at the
    /// front never keep the rest from their turn.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn repair_passes_walk_a_long_queue_round() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let c = init(dir.path()).await?;
        let (gw, _) = in_process(&c)?;
        let per_pass = gateway::repair::PASS_STRIPES as u64;
        let total = per_pass + 3;
        let evidence = EvidenceId::new(1_800_000_000_000, [4; 10]);
        indexer::run(&gw.store, |tx| async move {
            schema::begin_intent_tx(&tx, evidence, "admin", None, u64::MAX, 0).await?;
            Ok::<_, schema::SchemaError>(())
        })
        .await?;
        for first in (0..total).step_by(1000) {
            indexer::run(&gw.store, |tx| async move {
                for s in first..(first + 1000).min(total) {
                    schema::put_stripe_tx(&tx, evidence, s, &degraded_record());
                }
                Ok::<_, schema::SchemaError>(())
            })
            .await?;
        }
        let mut cursor = None;
        let r = gateway::repair::pass(&gw, &mut cursor).await?;
        assert_eq!((r.examined, r.waiting, r.failed), (per_pass, per_pass, 0));
        assert_eq!(cursor, Some((evidence, per_pass - 1)));
        let r = gateway::repair::pass(&gw, &mut cursor).await?;
        assert_eq!(r.examined, 3, "the second pass goes on after the first");
        assert_eq!(cursor, None, "and the next starts over");
        let r = gateway::repair::pass(&gw, &mut cursor).await?;
        assert_eq!(r.examined, per_pass);
        assert_eq!(queue(&gw).await?.len() as u64, total, "all still waiting");
        Ok(())
    }

    /// A stripe another task holds (another gateway's repair, its lease
    /// renewed) is left to it, lease untouched; once that task gives it up
    /// a pass takes the stripe up, and gives its own lease back when done.
    /// (Taking over a lease left by a dead task is
    /// `repair::tests::a_lease_is_taken_over_only_after_reading_the_same_for_a_whole_period`.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stripe_leased_by_another_task_is_left_to_it() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let c = init(dir.path()).await?;
        let (gw, _) = in_process(&c)?;
        let evidence = EvidenceId::new(1_800_000_000_000, [5; 10]);
        let other = [7u8; 16];
        indexer::run(&gw.store, |tx| async move {
            schema::begin_intent_tx(&tx, evidence, "admin", None, u64::MAX, 0).await?;
            schema::put_stripe_tx(&tx, evidence, 0, &degraded_record());
            let held = schema::take_repair_lease_tx(&tx, evidence, 0, other, None).await?;
            assert_eq!(held, None, "taken");
            Ok::<_, schema::SchemaError>(())
        })
        .await?;
        let lease = || async {
            indexer::run(&gw.store, |tx| async move {
                schema::get_repair_lease_tx(&tx, evidence, 0).await
            })
            .await
        };
        let mut cursor = None;
        for _ in 0..2 {
            let r = gateway::repair::pass(&gw, &mut cursor).await?;
            assert_eq!((r.examined, r.elsewhere, r.waiting), (1, 1, 0), "{r:?}");
        }
        let held = anyhow::Context::context(lease().await?, "the other task's lease")?;
        assert_eq!((held.owner, held.beat), (other, 0));
        assert_eq!(queue(&gw).await?, vec![(evidence, 0)]);

        // The other task is done with it.
        indexer::run(&gw.store, |tx| async move {
            schema::release_repair_lease_tx(&tx, evidence, 0, other).await
        })
        .await?;
        let r = gateway::repair::pass(&gw, &mut cursor).await?;
        assert_eq!((r.examined, r.elsewhere, r.waiting), (1, 0, 1), "{r:?}");
        assert_eq!(lease().await?, None, "taken, worked on, given back");
        assert_eq!(
            queue(&gw).await?,
            vec![(evidence, 0)],
            "still waiting on its upload"
        );
        Ok(())
    }
}
