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
    let r = reqwest::get(relay.http_url("/healthz")).await.unwrap();
    // Not ready (a load balancer should send events elsewhere), yet alive (no restart).
    assert_eq!(r.status().as_u16(), 503);
    let h: Value = r.json().await.unwrap();
    assert_eq!(h["queue"]["connected"], json!(false), "{h}");
    assert_eq!(h["status"], json!("queue_unreachable"), "{h}");
    let live = reqwest::get(relay.http_url("/livez")).await.unwrap();
    assert_eq!(live.status().as_u16(), 200);

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

/// Starts the built binary as one replica on `nats` and returns it with its gRPC address.
fn spawn_replica(dir: &std::path::Path, emulator: &str, nats: &str) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let config = dir.join("relay.yaml");
    std::fs::write(
        &config,
        "queue: { ack_wait_secs: 2 }\ndelivery: { linger_ms: 10 }\n",
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lytics-relay"))
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .args(["--rules", "rules", "--log-format", "json", "--queue-url", nats])
        .args(["--lytics-url", emulator, "--lytics-api-token", TOKEN])
        .args(["--lytics-account-id", ACCOUNT, "--lytics-stream", STREAM])
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir)
        .env("RUST_LOG", "info")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && let Some(g) = v["fields"]["grpc"].as_str()
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(g.to_string());
            }
        }
    });
    let grpc = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the relay did not start");
    (child, grpc)
}

/// Sends single events to `grpc` until `until`, or the first refusal; returns the acknowledged ids.
async fn load(grpc: String, prefix: String, until: Instant) -> Vec<String> {
    let mut client = lytics_relay::proto::v1::ingest_service_client::IngestServiceClient::connect(format!(
        "http://{grpc}"
    ))
    .await
    .unwrap();
    let mut acked = Vec::new();
    let mut i = 0;
    while Instant::now() < until {
        let id = format!("{prefix}-{i}");
        if client
            .send(pb::SendRequest {
                event: Some(track(&id)),
            })
            .await
            .is_err()
        {
            break;
        }
        acked.push(id);
        i += 1;
    }
    acked
}

/// Waits until every id in `acked` reached Lytics.
async fn wait_delivered(emu: &EmulatorHandle, acked: &[String], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let seen = deliveries(emu);
        let missing: Vec<&String> = acked.iter().filter(|id| !seen.contains_key(*id)).collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} acknowledged event(s) never delivered, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_replica_under_load_loses_nothing_the_other_finishes_its_work() {
    let nats = NatsServer::start().await;
    let emu = EmulatorHandle::start().await;
    // Slow collect calls, so the killed replica dies holding leased records.
    emu.emulator.set_faults(lytics_relay::emulator::Faults {
        latency_ms: 100,
        ..Default::default()
    });
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut a, grpc_a) = spawn_replica(dir_a.path(), &emu.url(), &nats.url());
    let (mut b, grpc_b) = spawn_replica(dir_b.path(), &emu.url(), &nats.url());
    let start = Instant::now();
    let mut senders = Vec::new();
    for w in 0..2 {
        let end = start + Duration::from_millis(2500);
        senders.push(tokio::spawn(load(grpc_a.clone(), format!("a{w}"), end)));
        senders.push(tokio::spawn(load(grpc_b.clone(), format!("b{w}"), end)));
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    a.kill().unwrap();
    a.wait().unwrap();
    let mut acked = Vec::new();
    for s in senders {
        acked.extend(s.await.unwrap());
    }
    assert!(
        acked.iter().filter(|id| id.starts_with('a')).count() > 10,
        "replica A acknowledged too little before it was killed"
    );
    let from_a = acked.iter().filter(|id| id.starts_with('a')).count();
    println!(
        "replica kill: {} events acknowledged ({from_a} by the killed replica), {} delivered before the kill settled",
        acked.len(),
        deliveries(&emu).len()
    );
    emu.emulator.set_faults(lytics_relay::emulator::Faults::default());
    // Replica B alone delivers everything, including what A held when it died.
    wait_delivered(&emu, &acked, Duration::from_secs(60)).await;
    b.kill().unwrap();
    b.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_with_r3_streams_survives_losing_a_node() {
    let mut nodes = NatsServer::cluster(3).await;
    // Wait for the JetStream meta group to elect a leader before creating R3 streams.
    let urls: Vec<String> = nodes.iter().map(NatsServer::url).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(client) = async_nats::connect(urls[0].as_str()).await
            && async_nats::jetstream::new(client).query_account().await.is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cluster never got a JetStream leader"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let emu = EmulatorHandle::start().await;
    let (mut s, _dir) = settings(&emu.url(), TOKEN);
    s.queue_backend = lytics_relay::config::QueueBackend::Nats;
    s.nats.urls = urls;
    s.nats.replicas = 3;
    s.nats.ack_wait = Duration::from_secs(2);
    let relay = RelayHandle::start(s, Telemetry::disabled()).await;
    let mut acked: Vec<String> = Vec::new();
    let mut client = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.is_none() {
        assert!(
            Instant::now() < deadline,
            "the relay did not start on the cluster"
        );
        client = lytics_relay::proto::v1::ingest_service_client::IngestServiceClient::connect(format!(
            "http://{}",
            relay.grpc
        ))
        .await
        .ok();
    }
    let mut client = client.unwrap();
    let mut send = async |id: String| {
        let deadline = Instant::now() + Duration::from_secs(30);
        // Refusals while the client fails over are retried, as a sender would.
        while client
            .send(pb::SendRequest {
                event: Some(track(&id)),
            })
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "`{id}` was never accepted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        id
    };
    for i in 0..50 {
        acked.push(send(format!("c-before-{i}")).await);
    }
    nodes[0].kill();
    for i in 0..50 {
        acked.push(send(format!("c-after-{i}")).await);
    }
    wait_delivered(&emu, &acked, Duration::from_secs(60)).await;
    relay.stop().await;
}

#[tokio::test]
async fn an_integration_installed_on_one_replica_is_in_force_on_the_other() {
    let nats = NatsServer::start().await;
    let emu = EmulatorHandle::start().await;
    let mut relays = Vec::new();
    let mut dirs = Vec::new();
    for _ in 0..2 {
        let (mut s, dir) = settings(&emu.url(), TOKEN);
        use_nats(&mut s, &nats);
        s.lytics_url = Some(emu.url());
        s.admin_token = Some(lytics_relay::integration::Secret::new("admin-secret"));
        relays.push(RelayHandle::start(s, Telemetry::disabled()).await);
        dirs.push(dir);
    }
    let (a, b) = (&relays[0], &relays[1]);
    let http = reqwest::Client::new();
    let admin = |req: reqwest::RequestBuilder| req.bearer_auth("admin-secret");
    // Wait until both serve.
    for r in [a, b] {
        let deadline = Instant::now() + Duration::from_secs(20);
        while http.get(r.http_url("/healthz")).send().await.is_err() {
            assert!(Instant::now() < deadline, "a relay did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let installed: Value = admin(http.post(a.http_url("/v1/admin/integration-catalog/lytics/install")))
        .json(&json!({"name": "Second", "variant": "default", "delivery_mode": "server_side",
                      "config": {"api_token": TOKEN, "account_id": ACCOUNT, "stream_name": "customerio_events"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = installed["id"].as_str().unwrap().to_string();
    let view = |r: &RelayHandle| admin(http.get(r.http_url(&format!("/v1/admin/integrations/{id}"))));
    // B learns of the install from the bucket's watch: wait until it is in force there (a dry
    // run for it is answered), not merely stored.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = admin(http.post(b.http_url("/v1/admin/rules/dry-run")))
            .json(
                &json!({"integration": id, "event": {"type": "track", "event": "Probe",
                          "userId": "u-1", "messageId": "probe-1"}}),
            )
            .send()
            .await
            .unwrap()
            .status();
        if s == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replica B never saw the installed integration ({s})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // An event sent to B is delivered to the integration installed on A.
    let mut client = b.client().await;
    client
        .send(pb::SendRequest {
            event: Some(track("shared-1")),
        })
        .await
        .unwrap();
    emu.wait_for_records("customerio_events", 1).await;
    // A pause on A holds delivery on B too.
    let paused = admin(http.post(a.http_url(&format!("/v1/admin/integrations/{id}/pause"))))
        .send()
        .await
        .unwrap();
    assert_eq!(paused.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v: Value = view(b).send().await.unwrap().json().await.unwrap();
        if v["status"] == json!("paused") {
            break;
        }
        assert!(Instant::now() < deadline, "replica B never saw the pause: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client
        .send(pb::SendRequest {
            event: Some(track("shared-2")),
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        emu.emulator.stream_events("customerio_events").len(),
        1,
        "held while paused"
    );
    let resumed = admin(http.post(a.http_url(&format!("/v1/admin/integrations/{id}/resume"))))
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status(), 200);
    emu.wait_for_records("customerio_events", 2).await;
    for r in relays {
        r.stop().await;
    }
}

#[tokio::test]
async fn records_for_an_integration_one_replica_lacks_are_left_for_the_replica_that_has_it() {
    let nats = NatsServer::start().await;
    let emu = EmulatorHandle::start().await;
    // A delivers its configured integration `lytics` to the emulator. B runs on its own
    // emulator's zero-setup integration `emulator`, so `lytics` is A's alone; an integration
    // installed on B is shared with A through the NATS bucket.
    let (mut a, _dir_a) = settings(&emu.url(), TOKEN);
    let (mut b, _dir_b) = settings(&emu.url(), TOKEN);
    use_nats(&mut a, &nats);
    use_nats(&mut b, &nats);
    a.admin_token = Some(lytics_relay::integration::Secret::new("admin-secret"));
    b.admin_token = Some(lytics_relay::integration::Secret::new("admin-secret"));
    b.lytics_url = Some(emu.url());
    let relay_a = RelayHandle::start(a, Telemetry::disabled()).await;
    let relay_b = RelayHandle::start_on_own_emulator(b).await;
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while http.get(relay_b.http_url("/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "B did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = http
        .post(relay_b.http_url("/v1/admin/integration-catalog/lytics/install"))
        .bearer_auth("admin-secret")
        .json(&json!({"config": {"api_token": TOKEN, "account_id": ACCOUNT, "stream_name": "customerio_events"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let installed: Value = r.json().await.unwrap();
    let id = installed["id"].as_str().unwrap().to_string();
    // A learns of the install from the bucket's watch; events it maps before then have no
    // record for it, so wait until A has it in force (a dry run for it is then answered).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = http
            .post(relay_a.http_url("/v1/admin/rules/dry-run"))
            .bearer_auth("admin-secret")
            .json(
                &json!({"integration": id, "event": {"type": "track", "event": "Probe",
                          "userId": "u-1", "messageId": "probe-1"}}),
            )
            .send()
            .await
            .unwrap()
            .status();
        if s == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replica A never saw the installed integration ({s})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Events sent to A: each makes a `lytics` record (only A has that integration) and one for
    // the installed integration. B leases some of the `lytics` ones and must leave them to A.
    send_all(&relay_a, "lacks", 200).await;
    emu.wait_for_records(STREAM, 200).await;
    emu.wait_for_records("customerio_events", 200).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = deliveries(&emu);
    assert_eq!(seen.len(), 200, "every `lytics` record arrived");
    assert!(seen.values().all(|n| *n == 1), "each once: {seen:?}");
    let mut dead = lytics_relay::proto::v1::dead_letter_service_client::DeadLetterServiceClient::connect(
        format!("http://{}", relay_b.grpc),
    )
    .await
    .unwrap();
    let mut req = tonic::Request::new(lytics_relay::proto::v1::ListDeadLettersRequest::default());
    req.metadata_mut()
        .insert("authorization", "Bearer admin-secret".parse().unwrap());
    let list = dead.list_dead_letters(req).await.unwrap().into_inner();
    assert!(list.dead_letters.is_empty(), "{:?}", list.dead_letters);
    relay_a.stop().await;
    relay_b.stop().await;
}

/// A record for `integration` of event `event_id`, as the queue tests enqueue them.
fn queued_record(integration: &str, event_id: &str) -> lytics_relay::queue::NewRecord {
    lytics_relay::queue::NewRecord {
        integration: integration.into(),
        stream: "s".into(),
        timestamp_field: "_ts".into(),
        rule: "r".into(),
        rules_version: "v".into(),
        source: lytics_relay::rules::Source::Signal,
        event_id: event_id.into(),
        event_type: "track".into(),
        body: bytes::Bytes::from_static(b"{}"),
        input: bytes::Bytes::from_static(b"{}"),
        traceparent: None,
        accepted_ms: lytics_relay::timefmt::now_ms(),
    }
}

/// Leases until `n` records come back, or fails after `within`.
async fn lease_until(
    q: &lytics_relay::queue::NatsQueue,
    n: usize,
    within: Duration,
) -> Vec<lytics_relay::queue::QueuedRecord> {
    use lytics_relay::queue::Queue as _;
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n {
        assert!(Instant::now() < deadline, "{} of {n} records leased", got.len());
        got.extend(q.lease(10, &Default::default()).await.unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    got
}

/// Asserts that leases for `span` find nothing.
async fn nothing_due_for(q: &lytics_relay::queue::NatsQueue, span: Duration) {
    use lytics_relay::queue::Queue as _;
    let until = Instant::now() + span;
    while Instant::now() < until {
        let leased = q.lease(10, &Default::default()).await.unwrap();
        assert!(leased.is_empty(), "leased before due: {leased:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn nats_retries_come_forward_within_the_recheck_once_brought_forward() {
    use lytics_relay::queue::{Attempt, AttemptKind, EventRecords, Queue as _};
    use lytics_relay::queue::{NatsOptions, NatsQueue};
    use lytics_relay::timefmt::now_ms;

    let record = |integration: &str| queued_record(integration, &format!("e-{integration}"));
    let nats = NatsServer::start().await;
    let options = NatsOptions {
        urls: vec![nats.url()],
        retry_recheck: Duration::from_millis(200),
        ..Default::default()
    };
    let q = NatsQueue::connect(&options, 100, Duration::from_secs(60))
        .await
        .unwrap();
    q.enqueue(vec![EventRecords {
        dedup_key: None,
        records: vec![record("a"), record("b")],
    }])
    .await
    .unwrap();
    let leased = lease_until(&q, 2, Duration::from_secs(5)).await;
    let deferred = |detail: &str| Attempt {
        at_ms: now_ms(),
        status: Some(503),
        detail: detail.into(),
        kind: AttemptKind::Deferred,
    };
    let an_hour = 3_600_000;
    q.retry(leased, now_ms() + an_hour, deferred("Lytics down"))
        .await
        .unwrap();
    // Due in an hour: looked at every 200 ms, and handed back each time.
    nothing_due_for(&q, Duration::from_secs(1)).await;

    // Lytics is back for `a`: its retry comes within the recheck; `b`'s keeps waiting.
    q.expedite("a").await.unwrap();
    let back = lease_until(&q, 1, Duration::from_secs(5)).await;
    assert_eq!(back.len(), 1);
    assert_eq!(&*back[0].record.integration, "a");
    assert_eq!(back[0].attempts, 0, "a deferral spends no attempt");
    assert_eq!(back[0].history.len(), 1);
    assert_eq!(back[0].history[0].kind, AttemptKind::Deferred);

    // A retry scheduled after that waits its own time again.
    tokio::time::sleep(Duration::from_millis(5)).await;
    q.retry(back, now_ms() + an_hour, deferred("down again"))
        .await
        .unwrap();
    nothing_due_for(&q, Duration::from_secs(1)).await;
}

#[tokio::test]
async fn two_replicas_replaying_the_same_dead_letters_at_once_requeue_each_once() {
    use lytics_relay::queue::{DeadLetterFilter, EventRecords, Queue as _, Replay};
    use lytics_relay::queue::{NatsOptions, NatsQueue};
    let nats = NatsServer::start().await;
    let options = NatsOptions {
        urls: vec![nats.url()],
        ..Default::default()
    };
    let a = NatsQueue::connect(&options, 1000, Duration::from_secs(60))
        .await
        .unwrap();
    let b = NatsQueue::connect(&options, 1000, Duration::from_secs(60))
        .await
        .unwrap();
    let n = 40;
    let record = |i: usize| queued_record("lytics", &format!("dl-{i}"));
    a.enqueue(
        (0..n)
            .map(|i| EventRecords {
                dedup_key: Some(format!("dl-{i}").into()),
                records: vec![record(i)],
            })
            .collect(),
    )
    .await
    .unwrap();
    let leased = lease_until(&a, n, Duration::from_secs(10)).await;
    a.dead_letter(leased, "refused".into()).await.unwrap();
    let ids = a
        .dead_letter_ids(DeadLetterFilter {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(ids.len(), n);
    let replays: Vec<Replay> = ids.iter().map(|&id| Replay { id, remapped: None }).collect();
    // Both replicas replay every dead letter at the same moment.
    let (ra, rb) = tokio::join!(a.replay_records(&replays), b.replay_records(&replays));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(
        ra.len() + rb.len(),
        n,
        "each replayed once: {} + {}",
        ra.len(),
        rb.len()
    );
    // The records stream holds each once.
    let requeued = lease_until(&b, n, Duration::from_secs(10)).await;
    assert_eq!(requeued.len(), n);
    nothing_due_for(&a, Duration::from_millis(500)).await;
    let left = a
        .dead_letter_ids(DeadLetterFilter {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_stored_by_two_replicas_at_once_is_never_a_store_failure() {
    use lytics_relay::queue::{EventRecords, Queue as _, QueueError};
    use lytics_relay::queue::{NatsOptions, NatsQueue};
    let nats = NatsServer::start().await;
    let options = NatsOptions {
        urls: vec![nats.url()],
        ..Default::default()
    };
    let a = std::sync::Arc::new(
        NatsQueue::connect(&options, 10_000, Duration::from_secs(60))
            .await
            .unwrap(),
    );
    let b = std::sync::Arc::new(
        NatsQueue::connect(&options, 10_000, Duration::from_secs(60))
            .await
            .unwrap(),
    );
    // Several records an event (ids `race-i#0`, `#1`, …): more writes of one id that overlap.
    let event = |i: usize| {
        vec![EventRecords {
            dedup_key: Some(format!("race-{i}").into()),
            records: vec![queued_record("lytics", &format!("race-{i}")); 20],
        }]
    };
    let mut stored = 0;
    for i in 0..100 {
        let (ea, eb) = (event(i), event(i));
        let (qa, qb) = (a.clone(), b.clone());
        let (ra, rb) = tokio::join!(
            tokio::spawn(async move { qa.enqueue(ea).await }),
            tokio::spawn(async move { qb.enqueue(eb).await })
        );
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        for r in [ra, rb] {
            match r {
                Ok(dup) if !dup[0] => stored += 1,
                // The other call stored it, or is storing it (the sender retries and hears
                // DUPLICATE): never an outage of the store.
                Ok(_) | Err(QueueError::InProcess) => {}
                Err(e) => panic!("round {i}: {e}"),
            }
        }
    }
    assert_eq!(stored, 100, "each event stored once");
}
