//! `google.protobuf.Struct` and `google.protobuf.Value` as JSON: the generated types hold
//! [`JsonStruct`] and [`JsonValue`] in place of `prost_types::Struct` / `Value`.
//!
//! Every event's `properties`, `traits` and `context` are Structs, and the rules read them as
//! JSON. Decoding the wire form straight into `serde_json` values skips the intermediate
//! `BTreeMap` of `prost_types::Value`s and the copy into JSON that followed it, which together
//! were the largest cost of ingesting an event. The wire format is unchanged (proto3 `Struct`,
//! `Value`, `ListValue`), so clients, grpcurl and reflection see the well-known types.
//!
//! Numbers: protobuf carries every number as a double; whole numbers below 9 × 10^15 (just
//! under 2^53) come back as JSON integers, and NaN or infinities (which JSON cannot hold) as
//! `null`. Objects hold their keys sorted (as `prost_types::Struct`'s `BTreeMap` does), and a
//! repeated key keeps its last value (as proto3 maps do).

use std::cell::Cell;

use bytes::{Buf, BufMut};
use prost::encoding::{self, DecodeContext, WireType};
use prost::{DecodeError, Message};
use serde_json::{Map, Value};

/// How many levels a decoded document can nest when every `Struct` entry in it was decoded by
/// the fast path and no `Value` outside one held an object or a list: an entry's value nests at
/// most [`slice::MAX_DEPTH`] levels below the `Struct` holding it, and that `Struct` sits one
/// level below the message that holds it (one level to spare).
pub const SHALLOW_NESTING: usize = slice::MAX_DEPTH as usize + 2;

thread_local! {
    /// Set when a `Struct` entry is decoded by the general path, or a `Value` decoded outside
    /// the fast path holds an object or a list; see [`decode_noting_depth`].
    static GENERAL_PATH: Cell<bool> = const { Cell::new(false) };
}

/// Runs `decode` (a message holding `Struct`s and `Value`s) and answers with its result and
/// whether every `Struct` entry in it took the fast path and no other `Value` held a container,
/// so that what it decoded nests at most
/// [`SHALLOW_NESTING`] levels below the message: a caller that limits nesting checks the
/// document only when this is false (rarely: deep values, or a message split across buffers).
pub fn decode_noting_depth<T>(decode: impl FnOnce() -> T) -> (T, bool) {
    GENERAL_PATH.with(|g| g.set(false));
    let decoded = decode();
    (decoded, !GENERAL_PATH.with(Cell::get))
}

/// `google.protobuf.Struct`: a JSON object.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JsonStruct(pub Map<String, Value>);

/// `google.protobuf.Value`: any JSON value (`null` when no kind is set).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JsonValue(pub Value);

/// `google.protobuf.ListValue`: a JSON array.
#[derive(Clone, Debug, Default, PartialEq)]
struct JsonList(Vec<Value>);

/// One `fields` entry of a Struct (a map entry: key 1, value 2).
#[derive(Debug, Default)]
struct Entry {
    key: String,
    value: JsonValue,
}

/// Field numbers of `google.protobuf.Value`'s `kind`.
pub(super) mod kind {
    pub const NULL: u32 = 1;
    pub const NUMBER: u32 = 2;
    pub const STRING: u32 = 3;
    pub const BOOL: u32 = 4;
    pub const STRUCT: u32 = 5;
    pub const LIST: u32 = 6;
}

/// A protobuf double as JSON.
pub(super) fn number(n: f64) -> Value {
    if n.fract() == 0.0 && n.abs() < 9.0e15 {
        Value::from(n as i64)
    } else {
        serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)
    }
}

/// The encoded length of `value` as the body of a `Value` message.
fn value_len(value: &Value) -> usize {
    match value {
        Value::Null => encoding::int32::encoded_len(kind::NULL, &0),
        Value::Bool(b) => encoding::bool::encoded_len(kind::BOOL, b),
        Value::Number(n) => encoding::double::encoded_len(kind::NUMBER, &n.as_f64().unwrap_or(0.0)),
        Value::String(s) => encoding::string::encoded_len(kind::STRING, s),
        Value::Array(items) => nested_len(kind::LIST, list_len(items)),
        Value::Object(map) => nested_len(kind::STRUCT, struct_len(map)),
    }
}

fn nested_len(tag: u32, len: usize) -> usize {
    encoding::key_len(tag) + encoding::encoded_len_varint(len as u64) + len
}

fn list_len(items: &[Value]) -> usize {
    items.iter().map(|v| nested_len(1, value_len(v))).sum()
}

fn entry_len(key: &str, value: &Value) -> usize {
    nested_len(1, key.len()) + nested_len(2, value_len(value))
}

fn struct_len(map: &Map<String, Value>) -> usize {
    map.iter().map(|(k, v)| nested_len(1, entry_len(k, v))).sum()
}

fn encode_value(value: &Value, buf: &mut impl BufMut) {
    match value {
        Value::Null => encoding::int32::encode(kind::NULL, &0, buf),
        Value::Bool(b) => encoding::bool::encode(kind::BOOL, b, buf),
        Value::Number(n) => encoding::double::encode(kind::NUMBER, &n.as_f64().unwrap_or(0.0), buf),
        Value::String(s) => encoding::string::encode(kind::STRING, s, buf),
        Value::Array(items) => {
            encoding::encode_key(kind::LIST, WireType::LengthDelimited, buf);
            encoding::encode_varint(list_len(items) as u64, buf);
            encode_list(items, buf);
        }
        Value::Object(map) => {
            encoding::encode_key(kind::STRUCT, WireType::LengthDelimited, buf);
            encoding::encode_varint(struct_len(map) as u64, buf);
            encode_struct(map, buf);
        }
    }
}

fn encode_list(items: &[Value], buf: &mut impl BufMut) {
    for v in items {
        encoding::encode_key(1, WireType::LengthDelimited, buf);
        encoding::encode_varint(value_len(v) as u64, buf);
        encode_value(v, buf);
    }
}

fn encode_struct(map: &Map<String, Value>, buf: &mut impl BufMut) {
    for (k, v) in map {
        encoding::encode_key(1, WireType::LengthDelimited, buf);
        encoding::encode_varint(entry_len(k, v) as u64, buf);
        encoding::encode_key(1, WireType::LengthDelimited, buf);
        encoding::encode_varint(k.len() as u64, buf);
        buf.put_slice(k.as_bytes());
        encoding::encode_key(2, WireType::LengthDelimited, buf);
        encoding::encode_varint(value_len(v) as u64, buf);
        encode_value(v, buf);
    }
}

/// A length-delimited field at the head of `buf` whose bytes lie in its current chunk (tonic's
/// decode buffer holds a whole message in one): the field with its length prefix, and its body.
fn contiguous(buf: &impl Buf) -> Option<(&[u8], &[u8])> {
    let chunk = buf.chunk();
    let mut rest = chunk;
    let len = usize::try_from(encoding::decode_varint(&mut rest).ok()?).ok()?;
    let body = rest.get(..len)?;
    Some((&chunk[..chunk.len() - rest.len() + len], body))
}

/// Merges a length-delimited message field. When its bytes lie in the buffer's current chunk,
/// they are decoded as a plain slice, which spares every nested read the layers of the buffer
/// type; otherwise from `buf`.
fn merge_contiguous(
    wire_type: WireType,
    msg: &mut impl Message,
    buf: &mut impl Buf,
    ctx: DecodeContext,
) -> Result<(), DecodeError> {
    let Some((mut field, _)) = contiguous(buf) else {
        return encoding::message::merge(wire_type, msg, buf, ctx);
    };
    let used = field.len();
    encoding::message::merge(wire_type, msg, &mut field, ctx)?;
    buf.advance(used);
    Ok(())
}

/// The fast path: a Struct entry whose bytes lie in one slice, decoded in a tight loop with no
/// intermediate messages; keys and skipped fields are read by prost's own functions. It answers
/// `None` for anything it does not take as is (malformed input, nesting past
/// [`slice::MAX_DEPTH`]); the caller then decodes the same bytes
/// with prost's general path, which gives the error prost gives, so both paths accept and refuse
/// the same inputs.
pub(super) mod slice {
    use prost::encoding::{DecodeContext, MAX_TAG, WireType, decode_varint, skip_field};
    use serde_json::{Map, Value};

    use super::{kind, number};

    /// Nesting the fast path takes. Deeper values go to the general path, whose recursion limit
    /// (counted in messages: each JSON level is two or three) then decides; at this depth it
    /// is far off, so the fast path never accepts what the general path would refuse.
    pub const MAX_DEPTH: u32 = 16;

    /// A varint: one byte read inline (field keys and lengths under 128, nearly all of them),
    /// longer ones by prost.
    #[inline]
    pub fn varint(b: &mut &[u8]) -> Option<u64> {
        match b.split_first() {
            Some((&byte, rest)) if byte < 0x80 => {
                *b = rest;
                Some(u64::from(byte))
            }
            _ => long_varint(b),
        }
    }

    #[cold]
    #[inline(never)]
    fn long_varint(b: &mut &[u8]) -> Option<u64> {
        decode_varint(b).ok()
    }

    /// A field key, refused as prost's `decode_key` refuses it (tag 0, keys past 32 bits,
    /// unknown wire types).
    #[inline]
    pub fn key(b: &mut &[u8]) -> Option<(u32, WireType)> {
        let key = varint(b)?;
        let tag = u32::try_from(key >> 3)
            .ok()
            .filter(|t| (1..=MAX_TAG).contains(t))?;
        Some((tag, WireType::try_from(key & 0x07).ok()?))
    }

    fn skip(tag: u32, wire_type: WireType, b: &mut &[u8]) -> Option<()> {
        skip_field(wire_type, tag, b, DecodeContext::default()).ok()
    }

    /// A length-delimited field's body.
    #[inline]
    pub fn delimited<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
        let len = usize::try_from(varint(b)?).ok()?;
        let (head, tail) = b.split_at_checked(len)?;
        *b = tail;
        Some(head)
    }

    fn text(b: &mut &[u8]) -> Option<String> {
        std::str::from_utf8(delimited(b)?).ok().map(str::to_owned)
    }

    /// A `fields` map entry: key 1, value 2.
    pub fn entry(mut b: &[u8], depth: u32) -> Option<(String, Value)> {
        let mut name = String::new();
        let mut value = Value::Null;
        while !b.is_empty() {
            match key(&mut b)? {
                (1, WireType::LengthDelimited) => name = text(&mut b)?,
                (2, WireType::LengthDelimited) => value = self::value(delimited(&mut b)?, depth)?,
                (1 | 2, _) => return None,
                (tag, wire_type) => skip(tag, wire_type, &mut b)?,
            }
        }
        Some((name, value))
    }

    /// A `google.protobuf.Value`; the last `kind` set wins.
    pub fn value(mut b: &[u8], depth: u32) -> Option<Value> {
        let mut value = Value::Null;
        while !b.is_empty() {
            value = match key(&mut b)? {
                (kind::NULL, WireType::Varint) => {
                    varint(&mut b)?;
                    Value::Null
                }
                (kind::NUMBER, WireType::SixtyFourBit) => {
                    let (n, rest) = b.split_first_chunk::<8>()?;
                    b = rest;
                    number(f64::from_le_bytes(*n))
                }
                (kind::STRING, WireType::LengthDelimited) => Value::String(text(&mut b)?),
                (kind::BOOL, WireType::Varint) => Value::Bool(varint(&mut b)? != 0),
                (kind::STRUCT, WireType::LengthDelimited) => {
                    Value::Object(object(delimited(&mut b)?, depth + 1)?)
                }
                (kind::LIST, WireType::LengthDelimited) => Value::Array(list(delimited(&mut b)?, depth + 1)?),
                (kind::NULL..=kind::LIST, _) => return None,
                (tag, wire_type) => {
                    skip(tag, wire_type, &mut b)?;
                    continue;
                }
            };
        }
        Some(value)
    }

    pub fn object(mut b: &[u8], depth: u32) -> Option<Map<String, Value>> {
        if depth > MAX_DEPTH {
            return None;
        }
        let mut map = Map::new();
        while !b.is_empty() {
            match key(&mut b)? {
                (1, WireType::LengthDelimited) => {
                    let (k, v) = entry(delimited(&mut b)?, depth)?;
                    map.insert(k, v);
                }
                (1, _) => return None,
                (tag, wire_type) => skip(tag, wire_type, &mut b)?,
            }
        }
        Some(map)
    }

    pub fn list(mut b: &[u8], depth: u32) -> Option<Vec<Value>> {
        if depth > MAX_DEPTH {
            return None;
        }
        let mut items = Vec::new();
        while !b.is_empty() {
            match key(&mut b)? {
                (1, WireType::LengthDelimited) => items.push(value(delimited(&mut b)?, depth)?),
                (1, _) => return None,
                (tag, wire_type) => skip(tag, wire_type, &mut b)?,
            }
        }
        Some(items)
    }
}

impl Message for JsonStruct {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_struct(&self.0, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if tag != 1 {
            return encoding::skip_field(wire_type, tag, buf, ctx);
        }
        if wire_type == WireType::LengthDelimited
            && let Some((field, body)) = contiguous(buf)
            && let Some((key, value)) = slice::entry(body, 0)
        {
            let used = field.len();
            self.0.insert(key, value);
            buf.advance(used);
            return Ok(());
        }
        GENERAL_PATH.with(|g| g.set(true));
        let mut entry = Entry::default();
        merge_contiguous(wire_type, &mut entry, buf, ctx)?;
        self.0.insert(entry.key, entry.value.0);
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        struct_len(&self.0)
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

impl Message for Entry {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encoding::string::encode(1, &self.key, buf);
        encoding::message::encode(2, &self.value, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => encoding::string::merge(wire_type, &mut self.key, buf, ctx),
            2 => encoding::message::merge(wire_type, &mut self.value, buf, ctx),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        entry_len(&self.key, &self.value.0)
    }

    fn clear(&mut self) {
        self.key.clear();
        self.value.0 = Value::Null;
    }
}

impl Message for JsonValue {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_value(&self.0, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        self.0 = match tag {
            kind::NULL => {
                let mut n = 0;
                encoding::int32::merge(wire_type, &mut n, buf, ctx)?;
                Value::Null
            }
            kind::NUMBER => {
                let mut n = 0.0;
                encoding::double::merge(wire_type, &mut n, buf, ctx)?;
                number(n)
            }
            kind::STRING => {
                let mut s = String::new();
                encoding::string::merge(wire_type, &mut s, buf, ctx)?;
                Value::String(s)
            }
            kind::BOOL => {
                let mut b = false;
                encoding::bool::merge(wire_type, &mut b, buf, ctx)?;
                Value::Bool(b)
            }
            kind::STRUCT => {
                // A container outside the fast path (a `Value` field of a message, or below
                // an entry the general path took): its depth is not bounded by the fast path.
                GENERAL_PATH.with(|g| g.set(true));
                let mut s = JsonStruct::default();
                encoding::message::merge(wire_type, &mut s, buf, ctx)?;
                Value::Object(s.0)
            }
            kind::LIST => {
                GENERAL_PATH.with(|g| g.set(true));
                let mut l = JsonList::default();
                encoding::message::merge(wire_type, &mut l, buf, ctx)?;
                Value::Array(l.0)
            }
            _ => return encoding::skip_field(wire_type, tag, buf, ctx),
        };
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        value_len(&self.0)
    }

    fn clear(&mut self) {
        self.0 = Value::Null;
    }
}

impl Message for JsonList {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_list(&self.0, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if tag != 1 {
            return encoding::skip_field(wire_type, tag, buf, ctx);
        }
        let mut v = JsonValue::default();
        encoding::message::merge(wire_type, &mut v, buf, ctx)?;
        self.0.push(v.0);
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        list_len(&self.0)
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test should fail loudly at the broken step")]
mod tests {
    use super::*;
    use serde_json::json;

    fn to_prost(v: &Value) -> prost_types::Value {
        use prost_types::value::Kind;
        let kind = match v {
            Value::Null => Kind::NullValue(0),
            Value::Bool(b) => Kind::BoolValue(*b),
            Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap()),
            Value::String(s) => Kind::StringValue(s.clone()),
            Value::Array(a) => Kind::ListValue(prost_types::ListValue {
                values: a.iter().map(to_prost).collect(),
            }),
            Value::Object(m) => Kind::StructValue(prost_types::Struct {
                fields: m.iter().map(|(k, v)| (k.clone(), to_prost(v))).collect(),
            }),
        };
        prost_types::Value { kind: Some(kind) }
    }

    fn sample() -> Value {
        json!({
            "currency": "USD",
            "total": 129.99,
            "count": 3,
            "negative": -7,
            "ok": true,
            "none": null,
            "empty": {},
            "nested": {"a": [1, "two", {"b": false}, [], null], "é": "ü"},
            "": "empty key"
        })
    }

    #[test]
    fn decodes_what_prost_types_encode() {
        let Value::Object(map) = sample() else {
            unreachable!()
        };
        let reference = prost_types::Struct {
            fields: map.iter().map(|(k, v)| (k.clone(), to_prost(v))).collect(),
        };
        let decoded = JsonStruct::decode(reference.encode_to_vec().as_slice()).unwrap();
        assert_eq!(Value::Object(decoded.0), sample());
    }

    #[test]
    fn encodes_what_prost_types_decode_and_round_trips() {
        let Value::Object(map) = sample() else {
            unreachable!()
        };
        let ours = JsonStruct(map.clone());
        let bytes = ours.encode_to_vec();
        assert_eq!(bytes.len(), ours.encoded_len());
        let reference = prost_types::Struct::decode(bytes.as_slice()).unwrap();
        assert_eq!(reference.fields.len(), map.len());
        assert_eq!(reference.fields["nested"], to_prost(&map["nested"]));
        assert_eq!(JsonStruct::decode(bytes.as_slice()).unwrap(), ours);
        let value = JsonValue(json!([1.5, "x", {"k": null}]));
        assert_eq!(
            JsonValue::decode(value.encode_to_vec().as_slice()).unwrap(),
            value
        );
    }

    #[test]
    fn numbers_json_cannot_hold_become_null_and_bad_input_is_an_error() {
        let nan = prost_types::Value {
            kind: Some(prost_types::value::Kind::NumberValue(f64::NAN)),
        };
        assert_eq!(
            JsonValue::decode(nan.encode_to_vec().as_slice()).unwrap().0,
            Value::Null
        );
        let unset = prost_types::Value { kind: None };
        assert_eq!(
            JsonValue::decode(unset.encode_to_vec().as_slice()).unwrap().0,
            Value::Null
        );
        // A string field holding invalid UTF-8, and a truncated message.
        assert!(JsonValue::decode(&[0x1a, 0x01, 0xff][..]).is_err());
        assert!(JsonStruct::decode(&[0x0a, 0x05, 0x0a][..]).is_err());
    }

    /// A buffer that hands out one byte per chunk, so every Struct entry takes the general path.
    struct OneByteChunks<'a>(&'a [u8]);

    impl Buf for OneByteChunks<'_> {
        fn remaining(&self) -> usize {
            self.0.len()
        }
        fn chunk(&self) -> &[u8] {
            &self.0[..self.0.len().min(1)]
        }
        fn advance(&mut self, n: usize) {
            self.0 = &self.0[n..];
        }
    }

    fn nested(depth: usize) -> Value {
        let mut v = json!({"leaf": [1, "x"]});
        for i in 0..depth {
            v = if i % 2 == 0 {
                json!({"k": v})
            } else {
                json!([v, true])
            };
        }
        json!({"top": v})
    }

    #[test]
    fn the_slice_and_general_paths_decode_alike() {
        // nested(25) is past the slice path's depth: its entry is decoded by the general path.
        let mut inputs = vec![sample(), nested(10), nested(25)];
        inputs.push(json!({"unicode ✓": "ünïcödé", "big": 1e300, "small": -0.5, "zero": 0}));
        for input in inputs {
            let Value::Object(map) = input else { unreachable!() };
            let bytes = JsonStruct(map.clone()).encode_to_vec();
            let fast = JsonStruct::decode(bytes.as_slice()).unwrap();
            let general = JsonStruct::decode(OneByteChunks(&bytes)).unwrap();
            assert_eq!(fast.0, map);
            assert_eq!(general.0, map);
        }
    }

    /// A length-delimited field `tag` holding `body`.
    fn delimited_field(tag: u32, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encoding::encode_key(tag, WireType::LengthDelimited, &mut out);
        encoding::encode_varint(body.len() as u64, &mut out);
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn a_repeated_key_keeps_its_last_value_and_keys_come_out_sorted() {
        // {"o": {"b": 1, "a": 2, "b": 3}}, entries in this order: no encoder of ours writes it.
        let inner: Vec<u8> = [("b", json!(1)), ("a", json!(2)), ("b", json!(3))]
            .into_iter()
            .flat_map(|(k, v)| {
                let entry = Entry {
                    key: k.to_string(),
                    value: JsonValue(v),
                };
                delimited_field(1, &entry.encode_to_vec())
            })
            .collect();
        let mut entry = Vec::new();
        encoding::string::encode(1, &"o".to_string(), &mut entry);
        entry.extend(delimited_field(2, &delimited_field(kind::STRUCT, &inner)));
        let bytes = delimited_field(1, &entry);
        let want = json!({"o": {"a": 2, "b": 3}});
        let fast = JsonStruct::decode(bytes.as_slice()).unwrap();
        let general = JsonStruct::decode(OneByteChunks(&bytes)).unwrap();
        assert_eq!(Value::Object(fast.0.clone()), want);
        assert_eq!(Value::Object(general.0), want);
        let keys: Vec<_> = fast.0["o"].as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["a", "b"]);
    }

    #[test]
    fn the_fast_path_notes_when_an_entry_needed_the_general_one() {
        let bytes = |v: Value| match v {
            Value::Object(map) => JsonStruct(map).encode_to_vec(),
            _ => unreachable!(),
        };
        let shallow = bytes(nested(10));
        let (decoded, fast) = decode_noting_depth(|| JsonStruct::decode(shallow.as_slice()));
        assert!(decoded.is_ok() && fast);
        // Past the fast path's depth, and split across buffers: noted, then cleared again.
        let deep = bytes(nested(25));
        let (decoded, fast) = decode_noting_depth(|| JsonStruct::decode(deep.as_slice()));
        assert!(decoded.is_ok() && !fast);
        let (decoded, fast) = decode_noting_depth(|| JsonStruct::decode(OneByteChunks(&shallow)));
        assert!(decoded.is_ok() && !fast);
        let (_, fast) = decode_noting_depth(|| JsonStruct::decode(shallow.as_slice()));
        assert!(fast);
        // A `Value` decoded outside the fast path: a container is noted, a scalar is not.
        let list = JsonValue(json!([[1]])).encode_to_vec();
        let (decoded, fast) = decode_noting_depth(|| JsonValue::decode(list.as_slice()));
        assert!(decoded.is_ok() && !fast);
        let text = JsonValue(json!("x")).encode_to_vec();
        let (decoded, fast) = decode_noting_depth(|| JsonValue::decode(text.as_slice()));
        assert!(decoded.is_ok() && fast);
    }

    #[test]
    fn malformed_structs_are_refused_on_both_paths() {
        let good = JsonStruct(match sample() {
            Value::Object(m) => m,
            _ => unreachable!(),
        })
        .encode_to_vec();
        let bad_inputs: Vec<Vec<u8>> = vec![
            // Truncated anywhere inside an entry.
            good[..good.len() - 3].to_vec(),
            // An entry whose key is not UTF-8: {1: {1: "\xff"}}.
            vec![0x0a, 0x03, 0x0a, 0x01, 0xff],
            // A Value whose string is not UTF-8: {1: {1: "k", 2: {3: "\xff"}}}.
            vec![0x0a, 0x08, 0x0a, 0x01, b'k', 0x12, 0x03, 0x1a, 0x01, 0xff],
            // A Value whose number has the wrong wire type: {1: {1: "k", 2: {2 (varint): 1}}}.
            vec![0x0a, 0x07, 0x0a, 0x01, b'k', 0x12, 0x02, 0x10, 0x01],
        ];
        for bad in bad_inputs {
            assert!(JsonStruct::decode(bad.as_slice()).is_err(), "{bad:?}");
            assert!(JsonStruct::decode(OneByteChunks(&bad)).is_err(), "{bad:?}");
        }
        let Value::Object(deep) = nested(120) else {
            unreachable!()
        };
        let bytes = JsonStruct(deep).encode_to_vec();
        assert!(JsonStruct::decode(bytes.as_slice()).is_err());
        assert!(JsonStruct::decode(OneByteChunks(&bytes)).is_err());
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let mut v = json!(1);
        for _ in 0..200 {
            v = json!([v]);
        }
        let bytes = JsonValue(v).encode_to_vec();
        assert!(JsonValue::decode(bytes.as_slice()).is_err());
    }
}
