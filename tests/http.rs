//! Signal-compatible HTTP ingestion: signed like Signal's own API, validated like the gRPC door.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use common::*;
use hmac::{Hmac, Mac};
use lytics_relay::telemetry::Telemetry;
use serde_json::{Value, json};
use sha2::Sha256;

const SECRET: &str = "signal-secret";

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn signature(body: &str, ts: i64) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{ts}.{body}").as_bytes());
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn post(relay: &RelayHandle, path: &str, body: String, signed: bool) -> (u16, Value) {
    let ts = now_ms();
    let mut req = reqwest::Client::new()
        .post(relay.http_url(path))
        .header("content-type", "application/json");
    if signed {
        req = req
            .header("X-Timestamp", ts.to_string())
            .header("X-Signature", signature(&body, ts));
    }
    let r = req.body(body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn relay(emu: &EmulatorHandle) -> (RelayHandle, tempfile::TempDir) {
    let (mut settings, dir) = settings(&emu.url(), TOKEN);
    settings.signal_secret = Some(lytics_relay::integration::Secret::new(SECRET));
    (RelayHandle::start(settings, Telemetry::disabled()).await, dir)
}

#[tokio::test]
async fn signed_events_and_batches_are_accepted_like_grpc() {
    let emu = EmulatorHandle::start().await;
    let (relay, _dir) = relay(&emu).await;
    let track = fixture("signal_canonical_track.json");
    let (status, body) = post(&relay, "/v1/events", track.to_string(), true).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["success"], json!(true));
    assert_eq!(body["status"], json!("accepted"));
    assert_eq!(body["rules"], json!(["track_event"]));

    let batch = json!({"batch": [
        {"type": "page", "userId": "u1", "messageId": "b-1"},
        {"type": "page"},
        {"type": "identify", "userId": "u1", "traits": {"plan": "pro"}, "messageId": "b-2"}
    ]});
    let (status, body) = post(&relay, "/v1/batch", batch.to_string(), true).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["accepted"].as_u64(), body["rejected"].as_u64()),
        (Some(2), Some(1)),
        "{body}"
    );
    // Taken: a sender checking `success` must not resend the accepted events with the refused one.
    assert_eq!(body["success"], json!(true), "{body}");
    assert_eq!(
        body["results"][1]["error"]["violations"][0]["field"],
        json!("batch[1].userId")
    );
    // The same event again is a duplicate by its messageId.
    let (_, body) = post(&relay, "/v1/events", track.to_string(), true).await;
    assert_eq!(body["status"], json!("duplicate"), "{body}");
    // An event nested past the JSON parser's own limit is refused alone, as a bare array too.
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let batch = format!(
        r#" [{{"type": "page", "userId": "u2", "messageId": "b-3"}},
             {{"type": "page", "userId": "u2", "properties": {{"deep": {deep}}}}}] "#
    );
    let (status, body) = post(&relay, "/v1/batch", batch, true).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["accepted"].as_u64(), body["rejected"].as_u64()),
        (Some(1), Some(1)),
        "{body}"
    );
    let refused = &body["results"][1]["error"]["violations"][0];
    assert_eq!(refused["field"], json!("batch[1]"), "{body}");
    assert!(
        refused["description"]
            .as_str()
            .unwrap()
            .contains("more than 32 levels deep"),
        "{body}"
    );
    // A batch's own `context` applies to each of its events; an event's own values win.
    let shared = json!({"batch": [
        {"type": "track", "event": "ctx", "userId": "u4", "messageId": "ctx-1",
         "context": {"page": {"title": "Own title"}}}
    ], "context": {"ip": "198.51.100.7", "page": {"url": "https://batch.example/", "title": "Shared"}}});
    let (status, body) = post(&relay, "/v1/batch", shared.to_string(), true).await;
    assert_eq!(status, 200, "{body}");
    let mut ctx = None;
    for _ in 0..500 {
        ctx = emu
            .emulator
            .stream_events(STREAM)
            .into_iter()
            .map(|e| e.record)
            .find(|r| r["message_id"] == json!("ctx-1"));
        if ctx.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let ctx = ctx.expect("the event with the batch's context arrives");
    assert_eq!(ctx["ip"], json!("198.51.100.7"), "{ctx:?}");
    assert_eq!(ctx["url"], json!("https://batch.example/"), "{ctx:?}");
    assert_eq!(ctx["title"], json!("Own title"), "{ctx:?}");
    // So do its `integrations` switches: this batch is not for Lytics, except where an event
    // says otherwise.
    let switched = json!({"batch": [
        {"type": "track", "event": "off", "userId": "u5", "messageId": "sw-off"},
        {"type": "track", "event": "on", "userId": "u5", "messageId": "sw-on", "integrations": {"Lytics": true}}
    ], "integrations": {"All": false}});
    let (status, body) = post(&relay, "/v1/batch", switched.to_string(), true).await;
    assert_eq!(status, 200, "{body}");
    let statuses: Vec<&str> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["result"]["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["ignored", "accepted"], "{body}");
    // An event's own switches are its own: a batch's `Lytics: true` does not overrule them.
    let own = json!({"batch": [
        {"type": "track", "event": "own", "userId": "u5", "messageId": "sw-own", "integrations": {"All": false}}
    ], "integrations": {"Lytics": true}});
    let (status, body) = post(&relay, "/v1/batch", own.to_string(), true).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["result"]["status"], json!("ignored"), "{body}");
    // A batch none of whose events is valid is a bad payload: 400, each event's error kept.
    let all_bad = json!([{"type": "page"}, {"type": "track", "userId": "u3"}]);
    let (status, body) = post(&relay, "/v1/batch", all_bad.to_string(), true).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        (body["accepted"].as_u64(), body["rejected"].as_u64()),
        (Some(0), Some(2))
    );
    assert_eq!(body["error"]["code"], json!("invalid_argument"), "{body}");
    let fields: Vec<&str> = body["error"]["violations"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["field"].as_str())
        .collect();
    assert_eq!(fields, ["batch[0].userId", "batch[1].event"], "{body}");
    // Neither an array nor {"batch": [...]}.
    for (bad, field) in [(r#"{"batch": 5}"#, "batch"), ("5", "body"), ("[1,", "body")] {
        let (status, body) = post(&relay, "/v1/batch", bad.to_string(), true).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(
            body["error"]["violations"][0]["field"],
            json!(field),
            "{bad}: {body}"
        );
    }
    emu.wait_for_records(STREAM, 5).await;
    relay.stop().await;
}

#[tokio::test]
async fn bad_input_gets_the_same_codes_as_grpc_as_json_errors() {
    let emu = EmulatorHandle::start().await;
    let (relay, _dir) = relay(&emu).await;
    let (status, body) = post(&relay, "/v1/events", r#"{"type": "page"}"#.into(), false).await;
    assert_eq!(status, 401, "unsigned: {body}");
    assert_eq!(body["error"]["code"], json!("unauthenticated"));
    let (status, body) = post(&relay, "/v1/events", "{not json".into(), true).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{body}"
    );
    let (status, body) = post(
        &relay,
        "/v1/events",
        json!({"type": "click", "userId": "u"}).to_string(),
        true,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], json!("invalid_argument"));
    assert_eq!(body["error"]["violations"][0]["field"], json!("type"));
    // The gRPC request's shape, as a grpcurl user would paste it, is named.
    let wrapped = json!({"event": {"type": "page", "userId": "u"}}).to_string();
    let (status, body) = post(&relay, "/v1/events", wrapped, true).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["violations"][0]["field"], json!("event"));
    let why = body["error"]["violations"][0]["description"].to_string();
    assert!(why.contains("post the Signal event itself"), "{body}");
    // Nesting: past the relay's limit, and past the JSON parser's own, the same kind of answer.
    for (depth, field) in [(40, "properties"), (200, "body")] {
        let deep = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        let event = format!(r#"{{"type": "page", "userId": "u", "properties": {{"deep": {deep}}}}}"#);
        let (status, body) = post(&relay, "/v1/events", event, true).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["violations"][0]["field"], json!(field), "{body}");
        let why = body["error"]["violations"][0]["description"].to_string();
        assert!(why.contains("more than 32 levels deep"), "{body}");
    }
    let big = json!({"type": "page", "userId": "u", "properties": {"blob": "x".repeat(40_000)}}).to_string();
    let (status, body) = post(&relay, "/v1/events", big, true).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], json!("payload_too_large"));
    let big_webhook = json!({"event_id": "x", "data": {"blob": "x".repeat(300_000)}}).to_string();
    let r = reqwest::Client::new()
        .post(relay.http_url("/v1/webhooks/customerio"))
        .body(big_webhook)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    // Customer.io webhooks without a configured key are refused, with the fix in the message.
    let r = reqwest::Client::new()
        .post(relay.http_url("/v1/webhooks/customerio"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--customerio-signing-key"),
        "{body}"
    );
    // An unknown path and a wrong method get the same JSON error shape.
    let r = reqwest::get(relay.http_url("/v1/nope")).await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], json!("not_found"), "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("/v1/nope"),
        "{body}"
    );
    let r = reqwest::get(relay.http_url("/v1/webhooks/customerio"))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let allow = r.headers().get("allow").map(|v| v.to_str().unwrap().to_string());
    assert!(allow.as_deref().is_some_and(|a| a.contains("POST")), "{allow:?}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], json!("method_not_allowed"), "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("GET"),
        "{body}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        emu.emulator.stream_events(STREAM).is_empty(),
        "nothing refused was delivered"
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_full_queue_answers_429_with_a_json_error_and_accepts_again_once_drained() {
    let emu = EmulatorHandle::start().await;
    emu.emulator.set_faults(lytics_relay::emulator::Faults {
        error_rate: 1.0,
        ..Default::default()
    });
    let (mut settings, _dir) = settings(&emu.url(), TOKEN);
    settings.signal_secret = Some(lytics_relay::integration::Secret::new(SECRET));
    settings.queue_capacity = 2;
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    let track =
        |id: &str| json!({"type": "track", "event": "Full", "userId": "u", "messageId": id}).to_string();
    for id in ["q1", "q2"] {
        let (status, body) = post(&relay, "/v1/events", track(id), true).await;
        assert_eq!(status, 200, "{body}");
    }
    let ts = now_ms();
    let body = track("q3");
    let r = reqwest::Client::new()
        .post(relay.http_url("/v1/events"))
        .header("content-type", "application/json")
        .header("X-Timestamp", ts.to_string())
        .header("X-Signature", signature(&body, ts))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert!(r.headers().get("retry-after").is_some(), "{:?}", r.headers());
    let error: Value = r.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("queue is full"),
        "{error}"
    );
    // The operator sees the refusal too.
    let metrics = relay.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("lytics_relay_events_refused_total{")
                && l.contains(r#"reason="queue_full""#)
                && l.contains(r#"source="signal""#)
                && l.ends_with(" 1")),
        "{metrics}"
    );
    emu.emulator.set_faults(Default::default());
    emu.wait_for_records(STREAM, 2).await;
    let mut accepted = false;
    for _ in 0..200 {
        if post(&relay, "/v1/events", track("q3"), true).await.0 == 200 {
            accepted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(accepted, "accepted again once the queue drained");
    emu.wait_for_records(STREAM, 3).await;
    relay.stop().await;
}

/// Reads what the relay sends on `conn` until it closes the connection, and how long that took.
async fn until_closed(conn: &mut tokio::net::TcpStream) -> (String, std::time::Duration) {
    use tokio::io::AsyncReadExt;
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(20), conn.read_to_end(&mut got))
        .await
        .expect("the relay should close the connection")
        .ok();
    (String::from_utf8_lossy(&got).into_owned(), started.elapsed())
}

#[tokio::test]
async fn idle_and_slow_connections_are_closed_and_bodies_share_a_memory_budget() {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    let emu = EmulatorHandle::start().await;
    let (mut settings, _dir) = settings(&emu.url(), TOKEN);
    settings.signal_secret = Some(lytics_relay::integration::Secret::new(SECRET));
    settings.max_event_bytes = 4096;
    settings.max_batch_events = 10;
    settings.http_limits.head_timeout = std::time::Duration::from_secs(1);
    // Bodies must arrive within 2 s; a request waits half a second for room in the budget.
    settings.http_limits.body_timeout = std::time::Duration::from_secs(2);
    // Room for one batch body (10 × 4096 bytes) at a time.
    settings.http_limits.body_budget_bytes = 40_960;
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;

    // A connection that sends nothing, and one that never finishes its request's head, are closed.
    let mut silent = TcpStream::connect(relay.http).await.unwrap();
    let mut half_head = TcpStream::connect(relay.http).await.unwrap();
    half_head
        .write_all(b"POST /v1/events HTTP/1.1\r\nHost: relay\r\n")
        .await
        .unwrap();
    for conn in [&mut silent, &mut half_head] {
        let (got, took) = until_closed(conn).await;
        assert!(got.is_empty(), "{got}");
        assert!(took < std::time::Duration::from_secs(10), "{took:?}");
    }

    // A body that declares 30,000 bytes holds only what it sent: the budget is taken as bytes
    // arrive. This one sends 29,990 and stops, holding them until it times out.
    let mut slow = TcpStream::connect(relay.http).await.unwrap();
    slow.write_all(b"POST /v1/batch HTTP/1.1\r\nHost: relay\r\nContent-Length: 30000\r\n\r\n")
        .await
        .unwrap();
    slow.write_all(&[b' '; 29_990]).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // Meanwhile a small body fits beside it; a large one waits for room, then gets 503. A body
    // that declares a large size but sends little is not refused for what it declares.
    let mut liar = TcpStream::connect(relay.http).await.unwrap();
    liar.write_all(b"POST /v1/batch HTTP/1.1\r\nHost: relay\r\nContent-Length: 40000\r\n\r\n[")
        .await
        .unwrap();
    let body = json!({"type": "track", "event": "fits", "userId": "u1"}).to_string();
    let (status, answer) = post(&relay, "/v1/events", body, true).await;
    assert_eq!(status, 200, "{answer}");
    let big = reqwest::Client::new()
        .post(relay.http_url("/v1/batch"))
        .header("content-type", "application/json")
        .body(vec![b' '; 20_000])
        .send()
        .await
        .unwrap();
    assert_eq!(big.status().as_u16(), 503);
    assert_eq!(big.headers()["retry-after"], "1");
    let answer: Value = big.json().await.unwrap();
    assert_eq!(answer["error"]["code"], json!("unavailable"), "{answer}");
    // The stalled bodies get 408 in the JSON error shape.
    let (got, _) = until_closed(&mut liar).await;
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    let (got, _) = until_closed(&mut slow).await;
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(got.contains(r#""code":"request_timeout""#), "{got}");

    // Its share returned, a batch body is read again.
    let batch = json!([{"type": "track", "event": "again", "userId": "u1"}]).to_string();
    let (status, answer) = post(&relay, "/v1/batch", batch, true).await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test]
async fn gzip_bodies_are_inflated_after_their_signature_is_checked() {
    use std::io::Write as _;
    let emu = EmulatorHandle::start().await;
    let (relay, _dir) = relay(&emu).await;
    let send = |body: Vec<u8>, encoding: &'static str| {
        let ts = now_ms();
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(format!("{ts}.").as_bytes());
        mac.update(&body);
        let signature = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        reqwest::Client::new()
            .post(relay.http_url("/v1/batch"))
            .header("content-type", "application/json")
            .header("content-encoding", encoding)
            .header("X-Timestamp", ts.to_string())
            .header("X-Signature", signature)
            .body(body)
            .send()
    };
    let batch = json!([{"type": "track", "event": "zipped", "userId": "u1", "messageId": "gz-1"}]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(batch.to_string().as_bytes()).unwrap();
    let zipped = gz.finish().unwrap();
    // Signed over the bytes as sent (compressed), read as the JSON inside.
    let r = send(zipped.clone(), "gzip").await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["accepted"], json!(1), "{answer}");
    let records = emu.wait_for_records(STREAM, 1).await;
    assert_eq!(records[0]["_e"], json!("zipped"));
    // Not gzip inside, or another encoding: a 400 that says which.
    let r = send(b"not gzip".to_vec(), "gzip").await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let answer: Value = r.json().await.unwrap();
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("is not valid gzip"),
        "{answer}"
    );
    let r = send(zipped, "br").await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(
        answer["error"]["violations"][0]["field"],
        json!("Content-Encoding"),
        "{answer}"
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_sender_writing_a_whole_oversized_body_first_still_reads_the_413() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let emu = EmulatorHandle::start().await;
    let (relay, _dir) = relay(&emu).await;
    // Most HTTP clients write the whole body before they read the answer: were the relay to
    // answer and close at once, they would see a reset, not the 413, and retry for ever.
    for declared in [true, false] {
        let body = vec![b' '; 8 * 1024 * 1024];
        let head = if declared {
            format!(
                "POST /v1/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            )
        } else {
            "POST /v1/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                .to_string()
        };
        let mut conn = tokio::net::TcpStream::connect(relay.http).await.unwrap();
        conn.write_all(head.as_bytes()).await.unwrap();
        if declared {
            conn.write_all(&body).await.expect("the whole body is read");
        } else {
            for chunk in body.chunks(64 * 1024) {
                conn.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                    .await
                    .unwrap();
                conn.write_all(chunk).await.expect("the whole body is read");
                conn.write_all(b"\r\n").await.unwrap();
            }
            conn.write_all(b"0\r\n\r\n").await.unwrap();
        }
        let mut answer = vec![0u8; 4096];
        let n = conn.read(&mut answer).await.unwrap();
        let text = String::from_utf8_lossy(&answer[..n]);
        assert!(text.starts_with("HTTP/1.1 413"), "declared {declared}: {text}");
        assert!(text.contains("payload_too_large"), "{text}");
    }
    relay.stop().await;
}

#[tokio::test]
async fn an_event_in_a_batch_is_measured_as_sent_as_a_lone_event_is() {
    let emu = EmulatorHandle::start().await;
    let (relay, _dir) = relay(&emu).await;
    // Compact, the event fits in 32 KB; as sent, with its spaces, it does not.
    let pad = "x".repeat(32_500);
    let spaced = format!(
        r#"{{ "type" : "track" , "event" : "E" , "userId" : "u" , "properties" : {{ "pad" : "{pad}" }} {} }}"#,
        " ".repeat(400)
    );
    let compact: Value = serde_json::from_str(&spaced).unwrap();
    assert!(compact.to_string().len() < 32 * 1024 && spaced.len() > 32 * 1024);
    let (status, _) = post(&relay, "/v1/events", spaced.clone(), true).await;
    assert_eq!(status, 413);
    let (status, body) = post(&relay, "/v1/batch", format!("[{spaced}]"), true).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["results"][0]["error"]["code"],
        json!("payload_too_large"),
        "{body}"
    );
    relay.stop().await;
}
