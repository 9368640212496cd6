//! The notarization ledger's formats: statements, salted commitments, receipts
//! and their offline verification.
//!
//! The ledger is a C2SP transparency log: RFC 9162 tree hashing (SHA-256),
//! checkpoints per C2SP tlog-checkpoint as C2SP signed notes (Ed25519), tiles
//! per C2SP tlog-tiles. Tree hashing, proofs, tiles and checkpoints come from
//! Cloudflare's `tlog_tiles`, notes and Ed25519 note keys from `signed_note`;
//! this module adds what those crates do not have: the C2SP tile path names
//! (`tile/<L>/...`, `tile/entries/...`), entry bundles, the C2SP tlog-proof
//! text form, and Custodia's statements and receipts.
//!
//! **Privacy.** A log entry is a 32-byte salted commitment,
//! `SHA-256(salt || statement)` with a fresh 32-byte random salt, so the public
//! tiles reveal neither cases, names nor which file was filed. The receipt
//! carries the opening (statement and salt); whoever holds it can prove exactly
//! what it says. The RFC 9162 leaf hash is `SHA-256(0x00 || commitment)`.
//!
//! **Time.** A statement's `time_ms` is the operator's clock, and every
//! statement says so in `time_source`.

use crate::{Blake3Hash, EvidenceId, Sha256Hash};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use signed_note::{Note, Verifier as _, VerifierList};
use tlog_tiles::{Checkpoint, Hash, Tile};

pub use tlog_tiles::Hash as TreeHash;

/// Largest canonical statement, in bytes.
pub const MAX_STATEMENT: usize = 64 * 1024;
/// Statement format version.
pub const STATEMENT_V1: u32 = 1;
/// Receipt format version.
pub const RECEIPT_V1: u32 = 1;
/// C2SP tlog-tiles tile height (256 hashes per tile).
pub const TILE_HEIGHT: u8 = 8;
/// What `time_source` says: the statement's time is the operator's clock.
pub const OPERATOR_CLOCK: &str = "operator-clock";

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// What happened to a piece of evidence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Filed,
    Notarized,
    Accessed,
    LegalHold,
    Released,
    Expunged,
    Repaired,
    Lost,
    Admin,
}

impl Kind {
    /// Every kind, in the order they are declared.
    pub const ALL: [Kind; 9] = [
        Kind::Filed,
        Kind::Notarized,
        Kind::Accessed,
        Kind::LegalHold,
        Kind::Released,
        Kind::Expunged,
        Kind::Repaired,
        Kind::Lost,
        Kind::Admin,
    ];
}

/// Where the evidence came from, as the filer declares it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture_method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prior_custody: Option<String>,
}

impl Provenance {
    pub fn is_empty(&self) -> bool {
        *self == Provenance::default()
    }
}

/// One ledger statement. Its canonical encoding is the compact JSON that
/// [`Statement::encode`] writes (fields in this order); the receipt carries
/// those exact bytes, so a verifier never re-encodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Statement {
    pub v: u32,
    pub kind: Kind,
    pub evidence: String,
    /// BLAKE3 content root, hex.
    pub blake3: String,
    /// SHA-256 of the content, hex (a hash-only notarization may lack it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    pub size: u64,
    pub tenant: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub case: Option<String>,
    /// Who acted (submitter, reader, officer of the court).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Milliseconds since the Unix epoch on the operator's clock.
    pub time_ms: u64,
    /// Always [`OPERATOR_CLOCK`]: independent time comes from witness
    /// cosignatures and RFC 3161 tokens over checkpoints.
    pub time_source: String,
    /// SHA-256 (hex) of the filing's metadata (file name, media type, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Provenance::is_empty")]
    pub provenance: Provenance,
}

/// Why a statement or receipt was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LedgerError {
    #[error("statement larger than {MAX_STATEMENT} bytes")]
    StatementTooLarge,
    #[error("statement is not valid: {0}")]
    BadStatement(String),
    #[error("unsupported version {0}")]
    Version(u32),
    #[error("receipt is malformed: {0}")]
    Malformed(&'static str),
    #[error("checkpoint signature does not verify with the log key")]
    BadSignature,
    #[error("log key is malformed")]
    BadKey,
    #[error("checkpoint is for origin {found:?}, expected {expected:?}")]
    WrongOrigin { expected: String, found: String },
    #[error("inclusion proof does not lead to the checkpoint's root")]
    NotIncluded,
    #[error("consistency proof does not connect the two checkpoints")]
    Inconsistent,
    #[error("the content does not match the statement's {0}")]
    ContentMismatch(&'static str),
    #[error("time-stamp token: {0}")]
    Timestamp(String),
}

/// The bytes a `filed` statement's `metadata_sha256` is the SHA-256 of:
/// the filing's case, file name, media type and submitter as compact JSON,
/// in that (alphabetical) order, each a JSON string (escaped as
/// `serde_json` writes strings) or `null`:
/// `{"case":"C-17","file_name":"scene.mp4","media_type":null,"submitter":"J. Doe"}`.
/// So anyone holding the filing's metadata can check it is what was
/// notarized.
pub fn filing_metadata(
    case: Option<&str>,
    file_name: Option<&str>,
    media_type: Option<&str>,
    submitter: Option<&str>,
) -> String {
    let field = |v: Option<&str>| match v {
        // Serialising a string cannot fail.
        Some(s) => serde_json::to_string(s).unwrap_or_else(|_| "null".into()),
        None => "null".into(),
    };
    format!(
        "{{\"case\":{},\"file_name\":{},\"media_type\":{},\"submitter\":{}}}",
        field(case),
        field(file_name),
        field(media_type),
        field(submitter)
    )
}

/// The SHA-256 (hex) of [`filing_metadata`].
pub fn filing_metadata_sha256(
    case: Option<&str>,
    file_name: Option<&str>,
    media_type: Option<&str>,
    submitter: Option<&str>,
) -> String {
    hex::encode(Sha256::digest(
        filing_metadata(case, file_name, media_type, submitter).as_bytes(),
    ))
}

/// SHA-256 of a checkpoint note's text (what a time-stamp token covers: the
/// checkpoint itself, not the signature lines that accumulate under it).
pub fn checkpoint_text_sha256(note: &str) -> [u8; 32] {
    let text = match note.find("\n\n") {
        Some(i) => &note[..=i],
        None => note,
    };
    Sha256::digest(text.as_bytes()).into()
}

impl Statement {
    /// A `filed`/`notarized` statement for content with these roots.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kind: Kind,
        evidence: EvidenceId,
        blake3: &Blake3Hash,
        sha256: Option<&Sha256Hash>,
        size: u64,
        tenant: &str,
        case: Option<String>,
        actor: Option<String>,
        time_ms: u64,
    ) -> Self {
        Statement {
            v: STATEMENT_V1,
            kind,
            evidence: evidence.to_string(),
            blake3: blake3.to_hex(),
            sha256: sha256.map(Sha256Hash::to_hex),
            size,
            tenant: tenant.to_owned(),
            case,
            actor,
            time_ms,
            time_source: OPERATOR_CLOCK.to_owned(),
            metadata_sha256: None,
            provenance: Provenance::default(),
        }
    }

    /// The canonical bytes.
    pub fn encode(&self) -> Result<Vec<u8>, LedgerError> {
        let bytes =
            serde_json::to_vec(self).map_err(|e| LedgerError::BadStatement(e.to_string()))?;
        if bytes.len() > MAX_STATEMENT {
            return Err(LedgerError::StatementTooLarge);
        }
        Ok(bytes)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, LedgerError> {
        if bytes.len() > MAX_STATEMENT {
            return Err(LedgerError::StatementTooLarge);
        }
        let s: Statement =
            serde_json::from_slice(bytes).map_err(|e| LedgerError::BadStatement(e.to_string()))?;
        if s.v != STATEMENT_V1 {
            return Err(LedgerError::Version(s.v));
        }
        Ok(s)
    }
}

/// The log entry for a statement: `SHA-256(salt || statement)`.
pub fn commitment(salt: &[u8; 32], statement: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(statement);
    h.finalize().into()
}

/// The root of the empty tree: SHA-256 of nothing (RFC 9162 §2.1.1).
pub fn empty_root() -> Hash {
    Hash(Sha256::digest(b"").into())
}

/// The RFC 9162 leaf hash of a log entry.
pub fn leaf_hash(entry: &[u8]) -> Hash {
    tlog_tiles::record_hash(entry)
}

/// The C2SP tlog-tiles path of a tile (`tile/0/x001/234`, `tile/entries/...`,
/// with `.p/<W>` for partial tiles). `tlog_tiles` names tiles the Go sumdb way
/// (`tile/8/0/...`, `tile/8/data/...`).
pub fn tile_path(tile: &Tile) -> String {
    let sumdb = tile.path();
    let prefix = format!("tile/{}/", tile.height());
    let rest = sumdb.strip_prefix(&prefix).unwrap_or(&sumdb);
    match rest.strip_prefix("data/") {
        Some(r) => format!("tile/entries/{r}"),
        None => format!("tile/{rest}"),
    }
}

/// A C2SP tlog-tiles entry bundle: each entry as a big-endian u16 length and
/// its bytes.
pub fn entry_bundle<'a>(entries: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let len = u16::try_from(e.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&e[..len as usize]);
    }
    out
}

/// Splits an entry bundle back into entries.
pub fn parse_entry_bundle(mut bytes: &[u8]) -> Result<Vec<&[u8]>, LedgerError> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let [a, b, rest @ ..] = bytes else {
            return Err(LedgerError::Malformed("truncated entry bundle"));
        };
        let len = u16::from_be_bytes([*a, *b]) as usize;
        if rest.len() < len {
            return Err(LedgerError::Malformed("truncated entry bundle"));
        }
        out.push(&rest[..len]);
        bytes = &rest[len..];
    }
    Ok(out)
}

/// The C2SP tlog-proof text form of an inclusion proof.
pub fn tlog_proof_text(index: u64, proof: &[Hash], checkpoint_note: &str) -> String {
    let mut out = String::from("c2sp.org/tlog-proof@v1\n");
    out.push_str(&format!("index {index}\n"));
    for h in proof {
        out.push_str(&h.to_string());
        out.push('\n');
    }
    out.push('\n');
    out.push_str(checkpoint_note);
    out
}

/// Whether `origin` can name a log: it is the checkpoint's first line
/// (C2SP tlog-checkpoint) and the signed-note key's name, so one word
/// without `+`. A log under another origin could never sign a checkpoint.
pub fn origin_is_valid(origin: &str) -> bool {
    signed_note::is_key_name_valid(origin)
}

/// An Ed25519 log key in the C2SP signed-note formats, from a 32-byte seed:
/// `(signer key "PRIVATE+KEY+<name>+<id>+<b64>", verifier key "<name>+<id>+<b64>")`.
pub fn note_keys(name: &str, seed: &[u8; 32]) -> (String, String) {
    let sk = ed25519_dalek::SigningKey::from_bytes(seed);
    let vkey = signed_note::new_ed25519_verifier_key(name, &sk.verifying_key());
    let mut pk = vec![0x01];
    pk.extend_from_slice(sk.verifying_key().as_bytes());
    let id = signed_note::key_id(name, &pk);
    let mut sk_bytes = vec![0x01];
    sk_bytes.extend_from_slice(seed);
    let skey = format!("PRIVATE+KEY+{name}+{id:08x}+{}", B64.encode(sk_bytes));
    (skey, vkey)
}

/// Signs a checkpoint for `(size, root)` with a signer key from [`note_keys`].
pub fn sign_checkpoint(
    skey: &str,
    origin: &str,
    size: u64,
    root: Hash,
) -> Result<String, LedgerError> {
    let signer = signed_note::StandardSigner::new(skey).map_err(|_| LedgerError::BadKey)?;
    let cp = Checkpoint::new(origin, size, root, "")
        .map_err(|_| LedgerError::Malformed("checkpoint"))?;
    let mut note =
        Note::new(&cp.to_bytes(), &[]).map_err(|_| LedgerError::Malformed("checkpoint note"))?;
    note.add_sigs(&[&signer]).map_err(|_| LedgerError::BadKey)?;
    String::from_utf8(note.to_bytes()).map_err(|_| LedgerError::Malformed("checkpoint note"))
}

/// A checkpoint whose log signature verified.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifiedCheckpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
}

/// Checks that `vkey` is a log verifier key (a signed-note Ed25519 key).
pub fn check_log_key(vkey: &str) -> Result<(), LedgerError> {
    signed_note::StandardVerifier::new(vkey)
        .map(|_| ())
        .map_err(|_| LedgerError::BadKey)
}

/// Verifies a checkpoint note's signature by the log key `vkey` and parses it.
pub fn verify_checkpoint(note: &str, vkey: &str) -> Result<VerifiedCheckpoint, LedgerError> {
    let verifier = signed_note::StandardVerifier::new(vkey).map_err(|_| LedgerError::BadKey)?;
    let origin = verifier.name().to_owned();
    let note =
        Note::from_bytes(note.as_bytes()).map_err(|_| LedgerError::Malformed("checkpoint note"))?;
    note.verify(&VerifierList::new(vec![Box::new(verifier)]))
        .map_err(|_| LedgerError::BadSignature)?;
    let cp =
        Checkpoint::from_bytes(note.text()).map_err(|_| LedgerError::Malformed("checkpoint"))?;
    if cp.origin() != origin {
        return Err(LedgerError::WrongOrigin {
            expected: origin,
            found: cp.origin().to_owned(),
        });
    }
    Ok(VerifiedCheckpoint {
        origin,
        size: cp.size(),
        root: *cp.hash(),
    })
}

/// Proof that a statement is in the log, verifiable offline with only the
/// log's public key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    pub version: u32,
    /// The canonical statement bytes, base64.
    pub statement: String,
    /// The commitment's 32-byte salt, hex.
    pub salt: String,
    pub leaf_index: u64,
    /// The signed checkpoint note (with any cosignatures) the proof leads to.
    pub checkpoint: String,
    /// Inclusion proof hashes, base64, leaf's sibling first (RFC 9162).
    pub inclusion_proof: Vec<String>,
    /// The same proof in C2SP tlog-proof text form.
    pub tlog_proof: String,
    /// A reminder for readers: the statement's time is the operator's clock.
    pub time_note: String,
    /// An RFC 3161 TimeStampResp (DER, base64) from an independent TSA over
    /// the checkpoint's text: the tree, and so the statement, existed by its
    /// genTime. Added once a token for this checkpoint is at hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
}

/// What a verified receipt establishes.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifiedReceipt {
    pub statement: Statement,
    pub checkpoint: VerifiedCheckpoint,
    pub leaf_index: u64,
}

impl Receipt {
    /// Builds a receipt from the opening, the leaf index, a signed checkpoint
    /// covering it and the inclusion proof against that checkpoint.
    pub fn new(
        statement: &[u8],
        salt: &[u8; 32],
        leaf_index: u64,
        checkpoint: &str,
        proof: &[Hash],
    ) -> Self {
        Receipt {
            version: RECEIPT_V1,
            statement: B64.encode(statement),
            salt: hex::encode(salt),
            leaf_index,
            checkpoint: checkpoint.to_owned(),
            inclusion_proof: proof.iter().map(|h| h.to_string()).collect(),
            tlog_proof: tlog_proof_text(leaf_index, proof, checkpoint),
            time_note: "statement time is the log operator's clock".to_owned(),
            timestamp: None,
        }
    }

    /// Checks the RFC 3161 token against the checkpoint it names and the TSA
    /// certificate `tsa_cert_pem`; returns its genTime (Unix seconds).
    pub fn check_timestamp(&self, tsa_cert_pem: &str) -> Result<u64, LedgerError> {
        let token = self.timestamp.as_ref().ok_or(LedgerError::Malformed(
            "the receipt carries no time-stamp token",
        ))?;
        let der = B64
            .decode(token)
            .map_err(|_| LedgerError::Malformed("time-stamp token is not base64"))?;
        crate::tsa::verify_response(
            &der,
            &checkpoint_text_sha256(&self.checkpoint),
            None,
            tsa_cert_pem,
        )
        .map_err(|e| LedgerError::Timestamp(e.0))
    }

    /// Checks everything a court needs, offline: the checkpoint's signature by
    /// the log key `vkey`, the statement's commitment and leaf hash, and the
    /// inclusion proof to the checkpoint's root; and that the C2SP tlog-proof
    /// text says the same as the structured fields (a tool reading either
    /// must reach the same verdict).
    pub fn verify(&self, vkey: &str) -> Result<VerifiedReceipt, LedgerError> {
        if self.version != RECEIPT_V1 {
            return Err(LedgerError::Version(self.version));
        }
        // A tree of up to 2^64 leaves needs at most 64 proof hashes.
        if self.inclusion_proof.len() > 64 {
            return Err(LedgerError::Malformed("inclusion proof too long"));
        }
        let checkpoint = verify_checkpoint(&self.checkpoint, vkey)?;
        let statement_bytes = B64
            .decode(&self.statement)
            .map_err(|_| LedgerError::Malformed("statement is not base64"))?;
        let statement = Statement::decode(&statement_bytes)?;
        let salt: [u8; 32] = hex::decode(&self.salt)
            .ok()
            .and_then(|s| s.try_into().ok())
            .ok_or(LedgerError::Malformed("salt is not 32 bytes of hex"))?;
        let proof = self
            .inclusion_proof
            .iter()
            .map(|h| Hash::parse_hash(h).map_err(|_| LedgerError::Malformed("proof hash")))
            .collect::<Result<Vec<_>, _>>()?;
        if self.leaf_index >= checkpoint.size {
            return Err(LedgerError::NotIncluded);
        }
        let leaf = leaf_hash(&commitment(&salt, &statement_bytes));
        tlog_tiles::check_record(
            &proof,
            checkpoint.size,
            checkpoint.root,
            self.leaf_index,
            leaf,
        )
        .map_err(|_| LedgerError::NotIncluded)?;
        if self.tlog_proof != tlog_proof_text(self.leaf_index, &proof, &self.checkpoint) {
            return Err(LedgerError::Malformed(
                "the tlog-proof text disagrees with the receipt's fields",
            ));
        }
        Ok(VerifiedReceipt {
            statement,
            checkpoint,
            leaf_index: self.leaf_index,
        })
    }
}

impl VerifiedReceipt {
    /// Checks content against the statement's roots.
    pub fn check_content(
        &self,
        blake3: &Blake3Hash,
        sha256: &Sha256Hash,
    ) -> Result<(), LedgerError> {
        if self.statement.blake3 != blake3.to_hex() {
            return Err(LedgerError::ContentMismatch("BLAKE3 root"));
        }
        if self
            .statement
            .sha256
            .as_deref()
            .is_some_and(|s| s != sha256.to_hex())
        {
            return Err(LedgerError::ContentMismatch("SHA-256"));
        }
        Ok(())
    }
}

/// Checks that checkpoint `new` extends checkpoint `old` (both already
/// verified) with an RFC 9162 consistency proof.
pub fn check_consistency(
    old: &VerifiedCheckpoint,
    new: &VerifiedCheckpoint,
    proof: &[Hash],
) -> Result<(), LedgerError> {
    // RFC 9162 consistency proofs of trees below 2^64 leaves hold fewer
    // than 2 x 64 hashes. A longer one is refused before it is checked:
    // the check copies what is left of the proof at every level, so a huge
    // one would cost the auditor's machine memory for nothing.
    if proof.len() > 128 {
        return Err(LedgerError::Malformed("consistency proof too long"));
    }
    tlog_tiles::check_tree(&proof.to_vec(), new.size, new.root, old.size, old.root)
        .map_err(|_| LedgerError::Inconsistent)
}

/// How many hashes the RFC 9162 consistency proof from a tree of `old`
/// leaves to one of `new` holds (`None` unless `0 < old <= new`): a proof
/// of another length was made for other sizes, which says nothing about
/// whether the log forked.
pub fn consistency_proof_len(old: u64, new: u64) -> Option<usize> {
    // The proof's shape depends on the sizes only: made over any hashes.
    struct Any;
    impl tlog_tiles::HashReader for Any {
        fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
            Ok(vec![Hash::default(); indexes.len()])
        }
    }
    tlog_tiles::prove_tree(new, old, &Any).ok().map(|p| p.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use tlog_tiles::{prove_record, prove_tree, stored_hash_index, stored_hashes, tree_hash};

    /// The metadata a filing notarizes is the compact JSON, keys sorted,
    /// that filings have always hashed (`serde_json::json!` of the four
    /// fields): golden bytes, and the same as that for odd text.
    #[test]
    fn filing_metadata_is_the_json_filings_have_always_hashed() {
        assert_eq!(
            filing_metadata(Some("C-17"), Some("scene.mp4"), None, Some("J. \"Doe\"")),
            r#"{"case":"C-17","file_name":"scene.mp4","media_type":null,"submitter":"J. \"Doe\""}"#
        );
        for (case, name, media, who) in [
            (None, None, None, None),
            (
                Some("Müller ü/\\"),
                Some("a\tb"),
                Some("video/mp4"),
                Some("clerk"),
            ),
        ] {
            let old = serde_json::json!({
                "file_name": name,
                "media_type": media,
                "submitter": who,
                "case": case,
            });
            assert_eq!(filing_metadata(case, name, media, who), old.to_string());
        }
        assert_eq!(
            filing_metadata_sha256(None, None, None, None),
            hex::encode(Sha256::digest(
                br#"{"case":null,"file_name":null,"media_type":null,"submitter":null}"#
            ))
        );
    }

    #[derive(Default)]
    struct Mem(RefCell<Vec<Hash>>);
    impl tlog_tiles::HashReader for Mem {
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
    impl Mem {
        fn append(&self, n: u64, data: &[u8]) {
            let hs = stored_hashes(n, data, self).unwrap();
            let mut v = self.0.borrow_mut();
            assert_eq!(v.len() as u64, stored_hash_index(0, n));
            v.extend(hs);
        }
    }

    fn b64(s: &str) -> Hash {
        Hash::parse_hash(s).unwrap()
    }

    /// transparency-dev/merkle testonly/constants.go: the 8 leaves and the
    /// roots of every prefix of them.
    const LEAVES: [&str; 8] = [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ];
    const ROOTS: [&str; 9] = [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    fn known_tree() -> Mem {
        let m = Mem::default();
        for (n, leaf) in LEAVES.iter().enumerate() {
            m.append(n as u64, &hex::decode(leaf).unwrap());
        }
        m
    }

    #[test]
    fn tree_heads_match_transparency_dev_vectors() {
        let m = known_tree();
        for (size, root) in ROOTS.iter().enumerate() {
            assert_eq!(
                hex::encode(tree_hash(size as u64, &m).unwrap().0),
                *root,
                "size {size}"
            );
        }
    }

    #[test]
    fn proofs_match_transparency_dev_vectors() {
        let m = known_tree();
        // testdata/inclusion/1/happy-path.json
        let p = prove_record(8, 0, &m).unwrap();
        let want = [
            "lqKW0iTyhcZ77pPDD4owkVfw2qNdxbh+QQt4YwoJz8c=",
            "Xwg/ChozygdqlSeYMlgNs+DvRYS9/x9UyKNg9Q3jAx4=",
            "a0eq8p7jwq+a+Im8H7klTavTEXfxYjLdaqsDXKOb9uQ=",
        ];
        assert_eq!(p, want.map(b64).to_vec());
        assert_eq!(
            tree_hash(8, &m).unwrap(),
            b64("XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=")
        );
        // testdata/inclusion/3/happy-path.json
        let p = prove_record(3, 2, &m).unwrap();
        assert_eq!(p, vec![b64("+sVCA+fMaWzw38tCySodnbr3CtnmIfS9jZhmLwDjwSU=")]);
        // testdata/consistency/4/happy-path.json: 6 -> 7
        let c = prove_tree(7, 6, &m).unwrap();
        assert_eq!(consistency_proof_len(6, 7), Some(c.len()));
        let want = [
            "DrxdNDf74tsVi58Sah0RjjCBgQMdCpSfje3t68VY72o=",
            "sIaT7C5yFZcTBkHoIR5+7cy0wmQTlj7ubB4u0W/7Gl8=",
            "037kGJdt2VdTwcc4Yrk5j6Kiz5tP8P3+izDNlSCWFLc=",
        ];
        assert_eq!(c, want.map(b64).to_vec());
        assert_eq!(
            tree_hash(6, &m).unwrap(),
            b64("duZ9rbzfHhDht03cYIq9L5jfsW+851J3tSMqEn8gh+8=")
        );
    }

    #[test]
    fn verifies_the_c2sp_signed_note_spec_example() {
        let vkey = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k";
        let note = "This is an example message.\n\n\u{2014} example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n";
        let v = signed_note::StandardVerifier::new(vkey).unwrap();
        let n = Note::from_bytes(note.as_bytes()).unwrap();
        n.verify(&VerifierList::new(vec![Box::new(v)])).unwrap();
        let tampered = note.replace("example message", "exemplary message");
        let n = Note::from_bytes(tampered.as_bytes()).unwrap();
        let v = signed_note::StandardVerifier::new(vkey).unwrap();
        assert!(n.verify(&VerifierList::new(vec![Box::new(v)])).is_err());
    }

    #[test]
    fn note_keys_reproduce_the_go_sumdb_example_key() {
        // golang.org/x/mod/sumdb/note: PeterNeumann's keys; the seed is the
        // signer key's payload.
        let skey = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
        let payload = B64.decode(skey.splitn(5, '+').nth(4).unwrap()).unwrap();
        let seed: [u8; 32] = payload[1..].try_into().unwrap();
        let (s, v) = note_keys("PeterNeumann", &seed);
        assert_eq!(s, skey);
        assert_eq!(
            v,
            "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
        );
    }

    fn statement() -> Statement {
        Statement::new(
            Kind::Filed,
            EvidenceId::new(1, [1; 10]),
            &Blake3Hash([7; 32]),
            Some(&Sha256Hash([8; 32])),
            42,
            "court",
            Some("2026-CR-1".into()),
            Some("clerk".into()),
            1_700_000_000_000,
        )
    }

    /// A log of `n` statements with the receipt of entry `i` against a
    /// checkpoint of size `n`.
    fn receipt_for(n: u64, i: u64, skey: &str) -> (Receipt, Mem) {
        let m = Mem::default();
        let mut opening = None;
        for j in 0..n {
            let mut s = statement();
            s.size = j;
            let bytes = s.encode().unwrap();
            let salt = [j as u8; 32];
            m.append(j, &commitment(&salt, &bytes));
            if j == i {
                opening = Some((bytes, salt));
            }
        }
        let (bytes, salt) = opening.unwrap();
        let root = tree_hash(n, &m).unwrap();
        let note = sign_checkpoint(skey, "example.org/custodia", n, root).unwrap();
        let proof = prove_record(n, i, &m).unwrap();
        (Receipt::new(&bytes, &salt, i, &note, &proof), m)
    }

    #[test]
    fn receipts_verify_offline_and_tampering_is_caught() {
        let (skey, vkey) = note_keys("example.org/custodia", &[3; 32]);
        let (r, _) = receipt_for(13, 6, &skey);
        let ok = r.verify(&vkey).unwrap();
        assert_eq!(ok.statement.size, 6);
        assert_eq!(ok.checkpoint.size, 13);
        assert!(ok
            .check_content(&Blake3Hash([7; 32]), &Sha256Hash([8; 32]))
            .is_ok());
        assert_eq!(
            ok.check_content(&Blake3Hash([9; 32]), &Sha256Hash([8; 32])),
            Err(LedgerError::ContentMismatch("BLAKE3 root"))
        );
        // A different statement under the same proof.
        let mut bad = r.clone();
        let mut s = Statement::decode(&B64.decode(&r.statement).unwrap()).unwrap();
        s.case = Some("another case".into());
        bad.statement = B64.encode(s.encode().unwrap());
        assert_eq!(bad.verify(&vkey), Err(LedgerError::NotIncluded));
        // A different salt, index or proof.
        let mut bad = r.clone();
        bad.salt = hex::encode([0xaa; 32]);
        assert_eq!(bad.verify(&vkey), Err(LedgerError::NotIncluded));
        let mut bad = r.clone();
        bad.leaf_index = 7;
        assert_eq!(bad.verify(&vkey), Err(LedgerError::NotIncluded));
        let mut bad = r.clone();
        bad.inclusion_proof.pop();
        assert_eq!(bad.verify(&vkey), Err(LedgerError::NotIncluded));
        // Another log's key, or a forged checkpoint.
        let (_, other) = note_keys("example.org/custodia", &[4; 32]);
        assert_eq!(r.verify(&other), Err(LedgerError::BadSignature));
        let mut bad = r.clone();
        bad.checkpoint = r.checkpoint.replacen("\n13\n", "\n14\n", 1);
        assert_eq!(bad.verify(&vkey), Err(LedgerError::BadSignature));
        // The tlog-proof text form carries the same proof and checkpoint.
        assert!(r
            .tlog_proof
            .starts_with("c2sp.org/tlog-proof@v1\nindex 6\n"));
        assert!(r.tlog_proof.ends_with(&r.checkpoint));
        assert_eq!(
            r.tlog_proof.lines().count(),
            2 + r.inclusion_proof.len() + 1 + r.checkpoint.lines().count()
        );
        // ...and must: a text form that says otherwise is refused.
        let mut bad = r.clone();
        bad.tlog_proof = bad.tlog_proof.replacen("index 6\n", "index 5\n", 1);
        assert!(matches!(bad.verify(&vkey), Err(LedgerError::Malformed(_))));
        let mut bad = r.clone();
        bad.inclusion_proof = vec![r.inclusion_proof[0].clone(); 65];
        assert!(matches!(bad.verify(&vkey), Err(LedgerError::Malformed(_))));
    }

    #[test]
    fn consistency_between_checkpoints() {
        let (skey, vkey) = note_keys("example.org/custodia", &[3; 32]);
        let (r_old, _) = receipt_for(5, 0, &skey);
        let (r_new, m) = receipt_for(300, 0, &skey);
        let old = r_old.verify(&vkey).unwrap().checkpoint;
        let new = r_new.verify(&vkey).unwrap().checkpoint;
        let proof = prove_tree(300, 5, &m).unwrap();
        assert_eq!(consistency_proof_len(5, 300), Some(proof.len()));
        assert_eq!(consistency_proof_len(300, 300), Some(0));
        assert_eq!(consistency_proof_len(0, 300), None);
        assert_eq!(consistency_proof_len(301, 300), None);
        check_consistency(&old, &new, &proof).unwrap();
        let forked = VerifiedCheckpoint {
            root: Hash([1; 32]),
            ..old.clone()
        };
        assert_eq!(
            check_consistency(&forked, &new, &proof),
            Err(LedgerError::Inconsistent)
        );
        // A proof padded past any real one's length is refused unread.
        let mut padded = proof.clone();
        padded.resize(129, Hash([0; 32]));
        assert_eq!(
            check_consistency(&old, &new, &padded),
            Err(LedgerError::Malformed("consistency proof too long"))
        );
    }

    #[test]
    fn c2sp_tile_paths_and_bundles() {
        assert_eq!(tile_path(&Tile::new(8, 1, 5, 17, false)), "tile/1/005.p/17");
        assert_eq!(
            tile_path(&Tile::new(8, 0, 1_234_067, 256, false)),
            "tile/0/x001/x234/067"
        );
        assert_eq!(
            tile_path(&Tile::new(8, 0, 273, 112, true)),
            "tile/entries/273.p/112"
        );
        let bundle = entry_bundle([&b"ab"[..], &b""[..], &[7u8; 300][..]]);
        assert_eq!(&bundle[..4], &[0, 2, b'a', b'b']);
        let back = parse_entry_bundle(&bundle).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(back[2], &[7u8; 300][..]);
        assert!(parse_entry_bundle(&bundle[..bundle.len() - 1]).is_err());
    }

    #[test]
    fn statements_round_trip_and_refuse_unknown_fields() {
        let s = statement();
        let bytes = s.encode().unwrap();
        assert_eq!(Statement::decode(&bytes).unwrap(), s);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("{\"v\":1,\"kind\":\"filed\","), "{text}");
        assert!(text.contains("\"time_source\":\"operator-clock\""));
        let extra = text.replacen("{", "{\"extra\":1,", 1);
        assert!(Statement::decode(extra.as_bytes()).is_err());
        let mut big = statement();
        big.case = Some("x".repeat(MAX_STATEMENT));
        assert_eq!(big.encode(), Err(LedgerError::StatementTooLarge));
    }
}
