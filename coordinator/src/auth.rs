//! Who is on the other end of an agent session.
//!
//! An agent presents its projected ServiceAccount token (audience `berth`) in
//! the request's metadata. Checking it takes two steps, so the first can run
//! before anything is read from the stream: [`TokenVerifier::review`] asks
//! the apiserver (TokenReview) whether the token is valid, belongs to the
//! agent's ServiceAccount and is bound to a pod; then, once the agent's
//! `Hello` names its node, [`TokenVerifier::check_node`] checks that the pod
//! still exists, is the same pod (UID), and runs on that node.
//! [`KubeVerifier`] does both against the apiserver; tests put a fake in its
//! place. [`crate::review`] bounds and caches the calls.

use std::future::Future;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};

/// Extra keys the apiserver puts in a TokenReview of a pod-bound token.
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// What a TokenReview proved about a token: an agent pod's token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIdentity {
    /// The pod the token is bound to.
    pub pod: String,
    /// That pod's UID.
    pub pod_uid: String,
    /// The node the pod was on when the token was issued, if recorded.
    pub node: Option<String>,
}

/// An authenticated agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    /// The node it runs on.
    pub node: String,
    /// Its pod.
    pub pod: String,
}

/// Why a session was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No bearer token in the request.
    #[error(
        "no bearer token: send the projected ServiceAccount token as 'authorization: Bearer …'"
    )]
    MissingToken,
    /// The apiserver did not accept the token.
    #[error("token rejected: {0}")]
    Rejected(String),
    /// The token is valid but is not an agent's.
    #[error("token belongs to {0}, not to the node agent's ServiceAccount")]
    WrongAccount(String),
    /// The token is not bound to a pod.
    #[error("token is not bound to a pod; mount a projected ServiceAccount token")]
    NotPodBound,
    /// The token's pod is not on the claimed node.
    #[error("token's pod {pod} runs on node {actual:?}, not on {claimed:?}")]
    WrongNode {
        /// The pod.
        pod: String,
        /// Where it runs.
        actual: String,
        /// What the agent claimed.
        claimed: String,
    },
    /// The token is not even shaped like a JWT; no apiserver was asked.
    #[error("token rejected: not a JWT (three base64url parts separated by dots)")]
    Malformed,
    /// Too many token checks are in flight; nothing was asked.
    #[error("too many token checks in flight {0}; retry shortly")]
    Busy(&'static str),
    /// The apiserver could not be asked.
    #[error("cannot verify token: {0}")]
    Api(#[from] kube::Error),
}

impl AuthError {
    /// The gRPC status an agent sees.
    pub fn to_status(&self) -> tonic::Status {
        match self {
            AuthError::MissingToken | AuthError::Rejected(_) | AuthError::Malformed => {
                tonic::Status::unauthenticated(self.to_string())
            }
            AuthError::Busy(_) => tonic::Status::resource_exhausted(self.to_string()),
            AuthError::Api(_) => tonic::Status::unavailable(self.to_string()),
            _ => tonic::Status::permission_denied(self.to_string()),
        }
    }
}

/// Decides whether a token may speak for a node.
pub trait TokenVerifier: Send + Sync + 'static {
    /// Whether `token` is an agent pod's (one TokenReview); which pod.
    fn review(&self, token: &str) -> impl Future<Output = Result<TokenIdentity, AuthError>> + Send;

    /// Whether the pod of a reviewed token runs on `claimed_node` now.
    fn check_node(
        &self,
        token: &TokenIdentity,
        claimed_node: &str,
    ) -> impl Future<Output = Result<AgentIdentity, AuthError>> + Send;
}

/// Verifies tokens with the Kubernetes apiserver.
#[derive(Clone)]
pub struct KubeVerifier {
    client: kube::Client,
    namespace: String,
    service_account: String,
    audience: String,
}

impl KubeVerifier {
    /// Accepts tokens of `namespace/service_account` issued for `audience`.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        service_account: &str,
        audience: &str,
    ) -> Self {
        KubeVerifier {
            client,
            namespace: namespace.into(),
            service_account: service_account.into(),
            audience: audience.into(),
        }
    }
}

impl TokenVerifier for KubeVerifier {
    async fn review(&self, token: &str) -> Result<TokenIdentity, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let reviews: Api<TokenReview> = Api::all(self.client.clone());
        let status = reviews
            .create(&PostParams::default(), &review)
            .await?
            .status
            .unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(AuthError::Rejected(
                status.error.unwrap_or_else(|| "not authenticated".into()),
            ));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let expected = format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        );
        if username != expected {
            return Err(AuthError::WrongAccount(username));
        }
        let extra = user.extra.unwrap_or_default();
        let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
        let (Some(pod), Some(pod_uid)) = (first(POD_NAME), first(POD_UID)) else {
            return Err(AuthError::NotPodBound);
        };
        Ok(TokenIdentity {
            pod,
            pod_uid,
            node: first(NODE_NAME),
        })
    }

    async fn check_node(
        &self,
        token: &TokenIdentity,
        claimed_node: &str,
    ) -> Result<AgentIdentity, AuthError> {
        let (pod_name, pod_uid) = (&token.pod, &token.pod_uid);
        let wrong_node = |actual: String| AuthError::WrongNode {
            pod: pod_name.clone(),
            actual,
            claimed: claimed_node.to_string(),
        };
        if let Some(node) = &token.node
            && node != claimed_node
        {
            return Err(wrong_node(node.clone()));
        }
        // The TokenReview proves the pod existed when the token was issued;
        // the pod itself says where it runs now.
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let pod = pods
            .get_opt(pod_name)
            .await?
            .ok_or_else(|| AuthError::Rejected(format!("pod {pod_name} no longer exists")))?;
        if pod.metadata.uid.as_deref() != Some(pod_uid.as_str()) {
            return Err(AuthError::Rejected(format!(
                "pod {pod_name} was replaced; the token is stale"
            )));
        }
        let actual = pod.spec.and_then(|s| s.node_name).unwrap_or_default();
        if actual != claimed_node {
            return Err(wrong_node(actual));
        }
        Ok(AgentIdentity {
            node: actual,
            pod: pod_name.clone(),
        })
    }
}
