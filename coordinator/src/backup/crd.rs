//! The `BackupPolicy` and `ImageBackup` custom resources (`berth.dev/v1alpha1`).
//!
//! A `BackupPolicy` (cluster-scoped) says where copies go and which
//! workloads are backed up; without one, nothing happens. An `ImageBackup`
//! (cluster-scoped, one per source image, named by [`super::naming::backup_name`])
//! is one copy: the controller makes them for the images workloads use, and
//! a user may make one by hand to copy an image no workload runs.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::imagecache::crd::DNS_SUBDOMAIN;
use berth_proto::reference::{PATTERN, REFERENCE_MAX};

/// A workload opts out with this annotation set to `"false"`.
pub const OPT_OUT: &str = "berth.dev/backup";
/// Set to `"true"` on a rolled workload, puts its original images back (and
/// opts it out, so it stays on them).
pub const RESTORE: &str = "berth.dev/backup-restore";
/// The images a workload had before it was rolled onto the copies (JSON).
pub const ORIGINAL_IMAGES: &str = "berth.dev/backup-original-images";

/// `host[:port]` with an optional path prefix, e.g. `backup.example:5000/mirror`.
pub const REGISTRY_PATTERN: &str =
    r"^[a-zA-Z0-9]([-a-zA-Z0-9.]*[a-zA-Z0-9])?(:[0-9]{1,5})?(/[a-z0-9]+([._-][a-z0-9]+)*)*$";

/// Where the images of running workloads are copied, and which workloads.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "berth.dev",
    version = "v1alpha1",
    kind = "BackupPolicy",
    shortname = "bp",
    category = "berth",
    doc = "Copies the images of running workloads to a backup registry and rolls the workloads onto the copies.",
    printcolumn = r#"{"name": "Target", "type": "string", "jsonPath": ".spec.target.registry"}"#,
    printcolumn = r#"{"name": "Naming", "type": "string", "jsonPath": ".spec.naming"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BackupPolicySpec {
    /// The backup registry.
    pub target: BackupTarget,
    /// `Flatten` (default): `<target>/<repository with / → _>:<tag>`, so
    /// `nginx:1.14.0` becomes `<target>/library_nginx:1.14.0`. `Mirror`: the
    /// source's registry and repository under the target.
    #[serde(default)]
    pub naming: Naming,
    /// Which namespaces' workloads are backed up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<Namespaces>,
    /// Workload kinds watched; default Deployment and DaemonSet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3))]
    pub kinds: Vec<WorkloadKind>,
    /// `Tag` (default): workloads are rolled onto `<copy>:<tag>`. `Digest`:
    /// onto `<copy>@<digest>`, the digest the copy was verified with.
    #[serde(default)]
    pub rewrite: Rewrite,
    /// Finished ImageBackups no workload has used for this long are deleted
    /// (the copies stay in the registry), e.g. `168h` (default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1m')").message("expireAfter must be a duration of at least 1m, e.g. 24h"))]
    pub expire_after: Option<String>,
    /// Copies running at once, cluster-wide (1 to 64; default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub max_concurrent_copies: Option<u32>,
    /// Copy, but never roll a workload.
    #[serde(default)]
    pub copy_only: bool,
}

/// The backup registry and its credentials.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupTarget {
    /// `host[:port][/prefix]` of the backup registry.
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new(format!("self.matches(r'{REGISTRY_PATTERN}')")).message("registry must be host[:port][/path], e.g. backup.example:5000/mirror"))]
    pub registry: String,
    /// A `kubernetes.io/dockerconfigjson` Secret with credentials for the
    /// backup registry (only ever sent to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<SecretRef>,
}

/// A Secret in a namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Its name.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(format!("self.matches(r'{DNS_SUBDOMAIN}')")).message("name must be a Secret name"))]
    pub name: String,
    /// Its namespace; default `berth-system`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub namespace: Option<String>,
}

/// Namespaces included and excluded.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Namespaces {
    /// Only these (default: every namespace).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(max = 63)))]
    pub include: Vec<String>,
    /// Never these; `kube-system` and Berth's own are always excluded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(max = 63)))]
    pub exclude: Vec<String>,
}

/// How copies are named.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum Naming {
    /// `<target>/<repository with / → _>:<tag>`.
    #[default]
    Flatten,
    /// `<target>/<source registry>/<repository>:<tag>`.
    Mirror,
}

/// What a rolled workload's image field names.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum Rewrite {
    /// The copy's tag.
    #[default]
    Tag,
    /// The copy's digest.
    Digest,
}

/// A kind of workload.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WorkloadKind {
    /// `apps/v1` Deployment.
    Deployment,
    /// `apps/v1` DaemonSet.
    DaemonSet,
    /// `apps/v1` StatefulSet.
    StatefulSet,
}

/// One image copied to the backup registry.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "berth.dev",
    version = "v1alpha1",
    kind = "ImageBackup",
    status = "ImageBackupStatus",
    shortname = "ib",
    category = "berth",
    doc = "One image copied to a backup registry, and the workloads that use it.",
    printcolumn = r#"{"name": "Source", "type": "string", "jsonPath": ".spec.source"}"#,
    printcolumn = r#"{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}"#,
    printcolumn = r#"{"name": "Reason", "type": "string", "jsonPath": ".status.reason"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.source != self.target").message("source and target must differ"))]
pub struct ImageBackupSpec {
    /// The image to copy, as the workloads name it.
    #[schemars(length(min = 1, max = REFERENCE_MAX))]
    #[x_kube(validation = Rule::new(format!("self.matches(r'{PATTERN}')")).message("source must be an image reference"))]
    pub source: String,
    /// Where it goes (tag, or the source's digest).
    #[schemars(length(min = 1, max = REFERENCE_MAX))]
    #[x_kube(validation = Rule::new(format!("self.matches(r'{PATTERN}')")).message("target must be an image reference"))]
    pub target: String,
    /// The BackupPolicy whose target credentials it is copied with.
    #[schemars(length(min = 1, max = 253))]
    pub policy: String,
}

/// Where a copy stands.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImageBackupStatus {
    /// `Pending`, `Copying`, `Done` or `Failed`.
    #[serde(default)]
    pub phase: String,
    /// `Ready`: the copy is in the target registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Digest of the top manifest (index or manifest), the same in both registries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Platforms copied (an index's), e.g. `linux/amd64`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<String>,
    /// Bytes sent to the target.
    #[serde(default)]
    pub bytes_copied: u64,
    /// Bytes the target already held (skipped or mounted).
    #[serde(default)]
    pub bytes_skipped: u64,
    /// Bytes of every blob of the image.
    #[serde(default)]
    pub bytes_total: u64,
    /// How long the last attempt took, e.g. `2.1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    /// The node whose agent ran the last attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Where the copy was read from: `registry`, or `node/<name>` (that
    /// node's runtime, when the source registry could not be reached; then
    /// `platforms` names the one platform it held).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copied_from: Option<String>,
    /// Workloads using the image: `Kind/namespace/name`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<String>,
    /// Why the last attempt failed: `SourceUnreachable`, `SourceAuthFailed`,
    /// `TargetAuthFailed`, `TargetUnreachable`, `NotFound`, `Timeout`, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The failure in the registry's words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Failed attempts in a row.
    #[serde(default)]
    pub attempts: u32,
    /// When the last attempt ended (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Since when no workload uses the image (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unused_since: Option<String>,
}
