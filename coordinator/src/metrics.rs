//! Prometheus metrics of the coordinator, served on `/metrics` in the
//! OpenMetrics text format by the `prometheus-client` crate.
//!
//! A handful of counters and gauges in one process-wide [`METRICS`]; labels
//! are few and bounded (task kind, result, reason; cache and node state).
//! Sessions, the node registry and the controller update them; [`serve`]
//! answers scrapes with [`Metrics::render`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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

/// Serves `GET /metrics` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr) -> std::io::Result<()> {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
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
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
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
