//! Garbage collection of failed uploads.
//!
//! An upload that fails, or whose lease runs out (its gateway died, its client
//! vanished), is aborted in a transaction *before* any of its shards is deleted,
//! so a filing can never become visible with shards missing: the manifest commit
//! checks the intent and fails once it is aborted. Then the shards named by its
//! stripe records are deleted and the records forgotten.

use crate::api::Gateway;
use crate::api::Store;
use futures::StreamExt;
use indexer::schema;
use protocol::{EvidenceId, ShardKey, StripeRecord};
use std::sync::Arc;
use std::time::Duration;

/// Stripe records read per transaction while deleting.
const STRIPES_PER_READ: usize = 1024;

/// Deletes the shards of one stripe, best effort: an unreachable node keeps an
/// orphan that node-side orphan collection removes later.
pub async fn delete_stripe_shards<S: Store>(
    gw: &Gateway<S>,
    evidence: EvidenceId,
    stripe: u64,
    record: &StripeRecord,
) {
    let deletes = record.shards.iter().enumerate().filter_map(|(i, p)| {
        let addr = gw.nodes.addr(p.node?)?;
        let key = ShardKey { evidence, stripe, index: i as u8 };
        Some(async move {
            if let Err(e) = gw.nodes.client.rpc_delete_shard(addr, key).await {
                tracing::debug!(shard = %key, error = %e, "could not delete shard of an aborted upload");
            }
        })
    });
    futures::future::join_all(deletes).await;
}

/// Aborts `evidence`'s intent, deletes every shard its stripe records name, and
/// forgets it. Safe to run twice or concurrently with a dying upload.
pub async fn abort_and_delete<S: Store>(gw: &Gateway<S>, evidence: EvidenceId) {
    let aborted = indexer::run(&gw.store, |tx| async move {
        schema::abort_intent_tx(&tx, evidence).await
    })
    .await;
    match aborted {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::warn!(%evidence, error = %e, "could not abort intent; GC will retry");
            return;
        }
    }
    let mut next = 0u64;
    loop {
        let batch = indexer::run(&gw.store, |tx| async move {
            // Stripes of an aborted upload may have gaps: read by key range.
            schema::stripes_after_tx(&tx, evidence, next, STRIPES_PER_READ).await
        })
        .await;
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(%evidence, error = %e, "could not read stripes of an aborted upload; GC will retry");
                return;
            }
        };
        if batch.is_empty() {
            break;
        }
        futures::stream::iter(batch.iter())
            .for_each_concurrent(8, |(stripe, rec)| {
                delete_stripe_shards(gw, evidence, *stripe, rec)
            })
            .await;
        next = batch.last().map(|(s, _)| s + 1).unwrap_or(next);
    }
    if let Err(e) = indexer::run(&gw.store, |tx| async move {
        schema::forget_aborted_tx(&tx, evidence).await
    })
    .await
    {
        tracing::warn!(%evidence, error = %e, "could not forget aborted upload");
    }
}

/// One GC pass over stale intents; returns how many were collected.
pub async fn collect_once<S: Store>(gw: &Gateway<S>) -> usize {
    let now = gw.clock.now_ms();
    let stale = indexer::run(&gw.store, |tx| async move {
        schema::stale_intents_tx(&tx, now, 64).await
    })
    .await;
    let stale = match stale {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "GC could not list stale intents");
            return 0;
        }
    };
    for (evidence, _) in &stale {
        tracing::info!(%evidence, "collecting an abandoned upload");
        abort_and_delete(gw, *evidence).await;
    }
    stale.len()
}

/// Runs [`collect_once`] every `every`.
pub fn spawn_gc_loop<S: Store>(
    gw: Arc<Gateway<S>>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            collect_once(&gw).await;
        }
    })
}
