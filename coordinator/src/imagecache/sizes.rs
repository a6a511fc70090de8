//! How much disk a pull will take, learnt from the registry before the first
//! pull of an image, so the agent's disk guard never has to assume 0 bytes.
//!
//! Where a node already holds the image, the planner knows its size from that
//! node's inventory. Otherwise the coordinator reads the image's manifest
//! (the layers' total, compressed) and asks the agent to allow for
//! [`disk_estimate`] of it. Answers are kept a while per reference, and so
//! are failures (for a shorter while), so a registry that cannot answer costs
//! one lookup per image, not one per node; an unknown size (0) is reported as
//! such by the agent when it checks.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use berth_proto::docker_config::RegistryAuth;
use tracing::debug;

use super::tags::Registry;

/// How long a learnt size is kept.
const KEEP: Duration = Duration::from_secs(600);
/// How long a failed lookup is kept before the registry is asked again.
const KEEP_FAILURE: Duration = Duration::from_secs(60);
/// Longest wait for a manifest before a pull goes out with an unknown size.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// Most sizes kept.
const MAX_ENTRIES: usize = 4096;

/// Disk a pull of layers totalling `layers` bytes (compressed) takes at
/// least: containerd keeps each layer blob in its content store and unpacks
/// it into a snapshot of at least the same size.
pub fn disk_estimate(layers: u64) -> u64 {
    layers.saturating_mul(2)
}

/// Sizes learnt from one registry client.
pub struct Sizes<R> {
    registry: R,
    known: Mutex<HashMap<String, (u64, Instant)>>,
}

impl<R: Registry> Sizes<R> {
    /// Learns sizes through `registry`.
    pub fn new(registry: R) -> Self {
        Sizes {
            registry,
            known: Mutex::default(),
        }
    }

    /// The disk a pull of `reference` needs ([`disk_estimate`] of its
    /// layers), 0 if the registry cannot say within a short deadline.
    pub async fn expected(&self, reference: &str, auth: Option<RegistryAuth>) -> u64 {
        if let Some((size, at)) = self.known.lock().unwrap().get(reference) {
            let keep = if *size > 0 { KEEP } else { KEEP_FAILURE };
            if at.elapsed() < keep {
                return *size;
            }
        }
        let answer =
            tokio::time::timeout(LOOKUP_TIMEOUT, self.registry.layers_size(reference, auth)).await;
        let size = match answer {
            Ok(Ok(layers)) => disk_estimate(layers),
            Ok(Err(e)) => {
                debug!(reference, error = %e, "image size unknown");
                0
            }
            Err(_) => {
                debug!(
                    reference,
                    "image size unknown: the registry did not answer in time"
                );
                0
            }
        };
        let mut known = self.known.lock().unwrap();
        if known.len() >= MAX_ENTRIES {
            known.retain(|_, (_, at)| at.elapsed() < KEEP);
            if known.len() >= MAX_ENTRIES {
                known.clear();
            }
        }
        known.insert(reference.to_string(), (size, Instant::now()));
        size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imagecache::tags::MemRegistry;
    use std::sync::atomic::Ordering;

    #[tokio::test]
    async fn a_pull_allows_for_the_blobs_and_their_unpacked_copy_asking_the_registry_once() {
        let reg = MemRegistry::default();
        reg.sizes
            .lock()
            .unwrap()
            .insert("r.io/a:1".into(), 30 << 20);
        let sizes = Sizes::new(reg.clone());
        assert_eq!(sizes.expected("r.io/a:1", None).await, 60 << 20);
        assert_eq!(sizes.expected("r.io/a:1", None).await, 60 << 20);
        assert_eq!(
            reg.calls.load(Ordering::Relaxed),
            1,
            "kept, not asked again"
        );
    }

    #[tokio::test]
    async fn an_image_the_registry_cannot_describe_has_an_unknown_size_asked_once() {
        let reg = MemRegistry::default();
        let sizes = Sizes::new(reg.clone());
        assert_eq!(sizes.expected("r.io/missing:1", None).await, 0);
        assert_eq!(sizes.expected("r.io/missing:1", None).await, 0);
        assert_eq!(
            reg.calls.load(Ordering::Relaxed),
            1,
            "a failure is kept a while: one lookup per image, not per node"
        );
    }
}
