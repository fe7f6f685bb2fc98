//! Compiles the gRPC contract with protox (pure Rust), so no protoc is needed.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "pil/v1/pointer.proto",
        "pil/v1/registry.proto",
        "pil/v1/lookup.proto",
        "pil/v1/admin.proto",
        "pil/v1/policy.proto",
        "pil/v1/audit.proto",
        "pil/v1/federation.proto",
        "pil/v1/events.proto",
        "pil/v1/control.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // For server reflection.
    std::fs::write(
        out.join("pil_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
