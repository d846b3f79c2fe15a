//! Flattening nested values into the flat records Lytics expects.
//!
//! Input: a JSON value and a key prefix. Output: dotted keys in a flat map: nested objects become
//! `a.b`, arrays of objects become `name[i].field`, arrays of scalars stay arrays, `null` and
//! empty objects are left out (REFERENCE §3). Pure.

use std::borrow::Cow;

use serde_json::map::Entry;
use serde_json::{Map, Value};

/// Flattens `value` under `key`, calling `emit` with each flat key and value, in order. Values
/// borrowed from the input stay borrowed: only the keys built for nested members are new text.
pub fn flatten<'a>(
    key: Cow<'a, str>,
    value: Cow<'a, Value>,
    emit: &mut impl FnMut(Cow<'a, str>, Cow<'a, Value>),
) {
    match value {
        Cow::Borrowed(v) => flatten_ref(key, v, emit),
        Cow::Owned(v) => flatten_owned(key, v, emit),
    }
}

fn flatten_ref<'a>(key: Cow<'a, str>, value: &'a Value, emit: &mut impl FnMut(Cow<'a, str>, Cow<'a, Value>)) {
    match value {
        Value::Null => {}
        Value::Object(members) => {
            for (k, v) in members {
                let key = if key.is_empty() {
                    Cow::Borrowed(k.as_str())
                } else {
                    Cow::Owned(member_key(&key, k))
                };
                flatten_ref(key, v, emit);
            }
        }
        Value::Array(items) if holds_containers(items) => {
            for (i, v) in items.iter().enumerate() {
                flatten_ref(Cow::Owned(index_key(&key, i)), v, emit);
            }
        }
        leaf => {
            if !key.is_empty() {
                emit(key, Cow::Borrowed(leaf));
            }
        }
    }
}

fn flatten_owned<'a>(key: Cow<'a, str>, value: Value, emit: &mut impl FnMut(Cow<'a, str>, Cow<'a, Value>)) {
    match value {
        Value::Null => {}
        Value::Object(members) => {
            for (k, v) in members {
                let key = if key.is_empty() {
                    Cow::Owned(k)
                } else {
                    Cow::Owned(member_key(&key, &k))
                };
                flatten_owned(key, v, emit);
            }
        }
        Value::Array(items) if holds_containers(&items) => {
            for (i, v) in items.into_iter().enumerate() {
                flatten_owned(Cow::Owned(index_key(&key, i)), v, emit);
            }
        }
        leaf => {
            if !key.is_empty() {
                emit(key, Cow::Owned(leaf));
            }
        }
    }
}

/// `key.member`, allocated once at its final size.
pub(crate) fn member_key(key: &str, member: &str) -> String {
    let mut out = String::with_capacity(key.len() + 1 + member.len());
    out.push_str(key);
    out.push('.');
    out.push_str(member);
    out
}

/// `key[index]`, allocated once with room for any index.
pub(crate) fn index_key(key: &str, index: usize) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(key.len() + 22);
    out.push_str(key);
    // Writing to a String cannot fail.
    let _ = write!(out, "[{index}]");
    out
}

/// Arrays of scalars stay arrays; an array holding an object or array is spread by index.
fn holds_containers(items: &[Value]) -> bool {
    items.iter().any(|v| v.is_object() || v.is_array())
}

/// Writes `value` into `out` under the key `prefix`, flattened. With `overwrite` false, keys
/// already in `out` are kept.
pub fn flatten_into(prefix: String, value: Value, out: &mut Map<String, Value>, overwrite: bool) {
    flatten(
        Cow::Owned(prefix),
        Cow::Owned(value),
        &mut |key, value| match out.entry(key.into_owned()) {
            Entry::Vacant(slot) => {
                slot.insert(value.into_owned());
            }
            Entry::Occupied(mut slot) => {
                if overwrite {
                    slot.insert(value.into_owned());
                }
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flattens_like_lytics_expects() {
        let mut out = Map::new();
        flatten_into(
            String::new(),
            json!({
                "a": {"b": 1, "c": null, "d": {}},
                "tags": ["x", "y"],
                "products": [{"price": 2, "sku": "S"}, {"price": 3}],
            }),
            &mut out,
            true,
        );
        assert_eq!(
            Value::Object(out),
            json!({"a.b": 1, "tags": ["x", "y"], "products[0].price": 2,
                   "products[0].sku": "S", "products[1].price": 3})
        );
    }

    #[test]
    fn keeps_existing_keys_unless_told() {
        let mut out = Map::new();
        out.insert("a".into(), json!(1));
        flatten_into(String::new(), json!({"a": 2, "b": 3}), &mut out, false);
        assert_eq!(Value::Object(out), json!({"a": 1, "b": 3}));
    }
}
