use std::io::Write;

use super::tar::tests::{archive, header};
use super::*;

#[test]
fn baffs_names_append_the_suffix_to_the_tag() {
    let n = |r: &str| baffs_name(r, "-baffs", None).unwrap().to_string();
    assert_eq!(n("redis:7"), "docker.io/library/redis:7-baffs");
    assert_eq!(n("10.0.0.1:5000/app"), "10.0.0.1:5000/app:latest-baffs");
    assert_eq!(
        n(&format!("r.io/app@sha256:{}", "ab".repeat(32))),
        "r.io/app:sha256-abababababab-baffs"
    );
    assert!(baffs_name(&format!("r.io/app:{}", "t".repeat(125)), "-baffs", None).is_err());
    assert!(baffs_name("Not A Ref", "-baffs", None).is_err());
    assert_eq!(
        baffs_name("redis:7", "-baffs", Some("10.0.0.2:5000/slim/redis"))
            .unwrap()
            .to_string(),
        "10.0.0.2:5000/slim/redis:7-baffs"
    );
}

fn layer(dir: &Path, entries: &[([u8; 512], &[u8])]) -> LayerBlob {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&archive(entries)).unwrap();
    let data = gz.finish().unwrap();
    let digest = build::digest_of(&data);
    let path = dir.join(digest.replace(':', "-"));
    std::fs::write(&path, &data).unwrap();
    LayerBlob {
        path,
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        digest,
        size: data.len() as u64,
    }
}

fn image(dir: &Path) -> LoadedImage {
    let big = vec![b'x'; 100_000];
    let base = layer(
        dir,
        &[
            (header("usr/", b'5', 0, ""), b""),
            (header("usr/bin/", b'5', 0, ""), b""),
            (header("usr/bin/server", b'0', 6, ""), b"server"),
            (header("usr/bin/unused", b'0', big.len() as u64, ""), &big),
            (header("bin", b'2', 0, "usr/bin"), b""),
            (header("etc/", b'5', 0, ""), b""),
            (header("etc/passwd", b'0', 5, ""), b"root\n"),
        ],
    );
    let app = layer(
        dir,
        &[
            (header("app/", b'5', 0, ""), b""),
            (header("app/main.py", b'0', 5, ""), b"print"),
            (header("app/test.py", b'0', big.len() as u64, ""), &big),
        ],
    );
    let config = br#"{"os":"linux","architecture":"amd64","rootfs":{"type":"layers","diff_ids":["sha256:1","sha256:2"]}}"#.to_vec();
    let descriptors: Vec<serde_json::Value> = [&base, &app]
        .iter()
        .map(|l| serde_json::json!({"mediaType": l.media_type, "digest": l.digest, "size": l.size}))
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": build::digest_of(&config), "size": config.len()},
        "layers": descriptors,
    }))
    .unwrap();
    LoadedImage {
        name: "r.io/app:1".into(),
        manifest_digest: build::digest_of(&manifest),
        manifest,
        manifest_media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        config,
        layers: vec![base, app],
    }
}

fn paths_of(blob: &LayerBlob) -> Vec<String> {
    build::index_layer(blob)
        .unwrap()
        .into_iter()
        .map(|e| e.path)
        .collect()
}

#[test]
fn a_debloat_keeps_the_profiled_files_and_what_they_need_in_every_layer() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let accessed: BTreeSet<String> = ["/usr/bin/server", "/app/main.py"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let out = debloat(&img, &accessed, &Options::default(), dir.path()).unwrap();
    let new: Vec<&Rewritten> = out
        .layers
        .iter()
        .map(|(_, n)| n.as_ref().unwrap())
        .collect();
    assert_eq!(
        paths_of(&new[0].blob),
        vec![
            "usr",
            "usr/bin",
            "usr/bin/server",
            "bin",
            "etc",
            "etc/passwd"
        ]
    );
    assert_eq!(paths_of(&new[1].blob), vec!["app", "app/main.py"]);
    assert!(out.size_after() < out.size_before());
    assert_eq!(
        (out.stats[0].files_before, out.stats[0].files_after),
        (4, 3)
    );
    let m: serde_json::Value = serde_json::from_slice(&out.manifest).unwrap();
    assert_eq!(m["layers"][1]["digest"], new[1].blob.digest.as_str());
    assert_eq!(out.manifest_digest, build::digest_of(&out.manifest));
}

#[test]
fn top_leaves_the_lower_layers_untouched_and_the_keep_list_adds_paths() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let accessed: BTreeSet<String> = ["/app/main.py".to_string()].into();
    let opts = Options {
        top: Some(1),
        keep: vec!["app/test.py".into()],
    };
    let out = debloat(&img, &accessed, &opts, dir.path()).unwrap();
    assert!(out.layers[0].1.is_none());
    assert_eq!(out.stats[0].blob_after, img.layers[0].size);
    assert_eq!(
        paths_of(&out.layers[1].1.as_ref().unwrap().blob),
        vec!["app", "app/main.py", "app/test.py"]
    );
    let m: serde_json::Value = serde_json::from_slice(&out.manifest).unwrap();
    assert_eq!(m["layers"][0]["digest"], img.layers[0].digest.as_str());
}
