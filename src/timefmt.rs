//! Event-time parsing and formatting shared by normalisation and rule transforms.
//!
//! Input: the time shapes senders use (RFC 3339 / ISO-8601 strings, unix seconds or
//! milliseconds). Output: unix milliseconds, or RFC 3339 text. Pure functions, no clock reads
//! except [`now_ms`].

use chrono::{DateTime, NaiveDateTime, SecondsFormat, TimeZone, Timelike, Utc};
use serde_json::Value;

/// Numbers below this are unix seconds, at or above it unix milliseconds (1e11 s is the year
/// 5138, 1e11 ms is 1973), so both shapes that senders use are read correctly.
const SECONDS_CUTOFF: f64 = 1e11;

/// The wall clock at the first reading, and the monotonic instant it was read at.
static EPOCH: std::sync::OnceLock<(i64, tokio::time::Instant)> = std::sync::OnceLock::new();

/// The current time in unix milliseconds: the wall clock read once, advanced by Tokio's
/// monotonic clock. Under `tokio::time::pause` it follows virtual time, so retry schedules
/// can be tested without waiting.
pub fn now_ms() -> i64 {
    let (base_ms, base) = EPOCH.get_or_init(|| (Utc::now().timestamp_millis(), tokio::time::Instant::now()));
    let elapsed = tokio::time::Instant::now().saturating_duration_since(*base);
    base_ms + i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX / 2)
}

/// A duration in the largest whole unit that states it exactly: `24 h`, `90 min`, `45 s`,
/// `1500 ms`.
pub fn human_duration(d: std::time::Duration) -> String {
    let (secs, ms) = (d.as_secs(), d.as_millis());
    if ms % 1000 != 0 || secs == 0 {
        format!("{ms} ms")
    } else if secs % 3600 == 0 {
        format!("{} h", secs / 3600)
    } else if secs % 60 == 0 {
        format!("{} min", secs / 60)
    } else {
        format!("{secs} s")
    }
}

/// Parses an ISO-8601 / RFC 3339 time; a time without an offset is taken as UTC.
pub fn parse_iso_ms(text: &str) -> Option<i64> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.timestamp_millis());
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%d %H:%M:%S%.f%z"] {
        if let Ok(t) = DateTime::parse_from_str(text, fmt) {
            return Some(t.timestamp_millis());
        }
    }
    // Only a time with no offset at all is naive: chrono's naive parsing would read an offset
    // it cannot apply (`+25:00`) and drop it, giving a wrong time instead of none.
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(text, fmt) {
            return Some(Utc.from_utc_datetime(&t).timestamp_millis());
        }
    }
    None
}

/// Reads a time value: an ISO-8601 string, a numeric string, or a number of unix seconds or
/// milliseconds.
pub fn value_to_ms(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_f64().and_then(number_to_ms),
        Value::String(s) => match s.trim().parse::<f64>() {
            Ok(n) => number_to_ms(n),
            Err(_) => parse_iso_ms(s).or_else(|| parse_date_ms(s)),
        },
        _ => None,
    }
}

/// A date alone (`2024-03-10`, as traits such as a birthday or a signup day are written): its
/// midnight, UTC.
fn parse_date_ms(text: &str) -> Option<i64> {
    let date = chrono::NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d").ok()?;
    Some(
        Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0)?)
            .timestamp_millis(),
    )
}

fn number_to_ms(n: f64) -> Option<i64> {
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    let ms = if n < SECONDS_CUTOFF { n * 1000.0 } else { n };
    // Float to int: the value is finite, non-negative and far below i64::MAX here.
    (ms < 9.0e15).then_some(ms.round() as i64)
}

/// The last millisecond of the year 9999: the latest time RFC 3339 can write.
pub const MAX_MS: i64 = 253_402_300_799_999;

/// Formats unix milliseconds as RFC 3339 UTC with millisecond precision.
pub fn ms_to_rfc3339(ms: i64) -> Option<String> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

/// The UTC hour of day (0–23) of unix milliseconds.
pub fn hour_of_day(ms: i64) -> Option<u32> {
    Utc.timestamp_millis_opt(ms).single().map(|t| t.hour())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn durations_read_in_their_largest_exact_unit() {
        use std::time::Duration;
        let h = |d: Duration| human_duration(d);
        assert_eq!(h(Duration::from_secs(24 * 3600)), "24 h");
        assert_eq!(h(Duration::from_secs(90 * 60)), "90 min");
        assert_eq!(h(Duration::from_secs(45)), "45 s");
        assert_eq!(h(Duration::from_millis(1500)), "1500 ms");
        assert_eq!(h(Duration::ZERO), "0 ms");
    }

    #[test]
    fn reads_every_time_shape_senders_use() {
        let want = 1_772_029_800_000; // 2026-02-25T14:30:00Z
        assert_eq!(value_to_ms(&json!("2026-02-25T14:30:00.000Z")), Some(want));
        assert_eq!(value_to_ms(&json!("2026-02-25T15:30:00+01:00")), Some(want));
        assert_eq!(value_to_ms(&json!("2026-02-25T14:30:00")), Some(want));
        assert_eq!(value_to_ms(&json!("2026-02-25 14:30:00")), Some(want));
        // A date alone is its midnight, UTC; an event's own timestamp still needs a time.
        assert_eq!(value_to_ms(&json!("2026-02-25")), Some(want - 52_200_000));
        assert_eq!(parse_iso_ms("2026-02-25"), None);
        assert_eq!(value_to_ms(&json!("2026-02-30")), None);
        assert_eq!(value_to_ms(&json!(1_772_029_800)), Some(want));
        assert_eq!(value_to_ms(&json!(want)), Some(want));
        assert_eq!(value_to_ms(&json!("1772029800")), Some(want));
        assert_eq!(value_to_ms(&json!("2026-02-25T15:30:00+0100")), Some(want));
        assert_eq!(value_to_ms(&json!("2026-02-25 13:30:00-01:00")), Some(want));
        assert_eq!(value_to_ms(&json!("yesterday")), None);
        // Offsets of a day or more are not offsets: refused, not read as UTC.
        for bad in ["+24:00", "+25:00", "-25:00", "+30:00", "+99:00"] {
            assert_eq!(
                value_to_ms(&json!(format!("2026-02-25T14:30:00{bad}"))),
                None,
                "{bad}"
            );
        }
        assert_eq!(value_to_ms(&json!(-5)), None);
    }

    #[test]
    fn formats_and_reads_hours_in_utc() {
        assert_eq!(
            ms_to_rfc3339(1_613_063_089_000).as_deref(),
            Some("2021-02-11T17:04:49.000Z")
        );
        assert_eq!(hour_of_day(1_613_063_089_000), Some(17));
    }
}
