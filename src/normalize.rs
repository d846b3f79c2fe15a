//! The normalize stage: turns what a sender posted into a validated event document.
//!
//! Input: a gRPC `Event` message or JSON from HTTP. Output: an [`InboundEvent`] — the canonical
//! JSON document the rules read, its id, type and time — or an [`ApiError`] listing every invalid
//! field. Both doors run the same checks, so they answer the same errors. Never maps and never
//! queues.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::error::{ApiError, ErrorCode, FieldViolation};
use crate::proto::v1 as pb;
use crate::proto::{JsonStruct, JsonValue};
use crate::rules::Source;
use crate::timefmt;

/// The Signal event types the relay accepts (the shipped rules map page, track and identify;
/// the others are accepted and, without a rule, ignored).
pub const SIGNAL_TYPES: &[&str] = &["track", "page", "identify", "screen", "group", "alias"];

/// A validated event, ready for the rules.
#[derive(Debug, Clone)]
pub struct InboundEvent {
    /// Where it came from.
    pub source: Source,
    /// Its id: the idempotency key.
    pub id: Arc<str>,
    /// Whether the sender gave the id (false: the relay generated it, so the event cannot be
    /// a repeat and is not remembered for deduplication).
    pub id_given: bool,
    /// Its type (`track`, `page`, …, or the Customer.io event name).
    pub event_type: Arc<str>,
    /// The document the rules read.
    pub doc: Value,
    /// The document as JSON, kept with queued records for the live view and dead letters.
    pub input: Bytes,
}

/// `value` as compact JSON. Events and records are mostly 0.5–1 KB: starting at 1 KB spares
/// the three or four reallocations of serde_json's 128-byte start and ends at the capacity a
/// doubling buffer would reach anyway.
pub fn json_bytes<T: serde::Serialize + ?Sized>(value: &T) -> serde_json::Result<Bytes> {
    let mut out = Vec::with_capacity(1024);
    serde_json::to_writer(&mut out, value)?;
    Ok(Bytes::from(out))
}

/// Converts a gRPC event into its canonical JSON (camelCase keys, empty fields left out). The
/// event is consumed: its strings and objects move into the document.
pub fn event_to_json(e: pb::Event) -> Value {
    let mut m = Map::new();
    let mut text = |k: &str, v: String| {
        if !v.is_empty() {
            m.insert(k.to_string(), Value::String(v));
        }
    };
    text("type", e.r#type);
    text("event", e.event);
    text("name", e.name);
    text("category", e.category);
    text("userId", e.user_id);
    text("anonymousId", e.anonymous_id);
    text("groupId", e.group_id);
    text("previousId", e.previous_id);
    text("timestamp", e.timestamp);
    text("sentAt", e.sent_at);
    text("receivedAt", e.received_at);
    text("originalTimestamp", e.original_timestamp);
    text("messageId", e.message_id);
    text("channel", e.channel);
    for (k, v) in [
        ("properties", e.properties),
        ("traits", e.traits),
        ("context", e.context),
        ("integrations", e.integrations),
    ] {
        if let Some(s) = v {
            m.insert(k.to_string(), Value::Object(s.0));
        }
    }
    if let Some(v) = e.version {
        m.insert("version".to_string(), v.0);
    }
    Value::Object(m)
}

/// Builds a gRPC `Event` from canonical JSON, as a proto3 JSON client would (the inverse of
/// [`event_to_json`]); fields of the wrong JSON type are left empty.
pub fn json_to_event(json: &Value) -> pb::Event {
    let s = |k: &str| {
        json.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let st = |k: &str| json.get(k).and_then(json_to_struct);
    pb::Event {
        r#type: s("type"),
        event: s("event"),
        name: s("name"),
        category: s("category"),
        properties: st("properties"),
        traits: st("traits"),
        user_id: s("userId"),
        anonymous_id: s("anonymousId"),
        group_id: s("groupId"),
        previous_id: s("previousId"),
        context: st("context"),
        integrations: st("integrations"),
        timestamp: s("timestamp"),
        sent_at: s("sentAt"),
        received_at: s("receivedAt"),
        original_timestamp: s("originalTimestamp"),
        message_id: s("messageId"),
        channel: s("channel"),
        version: json.get("version").cloned().map(JsonValue),
    }
}

/// The JSON object a protobuf `Struct` holds.
pub fn struct_to_json(s: &JsonStruct) -> Value {
    Value::Object(s.0.clone())
}

/// Converts JSON to a protobuf `Struct`; `None` when it is not an object.
pub fn json_to_struct(v: &Value) -> Option<JsonStruct> {
    match v {
        Value::Object(m) => Some(JsonStruct(m.clone())),
        _ => None,
    }
}

/// Validates a Signal event document, filling in `messageId` (a new UUID) and `timestamp` (the
/// receive time) when absent. `field` prefixes violation paths (`event` for gRPC, `` for HTTP).
pub fn signal_event(
    mut doc: Value,
    field: &str,
    max_bytes: usize,
    received_ms: i64,
) -> Result<InboundEvent, ApiError> {
    let at = |name: &str| {
        if field.is_empty() {
            name.to_string()
        } else {
            format!("{field}.{name}")
        }
    };
    let Value::Object(m) = &mut doc else {
        return Err(ApiError::field(
            if field.is_empty() { "body" } else { field },
            "must be a JSON object (a Signal canonical event)",
        ));
    };
    let mut violations = Vec::new();
    // Text fields are only borrowed while checking; the two the relay keeps (type, id) are
    // copied once at the end.
    fn text_of<'m>(
        m: &'m Map<String, Value>,
        k: &str,
        at: &dyn Fn(&str) -> String,
        violations: &mut Vec<FieldViolation>,
    ) -> Option<&'m str> {
        match m.get(k) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.trim().is_empty() => None,
            Some(Value::String(s)) => Some(s),
            Some(_) => {
                violations.push(FieldViolation::new(at(k), "must be a string"));
                None
            }
        }
    }
    let event_type = text_of(m, "type", &at, &mut violations);
    match event_type {
        None if !violations.iter().any(|v| v.field == at("type")) => violations.push(FieldViolation::new(
            at("type"),
            format!("is required; one of {}", SIGNAL_TYPES.join(", ")),
        )),
        Some(t) if !SIGNAL_TYPES.contains(&t) => violations.push(FieldViolation::new(
            at("type"),
            format!(
                "unknown event type `{t}`; expected one of {}",
                SIGNAL_TYPES.join(", ")
            ),
        )),
        _ => {}
    }
    let user_id = text_of(m, "userId", &at, &mut violations);
    let anonymous_id = text_of(m, "anonymousId", &at, &mut violations);
    if user_id.is_none() && anonymous_id.is_none() {
        violations.push(FieldViolation::new(
            at("userId"),
            "an event needs a userId or an anonymousId, or Lytics cannot tie it to a user",
        ));
    }
    if event_type == Some("track")
        && text_of(m, "event", &at, &mut violations).is_none()
        && !violations.iter().any(|v| v.field == at("event"))
    {
        violations.push(FieldViolation::new(
            at("event"),
            "a track event needs its event name",
        ));
    }
    for k in [
        "name",
        "category",
        "groupId",
        "previousId",
        "sentAt",
        "receivedAt",
        "originalTimestamp",
        "channel",
    ] {
        let _ = text_of(m, k, &at, &mut violations);
    }
    for k in ["properties", "traits", "context", "integrations"] {
        match m.get(k) {
            None | Some(Value::Null) | Some(Value::Object(_)) => {}
            Some(_) => violations.push(FieldViolation::new(at(k), "must be an object")),
        }
    }
    let timestamp = text_of(m, "timestamp", &at, &mut violations);
    if let Some(ts) = timestamp
        && timefmt::parse_iso_ms(ts).is_none()
    {
        violations.push(FieldViolation::new(
            at("timestamp"),
            format!("`{ts}` is not an ISO-8601 time such as 2026-02-25T14:30:00.000Z"),
        ));
    }
    let message_id = text_of(m, "messageId", &at, &mut violations);
    if message_id.is_some_and(|id| id.len() > 256) {
        violations.push(FieldViolation::new(
            at("messageId"),
            "must be at most 256 characters",
        ));
    }
    if !violations.is_empty() {
        return Err(ApiError::violations("event", violations));
    }
    let event_type: Arc<str> = Arc::from(event_type.unwrap_or_default());
    let id_given = message_id.is_some();
    let has_timestamp = timestamp.is_some();
    let id: Arc<str> = match message_id {
        Some(id) => Arc::from(id),
        None => {
            let id = uuid::Uuid::new_v4().to_string();
            let arc = Arc::from(id.as_str());
            m.insert("messageId".into(), Value::String(id));
            arc
        }
    };
    if !has_timestamp {
        let now = timefmt::ms_to_rfc3339(received_ms).unwrap_or_default();
        m.insert("timestamp".into(), Value::String(now));
    }
    let input = json_bytes(&doc).map_err(|e| ApiError::internal(e.to_string()))?;
    if input.len() > max_bytes {
        return Err(too_large(
            if field.is_empty() { "body" } else { field },
            input.len(),
            max_bytes,
        ));
    }
    Ok(InboundEvent {
        source: Source::Signal,
        id,
        id_given,
        event_type,
        doc,
        input,
    })
}

/// The error for an event over the size limit.
pub fn too_large(field: &str, size: usize, max: usize) -> ApiError {
    ApiError {
        code: ErrorCode::PayloadTooLarge,
        message: format!("the event is {size} bytes, over the {max}-byte limit"),
        violations: vec![FieldViolation::new(
            field,
            format!("is {size} bytes; at most {max} are accepted"),
        )],
        retry_after: None,
    }
}

/// Validates a Customer.io reporting webhook, current (`object_type` + `metric`) or legacy
/// (`event_type`) format. The event type is `event_type`, or `<object_type>_<metric>`.
pub fn customerio_event(doc: Value, field: &str, max_bytes: usize) -> Result<InboundEvent, ApiError> {
    let at = |name: &str| {
        if field.is_empty() {
            name.to_string()
        } else {
            format!("{field}.{name}")
        }
    };
    let Value::Object(m) = &doc else {
        return Err(ApiError::field(
            if field.is_empty() { "body" } else { field },
            "must be a JSON object (a Customer.io reporting webhook)",
        ));
    };
    let mut violations = Vec::new();
    let text = |k: &str| {
        m.get(k).and_then(|v| match v {
            Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
    };
    let event_id = text("event_id");
    if event_id.is_none() {
        violations.push(FieldViolation::new(
            at("event_id"),
            "is required: the webhook's unique id",
        ));
    }
    let event_type = match (text("event_type"), text("object_type"), text("metric")) {
        (Some(t), _, _) => Some(t),
        (None, Some(o), Some(mt)) => Some(format!("{o}_{mt}")),
        (None, o, mt) => {
            if o.is_none() {
                violations.push(FieldViolation::new(
                    at("object_type"),
                    "is required (with `metric`) unless the legacy `event_type` is given",
                ));
            }
            if mt.is_none() {
                violations.push(FieldViolation::new(
                    at("metric"),
                    "is required (with `object_type`) unless the legacy `event_type` is given",
                ));
            }
            None
        }
    };
    match m.get("timestamp") {
        Some(v) if timefmt::value_to_ms(v).is_some() => {}
        Some(_) => violations.push(FieldViolation::new(at("timestamp"), "must be unix seconds")),
        None => violations.push(FieldViolation::new(at("timestamp"), "is required (unix seconds)")),
    }
    match m.get("data") {
        Some(Value::Object(_)) => {}
        Some(_) => violations.push(FieldViolation::new(at("data"), "must be an object")),
        None => violations.push(FieldViolation::new(at("data"), "is required")),
    }
    if !violations.is_empty() {
        return Err(ApiError::violations("Customer.io webhook", violations));
    }
    let input = json_bytes(&doc).map_err(|e| ApiError::internal(e.to_string()))?;
    if input.len() > max_bytes {
        return Err(too_large(
            if field.is_empty() { "body" } else { field },
            input.len(),
            max_bytes,
        ));
    }
    Ok(InboundEvent {
        source: Source::CustomerIo,
        id: Arc::from(event_id.unwrap_or_default()),
        id_given: true,
        event_type: Arc::from(event_type.unwrap_or_default()),
        doc,
        input,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ok(doc: Value) -> InboundEvent {
        signal_event(doc, "event", 32 * 1024, 0).unwrap()
    }

    fn fields(doc: Value) -> Vec<String> {
        signal_event(doc, "event", 32 * 1024, 0)
            .unwrap_err()
            .violations
            .into_iter()
            .map(|v| v.field)
            .collect()
    }

    #[test]
    fn the_seed_event_is_accepted_unchanged() {
        let text = std::fs::read_to_string("tests/fixtures/signal_canonical_track.json").unwrap();
        let doc: Value = serde_json::from_str(&text).unwrap();
        let e = ok(doc.clone());
        assert_eq!(&*e.id, "a1b2c3d4-e5f6-7890-abcd-ef1234567890");
        assert_eq!(&*e.event_type, "track");
        assert_eq!(e.doc, doc);
    }

    #[test]
    fn fills_in_message_id_and_timestamp() {
        let e = ok(json!({"type": "page", "anonymousId": "a"}));
        assert_eq!(e.doc["messageId"].as_str().unwrap().len(), 36);
        assert_eq!(e.doc["timestamp"], json!("1970-01-01T00:00:00.000Z"));
    }

    #[test]
    fn reports_every_invalid_field() {
        assert_eq!(fields(json!({})), vec!["event.type", "event.userId"]);
        assert_eq!(
            fields(json!({"type": "click", "userId": "u"})),
            vec!["event.type"]
        );
        assert_eq!(
            fields(json!({"type": "track", "userId": "u"})),
            vec!["event.event"]
        );
        assert_eq!(
            fields(
                json!({"type": "page", "userId": 5, "anonymousId": "a", "properties": [], "timestamp": "soon"})
            ),
            vec!["event.userId", "event.properties", "event.timestamp"]
        );
    }

    #[test]
    fn oversized_events_are_refused() {
        let big = "x".repeat(40_000);
        let err = signal_event(
            json!({"type": "page", "userId": "u", "name": big}),
            "event",
            32 * 1024,
            0,
        )
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::PayloadTooLarge);
    }

    #[test]
    fn proto_struct_round_trips_to_json() {
        let v = json!({"a": 1, "b": [true, null, "x"], "c": {"d": 1.5}});
        let s = json_to_struct(&v).unwrap();
        assert_eq!(struct_to_json(&s), v);
    }
}
