//! Code generated from `proto/` (package `lytics_relay.v1`) and the descriptor set that gRPC
//! reflection serves. `google.protobuf.Struct` and `Value` are [`JsonStruct`] and [`JsonValue`]
//! (`json.rs`): they decode straight into JSON.

pub mod codec;
mod json;
pub mod raw;
pub mod view;

pub use json::{JsonStruct, JsonValue, SHALLOW_NESTING, decode_noting_depth};

/// Package `lytics_relay.v1`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("lytics_relay.v1");
}

/// The servers as the relay runs them, each with the door codec ([`codec`]): a request that
/// does not decode is `INVALID_ARGUMENT`. The `IngestService` and `RulesService` requests keep
/// each event's bytes ([`raw`]); the others are the types of [`v1`].
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod servers {
    include!(concat!(env!("OUT_DIR"), "/raw/lytics_relay.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/admin/lytics_relay.v1.rs"));
}

/// The encoded descriptor set of every `.proto` file, well-known types included.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/lytics_relay_descriptor.bin"));
