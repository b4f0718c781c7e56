//! Compiles `proto/vigil/v1/remediation.proto` (the gRPC API, `crate::grpc`) into Rust with the pure-Rust
//! `protox` parser, so building Vigil needs no system `protoc`. The same descriptor set is written beside
//! the generated code for server reflection.

use std::path::PathBuf;

use anyhow::Context;
use prost::Message;

fn main() -> anyhow::Result<()> {
    let proto_root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let file = "vigil/v1/remediation.proto";
    println!("cargo:rerun-if-changed={}", proto_root.join(file).display());
    let fds = protox::compile([file], [&proto_root]).with_context(|| format!("compiling {file}"))?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("remediation_descriptor.bin"), fds.encode_to_vec())
        .context("writing the descriptor set for reflection")?;
    tonic_prost_build::configure()
        .build_server(true)
        // The client is for the crate's own tests of the server.
        .build_client(true)
        .build_transport(false)
        .compile_fds(fds)
        .context("generating the gRPC code")?;
    Ok(())
}
