//! The coordinator's gRPC listeners.
//!
//! - The main port (7070) speaks TLS only: every accepted connection goes
//!   through [`TlsAcceptor::accept`] ([`tls_incoming`]) before gRPC sees it.
//!   It serves the agent protocol, the public API behind the access check
//!   ([`crate::access`]), gRPC health and reflection (so `grpcurl` needs no
//!   proto files and `grpcurl list` needs no token).
//! - The health port (7071) speaks plaintext and serves `grpc.health.v1`
//!   only, for the kubelet's gRPC probes, which cannot speak TLS.
//!
//! Both serve the same [`HealthReporter`]: whoever sets a status on it (the
//! service statuses here, leadership elsewhere) is seen on both ports.

use std::net::SocketAddr;
use std::sync::Arc;

use berth_proto::agent::agent_service_server::AgentServiceServer;
use berth_proto::api::inventory_server::InventoryServer;
use futures::Stream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tower::Layer;

use crate::access::layer::AccessLayer;
use crate::access::{Authorizer, Reviewer, policy};
use crate::api::InventoryApi;
use crate::auth::TokenVerifier;
use crate::domain::CacheDetails;
use crate::nodes::NodeRegistry;
use crate::session::AgentSessions;
use crate::tls::TlsAcceptor;

/// What the main port serves.
pub struct Services<V, R> {
    /// The live node view agents report into and the API reads.
    pub registry: Arc<NodeRegistry>,
    /// Per-node detail of each ImageCache.
    pub details: CacheDetails,
    /// Authenticates agents.
    pub verifier: Arc<V>,
    /// Authenticates and authorizes public API callers.
    pub authorizer: Arc<Authorizer<R>>,
    /// The health statuses, shared with the health port.
    pub health: HealthReporter,
}

/// A gRPC health server reading `reporter`'s statuses.
pub fn health_server(reporter: &HealthReporter) -> HealthServer<HealthService> {
    HealthServer::new(HealthService::from_health_reporter(reporter.clone()))
}

async fn shutdown_signal(mut stopping: watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}

/// Accepts on `listener` and yields the connections whose TLS handshake
/// succeeded. Handshakes run concurrently, so a slow client holds up only
/// itself; failed ones (plaintext, untrusted clients) are logged and dropped.
/// Ends when the returned stream is dropped.
pub fn tls_incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> impl Stream<Item = std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match acceptor.accept(tcp).await {
                    Ok(tls) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Err(e) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Serves every coordinator service over TLS on `listener` until `stopping`
/// turns true.
pub async fn serve<V: TokenVerifier, R: Reviewer>(
    listener: TcpListener,
    tls: TlsAcceptor,
    services: Services<V, R>,
    stopping: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let Services {
        registry,
        details,
        verifier,
        authorizer,
        health,
    } = services;
    health
        .set_serving::<AgentServiceServer<AgentSessions<V>>>()
        .await;
    health.set_serving::<InventoryServer<InventoryApi>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(berth_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(berth_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let guard = AccessLayer::new(authorizer, policy::inventory);
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .add_service(health_server(&health))
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(AgentServiceServer::new(AgentSessions::new(
            registry.clone(),
            verifier,
            stopping.clone(),
        )))
        .add_service(guard.layer(InventoryServer::new(InventoryApi::new(registry, details))))
        .serve_with_incoming_shutdown(tls_incoming(listener, tls), shutdown_signal(stopping))
        .await?;
    Ok(())
}

/// Serves `grpc.health.v1` alone, in plaintext, on `listener` until
/// `stopping` turns true: the kubelet's probes.
pub async fn serve_health(
    listener: TcpListener,
    health: HealthReporter,
    stopping: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    tonic::transport::Server::builder()
        .add_service(health_server(&health))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown_signal(stopping))
        .await?;
    Ok(())
}

/// Binds `addr`.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    Ok(TcpListener::bind(addr).await?)
}
