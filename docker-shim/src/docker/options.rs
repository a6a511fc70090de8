//! What kubedock's operators set and the Docker API has no words for — pod
//! resources, pull policy, ServiceAccount, node selector, deadline, pull
//! secrets, a pod template, the user to run as — as the shim's defaults
//! (flags) overridden per container by labels `berth.dev/…`, into the
//! spec's `PodOptions`. The coordinator checks the values.

use std::collections::HashMap;

use berth_proto::api::{ContainerSpec, PodOptions};

/// Label: CPU request (`250m`).
pub const CPU_REQUEST: &str = "berth.dev/cpu-request";
/// Label: memory request (`256Mi`).
pub const MEMORY_REQUEST: &str = "berth.dev/memory-request";
/// Label: CPU limit.
pub const CPU_LIMIT: &str = "berth.dev/cpu-limit";
/// Label: memory limit.
pub const MEMORY_LIMIT: &str = "berth.dev/memory-limit";
/// Label: `Always`, `IfNotPresent` or `Never`.
pub const PULL_POLICY: &str = "berth.dev/pull-policy";
/// Label: the pod's ServiceAccount.
pub const SERVICE_ACCOUNT: &str = "berth.dev/service-account";
/// Label: `key=value,key=value` node labels the pod must land on.
pub const NODE_SELECTOR: &str = "berth.dev/node-selector";
/// Label: seconds after which the pod is stopped.
pub const ACTIVE_DEADLINE: &str = "berth.dev/active-deadline-seconds";
/// Label: `name,name` pull Secrets.
pub const IMAGE_PULL_SECRETS: &str = "berth.dev/image-pull-secrets";
/// Label: `uid[:gid]` to run as when the container names no user.
pub const RUN_AS_USER: &str = "berth.dev/run-as-user";
/// Label: `pod` or `sandbox-pool`.
pub const START_MODE: &str = "berth.dev/start-mode";

/// The shim's defaults for every container it creates.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodDefaults {
    /// As in [`PodOptions`].
    pub options: PodOptions,
    /// `uid[:gid]` for containers that name no user.
    pub run_as_user: String,
    /// Remove containers this long after their creation (0: never).
    pub max_age_seconds: i64,
    /// `pod` (or empty) or `sandbox-pool`.
    pub start_mode: String,
}

fn pairs(raw: &str, what: &str) -> Result<HashMap<String, String>, String> {
    raw.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| format!("{what}: {p:?} is not key=value"))
        })
        .collect()
}

fn list(raw: &str) -> Vec<String> {
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Parses `key=value` node selector entries (a flag's values).
pub fn node_selector(entries: &[String]) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    for e in entries {
        out.extend(pairs(e, "--node-selector")?);
    }
    Ok(out)
}

/// Sets the spec's pod options: the defaults, then the container's labels
/// on top. A malformed label is refused, naming it.
pub fn apply(defaults: &PodDefaults, spec: &mut ContainerSpec) -> Result<(), String> {
    let mut o = defaults.options.clone();
    let label = |key: &str| spec.labels.get(key).map(|v| v.trim().to_string());
    for (key, field) in [
        (CPU_REQUEST, &mut o.cpu_request),
        (MEMORY_REQUEST, &mut o.memory_request),
        (CPU_LIMIT, &mut o.cpu_limit),
        (MEMORY_LIMIT, &mut o.memory_limit),
        (PULL_POLICY, &mut o.pull_policy),
        (SERVICE_ACCOUNT, &mut o.service_account),
    ] {
        if let Some(v) = label(key) {
            *field = v;
        }
    }
    if let Some(v) = label(NODE_SELECTOR) {
        o.node_selector = pairs(&v, NODE_SELECTOR)?;
    }
    if let Some(v) = label(ACTIVE_DEADLINE) {
        o.active_deadline_seconds = v
            .parse()
            .map_err(|_| format!("{ACTIVE_DEADLINE}: {v:?} is not a number of seconds"))?;
    }
    if let Some(v) = label(IMAGE_PULL_SECRETS) {
        o.image_pull_secrets = list(&v);
    }
    if spec.user.is_empty() {
        spec.user = label(RUN_AS_USER).unwrap_or_else(|| defaults.run_as_user.clone());
    }
    spec.pod = (o != PodOptions::default()).then_some(o);
    spec.max_age_seconds = defaults.max_age_seconds;
    let mode = label(START_MODE).unwrap_or_else(|| defaults.start_mode.clone());
    spec.start_mode = match mode.as_str() {
        "" | "pod" => String::new(),
        "sandbox-pool" => mode,
        other => {
            return Err(format!(
                "{START_MODE}: {other:?} is not a start mode (pod or sandbox-pool)"
            ));
        }
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(labels: &[(&str, &str)]) -> ContainerSpec {
        ContainerSpec {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn labels_override_the_shims_defaults() {
        let defaults = PodDefaults {
            options: PodOptions {
                cpu_request: "100m".into(),
                pull_policy: "IfNotPresent".into(),
                node_selector: [("pool".to_string(), "ci".to_string())].into(),
                ..Default::default()
            },
            run_as_user: "1000".into(),
            max_age_seconds: 3600,
            start_mode: "pod".into(),
        };
        let mut s = spec(&[
            (CPU_REQUEST, "2"),
            (NODE_SELECTOR, "disk=ssd, zone=a"),
            (ACTIVE_DEADLINE, "300"),
            (IMAGE_PULL_SECRETS, "a,b"),
        ]);
        apply(&defaults, &mut s).unwrap();
        let o = s.pod.unwrap();
        assert_eq!(
            (o.cpu_request.as_str(), o.pull_policy.as_str()),
            ("2", "IfNotPresent")
        );
        assert_eq!(o.node_selector.len(), 2);
        assert_eq!(o.node_selector["zone"], "a");
        assert_eq!(o.active_deadline_seconds, 300);
        assert_eq!(o.image_pull_secrets, ["a", "b"]);
        assert_eq!(s.user, "1000");
        assert_eq!(s.max_age_seconds, 3600);
    }

    #[test]
    fn a_containers_own_user_wins_and_nothing_set_means_no_options() {
        let mut s = spec(&[(RUN_AS_USER, "2000")]);
        s.user = "0".into();
        apply(&PodDefaults::default(), &mut s).unwrap();
        assert_eq!((s.user.as_str(), s.pod.is_none()), ("0", true));
        let mut s = spec(&[(RUN_AS_USER, "2000")]);
        apply(&PodDefaults::default(), &mut s).unwrap();
        assert_eq!(s.user, "2000");
    }

    #[test]
    fn malformed_labels_are_refused_by_name() {
        let e = apply(
            &PodDefaults::default(),
            &mut spec(&[(NODE_SELECTOR, "ssd")]),
        )
        .unwrap_err();
        assert!(e.contains(NODE_SELECTOR), "{e}");
        let e = apply(
            &PodDefaults::default(),
            &mut spec(&[(ACTIVE_DEADLINE, "soon")]),
        )
        .unwrap_err();
        assert!(e.contains(ACTIVE_DEADLINE), "{e}");
        assert!(node_selector(&["a=1".into(), "b".into()]).is_err());
    }
}
