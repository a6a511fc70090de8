//! Compiles Berth's protos with protoc and writes a file descriptor set for
//! the coordinator's gRPC reflection service.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("berth_descriptor.bin"))
        .compile_protos(
            &[
                "berth/agent/v1/agent.proto",
                "berth/v1/inventory.proto",
                "berth/v1/containers.proto",
            ],
            &["."],
        )?;
    Ok(())
}
