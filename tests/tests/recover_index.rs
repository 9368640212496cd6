//! `custodia recover-index`: the index is destroyed and rebuilt from the
//! ledger's openings archive, the published checkpoint and the nodes'
//! self-describing shards. Afterwards every filing reads back byte-exact
//! (whole and by range), its receipt verifies, its legal hold still holds,
//! lookups by content work, the ledger goes on from where it was (the next
//! checkpoint is consistent with the last one before the loss), a damaged and
//! a missing shard found on the way are repaired, and the admin's credentials
//! still work.

use anyhow::{bail, Context, Result};
use custodia_tests::{bytes, Shape, TestCluster};
use protocol::ledger::{self, Receipt, TreeHash};
use serde_json::Value;
use std::io::{Seek, SeekFrom, Write};

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

fn send(c: &TestCluster, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value)> {
    let url = format!("{}{path}", c.api);
    let auth = format!("Bearer {}", c.token);
    let a = agent();
    let mut resp = match (method, body) {
        ("PUT", _) => a.put(&url).header("authorization", &auth).send_empty()?,
        (_, Some(b)) => a.post(&url).header("authorization", &auth).send_json(b)?,
        (_, None) => a.get(&url).header("authorization", &auth).call()?,
    };
    let status = resp.status().as_u16();
    Ok((status, resp.body_mut().read_json().unwrap_or(Value::Null)))
}

fn checkpoint(c: &TestCluster, key: &str) -> Result<ledger::VerifiedCheckpoint> {
    let a = c.get_with("", "/ledger/checkpoint", &[])?;
    if a.status != 200 {
        bail!("GET /ledger/checkpoint answered {}", a.status);
    }
    Ok(ledger::verify_checkpoint(&String::from_utf8(a.body)?, key)?)
}

fn recover(c: &TestCluster, extra: &[&str]) -> Result<std::process::Output> {
    let mut args = vec!["recover-index"];
    args.extend_from_slice(extra);
    c.custodia(&args)
}

#[test]
fn a_destroyed_index_is_rebuilt_from_the_ledger_archive_and_the_nodes() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    c.set_gateway(&[("repair_interval_ms", toml::Value::Integer(500))])?;
    let key = std::fs::read_to_string(c.data_dir().join("ledger.vkey"))?
        .trim()
        .to_owned();

    // Filings of many sizes (empty, one byte, many stripes), one under a
    // legal hold, and 300 hash-only notarizations (more than one tile).
    let mut filed = Vec::new();
    for (i, len) in [0usize, 1, 4096, 16_384, 16_385, 100_000, 250_000, 777]
        .into_iter()
        .enumerate()
    {
        let data = bytes(len, i as u64 + 40);
        let r = c.file(&data)?;
        let id = r["id"].as_str().context("id")?.to_owned();
        filed.push((id, data));
    }
    let held = filed[5].0.clone();
    let (status, body) = send(&c, "PUT", &format!("/v1/evidence/{held}/legal-hold"), None)?;
    assert_eq!((status, body["legal_hold"].as_bool()), (200, Some(true)));
    let items: Vec<Value> = (0..300u32)
        .map(|i| serde_json::json!({ "blake3": custodia_tests::blake3_hex(&i.to_be_bytes()), "size": 4 }))
        .collect();
    let (status, body) = send(
        &c,
        "POST",
        "/v1/notarize",
        Some(serde_json::json!({ "items": items })),
    )?;
    assert_eq!(status, 201, "{body}");
    // Every statement so far under a published checkpoint.
    let before = {
        let mut cp = checkpoint(&c, &key)?;
        for _ in 0..50 {
            // The filings, the hold and the 300 notarizations.
            if cp.size >= filed.len() as u64 + 301 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            cp = checkpoint(&c, &key)?;
        }
        cp
    };
    assert!(before.size > 300, "checkpoint size {}", before.size);

    // A running gateway's index is never replaced.
    let out = recover(&c, &[])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stop the gateway"), "{err}");

    // The index is destroyed: the gateway dies and its file is garbage.
    c.kill_gateway();
    let index = c.data_dir().join("index.redb");
    let len = std::fs::metadata(&index)?.len() as usize;
    std::fs::write(&index, bytes(len, 99))?;
    // And on the nodes, one shard is flipped and one deleted.
    let big = &filed[6].0;
    let mut shards: Vec<_> = c
        .all_shard_files()
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(&big.replace('-', "")))
        .collect();
    shards.sort();
    assert!(shards.len() >= 12, "shards of {big}: {}", shards.len());
    std::fs::remove_file(&shards[0])?;
    let mut f = std::fs::OpenOptions::new().write(true).open(&shards[7])?;
    let flen = f.metadata()?.len();
    f.seek(SeekFrom::Start(flen - 10))?;
    f.write_all(b"XXXXXXXXXX")?;
    drop(f);

    // With a node down, recovery refuses unless told to proceed.
    c.kill_node(2);
    let out = recover(&c, &[])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node n2"), "{err}");
    c.start_node_and_wait(2)?;

    let out = recover(&c, &["--json"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    println!(
        "custodia recover-index:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "recover-index failed");
    let report: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["evidence"], filed.len() as u64, "{report}");
    assert_eq!(report["notarized"], 300, "{report}");
    assert_eq!(report["checkpoint_size"], before.size, "{report}");
    assert!(
        report["ledger_leaves"].as_u64() >= Some(before.size),
        "{report}"
    );
    assert_eq!(report["unreadable"].as_array().map(Vec::len), Some(0));
    assert_eq!(report["nodes_listed"], 8, "{report}");
    // The deleted shard and the flipped one (quarantined when read back).
    assert_eq!(report["stripes_degraded"], 2, "{report}");
    let kept: Vec<_> = std::fs::read_dir(c.data_dir())?
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("index.redb.replaced-")
        })
        .collect();
    assert_eq!(kept.len(), 1, "the destroyed index is kept aside");

    c.start_gateway()?;
    c.wait_healthy(8)?;
    // Everything reads back, whole and by range (the recomputed outboard).
    for (id, data) in &filed {
        assert_eq!(&c.read(id)?, data, "{id} after recovery");
    }
    let (id, data) = &filed[6];
    assert_eq!(c.read_range(id, 70_000, 140_000)?, data[70_000..=140_000]);
    // Receipts verify against the recovered log; lookups by content work.
    for (id, data) in &filed {
        let a = c.get_with(&c.token, &format!("/v1/evidence/{id}/receipt"), &[])?;
        assert_eq!(a.status, 200, "receipt of {id}");
        let r: Receipt = serde_json::from_slice(&a.body)?;
        let v = r.verify(&key)?;
        assert_eq!(v.statement.evidence, *id);
        assert_eq!(v.statement.blake3, custodia_tests::blake3_hex(data));
        let (status, body) = send(
            &c,
            "GET",
            &format!("/v1/evidence/by-hash/{}", custodia_tests::blake3_hex(data)),
            None,
        )?;
        assert_eq!(status, 200, "{body}");
        assert!(body.to_string().contains(id.as_str()), "{body}");
    }
    // The legal hold survived.
    let (status, body) = send(&c, "GET", &format!("/v1/evidence/{held}/manifest"), None)?;
    assert_eq!(status, 200);
    assert_eq!(body["legal_hold"], true, "{body}");

    // The ledger goes on: a new filing lands in a checkpoint that extends
    // the last one published before the loss.
    let r = c.file(&bytes(5000, 7))?;
    let leaf = r["receipt"]["leaf_index"].as_u64().context("leaf index")?;
    assert!(leaf >= before.size, "leaf {leaf} reuses the recovered log");
    let after = checkpoint(&c, &key)?;
    let (status, body) = send(
        &c,
        "GET",
        &format!(
            "/v1/ledger/consistency?old={}&new={}",
            before.size, after.size
        ),
        None,
    )?;
    assert_eq!(status, 200, "{body}");
    let proof: Vec<TreeHash> = body["proof"]
        .as_array()
        .context("proof")?
        .iter()
        .map(|h| {
            TreeHash::parse_hash(h.as_str().unwrap_or_default())
                .map_err(|e| anyhow::anyhow!("{e:?}"))
        })
        .collect::<Result<_>>()?;
    ledger::check_consistency(&before, &after, &proof)?;

    // Repair restores the two damaged shards.
    let out = c.cli(&["repair", "--patience-secs", "30"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = c.cli(&["status", "--json"])?;
    let s: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(s["degraded_stripes"], 0, "{s}");
    Ok(())
}
