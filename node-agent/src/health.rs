//! Whether the agent can reach its container runtime, for the kubelet's
//! probes and for the session.
//!
//! [`monitor`] asks the runtime for its CRI `Version` every
//! [`HealthConfig::interval`] and records each answer in the shared
//! [`Health`]; [`decide`] turns what was recorded into the probes' verdicts
//! (pure: data in, data out); [`serve`] answers the kubelet on a small HTTP
//! endpoint:
//!
//! - `GET /readyz`: 200 while the last probe reached the runtime, else 503 —
//!   a pod that cannot reach its runtime is not Ready, so operators see it;
//! - `GET /healthz`: 503 only once the runtime has been unreachable for longer
//!   than [`HealthConfig::liveness_threshold`] (or the monitor itself stopped
//!   probing): the runtime restarts during upgrades, and the client reconnects
//!   by itself, so a kubelet restart of the agent is the backstop, not the
//!   first resort.
//!
//! The session waits on [`Health::reachable`] before it reconnects, so the
//! agent tells the coordinator its (possibly upgraded) runtime as soon as it
//! answers again.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::runtime::{ImageRuntime, RuntimeVersion};

/// How long one probe may wait for the runtime's answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How the agent watches its runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    /// Time between two probes of the runtime.
    pub interval: Duration,
    /// How long the runtime may stay unreachable before liveness fails.
    pub liveness_threshold: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: Duration::from_secs(2),
            liveness_threshold: Duration::from_secs(60),
        }
    }
}

/// What the last probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Runtime {
    /// No probe has finished yet.
    Unknown,
    /// The runtime answered.
    Reachable {
        /// Its name and version, e.g. `containerd 1.6.20`.
        version: String,
    },
    /// Every probe since `since` failed; `error` is the last one's.
    Unreachable {
        /// When the first failing probe finished.
        since: Instant,
        /// What the last probe said.
        error: String,
    },
}

/// Everything the verdicts are decided from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthState {
    /// When the agent started.
    pub started: Instant,
    /// When the last probe finished.
    pub last_probe: Option<Instant>,
    /// What it found.
    pub runtime: Runtime,
}

impl HealthState {
    /// The state of an agent that started at `now` and has not probed yet.
    pub fn new(now: Instant) -> Self {
        HealthState {
            started: now,
            last_probe: None,
            runtime: Runtime::Unknown,
        }
    }

    /// Records a probe that finished at `now`: the runtime's version, or why
    /// it could not be reached.
    pub fn record(&mut self, now: Instant, probe: Result<&RuntimeVersion, String>) {
        self.last_probe = Some(now);
        self.runtime = match (probe, &self.runtime) {
            (Ok(v), _) => Runtime::Reachable {
                version: format!("{} {}", v.name, v.version),
            },
            (Err(error), Runtime::Unreachable { since, .. }) => Runtime::Unreachable {
                since: *since,
                error,
            },
            (Err(error), _) => Runtime::Unreachable { since: now, error },
        };
    }
}

/// The probes' answers, with the reason an operator reads in the pod's events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// `/readyz` answers 200.
    pub ready: bool,
    /// `/healthz` answers 200.
    pub live: bool,
    /// Why, in one line.
    pub reason: String,
}

/// The probes' verdicts at `now`.
///
/// Ready: the last probe reached the runtime and is recent (within three
/// intervals). Live: the runtime has not been unreachable (or unknown since
/// start) for longer than the threshold, and the monitor has probed within it.
pub fn decide(state: &HealthState, now: Instant, cfg: &HealthConfig) -> Verdict {
    let age = |t: Instant| now.saturating_duration_since(t);
    let threshold = cfg.liveness_threshold;
    let probed_ago = state.last_probe.map(age);
    if probed_ago.unwrap_or_else(|| age(state.started)) > threshold {
        let reason = match probed_ago {
            Some(ago) => {
                format!("the runtime was last probed {ago:?} ago (threshold {threshold:?})")
            }
            None => format!("no runtime probe finished in {threshold:?} since start"),
        };
        return Verdict {
            ready: false,
            live: false,
            reason,
        };
    }
    let fresh = probed_ago.is_some_and(|ago| ago <= cfg.interval * 3);
    match &state.runtime {
        Runtime::Unknown => Verdict {
            ready: false,
            live: true,
            reason: "the runtime has not been probed yet".into(),
        },
        Runtime::Reachable { version } if fresh => Verdict {
            ready: true,
            live: true,
            reason: format!("runtime {version} reachable"),
        },
        Runtime::Reachable { version } => Verdict {
            ready: false,
            live: true,
            reason: format!(
                "runtime {version} answered {:?} ago; no probe since",
                probed_ago.unwrap_or_default()
            ),
        },
        Runtime::Unreachable { since, error } => {
            let down = age(*since);
            Verdict {
                ready: false,
                live: down <= threshold,
                reason: format!(
                    "runtime unreachable for {:.0?} (liveness threshold {threshold:?}): {error}",
                    down
                ),
            }
        }
    }
}

/// The shared health of one agent: cheap to clone.
#[derive(Clone)]
pub struct Health {
    cfg: HealthConfig,
    state: Arc<Mutex<HealthState>>,
    reachable: Arc<watch::Sender<bool>>,
}

impl Health {
    /// Health of an agent starting now, not yet probed.
    pub fn new(cfg: HealthConfig) -> Self {
        Health {
            cfg,
            state: Arc::new(Mutex::new(HealthState::new(Instant::now()))),
            reachable: Arc::new(watch::Sender::new(false)),
        }
    }

    /// Records a probe that just finished.
    pub fn record(&self, probe: Result<&RuntimeVersion, String>) {
        let ok = probe.is_ok();
        self.state.lock().unwrap().record(Instant::now(), probe);
        self.reachable.send_replace(ok);
    }

    /// The verdicts now.
    pub fn verdict(&self) -> Verdict {
        decide(&self.state.lock().unwrap(), Instant::now(), &self.cfg)
    }

    /// Follows whether the last probe reached the runtime.
    pub fn reachable(&self) -> watch::Receiver<bool> {
        self.reachable.subscribe()
    }
}

/// Probes `rt` every interval, forever, recording each answer in `health`
/// and logging when the runtime goes away and when it comes back.
pub async fn monitor<R: ImageRuntime>(rt: Arc<R>, health: Health) {
    let mut tick = tokio::time::interval(health.cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut down_since: Option<Instant> = None;
    loop {
        tick.tick().await;
        let probe = match tokio::time::timeout(PROBE_TIMEOUT, rt.version()).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer to CRI Version within {PROBE_TIMEOUT:?}")),
        };
        match (&probe, down_since) {
            (Ok(v), Some(since)) => {
                info!(runtime = %v.name, version = %v.version, after = ?since.elapsed(), "container runtime reachable again");
                down_since = None;
            }
            (Err(e), None) => {
                warn!(error = %e, "container runtime unreachable; the agent is not ready until it answers");
                down_since = Some(Instant::now());
            }
            _ => {}
        }
        health.record(probe.as_ref().map_err(Clone::clone));
    }
}

/// Serves `GET /readyz` and `GET /healthz` on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, health: Health) -> std::io::Result<()> {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    loop {
        let (stream, _) = listener.accept().await?;
        let health = health.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (status, body) = answer(req.uri().path(), &health.verdict());
                async move {
                    hyper::Response::builder()
                        .status(status)
                        .header("content-type", "text/plain; charset=utf-8")
                        .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// The HTTP status and body for `path` given `verdict`.
fn answer(path: &str, verdict: &Verdict) -> (u16, String) {
    let (ok, what) = match path {
        "/readyz" => (verdict.ready, "ready"),
        "/healthz" | "/livez" => (verdict.live, "live"),
        _ => return (404, "only /readyz and /healthz here\n".into()),
    };
    if ok {
        (200, format!("{what}: {}\n", verdict.reason))
    } else {
        (503, format!("not {what}: {}\n", verdict.reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn cfg() -> HealthConfig {
        HealthConfig {
            interval: 2 * S,
            liveness_threshold: 60 * S,
        }
    }

    fn containerd() -> RuntimeVersion {
        RuntimeVersion {
            name: "containerd".into(),
            version: "1.6.20".into(),
            api_version: "v1".into(),
        }
    }

    /// (ready, live) at `t0 + at` after probes that finished at `t0 + when`.
    fn verdict(probes: &[(u64, bool)], at: u64) -> (bool, bool) {
        let t0 = Instant::now();
        let mut st = HealthState::new(t0);
        for (when, ok) in probes {
            let v = containerd();
            let probe = if *ok { Ok(&v) } else { Err("refused".into()) };
            st.record(t0 + S * *when as u32, probe);
        }
        let v = decide(&st, t0 + S * at as u32, &cfg());
        (v.ready, v.live)
    }

    #[test]
    fn a_reachable_runtime_is_ready_and_live() {
        assert_eq!(verdict(&[(0, true), (2, true)], 3), (true, true));
    }

    #[test]
    fn an_agent_that_has_not_probed_yet_is_live_but_not_ready() {
        assert_eq!(verdict(&[], 1), (false, true));
    }

    #[test]
    fn an_unreachable_runtime_makes_the_agent_unready_at_once_but_not_dead() {
        assert_eq!(verdict(&[(0, true), (2, false)], 2), (false, true));
        assert_eq!(
            verdict(&[(0, true), (2, false), (30, false), (60, false)], 60),
            (false, true),
            "58 s down is within the 60 s threshold"
        );
    }

    #[test]
    fn liveness_fails_once_the_runtime_is_unreachable_longer_than_the_threshold() {
        let probes = [(0, true), (2, false), (40, false), (62, false), (63, false)];
        assert_eq!(verdict(&probes, 63), (false, false));
    }

    #[test]
    fn the_outage_is_counted_from_its_first_failed_probe_not_the_last() {
        let t0 = Instant::now();
        let mut st = HealthState::new(t0);
        st.record(t0 + 10 * S, Err("first".into()));
        st.record(t0 + 20 * S, Err("second".into()));
        assert_eq!(
            st.runtime,
            Runtime::Unreachable {
                since: t0 + 10 * S,
                error: "second".into()
            }
        );
    }

    #[test]
    fn a_runtime_back_within_the_threshold_makes_the_agent_ready_again() {
        let probes = [(0, true), (2, false), (30, false), (32, true)];
        assert_eq!(verdict(&probes, 33), (true, true));
    }

    #[test]
    fn a_runtime_never_reached_since_start_fails_liveness_after_the_threshold() {
        let probes: Vec<_> = (1..=32).map(|i| (i * 2, false)).collect();
        assert_eq!(verdict(&probes, 64), (false, false));
        assert_eq!(verdict(&probes[..29], 58), (false, true));
    }

    #[test]
    fn a_monitor_that_stopped_probing_is_unready_soon_and_dead_after_the_threshold() {
        assert_eq!(
            verdict(&[(0, true)], 7),
            (false, true),
            "3 intervals passed"
        );
        assert_eq!(verdict(&[(0, true)], 61), (false, false));
        assert_eq!(verdict(&[], 61), (false, false), "never probed at all");
    }

    #[test]
    fn the_endpoint_answers_each_probe_with_its_own_verdict_and_the_reason() {
        let down = Verdict {
            ready: false,
            live: true,
            reason: "runtime unreachable for 5s".into(),
        };
        assert_eq!(answer("/readyz", &down).0, 503);
        let (status, body) = answer("/healthz", &down);
        assert_eq!(status, 200);
        assert!(body.contains("runtime unreachable for 5s"), "{body}");
        assert_eq!(answer("/metrics", &down).0, 404);
    }

    #[tokio::test]
    async fn the_monitor_follows_the_runtime_down_and_up_again() {
        let rt = Arc::new(crate::runtime::MemRuntime::default());
        let health = Health::new(HealthConfig {
            interval: Duration::from_millis(10),
            liveness_threshold: 60 * S,
        });
        let task = tokio::spawn(monitor(rt.clone(), health.clone()));
        let wait = |want: bool| {
            let mut r = health.reachable();
            async move {
                tokio::time::timeout(10 * S, r.wait_for(|v| *v == want))
                    .await
                    .expect("the monitor saw the change in time")
                    .unwrap();
            }
        };
        wait(true).await;
        assert!(health.verdict().ready);
        rt.set_down(true);
        wait(false).await;
        let v = health.verdict();
        assert_eq!((v.ready, v.live), (false, true), "{v:?}");
        assert!(v.reason.contains("the fake runtime is down"), "{v:?}");
        rt.set_down(false);
        wait(true).await;
        assert!(health.verdict().ready);
        task.abort();
    }
}
