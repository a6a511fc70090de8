//! Makes test images at test time, straight through the OCI distribution API
//! of the harness's plain-HTTP registries, so every test owns images no other
//! test (and no quick start) holds: a unique repository, tag and digest.
//!
//! Small images are the harness's busybox (its layers mounted across
//! repositories, not copied) plus one uncompressed layer holding a unique
//! marker file, so they run `sh` and `sleep` and still have an ID of their own.
//! Big images are layers of random bytes. Uncompressed layers keep the digest
//! equal to the diff ID, so a config is written without unpacking anything.

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use sha2::{Digest, Sha256};

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// A client of one registry (`host:port`, plain HTTP, optional basic auth).
pub struct Registry {
    host: String,
    auth: Option<String>,
    http: Client<HttpConnector, Full<Bytes>>,
}

/// A blob as a manifest lists it.
struct Blob {
    media_type: String,
    digest: String,
    size: usize,
}

fn sha256(data: &[u8]) -> String {
    let hex: String = Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// A name no earlier run or other test used: process id, time and a counter.
pub fn unique_suffix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!(
        "{:x}{:x}{}",
        std::process::id(),
        nanos & 0xff_ffff,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// An uncompressed tar holding `files` (path, content), mode 0644, owned by root.
pub fn tar_layer(files: &[(&str, &[u8])]) -> anyhow::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, path, *data)?;
    }
    Ok(b.into_inner()?)
}

impl Registry {
    /// A client of `host` (`host:port`), with `user:password` if given.
    pub fn new(host: &str, credentials: Option<(&str, &str)>) -> Self {
        use base64::Engine;
        Registry {
            host: host.to_string(),
            auth: credentials.map(|(u, p)| {
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
                )
            }),
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    async fn call(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> anyhow::Result<(StatusCode, http::HeaderMap, Bytes)> {
        let url = if url.starts_with("http") {
            url.to_string()
        } else {
            format!("http://{}{url}", self.host)
        };
        let mut req = Request::builder().method(method.clone()).uri(&url);
        if let Some(a) = &self.auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self
            .http
            .request(req.body(Full::new(Bytes::from(body)))?)
            .await
            .with_context(|| format!("{method} {url}"))?;
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await?.to_bytes();
        Ok((parts.status, parts.headers, bytes))
    }

    async fn expect(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
        want: StatusCode,
    ) -> anyhow::Result<(http::HeaderMap, Bytes)> {
        let (status, h, b) = self.call(method.clone(), url, headers, body).await?;
        if status != want {
            bail!(
                "registry {}: {method} {url} answered {status}: {}",
                self.host,
                String::from_utf8_lossy(&b)
            );
        }
        Ok((h, b))
    }

    /// Uploads `data` into `repo` unless the registry has it; returns its digest.
    pub async fn push_blob(&self, repo: &str, data: Vec<u8>) -> anyhow::Result<String> {
        let digest = sha256(&data);
        let (status, _, _) = self
            .call(
                Method::HEAD,
                &format!("/v2/{repo}/blobs/{digest}"),
                &[],
                vec![],
            )
            .await?;
        if status == StatusCode::OK {
            return Ok(digest);
        }
        let (h, _) = self
            .expect(
                Method::POST,
                &format!("/v2/{repo}/blobs/uploads/"),
                &[],
                vec![],
                StatusCode::ACCEPTED,
            )
            .await?;
        let location = h
            .get(header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .context("upload without Location")?;
        let sep = if location.contains('?') { '&' } else { '?' };
        let len = data.len().to_string();
        self.expect(
            Method::PUT,
            &format!("{location}{sep}digest={digest}"),
            &[
                (header::CONTENT_TYPE.as_str(), "application/octet-stream"),
                (header::CONTENT_LENGTH.as_str(), &len),
            ],
            data,
            StatusCode::CREATED,
        )
        .await?;
        Ok(digest)
    }

    /// Pushes an amd64 image of `layers` (uncompressed tars, stored gzip
    /// compressed as most registries serve them) with run configuration
    /// `run` to `repo:tag`. Returns the manifest digest.
    pub async fn push_gzip_image(
        &self,
        repo: &str,
        tag: &str,
        layers: Vec<Vec<u8>>,
        run: serde_json::Value,
    ) -> anyhow::Result<String> {
        let mut diff_ids = Vec::new();
        let mut blobs = Vec::new();
        for tar in layers {
            diff_ids.push(sha256(&tar));
            let gz = tokio::task::spawn_blocking(move || {
                use std::io::Write;
                let mut e =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(&tar)?;
                e.finish()
            })
            .await??;
            let size = gz.len();
            let digest = self.push_blob(repo, gz).await?;
            blobs
                .push(serde_json::json!({"mediaType": LAYER_GZIP, "digest": digest, "size": size}));
        }
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": run,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))?;
        let config_size = config.len();
        let config_digest = self.push_blob(repo, config).await?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"mediaType": CONFIG, "digest": config_digest, "size": config_size},
            "layers": blobs,
        });
        self.put_manifest(repo, tag, MANIFEST, serde_json::to_vec(&manifest)?)
            .await
    }

    /// Makes blob `digest` of repository `from` part of `repo` without copying.
    async fn mount_blob(&self, repo: &str, from: &str, digest: &str) -> anyhow::Result<()> {
        self.expect(
            Method::POST,
            &format!("/v2/{repo}/blobs/uploads/?mount={digest}&from={from}"),
            &[],
            vec![],
            StatusCode::CREATED,
        )
        .await
        .map(|_| ())
    }

    /// The bytes of blob `digest` of `repo`.
    pub async fn get_blob(&self, repo: &str, digest: &str) -> anyhow::Result<Bytes> {
        Ok(self
            .expect(
                Method::GET,
                &format!("/v2/{repo}/blobs/{digest}"),
                &[],
                vec![],
                StatusCode::OK,
            )
            .await?
            .1)
    }

    /// The manifest `repo:reference` names, accepting `accept`: its media
    /// type and its bytes exactly as the registry stores them.
    async fn manifest(
        &self,
        repo: &str,
        reference: &str,
        accept: &str,
    ) -> anyhow::Result<(String, Bytes)> {
        let (h, b) = self
            .expect(
                Method::GET,
                &format!("/v2/{repo}/manifests/{reference}"),
                &[(header::ACCEPT.as_str(), accept)],
                vec![],
                StatusCode::OK,
            )
            .await?;
        let media_type = h
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(MANIFEST)
            .to_string();
        Ok((media_type, b))
    }

    /// The manifest of `repo:tag`, raw, with its media type.
    pub async fn get_manifest(&self, repo: &str, tag: &str) -> anyhow::Result<(String, Bytes)> {
        self.manifest(repo, tag, ACCEPT).await
    }

    /// The manifest or index `repo:reference` (tag or digest) names, raw,
    /// exactly as the registry stores it.
    pub async fn get_any_manifest(&self, repo: &str, reference: &str) -> anyhow::Result<Bytes> {
        let accept =
            format!("{ACCEPT}, {INDEX}, application/vnd.docker.distribution.manifest.list.v2+json");
        Ok(self.manifest(repo, reference, &accept).await?.1)
    }

    /// Pushes an index of `manifests` (digest, size, architecture; all
    /// linux, in this repository) as `repo:tag`; returns its digest.
    pub async fn push_index(
        &self,
        repo: &str,
        tag: &str,
        manifests: &[(String, usize, &str)],
    ) -> anyhow::Result<String> {
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": INDEX,
            "manifests": manifests.iter().map(|(d, size, arch)| serde_json::json!({
                "mediaType": MANIFEST, "digest": d, "size": size,
                "platform": {"os": "linux", "architecture": arch},
            })).collect::<Vec<_>>(),
        });
        self.put_manifest(repo, tag, INDEX, serde_json::to_vec(&index)?)
            .await
    }

    /// Stores `manifest` as `repo:tag`; returns the manifest's digest.
    pub async fn put_manifest(
        &self,
        repo: &str,
        tag: &str,
        media_type: &str,
        manifest: Vec<u8>,
    ) -> anyhow::Result<String> {
        let digest = sha256(&manifest);
        self.expect(
            Method::PUT,
            &format!("/v2/{repo}/manifests/{tag}"),
            &[(header::CONTENT_TYPE.as_str(), media_type)],
            manifest,
            StatusCode::CREATED,
        )
        .await?;
        Ok(digest)
    }

    /// Pushes an image to `repo:tag` whose layers are those of `base`
    /// (`repo:tag` in this registry, mounted) followed by `extra` (uncompressed
    /// tars). Returns the manifest digest.
    pub async fn push_image(
        &self,
        repo: &str,
        tag: &str,
        base: Option<(&str, &str)>,
        extra: Vec<Vec<u8>>,
    ) -> anyhow::Result<String> {
        self.push_image_as(repo, tag, base, extra, None).await
    }

    /// [`Registry::push_image`] with the image's run configuration (the
    /// config's `config` object: Entrypoint, Cmd, Env, …) replaced by `run`.
    pub async fn push_image_as(
        &self,
        repo: &str,
        tag: &str,
        base: Option<(&str, &str)>,
        extra: Vec<Vec<u8>>,
        run: Option<serde_json::Value>,
    ) -> anyhow::Result<String> {
        self.push_image_for("amd64", repo, tag, base, extra, run)
            .await
    }

    /// [`Registry::push_image_as`] for architecture `arch` (without a base,
    /// whose configuration names its own).
    pub async fn push_image_for(
        &self,
        arch: &str,
        repo: &str,
        tag: &str,
        base: Option<(&str, &str)>,
        extra: Vec<Vec<u8>>,
        run: Option<serde_json::Value>,
    ) -> anyhow::Result<String> {
        let mut layers = Vec::new();
        let mut config = serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "config": {"Env": ["PATH=/usr/local/bin:/bin:/usr/bin"], "Entrypoint": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": []},
        });
        if let Some((base_repo, base_tag)) = base {
            let (_, raw) = self.get_manifest(base_repo, base_tag).await?;
            let m: serde_json::Value = serde_json::from_slice(&raw)?;
            let cfg_digest = m["config"]["digest"].as_str().context("base config")?;
            config = serde_json::from_slice(&self.get_blob(base_repo, cfg_digest).await?)?;
            for l in m["layers"].as_array().context("base layers")? {
                let digest = l["digest"].as_str().context("layer digest")?;
                self.mount_blob(repo, base_repo, digest).await?;
                layers.push(Blob {
                    media_type: l["mediaType"].as_str().unwrap_or(LAYER_TAR).to_string(),
                    digest: digest.to_string(),
                    size: l["size"].as_u64().unwrap_or_default() as usize,
                });
            }
        }
        for data in extra {
            let size = data.len();
            let digest = self.push_blob(repo, data).await?;
            config["rootfs"]["diff_ids"]
                .as_array_mut()
                .context("config without rootfs.diff_ids")?
                .push(digest.clone().into());
            layers.push(Blob {
                media_type: LAYER_TAR.into(),
                digest,
                size,
            });
        }
        if let Some(run) = run {
            config["config"] = run;
        }
        let config = serde_json::to_vec(&config)?;
        let config_size = config.len();
        let config_digest = self.push_blob(repo, config).await?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"mediaType": CONFIG, "digest": config_digest, "size": config_size},
            "layers": layers.iter().map(|l| serde_json::json!({
                "mediaType": l.media_type, "digest": l.digest, "size": l.size,
            })).collect::<Vec<_>>(),
        });
        self.put_manifest(repo, tag, MANIFEST, serde_json::to_vec(&manifest)?)
            .await
    }

    /// Copies the manifest of `repo:from` to `repo:to` (a retag).
    pub async fn retag(&self, repo: &str, from: &str, to: &str) -> anyhow::Result<String> {
        let (media_type, raw) = self.get_manifest(repo, from).await?;
        self.put_manifest(repo, to, &media_type, raw.to_vec()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tar_layer_holds_exactly_the_given_files() {
        let t = tar_layer(&[("etc/mark", b"x1"), ("data/blob", &[7u8; 700])]).unwrap();
        let mut a = tar::Archive::new(&t[..]);
        let names: Vec<(String, u64)> = a
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.path().unwrap().display().to_string(), e.size())
            })
            .collect();
        assert_eq!(
            names,
            [("etc/mark".to_string(), 2), ("data/blob".to_string(), 700)]
        );
    }

    #[test]
    fn suffixes_never_repeat() {
        let a: std::collections::BTreeSet<String> = (0..100).map(|_| unique_suffix()).collect();
        assert_eq!(a.len(), 100);
    }
}
