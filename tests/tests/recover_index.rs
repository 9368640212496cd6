//! `custodia recover-index`: the index is destroyed and rebuilt from the
//! ledger's openings archive, the published checkpoint and the nodes'
//! self-describing shards. Afterwards every filing reads back byte-exact
//! (whole and by range), its receipt verifies, its legal hold still holds,
//! lookups by content work, the ledger goes on from where it was (the next
//! checkpoint is consistent with the last one before the loss), a damaged and
//! a missing shard found on the way are repaired, and the admin's credentials
//! still work.

use anyhow::{bail, ensure, Context, Result};
use custodia_tests::{bytes, header, Shape, TestCluster, Tool};
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
        ("DELETE", _) => a.delete(&url).header("authorization", &auth).call()?,
        (_, Some(b)) => a.post(&url).header("authorization", &auth).send_json(b)?,
        (_, None) => a.get(&url).header("authorization", &auth).call()?,
    };
    let status = resp.status().as_u16();
    Ok((status, resp.body_mut().read_json().unwrap_or(Value::Null)))
}

/// Notarizes (hash only) the 4-byte big-endian encodings of `numbers`, in
/// one request (at most 1,000).
fn notarize(c: &TestCluster, numbers: std::ops::Range<u32>) -> Result<()> {
    let items: Vec<Value> = numbers
        .map(|i| serde_json::json!({ "blake3": custodia_tests::blake3_hex(&i.to_be_bytes()), "size": 4 }))
        .collect();
    let (status, body) = send(
        c,
        "POST",
        "/v1/notarize",
        Some(serde_json::json!({ "items": items })),
    )?;
    ensure!(status == 201, "notarizing: {status} {body}");
    Ok(())
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

/// [`recover`], which must succeed; what it printed on stdout.
fn recovered(c: &TestCluster, extra: &[&str]) -> Result<String> {
    let out = recover(c, extra)?;
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(said)
}

/// A cluster repairing every half second, and its log's verifier key.
fn repairing_cluster() -> Result<(TestCluster, String)> {
    let mut c = TestCluster::start(Shape::default())?;
    c.set_gateway(&[("repair_interval_ms", toml::Value::Integer(500))])?;
    let key = c.log_key()?;
    Ok((c, key))
}

#[test]
fn a_destroyed_index_is_rebuilt_from_the_ledger_archive_and_the_nodes() -> Result<()> {
    let (mut c, key) = repairing_cluster()?;

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
    notarize(&c, 0..300)?;
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
    assert!(err.contains("in use by another custodia process"), "{err}");

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
    // The one flipped also has an intact copy on a node listed after it (a
    // repair's old copy awaiting deletion, say): recovery falls back to it.
    let holder = (0..8u32)
        .find(|&n| shards[7].starts_with(c.node_dir(n)))
        .context("the flipped shard's node")?;
    assert!(holder < 7, "shard 7 of the sorted list is on node {holder}");
    let rel = shards[7].strip_prefix(c.node_dir(holder))?.to_owned();
    let copy = c.node_dir(7).join(&rel);
    std::fs::create_dir_all(copy.parent().context("parent")?)?;
    std::fs::copy(&shards[7], &copy)?;
    let mut f = std::fs::OpenOptions::new().write(true).open(&shards[7])?;
    let flen = f.metadata()?.len();
    f.seek(SeekFrom::Start(flen - 10))?;
    f.write_all(b"XXXXXXXXXX")?;
    drop(f);

    // A ledger not where the configuration says is refused, never taken
    // for an empty one (every shard would be left to garbage collection):
    // tiles missing while the archive has leaves, then both missing while
    // the nodes hold shards.
    let ledger_dir = c.data_dir().join("ledger");
    let tiles = ledger_dir.join("tiles");
    let openings = ledger_dir.join("openings");
    let (tiles_aside, openings_aside) = (
        ledger_dir.join("tiles.aside"),
        ledger_dir.join("openings.aside"),
    );
    std::fs::rename(&tiles, &tiles_aside)?;
    let out = recover(&c, &[])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no published checkpoint"), "{err}");
    // A log that never published a checkpoint (or lost its tiles) is
    // restored from its archive as it is when the operator says so.
    let report: Value = serde_json::from_str(&recovered(&c, &["--trust-archive", "--json"])?)?;
    assert_eq!(report["evidence"], filed.len() as u64, "{report}");
    assert_eq!(report["checkpoint_size"], 0, "{report}");
    std::fs::rename(&openings, &openings_aside)?;
    let out = recover(&c, &[])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("restored no evidence"), "{err}");
    std::fs::rename(&tiles_aside, &tiles)?;
    std::fs::rename(&openings_aside, &openings)?;

    // With a node down, recovery refuses unless told to proceed.
    c.kill_node(2);
    let out = recover(&c, &[])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node n2"), "{err}");
    c.start_node_and_wait(2)?;

    // A published checkpoint the archive does not reproduce (signed by the
    // log's key over another root) is refused, and leaves the index as it
    // was: recovery runs again once the checkpoint is put right.
    let published = tiles.join("checkpoint");
    let good = std::fs::read(&published)?;
    let skey = std::fs::read_to_string(c.data_dir().join("ledger/log.key"))?;
    let forged = ledger::sign_checkpoint(
        skey.trim(),
        "custodia.local/ledger",
        before.size,
        TreeHash([0xee; 32]),
    )?;
    std::fs::write(&published, forged)?;
    let out = recover(&c, &[])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("do not reproduce the signed checkpoint's root")
            && err.contains("nothing was restored"),
        "{err}"
    );
    std::fs::write(&published, good)?;

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
    // The deleted shard; the flipped one was read from its other copy.
    assert_eq!(report["stripes_degraded"], 1, "{report}");
    let kept: Vec<_> = std::fs::read_dir(c.data_dir())?
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("index.redb.replaced-")
        })
        .collect();
    // The destroyed index and the one restored with --trust-archive.
    assert_eq!(kept.len(), 2, "the replaced indexes are kept aside");

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

/// A filing: its id and its bytes.
type Filed = (String, Vec<u8>);

/// Files three pieces of evidence or more (contents from `seed`), waits for a
/// published checkpoint over them, destroys the index, kills nodes 1-3
/// (more than m) and runs `recover-index --allow-down-nodes`, which must
/// say what it could not read back and fail. Returns the filings (id,
/// bytes) and what the command said.
fn recovered_with_three_nodes_down(c: &mut TestCluster, seed: u64) -> Result<(Vec<Filed>, String)> {
    let key = c.log_key()?;
    let mut filed = Vec::new();
    for i in 0..3u64 {
        let data = bytes(60_000 + i as usize * 7_000, seed + i);
        let r = c.file(&data)?;
        filed.push((r["id"].as_str().context("id")?.to_owned(), data));
    }
    // Some stripe must have shards on all three nodes about to die (more
    // than m), or everything reads back and recovery rightly succeeds:
    // placement is by hash, so about 1 run in 500 the three filings' 14
    // stripes all miss one of them. One more filing each time until one
    // does not.
    let on_all_three = |c: &TestCluster, id: &str| {
        let prefix = id.replace('-', "");
        let stripes = |n: u32| -> std::collections::HashSet<String> {
            c.shard_files(n)
                .iter()
                .filter_map(|p| {
                    let name = p.file_name()?.to_string_lossy().into_owned();
                    let rest = name.strip_prefix(&prefix)?.strip_prefix('-')?;
                    Some(rest.split('-').next()?.to_owned())
                })
                .collect()
        };
        let (a, b, d) = (stripes(1), stripes(2), stripes(3));
        a.iter().any(|s| b.contains(s) && d.contains(s))
    };
    for extra in 0..20u64 {
        if filed.iter().any(|(id, _)| on_all_three(c, id)) {
            break;
        }
        let data = bytes(60_000, seed + 100 + extra);
        let r = c.file(&data)?;
        filed.push((r["id"].as_str().context("id")?.to_owned(), data));
    }
    let published = custodia_tests::eventually(10, || {
        checkpoint(c, &key).is_ok_and(|cp| cp.size >= filed.len() as u64)
    });
    assert!(published, "the filings under a published checkpoint");
    c.kill_gateway();
    let index = c.data_dir().join("index.redb");
    let len = std::fs::metadata(&index)?.len() as usize;
    std::fs::write(&index, bytes(len, seed + 17))?;
    for n in [1, 2, 3] {
        c.kill_node(n);
    }
    let out = recover(c, &["--allow-down-nodes"])?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(err.contains("could not be read back"), "{err}");
    Ok((filed, err))
}

/// After [`recovered_with_three_nodes_down`]: node 1 returns whole, nodes 2
/// and 3 with new, empty disks, and the gateway starts.
fn back_with_two_disks_wiped(c: &mut TestCluster) -> Result<()> {
    for n in [2, 3] {
        let dir = c.node_dir(n);
        std::fs::remove_dir_all(&dir)?;
        std::fs::create_dir_all(&dir)?;
    }
    back_with_nodes_and_gateway(c)
}

/// Nodes 1 to 3 and the gateway started again, all healthy.
fn back_with_nodes_and_gateway(c: &mut TestCluster) -> Result<()> {
    for n in [1, 2, 3] {
        c.start_node_and_wait(n)?;
    }
    c.start_gateway()?;
    c.wait_healthy(8)
}

/// Whether every filing reads back byte-exact within `secs`; the last
/// error otherwise.
fn all_read_back(c: &TestCluster, filed: &[Filed], secs: u64) -> std::result::Result<(), String> {
    let mut last = String::new();
    let whole = custodia_tests::eventually(secs, || {
        filed.iter().all(|(id, data)| match c.read(id) {
            Ok(back) => &back == data,
            Err(e) => {
                last = e.to_string();
                false
            }
        })
    });
    if whole {
        Ok(())
    } else {
        Err(last)
    }
}

/// Recovery with more than m nodes down (`--allow-down-nodes`) cannot read
/// every piece of evidence back: stripes whose shards were on the down
/// nodes are indexed with those shards unplaced. Once the nodes return,
/// the orphan sweep adopts their copies (re-hashed by their node against
/// the record) instead of deleting them, and everything reads again.
#[test]
fn copies_on_nodes_down_during_recovery_are_adopted_when_they_return() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    c.set_gateway(&[
        ("repair_interval_ms", toml::Value::Integer(500)),
        ("orphan_sweep_interval_ms", toml::Value::Integer(1000)),
    ])?;
    let (filed, err) = recovered_with_three_nodes_down(&mut c, 80)?;
    assert!(err.contains("old index is kept"), "{err}");
    back_with_nodes_and_gateway(&mut c)?;
    if let Err(last) = all_read_back(&c, &filed, 60) {
        panic!("evidence unreadable after the nodes returned: {last}");
    }
    Ok(())
}

/// The same recovery; nodes 2 and 3 come back with empty disks, and node 1
/// whole but is drained as soon as it is back (the flaky one), before any
/// orphan sweep ran. Stripes that had shards on all three need node 1's
/// copies to reach k: they are still adopted (a draining node is listed for
/// them, never for orphans), everything reads again, and the drain then
/// moves them off. Node 1 cannot be removed before a sweep has looked for
/// its copies; once drained, it can.
#[test]
fn copies_on_a_node_drained_after_recovery_are_adopted_then_moved() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    c.set_gateway(&[
        ("repair_interval_ms", toml::Value::Integer(500)),
        ("repair_after_down_ms", toml::Value::Integer(1000)),
        // Well after the drain below, however slow the machine.
        ("orphan_sweep_interval_ms", toml::Value::Integer(15_000)),
    ])?;
    let (filed, _) = recovered_with_three_nodes_down(&mut c, 81)?;
    back_with_two_disks_wiped(&mut c)?;
    let drain = c.cli(&["node", "drain", "1"])?;
    assert!(
        drain.status.success(),
        "{}",
        String::from_utf8_lossy(&drain.stderr)
    );
    // Copies recovery could not place await adoption, and node 1 may hold
    // some (no record names it for them): removing it now would leave
    // them where no sweep ever looks, so it is refused. (Repair may also
    // have placed a rebuilt shard there meanwhile, which refuses it too.)
    let (status, detail) = send(&c, "GET", "/v1/admin/nodes/1", None)?;
    assert_eq!(status, 200, "{detail}");
    assert!(
        detail["stripes_awaiting_adoption"].as_u64() > Some(0),
        "{detail}"
    );
    let early = c.cli(&["node", "remove", "1"])?;
    let said = String::from_utf8_lossy(&early.stderr);
    assert!(!early.status.success(), "node 1 removed before the sweep");
    assert!(
        said.contains("orphan sweep") || said.contains("still place"),
        "{said}"
    );
    if let Err(last) = all_read_back(&c, &filed, 60) {
        panic!("evidence unreadable with node 1 draining: {last}");
    }
    // Every slot found a home: node 1's copies adopted (not left waiting
    // for a sweep that a draining node kept from ever completing), then
    // moved off it.
    let repaired = c.cli(&["repair", "--patience-secs", "60"])?;
    assert!(
        repaired.status.success(),
        "{}{}",
        String::from_utf8_lossy(&repaired.stdout),
        String::from_utf8_lossy(&repaired.stderr)
    );
    let done = c.cli(&["node", "drain", "1", "--wait", "--patience-secs", "60"])?;
    assert!(
        done.status.success(),
        "the drain did not finish: {}{}",
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr)
    );
    let removed = c.cli(&["node", "remove", "1"])?;
    assert!(
        removed.status.success(),
        "{}",
        String::from_utf8_lossy(&removed.stderr)
    );
    Ok(())
}

/// Operators' decisions about nodes outlive the index: a node drained and
/// removed (then gone) and one still draining come back as they were, and
/// recovery neither lists nor waits for the removed one (without the
/// decisions it would stop at a node that does not answer).
#[test]
fn node_decisions_survive_a_destroyed_index() -> Result<()> {
    let (mut c, key) = repairing_cluster()?;
    let mut filed = Vec::new();
    for i in 0..3u64 {
        let data = bytes(50_000 + i as usize * 9_000, 90 + i);
        filed.push((c.file_id(&data)?, data));
    }
    for args in [
        &["node", "drain", "7", "--wait", "--patience-secs", "60"][..],
        &["node", "remove", "7"],
        &["node", "drain", "6"],
    ] {
        let out = c.cli(args)?;
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    c.kill_node(7);
    let published = custodia_tests::eventually(10, || {
        checkpoint(&c, &key).is_ok_and(|cp| cp.size >= filed.len() as u64)
    });
    assert!(published, "the filings under a published checkpoint");
    c.kill_gateway();
    let index = c.data_dir().join("index.redb");
    let len = std::fs::metadata(&index)?.len() as usize;
    std::fs::write(&index, bytes(len, 99))?;

    let said = recovered(&c, &[])?;
    assert!(said.contains("draining: [6], removed: [7]"), "{said}");
    c.start_gateway()?;
    c.wait_healthy(7)?;
    for (node, state) in [(7, "removed"), (6, "draining"), (5, "active")] {
        let (status, body) = send(&c, "GET", &format!("/v1/admin/nodes/{node}"), None)?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["lifecycle"], state, "node {node}: {body}");
    }
    for (id, data) in &filed {
        assert_eq!(&c.read(id)?, data, "{id} after recovery");
    }
    Ok(())
}

/// A credential DATA_DIR's files hold, revoked through the admin API (with
/// another administrator's token, so no tool moved the files aside), is
/// not brought back by `recover-index`: the revocation is in the ledger's
/// openings archive, and recovery says what it left out.
#[test]
fn credentials_revoked_through_the_api_are_not_restored() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    let (status, second) = send(
        &c,
        "POST",
        "/v1/admin/keys",
        Some(serde_json::json!({ "tenant": "admin", "role": "admin" })),
    )?;
    assert_eq!(status, 201, "{second}");
    let creds = std::fs::read_to_string(c.data_dir().join("s3.credentials"))?;
    let access_key = custodia_tests::profile_field(&creds, "aws_access_key_id");
    let revoke = agent()
        .post(format!("{}/v1/admin/keys/revoke", c.api))
        .header(
            "authorization",
            format!("Bearer {}", second["token"].as_str().context("token")?),
        )
        .send_json(serde_json::json!({ "token": c.token, "access_key": access_key }))?;
    assert_eq!(revoke.status().as_u16(), 200);
    c.kill_gateway();
    let said = recovered_without_the_revoked_token(&mut c)?;
    assert!(said.contains("holds a revoked access key"), "{said}");
    Ok(())
}

/// Loses the index (gateway stopped) and recovers it: recovery must say it
/// left out the revoked token DATA_DIR holds, and the token gets 401 once
/// the gateway is back. Returns what recovery said.
fn recovered_without_the_revoked_token(c: &mut TestCluster) -> Result<String> {
    std::fs::remove_file(c.data_dir().join("index.redb"))?;
    let out = recover(c, &[])?;
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("holds a revoked token: not restored"),
        "{said}"
    );
    c.start_gateway()?;
    c.wait_healthy(8)?;
    let (status, body) = send(c, "GET", "/v1/admin/status", None)?;
    assert_eq!(status, 401, "the revoked token works again: {body}");
    Ok(said)
}

/// The same for a credential revoked offline (`custodia key revoke` with
/// the gateway stopped): a copy of its file restored from a backup does
/// not bring it back through `recover-index`.
#[test]
fn credentials_revoked_offline_are_not_restored() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    let token_file = c.data_dir().join("admin.token");
    let backup = std::fs::read(&token_file)?;
    c.stop_gateway();
    let out = c.custodia(&[
        "key",
        "revoke",
        "--token-file",
        &token_file.display().to_string(),
    ])?;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("token: revoked"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The index is lost; the token's file comes back from a backup.
    std::fs::write(&token_file, &backup)?;
    recovered_without_the_revoked_token(&mut c)?;
    Ok(())
}

/// A filing answered 201 while the ledger's archive could not be written
/// (its statement waits in the index) is not in the archive when the index
/// is lost: recovery finds its shards and no record of it. They are kept,
/// not collected as a failed upload's, until an operator releases them.
#[test]
fn shards_no_archived_filing_names_are_held_until_released() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    c.file(&bytes(5_000, 31))?;
    // The archive's leaves cannot be written: a file where their folder
    // should be.
    c.stop_gateway();
    let openings = c.data_dir().join("ledger").join("openings").join("0000000");
    let aside = c.data_dir().join("ledger").join("openings.aside");
    std::fs::rename(&openings, &aside)?;
    std::fs::write(&openings, b"not a folder")?;
    c.start_gateway()?;
    c.wait_healthy(8)?;
    let data = bytes(9_000, 32);
    let a = c.file_with(&c.token, &data, &[])?;
    assert_eq!(a.status, 201);
    let id = a.json()["id"].as_str().context("id")?.to_owned();
    let piece = &data[..32];
    // A second one, released first: the sweep's collecting it shows the
    // sweep ran while the first was held.
    let other = bytes(7_000, 33);
    let b = c.file_with(&c.token, &other, &[])?;
    assert_eq!(b.status, 201);
    let other_id = b.json()["id"].as_str().context("id")?.to_owned();
    c.kill_gateway();
    std::fs::remove_file(&openings)?;
    std::fs::rename(&aside, &openings)?;
    std::fs::remove_file(c.data_dir().join("index.redb"))?;
    let said = recovered(&c, &[])?;
    assert!(said.contains(&id), "the held evidence is not named: {said}");
    assert!(said.contains(&other_id), "{said}");
    let out = c.custodia(&["release-unclaimed", "--list"])?;
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains(&id) && listed.contains(&other_id),
        "{listed}"
    );
    // Nothing is released unless named (or --all).
    let out = c.custodia(&["release-unclaimed"])?;
    assert!(!out.status.success());
    let release = |c: &TestCluster, id: &str| -> Result<()> {
        let out = c.custodia(&["release-unclaimed", id])?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    release(&c, &other_id)?;
    // The orphan sweep, with no grace, collects the one released and
    // leaves the one held.
    c.set_gateway(&[
        ("orphan_sweep_interval_ms", toml::Value::Integer(300)),
        ("orphan_grace_ms", toml::Value::Integer(0)),
    ])?;
    let swept = custodia_tests::eventually(30, || c.node_files_holding(&other[..32]).is_empty());
    assert!(swept, "released shards were never collected");
    assert!(
        !c.node_files_holding(piece).is_empty(),
        "the shards of a filing the archive missed were collected"
    );
    // Released, they go too.
    c.stop_gateway();
    release(&c, &id)?;
    c.start_gateway()?;
    c.wait_healthy(8)?;
    let gone = custodia_tests::eventually(20, || c.node_files_holding(piece).is_empty());
    assert!(gone, "released shards were never collected");
    Ok(())
}

/// The same recovery, but two of the down nodes come back with empty
/// disks: their slots have no copy anywhere and no hash the index knows.
/// Nothing is declared lost while the third node's copies can still be
/// adopted; then repair rebuilds the two from k shards that matched their
/// own hashes, so every stripe is whole again and reads back byte-exact.
#[test]
fn shards_recovery_found_no_copy_of_are_rebuilt() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    c.set_gateway(&[
        ("repair_interval_ms", toml::Value::Integer(500)),
        ("repair_after_down_ms", toml::Value::Integer(1000)),
        ("orphan_sweep_interval_ms", toml::Value::Integer(1000)),
    ])?;
    let (filed, _) = recovered_with_three_nodes_down(&mut c, 90)?;
    back_with_two_disks_wiped(&mut c)?;
    let mut last = String::new();
    let healed = custodia_tests::eventually(90, || match c.cli(&["status", "--json"]) {
        Ok(out) => {
            let s: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            last = s["degraded_stripes"].to_string();
            s["degraded_stripes"] == 0
        }
        Err(_) => false,
    });
    if !healed {
        let log = std::fs::read_to_string(c.data_dir().join("gateway.log")).unwrap_or_default();
        let tail: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect();
        eprintln!("{}", tail[tail.len().saturating_sub(30)..].join("\n"));
    }
    assert!(healed, "stripes still degraded: {last}");
    for (id, data) in &filed {
        assert!(&c.read(id)? == data, "{id} reads back byte-exact");
    }
    let log = std::fs::read_to_string(c.data_dir().join("gateway.log"))?;
    assert!(!log.contains("stripe lost"), "nothing was lost");
    // Whole again: two more nodes may die.
    c.kill_node(4);
    c.kill_node(5);
    for (id, data) in &filed {
        assert!(&c.read(id)? == data, "{id} reads with two more nodes down");
    }
    Ok(())
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn status_of(headers: &str) -> &str {
    headers.split_whitespace().nth(1).unwrap_or_default()
}

/// The S3 view survives too: buckets with their Object Lock, every version
/// with its metadata and retention, delete markers; a COMPLIANCE-locked
/// version is as undeletable after recovery as before it.
#[test]
fn s3_buckets_versions_and_locks_survive_a_destroyed_index() -> Result<()> {
    if !custodia_tests::require(
        "s3_buckets_versions_and_locks_survive_a_destroyed_index",
        &[Tool::Curl],
    )? {
        return Ok(());
    }
    let mut c = TestCluster::start(Shape::default())?;
    // The journal's files are merged every two written (256 by default),
    // so what recovery replays below went through merges.
    c.set_gateway(&[("s3_journal_merge_files", toml::Value::Integer(2))])?;
    let s3 = c.s3.clone();
    let synced_after = |c: &TestCluster, t: f64| {
        custodia_tests::eventually(20, || {
            c.metric(&c.metrics, "custodia_s3_journal_synced_timestamp_seconds")
                .is_ok_and(|s| s > t)
        })
    };
    let (h, _) = c.s3_curl(
        "PUT",
        &format!("{s3}/locked"),
        &["-H", "x-amz-bucket-object-lock-enabled: true"],
    )?;
    assert_eq!(status_of(&h), "200", "{h}");
    let (h, _) = c.s3_curl("PUT", &format!("{s3}/scratch"), &[])?;
    assert_eq!(status_of(&h), "200", "{h}");
    // Archived apart from what follows: two files at least.
    assert!(synced_after(&c, unix_now()), "the buckets were archived");
    let put = |name: &str, data: &[u8], extra: &[&str]| -> Result<String> {
        let file = c.data_dir().join("s3-body");
        std::fs::write(&file, data)?;
        let body = format!("@{}", file.display());
        let mut args = vec!["--data-binary", body.as_str()];
        args.extend_from_slice(extra);
        let (h, body) = c.s3_curl("PUT", &format!("{s3}/locked/{name}"), &args)?;
        assert_eq!(
            status_of(&h),
            "200",
            "{h}{:?}",
            String::from_utf8_lossy(&body)
        );
        Ok(header(&h, "x-amz-version-id")
            .context("x-amz-version-id")?
            .to_owned())
    };
    let (old, new) = (bytes(20_000, 61), bytes(30_000, 62));
    let v1 = put(
        "case/exhibit.bin",
        &old,
        &[
            "-H",
            "x-amz-object-lock-mode: COMPLIANCE",
            "-H",
            "x-amz-object-lock-retain-until-date: 2099-01-01T00:00:00Z",
            "-H",
            "x-amz-meta-officer: kline",
        ],
    )?;
    let v2 = put("case/exhibit.bin", &new, &["-H", "content-type: video/mp4"])?;
    put("case/withdrawn.bin", &bytes(100, 63), &[])?;
    // Held through S3, the hold lifted through the evidence API (one hold
    // per evidence, whichever API): lifted it stays, recovered.
    put("case/released.bin", &bytes(300, 64), &[])?;
    let hold = c.data_dir().join("hold.xml");
    let document = r#"<LegalHold xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Status>ON</Status></LegalHold>"#;
    std::fs::write(&hold, document)?;
    // (With its digest, as S3 requires of a hold.)
    let md5 = {
        use base64::Engine as _;
        use md5::Digest as _;
        base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(document))
    };
    let (h, body) = c.s3_curl(
        "PUT",
        &format!("{s3}/locked/case/released.bin?legal-hold="),
        &[
            "--data-binary",
            &format!("@{}", hold.display()),
            "-H",
            &format!("content-md5: {md5}"),
        ],
    )?;
    assert_eq!(
        status_of(&h),
        "200",
        "{h}{}",
        String::from_utf8_lossy(&body)
    );
    let (h, _) = c.s3_curl("HEAD", &format!("{s3}/locked/case/released.bin"), &[])?;
    let released = header(&h, "x-custodia-evidence-id")
        .context("x-custodia-evidence-id")?
        .to_owned();
    let (status, body) = send(
        &c,
        "DELETE",
        &format!("/v1/evidence/{released}/legal-hold"),
        None,
    )?;
    assert_eq!(
        (status, body["legal_hold"].as_bool()),
        (200, Some(false)),
        "{body}"
    );
    let (h, _) = c.s3_curl("DELETE", &format!("{s3}/locked/case/withdrawn.bin"), &[])?;
    assert_eq!(status_of(&h), "204", "{h}");
    let (h, _) = c.s3_curl("DELETE", &format!("{s3}/scratch"), &[])?;
    assert_eq!(status_of(&h), "204", "{h}");
    let listing = |c: &TestCluster| -> Result<String> {
        let (h, body) = c.s3_curl("GET", &format!("{s3}/locked?versions="), &[])?;
        assert_eq!(status_of(&h), "200", "{h}");
        Ok(String::from_utf8(body)?)
    };
    let versions_before = listing(&c)?;

    // Everything above is archived once a drain that began after it ends.
    assert!(synced_after(&c, unix_now()), "the S3 journal was archived");
    let log = c.data_dir().join("gateway.log");
    assert!(
        custodia_tests::eventually(20, || std::fs::read_to_string(&log)
            .is_ok_and(|l| l.contains("S3 journal files merged"))),
        "the journal's files were merged"
    );
    // Merged every two written: once the last merge is over, at most the
    // merged file and one written since (temporary files aside).
    let journal = c.data_dir().join("ledger/openings/s3-journal");
    let files = || {
        std::fs::read_dir(&journal).map_or(usize::MAX, |d| {
            d.flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .count()
        })
    };
    assert!(
        custodia_tests::eventually(20, || files() <= 2),
        "{} journal files left after merging",
        files()
    );

    c.kill_gateway();
    let index = c.data_dir().join("index.redb");
    let len = std::fs::metadata(&index)?.len() as usize;
    std::fs::write(&index, bytes(len, 98))?;
    let out = recover(&c, &["--json"])?;
    println!(
        "custodia recover-index:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "recover-index failed");
    let report: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["s3_buckets"], 1, "{report}");
    // Two versions, the withdrawn one and its delete marker, the released one.
    assert_eq!(report["s3_versions"], 5, "{report}");
    assert_eq!(report["s3_versions_dropped"], serde_json::json!([]));
    c.start_gateway()?;
    c.wait_healthy(8)?;

    // The same listing, byte for byte; every version reads back.
    assert_eq!(listing(&c)?, versions_before);
    let (status, body) = send(
        &c,
        "GET",
        &format!("/v1/evidence/{released}/manifest"),
        None,
    )?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["legal_hold"], false, "a lifted hold came back: {body}");
    let (h, body) = c.s3_curl("GET", &format!("{s3}/locked/case/exhibit.bin"), &[])?;
    assert_eq!(status_of(&h), "200", "{h}");
    assert_eq!(header(&h, "x-amz-version-id"), Some(v2.as_str()));
    assert_eq!(header(&h, "content-type"), Some("video/mp4"));
    assert!(body == new, "the current version's bytes");
    let url = format!("{s3}/locked/case/exhibit.bin?versionId={v1}");
    let (h, body) = c.s3_curl("GET", &url, &[])?;
    assert_eq!(status_of(&h), "200", "{h}");
    assert_eq!(header(&h, "x-amz-meta-officer"), Some("kline"));
    assert_eq!(header(&h, "x-amz-object-lock-mode"), Some("compliance"));
    assert!(body == old, "the old version's bytes");
    // The delete marker still hides the withdrawn object; the deleted
    // bucket stays deleted; the lock still refuses.
    let (h, _) = c.s3_curl("GET", &format!("{s3}/locked/case/withdrawn.bin"), &[])?;
    assert_eq!(status_of(&h), "404", "{h}");
    let (h, _) = c.s3_curl("HEAD", &format!("{s3}/scratch"), &[])?;
    assert_eq!(status_of(&h), "404", "{h}");
    let (h, body) = c.s3_curl("DELETE", &url, &[])?;
    assert_eq!(status_of(&h), "403", "{h}");
    assert!(String::from_utf8_lossy(&body).contains("AccessDenied"));
    let (h, body) = c.s3_curl("GET", &format!("{s3}/locked?object-lock="), &[])?;
    assert_eq!(status_of(&h), "200", "{h}");
    assert!(
        String::from_utf8_lossy(&body).contains("Enabled"),
        "object lock survives"
    );

    // Changes after the recovery are journaled after the old ones: a second
    // loss brings back the state after them.
    let (h, _) = c.s3_curl(
        "DELETE",
        &format!("{s3}/locked/case/exhibit.bin?versionId={v2}"),
        &[],
    )?;
    assert_eq!(status_of(&h), "204", "{h}");
    assert!(synced_after(&c, unix_now()));
    c.kill_gateway();
    std::fs::remove_file(&index)?;
    recovered(&c, &["--json"])?;
    c.start_gateway()?;
    c.wait_healthy(8)?;
    let (h, body) = c.s3_curl("GET", &format!("{s3}/locked/case/exhibit.bin"), &[])?;
    assert_eq!(status_of(&h), "200", "{h}");
    assert_eq!(header(&h, "x-amz-version-id"), Some(v1.as_str()));
    assert!(body == old, "the removed version stays removed");
    Ok(())
}

/// A log whose tiles are lost is published again from its openings archive
/// alone (`recover-index --trust-archive`), a piece of a few thousand
/// leaves at a time rather than all at once: its tiles come back, its
/// checkpoint is signed again at its whole size, and receipts from
/// either end of the log verify against it.
#[test]
fn a_log_restored_from_its_archive_alone_is_published_again_in_pieces() -> Result<()> {
    let (mut c, key) = repairing_cluster()?;
    let data = bytes(5_000, 91);
    let first = c.file(&data)?["id"].as_str().context("id")?.to_owned();
    // Past one piece (16 tiles, 4,096 leaves).
    for round in 0..5u32 {
        notarize(&c, round * 1_000..(round + 1) * 1_000)?;
    }
    let data = bytes(6_000, 92);
    let last = c.file(&data)?["id"].as_str().context("id")?.to_owned();
    let whole = 5_002;
    let settled =
        custodia_tests::eventually(30, || checkpoint(&c, &key).is_ok_and(|cp| cp.size >= whole));
    assert!(settled, "never published {whole} leaves");
    let before = checkpoint(&c, &key)?;
    c.kill_gateway();
    let tiles = c.data_dir().join("ledger/tiles");
    std::fs::remove_dir_all(&tiles)?;
    recovered(&c, &["--trust-archive"])?;
    c.start_gateway()?;
    c.wait_healthy(8)?;
    let published = tiles.join("checkpoint");
    let republished = custodia_tests::eventually(60, || {
        std::fs::read_to_string(&published)
            .ok()
            .and_then(|note| ledger::verify_checkpoint(&note, &key).ok())
            .is_some_and(|cp| cp.size >= before.size)
    });
    assert!(republished, "the checkpoint was not published again");
    let cp = ledger::verify_checkpoint(&std::fs::read_to_string(&published)?, &key)?;
    if cp.size == before.size {
        assert_eq!(cp.root, before.root, "the same tree");
    }
    // Tiles of both pieces, and the first piece's own run in the openings
    // archive (written, as every publication's, before its tiles).
    for tile in ["tile/0/000", "tile/0/016", "tile/entries/016"] {
        assert!(tiles.join(tile).exists(), "{tile} not published");
    }
    let piece = c
        .data_dir()
        .join("ledger/openings")
        .join(indexer::ledger::archive_name(0, 4_096));
    assert!(piece.exists(), "no run for the first piece");
    for id in [&first, &last] {
        let a = c.get_with(&c.token, &format!("/v1/evidence/{id}/receipt"), &[])?;
        assert_eq!(a.status, 200, "receipt of {id}");
        let r: Receipt = serde_json::from_slice(&a.body)?;
        assert_eq!(r.verify(&key)?.statement.evidence.to_string(), *id);
    }
    Ok(())
}

/// An expunge still waiting on a node that was down when the index was
/// lost is finished after `recover-index`: the listing that rebuilt the
/// index could not see that node's copies, yet once it is back it erases
/// them (the erasure is taken up again for every expunge recovered).
#[test]
fn an_expunge_unfinished_when_the_index_was_lost_is_finished_after_recovery() -> Result<()> {
    let mut c = TestCluster::start(Shape {
        nodes: 5,
        k: 2,
        m: 1,
        ..Shape::default()
    })?;
    c.set_gateway(&[("gc_interval_ms", toml::Value::Integer(500))])?;
    let key = c.log_key()?;
    c.stop_gateway();
    let expunger = c.mint_expunger()?;
    c.start_gateway()?;
    c.wait_healthy(5)?;
    let data = bytes(30_000, 71);
    let id = c.file_id(&data)?;
    let piece = &data[100..132];
    let holder = c
        .node_holding(piece)
        .context("no node holds the first shard")?;
    c.kill_node(holder);
    let order = serde_json::json!({ "order": "Order 2026-92 of the District Court" });
    let a = agent()
        .post(format!("{}/v1/evidence/{id}/expunge", c.api))
        .header("authorization", &format!("Bearer {expunger}"))
        .send_json(order)?;
    ensure!(a.status() == 200, "expunge: {}", a.status());
    let published =
        custodia_tests::eventually(10, || checkpoint(&c, &key).is_ok_and(|cp| cp.size >= 2));
    assert!(published, "the filing and its expunge under a checkpoint");
    assert_eq!(
        c.node_files_holding(piece).len(),
        1,
        "only the node down holds it"
    );

    c.kill_gateway();
    let index = c.data_dir().join("index.redb");
    let len = std::fs::metadata(&index)?.len() as usize;
    std::fs::write(&index, bytes(len, 72))?;
    let said = recovered(&c, &["--allow-down-nodes"])?;
    assert!(said.contains("1 expunged"), "{said}");
    c.start_gateway()?;
    c.wait_healthy(4)?;
    c.start_node_and_wait(holder)?;
    assert!(
        custodia_tests::eventually(60, || c.node_files_holding(piece).is_empty()),
        "expunged bytes left after recovery in {:?}",
        c.node_files_holding(piece)
    );
    let a = c.get_with(&c.token, &format!("/v1/evidence/{id}"), &[])?;
    assert_eq!(a.status, 410, "still expunged after recovery");
    Ok(())
}
