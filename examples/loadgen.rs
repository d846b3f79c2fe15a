//! A bounded gRPC load generator that, unlike h2load, reads every answer's gRPC status.
//!
//! It replays one pre-encoded request body (a gRPC frame written by the `encode_frames` example)
//! `--calls` times over `--connections` HTTP/2 connections with at most `--concurrency` calls in
//! flight, and stops early after `--max-secs`. It counts gRPC status codes and, for `Send` and
//! `SendBatch`, the per-event outcomes (accepted, duplicate, ignored, rejected), and prints one
//! JSON object on stdout. With `--unique-message-ids` every call's events get new `messageId`s
//! (the body must hold the `encode_frames --message-id-placeholder` placeholder), so no event is
//! a duplicate and each one goes through the relay's dedup.
//!
//! Run: `cargo run --release --example loadgen -- --addr http://127.0.0.1:50051
//!   --method /lytics_relay.v1.IngestService/SendBatch --body /tmp/frames/batch.bin --calls 1000`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::{Buf as _, BufMut as _, Bytes};
use clap::Parser;
use http::uri::PathAndQuery;
use lytics_relay::proto::v1::{IngestResult, IngestStatus, SendBatchResponse, SendResponse};
use prost::Message as _;
use tokio::sync::Mutex;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Parser)]
struct Args {
    /// The relay's gRPC address.
    #[arg(long)]
    addr: String,
    /// The full method path, e.g. `/lytics_relay.v1.IngestService/SendBatch`.
    #[arg(long)]
    method: String,
    /// A framed request body (flag byte, 4-byte length, protobuf), as `encode_frames` writes.
    #[arg(long)]
    body: PathBuf,
    /// Calls to make.
    #[arg(long)]
    calls: u64,
    /// HTTP/2 connections.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Calls in flight at most.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Stop starting calls after this long.
    #[arg(long, default_value_t = 300)]
    max_secs: u64,
    /// Per-call deadline.
    #[arg(long, default_value_t = 60)]
    call_timeout_secs: u64,
    /// Replace every `messageId` placeholder with a new id in each call.
    #[arg(long)]
    unique_message_ids: bool,
}

/// What `encode_frames --message-id-placeholder` puts in every event's `messageId`.
const PLACEHOLDER: &[u8] = b"@@loadgen-message-id-placeholder@@@@";

/// Where the placeholder occurs in `body`.
fn placeholder_offsets(body: &[u8]) -> Vec<usize> {
    let mut at = Vec::new();
    let mut i = 0;
    while i + PLACEHOLDER.len() <= body.len() {
        if body[i..].starts_with(PLACEHOLDER) {
            at.push(i);
            i += PLACEHOLDER.len();
        } else {
            i += 1;
        }
    }
    at
}

/// SplitMix64's finalizer: a bijection on `u64` that scatters consecutive inputs.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `body` with a new UUID-shaped id at each offset. Ids are as random-looking as SDKs' v4 UUIDs
/// (so they land all over the relay's dedup index, as real traffic does) and never repeat: the
/// first 64 bits are a bijection of `run` and a counter.
fn with_unique_ids(body: &Bytes, offsets: &[usize], run: u64, counter: &AtomicU64) -> Bytes {
    let mut out = body.to_vec();
    for &at in offsets {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let hi = mix((run << 40) ^ n);
        let lo = mix(hi);
        let id = format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            hi >> 32,
            (hi >> 16) & 0xffff,
            hi & 0xffff,
            lo >> 48,
            lo & 0xffff_ffff_ffff
        );
        out[at..at + PLACEHOLDER.len()].copy_from_slice(id.as_bytes());
    }
    Bytes::from(out)
}

/// Passes pre-encoded protobuf bytes through unchanged, both ways.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;
#[derive(Debug, Clone, Copy, Default)]
struct RawEncoder;
#[derive(Debug, Clone, Copy, Default)]
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n)))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

#[derive(Debug, Default)]
struct Tally {
    /// gRPC status code name → calls.
    statuses: BTreeMap<String, u64>,
    /// First message seen per non-OK status.
    messages: BTreeMap<String, String>,
    /// Per-event outcomes.
    accepted: u64,
    duplicate: u64,
    ignored: u64,
    rejected: u64,
    /// Lytics records queued for the accepted events.
    records: u64,
    /// Latencies of every call, in microseconds.
    latencies_us: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Send,
    SendBatch,
    Other,
}

fn count_result(t: &mut Tally, result: &IngestResult) {
    t.records += u64::from(result.records);
    match IngestStatus::try_from(result.status) {
        Ok(IngestStatus::Accepted) => t.accepted += 1,
        Ok(IngestStatus::Duplicate) => t.duplicate += 1,
        Ok(IngestStatus::Ignored) => t.ignored += 1,
        _ => t.rejected += 1,
    }
}

fn record_answer(t: &mut Tally, kind: Kind, answer: &Bytes) {
    match kind {
        Kind::Send => match SendResponse::decode(answer.clone()) {
            Ok(r) => match r.result {
                Some(res) => count_result(t, &res),
                None => t.rejected += 1,
            },
            Err(_) => t.rejected += 1,
        },
        Kind::SendBatch => match SendBatchResponse::decode(answer.clone()) {
            Ok(r) => {
                for o in r.outcomes {
                    match o.result {
                        Some(res) if o.error.is_none() => count_result(t, &res),
                        _ => t.rejected += 1,
                    }
                }
            }
            Err(_) => t.rejected += 1,
        },
        Kind::Other => {}
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let framed = std::fs::read(&args.body).with_context(|| format!("cannot read {}", args.body.display()))?;
    anyhow::ensure!(
        framed.len() >= 5 && framed[0] == 0,
        "{} is not an uncompressed gRPC frame",
        args.body.display()
    );
    let len = u32::from_be_bytes([framed[1], framed[2], framed[3], framed[4]]) as usize;
    anyhow::ensure!(
        framed.len() == 5 + len,
        "{}: frame length mismatch",
        args.body.display()
    );
    let body = Bytes::from(framed).slice(5..);
    let offsets = if args.unique_message_ids {
        let at = placeholder_offsets(&body);
        anyhow::ensure!(
            !at.is_empty(),
            "{} holds no messageId placeholder (encode it with --message-id-placeholder)",
            args.body.display()
        );
        at
    } else {
        Vec::new()
    };
    let offsets = Arc::new(offsets);
    // Ids differ between runs against the same relay (and its dedup window).
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()) ^ d.as_secs());
    let ids = Arc::new(AtomicU64::new(0));
    let path = PathAndQuery::try_from(args.method.as_str()).context("--method is not a path")?;
    let kind = if args.method.ends_with("/SendBatch") {
        Kind::SendBatch
    } else if args.method.ends_with("/Send") {
        Kind::Send
    } else {
        Kind::Other
    };

    let mut channels: Vec<Channel> = Vec::new();
    for _ in 0..args.connections.max(1) {
        let ch = Endpoint::from_shared(args.addr.clone())?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(args.call_timeout_secs))
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .connect()
            .await
            .with_context(|| format!("cannot connect to {}", args.addr))?;
        channels.push(ch);
    }

    let next = Arc::new(AtomicU64::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.max_secs);
    let mut workers = Vec::new();
    for w in 0..args.concurrency.max(1) {
        let channel = channels[w % channels.len()].clone();
        let (next, tally, body, path) = (next.clone(), tally.clone(), body.clone(), path.clone());
        let (offsets, ids) = (offsets.clone(), ids.clone());
        let calls = args.calls;
        workers.push(tokio::spawn(async move {
            let mut grpc = tonic::client::Grpc::new(channel);
            let mut local = Tally::default();
            while Instant::now() < deadline && next.fetch_add(1, Ordering::Relaxed) < calls {
                let t0 = Instant::now();
                let answer = match grpc.ready().await {
                    Ok(()) => {
                        let body = if offsets.is_empty() {
                            body.clone()
                        } else {
                            with_unique_ids(&body, &offsets, run, &ids)
                        };
                        grpc.unary(tonic::Request::new(body), path.clone(), RawCodec)
                            .await
                    }
                    Err(e) => Err(Status::unavailable(format!("channel not ready: {e}"))),
                };
                local
                    .latencies_us
                    .push(u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX));
                match answer {
                    Ok(resp) => {
                        *local.statuses.entry("Ok".into()).or_default() += 1;
                        record_answer(&mut local, kind, resp.get_ref());
                    }
                    Err(s) => {
                        let code = format!("{:?}", s.code());
                        local
                            .messages
                            .entry(code.clone())
                            .or_insert_with(|| s.message().to_string());
                        *local.statuses.entry(code).or_default() += 1;
                    }
                }
            }
            let mut t = tally.lock().await;
            for (k, v) in local.statuses {
                *t.statuses.entry(k).or_default() += v;
            }
            for (k, v) in local.messages {
                t.messages.entry(k).or_insert(v);
            }
            t.accepted += local.accepted;
            t.duplicate += local.duplicate;
            t.ignored += local.ignored;
            t.rejected += local.rejected;
            t.records += local.records;
            t.latencies_us.extend(local.latencies_us);
        }));
    }
    for w in workers {
        w.await.context("a worker panicked")?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut t = tally.lock().await;
    t.latencies_us.sort_unstable();
    let calls: u64 = t.statuses.values().sum();
    let ok = t.statuses.get("Ok").copied().unwrap_or(0);
    let out = serde_json::json!({
        "method": args.method,
        "calls": calls,
        "ok": ok,
        "elapsed_s": elapsed,
        "calls_per_s": calls as f64 / elapsed.max(1e-9),
        "events_accepted": t.accepted,
        "events_duplicate": t.duplicate,
        "events_ignored": t.ignored,
        "events_rejected": t.rejected,
        "records_queued": t.records,
        "events_per_s": (t.accepted + t.duplicate + t.ignored) as f64 / elapsed.max(1e-9),
        "statuses": t.statuses,
        "first_messages": t.messages,
        "latency_ms": {
            "p50": percentile(&t.latencies_us, 50.0) as f64 / 1000.0,
            "p99": percentile(&t.latencies_us, 99.0) as f64 / 1000.0,
            "max": t.latencies_us.last().copied().unwrap_or(0) as f64 / 1000.0,
        },
        "timed_out": calls < args.calls,
    });
    println!("{out}");
    Ok(())
}
