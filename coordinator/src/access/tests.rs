//! The access check against an in-memory reviewer: which read each method
//! needs, what callers see when refused, and what is remembered for how long.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_proto::api as pb;
use http_body_util::BodyExt;
use prost::Message;
use tonic::body::Body;
use tower::{Layer, Service, ServiceExt};

use super::layer::AccessLayer;
use super::policy::{self, Rule};
use super::*;
use base64::Engine as _;
use std::time::UNIX_EPOCH;

/// Tokens it knows, reads it allows, and how often it was asked.
#[derive(Default)]
struct Fake {
    tokens: Mutex<HashMap<String, Caller>>,
    allowed: Mutex<HashSet<(String, ResourceAccess)>>,
    token_reviews: AtomicUsize,
    access_reviews: AtomicUsize,
    down: AtomicBool,
}

impl Fake {
    fn user(&self, token: &str, name: &str) {
        let caller = Caller {
            username: name.into(),
            groups: vec!["system:authenticated".into()],
            ..Default::default()
        };
        self.tokens.lock().unwrap().insert(token.into(), caller);
    }
    fn allow(&self, user: &str, access: ResourceAccess) {
        self.allowed.lock().unwrap().insert((user.into(), access));
    }
    fn revoke_all(&self) {
        self.allowed.lock().unwrap().clear();
    }
}

impl Reviewer for Arc<Fake> {
    async fn review_token(&self, token: &str) -> Result<TokenVerdict, AccessError> {
        self.token_reviews.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(AccessError::Unavailable("connection refused".into()));
        }
        Ok(match self.tokens.lock().unwrap().get(token) {
            Some(c) => TokenVerdict::Valid(c.clone()),
            None => TokenVerdict::Invalid("invalid bearer token".into()),
        })
    }
    async fn review_access(
        &self,
        caller: &Caller,
        access: &ResourceAccess,
    ) -> Result<bool, AccessError> {
        self.access_reviews.fetch_add(1, Ordering::SeqCst);
        let key = (caller.username.clone(), access.clone());
        Ok(self.allowed.lock().unwrap().contains(&key))
    }
}

fn list_nodes() -> ResourceAccess {
    ResourceAccess {
        verb: "list",
        group: "",
        resource: "nodes",
        namespace: None,
        name: None,
    }
}

fn get_cache(ns: &str, name: &str) -> ResourceAccess {
    ResourceAccess {
        verb: "get",
        group: "berth.dev",
        resource: "imagecaches",
        namespace: Some(ns.into()),
        name: Some(name.into()),
    }
}

fn framed(m: &impl Message) -> Vec<u8> {
    let body = m.encode_to_vec();
    let mut out = vec![0];
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

fn rule_for(path: &str, m: &impl Message) -> Result<ResourceAccess, AccessError> {
    match policy::inventory(path).expect("a rule") {
        Rule::Fixed(a) => Ok(a),
        Rule::FromMessage(read) => read(&m.encode_to_vec()),
        Rule::FromMessageAll(_) => panic!("inventory methods need one access each"),
    }
}

#[test]
fn each_inventory_method_asks_for_its_own_read() {
    assert_eq!(
        rule_for(
            "/berth.v1.Inventory/ListNodes",
            &pb::ListNodesRequest::default()
        )
        .unwrap(),
        list_nodes()
    );
    let node = pb::ListNodeImagesRequest { node: "n1".into() };
    assert_eq!(
        rule_for("/berth.v1.Inventory/ListNodeImages", &node).unwrap(),
        ResourceAccess {
            verb: "get",
            name: Some("n1".into()),
            ..list_nodes()
        }
    );
    let cache = pb::GetImageCacheRequest {
        namespace: "team".into(),
        name: "warm".into(),
    };
    assert_eq!(
        rule_for("/berth.v1.Inventory/GetImageCache", &cache).unwrap(),
        get_cache("team", "warm")
    );
    let no_ns = pb::GetImageCacheRequest {
        name: "warm".into(),
        ..Default::default()
    };
    assert!(matches!(
        rule_for("/berth.v1.Inventory/GetImageCache", &no_ns),
        Err(AccessError::BadRequest(_))
    ));
    assert!(policy::inventory("/berth.v1.Inventory/DeleteEverything").is_none());
    assert!(policy::inventory("/grpc.health.v1.Health/Check").is_none());
}

/// What the guarded service saw: the callers and the decoded requests.
type Seen = Arc<Mutex<Vec<(Caller, pb::GetImageCacheRequest)>>>;

/// A fake `berth.v1.Inventory` behind the layer; it records what reached it.
fn guarded(
    fake: &Arc<Fake>,
) -> (
    impl Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible> + Clone,
    Seen,
) {
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let inner = tower::service_fn(move |req: http::Request<Body>| {
        let record = record.clone();
        async move {
            let caller = req.extensions().get::<Caller>().cloned().unwrap();
            let bytes = req.into_body().collect().await.unwrap().to_bytes();
            let msg = pb::GetImageCacheRequest::decode(&bytes[5..]).unwrap();
            record.lock().unwrap().push((caller, msg));
            Ok::<_, Infallible>(http::Response::new(Body::empty()))
        }
    });
    let authorizer = Arc::new(Authorizer::new(fake.clone()));
    (
        AccessLayer::new(authorizer, policy::inventory).layer(inner),
        seen,
    )
}

fn call(path: &str, token: Option<&str>, msg: &impl Message) -> http::Request<Body> {
    let mut b = http::Request::builder()
        .method("POST")
        .uri(format!("http://coordinator{path}"))
        .header("content-type", "application/grpc");
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    b.body(Body::new(http_body_util::Full::new(bytes::Bytes::from(
        framed(msg),
    ))))
    .unwrap()
}

/// The gRPC status in a response's headers (none: the call went through).
fn status(r: &http::Response<Body>) -> Option<tonic::Status> {
    tonic::Status::from_header_map(r.headers())
}

async fn send<S>(svc: &S, req: http::Request<Body>) -> http::Response<Body>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible> + Clone,
{
    svc.clone().oneshot(req).await.unwrap()
}

const GET: &str = "/berth.v1.Inventory/GetImageCache";

#[tokio::test]
async fn an_allowed_call_reaches_the_service_with_its_caller_and_its_message_intact() {
    let fake = Arc::new(Fake::default());
    fake.user("t-alice", "alice");
    fake.allow("alice", get_cache("team", "warm"));
    let (svc, seen) = guarded(&fake);
    let msg = pb::GetImageCacheRequest {
        namespace: "team".into(),
        name: "warm".into(),
    };
    let r = send(&svc, call(GET, Some("t-alice"), &msg)).await;
    assert!(status(&r).is_none(), "{:?}", status(&r));
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0.username, "alice");
    assert_eq!(seen[0].1, msg);
}

#[tokio::test]
async fn a_call_without_a_token_is_unauthenticated_and_says_how_to_send_one() {
    let fake = Arc::new(Fake::default());
    let (svc, seen) = guarded(&fake);
    let msg = pb::GetImageCacheRequest {
        namespace: "team".into(),
        name: "warm".into(),
    };
    let s = status(&send(&svc, call(GET, None, &msg)).await).unwrap();
    assert_eq!(s.code(), tonic::Code::Unauthenticated);
    assert!(
        s.message().contains("authorization: Bearer"),
        "{}",
        s.message()
    );
    assert!(
        s.message().contains("kubectl create token"),
        "{}",
        s.message()
    );
    let s = status(&send(&svc, call(GET, Some("forged"), &msg)).await).unwrap();
    assert_eq!(s.code(), tonic::Code::Unauthenticated);
    assert!(
        s.message().contains("invalid bearer token"),
        "{}",
        s.message()
    );
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_valid_caller_without_the_read_is_denied_with_the_verb_and_resource_named() {
    let fake = Arc::new(Fake::default());
    fake.user("t-bob", "bob");
    fake.allow("bob", get_cache("team", "warm"));
    let (svc, seen) = guarded(&fake);
    let elsewhere = pb::GetImageCacheRequest {
        namespace: "other".into(),
        name: "warm".into(),
    };
    let s = status(&send(&svc, call(GET, Some("t-bob"), &elsewhere)).await).unwrap();
    assert_eq!(s.code(), tonic::Code::PermissionDenied);
    assert!(
        s.message()
            .contains("bob may not get imagecaches.berth.dev")
            && s.message().contains("\"other\"")
            && s.message().contains("berth-viewer"),
        "{}",
        s.message()
    );
    let s = status(
        &send(
            &svc,
            call(
                "/berth.v1.Inventory/ListNodes",
                Some("t-bob"),
                &pb::ListNodesRequest::default(),
            ),
        )
        .await,
    )
    .unwrap();
    assert_eq!(s.code(), tonic::Code::PermissionDenied);
    assert!(s.message().contains("list nodes"), "{}", s.message());
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_method_without_a_rule_is_refused_even_to_a_valid_caller() {
    let fake = Arc::new(Fake::default());
    fake.user("t-alice", "alice");
    let (svc, _) = guarded(&fake);
    let msg = pb::ListNodesRequest::default();
    let s = status(
        &send(
            &svc,
            call("/berth.v1.Inventory/Drop", Some("t-alice"), &msg),
        )
        .await,
    )
    .unwrap();
    assert_eq!(s.code(), tonic::Code::PermissionDenied);
}

#[tokio::test]
async fn an_apiserver_that_cannot_be_asked_makes_the_call_unavailable_not_allowed() {
    let fake = Arc::new(Fake::default());
    fake.down.store(true, Ordering::SeqCst);
    let (svc, seen) = guarded(&fake);
    let msg = pb::ListNodesRequest::default();
    let s =
        status(&send(&svc, call("/berth.v1.Inventory/ListNodes", Some("t"), &msg)).await).unwrap();
    assert_eq!(s.code(), tonic::Code::Unavailable);
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_valid_token_is_reviewed_once_a_minute_and_a_rejected_one_every_thirty_seconds() {
    let fake = Arc::new(Fake::default());
    fake.user("t-alice", "alice");
    let auth = Authorizer::new(fake.clone());
    for _ in 0..3 {
        auth.authenticate(Some("t-alice"), None).await.unwrap();
    }
    assert_eq!(fake.token_reviews.load(Ordering::SeqCst), 1);
    tokio::time::advance(TOKEN_TTL).await;
    auth.authenticate(Some("t-alice"), None).await.unwrap();
    assert_eq!(fake.token_reviews.load(Ordering::SeqCst), 2);

    for _ in 0..3 {
        assert!(matches!(
            auth.authenticate(Some("nope"), None).await,
            Err(AccessError::InvalidToken(_))
        ));
    }
    assert_eq!(fake.token_reviews.load(Ordering::SeqCst), 3);
    tokio::time::advance(REFUSAL_TTL).await;
    assert!(auth.authenticate(Some("nope"), None).await.is_err());
    assert_eq!(fake.token_reviews.load(Ordering::SeqCst), 4);
    assert!(matches!(
        auth.authenticate(None, None).await,
        Err(AccessError::MissingToken)
    ));
}

#[tokio::test(start_paused = true)]
async fn a_verdict_is_reused_for_ten_seconds_then_asked_again() {
    let fake = Arc::new(Fake::default());
    fake.allow("alice", list_nodes());
    let auth = Authorizer::new(fake.clone());
    let alice = Caller {
        username: "alice".into(),
        ..Default::default()
    };
    auth.authorize(&alice, &list_nodes(), None).await.unwrap();
    fake.revoke_all();
    tokio::time::advance(VERDICT_TTL - Duration::from_millis(1)).await;
    auth.authorize(&alice, &list_nodes(), None).await.unwrap();
    assert_eq!(fake.access_reviews.load(Ordering::SeqCst), 1);
    tokio::time::advance(Duration::from_millis(1)).await;
    let e = auth
        .authorize(&alice, &list_nodes(), None)
        .await
        .unwrap_err();
    assert!(matches!(e, AccessError::Denied { .. }), "{e}");
    assert_eq!(fake.access_reviews.load(Ordering::SeqCst), 2);
    // The refusal is remembered too.
    assert!(auth.authorize(&alice, &list_nodes(), None).await.is_err());
    assert_eq!(fake.access_reviews.load(Ordering::SeqCst), 2);
}

fn jwt_with_exp(exp: u64) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!(
        "{}.{}.sig",
        b64(r#"{"alg":"RS256"}"#),
        b64(&format!(r#"{{"sub":"x","exp":{exp}}}"#))
    )
}

#[test]
fn a_token_is_trusted_until_it_expires_but_never_longer_than_a_minute() {
    let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
    assert_eq!(
        token_ttl(&jwt_with_exp(1_000_005), now),
        Duration::from_secs(5)
    );
    assert_eq!(token_ttl(&jwt_with_exp(1_003_600), now), TOKEN_TTL);
    assert_eq!(token_ttl(&jwt_with_exp(999_000), now), Duration::ZERO);
    assert_eq!(token_ttl("opaque-static-token", now), TOKEN_TTL);
}

#[tokio::test]
async fn questions_beyond_the_shared_gate_are_refused_at_once_without_asking() {
    let fake = Arc::new(Fake::default());
    fake.user("t-alice", "alice");
    let full = ReviewLimits {
        in_flight: 0,
        ..Default::default()
    };
    let auth = Authorizer::with_gate(fake.clone(), Arc::new(ApiGate::new(&full)));
    let e = auth.authenticate(Some("t-alice"), None).await.unwrap_err();
    assert!(matches!(e, AccessError::Busy(_)), "{e}");
    assert_eq!(e.to_status().code(), tonic::Code::ResourceExhausted);
    assert_eq!(fake.token_reviews.load(Ordering::SeqCst), 0);
}

fn rules_for(path: &str, m: &impl Message) -> Vec<ResourceAccess> {
    match policy::containers(path).expect("a rule") {
        Rule::Fixed(a) => vec![a],
        Rule::FromMessage(read) => vec![read(&m.encode_to_vec()).unwrap()],
        Rule::FromMessageAll(read) => read(&m.encode_to_vec()).unwrap(),
    }
}

#[test]
fn a_container_on_a_network_needs_services_as_well_as_pods() {
    let plain = pb::CreateContainerRequest {
        namespace: "ci".into(),
        spec: Some(pb::ContainerSpec::default()),
    };
    let needs = rules_for("/berth.v1.Containers/Create", &plain);
    assert_eq!(
        needs
            .iter()
            .map(|a| (a.verb, a.resource))
            .collect::<Vec<_>>(),
        [("create", "pods")]
    );
    let mut networked = plain.clone();
    networked.spec.as_mut().unwrap().networks = vec!["backend".into()];
    let needs = rules_for("/berth.v1.Containers/Create", &networked);
    assert_eq!(
        needs
            .iter()
            .map(|a| (a.verb, a.resource))
            .collect::<Vec<_>>(),
        [("create", "pods"), ("create", "services")]
    );
    assert!(needs.iter().all(|a| a.namespace.as_deref() == Some("ci")));
    let mut published = plain.clone();
    published.spec.as_mut().unwrap().ports = vec![pb::PortBinding::default()];
    assert_eq!(
        rules_for("/berth.v1.Containers/Create", &published).len(),
        2
    );
    let connect = pb::ConnectRequest {
        namespace: "ci".into(),
        ..Default::default()
    };
    let needs = rules_for("/berth.v1.Networks/DisconnectContainer", &connect);
    assert_eq!((needs[0].verb, needs[0].resource), ("delete", "services"));
    // A network's answer names its containers and their addresses.
    let inspect = pb::NetworkRequest {
        namespace: "ci".into(),
        id: "n".into(),
    };
    let needs = rules_for("/berth.v1.Networks/Inspect", &inspect);
    assert!(
        needs
            .iter()
            .any(|a| (a.verb, a.resource) == ("list", "pods"))
    );
}
