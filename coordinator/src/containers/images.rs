//! `berth.v1.Images`: images as the Docker API sees them, read from their
//! registries (a container's image is pulled by the kubelet of the node its
//! pod lands on, so "pull" here checks the image exists and reports what it
//! is).

use std::pin::Pin;

use berth_proto::api as pb;
use berth_proto::reference::Reference;
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::imagecache::tags::{ImageConfig, OciRegistry, RegistryError};

/// The `Images` service.
pub struct ImagesApi {
    registry: OciRegistry,
}

impl ImagesApi {
    /// Reads images through `registry`.
    pub fn new(registry: OciRegistry) -> Self {
        ImagesApi { registry }
    }

    async fn read(&self, image: &str) -> Result<(Reference, ImageConfig), Status> {
        let reference = Reference::parse(image).map_err(|e| {
            Status::invalid_argument(format!("invalid reference format: {image:?}: {e}"))
        })?;
        let config = self
            .registry
            .image_config(&reference.to_string())
            .await
            .map_err(|e| match e {
                RegistryError::Denied(m) => Status::not_found(format!(
                    "No such image: {image} (the registry refused anonymous access: {m})"
                )),
                RegistryError::Failed(m)
                    if m.contains("404")
                        || m.contains("MANIFEST_UNKNOWN")
                        || m.contains("NAME_UNKNOWN") =>
                {
                    Status::not_found(format!("No such image: {image}"))
                }
                // Docker answers from its local store; Berth's store is the
                // registry, so an unreachable one holds no such image.
                RegistryError::Failed(m) => Status::not_found(format!(
                    "No such image: {image} (its registry could not be read: {m})"
                )),
            })?;
        Ok((reference, config))
    }
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The API's view of an image from its registry configuration.
pub fn image_info(reference: &Reference, c: &ImageConfig) -> pb::ImageInfo {
    let cfg = &c.config["config"];
    let repo = reference.to_string();
    let repo = repo
        .split_once('@')
        .map(|(r, _)| r.to_string())
        .unwrap_or_else(|| match repo.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => r.to_string(),
            _ => repo.clone(),
        });
    pb::ImageInfo {
        reference: reference.to_string(),
        id: c.config_digest.clone(),
        repo_digest: format!("{repo}@{}", c.manifest_digest),
        size_bytes: c.size,
        os: c.config["os"].as_str().unwrap_or("linux").into(),
        architecture: c.config["architecture"].as_str().unwrap_or_default().into(),
        created: c.config["created"].as_str().unwrap_or_default().into(),
        entrypoint: strings(&cfg["Entrypoint"]),
        cmd: strings(&cfg["Cmd"]),
        env: strings(&cfg["Env"]),
        working_dir: cfg["WorkingDir"].as_str().unwrap_or_default().into(),
        user: cfg["User"].as_str().unwrap_or_default().into(),
        labels: cfg["Labels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default(),
        exposed_ports: cfg["ExposedPorts"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default(),
    }
}

type Progress = Pin<Box<dyn Stream<Item = Result<pb::PullProgress, Status>> + Send>>;

#[tonic::async_trait]
impl pb::images_server::Images for ImagesApi {
    type PullStream = Progress;

    async fn pull(
        &self,
        request: Request<pb::ImageRequest>,
    ) -> Result<Response<Self::PullStream>, Status> {
        let req = request.into_inner();
        let (reference, config) = self.read(&req.image).await?;
        let lines = [
            format!("Resolved {reference}"),
            format!("Digest: {}", config.manifest_digest),
            format!("Status: Image is up to date for {reference}"),
        ];
        let items: Vec<Result<pb::PullProgress, Status>> = lines
            .into_iter()
            .map(|status| Ok(pb::PullProgress { status }))
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(items))))
    }

    async fn inspect(
        &self,
        request: Request<pb::ImageRequest>,
    ) -> Result<Response<pb::ImageInfo>, Status> {
        let req = request.into_inner();
        let (reference, config) = self.read(&req.image).await?;
        Ok(Response::new(image_info(&reference, &config)))
    }
}
