//! The status a cache should show: phase, conditions and rollout times, as a
//! pure function of the planner's counts and the cache's previous status.
//! The controller writes what this returns.

use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use super::crd::{ImageCacheStatus, RolloutTimes};
use super::plan::{CacheView, Computed};

/// Reason of `Ready=False` (and `Degraded=True`) when the cache selects no node.
pub const NO_MATCHING_NODES: &str = "NoMatchingNodes";

/// A condition of `type_`, keeping its transition time from `old` when its
/// status did not change.
fn condition(
    type_: &str,
    on: bool,
    reason: &str,
    message: String,
    old: &[Condition],
    now: &Time,
) -> Condition {
    let status = if on { "True" } else { "False" }.to_string();
    let since = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message,
        last_transition_time: since,
        observed_generation: None,
    }
}

/// The status a cache should have, from the planner's counts and its old
/// status (`old`, describing spec `generation`). During `agent_grace` (right
/// after the coordinator starts, while agents reconnect) a node without an
/// agent counts as waiting, not degraded.
pub fn build_status(
    old: Option<&ImageCacheStatus>,
    generation: Option<i64>,
    v: &CacheView,
    computed: Computed,
    now: Timestamp,
    agent_grace: bool,
) -> ImageCacheStatus {
    let old = old.cloned().unwrap_or_default();
    let n = &computed.nodes;
    let (waiting, troubled) = if agent_grace {
        (n.pulling + n.pending + n.unknown, n.failed)
    } else {
        (n.pulling + n.pending, n.failed + n.unknown)
    };
    // A cache that selects no node has nothing to be ready on: that is a
    // problem to show, not a success.
    let no_nodes = n.target == 0 && !v.deleting && !v.paused;
    // What the spec asks that the controller cannot use is never silent: the
    // cache is Degraded with the reason, even if every usable image is held.
    let invalid = super::view::spec_condition(&v.problems).filter(|_| !v.deleting);
    let ready = troubled == 0 && waiting == 0 && !no_nodes && invalid.is_none();
    let phase = if v.deleting {
        "Deleting"
    } else if v.paused {
        "Paused"
    } else if troubled > 0 || no_nodes || invalid.is_some() {
        "Degraded"
    } else if waiting > 0 {
        "Progressing"
    } else {
        "Ready"
    };
    let t = Time(now);
    let missing = if computed.missing_node_names.is_empty() {
        String::new()
    } else {
        format!(
            "; nodeNames not in the cluster: {}",
            computed.missing_node_names.join(", ")
        )
    };
    let degraded_reason = match &invalid {
        Some((reason, _)) => (*reason).to_string(),
        None => computed.top_reason.clone().unwrap_or_else(|| {
            if no_nodes {
                NO_MATCHING_NODES.into()
            } else if n.unknown > 0 {
                "AgentDisconnected".into()
            } else {
                "AsExpected".into()
            }
        }),
    };
    let (ready_reason, ready_message) = if let Some((reason, message)) = &invalid {
        (*reason, message.clone())
    } else if no_nodes {
        (
            NO_MATCHING_NODES,
            format!("no node matches {}{missing}", v.describe_targets()),
        )
    } else if ready {
        (
            "AllNodesReady",
            format!(
                "{}/{} selected nodes hold every image{missing}",
                n.ready, n.target
            ),
        )
    } else {
        (
            "NodesNotReady",
            format!(
                "{}/{} selected nodes hold every image{missing}",
                n.ready, n.target
            ),
        )
    };
    let degraded_message = if let Some((_, message)) = &invalid {
        message.clone()
    } else if no_nodes {
        ready_message.clone()
    } else {
        format!(
            "{} nodes failed, {} without a connected agent",
            n.failed, n.unknown
        )
    };
    let conditions = vec![
        condition(
            "Ready",
            ready,
            ready_reason,
            ready_message,
            &old.conditions,
            &t,
        ),
        condition(
            "Progressing",
            waiting > 0 && !v.paused,
            if waiting > 0 { "Pulling" } else { "Idle" },
            format!("{} nodes pulling, {} waiting", n.pulling, n.pending),
            &old.conditions,
            &t,
        ),
        condition(
            "Degraded",
            troubled > 0 || no_nodes || invalid.is_some(),
            &degraded_reason,
            degraded_message,
            &old.conditions,
            &t,
        ),
    ];
    // A rollout starts when the cache stops being ready and completes when it is again.
    let was_ready = old.phase == "Ready";
    let last_rollout = match (old.last_rollout, was_ready, ready) {
        (Some(r), true, true) => Some(r),
        (Some(r), false, false) if r.completed.is_none() => Some(r),
        (Some(r), false, true) if r.completed.is_none() => {
            let started: Option<Timestamp> = r.started.parse().ok();
            Some(RolloutTimes {
                seconds: started.map(|s| now.duration_since(s).as_secs_f64()),
                completed: Some(now.to_string()),
                ..r
            })
        }
        (r, _, _) if !ready || r.is_none() => Some(RolloutTimes {
            started: now.to_string(),
            completed: ready.then(|| now.to_string()),
            seconds: ready.then_some(0.0),
        }),
        (r, _, _) => r,
    };
    ImageCacheStatus {
        observed_generation: generation,
        phase: phase.into(),
        conditions,
        nodes: computed.nodes,
        images: computed.images,
        last_rollout,
        nodes_holding: computed.holders,
    }
}

/// Least time between two status writes of one cache that change only counts.
pub const STATUS_INTERVAL: Duration = Duration::from_millis(500);

/// What to do with a newly built status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// It says nothing new.
    Skip,
    /// Write it now.
    Now,
    /// Only counts changed and the last write was recent: write at this instant.
    At(Instant),
}

/// Whether to write `new` now. `stored` is the status the cache store shows,
/// `last` this process's last write of it (the store may not have seen it
/// yet). A change of phase or of any condition's status is written at once;
/// a change of counts only is held to one write per [`STATUS_INTERVAL`].
pub fn write_decision(
    stored: Option<&ImageCacheStatus>,
    last: Option<(Instant, &ImageCacheStatus)>,
    new: &ImageCacheStatus,
    now: Instant,
) -> Write {
    if stored == Some(new) || last.is_some_and(|(_, s)| s == new) {
        return Write::Skip;
    }
    let Some((at, written)) = last else {
        return Write::Now;
    };
    let due = at + STATUS_INTERVAL;
    if due <= now || turned(written, new) {
        Write::Now
    } else {
        Write::At(due)
    }
}

/// Whether the phase or the status of a condition differs.
fn turned(old: &ImageCacheStatus, new: &ImageCacheStatus) -> bool {
    let status = |s: &ImageCacheStatus, t: &str| {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .map(|c| c.status.clone())
    };
    old.phase != new.phase
        || new
            .conditions
            .iter()
            .any(|c| status(old, &c.type_) != Some(c.status.clone()))
}

#[cfg(test)]
mod tests;
