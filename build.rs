//! Compiles `proto/` with protox (no system `protoc`) and writes the descriptor set that gRPC
//! reflection serves.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "lytics_relay/v1/ingest.proto",
    "lytics_relay/v1/admin.proto",
    "lytics_relay/v1/rules.proto",
    "lytics_relay/v1/live.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(PROTOS.iter().copied())?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("lytics_relay_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    // Struct and Value decode straight into JSON (src/proto/json.rs); the wire format and the
    // descriptors reflection serves stay the well-known types.
    tonic_prost_build::configure()
        .extern_path(".google.protobuf.Struct", "crate::proto::JsonStruct")
        .extern_path(".google.protobuf.Value", "crate::proto::JsonValue")
        .build_client(true)
        .build_server(false)
        .compile_fds(compiler.file_descriptor_set())?;

    // The AdminService, DeadLetterService and LiveEventsService servers, on the types generated
    // above, with the door codec: a request that does not decode is INVALID_ARGUMENT.
    let admin_dir = out_dir.join("admin");
    std::fs::create_dir_all(&admin_dir)?;
    let mut admin_only = compiler.file_descriptor_set();
    admin_only
        .file
        .retain(|f| f.name() == "lytics_relay/v1/admin.proto" || f.name() == "lytics_relay/v1/live.proto");
    tonic_prost_build::configure()
        .out_dir(&admin_dir)
        .extern_path(".google.protobuf.Struct", "crate::proto::JsonStruct")
        .extern_path(".google.protobuf.Value", "crate::proto::JsonValue")
        .extern_path(".lytics_relay.v1", "crate::proto::v1")
        .codec_path("crate::proto::codec::DoorCodec")
        .build_client(false)
        .build_server(true)
        .compile_fds(admin_only)?;

    // Second IngestService and RulesService servers whose request types keep each event's
    // bytes as received (src/proto/raw.rs): the gRPC door decodes events itself (so an event
    // it cannot decode is a field violation, not INTERNAL) and stores the bytes as the event's
    // input. Every other type is the one generated above; clients are unchanged.
    let raw_dir = out_dir.join("raw");
    std::fs::create_dir_all(&raw_dir)?;
    let mut ingest_only = compiler.file_descriptor_set();
    ingest_only
        .file
        .retain(|f| f.name() == "lytics_relay/v1/ingest.proto" || f.name() == "lytics_relay/v1/rules.proto");
    tonic_prost_build::configure()
        .out_dir(&raw_dir)
        .extern_path(".google.protobuf.Struct", "crate::proto::JsonStruct")
        .extern_path(".google.protobuf.Value", "crate::proto::JsonValue")
        .extern_path(".lytics_relay.v1", "crate::proto::v1")
        .extern_path(".lytics_relay.v1.SendRequest", "crate::proto::raw::SendRequest")
        .extern_path(
            ".lytics_relay.v1.SendBatchRequest",
            "crate::proto::raw::SendBatchRequest",
        )
        .extern_path(
            ".lytics_relay.v1.StreamRequest",
            "crate::proto::raw::StreamRequest",
        )
        .extern_path(
            ".lytics_relay.v1.SendCustomerIoEventRequest",
            "crate::proto::raw::SendCustomerIoEventRequest",
        )
        .extern_path(
            ".lytics_relay.v1.DryRunRequest",
            "crate::proto::raw::DryRunRequest",
        )
        // A request that does not decode is INVALID_ARGUMENT here, not prost's INTERNAL.
        .codec_path("crate::proto::codec::DoorCodec")
        .build_client(false)
        .build_server(true)
        .compile_fds(ingest_only)?;

    println!("cargo:rerun-if-changed=proto");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed=proto/{proto}");
    }
    Ok(())
}
