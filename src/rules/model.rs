//! Compiled rules and their evaluation.
//!
//! Input: an event document (JSON, or any [`Document`]), the integration's non-secret values,
//! and compiled rules. Output: the Lytics records the rules build, and the records they refused
//! with the reason. Evaluation is a pure function: it does no I/O, reads no clock and never
//! parses a path.

use std::borrow::Cow;
use std::sync::Arc;

use regex::Regex;
use serde_json::Value;

use super::path::{Document, Members, Selector, Val};
use super::record::{Fields, RecordBuilder};
use super::transform::Transform;
use crate::lytics::MAX_BATCH_RECORD_BYTES;

/// Which input a rule reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// Signal canonical events (page, track, identify, …).
    Signal,
    /// Customer.io reporting webhooks.
    CustomerIo,
}

impl Source {
    /// The name used in rule files and APIs.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Signal => "signal",
            Source::CustomerIo => "customerio",
        }
    }

    /// Reads a source name.
    pub fn parse(name: &str) -> Option<Source> {
        match name {
            "signal" => Some(Source::Signal),
            "customerio" => Some(Source::CustomerIo),
            _ => None,
        }
    }
}

/// What a record means to Lytics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// A data-stream event (page views, tracked actions).
    Event,
    /// A user-profile update (identify traits, user fields).
    Profile,
}

impl RecordKind {
    /// The name used in rule files.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Event => "event",
            RecordKind::Profile => "profile",
        }
    }
}

/// How Lytics merges a user field across records (LQL functions and merge ops).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeOp {
    /// The distinct values (`set`).
    Set,
    /// A count per distinct value (`valuect`).
    Count,
    /// The value of the newest record.
    Latest,
    /// The value of the oldest record.
    Oldest,
    /// The largest value.
    Max,
    /// The smallest value.
    Min,
    /// The sum of the values.
    Sum,
}

impl MergeOp {
    /// Every merge op with its rule-file name.
    pub const ALL: &'static [(&'static str, MergeOp)] = &[
        ("set", MergeOp::Set),
        ("count", MergeOp::Count),
        ("latest", MergeOp::Latest),
        ("oldest", MergeOp::Oldest),
        ("max", MergeOp::Max),
        ("min", MergeOp::Min),
        ("sum", MergeOp::Sum),
    ];

    /// The rule-file name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, m)| *m == self)
            .map(|(n, _)| *n)
            .unwrap_or("latest")
    }
}

/// The Lytics kind of a user field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// Text.
    String,
    /// A whole number.
    Int,
    /// A number.
    Number,
    /// A date (the record carries epoch milliseconds or RFC 3339).
    Date,
    /// A boolean.
    Bool,
    /// A set of text values (`[]string`).
    StringSet,
    /// A count per text value (`map[string]intsum`).
    CountMap,
}

impl FieldKind {
    /// False for a value that cannot be a field of this kind: an array or an object where one
    /// value is declared (`string`, `int`, `number`, `date`, `bool`).
    pub fn holds(self, value: &Value) -> bool {
        match self {
            FieldKind::String | FieldKind::Int | FieldKind::Number | FieldKind::Date | FieldKind::Bool => {
                !matches!(value, Value::Array(_) | Value::Object(_))
            }
            FieldKind::StringSet | FieldKind::CountMap => true,
        }
    }

    /// [`FieldKind::holds`], and for `int`, `number` and `bool` a value Lytics can read as one:
    /// `"hello"` or `4.5` is no `int`; a text spelling one (`"42"`, `"true"`) is.
    pub fn reads(self, value: &Value) -> bool {
        match (self, value) {
            (FieldKind::Int, Value::Number(n)) => n.is_i64() || n.is_u64() || n.as_f64().is_some_and(whole),
            (FieldKind::Number, Value::Number(_)) => true,
            (FieldKind::Bool, Value::Bool(_)) => true,
            (FieldKind::Bool, Value::Number(n)) => n.as_u64().is_some_and(|n| n <= 1),
            (FieldKind::Int | FieldKind::Number | FieldKind::Bool, Value::String(s)) => self.reads_text(s),
            (FieldKind::Int | FieldKind::Number | FieldKind::Bool, _) => false,
            _ => self.holds(value),
        }
    }

    /// [`FieldKind::reads`] for a text.
    pub fn reads_text(self, text: &str) -> bool {
        let t = text.trim();
        match self {
            FieldKind::Int => t.parse::<i64>().is_ok() || t.parse::<f64>().is_ok_and(whole),
            FieldKind::Number => t.parse::<f64>().is_ok_and(f64::is_finite),
            FieldKind::Bool => ["true", "false", "1", "0"]
                .iter()
                .any(|b| t.eq_ignore_ascii_case(b)),
            _ => true,
        }
    }

    /// Every kind with its name in rule files and LQL.
    pub const ALL: &'static [(&'static str, FieldKind)] = &[
        ("string", FieldKind::String),
        ("int", FieldKind::Int),
        ("number", FieldKind::Number),
        ("date", FieldKind::Date),
        ("bool", FieldKind::Bool),
        ("[]string", FieldKind::StringSet),
        ("map[string]intsum", FieldKind::CountMap),
    ];

    /// The LQL name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, k)| *k == self)
            .map(|(n, _)| *n)
            .unwrap_or("string")
    }
}

/// A whole number within an `int`'s range.
fn whole(f: f64) -> bool {
    f.fract() == 0.0 && (-9.2e18..=9.2e18).contains(&f)
}

/// The integration values a rule may read with `config:`. The API token is deliberately not
/// here: rules never see secrets.
#[derive(Debug, Clone, Default)]
pub struct IntegrationContext {
    /// The integration's id.
    pub integration_id: String,
    /// The integration's display name.
    pub integration_name: String,
    /// The Lytics account id.
    pub account_id: String,
    /// The Lytics stream the integration delivers to.
    pub stream_name: String,
}

impl IntegrationContext {
    /// The value of a `config:` key.
    pub fn get(&self, key: ConfigKey) -> &str {
        match key {
            ConfigKey::IntegrationId => &self.integration_id,
            ConfigKey::IntegrationName => &self.integration_name,
            ConfigKey::AccountId => &self.account_id,
            ConfigKey::StreamName => &self.stream_name,
        }
    }
}

/// A key a field can read from the integration's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigKey {
    /// The integration's id.
    IntegrationId,
    /// The integration's name.
    IntegrationName,
    /// The Lytics account id.
    AccountId,
    /// The Lytics stream name.
    StreamName,
}

impl ConfigKey {
    /// Every key with its rule-file name.
    pub const ALL: &'static [(&'static str, ConfigKey)] = &[
        ("integration_id", ConfigKey::IntegrationId),
        ("integration_name", ConfigKey::IntegrationName),
        ("account_id", ConfigKey::AccountId),
        ("stream_name", ConfigKey::StreamName),
    ];
}

/// One piece of a template: literal text or a value reference.
#[derive(Debug, Clone)]
pub enum TemplatePart {
    /// Literal text.
    Text(String),
    /// A path into the input.
    Path(Selector),
    /// An output field computed earlier in the rule.
    Field(Arc<str>),
}

/// Where a field's value comes from.
#[derive(Debug, Clone)]
pub enum ValueSource {
    /// A JSONPath into the input.
    Path(Selector),
    /// A constant.
    Const(Value),
    /// A value of the integration's config.
    Config(ConfigKey),
    /// Text with `{…}` references; yields nothing if any reference is missing.
    Template(Vec<TemplatePart>),
}

/// A condition's subject.
#[derive(Debug, Clone)]
pub enum Subject {
    /// A JSONPath into the input.
    Input(Selector),
    /// An output field computed earlier in the rule.
    Field(Arc<str>),
}

/// A test on one value.
#[derive(Debug, Clone)]
pub enum Test {
    /// Equal to this value (scalars compare by their text, so `123` equals `"123"`).
    Equals(Value),
    /// Equal to one of these.
    In(Vec<Value>),
    /// Present (`true`) or absent (`false`).
    Exists(bool),
    /// Text matching a regular expression.
    Matches(Regex),
}

/// A compiled condition.
#[derive(Debug, Clone)]
pub enum Condition {
    /// Every condition holds.
    All(Vec<Condition>),
    /// At least one holds.
    Any(Vec<Condition>),
    /// The condition does not hold.
    Not(Box<Condition>),
    /// A test on a subject.
    Check(Subject, Test),
}

/// One output field of a rule.
#[derive(Debug, Clone)]
pub struct FieldRule {
    /// The output key.
    pub name: Arc<str>,
    /// The alternatives, tried in order; the first that yields a value wins.
    pub sources: Vec<ValueSource>,
    /// Used when no source yields a value.
    pub default: Option<Value>,
    /// Without a value the record is not sent.
    pub required: bool,
    /// Applied in order to the value.
    pub transforms: Vec<Transform>,
    /// The field is set only when this holds.
    pub when: Option<Condition>,
    /// How Lytics merges the field into the user profile.
    pub merge: Option<MergeOp>,
    /// The Lytics kind of the user field.
    pub kind: Option<FieldKind>,
    /// Whether the rule names the kind (else a merge op implies it): a named `int`, `number` or
    /// `bool` also refuses scalars Lytics cannot read as one (see [`FieldKind::reads`]).
    pub kind_declared: bool,
    /// What the field means.
    pub description: Option<String>,
    /// The field is one of the rule's identities: it takes one value (text or a number), never
    /// an array or an object, which would tie several users' profiles together.
    pub identity: bool,
}

/// An object whose members are copied into the record.
#[derive(Debug, Clone)]
pub struct Spread {
    /// Where the object is.
    pub from: Selector,
    /// Put before each copied key.
    pub prefix: String,
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The rule's name.
    pub name: Arc<str>,
    /// The file it came from.
    pub file: Arc<str>,
    /// What it does.
    pub description: Option<String>,
    /// What the record means.
    pub kind: RecordKind,
    /// When the rule applies.
    pub when: Option<Condition>,
    /// A fixed stream, or the integration's when `None`.
    pub stream: Option<Arc<str>>,
    /// The output field holding the event time.
    pub timestamp_field: Arc<str>,
    /// The output fields that identify a user.
    pub identity: Arc<[Arc<str>]>,
    /// Objects copied into the record before the fields; explicit fields win on a clash.
    pub flatten: Vec<Spread>,
    /// The fields, evaluated in order.
    pub fields: Vec<FieldRule>,
}

/// A record a rule built, borrowing from the event and the rule set it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct MappedRecord<'a> {
    /// The rule that built it.
    pub rule: Arc<str>,
    /// What it means to Lytics.
    pub kind: RecordKind,
    /// The Lytics stream it goes to.
    pub stream: Arc<str>,
    /// The field holding its event time (the collect call's `timestamp_field`).
    pub timestamp_field: Arc<str>,
    /// The flat record.
    pub fields: Fields<'a>,
    /// The record as compact JSON, as it is queued and sent (at most
    /// [`MAX_BATCH_RECORD_BYTES`]).
    pub body: bytes::Bytes,
}

/// A record a rule built but refused to send.
#[derive(Debug, Clone, PartialEq)]
pub struct DroppedRecord {
    /// The rule; empty when no rule ran because the sender's `integrations` switches kept the
    /// event from the integration (ingest's note, not a refusal).
    pub rule: Arc<str>,
    /// Why, with a hint.
    pub reason: String,
    /// The integration it was built for, when an event went to several: set by ingest (the
    /// rules do not know it).
    pub integration: Option<Arc<str>>,
}

/// How one output field got its value, for dry runs.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldExplanation {
    /// The rule.
    pub rule: Arc<str>,
    /// The output field.
    pub field: String,
    /// What produced the value: a path, `value`, `config: key`, a template, `default`, or
    /// `flatten $.path`.
    pub source: String,
    /// The transforms applied.
    pub transforms: Vec<&'static str>,
}

/// A path that selected nothing, for dry runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Unmatched {
    /// The rule.
    pub rule: Arc<str>,
    /// The output field (empty for `flatten` and `when` paths).
    pub field: String,
    /// The path.
    pub path: String,
}

/// Collects explanations while evaluating; only dry runs pay for it.
#[derive(Debug, Default)]
pub struct Explain {
    /// Where each output field came from.
    pub fields: Vec<FieldExplanation>,
    /// Paths that matched nothing.
    pub unmatched: Vec<Unmatched>,
    /// Rules whose `when` did not hold, each with the test that failed.
    pub skipped_rules: Vec<SkippedRule>,
}

/// A rule whose `when` did not hold.
#[derive(Debug, Clone)]
pub struct SkippedRule {
    /// The rule.
    pub rule: Arc<str>,
    /// The test that failed and the value it saw (see [`Condition::why_not`]).
    pub reason: String,
}

impl Rule {
    /// Builds this rule's record from `doc`, or `None` when the rule does not apply.
    pub fn apply<'a, D: Document + ?Sized>(
        &'a self,
        doc: &'a D,
        ctx: &IntegrationContext,
        mut explain: Option<&mut Explain>,
    ) -> Option<Result<MappedRecord<'a>, DroppedRecord>> {
        if let Some(when) = &self.when
            && !when.holds(doc, &RecordBuilder::default())
        {
            if let Some(e) = explain.as_deref_mut() {
                e.skipped_rules.push(SkippedRule {
                    rule: self.name.clone(),
                    reason: when.why_not(doc, &RecordBuilder::default()).unwrap_or_default(),
                });
            }
            return None;
        }
        let mut out = RecordBuilder::with_capacity(self.fields.len() + 16);
        // Optional fields whose value the definition refused: `flatten` must not bring the
        // refused value back in under the same key.
        let mut refused: Vec<&str> = Vec::new();
        for field in &self.fields {
            if let Some(w) = &field.when
                && !w.holds(doc, &out)
            {
                continue;
            }
            match self.field_value(field, doc, ctx, &out, explain.as_deref_mut()) {
                Ok(Some(value)) => out.set(Cow::Borrowed(&*field.name), value, true),
                Ok(None) if field.required => {
                    return Some(Err(self.drop(format!(
                        "required field `{}` has no value ({})",
                        field.name,
                        describe_sources(&field.sources)
                    ))));
                }
                Ok(None) => {}
                Err(problem) if field.required => {
                    return Some(Err(
                        self.drop(format!("required field `{}`: {problem}", field.name))
                    ));
                }
                // An optional field whose transform cannot read the input is left out.
                Err(_) => refused.push(&field.name),
            }
        }
        // Identities come only from the rule's own fields (and `_uid` only from a real Lytics
        // cookie id the rule maps): a flattened `properties.user_id` must not tie an anonymous
        // visitor to someone's profile.
        let skip =
            |key: &str| key == "_uid" || self.identity.iter().any(|i| **i == *key) || refused.contains(&key);
        for spread in &self.flatten {
            let found = match spread
                .from
                .spread_in(doc, &spread.prefix, &mut |k, v| out.set_unless(k, v, &skip))
            {
                Members::Spread => Some(None),
                Members::Value(v) => v.map(Some),
            };
            match found {
                Some(v) => {
                    // Only an object has members to copy: anything else copies nothing.
                    let not_object = v.as_ref().filter(|v| !v.is_object());
                    if let Some(e) = explain.as_deref_mut() {
                        let path = spread.from.text();
                        e.fields.push(FieldExplanation {
                            rule: self.name.clone(),
                            field: format!("{}*", spread.prefix),
                            source: match not_object {
                                Some(v) => format!(
                                    "flatten {path}: {}, not an object, so nothing is copied",
                                    crate::rules::transform::describe(v)
                                ),
                                None => format!("flatten {path}"),
                            },
                            transforms: Vec::new(),
                        });
                    }
                    if let Some(v) = v.filter(|v| v.is_object()) {
                        spread_into(&spread.prefix, v, &mut out, &skip);
                    }
                }
                None => {
                    if let Some(e) = explain.as_deref_mut() {
                        e.unmatched.push(Unmatched {
                            rule: self.name.clone(),
                            field: String::new(),
                            path: spread.from.text().to_string(),
                        });
                    }
                }
            }
        }
        let out = out.finish();
        let identified = self.identity.is_empty()
            || self
                .identity
                .iter()
                .any(|id| out.val(id).is_some_and(|v| has_content_val(v) && !too_long(v)));
        if !identified {
            let too_long: Vec<String> = self
                .identity
                .iter()
                .filter_map(|id| {
                    let text = out.val(id).and_then(Val::as_str).map(str::trim)?;
                    (text.len() > MAX_IDENTITY_BYTES).then(|| format!("`{id}` is {} bytes", text.len()))
                })
                .collect();
            if !too_long.is_empty() {
                return Some(Err(self.drop(format!(
                    "identifier too long: {}; Lytics ignores identity values over \
                     {MAX_IDENTITY_BYTES} bytes, so it cannot stitch the record to a user (events \
                     received but user not created); send a shorter identifier",
                    too_long.join(", ")
                ))));
            }
            let ids: Vec<String> = self.identity.iter().map(|i| format!("`{i}`")).collect();
            return Some(Err(self.drop(format!(
                "missing identifiers: the record has none of {}, so Lytics cannot stitch it to a \
                 user (events received but user not created); include at least one identifier \
                 such as an email or user id",
                ids.join(", ")
            ))));
        }
        // Lytics refuses a whole collect call over one oversized record: refused here, so a dry
        // run and a rule test see what ingest does.
        let body = crate::normalize::record_bytes(&out);
        if body.len() > MAX_BATCH_RECORD_BYTES {
            return Some(Err(self.drop(format!(
                "the record is {} bytes, over Lytics' {MAX_BATCH_RECORD_BYTES}-byte record limit; map fewer fields",
                body.len()
            ))));
        }
        let stream = self
            .stream
            .clone()
            .unwrap_or_else(|| Arc::from(ctx.stream_name.as_str()));
        Some(Ok(MappedRecord {
            rule: self.name.clone(),
            kind: self.kind,
            stream,
            timestamp_field: self.timestamp_field.clone(),
            fields: out,
            body,
        }))
    }

    fn drop(&self, reason: String) -> DroppedRecord {
        DroppedRecord {
            rule: self.name.clone(),
            reason,
            integration: None,
        }
    }

    fn field_value<'a, D: Document + ?Sized>(
        &self,
        field: &'a FieldRule,
        doc: &'a D,
        ctx: &IntegrationContext,
        out: &RecordBuilder<'a>,
        mut explain: Option<&mut Explain>,
    ) -> Result<Option<Val<'a>>, String> {
        // The first alternative with a value its transforms and kind accept; one they refuse
        // counts as missing, and the next is tried.
        let mut refusal: Option<String> = None;
        for source in &field.sources {
            let value = match source {
                ValueSource::Path(p) => {
                    let v = p.val_in(doc);
                    if v.is_none()
                        && let Some(e) = explain.as_deref_mut()
                    {
                        e.unmatched.push(Unmatched {
                            rule: self.name.clone(),
                            field: field.name.to_string(),
                            path: p.text().to_string(),
                        });
                    }
                    v
                }
                ValueSource::Const(v) => Some(Val::Json(Cow::Borrowed(v))),
                ValueSource::Config(k) => Some(ctx.get(*k))
                    .filter(|s| !s.is_empty())
                    .map(|s| Val::Json(Cow::Owned(Value::from(s)))),
                ValueSource::Template(parts) => {
                    render(parts, doc, out).map(|t| Val::Json(Cow::Owned(Value::String(t))))
                }
            };
            if let Some(v) = value {
                match Self::finish_value(field, v) {
                    Ok(v) => return Ok(Some(self.explained(field, v, Some(source), explain))),
                    Err(why) => {
                        refusal.get_or_insert(why);
                    }
                }
            }
        }
        if let Some(d) = &field.default {
            return Self::finish_value(field, Val::Json(Cow::Borrowed(d)))
                .map(|v| Some(self.explained(field, v, None, explain)));
        }
        match refusal {
            Some(why) => Err(why),
            None => Ok(None),
        }
    }

    /// Applies a field's transforms and checks its kind.
    #[inline]
    fn finish_value<'a>(field: &FieldRule, value: Val<'a>) -> Result<Val<'a>, String> {
        // A text with nothing to apply stays borrowed: it is no container, so it can be an
        // identity, and it fits every kind but a named `int`, `number` or `bool` it does not spell.
        if let Val::Text(text) = &value
            && field.transforms.is_empty()
            && field
                .kind
                .is_none_or(|k| !field.kind_declared || k.reads_text(text))
        {
            return Ok(value);
        }
        let value = value.into_json();
        let value = if field.transforms.is_empty() {
            value
        } else {
            Cow::Owned(
                field
                    .transforms
                    .iter()
                    .try_fold(value.into_owned(), |v, t| t.apply(v))?,
            )
        };
        if field.identity && matches!(&*value, Value::Array(_) | Value::Object(_)) {
            return Err(format!(
                "{} cannot be an identity: an identity is one value, and several would tie \
                 different users' profiles together",
                crate::rules::transform::describe(&value)
            ));
        }
        if let Some(kind) = field.kind
            && !(if field.kind_declared {
                kind.reads(&value)
            } else {
                kind.holds(&value)
            })
        {
            return Err(format!(
                "{} does not fit `kind: {}`",
                crate::rules::transform::describe(&value),
                kind.name()
            ));
        }
        Ok(Val::Json(value))
    }

    /// Notes, on a dry run, where a field's value came from; hands the value back.
    #[inline]
    fn explained<'a>(
        &self,
        field: &FieldRule,
        value: Val<'a>,
        source: Option<&ValueSource>,
        explain: Option<&mut Explain>,
    ) -> Val<'a> {
        if let Some(e) = explain {
            e.fields.push(FieldExplanation {
                rule: self.name.clone(),
                field: field.name.to_string(),
                // Labels are built only for dry runs: live evaluation never pays for them.
                source: source.map(source_label).unwrap_or_else(|| "default".to_string()),
                transforms: field.transforms.iter().map(|t| t.name()).collect(),
            });
        }
        value
    }
}

/// Copies an object's members into the record as `<prefix><key>`, flattened, except the
/// flattened keys `skip` names; keys already in the record win. Anything but an object copies
/// nothing (the caller explains it on a dry run).
fn spread_into<'a>(
    prefix: &'a str,
    value: Cow<'a, Value>,
    out: &mut RecordBuilder<'a>,
    skip: &impl Fn(&str) -> bool,
) {
    let key = |k: Cow<'a, str>| {
        if prefix.is_empty() {
            k
        } else {
            Cow::Owned(format!("{prefix}{k}"))
        }
    };
    match value {
        Cow::Borrowed(Value::Object(members)) => {
            for (k, v) in members {
                out.set_unless(key(Cow::Borrowed(k.as_str())), Val::Json(Cow::Borrowed(v)), skip);
            }
        }
        Cow::Owned(Value::Object(members)) => {
            for (k, v) in members {
                out.set_unless(key(Cow::Owned(k)), Val::Json(Cow::Owned(v)), skip);
            }
        }
        // The caller hands over objects only.
        _ => {}
    }
}

fn source_label(source: &ValueSource) -> String {
    match source {
        ValueSource::Path(p) => p.text().to_string(),
        ValueSource::Const(v) => format!("value {v}"),
        ValueSource::Config(k) => {
            let name = ConfigKey::ALL
                .iter()
                .find(|(_, c)| c == k)
                .map(|(n, _)| *n)
                .unwrap_or("?");
            format!("config {name}")
        }
        ValueSource::Template(parts) => {
            let text: String = parts
                .iter()
                .map(|p| match p {
                    TemplatePart::Text(t) => t.replace('{', "{{").replace('}', "}}"),
                    TemplatePart::Path(s) => format!("{{{}}}", s.text()),
                    TemplatePart::Field(f) => format!("{{{f}}}"),
                })
                .collect();
            format!("template \"{text}\"")
        }
    }
}

fn describe_sources(sources: &[ValueSource]) -> String {
    let labels: Vec<String> = sources.iter().map(source_label).collect();
    if labels.is_empty() {
        "no source".to_string()
    } else {
        format!("tried {}", labels.join(", "))
    }
}

fn render<D: Document + ?Sized>(parts: &[TemplatePart], doc: &D, out: &RecordBuilder<'_>) -> Option<String> {
    let mut text = String::new();
    for part in parts {
        let value = match part {
            TemplatePart::Text(t) => {
                text.push_str(t);
                continue;
            }
            TemplatePart::Path(p) => p.get_in(doc)?,
            TemplatePart::Field(f) => out.get(f)?,
        };
        match &*value {
            Value::String(s) => text.push_str(s),
            Value::Null => return None,
            other => text.push_str(&other.to_string()),
        }
    }
    Some(text)
}

/// The longest identity value (in bytes, once trimmed) Lytics stitches profiles by.
pub const MAX_IDENTITY_BYTES: usize = 256;

/// A text identity value Lytics would ignore for its length.
fn too_long(value: &Val<'_>) -> bool {
    value
        .as_str()
        .is_some_and(|s| s.trim().len() > MAX_IDENTITY_BYTES)
}

/// [`has_content`], for a value as a record holds it.
fn has_content_val(value: &Val<'_>) -> bool {
    match value {
        Val::Text(s) => !s.trim().is_empty(),
        Val::Json(v) => has_content(v),
    }
}

/// True when a value carries something: not null, not empty text, not an empty array.
fn has_content(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::String(s) => !s.trim().is_empty(),
        Value::Array(a) => !a.is_empty(),
        _ => true,
    }
}

impl Condition {
    /// Evaluates the condition over the input and the fields computed so far.
    pub fn holds<D: Document + ?Sized>(&self, doc: &D, out: &RecordBuilder<'_>) -> bool {
        match self {
            Condition::All(cs) => cs.iter().all(|c| c.holds(doc, out)),
            Condition::Any(cs) => cs.iter().any(|c| c.holds(doc, out)),
            Condition::Not(c) => !c.holds(doc, out),
            Condition::Check(subject, test) => {
                let value = match subject {
                    Subject::Input(p) => p.get_in(doc),
                    Subject::Field(f) => out.get(f).filter(|v| !v.is_null()),
                };
                test.holds(value.as_deref())
            }
        }
    }
}

impl Condition {
    /// Why the condition does not hold for `doc`, for a person reading a dry run or a failed
    /// test case: the first failing test of an `all`, every one of an `any`, each with the value
    /// it saw. `None` when the condition holds.
    pub fn why_not<D: Document + ?Sized>(&self, doc: &D, out: &RecordBuilder<'_>) -> Option<String> {
        match self {
            Condition::All(cs) => cs.iter().find_map(|c| c.why_not(doc, out)),
            Condition::Any(cs) => {
                let each: Option<Vec<String>> = cs.iter().map(|c| c.why_not(doc, out)).collect();
                each.map(|each| format!("none of `any` holds ({})", each.join("; ")))
            }
            Condition::Not(c) => match c.why_not(doc, out) {
                Some(_) => None,
                None => Some(match &**c {
                    Condition::Check(subject, _) => {
                        let (name, value) = subject.seen(doc, out);
                        format!(
                            "`{name}` is {} (under `not`, or a `not_…` test)",
                            shown(value.as_deref())
                        )
                    }
                    _ => "the condition under `not` holds".to_string(),
                }),
            },
            Condition::Check(subject, test) => {
                let (name, value) = subject.seen(doc, out);
                if test.holds(value.as_deref()) {
                    return None;
                }
                let seen = shown(value.as_deref());
                Some(match test {
                    Test::Exists(true) => format!("`{name}` is {seen}, not present (`exists: true`)"),
                    Test::Exists(false) => format!("`{name}` is {seen} (`exists: false`)"),
                    Test::Equals(want) => format!("`{name}` is {seen}, not {}", shown(Some(want))),
                    Test::In(options) => format!(
                        "`{name}` is {seen}, none of {}",
                        shown(Some(&Value::Array(options.clone())))
                    ),
                    Test::Matches(re) => {
                        format!("`{name}` is {seen}, which does not match `{}`", re.as_str())
                    }
                })
            }
        }
    }
}

impl Subject {
    /// The subject's name as written, and its value.
    fn seen<'a, D: Document + ?Sized>(
        &'a self,
        doc: &'a D,
        out: &'a RecordBuilder<'_>,
    ) -> (&'a str, Option<Cow<'a, Value>>) {
        match self {
            Subject::Input(p) => (p.text(), p.get_in(doc)),
            Subject::Field(f) => (f, out.get(f).filter(|v| !v.is_null())),
        }
    }
}

/// A value as an explanation shows it: JSON, cut short past 80 characters.
fn shown(value: Option<&Value>) -> String {
    let Some(value) = value else {
        return "missing".to_string();
    };
    let text = value.to_string();
    match text.char_indices().nth(80) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}

impl Test {
    fn holds(&self, value: Option<&Value>) -> bool {
        match (self, value) {
            (Test::Exists(want), v) => v.is_some_and(has_content) == *want,
            (_, None) => false,
            (Test::Equals(expected), Some(v)) => loose_eq(expected, v),
            (Test::In(options), Some(v)) => options.iter().any(|o| loose_eq(o, v)),
            (Test::Matches(re), Some(Value::String(s))) => re.is_match(s),
            (Test::Matches(re), Some(v @ (Value::Number(_) | Value::Bool(_)))) => re.is_match(&v.to_string()),
            (Test::Matches(_), Some(_)) => false,
        }
    }
}

/// Scalars compare by their text so that YAML's `123` matches JSON's `"123"`; other values
/// compare structurally.
fn loose_eq(expected: &Value, actual: &Value) -> bool {
    match (expected, actual) {
        (Value::String(a), Value::String(b)) => a == b,
        (a @ (Value::String(_) | Value::Number(_) | Value::Bool(_)), b)
            if matches!(b, Value::String(_) | Value::Number(_) | Value::Bool(_)) =>
        {
            scalar_text(a) == scalar_text(b)
        }
        (a, b) => a == b,
    }
}

fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
