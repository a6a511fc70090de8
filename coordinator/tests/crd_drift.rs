//! `manifests/05-crds.yaml` is what `crdgen` prints: the CRDs users apply are
//! the ones the Rust types describe.

#[test]
fn the_crd_manifest_matches_the_rust_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/05-crds.yaml");
    let on_disk = std::fs::read_to_string(path).unwrap();
    assert!(
        on_disk == berth_coordinator::crd_yaml(),
        "manifests/05-crds.yaml is stale: run `cargo run -p berth-coordinator --bin crdgen > manifests/05-crds.yaml`"
    );
}
