//! The notarization ledger end to end: receipts that verify offline with only
//! the log's public key, the log published as C2SP tiles, and checkpoints that
//! stay consistent across a gateway killed and restarted.

use anyhow::{bail, ensure, Context, Result};
use base64::Engine as _;
use custodia_tests::{bytes, custodia_bin, start_witness, Shape, TestCluster, Tool};
use protocol::ledger::{self, Receipt, TreeHash};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn receipt_of(filed: &Value) -> Result<Receipt> {
    let r = filed
        .get("receipt")
        .filter(|r| !r.is_null())
        .context("the filing response carries no receipt")?;
    Ok(serde_json::from_value(r.clone())?)
}

/// `custodia verify ARGS`'s exit status (0 verifies, 1 does not, 2 nothing
/// was verified: the command's mistake) and what it printed.
fn verify_with(args: &[&std::ffi::OsStr]) -> Result<(Option<i32>, String)> {
    let out = Command::new(custodia_bin())
        .arg("verify")
        .args(args)
        .output()?;
    Ok((
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// [`verify_with`] a receipt, its log key and maybe the file.
fn custodia_verify(
    receipt: &Path,
    key: &Path,
    file: Option<&Path>,
) -> Result<(Option<i32>, String)> {
    let mut args = vec![
        "--receipt".as_ref(),
        receipt.as_os_str(),
        "--log-key".as_ref(),
        key.as_os_str(),
    ];
    if let Some(f) = file {
        args.extend(["--file".as_ref(), f.as_os_str()]);
    }
    verify_with(&args)
}

/// A witness that cosigned another tree of this log (here: its view says
/// so) refuses our consistency proof from its size: the gateway counts it
/// in `custodia_witness_inconsistent_total`, for the alert that the log may
/// have forked, rather than take it for a flaky witness.
#[test]
fn a_witness_holding_another_tree_is_reported_as_a_fork() -> Result<()> {
    fork_reported_by_a_witness_at(2)
}

/// A witness that cosigned a checkpoint larger than this log's newest (the
/// index was restored from an older backup, with its tiles and archive, so
/// that nothing else in the cluster disagrees): as much a fork, said at
/// once rather than when the log has grown past the witness again.
#[test]
fn a_witness_ahead_of_the_log_is_reported_as_a_fork() -> Result<()> {
    fork_reported_by_a_witness_at(1_000)
}

/// A cluster with a few filings and a witness whose view says it cosigned
/// a tree of `size` of this log, not the cluster's, reports a fork.
fn fork_reported_by_a_witness_at(size: u64) -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    for i in 0..4u64 {
        assert_eq!(c.file_with(&c.token, &bytes(500, i), &[])?.status, 201);
    }
    let log_pub = c.data_dir().join("ledger.vkey");
    let origin = std::fs::read_to_string(&log_pub)?
        .split('+')
        .next()
        .unwrap_or_default()
        .to_owned();
    let wdir = tempfile::tempdir()?;
    let other_root = B64.encode([7u8; 32]);
    std::fs::write(
        wdir.path().join("witness-state.json"),
        serde_json::to_vec(&serde_json::json!({
            "logs": { origin: { "size": size, "root": other_root } },
            "cosigned_at": 0,
        }))?,
    )?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let witness = start_witness(wdir.path(), port, &log_pub)?;
    let wkey = std::fs::read_to_string(wdir.path().join("witness.pub"))?
        .trim()
        .to_string();
    c.use_witnesses(&[(&witness.url, &wkey)], 200)?;
    let series = format!(
        "custodia_witness_inconsistent_total{{witness=\"{}\"}}",
        witness.url
    );
    let said =
        custodia_tests::eventually(15, || c.metric(&c.metrics, &series).is_ok_and(|n| n >= 1.0));
    assert!(
        said,
        "no fork reported: {:?}",
        c.metric(&c.metrics, &series)
    );
    Ok(())
}

/// The private openings archive (every statement's salt, and so the
/// sealed case names and submitters) is its owner's only: its folder is
/// made so at each start even if an operator opened it up (what is in it
/// is then out of others' reach, whatever its files' own modes).
#[test]
fn the_openings_archive_is_readable_by_its_owner_only() -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut c = TestCluster::start(Shape::default())?;
    c.file(&bytes(1_000, 3))?;
    let openings = c.data_dir().join("ledger").join("openings");
    let mode = |p: &Path| -> Result<u32> { Ok(std::fs::metadata(p)?.permissions().mode() & 0o777) };
    ensure!(
        mode(&openings)? == 0o700,
        "openings folder {:o}",
        mode(&openings)?
    );
    // Made so, not tightened after the fact: a fresh cluster's log has no
    // warning about it.
    let log_file = c.data_dir().join("gateway.log");
    let log = || std::fs::read_to_string(&log_file);
    let warning = "the private openings archive was readable by others";
    ensure!(!log()?.contains(warning), "{}", log()?);
    c.stop_gateway();
    std::fs::set_permissions(&openings, std::fs::Permissions::from_mode(0o755))?;
    c.start_gateway()?;
    c.wait_healthy(8)?;
    ensure!(
        mode(&openings)? == 0o700,
        "a folder opened up stayed so: {:o}",
        mode(&openings)?
    );
    ensure!(
        log()?.contains(warning),
        "an opened folder tightened silently"
    );
    Ok(())
}

/// Every checkpoint extends the empty log's, which a monitor of a new log
/// may hold first: `verify --consistency` says so once both verify, and
/// refuses an empty checkpoint signed by another key, or one of size 0
/// whose root is not the empty tree's.
#[test]
fn every_checkpoint_extends_the_empty_logs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let origin = "courts.example/log";
    let (skey, vkey) = ledger::note_keys(origin, &[5; 32]);
    let (other_skey, _) = ledger::note_keys(origin, &[6; 32]);
    let root =
        |b: u8| TreeHash::parse_hash(&B64.encode([b; 32])).map_err(|e| anyhow::anyhow!("{e:?}"));
    let write = |name: &str, text: String| -> Result<std::path::PathBuf> {
        let path = dir.path().join(name);
        std::fs::write(&path, text)?;
        Ok(path)
    };
    let empty_root = ledger::empty_root();
    let empty = write(
        "empty.note",
        ledger::sign_checkpoint(&skey, origin, 0, empty_root)?,
    )?;
    let forged = write(
        "forged.note",
        ledger::sign_checkpoint(&other_skey, origin, 0, empty_root)?,
    )?;
    let not_empty = write(
        "not-empty.note",
        ledger::sign_checkpoint(&skey, origin, 0, root(0)?)?,
    )?;
    let later = write(
        "later.note",
        ledger::sign_checkpoint(&skey, origin, 3, root(1)?)?,
    )?;
    let key = write("log.vkey", vkey)?;
    let proof = write("proof.json", r#"{"proof":[]}"#.to_owned())?;
    let run = |old: &Path| {
        verify_with(&[
            "--consistency".as_ref(),
            old.as_os_str(),
            later.as_os_str(),
            "--proof".as_ref(),
            proof.as_os_str(),
            "--log-key".as_ref(),
            key.as_os_str(),
        ])
    };
    let (code, out) = run(&empty)?;
    assert!(
        code == Some(0) && out.contains("verdict: CONSISTENT"),
        "{out}"
    );
    // A proof file that is no proof is the command's mistake (2), not a
    // verdict on the log (1).
    let junk = write("junk.json", "not a proof".to_owned())?;
    let (code, out) = verify_with(&[
        "--consistency".as_ref(),
        later.as_os_str(),
        later.as_os_str(),
        "--proof".as_ref(),
        junk.as_os_str(),
        "--log-key".as_ref(),
        key.as_os_str(),
    ])?;
    assert!(code == Some(2) && out.contains("is not JSON"), "{out}");
    let (code, out) = run(&forged)?;
    assert!(code == Some(1) && out.contains("does not verify"), "{out}");
    let (code, out) = run(&not_empty)?;
    assert!(
        code == Some(1) && out.contains("verdict: INCONSISTENT"),
        "{out}"
    );
    // Nor is the second one if it is of size 0 with another root.
    std::fs::copy(&not_empty, &later)?;
    let (code, out) = run(&empty)?;
    assert!(
        code == Some(1) && out.contains("verdict: INCONSISTENT"),
        "{out}"
    );
    Ok(())
}

/// Public, unauthenticated GET of the published log.
fn published(c: &TestCluster, path: &str) -> Result<Vec<u8>> {
    let a = c.get_with("", &format!("/ledger/{path}"), &[])?;
    if a.status != 200 {
        bail!("GET /ledger/{path} answered {}", a.status);
    }
    Ok(a.body)
}

#[test]
fn a_filing_gets_a_receipt_a_court_can_verify_offline() -> Result<()> {
    let c = TestCluster::start(Shape::default())?;
    // Filed second, so its receipt carries an inclusion proof to tamper with.
    assert_eq!(c.file_with(&c.token, b"first", &[])?.status, 201);
    let data = bytes(50_000, 1);
    let a = c.file_with(
        &c.token,
        &data,
        &[
            ("x-custodia-case", "2026-CR-0042"),
            ("x-custodia-source-device", "bodycam-17"),
        ],
    )?;
    assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
    let filed = a.json();
    let receipt = receipt_of(&filed)?;
    let ok = receipt.verify(&c.log_key()?)?;
    assert_eq!(ok.statement.kind, ledger::Kind::Filed);
    assert_eq!(Some(ok.statement.evidence.as_str()), filed["id"].as_str());
    assert_eq!(Some(ok.statement.blake3.as_str()), filed["blake3"].as_str());
    assert_eq!(ok.statement.case.as_deref(), Some("2026-CR-0042"));
    assert_eq!(
        ok.statement.provenance.source_device.as_deref(),
        Some("bodycam-17")
    );
    assert_eq!(ok.statement.time_source, ledger::OPERATOR_CLOCK);
    assert!(receipt.tlog_proof.starts_with("c2sp.org/tlog-proof@v1\n"));

    // The CLI, with nothing but the receipt, the public key and the file.
    let dir = tempfile::tempdir()?;
    let (rpath, fpath, other) = (
        dir.path().join("receipt.json"),
        dir.path().join("evidence.bin"),
        dir.path().join("other.bin"),
    );
    std::fs::write(&rpath, serde_json::to_vec(&filed)?)?;
    std::fs::write(&fpath, &data)?;
    let key = c.data_dir().join("ledger.vkey");
    let (code, out) = custodia_verify(&rpath, &key, Some(&fpath))?;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("signature verified")
            && out.contains("matches the statement")
            && out.contains("verdict: VALID"),
        "{out}"
    );
    // The filing response's metadata beside the receipt is what was
    // notarized; shown otherwise (a file name put in afterwards), it fails.
    assert!(
        out.contains("metadata: the case, file name, media type and submitter beside the receipt are the ones the filing notarized"),
        "{out}"
    );
    let mut renamed = filed.clone();
    renamed["file_name"] = "forged-name.mp4".into();
    let renamed_path = dir.path().join("renamed.json");
    std::fs::write(&renamed_path, serde_json::to_vec(&renamed)?)?;
    let (code, out) = custodia_verify(&renamed_path, &key, None)?;
    assert!(
        code == Some(1) && out.contains("are NOT the ones the filing notarized"),
        "{out}"
    );
    // Nor does taking a field away pass the change by, or another size.
    let mut stripped = renamed.clone();
    stripped
        .as_object_mut()
        .context("an object")?
        .remove("media_type");
    stripped["size"] = (data.len() + 1).into();
    std::fs::write(&renamed_path, serde_json::to_vec(&stripped)?)?;
    let (code, out) = custodia_verify(&renamed_path, &key, None)?;
    assert!(
        code == Some(1)
            && out.contains("lacks media_type")
            && out.contains(&format!("shows size {}", data.len() + 1)),
        "{out}"
    );

    let mut altered = data.clone();
    altered[123] ^= 1;
    std::fs::write(&other, &altered)?;
    let (code, out) = custodia_verify(&rpath, &key, Some(&other))?;
    assert!(code == Some(1) && out.contains("NOT the evidence"), "{out}");
    assert!(
        out.contains("the receipt itself verifies, but the file given is not the evidence"),
        "{out}"
    );
    // Each difference is named, and only those.
    assert!(
        out.contains("its BLAKE3 is")
            && out.contains("its SHA-256 is")
            && !out.contains("its size"),
        "{out}"
    );
    std::fs::write(&other, &data[..data.len() - 1])?;
    let (code, out) = custodia_verify(&rpath, &key, Some(&other))?;
    assert!(code == Some(1) && out.contains("its size is"), "{out}");

    let wrong_key = dir.path().join("wrong.pub");
    let (_, vkey) = ledger::note_keys("custodia.local/ledger", &[9; 32]);
    std::fs::write(&wrong_key, vkey)?;
    let (code, out) = custodia_verify(&rpath, &wrong_key, None)?;
    assert!(
        code == Some(1) && out.contains("INVALID: not logged"),
        "{out}"
    );
    // A mistyped key path is the command's mistake, not a verdict on the
    // receipt: no INVALID a court could read as a forgery.
    // It exits 2, so a script tells it from a receipt that fails (1).
    let (code, out) = custodia_verify(&rpath, &dir.path().join("no-such.vkey"), None)?;
    assert!(
        code == Some(2) && out.contains("nothing was verified"),
        "{out}"
    );
    assert!(!out.contains("INVALID"), "{out}");
    let (code, out) = custodia_verify(&rpath, &key, Some(&dir.path().join("no-such.bin")))?;
    assert!(
        code == Some(2) && out.contains("nothing was verified"),
        "{out}"
    );
    // Arguments swapped: the evidence given as the receipt.
    let (code, out) = custodia_verify(&fpath, &key, Some(&rpath))?;
    assert!(code == Some(2) && out.contains("not a receipt"), "{out}");
    let (code, out) = custodia_verify(&dir.path().join("no-such.json"), &key, None)?;
    assert!(
        code == Some(2) && out.contains("nothing was verified"),
        "{out}"
    );
    // With --json, JSON on stdout whatever the exit: here that nothing was
    // verified, and why.
    let out = Command::new(custodia_bin())
        .args(["verify", "--json", "--receipt"])
        .arg(&rpath)
        .arg("--log-key")
        .arg(dir.path().join("no-such.vkey"))
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    let said: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        (&said["valid"], &said["verified"]),
        (&Value::Bool(false), &Value::Bool(false))
    );
    assert!(
        said["error"]
            .as_str()
            .is_some_and(|e| e.contains("no-such.vkey")),
        "{said}"
    );

    // One character of the proof, of the salt or of the signature.
    let original: Value = serde_json::from_slice(&std::fs::read(&rpath)?)?;
    let flip = |s: &str, at: usize| -> String {
        let mut b = s.as_bytes().to_vec();
        b[at] = if b[at] == b'A' { b'B' } else { b'A' };
        String::from_utf8(b).unwrap_or_default()
    };
    let proof0 = original["receipt"]["inclusion_proof"][0]
        .as_str()
        .map(str::to_owned);
    let salt = original["receipt"]["salt"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let note = original["receipt"]["checkpoint"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let sig_at = note.rfind(' ').unwrap_or(0) + 5;
    let mut tampered = Vec::new();
    let p = proof0.context("a second leaf's receipt carries an inclusion proof")?;
    let mut t = original.clone();
    t["receipt"]["inclusion_proof"][0] = Value::String(flip(&p, 3));
    tampered.push(("proof", t));
    let mut t = original.clone();
    let hex_flipped = format!(
        "{}{}",
        if salt.starts_with('0') { '1' } else { '0' },
        &salt[1..]
    );
    t["receipt"]["salt"] = Value::String(hex_flipped);
    tampered.push(("salt", t));
    let mut t = original.clone();
    t["receipt"]["checkpoint"] = Value::String(flip(&note, sig_at));
    tampered.push(("signature", t));
    for (what, t) in tampered {
        std::fs::write(&rpath, serde_json::to_vec(&t)?)?;
        let (code, out) = custodia_verify(&rpath, &key, Some(&fpath))?;
        assert!(
            code == Some(1) && out.contains("verdict: INVALID"),
            "{what}: {out}"
        );
    }
    std::fs::write(&rpath, serde_json::to_vec(&original)?)?;

    let mut forged: Value = serde_json::from_slice(&std::fs::read(&rpath)?)?;
    let stmt = B64.decode(forged["receipt"]["statement"].as_str().unwrap_or_default())?;
    let stmt = String::from_utf8(stmt)?.replace("2026-CR-0042", "2026-CR-0043");
    forged["receipt"]["statement"] = Value::String(B64.encode(stmt));
    std::fs::write(&rpath, serde_json::to_vec(&forged)?)?;
    let (code, out) = custodia_verify(&rpath, &key, None)?;
    assert_eq!(code, Some(1), "a forged statement must not verify: {out}");

    // Receipts are per tenant like the evidence, and a stranger gets 401.
    let id = filed["id"].as_str().unwrap_or_default();
    let again = c.get_with(&c.token, &format!("/v1/evidence/{id}/receipt"), &[])?;
    assert_eq!(again.status, 200);
    let again: Receipt = serde_json::from_slice(&again.body)?;
    assert_eq!(again.leaf_index, receipt.leaf_index);
    again.verify(&c.log_key()?)?;
    let stranger = c.get_with("nope", &format!("/v1/evidence/{id}/receipt"), &[])?;
    assert_eq!(stranger.status, 401);
    Ok(())
}

#[test]
fn the_log_is_published_as_c2sp_tiles_and_stays_consistent_across_a_crash() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    let key = c.log_key()?;
    let mut receipts = Vec::new();
    for i in 0..5u64 {
        let filed = c.file_with(
            &c.token,
            &bytes(1000 + i as usize, i),
            &[("x-custodia-case", "SEALED-CASE-77")],
        )?;
        assert_eq!(filed.status, 201);
        receipts.push(receipt_of(&filed.json())?);
    }
    let indexes: Vec<u64> = receipts.iter().map(|r| r.leaf_index).collect();
    assert_eq!(
        indexes,
        vec![0, 1, 2, 3, 4],
        "dense leaf indices in filing order"
    );

    // The published checkpoint is signed by the log key; anyone can read it.
    let note = String::from_utf8(published(&c, "checkpoint")?)?;
    let old = ledger::verify_checkpoint(&note, &key)?;
    assert_eq!(old.size, 5);
    let note_at_5 = note.clone();
    // The level-0 tile holds the leaf hashes; the entry bundle the commitments.
    let tile = published(&c, "tile/0/000.p/5")?;
    let entries = published(&c, "tile/entries/000.p/5")?;
    let entries = ledger::parse_entry_bundle(&entries)?;
    assert_eq!(tile.len(), 5 * 32);
    assert_eq!(entries.len(), 5);
    for (i, r) in receipts.iter().enumerate() {
        let salt: [u8; 32] = hex::decode(&r.salt)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("salt"))?;
        let commitment = ledger::commitment(&salt, &B64.decode(&r.statement)?);
        assert_eq!(
            entries[i],
            &commitment[..],
            "entry {i} is the salted commitment"
        );
        assert_eq!(
            &tile[i * 32..(i + 1) * 32],
            &ledger::leaf_hash(&commitment).0[..]
        );
    }
    // Nothing public names the sealed case.
    let mut public = Vec::new();
    for p in ["checkpoint", "tile/0/000.p/5", "tile/entries/000.p/5"] {
        public.extend(published(&c, p)?);
    }
    assert!(!String::from_utf8_lossy(&public).contains("SEALED-CASE-77"));
    let stored = walk(&c.data_dir().join("ledger/tiles"));
    assert!(stored
        .iter()
        .all(|b| !String::from_utf8_lossy(b).contains("SEALED-CASE-77")));

    // Kill the gateway without warning, bring it back, file more.
    c.kill_gateway();
    let index = c.data_dir().join("index.redb");
    let backup = c.data_dir().join("index.redb.at-5");
    std::fs::copy(&index, &backup)?;
    c.start_gateway()?;
    c.wait_healthy(8)?;
    for i in 5..8u64 {
        let filed = c.file_with(&c.token, &bytes(1000 + i as usize, i), &[])?;
        assert_eq!(filed.status, 201);
        assert_eq!(receipt_of(&filed.json())?.leaf_index, i);
    }
    let note = String::from_utf8(published(&c, "checkpoint")?)?;
    let new = ledger::verify_checkpoint(&note, &key)?;
    assert_eq!(new.size, 8);
    // The new checkpoint extends the old one; anyone may ask for the proof
    // (an auditor need not be a tenant).
    let a = c.get_with(
        "",
        &format!("/v1/ledger/consistency?old={}&new={}", old.size, new.size),
        &[],
    )?;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let proof: Vec<TreeHash> = a.json()["proof"]
        .as_array()
        .context("proof")?
        .iter()
        .map(|h| {
            TreeHash::parse_hash(h.as_str().unwrap_or_default())
                .map_err(|e| anyhow::anyhow!("{e:?}"))
        })
        .collect::<Result<_>>()?;
    ledger::check_consistency(&old, &new, &proof)?;
    // `custodia verify --consistency` says so too (0); a proof that does not
    // hold is a verdict (1); the checkpoints in the wrong order are the
    // command's mistake (2).
    let dir = tempfile::tempdir()?;
    let (old_path, new_path, proof_path) = (
        dir.path().join("old.note"),
        dir.path().join("new.note"),
        dir.path().join("proof.json"),
    );
    std::fs::write(&old_path, &note_at_5)?;
    std::fs::write(&new_path, &note)?;
    std::fs::write(&proof_path, &a.body)?;
    let vkey = c.data_dir().join("ledger.vkey");
    let consistency = |old: &Path, new: &Path| {
        verify_with(&[
            "--consistency".as_ref(),
            old.as_os_str(),
            new.as_os_str(),
            "--proof".as_ref(),
            proof_path.as_os_str(),
            "--log-key".as_ref(),
            vkey.as_os_str(),
        ])
    };
    let (code, out) = consistency(&old_path, &new_path)?;
    assert!(
        code == Some(0) && out.contains("verdict: CONSISTENT"),
        "{out}"
    );
    let (code, out) = consistency(&new_path, &old_path)?;
    assert!(
        code == Some(2) && out.contains("nothing was verified"),
        "{out}"
    );

    let mut wrong: Value = serde_json::from_slice(&a.body)?;
    wrong["proof"][0] = Value::String(B64.encode([7u8; 32]));
    std::fs::write(&proof_path, serde_json::to_vec(&wrong)?)?;
    let (code, out) = consistency(&old_path, &new_path)?;
    assert!(
        code == Some(1) && out.contains("verdict: INCONSISTENT"),
        "{out}"
    );
    // A proof for other sizes (the log grew between the two fetches) is
    // the command's mistake, never a fork: named by the sizes it says it
    // is for, or, saved without them, by its length.
    assert_eq!(a.json()["new"], new.size);
    let other = c.get_with(
        "",
        &format!("/v1/ledger/consistency?old={}&new=6", old.size),
        &[],
    )?;
    assert_eq!(other.status, 200);
    std::fs::write(&proof_path, &other.body)?;
    let (code, out) = consistency(&old_path, &new_path)?;
    assert!(
        code == Some(2) && out.contains("a proof for new=6") && !out.contains("INCONSISTENT"),
        "{out}"
    );
    let mut bare: Value = serde_json::from_slice(&other.body)?;
    bare.as_object_mut()
        .context("object")?
        .retain(|k, _| k == "proof");
    std::fs::write(&proof_path, serde_json::to_vec(&bare)?)?;
    let (code, out) = consistency(&old_path, &new_path)?;
    assert!(
        code == Some(2) && out.contains("it is for other sizes") && !out.contains("INCONSISTENT"),
        "{out}"
    );
    // Two checkpoints of one size need no proof (whatever the file holds).
    let (code, out) = consistency(&new_path, &new_path)?;
    assert!(
        code == Some(0) && out.contains("both checkpoints are of the same 8 entries"),
        "{out}"
    );
    // The old receipts still verify, and a fresh one is against the newer tree.
    for r in &receipts {
        r.verify(&key)?;
    }
    let first_id = receipts[0].verify(&key)?.statement.evidence;
    let fresh = c.get_with(&c.token, &format!("/v1/evidence/{first_id}/receipt"), &[])?;
    let fresh: Receipt = serde_json::from_slice(&fresh.body)?;
    assert_eq!(fresh.verify(&key)?.checkpoint.size, 8);
    // Sizes beyond the newest checkpoint are refused with a JSON error.
    let a = c.get_with(&c.token, "/v1/ledger/consistency?old=1&new=99", &[])?;
    assert_eq!(a.status, 400);
    assert!(a.json()["error"].is_string());
    // So is a proof from the empty tree, which RFC 9162 does not define.
    let a = c.get_with(&c.token, "/v1/ledger/consistency?old=0&new=8", &[])?;
    assert_eq!(
        (a.status, a.json()["error"].as_str()),
        (400, Some("bad_request"))
    );

    // The index restored from its backup at size 5, behind the published
    // log: integrating would put new leaves at published indexes 5..8 and
    // sign a second tree of size 8, and the orphan sweep would take the
    // shards filed since for orphans. The gateway refuses to start, says
    // why and what to do; nothing published changes.
    let sorted = |mut files: Vec<Vec<u8>>| {
        files.sort();
        files
    };
    let tiles = sorted(walk(&c.data_dir().join("ledger/tiles")));
    c.stop_gateway();
    std::fs::copy(&backup, &index)?;
    // A gateway that starts regardless is killed after 30 s, failing here.
    let out = custodia_tests::output_within(
        std::process::Command::new(custodia_tests::custodia_bin())
            .args(["gateway", "--data-dir"])
            .arg(c.data_dir()),
        std::time::Duration::from_secs(30),
    )?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the gateway refuses an index behind the published log: {said}"
    );
    assert!(said.contains("recover-index"), "{said}");
    assert_eq!(
        std::fs::read(c.data_dir().join("ledger/tiles/checkpoint"))?,
        note.as_bytes()
    );
    assert!(
        sorted(walk(&c.data_dir().join("ledger/tiles"))) == tiles,
        "tiles unchanged"
    );
    Ok(())
}

fn walk(dir: &Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(b) = std::fs::read(&p) {
                out.push(b);
            }
        }
    }
    out
}

fn make_token(c: &TestCluster, tenant: &str, role: &str) -> Result<String> {
    // Tokens are issued for registered tenants only.
    ureq::post(format!("{}/v1/admin/tenants", c.api))
        .header("authorization", format!("Bearer {}", c.token))
        .send_json(serde_json::json!({ "name": tenant }))?;
    let mut resp = ureq::post(format!("{}/v1/admin/tokens", c.api))
        .header("authorization", format!("Bearer {}", c.token))
        .send_json(serde_json::json!({ "tenant": tenant, "role": role }))?;
    let v: Value = resp.body_mut().read_json()?;
    Ok(v["token"].as_str().unwrap_or_default().to_string())
}

fn post_json(c: &TestCluster, token: &str, path: &str, body: &Value) -> Result<(u16, Value)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent
        .post(format!("{}{path}", c.api))
        .header("authorization", format!("Bearer {token}"))
        .send_json(body)?;
    let status = resp.status().as_u16();
    Ok((status, resp.body_mut().read_json().unwrap_or(Value::Null)))
}

#[test]
fn every_read_is_a_custody_event_on_the_ledger_before_its_bytes() -> Result<()> {
    let c = TestCluster::start(Shape::default())?;
    let key = c.log_key()?;
    let reader = make_token(&c, "admin", "reader")?;
    let data = bytes(9000, 3);
    // The submitter is what the filer says; the actor is who it was.
    let clerk = make_token(&c, "admin", "clerk")?;
    let filed = c
        .file_with(&clerk, &data, &[("x-custodia-submitter", "acme/admin")])?
        .json();
    let id = filed["id"].as_str().unwrap_or_default().to_string();
    assert_eq!(filed["submitter"], "acme/admin", "{filed}");
    // A HEAD answers the GET's headers and reads nothing: no custody event.
    let a = c.head_with(&reader, &format!("/v1/evidence/{id}"))?;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("content-length"), Some("9000"));
    assert_eq!(a.header("x-custodia-blake3"), filed["blake3"].as_str());
    assert!(a.body.is_empty());
    assert_eq!(c.read(&id)?, data);
    let a = c.get_with(
        &reader,
        &format!("/v1/evidence/{id}"),
        &[("range", "bytes=10-19")],
    )?;
    assert_eq!(a.status, 206);

    // Both reads are on the ledger; they become provable within moments.
    let mut events = Vec::new();
    let complete = custodia_tests::eventually(10, || {
        let a = c.get_with(&c.token, &format!("/v1/evidence/{id}/custody"), &[]);
        events = a
            .ok()
            .and_then(|a| a.json()["events"].as_array().cloned())
            .unwrap_or_default();
        events.len() == 3 && events.iter().all(|e| !e["receipt"].is_null())
    });
    assert!(complete, "custody events: {events:?}");
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(kinds, ["filed", "accessed", "accessed"]);
    let mut actors = Vec::new();
    for e in &events {
        let r: Receipt = serde_json::from_value(e["receipt"].clone())?;
        let ok = r.verify(&key)?;
        assert_eq!(ok.statement.evidence, id);
        assert_eq!(Some(ok.statement.blake3.as_str()), filed["blake3"].as_str());
        actors.push(ok.statement.actor.unwrap_or_default());
    }
    // Each the token that acted, by its id (never the token itself): two
    // clerks of one tenant are told apart.
    let id_of = |t: &str| {
        format!(
            "token:{}",
            hex::encode(&blake3::hash(t.as_bytes()).as_bytes()[..8])
        )
    };
    assert_eq!(
        actors,
        [
            format!("admin/clerk/{}", id_of(&clerk)),
            format!("admin/admin/{}", id_of(&c.token)),
            format!("admin/reader/{}", id_of(&reader)),
        ]
    );
    assert!(actors
        .iter()
        .all(|a| !a.contains(&c.token) && !a.contains(&clerk)));
    // Paged (every read adds an event): two, then the rest after the last.
    let page = c
        .get_with(&c.token, &format!("/v1/evidence/{id}/custody?limit=2"), &[])?
        .json();
    let first: Vec<&Value> = page["events"].as_array().into_iter().flatten().collect();
    assert_eq!(first.len(), 2, "{page}");
    assert_eq!(page["next_after"], first[1]["leaf_index"], "{page}");
    let rest = c
        .get_with(
            &c.token,
            &format!(
                "/v1/evidence/{id}/custody?limit=2&after={}",
                page["next_after"]
            ),
            &[],
        )?
        .json();
    assert_eq!(rest["events"].as_array().map(Vec::len), Some(1), "{rest}");
    assert_eq!(rest["events"][0]["leaf_index"], events[2]["leaf_index"]);
    assert!(
        rest["next_after"].is_null(),
        "the last page says so: {rest}"
    );
    let a = c.get_with(&c.token, &format!("/v1/evidence/{id}/custody?limit=0"), &[])?;
    assert_eq!(a.status, 400);
    // A page larger than 1000 is cut to it (each event carries a receipt).
    let a = c.get_with(
        &c.token,
        &format!("/v1/evidence/{id}/custody?limit=100000"),
        &[],
    )?;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["events"].as_array().map(Vec::len), Some(3));
    // The receipt is still the filing's, whatever reads came after.
    let r: Receipt = serde_json::from_slice(
        &c.get_with(&c.token, &format!("/v1/evidence/{id}/receipt"), &[])?
            .body,
    )?;
    assert_eq!(
        r.verify(&key)?.statement.kind,
        protocol::ledger::Kind::Filed
    );
    // Another tenant sees neither the evidence nor its custody.
    let other = make_token(&c, "police", "reader")?;
    let a = c.get_with(&other, &format!("/v1/evidence/{id}/custody"), &[])?;
    assert_eq!(a.status, 404);
    Ok(())
}

#[test]
fn hash_only_notarization_returns_one_receipt_per_item() -> Result<()> {
    let c = TestCluster::start(Shape::default())?;
    let key = c.log_key()?;
    let clerk = make_token(&c, "agency-x", "clerk")?;
    let contents: Vec<Vec<u8>> = (0..3).map(|i| bytes(100 + i, i as u64)).collect();
    let items: Vec<Value> = contents
        .iter()
        .map(|b| {
            serde_json::json!({
                "blake3": custodia_tests::blake3_hex(b),
                "size": b.len(),
                "case": "AG-9",
                "provenance": { "capture_method": "forensic image" },
            })
        })
        .collect();
    let (status, body) = post_json(
        &c,
        &clerk,
        "/v1/notarize",
        &serde_json::json!({ "items": items }),
    )?;
    assert_eq!(status, 201, "{body}");
    let answered = body["items"].as_array().context("items")?;
    assert_eq!(answered.len(), 3);
    let mut leaves = Vec::new();
    for (item, content) in answered.iter().zip(&contents) {
        let r: Receipt = serde_json::from_value(item["receipt"].clone())?;
        let ok = r.verify(&key)?;
        assert_eq!(ok.statement.kind, ledger::Kind::Notarized);
        assert_eq!(ok.statement.blake3, custodia_tests::blake3_hex(content));
        assert_eq!(ok.statement.tenant, "agency-x");
        assert_eq!(
            ok.statement.provenance.capture_method.as_deref(),
            Some("forensic image")
        );
        leaves.push(r.leaf_index);
        // The receipt can be fetched again by its id, within the tenant only.
        let id = item["id"].as_str().unwrap_or_default();
        let again = c.get_with(&clerk, &format!("/v1/evidence/{id}/receipt"), &[])?;
        assert_eq!(again.status, 200);
        let stranger = make_token(&c, "court-z", "reader")?;
        let hidden = c.get_with(&stranger, &format!("/v1/evidence/{id}/receipt"), &[])?;
        assert_eq!(hidden.status, 404);
    }
    leaves.dedup();
    assert_eq!(leaves.len(), 3, "one leaf each");

    // A full request spans several queue chunks: every item still gets the
    // receipt of its own statement, in the answer and by its id.
    let many: Vec<Value> = (0..1000u32)
        .map(|i| {
            serde_json::json!({
                "blake3": custodia_tests::blake3_hex(&i.to_be_bytes()),
                "size": 4,
                "case": "AG-10",
            })
        })
        .collect();
    let (status, body) = post_json(
        &c,
        &clerk,
        "/v1/notarize",
        &serde_json::json!({ "items": many }),
    )?;
    assert_eq!(status, 201, "{body}");
    let answered = body["items"].as_array().context("items")?;
    assert_eq!(answered.len(), 1000);
    let mut leaves = std::collections::BTreeSet::new();
    for (i, item) in (0..1000u32).zip(answered) {
        let r: Receipt = serde_json::from_value(item["receipt"].clone())
            .with_context(|| format!("item {i} has no receipt"))?;
        let ok = r.verify(&key)?;
        let id = item["id"].as_str().context("id")?;
        assert_eq!(ok.statement.evidence, id, "item {i}");
        assert_eq!(
            ok.statement.blake3,
            custodia_tests::blake3_hex(&i.to_be_bytes())
        );
        assert!(leaves.insert(r.leaf_index), "item {i} shares a leaf");
        if i % 333 == 0 || i == 999 {
            let again = c.get_with(&clerk, &format!("/v1/evidence/{id}/receipt"), &[])?;
            assert_eq!(again.status, 200, "item {i}");
            let again: Receipt = serde_json::from_slice(&again.body)?;
            assert_eq!(again.leaf_index, r.leaf_index, "item {i}");
        }
    }

    // Bad input: a clear 400 with a JSON error, nothing queued.
    for bad in [
        serde_json::json!({ "items": [] }),
        serde_json::json!({ "items": [{ "blake3": "xyz", "size": 1 }] }),
        serde_json::json!({ "items": [{ "blake3": custodia_tests::blake3_hex(b"a"), "size": 1, "bogus": 1 }] }),
        // Text that would reach a court's terminal as an escape sequence,
        // or show one case name as another, as for a filing's headers.
        serde_json::json!({ "items": [{ "blake3": custodia_tests::blake3_hex(b"a"), "size": 1, "case": "\u{1b}]0;x\u{7}" }] }),
        serde_json::json!({ "items": [{ "blake3": custodia_tests::blake3_hex(b"a"), "size": 1, "provenance": { "source_device": "cam\u{202E}1" } }] }),
        serde_json::json!({ "items": [{ "blake3": custodia_tests::blake3_hex(b"a"), "size": 1, "case": "x".repeat(1025) }] }),
    ] {
        let (status, body) = post_json(&c, &clerk, "/v1/notarize", &bad)?;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"].is_string());
    }
    let reader = make_token(&c, "agency-x", "reader")?;
    let (status, _) = post_json(
        &c,
        &reader,
        "/v1/notarize",
        &serde_json::json!({ "items": items }),
    )?;
    assert_eq!(status, 403, "readers may not notarize");
    // No credentials: refused before the body is read (a 4 MiB body each
    // would otherwise be held for anyone who asks), so the answer comes
    // though the body never does.
    let addr = c.api.trim_start_matches("http://").to_owned();
    let mut stream = std::net::TcpStream::connect(&addr)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    std::io::Write::write_all(
        &mut stream,
        b"POST /v1/notarize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 4000000\r\n\r\n",
    )?;
    let mut answer = [0u8; 12];
    std::io::Read::read_exact(&mut stream, &mut answer)
        .context("no answer without the body: it waited for the body first")?;
    assert_eq!(&answer, b"HTTP/1.1 401");
    Ok(())
}

fn add_checkpoint(url: &str, body: &str) -> Result<(u16, String)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent.post(format!("{url}/add-checkpoint")).send(body)?;
    Ok((resp.status().as_u16(), resp.body_mut().read_to_string()?))
}

/// A witness that has seen nothing cosigns an empty tree only with the
/// empty tree's root: a checkpoint of size 0 with any other root is a lie,
/// refused (422) however well the log signed it.
#[test]
fn a_witness_refuses_an_empty_checkpoint_with_another_root() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (skey, vkey) = ledger::note_keys("custodia.local/ledger", &[3; 32]);
    let log_pub = dir.path().join("ledger.vkey");
    std::fs::write(&log_pub, &vkey)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let witness = start_witness(dir.path(), port, &log_pub)?;
    let empty = TreeHash(<sha2::Sha256 as sha2::Digest>::digest(b"").into());
    for (root, want) in [(TreeHash([1; 32]), 422), (empty, 200)] {
        let cp = ledger::sign_checkpoint(&skey, "custodia.local/ledger", 0, root)?;
        let (status, body) = add_checkpoint(
            &witness.url,
            &protocol::witness::add_checkpoint_body(0, &[], &cp),
        )?;
        assert_eq!(status, want, "{body}");
    }
    Ok(())
}

#[test]
fn witnesses_cosign_off_the_filing_path_and_never_cosign_a_fork() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    let key = c.log_key()?;
    let log_pub = c.data_dir().join("ledger.vkey");
    let wdir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut witness = start_witness(wdir.path(), port, &log_pub)?;
    let wkey = std::fs::read_to_string(wdir.path().join("witness.pub"))?
        .trim()
        .to_string();
    // A second court's witness.
    let wdir2 = tempfile::tempdir()?;
    let port2 = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let witness2 = start_witness(wdir2.path(), port2, &log_pub)?;
    let wkey2 = std::fs::read_to_string(wdir2.path().join("witness.pub"))?
        .trim()
        .to_string();
    let both = [wkey.clone(), wkey2.clone()];

    // Point the gateway at the witnesses.
    c.use_witnesses(&[(&witness.url, &wkey), (&witness2.url, &wkey2)], 200)?;

    let data = bytes(3000, 7);
    let filed = c.file(&data)?;
    let id = filed["id"].as_str().unwrap_or_default().to_string();
    // The receipt is upgraded with the witness's cosignature shortly after.
    let mut upgraded = None;
    custodia_tests::eventually(15, || {
        let r = c
            .get_with(&c.token, &format!("/v1/evidence/{id}/receipt"), &[])
            .ok()
            .and_then(|a| serde_json::from_slice::<Receipt>(&a.body).ok());
        if let Some(r) =
            r.filter(|r| protocol::witness::cosigned_by(&r.checkpoint, &both).len() == 2)
        {
            upgraded = Some(r);
            true
        } else {
            false
        }
    });
    let upgraded = upgraded.context("no receipt cosigned by both witnesses within 15 s")?;
    upgraded.verify(&key)?;
    // Both witnesses vouched for the time they cosigned at: the compliance
    // clock counts that as confirmed (a majority of two is two).
    let confirmed = custodia_tests::eventually(5, || {
        status_json(&c).is_ok_and(|s| s["clock"]["confirmed_by"] == "witnesses")
    });
    assert!(confirmed, "{}", status_json(&c)?["clock"]);
    // Each witness's time against the clock that stamps statements: the
    // same clock here, so a second or two below 0 (whole seconds, and the
    // round trip), far from the alert's 30.
    for w in [&witness.url, &witness2.url] {
        let series = format!("custodia_witness_clock_offset_seconds{{witness=\"{w}\"}}");
        let offset = c.metric(&c.metrics, &series)?;
        assert!((-5.0..=1.0).contains(&offset), "{series} = {offset}");
    }
    let dir = tempfile::tempdir()?;
    let (rpath, fpath, wpath) = (
        dir.path().join("r.json"),
        dir.path().join("e.bin"),
        wdir.path().join("witness.pub"),
    );
    std::fs::write(&rpath, serde_json::to_vec(&upgraded)?)?;
    std::fs::write(&fpath, &data)?;
    let out = Command::new(custodia_bin())
        .arg("verify")
        .arg("--receipt")
        .arg(&rpath)
        .arg("--log-key")
        .arg(&log_pub)
        .arg("--file")
        .arg(&fpath)
        .arg("--witness-key")
        .arg(&wpath)
        .arg("--witness-key")
        .arg(wdir2.path().join("witness.pub"))
        .output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("witnessed: by 2 of 2 trusted witnesses (quorum 2)"),
        "{text}"
    );
    // Under the wrong log key the same receipt is not logged, and its
    // cosignatures are not reported as vouching for anything.
    let wrong_log = dir.path().join("wrong.vkey");
    std::fs::write(
        &wrong_log,
        ledger::note_keys("custodia.local/ledger", &[9; 32]).1,
    )?;
    let out = Command::new(custodia_bin())
        .arg("verify")
        .arg("--receipt")
        .arg(&rpath)
        .arg("--log-key")
        .arg(&wrong_log)
        .arg("--witness-key")
        .arg(&wpath)
        .arg("--witness-key")
        .arg(wdir2.path().join("witness.pub"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        !out.status.success()
            && text.contains("INVALID: not logged")
            && text.contains("witnessed: not checked")
            && !text.contains("witnessed: by"),
        "{text}"
    );
    // A quorum the receipt does not meet fails, with a non-zero exit.
    let (_, stranger) = protocol::witness::witness_keys("witness.example/other", &[4; 32]);
    let out = Command::new(custodia_bin())
        .arg("verify")
        .arg("--receipt")
        .arg(&rpath)
        .arg("--log-key")
        .arg(&log_pub)
        .arg("--witness-key")
        .arg(&wpath)
        .arg("--witness-key")
        .arg(&stranger)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.code() == Some(1)
            && text.contains("witnessed by 1 of 2 trusted witnesses, 2 required"),
        "{text}"
    );
    // A genuine receipt not yet cosigned enough is not called a forgery.
    assert!(
        text.contains("verdict: NOT CONFIRMED") && !text.contains("do not rely"),
        "{text}"
    );
    // A quorum more than the keys given is the command's mistake.
    let (code, out) = verify_with(&[
        "--receipt".as_ref(),
        rpath.as_os_str(),
        "--log-key".as_ref(),
        log_pub.as_os_str(),
        "--witness-key".as_ref(),
        wpath.as_os_str(),
        "--quorum".as_ref(),
        "2".as_ref(),
    ])?;
    assert_eq!(code, Some(2), "{out}");
    // One key under two names is one witness (its cosignature does not
    // sign its name): given as two, it is the command's mistake too.
    let (_, named) = protocol::witness::witness_keys("witness.example/a", &[5; 32]);
    let (_, renamed) = protocol::witness::witness_keys("witness.example/b", &[5; 32]);
    let (code, out) = verify_with(&[
        "--receipt".as_ref(),
        rpath.as_os_str(),
        "--log-key".as_ref(),
        log_pub.as_os_str(),
        "--witness-key".as_ref(),
        named.as_ref(),
        "--witness-key".as_ref(),
        renamed.as_ref(),
    ])?;
    assert!(
        code == Some(2) && out.contains("hold the same public key"),
        "{code:?} {out}"
    );

    // The witness holds its view; lying to it fails whatever the lie.
    let seen = ledger::verify_checkpoint(&upgraded.checkpoint, &key)?.size;
    let (status, body) = add_checkpoint(
        &witness.url,
        &protocol::witness::add_checkpoint_body(0, &[], &upgraded.checkpoint),
    )?;
    assert_eq!(
        (status, body.trim().parse::<u64>().ok()),
        (409, Some(seen)),
        "wrong old size: 409 with its size"
    );
    let skey = std::fs::read_to_string(c.data_dir().join("ledger/log.key"))?;
    let fork = ledger::sign_checkpoint(
        skey.trim(),
        "custodia.local/ledger",
        seen + 1,
        TreeHash([0xee; 32]),
    )?;
    let (status, _) = add_checkpoint(
        &witness.url,
        &protocol::witness::add_checkpoint_body(seen, &[], &fork),
    )?;
    assert_eq!(
        status, 422,
        "a fork (no valid consistency proof) is refused"
    );
    // As tlog-witness orders them: a fork at the size it cosigned is a
    // conflict (409 with its size), and an old size past the checkpoint's a
    // bad request, whatever the witness saw.
    let same_size_fork = ledger::sign_checkpoint(
        skey.trim(),
        "custodia.local/ledger",
        seen,
        TreeHash([0xdd; 32]),
    )?;
    let (status, body) = add_checkpoint(
        &witness.url,
        &protocol::witness::add_checkpoint_body(seen, &[], &same_size_fork),
    )?;
    assert_eq!((status, body.trim().parse::<u64>().ok()), (409, Some(seen)));
    let (status, _) = add_checkpoint(
        &witness.url,
        &protocol::witness::add_checkpoint_body(seen + 5, &[], &upgraded.checkpoint),
    )?;
    assert_eq!(status, 400, "old past the checkpoint's size");
    let (other_s, _) = ledger::note_keys("custodia.local/ledger", &[7; 32]);
    let forged = ledger::sign_checkpoint(
        &other_s,
        "custodia.local/ledger",
        seen + 1,
        TreeHash([1; 32]),
    )?;
    let (status, _) = add_checkpoint(
        &witness.url,
        &protocol::witness::add_checkpoint_body(seen, &[], &forged),
    )?;
    assert_eq!(status, 403, "a checkpoint not signed by the log is refused");
    let smaller = ledger::sign_checkpoint(
        skey.trim(),
        "custodia.local/ledger",
        seen - 1,
        TreeHash([2; 32]),
    )?;
    let (status, _) = add_checkpoint(
        &witness.url,
        &protocol::witness::add_checkpoint_body(seen, &[], &smaller),
    )?;
    assert_eq!(status, 400, "a smaller tree is refused");
    // The answer is the witness's own cosignature, one line: not a line the
    // request carried under the witness's name with another key ID.
    let name = wkey.split('+').next().context("witness name")?.to_owned();
    let planted = format!(
        "{}\u{2014} {name} {}\n",
        upgraded.checkpoint,
        base64::engine::general_purpose::STANDARD.encode([0xde_u8; 76])
    );
    let (status, body) = add_checkpoint(
        &witness.url,
        &protocol::witness::add_checkpoint_body(seen, &[], &planted),
    )?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.lines().count(), 1, "{body}");
    assert!(
        !body.contains("3t7e3t7e"),
        "the planted line came back: {body}"
    );

    // A dead witness never slows filing: time filings with both alive, then
    // with one killed (a ratio within this run, not an absolute time).
    let time_filings = |seed: u64| -> Result<std::time::Duration> {
        let t = std::time::Instant::now();
        for i in 0..20 {
            receipt_of(&c.file(&bytes(100, seed + i))?)?.verify(&key)?;
        }
        Ok(t.elapsed())
    };
    let healthy = time_filings(100)?;
    let _ = witness.child.kill();
    let _ = witness.child.wait();
    let degraded = time_filings(200)?;
    assert!(
        degraded < healthy * 3,
        "filing slowed from {healthy:?} to {degraded:?} with a witness dead"
    );
    // Newer checkpoints are cosigned by the live witness alone; the first
    // filing's receipt keeps both cosignatures it had.
    let later = c.file(&bytes(100, 250))?;
    let later = later["id"].as_str().unwrap_or_default().to_string();
    let receipt_of_id = |id: &str| -> Option<Receipt> {
        c.get_with(&c.token, &format!("/v1/evidence/{id}/receipt"), &[])
            .ok()
            .and_then(|a| serde_json::from_slice::<Receipt>(&a.body).ok())
    };
    let moved_on = custodia_tests::eventually(15, || {
        receipt_of_id(&later).is_some_and(|r| {
            protocol::witness::cosigned_by(&r.checkpoint, &both).len() == 1
                && protocol::witness::cosigned_by(&r.checkpoint, &both[1..]).len() == 1
        })
    });
    assert!(moved_on, "no newer checkpoint cosigned by the live witness");
    let again = receipt_of_id(&id).context("the first receipt")?;
    again.verify(&key)?;
    assert_eq!(
        protocol::witness::cosigned_by(&again.checkpoint, &both).len(),
        2,
        "the first filing's receipt lost a cosignature: {}",
        again.checkpoint
    );
    // Killed and restarted, the witness remembers what it cosigned.
    let mut witness = start_witness(wdir.path(), port, &log_pub)?;
    let (status, body) = add_checkpoint(
        &witness.url,
        &protocol::witness::add_checkpoint_body(0, &[], &upgraded.checkpoint),
    )?;
    assert_eq!(status, 409);
    assert!(
        body.trim().parse::<u64>()? >= seen,
        "state survived the restart: {body}"
    );
    // Its last cosignature dated a day ahead (a clock gone wrong then):
    // it cosigns nothing more rather than date it a day ahead too.
    let _ = witness.child.kill();
    let _ = witness.child.wait();
    let state_file = wdir.path().join("witness-state.json");
    let mut state: Value = serde_json::from_slice(&std::fs::read(&state_file)?)?;
    let ahead = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 86_400;
    state["cosigned_at"] = ahead.into();
    std::fs::write(&state_file, serde_json::to_vec(&state)?)?;
    let _witness = start_witness(wdir.path(), port, &log_pub)?;
    let log = wdir.path().join("witness.log");
    let refused = custodia_tests::eventually(20, || {
        let _ = c.file(&bytes(100, 300));
        std::fs::read_to_string(&log)
            .is_ok_and(|l| l.contains("clock is behind its last cosignature"))
    });
    assert!(refused, "the witness cosigned with its clock a day behind");
    let state: Value = serde_json::from_slice(&std::fs::read(&state_file)?)?;
    assert_eq!(state["cosigned_at"], ahead, "nothing more was cosigned");
    Ok(())
}

#[test]
fn an_independent_implementation_agrees_with_our_tiles_proofs_and_signatures() -> Result<()> {
    if !custodia_tests::require(
        "an_independent_implementation_agrees_with_our_tiles_proofs_and_signatures",
        &[Tool::PythonCryptography],
    )? {
        return Ok(());
    }
    let c = TestCluster::start(Shape::default())?;
    let vkey = c.log_key()?;
    let mut receipts = Vec::new();
    for i in 0..2 {
        receipts.push(receipt_of(&c.file(&bytes(500 + i, i as u64))?)?);
    }
    let old_checkpoint = receipts[1].checkpoint.clone();
    // Enough entries to fill a whole tile and start the next.
    let items: Vec<Value> = (0..300u32)
        .map(|i| {
            serde_json::json!({
                "blake3": custodia_tests::blake3_hex(&i.to_be_bytes()),
                "size": 4,
            })
        })
        .collect();
    let (status, body) = post_json(
        &c,
        &c.token,
        "/v1/notarize",
        &serde_json::json!({ "items": items }),
    )?;
    assert_eq!(status, 201, "{body}");
    let notarized = body["items"].as_array().context("items")?;
    for k in [0, 253, 254, 299] {
        receipts.push(serde_json::from_value(notarized[k]["receipt"].clone())?);
    }
    receipts.push(receipt_of(&c.file(&bytes(77, 9))?)?);
    let note = String::from_utf8(published(&c, "checkpoint")?)?;
    let size = ledger::verify_checkpoint(&note, &vkey)?.size;
    assert_eq!(size, 303);
    let a = c.get_with(
        &c.token,
        &format!("/v1/ledger/consistency?old=2&new={size}"),
        &[],
    )?;
    assert_eq!(a.status, 200);
    let checks = serde_json::json!({
        "receipts": receipts,
        "old_checkpoint": old_checkpoint,
        "consistency_proof": a.json()["proof"],
    });
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("checks.json");
    std::fs::write(&path, serde_json::to_vec(&checks)?)?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("independent/verify_log.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(&c.api)
        .arg(&vkey)
        .arg(&path)
        .output()
        .context("running python3 (CI installs it; install python3 to run this test)")?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.starts_with("OK: 303 leaves, 7 receipts, consistency 2 -> 303"),
        "{text}"
    );
    println!("{}", text.trim());

    // It is not a yes-machine: a receipt with a wrong proof fails it.
    let mut bad = checks.clone();
    bad["receipts"][2]["inclusion_proof"][0] = Value::String(TreeHash([7; 32]).to_string());
    std::fs::write(&path, serde_json::to_vec(&bad)?)?;
    let out = Command::new("python3")
        .arg(&script)
        .arg(&c.api)
        .arg(&vkey)
        .arg(&path)
        .output()?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("inclusion proof of leaf 2 does not verify")
    );
    let (_, other) = ledger::note_keys("custodia.local/ledger", &[5; 32]);
    std::fs::write(&path, serde_json::to_vec(&checks)?)?;
    let out = Command::new("python3")
        .arg(&script)
        .arg(&c.api)
        .arg(&other)
        .arg(&path)
        .output()?;
    assert!(!out.status.success(), "another key must not verify the log");
    Ok(())
}

#[test]
fn twenty_gateway_restarts_during_filing_keep_every_receipt_and_one_consistent_log() -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let mut c = TestCluster::start(Shape::default())?;
    let key = c.log_key()?;
    // Every 201's id, and its receipt when the answer carried one.
    type Acknowledged = Vec<(String, Option<Receipt>)>;
    let acknowledged: Arc<Mutex<Acknowledged>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let filer = {
        let (api, token) = (c.api.clone(), c.token.clone());
        let (acknowledged, stop) = (acknowledged.clone(), stop.clone());
        std::thread::spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(std::time::Duration::from_secs(30)))
                .build()
                .into();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let sent = agent
                    .post(format!("{api}/v1/evidence"))
                    .header("authorization", format!("Bearer {token}"))
                    .send(&bytes(200, n)[..]);
                match sent {
                    Ok(mut r) if r.status() == 201 => {
                        let v: Value = r.body_mut().read_json().unwrap_or(Value::Null);
                        let id = v["id"].as_str().unwrap_or_default().to_owned();
                        let rc = serde_json::from_value::<Receipt>(v["receipt"].clone()).ok();
                        acknowledged.lock().map(|mut g| g.push((id, rc))).ok();
                    }
                    // The gateway is down or died mid-request: no receipt, try again.
                    _ => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
        })
    };
    let mut checkpoints: Vec<String> = Vec::new();
    for round in 0..20 {
        std::thread::sleep(std::time::Duration::from_millis(300));
        if let Ok(cp) = published(&c, "checkpoint") {
            checkpoints.push(String::from_utf8(cp)?);
        }
        if round % 2 == 0 {
            c.kill_gateway(); // SIGKILL: no goodbye
        } else {
            c.stop_gateway(); // SIGTERM
        }
        c.start_gateway()?;
        c.wait_healthy(8)?;
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    filer
        .join()
        .map_err(|_| anyhow::anyhow!("filer thread panicked"))?;
    let acknowledged = acknowledged
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    assert!(
        acknowledged.len() >= 20,
        "only {} filings acknowledged",
        acknowledged.len()
    );
    // Every acknowledged filing gets its own receipt, if not in its answer
    // then from its URL: no statement is lost to a kill.
    let mut receipts = Vec::with_capacity(acknowledged.len());
    for (id, answered) in &acknowledged {
        if let Some(r) = answered {
            receipts.push(r.clone());
        }
        let mut fetched = None;
        let issued = custodia_tests::eventually(30, || {
            fetched = c
                .get_with(&c.token, &format!("/v1/evidence/{id}/receipt"), &[])
                .ok()
                .filter(|a| a.status == 200)
                .and_then(|a| serde_json::from_slice::<Receipt>(&a.body).ok());
            fetched.is_some()
        });
        assert!(
            issued,
            "filing {id} was acknowledged but never got a receipt"
        );
        let r = fetched.context("receipt")?;
        assert_eq!(
            r.verify(&key)?.statement.evidence,
            *id,
            "{id}'s own receipt"
        );
        receipts.push(r);
    }

    // Every receipt ever issued verifies, and no leaf index was given to
    // two filings.
    let mut leaves = std::collections::BTreeMap::new();
    for r in &receipts {
        let evidence = r.verify(&key)?.statement.evidence;
        let first = leaves
            .entry(r.leaf_index)
            .or_insert_with(|| evidence.clone());
        assert_eq!(*first, evidence, "leaf {} issued twice", r.leaf_index);
        checkpoints.push(r.checkpoint.clone());
    }
    checkpoints.push(String::from_utf8(published(&c, "checkpoint")?)?);
    // One tree: every checkpoint seen is consistent with the next larger one
    // and with the newest, and no two of one size differ.
    let mut seen: Vec<ledger::VerifiedCheckpoint> = checkpoints
        .iter()
        .map(|n| ledger::verify_checkpoint(n, &key))
        .collect::<Result<_, _>>()?;
    seen.sort_by_key(|c| c.size);
    seen.dedup_by(|a, b| {
        if a.size == b.size {
            assert_eq!(
                a.root, b.root,
                "two different checkpoints of size {}",
                a.size
            );
            true
        } else {
            false
        }
    });
    let newest = seen.last().cloned().context("no checkpoint")?;
    let proof = |old: u64, new: u64| -> Result<Vec<TreeHash>> {
        let a = c.get_with(
            &c.token,
            &format!("/v1/ledger/consistency?old={old}&new={new}"),
            &[],
        )?;
        a.json()["proof"]
            .as_array()
            .context("proof")?
            .iter()
            .map(|h| {
                TreeHash::parse_hash(h.as_str().unwrap_or_default())
                    .map_err(|e| anyhow::anyhow!("{e:?}"))
            })
            .collect()
    };
    for pair in seen.windows(2) {
        ledger::check_consistency(&pair[0], &pair[1], &proof(pair[0].size, pair[1].size)?)?;
    }
    for cp in &seen {
        ledger::check_consistency(cp, &newest, &proof(cp.size, newest.size)?)?;
    }
    println!(
        "{} receipts over 20 restarts; {} distinct checkpoints, all consistent up to size {}",
        receipts.len(),
        seen.len(),
        newest.size
    );
    Ok(())
}

fn send(
    c: &TestCluster,
    method: &str,
    token: &str,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("{}{path}", c.api);
    let auth = format!("Bearer {token}");
    let mut resp = match (method, body) {
        ("PUT", Some(b)) => agent
            .put(&url)
            .header("authorization", &auth)
            .send_json(b)?,
        ("PUT", None) => agent
            .put(&url)
            .header("authorization", &auth)
            .send_empty()?,
        ("DELETE", _) => agent.delete(&url).header("authorization", &auth).call()?,
        (_, Some(b)) => agent
            .post(&url)
            .header("authorization", &auth)
            .send_json(b)?,
        (_, None) => agent
            .post(&url)
            .header("authorization", &auth)
            .send_empty()?,
    };
    let status = resp.status().as_u16();
    Ok((status, resp.body_mut().read_json().unwrap_or(Value::Null)))
}

#[test]
fn holds_retention_and_expunge_are_enforced_and_on_the_ledger() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    let key = c.log_key()?;
    // Separation of duties: no API caller, admins included, can mint an
    // expunger credential; it is issued on the index host with the gateway
    // stopped (and the CLI says so while it runs).
    let (status, body) = post_json(
        &c,
        &c.token,
        "/v1/admin/tokens",
        &serde_json::json!({ "tenant": "admin", "role": "expunger" }),
    )?;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    let key_create = |c: &TestCluster| {
        Command::new(custodia_bin())
            .args(["key", "create", "--tenant", "admin", "--role", "expunger"])
            .arg("--data-dir")
            .arg(c.data_dir())
            .output()
    };
    let busy = key_create(&c)?;
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("stop the gateway"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    let expunger = expunger_token(&mut c)?;
    let clerk = make_token(&c, "admin", "clerk")?;
    // Small JSON routes read no body before the caller's credentials are
    // good, and then only a bounded one.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut anonymous = agent
        .put(format!("{}/v1/evidence/x/retention", c.api))
        .send(&vec![b' '; 100_000][..])?;
    let anonymous_body: Value = anonymous.body_mut().read_json().unwrap_or(Value::Null);
    assert_eq!(
        (
            anonymous.status().as_u16(),
            anonymous_body["error"].as_str()
        ),
        (401, Some("unauthorized"))
    );
    let mut big = agent
        .put(format!("{}/v1/evidence/x/retention", c.api))
        .header("authorization", format!("Bearer {clerk}"))
        .send(&vec![b' '; 100_000][..])?;
    let big_body: Value = big.body_mut().read_json().unwrap_or(Value::Null);
    assert_eq!(
        (big.status().as_u16(), big_body["error"].as_str()),
        (413, Some("body_too_large"))
    );
    let order = serde_json::json!({ "order": "Order 2026-77 of the District Court" });

    // A: held, then released, then expunged.
    let data = bytes(40_000, 11);
    let filed = c.file(&data)?;
    let id = filed["id"].as_str().unwrap_or_default().to_string();
    let shards_before = c.all_shard_files().len();
    let (status, body) = send(
        &c,
        "PUT",
        &c.token,
        &format!("/v1/evidence/{id}/legal-hold"),
        None,
    )?;
    assert_eq!((status, body["legal_hold"].as_bool()), (200, Some(true)));
    // Answered once notarized, with its receipt: in the ledger's archive,
    // a lost index rebuilt from it keeps the hold.
    let held: Receipt = serde_json::from_value(body["receipt"].clone())?;
    let first_hold = held.verify(&key)?;
    assert_eq!(first_hold.statement.kind, ledger::Kind::LegalHold);
    assert_eq!(first_hold.statement.evidence, id);
    let (status, body) = send(
        &c,
        "POST",
        &expunger,
        &format!("/v1/evidence/{id}/expunge"),
        Some(order.clone()),
    )?;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("locked")),
        "{body}"
    );
    // A clerk may place a hold but not lift it.
    let (status, _) = send(
        &c,
        "DELETE",
        &clerk,
        &format!("/v1/evidence/{id}/legal-hold"),
        None,
    )?;
    assert_eq!(status, 403);
    // Admins cannot expunge at all; the expunger cannot read or file.
    let (status, _) = send(
        &c,
        "POST",
        &c.token,
        &format!("/v1/evidence/{id}/expunge"),
        Some(order.clone()),
    )?;
    assert_eq!(status, 403);
    assert_eq!(
        c.get_with(&expunger, &format!("/v1/evidence/{id}"), &[])?
            .status,
        403
    );
    // Released, held again, released again: each answer's receipt is its
    // own statement's, not the first of its kind.
    for kind in [
        ledger::Kind::Released,
        ledger::Kind::LegalHold,
        ledger::Kind::Released,
    ] {
        let method = match kind {
            ledger::Kind::LegalHold => "PUT",
            _ => "DELETE",
        };
        let (status, body) = send(
            &c,
            method,
            &c.token,
            &format!("/v1/evidence/{id}/legal-hold"),
            None,
        )?;
        assert_eq!(status, 200, "{body}");
        let r: Receipt = serde_json::from_value(body["receipt"].clone())?;
        let ok = r.verify(&key)?;
        assert_eq!(ok.statement.kind, kind);
        assert!(
            r.leaf_index > held.leaf_index,
            "{kind:?} answered with an older receipt"
        );
    }
    // A copy no stripe record names: a shard of it a scrub quarantined on
    // a node it has since been moved off.
    let quarantine = c.node_dir(0).join("quarantine");
    std::fs::create_dir_all(&quarantine)?;
    std::fs::write(
        quarantine.join(format!("{}-0-0.0001", id.replace('-', ""))),
        &data[..4000],
    )?;
    let pieces = [&data[..32], &data[20_000..20_032], &data[40_000 - 32..]];
    for piece in pieces {
        assert!(!c.node_files_holding(piece).is_empty());
    }
    let (status, body) = send(
        &c,
        "POST",
        &expunger,
        &format!("/v1/evidence/{id}/expunge"),
        Some(order.clone()),
    )?;
    assert_eq!(status, 200, "{body}");
    // The shards went once the expunge was notarized (its receipt comes
    // with the answer): a lost index rebuilt from the ledger knows of it.
    let r: Receipt = serde_json::from_value(body["receipt"].clone())?;
    assert_eq!(r.verify(&key)?.statement.kind, ledger::Kind::Expunged);
    assert_eq!(body["stripes_left_to_delete"].as_u64(), Some(0));
    assert_eq!(body["nodes_left_to_erase"].as_u64(), Some(0));
    assert_eq!(body["erased"].as_bool(), Some(true), "{body}");
    // The bytes are gone from every node, packed records and forensic
    // copies included; reading says so.
    assert!(c.all_shard_files().len() < shards_before);
    for piece in pieces {
        let left = c.node_files_holding(piece);
        assert!(left.is_empty(), "expunged bytes left in {left:?}");
    }
    let gone = c.get_with(&c.token, &format!("/v1/evidence/{id}"), &[])?;
    assert_eq!(
        (gone.status, gone.json()["error"].as_str()),
        (410, Some("expunged"))
    );
    // The filing's receipt still verifies, and custody tells the whole story.
    let mut kinds = Vec::new();
    custodia_tests::eventually(10, || {
        let a = c.get_with(&c.token, &format!("/v1/evidence/{id}/custody"), &[]);
        let events = a
            .ok()
            .and_then(|a| a.json()["events"].as_array().cloned())
            .unwrap_or_default();
        kinds = events
            .iter()
            .map(|e| e["kind"].as_str().unwrap_or("").to_string())
            .collect();
        events.len() == 6 && events.iter().all(|e| !e["receipt"].is_null())
    });
    assert_eq!(
        kinds,
        [
            "filed",
            "legal-hold",
            "released",
            "legal-hold",
            "released",
            "expunged"
        ]
    );
    let r = c.get_with(&c.token, &format!("/v1/evidence/{id}/receipt"), &[])?;
    let r: Receipt = serde_json::from_slice(&r.body)?;
    assert_eq!(r.verify(&key)?.statement.kind, ledger::Kind::Filed);

    // B: COMPLIANCE retention: nobody expunges, nobody shortens it.
    let far = 4_102_444_800_000u64; // 2100-01-01
    let b = c.file_with(
        &c.token,
        &bytes(5000, 12),
        &[("x-custodia-retain-until-ms", &far.to_string())],
    )?;
    assert_eq!(b.status, 201);
    let bid = b.json()["id"].as_str().unwrap_or_default().to_string();
    let (status, body) = send(
        &c,
        "POST",
        &expunger,
        &format!("/v1/evidence/{bid}/expunge"),
        Some(order),
    )?;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("locked")),
        "{body}"
    );
    let (status, body) = send(
        &c,
        "PUT",
        &c.token,
        &format!("/v1/evidence/{bid}/retention"),
        Some(serde_json::json!({ "retain_until_ms": 1 })),
    )?;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("locked")),
        "admins cannot shorten: {body}"
    );
    let (status, body) = send(
        &c,
        "PUT",
        &c.token,
        &format!("/v1/evidence/{bid}/retention"),
        Some(serde_json::json!({ "retain_until_ms": far + 1 })),
    )?;
    assert_eq!(
        (status, body["retain_until_ms"].as_u64()),
        (200, Some(far + 1))
    );
    assert_eq!(c.read(&bid)?, bytes(5000, 12), "B is intact");

    // C: a retention that would end before it began (a date in seconds,
    // say) is a mistake, refused with 400, at filing and later.
    let past = unix_ms() / 1000;
    let refused = c.file_with(
        &c.token,
        &bytes(4000, 13),
        &[("x-custodia-retain-until-ms", &past.to_string())],
    )?;
    assert_eq!(
        (refused.status, refused.json()["error"].as_str()),
        (400, Some("bad_request")),
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    let hash = blake3::hash(&bytes(4000, 13)).to_hex().to_string();
    let found = c.get_with(&c.token, &format!("/v1/evidence/by-hash/{hash}"), &[])?;
    assert_eq!(
        found.json()["filings"].as_array().map(Vec::len),
        Some(0),
        "the refused filing was stored: {}",
        found.json()
    );
    let cid = c.file_id(&bytes(4000, 14))?;
    let (status, body) = send(
        &c,
        "PUT",
        &c.token,
        &format!("/v1/evidence/{cid}/retention"),
        Some(serde_json::json!({ "retain_until_ms": past })),
    )?;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("bad_request")),
        "{body}"
    );
    // So is one in microseconds (year 57,900), which nothing could undo.
    let micros = (unix_ms() * 1000).to_string();
    let refused = c.file_with(
        &c.token,
        &bytes(4000, 15),
        &[("x-custodia-retain-until-ms", &micros)],
    )?;
    assert_eq!(
        refused.status,
        400,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    let (status, body) = send(
        &c,
        "PUT",
        &c.token,
        &format!("/v1/evidence/{cid}/retention"),
        Some(serde_json::json!({ "retain_until_ms": unix_ms() * 1000 })),
    )?;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap_or("").contains("100 years"),
        "{body}"
    );
    let manifest = c.get_with(&c.token, &format!("/v1/evidence/{cid}/manifest"), &[])?;
    assert!(
        manifest.json()["retain_until_ms"].is_null(),
        "{}",
        manifest.json()
    );
    Ok(())
}

fn status_json(c: &TestCluster) -> Result<Value> {
    let out = c.cli(&["status", "--json"])?;
    if !out.status.success() {
        bail!("status failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The log's signing key is rotated under a new origin (the gateway
/// stopped): the tree goes on, its newest checkpoint re-signed; receipts
/// issued before still verify with the old verifier key, kept beside the
/// new one; receipts served from then on, old filings' and new ones',
/// verify with the new key only; the same origin again is refused.
#[test]
fn the_log_key_rotates_under_a_new_origin_and_old_receipts_still_verify() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    let old_key = c.log_key()?;
    let a = c.file(&bytes(5000, 81))?;
    let a_id = a["id"].as_str().context("id")?.to_owned();
    let before = receipt_of(&a)?;
    before.verify(&old_key)?;

    let rotate = |c: &TestCluster| {
        c.custodia(&[
            "ledger",
            "rotate-key",
            "--origin",
            "courts.example/custodia/2027",
        ])
    };
    let busy = rotate(&c)?;
    assert!(!busy.status.success(), "rotated under a running gateway");
    c.stop_gateway();
    let out = rotate(&c)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("re-signed"), "{said}");
    c.start_gateway()?;
    c.wait_healthy(c.shape.nodes as u64)?;

    let new_key = c.log_key()?;
    assert!(
        new_key.starts_with("courts.example/custodia/2027+"),
        "{new_key}"
    );
    let kept = std::fs::read_to_string(c.data_dir().join(format!(
        "ledger.vkey.{}",
        old_key.split('+').next().unwrap_or_default().replace('/', "_")
    )))?;
    assert_eq!(kept.trim(), old_key, "the old verifier key is kept");
    before.verify(kept.trim())?;
    assert!(before.verify(&new_key).is_err());
    // The filing's receipt now, and a new filing's: the new key's.
    let now = c.get_with(&c.token, &format!("/v1/evidence/{a_id}/receipt"), &[])?;
    assert_eq!(now.status, 200);
    let now: Receipt = serde_json::from_slice(&now.body)?;
    now.verify(&new_key)?;
    assert!(now.verify(&old_key).is_err());
    // Its time-stamp, once there, is over the re-signed checkpoint (the old
    // one's token is not carried over to a note it does not cover).
    let tsa = std::fs::read_to_string(c.data_dir().join("tsa.pem"))?;
    let mut last = None;
    let stamped = custodia_tests::eventually(20, || {
        let r = c
            .get_with(&c.token, &format!("/v1/evidence/{a_id}/receipt"), &[])
            .ok()
            .and_then(|a| serde_json::from_slice::<Receipt>(&a.body).ok());
        let ok = r.as_ref().is_some_and(|r| {
            r.timestamp.is_some() && r.verify(&new_key).is_ok() && r.check_timestamp(&tsa).is_ok()
        });
        last = r;
        ok
    });
    assert!(stamped, "no receipt with a valid time-stamp: {last:?}");
    let b = c.file(&bytes(6000, 82))?;
    let after = receipt_of(&b)?;
    after.verify(&new_key)?;
    assert!(after.leaf_index > before.leaf_index, "the tree went on");
    // And an auditor can show it: the new origin's checkpoint extends the
    // old one's, each checked with its own key (one key alone cannot).
    let (old_cp, new_cp) = (
        ledger::verify_checkpoint(&before.checkpoint, &old_key)?,
        ledger::verify_checkpoint(&after.checkpoint, &new_key)?,
    );
    let proof = c.get_with(
        "",
        &format!(
            "/v1/ledger/consistency?old={}&new={}",
            old_cp.size, new_cp.size
        ),
        &[],
    )?;
    assert_eq!(proof.status, 200);
    let dir = tempfile::tempdir()?;
    let (old_path, new_path, proof_path, old_vkey) = (
        dir.path().join("before.json"),
        dir.path().join("after.json"),
        dir.path().join("proof.json"),
        dir.path().join("old.vkey"),
    );
    std::fs::write(&old_path, serde_json::to_vec(&before)?)?;
    std::fs::write(&new_path, serde_json::to_vec(&after)?)?;
    std::fs::write(&proof_path, &proof.body)?;
    std::fs::write(&old_vkey, &old_key)?;
    let across = |old_key: Option<&Path>| {
        let mut args = vec![
            "--consistency".as_ref(),
            old_path.as_os_str(),
            new_path.as_os_str(),
            "--proof".as_ref(),
            proof_path.as_os_str(),
            "--log-key".as_ref(),
            new_key.as_ref(),
        ];
        if let Some(k) = old_key {
            args.extend(["--old-log-key".as_ref(), k.as_os_str()]);
        }
        verify_with(&args)
    };
    let (code, out) = across(Some(&old_vkey))?;
    assert!(
        code == Some(0) && out.contains("signed before the key's rotation"),
        "{code:?} {out}"
    );
    let (code, out) = across(None)?;
    assert!(
        code == Some(1) && out.contains("does not verify"),
        "the old checkpoint under the new key: {code:?} {out}"
    );
    let served = c.get_with("", "/v1/ledger/key", &[])?;
    assert_eq!(String::from_utf8_lossy(&served.body).trim(), new_key);
    // The published checkpoint is the new origin's, for monitors too.
    let published = c.data_dir().join("ledger/tiles/checkpoint");
    let renamed = custodia_tests::eventually(10, || {
        std::fs::read_to_string(&published)
            .is_ok_and(|n| n.starts_with("courts.example/custodia/2027\n"))
    });
    assert!(renamed, "{:?}", std::fs::read_to_string(&published));
    // Once is enough: the same origin again is refused.
    c.stop_gateway();
    let again = rotate(&c)?;
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    Ok(())
}

/// An expunge erases on every node the index knows, not only those this
/// gateway's configuration lists: another gateway's may list one more (a
/// node added while this one ran on an older file), and a copy there (a
/// shard a scrub quarantined, one a repair moved away) must go too.
#[test]
fn an_expunge_reaches_a_node_only_the_index_knows() -> Result<()> {
    let mut c = TestCluster::start(Shape {
        nodes: 4,
        k: 2,
        m: 1,
        ..Shape::default()
    })?;
    // (Seeing every node up, the gateway recorded each in the index.)
    let expunger = expunger_token(&mut c)?;
    // The gateway restarts on a file without node 3, which keeps running.
    c.kill_gateway();
    let file = c.data_dir().join("cluster.toml");
    let mut cluster: toml::Value = toml::from_str(&std::fs::read_to_string(&file)?)?;
    let not_3 = |n: &toml::Value| n.get("id").and_then(|i| i.as_integer()) != Some(3);
    let table = cluster.as_table_mut().context("cluster")?;
    table
        .get_mut("nodes")
        .and_then(|n| n.as_array_mut())
        .context("nodes")?
        .retain(not_3);
    table
        .get_mut("gateway")
        .and_then(|g| g.get_mut("nodes"))
        .and_then(|n| n.as_array_mut())
        .context("gateway.nodes")?
        .retain(not_3);
    std::fs::write(&file, toml::to_string(&cluster)?)?;
    c.start_gateway()?;
    c.wait_healthy(3)?;
    let data = bytes(30_000, 41);
    let id = c.file(&data)?["id"].as_str().context("id")?.to_owned();
    let quarantine = c.node_dir(3).join("quarantine");
    std::fs::create_dir_all(&quarantine)?;
    std::fs::write(
        quarantine.join(format!("{}-0-0.0001", id.replace('-', ""))),
        &data[..4000],
    )?;
    let piece = &data[100..132];
    assert!(!c.node_files_holding(piece).is_empty());
    let (status, body) = expunge(&c, &expunger, &id)?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["erased"].as_bool(), Some(true), "{body}");
    let left = c.node_files_holding(piece);
    assert!(left.is_empty(), "expunged bytes left in {left:?}");
    Ok(())
}

/// A read that fails before it could send a byte (too few nodes) is no
/// access on the record, whether the evidence is small (read whole) or
/// streams: custody shows only the reads that were answered.
#[test]
fn a_read_that_fails_before_its_first_byte_is_not_an_access() -> Result<()> {
    let mut c = TestCluster::start(Shape {
        nodes: 3,
        k: 2,
        m: 1,
        ..Shape::default()
    })?;
    // Small enough to be read whole, and larger than that: it streams.
    let small = bytes(9000, 43);
    let large = bytes(3 << 20, 44);
    let mut ids = Vec::new();
    for data in [&small, &large] {
        ids.push(c.file(data)?["id"].as_str().context("id")?.to_owned());
    }
    c.kill_node(1);
    c.kill_node(2);
    for id in &ids {
        let failed = c.get_with(&c.token, &format!("/v1/evidence/{id}"), &[])?;
        assert_eq!(failed.status, 503, "{}", failed.json());
    }
    c.start_node_and_wait(1)?;
    c.start_node_and_wait(2)?;
    for (id, data) in ids.iter().zip([&small, &large]) {
        assert_eq!(&c.read(id)?, data);
        // The answered read's statement comes after the failed one's
        // would have: once it shows, so would the other.
        let mut kinds = Vec::new();
        let shown = custodia_tests::eventually(15, || {
            let a = c.get_with(&c.token, &format!("/v1/evidence/{id}/custody"), &[]);
            kinds = a
                .ok()
                .and_then(|a| a.json()["events"].as_array().cloned())
                .unwrap_or_default()
                .iter()
                .map(|e| e["kind"].as_str().unwrap_or("").to_owned())
                .collect();
            kinds.iter().any(|k| k == "accessed")
        });
        assert!(shown, "the answered read is not on the record: {kinds:?}");
        assert_eq!(kinds, ["filed", "accessed"], "{} bytes", data.len());
    }
    Ok(())
}

/// An expunge does not wait for the last node down before the nodes that
/// answer erase what they hold (copies no stripe record names included),
/// and reaches, at best effort, a removed node still running; once the
/// node down is back, the expunge completes.
#[test]
fn an_expunge_erases_on_the_nodes_that_answer_and_on_removed_ones() -> Result<()> {
    let mut c = TestCluster::start(Shape {
        nodes: 5,
        k: 2,
        m: 1,
        ..Shape::default()
    })?;
    let expunger = expunger_token(&mut c)?;
    // Node 4 is drained and removed before anything is filed, and keeps
    // running.
    for action in ["drain", "remove"] {
        let out = c.cli(&["node", action, "4"])?;
        ensure!(
            out.status.success(),
            "node {action} 4: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let data = bytes(30_000, 43);
    let id = c.file(&data)?["id"].as_str().context("id")?.to_owned();
    let piece = &data[100..132];
    let holder = c
        .node_holding(piece)
        .context("no node holds the first shard")?;
    let other = (0..4).find(|&i| i != holder).context("another node")?;
    // Copies no stripe record names: on a node that answers, and on the
    // removed one.
    let planted = |node: u32| -> Result<std::path::PathBuf> {
        let dir = c.node_dir(node).join("quarantine");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{}-0-0.0001", id.replace('-', "")));
        std::fs::write(&path, b"a forensic copy")?;
        Ok(path)
    };
    let (on_other, on_removed) = (planted(other)?, planted(4)?);
    c.kill_node(holder);
    let (status, body) = expunge(&c, &expunger, &id)?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["erased"].as_bool(), Some(false), "{body}");
    assert!(body["stripes_left_to_delete"].as_u64() > Some(0), "{body}");
    assert!(
        !on_other.exists(),
        "a node that answers kept its copy while another node was down"
    );
    assert!(!on_removed.exists(), "the removed node kept its copy");
    c.start_node_and_wait(holder)?;
    assert!(
        custodia_tests::eventually(60, || c.node_files_holding(piece).is_empty()),
        "expunged bytes left in {:?}",
        c.node_files_holding(piece)
    );
    Ok(())
}

/// An expunger credential, minted on the index host with the gateway
/// stopped (as the CLI requires); the gateway is started again.
fn expunger_token(c: &mut TestCluster) -> Result<String> {
    c.stop_gateway();
    let token = c.mint_expunger()?;
    restart_under(c, None)?;
    Ok(token)
}

/// Whether a file named `name` is anywhere under `dir`.
fn found_under(dir: &std::path::Path, name: &str) -> bool {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            let path = e.path();
            e.file_name() == name || (path.is_dir() && found_under(&path, name))
        })
}

/// Restarts the gateway, with its wall clock moved by `offset` (faketime).
fn restart_under(c: &mut TestCluster, offset: Option<&str>) -> Result<()> {
    c.stop_gateway();
    match offset {
        None => c.start_gateway()?,
        Some(o) => {
            let w = custodia_tests::faketime(o)?;
            c.start_gateway_under(&w.iter().map(String::as_str).collect::<Vec<_>>())?
        }
    }
    c.wait_healthy(c.shape.nodes as u64)
}

fn expunge(c: &TestCluster, token: &str, id: &str) -> Result<(u16, Value)> {
    let order = serde_json::json!({ "order": "Order 2026-91 of the District Court" });
    send(
        c,
        "POST",
        token,
        &format!("/v1/evidence/{id}/expunge"),
        Some(order),
    )
}

/// Files evidence under COMPLIANCE retention until `until` (ms).
fn file_retained(c: &TestCluster, seed: u64, until: u64) -> Result<(String, u64)> {
    let a = c.file_with(
        &c.token,
        &bytes(3000, seed),
        &[("x-custodia-retain-until-ms", &until.to_string())],
    )?;
    ensure!(a.status == 201, "filing: {}", a.status);
    Ok((
        a.json()["id"].as_str().context("id")?.to_owned(),
        a.json()["filed_at_ms"].as_u64().context("filed_at_ms")?,
    ))
}

fn compliance_offset_s(c: &TestCluster) -> Result<f64> {
    status_json(c)?["clock"]["compliance_offset_s"]
        .as_f64()
        .context("no compliance_offset_s in status")
}

/// Retention ends by the compliance clock, not the system clock: a gateway
/// restarted with its clock set a day forward expunges nothing early (and
/// says its compliance clock lags), one restarted with its clock set back
/// half a day stamps filings with about the real time, and once a
/// retention has really passed, its evidence can be expunged.
#[test]
fn retention_ends_by_the_compliance_clock_not_the_system_clock() -> Result<()> {
    if !custodia_tests::require(
        "retention_ends_by_the_compliance_clock_not_the_system_clock",
        &[Tool::Faketime],
    )? {
        return Ok(());
    }
    let mut c = TestCluster::start(Shape::default())?;
    let expunger = expunger_token(&mut c)?;
    let short_until = unix_ms() + 40_000;
    let (short, a_filed) = file_retained(&c, 31, short_until)?;
    let (long, _) = file_retained(&c, 32, unix_ms() + 3_600_000)?;

    // 1. The system clock a day ahead: no retention has ended.
    restart_under(&mut c, Some("+1d"))?;
    // (The short one only while its date is still ahead in real time: a
    // slow machine may have taken that long to get here.)
    let ahead = unix_ms() + 5_000 < short_until;
    for id in [&long, &short].into_iter().take(if ahead { 2 } else { 1 }) {
        let (status, body) = expunge(&c, &expunger, id)?;
        assert_eq!(
            (status, body["error"].as_str()),
            (409, Some("locked")),
            "a clock set forward expunged: {body}"
        );
    }
    let offset = compliance_offset_s(&c)?;
    assert!(
        (-86_460.0..-86_000.0).contains(&offset),
        "compliance clock minus system clock: {offset} s"
    );
    let table = String::from_utf8_lossy(&c.cli(&["status"])?.stdout).into_owned();
    println!("custodia status with the gateway's clock a day ahead:\n{table}");
    assert!(table.contains("h behind the system clock"), "{table}");
    let gauge = c.metric(&c.metrics, "custodia_compliance_clock_offset_seconds")?;
    assert!(gauge < -86_000.0, "gauge {gauge}");

    // 2. The system clock 12 hours behind: filings are stamped with the
    //    compliance clock, which lost only the restarts, not 12 hours.
    restart_under(&mut c, Some("-12h"))?;
    let before = unix_ms();
    let b = c.file(&bytes(2000, 33))?;
    let b_filed = b["filed_at_ms"].as_u64().context("filed_at_ms")?;
    assert!(
        b_filed + 60_000 > before && b_filed + 60_000 > a_filed,
        "filed at {b_filed}, after one filed at {a_filed}, at real time {before}"
    );
    let table = String::from_utf8_lossy(&c.cli(&["status"])?.stdout).into_owned();
    assert!(
        table.contains("the system clock was stepped back"),
        "{table}"
    );

    // 3. The right time again: once the short retention has passed by the
    //    compliance clock (which lost only the restarts), it is expunged;
    //    the long one still holds.
    restart_under(&mut c, None)?;
    let mut last = (0, Value::Null);
    let expunged = custodia_tests::eventually(90, || {
        last = expunge(&c, &expunger, &short).unwrap_or((0, Value::Null));
        last.0 == 200
    });
    assert!(expunged, "never expunged after its date: {last:?}");
    assert!(unix_ms() >= short_until, "expunged before its date");
    assert_eq!(expunge(&c, &expunger, &long)?.0, 409);
    Ok(())
}

/// Where the compliance clock starts and what moves it on: an index rebuilt
/// by `recover-index` gets it back from the archive, not from its newest
/// filing (stamped by a system clock set forward) nor from a system clock
/// set forward for the occasion; a majority of witnesses vouching for a
/// later time moves it there, and retention then ends by it.
#[test]
fn the_compliance_clock_survives_recovery_and_follows_the_witnesses() -> Result<()> {
    if !custodia_tests::require(
        "the_compliance_clock_survives_recovery_and_follows_the_witnesses",
        &[Tool::Faketime],
    )? {
        return Ok(());
    }
    let mut c = TestCluster::start(Shape::default())?;
    let (long, _) = file_retained(&c, 41, unix_ms() + 3_600_000)?;
    // Let the ledger publish the filing (recovery checks the archive
    // against the published checkpoint).
    let published = custodia_tests::eventually(15, || {
        c.get_with(&c.token, &format!("/v1/evidence/{long}/receipt"), &[])
            .is_ok_and(|a| a.status == 200)
    });
    assert!(published, "no receipt for {long}");
    // A filing while the system clock is a day ahead: stamped a day ahead
    // (stamps follow a clock that runs ahead), the newest in the index,
    // while the compliance clock lags, and its copy in the archive with it.
    restart_under(&mut c, Some("+1d"))?;
    let later = c.file_id(&bytes(1500, 43))?;
    let published = custodia_tests::eventually(15, || {
        c.get_with(&c.token, &format!("/v1/evidence/{later}/receipt"), &[])
            .is_ok_and(|a| a.status == 200)
    });
    assert!(published, "no receipt for {later}");
    let archived = custodia_tests::eventually(30, || found_under(c.data_dir(), "compliance-clock"));
    assert!(archived, "the compliance clock was never archived");

    // 1. Rebuild the index, then start with the system clock a day ahead.
    c.stop_gateway();
    let out = c.custodia(&["recover-index"])?;
    assert!(
        out.status.success(),
        "recover-index: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("compliance clock restored from the archive"),
        "{said}"
    );
    // (Credentials other than the admin's are not recovered: mint one.)
    let expunger = c.mint_expunger()?;
    restart_under(&mut c, Some("+1d"))?;
    let offset = compliance_offset_s(&c)?;
    assert!(
        offset < -86_000.0,
        "the recovered index's clock started at the faked time: offset {offset} s"
    );
    let (status, body) = expunge(&c, &expunger, &long)?;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("locked")),
        "{body}"
    );

    // 2. A witness whose clock also says a day later (one of one is a
    //    majority): the compliance clock follows, and the hour's retention
    //    has ended by it.
    let log_pub = c.data_dir().join("ledger.vkey");
    let wdir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let w = custodia_tests::faketime("+1d")?;
    let witness = custodia_tests::start_witness_under(
        wdir.path(),
        port,
        &log_pub,
        &w.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let wkey = std::fs::read_to_string(wdir.path().join("witness.pub"))?
        .trim()
        .to_string();
    c.use_witnesses(&[(&witness.url, &wkey)], 200)?;
    restart_under(&mut c, Some("+1d"))?;
    c.file(&bytes(1000, 42))?; // a new checkpoint for the witness
    let caught_up = custodia_tests::eventually(20, || {
        status_json(&c).is_ok_and(|s| {
            s["clock"]["confirmed_by"] == "witnesses"
                && s["clock"]["compliance_offset_s"]
                    .as_f64()
                    .is_some_and(|o| o > -60.0)
        })
    });
    assert!(caught_up, "{}", status_json(&c)?["clock"]);
    let (status, body) = expunge(&c, &expunger, &long)?;
    assert_eq!(status, 200, "{body}");
    Ok(())
}

/// A statement whose time runs well past its checkpoint's time-stamp (an
/// independent TSA's) is called wrong by `custodia verify`: the operator's
/// clock ran ahead, and the receipt's time is not the filing's; one past
/// the witnesses' cosignatures is warned of. One stamped or cosigned after
/// it verifies.
#[test]
fn a_statement_time_past_its_time_stamp_is_called_wrong() -> Result<()> {
    let c = TestCluster::start(Shape::default())?;
    let key = c.log_key()?;
    let filed = c.file(&bytes(1500, 23))?;
    let receipt = receipt_of(&filed)?;
    let statement_ms = receipt.verify(&key)?.statement.time_ms;
    let dir = tempfile::tempdir()?;
    let (cert, tsa_key) = protocol::tsa::make_tsa("Springfield Time-Stamping Authority")
        .map_err(|e| anyhow::anyhow!("{}", e.0))?;
    let cert_path = dir.path().join("tsa.pem");
    std::fs::write(&cert_path, &cert)?;
    let key_path = dir.path().join("ledger.vkey");
    std::fs::write(&key_path, &key)?;
    let stamped_at = |gen_time: u64| -> Result<std::path::PathBuf> {
        let request = protocol::tsa::request(
            ledger::checkpoint_text_sha256(&receipt.checkpoint),
            protocol::tsa::random_nonce(),
        );
        let reply = protocol::tsa::timestamp(&request, &cert, &tsa_key, gen_time)
            .map_err(|e| anyhow::anyhow!("{}", e.0))?;
        let mut stamped = receipt.clone();
        stamped.timestamp = Some(B64.encode(reply));
        let path = dir.path().join(format!("receipt-{gen_time}.json"));
        std::fs::write(&path, serde_json::to_vec(&stamped)?)?;
        Ok(path)
    };
    let verify_stamped = |path: &Path| {
        verify_with(&[
            "--receipt".as_ref(),
            path.as_os_str(),
            "--log-key".as_ref(),
            key_path.as_os_str(),
            "--tsa-cert".as_ref(),
            cert_path.as_os_str(),
        ])
    };
    let later = stamped_at(statement_ms / 1000 + 5)?;
    let (code, out) = verify_stamped(&later)?;
    assert_eq!(code, Some(0), "{out}");
    let earlier = stamped_at(statement_ms / 1000 - 3600)?;
    let (code, out) = verify_stamped(&earlier)?;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("clock ran 3599 s ahead"), "{out}");

    // The same of a witness's cosignature: it shows the checkpoint existed
    // by its time.
    let (wkey, wpub) = protocol::witness::witness_keys("witness.example/court-c", &[5; 32]);
    let wpub_path = dir.path().join("witness.pub");
    std::fs::write(&wpub_path, &wpub)?;
    let cosigned_at = |time: u64| -> Result<std::path::PathBuf> {
        let line = protocol::witness::cosignature_line(&wkey, &receipt.checkpoint, time)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut cosigned = receipt.clone();
        cosigned.checkpoint = protocol::witness::add_signature_lines(&receipt.checkpoint, &line);
        // (The tlog-proof form carries the checkpoint too.)
        assert!(receipt.tlog_proof.contains(&receipt.checkpoint));
        cosigned.tlog_proof = receipt
            .tlog_proof
            .replace(&receipt.checkpoint, &cosigned.checkpoint);
        let path = dir.path().join(format!("cosigned-{time}.json"));
        std::fs::write(&path, serde_json::to_vec(&cosigned)?)?;
        Ok(path)
    };
    let verify_cosigned = |path: &Path| {
        verify_with(&[
            "--receipt".as_ref(),
            path.as_os_str(),
            "--log-key".as_ref(),
            key_path.as_os_str(),
            "--witness-key".as_ref(),
            wpub_path.as_os_str(),
        ])
    };
    let (code, out) = verify_cosigned(&cosigned_at(statement_ms / 1000 + 3)?)?;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("witness.example/court-c cosigned at"), "{out}");
    // Warned of, not a verdict: a witness's clock is not audited as a
    // TSA's is.
    let (code, out) = verify_cosigned(&cosigned_at(statement_ms / 1000 - 7200)?)?;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("WARNING: time: the statement says")
            && out.contains("the witnesses cosigned the checkpoint holding it by")
            && out.contains("clock ran 7199 s ahead"),
        "{out}"
    );
    Ok(())
}

#[test]
fn receipts_carry_rfc3161_tokens_that_openssl_accepts() -> Result<()> {
    if !custodia_tests::require(
        "receipts_carry_rfc3161_tokens_that_openssl_accepts",
        &[Tool::Openssl],
    )? {
        return Ok(());
    }
    use sha2::Digest;
    let mut c = TestCluster::start(Shape::default())?;
    let key = c.log_key()?;
    let tsa_pem = c.data_dir().join("tsa.pem");
    let data = bytes(2000, 21);
    let filed = c.file(&data)?;
    let id = filed["id"].as_str().unwrap_or_default().to_string();
    let fetch_stamped = |c: &TestCluster| -> Option<Receipt> {
        let mut got = None;
        custodia_tests::eventually(15, || {
            got = c
                .get_with(&c.token, &format!("/v1/evidence/{id}/receipt"), &[])
                .ok()
                .and_then(|a| serde_json::from_slice::<Receipt>(&a.body).ok())
                .filter(|r| r.timestamp.is_some());
            got.is_some()
        });
        got
    };
    let r = fetch_stamped(&c).context("no time-stamped receipt within 15 s")?;
    r.verify(&key)?;
    let pem = std::fs::read_to_string(&tsa_pem)?;
    let gen_time = r.check_timestamp(&pem)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    assert!(
        gen_time <= now + 1 && gen_time + 120 > now,
        "genTime {gen_time} vs now {now}"
    );

    // openssl, knowing nothing of Custodia, accepts the token over the checkpoint.
    let dir = tempfile::tempdir()?;
    let tsr = dir.path().join("resp.tsr");
    std::fs::write(
        &tsr,
        B64.decode(r.timestamp.as_deref().unwrap_or_default())?,
    )?;
    let note = &r.checkpoint;
    let text = &note[..=note.find("\n\n").context("note")?];
    let digest = hex::encode(sha2::Sha256::digest(text.as_bytes()));
    let out = Command::new("openssl")
        .args(["ts", "-verify", "-digest", &digest, "-in"])
        .arg(&tsr)
        .arg("-CAfile")
        .arg(&tsa_pem)
        .output()
        .context("running openssl (CI installs it)")?;
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("Verification: OK"), "{said}");

    // custodia verify checks it too, and refuses a tampered token.
    let rpath = dir.path().join("r.json");
    std::fs::write(&rpath, serde_json::to_vec(&r)?)?;
    let vkey = c.data_dir().join("ledger.vkey");
    let run_with = |receipt: &Path, cert: &Path| {
        verify_with(&[
            "--receipt".as_ref(),
            receipt.as_os_str(),
            "--log-key".as_ref(),
            vkey.as_os_str(),
            "--tsa-cert".as_ref(),
            cert.as_os_str(),
        ])
    };
    let run = |receipt: &Path| run_with(receipt, &tsa_pem);
    let (code, out) = run(&rpath)?;
    // The token verifies; the development TSA's (the operator's clock) is
    // said to prove no time independently.
    assert!(
        code == Some(0)
            && out.contains("by Custodia's development TSA")
            && out.contains("proves no time independently"),
        "{out}"
    );
    // A certificate that is none is the command's mistake (exit 2), never
    // a verdict on the receipt.
    let (code, out) = run_with(&rpath, &c.data_dir().join("ledger.vkey"))?;
    assert!(
        code == Some(2) && out.contains("nothing was verified") && !out.contains("INVALID"),
        "{out}"
    );
    let mut bad = r.clone();
    let mut der = B64.decode(bad.timestamp.as_deref().unwrap_or_default())?;
    let last = der.len() - 1;
    der[last] ^= 1;
    bad.timestamp = Some(B64.encode(der));
    std::fs::write(&rpath, serde_json::to_vec(&bad)?)?;
    // The log still vouches for the statement: the verdict says the time
    // alone is not confirmed, and the exit is a failure.
    let (code, out) = run(&rpath)?;
    assert!(
        code == Some(1)
            && out.contains("INVALID: time-stamp")
            && out.contains("verdict: NOT CONFIRMED"),
        "{out}"
    );

    // The same tokens through the RFC 3161 HTTP client, against the
    // development TSA that up runs at POST /tsa.
    c.kill_gateway();
    let file = c.data_dir().join("cluster.toml");
    let mut cluster: toml::Value = toml::from_str(&std::fs::read_to_string(&file)?)?;
    let tsa = cluster
        .get_mut("gateway")
        .and_then(|g| g.get_mut("ledger"))
        .and_then(|l| l.get_mut("tsa"))
        .and_then(|t| t.as_table_mut())
        .context("gateway.ledger.tsa")?;
    tsa.insert("url".into(), toml::Value::String(format!("{}/tsa", c.api)));
    std::fs::write(&file, toml::to_string(&cluster)?)?;
    c.start_gateway()?;
    c.wait_healthy(8)?;
    let filed = c.file(&bytes(10, 22))?;
    let id2 = filed["id"].as_str().unwrap_or_default().to_string();
    let mut got = None;
    custodia_tests::eventually(15, || {
        got = c
            .get_with(&c.token, &format!("/v1/evidence/{id2}/receipt"), &[])
            .ok()
            .and_then(|a| serde_json::from_slice::<Receipt>(&a.body).ok())
            .filter(|r| r.timestamp.is_some());
        got.is_some()
    });
    got.context("no token through the HTTP client")?
        .check_timestamp(&pem)?;
    // A development TSA signs with its machine's clock: asked over HTTP
    // all the same, its time confirms nothing to the compliance clock.
    let clock = &status_json(&c)?["clock"];
    assert!(clock["confirmed_by"].is_null(), "{clock}");
    Ok(())
}

#[test]
fn no_checkpoint_is_signed_while_its_tiles_cannot_be_stored() -> Result<()> {
    // Tiles go to an S3-compatible bucket that does not answer: filings stay
    // durable and visible, but no checkpoint is signed and no receipt is
    // issued until the tiles it would name are stored.
    let mut c = TestCluster::start(Shape::default())?;
    c.kill_gateway();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let file = c.data_dir().join("cluster.toml");
    let mut cluster: toml::Value = toml::from_str(&std::fs::read_to_string(&file)?)?;
    let ledger = cluster
        .get_mut("gateway")
        .and_then(|g| g.get_mut("ledger"))
        .and_then(|l| l.as_table_mut())
        .context("gateway.ledger")?;
    ledger.insert(
        "tiles_url".into(),
        toml::Value::String("s3://custodia-tiles/ledger".into()),
    );
    ledger.insert("receipt_wait_ms".into(), toml::Value::Integer(1000));
    let mut opts = toml::map::Map::new();
    for (k, v) in [
        ("aws_endpoint", format!("http://127.0.0.1:{closed}")),
        ("aws_allow_http", "true".into()),
        ("aws_skip_signature", "true".into()),
        ("aws_region", "us-east-1".into()),
    ] {
        opts.insert(k.into(), toml::Value::String(v));
    }
    ledger.insert("tiles_options".into(), toml::Value::Table(opts));
    std::fs::write(&file, toml::to_string(&cluster)?)?;
    c.start_gateway()?;
    c.wait_healthy(8)?;
    let data = bytes(3000, 31);
    let filed = c.file(&data)?;
    assert!(
        filed["receipt"].is_null(),
        "no receipt without stored tiles: {filed}"
    );
    let id = filed["id"].as_str().unwrap_or_default().to_string();
    assert_eq!(c.read(&id)?, data, "the filing itself is durable");
    let r = c.get_with(&c.token, &format!("/v1/evidence/{id}/receipt"), &[])?;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (202, Some("receipt_pending"))
    );
    // Nothing signed: the index holds no checkpoint at all.
    let status = status_json(&c)?;
    // A status without the figure proves nothing: that is an error too.
    assert_eq!(
        status["ledger"]["entries"].as_u64(),
        Some(0),
        "no checkpoint signed: {status}"
    );
    // And an auditor asking for a proof is told so, not "no such evidence".
    let proof = c.get_with("", "/v1/ledger/inclusion?index=0&size=1", &[])?;
    assert!(
        proof.status == 400
            && proof.json()["message"].as_str().is_some_and(|m| {
                m.contains("no checkpoint is signed yet")
                    || m.contains("beyond the newest checkpoint (0)")
            }),
        "{}: {}",
        proof.status,
        String::from_utf8_lossy(&proof.body)
    );
    // Tiles stored again (the local directory): the receipt comes.
    c.kill_gateway();
    let mut cluster: toml::Value = toml::from_str(&std::fs::read_to_string(&file)?)?;
    if let Some(l) = cluster
        .get_mut("gateway")
        .and_then(|g| g.get_mut("ledger"))
        .and_then(|l| l.as_table_mut())
    {
        l.remove("tiles_url");
        l.remove("tiles_options");
    }
    std::fs::write(&file, toml::to_string(&cluster)?)?;
    c.start_gateway()?;
    c.wait_healthy(8)?;
    let issued = custodia_tests::eventually(20, || {
        c.get_with(&c.token, &format!("/v1/evidence/{id}/receipt"), &[])
            .is_ok_and(|r| r.status == 200)
    });
    assert!(issued, "the receipt is issued once its tiles are stored");
    Ok(())
}

/// A gateway configured without a ledger says so (503 `unavailable`)
/// wherever a receipt, a proof or the log's key would come from, instead of
/// "pending" for ever or "no such evidence"; and it refuses what is done
/// only on the ledger (an expunge, a hold's release), which would
/// otherwise leave no trace.
#[test]
fn a_gateway_without_a_ledger_says_so() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    let expunger = expunger_token(&mut c)?;
    c.edit_gateway(|g| {
        g.remove("ledger");
        Ok(())
    })?;
    let id = c.file(b"filed where no ledger is kept")?["id"]
        .as_str()
        .context("id")?
        .to_owned();
    for path in [
        format!("/v1/evidence/{id}/receipt"),
        "/v1/ledger/key".to_owned(),
        "/v1/ledger/inclusion?index=0&size=1".to_owned(),
        "/v1/ledger/consistency?old=1&new=2".to_owned(),
    ] {
        let a = c.get_with(&c.token, &path, &[])?;
        assert_eq!(
            (a.status, a.json()["error"].as_str()),
            (503, Some("unavailable")),
            "{path}: {}",
            String::from_utf8_lossy(&a.body)
        );
    }
    let hold = format!("/v1/evidence/{id}/legal-hold");
    let (status, _) = send(&c, "PUT", &c.token, &hold, None)?;
    assert_eq!(status, 200);
    let (status, body) = send(&c, "DELETE", &c.token, &hold, None)?;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("release")),
        "{body}"
    );
    let order = serde_json::json!({ "order": "Order 1" });
    let expunge = format!("/v1/evidence/{id}/expunge");
    let (status, body) = send(&c, "POST", &expunger, &expunge, Some(order))?;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("expunge")),
        "{body}"
    );
    // Still held, still there.
    let a = c.get_with(&c.token, &format!("/v1/evidence/{id}/manifest"), &[])?;
    assert_eq!(
        (a.status, a.json()["legal_hold"].as_bool()),
        (200, Some(true))
    );
    Ok(())
}

/// An expunge order reaches the bytes an S3 UploadPartCopy copied into a
/// multipart upload still open: the part leaves the upload (its Complete is
/// refused, InvalidPart) and its shards are deleted, so the expunged bytes
/// neither stay on the nodes nor come back as a new object.
#[test]
fn an_expunge_drops_the_parts_copied_from_the_evidence() -> Result<()> {
    if !custodia_tests::require(
        "an_expunge_drops_the_parts_copied_from_the_evidence",
        &[Tool::Curl],
    )? {
        return Ok(());
    }
    let mut c = TestCluster::start(Shape::default())?;
    c.set_gateway(&[("gc_interval_ms", toml::Value::Integer(300))])?;
    let expunger = expunger_token(&mut c)?;

    let (h, _) = c.s3_curl("PUT", &format!("{}/copies", c.s3), &[])?;
    ensure!(h.starts_with("http/1.1 200"), "{h}");
    let src = c.data_dir().join("src.bin");
    let data = bytes(30_000, 71);
    std::fs::write(&src, &data)?;
    let (h, _) = c.s3_curl(
        "PUT",
        &format!("{}/copies/src.bin", c.s3),
        &["--data-binary", &format!("@{}", src.display())],
    )?;
    ensure!(h.starts_with("http/1.1 200"), "{h}");
    let source = custodia_tests::header(&h, "x-custodia-evidence-id")
        .context("no evidence id")?
        .to_owned();
    let upload = c.s3_create_upload("copies", "parts.bin")?;
    let (h, body) = c.s3_curl(
        "PUT",
        &format!("{}/copies/parts.bin?partNumber=1&uploadId={upload}", c.s3),
        &["-H", "x-amz-copy-source: copies/src.bin"],
    )?;
    let body = String::from_utf8_lossy(&body).into_owned();
    ensure!(h.starts_with("http/1.1 200"), "{h}{body}");
    let etag = body
        .split("<ETag>")
        .nth(1)
        .and_then(|r| r.split("</ETag>").next())
        .context("no part etag")?
        .replace("&quot;", "\"");
    ensure!(
        !c.all_shard_files().is_empty(),
        "the object and its copied part are on the nodes"
    );

    let (status, body) = expunge(&c, &expunger, &source)?;
    ensure!(status == 200, "expunge: {status} {body}");
    let (h, body) = c.s3_complete("copies", "parts.bin", &upload, &[(1, &etag)])?;
    ensure!(
        h.starts_with("http/1.1 400") && body.contains("<Code>InvalidPart</Code>"),
        "a Complete of a part copied from expunged evidence: {h}{body}"
    );
    let (h, _) = c.s3_curl("HEAD", &format!("{}/copies/parts.bin", c.s3), &[])?;
    ensure!(h.starts_with("http/1.1 404"), "{h}");
    // The part's shards go with the source's.
    let gone = custodia_tests::eventually(20, || c.all_shard_files().is_empty());
    ensure!(
        gone,
        "shards left after the expunge: {:?}",
        c.all_shard_files()
    );
    Ok(())
}

/// The gateway checks that the openings archive covers the ledger from its
/// first leaf to the newest signed checkpoint, and says how many leaves it
/// lacks: a file gone (a bucket's lifecycle rule, an operator's slip) is
/// found then, not when `recover-index` needs it.
#[test]
fn a_gap_in_the_openings_archive_is_found() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    c.edit_ledger(|ledger| {
        ledger.insert(
            "archive_check_interval_ms".into(),
            toml::Value::Integer(1_000),
        );
    })?;
    for i in 0..3u8 {
        c.file(&[i; 100])?;
    }
    let gap = "custodia_ledger_archive_gap_leaves";
    let checked = |c: &TestCluster| {
        c.metric(
            &c.metrics,
            "custodia_ledger_archive_checked_timestamp_seconds",
        )
        .unwrap_or(0.0)
    };
    assert!(
        custodia_tests::eventually(20, || checked(&c) > 0.0),
        "checked"
    );
    assert_eq!(c.metric(&c.metrics, gap)?, 0.0);
    // The archive's first file goes.
    let folder = c.data_dir().join("ledger/openings/0000000");
    let first = std::fs::read_dir(&folder)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("00000000000000000000-"))
        })
        .context("no archive file from leaf 0")?;
    std::fs::remove_file(&first)?;
    assert!(
        custodia_tests::eventually(20, || c.metric(&c.metrics, gap).unwrap_or(0.0) >= 1.0),
        "the gap is said"
    );
    Ok(())
}
