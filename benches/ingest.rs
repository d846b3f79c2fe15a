//! The CPU an event costs on its way in, stage by stage, for a `SendBatch` of 100 copies of the
//! track fixture without `messageId` (as `scripts/bench-ingest` sends): protobuf decoding into
//! JSON (the full decoder, which the door keeps for events it cannot read in place), reading
//! and validating (normalize, as the gRPC door runs it: each event is read in place from the
//! request's bytes, which are kept as its input), mapping and serialising the records,
//! and the whole `Ingest::accept` on the in-memory queue (rules, records, live view, metrics; no
//! durability).
//! Run: `cargo bench --bench ingest` (times are per call of 100 events).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benches fail loudly"
)]

use std::collections::HashSet;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use lytics_relay::ingest::Ingest;
use lytics_relay::integration::{AccountId, Integration, IntegrationId, Integrations, Secret, StreamName};
use lytics_relay::normalize::{self, InboundEvent};
use lytics_relay::proto::raw;
use lytics_relay::proto::v1::SendBatchRequest;
use lytics_relay::queue::{MemoryQueue, Queue};
use lytics_relay::rules::{IntegrationContext, LiveRules, RuleSet, Source};
use lytics_relay::telemetry::Telemetry;
use prost::Message as _;
use serde_json::Value;

const BATCH: usize = 100;

/// The relay binary's allocator, so allocation costs what it costs in the relay.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn request_bytes() -> Vec<u8> {
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string("tests/fixtures/signal_canonical_track.json").unwrap())
            .unwrap();
    let mut event = normalize::json_to_event(&json);
    event.message_id.clear();
    SendBatchRequest {
        events: vec![event; BATCH],
    }
    .encode_to_vec()
}

/// What the gRPC door makes of one event (with the default 32 KB event limit).
fn normalized(event: &bytes::Bytes) -> InboundEvent {
    normalize::signal_proto_event(event, "event", 32 * 1024, 0).unwrap()
}

/// The request as the gRPC door receives it: each event still encoded.
fn raw_events(bytes: &[u8]) -> Vec<bytes::Bytes> {
    raw::SendBatchRequest::decode(bytes::Bytes::copy_from_slice(bytes))
        .unwrap()
        .events
}

fn inbound(bytes: &[u8]) -> Vec<InboundEvent> {
    raw_events(bytes).iter().map(normalized).collect()
}

fn bench(c: &mut Criterion) {
    let bytes = request_bytes();
    let rules = RuleSet::load(Path::new("rules")).unwrap();
    let ctx = IntegrationContext {
        stream_name: "datafly_events".into(),
        account_id: "1234".into(),
        ..Default::default()
    };
    let mut group = c.benchmark_group("send_batch_100");
    group.bench_function("decode", |b| {
        b.iter(|| SendBatchRequest::decode(black_box(&bytes[..])).unwrap())
    });
    group.bench_function("decode_and_normalize", |b| {
        b.iter_batched(
            || raw_events(&bytes),
            |events| events.iter().map(normalized).collect::<Vec<_>>(),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("map_and_serialise", |b| {
        b.iter_batched(
            || inbound(&bytes),
            |events| {
                let mut n = 0;
                for e in &events {
                    for r in rules.evaluate(Source::Signal, &e.doc, &ctx).records {
                        n += normalize::record_bytes(&r.fields).len();
                    }
                }
                assert!(n > 0);
                events
            },
            BatchSize::SmallInput,
        )
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let queue = Arc::new(MemoryQueue::new(1_000_000, Duration::from_secs(60)));
    let integration = Integration {
        id: IntegrationId::new("lytics").unwrap(),
        name: "Lytics".into(),
        account_id: AccountId::new("1234").unwrap(),
        stream_name: StreamName::new("datafly_events").unwrap(),
        api_token: Secret::new("bench-token"),
        base_url: "http://127.0.0.1:1".into(),
        enabled: true,
    };
    let ingest = Ingest::new(
        LiveRules::new(RuleSet::load(Path::new("rules")).unwrap()),
        Integrations::new(vec![integration]),
        queue.clone(),
        Telemetry::disabled(),
    );
    group.bench_function("accept_memory_queue", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let events = inbound(&bytes);
                let started = Instant::now();
                let answers = runtime.block_on(ingest.accept(events, None)).unwrap();
                spent += started.elapsed();
                assert_eq!(answers.len(), BATCH);
                let leased = runtime.block_on(queue.lease(BATCH, &HashSet::new())).unwrap();
                let ids: Vec<_> = leased.iter().map(|r| r.id).collect();
                runtime.block_on(queue.ack(&ids)).unwrap();
            }
            spent
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
