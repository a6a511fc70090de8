//! The shim's client session. Each shim process is one session: every call
//! carries `x-berth-session: <id>`, so the shim sees and makes only its own
//! containers (two shims in one namespace never touch each other's), and
//! [`hold`] keeps the `Containers/Session` stream open so the coordinator
//! renews the session's Lease. When the shim dies the Lease runs out and
//! the coordinator removes the session's containers — what testcontainers'
//! Ryuk does for a Docker engine.

use std::time::Duration;

use berth_proto::api as pb;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;

use crate::coordinator::Containers;
use crate::token::TokenSource;

/// Metadata key of the session on every call.
pub const HEADER: &str = "x-berth-session";

/// A fresh session ID: 16 lowercase hex digits.
pub fn new_id() -> String {
    format!("{:016x}", fastrand::u64(..))
}

/// The metadata on every coordinator call: the bearer token and, if the
/// shim holds one, its session.
#[derive(Debug, Clone, Default)]
pub struct CallMetadata {
    /// The bearer token.
    pub token: TokenSource,
    /// The session ID.
    pub session: Option<String>,
}

impl Interceptor for CallMetadata {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let mut req = self.token.call(req)?;
        if let Some(s) = &self.session {
            let value = MetadataValue::try_from(s.as_str())
                .map_err(|_| tonic::Status::internal("session ID is not a header value"))?;
            req.metadata_mut().insert(HEADER, value);
        }
        Ok(req)
    }
}

/// Holds the session open for as long as the shim runs, reconnecting (1 s,
/// doubling to 10 s) when the stream breaks — the Lease outlives a short
/// break, so the containers stay.
pub async fn hold(mut containers: Containers, namespace: String, session: String) {
    let mut delay = Duration::from_secs(1);
    loop {
        let request = pb::SessionRequest {
            namespace: namespace.clone(),
            session: session.clone(),
            ttl_seconds: 0,
        };
        match containers.session(request).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                let mut first = true;
                loop {
                    match stream.message().await {
                        Ok(Some(state)) => {
                            if first {
                                tracing::info!(%session, lease = %state.lease, "session held");
                                first = false;
                            }
                            delay = Duration::from_secs(1);
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(%session, error = %e.message(), "session stream broke");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(%session, error = %e.message(), "cannot open the session; retrying")
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Removes at once what ended sessions (shims no longer running) left in
/// the namespace (`--prune-at-start`); the coordinator would remove it by
/// itself a little later.
pub async fn prune_ended(coordinator: &crate::coordinator::Coordinator) {
    let req = pb::PruneRequest {
        namespace: coordinator.namespace.clone(),
    };
    match coordinator.containers.clone().prune_ended(req).await {
        Ok(r) => {
            let r = r.into_inner();
            tracing::info!(
                containers = r.containers.len(),
                networks = r.networks.len(),
                "pruned what ended sessions left"
            );
        }
        Err(e) => tracing::warn!(error = %e.message(), "cannot prune what ended sessions left"),
    }
}

/// Removes this session's containers, then its networks
/// (`--cleanup-on-exit`, on SIGTERM or ctrl-c).
pub async fn clean_up(coordinator: &crate::coordinator::Coordinator) {
    coordinator.remove_labelled(&[], "on exit").await;
    tracing::info!("removed this shim's containers and networks");
}
