use std::io::Write;

use super::*;
use crate::debloat::tar::tests::sample_layer;

fn gzip(raw: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(raw).unwrap();
    gz.finish().unwrap()
}

fn blob_in(dir: &Path, raw: &[u8], gz: bool) -> LayerBlob {
    let data = if gz { gzip(raw) } else { raw.to_vec() };
    let digest = digest_of(&data);
    let path = dir.join(digest.replace(':', "-"));
    std::fs::write(&path, &data).unwrap();
    LayerBlob {
        path,
        media_type: if gz { GZIP_TYPES[0] } else { TAR_TYPES[0] }.into(),
        digest,
        size: data.len() as u64,
    }
}

#[test]
fn kept_entries_keep_their_headers_byte_for_byte_and_the_digests_are_the_new_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let raw = sample_layer();
    let blob = blob_in(dir.path(), &raw, true);
    let entries = index_layer(&blob).unwrap();
    // Keep the dirs, ping (with its xattr) and the symlink; drop the rest.
    let keep: Vec<bool> = entries
        .iter()
        .map(|e| {
            matches!(
                e.path.as_str(),
                "usr" | "usr/bin" | "usr/bin/ping" | "usr/bin/p"
            )
        })
        .collect();
    let new = rewrite_layer(&blob, &keep, true, dir.path()).unwrap();
    let bytes = std::fs::read(&new.blob.path).unwrap();
    assert_eq!(new.blob.digest, digest_of(&bytes));
    assert_eq!(new.blob.size, bytes.len() as u64);
    let mut tar_bytes = Vec::new();
    flate2::read::GzDecoder::new(&bytes[..])
        .read_to_end(&mut tar_bytes)
        .unwrap();
    assert_eq!(new.diff_id, digest_of(&tar_bytes));
    // Every kept header, extension records included, is the original's.
    let originals: Vec<tar::Record> = {
        let mut r = Reader::new(&raw[..]);
        std::iter::from_fn(|| r.next_record().unwrap()).collect()
    };
    let mut r = Reader::new(&tar_bytes[..]);
    let mut got = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        let orig = originals.iter().find(|o| o.path == rec.path).unwrap();
        assert_eq!(rec.header, orig.header, "{}", rec.path);
        got.push(rec.path);
    }
    assert_eq!(got, vec!["usr", "usr/bin", "usr/bin/ping", "usr/bin/p"]);
    // And the tar crate reads back owner, mode, mtime and the capability.
    let mut a = ::tar::Archive::new(&tar_bytes[..]);
    let mut ping = a
        .entries()
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.path().unwrap().to_str() == Some("usr/bin/ping"))
        .unwrap();
    let h = ping.header().clone();
    assert_eq!(
        (
            h.uid().unwrap(),
            h.gid().unwrap(),
            h.mode().unwrap(),
            h.mtime().unwrap()
        ),
        (1234, 5678, 0o4755, 1_700_000_000)
    );
    let caps: Vec<(String, Vec<u8>)> = ping
        .pax_extensions()
        .unwrap()
        .unwrap()
        .map(|x| x.unwrap())
        .map(|x| (x.key().unwrap().to_string(), x.value_bytes().to_vec()))
        .collect();
    assert_eq!(
        caps,
        vec![(
            "SCHILY.xattr.security.capability".to_string(),
            vec![1, 0, 0, 2, 0x20, 0, 0, 0]
        )]
    );
    let mut body = String::new();
    ping.read_to_string(&mut body).unwrap();
    assert_eq!(body, "hello");
    assert_eq!(new.stats.files_before, 6);
    assert_eq!(new.stats.files_after, 2);
    assert_eq!((new.stats.bytes_before, new.stats.bytes_after), (10, 5));
}

#[test]
fn plain_tar_layers_are_read_and_unknown_compressions_refused() {
    let dir = tempfile::tempdir().unwrap();
    let blob = blob_in(dir.path(), &sample_layer(), false);
    assert_eq!(index_layer(&blob).unwrap().len(), 8);
    let zstd = LayerBlob {
        media_type: "application/vnd.oci.image.layer.v1.tar+zstd".into(),
        ..blob
    };
    let err = index_layer(&zstd).unwrap_err().to_string();
    assert!(err.contains("not supported"), "{err}");
}

#[test]
fn a_hostile_layer_is_refused_naming_the_layer_and_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let raw = crate::debloat::tar::tests::archive(&[(
        crate::debloat::tar::tests::header("../../etc/cron.d/x", b'0', 0, ""),
        b"",
    )]);
    let blob = blob_in(dir.path(), &raw, true);
    let err = index_layer(&blob).unwrap_err().to_string();
    assert!(
        err.contains(&blob.digest) && err.contains("../../etc/cron.d/x"),
        "{err}"
    );
}

#[test]
fn the_new_image_names_the_new_layers_and_keeps_the_rest_of_the_config() {
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:c","size":1},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:a","size":10},{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:b","size":20}]}"#;
    let config = br#"{"architecture":"amd64","os":"linux","config":{"Entrypoint":["redis-server"],"Env":["A=1"]},"rootfs":{"type":"layers","diff_ids":["sha256:da","sha256:db"]}}"#;
    let new = Rewritten {
        blob: LayerBlob {
            path: "x".into(),
            media_type: GZIP_TYPES[0].into(),
            digest: "sha256:b2".into(),
            size: 5,
        },
        diff_id: "sha256:db2".into(),
        stats: LayerStats::default(),
    };
    let (c, m) = rewrite_image(manifest, config, &[None, Some(new)], "sha256:orig").unwrap();
    let c: Value = serde_json::from_slice(&c).unwrap();
    let m2: Value = serde_json::from_slice(&m).unwrap();
    assert_eq!(
        c["rootfs"]["diff_ids"],
        serde_json::json!(["sha256:da", "sha256:db2"])
    );
    assert_eq!(
        c["config"]["Entrypoint"],
        serde_json::json!(["redis-server"])
    );
    assert_eq!(m2["layers"][0]["digest"], "sha256:a");
    assert_eq!(m2["layers"][1]["digest"], "sha256:b2");
    assert_eq!(m2["layers"][1]["size"], 5);
    assert_eq!(
        m2["config"]["digest"],
        digest_of(&serde_json::to_vec(&c).unwrap()).as_str()
    );
    assert_eq!(m2["annotations"]["dev.berth.debloat.from"], "sha256:orig");
    assert!(rewrite_image(manifest, config, &[None], "sha256:orig").is_err());
}
