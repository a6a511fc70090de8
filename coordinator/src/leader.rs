//! Leader election over a `coordination.k8s.io/v1` Lease, and the leader's
//! pod label.
//!
//! Two coordinator replicas run; only the holder of the Lease [`LEASE_NAME`]
//! in the pod's namespace runs the ImageCache controller and accepts agents.
//! The holder labels its pod [`LEADER_LABEL`]`=true` and the Service selects
//! that label, so agents dial the leader; a standby removes the label from
//! its own pod at start (a container restarted after losing the Lease is in
//! the same pod, which still carries it).
//!
//! Timing follows client-go's scheme, scaled down: the holder renews every
//! [`RETRY_PERIOD`]; a candidate counts the Lease as expired
//! [`LEASE_DURATION`] after *it saw the record change* (its own clock, so
//! clock skew between nodes does not matter), looking again every
//! [`RETRY_PERIOD`]; a holder that could not renew for [`RENEW_DEADLINE`]
//! (shorter than [`LEASE_DURATION`]) gives up before anyone may take over.
//! Every write carries the `resourceVersion` it was based on, so of two
//! candidates racing for an expired Lease exactly one wins; the other gets a
//! conflict and looks again.
//!
//! When [`Elector::keep`] returns, this replica is no longer the leader and
//! must stop acting at once: `main` aborts the controller and exits non-zero,
//! and the kubelet restarts the container as a standby. On SIGTERM the leader
//! [`Elector::release`]s the Lease, so a standby takes over at its next look
//! (≤ [`RETRY_PERIOD`]) rather than after expiry.
//!
//! The decision is pure ([`decide`]: lease, when it changed, now, me →
//! create / acquire / renew / wait); the Lease is read and written through
//! [`LeaseStore`] ([`KubeLeases`] in production, an in-memory fake in tests).
//! `main` runs the [`Elector`] on a thread of its own ([`thread::Election`]),
//! so renewals keep their deadline however busy the main runtime is.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{error, info, warn};

pub mod thread;

/// Name of the Lease the coordinators compete for.
pub const LEASE_NAME: &str = "berth-coordinator";
/// The label the leader puts on its own pod; the Service selects it.
pub const LEADER_LABEL: &str = "berth.dev/leader";
/// How long a Lease not seen to change stays another replica's.
pub const LEASE_DURATION: Duration = Duration::from_secs(10);
/// How long the holder keeps acting without a successful renewal.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(7);
/// How often the holder renews and a standby looks at the Lease.
pub const RETRY_PERIOD: Duration = Duration::from_secs(2);
/// The duration a released Lease is written with.
const RELEASED_DURATION: Duration = Duration::from_secs(1);

/// What election needs of a Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    /// `holderIdentity`; `None` (or empty) when released.
    pub holder: Option<String>,
    /// `leaseDurationSeconds`.
    pub duration: Duration,
    /// `leaseTransitions`: how often the holder changed.
    pub transitions: i32,
    /// `acquireTime`: when the holder took it.
    pub acquired: Option<Timestamp>,
    /// `resourceVersion` the record was read at; a write based on it fails
    /// with a conflict if the Lease changed since.
    pub version: Option<String>,
}

impl LeaseRecord {
    /// The holder, if the Lease is held.
    pub fn holder(&self) -> Option<&str> {
        self.holder.as_deref().filter(|h| !h.is_empty())
    }
}

/// What a candidate should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// No Lease exists: create it, held by me.
    Create,
    /// It is free or expired: take it.
    Acquire,
    /// It is mine: renew it.
    Renew,
    /// Another replica holds it until at least this instant.
    Wait(Instant),
}

/// Decides what candidate `me` does about `lease`, which it last saw change
/// at `changed` (its own clock), at `now`.
pub fn decide(lease: Option<&LeaseRecord>, changed: Instant, now: Instant, me: &str) -> Decision {
    let Some(lease) = lease else {
        return Decision::Create;
    };
    match lease.holder() {
        Some(holder) if holder == me => Decision::Renew,
        None => Decision::Acquire,
        Some(_) => {
            let expiry = changed + lease.duration;
            if now >= expiry {
                Decision::Acquire
            } else {
                Decision::Wait(expiry)
            }
        }
    }
}

/// Why reading or writing the Lease failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The Lease changed since it was read (or was created meanwhile).
    #[error("Lease {LEASE_NAME} changed since it was read; looking again")]
    Conflict,
    /// The apiserver refused or could not be reached.
    #[error(
        "Lease {LEASE_NAME}: {0} (check the apiserver and that the coordinator may get, create and update leases)"
    )]
    Api(#[source] kube::Error),
}

impl From<kube::Error> for LeaseError {
    fn from(e: kube::Error) -> Self {
        match &e {
            kube::Error::Api(s) if s.code == 409 => LeaseError::Conflict,
            _ => LeaseError::Api(e),
        }
    }
}

/// Where the Lease is read and written.
pub trait LeaseStore: Send + Sync {
    /// The Lease, if it exists.
    fn get(&self) -> impl Future<Output = Result<Option<LeaseRecord>, LeaseError>> + Send;
    /// Creates the Lease; [`LeaseError::Conflict`] if it exists.
    fn create(
        &self,
        lease: &LeaseRecord,
    ) -> impl Future<Output = Result<LeaseRecord, LeaseError>> + Send;
    /// Replaces the Lease read at `lease.version` (renew time: now);
    /// [`LeaseError::Conflict`] if it changed since.
    fn replace(
        &self,
        lease: &LeaseRecord,
    ) -> impl Future<Output = Result<LeaseRecord, LeaseError>> + Send;
}

/// The Lease [`LEASE_NAME`] in one namespace of the apiserver.
#[derive(Clone)]
pub struct KubeLeases {
    api: Api<Lease>,
}

impl KubeLeases {
    /// The Lease in `namespace`.
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        KubeLeases {
            api: Api::namespaced(client, namespace),
        }
    }

    fn to_lease(r: &LeaseRecord) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.into()),
                resource_version: r.version.clone(),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: r.holder.clone(),
                lease_duration_seconds: Some(r.duration.as_secs().max(1) as i32),
                lease_transitions: Some(r.transitions),
                acquire_time: r.acquired.map(MicroTime),
                renew_time: Some(MicroTime(Timestamp::now())),
                ..Default::default()
            }),
        }
    }

    fn from_lease(l: Lease) -> LeaseRecord {
        let spec = l.spec.unwrap_or_default();
        LeaseRecord {
            holder: spec.holder_identity,
            duration: spec
                .lease_duration_seconds
                .map_or(LEASE_DURATION, |s| Duration::from_secs(s.max(1) as u64)),
            transitions: spec.lease_transitions.unwrap_or(0),
            acquired: spec.acquire_time.map(|t| t.0),
            version: l.metadata.resource_version,
        }
    }
}

impl LeaseStore for KubeLeases {
    async fn get(&self) -> Result<Option<LeaseRecord>, LeaseError> {
        Ok(self.api.get_opt(LEASE_NAME).await?.map(Self::from_lease))
    }

    async fn create(&self, lease: &LeaseRecord) -> Result<LeaseRecord, LeaseError> {
        let created = self
            .api
            .create(&PostParams::default(), &Self::to_lease(lease))
            .await?;
        Ok(Self::from_lease(created))
    }

    async fn replace(&self, lease: &LeaseRecord) -> Result<LeaseRecord, LeaseError> {
        let replaced = self
            .api
            .replace(LEASE_NAME, &PostParams::default(), &Self::to_lease(lease))
            .await?;
        Ok(Self::from_lease(replaced))
    }
}

/// Why this replica stopped being the leader.
#[derive(Debug, thiserror::Error)]
pub enum Lost {
    /// Another replica wrote the Lease.
    #[error("the Lease {LEASE_NAME} is now held by {0:?}")]
    Taken(Option<String>),
    /// Renewals failed for [`RENEW_DEADLINE`].
    #[error(
        "could not renew the Lease {LEASE_NAME} for {RENEW_DEADLINE:?}; a standby may take over"
    )]
    NotRenewed,
}

/// One candidate for the Lease.
pub struct Elector<S> {
    store: S,
    me: String,
    /// The Lease as last seen (after our own writes: as written).
    seen: Option<LeaseRecord>,
    /// When `seen` last changed, by our clock; `None` before the first look.
    changed: Option<Instant>,
    /// When the last successful write of ours was sent.
    renewed: Instant,
}

impl<S: LeaseStore> Elector<S> {
    /// A candidate named `me` (the pod's name).
    pub fn new(store: S, me: impl Into<String>) -> Self {
        Elector {
            store,
            me: me.into(),
            seen: None,
            changed: None,
            renewed: Instant::now(),
        }
    }

    /// This candidate's identity.
    pub fn identity(&self) -> &str {
        &self.me
    }

    /// Waits until this candidate holds the Lease.
    pub async fn acquire(&mut self) {
        let mut waiting_for = None;
        loop {
            let now = Instant::now();
            let next = match self.try_acquire(now).await {
                Ok(None) => {
                    info!(identity = %self.me, "acquired the Lease; leading");
                    return;
                }
                Ok(Some(until)) => {
                    let holder = self.seen.as_ref().and_then(|l| l.holder.clone());
                    if holder != waiting_for {
                        info!(identity = %self.me, leader = ?holder, "standing by");
                        waiting_for = holder;
                    }
                    until.min(now + RETRY_PERIOD)
                }
                Err(e) => {
                    warn!(error = %e, "cannot look at the Lease; retrying");
                    now + RETRY_PERIOD
                }
            };
            tokio::time::sleep_until(next).await;
        }
    }

    /// One look; `None` once the Lease is ours, else when to look again.
    async fn try_acquire(&mut self, now: Instant) -> Result<Option<Instant>, LeaseError> {
        let lease = self.store.get().await?;
        self.observe(lease, now);
        let changed = self.changed.unwrap_or(now);
        let written = match decide(self.seen.as_ref(), changed, now, &self.me) {
            Decision::Wait(until) => return Ok(Some(until)),
            Decision::Create => self.store.create(&self.claim()).await,
            Decision::Acquire | Decision::Renew => self.store.replace(&self.claim()).await,
        };
        match written {
            Ok(lease) => {
                self.wrote(lease, now);
                Ok(None)
            }
            // Another candidate wrote first: look again at once.
            Err(LeaseError::Conflict) => Ok(Some(now)),
            Err(e) => Err(e),
        }
    }

    /// Renews the Lease every [`RETRY_PERIOD`] while this replica holds it;
    /// returns when it no longer does. The caller must stop acting at once.
    pub async fn keep(&mut self) -> Lost {
        loop {
            let deadline = self.renewed + RENEW_DEADLINE;
            tokio::time::sleep_until((Instant::now() + RETRY_PERIOD).min(deadline)).await;
            let sent = Instant::now();
            if sent >= deadline {
                return Lost::NotRenewed;
            }
            match tokio::time::timeout_at(deadline, self.renew(sent)).await {
                Err(_) => return Lost::NotRenewed,
                Ok(Ok(None)) => {}
                Ok(Ok(Some(lost))) => return lost,
                Ok(Err(e)) => warn!(error = %e, "cannot renew the Lease; retrying"),
            }
        }
    }

    /// One renewal; `Some` if the Lease turned out to be someone else's.
    async fn renew(&mut self, sent: Instant) -> Result<Option<Lost>, LeaseError> {
        match self.store.replace(&self.claim()).await {
            Ok(lease) => {
                self.wrote(lease, sent);
                return Ok(None);
            }
            Err(LeaseError::Conflict) => {}
            Err(e) => return Err(e),
        }
        let lease = self.store.get().await?;
        self.observe(lease, Instant::now());
        match self.seen.as_ref().and_then(|l| l.holder()) {
            // Our own write landed but its answer was lost: renew on top of it.
            Some(h) if h == self.me => {
                let lease = self.store.replace(&self.claim()).await?;
                self.wrote(lease, sent);
                Ok(None)
            }
            other => Ok(Some(Lost::Taken(other.map(String::from)))),
        }
    }

    /// Gives up the Lease, if this replica holds it, so a standby takes over
    /// at its next look instead of after expiry.
    pub async fn release(&mut self) -> Result<(), LeaseError> {
        let Some(mut lease) = self.seen.clone() else {
            return Ok(());
        };
        if lease.holder() != Some(self.me.as_str()) {
            return Ok(());
        }
        lease.holder = None;
        lease.duration = RELEASED_DURATION;
        let released = self.store.replace(&lease).await?;
        self.seen = Some(released);
        info!(identity = %self.me, "released the Lease");
        Ok(())
    }

    /// The Lease as this candidate would write it to hold it.
    fn claim(&self) -> LeaseRecord {
        let base = self.seen.as_ref();
        let mine = base.and_then(|l| l.holder()) == Some(self.me.as_str());
        LeaseRecord {
            holder: Some(self.me.clone()),
            duration: LEASE_DURATION,
            transitions: base.map_or(0, |l| l.transitions + i32::from(!mine)),
            acquired: match base {
                Some(l) if mine => l.acquired,
                _ => Some(Timestamp::now()),
            },
            version: base.and_then(|l| l.version.clone()),
        }
    }

    fn observe(&mut self, lease: Option<LeaseRecord>, now: Instant) {
        let same = self.changed.is_some()
            && self.seen.as_ref().map(|l| &l.version) == lease.as_ref().map(|l| &l.version);
        if !same {
            self.changed = Some(now);
        }
        self.seen = lease;
    }

    fn wrote(&mut self, lease: LeaseRecord, sent: Instant) {
        self.seen = Some(lease);
        self.changed = Some(sent);
        self.renewed = sent;
    }
}

/// Keeps the pod's [`LEADER_LABEL`] equal to `leading`: removed while
/// standing by, `true` once leading. Retries failures every
/// [`RETRY_PERIOD`]; runs until `leading`'s sender is dropped.
pub async fn label_pod(pods: Api<Pod>, pod: String, mut leading: watch::Receiver<bool>) {
    loop {
        let want = *leading.borrow_and_update();
        let value = if want {
            serde_json::Value::from("true")
        } else {
            serde_json::Value::Null
        };
        let patch = serde_json::json!({"metadata": {"labels": {LEADER_LABEL: value}}});
        match pods
            .patch(&pod, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                info!(%pod, leader = want, "pod label {LEADER_LABEL} set");
                if leading.changed().await.is_err() {
                    return;
                }
            }
            Err(e) => {
                error!(%pod, leader = want, error = %e,
                    "cannot set the pod label {LEADER_LABEL} (agents reach the leader through it; the coordinator needs patch on pods); retrying");
                tokio::time::sleep(RETRY_PERIOD).await;
            }
        }
    }
}

#[cfg(test)]
mod tests;
