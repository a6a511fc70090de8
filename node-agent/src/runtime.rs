//! The `ImageRuntime` trait: what Berth needs from a node's container runtime,
//! in Berth's own types. [`crate::cri::CriRuntime`] implements it over CRI gRPC;
//! [`MemRuntime`] is an in-memory fake for fast tests of the logic above it.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use berth_proto::reference::Reference;

use crate::cri::CriError;

/// Name and version of a runtime, as CRI `Version` reports them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RuntimeVersion {
    /// e.g. `containerd`.
    pub name: String,
    /// e.g. `1.6.20~ds1`.
    pub version: String,
    /// CRI API version, e.g. `v1`.
    pub api_version: String,
}

/// One image held by the runtime.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImageInfo {
    /// Image ID (config digest).
    pub id: String,
    /// Tags that point at it, e.g. `docker.io/library/busybox:1.36`.
    pub repo_tags: Vec<String>,
    /// Digests it was pulled by, e.g. `docker.io/library/busybox@sha256:…`.
    pub repo_digests: Vec<String>,
    /// Size in bytes as the runtime counts it.
    pub size_bytes: u64,
    /// The runtime keeps it regardless of garbage collection.
    pub pinned: bool,
}

/// Usage of the runtime's image filesystem.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct FsInfo {
    /// Where the image filesystem is mounted, on the node.
    pub mountpoint: String,
    /// Bytes used by images.
    pub used_bytes: u64,
    /// Inodes used by images.
    pub inodes_used: u64,
}

pub use berth_proto::docker_config::RegistryAuth;

/// The operations Berth performs on a node's container runtime.
pub trait ImageRuntime: Send + Sync + 'static {
    /// Runtime name and version.
    fn version(&self) -> impl Future<Output = Result<RuntimeVersion, CriError>> + Send;
    /// Every image the runtime holds.
    fn list_images(&self) -> impl Future<Output = Result<Vec<ImageInfo>, CriError>> + Send;
    /// The image `reference` resolves to, or `None` when the runtime lacks it.
    fn image_status(
        &self,
        reference: &Reference,
    ) -> impl Future<Output = Result<Option<ImageInfo>, CriError>> + Send;
    /// Pulls `reference` and returns the image ID.
    fn pull(
        &self,
        reference: &Reference,
        auth: Option<&RegistryAuth>,
    ) -> impl Future<Output = Result<String, CriError>> + Send;
    /// Removes the image with this ID or reference (every tag of it).
    fn remove(&self, image: &str) -> impl Future<Output = Result<(), CriError>> + Send;
    /// Usage of the image filesystem.
    fn fs_info(&self) -> impl Future<Output = Result<FsInfo, CriError>> + Send;
    /// IDs of the images that containers on the node were created from.
    fn images_in_use(&self) -> impl Future<Output = Result<Vec<String>, CriError>> + Send;
}

/// An in-memory [`ImageRuntime`]: images live in a map, pulls succeed for
/// references registered with [`MemRuntime::publish`].
#[derive(Clone, Default)]
pub struct MemRuntime {
    state: Arc<Mutex<MemState>>,
}

#[derive(Default)]
struct MemState {
    /// What a registry would serve: reference → (image id, size).
    published: BTreeMap<String, (String, u64)>,
    /// What the runtime holds, by image id.
    images: BTreeMap<String, ImageInfo>,
    in_use: Vec<String>,
    pulls: u64,
}

impl MemRuntime {
    /// Makes `reference` pullable as an image of `size_bytes`; returns its ID.
    pub fn publish(&self, reference: &str, size_bytes: u64) -> String {
        let r = Reference::parse(reference)
            .expect("valid reference")
            .to_string();
        let id = format!("sha256:{:064x}", fxhash(&r));
        self.state
            .lock()
            .unwrap()
            .published
            .insert(r, (id.clone(), size_bytes));
        id
    }

    /// Marks an image as used by a container.
    pub fn set_in_use(&self, image_id: &str) {
        self.state.lock().unwrap().in_use.push(image_id.to_string());
    }

    /// How many pulls reached the runtime.
    pub fn pulls(&self) -> u64 {
        self.state.lock().unwrap().pulls
    }
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

impl ImageRuntime for MemRuntime {
    async fn version(&self) -> Result<RuntimeVersion, CriError> {
        Ok(RuntimeVersion {
            name: "memory".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            api_version: "v1".into(),
        })
    }

    async fn list_images(&self) -> Result<Vec<ImageInfo>, CriError> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .images
            .values()
            .cloned()
            .collect())
    }

    async fn image_status(&self, reference: &Reference) -> Result<Option<ImageInfo>, CriError> {
        let r = reference.to_string();
        let st = self.state.lock().unwrap();
        Ok(st
            .images
            .values()
            .find(|i| i.repo_tags.contains(&r) || i.repo_digests.contains(&r))
            .cloned())
    }

    async fn pull(
        &self,
        reference: &Reference,
        _auth: Option<&RegistryAuth>,
    ) -> Result<String, CriError> {
        let r = reference.to_string();
        let mut st = self.state.lock().unwrap();
        st.pulls += 1;
        let (id, size) = st
            .published
            .get(&r)
            .cloned()
            .ok_or_else(|| CriError::ImageNotFound {
                reference: r.clone(),
            })?;
        let entry = st.images.entry(id.clone()).or_insert_with(|| ImageInfo {
            id: id.clone(),
            repo_tags: vec![],
            repo_digests: vec![format!("{}@{id}", reference.repository())],
            size_bytes: size,
            pinned: false,
        });
        if !entry.repo_tags.contains(&r) {
            entry.repo_tags.push(r);
        }
        Ok(id)
    }

    async fn remove(&self, image: &str) -> Result<(), CriError> {
        let mut st = self.state.lock().unwrap();
        let id = st
            .images
            .values()
            .find(|i| i.id == image || i.repo_tags.iter().any(|t| t == image))
            .map(|i| i.id.clone());
        match id {
            Some(id) => {
                st.images.remove(&id);
                Ok(())
            }
            None => Err(CriError::ImageNotFound {
                reference: image.to_string(),
            }),
        }
    }

    async fn fs_info(&self) -> Result<FsInfo, CriError> {
        let st = self.state.lock().unwrap();
        Ok(FsInfo {
            mountpoint: "/memory".into(),
            used_bytes: st.images.values().map(|i| i.size_bytes).sum(),
            inodes_used: st.images.len() as u64,
        })
    }

    async fn images_in_use(&self) -> Result<Vec<String>, CriError> {
        Ok(self.state.lock().unwrap().in_use.clone())
    }
}
