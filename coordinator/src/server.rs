//! One gRPC server on one port: the agent protocol, the public API, gRPC
//! health and reflection (so `grpcurl` needs no proto files).
//!
//! Connections arrive through [`crate::listener`] (caps, handshake timeout,
//! the HTTP/2 preface read before the server sees the connection); HTTP/2
//! itself is bounded by [`Limits`]' sibling constants below, so what a client
//! without credentials can make the coordinator buffer is small per stream,
//! per connection and in total.
//!
//! Health answers from the `HealthReporter` passed in, whose statuses
//! [`crate::health`] keeps; agent sessions are accepted while `leading` is
//! true.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use berth_proto::agent::agent_service_server::AgentServiceServer;
use berth_proto::api::inventory_server::InventoryServer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

use crate::api::InventoryApi;
use crate::auth::TokenVerifier;
use crate::domain::CacheDetails;
pub use crate::listener::Plain;
use crate::listener::{self, Accept, Handshake, Http2Preface};
use crate::nodes::NodeRegistry;
use crate::session::{AgentSessions, SessionLimits};

/// Largest agent message (an inventory of ~20 000 images); read only from
/// agents whose token the apiserver accepted.
pub const MAX_AGENT_MESSAGE: usize = 8 << 20;
/// Largest request to the public API, health and reflection.
pub const MAX_PUBLIC_MESSAGE: usize = 16 << 10;
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

/// The gRPC port's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections, in total and per source IP, and the handshake timeout.
    pub connections: listener::Limits,
    /// Sessions being authenticated and their token checks.
    pub sessions: SessionLimits,
}

impl Default for Limits {
    /// Worst case without credentials: 2048 connections, each buffering at
    /// most its window plus one small request per stream, about 300 MB;
    /// one source IP gets half of that.
    fn default() -> Self {
        Limits {
            connections: listener::Limits {
                max_connections: 2048,
                // The scale benchmark runs 1000 agents from one host.
                max_per_ip: 1024,
                handshake_timeout: Duration::from_secs(10),
            },
            sessions: SessionLimits::default(),
        }
    }
}

/// What the gRPC port serves.
pub struct Services<V> {
    /// The live node view agents report into and the API reads.
    pub registry: Arc<NodeRegistry>,
    /// Per-node detail of each ImageCache.
    pub details: CacheDetails,
    /// Authenticates agents.
    pub verifier: Arc<V>,
    /// The health statuses ([`crate::health`] keeps them).
    pub health: HealthReporter,
    /// Whether this replica leads: agent sessions are accepted only then.
    pub leading: watch::Receiver<bool>,
}

/// Serves every coordinator service on `listener`, plaintext, with default
/// limits, until `stopping` turns true.
pub async fn serve<V: TokenVerifier>(
    listener: tokio::net::TcpListener,
    services: Services<V>,
    stopping: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    serve_with(listener, Plain, Limits::default(), services, stopping).await
}

/// Serves every coordinator service on connections from `acceptor` that
/// pass `handshake` (e.g. TLS) and then the HTTP/2 preface, within
/// `limits`, until `stopping` turns true.
pub async fn serve_with<V, A, H>(
    acceptor: A,
    handshake: H,
    limits: Limits,
    services: Services<V>,
    stopping: watch::Receiver<bool>,
) -> anyhow::Result<()>
where
    V: TokenVerifier,
    A: Accept,
    H: Handshake<A::Conn>,
    H::Io: AsyncRead + AsyncWrite + Unpin,
{
    let Services {
        registry,
        details,
        verifier,
        health,
        leading,
    } = services;
    let mut stop = stopping.clone();
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let health = HealthServer::new(HealthService::from_health_reporter(health))
        .max_decoding_message_size(MAX_PUBLIC_MESSAGE);
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
    let incoming = listener::incoming(
        "grpc",
        acceptor,
        Http2Preface(handshake),
        limits.connections,
    );
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_adaptive_window(Some(false))
        .http2_max_header_list_size(MAX_HEADER_LIST)
        .timeout(RESPONSE_TIMEOUT)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            AgentServiceServer::new(AgentSessions::new(
                registry.clone(),
                verifier,
                limits.sessions,
                leading,
                stopping,
            ))
            .max_decoding_message_size(MAX_AGENT_MESSAGE),
        )
        .add_service(
            InventoryServer::new(InventoryApi::new(registry, details))
                .max_decoding_message_size(MAX_PUBLIC_MESSAGE),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// Binds `addr`.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    Ok(tokio::net::TcpListener::bind(addr).await?)
}
