#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

//! The IETF JSONPath Compliance Test Suite (RFC 9535) run through the rule engine's compiled
//! selectors, and through jsonpath-rust alone as the baseline the engine must not fall below.
//!
//! The suite is vendored under `tests/jsonpath-cts/` with its licence. Run
//! `cargo test --test jsonpath_cts -- --nocapture` to see the report; it is also written to
//! `target/jsonpath-cts-report.txt`.

use std::fmt::Write as _;
use std::path::Path;

use jsonpath_rust::parser::parse_json_path;
use jsonpath_rust::query::js_path_process;
use lytics_relay::rules::path::{Selected, Selector};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
struct Suite {
    tests: Vec<Case>,
}

/// One CTS case; the `*_paths` and `tags` members are not needed here.
#[derive(Deserialize)]
struct Case {
    name: String,
    selector: String,
    #[serde(default)]
    document: Value,
    /// The one valid node list.
    result: Option<Vec<Value>>,
    /// Several valid node lists (member order is unspecified); any one may match.
    results: Option<Vec<Vec<Value>>>,
    #[serde(default)]
    invalid_selector: bool,
}

/// What an implementation did with a case: rejected the selector, or produced a node list.
type Run<'a> = Result<Vec<&'a Value>, String>;

/// Why a case failed, or `None` when it passed.
fn verdict(case: &Case, run: &Run<'_>) -> Option<String> {
    match (case.invalid_selector, run) {
        (true, Err(_)) => None,
        (true, Ok(_)) => Some("accepted an invalid selector".to_string()),
        (false, Err(e)) => Some(format!("rejected a valid selector: {e}")),
        (false, Ok(nodes)) => {
            let expected: Vec<&Vec<Value>> =
                case.result.iter().chain(case.results.iter().flatten()).collect();
            let matches = |list: &&Vec<Value>| {
                list.len() == nodes.len() && list.iter().zip(nodes).all(|(a, b)| a == *b)
            };
            if expected.iter().any(matches) {
                None
            } else {
                let expected: Vec<String> = expected.iter().map(json).collect();
                Some(format!("got {} expected {}", json(nodes), expected.join(" or ")))
            }
        }
    }
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap()
}

/// The rule engine: compile once with `Selector::parse`, then `select`. Also says whether the
/// selector took the fast path.
fn engine<'a>(case: &Case, doc: &'a Value) -> (Run<'a>, bool) {
    match Selector::parse(&case.selector) {
        Err(e) => (Err(e.to_string()), false),
        Ok(selector) => {
            let nodes = match selector.select(doc) {
                Selected::Nothing => Vec::new(),
                Selected::One(v) => vec![v],
                Selected::Many(vs) => vs,
            };
            (Ok(nodes), selector.is_fast_path())
        }
    }
}

/// jsonpath-rust on its own; an evaluation error counts as a failure to produce a node list.
fn jsonpath_rust_alone<'a>(case: &Case, doc: &'a Value) -> Run<'a> {
    let query = parse_json_path(&case.selector).map_err(|e| e.to_string())?;
    js_path_process(&query, doc)
        .map(|found| found.into_iter().map(|r| r.val).collect())
        .map_err(|e| format!("evaluation error: {e}"))
}

/// Selectors in the suite contain raw control characters; show them as escapes.
fn printable(text: &str) -> String {
    text.chars().fold(String::new(), |mut out, c| {
        if c.is_control() {
            write!(out, "\\u{{{:04x}}}", u32::from(c)).unwrap();
        } else {
            out.push(c);
        }
        out
    })
}

#[test]
fn rule_engine_is_at_least_as_conformant_as_jsonpath_rust_and_its_fast_path_is_never_wrong() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/jsonpath-cts");
    let suite: Suite = serde_json::from_str(&std::fs::read_to_string(dir.join("cts.json")).unwrap()).unwrap();
    let total = suite.tests.len();

    let (mut engine_passes, mut alone_passes, mut fast, mut fast_passes) = (0, 0, 0, 0);
    let mut failures = String::new();
    let (mut rejected_valid, mut accepted_invalid, mut wrong_nodes) = (0, 0, 0);
    let mut fast_path_wrong = Vec::new();
    let mut regressions = Vec::new();

    for case in &suite.tests {
        let (run, took_fast_path) = engine(case, &case.document);
        let engine_failure = verdict(case, &run);
        let alone_failure = verdict(case, &jsonpath_rust_alone(case, &case.document));
        engine_passes += usize::from(engine_failure.is_none());
        alone_passes += usize::from(alone_failure.is_none());
        fast += usize::from(took_fast_path);
        fast_passes += usize::from(took_fast_path && engine_failure.is_none());

        let Some(reason) = engine_failure else { continue };
        match (case.invalid_selector, &run) {
            (false, Err(_)) => rejected_valid += 1,
            (true, _) => accepted_invalid += 1,
            (false, Ok(_)) => wrong_nodes += 1,
        }
        if took_fast_path {
            fast_path_wrong.push(case.name.as_str());
        }
        if alone_failure.is_none() {
            regressions.push(case.name.as_str());
        }
        writeln!(
            failures,
            "- {}\n    selector: {}\n    {}",
            case.name,
            printable(&case.selector),
            printable(&reason)
        )
        .unwrap();
    }

    let mut report = String::new();
    writeln!(
        report,
        "jsonpath CTS: rule engine {engine_passes}/{total}, jsonpath-rust alone {alone_passes}/{total}"
    )
    .unwrap();
    writeln!(report, "fast path: {fast} cases, {fast_passes} passed").unwrap();
    writeln!(
        report,
        "rule engine failures: {} ({rejected_valid} valid selectors rejected, {accepted_invalid} invalid \
         selectors accepted, {wrong_nodes} wrong node lists)",
        total - engine_passes
    )
    .unwrap();
    report.push_str(&failures);
    println!("{report}");
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap();
    std::fs::write(target.join("jsonpath-cts-report.txt"), &report).unwrap();

    assert!(
        engine_passes >= alone_passes,
        "the rule engine passes {engine_passes} cases, jsonpath-rust alone {alone_passes}"
    );
    assert!(
        regressions.is_empty(),
        "the rule engine fails cases jsonpath-rust alone passes: {regressions:?}"
    );
    assert!(
        fast_path_wrong.is_empty(),
        "the fast path got these cases wrong: {fast_path_wrong:?}"
    );
}
