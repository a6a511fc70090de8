//! The coordinator's listeners in-process: TLS on the main port with a
//! generated certificate, the access check on `berth.v1`, plaintext health
//! on the probe port, and the node agent's own session code over TLS.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_coordinator::access::{AccessError, Caller, ResourceAccess, Reviewer, TokenVerdict};
use berth_coordinator::auth::{AgentIdentity, AuthError, TokenIdentity, TokenVerifier};
use berth_coordinator::domain::CacheDetails;
use berth_coordinator::nodes::NodeRegistry;
use berth_coordinator::server::{self, Services};
use berth_coordinator::tls::{Material, TlsAcceptor, certs};
use berth_node_agent::session::{self, SessionConfig, SessionError};
use berth_proto::api as pb;
use berth_proto::api::inventory_client::InventoryClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Agents present `agent.<node>.sig` (shaped like a JWT, so it reaches the
/// verifier): the pod `agent-<node>` on `<node>`.
struct Agents;

fn agent_token(node: &str) -> String {
    format!("agent.{node}.sig")
}

impl TokenVerifier for Agents {
    async fn review(&self, token: &str) -> Result<TokenIdentity, AuthError> {
        match token.split('.').collect::<Vec<_>>().as_slice() {
            ["agent", node, "sig"] => Ok(TokenIdentity {
                pod: format!("agent-{node}"),
                pod_uid: "uid".into(),
                node: Some(node.to_string()),
            }),
            _ => Err(AuthError::Rejected("not an agent's token".into())),
        }
    }

    async fn check_node(
        &self,
        token: &TokenIdentity,
        node: &str,
    ) -> Result<AgentIdentity, AuthError> {
        if token.node.as_deref() == Some(node) {
            Ok(AgentIdentity {
                node: node.into(),
                pod: token.pod.clone(),
            })
        } else {
            Err(AuthError::Rejected("not this node's token".into()))
        }
    }
}

/// `viewer-token` may list nodes; `nobody-token` is valid and may nothing.
struct Rbac {
    allowed: Mutex<HashSet<(String, &'static str, &'static str)>>,
}

impl Reviewer for Rbac {
    async fn review_token(&self, token: &str) -> Result<TokenVerdict, AccessError> {
        Ok(match token {
            "viewer-token" | "nobody-token" => TokenVerdict::Valid(Caller {
                username: token.trim_end_matches("-token").into(),
                ..Default::default()
            }),
            _ => TokenVerdict::Invalid("unknown token".into()),
        })
    }
    async fn review_access(&self, c: &Caller, a: &ResourceAccess) -> Result<bool, AccessError> {
        let key = (c.username.clone(), a.verb, a.resource);
        Ok(self.allowed.lock().unwrap().contains(&key))
    }
}

struct Running {
    main: String,
    health: String,
    material: Material,
    registry: Arc<NodeRegistry>,
    _stop: tokio::sync::watch::Sender<bool>,
}

async fn start() -> Running {
    let material = certs::generate("berth-system").unwrap();
    let acceptor = TlsAcceptor::from_material(&material).unwrap();
    let main = server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let health_listener = server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let (main_addr, health_addr) = (
        main.local_addr().unwrap(),
        health_listener.local_addr().unwrap(),
    );
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let health = tonic_health::server::HealthReporter::new();
    let registry = Arc::new(NodeRegistry::default());
    let rbac = Rbac {
        allowed: Mutex::new([("viewer".to_string(), "list", "nodes")].into()),
    };
    let services = Services {
        registry: registry.clone(),
        details: CacheDetails::default(),
        verifier: Arc::new(Agents),
        reviewer: rbac,
        health: health.clone(),
        leading: tokio::sync::watch::channel(true).1,
        containers: None,
    };
    tokio::spawn(server::serve_health(
        health_listener,
        health,
        stopping.clone(),
    ));
    tokio::spawn(server::serve(main, acceptor, services, stopping));
    Running {
        main: main_addr.to_string(),
        health: health_addr.to_string(),
        material,
        registry,
        _stop: stop,
    }
}

async fn tls_channel(addr: &str, ca_pem: &str) -> Channel {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

#[tokio::test]
async fn the_public_api_answers_over_tls_only_to_callers_rbac_allows() {
    let r = start().await;
    let mut api = InventoryClient::new(tls_channel(&r.main, &r.material.ca_pem).await);
    let nodes = api
        .list_nodes(with_token(pb::ListNodesRequest::default(), "viewer-token"))
        .await
        .unwrap();
    assert!(nodes.into_inner().nodes.is_empty());

    let anonymous = api
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);
    assert!(anonymous.message().contains("authorization: Bearer"));

    let refused = api
        .list_nodes(with_token(pb::ListNodesRequest::default(), "nobody-token"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(
        refused.message().contains("nobody may not list nodes"),
        "{}",
        refused.message()
    );

    // Health (and reflection) on the main port need no token.
    let status = HealthClient::new(tls_channel(&r.main, &r.material.ca_pem).await)
        .check(HealthCheckRequest::default())
        .await
        .unwrap();
    assert_eq!(status.into_inner().status, ServingStatus::Serving as i32);
}

#[tokio::test]
async fn plaintext_on_the_main_port_is_refused() {
    let r = start().await;
    let plain = async {
        let channel = Endpoint::from_shared(format!("http://{}", r.main))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?;
        let mut api = InventoryClient::new(channel);
        api.list_nodes(with_token(pb::ListNodesRequest::default(), "viewer-token"))
            .await
            .map_err(anyhow_status)?;
        Ok::<_, Box<dyn std::error::Error>>(())
    };
    let result = tokio::time::timeout(Duration::from_secs(20), plain)
        .await
        .expect("a plaintext client is answered (refused) promptly");
    assert!(result.is_err(), "plaintext got through");
}

fn anyhow_status(s: tonic::Status) -> Box<dyn std::error::Error> {
    Box::new(s)
}

#[tokio::test]
async fn the_health_port_answers_probes_in_plaintext_and_serves_nothing_else() {
    let r = start().await;
    let channel = Endpoint::from_shared(format!("http://{}", r.health))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .unwrap();
    assert_eq!(status.into_inner().status, ServingStatus::Serving as i32);
    let e = InventoryClient::new(channel)
        .list_nodes(with_token(pb::ListNodesRequest::default(), "viewer-token"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented);
}

fn agent_config(r: &Running, dir: &std::path::Path, ca_pem: &str, node: &str) -> SessionConfig {
    let token = dir.join("token");
    std::fs::write(&token, agent_token(node)).unwrap();
    let ca = dir.join("ca.crt");
    std::fs::write(&ca, ca_pem).unwrap();
    SessionConfig {
        coordinator: format!("https://{}", r.main),
        ca_file: ca,
        tls_server_name: Some(certs::server_name("berth-system")),
        node_name: node.into(),
        token_file: token,
        socket: "memory".into(),
        inventory_poll: Duration::from_millis(200),
    }
}

#[tokio::test]
async fn an_agent_session_over_tls_reports_its_node_with_the_agents_own_code() {
    let r = start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = agent_config(&r, dir.path(), &r.material.ca_pem, "node-a");
    let rt = berth_node_agent::runtime::MemRuntime::default();
    let (runner, updates) = berth_node_agent::tasks::TaskRunner::new(
        Arc::new(rt),
        "node-a",
        1,
        berth_node_agent::tasks::Managed::load(None),
    );
    let agent = tokio::spawn(session::run(runner, updates, cfg));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let node = r.registry.get("node-a");
        if node.is_some_and(|n| n.connected && n.inventory.is_some()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never connected over TLS"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.abort();
}

#[tokio::test]
async fn an_agent_says_why_it_cannot_trust_or_reach_the_coordinator() {
    let r = start().await;
    let dir = tempfile::tempdir().unwrap();
    let other_ca = certs::generate("elsewhere").unwrap().ca_pem;
    let cfg = agent_config(&r, dir.path(), &other_ca, "node-a");
    let e = session::connect(&cfg).await.unwrap_err();
    assert!(matches!(e, SessionError::Untrusted { .. }), "{e}");
    assert!(e.to_string().contains("does not verify against"), "{e}");

    let wrong_name = SessionConfig {
        tls_server_name: Some("berth-coordinator.elsewhere.svc".into()),
        ..agent_config(&r, dir.path(), &r.material.ca_pem, "node-a")
    };
    let e = session::connect(&wrong_name).await.unwrap_err();
    assert!(matches!(e, SessionError::Untrusted { .. }), "{e}");

    let missing = SessionConfig {
        ca_file: dir.path().join("absent.crt"),
        ..cfg.clone()
    };
    let e = session::connect(&missing).await.unwrap_err().to_string();
    assert!(e.contains("absent.crt") && e.contains("berth-ca"), "{e}");

    let plain = SessionConfig {
        coordinator: format!("http://{}", r.main),
        ..cfg
    };
    let e = session::connect(&plain).await.unwrap_err().to_string();
    assert!(e.contains("TLS only"), "{e}");
}
