//! From a container's record to its pod, and from the pod back to the
//! container's state in Docker's words. Plain functions over plain data.

use std::collections::BTreeMap;

use berth_proto::api as pb;
use berth_proto::reference::Reference;
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, ContainerStatus, EnvVar, ExecAction, LocalObjectReference, Pod,
    PodSecurityContext, PodSpec, Probe, ResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;

use super::record::{CONTAINER_LABEL, RUN_LABEL, Record, pod_name};

/// Name of the one container in every pod.
pub const MAIN_CONTAINER: &str = "main";
/// Grace between the stop signal and the kill when the spec names none.
pub const DEFAULT_STOP_TIMEOUT: u32 = 10;
/// Docker's word for a time that never happened.
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// A spec Berth cannot turn into a pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The image reference does not parse.
    #[error("invalid reference format: {0}")]
    Image(String),
    /// `user` is not numeric.
    #[error("user {0:?}: Berth runs containers as pods, which need a numeric uid[:gid]")]
    User(String),
    /// An env entry without a name.
    #[error("environment entry {0:?} has no name")]
    Env(String),
    /// A pod option Kubernetes would refuse.
    #[error("{0}")]
    Option(String),
    /// The pod template does not read as a Pod.
    #[error("the pod template is not a Pod in YAML or JSON: {0}")]
    Template(String),
}

/// Normalises the spec's image reference.
pub fn image_of(spec: &pb::ContainerSpec) -> Result<String, SpecError> {
    Reference::parse(&spec.image)
        .map(|r| r.to_string())
        .map_err(|e| SpecError::Image(format!("{:?}: {e}", spec.image)))
}

fn user_of(user: &str) -> Result<(Option<i64>, Option<i64>), SpecError> {
    if user.is_empty() {
        return Ok((None, None));
    }
    let bad = || SpecError::User(user.to_string());
    let (uid, gid) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let uid = uid.parse::<i64>().map_err(|_| bad())?;
    let gid = gid
        .map(|g| g.parse::<i64>().map_err(|_| bad()))
        .transpose()?;
    Ok((Some(uid), gid))
}

fn env_of(env: &[String]) -> Result<Vec<EnvVar>, SpecError> {
    env.iter()
        .map(|e| {
            let (name, value) = e.split_once('=').unwrap_or((e.as_str(), ""));
            if name.is_empty() {
                return Err(SpecError::Env(e.clone()));
            }
            Ok(EnvVar {
                name: name.to_string(),
                value: Some(value.to_string()),
                value_from: None,
            })
        })
        .collect()
}

fn quantity(what: &str, value: &str) -> Result<Quantity, SpecError> {
    let ok = !value.is_empty()
        && value.len() <= 32
        && value.starts_with(|c: char| c.is_ascii_digit() || c == '.')
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.');
    if !ok {
        return Err(SpecError::Option(format!(
            "{what} {value:?} is not a Kubernetes quantity (e.g. 250m, 1, 512Mi)"
        )));
    }
    Ok(Quantity(value.to_string()))
}

fn resources_of(
    spec: &pb::ContainerSpec,
    base: Option<ResourceRequirements>,
) -> Result<Option<ResourceRequirements>, SpecError> {
    let mut r = base.unwrap_or_default();
    let limits = r.limits.get_or_insert_with(BTreeMap::new);
    if spec.memory_bytes > 0 {
        limits.insert(
            "memory".to_string(),
            Quantity(spec.memory_bytes.to_string()),
        );
    }
    if spec.nano_cpus > 0 {
        // Millicores, rounded up so a small limit is not zero.
        let milli = (spec.nano_cpus + 999_999) / 1_000_000;
        limits.insert("cpu".to_string(), Quantity(format!("{milli}m")));
    }
    let o = spec.pod.clone().unwrap_or_default();
    for (key, value, what) in [
        ("cpu", &o.cpu_limit, "cpu limit"),
        ("memory", &o.memory_limit, "memory limit"),
    ] {
        if !value.is_empty() {
            limits.insert(key.to_string(), quantity(what, value)?);
        }
    }
    let requests = r.requests.get_or_insert_with(BTreeMap::new);
    for (key, value, what) in [
        ("cpu", &o.cpu_request, "cpu request"),
        ("memory", &o.memory_request, "memory request"),
    ] {
        if !value.is_empty() {
            requests.insert(key.to_string(), quantity(what, value)?);
        }
    }
    if r.limits.as_ref().is_some_and(|l| l.is_empty()) {
        r.limits = None;
    }
    if r.requests.as_ref().is_some_and(|l| l.is_empty()) {
        r.requests = None;
    }
    Ok((r.limits.is_some() || r.requests.is_some() || r.claims.is_some()).then_some(r))
}

/// Whole seconds of a Docker duration in nanoseconds (at least 1), or the
/// default when unset.
fn seconds(nanos: i64, default: i32) -> i32 {
    if nanos <= 0 {
        return default;
    }
    i32::try_from(nanos.saturating_add(999_999_999) / 1_000_000_000)
        .unwrap_or(i32::MAX)
        .max(1)
}

/// Docker's health check as a readiness probe (none for `NONE` or empty).
fn probe_of(h: Option<&pb::Healthcheck>) -> Result<Option<Probe>, SpecError> {
    let Some(h) = h else { return Ok(None) };
    let command = match h.test.split_first() {
        None => return Ok(None),
        Some((kind, _)) if kind == "NONE" => return Ok(None),
        Some((kind, args)) if kind == "CMD" && !args.is_empty() => args.to_vec(),
        Some((kind, [line])) if kind == "CMD-SHELL" => {
            vec!["/bin/sh".into(), "-c".into(), line.clone()]
        }
        _ => {
            return Err(SpecError::Option(format!(
                "health check test {:?}: want [\"CMD\", args…], [\"CMD-SHELL\", command] or [\"NONE\"]",
                h.test
            )));
        }
    };
    Ok(Some(Probe {
        exec: Some(ExecAction {
            command: Some(command),
        }),
        period_seconds: Some(seconds(h.interval_nanos, 30)),
        timeout_seconds: Some(seconds(h.timeout_nanos, 30)),
        failure_threshold: Some(if h.retries > 0 { h.retries } else { 3 }),
        success_threshold: Some(1),
        ..Default::default()
    }))
}

/// Docker's word for a running container's health: `healthy` once its
/// readiness probe passed; `unhealthy` when it does not pass and the start
/// period plus `retries` intervals (and a timeout) have gone by since it
/// started; `starting` before that. Empty without a health check.
pub fn health_of(spec: &pb::ContainerSpec, pod: &Pod, now_unix: i64) -> String {
    let Ok(Some(probe)) = probe_of(spec.health.as_ref()) else {
        return String::new();
    };
    let Some(status) = main_status(pod) else {
        return String::new();
    };
    let Some(running) = status.state.as_ref().and_then(|s| s.running.as_ref()) else {
        return String::new();
    };
    if status.ready {
        return "healthy".into();
    }
    let h = spec.health.clone().unwrap_or_default();
    let started = running
        .started_at
        .as_ref()
        .map_or(now_unix, |t| t.0.as_second());
    let patience = i64::from(seconds(h.start_period_nanos, 0))
        + i64::from(probe.period_seconds.unwrap_or(30))
            * i64::from(probe.failure_threshold.unwrap_or(3))
        + i64::from(probe.timeout_seconds.unwrap_or(30));
    if now_unix - started > patience {
        "unhealthy".into()
    } else {
        "starting".into()
    }
}

/// The pod a template describes (empty: none).
fn template_of(text: &str) -> Result<Pod, SpecError> {
    if text.trim().is_empty() {
        return Ok(Pod::default());
    }
    serde_yaml::from_str(text).map_err(|e| SpecError::Template(e.to_string()))
}

/// A hostname the pod can carry (a DNS label), if the spec's is one.
fn hostname_of(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    ok.then(|| name.to_string())
}

/// The pod of the record's `run`-th start: one container, never restarted,
/// owned by the record, without the namespace's service account token or
/// service links (a Docker container has neither).
pub fn pod_for(record: &Record, run: u32) -> Result<Pod, SpecError> {
    let spec = &record.spec;
    let image = image_of(spec)?;
    let (uid, gid) = user_of(&spec.user)?;
    let ports: Vec<ContainerPort> = spec
        .ports
        .iter()
        .map(|p| ContainerPort {
            container_port: p.container_port as i32,
            protocol: Some(
                if p.protocol.eq_ignore_ascii_case("udp") {
                    "UDP"
                } else {
                    "TCP"
                }
                .into(),
            ),
            ..Default::default()
        })
        .collect();
    let stop = if spec.stop_timeout_seconds == 0 {
        DEFAULT_STOP_TIMEOUT
    } else {
        spec.stop_timeout_seconds
    };
    let options = spec.pod.clone().unwrap_or_default();
    let template = template_of(&options.pod_template)?;
    let mut base_spec = template.spec.unwrap_or_default();
    let base = std::mem::take(&mut base_spec.containers)
        .into_iter()
        .next()
        .unwrap_or_default();
    let pull_policy = match options.pull_policy.as_str() {
        "" => base.image_pull_policy.clone(),
        p @ ("Always" | "IfNotPresent" | "Never") => Some(p.to_string()),
        other => {
            return Err(SpecError::Option(format!(
                "pull policy {other:?}: Always, IfNotPresent or Never"
            )));
        }
    };
    let (upload_volumes, upload_mounts) = super::uploads::mounts(&spec.uploads);
    let mut volumes = base_spec.volumes.take().unwrap_or_default();
    volumes.extend(upload_volumes);
    let mut env = base.env.clone().unwrap_or_default();
    env.extend(env_of(&spec.env)?);
    let mut container_ports = base.ports.clone().unwrap_or_default();
    container_ports.extend(ports);
    let container = Container {
        name: MAIN_CONTAINER.into(),
        image: Some(image),
        image_pull_policy: pull_policy,
        command: (!spec.entrypoint.is_empty()).then(|| spec.entrypoint.clone()),
        args: (!spec.cmd.is_empty()).then(|| spec.cmd.clone()),
        env: Some(env).filter(|e| !e.is_empty()),
        working_dir: Some(spec.working_dir.clone())
            .filter(|w| !w.is_empty())
            .or(base.working_dir.clone()),
        tty: spec.tty.then_some(true),
        stdin: spec.open_stdin.then_some(true),
        stdin_once: (spec.open_stdin && spec.stdin_once).then_some(true),
        ports: Some(container_ports).filter(|p| !p.is_empty()),
        resources: resources_of(spec, base.resources.clone())?,
        readiness_probe: probe_of(spec.health.as_ref())?.or(base.readiness_probe.clone()),
        volume_mounts: Some(
            base.volume_mounts
                .clone()
                .unwrap_or_default()
                .into_iter()
                .chain(upload_mounts)
                .collect::<Vec<_>>(),
        )
        .filter(|m| !m.is_empty()),
        ..base
    };
    if options.active_deadline_seconds < 0 {
        return Err(SpecError::Option(
            "the active deadline cannot be negative".into(),
        ));
    }
    let mut labels = template.metadata.labels.clone().unwrap_or_default();
    labels.extend(record.labels(CONTAINER_LABEL));
    labels.insert(RUN_LABEL.to_string(), run.to_string());
    let mut node_selector = base_spec.node_selector.take().unwrap_or_default();
    node_selector.extend(options.node_selector.clone());
    let mut pull_secrets = base_spec.image_pull_secrets.take().unwrap_or_default();
    pull_secrets.extend(
        options
            .image_pull_secrets
            .iter()
            .map(|name| LocalObjectReference { name: name.clone() }),
    );
    let mut security = base_spec.security_context.take().unwrap_or_default();
    if uid.is_some() {
        security.run_as_user = uid;
    }
    if gid.is_some() {
        security.run_as_group = gid;
    }
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(&record.id, run)),
            namespace: Some(record.namespace.clone()),
            labels: Some(labels),
            annotations: template.metadata.annotations.clone(),
            owner_references: Some(vec![record.owner()]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![container],
            restart_policy: Some("Never".into()),
            termination_grace_period_seconds: Some(stop.into()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            hostname: hostname_of(&spec.hostname).or(base_spec.hostname.take()),
            security_context: Some(security).filter(|s| *s != PodSecurityContext::default()),
            node_selector: Some(node_selector).filter(|n| !n.is_empty()),
            volumes: Some(volumes).filter(|v| !v.is_empty()),
            image_pull_secrets: Some(pull_secrets).filter(|p| !p.is_empty()),
            service_account_name: Some(options.service_account.clone())
                .filter(|s| !s.is_empty())
                .or(base_spec.service_account_name.take()),
            active_deadline_seconds: Some(options.active_deadline_seconds)
                .filter(|d| *d > 0)
                .or(base_spec.active_deadline_seconds),
            ..base_spec
        }),
        status: None,
    })
}

/// Why a pod's container cannot start, if it is waiting for a reason that
/// will not clear by itself.
pub fn start_failure(pod: &Pod) -> Option<String> {
    let status = main_status(pod)?;
    let waiting = status.state.as_ref()?.waiting.as_ref()?;
    let reason = waiting.reason.as_deref()?;
    const FATAL: [&str; 6] = [
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    ];
    FATAL.contains(&reason).then(|| match &waiting.message {
        Some(m) if !m.is_empty() => format!("{reason}: {m}"),
        _ => reason.to_string(),
    })
}

/// The status of the container `main`: the pod's own, or its ephemeral
/// container's in a pool pod.
pub fn main_status(pod: &Pod) -> Option<&ContainerStatus> {
    let status = pod.status.as_ref()?;
    status
        .container_statuses
        .iter()
        .chain(status.ephemeral_container_statuses.iter())
        .flatten()
        .find(|s| s.name == MAIN_CONTAINER)
}

fn rfc3339(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> String {
    t.0.to_string()
}

/// The container's state as Docker reports it, from its current pod
/// (`None`: never started, or the pod is gone).
pub fn state_of(pod: Option<&Pod>) -> pb::ContainerState {
    let created = pb::ContainerState {
        status: "created".into(),
        started_at: ZERO_TIME.into(),
        finished_at: ZERO_TIME.into(),
        ..Default::default()
    };
    let Some(pod) = pod else { return created };
    if pod.metadata.deletion_timestamp.is_some() {
        return pb::ContainerState {
            status: "removing".into(),
            ..created
        };
    }
    let state = main_status(pod).and_then(|s| s.state.as_ref());
    if let Some(t) = state.and_then(|s| s.terminated.as_ref()) {
        return pb::ContainerState {
            status: "exited".into(),
            running: false,
            exit_code: t.exit_code,
            started_at: t.started_at.as_ref().map_or(ZERO_TIME.into(), rfc3339),
            finished_at: t.finished_at.as_ref().map_or(ZERO_TIME.into(), rfc3339),
            error: String::new(),
            oom_killed: t.reason.as_deref() == Some("OOMKilled"),
            health: String::new(),
        };
    }
    if let Some(r) = state.and_then(|s| s.running.as_ref()) {
        return pb::ContainerState {
            status: "running".into(),
            running: true,
            started_at: r.started_at.as_ref().map_or(ZERO_TIME.into(), rfc3339),
            ..created
        };
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Failed")) {
        // Failed without a terminated container: evicted, deadline, lost node.
        let message = pod
            .status
            .as_ref()
            .and_then(|s| s.message.clone().or(s.reason.clone()))
            .unwrap_or_else(|| "the pod failed".into());
        return pb::ContainerState {
            status: "exited".into(),
            exit_code: 137,
            error: message,
            ..created
        };
    }
    pb::ContainerState {
        error: start_failure(pod).unwrap_or_default(),
        ..created
    }
}

/// Whether the pod's container has finished (or can never run).
pub fn finished(pod: &Pod) -> bool {
    let state = state_of(Some(pod));
    state.status == "exited"
}

/// Whether the pod's container has started (running or finished).
pub fn started(pod: &Pod) -> bool {
    let state = state_of(Some(pod));
    state.running || state.status == "exited"
}

#[cfg(test)]
mod tests;
