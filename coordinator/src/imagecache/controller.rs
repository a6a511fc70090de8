//! Feeds the planner and carries its plan out: the thin loop around the
//! pure modules.
//!
//! [`super::watch`] mirrors ImageCaches and Nodes (a new, deleted or
//! relabelled node wakes the loop; a Node status update does not); agent
//! sessions wake it through the node registry (inventories and finished
//! tasks, not heartbeats). Each pass turns both into planner views, has the
//! caches that share an image with different credentials checked against the
//! registry ([`super::access`]), sends the planner's tasks (credentials from
//! the wanting caches' pull Secrets, the next cache's after each failed
//! attempt, only to the agents that pull), writes each cache's status from
//! [`super::status`] (a new phase or condition at once, new counts at most
//! twice a second), records Events on phase changes, keeps the finalizer
//! until [`plan::deletion_waits`] names no node, and publishes
//! [`super::detail`] for `berth.v1.Inventory`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use berth_proto::agent as pb;
use berth_proto::docker_config::{DockerCredentials, RegistryAuth};
use berth_proto::reference::Reference;
use k8s_openapi::api::core::v1::{Node, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use tracing::{debug, info, warn};

use super::access::{AccessChecker, Verdict, fingerprint, needing_check, pick_credentials};
use super::crd::{DeletionPolicy, FINALIZER, ImageCache, ImageCacheStatus, UpdateType};
use super::detail::PassDetail;
use super::plan::{self, Access, Action, CacheView, NodeView};
use super::problems::ProblemLog;
use super::pull_secrets::{forbidden_message, is_forbidden, mark_forbidden};
use super::sizes::Sizes;
use super::status::{Write, build_status, write_decision};
use super::tags::{OciRegistry, TagTracker};
use super::watch::{any_change, mirror, node_labels};
use crate::domain::{CacheDetails, DetailSource, TaskRecord};
use crate::metrics::METRICS;
use crate::nodes::NodeRegistry;

use super::view::key;
pub use super::view::{
    DEFAULT_PULL_TIMEOUT, DEFAULT_PULLS_PER_NODE, DEFAULT_TRACK_INTERVAL, cache_view,
};
/// After a coordinator start, how long agents have to reconnect before a
/// node without one makes its caches Degraded.
const AGENT_GRACE: Duration = Duration::from_secs(30);
/// A pass runs at least this often (backoffs expire without an event).
const RESYNC: Duration = Duration::from_secs(2);
/// Passes start at most this often, so a burst of events makes one pass; a
/// wake after a quiet spell runs at once.
const PASS_GAP: Duration = Duration::from_millis(50);

/// The ImageCache controller.
pub struct Controller {
    client: kube::Client,
    registry: Arc<NodeRegistry>,
    caches: Store<ImageCache>,
    nodes: Store<Node>,
    details: CacheDetails,
    recorder: Recorder,
    tracker: TagTracker<OciRegistry>,
    sizes: Sizes<OciRegistry>,
    access: AccessChecker<OciRegistry>,
    problems: std::sync::Mutex<ProblemLog>,
    /// (cache key, Secret name) → why the coordinator may not read it.
    forbidden: std::sync::Mutex<HashMap<(String, String), String>>,
    written: HashMap<String, (Instant, ImageCacheStatus)>,
    deferred: Option<Instant>,
    phases: HashMap<String, String>,
    next_task: AtomicU64,
    run_id: u64,
    started: Instant,
}

/// Starts the reflectors and runs passes until the process ends, beating
/// `pulse` after each (health reports a controller that stopped passing).
/// Tags are resolved over plain HTTP for the `insecure` registries (`host:port`).
pub async fn run(
    client: kube::Client,
    registry: Arc<NodeRegistry>,
    details: CacheDetails,
    insecure: Vec<String>,
    pulse: Arc<crate::health::Pulse>,
) {
    let wake = registry.changed();
    let caches = mirror::<ImageCache>(&client, wake.clone(), any_change);
    let nodes = mirror::<Node>(&client, wake.clone(), node_labels);
    let _ = caches.wait_until_ready().await;
    let _ = nodes.wait_until_ready().await;
    info!("ImageCache controller running");
    let reporter = Reporter {
        controller: "berth-coordinator".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let mut c = Controller {
        recorder: Recorder::new(client.clone(), reporter),
        tracker: TagTracker::new(OciRegistry::new(insecure.clone()), wake.clone()),
        sizes: Sizes::new(OciRegistry::new(insecure.clone())),
        access: AccessChecker::new(OciRegistry::new(insecure), wake.clone()),
        problems: Default::default(),
        forbidden: Default::default(),
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
        let started = Instant::now();
        c.deferred = None;
        c.pass().await;
        pulse.beat();
        // A status write held back by the rate limit is due before the resync.
        let next = c.deferred.map_or(RESYNC, |t| {
            t.saturating_duration_since(Instant::now()).min(RESYNC)
        });
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(next) => {}
        }
        tokio::time::sleep_until((started + PASS_GAP).into()).await;
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
        // Shared with the published detail until the next pass.
        let node_views = Arc::new(node_views);
        let mut secrets: HashMap<String, Option<DockerCredentials>> = HashMap::new();
        let mut views: Vec<CacheView> = Vec::with_capacity(caches.len());
        for c in &caches {
            let pins = self.pins(c, &mut secrets).await;
            views.push(cache_view(c, &pins));
        }
        self.check_access(&caches, &mut views, &mut secrets).await;

        for (c, v) in caches.iter().zip(&views) {
            if !v.deleting && !c.finalizers().iter().any(|f| f == FINALIZER) {
                self.set_finalizer(c, true).await;
            }
        }

        for action in plan::actions(&views, &node_views) {
            self.dispatch(action, &caches, &mut secrets).await;
        }

        // Forget unreadable Secrets of caches that are gone.
        self.forbidden
            .lock()
            .unwrap()
            .retain(|(k, _), _| views.iter().any(|v| &v.key == k));
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
            let mut status = build_status(
                c.status.as_ref(),
                c.metadata.generation,
                v,
                computed,
                Timestamp::now(),
                grace,
            );
            if let Some(message) = self.forbidden_for(&v.key) {
                mark_forbidden(&mut status, &message, &Time(Timestamp::now()));
            }
            let detail = PassDetail {
                view: v.clone(),
                nodes: node_views.clone(),
            };
            details.insert(v.key.clone(), Arc::new(detail) as Arc<dyn DetailSource>);
            self.write_status(c, status).await;
            if v.deleting && c.finalizers().iter().any(|f| f == FINALIZER) {
                let waits = match v.deletion {
                    DeletionPolicy::Retain => vec![],
                    DeletionPolicy::RemoveFromNodes => plan::deletion_waits(v, &views, &node_views),
                };
                if waits.is_empty() {
                    self.set_finalizer(c, false).await;
                } else {
                    debug!(cache = %v.key, nodes = ?waits, "deletion waits for removals on these nodes");
                }
            }
        }
        *self.details.write().unwrap() = details;
        METRICS.set_cache_nodes(node_counts);
        METRICS.passes.inc();
        METRICS.pass_seconds.inc_by(now.elapsed().as_secs_f64());
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
                caches: lenders,
                attempt,
                expected_size,
                pin,
            } => {
                let mut candidates = Vec::with_capacity(lenders.len());
                for k in &lenders {
                    if let Some(c) = caches.iter().find(|c| &key(c) == k) {
                        candidates.push(self.credentials_for(c, &image, secrets).await);
                    }
                }
                let credentials = pick_credentials(&candidates, attempt);
                // No node holds it yet: learn its size from the registry, so
                // the agent's disk guard checks what the pull will take.
                let expected_size = if expected_size > 0 {
                    expected_size
                } else {
                    let auth = credentials.as_ref().map(|c| RegistryAuth {
                        username: c.username.clone(),
                        password: c.password.clone(),
                    });
                    self.sizes.expected(&image, auth).await
                };
                let task = pb::Task {
                    id,
                    kind: Some(pb::task::Kind::Pull(pb::PullTask {
                        image: image.clone(),
                        credentials,
                        timeout_seconds: timeout.as_secs().min(u32::MAX as u64) as u32,
                        expected_size_bytes: expected_size,
                        pin: pin.clone().unwrap_or_default(),
                    })),
                };
                (
                    node,
                    task,
                    TaskRecord {
                        image,
                        pull: true,
                        pin,
                    },
                )
            }
            Action::Remove { node, image } => {
                let task = pb::Task {
                    id,
                    kind: Some(pb::task::Kind::Remove(pb::RemoveTask {
                        image: image.clone(),
                    })),
                };
                (
                    node,
                    task,
                    TaskRecord {
                        image,
                        pull: false,
                        pin: None,
                    },
                )
            }
        };
        debug!(node = %node, image = %record.image, pull = record.pull, task = %task.id, "dispatching");
        if !self.registry.dispatch(&node, task, record) {
            debug!(node = %node, "agent not reachable now; the task falls out of a later pass");
        }
    }

    /// Marks, in each cache's view, the images whose readiness must wait on or
    /// was refused by a check of the cache's own credentials: those that
    /// caches with different credentials share. Secrets are read only for
    /// images more than one cache wants.
    async fn check_access(
        &self,
        caches: &[Arc<ImageCache>],
        views: &mut [CacheView],
        secrets: &mut HashMap<String, Option<DockerCredentials>>,
    ) {
        let mut wanting: HashMap<&str, usize> = HashMap::new();
        for v in views.iter().filter(|v| !v.deleting) {
            for i in &v.images {
                *wanting.entry(i.reference.as_str()).or_default() += 1;
            }
        }
        let shared: Vec<String> = wanting
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(r, _)| r.to_string())
            .collect();
        if shared.is_empty() {
            return;
        }
        let mut uses = Vec::new();
        let mut auths = HashMap::new();
        for (c, v) in caches.iter().zip(views.iter()).filter(|(_, v)| !v.deleting) {
            for i in v.images.iter().filter(|i| shared.contains(&i.reference)) {
                let auth = self
                    .credentials_for(c, &i.reference, secrets)
                    .await
                    .map(|a| RegistryAuth {
                        username: a.username,
                        password: a.password,
                    });
                let f = fingerprint(auth.as_ref());
                uses.push((v.key.clone(), i.reference.clone(), f));
                auths.insert((v.key.clone(), i.reference.clone()), auth);
            }
        }
        let check = needing_check(&uses);
        for v in views.iter_mut() {
            v.access.clear();
            for i in &v.images {
                let k = (v.key.clone(), i.reference.clone());
                if !check.contains(&k) {
                    continue;
                }
                let auth = auths.get(&k).cloned().flatten();
                match self.access.verdict(&v.key, &i.reference, auth) {
                    None => {
                        v.access.insert(i.reference.clone(), Access::Unverified);
                    }
                    Some(Verdict::Denied(why)) => {
                        v.access.insert(i.reference.clone(), Access::Denied(why));
                    }
                    Some(Verdict::Allowed) => {}
                }
            }
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
            let auth = self
                .credentials_for(c, &reference, secrets)
                .await
                .map(|a| RegistryAuth {
                    username: a.username,
                    password: a.password,
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

    /// Why a pull Secret of cache `k` is unreadable, if one is.
    fn forbidden_for(&self, k: &str) -> Option<String> {
        self.forbidden
            .lock()
            .unwrap()
            .iter()
            .find(|((cache, _), _)| cache == k)
            .map(|(_, m)| m.clone())
    }

    async fn load_secret(&self, c: &ImageCache, ns: &str, name: &str) -> Option<DockerCredentials> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let subject = format!("{} secret {name}", key(c));
        let read = api.get_opt(name).await;
        let forbidden_key = (key(c), name.to_string());
        if let Err(e) = &read
            && is_forbidden(e)
        {
            let own_ns = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "berth-system".into());
            let message = forbidden_message(ns, name, &own_ns);
            self.forbidden
                .lock()
                .unwrap()
                .insert(forbidden_key, message);
        } else {
            self.forbidden.lock().unwrap().remove(&forbidden_key);
        }
        let problem = match read {
            Ok(Some(s)) => match s.data.as_ref().and_then(|d| d.get(".dockerconfigjson")) {
                Some(bytes) => {
                    match DockerCredentials::parse(&bytes.0, &format!("Secret {ns}/{name}")) {
                        Ok(creds) => {
                            self.problems.lock().unwrap().clear(&subject);
                            return Some(creds);
                        }
                        Err(e) => e.to_string(),
                    }
                }
                None => format!(
                    "Secret {ns}/{name} has no .dockerconfigjson (type kubernetes.io/dockerconfigjson)"
                ),
            },
            Ok(None) => format!("imagePullSecret {ns}/{name} does not exist"),
            Err(e) if is_forbidden(&e) => self
                .forbidden_for(&key(c))
                .unwrap_or_else(|| format!("cannot read Secret {ns}/{name}: {e}")),
            Err(e) => format!("cannot read Secret {ns}/{name}: {e}"),
        };
        if self.problems.lock().unwrap().is_news(&subject, &problem) {
            warn!(cache = %key(c), "{problem}");
            self.event(c, EventType::Warning, "PullSecretUnusable", problem)
                .await;
        } else {
            debug!(cache = %key(c), "{problem}");
        }
        None
    }

    async fn write_status(&mut self, c: &ImageCache, status: ImageCacheStatus) {
        let k = key(c);
        let last = self.written.get(&k).map(|(at, s)| (*at, s));
        match write_decision(c.status.as_ref(), last, &status, Instant::now()) {
            Write::Skip => return,
            Write::At(due) => {
                self.deferred = Some(self.deferred.map_or(due, |d| d.min(due)));
                debug!(cache = %k, "status write deferred by the rate limit");
                return;
            }
            Write::Now => {}
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
                METRICS.status_writes.inc();
                METRICS.api_writes.inc();
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
        METRICS.api_writes.inc();
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
        METRICS.api_writes.inc();
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
