//! Operators' decisions about nodes (drain, activate, remove), copied from
//! the index into the openings archive so that `custodia recover-index`
//! restores them: a lost index must not bring a removed node back as an
//! active one (taking new shards on hardware that was retired, and started
//! again by `custodia up`), nor let a draining node take new shards.
//!
//! One small file per node, `nodes-lifecycle/NNNNNNNNNN` (the node id),
//! holding its last decision and when it was taken. The gateway that takes
//! a decision writes it once the index has committed it; every gateway also
//! compares the index with the archive every [`INTERVAL`] and writes what
//! is newer there, so a crash between the two, a failed write or a decision
//! another gateway took reach the archive all the same.
//!
//! Only ever newer: a decision replaces an archived one only if it was taken
//! later, and a removal is final. An index that lost its decisions (a new,
//! empty one, or an older copy put back) has none newer to write, so it
//! never overwrites the archive it will be recovered from; nor does a
//! gateway write before its index is known to hold the published log.
//!
//! The **compliance clock** (`crate::clock`) is copied here too, as
//! [`CLOCK_FILE`], whenever the index's has run [`CLOCK_EVERY_MS`] past the
//! archived copy. Without it a recovered index would start the clock at its
//! newest filing's time, which a system clock set forward stamped: a year
//! ahead, COMPLIANCE retention would end a year early. The copy lags the
//! index's by up to a minute, which only delays deletions.

use crate::api::{Gateway, Store};
use crate::ledger::{Ledger, LedgerError};
use indexer::schema::{self, ClockRecord, Lifecycle, LifecycleRecord};
use protocol::wire::{decode_versioned, encode_versioned};
use protocol::NodeId;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The archive's folder for the decisions.
pub const DIR: &str = "nodes-lifecycle";
/// The archive's copy of the compliance clock.
pub const CLOCK_FILE: &str = "compliance-clock";
/// How far the index's compliance clock runs past the archived copy before
/// the copy is written again.
pub const CLOCK_EVERY_MS: u64 = 60_000;
/// How often each gateway compares the index with the archive.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// How often the comparison reads the whole archive again rather than
/// trust what this gateway last read or wrote there: a file another
/// gateway (or a write this one stopped waiting for) overwrote with an
/// older decision, or one lost or rolled back outside the gateways, is
/// written anew within this.
pub const REREAD_EVERY: Duration = Duration::from_secs(600);
const FILE_V1: u8 = 1;

/// Why the decisions could not be archived or read back.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleArchiveError {
    #[error("index: {0}")]
    Index(#[from] schema::SchemaError),
    #[error("archive: {0}")]
    Archive(#[from] LedgerError),
    #[error("archived decision {name}: {reason}")]
    File { name: String, reason: String },
}

fn file_name(node: NodeId) -> String {
    format!("{DIR}/{:010}", node.0)
}

/// Every decision in the archive, by node. A file that does not decode is
/// an error: recovery must not take a node the operator removed for an
/// active one because its record could not be read. Names that are not a
/// node's (a temporary file a crash left) are passed over.
pub async fn read_archived(
    ledger: &Ledger,
) -> Result<HashMap<NodeId, LifecycleRecord>, LifecycleArchiveError> {
    read_decisions(ledger, true).await
}

/// [`read_archived`]; unless `strict`, a file that does not decode is
/// passed over (said in the log), to be written anew from the index.
async fn read_decisions(
    ledger: &Ledger,
    strict: bool,
) -> Result<HashMap<NodeId, LifecycleRecord>, LifecycleArchiveError> {
    let mut out = HashMap::new();
    for (name, bytes) in ledger.archived_files(DIR).await? {
        let Some(id) = name
            .strip_prefix(DIR)
            .and_then(|n| n.strip_prefix('/'))
            .filter(|n| n.len() == 10 && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            tracing::debug!(%name, "not a node decision in the archive; passed over");
            continue;
        };
        match decode_versioned::<LifecycleRecord>(FILE_V1, &bytes) {
            Ok(rec) => {
                out.insert(NodeId(id), rec);
            }
            Err(e) if !strict => {
                tracing::warn!(%name, error = %e, "a node decision in the archive is unreadable; written anew from the index");
            }
            Err(e) => {
                return Err(LifecycleArchiveError::File {
                    name,
                    reason: e.to_string(),
                })
            }
        }
    }
    Ok(out)
}

/// Whether `rec` (from the index) is to replace `archived`: taken later,
/// and over no removal.
fn newer(rec: &LifecycleRecord, archived: Option<&LifecycleRecord>) -> bool {
    archived.is_none_or(|a| a.state != Lifecycle::Removed && rec.changed_ms > a.changed_ms)
}

/// What this gateway knows the archive holds (`None` until read), shared
/// by the comparison loop and the gateway's own decisions, one writer at a
/// time.
#[derive(Default)]
pub struct Archived {
    /// With when they were read whole.
    decisions: tokio::sync::Mutex<Option<(HashMap<NodeId, LifecycleRecord>, std::time::Instant)>>,
    /// The archived compliance clock (ms), if any.
    clock: tokio::sync::Mutex<Option<Option<u64>>>,
}

/// The compliance clock in the archive, if one was ever copied there. A
/// file that does not decode is an error if `strict` (recovery must not
/// start the clock from a filing time instead, unsaid), else passed over
/// (said in the log), to be written anew from the index.
pub async fn archived_clock(
    ledger: &Ledger,
    strict: bool,
) -> Result<Option<ClockRecord>, LifecycleArchiveError> {
    let Some(bytes) = ledger.archived_file(CLOCK_FILE).await? else {
        return Ok(None);
    };
    match decode_versioned::<ClockRecord>(FILE_V1, &bytes) {
        Ok(rec) => Ok(Some(rec)),
        Err(e) if !strict => {
            tracing::warn!(error = %e, "the compliance clock in the archive is unreadable; written anew from the index");
            Ok(None)
        }
        Err(e) => Err(LifecycleArchiveError::File {
            name: CLOCK_FILE.to_owned(),
            reason: e.to_string(),
        }),
    }
}

/// Copies the index's compliance clock into the archive if it has run
/// [`CLOCK_EVERY_MS`] past the copy there (never moving the copy back);
/// returns whether it did. Nothing before the index is known to hold the
/// published log: a new, empty index starts its clock from the system
/// clock, which must not replace the one recovery would restore.
pub async fn sync_clock<S: Store>(gw: &Gateway<S>) -> Result<bool, LifecycleArchiveError> {
    let Some(ledger) = gw.ledger.as_ref() else {
        return Ok(false);
    };
    if !ledger.published_checked() {
        return Ok(false);
    }
    let mut known = gw.lifecycle_archive.clock.lock().await;
    let archived = match *known {
        Some(a) => a,
        None => *known.insert(
            archived_clock(ledger, false)
                .await?
                .map(|r| r.compliance_ms),
        ),
    };
    let Some(stored) =
        indexer::run(&gw.store, |tx| async move { schema::clock_tx(&tx).await }).await?
    else {
        return Ok(false);
    };
    if archived.is_some_and(|a| stored.compliance_ms < a.saturating_add(CLOCK_EVERY_MS)) {
        return Ok(false);
    }
    // Another gateway may have written a later copy since this one read
    // it: read again, so the copy is never moved back.
    let now = archived_clock(ledger, false)
        .await?
        .map(|r| r.compliance_ms);
    if now.is_some_and(|a| a >= stored.compliance_ms) {
        *known = Some(now);
        return Ok(false);
    }
    ledger
        .archive_file(CLOCK_FILE, encode_versioned(FILE_V1, &stored))
        .await?;
    *known = Some(Some(stored.compliance_ms));
    Ok(true)
}

/// Writes every decision in the index newer than the archive's (see
/// [`newer`]); returns how many. Nothing before the index is known to
/// hold the published log.
pub async fn sync<S: Store>(gw: &Gateway<S>) -> Result<usize, LifecycleArchiveError> {
    let Some(ledger) = gw.ledger.as_ref() else {
        return Ok(0);
    };
    if !ledger.published_checked() {
        return Ok(0);
    }
    let mut known = gw.lifecycle_archive.decisions.lock().await;
    if known
        .as_ref()
        .is_some_and(|(_, read)| read.elapsed() >= REREAD_EVERY)
    {
        *known = None;
    }
    let (archived, _) = match known.as_mut() {
        Some(a) => a,
        None => known.insert((
            read_decisions(ledger, false).await?,
            std::time::Instant::now(),
        )),
    };
    let decided = indexer::run(
        &gw.store,
        |tx| async move { schema::lifecycles_tx(&tx).await },
    )
    .await?;
    let mut written = 0;
    for (node, rec) in decided {
        if !newer(&rec, archived.get(&node)) {
            continue;
        }
        // Another gateway may have written a later decision since this
        // one read the file: read it again, so it is not moved back. (Two
        // gateways writing the one file at once can still cross: the
        // archive has no compare-and-set for a local folder. The loser's
        // newer decision is written again at its next whole re-read, within
        // REREAD_EVERY.)
        let name = file_name(node);
        let now = match ledger.archived_file(&name).await? {
            Some(bytes) => decode_versioned::<LifecycleRecord>(FILE_V1, &bytes).ok(),
            None => None,
        };
        if !newer(&rec, now.as_ref()) {
            if let Some(now) = now {
                archived.insert(node, now);
            }
            continue;
        }
        ledger
            .archive_file(&name, encode_versioned(FILE_V1, &rec))
            .await?;
        archived.insert(node, rec);
        written += 1;
    }
    Ok(written)
}

/// Starts the comparison loop; none without a ledger (no archive).
pub fn spawn<S: Store>(gw: Arc<Gateway<S>>) -> Option<tokio::task::JoinHandle<()>> {
    gw.ledger.as_ref()?;
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match sync(&gw).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(nodes = n, "node decisions archived"),
                Err(e) => {
                    tracing::warn!(error = %e, "node decisions not archived; retrying")
                }
            }
            if let Err(e) = sync_clock(&gw).await {
                tracing::warn!(error = %e, "the compliance clock not archived; retrying");
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_later_decision_replaces_an_archived_one_and_never_a_removal() {
        let rec = |state, changed_ms| LifecycleRecord { state, changed_ms };
        let draining = rec(Lifecycle::Draining, 10);
        assert!(newer(&draining, None));
        assert!(newer(&rec(Lifecycle::Active, 11), Some(&draining)));
        assert!(!newer(&rec(Lifecycle::Active, 9), Some(&draining)), "older");
        assert!(!newer(&draining, Some(&draining)), "the same");
        let removed = rec(Lifecycle::Removed, 10);
        assert!(!newer(&rec(Lifecycle::Active, 20), Some(&removed)), "final");
    }
}
