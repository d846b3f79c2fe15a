//! Writes pre-encoded gRPC request bodies (a length-prefixed frame: flag byte 0, 4-byte big-endian
//! length, protobuf bytes) for load tools such as h2load, which replay one body for every request.
//!
//! Run: `cargo run --release --example encode_frames -- --out-dir /tmp/frames`. It writes:
//!
//! - `health.bin`: an empty `grpc.health.v1.HealthCheckRequest`.
//! - `send.bin`: a `lytics_relay.v1.SendRequest` holding the fixture event.
//! - `batch.bin`: a `lytics_relay.v1.SendBatchRequest` holding `--batch` copies of it.
//!
//! The fixture's `messageId` is dropped (unless `--keep-message-id`), so the relay generates a
//! fresh id per event and replaying the same body is never deduplicated. With
//! `--message-id-placeholder` every event carries [`PLACEHOLDER`] as its `messageId` instead:
//! `loadgen --unique-message-ids` overwrites each with a new id per call, so the relay's dedup
//! (what senders who set `messageId` always go through) is measured too.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Parser;
use lytics_relay::proto::v1::{Event, SendBatchRequest, SendRequest};
use prost::Message as _;
use serde_json::Value;

#[derive(Debug, Parser)]
struct Args {
    /// A Signal canonical event (JSON).
    #[arg(long, default_value = "tests/fixtures/signal_canonical_track.json")]
    fixture: PathBuf,
    /// Where to write the frames.
    #[arg(long)]
    out_dir: PathBuf,
    /// Events per `SendBatchRequest`.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Keep the fixture's `messageId` (then every replay after the first is a duplicate).
    #[arg(long)]
    keep_message_id: bool,
    /// Give every event the `messageId` placeholder that `loadgen --unique-message-ids` replaces.
    #[arg(long, conflicts_with = "keep_message_id")]
    message_id_placeholder: bool,
}

/// The `messageId` `loadgen --unique-message-ids` looks for: as long as a UUID, so replacing it
/// changes no length in the encoded message.
pub const PLACEHOLDER: &str = "@@loadgen-message-id-placeholder@@@@";

/// Builds a gRPC `Event` from canonical JSON.
fn event(json: &Value) -> Event {
    lytics_relay::normalize::json_to_event(json)
}

/// Frames protobuf bytes as one uncompressed gRPC message.
fn frame(message: &[u8]) -> anyhow::Result<Vec<u8>> {
    let len = u32::try_from(message.len()).context("message larger than 4 GiB")?;
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(0);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(message);
    Ok(out)
}

fn write(dir: &Path, name: &str, message: &[u8]) -> anyhow::Result<()> {
    let path = dir.join(name);
    let framed = frame(message)?;
    std::fs::write(&path, &framed).with_context(|| format!("cannot write {}", path.display()))?;
    println!(
        "{}: {} bytes (protobuf {} bytes)",
        path.display(),
        framed.len(),
        message.len()
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.fixture)
        .with_context(|| format!("cannot read {}", args.fixture.display()))?;
    let json: Value = serde_json::from_str(&text).context("the fixture is not JSON")?;
    let mut ev = event(&json);
    if args.message_id_placeholder {
        ev.message_id = PLACEHOLDER.to_string();
    } else if !args.keep_message_id {
        ev.message_id.clear();
    }
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("cannot create {}", args.out_dir.display()))?;

    write(&args.out_dir, "health.bin", &[])?;
    write(
        &args.out_dir,
        "send.bin",
        &SendRequest {
            event: Some(ev.clone()),
        }
        .encode_to_vec(),
    )?;
    write(
        &args.out_dir,
        "batch.bin",
        &SendBatchRequest {
            events: vec![ev; args.batch],
        }
        .encode_to_vec(),
    )?;
    Ok(())
}
