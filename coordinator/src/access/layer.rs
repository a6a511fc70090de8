//! The tower layer that puts the access check in front of gRPC services.
//!
//! [`AccessLayer::layer`] wraps a generated tonic server; the wrapper keeps
//! its service name, so it is added to the router like the server itself.
//! For each call it reads the bearer token, looks up the method's rule in the
//! [`Policy`], reads the first message if the rule needs it (and hands the
//! body on intact), and either answers with the refusal's gRPC status or
//! calls the service with the [`Caller`] in the request's extensions.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures::future::BoxFuture;
use http_body_util::{BodyExt, BodyStream, StreamBody};
use tonic::body::Body;
use tonic::server::NamedService;

use super::policy::{Policy, Rule};
use super::{AccessError, Authorizer, Caller, Reviewer};

/// The largest first message read to decide a call (the largest any guarded
/// service takes; each service then applies its own limit).
const MAX_MESSAGE: usize = crate::server::MAX_CONTAINER_MESSAGE;

/// Wraps services in [`Guarded`].
pub struct AccessLayer<R> {
    authorizer: Arc<Authorizer<R>>,
    policy: Policy,
}

impl<R> Clone for AccessLayer<R> {
    fn clone(&self) -> Self {
        AccessLayer {
            authorizer: self.authorizer.clone(),
            policy: self.policy,
        }
    }
}

impl<R> AccessLayer<R> {
    /// Checks calls with `authorizer` against `policy`.
    pub fn new(authorizer: Arc<Authorizer<R>>, policy: Policy) -> Self {
        AccessLayer { authorizer, policy }
    }
}

impl<S, R> tower::Layer<S> for AccessLayer<R> {
    type Service = Guarded<S, R>;

    fn layer(&self, inner: S) -> Guarded<S, R> {
        Guarded {
            inner,
            authorizer: self.authorizer.clone(),
            policy: self.policy,
        }
    }
}

/// A gRPC service behind the access check.
pub struct Guarded<S, R> {
    inner: S,
    authorizer: Arc<Authorizer<R>>,
    policy: Policy,
}

impl<S: Clone, R> Clone for Guarded<S, R> {
    fn clone(&self) -> Self {
        Guarded {
            inner: self.inner.clone(),
            authorizer: self.authorizer.clone(),
            policy: self.policy,
        }
    }
}

impl<S: NamedService, R> NamedService for Guarded<S, R> {
    const NAME: &'static str = S::NAME;
}

/// The token of `authorization: Bearer <token>`, if any.
pub fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The client's IP, as the accept loop recorded it (`TcpConnectInfo` in the
/// request's extensions); `None` when the request did not come through it.
fn peer(req: &http::Request<Body>) -> Option<std::net::IpAddr> {
    req.extensions()
        .get::<tonic::transport::server::TcpConnectInfo>()
        .and_then(|i| i.remote_addr)
        .map(|a| a.ip())
}

/// Reads the body up to the end of the first gRPC message; returns every
/// byte read (to be sent on) and where the message lies in it.
async fn first_message(body: &mut Body) -> Result<(Bytes, std::ops::Range<usize>), AccessError> {
    let mut buf = BytesMut::new();
    loop {
        if buf.len() >= 5 {
            if buf[0] != 0 {
                return Err(AccessError::BadRequest(
                    "compressed requests are not accepted here".into(),
                ));
            }
            let len = (&buf[1..5]).get_u32() as usize;
            if len > MAX_MESSAGE {
                return Err(AccessError::BadRequest(format!(
                    "request message of {len} bytes exceeds {MAX_MESSAGE}"
                )));
            }
            if buf.len() >= 5 + len {
                return Ok((buf.freeze(), 5..5 + len));
            }
        }
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    buf.extend_from_slice(data);
                }
            }
            Some(Err(e)) => return Err(AccessError::BadRequest(format!("reading request: {e}"))),
            None => {
                return Err(AccessError::BadRequest(
                    "the request ended before its first message".into(),
                ));
            }
        }
    }
}

/// Reads the accesses a call needs from its first message, and hands back
/// the request with its body intact.
async fn from_first_message(
    req: http::Request<Body>,
    read: impl FnOnce(&[u8]) -> Result<Vec<super::ResourceAccess>, AccessError>,
) -> Result<(Vec<super::ResourceAccess>, http::Request<Body>), AccessError> {
    let (parts, mut body) = req.into_parts();
    let (read_so_far, message) = first_message(&mut body).await?;
    let accesses = read(&read_so_far[message])?;
    let replay = futures::stream::once(async move {
        Ok::<_, tonic::Status>(http_body::Frame::data(read_so_far))
    });
    let body = Body::new(StreamBody::new(futures::StreamExt::chain(
        replay,
        BodyStream::new(body),
    )));
    Ok((accesses, http::Request::from_parts(parts, body)))
}

/// The whole check for one call; on success the request goes on, body intact.
pub async fn check<R: Reviewer>(
    authorizer: &Authorizer<R>,
    policy: Policy,
    req: http::Request<Body>,
) -> Result<(Caller, http::Request<Body>), AccessError> {
    let path = req.uri().path().to_string();
    let rule = policy(&path).ok_or_else(|| AccessError::NoRule(path.clone()))?;
    let peer = peer(&req);
    let caller = authorizer.authenticate(bearer(req.headers()), peer).await?;
    let (accesses, req) = match rule {
        Rule::Fixed(access) => (vec![access], req),
        Rule::FromMessage(read) => from_first_message(req, |m| Ok(vec![read(m)?])).await?,
        Rule::FromMessageAll(read) => from_first_message(req, read).await?,
    };
    for access in &accesses {
        authorizer.authorize(&caller, access, peer).await?;
    }
    Ok((caller, req))
}

impl<S, R> tower::Service<http::Request<Body>> for Guarded<S, R>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    R: Reviewer,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The clone that was polled ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let authorizer = self.authorizer.clone();
        let policy = self.policy;
        let path = req.uri().path().to_string();
        Box::pin(async move {
            match check(&authorizer, policy, req).await {
                Ok((caller, mut req)) => {
                    req.extensions_mut().insert(caller);
                    inner.call(req).await
                }
                Err(e) => {
                    tracing::info!(%path, error = %e, "public API call refused");
                    Ok(e.to_status().into_http())
                }
            }
        })
    }
}
