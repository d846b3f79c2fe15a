//! The YAML form of rule files, exactly as people write them.
//!
//! Input: YAML text. Output: [`RuleFileSpec`], a serde mirror with `deny_unknown_fields` on every
//! fixed-shape level. Field bodies and conditions stay as YAML values here: the compiler reads
//! them by hand so that it can report every problem, with a hint, instead of serde's first one.
//! This module never interprets what the values mean.

use indexmap::IndexMap;
use serde::Deserialize;
use serde_yaml::Value as Yaml;

/// A rule file.
#[derive(Debug, Deserialize)]
pub struct RuleFileSpec {
    /// Which input the rules read: `signal` or `customerio`.
    pub source: String,
    /// What the file is for.
    #[serde(default)]
    pub description: Option<String>,
    /// The stream the records go to; the integration's `stream_name` when absent.
    #[serde(default)]
    pub stream: Option<String>,
    /// The output field holding the event time; sent as the collect call's `timestamp_field`.
    #[serde(default)]
    pub timestamp_field: Option<String>,
    /// The output fields that identify a user; a record without any of them is not sent.
    #[serde(default)]
    pub identity: Option<Vec<String>>,
    /// The LQL query alias `rules lql` uses for this file's user fields.
    #[serde(default)]
    pub alias: Option<String>,
    /// The rules as written, evaluated in order; every rule whose `when` holds produces a
    /// record. Each is read into a [`RuleSpec`] on its own by the compiler, so a rule of the
    /// wrong shape is reported beside every other problem of the file.
    pub rules: Vec<Yaml>,
    /// Test cases as written: each is read on its own by the compiler, so a mistake in one is
    /// reported beside every other problem of the file rather than instead of them.
    #[serde(default, rename = "tests")]
    pub test_specs: Vec<Yaml>,
    /// Test cases: an input and the records it must produce (the readable ones of `tests`).
    #[serde(skip)]
    pub tests: Vec<TestCaseSpec>,
    /// Keys the language does not know; the compiler reports each, so one run shows every
    /// mistake instead of stopping at the first.
    #[serde(flatten)]
    pub unknown: IndexMap<String, Yaml>,
}

/// The keys a rule file may have.
pub const FILE_KEYS: &[&str] = &[
    "source",
    "description",
    "stream",
    "timestamp_field",
    "identity",
    "alias",
    "rules",
    "tests",
];

/// The keys a rule may have.
pub const RULE_KEYS: &[&str] = &[
    "name",
    "description",
    "kind",
    "when",
    "stream",
    "identity",
    "flatten",
    "fields",
];

/// One rule: when it applies and the record it builds.
#[derive(Debug, Deserialize)]
pub struct RuleSpec {
    /// A unique name, shown in the live view, dead letters and dry runs.
    pub name: String,
    /// What the rule does.
    #[serde(default)]
    pub description: Option<String>,
    /// `event` (a stream event) or `profile` (a user-profile update).
    #[serde(default)]
    pub kind: Option<String>,
    /// The condition under which the rule applies; always when absent.
    #[serde(default)]
    pub when: Option<Yaml>,
    /// Overrides the file's stream.
    #[serde(default)]
    pub stream: Option<String>,
    /// Overrides the file's identity fields.
    #[serde(default)]
    pub identity: Option<Vec<String>>,
    /// Objects whose members are copied, flattened, into the record.
    #[serde(default)]
    pub flatten: Vec<Yaml>,
    /// The record's fields, in order.
    #[serde(default, deserialize_with = "unique_keys")]
    pub fields: IndexMap<String, Yaml>,
    /// Keys the language does not know (reported by the compiler).
    #[serde(flatten)]
    pub unknown: IndexMap<String, Yaml>,
}

/// A test case kept beside the rules.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestCaseSpec {
    /// A name for the case.
    pub name: String,
    /// The input event (YAML or JSON), or `fixture: <file>` relative to the rule file.
    #[serde(default)]
    pub input: Option<Yaml>,
    /// A JSON file, relative to the rule file, holding the input event.
    #[serde(default)]
    pub input_file: Option<String>,
    /// The integration values the case runs with (`stream_name`, `account_id`).
    #[serde(default)]
    pub config: IndexMap<String, String>,
    /// The records the input must produce, in order (`expect: []`: none).
    #[serde(default)]
    pub expect: Option<Vec<ExpectedRecordSpec>>,
    /// When set, the input must produce no record, and each dropped record's reason must
    /// contain this text (an empty text: the input must match no rule).
    #[serde(default)]
    pub expect_dropped: Option<String>,
}

/// One expected record of a test case.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectedRecordSpec {
    /// The rule that must produce it.
    #[serde(default)]
    pub rule: Option<String>,
    /// The stream it must go to.
    #[serde(default)]
    pub stream: Option<String>,
    /// The exact fields: the record holds these and no others.
    #[serde(default)]
    pub fields: Option<IndexMap<String, Yaml>>,
    /// Some of the fields: the record holds these, and may hold others.
    #[serde(default)]
    pub includes: Option<IndexMap<String, Yaml>>,
}

/// A mapping whose keys are unique: YAML parsers keep the last of two equal keys, so a field
/// written twice would silently lose its first definition.
fn unique_keys<'de, D: serde::Deserializer<'de>>(d: D) -> Result<IndexMap<String, Yaml>, D::Error> {
    struct Unique;
    impl<'de> serde::de::Visitor<'de> for Unique {
        type Value = IndexMap<String, Yaml>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a mapping of field names to field definitions")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = IndexMap::new();
            while let Some((k, v)) = map.next_entry::<String, Yaml>()? {
                if out.contains_key(&k) {
                    return Err(serde::de::Error::custom(format!(
                        "field `{k}` is defined twice in one rule (the second would silently replace the first)"
                    )));
                }
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Unique)
}
