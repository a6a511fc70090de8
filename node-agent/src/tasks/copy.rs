//! The copy task: one image from one registry to another, registry to
//! registry, byte for byte.
//!
//! The top manifest is read as the source serves it; an index brings every
//! platform's manifest along. Each manifest is pushed with the very bytes it
//! was read with, so every digest the source had, the target has. Blobs go
//! first (each at most once, [`BLOBS_AT_ONCE`] at a time), then the
//! platforms' manifests by digest, then the top manifest under the target's
//! tag (or digest). A blob the target already holds is skipped; one an
//! earlier copy left in another repository of the target is mounted from
//! there; the rest stream from source to target without touching the disk.
//!
//! The two registries get two clients: each sees only its own credentials.
//! Every failure says which side failed and why ([`CopyError`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use berth_proto::agent as pb;
use berth_proto::oci::{client, not_found, oci_reference, refused};
use berth_proto::reference::Reference;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use tracing::{Instrument, Span, info};

use super::{TaskRunner, failed, update};
use crate::runtime::ImageRuntime;

/// Blobs of one copy in flight at once.
pub const BLOBS_AT_ONCE: usize = 4;
/// How often a running copy reports its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Deadline of a copy whose task names none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
const MANIFEST_TYPES: [&str; 2] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// Why a copy failed, by side.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The source refused the credentials.
    #[error("source registry refused the credentials: {0}")]
    SourceAuth(String),
    /// The source has no such manifest or blob.
    #[error("not found in the source registry: {0}")]
    NotFound(String),
    /// The source could not be read.
    #[error("source registry: {0}")]
    Source(String),
    /// The target refused the credentials.
    #[error("target registry refused the credentials: {0}")]
    TargetAuth(String),
    /// The target could not be written.
    #[error("target registry: {0}")]
    Target(String),
    /// The source served something that is not an image.
    #[error("{0}")]
    Malformed(String),
}

impl CopyError {
    fn source(what: &str, e: OciDistributionError) -> Self {
        let m = format!("{what}: {e}");
        if refused(&e) {
            CopyError::SourceAuth(m)
        } else if not_found(&e) {
            CopyError::NotFound(m)
        } else {
            CopyError::Source(m)
        }
    }

    fn target(what: &str, e: OciDistributionError) -> Self {
        let m = format!("{what}: {e}");
        if refused(&e) {
            CopyError::TargetAuth(m)
        } else {
            CopyError::Target(m)
        }
    }

    /// The reason the agent reports.
    pub fn reason(&self) -> pb::FailureReason {
        use pb::FailureReason as F;
        match self {
            CopyError::SourceAuth(_) => F::SourceAuthFailed,
            CopyError::NotFound(_) => F::ImageNotFound,
            CopyError::Source(_) => F::RegistryUnreachable,
            CopyError::TargetAuth(_) => F::TargetAuthFailed,
            CopyError::Target(_) => F::TargetFailed,
            CopyError::Malformed(_) => F::BadReference,
        }
    }
}

/// One copy's counters, read by the progress reports.
#[derive(Debug, Default)]
pub struct Progress {
    copied: AtomicU64,
    skipped: AtomicU64,
    total: AtomicU64,
    blobs_copied: AtomicU32,
    blobs_skipped: AtomicU32,
    blobs_mounted: AtomicU32,
}

impl Progress {
    /// The counters as the protocol carries them.
    pub fn snapshot(&self) -> pb::CopyProgress {
        pb::CopyProgress {
            bytes_copied: self.copied.load(Ordering::Relaxed),
            bytes_skipped: self.skipped.load(Ordering::Relaxed),
            bytes_total: self.total.load(Ordering::Relaxed),
            blobs_copied: self.blobs_copied.load(Ordering::Relaxed),
            blobs_skipped: self.blobs_skipped.load(Ordering::Relaxed),
            blobs_mounted: self.blobs_mounted.load(Ordering::Relaxed),
            ..Default::default()
        }
    }
}

/// A blob a manifest names.
#[derive(Debug, Clone, PartialEq)]
struct Blob {
    digest: String,
    size: u64,
    media_type: String,
}

impl Blob {
    fn descriptor(&self) -> OciDescriptor {
        OciDescriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.size as i64,
            ..Default::default()
        }
    }
}

/// A manifest as the source served it.
#[derive(Debug, Clone)]
struct Manifest {
    raw: Bytes,
    digest: String,
    media_type: String,
}

/// What a manifest's bytes say.
#[derive(Debug, PartialEq)]
enum Parsed {
    /// An index: each platform's manifest (digest, platform).
    Index(Vec<(String, Option<String>)>),
    /// One image: its config, then its layers.
    Image(Vec<Blob>),
}

fn descriptor(v: &serde_json::Value) -> Result<Blob, CopyError> {
    let digest = v["digest"].as_str().unwrap_or_default();
    if !digest.starts_with("sha256:") && !digest.starts_with("sha512:") {
        return Err(CopyError::Malformed(format!(
            "a descriptor without a digest: {v}"
        )));
    }
    Ok(Blob {
        digest: digest.to_string(),
        size: v["size"].as_u64().unwrap_or(0),
        media_type: v["mediaType"].as_str().unwrap_or_default().to_string(),
    })
}

/// The media type of `raw`: its own `mediaType`, else the shape of its JSON
/// (OCI allows leaving it out).
fn parse(raw: &[u8]) -> Result<(String, Parsed), CopyError> {
    let v: serde_json::Value = serde_json::from_slice(raw)
        .map_err(|e| CopyError::Malformed(format!("the manifest is not JSON: {e}")))?;
    let declared = v["mediaType"].as_str().map(str::to_string);
    if let Some(list) = v["manifests"].as_array() {
        let mut children = Vec::with_capacity(list.len());
        for m in list {
            let platform = m.get("platform").map(|p| {
                let mut s = format!(
                    "{}/{}",
                    p["os"].as_str().unwrap_or("?"),
                    p["architecture"].as_str().unwrap_or("?")
                );
                if let Some(variant) = p["variant"].as_str() {
                    s = format!("{s}/{variant}");
                }
                s
            });
            children.push((descriptor(m)?.digest, platform));
        }
        let t = declared.unwrap_or_else(|| INDEX_TYPES[0].to_string());
        return Ok((t, Parsed::Index(children)));
    }
    let (Some(config), Some(layers)) = (v.get("config"), v["layers"].as_array()) else {
        return Err(CopyError::Malformed(
            "the manifest is neither an index nor an image manifest".into(),
        ));
    };
    let mut blobs = vec![descriptor(config)?];
    for l in layers {
        blobs.push(descriptor(l)?);
    }
    let t = declared.unwrap_or_else(|| MANIFEST_TYPES[0].to_string());
    Ok((t, Parsed::Image(blobs)))
}

/// One copy: the two clients and what they need.
struct Copier {
    src: oci_client::Client,
    dst: oci_client::Client,
    src_ref: oci_client::Reference,
    dst_ref: oci_client::Reference,
    src_auth: RegistryAuth,
    mount_from: Vec<String>,
    progress: Arc<Progress>,
}

fn auth_of(c: Option<&pb::RegistryCredentials>) -> RegistryAuth {
    match c {
        Some(c) if !c.username.is_empty() => {
            RegistryAuth::Basic(c.username.clone(), c.password.clone())
        }
        _ => RegistryAuth::Anonymous,
    }
}

impl Copier {
    async fn manifest(&self, r: &oci_client::Reference) -> Result<Manifest, CopyError> {
        let accept: Vec<&str> = INDEX_TYPES.iter().chain(&MANIFEST_TYPES).copied().collect();
        let (raw, digest) = self
            .src
            .pull_manifest_raw(r, &self.src_auth, &accept)
            .await
            .map_err(|e| CopyError::source(&format!("reading the manifest of {r}"), e))?;
        let (media_type, _) = parse(&raw)?;
        Ok(Manifest {
            raw,
            digest,
            media_type,
        })
    }

    fn dst_at(&self, digest: &str) -> oci_client::Reference {
        oci_client::Reference::with_digest(
            self.dst_ref.registry().to_string(),
            self.dst_ref.repository().to_string(),
            digest.to_string(),
        )
    }

    fn src_at(&self, digest: &str) -> oci_client::Reference {
        oci_client::Reference::with_digest(
            self.src_ref.registry().to_string(),
            self.src_ref.repository().to_string(),
            digest.to_string(),
        )
    }

    /// Puts one blob in the target: skipped if there, mounted if an earlier
    /// copy's repository has it, else streamed from the source.
    async fn blob(&self, b: Blob) -> Result<(), CopyError> {
        let p = &self.progress;
        let there = self
            .dst
            .blob_exists(&self.dst_ref, &b.digest)
            .await
            .map_err(|e| CopyError::target(&format!("checking blob {}", b.digest), e))?;
        if there {
            p.skipped.fetch_add(b.size, Ordering::Relaxed);
            p.blobs_skipped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        for repo in &self.mount_from {
            let from = oci_client::Reference::with_tag(
                self.dst_ref.registry().to_string(),
                repo.clone(),
                "latest".into(),
            );
            if self
                .dst
                .mount_blob(&self.dst_ref, &from, &b.digest)
                .await
                .is_ok()
            {
                p.skipped.fetch_add(b.size, Ordering::Relaxed);
                p.blobs_mounted.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }
        let stream = self
            .src
            .pull_blob_stream(&self.src_ref, &b.descriptor())
            .await
            .map_err(|e| CopyError::source(&format!("reading blob {}", b.digest), e))?;
        let counter = self.progress.clone();
        let body = stream
            .inspect_ok(move |chunk: &Bytes| {
                counter
                    .copied
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            })
            .map_err(|e| OciDistributionError::GenericError(Some(format!("source stream: {e}"))));
        self.dst
            .push_blob_stream(&self.dst_ref, body, &b.digest, Some(b.size))
            .await
            .map_err(|e| CopyError::target(&format!("writing blob {}", b.digest), e))?;
        p.blobs_copied.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn push_manifest(
        &self,
        at: &oci_client::Reference,
        m: &Manifest,
    ) -> Result<(), CopyError> {
        let content_type = m
            .media_type
            .parse()
            .map_err(|_| CopyError::Malformed(format!("media type {:?}", m.media_type)))?;
        self.dst
            .push_manifest_raw(at, m.raw.clone(), content_type)
            .await
            .map_err(|e| CopyError::target(&format!("writing manifest {}", m.digest), e))?;
        Ok(())
    }

    /// The whole copy; the result's `digest` and `platforms` say what went.
    async fn run(&self) -> Result<pb::CopyProgress, CopyError> {
        let top = self.manifest(&self.src_ref).await?;
        let mut platforms = Vec::new();
        let mut children = Vec::new();
        let mut blobs: Vec<Blob> = Vec::new();
        match parse(&top.raw)?.1 {
            Parsed::Image(b) => blobs = b,
            Parsed::Index(list) => {
                for (digest, platform) in list {
                    let child = self.manifest(&self.src_at(&digest)).await?;
                    if child.digest != digest {
                        return Err(CopyError::Malformed(format!(
                            "the source served {} for {digest}",
                            child.digest
                        )));
                    }
                    match parse(&child.raw)?.1 {
                        Parsed::Image(b) => blobs.extend(b),
                        Parsed::Index(_) => {
                            return Err(CopyError::Malformed(format!(
                                "nested index {digest} (not supported)"
                            )));
                        }
                    }
                    platforms.extend(platform);
                    children.push(child);
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        blobs.retain(|b| seen.insert(b.digest.clone()));
        self.progress
            .total
            .store(blobs.iter().map(|b| b.size).sum(), Ordering::Relaxed);
        info!(
            manifests = children.len() + 1,
            blobs = blobs.len(),
            "copying"
        );
        futures::stream::iter(blobs.into_iter().map(|b| self.blob(b)))
            .buffer_unordered(BLOBS_AT_ONCE)
            .try_collect::<Vec<()>>()
            .await?;
        for child in &children {
            self.push_manifest(&self.dst_at(&child.digest), child)
                .await?;
        }
        self.push_manifest(&self.dst_ref, &top).await?;
        Ok(pb::CopyProgress {
            digest: top.digest,
            platforms,
            ..self.progress.snapshot()
        })
    }
}

/// Copies `task.source` to `task.target`, counting into `progress`.
pub async fn copy(
    task: &pb::CopyTask,
    progress: Arc<Progress>,
) -> Result<pb::CopyProgress, CopyError> {
    let parse = |r: &str| {
        Reference::parse(r).map_err(|e| CopyError::Malformed(format!("reference {r:?}: {e}")))
    };
    let (source, target) = (parse(&task.source)?, parse(&task.target)?);
    if target.digest.is_some() && target.digest != source.digest {
        return Err(CopyError::Malformed(format!(
            "target {} names a digest the source reference does not",
            task.target
        )));
    }
    let copier = Copier {
        src: client(&task.plain_http_registries),
        dst: client(&task.plain_http_registries),
        src_ref: oci_reference(&source),
        dst_ref: oci_reference(&target),
        src_auth: auth_of(task.source_credentials.as_ref()),
        mount_from: task.mount_from.clone(),
        progress,
    };
    // The target's credentials are stored with the target's client only.
    copier
        .dst
        .store_auth_if_needed(
            copier.dst_ref.resolve_registry(),
            &auth_of(task.target_credentials.as_ref()),
        )
        .await;
    copier.run().await
}

impl<R: ImageRuntime> TaskRunner<R> {
    /// Runs a copy under the copy bound and its deadline, reporting progress
    /// every [`PROGRESS_EVERY`] until it ends.
    pub(super) fn copy(&self, task_id: String, task: pb::CopyTask, span: Span) {
        let this = self.clone();
        tokio::spawn(
            async move {
                let start = Instant::now();
                this.send(update(&task_id, pb::TaskState::Accepted));
                let _permit = this.copies.clone().acquire_owned().await;
                let progress = Arc::new(Progress::default());
                let timeout = match task.timeout_seconds {
                    0 => DEFAULT_TIMEOUT,
                    s => Duration::from_secs(s.into()),
                };
                let work = tokio::time::timeout(timeout, copy(&task, progress.clone()));
                tokio::pin!(work);
                let mut tick = tokio::time::interval(PROGRESS_EVERY);
                tick.tick().await;
                let result = loop {
                    tokio::select! {
                        r = &mut work => break r,
                        _ = tick.tick() => this.send(pb::TaskUpdate {
                            copy: Some(progress.snapshot()),
                            ..update(&task_id, pb::TaskState::Accepted)
                        }),
                    }
                };
                let u = match result {
                    Ok(Ok(done)) => {
                        info!(
                            copied = done.bytes_copied,
                            skipped = done.bytes_skipped,
                            digest = %done.digest,
                            "copied"
                        );
                        pb::TaskUpdate {
                            copy: Some(done),
                            elapsed_ms: start.elapsed().as_millis() as u64,
                            ..update(&task_id, pb::TaskState::Done)
                        }
                    }
                    Ok(Err(e)) => {
                        info!(error = %e, "copy failed");
                        pb::TaskUpdate {
                            copy: Some(progress.snapshot()),
                            ..failed(&task_id, e.reason(), e.to_string(), start)
                        }
                    }
                    Err(_) => failed(
                        &task_id,
                        pb::FailureReason::PullTimeout,
                        format!(
                            "the copy did not finish within {}",
                            humantime::format_duration(timeout)
                        ),
                        start,
                    ),
                };
                this.send(u);
            }
            .instrument(span),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_lists_its_platforms() {
        let raw = br#"{"schemaVersion":2,"manifests":[
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:aa","size":1,
             "platform":{"os":"linux","architecture":"amd64"}},
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:bb","size":1,
             "platform":{"os":"linux","architecture":"arm64","variant":"v8"}}]}"#;
        let (t, p) = parse(raw).unwrap();
        assert_eq!(t, INDEX_TYPES[0]);
        assert_eq!(
            p,
            Parsed::Index(vec![
                ("sha256:aa".into(), Some("linux/amd64".into())),
                ("sha256:bb".into(), Some("linux/arm64/v8".into())),
            ])
        );
    }

    #[test]
    fn an_image_manifest_lists_config_then_layers_and_keeps_its_declared_type() {
        let raw = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
            "config":{"mediaType":"c","digest":"sha256:c0","size":7},
            "layers":[{"mediaType":"l","digest":"sha256:l1","size":100}]}"#;
        let (t, p) = parse(raw).unwrap();
        assert_eq!(t, MANIFEST_TYPES[1]);
        let Parsed::Image(b) = p else { panic!() };
        assert_eq!(
            b.iter()
                .map(|b| (b.digest.as_str(), b.size))
                .collect::<Vec<_>>(),
            [("sha256:c0", 7), ("sha256:l1", 100)]
        );
    }

    #[test]
    fn what_is_not_an_image_is_refused_with_a_reason() {
        for raw in [
            &b"not json"[..],
            br#"{"config":{}}"#,
            br#"{"layers":[]}"#,
            br#"{"manifests":[{"size":1}]}"#,
        ] {
            let e = parse(raw).unwrap_err();
            assert!(matches!(e, CopyError::Malformed(_)), "{e}");
        }
    }
}
