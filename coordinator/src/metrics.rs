//! Prometheus metrics of the coordinator, served as text on `/metrics`.
//!
//! A handful of counters and gauges in one process-wide [`METRICS`]; labels
//! are few and bounded (task kind, result, reason; cache and node state;
//! listener and refusal reason). [`serve`] runs on the same hardened accept
//! loop as the gRPC port ([`crate::listener`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use crate::listener::{self, Accept, Limits, Plain};

/// The coordinator's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);

/// Counters and gauges.
#[derive(Default)]
pub struct Metrics {
    /// Agent sessions open now.
    pub agents_connected: AtomicU64,
    /// Reconcile passes run.
    pub passes: AtomicU64,
    /// Total seconds spent in passes, in microseconds.
    pub pass_micros: AtomicU64,
    /// ImageCache status writes sent to the apiserver.
    pub status_writes: AtomicU64,
    /// Every write to the apiserver: status, finalizers, Events.
    pub api_writes: AtomicU64,
    /// Tasks sent, by kind.
    tasks_sent: Mutex<BTreeMap<&'static str, u64>>,
    /// Task outcomes, by (kind, result, reason).
    task_results: Mutex<BTreeMap<(&'static str, &'static str, String), u64>>,
    /// Selected nodes per cache and state (replaced each pass).
    cache_nodes: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Connections closed unserved, by (listener, reason).
    connections_refused: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Failed accepts, by listener.
    accept_errors: Mutex<BTreeMap<&'static str, u64>>,
    /// TokenReviews sent to the apiserver, by result.
    token_reviews: Mutex<BTreeMap<&'static str, u64>>,
    /// Session attempts answered without a TokenReview, by reason.
    reviews_avoided: Mutex<BTreeMap<&'static str, u64>>,
}

fn bump<K: Ord>(map: &Mutex<BTreeMap<K, u64>>, key: K) {
    *map.lock().unwrap().entry(key).or_default() += 1;
}

impl Metrics {
    /// Counts a task sent to an agent.
    pub fn task_sent(&self, kind: &'static str) {
        *self.tasks_sent.lock().unwrap().entry(kind).or_default() += 1;
    }

    /// Counts a finished task.
    pub fn task_result(&self, kind: &'static str, result: &'static str, reason: &str) {
        *self
            .task_results
            .lock()
            .unwrap()
            .entry((kind, result, reason.to_string()))
            .or_default() += 1;
    }

    /// Counts a connection `listener` closed unserved for `reason`.
    pub fn connection_refused(&self, listener: &'static str, reason: &'static str) {
        bump(&self.connections_refused, (listener, reason));
    }

    /// Counts a failed accept on `listener`.
    pub fn accept_error(&self, listener: &'static str) {
        bump(&self.accept_errors, listener);
    }

    /// Counts a TokenReview sent, by `result` (`authenticated`, `refused`, `failed`).
    pub fn token_review(&self, result: &'static str) {
        bump(&self.token_reviews, result);
    }

    /// Counts a session attempt answered without a TokenReview, by `reason`.
    pub fn review_avoided(&self, reason: &'static str) {
        bump(&self.reviews_avoided, reason);
    }

    /// Replaces the per-cache node counts.
    pub fn set_cache_nodes(&self, counts: BTreeMap<(String, &'static str), u64>) {
        *self.cache_nodes.lock().unwrap() = counts;
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, v: u64, kind: &str| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        gauge(
            &mut out,
            "berth_agents_connected",
            "Agent sessions open now.",
            self.agents_connected.load(Ordering::Relaxed),
            "gauge",
        );
        gauge(
            &mut out,
            "berth_reconcile_passes_total",
            "ImageCache reconcile passes.",
            self.passes.load(Ordering::Relaxed),
            "counter",
        );
        let secs = self.pass_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(
            out,
            "# HELP berth_reconcile_seconds_total Time spent in reconcile passes.\n# TYPE berth_reconcile_seconds_total counter\nberth_reconcile_seconds_total {secs}"
        );
        gauge(
            &mut out,
            "berth_api_writes_total",
            "Writes to the apiserver (status, finalizers, Events).",
            self.api_writes.load(Ordering::Relaxed),
            "counter",
        );
        gauge(
            &mut out,
            "berth_status_writes_total",
            "ImageCache status writes to the apiserver.",
            self.status_writes.load(Ordering::Relaxed),
            "counter",
        );
        let _ = writeln!(
            out,
            "# HELP berth_tasks_sent_total Tasks sent to agents.\n# TYPE berth_tasks_sent_total counter"
        );
        for (kind, v) in self.tasks_sent.lock().unwrap().iter() {
            let _ = writeln!(out, "berth_tasks_sent_total{{kind=\"{kind}\"}} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP berth_task_results_total Finished tasks by outcome.\n# TYPE berth_task_results_total counter"
        );
        for ((kind, result, reason), v) in self.task_results.lock().unwrap().iter() {
            let _ = writeln!(
                out,
                "berth_task_results_total{{kind=\"{kind}\",result=\"{result}\",reason=\"{reason}\"}} {v}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP berth_imagecache_nodes Selected nodes of each ImageCache by state.\n# TYPE berth_imagecache_nodes gauge"
        );
        for ((cache, state), v) in self.cache_nodes.lock().unwrap().iter() {
            let (ns, name) = cache.split_once('/').unwrap_or(("", cache));
            let _ = writeln!(
                out,
                "berth_imagecache_nodes{{namespace=\"{ns}\",name=\"{name}\",state=\"{state}\"}} {v}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP berth_connections_refused_total Connections closed unserved (caps, handshake timeouts and failures).\n# TYPE berth_connections_refused_total counter"
        );
        for ((listener, reason), v) in self.connections_refused.lock().unwrap().iter() {
            let _ = writeln!(
                out,
                "berth_connections_refused_total{{listener=\"{listener}\",reason=\"{reason}\"}} {v}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP berth_accept_errors_total Failed accepts (the listener continues).\n# TYPE berth_accept_errors_total counter"
        );
        for (listener, v) in self.accept_errors.lock().unwrap().iter() {
            let _ = writeln!(
                out,
                "berth_accept_errors_total{{listener=\"{listener}\"}} {v}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP berth_token_reviews_total TokenReviews sent to the apiserver, by result.\n# TYPE berth_token_reviews_total counter"
        );
        for (result, v) in self.token_reviews.lock().unwrap().iter() {
            let _ = writeln!(out, "berth_token_reviews_total{{result=\"{result}\"}} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP berth_token_reviews_avoided_total Session attempts answered without a TokenReview (cached, malformed, over a bound).\n# TYPE berth_token_reviews_avoided_total counter"
        );
        for (reason, v) in self.reviews_avoided.lock().unwrap().iter() {
            let _ = writeln!(
                out,
                "berth_token_reviews_avoided_total{{reason=\"{reason}\"}} {v}"
            );
        }
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
                .header("content-type", "text/plain; version=0.0.4")
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
    fn the_exposition_has_help_type_and_labelled_samples() {
        let m = Metrics::default();
        m.task_sent("pull");
        m.task_result("pull", "failed", "AuthFailed");
        m.set_cache_nodes([(("ns/c".to_string(), "ready"), 3)].into());
        let text = m.render();
        assert!(text.contains("# TYPE berth_tasks_sent_total counter"));
        assert!(text.contains("berth_tasks_sent_total{kind=\"pull\"} 1"));
        assert!(text.contains(
            "berth_task_results_total{kind=\"pull\",result=\"failed\",reason=\"AuthFailed\"} 1"
        ));
        assert!(
            text.contains("berth_imagecache_nodes{namespace=\"ns\",name=\"c\",state=\"ready\"} 3")
        );
    }
}
