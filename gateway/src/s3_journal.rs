//! The S3 records' journal, moved out of the index.
//!
//! Evidence survives the loss of the index through the ledger's openings
//! archive and the nodes' self-describing shards (`crate::recover`); the S3
//! API's own records (tenants, buckets with their versioning, Object Lock
//! and default retention, and every object version: key, ETag, metadata,
//! retention, legal hold, delete markers) are journaled by the indexer in
//! the transaction that changes them (`indexer::s3`, key `3j`). This task
//! moves that journal, in commit order, into files in the openings archive
//! (`s3-journal/EPOCH-FIRST-LAST-HASH`: the epoch, the first and last
//! entries' versionstamps, and a hash of the content) and only then clears what it moved from
//! the index, so `custodia recover-index` can replay it. A record change is
//! in the archive within about [`INTERVAL`] of its commit;
//! `custodia_s3_journal_synced_timestamp_seconds` says when the last drain
//! that left nothing behind began.
//!
//! Every gateway drains (sharing one index they may move the same entries
//! twice, into overlapping files; replay takes each record's newest value
//! by epoch and versionstamp, so repeats change nothing).
//!
//! A busy gateway writes a file a second, so every
//! `s3_journal_merge_files` files written it merges the archive's small
//! files (under [`MERGE_SMALL_BYTES`]) into one holding each record's
//! newest entry ([`s3::compact`]), written durably before the files it
//! replaces are deleted. A crash between the two leaves repeats, which
//! replay ignores; two gateways merging at once each write what they read
//! and delete only that; a file another gateway deleted first makes a
//! merge give up until next time. Larger files are left as they are, so a
//! merge rewrites at most about that much, and the archive holds about one
//! file per [`MERGE_SMALL_BYTES`] of records.

use crate::api::{Gateway, Store};
use crate::ledger::{Ledger, LedgerError};
use indexer::s3::{self, JournalEntry, ObjectError};
use protocol::wire::{decode_versioned, encode_versioned};
use std::sync::Arc;
use std::time::Duration;

/// How often the journal is drained.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// The archive's folder for journal files.
pub const DIR: &str = "s3-journal";
/// Entries per file (each at most a few KiB: a version with its metadata).
const BATCH: usize = 1024;
/// Journal files at least this large are not merged again.
pub const MERGE_SMALL_BYTES: u64 = 64 << 20;
const FILE_V1: u8 = 1;

/// Why a drain or a replay failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("index: {0}")]
    Index(#[from] ObjectError),
    #[error("archive: {0}")]
    Archive(#[from] LedgerError),
    #[error("journal file {name}: {reason}")]
    File { name: String, reason: String },
}

/// The name of the file holding `entries` (non-empty, in commit order),
/// encoded as `bytes`. Two gateways draining one index may read batches
/// that begin and end in the same transactions yet hold different entries
/// (a batch can end inside a transaction); the content's hash in the name
/// keeps either file from replacing the other.
fn file_name(entries: &[JournalEntry], bytes: &[u8]) -> Option<String> {
    let (first, last) = (entries.first()?, entries.last()?);
    Some(format!(
        "{DIR}/{:020}-{}-{}-{}",
        first.epoch,
        hex::encode(first.stamp),
        hex::encode(last.stamp),
        hex::encode(&blake3::hash(bytes).as_bytes()[..8])
    ))
}

/// Whether `name` is one [`file_name`] gives.
fn is_file_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(DIR).and_then(|r| r.strip_prefix('/')) else {
        return false;
    };
    let hex = |h: &str, len| h.len() == len && h.bytes().all(|c| c.is_ascii_hexdigit());
    let parts: Vec<&str> = rest.split('-').collect();
    matches!(parts.as_slice(), [e, a, b, h]
        if e.len() == 20 && e.bytes().all(|c| c.is_ascii_digit())
            && hex(a, 20) && hex(b, 20) && hex(h, 16))
}

/// Encodes one journal file.
pub fn encode_file(entries: &[JournalEntry]) -> Vec<u8> {
    encode_versioned(FILE_V1, &entries)
}

/// Decodes one journal file.
pub fn decode_file(bytes: &[u8]) -> Result<Vec<JournalEntry>, protocol::DecodeError> {
    decode_versioned(FILE_V1, bytes)
}

/// Starts the drain. Without a ledger there is no archive (and nothing for
/// `recover-index` to start from): the journal is then only cleared, so it
/// does not grow in the index; but not on an index that a gateway with a
/// ledger has journaled (seeded) for the archive: cleared there, the
/// changes would never reach the archive that `recover-index` replays (a
/// deleted version would come back), so they are left for a gateway with
/// a ledger to archive. With a ledger, nothing is archived before the
/// index is known to hold the published log (an older copy put back would
/// archive changes its lost history had made since).
pub fn spawn<S: Store>(gw: Arc<Gateway<S>>) -> Option<tokio::task::JoinHandle<()>> {
    let Some(ledger) = gw.ledger.clone() else {
        return Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Said hourly: the journal grows in the index meanwhile.
            let mut said: Option<tokio::time::Instant> = None;
            loop {
                tick.tick().await;
                match clear_without_ledger(&gw).await {
                    Ok(Some(_)) => {}
                    Ok(None) if said.is_none_or(|at| at.elapsed() >= Duration::from_secs(3600)) => {
                        said = Some(tokio::time::Instant::now());
                        tracing::warn!(
                            "this gateway has no ledger, but its index's S3 journal is kept for a \
                             ledger's openings archive: it is left for a gateway with the ledger \
                             to archive (configure [gateway.ledger] here too)"
                        );
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "S3 journal not cleared; retrying"),
                }
            }
        }));
    };
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !ledger.published_checked() {
            tick.tick().await;
        }
        while let Err(e) = seed(&gw, &ledger).await {
            tracing::warn!(error = %e, "S3 journal not seeded; retrying");
            tokio::time::sleep(INTERVAL).await;
        }
        // Files written since the last merge; at start, enough for one.
        let every = gw.config.s3_journal_merge_files.max(2);
        let mut written = every;
        loop {
            tick.tick().await;
            let began = unix_seconds();
            match drain(&gw, &ledger).await {
                Ok(moved) => {
                    gw.metrics.s3_journal_synced.set(began);
                    written += moved.files;
                }
                Err(e) => tracing::warn!(error = %e, "S3 journal not archived; retrying"),
            }
            if written >= every {
                // Again while merges take the most they may (a backlog, say
                // after an upgrade), each one file fewer at least.
                loop {
                    match merge(&ledger, 2).await {
                        Ok(Some(m)) => {
                            tracing::info!(
                                files = m.files,
                                entries = m.entries,
                                kept = m.kept,
                                "S3 journal files merged"
                            );
                            if !m.full {
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "S3 journal files not merged; will retry");
                            break;
                        }
                    }
                }
                written = 0;
            }
        }
    }))
}

fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Journals every record of an index written before records were
/// journaled (once; nothing to do on any other index), archiving as it
/// goes so the journal in the index stays small.
pub async fn seed<S: Store>(gw: &Gateway<S>, ledger: &Ledger) -> Result<(), JournalError> {
    if indexer::run(
        &gw.store,
        |tx| async move { s3::journal_seeded_tx(&tx).await },
    )
    .await?
    {
        return Ok(());
    }
    let mut after: Option<Vec<u8>> = None;
    let mut batches = 0;
    loop {
        let next = indexer::run(&gw.store, |tx| {
            let after = after.as_deref();
            async move { s3::seed_journal_tx(&tx, after, BATCH / 2).await }
        })
        .await?;
        match next {
            Some(last) => {
                after = Some(last);
                batches += 1;
                drain(gw, ledger).await?;
            }
            None => break,
        }
    }
    tracing::info!(batches, "S3 records journaled for the archive");
    Ok(())
}

/// A gateway without a ledger's drain: clears the journal, unless the
/// index is journaled for an archive (see [`spawn`]; from the first seed
/// transaction on); `None` then. Each batch is looked at and cleared in
/// one transaction: a seed beginning meanwhile is not raced.
pub async fn clear_without_ledger<S: Store>(
    gw: &Gateway<S>,
) -> Result<Option<Drained>, JournalError> {
    let mut cleared = Drained::default();
    loop {
        let batch = indexer::run(&gw.store, |tx| async move {
            if s3::journal_kept_tx(&tx).await? {
                return Ok::<_, ObjectError>(None);
            }
            let batch = s3::journal_tx(&tx, BATCH).await?;
            if let Some(last) = batch.last() {
                s3::clear_journal_tx(&tx, last);
            }
            Ok(Some(batch.len()))
        })
        .await?;
        match batch {
            None => return Ok(None),
            Some(n) => {
                cleared.entries += n;
                if n < BATCH {
                    return Ok(Some(cleared));
                }
            }
        }
    }
}

/// What a drain moved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    pub entries: usize,
    /// Files written to the archive.
    pub files: usize,
}

/// Moves the whole journal into the archive (without one, see
/// [`clear_without_ledger`]).
pub async fn drain<S: Store>(gw: &Gateway<S>, ledger: &Ledger) -> Result<Drained, JournalError> {
    let mut moved = Drained::default();
    loop {
        let batch = indexer::run(
            &gw.store,
            |tx| async move { s3::journal_tx(&tx, BATCH).await },
        )
        .await?;
        let Some(last) = batch.last() else {
            return Ok(moved);
        };
        let bytes = encode_file(&batch);
        if let Some(name) = file_name(&batch, &bytes) {
            ledger.archive_file(&name, bytes).await?;
            moved.files += 1;
        }
        indexer::run(&gw.store, |tx| async move {
            s3::clear_journal_tx(&tx, last);
            Ok::<_, ObjectError>(())
        })
        .await?;
        moved.entries += batch.len();
        if batch.len() < BATCH {
            return Ok(moved);
        }
    }
}

/// What a merge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Merged {
    /// Files merged (and deleted).
    pub files: usize,
    /// Entries they held.
    pub entries: usize,
    /// Entries in the file that replaced them.
    pub kept: usize,
    /// Whether small files were left out to keep the merge's size bounded.
    pub full: bool,
}

/// Merges the archive's small journal files (as many as make about
/// [`MERGE_SMALL_BYTES`]) into one, if there are at least `min_files` of
/// them; `None` when there were fewer, or another gateway changed the files
/// meanwhile.
pub async fn merge(ledger: &Ledger, min_files: usize) -> Result<Option<Merged>, JournalError> {
    // Small files in name order, up to about MERGE_SMALL_BYTES of them in
    // all, so one merge holds a bounded amount in memory however many
    // there are.
    let candidates: Vec<(String, u64)> = ledger
        .archived_names(DIR)
        .await?
        .into_iter()
        .filter(|(name, size)| is_file_name(name) && *size < MERGE_SMALL_BYTES)
        .collect();
    if candidates.len() < min_files.max(2) {
        return Ok(None);
    }
    let (mut total, mut full) = (0, false);
    let mut entries = Vec::new();
    let mut small = Vec::new();
    for (name, size) in candidates {
        if total >= MERGE_SMALL_BYTES {
            full = true;
            break;
        }
        let Some(bytes) = ledger.archived_file(&name).await? else {
            tracing::debug!(%name, "a journal file went while merging (another gateway merged it)");
            return Ok(None);
        };
        match decode_file(&bytes) {
            Ok(got) => {
                entries.extend(got);
                small.push(name);
                total += size;
            }
            // Left where it is, for an operator (recovery names it), and
            // not counted against the merge's size: one damaged file must
            // not stop every merge for good while small files pile up.
            Err(e) => tracing::error!(
                %name,
                error = %e,
                "an S3 journal file in the openings archive does not decode; left out of the merge"
            ),
        }
    }
    if small.len() < min_files.max(2) {
        return Ok(None);
    }
    let read = entries.len();
    let kept = s3::compact(entries);
    let bytes = encode_file(&kept);
    let Some(merged) = file_name(&kept, &bytes) else {
        return Ok(None);
    };
    // Durable before anything it replaces is deleted.
    ledger.archive_file(&merged, bytes).await?;
    for name in small.iter().filter(|n| **n != merged) {
        ledger.delete_archived(name).await?;
    }
    Ok(Some(Merged {
        files: small.len(),
        entries: read,
        kept: kept.len(),
        full,
    }))
}

/// Every journal entry in the archive, and the epoch a recovered index
/// must journal under (past every one found).
pub async fn read_archived(ledger: &Ledger) -> Result<(Vec<JournalEntry>, u64), JournalError> {
    let mut entries = Vec::new();
    let mut epoch = 0;
    for (name, bytes) in ledger.archived_files(DIR).await? {
        if !is_file_name(&name) {
            // A write's temporary file, left by a crash.
            tracing::warn!(%name, "not a journal file; skipped");
            continue;
        }
        let got = decode_file(&bytes).map_err(|e| JournalError::File {
            name: name.clone(),
            reason: e.to_string(),
        })?;
        for e in &got {
            epoch = epoch.max(e.epoch + 1);
        }
        entries.extend(got);
    }
    Ok((entries, epoch))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(epoch: u64, stamp: u8, key: &[u8], value: Option<&[u8]>) -> JournalEntry {
        JournalEntry {
            epoch,
            stamp: [stamp; 10],
            key: key.to_vec(),
            value: value.map(<[u8]>::to_vec),
        }
    }

    #[test]
    fn files_round_trip_and_are_named_by_epoch_and_stamps() {
        let entries = vec![
            entry(3, 1, b"3tacme", Some(b"\x01x")),
            entry(3, 2, b"3bphotos", None),
        ];
        let bytes = encode_file(&entries);
        let name = file_name(&entries, &bytes).unwrap();
        assert_eq!(
            name,
            format!(
                "s3-journal/{:020}-{}-{}-{}",
                3,
                "01".repeat(10),
                "02".repeat(10),
                &blake3::hash(&bytes).to_hex()[..16]
            )
        );
        // The same range with other entries (another gateway's batch) gets
        // another name.
        let other = vec![entries[0].clone(), entry(3, 2, b"3bother", None)];
        assert_ne!(file_name(&other, &encode_file(&other)).unwrap(), name);
        assert_eq!(decode_file(&encode_file(&entries)).unwrap(), entries);
        assert!(is_file_name(&name));
        assert!(!is_file_name(&format!("{name}.tmp")));
        assert!(!is_file_name("s3-journal/.tmp-1234"));
        assert!(!is_file_name(
            "0000001/00000000000000000000-00000000000000000010"
        ));
        assert!(file_name(&[], b"").is_none());
        assert!(decode_file(b"\x02garbage").is_err());
    }
}
