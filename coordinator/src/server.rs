//! The coordinator's gRPC listeners.
//!
//! - The main port (7070) speaks TLS only. It serves the agent protocol, the
//!   public API behind the access check ([`crate::access`]), gRPC health and
//!   reflection (so `grpcurl` needs no proto files and `grpcurl list` needs
//!   no token).
//! - The health port (7071) speaks plaintext and serves `grpc.health.v1`
//!   only, for the kubelet's gRPC probes, which cannot speak TLS.
//!
//! Both accept through the one loop of [`crate::listener`]: TCP accept →
//! connection caps → the handshake (TLS on 7070, none on 7071) followed by the HTTP/2 preface ([`Http2Preface`]), all within the
//! handshake timeout → tonic. HTTP/2 itself is bounded by the constants
//! below, so what a client without credentials can make the coordinator
//! buffer is small per stream, per connection and in total.
//!
//! Token checks reach the apiserver through one [`ApiGate`]: the agents'
//! TokenReviews and pod reads ([`Reviews`]) and the public API's
//! TokenReviews and SubjectAccessReviews ([`Authorizer`]) share its bounds.
//!
//! Both serve the one `HealthReporter` passed in, whose statuses
//! [`crate::health`] keeps; agent sessions are accepted while `leading` is
//! true.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use berth_proto::agent::agent_service_server::AgentServiceServer;
use berth_proto::api::containers_server::ContainersServer;
use berth_proto::api::images_server::ImagesServer;
use berth_proto::api::inventory_server::InventoryServer;
use berth_proto::api::networks_server::NetworksServer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tower::Layer;

use crate::access::layer::AccessLayer;
use crate::access::{Authorizer, Reviewer, policy};
use crate::api::InventoryApi;
use crate::auth::TokenVerifier;
use crate::containers::api::ContainersApi;
use crate::containers::images::ImagesApi;
use crate::containers::network_api::NetworksApi;
use crate::deadline::DeadlineLayer;
use crate::domain::CacheDetails;
pub use crate::listener::Plain;
use crate::listener::{self, Accept, Handshake, Http2Preface};
use crate::nodes::NodeRegistry;
use crate::review::{ApiGate, Reviews};
use crate::session::{AgentSessions, SessionLimits};
use crate::tls::TlsAcceptor;

/// Largest agent message (an inventory of ~20 000 images); read only from
/// agents whose token the apiserver accepted.
pub const MAX_AGENT_MESSAGE: usize = 8 << 20;
/// Largest request to the public API, health and reflection.
pub const MAX_PUBLIC_MESSAGE: usize = 16 << 10;
/// Largest message to the Docker API's services (`Containers`, `Images`,
/// `Networks`): a chunk of stdin, exec input or a tunnel, an Upload's tar
/// (at most 700 KiB of files), a create with a pod template. Read only from
/// callers the apiserver authenticated.
pub const MAX_CONTAINER_MESSAGE: usize = 1 << 20;
/// Streams open at once on one connection (agents use one).
pub const MAX_CONCURRENT_STREAMS: u32 = 32;
/// Bytes a client may send on a stream before the server reads them.
pub const STREAM_WINDOW: u32 = 64 << 10;
/// Bytes a client may send on a connection before the server reads them.
pub const CONNECTION_WINDOW: u32 = 128 << 10;
/// Largest header block (a projected token is ~1 KiB).
pub const MAX_HEADER_LIST: u32 = 16 << 10;
/// Longest wait for a response to start (sessions answer within the 10 s
/// Hello timeout plus a token check).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// The health port's limits: the kubelet's probes and an operator or two.
pub const HEALTH_LIMITS: listener::Limits = listener::Limits {
    max_connections: 64,
    max_per_ip: 16,
    handshake_timeout: Duration::from_secs(5),
};

/// The main port's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections, in total and per source IP, and the handshake timeout.
    pub connections: listener::Limits,
    /// Sessions being authenticated and their token checks.
    pub sessions: SessionLimits,
}

impl Default for Limits {
    /// Room for a 5000-node cluster: 8192 connections in total (each agent
    /// holds one, from its own pod IP), 1024 from one source IP. Worst case
    /// without credentials: each connection buffers at most its 128 KiB
    /// window plus one small request per stream, so about 130 MB for one
    /// source IP at its cap and about 1 GB if 8 or more addresses fill the
    /// total cap; a small cluster may lower `BERTH_MAX_CONNECTIONS`.
    fn default() -> Self {
        Limits {
            connections: listener::Limits {
                max_connections: 8192,
                max_per_ip: 1024,
                handshake_timeout: Duration::from_secs(10),
            },
            sessions: SessionLimits::default(),
        }
    }
}

/// What the main port serves.
pub struct Services<V, R> {
    /// The live node view agents report into and the API reads.
    pub registry: Arc<NodeRegistry>,
    /// Per-node detail of each ImageCache.
    pub details: CacheDetails,
    /// Authenticates agents (through [`Reviews`]).
    pub verifier: Arc<V>,
    /// Answers the public API's access questions (through an
    /// [`Authorizer`]).
    pub reviewer: R,
    /// The health statuses ([`crate::health`] keeps them), shared with the
    /// health port.
    pub health: HealthReporter,
    /// Whether this replica leads: agent sessions are accepted only then.
    pub leading: watch::Receiver<bool>,
    /// The Docker API's services, if this coordinator serves them.
    pub containers: Option<(ContainersApi, ImagesApi)>,
}

/// A gRPC health server reading `reporter`'s statuses.
pub fn health_server(reporter: &HealthReporter) -> HealthServer<HealthService> {
    HealthServer::new(HealthService::from_health_reporter(reporter.clone()))
        .max_decoding_message_size(MAX_PUBLIC_MESSAGE)
}

async fn shutdown_signal(mut stopping: watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}

/// Calls that wait by design and carry their own limits (see
/// [`crate::deadline`]).
pub const LONG_CALLS: &[&str] = &["/berth.v1.Containers/", "/berth.v1.Networks/"];

/// A tonic server builder with the coordinator's HTTP/2 bounds.
fn bounded_builder()
-> tonic::transport::Server<tower::layer::util::Stack<DeadlineLayer, tower::layer::util::Identity>>
{
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_adaptive_window(Some(false))
        .http2_max_header_list_size(MAX_HEADER_LIST)
        .layer(DeadlineLayer::new(RESPONSE_TIMEOUT, LONG_CALLS))
}

/// Serves every coordinator service over TLS on `listener`, with default
/// limits, until `stopping` turns true.
pub async fn serve<V: TokenVerifier, R: Reviewer>(
    listener: TcpListener,
    tls: TlsAcceptor,
    services: Services<V, R>,
    stopping: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    serve_with(listener, tls, Limits::default(), services, stopping).await
}

/// Serves every coordinator service on connections from `acceptor` that
/// pass `handshake` (TLS in production, [`Plain`] in some tests) and then
/// the HTTP/2 preface, within `limits`, until `stopping` turns true.
pub async fn serve_with<V, R, A, H>(
    acceptor: A,
    handshake: H,
    limits: Limits,
    services: Services<V, R>,
    stopping: watch::Receiver<bool>,
) -> anyhow::Result<()>
where
    V: TokenVerifier,
    R: Reviewer,
    A: Accept,
    H: Handshake<A::Conn>,
    H::Io: AsyncRead + AsyncWrite + Unpin,
{
    let Services {
        registry,
        details,
        verifier,
        reviewer,
        health,
        leading,
        containers,
    } = services;
    // One bound on apiserver calls for agents and API callers together.
    let gate = Arc::new(ApiGate::new(&limits.sessions.reviews));
    let reviews = Arc::new(Reviews::with_gate(
        verifier,
        limits.sessions.reviews,
        gate.clone(),
    ));
    let authorizer = Arc::new(Authorizer::with_gate(reviewer, gate));
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(berth_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?
        .max_decoding_message_size(MAX_PUBLIC_MESSAGE);
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(berth_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?
        .max_decoding_message_size(MAX_PUBLIC_MESSAGE);
    let guard = AccessLayer::new(authorizer, policy::public);
    let (containers, images, networks) = match containers {
        Some((c, i)) => (Some(c.clone()), Some(i), Some(NetworksApi::new(c))),
        None => (None, None, None),
    };
    let incoming = listener::incoming(
        "grpc",
        acceptor,
        Http2Preface(handshake),
        limits.connections,
    );
    bounded_builder()
        .add_service(health_server(&health))
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            AgentServiceServer::new(AgentSessions::new(
                registry.clone(),
                reviews,
                limits.sessions.unauthenticated,
                leading,
                stopping.clone(),
            ))
            .max_decoding_message_size(MAX_AGENT_MESSAGE),
        )
        .add_service(
            guard.layer(
                InventoryServer::new(InventoryApi::new(registry, details))
                    .max_decoding_message_size(MAX_PUBLIC_MESSAGE),
            ),
        )
        .add_optional_service(containers.map(|c| {
            guard.layer(ContainersServer::new(c).max_decoding_message_size(MAX_CONTAINER_MESSAGE))
        }))
        .add_optional_service(images.map(|i| {
            guard.layer(ImagesServer::new(i).max_decoding_message_size(MAX_CONTAINER_MESSAGE))
        }))
        .add_optional_service(networks.map(|n| {
            guard.layer(NetworksServer::new(n).max_decoding_message_size(MAX_CONTAINER_MESSAGE))
        }))
        .serve_with_incoming_shutdown(incoming, shutdown_signal(stopping))
        .await?;
    Ok(())
}

/// Serves `grpc.health.v1` alone, in plaintext, on connections from
/// `acceptor` (through the same accept loop, with [`HEALTH_LIMITS`]) until
/// `stopping` turns true: the kubelet's probes.
pub async fn serve_health<A>(
    acceptor: A,
    health: HealthReporter,
    stopping: watch::Receiver<bool>,
) -> anyhow::Result<()>
where
    A: Accept,
    A::Conn: AsyncRead + AsyncWrite + Unpin,
{
    let incoming = listener::incoming("health", acceptor, Http2Preface(Plain), HEALTH_LIMITS);
    bounded_builder()
        .add_service(health_server(&health))
        .serve_with_incoming_shutdown(incoming, shutdown_signal(stopping))
        .await?;
    Ok(())
}

/// Binds `addr`.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    Ok(TcpListener::bind(addr).await?)
}
