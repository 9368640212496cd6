//! Scrubbing: the node re-reads every shard it holds at a bounded rate and
//! checks it against the BLAKE3 in its header, so corruption is found while
//! the other shards of its stripe can still rebuild it, not when a court
//! asks for the file.
//!
//! A shard that fails is quarantined by the store (moved aside, kept for
//! forensics, never served again) and counted; the gateway's repair worker
//! collects the quarantined keys (`ListQuarantined`) and rebuilds them. A pass
//! walks the inventory in listing order; passes start at most every
//! [`ScrubConfig::pass_interval`], and the read rate never exceeds
//! [`ScrubConfig::bytes_per_sec`] so foreground traffic keeps the disk.

use crate::metrics::{clamp, NodeMetrics};
use crate::store::{ScrubPage, ShardStore, StoreError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Shards listed per step of a pass.
const PAGE: usize = 64;

/// How hard a node scrubs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScrubConfig {
    /// Shard bytes read per second at most; 0 turns scrubbing off.
    pub bytes_per_sec: u64,
    /// Least time from the start of one pass to the start of the next.
    pub pass_interval: Duration,
}

impl Default for ScrubConfig {
    /// 32 MiB/s (a 10 TB disk in under 4 days), one pass a day at most.
    fn default() -> Self {
        ScrubConfig {
            bytes_per_sec: 32 << 20,
            pass_interval: Duration::from_secs(24 * 3600),
        }
    }
}

/// Scrubs until `stop` says so.
pub async fn run(
    store: Arc<ShardStore>,
    metrics: NodeMetrics,
    config: ScrubConfig,
    mut stop: watch::Receiver<bool>,
) {
    metrics.scrub_rate.set(clamp(config.bytes_per_sec));
    if config.bytes_per_sec == 0 {
        tracing::info!("scrubbing is off");
        return;
    }
    loop {
        let started = Instant::now();
        tokio::select! {
            _ = stop.changed() => return,
            () = pass(&store, &metrics, config.bytes_per_sec) => {}
        }
        let next = started + config.pass_interval;
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep_until(next.into()) => {}
        }
    }
}

/// One pass over every shard.
async fn pass(store: &Arc<ShardStore>, metrics: &NodeMetrics, bytes_per_sec: u64) {
    let total = store.info().map(|i| i.shards).unwrap_or(0).max(1);
    let started = Instant::now();
    let mut pace = Pace::new(bytes_per_sec, started);
    let (mut done, mut corrupt, mut bytes) = (0u64, 0u64, 0u64);
    let mut after = None;
    // Directories found unlistable this pass: a page may end within one
    // (on its packed shards) and the next begin there again.
    let mut unlisted = std::collections::HashSet::new();
    metrics.scrub_progress.set(0.0);
    loop {
        let s = store.clone();
        let ScrubPage {
            shards: page,
            damaged: listed,
            unlistable,
        } = match run_blocking(move || s.list_finding_damage(after.as_ref(), PAGE)).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "scrub could not list shards; retrying in a minute");
                tokio::time::sleep(Duration::from_secs(60)).await;
                continue;
            }
        };
        // A directory of shards that cannot be listed: none of its shards
        // is checked, and none can be found by reads that do not name it.
        // Counted as corrupt (one each), so the alert on corrupt shards
        // fires; the pass goes on past it.
        for dir in unlistable {
            if !unlisted.insert(dir.clone()) {
                continue;
            }
            corrupt += 1;
            metrics.scrub_corrupt.inc();
            metrics.corrupt_shards.inc();
            tracing::error!(
                dir = %dir.display(),
                "scrub cannot list this shard directory: its shards go unchecked; check the \
                 disk, and run `custodia repair --verify-all` to rebuild what it holds elsewhere"
            );
        }
        // Files the listing itself found torn or unreadable (quarantined
        // there) are this pass's findings too.
        if listed > 0 {
            corrupt += listed;
            metrics.scrub_corrupt.inc_by(listed);
            metrics.corrupt_shards.inc_by(listed);
            tracing::warn!(
                shards = listed,
                "scrub's listing found damaged shards; quarantined for repair"
            );
        }
        let Some(last) = page.last() else { break };
        after = Some(last.key);
        for header in page {
            let s = store.clone();
            let key = header.key;
            // What a shard costs the disk, read whole or found corrupt.
            let cost = u64::from(header.len);
            match run_blocking(move || s.get(&key)).await {
                Ok((_, body)) => {
                    bytes += body.len() as u64;
                    metrics.scrub_bytes.inc_by(body.len() as u64);
                }
                Err(StoreError::Corrupt(_)) => {
                    corrupt += 1;
                    metrics.scrub_corrupt.inc();
                    metrics.corrupt_shards.inc();
                    tracing::warn!(shard = %key, "scrub found a corrupt shard; quarantined for repair");
                }
                Err(StoreError::NotFound) => {} // deleted since listed
                Err(e) => tracing::warn!(shard = %key, error = %e, "scrub could not read a shard"),
            }
            done += 1;
            metrics.scrub_shards.inc();
            // Shards put during the pass are listed too, so `done` may pass
            // the count taken at its start: 1 is kept for a pass that has
            // ended, which the stalled-scrub alert (progress below 1, no
            // shard checked for hours) relies on.
            metrics
                .scrub_progress
                .set((done as f64 / total as f64).min(0.999));
            // Never ahead of the rate: sleep off whatever was read too fast.
            let wait = pace.after(cost, Instant::now());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
    }
    metrics.scrub_progress.set(1.0);
    metrics.scrub_passes.inc();
    metrics.scrub_last_pass.set(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0),
    );
    tracing::info!(
        shards = done,
        corrupt,
        bytes,
        secs = started.elapsed().as_secs_f64(),
        "scrub pass done"
    );
}

/// Keeps scrub's reads at `bytes_per_sec` on average, never more than a
/// second's worth ahead of it after a stall: time it spent slowed (by
/// foreground work on the disk, a failed listing's minute of waiting) is
/// not made up later in a burst at full disk speed, which would starve the
/// reads and filings the rate is there to leave room for.
struct Pace {
    bytes_per_sec: u64,
    since: Instant,
    bytes: u64,
}

impl Pace {
    fn new(bytes_per_sec: u64, now: Instant) -> Pace {
        Pace {
            bytes_per_sec: bytes_per_sec.max(1),
            since: now,
            bytes: 0,
        }
    }

    /// How long to wait, at `now`, after reading `bytes` more.
    fn after(&mut self, bytes: u64, now: Instant) -> Duration {
        self.bytes += bytes;
        let due = Duration::from_secs_f64(self.bytes as f64 / self.bytes_per_sec as f64);
        let elapsed = now.saturating_duration_since(self.since);
        if let Some(wait) = due.checked_sub(elapsed) {
            return wait;
        }
        if elapsed - due > Duration::from_secs(1) {
            // Behind by more than a second: the schedule starts again now.
            self.since = now;
            self.bytes = 0;
        }
        Duration::ZERO
    }
}

async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(_) => Err(StoreError::Io(std::io::Error::other("scrub task panicked"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rate holds on average, and an hour spent slowed earns no burst:
    /// once the stall ends, reads wait as if the pass had just begun.
    #[test]
    fn scrub_keeps_its_rate_and_makes_up_no_stall() {
        let t0 = Instant::now();
        let mut pace = Pace::new(1000, t0);
        assert_eq!(pace.after(500, t0), Duration::from_millis(500));
        assert_eq!(
            pace.after(500, t0 + Duration::from_millis(500)),
            Duration::from_millis(500)
        );
        // An hour later (scrub was slowed): no credit for the hour.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(pace.after(500, later), Duration::ZERO);
        assert_eq!(pace.after(500, later), Duration::from_millis(500));
        assert_eq!(pace.after(1000, later), Duration::from_millis(1500));
    }
}
