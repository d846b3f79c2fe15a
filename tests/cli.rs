//! The binary's command line: refusing broken rules, pushing LQL, and stopping cleanly.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lytics-relay"))
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
    let lines: Vec<Value> = log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(
        lines.iter().any(|v| v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("shutdown complete: graceful"))),
        "{log}"
    );
}
