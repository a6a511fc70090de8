//! The sandbox pool: a few pods per namespace whose sandbox is already up
//! (scheduled, network set up, a do-nothing process running), so that a
//! container started with `start_mode: sandbox-pool` skips scheduling and
//! sandbox creation and runs at once as the pod's ephemeral container
//! `main`. A claimed pool pod becomes the container's pod (its labels and
//! owner change to the container's), so everything that reads a container's
//! pod — state, logs, exec, stop, removal — works on it unchanged; the pool
//! is refilled after each claim.
//!
//! Ephemeral containers cannot have ports, probes or resources, and cannot
//! be restarted; [`eligible`] keeps such containers on fresh pods.

use std::collections::BTreeMap;

use berth_proto::api as pb;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EphemeralContainer, Pod, PodSecurityContext, PodSpec,
    ResourceRequirements, SeccompProfile, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use tonic::Status;
use tracing::{info, warn};

use super::pod::{self, MAIN_CONTAINER};
use super::record::CONTAINER_LABEL;
#[cfg(test)]
use super::record::Record;
use super::store::Space;

/// The start mode that uses the pool.
pub const MODE: &str = "sandbox-pool";
/// Label on pool pods: `idle` until claimed, then `claimed`.
pub const POOL_LABEL: &str = "berth.dev/pool";
/// [`CONTAINER_LABEL`]'s value on idle pool pods (so the namespace's
/// mirror sees them).
pub const IDLE: &str = "pool";
/// Name of the pool pod's own container.
pub const SANDBOX_CONTAINER: &str = "sandbox";
/// Names of pool pods start with this.
pub const NAME_PREFIX: &str = "berth-pool-";
/// What the sandbox runs.
const PAUSE: [&str; 2] = ["/usr/local/bin/node-agent", "pause"];

/// How the pool is made.
#[derive(Debug, Clone, Default)]
pub struct PoolConfig {
    /// Idle pods kept per namespace that has used the pool (0: no pool).
    pub size: usize,
    /// Image of the pool pods' do-nothing process (Berth's own image, whose
    /// `node-agent pause` waits for SIGTERM).
    pub image: String,
}

/// Whether a container can run as an ephemeral container in a pool pod.
pub fn eligible(spec: &pb::ContainerSpec) -> bool {
    spec.start_mode == MODE
        && spec.ports.is_empty()
        && spec.networks.is_empty()
        && spec.aliases.is_empty()
        && spec.health.is_none()
        && spec.uploads.is_empty()
        && spec.pod.is_none()
        && spec.memory_bytes == 0
        && spec.nano_cpus == 0
        && spec.hostname.is_empty()
        && spec.stop_timeout_seconds == 0
}

/// A new idle pool pod for `namespace`.
pub fn pool_pod(namespace: &str, config: &PoolConfig) -> Pod {
    let small = BTreeMap::from([
        ("cpu".to_string(), Quantity("5m".into())),
        ("memory".to_string(), Quantity("8Mi".into())),
    ]);
    Pod {
        metadata: ObjectMeta {
            generate_name: Some(NAME_PREFIX.into()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([
                (CONTAINER_LABEL.to_string(), IDLE.to_string()),
                (POOL_LABEL.to_string(), "idle".to_string()),
                (
                    "app.kubernetes.io/managed-by".to_string(),
                    "berth".to_string(),
                ),
            ])),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: SANDBOX_CONTAINER.into(),
                image: Some(config.image.clone()),
                command: Some(PAUSE.iter().map(|s| s.to_string()).collect()),
                resources: Some(ResourceRequirements {
                    requests: Some(small),
                    ..Default::default()
                }),
                // Restricted: the sandbox's own process needs nothing.
                security_context: Some(SecurityContext {
                    run_as_non_root: Some(true),
                    run_as_user: Some(65532),
                    allow_privilege_escalation: Some(false),
                    read_only_root_filesystem: Some(true),
                    capabilities: Some(Capabilities {
                        drop: Some(vec!["ALL".into()]),
                        add: None,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            security_context: Some(PodSecurityContext {
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    localhost_profile: None,
                }),
                ..Default::default()
            }),
            restart_policy: Some("Never".into()),
            termination_grace_period_seconds: Some(pod::DEFAULT_STOP_TIMEOUT.into()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            ..Default::default()
        }),
        status: None,
    }
}

/// The container as an ephemeral container of a pool pod: what `fresh` (the
/// pod a fresh start would make) says of it.
pub fn ephemeral(fresh: &Pod) -> EphemeralContainer {
    let c = fresh
        .spec
        .as_ref()
        .map(|s| s.containers[0].clone())
        .unwrap_or_default();
    let security = fresh
        .spec
        .as_ref()
        .and_then(|s| s.security_context.as_ref());
    EphemeralContainer {
        name: MAIN_CONTAINER.into(),
        image: c.image,
        image_pull_policy: c.image_pull_policy,
        command: c.command,
        args: c.args,
        env: c.env,
        working_dir: c.working_dir,
        tty: c.tty,
        stdin: c.stdin,
        stdin_once: c.stdin_once,
        security_context: security.map(|s| SecurityContext {
            run_as_user: s.run_as_user,
            run_as_group: s.run_as_group,
            ..Default::default()
        }),
        target_container_name: None,
        ..Default::default()
    }
}

/// Whether `p` is a pool pod as the coordinator makes them, and nothing
/// more: a look-alike someone labelled (with volumes, host namespaces, a
/// shared process namespace, another image) must never get a container.
pub fn genuine(p: &Pod, config: &PoolConfig) -> bool {
    let Some(spec) = p.spec.as_ref() else {
        return false;
    };
    let expected = pool_pod("", config).spec.unwrap_or_default();
    let named = p
        .metadata
        .name
        .as_deref()
        .is_some_and(|n| n.starts_with(NAME_PREFIX));
    let sandbox_only = match spec.containers.as_slice() {
        [c] => {
            let e = &expected.containers[0];
            c.name == e.name
                && c.image == e.image
                && c.command == e.command
                && c.args.is_none()
                && c.volume_mounts.as_ref().is_none_or(|m| m.is_empty())
                && c.security_context == e.security_context
        }
        _ => false,
    };
    named
        && sandbox_only
        && spec.init_containers.as_ref().is_none_or(|c| c.is_empty())
        && spec
            .ephemeral_containers
            .as_ref()
            .is_none_or(|c| c.is_empty())
        && spec
            .volumes
            .as_ref()
            .is_none_or(|v| v.iter().all(|v| v.projected.is_some()))
        && spec.share_process_namespace != Some(true)
        && spec.host_network != Some(true)
        && spec.host_pid != Some(true)
        && spec.host_ipc != Some(true)
        && spec.security_context == expected.security_context
}

/// Whether an idle pool pod is ready to take a container.
fn ready(p: &Pod) -> bool {
    let labels = p.metadata.labels.as_ref();
    let idle = labels.and_then(|l| l.get(POOL_LABEL)).map(String::as_str) == Some("idle");
    let running = p
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.name == SANDBOX_CONTAINER && c.state.as_ref().is_some_and(|s| s.running.is_some())
            })
        });
    idle && running && p.metadata.deletion_timestamp.is_none()
}

/// Whether an idle pool pod will never be ready (it failed, or ended).
fn dead(p: &Pod) -> bool {
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    matches!(phase, Some("Failed" | "Succeeded"))
}

/// Creates idle pool pods until the namespace has `size` ready or coming,
/// removing those that failed.
pub async fn fill(client: &kube::Client, space: &Space, config: &PoolConfig) {
    let api: Api<Pod> = Api::namespaced(client.clone(), &space.namespace);
    let mut idle = 0;
    for p in space
        .pool_pods()
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        if dead(p) {
            if let Some(name) = &p.metadata.name {
                let _ = api.delete(name, &Default::default()).await;
            }
        } else {
            idle += 1;
        }
    }
    for _ in idle..config.size {
        if let Err(e) = api
            .create(&PostParams::default(), &pool_pod(&space.namespace, config))
            .await
        {
            warn!(namespace = %space.namespace, error = %e, "cannot add a pool pod");
            return;
        }
    }
}

/// Takes a ready pool pod for the record's `run`: makes it the container's
/// pod and starts the container in it. `None` if no pool pod is ready (the
/// caller makes a fresh pod).
pub async fn claim(
    client: &kube::Client,
    space: &Space,
    config: &PoolConfig,
    fresh: &Pod,
) -> Result<Option<String>, Status> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &space.namespace);
    let candidates = space
        .pool_pods()
        .into_iter()
        .filter(|p| ready(p) && genuine(p, config));
    for candidate in candidates {
        let (Some(name), Some(rv)) = (
            candidate.metadata.name.clone(),
            candidate.metadata.resource_version.clone(),
        ) else {
            continue;
        };
        // The labels and owner a fresh pod of the run would have.
        let mut labels = fresh.metadata.labels.clone().unwrap_or_default();
        labels.insert(POOL_LABEL.to_string(), "claimed".to_string());
        // The resourceVersion makes two claims of one pod collide.
        let patch = serde_json::json!({
            "metadata": {
                "resourceVersion": rv,
                "labels": labels,
                "ownerReferences": fresh.metadata.owner_references,
            }
        });
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(ae)) if ae.code == 409 || ae.code == 404 => continue,
            Err(e) => return Err(super::api::kube_status("claiming a pool pod", e)),
        }
        let ec = ephemeral(fresh);
        let patch = serde_json::json!({"spec": {"ephemeralContainers": [ec]}});
        if let Err(e) = api
            .patch_subresource(
                "ephemeralcontainers",
                &name,
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await
        {
            // The pod is the container's now: let it go with the run.
            let _ = api.delete(&name, &Default::default()).await;
            return Err(super::api::kube_status(
                "starting the container in a pool pod",
                e,
            ));
        }
        info!(namespace = %space.namespace, pod = %name, "started in a pool sandbox");
        return Ok(Some(name));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_an_ephemeral_container_can_be_uses_the_pool() {
        let base = pb::ContainerSpec {
            image: "busybox".into(),
            start_mode: MODE.into(),
            ..Default::default()
        };
        assert!(eligible(&base));
        assert!(!eligible(&pb::ContainerSpec {
            start_mode: String::new(),
            ..base.clone()
        }));
        for needs_a_pod in [
            pb::ContainerSpec {
                ports: vec![pb::PortBinding::default()],
                ..base.clone()
            },
            pb::ContainerSpec {
                networks: vec!["n".into()],
                ..base.clone()
            },
            pb::ContainerSpec {
                memory_bytes: 1,
                ..base.clone()
            },
            pb::ContainerSpec {
                health: Some(pb::Healthcheck::default()),
                ..base.clone()
            },
        ] {
            assert!(!eligible(&needs_a_pod));
        }
    }

    #[test]
    fn a_pool_pod_idles_cheaply_and_its_ephemeral_container_runs_the_spec() {
        let config = PoolConfig {
            size: 2,
            image: "ghcr.io/berth-dev/berth:0.1.0".into(),
        };
        let p = pool_pod("ci", &config);
        let labels = p.metadata.labels.clone().unwrap();
        assert_eq!(
            (
                labels[CONTAINER_LABEL].as_str(),
                labels[POOL_LABEL].as_str()
            ),
            (IDLE, "idle")
        );
        let c = &p.spec.as_ref().unwrap().containers[0];
        assert_eq!(c.command.as_ref().unwrap()[1], "pause");
        let mut made = p.clone();
        made.metadata.name = Some("berth-pool-x1".into());
        assert!(genuine(&made, &config));
        // Look-alikes someone labelled are never claimed.
        let mut shared = made.clone();
        shared.spec.as_mut().unwrap().share_process_namespace = Some(true);
        assert!(!genuine(&shared, &config));
        let mut other_image = made.clone();
        other_image.spec.as_mut().unwrap().containers[0].image = Some("evil:1".into());
        assert!(!genuine(&other_image, &config));
        let mut renamed = made.clone();
        renamed.metadata.name = Some("mine".into());
        assert!(!genuine(&renamed, &config));
        let record = Record {
            namespace: "ci".into(),
            id: "ab".repeat(32),
            name: "web".into(),
            spec: pb::ContainerSpec {
                image: "busybox".into(),
                cmd: vec!["true".into()],
                user: "1000".into(),
                start_mode: MODE.into(),
                ..Default::default()
            },
            runs: 0,
            run_started: String::new(),
            created: String::new(),
            uid: "u".into(),
            object_name: "berth-ctr-1".into(),
            session: String::new(),
        };
        let fresh = pod::pod_for(&record, 1).unwrap();
        let ec = ephemeral(&fresh);
        assert_eq!(ec.name, MAIN_CONTAINER);
        assert_eq!(ec.args.unwrap(), ["true"]);
        assert_eq!(ec.security_context.unwrap().run_as_user, Some(1000));
    }
}
