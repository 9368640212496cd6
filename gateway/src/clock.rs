//! The gateway's clocks: the time it stamps on what happens, and the
//! compliance clock that decides when a retention period has ended.
//!
//! **The compliance clock** ([`Clock::compliance_ms`]) is WORM storage's
//! answer to "set the system clock forward a year, then delete" (NetApp
//! SnapLock's ComplianceClock is the model). It starts from the system
//! clock once, when a gateway first opens an empty index, is kept in the
//! index (`("C")` in `indexer::schema`) and from then on advances with the
//! monotonic clock of the gateways that run. Stepping the system clock
//! forward does not move it, so nobody ends a COMPLIANCE period or
//! expunges early that way, admins included. Time during which no gateway
//! ran is time it lags the system clock; it makes that up:
//!
//! - at once, as far as an independent source confirms the time: an RFC
//!   3161 time-stamping authority's verified `genTime`, or the cosignature
//!   times of a majority of the ledger's witnesses (the development TSA of
//!   `custodia up` signs with this machine's clock, so it does not count);
//! - without one, while it is behind, at most 1/64 faster than real time
//!   (about 5.7 days a year), never past the system clock. The allowance
//!   is not saved up: a gateway that ran a year with its clocks agreeing has
//!   none to spend when the system clock jumps. Once a source has confirmed
//!   the time, it is not spent past that time either (as it has run on
//!   since, plus [`CONFIRM_AHEAD_MS`]): a system clock set forward, and
//!   left there, would otherwise draw the clock 1/64 ahead of the real time
//!   the source vouches for, ending a 7-year retention some 40 days early.
//!
//! Lagging only delays deletions, never advances them: a retention runs
//! until the compliance clock passes its date. An index with evidence but
//! no clock (an upgrade, `custodia recover-index`) starts it at its newest
//! filing's time, or the system clock if that is earlier.
//!
//! The sources are what the operator configures, so the guarantee holds as
//! far as `cluster.toml` is protected: an operator who can point the TSA or
//! the witnesses at services that lie can also edit the index.
//!
//! **The stamping clock** ([`Clock::now_ms`]) is the system clock, except
//! that it never falls below the compliance clock: a clock stepped back (an
//! operator, a bad NTP source, a restored snapshot) stamps filings with
//! about the real time, the compliance clock's, not the wrong one, and
//! cannot make a default retention period end early. Within a process it
//! holds still through a step back of up to [`MAX_HOLD_MS`] rather than go
//! back; a larger step back, of a clock that had run ahead, it follows, and
//! so does the next process: filing times must be right before they are
//! ordered (ids stay unique either way).

pub use indexer::schema::ClockRecord;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// How much faster than real time the compliance clock may catch up with
/// the system clock when no independent source confirms the time.
const UNCONFIRMED_CATCH_UP: u64 = 64;

/// The largest step back of the system clock that stamps hold still
/// through rather than follow.
pub const MAX_HOLD_MS: u64 = 5_000;

const NS_PER_MS: u64 = 1_000_000;

/// How far ahead of the system clock a confirmed time is taken (witness
/// times are whole seconds, and the clocks of two honest machines differ a
/// little): a time further ahead is held to the system clock plus this when
/// it is confirmed, so that it never lends weight to a system clock set
/// forward later on.
const CONFIRM_AHEAD_MS: u64 = 5_000;

/// `ms` from an independent source, no further ahead of the system clock
/// than [`CONFIRM_AHEAD_MS`]; said when it was (a TSA or witness whose
/// clock is wrong, or a system clock far behind).
fn held_to_system_clock(ms: u64, source: Source) -> u64 {
    let most = wall_ms().saturating_add(CONFIRM_AHEAD_MS);
    if ms > most {
        tracing::warn!(
            ?source,
            ahead_s = (ms - most + CONFIRM_AHEAD_MS) / 1000,
            "an independent time source is ahead of the system clock: its time is taken as the \
             system clock's, so a clock set forward later gains nothing from it"
        );
    }
    ms.min(most)
}

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
    /// The compliance clock at its last reading (ns since the Unix epoch),
    /// and when that was: each reading advances it by the monotonic time
    /// since the one before.
    compliance_ns: u64,
    read_at: Instant,
    /// The last stamp handed out.
    stamp_ms: u64,
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
        Clock {
            state: Mutex::new(State {
                compliance_ns: wall_ns(),
                read_at: Instant::now(),
                stamp_ms: 0,
                confirmed: None,
                witnesses: Vec::new(),
            }),
        }
    }
}

fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The system's wall clock, ms since the Unix epoch (not the compliance
/// clock: what other machines' stamps are compared with).
pub(crate) fn wall_ms() -> u64 {
    wall_ns() / NS_PER_MS
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
        s.compliance_ns =
            stored.map_or_else(wall_ns, |r| r.compliance_ms.saturating_mul(NS_PER_MS));
        s.read_at = Instant::now();
        ClockRecord {
            compliance_ms: s.compliance_ns / NS_PER_MS,
        }
    }

    /// The compliance clock, ms since the Unix epoch: retention has ended
    /// when this has passed its date.
    pub fn compliance_ms(&self) -> u64 {
        let mut s = self.lock();
        compliance(&mut s, wall_ns()) / NS_PER_MS
    }

    /// The time to stamp on what happens now, ms since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        let mut s = self.lock();
        let wall = wall_ns();
        let base = (wall.max(compliance(&mut s, wall))) / NS_PER_MS;
        let t = if s.stamp_ms > base && s.stamp_ms - base <= MAX_HOLD_MS {
            s.stamp_ms
        } else {
            base
        };
        s.stamp_ms = t;
        t
    }

    /// An independent source vouches that it is at least `ms` now.
    pub fn confirm(&self, ms: u64, source: Source) {
        let ms = held_to_system_clock(ms, source);
        let mut s = self.lock();
        confirm(&mut s, ms, source);
    }

    /// Witness `index` of `count` cosigned at `ms`: once a majority has
    /// cosigned, the time all of that majority vouch for is confirmed.
    pub fn witnessed(&self, index: usize, count: usize, ms: u64) {
        let ms = held_to_system_clock(ms, Source::Witnesses);
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
        let wall = wall_ns();
        Reading {
            system_ms: wall / NS_PER_MS,
            compliance_ms: compliance(&mut s, wall) / NS_PER_MS,
            confirmed: s.confirmed.map(|c| (c.source, c.at.elapsed())),
        }
    }
}

/// How often the compliance clock is written to the index (what a
/// restart may lose of it) and its gauge refreshed.
const KEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Takes the compliance clock from the index, or starts it there: at the
/// newest filing's time if the index holds evidence (an upgrade, a
/// recovered index), else from the system clock. Says so in the log when
/// the system clock is behind it (stepped back) or far ahead (not yet
/// confirmed).
pub async fn start<S: crate::api::Store>(
    gw: &crate::api::Gateway<S>,
) -> Result<(), indexer::schema::SchemaError> {
    let (stored, newest_filing) = indexer::run(&gw.store, |tx| async move {
        Ok::<_, indexer::schema::SchemaError>((
            indexer::schema::clock_tx(&tx).await?,
            indexer::schema::newest_filing_ms_tx(&tx).await?,
        ))
    })
    .await?;
    // An index with evidence but no clock: start where its newest filing
    // was, not wherever the system clock says now (it may have been set
    // forward for the occasion).
    let start_at = stored.or(newest_filing.map(|ms| ClockRecord {
        compliance_ms: ms.min(wall_ms()),
    }));
    let rec = gw.clock.seed(start_at);
    indexer::run(&gw.store, |tx| async move {
        indexer::schema::advance_clock_tx(&tx, rec).await
    })
    .await?;
    let offset_s = (rec.compliance_ms as f64 - wall_ms() as f64) / 1000.0;
    gw.metrics.compliance_clock_offset.set(offset_s);
    match stored {
        None if newest_filing.is_some() => tracing::warn!(
            behind_s = -offset_s,
            "the index has evidence but no compliance clock (an upgrade, or a recovered \
             index): it starts at the newest filing's time"
        ),
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

/// Reads the compliance clock (ns) at system time `wall` (ns): the last
/// reading plus the monotonic time since; while behind the system clock
/// (and the confirmed time, once there is one), plus 1/64 of that time, up
/// to it; up to the confirmed time, if later, but never past the system
/// clock.
fn compliance(s: &mut State, wall: u64) -> u64 {
    let now = Instant::now();
    let dt = u64::try_from(now.saturating_duration_since(s.read_at).as_nanos()).unwrap_or(u64::MAX);
    s.read_at = now;
    let steady = s.compliance_ns.saturating_add(dt);
    let catch_up_to = match &s.confirmed {
        Some(confirmed) => wall.min(
            confirmed
                .now_ms()
                .saturating_add(CONFIRM_AHEAD_MS)
                .saturating_mul(NS_PER_MS),
        ),
        None => wall,
    };
    let mut c = if catch_up_to > steady {
        catch_up_to.min(steady.saturating_add(dt / UNCONFIRMED_CATCH_UP))
    } else {
        steady
    };
    if let Some(confirmed) = &s.confirmed {
        c = c.max(wall.min(confirmed.now_ms().saturating_mul(NS_PER_MS)));
    }
    s.compliance_ns = c;
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const DAY: u64 = 86_400_000;

    /// A clock whose compliance clock was `behind` ms behind the system
    /// clock when it was last read, `ago` ms ago.
    fn clock(behind: i64, ago: u64) -> Clock {
        let c = Clock::default();
        c.seed(Some(ClockRecord {
            compliance_ms: (wall_ms() as i64 - behind) as u64,
        }));
        c.lock().read_at = Instant::now() - Duration::from_millis(ago);
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
            "64 s after the last reading it caught up 64 s + 1 s, lagging {lag} ms"
        );
        // Stamps follow the system clock.
        assert!(c.now_ms() >= wall_ms() - 5);
    }

    #[test]
    fn catching_up_is_not_saved_up_while_the_clocks_agree() {
        // An hour with the clocks agreeing, then the system clock jumps
        // 11 hours forward: the compliance clock moves by the time since
        // its last reading (and 1/64 of it), not by 1/64 of the hour.
        let t0 = 1_000 * DAY * NS_PER_MS;
        let mut s = State {
            compliance_ns: t0,
            read_at: Instant::now() - Duration::from_secs(3_600),
            stamp_ms: 0,
            confirmed: None,
            witnesses: Vec::new(),
        };
        let hour = 3_600_000 * NS_PER_MS;
        let agreed = compliance(&mut s, t0 + hour);
        assert!(agreed - (t0 + hour) < 10 * NS_PER_MS, "{agreed}");
        let jumped = compliance(&mut s, t0 + 12 * hour);
        assert!(
            jumped - agreed < 100 * NS_PER_MS,
            "moved {} ms on the jump",
            (jumped - agreed) / NS_PER_MS
        );
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
        // Nor does it lend weight to the system clock set forward later:
        // the time confirmed was held to the system clock's when it came.
        let mut s = c.lock();
        let later = compliance(&mut s, (wall_ms() + DAY) * NS_PER_MS) / NS_PER_MS;
        assert!(
            later <= wall_ms() + CONFIRM_AHEAD_MS,
            "a TSA's day ahead let a clock set forward move it {} s",
            (later - wall_ms()) / 1000
        );
    }

    /// A system clock set forward and left there draws the clock at most
    /// 1/64 faster than real time; once a source has confirmed the real
    /// time, not past it.
    #[test]
    fn a_confirmed_time_bounds_the_catch_up_to_a_clock_set_forward() {
        let year = 365 * DAY;
        let real = wall_ms();
        let mut s = State {
            compliance_ns: real * NS_PER_MS,
            read_at: Instant::now() - Duration::from_secs(640),
            stamp_ms: 0,
            confirmed: None,
            witnesses: Vec::new(),
        };
        let forward = (real + year) * NS_PER_MS;
        let unconfirmed = compliance(&mut s, forward) / NS_PER_MS;
        // 640 s on, 10 s ahead of the real time (a year on, 5.7 days): the
        // documented allowance where nothing vouches for the time.
        let ahead = unconfirmed - (real + 640_000);
        assert!((9_900..=10_100).contains(&ahead), "{ahead} ms ahead");
        // The same with a TSA that confirmed the real time 640 s ago.
        s.compliance_ns = real * NS_PER_MS;
        s.read_at = Instant::now() - Duration::from_secs(640);
        s.confirmed = Some(Confirmed {
            ms: real,
            at: Instant::now() - Duration::from_secs(640),
            source: Source::Tsa,
        });
        let bounded = compliance(&mut s, forward) / NS_PER_MS;
        let ahead = bounded.saturating_sub(real + 640_000);
        assert!(
            ahead <= CONFIRM_AHEAD_MS + 50,
            "{ahead} ms ahead of the confirmed time"
        );
        // Behind the confirmed time, it is taken up to it at once, as ever.
        s.compliance_ns = (real - DAY) * NS_PER_MS;
        let caught = compliance(&mut s, forward) / NS_PER_MS;
        assert!(caught + 100 >= real + 640_000, "{caught}");
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
        // Two of three a day ahead: held to the system clock as they come.
        c.witnessed(1, 3, now + DAY);
        c.witnessed(2, 3, now + DAY);
        let mut s = c.lock();
        let later = compliance(&mut s, (wall_ms() + DAY) * NS_PER_MS) / NS_PER_MS;
        assert!(later <= wall_ms() + CONFIRM_AHEAD_MS, "{later}");
    }

    #[test]
    fn a_system_clock_stepped_back_stamps_about_the_real_time() {
        // The compliance clock a day ahead of the system clock: as after a
        // restart with the system clock stepped back a day.
        let c = clock(-(DAY as i64), 0);
        let stamp = c.now_ms();
        assert!(stamp >= wall_ms() + DAY - 1_000, "stamped {stamp}");
        assert!(c.now_ms() >= stamp);
        // And the compliance clock keeps its own time.
        assert!(c.compliance_ms() >= wall_ms() + DAY - 1_000);
    }

    #[test]
    fn stamps_hold_still_through_a_small_step_back_and_follow_a_large_one() {
        let c = Clock::default();
        c.seed(None);
        let held = wall_ms() + 3_000;
        c.lock().stamp_ms = held;
        assert_eq!(c.now_ms(), held, "a 3 s step back is held through");
        c.lock().stamp_ms = wall_ms() + 60_000;
        let t = c.now_ms();
        assert!(
            t < wall_ms() + 1_000,
            "a minute's step back is followed: {t}"
        );
    }
}
