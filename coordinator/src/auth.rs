//! Who is on the other end of an agent session.
//!
//! An agent presents its projected ServiceAccount token (audience `berth`).
//! [`KubeVerifier`] asks the apiserver (TokenReview) whether the token is
//! valid, checks that it belongs to the agent's ServiceAccount, and that the
//! pod it is bound to exists, is the same pod (UID), and runs on the node the
//! agent claims. [`TokenVerifier`] lets tests put a fake in its place.

use std::future::Future;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};

/// Extra keys the apiserver puts in a TokenReview of a pod-bound token.
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";

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
    /// The apiserver could not be asked.
    #[error("cannot verify token: {0}")]
    Api(#[from] kube::Error),
}

impl AuthError {
    /// The gRPC status an agent sees.
    pub fn to_status(&self) -> tonic::Status {
        match self {
            AuthError::MissingToken | AuthError::Rejected(_) => {
                tonic::Status::unauthenticated(self.to_string())
            }
            AuthError::Api(_) => tonic::Status::unavailable(self.to_string()),
            _ => tonic::Status::permission_denied(self.to_string()),
        }
    }
}

/// Decides whether a token may speak for a node.
pub trait TokenVerifier: Send + Sync + 'static {
    /// Verifies that `token` belongs to the agent pod on `claimed_node`.
    fn verify(
        &self,
        token: &str,
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
    async fn verify(&self, token: &str, claimed_node: &str) -> Result<AgentIdentity, AuthError> {
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
        let (Some(pod_name), Some(pod_uid)) = (first(POD_NAME), first(POD_UID)) else {
            return Err(AuthError::NotPodBound);
        };
        let wrong_node = |actual: String| AuthError::WrongNode {
            pod: pod_name.clone(),
            actual,
            claimed: claimed_node.to_string(),
        };
        if let Some(node) = first(NODE_NAME)
            && node != claimed_node
        {
            return Err(wrong_node(node));
        }
        // The TokenReview proves the pod existed when the token was issued;
        // the pod itself says where it runs now.
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let pod = pods
            .get_opt(&pod_name)
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
            pod: pod_name,
        })
    }
}
