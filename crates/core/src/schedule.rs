//! Schedules: when a schedule fires. A schedule's cadence is a cron expression (five fields, or
//! six with a leading seconds field) read on the wall clock of an IANA time zone, or a fixed
//! interval (`every`) counted from the Unix epoch, so `every 2s` fires on even seconds whoever
//! computes it. Start and end bounds clip the sequence; a per-fire jitter, derived from the
//! schedule and the fire time (the same on every coordinator), delays when a fire is due.
//!
//! DST (croner's rules, those of the Open Cron Pattern Specification): a fixed-time job whose
//! time falls in a spring-forward gap fires once, right after the gap; one in a fall-back
//! repeat fires once, on the first pass; interval and wildcard jobs fire at each wall-clock
//! match that exists, so on both passes of a repeated hour and not inside a gap.
//!
//! Fire times are *nominal*: the key of a fire (`schedule_fire(schedule_id, fire_at)`) is its
//! nominal time; jitter only moves when it is due.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The shortest `every` interval.
pub const MIN_EVERY: Duration = Duration::from_secs(1);

/// What a fire does while the previous run of the same schedule is still live (not completed,
/// failed or stopped).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverlapPolicy {
    /// The fire is recorded skipped. Pick this when unsure: runs never pile up.
    #[default]
    Skip,
    /// The fire waits until the live run ends, then starts; at most one waits, later fires
    /// meanwhile are skipped.
    BufferOne,
    /// Start anyway: runs may overlap.
    AllowAll,
    /// Ask the live runs to stop (gracefully, after their current step), and start.
    CancelOther,
    /// Stop the live runs at once (fenced, like `kill`), and start.
    TerminateOther,
}

impl OverlapPolicy {
    pub const ALL: [OverlapPolicy; 5] = [
        Self::Skip,
        Self::BufferOne,
        Self::AllowAll,
        Self::CancelOther,
        Self::TerminateOther,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Skip => "skip",
            Self::BufferOne => "buffer_one",
            Self::AllowAll => "allow_all",
            Self::CancelOther => "cancel_other",
            Self::TerminateOther => "terminate_other",
        }
    }
}

impl fmt::Display for OverlapPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OverlapPolicy {
    type Err = ScheduleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| ScheduleError::Overlap(s.to_owned()))
    }
}

/// What became of one fire time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FireOutcome {
    /// An instance was started for it.
    Fired,
    /// No instance: missed beyond the catch-up window, or the overlap policy said so.
    Skipped,
    /// Waiting for the live run to end (`buffer_one`).
    Buffered,
}

impl FireOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fired => "fired",
            Self::Skipped => "skipped",
            Self::Buffered => "buffered",
        }
    }
}

impl FromStr for FireOutcome {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::Fired, Self::Skipped, Self::Buffered]
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| format!("unknown fire outcome {s:?}"))
    }
}

/// A schedule that cannot be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("invalid cron expression {expr:?}: {reason}")]
    Cron { expr: String, reason: String },
    #[error("unknown time zone {0:?} (an IANA name such as \"Europe/Paris\" or \"UTC\")")]
    Timezone(String),
    #[error("every must be at least 1s and whole milliseconds (got {0:?})")]
    Every(Duration),
    #[error(
        "unknown overlap policy {0:?} (known: skip, buffer_one, allow_all, cancel_other, terminate_other)"
    )]
    Overlap(String),
    #[error("end_at must be after start_at")]
    Bounds,
}

/// How often a schedule fires.
#[derive(Clone, Debug)]
pub enum Cadence {
    /// A cron expression on the wall clock of `tz`.
    Cron {
        expr: String,
        cron: Box<Cron>,
        tz: Tz,
    },
    /// Every `every` since the Unix epoch.
    Every { every: Duration },
}

impl Cadence {
    /// A cron cadence: 5 fields (minute precision) or 6 (a leading seconds field), read in
    /// the IANA time zone `timezone`.
    pub fn cron(expr: &str, timezone: &str) -> Result<Self, ScheduleError> {
        let tz: Tz = timezone
            .parse()
            .map_err(|_| ScheduleError::Timezone(timezone.to_owned()))?;
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(expr)
            .map_err(|e| ScheduleError::Cron {
                expr: expr.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(Self::Cron {
            expr: expr.to_owned(),
            cron: Box::new(cron),
            tz,
        })
    }

    /// An interval cadence: at least [`MIN_EVERY`], whole milliseconds.
    pub fn every(every: Duration) -> Result<Self, ScheduleError> {
        if every < MIN_EVERY || !every.subsec_nanos().is_multiple_of(1_000_000) {
            return Err(ScheduleError::Every(every));
        }
        Ok(Self::Every { every })
    }

    /// The first time strictly after `after` (or at it, if `inclusive`).
    fn next(&self, after: DateTime<Utc>, inclusive: bool) -> Option<DateTime<Utc>> {
        match self {
            Self::Cron { cron, tz, .. } => cron
                .find_next_occurrence(&after.with_timezone(tz), inclusive)
                .ok()
                .map(|t| t.with_timezone(&Utc)),
            Self::Every { every } => {
                let every_ms = i64::try_from(every.as_millis()).ok()?;
                // Whole milliseconds: fire times are whole milliseconds since the epoch.
                let at_ms = after.timestamp_millis();
                let exact = after.timestamp_subsec_nanos().is_multiple_of(1_000_000);
                let k = at_ms.div_euclid(every_ms);
                let on_grid = exact && at_ms.rem_euclid(every_ms) == 0;
                let k = if on_grid && inclusive { k } else { k + 1 };
                DateTime::from_timestamp_millis(k.checked_mul(every_ms)?)
            }
        }
    }
}

/// When a schedule fires: its cadence, clipped to `[start_at, end_at]`.
#[derive(Clone, Debug)]
pub struct Calendar {
    pub cadence: Cadence,
    pub start_at: Option<DateTime<Utc>>,
    pub end_at: Option<DateTime<Utc>>,
}

impl Calendar {
    pub fn new(
        cadence: Cadence,
        start_at: Option<DateTime<Utc>>,
        end_at: Option<DateTime<Utc>>,
    ) -> Result<Self, ScheduleError> {
        if let (Some(start), Some(end)) = (start_at, end_at)
            && end <= start
        {
            return Err(ScheduleError::Bounds);
        }
        Ok(Self {
            cadence,
            start_at,
            end_at,
        })
    }

    /// The first fire time strictly after `after`; `None` once past `end_at`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let next = match self.start_at {
            Some(start) if start > after => self.cadence.next(start, true)?,
            _ => self.cadence.next(after, false)?,
        };
        match self.end_at {
            Some(end) if next > end => None,
            _ => Some(next),
        }
    }

    /// The next `n` fire times strictly after `after`.
    pub fn upcoming(&self, after: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        let mut times = Vec::with_capacity(n);
        let mut at = after;
        while times.len() < n {
            match self.next_after(at) {
                Some(t) => {
                    times.push(t);
                    at = t;
                }
                None => break,
            }
        }
        times
    }

    /// The fire times in `[from, to]`, at most `limit` of them (for a backfill).
    pub fn between(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: usize,
    ) -> Vec<DateTime<Utc>> {
        let mut times = Vec::new();
        // Inclusive of `from`: start the search just before it.
        let mut at = from - TimeDelta::nanoseconds(1);
        while times.len() < limit {
            match self.next_after(at) {
                Some(t) if t <= to => {
                    times.push(t);
                    at = t;
                }
                _ => break,
            }
        }
        times
    }
}

/// The jitter of the fire of `schedule` at `fire_at`: in `[0, max]`, whole milliseconds, the
/// same wherever and however often it is computed (so a new leader agrees with the old one).
pub fn jitter(schedule: Uuid, fire_at: DateTime<Utc>, max: Duration) -> Duration {
    let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
    if max_ms == 0 {
        return Duration::ZERO;
    }
    // FNV-1a: stable across Rust versions and processes, unlike the std hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let micros = fire_at.timestamp_micros().to_le_bytes();
    for byte in schedule.as_bytes().iter().chain(micros.iter()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    Duration::from_millis(hash % max_ms.saturating_add(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().expect("test timestamps are RFC 3339")
    }

    fn cron(expr: &str, tz: &str) -> Calendar {
        Calendar::new(Cadence::cron(expr, tz).expect("valid"), None, None).expect("valid")
    }

    #[test]
    fn cron_takes_an_optional_seconds_field() {
        let five = cron("*/5 * * * *", "UTC");
        assert_eq!(
            five.upcoming(utc("2026-01-01T00:00:00Z"), 2),
            [utc("2026-01-01T00:05:00Z"), utc("2026-01-01T00:10:00Z")]
        );
        let six = cron("*/2 * * * * *", "UTC");
        assert_eq!(
            six.upcoming(utc("2026-01-01T00:00:00.500Z"), 3),
            [
                utc("2026-01-01T00:00:02Z"),
                utc("2026-01-01T00:00:04Z"),
                utc("2026-01-01T00:00:06Z")
            ]
        );
    }

    #[test]
    fn bad_cron_and_time_zones_are_refused() {
        assert!(matches!(
            Cadence::cron("61 * * * *", "UTC"),
            Err(ScheduleError::Cron { .. })
        ));
        assert!(matches!(
            Cadence::cron("* * *", "UTC"),
            Err(ScheduleError::Cron { .. })
        ));
        assert_eq!(
            Cadence::cron("* * * * *", "Mars/Olympus").err(),
            Some(ScheduleError::Timezone("Mars/Olympus".into()))
        );
        assert!(Cadence::every(Duration::from_millis(999)).is_err());
        assert!(Cadence::every(Duration::from_micros(1_000_500)).is_err());
    }

    #[test]
    fn a_daily_cron_follows_the_wall_clock_across_dst() {
        // Paris: 09:00 is 08:00Z in winter and 07:00Z in summer (DST began 2026-03-29).
        let daily = cron("0 9 * * *", "Europe/Paris");
        assert_eq!(
            daily.upcoming(utc("2026-03-27T12:00:00Z"), 3),
            [
                utc("2026-03-28T08:00:00Z"),
                utc("2026-03-29T07:00:00Z"),
                utc("2026-03-30T07:00:00Z")
            ]
        );
    }

    #[test]
    fn a_fixed_time_in_the_spring_forward_gap_fires_once_right_after_it() {
        // New York, 2026-03-08: 02:00 EST jumps to 03:00 EDT; 02:30 does not exist that day.
        let daily = cron("30 2 * * *", "America/New_York");
        let times = daily.upcoming(utc("2026-03-07T12:00:00Z"), 3);
        assert_eq!(
            times[0],
            utc("2026-03-08T07:00:00Z"),
            "03:00 EDT, right after the gap"
        );
        assert_eq!(
            times[1],
            utc("2026-03-09T06:30:00Z"),
            "02:30 EDT the next day"
        );
        assert_eq!(times[2], utc("2026-03-10T06:30:00Z"));
    }

    #[test]
    fn an_interval_cron_skips_the_gap() {
        // Every 30 minutes across the gap: 01:30 EST then 03:00 EDT (02:00, 02:30 don't exist).
        let half_hourly = cron("*/30 * * * *", "America/New_York");
        assert_eq!(
            half_hourly.upcoming(utc("2026-03-08T06:00:00Z"), 3),
            [
                utc("2026-03-08T06:30:00Z"),
                utc("2026-03-08T07:00:00Z"),
                utc("2026-03-08T07:30:00Z")
            ]
        );
    }

    #[test]
    fn a_fixed_time_in_the_fall_back_repeat_fires_once() {
        // New York, 2026-11-01: 02:00 EDT falls back to 01:00 EST; 01:30 happens twice.
        let daily = cron("30 1 * * *", "America/New_York");
        assert_eq!(
            daily.upcoming(utc("2026-10-31T12:00:00Z"), 3),
            [
                utc("2026-11-01T05:30:00Z"),
                utc("2026-11-02T06:30:00Z"),
                utc("2026-11-03T06:30:00Z")
            ]
        );
    }

    #[test]
    fn an_interval_cron_fires_on_both_passes_of_the_repeat() {
        let half_hourly = cron("*/30 * * * *", "America/New_York");
        assert_eq!(
            half_hourly.upcoming(utc("2026-11-01T04:45:00Z"), 5),
            [
                utc("2026-11-01T05:00:00Z"),
                utc("2026-11-01T05:30:00Z"),
                utc("2026-11-01T06:00:00Z"),
                utc("2026-11-01T06:30:00Z"),
                utc("2026-11-01T07:00:00Z")
            ]
        );
    }

    #[test]
    fn every_counts_from_the_epoch() {
        let every = Calendar::new(
            Cadence::every(Duration::from_secs(2)).expect("valid"),
            None,
            None,
        )
        .expect("valid");
        assert_eq!(
            every.upcoming(utc("2026-01-01T00:00:01.300Z"), 3),
            [
                utc("2026-01-01T00:00:02Z"),
                utc("2026-01-01T00:00:04Z"),
                utc("2026-01-01T00:00:06Z")
            ]
        );
        // Strictly after: a fire time is not its own successor.
        assert_eq!(
            every.next_after(utc("2026-01-01T00:00:02Z")),
            Some(utc("2026-01-01T00:00:04Z"))
        );
    }

    #[test]
    fn start_and_end_bound_the_fires() {
        let bounded = Calendar::new(
            Cadence::every(Duration::from_secs(10)).expect("valid"),
            Some(utc("2026-01-01T00:01:00Z")),
            Some(utc("2026-01-01T00:01:20Z")),
        )
        .expect("valid");
        assert_eq!(
            bounded.upcoming(utc("2026-01-01T00:00:00Z"), 10),
            [
                utc("2026-01-01T00:01:00Z"),
                utc("2026-01-01T00:01:10Z"),
                utc("2026-01-01T00:01:20Z")
            ]
        );
        assert_eq!(bounded.next_after(utc("2026-01-01T00:01:20Z")), None);
        assert!(
            Calendar::new(
                Cadence::every(Duration::from_secs(10)).expect("valid"),
                Some(utc("2026-01-01T00:01:00Z")),
                Some(utc("2026-01-01T00:01:00Z")),
            )
            .is_err()
        );
    }

    #[test]
    fn between_includes_both_ends() {
        let minutely = cron("* * * * *", "UTC");
        assert_eq!(
            minutely.between(
                utc("2026-01-01T00:01:00Z"),
                utc("2026-01-01T00:03:00Z"),
                100
            ),
            [
                utc("2026-01-01T00:01:00Z"),
                utc("2026-01-01T00:02:00Z"),
                utc("2026-01-01T00:03:00Z")
            ]
        );
        assert_eq!(
            minutely
                .between(utc("2026-01-01T00:00:00Z"), utc("2026-01-02T00:00:00Z"), 5)
                .len(),
            5
        );
    }

    #[test]
    fn jitter_is_deterministic_and_bounded() {
        let schedule = Uuid::now_v7();
        let max = Duration::from_millis(500);
        let mut distinct = std::collections::BTreeSet::new();
        for s in 0..100 {
            let at = utc("2026-01-01T00:00:00Z") + TimeDelta::seconds(s);
            let j = jitter(schedule, at, max);
            assert!(j <= max);
            assert_eq!(j, jitter(schedule, at, max));
            distinct.insert(j);
        }
        assert!(distinct.len() > 10, "jitter spreads fires: {distinct:?}");
        assert_eq!(
            jitter(schedule, utc("2026-01-01T00:00:00Z"), Duration::ZERO),
            Duration::ZERO
        );
    }

    #[test]
    fn overlap_policies_parse_back_from_their_names() {
        for policy in OverlapPolicy::ALL {
            assert_eq!(policy.as_str().parse::<OverlapPolicy>(), Ok(policy));
        }
        assert!("sometimes".parse::<OverlapPolicy>().is_err());
    }
}
