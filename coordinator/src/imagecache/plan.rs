//! What every node should pull or remove, and what each cache's status says:
//! pure functions of (caches, nodes, agent reports), tested as data in, data
//! out. The controller builds these views from the apiserver and the agent
//! sessions and carries the actions out.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use berth_proto::agent as pb;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::crd::{DeletionPolicy, FailedNode, ImageState, NodeCounts};
pub use crate::domain::{AgentView, Failure};

/// Most failed nodes a status lists by name.
pub const FAILED_SAMPLE: usize = 10;

/// One ImageCache as the planner sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CacheView {
    /// `namespace/name`.
    pub key: String,
    /// Wanted images, references normalised.
    pub images: Vec<WantedImage>,
    /// Images the cache held earlier (in its status) that its spec dropped.
    pub forgotten: Vec<String>,
    /// Label selector over nodes.
    pub selector: Option<LabelSelector>,
    /// Node names.
    pub node_names: Option<Vec<String>>,
    /// What happens to images no longer wanted.
    pub deletion: DeletionPolicy,
    /// The cache is being deleted.
    pub deleting: bool,
    /// No new pulls, no removals.
    pub paused: bool,
    /// Nodes pulling this cache's images at once.
    pub max_concurrent_nodes: Option<u32>,
    /// Pulls of this cache's images at once on one node.
    pub max_pulls_per_node: u32,
    /// What in the spec could not be used as written (see `view`).
    pub problems: Vec<SpecProblem>,
    /// Images whose readiness for this cache waits on, or was refused by, a
    /// check of the cache's own credentials (see `access`); absent: no doubt.
    pub access: BTreeMap<String, Access>,
    /// Nodes its status records as possibly holding its images (see [`holders`]).
    pub holders: Vec<String>,
}

/// Doubt about a cache's own right to an image another cache's credentials pulled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// The registry has not yet answered for this cache's credentials: a node
    /// holding the image counts as waiting, not ready.
    Unverified,
    /// The registry refused this cache's credentials (its words): the image is
    /// Failed with `AuthFailed` for this cache on every selected node.
    Denied(String),
}

/// One wanted image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedImage {
    /// Normalised reference.
    pub reference: String,
    /// Deadline of one pull attempt.
    pub timeout: Duration,
    /// For a tracked tag, `repository@digest` the node's image must carry.
    pub pin: Option<String>,
}

/// One node as the planner sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeView {
    /// Node name.
    pub name: String,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
    /// What its agent reported; `None` if no agent ever connected.
    pub agent: Option<AgentView>,
}

/// Something the coordinator should ask an agent to do.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// Pull `image` on `node` for `caches` (whose pull secrets apply).
    Pull {
        /// Node name.
        node: String,
        /// Normalised reference.
        image: String,
        /// Deadline of the attempt.
        timeout: Duration,
        /// Every live cache that wants it on the node and is not refused it,
        /// the one whose rollout admitted the pull first; their credentials
        /// are tried in turn.
        caches: Vec<String>,
        /// Failed attempts so far on this node.
        attempt: u32,
        /// Its size where another node holds it (0: unknown), for the disk guard.
        expected_size: u64,
        /// For a tracked tag, the `repository@digest` to end up with.
        pin: Option<String>,
    },
    /// Remove `image` from `node`.
    Remove {
        /// Node name.
        node: String,
        /// Normalised reference.
        image: String,
    },
}

/// Whether `selector` matches `labels` (matchLabels and matchExpressions).
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_ok && exprs_ok
}

/// `selector` as `kubectl` writes one: `pool=gpu,zone in (a,b),!spot`.
pub fn describe_selector(selector: &LabelSelector) -> String {
    let mut parts: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in selector.match_expressions.iter().flatten() {
        let values = e.values.as_deref().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            op => format!("{} {op} ({values})", e.key),
        });
    }
    if parts.is_empty() {
        "(everything)".into()
    } else {
        parts.join(",")
    }
}

impl CacheView {
    /// How the cache picks nodes, for messages: `nodeSelector pool=gpu and
    /// nodeNames [a, b]`; `every node` with neither.
    pub fn describe_targets(&self) -> String {
        let selector = self
            .selector
            .as_ref()
            .map(|s| format!("nodeSelector {}", describe_selector(s)));
        let names = self
            .node_names
            .as_ref()
            .map(|n| format!("nodeNames [{}]", n.join(", ")));
        match (selector, names) {
            (Some(s), Some(n)) => format!("{s} and {n}"),
            (Some(one), None) | (None, Some(one)) => one,
            (None, None) => "every node".into(),
        }
    }

    /// Whether the cache selects `node`.
    pub fn targets(&self, node: &NodeView) -> bool {
        let by_name = self
            .node_names
            .as_ref()
            .is_none_or(|names| names.contains(&node.name));
        let by_label = self
            .selector
            .as_ref()
            .is_none_or(|s| selector_matches(s, &node.labels));
        by_name && by_label
    }
}

impl AgentView {
    /// Whether the runtime holds `w`: by tag or digest, and for a tracked tag
    /// the image the tag points to carries the tracked digest.
    pub fn holds_wanted(&self, w: &WantedImage) -> Option<&pb::Image> {
        let image = self.holds(&w.reference)?;
        match &w.pin {
            Some(pin) if !image.repo_digests.contains(pin) => None,
            _ => Some(image),
        }
    }
}

/// Where one wanted image of a cache stands on one node.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageOnNode<'a> {
    /// No connected agent: nobody can tell.
    Unknown,
    /// The node holds it (for a tracked tag, at the tracked digest).
    Ready(&'a pb::Image),
    /// Its last pull failed.
    Failed(Failure),
    /// A pull is under way.
    Pulling,
    /// Waiting for a pull.
    Pending,
}

impl ImageOnNode<'_> {
    /// `Ready`, `Pulling`, `Pending`, `Failed` or `Unknown`.
    pub fn name(&self) -> &'static str {
        match self {
            ImageOnNode::Unknown => "Unknown",
            ImageOnNode::Ready(_) => "Ready",
            ImageOnNode::Failed(_) => "Failed",
            ImageOnNode::Pulling => "Pulling",
            ImageOnNode::Pending => "Pending",
        }
    }
}

/// The one decision of where image `w` of a cache stands on `node`; the
/// status counts and the per-node detail both come from it.
pub fn image_state<'a>(cache: &CacheView, node: &'a NodeView, w: &WantedImage) -> ImageOnNode<'a> {
    let Some(a) = node.agent.as_ref().filter(|a| a.connected) else {
        return ImageOnNode::Unknown;
    };
    let access = cache.access.get(&w.reference);
    if let Some(Access::Denied(why)) = access {
        // The node's own failed pulls, if any, say more than the check did.
        let tried = a.failures.get(&w.reference);
        return ImageOnNode::Failed(Failure {
            reason: pb::FailureReason::AuthFailed.name().into(),
            message: tried.map_or_else(
                || format!("the registry refused this cache's own credentials: {why}"),
                |f| f.message.clone(),
            ),
            attempts: tried.map_or(0, |f| f.attempts),
            retry_due: false,
        });
    }
    if let Some(image) = a.holds_wanted(w) {
        if access == Some(&Access::Unverified) {
            ImageOnNode::Pending
        } else {
            ImageOnNode::Ready(image)
        }
    } else if let Some(f) = a.failures.get(&w.reference) {
        ImageOnNode::Failed(f.clone())
    } else if a.pulling.contains(&w.reference) {
        ImageOnNode::Pulling
    } else {
        ImageOnNode::Pending
    }
}

/// Every (node, reference) some live cache wants kept.
fn wanted(caches: &[CacheView], nodes: &[NodeView]) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for c in caches.iter().filter(|c| !c.deleting) {
        for n in nodes.iter().filter(|n| c.targets(n)) {
            for i in &c.images {
                out.insert((n.name.clone(), i.reference.clone()));
            }
        }
    }
    out
}

/// References a RemoveFromNodes cache wants gone from `node`.
fn unwanted_by<'a>(c: &'a CacheView, node: &NodeView) -> Vec<&'a str> {
    if c.deletion != DeletionPolicy::RemoveFromNodes || c.paused {
        return vec![];
    }
    let mut out: Vec<&str> = c.forgotten.iter().map(String::as_str).collect();
    if c.deleting || !c.targets(node) {
        out.extend(c.images.iter().map(|i| i.reference.as_str()));
    }
    out
}

/// Removals of `cache`'s images still to do (or under way).
fn pending_removals<'a>(
    c: &'a CacheView,
    nodes: &'a [NodeView],
    wanted: &'a BTreeSet<(String, String)>,
) -> impl Iterator<Item = (&'a NodeView, &'a str)> + 'a {
    nodes.iter().flat_map(move |n| {
        unwanted_by(c, n).into_iter().filter_map(move |r| {
            let agent = n.agent.as_ref().filter(|a| a.connected)?;
            let image = agent.holds(r)?;
            let removable = image.managed
                && !image.in_use
                && !wanted.contains(&(n.name.clone(), r.to_string()));
            removable.then_some((n, r))
        })
    })
}

/// What to ask the agents to do now (only of agents whose current session has
/// sent its inventory): pulls of wanted images that are missing,
/// not under way and not backing off, within each cache's rollout limits; and
/// removals of images Berth pulled that no live cache wants and no container uses.
pub fn actions(caches: &[CacheView], nodes: &[NodeView]) -> Vec<Action> {
    let wanted = wanted(caches, nodes);
    let mut sizes: BTreeMap<&str, u64> = BTreeMap::new();
    for a in nodes.iter().filter_map(|n| n.agent.as_ref()) {
        // A size of 0 is unknown (e.g. a finished pull not yet in an inventory).
        for i in a.images.iter().filter(|i| i.size_bytes > 0) {
            for t in i.repo_tags.iter().chain(&i.repo_digests) {
                sizes.insert(t, i.size_bytes);
            }
        }
    }
    let mut planned: BTreeSet<(String, String)> = BTreeSet::new();
    let mut out = Vec::new();
    for c in caches.iter().filter(|c| !c.deleting && !c.paused) {
        let targets: Vec<(&NodeView, &AgentView)> = nodes
            .iter()
            .filter(|n| c.targets(n))
            .filter_map(|n| Some((n, known(n)?)))
            .collect();
        let busy = |a: &AgentView| {
            c.images
                .iter()
                .filter(|i| a.pulling.contains(&i.reference))
                .count()
        };
        let mut active_nodes = targets.iter().filter(|(_, a)| busy(a) > 0).count();
        for (n, a) in targets {
            let mut running = busy(a);
            let was_active = running > 0;
            for i in &c.images {
                let r = &i.reference;
                let blocked = a.holds_wanted(i).is_some()
                    || matches!(c.access.get(r), Some(Access::Denied(_)))
                    || a.pulling.contains(r)
                    || a.failures.get(r).is_some_and(|f| !f.retry_due)
                    || planned.contains(&(n.name.clone(), r.clone()));
                if blocked || running >= c.max_pulls_per_node as usize {
                    continue;
                }
                if !was_active && running == 0 {
                    if c.max_concurrent_nodes
                        .is_some_and(|m| active_nodes >= m as usize)
                    {
                        break;
                    }
                    active_nodes += 1;
                }
                running += 1;
                planned.insert((n.name.clone(), r.clone()));
                out.push(Action::Pull {
                    node: n.name.clone(),
                    image: r.clone(),
                    timeout: i.timeout,
                    caches: vec![c.key.clone()],
                    attempt: a.failures.get(r).map_or(0, |f| f.attempts),
                    expected_size: sizes.get(r.as_str()).copied().unwrap_or_default(),
                    pin: i.pin.clone(),
                });
            }
        }
    }
    // Every other cache wanting the image on the node lends its credentials.
    let by_name: HashMap<&str, &NodeView> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    for action in &mut out {
        let Action::Pull {
            node,
            image,
            caches: lenders,
            ..
        } = action
        else {
            continue;
        };
        let Some(n) = by_name.get(node.as_str()) else {
            continue;
        };
        for c in caches.iter().filter(|c| !c.deleting && c.targets(n)) {
            let wants = c.images.iter().any(|i| &i.reference == image);
            let refused = matches!(c.access.get(image.as_str()), Some(Access::Denied(_)));
            if wants && !refused && !lenders.contains(&c.key) {
                lenders.push(c.key.clone());
            }
        }
    }
    let mut removals = BTreeSet::new();
    for c in caches {
        for (n, r) in pending_removals(c, nodes, &wanted) {
            let removing = n.agent.as_ref().is_some_and(|a| a.removing.contains(r));
            if !removing {
                removals.insert(Action::Remove {
                    node: n.name.clone(),
                    image: r.to_string(),
                });
            }
        }
    }
    out.extend(removals);
    out
}

/// Whether a connected agent's inventory says what the node holds.
fn known(n: &NodeView) -> Option<&AgentView> {
    n.agent.as_ref().filter(|a| a.connected && a.reported)
}

/// Whether `agent` holds (as Berth's) or pulls one of `references`.
fn holds_any(agent: &AgentView, references: &[&str]) -> bool {
    references
        .iter()
        .any(|r| agent.pulling.contains(*r) || agent.holds(r).is_some_and(|i| i.managed))
}

/// The record, kept in a `RemoveFromNodes` cache's status, of the nodes that
/// may hold one of its images: a node whose agent reports it holding or
/// pulling one; and a node whose agent is away (or has not reported since the
/// coordinator started) that was recorded before or was last seen holding or
/// pulling one. A node leaves the record when its agent reports none of them,
/// or when it leaves the cluster (`nodes` lists the cluster's nodes).
pub fn holders(cache: &CacheView, nodes: &[NodeView]) -> Vec<String> {
    if cache.deletion != DeletionPolicy::RemoveFromNodes {
        return vec![];
    }
    let all: Vec<&str> = cache
        .images
        .iter()
        .map(|i| i.reference.as_str())
        .chain(cache.forgotten.iter().map(String::as_str))
        .collect();
    nodes
        .iter()
        .filter(|n| match known(n) {
            Some(a) => holds_any(a, &all),
            None => {
                cache.holders.contains(&n.name)
                    || n.agent.as_ref().is_some_and(|a| holds_any(a, &all))
            }
        })
        .map(|n| n.name.clone())
        .collect()
}

/// The nodes a deleting RemoveFromNodes cache still waits for: connected
/// nodes with one of its images left to remove or still being pulled, and
/// nodes whose agent is away that may hold one ([`holders`]). In-use images
/// are kept, not waited for; nodes that left the cluster are not waited for.
pub fn deletion_waits(cache: &CacheView, caches: &[CacheView], nodes: &[NodeView]) -> Vec<String> {
    let wanted = wanted(caches, nodes);
    let mut out: BTreeSet<String> = pending_removals(cache, nodes, &wanted)
        .map(|(n, _)| n.name.clone())
        .collect();
    for n in nodes {
        let unwanted: Vec<&str> = unwanted_by(cache, n)
            .into_iter()
            .filter(|r| !wanted.contains(&(n.name.clone(), r.to_string())))
            .collect();
        if unwanted.is_empty() {
            continue;
        }
        let waits = match known(n) {
            Some(a) => unwanted.iter().any(|r| a.pulling.contains(*r)),
            None => {
                cache.holders.contains(&n.name)
                    || n.agent.as_ref().is_some_and(|a| holds_any(a, &unwanted))
            }
        };
        if waits {
            out.insert(n.name.clone());
        }
    }
    out.into_iter().collect()
}

/// A deleting RemoveFromNodes cache may go once [`deletion_waits`] names no node.
pub fn deletion_done(cache: &CacheView, caches: &[CacheView], nodes: &[NodeView]) -> bool {
    deletion_waits(cache, caches, nodes).is_empty()
}

/// The status a cache should show.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Computed {
    /// Selected nodes by state.
    pub nodes: NodeCounts,
    /// Per image.
    pub images: Vec<ImageState>,
    /// The most frequent failure reason, if any node failed.
    pub top_reason: Option<String>,
    /// Entries of `nodeNames` that name no node of the cluster.
    pub missing_node_names: Vec<String>,
    /// The record of nodes that may hold the cache's images ([`holders`]).
    pub holders: Vec<String>,
}

/// Node state, worst first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum NodeState {
    Failed,
    Pulling,
    Pending,
    Ready,
}

/// Counts and per-image detail for `cache` over `nodes`.
pub fn status(cache: &CacheView, nodes: &[NodeView]) -> Computed {
    let mut counts = NodeCounts::default();
    let mut images: Vec<ImageState> = cache
        .images
        .iter()
        .map(|i| ImageState {
            reference: i.reference.clone(),
            ..Default::default()
        })
        .collect();
    let mut reasons: BTreeMap<String, u32> = BTreeMap::new();
    for n in nodes.iter().filter(|n| cache.targets(n)) {
        counts.target += 1;
        if n.agent.as_ref().is_none_or(|a| !a.connected) {
            counts.unknown += 1;
            continue;
        }
        let mut worst = NodeState::Ready;
        for (i, st) in cache.images.iter().zip(images.iter_mut()) {
            if let Some(pin) = &i.pin {
                st.digest = pin.split_once('@').map(|(_, d)| d.to_string());
            }
            let state = match image_state(cache, n, i) {
                ImageOnNode::Ready(img) => {
                    st.ready_nodes += 1;
                    st.image_id.get_or_insert_with(|| img.id.clone());
                    st.size.get_or_insert(img.size_bytes);
                    NodeState::Ready
                }
                ImageOnNode::Failed(f) => {
                    st.failed_nodes += 1;
                    *st.failure_reasons.entry(f.reason.clone()).or_default() += 1;
                    *reasons.entry(f.reason.clone()).or_default() += 1;
                    if st.failed_nodes_sample.len() < FAILED_SAMPLE {
                        st.failed_nodes_sample.push(FailedNode {
                            node: n.name.clone(),
                            reason: f.reason.clone(),
                            message: f.message.chars().take(512).collect(),
                        });
                    }
                    NodeState::Failed
                }
                ImageOnNode::Pulling => NodeState::Pulling,
                ImageOnNode::Pending | ImageOnNode::Unknown => NodeState::Pending,
            };
            worst = worst.min(state);
        }
        match worst {
            NodeState::Ready => counts.ready += 1,
            NodeState::Pulling => counts.pulling += 1,
            NodeState::Pending => counts.pending += 1,
            NodeState::Failed => counts.failed += 1,
        }
    }
    let top_reason = reasons
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        .map(|(r, _)| r);
    let missing_node_names = cache
        .node_names
        .iter()
        .flatten()
        .filter(|name| !nodes.iter().any(|n| &n.name == *name))
        .cloned()
        .collect();
    Computed {
        nodes: counts,
        images,
        top_reason,
        missing_node_names,
        holders: holders(cache, nodes),
    }
}

/// Something in a cache's spec the coordinator cannot use as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecProblem {
    /// An image reference that does not parse; the image is skipped.
    BadReference {
        /// As written.
        reference: String,
        /// Why it does not parse.
        reason: String,
    },
    /// Two images that are one once normalised; the second is ignored.
    Duplicate {
        /// The first, as written.
        first: String,
        /// The second, as written.
        second: String,
        /// What both normalise to.
        normal: String,
    },
    /// A duration that does not parse; the default is used instead.
    BadDuration {
        /// The field, e.g. `pullTimeout`.
        field: &'static str,
        /// As written.
        value: String,
        /// Why it does not parse.
        reason: String,
        /// What is used instead.
        default: Duration,
    },
    /// A `matchLabels` key that no node label can have; it matches no node.
    BadLabelKey {
        /// As written.
        key: String,
    },
}

impl std::fmt::Display for SpecProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpecProblem::BadReference { reference, reason } => {
                write!(f, "image {reference:?} is skipped: {reason}")
            }
            SpecProblem::Duplicate {
                first,
                second,
                normal,
            } => write!(
                f,
                "images {first:?} and {second:?} are the same image ({normal}); the second is ignored"
            ),
            SpecProblem::BadDuration {
                field,
                value,
                reason,
                default,
            } => write!(
                f,
                "{field} {value:?} is not a duration such as 90s or 1h30m ({reason}); using the default {}",
                humanize(*default)
            ),
            SpecProblem::BadLabelKey { key } => write!(
                f,
                "nodeSelector.matchLabels key {key:?} is not a label key, so it matches no node"
            ),
        }
    }
}

/// `90s`, `5m`, `2h`: the largest whole unit.
fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        _ if s >= 3600 && s.is_multiple_of(3600) => format!("{}h", s / 3600),
        _ if s >= 60 && s.is_multiple_of(60) => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests;
