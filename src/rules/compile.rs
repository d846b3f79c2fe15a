//! Turns rule-file YAML into compiled rules, reporting every problem at once.
//!
//! Input: a file name and its text. Output: compiled [`Rule`]s, or a list of [`RuleProblem`]s,
//! each with file, line and column, rule name, the offending text and a fix hint. Every JSONPath
//! is parsed here, once. This module never evaluates a rule.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use regex::Regex;
use serde_json::Value;
use serde_yaml::Value as Yaml;

use super::model::{
    Condition, ConfigKey, FieldKind, FieldRule, MergeOp, RecordKind, Rule, Source, Spread, Subject,
    TemplatePart, Test, ValueSource,
};
use super::path::Selector;
use super::spec::{RuleFileSpec, RuleSpec, TestCaseSpec};
use super::transform::Transform;

/// The event-time field when a file names none.
pub const DEFAULT_TIMESTAMP_FIELD: &str = "_ts";

/// One problem in a rule file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleProblem {
    /// The file.
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// The rule, when the problem is inside one.
    pub rule: Option<String>,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub hint: Option<String>,
}

impl fmt::Display for RuleProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        write!(f, ": ")?;
        if let Some(rule) = &self.rule {
            write!(f, "rule `{rule}`: ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

/// A compiled rule file.
#[derive(Debug, Clone)]
pub struct CompiledFile {
    /// The file name.
    pub file: Arc<str>,
    /// The input its rules read.
    pub source: Source,
    /// The LQL alias for its user fields.
    pub alias: Option<String>,
    /// Its fixed stream, if any.
    pub stream: Option<String>,
    /// Its rules, in order.
    pub rules: Vec<Rule>,
}

/// Compiles one file's text. `file` names it in problems.
pub fn compile_file(file: &str, text: &str) -> Result<(CompiledFile, RuleFileSpec), Vec<RuleProblem>> {
    let mut spec: RuleFileSpec =
        serde_yaml::from_str(text).map_err(|e| vec![yaml_problem(file, text, &e)])?;
    let mut c = Compiler {
        file: Arc::from(file),
        text,
        problems: Vec::new(),
        rule_lines: rule_lines(text).filter(|lines| lines.len() == spec.rules.len()),
        rules_end: list_end(text, "rules:"),
        anchor: None,
        field_anchor: None,
        field_name: None,
    };
    let source = match Source::parse(&spec.source) {
        Some(s) => Some(s),
        None => {
            c.problem(
                None,
                &spec.source,
                format!("unknown source `{}`", spec.source),
                Some("use `signal` or `customerio`".to_string()),
            );
            None
        }
    };
    let ts_field: Arc<str> = Arc::from(spec.timestamp_field.as_deref().unwrap_or(DEFAULT_TIMESTAMP_FIELD));
    let file_identity = spec.identity.clone().unwrap_or_default();
    for key in spec.unknown.keys() {
        c.problem(
            None,
            &format!("{key}:"),
            format!("unknown key `{key}` in the file"),
            Some(suggest(key, super::spec::FILE_KEYS)),
        );
    }
    let mut names = HashSet::new();
    let mut rules = Vec::new();
    for (i, raw) in std::mem::take(&mut spec.rules).into_iter().enumerate() {
        // Problems of this rule are looked for from its own first line: two rules of one name
        // (or a field name met earlier in the file) are told apart.
        c.anchor = c.rule_lines.as_ref().and_then(|lines| lines.get(i)).copied();
        let rule = match serde_yaml::from_value::<RuleSpec>(raw) {
            Ok(rule) => rule,
            Err(e) => {
                let problem = c.rule_shape_problem(i, &e);
                c.problems.push(problem);
                continue;
            }
        };
        let rule = &rule;
        if !names.insert(rule.name.clone()) {
            c.problem(
                Some(&rule.name),
                &format!("name: {}", rule.name),
                format!("two rules are named `{}`", rule.name),
                Some("give every rule a unique name".to_string()),
            );
        }
        if let Some(r) = c.rule(rule, spec.stream.as_deref(), &ts_field, &file_identity) {
            rules.push(r);
        }
    }
    c.anchor = None;
    // Each case is located by its own list item (its name may also be a rule's, or any text),
    // and a misspelt key at that key.
    let case_lines = item_lines(text, "tests:").filter(|lines| lines.len() == spec.test_specs.len());
    for (i, case) in std::mem::take(&mut spec.test_specs).into_iter().enumerate() {
        let start = case_lines.as_ref().map(|lines| lines[i]);
        let end = case_lines.as_ref().and_then(|lines| lines.get(i + 1).copied());
        let at = |c: &Compiler, key: &str| match start {
            Some(line) => match locate_from(c.text, line, key) {
                // Within this case's item (1-based `l` is the 0-based line `l - 1`).
                (Some(l), col) if key != "-" && end.is_none_or(|e| l <= e) => (Some(l), col),
                _ => (Some(line + 1), None),
            },
            None => locate(c.text, None, "tests:"),
        };
        let (place, message, hint) = match serde_yaml::from_value::<TestCaseSpec>(case) {
            Ok(case) if case.input.is_some() && case.input_file.is_some() => (
                at(&c, "input_file"),
                format!("tests[{i}] (`{}`) gives both `input` and `input_file`", case.name),
                "keep one: the input inline, or the file holding it".to_string(),
            ),
            Ok(case) if case.input.is_none() && case.input_file.is_none() => (
                at(&c, "-"),
                format!("tests[{i}] (`{}`) has no input", case.name),
                "add `input:` (the event) or `input_file:` (a JSON file beside the rules)".to_string(),
            ),
            Ok(case) if case.expect.is_some() && case.expect_dropped.is_some() => (
                at(&c, "expect_dropped"),
                format!(
                    "tests[{i}] (`{}`) gives both `expect` and `expect_dropped`",
                    case.name
                ),
                "keep one: the records the input must produce, or the reason none is sent".to_string(),
            ),
            Ok(case) if case.expect.is_none() && case.expect_dropped.is_none() => (
                at(&c, "-"),
                format!("tests[{i}] (`{}`) expects nothing", case.name),
                "add `expect:` (the records the input must produce; `[]` for none) or \
                 `expect_dropped:` (text of the reason its records are not sent)"
                    .to_string(),
            ),
            Ok(case) => {
                let bad_entry = case
                    .expect
                    .iter()
                    .flatten()
                    .position(|e| e.fields.is_some() == e.includes.is_some());
                let unknown_key = case
                    .config
                    .keys()
                    .find(|k| !ConfigKey::ALL.iter().any(|(n, _)| n == k))
                    .cloned();
                match (bad_entry, unknown_key) {
                    (Some(j), _) => (
                        at(&c, "expect"),
                        format!(
                            "tests[{i}] (`{}`): expect[{j}] needs exactly one of `fields` and `includes`",
                            case.name
                        ),
                        "`fields` is the whole record; `includes` names only the fields to check".to_string(),
                    ),
                    (None, Some(key)) => {
                        let names: Vec<&str> = ConfigKey::ALL.iter().map(|(n, _)| *n).collect();
                        (
                            at(&c, &key),
                            format!("tests[{i}] (`{}`): unknown config key `{key}`", case.name),
                            suggest(&key, &names),
                        )
                    }
                    (None, None) => {
                        spec.tests.push(case);
                        continue;
                    }
                }
            }
            Err(e) => {
                let raw = e.to_string();
                let message = raw.find(" at line ").map_or(raw.as_str(), |at| &raw[..at]);
                // serde names the unknown key first: `unknown field `feilds`, expected …`.
                let key = message
                    .strip_prefix("unknown field `")
                    .and_then(|rest| rest.split('`').next())
                    .unwrap_or("-")
                    .to_string();
                // An unknown key inside an `expect` entry lists that entry's keys.
                let hint = if message.contains("`fields`") && !message.contains("`expect`") {
                    "an `expect` entry takes rule, stream, and fields or includes".to_string()
                } else {
                    "a case takes name, input, input_file, config, expect, expect_dropped".to_string()
                };
                (at(&c, &key), format!("tests[{i}]: {message}"), hint)
            }
        };
        c.problem_at(None, place, message, Some(hint));
    }
    match (c.problems.is_empty(), source) {
        (true, Some(source)) => Ok((
            CompiledFile {
                file: c.file.clone(),
                source,
                alias: spec.alias.clone(),
                stream: spec.stream.clone(),
                rules,
            },
            spec,
        )),
        _ => Err(c.problems),
    }
}

fn yaml_problem(file: &str, text: &str, e: &serde_yaml::Error) -> RuleProblem {
    let (mut line, mut column) = e
        .location()
        .map(|l| (Some(l.line()), Some(l.column())))
        .unwrap_or((None, None));
    let raw = e.to_string();
    // serde_yaml appends " at line L column C"; the position is reported separately.
    let message = match raw.find(" at line ") {
        Some(i) => raw[..i].to_string(),
        None => raw,
    };
    // A key written twice: serde points at the mapping (a rule's start, or the file's); the
    // second writing is the one to fix. A field of a rule's `fields` says "is defined twice"; a
    // key of the rule or the file, serde's "duplicate field".
    // YAML's own check (a mapping read as a value) says `duplicate entry with key "x"`.
    let entry = message
        .split_once("duplicate entry with key \"")
        .and_then(|(_, rest)| rest.split('"').next());
    let twice = message
        .split("field `")
        .nth(1)
        .filter(|_| message.contains("is defined twice") || message.contains("duplicate field `"))
        .and_then(|rest| rest.split('`').next())
        .or(entry);
    if let (Some(key), Some(from)) = (twice, line) {
        // The second writing is at the first one's indentation: a key of that name deeper in
        // (a field's own `when:` under a rule's) is another mapping's.
        let key_at = format!("{key}:");
        let mut first_indent = None;
        for (i, l) in text.lines().enumerate().skip(from.saturating_sub(1)) {
            let t = l.trim_start();
            // A list item's first key sits two columns in from its dash.
            let (t, indent) = match t.strip_prefix("- ") {
                Some(rest) => (rest, l.len() - t.len() + 2),
                None => (t, l.len() - t.len()),
            };
            if t.starts_with(&key_at) {
                match first_indent {
                    None => first_indent = Some(indent),
                    Some(first) if first == indent => {
                        line = Some(i + 1);
                        column = Some(indent + 1);
                        break;
                    }
                    Some(_) => {}
                }
            }
        }
    }
    let hint = shape_hint(&message, twice);
    let message = match (entry, message.split_once(": duplicate entry")) {
        (Some(key), Some((path, _))) => {
            format!("{path}: `{key}` is written twice (the second would silently replace the first)")
        }
        _ => message.clone(),
    };
    RuleProblem {
        file: file.to_string(),
        line,
        column,
        rule: None,
        hint: Some(hint),
        message: format!("invalid rule file: {message}"),
    }
}

/// The hint for a problem serde found reading a rule file: `twice` is a key written twice.
fn shape_hint(message: &str, twice: Option<&str>) -> String {
    if twice.is_some() || message.contains("is defined twice") {
        "keep one of them: remove or rename the other".to_string()
    } else if message.contains("unknown field") {
        "check the key's spelling against docs/rules.md".to_string()
    } else if message.contains("missing field") {
        "add the missing key".to_string()
    } else if message.contains("invalid type") {
        let path = message
            .split_once(": invalid type")
            .map(|(path, _)| path.trim_start_matches("invalid rule file: "))
            .filter(|path| !path.is_empty());
        match path {
            Some(path) => {
                format!("`{path}` takes the form the message names (docs/rules.md shows each key's form)")
            }
            None => {
                "give the key the form the message names (docs/rules.md shows each key's form)".to_string()
            }
        }
    } else {
        "fix the YAML syntax: indentation, colons and quotes".to_string()
    }
}

struct Compiler<'a> {
    file: Arc<str>,
    text: &'a str,
    problems: Vec<RuleProblem>,
    /// The line (0-based) each rule's list item starts on, in order, when the file's layout
    /// lets them be found.
    rule_lines: Option<Vec<usize>>,
    /// The line (0-based) after the `rules:` list, when it can be found.
    rules_end: Option<usize>,
    /// The first line of the rule being compiled, when known.
    anchor: Option<usize>,
    /// The line of the field being compiled, when known.
    field_anchor: Option<usize>,
    /// The field being compiled: a bad path in it names it.
    field_name: Option<String>,
}

/// The line (0-based) of each item of the top-level `rules:` list.
fn rule_lines(text: &str) -> Option<Vec<usize>> {
    item_lines(text, "rules:")
}

/// The line (0-based) after the top-level list under `key`: its next top-level key, or the end.
fn list_end(text: &str, key: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().position(|l| l.trim_end() == key)?;
    let end = lines
        .iter()
        .enumerate()
        .skip(start + 1)
        .find(|(_, l)| {
            let t = l.trim_start();
            !t.is_empty() && !t.starts_with('#') && t.len() == l.len() && !t.starts_with('-')
        })
        .map_or(lines.len(), |(i, _)| i);
    Some(end)
}

/// The line (0-based) of each item of the top-level list under `key` (`rules:`, `tests:`).
fn item_lines(text: &str, key: &str) -> Option<Vec<usize>> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().position(|l| l.trim_end() == key)?;
    let mut items = Vec::new();
    let mut indent = None;
    for (i, line) in lines.iter().enumerate().skip(start + 1) {
        let t = line.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let at = line.len() - t.len();
        if at == 0 && !t.starts_with('-') {
            break;
        }
        if t.starts_with("- ") || t == "-" {
            match indent {
                None => {
                    indent = Some(at);
                    items.push(i);
                }
                Some(first) if first == at => items.push(i),
                Some(_) => {}
            }
        }
    }
    Some(items)
}

const FIELD_KEYS: &[&str] = &[
    "from",
    "path",
    "value",
    "config",
    "template",
    "default",
    "required",
    "transform",
    "when",
    "merge",
    "kind",
    "description",
];

const TEST_KEYS: &[&str] = &["exists", "equals", "not_equals", "in", "not_in", "matches"];

impl Compiler<'_> {
    /// A rule that does not have a rule's shape (a key of the wrong type, a field written
    /// twice). serde reads the rule from its YAML value without positions, so the rule's own
    /// lines are read again to place the problem as it does for a whole file.
    fn rule_shape_problem(&self, i: usize, e: &serde_yaml::Error) -> RuleProblem {
        let lines = self.rule_lines.as_ref();
        let span = lines.and_then(|l| l.get(i)).map(|&start| {
            let end = lines
                .and_then(|l| l.get(i + 1))
                .copied()
                .or(self.rules_end)
                .unwrap_or(usize::MAX);
            (start, end)
        });
        if let Some((start, end)) = span {
            let text: String = self
                .text
                .lines()
                .skip(start)
                .take(end.saturating_sub(start))
                .map(|l| format!("{l}\n"))
                .collect();
            if let Err(located) = serde_yaml::from_str::<Vec<RuleSpec>>(&text) {
                let mut p = yaml_problem(&self.file, &text, &located);
                p.line = p.line.map(|l| l + start);
                // The rule was read as the first item of a list of its own: `.[0].identity`
                // is `rules[i].identity` of the file.
                let path = format!("rules[{i}]");
                for at in [".[0]", "[0]"] {
                    if p.message.starts_with(&format!("invalid rule file: {at}")) {
                        p.message = p.message.replacen(at, &path, 1);
                        p.hint = p
                            .hint
                            .map(|h| h.replacen(&format!("`{at}"), &format!("`{path}"), 1));
                        break;
                    }
                }
                return p;
            }
        }
        let message = format!("invalid rule file: rules[{i}]: {e}");
        RuleProblem {
            file: self.file.to_string(),
            line: span.map(|(start, _)| start + 1),
            column: None,
            rule: None,
            hint: Some(shape_hint(&message, None)),
            message,
        }
    }

    /// Where `needle` is, looked for from the field or rule being compiled when known.
    fn locate(&self, rule: Option<&str>, needle: &str) -> (Option<usize>, Option<usize>) {
        match (rule, self.field_anchor.or(self.anchor)) {
            (Some(_), Some(start)) => match locate_from(self.text, start, needle) {
                (None, _) => (Some(start + 1), None),
                found => found,
            },
            _ => locate(self.text, rule, needle),
        }
    }

    fn problem(&mut self, rule: Option<&str>, needle: &str, message: String, hint: Option<String>) {
        let place = self.locate(rule, needle);
        self.problem_at(rule, place, message, hint);
    }

    /// A problem at a place already found (line and column, 1-based).
    fn problem_at(
        &mut self,
        rule: Option<&str>,
        (line, column): (Option<usize>, Option<usize>),
        message: String,
        hint: Option<String>,
    ) {
        self.problems.push(RuleProblem {
            file: self.file.to_string(),
            line,
            column,
            rule: rule.map(str::to_string),
            message,
            hint,
        });
    }

    fn rule(
        &mut self,
        spec: &RuleSpec,
        file_stream: Option<&str>,
        ts_field: &Arc<str>,
        file_identity: &[String],
    ) -> Option<Rule> {
        let before = self.problems.len();
        let name = spec.name.as_str();
        let kind = match spec.kind.as_deref() {
            None | Some("event") => RecordKind::Event,
            Some("profile") => RecordKind::Profile,
            Some(other) => {
                self.problem(
                    Some(name),
                    &format!("kind: {other}"),
                    format!("unknown kind `{other}`"),
                    Some("use `event` (a stream event) or `profile` (a user-profile update)".into()),
                );
                RecordKind::Event
            }
        };
        for key in spec.unknown.keys() {
            self.problem(
                Some(name),
                &format!("{key}:"),
                format!("unknown key `{key}` in the rule"),
                Some(suggest(key, super::spec::RULE_KEYS)),
            );
        }
        let when = spec.when.as_ref().and_then(|w| self.condition(name, w, None));
        let mut fields = Vec::new();
        let mut seen: Vec<Arc<str>> = Vec::new();
        // A field's problems are looked for from its own line, found after the rule's `fields:`.
        let fields_line = self
            .anchor
            .and_then(|start| locate_from(self.text, start, "fields:").0)
            .map(|line| line - 1);
        for (field_name, body) in &spec.fields {
            self.field_anchor = fields_line
                .and_then(|start| locate_from(self.text, start, &format!("{field_name}:")).0)
                .map(|line| line - 1);
            self.field_name = Some(field_name.clone());
            if let Some(f) = self.field(name, field_name, body, &seen) {
                fields.push(f);
            }
            self.field_anchor = None;
            self.field_name = None;
            seen.push(Arc::from(field_name.as_str()));
        }
        let mut flatten = Vec::new();
        for entry in &spec.flatten {
            if let Some(s) = self.spread(name, entry) {
                flatten.push(s);
            }
        }
        if !spec.fields.contains_key(&**ts_field) {
            self.problem(
                Some(name),
                &format!("name: {name}"),
                format!("the rule has no field `{ts_field}`, the file's timestamp_field"),
                Some(format!(
                    "add `{ts_field}: {{ from: $.timestamp, transform: epoch_ms }}` so Lytics uses \
                     the event time, not its receive time"
                )),
            );
        }
        let identity: Vec<Arc<str>> = spec
            .identity
            .as_deref()
            .unwrap_or(file_identity)
            .iter()
            .map(|s| Arc::from(s.as_str()))
            .collect();
        for id in &identity {
            if !spec.fields.contains_key(&**id) {
                self.problem(
                    Some(name),
                    &format!("name: {name}"),
                    format!("identity field `{id}` is not a field of the rule"),
                    Some("list only output fields under `identity`".to_string()),
                );
            }
        }
        // Lytics stitches records to users by their identities: a rule without any builds
        // records that reach no profile (the seed's "events received but user not created").
        if identity.is_empty() {
            let what = match kind {
                RecordKind::Profile => "a profile rule needs identity fields",
                _ => "the rule names no identity fields, so its records would reach no user profile",
            };
            self.problem(
                Some(name),
                &format!("name: {name}"),
                what.to_string(),
                Some(
                    "set `identity: [user_id, email]` (output fields of the rule) on the rule or the file"
                        .to_string(),
                ),
            );
        }
        for field in &mut fields {
            field.identity = identity.contains(&field.name);
        }
        (self.problems.len() == before).then(|| Rule {
            name: Arc::from(name),
            file: self.file.clone(),
            description: spec.description.clone(),
            kind,
            when,
            stream: spec.stream.as_deref().or(file_stream).map(Arc::from),
            timestamp_field: ts_field.clone(),
            identity: identity.into(),
            flatten,
            fields,
        })
    }

    fn selector(&mut self, rule: &str, text: &str) -> Option<Selector> {
        match Selector::parse(text) {
            Ok(s) => Some(s),
            Err(e) => {
                let hint = if !text.starts_with('$') {
                    "a JSONPath starts with `$`, for example `$.context.page.url`".to_string()
                } else {
                    "write paths as `$.a.b`, `$['a b']`, `$.items[0]` or RFC 9535 queries".to_string()
                };
                let (line, column) = self.locate(Some(rule), text);
                self.problems.push(RuleProblem {
                    file: self.file.to_string(),
                    line,
                    column: column.map(|c| c + e.column.unwrap_or(1) - 1),
                    rule: Some(rule.to_string()),
                    message: match &self.field_name {
                        Some(field) => format!("field `{field}`: {e}"),
                        None => e.to_string(),
                    },
                    hint: Some(hint),
                });
                None
            }
        }
    }

    fn spread(&mut self, rule: &str, entry: &Yaml) -> Option<Spread> {
        let spread = self.spread_entry(rule, entry)?;
        // A query selecting several values would be flattened as one list (keys `[0].a`).
        if !spread.from.is_singular() {
            self.problem(
                Some(rule),
                spread.from.text(),
                format!(
                    "`flatten` path `{}` can select several values; it must name one object",
                    spread.from.text()
                ),
                Some("flatten the object holding them (`$.properties`), or map the values as fields".into()),
            );
            return None;
        }
        Some(spread)
    }

    fn spread_entry(&mut self, rule: &str, entry: &Yaml) -> Option<Spread> {
        match entry {
            Yaml::String(path) => self.selector(rule, path).map(|from| Spread {
                from,
                prefix: String::new(),
            }),
            Yaml::Mapping(m) => {
                let mut from = None;
                let mut prefix = String::new();
                for (k, v) in m {
                    match (k.as_str(), v) {
                        (Some("from"), Yaml::String(p)) => from = self.selector(rule, p),
                        (Some("prefix"), Yaml::String(p)) => prefix = p.clone(),
                        (k, _) => {
                            let key = k.unwrap_or("?");
                            self.problem(
                                Some(rule),
                                key,
                                format!("unknown `flatten` key `{key}`"),
                                Some("a flatten entry is a path or `{ from: $.path, prefix: text }`".into()),
                            );
                        }
                    }
                }
                from.map(|from| Spread { from, prefix })
            }
            _ => {
                self.problem(
                    Some(rule),
                    "flatten",
                    "a `flatten` entry must be a path or a mapping".to_string(),
                    Some("write `- $.properties`".to_string()),
                );
                None
            }
        }
    }

    fn field(&mut self, rule: &str, name: &str, body: &Yaml, earlier: &[Arc<str>]) -> Option<FieldRule> {
        let before = self.problems.len();
        let mut field = FieldRule {
            name: Arc::from(name),
            sources: Vec::new(),
            default: None,
            required: false,
            transforms: Vec::new(),
            when: None,
            merge: None,
            kind: None,
            kind_declared: false,
            description: None,
            identity: false,
        };
        match body {
            Yaml::String(s) if s.starts_with('$') => {
                if let Some(p) = self.selector(rule, s) {
                    field.sources.push(ValueSource::Path(p));
                }
            }
            Yaml::String(_) | Yaml::Number(_) | Yaml::Bool(_) => {
                field.sources.push(ValueSource::Const(to_json(body)));
            }
            Yaml::Mapping(m) => {
                let given: Vec<&str> = ["from", "path", "value", "config", "template"]
                    .into_iter()
                    .filter(|k| m.contains_key(*k))
                    .collect();
                if given.len() > 1 {
                    self.problem(
                        Some(rule),
                        given[1],
                        format!(
                            "field `{name}` has several sources ({}): only one would be used",
                            given.join(", ")
                        ),
                        Some(
                            "keep one; for fallbacks list alternatives under `from` (`{value: …}` \
                             and `{template: …}` are alternatives too), or use `default`"
                                .into(),
                        ),
                    );
                }
                for (k, v) in m {
                    let Some(key) = k.as_str() else {
                        self.problem(
                            Some(rule),
                            name,
                            format!("field `{name}` has a non-text key"),
                            None,
                        );
                        continue;
                    };
                    match key {
                        "from" | "path" => self.alternatives(rule, name, v, earlier, &mut field.sources),
                        "value" => field.sources.push(ValueSource::Const(to_json(v))),
                        "config" => {
                            if let Some(c) = self.config_key(rule, v) {
                                field.sources.push(ValueSource::Config(c));
                            }
                        }
                        "template" => {
                            if let Some(t) = self.template(rule, v, earlier) {
                                field.sources.push(ValueSource::Template(t));
                            }
                        }
                        "default" => field.default = Some(to_json(v)),
                        "required" => match v {
                            Yaml::Bool(b) => field.required = *b,
                            _ => self.problem(
                                Some(rule),
                                "required",
                                format!("field `{name}`: `required` must be true or false"),
                                None,
                            ),
                        },
                        "transform" => field.transforms = self.transforms(rule, name, v),
                        "when" => field.when = self.condition(rule, v, Some(earlier)),
                        "merge" => field.merge = self.merge_op(rule, name, v),
                        "kind" => field.kind = self.kind(rule, name, v),
                        "description" => field.description = v.as_str().map(str::to_string),
                        other => self.problem(
                            Some(rule),
                            other,
                            format!("field `{name}` has unknown key `{other}`"),
                            Some(suggest(other, FIELD_KEYS)),
                        ),
                    }
                }
            }
            _ => self.problem(
                Some(rule),
                name,
                format!("field `{name}` must be a path, a constant or a mapping"),
                Some("write `field: $.path`, `field: text` or `field: { from: [$.a, $.b] }`".into()),
            ),
        }
        if field.sources.is_empty() && field.default.is_none() && self.problems.len() == before {
            self.problem(
                Some(rule),
                name,
                format!("field `{name}` has no source"),
                Some("give it `from`, `value`, `config`, `template` or `default`".to_string()),
            );
        }
        // A kind the rule names is checked value by value; one a merge op implies is not.
        field.kind_declared = field.kind.is_some();
        self.check_merge(rule, &mut field);
        (self.problems.len() == before).then_some(field)
    }

    fn check_merge(&mut self, rule: &str, field: &mut FieldRule) {
        let Some(op) = field.merge else { return };
        let (default_kind, allowed): (FieldKind, &[FieldKind]) = match op {
            MergeOp::Set => (FieldKind::StringSet, &[FieldKind::StringSet]),
            MergeOp::Count => (FieldKind::CountMap, &[FieldKind::CountMap]),
            MergeOp::Latest | MergeOp::Oldest => (
                FieldKind::String,
                &[
                    FieldKind::String,
                    FieldKind::Int,
                    FieldKind::Number,
                    FieldKind::Date,
                    FieldKind::Bool,
                ],
            ),
            MergeOp::Max | MergeOp::Min => (
                FieldKind::Number,
                &[FieldKind::Int, FieldKind::Number, FieldKind::Date],
            ),
            MergeOp::Sum => (FieldKind::Number, &[FieldKind::Int, FieldKind::Number]),
        };
        match field.kind {
            None => field.kind = Some(default_kind),
            Some(kind) if allowed.contains(&kind) => {}
            Some(kind) => {
                let names: Vec<&str> = allowed.iter().map(|k| k.name()).collect();
                self.problem(
                    Some(rule),
                    &format!("merge: {}", op.name()),
                    format!(
                        "field `{}`: merge `{}` does not fit kind `{}`",
                        field.name,
                        op.name(),
                        kind.name()
                    ),
                    Some(format!("with `{}` use kind {}", op.name(), names.join(" or "))),
                );
            }
        }
    }

    fn alternatives(
        &mut self,
        rule: &str,
        field: &str,
        v: &Yaml,
        earlier: &[Arc<str>],
        out: &mut Vec<ValueSource>,
    ) {
        let items: Vec<&Yaml> = match v {
            Yaml::Sequence(items) => items.iter().collect(),
            single => vec![single],
        };
        for item in items {
            match item {
                Yaml::String(p) if p.starts_with('$') => {
                    if let Some(s) = self.selector(rule, p) {
                        out.push(ValueSource::Path(s));
                    }
                }
                Yaml::Mapping(m) if m.len() == 1 => {
                    let Some((k, v)) = m.iter().next() else { continue };
                    match k.as_str() {
                        Some("path") => match v.as_str() {
                            Some(p) => {
                                if let Some(s) = self.selector(rule, p) {
                                    out.push(ValueSource::Path(s));
                                }
                            }
                            None => self.problem(
                                Some(rule),
                                "path",
                                format!("field `{field}`: `path` must be text"),
                                None,
                            ),
                        },
                        Some("value") => out.push(ValueSource::Const(to_json(v))),
                        Some("config") => {
                            if let Some(c) = self.config_key(rule, v) {
                                out.push(ValueSource::Config(c));
                            }
                        }
                        Some("template") => {
                            if let Some(t) = self.template(rule, v, earlier) {
                                out.push(ValueSource::Template(t));
                            }
                        }
                        other => {
                            let key = other.unwrap_or("?");
                            self.problem(
                                Some(rule),
                                key,
                                format!("field `{field}`: unknown alternative `{key}`"),
                                Some(
                                    "an alternative is a path, `path:`, `value:`, `config:` or `template:`"
                                        .into(),
                                ),
                            )
                        }
                    }
                }
                Yaml::String(text) => self.problem(
                    Some(rule),
                    text,
                    format!("field `{field}`: `{text}` in `from` is not a JSONPath"),
                    Some("paths start with `$`; for fixed text use `value:` or `template:`".into()),
                ),
                _ => self.problem(
                    Some(rule),
                    field,
                    format!("field `{field}`: each `from` entry must be a path or a one-key mapping"),
                    None,
                ),
            }
        }
    }

    fn config_key(&mut self, rule: &str, v: &Yaml) -> Option<ConfigKey> {
        let name = v.as_str().unwrap_or("");
        if name == "api_token" {
            self.problem(
                Some(rule),
                "api_token",
                "`api_token` is a secret and is not available to rules".to_string(),
                Some("rules may read stream_name, account_id, integration_id, integration_name".into()),
            );
            return None;
        }
        let found = ConfigKey::ALL.iter().find(|(n, _)| *n == name).map(|(_, k)| *k);
        if found.is_none() {
            let names: Vec<&str> = ConfigKey::ALL.iter().map(|(n, _)| *n).collect();
            self.problem(
                Some(rule),
                name,
                format!("unknown config key `{name}`"),
                Some(suggest(name, &names)),
            );
        }
        found
    }

    fn template(&mut self, rule: &str, v: &Yaml, earlier: &[Arc<str>]) -> Option<Vec<TemplatePart>> {
        let Some(text) = v.as_str() else {
            self.problem(
                Some(rule),
                "template",
                "`template` must be text".to_string(),
                None,
            );
            return None;
        };
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(ch) = chars.next() {
            match ch {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '}' => {
                    self.problem(
                        Some(rule),
                        text,
                        format!("template `{text}` has a `}}` that closes nothing"),
                        Some("write `}}` for a literal brace".into()),
                    );
                    return None;
                }
                '{' => {
                    let mut closed = false;
                    let reference: String = chars
                        .by_ref()
                        .take_while(|c| {
                            closed = *c == '}';
                            !closed
                        })
                        .collect();
                    if !closed {
                        self.problem(
                            Some(rule),
                            text,
                            format!("template `{text}` opens `{{` without closing it"),
                            Some("close the reference with `}`, or write `{{` for a literal brace".into()),
                        );
                        return None;
                    }
                    if !literal.is_empty() {
                        parts.push(TemplatePart::Text(std::mem::take(&mut literal)));
                    }
                    let reference = reference.trim();
                    if reference.starts_with('$') {
                        let path = self.selector(rule, reference)?;
                        if !path.is_singular() {
                            self.problem(
                                Some(rule),
                                text,
                                format!(
                                    "template `{text}` refers to `{reference}`, which can select several values"
                                ),
                                Some(
                                    "a template reference names one value: use a plain path such as \
                                     `$.items[0].sku`"
                                        .into(),
                                ),
                            );
                            return None;
                        }
                        parts.push(TemplatePart::Path(path));
                    } else if earlier.iter().any(|f| &**f == reference) {
                        parts.push(TemplatePart::Field(Arc::from(reference)));
                    } else {
                        self.problem(
                            Some(rule),
                            text,
                            format!("template `{text}` refers to `{reference}`, which is neither a path nor an earlier field"),
                            Some("write `{$.path}` or `{field}` for a field defined above".into()),
                        );
                        return None;
                    }
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(TemplatePart::Text(literal));
        }
        Some(parts)
    }

    fn transforms(&mut self, rule: &str, field: &str, v: &Yaml) -> Vec<Transform> {
        let names: Vec<&Yaml> = match v {
            Yaml::Sequence(items) => items.iter().collect(),
            single => vec![single],
        };
        let all: Vec<&str> = Transform::ALL.iter().map(|(n, _)| *n).collect();
        let mut out = Vec::new();
        for n in names {
            let name = n.as_str().unwrap_or("");
            match Transform::from_name(name) {
                Some(t) => out.push(t),
                None => self.problem(
                    Some(rule),
                    name,
                    format!("field `{field}`: unknown transform `{name}`"),
                    Some(suggest(name, &all)),
                ),
            }
        }
        out
    }

    fn merge_op(&mut self, rule: &str, field: &str, v: &Yaml) -> Option<MergeOp> {
        let name = v.as_str().unwrap_or("");
        let found = MergeOp::ALL.iter().find(|(n, _)| *n == name).map(|(_, m)| *m);
        if found.is_none() {
            let names: Vec<&str> = MergeOp::ALL.iter().map(|(n, _)| *n).collect();
            self.problem(
                Some(rule),
                name,
                format!("field `{field}`: unknown merge op `{name}`"),
                Some(suggest(name, &names)),
            );
        }
        found
    }

    fn kind(&mut self, rule: &str, field: &str, v: &Yaml) -> Option<FieldKind> {
        let name = v.as_str().unwrap_or("");
        let found = FieldKind::ALL.iter().find(|(n, _)| *n == name).map(|(_, k)| *k);
        if found.is_none() {
            let names: Vec<&str> = FieldKind::ALL.iter().map(|(n, _)| *n).collect();
            self.problem(
                Some(rule),
                name,
                format!("field `{field}`: unknown kind `{name}`"),
                Some(suggest(name, &names)),
            );
        }
        found
    }

    /// `earlier` is `None` for a rule-level `when`, which can only test the input.
    fn condition(&mut self, rule: &str, v: &Yaml, earlier: Option<&[Arc<str>]>) -> Option<Condition> {
        match v {
            Yaml::Sequence(items) => {
                let cs: Option<Vec<Condition>> =
                    items.iter().map(|i| self.condition(rule, i, earlier)).collect();
                cs.map(Condition::All)
            }
            Yaml::Mapping(m) => {
                let mut all = Vec::new();
                let mut ok = true;
                for (k, test) in m {
                    let key = k.as_str().unwrap_or("");
                    let c = match key {
                        "all" | "any" => match test {
                            Yaml::Sequence(items) => {
                                let cs: Option<Vec<Condition>> =
                                    items.iter().map(|i| self.condition(rule, i, earlier)).collect();
                                cs.map(|cs| {
                                    if key == "all" {
                                        Condition::All(cs)
                                    } else {
                                        Condition::Any(cs)
                                    }
                                })
                            }
                            _ => {
                                self.problem(
                                    Some(rule),
                                    key,
                                    format!("`{key}` takes a list of conditions"),
                                    None,
                                );
                                None
                            }
                        },
                        "not" => self
                            .condition(rule, test, earlier)
                            .map(|c| Condition::Not(Box::new(c))),
                        key => {
                            let subject = if key.starts_with('$') {
                                self.selector(rule, key).map(Subject::Input)
                            } else {
                                match earlier {
                                    Some(fields) if fields.iter().any(|f| &**f == key) => {
                                        Some(Subject::Field(Arc::from(key)))
                                    }
                                    Some(_) => {
                                        self.problem(
                                            Some(rule),
                                            key,
                                            format!("condition tests `{key}`, which is not a field defined above it"),
                                            Some("test an input path (`$.…`) or a field defined earlier in the rule".into()),
                                        );
                                        None
                                    }
                                    None => {
                                        self.problem(
                                            Some(rule),
                                            key,
                                            format!("a rule's `when` tests `{key}`, which is not a path"),
                                            Some("a rule's `when` tests input paths such as `$.type`".into()),
                                        );
                                        None
                                    }
                                }
                            };
                            let t = self.test(rule, key, test);
                            // A query selecting several values has no one value to compare.
                            let compares_many = matches!((&subject, &t),
                                (Some(Subject::Input(p)), Some((t, _))) if !p.is_singular() && !matches!(t, Test::Exists(_)));
                            if compares_many {
                                self.problem(
                                    Some(rule),
                                    key,
                                    format!(
                                        "condition compares `{key}`, which can select several values, \
                                         with one value"
                                    ),
                                    Some(
                                        "test whether one of them matches with a filter and `exists`, \
                                         e.g. `$.properties.items[?@.sku == 's2']: { exists: true }`"
                                            .into(),
                                    ),
                                );
                                None
                            } else {
                                match (subject, t) {
                                    (Some(s), Some((t, negate))) => {
                                        let c = Condition::Check(s, t);
                                        Some(if negate { Condition::Not(Box::new(c)) } else { c })
                                    }
                                    _ => None,
                                }
                            }
                        }
                    };
                    match c {
                        Some(c) => all.push(c),
                        None => ok = false,
                    }
                }
                if !ok {
                    return None;
                }
                Some(if all.len() == 1 {
                    all.remove(0)
                } else {
                    Condition::All(all)
                })
            }
            _ => {
                self.problem(
                    Some(rule),
                    "when",
                    "a condition must be a mapping such as `$.type: track`".to_string(),
                    None,
                );
                None
            }
        }
    }

    /// Reads a test; the flag says whether it is negated.
    fn test(&mut self, rule: &str, subject: &str, v: &Yaml) -> Option<(Test, bool)> {
        match v {
            Yaml::Sequence(items) => Some((Test::In(items.iter().map(to_json).collect()), false)),
            Yaml::Mapping(m) if m.len() == 1 => {
                let (k, arg) = m.iter().next()?;
                let key = k.as_str().unwrap_or("");
                match key {
                    "exists" => match arg {
                        Yaml::Bool(b) => Some((Test::Exists(*b), false)),
                        _ => {
                            self.problem(
                                Some(rule),
                                "exists",
                                "`exists` must be true or false".to_string(),
                                None,
                            );
                            None
                        }
                    },
                    "equals" => Some((Test::Equals(to_json(arg)), false)),
                    "not_equals" => Some((Test::Equals(to_json(arg)), true)),
                    "in" | "not_in" => match arg {
                        Yaml::Sequence(items) => {
                            Some((Test::In(items.iter().map(to_json).collect()), key == "not_in"))
                        }
                        _ => {
                            self.problem(Some(rule), key, format!("`{key}` takes a list"), None);
                            None
                        }
                    },
                    "matches" => {
                        let pattern = arg.as_str().unwrap_or("");
                        match Regex::new(pattern) {
                            Ok(re) => Some((Test::Matches(re), false)),
                            Err(e) => {
                                self.problem(
                                    Some(rule),
                                    pattern,
                                    format!("invalid regular expression `{pattern}`: {e}"),
                                    None,
                                );
                                None
                            }
                        }
                    }
                    other => {
                        self.problem(
                            Some(rule),
                            other,
                            format!("unknown test `{other}` on `{subject}`"),
                            Some(suggest(other, TEST_KEYS)),
                        );
                        None
                    }
                }
            }
            Yaml::Mapping(_) => {
                self.problem(
                    Some(rule),
                    subject,
                    format!("the test on `{subject}` must have exactly one key"),
                    Some("write `{ exists: true }`, `{ in: [a, b] }`, … or a plain value".into()),
                );
                None
            }
            Yaml::Null => {
                self.problem(
                    Some(rule),
                    subject,
                    format!("the test on `{subject}` is empty"),
                    Some(
                        "write the value it must equal, `{ exists: true }`, or `{ exists: false }` for a \
                         missing or null value"
                            .into(),
                    ),
                );
                None
            }
            scalar => Some((Test::Equals(to_json(scalar)), false)),
        }
    }
}

fn to_json(v: &Yaml) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// A "did you mean" hint: the closest known name by edit distance, or the full list.
pub fn suggest(unknown: &str, known: &[&str]) -> String {
    let best = known
        .iter()
        .map(|k| (edit_distance(unknown, k), *k))
        .min_by_key(|(d, _)| *d);
    match best {
        Some((d, k)) if d <= 2 || (d <= 3 && unknown.len() > 6) => format!("did you mean `{k}`?"),
        _ => format!("use one of: {}", known.join(", ")),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Finds `needle` in the file, searching from the line that names `rule` when given, and
/// returns its 1-based line and column.
pub fn locate(text: &str, rule: Option<&str>, needle: &str) -> (Option<usize>, Option<usize>) {
    let start_line = rule
        .and_then(|r| {
            text.lines().position(|l| {
                let t = l.trim_start().trim_start_matches("- ").trim_start();
                t.strip_prefix("name:")
                    .map(|rest| rest.trim().trim_matches(|c| c == '"' || c == '\'') == r)
                    .unwrap_or(false)
            })
        })
        .unwrap_or(0);
    if needle.is_empty() {
        return (rule.map(|_| start_line + 1), None);
    }
    match locate_from(text, start_line, needle) {
        (None, _) => (rule.map(|_| start_line + 1), None),
        found => found,
    }
}

/// Finds `needle` as a whole token from line `start_line` (0-based) on, outside comments and
/// descriptions; its 1-based line and column.
fn locate_from(text: &str, start_line: usize, needle: &str) -> (Option<usize>, Option<usize>) {
    // The needle as a whole token, outside comments and descriptions (a path `properties`
    // must not be found in "…with its properties flattened").
    let word = |c: char| c.is_alphanumeric() || c == '_';
    for (i, line) in text.lines().enumerate().skip(start_line) {
        let trimmed = line.trim_start().trim_start_matches("- ");
        if trimmed.starts_with('#') || trimmed.starts_with("description:") {
            continue;
        }
        let code = line.split(" #").next().unwrap_or(line);
        let found = code.match_indices(needle).find(|(at, _)| {
            let before = code[..*at].chars().next_back();
            let after = code[at + needle.len()..].chars().next();
            let edge = |c: Option<char>, inner: Option<char>| {
                // Only a needle that starts or ends with a word character needs a boundary there.
                !inner.is_some_and(word) || !c.is_some_and(word)
            };
            edge(before, needle.chars().next()) && edge(after, needle.chars().next_back())
        });
        if let Some((col, _)) = found {
            return (Some(i + 1), Some(line[..col].chars().count() + 1));
        }
    }
    (None, None)
}
