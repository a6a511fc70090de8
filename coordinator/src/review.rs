//! Token checks that a flood of bad tokens cannot multiply.
//!
//! [`Reviews`] stands between the agent sessions and a [`TokenVerifier`]:
//!
//! 1. a token that is not shaped like a JWT is refused locally;
//! 2. answers are cached by the token's SHA-256: refusals for
//!    [`ReviewLimits::refusal_ttl`], valid tokens until their expiry but at
//!    most [`ReviewLimits::identity_ttl`]; both caches are bounded, and a
//!    flood of refusals cannot evict the valid tokens;
//! 3. apiserver calls in flight are bounded overall and per client address
//!    by an [`ApiGate`]; over a bound the caller gets [`AuthError::Busy`]
//!    (`ResourceExhausted`) at once, nothing queues.
//!
//! The gate is shared: the public API's access check
//! ([`crate::access::Authorizer`]) sends its TokenReviews and
//! SubjectAccessReviews through the same [`ApiGate`], so agents and API
//! callers together never have more than [`ReviewLimits::in_flight`] calls
//! at the apiserver. Bounding the calls in flight also bounds the
//! coordinator's connections to the apiserver: kube's HTTP/1 client carries
//! one request per connection, so its pool never holds more connections than
//! there were calls at once.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::auth::{AgentIdentity, AuthError, TokenIdentity, TokenVerifier};
use crate::metrics::METRICS;

/// Bounds of [`Reviews`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReviewLimits {
    /// apiserver calls (TokenReviews, pod reads, and the public API's
    /// TokenReviews and SubjectAccessReviews) in flight at once.
    pub in_flight: usize,
    /// apiserver calls in flight for one client address.
    pub in_flight_per_peer: usize,
    /// How long a refused token stays refused without asking again.
    pub refusal_ttl: Duration,
    /// Longest time a valid token is trusted without asking again.
    pub identity_ttl: Duration,
    /// Entries in each cache (refusals, valid tokens).
    pub cache_entries: usize,
}

impl Default for ReviewLimits {
    fn default() -> Self {
        ReviewLimits {
            in_flight: 16,
            in_flight_per_peer: 4,
            refusal_ttl: Duration::from_secs(30),
            identity_ttl: Duration::from_secs(60),
            cache_entries: 4096,
        }
    }
}

/// Longest token considered (a projected token is about 1 KiB).
const MAX_TOKEN_LEN: usize = 8192;

type Key = [u8; 32];

/// A bounded map whose entries expire; the oldest insertions go first.
#[derive(Debug)]
struct TtlCache<T> {
    entries: HashMap<Key, (T, Instant)>,
    order: VecDeque<(Key, Instant)>,
    capacity: usize,
}

impl<T: Clone> TtlCache<T> {
    fn new(capacity: usize) -> Self {
        TtlCache {
            entries: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    fn get(&self, key: &Key, now: Instant) -> Option<T> {
        self.entries
            .get(key)
            .filter(|(_, until)| *until > now)
            .map(|(v, _)| v.clone())
    }

    fn insert(&mut self, key: Key, value: T, until: Instant) {
        self.entries.insert(key, (value, until));
        self.order.push_back((key, until));
        while self.entries.len() > self.capacity || self.order.len() > 2 * self.capacity {
            let Some((old, old_until)) = self.order.pop_front() else {
                break;
            };
            // Only the newest insertion of a key owns its entry.
            if self.entries.get(&old).is_some_and(|(_, u)| *u == old_until) {
                self.entries.remove(&old);
            }
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// A refusal worth remembering: the token itself is bad.
#[derive(Debug, Clone)]
enum Refused {
    Rejected(String),
    WrongAccount(String),
    NotPodBound,
}

impl Refused {
    fn of(e: &AuthError) -> Option<Refused> {
        match e {
            AuthError::Rejected(m) => Some(Refused::Rejected(m.clone())),
            AuthError::WrongAccount(a) => Some(Refused::WrongAccount(a.clone())),
            AuthError::NotPodBound => Some(Refused::NotPodBound),
            _ => None,
        }
    }

    fn error(self) -> AuthError {
        match self {
            Refused::Rejected(m) => AuthError::Rejected(m),
            Refused::WrongAccount(a) => AuthError::WrongAccount(a),
            Refused::NotPodBound => AuthError::NotPodBound,
        }
    }
}

/// Bounded, cached access to a [`TokenVerifier`].
pub struct Reviews<V> {
    verifier: Arc<V>,
    limits: ReviewLimits,
    gate: Arc<ApiGate>,
    refusals: Mutex<TtlCache<Refused>>,
    identities: Mutex<TtlCache<TokenIdentity>>,
}

/// The bound on apiserver calls in flight, overall and per client address,
/// shared by everything that asks the apiserver on a client's behalf.
pub struct ApiGate {
    global: Semaphore,
    per_peer_max: usize,
    per_peer: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// Why [`ApiGate::enter`] refused: a bound was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// The client's address has its maximum of calls in flight.
    Peer,
    /// The coordinator has its maximum of calls in flight.
    Global,
}

impl Busy {
    /// Where the bound was reached, for messages ("… in flight {where}").
    pub fn place(self) -> &'static str {
        match self {
            Busy::Peer => "from this address",
            Busy::Global => "on the coordinator",
        }
    }
}

/// One call's place in an [`ApiGate`]; given back when dropped.
pub struct Pass<'a> {
    _permit: tokio::sync::SemaphorePermit<'a>,
    _slot: PeerSlot,
}

impl ApiGate {
    /// A gate of `limits.in_flight` calls, `limits.in_flight_per_peer` per
    /// client address.
    pub fn new(limits: &ReviewLimits) -> Self {
        ApiGate {
            global: Semaphore::new(limits.in_flight),
            per_peer_max: limits.in_flight_per_peer,
            per_peer: Arc::default(),
        }
    }

    /// A place for one call from `peer` (unknown peers share one address),
    /// or at once which bound was reached; counted in
    /// `berth_token_reviews_avoided_total` (`busy_peer`, `busy`).
    pub fn enter(&self, peer: Option<IpAddr>) -> Result<Pass<'_>, Busy> {
        let ip = peer.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let slot = {
            let mut peers = self.per_peer.lock().unwrap();
            let n = peers.entry(ip).or_default();
            if *n >= self.per_peer_max {
                METRICS.review_avoided("busy_peer");
                return Err(Busy::Peer);
            }
            *n += 1;
            PeerSlot {
                peers: self.per_peer.clone(),
                ip,
            }
        };
        let Ok(permit) = self.global.try_acquire() else {
            METRICS.review_avoided("busy");
            return Err(Busy::Global);
        };
        Ok(Pass {
            _permit: permit,
            _slot: slot,
        })
    }
}

/// One caller's share of a peer's in-flight calls.
struct PeerSlot {
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut peers = self.peers.lock().unwrap();
        if let Some(n) = peers.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                peers.remove(&self.ip);
            }
        }
    }
}

/// Whether `token` looks like a JWT: three non-empty base64url parts.
fn jwt_shaped(token: &str) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    token.len() <= MAX_TOKEN_LEN
        && parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The `exp` claim of a JWT, read without checking the signature (only
/// ever used for a token the apiserver has just accepted).
pub(crate) fn expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let exp = serde_json::from_slice::<serde_json::Value>(&json)
        .ok()?
        .get("exp")?
        .as_u64()?;
    Some(UNIX_EPOCH + Duration::from_secs(exp))
}

impl<V: TokenVerifier> Reviews<V> {
    /// Checks tokens with `verifier` within `limits`, with a gate of its own.
    pub fn new(verifier: Arc<V>, limits: ReviewLimits) -> Self {
        Self::with_gate(verifier, limits, Arc::new(ApiGate::new(&limits)))
    }

    /// Checks tokens with `verifier`, caching within `limits`, its apiserver
    /// calls bounded by `gate` (shared with other callers of the apiserver).
    pub fn with_gate(verifier: Arc<V>, limits: ReviewLimits, gate: Arc<ApiGate>) -> Self {
        Reviews {
            verifier,
            limits,
            gate,
            refusals: Mutex::new(TtlCache::new(limits.cache_entries)),
            identities: Mutex::new(TtlCache::new(limits.cache_entries)),
        }
    }

    /// Runs `call` on the apiserver if `peer` and everyone together are
    /// within their bounds, else refuses at once.
    async fn bounded<T>(
        &self,
        peer: Option<IpAddr>,
        call: impl Future<Output = Result<T, AuthError>>,
    ) -> Result<T, AuthError> {
        let _pass = self
            .gate
            .enter(peer)
            .map_err(|busy| AuthError::Busy(busy.place()))?;
        call.await
    }

    /// Who `token` belongs to, from `peer`: from the caches, else one
    /// bounded TokenReview whose answer is cached.
    pub async fn review(
        &self,
        token: &str,
        peer: Option<IpAddr>,
    ) -> Result<TokenIdentity, AuthError> {
        if !jwt_shaped(token) {
            METRICS.review_avoided("malformed");
            return Err(AuthError::Malformed);
        }
        let key: Key = Sha256::digest(token.as_bytes()).into();
        let now = Instant::now();
        if let Some(id) = self.identities.lock().unwrap().get(&key, now) {
            METRICS.review_avoided("cached_identity");
            return Ok(id);
        }
        if let Some(refused) = self.refusals.lock().unwrap().get(&key, now) {
            METRICS.review_avoided("cached_refusal");
            return Err(refused.error());
        }
        let outcome = self.bounded(peer, self.verifier.review(token)).await;
        let now = Instant::now();
        match &outcome {
            Ok(id) => {
                METRICS.token_review("authenticated");
                let ttl = match expiry(token) {
                    Some(t) => t.duration_since(SystemTime::now()).unwrap_or_default(),
                    None => self.limits.identity_ttl,
                }
                .min(self.limits.identity_ttl);
                if !ttl.is_zero() {
                    self.identities
                        .lock()
                        .unwrap()
                        .insert(key, id.clone(), now + ttl);
                }
            }
            Err(e) => match Refused::of(e) {
                Some(refused) => {
                    METRICS.token_review("refused");
                    self.refusals.lock().unwrap().insert(
                        key,
                        refused,
                        now + self.limits.refusal_ttl,
                    );
                }
                None if matches!(e, AuthError::Api(_)) => METRICS.token_review("failed"),
                None => {}
            },
        }
        outcome
    }

    /// Whether the pod of a reviewed token runs on `claimed_node` (one
    /// bounded apiserver read, never cached: pods get replaced).
    pub async fn check_node(
        &self,
        token: &TokenIdentity,
        claimed_node: &str,
        peer: Option<IpAddr>,
    ) -> Result<AgentIdentity, AuthError> {
        self.bounded(peer, self.verifier.check_node(token, claimed_node))
            .await
    }

    /// Cached (refusals, valid tokens).
    pub fn cached(&self) -> (usize, usize) {
        (
            self.refusals.lock().unwrap().len(),
            self.identities.lock().unwrap().len(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Accepts tokens whose signature part is `good`, refuses the rest,
    /// counting reviews; with `hold`, each review waits for a permit of
    /// `gate`, so tests can keep reviews in flight.
    struct Counting {
        reviews: AtomicUsize,
        gate: tokio::sync::Semaphore,
        hold: bool,
    }

    /// Valid until 2100.
    const GOOD: &str = "aGVhZA.eyJleHAiOjQxMDI0NDQ4MDB9.good";

    impl TokenVerifier for Counting {
        async fn review(&self, token: &str) -> Result<TokenIdentity, AuthError> {
            self.reviews.fetch_add(1, Ordering::SeqCst);
            if self.hold {
                self.gate.acquire().await.unwrap().forget();
            }
            if token.ends_with(".good") {
                Ok(TokenIdentity {
                    pod: "agent".into(),
                    pod_uid: "u".into(),
                    node: Some("n".into()),
                })
            } else {
                Err(AuthError::Rejected("bad".into()))
            }
        }

        async fn check_node(
            &self,
            t: &TokenIdentity,
            node: &str,
        ) -> Result<AgentIdentity, AuthError> {
            Ok(AgentIdentity {
                node: node.into(),
                pod: t.pod.clone(),
            })
        }
    }

    fn reviews(hold: bool, limits: ReviewLimits) -> Reviews<Counting> {
        Reviews::new(
            Arc::new(Counting {
                reviews: AtomicUsize::new(0),
                gate: tokio::sync::Semaphore::new(0),
                hold,
            }),
            limits,
        )
    }

    fn count(r: &Reviews<Counting>) -> usize {
        r.verifier.reviews.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn a_token_that_is_no_jwt_is_refused_without_a_review() {
        let r = reviews(false, ReviewLimits::default());
        for bad in ["not-a-token", "a.b", "a..c", "a.b.c d", &"a.".repeat(5000)] {
            let e = r.review(bad, None).await.unwrap_err();
            assert!(matches!(e, AuthError::Malformed), "{bad}: {e}");
        }
        assert_eq!(count(&r), 0);
    }

    #[tokio::test]
    async fn a_refused_token_is_reviewed_once_then_refused_from_the_cache() {
        let r = reviews(false, ReviewLimits::default());
        for _ in 0..100 {
            let e = r.review("aGVhZA.Ym9keQ.c2ln", None).await.unwrap_err();
            assert_eq!(e.to_status().code(), tonic::Code::Unauthenticated);
        }
        assert_eq!(count(&r), 1);
    }

    #[tokio::test]
    async fn a_valid_token_is_reviewed_once_within_its_ttl() {
        let r = reviews(false, ReviewLimits::default());
        for _ in 0..10 {
            assert_eq!(r.review(GOOD, None).await.unwrap().pod, "agent");
        }
        assert_eq!(count(&r), 1);
    }

    #[tokio::test]
    async fn a_valid_token_is_trusted_no_longer_than_it_lives() {
        let r = reviews(false, ReviewLimits::default());
        // exp = 1 (1970): the apiserver's word is used once, never cached.
        let expired = "aGVhZA.eyJleHAiOjF9.good";
        r.review(expired, None).await.unwrap();
        r.review(expired, None).await.unwrap();
        assert_eq!(count(&r), 2);
        assert_eq!(r.cached(), (0, 0));
    }

    #[tokio::test]
    async fn reviews_over_the_per_peer_and_global_bounds_are_refused_at_once() {
        let limits = ReviewLimits {
            in_flight: 3,
            in_flight_per_peer: 2,
            ..Default::default()
        };
        let r = Arc::new(reviews(true, limits));
        let peer_a = Some("10.0.0.1".parse().unwrap());
        let peer_b = Some("10.0.0.2".parse().unwrap());
        let spawn = |i: usize, peer| {
            let r = r.clone();
            tokio::spawn(async move { r.review(&format!("aGVhZA.{i}.c2ln"), peer).await })
        };
        let held: Vec<_> = (0..2).map(|i| spawn(i, peer_a)).collect();
        let third = spawn(2, peer_b);
        while count(&r) < 3 {
            tokio::task::yield_now().await;
        }
        let e = r.review("aGVhZA.9.c2ln", peer_a).await.unwrap_err();
        assert_eq!(e.to_status().code(), tonic::Code::ResourceExhausted, "{e}");
        let e = r
            .review("aGVhZA.9.c2ln", Some("10.0.0.3".parse().unwrap()))
            .await
            .unwrap_err();
        assert_eq!(e.to_status().code(), tonic::Code::ResourceExhausted, "{e}");
        assert_eq!(count(&r), 3, "the refused calls asked nobody");
        r.verifier.gate.add_permits(100);
        for h in held.into_iter().chain([third]) {
            let e = h.await.unwrap().unwrap_err();
            assert_eq!(e.to_status().code(), tonic::Code::Unauthenticated);
        }
        let e = r.review("aGVhZA.10.c2ln", peer_a).await.unwrap_err();
        assert_eq!(
            e.to_status().code(),
            tonic::Code::Unauthenticated,
            "slots came back"
        );
        assert_eq!(count(&r), 4);
    }

    #[test]
    fn the_caches_are_bounded_and_keep_the_newest_entries() {
        let mut c = TtlCache::new(3);
        let until = Instant::now() + Duration::from_secs(60);
        for i in 0..10u8 {
            c.insert([i; 32], i, until);
        }
        assert_eq!(c.len(), 3);
        assert_eq!(c.get(&[9; 32], Instant::now()), Some(9));
        assert_eq!(c.get(&[0; 32], Instant::now()), None);
    }

    #[test]
    fn an_expired_entry_is_not_served() {
        let mut c = TtlCache::new(3);
        let now = Instant::now();
        c.insert([1; 32], 1, now);
        assert_eq!(c.get(&[1; 32], now), None);
    }
}
