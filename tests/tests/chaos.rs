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
use rand::{RngExt as _, SeedableRng as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the faults go on.
const CHAOS: Duration = Duration::from_secs(75);

/// A filing that got its 201: (id, length, seed of its bytes).
type Filed = (String, usize, u64);

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
    let (mut wiped, mut gateway_kills) = (false, 0);
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
                    down.push((n, Instant::now()));
                    injected.push(format!("{t:>5.1}s kill node {n}"));
                }
            }
            4..=6 => {
                let n = rng.random_range(0..8u32);
                let files = c.shard_files(n);
                if !files.is_empty() {
                    let f = &files[rng.random_range(0..files.len())];
                    if let Ok(mut raw) = std::fs::read(f) {
                        // Past the header: a body byte.
                        let at = raw.len() - 1 - rng.random_range(0..raw.len().min(1024));
                        raw[at] ^= 1 << rng.random_range(0..8);
                        std::fs::write(f, raw)?;
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
    stop.store(true, Ordering::Relaxed);
    let refused = filing
        .join()
        .map_err(|_| anyhow::anyhow!("the filer panicked"))?;
    for (n, _) in down.drain(..) {
        c.start_node(n)?;
        injected.push(format!("  end restart node {n}"));
    }
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
    let key = std::fs::read_to_string(c.data_dir().join("ledger.vkey"))?
        .trim()
        .to_owned();
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
    for (id, _, _) in &filed {
        let a = c.get_with(&c.token, &format!("/v1/evidence/{id}/receipt"), &[])?;
        let r: Receipt = serde_json::from_slice(&a.body)
            .with_context(|| format!("receipt of {id}: {}", String::from_utf8_lossy(&a.body)))?;
        let ok = r
            .verify(&key)
            .map_err(|e| anyhow::anyhow!("receipt of {id} does not verify: {e}"))?;
        // And it is this filing's receipt, not some other leaf's.
        anyhow::ensure!(
            ok.statement.evidence == *id,
            "receipt of {id} names {}",
            ok.statement.evidence
        );
    }
    // Full redundancy: two more nodes die and nothing is lost.
    let (a, b) = (rng.random_range(0..8u32), rng.random_range(0..8u32));
    let b = if a == b { (b + 1) % 8 } else { b };
    c.kill_node(a);
    c.kill_node(b);
    check(&c, &format!("with nodes {a} and {b} dead after repair"))?;
    println!(
        "found: all {} filings byte-exact with receipts verified, also with nodes {a} and {b} dead",
        filed.len()
    );
    Ok(())
}
