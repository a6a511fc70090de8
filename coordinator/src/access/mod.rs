//! Who may call the public API: Kubernetes decides.
//!
//! Every call to a guarded service (`berth.v1.*`) carries
//! `authorization: Bearer <token>`. The [`layer::AccessLayer`] in front of
//! those services finds the method's [`policy::Rule`] (which verb on which
//! resource, possibly naming the request's namespace), asks an [`Authorizer`]
//! who the token belongs to (TokenReview) and whether that caller may do the
//! read (SubjectAccessReview), and only then lets the call through, with the
//! [`Caller`] in the request's extensions. Answers are remembered briefly in
//! [`cache::TtlCache`]s: a valid token until it expires (at most
//! [`TOKEN_TTL`]), a rejected one for [`REFUSAL_TTL`], a verdict for
//! [`VERDICT_TTL`]. Every question that does reach the apiserver passes the
//! coordinator's one [`ApiGate`] (shared with the agents' token reviews,
//! [`crate::review`]): bounded in flight overall and per client address,
//! refused at once (`ResourceExhausted`) beyond. [`kube::KubeReviewer`] asks
//! the apiserver; tests put an in-memory [`Reviewer`] in its place.
//!
//! Health and reflection stay outside the layer, so `grpcurl list` works
//! without a token; the agent protocol has its own check ([`crate::auth`]).

pub mod cache;
pub mod kube;
pub mod layer;
pub mod policy;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use cache::TtlCache;

use crate::review::{ApiGate, ReviewLimits};

/// How long a valid token is trusted without asking again (less if it
/// expires sooner).
pub const TOKEN_TTL: Duration = Duration::from_secs(60);
/// How long a token the apiserver rejected stays rejected without asking
/// again (as for agents' tokens, [`ReviewLimits::refusal_ttl`]).
pub const REFUSAL_TTL: Duration = Duration::from_secs(30);
/// How long an allow or deny verdict is reused.
pub const VERDICT_TTL: Duration = Duration::from_secs(10);
/// Most tokens and verdicts remembered at once (each).
pub const CACHE_CAPACITY: usize = 4096;
/// The ClusterRole that grants every read of the public API.
pub const VIEWER_ROLE: &str = "berth-viewer";

/// What an administrator can do about a refusal: reads of the inventory
/// come with the viewer role; container calls need the caller's own rights
/// on pods in the namespace.
fn denial_hint(access: &ResourceAccess) -> String {
    if access.resource.starts_with("pods") {
        format!(
            "grant them {} on {} in that namespace (a Role and RoleBinding)",
            access.verb, access.resource
        )
    } else {
        format!("bind the ClusterRole {VIEWER_ROLE} to them (or grant that verb on that resource)")
    }
}

/// Who called, as the apiserver's TokenReview named them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Caller {
    /// e.g. `system:serviceaccount:team:viewer` or `alice`.
    pub username: String,
    /// The user's UID, if any.
    pub uid: String,
    /// Groups, e.g. `system:authenticated`.
    pub groups: Vec<String>,
    /// Extra attributes the authenticator added.
    pub extra: BTreeMap<String, Vec<String>>,
}

/// One read the caller must be allowed (a SubjectAccessReview's resource
/// attributes).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResourceAccess {
    /// `get`, `list`, …
    pub verb: &'static str,
    /// API group; empty for core.
    pub group: &'static str,
    /// e.g. `nodes`, `imagecaches`.
    pub resource: &'static str,
    /// The namespace of a namespaced resource.
    pub namespace: Option<String>,
    /// One object's name, if the call reads one.
    pub name: Option<String>,
}

impl std::fmt::Display for ResourceAccess {
    /// `get imagecaches.berth.dev "warm" in namespace "default"`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.verb, self.resource)?;
        if !self.group.is_empty() {
            write!(f, ".{}", self.group)?;
        }
        if let Some(name) = &self.name {
            write!(f, " {name:?}")?;
        }
        if let Some(ns) = &self.namespace {
            write!(f, " in namespace {ns:?}")?;
        }
        Ok(())
    }
}

/// What a TokenReview said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenVerdict {
    /// The token is valid and belongs to this caller.
    Valid(Caller),
    /// The apiserver did not accept it, and why.
    Invalid(String),
}

/// Why a call was refused. [`AccessError::to_status`] is the one place it
/// becomes a gRPC status.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AccessError {
    /// No `authorization: Bearer …` metadata.
    #[error(
        "no bearer token: pass one as -H \"authorization: Bearer $(kubectl create token SA -n NS)\" for a ServiceAccount bound to the ClusterRole {VIEWER_ROLE}"
    )]
    MissingToken,
    /// The apiserver rejected the token.
    #[error("token rejected by the apiserver: {0}")]
    InvalidToken(String),
    /// RBAC does not allow the read.
    #[error("{user} may not {access}: {}", denial_hint(access))]
    Denied {
        /// The caller's user name.
        user: String,
        /// What was refused.
        access: ResourceAccess,
    },
    /// The method has no rule, so nobody may call it.
    #[error("{0} has no access rule; refused")]
    NoRule(String),
    /// The request cannot be read far enough to decide.
    #[error("{0}")]
    BadRequest(String),
    /// The apiserver could not be asked.
    #[error("cannot check the caller with the apiserver: {0}")]
    Unavailable(String),
    /// Too many apiserver questions are in flight; nothing was asked.
    #[error("too many token and access checks in flight {0}; retry shortly")]
    Busy(&'static str),
}

impl AccessError {
    /// The gRPC status the caller sees.
    pub fn to_status(&self) -> tonic::Status {
        let msg = self.to_string();
        match self {
            AccessError::MissingToken | AccessError::InvalidToken(_) => {
                tonic::Status::unauthenticated(msg)
            }
            AccessError::Denied { .. } | AccessError::NoRule(_) => {
                tonic::Status::permission_denied(msg)
            }
            AccessError::BadRequest(_) => tonic::Status::invalid_argument(msg),
            AccessError::Unavailable(_) => tonic::Status::unavailable(msg),
            AccessError::Busy(_) => tonic::Status::resource_exhausted(msg),
        }
    }
}

/// Answers the two questions of an access check; the real one asks the
/// apiserver ([`kube::KubeReviewer`]).
pub trait Reviewer: Send + Sync + 'static {
    /// Who `token` belongs to (TokenReview, the apiserver's own audience).
    fn review_token(
        &self,
        token: &str,
    ) -> impl Future<Output = Result<TokenVerdict, AccessError>> + Send;

    /// Whether `caller` may do `access` (SubjectAccessReview).
    fn review_access(
        &self,
        caller: &Caller,
        access: &ResourceAccess,
    ) -> impl Future<Output = Result<bool, AccessError>> + Send;
}

/// A [`Reviewer`] with its answers remembered and its questions bounded.
pub struct Authorizer<R> {
    reviewer: R,
    gate: Arc<ApiGate>,
    tokens: TtlCache<[u8; 32], Caller>,
    refusals: TtlCache<[u8; 32], String>,
    verdicts: TtlCache<(Caller, ResourceAccess), bool>,
}

impl<R: Reviewer> Authorizer<R> {
    /// Asks `reviewer` through a gate of its own with the default bounds
    /// (tests; the server shares one gate with the agents' reviews).
    pub fn new(reviewer: R) -> Self {
        Self::with_gate(reviewer, Arc::new(ApiGate::new(&ReviewLimits::default())))
    }

    /// Asks `reviewer`, at most as many questions at once as `gate` lets
    /// through, remembering up to [`CACHE_CAPACITY`] answers of each kind.
    pub fn with_gate(reviewer: R, gate: Arc<ApiGate>) -> Self {
        Authorizer {
            reviewer,
            gate,
            tokens: TtlCache::new(CACHE_CAPACITY),
            refusals: TtlCache::new(CACHE_CAPACITY),
            verdicts: TtlCache::new(CACHE_CAPACITY),
        }
    }

    /// The caller `token`, sent from `peer`, belongs to. Valid tokens are
    /// remembered (by their SHA-256) until they expire, at most
    /// [`TOKEN_TTL`]; rejected ones for [`REFUSAL_TTL`]. Any token shape is
    /// accepted for review: API callers may use static or OIDC tokens.
    pub async fn authenticate(
        &self,
        token: Option<&str>,
        peer: Option<IpAddr>,
    ) -> Result<Caller, AccessError> {
        let token = token
            .filter(|t| !t.is_empty())
            .ok_or(AccessError::MissingToken)?;
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(caller) = self.tokens.get(&key) {
            return Ok(caller);
        }
        if let Some(why) = self.refusals.get(&key) {
            return Err(AccessError::InvalidToken(why));
        }
        let verdict = {
            let _pass = self
                .gate
                .enter(peer)
                .map_err(|busy| AccessError::Busy(busy.place()))?;
            self.reviewer.review_token(token).await?
        };
        match verdict {
            TokenVerdict::Valid(caller) => {
                let ttl = token_ttl(token, SystemTime::now());
                self.tokens.insert(key, caller.clone(), ttl);
                Ok(caller)
            }
            TokenVerdict::Invalid(why) => {
                self.refusals.insert(key, why.clone(), REFUSAL_TTL);
                Err(AccessError::InvalidToken(why))
            }
        }
    }

    /// Ok if `caller` (calling from `peer`) may do `access`; the verdict,
    /// either way, is reused for [`VERDICT_TTL`].
    pub async fn authorize(
        &self,
        caller: &Caller,
        access: &ResourceAccess,
        peer: Option<IpAddr>,
    ) -> Result<(), AccessError> {
        let key = (caller.clone(), access.clone());
        let allowed = match self.verdicts.get(&key) {
            Some(allowed) => allowed,
            None => {
                let allowed = {
                    let _pass = self
                        .gate
                        .enter(peer)
                        .map_err(|busy| AccessError::Busy(busy.place()))?;
                    self.reviewer.review_access(caller, access).await?
                };
                self.verdicts.insert(key, allowed, VERDICT_TTL);
                allowed
            }
        };
        if allowed {
            Ok(())
        } else {
            Err(AccessError::Denied {
                user: caller.username.clone(),
                access: access.clone(),
            })
        }
    }
}

/// How long a valid token may be trusted from `now`: until its JWT `exp`
/// claim (read, not verified: the apiserver verified the token), at most
/// [`TOKEN_TTL`]; a token without a readable `exp` gets [`TOKEN_TTL`].
pub fn token_ttl(token: &str, now: SystemTime) -> Duration {
    match crate::review::expiry(token) {
        Some(exp) => exp.duration_since(now).unwrap_or_default().min(TOKEN_TTL),
        None => TOKEN_TTL,
    }
}

#[cfg(test)]
mod tests;
