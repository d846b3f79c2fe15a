//! Test cases kept beside the rules (`tests:` in a rule file), run by `lytics-relay rules test`,
//! by reloads before a swap, and by the test suite.
//!
//! Input: a compiled [`RuleSet`] and its files' cases. Output: a [`Report`] with a readable diff
//! for each failing case. Inputs go through the same normalisation as live events (with the
//! receive time fixed at 0, so results are repeatable). Reads input files; otherwise pure.

use std::path::Path;

use serde_json::{Map, Value};

use super::RuleSet;
use super::model::{Explain, IntegrationContext, Source};
use super::spec::TestCaseSpec;

/// The outcome of one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// The rule file.
    pub file: String,
    /// The case's name.
    pub name: String,
    /// Whether it passed.
    pub passed: bool,
    /// What differed, when it failed.
    pub detail: String,
}

/// The outcome of every case.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The cases, in file order.
    pub results: Vec<CaseResult>,
}

impl Report {
    /// Failed cases.
    pub fn failed(&self) -> usize {
        self.results.iter().filter(|r| !r.passed).count()
    }

    /// A readable report ending with a `N passed, N failed` line.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for r in &self.results {
            if r.passed {
                out.push_str(&format!("ok     {}: {}\n", r.file, r.name));
            } else {
                out.push_str(&format!("FAILED {}: {}\n{}\n", r.file, r.name, indent(&r.detail)));
            }
        }
        out.push_str(&format!(
            "rules test: {} passed, {} failed\n",
            self.results.len() - self.failed(),
            self.failed()
        ));
        out
    }
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}\n"))
        .collect::<String>()
        .trim_end()
        .to_string()
}

/// Runs every case of every file of `set`.
pub fn run_all(set: &RuleSet) -> Report {
    let mut report = Report::default();
    for (name, path, spec) in set.specs() {
        let Some(file) = set.files().iter().find(|f| &*f.file == name.as_str()) else {
            continue;
        };
        for case in &spec.tests {
            let (passed, detail) = match run_case(file, path, case) {
                Ok(()) => (true, String::new()),
                Err(d) => (false, d),
            };
            report.results.push(CaseResult {
                file: name.clone(),
                name: case.name.clone(),
                passed,
                detail,
            });
        }
    }
    report
}

fn run_case(file: &super::CompiledFile, path: &Path, case: &TestCaseSpec) -> Result<(), String> {
    let input = load_input(path, case)?;
    let doc = match file.source {
        Source::Signal => {
            crate::normalize::signal_event(input, "", usize::MAX, 0)
                .map_err(|e| format!("the input is not a valid event: {}", e.message))?
                .doc
        }
        Source::CustomerIo => {
            crate::normalize::customerio_event(input, "", usize::MAX)
                .map_err(|e| format!("the input is not a valid webhook: {}", e.message))?
                .doc
        }
    };
    let ctx = IntegrationContext {
        integration_id: case
            .config
            .get("integration_id")
            .cloned()
            .unwrap_or_else(|| "test".into()),
        integration_name: case
            .config
            .get("integration_name")
            .cloned()
            .unwrap_or_else(|| "Test".into()),
        account_id: case
            .config
            .get("account_id")
            .cloned()
            .unwrap_or_else(|| "1234".into()),
        stream_name: case
            .config
            .get("stream_name")
            .cloned()
            .unwrap_or_else(|| "datafly_events".into()),
    };
    let mut records = Vec::new();
    let mut dropped = Vec::new();
    // Which paths matched nothing and which rules did not apply, to say why a field or a record
    // is missing.
    let mut explain = Explain::default();
    for rule in &file.rules {
        match rule.apply(&doc, &ctx, Some(&mut explain)) {
            Some(Ok(r)) => records.push(r),
            Some(Err(d)) => dropped.push(d),
            None => {}
        }
    }
    if let Some(want) = &case.expect_dropped {
        if !records.is_empty() {
            let rules: Vec<&str> = records.iter().map(|r| &*r.rule).collect();
            return Err(format!(
                "expected no record, but rules {rules:?} produced {} record(s)",
                records.len()
            ));
        }
        if want.is_empty() {
            return match dropped.first() {
                None => Ok(()),
                Some(d) => Err(format!(
                    "expected no rule to match, but rule `{}` refused the event: {}",
                    d.rule, d.reason
                )),
            };
        }
        return if dropped.iter().any(|d| d.reason.contains(want.as_str())) {
            Ok(())
        } else if dropped.is_empty() {
            Err(format!(
                "expected a record refused with \"{want}\", but no rule matched"
            ))
        } else {
            let reasons: Vec<&str> = dropped.iter().map(|d| d.reason.as_str()).collect();
            Err(format!(
                "expected a refusal containing \"{want}\", got: {}",
                reasons.join("; ")
            ))
        };
    }
    let mut problems = Vec::new();
    for d in &dropped {
        problems.push(format!("rule `{}` refused the event: {}", d.rule, d.reason));
    }
    let expect = case.expect.as_deref().unwrap_or_default();
    if records.len() != expect.len() {
        problems.push(format!(
            "expected {} record(s), got {}",
            expect.len(),
            records.len()
        ));
        if !explain.skipped_rules.is_empty() {
            let skipped: Vec<String> = explain
                .skipped_rules
                .iter()
                .map(|s| format!("`{}` ({})", s.rule, s.reason))
                .collect();
            problems.push(format!("rules whose `when` did not hold: {}", skipped.join(", ")));
        }
    }
    for (i, (want, got)) in expect.iter().zip(records.iter()).enumerate() {
        if let Some(rule) = &want.rule
            && rule.as_str() != &*got.rule
        {
            problems.push(format!("record {i}: expected rule `{rule}`, got `{}`", got.rule));
        }
        if let Some(stream) = &want.stream
            && stream.as_str() != &*got.stream
        {
            problems.push(format!(
                "record {i}: expected stream `{stream}`, got `{}`",
                got.stream
            ));
        }
        // `fields` is the whole record; `includes` only the keys it names.
        let (listed, exact) = match (&want.fields, &want.includes) {
            (Some(fields), _) => (Some(fields), true),
            (None, includes) => (includes.as_ref(), false),
        };
        let want_fields: Map<String, Value> = listed
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), serde_json::to_value(v).unwrap_or(Value::Null)))
            .collect();
        let got_fields = got.fields.to_map();
        problems.extend(diff_fields(i, &want_fields, &got_fields, exact));
        for k in want_fields.keys().filter(|k| !got_fields.contains_key(*k)) {
            let paths: Vec<&str> = explain
                .unmatched
                .iter()
                .filter(|u| *u.rule == *got.rule && u.field == *k)
                .map(|u| u.path.as_str())
                .collect();
            if !paths.is_empty() {
                problems.push(format!(
                    "record {i}: `{k}` has no value: nothing in the input matched {}",
                    paths.join(", ")
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

/// Field-by-field differences, with values shown as JSON; with `exact`, fields not wanted too.
pub fn diff_fields(
    i: usize,
    want: &Map<String, Value>,
    got: &Map<String, Value>,
    exact: bool,
) -> Vec<String> {
    let mut out = Vec::new();
    for (k, w) in want {
        match got.get(k) {
            None => out.push(format!("record {i}: - {k}: {w}   (missing)")),
            Some(g) if !same(w, g) => out.push(format!("record {i}: ~ {k}: expected {w}, got {g}")),
            Some(_) => {}
        }
    }
    for (k, g) in got.iter().filter(|_| exact) {
        if !want.contains_key(k) {
            out.push(format!("record {i}: + {k}: {g}   (not expected)"));
        }
    }
    out
}

/// Numbers compare by value (YAML `1` and JSON `1.0` are the same number).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b)),
        _ => a == b,
    }
}

fn load_input(rule_file: &Path, case: &TestCaseSpec) -> Result<Value, String> {
    match (&case.input, &case.input_file) {
        (Some(v), None) => {
            serde_json::to_value(v).map_err(|e| format!("the input cannot be read as JSON: {e}"))
        }
        (None, Some(f)) => {
            let base = rule_file.parent().unwrap_or(Path::new("."));
            let p = base.join(f);
            let text = std::fs::read_to_string(&p)
                .map_err(|e| format!("cannot read input_file `{}`: {e}", p.display()))?;
            serde_json::from_str(&text).map_err(|e| format!("input_file `{}` is not JSON: {e}", p.display()))
        }
        _ => Err("a case needs exactly one of `input` and `input_file`".into()),
    }
}
