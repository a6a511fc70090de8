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
//!
//! With `from_runtime`, the source is the node's own containerd instead of
//! the registry (which may be gone): the image's record in the CRI's
//! namespace names the top manifest, and its blobs are read from the content
//! store. A node holds only its own platform of an index, so then that
//! platform's manifest alone is pushed, and the result says so.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use berth_proto::agent as pb;
use berth_proto::containerd::services::content::v1 as content;
use berth_proto::containerd::services::images::v1 as images;
use berth_proto::oci::{client, not_found, oci_reference, refused};
use berth_proto::reference::Reference;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use tonic::transport::Channel;
use tracing::{Instrument, Span, info};

use super::{TaskRunner, failed, update};
use crate::debloat::build::digest_of;
use crate::debloat::store::request;
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

/// Where a copy reads from.
enum Source {
    /// The source registry.
    Registry {
        client: oci_client::Client,
        reference: oci_client::Reference,
        auth: RegistryAuth,
    },
    /// The node's containerd (its content and image services).
    Runtime {
        content: content::content_client::ContentClient<Channel>,
        images: images::images_client::ImagesClient<Channel>,
        name: String,
    },
}

fn runtime_error(what: &str, s: tonic::Status) -> CopyError {
    match s.code() {
        tonic::Code::NotFound => CopyError::NotFound(format!("{what}: not on this node")),
        tonic::Code::Unimplemented => CopyError::Source(format!(
            "{what}: the runtime does not serve containerd's content API (CRI-O?)"
        )),
        _ => CopyError::Source(format!("{what}: {}", s.message())),
    }
}

impl Source {
    fn is_runtime(&self) -> bool {
        matches!(self, Source::Runtime { .. })
    }

    /// All of one object's bytes.
    async fn read_all(&self, digest: &str) -> Result<Bytes, CopyError> {
        let mut stream = self.read(digest).await?;
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(
                &chunk.map_err(|e| CopyError::Source(format!("reading {digest}: {e}")))?,
            );
        }
        Ok(out.into())
    }

    /// A runtime object's bytes as a stream.
    async fn read(
        &self,
        digest: &str,
    ) -> Result<BoxStream<'static, Result<Bytes, OciDistributionError>>, CopyError> {
        let Source::Runtime { content, .. } = self else {
            unreachable!("read is for the runtime source");
        };
        let stream = content
            .clone()
            .read(request(content::ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            }))
            .await
            .map_err(|s| runtime_error(&format!("reading {digest}"), s))?
            .into_inner();
        Ok(stream
            .map_ok(|r| Bytes::from(r.data))
            .map_err(|s| OciDistributionError::GenericError(Some(format!("runtime read: {s}"))))
            .boxed())
    }

    /// The manifest (or index) the source reference names.
    async fn top(&self) -> Result<Manifest, CopyError> {
        match self {
            Source::Registry { reference, .. } => self.registry_manifest(reference).await,
            Source::Runtime { images, name, .. } => {
                let image = images
                    .clone()
                    .get(request(images::GetImageRequest { name: name.clone() }))
                    .await
                    .map_err(|s| runtime_error(&format!("image {name}"), s))?
                    .into_inner()
                    .image
                    .and_then(|i| i.target)
                    .ok_or_else(|| CopyError::NotFound(format!("image {name} has no target")))?;
                let m = self.manifest(&image.digest).await?;
                m.ok_or_else(|| {
                    CopyError::NotFound(format!(
                        "{name}: manifest {} not on this node",
                        image.digest
                    ))
                })
            }
        }
    }

    /// The manifest `digest` in the source's repository; `None` when the
    /// node does not hold it (another platform's).
    async fn manifest(&self, digest: &str) -> Result<Option<Manifest>, CopyError> {
        match self {
            Source::Registry { reference, .. } => {
                let at = oci_client::Reference::with_digest(
                    reference.registry().to_string(),
                    reference.repository().to_string(),
                    digest.to_string(),
                );
                let m = self.registry_manifest(&at).await?;
                if m.digest != digest {
                    return Err(CopyError::Malformed(format!(
                        "the source served {} for {digest}",
                        m.digest
                    )));
                }
                Ok(Some(m))
            }
            Source::Runtime { content, .. } => {
                match content
                    .clone()
                    .info(request(content::InfoRequest {
                        digest: digest.to_string(),
                    }))
                    .await
                {
                    Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
                    Err(s) => return Err(runtime_error(&format!("manifest {digest}"), s)),
                    Ok(_) => {}
                }
                let raw = self.read_all(digest).await?;
                let got = digest_of(&raw);
                if got != digest {
                    return Err(CopyError::Malformed(format!(
                        "the node's content store holds {got} under {digest}"
                    )));
                }
                let (media_type, _) = parse(&raw)?;
                Ok(Some(Manifest {
                    raw,
                    digest: digest.to_string(),
                    media_type,
                }))
            }
        }
    }

    async fn registry_manifest(&self, r: &oci_client::Reference) -> Result<Manifest, CopyError> {
        let Source::Registry { client, auth, .. } = self else {
            unreachable!("registry_manifest is for the registry source");
        };
        let accept: Vec<&str> = INDEX_TYPES.iter().chain(&MANIFEST_TYPES).copied().collect();
        let (raw, digest) = client
            .pull_manifest_raw(r, auth, &accept)
            .await
            .map_err(|e| CopyError::source(&format!("reading the manifest of {r}"), e))?;
        let (media_type, _) = parse(&raw)?;
        Ok(Manifest {
            raw,
            digest,
            media_type,
        })
    }

    /// `os/architecture[/variant]` of an image configuration blob, if it says.
    async fn platform_of(&self, config: &Blob) -> Result<Option<String>, CopyError> {
        if config.size > 1 << 20 {
            return Ok(None);
        }
        let mut stream = self.blob(config).await?;
        let mut raw = Vec::new();
        while let Some(chunk) = stream.next().await {
            raw.extend_from_slice(
                &chunk.map_err(|e| CopyError::Source(format!("reading the configuration: {e}")))?,
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&raw).unwrap_or_default();
        Ok(match (v["os"].as_str(), v["architecture"].as_str()) {
            (Some(os), Some(arch)) => Some(match v["variant"].as_str() {
                Some(variant) => format!("{os}/{arch}/{variant}"),
                None => format!("{os}/{arch}"),
            }),
            _ => None,
        })
    }

    /// A blob's bytes, streamed.
    async fn blob(
        &self,
        b: &Blob,
    ) -> Result<BoxStream<'static, Result<Bytes, OciDistributionError>>, CopyError> {
        match self {
            Source::Registry {
                client, reference, ..
            } => {
                let stream = client
                    .pull_blob_stream(reference, &b.descriptor())
                    .await
                    .map_err(|e| CopyError::source(&format!("reading blob {}", b.digest), e))?;
                Ok(stream
                    .map_err(|e| {
                        OciDistributionError::GenericError(Some(format!("source stream: {e}")))
                    })
                    .boxed())
            }
            Source::Runtime { .. } => self.read(&b.digest).await,
        }
    }
}

/// One copy: the source, the target's client and what they need.
struct Copier {
    source: Source,
    dst: oci_client::Client,
    dst_ref: oci_client::Reference,
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
    fn dst_at(&self, digest: &str) -> oci_client::Reference {
        oci_client::Reference::with_digest(
            self.dst_ref.registry().to_string(),
            self.dst_ref.repository().to_string(),
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
            // A HEAD first: a mount of a blob the repository lacks opens an
            // upload the registry keeps until it expires.
            if self
                .dst
                .blob_exists(&from, &b.digest)
                .await
                .unwrap_or(false)
                && self
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
        let stream = self.source.blob(&b).await?;
        let counter = self.progress.clone();
        let body = stream.inspect_ok(move |chunk: &Bytes| {
            counter
                .copied
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        });
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

    /// Where the top manifest goes: the target's tag, or (a digest target)
    /// the digest of what is pushed.
    fn dst_top(&self, digest: &str) -> oci_client::Reference {
        match self.dst_ref.digest() {
            Some(_) => self.dst_at(digest),
            None => self.dst_ref.clone(),
        }
    }

    /// The whole copy; the result's `digest` and `platforms` say what went.
    async fn run(&self) -> Result<pb::CopyProgress, CopyError> {
        let mut top = self.source.top().await?;
        let mut platforms = Vec::new();
        let mut children = Vec::new();
        let mut blobs: Vec<Blob> = Vec::new();
        if let Parsed::Index(list) = parse(&top.raw)?.1 {
            let whole = list.len();
            for (digest, platform) in list {
                let Some(child) = self.source.manifest(&digest).await? else {
                    continue;
                };
                children.push((child, platform));
            }
            if children.is_empty() {
                return Err(CopyError::NotFound(format!(
                    "no platform of index {} is on this node",
                    top.digest
                )));
            }
            if children.len() < whole {
                // A node's partial index cannot be pushed (its other
                // platforms are nowhere): its first platform stands alone.
                info!(
                    "the node holds {} of the index's {whole} platforms; copying the first",
                    children.len()
                );
                let (child, platform) = children.swap_remove(0);
                children.clear();
                platforms.extend(platform);
                top = child;
            }
        }
        match parse(&top.raw)?.1 {
            Parsed::Image(b) => blobs = b,
            Parsed::Index(_) => {
                for (child, platform) in &children {
                    match parse(&child.raw)?.1 {
                        Parsed::Image(b) => blobs.extend(b),
                        Parsed::Index(_) => {
                            return Err(CopyError::Malformed(format!(
                                "nested index {} (not supported)",
                                child.digest
                            )));
                        }
                    }
                    platforms.extend(platform.clone());
                }
            }
        }
        if platforms.is_empty()
            && let Some(config) = blobs.first()
        {
            // A lone manifest names its platform in its configuration.
            platforms.extend(self.source.platform_of(config).await?);
        }
        let mut seen = std::collections::HashSet::new();
        blobs.retain(|b| seen.insert(b.digest.clone()));
        self.progress
            .total
            .store(blobs.iter().map(|b| b.size).sum(), Ordering::Relaxed);
        info!(
            manifests = children.len() + 1,
            blobs = blobs.len(),
            from_runtime = self.source.is_runtime(),
            "copying"
        );
        futures::stream::iter(blobs.into_iter().map(|b| self.blob(b)))
            .buffer_unordered(BLOBS_AT_ONCE)
            .try_collect::<Vec<()>>()
            .await?;
        for (child, _) in &children {
            self.push_manifest(&self.dst_at(&child.digest), child)
                .await?;
        }
        self.push_manifest(&self.dst_top(&top.digest), &top).await?;
        Ok(pb::CopyProgress {
            digest: top.digest,
            platforms,
            from_runtime: self.source.is_runtime(),
            ..self.progress.snapshot()
        })
    }
}

/// Copies `task.source` to `task.target`, counting into `progress`; with
/// `from_runtime`, reads from the containerd at `runtime_socket`.
pub async fn copy(
    task: &pb::CopyTask,
    runtime_socket: Option<&std::path::Path>,
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
    let source = if task.from_runtime {
        let Some(socket) = runtime_socket else {
            return Err(CopyError::Source(
                "this agent has no runtime socket to read the image from".into(),
            ));
        };
        let channel = crate::cri::unix_channel(socket.to_path_buf());
        Source::Runtime {
            content: content::content_client::ContentClient::new(channel.clone()),
            images: images::images_client::ImagesClient::new(channel),
            name: source.to_string(),
        }
    } else {
        Source::Registry {
            client: client(&task.plain_http_registries),
            reference: oci_reference(&source),
            auth: auth_of(task.source_credentials.as_ref()),
        }
    };
    let copier = Copier {
        source,
        dst: client(&task.plain_http_registries),
        dst_ref: oci_reference(&target),
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
                let socket = this.runtime_socket.clone();
                let work =
                    tokio::time::timeout(timeout, copy(&task, socket.as_deref(), progress.clone()));
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
