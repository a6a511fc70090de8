//! Prometheus metrics of the coordinator, served on `/metrics` in the
//! OpenMetrics text format by the `prometheus-client` crate.
//!
//! A handful of counters and gauges in one process-wide [`METRICS`]; labels
//! are few and bounded (task kind, result, reason; cache and node state;
//! listener and refusal reason). Sessions, the node registry, the listeners,
//! the token reviews and the controller update them; [`serve`] answers
//! scrapes with [`Metrics::render`], on the same hardened accept loop as the
//! gRPC port ([`crate::listener`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::listener::{self, Accept, Limits, Plain};

/// The coordinator's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    kind: String,
    result: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    listener: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReviewResult {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    namespace: String,
    name: String,
    state: String,
}

/// Counters and gauges, registered under their exposition names.
pub struct Metrics {
    registry: Registry,
    /// Agent sessions open now (`berth_agents_connected`).
    pub agents_connected: Gauge,
    /// Reconcile passes run (`berth_reconcile_passes_total`).
    pub passes: Counter,
    /// Time spent in passes (`berth_reconcile_seconds_total`).
    pub pass_seconds: Counter<f64, AtomicU64>,
    /// ImageCache status writes sent to the apiserver (`berth_status_writes_total`).
    pub status_writes: Counter,
    /// Every write to the apiserver: status, finalizers, Events (`berth_api_writes_total`).
    pub api_writes: Counter,
    tasks_sent: Family<KindLabels, Counter>,
    task_results: Family<ResultLabels, Counter>,
    cache_nodes: Family<CacheLabels, Gauge>,
    connections_refused: Family<RefusalLabels, Counter>,
    accept_errors: Family<ListenerLabels, Counter>,
    token_reviews: Family<ReviewResult, Counter>,
    reviews_avoided: Family<ReasonLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("berth");
        let m = Metrics {
            agents_connected: Gauge::default(),
            passes: Counter::default(),
            pass_seconds: Counter::default(),
            status_writes: Counter::default(),
            api_writes: Counter::default(),
            tasks_sent: Family::default(),
            task_results: Family::default(),
            cache_nodes: Family::default(),
            connections_refused: Family::default(),
            accept_errors: Family::default(),
            token_reviews: Family::default(),
            reviews_avoided: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "agents_connected",
            "Agent sessions open now",
            m.agents_connected.clone(),
        );
        registry.register(
            "reconcile_passes",
            "ImageCache reconcile passes",
            m.passes.clone(),
        );
        registry.register(
            "reconcile_seconds",
            "Time spent in reconcile passes",
            m.pass_seconds.clone(),
        );
        registry.register(
            "api_writes",
            "Writes to the apiserver (status, finalizers, Events)",
            m.api_writes.clone(),
        );
        registry.register(
            "status_writes",
            "ImageCache status writes to the apiserver",
            m.status_writes.clone(),
        );
        registry.register("tasks_sent", "Tasks sent to agents", m.tasks_sent.clone());
        registry.register(
            "task_results",
            "Finished tasks by outcome",
            m.task_results.clone(),
        );
        registry.register(
            "imagecache_nodes",
            "Selected nodes of each ImageCache by state",
            m.cache_nodes.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed unserved (caps, handshake timeouts and failures)",
            m.connections_refused.clone(),
        );
        registry.register(
            "accept_errors",
            "Failed accepts (the listener continues)",
            m.accept_errors.clone(),
        );
        registry.register(
            "token_reviews",
            "TokenReviews sent to the apiserver, by result",
            m.token_reviews.clone(),
        );
        registry.register(
            "token_reviews_avoided",
            "Token checks answered without a TokenReview (cached, malformed, over a bound)",
            m.reviews_avoided.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Counts a task sent to an agent.
    pub fn task_sent(&self, kind: &str) {
        self.tasks_sent
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    /// Counts a finished task.
    pub fn task_result(&self, kind: &str, result: &str, reason: &str) {
        let labels = ResultLabels {
            kind: kind.into(),
            result: result.into(),
            reason: reason.into(),
        };
        self.task_results.get_or_create(&labels).inc();
    }

    /// Counts a connection `listener` closed unserved for `reason`.
    pub fn connection_refused(&self, listener: &'static str, reason: &'static str) {
        self.connections_refused
            .get_or_create(&RefusalLabels { listener, reason })
            .inc();
    }

    /// Counts a failed accept on `listener`.
    pub fn accept_error(&self, listener: &'static str) {
        self.accept_errors
            .get_or_create(&ListenerLabels { listener })
            .inc();
    }

    /// Counts a TokenReview sent, by `result` (`authenticated`, `refused`, `failed`).
    pub fn token_review(&self, result: &'static str) {
        self.token_reviews
            .get_or_create(&ReviewResult { result })
            .inc();
    }

    /// Counts a token check answered without a TokenReview, by `reason`.
    pub fn review_avoided(&self, reason: &'static str) {
        self.reviews_avoided
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Replaces the per-cache node counts (`namespace/name`, state → count).
    pub fn set_cache_nodes(&self, counts: BTreeMap<(String, &'static str), u64>) {
        self.cache_nodes.clear();
        for ((cache, state), v) in counts {
            let (ns, name) = cache.split_once('/').unwrap_or(("", &cache));
            let labels = CacheLabels {
                namespace: ns.into(),
                name: name.into(),
                state: state.into(),
            };
            self.cache_nodes
                .get_or_create(&labels)
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        }
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// The metrics listener's limits: a scraper or two, never a crowd.
pub const LIMITS: Limits = Limits {
    max_connections: 64,
    max_per_ip: 16,
    handshake_timeout: Duration::from_secs(5),
};
/// Time a client has to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest life of one metrics connection.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// Serves `GET /metrics` on `addr` until the process ends; fails only if
/// `addr` cannot be bound.
pub async fn serve(addr: SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    serve_on(listener).await;
    Ok(())
}

/// Serves `GET /metrics` on connections from `acceptor`, forever: accept
/// errors are logged and survived ([`listener::run`]), connections are
/// capped, slow headers and long-lived connections are cut off.
pub async fn serve_on<A>(acceptor: A)
where
    A: Accept,
    A::Conn: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    listener::run("metrics", acceptor, Plain, LIMITS, |conn| async move {
        use hyper::service::service_fn;
        use hyper_util::rt::{TokioIo, TokioTimer};
        let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
            let (status, body) = if req.uri().path() == "/metrics" {
                (200, METRICS.render())
            } else {
                (404, "only /metrics here\n".to_string())
            };
            hyper::Response::builder()
                .status(status)
                .header(
                    "content-type",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
                .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
        });
        let served = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(conn), svc);
        let _ = tokio::time::timeout(CONNECTION_LIFETIME, served).await;
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_keeps_berth_s_metric_names_and_labels() {
        let m = Metrics::default();
        m.task_sent("pull");
        m.task_result("pull", "failed", "AuthFailed");
        m.set_cache_nodes([(("ns/c".to_string(), "ready"), 3)].into());
        m.agents_connected.inc();
        m.api_writes.inc_by(2);
        m.connection_refused("grpc", "per_ip_cap");
        m.accept_error("metrics");
        m.token_review("refused");
        m.review_avoided("malformed");
        let text = m.render();
        for line in [
            "# TYPE berth_tasks_sent counter",
            "berth_tasks_sent_total{kind=\"pull\"} 1",
            "berth_task_results_total{kind=\"pull\",result=\"failed\",reason=\"AuthFailed\"} 1",
            "berth_imagecache_nodes{namespace=\"ns\",name=\"c\",state=\"ready\"} 3",
            "berth_agents_connected 1",
            "berth_api_writes_total 2",
            "berth_reconcile_passes_total 0",
            "berth_status_writes_total 0",
            "berth_connections_refused_total{listener=\"grpc\",reason=\"per_ip_cap\"} 1",
            "berth_accept_errors_total{listener=\"metrics\"} 1",
            "berth_token_reviews_total{result=\"refused\"} 1",
            "berth_token_reviews_avoided_total{reason=\"malformed\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing from\n{text}"
            );
        }
        assert!(text.contains("berth_reconcile_seconds_total 0"), "{text}");
        m.set_cache_nodes(BTreeMap::new());
        assert!(
            !m.render().contains("imagecache_nodes{"),
            "a deleted cache's gauges go"
        );
    }
}
