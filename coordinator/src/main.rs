//! `coordinator`: the Berth coordinator Deployment's binary.
//!
//! Starts the plaintext health port, finds or makes the TLS certificate,
//! then runs the ImageCache controller, the metrics endpoint and the TLS
//! gRPC port until SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;

use berth_coordinator::access::{Authorizer, kube::KubeReviewer};
use berth_coordinator::domain::CacheDetails;
use berth_coordinator::imagecache;
use berth_coordinator::{auth::KubeVerifier, nodes::NodeRegistry, server, tls};
use clap::Parser;

/// Berth coordinator.
#[derive(Debug, Parser)]
#[command(name = "coordinator", version, about)]
struct Args {
    /// Address of the TLS gRPC server (agents and the public API).
    #[arg(long, env = "BERTH_LISTEN", default_value = "0.0.0.0:7070")]
    listen: SocketAddr,
    /// Address of the plaintext gRPC health server (kubelet probes only).
    #[arg(long, env = "BERTH_HEALTH_LISTEN", default_value = "0.0.0.0:7071")]
    health_listen: SocketAddr,
    /// Namespace Berth runs in; the TLS Secret and CA ConfigMap live here.
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
    let client = kube::Client::try_default().await?;
    let (stop, stopping) = tokio::sync::watch::channel(false);

    // Probes get answers at once; "not serving" until the TLS port is up.
    let (health, _) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let health_listener = server::bind(args.health_listen).await?;
    tokio::spawn({
        let (health, stopping) = (health.clone(), stopping.clone());
        async move {
            if let Err(e) = server::serve_health(health_listener, health, stopping).await {
                tracing::error!(error = %e, "health endpoint failed");
            }
        }
    });

    let material = tls::store::bootstrap(&client, &args.namespace).await?;
    let acceptor = tls::TlsAcceptor::from_material(&material)?;
    tokio::spawn(tls::store::watch(
        client.clone(),
        args.namespace.clone(),
        acceptor.clone(),
        material,
    ));
    let authorizer = Arc::new(Authorizer::new(KubeReviewer::new(client.clone())));
    let verifier = KubeVerifier::new(
        client.clone(),
        &args.namespace,
        &args.agent_service_account,
        &args.audience,
    );
    let registry = Arc::new(NodeRegistry::default());
    let details = CacheDetails::default();
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
    tracing::info!(listen = %args.listen, health = %args.health_listen, "coordinator serving (TLS)");
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
        tracing::info!("shutting down: controller stopped, agent sessions closed");
        // No more decisions from this process; the next coordinator takes over.
        controller.abort();
        let _ = stop.send(true);
    });
    let services = server::Services {
        registry,
        details,
        verifier: Arc::new(verifier),
        authorizer,
        health: health.clone(),
    };
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    server::serve(listener, acceptor, services, stopping).await
}
