//! Event time: timestamps, durations and the clock the rules read.
//!
//! Every time inside the engine is an `i64` count of milliseconds since the Unix epoch
//! ([`Millis`]): eight bytes per stored time, exact arithmetic, no time-zone questions.
//! Conversion to and from text happens only at the edges (input parsing, output JSON,
//! config), through the functions here.
//!
//! Rules never read the wall clock. The engine passes the evaluation time in explicitly
//! (an event's own time, later a partition watermark), so that `replay` and `run` give the
//! same answers and tests control time completely.

pub mod partition;
#[cfg(test)]
mod properties;
pub mod wheel;

use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Milliseconds since the Unix epoch (for instants) or a length in milliseconds (for
/// durations). One integer type keeps state small and arithmetic exact.
pub type Millis = i64;

/// One second in [`Millis`].
pub const SECOND: Millis = 1_000;
/// One minute in [`Millis`].
pub const MINUTE: Millis = 60 * SECOND;
/// One hour in [`Millis`].
pub const HOUR: Millis = 60 * MINUTE;
/// One day in [`Millis`].
pub const DAY: Millis = 24 * HOUR;

/// Parses a timestamp into [`Millis`]: RFC 3339 (`2026-11-23T10:21:14.123Z`, any offset,
/// `T` or a space between date and time), or a date and time without an offset, or
/// ending in ` UTC` (`2019-10-01 00:00:04 UTC`, common in exported datasets), read as UTC.
/// Sub-millisecond digits are truncated. Returns `None` for anything else.
pub fn parse_timestamp(text: &str) -> Option<Millis> {
    parse_utc_timestamp(text.as_bytes()).or_else(|| parse_any_timestamp(text))
}

/// The form nearly every event carries, `YYYY-MM-DDTHH:MM:SS[.fraction]Z` with a year from
/// 1970 to 9998, read by hand (a fifth of the general parser's time); anything else —
/// other offsets or separators, a leap second, other years — is `None` and left to
/// [`parse_any_timestamp`], which gives the same answer for everything this accepts.
fn parse_utc_timestamp(text: &[u8]) -> Option<Millis> {
    /// The number written by the ASCII digits `digits`.
    fn number(digits: &[u8]) -> Option<i64> {
        digits.iter().try_fold(0i64, |n, &b| {
            b.is_ascii_digit().then(|| n * 10 + i64::from(b - b'0'))
        })
    }
    let (&b'Z', text) = text.split_last()? else {
        return None;
    };
    if text.len() < 19
        || text[4] != b'-'
        || text[7] != b'-'
        || text[10] != b'T'
        || text[13] != b':'
        || text[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (
        number(&text[0..4])?,
        number(&text[5..7])?,
        number(&text[8..10])?,
    );
    let (hour, minute, second) = (
        number(&text[11..13])?,
        number(&text[14..16])?,
        number(&text[17..19])?,
    );
    let millis = match &text[19..] {
        [] => 0,
        [b'.', fraction @ ..] if (1..=9).contains(&fraction.len()) => {
            number(fraction)?;
            let mut millis = [b'0'; 3];
            let kept = fraction.len().min(3);
            millis[..kept].copy_from_slice(&fraction[..kept]);
            number(&millis)?
        }
        _ => return None,
    };
    if !(1970..=9998).contains(&year)
        || !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some(((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + millis)
}

/// The days of `month` (1–12) in `year` of the proleptic Gregorian calendar.
fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to `year`-`month`-`day` (a valid date), counting eras of 400
/// years from 1 March 0000 so that the leap day ends each era's year.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Every form [`parse_timestamp`] reads, through jiff.
fn parse_any_timestamp(text: &str) -> Option<Millis> {
    if let Ok(ts) = text.parse::<jiff::Timestamp>() {
        return Some(ts.as_millisecond());
    }
    let civil = text.strip_suffix(" UTC").unwrap_or(text);
    // A bare date is not an instant: require a time of day.
    if !civil.contains(':') {
        return None;
    }
    let datetime = civil.parse::<jiff::civil::DateTime>().ok()?;
    let ts = jiff::tz::TimeZone::UTC.to_timestamp(datetime).ok()?;
    Some(ts.as_millisecond())
}

/// Formats [`Millis`] as RFC 3339 in UTC with millisecond precision
/// (`2026-11-23T10:21:14.123Z`), the form every output of segmentd uses.
pub fn format_timestamp(at: Millis) -> String {
    match jiff::Timestamp::from_millisecond(at) {
        Ok(ts) => format!("{ts:.3}"),
        // Out of jiff's range (year ±9999): still print something a person can read.
        Err(_) => format!("@{at}ms"),
    }
}

/// The current wall-clock time in [`Millis`]. Only the edges call this (the `emitted_at`
/// of output records, idle-partition watermarks); rules never do.
pub fn wall_clock_now() -> Millis {
    jiff::Timestamp::now().as_millisecond()
}

/// The wall clock the service reads (idle-partition watermarks, `emitted_at`): the
/// system's, or a manual one that tests move by hand — so that no test sleeps for time
/// to pass.
#[derive(Clone, Debug, Default)]
pub struct WallClock {
    manual: Option<std::sync::Arc<std::sync::atomic::AtomicI64>>,
}

impl WallClock {
    /// The system clock.
    pub fn system() -> Self {
        WallClock { manual: None }
    }

    /// A clock that stands at `start` until [`set`](Self::set).
    pub fn manual(start: Millis) -> Self {
        WallClock {
            manual: Some(std::sync::Arc::new(start.into())),
        }
    }

    /// Moves a manual clock to `to` (the system clock ignores it).
    pub fn set(&self, to: Millis) {
        if let Some(manual) = &self.manual {
            manual.store(to, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The current time.
    pub fn now(&self) -> Millis {
        match &self.manual {
            Some(manual) => manual.load(std::sync::atomic::Ordering::Relaxed),
            None => wall_clock_now(),
        }
    }
}

/// Formats a duration compactly with the largest units first: `30m12s`, `2d3h`, `850ms`,
/// `0s`. Negative durations get a leading `-`. Used in `facts` so a person can read why a
/// rule changed.
pub fn format_duration(length: Millis) -> String {
    if length == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    if length < 0 {
        out.push('-');
    }
    let mut rest = length.unsigned_abs();
    for (unit, size) in [
        ("d", DAY),
        ("h", HOUR),
        ("m", MINUTE),
        ("s", SECOND),
        ("ms", 1),
    ] {
        let size = size as u64;
        if rest >= size {
            let _ = write!(out, "{}{unit}", rest / size);
            rest %= size;
        }
    }
    out
}

/// A duration read from human-readable text (`"30m"`, `"5s"`, `"7d"`, `"1h 30m"`) in config
/// files and CLI flags, kept as [`Millis`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Millis);

impl HumanDuration {
    /// The length in milliseconds.
    pub fn millis(self) -> Millis {
        self.0
    }

    /// The length as a std [`Duration`], for timeouts and intervals.
    pub fn as_std(self) -> Duration {
        Duration::from_millis(self.0.max(0) as u64)
    }
}

impl std::str::FromStr for HumanDuration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let parsed = humantime::parse_duration(text.trim())
            .map_err(|err| format!("`{text}` is not a duration like `30s`, `5m` or `7d`: {err}"))?;
        let millis = i64::try_from(parsed.as_millis())
            .map_err(|_| format!("`{text}` is too long a duration"))?;
        Ok(HumanDuration(millis))
    }
}

impl std::fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format_duration(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_with_millisecond_precision() {
        let at = parse_timestamp("2026-11-23T10:21:14.123Z").unwrap();
        assert_eq!(format_timestamp(at), "2026-11-23T10:21:14.123Z");
        assert_eq!(parse_timestamp("2026-11-23T11:21:14.123+01:00"), Some(at));
    }

    #[test]
    fn timestamps_without_an_offset_are_utc() {
        let at = parse_timestamp("2019-10-01T00:00:04Z").unwrap();
        assert_eq!(parse_timestamp("2019-10-01 00:00:04 UTC"), Some(at));
        assert_eq!(parse_timestamp("2019-10-01 00:00:04"), Some(at));
        assert_eq!(parse_timestamp("2019-10-01T00:00:04"), Some(at));
        assert_eq!(parse_timestamp("2019-10-01 00:00:04Z"), Some(at));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]
        /// The hand-read UTC form agrees with jiff on every string of its shape, valid or
        /// not (months, days, hours, minutes and seconds beyond their ranges, leap days,
        /// fractions of 0 to 10 digits, years outside the hand-read range).
        #[test]
        fn the_utc_fast_path_agrees_with_the_general_parser(
            year in 1960i64..10_000,
            month in 0i64..14,
            day in 0i64..33,
            hour in 0i64..25,
            minute in 0i64..61,
            second in 0i64..62,
            fraction in proptest::option::of("[0-9]{0,10}"),
        ) {
            let mut text = format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}");
            if let Some(digits) = fraction {
                text.push('.');
                text.push_str(&digits);
            }
            text.push('Z');
            proptest::prop_assert_eq!(parse_timestamp(&text), parse_any_timestamp(&text), "{}", text);
        }
    }

    #[test]
    fn the_common_utc_form_is_read_by_hand() {
        // 2026-11-23T10:21:14.123Z is 1,795,429,274,123 ms after the epoch.
        let expected = Some(1_795_429_274_123);
        assert_eq!(parse_any_timestamp("2026-11-23T10:21:14.123Z"), expected);
        assert_eq!(parse_utc_timestamp(b"2026-11-23T10:21:14.123Z"), expected);
        assert_eq!(
            parse_utc_timestamp(b"2026-11-23T10:21:14.123456789Z"),
            expected
        );
        assert_eq!(
            parse_utc_timestamp(b"2028-02-29T00:00:00Z"),
            parse_any_timestamp("2028-02-29T00:00:00Z")
        );
        assert!(parse_utc_timestamp(b"2028-02-29T00:00:00Z").is_some());
        // Left to jiff: other offsets and separators, a leap second, impossible dates.
        for other in [
            "2026-11-23T11:21:14.123+01:00",
            "2026-11-23 10:21:14Z",
            "2026-11-23T23:59:60Z",
            "2027-02-29T00:00:00Z",
        ] {
            assert_eq!(parse_utc_timestamp(other.as_bytes()), None, "{other}");
        }
    }

    #[test]
    fn unreadable_timestamps_are_rejected() {
        for text in [
            "",
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-11-23",
            "1700000000",
        ] {
            assert_eq!(parse_timestamp(text), None, "{text}");
        }
    }

    #[test]
    fn durations_format_largest_unit_first() {
        assert_eq!(format_duration(30 * MINUTE + 12 * SECOND), "30m12s");
        assert_eq!(format_duration(2 * DAY + 3 * HOUR), "2d3h");
        assert_eq!(format_duration(850), "850ms");
        assert_eq!(format_duration(0), "0s");
        assert_eq!(format_duration(-90 * SECOND), "-1m30s");
    }

    #[test]
    fn human_durations_parse_config_text() {
        assert_eq!(
            "30m".parse::<HumanDuration>().unwrap().millis(),
            30 * MINUTE
        );
        assert_eq!("7d".parse::<HumanDuration>().unwrap().millis(), 7 * DAY);
        let err = "soon".parse::<HumanDuration>().unwrap_err();
        assert!(err.contains("`soon` is not a duration"), "{err}");
    }
}
