//! The seed's "Signal Setup" and "Testing" steps against the relay binary, in its zero-setup
//! mode: install over the admin API, send an event, see it delivered; plus auth, validation,
//! masking, persistence and two integrations side by side.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use lytics_relay::telemetry::Telemetry;
use serde_json::{Value, json};

const LYTICS_TOKEN: &str = "xxxxxxxxxxxxxxxxxxxx-seed-token";

/// A stream of the emulator other than the configured integration's, for installed ones.
const OTHER: &str = "customerio_events";

fn start(dir: &std::path::Path) -> Spawned {
    Spawned::start_env(
        dir,
        &[],
        &[(
            "RUST_LOG",
            "debug,h2=info,hyper=info,tower=info,reqwest=info,rustls=info",
        )],
    )
}

fn admin_token(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("admin-token")).unwrap()
}

struct Api {
    base: String,
    token: String,
    client: reqwest::blocking::Client,
    seen: Vec<String>,
}

impl Api {
    fn call(&mut self, method: &str, path: &str, body: Option<Value>, token: Option<&str>) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let mut req = match method {
            "GET" => self.client.get(url),
            "POST" => self.client.post(url),
            "PATCH" => self.client.patch(url),
            _ => self.client.delete(url),
        };
        if let Some(t) = token.or(Some(self.token.as_str())).filter(|t| !t.is_empty()) {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        if let Some(b) = body {
            req = req.header("Content-Type", "application/json").body(b.to_string());
        }
        let r = req.send().unwrap();
        let status = r.status().as_u16();
        let text = r.text().unwrap();
        self.seen.push(text.clone());
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

/// The fields an error answer's violations name, in order.
fn violation_fields(answer: &Value) -> Vec<&str> {
    answer["error"]["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["field"].as_str().unwrap())
        .collect()
}

fn install_body(stream: &str, account: &str) -> Value {
    json!({"name": "Lytics", "variant": "default",
           "config": {"api_token": LYTICS_TOKEN, "account_id": account, "stream_name": stream},
           "delivery_mode": "server_side"})
}

fn wait_stream(emulator: &str, stream: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v: Value = reqwest::blocking::get(format!("{emulator}/v2/stream/{stream}/events?limit=0"))
            .unwrap()
            .json()
            .unwrap();
        let events = v["data"].as_array().cloned().unwrap_or_default();
        if events.len() >= n {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {n} events in {stream}: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_seed_setup_and_testing_steps_work_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start(dir.path());
    let mut api = Api {
        base: relay.http.clone(),
        token: admin_token(dir.path()),
        client: reqwest::blocking::Client::new(),
        seen: vec![],
    };

    // Auth: missing or wrong token.
    let (s, b) = api.call("GET", "/v1/admin/integration-catalog", None, Some(""));
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (401, Some("unauthenticated")),
        "{b}"
    );
    let (s, _) = api.call("GET", "/v1/admin/integrations", None, Some("wrong"));
    assert_eq!(s, 401);
    // The refusal names the scheme; the scheme's name is case-insensitive.
    let refused = api
        .client
        .get(format!("{}/v1/admin/integrations", api.base))
        .send()
        .unwrap();
    assert_eq!(
        refused.headers()["www-authenticate"],
        "Bearer realm=\"lytics-relay admin\""
    );
    let upper = api
        .client
        .get(format!("{}/v1/admin/integrations", api.base))
        .header("authorization", format!("BEARER {}", api.token))
        .send()
        .unwrap();
    assert_eq!(upper.status().as_u16(), 200);

    // The integration library.
    let (s, cat) = api.call("GET", "/v1/admin/integration-catalog", None, None);
    assert_eq!(s, 200);
    let lytics = &cat["integrations"][0];
    assert_eq!(
        (lytics["key"].as_str(), lytics["category"].as_str()),
        (Some("lytics"), Some("cdp"))
    );
    let fields: Vec<(&str, &str, bool)> = lytics["config_fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["key"].as_str().unwrap(),
                f["type"].as_str().unwrap(),
                f["required"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        fields,
        vec![
            ("api_token", "secret", true),
            ("account_id", "string", true),
            ("stream_name", "string", true)
        ]
    );
    assert!(
        lytics["config_fields"][0]["help_text"]
            .as_str()
            .unwrap()
            .contains("API Tokens")
    );
    let (s, entry) = api.call("GET", "/v1/admin/integration-catalog/lytics", None, None);
    assert_eq!((s, entry["variants"][0]["key"].as_str()), (200, Some("default")));
    assert_eq!(entry["delivery_modes"], json!(["server_side"]));

    // Validation names every bad field.
    let (s, b) = api.call(
        "POST",
        "/v1/admin/integration-catalog/lytics/install",
        Some(json!({"config": {"api_token": " "}})),
        None,
    );
    assert_eq!(s, 400);
    let bad = violation_fields(&b);
    assert_eq!(
        bad,
        vec!["config.api_token", "config.account_id", "config.stream_name"],
        "{b}"
    );
    // Missing and malformed values, and a bad name, all in one answer.
    let (s, b) = api.call(
        "POST",
        "/v1/admin/integration-catalog/lytics/install",
        Some(
            json!({"name": "two\nlines", "config": {"api_token": "SECRETTOKEN12345abc",
                    "account_id": "", "stream_name": "bad stream/name"}}),
        ),
        None,
    );
    assert_eq!(s, 400);
    let bad = violation_fields(&b);
    assert_eq!(
        bad,
        vec!["config.account_id", "config.stream_name", "name"],
        "{b}"
    );
    let mut body = install_body("datafly_events", "1234");
    body["variant"] = json!("fancy");
    body["delivery_mode"] = json!("client_side");
    let (s, b) = api.call(
        "POST",
        "/v1/admin/integration-catalog/lytics/install",
        Some(body),
        None,
    );
    assert_eq!(s, 400);
    let msg = b["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("valid variants: default") && msg.contains("valid modes: server_side"),
        "{b}"
    );

    // The zero-setup default (`emulator`) pauses (in memory); installing replaces it, and its
    // pause with it.
    let (s, paused) = api.call("POST", "/v1/admin/integrations/emulator/pause", None, None);
    assert_eq!((s, paused["status"].as_str()), (200, Some("paused")), "{paused}");

    // The seed's install call, exactly as written.
    let (s, installed) = api.call(
        "POST",
        "/v1/admin/integration-catalog/lytics/install",
        Some(install_body("datafly_events", "1234")),
        None,
    );
    assert_eq!(s, 201, "{installed}");
    let id = installed["id"].as_str().unwrap().to_string();
    assert_eq!(installed["config"]["api_token"], json!("***"));
    assert_eq!(installed["config"]["stream_name"], json!("datafly_events"));
    assert_eq!(installed["status"], json!("active"));
    // Running the install again would deliver every event twice: refused, naming the first.
    let (s, again) = api.call(
        "POST",
        "/v1/admin/integration-catalog/lytics/install",
        Some(install_body("datafly_events", "1234")),
        None,
    );
    assert_eq!(
        (s, again["error"]["code"].as_str()),
        (409, Some("already_exists")),
        "{again}"
    );
    assert!(
        again["error"]["message"].as_str().unwrap().contains(&id),
        "{again}"
    );
    let (_, health) = api.call("GET", "/healthz", None, None);
    assert_eq!(health["paused_integrations"], json!([]), "{health}");
    // The replaced default is gone, and a call naming it says why.
    for (method, path) in [
        ("GET", "/v1/admin/integrations/emulator"),
        ("POST", "/v1/admin/integrations/emulator/pause"),
        ("DELETE", "/v1/admin/integrations/emulator"),
    ] {
        let (s, b) = api.call(method, path, None, None);
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (404, Some("not_found")),
            "{method} {path}: {b}"
        );
        assert!(
            b["error"]["message"]
                .as_str()
                .unwrap()
                .contains("built-in default"),
            "{method} {path}: {b}"
        );
    }

    // Testing step 1–2: an event via the Signal event API arrives in the stream.
    let grpcurl = std::env::var("GRPCURL")
        .unwrap_or_else(|_| format!("{}/.tools/venv/bin/grpcurl", env!("CARGO_MANIFEST_DIR")));
    let ev = json!({"event": {"type": "identify", "userId": "seed-user", "traits": {"email": "Seed@Example.com", "plan": "pro"}}});
    let out = Command::new(&grpcurl)
        .args([
            "-plaintext",
            "-d",
            &ev.to_string(),
            &relay.grpc,
            "lytics_relay.v1.IngestService/Send",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let events = wait_stream(relay.emulator.as_deref().unwrap(), "datafly_events", 1);
    assert_eq!(events[0]["record"]["user_id"], json!("seed-user"));
    // Step 3: the user's profile.
    let profile: Value = reqwest::blocking::get(format!(
        "{}/api/entity/user/email/seed@example.com",
        relay.emulator.as_deref().unwrap()
    ))
    .unwrap()
    .json()
    .unwrap();
    assert_eq!(profile["data"]["plan"], json!("pro"), "{profile}");

    // A second integration, another account and stream, side by side.
    let (s, second) = api.call(
        "POST",
        "/v1/admin/integration-catalog/lytics/install",
        Some(install_body("customerio_events", "5678")),
        None,
    );
    assert_eq!(s, 201, "{second}");
    let second_id = second["id"].as_str().unwrap().to_string();
    let (_, list) = api.call("GET", "/v1/admin/integrations?limit=1", None, None);
    assert_eq!(list["integrations"].as_array().unwrap().len(), 1);
    assert_eq!(list["has_more"], json!(true));
    let cursor = list["next_cursor"].as_str().unwrap().to_string();
    let (_, rest) = api.call(
        "GET",
        &format!("/v1/admin/integrations?cursor={cursor}"),
        None,
        None,
    );
    assert_eq!(rest["integrations"].as_array().unwrap().len(), 1);
    assert_eq!(rest["has_more"], json!(false));
    // 0 is the default page; a query that does not parse gets the JSON error.
    let (_, all) = api.call("GET", "/v1/admin/integrations?limit=0", None, None);
    assert_eq!(all["integrations"].as_array().unwrap().len(), 2, "{all}");
    let (s, bad) = api.call("GET", "/v1/admin/integrations?limit=abc", None, None);
    assert_eq!(s, 400, "{bad}");
    assert_eq!(bad["error"]["code"], json!("invalid_argument"), "{bad}");
    assert_eq!(bad["error"]["violations"][0]["field"], json!("limit"), "{bad}");
    let page = json!({"event": {"type": "page", "name": "Two", "userId": "both"}});
    let out = Command::new(&grpcurl)
        .args([
            "-plaintext",
            "-d",
            &page.to_string(),
            &relay.grpc,
            "lytics_relay.v1.IngestService/Send",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    // One event, two integrations: two records, the rule named once.
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["result"]["records"], json!(2), "{answer}");
    assert_eq!(answer["result"]["rules"].as_array().unwrap().len(), 1, "{answer}");
    wait_stream(relay.emulator.as_deref().unwrap(), "datafly_events", 2);
    wait_stream(relay.emulator.as_deref().unwrap(), "customerio_events", 1);

    // A bad update names the field, in the message as in the violations, and changes nothing.
    for (patch, field, says) in [
        (
            json!({"config": {"api_token": " "}}),
            "config.api_token",
            "must not be empty",
        ),
        // A token that could not travel in a header is refused, not left to fail every call.
        (
            json!({"config": {"api_token": "NL_TOKEN\nX"}}),
            "config.api_token",
            "control characters",
        ),
        // The refused value is not repeated: a token in the wrong shape is still a token.
        (
            json!({"config": {"api_token": 98765432123_i64}}),
            "config.api_token",
            "invalid type: integer, expected a string",
        ),
    ] {
        let (s, b) = api.call(
            "PATCH",
            &format!("/v1/admin/integrations/{second_id}"),
            Some(patch),
            None,
        );
        assert_eq!(s, 400, "{b}");
        assert_eq!(b["error"]["violations"][0]["field"], json!(field), "{b}");
        let message = b["error"]["message"].as_str().unwrap();
        assert!(message.contains(field) && message.contains(says), "{b}");
        assert!(!b.to_string().contains("98765432123"), "{b}");
    }
    // Update (rotate the token, change the name), pause, resume, test, uninstall.
    let (s, updated) = api.call(
        "PATCH",
        &format!("/v1/admin/integrations/{second_id}"),
        Some(json!({"name": "Second", "config": {"api_token": format!("{LYTICS_TOKEN}-2")}})),
        None,
    );
    assert_eq!((s, updated["name"].as_str()), (200, Some("Second")), "{updated}");
    let (s, paused) = api.call(
        "POST",
        &format!("/v1/admin/integrations/{second_id}/pause"),
        None,
        None,
    );
    assert_eq!((s, paused["status"].as_str()), (200, Some("paused")));
    let (_, resumed) = api.call(
        "POST",
        &format!("/v1/admin/integrations/{second_id}/resume"),
        None,
        None,
    );
    assert_eq!(resumed["status"], json!("active"));
    let (s, t) = api.call("POST", &format!("/v1/admin/integrations/{id}/test"), None, None);
    assert_eq!((s, t["ok"].as_bool()), (200, Some(true)), "{t}");
    let (s, _) = api.call(
        "DELETE",
        &format!("/v1/admin/integrations/{second_id}"),
        None,
        None,
    );
    assert_eq!(s, 204);
    let (s, b) = api.call("GET", &format!("/v1/admin/integrations/{second_id}"), None, None);
    assert_eq!((s, b["error"]["code"].as_str()), (404, Some("not_found")));
    // Health shows delivery state for the integrations in force only.
    let (_, health) = api.call("GET", "/healthz", None, None);
    let limits = health["calls_in_flight_limit"].as_object().unwrap();
    assert!(limits.contains_key(&id), "{health}");
    assert!(!limits.contains_key(&second_id), "{health}");

    // Persistence: a restart keeps the installed integration.
    let log = relay.log();
    drop(relay);
    let relay = start(dir.path());
    api.base = relay.http.clone();
    let (_, list) = api.call("GET", "/v1/admin/integrations", None, None);
    let ids: Vec<&str> = list["integrations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![id.as_str()], "{list}");

    // The token never appears in a response or a log line.
    let log = log + &relay.log();
    assert!(log.len() > 1000, "the relay logged");
    assert!(!log.contains(LYTICS_TOKEN), "the API token leaked into the log");
    for body in &api.seen {
        assert!(
            !body.contains(LYTICS_TOKEN),
            "the API token leaked into a response: {body}"
        );
    }
}

#[tokio::test]
async fn test_connection_carries_the_seed_troubleshooting_text() {
    let emu = EmulatorHandle::start().await;
    let (mut settings, dir) = settings(&emu.url(), TOKEN);
    settings.lytics_url = Some(emu.url());
    // No probe within the test: only the config change can resume the paused integration.
    settings.delivery.probe_interval = Duration::from_secs(3600);
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    let token = common::admin_token(dir.path()).await;
    let client = reqwest::Client::new();
    let post = |path: String, body: Value| {
        client
            .post(relay.http_url(&path))
            .header("Authorization", format!("Bearer {token}"))
            .json(&body)
            .send()
    };
    // The installed integration writes to a stream of its own (OTHER): one beside the
    // configured integration's would deliver every event twice, and is refused.
    // A wrong token with test_connection refuses the install.
    let mut body = json!({"config": {"api_token": "wrong", "account_id": ACCOUNT, "stream_name": OTHER}, "test_connection": true});
    let r = post(
        "/v1/admin/integration-catalog/lytics/install".into(),
        body.clone(),
    )
    .await
    .unwrap();
    // A bad value in the request: 400, naming the setting Lytics refused.
    assert_eq!(r.status().as_u16(), 400);
    let b: Value = r.json().await.unwrap();
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("regenerate the token in Lytics Account > API Tokens"),
        "{b}"
    );
    assert_eq!(
        b["error"]["violations"][0]["field"],
        json!("config.api_token"),
        "{b}"
    );
    let wrong_stream = json!({"config": {"api_token": TOKEN, "account_id": ACCOUNT,
        "stream_name": "DATAFLY_EVENTS"}, "test_connection": true});
    let r = post(
        "/v1/admin/integration-catalog/lytics/install".into(),
        wrong_stream.clone(),
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let b: Value = r.json().await.unwrap();
    assert_eq!(
        b["error"]["violations"][0]["field"],
        json!("config.stream_name"),
        "{b}"
    );
    assert!(
        b["error"]["message"].as_str().unwrap().contains("case-sensitive"),
        "{b}"
    );
    // Lytics failing is no fault of the request: 503, to try again.
    emu.emulator.set_faults(lytics_relay::emulator::Faults {
        error_rate: 1.0,
        ..Default::default()
    });
    let mut good = wrong_stream;
    good["config"]["stream_name"] = json!(OTHER);
    let r = post("/v1/admin/integration-catalog/lytics/install".into(), good)
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], json!("unavailable"), "{b}");
    assert!(
        b["error"]["message"].as_str().unwrap().contains("try again"),
        "{b}"
    );
    emu.emulator.set_faults(lytics_relay::emulator::Faults::default());
    // The refused integration was never installed: its test call left no metric series.
    let metrics = relay.metrics().await;
    assert!(
        !metrics.contains(r#"lytics_relay_lytics_calls_total{integration="lytics-"#),
        "{metrics}"
    );
    // A wrong stream installs (no test), then its test names the case-sensitive stream.
    body["config"]["api_token"] = json!(TOKEN);
    body["config"]["stream_name"] = json!("DATAFLY_EVENTS");
    body["test_connection"] = json!(false);
    let installed: Value = post("/v1/admin/integration-catalog/lytics/install".into(), body)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = installed["id"].as_str().unwrap();
    let t: Value = post(format!("/v1/admin/integrations/{id}/test"), json!({}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(t["ok"], json!(false));
    assert!(t["detail"].as_str().unwrap().contains("case-sensitive"), "{t}");
    // Events for it are held with a setup error, and fixing the stream delivers them.
    let mut grpc = relay.client().await;
    grpc.send(lytics_relay::proto::v1::SendRequest {
        event: Some(event(
            json!({"type": "page", "userId": "held", "messageId": "held-1"}),
        )),
    })
    .await
    .unwrap();
    let status = loop {
        let v: Value = client
            .get(relay.http_url(&format!("/v1/admin/integrations/{id}")))
            .header("Authorization", format!("Bearer {token}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["status"] == json!("setup_error") {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        status["status_detail"].as_str().unwrap().contains("404"),
        "{status}"
    );
    let r = client
        .patch(relay.http_url(&format!("/v1/admin/integrations/{id}")))
        .header("Authorization", format!("Bearer {token}"))
        .json(&json!({"config": {"stream_name": STREAM}}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        409,
        "the configured integration delivers there"
    );
    let r = client
        .patch(relay.http_url(&format!("/v1/admin/integrations/{id}")))
        .header("Authorization", format!("Bearer {token}"))
        .json(&json!({"config": {"stream_name": OTHER}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let records = emu.wait_for_records(OTHER, 1).await;
    assert_eq!(
        records[0]["message_id"],
        json!("held-1"),
        "the held event, once fixed"
    );
    let records = emu.wait_for_records(STREAM, 1).await;
    assert_eq!(
        records[0]["message_id"],
        json!("held-1"),
        "and by the configured one"
    );
    // The config-managed integration is read-only here.
    let r = client
        .delete(relay.http_url("/v1/admin/integrations/lytics"))
        .header("Authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 409);
    // It can be paused and resumed, in memory: events wait meanwhile.
    let r = post("/v1/admin/integrations/lytics/pause".into(), json!({}))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let b: Value = r.json().await.unwrap();
    assert_eq!(
        (b["status"].as_str(), b["managed_by"].as_str()),
        (Some("paused"), Some("config")),
        "{b}"
    );
    let mut c = relay.client().await;
    c.send(lytics_relay::proto::v1::SendRequest {
        event: Some(event(
            json!({"type": "page", "userId": "u", "messageId": "while-paused"}),
        )),
    })
    .await
    .unwrap();
    // The installed integration delivers it; the paused one holds it.
    let sent = |emu: &EmulatorHandle| {
        [STREAM, OTHER]
            .iter()
            .flat_map(|s| emu.emulator.stream_events(s))
            .filter(|r| r.record.get("message_id") == Some(&json!("while-paused")))
            .count()
    };
    let wait_for = |n: usize| {
        let emu = &emu;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while sent(emu) < n {
                assert!(std::time::Instant::now() < deadline, "{n} deliveries expected");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_for(1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sent(&emu), 1, "held by the pause");
    let r = post("/v1/admin/integrations/lytics/resume".into(), json!({}))
        .await
        .unwrap();
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["status"].as_str(), Some("active"), "{b}");
    wait_for(2).await;
    relay.stop().await;
}

#[tokio::test]
async fn installs_racing_for_one_stream_install_it_once() {
    let emu = EmulatorHandle::start().await;
    // Slow answers keep every install inside its connection test at once.
    emu.emulator.set_faults(lytics_relay::emulator::Faults {
        latency_ms: 300,
        ..Default::default()
    });
    let (mut settings, dir) = settings(&emu.url(), TOKEN);
    settings.lytics_url = Some(emu.url());
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    let token = common::admin_token(dir.path()).await;
    let client = reqwest::Client::new();
    let install = || {
        client
            .post(relay.http_url("/v1/admin/integration-catalog/lytics/install"))
            .header("Authorization", format!("Bearer {token}"))
            .json(
                &json!({"config": {"api_token": TOKEN, "account_id": ACCOUNT, "stream_name": OTHER},
                          "test_connection": true}),
            )
            .send()
    };
    let answers = futures::future::join_all((0..4).map(|_| install())).await;
    let mut statuses = Vec::new();
    for r in answers {
        let r = r.unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        if status == 409 {
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("already delivers"),
                "{body}"
            );
        }
        statuses.push(status);
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [201, 409, 409, 409], "one install wins the stream");
    let listed: Value = client
        .get(relay.http_url("/v1/admin/integrations"))
        .header("Authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let on_other = listed["integrations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["config"]["stream_name"] == json!(OTHER))
        .count();
    assert_eq!(on_other, 1, "{listed}");
    relay.stop().await;
}

#[tokio::test]
async fn an_event_two_integrations_of_one_account_send_to_one_stream_arrives_there_once() {
    use lytics_relay::normalize::json_to_struct;
    use lytics_relay::proto::v1 as pb;
    let emu = EmulatorHandle::start().await;
    let (mut settings, dir) = settings(&emu.url(), TOKEN);
    settings.lytics_url = Some(emu.url());
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    let token = common::admin_token(dir.path()).await;
    // The configured integration `lytics` delivers to the account's `datafly_events`; this one to
    // its `customerio_events`, the stream the Customer.io rules name for every integration.
    let r = reqwest::Client::new()
        .post(relay.http_url("/v1/admin/integration-catalog/lytics/install"))
        .header("Authorization", format!("Bearer {token}"))
        .json(&json!({"config": {"api_token": TOKEN, "account_id": ACCOUNT, "stream_name": OTHER}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let second: Value = r.json().await.unwrap();
    let second = second["id"].as_str().unwrap().to_string();
    let mut client = relay.client().await;
    let webhook = json!({"event_id": "once-1", "object_type": "email", "metric": "opened",
        "timestamp": 1_613_063_089, "data": {"customer_id": "42", "campaign_id": 7,
        "subject": "Hi", "recipient": "ada@example.com"}});
    let result = client
        .send_customer_io_event(pb::SendCustomerIoEventRequest {
            webhook: json_to_struct(&webhook),
        })
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    // The integration whose own stream it is sends it: its records follow its stream.
    assert_eq!(result.records, 1, "{result:?}");
    let kept_back = result
        .dropped
        .iter()
        .find(|d| d.integration == "lytics")
        .unwrap_or_else(|| panic!("no dropped record for `lytics`: {result:?}"));
    assert!(
        kept_back.reason.contains(&format!("integration `{second}`"))
            && kept_back.reason.contains("it goes there once"),
        "{kept_back:?}"
    );
    assert!(
        result.dropped.iter().all(|d| d.integration != second),
        "{result:?}"
    );
    // Delivered, the queue empties with one record in the stream.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let depth = relay.health().await["queue_depth"].as_u64();
        if depth == Some(0) && !emu.emulator.stream_events(OTHER).is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not delivered (queue depth {depth:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(emu.emulator.stream_events(OTHER).len(), 1);
    relay.stop().await;
}

#[tokio::test]
async fn the_admin_api_works_over_grpc_and_refuses_without_the_token() {
    use lytics_relay::proto::v1 as pb;
    use lytics_relay::proto::v1::admin_service_client::AdminServiceClient;
    let emu = EmulatorHandle::start().await;
    let (mut settings, dir) = settings(&emu.url(), TOKEN);
    settings.lytics_url = Some(emu.url());
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    let token = common::admin_token(dir.path()).await;
    let mut admin = AdminServiceClient::connect(format!("http://{}", relay.grpc))
        .await
        .unwrap();
    let denied = admin.list_catalog(pb::ListCatalogRequest {}).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::Unauthenticated);
    let install = pb::InstallIntegrationRequest {
        config: Some(pb::IntegrationConfig {
            api_token: TOKEN.into(),
            account_id: ACCOUNT.into(),
            stream_name: "customerio_events".into(),
        }),
        ..Default::default()
    };
    let installed = admin
        .install_integration(authed(&token, install))
        .await
        .unwrap()
        .into_inner()
        .integration
        .unwrap();
    assert_eq!(installed.config.unwrap().api_token, "***");
    let list = admin
        .list_integrations(authed(&token, pb::ListIntegrationsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        list.integrations.len(),
        2,
        "the config-managed one and the installed one"
    );
    let err = admin
        .install_integration(authed(&token, pb::InstallIntegrationRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // Caller mistakes are INVALID_ARGUMENT naming the request's own field.
    use tonic_types::StatusExt as _;
    let field_of = |e: tonic::Status| {
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        e.get_details_bad_request().unwrap().field_violations[0]
            .field
            .clone()
    };
    let e = admin
        .get_integration(authed(&token, pb::GetIntegrationRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(field_of(e), "id");
    let e = admin
        .pause_integration(authed(&token, pb::PauseIntegrationRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(field_of(e), "id");
    let e = admin
        .get_catalog_entry(authed(&token, pb::GetCatalogEntryRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(field_of(e), "key");
    let e = admin
        .list_integrations(authed(
            &token,
            pb::ListIntegrationsRequest {
                page_token: "zzz".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(field_of(e), "page_token");
    let e = admin
        .list_integrations(authed(
            &token,
            pb::ListIntegrationsRequest {
                page_size: -1,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(field_of(e), "page_size");
    let e = admin
        .update_integration(authed(
            &token,
            pb::UpdateIntegrationRequest {
                id: installed.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(field_of(e), "config");
    // An unknown id is NOT_FOUND.
    let e = admin
        .get_integration(authed(&token, pb::GetIntegrationRequest { id: "nope".into() }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    relay.stop().await;
}

#[tokio::test]
async fn records_of_an_uninstalled_integration_are_dead_lettered_naming_its_stream_and_not_replayed() {
    use lytics_relay::proto::v1 as pb;
    use lytics_relay::proto::v1::dead_letter_service_client::DeadLetterServiceClient;
    let emu = EmulatorHandle::start().await;
    let (mut settings, dir) = settings(&emu.url(), TOKEN);
    settings.lytics_url = Some(emu.url());
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    let token = common::admin_token(dir.path()).await;
    let installed = relay
        .admin(
            "POST",
            "/v1/admin/integration-catalog/lytics/install",
            &token,
            Some(json!({"config": {"api_token": TOKEN, "account_id": ACCOUNT, "stream_name": OTHER}})),
        )
        .await;
    let id = installed["id"].as_str().unwrap().to_string();
    relay
        .admin(
            "POST",
            &format!("/v1/admin/integrations/{id}/pause"),
            &token,
            None,
        )
        .await;
    // One event: a record for the configured integration (delivered) and one for the paused one.
    relay
        .client()
        .await
        .send(pb::SendRequest {
            event: Some(event(
                json!({"type": "page", "userId": "u", "messageId": "gone-1"}),
            )),
        })
        .await
        .unwrap();
    emu.wait_for_records(STREAM, 1).await;
    let r = reqwest::Client::new()
        .delete(relay.http_url(&format!("/v1/admin/integrations/{id}")))
        .header("Authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);

    let mut dead = DeadLetterServiceClient::connect(format!("http://{}", relay.grpc))
        .await
        .unwrap();
    let filter = pb::DeadLetterFilter {
        integration: id.clone(),
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let letter = loop {
        let list = dead
            .list_dead_letters(authed(
                &token,
                pb::ListDeadLettersRequest {
                    filter: Some(filter.clone()),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        if let Some(d) = list.dead_letters.into_iter().next() {
            break d;
        }
        assert!(
            Instant::now() < deadline,
            "no dead letter for the uninstalled integration"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(letter.stream, OTHER, "{letter:?}");
    assert!(letter.reason.contains("no longer exists"), "{}", letter.reason);
    // Counted as every other dead letter is.
    let metrics = relay.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("lytics_relay_records_dead_lettered_total{")
                && l.contains(&format!(r#"integration="{id}""#))
                && l.ends_with(" 1")),
        "{metrics}"
    );
    // A replay could only dead-letter them again: refused, saying why.
    let replay = pb::ReplayDeadLettersRequest {
        ids: vec![],
        filter: Some(filter),
        remap: false,
    };
    let refused = dead
        .replay_dead_letters(authed(&token, replay))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("not in force"), "{refused:?}");
    // By id, the same dead letter stays in place, and the answer says why.
    let by_id = dead
        .replay_dead_letters(authed(
            &token,
            pb::ReplayDeadLettersRequest {
                ids: vec![letter.id],
                filter: None,
                remap: false,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_id.replayed, 0, "{by_id:?}");
    assert!(by_id.not_found.is_empty(), "{by_id:?}");
    assert_eq!(by_id.unmapped.len(), 1, "{by_id:?}");
    assert_eq!(by_id.unmapped[0].id, letter.id);
    assert!(by_id.unmapped[0].reason.contains("is not in force"), "{by_id:?}");
    // So does a replay of everything, or of its stream: the dead letter keeps its id.
    for filter in [
        pb::DeadLetterFilter::default(),
        pb::DeadLetterFilter {
            stream: OTHER.into(),
            ..Default::default()
        },
    ] {
        let all = dead
            .replay_dead_letters(authed(
                &token,
                pb::ReplayDeadLettersRequest {
                    ids: vec![],
                    filter: Some(filter.clone()),
                    remap: false,
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(all.replayed, 0, "{filter:?}: {all:?}");
        assert!(!all.more, "{all:?}");
        assert_eq!(all.unmapped.len(), 1, "{all:?}");
        assert_eq!(all.unmapped[0].id, letter.id, "{all:?}");
    }
    let list = dead
        .list_dead_letters(authed(&token, pb::ListDeadLettersRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<i64> = list.dead_letters.iter().map(|d| d.id).collect();
    assert_eq!(ids, vec![letter.id], "still in place under its id");
    relay.stop().await;
}
