//! Pure rules of ImageBackup: where a copy goes, what an ImageBackup is
//! called, which namespaces and images a policy covers, what a rolled
//! workload names, and the reasons a status gives.

use berth_proto::agent::FailureReason;
use berth_proto::reference::Reference;
use sha2::{Digest, Sha256};

use super::crd::{BackupPolicySpec, Naming, Rewrite, WorkloadKind};

/// Namespaces no policy touches: the cluster's own and Berth's.
pub fn always_excluded(ns: &str, own_ns: &str) -> bool {
    ns == "kube-system" || ns == own_ns
}

/// Whether `policy` covers workloads in namespace `ns`.
pub fn namespace_selected(policy: &BackupPolicySpec, ns: &str, own_ns: &str) -> bool {
    if always_excluded(ns, own_ns) {
        return false;
    }
    match &policy.namespaces {
        None => true,
        Some(n) => {
            (n.include.is_empty() || n.include.iter().any(|i| i == ns))
                && !n.exclude.iter().any(|e| e == ns)
        }
    }
}

/// The kinds `policy` watches.
pub fn kinds(policy: &BackupPolicySpec) -> Vec<WorkloadKind> {
    if policy.kinds.is_empty() {
        vec![WorkloadKind::Deployment, WorkloadKind::DaemonSet]
    } else {
        policy.kinds.clone()
    }
}

/// The target registry without a trailing `/`.
fn target_of(policy: &BackupPolicySpec) -> &str {
    policy.target.registry.trim_end_matches('/')
}

/// Whether `image` already lives in the policy's target registry.
pub fn in_target(policy: &BackupPolicySpec, image: &Reference) -> bool {
    let target = target_of(policy);
    let repo = image.repository();
    repo.starts_with(&format!("{target}/"))
}

/// Where `source` is copied: `Flatten` puts the repository path, `/` made
/// `_`, right under the target; `Mirror` keeps the registry (its `:port` as
/// `_port`) and path. The tag stays; a digest reference stays a digest.
pub fn copy_reference(policy: &BackupPolicySpec, source: &Reference) -> String {
    let target = target_of(policy);
    let repo = match policy.naming {
        Naming::Flatten => source.path.replace('/', "_"),
        Naming::Mirror => format!("{}/{}", source.domain.replace(':', "_"), source.path),
    };
    match (&source.digest, &source.tag) {
        (Some(d), _) => format!("{target}/{repo}@{d}"),
        (None, Some(t)) => format!("{target}/{repo}:{t}"),
        (None, None) => format!("{target}/{repo}:latest"),
    }
}

/// The image a rolled workload names: the copy's tag, or its verified digest.
pub fn rolled_image(copy: &Reference, digest: &str, rewrite: Rewrite) -> String {
    match (rewrite, &copy.tag) {
        (Rewrite::Tag, Some(tag)) if copy.digest.is_none() => {
            format!("{}:{tag}", copy.repository())
        }
        _ => format!("{}@{digest}", copy.repository()),
    }
}

/// The ImageBackup of `source`: its last path component (a DNS label), then
/// a hash of the whole normalised reference, so every spelling of one image
/// names one ImageBackup, and two images never share one.
pub fn backup_name(source: &Reference) -> String {
    let hash = Sha256::digest(source.to_string().as_bytes());
    let hex: String = hash[..6].iter().map(|b| format!("{b:02x}")).collect();
    let last = source.path.rsplit('/').next().unwrap_or("image");
    let mut label: String = last
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(40)
        .collect();
    label = label.trim_matches('-').to_string();
    if label.is_empty() {
        label = "image".into();
    }
    format!("{label}-{hex}")
}

/// The status reason of a failed copy, naming the side that failed.
pub fn reason_name(r: FailureReason) -> &'static str {
    match r {
        FailureReason::RegistryUnreachable => "SourceUnreachable",
        FailureReason::ImageNotFound => "NotFound",
        FailureReason::SourceAuthFailed => "SourceAuthFailed",
        FailureReason::TargetAuthFailed => "TargetAuthFailed",
        FailureReason::TargetFailed => "TargetUnreachable",
        FailureReason::PullTimeout => "Timeout",
        FailureReason::BadReference => "BadImage",
        other => other.name(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::crd::{BackupTarget, Namespaces};

    fn policy(naming: Naming) -> BackupPolicySpec {
        BackupPolicySpec {
            target: BackupTarget {
                registry: "backup.example:5000/keep/".into(),
                credentials_secret: None,
            },
            naming,
            ..Default::default()
        }
    }

    fn r(s: &str) -> Reference {
        Reference::parse(s).unwrap()
    }

    #[test]
    fn flatten_is_image_backup_controllers_naming() {
        let p = policy(Naming::Flatten);
        assert_eq!(
            copy_reference(&p, &r("nginx:1.14.0")),
            "backup.example:5000/keep/library_nginx:1.14.0"
        );
        assert_eq!(
            copy_reference(&p, &r("quay.io/team/app/web")),
            "backup.example:5000/keep/team_app_web:latest"
        );
    }

    #[test]
    fn mirror_keeps_the_registry_and_path_and_digests_stay_digests() {
        let p = policy(Naming::Mirror);
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            copy_reference(&p, &r(&format!("10.0.0.1:5000/a/b@{d}"))),
            format!("backup.example:5000/keep/10.0.0.1_5000/a/b@{d}")
        );
    }

    #[test]
    fn images_already_in_the_target_are_not_copied_again() {
        let p = policy(Naming::Flatten);
        assert!(in_target(
            &p,
            &r("backup.example:5000/keep/library_nginx:1")
        ));
        assert!(!in_target(&p, &r("backup.example:5000/keeper/x:1")));
        assert!(!in_target(&p, &r("nginx:1")));
    }

    #[test]
    fn rolled_images_follow_the_rewrite_rule() {
        let d = format!("sha256:{}", "b".repeat(64));
        let tagged = r("backup.example:5000/keep/x:1");
        assert_eq!(
            rolled_image(&tagged, &d, Rewrite::Tag),
            "backup.example:5000/keep/x:1"
        );
        assert_eq!(
            rolled_image(&tagged, &d, Rewrite::Digest),
            format!("backup.example:5000/keep/x@{d}")
        );
        let pinned = r(&format!("backup.example:5000/keep/x@{d}"));
        assert_eq!(
            rolled_image(&pinned, &d, Rewrite::Tag),
            format!("backup.example:5000/keep/x@{d}")
        );
    }

    #[test]
    fn one_name_per_image_whatever_its_spelling() {
        assert_eq!(
            backup_name(&r("nginx")),
            backup_name(&r("docker.io/library/nginx:latest"))
        );
        assert_ne!(backup_name(&r("nginx:1")), backup_name(&r("nginx:2")));
        let n = backup_name(&r(&format!("a.example/x/{}:1", "y".repeat(200))));
        assert!(n.len() <= 63, "{n}");
        assert!(
            n.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
    }

    #[test]
    fn kube_system_and_berth_are_never_selected() {
        let mut p = policy(Naming::Flatten);
        assert!(namespace_selected(&p, "team", "berth-system"));
        assert!(!namespace_selected(&p, "kube-system", "berth-system"));
        assert!(!namespace_selected(&p, "berth-system", "berth-system"));
        p.namespaces = Some(Namespaces {
            include: vec!["a".into(), "b".into()],
            exclude: vec!["b".into()],
        });
        assert!(namespace_selected(&p, "a", "berth-system"));
        assert!(!namespace_selected(&p, "b", "berth-system"));
        assert!(!namespace_selected(&p, "c", "berth-system"));
    }
}
