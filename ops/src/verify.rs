//! `custodia verify`: what a court runs, offline, years later, with only the
//! evidence file, its receipt and the log's public key (and any witness keys).
//! Everything it checks is in the `protocol` crate; no server is contacted.

use anyhow::{Context, Result};
use protocol::ledger::{self, Receipt, TreeHash};
use serde_json::{json, Value};
use std::path::Path;

/// Exit status when nothing was verified: a mistake in the command (a path
/// that cannot be read, a key that is not one, checkpoints given in the
/// wrong order), never a verdict on the receipt. A receipt that does not
/// verify exits 1; one that does, 0.
pub const NOTHING_VERIFIED: u8 = 2;

/// The command could not be carried out as given: exits
/// [`NOTHING_VERIFIED`], so a script tells it from a receipt that fails.
#[derive(Debug, thiserror::Error)]
#[error("{0}; nothing was verified")]
pub struct NothingVerified(pub String);

/// Its text may quote the receipt (a parse error names the field's
/// value), so it is escaped as [`shown`] escapes statement fields.
fn nothing_verified(what: String) -> anyhow::Error {
    NothingVerified(shown(&what)).into()
}

/// The most a receipt, a key, a checkpoint or a proof file holds (a
/// statement is at most 64 KiB, a note 1 MB, a proof 128 hashes): a larger
/// file is none of them, and is not read.
const NAMED_FILE_MAX: u64 = 16 << 20;

/// A file the command names (not the evidence), read whole: at most
/// [`NAMED_FILE_MAX`] bytes, or the evidence itself, named in the wrong
/// place, would be read into memory.
fn read_named_bytes(path: &Path) -> Result<Vec<u8>> {
    let cannot =
        |e: std::io::Error| nothing_verified(format!("cannot read {}: {e}", path.display()));
    use std::io::Read as _;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(cannot)?
        .take(NAMED_FILE_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() as u64 > NAMED_FILE_MAX {
        return Err(nothing_verified(format!(
            "{} is larger than any receipt, key, checkpoint or proof ({} MiB at most); \
             is it the evidence? (that goes to --file)",
            path.display(),
            NAMED_FILE_MAX >> 20
        )));
    }
    Ok(bytes)
}

/// [`read_named_bytes`], as text.
fn read_named(path: &Path) -> Result<String> {
    String::from_utf8(read_named_bytes(path)?)
        .map_err(|_| nothing_verified(format!("{} is not text", path.display())))
}

/// A key given as a file holding it, or as the key itself.
pub fn key_arg(arg: &str) -> Result<String> {
    let p = Path::new(arg);
    if p.is_file() {
        Ok(read_named(p)?.trim().to_owned())
    } else {
        Ok(arg.trim().to_owned())
    }
}

/// `--log-key`: a file holding the log's verifier key, or the key itself.
/// Anything else is a mistake in the command, said as such, never a
/// verdict on the receipt.
fn log_key_arg(arg: &str) -> Result<String> {
    checked_key_arg("--log-key", "a log key", arg, |k| {
        protocol::ledger::check_log_key(k).is_ok()
    })
}

/// `--witness-key`: as [`log_key_arg`], for a witness's cosignature key.
fn witness_key_arg(arg: &str) -> Result<String> {
    checked_key_arg("--witness-key", "a witness key", arg, |k| {
        protocol::witness::CosignatureVerifier::new(k).is_ok()
    })
}

fn checked_key_arg(
    flag: &str,
    what: &str,
    arg: &str,
    valid: impl Fn(&str) -> bool,
) -> Result<String> {
    let key = key_arg(arg)?;
    if !valid(&key) {
        return Err(nothing_verified(format!(
            "{flag} {arg:?} is neither a readable key file nor {what} (check the path)"
        )));
    }
    Ok(key)
}

/// Reads a receipt: a receipt JSON, or a saved filing response with a
/// `receipt` field (returned too: its metadata is checked against the
/// statement's).
fn read_receipt(path: &Path) -> Result<(Receipt, Option<Value>)> {
    let bytes = read_named_bytes(path)?;
    // A file that is no receipt at all (arguments swapped, the wrong file)
    // is the command's mistake; one that is a receipt and fails, a verdict.
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|_| nothing_verified(format!("{} is not a receipt (not JSON)", path.display())))?;
    let (value, filing) = match value.get("receipt") {
        Some(r) if !r.is_null() => (r.clone(), Some(value.clone())),
        Some(_) => {
            return Err(nothing_verified(
                "this filing response holds no receipt yet; fetch it from its receipt_url".into(),
            ))
        }
        None => (value, None),
    };
    // JSON but not in a receipt's shape (an API error saved in its place,
    // such as `receipt_pending` in the moments before a checkpoint covers
    // the filing): nothing to verify, so no verdict either.
    let receipt = <Receipt as serde::Deserialize>::deserialize(&value).map_err(|e| {
        let file = path.display();
        match value.get("error") {
            Some(code) => nothing_verified(format!(
                "{file} is not a receipt: the API answered an error ({}{}); fetch the \
                 receipt again (GET /v1/evidence/ID/receipt)",
                code.as_str()
                    .map_or_else(|| code.to_string(), str::to_owned),
                value["message"]
                    .as_str()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            )),
            None => nothing_verified(format!("{file} is not a receipt ({e})")),
        }
    })?;
    Ok((receipt, filing))
}

/// What a saved answer shows beside its receipt, checked against the
/// statement the receipt proves.
#[derive(Debug, Default, PartialEq, Eq)]
struct Beside {
    /// Whether the case, file name, media type and submitter it shows are
    /// what a `filed` statement notarized; `None`: not compared (another
    /// kind of statement, or one that notarized no metadata).
    metadata: Option<bool>,
    /// Why not compared, for a `filed` statement.
    unchecked: Option<&'static str>,
    /// Each way the answer contradicts the statement.
    problems: Vec<String>,
}

/// Checks a saved answer (a filing response, or any answer with a
/// `receipt` field) against the statement its receipt proves. It fails
/// closed: a field the answer shows must be the statement's, and a filing
/// response missing one of the fields its notarized metadata covers (or
/// showing one as something other than text) cannot be vouched for, so it
/// is a problem, not a silence.
fn answer_beside(answer: &Value, statement: &ledger::Statement) -> Beside {
    let mut beside = Beside::default();
    let mut differs = |field: &str, shown: &Value, logged: String| {
        beside.problems.push(format!(
            "the answer beside the receipt shows {field} {shown}; the statement says {logged}"
        ))
    };
    let text_is = |shown: &Value, logged: &str| shown.as_str() == Some(logged);
    if let Some(v) = answer.get("id").filter(|v| !v.is_null()) {
        if !text_is(v, &statement.evidence) {
            differs("id", v, statement.evidence.clone());
        }
    }
    if let Some(v) = answer.get("tenant").filter(|v| !v.is_null()) {
        if !text_is(v, &statement.tenant) {
            differs("tenant", v, statement.tenant.clone());
        }
    }
    if let Some(v) = answer.get("blake3").filter(|v| !v.is_null()) {
        if !v
            .as_str()
            .is_some_and(|h| h.eq_ignore_ascii_case(&statement.blake3))
        {
            differs("BLAKE3", v, statement.blake3.clone());
        }
    }
    if let Some(v) = answer.get("sha256").filter(|v| !v.is_null()) {
        match &statement.sha256 {
            Some(logged) if v.as_str().is_some_and(|h| h.eq_ignore_ascii_case(logged)) => {}
            Some(logged) => differs("SHA-256", v, logged.clone()),
            None => differs("SHA-256", v, "none".into()),
        }
    }
    if let Some(v) = answer.get("size").filter(|v| !v.is_null()) {
        if v.as_u64() != Some(statement.size) {
            differs("size", v, statement.size.to_string());
        }
    }
    // A custody page's event names its statement's kind.
    if let Some(v) = answer.get("kind").filter(|v| !v.is_null()) {
        let logged = serde_json::to_value(statement.kind).unwrap_or(Value::Null);
        if *v != logged {
            differs("kind", v, logged.to_string());
        }
    }
    // A filing answer shows the filing's metadata (or at least its shape:
    // `stripes`); a custody event or a notarization's item shows none.
    const METADATA: [&str; 4] = ["case", "file_name", "media_type", "submitter"];
    let shows_metadata = METADATA.iter().any(|k| answer.get(k).is_some());
    let filing_answer = shows_metadata || answer.get("stripes").is_some();
    if statement.kind != ledger::Kind::Filed {
        // Metadata beside a receipt of another kind (an access, a hash-only
        // notarization of the same bytes) is vouched for by nothing.
        if METADATA
            .iter()
            .any(|k| answer.get(k).is_some_and(|v| !v.is_null()))
        {
            beside.problems.push(format!(
                "the answer beside the receipt shows a filing's case, file name, media type or \
                 submitter, but its receipt is of a {} statement, which notarized none of them",
                serde_json::to_value(statement.kind).unwrap_or(Value::Null)
            ));
        }
        return beside;
    }
    if !filing_answer {
        beside.unchecked = Some("the answer beside the receipt shows no filing metadata");
        return beside;
    }
    let Some(notarized) = statement.metadata_sha256.as_deref() else {
        beside.unchecked = Some("the statement notarized no metadata");
        return beside;
    };
    let mut missing = Vec::new();
    let mut text = |k: &'static str| match answer.get(k) {
        Some(Value::String(s)) => Some(s.as_str()),
        Some(Value::Null) => None,
        _ => {
            missing.push(k);
            None
        }
    };
    let shown = ledger::filing_metadata_sha256(
        text("case"),
        text("file_name"),
        text("media_type"),
        text("submitter"),
    );
    if !missing.is_empty() {
        beside.metadata = Some(false);
        beside.problems.push(format!(
            "the answer beside the receipt lacks {} (or shows it as other than text or null), \
             so its metadata cannot be checked against what the filing notarized",
            missing.join(", ")
        ));
        return beside;
    }
    beside.metadata = Some(shown == notarized);
    if shown != notarized {
        beside.problems.push(
            "the case, file name, media type or submitter beside the receipt are NOT the ones \
             the filing notarized"
                .into(),
        );
    }
    beside
}

pub struct ReceiptArgs<'a> {
    pub receipt: &'a Path,
    pub file: Option<&'a Path>,
    pub log_key: &'a str,
    pub witness_keys: &'a [String],
    pub quorum: Option<usize>,
    /// The TSA certificate (PEM file) to check the time-stamp token with.
    pub tsa_cert: Option<&'a Path>,
    pub json: bool,
}

/// Checks a receipt (and the file); prints the verdict; returns whether
/// everything holds.
pub fn receipt(args: &ReceiptArgs<'_>) -> Result<bool> {
    let log_key = log_key_arg(args.log_key)?;
    let mut witness_keys: Vec<String> = Vec::new();
    for k in args.witness_keys {
        let k = witness_key_arg(k)?;
        // The same witness given twice must not count twice toward a quorum;
        // nor one key under two names (a cosignature does not sign the
        // name, so whoever assembled the receipt could copy one witness's
        // line under the other name).
        let pk = protocol::witness::public_key(&k);
        match witness_keys
            .iter()
            .find(|had| pk.is_some() && protocol::witness::public_key(had) == pk)
        {
            Some(had) if *had == k => {}
            Some(had) => {
                return Err(nothing_verified(format!(
                    "the witness keys {had} and {k} hold the same public key: one witness \
                     under two names counts once, so give it once"
                )))
            }
            None => witness_keys.push(k),
        }
    }
    let quorum = args.quorum.unwrap_or(witness_keys.len());
    if quorum > witness_keys.len() {
        return Err(nothing_verified(format!(
            "--quorum {quorum} is more than the {} witness keys given: no receipt could meet it",
            witness_keys.len()
        )));
    }
    // The TSA certificate is the verifier's input, like the keys: one that
    // is not a certificate says nothing about the receipt.
    let tsa_pem = match args.tsa_cert {
        Some(cert) => {
            let pem = read_named(cert)?;
            if let Err(e) = protocol::tsa::check_cert(&pem) {
                return Err(nothing_verified(format!(
                    "--tsa-cert {} is not a certificate to check time-stamps with ({})",
                    cert.display(),
                    e.0
                )));
            }
            Some(pem)
        }
        None => None,
    };
    let (receipt, filing) = read_receipt(args.receipt)?;
    let mut problems: Vec<String> = Vec::new();
    let logged = receipt.verify(&log_key);
    let (statement, checkpoint) = match &logged {
        Ok(v) => (Some(v.statement.clone()), Some(v.checkpoint.clone())),
        Err(e) => {
            problems.push(format!("not logged: {e}"));
            (None, None)
        }
    };
    // Cosignatures and the time-stamp vouch for the checkpoint; they say
    // nothing about a receipt whose checkpoint or proof does not verify, so
    // they are not even looked at then (an auditor must not read "witnessed"
    // next to a forged checkpoint).
    let witnessed = if logged.is_ok() {
        protocol::witness::cosigned_by(&receipt.checkpoint, &witness_keys)
    } else {
        Vec::new()
    };
    // When each says it cosigned: the checkpoint existed by then.
    let witness_times = if logged.is_ok() {
        protocol::witness::cosigned_times(&receipt.checkpoint, &witness_keys)
    } else {
        Vec::new()
    };
    let quorum_problem = logged.is_ok() && witnessed.len() < quorum;
    if quorum_problem {
        problems.push(format!(
            "witnessed by {} of {} trusted witnesses, {quorum} required",
            witnessed.len(),
            witness_keys.len()
        ));
    }
    // Independent time: the RFC 3161 token over the checkpoint.
    let mut stamped = Value::Null;
    let mut time_stamp_problem = false;
    match (&tsa_pem, &receipt.timestamp) {
        _ if logged.is_err() => {}
        (Some(pem), Some(_)) => match receipt.check_timestamp(pem) {
            Ok(t) => {
                stamped = json!({
                    "gen_time_unix": t,
                    "verified": true,
                    // Custodia's own development TSA signs with the log
                    // operator's clock: nothing independent.
                    "development_tsa": protocol::tsa::is_development_cert(pem),
                })
            }
            Err(e) => {
                time_stamp_problem = true;
                problems.push(format!("time-stamp: {e}"));
            }
        },
        (Some(_), None) => {
            time_stamp_problem = true;
            problems
                .push("time-stamp: this receipt carries no token yet (fetch it again later)".into())
        }
        (None, Some(_)) => {
            stamped = json!({ "verified": false, "note": "not checked: no --tsa-cert" })
        }
        (None, None) => {}
    }
    // The same of the witnesses' times, even the latest of them: a
    // warning, not a verdict (a witness's clock is not audited as a TSA's
    // is, and one slow witness must not fail every receipt).
    let mut warnings: Vec<String> = Vec::new();
    if let (Some(s), Some(t)) = (&statement, witness_times.iter().map(|(_, t)| *t).max()) {
        if let Some(ahead) = seconds_ahead(s.time_ms, t) {
            warnings.push(format!(
                "time: the statement says {}, but the witnesses cosigned the checkpoint holding \
                 it by {}: the log operator's clock ran {} s ahead (the statement's time is not \
                 when it was logged), or every witness's clock is behind",
                rfc3339_ms(s.time_ms),
                rfc3339(t),
                ahead
            ));
        }
    }
    // The statement's time (the operator's clock) against the independent
    // one: a statement is in its checkpoint before the checkpoint is
    // time-stamped, so a statement time well after the token's says the
    // operator's clock ran ahead, and the time the receipt claims is not
    // the filing's. (Custodia's development TSA signs with the operator's
    // own clock: no independent time to hold it to.)
    if let (Some(s), Some(t)) = (
        &statement,
        stamped.get("gen_time_unix").and_then(Value::as_u64),
    ) {
        let ahead = seconds_ahead(s.time_ms, t).filter(|_| stamped["development_tsa"] != true);
        if let Some(ahead) = ahead {
            problems.push(format!(
                "time: the statement says {}, but the checkpoint holding it was time-stamped at \
                 {}: the log operator's clock ran {} s ahead, and the statement's time is not \
                 when it was logged",
                rfc3339_ms(s.time_ms),
                rfc3339(t),
                ahead
            ));
        }
    }
    let mut content = Value::Null;
    if let (Some(path), Ok(v)) = (args.file, &logged) {
        // (Its errors name the path.)
        let (b3, sha, size) = crate::client::hash_file(path)
            .map_err(|e| nothing_verified(format!("cannot check the file: {e:#}")))?;
        // Each difference named: a hash-only notarization's size is what its
        // client declared, so the hashes can match while the size does not.
        let mut differs = Vec::new();
        if v.statement.blake3 != b3.to_hex() {
            differs.push(format!(
                "its BLAKE3 is {}, the statement says {}",
                b3.to_hex(),
                v.statement.blake3
            ));
        }
        if let Some(said) = v.statement.sha256.as_deref().filter(|s| *s != sha.to_hex()) {
            differs.push(format!(
                "its SHA-256 is {}, the statement says {said}",
                sha.to_hex(),
            ));
        }
        if size != v.statement.size {
            differs.push(format!(
                "its size is {size} bytes, the statement says {}",
                v.statement.size
            ));
        }
        // The same check the protocol makes, should it ever check more.
        if differs.is_empty() {
            if let Err(e) = v.check_content(&b3, &sha) {
                differs.push(e.to_string());
            }
        }
        let matches = differs.is_empty();
        if !matches {
            problems.push(format!(
                "{} is NOT the evidence the receipt names ({})",
                path.display(),
                differs.join("; ")
            ));
        }
        // `sha256_checked`: false where the statement names no SHA-256, so
        // `matches` vouches for BLAKE3 and size alone.
        content = json!({ "file": path.display().to_string(), "blake3": b3.to_hex(), "sha256": sha.to_hex(), "sha256_checked": v.statement.sha256.is_some(), "size": size, "matches": matches });
    }
    // A saved filing response shows the filing's metadata beside its
    // receipt: it must be what the statement notarized.
    let beside = match (&filing, &statement) {
        (Some(f), Some(s)) => answer_beside(f, s),
        _ => Beside::default(),
    };
    let metadata = beside.metadata;
    problems.extend(beside.problems.iter().cloned());
    let valid = problems.is_empty();
    if args.json {
        let report = json!({
            "valid": valid,
            "logged": logged.is_ok(),
            "leaf_index": receipt.leaf_index,
            "checkpoint": checkpoint.as_ref().map(|c| json!({ "origin": c.origin, "size": c.size, "root": c.root.to_string() })),
            "witnessed": {
                "by": witnessed,
                "of": witness_keys.len(),
                "quorum": quorum,
                "times_unix": witness_times.iter().map(|(name, t)| json!({ "witness": name, "cosigned_unix": t })).collect::<Vec<_>>(),
            },
            "content": content,
            "metadata_as_filed": metadata,
            "metadata_not_checked": beside.unchecked,
            "time_stamp": stamped,
            "statement": statement,
            "time_note": "the statement's time is the log operator's clock",
            "time_warnings": warnings,
            "problems": problems,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(valid);
    }
    if let (Some(s), Some(cp)) = (&statement, &checkpoint) {
        println!(
            "logged: yes — the {:?} statement for evidence {} is entry {} of log {:?} (checkpoint of {} entries, signature verified)",
            s.kind, shown(&s.evidence), receipt.leaf_index, cp.origin, cp.size
        );
        println!(
            "statement: tenant {}, case {}, {} bytes, BLAKE3 {}, SHA-256 {}",
            shown(&s.tenant),
            s.case.as_deref().map_or("-".into(), shown),
            s.size,
            shown(&s.blake3),
            s.sha256.as_deref().map_or("-".into(), shown)
        );
        println!(
            "time: {} ({} ms after the Unix epoch) by the log operator's clock ({})",
            rfc3339_ms(s.time_ms),
            s.time_ms,
            shown(&s.time_source)
        );
    }
    if logged.is_err() {
        println!("witnessed: not checked (the receipt's checkpoint or proof does not verify)");
        if receipt.timestamp.is_some() {
            println!(
                "time-stamped: not checked (the receipt's checkpoint or proof does not verify)"
            );
        }
    } else {
        println!(
            "witnessed: by {} of {} trusted witnesses (quorum {quorum}){}{}",
            witnessed.len(),
            witness_keys.len(),
            if witnessed.is_empty() { "" } else { ": " },
            witnessed.join(", ")
        );
        for (name, t) in &witness_times {
            println!(
                "  {} cosigned at {} by its clock: the checkpoint existed by then",
                shown(name),
                rfc3339(*t)
            );
        }
    }
    match stamped.get("gen_time_unix").and_then(Value::as_u64) {
        Some(t) if stamped["development_tsa"] == true => println!(
            "time-stamped: {} by Custodia's development TSA, which signs with the log operator's \
             own clock: the token verifies, but proves no time independently of the operator",
            rfc3339(t)
        ),
        Some(t) => println!(
            "time-stamped: the checkpoint existed by {} (RFC 3161 token, verified against the given TSA certificate)",
            rfc3339(t)
        ),
        None if receipt.timestamp.is_some() && logged.is_ok() => {
            println!("time-stamped: token present, not checked (give --tsa-cert)")
        }
        None => {}
    }
    if args.file.is_none() {
        println!("content: not checked (give --file with the evidence)");
    }
    if metadata == Some(true) {
        println!(
            "metadata: the case, file name, media type and submitter beside the receipt are the \
             ones the filing notarized"
        );
    }
    if let Some(why) = beside.unchecked {
        println!("metadata: NOT checked ({why})");
    }
    if let Some(m) = content.get("matches").and_then(Value::as_bool) {
        if m {
            // Only what was compared: a hash-only notarization's statement
            // may name no SHA-256, and then none was checked.
            let checked = match statement.as_ref().and_then(|s| s.sha256.as_ref()) {
                Some(_) => "BLAKE3, SHA-256 and size",
                None => "BLAKE3 and size; the statement names no SHA-256",
            };
            println!(
                "content: {} matches the statement ({checked})",
                args.file
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            );
        }
    }
    for w in &warnings {
        println!("WARNING: {}", shown(w));
    }
    for p in &problems {
        // (A problem may quote the receipt: a decoding error names the
        // value it could not read.)
        println!("INVALID: {}", shown(p));
    }
    // A genuine receipt checked against the wrong file is not a forgery:
    // said so, for whoever reads the verdict alone.
    let only_the_file = problems.len() == 1 && content["matches"] == false;
    // Nor is one whose time-stamp alone cannot be confirmed (no token yet,
    // or a certificate that is not the TSA's): the log still vouches for it.
    let only_the_time_stamp = problems.len() == 1 && time_stamp_problem;
    // Nor one not yet cosigned by enough witnesses (receipts are issued
    // before witnesses cosign, and gain cosignatures when fetched again).
    let only_confirmations = !problems.is_empty()
        && problems.len() == usize::from(quorum_problem) + usize::from(time_stamp_problem)
        && quorum_problem;
    println!(
        "verdict: {}",
        if valid {
            "VALID — this receipt proves the statement above was logged"
        } else if only_the_file {
            "INVALID for this file — the receipt itself verifies, but the file given is not the evidence it names"
        } else if only_the_time_stamp {
            "NOT CONFIRMED — the statement above was logged, but its time-stamp is missing or its token does not verify with the certificate given"
        } else if only_confirmations {
            "NOT CONFIRMED — the statement above was logged, but not yet cosigned by the witnesses required (see above); fetch the receipt again later, it gains cosignatures as witnesses sign"
        } else {
            "INVALID — do not rely on this receipt"
        }
    );
    Ok(valid)
}

/// How far a statement's time may run past its checkpoint's time-stamp
/// before it is called wrong: two clocks, each kept by NTP, differ by less.
const STATEMENT_AHEAD_ALLOWED_MS: u64 = 60_000;

/// How many whole seconds a statement stamped at `statement_ms` runs past
/// an independent time `at` (whole Unix seconds, truncated: so the second
/// after it), if by more than [`STATEMENT_AHEAD_ALLOWED_MS`].
fn seconds_ahead(statement_ms: u64, at: u64) -> Option<u64> {
    let independent_ms = at.saturating_add(1).saturating_mul(1000);
    (statement_ms > independent_ms.saturating_add(STATEMENT_AHEAD_ALLOWED_MS))
        .then(|| (statement_ms - independent_ms) / 1000)
}

/// Text from a receipt as it may be shown on a terminal: control
/// characters (escape sequences) and those that reorder or hide the text
/// around them written as `\u{..}`, so a statement cannot pass off one case
/// name as another to whoever reads the verdict. Every field of the
/// statement goes through it (the log's operator wrote them all), so none
/// can paint a verdict of its own or hide the real one.
fn shown(text: &str) -> String {
    text.chars()
        .map(|c| match c.is_control() || gateway::api::is_deceptive(c) {
            true => format!("\\u{{{:x}}}", c as u32),
            // So that the text `\u{202e}` never reads as the character.
            false if c == '\\' => "\\\\".to_owned(),
            false => c.to_string(),
        })
        .collect()
}

/// A checkpoint from a file holding either a note or a receipt.
fn read_checkpoint(path: &Path, log_key: &str) -> Result<ledger::VerifiedCheckpoint> {
    let text = read_named(path)?;
    let note = if text.trim_start().starts_with('{') {
        read_receipt(path)?.0.checkpoint
    } else {
        text
    };
    ledger::verify_checkpoint(&note, log_key)
        .with_context(|| format!("the checkpoint in {} does not verify", path.display()))
}

/// `custodia verify --consistency OLD NEW --proof P`: checks that NEW extends
/// OLD, OLD signed with `old_key` (the log key before a rotation, or the
/// same as `new_key`).
pub fn consistency(
    old: &Path,
    new: &Path,
    proof: &Path,
    old_key: &str,
    new_key: &str,
) -> Result<bool> {
    let old_key = checked_key_arg("--old-log-key", "a log key", old_key, |k| {
        protocol::ledger::check_log_key(k).is_ok()
    })?;
    let new_key = log_key_arg(new_key)?;
    let old = read_checkpoint(old, &old_key)?;
    let new = read_checkpoint(new, &new_key)?;
    if old.size > new.size {
        return Err(nothing_verified(format!(
            "the first checkpoint ({} entries) is larger than the second ({}): give the older \
             one first (--consistency OLD NEW)",
            old.size, new.size
        )));
    }
    if old.size == 0 {
        // Every tree extends the empty one: with NEW's signature verified,
        // there is nothing more to check, once OLD is the empty tree (a
        // signed size 0 with another root is itself a lie).
        if old.root != ledger::empty_root() || (new.size == 0 && new.root != old.root) {
            println!(
                "verdict: INCONSISTENT — a checkpoint of size 0 whose root is not the empty tree's"
            );
            return Ok(false);
        }
        println!(
            "verdict: CONSISTENT — the checkpoint of {} entries extends the empty log's (log {:?})",
            new.size, new.origin
        );
        return Ok(true);
    }
    // A file that is not a proof at all is the command's mistake (exit 2),
    // not a verdict on the log.
    let text = read_named(proof)?;
    let shown = proof.display();
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| nothing_verified(format!("{shown} is not JSON: {e}")))?;
    let hashes = v["proof"]
        .as_array()
        .ok_or_else(|| nothing_verified(format!("{shown} has no `proof` array")))?
        .iter()
        .map(|h| {
            TreeHash::parse_hash(h.as_str().unwrap_or_default()).map_err(|_| {
                nothing_verified(format!("{shown}: a proof hash is not base64 SHA-256"))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // Two checkpoints of one size need no proof: the same root, or a fork
    // (whatever proof the file holds, once it is one).
    if old.size == new.size {
        if old.root == new.root {
            println!(
                "verdict: CONSISTENT — both checkpoints are of the same {} entries (log {:?})",
                new.size, new.origin
            );
            return Ok(true);
        }
        println!(
            "verdict: INCONSISTENT — two checkpoints of {} entries with different roots: the \
             log forked",
            new.size
        );
        return Ok(false);
    }
    // A proof for other sizes (the log grew between fetching the proof and
    // the checkpoint, a proof saved from another run) fails like a fork
    // would: it is the command's mistake, said so, not a verdict.
    for (name, said, size) in [("old", &v["old"], old.size), ("new", &v["new"], new.size)] {
        if let Some(said) = said.as_u64().filter(|&s| s != size) {
            return Err(nothing_verified(format!(
                "{shown} is a proof for {name}={said}, but that checkpoint has {size} entries: \
                 fetch /v1/ledger/consistency?old={}&new={}",
                old.size, new.size
            )));
        }
    }
    let expected = ledger::consistency_proof_len(old.size, new.size);
    if expected.is_some_and(|n| n != hashes.len()) {
        return Err(nothing_verified(format!(
            "{shown} holds {} hashes, but a proof from {} to {} entries holds {}: it is for \
             other sizes; fetch /v1/ledger/consistency?old={}&new={}",
            hashes.len(),
            old.size,
            new.size,
            expected.unwrap_or_default(),
            old.size,
            new.size
        )));
    }
    match ledger::check_consistency(&old, &new, &hashes) {
        Ok(()) => {
            if old.origin == new.origin {
                println!(
                    "verdict: CONSISTENT — the checkpoint of {} entries extends the one of {} (log {:?})",
                    new.size, old.size, new.origin
                );
            } else {
                println!(
                    "verdict: CONSISTENT — the checkpoint of {} entries (log {:?}) extends the one \
                     of {} signed before the key's rotation (log {:?})",
                    new.size, new.origin, old.size, old.origin
                );
            }
            Ok(true)
        }
        Err(e) => {
            println!("verdict: INCONSISTENT — {e}");
            Ok(false)
        }
    }
}

/// Unix milliseconds as an RFC 3339 UTC time, to the millisecond (a
/// statement's time, which orders filings made within one second).
pub(crate) fn rfc3339_ms(ms: u64) -> String {
    let secs = rfc3339(ms / 1000);
    format!("{}.{:03}Z", secs.trim_end_matches('Z'), ms % 1000)
}

/// Unix seconds as an RFC 3339 UTC time.
fn rfc3339(t: u64) -> String {
    let days = t / 86_400;
    let secs = t % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    /// `custodia verify` passes every known-answer receipt of the protocol
    /// crate (each statement kind; log key, witness cosignature, TSA
    /// token), and fails one whose checkpoint was altered.
    #[test]
    fn the_protocol_vectors_verify() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../protocol/tests/vectors");
        let key = |name: &str| dir.join(name).display().to_string();
        let tsa = dir.join("tsa.pem");
        let witnesses = [key("witness.vkey")];
        let log_key = key("log.vkey");
        let check = |receipt: &std::path::Path| {
            super::receipt(&super::ReceiptArgs {
                receipt,
                file: None,
                log_key: &log_key,
                witness_keys: &witnesses,
                quorum: None,
                tsa_cert: Some(&tsa),
                json: true,
            })
        };
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if !path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("receipt-"))
            {
                continue;
            }
            assert!(check(&path).unwrap(), "{}", path.display());
            seen += 1;
        }
        assert_eq!(seen, 9, "a receipt of each statement kind");
        let scratch = tempfile::tempdir().unwrap();
        let altered = scratch.path().join("altered.json");
        let text = std::fs::read_to_string(dir.join("receipt-filed.json")).unwrap();
        std::fs::write(&altered, text.replacen("\\n9\\n", "\\n10\\n", 1)).unwrap();
        assert_ne!(std::fs::read_to_string(&altered).unwrap(), text);
        assert!(matches!(check(&altered), Ok(false)));
    }

    /// A saved filing answer is vouched for field by field: one that shows
    /// another id, size, BLAKE3 or tenant than its statement, or that lacks
    /// a field the notarized metadata covers, is refused, never passed
    /// over in silence.
    #[test]
    fn an_answer_beside_its_receipt_is_checked_and_fails_closed() {
        use protocol::ledger::{filing_metadata_sha256, Kind, Statement};
        let id = protocol::EvidenceId([7; 16]);
        let b3 = protocol::Blake3Hash([1; 32]);
        let sha = protocol::Sha256Hash([2; 32]);
        let mut s = Statement::new(
            Kind::Filed,
            id,
            &b3,
            Some(&sha),
            42,
            "court",
            Some("Case 7".into()),
            None,
            1,
        );
        s.metadata_sha256 = Some(filing_metadata_sha256(
            Some("Case 7"),
            Some("cam.mp4"),
            None,
            Some("clerk"),
        ));
        let answer = json!({
            "id": id.to_string(), "tenant": "court", "blake3": b3.to_hex(),
            "sha256": sha.to_hex(), "size": 42, "case": "Case 7",
            "file_name": "cam.mp4", "media_type": null, "submitter": "clerk",
        });
        let ok = super::answer_beside(&answer, &s);
        assert_eq!((ok.metadata, ok.problems.len()), (Some(true), 0), "{ok:?}");
        let with = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut a = answer.clone();
            edit(&mut a);
            super::answer_beside(&a, &s)
        };
        // The case changed and the media type removed: refused, by name.
        let b = with(&|a| {
            a["case"] = json!("Case 8");
            a.as_object_mut().unwrap().remove("media_type");
        });
        assert_eq!(b.metadata, Some(false));
        assert!(b.problems[0].contains("lacks media_type"), "{b:?}");
        let b = with(&|a| a["submitter"] = json!(0));
        assert!(b.problems[0].contains("lacks submitter"), "{b:?}");
        let b = with(&|a| a["file_name"] = json!("other.mp4"));
        assert_eq!(b.metadata, Some(false));
        for (field, value) in [
            ("id", json!(protocol::EvidenceId([8; 16]).to_string())),
            ("size", json!(43)),
            ("size", json!("42")),
            ("blake3", json!(protocol::Blake3Hash([3; 32]).to_hex())),
            ("sha256", json!("00")),
            ("tenant", json!("other")),
        ] {
            let b = with(&|a| a[field] = value.clone());
            assert_eq!(b.problems.len(), 1, "{field}: {b:?}");
            assert_eq!(b.metadata, Some(true), "{field}");
        }
        // A statement that notarized no metadata: said to be unchecked.
        s.metadata_sha256 = None;
        let b = super::answer_beside(&answer, &s);
        assert_eq!((b.metadata, b.unchecked.is_some()), (None, true));
        // A custody page's event (a receipt and its kind, no metadata):
        // genuine, its metadata unchecked; another kind than its receipt's
        // is refused.
        s.metadata_sha256 = Some("00".repeat(32));
        let event = json!({"leaf_index": 0, "kind": "filed", "receipt": {}});
        let b = super::answer_beside(&event, &s);
        assert_eq!(
            (b.problems.len(), b.unchecked.is_some()),
            (0, true),
            "{b:?}"
        );
        let b = super::answer_beside(&json!({"kind": "accessed"}), &s);
        assert_eq!(b.problems.len(), 1, "{b:?}");
        // Another kind of statement: only the fields it has are compared.
        s.kind = Kind::LegalHold;
        let b = super::answer_beside(&json!({"id": id.to_string(), "legal_hold": true}), &s);
        assert_eq!(b, super::Beside::default());
        // A filing's metadata beside a receipt of another kind (a forger's
        // swap for an access's or a notarization's receipt) is refused.
        s.kind = Kind::Accessed;
        let b = super::answer_beside(&answer, &s);
        assert!(b.problems.iter().any(|p| p.contains("accessed")), "{b:?}");
    }

    #[test]
    fn receipt_text_is_shown_without_escapes_or_reordering() {
        assert_eq!(super::shown("Case 7"), "Case 7");
        assert_eq!(
            super::shown("a\u{1b}[2Jb\u{202E}c"),
            "a\\u{1b}[2Jb\\u{202e}c"
        );
        // Written out, the escape does not pass for the character.
        assert_eq!(super::shown("b\\u{202e}c"), "b\\\\u{202e}c");
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
        assert_eq!(super::rfc3339(1_795_462_446), "2026-11-23T19:34:06Z");
        assert_eq!(
            super::rfc3339_ms(1_795_462_446_007),
            "2026-11-23T19:34:06.007Z"
        );
    }

    /// A file that is JSON but no receipt verifies nothing (exit 2), and an
    /// API error saved in its place is said to be one.
    #[test]
    fn json_that_is_no_receipt_verifies_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let pending = dir.path().join("pending.json");
        std::fs::write(
            &pending,
            r#"{"error":"receipt_pending","message":"no checkpoint covers it yet"}"#,
        )
        .unwrap();
        let e = super::read_receipt(&pending).unwrap_err();
        assert!(
            e.downcast_ref::<super::NothingVerified>().is_some(),
            "{e:#}"
        );
        let said = e.to_string();
        assert!(
            said.contains("not a receipt")
                && said.contains("the API answered an error (receipt_pending: no checkpoint")
                && said.contains("fetch the receipt again"),
            "{said}"
        );
        let other = dir.path().join("other.json");
        std::fs::write(&other, r#"{"id":"abc","size":3}"#).unwrap();
        let e = super::read_receipt(&other).unwrap_err();
        assert!(
            e.downcast_ref::<super::NothingVerified>().is_some(),
            "{e:#}"
        );
        assert!(e.to_string().contains("is not a receipt"), "{e}");
        assert!(!e.to_string().contains("API answered"), "{e}");
    }

    /// The evidence named as a receipt (or a key, a checkpoint, a proof)
    /// is refused by its size, not read into memory.
    #[test]
    fn a_file_too_large_to_be_a_receipt_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let video = dir.path().join("video.mp4");
        let f = std::fs::File::create(&video).unwrap();
        f.set_len(super::NAMED_FILE_MAX + 1).unwrap();
        for e in [
            super::read_receipt(&video).map(|_| ()).unwrap_err(),
            super::read_named(&video).map(|_| ()).unwrap_err(),
        ] {
            assert!(
                e.downcast_ref::<super::NothingVerified>().is_some(),
                "{e:#}"
            );
            assert!(e.to_string().contains("that goes to --file"), "{e}");
        }
        // At the limit, it is read (and is no receipt).
        f.set_len(super::NAMED_FILE_MAX).unwrap();
        let e = super::read_receipt(&video).map(|_| ()).unwrap_err();
        assert!(e.to_string().contains("is not a receipt"), "{e}");
    }
}
