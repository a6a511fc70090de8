//! `coordinator`: the Berth coordinator Deployment's binary.

use std::net::SocketAddr;
use std::sync::Arc;

use berth_coordinator::imagecache::{self, controller::CacheDetails};
use berth_coordinator::{auth::KubeVerifier, nodes::NodeRegistry, server};
use clap::Parser;

/// Berth coordinator.
#[derive(Debug, Parser)]
#[command(name = "coordinator", version, about)]
struct Args {
    /// Address of the gRPC server (agents and the public API).
    #[arg(long, env = "BERTH_LISTEN", default_value = "0.0.0.0:7070")]
    listen: SocketAddr,
    /// Namespace Berth runs in.
    #[arg(long, env = "POD_NAMESPACE", default_value = "berth-system")]
    namespace: String,
    /// ServiceAccount of the node agents.
    #[arg(long, default_value = "berth-node-agent")]
    agent_service_account: String,
    /// Registries (`host:port`) spoken to over plain HTTP when resolving
    /// tracked tags; comma-separated in the environment.
    #[arg(
        long = "insecure-registry",
        env = "BERTH_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    insecure_registries: Vec<String>,
    /// Address of the Prometheus metrics endpoint (`/metrics`).
    #[arg(long, env = "BERTH_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    metrics_listen: SocketAddr,
    /// Audience of the agents' projected tokens.
    #[arg(long, default_value = "berth")]
    audience: String,
    /// Connections the gRPC port holds at once (lowered to fit the
    /// open-file limit).
    #[arg(long, env = "BERTH_MAX_CONNECTIONS", default_value_t = server::Limits::default().connections.max_connections)]
    max_connections: usize,
    /// Connections the gRPC port holds at once from one source IP.
    #[arg(long, env = "BERTH_MAX_CONNECTIONS_PER_IP", default_value_t = server::Limits::default().connections.max_per_ip)]
    max_connections_per_ip: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // oci-client's rustls has no default crypto provider; kube uses ring too.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let args = Args::parse();
    let nofile = berth_coordinator::limits::raise_nofile().unwrap_or(1024);
    let mut limits = server::Limits::default();
    limits.connections.max_connections = args.max_connections;
    limits.connections.max_per_ip = args.max_connections_per_ip;
    limits.connections = limits.connections.within_fd_limit(nofile);
    tracing::info!(
        open_files = nofile,
        max_connections = limits.connections.max_connections,
        max_per_ip = limits.connections.max_per_ip,
        "connection limits"
    );
    let client = kube::Client::try_default().await?;
    let verifier = KubeVerifier::new(
        client.clone(),
        &args.namespace,
        &args.agent_service_account,
        &args.audience,
    );
    let registry = Arc::new(NodeRegistry::default());
    let details = CacheDetails::default();
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let controller = tokio::spawn(imagecache::controller::run(
        client,
        registry.clone(),
        details.clone(),
        args.insecure_registries.clone(),
    ));
    let metrics_addr = args.metrics_listen;
    tokio::spawn(async move {
        if let Err(e) = berth_coordinator::metrics::serve(metrics_addr).await {
            tracing::error!(addr = %metrics_addr, error = %e, "metrics endpoint failed");
        }
    });
    let listener = server::bind(args.listen).await?;
    tracing::info!(listen = %args.listen, "coordinator serving");
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
        tracing::info!("shutting down: controller stopped, agent sessions closed");
        // No more decisions from this process; the next coordinator takes over.
        controller.abort();
        let _ = stop.send(true);
    });
    server::serve_with(
        listener,
        server::Plain,
        limits,
        registry,
        details,
        Arc::new(verifier),
        stopping,
    )
    .await
}
