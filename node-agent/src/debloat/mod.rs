//! The debloat engine: what baffs (BLAFS) does, natively on the node's
//! containerd, with nothing restarted and every tar header kept.
//!
//! - [`profile`] records which paths a running container opens (fanotify on
//!   its root's superblock); [`starts`] marks new containers' roots before
//!   their entrypoint runs, so startup reads are seen too.
//! - [`store`] reads the image's manifest, configuration and layer blobs out
//!   of containerd's content store.
//! - [`tar`] reads layer tars record by record and refuses hostile ones;
//!   [`view`] decides, without IO, which entries the profile needs (parents,
//!   symlinks, hard-link targets, the keep-list); [`build`] writes the
//!   filtered layers and the new configuration and manifest.
//! - [`debloat`] ties those together; [`push`] puts the result in a
//!   registry, from which the node's runtime then pulls it (so the kubelet
//!   finds it unpacked).
//! - [`cli`] is `node-agent baffs shadow|debloat`, baffs's command line;
//!   [`daemon`] is `node-agent debloater`, the node's half of ImageDebloat.

pub mod build;
pub mod cli;
pub mod daemon;
pub mod profile;
pub mod starts;
pub mod store;
pub mod tar;
pub mod view;

use std::collections::BTreeSet;
use std::path::Path;

use berth_proto::reference::Reference;
use oci_client::secrets::RegistryAuth;

use build::{BuildError, LayerBlob, LayerStats, Rewritten};
use store::LoadedImage;

/// What to keep beyond the profile, and how many layers to rewrite.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Rewrite only the top `top` layers; lower ones stay as they are.
    pub top: Option<usize>,
    /// Keep-list patterns added to [`view::DEFAULT_KEEP`].
    pub keep: Vec<String>,
}

/// A debloated image, its blobs in the scratch directory.
#[derive(Debug, Clone)]
pub struct Debloated {
    /// The new configuration.
    pub config: Vec<u8>,
    /// The new manifest.
    pub manifest: Vec<u8>,
    /// Its digest.
    pub manifest_digest: String,
    /// Media type of the manifest (the original's).
    pub manifest_media_type: String,
    /// Per layer: the original blob and, if rewritten, the new one.
    pub layers: Vec<(LayerBlob, Option<Rewritten>)>,
    /// Per layer, files and bytes before and after (untouched layers count
    /// the same both sides).
    pub stats: Vec<LayerStats>,
    /// Paths of the merged filesystem kept.
    pub paths_kept: usize,
    /// Paths of the merged filesystem before.
    pub paths_before: usize,
}

impl Debloated {
    /// Compressed bytes of all layers before.
    pub fn size_before(&self) -> u64 {
        self.stats.iter().map(|s| s.blob_before).sum()
    }
    /// Compressed bytes of all layers after.
    pub fn size_after(&self) -> u64 {
        self.stats.iter().map(|s| s.blob_after).sum()
    }
}

/// `<ref>-baffs`, baffs's naming: the tag gets the suffix (`redis:7` →
/// `redis:7-baffs`); a reference by digest gets `sha256-<12 hex>-baffs`.
/// With `repository` (`host[:port]/path`), that tag in that repository.
pub fn baffs_name(
    reference: &str,
    suffix: &str,
    repository: Option<&str>,
) -> Result<Reference, String> {
    Reference::parse(reference)
        .map_err(|e| e.to_string())?
        .suffixed_in(suffix, repository)
}

/// Builds the debloated image of `image` from the paths its containers
/// opened. Reads each layer twice; writes the new layers to `dir`.
pub fn debloat(
    image: &LoadedImage,
    accessed: &BTreeSet<String>,
    opts: &Options,
    dir: &Path,
) -> Result<Debloated, BuildError> {
    let mut indexes = Vec::with_capacity(image.layers.len());
    for blob in &image.layers {
        indexes.push(build::index_layer(blob)?);
    }
    let merged = view::View::build(&indexes);
    let keep: Vec<String> = view::DEFAULT_KEEP
        .iter()
        .map(|s| s.to_string())
        .chain(opts.keep.iter().cloned())
        .collect();
    let kept = view::closure(&merged, accessed.iter().map(String::as_str), &keep);
    let first = match opts.top {
        Some(n) => indexes.len().saturating_sub(n),
        None => 0,
    };
    let plan = view::plan(&indexes, &merged, &kept, first);
    let oci = image.manifest_media_type != "application/vnd.docker.distribution.manifest.v2+json";
    let mut layers = Vec::new();
    let mut stats = Vec::new();
    for ((blob, index), keep) in image.layers.iter().zip(&indexes).zip(plan) {
        match keep {
            Some(keep) => {
                let new = build::rewrite_layer(blob, &keep, oci, dir)?;
                stats.push(new.stats.clone());
                layers.push((blob.clone(), Some(new)));
            }
            None => {
                let files = index
                    .iter()
                    .filter(|e| !matches!(e.kind, tar::Kind::Dir | tar::Kind::Global))
                    .count() as u64;
                let bytes = index.iter().map(|e| e.size).sum();
                stats.push(LayerStats {
                    files_before: files,
                    files_after: files,
                    bytes_before: bytes,
                    bytes_after: bytes,
                    blob_before: blob.size,
                    blob_after: blob.size,
                });
                layers.push((blob.clone(), None));
            }
        }
    }
    let rewritten: Vec<Option<Rewritten>> = layers.iter().map(|(_, n)| n.clone()).collect();
    let (config, manifest) = build::rewrite_image(
        &image.manifest,
        &image.config,
        &rewritten,
        &image.manifest_digest,
    )?;
    Ok(Debloated {
        manifest_digest: build::digest_of(&manifest),
        config,
        manifest,
        manifest_media_type: image.manifest_media_type.clone(),
        layers,
        stats,
        paths_kept: kept.len(),
        paths_before: merged.paths().count(),
    })
}

/// Why a push failed.
#[derive(Debug, thiserror::Error)]
#[error("pushing {target}: {message}")]
pub struct PushError {
    /// Where to.
    pub target: String,
    /// What went wrong.
    pub message: String,
}

/// Pushes `image` to `target`: new layers from their files, unchanged
/// layers unless the registry has them, then the configuration and the
/// manifest. Returns the manifest's digest.
pub async fn push(
    image: &Debloated,
    client: &oci_client::Client,
    auth: &RegistryAuth,
    target: &Reference,
) -> Result<String, PushError> {
    let at = berth_proto::oci::oci_reference(target);
    let fail = |what: &str, e: &dyn std::fmt::Display| PushError {
        target: target.to_string(),
        message: format!("{what}: {e}"),
    };
    client
        .store_auth_if_needed(at.resolve_registry(), auth)
        .await;
    for (orig, new) in &image.layers {
        let blob = new.as_ref().map_or(orig, |n| &n.blob);
        let there = client
            .blob_exists(&at, &blob.digest)
            .await
            .map_err(|e| fail(&format!("checking blob {}", blob.digest), &e))?;
        if there {
            continue;
        }
        let data = tokio::fs::read(&blob.path)
            .await
            .map_err(|e| fail(&format!("reading {}", blob.path.display()), &e))?;
        client
            .push_blob(&at, data, &blob.digest)
            .await
            .map_err(|e| fail(&format!("blob {}", blob.digest), &e))?;
    }
    let config_digest = build::digest_of(&image.config);
    client
        .push_blob(&at, image.config.clone(), &config_digest)
        .await
        .map_err(|e| fail("configuration", &e))?;
    let content_type = image
        .manifest_media_type
        .parse()
        .map_err(|_| fail("manifest", &"bad media type"))?;
    client
        .push_manifest_raw(&at, image.manifest.clone(), content_type)
        .await
        .map_err(|e| fail("manifest", &e))?;
    Ok(image.manifest_digest.clone())
}

#[cfg(test)]
mod tests;
