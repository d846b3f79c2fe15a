//! Value transforms a rule field can apply, in order, to what it selected.
//!
//! Input: a JSON value. Output: the transformed value, or a message saying why it could not be
//! transformed. Transforms map over arrays element by element. Pure: no I/O, no clock.

use serde_json::Value;

use crate::timefmt;

/// A transform named in a rule file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    /// Lower-cases text.
    Lowercase,
    /// Upper-cases text.
    Uppercase,
    /// Removes leading and trailing white space.
    Trim,
    /// Trims and lower-cases an email address, as Lytics' `email()` does.
    Email,
    /// A time (ISO-8601 text, unix seconds or milliseconds) to unix milliseconds.
    EpochMs,
    /// A time to unix seconds.
    EpochSeconds,
    /// A time to RFC 3339 UTC text.
    Iso8601,
    /// A time to its UTC hour of day, as text `"0"`..`"23"` (the keys of an hourly count).
    HourOfDay,
    /// Any scalar to text.
    ToString,
    /// Text or a number to a number.
    ToNumber,
    /// Any value to a boolean (`"true"`, `"1"`, non-zero numbers are true).
    ToBool,
}

impl Transform {
    /// Every transform, with its name in rule files.
    pub const ALL: &'static [(&'static str, Transform)] = &[
        ("lowercase", Transform::Lowercase),
        ("uppercase", Transform::Uppercase),
        ("trim", Transform::Trim),
        ("email", Transform::Email),
        ("epoch_ms", Transform::EpochMs),
        ("epoch_seconds", Transform::EpochSeconds),
        ("iso8601", Transform::Iso8601),
        ("hour_of_day", Transform::HourOfDay),
        ("to_string", Transform::ToString),
        ("to_number", Transform::ToNumber),
        ("to_bool", Transform::ToBool),
    ];

    /// Looks a transform up by its rule-file name.
    pub fn from_name(name: &str) -> Option<Transform> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
    }

    /// The transform's rule-file name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, t)| *t == self)
            .map(|(n, _)| *n)
            .unwrap_or("unknown")
    }

    /// Applies the transform.
    pub fn apply(self, value: Value) -> Result<Value, String> {
        match value {
            Value::Array(items) => items
                .into_iter()
                .map(|v| self.apply(v))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array),
            v => self.apply_one(v),
        }
    }

    fn apply_one(self, value: Value) -> Result<Value, String> {
        let fail = |v: &Value| format!("`{}` cannot read {}", self.name(), describe(v));
        match self {
            Transform::Lowercase => text(value, |s| s.to_lowercase()),
            Transform::Uppercase => text(value, |s| s.to_uppercase()),
            Transform::Trim => text(value, |s| s.trim().to_string()),
            // A number, a boolean or text that is no address (an SMS recipient's phone number)
            // is refused, not passed on as one; `Name <addr>` gives the address.
            Transform::Email => match &value {
                Value::String(s) => address(s)
                    .map(|a| Value::String(a.to_lowercase()))
                    .ok_or_else(|| format!("`email` cannot read `{}`: not an email address", s.trim())),
                other => Err(fail(other)),
            },
            Transform::EpochMs => timefmt::value_to_ms(&value)
                .map(Value::from)
                .ok_or_else(|| fail(&value)),
            Transform::EpochSeconds => timefmt::value_to_ms(&value)
                .map(|ms| Value::from(ms.div_euclid(1000)))
                .ok_or_else(|| fail(&value)),
            Transform::Iso8601 => timefmt::value_to_ms(&value)
                .and_then(timefmt::ms_to_rfc3339)
                .map(Value::from)
                .ok_or_else(|| fail(&value)),
            Transform::HourOfDay => timefmt::value_to_ms(&value)
                .and_then(timefmt::hour_of_day)
                .map(|h| Value::from(h.to_string()))
                .ok_or_else(|| fail(&value)),
            Transform::ToString => match value {
                Value::String(_) => Ok(value),
                Value::Number(n) => Ok(Value::from(n.to_string())),
                Value::Bool(b) => Ok(Value::from(b.to_string())),
                other => Err(fail(&other)),
            },
            Transform::ToNumber => match &value {
                Value::Number(_) => Ok(value),
                Value::String(s) => {
                    let s = s.trim();
                    if let Ok(i) = s.parse::<i64>() {
                        Ok(Value::from(i))
                    } else {
                        s.parse::<f64>()
                            .ok()
                            .and_then(serde_json::Number::from_f64)
                            .map(Value::Number)
                            .ok_or_else(|| fail(&value))
                    }
                }
                Value::Bool(b) => Ok(Value::from(u8::from(*b))),
                _ => Err(fail(&value)),
            },
            Transform::ToBool => match &value {
                Value::Bool(_) => Ok(value),
                Value::Number(n) => Ok(Value::from(n.as_f64().is_some_and(|f| f != 0.0))),
                Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" => Ok(Value::from(true)),
                    "false" | "0" | "no" | "" => Ok(Value::from(false)),
                    _ => Err(fail(&value)),
                },
                _ => Err(fail(&value)),
            },
        }
    }
}

fn text(value: Value, f: impl Fn(&str) -> String) -> Result<Value, String> {
    match value {
        Value::String(s) => Ok(Value::String(f(&s))),
        // Numbers and booleans are left alone: lower-casing `42` is a no-op, not an error.
        v @ (Value::Number(_) | Value::Bool(_)) => Ok(v),
        other => Err(format!("expected text, found {}", describe(&other))),
    }
}

/// A short description of a value for messages.
pub fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) if s.len() > 40 => format!("the text \"{}…\"", truncate(s, 40)),
        Value::String(s) => format!("the text \"{s}\""),
        Value::Array(_) => "an array".to_string(),
        Value::Object(_) => "an object".to_string(),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The email address in `text` (trimmed; `Name <addr>` gives `addr`): one `@` with text on
/// both sides and no whitespace.
fn address(text: &str) -> Option<&str> {
    let text = text.trim();
    let text = match (text.rfind('<'), text.strip_suffix('>')) {
        (Some(open), Some(inner)) => &inner[open + 1..],
        _ => text,
    };
    let (local, domain) = text.split_once('@')?;
    let fits = |part: &str| {
        !part.is_empty() && !part.contains(['@', '<', '>']) && !part.contains(char::is_whitespace)
    };
    (fits(local) && fits(domain)).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_round_trip() {
        for (name, t) in Transform::ALL {
            assert_eq!(Transform::from_name(name), Some(*t));
            assert_eq!(t.name(), *name);
        }
        assert_eq!(Transform::from_name("lowercas"), None);
    }

    #[test]
    fn email_takes_addresses_only() {
        let email = |v: Value| Transform::Email.apply(v);
        assert_eq!(
            email(json!(" Ada@Example.COM ")).unwrap(),
            json!("ada@example.com")
        );
        assert_eq!(email(json!("Ada <Ada@X.io>")).unwrap(), json!("ada@x.io"));
        for bad in [
            json!("+15551234"),
            json!("a@"),
            json!("@b"),
            json!("a b@c"),
            json!("a@b@c"),
            json!(5),
        ] {
            assert!(email(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn transforms_map_over_arrays() {
        assert_eq!(
            Transform::Email.apply(json!([" A@B.com", "c@D.com"])).unwrap(),
            json!(["a@b.com", "c@d.com"])
        );
    }

    #[test]
    fn time_transforms_read_seconds_and_iso() {
        assert_eq!(
            Transform::EpochMs.apply(json!(1613063089)).unwrap(),
            json!(1_613_063_089_000i64)
        );
        assert_eq!(
            Transform::HourOfDay.apply(json!("2021-02-11T17:04:49Z")).unwrap(),
            json!("17")
        );
        assert!(Transform::EpochMs.apply(json!("soon")).is_err());
    }

    #[test]
    fn conversions() {
        assert_eq!(Transform::ToString.apply(json!(123)).unwrap(), json!("123"));
        assert_eq!(Transform::ToNumber.apply(json!("1.5")).unwrap(), json!(1.5));
        assert_eq!(Transform::ToNumber.apply(json!("7")).unwrap(), json!(7));
        assert_eq!(Transform::ToBool.apply(json!("yes")).unwrap(), json!(true));
        assert!(Transform::ToNumber.apply(json!({})).is_err());
    }
}
