//! Time values as Lytics reads them: a JSON value in, epoch milliseconds out, and back to text.
//!
//! Input is a record value (epoch milliseconds or seconds as a number or numeric string, or an
//! RFC 3339 / plain date-time string); output is epoch milliseconds, or RFC 3339 text for
//! rendering. Pure functions: this module never reads the clock.

use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, Utc};
use serde_json::Value;

/// Epoch numbers below this are seconds, at or above it milliseconds (1e11 s is the year 5138,
/// 1e11 ms is 1973), which is how Lytics tells the two apart.
const SECONDS_CUTOFF: f64 = 1e11;

/// Reads a time from a record value, or `None` when it is not a time.
pub fn parse_time_ms(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => epoch_to_ms(n.as_f64()?),
        Value::String(s) => parse_time_str(s),
        _ => None,
    }
}

/// Reads a time from text: an epoch number, RFC 3339, `YYYY-MM-DD HH:MM:SS` (UTC) or a date.
pub fn parse_time_str(text: &str) -> Option<i64> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    if let Ok(n) = text.parse::<f64>() {
        return epoch_to_ms(n);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.timestamp_millis());
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(text, format) {
            return Some(t.and_utc().timestamp_millis());
        }
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp_millis())
}

fn epoch_to_ms(n: f64) -> Option<i64> {
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    let ms = if n < SECONDS_CUTOFF { n * 1000.0 } else { n };
    // Beyond chrono's range the value cannot be rendered, so it is not a usable time.
    DateTime::from_timestamp_millis(ms as i64).map(|t| t.timestamp_millis())
}

/// Renders epoch milliseconds as RFC 3339 UTC with whole seconds (`2021-02-11T17:04:49Z`).
pub fn format_secs(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The UTC hour of day, 0 to 23.
pub fn hour_of_day(ms: i64) -> u32 {
    // Euclidean remainder keeps times before 1970 in range.
    (ms.div_euclid(3_600_000).rem_euclid(24)) as u32
}

#[cfg(test)]
#[allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test should fail loudly at the broken step"
)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_epoch_millis_seconds_numeric_strings_and_rfc3339() {
        let ms = 1_613_063_089_000;
        assert_eq!(parse_time_ms(&json!(1_613_063_089_000_i64)), Some(ms));
        assert_eq!(parse_time_ms(&json!(1_613_063_089)), Some(ms));
        assert_eq!(parse_time_ms(&json!(1_613_063_089.5)), Some(ms + 500));
        assert_eq!(parse_time_ms(&json!("1613063089000")), Some(ms));
        assert_eq!(parse_time_ms(&json!("1613063089")), Some(ms));
        assert_eq!(parse_time_ms(&json!("2021-02-11T17:04:49Z")), Some(ms));
        assert_eq!(parse_time_ms(&json!("2021-02-11T18:04:49+01:00")), Some(ms));
        assert_eq!(parse_time_ms(&json!("2021-02-11 17:04:49")), Some(ms));
        assert_eq!(parse_time_ms(&json!("2021-02-11")), Some(1_613_001_600_000));
    }

    #[test]
    fn rejects_values_that_are_not_times() {
        for v in [
            json!("soon"),
            json!(""),
            json!(true),
            json!(null),
            json!(-5),
            json!({}),
        ] {
            assert_eq!(parse_time_ms(&v), None, "{v}");
        }
    }

    #[test]
    fn formats_whole_seconds_in_utc_and_hours() {
        assert_eq!(format_secs(1_613_063_089_123), "2021-02-11T17:04:49Z");
        assert_eq!(hour_of_day(1_613_063_089_000), 17);
        assert_eq!(hour_of_day(-1), 23);
    }
}
