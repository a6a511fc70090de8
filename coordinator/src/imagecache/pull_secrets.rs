//! Pull Secrets the coordinator may not read.
//!
//! The coordinator has no cluster-wide right to read Secrets: a namespace's
//! owner lets it read that namespace's pull Secrets by binding the
//! ClusterRole [`READER_ROLE`] to its ServiceAccount. Until then, reading a
//! cache's `imagePullSecrets` is Forbidden, and the cache says so —
//! `Degraded`, reason [`PULL_SECRET_FORBIDDEN`], with the one command that
//! fixes it — instead of a generic error or a later `AuthFailed`.
//!
//! Pure: statuses in, statuses out.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::crd::ImageCacheStatus;

/// Reason of `Degraded=True` (and `Ready=False`) while a pull Secret is
/// unreadable for lack of permission.
pub const PULL_SECRET_FORBIDDEN: &str = "PullSecretForbidden";
/// The ClusterRole that lets the coordinator read Secrets where it is bound.
pub const READER_ROLE: &str = "berth-pull-secret-reader";

/// Whether the apiserver refused the read for lack of permission.
pub fn is_forbidden(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 403)
}

/// What the cache says: which Secret, and the RoleBinding that lets the
/// coordinator (ServiceAccount `berth-coordinator` in `coordinator_ns`) read it.
pub fn forbidden_message(ns: &str, name: &str, coordinator_ns: &str) -> String {
    format!(
        "the coordinator may not read imagePullSecret {ns}/{name}; allow it to read this namespace's Secrets with: kubectl -n {ns} create rolebinding {READER_ROLE} --clusterrole={READER_ROLE} --serviceaccount={coordinator_ns}:berth-coordinator"
    )
}

/// Marks `status` as held back by an unreadable pull Secret: `Degraded`
/// (phase and condition) and not `Ready`, both with `message`. A deleting
/// or paused cache keeps its phase. Transition times move only when a
/// condition's status changes.
pub fn mark_forbidden(status: &mut ImageCacheStatus, message: &str, now: &Time) {
    if status.phase == "Deleting" {
        return;
    }
    if status.phase != "Paused" {
        status.phase = "Degraded".into();
    }
    for (type_, want) in [("Degraded", "True"), ("Ready", "False")] {
        let Some(c) = status.conditions.iter_mut().find(|c| c.type_ == type_) else {
            continue;
        };
        if c.status != want {
            c.status = want.into();
            c.last_transition_time = now.clone();
        }
        c.reason = PULL_SECRET_FORBIDDEN.into();
        c.message = message.into();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
    use k8s_openapi::jiff::Timestamp;

    fn cond(type_: &str, status: &str, at: &Time) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: "AllNodesReady".into(),
            message: String::new(),
            last_transition_time: at.clone(),
            observed_generation: None,
        }
    }

    fn ready_status(at: &Time) -> ImageCacheStatus {
        ImageCacheStatus {
            phase: "Ready".into(),
            conditions: vec![
                cond("Ready", "True", at),
                cond("Progressing", "False", at),
                cond("Degraded", "False", at),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn a_cache_with_an_unreadable_secret_is_degraded_with_the_rolebinding_to_create() {
        let then = Time(Timestamp::from_second(1_000).unwrap());
        let now = Time(Timestamp::from_second(2_000).unwrap());
        let mut s = ready_status(&then);
        let msg = forbidden_message("team", "regcred", "berth-system");
        mark_forbidden(&mut s, &msg, &now);
        assert_eq!(s.phase, "Degraded");
        let get = |t: &str| s.conditions.iter().find(|c| c.type_ == t).unwrap();
        assert_eq!(
            (
                get("Degraded").status.as_str(),
                get("Degraded").reason.as_str()
            ),
            ("True", PULL_SECRET_FORBIDDEN)
        );
        assert_eq!(get("Ready").status, "False");
        assert_eq!(get("Degraded").last_transition_time, now);
        assert_eq!(get("Progressing").last_transition_time, then);
        assert!(msg.contains("team/regcred"));
        assert!(msg.contains(
            "kubectl -n team create rolebinding berth-pull-secret-reader --clusterrole=berth-pull-secret-reader --serviceaccount=berth-system:berth-coordinator"
        ));
    }

    #[test]
    fn marking_an_already_forbidden_cache_keeps_its_transition_times() {
        let then = Time(Timestamp::from_second(1_000).unwrap());
        let later = Time(Timestamp::from_second(3_000).unwrap());
        let mut s = ready_status(&then);
        mark_forbidden(&mut s, "m", &then);
        let before = s.clone();
        mark_forbidden(&mut s, "m", &later);
        assert_eq!(s, before);
    }

    #[test]
    fn a_deleting_cache_keeps_its_phase_and_a_paused_one_keeps_paused() {
        let t = Time(Timestamp::from_second(1_000).unwrap());
        let mut deleting = ImageCacheStatus {
            phase: "Deleting".into(),
            ..ready_status(&t)
        };
        let before = deleting.clone();
        mark_forbidden(&mut deleting, "m", &t);
        assert_eq!(deleting, before);
        let mut paused = ImageCacheStatus {
            phase: "Paused".into(),
            ..ready_status(&t)
        };
        mark_forbidden(&mut paused, "m", &t);
        assert_eq!(paused.phase, "Paused");
        assert!(
            paused
                .conditions
                .iter()
                .any(|c| c.reason == PULL_SECRET_FORBIDDEN)
        );
    }
}
