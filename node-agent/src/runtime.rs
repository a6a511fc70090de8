//! The `ImageRuntime` trait: what Berth needs from a node's container runtime,
//! in Berth's own types. [`crate::cri::CriRuntime`] implements it over CRI gRPC;
//! [`MemRuntime`] is an in-memory fake for fast tests of the logic above it.
//!
//! [`ContainerLookup`] is the little the log reader ([`crate::logs`]) needs of
//! the runtime's containers: which container a pod's container name is now,
//! where its log file is, and whether it still runs. Both runtimes implement
//! it too; [`MemRuntime::add_container`] and [`MemRuntime::set_container_state`]
//! drive it in tests.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// The lifecycle state of a container, as CRI reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerState {
    /// Created, not started yet: its log file may not exist yet.
    Created,
    /// Running.
    Running,
    /// Exited: it writes no more log lines.
    Exited,
    /// The runtime does not know (e.g. it lost track after a restart).
    Unknown,
    /// The runtime no longer has the container (it was removed).
    Gone,
}

impl ContainerState {
    /// Whether the container can write no more log lines.
    pub fn is_finished(self) -> bool {
        matches!(self, ContainerState::Exited | ContainerState::Gone)
    }
}

/// A container found by [`ContainerLookup::find_container`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerLog {
    /// The runtime's container ID.
    pub id: String,
    /// Its CRI log file, a host path (`/var/log/pods/<ns>_<pod>_<uid>/<name>/<attempt>.log`).
    pub log_path: PathBuf,
    /// Its state when it was looked up.
    pub state: ContainerState,
}

/// What the log reader needs of the runtime's containers.
pub trait ContainerLookup: Send + Sync + 'static {
    /// The newest attempt (by creation time) of the container `container_name`
    /// of the pod with UID `pod_uid`, or `None` when the node has none.
    fn find_container(
        &self,
        pod_uid: &str,
        container_name: &str,
    ) -> impl Future<Output = Result<Option<ContainerLog>, CriError>> + Send;
    /// The state of the container `id` now ([`ContainerState::Gone`] once removed).
    fn container_state(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<ContainerState, CriError>> + Send;
}

/// An in-memory [`ImageRuntime`]: images live in a map, pulls succeed for
/// references registered with [`MemRuntime::publish`].
///
/// It models what containerd's CRI does with references: one image (one ID)
/// may carry several tags; a pull by tag adds the tag and the repository's
/// digest reference (`repo@digest`), a pull by digest only the latter; and
/// [`ImageRuntime::remove`] deletes the image with every reference to it,
/// whichever of them (or the ID) it is given.
#[derive(Clone, Default)]
pub struct MemRuntime {
    state: Arc<Mutex<MemState>>,
    /// The runtime is down: every call fails as CRI calls to a stopped runtime do.
    down: Arc<tokio::sync::watch::Sender<bool>>,
}

#[derive(Default)]
struct MemState {
    /// What a registry would serve: reference → (image id, size).
    published: BTreeMap<String, (String, u64)>,
    /// What the runtime holds, by image id.
    images: BTreeMap<String, ImageInfo>,
    in_use: Vec<String>,
    /// Containers for [`ContainerLookup`]: (pod uid, name, created at, container).
    containers: Vec<(String, String, i64, ContainerLog)>,
    pulls: u64,
    /// How long each pull takes.
    pull_delay: Duration,
}

impl MemRuntime {
    /// Makes `reference` pullable as an image of `size_bytes`; returns its ID.
    pub fn publish(&self, reference: &str, size_bytes: u64) -> String {
        let r = normalise(reference);
        let id = format!("sha256:{:064x}", fxhash(&r));
        self.state
            .lock()
            .unwrap()
            .published
            .insert(r, (id.clone(), size_bytes));
        id
    }

    /// Makes `reference` pullable as the same image (same ID) as the already
    /// published `existing`, as a registry does after a retag; returns the ID.
    pub fn publish_alias(&self, reference: &str, existing: &str) -> String {
        let mut st = self.state.lock().unwrap();
        let image = st
            .published
            .get(&normalise(existing))
            .cloned()
            .expect("alias of a published reference");
        st.published.insert(normalise(reference), image.clone());
        image.0
    }

    /// Drops one reference, as `ctr images rm` does (CRI has no such call);
    /// the image goes when no tag or digest reference is left.
    pub fn remove_reference(&self, reference: &str) {
        let r = normalise(reference);
        let mut st = self.state.lock().unwrap();
        for image in st.images.values_mut() {
            image.repo_tags.retain(|t| *t != r);
            image.repo_digests.retain(|d| *d != r);
        }
        st.images
            .retain(|_, i| !i.repo_tags.is_empty() || !i.repo_digests.is_empty());
    }

    /// Marks an image as used by a container.
    pub fn set_in_use(&self, image_id: &str) {
        self.state.lock().unwrap().in_use.push(image_id.to_string());
    }

    /// Makes every later pull take `delay` (a timer, so other tasks run meanwhile).
    pub fn set_pull_delay(&self, delay: Duration) {
        self.state.lock().unwrap().pull_delay = delay;
    }

    /// Stops (`true`) or restarts the fake runtime: while it is down every call
    /// fails with [`CriError::RuntimeUnavailable`], and a pull running when it
    /// stops fails too, leaving no image, as containerd's does.
    pub fn set_down(&self, down: bool) {
        self.down.send_replace(down);
    }

    /// The state, if the runtime is up.
    fn up(&self, op: &'static str) -> Result<std::sync::MutexGuard<'_, MemState>, CriError> {
        if *self.down.borrow() {
            return Err(CriError::RuntimeUnavailable {
                path: "/memory.sock".into(),
                op,
                message: "the fake runtime is down".into(),
            });
        }
        Ok(self.state.lock().unwrap())
    }

    /// Adds a container (one attempt) of pod `pod_uid` named `name`, created
    /// at `created_at` (any increasing number), for [`ContainerLookup`].
    pub fn add_container(&self, pod_uid: &str, name: &str, created_at: i64, log: ContainerLog) {
        self.state.lock().unwrap().containers.push((
            pod_uid.to_string(),
            name.to_string(),
            created_at,
            log,
        ));
    }

    /// Changes the state of the container `id`, e.g. to
    /// [`ContainerState::Exited`] to end a followed log.
    pub fn set_container_state(&self, id: &str, state: ContainerState) {
        let mut st = self.state.lock().unwrap();
        for (_, _, _, c) in st.containers.iter_mut().filter(|c| c.3.id == id) {
            c.state = state;
        }
    }

    /// How many pulls reached the runtime.
    pub fn pulls(&self) -> u64 {
        self.state.lock().unwrap().pulls
    }
}

fn normalise(reference: &str) -> String {
    Reference::parse(reference)
        .expect("valid reference")
        .to_string()
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

impl ImageRuntime for MemRuntime {
    async fn version(&self) -> Result<RuntimeVersion, CriError> {
        drop(self.up("Version")?);
        Ok(RuntimeVersion {
            name: "memory".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            api_version: "v1".into(),
        })
    }

    async fn list_images(&self) -> Result<Vec<ImageInfo>, CriError> {
        let st = self.up("ListImages")?;
        Ok(st.images.values().cloned().collect())
    }

    async fn image_status(&self, reference: &Reference) -> Result<Option<ImageInfo>, CriError> {
        let r = reference.to_string();
        let st = self.up("ImageStatus")?;
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
        let mut stopped = self.down.subscribe();
        let delay = {
            let mut st = self.up("PullImage")?;
            st.pulls += 1;
            st.pull_delay
        };
        if !delay.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stopped.wait_for(|down| *down) => {}
            }
        }
        let r = reference.to_string();
        // Stopped while pulling: the pull is lost with the runtime.
        let mut st = self.up("PullImage")?;
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
            repo_digests: vec![],
            size_bytes: size,
            pinned: false,
        });
        // The fake's manifest digest is the image ID; containerd's differs,
        // but like it every pulled repository gets its `repo@digest`.
        let digest_ref = format!("{}@{id}", reference.repository());
        if !entry.repo_digests.contains(&digest_ref) {
            entry.repo_digests.push(digest_ref);
        }
        if reference.digest.is_none() && !entry.repo_tags.contains(&r) {
            entry.repo_tags.push(r);
        }
        Ok(id)
    }

    async fn remove(&self, image: &str) -> Result<(), CriError> {
        let mut st = self.up("RemoveImage")?;
        let id = st
            .images
            .values()
            .find(|i| {
                i.id == image
                    || i.repo_tags.iter().any(|t| t == image)
                    || i.repo_digests.iter().any(|d| d == image)
            })
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
        let st = self.up("ImageFsInfo")?;
        Ok(FsInfo {
            mountpoint: "/memory".into(),
            used_bytes: st.images.values().map(|i| i.size_bytes).sum(),
            inodes_used: st.images.len() as u64,
        })
    }

    async fn images_in_use(&self) -> Result<Vec<String>, CriError> {
        let st = self.up("ListContainers")?;
        Ok(st.in_use.clone())
    }
}

impl ContainerLookup for MemRuntime {
    async fn find_container(
        &self,
        pod_uid: &str,
        container_name: &str,
    ) -> Result<Option<ContainerLog>, CriError> {
        let st = self.up("ListContainers")?;
        Ok(st
            .containers
            .iter()
            .filter(|(uid, name, _, _)| uid == pod_uid && name == container_name)
            .max_by_key(|(_, _, created, _)| *created)
            .map(|(_, _, _, c)| c.clone()))
    }

    async fn container_state(&self, id: &str) -> Result<ContainerState, CriError> {
        let st = self.up("ContainerStatus")?;
        Ok(st
            .containers
            .iter()
            .find(|c| c.3.id == id)
            .map_or(ContainerState::Gone, |c| c.3.state))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Reference {
        Reference::parse(s).unwrap()
    }

    #[tokio::test]
    async fn two_tags_of_one_image_share_its_id_and_removing_by_id_drops_both() {
        let rt = MemRuntime::default();
        let id = rt.publish("r.io/app:1.2", 1);
        assert_eq!(rt.publish_alias("r.io/app:prod", "r.io/app:1.2"), id);
        rt.pull(&r("r.io/app:1.2"), None).await.unwrap();
        assert_eq!(rt.pull(&r("r.io/app:prod"), None).await.unwrap(), id);
        let images = rt.list_images().await.unwrap();
        assert_eq!(images.len(), 1);
        assert_eq!(images[0].repo_tags, ["r.io/app:1.2", "r.io/app:prod"]);
        assert_eq!(images[0].repo_digests, [format!("r.io/app@{id}")]);

        rt.remove(&id).await.unwrap();
        assert!(rt.image_status(&r("r.io/app:1.2")).await.unwrap().is_none());
        assert!(
            rt.image_status(&r("r.io/app:prod"))
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn removing_by_one_tag_drops_every_other_tag_too() {
        let rt = MemRuntime::default();
        rt.publish("r.io/app:1.2", 1);
        rt.publish_alias("r.io/other:x", "r.io/app:1.2");
        rt.pull(&r("r.io/app:1.2"), None).await.unwrap();
        rt.pull(&r("r.io/other:x"), None).await.unwrap();
        rt.remove("r.io/other:x").await.unwrap();
        assert!(rt.list_images().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_pull_by_digest_adds_a_digest_reference_and_no_tag() {
        let rt = MemRuntime::default();
        let id = rt.publish("r.io/app:1.2", 1);
        let by_digest = format!("r.io/app@{id}");
        rt.publish_alias(&by_digest, "r.io/app:1.2");
        rt.pull(&r(&by_digest), None).await.unwrap();
        let image = rt.image_status(&r(&by_digest)).await.unwrap().unwrap();
        assert!(image.repo_tags.is_empty());
        assert_eq!(image.repo_digests, [by_digest]);
    }

    #[tokio::test]
    async fn removing_one_reference_keeps_the_image_under_the_others() {
        let rt = MemRuntime::default();
        let id = rt.publish("r.io/app:1.2", 1);
        rt.publish_alias("r.io/app:prod", "r.io/app:1.2");
        rt.pull(&r("r.io/app:1.2"), None).await.unwrap();
        rt.pull(&r("r.io/app:prod"), None).await.unwrap();
        rt.remove_reference("r.io/app:prod");
        let image = rt.image_status(&r("r.io/app:1.2")).await.unwrap().unwrap();
        assert_eq!(image.id, id);
        assert_eq!(image.repo_tags, ["r.io/app:1.2"]);
        rt.remove_reference("r.io/app:1.2");
        assert_eq!(
            rt.list_images().await.unwrap().len(),
            1,
            "its digest is left"
        );
        rt.remove_reference(&format!("r.io/app@{id}"));
        assert!(rt.list_images().await.unwrap().is_empty());
    }
}
