//! Berth's Docker Engine API front end.
//!
//! Docker clients (the docker CLI, testcontainers) talk HTTP/1.1 to the shim
//! on TCP and, optionally, a unix socket; the shim turns each call into
//! calls on the coordinator's `berth.v1.Containers` and `berth.v1.Images`
//! gRPC services, which run the containers as pods. The shim never talks to
//! Kubernetes itself.
//!
//! Data flows: [`http`] accepts a request → [`route`] names the endpoint →
//! a handler translates Docker's JSON with the pure functions of [`docker`]
//! and calls the [`coordinator`] (with the bearer token of [`token`]) →
//! the answer is rendered by [`docker`] (or framed by [`stream`] for
//! output) → any failure becomes Docker's error JSON in [`error`]. Exec
//! instances live between their create, start and inspect in [`exec`].
//! Published ports are listened for on the shim's host and carried to the
//! container by [`ports`]. Each shim is one client [`session`]: it sees only its own containers,
//! and they are removed once it is gone. testcontainers' reaper, Ryuk, is
//! served by the shim itself ([`ryuk`]).

pub mod config;
pub mod coordinator;
pub mod docker;
pub mod error;
pub mod exec;
pub mod http;
pub mod ports;
pub mod route;
pub mod ryuk;
pub mod session;
pub mod stream;
pub mod token;

use std::sync::Arc;

use anyhow::Context;

use crate::coordinator::Coordinator;
use crate::docker::system::Identity;
use crate::token::TokenSource;

/// A random ID for this shim process, in UUID form.
fn random_id() -> String {
    let a = fastrand::u64(..);
    let b = fastrand::u64(..);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "berth-docker-shim".to_string())
}

/// Runs the shim until the process is stopped.
pub async fn run(args: config::Args) -> anyhow::Result<()> {
    let token = match args.token_path() {
        Some(path) => TokenSource::from_file(path, args.token_refresh)?,
        None => {
            tracing::warn!(
                "no --token-file and no in-cluster token: calls go without a token and the coordinator will refuse them"
            );
            TokenSource::none()
        }
    };
    let pod_defaults = args.pod_defaults()?;
    let channel = coordinator::endpoint(&args.coordinator, &args.ca_file, &args.tls_server_name)?;
    let session = session::new_id();
    let coordinator =
        Coordinator::in_session(channel, token, &args.namespace, Some(session.clone()));
    tokio::spawn(session::hold(
        coordinator.containers.clone(),
        args.namespace.clone(),
        session.clone(),
    ));
    tracing::info!(%session, "containers of this shim are removed about 20 s after it stops");
    if args.prune_at_start {
        session::prune_ended(&coordinator).await;
    }
    let shim = Arc::new(http::Shim {
        coordinator: coordinator.clone(),
        identity: Identity {
            id: random_id(),
            name: host_name(),
            namespace: args.namespace.clone(),
            coordinator: args.coordinator.clone(),
        },
        execs: exec::ExecStore::default(),
        forwards: ports::Forwards::default(),
        reapers: ryuk::Reapers::default(),
        pod_defaults,
    });
    let tcp = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(
        listen = %args.listen,
        coordinator = %args.coordinator,
        namespace = %args.namespace,
        "serving the Docker API (DOCKER_HOST=tcp://{})",
        args.listen
    );
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(http::serve_tcp(shim.clone(), tcp));
    if let Some(path) = &args.socket {
        let unix = http::bind_unix(path)
            .with_context(|| format!("cannot listen on the unix socket {}", path.display()))?;
        tracing::info!(socket = %path.display(), "serving the Docker API (DOCKER_HOST=unix://{})", path.display());
        tasks.spawn(http::serve_unix(shim.clone(), unix));
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot wait for SIGTERM")?;
    tokio::select! {
        _ = tasks.join_next() => anyhow::bail!("a listener stopped"),
        r = tokio::signal::ctrl_c() => {
            r.context("cannot wait for ctrl-c")?;
            tracing::info!("stopping (interrupt)");
        }
        _ = term.recv() => tracing::info!("stopping (SIGTERM)"),
    }
    if let Some(path) = &args.socket {
        let _ = std::fs::remove_file(path);
    }
    if args.cleanup_on_exit {
        session::clean_up(&coordinator).await;
    }
    Ok(())
}
