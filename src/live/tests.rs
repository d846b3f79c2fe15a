use std::time::Duration;

use super::*;

fn event(id: &str, outcome: Outcome, integration: &str) -> LiveEvent {
    LiveEvent {
        at_ms: 1,
        accepted_ms: 1,
        outcome,
        source: Source::Signal,
        event_type: Arc::from("track"),
        event_id: Arc::from(id),
        integration: Some(Arc::from(integration)),
        rules_version: Arc::from("v1"),
        input: Bytes::from_static(br#"{"type":"track"}"#),
        records: vec![LiveRecord {
            integration: Arc::from(integration),
            stream: Arc::from("s"),
            rule: Arc::from("track"),
            body: Bytes::from_static(br#"{"_e":"x"}"#),
        }],
        dropped: Vec::new(),
        status: Some(200),
        latency_ms: Some(3),
        attempt: 1,
        detail: String::new(),
        traceparent: Some(Arc::from(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )),
    }
}

#[tokio::test]
async fn a_watcher_sees_only_what_passes_its_filter() {
    let bus = LiveBus::new(16);
    let mut w = bus.subscribe(Filter::parse("b", "", "", "delivered").unwrap());
    bus.publish(event("1", Outcome::Delivered, "a"));
    bus.publish(event("2", Outcome::Retrying, "b"));
    bus.publish(event("3", Outcome::Delivered, "b"));
    match w.next().await {
        Some(Seen::Event(e)) => assert_eq!(&*e.event_id, "3"),
        other => panic!("expected event 3, got {other:?}"),
    }
}

#[tokio::test]
async fn publishing_never_waits_and_a_slow_watcher_is_told_how_many_it_lost() {
    let bus = LiveBus::new(4);
    let mut w = bus.subscribe(Filter::default());
    // Nobody reads while 100 events go by; publishing must not wait for the watcher.
    tokio::time::timeout(Duration::from_secs(1), async {
        for i in 0..100 {
            bus.publish(event(&i.to_string(), Outcome::Accepted, "a"));
        }
    })
    .await
    .unwrap();
    let mut seen = 0u64;
    let mut lost = 0u64;
    for _ in 0..5 {
        match w.next().await {
            Some(Seen::Event(_)) => seen += 1,
            Some(Seen::Dropped(n)) => lost += n,
            None => break,
        }
    }
    assert_eq!(lost, 96, "told how many it lost");
    assert_eq!(seen, 4, "then reads what the buffer kept");
    assert_eq!(bus.lost(), 96);
}

#[tokio::test]
async fn closing_the_bus_ends_every_watch() {
    let bus = LiveBus::new(4);
    let mut w = bus.subscribe(Filter::default());
    assert!(bus.watching());
    bus.close();
    assert!(w.next().await.is_none());
}

#[test]
fn filters_refuse_unknown_sources_and_outcomes_with_the_choices() {
    let e = Filter::parse("", "segment", "", "").unwrap_err();
    assert_eq!(
        e[0].to_string(),
        "unknown source `segment`; use one of: signal, customerio"
    );
    let e = Filter::parse("", "", "", "done").unwrap_err();
    assert!(e[0].to_string().contains("dead_lettered"), "{e:?}");
    assert_eq!(Filter::parse(" ", "", "", "").unwrap(), Filter::default());
    // Every bad field at once, each in a violation of its own.
    let e = Filter::parse("", "segment", "", "done").unwrap_err();
    let what: Vec<&str> = e.iter().map(|e| e.what).collect();
    assert_eq!(what, ["source", "outcome"]);
    let answer = super::filter_error(&e);
    let fields: Vec<&str> = answer.violations.iter().map(|v| v.field.as_str()).collect();
    assert_eq!(fields, ["source", "outcome"], "{answer:?}");
}

#[test]
fn an_event_type_filter_ignores_case() {
    let f = Filter::parse("", "", "Track", "").unwrap();
    let mut e = event("1", Outcome::Delivered, "a");
    e.event_type = "track".into();
    assert!(f.matches(&e));
    e.event_type = "page".into();
    assert!(!f.matches(&e));
}

#[test]
fn the_json_form_shows_input_record_status_and_trace_id() {
    let v = event("1", Outcome::Delivered, "a").to_json();
    assert_eq!(v["outcome"], "delivered");
    assert_eq!(v["input"]["type"], "track");
    assert_eq!(v["records"][0]["record"]["_e"], "x");
    assert_eq!(v["status"], 200);
    assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
}

#[test]
fn the_attempt_counts_every_call_the_record_was_in_deferred_or_spent() {
    use crate::queue::AttemptKind;
    let kind = |kind: AttemptKind| crate::queue::Attempt {
        at_ms: 1,
        status: Some(503),
        detail: String::new(),
        kind,
    };
    let r = QueuedRecord {
        id: 1,
        record: NewRecord::sample("lytics"),
        attempts: 1,
        // A deferred call (outage hold), a spent one, and a hand-back that made no call.
        history: vec![
            kind(AttemptKind::Deferred),
            kind(AttemptKind::Spent),
            kind(AttemptKind::Held),
        ],
    };
    let call = CallResult {
        status: Some(200),
        latency: Duration::from_millis(3),
    };
    let e = LiveEvent::settled(&r, Outcome::Delivered, &call, "", 5);
    assert_eq!(e.attempt, 3, "two calls before, and this one");
}
