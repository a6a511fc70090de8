//! The coordinator's side of `berth.agent.v1.AgentService/Session`.
//!
//! A session is accepted only on the leader (a standby answers `Unavailable`,
//! "not the leader; reconnect", so an agent that reached it through a stale
//! Service endpoint retries), and only if the bearer token in its metadata
//! is an agent pod's and the first message, a `Hello`, names the node that
//! pod runs on. The order is fixed: leadership, then the token, then the
//! `Hello`, then the node. The token is checked before a single byte of the
//! stream is read, so a caller without credentials never makes the
//! coordinator decode a message; at most [`SessionLimits::unauthenticated`]
//! sessions are being checked at once, and the checks themselves are bounded
//! and cached ([`Reviews`]).
//! Afterwards every message refreshes the node's `last_seen`, inventories
//! replace the node's image list, and a session silent for three heartbeat
//! intervals is closed (the agent reconnects).

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use berth_proto::agent as pb;
use berth_proto::agent::agent_service_server::AgentService;
use futures::Stream;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::auth::TokenVerifier;
use crate::nodes::{NodeRegistry, SessionId};
use crate::review::{ReviewLimits, Reviews};

/// How often agents are asked to send a heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long the first message may take.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounds on sessions not yet authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Sessions between arrival and the end of their authentication.
    pub unauthenticated: usize,
    /// The token checks.
    pub reviews: ReviewLimits,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            unauthenticated: 256,
            reviews: ReviewLimits::default(),
        }
    }
}

/// Serves agent sessions into a [`NodeRegistry`].
pub struct AgentSessions<V> {
    registry: Arc<NodeRegistry>,
    reviews: Arc<Reviews<V>>,
    unauthenticated: Arc<Semaphore>,
    leading: watch::Receiver<bool>,
    stopping: watch::Receiver<bool>,
}

impl<V: TokenVerifier> AgentSessions<V> {
    /// Sessions authenticated through `reviews`, at most `unauthenticated`
    /// of them being checked at once, recorded in `registry`, accepted while
    /// `leading` is true; all end when `stopping` turns true, so agents move
    /// to the next coordinator instead of holding this one open through its
    /// shutdown.
    pub fn new(
        registry: Arc<NodeRegistry>,
        reviews: Arc<Reviews<V>>,
        unauthenticated: usize,
        leading: watch::Receiver<bool>,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        AgentSessions {
            registry,
            reviews,
            unauthenticated: Arc::new(Semaphore::new(unauthenticated)),
            leading,
            stopping,
        }
    }
}

type Outbound = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

fn bearer<T>(req: &Request<T>) -> Option<String> {
    let v = req.metadata().get("authorization")?.to_str().ok()?;
    let t = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))?;
    Some(t.trim().to_string())
}

#[tonic::async_trait]
impl<V: TokenVerifier> AgentService for AgentSessions<V> {
    type SessionStream = Outbound;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        if !*self.leading.borrow() {
            return Err(Status::unavailable("not the leader; reconnect"));
        }
        let token =
            bearer(&request).ok_or_else(|| crate::auth::AuthError::MissingToken.to_status())?;
        let Ok(_checking) = self.unauthenticated.clone().try_acquire_owned() else {
            crate::metrics::METRICS.review_avoided("too_many_unauthenticated");
            return Err(Status::resource_exhausted(
                "too many sessions being authenticated; retry shortly",
            ));
        };
        let peer = request.remote_addr().map(|a| a.ip());
        // Nothing is read from the stream before the token is known good.
        let reviewed = self.reviews.review(&token, peer).await.map_err(|e| {
            warn!(?peer, error = %e, "agent token refused");
            e.to_status()
        })?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 10s"))??;
        let hello = match first.and_then(|m| m.kind) {
            Some(pb::agent_message::Kind::Hello(h)) if !h.node_name.is_empty() => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a session must be a Hello naming the node",
                ));
            }
        };
        let node = hello.node_name.clone();
        let identity = self
            .reviews
            .check_node(&reviewed, &node, peer)
            .await
            .map_err(|e| {
                warn!(node = %node, error = %e, "agent refused");
                e.to_status()
            })?;
        let (tx, rx) = mpsc::channel(256);
        let session = self
            .registry
            .connect(hello, SystemTime::now(), Some(tx.clone()));
        info!(node = %node, pod = %identity.pod, session, "agent connected");

        let welcome = pb::CoordinatorMessage {
            kind: Some(pb::coordinator_message::Kind::Welcome(pb::Welcome {
                session_id: format!("{node}/{session}"),
                heartbeat_interval_seconds: HEARTBEAT.as_secs() as u32,
            })),
        };
        tx.send(Ok(welcome))
            .await
            .map_err(|_| Status::cancelled("agent went away"))?;
        let registry = self.registry.clone();
        let stopping = self.stopping.clone();
        tokio::spawn(async move {
            let outcome = pump(&registry, &node, session, inbound, tx, stopping).await;
            registry.disconnect(&node, session);
            match outcome {
                Ok(()) => info!(node = %node, session, "agent disconnected"),
                Err(e) => info!(node = %node, session, error = %e, "agent session ended"),
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Reads an agent's messages until the stream ends, goes silent or is replaced.
async fn pump(
    registry: &NodeRegistry,
    node: &str,
    session: SessionId,
    mut inbound: Streaming<pb::AgentMessage>,
    tx: mpsc::Sender<Result<pb::CoordinatorMessage, Status>>,
    mut stopping: watch::Receiver<bool>,
) -> Result<(), Status> {
    loop {
        let msg = tokio::select! {
            m = tokio::time::timeout(HEARTBEAT * 3, inbound.message()) => {
                m.map_err(|_| Status::deadline_exceeded("agent silent for three heartbeats"))??
            }
            _ = tx.closed() => return Ok(()),
            _ = stopping.wait_for(|s| *s) => return Err(Status::unavailable("coordinator shutting down")),
        };
        let Some(msg) = msg else { return Ok(()) };
        let now = SystemTime::now();
        let current = match msg.kind {
            Some(pb::agent_message::Kind::Inventory(inv)) => {
                registry.update_inventory(node, session, inv, now)
            }
            Some(pb::agent_message::Kind::TaskUpdate(u)) => {
                if registry.copies().deliver(node, &u) {
                    registry.touch(node, session, now)
                } else {
                    registry.task_update(node, session, &u, std::time::Instant::now())
                }
            }
            Some(pb::agent_message::Kind::LogData(data)) => {
                registry.deliver_log(node, data);
                registry.touch(node, session, now)
            }
            Some(pb::agent_message::Kind::Heartbeat(_)) | None => {
                registry.touch(node, session, now)
            }
            Some(pb::agent_message::Kind::Hello(_)) => {
                return Err(Status::invalid_argument("Hello sent twice"));
            }
        };
        if !current {
            return Err(Status::aborted(
                "a newer session of this node replaced this one",
            ));
        }
    }
}
