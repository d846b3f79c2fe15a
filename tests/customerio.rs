//! Customer.io webhooks, signed over HTTP and over gRPC, merged into Lytics user fields exactly
//! as the rules declare (the emulator runs the LQL generated from the same rules).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use common::*;
use hmac::{Hmac, Mac};
use lytics_relay::normalize::json_to_struct;
use lytics_relay::proto::v1 as pb;
use lytics_relay::rules::{RuleSet, lql};
use lytics_relay::telemetry::Telemetry;
use serde_json::{Value, json};
use sha2::Sha256;

const KEY: &str = "cio-signing-key";

fn sign(body: &str, ts: i64) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(KEY.as_bytes()).unwrap();
    mac.update(format!("v0:{ts}:{body}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn post(relay: &RelayHandle, body: &Value, ts: i64, signature: Option<String>) -> (u16, Value) {
    let body = body.to_string();
    let mut req = reqwest::Client::new()
        .post(relay.http_url("/v1/webhooks/customerio"))
        .header("content-type", "application/json")
        .header("X-CIO-Timestamp", ts.to_string());
    req = req.header("X-CIO-Signature", signature.unwrap_or_else(|| sign(&body, ts)));
    let r = req.body(body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn opened(id: &str, ts: i64, campaign: i64, subject: &str) -> Value {
    json!({"event_id": id, "object_type": "email", "metric": "opened", "timestamp": ts,
           "data": {"customer_id": "42", "campaign_id": campaign, "subject": subject, "recipient": "Ada@Example.com",
                    "identifiers": {"id": "42", "email": "Ada@Example.com"}}})
}

fn metric(id: &str, metric: &str, ts: i64, campaign: i64) -> Value {
    json!({"event_id": id, "object_type": "email", "metric": metric, "timestamp": ts,
           "data": {"customer_id": "42", "campaign_id": campaign, "recipient": "ada@example.com"}})
}

#[tokio::test]
async fn webhooks_in_both_formats_merge_into_the_user_fields_the_rules_declare() {
    let emu = EmulatorHandle::start().await;
    // The emulator merges by the LQL generated from the shipped rules, as Lytics would.
    let rules = RuleSet::load(std::path::Path::new("rules")).unwrap();
    for q in lql::queries(rules.files(), "datafly_events") {
        emu.emulator.register_lql(&q.text).unwrap();
    }
    let (mut settings, _dir) = settings(&emu.url(), TOKEN);
    settings.customerio_signing_key = Some(lytics_relay::integration::Secret::new(KEY));
    settings.customerio_tolerance = std::time::Duration::from_secs(600);
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    let mut client = relay.client().await;
    let t = now();

    // Three opens at 17:04, 19:00 and 19:30 UTC (the last in the legacy format).
    let (status, body) = post(&relay, &opened("o1", 1_613_063_089, 123, "Test Email"), t, None).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("accepted")),
        "{body}"
    );
    let r = client
        .send_customer_io_event(pb::SendCustomerIoEventRequest {
            webhook: json_to_struct(&opened("o2", 1_613_070_000, 123, "Test Email")),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result.unwrap().status(), pb::IngestStatus::Accepted);
    let legacy = json!({"event_id": "o3", "event_type": "email_opened", "timestamp": 1_613_071_800,
        "data": {"campaign_id": "124", "customer_id": "42", "email_address": "ADA@example.com", "subject": "Second"}});
    assert_eq!(post(&relay, &legacy, t, None).await.0, 200);
    // A click, a bounce and a delivery.
    assert_eq!(
        post(&relay, &metric("c1", "clicked", 1_613_072_000, 124), t, None)
            .await
            .0,
        200
    );
    assert_eq!(
        post(&relay, &metric("b1", "bounced", 1_613_073_000, 123), t, None)
            .await
            .0,
        200
    );
    client
        .send_customer_io_event(pb::SendCustomerIoEventRequest {
            webhook: json_to_struct(&metric("d1", "delivered", 1_613_060_000, 123)),
        })
        .await
        .unwrap();
    // No email: accepted (Customer.io must not stall) but not sent.
    let drafted = json!({"event_id": "x1", "object_type": "email", "metric": "drafted", "timestamp": 1_613_074_000,
        "data": {"customer_id": "42", "campaign_id": 999}});
    let (status, body) = post(&relay, &drafted, t, None).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["dropped"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("missing identifiers"),
        "{body}"
    );
    assert_eq!(body["dropped"][0]["integration"], json!("lytics"), "{body}");
    assert_eq!(body["status"], json!("ignored"), "{body}");
    // A duplicate event id is acknowledged and not delivered again.
    let (status, body) = post(&relay, &opened("o1", 1_613_063_089, 123, "Test Email"), t, None).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("duplicate")),
        "{body}"
    );
    // A bad signature and a stale timestamp are refused and leave nothing behind.
    let (status, body) = post(
        &relay,
        &opened("bad", 1_613_075_000, 777, "Evil"),
        t,
        Some("00".repeat(32)),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], json!("unauthenticated"));
    let (status, body) = post(
        &relay,
        &opened("old", 1_613_075_000, 778, "Stale"),
        t - 3600,
        None,
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("tolerance"),
        "{body}"
    );
    // Both refusals are counted, so a wrong signing key shows on the relay's side.
    let metrics = relay.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"lytics_relay_requests_unauthenticated_total{source="customerio"} 2"#),
        "{metrics}"
    );
    // Malformed bodies get a clear 400.
    let (status, body) = post(&relay, &json!({"event_id": "m1", "timestamp": 1}), t, None).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["violations"].as_array().unwrap().len() >= 2,
        "{body}"
    );

    let records = emu.wait_for_records("customerio_events", 6).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        emu.emulator.stream_events("customerio_events").len(),
        6,
        "{records:?}"
    );

    let profile: Value = reqwest::get(format!("{}/api/entity/user/email/ada@example.com", emu.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let p = &profile["data"];
    assert_eq!(p["email"], json!("ada@example.com"), "{profile}");
    assert_eq!(p["cio_hourlyopens"], json!({"17": 1, "19": 2}), "{profile}");
    assert_eq!(
        p["cio_events"],
        json!({"email_opened": 3, "email_clicked": 1, "email_bounced": 1, "email_delivered": 1}),
        "{profile}"
    );
    assert_eq!(p["cio_campaign_ids"], json!(["123", "124"]), "{profile}");
    assert_eq!(p["cio_subjects"], json!(["Second", "Test Email"]), "{profile}");
    assert_eq!(p["cio_last_open_ts"], json!("2021-02-11T19:30:00Z"), "{profile}");
    assert_eq!(p["last_active_ts"], json!("2021-02-11T19:33:20Z"), "{profile}");
    assert!(
        p.get("cio_campaign_names").is_none(),
        "no current payload carries campaign names: {profile}"
    );
    relay.stop().await;
}

#[test]
fn lql_export_matches_the_golden_query_and_the_emulator_parses_it() {
    let rules = RuleSet::load(std::path::Path::new("rules")).unwrap();
    let queries = lql::queries(rules.files(), "datafly_events");
    assert_eq!(queries.len(), 1);
    let golden = std::fs::read_to_string("tests/golden/customerio.lql").unwrap();
    assert_eq!(queries[0].text, golden);
    let parsed = lytics_relay::emulator::lql::parse_lql(&queries[0].text).unwrap();
    assert_eq!(parsed.from, "customerio_events");
    assert_eq!(parsed.by, vec!["email".to_string()]);
    let names: Vec<&str> = parsed.fields.iter().map(|f| f.name.as_str()).collect();
    for f in [
        "cio_campaign_ids",
        "cio_campaign_names",
        "cio_events",
        "cio_hourlyopens",
        "cio_last_open_ts",
        "cio_subjects",
        "email",
        "last_active_ts",
    ] {
        assert!(names.contains(&f), "{f} missing from {names:?}");
    }
}

#[tokio::test]
async fn a_webhook_has_the_same_size_limit_over_grpc_as_over_http() {
    let emu = EmulatorHandle::start().await;
    let (mut settings, _dir) = settings(&emu.url(), TOKEN);
    settings.customerio_signing_key = Some(lytics_relay::integration::Secret::new(KEY));
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    let mut client = relay.client().await;
    // Customer.io webhooks carry the message's content: 40 KB is over a Signal event's 32 KB
    // limit but well within the webhook's 256 KB, on both doors.
    let mut big = opened("big-grpc", now(), 123, "Big");
    big["data"]["content_html"] = json!("x".repeat(40_000));
    let r = client
        .send_customer_io_event(pb::SendCustomerIoEventRequest {
            webhook: json_to_struct(&big),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result.unwrap().status(), pb::IngestStatus::Accepted);
    big["event_id"] = json!("big-http");
    assert_eq!(post(&relay, &big, now(), None).await.0, 200);
    // Past 256 KB, both refuse.
    big["data"]["content_html"] = json!("x".repeat(300_000));
    let refused = client
        .send_customer_io_event(pb::SendCustomerIoEventRequest {
            webhook: json_to_struct(&big),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("262144"), "{refused:?}");
    assert_eq!(post(&relay, &big, now(), None).await.0, 413);
    relay.stop().await;
}
