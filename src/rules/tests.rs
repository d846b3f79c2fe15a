//! Unit tests of compiling and evaluating rules.

use super::*;
use serde_json::Value;
use serde_json::json;

fn compile(text: &str) -> Result<RuleSet, Vec<RuleProblem>> {
    RuleSet::compile(vec![(
        "test.yaml".into(),
        PathBuf::from("test.yaml"),
        text.to_string(),
    )])
    .map_err(|e| match e {
        RulesError::Invalid(p) => p,
        other => panic!("{other}"),
    })
}

fn ctx() -> IntegrationContext {
    IntegrationContext {
        stream_name: "datafly_events".into(),
        account_id: "1234".into(),
        ..Default::default()
    }
}

#[test]
fn shipped_rules_compile_and_their_cases_pass() {
    let set = RuleSet::load(Path::new("rules")).unwrap();
    let report = cases::run_all(&set);
    assert!(report.results.len() >= 4);
    assert_eq!(report.failed(), 0, "{}", report.render());
}

#[test]
fn the_embedded_rules_are_every_shipped_file() {
    let shipped = RuleSet::load(Path::new("rules")).unwrap();
    let embedded = RuleSet::embedded().unwrap();
    // The version hashes every file's name and text.
    assert_eq!(embedded.version(), shipped.version());
    for source in [Source::Signal, Source::CustomerIo] {
        assert!(!embedded.rules(source).is_empty(), "{source:?}");
        assert_eq!(embedded.rules(source).len(), shipped.rules(source).len());
    }
    assert_eq!(cases::run_all(&embedded).failed(), 0);
}

#[test]
fn maps_with_paths_alternatives_templates_config_and_flatten() {
    let set = compile(
        r#"
source: signal
identity: [user_id]
rules:
  - name: r
    when: { $.type: track }
    fields:
      user_id: $.userId
      kind: { template: "{$.type}_{$.event}" }
      title: { from: [$.properties.title, $.context.page.title], default: untitled }
      stream: { config: stream_name }
      email: { from: $.traits.email, transform: [trim, lowercase] }
      _ts: { from: $.timestamp, transform: epoch_ms }
      first_sku: { from: "$.properties.items[0].sku", when: { kind: track_buy } }
      skus: "$.properties.items[*].sku"
    flatten: [{ from: $.properties, prefix: "p." }]
"#,
    )
    .unwrap();
    let doc = json!({"type": "track", "event": "buy", "userId": "u1", "timestamp": "2021-02-11T17:04:49Z",
        "traits": {"email": " A@B.COM "}, "properties": {"items": [{"sku": "S1"}, {"sku": "S2"}], "n": 1}});
    let m = set.evaluate(Source::Signal, &doc, &ctx());
    assert_eq!(m.dropped, vec![]);
    assert_eq!(
        Value::Object(m.records[0].fields.to_map()),
        json!({"user_id": "u1", "kind": "track_buy", "title": "untitled", "stream": "datafly_events",
               "email": "a@b.com", "_ts": 1613063089000i64, "first_sku": "S1", "skus": ["S1", "S2"],
               "p.items[0].sku": "S1", "p.items[1].sku": "S2", "p.n": 1})
    );
    assert_eq!(&*m.records[0].stream, "datafly_events");
}

#[test]
fn an_email_that_is_not_text_or_a_value_that_does_not_fit_its_kind_is_refused() {
    let set = compile(
        r#"
source: signal
identity: [user_id, email]
rules:
  - name: r
    fields:
      user_id: $.userId
      email: { from: [$.traits.email, $.context.traits.email], transform: email }
      plan: { from: $.traits.plan, kind: string }
      score: { from: $.traits.score, kind: int, required: true }
      _ts: { value: 1 }
"#,
    )
    .unwrap();
    let doc = |traits: Value| json!({"type": "identify", "userId": "u1", "traits": traits});
    // Optional fields that do not fit are left out; the record goes without them.
    let d = doc(json!({"email": 42, "plan": ["pro"], "score": 3}));
    let m = set.evaluate(Source::Signal, &d, &ctx());
    assert_eq!(m.dropped, vec![]);
    assert_eq!(
        Value::Object(m.records[0].fields.to_map()),
        json!({"user_id": "u1", "score": 3, "_ts": 1})
    );
    // An identity takes one value: an array of emails would tie two users' profiles together,
    // so it is refused and the next alternative is tried.
    let d = doc(json!({"email": [" A@B.com", "c@d.COM"], "plan": "pro", "score": 3}));
    let m = set.evaluate(Source::Signal, &d, &ctx());
    assert_eq!(m.records[0].fields.to_map().get("email"), None);
    let mut d = doc(json!({"email": ["a@b.com", "c@d.com"], "score": 3}));
    d["context"] = json!({"traits": {"email": "C@D.com"}});
    let m = set.evaluate(Source::Signal, &d, &ctx());
    assert_eq!(m.records[0].fields.to_map()["email"], json!("c@d.com"));
    // With no other identity, the record is refused as unidentified.
    let d = json!({"type": "identify", "traits": {"email": ["a@b.com", "c@d.com"], "score": 3}});
    let m = set.evaluate(Source::Signal, &d, &ctx());
    assert!(m.records.is_empty());
    assert!(
        m.dropped[0].reason.contains("missing identifiers"),
        "{}",
        m.dropped[0].reason
    );
    // A required one refuses the record, saying why.
    let d = doc(json!({"score": {"n": 3}}));
    let m = set.evaluate(Source::Signal, &d, &ctx());
    assert!(m.records.is_empty());
    assert!(
        m.dropped[0].reason.contains("an object does not fit `kind: int`"),
        "{}",
        m.dropped[0].reason
    );
    // A scalar fits `int` only as an integer or a text spelling one.
    for (score, fits) in [
        (json!(3), true),
        (json!(3.0), true),
        (json!(" 42 "), true),
        (json!(4.5), false),
        (json!("hello"), false),
        (json!(true), false),
    ] {
        let d = doc(json!({ "score": score }));
        let m = set.evaluate(Source::Signal, &d, &ctx());
        assert_eq!(m.records.len(), usize::from(fits), "{score}: {:?}", m.dropped);
    }
}

#[test]
fn scalars_fit_number_and_bool_when_lytics_can_read_them_so() {
    let k = |name: &str| FieldKind::ALL.iter().find(|(n, _)| *n == name).unwrap().1;
    for v in [json!(1.5), json!("2.5e3"), json!(7)] {
        assert!(k("number").reads(&v), "{v}");
    }
    for v in [json!("NaN"), json!("seven"), json!(false), json!([1])] {
        assert!(!k("number").reads(&v), "{v}");
    }
    for v in [json!(true), json!("False"), json!(" true "), json!(1), json!("0")] {
        assert!(k("bool").reads(&v), "{v}");
    }
    for v in [json!(2), json!("yes"), json!({})] {
        assert!(!k("bool").reads(&v), "{v}");
    }
    for v in [json!(-3), json!("3.0"), json!(1e18)] {
        assert!(k("int").reads(&v), "{v}");
    }
    for v in [json!(1e300), json!("3.5"), json!(null)] {
        assert!(!k("int").reads(&v), "{v}");
    }
    // `string` and `date` take any one value; a list or an object is never one.
    for kind in ["string", "date"] {
        assert!(k(kind).reads(&json!("2026-02-25")) && k(kind).reads(&json!(17)));
        assert!(!k(kind).reads(&json!(["a"])));
    }
    // A kind a merge op implies (here `number`, by `max`) is not checked value by value: an ISO
    // date still reaches Lytics as before.
    let set = compile(
        "source: signal
identity: [user_id]
rules:
  - name: r
    kind: profile
    fields:
      user_id: $.userId
      last_seen: { from: $.timestamp, merge: max }
      _ts: { value: 1 }
",
    )
    .unwrap();
    let d = json!({"type": "identify", "userId": "u", "timestamp": "2026-02-25T14:30:00Z"});
    let m = set.evaluate(Source::Signal, &d, &ctx());
    assert_eq!(
        m.records[0].fields.to_map()["last_seen"],
        json!("2026-02-25T14:30:00Z")
    );
}

#[test]
fn a_record_over_lytics_record_limit_is_refused_by_the_rules_themselves() {
    let set = compile("source: signal\nidentity: [user_id]\nrules:\n  - name: r\n    fields:\n      user_id: $.userId\n      _ts: { value: 1 }\n    flatten: [$.properties]\n").unwrap();
    let doc = json!({"type": "track", "userId": "u", "properties": {"big": "x".repeat(20_000)}});
    // What ingest, a dry run, a rule test and a remapping replay all see.
    let m = set.evaluate(Source::Signal, &doc, &ctx());
    assert!(m.records.is_empty());
    assert!(
        m.dropped[0].reason.contains("16384-byte record limit"),
        "{}",
        m.dropped[0].reason
    );
    let doc = json!({"type": "track", "userId": "u", "properties": {"small": "x"}});
    let m = set.evaluate(Source::Signal, &doc, &ctx());
    assert_eq!(&m.records[0].body[..], br#"{"_ts":1,"small":"x","user_id":"u"}"#);
}

#[test]
fn records_without_identifiers_are_refused_with_the_seed_hint() {
    let set = compile("source: signal\nidentity: [user_id]\nrules:\n  - name: r\n    fields:\n      user_id: $.userId\n      _ts: { value: 1 }\n").unwrap();
    let doc = json!({"type": "page"});
    let m = set.evaluate(Source::Signal, &doc, &ctx());
    assert!(m.records.is_empty());
    assert!(
        m.dropped[0].reason.contains("user not created"),
        "{}",
        m.dropped[0].reason
    );
}

#[test]
fn every_problem_is_reported_with_position_and_hint() {
    let text = r#"source: signal
rules:
  - name: a
    fields:
      x: { from: "$.a[?", transform: lowercas }
      y: { config: api_token }
      z: { merge: count, kind: date, from: $.z }
      _ts: { from: $.t, transfrom: epoch_ms }
  - name: b
    when: { $.type: { equal: x } }
    fields:
      q: $.q
    flaten: [$.x]
sorce: signal
"#;
    let problems = compile(text).unwrap_err();
    let msgs: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    let all = msgs.join("\n");
    assert!(
        all.contains("test.yaml:5:") && all.contains("invalid JSONPath `$.a[?`"),
        "{all}"
    );
    assert!(
        all.contains("unknown transform `lowercas`") && all.contains("did you mean `lowercase`?"),
        "{all}"
    );
    assert!(all.contains("`api_token` is a secret"), "{all}");
    assert!(all.contains("merge `count` does not fit kind `date`"), "{all}");
    assert!(
        all.contains("unknown key `transfrom`") && all.contains("did you mean `transform`?"),
        "{all}"
    );
    assert!(all.contains("unknown test `equal`"), "{all}");
    assert!(all.contains("rule `b`: the rule has no field `_ts`"), "{all}");
    assert!(
        all.contains(
            "test.yaml:13:5: rule `b`: unknown key `flaten` in the rule (hint: did you mean `flatten`?)"
        ),
        "{all}"
    );
    assert!(
        all.contains("test.yaml:14:1: unknown key `sorce` in the file (hint: did you mean `source`?)"),
        "{all}"
    );
    assert!(problems.len() >= 9, "{all}");
    assert!(problems.iter().all(|p| p.line.is_some()), "{all}");
}

#[test]
fn bad_yaml_names_line_and_column() {
    let problems = compile("source: signal\nrules:\n  - name: a\n    felds: {}\n").unwrap_err();
    let p = problems
        .iter()
        .find(|p| p.message.contains("unknown key `felds`"))
        .unwrap();
    assert_eq!((p.line, p.column), (Some(4), Some(5)));
    assert_eq!(p.hint.as_deref(), Some("did you mean `fields`?"));
    let problems = compile("source: signal\nrules: [\n").unwrap_err();
    assert_eq!(problems[0].line, Some(3), "{problems:?}");
    assert!(problems[0].hint.as_deref().unwrap().contains("YAML syntax"));
}

#[test]
fn a_key_written_twice_or_of_the_wrong_type_is_placed_and_hinted_as_such() {
    let problems = compile(
        "source: signal
identity: [user_id]
rules:
  - name: r
    when: { $.type: track }
    fields:
      user_id: $.userId
      _ts:
        value: 1
        when: { $.type: track }
    when: { $.type: page }
",
    )
    .unwrap_err();
    assert!(
        problems[0].message.contains("`when` is written twice"),
        "{problems:?}"
    );
    assert_eq!(
        (problems[0].line, problems[0].column),
        (Some(11), Some(5)),
        "{problems:?}"
    );
    assert_eq!(
        problems[0].hint.as_deref(),
        Some("keep one of them: remove or rename the other")
    );
    let problems = compile("source: signal\nidentity: user_id\nrules: []\n").unwrap_err();
    assert!(
        problems[0].message.contains("identity: invalid type"),
        "{problems:?}"
    );
    let hint = problems[0].hint.as_deref().unwrap();
    assert!(
        hint.contains("`identity` takes the form") && !hint.contains("YAML syntax"),
        "{hint}"
    );
}

#[test]
fn a_rule_of_the_wrong_shape_is_reported_beside_the_other_rules_problems() {
    let problems = compile(
        "source: signal
identity: [user_id]
rules:
  - name: first
    identity: user_id
    fields:
      user_id: $.userId
      _ts: { value: 1 }
  - name: second
    fields:
      user_id: { from: $.userId, transform: to_strng }
      _ts: { value: 1 }
  - name: third
    kind: [event]
    fields:
      user_id: $.userId
      _ts: { value: 1 }
",
    )
    .unwrap_err();
    let found: Vec<(Option<usize>, &str)> = problems.iter().map(|p| (p.line, p.message.as_str())).collect();
    assert_eq!(problems.len(), 3, "{found:?}");
    assert!(
        found
            .iter()
            .any(|(l, m)| *l == Some(5) && m.contains("rules[0].identity: invalid type")),
        "{found:?}"
    );
    assert!(
        found
            .iter()
            .any(|(l, m)| *l == Some(11) && m.contains("unknown transform `to_strng`")),
        "{found:?}"
    );
    assert!(
        found
            .iter()
            .any(|(l, m)| *l == Some(14) && m.contains("rules[2].kind: invalid type")),
        "{found:?}"
    );
    let hint = problems[0].hint.as_deref().unwrap_or_default();
    assert!(hint.contains("`rules[0].identity` takes the form"), "{hint}");
}

#[test]
fn a_bad_path_in_a_field_names_the_field() {
    let problems = compile(
        "source: signal
identity: [user_id]
rules:
  - name: r
    when: { \"$.a[01]\": x }
    fields:
      user_id: $.userId
      _ts: { value: 1 }
      total: $.properties[01]
",
    )
    .unwrap_err();
    let messages: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
    assert_eq!(problems.len(), 2, "{messages:?}");
    assert!(
        messages[0].starts_with("invalid JSONPath `$.a[01]`"),
        "{messages:?}"
    );
    assert!(
        messages[1].starts_with("field `total`: invalid JSONPath `$.properties[01]`"),
        "{messages:?}"
    );
}

#[test]
fn a_rule_without_identity_fields_is_refused() {
    let problems =
        compile("source: signal\nrules:\n  - name: e\n    fields: { a: $.a, _ts: { value: 1 } }\n")
            .unwrap_err();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].message.contains("no identity fields"), "{problems:?}");
    assert_eq!(problems[0].line, Some(3), "{problems:?}");
}

#[test]
fn two_rules_merging_one_field_differently_are_refused() {
    let text = "source: customerio
identity: [f]
rules:
  - name: a
    fields: { f: { from: $.x, merge: set }, _ts: { value: 1 } }
  - name: b
    fields: { f: { from: $.x, merge: latest }, _ts: { value: 1 } }
";
    let problems = compile(text).unwrap_err();
    assert!(
        problems[0].message.contains("field `f` is merged as `latest`"),
        "{:?}",
        problems
    );
}

#[test]
fn versions_follow_content() {
    let a = compile("source: signal\nrules: []\n").unwrap();
    let b = compile("source: signal\nrules: []\n").unwrap();
    let c = compile("source: signal\nrules: []\n# changed\n").unwrap();
    assert_eq!(a.version(), b.version());
    assert_ne!(a.version(), c.version());
}

#[test]
fn an_identity_lytics_would_ignore_for_its_length_does_not_identify_a_record() {
    let set = compile(
        r#"
source: signal
identity: [user_id, email]
rules:
  - name: r
    fields:
      user_id: $.userId
      email: { from: $.traits.email, transform: email }
      _ts: { value: 1 }
"#,
    )
    .unwrap();
    let doc = |user_id: &str, traits: Value| json!({"type": "identify", "userId": user_id, "traits": traits});
    // 256 bytes (two-byte characters) is the most Lytics stitches by.
    let longest = "é".repeat(128);
    let d = doc(&longest, json!({}));
    let m = set.evaluate(Source::Signal, &d, &ctx());
    assert_eq!(m.dropped, vec![]);
    assert_eq!(m.records.len(), 1);
    // One byte more, and nothing else identifies the record: dropped, saying why.
    let too_long = format!("{longest}x");
    let d = doc(&too_long, json!({}));
    let m = set.evaluate(Source::Signal, &d, &ctx());
    assert!(m.records.is_empty());
    let reason = &m.dropped[0].reason;
    assert!(
        reason.contains("identifier too long: `user_id` is 257 bytes"),
        "{reason}"
    );
    assert!(reason.contains("user not created"), "{reason}");
    // Another identifier still stitches it.
    let d = doc(&too_long, json!({"email": "a@b.co"}));
    let m = set.evaluate(Source::Signal, &d, &ctx());
    assert_eq!(m.dropped, vec![]);
    assert_eq!(m.records.len(), 1);
}

#[test]
fn identities_and_refused_values_never_come_from_flatten() {
    let set = compile(
        r#"
source: signal
identity: [user_id, anonymous_id, email]
rules:
  - name: r
    fields:
      user_id: $.userId
      anonymous_id: $.anonymousId
      email: { from: [$.traits.email, $.context.traits.email], transform: email }
      plan: { from: $.traits.plan, kind: string }
      _ts: { value: 1 }
    flatten: [$.properties, $.traits]
"#,
    )
    .unwrap();
    // An anonymous visitor whose properties name someone's user id and a cookie id.
    let d = json!({"type": "page", "anonymousId": "anon",
        "properties": {"user_id": "someone", "_uid": "cookie", "title": "T"}});
    let m = set.evaluate(Source::Signal, &d, &ctx());
    assert_eq!(
        Value::Object(m.records[0].fields.to_map()),
        json!({"anonymous_id": "anon", "title": "T", "_ts": 1})
    );
    // An email the transform refuses falls through to the next alternative, and flatten does
    // not bring the refused value back; neither does a value its kind refuses.
    let d = json!({"type": "identify", "userId": "u", "traits": {"email": 12345, "plan": ["pro"]},
        "context": {"traits": {"email": "Real@X.io"}}});
    let m = set.evaluate(Source::Signal, &d, &ctx());
    assert_eq!(
        Value::Object(m.records[0].fields.to_map()),
        json!({"user_id": "u", "email": "real@x.io", "_ts": 1})
    );
    let d = json!({"type": "identify", "userId": "u", "traits": {"email": "+15551234"}});
    let m = set.evaluate(Source::Signal, &d, &ctx());
    assert_eq!(
        Value::Object(m.records[0].fields.to_map()),
        json!({"user_id": "u", "_ts": 1})
    );
}

#[test]
fn the_lql_selects_every_identity_it_stitches_by() {
    let set = compile(
        r#"
source: customerio
stream: s
identity: [email]
rules:
  - name: r
    fields:
      email: { from: $.data.recipient, transform: email }
      n: { from: $.n, merge: count }
      _ts: { value: 1 }
"#,
    )
    .unwrap();
    let queries = lql::queries(set.files(), "datafly_events");
    assert_eq!(queries.len(), 1);
    let text = &queries[0].text;
    assert!(text.contains("INTO user BY email"), "{text}");
    assert!(
        text.contains("email(email) AS email KIND string MERGEOP latest"),
        "{text}"
    );
}

#[test]
fn the_query_of_a_file_without_a_stream_reads_the_integrations_stream() {
    let set = compile(
        "source: signal
identity: [user_id]
rules:
  - name: r
    fields:
      user_id: $.userId
      total: { from: $.properties.total, merge: sum, kind: number }
      _ts: { value: 1 }
",
    )
    .unwrap();
    let queries = lql::queries(set.files(), "orders_stream");
    assert_eq!(queries.len(), 1);
    assert!(
        queries[0].text.contains("FROM orders_stream\n"),
        "{}",
        queries[0].text
    );
    assert_eq!(queries[0].alias, "orders_stream_user_fields");
}

#[test]
fn a_problem_is_located_at_its_own_line_not_at_a_description_mentioning_it() {
    let problems = compile(
        "source: signal
identity: [user_id]
rules:
  - name: r
    description: copies the properties # and mentions properties again
    fields:
      user_id: $.userId
      _ts: { value: 1 }
    flatten: [properties]
",
    )
    .unwrap_err();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(
        (problems[0].line, problems[0].column),
        (Some(9), Some(15)),
        "{problems:?}"
    );
}

#[test]
fn a_failing_case_says_which_path_matched_nothing_and_which_rule_did_not_apply() {
    let set = compile(
        r#"
source: signal
identity: [user_id]
rules:
  - name: page_view
    when: { $.type: page }
    fields:
      user_id: $.userId
      url: $.context.page.ulr
      _ts: { value: 1 }
tests:
  - name: the url is read
    input: { type: page, userId: u, context: { page: { url: "https://x.io" } } }
    expect:
      - fields: { user_id: u, url: "https://x.io", _ts: 1 }
  - name: a track is a page
    input: { type: track, event: E, userId: u }
    expect:
      - fields: { user_id: u, _ts: 1 }
"#,
    )
    .unwrap();
    let report = cases::run_all(&set);
    assert_eq!(report.failed(), 2);
    let text = report.render();
    assert!(
        text.contains("`url` has no value: nothing in the input matched $.context.page.ulr"),
        "{text}"
    );
    assert!(
        text.contains(r#"rules whose `when` did not hold: `page_view` (`$.type` is "track", not "page")"#),
        "{text}"
    );
}

#[test]
fn a_condition_that_does_not_hold_says_which_test_failed_and_what_it_saw() {
    let set = compile(
        "source: signal
identity: [user_id]
rules:
  - name: r
    when:
      $.type: track
      any:
        - $.event: { matches: \"^Order\" }
        - $.properties.kind: [a, b]
      not: { $.context.channel: server }
      $.userId: { exists: true }
    fields:
      user_id: $.userId
      _ts: { value: 1 }
",
    )
    .unwrap();
    let why = |event: serde_json::Value| {
        let rule = &set.rules(Source::Signal)[0];
        rule.when
            .as_ref()
            .unwrap()
            .why_not(&event, &super::record::RecordBuilder::default())
    };
    assert_eq!(
        why(json!({"type": "page"})).unwrap(),
        r#"`$.type` is "page", not "track""#
    );
    assert_eq!(
        why(json!({"type": "track", "event": " Order", "properties": {"kind": 3}})).unwrap(),
        r#"none of `any` holds (`$.event` is " Order", which does not match `^Order`; `$.properties.kind` is 3, none of ["a","b"])"#
    );
    assert_eq!(
        why(json!({"type": "track", "event": "Order", "context": {"channel": "server"}})).unwrap(),
        r#"`$.context.channel` is "server" (under `not`, or a `not_…` test)"#
    );
    assert_eq!(
        why(json!({"type": "track", "event": "Order"})).unwrap(),
        "`$.userId` is missing, not present (`exists: true`)"
    );
    assert_eq!(
        why(json!({"type": "track", "event": "Order", "userId": "u"})),
        None
    );
}

#[test]
fn problems_are_located_in_the_rule_and_field_they_belong_to() {
    // Two rules named alike: the second one's problems point at the second one; a field
    // condition that is not a mapping points at that field, not at an earlier valid one.
    let text = "source: signal
identity: [user_id]
rules:
  - name: first
    when: { $.type: track }
    fields:
      user_id: $.userId
      _ts: { from: $.timestamp, transform: epoch_ms }
      good: { from: $.a, when: { $.a: 1 } }
      bad: { from: $.b, when: [1, 2] }
  - name: first
    when: { $.type: page }
    fields:
      user_id: $.userId
";
    let problems = compile(text).unwrap_err();
    let at = |says: &str| {
        let p = problems
            .iter()
            .find(|p| p.message.contains(says))
            .unwrap_or_else(|| panic!("no problem saying `{says}`: {problems:?}"));
        (p.line, p.column)
    };
    assert_eq!(at("two rules are named `first`"), (Some(11), Some(5)));
    assert_eq!(at("has no field `_ts`").0, Some(11));
    assert_eq!(at("a condition must be a mapping").0, Some(10));
}

#[test]
fn a_mistake_in_a_test_case_is_reported_beside_the_rules_problems() {
    let text = "source: signal
identity: [user_id]
rules:
  - name: r
    wen: { $.type: track }
    fields:
      user_id: $.userId
      _ts: { from: $.timestamp, transform: epoch_ms }
tests:
  - name: typo
    input: { type: track }
    expect_droped: x
  - name: both
    input: { type: track }
    input_file: fixtures/x.json
  - name: neither
  - name: r
    input: { type: track }
    expect:
      - rule: r
        feilds: { user_id: u }
";
    let problems = compile(text).unwrap_err();
    let says: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
    assert!(says.iter().any(|m| m.contains("unknown key `wen`")), "{says:?}");
    assert!(
        says.iter()
            .any(|m| m.contains("tests[0]: unknown field `expect_droped`")),
        "{says:?}"
    );
    assert!(
        says.iter().any(|m| m.contains("tests[1] (`both`) gives both")),
        "{says:?}"
    );
    assert!(
        says.iter()
            .any(|m| m.contains("tests[2] (`neither`) has no input")),
        "{says:?}"
    );
    // Each at its own case, on the key at fault: not at a rule or text of the same name.
    let at = |prefix: &str| {
        let p = problems.iter().find(|p| p.message.starts_with(prefix)).unwrap();
        (p.line, p.column, p.hint.clone().unwrap_or_default())
    };
    assert_eq!(at("tests[0]").0, Some(12));
    assert_eq!(at("tests[0]").1, Some(5));
    assert_eq!(at("tests[1]").0, Some(15));
    assert_eq!(at("tests[2]").0, Some(16));
    let (line, _, hint) = at("tests[3]");
    assert_eq!(line, Some(21));
    assert!(
        hint.contains("an `expect` entry takes rule, stream, and fields or includes"),
        "{hint}"
    );
}

#[test]
fn a_case_must_expect_one_thing_and_name_known_config_keys() {
    let text = "source: signal
identity: [user_id]
rules:
  - name: r
    fields:
      user_id: $.userId
      _ts: { value: 1 }
tests:
  - name: both
    input: { type: track, userId: u }
    expect: []
    expect_dropped: x
  - name: nothing
    input: { type: track, userId: u }
  - name: typo
    input: { type: track, userId: u }
    config: { stream_nam: other }
    expect: []
  - name: none
    input: { type: track }
    expect: []
";
    let problems = compile(text).unwrap_err();
    let found = |prefix: &str| {
        problems
            .iter()
            .find(|p| p.message.starts_with(prefix))
            .unwrap_or_else(|| panic!("no problem `{prefix}…`: {problems:?}"))
    };
    assert_eq!(problems.len(), 3, "{problems:?}");
    let both = found("tests[0] (`both`) gives both `expect` and `expect_dropped`");
    assert_eq!(both.line, Some(12), "{both:?}");
    let nothing = found("tests[1] (`nothing`) expects nothing");
    assert!(
        nothing
            .hint
            .as_deref()
            .unwrap_or_default()
            .contains("`[]` for none"),
        "{nothing:?}"
    );
    let typo = found("tests[2] (`typo`): unknown config key `stream_nam`");
    assert_eq!(typo.line, Some(17), "{typo:?}");
    assert!(
        typo.hint.as_deref().unwrap_or_default().contains("stream_name"),
        "{typo:?}"
    );
}

#[test]
fn an_expectation_can_name_only_the_fields_it_checks() {
    let rules = "source: signal
identity: [user_id]
rules:
  - name: r
    fields:
      user_id: $.userId
      plan: $.traits.plan
      _ts: { value: 1 }
tests:
  - name: some fields
    input: { type: identify, userId: u, traits: { plan: pro } }
    expect:
      - includes: { plan: pro }
  - name: a wrong one
    input: { type: identify, userId: u, traits: { plan: pro } }
    expect:
      - includes: { plan: free }
";
    let set = compile(rules).unwrap();
    let report = cases::run_all(&set);
    assert_eq!(report.failed(), 1, "{}", report.render());
    let text = report.render();
    assert!(text.contains(r#"~ plan: expected "free", got "pro""#), "{text}");
    // Fields the expectation does not name are not reported.
    assert!(!text.contains("not expected"), "{text}");
    // An entry takes one of the two.
    let both = rules.replace(
        "      - includes: { plan: free }",
        "      - includes: { plan: free }\n        fields: { plan: free }",
    );
    let problems = compile(&both).unwrap_err();
    assert!(
        problems[0]
            .message
            .contains("expect[0] needs exactly one of `fields` and `includes`"),
        "{problems:?}"
    );
}

#[test]
fn flattening_what_is_not_an_object_copies_nothing_and_a_dry_run_says_so() {
    let set = compile(
        "source: signal
identity: [user_id]
rules:
  - name: r
    fields:
      user_id: $.userId
      _ts: { value: 1 }
    flatten:
      - $.properties.items
      - { from: $.properties.s, prefix: p_ }
",
    )
    .unwrap();
    let doc = json!({"type": "track", "userId": "u", "properties": {"items": [{"a": 1}], "s": "text"}});
    let (m, explain) = set.explain(Source::Signal, &doc, &ctx());
    assert_eq!(
        Value::Object(m.records[0].fields.to_map()),
        json!({"user_id": "u", "_ts": 1})
    );
    let said: Vec<&str> = explain.fields.iter().map(|f| f.source.as_str()).collect();
    assert!(
        said.contains(&"flatten $.properties.items: an array, not an object, so nothing is copied"),
        "{said:?}"
    );
    assert!(
        said.contains(&r#"flatten $.properties.s: the text "text", not an object, so nothing is copied"#),
        "{said:?}"
    );
}

#[test]
fn a_field_written_twice_in_a_rule_is_refused() {
    let text = "source: signal
identity: [user_id]
rules:
  - name: r
    fields:
      user_id: $.userId
      _ts: { from: $.timestamp, transform: epoch_ms }
      user_id: $.anonymousId
";
    let problems = compile(text).unwrap_err();
    assert!(
        problems[0].message.contains("`user_id` is written twice"),
        "{problems:?}"
    );
    // At the second writing, the one to remove or rename.
    assert_eq!(
        (problems[0].line, problems[0].column),
        (Some(8), Some(7)),
        "{problems:?}"
    );
    assert!(
        problems[0].hint.as_deref().unwrap().contains("keep one"),
        "{problems:?}"
    );
}

#[test]
fn a_field_with_two_sources_or_an_unclosed_template_is_refused() {
    let text = "source: signal
identity: [user_id]
rules:
  - name: r
    fields:
      user_id: $.userId
      _ts: { from: $.timestamp, transform: epoch_ms }
      both: { from: $.event, value: x }
      open: { template: \"{$.event\" }
      stray: { template: \"a } b\" }
";
    let problems = compile(text).unwrap_err();
    let says: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
    assert!(
        says.iter()
            .any(|m| m.contains("field `both` has several sources (from, value)")),
        "{says:?}"
    );
    assert!(
        says.iter().any(|m| m.contains("opens `{` without closing it")),
        "{says:?}"
    );
    assert!(
        says.iter().any(|m| m.contains("has a `}` that closes nothing")),
        "{says:?}"
    );
    let both = problems.iter().find(|p| p.message.contains("`both`")).unwrap();
    assert_eq!(both.line, Some(8), "{both:?}");
}

#[test]
fn a_rule_name_used_in_two_files_of_a_source_is_refused() {
    let text = |source: &str| {
        format!(
            "source: {source}
identity: [user_id]
rules:
  - name: same
    fields:
      user_id: $.userId
      _ts: {{ from: $.timestamp, transform: epoch_ms }}
"
        )
    };
    // Across sources a name may repeat: each source's rules are told apart by their source.
    RuleSet::compile(vec![
        ("a.yaml".into(), PathBuf::from("a.yaml"), text("signal")),
        ("b.yaml".into(), PathBuf::from("b.yaml"), text("customerio")),
    ])
    .unwrap();
    let e = RuleSet::compile(vec![
        ("a.yaml".into(), PathBuf::from("a.yaml"), text("signal")),
        ("b.yaml".into(), PathBuf::from("b.yaml"), text("signal")),
    ])
    .unwrap_err();
    let RulesError::Invalid(problems) = e else {
        panic!("{e}")
    };
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].file, "b.yaml");
    assert!(
        problems[0]
            .message
            .contains("rule `same` is also defined in a.yaml"),
        "{problems:?}"
    );
}

#[test]
fn a_flatten_path_that_can_select_several_values_is_refused() {
    let problems = compile(
        "source: signal
identity: [user_id]
rules:
  - name: r
    fields:
      user_id: $.userId
      _ts: { value: 1 }
    flatten:
      - \"$.properties.items[*]\"
",
    )
    .unwrap_err();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].message.contains("can select several values"),
        "{problems:?}"
    );
    assert_eq!(problems[0].line, Some(9), "{problems:?}");
}

#[test]
fn a_query_selecting_several_values_is_refused_where_one_value_is_read() {
    // A comparison and a template reference each need one value; `exists` takes any number.
    let problems = compile(
        "source: signal
identity: [user_id]
rules:
  - name: r
    when:
      \"$.properties.products[*].category\": shoes
      \"$.properties.products[?@.category == 'hats']\": { exists: true }
    fields:
      user_id: $.userId
      _ts: { value: 1 }
      label: { template: \"{$.event}: {$.properties.products[*].sku}\" }
      other: { from: $.event, when: { \"$..sku\": { in: [a, b] } } }
",
    )
    .unwrap_err();
    let messages: Vec<_> = problems.iter().map(|p| (p.line, p.message.as_str())).collect();
    assert_eq!(problems.len(), 3, "{messages:?}");
    assert!(
        messages.iter().any(|(line, m)| *line == Some(6)
            && m.contains("`$.properties.products[*].category`, which can select several values")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|(line, m)| *line == Some(11)
            && m.contains("refers to `$.properties.products[*].sku`, which can select several values")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|(line, m)| *line == Some(12) && m.contains("`$..sku`, which can select several")),
        "{messages:?}"
    );
    assert!(problems.iter().all(|p| p.hint.is_some()), "{problems:?}");
}

#[test]
fn a_rule_with_its_own_stream_gets_its_own_query() {
    let set = compile(
        "source: signal
identity: [user_id]
alias: levels
rules:
  - name: to_the_integration
    fields:
      user_id: $.userId
      total: { from: $.properties.total, merge: sum, kind: number }
      _ts: { value: 1 }
  - name: to_its_own
    stream: rule_level_stream
    fields:
      user_id: $.userId
      lvl: { from: $.traits.lvl, merge: max, kind: int }
      _ts: { value: 1 }
",
    )
    .unwrap();
    let queries = lql::queries(set.files(), "datafly_events");
    let heads: Vec<(&str, bool, bool)> = queries
        .iter()
        .map(|q| {
            let from = q.text.lines().find(|l| l.starts_with("FROM ")).unwrap();
            (&from[5..], q.text.contains("AS total"), q.text.contains("AS lvl"))
        })
        .collect();
    assert_eq!(
        heads,
        vec![
            ("datafly_events", true, false),
            ("rule_level_stream", false, true)
        ],
        "{queries:?}"
    );
    assert_eq!(queries[0].alias, "levels");
    assert_eq!(queries[1].alias, "levels_rule_level_stream");
}
