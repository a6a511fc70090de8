//! How long a call may take to start its answer, per method: most calls
//! answer within [`crate::server::RESPONSE_TIMEOUT`] or fail with
//! `DeadlineExceeded`, but some wait by design — `Containers/Wait` blocks
//! until a container ends, `Containers/Start` until its image is pulled and
//! it runs — and carry their own limits instead. tonic's server-wide
//! timeout cannot tell them apart; this layer can.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::body::Body;

/// Applies `limit` to every call whose path starts with none of `exempt`.
#[derive(Debug, Clone)]
pub struct DeadlineLayer {
    limit: Duration,
    exempt: &'static [&'static str],
}

impl DeadlineLayer {
    /// A deadline of `limit`, except for paths under the `exempt` prefixes
    /// (e.g. `/berth.v1.Containers/`).
    pub fn new(limit: Duration, exempt: &'static [&'static str]) -> Self {
        DeadlineLayer { limit, exempt }
    }
}

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`DeadlineLayer`] makes.
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    layer: DeadlineLayer,
}

impl<S, B> tower::Service<http::Request<B>> for Deadline<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        let bounded = !self.layer.exempt.iter().any(|p| path.starts_with(p));
        let limit = self.layer.limit;
        let call = self.inner.call(req);
        if !bounded {
            return Box::pin(call);
        }
        Box::pin(async move {
            match tokio::time::timeout(limit, call).await {
                Ok(answer) => answer,
                Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                    "no answer within {limit:?}"
                ))
                .into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tower::{Layer, Service, ServiceExt};

    use super::*;

    /// Answers after `delay`.
    fn slow(
        delay: Duration,
    ) -> impl Service<
        http::Request<()>,
        Response = http::Response<Body>,
        Error = Infallible,
        Future = impl Future<Output = Result<http::Response<Body>, Infallible>> + Send + 'static,
    > + Clone {
        tower::service_fn(move |_req: http::Request<()>| async move {
            tokio::time::sleep(delay).await;
            Ok::<_, Infallible>(http::Response::new(Body::empty()))
        })
    }

    fn grpc_status(r: &http::Response<Body>) -> Option<String> {
        r.headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_string())
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_call_is_cut_at_the_deadline_and_a_long_call_is_not() {
        let layer = DeadlineLayer::new(Duration::from_secs(30), &["/berth.v1.Containers/"]);
        let mut svc = layer.layer(slow(Duration::from_secs(300)));
        let req = |path: &str| http::Request::builder().uri(path).body(()).unwrap();
        let cut = svc
            .ready()
            .await
            .unwrap()
            .call(req("/berth.v1.Inventory/ListNodes"))
            .await
            .unwrap();
        assert_eq!(grpc_status(&cut).as_deref(), Some("4"), "DEADLINE_EXCEEDED");
        let waited = svc
            .ready()
            .await
            .unwrap()
            .call(req("/berth.v1.Containers/Wait"))
            .await
            .unwrap();
        assert_eq!(grpc_status(&waited), None, "answered by the service itself");
    }
}
