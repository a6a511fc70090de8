//! Compiles Berth's protos (and the subset of containerd's it calls) with protoc and writes a file descriptor set for
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
    // containerd's own API (a subset), for reading a node's content store:
    // not Berth's, so not in the reflection descriptor set.
    tonic_prost_build::configure().compile_protos(
        &[
            "containerd/services/content/v1/content.proto",
            "containerd/services/images/v1/images.proto",
        ],
        &["."],
    )?;
    Ok(())
}
