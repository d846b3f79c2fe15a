//! The documentation's examples, run: every `yaml rules` block of docs/rules.md is a complete rule
//! file whose cases must pass, its LQL example is what `rules lql` prints, and the README's config
//! file sample loads.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use std::path::PathBuf;

use lytics_relay::rules::{RuleSet, cases};

#[test]
fn every_example_in_the_rule_reference_compiles_and_passes_its_cases() {
    let doc = std::fs::read_to_string("docs/rules.md").unwrap();
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in doc.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```yaml rules") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), l) => {
                block.push_str(l);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(blocks.len() >= 6, "found {} examples", blocks.len());
    for (i, text) in blocks.iter().enumerate() {
        let name = format!("docs/rules.md example {}", i + 1);
        let set = RuleSet::compile(vec![(
            name.clone(),
            PathBuf::from("docs/example.yaml"),
            text.clone(),
        )])
        .unwrap_or_else(|e| panic!("{name} does not compile:\n{e}\n{text}"));
        let report = cases::run_all(&set);
        assert!(!report.results.is_empty(), "{name} has no test case");
        assert_eq!(report.failed(), 0, "{name}:\n{}", report.render());
    }
}

#[test]
fn the_lql_shown_for_the_merge_example_is_what_rules_lql_prints() {
    let doc = std::fs::read_to_string("docs/rules.md").unwrap();
    let start = doc.find("source: customerio\nstream: user_activity").unwrap();
    let end = start + doc[start..].find("```").unwrap();
    let set = RuleSet::compile(vec![(
        "x".into(),
        PathBuf::from("x.yaml"),
        doc[start..end].to_string(),
    )])
    .unwrap();
    let lql = lytics_relay::rules::lql::queries(set.files(), "datafly_events");
    let shown_start = doc.find("SELECT\n    email(email)").unwrap();
    let shown_end = shown_start + doc[shown_start..].find("```").unwrap();
    assert_eq!(lql[0].text, doc[shown_start..shown_end]);
}

#[test]
fn the_readme_config_file_sample_loads() {
    let readme = std::fs::read_to_string("README.md").unwrap();
    let after = readme
        .split("Flags and variables override the config file.")
        .nth(1)
        .expect("the config section");
    let start = after.find("```yaml\n").expect("the sample") + "```yaml\n".len();
    let sample = &after[start..start + after[start..].find("```").unwrap()];
    // The sample's placeholders ("…") are not valid secrets or tokens: fill them in.
    let sample = sample.replace('…', "xxxxxxxxxxxxxxxxxxxx");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.yaml");
    std::fs::write(
        &path,
        sample.replace("./data", dir.path().join("data").to_str().unwrap()),
    )
    .unwrap();
    let args = lytics_relay::cli::ServeArgs {
        config: Some(path),
        ..Default::default()
    };
    let settings = lytics_relay::config::Settings::load(&args);
    assert!(settings.is_ok(), "{:?}", settings.err().map(|e| e.to_string()));
}
