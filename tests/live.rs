//! Live events over gRPC and server-sent events, and the Prometheus metrics, on a whole relay.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use lytics_relay::integration::Secret;
use lytics_relay::proto::v1 as pb;
use lytics_relay::proto::v1::live_events_service_client::LiveEventsServiceClient;
use lytics_relay::telemetry::Telemetry;
use serde_json::{Value, json};
use tonic::Streaming;

const ADMIN: &str = "admin-secret-for-tests";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

async fn start(
    tune: impl FnOnce(&mut lytics_relay::config::Settings),
) -> (EmulatorHandle, RelayHandle, tempfile::TempDir) {
    let emu = EmulatorHandle::start().await;
    let (mut settings, dir) = settings(&emu.url(), TOKEN);
    settings.admin_token = Some(Secret::new(ADMIN));
    tune(&mut settings);
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    (emu, relay, dir)
}

fn track(id: &str, name: &str) -> pb::Event {
    event(
        json!({"type": "track", "event": name, "userId": format!("u-{id}"), "messageId": id,
                 "properties": {"n": 1}}),
    )
}

async fn watch(relay: &RelayHandle, filter: pb::WatchRequest) -> Streaming<pb::WatchResponse> {
    let mut client = LiveEventsServiceClient::connect(format!("http://{}", relay.grpc))
        .await
        .unwrap();
    let mut req = tonic::Request::new(filter);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    client.watch(req).await.unwrap().into_inner()
}

async fn next_event(stream: &mut Streaming<pb::WatchResponse>) -> pb::LiveEvent {
    let item = tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("a live event within 20 s")
        .unwrap()
        .expect("the stream stays open")
        .item
        .unwrap();
    match item {
        pb::watch_response::Item::Event(e) => e,
        pb::watch_response::Item::Dropped(d) => panic!("lost {} events with nobody slow", d.count),
    }
}

#[tokio::test]
async fn watch_needs_the_admin_token() {
    let (_emu, relay, _dir) = start(|_| {}).await;
    let mut client = LiveEventsServiceClient::connect(format!("http://{}", relay.grpc))
        .await
        .unwrap();
    let err = client.watch(pb::WatchRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    // An outcome the service does not know is refused, not watched for forever.
    let mut req = tonic::Request::new(pb::WatchRequest {
        outcome: 99,
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    let err = client.watch(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("unknown outcome `99`"), "{err:?}");
}

#[tokio::test]
async fn watch_shows_an_event_accepted_then_delivered_with_input_record_status_and_trace() {
    let (_emu, relay, _dir) = start(|_| {}).await;
    let mut stream = watch(&relay, pb::WatchRequest::default()).await;
    let mut client = relay.client().await;
    let mut req = tonic::Request::new(pb::SendRequest {
        event: Some(track("m-live-1", "Order Completed")),
    });
    req.metadata_mut()
        .insert("traceparent", TRACEPARENT.parse().unwrap());
    client.send(req).await.unwrap();

    let accepted = next_event(&mut stream).await;
    assert_eq!(accepted.outcome(), pb::LiveOutcome::Accepted);
    assert_eq!(
        (accepted.source.as_str(), accepted.event_type.as_str()),
        ("signal", "track")
    );
    assert_eq!(accepted.event_id, "m-live-1");
    assert_eq!(accepted.integration, "lytics");
    assert_eq!(accepted.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(!accepted.rules_version.is_empty());
    let input = lytics_relay::normalize::struct_to_json(accepted.input.as_ref().unwrap());
    assert_eq!(input["event"], json!("Order Completed"));
    assert_eq!(accepted.records.len(), 1);
    let record = lytics_relay::normalize::struct_to_json(accepted.records[0].record.as_ref().unwrap());
    assert_eq!(record["_e"], json!("Order Completed"));
    assert_eq!(accepted.records[0].stream, STREAM);
    assert!(!accepted.records[0].rule.is_empty());

    let delivered = next_event(&mut stream).await;
    assert_eq!(delivered.outcome(), pb::LiveOutcome::Delivered);
    assert_eq!(delivered.event_id, "m-live-1");
    assert_eq!((delivered.status, delivered.attempt), (200, 1));
    assert_eq!(delivered.trace_id, accepted.trace_id);
    assert_eq!(delivered.records[0].rule, accepted.records[0].rule);
    assert!(delivered.at_ms >= delivered.accepted_ms);

    // An open watch does not hold up shutdown, and ends saying the relay went away.
    assert!(relay.stop().await.graceful);
    let end = stream.message().await;
    assert!(
        matches!(&end, Err(s) if s.code() == tonic::Code::Unavailable && s.message().contains("shutting down")),
        "{end:?}"
    );
}

#[tokio::test]
async fn watch_filters_by_event_type_and_outcome() {
    let (_emu, relay, _dir) = start(|_| {}).await;
    let mut stream = watch(
        &relay,
        pb::WatchRequest {
            event_type: "identify".into(),
            outcome: pb::LiveOutcome::Delivered as i32,
            ..Default::default()
        },
    )
    .await;
    let mut client = relay.client().await;
    let identify = event(
        json!({"type": "identify", "userId": "u-9", "messageId": "m-identify",
                                "traits": {"plan": "pro"}}),
    );
    client
        .send_batch(pb::SendBatchRequest {
            events: vec![track("m-track", "Clicked"), identify],
        })
        .await
        .unwrap();
    let e = next_event(&mut stream).await;
    assert_eq!(
        (e.event_id.as_str(), e.outcome()),
        ("m-identify", pb::LiveOutcome::Delivered)
    );

    let mut client = LiveEventsServiceClient::connect(format!("http://{}", relay.grpc))
        .await
        .unwrap();
    let mut req = tonic::Request::new(pb::WatchRequest {
        source: "segment".into(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    let err = client.watch(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("signal, customerio"), "{}", err.message());
}

#[tokio::test]
async fn a_slow_watcher_is_told_what_it_lost_and_ingest_still_delivers_everything() {
    let (emu, relay, _dir) = start(|s| s.live_buffer = 8).await;
    // Opened, then not read while the relay works.
    let mut stream = watch(&relay, pb::WatchRequest::default()).await;
    let mut client = relay.client().await;
    const EVENTS: usize = 600;
    for chunk in 0..3 {
        let events = (0..EVENTS / 3)
            .map(|i| track(&format!("slow-{chunk}-{i}"), "Clicked"))
            .collect();
        let r = client
            .send_batch(pb::SendBatchRequest { events })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.accepted as usize, EVENTS / 3);
    }
    emu.wait_for_records(STREAM, EVENTS).await;

    // Each event was published twice (accepted, delivered): every one was either seen or
    // counted in a lag notice.
    let (mut seen, mut lost) = (0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen + lost < 2 * EVENTS as u64 {
        assert!(
            Instant::now() < deadline,
            "accounted for {seen} seen + {lost} lost"
        );
        let item = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .item
            .unwrap();
        match item {
            pb::watch_response::Item::Event(_) => seen += 1,
            pb::watch_response::Item::Dropped(d) => lost += d.count,
        }
    }
    assert_eq!(seen + lost, 2 * EVENTS as u64);
    assert!(lost > 0, "a watcher that did not read lost events");
    let metrics = scrape(&relay).await;
    assert_eq!(metrics["lytics_relay_live_events_lost_total"], lost as f64);
}

#[tokio::test]
async fn the_live_page_and_its_events_refuse_callers_without_the_admin_token() {
    let (_emu, relay, _dir) = start(|_| {}).await;
    for path in [
        "/live",
        "/live?token=wrong",
        "/live/events",
        "/live/events?token=wrong",
    ] {
        let r = reqwest::get(relay.http_url(path)).await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], json!("unauthenticated"), "{path}");
    }
    // From curl or a script, the header every other admin call takes works too.
    let client = reqwest::Client::new();
    for (path, bearer) in [("/live/events", "wrong"), ("/live", ADMIN)] {
        let r = client
            .get(relay.http_url(path))
            .header("Authorization", format!("Bearer {bearer}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), if bearer == ADMIN { 200 } else { 401 }, "{path}");
    }
    let r = reqwest::get(relay.http_url(&format!("/live?token={ADMIN}")))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["referrer-policy"], "no-referrer");
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = r.text().await.unwrap();
    assert!(page.contains("Live Events") && page.contains("/live/events"));
    assert!(
        !page.contains(ADMIN),
        "the token is read from the address, never written into the page"
    );
}

#[tokio::test]
async fn server_sent_events_carry_the_delivered_event() {
    let (_emu, relay, _dir) = start(|_| {}).await;
    let mut sse = reqwest::get(relay.http_url(&format!(
        "/live/events?token={ADMIN}&outcome=delivered&source=signal"
    )))
    .await
    .unwrap();
    assert_eq!(sse.status(), 200);
    assert_eq!(sse.headers()["content-type"], "text/event-stream");
    relay
        .client()
        .await
        .send(pb::SendRequest {
            event: Some(track("m-sse", "Clicked")),
        })
        .await
        .unwrap();
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !text.contains("\n\n") {
        assert!(Instant::now() < deadline, "no live event in {text:?}");
        let chunk = tokio::time::timeout(Duration::from_secs(20), sse.chunk())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
        // Keep-alive comments carry no event.
        text = text.trim_start_matches(":\n\n").to_string();
    }
    let data = text
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap_or_else(|| panic!("no data line in {text:?}"));
    assert!(text.starts_with("event: live"), "{text}");
    let e: Value = serde_json::from_str(data).unwrap();
    assert_eq!(e["event_id"], json!("m-sse"));
    assert_eq!(e["outcome"], json!("delivered"));
    assert_eq!(e["status"], json!(200));
    assert_eq!(e["input"]["event"], json!("Clicked"));
    assert_eq!(e["records"][0]["record"]["_e"], json!("Clicked"));

    // An open page does not hold up shutdown: its stream ends.
    assert!(relay.stop().await.graceful);
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = sse.chunk().await {}
    })
    .await;
    assert!(end.is_ok(), "the event stream ended at shutdown");
}

/// Scrapes `/metrics`, checks that every line is in the text format, and returns each sample
/// (`name{labels}`) with its value.
async fn scrape(relay: &RelayHandle) -> HashMap<String, f64> {
    let r = reqwest::get(relay.http_url("/metrics")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"),
    );
    let text = r.text().await.unwrap();
    assert_eq!(text.lines().last(), Some("# EOF"), "{text}");
    let sample =
        regex::Regex::new(r#"^([a-z_:][a-z0-9_:]*)(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? (\S+)$"#)
            .unwrap();
    let meta = regex::Regex::new(r"^# (HELP|TYPE|UNIT) [a-z_:][a-z0-9_:]*( .*)?$").unwrap();
    let mut samples = HashMap::new();
    for line in text.lines().filter(|l| *l != "# EOF") {
        if meta.is_match(line) {
            continue;
        }
        let c = sample
            .captures(line)
            .unwrap_or_else(|| panic!("not in the text format: {line:?}"));
        let value: f64 = c[4].parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let key = format!("{}{}", &c[1], c.get(2).map(|m| m.as_str()).unwrap_or(""));
        samples.insert(key, value);
    }
    assert!(
        !text.contains(TOKEN) && !text.contains(ADMIN),
        "no secret in metrics"
    );
    samples
}

#[tokio::test]
async fn metrics_count_events_records_calls_and_the_queue() {
    let (emu, relay, _dir) = start(|_| {}).await;
    let before = scrape(&relay).await;
    assert_eq!(before["lytics_relay_rule_reloads_total"], 0.0);
    assert_eq!(before["lytics_relay_queue_depth"], 0.0);
    assert_eq!(before["lytics_relay_dedup_ids"], 0.0);
    let mut client = relay.client().await;
    let group = event(json!({"type": "group", "userId": "u-1", "groupId": "g", "messageId": "m-group"}));
    // Its record is over Lytics' 16 KB record limit, so the rules' record is dropped.
    let too_big = event(
        json!({"type": "track", "event": "Clicked", "userId": "u-2", "messageId": "m-big",
                               "properties": {"blob": "x".repeat(20_000)}}),
    );
    client
        .send_batch(pb::SendBatchRequest {
            events: vec![track("m-1", "Clicked"), track("m-2", "Clicked"), group, too_big],
        })
        .await
        .unwrap();
    client
        .send(pb::SendRequest {
            event: Some(track("m-1", "Clicked")),
        })
        .await
        .unwrap();
    emu.wait_for_records(STREAM, 2).await;

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = scrape(&relay).await;
        if m.get(r#"lytics_relay_records_delivered_total{integration="lytics",source="signal"}"#)
            == Some(&2.0)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "records never counted delivered: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Records are counted delivered once the queue let go of them, so from now on the queue
    // reads empty (a scrape reads the queue before the counters, hence a fresh one).
    let m = scrape(&relay).await;
    let get = |k: &str| {
        m.get(k)
            .copied()
            .unwrap_or_else(|| panic!("no sample {k} in {m:?}"))
    };
    assert_eq!(get(r#"lytics_relay_events_received_total{source="signal"}"#), 5.0);
    assert_eq!(
        get(r#"lytics_relay_events_duplicate_total{source="signal"}"#),
        1.0
    );
    assert_eq!(get(r#"lytics_relay_events_ignored_total{source="signal"}"#), 2.0);
    assert_eq!(get(r#"lytics_relay_records_dropped_total{source="signal"}"#), 1.0);
    assert_eq!(
        get(r#"lytics_relay_records_mapped_total{integration="lytics",source="signal"}"#),
        2.0
    );
    assert!(get(r#"lytics_relay_lytics_calls_total{integration="lytics",status="200"}"#) >= 1.0);
    assert!(get(r#"lytics_relay_lytics_call_duration_seconds_count{integration="lytics"}"#) >= 1.0);
    assert_eq!(get("lytics_relay_queue_depth"), 0.0);
    assert_eq!(get("lytics_relay_queue_oldest_age_seconds"), 0.0);
    // The embedded queue's database (at least its schema's pages) and log.
    assert!(get("lytics_relay_queue_disk_bytes") >= 16_384.0);
    // The dedup index remembers m-1 and m-2, the events that queued records (the group event
    // mapped to nothing and the big one's record was dropped, so a retry of them may map again).
    assert_eq!(get("lytics_relay_dedup_ids"), 2.0);
    assert_eq!(get("lytics_relay_rule_reloads_total"), 0.0);
}
