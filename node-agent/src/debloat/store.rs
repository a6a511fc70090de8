//! Reading an image out of the node's containerd, as a debloat needs it:
//! the image record (CRI namespace) names the manifest, and the manifest,
//! configuration and layer blobs come from the content store, each checked
//! against its digest. Layers land in a scratch directory.

use std::io::Write;
use std::path::Path;

use berth_proto::containerd::services::content::v1 as content;
use berth_proto::containerd::services::images::v1 as images;
use futures::StreamExt;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

use super::build::LayerBlob;

/// containerd namespace of the CRI plugin's images.
pub(crate) const CRI_NAMESPACE: &str = "k8s.io";
const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Why an image could not be read from the node.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The node has no such image, or lacks one of its blobs.
    #[error("{0}")]
    NotFound(String),
    /// The runtime failed or answered something unexpected.
    #[error("{0}")]
    Runtime(String),
    /// The scratch directory failed.
    #[error("scratch files: {0}")]
    Io(#[from] std::io::Error),
}

/// One image of the node, its layers in scratch files.
#[derive(Debug, Clone)]
pub struct LoadedImage {
    /// The name the runtime knows it by.
    pub name: String,
    /// Digest of the platform manifest.
    pub manifest_digest: String,
    /// The manifest, as stored.
    pub manifest: Vec<u8>,
    /// Its media type.
    pub manifest_media_type: String,
    /// The configuration, as stored.
    pub config: Vec<u8>,
    /// The layers, bottom first.
    pub layers: Vec<LayerBlob>,
}

/// The content and image services of one containerd.
#[derive(Clone)]
pub struct Store {
    content: content::content_client::ContentClient<Channel>,
    images: images::images_client::ImagesClient<Channel>,
}

/// A request to containerd's own API, in the CRI plugin's namespace.
pub(crate) fn request<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert(
        "containerd-namespace",
        tonic::metadata::MetadataValue::from_static(CRI_NAMESPACE),
    );
    r
}

fn runtime(what: &str, s: tonic::Status) -> StoreError {
    match s.code() {
        tonic::Code::NotFound => StoreError::NotFound(format!("{what}: not on this node")),
        tonic::Code::Unimplemented => StoreError::Runtime(format!(
            "{what}: the runtime does not serve containerd's content API (CRI-O?)"
        )),
        _ => StoreError::Runtime(format!("{what}: {}", s.message())),
    }
}

/// This machine's OCI architecture name.
pub fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

impl Store {
    /// The containerd behind the CRI socket `channel` dials.
    pub fn new(channel: Channel) -> Store {
        Store {
            content: content::content_client::ContentClient::new(channel.clone()),
            images: images::images_client::ImagesClient::new(channel),
        }
    }

    async fn has(&self, digest: &str) -> Result<bool, StoreError> {
        match self
            .content
            .clone()
            .info(request(content::InfoRequest {
                digest: digest.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(false),
            Err(s) => Err(runtime(&format!("blob {digest}"), s)),
        }
    }

    /// Streams blob `digest` into `out`, checking the digest; returns its size.
    async fn read_into(&self, digest: &str, out: &mut impl Write) -> Result<u64, StoreError> {
        let mut stream = self
            .content
            .clone()
            .read(request(content::ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            }))
            .await
            .map_err(|s| runtime(&format!("blob {digest}"), s))?
            .into_inner();
        let mut hash = Sha256::new();
        let mut n = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|s| runtime(&format!("reading blob {digest}"), s))?;
            hash.update(&chunk.data);
            n += chunk.data.len() as u64;
            out.write_all(&chunk.data)?;
        }
        let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
        if format!("sha256:{hex}") != digest {
            return Err(StoreError::Runtime(format!(
                "the content store holds sha256:{hex} under {digest}"
            )));
        }
        Ok(n)
    }

    async fn read_small(&self, digest: &str) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::new();
        self.read_into(digest, &mut out).await?;
        Ok(out)
    }

    /// Image `name` for this node's platform, its layers written to `dir`.
    pub async fn load(&self, name: &str, dir: &Path) -> Result<LoadedImage, StoreError> {
        let target = self
            .images
            .clone()
            .get(request(images::GetImageRequest {
                name: name.to_string(),
            }))
            .await
            .map_err(|s| runtime(&format!("image {name}"), s))?
            .into_inner()
            .image
            .and_then(|i| i.target)
            .ok_or_else(|| StoreError::NotFound(format!("image {name} has no target")))?;
        let mut digest = target.digest;
        let mut media_type = target.media_type;
        let mut raw = self.read_small(&digest).await?;
        if INDEX_TYPES.contains(&media_type.as_str()) {
            let index: Value = serde_json::from_slice(&raw)
                .map_err(|_| StoreError::Runtime(format!("index {digest} is not JSON")))?;
            let mut chosen = None;
            for m in index["manifests"].as_array().into_iter().flatten() {
                let p = &m["platform"];
                let (Some(d), Some(t)) = (m["digest"].as_str(), m["mediaType"].as_str()) else {
                    continue;
                };
                if p["os"] == "linux" && p["architecture"] == arch() && self.has(d).await? {
                    chosen = Some((d.to_string(), t.to_string()));
                    break;
                }
            }
            let (d, t) = chosen.ok_or_else(|| {
                StoreError::NotFound(format!(
                    "{name}: the node holds no linux/{} manifest of index {digest}",
                    arch()
                ))
            })?;
            raw = self.read_small(&d).await?;
            (digest, media_type) = (d, t);
        }
        let manifest: Value = serde_json::from_slice(&raw)
            .map_err(|_| StoreError::Runtime(format!("manifest {digest} is not JSON")))?;
        let config_digest = manifest["config"]["digest"]
            .as_str()
            .ok_or_else(|| StoreError::Runtime(format!("manifest {digest} has no config")))?;
        let config = self.read_small(config_digest).await?;
        let mut layers = Vec::new();
        for l in manifest["layers"].as_array().into_iter().flatten() {
            let (Some(d), Some(t)) = (l["digest"].as_str(), l["mediaType"].as_str()) else {
                return Err(StoreError::Runtime(format!(
                    "manifest {digest} has a layer without digest or media type"
                )));
            };
            let path = dir.join(d.replace(':', "-"));
            let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
            let size = self.read_into(d, &mut file).await?;
            file.flush()?;
            layers.push(LayerBlob {
                path,
                media_type: t.to_string(),
                digest: d.to_string(),
                size,
            });
        }
        Ok(LoadedImage {
            name: name.to_string(),
            manifest_digest: digest,
            manifest: raw,
            manifest_media_type: media_type,
            config,
            layers,
        })
    }
}
