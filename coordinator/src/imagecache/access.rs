//! Credentials across tenants: which pull Secrets a shared pull uses, and
//! whether each cache's own credentials can read its images.
//!
//! When several caches want one image on a node the planner sends one pull
//! that names every wanting cache; [`pick_credentials`] chooses whose
//! credentials that attempt uses (caches with credentials for the registry
//! first, the next ones after each failed attempt). Once pulled, the image is
//! on the node for every cache, so a cache must not count it Ready on the
//! strength of another tenant's Secret: when the wanting caches bring
//! different credentials ([`needing_check`]), [`AccessChecker`] asks the
//! registry, with each cache's own credentials, for the image's manifest and
//! keeps the verdict for [`ACCESS_TTL`] per (cache, repository, credentials).
//! A refusal makes that cache's image Failed with `AuthFailed` on its own
//! status (see `plan::Access`).

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_proto::docker_config::RegistryAuth;
use berth_proto::reference::Reference;
use tokio::sync::Notify;
use tracing::{debug, warn};

use super::tags::{Registry, RegistryError};

/// How long a verdict on a cache's credentials holds before it is asked again.
pub const ACCESS_TTL: Duration = Duration::from_secs(5 * 60);

/// The credentials one pull attempt uses: `candidates` holds each wanting
/// cache's credentials for the image's registry in the planner's order
/// (`None`: that cache has none). Distinct credentials come first, anonymous
/// last; `attempt` (failed attempts so far) moves on to the next, so one
/// tenant's missing or wrong Secret cannot keep the pull failing.
pub fn pick_credentials<C: PartialEq + Clone>(candidates: &[Option<C>], attempt: u32) -> Option<C> {
    let mut distinct: Vec<Option<C>> = Vec::new();
    for c in candidates.iter().filter(|c| c.is_some()) {
        if !distinct.contains(c) {
            distinct.push(c.clone());
        }
    }
    if candidates.iter().any(Option::is_none) || distinct.is_empty() {
        distinct.push(None);
    }
    distinct[attempt as usize % distinct.len()].clone()
}

/// A fingerprint of credentials (`None`: anonymous), to key verdicts without
/// keeping secrets in the key.
pub fn fingerprint(auth: Option<&RegistryAuth>) -> u64 {
    let mut h = DefaultHasher::new();
    auth.map(|a| (&a.username, &a.password)).hash(&mut h);
    h.finish()
}

/// The (cache, image) pairs whose readiness needs the cache's own credentials
/// checked: `uses` lists (cache, image reference, credentials fingerprint) for
/// every image of every live cache; an image wanted with more than one set of
/// credentials (anonymous counting as one) is checked for each wanting cache.
pub fn needing_check(uses: &[(String, String, u64)]) -> BTreeSet<(String, String)> {
    let mut by_image: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
    for (_, image, f) in uses {
        by_image.entry(image).or_default().insert(*f);
    }
    uses.iter()
        .filter(|(_, image, _)| by_image[image.as_str()].len() > 1)
        .map(|(cache, image, _)| (cache.clone(), image.clone()))
        .collect()
}

/// What the registry said of a cache's credentials for one repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It served the manifest (or could not be asked: an unreachable registry
    /// does not fail a cache whose nodes hold the image).
    Allowed,
    /// It refused them; the registry's words.
    Denied(String),
}

type Key = (String, String, u64);

#[derive(Default)]
struct Entry {
    verdict: Option<Verdict>,
    checked: Option<Instant>,
    in_flight: bool,
}

/// Verdicts on caches' credentials, asked in the background and kept for
/// [`ACCESS_TTL`].
pub struct AccessChecker<R> {
    registry: Arc<R>,
    entries: Arc<Mutex<HashMap<Key, Entry>>>,
    wake: Arc<Notify>,
    ttl: Duration,
}

impl<R: Registry> AccessChecker<R> {
    /// Asks `registry`; each new verdict wakes `wake`.
    pub fn new(registry: R, wake: Arc<Notify>) -> Self {
        Self::with_ttl(registry, wake, ACCESS_TTL)
    }

    /// As [`AccessChecker::new`], keeping verdicts for `ttl`.
    pub fn with_ttl(registry: R, wake: Arc<Notify>, ttl: Duration) -> Self {
        AccessChecker {
            registry: Arc::new(registry),
            entries: Arc::default(),
            wake,
            ttl,
        }
    }

    /// The last verdict on `cache` reading `reference` with `auth` (`None`
    /// until the first answer); asks again in the background once it is older
    /// than the TTL. New credentials (a changed Secret) are a new question.
    pub fn verdict(
        &self,
        cache: &str,
        reference: &str,
        auth: Option<RegistryAuth>,
    ) -> Option<Verdict> {
        let repository = Reference::parse(reference)
            .map(|r| r.repository())
            .unwrap_or_else(|_| reference.to_string());
        let key = (cache.to_string(), repository, fingerprint(auth.as_ref()));
        let mut entries = self.entries.lock().unwrap();
        let e = entries.entry(key.clone()).or_default();
        let due = e.checked.is_none_or(|t| t.elapsed() >= self.ttl);
        if due && !e.in_flight {
            e.in_flight = true;
            let (registry, entries, wake) = (
                self.registry.clone(),
                self.entries.clone(),
                self.wake.clone(),
            );
            let reference = reference.to_string();
            tokio::spawn(async move {
                let answer = registry.resolve(&reference, auth).await;
                let mut entries = entries.lock().unwrap();
                let e = entries.entry(key.clone()).or_default();
                e.in_flight = false;
                e.checked = Some(Instant::now());
                let verdict = match answer {
                    Ok(_) => Verdict::Allowed,
                    Err(RegistryError::Denied(why)) => Verdict::Denied(why),
                    Err(RegistryError::Failed(why)) => {
                        warn!(cache = %key.0, "{why}; cannot check the cache's credentials");
                        e.verdict.clone().unwrap_or(Verdict::Allowed)
                    }
                };
                if e.verdict.as_ref() != Some(&verdict) {
                    debug!(cache = %key.0, reference = %reference, ?verdict, "credentials checked");
                    e.verdict = Some(verdict);
                    wake.notify_one();
                }
            });
        }
        e.verdict.clone()
    }
}

#[cfg(test)]
mod tests;
