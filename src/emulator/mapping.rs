//! From stream records to profile updates: a record (and the queries of its stream) in, a
//! [`ProfileUpdate`] out.
//!
//! Without a query a record's fields are copied as they are (`latest` wins) and the default
//! identity fields stitch it; with queries only their fields are produced, each computed by its
//! expression, converted to its kind and tagged with its merge op, and their `BY` fields are
//! the identities. Queries are compiled once at registration. This module is pure: it never
//! touches the stores and never decides whether a record is accepted.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use super::lql::{LqlCond, LqlExpr, LqlFunc, LqlQuery};
use super::profiles::{
    FieldValue, MergeOp, ProfileUpdate, Val, identity_texts, json_identity_texts, normalize_identity,
    number_json,
};
use super::time::{format_secs, hour_of_day, parse_time_ms, parse_time_str};

/// Record fields that stitch records of streams without a query, as Lytics' defaults do.
pub const DEFAULT_IDENTITY_FIELDS: [&str; 4] = ["email", "user_id", "anonymous_id", "_uid"];

/// The kind a field's values are converted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// No declared kind: the value keeps the type the expression gave it.
    Auto,
    Str,
    Int,
    Num,
    Bool,
    Date,
    Set,
    Counts,
    StrMap,
}

impl Shape {
    fn from_kind(kind: &str) -> Option<Self> {
        Some(match kind {
            "string" => Self::Str,
            "int" => Self::Int,
            "number" => Self::Num,
            "bool" => Self::Bool,
            "date" => Self::Date,
            "[]string" => Self::Set,
            "map[string]intsum" => Self::Counts,
            "map[string]string" => Self::StrMap,
            _ => return None,
        })
    }
}

#[derive(Debug)]
struct CompiledField {
    name: String,
    expr: LqlExpr,
    cond: Option<LqlCond>,
    shape: Shape,
    op: MergeOp,
    /// The field counts records (`count(…)` or `MERGEOP count`): each record brings 1.
    counts_records: bool,
    /// `max`/`min` without a kind compare numeric strings as numbers.
    numeric: bool,
}

/// A registered query, compiled once so records are mapped without re-reading the LQL.
#[derive(Debug)]
pub struct CompiledQuery {
    /// The parsed query.
    pub query: LqlQuery,
    /// The text it was registered with, listed back by `GET /api/query`.
    pub text: String,
    fields: Vec<CompiledField>,
}

impl CompiledQuery {
    /// The profile fields it writes.
    pub fn field_names(&self) -> impl Iterator<Item = &str> {
        self.fields.iter().map(|f| f.name.as_str())
    }

    /// Compiles a parsed query: resolves each field's kind and merge op with Lytics' defaults.
    pub fn new(query: LqlQuery, text: &str) -> Self {
        let fields = query
            .fields
            .iter()
            .map(|f| {
                let aggregate = match &f.expr {
                    LqlExpr::Call(func, _) => Some(*func),
                    LqlExpr::Field(_) => None,
                };
                let default_shape = match aggregate {
                    Some(LqlFunc::Set) => Shape::Set,
                    Some(LqlFunc::ValueCt) => Shape::Counts,
                    Some(LqlFunc::Count) => Shape::Int,
                    Some(LqlFunc::Sum) => Shape::Num,
                    _ => Shape::Auto,
                };
                let shape = f
                    .kind
                    .as_deref()
                    .and_then(Shape::from_kind)
                    .unwrap_or(default_shape);
                let default_op = match (aggregate, shape) {
                    (Some(LqlFunc::Set | LqlFunc::ValueCt), _) => MergeOp::Merge,
                    (Some(LqlFunc::Count), _) => MergeOp::Count,
                    (Some(LqlFunc::Sum), _) => MergeOp::Sum,
                    (Some(LqlFunc::Max), _) => MergeOp::Max,
                    (Some(LqlFunc::Min), _) => MergeOp::Min,
                    (_, Shape::Set | Shape::Counts | Shape::StrMap) => MergeOp::Merge,
                    _ => MergeOp::Latest,
                };
                let op = f
                    .mergeop
                    .as_deref()
                    .and_then(MergeOp::from_name)
                    .unwrap_or(default_op);
                CompiledField {
                    name: f.name.clone(),
                    expr: f.expr.clone(),
                    cond: f.cond.clone(),
                    shape,
                    op,
                    counts_records: aggregate == Some(LqlFunc::Count) || op == MergeOp::Count,
                    numeric: matches!(aggregate, Some(LqlFunc::Max | LqlFunc::Min)),
                }
            })
            .collect();
        CompiledQuery {
            query,
            text: text.to_string(),
            fields,
        }
    }
}

/// A single value an expression produced for one record.
#[derive(Debug, Clone, PartialEq)]
enum Scalar {
    Str(String),
    Int(i64),
    Num(f64),
    Bool(bool),
    Date(i64),
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Scalar::Str(s) => s.clone(),
            Scalar::Int(i) => i.to_string(),
            Scalar::Num(n) => number_json(*n).to_string(),
            Scalar::Bool(b) => b.to_string(),
            Scalar::Date(ms) => format_secs(*ms),
        }
    }

    fn time_ms(&self) -> Option<i64> {
        match self {
            Scalar::Date(ms) => Some(*ms),
            Scalar::Str(s) => parse_time_str(s),
            Scalar::Int(i) => parse_time_ms(&Value::from(*i)),
            Scalar::Num(n) => parse_time_ms(&number_json(*n)),
            Scalar::Bool(_) => None,
        }
    }

    fn as_f64(&self) -> Option<f64> {
        match self {
            Scalar::Int(i) => Some(*i as f64),
            Scalar::Num(n) => Some(*n),
            Scalar::Str(s) => s.trim().parse().ok(),
            Scalar::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
            Scalar::Date(ms) => Some(*ms as f64),
        }
    }
}

fn json_scalars(value: &Value, out: &mut Vec<Scalar>) {
    match value {
        Value::String(s) if !s.is_empty() => out.push(Scalar::Str(s.clone())),
        Value::Number(n) => out.push(match n.as_i64() {
            Some(i) => Scalar::Int(i),
            None => Scalar::Num(n.as_f64().unwrap_or_default()),
        }),
        Value::Bool(b) => out.push(Scalar::Bool(*b)),
        // Arrays of scalars stay arrays in flattened records: each element is a value.
        Value::Array(items) => {
            for item in items {
                if !item.is_array() {
                    json_scalars(item, out);
                }
            }
        }
        // Null, empty strings and nested objects carry no value for a user field.
        _ => {}
    }
}

/// Evaluates an expression; an empty result means "nothing", which leaves the field untouched.
fn eval(expr: &LqlExpr, record: &Map<String, Value>, event_ms: i64) -> Vec<Scalar> {
    match expr {
        LqlExpr::Field(name) => {
            let mut out = Vec::new();
            if let Some(value) = record.get(name) {
                json_scalars(value, &mut out);
            }
            out
        }
        LqlExpr::Call(func, args) => {
            let arg = || {
                args.first()
                    .map(|a| eval(a, record, event_ms))
                    .unwrap_or_default()
            };
            match func {
                LqlFunc::EpochMs => vec![Scalar::Int(event_ms)],
                LqlFunc::Count if args.is_empty() => vec![Scalar::Int(1)],
                LqlFunc::HourOfDay if args.is_empty() => {
                    vec![Scalar::Str(hour_of_day(event_ms).to_string())]
                }
                LqlFunc::HourOfDay => arg()
                    .iter()
                    .filter_map(Scalar::time_ms)
                    .map(|ms| Scalar::Str(hour_of_day(ms).to_string()))
                    .collect(),
                LqlFunc::ToDate => arg()
                    .iter()
                    .filter_map(Scalar::time_ms)
                    .map(Scalar::Date)
                    .collect(),
                LqlFunc::Email => arg()
                    .into_iter()
                    .filter_map(|s| match s {
                        Scalar::Str(s) => {
                            let email = s.trim().to_lowercase();
                            (!email.is_empty()).then_some(Scalar::Str(email))
                        }
                        _ => None,
                    })
                    .collect(),
                // Aggregates only decide the kind and merge op; per record they pass values on.
                LqlFunc::Set
                | LqlFunc::ValueCt
                | LqlFunc::Count
                | LqlFunc::Sum
                | LqlFunc::Max
                | LqlFunc::Min => arg(),
            }
        }
    }
}

fn holds(cond: &LqlCond, record: &Map<String, Value>, event_ms: i64) -> bool {
    match cond {
        LqlCond::Exists(e) => !eval(e, record, event_ms).is_empty(),
        LqlCond::Eq(e, lit) => eval(e, record, event_ms).iter().any(|s| s.text() == *lit),
        LqlCond::Ne(e, lit) => !eval(e, record, event_ms).iter().any(|s| s.text() == *lit),
        LqlCond::And(a, b) => holds(a, record, event_ms) && holds(b, record, event_ms),
        LqlCond::Or(a, b) => holds(a, record, event_ms) || holds(b, record, event_ms),
        LqlCond::Not(c) => !holds(c, record, event_ms),
    }
}

fn scalar_val(scalar: Scalar, shape: Shape, numeric: bool) -> Option<Val> {
    Some(match shape {
        Shape::Auto => match scalar {
            Scalar::Str(s) if numeric => match s.trim().parse::<f64>() {
                Ok(n) => Val::Num(n),
                Err(_) => Val::Str(s),
            },
            Scalar::Str(s) => Val::Str(s),
            Scalar::Int(i) => Val::Int(i),
            Scalar::Num(n) => Val::Num(n),
            Scalar::Bool(b) => Val::Bool(b),
            Scalar::Date(ms) => Val::Date(ms),
        },
        Shape::Str => Val::Str(scalar.text()),
        Shape::Int => match scalar {
            Scalar::Int(i) => Val::Int(i),
            Scalar::Str(s) => match s.trim().parse::<i64>() {
                Ok(i) => Val::Int(i),
                Err(_) => Val::Int(s.trim().parse::<f64>().ok()? as i64),
            },
            other => Val::Int(other.as_f64()? as i64),
        },
        Shape::Num => Val::Num(scalar.as_f64()?),
        Shape::Bool => match scalar {
            Scalar::Bool(b) => Val::Bool(b),
            Scalar::Str(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "t" | "yes" => Val::Bool(true),
                "false" | "0" | "f" | "no" => Val::Bool(false),
                _ => return None,
            },
            other => Val::Bool(other.as_f64()? != 0.0),
        },
        Shape::Date => Val::Date(scalar.time_ms()?),
        // Collection shapes are built from all scalars at once by `field_value`.
        Shape::Set | Shape::Counts | Shape::StrMap => return None,
    })
}

/// Computes one field's contribution from a record, or `None` to leave the field untouched.
fn field_value(field: &CompiledField, record: &Map<String, Value>, event_ms: i64) -> Option<FieldValue> {
    if let Some(cond) = &field.cond
        && !holds(cond, record, event_ms)
    {
        return None;
    }
    let scalars = eval(&field.expr, record, event_ms);
    if scalars.is_empty() {
        return None;
    }
    let make = |val| {
        Some(FieldValue {
            val,
            op: field.op,
            at_ms: event_ms,
        })
    };
    if field.counts_records {
        return make(Val::Int(1));
    }
    match field.shape {
        Shape::Set => make(Val::Set(scalars.iter().map(Scalar::text).collect())),
        Shape::Counts => {
            let mut counts = BTreeMap::new();
            for s in &scalars {
                *counts.entry(s.text()).or_insert(0) += 1;
            }
            make(Val::Counts(counts))
        }
        Shape::StrMap => {
            // A map field takes a record value that is an object; scalars have no keys.
            let LqlExpr::Field(name) = innermost(&field.expr) else {
                return None;
            };
            let map: BTreeMap<String, String> = record
                .get(name)?
                .as_object()?
                .iter()
                .filter_map(|(k, v)| {
                    let mut out = Vec::new();
                    json_scalars(v, &mut out);
                    Some((k.clone(), out.first()?.text()))
                })
                .collect();
            if map.is_empty() {
                return None;
            }
            make(Val::StrMap(map))
        }
        shape => {
            // Several values in one record (an array) fold by the field's own merge op.
            let mut folded: Option<FieldValue> = None;
            for scalar in scalars {
                let Some(val) = scalar_val(scalar, shape, field.numeric) else {
                    continue;
                };
                let value = FieldValue {
                    val,
                    op: field.op,
                    at_ms: event_ms,
                };
                match &mut folded {
                    Some(acc) => acc.merge(value),
                    None => folded = Some(value),
                }
            }
            folded
        }
    }
}

fn innermost(expr: &LqlExpr) -> &LqlExpr {
    match expr {
        LqlExpr::Call(_, args) if args.len() == 1 => innermost(&args[0]),
        other => other,
    }
}

fn push_identity(ids: &mut Vec<(String, String)>, field: &str, text: &str) {
    if let Some(value) = normalize_identity(field, text)
        && !ids.iter().any(|(f, v)| f == field && *v == value)
    {
        ids.push((field.to_string(), value));
    }
}

/// The identities of a record from a stream without a query: its [`DEFAULT_IDENTITY_FIELDS`].
pub fn default_ids(record: &Map<String, Value>) -> Vec<(String, String)> {
    let mut ids = Vec::new();
    for field in DEFAULT_IDENTITY_FIELDS {
        if let Some(value) = record.get(field) {
            for text in json_identity_texts(value) {
                push_identity(&mut ids, field, &text);
            }
        }
    }
    ids
}

/// The update of a record from a stream with queries: only their fields, stitched by their
/// `BY` fields. A `BY` field the queries do not select is read from the record as it is, and
/// then also kept on the profile as a plain `latest` field.
pub fn query_update(
    queries: &[std::sync::Arc<CompiledQuery>],
    record: &Map<String, Value>,
    event_ms: i64,
) -> ProfileUpdate {
    let mut fields: Vec<(String, FieldValue)> = Vec::new();
    for query in queries {
        for field in &query.fields {
            if let Some(value) = field_value(field, record, event_ms) {
                fields.push((field.name.clone(), value));
            }
        }
    }
    let mut ids = Vec::new();
    let mut by_seen = BTreeSet::new();
    for query in queries {
        for by in &query.query.by {
            if !by_seen.insert(by.as_str()) {
                continue;
            }
            let selected = queries.iter().any(|q| q.fields.iter().any(|f| f.name == *by));
            if selected {
                for (_, value) in fields.iter().filter(|(name, _)| name == by) {
                    for text in identity_texts(&value.val) {
                        push_identity(&mut ids, by, &text);
                    }
                }
            } else if let Some(raw) = record.get(by.as_str()) {
                let texts = json_identity_texts(raw);
                for text in &texts {
                    push_identity(&mut ids, by, text);
                }
                if let Some(last) = texts.last() {
                    fields.push((
                        by.clone(),
                        FieldValue {
                            val: Val::Str(last.clone()),
                            op: MergeOp::Latest,
                            at_ms: event_ms,
                        },
                    ));
                }
            }
        }
    }
    if ids.is_empty() {
        return ProfileUpdate::default();
    }
    ProfileUpdate { ids, fields }
}

#[cfg(test)]
#[allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test should fail loudly at the broken step"
)]
mod tests {
    use std::sync::Arc;

    use super::super::lql::parse_lql;
    use super::super::lql::tests::CUSTOMERIO_QUERY;
    use super::super::profiles::ProfileStore;
    use super::*;
    use serde_json::json;

    fn compile(text: &str) -> Arc<CompiledQuery> {
        Arc::new(CompiledQuery::new(parse_lql(text).expect("parses"), text))
    }

    fn record(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    /// Feeds records (with their event times) through one query and returns the profile
    /// found by `field` = `value`.
    fn profile_after(
        query: &str,
        records: Vec<(i64, Value)>,
        field: &str,
        value: &str,
    ) -> Map<String, Value> {
        let q = compile(query);
        let mut store = ProfileStore::default();
        for (at, r) in records {
            store.apply(query_update(std::slice::from_ref(&q), &record(r), at));
        }
        store.find(field, value).expect("profile exists")
    }

    #[test]
    fn customerio_query_builds_the_expected_profile() {
        let open = |email: &str, hour: &str, ts: i64, campaign: &str, subject: &str| {
            json!({
                "email": email, "cio_events": "email_opened", "cio_hourlyopens": hour,
                "cio_last_open_ts": ts, "last_active_ts": ts,
                "cio_campaign_ids": campaign, "cio_subjects": subject
            })
        };
        let profile = profile_after(
            CUSTOMERIO_QUERY,
            vec![
                (
                    1_613_063_089_000,
                    open("Test@Example.com", "17", 1_613_063_089_000, "123", "Test Email"),
                ),
                // An older event that arrives later must not move the dates back.
                (
                    1_612_000_000_000,
                    open(" test@example.COM", "9", 1_612_000_000_000, "77", "Older"),
                ),
                (
                    1_613_070_000_000,
                    json!({"email": "test@example.com", "cio_events": "email_clicked",
                           "last_active_ts": "2021-02-11T19:00:00Z", "cio_campaign_ids": 123}),
                ),
            ],
            "email",
            "TEST@example.com",
        );
        assert_eq!(
            Value::Object(profile),
            json!({
                "cio_campaign_ids": ["123", "77"],
                "cio_events": {"email_clicked": 1, "email_opened": 2},
                "cio_hourlyopens": {"17": 1, "9": 1},
                "cio_last_open_ts": "2021-02-11T17:04:49Z",
                "cio_subjects": ["Older", "Test Email"],
                "email": "test@example.com",
                "last_active_ts": "2021-02-11T19:00:00Z"
            })
        );
    }

    #[test]
    fn if_conditions_gate_fields() {
        let query = r#"SELECT email(email) AS email,
            count() AS opens IF eq(event, "email_opened"),
            valuect(hourofday(ts)) AS hourlyopens IF eq(event, "email_opened") AND exists(ts),
            todate(ts) AS last_click IF NOT ne(event, "email_clicked") KIND date MERGEOP max,
            set(event) AS other_events IF NOT (eq(event, "email_opened") OR eq(event, "email_clicked"))
            FROM s INTO user BY email ALIAS q"#;
        let profile = profile_after(
            query,
            vec![
                (
                    1,
                    json!({"email": "a@b.c", "event": "email_opened", "ts": "2021-02-11T17:04:49Z"}),
                ),
                (
                    2,
                    json!({"email": "a@b.c", "event": "email_opened", "ts": 1_613_070_000}),
                ),
                (3, json!({"email": "a@b.c", "event": "email_opened"})),
                (
                    4,
                    json!({"email": "a@b.c", "event": "email_clicked", "ts": 1_613_063_089_000_i64}),
                ),
                (5, json!({"email": "a@b.c", "event": "email_sent", "ts": 1})),
            ],
            "email",
            "a@b.c",
        );
        assert_eq!(
            Value::Object(profile),
            json!({
                "email": "a@b.c",
                "hourlyopens": {"17": 1, "19": 1},
                "last_click": "2021-02-11T17:04:49Z",
                "opens": 3,
                "other_events": ["email_sent"]
            })
        );
    }

    #[test]
    fn hourofday_epochms_and_numeric_aggregates() {
        let query = "SELECT hourofday() AS hod, epochms() AS seen_ms, epochms() AS first_ms MERGEOP oldest,
            sum(amount) AS total, max(score) AS best, min(score) AS worst, amount AS amounts KIND []string,
            score AS score_int KIND int
            FROM s INTO user BY user_id ALIAS q";
        let profile = profile_after(
            query,
            vec![
                (
                    1_613_063_089_000,
                    json!({"user_id": 7, "amount": 2.5, "score": "10"}),
                ),
                (
                    1_613_000_000_000,
                    json!({"user_id": "7", "amount": 3, "score": 9}),
                ),
                (
                    1_613_100_000_000,
                    json!({"user_id": "7", "amount": [1, 1], "score": "11.9"}),
                ),
            ],
            "user_id",
            "7",
        );
        assert_eq!(
            Value::Object(profile),
            json!({
                "amounts": ["1", "2.5", "3"],
                "best": 11.9,
                "first_ms": 1_613_000_000_000_i64,
                "hod": "3",
                "score_int": 11,
                "seen_ms": 1_613_100_000_000_i64,
                "total": 7.5,
                "user_id": "7",
                "worst": 9
            })
        );
    }

    #[test]
    fn by_fields_stitch_records_and_merge_profiles() {
        let query = "SELECT email(email) AS email, user_id AS user_id, set(tag) AS tags
            FROM s INTO user BY email OR user_id ALIAS q";
        let q = compile(query);
        let mut store = ProfileStore::default();
        let apply = |store: &mut ProfileStore, r: Value| {
            store.apply(query_update(std::slice::from_ref(&q), &record(r), 1));
        };
        apply(&mut store, json!({"email": "A@x.io", "tag": "a"}));
        apply(&mut store, json!({"user_id": "u1", "tag": "b"}));
        assert_eq!(store.len(), 2);
        apply(
            &mut store,
            json!({"email": "a@x.io", "user_id": "u1", "tag": "c"}),
        );
        assert_eq!(store.len(), 1);
        let profile = store.find("user_id", "u1").expect("merged profile");
        assert_eq!(profile["tags"], json!(["a", "b", "c"]));
        assert_eq!(profile["email"], json!("a@x.io"));
    }

    #[test]
    fn by_field_that_is_not_selected_is_read_from_the_record() {
        let profile = profile_after(
            "SELECT set(tag) AS tags FROM s INTO user BY user_id ALIAS q",
            vec![(1, json!({"user_id": "u9", "tag": "x"}))],
            "user_id",
            "u9",
        );
        assert_eq!(Value::Object(profile), json!({"tags": ["x"], "user_id": "u9"}));
    }

    #[test]
    fn missing_values_leave_fields_untouched() {
        let profile = profile_after(
            "SELECT email(email) AS email, name AS name FROM s INTO user BY email ALIAS q",
            vec![
                (1, json!({"email": "a@b.c", "name": "Ann"})),
                (2, json!({"email": "a@b.c", "name": null})),
                (3, json!({"email": "a@b.c", "name": ""})),
            ],
            "email",
            "a@b.c",
        );
        assert_eq!(profile["name"], json!("Ann"));
    }

    #[test]
    fn default_mapping_copies_fields_and_stitches_default_identities() {
        let mut store = ProfileStore::default();
        for (r, at_ms) in [
            (
                json!({"email": "Ann@X.io", "plan": "free", "anonymous_id": "an1"}),
                20,
            ),
            (json!({"anonymous_id": "an1", "plan": "old", "page": "/home"}), 10),
            (json!({"page": "/lost"}), 30),
        ] {
            let r = record(r);
            store.apply_record(default_ids(&r), &r, at_ms);
        }
        assert_eq!(store.len(), 1);
        let profile = store.find("email", "ann@x.io").expect("found");
        assert_eq!(
            Value::Object(profile),
            json!({"anonymous_id": "an1", "email": "Ann@X.io", "page": "/home", "plan": "free"})
        );
    }
}
