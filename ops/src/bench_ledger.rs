//! `custodia bench-ledger`: the notarization ledger's throughput and latency,
//! in one run on one machine.
//!
//! 1. In process: statements queued in the index (1,000 per transaction), then
//!    integrated by the sequencer as fast as it goes (batches of up to 8,192:
//!    leaves and tree hashes in one transaction, tiles and entry bundles written
//!    and fsynced, one checkpoint signature per batch). Entries/s.
//! 2. Over HTTP: `POST /v1/notarize` with 1,000 items per request from several
//!    client threads, each request answered with every receipt. Entries/s.
//! 3. Latency: requests of `--latency-batch` items offered at half the HTTP
//!    maximum, p50/p99 from request to receipts.

use crate::cluster::{self, InitOptions};
use anyhow::{bail, Context, Result};
use indexer::ledger::PendingRecord;
use protocol::ledger::{Kind, Statement};
use protocol::{Blake3Hash, EvidenceId, Sha256Hash};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct BenchLedgerArgs {
    /// Statements integrated in process.
    #[arg(long, default_value_t = 200_000)]
    entries: u64,
    /// Items notarized over HTTP (in requests of 1,000).
    #[arg(long, default_value_t = 100_000)]
    http_entries: u64,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Items per request in the latency run.
    #[arg(long, default_value_t = 100)]
    latency_batch: usize,
    /// Seconds of the latency run.
    #[arg(long, default_value_t = 10)]
    latency_secs: u64,
    /// Run in this directory (created, must be empty) and keep it, to
    /// measure on the disk the ledger will use. Default: a temporary
    /// directory, removed afterwards.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

fn statement(n: u64) -> Statement {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&n.to_be_bytes());
    Statement::new(
        Kind::Notarized,
        EvidenceId::new(1_700_000_000_000 + n, [7; 10]),
        &Blake3Hash(b),
        Some(&Sha256Hash(b)),
        1 << 20,
        "bench",
        Some("2026-CR-0001".into()),
        Some("bench/clerk".into()),
        1_700_000_000_000 + n,
    )
}

pub(crate) async fn init(dir: &std::path::Path) -> Result<cluster::Cluster> {
    cluster::init(
        dir,
        &InitOptions {
            nodes: 6,
            k: 4,
            m: 2,
            shard_size: protocol::ErasureCode::DEFAULT_SHARD_SIZE,
            api: ([127, 0, 0, 1], 0).into(),
            s3: None,
            node_base_port: 0,
            metrics: None,
            node_metrics_base_port: 0,
            min_write_shards: None,
            log_origin: "custodia.local/bench".into(),
            s3_tls: false,
            api_tls: false,
        },
    )
    .await
}

/// The cluster's gateway and its ledger, in this process (no API served).
pub(crate) fn in_process(
    c: &cluster::Cluster,
) -> Result<(
    Arc<gateway::Gateway<indexer::EmbeddedStore>>,
    Arc<gateway::ledger::Ledger>,
)> {
    in_process_on(c, indexer::EmbeddedStore::open(&c.gateway.index_path)?)
}

/// As [`in_process`], on an index already open.
fn in_process_on(
    c: &cluster::Cluster,
    store: indexer::EmbeddedStore,
) -> Result<(
    Arc<gateway::Gateway<indexer::EmbeddedStore>>,
    Arc<gateway::ledger::Ledger>,
)> {
    let gw = Arc::new(gateway::Gateway::new(
        c.gateway.clone(),
        store,
        &prometheus::Registry::new(),
    )?);
    let ledger = gw.ledger.clone().context("no ledger configured")?;
    Ok((gw, ledger))
}

pub async fn run(args: BenchLedgerArgs) -> Result<()> {
    // As `custodia bench --dir`: a kept directory, else a temporary one.
    let tmp = tempfile::tempdir()?;
    if let Some(d) = &args.dir {
        std::fs::create_dir_all(d)?;
        if std::fs::read_dir(d)?.next().is_some() {
            anyhow::bail!("--dir {}: the directory is not empty", d.display());
        }
    }
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());

    // 1. In process.
    let c = init(&dir.join("inproc")).await?;
    let (gw, ledger) = in_process(&c)?;
    let queued_at = Instant::now();
    let mut n = 0u64;
    while n < args.entries {
        let batch: Vec<PendingRecord> = (n..(n + 1000).min(args.entries))
            .map(|i| {
                Ok(PendingRecord {
                    evidence: EvidenceId::new(i, [1; 10]),
                    salt: rand::random(),
                    statement: statement(i).encode()?,
                })
            })
            .collect::<Result<_>>()?;
        n += batch.len() as u64;
        indexer::run(&gw.store, |tx| {
            let batch = &batch;
            async move {
                indexer::ledger::enqueue_notarizations_tx(&tx, batch, "bench");
                Ok::<_, indexer::schema::SchemaError>(())
            }
        })
        .await?;
    }
    let queued = queued_at.elapsed();
    // The queue's pages are on disk before the clock starts, so the first
    // batch's flush does not also write out the queue phase.
    rustix::fs::syncfs(std::fs::File::open(&dir)?)?;
    let started = Instant::now();
    gateway::ledger::integrate_pending(&gw, &ledger).await?;
    let integrated = started.elapsed();
    let inproc = args.entries as f64 / integrated.as_secs_f64();
    println!(
        "ledger, in process ({} statements of ~{} bytes)",
        args.entries,
        statement(0).encode()?.len()
    );
    println!(
        "  queue (1,000 per txn)         {:>10.0} entries/s",
        args.entries as f64 / queued.as_secs_f64()
    );
    println!("  sequencer (integrate, tiles, fsync, sign)  {inproc:>10.0} entries/s");
    drop(gw);

    // 2. Over HTTP.
    let c = init(&dir.join("http")).await?;
    let store = indexer::EmbeddedStore::open(&c.gateway.index_path)?;
    let running = gateway::serve(c.gateway.clone(), store, prometheus::Registry::new()).await?;
    let api = format!("http://{}", running.local_addr);
    let token = std::fs::read_to_string(dir.join("http").join(cluster::ADMIN_TOKEN_FILE))?;
    let token = token.trim().to_owned();
    let requests = args.http_entries.div_ceil(1000);
    let t = Instant::now();
    let per_client = requests.div_ceil(args.clients as u64);
    let handles: Vec<_> = (0..args.clients)
        .map(|client| {
            let (api, token) = (api.clone(), token.clone());
            std::thread::spawn(move || -> Result<u64> {
                let mut done = 0;
                for r in 0..per_client {
                    let base = (client as u64 * per_client + r) * 1000;
                    done += notarize(&api, &token, base, 1000)?;
                }
                Ok(done)
            })
        })
        .collect();
    let mut items = 0;
    for h in handles {
        items += h.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    let http = items as f64 / t.elapsed().as_secs_f64();
    println!(
        "ledger, over HTTP ({items} items, 1,000 per request, {} clients)",
        args.clients
    );
    println!("  POST /v1/notarize with receipts          {http:>10.0} entries/s");

    // 3. Latency at half the HTTP maximum.
    let rate = (http / 2.0 / args.latency_batch as f64).max(1.0); // requests/s
    let interval = Duration::from_secs_f64(1.0 / rate);
    let total = (rate * args.latency_secs as f64) as u64;
    let t0 = Instant::now();
    let handles: Vec<_> = (0..total)
        .map(|i| {
            let (api, token) = (api.clone(), token.clone());
            let due = t0 + interval * i as u32;
            let batch = args.latency_batch;
            std::thread::spawn(move || -> Result<Option<Duration>> {
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let sent = Instant::now();
                let receipts = notarize(&api, &token, 10_000_000 + i * batch as u64, batch)?;
                // Answered without every receipt (the sequencer fell behind
                // the gateway's receipt wait): when they came is not known.
                Ok((receipts == batch as u64).then(|| sent.elapsed()))
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut short = 0;
    for h in handles {
        match h.join().map_err(|_| anyhow::anyhow!("client panicked"))?? {
            Some(l) => lat.push(l),
            None => short += 1,
        }
    }
    if lat.is_empty() {
        bail!("no latency request came back with all its receipts ({short} without)");
    }
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "latency at half the HTTP maximum ({:.0} requests/s of {} items, {} s)",
        rate, args.latency_batch, args.latency_secs
    );
    println!(
        "  request to receipts            p50 {:>6.1} ms   p99 {:>6.1} ms",
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3
    );
    if short > 0 {
        println!(
            "  {short} of {total} requests came back without every receipt (the ledger fell \
             behind the gateway's receipt wait): left out of the percentiles, which are so \
             too low"
        );
    }
    Ok(())
}

/// Notarizes `count` items; returns how many came back with a receipt.
fn notarize(api: &str, token: &str, base: u64, count: usize) -> Result<u64> {
    let items: Vec<serde_json::Value> = (0..count as u64)
        .map(|i| {
            serde_json::json!({
                "blake3": hex::encode(blake3::hash(&(base + i).to_be_bytes()).as_bytes()),
                "size": 1 << 20,
            })
        })
        .collect();
    let mut resp = ureq::post(format!("{api}/v1/notarize"))
        .header("authorization", format!("Bearer {token}"))
        .send_json(serde_json::json!({ "items": items }))?;
    // The client shares the machine with the gateway, so it only checks that
    // every item came back with a receipt (skipped over, not built as a
    // JSON tree); the receipts themselves are verified by the ledger tests.
    #[derive(serde::Deserialize)]
    struct Answer {
        items: Vec<Item>,
    }
    #[derive(serde::Deserialize)]
    struct Item {
        receipt: Option<serde::de::IgnoredAny>,
    }
    let answer: Answer = resp.body_mut().with_config().limit(1 << 30).read_json()?;
    let with_receipt = answer.items.iter().filter(|i| i.receipt.is_some()).count();
    Ok(with_receipt as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    /// RFC 9162 section 2.1.1, written out: the root of `leaves` (entries).
    fn rfc9162_root(entries: &[[u8; 32]]) -> [u8; 32] {
        match entries.len() {
            0 => Sha256::digest([]).into(),
            1 => Sha256::new()
                .chain_update([0u8])
                .chain_update(entries[0])
                .finalize()
                .into(),
            n => {
                let k = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
                Sha256::new()
                    .chain_update([1u8])
                    .chain_update(rfc9162_root(&entries[..k]))
                    .chain_update(rfc9162_root(&entries[k..]))
                    .finalize()
                    .into()
            }
        }
    }

    type Gw = gateway::Gateway<indexer::EmbeddedStore>;

    /// `total` statements to queue, with fresh salts; `tag` tells tests' ids
    /// apart.
    fn records(total: u64, tag: u8) -> Result<Vec<PendingRecord>> {
        (0..total)
            .map(|i| {
                Ok(PendingRecord {
                    evidence: EvidenceId::new(1_000 + i, [tag; 10]),
                    salt: rand::random(),
                    statement: statement(i).encode()?,
                })
            })
            .collect()
    }

    /// `total` statements queued in chunks of 1,000, as `POST /v1/notarize`
    /// queues them.
    async fn queue_chunks(gw: &Gw, total: u64) -> Result<Vec<PendingRecord>> {
        let queued = records(total, 3)?;
        for part in queued.chunks(1000) {
            indexer::run(&gw.store, |tx| async move {
                indexer::ledger::enqueue_notarizations_tx(&tx, part, "bench");
                Ok::<_, indexer::schema::SchemaError>(())
            })
            .await?;
        }
        Ok(queued)
    }

    /// A cluster in `dir` with 60,000 statements queued (about eight
    /// batches) and an integrator running on them, once it has published
    /// its first batch: later ones are then committing and read ahead.
    struct Midway {
        c: cluster::Cluster,
        gw: Arc<Gw>,
        vkey: String,
        queued: Vec<PendingRecord>,
        run: tokio::task::JoinHandle<Result<bool, gateway::ledger::LedgerError>>,
    }

    async fn integrating_midway(dir: &std::path::Path) -> Result<Midway> {
        let c = init(dir).await?;
        let (gw, ledger) = in_process(&c)?;
        let vkey = std::fs::read_to_string(dir.join(cluster::LEDGER_VKEY_FILE))?;
        let queued = queue_chunks(&gw, 60_000).await?;
        let mut published = ledger.subscribe();
        let run = tokio::spawn({
            let gw = gw.clone();
            async move { gateway::ledger::integrate_pending(&gw, &ledger).await }
        });
        // A run that fails before publishing would otherwise leave this
        // waiting forever.
        tokio::time::timeout(Duration::from_secs(120), published.changed())
            .await
            .context("no batch published in 120 s")??;
        Ok(Midway {
            c,
            gw,
            vkey: vkey.trim().to_owned(),
            queued,
            run,
        })
    }

    fn commitments(queued: &[PendingRecord]) -> Vec<[u8; 32]> {
        queued
            .iter()
            .map(|p| protocol::ledger::commitment(&p.salt, &p.statement))
            .collect()
    }

    /// The C2SP tlog-tiles path of full tile `n` of `kind` ("entries" for
    /// entry bundles, "0" for level-0 hashes), written out: the index in
    /// zero-padded 3-digit elements, all but the last prefixed `x`.
    fn tile_file(kind: &str, mut n: u64) -> String {
        let mut parts = Vec::new();
        loop {
            parts.push(n % 1000);
            n /= 1000;
            if n == 0 {
                break;
            }
        }
        let last = parts.len() - 1;
        let elems: Vec<String> = parts
            .iter()
            .rev()
            .enumerate()
            .map(|(i, p)| {
                if i < last {
                    format!("x{p:03}")
                } else {
                    format!("{p:03}")
                }
            })
            .collect();
        format!("tile/{kind}/{}", elems.join("/"))
    }

    /// The index's tree size and its newest signed checkpoint (verified).
    async fn index_state(
        gw: &Gw,
        vkey: &str,
    ) -> Result<(u64, protocol::ledger::VerifiedCheckpoint)> {
        let (state, note) = indexer::run(&gw.store, |tx| async move {
            let state = indexer::ledger::tree_state_tx(&tx).await?;
            let note = indexer::ledger::checkpoint_tx(&tx).await?;
            Ok::<_, indexer::schema::SchemaError>((state, note))
        })
        .await?;
        let note = String::from_utf8(note.context("no checkpoint signed")?)?;
        Ok((
            state.size,
            protocol::ledger::verify_checkpoint(&note, vkey)?,
        ))
    }

    /// What a verifier finds once everything `queued` is integrated: the
    /// published checkpoint covers all of it with the root an independent
    /// RFC 9162 computation gives, every leaf is the statement queued in its
    /// place, nothing is left queued, and every full entry bundle holds
    /// those statements' commitments.
    async fn assert_one_tree(
        c: &cluster::Cluster,
        dir: &std::path::Path,
        gw: &Gw,
        queued: &[PendingRecord],
    ) -> Result<()> {
        let total = queued.len() as u64;
        let tiles_dir = &c.gateway.ledger.as_ref().context("ledger")?.tiles_dir;
        let note = std::fs::read_to_string(tiles_dir.join("checkpoint"))?;
        let vkey = std::fs::read_to_string(dir.join(cluster::LEDGER_VKEY_FILE))?;
        let cp = protocol::ledger::verify_checkpoint(&note, vkey.trim())?;
        assert_eq!(cp.size, total);
        let commitments = commitments(queued);
        assert_eq!(cp.root.0, rfc9162_root(&commitments));
        let (leaves, left) = indexer::run(&gw.store, |tx| async move {
            let leaves = indexer::ledger::leaves_tx(&tx, 0..total).await?;
            let left = indexer::ledger::pending_tx(&tx, 10, 1 << 20).await?;
            Ok::<_, indexer::schema::SchemaError>((leaves, left))
        })
        .await?;
        assert!(left.is_empty(), "{} statements still queued", left.len());
        assert_eq!(leaves.len() as u64, total);
        for (n, (leaf, p)) in leaves.iter().zip(queued).enumerate() {
            assert!(
                leaf.evidence == p.evidence && leaf.salt == p.salt && leaf.statement == p.statement,
                "leaf {n} is not the statement queued {n}th"
            );
        }
        for (n, expected) in commitments.chunks_exact(256).enumerate() {
            let path = tile_file("entries", n as u64);
            let bundle = std::fs::read(tiles_dir.join(&path)).with_context(|| path.clone())?;
            let entries = protocol::ledger::parse_entry_bundle(&bundle)?;
            assert!(
                entries.iter().copied().eq(expected.iter().map(|c| &c[..])),
                "{path} does not hold leaves {}..{}",
                n * 256,
                n * 256 + 256
            );
            // RFC 9162 leaf hashes, SHA-256(0x00 || entry), 32 bytes each.
            let path = tile_file("0", n as u64);
            let hashes = std::fs::read(tiles_dir.join(&path)).with_context(|| path.clone())?;
            let leaf_hashes: Vec<u8> = expected
                .iter()
                .flat_map(|c| Sha256::new().chain_update([0u8]).chain_update(c).finalize())
                .collect();
            assert!(
                hashes == leaf_hashes,
                "{path} does not hold the leaf hashes"
            );
        }
        Ok(())
    }

    /// With the integrator running as in a gateway: a statement queued just
    /// after a round of five, with nobody waiting for a receipt, is
    /// integrated no sooner than `round_interval_ms` after that round
    /// started (the pacing that lets concurrent readers' statements share
    /// rounds), and none is lost or reordered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_round_of_a_few_statements_spaces_the_next() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut c = init(dir.path()).await?;
        let interval = Duration::from_millis(1_000);
        c.gateway
            .ledger
            .as_mut()
            .context("ledger")?
            .round_interval_ms = 1_000;
        let (gw, ledger) = in_process(&c)?;
        // Before the integrator starts, so no round starts before it.
        let queued_at = Instant::now();
        let integrator = gateway::ledger::spawn_integrator(gw.clone());
        let mut published = ledger.subscribe();
        let queue = |part: Vec<PendingRecord>| {
            let (gw, ledger) = (gw.clone(), ledger.clone());
            async move {
                indexer::run(&gw.store, |tx| {
                    let part = &part;
                    async move {
                        for (seq, p) in part.iter().enumerate() {
                            indexer::ledger::enqueue_tx(&tx, seq as u16, p);
                        }
                        Ok::<_, indexer::schema::SchemaError>(())
                    }
                })
                .await?;
                ledger.queued();
                anyhow::Ok(())
            }
        };
        let mut all = records(5, 6)?;
        queue(all.clone()).await?;
        let wait = Duration::from_secs(60);
        tokio::time::timeout(wait, published.wait_for(|s| *s >= 5)).await??;
        let one = records(1, 7)?;
        all.extend(one.clone());
        queue(one).await?;
        tokio::time::timeout(wait, published.wait_for(|s| *s >= 6)).await??;
        // The first round started after `queued_at`; the next only
        // `interval` after it, as nobody waits for a receipt here.
        assert!(
            queued_at.elapsed() >= interval,
            "the sixth statement was published {:?} after the first five were queued",
            queued_at.elapsed()
        );
        integrator.abort();
        assert_one_tree(&c, dir.path(), &gw, &all).await
    }

    /// A queue several batches long, integrated with each batch read and
    /// hashed while the one before it commits: the published checkpoint
    /// covers every statement, in queue order, with the root an independent
    /// RFC 9162 computation gives, and every opening is the one queued.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_integrated_ahead_of_their_commits_make_one_correct_tree() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let c = init(dir.path()).await?;
        let (gw, ledger) = in_process(&c)?;
        // Over three batches of 8,192, queued in chunks and singly.
        let total = 20_000u64;
        let queued = records(total, 2)?;
        for (i, part) in queued.chunks(1000).enumerate() {
            indexer::run(&gw.store, |tx| async move {
                if i % 5 == 4 {
                    for (seq, p) in part.iter().enumerate() {
                        indexer::ledger::enqueue_tx(&tx, seq as u16, p);
                    }
                } else {
                    indexer::ledger::enqueue_notarizations_tx(&tx, part, "bench");
                }
                Ok::<_, indexer::schema::SchemaError>(())
            })
            .await?;
        }
        assert!(gateway::ledger::integrate_pending(&gw, &ledger).await?);
        assert_one_tree(&c, dir.path(), &gw, &queued).await?;
        // Every statement is found by its id, queued singly or in a chunk.
        let ids: Vec<EvidenceId> = queued.iter().map(|p| p.evidence).collect();
        let found = indexer::run(&gw.store, |tx| {
            let ids = &ids;
            async move {
                let mut out = Vec::new();
                for id in ids {
                    out.push(indexer::ledger::leaves_of_tx(&tx, *id).await?);
                }
                Ok::<_, indexer::schema::SchemaError>(out)
            }
        })
        .await?;
        for (n, f) in found.iter().enumerate() {
            assert_eq!(f, &vec![(n as u64, Kind::Notarized)], "leaf of id {n}");
        }
        Ok(())
    }

    /// The published checkpoint never goes back: one already there that is
    /// larger than the index's (as a successor integrator leaves it when a
    /// fenced-off one publishes late) stays, through further integration and
    /// a restart, until this gateway's tree passes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_published_checkpoint_is_never_replaced_by_a_smaller_one() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let c = init(dir.path()).await?;
        let (gw, ledger) = in_process(&c)?;
        let config = c.gateway.ledger.as_ref().context("ledger")?;
        let file = config.tiles_dir.join("checkpoint");
        let vkey = std::fs::read_to_string(dir.path().join(cluster::LEDGER_VKEY_FILE))?;
        let published = || -> Result<protocol::ledger::VerifiedCheckpoint> {
            let note = std::fs::read_to_string(&file)?;
            Ok(protocol::ledger::verify_checkpoint(&note, vkey.trim())?)
        };
        let queue = |n: u64, tag: u8| {
            let gw = gw.clone();
            async move {
                let part = records(n, tag)?;
                indexer::run(&gw.store, |tx| {
                    let part = &part;
                    async move {
                        indexer::ledger::enqueue_notarizations_tx(&tx, part, "test");
                        Ok::<_, indexer::schema::SchemaError>(())
                    }
                })
                .await?;
                anyhow::Ok(part)
            }
        };
        let mut queued = queue(100, 4).await?;
        assert!(gateway::ledger::integrate_pending(&gw, &ledger).await?);
        assert_eq!(published()?.size, 100);

        // A newer checkpoint, signed with this log's key, published by
        // another writer.
        let skey = std::fs::read_to_string(&config.signer_key)?;
        let ahead = protocol::ledger::sign_checkpoint(
            skey.trim(),
            &ledger.origin,
            500,
            protocol::ledger::TreeHash([7u8; 32]),
        )?;
        std::fs::write(&file, &ahead)?;

        queued.extend(queue(10, 5).await?);
        assert!(gateway::ledger::integrate_pending(&gw, &ledger).await?);
        assert_eq!(index_state(&gw, vkey.trim()).await?.1.size, 110);
        assert_eq!(
            std::fs::read_to_string(&file)?,
            ahead,
            "a checkpoint of 110 replaced the published one of 500"
        );
        // A restarted gateway first compares the published log with its
        // index: a tree of 500 the index does not hold is refused (it would
        // be a fork), and nothing is written over it.
        let (gw2, ledger2) = in_process_on(&c, gw.store.clone())?;
        let refused = gateway::ledger::integrate_pending(&gw2, &ledger2).await;
        assert!(
            matches!(refused, Err(gateway::ledger::LedgerError::Forked(_))),
            "{refused:?}"
        );
        assert_eq!(std::fs::read_to_string(&file)?, ahead);

        // Once the tree is larger than the published one, it is replaced.
        queued.extend(queue(400, 6).await?);
        assert!(gateway::ledger::integrate_pending(&gw, &ledger).await?);
        let cp = published()?;
        assert_eq!(cp.size, 510);
        assert_eq!(cp.root.0, rfc9162_root(&commitments(&queued)));
        Ok(())
    }

    /// An integrator fenced off mid-pipeline (another takes the lease after
    /// its first publication, with later batches committing and read ahead)
    /// commits nothing more; its last checkpoint is a prefix of the tree a
    /// successor finishes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_integrator_fenced_off_mid_pipeline_stops_and_a_successor_finishes_one_tree(
    ) -> Result<()> {
        let dir = tempfile::tempdir()?;
        let Midway {
            c,
            gw,
            vkey,
            queued,
            run,
        } = integrating_midway(dir.path()).await?;
        // Another integrator takes the lease, as after this one stalled past
        // it, and lets it lapse at once.
        let thief = 7u128;
        let taken = indexer::run(&gw.store, |tx| async move {
            let fence = indexer::ledger::acquire_lease_tx(&tx, thief, u64::MAX / 2, 0, None)
                .await?
                .ok();
            if let Some(fence) = fence {
                indexer::ledger::renew_lease_tx(&tx, thief, fence, 0, 0);
            }
            Ok::<_, indexer::schema::SchemaError>(fence)
        })
        .await?;
        taken.context("the lease could not be taken")?;
        let outcome = run.await?;
        assert!(
            matches!(
                outcome,
                Err(gateway::ledger::LedgerError::Integrate(
                    indexer::ledger::IntegrateError::Fenced(_)
                ))
            ),
            "the fenced-off integrator stops: {outcome:?}"
        );
        let (size, cp) = index_state(&gw, &vkey).await?;
        assert!(size < queued.len() as u64, "stopped before the end");
        assert!(cp.size <= size);
        let commitments = commitments(&queued);
        assert_eq!(cp.root.0, rfc9162_root(&commitments[..cp.size as usize]));

        // A successor on the same index (another gateway) takes the lapsed
        // lease, publishes what is integrated and integrates the rest.
        let (gw2, ledger2) = in_process_on(&c, gw.store.clone())?;
        assert!(gateway::ledger::integrate_pending(&gw2, &ledger2).await?);
        assert_one_tree(&c, dir.path(), &gw2, &queued).await
    }

    /// A publication that fails mid-pipeline (the tiles cannot be written)
    /// stops integration at the batch committing beside it, signs nothing
    /// over unwritten tiles, and a later run publishes and finishes one tree.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_publication_failing_mid_pipeline_stops_commits_and_signs_nothing_unwritten(
    ) -> Result<()> {
        let dir = tempfile::tempdir()?;
        let Midway {
            c,
            gw,
            vkey,
            queued,
            run,
        } = integrating_midway(dir.path()).await?;
        // A file where the tiles directory was: every later tile write fails
        // (root included).
        let tiles_dir = c
            .gateway
            .ledger
            .as_ref()
            .context("ledger")?
            .tiles_dir
            .clone();
        let aside = dir.path().join("tiles-aside");
        std::fs::rename(&tiles_dir, &aside)?;
        std::fs::write(&tiles_dir, b"not a directory")?;
        let outcome = run.await?;
        assert!(outcome.is_err(), "a failed publication fails the run");
        let (size, cp) = index_state(&gw, &vkey).await?;
        assert!(size < queued.len() as u64, "stopped before the end");
        assert!(
            size - cp.size <= 2 * gateway::ledger::BATCH_ENTRIES as u64,
            "integrated {} past the last checkpoint ({}): commits went on after the failure",
            size - cp.size,
            cp.size
        );
        let commitments = commitments(&queued);
        assert_eq!(cp.root.0, rfc9162_root(&commitments[..cp.size as usize]));
        // Every tile the signed checkpoint needs was written before it.
        for n in 0..cp.size / 256 {
            for kind in ["entries", "0"] {
                let path = tile_file(kind, n);
                assert!(
                    aside.join(&path).is_file(),
                    "{path} missing under checkpoint {}",
                    cp.size
                );
            }
        }

        // The tiles can be written again: the next run (here another
        // gateway's) publishes and finishes.
        std::fs::remove_file(&tiles_dir)?;
        std::fs::rename(&aside, &tiles_dir)?;
        let (gw2, ledger2) = in_process_on(&c, gw.store.clone())?;
        assert!(gateway::ledger::integrate_pending(&gw2, &ledger2).await?);
        assert_one_tree(&c, dir.path(), &gw2, &queued).await
    }
}
