//! Compiled JSONPath selectors.
//!
//! Input: a JSONPath text from a rule file. Output: a [`Selector`] parsed once, at load time, that
//! selects values from an event document. Plain singular paths (`$.a.b`, `$['a'][0]`) are walked
//! directly over pre-split keys; anything else (wildcards, filters, slices, `..`) is handed to
//! jsonpath-rust. This module never parses a path while an event is being evaluated.

use std::borrow::Cow;
use std::sync::Arc;

use jsonpath_rust::parser::model::{JpQuery, Segment, Selector as JpSelector};
use jsonpath_rust::parser::parse_json_path;
use jsonpath_rust::query::js_path_process;
use serde_json::Value;

/// A JSONPath that failed to parse, with the 1-based column inside the path when known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid JSONPath `{path}`{}: {reason}", column.map(|c| format!(" at column {c}")).unwrap_or_default())]
pub struct PathError {
    /// The path as written.
    pub path: String,
    /// The 1-based column of the problem inside the path, when the parser names one.
    pub column: Option<usize>,
    /// What is wrong.
    pub reason: String,
}

/// An event document the rules read: a JSON value, or an event read in place that converts
/// only what a path selects.
pub trait Document {
    /// The value at a plain singular path (member and index steps from the root); `None` when
    /// nothing is there.
    fn at(&self, steps: &[Step]) -> Option<Cow<'_, Value>>;
    /// The whole document, for `$` and general queries.
    fn json(&self) -> &Value;
    /// The value at a plain singular path as a record takes it: a text the document holds as
    /// text may come back borrowed ([`Val::Text`]) instead of as a new JSON string.
    fn val_at(&self, steps: &[Step]) -> Option<Val<'_>> {
        self.at(steps).map(Val::Json)
    }
    /// Spreads the object at a plain singular path without converting it whole: calls `emit`
    /// with each member flattened, exactly as [`flatten`](super::flatten::flatten) flattens the
    /// member's value under `<prefix><key>`, in the order the object's members iterate in
    /// [`at`](Document::at)'s value. A document that does not spread in place (or a path that
    /// holds no object) answers [`Members::Value`] with `at`'s answer and emits nothing.
    fn spread<'a>(
        &'a self,
        steps: &[Step],
        prefix: &'a str,
        emit: &mut dyn FnMut(Cow<'a, str>, Val<'a>),
    ) -> Members<'a> {
        let _ = (prefix, emit);
        Members::Value(self.at(steps))
    }
}

/// A value as a record holds it: JSON, or text borrowed from the event (a gRPC event read in
/// place), which is written as the JSON string it stands for without becoming one first.
#[derive(Debug, Clone)]
pub enum Val<'a> {
    /// A JSON value.
    Json(Cow<'a, Value>),
    /// A JSON string's text.
    Text(&'a str),
}

impl<'a> Val<'a> {
    /// The value as JSON (a text becomes a new string).
    pub fn json(&self) -> Cow<'_, Value> {
        match self {
            Val::Json(v) => Cow::Borrowed(v),
            Val::Text(t) => Cow::Owned(Value::String((*t).to_owned())),
        }
    }

    /// The value as JSON, keeping what it borrows.
    pub fn into_json(self) -> Cow<'a, Value> {
        match self {
            Val::Json(v) => v,
            Val::Text(t) => Cow::Owned(Value::String(t.to_owned())),
        }
    }

    /// The text, when the value is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Val::Json(v) => v.as_str(),
            Val::Text(t) => Some(t),
        }
    }

    /// True for JSON `null`.
    pub fn is_null(&self) -> bool {
        matches!(self, Val::Json(v) if v.is_null())
    }
}

/// Equal when their JSON is: a text equals the JSON string it stands for.
impl PartialEq for Val<'_> {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Val::Text(a), Val::Text(b)) => a == b,
            (Val::Json(a), Val::Json(b)) => a == b,
            (Val::Text(t), Val::Json(v)) | (Val::Json(v), Val::Text(t)) => v.as_str() == Some(*t),
        }
    }
}

/// What [`Document::spread`] did with an object's members.
#[derive(Debug, PartialEq)]
pub enum Members<'a> {
    /// They were handed out.
    Spread,
    /// Nothing was handed out: this is the value at the path, for the caller to spread.
    Value(Option<Cow<'a, Value>>),
}

impl Document for Value {
    fn at(&self, steps: &[Step]) -> Option<Cow<'_, Value>> {
        walk(self, steps).map(Cow::Borrowed)
    }

    fn json(&self) -> &Value {
        self
    }
}

/// One step of a plain singular path.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// An object member.
    Key(Box<str>),
    /// An array element; negative counts from the end, as in RFC 9535.
    Index(i64),
}

#[derive(Debug, Clone)]
enum Plan {
    /// `$` itself.
    Root,
    /// A chain of member and index selectors: at most one value.
    Plain(Box<[Step]>),
    /// A general query: any number of values.
    Query(Box<JpQuery>),
}

/// What a selector found in a document.
#[derive(Debug, PartialEq)]
pub enum Selected<'a> {
    /// Nothing matched.
    Nothing,
    /// A singular path matched one value.
    One(&'a Value),
    /// A general query matched these values (possibly none).
    Many(Vec<&'a Value>),
}

/// A JSONPath compiled once, when rules load.
#[derive(Debug, Clone)]
pub struct Selector {
    text: Arc<str>,
    plan: Plan,
}

impl Selector {
    /// Parses `text` as an RFC 9535 JSONPath.
    pub fn parse(text: &str) -> Result<Self, PathError> {
        check_segments(text)?;
        let query = parse_json_path(text).map_err(|e| path_error(text, &e))?;
        let plan = plan_for(query);
        Ok(Selector {
            text: Arc::from(text),
            plan,
        })
    }

    /// The path as written in the rule file.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// True when the path can select at most one value.
    pub fn is_singular(&self) -> bool {
        !matches!(self.plan, Plan::Query(_))
    }

    /// True when the path is evaluated by the direct key walk rather than by jsonpath-rust.
    pub fn is_fast_path(&self) -> bool {
        self.is_singular()
    }

    /// Spreads the selected object's members, flattened under `prefix` (see
    /// [`Document::spread`]); a query's result, or a value that is not an object, comes back as
    /// [`Selector::value`] selects it, for the caller to spread (an object) or to skip.
    pub fn spread_in<'a, D: Document + ?Sized>(
        &self,
        doc: &'a D,
        prefix: &'a str,
        emit: &mut dyn FnMut(Cow<'a, str>, Val<'a>),
    ) -> Members<'a> {
        match &self.plan {
            Plan::Plain(steps) => match doc.spread(steps, prefix, emit) {
                Members::Value(v) => Members::Value(v.filter(|v| !v.is_null())),
                Members::Spread => Members::Spread,
            },
            _ => Members::Value(self.value(doc.json())),
        }
    }

    /// The selected value as a record field takes it, from any [`Document`]: as
    /// [`Selector::value`] selects it, a text possibly borrowed (see [`Document::val_at`]).
    pub fn val_in<'a, D: Document + ?Sized>(&self, doc: &'a D) -> Option<Val<'a>> {
        match &self.plan {
            Plan::Plain(steps) => doc.val_at(steps).filter(|v| !v.is_null()),
            _ => self.value(doc.json()).map(Val::Json),
        }
    }

    /// The selected value as conditions and templates see it, from any [`Document`]: as
    /// [`Selector::get`].
    pub fn get_in<'a, D: Document + ?Sized>(&self, doc: &'a D) -> Option<Cow<'a, Value>> {
        match &self.plan {
            Plan::Plain(steps) => doc.at(steps).filter(|v| !v.is_null()),
            _ => self.get(doc.json()).map(Cow::Borrowed),
        }
    }

    /// Selects from `doc`.
    pub fn select<'a>(&self, doc: &'a Value) -> Selected<'a> {
        match &self.plan {
            Plan::Root => Selected::One(doc),
            Plan::Plain(steps) => match walk(doc, steps) {
                Some(v) => Selected::One(v),
                None => Selected::Nothing,
            },
            Plan::Query(q) => match js_path_process(q, doc) {
                Ok(found) => Selected::Many(found.into_iter().map(|r| r.val).collect()),
                Err(_) => Selected::Many(Vec::new()),
            },
        }
    }

    /// The selected value as rule fields see it: a singular path gives its value (borrowed), a
    /// query gives an array of its matches; `null` and empty results count as missing.
    pub fn value<'a>(&self, doc: &'a Value) -> Option<Cow<'a, Value>> {
        match self.select(doc) {
            Selected::Nothing | Selected::One(Value::Null) => None,
            Selected::One(v) => Some(Cow::Borrowed(v)),
            Selected::Many(vs) => {
                let vs: Vec<Value> = vs.into_iter().filter(|v| !v.is_null()).cloned().collect();
                (!vs.is_empty()).then_some(Cow::Owned(Value::Array(vs)))
            }
        }
    }

    /// Borrows the selected value when the path is singular; `None` for missing or `null`.
    pub fn get<'a>(&self, doc: &'a Value) -> Option<&'a Value> {
        match self.select(doc) {
            Selected::One(Value::Null) | Selected::Nothing => None,
            Selected::One(v) => Some(v),
            Selected::Many(vs) => vs.into_iter().find(|v| !v.is_null()),
        }
    }
}

/// Checks the outline RFC 9535 gives a query (`$`, then segments, blank space allowed only
/// before a segment): a member-name shorthand holds only name characters, and nothing trails the
/// last segment. jsonpath-rust reads `$.a b` as the member `a b`; this refuses it. What is
/// inside brackets (names, indexes, slices, filters) is left to jsonpath-rust.
fn check_segments(text: &str) -> Result<(), PathError> {
    let fail = |at: usize, reason: &str| PathError {
        path: text.to_string(),
        column: Some(text[..at].chars().count() + 1),
        reason: reason.to_string(),
    };
    let name_first = |c: char| c.is_ascii_alphabetic() || c == '_' || !c.is_ascii();
    let mut chars = text.char_indices().peekable();
    if chars.next().map(|(_, c)| c) != Some('$') {
        // Not a query at all: jsonpath-rust says so.
        return Ok(());
    }
    loop {
        let mut blank = false;
        while chars
            .next_if(|(_, c)| matches!(c, ' ' | '\t' | '\n' | '\r'))
            .is_some()
        {
            blank = true;
        }
        let Some((at, c)) = chars.next() else {
            return if blank {
                Err(fail(text.len(), "blank space after the last segment"))
            } else {
                Ok(())
            };
        };
        match c {
            '.' => {
                // `..` then a name, `*` or a bracket; `.` then a name or `*`.
                let descendant = chars.next_if(|(_, c)| *c == '.').is_some();
                match chars.peek().copied() {
                    Some((_, '*')) => {
                        chars.next();
                    }
                    Some((_, '[')) if descendant => {}
                    Some((_, c)) if name_first(c) => {
                        while chars
                            .next_if(|(_, c)| name_first(*c) || c.is_ascii_digit())
                            .is_some()
                        {}
                    }
                    Some((at, _)) => {
                        return Err(fail(
                            at,
                            "a member name after `.` starts with a letter or `_`; write other names as `['name']`",
                        ));
                    }
                    None => return Err(fail(text.len(), "a member name is missing after `.`")),
                }
            }
            '[' => skip_bracket(&mut chars, at).map_err(|(at, why)| fail(at, why))?,
            _ => {
                return Err(fail(
                    at,
                    "unexpected text after a segment; a member name cannot hold blank space or \
                     punctuation: write it as `['a b']`",
                ));
            }
        }
    }
}

/// Skips a bracketed selection whose `[` (at `open`) was just read, up to its `]`, over nested
/// brackets and quoted strings; when it never closes, where and what is left open.
fn skip_bracket(
    chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>,
    open: usize,
) -> Result<(), (usize, &'static str)> {
    const UNQUOTED: &str = "this quoted name is never closed";
    let mut depth = 1;
    while depth > 0 {
        let Some((at, c)) = chars.next() else {
            return Err((open, "this `[` is never closed"));
        };
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            quote @ ('\'' | '"') => loop {
                match chars.next() {
                    None => return Err((at, UNQUOTED)),
                    Some((_, '\\')) => {
                        chars.next().ok_or((at, UNQUOTED))?;
                    }
                    Some((_, c)) if c == quote => break,
                    _ => {}
                }
            },
            _ => {}
        }
    }
    Ok(())
}

/// What RFC 9535 rule the text at a parse error most likely breaks, for the message.
fn why_unexpected(rest: &str) -> Option<&'static str> {
    let digits = |s: &str| s.chars().take_while(char::is_ascii_digit).count();
    let unsigned = rest.strip_prefix('-').unwrap_or(rest);
    let run = &unsigned[..digits(unsigned)];
    // What follows the digits: `-0.5` and `0e1` are numbers, not indexes.
    let integer = !unsigned[run.len()..].starts_with(['.', 'e', 'E']);
    if integer && rest.starts_with("-0") {
        return Some("an index or slice bound is never `-0` and has no leading zeros");
    }
    if integer && run.len() > 1 && run.starts_with('0') {
        return Some("an index or slice bound has no leading zeros (`01` is written `1`)");
    }
    if integer && run.parse::<u128>().map_or(!run.is_empty(), |n| n > (1 << 53) - 1) {
        return Some("an index or slice bound lies within ±(2^53 − 1)");
    }
    let op = rest.trim_start();
    if ["==", "!=", "<", ">"].iter().any(|o| op.starts_with(o)) {
        return Some("a comparison takes singular queries (`@.x`, `@[0]`), not `*`, `..`, slices or filters");
    }
    if op.starts_with(')') {
        return Some(
            "a function is missing an argument: `match()` and `search()` take two, `length()`, \
             `count()` and `value()` one",
        );
    }
    let word: String = rest.chars().take_while(char::is_ascii_alphabetic).collect();
    let lower = word.to_ascii_lowercase();
    if word != lower && ["null", "true", "false"].contains(&lower.as_str()) {
        return Some("the literals are written in lower case: `null`, `true`, `false`");
    }
    None
}

/// Follows plain steps through a JSON value.
pub fn walk<'a>(doc: &'a Value, steps: &[Step]) -> Option<&'a Value> {
    steps.iter().try_fold(doc, |v, step| match step {
        Step::Key(k) => v.as_object()?.get(&**k),
        Step::Index(i) => {
            let arr = v.as_array()?;
            let idx = if *i < 0 {
                arr.len().checked_sub(usize::try_from(i.unsigned_abs()).ok()?)?
            } else {
                usize::try_from(*i).ok()?
            };
            arr.get(idx)
        }
    })
}

fn plan_for(query: JpQuery) -> Plan {
    if query.segments.is_empty() {
        return Plan::Root;
    }
    let steps: Option<Vec<Step>> = query
        .segments
        .iter()
        .map(|segment| match segment {
            // The parser has already removed the quotes and resolved the escapes (RFC 9535,
            // 2.3.1.2), so the name is the member name itself: stripping quotes again would turn
            // `$["'a'"]` into `$.a`.
            Segment::Selector(JpSelector::Name(name)) => Some(Step::Key(name.as_str().into())),
            Segment::Selector(JpSelector::Index(i)) => Some(Step::Index(*i)),
            _ => None,
        })
        .collect();
    match steps {
        Some(steps) => Plan::Plain(steps.into_boxed_slice()),
        None => Plan::Query(Box::new(query)),
    }
}

fn path_error(text: &str, err: &jsonpath_rust::parser::errors::JsonPathError) -> PathError {
    use jsonpath_rust::parser::errors::JsonPathError as E;
    match err {
        E::PestError(pest) => {
            let column = match pest.line_col {
                pest::error::LineColLocation::Pos((_, c)) => c,
                pest::error::LineColLocation::Span((_, c), _) => c,
            };
            let reason = match &pest.variant {
                pest::error::ErrorVariant::ParsingError { .. } => {
                    let rest: String = text.chars().skip(column.saturating_sub(1)).collect();
                    if rest.is_empty() {
                        "the path ends too early".to_string()
                    } else {
                        match why_unexpected(&rest) {
                            Some(why) => format!("unexpected `{rest}`: {why}"),
                            None => format!("unexpected `{rest}`"),
                        }
                    }
                }
                pest::error::ErrorVariant::CustomError { message } => message.clone(),
            };
            PathError {
                path: text.to_string(),
                column: Some(column),
                reason,
            }
        }
        other => PathError {
            path: text.to_string(),
            column: None,
            reason: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc() -> Value {
        json!({"a": {"b": [1, 2, {"c": "x"}]}, "k y": 5, "n": null})
    }

    #[test]
    fn a_bad_path_says_which_rule_it_breaks() {
        for (path, says) in [
            ("$.a[01]", "no leading zeros"),
            ("$.a[-0]", "never `-0`"),
            ("$.a[9007199254740992]", "within ±(2^53 − 1)"),
            ("$.a[?@.x == NULL]", "lower case"),
            ("$['a", "quoted name is never closed"),
            ("$['a'", "this `[` is never closed"),
            ("$.a[?@.* == 1]", "singular queries"),
            ("$.a[?match(@.x)]", "missing an argument"),
        ] {
            let e = Selector::parse(path).unwrap_err();
            assert!(e.reason.contains(says), "{path}: {}", e.reason);
        }
        // Numbers and literals that are fine where they stand get no such hint.
        assert_eq!(why_unexpected("-0.5]"), None);
        assert_eq!(why_unexpected("0e1]"), None);
        assert_eq!(why_unexpected("9007199254740991]"), None);
        assert_eq!(why_unexpected("true x]"), None);
        assert!(why_unexpected("9007199254740992]").is_some());
    }

    #[test]
    fn plain_paths_take_the_fast_path() {
        for p in ["$.a.b", "$['a']['b'][0]", "$.a.b[-1].c", "$"] {
            assert!(Selector::parse(p).unwrap().is_fast_path(), "{p}");
        }
        for p in ["$.a.*", "$..c", "$.a.b[?@ > 1]", "$.a.b[0:2]", "$.a['b','c']"] {
            assert!(!Selector::parse(p).unwrap().is_fast_path(), "{p}");
        }
    }

    #[test]
    fn text_after_a_segment_is_refused_as_rfc_9535_says() {
        for (p, column) in [
            ("$.a b", 5),
            ("$.context.page.url x", 20),
            ("$.a ", 5),
            ("$.-a", 3),
            ("$.a.", 5),
            ("$['a'", 2),
        ] {
            let e = Selector::parse(p).unwrap_err();
            assert_eq!(e.column, Some(column), "{p}: {e}");
        }
        // Blank space before a segment, inside brackets and filters, and names beyond ASCII are
        // all allowed.
        for p in [
            "$ .a",
            "$.a [0]",
            "$['a b']",
            "$[?@.a == 'x y']",
            "$..[0]",
            "$..a",
            "$.☺_1",
            "$[\"]\"]",
            "$['\\'']",
        ] {
            assert!(Selector::parse(p).is_ok(), "{p}");
        }
    }

    #[test]
    fn fast_path_agrees_with_jsonpath_rust() {
        let d = doc();
        for p in ["$.a.b[1]", "$.a.b[-1].c", "$['k y']", "$.a.b[7]", "$.a.x", "$.n"] {
            let fast = Selector::parse(p).unwrap();
            let slow: Vec<&Value> = jsonpath_rust::query::js_path_vals(p, &d).unwrap();
            match fast.select(&d) {
                Selected::One(v) => assert_eq!(vec![v], slow, "{p}"),
                Selected::Nothing => assert!(slow.is_empty(), "{p}"),
                Selected::Many(_) => panic!("{p} should be singular"),
            }
        }
    }

    #[test]
    fn names_that_look_quoted_are_member_names() {
        let d = json!({"'a'": 1, "a": 2, "\"\"": 3, "": 4, "a'b": 5, "\\": 6, "☺": 7});
        for (p, want) in [
            (r#"$["'a'"]"#, json!(1)),
            (r#"$['\'a\'']"#, json!(1)),
            (r#"$['""']"#, json!(3)),
            (r#"$['']"#, json!(4)),
            (r#"$['a\'b']"#, json!(5)),
            (r#"$['\\']"#, json!(6)),
            (r#"$["\u263A"]"#, json!(7)),
            ("$['a']", json!(2)),
        ] {
            let selector = Selector::parse(p).unwrap();
            assert!(selector.is_fast_path(), "{p}");
            assert_eq!(selector.select(&d), Selected::One(&want), "{p}");
            let slow: Vec<&Value> = jsonpath_rust::query::js_path_vals(p, &d).unwrap();
            assert_eq!(slow, vec![&want], "{p}");
        }
    }

    #[test]
    fn paths_outside_rfc_9535_are_rejected() {
        for p in [
            "$[-0]",
            "$[01]",
            "$.a[-01]",
            "$[9007199254740992]",
            "$['a'",
            "$.a.",
            "$[\"\\x\"]",
        ] {
            assert!(Selector::parse(p).is_err(), "{p}");
        }
    }

    #[test]
    fn queries_return_arrays_and_null_is_missing() {
        let d = doc();
        let q = Selector::parse("$.a.b[0:2]").unwrap();
        assert_eq!(q.value(&d).as_deref(), Some(&json!([1, 2])));
        assert_eq!(Selector::parse("$.n").unwrap().value(&d), None);
        assert_eq!(Selector::parse("$.zz[*]").unwrap().value(&d), None);
    }

    #[test]
    fn invalid_paths_name_the_column() {
        let err = Selector::parse("$.a[?").unwrap_err();
        assert_eq!(err.path, "$.a[?");
        assert!(err.column.is_some());
        let err = Selector::parse("a.b").unwrap_err();
        assert_eq!(err.column, Some(1));
    }
}
