//! User profiles and identity resolution: profile updates in, merged profiles out.
//!
//! Input is a [`ProfileUpdate`] per stored record (its identity values and its field values,
//! already computed by `mapping`); output is the merged profile of a user, rendered as Lytics'
//! entity API shows it. Records sharing any identity value land in one profile, and a record
//! that links two profiles merges them. This module never reads records or LQL: it only stores
//! and merges values, each by its merge op.

use std::cmp::Ordering;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{Map, Value};

use super::time::format_secs;

/// Identity values longer than this are ignored, as Lytics caps them at 256 bytes.
pub const MAX_IDENTITY_BYTES: usize = 256;

/// A stored field value of one of the supported kinds.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    /// `string`.
    Str(String),
    /// `int`.
    Int(i64),
    /// `number`.
    Num(f64),
    /// `bool`.
    Bool(bool),
    /// `date`, as epoch milliseconds.
    Date(i64),
    /// `[]string`, kept sorted so it renders sorted.
    Set(BTreeSet<String>),
    /// `map[string]intsum`.
    Counts(BTreeMap<String, i64>),
    /// `map[string]string`.
    StrMap(BTreeMap<String, String>),
    /// A record value copied as-is (streams without a query).
    Json(Value),
}

impl Val {
    /// Renders the value as the entity API does.
    pub fn to_json(&self) -> Value {
        match self {
            Val::Str(s) => Value::String(s.clone()),
            Val::Int(i) => Value::from(*i),
            Val::Num(n) => number_json(*n),
            Val::Bool(b) => Value::Bool(*b),
            Val::Date(ms) => Value::String(format_secs(*ms)),
            Val::Set(set) => Value::Array(set.iter().cloned().map(Value::String).collect()),
            Val::Counts(counts) => {
                Value::Object(counts.iter().map(|(k, v)| (k.clone(), Value::from(*v))).collect())
            }
            Val::StrMap(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect(),
            ),
            Val::Json(v) => v.clone(),
        }
    }

    /// The value as an identity or lookup string, when it is a single scalar.
    fn as_text(&self) -> Option<String> {
        match self {
            Val::Str(s) => Some(s.clone()),
            Val::Int(i) => Some(i.to_string()),
            Val::Num(n) => Some(number_json(*n).to_string()),
            Val::Bool(b) => Some(b.to_string()),
            Val::Json(Value::String(s)) => Some(s.clone()),
            Val::Json(v @ (Value::Number(_) | Value::Bool(_))) => Some(v.to_string()),
            _ => None,
        }
    }

    fn as_f64(&self) -> Option<f64> {
        match self {
            Val::Int(i) => Some(*i as f64),
            Val::Num(n) => Some(*n),
            Val::Json(Value::Number(n)) => n.as_f64(),
            _ => None,
        }
    }
}

/// Renders a float, writing integral values as integers (`3`, not `3.0`), as Lytics does.
pub fn number_json(n: f64) -> Value {
    if n.fract() == 0.0 && n.abs() < 9.0e15 {
        Value::from(n as i64)
    } else {
        serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)
    }
}

/// How a field combines a new value with the one it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeOp {
    /// The value with the latest event time wins.
    Latest,
    /// The value with the oldest event time wins.
    Oldest,
    /// Numbers add up; sets unite; counts add.
    Sum,
    /// Counts records: each record brings 1, merges add.
    Count,
    /// The largest value (numbers, dates, strings) wins.
    Max,
    /// The smallest value wins.
    Min,
    /// Sets unite, counts add, string maps overlay; scalars behave as `latest`.
    Merge,
}

impl MergeOp {
    /// Parses an LQL merge op name (already validated by the parser).
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "latest" => Self::Latest,
            "oldest" => Self::Oldest,
            "sum" => Self::Sum,
            "count" => Self::Count,
            "max" => Self::Max,
            "min" => Self::Min,
            "merge" => Self::Merge,
            _ => return None,
        })
    }
}

/// A field's value with what is needed to merge it further.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldValue {
    /// The current value.
    pub val: Val,
    /// The merge op of the field's definition.
    pub op: MergeOp,
    /// For `latest`/`oldest` the event time of the kept value, else the latest event time seen.
    pub at_ms: i64,
}

impl FieldValue {
    /// Folds `incoming` into `self` by the incoming value's merge op, so that a redefined
    /// field merges by its newest definition.
    pub fn merge(&mut self, incoming: FieldValue) {
        let op = incoming.op;
        let newer = incoming.at_ms >= self.at_ms;
        let at_ms = self.at_ms.max(incoming.at_ms);
        let combined = match op {
            MergeOp::Latest => None,
            MergeOp::Oldest => {
                if incoming.at_ms < self.at_ms {
                    *self = incoming;
                } else {
                    self.op = op;
                }
                return;
            }
            MergeOp::Sum | MergeOp::Count => add(&self.val, &incoming.val),
            MergeOp::Max | MergeOp::Min => compare(&self.val, &incoming.val).map(|ord| {
                let take_incoming = if op == MergeOp::Max {
                    ord == Ordering::Less
                } else {
                    ord == Ordering::Greater
                };
                if take_incoming {
                    incoming.val.clone()
                } else {
                    self.val.clone()
                }
            }),
            MergeOp::Merge => union(&self.val, &incoming.val, newer),
        };
        match combined {
            Some(val) => {
                self.val = val;
                self.op = op;
                self.at_ms = at_ms;
            }
            // Values that the op cannot combine (a kind changed, a scalar under `merge`)
            // fall back to `latest`, which never loses the newest data.
            None => {
                if newer {
                    *self = incoming;
                } else {
                    self.op = op;
                }
            }
        }
    }
}

fn add(a: &Val, b: &Val) -> Option<Val> {
    match (a, b) {
        (Val::Int(x), Val::Int(y)) => Some(Val::Int(x.saturating_add(*y))),
        (Val::Set(_), Val::Set(_)) | (Val::Counts(_), Val::Counts(_)) => union(a, b, true),
        _ => Some(Val::Num(a.as_f64()? + b.as_f64()?)),
    }
}

fn compare(a: &Val, b: &Val) -> Option<Ordering> {
    match (a, b) {
        (Val::Date(x), Val::Date(y)) => Some(x.cmp(y)),
        (Val::Str(x), Val::Str(y)) => Some(x.cmp(y)),
        (Val::Bool(x), Val::Bool(y)) => Some(x.cmp(y)),
        (Val::Json(Value::String(x)), Val::Json(Value::String(y))) => Some(x.cmp(y)),
        _ => a.as_f64()?.partial_cmp(&b.as_f64()?),
    }
}

fn union(a: &Val, b: &Val, b_is_newer: bool) -> Option<Val> {
    match (a, b) {
        (Val::Set(x), Val::Set(y)) => Some(Val::Set(x.union(y).cloned().collect())),
        (Val::Counts(x), Val::Counts(y)) => {
            let mut sum = x.clone();
            for (k, v) in y {
                let slot = sum.entry(k.clone()).or_insert(0);
                *slot = slot.saturating_add(*v);
            }
            Some(Val::Counts(sum))
        }
        (Val::StrMap(x), Val::StrMap(y)) => {
            let (base, over) = if b_is_newer { (x, y) } else { (y, x) };
            let mut merged = base.clone();
            merged.extend(over.iter().map(|(k, v)| (k.clone(), v.clone())));
            Some(Val::StrMap(merged))
        }
        _ => None,
    }
}

/// What one record contributes to the profile it belongs to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProfileUpdate {
    /// Identity (field, normalized value) pairs; without any, the record updates no profile.
    pub ids: Vec<(String, String)>,
    /// Field values to merge into the profile.
    pub fields: Vec<(String, FieldValue)>,
}

/// Normalizes an identity value: trimmed, emails lowercased, empty or over-long values dropped.
pub fn normalize_identity(field: &str, value: &str) -> Option<String> {
    let value = value.trim();
    if value.is_empty() || value.len() > MAX_IDENTITY_BYTES {
        return None;
    }
    Some(if field == "email" {
        value.to_lowercase()
    } else {
        value.to_string()
    })
}

/// The identity strings a stored value holds: one per scalar, one per set member.
pub fn identity_texts(val: &Val) -> Vec<String> {
    match val {
        Val::Set(set) => set.iter().cloned().collect(),
        Val::Json(value) => json_identity_texts(value),
        other => other.as_text().into_iter().collect(),
    }
}

/// The identity strings a record value holds: strings, numbers and booleans, alone or in an
/// array.
pub fn json_identity_texts(value: &Value) -> Vec<String> {
    let text = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(_) | Value::Bool(_) => Some(v.to_string()),
        _ => None,
    };
    match value {
        Value::Array(items) => items.iter().filter_map(text).collect(),
        other => text(other).into_iter().collect(),
    }
}

#[derive(Debug, Default)]
struct Profile {
    /// Every identity the profile has been reached by, so a merge can re-point them.
    ids: Vec<(String, String)>,
    fields: BTreeMap<String, FieldValue>,
}

/// All profiles with an index from identity values to profiles.
#[derive(Debug, Default)]
pub struct ProfileStore {
    next_id: u64,
    profiles: HashMap<u64, Profile>,
    /// Identity field → normalized value → profile; two levels so lookups borrow `&str`.
    index: HashMap<String, HashMap<String, u64>>,
}

/// Merges `value` into the profile field `name`, or stores it when the profile has none.
fn merge_field(fields: &mut BTreeMap<String, FieldValue>, name: String, value: FieldValue) {
    match fields.entry(name) {
        std::collections::btree_map::Entry::Vacant(slot) => {
            slot.insert(value);
        }
        std::collections::btree_map::Entry::Occupied(mut slot) => {
            slot.get_mut().merge(value);
        }
    }
}

impl ProfileStore {
    /// Applies one record's update, stitching and merging profiles as its identities demand.
    /// Costs O(update size), plus the size of the smaller profile when two merge.
    pub fn apply(&mut self, update: ProfileUpdate) {
        let Some(profile) = self.stitch(update.ids) else {
            return;
        };
        for (name, value) in update.fields {
            merge_field(&mut profile.fields, name, value);
        }
    }

    /// Applies a record of a stream without queries, identified by `ids`: every non-null field,
    /// `latest` wins. The record is read in place, so a field name is copied only when the
    /// profile does not hold it yet.
    pub fn apply_record(&mut self, ids: Vec<(String, String)>, record: &Map<String, Value>, at_ms: i64) {
        self.apply_record_except(ids, record, at_ms, &[]);
    }

    /// [`Self::apply_record`] for every field but those `declared` (by a stream's queries).
    pub fn apply_record_except(
        &mut self,
        ids: Vec<(String, String)>,
        record: &Map<String, Value>,
        at_ms: i64,
        declared: &[String],
    ) {
        let Some(profile) = self.stitch(ids) else {
            return;
        };
        for (name, value) in record
            .iter()
            .filter(|(n, v)| !v.is_null() && !declared.iter().any(|d| d == *n))
        {
            let incoming = FieldValue {
                val: Val::Json(value.clone()),
                op: MergeOp::Latest,
                at_ms,
            };
            match profile.fields.get_mut(name.as_str()) {
                Some(held) => held.merge(incoming),
                None => {
                    profile.fields.insert(name.clone(), incoming);
                }
            }
        }
    }

    /// The profile `ids` belong to, created or merged as they demand, with every identity
    /// indexed; `None` without identities.
    fn stitch(&mut self, ids: Vec<(String, String)>) -> Option<&mut Profile> {
        if ids.is_empty() {
            return None;
        }
        let mut found: Vec<u64> = Vec::new();
        for (field, value) in &ids {
            if let Some(id) = self.index.get(field).and_then(|m| m.get(value))
                && !found.contains(id)
            {
                found.push(*id);
            }
        }
        let target = match found.as_slice() {
            [] => {
                self.next_id += 1;
                self.profiles.insert(self.next_id, Profile::default());
                self.next_id
            }
            [one] => *one,
            many => self.merge_profiles(many),
        };
        let profile = self.profiles.get_mut(&target)?;
        for (field, value) in ids {
            let by_value = self.index.entry(field.clone()).or_default();
            if let Entry::Vacant(slot) = by_value.entry(value.clone()) {
                slot.insert(target);
                profile.ids.push((field, value));
            }
        }
        Some(profile)
    }

    /// Merges the given profiles into the one with the most identities and returns its id.
    fn merge_profiles(&mut self, ids: &[u64]) -> u64 {
        let target = ids
            .iter()
            .copied()
            .max_by_key(|id| self.profiles.get(id).map_or(0, |p| p.ids.len()))
            .unwrap_or(ids[0]);
        for &other in ids.iter().filter(|&&id| id != target) {
            let Some(absorbed) = self.profiles.remove(&other) else {
                continue;
            };
            for (field, value) in &absorbed.ids {
                if let Some(slot) = self.index.get_mut(field).and_then(|m| m.get_mut(value.as_str())) {
                    *slot = target;
                }
            }
            let Some(profile) = self.profiles.get_mut(&target) else {
                continue;
            };
            profile.ids.extend(absorbed.ids);
            for (name, value) in absorbed.fields {
                merge_field(&mut profile.fields, name, value);
            }
        }
        target
    }

    /// Finds a profile by an identity value, or else by any field holding exactly `value`,
    /// and renders it.
    pub fn find(&self, field: &str, value: &str) -> Option<Map<String, Value>> {
        let by_identity = normalize_identity(field, value)
            .and_then(|v| self.index.get(field)?.get(&v).copied())
            .and_then(|id| self.profiles.get(&id));
        let profile = by_identity.or_else(|| {
            // A linear scan is fine here: it is a convenience for non-identity fields only.
            self.profiles.values().find(|p| {
                p.fields
                    .get(field)
                    .and_then(|f| f.val.as_text())
                    .is_some_and(|text| text == value)
            })
        })?;
        Some(
            profile
                .fields
                .iter()
                .map(|(name, f)| (name.clone(), f.val.to_json()))
                .collect(),
        )
    }

    /// How many distinct profiles exist.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.profiles.len()
    }
}

#[cfg(test)]
#[allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test should fail loudly at the broken step"
)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fv(val: Val, op: MergeOp, at_ms: i64) -> FieldValue {
        FieldValue { val, op, at_ms }
    }

    fn update(ids: &[(&str, &str)], fields: Vec<(&str, FieldValue)>) -> ProfileUpdate {
        ProfileUpdate {
            ids: ids.iter().map(|(f, v)| (f.to_string(), v.to_string())).collect(),
            fields: fields.into_iter().map(|(n, v)| (n.to_string(), v)).collect(),
        }
    }

    fn merged(a: FieldValue, b: FieldValue) -> Val {
        let mut a = a;
        a.merge(b);
        a.val
    }

    #[test]
    fn latest_and_oldest_follow_event_time_not_arrival() {
        let old = || fv(Val::Str("old".into()), MergeOp::Latest, 10);
        let new = || fv(Val::Str("new".into()), MergeOp::Latest, 20);
        assert_eq!(merged(new(), old()), Val::Str("new".into()));
        assert_eq!(merged(old(), new()), Val::Str("new".into()));
        let old = fv(Val::Str("old".into()), MergeOp::Oldest, 10);
        let new = fv(Val::Str("new".into()), MergeOp::Oldest, 20);
        assert_eq!(merged(new.clone(), old.clone()), Val::Str("old".into()));
        assert_eq!(merged(old, new), Val::Str("old".into()));
    }

    #[test]
    fn sum_count_max_min_and_merge_combine_values() {
        assert_eq!(
            merged(
                fv(Val::Int(2), MergeOp::Count, 1),
                fv(Val::Int(1), MergeOp::Count, 0)
            ),
            Val::Int(3)
        );
        assert_eq!(
            merged(
                fv(Val::Num(1.5), MergeOp::Sum, 1),
                fv(Val::Int(2), MergeOp::Sum, 2)
            ),
            Val::Num(3.5)
        );
        assert_eq!(
            merged(
                fv(Val::Date(50), MergeOp::Max, 99),
                fv(Val::Date(40), MergeOp::Max, 100)
            ),
            Val::Date(50)
        );
        assert_eq!(
            merged(
                fv(Val::Int(5), MergeOp::Min, 1),
                fv(Val::Num(4.5), MergeOp::Min, 0)
            ),
            Val::Num(4.5)
        );
        let set = |items: &[&str]| Val::Set(items.iter().map(|s| s.to_string()).collect());
        assert_eq!(
            merged(
                fv(set(&["b"]), MergeOp::Merge, 1),
                fv(set(&["a", "b"]), MergeOp::Merge, 0)
            ),
            set(&["a", "b"])
        );
        let counts =
            |items: &[(&str, i64)]| Val::Counts(items.iter().map(|(k, v)| (k.to_string(), *v)).collect());
        assert_eq!(
            merged(
                fv(counts(&[("open", 2)]), MergeOp::Merge, 1),
                fv(counts(&[("open", 1), ("click", 1)]), MergeOp::Merge, 0)
            ),
            counts(&[("click", 1), ("open", 3)])
        );
    }

    #[test]
    fn values_an_op_cannot_combine_fall_back_to_latest() {
        assert_eq!(
            merged(
                fv(Val::Str("a".into()), MergeOp::Sum, 1),
                fv(Val::Str("b".into()), MergeOp::Sum, 2)
            ),
            Val::Str("b".into())
        );
    }

    #[test]
    fn records_sharing_an_identity_land_in_one_profile_and_links_merge_profiles() {
        let mut store = ProfileStore::default();
        let name = |n: &str, at| ("name", fv(Val::Str(n.into()), MergeOp::Latest, at));
        store.apply(update(&[("email", "a@x.com")], vec![name("by-email", 10)]));
        store.apply(update(&[("user_id", "u1")], vec![name("by-user", 5)]));
        assert_eq!(store.len(), 2);
        // This record knows both identities, so the two profiles become one.
        store.apply(update(
            &[("email", "a@x.com"), ("user_id", "u1")],
            vec![("plan", fv(Val::Str("pro".into()), MergeOp::Latest, 7))],
        ));
        assert_eq!(store.len(), 1);
        let by_user = store.find("user_id", "u1").expect("found by user id");
        let by_email = store.find("email", " A@X.com ").expect("found by email");
        assert_eq!(by_user, by_email);
        assert_eq!(by_user["name"], json!("by-email"));
        assert_eq!(by_user["plan"], json!("pro"));
        assert_eq!(store.find("plan", "pro"), Some(by_user));
        assert_eq!(store.find("user_id", "u2"), None);
    }

    #[test]
    fn records_without_identities_update_nothing() {
        let mut store = ProfileStore::default();
        store.apply(update(&[], vec![("x", fv(Val::Int(1), MergeOp::Latest, 0))]));
        assert_eq!(store.len(), 0);
    }

    #[test]
    fn identities_are_trimmed_lowercased_for_email_and_capped() {
        assert_eq!(normalize_identity("email", " A@B.c "), Some("a@b.c".into()));
        assert_eq!(normalize_identity("user_id", "AbC"), Some("AbC".into()));
        assert_eq!(normalize_identity("user_id", "  "), None);
        assert_eq!(normalize_identity("user_id", &"x".repeat(257)), None);
    }

    #[test]
    fn renders_kinds_as_the_entity_api_does() {
        assert_eq!(
            Val::Date(1_613_063_089_000).to_json(),
            json!("2021-02-11T17:04:49Z")
        );
        assert_eq!(Val::Num(3.0).to_json(), json!(3));
        assert_eq!(Val::Num(2.5).to_json(), json!(2.5));
        assert_eq!(
            Val::Set(["b".to_string(), "a".to_string()].into()).to_json(),
            json!(["a", "b"])
        );
    }
}
