//! The coordinator's shared views, free of kube and of the controllers.
//!
//! The live node registry ([`crate::nodes`]) produces [`AgentView`]s and
//! [`TaskRecord`]s; the ImageCache planner reads them; the planner's per-node
//! [`NodeDetail`] lands in [`CacheDetails`], which the public gRPC API
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
    pub images: Vec<pb::Image>,
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

/// The latest per-node detail of every cache, keyed `namespace/name`.
pub type CacheDetails = Arc<RwLock<BTreeMap<String, Vec<NodeDetail>>>>;
