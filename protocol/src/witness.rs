//! Witness formats: C2SP tlog-cosignature (`cosignature/v1`) keys, signing and
//! verification, and the C2SP tlog-witness `add-checkpoint` request body.
//!
//! A witness cosigns a checkpoint after checking that it is consistent with
//! the last one it cosigned for that log; a verifier then counts, apart from
//! the log's own signature, how many of the witnesses it trusts cosigned.
//! The published `signed_note` crate (0.2) has notes and Ed25519 note keys
//! but not `cosignature/v1`; its `Signer`/`Verifier` traits are open, so the
//! cosignature algorithm plugs in here.

use base64::Engine as _;
use signed_note::{Note, Signer, Verifier, VerifierList};
use tlog_tiles::Hash;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
/// The signature-type byte of `cosignature/v1` keys.
const COSIGNATURE_V1: u8 = 0x04;

/// Why a witness message was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WitnessError {
    #[error("malformed witness key")]
    BadKey,
    #[error("malformed add-checkpoint request: {0}")]
    Malformed(&'static str),
    #[error("cannot cosign: {0}")]
    Cosign(&'static str),
}

/// The message a `cosignature/v1` signs: a header with the time, then the
/// checkpoint text.
fn message(time: u64, text: &[u8]) -> Vec<u8> {
    let mut m = format!("cosignature/v1\ntime {time}\n").into_bytes();
    m.extend_from_slice(text);
    m
}

fn key_id(name: &str, pk: &ed25519_dalek::VerifyingKey) -> u32 {
    let mut k = vec![COSIGNATURE_V1];
    k.extend_from_slice(pk.as_bytes());
    signed_note::key_id(name, &k)
}

/// A witness key pair from a seed: `(signer key, verifier key)` in the
/// signed-note key formats with the `cosignature/v1` type byte.
pub fn witness_keys(name: &str, seed: &[u8; 32]) -> (String, String) {
    let sk = ed25519_dalek::SigningKey::from_bytes(seed);
    let pk = sk.verifying_key();
    let id = key_id(name, &pk);
    let mut s = vec![COSIGNATURE_V1];
    s.extend_from_slice(seed);
    let mut v = vec![COSIGNATURE_V1];
    v.extend_from_slice(pk.as_bytes());
    (
        format!("PRIVATE+KEY+{name}+{id:08x}+{}", B64.encode(s)),
        format!("{name}+{id:08x}+{}", B64.encode(v)),
    )
}

/// The verifier key of a signer key from [`witness_keys`].
pub fn verifier_key_of(signer_key: &str) -> Result<String, WitnessError> {
    let (name, seed) = parse_key(signer_key, true)?;
    Ok(witness_keys(&name, &seed).1)
}

/// Splits `name+id+base64` (or `PRIVATE+KEY+name+id+base64`) and checks the
/// type byte and id.
fn parse_key(key: &str, private: bool) -> Result<(String, [u8; 32]), WitnessError> {
    let rest = if private {
        key.strip_prefix("PRIVATE+KEY+")
            .ok_or(WitnessError::BadKey)?
    } else {
        key
    };
    let mut parts = rest.splitn(3, '+');
    let (Some(name), Some(id), Some(b64)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(WitnessError::BadKey);
    };
    let bytes = B64.decode(b64).map_err(|_| WitnessError::BadKey)?;
    let key: [u8; 32] = bytes
        .strip_prefix(&[COSIGNATURE_V1])
        .and_then(|k| k.try_into().ok())
        .ok_or(WitnessError::BadKey)?;
    let pk = if private {
        ed25519_dalek::SigningKey::from_bytes(&key).verifying_key()
    } else {
        ed25519_dalek::VerifyingKey::from_bytes(&key).map_err(|_| WitnessError::BadKey)?
    };
    if format!("{:08x}", key_id(name, &pk)) != id || !signed_note::is_key_name_valid(name) {
        return Err(WitnessError::BadKey);
    }
    Ok((name.to_owned(), key))
}

/// Signs `cosignature/v1` at a fixed time (seconds since the epoch).
pub struct Cosigner {
    name: String,
    id: u32,
    key: ed25519_dalek::SigningKey,
    time: u64,
}

impl Cosigner {
    pub fn new(signer_key: &str, time: u64) -> Result<Self, WitnessError> {
        let (name, seed) = parse_key(signer_key, true)?;
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        Ok(Cosigner {
            id: key_id(&name, &key.verifying_key()),
            name,
            key,
            time,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Signer for Cosigner {
    fn name(&self) -> &str {
        &self.name
    }
    fn key_id(&self) -> u32 {
        self.id
    }
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        use ed25519_dalek::Signer as _;
        let sig = self.key.sign(&message(self.time, msg));
        let mut out = self.time.to_be_bytes().to_vec();
        out.extend_from_slice(&sig.to_bytes());
        Ok(out)
    }
}

/// The Ed25519 public key a witness's verifier key carries. A
/// `cosignature/v1` message does not sign the witness's name, so one key
/// under two names is one witness: quorums count keys, not names.
pub fn public_key(verifier_key: &str) -> Option<[u8; 32]> {
    parse_key(verifier_key.trim(), false).ok().map(|(_, pk)| pk)
}

/// Verifies `cosignature/v1` signatures of one witness.
pub struct CosignatureVerifier {
    name: String,
    id: u32,
    key: ed25519_dalek::VerifyingKey,
}

impl CosignatureVerifier {
    pub fn new(verifier_key: &str) -> Result<Self, WitnessError> {
        let (name, pk) = parse_key(verifier_key, false)?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&pk).map_err(|_| WitnessError::BadKey)?;
        Ok(CosignatureVerifier {
            id: key_id(&name, &key),
            name,
            key,
        })
    }
}

impl Verifier for CosignatureVerifier {
    fn name(&self) -> &str {
        &self.name
    }
    fn key_id(&self) -> u32 {
        self.id
    }
    fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        let Some((time, sig)) = sig.split_first_chunk::<8>() else {
            return false;
        };
        let time = u64::from_be_bytes(*time);
        let Ok(sig) = <[u8; 64]>::try_from(sig) else {
            return false;
        };
        time <= i64::MAX as u64
            && self
                .key
                .verify_strict(
                    &message(time, msg),
                    &ed25519_dalek::Signature::from_bytes(&sig),
                )
                .is_ok()
    }
}

/// The names of the witnesses (of `witness_keys`) with a valid cosignature
/// on `note`. Keys that do not parse count as absent.
pub fn cosigned_by(note: &str, witness_keys: &[String]) -> Vec<String> {
    let Ok(parsed) = Note::from_bytes(note.as_bytes()) else {
        return Vec::new();
    };
    witness_keys
        .iter()
        .filter_map(|k| {
            let v = CosignatureVerifier::new(k).ok()?;
            let name = v.name.clone();
            parsed
                .verify(&VerifierList::new(vec![Box::new(v)]))
                .ok()
                .map(|_| name)
        })
        .collect()
}

/// Adds signature lines (`— name base64\n`, as a witness returns them) to
/// a signed note: one line per signer (name and key ID), the newest given
/// replacing an older one. A witness cosigns a checkpoint again with a new
/// time (after a gateway restart, say): appended, the lines would pile up
/// past the 100 signatures a note may carry, and receipts would lose every
/// cosignature.
pub fn add_signature_lines(note: &str, lines: &str) -> String {
    let mut out: Vec<String> = note.lines().map(str::to_owned).collect();
    for line in lines.lines().filter(|l| l.starts_with("\u{2014} ")) {
        if out.iter().any(|l| l == line) {
            continue;
        }
        let signer = signer_of(line);
        let same = out
            .iter()
            .position(|l| l.starts_with("\u{2014} ") && signer.is_some() && signer_of(l) == signer);
        match same {
            Some(i) => out[i] = line.to_owned(),
            None => out.push(line.to_owned()),
        }
    }
    let mut text = out.join("\n");
    text.push('\n');
    text
}

/// A signature line's signer: its name and key ID (the first 4 bytes of
/// its signature), as signed-note identifies a key.
fn signer_of(line: &str) -> Option<(&str, [u8; 4])> {
    let (name, sig) = line.strip_prefix("\u{2014} ")?.rsplit_once(' ')?;
    let raw = B64.decode(sig).ok()?;
    Some((name, raw.get(..4)?.try_into().ok()?))
}

/// The signature lines of a witness's `add-checkpoint` response that are
/// valid cosignatures of `note` by `witness_key`, each ending in a newline.
/// Anything else the response carries (other names, other keys, bad
/// signatures, text) is dropped, so a witness can vouch only for itself.
pub fn own_cosignatures(note: &str, lines: &str, witness_key: &str) -> String {
    // As `public_key` reads it: a key pasted with a space or newline is
    // still that key.
    let key = [witness_key.trim().to_owned()];
    let mut out = String::new();
    for line in lines.lines().filter(|l| l.starts_with("\u{2014} ")) {
        let one = add_signature_lines(note, line);
        if !cosigned_by(&one, &key).is_empty() && !out.contains(line) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// When each of `witness_keys` that cosigned `note` says it did: its newest
/// verified line's time, with its name. A witness's cosignature shows the
/// checkpoint existed by then (by the witness's clock).
pub fn cosigned_times(note: &str, witness_keys: &[String]) -> Vec<(String, u64)> {
    let Some((text, signatures)) = note.split_once("\n\n") else {
        return Vec::new();
    };
    let mut out: Vec<(String, u64)> = Vec::new();
    for key in witness_keys {
        let key = [key.clone()];
        let newest = signatures
            .lines()
            .filter(|l| l.starts_with("\u{2014} "))
            .filter(|l| !cosigned_by(&format!("{text}\n\n{l}\n"), &key).is_empty())
            .filter_map(cosignature_time)
            .max();
        if let (Some(t), Some(name)) = (newest, key[0].split('+').next()) {
            out.push((name.to_owned(), t));
        }
    }
    out
}

/// A `cosignature/v1` signature line (`— name base64\n`) over `note`'s
/// text by the witness whose signer key is `signer_key`, dated `time`
/// (seconds since the Unix epoch).
pub fn cosignature_line(signer_key: &str, note: &str, time: u64) -> Result<String, WitnessError> {
    use signed_note::Signer as _;
    let c = Cosigner::new(signer_key, time)?;
    let n =
        Note::from_bytes(note.as_bytes()).map_err(|_| WitnessError::Cosign("not a signed note"))?;
    let sig = c
        .sign(n.text())
        .map_err(|_| WitnessError::Cosign("no signature"))?;
    let line = signed_note::Signature::new(c.name().to_owned(), c.key_id(), sig)
        .map_err(|_| WitnessError::Cosign("no signature"))?;
    String::from_utf8(line.to_bytes()).map_err(|_| WitnessError::Cosign("no signature"))
}

/// The time (seconds since the Unix epoch) a `cosignature/v1` signature
/// line (`— name base64`) says it was made: the 8 big-endian bytes after
/// the 4-byte key id. Only meaningful for a line that verified (as
/// [`own_cosignatures`] returns them).
pub fn cosignature_time(line: &str) -> Option<u64> {
    let rest = line.strip_prefix("\u{2014} ")?;
    let (_, sig) = rest.trim_end().rsplit_once(' ')?;
    let bytes = B64.decode(sig).ok()?;
    if bytes.len() != 4 + 8 + 64 {
        return None;
    }
    let time: [u8; 8] = bytes.get(4..12)?.try_into().ok()?;
    Some(u64::from_be_bytes(time))
}

/// A C2SP tlog-witness `add-checkpoint` request body.
pub fn add_checkpoint_body(old: u64, proof: &[Hash], note: &str) -> String {
    let mut out = format!("old {old}\n");
    for h in proof {
        out.push_str(&h.to_string());
        out.push('\n');
    }
    out.push('\n');
    out.push_str(note);
    out
}

/// Parses an `add-checkpoint` body into `(old size, consistency proof, note)`.
pub fn parse_add_checkpoint(body: &str) -> Result<(u64, Vec<Hash>, String), WitnessError> {
    let (head, note) = body.split_once("\n\n").ok_or(WitnessError::Malformed(
        "no blank line before the checkpoint",
    ))?;
    let mut lines = head.lines();
    let old = lines
        .next()
        .and_then(|l| l.strip_prefix("old "))
        // Digits only (u64's parser also takes a leading `+`), no leading zero.
        .filter(|n| {
            !n.is_empty()
                && n.bytes().all(|b| b.is_ascii_digit())
                && (n == &"0" || !n.starts_with('0'))
        })
        .and_then(|n| n.parse().ok())
        .ok_or(WitnessError::Malformed("first line must be `old <size>`"))?;
    let proof = lines
        .map(|l| Hash::parse_hash(l).map_err(|_| WitnessError::Malformed("bad proof hash")))
        .collect::<Result<Vec<_>, _>>()?;
    if proof.len() > 63 {
        return Err(WitnessError::Malformed("proof too long"));
    }
    Ok((old, proof, note.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{note_keys, sign_checkpoint};

    fn w1v_again() -> String {
        witness_keys("witness.example/w1", &[2; 32]).1
    }

    #[test]
    fn cosignatures_verify_and_are_counted_apart_from_the_log_signature() {
        let (log_s, log_v) = note_keys("example.org/log", &[1; 32]);
        let note = sign_checkpoint(&log_s, "example.org/log", 7, Hash([5; 32])).unwrap();
        let (w1s, w1v) = witness_keys("witness.example/w1", &[2; 32]);
        let (_, w2v) = witness_keys("witness.example/w2", &[3; 32]);
        let mut n = Note::from_bytes(note.as_bytes()).unwrap();
        n.add_sigs(&[&Cosigner::new(&w1s, 1_679_315_147).unwrap()])
            .unwrap();
        let cosigned = String::from_utf8(n.to_bytes()).unwrap();
        // The log signature still verifies with the log key alone.
        crate::ledger::verify_checkpoint(&cosigned, &log_v).unwrap();
        assert_eq!(
            cosigned_by(&cosigned, &[w1v.clone(), w2v.clone()]),
            vec!["witness.example/w1".to_string()]
        );
        // A cosignature moved onto another checkpoint does not count.
        let other = sign_checkpoint(&log_s, "example.org/log", 8, Hash([5; 32])).unwrap();
        let line = cosigned.lines().last().unwrap();
        let moved = add_signature_lines(&other, line);
        assert!(cosigned_by(&moved, &[w1v]).is_empty());
        // From a response, only the witness's own valid lines are kept: not a
        // line in another witness's name, not a forged one, not junk.
        let (w2s, _) = witness_keys("witness.example/w2", &[3; 32]);
        let mut by_w2 = Note::from_bytes(note.as_bytes()).unwrap();
        by_w2
            .add_sigs(&[&Cosigner::new(&w2s, 1_679_315_147).unwrap()])
            .unwrap();
        let by_w2 = String::from_utf8(by_w2.to_bytes()).unwrap();
        let w2_line = by_w2.lines().last().unwrap();
        let forged = format!("\u{2014} witness.example/w1 {}", &line[line.len() - 20..]);
        let response = format!("{w2_line}\n{forged}\njunk\n{line}\n{line}\n");
        assert_eq!(
            own_cosignatures(&note, &response, &w1v_again()),
            format!("{line}\n")
        );
        assert_eq!(own_cosignatures(&note, w2_line, &w1v_again()), "");
        // The key as pasted into a configuration, padded.
        assert_eq!(
            own_cosignatures(&note, line, &format!(" {}\n", w1v_again())),
            format!("{line}\n")
        );
        // The time a cosignature vouches for is read from its line.
        assert_eq!(cosignature_time(line), Some(1_679_315_147));
        assert_eq!(cosignature_time(&forged), None);
        assert_eq!(cosignature_time("junk"), None);
        // Cosigned again later: the newer line replaces the older, one line
        // per witness however often it cosigns; the log's own stays.
        let mut later = Note::from_bytes(note.as_bytes()).unwrap();
        later
            .add_sigs(&[&Cosigner::new(&w1s, 1_679_315_999).unwrap()])
            .unwrap();
        let later = String::from_utf8(later.to_bytes()).unwrap();
        let later_line = later.lines().last().unwrap();
        let mut merged = cosigned.clone();
        for _ in 0..3 {
            merged = add_signature_lines(&merged, later_line);
        }
        merged = add_signature_lines(&merged, w2_line);
        let lines: Vec<&str> = merged
            .lines()
            .filter(|l| l.starts_with('\u{2014}'))
            .collect();
        assert_eq!(lines.len(), 3, "{merged}");
        assert!(lines.contains(&later_line) && lines.contains(&w2_line));
        assert!(!lines.contains(&line));
        crate::ledger::verify_checkpoint(&merged, &log_v).unwrap();
        // Deterministic: same key, time and checkpoint, same bytes.
        let mut again = Note::from_bytes(note.as_bytes()).unwrap();
        again
            .add_sigs(&[&Cosigner::new(&w1s, 1_679_315_147).unwrap()])
            .unwrap();
        assert_eq!(String::from_utf8(again.to_bytes()).unwrap(), cosigned);
    }

    #[test]
    fn witness_keys_parse_and_refuse_the_wrong_type() {
        let (s, v) = witness_keys("w.example/a", &[9; 32]);
        assert!(Cosigner::new(&s, 1).is_ok());
        assert!(CosignatureVerifier::new(&v).is_ok());
        // An Ed25519 note key (type 0x01) is not a cosignature key.
        let (_, log_v) = note_keys("w.example/a", &[9; 32]);
        assert!(CosignatureVerifier::new(&log_v).is_err());
        let tampered = v.replacen("+", "+0", 1);
        assert!(CosignatureVerifier::new(&tampered).is_err());
    }

    #[test]
    fn add_checkpoint_bodies_round_trip() {
        let proof = vec![Hash([1; 32]), Hash([2; 32])];
        let note = "example.org/log\n7\nBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQU=\n\n\u{2014} example.org/log abc=\n";
        let body = add_checkpoint_body(5, &proof, note);
        assert!(body.starts_with("old 5\n"));
        assert_eq!(
            parse_add_checkpoint(&body).unwrap(),
            (5, proof, note.to_owned())
        );
        for bad in [
            "old 05\n\nx",
            "old +5\n\nx",
            "new 5\n\nx",
            "old 5\nnot-base64\n\nx",
            "old 5\n",
        ] {
            assert!(parse_add_checkpoint(bad).is_err(), "{bad:?}");
        }
    }
}
