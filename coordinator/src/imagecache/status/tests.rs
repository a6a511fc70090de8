//! Status building as data in, data out.

use super::*;
use crate::imagecache::crd::NodeCounts;
use crate::imagecache::plan::SpecProblem;

fn at(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn counts(target: u32, ready: u32, pulling: u32, failed: u32, unknown: u32) -> Computed {
    Computed {
        nodes: NodeCounts {
            target,
            ready,
            pulling,
            pending: target - ready - pulling - failed - unknown,
            failed,
            unknown,
        },
        top_reason: (failed > 0).then(|| "AuthFailed".to_string()),
        ..Default::default()
    }
}

fn cond<'a>(s: &'a ImageCacheStatus, type_: &str) -> &'a Condition {
    s.conditions.iter().find(|c| c.type_ == type_).unwrap()
}

#[test]
fn every_node_ready_is_phase_ready_with_ready_true() {
    let s = build_status(
        None,
        Some(3),
        &CacheView::default(),
        counts(2, 2, 0, 0, 0),
        at("2026-01-01T00:00:00Z"),
        false,
    );
    assert_eq!(s.phase, "Ready");
    assert_eq!(s.observed_generation, Some(3));
    assert_eq!(cond(&s, "Ready").status, "True");
    assert_eq!(
        cond(&s, "Ready").message,
        "2/2 selected nodes hold every image"
    );
    assert_eq!(cond(&s, "Degraded").status, "False");
}

#[test]
fn a_failed_node_makes_the_cache_degraded_with_the_top_reason() {
    let s = build_status(
        None,
        None,
        &CacheView::default(),
        counts(3, 1, 1, 1, 0),
        at("2026-01-01T00:00:00Z"),
        false,
    );
    assert_eq!(s.phase, "Degraded");
    assert_eq!(cond(&s, "Degraded").reason, "AuthFailed");
    assert_eq!(cond(&s, "Progressing").status, "True");
}

#[test]
fn a_node_without_agent_waits_during_the_grace_and_degrades_after_it() {
    let v = CacheView::default();
    let t = at("2026-01-01T00:00:00Z");
    let during = build_status(None, None, &v, counts(2, 1, 0, 0, 1), t, true);
    assert_eq!(during.phase, "Progressing");
    let after = build_status(None, None, &v, counts(2, 1, 0, 0, 1), t, false);
    assert_eq!(after.phase, "Degraded");
    assert_eq!(cond(&after, "Degraded").reason, "AgentDisconnected");
}

#[test]
fn deleting_and_paused_override_the_counts() {
    let t = at("2026-01-01T00:00:00Z");
    let deleting = CacheView {
        deleting: true,
        ..Default::default()
    };
    let paused = CacheView {
        paused: true,
        ..Default::default()
    };
    let c = counts(1, 0, 1, 0, 0);
    assert_eq!(
        build_status(None, None, &deleting, c.clone(), t, false).phase,
        "Deleting"
    );
    let p = build_status(None, None, &paused, c, t, false);
    assert_eq!(p.phase, "Paused");
    assert_eq!(cond(&p, "Progressing").status, "False");
}

#[test]
fn a_rollout_is_timed_from_not_ready_to_ready_and_transition_times_are_kept() {
    let v = CacheView::default();
    let t0 = at("2026-01-01T00:00:00Z");
    let t1 = at("2026-01-01T00:00:02Z");
    let t2 = at("2026-01-01T00:00:05Z");
    let s0 = build_status(None, None, &v, counts(2, 0, 2, 0, 0), t0, false);
    let started = s0.last_rollout.clone().unwrap();
    assert_eq!(
        (started.started.as_str(), started.completed),
        ("2026-01-01T00:00:00Z", None)
    );
    let s1 = build_status(Some(&s0), None, &v, counts(2, 1, 1, 0, 0), t1, false);
    assert_eq!(s1.last_rollout, s0.last_rollout, "still rolling out");
    assert_eq!(
        cond(&s1, "Ready").last_transition_time,
        Time(t0),
        "Ready stayed False since t0"
    );
    let s2 = build_status(Some(&s1), None, &v, counts(2, 2, 0, 0, 0), t2, false);
    let done = s2.last_rollout.clone().unwrap();
    assert_eq!(done.completed.as_deref(), Some("2026-01-01T00:00:05Z"));
    assert_eq!(done.seconds, Some(5.0));
    assert_eq!(cond(&s2, "Ready").last_transition_time, Time(t2));
    let s3 = build_status(Some(&s2), None, &v, counts(2, 2, 0, 0, 0), t2, false);
    assert_eq!(
        s3.last_rollout, s2.last_rollout,
        "a ready cache keeps its last rollout"
    );
}

#[test]
fn a_phase_change_is_written_at_once_and_a_count_change_waits_for_the_interval() {
    let v = CacheView::default();
    let t = at("2026-01-01T00:00:00Z");
    let pulling = build_status(None, None, &v, counts(2, 0, 2, 0, 0), t, false);
    let half = build_status(Some(&pulling), None, &v, counts(2, 1, 1, 0, 0), t, false);
    let ready = build_status(Some(&half), None, &v, counts(2, 2, 0, 0, 0), t, false);
    let t0 = Instant::now();
    let soon = t0 + Duration::from_millis(10);
    let last = Some((t0, &pulling));
    assert_eq!(
        write_decision(None, None, &pulling, t0),
        Write::Now,
        "first write"
    );
    assert_eq!(
        write_decision(Some(&pulling), None, &pulling, soon),
        Write::Skip
    );
    assert_eq!(
        write_decision(None, last, &pulling, soon),
        Write::Skip,
        "store lags"
    );
    assert_eq!(
        write_decision(Some(&pulling), last, &half, soon),
        Write::At(t0 + STATUS_INTERVAL),
        "counts only"
    );
    assert_eq!(
        write_decision(Some(&pulling), last, &half, t0 + STATUS_INTERVAL),
        Write::Now
    );
    assert_eq!(
        write_decision(Some(&pulling), last, &ready, soon),
        Write::Now,
        "Progressing to Ready"
    );
}

#[test]
fn a_condition_turning_without_a_phase_change_is_written_at_once() {
    let paused = CacheView {
        paused: true,
        ..Default::default()
    };
    let t = at("2026-01-01T00:00:00Z");
    let waiting = build_status(None, None, &paused, counts(1, 0, 1, 0, 0), t, false);
    let ready = build_status(
        Some(&waiting),
        None,
        &paused,
        counts(1, 1, 0, 0, 0),
        t,
        false,
    );
    assert_eq!(waiting.phase, ready.phase);
    let t0 = Instant::now();
    assert_eq!(
        write_decision(None, Some((t0, &waiting)), &ready, t0),
        Write::Now
    );
}

#[test]
fn a_selector_matching_no_node_is_not_ready_and_says_which_selector() {
    let v = CacheView {
        selector: Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
                match_labels: Some([("pool".to_string(), "gpu".to_string())].into()),
                ..Default::default()
            },
        ),
        ..Default::default()
    };
    let s = build_status(
        None,
        None,
        &v,
        counts(0, 0, 0, 0, 0),
        at("2026-01-01T00:00:00Z"),
        false,
    );
    assert_ne!(s.phase, "Ready");
    let ready = cond(&s, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "NoMatchingNodes")
    );
    assert_eq!(ready.message, "no node matches nodeSelector pool=gpu");
    assert_eq!(s.last_rollout.unwrap().completed, None);
}

#[test]
fn node_names_that_name_no_node_are_listed_in_the_message() {
    let v = CacheView {
        node_names: Some(vec!["ghost-1".into(), "ghost-2".into()]),
        ..Default::default()
    };
    let nodes = [crate::imagecache::plan::NodeView {
        name: "real".into(),
        ..Default::default()
    }];
    let computed = crate::imagecache::plan::status(&v, &nodes);
    let s = build_status(None, None, &v, computed, at("2026-01-01T00:00:00Z"), false);
    let ready = cond(&s, "Ready");
    assert_eq!(ready.reason, "NoMatchingNodes");
    assert_eq!(
        ready.message,
        "no node matches nodeNames [ghost-1, ghost-2]; nodeNames not in the cluster: ghost-1, ghost-2"
    );
    assert_eq!(cond(&s, "Degraded").reason, "NoMatchingNodes");
}

#[test]
fn a_missing_node_name_beside_ready_nodes_is_still_named() {
    let v = CacheView {
        node_names: Some(vec!["real".into(), "ghost".into()]),
        ..Default::default()
    };
    let nodes = [crate::imagecache::plan::NodeView {
        name: "real".into(),
        agent: Some(crate::domain::AgentView {
            connected: true,
            ..Default::default()
        }),
        ..Default::default()
    }];
    let computed = crate::imagecache::plan::status(&v, &nodes);
    let s = build_status(None, None, &v, computed, at("2026-01-01T00:00:00Z"), false);
    assert_eq!(s.phase, "Ready");
    assert_eq!(
        cond(&s, "Ready").message,
        "1/1 selected nodes hold every image; nodeNames not in the cluster: ghost"
    );
}

#[test]
fn a_spec_the_controller_cannot_fully_use_is_degraded_even_with_every_node_ready() {
    let v = CacheView {
        problems: vec![SpecProblem::Duplicate {
            first: "busybox".into(),
            second: "docker.io/library/busybox:latest".into(),
            normal: "docker.io/library/busybox:latest".into(),
        }],
        ..Default::default()
    };
    let s = build_status(
        None,
        None,
        &v,
        counts(2, 2, 0, 0, 0),
        at("2026-01-01T00:00:00Z"),
        false,
    );
    assert_eq!(s.phase, "Degraded");
    for type_ in ["Ready", "Degraded"] {
        assert_eq!(cond(&s, type_).reason, "InvalidSpec", "{type_}");
        assert!(
            cond(&s, type_)
                .message
                .contains("docker.io/library/busybox:latest"),
            "{}",
            cond(&s, type_).message
        );
    }
    assert_eq!(cond(&s, "Ready").status, "False");
    assert_eq!(cond(&s, "Degraded").status, "True");
}
