//! Compact JSON writing for the hot path: every event's input and every mapped record are
//! written once on ingest. The output is byte for byte what `serde_json::to_vec` writes (the
//! tests compare them); only strings are written differently, eight bytes at a time, since
//! they are nearly all of an event and rarely hold a character that needs escaping.

use serde_json::{Map, Value};

/// Writes `value` as compact JSON.
pub fn to_vec(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    write_value(&mut out, value);
    out
}

/// Writes `map` as a compact JSON object.
pub fn object_to_vec(map: &Map<String, Value>) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    write_object(&mut out, map);
    out
}

fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => {
            // Writing into a Vec cannot fail; serde_json formats numbers (itoa and its float
            // writer), so they come out as it writes them.
            let _ = serde_json::to_writer(&mut *out, n);
        }
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => write_object(out, map),
    }
}

fn write_object(out: &mut Vec<u8>, map: &Map<String, Value>) {
    out.push(b'{');
    for (i, (k, v)) in map.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, k);
        out.push(b':');
        write_value(out, v);
    }
    out.push(b'}');
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// Whether any of the eight bytes in `w` is a control character, `"` or `\`. Exact: bytes of
/// 0x80 and above (UTF-8 continuation and lead bytes) never count.
fn needs_escape(w: u64) -> bool {
    let control = w.wrapping_sub(ONES * 0x20) & !w;
    let q = w ^ (ONES * u64::from(b'"'));
    let quote = q.wrapping_sub(ONES) & !q;
    let b = w ^ (ONES * u64::from(b'\\'));
    let backslash = b.wrapping_sub(ONES) & !b;
    (control | quote | backslash) & HIGH != 0
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    // `clean` bytes from `start` need no escape and are copied in one go.
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        if let Some(word) = bytes.get(i..i + 8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            if !needs_escape(u64::from_le_bytes(w)) {
                i += 8;
                continue;
            }
        }
        let end = (i + 8).min(bytes.len());
        for (j, &byte) in bytes.iter().enumerate().take(end).skip(i) {
            if let Some(escape) = escape_of(byte) {
                out.extend_from_slice(&bytes[start..j]);
                match escape {
                    Escape::Short(c) => out.extend_from_slice(&[b'\\', c]),
                    Escape::Unicode => {
                        const HEX: &[u8; 16] = b"0123456789abcdef";
                        out.extend_from_slice(b"\\u00");
                        out.push(HEX[usize::from(byte >> 4)]);
                        out.push(HEX[usize::from(byte & 0xf)]);
                    }
                }
                start = j + 1;
            }
        }
        i = end;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

enum Escape {
    /// `\` and this character.
    Short(u8),
    /// `\u00XX`.
    Unicode,
}

/// How serde_json escapes `byte`, if it does.
fn escape_of(byte: u8) -> Option<Escape> {
    Some(match byte {
        b'"' => Escape::Short(b'"'),
        b'\\' => Escape::Short(b'\\'),
        b'\n' => Escape::Short(b'n'),
        b'\r' => Escape::Short(b'r'),
        b'\t' => Escape::Short(b't'),
        0x08 => Escape::Short(b'b'),
        0x0c => Escape::Short(b'f'),
        0x00..=0x1f => Escape::Unicode,
        _ => return None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test should fail loudly at the broken step")]
mod tests {
    use super::*;
    use serde_json::json;

    fn same_as_serde(v: &Value) {
        assert_eq!(
            String::from_utf8(to_vec(v)).unwrap(),
            serde_json::to_string(v).unwrap(),
            "for {v:?}"
        );
    }

    #[test]
    fn every_byte_and_position_writes_as_serde_json_does() {
        // Each ASCII byte, alone and at every offset of a 8-byte word, plus non-ASCII text.
        for byte in 0u8..0x80 {
            let c = char::from(byte);
            for pad in 0..17 {
                let s: String = "a".repeat(pad) + &c.to_string() + "tail-é-ü-日本";
                same_as_serde(&Value::String(s));
            }
        }
        same_as_serde(&json!(""));
        same_as_serde(&json!("\u{7f}\u{80}\u{2028}\u{1F600}"));
    }

    #[test]
    fn values_of_every_kind_write_as_serde_json_does() {
        let doc = json!({
            "type": "track", "n": 1, "neg": -7, "f": 129.99, "tiny": 1e-7, "big": 1.5e300,
            "max": u64::MAX, "t": true, "no": false, "nil": null,
            "nested": {"a": [1, "two", {"b\"\\": [[], {}]}], "é": "ü\n\t\u{1}"},
            "": ""
        });
        same_as_serde(&doc);
        let Value::Object(map) = &doc else { unreachable!() };
        assert_eq!(object_to_vec(map), serde_json::to_vec(map).unwrap());
    }

    #[test]
    fn the_word_check_flags_exactly_the_bytes_to_escape() {
        for byte in 0u8..=255 {
            let word = u64::from_le_bytes([b'x', b'x', byte, b'x', 0xc3, 0xa9, b'x', b'x']);
            let expected = byte < 0x20 || byte == b'"' || byte == b'\\';
            assert_eq!(needs_escape(word), expected, "byte {byte:#x}");
        }
    }
}
