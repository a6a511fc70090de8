//! Feeds the planner and carries its plan out.
//!
//! Reflectors keep ImageCaches and Nodes in memory (a relabelled or new node
//! wakes the loop at once); agent sessions wake it through the node registry.
//! Each pass turns both into planner views, sends the resulting tasks (with
//! credentials from the cache's pull Secrets, only to the agents that pull),
//! writes each cache's status when it changed (at most once a second per
//! cache), records Events on phase changes, manages the finalizer and
//! publishes per-node detail for `berth.v1.Inventory`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use berth_proto::agent as pb;
use berth_proto::docker_config::DockerCredentials;
use berth_proto::reference::Reference;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use tracing::{debug, info, warn};

use super::crd::{
    DeletionPolicy, FINALIZER, ImageCache, ImageCacheStatus, RolloutTimes, UpdateType,
};
use super::plan::{self, Action, CacheView, NodeView};
use super::tags::{OciRegistry, TagTracker};
use crate::metrics::METRICS;
use crate::nodes::{NodeRegistry, TaskRecord};

use super::view::key;
pub use super::view::{
    DEFAULT_PULL_TIMEOUT, DEFAULT_PULLS_PER_NODE, DEFAULT_TRACK_INTERVAL, cache_view,
};
/// Least time between two status writes of one cache.
const STATUS_INTERVAL: Duration = Duration::from_millis(500);
/// After a coordinator start, how long agents have to reconnect before a
/// node without one makes its caches Degraded.
const AGENT_GRACE: Duration = Duration::from_secs(30);
/// A pass runs at least this often (backoffs expire without an event).
const RESYNC: Duration = Duration::from_secs(2);

/// Per-node detail of one cache, for the public API.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeDetail {
    /// Node name.
    pub node: String,
    /// `Ready`, `Pulling`, `Pending`, `Failed` or `Unknown`, per image.
    pub images: Vec<ImageDetail>,
}

/// One image of a cache on one node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageDetail {
    /// Normalised reference.
    pub reference: String,
    /// `Ready`, `Pulling`, `Pending`, `Failed` or `Unknown`.
    pub state: String,
    /// Failure reason, if failed.
    pub reason: String,
    /// Failure message, if failed.
    pub message: String,
    /// Failed attempts in a row.
    pub attempts: u32,
}

/// The latest per-node detail of every cache, keyed `namespace/name`.
pub type CacheDetails = Arc<RwLock<BTreeMap<String, Vec<NodeDetail>>>>;

/// The ImageCache controller.
pub struct Controller {
    client: kube::Client,
    registry: Arc<NodeRegistry>,
    caches: Store<ImageCache>,
    nodes: Store<Node>,
    details: CacheDetails,
    recorder: Recorder,
    tracker: TagTracker<OciRegistry>,
    written: HashMap<String, (Instant, ImageCacheStatus)>,
    deferred: Option<Instant>,
    phases: HashMap<String, String>,
    next_task: AtomicU64,
    run_id: u64,
    started: Instant,
}

/// Starts the reflectors and runs passes until the process ends.
/// Tags are resolved over plain HTTP for the `insecure` registries (`host:port`).
pub async fn run(
    client: kube::Client,
    registry: Arc<NodeRegistry>,
    details: CacheDetails,
    insecure: Vec<String>,
) {
    let wake = registry.changed();
    let caches = mirror::<ImageCache>(&client, wake.clone());
    let nodes = mirror::<Node>(&client, wake.clone());
    let _ = caches.wait_until_ready().await;
    let _ = nodes.wait_until_ready().await;
    info!("ImageCache controller running");
    let reporter = Reporter {
        controller: "berth-coordinator".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let mut c = Controller {
        recorder: Recorder::new(client.clone(), reporter),
        tracker: TagTracker::new(OciRegistry::new(insecure), wake.clone()),
        client,
        registry,
        caches,
        nodes,
        details,
        written: HashMap::new(),
        deferred: None,
        phases: HashMap::new(),
        next_task: AtomicU64::new(0),
        run_id: Timestamp::now().as_millisecond() as u64,
        started: Instant::now(),
    };
    loop {
        c.deferred = None;
        c.pass().await;
        // A status write held back by the rate limit is due before the resync.
        let next = c.deferred.map_or(RESYNC, |t| {
            t.saturating_duration_since(Instant::now()).min(RESYNC)
        });
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(next) => {}
        }
        // Let a burst of events settle into one pass.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Keeps every object of kind `K` in a store, waking `wake` on each change.
fn mirror<K>(client: &kube::Client, wake: Arc<tokio::sync::Notify>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let kind = K::kind(&());
    tokio::spawn(
        watcher(Api::<K>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .reflect(writer)
            .for_each(move |e| {
                if let Err(e) = e {
                    warn!(error = %e, "{kind} watch failed; retrying");
                }
                wake.notify_one();
                futures::future::ready(())
            }),
    );
    store
}

fn condition(
    type_: &str,
    on: bool,
    reason: &str,
    message: String,
    old: &[Condition],
    now: &Time,
) -> Condition {
    let status = if on { "True" } else { "False" }.to_string();
    let since = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message,
        last_transition_time: since,
        observed_generation: None,
    }
}

/// The status a cache should have, from the planner's counts and its old
/// status. During `agent_grace` (right after the coordinator starts, while
/// agents reconnect) a node without an agent counts as waiting, not degraded.
pub fn build_status(
    c: &ImageCache,
    v: &CacheView,
    computed: plan::Computed,
    now: Timestamp,
    agent_grace: bool,
) -> ImageCacheStatus {
    let old = c.status.clone().unwrap_or_default();
    let n = &computed.nodes;
    let (waiting, troubled) = if agent_grace {
        (n.pulling + n.pending + n.unknown, n.failed)
    } else {
        (n.pulling + n.pending, n.failed + n.unknown)
    };
    let ready = troubled == 0 && waiting == 0;
    let phase = if v.deleting {
        "Deleting"
    } else if v.paused {
        "Paused"
    } else if troubled > 0 {
        "Degraded"
    } else if waiting > 0 {
        "Progressing"
    } else {
        "Ready"
    };
    let t = Time(now);
    let degraded_reason = computed.top_reason.clone().unwrap_or_else(|| {
        if n.unknown > 0 {
            "AgentDisconnected".into()
        } else {
            "AsExpected".into()
        }
    });
    let conditions = vec![
        condition(
            "Ready",
            ready,
            if ready {
                "AllNodesReady"
            } else {
                "NodesNotReady"
            },
            format!("{}/{} selected nodes hold every image", n.ready, n.target),
            &old.conditions,
            &t,
        ),
        condition(
            "Progressing",
            waiting > 0 && !v.paused,
            if waiting > 0 { "Pulling" } else { "Idle" },
            format!("{} nodes pulling, {} waiting", n.pulling, n.pending),
            &old.conditions,
            &t,
        ),
        condition(
            "Degraded",
            troubled > 0,
            &degraded_reason,
            format!(
                "{} nodes failed, {} without a connected agent",
                n.failed, n.unknown
            ),
            &old.conditions,
            &t,
        ),
    ];
    // A rollout starts when the cache stops being ready and completes when it is again.
    let was_ready = old.phase == "Ready";
    let last_rollout = match (old.last_rollout, was_ready, ready) {
        (Some(r), true, true) => Some(r),
        (Some(r), false, false) if r.completed.is_none() => Some(r),
        (Some(r), false, true) if r.completed.is_none() => {
            let started: Option<Timestamp> = r.started.parse().ok();
            Some(RolloutTimes {
                seconds: started.map(|s| now.duration_since(s).as_secs_f64()),
                completed: Some(now.to_string()),
                ..r
            })
        }
        (r, _, _) if !ready || r.is_none() => Some(RolloutTimes {
            started: now.to_string(),
            completed: ready.then(|| now.to_string()),
            seconds: ready.then_some(0.0),
        }),
        (r, _, _) => r,
    };
    ImageCacheStatus {
        observed_generation: c.metadata.generation,
        phase: phase.into(),
        conditions,
        nodes: computed.nodes,
        images: computed.images,
        last_rollout,
    }
}

impl Controller {
    async fn pass(&mut self) {
        let now = Instant::now();
        debug!("pass");
        let caches = self.caches.state();
        let mut node_views: Vec<NodeView> = self
            .nodes
            .state()
            .iter()
            .map(|n| {
                let name = n.name_any();
                NodeView {
                    agent: self.registry.agent_view(&name, now),
                    labels: n.labels().clone(),
                    name,
                }
            })
            .collect();
        // Stable order: per-node detail is listed by name.
        node_views.sort_by(|a, b| a.name.cmp(&b.name));
        let mut secrets: HashMap<String, Option<DockerCredentials>> = HashMap::new();
        let mut views: Vec<CacheView> = Vec::with_capacity(caches.len());
        for c in &caches {
            let pins = self.pins(c, &mut secrets).await;
            views.push(cache_view(c, &pins));
        }

        for (c, v) in caches.iter().zip(&views) {
            if !v.deleting && !c.finalizers().iter().any(|f| f == FINALIZER) {
                self.set_finalizer(c, true).await;
            }
        }

        for action in plan::actions(&views, &node_views) {
            self.dispatch(action, &caches, &mut secrets).await;
        }

        let mut details = BTreeMap::new();
        let mut node_counts = BTreeMap::new();
        for (c, v) in caches.iter().zip(&views) {
            let computed = plan::status(v, &node_views);
            let n = &computed.nodes;
            for (state, count) in [
                ("ready", n.ready),
                ("pulling", n.pulling),
                ("pending", n.pending),
                ("failed", n.failed),
                ("unknown", n.unknown),
            ] {
                node_counts.insert((v.key.clone(), state), count.into());
            }
            let grace = self.started.elapsed() < AGENT_GRACE;
            let status = build_status(c, v, computed, Timestamp::now(), grace);
            details.insert(v.key.clone(), node_details(v, &node_views));
            self.write_status(c, status).await;
            if v.deleting && c.finalizers().iter().any(|f| f == FINALIZER) {
                let done = v.deletion == DeletionPolicy::Retain
                    || plan::deletion_done(v, &views, &node_views);
                if done {
                    self.set_finalizer(c, false).await;
                }
            }
        }
        *self.details.write().unwrap() = details;
        METRICS.set_cache_nodes(node_counts);
        METRICS.passes.fetch_add(1, Ordering::Relaxed);
        METRICS
            .pass_micros
            .fetch_add(now.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    async fn dispatch(
        &self,
        action: Action,
        caches: &[Arc<ImageCache>],
        secrets: &mut HashMap<String, Option<DockerCredentials>>,
    ) {
        let id = format!(
            "{:x}-{}",
            self.run_id,
            self.next_task.fetch_add(1, Ordering::Relaxed)
        );
        let (node, task, record) = match action {
            Action::Pull {
                node,
                image,
                timeout,
                cache,
                expected_size,
                pin,
            } => {
                let credentials = match caches.iter().find(|c| key(c) == cache) {
                    Some(c) => self.credentials_for(c, &image, secrets).await,
                    None => None,
                };
                let task = pb::Task {
                    id,
                    kind: Some(pb::task::Kind::Pull(pb::PullTask {
                        image: image.clone(),
                        credentials,
                        timeout_seconds: timeout.as_secs().min(u32::MAX as u64) as u32,
                        expected_size_bytes: expected_size,
                        pin: pin.unwrap_or_default(),
                    })),
                };
                (node, task, TaskRecord { image, pull: true })
            }
            Action::Remove { node, image } => {
                let task = pb::Task {
                    id,
                    kind: Some(pb::task::Kind::Remove(pb::RemoveTask {
                        image: image.clone(),
                    })),
                };
                (node, task, TaskRecord { image, pull: false })
            }
        };
        debug!(node = %node, image = %record.image, pull = record.pull, task = %task.id, "dispatching");
        if !self.registry.dispatch(&node, task, record) {
            debug!(node = %node, "agent not reachable now; the task falls out of a later pass");
        }
    }

    /// For a TrackTag cache, the digest each tagged image points to now.
    async fn pins(
        &self,
        c: &ImageCache,
        secrets: &mut HashMap<String, Option<DockerCredentials>>,
    ) -> HashMap<String, String> {
        let mut pins = HashMap::new();
        let tracking = c.spec.update_policy.as_ref();
        if !tracking.is_some_and(|p| p.type_ == UpdateType::TrackTag) {
            return pins;
        }
        let interval = super::view::track_interval(c);
        for i in &c.spec.images {
            let Ok(r) = Reference::parse(&i.reference) else {
                continue;
            };
            if r.digest.is_some() {
                continue;
            }
            let reference = r.to_string();
            let auth = self.credentials_for(c, &reference, secrets).await.map(|a| {
                berth_proto::docker_config::RegistryAuth {
                    username: a.username,
                    password: a.password,
                }
            });
            if let Some(digest) = self.tracker.digest(&reference, interval, auth) {
                pins.insert(reference, format!("{}@{digest}", r.repository()));
            }
        }
        pins
    }

    /// Credentials for `image` from the cache's pull Secrets, first match wins.
    async fn credentials_for(
        &self,
        c: &ImageCache,
        image: &str,
        secrets: &mut HashMap<String, Option<DockerCredentials>>,
    ) -> Option<pb::RegistryCredentials> {
        let ns = c.namespace().unwrap_or_default();
        let reference = Reference::parse(image).ok()?;
        for s in &c.spec.image_pull_secrets {
            let k = format!("{ns}/{}", s.name);
            if !secrets.contains_key(&k) {
                let creds = self.load_secret(c, &ns, &s.name).await;
                secrets.insert(k.clone(), creds);
            }
            if let Some(a) = secrets[&k]
                .as_ref()
                .and_then(|d| d.for_reference(&reference))
            {
                return Some(pb::RegistryCredentials {
                    username: a.username.clone(),
                    password: a.password.clone(),
                });
            }
        }
        None
    }

    async fn load_secret(&self, c: &ImageCache, ns: &str, name: &str) -> Option<DockerCredentials> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let problem = match api.get_opt(name).await {
            Ok(Some(s)) => match s.data.as_ref().and_then(|d| d.get(".dockerconfigjson")) {
                Some(bytes) => {
                    match DockerCredentials::parse(&bytes.0, &format!("Secret {ns}/{name}")) {
                        Ok(creds) => return Some(creds),
                        Err(e) => e.to_string(),
                    }
                }
                None => format!(
                    "Secret {ns}/{name} has no .dockerconfigjson (type kubernetes.io/dockerconfigjson)"
                ),
            },
            Ok(None) => format!("imagePullSecret {ns}/{name} does not exist"),
            Err(e) => format!("cannot read Secret {ns}/{name}: {e}"),
        };
        warn!(cache = %key(c), "{problem}");
        self.event(c, EventType::Warning, "PullSecretUnusable", problem)
            .await;
        None
    }

    async fn write_status(&mut self, c: &ImageCache, status: ImageCacheStatus) {
        let k = key(c);
        let last = self.written.get(&k);
        // The store may not have seen our last write yet: compare with both.
        if c.status.as_ref() == Some(&status) || last.is_some_and(|(_, s)| *s == status) {
            return;
        }
        if let Some((at, _)) = last.filter(|(at, _)| at.elapsed() < STATUS_INTERVAL) {
            let due = *at + STATUS_INTERVAL;
            self.deferred = Some(self.deferred.map_or(due, |d| d.min(due)));
            debug!(cache = %k, "status write deferred by the rate limit");
            return;
        }
        let old_phase = self.phases.insert(k.clone(), status.phase.clone());
        debug!(cache = %k, phase = %status.phase, "writing status");
        let api: Api<ImageCache> =
            Api::namespaced(self.client.clone(), &c.namespace().unwrap_or_default());
        let patch = serde_json::json!({ "status": status });
        match api
            .patch_status(
                &c.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {
                METRICS.status_writes.fetch_add(1, Ordering::Relaxed);
                METRICS.api_writes.fetch_add(1, Ordering::Relaxed);
                self.written
                    .insert(k.clone(), (Instant::now(), status.clone()));
            }
            Err(e) => warn!(cache = %k, error = %e, "status write failed; retrying"),
        }
        if old_phase.as_deref() != Some(status.phase.as_str()) {
            let (kind, note) = match status.phase.as_str() {
                "Degraded" => (
                    EventType::Warning,
                    status
                        .conditions
                        .iter()
                        .find(|c| c.type_ == "Degraded")
                        .map(|c| format!("{}: {}", c.reason, c.message))
                        .unwrap_or_default(),
                ),
                _ => (
                    EventType::Normal,
                    format!(
                        "{}/{} selected nodes ready",
                        status.nodes.ready, status.nodes.target
                    ),
                ),
            };
            info!(cache = %k, phase = %status.phase, "{note}");
            self.event(c, kind, &status.phase.clone(), note).await;
        }
    }

    async fn event(&self, c: &ImageCache, type_: EventType, reason: &str, note: String) {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        METRICS.api_writes.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.recorder.publish(&ev, &c.object_ref(&())).await {
            debug!(error = %e, "event not recorded");
        }
    }

    async fn set_finalizer(&self, c: &ImageCache, present: bool) {
        let mut finalizers: Vec<String> = c
            .finalizers()
            .iter()
            .filter(|f| *f != FINALIZER)
            .cloned()
            .collect();
        if present {
            finalizers.push(FINALIZER.into());
        }
        let api: Api<ImageCache> =
            Api::namespaced(self.client.clone(), &c.namespace().unwrap_or_default());
        let patch = serde_json::json!({
            "metadata": { "finalizers": finalizers, "resourceVersion": c.resource_version() }
        });
        METRICS.api_writes.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = api
            .patch(
                &c.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            debug!(cache = %key(c), error = %e, "finalizer update failed; retrying next pass");
        } else if !present {
            info!(cache = %key(c), "finalizer removed");
        }
    }
}

/// Per-node detail of one cache.
pub fn node_details(v: &CacheView, nodes: &[NodeView]) -> Vec<NodeDetail> {
    nodes
        .iter()
        .filter(|n| v.targets(n))
        .map(|n| NodeDetail {
            node: n.name.clone(),
            images: v
                .images
                .iter()
                .map(|i| {
                    let r = &i.reference;
                    let mut d = ImageDetail {
                        reference: r.clone(),
                        ..Default::default()
                    };
                    d.state = match n.agent.as_ref().filter(|a| a.connected) {
                        None => "Unknown".into(),
                        Some(a) if a.holds(r).is_some() => "Ready".into(),
                        Some(a) => match a.failures.get(r) {
                            Some(f) => {
                                d.reason = f.reason.clone();
                                d.message = f.message.clone();
                                d.attempts = f.attempts;
                                "Failed".into()
                            }
                            None if a.pulling.contains(r) => "Pulling".into(),
                            None => "Pending".into(),
                        },
                    };
                    d
                })
                .collect(),
        })
        .collect()
}
