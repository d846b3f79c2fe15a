//! `kill -9` under load: every event the relay acknowledged reaches Lytics after restarts.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use lytics_relay::proto::v1 as pb;
use lytics_relay::proto::v1::ingest_service_client::IngestServiceClient;
use rand::Rng;
use serde_json::json;

const ROUNDS: usize = 10;

/// Starts the built binary on port 0, delivering to the test's emulator.
fn spawn(data_dir: &std::path::Path, emulator: &str) -> Spawned {
    Spawned::start(
        data_dir,
        &[
            "--lytics-url",
            emulator,
            "--lytics-api-token",
            TOKEN,
            "--lytics-account-id",
            ACCOUNT,
            "--lytics-stream",
            STREAM,
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_repeated_kill_9() {
    let emu = EmulatorHandle::start().await;
    let dir = tempfile::tempdir().unwrap();
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut next = 0u64;
    for round in 0..ROUNDS {
        let mut relay = spawn(dir.path(), &emu.url());
        let client = IngestServiceClient::connect(format!("http://{}", relay.grpc))
            .await
            .unwrap();
        let run_for = Duration::from_millis(rand::rng().random_range(150..600));
        let deadline = Instant::now() + run_for;
        let mut senders = Vec::new();
        for worker in 0..4u64 {
            let mut client = client.clone();
            let acked = acked.clone();
            let base = next + worker * 1_000_000;
            senders.push(tokio::spawn(async move {
                let mut i = 0;
                while Instant::now() < deadline && i < 100_000 {
                    let id = format!("r{round}-{base}-{i}");
                    let e = event(json!({"type": "track", "event": "Load", "userId": "u", "messageId": id}));
                    let batch = i % 3 == 0;
                    let ok = if batch {
                        let ids: Vec<String> = (0..10).map(|k| format!("{id}-{k}")).collect();
                        let events = ids
                            .iter()
                            .map(|m| {
                                event(
                                    json!({"type": "track", "event": "Load", "userId": "u", "messageId": m}),
                                )
                            })
                            .collect();
                        match client.send_batch(pb::SendBatchRequest { events }).await {
                            Ok(_) => {
                                acked.lock().unwrap().extend(ids);
                                true
                            }
                            Err(_) => false,
                        }
                    } else {
                        match client.send(pb::SendRequest { event: Some(e) }).await {
                            Ok(_) => {
                                acked.lock().unwrap().insert(id);
                                true
                            }
                            Err(_) => false,
                        }
                    };
                    if !ok {
                        break;
                    }
                    i += 1;
                }
            }));
        }
        tokio::time::sleep(run_for).await;
        // SIGKILL while the senders are still sending.
        relay.kill();
        for s in senders {
            let _ = s.await;
        }
        next += 10_000_000;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 100,
        "the load generator got {} events acknowledged",
        acked.len()
    );

    // A last start delivers whatever the killed processes left queued.
    let mut relay = spawn(dir.path(), &emu.url());
    let deadline = Instant::now() + Duration::from_secs(60);
    let (delivered, counts) = loop {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for e in emu.emulator.stream_events(STREAM) {
            if let Some(id) = e.record.get("message_id").and_then(|v| v.as_str()) {
                *counts.entry(id.to_string()).or_default() += 1;
            }
        }
        let delivered: HashSet<String> = counts.keys().cloned().collect();
        if acked.is_subset(&delivered) || Instant::now() > deadline {
            break (delivered, counts);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    relay.kill();
    let lost: Vec<&String> = acked.difference(&delivered).take(10).collect();
    let duplicates = counts.values().filter(|n| **n > 1).count();
    println!(
        "crash test: {ROUNDS} kill -9 rounds, {} events acknowledged, {} delivered, {} delivered more than once",
        acked.len(),
        delivered.len(),
        duplicates
    );
    assert!(
        lost.is_empty(),
        "acknowledged events lost: {lost:?} (and maybe more)"
    );
}
