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
    Spawned::start(data_dir, &lytics_flags(emulator))
}

/// A call a sender makes: the ids of its events, and whether it is a `SendBatch`.
#[derive(Clone)]
struct Call {
    ids: Vec<String>,
    batch: bool,
}

/// How the relay answered each event of a call (Ok) or why the call failed.
async fn make(
    client: &mut IngestServiceClient<tonic::transport::Channel>,
    call: &Call,
) -> Result<Vec<i32>, tonic::Status> {
    let event =
        |id: &String| event(json!({"type": "track", "event": "Load", "userId": "u", "messageId": id}));
    if call.batch {
        let events = call.ids.iter().map(event).collect();
        let r = client.send_batch(pb::SendBatchRequest { events }).await?;
        Ok(r.into_inner()
            .outcomes
            .iter()
            .map(|o| o.result.as_ref().map_or(-1, |r| r.status))
            .collect())
    } else {
        let r = client
            .send(pb::SendRequest {
                event: Some(event(&call.ids[0])),
            })
            .await?;
        Ok(vec![r.into_inner().result.map_or(-1, |r| r.status)])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_repeated_kill_9() {
    let emu = EmulatorHandle::start().await;
    let dir = tempfile::tempdir().unwrap();
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    // The call each sender had in flight when the relay was killed: it is sent again, as a
    // client whose call failed does, with the same ids.
    let mut interrupted: Vec<Option<Call>> = vec![None; 4];
    // Events of those calls the restarted relay answered DUPLICATE: stored before the kill,
    // their answer lost.
    let mut retried_duplicates = 0;
    let mut retried = 0;
    let mut next = 0u64;
    for round in 0..ROUNDS {
        let mut relay = spawn(dir.path(), &emu.url());
        let client = IngestServiceClient::connect(format!("http://{}", relay.grpc))
            .await
            .unwrap();
        let run_for = Duration::from_millis(rand::rng().random_range(150..600));
        let deadline = Instant::now() + run_for;
        let mut senders = Vec::new();
        for (worker, retry) in (0..4u64).zip(std::mem::replace(&mut interrupted, vec![None; 4])) {
            let mut client = client.clone();
            let acked = acked.clone();
            let base = next + worker * 1_000_000;
            senders.push(tokio::spawn(async move {
                let mut retry_outcome = None;
                if let Some(call) = retry {
                    match make(&mut client, &call).await {
                        Ok(statuses) => {
                            acked.lock().unwrap().extend(call.ids.iter().cloned());
                            retry_outcome = Some(statuses);
                        }
                        // Killed again before it got through: try once more next round.
                        Err(_) => return (Some(call), None),
                    }
                }
                // Sends until the kill cuts a call off (the bound is only a safety net).
                let mut i = 0;
                while Instant::now() < deadline + Duration::from_secs(30) && i < 100_000 {
                    let id = format!("r{round}-{base}-{i}");
                    let call = if i % 3 == 0 {
                        Call {
                            ids: (0..10).map(|k| format!("{id}-{k}")).collect(),
                            batch: true,
                        }
                    } else {
                        Call {
                            ids: vec![id],
                            batch: false,
                        }
                    };
                    match make(&mut client, &call).await {
                        Ok(statuses) => {
                            assert!(
                                statuses.iter().all(|s| *s == pb::IngestStatus::Accepted as i32),
                                "new events: {statuses:?}"
                            );
                            acked.lock().unwrap().extend(call.ids);
                        }
                        Err(_) => return (Some(call), retry_outcome),
                    }
                    i += 1;
                }
                (None, retry_outcome)
            }));
        }
        tokio::time::sleep(run_for).await;
        // SIGKILL while the senders are still sending.
        relay.kill();
        for (worker, s) in senders.into_iter().enumerate() {
            let (failed, retry_outcome) = s.await.unwrap();
            if let Some(statuses) = retry_outcome {
                retried += statuses.len();
                for status in statuses {
                    assert!(
                        status == pb::IngestStatus::Accepted as i32
                            || status == pb::IngestStatus::Duplicate as i32,
                        "a retried event answered {status}"
                    );
                    retried_duplicates += usize::from(status == pb::IngestStatus::Duplicate as i32);
                }
            }
            interrupted[worker] = failed;
        }
        next += 10_000_000;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(retried > 0, "no call was cut off by a kill and sent again");
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
    // Every acknowledged id is remembered through the kills: each was stored with its event,
    // so sending any of them again is a duplicate.
    let mut client = IngestServiceClient::connect(format!("http://{}", relay.grpc))
        .await
        .unwrap();
    let mut sample: Vec<String> = acked.iter().cloned().collect();
    sample.sort_unstable();
    let step = (sample.len() / 500).max(1);
    let sample: Vec<String> = sample.into_iter().step_by(step).collect();
    for ids in sample.chunks(100) {
        let statuses = make(
            &mut client,
            &Call {
                ids: ids.to_vec(),
                batch: true,
            },
        )
        .await
        .unwrap();
        assert!(
            statuses.iter().all(|s| *s == pb::IngestStatus::Duplicate as i32),
            "acknowledged ids sent again: {statuses:?}"
        );
    }
    relay.kill();
    let lost: Vec<&String> = acked.difference(&delivered).take(10).collect();
    let duplicates = counts.values().filter(|n| **n > 1).count();
    println!(
        "crash test: {ROUNDS} kill -9 rounds, {} events acknowledged, {} delivered, {} delivered more than once; \
         of {retried} events sent again after their call was cut by a kill, {retried_duplicates} were recognised as stored before it",
        acked.len(),
        delivered.len(),
        duplicates
    );
    assert!(
        lost.is_empty(),
        "acknowledged events lost: {lost:?} (and maybe more)"
    );
}
