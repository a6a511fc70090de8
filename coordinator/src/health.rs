//! Health that tells the truth: what `grpc.health.v1.Health` answers, and why.
//!
//! The kubelet's probes ask for the overall service `""`. It is SERVING when
//! this replica is a standby, or the leader and its ImageCache controller is
//! alive and finished a pass within [`STALL`] (a controller started less than
//! [`STALL`] ago may still be filling its caches). It is NOT_SERVING once the
//! controller task ended (returned, panicked or was aborted), when it stalled,
//! and once the replica stepped down: the liveness probe then restarts the
//! container, which comes back as a standby.
//!
//! `berth.v1.Inventory` and `berth.agent.v1.AgentService` report leadership:
//! SERVING on the leader (which holds the agents' sessions and the live node
//! view), NOT_SERVING on a standby (which refuses agents).
//!
//! Data flow: the controller calls [`Pulse::beat`] after each pass and the
//! task running it is wrapped in [`Pulse::watch`], which notices its end;
//! `main` publishes the replica's [`Role`] on a watch channel; [`report`]
//! reads both once a second, decides with the pure [`judge`], and sets the
//! statuses on the one `HealthReporter` every health endpoint serves from.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{info, warn};

/// A leader whose controller has not finished a pass for this long is
/// unhealthy. Passes run at least every 2 s.
pub const STALL: Duration = Duration::from_secs(30);
/// How often [`report`] re-evaluates health without a role change.
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// The health names that report leadership.
pub const LEADER_SERVICES: [&str; 2] = [
    berth_proto::api::inventory_server::SERVICE_NAME,
    berth_proto::agent::agent_service_server::SERVICE_NAME,
];

/// The controller's signs of life, shared between its task and [`report`].
#[derive(Debug)]
pub struct Pulse {
    started: Instant,
    /// Milliseconds after `started` of the last finished pass, plus one;
    /// zero before the first.
    last_pass: AtomicU64,
    ended: AtomicBool,
}

impl Pulse {
    /// A pulse for a controller starting now.
    pub fn new() -> Arc<Self> {
        Arc::new(Pulse {
            started: Instant::now(),
            last_pass: AtomicU64::new(0),
            ended: AtomicBool::new(false),
        })
    }

    /// Records that a pass just finished.
    pub fn beat(&self) {
        let ms = self.started.elapsed().as_millis() as u64 + 1;
        self.last_pass.store(ms, Ordering::Relaxed);
    }

    /// Runs `task` and marks the pulse ended when it finishes, panics or is
    /// dropped (an aborted task drops its future).
    pub fn watch<F: Future>(self: Arc<Self>, task: F) -> impl Future<Output = F::Output> {
        struct Ended(Arc<Pulse>);
        impl Drop for Ended {
            fn drop(&mut self) {
                self.0.ended.store(true, Ordering::Relaxed);
            }
        }
        async move {
            let _ended = Ended(self);
            task.await
        }
    }

    /// What the pulse says now.
    pub fn state(&self) -> ControllerState {
        let ms = self.last_pass.load(Ordering::Relaxed);
        ControllerState {
            started: self.started,
            last_pass: (ms > 0).then(|| self.started + Duration::from_millis(ms - 1)),
            ended: self.ended.load(Ordering::Relaxed),
        }
    }
}

/// What this replica is doing, as `main` publishes it.
#[derive(Debug, Clone)]
pub enum Role {
    /// Waiting for the Lease; refuses agents, runs no controller.
    Standby,
    /// Holds the Lease and runs the controller whose pulse this is.
    Leader(Arc<Pulse>),
    /// Lost or gave up the Lease, or is shutting down; about to exit.
    SteppedDown,
}

/// The controller's state at one instant: plain data for [`judge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControllerState {
    /// When the controller was started.
    pub started: Instant,
    /// When it last finished a pass, if ever.
    pub last_pass: Option<Instant>,
    /// Its task has ended.
    pub ended: bool,
}

/// A [`Role`] with its controller read out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replica {
    /// See [`Role::Standby`].
    Standby,
    /// See [`Role::Leader`].
    Leader(ControllerState),
    /// See [`Role::SteppedDown`].
    SteppedDown,
}

impl Role {
    /// Reads the controller's pulse.
    pub fn observe(&self) -> Replica {
        match self {
            Role::Standby => Replica::Standby,
            Role::Leader(p) => Replica::Leader(p.state()),
            Role::SteppedDown => Replica::SteppedDown,
        }
    }
}

/// What the health service answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The overall service `""`, which the kubelet probes.
    pub overall: ServingStatus,
    /// [`LEADER_SERVICES`]: whether this replica is the leader.
    pub leader: ServingStatus,
    /// Why, in a few words, for the log.
    pub why: &'static str,
}

/// Decides health from the replica's state at `now`.
pub fn judge(replica: &Replica, now: Instant) -> Verdict {
    use ServingStatus::{NotServing, Serving};
    let verdict = |overall, leader, why| Verdict {
        overall,
        leader,
        why,
    };
    match replica {
        Replica::Standby => verdict(Serving, NotServing, "standby"),
        Replica::SteppedDown => verdict(NotServing, NotServing, "stepped down"),
        Replica::Leader(c) if c.ended => verdict(NotServing, Serving, "controller ended"),
        Replica::Leader(c) => {
            let alive_since = c.last_pass.unwrap_or(c.started);
            if now.saturating_duration_since(alive_since) > STALL {
                let why = if c.last_pass.is_some() {
                    "controller stalled"
                } else {
                    "controller never finished a pass"
                };
                verdict(NotServing, Serving, why)
            } else {
                verdict(Serving, Serving, "leader")
            }
        }
    }
}

/// Keeps `reporter`'s statuses equal to [`judge`] of the published role,
/// re-evaluating on every role change and once a second; runs until the
/// process ends.
pub async fn report(reporter: HealthReporter, mut role: watch::Receiver<Role>) {
    let mut last: Option<Verdict> = None;
    let mut tick = tokio::time::interval(REPORT_EVERY);
    let mut publisher_alive = true;
    loop {
        let replica = role.borrow_and_update().observe();
        let verdict = judge(&replica, Instant::now());
        if last != Some(verdict) {
            apply(&reporter, verdict).await;
            match verdict.overall {
                ServingStatus::Serving => info!(state = verdict.why, "health: serving"),
                _ => warn!(state = verdict.why, "health: not serving"),
            }
            last = Some(verdict);
        }
        tokio::select! {
            _ = tick.tick() => {}
            changed = role.changed(), if publisher_alive => publisher_alive = changed.is_ok(),
        }
    }
}

/// Sets every status of `verdict` on `reporter`.
pub async fn apply(reporter: &HealthReporter, verdict: Verdict) {
    reporter.set_service_status("", verdict.overall).await;
    for name in LEADER_SERVICES {
        reporter.set_service_status(name, verdict.leader).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ServingStatus::{NotServing, Serving};

    fn leader(started: Instant, last_pass: Option<Instant>, ended: bool) -> Replica {
        Replica::Leader(ControllerState {
            started,
            last_pass,
            ended,
        })
    }

    fn statuses(v: Verdict) -> (ServingStatus, ServingStatus) {
        (v.overall, v.leader)
    }

    #[test]
    fn a_standby_is_healthy_but_does_not_serve_the_leader_services() {
        let now = Instant::now();
        assert_eq!(
            statuses(judge(&Replica::Standby, now)),
            (Serving, NotServing)
        );
    }

    #[test]
    fn a_leader_whose_controller_passed_recently_serves_everything() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(600);
        let recent = leader(t0, Some(now - Duration::from_secs(2)), false);
        assert_eq!(statuses(judge(&recent, now)), (Serving, Serving));
        let edge = leader(t0, Some(now - STALL), false);
        assert_eq!(statuses(judge(&edge, now)), (Serving, Serving));
    }

    #[test]
    fn a_leader_whose_controller_stalled_is_not_serving_but_still_the_leader() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(600);
        let stalled = leader(t0, Some(now - STALL - Duration::from_secs(1)), false);
        let v = judge(&stalled, now);
        assert_eq!(
            (statuses(v), v.why),
            ((NotServing, Serving), "controller stalled")
        );
    }

    #[test]
    fn a_new_controller_has_the_stall_time_to_finish_its_first_pass() {
        let t0 = Instant::now();
        let fresh = leader(t0, None, false);
        assert_eq!(
            judge(&fresh, t0 + STALL - Duration::from_secs(1)).overall,
            Serving
        );
        let v = judge(&fresh, t0 + STALL + Duration::from_secs(1));
        assert_eq!(
            (v.overall, v.why),
            (NotServing, "controller never finished a pass")
        );
    }

    #[test]
    fn a_leader_whose_controller_ended_is_not_serving_even_right_after_a_pass() {
        let t0 = Instant::now();
        let ended = leader(t0, Some(t0), true);
        assert_eq!(statuses(judge(&ended, t0)), (NotServing, Serving));
    }

    #[test]
    fn a_replica_that_stepped_down_serves_nothing() {
        let now = Instant::now();
        assert_eq!(
            statuses(judge(&Replica::SteppedDown, now)),
            (NotServing, NotServing)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_pulse_reports_passes_and_the_end_of_an_aborted_task() {
        let pulse = Pulse::new();
        assert_eq!(pulse.state().last_pass, None);
        tokio::time::advance(Duration::from_secs(3)).await;
        pulse.beat();
        let state = pulse.state();
        assert_eq!(
            state.last_pass,
            Some(state.started + Duration::from_secs(3))
        );
        let task = tokio::spawn(pulse.clone().watch(futures::future::pending::<()>()));
        tokio::task::yield_now().await;
        assert!(!pulse.state().ended);
        task.abort();
        let _ = task.await;
        assert!(pulse.state().ended);
    }

    /// What a probe of `service` on `reporter`'s health service hears.
    async fn probe(reporter: &HealthReporter, service: &str) -> ServingStatus {
        use tonic_health::pb::health_check_response::ServingStatus as Pb;
        use tonic_health::pb::health_server::Health;
        let svc = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
        let req = tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        };
        let Ok(answer) = svc.check(tonic::Request::new(req)).await else {
            return ServingStatus::Unknown;
        };
        match Pb::try_from(answer.into_inner().status) {
            Ok(Pb::Serving) => Serving,
            Ok(Pb::NotServing) => NotServing,
            _ => ServingStatus::Unknown,
        }
    }

    /// Waits, up to 5 s of (paused) time, until `service` reports `want`.
    async fn wait_for(reporter: &HealthReporter, service: &str, want: ServingStatus) {
        let seen = tokio::time::timeout(Duration::from_secs(5), async {
            while probe(reporter, service).await != want {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        assert!(seen.is_ok(), "{service:?} never became {want:?}");
    }

    /// A stand-in controller: one pass every 2 s, for `passes` passes, then
    /// hangs as a stuck controller would.
    async fn controller(pulse: Arc<Pulse>, passes: usize) {
        for _ in 0..passes {
            pulse.beat();
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        futures::future::pending::<()>().await;
    }

    #[tokio::test(start_paused = true)]
    async fn health_turns_not_serving_when_the_leaders_controller_task_is_aborted() {
        let reporter = HealthReporter::new();
        let (role, roles) = watch::channel(Role::Standby);
        tokio::spawn(report(reporter.clone(), roles));
        wait_for(&reporter, "", Serving).await;
        wait_for(&reporter, LEADER_SERVICES[0], NotServing).await;

        let pulse = Pulse::new();
        let task = tokio::spawn(pulse.clone().watch(controller(pulse.clone(), usize::MAX)));
        role.send_replace(Role::Leader(pulse));
        wait_for(&reporter, LEADER_SERVICES[0], Serving).await;
        assert_eq!(probe(&reporter, "").await, Serving);

        task.abort();
        wait_for(&reporter, "", NotServing).await;
        assert_eq!(probe(&reporter, LEADER_SERVICES[1]).await, Serving);
    }

    #[tokio::test(start_paused = true)]
    async fn health_turns_not_serving_when_the_leaders_controller_stops_passing() {
        let reporter = HealthReporter::new();
        let pulse = Pulse::new();
        let last_pass = pulse.state().started + Duration::from_secs(4);
        let _task = tokio::spawn(pulse.clone().watch(controller(pulse.clone(), 3)));
        let (_role, roles) = watch::channel(Role::Leader(pulse));
        tokio::spawn(report(reporter.clone(), roles));
        wait_for(&reporter, "", Serving).await;
        tokio::time::timeout(STALL * 2, async {
            while probe(&reporter, "").await != NotServing {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("a stalled controller is reported");
        assert!(
            Instant::now() > last_pass + STALL,
            "reported before it stalled"
        );
    }
}
