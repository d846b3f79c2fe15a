//! A gRPC `Event` read in place: the document the rules read, without decoding it whole.
//!
//! Input: an `Event`'s bytes as received. Output: an [`EventView`], which answers the rules'
//! plain paths (`$.context.page.url`) by walking a tape of the event's entries, built once, and
//! converting only the value a path selects; `$`, general queries and everything else that
//! wants the whole document get it decoded once, on demand. Decoding every field of every event
//! into JSON (a string and a map node per field, all freed again) was the largest share of an
//! event's cost, and the rules read about half of what an event carries.
//!
//! [`Layout::read`] takes only events it can answer exactly as the full decoder would: well
//! formed, text in UTF-8, each `Struct` field and each entry's key and value given once, one
//! field per `Value`, nesting within the full decoder's fast path, and a `version`, if any,
//! given once and holding a plain value. It declines anything else (which no common encoder
//! writes), and the caller decodes that event whole, as before, which gives its answer or its
//! error. A view never answers differently from the full decoder's document.

use std::borrow::Cow;
use std::sync::OnceLock;

use bytes::Bytes;
use prost::encoding::WireType;
use serde_json::{Map, Value};

use super::json::slice::{delimited, key as field_key, varint};
use super::json::{kind, slice};
use crate::rules::Document;
use crate::rules::flatten::index_key;
use crate::rules::path::{Members, Step, Val};

/// The `Event`'s text fields: their JSON name and field number.
const TEXT_FIELDS: [(&str, u32); 14] = [
    ("type", 1),
    ("event", 2),
    ("name", 3),
    ("category", 4),
    ("userId", 7),
    ("anonymousId", 8),
    ("groupId", 9),
    ("previousId", 10),
    ("timestamp", 13),
    ("sentAt", 14),
    ("receivedAt", 15),
    ("originalTimestamp", 16),
    ("messageId", 17),
    ("channel", 18),
];

/// The `Event`'s `Struct` fields: their JSON name and field number.
const STRUCT_FIELDS: [(&str, u32); 4] = [
    ("properties", 5),
    ("traits", 6),
    ("context", 11),
    ("integrations", 12),
];

/// The field number of `version` (a `google.protobuf.Value`).
const VERSION: u32 = 19;

/// Index of `messageId` and `timestamp` in [`TEXT_FIELDS`]: the fields the relay fills in.
const MESSAGE_ID: usize = 12;
const TIMESTAMP: usize = 8;

/// A byte range inside the event.
type Span = (u32, u32);

/// One `Struct` entry or list item of the event, in document order: its key (empty for an
/// item), its `Value`'s bytes, what the value holds, and the index after its descendants (its
/// next sibling). The entries and items of a container follow it directly.
#[derive(Debug, Clone, Copy)]
struct Node {
    key: Span,
    value: Span,
    holds: Holds,
    next: u32,
}

/// What a node's value is, as far as walking needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holds {
    Scalar,
    Object,
    List,
}

/// Where an event's fields lie in its bytes, once they are known to be well formed: its text
/// fields, and for each `Struct` field its bytes and its entries' range in `tape`.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    text: [Option<Span>; TEXT_FIELDS.len()],
    structs: [Option<(Span, u32, u32)>; STRUCT_FIELDS.len()],
    /// `version`'s `Value`, when it holds a plain value.
    version: Option<Span>,
    tape: Vec<Node>,
}

/// A `google.protobuf.Value`'s one kind, containers still encoded.
enum Kind<'a> {
    /// Null, a number, a text (checked as UTF-8) or a bool.
    Scalar,
    Struct(&'a [u8]),
    List(&'a [u8]),
}

/// True when `b` is UTF-8 (ASCII checked first: nearly every text is).
fn utf8(b: &[u8]) -> bool {
    b.is_ascii() || std::str::from_utf8(b).is_ok()
}

/// The text a `Value` message holds, when it holds a string. `Layout::read` checked it as UTF-8
/// already; it is checked again here, which is what taking it as `&str` costs without `unsafe`,
/// and far less than the copy into a new `String` it replaces.
fn text_of(mut b: &[u8]) -> Option<&str> {
    match field_key(&mut b)? {
        (kind::STRING, WireType::LengthDelimited) => {
            let text = delimited(&mut b)?;
            b.is_empty().then(|| std::str::from_utf8(text).ok()).flatten()
        }
        _ => None,
    }
}

/// The kind a `Value` message holds when it holds at most one (empty: `null`).
fn kind_of(mut b: &[u8]) -> Option<Kind<'_>> {
    if b.is_empty() {
        return Some(Kind::Scalar);
    }
    let found = match field_key(&mut b)? {
        (kind::NULL | kind::BOOL, WireType::Varint) => {
            varint(&mut b)?;
            Kind::Scalar
        }
        (kind::NUMBER, WireType::SixtyFourBit) => {
            b = b.get(8..)?;
            Kind::Scalar
        }
        (kind::STRING, WireType::LengthDelimited) => utf8(delimited(&mut b)?).then_some(Kind::Scalar)?,
        (kind::STRUCT, WireType::LengthDelimited) => Kind::Struct(delimited(&mut b)?),
        (kind::LIST, WireType::LengthDelimited) => Kind::List(delimited(&mut b)?),
        _ => return None,
    };
    b.is_empty().then_some(found)
}

/// A `fields` entry given its key and value at most once each: the key's bytes (empty when
/// absent) and the `Value`'s bytes (empty, so `null`, when absent).
fn entry_parts(mut b: &[u8]) -> Option<(&[u8], &[u8])> {
    let (mut key, mut value) = (None, None);
    while !b.is_empty() {
        match field_key(&mut b)? {
            (1, WireType::LengthDelimited) if key.is_none() => key = Some(delimited(&mut b)?),
            (2, WireType::LengthDelimited) if value.is_none() => value = Some(delimited(&mut b)?),
            _ => return None,
        }
    }
    Some((key.unwrap_or_default(), value.unwrap_or_default()))
}

/// Calls `each` with every item of a message made only of field 1, length-delimited (a
/// `Struct`'s entries, a `ListValue`'s values); `None` when it holds anything else.
fn items<'a>(mut b: &'a [u8], mut each: impl FnMut(&'a [u8]) -> Option<()>) -> Option<()> {
    while !b.is_empty() {
        match field_key(&mut b)? {
            (1, WireType::LengthDelimited) => each(delimited(&mut b)?)?,
            _ => return None,
        }
    }
    Some(())
}

/// Builds the tape of one event while checking it.
struct TapeBuilder<'a> {
    event: &'a [u8],
    tape: Vec<Node>,
}

impl TapeBuilder<'_> {
    /// Where `part` (a slice of the event) lies in it.
    fn span(&self, part: &[u8]) -> Option<Span> {
        if part.is_empty() {
            return Some((0, 0));
        }
        let start = (part.as_ptr() as usize).checked_sub(self.event.as_ptr() as usize)?;
        let start = u32::try_from(start).ok()?;
        Some((start, start.checked_add(u32::try_from(part.len()).ok()?)?))
    }

    /// Checks a `Struct` whose entries sit `depth` levels down, as the full decoder's fast
    /// path counts them, and adds its entries.
    fn object(&mut self, b: &[u8], depth: u32) -> Option<()> {
        if depth > slice::MAX_DEPTH {
            return None;
        }
        items(b, |entry| {
            let (key, value) = entry_parts(entry)?;
            utf8(key).then_some(())?;
            self.node(key, value, depth)
        })
    }

    fn node(&mut self, key: &[u8], value: &[u8], depth: u32) -> Option<()> {
        let at = self.tape.len();
        let (holds, children) = match kind_of(value)? {
            Kind::Struct(s) => (Holds::Object, Some(s)),
            Kind::List(l) if depth < slice::MAX_DEPTH => (Holds::List, Some(l)),
            Kind::List(_) => return None,
            Kind::Scalar => (Holds::Scalar, None),
        };
        self.tape.push(Node {
            key: self.span(key)?,
            value: self.span(value)?,
            holds,
            next: 0,
        });
        match (holds, children) {
            (Holds::Object, Some(s)) => self.object(s, depth + 1)?,
            (Holds::List, Some(l)) => items(l, |v| self.node(&[], v, depth + 1))?,
            _ => {}
        }
        let next = u32::try_from(self.tape.len()).ok()?;
        self.tape.get_mut(at)?.next = next;
        Some(())
    }
}

/// The index in [`TEXT_FIELDS`] of the text field whose JSON name is `name`.
fn text_index(name: &str) -> Option<usize> {
    Some(match name {
        "type" => 0,
        "event" => 1,
        "name" => 2,
        "category" => 3,
        "userId" => 4,
        "anonymousId" => 5,
        "groupId" => 6,
        "previousId" => 7,
        "timestamp" => TIMESTAMP,
        "sentAt" => 9,
        "receivedAt" => 10,
        "originalTimestamp" => 11,
        "messageId" => MESSAGE_ID,
        "channel" => 13,
        _ => return None,
    })
}

/// The index in [`STRUCT_FIELDS`] of the `Struct` field whose JSON name is `name`.
fn struct_index(name: &str) -> Option<usize> {
    Some(match name {
        "properties" => 0,
        "traits" => 1,
        "context" => 2,
        "integrations" => 3,
        _ => return None,
    })
}

impl Layout {
    /// Reads an `Event`'s layout, checking everything a path may later reach; `None` when the
    /// event must be decoded whole (malformed, unusual or deep: see the module's notes).
    pub fn read(event: &[u8]) -> Option<Layout> {
        let mut text_spans = [None; TEXT_FIELDS.len()];
        let mut structs = [None; STRUCT_FIELDS.len()];
        let mut version = None;
        let mut builder = TapeBuilder {
            event,
            tape: Vec::with_capacity(event.len() / 24),
        };
        let mut b = event;
        while !b.is_empty() {
            let (tag, wire_type) = field_key(&mut b)?;
            if wire_type != WireType::LengthDelimited {
                return None;
            }
            let body = delimited(&mut b)?;
            let span = builder.span(body)?;
            if let Some(i) = TEXT_FIELDS.iter().position(|(_, t)| *t == tag) {
                utf8(body).then_some(())?;
                text_spans[i] = Some(span);
            } else if let Some(i) = STRUCT_FIELDS.iter().position(|(_, t)| *t == tag) {
                if structs[i].is_some() {
                    return None;
                }
                let first = u32::try_from(builder.tape.len()).ok()?;
                builder.object(body, 0)?;
                structs[i] = Some((span, first, u32::try_from(builder.tape.len()).ok()?));
            } else if tag == VERSION && version.is_none() && matches!(kind_of(body)?, Kind::Scalar) {
                version = Some(span);
            } else {
                // A container or repeated `version`, or a field this relay does not know:
                // decoded whole.
                return None;
            }
        }
        Some(Layout {
            text: text_spans,
            structs,
            version,
            tape: builder.tape,
        })
    }
}

/// A [`Layout`] over the bytes it was read from, with what the relay filled in.
#[derive(Debug, Clone, Copy)]
pub struct Reader<'a> {
    event: &'a [u8],
    layout: &'a Layout,
    filled: [Option<&'a str>; 2],
}

impl<'a> Reader<'a> {
    /// Reads `event` by its `layout`; `message_id` and `timestamp` stand in for the event's
    /// own when the relay filled them in.
    pub fn new(
        event: &'a [u8],
        layout: &'a Layout,
        message_id: Option<&'a str>,
        timestamp: Option<&'a str>,
    ) -> Self {
        Reader {
            event,
            layout,
            filled: [message_id, timestamp],
        }
    }

    fn bytes(&self, span: Span) -> &'a [u8] {
        let bytes = self.event.get(span.0 as usize..span.1 as usize);
        debug_assert!(bytes.is_some(), "a span outside the event it was read from");
        bytes.unwrap_or_default()
    }

    fn node(&self, i: u32) -> Option<&'a Node> {
        self.layout.tape.get(i as usize)
    }

    /// The text field named `name` (its JSON name) as the document holds it: `None` when it is
    /// not a text field or is empty (what the relay filled in is there as it is).
    pub fn text(&self, name: &str) -> Option<&'a str> {
        self.text_at(text_index(name)?)
    }

    fn text_at(&self, i: usize) -> Option<&'a str> {
        let filled = match i {
            MESSAGE_ID => self.filled[0],
            TIMESTAMP => self.filled[1],
            _ => None,
        };
        if filled.is_some() {
            return filled;
        }
        let text = std::str::from_utf8(self.bytes(self.layout.text[i]?)).ok()?;
        (!text.is_empty()).then_some(text)
    }

    /// The children of the container whose children are `first..end`, by index.
    fn children(&self, first: u32, end: u32) -> impl Iterator<Item = (u32, &'a Node)> + Clone + 'a {
        let tape = &self.layout.tape;
        std::iter::successors(Some(first), move |&i| tape.get(i as usize).map(|n| n.next))
            .take_while(move |&i| i < end)
            .filter_map(move |i| Some((i, tape.get(i as usize)?)))
    }

    /// The child of the container whose children are `first..end` that `step` selects: for a
    /// key, its last entry of that name (as the decoder's map keeps it).
    fn child(&self, first: u32, end: u32, holds: Holds, step: &Step) -> Option<u32> {
        let children = self.children(first, end);
        match (holds, step) {
            (Holds::Object, Step::Key(name)) => {
                let name = name.as_bytes();
                let mut found = None;
                for (i, n) in children {
                    // The length first: most siblings differ there, and it needs no bytes.
                    if (n.key.1 - n.key.0) as usize == name.len() && self.bytes(n.key) == name {
                        found = Some(i);
                    }
                }
                found
            }
            (Holds::List, Step::Index(want)) => {
                let want = if *want < 0 {
                    let len = children.clone().count();
                    len.checked_sub(usize::try_from(want.unsigned_abs()).ok()?)?
                } else {
                    usize::try_from(*want).ok()?
                };
                children.clone().nth(want).map(|(i, _)| i)
            }
            _ => None,
        }
    }

    /// The node that `step`, then `rest`, select below the `Struct` whose entries are
    /// `first..end`.
    fn descend(&self, first: u32, end: u32, step: &Step, rest: &[Step]) -> Option<u32> {
        let mut at = self.child(first, end, Holds::Object, step)?;
        for step in rest {
            let node = self.node(at)?;
            at = self.child(at + 1, node.next, node.holds, step)?;
        }
        Some(at)
    }

    /// The value at a plain path, converted to JSON.
    pub fn at(&self, steps: &[Step]) -> Option<Value> {
        self.val_at(steps).map(|v| v.into_json().into_owned())
    }

    /// The value at a plain path as a record takes it: a text borrowed from the event, anything
    /// else converted to JSON.
    pub fn val_at(&self, steps: &[Step]) -> Option<Val<'a>> {
        let owned = |v: Value| Val::Json(Cow::Owned(v));
        let Some((first, rest)) = steps.split_first() else {
            return Some(owned(self.json()));
        };
        let Step::Key(first) = first else {
            return None;
        };
        if let Some(text) = self.text(first) {
            return rest.is_empty().then_some(Val::Text(text));
        }
        if **first == *"version" {
            return rest.is_empty().then(|| self.version()).flatten().map(owned);
        }
        let i = struct_index(first)?;
        let (span, children, end) = self.layout.structs[i]?;
        let Some((step, rest)) = rest.split_first() else {
            return slice::object(self.bytes(span), 0).map(|m| owned(Value::Object(m)));
        };
        let bytes = self.bytes(self.node(self.descend(children, end, step, rest)?)?.value);
        match text_of(bytes) {
            Some(text) => Some(Val::Text(text)),
            None => slice::value(bytes, 0).map(owned),
        }
    }

    /// Spreads the object at a plain path (see [`Document::spread`]): `false`, with nothing
    /// handed out, when the path holds no object of the event (the caller then reads the value
    /// with [`Reader::at`]).
    pub fn spread(&self, steps: &[Step], prefix: &str, emit: &mut dyn FnMut(Cow<'a, str>, Val<'a>)) -> bool {
        let Some((first, end)) = self.object_at(steps) else {
            return false;
        };
        self.members(first, end, prefix, "", emit);
        true
    }

    /// The children of the object at a plain path.
    fn object_at(&self, steps: &[Step]) -> Option<(u32, u32)> {
        let (Step::Key(name), rest) = steps.split_first()? else {
            return None;
        };
        let (_, first, end) = self.layout.structs[struct_index(name)?]?;
        let Some((step, rest)) = rest.split_first() else {
            return Some((first, end));
        };
        let at = self.descend(first, end, step, rest)?;
        let node = self.node(at)?;
        (node.holds == Holds::Object).then_some((at + 1, node.next))
    }

    /// Hands out the members of the object whose children are `first..end`, each flattened
    /// under `parent`, `glue` and its key (its key alone under an empty `parent`), in the order
    /// the decoded map iterates them: by key, and only the last of a repeated key.
    fn members(
        &self,
        first: u32,
        end: u32,
        parent: &str,
        glue: &str,
        emit: &mut dyn FnMut(Cow<'a, str>, Val<'a>),
    ) {
        let children = self.children(first, end);
        let in_order = children
            .clone()
            .zip(children.clone().skip(1))
            .all(|((_, a), (_, b))| self.bytes(a.key) < self.bytes(b.key));
        if in_order {
            for (i, node) in children {
                self.member(i, node, parent, glue, emit);
            }
            return;
        }
        let mut sorted: Vec<(u32, &Node)> = children.collect();
        // A stable sort: a repeated key's entries stay in the order they came.
        sorted.sort_by(|(_, a), (_, b)| self.bytes(a.key).cmp(self.bytes(b.key)));
        for (at, &(i, node)) in sorted.iter().enumerate() {
            let repeated = sorted
                .get(at + 1)
                .is_some_and(|(_, next)| self.bytes(next.key) == self.bytes(node.key));
            if !repeated {
                self.member(i, node, parent, glue, emit);
            }
        }
    }

    fn member(
        &self,
        i: u32,
        node: &Node,
        parent: &str,
        glue: &str,
        emit: &mut dyn FnMut(Cow<'a, str>, Val<'a>),
    ) {
        let Ok(key) = std::str::from_utf8(self.bytes(node.key)) else {
            debug_assert!(false, "a checked key is not UTF-8");
            return;
        };
        let key = if parent.is_empty() {
            Cow::Borrowed(key)
        } else {
            Cow::Owned([parent, glue, key].concat())
        };
        self.flatten(i, node, key, emit);
    }

    /// Hands out node `i` flattened under `key`, as `rules::flatten` flattens its decoded value.
    fn flatten(&self, i: u32, node: &Node, key: Cow<'a, str>, emit: &mut dyn FnMut(Cow<'a, str>, Val<'a>)) {
        match node.holds {
            Holds::Object => self.members(i + 1, node.next, &key, ".", emit),
            Holds::List
                if self
                    .children(i + 1, node.next)
                    .any(|(_, item)| item.holds != Holds::Scalar) =>
            {
                for (index, (at, item)) in self.children(i + 1, node.next).enumerate() {
                    self.flatten(at, item, Cow::Owned(index_key(&key, index)), emit);
                }
            }
            _ if key.is_empty() => {}
            _ => {
                let bytes = self.bytes(node.value);
                match text_of(bytes) {
                    Some(text) => emit(key, Val::Text(text)),
                    None => match slice::value(bytes, 0) {
                        Some(Value::Null) => {}
                        Some(value) => emit(key, Val::Json(Cow::Owned(value))),
                        None => debug_assert!(false, "a checked value failed to decode"),
                    },
                }
            }
        }
    }

    /// The whole document, as the full decoder makes it (camelCase keys, empty text left out).
    pub fn json(&self) -> Value {
        let mut m = Map::new();
        for (i, (name, _)) in TEXT_FIELDS.iter().enumerate() {
            if let Some(text) = self.text_at(i) {
                m.insert((*name).to_string(), Value::String(text.to_owned()));
            }
        }
        for ((name, _), fields) in STRUCT_FIELDS.iter().zip(&self.layout.structs) {
            if let Some((span, _, _)) = fields {
                let object = slice::object(self.bytes(*span), 0);
                debug_assert!(object.is_some(), "a checked Struct failed to decode");
                let object = object.unwrap_or_default();
                m.insert((*name).to_string(), Value::Object(object));
            }
        }
        if let Some(version) = self.version() {
            m.insert("version".to_string(), version);
        }
        Value::Object(m)
    }

    /// `version`, when the event has one.
    fn version(&self) -> Option<Value> {
        slice::value(self.bytes(self.layout.version?), 0)
    }
}

/// An event read in place, owning its bytes: see the module's notes.
#[derive(Debug)]
pub struct EventView {
    bytes: Bytes,
    /// Where the event lies in `bytes`.
    range: std::ops::Range<usize>,
    layout: Layout,
    message_id: Option<String>,
    timestamp: Option<String>,
    whole: OnceLock<Value>,
}

impl EventView {
    /// The event at `bytes[range]`, whose layout (read from those bytes) is `layout`, with the
    /// `messageId` and `timestamp` the relay filled in (if it did).
    pub fn new(
        bytes: Bytes,
        range: std::ops::Range<usize>,
        layout: Layout,
        message_id: Option<String>,
        timestamp: Option<String>,
    ) -> Self {
        EventView {
            bytes,
            range,
            layout,
            message_id,
            timestamp,
            whole: OnceLock::new(),
        }
    }

    fn reader(&self) -> Reader<'_> {
        let event = self.bytes.get(self.range.clone());
        debug_assert!(event.is_some(), "an event view's range lies outside its bytes");
        Reader::new(
            event.unwrap_or_default(),
            &self.layout,
            self.message_id.as_deref(),
            self.timestamp.as_deref(),
        )
    }
}

impl Clone for EventView {
    fn clone(&self) -> Self {
        EventView {
            bytes: self.bytes.clone(),
            range: self.range.clone(),
            layout: self.layout.clone(),
            message_id: self.message_id.clone(),
            timestamp: self.timestamp.clone(),
            whole: OnceLock::new(),
        }
    }
}

impl Document for EventView {
    fn at(&self, steps: &[Step]) -> Option<Cow<'_, Value>> {
        if steps.is_empty() {
            return Some(Cow::Borrowed(self.json()));
        }
        self.reader().at(steps).map(Cow::Owned)
    }

    fn json(&self) -> &Value {
        self.whole.get_or_init(|| self.reader().json())
    }

    fn val_at(&self, steps: &[Step]) -> Option<Val<'_>> {
        if steps.is_empty() {
            return Some(Val::Json(Cow::Borrowed(self.json())));
        }
        self.reader().val_at(steps)
    }

    fn spread<'a>(
        &'a self,
        steps: &[Step],
        prefix: &'a str,
        emit: &mut dyn FnMut(Cow<'a, str>, Val<'a>),
    ) -> Members<'a> {
        if self.reader().spread(steps, prefix, emit) {
            Members::Spread
        } else {
            Members::Value(self.at(steps))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test should fail loudly at the broken step")]
mod tests {
    use prost::Message;
    use serde_json::json;

    use super::*;
    use crate::normalize::{event_to_json, json_to_event};
    use crate::proto::JsonValue;
    use crate::proto::v1 as pb;
    use crate::rules::flatten::flatten;
    use crate::rules::path::walk;

    fn encoded(doc: &Value) -> Vec<u8> {
        json_to_event(doc).encode_to_vec()
    }

    /// Every plain path into `doc`: each member and index (negative ones too), one past the
    /// end, and a missing member at every level.
    fn paths(doc: &Value, prefix: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
        out.push(prefix.clone());
        let mut go = |step: Step, child: Option<&Value>, out: &mut Vec<Vec<Step>>| {
            prefix.push(step);
            match child {
                Some(c) => paths(c, prefix, out),
                None => out.push(prefix.clone()),
            }
            prefix.pop();
        };
        match doc {
            Value::Object(m) => {
                for (k, v) in m {
                    go(Step::Key(k.as_str().into()), Some(v), out);
                }
                go(Step::Key("zz-missing".into()), None, out);
                go(Step::Index(0), None, out);
            }
            Value::Array(items) => {
                let len = i64::try_from(items.len()).unwrap();
                for (i, v) in items.iter().enumerate() {
                    let i = i64::try_from(i).unwrap();
                    go(Step::Index(i), Some(v), out);
                    go(Step::Index(i - len), Some(v), out);
                }
                go(Step::Index(len), None, out);
                go(Step::Index(-len - 1), None, out);
                go(Step::Key("0".into()), None, out);
            }
            _ => go(Step::Key("x".into()), None, out),
        }
    }

    /// The view answers every path, and the whole document, as the full decoder's document.
    fn agrees(bytes: &[u8]) {
        let layout = Layout::read(bytes).unwrap();
        let reader = Reader::new(bytes, &layout, None, None);
        let full = event_to_json(pb::Event::decode(bytes).unwrap());
        assert_eq!(reader.json(), full);
        let mut all = Vec::new();
        paths(&full, &mut Vec::new(), &mut all);
        for steps in all.iter().filter(|s| !s.is_empty()) {
            assert_eq!(
                reader.at(steps).as_ref(),
                walk(&full, steps),
                "{steps:?} in {full}"
            );
        }
        for steps in &all {
            for prefix in ["", "p_"] {
                spreads_alike(&reader, &full, steps, prefix);
            }
        }
    }

    /// Spreading in place hands out what flattening the decoded object's members does, in the
    /// same order, and declines only where the path holds no object (or is `$`).
    fn spreads_alike(reader: &Reader<'_>, full: &Value, steps: &[Step], prefix: &str) {
        let mut got = Vec::new();
        let spread = reader.spread(steps, prefix, &mut |k, v| {
            got.push((k.into_owned(), v.into_json().into_owned()))
        });
        match walk(full, steps) {
            Some(Value::Object(members)) if !steps.is_empty() => {
                assert!(spread, "{steps:?} in {full}");
                let mut want = Vec::new();
                for (k, v) in members {
                    flatten(
                        Cow::Owned(format!("{prefix}{k}")),
                        Cow::Borrowed(v),
                        &mut |k, v| want.push((k.into_owned(), v.into_owned())),
                    );
                }
                assert_eq!(got, want, "{steps:?} under {prefix:?} in {full}");
            }
            _ => assert!(!spread && got.is_empty(), "{steps:?} in {full}"),
        }
    }

    fn fixture(name: &str) -> Value {
        serde_json::from_str(&std::fs::read_to_string(format!("tests/fixtures/{name}")).unwrap()).unwrap()
    }

    #[test]
    fn paths_read_in_place_match_the_decoded_document() {
        let docs = [
            fixture("signal_canonical_track.json"),
            json!({}),
            json!({"type": "page", "userId": "", "name": "Home", "properties": {}, "version": 2}),
            json!({"type": "page", "version": "1.2"}),
            json!({"type": "page", "version": null}),
            json!({"type": "page", "version": 1.5, "userId": "u"}),
            json!({"type": "page", "version": true}),
            json!({"type": "page", "version": 9_007_199_254_740_993.0_f64}),
            json!({"type": "page", "version": 1e300}),
            json!({"type": "identify", "userId": "u", "traits": {
                "email": "a@b.c", "n": 1, "f": 1.5, "neg": -3, "big": 1.0e300, "t": true, "no": false,
                "nil": null, "empty": "", "list": [1, "two", null, {"three": [3, [4]]}, []],
                "nested": {"a": {"b": {"c": "deep"}}}, "": "blank key", "é": "ü", "a.b": "dotted"
            }}),
            json!({"type": "track", "properties": {}, "userId": "u".repeat(200), "traits": {
                "long": "a".repeat(300), "k".repeat(200): {"l": ["b".repeat(130), "c".repeat(20_000)]}
            }}),
            json!({"type": "track", "event": "E", "anonymousId": "a", "messageId": "m-1",
                   "timestamp": "2026-02-25T14:30:00Z", "name": "n", "category": "c", "groupId": "g",
                   "previousId": "p", "sentAt": "s", "receivedAt": "r", "originalTimestamp": "o",
                   "channel": "server", "context": {"ip": "1.2.3.4", "traits": {"email": "x@y.z"}},
                   "integrations": {"All": false, "Lytics": true}, "properties": {"p": [[[]]]}}),
        ];
        for doc in &docs {
            agrees(&encoded(doc));
        }
    }

    /// A pseudo-random JSON value (xorshift, so every run checks the same documents).
    fn next(seed: &mut u64, n: u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed % n
    }

    fn random_value(seed: &mut u64, depth: u32) -> Value {
        let keys = ["a", "b", "email", "page", "url", "", "é", "x y", "0"];
        match next(seed, if depth == 0 { 5 } else { 7 }) {
            0 => Value::Null,
            1 => json!(next(seed, 2) == 0),
            2 => json!(i64::try_from(next(seed, 1000)).unwrap() - 500),
            3 => json!(f64::from(u32::try_from(next(seed, 1000)).unwrap()) / 7.0),
            4 => json!(
                keys[usize::try_from(next(seed, keys.len() as u64)).unwrap()]
                    .repeat(1 + usize::try_from(next(seed, 3)).unwrap())
            ),
            5 => {
                let n = next(seed, 4);
                Value::Array((0..n).map(|_| random_value(seed, depth - 1)).collect())
            }
            _ => {
                let n = next(seed, 5);
                let mut m = Map::new();
                for _ in 0..n {
                    let k = keys[usize::try_from(next(seed, keys.len() as u64)).unwrap()];
                    m.insert(k.to_string(), random_value(seed, depth - 1));
                }
                Value::Object(m)
            }
        }
    }

    #[test]
    fn random_documents_read_in_place_as_they_decode() {
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..300 {
            let mut doc = json!({"type": "track", "event": "e", "userId": "u"});
            for field in ["properties", "traits", "context", "integrations"] {
                if let Value::Object(m) = random_value(&mut seed, 5) {
                    doc[field] = Value::Object(m);
                }
            }
            agrees(&encoded(&doc));
        }
    }

    #[test]
    fn damaged_bytes_are_read_in_place_only_when_the_decoder_takes_them_alike() {
        let goods = [
            encoded(&fixture("signal_canonical_track.json")),
            encoded(&json!({"type": "page", "userId": "u", "version": "1.2", "context": {"a": 1}})),
            encoded(&json!({"type": "identify", "userId": "u", "traits": {
                "l": [1, [2, {"k": "v".repeat(200)}], null, true], "n": -1.5, "o": {}}})),
        ];
        let mut seed = 0x2545_f491_4f6c_dd1d;
        let mut taken = 0;
        for round in 0..4000 {
            let mut bytes = goods[round % goods.len()].clone();
            let at = usize::try_from(next(&mut seed, bytes.len() as u64)).unwrap();
            bytes[at] = u8::try_from(next(&mut seed, 256)).unwrap();
            if next(&mut seed, 4) == 0 {
                bytes.truncate(at);
            }
            if Layout::read(&bytes).is_some() {
                taken += 1;
                agrees(&bytes);
            }
        }
        assert!(taken > 100, "only {taken} damaged events were read in place");
    }

    #[test]
    fn a_repeated_key_or_text_field_reads_its_last_value_as_the_decoder_does() {
        let entry = |key: &str, value: &str| {
            let mut v = Vec::new();
            prost::encoding::string::encode(kind::STRING, &value.to_string(), &mut v);
            let mut e = Vec::new();
            prost::encoding::string::encode(1, &key.to_string(), &mut e);
            prost::encoding::bytes::encode(2, &v, &mut e);
            e
        };
        let mut properties = Vec::new();
        for (k, v) in [("a", "first"), ("b", "x"), ("a", "last")] {
            prost::encoding::bytes::encode(1, &entry(k, v), &mut properties);
        }
        let mut event = Vec::new();
        prost::encoding::string::encode(1, &"track".to_string(), &mut event);
        prost::encoding::string::encode(7, &"u-first".to_string(), &mut event);
        prost::encoding::bytes::encode(5, &properties, &mut event);
        prost::encoding::string::encode(7, &"u-last".to_string(), &mut event);
        agrees(&event);
        let layout = Layout::read(&event).unwrap();
        let reader = Reader::new(&event, &layout, None, None);
        assert_eq!(
            reader.at(&[Step::Key("properties".into()), Step::Key("a".into())]),
            Some(json!("last"))
        );
        assert_eq!(reader.text("userId"), Some("u-last"));
    }

    #[test]
    fn members_out_of_order_or_repeated_spread_as_the_decoded_map_iterates() {
        let entry = |key: &str, value: Value| {
            let mut e = Vec::new();
            prost::encoding::string::encode(1, &key.to_string(), &mut e);
            prost::encoding::bytes::encode(2, &JsonValue(value).encode_to_vec(), &mut e);
            e
        };
        let mut properties = Vec::new();
        for (k, v) in [
            ("z", json!(1)),
            ("a.b", json!("dotted")),
            ("a", json!({"b": "nested", "c": null})),
            ("m", json!([{"k": 1}, 2, null, []])),
            ("", json!({"x": "blank"})),
            ("z", json!(3)),
            ("e", json!(["s", 1])),
            ("a", json!({"b": "last"})),
        ] {
            prost::encoding::bytes::encode(1, &entry(k, v), &mut properties);
        }
        let mut event = Vec::new();
        prost::encoding::string::encode(1, &"track".to_string(), &mut event);
        prost::encoding::bytes::encode(5, &properties, &mut event);
        agrees(&event);
        let layout = Layout::read(&event).unwrap();
        let reader = Reader::new(&event, &layout, None, None);
        let mut got = Vec::new();
        assert!(reader.spread(&[Step::Key("properties".into())], "", &mut |k, v| {
            got.push((k.into_owned(), v.into_json().into_owned()))
        }));
        assert_eq!(
            got,
            [
                ("x", json!("blank")),
                ("a.b", json!("last")),
                ("a.b", json!("dotted")),
                ("e", json!(["s", 1])),
                ("m[0].k", json!(1)),
                ("m[1]", json!(2)),
                ("m[3]", json!([])),
                ("z", json!(3)),
            ]
            .map(|(k, v)| (k.to_string(), v))
        );
    }

    #[test]
    fn texts_are_handed_to_records_borrowed() {
        let bytes = encoded(&fixture("signal_canonical_track.json"));
        let layout = Layout::read(&bytes).unwrap();
        let reader = Reader::new(&bytes, &layout, None, None);
        let key = |k: &str| Step::Key(k.into());
        for steps in [
            vec![key("userId")],
            vec![key("context"), key("page"), key("url")],
            vec![key("properties"), key("products"), Step::Index(0), key("name")],
        ] {
            assert!(matches!(reader.val_at(&steps), Some(Val::Text(_))), "{steps:?}");
        }
        let total = reader.val_at(&[key("properties"), key("total")]);
        assert_eq!(total, Some(Val::Json(Cow::Owned(json!(129.99)))));
        let mut texts = 0;
        reader.spread(&[key("properties")], "", &mut |_, v| {
            texts += usize::from(matches!(v, Val::Text(_)));
        });
        assert_eq!(texts, 4, "order_id, currency, a product's id and name");
    }

    #[test]
    fn the_name_lookups_follow_the_field_tables() {
        for (i, (name, _)) in TEXT_FIELDS.iter().enumerate() {
            assert_eq!(text_index(name), Some(i), "{name}");
        }
        for (i, (name, _)) in STRUCT_FIELDS.iter().enumerate() {
            assert_eq!(struct_index(name), Some(i), "{name}");
        }
        assert_eq!(
            (TEXT_FIELDS[MESSAGE_ID].0, TEXT_FIELDS[TIMESTAMP].0),
            ("messageId", "timestamp")
        );
        assert_eq!((text_index("version"), struct_index("version")), (None, None));
    }

    #[test]
    fn each_text_field_is_read_by_its_json_name_and_field_number() {
        for (name, _) in TEXT_FIELDS {
            let bytes = encoded(&json!({ name: format!("value of {name}") }));
            let layout = Layout::read(&bytes).unwrap();
            let reader = Reader::new(&bytes, &layout, None, None);
            for (other, _) in TEXT_FIELDS {
                let want = (other == name).then(|| format!("value of {name}"));
                assert_eq!(
                    reader.text(other).map(str::to_owned),
                    want,
                    "{name} read as {other}"
                );
            }
        }
    }

    #[test]
    fn an_entry_missing_its_key_or_value_reads_as_the_decoder_reads_it() {
        let mut value = Vec::new();
        prost::encoding::string::encode(kind::STRING, &"v".to_string(), &mut value);
        let mut only_value = Vec::new();
        prost::encoding::bytes::encode(2, &value, &mut only_value);
        let mut only_key = Vec::new();
        prost::encoding::string::encode(1, &"k".to_string(), &mut only_key);
        let mut properties = Vec::new();
        for entry in [only_value, only_key] {
            prost::encoding::bytes::encode(1, &entry, &mut properties);
        }
        let mut event = Vec::new();
        prost::encoding::bytes::encode(5, &properties, &mut event);
        agrees(&event);
        let layout = Layout::read(&event).unwrap();
        let reader = Reader::new(&event, &layout, None, None);
        assert_eq!(reader.json()["properties"], json!({"": "v", "k": null}));
    }

    #[test]
    fn what_the_relay_fills_in_stands_in_for_the_event_own() {
        let bytes = encoded(&json!({"type": "page", "userId": "u", "messageId": ""}));
        let layout = Layout::read(&bytes).unwrap();
        let reader = Reader::new(&bytes, &layout, Some("id-1"), Some("2026-01-01T00:00:00.000Z"));
        assert_eq!(reader.at(&[Step::Key("messageId".into())]), Some(json!("id-1")));
        assert_eq!(reader.json()["timestamp"], json!("2026-01-01T00:00:00.000Z"));
        assert_eq!(reader.at(&[]), Some(reader.json()));
        // Filled in as it is, even empty, as the JSON form writes it.
        let empty = Reader::new(&bytes, &layout, None, Some(""));
        assert_eq!(empty.at(&[Step::Key("timestamp".into())]), Some(json!("")));
        let mut kept = vec![0];
        kept.extend_from_slice(&bytes);
        let view = EventView::new(
            Bytes::from(kept),
            1..bytes.len() + 1,
            layout,
            Some("id-2".into()),
            None,
        );
        assert_eq!(view.json()["messageId"], json!("id-2"));
        assert_eq!(view.clone().json(), view.json());
    }

    #[test]
    fn unusual_events_are_left_to_the_full_decoder() {
        // A `version` holding a container or given twice, a Struct field given twice, nesting
        // past the fast path, a Value with two kinds, an unknown field, a text field of the
        // wrong wire type, malformed bytes.
        let version = pb::Event {
            version: Some(crate::proto::JsonValue(json!({"major": 2}))),
            ..Default::default()
        }
        .encode_to_vec();
        assert!(Layout::read(&version).is_none());
        let two = encoded(&json!({"version": 2}));
        assert!(Layout::read(&[two.clone(), two].concat()).is_none());
        // An empty `version` (null) and a NaN one (null too) are read in place; one with an
        // unknown field is not.
        let mut nan = Vec::new();
        prost::encoding::double::encode(kind::NUMBER, &f64::NAN, &mut nan);
        let mut odd = Vec::new();
        prost::encoding::string::encode(9, &"x".to_string(), &mut odd);
        for (body, taken) in [(Vec::new(), true), (nan, true), (odd, false)] {
            let mut event = Vec::new();
            prost::encoding::bytes::encode(VERSION, &body, &mut event);
            assert_eq!(Layout::read(&event).is_some(), taken, "{body:?}");
            if taken {
                agrees(&event);
            }
        }
        let props = encoded(&json!({"properties": {"a": 1}}));
        assert!(Layout::read(&[props.clone(), props].concat()).is_none());
        let mut deep = json!("leaf");
        for _ in 0..20 {
            deep = json!({ "d": deep });
        }
        let deep = encoded(&json!({"properties": deep}));
        assert!(Layout::read(&deep).is_none());
        let mut deep_list = json!("leaf");
        for _ in 0..20 {
            deep_list = json!([deep_list]);
        }
        assert!(Layout::read(&encoded(&json!({"properties": {"l": deep_list}}))).is_none());
        let mut shallow = json!("leaf");
        for _ in 0..15 {
            shallow = json!({ "d": shallow });
        }
        agrees(&encoded(&json!({"properties": shallow})));
        let mut two_kinds = Vec::new();
        prost::encoding::bool::encode(kind::BOOL, &true, &mut two_kinds);
        prost::encoding::double::encode(kind::NUMBER, &1.0, &mut two_kinds);
        let mut entry = Vec::new();
        prost::encoding::string::encode(1, &"k".to_string(), &mut entry);
        prost::encoding::bytes::encode(2, &two_kinds, &mut entry);
        let mut s = Vec::new();
        prost::encoding::bytes::encode(1, &entry, &mut s);
        let mut event = Vec::new();
        prost::encoding::bytes::encode(5, &s, &mut event);
        assert!(Layout::read(&event).is_none());
        let mut unknown = Vec::new();
        prost::encoding::string::encode(99, &"x".to_string(), &mut unknown);
        assert!(Layout::read(&unknown).is_none());
        let mut wrong = Vec::new();
        prost::encoding::uint32::encode(1, &5, &mut wrong);
        assert!(Layout::read(&wrong).is_none());
        assert!(Layout::read(&[0x0a, 0x05, 0x61]).is_none());
        assert!(Layout::read(&[0x0a, 0x02, 0xff, 0xfe]).is_none(), "not UTF-8");
    }
}
