//! The file side of a debloat: index each layer blob, write the filtered
//! layers (gzip, with their new digest and diff_id), and the configuration
//! and manifest of `<ref>-baffs` that name them. Synchronous and file-based:
//! the layer blobs sit in a scratch directory while they are read twice
//! (once to index, once to filter), so memory stays small whatever the
//! image's size.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::tar::{self, Kind, Reader, TarError};
use super::view::Entry;

/// Layer media types Berth reads.
const GZIP_TYPES: [&str; 2] = [
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
];
const TAR_TYPES: [&str; 2] = [
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.docker.image.rootfs.diff.tar",
];

/// Why a debloat could not build its image.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A layer is hostile or corrupt.
    #[error("layer {digest}: {source}")]
    Layer {
        /// The layer blob.
        digest: String,
        /// What is wrong with it.
        source: TarError,
    },
    /// The image uses something Berth does not handle.
    #[error("{0}")]
    Unsupported(String),
    /// The manifest or configuration is not what it should be.
    #[error("{0}")]
    Malformed(String),
    /// The scratch directory failed.
    #[error("scratch files: {0}")]
    Io(#[from] io::Error),
}

/// One layer blob on disk.
#[derive(Debug, Clone)]
pub struct LayerBlob {
    /// Where the blob's bytes are.
    pub path: PathBuf,
    /// Its media type from the manifest.
    pub media_type: String,
    /// Its digest.
    pub digest: String,
    /// Its size.
    pub size: u64,
}

/// Files and bytes of one layer, before and after.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LayerStats {
    /// Non-directory entries before.
    pub files_before: u64,
    /// Non-directory entries kept.
    pub files_after: u64,
    /// Bytes of file data before.
    pub bytes_before: u64,
    /// Bytes of file data kept.
    pub bytes_after: u64,
    /// Size of the compressed blob before.
    pub blob_before: u64,
    /// Size of the compressed blob after.
    pub blob_after: u64,
}

/// A layer written by [`rewrite_layer`].
#[derive(Debug, Clone)]
pub struct Rewritten {
    /// The new blob (gzip).
    pub blob: LayerBlob,
    /// sha256 of its uncompressed tar.
    pub diff_id: String,
    /// What was kept.
    pub stats: LayerStats,
}

fn is_gzip(media_type: &str) -> Result<bool, BuildError> {
    if GZIP_TYPES.contains(&media_type) {
        Ok(true)
    } else if TAR_TYPES.contains(&media_type) {
        Ok(false)
    } else {
        Err(BuildError::Unsupported(format!(
            "layers of type {media_type} are not supported (gzip or plain tar only)"
        )))
    }
}

fn open_tar(blob: &LayerBlob) -> Result<Box<dyn Read>, BuildError> {
    let file = BufReader::with_capacity(1 << 20, File::open(&blob.path)?);
    Ok(if is_gzip(&blob.media_type)? {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    })
}

fn layer_error(blob: &LayerBlob) -> impl Fn(TarError) -> BuildError + '_ {
    move |source| BuildError::Layer {
        digest: blob.digest.clone(),
        source,
    }
}

/// The entries of one layer, checked for hostile content.
pub fn index_layer(blob: &LayerBlob) -> Result<Vec<Entry>, BuildError> {
    let mut reader = Reader::new(open_tar(blob)?);
    let mut out = Vec::new();
    while let Some(r) = reader.next_record().map_err(layer_error(blob))? {
        out.push(Entry {
            path: r.path,
            kind: r.kind,
            size: r.size,
        });
    }
    Ok(out)
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn hex_digest(hash: Sha256) -> String {
    let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Writes the entries of `blob` that `keep` marks (by position, as
/// [`index_layer`] listed them) to a new gzip blob in `dir`, each copied byte
/// for byte.
pub fn rewrite_layer(
    blob: &LayerBlob,
    keep: &[bool],
    oci: bool,
    dir: &Path,
) -> Result<Rewritten, BuildError> {
    let out_path = dir.join(format!("{}.new", blob.digest.replace(':', "-")));
    let file = BufWriter::with_capacity(1 << 20, File::create(&out_path)?);
    let compressed = Hashing {
        inner: file,
        hash: Sha256::new(),
        len: 0,
    };
    let gz = flate2::write::GzEncoder::new(compressed, flate2::Compression::default());
    let mut tar_out = Hashing {
        inner: gz,
        hash: Sha256::new(),
        len: 0,
    };
    let mut reader = Reader::new(open_tar(blob)?);
    let mut stats = LayerStats {
        blob_before: blob.size,
        ..LayerStats::default()
    };
    let mut i = 0;
    while let Some(r) = reader.next_record().map_err(layer_error(blob))? {
        let kept = *keep.get(i).ok_or_else(|| {
            BuildError::Malformed(format!("layer {} changed while it was read", blob.digest))
        })?;
        i += 1;
        let counts = !matches!(r.kind, Kind::Dir | Kind::Global);
        if counts {
            stats.files_before += 1;
            stats.bytes_before += r.size;
        }
        if kept {
            if counts {
                stats.files_after += 1;
                stats.bytes_after += r.size;
            }
            tar_out.write_all(&r.header)?;
            reader.copy_data(&mut tar_out).map_err(layer_error(blob))?;
        }
    }
    if i != keep.len() {
        return Err(BuildError::Malformed(format!(
            "layer {} changed while it was read",
            blob.digest
        )));
    }
    tar::write_end(&mut tar_out)?;
    let diff_id = hex_digest(tar_out.hash);
    let mut compressed = tar_out.inner.finish()?;
    compressed.flush()?;
    let digest = hex_digest(compressed.hash);
    stats.blob_after = compressed.len;
    let path = dir.join(digest.replace(':', "-"));
    std::fs::rename(&out_path, &path)?;
    Ok(Rewritten {
        blob: LayerBlob {
            path,
            media_type: if oci { GZIP_TYPES[0] } else { GZIP_TYPES[1] }.to_string(),
            digest,
            size: stats.blob_after,
        },
        diff_id,
        stats,
    })
}

/// The new configuration and manifest: each rewritten layer's digest, size,
/// media type and diff_id replace the original's; everything else (the
/// entrypoint, environment, history, other annotations) stays. Returns
/// `(config, manifest)` as raw JSON.
pub fn rewrite_image(
    manifest: &[u8],
    config: &[u8],
    layers: &[Option<Rewritten>],
    from_digest: &str,
) -> Result<(Vec<u8>, Vec<u8>), BuildError> {
    let bad = |what: &str| BuildError::Malformed(format!("image {from_digest}: {what}"));
    let mut m: Value = serde_json::from_slice(manifest).map_err(|_| bad("manifest is not JSON"))?;
    let mut c: Value = serde_json::from_slice(config).map_err(|_| bad("config is not JSON"))?;
    let descriptors = m["layers"]
        .as_array_mut()
        .ok_or_else(|| bad("manifest has no layers"))?;
    let diff_ids = c["rootfs"]["diff_ids"]
        .as_array_mut()
        .ok_or_else(|| bad("config has no rootfs.diff_ids"))?;
    if descriptors.len() != layers.len() || diff_ids.len() != layers.len() {
        return Err(bad("layer counts of manifest and config differ"));
    }
    for (i, new) in layers.iter().enumerate() {
        if let Some(new) = new {
            descriptors[i]["digest"] = new.blob.digest.clone().into();
            descriptors[i]["size"] = new.blob.size.into();
            descriptors[i]["mediaType"] = new.blob.media_type.clone().into();
            if let Some(a) = descriptors[i].as_object_mut() {
                a.remove("urls");
            }
            diff_ids[i] = new.diff_id.clone().into();
        }
    }
    let config_raw = serde_json::to_vec(&c).map_err(|_| bad("config"))?;
    m["config"]["digest"] = {
        let mut h = Sha256::new();
        h.update(&config_raw);
        hex_digest(h).into()
    };
    m["config"]["size"] = config_raw.len().into();
    // Docker's schema 2 has no annotations; OCI manifests say where they came from.
    if m["mediaType"] != "application/vnd.docker.distribution.manifest.v2+json" {
        if !m["annotations"].is_object() {
            m["annotations"] = Value::Object(Default::default());
        }
        m["annotations"]["dev.berth.debloat.from"] = from_digest.into();
    }
    let manifest_raw = serde_json::to_vec(&m).map_err(|_| bad("manifest"))?;
    Ok((config_raw, manifest_raw))
}

/// sha256 digest of `data`, `sha256:<hex>`.
pub fn digest_of(data: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(data);
    hex_digest(h)
}

#[cfg(test)]
mod tests;
