//! `updatePolicy: TrackTag`: which digest each tracked tag points to now.
//!
//! [`Registry`] resolves a tag to a manifest digest (one real implementation
//! over the OCI distribution API, one in-memory fake for tests); it also
//! tells whether given credentials may read an image
//! ([`super::access`]), since an authenticated manifest HEAD is the same call.
//! [`TagTracker`] re-resolves each tracked reference once per its interval, in
//! the background, and keeps the last good answer, so every node converges on
//! one digest and a registry hiccup changes nothing on the nodes.
//!
//! References are read with Berth's own grammar ([`Reference`]);
//! `oci-client` is only the transport, and gets its reference built from
//! ours by [`oci_reference`], never by parsing the string again.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_proto::docker_config::RegistryAuth;
use berth_proto::oci::{oci_reference, refused};
use berth_proto::reference::Reference;
use tokio::sync::Notify;
use tracing::{debug, warn};

/// Why a registry gave no digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The registry refused the credentials (or their absence).
    #[error("{0}")]
    Denied(String),
    /// Anything else: unreachable, unknown manifest, bad answer.
    #[error("{0}")]
    Failed(String),
}

/// Resolves tags to digests.
pub trait Registry: Send + Sync + 'static {
    /// The digest (`sha256:…`) `reference` points to now, read with `auth`
    /// (anonymously if `None`).
    fn resolve(
        &self,
        reference: &str,
        auth: Option<RegistryAuth>,
    ) -> impl Future<Output = Result<String, RegistryError>> + Send;

    /// The total size, in bytes, of the layers of the image `reference` names
    /// (for this platform, compressed as the registry stores them).
    fn layers_size(
        &self,
        reference: &str,
        auth: Option<RegistryAuth>,
    ) -> impl Future<Output = Result<u64, RegistryError>> + Send;
}

/// The OCI distribution API, through `oci-client`.
pub struct OciRegistry {
    insecure: Vec<String>,
}

impl OciRegistry {
    /// Speaks plain HTTP to the `insecure` registries (`host:port`) and HTTPS
    /// to every other.
    pub fn new(insecure: Vec<String>) -> Self {
        OciRegistry { insecure }
    }
}

impl OciRegistry {
    /// A client, the reference in its terms and the credentials for one call.
    /// A client per call: oci-client keeps one login per registry, and one
    /// tenant's token must never answer for another tenant's credentials.
    fn call(
        &self,
        reference: &str,
        auth: Option<RegistryAuth>,
    ) -> Result<
        (
            oci_client::Client,
            oci_client::Reference,
            oci_client::secrets::RegistryAuth,
        ),
        RegistryError,
    > {
        let r = oci_reference(
            &Reference::parse(reference).map_err(|e| RegistryError::Failed(e.to_string()))?,
        );
        let auth = match auth {
            Some(a) => oci_client::secrets::RegistryAuth::Basic(a.username, a.password),
            None => oci_client::secrets::RegistryAuth::Anonymous,
        };
        let config = oci_client::client::ClientConfig {
            protocol: oci_client::client::ClientProtocol::HttpsExcept(self.insecure.clone()),
            ..Default::default()
        };
        Ok((oci_client::Client::new(config), r, auth))
    }
}

/// A registry's error as Berth tells it: refused credentials apart.
fn registry_error(what: String, e: oci_client::errors::OciDistributionError) -> RegistryError {
    let message = format!("{what}: {e}");
    if refused(&e) {
        RegistryError::Denied(message)
    } else {
        RegistryError::Failed(message)
    }
}

/// An image's manifest and configuration as its registry serves them.
#[derive(Debug, Clone)]
pub struct ImageConfig {
    /// `sha256:…` of the manifest.
    pub manifest_digest: String,
    /// `sha256:…` of the configuration blob: Docker's image ID.
    pub config_digest: String,
    /// The configuration, as JSON.
    pub config: serde_json::Value,
    /// Total of the layer sizes.
    pub size: u64,
}

impl OciRegistry {
    /// Reads the manifest (for this platform, from an index) and the
    /// configuration of `reference`, anonymously.
    pub async fn image_config(&self, reference: &str) -> Result<ImageConfig, RegistryError> {
        let (client, r, auth) = self.call(reference, None)?;
        let (manifest, manifest_digest, config) = client
            .pull_manifest_and_config(&r, &auth)
            .await
            .map_err(|e| registry_error(format!("cannot read {reference}"), e))?;
        let config: serde_json::Value = serde_json::from_str(&config).map_err(|e| {
            RegistryError::Failed(format!("the configuration of {reference} is not JSON: {e}"))
        })?;
        Ok(ImageConfig {
            manifest_digest,
            config_digest: manifest.config.digest.clone(),
            config,
            size: manifest
                .layers
                .iter()
                .map(|l| u64::try_from(l.size).unwrap_or_default())
                .sum(),
        })
    }
}

impl Registry for OciRegistry {
    async fn resolve(
        &self,
        reference: &str,
        auth: Option<RegistryAuth>,
    ) -> Result<String, RegistryError> {
        let (client, r, auth) = self.call(reference, auth)?;
        client
            .fetch_manifest_digest(&r, &auth)
            .await
            .map_err(|e| registry_error(format!("cannot resolve {reference}"), e))
    }

    async fn layers_size(
        &self,
        reference: &str,
        auth: Option<RegistryAuth>,
    ) -> Result<u64, RegistryError> {
        let (client, r, auth) = self.call(reference, auth)?;
        let (manifest, _) = client
            .pull_image_manifest(&r, &auth)
            .await
            .map_err(|e| registry_error(format!("cannot read the manifest of {reference}"), e))?;
        Ok(manifest
            .layers
            .iter()
            .map(|l| u64::try_from(l.size).unwrap_or_default())
            .sum())
    }
}

/// An in-memory registry: reference → digest, with private repositories.
#[derive(Default, Clone)]
pub struct MemRegistry {
    /// What each tag points to.
    pub tags: Arc<Mutex<HashMap<String, String>>>,
    /// Repositories readable only with these credentials.
    pub private: Arc<Mutex<HashMap<String, RegistryAuth>>>,
    /// Calls so far.
    pub calls: Arc<std::sync::atomic::AtomicUsize>,
    /// Layer totals by reference.
    pub sizes: Arc<Mutex<HashMap<String, u64>>>,
}

impl Registry for MemRegistry {
    async fn resolve(
        &self,
        reference: &str,
        auth: Option<RegistryAuth>,
    ) -> Result<String, RegistryError> {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let repository = berth_proto::reference::Reference::parse(reference)
            .map(|r| r.repository())
            .unwrap_or_default();
        if let Some(needed) = self.private.lock().unwrap().get(&repository)
            && auth.as_ref() != Some(needed)
        {
            return Err(RegistryError::Denied(format!(
                "{reference}: 401 Unauthorized"
            )));
        }
        self.tags
            .lock()
            .unwrap()
            .get(reference)
            .cloned()
            .ok_or_else(|| RegistryError::Failed(format!("{reference}: manifest unknown")))
    }

    async fn layers_size(
        &self,
        reference: &str,
        _auth: Option<RegistryAuth>,
    ) -> Result<u64, RegistryError> {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.sizes
            .lock()
            .unwrap()
            .get(reference)
            .copied()
            .ok_or_else(|| RegistryError::Failed(format!("{reference}: manifest unknown")))
    }
}

#[derive(Default)]
struct Entry {
    digest: Option<String>,
    checked: Option<Instant>,
    in_flight: bool,
}

/// The last known digest of every tracked reference.
pub struct TagTracker<R> {
    registry: Arc<R>,
    entries: Arc<Mutex<HashMap<String, Entry>>>,
    wake: Arc<Notify>,
}

impl<R: Registry> TagTracker<R> {
    /// Resolves through `registry`; each new answer wakes `wake`.
    pub fn new(registry: R, wake: Arc<Notify>) -> Self {
        TagTracker {
            registry: Arc::new(registry),
            entries: Arc::default(),
            wake,
        }
    }

    /// The digest `reference` points to as last seen (`None` until first
    /// resolved); starts a resolution in the background when `interval` has
    /// passed since the last one.
    pub fn digest(
        &self,
        reference: &str,
        interval: Duration,
        auth: Option<RegistryAuth>,
    ) -> Option<String> {
        let mut entries = self.entries.lock().unwrap();
        let e = entries.entry(reference.to_string()).or_default();
        let due = e.checked.is_none_or(|t| t.elapsed() >= interval);
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
                let e = entries.entry(reference.clone()).or_default();
                e.in_flight = false;
                e.checked = Some(Instant::now());
                match answer {
                    Ok(d) if e.digest.as_deref() != Some(d.as_str()) => {
                        debug!(reference = %reference, digest = %d, "tag resolved");
                        e.digest = Some(d);
                        wake.notify_one();
                    }
                    Ok(_) => {}
                    Err(why) => warn!(reference = %reference, "{why}; keeping the last digest"),
                }
            });
        }
        e.digest.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_client_gets_every_valid_example_as_our_parser_reads_it() {
        for e in berth_proto::reference::examples() {
            let Ok(normal) = e.expected else { continue };
            let ours = Reference::parse(&e.input).unwrap();
            let theirs = oci_reference(&ours);
            assert_eq!(
                (theirs.registry(), theirs.repository()),
                (ours.domain.as_str(), ours.path.as_str()),
                "{:?}",
                e.input
            );
            assert_eq!(theirs.tag(), ours.tag.as_deref(), "{:?}", e.input);
            assert_eq!(theirs.digest(), ours.digest.as_deref(), "{:?}", e.input);
            assert_eq!(theirs.whole(), normal, "{:?}", e.input);
        }
    }

    #[test]
    fn oci_client_reads_our_normal_form_back_the_same_way_but_for_ipv6_hosts() {
        for e in berth_proto::reference::examples() {
            let Ok(normal) = e.expected else { continue };
            if normal.starts_with('[') {
                // oci-client's parser knows no IPv6 hosts: the reason
                // `oci_reference` builds its reference instead of parsing.
                assert!(normal.parse::<oci_client::Reference>().is_err());
                continue;
            }
            let reparsed: oci_client::Reference = normal.parse().unwrap_or_else(|err| {
                panic!("oci-client refuses our normal form {normal:?}: {err}")
            });
            assert_eq!(
                reparsed,
                oci_reference(&Reference::parse(&e.input).unwrap()),
                "{:?}",
                e.input
            );
        }
    }

    /// Waits, with a deadline, for the tracker to wake its loop.
    async fn woken(wake: &Notify) {
        tokio::time::timeout(Duration::from_secs(5), wake.notified())
            .await
            .expect("the tracker never woke the loop");
    }

    /// Waits, with a deadline, until no resolution of `r` is under way.
    async fn settled(t: &TagTracker<MemRegistry>, r: &str) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while t.entries.lock().unwrap().get(r).is_none_or(|e| e.in_flight) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the resolution never finished");
    }

    #[tokio::test]
    async fn a_moved_tag_is_seen_after_the_interval_and_outages_keep_the_last_digest() {
        let reg = MemRegistry::default();
        reg.tags
            .lock()
            .unwrap()
            .insert("r.io/a:1".into(), "sha256:aa".into());
        let wake = Arc::new(Notify::new());
        let t = TagTracker::new(reg.clone(), wake.clone());
        let every = Duration::from_millis(50);
        assert_eq!(
            t.digest("r.io/a:1", every, None),
            None,
            "first answer comes in the background"
        );
        woken(&wake).await;
        assert_eq!(
            t.digest("r.io/a:1", every, None).as_deref(),
            Some("sha256:aa")
        );

        reg.tags
            .lock()
            .unwrap()
            .insert("r.io/a:1".into(), "sha256:bb".into());
        let calls = reg.calls.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            t.digest("r.io/a:1", every, None).as_deref(),
            Some("sha256:aa"),
            "not yet due"
        );
        assert_eq!(
            reg.calls.load(std::sync::atomic::Ordering::Relaxed),
            calls,
            "no lookup before the interval"
        );
        // The interval passing is the precondition, not the verdict.
        tokio::time::sleep(every).await;
        t.digest("r.io/a:1", every, None);
        woken(&wake).await;
        assert_eq!(
            t.digest("r.io/a:1", every, None).as_deref(),
            Some("sha256:bb")
        );

        // The registry loses the tag: once that lookup has finished (and
        // failed), the last digest is still the answer.
        reg.tags.lock().unwrap().clear();
        tokio::time::sleep(every).await;
        let calls = reg.calls.load(std::sync::atomic::Ordering::Relaxed);
        t.digest("r.io/a:1", every, None);
        settled(&t, "r.io/a:1").await;
        assert_eq!(
            reg.calls.load(std::sync::atomic::Ordering::Relaxed),
            calls + 1,
            "the failing lookup ran"
        );
        assert_eq!(
            t.digest("r.io/a:1", every, None).as_deref(),
            Some("sha256:bb")
        );
    }
}
