//! Durable at-least-once delivery: poison records, setup errors, the queue bound, restarts.
//! Every scenario runs on both durable backends: `embedded::*` (SQLite) and `nats::*`
//! (a NATS JetStream server started for the test).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::Duration;

use common::*;
use lytics_relay::emulator::Faults;
use lytics_relay::integration::{AccountId, StreamName};
use lytics_relay::proto::v1 as pb;
use lytics_relay::proto::v1::dead_letter_service_client::DeadLetterServiceClient;
use lytics_relay::telemetry::Telemetry;
use serde_json::{Value, json};

/// Runs each scenario once per backend, as `embedded::<name>` and `nats::<name>`.
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Backend::Embedded).await
            })*
        }
        mod nats {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Backend::Nats).await
            })*
        }
    };
}

on_every_backend!(
    a_poison_record_is_dead_lettered_its_neighbours_arrive_and_replay_delivers_it,
    a_wrong_stream_pauses_with_the_hint_and_resumes_by_itself_once_it_exists,
    a_wrong_account_or_token_holds_events_until_the_config_is_fixed,
    a_full_queue_answers_resource_exhausted_and_recovers_as_it_drains,
    faults_for_a_while_lose_nothing,
);

fn track(id: &str, props: Value) -> pb::Event {
    event(
        json!({"type": "track", "event": "Clicked", "userId": format!("u-{id}"), "messageId": id, "properties": props}),
    )
}

async fn wait_paused(relay: &RelayHandle) -> Value {
    for _ in 0..500 {
        let h = relay.health().await;
        if !h["paused_integrations"].as_array().unwrap().is_empty() {
            return h["paused_integrations"][0].clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the integration never paused");
}

async fn a_poison_record_is_dead_lettered_its_neighbours_arrive_and_replay_delivers_it(backend: Backend) {
    let emu = EmulatorHandle::start().await;
    emu.emulator.set_faults(Faults {
        reject_poison: true,
        ..Faults::default()
    });
    let (mut settings, fx) = settings_on(backend, &emu.url(), TOKEN).await;
    settings.delivery.linger = Duration::from_millis(200);
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    let mut client = relay.client().await;
    let events = (0..6)
        .map(|i| {
            track(
                &format!("p{i}"),
                if i == 3 {
                    json!({"_poison": true})
                } else {
                    json!({"n": i})
                },
            )
        })
        .collect();
    let r = client
        .send_batch(pb::SendBatchRequest { events })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.accepted, 6);
    let records = emu.wait_for_records(STREAM, 5).await;
    assert!(records.iter().all(|r| r.get("_poison").is_none()));

    let mut admin = DeadLetterServiceClient::connect(format!("http://{}", relay.grpc))
        .await
        .unwrap();
    let unauthenticated = admin
        .list_dead_letters(pb::ListDeadLettersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(unauthenticated.code(), tonic::Code::Unauthenticated);
    let token = admin_token(fx.dir.path()).await;
    let dead = loop {
        let list = admin
            .list_dead_letters(authed(&token, pb::ListDeadLettersRequest::default()))
            .await
            .unwrap()
            .into_inner();
        if !list.dead_letters.is_empty() {
            break list.dead_letters;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.event_id, "p3");
    assert!(
        d.reason.contains("Lytics refused the record (400)") && d.reason.contains("_poison"),
        "{}",
        d.reason
    );
    assert_eq!(d.stream, STREAM);
    assert_eq!(d.rule, "track_event");
    assert!(!d.rules_version.is_empty());
    assert!(d.input.as_ref().unwrap().0.contains_key("properties"));
    assert!(d.record.as_ref().unwrap().0.contains_key("_poison"));
    assert_eq!(d.attempts.len(), 1);
    assert_eq!(d.attempts[0].status, 400);

    // Replayed by id before the fix, it is refused again and comes back as a new dead letter;
    // an id that is no dead letter is named.
    let again = admin
        .replay_dead_letters(authed(
            &token,
            pb::ReplayDeadLettersRequest {
                ids: vec![d.id, 999_999],
                filter: None,
                remap: false,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (again.replayed, again.not_found.clone()),
        (1, vec![999_999]),
        "{again:?}"
    );
    loop {
        let list = admin
            .list_dead_letters(authed(&token, pb::ListDeadLettersRequest::default()))
            .await
            .unwrap()
            .into_inner();
        if list.dead_letters.len() == 1 && list.dead_letters[0].id != d.id {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // After the fix, a replay delivers it.
    emu.emulator.set_faults(Faults::default());
    let filter = pb::DeadLetterFilter {
        reason: "_poison".into(),
        ..Default::default()
    };
    let replayed = admin
        .replay_dead_letters(authed(
            &token,
            pb::ReplayDeadLettersRequest {
                ids: vec![],
                filter: Some(filter),
                remap: false,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed.replayed, 1);
    let records = emu.wait_for_records(STREAM, 6).await;
    assert!(records.iter().any(|r| r.get("_poison") == Some(&json!(true))));
    let list = admin
        .list_dead_letters(authed(&token, pb::ListDeadLettersRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(list.dead_letters.is_empty());
    relay.stop().await;
}

async fn a_wrong_stream_pauses_with_the_hint_and_resumes_by_itself_once_it_exists(backend: Backend) {
    let emu = EmulatorHandle::start().await;
    let (mut settings, _fx) = settings_on(backend, &emu.url(), TOKEN).await;
    settings.lytics.as_mut().unwrap().stream = StreamName::new("Datafly_Events").unwrap();
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    let mut client = relay.client().await;
    for i in 0..3 {
        client
            .send(pb::SendRequest {
                event: Some(track(&format!("s{i}"), json!({}))),
            })
            .await
            .unwrap();
    }
    let pause = wait_paused(&relay).await;
    assert_eq!(pause["status"], json!(404));
    assert!(
        pause["hint"].as_str().unwrap().contains("case-sensitive"),
        "{pause}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(emu.emulator.stream_events("Datafly_Events").is_empty());
    // The probe finds the stream once it exists, and every held event is delivered.
    emu.emulator.add_stream("Datafly_Events");
    emu.wait_for_records("Datafly_Events", 3).await;
    relay.stop().await;
}

async fn a_wrong_account_or_token_holds_events_until_the_config_is_fixed(backend: Backend) {
    let emu = EmulatorHandle::start().await;
    for (fix, status, hint) in [
        ("account", 400, "Account > Account Settings"),
        ("token", 401, "API Tokens"),
    ] {
        let (mut settings, _fx) = settings_on(backend, &emu.url(), TOKEN).await;
        let good = settings.clone();
        match fix {
            "account" => settings.lytics.as_mut().unwrap().account_id = AccountId::new("9999").unwrap(),
            _ => {
                settings.lytics.as_mut().unwrap().api_token = lytics_relay::integration::Secret::new("wrong")
            }
        }
        let data_dir = settings.data_dir.clone();
        let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
        let mut client = relay.client().await;
        for i in 0..4 {
            client
                .send(pb::SendRequest {
                    event: Some(track(&format!("{fix}{i}"), json!({}))),
                })
                .await
                .unwrap();
        }
        let pause = wait_paused(&relay).await;
        assert_eq!(pause["status"], json!(status));
        assert!(pause["hint"].as_str().unwrap().contains(hint), "{pause}");
        // The integration comes from the relay's settings: the admin view says where to fix it.
        let token = admin_token(&data_dir).await;
        let view = relay
            .admin("GET", "/v1/admin/integrations/lytics", &token, None)
            .await;
        assert_eq!(view["status"], json!("setup_error"), "{view}");
        let detail = view["status_detail"].as_str().unwrap();
        assert!(
            detail.contains(hint) && detail.contains("change it there and restart"),
            "{view}"
        );
        relay.stop().await;
        // The fixed config, on the same data directory: every held event arrives.
        let before = emu.emulator.stream_events(STREAM).len();
        let relay = RelayHandle::start(good, Telemetry::disabled()).await;
        emu.wait_for_records(STREAM, before + 4).await;
        relay.stop().await;
    }
}

async fn a_full_queue_answers_resource_exhausted_and_recovers_as_it_drains(backend: Backend) {
    let emu = EmulatorHandle::start().await;
    emu.emulator.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    });
    let (mut settings, _fx) = settings_on(backend, &emu.url(), TOKEN).await;
    settings.queue_capacity = 5;
    settings.delivery.max_attempts = 1000;
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    let mut client = relay.client().await;
    for i in 0..5 {
        // On NATS a record being retried holds two of the stream's slots for a moment (its
        // copy is published before the original is acked): a sender told RESOURCE_EXHAUSTED
        // then retries, as senders do.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match client
                .send(pb::SendRequest {
                    event: Some(track(&format!("f{i}"), json!({}))),
                })
                .await
            {
                Ok(_) => break,
                Err(e)
                    if e.code() == tonic::Code::ResourceExhausted && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("f{i}: {e:?}"),
            }
        }
    }
    let full = client
        .send(pb::SendRequest {
            event: Some(track("f5", json!({}))),
        })
        .await
        .unwrap_err();
    assert_eq!(full.code(), tonic::Code::ResourceExhausted);
    assert!(full.message().contains("queue is full"), "{}", full.message());
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string();
    let http = reqwest::Client::new()
        .post(relay.http_url("/v1/events"))
        .header("X-Timestamp", ts)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(
        http.status().as_u16(),
        401,
        "unsigned HTTP is refused before the queue is asked"
    );
    emu.emulator.set_faults(Faults::default());
    emu.wait_for_records(STREAM, 5).await;
    let mut accepted = false;
    for _ in 0..200 {
        if client
            .send(pb::SendRequest {
                event: Some(track("f5", json!({}))),
            })
            .await
            .is_ok()
        {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(accepted, "the queue accepts again once it drains");
    emu.wait_for_records(STREAM, 6).await;
    relay.stop().await;
}

async fn faults_for_a_while_lose_nothing(backend: Backend) {
    let emu = EmulatorHandle::start().await;
    emu.emulator.set_faults(Faults {
        error_rate: 0.3,
        throttle_rate: 0.3,
        drop_rate: 0.2,
        latency_ms: 20,
        slow_rate: 0.2,
        slow_ms: 1_000,
        ..Faults::default()
    });
    // The default 5 attempts, with backoffs (3 s base, 6 s at most) that spread them past
    // the faults as the default 2 s base spreads them past a short outage, and a request
    // timeout the slow answers exceed.
    let (mut settings, _fx) = settings_on(backend, &emu.url(), TOKEN).await;
    settings.delivery.batch_max_records = 50;
    settings.delivery.request_timeout = Duration::from_millis(300);
    settings.delivery.backoff_base = Duration::from_secs(3);
    settings.delivery.backoff_max = Duration::from_secs(6);
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    let mut client = relay.client().await;
    for chunk in 0..10 {
        let events = (0..100)
            .map(|i| track(&format!("m{chunk}-{i}"), json!({})))
            .collect();
        client.send_batch(pb::SendBatchRequest { events }).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let faulted = emu.emulator.stats().faulted;
    emu.emulator.set_faults(Faults::default());
    assert!(faulted >= 2, "the emulator injected faults: {faulted}");
    let records = emu.wait_for_records(STREAM, 1000).await;
    let ids: std::collections::HashSet<&str> = records
        .iter()
        .map(|r| r["message_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 1000, "every event arrived");
    relay.stop().await;
}

/// The dead letters of the relay, once there are `n`.
async fn wait_dead_letters(relay: &RelayHandle, token: &str, n: usize) -> Vec<pb::DeadLetter> {
    let mut admin = DeadLetterServiceClient::connect(format!("http://{}", relay.grpc))
        .await
        .unwrap();
    for _ in 0..500 {
        let list = admin
            .list_dead_letters(authed(token, pb::ListDeadLettersRequest::default()))
            .await
            .unwrap()
            .into_inner();
        if list.dead_letters.len() >= n {
            return list.dead_letters;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("fewer than {n} dead letters");
}

#[tokio::test]
async fn records_queued_for_lytics_never_reach_the_built_in_emulator_after_a_restart_without_settings() {
    let emu = EmulatorHandle::start().await;
    emu.emulator.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    });
    let (settings, dir) = settings(&emu.url(), TOKEN);
    let relay = RelayHandle::start(settings.clone(), Telemetry::disabled()).await;
    let mut client = relay.client().await;
    for i in 0..3 {
        client
            .send(pb::SendRequest {
                event: Some(track(&format!("held{i}"), json!({}))),
            })
            .await
            .unwrap();
    }
    relay.stop().await;

    // Restarted without its Lytics settings (an environment file not loaded): the zero-setup
    // default, `emulator`, delivers to the built-in emulator, but not the records queued for
    // `lytics`: they become dead letters saying why, with their input kept.
    let relay = RelayHandle::start_on_own_emulator(settings.clone()).await;
    let token = admin_token(dir.path()).await;
    let dead = wait_dead_letters(&relay, &token, 3).await;
    assert_eq!(dead.len(), 3);
    for d in &dead {
        assert_eq!(d.integration, "lytics");
        assert!(
            d.reason
                .contains("integration `lytics` is not configured or installed on this relay"),
            "{}",
            d.reason
        );
    }
    let view = relay.admin("GET", "/v1/admin/integrations", &token, None).await;
    assert_eq!(view["integrations"][0]["id"], json!("emulator"), "{view}");
    relay.stop().await;

    // With the settings back and Lytics answering, a replay delivers them.
    emu.emulator.set_faults(Faults::default());
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    let mut admin = DeadLetterServiceClient::connect(format!("http://{}", relay.grpc))
        .await
        .unwrap();
    let replayed = admin
        .replay_dead_letters(authed(
            &token,
            pb::ReplayDeadLettersRequest {
                ids: dead.iter().map(|d| d.id).collect(),
                filter: None,
                remap: false,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed.replayed, 3);
    let records = emu.wait_for_records(STREAM, 3).await;
    let mut ids: Vec<&str> = records.iter().filter_map(|r| r["message_id"].as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["held0", "held1", "held2"]);
    relay.stop().await;
}
