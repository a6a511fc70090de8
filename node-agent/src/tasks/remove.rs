//! The remove task: removes an image only when Berth may.
//!
//! CRI has no call that drops one reference: `RemoveImage` deletes the image
//! with every tag and digest reference it carries (containerd's CRI deletes
//! each of the image's references), whichever reference or ID it is given.
//! So before removing, the agent checks that
//!
//! 1. Berth pulled the reference here (it is in the [`super::Managed`] set),
//! 2. no container on the node uses the image, and
//! 3. every other reference of the image is one Berth pulled too
//!    ([`foreign_references`] is empty);
//!
//! otherwise the image stays, no reference is dropped, and the task fails
//! with `NotManaged`, `InUse` or `SharedImage` (naming the foreign references).
//! CRI offers no lock: a reference added between the check and the removal
//! goes with the image.

use std::collections::BTreeSet;
use std::time::Instant;

use berth_proto::agent as pb;
use berth_proto::reference::Reference;
use tracing::info;

use super::{TaskRunner, failed, reason_of, update};
use crate::cri::CriError;
use crate::runtime::{ImageInfo, ImageRuntime};

/// What the runtime said about a removal Berth may make.
enum Removal {
    /// Removed (or already gone), with these other managed references.
    Removed { also: Vec<String> },
    /// A container uses the image.
    InUse,
    /// The image carries references Berth did not pull.
    Shared { id: String, foreign: Vec<String> },
}

/// The references of `image` that Berth did not pull: tags not in `managed`,
/// and digest references (`repo@sha256:…`) that are neither in `managed` nor
/// of the repository of a managed reference of the image.
///
/// containerd's CRI records `repo@digest` for the repository of every tag it
/// pulls, so a digest reference in a managed tag's repository came with
/// Berth's pull (it cannot be told apart from the same digest pulled by hand);
/// one in another repository came with someone else's pull.
pub fn foreign_references(image: &ImageInfo, managed: &BTreeSet<String>) -> Vec<String> {
    let parsed = |s: &String| Reference::parse(s).ok();
    let normalised = |s: &String| parsed(s).map_or_else(|| s.clone(), |r| r.to_string());
    let is_managed = |s: &String| managed.contains(&normalised(s));
    let managed_repos: BTreeSet<String> = image
        .repo_tags
        .iter()
        .chain(&image.repo_digests)
        .filter(|r| is_managed(r))
        .filter_map(parsed)
        .map(|r| r.repository())
        .collect();
    let foreign_tags = image.repo_tags.iter().filter(|t| !is_managed(t));
    let foreign_digests = image.repo_digests.iter().filter(|d| {
        !is_managed(d) && !parsed(d).is_some_and(|r| managed_repos.contains(&r.repository()))
    });
    foreign_tags.chain(foreign_digests).cloned().collect()
}

impl<R: ImageRuntime> TaskRunner<R> {
    /// Removes the image `r` names if Berth may (see the module docs).
    pub(super) async fn remove(&self, task_id: String, r: pb::RemoveTask) {
        let start = Instant::now();
        self.send(update(&task_id, pb::TaskState::Accepted));
        let reference = match Reference::parse(&r.image) {
            Ok(r) => r,
            Err(e) => {
                return self.send(failed(
                    &task_id,
                    pb::FailureReason::BadReference,
                    e.to_string(),
                    start,
                ));
            }
        };
        let key = reference.to_string();
        if !self.managed.contains(&key) {
            info!("not removed: Berth did not pull it here");
            return self.send(failed(
                &task_id,
                pb::FailureReason::NotManaged,
                format!("{key} was not pulled by Berth on this node; leaving it"),
                start,
            ));
        }
        let (reason, message) = match self.remove_if_berths(&reference).await {
            Ok(Removal::Removed { also }) => {
                self.managed.update(|m| {
                    m.remove(&key);
                    for other in &also {
                        m.remove(other);
                    }
                });
                info!(?also, "removed");
                return self.send(pb::TaskUpdate {
                    elapsed_ms: start.elapsed().as_millis() as u64,
                    ..update(&task_id, pb::TaskState::Done)
                });
            }
            Ok(Removal::InUse) => (
                pb::FailureReason::InUse,
                format!("a container on this node uses {key}; not removed"),
            ),
            Ok(Removal::Shared { id, foreign }) => (
                pb::FailureReason::SharedImage,
                format!(
                    "{key} is the same image ({id}) as {}, which Berth did not pull on this node; \
                     CRI would remove those references with it, so the image stays \
                     (remove them on the node, e.g. `ctr -n k8s.io images rm REF`, to let Berth remove it)",
                    foreign.join(", ")
                ),
            ),
            Err(e) => (reason_of(&e), e.to_string()),
        };
        info!(reason = reason.as_str_name(), %message, "not removed");
        self.send(failed(&task_id, reason, message, start));
    }

    async fn remove_if_berths(&self, reference: &Reference) -> Result<Removal, CriError> {
        let Some(image) = self.rt.image_status(reference).await? else {
            return Ok(Removal::Removed { also: vec![] });
        };
        if self.rt.images_in_use().await?.contains(&image.id) {
            return Ok(Removal::InUse);
        }
        let managed = self.managed.all();
        let foreign = foreign_references(&image, &managed);
        if !foreign.is_empty() {
            return Ok(Removal::Shared {
                id: image.id,
                foreign,
            });
        }
        self.rt.remove(&image.id).await?;
        let key = reference.to_string();
        let also = image
            .repo_tags
            .iter()
            .chain(&image.repo_digests)
            .filter(|r| **r != key && managed.contains(*r))
            .cloned()
            .collect();
        Ok(Removal::Removed { also })
    }
}
