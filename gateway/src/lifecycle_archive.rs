//! Operators' decisions about nodes (drain, activate, remove), copied from
//! the index into the openings archive so that `custodia recover-index`
//! restores them: a lost index must not bring a removed node back as an
//! active one (taking new shards on hardware that was retired, and started
//! again by `custodia up`), nor let a draining node take new shards.
//!
//! One small file per node, `nodes-lifecycle/NNNNNNNNNN` (the node id), holding
//! its state and when it was decided. The gateway that takes a decision
//! writes it as soon as the index has committed it; every gateway also
//! compares the index with what it last archived every [`INTERVAL`] and
//! writes what differs, so a crash between the two, a failed write or a
//! decision another gateway took reach the archive all the same. Two
//! gateways writing one node's file at once may leave the older state
//! there for a moment: the one that wrote it sees the index differ from
//! what it wrote at its next look, and writes it again.

use crate::api::{Gateway, Store};
use crate::ledger::{Ledger, LedgerError};
use indexer::schema::{self, Lifecycle, LifecycleRecord};
use protocol::wire::{decode_versioned, encode_versioned};
use protocol::NodeId;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The archive's folder for the decisions.
pub const DIR: &str = "nodes-lifecycle";
/// How often each gateway compares the index with the archive.
pub const INTERVAL: Duration = Duration::from_secs(10);
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

/// Writes `node`'s decision to the archive (durably, replacing the last).
pub async fn archive(
    ledger: &Ledger,
    node: NodeId,
    rec: &LifecycleRecord,
) -> Result<(), LedgerError> {
    ledger
        .archive_file(&file_name(node), encode_versioned(FILE_V1, rec))
        .await
}

/// Every decision in the archive, by node. A file that does not decode is
/// an error: recovery must not take a node the operator removed for an
/// active one because its record could not be read.
pub async fn read_archived(
    ledger: &Ledger,
) -> Result<HashMap<NodeId, LifecycleRecord>, LifecycleArchiveError> {
    let mut out = HashMap::new();
    for (name, bytes) in ledger.archived_files(DIR).await? {
        let bad = |reason: String| LifecycleArchiveError::File {
            name: name.clone(),
            reason,
        };
        let id = name
            .rsplit('/')
            .next()
            .and_then(|n| n.parse::<u32>().ok())
            .ok_or_else(|| bad("not a node id".into()))?;
        let rec: LifecycleRecord =
            decode_versioned(FILE_V1, &bytes).map_err(|e| bad(e.to_string()))?;
        out.insert(NodeId(id), rec);
    }
    Ok(out)
}

/// Every configured node's decision as the index holds it now (no record:
/// active).
async fn current<S: Store>(
    gw: &Gateway<S>,
) -> Result<HashMap<NodeId, LifecycleRecord>, LifecycleArchiveError> {
    let decided: HashMap<NodeId, LifecycleRecord> =
        indexer::run(
            &gw.store,
            |tx| async move { schema::lifecycles_tx(&tx).await },
        )
        .await?
        .into_iter()
        .collect();
    let mut all: HashMap<NodeId, LifecycleRecord> = gw
        .config
        .nodes
        .iter()
        .map(|n| {
            let active = LifecycleRecord {
                state: Lifecycle::Active,
                changed_ms: 0,
            };
            (n.node_id(), active)
        })
        .collect();
    all.extend(decided);
    Ok(all)
}

/// Writes every decision whose state differs from what `archived` says
/// the archive holds, and notes it there. Returns how many were written.
pub async fn sync<S: Store>(
    gw: &Gateway<S>,
    ledger: &Ledger,
    archived: &mut HashMap<NodeId, LifecycleRecord>,
) -> Result<usize, LifecycleArchiveError> {
    let mut written = 0;
    for (node, rec) in current(gw).await? {
        if archived.get(&node).map(|r| r.state) == Some(rec.state) {
            continue;
        }
        archive(ledger, node, &rec).await?;
        archived.insert(node, rec);
        written += 1;
    }
    Ok(written)
}

/// Starts the comparison loop; none without a ledger (no archive).
pub fn spawn<S: Store>(gw: Arc<Gateway<S>>) -> Option<tokio::task::JoinHandle<()>> {
    let ledger = gw.ledger.clone()?;
    Some(tokio::spawn(async move {
        // What the archive holds already, so a start rewrites nothing; if
        // it cannot be read, every decision is written again (replacing a
        // file that does not decode).
        let mut archived = read_archived(&ledger).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "node decisions in the archive unreadable; writing them all again");
            HashMap::new()
        });
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match sync(&gw, &ledger, &mut archived).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(nodes = n, "node decisions archived"),
                Err(e) => {
                    tracing::warn!(error = %e, "node decisions not archived; retrying")
                }
            }
        }
    }))
}
