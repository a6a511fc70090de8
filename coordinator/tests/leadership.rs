//! The coordinator's gRPC server as a standby and as the leader, over a real
//! local connection: a standby refuses agents with `Unavailable` (so an agent
//! that reached it through a stale Service endpoint retries) and its health
//! says it is not the leader; once leading it accepts agents and says so.

use std::sync::Arc;
use std::time::Duration;

use berth_coordinator::access::{AccessError, Caller, ResourceAccess, Reviewer, TokenVerdict};
use berth_coordinator::auth::{AgentIdentity, AuthError, TokenIdentity, TokenVerifier};
use berth_coordinator::domain::CacheDetails;
use berth_coordinator::health::{self, Pulse, Role};
use berth_coordinator::nodes::NodeRegistry;
use berth_coordinator::server;
use berth_proto::agent as pb;
use berth_proto::agent::agent_service_client::AgentServiceClient;
use tokio::sync::watch;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::server::HealthReporter;

/// Accepts every token for the node it claims.
struct AnyToken;

impl TokenVerifier for AnyToken {
    async fn review(&self, _token: &str) -> Result<TokenIdentity, AuthError> {
        Ok(TokenIdentity {
            pod: "agent".into(),
            pod_uid: "uid".into(),
            node: None,
        })
    }

    async fn check_node(
        &self,
        _token: &TokenIdentity,
        node: &str,
    ) -> Result<AgentIdentity, AuthError> {
        Ok(AgentIdentity {
            node: node.into(),
            pod: format!("agent-{node}"),
        })
    }
}

/// The public API is not called here: no token is valid for it.
struct NoCallers;

impl Reviewer for NoCallers {
    async fn review_token(&self, _token: &str) -> Result<TokenVerdict, AccessError> {
        Ok(TokenVerdict::Invalid("no callers in this test".into()))
    }

    async fn review_access(&self, _: &Caller, _: &ResourceAccess) -> Result<bool, AccessError> {
        Ok(false)
    }
}

/// Shaped like a JWT, so it reaches the verifier.
const TOKEN: &str = "aGVhZA.Ym9keQ.c2ln";

/// A coordinator server on a free local port; stops when dropped.
struct Coordinator {
    addr: String,
    registry: Arc<NodeRegistry>,
    leading: watch::Sender<bool>,
    role: watch::Sender<Role>,
    _stop: watch::Sender<bool>,
}

async fn start() -> Coordinator {
    let listener = server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let registry = Arc::new(NodeRegistry::default());
    let (stop, stopping) = watch::channel(false);
    let (leading, leading_rx) = watch::channel(false);
    let (role, roles) = watch::channel(Role::Standby);
    let reporter = HealthReporter::new();
    tokio::spawn(health::report(reporter.clone(), roles));
    let services = server::Services {
        registry: registry.clone(),
        details: CacheDetails::default(),
        verifier: Arc::new(AnyToken),
        reviewer: NoCallers,
        health: reporter,
        leading: leading_rx,
        containers: None,
    };
    // Plaintext: leadership, not TLS, is under test here (tls_server.rs).
    tokio::spawn(server::serve_with(
        listener,
        server::Plain,
        server::Limits::default(),
        services,
        stopping,
    ));
    Coordinator {
        addr,
        registry,
        leading,
        role,
        _stop: stop,
    }
}

/// Opens a session as `node`; the first message back, or the refusal.
async fn session(addr: &str, node: &str) -> Result<pb::coordinator_message::Kind, tonic::Status> {
    let mut client = AgentServiceClient::connect(addr.to_string()).await.unwrap();
    let hello = pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
            node_name: node.into(),
            ..Default::default()
        })),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(hello).await.unwrap();
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let mut answers = client.session(req).await?.into_inner();
    let first = answers.message().await?.and_then(|m| m.kind);
    first.ok_or_else(|| tonic::Status::internal("no first message"))
}

/// Waits up to 10 s until health of `service` answers `want`.
async fn wait_health(addr: &str, service: &str, want: ServingStatus) {
    let channel = tonic::transport::Endpoint::from_shared(addr.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let req = tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            };
            if let Ok(r) = client.check(req).await
                && r.into_inner().status == want as i32
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(seen.is_ok(), "health of {service:?} never became {want:?}");
}

#[tokio::test]
async fn a_standby_refuses_agents_with_unavailable_and_is_healthy_but_not_the_leader() {
    let c = start().await;
    wait_health(&c.addr, "", ServingStatus::Serving).await;
    wait_health(&c.addr, "berth.v1.Inventory", ServingStatus::NotServing).await;
    let refused = session(&c.addr, "node-a").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("not the leader"), "{refused:?}");
    assert!(c.registry.get("node-a").is_none());
}

#[tokio::test]
async fn once_leading_the_coordinator_accepts_agents_and_reports_the_leader_healthy() {
    let c = start().await;
    let pulse = Pulse::new();
    pulse.beat();
    c.leading.send_replace(true);
    c.role.send_replace(Role::Leader(pulse));
    wait_health(&c.addr, "berth.v1.Inventory", ServingStatus::Serving).await;
    wait_health(
        &c.addr,
        "berth.agent.v1.AgentService",
        ServingStatus::Serving,
    )
    .await;
    wait_health(&c.addr, "", ServingStatus::Serving).await;
    let first = session(&c.addr, "node-a").await.unwrap();
    assert!(
        matches!(first, pb::coordinator_message::Kind::Welcome(_)),
        "{first:?}"
    );
    assert!(c.registry.get("node-a").is_some());
}

#[tokio::test]
async fn the_probes_see_not_serving_once_the_leaders_controller_task_dies() {
    let c = start().await;
    let pulse = Pulse::new();
    let controller = tokio::spawn(pulse.clone().watch(async {
        futures::future::pending::<()>().await;
    }));
    c.leading.send_replace(true);
    c.role.send_replace(Role::Leader(pulse));
    wait_health(&c.addr, "berth.v1.Inventory", ServingStatus::Serving).await;
    wait_health(&c.addr, "", ServingStatus::Serving).await;
    controller.abort();
    wait_health(&c.addr, "", ServingStatus::NotServing).await;
}
