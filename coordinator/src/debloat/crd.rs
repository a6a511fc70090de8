//! The `ImageDebloat` custom resource (`berth.dev/v1alpha1`, namespaced): a
//! workload's image profiled on its node, rebuilt from the files it used,
//! pushed as `<ref>-baffs` and rolled out, with automatic rollback.
//!
//! Two writers share its status without conflict, each with merge patches of
//! its own fields: the coordinator the phase and what it decided (`node`,
//! `image`, `target`, times, reason), the node's debloater `profiler` and
//! `build` (what it recorded and built).

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::backup::crd::REGISTRY_PATTERN;
use crate::imagecache::crd::DNS_SUBDOMAIN;

/// A workload with this annotation set to `"true"` gets an ImageDebloat
/// (named `<name>-debloat`, default settings), as baffs's pod-event
/// listener debloats what it sees.
pub const TRIGGER: &str = "berth.dev/debloat";
/// The image a debloated container had before (restored on rollback).
pub const ORIGINAL_IMAGE: &str = "berth.dev/debloat-original-image";
/// Pod template annotation whose change restarts a workload under the profiler.
pub const PROFILE_RESTART: &str = "berth.dev/debloat-profile";

/// A workload's image debloated and rolled out.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "berth.dev",
    version = "v1alpha1",
    kind = "ImageDebloat",
    namespaced,
    status = "ImageDebloatStatus",
    shortname = "idb",
    category = "berth",
    doc = "Profiles a workload's image on its node, keeps only the files it uses, and rolls the workload onto <image>-baffs.",
    printcolumn = r#"{"name": "Workload", "type": "string", "jsonPath": ".spec.workload.name"}"#,
    printcolumn = r#"{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}"#,
    printcolumn = r#"{"name": "Before", "type": "integer", "jsonPath": ".status.build.sizeBefore"}"#,
    printcolumn = r#"{"name": "After", "type": "integer", "jsonPath": ".status.build.sizeAfter"}"#,
    printcolumn = r#"{"name": "Reason", "type": "string", "jsonPath": ".status.reason"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ImageDebloatSpec {
    /// The Deployment or DaemonSet (in this namespace) to profile and roll.
    pub workload: WorkloadRef,
    /// Its container whose image is debloated; default the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub container: Option<String>,
    /// When profiling ends.
    #[serde(default)]
    pub profile: ProfileSpec,
    /// Paths kept whatever the profile says, beyond the default list
    /// (`*` within a path component, a trailing `/**` for a subtree).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(max = 4096)))]
    pub keep: Vec<String>,
    /// Rewrite only the top N layers; lower ones stay as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub top: Option<u32>,
    /// Where the result is pushed: a repository `host[:port]/path`, under
    /// the original tag plus the suffix; default the image's own repository.
    /// The nodes must be able to pull from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new(format!("self.matches(r'{REGISTRY_PATTERN}') && self.contains('/')")).message("repository must be host[:port]/path, e.g. registry.example:5000/debloated/redis"))]
    pub repository: Option<String>,
    /// Tag suffix of the result; default `-baffs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = Rule::new("self.matches(r'^[A-Za-z0-9_.-]+$')").message("suffix may hold letters, digits, '_', '.' and '-'"))]
    pub suffix: Option<String>,
    /// How long the new pods have to become ready before the workload is
    /// rolled back, e.g. `5m` (default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('5s')").message("rolloutTimeout must be a duration of at least 5s"))]
    pub rollout_timeout: Option<String>,
}

/// A workload in the ImageDebloat's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRef {
    /// `Deployment` or `DaemonSet`.
    #[x_kube(validation = Rule::new("self == 'Deployment' || self == 'DaemonSet'").message("kind must be Deployment or DaemonSet"))]
    pub kind: String,
    /// Its name.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(format!("self.matches(r'{DNS_SUBDOMAIN}')")).message("name must be a workload name"))]
    pub name: String,
}

/// When profiling ends: after `window`, once the workload is ready and the
/// `probeJob` has succeeded, or when `stop` is set, whichever comes first.
/// Never a fixed sleep unless asked: without `probeJob`, `window` (default
/// `60s`) is the user's.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProfileSpec {
    /// Longest profile, e.g. `2m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s')").message("window must be a duration of at least 1s"))]
    pub window: Option<String>,
    /// A Job in this namespace that exercises the workload; profiling ends
    /// when it has succeeded and the workload is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub probe_job: Option<String>,
    /// Set to end profiling now.
    #[serde(default)]
    pub stop: bool,
    /// Restart the workload's pods (a rolling restart) once the node's
    /// debloater watches for new containers, so what they read while
    /// starting is in the profile too (default true). Profiling then ends
    /// only after the restarted pods are ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<bool>,
}

/// Where a debloat stands.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImageDebloatStatus {
    /// `Pending`, `Profiling`, `Debloating`, `RollingOut`, `Ready`,
    /// `Failed` or `RolledBack`.
    #[serde(default)]
    pub phase: String,
    /// The image debloated, as the workload named it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Where the result goes: `<image>-baffs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The node the image is built on (the first of `nodes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Every node that runs a ready pod of the workload: each profiles it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// When profiling started and ended, the rollout started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_started_at: Option<String>,
    /// See `profileStartedAt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_ended_at: Option<String>,
    /// See `profileStartedAt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_started_at: Option<String>,
    /// When the workload was restarted under the profiler (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarted_at: Option<String>,
    /// Why it failed or rolled back: `WorkloadNotFound`, `NoReadyPod`,
    /// `BuildFailed`, `NewPodsFailed`, `NewPodsNotReady`, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The failure in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Each node's debloater: what it records, under its node's name (its
    /// own field).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub profilers: BTreeMap<String, ProfilerStatus>,
    /// The node's debloater: what it built (its own field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildStatus>,
}

/// What one node's debloater records.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProfilerStatus {
    /// Since when it records (RFC 3339).
    pub since: String,
    /// Containers recorded: `namespace/pod/container`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<String>,
    /// Whether new containers are marked before they start: `true` once
    /// armed, `false` if it could not be (then nothing is restarted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watching: Option<bool>,
    /// Once profiling ended, on nodes other than the building one: the
    /// paths recorded there, for the build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<String>>,
}

/// What the node's debloater built.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BuildStatus {
    /// The image pushed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Its manifest digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Compressed bytes of the layers before and after.
    #[serde(default)]
    pub size_before: u64,
    /// See `sizeBefore`.
    #[serde(default)]
    pub size_after: u64,
    /// Paths the profile recorded.
    #[serde(default)]
    pub paths_profiled: u64,
    /// Paths of the image kept, out of `pathsBefore`.
    #[serde(default)]
    pub paths_kept: u64,
    /// See `pathsKept`.
    #[serde(default)]
    pub paths_before: u64,
    /// Per layer, bottom first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerSizes>,
    /// Seconds from the end of profiling to the pushed manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// Why the build failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One layer before and after.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LayerSizes {
    /// Files (non-directories) before.
    pub files_before: u64,
    /// Files kept.
    pub files_after: u64,
    /// Compressed bytes before.
    pub size_before: u64,
    /// Compressed bytes after.
    pub size_after: u64,
}
