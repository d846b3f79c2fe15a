//! Scale out: several relays sharing one NATS JetStream queue, and NATS going away and back.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use lytics_relay::proto::v1 as pb;
use lytics_relay::telemetry::Telemetry;
use serde_json::{Value, json};

fn track(id: &str) -> pb::Event {
    event(json!({"type": "track", "event": "Clicked", "userId": format!("u-{id}"), "messageId": id}))
}

/// How many times each event id reached Lytics.
fn deliveries(emu: &EmulatorHandle) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for e in emu.emulator.stream_events(STREAM) {
        let id = e.record["message_id"].as_str().unwrap().to_string();
        *seen.entry(id).or_insert(0) += 1;
    }
    seen
}

async fn send_all(relay: &RelayHandle, prefix: &str, n: usize) {
    let mut client = relay.client().await;
    for chunk in 0..n.div_ceil(50) {
        let events = (chunk * 50..((chunk + 1) * 50).min(n))
            .map(|i| track(&format!("{prefix}{i}")))
            .collect();
        let r = client
            .send_batch(pb::SendBatchRequest { events })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.accepted as usize,
            ((chunk + 1) * 50).min(n) - chunk * 50,
            "{r:?}"
        );
    }
}

#[tokio::test]
async fn two_relays_on_one_jetstream_deliver_each_event_once_whichever_took_it() {
    let nats = NatsServer::start().await;
    let emu = EmulatorHandle::start().await;
    let (mut a, _dir_a) = settings(&emu.url(), TOKEN);
    let (mut b, _dir_b) = settings(&emu.url(), TOKEN);
    use_nats(&mut a, &nats);
    use_nats(&mut b, &nats);
    let relay_a = RelayHandle::start(a, Telemetry::disabled()).await;
    let relay_b = RelayHandle::start(b, Telemetry::disabled()).await;
    send_all(&relay_a, "a", 300).await;
    send_all(&relay_b, "b", 300).await;
    // The same events sent to both replicas are stored once: dedup lives in JetStream.
    send_all(&relay_a, "both", 100).await;
    send_all(&relay_b, "both", 100).await;
    emu.wait_for_records(STREAM, 700).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = deliveries(&emu);
    assert_eq!(seen.len(), 700, "every event arrived");
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    let h: Value = reqwest::get(relay_b.http_url("/healthz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["queue"], json!({"backend": "nats", "connected": true}));
    relay_a.stop().await;
    relay_b.stop().await;
}

#[tokio::test]
async fn nats_down_answers_unavailable_and_back_loses_nothing_acknowledged() {
    let mut nats = NatsServer::start().await;
    let emu = EmulatorHandle::start().await;
    let (mut s, _dir) = settings(&emu.url(), TOKEN);
    use_nats(&mut s, &nats);
    let relay = RelayHandle::start(s, Telemetry::disabled()).await;
    let mut client = relay.client().await;
    send_all(&relay, "before", 100).await;

    nats.kill();
    let deadline = Instant::now() + Duration::from_secs(15);
    let refused = loop {
        match client
            .send(pb::SendRequest {
                event: Some(track("while-down")),
            })
            .await
        {
            Err(status) => break status,
            Ok(_) => {
                assert!(Instant::now() < deadline, "ingest kept accepting with NATS down");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let h: Value = reqwest::get(relay.http_url("/healthz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["queue"]["connected"], json!(false), "{h}");

    nats.resume().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while client
        .send(pb::SendRequest {
            event: Some(track("after-0")),
        })
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "ingest never accepted again after NATS came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    send_all(&relay, "after", 100).await;
    // Every acknowledged event arrives: the 100 before, the 100 after (a retry after a lost ack
    // may deliver one twice, which at-least-once allows).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = deliveries(&emu);
        let missing: Vec<String> = (0..100)
            .flat_map(|i| [format!("before{i}"), format!("after{i}")])
            .filter(|id| !seen.contains_key(id))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "never delivered: {missing:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.stop().await;
}

#[tokio::test]
async fn nats_unreachable_at_start_is_an_error_naming_the_urls() {
    let emu = EmulatorHandle::start().await;
    let (mut s, _dir) = settings(&emu.url(), TOKEN);
    let url = format!("nats://127.0.0.1:{}", free_port());
    s.queue_backend = lytics_relay::config::QueueBackend::Nats;
    s.nats.urls = vec![url.clone()];
    let listeners = lytics_relay::app::Listeners {
        grpc: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        http: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        emulator: None,
    };
    let err = lytics_relay::app::run(s, listeners, Telemetry::disabled(), std::future::pending())
        .await
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains(&url), "{text}");
    assert!(text.contains("cannot open the NATS queue"), "{text}");
}
