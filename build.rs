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
        .build_server(true)
        .compile_fds(compiler.file_descriptor_set())?;

    println!("cargo:rerun-if-changed=proto");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed=proto/{proto}");
    }
    Ok(())
}
