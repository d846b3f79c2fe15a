//! Editing rules safely: check, test cases, dry runs with explanations, and hot reloads that
//! never let a broken set reach traffic.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use lytics_relay::proto::v1 as pb;
use lytics_relay::proto::v1::rules_service_client::RulesServiceClient;
use lytics_relay::telemetry::Telemetry;
use prost::Message as _;
use serde_json::{Value, json};
use tonic_types::StatusExt;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lytics-relay"))
}

/// A copy of the shipped rules (and the fixtures their cases read) to edit.
/// A copy of the shipped `rules/` directory alone (its cases' inputs included), in a temporary
/// directory as `rules/`.
fn rules_copy() -> tempfile::TempDir {
    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let p = e.unwrap().path();
            let target = to.join(p.file_name().unwrap());
            if p.is_dir() {
                copy_dir(&p, &target);
            } else {
                std::fs::copy(&p, target).unwrap();
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    copy_dir(Path::new("rules"), &dir.path().join("rules"));
    dir
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "`{from}` not in {}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn rules_check_reports_every_mistake_with_its_position_and_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.yaml");
    std::fs::write(
        &file,
        "source: signal
rules:
  - name: one
    when: { $.type: track }
    fields:
      a: { from: \"$.x[?\", transform: lowercas }
      b: { merge: count, kind: date, from: $.b }
      _ts: { from: $.timestamp, transform: epoch_ms }
    flaten: [$.properties]
  - name: one
    fields: { c: $.c, _ts: { value: 1 } }
",
    )
    .unwrap();
    let out = bin().args(["rules", "check"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stderr);
    let name = file.display().to_string();
    for want in [
        format!("{name}:6:"),
        "invalid JSONPath `$.x[?`".to_string(),
        "unknown transform `lowercas` (hint: did you mean `lowercase`?)".to_string(),
        format!("{name}:7:"),
        "merge `count` does not fit kind `date`".to_string(),
        format!("{name}:9:5: rule `one`: unknown key `flaten` in the rule (hint: did you mean `flatten`?)"),
        "two rules are named `one`".to_string(),
    ] {
        assert!(text.contains(&want), "missing `{want}` in:\n{text}");
    }
    let ok = bin().args(["rules", "check", "rules"]).output().unwrap();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[test]
fn rules_test_runs_the_cases_and_shows_a_diff_on_failure() {
    let dir = rules_copy();
    let out = bin()
        .args(["rules", "test"])
        .arg(dir.path().join("rules"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    edit(
        &dir.path().join("rules/signal.yaml"),
        "      _e: pv\n",
        "      _e: page_view\n",
    );
    let out = bin()
        .args(["rules", "test"])
        .arg(dir.path().join("rules"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("FAILED") && text.contains("a page view carries url, title and referrer"),
        "{text}"
    );
    assert!(
        text.contains("~ _e: expected \"pv\", got \"page_view\""),
        "{text}"
    );
    assert!(text.contains("1 failed"), "{text}");
}

#[tokio::test]
async fn dry_run_explains_every_field_and_the_paths_that_matched_nothing() {
    let emu = EmulatorHandle::start().await;
    let (settings, dir) = settings(&emu.url(), TOKEN);
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    let token = admin_token(dir.path()).await;
    let mut rules = RulesServiceClient::connect(format!("http://{}", relay.grpc))
        .await
        .unwrap();
    let mut req = tonic::Request::new(pb::DryRunRequest {
        event: Some(event(fixture("signal_canonical_track.json"))),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let d = rules.dry_run(req).await.unwrap().into_inner();
    assert_eq!(d.records.len(), 1);
    assert_eq!(d.records[0].rule, "track_event");
    assert_eq!(d.records[0].stream, STREAM);
    let origin = |field: &str| {
        d.fields
            .iter()
            .find(|f| f.field == field)
            .unwrap_or_else(|| panic!("no origin for {field}"))
    };
    assert_eq!(
        (origin("_e").rule.as_str(), origin("_e").source.as_str()),
        ("track_event", "$.event")
    );
    assert_eq!(origin("url").source, "$.context.page.url");
    assert_eq!(origin("_ts").transforms, vec!["epoch_ms"]);
    assert_eq!(origin("*").source, "flatten $.properties");
    let unmatched: Vec<&str> = d
        .unmatched
        .iter()
        .filter(|u| u.field == "email")
        .map(|u| u.path.as_str())
        .collect();
    assert_eq!(
        unmatched,
        vec!["$.properties.email", "$.context.traits.email", "$.traits.email"]
    );
    assert!(d.skipped_rules.contains(&"page_view".to_string()));
    // Each with the test that failed and the value it saw.
    let page_view = d.skipped.iter().find(|s| s.rule == "page_view").unwrap();
    assert_eq!(page_view.reason, r#"`$.type` is "track", not "page""#);
    assert!(
        emu.emulator.stream_events(STREAM).is_empty(),
        "a dry run delivers nothing"
    );
    // A Customer.io webhook over gRPC.
    let mut req = tonic::Request::new(pb::DryRunRequest {
        customerio_webhook: lytics_relay::normalize::json_to_struct(&fixture("customerio_email_opened.json")),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let d = rules.dry_run(req).await.unwrap().into_inner();
    assert_eq!(d.records.len(), 1, "{d:?}");
    assert_eq!(d.records[0].stream, "customerio_events");
    // An event the door cannot decode, or nested past protobuf's own limit, is the caller's
    // mistake: a field violation, as `Send` answers it, not INTERNAL.
    let nested = (0..60).fold(json!(1), |v, _| json!([v]));
    let deep = event(json!({"type": "page", "userId": "u", "properties": {"deep": nested}})).encode_to_vec();
    for (event_bytes, says) in [
        (vec![0x0a, 0x05, b'p'], "is not a valid lytics_relay.v1.Event"),
        (deep, "more than 32 levels deep"),
    ] {
        let mut body = Vec::new();
        prost::encoding::bytes::encode(1, &event_bytes, &mut body);
        let request = lytics_relay::proto::raw::DryRunRequest::decode(&body[..]).unwrap();
        let refused = relay
            .unary::<_, pb::DryRunResponse>("/lytics_relay.v1.RulesService/DryRun", authed(&token, request))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        let details = refused.get_details_bad_request().unwrap();
        assert_eq!(details.field_violations[0].field, "event", "{refused:?}");
        assert!(
            details.field_violations[0].description.contains(says),
            "{refused:?}"
        );
    }

    // The HTTP twin, with a Customer.io webhook.
    let body = json!({"source": "customerio", "event": fixture("customerio_email_opened.json")});
    let r = relay
        .admin("POST", "/v1/admin/rules/dry-run", &token, Some(body))
        .await;
    assert_eq!(r["records"][0]["record"]["cio_hourlyopens"], json!("17"), "{r}");
    let hourly = r["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["field"] == json!("cio_hourlyopens"))
        .unwrap();
    assert_eq!(
        (hourly["source"].as_str(), hourly["transforms"].clone()),
        (Some("$.timestamp"), json!(["hour_of_day"]))
    );
    let event = r["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["field"] == json!("event"))
        .unwrap();
    assert_eq!(event["source"], json!("template \"{$.object_type}_{$.metric}\""));
    relay.stop().await;
}

#[tokio::test]
async fn a_failing_case_blocks_a_reload_and_the_old_rules_keep_serving() {
    let emu = EmulatorHandle::start().await;
    let rules = rules_copy();
    let (mut settings, dir) = settings(&emu.url(), TOKEN);
    settings.rules = Some(rules.path().join("rules"));
    settings.rules_watch = false;
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    let token = admin_token(dir.path()).await;
    let reload = || relay.admin("POST", "/v1/admin/rules/reload", &token, None);
    let signal = rules.path().join("rules/signal.yaml");
    edit(&signal, "      _e: pv\n", "      _e: page_view\n");
    let r = reload().await;
    assert_eq!(r["swapped"], json!(false), "{r}");
    assert!(
        r["problems"][0]
            .as_str()
            .unwrap()
            .contains("test case `a page view carries url, title and referrer` failed"),
        "{r}"
    );
    let mut client = relay.client().await;
    client
        .send(pb::SendRequest {
            event: Some(event(json!({"type": "page", "userId": "u", "messageId": "old"}))),
        })
        .await
        .unwrap();
    let records = emu.wait_for_records(STREAM, 1).await;
    assert_eq!(records[0]["_e"], json!("pv"), "the running rules stayed in force");
    let health: Value = reqwest::get(relay.http_url("/healthz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["rules_version"], r["version"]);

    // Fixing the case puts the edit in force.
    edit(
        &signal,
        "          _e: pv\n          page_name: Pricing",
        "          _e: page_view\n          page_name: Pricing",
    );
    let r2 = reload().await;
    assert_eq!(r2["swapped"], json!(true), "{r2}");
    assert_ne!(r2["version"], r["version"]);
    client
        .send(pb::SendRequest {
            event: Some(event(json!({"type": "page", "userId": "u", "messageId": "new"}))),
        })
        .await
        .unwrap();
    let records = emu.wait_for_records(STREAM, 2).await;
    assert_eq!(records[1]["_e"], json!("page_view"));
    relay.stop().await;
}

#[tokio::test]
async fn edited_files_are_picked_up_within_a_second() {
    let emu = EmulatorHandle::start().await;
    let rules = rules_copy();
    let (mut settings, dir) = settings(&emu.url(), TOKEN);
    settings.rules = Some(rules.path().join("rules"));
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    let token = admin_token(dir.path()).await;
    let status = || relay.admin("GET", "/v1/admin/rules", &token, None);
    let before = status().await["version"].clone();
    tokio::time::sleep(Duration::from_millis(200)).await;
    edit(
        &rules.path().join("rules/signal.yaml"),
        "      locale: $.context.locale\n",
        "      locale: $.context.locale\n      lang: $.context.locale\n",
    );
    let edited = Instant::now();
    loop {
        let s = status().await;
        if s["version"] != before {
            assert_eq!(s["reloads"], json!(1));
            break;
        }
        assert!(
            edited.elapsed() < Duration::from_secs(5),
            "the edit was not picked up: {s}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    println!("rule edit live after {} ms", edited.elapsed().as_millis());
    let metrics = relay.metrics().await;
    assert!(
        metrics.lines().any(|l| l == "lytics_relay_rule_reloads_total 1"),
        "the swap is counted:\n{metrics}"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_lose_and_duplicate_nothing() {
    let emu = EmulatorHandle::start().await;
    let rules = rules_copy();
    let (mut settings, dir) = settings(&emu.url(), TOKEN);
    settings.rules = Some(rules.path().join("rules"));
    settings.rules_watch = false;
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    let token = admin_token(dir.path()).await;
    let client = relay.client().await;
    let sender = tokio::spawn(async move {
        let mut client = client;
        let mut sent = Vec::new();
        for i in 0..1500 {
            let id = format!("load-{i}");
            client
                .send(pb::SendRequest {
                    event: Some(event(
                        json!({"type": "track", "event": "E", "userId": "u", "messageId": id}),
                    )),
                })
                .await
                .unwrap();
            sent.push(id);
        }
        sent
    });
    let signal = rules.path().join("rules/signal.yaml");
    let mut versions = std::collections::HashSet::new();
    let mut description = "description: Traits merged into the user profile".to_string();
    for i in 0..6 {
        // A new description is a new version that maps exactly like the old one.
        let next = format!("description: Traits merged into the user profile ({i})");
        edit(&signal, &description, &next);
        description = next;
        let r = relay.admin("POST", "/v1/admin/rules/reload", &token, None).await;
        assert_eq!(r["swapped"], json!(true), "{r}");
        versions.insert(r["version"].as_str().unwrap().to_string());
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(versions.len(), 6);
    let sent = sender.await.unwrap();
    let records = emu.wait_for_records(STREAM, sent.len()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let records_now = emu.emulator.stream_events(STREAM);
    assert_eq!(records_now.len(), sent.len(), "nothing duplicated");
    let ids: std::collections::HashSet<&str> = records
        .iter()
        .map(|r| r["message_id"].as_str().unwrap())
        .collect();
    assert!(sent.iter().all(|id| ids.contains(id.as_str())), "nothing lost");
    relay.stop().await;
}

#[test]
fn sighup_reloads_the_rules() {
    let rules = rules_copy();
    let data = tempfile::tempdir().unwrap();
    let rules_dir = rules.path().join("rules");
    let relay = Spawned::start(
        data.path(),
        &["--rules-watch", "false", "--rules", rules_dir.to_str().unwrap()],
    );
    let http = format!("{}/healthz", relay.http);
    let before: Value = reqwest::blocking::get(&http).unwrap().json().unwrap();
    edit(
        &rules_dir.join("signal.yaml"),
        "      locale: $.context.locale\n",
        "      locale: $.context.locale\n      lang: $.context.locale\n",
    );
    std::thread::sleep(Duration::from_millis(300));
    let still: Value = reqwest::blocking::get(&http).unwrap().json().unwrap();
    assert_eq!(
        still["rules_version"], before["rules_version"],
        "no watch: nothing changes by itself"
    );
    let status = Command::new("kill")
        .args(["-HUP", &relay.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now: Value = reqwest::blocking::get(&http).unwrap().json().unwrap();
        if now["rules_version"] != before["rules_version"] {
            break;
        }
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn a_dead_letter_caused_by_a_rule_is_replayed_mapped_by_the_fixed_rule() {
    use lytics_relay::emulator::Faults;
    use lytics_relay::proto::v1::dead_letter_service_client::DeadLetterServiceClient;
    let emu = EmulatorHandle::start().await;
    // Lytics refuses records with `"_poison": true`; the track rule copies properties as they are.
    emu.emulator.set_faults(Faults {
        reject_poison: true,
        ..Faults::default()
    });
    let rules = rules_copy();
    let (mut settings, dir) = settings(&emu.url(), TOKEN);
    settings.rules = Some(rules.path().join("rules"));
    settings.rules_watch = false;
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    let token = admin_token(dir.path()).await;
    let mut client = relay.client().await;
    for (id, name) in [("rule-bug", "Clicked"), ("old-1", "Old"), ("new-1", "Clicked")] {
        client
            .send(pb::SendRequest {
                event: Some(event(json!({
                    "type": "track", "event": name, "userId": "u1", "messageId": id,
                    "properties": {"_poison": true, "plan": "pro"}
                }))),
            })
            .await
            .unwrap();
    }
    let mut admin = DeadLetterServiceClient::connect(format!("http://{}", relay.grpc))
        .await
        .unwrap();
    let dead = loop {
        let list = admin
            .list_dead_letters(authed(&token, pb::ListDeadLettersRequest::default()))
            .await
            .unwrap()
            .into_inner()
            .dead_letters;
        if list.len() == 3 {
            break list;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let id_of = |event: &str| dead.iter().find(|d| d.event_id == event).unwrap().id;

    // The rule is fixed and reloaded: the field Lytics refused is mapped to a value it takes,
    // and events named `Old` are no longer the track rule's.
    let signal = rules.path().join("rules/signal.yaml");
    edit(
        &signal,
        "      message_id: $.messageId\n      _ts: { from: $.timestamp, transform: epoch_ms, required: true }\n    flatten:\n      - $.properties\n",
        "      message_id: $.messageId\n      _ts: { from: $.timestamp, transform: epoch_ms, required: true }\n      _poison: { value: false, when: { $.properties._poison: true } }\n    flatten:\n      - $.properties\n",
    );
    edit(
        &signal,
        "  - name: track_event\n    description: A tracked action, named by `_e`, with its properties flattened\n    kind: event\n    when:\n      $.type: track\n",
        "  - name: track_event\n    description: A tracked action, named by `_e`, with its properties flattened\n    kind: event\n    when:\n      $.type: track\n      $.event: { not_in: [Old] }\n",
    );
    let r = relay.admin("POST", "/v1/admin/rules/reload", &token, None).await;
    assert_eq!(r["swapped"], json!(true), "{r}");

    // A remapping replay by id maps the stored input again with the fixed rule.
    let replay = |ids: Vec<i64>, filter: Option<pb::DeadLetterFilter>| pb::ReplayDeadLettersRequest {
        ids,
        filter,
        remap: true,
    };
    let answer = admin
        .replay_dead_letters(authed(&token, replay(vec![id_of("rule-bug"), 999_999], None)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.replayed, 1, "{answer:?}");
    assert_eq!(answer.not_found, vec![999_999]);
    assert!(answer.unmapped.is_empty(), "{answer:?}");
    let records = emu.wait_for_records(STREAM, 1).await;
    let record = &records[0];
    assert_eq!(record["message_id"], json!("rule-bug"));
    assert_eq!(record["_poison"], json!(false), "{record:?}");
    assert_eq!(
        record["plan"],
        json!("pro"),
        "the rest of the mapping is kept: {record:?}"
    );

    // By filter: `new-1` is delivered; `old-1`, which the rules no longer map, stays in place
    // and is listed with the reason. Called again, the replay ends rather than finding it
    // forever.
    let filter = pb::DeadLetterFilter {
        reason: "_poison".into(),
        ..Default::default()
    };
    let answer = admin
        .replay_dead_letters(authed(&token, replay(vec![], Some(filter.clone()))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((answer.replayed, answer.more), (1, false), "{answer:?}");
    assert_eq!(answer.unmapped.len(), 1, "{answer:?}");
    assert_eq!(answer.unmapped[0].id, id_of("old-1"));
    assert_eq!(answer.unmapped[0].reason, "rule `track_event` no longer maps it");
    let again = admin
        .replay_dead_letters(authed(&token, replay(vec![], Some(filter))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (again.replayed, again.more, again.unmapped.len()),
        (0, false, 1),
        "{again:?}"
    );
    let records = emu.wait_for_records(STREAM, 2).await;
    assert!(records.iter().any(|r| r["message_id"] == json!("new-1")));
    let left = admin
        .list_dead_letters(authed(&token, pb::ListDeadLettersRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .dead_letters;
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].event_id, "old-1");
    relay.stop().await;
}

#[tokio::test]
async fn the_built_in_emulator_follows_reloaded_rules_streams_and_merged_fields() {
    let rules = rules_copy();
    let data = tempfile::tempdir().unwrap();
    let rules_dir = rules.path().join("rules");
    let relay = Spawned::start(
        data.path(),
        &[
            "--rules-watch",
            "false",
            "--rules",
            rules_dir.to_str().unwrap(),
            "--admin-token",
            "admin-secret",
        ],
    );
    let emulator = relay.emulator.clone().unwrap();
    // Added while the relay runs: a file writing to a stream of its own, and one without
    // `stream:` (its records go to the integration's stream) whose fields merge.
    std::fs::write(
        rules_dir.join("zz_orders.yaml"),
        r#"source: signal
stream: orders
identity: [user_id]
rules:
  - name: order_to_its_stream
    when: { $.event: Order Completed }
    fields:
      user_id: $.userId
      order_id: $.properties.order_id
      _ts: { from: $.timestamp, transform: epoch_ms, required: true }
"#,
    )
    .unwrap();
    std::fs::write(
        rules_dir.join("zz_totals.yaml"),
        r#"source: signal
alias: order_totals
identity: [user_id]
rules:
  - name: order_totals
    when: { $.event: Order Completed }
    fields:
      user_id: $.userId
      orders_total: { from: $.properties.total, merge: sum, kind: number }
      order_ids: { from: $.properties.order_id, merge: set }
      _ts: { from: $.timestamp, transform: epoch_ms, required: true }
"#,
    )
    .unwrap();
    let http = reqwest::Client::new();
    let r: Value = http
        .post(format!("{}/v1/admin/rules/reload", relay.http))
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["swapped"], json!(true), "{r}");
    let mut client =
        pb::ingest_service_client::IngestServiceClient::connect(format!("http://{}", relay.grpc))
            .await
            .unwrap();
    for (id, total) in [("ORD-1", 10.5), ("ORD-2", 4.5)] {
        client
            .send(pb::SendRequest {
                event: Some(event(
                    json!({"type": "track", "event": "Order Completed", "userId": "u-orders",
                    "messageId": id, "properties": {"order_id": id, "total": total}}),
                )),
            })
            .await
            .unwrap();
    }
    // The rule's own stream exists in the emulator (no 404, no pause), and the totals merge
    // as declared (sum, set), not latest-wins.
    let deadline = Instant::now() + Duration::from_secs(20);
    let profile = loop {
        let v: Value = http
            .get(format!("{emulator}/api/entity/user/user_id/u-orders"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["data"]["orders_total"].as_f64() == Some(15.0) || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(profile["data"]["orders_total"].as_f64(), Some(15.0), "{profile}");
    // The stream's other fields still reach the profile, as Lytics' own query maps them.
    assert_eq!(profile["data"]["_e"], json!("Order Completed"), "{profile}");
    let mut ids: Vec<String> = serde_json::from_value(profile["data"]["order_ids"].clone()).unwrap();
    ids.sort();
    assert_eq!(ids, ["ORD-1", "ORD-2"], "{profile}");
    // The rule's own stream gets its records (delivered in calls of their own).
    let deadline = Instant::now() + Duration::from_secs(20);
    let orders = loop {
        let v: Value = http
            .get(format!("{emulator}/v2/stream/orders/events?limit=0"))
            .header("Authorization", "emulator-token")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["data"].as_array().map(Vec::len) == Some(2) || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(orders["data"].as_array().map(Vec::len), Some(2), "{orders}");
    let health: Value = http
        .get(format!("{}/healthz", relay.http))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["paused_integrations"], json!([]), "{health}");
}

#[tokio::test]
async fn a_pause_caused_by_a_rules_own_stream_says_to_fix_the_stream_or_the_rule() {
    let emu = EmulatorHandle::start().await;
    let rules = rules_copy();
    std::fs::write(
        rules.path().join("rules/zz_exp.yaml"),
        r#"source: signal
stream: experiments
identity: [user_id]
rules:
  - name: experiment_viewed
    when: { $.event: Experiment Viewed }
    fields:
      user_id: $.userId
      _ts: { from: $.timestamp, transform: epoch_ms, required: true }
"#,
    )
    .unwrap();
    let (mut settings, dir) = settings(&emu.url(), TOKEN);
    settings.rules = Some(rules.path().join("rules"));
    settings.rules_watch = false;
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    let token = admin_token(dir.path()).await;
    relay
        .client()
        .await
        .send(pb::SendRequest {
            event: Some(event(
                json!({"type": "track", "event": "Experiment Viewed", "userId": "u-exp"}),
            )),
        })
        .await
        .unwrap();
    // Lytics has no stream `experiments` (404): the integration pauses, and its status names
    // the rule's stream and the fix, not the relay's configuration.
    let deadline = Instant::now() + Duration::from_secs(10);
    let view = loop {
        let v = relay
            .admin("GET", "/v1/admin/integrations/lytics", &token, None)
            .await;
        if v["status"] == json!("setup_error") {
            break v;
        }
        assert!(Instant::now() < deadline, "no setup error: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let detail = view["status_detail"].as_str().unwrap();
    assert!(
        detail.contains("stream `experiments`, which a rule names"),
        "{detail}"
    );
    assert!(!detail.contains("change it there and restart"), "{detail}");
    relay.stop().await;
}
