//! Chaos, bounded: continuous filing on an 8-node RS(4,2) cluster while
//! nodes are killed and restarted (at most 2 down at once), random bytes
//! are flipped in shard files, one node's data dir is wiped, and the
//! gateway is killed mid-upload. Then, after repair: every filing that got
//! a 201 reads back byte-exact and its receipt verifies, and with 2 more
//! nodes dead it still does (only k+m live shards per stripe allow that).
//! The test prints what it injected and what it found.

use anyhow::{bail, Context, Result};
use custodia_tests::{bytes, Shape, TestCluster};
use protocol::ledger::Receipt;
use protocol::shard::ShardHeader;
use rand::{RngExt as _, SeedableRng as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the faults go on.
const CHAOS: Duration = Duration::from_secs(75);

/// A filing that got its 201: (id, length, seed of its bytes).
type Filed = (String, usize, u64);

/// A shard file a node holds: (node, shard index, path).
type Held = (u32, u8, std::path::PathBuf);

/// Files random-sized evidence until `stop`; records each 201.
fn filer(api: String, token: String, stop: Arc<AtomicBool>, filed: Arc<Mutex<Vec<Filed>>>) -> u64 {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut failed = 0u64;
    let mut seed = 1_000u64;
    while !stop.load(Ordering::Relaxed) {
        seed += 1;
        let len = rng.random_range(1..400_000usize);
        let data = bytes(len, seed);
        let r = agent
            .post(format!("{api}/v1/evidence"))
            .header("Authorization", &format!("Bearer {token}"))
            .send(&data[..]);
        match r {
            Ok(mut resp) if resp.status().as_u16() == 201 => {
                let v: serde_json::Value = resp.body_mut().read_json().unwrap_or_default();
                let id = v["id"].as_str().unwrap_or_default().to_owned();
                assert_eq!(
                    v["blake3"].as_str(),
                    Some(blake3::hash(&data).to_hex().as_str()),
                    "a 201 names the bytes sent"
                );
                if let Ok(mut f) = filed.lock() {
                    f.push((id, len, seed));
                }
            }
            _ => {
                failed += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    failed
}

#[test]
fn filing_through_chaos_loses_nothing() -> Result<()> {
    let mut c = TestCluster::start(Shape {
        shard_size: 16 * 1024,
        ..Shape::default()
    })?;
    c.set_gateway(&[
        ("node_down_after_ms", toml::Value::Integer(2_000)),
        ("repair_after_down_ms", toml::Value::Integer(2_000)),
        ("repair_interval_ms", toml::Value::Integer(500)),
        // Uploads the gateway kills cut short are collected within seconds,
        // not the default two minutes: a disk replaced meanwhile is
        // reconciled only once every upload begun before it has ended, and
        // the repair check below allows a minute without progress.
        ("intent_lease_ms", toml::Value::Integer(15_000)),
        ("gc_interval_ms", toml::Value::Integer(2_000)),
        // Old copies a repair replaced, and those on a node that was down
        // as it did, go within seconds: the check below counts the copies
        // the nodes hold once only the placed ones are left (one
        // lingering would count for a shard the index may not place).
        ("repair_old_copy_grace_ms", toml::Value::Integer(2_000)),
        ("orphan_sweep_interval_ms", toml::Value::Integer(2_000)),
        ("orphan_grace_ms", toml::Value::Integer(3_000)),
    ])?;
    let stop = Arc::new(AtomicBool::new(false));
    let filed = Arc::new(Mutex::new(Vec::new()));
    let filing = {
        let (api, token, stop, filed) =
            (c.api.clone(), c.token.clone(), stop.clone(), filed.clone());
        std::thread::spawn(move || filer(api, token, stop, filed))
    };

    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut injected: Vec<String> = Vec::new();
    let mut down: Vec<(u32, Instant)> = Vec::new();
    let (mut wiped, mut gateway_kills, mut node_kills) = (false, 0, 0);
    // Each flipped shard file and its bytes after the flip (one flip per
    // file: a second of the same bit would undo the first).
    let mut flipped: std::collections::HashMap<std::path::PathBuf, Vec<u8>> =
        std::collections::HashMap::new();
    let start = Instant::now();
    while start.elapsed() < CHAOS {
        std::thread::sleep(Duration::from_millis(rng.random_range(500..2_000)));
        // Bring back nodes that have been down a while.
        let now = Instant::now();
        for (n, since) in down.clone() {
            if now.duration_since(since) > Duration::from_secs(rng.random_range(3..10)) {
                c.start_node(n)?;
                down.retain(|(d, _)| *d != n);
                injected.push(format!(
                    "{:>5.1}s restart node {n}",
                    start.elapsed().as_secs_f64()
                ));
            }
        }
        let t = start.elapsed().as_secs_f64();
        match rng.random_range(0..10) {
            0..=3 if down.len() < 2 => {
                let n = rng.random_range(0..8u32);
                if !down.iter().any(|(d, _)| *d == n) {
                    c.kill_node(n);
                    node_kills += 1;
                    down.push((n, Instant::now()));
                    injected.push(format!("{t:>5.1}s kill node {n}"));
                }
            }
            4..=6 => {
                let n = rng.random_range(0..8u32);
                let mut files = c.shard_files(n);
                files.retain(|f| !flipped.contains_key(f));
                if !files.is_empty() {
                    let f = &files[rng.random_range(0..files.len())];
                    let read = std::fs::read(f).ok().and_then(|raw| {
                        let (_, body_at) = ShardHeader::parse_file_prefix(&raw).ok()?;
                        (raw.len() > body_at).then_some((raw, body_at))
                    });
                    if let Some((mut raw, body_at)) = read {
                        // A body byte, past the header (a flip in a field no
                        // read checks would never be found).
                        let at = rng.random_range(body_at..raw.len());
                        raw[at] ^= 1 << rng.random_range(0..8);
                        std::fs::write(f, &raw)?;
                        flipped.insert(f.clone(), raw);
                        injected.push(format!(
                            "{t:>5.1}s flip a bit in {} on node {n}",
                            f.file_name().and_then(|n| n.to_str()).unwrap_or("?")
                        ));
                    }
                }
            }
            7 if !wiped && down.is_empty() => {
                let n = rng.random_range(0..8u32);
                c.kill_node(n);
                std::fs::remove_dir_all(c.node_dir(n))?;
                c.start_node(n)?;
                wiped = true;
                injected.push(format!("{t:>5.1}s wipe node {n}'s data dir and restart it"));
            }
            8 if gateway_kills < 2 => {
                c.kill_gateway();
                gateway_kills += 1;
                injected.push(format!("{t:>5.1}s kill the gateway mid-upload"));
                std::thread::sleep(Duration::from_millis(300));
                c.start_gateway()?;
            }
            _ => {}
        }
    }
    // Every kind of fault lands at least once, whatever the dice said,
    // while filings go on.
    for (n, _) in down.drain(..) {
        c.start_node(n)?;
        injected.push(format!("  end restart node {n}"));
    }
    if !wiped {
        let n = rng.random_range(0..8u32);
        c.kill_node(n);
        std::fs::remove_dir_all(c.node_dir(n))?;
        c.start_node(n)?;
        wiped = true;
        injected.push(format!("  end wipe node {n}'s data dir and restart it"));
    }
    if gateway_kills == 0 {
        c.kill_gateway();
        gateway_kills += 1;
        injected.push("  end kill the gateway mid-upload".to_owned());
        std::thread::sleep(Duration::from_millis(300));
        c.start_gateway()?;
    }
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let refused = filing
        .join()
        .map_err(|_| anyhow::anyhow!("the filer panicked"))?;
    c.wait_healthy(8)?;
    let filed = filed
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    println!("injected:\n{}", injected.join("\n"));
    println!(
        "filings: {} got 201, {refused} were refused or cut off",
        filed.len()
    );
    assert!(
        filed.len() >= 20,
        "too few filings got through: {}",
        filed.len()
    );
    println!(
        "faults: {node_kills} node kills, {} bit flips, wiped: {wiped}, {gateway_kills} gateway kills",
        flipped.len()
    );
    assert!(
        node_kills > 0 && !flipped.is_empty() && wiped && gateway_kills > 0,
        "a kind of fault was never injected"
    );

    // Repair, reading and checking every shard of every stripe.
    let out = c.cli(&["repair", "--verify-all", "--patience-secs", "60"])?;
    let status = String::from_utf8(c.cli(&["status"])?.stdout)?;
    println!("custodia status after repair:\n{status}");
    if !out.status.success() {
        bail!(
            "repair did not finish: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Everything reads back, and every receipt verifies.
    let key = c.log_key()?;
    let check = |c: &TestCluster, why: &str| -> Result<()> {
        for (id, len, seed) in &filed {
            let got = c.read(id).with_context(|| {
                // What the gateway saw, for whoever reads a failed CI run.
                let log =
                    std::fs::read_to_string(c.data_dir().join("gateway.log")).unwrap_or_default();
                let seen: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .collect();
                let tail = seen[seen.len().saturating_sub(20)..].join("\n");
                // Everything the gateway said about this filing (its shard
                // keys name it without hyphens).
                let simple = id.replace('-', "");
                let about: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains(id.as_str()) || l.contains(&simple))
                    .collect();
                let about = about[about.len().saturating_sub(80)..].join("\n");
                format!(
                    "reading {id} {why}; the gateway's log about it:\n{about}\n\
                     its last warnings:\n{tail}"
                )
            })?;
            if got != bytes(*len, *seed) {
                bail!("{id} did not read back byte-exact {why}");
            }
        }
        Ok(())
    };
    check(&c, "after repair")?;

    // No stripe short of k+m shards: once the old copies repairs left are
    // gone, each of every filing's stripes has all six shards, one copy
    // each, on six nodes, each whole (its body hashes to its header's
    // BLAKE3), counted from the nodes' shard files.
    let filed_ids: std::collections::HashSet<String> =
        filed.iter().map(|(id, ..)| id.replace('-', "")).collect();
    let shard_bytes = 16 * 1024;
    let held = |c: &TestCluster| {
        let mut held: std::collections::HashMap<(String, u64), Vec<Held>> =
            std::collections::HashMap::new();
        for n in 0..8u32 {
            for f in c.shard_files(n) {
                let name = f.file_name().and_then(|s| s.to_str()).unwrap_or_default();
                let mut parts = name.split('-');
                if let (Some(id), Some(Ok(stripe)), Some(Ok(index)), None) = (
                    parts.next(),
                    parts.next().map(str::parse::<u64>),
                    parts.next().map(str::parse::<u8>),
                    parts.next(),
                ) {
                    if filed_ids.contains(id) {
                        held.entry((id.to_owned(), stripe)).or_default().push((
                            n,
                            index,
                            f.clone(),
                        ));
                    }
                }
            }
        }
        held
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    let held = loop {
        let now = held(&c);
        let doubled = now
            .values()
            .filter(|shards| {
                let indices: std::collections::BTreeSet<u8> =
                    shards.iter().map(|(_, i, _)| *i).collect();
                indices.len() < shards.len()
            })
            .count();
        if doubled == 0 {
            break now;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{doubled} stripes still hold two copies of a shard 90 s after repair"
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    let mut shards_checked = 0;
    for (id, len, _) in &filed {
        let simple = id.replace('-', "");
        let stripes = len.div_ceil(4 * shard_bytes).max(1) as u64;
        for stripe in 0..stripes {
            let shards = held
                .get(&(simple.clone(), stripe))
                .cloned()
                .unwrap_or_default();
            let indices: std::collections::BTreeSet<u8> =
                shards.iter().map(|(_, i, _)| *i).collect();
            let nodes: std::collections::BTreeSet<u32> = shards.iter().map(|(n, ..)| *n).collect();
            let placed: Vec<(u32, u8)> = shards.iter().map(|(n, i, _)| (*n, *i)).collect();
            anyhow::ensure!(
                shards.len() == 6 && indices.len() == 6 && nodes.len() == 6,
                "stripe {stripe} of {id} after repair: shards {placed:?}"
            );
            for (n, _, f) in &shards {
                let raw = std::fs::read(f)?;
                let whole = ShardHeader::parse_file_prefix(&raw)
                    .is_ok_and(|(h, body_at)| h.matches(&raw[body_at..]));
                anyhow::ensure!(
                    whole,
                    "{} on node {n} is not whole after repair",
                    f.display()
                );
                shards_checked += 1;
            }
        }
    }
    // Every flipped shard of a filing was found or is gone: none is left
    // in place as flipped, and flips were caught, moved whole into their
    // node's quarantine (a flip may also land on a copy a repair replaced
    // and go with it, or on a node wiped since).
    let quarantined = |n: u32, name: &str, raw: &[u8]| -> bool {
        std::fs::read_dir(c.node_dir(n).join("quarantine"))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|q| q.strip_prefix(name).is_some_and(|r| r.starts_with('.')))
            })
            .any(|e| std::fs::read(e.path()).is_ok_and(|q| q == raw))
    };
    let mut caught = 0;
    for (f, raw) in &flipped {
        let name = f.file_name().and_then(|s| s.to_str()).unwrap_or_default();
        // (An orphan of an upload that got no 201 is no evidence; it goes
        // when the sweep gets to it.)
        if !name
            .split('-')
            .next()
            .is_some_and(|id| filed_ids.contains(id))
        {
            continue;
        }
        anyhow::ensure!(
            std::fs::read(f).map_or(true, |now| now != *raw),
            "corruption never found: {}",
            f.display()
        );
        if (0..8u32).any(|n| quarantined(n, name, raw)) {
            caught += 1;
        }
    }
    anyhow::ensure!(
        caught > 0,
        "no flip of a filing's shard was caught ({} flips)",
        flipped.len()
    );
    for (id, len, seed) in &filed {
        let a = c.get_with(&c.token, &format!("/v1/evidence/{id}/receipt"), &[])?;
        let r: Receipt = serde_json::from_slice(&a.body)
            .with_context(|| format!("receipt of {id}: {}", String::from_utf8_lossy(&a.body)))?;
        let ok = r
            .verify(&key)
            .map_err(|e| anyhow::anyhow!("receipt of {id} does not verify: {e}"))?;
        // And it is this filing's receipt, not some other leaf's, and it
        // vouches for the bytes filed.
        anyhow::ensure!(
            ok.statement.evidence == *id,
            "receipt of {id} names {}",
            ok.statement.evidence
        );
        let data = bytes(*len, *seed);
        anyhow::ensure!(
            ok.statement.blake3 == blake3::hash(&data).to_hex().as_str()
                && ok.statement.size == data.len() as u64,
            "receipt of {id} vouches for other bytes: {} ({} bytes)",
            ok.statement.blake3,
            ok.statement.size
        );
    }
    // Full redundancy: two more nodes die and nothing is lost.
    let (a, b) = (rng.random_range(0..8u32), rng.random_range(0..8u32));
    let b = if a == b { (b + 1) % 8 } else { b };
    c.kill_node(a);
    c.kill_node(b);
    check(&c, &format!("with nodes {a} and {b} dead after repair"))?;
    println!(
        "found: all {} filings byte-exact with receipts verified for their bytes, every stripe \
         with k+m whole shards on k+m nodes ({shards_checked} shards hashed), {caught} of {} \
         flips caught in quarantine and none left in place; also with nodes {a} and {b} dead",
        filed.len(),
        flipped.len()
    );
    Ok(())
}
