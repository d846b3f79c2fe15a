//! The flat record a rule builds, borrowing from the event and the rule where it can.
//!
//! Input: flat keys and values as a rule computes them (fields in order, then `flatten`
//! spreads). Output: [`Fields`], the record with one value per key, sorted by key. A value read
//! from the event is borrowed, not copied, and the record is serialised straight from those
//! borrows: mapping an event copies only what a transform or a template creates, the keys of
//! nested members, and — for an event decoded into JSON — nothing else; a gRPC event read in
//! place lends its texts as [`Val::Text`] and converts only its other values.
//!
//! Precedence: a later write with `overwrite` replaces an earlier value; a write without it
//! (a `flatten` spread) fills a key only while it has none. [`RecordBuilder::get`] answers with
//! the value the finished record would hold, so conditions and templates that read earlier
//! fields see exactly that.

use std::borrow::Cow;

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Map, Value};

use super::flatten::flatten;
use super::path::Val;

/// One write, in the order the rule made it.
#[derive(Debug)]
struct Write<'a> {
    key: Cow<'a, str>,
    /// The key's first eight bytes, big-endian, zero-padded: ordered as the keys are wherever
    /// they differ there, so sorting compares whole keys only when these are equal.
    prefix: u64,
    value: Val<'a>,
    overwrite: bool,
}

/// The first eight bytes of `key` as a big-endian number, zero-padded.
fn key_prefix(key: &str) -> u64 {
    let mut head = [0u8; 8];
    let n = key.len().min(8);
    head[..n].copy_from_slice(&key.as_bytes()[..n]);
    u64::from_be_bytes(head)
}

/// A record under construction.
#[derive(Debug, Default)]
pub struct RecordBuilder<'a> {
    writes: Vec<Write<'a>>,
}

impl<'a> RecordBuilder<'a> {
    /// An empty record with room for `capacity` keys.
    pub fn with_capacity(capacity: usize) -> Self {
        RecordBuilder {
            writes: Vec::with_capacity(capacity),
        }
    }

    /// Writes `value` under `key`, flattened (see [`flatten`]; a text is a leaf).
    pub fn set(&mut self, key: Cow<'a, str>, value: Val<'a>, overwrite: bool) {
        self.write(key, value, overwrite, &|_| false);
    }

    /// Sets `key` (flattened) without overwriting, leaving out the flattened keys `skip` names.
    pub fn set_unless(&mut self, key: Cow<'a, str>, value: Val<'a>, skip: &impl Fn(&str) -> bool) {
        self.write(key, value, false, skip);
    }

    fn write(&mut self, key: Cow<'a, str>, value: Val<'a>, overwrite: bool, skip: &impl Fn(&str) -> bool) {
        let mut push = |key: Cow<'a, str>, value| {
            if !skip(&key) {
                self.writes.push(Write {
                    prefix: key_prefix(&key),
                    key,
                    value,
                    overwrite,
                });
            }
        };
        match value {
            // As `flatten` writes a string: under its key, unless the key is empty.
            Val::Text(_) if key.is_empty() => {}
            Val::Text(_) => push(key, value),
            Val::Json(v) => flatten(key, v, &mut |key, v| push(key, Val::Json(v))),
        }
    }

    /// The value `key` holds so far.
    pub fn get(&self, key: &str) -> Option<Cow<'_, Value>> {
        let mut current = None;
        for w in self.writes.iter().filter(|w| w.key == key) {
            if w.overwrite || current.is_none() {
                current = Some(&w.value);
            }
        }
        current.map(Val::json)
    }

    /// The finished record: one value per key, sorted by key.
    pub fn finish(mut self) -> Fields<'a> {
        // A stable sort keeps each key's writes in the order they were made.
        self.writes
            .sort_by(|a, b| a.prefix.cmp(&b.prefix).then_with(|| a.key.cmp(&b.key)));
        let mut fields: Vec<(Cow<'a, str>, Val<'a>)> = Vec::with_capacity(self.writes.len());
        let mut last_prefix = None;
        for w in self.writes {
            match fields.last_mut() {
                Some((key, value)) if last_prefix == Some(w.prefix) && *key == w.key => {
                    if w.overwrite {
                        *value = w.value;
                    }
                }
                _ => {
                    last_prefix = Some(w.prefix);
                    fields.push((w.key, w.value));
                }
            }
        }
        Fields(fields)
    }
}

/// A flat Lytics record: one value per key, sorted by key. Serialises as a JSON object.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fields<'a>(Vec<(Cow<'a, str>, Val<'a>)>);

impl<'a> Fields<'a> {
    /// The value of `key`, as the record holds it.
    pub fn val(&self, key: &str) -> Option<&Val<'a>> {
        self.0
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    /// The value of `key`, as JSON.
    pub fn get(&self, key: &str) -> Option<Cow<'_, Value>> {
        self.val(key).map(Val::json)
    }

    /// How many keys the record has.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when the record has no key.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The keys and values, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Val<'a>)> {
        self.0.iter().map(|(k, v)| (&**k, v))
    }

    /// The record as an owned JSON object.
    pub fn to_map(&self) -> Map<String, Value> {
        self.iter()
            .map(|(k, v)| (k.to_string(), v.json().into_owned()))
            .collect()
    }
}

impl Serialize for Fields<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            match v {
                Val::Json(v) => map.serialize_entry(&**k, &**v)?,
                Val::Text(t) => map.serialize_entry(&**k, t)?,
            }
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(writes: &[(&'static str, Value, bool)]) -> Fields<'static> {
        let mut b = RecordBuilder::default();
        for (k, v, overwrite) in writes {
            b.set(Cow::Borrowed(*k), Val::Json(Cow::Owned(v.clone())), *overwrite);
        }
        b.finish()
    }

    #[test]
    fn keys_sort_and_merge_as_strings_do() {
        // Keys that share or differ within the first eight bytes, are prefixes of each other,
        // hold NUL or multi-byte characters, or repeat (an empty key is never written).
        let keys = [
            "utm_source",
            "utm_sourc",
            "utm_sources",
            "utm_medium",
            "a",
            "ab\0",
            "ab",
            "ab\0\0x",
            "products[0].name",
            "products[0].price",
            "products_count",
            "é",
            "e\u{301}",
            "zz",
            "ab",
            "utm_source",
            "\u{10FFFF}",
            "abcdefgh",
            "abcdefghi",
            "abcdefgg",
        ];
        let mut b = RecordBuilder::default();
        for (i, k) in keys.iter().enumerate() {
            b.set(Cow::Borrowed(*k), Val::Json(Cow::Owned(json!(i))), i % 3 != 0);
        }
        let got: Vec<(String, Value)> = b
            .finish()
            .iter()
            .map(|(k, v)| (k.to_string(), v.json().into_owned()))
            .collect();
        // The same precedence computed the plain way.
        let mut want: Vec<(String, Value)> = Vec::new();
        let mut order: Vec<usize> = (0..keys.len()).collect();
        order.sort_by(|&x, &y| keys[x].cmp(keys[y]));
        for i in order {
            match want.last_mut() {
                Some((k, v)) if k == keys[i] => {
                    if i % 3 != 0 {
                        *v = json!(i);
                    }
                }
                _ => want.push((keys[i].to_string(), json!(i))),
            }
        }
        assert_eq!(got, want);
    }

    #[test]
    fn later_overwrites_win_and_spreads_only_fill_gaps() {
        let r = record(&[
            ("a", json!(1), true),
            ("a", json!(2), true),
            ("b", json!(3), false),
            ("b", json!(4), false),
            ("c", json!(5), false),
            ("c", json!(6), true),
            ("", json!({"a": 9, "d": {"e": 7}}), false),
        ]);
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"a": 2, "b": 3, "c": 6, "d.e": 7})
        );
        assert_eq!(r.get("d.e").as_deref(), Some(&json!(7)));
        assert_eq!(r.get("x").as_deref(), None);
    }

    #[test]
    fn a_borrowed_text_is_written_as_the_json_string_it_stands_for() {
        let mut b = RecordBuilder::default();
        b.set(Cow::Borrowed("t"), Val::Text("first"), true);
        b.set(Cow::Borrowed(""), Val::Text("no key"), true);
        b.set(Cow::Borrowed("t"), Val::Json(Cow::Owned(json!("second"))), true);
        b.set_unless(Cow::Borrowed("t"), Val::Text("spread"), &|_| false);
        b.set_unless(Cow::Borrowed("s"), Val::Text("spread"), &|_| false);
        b.set_unless(Cow::Borrowed("skipped"), Val::Text("x"), &|k| k == "skipped");
        b.set(Cow::Borrowed("j"), Val::Json(Cow::Owned(json!("json"))), true);
        b.set(Cow::Borrowed("j"), Val::Text("text wins"), true);
        assert_eq!(b.get("t").as_deref(), Some(&json!("second")));
        let f = b.finish();
        assert_eq!(
            serde_json::to_value(&f).unwrap(),
            json!({"j": "text wins", "s": "spread", "t": "second"})
        );
        assert_eq!(f.val("j"), Some(&Val::Text("text wins")));
        assert_eq!(f.val("j"), Some(&Val::Json(Cow::Owned(json!("text wins")))));
        assert_ne!(Val::Text("1"), Val::Json(Cow::Owned(json!(1))));
    }

    #[test]
    fn get_while_building_agrees_with_the_finished_record() {
        let mut b = RecordBuilder::default();
        b.set(Cow::Borrowed("a"), Val::Json(Cow::Owned(json!(1))), false);
        b.set(Cow::Borrowed("a"), Val::Json(Cow::Owned(json!(2))), false);
        assert_eq!(b.get("a").as_deref(), Some(&json!(1)));
        b.set(Cow::Borrowed("a"), Val::Json(Cow::Owned(json!(3))), true);
        assert_eq!(b.get("a").as_deref(), Some(&json!(3)));
        b.set(Cow::Borrowed("n"), Val::Json(Cow::Owned(Value::Null)), true);
        assert_eq!(b.get("n").as_deref(), None);
        let f = b.finish();
        assert_eq!(f.get("a").as_deref(), Some(&json!(3)));
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn serialises_sorted_like_a_json_object() {
        let input = json!({"z": "last", "m": [1, 2], "a": {"b": true}, "l": [{"x": 1}]});
        let mut b = RecordBuilder::default();
        b.set(Cow::Borrowed(""), Val::Json(Cow::Borrowed(&input)), true);
        let f = b.finish();
        let mut map = Map::new();
        super::super::flatten::flatten_into(String::new(), input.clone(), &mut map, true);
        assert_eq!(
            serde_json::to_string(&f).unwrap(),
            serde_json::to_string(&map).unwrap()
        );
        assert_eq!(f.to_map(), map);
    }
}
