//! The collect API's body rules: raw request bytes in, accepted records with their event times
//! and a rejected count out.
//!
//! A body is one JSON object or an array of objects. A record over 4 KB alone, or over 16 KB in
//! an array, and any array item that is not an object, is rejected (counted, not stored), as
//! Lytics does. Record size is measured as compact JSON, so whitespace in the request does not
//! count. This module is pure: it never stores anything and never looks at auth or streams.

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::time::parse_time_ms;

/// Requests above this size are refused whole (Lytics caps a request at 10 MB).
pub const MAX_REQUEST_BYTES: usize = 10 * 1024 * 1024;
/// A record sent alone may be at most this large.
pub const MAX_SINGLE_RECORD_BYTES: usize = 4 * 1024;
/// A record inside an array may be at most this large.
pub const MAX_BATCH_RECORD_BYTES: usize = 16 * 1024;

/// One accepted record and the time it happened.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    /// The record as sent.
    pub record: Map<String, Value>,
    /// From `timestamp_field` when it holds a time, else the receive time.
    pub event_time_ms: i64,
}

/// The outcome of reading a collect body.
#[derive(Debug, Default, PartialEq)]
pub struct ParsedBody {
    /// Records to store, in request order.
    pub accepted: Vec<Accepted>,
    /// Records refused for size or shape.
    pub rejected: usize,
}

/// Why a body was refused whole.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// The bytes are not JSON.
    #[error("invalid json body: {0}")]
    InvalidJson(String),
    /// The JSON is neither an object nor an array.
    #[error("body must be a json object or an array of json objects")]
    NotObjects,
}

/// Counts the bytes serde_json would write, without keeping them.
struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn compact_size(record: &Map<String, Value>) -> usize {
    let mut counter = ByteCounter(0);
    // Writing into a counter cannot fail, and a failure would only undercount the size.
    let _ = serde_json::to_writer(&mut counter, record);
    counter.0
}

/// Reads a collect body: accepts the records within the limits and counts the others.
pub fn parse_body(
    body: &[u8],
    timestamp_field: Option<&str>,
    received_ms: i64,
) -> Result<ParsedBody, BodyError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| BodyError::InvalidJson(e.to_string()))?;
    let (items, limit) = match value {
        Value::Object(record) => (vec![Value::Object(record)], MAX_SINGLE_RECORD_BYTES),
        Value::Array(items) => (items, MAX_BATCH_RECORD_BYTES),
        _ => return Err(BodyError::NotObjects),
    };
    let mut parsed = ParsedBody::default();
    for item in items {
        let Value::Object(record) = item else {
            parsed.rejected += 1;
            continue;
        };
        if compact_size(&record) > limit {
            parsed.rejected += 1;
            continue;
        }
        let event_time_ms = timestamp_field
            .and_then(|field| record.get(field))
            .and_then(parse_time_ms)
            .unwrap_or(received_ms);
        parsed.accepted.push(Accepted {
            record,
            event_time_ms,
        });
    }
    Ok(parsed)
}

/// How many records of a body a sink accepts and refuses.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CountedBody {
    /// Records within the limits.
    pub accepted: usize,
    /// Records refused for size or shape.
    pub rejected: usize,
}

/// Reads a collect body as [`parse_body`] does, with the same verdicts, but only counts the
/// records: the JSON is checked without building values (a record is measured from its raw
/// text, and parsed only when that text is over the limit, where whitespace might be all
/// that makes it so).
pub fn count_body(body: &[u8]) -> Result<CountedBody, BodyError> {
    let invalid = |e: serde_json::Error| BodyError::InvalidJson(e.to_string());
    let mut counted = CountedBody::default();
    let mut tally = |record: &RawValue, limit: usize| {
        if record_fits(record.get(), limit) {
            counted.accepted += 1;
        } else {
            counted.rejected += 1;
        }
    };
    // The body is read once: as an array of raw items when it opens one, else as one value.
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        let items: Vec<&RawValue> = serde_json::from_slice(body).map_err(invalid)?;
        for item in items {
            tally(item, MAX_BATCH_RECORD_BYTES);
        }
    } else {
        let raw: &RawValue = serde_json::from_slice(body).map_err(invalid)?;
        if !raw.get().starts_with('{') {
            return Err(BodyError::NotObjects);
        }
        tally(raw, MAX_SINGLE_RECORD_BYTES);
    }
    Ok(counted)
}

/// Whether the raw JSON `text` is an object of at most `limit` bytes as compact JSON.
fn record_fits(text: &str, limit: usize) -> bool {
    if !text.starts_with('{') {
        return false;
    }
    text.len() <= limit
        || serde_json::from_str::<Map<String, Value>>(text).is_ok_and(|m| compact_size(&m) <= limit)
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

    fn parse(body: &Value, ts: Option<&str>) -> Result<ParsedBody, BodyError> {
        parse_body(body.to_string().as_bytes(), ts, 42)
    }

    #[test]
    fn accepts_one_object_or_an_array_of_objects() {
        let one = parse(&json!({"a": 1}), None).expect("valid");
        assert_eq!(one.accepted.len(), 1);
        assert_eq!(one.accepted[0].event_time_ms, 42);
        let many = parse(&json!([{"a": 1}, {"a": 2}, 3, "x", [], null]), None).expect("valid");
        assert_eq!((many.accepted.len(), many.rejected), (2, 4));
    }

    /// A sink's count of `body` is what the full reading accepts and rejects.
    fn assert_counts_agree(body: &str) {
        let full = parse_body(body.as_bytes(), None, 0).map(|p| (p.accepted.len(), p.rejected));
        let counted = count_body(body.as_bytes()).map(|c| (c.accepted, c.rejected));
        assert_eq!(counted, full, "body: {body:.80}");
    }

    #[test]
    fn counting_a_body_gives_the_verdicts_of_reading_it() {
        let pad = |n: usize| "x".repeat(n);
        let spaced = |n: usize| format!("{{ \"pad\" : \"{}\" }}", pad(n));
        for body in [
            r#"{"a": 1}"#.to_string(),
            r#"[{"a": 1}, {"a": 2}, 3, "x", [], null]"#.to_string(),
            r#"  [ ]  "#.to_string(),
            "3".to_string(),
            r#""x""#.to_string(),
            "{nope".to_string(),
            "[{\"a\": 1},".to_string(),
            format!(r#"{{"pad":"{}"}}"#, pad(MAX_SINGLE_RECORD_BYTES - 10)),
            format!(r#"{{"pad":"{}"}}"#, pad(MAX_SINGLE_RECORD_BYTES - 9)),
            // Over the limit as sent, within it as compact JSON.
            spaced(MAX_SINGLE_RECORD_BYTES - 10),
            format!(
                "[{}, {}]",
                spaced(MAX_BATCH_RECORD_BYTES - 10),
                spaced(MAX_BATCH_RECORD_BYTES)
            ),
        ] {
            assert_counts_agree(&body);
        }
        assert_eq!(
            count_body(spaced(MAX_SINGLE_RECORD_BYTES - 10).as_bytes()),
            Ok(CountedBody {
                accepted: 1,
                rejected: 0
            })
        );
        assert!(matches!(count_body(b"{nope"), Err(BodyError::InvalidJson(_))));
    }

    #[test]
    fn refuses_bodies_that_are_not_objects() {
        assert_eq!(parse(&json!(3), None), Err(BodyError::NotObjects));
        assert_eq!(parse(&json!("x"), None), Err(BodyError::NotObjects));
        assert!(matches!(
            parse_body(b"{nope", None, 0),
            Err(BodyError::InvalidJson(_))
        ));
    }

    #[test]
    fn rejects_records_over_4kb_alone_and_16kb_in_an_array() {
        let sized = |n: usize| json!({"pad": "x".repeat(n)});
        // `{"pad":""}` is 10 bytes of overhead.
        let fits = parse(&sized(MAX_SINGLE_RECORD_BYTES - 10), None).expect("valid");
        assert_eq!((fits.accepted.len(), fits.rejected), (1, 0));
        let too_big = parse(&sized(MAX_SINGLE_RECORD_BYTES - 9), None).expect("valid");
        assert_eq!((too_big.accepted.len(), too_big.rejected), (0, 1));
        let batch = parse(
            &json!([
                sized(10_000),
                sized(MAX_BATCH_RECORD_BYTES - 10),
                sized(MAX_BATCH_RECORD_BYTES)
            ]),
            None,
        )
        .expect("valid");
        assert_eq!((batch.accepted.len(), batch.rejected), (2, 1));
    }

    #[test]
    fn timestamp_field_sets_the_event_time_when_it_holds_a_time() {
        let body = json!([
            {"ts": 1_613_063_089_000_i64},
            {"ts": 1_613_063_089},
            {"ts": "1613063089"},
            {"ts": "2021-02-11T17:04:49Z"},
            {"ts": "not a time"},
            {"other": 1}
        ]);
        let parsed = parse(&body, Some("ts")).expect("valid");
        let times: Vec<i64> = parsed.accepted.iter().map(|a| a.event_time_ms).collect();
        let t = 1_613_063_089_000;
        assert_eq!(times, [t, t, t, t, 42, 42]);
    }
}
