//! The README's commands, for real: the built binary with its zero-setup emulator, driven by the
//! real grpcurl binary (installed by the test command; `GRPCURL` names it).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benches fail loudly"
)]

use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::Spawned;
use serde_json::{Value, json};

fn grpcurl_bin() -> String {
    std::env::var("GRPCURL").unwrap_or_else(|_| {
        let local = format!("{}/.tools/venv/bin/grpcurl", env!("CARGO_MANIFEST_DIR"));
        if std::path::Path::new(&local).exists() {
            local
        } else {
            "grpcurl".to_string()
        }
    })
}

fn grpcurl(args: &[&str]) -> (bool, String) {
    let out = Command::new(grpcurl_bin())
        .args(args)
        .output()
        .expect("grpcurl runs (the test command installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn send(relay: &Spawned, event: &Value) -> (bool, String) {
    let body = json!({ "event": event }).to_string();
    grpcurl(&[
        "-plaintext",
        "-d",
        &body,
        &relay.grpc,
        "lytics_relay.v1.IngestService/Send",
    ])
}

#[test]
fn grpcurl_lists_describes_sends_and_reads_violations() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Spawned::start(dir.path(), &[]);
    let emulator = relay.emulator.clone().unwrap();

    let (ok, out) = grpcurl(&["-plaintext", &relay.grpc, "list"]);
    assert!(ok, "{out}");
    for service in [
        "lytics_relay.v1.IngestService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(out.contains(service), "{service} missing from:\n{out}");
    }
    let (ok, out) = grpcurl(&[
        "-plaintext",
        &relay.grpc,
        "describe",
        "lytics_relay.v1.IngestService",
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains("rpc SendBatch") && out.contains("rpc Stream ( stream"),
        "{out}"
    );
    assert!(
        out.contains("Send accepts one event"),
        "proto comments reach grpcurl:\n{out}"
    );
    let (ok, out) = grpcurl(&["-plaintext", &relay.grpc, "grpc.health.v1.Health/Check"]);
    assert!(ok && out.contains("SERVING"), "{out}");

    // The seed's canonical event, pasted unchanged (groupId: null included).
    let track: Value =
        serde_json::from_str(&std::fs::read_to_string("tests/fixtures/signal_canonical_track.json").unwrap())
            .unwrap();
    let (ok, out) = send(&relay, &track);
    assert!(ok, "{out}");
    assert!(
        out.contains("INGEST_STATUS_ACCEPTED") && out.contains("track_event"),
        "{out}"
    );
    let page = json!({"type": "page", "name": "Home", "userId": "user_98765", "anonymousId": "anon_a1b2c3d4",
        "context": {"page": {"url": "https://shop.example.com/", "title": "Shop", "referrer": "https://google.com/"}}});
    let (ok, out) = send(&relay, &page);
    assert!(ok, "{out}");
    let identify = json!({"type": "identify", "userId": "user_98765", "traits": {"email": "Ada@Example.com", "name": "Ada"}});
    let (ok, out) = send(&relay, &identify);
    assert!(ok, "{out}");

    // A bad request: grpcurl prints the code and decodes the field violation.
    let (ok, out) = send(&relay, &json!({"type": "track", "userId": "u"}));
    assert!(!ok);
    assert!(out.contains("InvalidArgument"), "{out}");
    assert!(
        out.contains("google.rpc.BadRequest") && out.contains("event.event"),
        "{out}"
    );
    // Malformed JSON never leaves grpcurl.
    let (ok, out) = grpcurl(&[
        "-plaintext",
        "-d",
        "{\"event\": {\"type\": ",
        &relay.grpc,
        "lytics_relay.v1.IngestService/Send",
    ]);
    assert!(!ok && out.contains("error getting request data"), "{out}");

    // The merged profile and the stream, as the README shows them.
    let http = reqwest::blocking::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let profile = loop {
        let v: Value = http
            .get(format!("{}/api/entity/user/user_id/user_98765", emulator))
            .send()
            .unwrap()
            .json()
            .unwrap();
        if v["data"]["name"] == json!("Ada") && v["data"]["_e"] == json!("pv") || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let data = &profile["data"];
    assert_eq!(data["email"], json!("ada@example.com"), "{profile}");
    assert_eq!(data["anonymous_id"], json!("anon_a1b2c3d4"), "{profile}");
    assert_eq!(data["order_id"], json!("ORD-1234"), "{profile}");
    let events: Value = http
        .get(format!("{}/v2/stream/datafly_events/events?limit=0", emulator))
        .header("Authorization", "emulator-token")
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(events["data"].as_array().unwrap().len(), 3, "{events}");
}

#[test]
fn grpcurl_streams_ten_thousand_one_frame_messages() {
    use std::io::Write as _;
    // grpcurl (grpc-go) sends each message in a DATA frame of its own; many small frames waiting
    // while a chunk commits once made h2 close the connection (ENHANCE_YOUR_CALM).
    let dir = tempfile::tempdir().unwrap();
    let relay = Spawned::start(dir.path(), &[]);
    let mut input = String::new();
    for i in 0..10_000 {
        input.push_str(
            &json!({"event": {"type": "track", "event": "e", "userId": "u", "messageId": format!("m{i}")}})
                .to_string(),
        );
        input.push('\n');
    }
    let mut child = Command::new(grpcurl_bin())
        .args([
            "-plaintext",
            "-d",
            "@",
            &relay.grpc,
            "lytics_relay.v1.IngestService/Stream",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("grpcurl runs (the test command installs it)");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["accepted"], json!("10000"), "{text}");
}
