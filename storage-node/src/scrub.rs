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
//!
//! Where a pass is, and when the last one began and ended, are kept in the
//! data directory (`scrub.state`, saved every [`SAVE_EVERY`]): a node
//! restarted more often than a pass takes (a 10 TB disk takes days) goes on
//! where it stopped, instead of checking the start of its listing again
//! and again and the rest never, and its last-pass time does not start
//! again at nothing.

use crate::metrics::{clamp, NodeMetrics};
use crate::store::{ScrubPage, ShardStore, StoreError};
use protocol::ShardKey;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Shards listed per step of a pass.
const PAGE: usize = 64;

/// The file, in the data directory, scrubbing keeps its place in.
pub const STATE_FILE: &str = "scrub.state";
const STATE_V1: u8 = 1;

/// How often a pass under way saves its place (at most this much of a
/// pass is done again after a restart).
const SAVE_EVERY: Duration = Duration::from_secs(30);

/// Where scrubbing is, kept across restarts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubState {
    /// The pass under way, if one is.
    pub pass: Option<PassState>,
    /// When the last whole pass began and ended (ms since the epoch).
    pub last_pass: Option<(u64, u64)>,
}

/// A pass under way.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassState {
    /// When it began (ms since the epoch).
    pub started_ms: u64,
    /// The last shard it checked: it goes on after it.
    pub after: Option<ShardKey>,
    /// Shards checked, found corrupt, and bytes read so far.
    pub done: u64,
    pub corrupt: u64,
    pub bytes: u64,
}

impl ScrubState {
    /// The state saved in `dir`; none (a first pass from the start) if
    /// there is none or it cannot be read, which is said.
    pub fn load(dir: &Path) -> ScrubState {
        let path = dir.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => protocol::wire::decode_versioned(STATE_V1, &bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "scrub's saved place is unreadable; starting a pass from the beginning");
                ScrubState::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ScrubState::default(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not read scrub's saved place; starting a pass from the beginning");
                ScrubState::default()
            }
        }
    }

    /// Saves the state in `dir`, replacing the old one whole (a crash
    /// leaves one or the other; each save writes a temporary file of its
    /// own, so two at once cannot mix).
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        crate::store::write_durably(
            dir,
            STATE_FILE,
            &[&protocol::wire::encode_versioned(STATE_V1, self)],
        )
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Saves `state` in `dir` off the runtime's threads; a failure is said, and
/// scrubbing goes on (it costs only a place to resume from).
async fn save(state: &ScrubState, dir: &Path) {
    let (state, dir) = (state.clone(), dir.to_path_buf());
    let saved = tokio::task::spawn_blocking(move || state.save(&dir)).await;
    match saved {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not save scrub's place"),
        Err(e) => tracing::warn!(error = %e, "could not save scrub's place"),
    }
}

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
    metrics
        .scrub_interval
        .set(clamp(config.pass_interval.as_secs()));
    let dir: PathBuf = store.root().to_path_buf();
    let mut state = ScrubState::load(&dir);
    if let Some((_, ended_ms)) = state.last_pass {
        metrics.scrub_last_pass.set(ended_ms as f64 / 1000.0);
    }
    // Where the pass stands, from the start: between passes, the last one
    // is done (a progress of 0 while the next waits its turn would read as
    // a stalled pass); one under way is as far as it got.
    match &state.pass {
        None if state.last_pass.is_some() => metrics.scrub_progress.set(1.0),
        Some(p) => {
            let total = store.info().map(|i| i.shards).unwrap_or(0).max(1);
            metrics
                .scrub_progress
                .set((p.done as f64 / total as f64).min(0.999));
        }
        None => {}
    }
    if config.bytes_per_sec == 0 {
        tracing::info!("scrubbing is off");
        return;
    }
    // Shard directories found unlistable, said and counted once while
    // this process runs (not again at every pass: damage counted anew
    // each day would keep the corrupt-shard alert up for good over one
    // old fault, and hide a new one).
    let mut unlisted = std::collections::HashSet::new();
    loop {
        if state.pass.is_none() {
            // The next pass begins `pass_interval` after the last began, by
            // the wall clock (which, unlike a monotonic one, outlives a
            // restart); never later than that from now, whatever a clock
            // set back says.
            if let Some((began_ms, _)) = state.last_pass {
                let due = began_ms.saturating_add(config.pass_interval.as_millis() as u64);
                let wait =
                    Duration::from_millis(due.saturating_sub(now_ms())).min(config.pass_interval);
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            state.pass = Some(PassState {
                started_ms: now_ms(),
                ..Default::default()
            });
            save(&state, &dir).await;
        } else {
            tracing::info!("scrub goes on with the pass a restart interrupted");
        }
        tokio::select! {
            _ = stop.changed() => {
                // Where it got to, for the next start.
                save(&state, &dir).await;
                return;
            }
            () = pass(&store, &metrics, config.bytes_per_sec, &mut state, &dir, &mut unlisted) => {}
        }
    }
}

/// What a shard costs scrub's rate at least, in bytes: about what a disk
/// reads sequentially in the time of a random read's seek. Shards are
/// found by key, not by where they lie, so each is a random read (two, with
/// its listing), and at 4 KiB each the byte rate alone allowed thousands a
/// second, more than a spinning disk serves in all.
const SHARD_MIN_COST: u64 = 64 << 10;

/// One pass over every shard, or the rest of the one `state` holds; it
/// saves its place every [`SAVE_EVERY`] and, at its end, when it ended.
async fn pass(
    store: &Arc<ShardStore>,
    metrics: &NodeMetrics,
    bytes_per_sec: u64,
    state: &mut ScrubState,
    dir: &Path,
    unlisted: &mut std::collections::HashSet<PathBuf>,
) {
    let total = store.info().map(|i| i.shards).unwrap_or(0).max(1);
    let started = Instant::now();
    let mut pace = Pace::new(bytes_per_sec, started);
    let mut saved_at = started;
    let place = state.pass.clone().unwrap_or_default();
    let (mut done, mut corrupt, mut bytes) = (place.done, place.corrupt, place.bytes);
    let mut after = place.after;
    metrics
        .scrub_pass_started
        .set(place.started_ms as f64 / 1000.0);
    metrics
        .scrub_progress
        .set((done as f64 / total as f64).min(0.999));
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
        let page_end = last.key;
        for header in page {
            let s = store.clone();
            let key = header.key;
            // What a shard costs the disk, read whole or found corrupt: its
            // bytes, and never less than a seek's worth, so that small
            // shards are not read at thousands of random reads a second.
            let cost = u64::from(header.len).max(SHARD_MIN_COST);
            match run_blocking(move || s.get_from_disk(&key)).await {
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
            // Its place: the shard just checked (a stop while it sleeps
            // below saves it).
            after = Some(key);
            if let Some(p) = state.pass.as_mut() {
                (p.after, p.done, p.corrupt, p.bytes) = (after, done, corrupt, bytes);
            }
            if saved_at.elapsed() >= SAVE_EVERY {
                save(state, dir).await;
                saved_at = Instant::now();
            }
            // Never ahead of the rate: sleep off whatever was read too fast.
            let wait = pace.after(cost, Instant::now());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        after = Some(page_end);
    }
    let ended_ms = now_ms();
    let began_ms = state.pass.as_ref().map_or(ended_ms, |p| p.started_ms);
    state.pass = None;
    state.last_pass = Some((began_ms, ended_ms));
    save(state, dir).await;
    metrics.scrub_progress.set(1.0);
    metrics.scrub_pass_started.set(0.0);
    metrics.scrub_passes.inc();
    metrics.scrub_last_pass.set(ended_ms as f64 / 1000.0);
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
    use protocol::{Blake3Hash, ErasureCode, EvidenceId, ShardHeader};

    /// A store in `dir` holding `n` shards.
    fn store_with(dir: &Path, n: u64) -> Arc<ShardStore> {
        let store = ShardStore::open(dir).unwrap();
        for i in 0..n {
            let body = vec![i as u8; 100];
            let header = ShardHeader {
                key: ShardKey {
                    evidence: EvidenceId::new(1_000 + i, [i as u8; 10]),
                    stripe: 0,
                    index: 0,
                },
                code: ErasureCode::new(4, 2, 4096).unwrap(),
                stripe_len: 400,
                len: 100,
                blake3: Blake3Hash::of(&body),
            };
            store.put(&header, &body).unwrap();
        }
        Arc::new(store)
    }

    /// A pass interrupted by a restart goes on after the last shard it
    /// checked, not from the start; at its end it saves when it began and
    /// ended, which the next start reads back (the last-pass gauge with it).
    #[tokio::test]
    async fn a_pass_resumes_where_a_restart_left_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(dir.path(), 10);
        let listed = store.list(None, 100).unwrap();
        assert_eq!(listed.len(), 10);
        let state = ScrubState {
            pass: Some(PassState {
                started_ms: 5_000,
                after: Some(listed[5].key),
                done: 6,
                ..Default::default()
            }),
            last_pass: Some((1_000, 2_000)),
        };
        state.save(dir.path()).unwrap();
        assert_eq!(ScrubState::load(dir.path()), state);
        let metrics = NodeMetrics::new(&prometheus::Registry::new()).unwrap();
        let mut state = ScrubState::load(dir.path());
        pass(
            &store,
            &metrics,
            1 << 30,
            &mut state,
            dir.path(),
            &mut Default::default(),
        )
        .await;
        assert_eq!(
            metrics.scrub_shards.get(),
            4,
            "only the shards after its place"
        );
        let saved = ScrubState::load(dir.path());
        assert_eq!(saved, state);
        assert_eq!(saved.pass, None);
        let (began, ended) = saved.last_pass.unwrap();
        assert_eq!(began, 5_000, "the pass began before the restart");
        assert!(ended >= began);
        assert_eq!(metrics.scrub_last_pass.get(), ended as f64 / 1000.0);
        assert_eq!(metrics.scrub_pass_started.get(), 0.0, "no pass under way");

        // The next start, within an hour of the last pass's beginning: it
        // knows when that pass ended, and waits for the next.
        let recent = ScrubState {
            pass: None,
            last_pass: Some((now_ms() - 1_000, now_ms())),
        };
        recent.save(dir.path()).unwrap();
        let (_, ended) = recent.last_pass.unwrap();
        let (stop_tx, stop) = watch::channel(false);
        let restarted = NodeMetrics::new(&prometheus::Registry::new()).unwrap();
        let config = ScrubConfig {
            bytes_per_sec: 1 << 30,
            pass_interval: Duration::from_secs(3600),
        };
        let run = tokio::spawn(run(store.clone(), restarted.clone(), config, stop));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(restarted.scrub_last_pass.get(), ended as f64 / 1000.0);
        assert_eq!(restarted.scrub_shards.get(), 0, "no pass before it is due");
        // Between passes, the last one is done (not a pass stalled at 0).
        assert_eq!(restarted.scrub_progress.get(), 1.0);
        stop_tx.send(true).unwrap();
        run.await.unwrap();
    }

    /// A saved place that cannot be read starts a pass from the beginning.
    #[test]
    fn an_unreadable_place_starts_from_the_beginning() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"\x09garbage").unwrap();
        assert_eq!(ScrubState::load(dir.path()), ScrubState::default());
        assert_eq!(
            ScrubState::load(&dir.path().join("none")),
            ScrubState::default()
        );
    }

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
