//! The coordinator's `berth.v1.Containers`, `berth.v1.Images` and
//! `berth.v1.Networks` clients,
//! with the bearer token on every call and the namespace the shim serves.
//! [`endpoint`] builds the TLS channel; tests hand [`Coordinator::new`] a
//! plaintext channel to an in-process fake.

use std::path::Path;

use berth_proto::api::containers_client::ContainersClient;
use berth_proto::api::images_client::ImagesClient;
use berth_proto::api::networks_client::NetworksClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::session::CallMetadata;
use crate::token::TokenSource;

/// Why the coordinator's channel could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL is not `https://…`.
    #[error("the coordinator URL {0:?} must start with https:// (the coordinator speaks TLS only)")]
    NotTls(String),
    /// The CA file could not be read.
    #[error(
        "cannot read the CA file {path}: {source} (it is ca.crt of the ConfigMap berth-ca in berth-system)"
    )]
    CaFile {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The URL or TLS settings are malformed.
    #[error("invalid coordinator endpoint {url}: {source}")]
    Endpoint {
        /// The URL.
        url: String,
        /// Why.
        source: tonic::transport::Error,
    },
}

/// A lazily connected TLS channel to `url`, verifying the certificate
/// against `ca_file` for the name `server_name`.
pub fn endpoint(url: &str, ca_file: &Path, server_name: &str) -> Result<Channel, ConnectError> {
    if !url.starts_with("https://") {
        return Err(ConnectError::NotTls(url.to_string()));
    }
    let pem = std::fs::read(ca_file).map_err(|source| ConnectError::CaFile {
        path: ca_file.display().to_string(),
        source,
    })?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem))
        .domain_name(server_name.to_string());
    let err = |source| ConnectError::Endpoint {
        url: url.to_string(),
        source,
    };
    Ok(Endpoint::from_shared(url.to_string())
        .map_err(err)?
        .tls_config(tls)
        .map_err(err)?
        .connect_timeout(std::time::Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

/// A client of the Containers API with the token attached.
pub type Containers = ContainersClient<InterceptedService<Channel, CallMetadata>>;
/// A client of the Images API with the token attached.
pub type Images = ImagesClient<InterceptedService<Channel, CallMetadata>>;

/// A client of the Networks API with the token attached.
pub type Networks = NetworksClient<InterceptedService<Channel, CallMetadata>>;

/// The coordinator as the HTTP handlers see it; cheap to clone.
#[derive(Debug, Clone)]
pub struct Coordinator {
    /// `berth.v1.Containers`.
    pub containers: Containers,
    /// `berth.v1.Images`.
    pub images: Images,
    /// `berth.v1.Networks`.
    pub networks: Networks,
    /// The namespace every request names.
    pub namespace: String,
}

impl Coordinator {
    /// Removes this session's containers (forcibly), then its networks,
    /// that carry every label of `labels` (`key` or `key=value`; none: all).
    /// `who` names the caller in the log; failures are logged and skipped.
    pub async fn remove_labelled(&self, labels: &[String], who: &str) {
        use berth_proto::api::{
            ListContainersRequest, ListNetworksRequest, NetworkRequest, RemoveContainerRequest,
        };
        let namespace = self.namespace.clone();
        let listed = self
            .containers
            .clone()
            .list(ListContainersRequest {
                namespace: namespace.clone(),
                all: true,
                label_filters: labels.to_vec(),
                ..Default::default()
            })
            .await;
        let containers = listed
            .map(|r| r.into_inner().containers)
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e.message(), "{who}: cannot list containers");
                Vec::new()
            });
        for c in containers {
            let req = RemoveContainerRequest {
                namespace: namespace.clone(),
                id: c.id.clone(),
                force: true,
            };
            match self.containers.clone().remove(req).await {
                Ok(_) => tracing::info!(container = %c.name, "{who}: removed"),
                Err(e) => {
                    tracing::warn!(container = %c.name, error = %e.message(), "{who}: removal failed")
                }
            }
        }
        let listed = self
            .networks
            .clone()
            .list(ListNetworksRequest {
                namespace: namespace.clone(),
                label_filters: labels.to_vec(),
                ..Default::default()
            })
            .await;
        let networks = listed.map(|r| r.into_inner().networks).unwrap_or_else(|e| {
            tracing::warn!(error = %e.message(), "{who}: cannot list networks");
            Vec::new()
        });
        for n in networks {
            let req = NetworkRequest {
                namespace: namespace.clone(),
                id: n.id.clone(),
            };
            match self.networks.clone().remove(req).await {
                Ok(_) => tracing::info!(network = %n.name, "{who}: removed"),
                Err(e) => {
                    tracing::warn!(network = %n.name, error = %e.message(), "{who}: removal failed")
                }
            }
        }
    }

    /// Clients over `channel`, sending `token` and naming `namespace`,
    /// outside any session.
    pub fn new(channel: Channel, token: TokenSource, namespace: &str) -> Self {
        Coordinator::in_session(channel, token, namespace, None)
    }

    /// Like [`Coordinator::new`], every call naming `session` (see
    /// [`crate::session`]).
    pub fn in_session(
        channel: Channel,
        token: TokenSource,
        namespace: &str,
        session: Option<String>,
    ) -> Self {
        let meta = CallMetadata { token, session };
        Coordinator {
            containers: ContainersClient::with_interceptor(channel.clone(), meta.clone()),
            images: ImagesClient::with_interceptor(channel.clone(), meta.clone()),
            networks: NetworksClient::with_interceptor(channel, meta),
            namespace: namespace.to_string(),
        }
    }
}
