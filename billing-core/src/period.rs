//! Billing periods: a customer's period `YYYY-MM` starts on their billing anchor day of that
//! month at local midnight in their time zone, and ends where the next one starts.
//!
//! - An anchor day the month lacks (31 in April) means the month's last day.
//! - A local midnight that does not exist (a DST gap at midnight, e.g. America/Santiago) means
//!   the first local instant after the gap; an ambiguous one (a fold) means its first occurrence.
//!
//! Periods are half-open `[start, end)` in UTC, so consecutive periods meet exactly: no instant
//! belongs to two periods or to none.
//!
//! Usage is stored per minute, so the rater bills at one-minute resolution: a minute belongs to
//! the span `[from, to)` when its start does, after both bounds are rounded up to the minute.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct YearMonth {
    pub year: i32,
    pub month: u32,
}

impl YearMonth {
    pub fn next(self) -> YearMonth {
        if self.month == 12 {
            YearMonth {
                year: self.year + 1,
                month: 1,
            }
        } else {
            YearMonth {
                year: self.year,
                month: self.month + 1,
            }
        }
    }
    pub fn prev(self) -> YearMonth {
        if self.month == 1 {
            YearMonth {
                year: self.year - 1,
                month: 12,
            }
        } else {
            YearMonth {
                year: self.year,
                month: self.month - 1,
            }
        }
    }
    fn first(self) -> NaiveDate {
        NaiveDate::from_ymd_opt(self.year, self.month, 1).expect("valid year-month")
    }
    fn last_day(self) -> u32 {
        let next = self.next().first();
        next.pred_opt().expect("a day before").day()
    }
    /// The anchor date in this month.
    pub fn anchor(self, anchor_day: u32) -> NaiveDate {
        let d = anchor_day.clamp(1, self.last_day());
        NaiveDate::from_ymd_opt(self.year, self.month, d).expect("clamped day")
    }
    /// The month containing `t` in zone `tz`, as a period label (for a day-1 anchor).
    pub fn of(t: DateTime<Utc>, tz: Tz) -> YearMonth {
        let l = t.with_timezone(&tz);
        YearMonth {
            year: l.year(),
            month: l.month(),
        }
    }
}

impl fmt::Display for YearMonth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

impl FromStr for YearMonth {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a period; expected YYYY-MM");
        let (y, m) = s.split_once('-').ok_or_else(bad)?;
        if y.len() != 4 || m.len() != 2 {
            return Err(bad());
        }
        let year: i32 = y.parse().map_err(|_| bad())?;
        let month: u32 = m.parse().map_err(|_| bad())?;
        if !(1..=12).contains(&month) || !(1970..=9999).contains(&year) {
            return Err(bad());
        }
        Ok(YearMonth { year, month })
    }
}

/// Local midnight of `date` in `tz` as a UTC instant (see the module doc for gaps and folds).
pub fn local_midnight(date: NaiveDate, tz: Tz) -> DateTime<Utc> {
    let mut local = date.and_hms_opt(0, 0, 0).expect("midnight");
    // A gap is at most a few hours; walk forward minute by minute until a local time exists.
    for _ in 0..(24 * 60) {
        if let Some(t) = tz.from_local_datetime(&local).earliest() {
            return t.with_timezone(&Utc);
        }
        local += Duration::minutes(1);
    }
    Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0).expect("midnight"))
}

/// The billing period `ym` of a customer with `anchor_day` in `tz`: `[start, end)`.
pub fn bounds(ym: YearMonth, anchor_day: u32, tz: Tz) -> (DateTime<Utc>, DateTime<Utc>) {
    (
        local_midnight(ym.anchor(anchor_day), tz),
        local_midnight(ym.next().anchor(anchor_day), tz),
    )
}

/// `t` rounded up to the next whole minute (unchanged when already whole).
pub fn ceil_minute(t: DateTime<Utc>) -> DateTime<Utc> {
    let s = t.timestamp();
    let ns = t.timestamp_subsec_nanos();
    let whole = s.rem_euclid(60) == 0 && ns == 0;
    let base = s - s.rem_euclid(60);
    let secs = if whole { base } else { base + 60 };
    Utc.timestamp_opt(secs, 0).single().unwrap_or(t)
}

/// The billing period `[start, end)` containing `t`, for a customer with `anchor_day` in `tz`.
pub fn containing(t: DateTime<Utc>, anchor_day: u32, tz: Tz) -> (DateTime<Utc>, DateTime<Utc>) {
    // The period labelled with t's local month starts on or before the anchor day of that month;
    // t lies in it, in the one before, or (for a late anchor) in the one after.
    let mut ym = YearMonth::of(t, tz).next();
    for _ in 0..3 {
        let (s, e) = bounds(ym, anchor_day, tz);
        if s <= t && t < e {
            return (s, e);
        }
        ym = ym.prev();
    }
    bounds(YearMonth::of(t, tz), anchor_day, tz)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("time")
            .with_timezone(&Utc)
    }

    #[test]
    fn periods_follow_anchor_and_zone() {
        let ym: YearMonth = "2026-03".parse().expect("period");
        let (s, e) = bounds(ym, 1, chrono_tz::Europe::Berlin);
        assert_eq!(s, utc("2026-02-28T23:00:00Z"));
        // Summer time from 29 March: April starts at 22:00 UTC.
        assert_eq!(e, utc("2026-03-31T22:00:00Z"));
        let (s, e) = bounds(
            "2026-01".parse().expect("period"),
            31,
            chrono_tz::America::New_York,
        );
        assert_eq!(s, utc("2026-01-31T05:00:00Z"));
        // February has no 31st: its last day.
        assert_eq!(e, utc("2026-02-28T05:00:00Z"));
    }

    #[test]
    fn consecutive_periods_meet() {
        let tz = chrono_tz::Australia::Lord_Howe;
        let mut ym: YearMonth = "2025-01".parse().expect("period");
        for _ in 0..36 {
            let (_, e) = bounds(ym, 30, tz);
            let (s2, _) = bounds(ym.next(), 30, tz);
            assert_eq!(e, s2);
            ym = ym.next();
        }
    }

    #[test]
    fn midnight_in_a_dst_gap_is_the_first_instant_after() {
        // Chile moved clocks from 00:00 to 01:00 on 2025-09-07.
        let t = local_midnight(
            NaiveDate::from_ymd_opt(2025, 9, 7).expect("date"),
            chrono_tz::America::Santiago,
        );
        assert_eq!(t, utc("2025-09-07T04:00:00Z"));
    }

    #[test]
    fn bad_periods_are_refused() {
        for s in ["2026-13", "2026-1", "26-01", "2026/01", "", "2026-00"] {
            assert!(s.parse::<YearMonth>().is_err(), "{s}");
        }
    }

    #[test]
    fn ceil_minute_rounds_up() {
        assert_eq!(
            ceil_minute(utc("2026-01-01T00:00:00Z")),
            utc("2026-01-01T00:00:00Z")
        );
        assert_eq!(
            ceil_minute(utc("2026-01-01T00:00:00.5Z")),
            utc("2026-01-01T00:01:00Z")
        );
    }

    #[test]
    fn containing_finds_the_period_around_an_instant() {
        let kolkata: Tz = "Asia/Kolkata".parse().expect("tz");
        let t = |s: &str| {
            DateTime::parse_from_rfc3339(s)
                .expect("time")
                .with_timezone(&Utc)
        };
        // Anchor 15 in Kolkata (+05:30): 10 March is in the period that began on 15 February.
        let (s, e) = containing(t("2026-03-10T12:00:00Z"), 15, kolkata);
        assert_eq!(s, t("2026-02-14T18:30:00Z"));
        assert_eq!(e, t("2026-03-14T18:30:00Z"));
        // The start itself belongs to the period; the end to the next one.
        assert_eq!(containing(e, 15, kolkata).0, e);
        let utc: Tz = "UTC".parse().expect("tz");
        let (s, e) = containing(t("2027-04-11T00:00:00Z"), 1, utc);
        assert_eq!(
            (s, e),
            (t("2027-04-01T00:00:00Z"), t("2027-05-01T00:00:00Z"))
        );
        // A late anchor in a short month: 31 → the last day.
        let (s, _) = containing(t("2026-02-28T12:00:00Z"), 31, utc);
        assert_eq!(s, t("2026-02-28T00:00:00Z"));
    }
}
