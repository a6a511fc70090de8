//! The agent's side of the coordinator session.
//!
//! [`run`] dials the coordinator, authenticates with the pod's projected
//! ServiceAccount token (re-read on every attempt: the kubelet rotates it),
//! sends `Hello` and the full inventory, then heartbeats and sends a fresh
//! inventory whenever the runtime's images change. Log requests are answered
//! by [`crate::logs::LogStreams`], one task per stream, on the same outbound
//! channel; they end with the session. When the stream breaks it
//! reconnects with exponential backoff and jitter, forever.
//!
//! A session needs the runtime: its `Hello` carries the runtime's version, and
//! a failed inventory read ends it. So the coordinator learns that a node's
//! runtime went away from the session closing (its caches say so while the
//! runtime is down), and learns the runtime's new version from the next
//! `Hello`; [`run_while_reachable`] starts that next session as soon as the
//! health monitor sees the runtime answer again.
//!
//! The coordinator speaks TLS only. The agent trusts the CA bundle in
//! [`SessionConfig::ca_file`] (the `berth-ca` ConfigMap, mounted), re-read on
//! every attempt so a rotated bundle is picked up without a restart, and
//! checks the certificate against the URL's host or
//! [`SessionConfig::tls_server_name`].

use std::path::PathBuf;
use std::time::{Duration, Instant};

use berth_proto::agent as pb;
use berth_proto::agent::agent_service_client::AgentServiceClient;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tracing::{info, warn};

use crate::inventory;
use crate::logs::LogStreams;
use crate::runtime::{ContainerLookup, ImageRuntime};
use crate::tasks::TaskRunner;

/// Capabilities this agent offers the coordinator.
pub const CAPABILITIES: &[&str] = &["inventory", "pull", "remove", "logs", "copy"];

/// How the agent reaches and talks to the coordinator.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// e.g. `https://berth-coordinator.berth-system.svc:7070`.
    pub coordinator: String,
    /// PEM bundle of the CA(s) the coordinator's certificate must chain to.
    pub ca_file: PathBuf,
    /// The name the certificate must carry, when the URL's host is not it
    /// (e.g. dialing a pod IP); default: the URL's host.
    pub tls_server_name: Option<String>,
    /// The node this agent runs on.
    pub node_name: String,
    /// The projected ServiceAccount token.
    pub token_file: PathBuf,
    /// The runtime socket, reported in `Hello`.
    pub socket: String,
    /// How often to look for image changes.
    pub inventory_poll: Duration,
}

/// Why one session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The token file could not be read.
    #[error("cannot read token {path}: {source}")]
    Token {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The coordinator URL is not `https://`.
    #[error(
        "coordinator URL {0} is not https://: the coordinator serves TLS only (e.g. https://berth-coordinator.berth-system.svc:7070)"
    )]
    NotTls(String),
    /// The CA bundle could not be read.
    #[error(
        "cannot read the CA bundle {path}: {source}; mount the ConfigMap berth-ca (key ca.crt) there, or set BERTH_CA_FILE"
    )]
    CaFile {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The coordinator's certificate does not verify against the CA bundle.
    #[error(
        "the certificate of coordinator {url} does not verify against {ca_file}: {reason}; is the berth-ca ConfigMap current, and does the certificate name the host you dial?"
    )]
    Untrusted {
        /// Its URL.
        url: String,
        /// The CA bundle used.
        ca_file: PathBuf,
        /// What rustls found wrong.
        reason: String,
    },
    /// The coordinator could not be reached.
    #[error("cannot reach coordinator {url}: {source}")]
    Connect {
        /// Its URL.
        url: String,
        /// The transport error.
        source: tonic::transport::Error,
    },
    /// The coordinator refused or broke the session.
    #[error("coordinator: {0}")]
    Status(#[from] tonic::Status),
    /// The runtime failed while the inventory was read.
    #[error("runtime: {0}")]
    Runtime(#[from] crate::cri::CriError),
    /// The coordinator went silent.
    #[error("no message from the coordinator for {0:?}")]
    Silent(Duration),
}

/// The reconnect delays: Berth's one backoff policy
/// ([`berth_proto::backoff::jittered`]) between `base` and `max`.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    delays: backon::ExponentialBackoff,
}

impl Backoff {
    /// A backoff starting at `base` and capped at `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            delays: berth_proto::backoff::jittered(base, max),
        }
    }

    /// The next delay: random in `[ceiling/2, ceiling)`, ceiling doubling per attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.max)
    }

    /// Starts over after a healthy session.
    pub fn reset(&mut self) {
        self.delays = berth_proto::backoff::jittered(self.base, self.max);
    }
}

/// Runs sessions until the process ends; tasks run on `runner`, whose
/// updates arrive on `updates`.
pub async fn run<R: ImageRuntime + ContainerLookup>(
    runner: TaskRunner<R>,
    updates: mpsc::UnboundedReceiver<pb::TaskUpdate>,
    cfg: SessionConfig,
) {
    run_while_reachable(runner, updates, cfg, watch::channel(true).1).await
}

/// Like [`run`], but each session starts only once `reachable` says the
/// runtime answers (see [`crate::health::Health::reachable`]): while the
/// runtime is away the agent does not knock at the coordinator's door with a
/// session it would have to close at once.
pub async fn run_while_reachable<R: ImageRuntime + ContainerLookup>(
    runner: TaskRunner<R>,
    mut updates: mpsc::UnboundedReceiver<pb::TaskUpdate>,
    cfg: SessionConfig,
    mut reachable: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(4));
    loop {
        if !*reachable.borrow_and_update() {
            info!("waiting for the container runtime to answer before connecting");
            // A closed channel (no monitor any more) stops the waiting, not the agent.
            let _ = reachable.wait_for(|up| *up).await;
            info!("container runtime answers; connecting");
        }
        let started = Instant::now();
        match session_once(&runner, &mut updates, &cfg).await {
            Ok(()) => info!("coordinator closed the session"),
            Err(e) => warn!(error = %e, "session ended"),
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        info!(?delay, "reconnecting");
        tokio::time::sleep(delay).await;
    }
}

async fn session_once<R: ImageRuntime + ContainerLookup>(
    runner: &TaskRunner<R>,
    updates: &mut mpsc::UnboundedReceiver<pb::TaskUpdate>,
    cfg: &SessionConfig,
) -> Result<(), SessionError> {
    let rt = runner.runtime();
    let token = std::fs::read_to_string(&cfg.token_file).map_err(|source| SessionError::Token {
        path: cfg.token_file.clone(),
        source,
    })?;
    let channel = connect(cfg).await?;

    let version = rt.version().await?;
    let mut last = inventory::read(rt, &runner.managed().all()).await?;
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(16);
    let send = |kind| pb::AgentMessage { kind: Some(kind) };
    let hello = pb::Hello {
        node_name: cfg.node_name.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        runtime: Some(inventory::runtime_info(&version, &cfg.socket)),
        capabilities: CAPABILITIES.iter().map(|c| c.to_string()).collect(),
    };
    // The channel holds 16 messages; these two cannot block.
    let _ = tx.send(send(pb::agent_message::Kind::Hello(hello))).await;
    let _ = tx
        .send(send(pb::agent_message::Kind::Inventory(last.clone())))
        .await;

    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    let bearer = format!("Bearer {}", token.trim());
    req.metadata_mut().insert(
        "authorization",
        bearer
            .parse()
            .map_err(|_| tonic::Status::invalid_argument("token is not ASCII"))?,
    );
    let mut inbound = AgentServiceClient::new(channel)
        .session(req)
        .await?
        .into_inner();

    // Dropped when this session ends, which stops its log streams.
    let mut logs = LogStreams::new(runner.shared_runtime(), &cfg.node_name, tx.clone());
    let mut heartbeat = Duration::from_secs(10);
    let mut beat = tokio::time::interval(heartbeat);
    let mut poll = tokio::time::interval(cfg.inventory_poll);
    loop {
        tokio::select! {
            msg = tokio::time::timeout(heartbeat * 3, inbound.message()) => {
                let Some(msg) = msg.map_err(|_| SessionError::Silent(heartbeat * 3))?? else {
                    return Ok(());
                };
                match msg.kind {
                    Some(pb::coordinator_message::Kind::Welcome(w)) => {
                        info!(session = %w.session_id, node = %cfg.node_name, "session established");
                        if w.heartbeat_interval_seconds > 0 {
                            heartbeat = Duration::from_secs(w.heartbeat_interval_seconds.into());
                            beat = tokio::time::interval(heartbeat);
                        }
                    }
                    Some(pb::coordinator_message::Kind::InventoryRequest(_)) => {
                        last = inventory::read(rt, &runner.managed().all()).await?;
                        if tx.send(send(pb::agent_message::Kind::Inventory(last.clone()))).await.is_err() {
                            return Ok(());
                        }
                    }
                    Some(pb::coordinator_message::Kind::Task(task)) => runner.submit(task),
                    Some(pb::coordinator_message::Kind::LogRequest(r)) => logs.start(r),
                    Some(pb::coordinator_message::Kind::LogCancel(c)) => logs.cancel(c.stream_id),
                    Some(pb::coordinator_message::Kind::Heartbeat(_))
                    | None => {}
                }
            }
            Some(update) = updates.recv() => {
                let done = update.state == pb::TaskState::Done as i32;
                if tx.send(send(pb::agent_message::Kind::TaskUpdate(update))).await.is_err() {
                    return Ok(());
                }
                // Report the new image right away rather than at the next poll.
                if done && !report_changes(runner, &tx, &mut last).await? {
                    return Ok(());
                }
            }
            _ = beat.tick() => {
                let hb = pb::Heartbeat { sent_at_unix_ms: inventory::now_ms() };
                if tx.send(send(pb::agent_message::Kind::Heartbeat(hb))).await.is_err() {
                    return Ok(());
                }
            }
            _ = poll.tick() => {
                if !report_changes(runner, &tx, &mut last).await? {
                    return Ok(());
                }
            }
        }
    }
}

/// A TLS channel to the coordinator; a certificate that does not verify is
/// [`SessionError::Untrusted`], with rustls's reason.
pub async fn connect(cfg: &SessionConfig) -> Result<Channel, SessionError> {
    endpoint(cfg)?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(|e| match certificate_problem(&e) {
            Some(reason) => SessionError::Untrusted {
                url: cfg.coordinator.clone(),
                ca_file: cfg.ca_file.clone(),
                reason,
            },
            None => SessionError::Connect {
                url: cfg.coordinator.clone(),
                source: e,
            },
        })
}

/// The coordinator's endpoint with TLS: the CA bundle read now, the server
/// name from the config or the URL.
pub fn endpoint(cfg: &SessionConfig) -> Result<Endpoint, SessionError> {
    if !cfg.coordinator.starts_with("https://") {
        return Err(SessionError::NotTls(cfg.coordinator.clone()));
    }
    let pem = std::fs::read(&cfg.ca_file).map_err(|source| SessionError::CaFile {
        path: cfg.ca_file.clone(),
        source,
    })?;
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
    if let Some(name) = &cfg.tls_server_name {
        tls = tls.domain_name(name.clone());
    }
    let connect_err = |source| SessionError::Connect {
        url: cfg.coordinator.clone(),
        source,
    };
    Endpoint::from_shared(cfg.coordinator.clone())
        .map_err(connect_err)?
        .tls_config(tls)
        .map_err(connect_err)
}

/// What rustls said about the coordinator's certificate, if that is why the
/// connection failed (it sits a few sources deep, inside an `io::Error`).
fn certificate_problem(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(e);
    while let Some(err) = next {
        let rustls_err = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<std::io::Error>()?
                .get_ref()?
                .downcast_ref::<rustls::Error>()
        });
        if let Some(r) = rustls_err {
            return matches!(
                r,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            )
            .then(|| r.to_string());
        }
        next = err.source();
    }
    None
}

/// Reads the inventory and sends it if it differs from `last`; false once
/// the session's outbound stream is gone.
async fn report_changes<R: ImageRuntime>(
    runner: &TaskRunner<R>,
    tx: &mpsc::Sender<pb::AgentMessage>,
    last: &mut pb::Inventory,
) -> Result<bool, SessionError> {
    let now = inventory::read(runner.runtime(), &runner.managed().all()).await?;
    if !inventory::changed(last, &now) {
        return Ok(true);
    }
    *last = now;
    let msg = pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Inventory(last.clone())),
    };
    Ok(tx.send(msg).await.is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays[0] <= Duration::from_millis(100));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(
            delays[7] >= Duration::from_secs(1),
            "capped ceiling 2s, jitter keeps ≥ half"
        );
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
