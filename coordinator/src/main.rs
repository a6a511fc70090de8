//! `coordinator`: the Berth coordinator Deployment's binary.
//!
//! Start-up, in order: raise the open-file limit and fit the connection caps
//! below it ([`limits`]); serve plaintext gRPC health on 7071 at once (the
//! kubelet's probes; NOT_SERVING until the TLS port is up); find or make the
//! TLS certificate ([`tls`]) and follow its Secret; then serve 7070 (TLS,
//! capped, agents and the public API) and 9090 (metrics), and stand by for
//! the Lease. Both gRPC ports serve one `HealthReporter`, whose statuses
//! [`health`] keeps.
//!
//! Every replica serves gRPC (health, reflection, the public API) and stands
//! by for the Lease (kept on a thread of its own, [`leader::thread`]); the one
//! that holds it ([`leader`]) labels its pod so the
//! Service sends it the agents, accepts their sessions and runs the
//! ImageCache controller. It stops acting the moment it stops being the
//! leader: it aborts the controller and exits non-zero, and the kubelet
//! restarts the container as a standby. A controller task that ends is
//! treated the same way (after giving the Lease up, so the standby takes over
//! at once); one that stalls turns health NOT_SERVING ([`health`]) and the
//! liveness probe restarts the container, whose SIGTERM handler releases the
//! Lease.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use berth_coordinator::access::kube::KubeReviewer;
use berth_coordinator::containers::api::ContainersApi;
use berth_coordinator::containers::images::ImagesApi;
use berth_coordinator::containers::store::Spaces;
use berth_coordinator::domain::CacheDetails;
use berth_coordinator::health::{self, Pulse, Role};
use berth_coordinator::imagecache;
use berth_coordinator::imagecache::tags::OciRegistry;
use berth_coordinator::leader::thread::Election;
use berth_coordinator::leader::{self, KubeLeases};
use berth_coordinator::{auth::KubeVerifier, limits, nodes::NodeRegistry, server, tls};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// How long a stopping coordinator waits for its Lease release and for its
/// sessions to close.
const STOP_GRACE: Duration = Duration::from_secs(3);

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
    /// Namespace Berth runs in: the Lease, the TLS Secret and the CA
    /// ConfigMap live here.
    #[arg(long, env = "POD_NAMESPACE", default_value = "berth-system")]
    namespace: String,
    /// This pod's name: its identity in the Lease, and the pod it labels
    /// `berth.dev/leader=true` while leading.
    #[arg(long, env = "POD_NAME")]
    pod_name: String,
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
    /// Connections port 7070 holds at once (one per agent, plus API
    /// callers); lowered to fit the open-file limit.
    #[arg(long, env = "BERTH_MAX_CONNECTIONS", default_value_t = server::Limits::default().connections.max_connections)]
    max_connections: usize,
    /// Connections port 7070 holds at once from one source IP (each agent
    /// dials from its own pod IP).
    #[arg(long, env = "BERTH_MAX_CONNECTIONS_PER_IP", default_value_t = server::Limits::default().connections.max_per_ip)]
    max_connections_per_ip: usize,
    /// Idle pod sandboxes kept per namespace for Docker API containers that
    /// start in the pool (`start_mode: sandbox-pool`); 0: no pool.
    #[arg(long, env = "BERTH_SANDBOX_POOL_SIZE", default_value_t = 2)]
    sandbox_pool_size: usize,
    /// Image of the pool's sandboxes (runs `/usr/local/bin/node-agent
    /// pause`); default: the coordinator's own image.
    #[arg(long, env = "BERTH_SANDBOX_IMAGE")]
    sandbox_image: Option<String>,
}

/// A mirror of the cluster's nodes without their status (taints and
/// cordons are in the spec), for placing Docker API containers.
fn node_specs(
    client: &kube::Client,
) -> kube::runtime::reflector::Store<k8s_openapi::api::core::v1::Node> {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, reflector, watcher};
    let (store, writer) = reflector::store();
    let api = kube::Api::<k8s_openapi::api::core::v1::Node>::all(client.clone());
    tokio::spawn(
        watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(|n| {
                n.status = None;
                n.metadata.managed_fields = None;
            })
            .reflect(writer)
            .for_each(|e| {
                if let Err(e) = e {
                    tracing::warn!(error = %e, "node watch (placement) failed; retrying");
                }
                futures::future::ready(())
            }),
    );
    store
}

/// The sandbox pool's settings; its image is this pod's own unless given.
async fn sandbox_pool(
    client: &kube::Client,
    args: &Args,
) -> berth_coordinator::containers::pool::PoolConfig {
    let image = match &args.sandbox_image {
        Some(i) => Some(i.clone()),
        None => kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(
            client.clone(),
            &args.namespace,
        )
        .get(&args.pod_name)
        .await
        .ok()
        .and_then(|p| p.spec?.containers.first()?.image.clone()),
    };
    match image {
        Some(image) => berth_coordinator::containers::pool::PoolConfig {
            size: args.sandbox_pool_size,
            image,
        },
        None => {
            tracing::warn!(
                "no sandbox image (--sandbox-image, or this pod's own): no sandbox pool"
            );
            Default::default()
        }
    }
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
    let limits = connection_limits(&args);
    let config = kube::Config::infer().await?;
    let client = kube::Client::try_from(config.clone())?;
    let (stop, stopping) = watch::channel(false);

    // One health reporter for both gRPC ports. Probes get answers at once;
    // "not serving" until the TLS port is up, then what `health` judges.
    let health = HealthReporter::new();
    health
        .set_service_status("", ServingStatus::NotServing)
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

    let registry = Arc::new(NodeRegistry::default());
    let details = CacheDetails::default();
    let (leading_tx, leading) = watch::channel(false);
    let (role_tx, role) = watch::channel(Role::Standby);
    // Removes a label left from an earlier leading life of this pod, then
    // sets it once leading.
    tokio::spawn(leader::label_pod(
        kube::Api::namespaced(client.clone(), &args.namespace),
        args.pod_name.clone(),
        leading.clone(),
    ));
    let metrics_addr = args.metrics_listen;
    tokio::spawn(async move {
        if let Err(e) = berth_coordinator::metrics::serve(metrics_addr).await {
            tracing::error!(addr = %metrics_addr, error = %e, "metrics endpoint failed");
        }
    });
    let services = server::Services {
        registry: registry.clone(),
        details: details.clone(),
        verifier: Arc::new(KubeVerifier::new(
            client.clone(),
            &args.namespace,
            &args.agent_service_account,
            &args.audience,
        )),
        reviewer: KubeReviewer::new(client.clone()),
        health: health.clone(),
        leading,
        containers: Some((
            ContainersApi::with_pool(
                Spaces::new(client.clone()),
                registry.clone(),
                sandbox_pool(&client, &args).await,
            )
            .with_nodes(node_specs(&client)),
            ImagesApi::new(OciRegistry::new(args.insecure_registries.clone())),
        )),
    };
    let listener = server::bind(args.listen).await?;
    tracing::info!(
        listen = %args.listen,
        health = %args.health_listen,
        identity = %args.pod_name,
        "coordinator serving (TLS)"
    );
    let mut server = tokio::spawn(server::serve_with(
        listener, acceptor, limits, services, stopping,
    ));
    tokio::spawn(health::report(health, role));
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    // The Lease is kept on a thread of its own, with an apiserver client of
    // its own, so a connect storm on this runtime cannot delay a renewal.
    let mut election = Election::spawn(
        {
            let (config, namespace) = (config, args.namespace.clone());
            move || Ok(KubeLeases::new(kube::Client::try_from(config)?, &namespace))
        },
        &args.pod_name,
    )?;

    // A standby until the Lease is ours.
    tokio::select! {
        acquired = election.acquired() => acquired?,
        _ = term.recv() => {
            tracing::info!("shutting down as a standby");
            return stop_server(&stop, server).await;
        }
        served = &mut server => return served?,
    }
    leading_tx.send_replace(true);
    let pulse = Pulse::new();
    role_tx.send_replace(Role::Leader(pulse.clone()));
    let backups = berth_coordinator::backup::controller::run(
        client.clone(),
        registry.clone(),
        args.insecure_registries.clone(),
        args.namespace.clone(),
    );
    let debloats = berth_coordinator::debloat::controller::run(client.clone());
    let caches = pulse.clone().watch(imagecache::controller::run(
        client,
        registry,
        details,
        args.insecure_registries.clone(),
        pulse,
    ));
    // Both controllers run while this replica leads; either ending ends it.
    let mut controller = tokio::spawn(async move {
        tokio::select! {
            () = caches => {}
            () = backups => {}
            () = debloats => {}
        }
    });
    let mut server_ended = false;
    let outcome = tokio::select! {
        lost = election.lost() => Err(anyhow!("stepping down: {lost}")),
        ended = &mut controller => Err(match ended {
            Ok(()) => anyhow!("a controller ended; stepping down"),
            Err(e) => anyhow!("a controller failed ({e}); stepping down"),
        }),
        _ = term.recv() => {
            tracing::info!("shutting down: controller stopped, Lease released, agent sessions closed");
            Ok(())
        }
        served = &mut server => {
            server_ended = true;
            Err(match served {
                Ok(Ok(())) => anyhow!("the gRPC server stopped; stepping down"),
                Ok(Err(e)) => e.context("the gRPC server failed; stepping down"),
                Err(e) => anyhow!("the gRPC server failed ({e}); stepping down"),
            })
        }
    };
    // No more decisions from this process: the next leader takes over.
    controller.abort();
    role_tx.send_replace(Role::SteppedDown);
    if let Err(e) = &outcome {
        tracing::error!(error = %e, "no longer the leader");
    }
    // Safe even after losing the Lease: the write is based on the version
    // this replica last wrote, so it fails if anyone wrote since.
    match tokio::time::timeout(STOP_GRACE, election.release()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not release the Lease"),
        Err(_) => tracing::warn!("releasing the Lease timed out"),
    }
    if !server_ended {
        stop_server(&stop, server).await?;
    }
    outcome
}

/// The main port's limits: the caps asked for, fitted below the open-file
/// limit (raised to its hard limit first).
fn connection_limits(args: &Args) -> server::Limits {
    let nofile = limits::raise_nofile().unwrap_or(1024);
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
    limits
}

/// Ends every agent session and stops the gRPC server, waiting at most
/// [`STOP_GRACE`].
async fn stop_server(
    stop: &watch::Sender<bool>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let _ = stop.send(true);
    match tokio::time::timeout(STOP_GRACE, server).await {
        Ok(served) => served?,
        Err(_) => Ok(()),
    }
}
