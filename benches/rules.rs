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
                    flatten_into(k.clone(), v.clone(), &mut out, false);
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
                    flatten_into(k.clone(), v.clone(), &mut out, false);
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
                    flatten_into(k.clone(), v.clone(), &mut out, false);
                }
            }
        }
        _ => {}
    }
    out
}

/// The shipped customerio.yaml, written by hand.
fn hand_written_customerio(doc: &Value) -> Option<Map<String, Value>> {
    let data = doc.get("data")?;
    let event = match doc.get("event_type").and_then(Value::as_str) {
        Some(t) => t.to_string(),
        None => format!(
            "{}_{}",
            doc.get("object_type")?.as_str()?,
            doc.get("metric")?.as_str()?
        ),
    };
    let email = ["recipient", "email_address", "email"]
        .iter()
        .find_map(|k| data.get(*k).and_then(Value::as_str))
        .or_else(|| {
            data.get("identifiers")
                .and_then(|i| i.get("email"))
                .and_then(Value::as_str)
        })
        .map(|e| e.trim().to_lowercase())?;
    let as_text = |v: &Value| match v {
        Value::String(s) => Some(Value::from(s.clone())),
        Value::Number(n) => Some(Value::from(n.to_string())),
        _ => None,
    };
    let ts = timefmt::value_to_ms(doc.get("timestamp")?)?;
    let mut out = Map::new();
    out.insert("event".into(), Value::from(event.clone()));
    out.insert("email".into(), Value::from(email));
    if let Some(id) = data
        .get("customer_id")
        .or_else(|| data.get("identifiers").and_then(|i| i.get("id")))
        .and_then(as_text)
    {
        out.insert("customer_id".into(), id);
    }
    if let Some(id) = doc.get("event_id").and_then(as_text) {
        out.insert("event_id".into(), id);
    }
    out.insert("_ts".into(), Value::from(ts));
    if let Some(c) = ["campaign_id", "broadcast_id", "newsletter_id"]
        .iter()
        .find_map(|k| data.get(*k))
        .and_then(as_text)
    {
        out.insert("cio_campaign_ids".into(), c);
    }
    if let Some(n) = data.get("campaign_name").filter(|v| !v.is_null()) {
        out.insert("cio_campaign_names".into(), n.clone());
    }
    out.insert("cio_events".into(), Value::from(event.clone()));
    if event == "email_opened" {
        out.insert(
            "cio_hourlyopens".into(),
            Value::from(timefmt::hour_of_day(ts)?.to_string()),
        );
        out.insert("cio_last_open_ts".into(), Value::from(ts));
    }
    if let Some(s) = data.get("subject").filter(|v| !v.is_null()) {
        out.insert("cio_subjects".into(), s.clone());
    }
    if event == "email_opened" || event == "email_clicked" {
        out.insert("last_active_ts".into(), Value::from(ts));
    }
    Some(out)
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
            by_rules.records[0].fields.to_map(),
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
    for name in [
        "customerio_email_opened.json",
        "customerio_legacy_email_sent.json",
    ] {
        let doc: Value =
            serde_json::from_str(&std::fs::read_to_string(format!("tests/fixtures/{name}")).unwrap())
                .unwrap();
        let by_rules = rules.evaluate(Source::CustomerIo, &doc, &ctx);
        assert_eq!(
            Some(by_rules.records[0].fields.to_map()),
            hand_written_customerio(&doc),
            "{name}"
        );
        let mut group = c.benchmark_group(name.trim_end_matches(".json"));
        group.bench_function("rules", |b| {
            b.iter(|| rules.evaluate(Source::CustomerIo, black_box(&doc), &ctx))
        });
        group.bench_function("hand_written", |b| {
            b.iter(|| hand_written_customerio(black_box(&doc)))
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
