//! The gateway's clocks: the time it stamps on what happens, and the
//! compliance clock that decides when a retention period has ended.
//!
//! **The compliance clock** ([`Clock::compliance_ms`]) is WORM storage's
//! answer to "set the system clock forward a year, then delete" (NetApp
//! SnapLock's ComplianceClock is the model). It starts from the system
//! clock once, when a gateway first opens the index, is kept in the index
//! (`("C")` in `indexer::schema`) and from then on advances with the monotonic clock of the
//! gateways that run. Stepping the system clock forward does not move it, so
//! nobody ends a COMPLIANCE period or expunges early that way, admins
//! included. Time during which no gateway ran is time it lags the system
//! clock; it makes that up:
//!
//! - at once, as far as an independent source confirms the time: an RFC
//!   3161 time-stamping authority's verified `genTime`, or the cosignature
//!   times of a majority of the ledger's witnesses (the development TSA of
//!   `custodia up` signs with this machine's clock, so it does not count);
//! - without one, at most 1/64 faster than real time (about 5.7 days a
//!   year), never past the system clock.
//!
//! Lagging only delays deletions, never advances them: a retention runs
//! until the compliance clock passes its date.
//!
//! **The stamping clock** ([`Clock::now_ms`]) is the system clock, except
//! that it never goes backwards in a process and never falls below the
//! compliance clock: a clock stepped back (an operator, a bad NTP source, a
//! restored snapshot) stamps filings with about the real time, the
//! compliance clock's, not the wrong one, and cannot make a default
//! retention period end early. Across a restart stamps may step back by as
//! much as the compliance clock lost (the downtime): the stamp that starts
//! from the last one handed out would carry a forward step of the system
//! clock into every later process, and filing times must be right before
//! they are ordered (ids stay unique either way).

use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// How much faster than real time the compliance clock may catch up with
/// the system clock when no independent source confirms the time.
const UNCONFIRMED_CATCH_UP: u64 = 64;

pub use indexer::schema::ClockRecord;

/// Where an independent confirmation of the time came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// An RFC 3161 TSA's verified genTime.
    Tsa,
    /// Cosignature times of a majority of the ledger's witnesses.
    Witnesses,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Tsa => "tsa",
            Source::Witnesses => "witnesses",
        }
    }
}

/// A time someone else vouched for, and when we learned it.
#[derive(Clone, Copy, Debug)]
struct Confirmed {
    ms: u64,
    at: Instant,
    source: Source,
}

impl Confirmed {
    fn now_ms(&self) -> u64 {
        self.ms.saturating_add(elapsed_ms(self.at))
    }
}

#[derive(Debug)]
struct State {
    /// The compliance clock when this process learned it, and when.
    base_ms: u64,
    since: Instant,
    /// The last compliance reading (it never goes backwards).
    compliance_ms: u64,
    /// The last stamp handed out, and when (stamps continue from it at real
    /// rate, never backwards and never frozen).
    stamp_ms: u64,
    stamp_at: Instant,
    confirmed: Option<Confirmed>,
    /// Each witness's newest cosignature time, and when it arrived.
    witnesses: Vec<Option<(u64, Instant)>>,
}

/// The gateway's clocks (see the module documentation).
#[derive(Debug)]
pub struct Clock {
    state: Mutex<State>,
}

impl Default for Clock {
    /// Before [`Clock::seed`]: the compliance clock starts at the system
    /// clock now.
    fn default() -> Self {
        let now = Instant::now();
        Clock {
            state: Mutex::new(State {
                base_ms: wall_ms(),
                since: now,
                compliance_ms: 0,
                stamp_ms: 0,
                stamp_at: now,
                confirmed: None,
                witnesses: Vec::new(),
            }),
        }
    }
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn elapsed_ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

/// What [`Clock::reading`] reports (for `custodia status` and the metrics).
#[derive(Clone, Copy, Debug)]
pub struct Reading {
    pub system_ms: u64,
    pub compliance_ms: u64,
    /// The newest independent confirmation: its source and its age.
    pub confirmed: Option<(Source, std::time::Duration)>,
}

impl Clock {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the compliance clock from the index (`None`: the index has
    /// none yet and the system clock starts it). Returns the record to
    /// persist.
    pub fn seed(&self, stored: Option<ClockRecord>) -> ClockRecord {
        let mut s = self.lock();
        s.base_ms = stored.map_or_else(wall_ms, |r| r.compliance_ms);
        s.since = Instant::now();
        s.compliance_ms = s.base_ms;
        ClockRecord {
            compliance_ms: s.base_ms,
        }
    }

    /// The compliance clock, ms since the Unix epoch: retention has ended
    /// when this has passed its date.
    pub fn compliance_ms(&self) -> u64 {
        let mut s = self.lock();
        compliance(&mut s, wall_ms())
    }

    /// The time to stamp on what happens now, ms since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        let mut s = self.lock();
        let wall = wall_ms();
        let compliance = compliance(&mut s, wall);
        let continued = s.stamp_ms.saturating_add(elapsed_ms(s.stamp_at));
        let t = wall.max(compliance).max(continued);
        s.stamp_ms = t;
        s.stamp_at = Instant::now();
        t
    }

    /// An independent source vouches that it is at least `ms` now.
    pub fn confirm(&self, ms: u64, source: Source) {
        let mut s = self.lock();
        confirm(&mut s, ms, source);
    }

    /// Witness `index` of `count` cosigned at `ms`: once a majority has
    /// cosigned, the time all of that majority vouch for is confirmed.
    pub fn witnessed(&self, index: usize, count: usize, ms: u64) {
        let mut s = self.lock();
        if s.witnesses.len() != count {
            s.witnesses = vec![None; count];
        }
        let Some(slot) = s.witnesses.get_mut(index) else {
            return;
        };
        if slot.is_none_or(|(old, _)| old < ms) {
            *slot = Some((ms, Instant::now()));
        }
        let mut times: Vec<u64> = s
            .witnesses
            .iter()
            .flatten()
            .map(|(ms, at)| ms.saturating_add(elapsed_ms(*at)))
            .collect();
        times.sort_unstable_by(|a, b| b.cmp(a));
        let majority = count / 2 + 1;
        if let Some(&t) = times.get(majority - 1) {
            confirm(&mut s, t, Source::Witnesses);
        }
    }

    /// The system clock, the compliance clock and the newest confirmation.
    pub fn reading(&self) -> Reading {
        let mut s = self.lock();
        let system_ms = wall_ms();
        Reading {
            system_ms,
            compliance_ms: compliance(&mut s, system_ms),
            confirmed: s.confirmed.map(|c| (c.source, c.at.elapsed())),
        }
    }
}

/// How often the compliance clock is written to the index (what a
/// restart may lose of it) and its gauge refreshed.
const KEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Takes the compliance clock from the index, or starts it there from the
/// system clock if no gateway has before. Says so in the log when the
/// system clock is behind it (stepped back) or far ahead (not yet
/// confirmed).
pub async fn start<S: crate::api::Store>(
    gw: &crate::api::Gateway<S>,
) -> Result<(), indexer::schema::SchemaError> {
    let stored = indexer::run(&gw.store, |tx| async move {
        indexer::schema::clock_tx(&tx).await
    })
    .await?;
    let rec = gw.clock.seed(stored);
    indexer::run(&gw.store, |tx| async move {
        indexer::schema::advance_clock_tx(&tx, rec).await
    })
    .await?;
    let offset_s = (rec.compliance_ms as f64 - wall_ms() as f64) / 1000.0;
    gw.metrics.compliance_clock_offset.set(offset_s);
    match stored {
        None => tracing::info!("compliance clock started from the system clock"),
        Some(_) if offset_s > 1.0 => tracing::warn!(
            behind_s = offset_s,
            "the system clock is behind the compliance clock (stepped back?): filings are \
             stamped with the compliance clock until the system clock catches up"
        ),
        Some(_) if offset_s < -60.0 => tracing::warn!(
            lag_s = -offset_s,
            "the compliance clock lags the system clock (time no gateway ran, or a clock \
             set forward): retention ends by the compliance clock, which catches up as an \
             independent time source confirms the time"
        ),
        Some(_) => {}
    }
    Ok(())
}

/// Writes the compliance clock to the index every [`KEEP_EVERY`] (never
/// moving the stored one back) and refreshes its gauge.
pub fn spawn_keeper<S: crate::api::Store>(
    gw: std::sync::Arc<crate::api::Gateway<S>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(KEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let r = gw.clock.reading();
            gw.metrics
                .compliance_clock_offset
                .set((r.compliance_ms as f64 - r.system_ms as f64) / 1000.0);
            let rec = ClockRecord {
                compliance_ms: r.compliance_ms,
            };
            let kept = indexer::run(&gw.store, |tx| async move {
                indexer::schema::advance_clock_tx(&tx, rec).await
            })
            .await;
            if let Err(e) = kept {
                tracing::warn!(error = %e, "could not store the compliance clock");
            }
        }
    })
}

fn confirm(s: &mut State, ms: u64, source: Source) {
    if s.confirmed.is_none_or(|c| c.now_ms() < ms) {
        s.confirmed = Some(Confirmed {
            ms,
            at: Instant::now(),
            source,
        });
    }
}

fn compliance(s: &mut State, wall: u64) -> u64 {
    let e = elapsed_ms(s.since);
    let steady = s.base_ms.saturating_add(e);
    let catching_up = steady.saturating_add(e / UNCONFIRMED_CATCH_UP);
    let mut c = steady.max(wall.min(catching_up));
    if let Some(confirmed) = &s.confirmed {
        c = c.max(wall.min(confirmed.now_ms()));
    }
    c = c.max(s.compliance_ms);
    s.compliance_ms = c;
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const DAY: u64 = 86_400_000;

    /// A clock whose compliance clock was `behind` ms behind the system
    /// clock when it was seeded `ago` ms ago.
    fn clock(behind: i64, ago: u64) -> Clock {
        let c = Clock::default();
        c.seed(Some(ClockRecord {
            compliance_ms: (wall_ms() as i64 - behind) as u64,
        }));
        c.lock().since = Instant::now() - Duration::from_millis(ago);
        c
    }

    #[test]
    fn a_system_clock_ahead_of_the_compliance_clock_does_not_move_it() {
        // As after setting the system clock a day forward: the compliance
        // clock still reads about the stored time, plus its catch-up.
        let c = clock(DAY as i64, 64_000);
        let lag = wall_ms() - c.compliance_ms();
        assert!(
            (DAY - 66_000..=DAY - 64_000).contains(&lag),
            "64 s after the seed it caught up 64 s + 1 s, lagging {lag} ms"
        );
        // Stamps follow the system clock.
        assert!(c.now_ms() >= wall_ms() - 5);
    }

    #[test]
    fn an_independent_time_lets_it_catch_up_but_never_past_the_system_clock() {
        let c = clock(DAY as i64, 0);
        c.confirm(wall_ms() - 1_000, Source::Tsa);
        let lag = wall_ms() - c.compliance_ms();
        assert!((1_000..1_100).contains(&lag), "lag {lag} ms");
        // A TSA claiming the future gets the compliance clock no further
        // than the system clock.
        c.confirm(wall_ms() + DAY, Source::Tsa);
        let after = c.compliance_ms();
        assert!(after <= wall_ms(), "compliance clock past the system clock");
        let r = c.reading();
        assert_eq!(r.confirmed.map(|(s, _)| s), Some(Source::Tsa));
    }

    #[test]
    fn witnesses_confirm_only_what_a_majority_vouches_for() {
        let c = clock(DAY as i64, 0);
        let now = wall_ms();
        // One of three, however far ahead, is not a majority.
        c.witnessed(0, 3, now);
        assert!(wall_ms() - c.compliance_ms() > DAY - 5_000);
        // Two of three: the older of the two is confirmed.
        c.witnessed(1, 3, now - 10_000);
        let lag = wall_ms() - c.compliance_ms();
        assert!((10_000..10_200).contains(&lag), "lag {lag} ms");
    }

    #[test]
    fn a_system_clock_stepped_back_stamps_no_earlier_than_before() {
        // The compliance clock a day ahead of the system clock: as after a
        // restart with the system clock stepped back a day.
        let c = clock(-(DAY as i64), 0);
        let stamp = c.now_ms();
        assert!(stamp >= wall_ms() + DAY - 1_000, "stamped {stamp}");
        let next = c.now_ms();
        assert!(next >= stamp);
        // And the compliance clock keeps its own time.
        assert!(c.compliance_ms() >= wall_ms() + DAY - 1_000);
    }

    #[test]
    fn stamps_never_go_backwards_in_a_process() {
        let c = Clock::default();
        c.seed(None);
        c.lock().stamp_ms = wall_ms() + 60_000;
        let t = c.now_ms();
        assert!(t >= wall_ms() + 59_000, "a stamp went back: {t}");
        std::thread::sleep(Duration::from_millis(20));
        assert!(c.now_ms() >= t + 20, "stamps keep advancing at real rate");
    }
}
