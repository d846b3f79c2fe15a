//! Flattening nested values into the flat records Lytics expects.
//!
//! Input: a JSON value and a key prefix. Output: dotted keys in a flat map: nested objects become
//! `a.b`, arrays of objects become `name[i].field`, arrays of scalars stay arrays, `null` and
//! empty objects are left out (REFERENCE §3). Pure.

use serde_json::map::Entry;
use serde_json::{Map, Value};

/// Writes `value` into `out` under the key `prefix`, flattened. With `overwrite` false, keys
/// already in `out` are kept. The key is taken by value: a scalar is stored under it as is.
pub fn flatten_into(prefix: String, value: Value, out: &mut Map<String, Value>, overwrite: bool) {
    match value {
        Value::Null => {}
        Value::Object(obj) => {
            for (k, v) in obj {
                let key = if prefix.is_empty() {
                    k
                } else {
                    format!("{prefix}.{k}")
                };
                flatten_into(key, v, out, overwrite);
            }
        }
        Value::Array(items) if items.iter().any(|v| v.is_object() || v.is_array()) => {
            for (i, v) in items.into_iter().enumerate() {
                flatten_into(format!("{prefix}[{i}]"), v, out, overwrite);
            }
        }
        scalar_or_scalars => {
            if prefix.is_empty() {
                return;
            }
            match out.entry(prefix) {
                Entry::Vacant(slot) => {
                    slot.insert(scalar_or_scalars);
                }
                Entry::Occupied(mut slot) => {
                    if overwrite {
                        slot.insert(scalar_or_scalars);
                    }
                }
            }
        }
    }
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
