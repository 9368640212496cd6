//! `custodia recover-index`: rebuilds a lost or corrupt index from what
//! lives outside it.
//!
//! - The ledger's **openings archive** (written beside the tiles before each
//!   checkpoint is signed) gives every leaf's opening and the manifest header
//!   of the evidence it names as it stood then; replaying it in order gives each
//!   piece of evidence its newest header (legal holds, retention, expunges).
//!   The leaves must reproduce the root of the published, signed checkpoint.
//! - The **nodes' self-describing shards** give where each shard lives: every
//!   node's inventory is listed (`ListShards`) and each stripe's record built
//!   from the headers found.
//! - Each recovered piece of evidence is then **read back whole** through the
//!   verified read path: every stripe is re-encoded to learn the hash of every
//!   shard (a missing one is marked for repair), the Bao outboard for ranged
//!   reads is recomputed, and the content must hash to the manifest's BLAKE3
//!   and SHA-256. Nothing is called recovered that was not read back.
//!
//! - The **S3 records' journal** (`crate::s3_journal`, in the same archive)
//!   gives the S3 tenants, buckets (versioning, Object Lock, default
//!   retention) and every object version and delete marker with its
//!   retention and legal hold, as they stood when the journal was last
//!   archived (within about a second). A version whose evidence was not
//!   recovered is dropped and reported.
//!
//! - The **operators' decisions about nodes** (draining, removed), copied
//!   into the same archive (`crate::lifecycle_archive`): restored first, and
//!   a removed node is not listed.
//! - The **compliance clock**, copied there too (within a minute of the
//!   index's): restored as it was, so retention keeps ending by it. An
//!   archive from before the copy existed has none; the clock then starts
//!   at the newest filing's time when the gateway starts, as for an
//!   upgrade, and the report says so.
//!
//! Not in the archive, so not recovered (the report lists them): credentials
//! other than the ones the operator's files hold (`ops` restores
//! `admin.token` and `s3.credentials`; other keys are issued anew), witness
//! cosignatures and time-stamp tokens over old checkpoints (new ones are
//! gathered), `Idempotency-Key` records (a retry of a filing made before the
//! loss files again), statements queued but not yet on the ledger, and
//! in-flight uploads and S3 multipart uploads (their shards are orphans,
//! reported here).

use crate::api::{Gateway, Store};
use crate::ledger::LedgerError;
use futures::StreamExt;
use indexer::schema::{self, SchemaError};
use protocol::bao::OutboardBuilder;
use protocol::ledger::Statement;
use protocol::{
    Blake3Hash, EvidenceId, ManifestHeader, NodeId, ShardHeader, ShardPlacement, StripeRecord,
};
use sha2::Digest;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Stripe records written per index transaction.
const STRIPES_PER_TXN: usize = 256;
/// How many held pieces of evidence the report names.
pub const UNCLAIMED_LISTED: usize = 20;
/// The shards of one stripe found on the nodes, by index: every copy found
/// (a repair's old copy awaiting deletion beside its new one, say), in the
/// order the nodes were listed.
type Slots = Vec<Vec<(NodeId, ShardHeader)>>;

/// Stripes read ahead while one is checked.
const READ_AHEAD: usize = 8;

/// Why recovery stopped. Nothing it wrote is visible to a gateway until it
/// returns `Ok`: the caller moves the old index aside and recovers into a
/// new file.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("the index already holds evidence; recover into an empty index")]
    NotEmpty,
    #[error("ledger: {0}")]
    Ledger(#[from] LedgerError),
    #[error("index: {0}")]
    Index(#[from] SchemaError),
    #[error("index: {0}")]
    Kv(#[from] indexer::KvError),
    #[error("node {node} could not list its shards: {error}")]
    Node { node: NodeId, error: String },
    #[error("the archived manifest of {0} is unreadable")]
    Manifest(EvidenceId),
    /// A statement this version cannot read (a newer one's, or damaged):
    /// passing over it could pass over an expunge or a hold.
    #[error(
        "ledger leaf {leaf} (evidence {evidence}) holds a statement this version cannot read \
         ({error}): recover with the version that wrote it, or a newer one"
    )]
    Statement {
        leaf: u64,
        evidence: EvidenceId,
        error: String,
    },
    #[error("S3 records: {0}")]
    S3(#[from] crate::s3_journal::JournalError),
    #[error("node decisions: {0}")]
    Lifecycle(#[from] crate::lifecycle_archive::LifecycleArchiveError),
    /// The nodes hold shards but the ledger gave no evidence to restore.
    #[error(
        "the nodes hold {shards} shards but the ledger restored no evidence: check the openings \
         archive (openings / openings_url) and the tiles location; an index restored from \
         nothing would leave every shard to garbage collection (if none was ever filed, \
         --trust-archive proceeds)"
    )]
    NoLedger { shards: u64 },
}

/// What recovery found and did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    pub ledger_leaves: u64,
    pub checkpoint_size: u64,
    pub evidence: u64,
    pub expunged: u64,
    pub notarized: u64,
    pub tenants: BTreeSet<String>,
    pub nodes_listed: usize,
    /// Nodes that did not answer (their shards count as missing).
    pub nodes_down: Vec<u32>,
    /// Nodes the archive shows draining, and removed (removed ones are not
    /// listed: nothing on them counts).
    pub nodes_draining: Vec<u32>,
    pub nodes_removed: Vec<u32>,
    pub shards_listed: u64,
    pub stripes: u64,
    /// Stripes short of k+m verified shards, queued for repair.
    pub stripes_degraded: u64,
    pub bytes_verified: u64,
    /// Evidence ids found on nodes that no filing in the archive names
    /// (failed uploads, S3 multipart parts, or filings the archive had not
    /// caught up with): held, not collected, until an operator releases
    /// them (see [`schema::hold_unclaimed_tx`]).
    pub orphan_evidence: u64,
    pub orphan_shards: u64,
    /// The first [`UNCLAIMED_LISTED`] of those pieces of evidence: held,
    /// not collected, until `custodia release-unclaimed`.
    pub unclaimed: Vec<String>,
    /// Evidence that could not be read back and verified, and why.
    pub unreadable: Vec<(String, String)>,
    /// S3 records replayed from the journal.
    pub s3_tenants: usize,
    pub s3_buckets: usize,
    /// Object versions, delete markers included.
    pub s3_versions: usize,
    /// Versions (bucket, key, evidence id) whose evidence was not recovered.
    pub s3_versions_dropped: Vec<(String, String, String)>,
    /// Evidence the archive shows expunged without its `expunged` statement
    /// on the ledger (the index was lost before it was notarized): restored
    /// as it was, its shards still on the nodes; the order must be given
    /// again.
    pub expunge_not_logged: Vec<String>,
    /// Evidence whose archived header named another tenant, case or
    /// content than its `filed` statement: restored as notarized.
    pub header_not_as_filed: Vec<String>,
    /// Evidence held by its last hold statement on the ledger whose
    /// archived header showed no hold (a release never notarized):
    /// restored held; the release must be given again.
    pub release_not_logged: Vec<String>,
    /// Evidence whose S3 version is held while neither its archived header
    /// nor the ledger shows the hold (placed just before the loss, its
    /// statement not yet notarized): restored held.
    pub hold_not_logged: Vec<String>,
    /// The compliance clock restored from the archive (ms since the Unix
    /// epoch); `None`: the archive holds none, and the gateway starts it at
    /// the newest filing's time.
    pub compliance_clock_ms: Option<u64>,
    /// What no archive holds, so recovery could not restore.
    pub not_recovered: Vec<&'static str>,
}

/// What recovery never restores (see the module's documentation).
const NOT_RECOVERED: [&str; 5] = [
    "S3 multipart uploads in progress",
    "Idempotency-Key records (a client retrying a filing made before the loss files it again)",
    "statements queued but not yet on the ledger",
    "old witness cosignatures and time-stamp tokens (new ones are gathered)",
    "credentials other than the operator's files hold",
];

/// Sets what `h` says of its evidence's owner, case and content to what its
/// `filed` statement `st` notarized; whether anything differed.
fn notarized_into(h: &mut ManifestHeader, st: &Statement) -> bool {
    let mut differs = false;
    if h.tenant != st.tenant {
        h.tenant = st.tenant.clone();
        differs = true;
    }
    if h.case != st.case {
        h.case = st.case.clone();
        differs = true;
    }
    if h.size != st.size {
        h.size = st.size;
        differs = true;
    }
    if let Ok(b3) = st.blake3.parse::<protocol::Blake3Hash>() {
        if h.blake3 != b3 {
            h.blake3 = b3;
            differs = true;
        }
    }
    if let Some(sha) = st
        .sha256
        .as_deref()
        .and_then(|s| s.parse::<protocol::Sha256Hash>().ok())
    {
        if h.sha256 != sha {
            h.sha256 = sha;
            differs = true;
        }
    }
    differs
}

/// Rebuilds the index behind `gw` (which must be empty) from the openings
/// archive, the published checkpoint and the nodes. With `allow_down`, nodes
/// that do not answer are tolerated and their shards rebuilt by repair;
/// without it recovery refuses to start until every node answers.
///
/// With `trust_archive`, an openings archive no published checkpoint covers
/// is restored as it is (see [`crate::ledger::restore`]), and nodes holding
/// shards while the ledger names no evidence (only failed uploads or parts
/// were ever stored) are accepted.
pub async fn recover_index<S: Store>(
    gw: &Gateway<S>,
    allow_down: bool,
    trust_archive: bool,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Report, RecoverError> {
    let mut report = Report {
        not_recovered: NOT_RECOVERED.to_vec(),
        ..Report::default()
    };
    let empty = indexer::run(&gw.store, |tx| async move {
        let state = indexer::ledger::tree_state_tx(&tx).await?;
        Ok::<_, SchemaError>(!schema::any_evidence_tx(&tx).await? && state.size == 0)
    })
    .await?;
    if !empty {
        return Err(RecoverError::NotEmpty);
    }

    // Nodes: registered with their disks as they are now, so nobody mistakes
    // them for replaced disks afterwards.
    gw.nodes.probe_all(&gw.store, gw.clock.now_ms()).await;

    progress("ledger: restoring openings and tree hashes from the archive");
    let restored = crate::ledger::restore(gw, trust_archive).await?;
    report.ledger_leaves = restored.leaves;
    report.checkpoint_size = restored.checkpoint_size;

    // The operators' decisions about nodes, before anything is placed.
    let decisions = match &gw.ledger {
        Some(ledger) => crate::lifecycle_archive::read_archived(ledger).await?,
        None => HashMap::new(),
    };
    let mut removed = BTreeSet::new();
    for (node, rec) in &decisions {
        match rec.state {
            schema::Lifecycle::Active => {}
            schema::Lifecycle::Draining => report.nodes_draining.push(node.0),
            schema::Lifecycle::Removed => {
                report.nodes_removed.push(node.0);
                removed.insert(*node);
            }
        }
    }
    // Activations too, with their time, so the archive's copy is never
    // taken for a newer decision than the index's: in one transaction (a
    // small record a node).
    indexer::run(&gw.store, |tx| {
        let decisions = &decisions;
        async move {
            for (node, rec) in decisions {
                schema::set_lifecycle_tx(&tx, *node, rec);
            }
            Ok::<_, SchemaError>(())
        }
    })
    .await?;
    report.nodes_draining.sort_unstable();
    report.nodes_removed.sort_unstable();

    // The compliance clock, before the gateway first starts on this index
    // (which would otherwise start it at the newest filing's time).
    if let Some(ledger) = &gw.ledger {
        if let Some(rec) = crate::lifecycle_archive::archived_clock(ledger, true).await? {
            let rec = indexer::run(&gw.store, |tx| async move {
                schema::advance_clock_tx(&tx, rec).await
            })
            .await?;
            report.compliance_clock_ms = Some(rec.compliance_ms);
        }
    }

    // The newest header of each piece of evidence, in leaf order.
    let mut manifests: BTreeMap<EvidenceId, (ManifestHeader, bool)> = BTreeMap::new();
    // Evidence whose expunge is on the ledger.
    let mut expunge_logged = BTreeSet::new();
    // Each filing's statement, and the ledger's last word on each hold.
    let mut filed: HashMap<EvidenceId, Statement> = HashMap::new();
    let mut hold_said: HashMap<EvidenceId, bool> = HashMap::new();
    for (index, leaf) in restored.archive.iter().enumerate() {
        let s = Statement::decode(&leaf.statement).map_err(|e| RecoverError::Statement {
            leaf: index as u64,
            evidence: leaf.evidence,
            error: e.to_string(),
        })?;
        report.tenants.insert(s.tenant.clone());
        match s.kind {
            protocol::ledger::Kind::Notarized => report.notarized += 1,
            protocol::ledger::Kind::Expunged => {
                expunge_logged.insert(leaf.evidence);
            }
            protocol::ledger::Kind::LegalHold => {
                hold_said.insert(leaf.evidence, true);
            }
            protocol::ledger::Kind::Released => {
                hold_said.insert(leaf.evidence, false);
            }
            protocol::ledger::Kind::Filed => {
                filed.insert(leaf.evidence, s);
            }
            _ => {}
        }
        if let Some(bytes) = &leaf.manifest {
            let h =
                ManifestHeader::decode(bytes).map_err(|_| RecoverError::Manifest(leaf.evidence))?;
            manifests.insert(leaf.evidence, (h, leaf.expunged));
        }
    }
    drop(restored);
    // A header is archived as it stands when a leaf about its evidence is
    // published, which can be after an expunge committed and before its
    // statement was notarized. Without that statement GC never deletes the
    // shards (it waits for it) and the order is nowhere on the ledger: the
    // evidence comes back as it was, and is reported.
    for (id, (h, expunged)) in manifests.iter_mut() {
        if *expunged && !expunge_logged.contains(id) {
            tracing::warn!(evidence = %id, "its expunge is not on the ledger: restored as it was; give the order again");
            report.expunge_not_logged.push(id.to_string());
            *expunged = false;
        }
        // The archived header is the operator's copy; the ledger's
        // statements are what was notarized. Where they differ, the
        // statement wins: whose evidence it is, its case and its content
        // (which the read-back below then checks against what was filed).
        if let Some(st) = filed.get(id) {
            if notarized_into(h, st) {
                tracing::warn!(evidence = %id, "its archived header differs from its filed statement: restored as notarized");
                report.header_not_as_filed.push(id.to_string());
            }
        }
        // A hold whose release is not on the ledger stays (the archive's
        // header can show a release whose statement was never notarized).
        if hold_said.get(id) == Some(&true) && !h.legal_hold {
            tracing::warn!(evidence = %id, "its hold's release is not on the ledger: restored held; give the order again");
            report.release_not_logged.push(id.to_string());
            h.legal_hold = true;
        }
    }
    drop(filed);

    // Inventories: (evidence, stripe) -> the shards found, by index.
    let mut found: HashMap<(EvidenceId, u64), Slots> = HashMap::new();
    let mut orphans = BTreeSet::new();
    for entry in &gw.config.nodes {
        let node = entry.node_id();
        if removed.contains(&node) {
            progress(&format!(
                "node {node}: removed from the cluster, not listed"
            ));
            continue;
        }
        progress(&format!("node {node}: listing shards"));
        let mut after = None;
        loop {
            let page = match gw.nodes.client.rpc_list_shards(entry.addr, after).await {
                Ok(page) => page,
                Err(e) if allow_down => {
                    tracing::warn!(%node, error = %e, "node did not list its shards; its shards count as missing");
                    report.nodes_down.push(node.0);
                    break;
                }
                Err(e) => {
                    return Err(RecoverError::Node {
                        node,
                        error: e.to_string(),
                    })
                }
            };
            let Some(last) = page.last() else {
                report.nodes_listed += 1;
                break;
            };
            after = Some(last.key);
            for h in page {
                report.shards_listed += 1;
                let Some((m, _)) = manifests.get(&h.key.evidence) else {
                    orphans.insert(h.key.evidence);
                    report.orphan_shards += 1;
                    continue;
                };
                let total = m.code.total();
                if (h.key.index as usize) >= total || h.code != m.code {
                    report.orphan_shards += 1;
                    continue;
                }
                let slots = found
                    .entry((h.key.evidence, h.key.stripe))
                    .or_insert_with(|| vec![Vec::new(); total]);
                // A second copy (a repair's old one, within its grace) is
                // kept too: the read-back falls back to it when the first
                // does not verify.
                slots[h.key.index as usize].push((node, h));
            }
        }
    }
    report.orphan_evidence = orphans.len() as u64;
    // Their shards stay until an operator releases them: the archive may
    // have been behind the index (a filing answered 201 whose statement was
    // not archived yet), and shard headers do not say whose they are.
    let held: Vec<EvidenceId> = orphans.iter().copied().collect();
    for chunk in held.chunks(STRIPES_PER_TXN) {
        indexer::run(&gw.store, |tx| async move {
            for id in chunk {
                schema::hold_unclaimed_tx(&tx, *id);
            }
            Ok::<_, SchemaError>(())
        })
        .await?;
    }
    report.unclaimed = held
        .iter()
        .take(UNCLAIMED_LISTED)
        .map(ToString::to_string)
        .collect();
    // Shards on the nodes and no evidence in the ledger: the ledger's
    // archive or tiles were not where the configuration says. An index
    // restored from nothing would let garbage collection delete them all.
    if manifests.is_empty() && report.shards_listed > 0 && !trust_archive {
        return Err(RecoverError::NoLedger {
            shards: report.shards_listed,
        });
    }

    // The S3 records, before the tenants below, which then only add those
    // no S3 record named (a tenant's journaled record keeps its creation
    // time). A version may name any evidence recovered, expunged included
    // (as before the loss, it then reads as gone).
    let indexed: BTreeSet<EvidenceId> = manifests.keys().copied().collect();
    let s3_held = restore_s3_records(gw, &indexed, &mut report, progress).await?;
    // A hold placed through S3 is on its version record, which the journal
    // archives within a second, and on the evidence, whose archived header
    // shows it only once a leaf about it is published: a hold whose
    // statement the ledger had not taken yet would be lost. The version's
    // hold stands unless the ledger's last word on the evidence is a
    // release (an evidence-API release leaves the version's flag as it was).
    for id in s3_held {
        let Some((h, expunged)) = manifests.get_mut(&id) else {
            continue;
        };
        if !h.legal_hold && !*expunged && hold_said.get(&id) != Some(&false) {
            tracing::warn!(evidence = %id, "its S3 version is held and its hold is not on the ledger: restored held");
            report.hold_not_logged.push(id.to_string());
            h.legal_hold = true;
        }
    }
    drop(hold_said);

    // Tenants: every recovered record names one.
    let tenants: Vec<String> = report.tenants.iter().cloned().collect();
    let now = gw.clock.now_ms();
    indexer::run(&gw.store, |tx| {
        let tenants = &tenants;
        async move {
            for t in tenants {
                if schema::valid_tenant(t) {
                    indexer::s3::create_tenant_tx(&tx, t, now)
                        .await
                        .map_err(|e| match e {
                            // A conflict stays one, for `run` to retry.
                            indexer::s3::ObjectError::Schema(e) => e,
                            e => SchemaError::Locked(e.to_string()),
                        })?;
                }
            }
            Ok::<_, SchemaError>(())
        }
    })
    .await?;

    let count = manifests.len();
    for (n, (id, (header, expunged))) in manifests.into_iter().enumerate() {
        if n % 100 == 0 {
            progress(&format!("evidence: {n} of {count} read back and indexed"));
        }
        let stripes: Vec<(u64, Slots)> = (0..header.stripes)
            .map(|s| {
                let slots = found
                    .remove(&(id, s))
                    .unwrap_or_else(|| vec![Vec::new(); header.code.total()]);
                (s, slots)
            })
            .collect();
        if expunged {
            // Only the tombstone, the shards still on nodes for garbage
            // collection to delete, and the erasure to finish: whether
            // it was finished is not known (a node down now, or one that
            // could not erase its quarantined copies, may hold bytes the
            // listing did not show). GC asks every node again; a node that
            // erased it answers at once.
            let left: Vec<(u64, StripeRecord)> = stripes
                .into_iter()
                .filter(|(_, slots)| slots.iter().any(|copies| !copies.is_empty()))
                .map(|(s, slots)| (s, initial_record(&header, s, &slots)))
                .collect();
            write_stripes(gw, id, &left, &[]).await?;
            indexer::run(&gw.store, |tx| {
                let header = &header;
                async move {
                    schema::restore_expunged_tx(&tx, header);
                    Ok::<_, SchemaError>(())
                }
            })
            .await?;
            report.expunged += 1;
            continue;
        }
        match read_back(gw, &header, stripes).await {
            Ok((records, degraded, pairs)) => {
                report.stripes += records.len() as u64;
                report.stripes_degraded += degraded.len() as u64;
                report.bytes_verified += header.size;
                write_stripes(gw, id, &records, &degraded).await?;
                for chunk in pairs.chunks(4096) {
                    indexer::run(&gw.store, |tx| async move {
                        schema::put_outboard_pairs_tx(&tx, id, chunk);
                        Ok::<_, SchemaError>(())
                    })
                    .await?;
                }
            }
            Err((why, records)) => {
                // Indexed all the same (its statement says it was filed);
                // every stripe goes to repair, which reports what it cannot
                // rebuild as lost. Its outboard is rebuilt by its first read
                // (`crate::read`).
                tracing::error!(evidence = %id, reason = %why, "evidence could not be read back during recovery");
                report.unreadable.push((id.to_string(), why));
                report.stripes += records.len() as u64;
                report.stripes_degraded += records.len() as u64;
                let all: Vec<u64> = records.iter().map(|(s, _)| *s).collect();
                write_stripes(gw, id, &records, &all).await?;
            }
        }
        indexer::run(&gw.store, |tx| {
            let header = &header;
            async move { schema::restore_manifest_tx(&tx, header) }
        })
        .await?;
        report.evidence += 1;
    }
    progress(&format!("evidence: {count} of {count} done"));
    Ok(report)
}

/// S3 records per index transaction.
const S3_RECORDS_PER_TXN: usize = 512;

/// Replays the S3 records' journal from the archive into the index; a
/// version naming evidence not in `indexed` is dropped and reported.
/// Returns the evidence of the versions under a legal hold.
async fn restore_s3_records<S: Store>(
    gw: &Gateway<S>,
    indexed: &BTreeSet<EvidenceId>,
    report: &mut Report,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Vec<EvidenceId>, RecoverError> {
    let Some(ledger) = &gw.ledger else {
        return Ok(Vec::new());
    };
    progress("s3: replaying the records' journal");
    let (entries, epoch) = crate::s3_journal::read_archived(ledger).await?;
    let replayed = indexer::s3::replay(entries, |id| indexed.contains(&id))
        .map_err(crate::s3_journal::JournalError::from)?;
    for chunk in replayed.records.chunks(S3_RECORDS_PER_TXN) {
        indexer::run(&gw.store, |tx| async move {
            indexer::s3::restore_records_tx(&tx, chunk);
            Ok::<_, SchemaError>(())
        })
        .await?;
    }
    // Journaled from here on after every epoch archived, so a later
    // recovery orders this index's changes after the old ones.
    indexer::run(&gw.store, |tx| async move {
        indexer::s3::set_journal_epoch_tx(&tx, epoch);
        indexer::s3::set_journal_seeded_tx(&tx);
        indexer::s3::set_holds_carried_tx(&tx);
        Ok::<_, SchemaError>(())
    })
    .await?;
    for (bucket, key, id) in &replayed.dropped {
        tracing::error!(%bucket, %key, evidence = %id, "S3 version dropped: its evidence was not recovered");
    }
    report.s3_tenants = replayed.tenants;
    report.s3_buckets = replayed.buckets;
    report.s3_versions = replayed.versions;
    report.s3_versions_dropped = replayed
        .dropped
        .into_iter()
        .map(|(b, k, id)| (b, k, id.to_string()))
        .collect();
    Ok(replayed.held)
}

/// A stripe record from the shards found: their nodes and header hashes;
/// shards not found are unplaced (hash unknown until re-encoded). It stands
/// only for evidence that could not be read back. A slot found on several
/// nodes (repair moved it, and the old copy was not deleted yet) is left
/// unplaced too, with the hash its copies agree on (else unknown): which
/// copy is good is not known, and a recorded placement would have the
/// orphan sweep delete the others, perhaps the good one. The sweep adopts
/// the copy that verifies, and deletes the rest only after.
fn initial_record(
    header: &ManifestHeader,
    stripe: u64,
    slots: &[Vec<(NodeId, ShardHeader)>],
) -> StripeRecord {
    StripeRecord {
        version: 1,
        shard_len: header.code.layout(header.size).shard_len(stripe) as u32,
        shards: slots
            .iter()
            .map(|copies| match copies.as_slice() {
                [(node, h)] => ShardPlacement {
                    node: Some(*node),
                    blake3: h.blake3,
                },
                [] => ShardPlacement {
                    node: None,
                    blake3: ShardPlacement::UNKNOWN_HASH,
                },
                [(_, first), rest @ ..] => ShardPlacement {
                    node: None,
                    blake3: if rest.iter().all(|(_, h)| h.blake3 == first.blake3) {
                        first.blake3
                    } else {
                        ShardPlacement::UNKNOWN_HASH
                    },
                },
            })
            .collect(),
    }
}

type ReadBack = (
    Vec<(u64, StripeRecord)>,
    Vec<u64>,
    Vec<(u64, protocol::bao::HashPair)>,
);

/// Reads `header`'s content back stripe by stripe from the shards found,
/// re-encodes each stripe to learn every shard's hash, and checks the whole
/// against the manifest's BLAKE3 and SHA-256. Returns the final stripe
/// records, the stripes short of a verified shard, and the Bao outboard; or
/// why not, with the records as found.
async fn read_back<S: Store>(
    gw: &Gateway<S>,
    header: &ManifestHeader,
    stripes: Vec<(u64, Slots)>,
) -> Result<ReadBack, (String, Vec<(u64, StripeRecord)>)> {
    let initial: Vec<(u64, StripeRecord)> = stripes
        .iter()
        .map(|(s, slots)| (*s, initial_record(header, *s, slots)))
        .collect();
    let code = header.code;
    let (k, m) = (code.data_shards(), code.parity_shards());
    let rs = match gw.codec(k, m) {
        Ok(rs) => rs,
        Err(e) => return Err((format!("erasure code: {e:?}"), initial)),
    };
    let mut outboard = OutboardBuilder::new();
    let mut sha = sha2::Sha256::new();
    let mut pairs = Vec::new();
    let mut records = Vec::with_capacity(initial.len());
    let mut degraded = Vec::new();
    // Every placed shard of each stripe is read (not only k), so the count
    // of verified shards is exact; a few stripes are in flight at once.
    // Each shard from its first copy found, or the next when one does not
    // verify.
    let mut fetched = futures::stream::iter(initial.iter().zip(&stripes))
        .map(|((stripe, rec), (_, slots))| async move {
            let reads = slots.iter().enumerate().filter(|(_, c)| !c.is_empty()).map(
                |(i, copies)| async move {
                    for (node, h) in copies {
                        let mut one = rec.clone();
                        one.shards[i] = ShardPlacement {
                            node: Some(*node),
                            blake3: h.blake3,
                        };
                        if let crate::read::ShardOutcome::Good(body) =
                            crate::read::fetch_shard(gw, header.evidence, *stripe, i, &one, true)
                                .await
                        {
                            return (i, Some((*node, h.blake3, body)));
                        }
                    }
                    (i, None)
                },
            );
            (*stripe, rec, futures::future::join_all(reads).await)
        })
        .buffered(READ_AHEAD);
    while let Some((stripe, rec, outcomes)) = fetched.next().await {
        let mut shards: Vec<Option<Vec<u8>>> = vec![None; rec.shards.len()];
        // Where each shard was read from, and the hash its copy's header
        // gave (which the read checked it against).
        let mut fixed = rec.clone();
        for (i, outcome) in outcomes {
            if let Some((node, blake3, body)) = outcome {
                shards[i] = Some(body);
                fixed.shards[i] = ShardPlacement {
                    node: Some(node),
                    blake3,
                };
            }
        }
        let good: Vec<bool> = shards.iter().map(Option::is_some).collect();
        let count = good.iter().filter(|g| **g).count();
        if count < k {
            return Err((
                format!("stripe {stripe}: only {count} verified shards of the {k} needed"),
                initial.clone(),
            ));
        }
        let stripe_len = {
            let r = code.layout(header.size).stripe_range(stripe);
            (r.end - r.start) as usize
        };
        let rs2 = rs.clone();
        let rebuilt = tokio::task::spawn_blocking(move || {
            rs2.reconstruct_data(&mut shards)?;
            let mut data = Vec::with_capacity(stripe_len);
            for s in shards.iter().take(k).flatten() {
                data.extend_from_slice(s);
            }
            data.truncate(stripe_len);
            Ok::<_, reed_solomon_erasure::Error>(data)
        })
        .await;
        let data = match rebuilt {
            Ok(Ok(data)) => data,
            Ok(Err(e)) => return Err((format!("stripe {stripe}: {e:?}"), initial.clone())),
            Err(_) => return Err(("reconstruction task failed".into(), initial.clone())),
        };
        outboard.update(&data);
        sha.update(&data);
        pairs.extend(outboard.take_pairs());
        let shard_len = rec.shard_len as usize;
        let shards = match crate::ingest::encode_stripe(&rs, k, m, &data, shard_len, &gw.buffers) {
            Ok(shards) => shards,
            Err(e) => return Err((format!("re-encoding: {e:?}"), initial.clone())),
        };
        let mut short = false;
        for ((slot, shard), ok) in fixed.shards.iter_mut().zip(&shards).zip(&good) {
            let hash = Blake3Hash::of(shard);
            // Only a shard read back whole and agreeing with the content
            // keeps its place; the rest are rebuilt by repair.
            if !*ok || slot.blake3 != hash {
                slot.node = None;
            }
            slot.blake3 = hash;
            short |= slot.node.is_none();
        }
        for s in shards {
            gw.buffers.give(s);
        }
        if short {
            degraded.push(stripe);
        }
        records.push((stripe, fixed));
    }
    drop(fetched);
    let (root, rest) = outboard.finish();
    pairs.extend(rest);
    if Blake3Hash(root) != header.blake3 {
        return Err((
            "content does not hash to the manifest's BLAKE3".into(),
            initial,
        ));
    }
    if sha.finalize().as_slice() != header.sha256.0.as_slice() {
        return Err((
            "content does not hash to the manifest's SHA-256".into(),
            initial,
        ));
    }
    Ok((records, degraded, pairs))
}

/// Writes stripe records (and repair marks for `degraded`) in batches.
async fn write_stripes<S: Store>(
    gw: &Gateway<S>,
    id: EvidenceId,
    records: &[(u64, StripeRecord)],
    degraded: &[u64],
) -> Result<(), RecoverError> {
    for chunk in records.chunks(STRIPES_PER_TXN) {
        indexer::run(&gw.store, |tx| async move {
            for (s, rec) in chunk {
                schema::put_stripe_tx(&tx, id, *s, rec);
                // A shard with no node: its copies (on a node that did not
                // answer, or several that disagree) are for the orphan
                // sweep to adopt, and no node is removed before it has.
                if rec.shards.iter().any(|p| p.node.is_none()) {
                    schema::set_adoption_pending_tx(&tx);
                }
            }
            Ok::<_, SchemaError>(())
        })
        .await?;
    }
    for chunk in degraded.chunks(STRIPES_PER_TXN) {
        indexer::run(&gw.store, |tx| async move {
            for s in chunk {
                schema::mark_degraded_tx(&tx, id, *s);
            }
            Ok::<_, SchemaError>(())
        })
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An archived header that moved evidence to another tenant or case,
    /// or names other content, is restored as its `filed` statement
    /// notarized it; one that agrees is left as it is.
    #[test]
    fn headers_are_restored_as_notarized() {
        let b3 = protocol::Blake3Hash([7; 32]);
        let sha = protocol::Sha256Hash([8; 32]);
        let header = ManifestHeader {
            evidence: EvidenceId([1; 16]),
            tenant: "court-a".into(),
            case: Some("2026-17".into()),
            blake3: b3,
            sha256: sha,
            size: 100,
            media_type: None,
            file_name: None,
            submitter: None,
            filed_at_ms: 5,
            code: protocol::ErasureCode::new(4, 2, 4096).expect("code"),
            stripes: 1,
            retain_until_ms: None,
            legal_hold: false,
        };
        let st = Statement::new(
            protocol::ledger::Kind::Filed,
            header.evidence,
            &b3,
            Some(&sha),
            100,
            "court-a",
            Some("2026-17".into()),
            None,
            5,
        );
        let mut same = header.clone();
        assert!(!notarized_into(&mut same, &st));
        assert_eq!(same, header);
        let mut moved = header.clone();
        moved.tenant = "court-b".into();
        moved.case = None;
        moved.blake3 = protocol::Blake3Hash([9; 32]);
        moved.size = 99;
        assert!(notarized_into(&mut moved, &st));
        assert_eq!(moved, header);
    }
}
