//! Rule evaluation for page, track and identify events, beside a hand-written serde_json mapping
//! that produces the very same records. Run: `cargo bench --bench rules`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benches fail loudly"
)]

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use lytics_relay::rules::{IntegrationContext, RuleSet, Source, flatten_into};
use lytics_relay::timefmt;
use serde_json::{Map, Value, json};

fn events() -> Vec<(&'static str, Value)> {
    let track: Value =
        serde_json::from_str(&std::fs::read_to_string("tests/fixtures/signal_canonical_track.json").unwrap())
            .unwrap();
    let mut page = track.clone();
    page["type"] = json!("page");
    page["name"] = json!("Checkout complete");
    page["properties"] = json!({"title": "Order Confirmation | Shop", "section": "checkout"});
    let identify = json!({
        "type": "identify", "userId": "user_98765", "anonymousId": "anon_a1b2c3d4",
        "traits": {"email": "Ada@Example.com", "name": "Ada Lovelace", "plan": "pro", "address": {"city": "London", "country": "UK"}},
        "context": track["context"].clone(), "timestamp": "2026-02-25T14:30:00.000Z", "messageId": "m-identify"
    });
    vec![("page", page), ("track", track), ("identify", identify)]
}

fn text(doc: &Value, path: &[&str]) -> Option<Value> {
    let v = path.iter().try_fold(doc, |v, k| v.get(*k))?;
    (!v.is_null()).then(|| v.clone())
}

fn put(out: &mut Map<String, Value>, key: &str, v: Option<Value>) {
    if let Some(v) = v {
        out.insert(key.to_string(), v);
    }
}

fn email(v: Option<Value>) -> Option<Value> {
    v.and_then(|v| v.as_str().map(|s| Value::from(s.trim().to_lowercase())))
}

fn common(doc: &Value, out: &mut Map<String, Value>) {
    put(out, "utm_source", text(doc, &["context", "campaign", "source"]));
    put(out, "utm_medium", text(doc, &["context", "campaign", "medium"]));
    put(out, "utm_campaign", text(doc, &["context", "campaign", "name"]));
    put(out, "utm_term", text(doc, &["context", "campaign", "term"]));
    put(out, "utm_content", text(doc, &["context", "campaign", "content"]));
    put(out, "ip", text(doc, &["context", "ip"]));
    put(out, "user_agent", text(doc, &["context", "userAgent"]));
    put(out, "locale", text(doc, &["context", "locale"]));
    put(out, "message_id", text(doc, &["messageId"]));
}

fn ts(doc: &Value) -> Option<Value> {
    doc.get("timestamp")
        .and_then(timefmt::value_to_ms)
        .map(Value::from)
}

/// The shipped signal.yaml, written by hand.
fn hand_written(doc: &Value) -> Map<String, Value> {
    let mut out = Map::new();
    let first = |a: &[&str], b: &[&str]| text(doc, a).or_else(|| text(doc, b));
    match doc["type"].as_str() {
        Some("page") => {
            out.insert("_e".into(), json!("pv"));
            put(&mut out, "page_name", text(doc, &["name"]));
            put(&mut out, "page_category", text(doc, &["category"]));
            put(
                &mut out,
                "url",
                first(&["properties", "url"], &["context", "page", "url"]),
            );
            put(
                &mut out,
                "path",
                first(&["properties", "path"], &["context", "page", "path"]),
            );
            put(
                &mut out,
                "title",
                first(&["properties", "title"], &["context", "page", "title"]),
            );
            put(
                &mut out,
                "referrer",
                first(&["properties", "referrer"], &["context", "page", "referrer"]),
            );
            put(
                &mut out,
                "search",
                first(&["properties", "search"], &["context", "page", "search"]),
            );
            put(&mut out, "user_id", text(doc, &["userId"]));
            put(&mut out, "anonymous_id", text(doc, &["anonymousId"]));
            put(
                &mut out,
                "email",
                email(first(&["properties", "email"], &["context", "traits", "email"])),
            );
            common(doc, &mut out);
            put(&mut out, "_ts", ts(doc));
            if let Some(Value::Object(p)) = doc.get("properties") {
                for (k, v) in p {
                    flatten_into(k, v.clone(), &mut out, false);
                }
            }
        }
        Some("track") => {
            put(&mut out, "_e", text(doc, &["event"]));
            put(&mut out, "user_id", text(doc, &["userId"]));
            put(&mut out, "anonymous_id", text(doc, &["anonymousId"]));
            put(
                &mut out,
                "email",
                email(first(&["properties", "email"], &["context", "traits", "email"])),
            );
            put(&mut out, "url", text(doc, &["context", "page", "url"]));
            put(&mut out, "path", text(doc, &["context", "page", "path"]));
            put(&mut out, "title", text(doc, &["context", "page", "title"]));
            put(&mut out, "referrer", text(doc, &["context", "page", "referrer"]));
            common(doc, &mut out);
            put(&mut out, "_ts", ts(doc));
            if let Some(Value::Object(p)) = doc.get("properties") {
                for (k, v) in p {
                    flatten_into(k, v.clone(), &mut out, false);
                }
            }
        }
        Some("identify") => {
            put(&mut out, "user_id", text(doc, &["userId"]));
            put(&mut out, "anonymous_id", text(doc, &["anonymousId"]));
            put(
                &mut out,
                "email",
                email(first(&["traits", "email"], &["context", "traits", "email"])),
            );
            put(&mut out, "message_id", text(doc, &["messageId"]));
            put(&mut out, "_ts", ts(doc));
            if let Some(Value::Object(p)) = doc.get("traits") {
                for (k, v) in p {
                    flatten_into(k, v.clone(), &mut out, false);
                }
            }
        }
        _ => {}
    }
    out
}

fn bench(c: &mut Criterion) {
    let rules = RuleSet::load(Path::new("rules")).unwrap();
    let ctx = IntegrationContext {
        stream_name: "datafly_events".into(),
        account_id: "1234".into(),
        ..Default::default()
    };
    for (name, doc) in events() {
        let by_rules = rules.evaluate(Source::Signal, &doc, &ctx);
        assert_eq!(by_rules.records.len(), 1, "{name}");
        assert_eq!(
            by_rules.records[0].fields,
            hand_written(&doc),
            "{name}: the two mappings must agree"
        );
        let mut group = c.benchmark_group(name);
        group.bench_function("rules", |b| {
            b.iter(|| rules.evaluate(Source::Signal, black_box(&doc), &ctx))
        });
        group.bench_function("hand_written", |b| b.iter(|| hand_written(black_box(&doc))));
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
