//! The `ImageCache` custom resource (`berth.dev/v1alpha1`), its schema and
//! admission rules. The CRD YAML in `manifests/` is generated from these types
//! by the `crdgen` binary; a test fails if the two drift apart.
//!
//! Admission refuses what the coordinator could not use: image references
//! are checked against Berth's one grammar ([`berth_proto::reference::PATTERN`]
//! plus the name length), names against Kubernetes' own rules. What CEL cannot
//! see (references equal only once normalised, label keys of `matchLabels`,
//! whose length the apiserver cannot bound for its cost estimate) the
//! controller reports as the `InvalidSpec` condition instead (see `view`).
//! `tests/admission.rs` runs these rules on the generated CRD.

use std::collections::BTreeMap;

use berth_proto::reference::{NAME_MAX, PATTERN, REFERENCE_MAX};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    Condition, LabelSelector, LabelSelectorRequirement,
};
use kube::core::Rule;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Finalizer that lets the coordinator remove images before a cache goes.
pub const FINALIZER: &str = "berth.dev/image-cache";

/// Images pre-pulled onto chosen nodes, kept there while the cache exists.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "berth.dev",
    version = "v1alpha1",
    kind = "ImageCache",
    namespaced,
    status = "ImageCacheStatus",
    shortname = "ic",
    category = "berth",
    doc = "Images pre-pulled onto the selected nodes and kept there while the cache exists.",
    printcolumn = r#"{"name": "Ready", "type": "integer", "jsonPath": ".status.nodes.ready"}"#,
    printcolumn = r#"{"name": "Target", "type": "integer", "jsonPath": ".status.nodes.target"}"#,
    printcolumn = r#"{"name": "Status", "type": "string", "jsonPath": ".status.phase"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "!has(self.updatePolicy) || !has(self.updatePolicy.type) || self.updatePolicy.type != 'TrackTag' || self.images.all(i, !i.ref.contains('@'))"
).message("updatePolicy TrackTag follows tags, and an image pinned by digest (ref with @sha256:...) has no tag to follow: remove the digest or use type Pinned"))]
pub struct ImageCacheSpec {
    /// Images to keep on every selected node (1 to 256, each reference once).
    #[schemars(length(min = 1, max = 256))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["ref"]))]
    pub images: Vec<CachedImage>,
    /// Nodes whose labels match. With `nodeNames` too, a node must satisfy both;
    /// with neither, every node is selected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<NodeSelector>,
    /// Nodes by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 5000), inner(length(max = 253)))]
    #[x_kube(validation = Rule::new(format!("self.all(n, n.matches(r'{DNS_SUBDOMAIN}'))")).message("nodeNames must be node names: lowercase DNS subdomains such as node-1 or ip-10-0-0-1.ec2.internal, 1 to 253 characters"))]
    pub node_names: Option<Vec<String>>,
    /// `kubernetes.io/dockerconfigjson` Secrets in the cache's namespace with
    /// credentials for private registries. They go only to the agents that pull.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub image_pull_secrets: Vec<SecretRef>,
    /// `Pinned` (default): a tag is cached once and kept. `TrackTag`: each
    /// tag is re-resolved to its digest every `interval`, and nodes are kept
    /// on the digest it points to now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_policy: Option<UpdatePolicy>,
    /// How fast a rollout may go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
    /// What happens to the images when the cache is deleted or stops selecting
    /// a node: `Retain` (default) leaves them, `RemoveFromNodes` removes those
    /// Berth pulled, unless a container uses them or another cache wants them.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// Start no new pulls and remove nothing while true.
    #[serde(default)]
    pub paused: bool,
}

/// One image of a cache.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CachedImage {
    /// Image reference: `[registry[:port]/]repository[:tag][@digest]`.
    #[serde(rename = "ref")]
    #[schemars(length(min = 1, max = REFERENCE_MAX))]
    #[x_kube(validation = Rule::new(format!("self.matches(r'{PATTERN}')")).message("ref must be an image reference such as registry.example:5000/team/app:1.2 or app@sha256:<64 hex>: lowercase repository, registry port 1 to 65535, digest sha256/sha384/sha512"))]
    #[x_kube(validation = name_length_rule())]
    pub reference: String,
    /// Deadline of one pull attempt, e.g. `10m` (1s to 24h; default 30m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = kube::core::Rule::new("duration(self) >= duration('1s') && duration(self) <= duration('24h')").message("pullTimeout must be a duration from 1s to 24h, e.g. 90s or 10m"))]
    pub pull_timeout: Option<String>,
}

/// A DNS-1123 subdomain (names of nodes and Secrets), without its 253
/// character limit, which the schema's `maxLength` carries.
pub const DNS_SUBDOMAIN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// A label key: an optional DNS subdomain prefix and `/`, then a name of at
/// most 63 characters. The prefix's 253 limit is a rule of its own.
pub const LABEL_KEY: &str = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$";
/// A label value, without its 63 character limit (the schema's `maxLength`).
pub const LABEL_VALUE: &str = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$";

/// The CEL rule for the length of a reference's normalised name: the name as
/// written, plus the `docker.io/` and `library/` that normalisation adds. It
/// runs beside the grammar rule, so it may assume a well-formed reference and
/// use short expressions: the apiserver estimates a rule's cost from its
/// regular expressions' length times the string's, times 256 images.
fn name_length_rule() -> Rule {
    // Every `dir/` (a port's `:` included), then the last component up to its tag or digest.
    let name = r"self.find(r'^(?:[^/@]*/)*[^:@/]*')";
    let added = format!(
        r"(self.matches(r'^(?:localhost|[^/]*[.:][^/]*)/') ? (self.matches(r'^docker\.io/[^/]*$') ? 8 : 0) : ({name}.contains('/') ? 10 : 18))"
    );
    Rule::new(format!("size({name}) + {added} <= {NAME_MAX}")).message(
        "ref's repository name must be at most 255 characters once normalised (with docker.io/library/ for Docker Hub short names)",
    )
}

/// Nodes whose labels match: Kubernetes' `LabelSelector`, with the bounds and
/// rules the apiserver needs to refuse a selector the coordinator cannot use.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeSelector {
    /// Labels a node must carry, with these values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 64, "additionalProperties" = {"type": "string", "maxLength": 63}))]
    #[x_kube(validation = Rule::new(format!("self.all(k, self[k].matches(r'{LABEL_VALUE}'))")).message("matchLabels values must be label values: up to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"))]
    pub match_labels: Option<BTreeMap<String, String>>,
    /// Requirements a node's labels must all meet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub match_expressions: Option<Vec<SelectorRequirement>>,
}

/// One requirement of a node selector.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new("(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)").message("matchExpressions: In and NotIn need values, Exists and DoesNotExist take none"))]
pub struct SelectorRequirement {
    /// The label key, e.g. `kubernetes.io/arch`.
    #[schemars(length(min = 1, max = 317))]
    #[x_kube(validation = Rule::new(format!("self.matches(r'{LABEL_KEY}')")).message("matchExpressions key must be a label key: an optional DNS subdomain prefix and '/', then up to 63 letters, digits, '-', '_' or '.'"))]
    #[x_kube(validation = Rule::new("!self.contains('/') || size(self.find(r'^[^/]*')) <= 253").message("matchExpressions key prefix must be at most 253 characters"))]
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: SelectorOperator,
    /// Values for `In` and `NotIn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(max = 63)))]
    #[x_kube(validation = Rule::new(format!("self.all(v, v.matches(r'{LABEL_VALUE}'))")).message("matchExpressions values must be label values: up to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"))]
    pub values: Option<Vec<String>>,
}

/// How a selector requirement tests its key.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum SelectorOperator {
    /// The label's value is one of `values`.
    #[default]
    In,
    /// The label is missing or its value is none of `values`.
    NotIn,
    /// The label is there.
    Exists,
    /// The label is not there.
    DoesNotExist,
}

impl From<NodeSelector> for LabelSelector {
    fn from(s: NodeSelector) -> Self {
        LabelSelector {
            match_labels: s.match_labels,
            match_expressions: s.match_expressions.map(|es| {
                es.into_iter()
                    .map(|e| LabelSelectorRequirement {
                        key: e.key,
                        operator: format!("{:?}", e.operator),
                        values: e.values,
                    })
                    .collect()
            }),
        }
    }
}

/// How tags are followed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct UpdatePolicy {
    /// `Pinned` or `TrackTag`.
    #[serde(rename = "type", default)]
    pub type_: UpdateType,
    /// How often a tracked tag is re-resolved, e.g. `5m` (10s to 24h; default 5m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = kube::core::Rule::new("duration(self) >= duration('10s') && duration(self) <= duration('24h')").message("interval must be a duration from 10s to 24h, e.g. 5m"))]
    pub interval: Option<String>,
}

/// Whether tags are followed.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum UpdateType {
    /// Cache what a tag pointed to when first pulled.
    #[default]
    Pinned,
    /// Follow the tag to its current digest.
    TrackTag,
}

/// A Secret in the cache's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct SecretRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(format!("self.matches(r'{DNS_SUBDOMAIN}')")).message("imagePullSecrets name must be a Secret name: a lowercase DNS subdomain such as regcred"))]
    pub name: String,
}

/// Rollout limits.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// Nodes pulling this cache's images at once (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_concurrent_nodes: Option<u32>,
    /// Pulls of this cache's images at once on one node (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16))]
    pub max_concurrent_pulls_per_node: Option<u32>,
}

/// What happens to cached images when they are no longer wanted.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum DeletionPolicy {
    /// Leave them on the nodes.
    #[default]
    Retain,
    /// Remove those Berth pulled, unless in use or wanted by another cache.
    RemoveFromNodes,
}

/// Where a cache stands. Bounded: per-node detail is served by
/// `berth.v1.Inventory`, not stored here.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImageCacheStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing`, `Degraded`, `Paused` or `Deleting`.
    #[serde(default)]
    pub phase: String,
    /// Conditions `Ready`, `Progressing`, `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Selected nodes by state.
    #[serde(default)]
    pub nodes: NodeCounts,
    /// Per image.
    #[serde(default)]
    pub images: Vec<ImageState>,
    /// The last rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rollout: Option<RolloutTimes>,
    /// `RemoveFromNodes` only: nodes that may hold one of the cache's images
    /// (or were pulling one). A deleted cache keeps its finalizer until each of
    /// these nodes still in the cluster has had its copies removed, even
    /// across a coordinator restart or while the node's agent is away.
    /// Always written, so an emptied list replaces the old one.
    #[serde(default)]
    #[schemars(length(max = 5000))]
    pub nodes_holding: Vec<String>,
}

/// Selected nodes by state; a node counts once, in its worst state.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeCounts {
    /// Selected nodes.
    pub target: u32,
    /// Holding every image.
    pub ready: u32,
    /// Pulling.
    pub pulling: u32,
    /// Waiting for a pull.
    pub pending: u32,
    /// The last pull of an image failed.
    pub failed: u32,
    /// The node's agent is not connected.
    pub unknown: u32,
}

/// One image across the selected nodes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImageState {
    /// The reference, normalised.
    #[serde(rename = "ref")]
    pub reference: String,
    /// For a tracked tag, the digest the nodes are kept on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Image ID on the nodes that hold it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    /// Size in bytes, as the runtime reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Nodes holding it.
    pub ready_nodes: u32,
    /// Nodes whose last pull failed.
    pub failed_nodes: u32,
    /// Failed nodes by reason, e.g. `AuthFailed: 3`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failure_reasons: BTreeMap<String, u32>,
    /// Up to 10 failed nodes, with reason and message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_nodes_sample: Vec<FailedNode>,
}

/// A node where a pull failed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct FailedNode {
    /// The node.
    pub node: String,
    /// Why, e.g. `AuthFailed`.
    pub reason: String,
    /// The runtime's message.
    pub message: String,
}

/// Timing of a rollout: from a change of spec or targets to every node ready.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutTimes {
    /// When it began (RFC 3339).
    pub started: String,
    /// When every selected node held every image (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed: Option<String>,
    /// Seconds from start to completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
}
