//! The coordinator's shared views, free of kube and of the controllers.
//!
//! The live node registry ([`crate::nodes`]) produces [`AgentView`]s and
//! [`TaskRecord`]s; the ImageCache planner reads them; the planner's per-node
//! [`NodeDetail`] is worked out from [`CacheDetails`] (a [`DetailSource`] per
//! cache, computed when asked), which the public gRPC API
//! ([`crate::api`]) serves. Keeping these types here lets the gRPC layer depend
//! on plain data only, never on a controller or a Kubernetes type.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use berth_proto::agent as pb;

/// A node's agent, as the coordinator knows it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentView {
    /// A session is open.
    pub connected: bool,
    /// An inventory has arrived since the coordinator started, so `images`
    /// says what the node holds (else it says nothing).
    pub reported: bool,
    /// The runtime's images.
    pub images: HeldImages,
    /// References being pulled.
    pub pulling: BTreeSet<String>,
    /// References being removed.
    pub removing: BTreeSet<String>,
    /// Last failed pull per reference.
    pub failures: BTreeMap<String, Failure>,
}

impl AgentView {
    /// Whether the runtime holds `reference` (by tag or by digest).
    pub fn holds(&self, reference: &str) -> Option<&pb::Image> {
        self.images.iter().find(|i| {
            i.repo_tags.iter().any(|t| t == reference)
                || i.repo_digests.iter().any(|d| d == reference)
        })
    }
}

/// The images a node's runtime holds: those of the agent's last inventory,
/// shared with the node registry (so a planning pass over thousands of
/// nodes copies no image), and those of pulls finished since.
#[derive(Debug, Clone, Default)]
pub struct HeldImages {
    reported: Option<Arc<pb::Inventory>>,
    pulled: Vec<pb::Image>,
}

impl HeldImages {
    /// The images of `inventory` (shared, not copied) and `pulled`.
    pub fn new(inventory: Option<Arc<pb::Inventory>>, pulled: Vec<pb::Image>) -> Self {
        HeldImages {
            reported: inventory,
            pulled,
        }
    }

    /// Every image: the inventory's, then the pulled ones.
    pub fn iter(&self) -> impl Iterator<Item = &pb::Image> {
        let reported = self.reported.as_deref().map(|i| i.images.as_slice());
        reported.unwrap_or_default().iter().chain(&self.pulled)
    }

    /// How many images.
    pub fn len(&self) -> usize {
        self.reported.as_ref().map_or(0, |i| i.images.len()) + self.pulled.len()
    }

    /// No image at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The images as one list of this view's own, to change (copies the
    /// shared inventory once).
    pub fn make_mut(&mut self) -> &mut Vec<pb::Image> {
        let reported = self.reported.get_or_insert_with(Default::default);
        let images = &mut Arc::make_mut(reported).images;
        images.append(&mut self.pulled);
        images
    }
}

impl PartialEq for HeldImages {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl From<Vec<pb::Image>> for HeldImages {
    fn from(images: Vec<pb::Image>) -> Self {
        HeldImages::new(None, images)
    }
}

impl FromIterator<pb::Image> for HeldImages {
    fn from_iter<I: IntoIterator<Item = pb::Image>>(iter: I) -> Self {
        HeldImages::from(iter.into_iter().collect::<Vec<_>>())
    }
}

/// The last failed pull of an image on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// e.g. `AuthFailed`.
    pub reason: String,
    /// The runtime's message.
    pub message: String,
    /// Attempts so far.
    pub attempts: u32,
    /// Its backoff has passed: it may be tried again.
    pub retry_due: bool,
}

/// A task sent to an agent and not yet finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRecord {
    /// The image it is about.
    pub image: String,
    /// A pull (else a remove).
    pub pull: bool,
    /// For a pull of a tracked tag, the `repository@digest` it ends up with.
    pub pin: Option<String>,
}

/// Per-node detail of one cache, for the public API.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeDetail {
    /// Node name.
    pub node: String,
    /// One entry per wanted image.
    pub images: Vec<ImageDetail>,
}

/// One image of a cache on one node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageDetail {
    /// Normalised reference.
    pub reference: String,
    /// `Ready`, `Pulling`, `Pending`, `Failed` or `Unknown`.
    pub state: String,
    /// Failure reason, if failed.
    pub reason: String,
    /// Failure message, if failed.
    pub message: String,
    /// Failed attempts in a row.
    pub attempts: u32,
}

/// One cache's per-node detail, worked out when asked: the planner keeps the
/// views of its last pass behind this (shared, not copied), and the public
/// API computes the detail from them per request. Computing it on every pass
/// instead would hold an entry per node and image at all times, and build
/// them all again on every pass.
pub trait DetailSource: Send + Sync {
    /// The detail, one entry per selected node.
    fn node_details(&self) -> Vec<NodeDetail>;
}

/// The latest per-node detail of every cache, keyed `namespace/name`.
pub type CacheDetails = Arc<RwLock<BTreeMap<String, Arc<dyn DetailSource>>>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn image(id: &str) -> pb::Image {
        pb::Image {
            id: id.into(),
            ..Default::default()
        }
    }

    #[test]
    fn held_images_are_the_inventorys_then_the_pulled_ones_and_compare_by_content() {
        let inventory = Arc::new(pb::Inventory {
            images: vec![image("a")],
            ..Default::default()
        });
        let mut held = HeldImages::new(Some(inventory.clone()), vec![image("b")]);
        let ids: Vec<&str> = held.iter().map(|i| i.id.as_str()).collect();
        assert_eq!((ids, held.len()), (vec!["a", "b"], 2));
        assert_eq!(held, HeldImages::from(vec![image("a"), image("b")]));
        held.make_mut()[0].id = "changed".into();
        assert_eq!(
            inventory.images[0].id, "a",
            "the shared inventory stays as reported"
        );
        assert!(HeldImages::default().is_empty());
    }
}
