//! The normalize stage: turns what a sender posted into a validated event document.
//!
//! Input: a gRPC `Event` message or JSON from HTTP. Output: an [`InboundEvent`] — the document
//! the rules read (JSON, or a gRPC event read in place, [`EventDoc`]), its id, type and time —
//! or an [`ApiError`] listing every invalid
//! field. Both doors run the same checks, so they answer the same errors. Never maps and never
//! queues.

use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use prost::Message;
use serde_json::{Map, Value};

use crate::error::{ApiError, ErrorCode, FieldViolation};
use crate::proto::v1 as pb;
use crate::proto::view::{self, EventView};
use crate::proto::{JsonStruct, JsonValue};
use crate::rules::path::{Members, Step, Val};
use crate::rules::{Document, Fields, Source};
use crate::timefmt;

/// The Signal event types the relay accepts (the shipped rules map page, track and identify;
/// the others are accepted and, without a rule, ignored).
pub const SIGNAL_TYPES: &[&str] = &["track", "page", "identify", "screen", "group", "alias"];

/// How deep an event's objects and lists may nest, the event object itself being the first
/// level. Every door checks it, so an event is accepted or refused alike over HTTP and gRPC:
/// the decoders' own limits (protobuf's recursion limit, at about 50 levels of a `Struct`, and
/// serde_json's, at 127) lie beyond it and would otherwise differ by door.
pub const MAX_NESTING: usize = 32;

/// The largest Customer.io webhook accepted, on every door (Customer.io's own bodies are far
/// larger than a Signal event: they carry the message's subject and, for some events, content).
pub const MAX_WEBHOOK_BYTES: usize = 256 * 1024;
// The event message itself is one more level than what it holds.
const _: () = assert!(
    crate::proto::SHALLOW_NESTING < MAX_NESTING,
    "a gRPC event the fast path decodes whole must be within the limit unchecked"
);

/// True when `value`'s objects and lists nest more than `limit` deep.
fn nests_deeper_than(value: &Value, limit: usize) -> bool {
    match value {
        Value::Object(m) => limit == 0 || m.values().any(|v| nests_deeper_than(v, limit - 1)),
        Value::Array(items) => limit == 0 || items.iter().any(|v| nests_deeper_than(v, limit - 1)),
        _ => false,
    }
}

/// The violation path of member `name` of the event at `field` (`""`: the request body itself).
fn member(field: &str, name: &str) -> String {
    if field.is_empty() {
        name.to_string()
    } else {
        format!("{field}.{name}")
    }
}

/// The violation path of the whole event at `field`: `body` when the event is the request body.
fn whole(field: &str) -> &str {
    if field.is_empty() { "body" } else { field }
}

/// What a violation of [`MAX_NESTING`] says.
fn too_deep_text() -> String {
    format!(
        "nests objects and lists more than {MAX_NESTING} levels deep (the event itself is the \
         first level); flatten the deepest values"
    )
}

/// The error for a body its decoder refused as too deeply nested, past [`MAX_NESTING`].
pub fn too_deep(field: &str) -> ApiError {
    ApiError::field(whole(field), too_deep_text())
}

/// The answer for `field`, which does not decode as a `message`: nested past what protobuf
/// reads, or malformed.
fn undecodable(e: &prost::DecodeError, field: &str, message: &str) -> ApiError {
    let why = e.to_string();
    if why.contains("recursion limit reached") {
        return too_deep(field);
    }
    // prost names fields as Rust does (`Event.r#type`); the sender knows them as `type`.
    let why = why.replace("r#", "");
    ApiError::field(field, format!("is not a valid {message}: {why}"))
}

/// Refuses an event document nested past [`MAX_NESTING`], naming its top-level member that is.
fn check_nesting(doc: &Value, field: &str) -> Result<(), ApiError> {
    let Value::Object(m) = doc else {
        return Ok(());
    };
    match m.iter().find(|(_, v)| nests_deeper_than(v, MAX_NESTING - 1)) {
        None => Ok(()),
        Some((key, _)) => Err(ApiError::field(member(field, key), too_deep_text())),
    }
}

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
    pub doc: EventDoc,
    /// The event as kept with its queued records for the live view and dead letters: see
    /// [`input_json`].
    pub input: Bytes,
}

/// The document the rules read: JSON, or a gRPC event read in place.
#[derive(Debug, Clone)]
pub enum EventDoc {
    /// A JSON document (HTTP, webhooks, and gRPC events the door decoded whole).
    Json(Value),
    /// A gRPC event read in place: the rules' plain paths convert only what they select.
    Proto(Box<EventView>),
}

impl EventDoc {
    /// The whole document as JSON (decoded on first use for an event read in place).
    pub fn json(&self) -> &Value {
        match self {
            EventDoc::Json(v) => v,
            EventDoc::Proto(v) => v.json(),
        }
    }
}

impl PartialEq for EventDoc {
    fn eq(&self, other: &Self) -> bool {
        self.json() == other.json()
    }
}

impl Document for EventDoc {
    fn at(&self, steps: &[Step]) -> Option<std::borrow::Cow<'_, Value>> {
        match self {
            EventDoc::Json(v) => v.at(steps),
            EventDoc::Proto(v) => v.at(steps),
        }
    }

    fn json(&self) -> &Value {
        EventDoc::json(self)
    }

    fn val_at(&self, steps: &[Step]) -> Option<Val<'_>> {
        match self {
            EventDoc::Json(v) => v.val_at(steps),
            EventDoc::Proto(v) => v.val_at(steps),
        }
    }

    fn spread<'a>(
        &'a self,
        steps: &[Step],
        prefix: &'a str,
        emit: &mut dyn FnMut(std::borrow::Cow<'a, str>, Val<'a>),
    ) -> Members<'a> {
        match self {
            EventDoc::Json(v) => v.spread(steps, prefix, emit),
            EventDoc::Proto(v) => v.spread(steps, prefix, emit),
        }
    }
}

/// The first byte of an input kept as a protobuf `Event`; an input kept as JSON starts with `{`.
const PROTO_INPUT: u8 = 0;

/// An event's input as JSON, whichever form it was kept in: the canonical JSON document (events
/// from HTTP, Customer.io webhooks), or — for events that arrived over gRPC — a zero byte, then
/// the `Event` exactly as received, then an `Event` holding the `messageId` and `timestamp` the
/// relay filled in. Protobuf merges concatenated messages, so the JSON of a kept gRPC event is
/// the document the rules read, as it would have been kept in JSON. `None` when the bytes are
/// neither (never written by the relay).
pub fn input_json(input: &[u8]) -> Option<Value> {
    match input.split_first() {
        Some((&PROTO_INPUT, event)) => pb::Event::decode(event).ok().map(event_to_json),
        _ => serde_json::from_slice(input).ok(),
    }
}

/// An event's input as a protobuf `Struct` (see [`input_json`]); `None` when it is not an object.
pub fn input_struct(input: &[u8]) -> Option<JsonStruct> {
    match input_json(input)? {
        Value::Object(m) => Some(JsonStruct(m)),
        _ => None,
    }
}

/// An event's input as JSON text (see [`input_json`]): JSON inputs as they are, others written
/// out; `null` for bytes that are neither.
pub fn input_json_bytes(input: &Bytes) -> Bytes {
    if input.first() == Some(&PROTO_INPUT) {
        input_json(input).map_or_else(|| Bytes::from_static(b"null"), |v| json_bytes(&v))
    } else {
        input.clone()
    }
}

/// `value` as compact JSON, byte for byte what `serde_json::to_vec` writes. Events and records
/// are mostly 0.5–1 KB: starting at 1 KB spares the reallocations of a small start.
pub fn json_bytes(value: &Value) -> Bytes {
    let mut out = Vec::with_capacity(1024);
    write_json(&mut out, value);
    Bytes::from(out)
}

/// A rule's record as compact JSON (keys in order), as [`json_bytes`] writes an object.
pub fn record_bytes(fields: &Fields<'_>) -> Bytes {
    let mut out = Vec::with_capacity(1024);
    out.push(b'{');
    for (i, (key, value)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json_str(&mut out, key);
        out.push(b':');
        match value {
            Val::Json(v) => write_json(&mut out, v),
            Val::Text(t) => write_json_str(&mut out, t),
        }
    }
    out.push(b'}');
    Bytes::from(out)
}

/// Appends `value` as compact JSON. Strings that need no escape (nearly all) are copied in
/// one piece; the rest, and numbers, are written by serde_json, so the bytes are serde_json's.
pub fn write_json(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => write_with_serde(out, n),
        Value::String(s) => write_json_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json(out, item);
            }
            out.push(b']');
        }
        Value::Object(members) => write_json_object(out, members.iter().map(|(k, v)| (k.as_str(), v))),
    }
}

/// Appends an object with these members, in this order.
fn write_json_object<'a>(out: &mut Vec<u8>, members: impl Iterator<Item = (&'a str, &'a Value)>) {
    out.push(b'{');
    for (i, (key, value)) in members.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json_str(out, key);
        out.push(b':');
        write_json(out, value);
    }
    out.push(b'}');
}

/// Appends `text` as a JSON string.
fn write_json_str(out: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    if needs_escape(bytes) {
        write_with_serde(out, text);
    } else {
        out.reserve(bytes.len() + 2);
        out.push(b'"');
        out.extend_from_slice(bytes);
        out.push(b'"');
    }
}

/// True when `bytes` hold a character JSON escapes: a control character, `"` or `\` (serde_json
/// escapes nothing else). Eight bytes are checked at a time with word arithmetic: for each test
/// the word is nonzero exactly when some byte matches ("determine if a word has a byte less
/// than n", Bit Twiddling Hacks).
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let below = |w: u64, n: u8| w.wrapping_sub(ONES * u64::from(n)) & !w & HIGHS;
    let (words, rest) = bytes.as_chunks::<8>();
    for word in words {
        let w = u64::from_le_bytes(*word);
        if below(w, 0x20) | below(w ^ (ONES * u64::from(b'"')), 1) | below(w ^ (ONES * u64::from(b'\\')), 1)
            != 0
        {
            return true;
        }
    }
    rest.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

/// Writes a string or a number with serde_json. Writing either into memory cannot fail (only
/// I/O errors and non-string map keys can), so there is no error to pass on.
fn write_with_serde<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    if let Err(e) = serde_json::to_writer(out, value) {
        debug_assert!(false, "serialising a scalar into memory failed: {e}");
    }
}

/// Hands the text fields of an `Event`, each with its canonical JSON name (camelCase), to the
/// macro named: the list that conversion both ways and validation read (`proto/view.rs` keeps
/// them with their field numbers; a test there checks the two agree).
macro_rules! with_text_fields {
    ($then:ident!($($args:tt)*)) => {
        $then!($($args)* [
            "type" r#type, "event" event, "name" name, "category" category, "userId" user_id,
            "anonymousId" anonymous_id, "groupId" group_id, "previousId" previous_id,
            "timestamp" timestamp, "sentAt" sent_at, "receivedAt" received_at,
            "originalTimestamp" original_timestamp, "messageId" message_id, "channel" channel
        ])
    };
}

/// `[(JSON name, &mut field)]` of an `Event`.
macro_rules! text_fields_mut {
    ($e:expr, [$($k:literal $f:ident),*]) => {
        [$(($k, &mut $e.$f)),*]
    };
}

/// The text field of an `Event` whose JSON name is `key`, if there is one.
macro_rules! text_field {
    ($e:expr, $key:expr, [$($k:literal $f:ident),*]) => {
        match $key {
            $($k => Some(&$e.$f),)*
            _ => None,
        }
    };
}

/// Converts a gRPC event into its canonical JSON (camelCase keys, empty fields left out). The
/// event is consumed: its strings and objects move into the document.
pub fn event_to_json(mut e: pb::Event) -> Value {
    let mut m = Map::new();
    for (k, v) in with_text_fields!(text_fields_mut!(e,)) {
        if !v.is_empty() {
            m.insert(k.to_string(), Value::String(std::mem::take(v)));
        }
    }
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
    let mut e = pb::Event {
        properties: st("properties"),
        traits: st("traits"),
        context: st("context"),
        integrations: st("integrations"),
        version: json.get("version").cloned().map(JsonValue),
        ..Default::default()
    };
    for (k, v) in with_text_fields!(text_fields_mut!(e,)) {
        *v = s(k);
    }
    e
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
/// `max_bytes` limits the document's JSON.
pub fn signal_event(
    mut doc: Value,
    field: &str,
    max_bytes: usize,
    received_ms: i64,
) -> Result<InboundEvent, ApiError> {
    let Value::Object(m) = &doc else {
        return Err(ApiError::field(
            whole(field),
            "must be a JSON object (a Signal canonical event)",
        ));
    };
    // The limit is on what the sender sent: the `messageId` and `timestamp` the relay fills in
    // do not count against it.
    let sent_len =
        (!m.contains_key("messageId") || !m.contains_key("timestamp")).then(|| json_bytes(&doc).len());
    let checked = check_signal(m, field)?;
    check_nesting(&doc, field)?;
    let filled = checked.fill_in(received_ms);
    filled.fill_json(&mut doc);
    let input = json_bytes(&doc);
    let size = sent_len.unwrap_or(input.len());
    if size > max_bytes {
        return Err(too_large(whole(field), size, max_bytes));
    }
    Ok(filled.into_event(EventDoc::Json(doc), input))
}

/// Decodes and validates a protobuf `Event` as [`signal_event`] validates JSON (the same
/// checks, read from the message's fields); the bytes are kept as the event's input.
/// `max_bytes` limits the encoded event.
pub fn signal_proto_event(
    event: &[u8],
    field: &str,
    max_bytes: usize,
    received_ms: i64,
) -> Result<InboundEvent, ApiError> {
    if event.len() > max_bytes {
        return Err(too_large(field, event.len(), max_bytes));
    }
    if let Some(layout) = view::Layout::read(event) {
        return read_in_place(event, layout, field, received_ms);
    }
    let (decoded, shallow) = crate::proto::decode_noting_depth(|| pb::Event::decode(event));
    let decoded = decoded.map_err(|e| undecodable(&e, field, "lytics_relay.v1.Event"))?;
    let checked = check_signal(&decoded, field)?;
    let mut doc = event_to_json(decoded);
    // A document the decoder's fast path took whole is shallow enough; walking every event's
    // document would cost 1.7% of ingesting it.
    if !shallow {
        check_nesting(&doc, field)?;
    }
    let filled = checked.fill_in(received_ms);
    filled.fill_json(&mut doc);
    let input = proto_input(event, &filled);
    Ok(filled.into_event(EventDoc::Json(doc), input))
}

/// What is kept of a gRPC event: see [`input_json`].
fn proto_input(event: &[u8], filled: &Filled) -> Bytes {
    let mut input = Vec::with_capacity(1 + event.len() + filled.added.encoded_len());
    input.push(PROTO_INPUT);
    input.extend_from_slice(event);
    filled.added.encode_raw(&mut input);
    Bytes::from(input)
}

/// A gRPC event whose layout was read: validated from its fields and kept as the bytes it
/// arrived in, which the rules read in place.
fn read_in_place(
    event: &[u8],
    layout: view::Layout,
    field: &str,
    received_ms: i64,
) -> Result<InboundEvent, ApiError> {
    let checked = check_signal(&view::Reader::new(event, &layout, None, None), field)?;
    let filled = checked.fill_in(received_ms);
    let input = proto_input(event, &filled);
    let (id, timestamp) = filled.filled_in();
    let doc = EventView::new(
        input.clone(),
        1..1 + event.len(),
        layout,
        id.map(str::to_owned),
        timestamp.map(str::to_owned),
    );
    Ok(filled.into_event(EventDoc::Proto(Box::new(doc)), input))
}

/// An event's top-level fields as validation reads them, from JSON or from an `Event` message.
trait SignalFields {
    /// The text of `key`: `Ok(None)` when absent, null or blank; `Err` when it is not a string.
    fn text(&self, key: &str) -> Result<Option<&str>, ()>;
    /// False when `key` is present and neither an object nor null.
    fn object_or_absent(&self, key: &str) -> bool;
    /// True when an object the shipped rules read an email from (`traits`, `context.traits`,
    /// and for page and track events `properties`) has an `email` that is text, not blank.
    fn has_email(&self) -> bool;
}

/// True when `object` has an `email` that is text and not blank.
fn email_in(object: Option<&Value>) -> bool {
    object
        .and_then(|t| t.get("email"))
        .and_then(Value::as_str)
        .is_some_and(|e| !e.trim().is_empty())
}

impl SignalFields for Map<String, Value> {
    fn text(&self, key: &str) -> Result<Option<&str>, ()> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok((!s.trim().is_empty()).then_some(s.as_str())),
            Some(_) => Err(()),
        }
    }

    fn object_or_absent(&self, key: &str) -> bool {
        matches!(self.get(key), None | Some(Value::Null | Value::Object(_)))
    }

    fn has_email(&self) -> bool {
        email_in(self.get("traits"))
            || email_in(self.get("context").and_then(|c| c.get("traits")))
            || email_in(self.get("properties"))
    }
}

impl SignalFields for view::Reader<'_> {
    fn text(&self, key: &str) -> Result<Option<&str>, ()> {
        Ok(view::Reader::text(self, key).filter(|text| !text.trim().is_empty()))
    }

    fn object_or_absent(&self, _key: &str) -> bool {
        // properties, traits, context and integrations are Structs: objects or absent.
        true
    }

    fn has_email(&self) -> bool {
        static PATHS: LazyLock<[Vec<Step>; 3]> = LazyLock::new(|| {
            let path = |keys: &[&str]| keys.iter().map(|k| Step::Key((*k).into())).collect();
            [
                path(&["traits", "email"]),
                path(&["context", "traits", "email"]),
                path(&["properties", "email"]),
            ]
        });
        PATHS.iter().any(|steps| {
            self.at(steps)
                .as_ref()
                .and_then(Value::as_str)
                .is_some_and(|e| !e.trim().is_empty())
        })
    }
}

impl SignalFields for pb::Event {
    fn text(&self, key: &str) -> Result<Option<&str>, ()> {
        let text: Option<&String> = with_text_fields!(text_field!(self, key,));
        Ok(text.map(String::as_str).filter(|text| !text.trim().is_empty()))
    }

    fn object_or_absent(&self, _key: &str) -> bool {
        // properties, traits, context and integrations are Structs: objects or absent.
        true
    }

    fn has_email(&self) -> bool {
        let traits = self.traits.as_ref().and_then(|t| t.0.get("email"));
        let context_traits = self
            .context
            .as_ref()
            .and_then(|c| c.0.get("traits"))
            .and_then(|t| t.get("email"));
        let properties = self.properties.as_ref().and_then(|p| p.0.get("email"));
        [traits, context_traits, properties]
            .into_iter()
            .flatten()
            .any(|e| e.as_str().is_some_and(|e| !e.trim().is_empty()))
    }
}

/// What validation keeps of a valid event.
struct Checked {
    event_type: Arc<str>,
    /// The sender's `messageId`, if it gave one.
    given_id: Option<Arc<str>>,
    has_timestamp: bool,
    /// For an event without `timestamp`: its `originalTimestamp` and `sentAt` (unix ms), each
    /// when given as an ISO-8601 time.
    client_times: (Option<i64>, Option<i64>),
}

/// A valid event once the relay filled in what the sender left out.
struct Filled {
    event_type: Arc<str>,
    id: Arc<str>,
    id_given: bool,
    timestamp_added: bool,
    /// An `Event` holding only what was filled in.
    added: pb::Event,
}

impl Checked {
    /// Fills in `messageId` (a new UUID) and `timestamp` when the sender left them out: as
    /// Segment does, the sender's `originalTimestamp` moved by the sender's clock skew
    /// (`received_ms - (sentAt - originalTimestamp)`, or `originalTimestamp` as it is without
    /// `sentAt`), else `received_ms`.
    fn fill_in(self, received_ms: i64) -> Filled {
        let mut added = pb::Event::default();
        let id_given = self.given_id.is_some();
        let id = self.given_id.unwrap_or_else(|| {
            let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
            let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
            added.message_id = String::from(&*text);
            Arc::from(&*text)
        });
        if !self.has_timestamp {
            let at = match self.client_times {
                (Some(original), Some(sent)) => received_ms.checked_sub(sent.saturating_sub(original)),
                (original, _) => original,
            };
            let at = at
                .filter(|ms| (0..=timefmt::MAX_MS).contains(ms))
                .unwrap_or(received_ms);
            added.timestamp = timefmt::ms_to_rfc3339(at)
                .or_else(|| timefmt::ms_to_rfc3339(received_ms))
                .unwrap_or_default();
        }
        Filled {
            event_type: self.event_type,
            id,
            id_given,
            timestamp_added: !self.has_timestamp,
            added,
        }
    }
}

impl Filled {
    /// The `messageId` and `timestamp` the relay filled in, each when it did.
    fn filled_in(&self) -> (Option<&str>, Option<&str>) {
        (
            (!self.id_given).then_some(self.added.message_id.as_str()),
            self.timestamp_added.then_some(self.added.timestamp.as_str()),
        )
    }

    /// Writes what the relay filled in into a JSON document.
    fn fill_json(&self, doc: &mut Value) {
        let (id, timestamp) = self.filled_in();
        if let Value::Object(m) = doc {
            for (key, text) in [("messageId", id), ("timestamp", timestamp)] {
                if let Some(text) = text {
                    m.insert(key.into(), Value::String(text.to_owned()));
                }
            }
        }
    }

    fn into_event(self, doc: EventDoc, input: Bytes) -> InboundEvent {
        InboundEvent {
            source: Source::Signal,
            id: self.id,
            id_given: self.id_given,
            event_type: self.event_type,
            doc,
            input,
        }
    }
}

/// The checks every Signal event passes, whichever door it came through; every violation is
/// reported.
fn check_signal(m: &impl SignalFields, field: &str) -> Result<Checked, ApiError> {
    let at = |name: &str| member(field, name);
    let mut violations = Vec::new();
    let text_of = |k: &str, violations: &mut Vec<FieldViolation>| match m.text(k) {
        Ok(t) => t,
        Err(()) => {
            violations.push(FieldViolation::new(at(k), "must be a string"));
            None
        }
    };
    let event_type = text_of("type", &mut violations);
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
    let before = violations.len();
    let user_id = text_of("userId", &mut violations);
    let anonymous_id = text_of("anonymousId", &mut violations);
    // Either one not being text is named above; this says that no identity is given. An email
    // in the traits identifies the user as well (the rules decide whether it is an address).
    if user_id.is_none() && anonymous_id.is_none() && violations.len() == before && !m.has_email() {
        violations.push(FieldViolation::new(
            at("userId"),
            "an event needs a userId, an anonymousId or an email (traits.email, \
             context.traits.email or properties.email), or Lytics cannot tie it to a user",
        ));
    }
    if event_type == Some("track")
        && text_of("event", &mut violations).is_none()
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
        "receivedAt",
        "channel",
    ] {
        let _ = text_of(k, &mut violations);
    }
    let original = text_of("originalTimestamp", &mut violations);
    let sent = text_of("sentAt", &mut violations);
    for k in ["properties", "traits", "context", "integrations"] {
        if !m.object_or_absent(k) {
            violations.push(FieldViolation::new(at(k), "must be an object"));
        }
    }
    let timestamp = text_of("timestamp", &mut violations);
    if let Some(ts) = timestamp {
        match timefmt::parse_iso_ms(ts) {
            None => violations.push(FieldViolation::new(
                at("timestamp"),
                format!("`{ts}` is not an ISO-8601 time such as 2026-02-25T14:30:00.000Z"),
            )),
            // Lytics files events by epoch milliseconds: a time before the epoch is a broken
            // clock or a placeholder (0001-01-01), as a negative Customer.io timestamp is.
            Some(ms) if ms < 0 => violations.push(FieldViolation::new(
                at("timestamp"),
                format!("`{ts}` is before 1970-01-01T00:00:00Z, which no event time can be"),
            )),
            Some(_) => {}
        }
    }
    let message_id = text_of("messageId", &mut violations);
    if message_id.is_some_and(|id| id.len() > 256) {
        violations.push(FieldViolation::new(
            at("messageId"),
            "must be at most 256 characters",
        ));
    }
    if !violations.is_empty() {
        return Err(ApiError::violations("event", violations));
    }
    Ok(Checked {
        event_type: Arc::from(event_type.unwrap_or_default()),
        given_id: message_id.map(Arc::from),
        has_timestamp: timestamp.is_some(),
        // Read only for an event without `timestamp` (see `Checked::fill_in`); a text that is
        // no time is left as it is.
        client_times: match timestamp {
            Some(_) => (None, None),
            None => (
                original.and_then(timefmt::parse_iso_ms),
                sent.and_then(timefmt::parse_iso_ms),
            ),
        },
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

/// Decodes a Customer.io webhook sent over gRPC (a `google.protobuf.Struct`) and validates it
/// as [`customerio_event`] does.
pub fn customerio_proto_webhook(
    webhook: &[u8],
    field: &str,
    max_bytes: usize,
) -> Result<InboundEvent, ApiError> {
    let decoded =
        JsonStruct::decode(webhook).map_err(|e| undecodable(&e, field, "google.protobuf.Struct"))?;
    customerio_event(Value::Object(decoded.0), field, max_bytes)
}

/// Validates a Customer.io reporting webhook, current (`object_type` + `metric`) or legacy
/// (`event_type`) format. The event type is `event_type`, or `<object_type>_<metric>`.
pub fn customerio_event(doc: Value, field: &str, max_bytes: usize) -> Result<InboundEvent, ApiError> {
    let at = |name: &str| member(field, name);
    let Value::Object(m) = &doc else {
        return Err(ApiError::field(
            whole(field),
            "must be a JSON object (a Customer.io reporting webhook)",
        ));
    };
    check_nesting(&doc, field)?;
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
    let input = json_bytes(&doc);
    if input.len() > max_bytes {
        return Err(too_large(whole(field), input.len(), max_bytes));
    }
    Ok(InboundEvent {
        source: Source::CustomerIo,
        id: Arc::from(event_id.unwrap_or_default()),
        id_given: true,
        event_type: Arc::from(event_type.unwrap_or_default()),
        doc: EventDoc::Json(doc),
        input,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn needs_escape_finds_exactly_the_bytes_json_escapes() {
        let naive = |b: &[u8]| b.iter().any(|&c| c < 0x20 || c == b'"' || c == b'\\');
        for len in 0..20 {
            for pos in 0..len {
                for byte in 0..=255u8 {
                    // Plain bytes around the probe, including UTF-8 continuation bytes.
                    let mut text: Vec<u8> = (0..len).map(|i| [b'a', 0x80, 0xff, b'~'][i % 4]).collect();
                    text[pos] = byte;
                    assert_eq!(needs_escape(&text), naive(&text), "{text:?}");
                }
            }
        }
    }

    /// `depth` objects (or lists) nested in one another, a number innermost.
    fn containers(depth: usize, lists: bool) -> Value {
        let mut v = json!(1);
        for _ in 0..depth {
            v = if lists { json!([v]) } else { json!({"k": v}) };
        }
        v
    }

    #[test]
    fn both_doors_refuse_the_same_nesting_with_the_same_answer() {
        for lists in [false, true] {
            // Properties `depth` levels deep (they are an object: its members nest the rest).
            let event = |depth: usize| json!({"type": "track", "event": "x", "userId": "u", "properties": {"deep": containers(depth - 1, lists)}});
            let proto =
                |doc: &Value| signal_proto_event(&json_to_event(doc).encode_to_vec(), "event", 1 << 20, 0);
            // The event is the first level, so its properties may hold MAX_NESTING - 1.
            let deepest = event(MAX_NESTING - 1);
            assert!(
                signal_event(deepest.clone(), "event", 1 << 20, 0).is_ok(),
                "lists {lists}"
            );
            assert!(proto(&deepest).is_ok(), "lists {lists}");
            // One more level, and far past protobuf's own limit (about 50): the same refusal.
            for depth in [MAX_NESTING, 60] {
                let doc = event(depth);
                for (door, err) in [
                    (
                        "json",
                        signal_event(doc.clone(), "event", 1 << 20, 0).unwrap_err(),
                    ),
                    ("proto", proto(&doc).unwrap_err()),
                ] {
                    assert_eq!(err.code, ErrorCode::InvalidArgument, "{door} {depth} {lists}");
                    let v = &err.violations[0];
                    assert!(v.field.starts_with("event"), "{door} {depth}: {v:?}");
                    assert!(
                        v.description.contains("more than 32 levels deep"),
                        "{door} {depth}: {v:?}"
                    );
                }
            }
        }
        // `version` is a `Value` of the message itself, decoded outside the Struct fast path.
        let proto =
            |doc: &Value| signal_proto_event(&json_to_event(doc).encode_to_vec(), "event", 1 << 20, 0);
        let deep_version =
            json!({"type": "track", "event": "x", "userId": "u", "version": containers(40, true)});
        for err in [
            proto(&deep_version).unwrap_err(),
            signal_event(deep_version.clone(), "event", 1 << 20, 0).unwrap_err(),
        ] {
            assert_eq!(err.violations[0].field, "event.version", "{err:?}");
        }
        // Both doors check the event's fields before its depth, so they name the same problem.
        let untyped = json!({"userId": "u", "properties": {"deep": containers(40, false)}});
        for err in [
            proto(&untyped).unwrap_err(),
            signal_event(untyped.clone(), "event", 1 << 20, 0).unwrap_err(),
        ] {
            assert_eq!(err.violations[0].field, "event.type", "{err:?}");
        }
        let err = signal_event(
            json!({"type": "page", "userId": "u", "context": containers(40, false)}),
            "",
            1 << 20,
            0,
        )
        .unwrap_err();
        assert_eq!(err.violations[0].field, "context");
        let webhook = json!({"event_id": "e", "metric": "opened", "object_type": "email", "timestamp": 1, "data": containers(40, true)});
        let err = customerio_event(webhook, "", 1 << 20).unwrap_err();
        assert_eq!(err.violations[0].field, "data");
        assert!(err.violations[0].description.contains("levels deep"));
    }

    #[test]
    fn json_bytes_writes_what_serde_json_writes() {
        let fixture: Value = serde_json::from_str(
            &std::fs::read_to_string("tests/fixtures/signal_canonical_track.json").unwrap(),
        )
        .unwrap();
        let tricky = json!({
            "quote\"key": "a \"quoted\" \\ back\\slash",
            "controls": "tab\t nl\n cr\r nul\u{0} unit\u{1f} del\u{7f}",
            "unicode": "é ü ✓ 😀 \u{2028} \u{2029}",
            "numbers": [0, -1, 1.5, -0.25, 1e300, 18446744073709551615u64, -9223372036854775808i64],
            "nested": {"empty_obj": {}, "empty_arr": [], "deep": [[[{"x": null}]]]},
            "bools": [true, false, null],
            "": ""
        });
        for value in [fixture, tricky, json!("plain"), json!(null), json!([]), json!(42)] {
            assert_eq!(
                &json_bytes(&value)[..],
                &serde_json::to_vec(&value).unwrap()[..],
                "{value}"
            );
        }
    }

    #[test]
    fn record_bytes_writes_the_record_as_a_json_object() {
        let rules = crate::rules::RuleSet::load(std::path::Path::new("rules")).unwrap();
        let doc: Value = serde_json::from_str(
            &std::fs::read_to_string("tests/fixtures/signal_canonical_track.json").unwrap(),
        )
        .unwrap();
        let mapping = rules.evaluate(Source::Signal, &doc, &Default::default());
        let fields = &mapping.records[0].fields;
        let bytes = record_bytes(fields);
        assert_eq!(&bytes[..], &serde_json::to_vec(fields).unwrap()[..]);
        assert_eq!(
            serde_json::from_slice::<Value>(&bytes).unwrap(),
            Value::Object(fields.to_map())
        );
    }

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
        assert_eq!(*e.doc.json(), doc);
    }

    #[test]
    fn fills_in_message_id_and_timestamp() {
        let e = ok(json!({"type": "page", "anonymousId": "a"}));
        assert_eq!(e.doc.json()["messageId"].as_str().unwrap().len(), 36);
        assert_eq!(e.doc.json()["timestamp"], json!("1970-01-01T00:00:00.000Z"));
    }

    #[test]
    fn a_missing_timestamp_comes_from_original_timestamp_moved_by_the_clock_skew() {
        // Received at 2026-02-25T15:00:00Z; sent by a clock 10 s fast, 90 s after the event.
        let received = 1_772_031_600_000;
        let cases = [
            (
                json!({"originalTimestamp": "2026-02-25T14:58:40Z", "sentAt": "2026-02-25T15:00:10Z"}),
                "2026-02-25T14:58:30.000Z",
            ),
            (
                json!({"originalTimestamp": "2026-02-25T14:58:40Z"}),
                "2026-02-25T14:58:40.000Z",
            ),
            (
                json!({"originalTimestamp": "2026-02-25T14:58:40Z", "sentAt": "later"}),
                "2026-02-25T14:58:40.000Z",
            ),
            (
                json!({"originalTimestamp": "earlier", "sentAt": "2026-02-25T15:00:10Z"}),
                "2026-02-25T15:00:00.000Z",
            ),
            (
                json!({"sentAt": "2026-02-25T15:00:10Z"}),
                "2026-02-25T15:00:00.000Z",
            ),
            // A skew that would put the event before 1970, or past 9999, is a broken clock:
            // receive time.
            (
                json!({"originalTimestamp": "1970-01-01T00:00:00Z", "sentAt": "2100-01-01T00:00:00Z"}),
                "2026-02-25T15:00:00.000Z",
            ),
            (
                json!({"originalTimestamp": "+262100-01-01T00:00:00+00:00", "sentAt": "1970-01-01T00:00:00Z"}),
                "2026-02-25T15:00:00.000Z",
            ),
            (
                json!({"originalTimestamp": "9999-12-31T23:59:59.999Z"}),
                "9999-12-31T23:59:59.999Z",
            ),
            // The sender's own `timestamp` wins.
            (
                json!({"timestamp": "2026-01-01T00:00:00Z", "originalTimestamp": "2026-02-25T14:58:40Z"}),
                "2026-01-01T00:00:00Z",
            ),
        ];
        for (times, want) in cases {
            let mut doc = json!({"type": "page", "anonymousId": "a"});
            doc.as_object_mut()
                .unwrap()
                .extend(times.as_object().unwrap().clone());
            let json = signal_event(doc.clone(), "event", 32 * 1024, received).unwrap();
            let proto = signal_proto_event(&proto(&doc), "event", 32 * 1024, received).unwrap();
            for e in [json, proto] {
                assert_eq!(e.doc.json()["timestamp"], json!(want), "{doc}");
                assert_eq!(
                    e.doc.at(&[Step::Key("timestamp".into())]).as_deref(),
                    Some(&json!(want)),
                    "{doc}"
                );
            }
        }
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
        assert_eq!(
            fields(json!({"type": "page", "userId": "u", "timestamp": "0001-01-01T00:00:00Z"})),
            vec!["event.timestamp"]
        );
        // An email in the traits is identity enough, over JSON and protobuf alike.
        for doc in [
            json!({"type": "track", "event": "E", "context": {"traits": {"email": "a@b.co"}}}),
            json!({"type": "page", "properties": {"email": "a@b.co"}}),
            json!({"type": "identify", "traits": {"email": "a@b.co"}}),
        ] {
            assert!(signal_event(doc.clone(), "event", 32 * 1024, 0).is_ok(), "{doc}");
            assert!(
                signal_proto_event(&proto(&doc), "event", 32 * 1024, 0).is_ok(),
                "{doc}"
            );
        }
        assert_eq!(
            fields(json!({"type": "identify", "traits": {"email": " "}})),
            vec!["event.userId"]
        );
        // An identity that is not text is named once, as such.
        let err = signal_event(json!({"type": "page", "userId": ["x"]}), "event", 32 * 1024, 0).unwrap_err();
        assert_eq!(err.violations.len(), 1, "{err:?}");
        assert_eq!(err.violations[0].description, "must be a string");
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

    fn proto(doc: &Value) -> Vec<u8> {
        json_to_event(doc).encode_to_vec()
    }

    #[test]
    fn a_grpc_event_keeps_its_bytes_and_reads_back_as_its_document() {
        let text = std::fs::read_to_string("tests/fixtures/signal_canonical_track.json").unwrap();
        let doc: Value = serde_json::from_str(&text).unwrap();
        let raw = proto(&doc);
        let e = signal_proto_event(&raw, "event", 32 * 1024, 0).unwrap();
        // Nothing to fill in: the input is the marker and the bytes as received.
        assert_eq!(e.input[0], PROTO_INPUT);
        assert_eq!(&e.input[1..], &raw[..]);
        // What protobuf can carry of the fixture (it has no null for `groupId`).
        let doc = event_to_json(json_to_event(&doc));
        assert_eq!(*e.doc.json(), doc);
        assert_eq!(input_json(&e.input).unwrap(), *e.doc.json());
        assert_eq!(input_json_bytes(&e.input), json_bytes(e.doc.json()));
        // The same event from JSON: the same document, kept as the same JSON once read back.
        let from_json = signal_event(doc, "event", 32 * 1024, 0).unwrap();
        assert_eq!(from_json.doc, e.doc);
        assert_eq!(input_json_bytes(&from_json.input), from_json.input);
        assert_eq!(input_json_bytes(&e.input), from_json.input);
    }

    #[test]
    fn a_malformed_grpc_event_names_its_fields_as_the_proto_does() {
        // Field 1 (`type`, a string) sent as a varint.
        let err = signal_proto_event(&[0x08, 0x01], "event", 32 * 1024, 0).unwrap_err();
        let why = &err.violations[0].description;
        assert!(why.contains("Event.type"), "{why}");
        assert!(!why.contains("r#"), "{why}");
    }

    #[test]
    fn what_the_relay_fills_in_is_kept_with_a_grpc_event() {
        let raw = proto(&json!({"type": "page", "anonymousId": "a", "messageId": "  "}));
        let e = signal_proto_event(&raw, "event", 32 * 1024, 1_000).unwrap();
        assert_eq!(&e.input[1..=raw.len()], &raw[..]);
        assert!(e.input.len() > raw.len() + 1);
        let kept = input_json(&e.input).unwrap();
        assert_eq!(kept, *e.doc.json());
        assert_eq!(kept["messageId"], json!(&*e.id));
        assert_eq!(kept["timestamp"], json!("1970-01-01T00:00:01.000Z"));
    }

    #[test]
    fn grpc_events_are_refused_as_json_events_are() {
        let raw = proto(&json!({"type": "track", "userId": "u"}));
        let err = signal_proto_event(&raw, "events[3]", 32 * 1024, 0).unwrap_err();
        assert_eq!(err.violations[0].field, "events[3].event");
        // The limit counts the encoded event.
        let raw = proto(&json!({"type": "page", "userId": "u", "name": "x".repeat(40_000)}));
        let err = signal_proto_event(&raw, "event", 32 * 1024, 0).unwrap_err();
        assert_eq!(err.code, ErrorCode::PayloadTooLarge);
        assert!(
            err.message.contains(&format!("is {} bytes", raw.len())),
            "{}",
            err.message
        );
        // Bytes that are not an Event (field 1 said to be 5 bytes long, 1 follows).
        let err = signal_proto_event(&[0x0a, 0x05, 0x61], "event", 32 * 1024, 0).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument);
        assert_eq!(err.violations[0].field, "event");
        assert!(
            err.violations[0]
                .description
                .contains("not a valid lytics_relay.v1.Event")
        );
    }

    #[test]
    fn the_rules_map_an_event_read_in_place_as_they_map_its_json() {
        let rules = crate::rules::RuleSet::load(std::path::Path::new("rules")).unwrap();
        let ctx = crate::rules::IntegrationContext {
            stream_name: "datafly_events".into(),
            account_id: "1234".into(),
            ..Default::default()
        };
        let track: Value = serde_json::from_str(
            &std::fs::read_to_string("tests/fixtures/signal_canonical_track.json").unwrap(),
        )
        .unwrap();
        for doc in [
            track,
            json!({"type": "page", "name": "Pricing", "anonymousId": "a",
                   "properties": {"title": "T", "email": " Ada@Example.COM ", "tags": ["x", {"y": [1, 2.5]}]},
                   "context": {"page": {"url": "https://x.io/p", "referrer": "r"}, "campaign": {"source": "s"},
                               "traits": {"email": "b@c.d"}, "ip": "1.2.3.4"}}),
            json!({"type": "identify", "userId": "u", "traits": {"email": "a@b.c", "plan": "pro",
                   "address": {"city": "Leeds"}, "n": null, "ok": true}}),
            json!({"type": "track", "event": "E", "userId": "u", "timestamp": "2026-02-25T14:30:00+02:00",
                   "properties": {"user_id": "flattened identity is skipped", "_uid": "c"}}),
            json!({"type": "track", "event": "E", "userId": "u", "context": {"traits": {"email": ["a@b.c"]}}}),
            json!({"type": "group", "userId": "u", "groupId": "g"}),
        ] {
            let e = signal_proto_event(&proto(&doc), "event", 32 * 1024, 5).unwrap();
            assert!(matches!(e.doc, EventDoc::Proto(_)), "{doc}");
            let in_place = rules.evaluate(Source::Signal, &e.doc, &ctx);
            let whole = rules.evaluate(Source::Signal, e.doc.json(), &ctx);
            assert_eq!(in_place.records, whole.records, "{doc}");
            assert_eq!(in_place.dropped, whole.dropped, "{doc}");
        }
    }

    #[test]
    fn declared_kinds_check_texts_read_in_place_as_they_check_json() {
        let rules = crate::rules::RuleSet::compile(vec![(
            "kinds.yaml".into(),
            std::path::PathBuf::from("kinds.yaml"),
            "source: signal
identity: [user_id]
rules:
  - name: kinds
    kind: profile
    fields:
      user_id: $.userId
      n: { from: [$.traits.n, $.traits.n2], kind: int }
      x: { from: $.traits.x, kind: number }
      b: { from: $.traits.b, kind: bool }
      d: { from: $.traits.d, kind: date }
      last: { from: $.traits.last, merge: max }
      _ts: { value: 1 }
"
            .to_string(),
        )])
        .unwrap();
        let ctx = crate::rules::IntegrationContext::default();
        for traits in [
            json!({"n": "42", "x": "1.5", "b": "true", "d": "2026-02-25", "last": "2026-02-25T14:30:00Z"}),
            json!({"n": "forty", "n2": "7", "x": "many", "b": "yes", "d": "soon", "last": "later"}),
            json!({"n": 4.5, "x": 2, "b": 1, "d": 5}),
        ] {
            let doc = json!({"type": "identify", "userId": "u", "traits": traits});
            let e = signal_proto_event(&proto(&doc), "event", 32 * 1024, 5).unwrap();
            let in_place = rules.evaluate(Source::Signal, &e.doc, &ctx);
            let whole = rules.evaluate(Source::Signal, e.doc.json(), &ctx);
            assert_eq!(in_place.records, whole.records, "{doc}");
            assert_eq!(in_place.dropped, whole.dropped, "{doc}");
        }
        // What does not spell its kind is left out, and the next alternative is tried.
        let doc = json!({"type": "identify", "userId": "u",
                         "traits": {"n": "forty", "n2": "7", "x": "many", "b": "yes", "last": "later"}});
        let e = signal_proto_event(&proto(&doc), "event", 32 * 1024, 5).unwrap();
        let m = rules.evaluate(Source::Signal, &e.doc, &ctx);
        assert_eq!(
            Value::Object(m.records[0].fields.to_map()),
            json!({"user_id": "u", "n": "7", "last": "later", "_ts": 1})
        );
    }

    #[test]
    fn grpc_and_json_events_get_the_same_answers() {
        let long_id = "m".repeat(300);
        for doc in [
            json!({}),
            json!({"type": "click", "userId": "u"}),
            json!({"type": "track", "userId": "u"}),
            json!({"type": " ", "anonymousId": "  "}),
            json!({"type": "page", "userId": "u", "timestamp": "yesterday", "messageId": long_id}),
            json!({"type": "identify", "userId": "u", "traits": {"email": "a@b.c"}}),
            json!({"type": "track", "event": "E", "anonymousId": "a", "messageId": "m-1",
                   "timestamp": "2026-02-25T14:30:00Z", "name": "n", "category": "c", "groupId": "g",
                   "previousId": "p", "sentAt": "s", "receivedAt": "r", "originalTimestamp": "o",
                   "channel": "server", "context": {"ip": "1.2.3.4"}}),
        ] {
            let from_json = signal_event(doc.clone(), "event", 32 * 1024, 5);
            let from_proto = signal_proto_event(&proto(&doc), "event", 32 * 1024, 5);
            match (from_json, from_proto) {
                (Err(a), Err(b)) => assert_eq!(
                    (a.code, a.message, a.violations),
                    (b.code, b.message, b.violations),
                    "{doc}"
                ),
                (Ok(a), Ok(b)) => {
                    assert_eq!((&a.event_type, a.id_given), (&b.event_type, b.id_given), "{doc}");
                    if a.id_given {
                        assert_eq!((&a.id, &a.doc), (&b.id, &b.doc), "{doc}");
                    }
                    assert_eq!(a.doc.json()["timestamp"], b.doc.json()["timestamp"], "{doc}");
                }
                (a, b) => panic!("{doc}: JSON {a:?}, protobuf {b:?}"),
            }
        }
    }

    #[test]
    fn the_size_limit_counts_what_the_sender_sent_not_what_the_relay_fills_in() {
        let sized = |len: usize| {
            let mut doc = json!({"type": "track", "event": "e", "userId": "u", "properties": {"pad": ""}});
            let base = json_bytes(&doc).len();
            doc["properties"]["pad"] = json!("x".repeat(len - base));
            assert_eq!(json_bytes(&doc).len(), len);
            doc
        };
        // Exactly at the limit without messageId and timestamp: accepted, though the stored
        // input, with the two filled in, is larger.
        let event = signal_event(sized(1024), "", 1024, 1).unwrap();
        assert!(event.input.len() > 1024);
        let e = signal_event(sized(1025), "", 1024, 1).unwrap_err();
        assert!(e.message.contains("the event is 1025 bytes"), "{e:?}");
    }

    #[test]
    fn inputs_that_are_neither_form_read_as_nothing() {
        assert_eq!(input_json(b"not json"), None);
        assert_eq!(input_json(&[PROTO_INPUT, 0x0a, 0x05]), None);
        assert_eq!(
            &input_json_bytes(&Bytes::from_static(&[PROTO_INPUT, 0x0a, 0x05]))[..],
            b"null"
        );
    }

    #[test]
    fn proto_struct_round_trips_to_json() {
        let v = json!({"a": 1, "b": [true, null, "x"], "c": {"d": 1.5}});
        let s = json_to_struct(&v).unwrap();
        assert_eq!(struct_to_json(&s), v);
    }
}
