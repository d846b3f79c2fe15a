//! The whole relay on loopback: gRPC ingest → rules → delivery → the emulator.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benches fail loudly"
)]

mod common;

use std::time::Duration;

use common::*;
use lytics_relay::emulator::Faults;
use lytics_relay::proto::v1 as pb;
use lytics_relay::telemetry::Telemetry;
use serde_json::{Value, json};
use tonic_types::StatusExt;

fn page() -> Value {
    json!({
        "type": "page", "name": "Pricing", "userId": "user_98765", "anonymousId": "anon_a1b2c3d4",
        "properties": {"title": "Pricing | Shop"},
        "context": {"page": {"url": "https://shop.example.com/pricing", "referrer": "https://google.com/"}},
        "timestamp": "2026-02-25T14:29:00.000Z", "messageId": "m-page"
    })
}

fn identify() -> Value {
    json!({
        "type": "identify", "userId": "user_98765",
        "traits": {"email": "Ada@Example.com", "plan": "pro"},
        "timestamp": "2026-02-25T14:31:00.000Z", "messageId": "m-identify"
    })
}

#[tokio::test]
async fn page_track_and_identify_reach_lytics_and_merge_into_one_profile() {
    let emu = EmulatorHandle::start().await;
    let (settings, _dir) = settings(&emu.url(), TOKEN);
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    let mut client = relay.client().await;
    for e in [page(), fixture("signal_canonical_track.json"), identify()] {
        let r = client
            .send(pb::SendRequest {
                event: Some(event(e)),
            })
            .await
            .unwrap()
            .into_inner();
        let result = r.result.unwrap();
        assert_eq!(result.status(), pb::IngestStatus::Accepted);
        assert_eq!(result.records, 1);
    }
    let records = emu.wait_for_records(STREAM, 3).await;
    let by_rule = |key: &str, val: &str| {
        records
            .iter()
            .find(|r| r.get(key).and_then(Value::as_str) == Some(val))
            .cloned()
            .unwrap()
    };
    let pv = by_rule("_e", "pv");
    assert_eq!(pv["url"], json!("https://shop.example.com/pricing"));
    assert_eq!(pv["title"], json!("Pricing | Shop"));
    assert_eq!(pv["referrer"], json!("https://google.com/"));
    let track = by_rule("_e", "Order Completed");
    assert_eq!(track["products[0].price"], json!(79.99));
    assert_eq!(track["_ts"], json!(1_772_029_800_000i64));
    let ident = by_rule("message_id", "m-identify");
    assert_eq!(ident["email"], json!("ada@example.com"));
    assert_eq!(ident["plan"], json!("pro"));

    // The emulator stitches the three records into one profile by user_id.
    let profile = emu.emulator.profile("user_id", "user_98765").unwrap();
    assert_eq!(profile["email"], json!("ada@example.com"));
    assert_eq!(profile["plan"], json!("pro"));
    assert_eq!(profile["anonymous_id"], json!("anon_a1b2c3d4"));
    assert!(emu.emulator.profile("email", "ada@example.com").is_some());

    let report = relay.stop().await;
    assert!(report.graceful);
}

#[tokio::test]
async fn an_open_health_watch_hears_not_serving_and_does_not_hold_up_shutdown() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let emu = EmulatorHandle::start().await;
    let (mut settings, _dir) = settings(&emu.url(), TOKEN);
    settings.shutdown_grace = Duration::from_secs(5);
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", relay.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    // Load balancers keep such a watch open: shutdown tells it and ends it, well within grace.
    let started = std::time::Instant::now();
    let report = relay.stop().await;
    assert!(report.graceful, "{:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let last = watch.message().await.unwrap().unwrap();
    assert_eq!(last.status(), ServingStatus::NotServing);
    assert!(watch.message().await.map(|m| m.is_none()).unwrap_or(true));
}

#[tokio::test]
async fn invalid_events_get_field_violations_and_nothing_is_queued() {
    let emu = EmulatorHandle::start().await;
    let (settings, _dir) = settings(&emu.url(), TOKEN);
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    let mut client = relay.client().await;

    let violations = |status: tonic::Status| -> Vec<String> {
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        status
            .get_error_details()
            .bad_request()
            .unwrap()
            .field_violations
            .iter()
            .map(|v| v.field.clone())
            .collect()
    };
    let missing = client.send(pb::SendRequest { event: None }).await.unwrap_err();
    assert_eq!(violations(missing), vec!["event"]);
    let unknown = client
        .send(pb::SendRequest {
            event: Some(event(json!({"type": "click", "userId": "u"}))),
        })
        .await
        .unwrap_err();
    assert!(
        unknown.message().contains("unknown event type `click`"),
        "{}",
        unknown.message()
    );
    assert_eq!(violations(unknown), vec!["event.type"]);
    let required = client
        .send(pb::SendRequest {
            event: Some(event(json!({"type": "track"}))),
        })
        .await
        .unwrap_err();
    assert_eq!(violations(required), vec!["event.userId", "event.event"]);
    let bad_time = client
        .send(pb::SendRequest {
            event: Some(event(
                json!({"type": "page", "userId": "u", "timestamp": "yesterday"}),
            )),
        })
        .await
        .unwrap_err();
    assert_eq!(violations(bad_time), vec!["event.timestamp"]);
    let big = json!({"type": "page", "userId": "u", "properties": {"blob": "x".repeat(40_000)}});
    let too_big = client
        .send(pb::SendRequest {
            event: Some(event(big)),
        })
        .await
        .unwrap_err();
    assert!(
        too_big.message().contains("over the 32768-byte limit"),
        "{}",
        too_big.message()
    );
    assert_eq!(violations(too_big), vec!["event"]);
    // Nesting past the relay's limit, and past protobuf's own (about 50 levels): the same
    // answer as over HTTP, for events and for Customer.io webhooks.
    let nested = |depth: usize| {
        let mut v = json!(1);
        for _ in 0..depth {
            v = json!({"k": v});
        }
        v
    };
    for (depth, field) in [(40, "event.properties"), (60, "event")] {
        let deep = json!({"type": "page", "userId": "u", "properties": nested(depth)});
        let refused = client
            .send(pb::SendRequest {
                event: Some(event(deep)),
            })
            .await
            .unwrap_err();
        assert!(
            refused.message().contains("more than 32 levels deep"),
            "{refused:?}"
        );
        assert_eq!(violations(refused), vec![field]);
    }
    let webhook = json!({"event_id": "d", "object_type": "email", "metric": "opened", "timestamp": 1, "data": nested(60)});
    let refused = client
        .send_customer_io_event(pb::SendCustomerIoEventRequest {
            webhook: lytics_relay::normalize::json_to_struct(&webhook),
        })
        .await
        .unwrap_err();
    assert!(
        refused.message().contains("more than 32 levels deep"),
        "{refused:?}"
    );
    assert_eq!(violations(refused), vec!["webhook"]);

    // A valid event after the bad ones is the only thing delivered.
    client
        .send(pb::SendRequest {
            event: Some(event(page())),
        })
        .await
        .unwrap();
    emu.wait_for_records(STREAM, 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(emu.emulator.stream_events(STREAM).len(), 1);
    relay.stop().await;
}

#[tokio::test]
async fn send_batch_answers_per_event_and_queues_the_valid_ones() {
    let emu = EmulatorHandle::start().await;
    let (settings, _dir) = settings(&emu.url(), TOKEN);
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    let mut client = relay.client().await;
    let events = vec![
        event(page()),
        event(json!({"type": "nope", "userId": "u"})),
        event(json!({"type": "group", "userId": "u", "groupId": "g"})),
        event(identify()),
    ];
    let r = client
        .send_batch(pb::SendBatchRequest { events })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.accepted, r.rejected), (3, 1));
    assert_eq!(r.outcomes.len(), 4);
    assert_eq!(
        r.outcomes[0].result.as_ref().unwrap().status(),
        pb::IngestStatus::Accepted
    );
    let err = r.outcomes[1].error.as_ref().unwrap();
    assert_eq!(err.code, "invalid_argument");
    assert_eq!(err.violations[0].field, "events[1].type");
    assert_eq!(
        r.outcomes[2].result.as_ref().unwrap().status(),
        pb::IngestStatus::Ignored
    );
    assert_eq!(r.outcomes[3].index, 3);
    emu.wait_for_records(STREAM, 2).await;
    relay.stop().await;
}

#[tokio::test]
async fn an_event_that_is_not_a_valid_event_message_is_refused_alone() {
    use prost::Message as _;
    let emu = EmulatorHandle::start().await;
    let (settings, _dir) = settings(&emu.url(), TOKEN);
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    // A SendBatchRequest written by hand: a page event, then an `Event` whose field 1 claims
    // five bytes where one follows, then an identify event.
    let mut body = Vec::new();
    for event_bytes in [
        event(page()).encode_to_vec(),
        vec![0x0a, 0x05, b'p'],
        event(identify()).encode_to_vec(),
    ] {
        prost::encoding::bytes::encode(1, &event_bytes, &mut body);
    }
    let request = lytics_relay::proto::raw::SendBatchRequest::decode(&body[..]).unwrap();
    let r: pb::SendBatchResponse = relay
        .unary(
            "/lytics_relay.v1.IngestService/SendBatch",
            tonic::Request::new(request),
        )
        .await
        .unwrap();
    assert_eq!((r.accepted, r.rejected), (2, 1));
    let err = r.outcomes[1].error.as_ref().unwrap();
    assert_eq!(err.code, "invalid_argument");
    assert_eq!(err.violations[0].field, "events[1]");
    assert!(
        err.violations[0]
            .description
            .contains("is not a valid lytics_relay.v1.Event"),
        "{}",
        err.violations[0].description
    );
    emu.wait_for_records(STREAM, 2).await;
    relay.stop().await;
}

#[tokio::test]
async fn client_streams_are_accepted_in_chunks_and_batched_to_lytics() {
    let emu = EmulatorHandle::start().await;
    let (settings, _dir) = settings(&emu.url(), TOKEN);
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    let mut client = relay.client().await;
    let n = 1200;
    let requests: Vec<pb::StreamRequest> = (0..n)
        .map(|i| {
            let e = if i == 7 {
                json!({"type": "track", "userId": "u"})
            } else {
                json!({"type": "track", "event": "Clicked", "userId": format!("u{i}"), "messageId": format!("s-{i}")})
            };
            pb::StreamRequest { event: Some(event(e)) }
        })
        .collect();
    let r = client
        .stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.accepted, r.rejected), (n - 1, 1));
    assert_eq!(r.errors[0].index, 7);
    emu.wait_for_records(STREAM, (n - 1) as usize).await;
    let calls = emu.emulator.stats().collect_requests;
    assert!(
        calls < 50,
        "{calls} collect calls for {} records: batching does not work",
        n - 1
    );
    relay.stop().await;
}

#[tokio::test]
async fn retries_on_temporary_errors_until_lytics_recovers() {
    let emu = EmulatorHandle::start().await;
    emu.emulator.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    });
    let (mut settings, _dir) = settings(&emu.url(), TOKEN);
    settings.delivery.max_attempts = 1000;
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    let mut client = relay.client().await;
    client
        .send(pb::SendRequest {
            event: Some(event(page())),
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(emu.emulator.stats().faulted >= 2, "the relay retried");
    assert!(emu.emulator.stream_events(STREAM).is_empty());
    emu.emulator.set_faults(Faults {
        throttle_rate: 0.5,
        drop_rate: 0.3,
        ..Faults::default()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    emu.emulator.set_faults(Faults::default());
    let records = emu.wait_for_records(STREAM, 1).await;
    assert_eq!(records[0]["message_id"], json!("m-page"));
    relay.stop().await;
}

#[tokio::test]
async fn a_wrong_token_pauses_delivery_with_the_seed_hint_and_holds_events() {
    let emu = EmulatorHandle::start().await;
    let (settings, _dir) = settings(&emu.url(), "wrong-token");
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    let mut client = relay.client().await;
    client
        .send(pb::SendRequest {
            event: Some(event(page())),
        })
        .await
        .unwrap();
    let health = loop {
        let h = relay.health().await;
        if !h["paused_integrations"].as_array().unwrap().is_empty() {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let pause = &health["paused_integrations"][0];
    assert_eq!(pause["status"], json!(401));
    assert!(
        pause["hint"]
            .as_str()
            .unwrap()
            .contains("Regenerate the token in Lytics Account > API Tokens")
            || pause["hint"]
                .as_str()
                .unwrap()
                .contains("regenerate the token in Lytics Account > API Tokens")
    );
    // Lytics' own error text is for the admin API, not for this unauthenticated endpoint.
    assert!(pause.get("message").is_none(), "{pause}");
    assert_eq!(health["queue_depth"], json!(1), "the event stays queued");
    let health_text = health.to_string();
    assert!(
        !health_text.contains("wrong-token"),
        "the token never appears in a response"
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_second_relay_on_the_same_data_directory_is_refused() {
    use lytics_relay::app::{self, Listeners};
    let emu = EmulatorHandle::start().await;
    let (settings, dir) = settings(&emu.url(), TOKEN);
    let first = RelayHandle::start(settings.clone(), Telemetry::disabled()).await;
    wait_until_serving(&first).await;

    let listeners = Listeners {
        grpc: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        http: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        emulator: None,
    };
    let second = app::run(
        settings.clone(),
        listeners,
        Telemetry::disabled(),
        std::future::pending(),
    )
    .await;
    let e = format!(
        "{:#}",
        second.expect_err("a second relay on the data directory must not start")
    );
    assert!(e.contains("is in use by another running relay"), "{e}");
    assert!(e.contains(&format!("process {}", std::process::id())), "{e}");

    // Once the first has stopped, the directory is free again.
    first.stop().await;
    let again = RelayHandle::start(settings, Telemetry::disabled()).await;
    wait_until_serving(&again).await;
    again.stop().await;
    drop(dir);
}

async fn wait_until_serving(relay: &RelayHandle) {
    for _ in 0..500 {
        if let Ok(r) = reqwest::get(relay.http_url("/healthz")).await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the relay did not start serving");
}

/// Sends each item's bytes as one gRPC message, as written: for requests no well-behaved client
/// would build.
#[derive(Clone, Default)]
struct RawBytes;

impl tonic::codec::Codec for RawBytes {
    type Encode = Vec<u8>;
    type Decode = pb::StreamResponse;
    type Encoder = RawBytes;
    type Decoder = tonic_prost::ProstDecoder<pb::StreamResponse>;

    fn encoder(&mut self) -> Self::Encoder {
        RawBytes
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

impl tonic::codec::Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut as _;
        buf.put_slice(&item);
        Ok(())
    }
}

#[tokio::test]
async fn a_request_that_does_not_decode_is_invalid_argument_and_a_stream_says_what_it_took() {
    use prost::Message as _;
    let emu = EmulatorHandle::start().await;
    let (mut settings, _dir) = settings(&emu.url(), TOKEN);
    settings.admin_token = Some(lytics_relay::integration::Secret::new("admin-secret"));
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    // Field 1 (`event`, a message) sent as a number: not a SendRequest at all.
    #[derive(Clone, PartialEq, prost::Message)]
    struct NumberOne {
        #[prost(uint64, tag = "1")]
        n: u64,
    }
    let not_a_request = NumberOne { n: 5 };
    let status = relay
        .unary::<_, pb::SendResponse>(
            "/lytics_relay.v1.IngestService/Send",
            tonic::Request::new(not_a_request.clone()),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let details = status.get_error_details();
    let field = &details.bad_request().unwrap().field_violations[0];
    assert_eq!(field.field, "request");
    assert!(
        field.description.contains("invalid wire type"),
        "{}",
        field.description
    );
    // Every other service answers the same: a client's mistake, not the relay's (INTERNAL).
    for path in [
        "/lytics_relay.v1.AdminService/GetIntegration",
        "/lytics_relay.v1.AdminService/InstallIntegration",
        "/lytics_relay.v1.DeadLetterService/ListDeadLetters",
        "/lytics_relay.v1.RulesService/DryRun",
    ] {
        let mut request = tonic::Request::new(not_a_request.clone());
        request
            .metadata_mut()
            .insert("authorization", "Bearer admin-secret".parse().unwrap());
        let status = relay
            .unary::<_, pb::SendResponse>(path, request)
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{path}: {status:?}");
        let details = status.get_error_details();
        assert_eq!(
            details.bad_request().unwrap().field_violations[0].field,
            "request",
            "{path}"
        );
    }

    // A stream of 300 events (more than one chunk), then a message that does not decode.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", relay.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut messages: Vec<Vec<u8>> = (0..300)
        .map(|i| {
            pb::StreamRequest {
                event: Some(event(
                    json!({"type": "track", "event": "e", "userId": "u", "messageId": format!("s{i}")}),
                )),
            }
            .encode_to_vec()
        })
        .collect();
    messages.push(vec![0x08, 0x05]);
    messages.push(
        pb::StreamRequest {
            event: Some(event(
                json!({"type": "track", "event": "e", "userId": "u", "messageId": "after"}),
            )),
        }
        .encode_to_vec(),
    );
    let status = grpc
        .client_streaming(
            tonic::Request::new(tokio_stream::iter(messages)),
            http::uri::PathAndQuery::from_static("/lytics_relay.v1.IngestService/Stream"),
            RawBytes,
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("message 300 of the stream")
            && status
                .message()
                .contains("the 300 valid events before it were accepted"),
        "{}",
        status.message()
    );
    // They were: each is a duplicate now, and the one after the broken message was not read.
    let mut client = relay.client().await;
    let again = |id: &str| pb::SendRequest {
        event: Some(event(
            json!({"type": "track", "event": "e", "userId": "u", "messageId": id}),
        )),
    };
    let r = client.send(again("s299")).await.unwrap().into_inner();
    assert_eq!(r.result.unwrap().status, pb::IngestStatus::Duplicate as i32);
    let r = client.send(again("after")).await.unwrap().into_inner();
    assert_eq!(r.result.unwrap().status, pb::IngestStatus::Accepted as i32);
    relay.stop().await;
}

#[tokio::test]
async fn a_senders_integrations_switches_turn_lytics_off_and_on() {
    let emu = EmulatorHandle::start().await;
    let (settings, _dir) = settings(&emu.url(), TOKEN);
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    let mut client = relay.client().await;
    let mut send = async |id: &str, switches: Value| {
        client
            .send(pb::SendRequest {
                event: Some(event(
                    json!({"type": "track", "event": "Clicked", "userId": "u-sw",
                    "messageId": id, "integrations": switches}),
                )),
            })
            .await
            .unwrap()
            .into_inner()
            .result
            .unwrap()
    };
    // Segment's switches: `All: false` turns every destination off...
    let off = send("sw-1", json!({"All": false})).await;
    assert_eq!(off.status(), pb::IngestStatus::Ignored, "{off:?}");
    assert_eq!(off.dropped[0].integration, "lytics");
    assert!(off.dropped[0].reason.contains("`All` to false"), "{off:?}");
    // ...unless the destination is turned back on by name, or by this integration's id.
    let on = send("sw-2", json!({"All": false, "Lytics": true})).await;
    assert_eq!(on.status(), pb::IngestStatus::Accepted, "{on:?}");
    let by_id = send("sw-3", json!({"Lytics": false, "lytics": true})).await;
    assert_eq!(by_id.status(), pb::IngestStatus::Accepted, "{by_id:?}");
    let named_off = send("sw-4", json!({"Lytics": false, "Amplitude": true})).await;
    assert_eq!(named_off.status(), pb::IngestStatus::Ignored, "{named_off:?}");
    emu.wait_for_records(STREAM, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ids: Vec<String> = emu
        .emulator
        .stream_events(STREAM)
        .iter()
        .map(|e| e.record["message_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(
        ids.contains(&"sw-2".to_string()) && ids.contains(&"sw-3".to_string()),
        "{ids:?}"
    );
    // A sender's switch is not a record the rules refused.
    let metrics = relay.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"lytics_relay_records_dropped_total{source="signal"} 0"#),
        "{metrics}"
    );
    relay.stop().await;
}
