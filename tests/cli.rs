//! The binary's command line: refusing broken rules, pushing LQL, and stopping cleanly.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::process::Command;

use common::*;
use serde_json::{Value, json};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lytics-relay"))
}

/// The first JSON log line whose message contains `text`.
fn logged(log: &str, text: &str) -> Option<Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["fields"]["message"].as_str().is_some_and(|m| m.contains(text)))
}

#[test]
fn serve_refuses_to_start_with_a_broken_rule_file() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        "source: signal\nrules:\n  - name: r\n    fields:\n      x: { from: $.a, transform: lowercas }\n",
    )
    .unwrap();
    let out = bin()
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--emulator-addr",
            "127.0.0.1:0",
            "--rules",
        ])
        .arg(&rules)
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the rules cannot be used") && err.contains("unknown transform `lowercas`"),
        "{err}"
    );
    assert!(err.contains("rules.yaml:5:"), "names the line: {err}");
}

#[test]
fn a_bad_config_reports_every_problem_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.yaml");
    std::fs::write(&config, "http_addr: nowhere\ndelivery: { max_attempts: 0 }\n").unwrap();
    let out = bin()
        .args(["serve", "--lytics-account-id", "1234", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "http_addr",
        "delivery.max_attempts",
        "lytics.api_token",
        "lytics.stream",
    ] {
        assert!(err.contains(key), "{key} missing from:\n{err}");
    }
    // Flags and variables are checked with the file: every bad one in the same answer.
    let out = bin()
        .args([
            "serve",
            "--grpc-addr",
            "here",
            "--rules-watch",
            "sometimes",
            "--config",
        ])
        .arg(&config)
        .env("LYTICS_RELAY_EMULATOR_ADDR", "localhost:8085")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "grpc_addr (--grpc-addr): `here`",
        "rules_watch (--rules-watch): `sometimes`",
        "emulator.addr (--emulator-addr): `localhost:8085`",
        "http_addr",
        "delivery.max_attempts",
    ] {
        assert!(err.contains(key), "{key} missing from:\n{err}");
    }
}

#[test]
fn rules_lql_asks_for_the_stream_of_a_file_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("totals.yaml");
    std::fs::write(
        &file,
        "source: signal\nidentity: [user_id]\nrules:\n  - name: r\n    fields:\n      user_id: $.userId\n      total: { from: $.properties.total, merge: sum, kind: number }\n      _ts: { value: 1 }\n",
    )
    .unwrap();
    let out = bin()
        .args(["rules", "lql"])
        .arg(&file)
        .env_remove("LYTICS_RELAY_LYTICS_STREAM")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("totals.yaml") && err.contains("--lytics-stream"),
        "{err}"
    );
    let out = bin()
        .args(["rules", "lql", "--lytics-stream", "datafly_events"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("FROM datafly_events"));
}

#[tokio::test]
async fn rules_lql_push_registers_the_query_in_lytics() {
    let emu = EmulatorHandle::start().await;
    let url = emu.url();
    let out = tokio::task::spawn_blocking(move || {
        bin()
            .args([
                "rules",
                "lql",
                "rules",
                "--push",
                "--lytics-url",
                &url,
                "--lytics-api-token",
                TOKEN,
                "--lytics-account-id",
                ACCOUNT,
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("pushed query `customerio_user_fields`"));
    let queries = emu.emulator.queries();
    assert!(
        queries.iter().any(|q| q.alias == "customerio_user_fields"),
        "{queries:?}"
    );
}

#[test]
fn sigterm_stops_the_relay_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Spawned::start(dir.path(), &[]);
    let code = relay.terminate();
    let log = relay.log();
    assert_eq!(code, Some(0), "{log}");
    assert!(logged(&log, "shutdown complete: graceful").is_some(), "{log}");
}

#[test]
fn a_new_admin_token_is_not_logged_and_the_log_stays_json() {
    use std::os::unix::fs::PermissionsExt as _;
    let parent = tempfile::tempdir().unwrap();
    // A data directory the relay creates is the owner's only.
    let data = parent.path().join("new/data");
    let mut relay = Spawned::start(&data, &[]);
    assert_eq!(relay.terminate(), Some(0));
    let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{mode:o}");
    let log = relay.log();
    let token = std::fs::read_to_string(data.join("admin-token")).unwrap();
    assert!(token.trim().len() >= 32, "{token}");
    assert!(!log.contains(token.trim()), "the token is in the log:\n{log}");
    for line in log.lines() {
        assert!(serde_json::from_str::<Value>(line).is_ok(), "not JSON: {line}");
    }
    let created = logged(&log, "admin token created").unwrap_or_else(|| panic!("{log}"));
    assert!(
        created["fields"]["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("admin-token")),
        "{log}"
    );
}

#[test]
fn without_a_rules_directory_serve_runs_every_built_in_rule_file() {
    use std::io::BufRead as _;
    // Started where there is no `rules/` directory, and given none.
    let cwd = tempfile::tempdir().unwrap();
    let mut relay = bin()
        .current_dir(cwd.path())
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .args([
            "--emulator-addr",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--data-dir",
        ])
        .arg(cwd.path().join("data"))
        .env_remove("LYTICS_RELAY_LYTICS_API_TOKEN")
        .env_remove("LYTICS_RELAY_RULES")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(relay.stderr.take().unwrap());
    let loaded = stderr
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
        .find(|v| v["fields"]["message"] == json!("rules loaded"));
    relay.kill().unwrap();
    relay.wait().unwrap();
    let loaded = loaded.expect("the relay logged the rules it loaded");
    assert_eq!(loaded["fields"]["source"], json!("Embedded"), "{loaded}");
    assert_eq!(
        loaded["fields"]["files"],
        json!(2),
        "signal and customerio: {loaded}"
    );
}

#[test]
fn text_logs_into_a_file_or_pipe_carry_no_colour_codes() {
    let mut emulator = bin()
        .args(["emulator", "--addr", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(emulator.stderr.take().unwrap()),
        &mut line,
    )
    .unwrap();
    emulator.kill().unwrap();
    emulator.wait().unwrap();
    assert!(line.contains("Lytics emulator serving"), "{line}");
    assert!(!line.contains('\u{1b}'), "{line:?}");
}

/// SIGTERM while a Lytics call hangs: the relay refuses new events, stops within the grace
/// period, says the shutdown was not graceful, and the cut-off event is delivered after the
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_lytics_call_in_flight_stops_within_the_grace_and_keeps_the_event() {
    use lytics_relay::emulator::Faults;
    use lytics_relay::proto::v1 as pb;
    use lytics_relay::proto::v1::ingest_service_client::IngestServiceClient;
    use std::time::{Duration, Instant};

    let emu = EmulatorHandle::start().await;
    emu.emulator.set_faults(Faults {
        latency_ms: 10_000,
        ..Faults::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.yaml");
    std::fs::write(&config, "shutdown_grace_secs: 1\n").unwrap();
    let url = emu.url();
    let mut args = lytics_flags(&url).to_vec();
    args.extend(["--config", config.to_str().unwrap()]);
    let data = dir.path().join("data");
    let mut relay = Spawned::start(&data, &args);
    let mut client = IngestServiceClient::connect(format!("http://{}", relay.grpc))
        .await
        .unwrap();
    let sent = json!({"type": "track", "event": "Cut", "userId": "u", "messageId": "cut-1"});
    client
        .send(pb::SendRequest {
            event: Some(event(sent)),
        })
        .await
        .unwrap();
    // The collect call is in flight (the emulator holds it for 10 s).
    let waiting = Instant::now();
    while emu.emulator.stats().collect_requests == 0 {
        assert!(waiting.elapsed() < Duration::from_secs(10), "no collect call");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    let pid = relay.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    // While the relay waits out the grace for its Lytics call, it takes no new event.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        relay.child.try_wait().unwrap().is_none(),
        "still within the grace period"
    );
    let late = client
        .send(pb::SendRequest {
            event: Some(event(json!({"type": "track", "event": "Late", "userId": "u"}))),
        })
        .await;
    assert!(late.is_err(), "an event sent during shutdown was accepted");
    let (code, log) = tokio::task::spawn_blocking(move || {
        let code = relay.terminate();
        (code, relay.log())
    })
    .await
    .unwrap();
    let took = started.elapsed();
    assert_eq!(code, Some(2), "a shutdown that cut a call off exits 2\n{log}");
    assert!(
        took < Duration::from_secs(6),
        "stopped {took:?} after SIGTERM: the 1 s grace, not the 10 s Lytics call\n{log}"
    );
    assert!(
        logged(&log, "shutting down: health NOT_SERVING, refusing new events").is_some(),
        "{log}"
    );
    assert!(logged(&log, "shutdown complete: not graceful").is_some(), "{log}");

    emu.emulator.set_faults(Faults::default());
    let relay = Spawned::start(&data, &args);
    let records = emu.wait_for_records(STREAM, 1).await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["message_id"], "cut-1");
    drop(relay);
}
