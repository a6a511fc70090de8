//! The planner's view of one ImageCache, built from its spec, and what in the
//! spec the coordinator could not use.
//!
//! Admission (the CRD's CEL rules) refuses most invalid specs. What it cannot
//! see — references equal only once normalised, `matchLabels` keys, anything
//! an older CRD let through — is never dropped in silence: [`cache_view`]
//! skips it (or uses the default) and lists it in [`CacheView::problems`], and
//! [`spec_condition`] turns that list into the `InvalidSpec` condition.
//!
//! Pure: ImageCache in, [`CacheView`] out; no apiserver, no agents.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;

use berth_proto::reference::Reference;
use kube::ResourceExt;

use super::crd::{ImageCache, LABEL_KEY, UpdateType};
use super::plan::{CacheView, SpecProblem, WantedImage};

/// How often a tracked tag is re-resolved when the spec names no interval.
pub const DEFAULT_TRACK_INTERVAL: Duration = Duration::from_secs(300);
/// Deadline of one pull attempt when the spec names none (the agent's too).
pub use berth_proto::DEFAULT_PULL_TIMEOUT;
/// Pulls of one cache at once on a node when the spec names no limit.
pub const DEFAULT_PULLS_PER_NODE: u32 = 2;
/// Reason of the condition that lists a spec's problems.
pub const INVALID_SPEC: &str = "InvalidSpec";

/// A cache's `namespace/name`.
pub fn key(c: &ImageCache) -> String {
    format!("{}/{}", c.namespace().unwrap_or_default(), c.name_any())
}

/// Parses a spec duration the way the CRD's CEL `duration()` does (Go's
/// `time.ParseDuration`: `90s`, `1h30m`, `1.5h`), so the controller reads
/// every duration admission let through, and reads it the same.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let d = kube::core::Duration::from_str(value).map_err(|e| e.to_string())?;
    if d.is_negative() {
        return Err("a duration must not be negative".into());
    }
    Ok(d.into())
}

/// A spec duration, or `default` when absent; an unparseable one is a problem
/// and falls back to `default`.
fn duration_or(
    field: &'static str,
    value: Option<&str>,
    default: Duration,
    problems: &mut Vec<SpecProblem>,
) -> Duration {
    let Some(value) = value else {
        return default;
    };
    parse_duration(value).unwrap_or_else(|reason| {
        problems.push(SpecProblem::BadDuration {
            field,
            value: value.to_string(),
            reason,
            default,
        });
        default
    })
}

/// How often a TrackTag cache re-resolves its tags (the default when absent
/// or unparseable; [`cache_view`] reports the latter).
pub fn track_interval(c: &ImageCache) -> Duration {
    duration_or(
        "updatePolicy.interval",
        interval_of(c),
        DEFAULT_TRACK_INTERVAL,
        &mut vec![],
    )
}

fn interval_of(c: &ImageCache) -> Option<&str> {
    c.spec
        .update_policy
        .as_ref()
        .filter(|p| p.type_ == UpdateType::TrackTag)
        .and_then(|p| p.interval.as_deref())
}

static LABEL_KEY_RE: LazyLock<regex::Regex> =
    LazyLock::new(|| regex::Regex::new(LABEL_KEY).expect("LABEL_KEY is a regex"));

/// The planner's view of a cache. References are normalised (see
/// `berth_proto::reference` for the normal form; a tag beside a digest is
/// dropped). What cannot be used is skipped or defaulted and listed in
/// `problems`. `pins` maps a tracked reference to the `repository@digest` it
/// points to now.
pub fn cache_view(c: &ImageCache, pins: &HashMap<String, String>) -> CacheView {
    let mut problems = Vec::new();
    let mut images: Vec<WantedImage> = Vec::with_capacity(c.spec.images.len());
    let mut written: HashMap<String, &str> = HashMap::new();
    for i in &c.spec.images {
        let reference = match Reference::parse(&i.reference) {
            Ok(r) => r.identity(),
            Err(e) => {
                problems.push(SpecProblem::BadReference {
                    reference: i.reference.clone(),
                    reason: e.reason.to_string(),
                });
                continue;
            }
        };
        if let Some(first) = written.get(&reference) {
            problems.push(SpecProblem::Duplicate {
                first: first.to_string(),
                second: i.reference.clone(),
                normal: reference,
            });
            continue;
        }
        written.insert(reference.clone(), &i.reference);
        let timeout = duration_or(
            "pullTimeout",
            i.pull_timeout.as_deref(),
            DEFAULT_PULL_TIMEOUT,
            &mut problems,
        );
        let pin = pins.get(&reference).cloned();
        images.push(WantedImage {
            reference,
            timeout,
            pin,
        });
    }
    duration_or(
        "updatePolicy.interval",
        interval_of(c),
        DEFAULT_TRACK_INTERVAL,
        &mut problems,
    );
    let selector = c.spec.node_selector.clone();
    for k in selector
        .iter()
        .flat_map(|s| s.match_labels.iter().flatten())
    {
        let prefix_ok = k.0.split_once('/').is_none_or(|(p, _)| p.len() <= 253);
        if !LABEL_KEY_RE.is_match(k.0) || !prefix_ok {
            problems.push(SpecProblem::BadLabelKey { key: k.0.clone() });
        }
    }
    let forgotten = c
        .status
        .iter()
        .flat_map(|s| &s.images)
        .map(|i| i.reference.clone())
        .filter(|r| !images.iter().any(|i| &i.reference == r))
        .collect();
    let rollout = c.spec.rollout.clone().unwrap_or_default();
    CacheView {
        key: key(c),
        images,
        forgotten,
        selector: selector.map(Into::into),
        node_names: c.spec.node_names.clone(),
        deletion: c.spec.deletion_policy,
        deleting: c.metadata.deletion_timestamp.is_some(),
        paused: c.spec.paused,
        max_concurrent_nodes: rollout.max_concurrent_nodes,
        max_pulls_per_node: rollout
            .max_concurrent_pulls_per_node
            .unwrap_or(DEFAULT_PULLS_PER_NODE),
        problems,
        access: Default::default(),
        holders: c
            .status
            .iter()
            .flat_map(|s| &s.nodes_holding)
            .cloned()
            .collect(),
    }
}

/// The condition a cache with spec problems carries (reason, message): the
/// `InvalidSpec` reason and every problem, one sentence each. `None` when the
/// spec is fully usable. Status makes this a `Degraded=True` condition, so a
/// cache whose images were all unusable never reads as Ready.
pub fn spec_condition(problems: &[SpecProblem]) -> Option<(&'static str, String)> {
    if problems.is_empty() {
        return None;
    }
    let messages: Vec<String> = problems.iter().map(ToString::to_string).collect();
    Some((INVALID_SPEC, messages.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imagecache::crd::{CachedImage, ImageCacheSpec, NodeSelector, UpdatePolicy};

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn cache(images: &[(&str, Option<&str>)]) -> ImageCache {
        let mut c = ImageCache::new(
            "c",
            ImageCacheSpec {
                images: images
                    .iter()
                    .map(|(r, t)| CachedImage {
                        reference: r.to_string(),
                        pull_timeout: t.map(str::to_string),
                    })
                    .collect(),
                ..Default::default()
            },
        );
        c.metadata.namespace = Some("ns".into());
        c
    }

    fn refs(v: &CacheView) -> Vec<&str> {
        v.images.iter().map(|i| i.reference.as_str()).collect()
    }

    #[test]
    fn a_usable_spec_has_no_problems_and_no_condition() {
        let v = cache_view(&cache(&[("busybox", None)]), &HashMap::new());
        assert_eq!(refs(&v), ["docker.io/library/busybox:latest"]);
        assert_eq!(v.key, "ns/c");
        assert!(v.problems.is_empty());
        assert_eq!(spec_condition(&v.problems), None);
    }

    #[test]
    fn an_unparseable_reference_is_skipped_and_reported_with_its_reason() {
        let c = cache(&[
            ("Team/app:1", None),
            ("r.example:123456/a:1", None),
            ("r.io/ok:1", None),
        ]);
        let v = cache_view(&c, &HashMap::new());
        assert_eq!(refs(&v), ["r.io/ok:1"]);
        let (reason, message) = spec_condition(&v.problems).unwrap();
        assert_eq!(reason, "InvalidSpec");
        assert!(message.contains("\"Team/app:1\""), "{message}");
        assert!(message.contains("lowercase"), "{message}");
        assert!(message.contains("\"r.example:123456/a:1\""), "{message}");
        assert!(message.contains("1 to 65535"), "{message}");
    }

    #[test]
    fn references_equal_once_normalised_are_duplicates_and_the_first_wins() {
        let c = cache(&[
            ("busybox", Some("1m")),
            ("docker.io/library/busybox:latest", Some("2m")),
        ]);
        let v = cache_view(&c, &HashMap::new());
        assert_eq!(refs(&v), ["docker.io/library/busybox:latest"]);
        assert_eq!(v.images[0].timeout, Duration::from_secs(60));
        let (_, message) = spec_condition(&v.problems).unwrap();
        assert!(
            message.contains("\"busybox\" and \"docker.io/library/busybox:latest\""),
            "{message}"
        );
    }

    #[test]
    fn a_tag_beside_a_digest_is_wanted_by_its_digest() {
        let v = cache_view(&cache(&[(&format!("r.io/a:1@{D}"), None)]), &HashMap::new());
        assert_eq!(refs(&v), [format!("r.io/a@{D}")]);
    }

    #[test]
    fn durations_are_read_like_cel_reads_them() {
        let c = cache(&[("r.io/a:1", Some("1.5h")), ("r.io/b:1", Some("1h30m"))]);
        let v = cache_view(&c, &HashMap::new());
        assert_eq!(v.images[0].timeout, Duration::from_secs(5400));
        assert_eq!(v.images[1].timeout, Duration::from_secs(5400));
        assert!(v.problems.is_empty());
    }

    #[test]
    fn an_unparseable_duration_falls_back_to_the_default_and_says_so() {
        let mut c = cache(&[("r.io/a:1", Some("forever"))]);
        c.spec.update_policy = Some(UpdatePolicy {
            type_: UpdateType::TrackTag,
            interval: Some("5 minutes".into()),
        });
        let v = cache_view(&c, &HashMap::new());
        assert_eq!(v.images[0].timeout, DEFAULT_PULL_TIMEOUT);
        assert_eq!(track_interval(&c), DEFAULT_TRACK_INTERVAL);
        let (_, message) = spec_condition(&v.problems).unwrap();
        assert!(
            message.contains("pullTimeout \"forever\"") && message.contains("30m"),
            "{message}"
        );
        assert!(
            message.contains("updatePolicy.interval \"5 minutes\"") && message.contains("5m"),
            "{message}"
        );
    }

    #[test]
    fn a_match_labels_key_that_is_no_label_key_is_reported() {
        let mut c = cache(&[("r.io/a:1", None)]);
        c.spec.node_selector = Some(NodeSelector {
            match_labels: Some(
                [
                    ("pool".to_string(), "gpu".to_string()),
                    ("example.com/zone".to_string(), "a".to_string()),
                    ("bad key!".to_string(), "x".to_string()),
                    (format!("{}/n", "a".repeat(254)), "x".to_string()),
                ]
                .into(),
            ),
            match_expressions: None,
        });
        let v = cache_view(&c, &HashMap::new());
        let (_, message) = spec_condition(&v.problems).unwrap();
        assert_eq!(v.problems.len(), 2, "{message}");
        assert!(message.contains("\"bad key!\""), "{message}");
    }
}
