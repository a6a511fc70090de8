use super::*;
use crate::debloat::crd::{BuildStatus, ProfileSpec, ProfilerStatus, WorkloadRef};

const T0: &str = "2026-01-01T00:00:00Z";
const T0_SECS: f64 = 1_767_225_600.0;

fn spec() -> ImageDebloatSpec {
    ImageDebloatSpec {
        workload: WorkloadRef {
            kind: "Deployment".into(),
            name: "redis".into(),
        },
        ..Default::default()
    }
}

fn status(phase: &str) -> ImageDebloatStatus {
    ImageDebloatStatus {
        phase: phase.into(),
        target: Some("r.io/redis:7-baffs".into()),
        ..Default::default()
    }
}

fn facts(now: f64, w: WorkloadFacts) -> Facts {
    Facts {
        now,
        workload: Some(w),
        probe_job_done: None,
    }
}

fn ready(node: &str) -> WorkloadFacts {
    WorkloadFacts {
        image: Some("r.io/redis:7".into()),
        ready_nodes: vec![node.into()],
        rolled_out: true,
        failing: None,
    }
}

fn target(image: &str, suffix: &str, repository: Option<&str>) -> Result<String, String> {
    Ok(match repository {
        Some(r) => format!("{r}:7{suffix}"),
        None => format!("{image}{suffix}"),
    })
}

fn profiling(since: &str) -> ImageDebloatStatus {
    ImageDebloatStatus {
        node: Some("n1".into()),
        nodes: vec!["n1".into()],
        profilers: [(
            "n1".to_string(),
            ProfilerStatus {
                since: since.into(),
                watching: Some(false),
                ..Default::default()
            },
        )]
        .into(),
        ..status("Profiling")
    }
}

#[test]
fn a_new_debloat_profiles_on_a_ready_pods_node_or_waits_for_one() {
    let s = next(&spec(), &status(""), &facts(T0_SECS, ready("n1")), target);
    assert_eq!(
        s,
        Step::Profile {
            nodes: vec!["n1".into()],
            image: "r.io/redis:7".into(),
            target: "r.io/redis:7-baffs".into()
        }
    );
    let none = WorkloadFacts {
        ready_nodes: vec![],
        ..ready("n1")
    };
    assert!(matches!(
        next(&spec(), &status(""), &facts(T0_SECS, none), target),
        Step::Note(_)
    ));
}

#[test]
fn a_missing_workload_or_container_or_a_debloated_image_fails_without_touching_anything() {
    let gone = Facts {
        now: T0_SECS,
        workload: None,
        probe_job_done: None,
    };
    assert!(matches!(
        next(&spec(), &status(""), &gone, target),
        Step::Fail {
            reason: "WorkloadNotFound",
            ..
        }
    ));
    let no_container = WorkloadFacts {
        image: None,
        ..ready("n1")
    };
    assert!(matches!(
        next(&spec(), &status(""), &facts(T0_SECS, no_container), target),
        Step::Fail {
            reason: "ContainerNotFound",
            ..
        }
    ));
    let baffs = WorkloadFacts {
        image: Some("r.io/redis:7-baffs".into()),
        ..ready("n1")
    };
    assert!(matches!(
        next(&spec(), &status(""), &facts(T0_SECS, baffs), target),
        Step::Fail {
            reason: "AlreadyDebloated",
            ..
        }
    ));
}

#[test]
fn profiling_ends_at_the_window_on_request_or_when_the_probe_job_succeeded() {
    // Not before the node's debloater records.
    assert_eq!(
        next(
            &spec(),
            &status("Profiling"),
            &facts(T0_SECS + 999.0, ready("n1")),
            target
        ),
        Step::Wait
    );
    let s = profiling(T0);
    assert_eq!(
        next(&spec(), &s, &facts(T0_SECS + 59.0, ready("n1")), target),
        Step::Wait
    );
    assert_eq!(
        next(&spec(), &s, &facts(T0_SECS + 60.0, ready("n1")), target),
        Step::EndProfile
    );
    let stop = ImageDebloatSpec {
        profile: ProfileSpec {
            stop: true,
            ..Default::default()
        },
        ..spec()
    };
    assert_eq!(
        next(&stop, &s, &facts(T0_SECS, ready("n1")), target),
        Step::EndProfile
    );
    // With a probe Job and no window: its success (and a ready workload), never a clock.
    let job = ImageDebloatSpec {
        profile: ProfileSpec {
            probe_job: Some("exercise".into()),
            ..Default::default()
        },
        ..spec()
    };
    let mut f = facts(T0_SECS + 3600.0, ready("n1"));
    f.probe_job_done = Some(false);
    assert_eq!(next(&job, &s, &f, target), Step::Wait);
    f.probe_job_done = Some(true);
    assert_eq!(next(&job, &s, &f, target), Step::EndProfile);
    f.workload.as_mut().unwrap().rolled_out = false;
    assert_eq!(next(&job, &s, &f, target), Step::Wait);
}

#[test]
fn a_build_rolls_out_or_fails_and_a_rollout_ends_ready_or_rolled_back() {
    let mut s = status("Debloating");
    assert_eq!(
        next(&spec(), &s, &facts(T0_SECS, ready("n1")), target),
        Step::Wait
    );
    s.build = Some(BuildStatus {
        error: Some("layer sha256:x: refused".into()),
        ..Default::default()
    });
    assert!(matches!(
        next(&spec(), &s, &facts(T0_SECS, ready("n1")), target),
        Step::Fail {
            reason: "BuildFailed",
            ..
        }
    ));
    s.build = Some(BuildStatus {
        image: Some("r.io/redis:7-baffs".into()),
        digest: Some("sha256:d".into()),
        ..Default::default()
    });
    assert_eq!(
        next(&spec(), &s, &facts(T0_SECS, ready("n1")), target),
        Step::RollOut {
            image: "r.io/redis:7-baffs".into()
        }
    );
    let mut r = status("RollingOut");
    r.rollout_started_at = Some(T0.into());
    let rolling = WorkloadFacts {
        rolled_out: false,
        ..ready("n1")
    };
    assert_eq!(
        next(&spec(), &r, &facts(T0_SECS + 10.0, rolling.clone()), target),
        Step::Wait
    );
    assert_eq!(
        next(&spec(), &r, &facts(T0_SECS + 10.0, ready("n1")), target),
        Step::Done
    );
    assert!(matches!(
        next(
            &spec(),
            &r,
            &facts(T0_SECS + 300.0, rolling.clone()),
            target
        ),
        Step::RollBack {
            reason: "NewPodsNotReady",
            ..
        }
    ));
    let crashed = WorkloadFacts {
        failing: Some("redis: CrashLoopBackOff".into()),
        ..rolling
    };
    assert!(matches!(
        next(&spec(), &r, &facts(T0_SECS + 1.0, crashed), target),
        Step::RollBack {
            reason: "NewPodsFailed",
            ..
        }
    ));
    assert_eq!(
        next(
            &spec(),
            &status("RolledBack"),
            &facts(T0_SECS, ready("n1")),
            target
        ),
        Step::Wait
    );
}

#[test]
fn a_watching_profiler_gets_the_workload_restarted_and_the_window_counts_from_then() {
    let mut s = profiling(T0);
    s.profilers.get_mut("n1").unwrap().watching = None;
    // Not known yet whether it can watch: wait.
    assert_eq!(
        next(&spec(), &s, &facts(T0_SECS + 99.0, ready("n1")), target),
        Step::Wait
    );
    s.profilers.get_mut("n1").unwrap().watching = Some(true);
    assert_eq!(
        next(&spec(), &s, &facts(T0_SECS + 99.0, ready("n1")), target),
        Step::Restart
    );
    s.restarted_at = Some("2026-01-01T00:01:00Z".into());
    assert_eq!(
        next(&spec(), &s, &facts(T0_SECS + 100.0, ready("n1")), target),
        Step::Wait
    );
    let rolling = WorkloadFacts {
        rolled_out: false,
        ..ready("n1")
    };
    assert_eq!(
        next(&spec(), &s, &facts(T0_SECS + 200.0, rolling), target),
        Step::Wait
    );
    assert_eq!(
        next(&spec(), &s, &facts(T0_SECS + 200.0, ready("n1")), target),
        Step::EndProfile
    );
    // restart: false keeps the pods as they are.
    let keep = ImageDebloatSpec {
        profile: ProfileSpec {
            restart: Some(false),
            ..Default::default()
        },
        ..spec()
    };
    s.restarted_at = None;
    assert_eq!(
        next(&keep, &s, &facts(T0_SECS + 60.0, ready("n1")), target),
        Step::EndProfile
    );
}

#[test]
fn with_several_nodes_every_debloater_must_record_before_the_profile_counts() {
    let mut s = profiling(T0);
    s.nodes = vec!["n1".into(), "n2".into()];
    assert_eq!(
        next(&spec(), &s, &facts(T0_SECS + 99.0, ready("n1")), target),
        Step::Wait
    );
    s.profilers.insert(
        "n2".into(),
        ProfilerStatus {
            since: "2026-01-01T00:00:30Z".into(),
            watching: Some(false),
            ..Default::default()
        },
    );
    // The window counts from the later start.
    assert_eq!(
        next(&spec(), &s, &facts(T0_SECS + 80.0, ready("n1")), target),
        Step::Wait
    );
    assert_eq!(
        next(&spec(), &s, &facts(T0_SECS + 90.0, ready("n1")), target),
        Step::EndProfile
    );
    // One watching node is enough to restart the workload.
    s.profilers.get_mut("n2").unwrap().watching = Some(true);
    assert_eq!(
        next(&spec(), &s, &facts(T0_SECS + 90.0, ready("n1")), target),
        Step::Restart
    );
}
