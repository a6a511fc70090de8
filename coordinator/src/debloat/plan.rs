//! The pure decisions of an ImageDebloat: from its spec, its status and
//! what the controller saw of the workload, the one next step. No IO.

use std::time::Duration;

use super::crd::{ImageDebloatSpec, ImageDebloatStatus, ProfilerStatus};

/// Default profile window.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);
/// Default time the new pods have to become ready.
pub const DEFAULT_ROLLOUT_TIMEOUT: Duration = Duration::from_secs(300);
/// Default tag suffix.
pub const DEFAULT_SUFFIX: &str = "-baffs";

/// What the controller saw of the workload this pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Facts {
    /// Seconds since the epoch.
    pub now: f64,
    /// The workload; `None` when it does not exist.
    pub workload: Option<WorkloadFacts>,
    /// The probe Job: `Some(true)` once it succeeded, `Some(false)` while
    /// it runs or is missing, `None` when the spec names none.
    pub probe_job_done: Option<bool>,
}

/// The workload, as the controller found it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkloadFacts {
    /// The image of the chosen container; `None` when there is no such container.
    pub image: Option<String>,
    /// The nodes of ready pods that run the image, each once, sorted.
    pub ready_nodes: Vec<String>,
    /// Every replica is updated and available.
    pub rolled_out: bool,
    /// A pod of the current template failed: its container crashed or
    /// exited in error (the message says how).
    pub failing: Option<String>,
}

/// The next step.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Nothing to do this pass.
    Wait,
    /// Write `Profiling` with the nodes, image and target.
    Profile {
        /// Where to profile; the first also builds.
        nodes: Vec<String>,
        /// The image as the workload names it.
        image: String,
        /// `<image>-baffs`.
        target: String,
    },
    /// Restart the workload's pods under the profiler; write `restartedAt`.
    Restart,
    /// Write `Debloating`: the node's debloater stops and builds.
    EndProfile,
    /// Patch the workload onto the built image; write `RollingOut`.
    RollOut {
        /// The image to roll onto.
        image: String,
    },
    /// Write `Ready`.
    Done,
    /// Write `Failed` (nothing of the workload changed).
    Fail {
        /// Machine-readable.
        reason: &'static str,
        /// Human-readable.
        message: String,
    },
    /// Put the original image back; write `RolledBack`.
    RollBack {
        /// Machine-readable.
        reason: &'static str,
        /// Human-readable.
        message: String,
    },
    /// Write a message while waiting (e.g. for a ready pod).
    Note(String),
}

fn duration(text: Option<&str>, default: Duration) -> Duration {
    text.and_then(|t| humantime::parse_duration(t).ok())
        .unwrap_or(default)
}

fn seconds_since(at: Option<&str>, now: f64) -> Option<f64> {
    let t: k8s_openapi::jiff::Timestamp = at?.parse().ok()?;
    Some(now - t.as_millisecond() as f64 / 1000.0)
}

/// The next step of `spec` at `status`, given `facts`.
pub fn next(
    spec: &ImageDebloatSpec,
    status: &ImageDebloatStatus,
    facts: &Facts,
    target_of: impl Fn(&str, &str, Option<&str>) -> Result<String, String>,
) -> Step {
    let phase = status.phase.as_str();
    if matches!(phase, "Ready" | "Failed" | "RolledBack") {
        return Step::Wait;
    }
    let Some(w) = &facts.workload else {
        return Step::Fail {
            reason: "WorkloadNotFound",
            message: format!("{} {} not found", spec.workload.kind, spec.workload.name),
        };
    };
    match phase {
        "" | "Pending" => {
            let Some(image) = &w.image else {
                return Step::Fail {
                    reason: "ContainerNotFound",
                    message: format!(
                        "{} {} has no container {}",
                        spec.workload.kind,
                        spec.workload.name,
                        spec.container.as_deref().unwrap_or("(none)")
                    ),
                };
            };
            let suffix = spec.suffix.as_deref().unwrap_or(DEFAULT_SUFFIX);
            if image.ends_with(suffix) {
                return Step::Fail {
                    reason: "AlreadyDebloated",
                    message: format!("{image} is already a debloated image"),
                };
            }
            let target = match target_of(image, suffix, spec.repository.as_deref()) {
                Ok(t) => t,
                Err(e) => {
                    return Step::Fail {
                        reason: "InvalidImage",
                        message: e,
                    };
                }
            };
            if w.ready_nodes.is_empty() {
                return Step::Note(format!(
                    "waiting for a ready pod running {image} on a node labelled berth.dev/debloat=enabled"
                ));
            }
            Step::Profile {
                nodes: w.ready_nodes.clone(),
                image: image.clone(),
                target,
            }
        }
        "Profiling" => {
            // Only once the node's debloater records does the profile count.
            // Every node's debloater records before the profile counts.
            let nodes: Vec<&String> = if status.nodes.is_empty() {
                status.node.iter().collect()
            } else {
                status.nodes.iter().collect()
            };
            let profilers: Vec<&ProfilerStatus> = nodes
                .iter()
                .filter_map(|n| status.profilers.get(*n))
                .collect();
            if profilers.is_empty() || profilers.len() < nodes.len() {
                return Step::Wait;
            }
            let watching = if profilers.iter().any(|p| p.watching.is_none()) {
                None
            } else {
                Some(profilers.iter().any(|p| p.watching == Some(true)))
            };
            let since = profilers
                .iter()
                .map(|p| p.since.as_str())
                .max()
                .unwrap_or("");
            let p = ProfilerStatus {
                since: since.to_string(),
                watching,
                ..Default::default()
            };
            // Restarted under the profiler, the profile counts from the
            // restart and ends only once the new pods are up.
            let restart = spec.profile.restart != Some(false) && p.watching == Some(true);
            let from = if restart {
                match &status.restarted_at {
                    Some(t) => t.as_str(),
                    None if spec.profile.stop => return Step::EndProfile,
                    None => return Step::Restart,
                }
            } else if spec.profile.restart != Some(false) && p.watching.is_none() {
                // The debloater has not said yet whether it can watch.
                return if spec.profile.stop {
                    Step::EndProfile
                } else {
                    Step::Wait
                };
            } else {
                p.since.as_str()
            };
            let recorded = seconds_since(Some(from), facts.now).unwrap_or(0.0);
            let window = duration(spec.profile.window.as_deref(), DEFAULT_WINDOW);
            let probe_done = facts.probe_job_done == Some(true) && w.rolled_out;
            let window_over = (spec.profile.probe_job.is_none() || spec.profile.window.is_some())
                && recorded >= window.as_secs_f64()
                && (w.rolled_out || !restart);
            if spec.profile.stop || probe_done || window_over {
                Step::EndProfile
            } else {
                Step::Wait
            }
        }
        "Debloating" => match &status.build {
            Some(b) if b.error.is_some() => Step::Fail {
                reason: "BuildFailed",
                message: b.error.clone().unwrap_or_default(),
            },
            Some(b) if b.digest.is_some() => Step::RollOut {
                image: b
                    .image
                    .clone()
                    .or(status.target.clone())
                    .unwrap_or_default(),
            },
            _ => Step::Wait,
        },
        "RollingOut" => {
            if let Some(why) = &w.failing {
                return Step::RollBack {
                    reason: "NewPodsFailed",
                    message: why.clone(),
                };
            }
            if w.rolled_out {
                return Step::Done;
            }
            let timeout = duration(spec.rollout_timeout.as_deref(), DEFAULT_ROLLOUT_TIMEOUT);
            match seconds_since(status.rollout_started_at.as_deref(), facts.now) {
                Some(s) if s >= timeout.as_secs_f64() => Step::RollBack {
                    reason: "NewPodsNotReady",
                    message: format!(
                        "the pods of {} were not ready within {}",
                        status.target.as_deref().unwrap_or("the debloated image"),
                        humantime::format_duration(timeout)
                    ),
                },
                _ => Step::Wait,
            }
        }
        _ => Step::Wait,
    }
}

#[cfg(test)]
mod tests;
