//! Compiles `proto/` with protox (pure Rust, no system `protoc`) and generates prost/tonic code from it.

use std::{env, fs, path::PathBuf};

use prost::Message;

const FILES: &[&str] = &[
    "moltbot/common/v1/common.proto",
    "moltbot/session/v1/session.proto",
    "moltbot/inference/v1/inference.proto",
    "moltbot/dialogue/v1/dialogue.proto",
    "moltbot/plugin/v1/plugin.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    for file in FILES {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    let descriptors = protox::compile(FILES, [&root])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("moltbot_descriptor.bin"), descriptors.encode_to_vec())?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;
    Ok(())
}
