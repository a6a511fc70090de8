//! The decisions of one ImageBackup pass, pure: policies, workloads and
//! ImageBackups in; what to create, write, delete, copy and roll out.
//! [`super::controller`] feeds it from its mirrors and carries the answers
//! out (and verifies each copy in the target registry before a roll, which
//! only a registry call can do).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use berth_proto::reference::Reference;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;

use super::crd::{BackupPolicy, ImageBackup, ImageBackupSpec, ImageBackupStatus};
use super::naming::{
    backup_name, copy_reference, in_target, kinds, namespace_selected, rolled_image,
};
use super::workloads::{Originals, Workload};

/// Failed attempts of one copy before it stays Failed.
pub const MAX_ATTEMPTS: u32 = 5;
/// `expireAfter` when the policy names none.
pub const DEFAULT_EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);

/// Who uses one source image, under which policy.
#[derive(Debug, Clone)]
pub struct Use {
    /// The policy that covers the first of its users.
    pub policy: Arc<BackupPolicy>,
    /// `Kind/namespace/name` of every covered workload that uses it (rolled
    /// ones too, through the originals they keep).
    pub users: BTreeSet<String>,
    /// One of them is ready: the image is worth a copy.
    pub ready: bool,
}

/// What the workloads say, by source image, and which asked for a restore.
#[derive(Debug, Default)]
pub struct Survey {
    /// Source image (normalised) → its use.
    pub uses: BTreeMap<String, Use>,
    /// Indices (into the workloads given) of those to restore.
    pub restores: Vec<usize>,
}

/// The first policy (by the order given) that covers `w`.
pub fn policy_for<'a>(
    policies: &'a [Arc<BackupPolicy>],
    w: &Workload,
    own_ns: &str,
) -> Option<&'a Arc<BackupPolicy>> {
    policies.iter().find(|p| {
        kinds(&p.spec).contains(&w.kind) && namespace_selected(&p.spec, &w.namespace, own_ns)
    })
}

/// Which images the covered workloads use; opted-out workloads count for
/// nothing, and those asking for a restore are listed instead.
pub fn survey(policies: &[Arc<BackupPolicy>], workloads: &[Workload], own_ns: &str) -> Survey {
    let mut s = Survey::default();
    for (i, w) in workloads.iter().enumerate() {
        let Some(policy) = policy_for(policies, w, own_ns) else {
            continue;
        };
        if w.opted_out() {
            continue;
        }
        if w.restore_asked() {
            s.restores.push(i);
            continue;
        }
        for (init, name, image) in &w.containers {
            let Ok(r) = Reference::parse(image) else {
                continue;
            };
            let source = if in_target(&policy.spec, &r) {
                match w
                    .original_image(*init, name)
                    .and_then(|o| Reference::parse(&o).ok())
                {
                    Some(o) => o,
                    None => continue,
                }
            } else {
                r
            };
            let u = s.uses.entry(source.to_string()).or_insert_with(|| Use {
                policy: policy.clone(),
                users: BTreeSet::new(),
                ready: false,
            });
            u.users.insert(w.key());
            u.ready |= w.ready;
        }
    }
    s
}

/// The ImageBackups to create: one per image a ready workload uses, unless
/// one of its name exists.
pub fn to_create(
    survey: &Survey,
    existing: &HashMap<String, Arc<ImageBackup>>,
) -> Vec<ImageBackup> {
    let mut out = Vec::new();
    for (source, u) in &survey.uses {
        let Ok(r) = Reference::parse(source) else {
            continue;
        };
        let name = backup_name(&r);
        if u.ready && !existing.contains_key(&name) {
            out.push(ImageBackup::new(
                &name,
                ImageBackupSpec {
                    source: r.to_string(),
                    target: copy_reference(&u.policy.spec, &r),
                    policy: u.policy.name_any(),
                },
            ));
        }
    }
    out
}

/// The users and `unusedSince` to write into `b`'s status, if they changed.
pub fn users_update(
    status: &ImageBackupStatus,
    users: Option<&BTreeSet<String>>,
    now: Timestamp,
) -> Option<(Vec<String>, Option<String>)> {
    let list: Vec<String> = users
        .map(|u| u.iter().cloned().collect())
        .unwrap_or_default();
    let unused_since = if list.is_empty() {
        status
            .unused_since
            .clone()
            .or_else(|| Some(now.to_string()))
    } else {
        None
    };
    (list != status.workloads || unused_since != status.unused_since)
        .then_some((list, unused_since))
}

fn since(s: &Option<String>, now: Timestamp) -> Option<SignedDuration> {
    let t: Timestamp = s.as_deref()?.parse().ok()?;
    Some(now.duration_since(t))
}

/// Whether `b` is finished and nobody has used it for its policy's
/// `expireAfter`.
pub fn expired(b: &ImageBackup, policy: &BackupPolicy, now: Timestamp) -> bool {
    let Some(s) = &b.status else { return false };
    let expiry = policy
        .spec
        .expire_after
        .as_deref()
        .and_then(|e| humantime::parse_duration(e).ok())
        .unwrap_or(DEFAULT_EXPIRY);
    matches!(s.phase.as_str(), "Done" | "Failed")
        && s.workloads.is_empty()
        && since(&s.unused_since, now)
            .is_some_and(|d| d > SignedDuration::try_from(expiry).unwrap_or(SignedDuration::MAX))
}

/// Whether `b` may start a copy now: never tried, interrupted, or failed
/// fewer than [`MAX_ATTEMPTS`] times with its backoff over.
pub fn due(b: &ImageBackup, now: Timestamp) -> bool {
    let s = b.status.clone().unwrap_or_default();
    match s.phase.as_str() {
        "" | "Pending" | "Copying" => true,
        "Failed" if s.attempts < MAX_ATTEMPTS => {
            let delay = crate::nodes::retry_delay(s.attempts);
            since(&s.finished_at, now)
                .is_none_or(|d| d >= SignedDuration::try_from(delay).unwrap_or_default())
        }
        _ => false,
    }
}

/// One copy to verify in the target before a roll.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// The reference to HEAD in the target.
    pub reference: String,
    /// The digest it must answer.
    pub digest: String,
}

/// What to do with one workload.
#[derive(Debug, PartialEq)]
pub enum Roll {
    /// Nothing: on its copies already, or some image is not copied yet.
    Wait,
    /// Once every check passes: set these images (init?, container,
    /// image), keeping these originals.
    Patch {
        /// The copies to verify first.
        checks: Vec<Check>,
        /// The new images.
        images: Vec<(bool, String, String)>,
        /// Every original image, old and new.
        originals: Originals,
    },
}

/// Whether `w` can be rolled onto its copies: every image it uses outside
/// the target has a `Done` ImageBackup with a digest.
pub fn rollout(
    w: &Workload,
    policy: &BackupPolicy,
    backups: &HashMap<String, Arc<ImageBackup>>,
) -> Roll {
    let (mut checks, mut images) = (Vec::new(), Vec::new());
    let mut originals = w.originals().unwrap_or_default();
    for (init, name, image) in &w.containers {
        let Ok(r) = Reference::parse(image) else {
            return Roll::Wait;
        };
        if in_target(&policy.spec, &r) {
            continue;
        }
        let Some(b) = backups.get(&backup_name(&r)) else {
            return Roll::Wait;
        };
        let Some(digest) = b
            .status
            .as_ref()
            .filter(|s| s.phase == "Done")
            .and_then(|s| s.digest.clone())
        else {
            return Roll::Wait;
        };
        let Ok(copy) = Reference::parse(&b.spec.target) else {
            return Roll::Wait;
        };
        // A digest target is checked at the digest pushed (a node's own
        // platform, when the copy came from a node).
        let reference = if copy.digest.is_some() {
            format!("{}@{digest}", copy.repository())
        } else {
            b.spec.target.clone()
        };
        checks.push(Check {
            reference,
            digest: digest.clone(),
        });
        let map = if *init {
            &mut originals.init_containers
        } else {
            &mut originals.containers
        };
        map.entry(name.clone()).or_insert_with(|| image.clone());
        images.push((
            *init,
            name.clone(),
            rolled_image(&copy, &digest, policy.spec.rewrite),
        ));
    }
    if images.is_empty() {
        Roll::Wait
    } else {
        Roll::Patch {
            checks,
            images,
            originals,
        }
    }
}

#[cfg(test)]
mod tests;
