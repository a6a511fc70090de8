use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    PodStatus,
};

use super::*;
use crate::containers::record;

fn record(spec: pb::ContainerSpec) -> Record {
    Record {
        namespace: "ci".into(),
        id: "ab".repeat(32),
        name: spec.name.clone(),
        spec,
        runs: 0,
        run_started: String::new(),
        created: String::new(),
        uid: "uid-1".into(),
        object_name: record::record_name("", "web"),
        session: String::new(),
    }
}

fn with_state(state: ContainerState, phase: &str) -> Pod {
    Pod {
        status: Some(PodStatus {
            phase: Some(phase.into()),
            container_statuses: Some(vec![ContainerStatus {
                name: MAIN_CONTAINER.into(),
                state: Some(state),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn the_pod_runs_the_spec_once_owned_by_its_record() {
    let spec = pb::ContainerSpec {
        name: "web".into(),
        image: "busybox".into(),
        entrypoint: vec!["sh".into()],
        cmd: vec!["-c".into(), "exit 3".into()],
        env: vec!["A=1".into(), "B=x=y".into(), "C".into()],
        user: "1000:2000".into(),
        memory_bytes: 64 << 20,
        nano_cpus: 500_000_000,
        ports: vec![pb::PortBinding {
            container_port: 80,
            protocol: "tcp".into(),
            host_port: 0,
        }],
        hostname: "Not_A_Label".into(),
        ..Default::default()
    };
    let pod = pod_for(&record(spec), 2).unwrap();
    assert_eq!(
        pod.metadata.name.as_deref(),
        Some(&*format!("berth-{}-2", "ab".repeat(6)))
    );
    let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("ConfigMap", "uid-1")
    );
    let ps = pod.spec.unwrap();
    assert_eq!(ps.restart_policy.as_deref(), Some("Never"));
    assert_eq!(ps.termination_grace_period_seconds, Some(10));
    assert_eq!(ps.automount_service_account_token, Some(false));
    assert_eq!(ps.hostname, None, "not a DNS label: left to Kubernetes");
    let sc = ps.security_context.unwrap();
    assert_eq!((sc.run_as_user, sc.run_as_group), (Some(1000), Some(2000)));
    let c = &ps.containers[0];
    assert_eq!(c.image.as_deref(), Some("docker.io/library/busybox:latest"));
    assert_eq!(c.command.as_deref(), Some(&["sh".to_string()][..]));
    assert_eq!(c.args.as_ref().unwrap()[1], "exit 3");
    let env: Vec<_> = c
        .env
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| (e.name.as_str(), e.value.as_deref().unwrap()))
        .collect();
    assert_eq!(env, [("A", "1"), ("B", "x=y"), ("C", "")]);
    let limits = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
    assert_eq!(limits["memory"].0, (64u64 << 20).to_string());
    assert_eq!(limits["cpu"].0, "500m");
    assert_eq!(c.ports.as_ref().unwrap()[0].container_port, 80);
}

#[test]
fn an_image_keeps_its_own_entrypoint_and_command_unless_replaced() {
    let pod = pod_for(
        &record(pb::ContainerSpec {
            image: "busybox".into(),
            ..Default::default()
        }),
        1,
    )
    .unwrap();
    let c = &pod.spec.unwrap().containers[0];
    assert_eq!((c.command.clone(), c.args.clone()), (None, None));
}

#[test]
fn specs_a_pod_cannot_express_are_refused_with_the_reason() {
    let bad_image = pb::ContainerSpec {
        image: "UPPER/Case::x".into(),
        ..Default::default()
    };
    assert!(matches!(
        pod_for(&record(bad_image), 1),
        Err(SpecError::Image(_))
    ));
    let named_user = pb::ContainerSpec {
        image: "busybox".into(),
        user: "nobody".into(),
        ..Default::default()
    };
    let e = pod_for(&record(named_user), 1).unwrap_err();
    assert!(e.to_string().contains("numeric"), "{e}");
    let nameless_env = pb::ContainerSpec {
        image: "busybox".into(),
        env: vec!["=1".into()],
        ..Default::default()
    };
    assert!(matches!(
        pod_for(&record(nameless_env), 1),
        Err(SpecError::Env(_))
    ));
}

#[test]
fn states_read_from_the_pod_in_dockers_words() {
    assert_eq!(state_of(None).status, "created");
    let running = with_state(
        ContainerState {
            running: Some(ContainerStateRunning::default()),
            ..Default::default()
        },
        "Running",
    );
    let s = state_of(Some(&running));
    assert_eq!((s.status.as_str(), s.running), ("running", true));
    assert!(started(&running) && !finished(&running));

    let exited = with_state(
        ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: 3,
                reason: Some("Error".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        "Failed",
    );
    let s = state_of(Some(&exited));
    assert_eq!(
        (s.status.as_str(), s.exit_code, s.running),
        ("exited", 3, false)
    );
    assert!(finished(&exited));

    let oom = with_state(
        ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: 137,
                reason: Some("OOMKilled".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        "Failed",
    );
    assert!(state_of(Some(&oom)).oom_killed);
}

#[test]
fn a_pull_that_cannot_succeed_is_a_start_failure_and_a_slow_one_is_not() {
    let waiting = |reason: &str| {
        with_state(
            ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.into()),
                    message: Some("no such host".into()),
                }),
                ..Default::default()
            },
            "Pending",
        )
    };
    assert_eq!(
        start_failure(&waiting("ErrImagePull")).as_deref(),
        Some("ErrImagePull: no such host")
    );
    assert_eq!(start_failure(&waiting("ContainerCreating")), None);
    let s = state_of(Some(&waiting("ImagePullBackOff")));
    assert_eq!(s.status, "created");
    assert!(s.error.contains("ImagePullBackOff"));
}

#[test]
fn a_pod_that_failed_without_its_container_reports_exited_with_the_reason() {
    let pod = Pod {
        status: Some(PodStatus {
            phase: Some("Failed".into()),
            reason: Some("Evicted".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let s = state_of(Some(&pod));
    assert_eq!(
        (s.status.as_str(), s.exit_code, s.error.as_str()),
        ("exited", 137, "Evicted")
    );
}

#[test]
fn pod_options_set_resources_policy_account_placement_and_deadline() {
    let spec = pb::ContainerSpec {
        name: "web".into(),
        image: "busybox".into(),
        memory_bytes: 64 << 20,
        pod: Some(pb::PodOptions {
            cpu_request: "250m".into(),
            memory_request: "32Mi".into(),
            cpu_limit: "1".into(),
            pull_policy: "IfNotPresent".into(),
            service_account: "builder".into(),
            node_selector: [("disk".to_string(), "ssd".to_string())].into(),
            active_deadline_seconds: 600,
            image_pull_secrets: vec!["regcred".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let pod = pod_for(&record(spec), 1).unwrap();
    let ps = pod.spec.unwrap();
    let c = &ps.containers[0];
    let r = c.resources.clone().unwrap();
    assert_eq!(r.requests.unwrap()["cpu"].0, "250m");
    let limits = r.limits.unwrap();
    assert_eq!(
        (limits["cpu"].0.as_str(), limits["memory"].0.as_str()),
        ("1", "67108864")
    );
    assert_eq!(c.image_pull_policy.as_deref(), Some("IfNotPresent"));
    assert_eq!(ps.service_account_name.as_deref(), Some("builder"));
    assert_eq!(ps.automount_service_account_token, Some(false));
    assert_eq!(ps.node_selector.unwrap()["disk"], "ssd");
    assert_eq!(ps.active_deadline_seconds, Some(600));
    assert_eq!(ps.image_pull_secrets.unwrap()[0].name, "regcred");
}

#[test]
fn a_pod_template_is_the_base_and_berths_settings_win() {
    let template = r#"
metadata:
  labels: {team: ci, berth.dev/container: spoofed}
  annotations: {sidecar.istio.io/inject: "false"}
spec:
  restartPolicy: Always
  tolerations: [{key: dedicated, operator: Exists}]
  securityContext: {fsGroup: 2000}
  volumes: [{name: cache, emptyDir: {}}]
  containers:
  - name: whatever
    image: ignored
    volumeMounts: [{name: cache, mountPath: /cache}]
    env: [{name: FROM_TEMPLATE, value: "1"}]
"#;
    let spec = pb::ContainerSpec {
        name: "web".into(),
        image: "busybox".into(),
        user: "1000".into(),
        env: vec!["A=b".into()],
        pod: Some(pb::PodOptions {
            pod_template: template.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let pod = pod_for(&record(spec), 1).unwrap();
    let labels = pod.metadata.labels.unwrap();
    assert_eq!(labels["team"], "ci");
    assert_eq!(
        labels[CONTAINER_LABEL], "abababababab",
        "Berth's labels win"
    );
    assert_eq!(
        pod.metadata.annotations.unwrap()["sidecar.istio.io/inject"],
        "false"
    );
    let ps = pod.spec.unwrap();
    assert_eq!(ps.restart_policy.as_deref(), Some("Never"));
    assert_eq!(ps.tolerations.unwrap()[0].key.as_deref(), Some("dedicated"));
    let sc = ps.security_context.unwrap();
    assert_eq!((sc.fs_group, sc.run_as_user), (Some(2000), Some(1000)));
    assert_eq!(ps.volumes.unwrap()[0].name, "cache");
    let c = &ps.containers[0];
    assert_eq!(
        (c.name.as_str(), c.image.as_deref()),
        (MAIN_CONTAINER, Some("docker.io/library/busybox:latest"))
    );
    assert_eq!(c.volume_mounts.clone().unwrap()[0].mount_path, "/cache");
    let env: Vec<&str> = c
        .env
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(env, ["FROM_TEMPLATE", "A"]);
}

#[test]
fn bad_pod_options_are_refused_with_the_reason() {
    let with = |o: pb::PodOptions| {
        let spec = pb::ContainerSpec {
            name: "web".into(),
            image: "busybox".into(),
            pod: Some(o),
            ..Default::default()
        };
        pod_for(&record(spec), 1).unwrap_err().to_string()
    };
    assert!(
        with(pb::PodOptions {
            cpu_request: "lots".into(),
            ..Default::default()
        })
        .contains("quantity")
    );
    assert!(
        with(pb::PodOptions {
            pull_policy: "Sometimes".into(),
            ..Default::default()
        })
        .contains("IfNotPresent")
    );
    assert!(
        with(pb::PodOptions {
            active_deadline_seconds: -1,
            ..Default::default()
        })
        .contains("negative")
    );
    assert!(
        with(pb::PodOptions {
            pod_template: "spec: [".into(),
            ..Default::default()
        })
        .contains("pod template")
    );
}

#[test]
fn a_health_check_is_the_readiness_probe_and_reads_back_as_docker_health() {
    let health = pb::Healthcheck {
        test: vec!["CMD-SHELL".into(), "test -f /ready".into()],
        interval_nanos: 1_500_000_000,
        timeout_nanos: 0,
        start_period_nanos: 0,
        retries: 2,
    };
    let spec = pb::ContainerSpec {
        name: "web".into(),
        image: "busybox".into(),
        health: Some(health.clone()),
        ..Default::default()
    };
    let pod = pod_for(&record(spec.clone()), 1).unwrap();
    let probe = pod.spec.unwrap().containers[0]
        .readiness_probe
        .clone()
        .unwrap();
    assert_eq!(
        probe.exec.unwrap().command.unwrap(),
        ["/bin/sh", "-c", "test -f /ready"]
    );
    assert_eq!(
        (
            probe.period_seconds,
            probe.timeout_seconds,
            probe.failure_threshold
        ),
        (Some(2), Some(30), Some(2)),
        "1.5 s rounds up to 2; Docker's default timeout; retries"
    );

    let started = k8s_openapi::jiff::Timestamp::from_second(1_000).unwrap();
    let running = |ready: bool| {
        let mut p = with_state(
            ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        started,
                    )),
                }),
                ..Default::default()
            },
            "Running",
        );
        p.status
            .as_mut()
            .unwrap()
            .container_statuses
            .as_mut()
            .unwrap()[0]
            .ready = ready;
        p
    };
    assert_eq!(health_of(&spec, &running(true), 1_005), "healthy");
    assert_eq!(health_of(&spec, &running(false), 1_010), "starting");
    // 2 retries of 2 s, plus the 30 s timeout, have gone by.
    assert_eq!(health_of(&spec, &running(false), 1_040), "unhealthy");
    let plain = pb::ContainerSpec {
        health: None,
        ..spec.clone()
    };
    assert_eq!(health_of(&plain, &running(true), 1_005), "");

    let bad = pb::ContainerSpec {
        health: Some(pb::Healthcheck {
            test: vec!["CMD".into()],
            ..health
        }),
        ..spec
    };
    assert!(
        pod_for(&record(bad), 1)
            .unwrap_err()
            .to_string()
            .contains("health check")
    );
}
