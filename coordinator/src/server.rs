//! One gRPC server on one port: the agent protocol, the public API, gRPC
//! health and reflection (so `grpcurl` needs no proto files).
//!
//! Health answers from the `HealthReporter` passed in, whose statuses
//! [`crate::health`] keeps; agent sessions are accepted while `leading` is
//! true.

use std::net::SocketAddr;
use std::sync::Arc;

use berth_proto::agent::agent_service_server::AgentServiceServer;
use berth_proto::api::inventory_server::InventoryServer;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

use crate::api::InventoryApi;
use crate::auth::TokenVerifier;
use crate::domain::CacheDetails;
use crate::nodes::NodeRegistry;
use crate::session::AgentSessions;

/// Serves every coordinator service on `listener` until `stopping` turns
/// true; health from `health`, agent sessions while `leading` is true.
pub async fn serve<V: TokenVerifier>(
    listener: tokio::net::TcpListener,
    registry: Arc<NodeRegistry>,
    details: CacheDetails,
    verifier: Arc<V>,
    health: HealthReporter,
    leading: tokio::sync::watch::Receiver<bool>,
    stopping: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut stop = stopping.clone();
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let health = HealthServer::new(HealthService::from_health_reporter(health));
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(berth_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(berth_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(AgentServiceServer::new(AgentSessions::new(
            registry.clone(),
            verifier,
            leading,
            stopping,
        )))
        .add_service(InventoryServer::new(InventoryApi::new(registry, details)))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

/// Binds `addr`.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    Ok(tokio::net::TcpListener::bind(addr).await?)
}
