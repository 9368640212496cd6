//! Known-answer receipts: `tests/vectors/` holds a receipt of every
//! statement kind, from one log of nine entries whose checkpoint a witness
//! cosigned and a time-stamping authority stamped, with the keys and the
//! certificate they verify under (see its README). This test builds them
//! again from the same fixed inputs and requires the same bytes, so that a
//! change to how statements, commitments, leaves, checkpoints, proofs or
//! cosignatures are written cannot pass unnoticed (receipts already handed
//! to courts must keep verifying); and it verifies the stored ones as a
//! verifier written from the formats alone would, to the verdicts
//! `expected.json` states.
//!
//! `CUSTODIA_BLESS_VECTORS=1 cargo test -p protocol --features tsa-server
//! --test receipt_vectors` writes them anew (a new TSA key and token: ECDSA
//! signatures are not deterministic); only for a deliberate format change.
use protocol::ledger::{
    commitment, filing_metadata_sha256, note_keys, sign_checkpoint, Kind, Provenance, Receipt,
    Statement, STATEMENT_V1,
};
use protocol::witness::{add_signature_lines, cosignature_line, cosigned_times, witness_keys};
use protocol::{Blake3Hash, EvidenceId, Sha256Hash};
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use tlog_tiles::{prove_record, stored_hash_index, stored_hashes, tree_hash, Hash, HashReader};

const ORIGIN: &str = "custodia.example/vectors";
const WITNESS: &str = "witness.example/w1";
/// When the witness says it cosigned (seconds since the epoch).
const COSIGNED_AT: u64 = 1_796_000_100;
const KINDS: [Kind; 9] = Kind::ALL;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn kind_name(kind: Kind) -> String {
    serde_json::to_value(kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Entry `i` of the log: a statement of kind `KINDS[i]`, the optional
/// fields each kind carries in practice filled in.
fn statement(i: usize) -> Statement {
    let kind = KINDS[i];
    let n = i as u8 + 1;
    let content = format!("evidence {i}");
    let mut s = Statement::new(
        kind,
        EvidenceId::new(1_796_000_000_000 + i as u64, [n; 10]),
        &Blake3Hash::of(content.as_bytes()),
        Some(&Sha256Hash(sha2_256(content.as_bytes()))),
        content.len() as u64,
        "district-court",
        Some("2026-CR-0042".into()),
        Some(format!(
            "district-court/clerk/token:{n:02x}{n:02x}{n:02x}{n:02x}"
        )),
        1_796_000_000_000 + 1_000 * i as u64,
    );
    match kind {
        Kind::Filed => {
            s.metadata_sha256 = Some(filing_metadata_sha256(
                Some("2026-CR-0042"),
                Some("Beweis_M\u{fc}ller.mp4"),
                Some("video/mp4"),
                Some("J. Doe"),
            ));
            s.provenance = Provenance {
                source_device: Some("bodycam 7 (serial 0042)".into()),
                capture_time: Some("2026-11-29T22:14:05Z".into()),
                capture_method: Some("on-device export".into()),
                prior_custody: None,
            };
        }
        // A hash-only notarization: no bytes kept, so no SHA-256 of them.
        Kind::Notarized => s.sha256 = None,
        Kind::Admin => s.case = None,
        _ => {}
    }
    assert_eq!(s.v, STATEMENT_V1);
    s
}

fn sha2_256(data: &[u8]) -> [u8; 32] {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .try_into()
        .unwrap_or([0; 32])
}

fn salt(i: usize) -> [u8; 32] {
    [0x10 + i as u8; 32]
}

#[derive(Default)]
struct Tree(RefCell<Vec<Hash>>);

impl HashReader for Tree {
    fn read_hashes(&self, idx: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        let v = self.0.borrow();
        idx.iter()
            .map(|&i| {
                v.get(i as usize)
                    .copied()
                    .ok_or(tlog_tiles::Error::IndexesNotInTree)
            })
            .collect()
    }
}

/// The receipts, without time-stamp tokens, and the keys: (log verifier
/// key, witness verifier key, receipts in entry order).
fn build() -> (String, String, Vec<Receipt>) {
    let (log_skey, log_vkey) = note_keys(ORIGIN, &[0x11; 32]);
    let (witness_skey, witness_vkey) = witness_keys(WITNESS, &[0x22; 32]);
    let tree = Tree::default();
    let mut openings = Vec::new();
    for i in 0..KINDS.len() {
        let bytes = statement(i).encode().expect("statement encodes");
        let hashes =
            stored_hashes(i as u64, &commitment(&salt(i), &bytes), &tree).expect("stored hashes");
        assert_eq!(tree.0.borrow().len() as u64, stored_hash_index(0, i as u64));
        tree.0.borrow_mut().extend(hashes);
        openings.push(bytes);
    }
    let size = KINDS.len() as u64;
    let root = tree_hash(size, &tree).expect("tree hash");
    let note = sign_checkpoint(&log_skey, ORIGIN, size, root).expect("signed");
    let line = cosignature_line(&witness_skey, &note, COSIGNED_AT).expect("cosigned");
    let note = add_signature_lines(&note, &line);
    let receipts = openings
        .iter()
        .enumerate()
        .map(|(i, bytes)| {
            let proof = prove_record(size, i as u64, &tree).expect("proof");
            Receipt::new(bytes, &salt(i), i as u64, &note, &proof)
        })
        .collect();
    (log_vkey, witness_vkey, receipts)
}

fn receipt_file(kind: Kind) -> PathBuf {
    dir().join(format!("receipt-{}.json", kind_name(kind)))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (CUSTODIA_BLESS_VECTORS=1 writes it)",
            path.display()
        )
    })
}

#[test]
fn stored_receipts_are_rebuilt_byte_for_byte_and_verify() {
    if std::env::var_os("CUSTODIA_BLESS_VECTORS").is_some_and(|v| v == "1") {
        bless();
    }
    let (log_vkey, witness_vkey, built) = build();
    assert_eq!(read(&dir().join("log.vkey")).trim(), log_vkey);
    assert_eq!(read(&dir().join("witness.vkey")).trim(), witness_vkey);
    let tsa_cert = read(&dir().join("tsa.pem"));
    let expected: serde_json::Value =
        serde_json::from_str(&read(&dir().join("expected.json"))).expect("expected.json");
    let stamped_at = expected["timestamp_gen_time"].as_u64().expect("gen time");
    for (i, mut rebuilt) in built.into_iter().enumerate() {
        let kind = KINDS[i];
        let text = read(&receipt_file(kind));
        let stored: Receipt = serde_json::from_str(&text).expect("a receipt");
        // The token is the TSA's (not rebuilt); everything else must be
        // the very bytes.
        rebuilt.timestamp = stored.timestamp.clone();
        assert_eq!(
            stored, rebuilt,
            "{kind:?}: the receipt is not rebuilt as stored"
        );
        assert_eq!(
            text,
            serde_json::to_string_pretty(&rebuilt).expect("json") + "\n",
            "{kind:?}: not written as stored"
        );
        // Verified as a verifier would: log key, commitment, inclusion,
        // tlog-proof text; the statement the expected file states.
        let v = stored.verify(&log_vkey).expect("verifies");
        let want = &expected["receipts"][i];
        assert_eq!(want["kind"], kind_name(kind));
        assert_eq!(v.leaf_index, want["leaf_index"].as_u64().expect("index"));
        assert_eq!(
            serde_json::to_value(&v.statement).expect("json"),
            want["statement"],
            "{kind:?}"
        );
        assert_eq!(v.checkpoint.size, KINDS.len() as u64);
        assert_eq!(v.checkpoint.origin, ORIGIN);
        assert_eq!(
            cosigned_times(&stored.checkpoint, std::slice::from_ref(&witness_vkey)),
            [(WITNESS.to_owned(), COSIGNED_AT)]
        );
        assert_eq!(
            stored.check_timestamp(&tsa_cert),
            Ok(stamped_at),
            "{kind:?}"
        );
        // And a change to any part no longer verifies: the statement, the
        // salt, a proof hash, the checkpoint, the time-stamp token.
        let mut forged = stored.clone();
        let mut s = v.statement.clone();
        s.size += 1;
        forged.statement = base64_of(&s.encode().expect("encodes"));
        assert!(
            forged.verify(&log_vkey).is_err(),
            "{kind:?}: a forged statement verified"
        );
        let mut forged = stored.clone();
        forged.salt = forged.salt.replacen('1', "2", 1);
        assert!(
            forged.verify(&log_vkey).is_err(),
            "{kind:?}: another salt verified"
        );
        let mut forged = stored.clone();
        forged.inclusion_proof[0] = base64_of(&[7; 32]);
        assert!(
            forged.verify(&log_vkey).is_err(),
            "{kind:?}: another proof verified"
        );
        let mut forged = stored.clone();
        forged.checkpoint = forged.checkpoint.replacen("\n9\n", "\n10\n", 1);
        assert!(
            forged.verify(&log_vkey).is_err(),
            "{kind:?}: another checkpoint verified"
        );
        let mut forged = stored.clone();
        let token = forged.timestamp.as_deref().expect("a token");
        let mut der = base64_decode(token);
        let last = der.len() - 1;
        der[last] ^= 1;
        forged.timestamp = Some(base64_of(&der));
        assert!(
            forged.check_timestamp(&tsa_cert).is_err(),
            "{kind:?}: an altered token verified"
        );
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("base64")
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Writes the vectors anew, with a new TSA and token.
#[cfg(feature = "tsa-server")]
fn bless() {
    use protocol::ledger::checkpoint_text_sha256;
    use protocol::tsa;
    let (log_vkey, witness_vkey, receipts) = build();
    let (cert, key) = tsa::make_tsa("Custodia test vectors TSA").expect("a TSA");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let note = &receipts[0].checkpoint;
    let req = tsa::request(checkpoint_text_sha256(note), 42);
    let token = base64_of(&tsa::timestamp(&req, &cert, &key, now).expect("stamped"));
    std::fs::create_dir_all(dir()).expect("vectors dir");
    std::fs::write(dir().join("log.vkey"), format!("{log_vkey}\n")).expect("write");
    std::fs::write(dir().join("witness.vkey"), format!("{witness_vkey}\n")).expect("write");
    std::fs::write(dir().join("tsa.pem"), &cert).expect("write");
    let mut expected = Vec::new();
    for (i, mut r) in receipts.into_iter().enumerate() {
        r.timestamp = Some(token.clone());
        let text = serde_json::to_string_pretty(&r).expect("json") + "\n";
        std::fs::write(receipt_file(KINDS[i]), text).expect("write");
        expected.push(serde_json::json!({
            "kind": kind_name(KINDS[i]),
            "leaf_index": i,
            "statement": statement(i),
        }));
    }
    let expected = serde_json::json!({
        "origin": ORIGIN,
        "checkpoint_size": KINDS.len(),
        "witness": WITNESS,
        "cosigned_at": COSIGNED_AT,
        "timestamp_gen_time": now,
        "receipts": expected,
    });
    std::fs::write(
        dir().join("expected.json"),
        serde_json::to_string_pretty(&expected).expect("json") + "\n",
    )
    .expect("write");
}

#[cfg(not(feature = "tsa-server"))]
fn bless() {
    panic!("blessing the vectors needs --features tsa-server (a TSA to stamp them)");
}
