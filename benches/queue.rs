//! Durable-queue ingest rate: many concurrent enqueues, one event each (unary ingest) and 100
//! events each (batched ingest), group-committed by the SQLite writer; once with sender-given
//! event ids (random, like Signal `messageId`s: each is a dedup row) and once with relay-made
//! ids (no dedup row); then, reopened, how fast its records are leased back from the store and
//! acked (drain capacity after a restart or past the in-memory copies). Run:
//! `cargo bench --bench queue` (prints events/s). `QUEUE_BENCH_RECORDS` sets how many records,
//! `PAD` the padding of each record's body (default 900 bytes, about 2 KB stored per record with
//! its input), to see how row size bounds the rate.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benches fail loudly")]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lytics_relay::queue::{EventRecords, NewRecord, Queue, SqliteQueue};
use lytics_relay::rules::Source;

fn record(i: usize) -> NewRecord {
    NewRecord {
        integration: Arc::from("lytics"),
        stream: Arc::from(""),
        timestamp_field: Arc::from("_ts"),
        rule: Arc::from("track_event"),
        rules_version: Arc::from("0123456789ab"),
        source: Source::Signal,
        event_id: Arc::from(format!("e-{i}")),
        event_type: Arc::from("track"),
        body: Bytes::from(format!(
            "{{\"_e\":\"Order Completed\",\"n\":{i},\"pad\":\"{}\"}}",
            "x".repeat(
                std::env::var("PAD")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(900)
            )
        )),
        input: Bytes::from(format!(
            "{{\"type\":\"track\",\"n\":{i},\"pad\":\"{}\"}}",
            "y".repeat(
                std::env::var("PAD")
                    .ok()
                    .and_then(|v| v.parse::<usize>().ok())
                    .map(|p| p + 200)
                    .unwrap_or(1100)
            )
        )),
        traceparent: None,
        accepted_ms: 0,
    }
}

async fn run(queue: Arc<SqliteQueue>, total: usize, per_call: usize, callers: usize, given_ids: bool) -> f64 {
    let started = Instant::now();
    let mut tasks = Vec::new();
    let calls = total / per_call;
    for c in 0..callers {
        let q = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = c;
            while n < calls {
                let events = (0..per_call)
                    .map(|k| {
                        let i = n * per_call + k;
                        EventRecords {
                            dedup_key: given_ids
                                .then(|| Arc::from(format!("signal:{}", uuid::Uuid::new_v4()))),
                            records: vec![record(i)],
                        }
                    })
                    .collect();
                q.enqueue(events).await.unwrap();
                n += callers;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    total as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    // `cargo test --all-targets` runs benches without `--bench`: a small smoke pass is enough.
    let benching = std::env::args().any(|a| a == "--bench");
    let total: usize = std::env::var("QUEUE_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benching { 200_000 } else { 2_000 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for (given_ids, ids) in [(true, "sender-given ids"), (false, "relay-made ids")] {
            let dir = tempfile::tempdir().unwrap();
            let open = || {
                SqliteQueue::open(
                    &dir.path().join("q.sqlite3"),
                    10_000_000,
                    Duration::from_secs(3600),
                )
                .unwrap()
            };
            let q = Arc::new(open());
            let unary = run(q.clone(), total / 4, 1, 256, given_ids).await;
            println!("durable enqueue, {ids:16}, 1 event per call, 256 callers:   {unary:>10.0} events/s");
            let batched = run(q.clone(), total, 100, 32, given_ids).await;
            println!("durable enqueue, {ids:16}, 100 events per call, 32 callers: {batched:>10.0} events/s");
            // Reopened, the queue holds nothing in memory: every lease reads its records back,
            // as delivery does after a restart or once a backlog outgrew the in-memory copies.
            drop(q);
            let q = open();
            let expected = total / 4 + total;
            let started = Instant::now();
            let mut leased_total = 0;
            loop {
                let leased = q.lease(1000, &HashSet::new()).await.unwrap();
                if leased.is_empty() {
                    break;
                }
                leased_total += leased.len();
                let ids: Vec<_> = leased.iter().map(|r| r.id).collect();
                q.ack(&ids).await.unwrap();
            }
            let rate = leased_total as f64 / started.elapsed().as_secs_f64();
            assert_eq!(leased_total, expected, "every stored record is read back once");
            println!("lease (read back) + ack, {ids:16}, 1000 per lease:          {rate:>10.0} records/s");
        }
    });
}
