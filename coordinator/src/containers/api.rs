//! `berth.v1.Containers`: Docker's container calls, done with pods.
//!
//! Reads come from the namespace's mirror ([`super::store`]); writes go to
//! the apiserver and then wait until the mirror has seen them, so a call
//! that follows sees what the one before it did. Waits (`Start`, `Stop`,
//! `Wait`, attach) re-check on each watch event, with deadlines.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use berth_proto::agent as agent_pb;
use berth_proto::api as pb;
use futures::Stream;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::logs::LogRouter;
use super::networks;
use super::placement;
use super::pod::{self, MAIN_CONTAINER};
use super::pool;
use super::record::{self, RUN_STARTED_ANNOTATION, RUNS_ANNOTATION, Record, SPEC_KEY};
use super::sessions::{self, session_of};
use super::store::{Space, Spaces};
use crate::nodes::NodeRegistry;

/// How long a lookup by full ID waits for the mirror to show a record that
/// was just written (a `docker run` starts what it created at once).
const MIRROR_LAG: Duration = Duration::from_secs(3);

/// Longest wait for the mirror to show a write just made.
pub const SEE_WRITE: Duration = Duration::from_secs(10);
/// Longest wait for a started container to run (an image pull included).
pub const START_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest a finished auto-remove container waits for its log readers.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a single `Wait` call blocks (clients call again).
pub const WAIT_LIMIT: Duration = Duration::from_secs(24 * 3600);

/// The `Containers` service.
#[derive(Clone)]
pub struct ContainersApi {
    spaces: Spaces,
    registry: Arc<NodeRegistry>,
    pool: Arc<pool::PoolConfig>,
    /// Namespaces whose pool is being refilled.
    filling: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// The cluster's nodes (without status), for placement.
    nodes: Option<kube::runtime::reflector::Store<k8s_openapi::api::core::v1::Node>>,
}

pub(super) fn kube_status(what: &str, e: kube::Error) -> Status {
    match e {
        kube::Error::Api(ae) => {
            let msg = format!("{what}: {}", ae.message);
            match ae.code {
                403 => Status::permission_denied(msg),
                404 => Status::not_found(msg),
                409 => Status::already_exists(msg),
                422 | 400 => Status::invalid_argument(msg),
                429 => Status::resource_exhausted(msg),
                _ => Status::internal(msg),
            }
        }
        e => Status::unavailable(format!("{what}: {e}")),
    }
}

/// `r` with "not found" taken as done: for deletes of what may be gone.
pub(super) fn ignore_missing<T>(r: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match r {
        Err(kube::Error::Api(ae)) if ae.code == 404 => Ok(()),
        r => r.map(|_| ()),
    }
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// The container as the API reports it.
pub fn info(space: &Space, record: &Record) -> pb::ContainerInfo {
    let pod = space.current_pod(record);
    let mut state = pod::state_of(pod.as_deref());
    if let Some(p) = pod.as_deref() {
        state.health = pod::health_of(&record.spec, p, now_secs());
    }
    // A run whose pod is missing: still being made (the run is claimed in
    // the record just before its pod is created), or gone.
    let making = record
        .run_started
        .parse::<k8s_openapi::jiff::Timestamp>()
        .is_ok_and(|t| now_secs() - t.as_second() < SEE_WRITE.as_secs() as i64 * 3);
    if record.runs > 0 && pod.is_none() && !making {
        state.status = "exited".into();
        state.exit_code = 137;
        state.error = "the container's pod is gone".into();
    }
    let status = pod.as_ref().and_then(|p| p.status.as_ref());
    let image_id = pod
        .as_deref()
        .and_then(pod::main_status)
        .map(|c| c.image_id.clone())
        .unwrap_or_default();
    pb::ContainerInfo {
        id: record.id.clone(),
        name: record.name.clone(),
        namespace: record.namespace.clone(),
        spec: Some(record.spec.clone()),
        created: record.created.clone(),
        state: Some(state),
        pod_name: pod
            .as_ref()
            .and_then(|p| p.metadata.name.clone())
            .unwrap_or_default(),
        node: pod
            .as_ref()
            .and_then(|p| p.spec.as_ref())
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default(),
        pod_ip: status.and_then(|s| s.pod_ip.clone()).unwrap_or_default(),
        image_id,
        restart_count: record.runs.saturating_sub(1),
    }
}

/// Whether a container matches a list request's filters.
pub fn matches(req: &pb::ListContainersRequest, c: &pb::ContainerInfo) -> bool {
    let state = c.state.as_ref().map(|s| s.status.as_str()).unwrap_or("");
    let running = state == "running";
    let labels = c.spec.as_ref().map(|s| &s.labels);
    let label_ok = req.label_filters.iter().all(|f| {
        let (k, v) = match f.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (f.as_str(), None),
        };
        labels
            .and_then(|l| l.get(k))
            .is_some_and(|have| v.is_none_or(|v| v == have))
    });
    let status_ok = if req.status_filters.is_empty() {
        req.all || running
    } else {
        req.status_filters.iter().any(|s| s == state)
    };
    let name_ok = req.name_filters.is_empty()
        || req
            .name_filters
            .iter()
            .any(|n| c.name.contains(n.trim_start_matches('/')));
    let id_ok = req.id_filters.is_empty() || req.id_filters.iter().any(|p| c.id.starts_with(p));
    label_ok && status_ok && name_ok && id_ok
}

/// What a `Wait` call waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Condition {
    NotRunning,
    NextExit,
    Removed,
}

impl ContainersApi {
    /// Serves containers from `spaces`; logs come through the agents'
    /// sessions in `registry`.
    pub fn new(spaces: Spaces, registry: Arc<NodeRegistry>) -> Self {
        Self::with_pool(spaces, registry, pool::PoolConfig::default())
    }

    /// Like [`ContainersApi::new`], with a sandbox pool for containers that
    /// ask for one.
    pub fn with_pool(spaces: Spaces, registry: Arc<NodeRegistry>, pool: pool::PoolConfig) -> Self {
        ContainersApi {
            spaces,
            registry,
            pool: Arc::new(pool),
            filling: Arc::default(),
            nodes: None,
        }
    }

    /// Places pods only on nodes they could land on, as `nodes` shows them.
    pub fn with_nodes(
        mut self,
        nodes: kube::runtime::reflector::Store<k8s_openapi::api::core::v1::Node>,
    ) -> Self {
        self.nodes = Some(nodes);
        self
    }

    /// The caller's view of `namespace`: its session's, if the call names one.
    pub(super) async fn session_space(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        namespace: &str,
    ) -> Result<Space, Status> {
        Ok(self
            .space(namespace)
            .await?
            .for_session(session_of(metadata)?))
    }

    /// The caller's view of `namespace` and the container `id` names there.
    async fn locate(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        namespace: &str,
        id: &str,
    ) -> Result<(Space, Record), Status> {
        let space = self.session_space(metadata, namespace).await?;
        let key = id.strip_prefix('/').unwrap_or(id);
        // A full ID is one a create just answered: the mirror may not have
        // seen that write yet, so give it a moment before saying no.
        if key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()) {
            let found = space.wait_for(MIRROR_LAG, |s| s.find(key).ok()).await;
            if let Some(record) = found {
                return Ok((space, record));
            }
        }
        let record = space.find(id)?;
        Ok((space, record))
    }

    pub(super) async fn space(&self, namespace: &str) -> Result<Space, Status> {
        let (space, new) = self.spaces.get(namespace).await?;
        if new {
            tokio::spawn(self.clone().reap(space.clone()));
        }
        Ok(space)
    }

    /// Refills the namespace's sandbox pool in the background, one refill
    /// per namespace at a time.
    fn refill(&self, space: &Space) {
        if !self.filling.lock().unwrap().insert(space.namespace.clone()) {
            return;
        }
        let (api, space) = (self.clone(), space.clone());
        tokio::spawn(async move {
            pool::fill(api.client(), &space, &api.pool).await;
            api.filling.lock().unwrap().remove(&space.namespace);
        });
    }

    /// The kube client writes go through.
    pub(super) fn client(&self) -> &kube::Client {
        self.spaces.client()
    }

    fn records(&self, ns: &str) -> Api<ConfigMap> {
        Api::namespaced(self.spaces.client().clone(), ns)
    }

    pub(super) fn pods(&self, ns: &str) -> Api<Pod> {
        Api::namespaced(self.spaces.client().clone(), ns)
    }

    /// Merges `patch` into the record as last seen by the mirror: a record
    /// changed since by another call is refused, never overwritten.
    async fn patch_record(
        &self,
        space: &Space,
        record: &Record,
        mut patch: serde_json::Value,
        what: &str,
    ) -> Result<(), Status> {
        let rv = space
            .records_object(&record.object_name)
            .and_then(|cm| cm.metadata.resource_version.clone())
            .ok_or_else(|| Status::not_found(format!("No such container: {}", record.id)))?;
        patch["metadata"]["resourceVersion"] = rv.into();
        self.records(&space.namespace)
            .patch(
                &record.object_name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|e| match e {
                kube::Error::Api(ae) if ae.code == 409 => Status::aborted(format!(
                    "container {} was changed by another call; try again",
                    record.name
                )),
                e => kube_status(what, e),
            })?;
        Ok(())
    }

    /// Replaces a container's spec in its record, and waits for the mirror
    /// to show it.
    pub(super) async fn rewrite(
        &self,
        space: &Space,
        record: &Record,
        spec: pb::ContainerSpec,
    ) -> Result<Record, Status> {
        let patch = serde_json::json!({
            "binaryData": {SPEC_KEY: k8s_openapi::ByteString(prost::Message::encode_to_vec(&spec))},
        });
        self.patch_record(space, record, patch, "recording the container's spec")
            .await?;
        space
            .wait_for(SEE_WRITE, |s| {
                s.find(&record.id).ok().filter(|r| r.spec == spec)
            })
            .await
            .ok_or_else(|| Status::unavailable("the change did not show in the watch"))
    }

    async fn start_record(&self, space: &Space, record: Record) -> Result<Record, Status> {
        let run = record.runs + 1;
        let mut next = record.clone();
        next.runs = run;
        let mut pod =
            pod::pod_for(&next, run).map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Claim the run first: the resourceVersion makes two racing starts
        // collide here instead of making two pods.
        let patch = serde_json::json!({
            "metadata": {"annotations": {
                RUNS_ANNOTATION: run.to_string(),
                RUN_STARTED_ANNOTATION: now_rfc3339(),
            }}
        });
        self.patch_record(space, &record, patch, "recording the start")
            .await?;
        // Placed (and warmed) only once the run is ours.
        if let Some(spec) = pod.spec.as_mut()
            && !placement::pod_decides(spec)
        {
            let image = spec.containers[0].image.clone().unwrap_or_default();
            match placement::place(&self.registry, self.nodes.as_ref(), spec, &image) {
                placement::Placement::Anywhere => {}
                placement::Placement::Holders(nodes) => placement::prefer(spec, &nodes),
                placement::Placement::Warm(node) => placement::prefer(spec, &[node]),
            }
        }
        let pooled = self.pool.size > 0 && pool::eligible(&next.spec);
        let claimed = if pooled {
            let claim = pool::claim(self.client(), space, &self.pool, &pod).await;
            self.refill(space);
            match claim {
                Ok(claimed) => claimed.is_some(),
                Err(e) => {
                    warn!(container = %record.name, error = %e, "the pool sandbox failed; starting a fresh pod");
                    false
                }
            }
        } else {
            false
        };
        if !claimed
            && let Err(e) = self
                .pods(&space.namespace)
                .create(&PostParams::default(), &pod)
                .await
        {
            let undo = serde_json::json!({"metadata": {"annotations": {RUNS_ANNOTATION: record.runs.to_string()}}});
            let _ = self
                .records(&space.namespace)
                .patch(
                    &record.object_name,
                    &PatchParams::default(),
                    &Patch::Merge(&undo),
                )
                .await;
            return Err(kube_status("creating the container's pod", e));
        }
        let how = if claimed {
            "in a pool sandbox"
        } else {
            "in a fresh pod"
        };
        info!(namespace = %space.namespace, container = %record.name, run, "container started {how}");
        space
            .wait_for(SEE_WRITE, |s| {
                let r = s.find(&record.id).ok()?;
                (r.runs == run && s.current_pod(&r).is_some()).then_some(())
            })
            .await
            .ok_or_else(|| Status::unavailable("the new pod did not show in the watch"))?;
        Ok(next)
    }

    async fn wait(
        &self,
        session: Option<String>,
        req: pb::WaitContainerRequest,
    ) -> Result<pb::WaitContainerResponse, Status> {
        let condition = match req.condition.as_str() {
            "" | "not-running" => Condition::NotRunning,
            "next-exit" => Condition::NextExit,
            "removed" => Condition::Removed,
            other => {
                return Err(Status::invalid_argument(format!(
                    "invalid condition {other:?}: not-running, next-exit or removed"
                )));
            }
        };
        let space = self.space(&req.namespace).await?.for_session(session);
        let record = space.find(&req.id)?;
        let current = space.current_pod(&record);
        let current_done = current.as_deref().is_some_and(pod::finished);
        // The run whose exit ends the wait.
        let target = match condition {
            Condition::NotRunning if record.runs == 0 || current_done || current.is_none() => {
                let state = info(&space, &record).state.unwrap_or_default();
                return Ok(pb::WaitContainerResponse {
                    exit_code: state.exit_code,
                    error: state.error,
                });
            }
            _ if record.runs > 0 && !current_done && current.is_some() => record.runs,
            _ => record.runs + 1,
        };
        let mut last_exit = None;
        let outcome = space
            .wait_for(WAIT_LIMIT, |s| {
                let Ok(r) = s.find(&record.id) else {
                    // Removed: the last exit we saw is the answer.
                    return Some(last_exit.clone().unwrap_or((0, String::new())));
                };
                let pod = s.pod_of_run(&r, target)?;
                if !pod::finished(&pod) {
                    return None;
                }
                let state = pod::state_of(Some(&pod));
                last_exit = Some((state.exit_code, state.error.clone()));
                (condition != Condition::Removed).then_some((state.exit_code, state.error))
            })
            .await
            .ok_or_else(|| Status::deadline_exceeded("the container is still running"))?;
        Ok(pb::WaitContainerResponse {
            exit_code: outcome.0,
            error: outcome.1,
        })
    }

    /// Deletes a container's pods and record.
    async fn delete(&self, space: &Space, record: &Record) -> Result<(), Status> {
        // The garbage collector would take them too, but a name should be
        // free for the next container at once.
        networks::drop_services(self.client(), record, &[]).await?;
        // The record first: once it is gone the container is, and no one
        // sees it as a run whose pod vanished while its pods go.
        let records = self.records(&space.namespace);
        ignore_missing(
            records
                .delete(&record.object_name, &DeleteParams::background())
                .await,
        )
        .map_err(|e| kube_status("removing the container", e))?;
        // What the record owns goes with it anyway; these go at once. A
        // failure is left to the garbage collector.
        let kept: std::collections::BTreeSet<&str> = record
            .spec
            .uploads
            .iter()
            .map(|u| u.config_map.as_str())
            .collect();
        for name in kept {
            if let Err(e) = ignore_missing(records.delete(name, &DeleteParams::default()).await) {
                warn!(config_map = %name, error = %e, "removing copied files failed");
            }
        }
        let now = DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        let pods = self.pods(&space.namespace);
        for name in space
            .pods_of(record)
            .iter()
            .filter_map(|p| p.metadata.name.as_deref())
        {
            if let Err(e) = ignore_missing(pods.delete(name, &now).await) {
                warn!(pod = %name, error = %e, "removing a container's pod failed");
            }
        }
        space
            .wait_for(SEE_WRITE, |s| (!s.exists(&record.id)).then_some(()))
            .await
            .ok_or_else(|| Status::unavailable("the removal did not show in the watch"))
    }

    /// Deletes a network's record (gone already is fine).
    pub(super) async fn delete_network(
        &self,
        space: &Space,
        network: &networks::Network,
    ) -> Result<(), Status> {
        ignore_missing(
            self.records(&space.namespace)
                .delete(&network.object_name, &DeleteParams::default())
                .await,
        )
        .map_err(|e| kube_status("removing the network", e))
    }

    /// Removes the containers, then the networks, of client sessions that
    /// are over ([`sessions::session_over`]; a record younger than `grace`
    /// seconds without a Lease is spared). Answers the IDs of the containers
    /// and the names of the networks removed; failures are logged and left
    /// for the next round.
    async fn remove_ended(&self, space: &Space, grace: i64) -> (Vec<String>, Vec<String>) {
        let now = now_secs();
        let ended = |session: &str, created: &str| {
            let lease = space.session_lease(session);
            sessions::session_over(session, created, lease.as_deref(), now, grace)
        };
        let mut containers = Vec::new();
        for r in space.records() {
            if !ended(&r.session, &r.created) {
                continue;
            }
            match self.delete(space, &r).await {
                Ok(()) => {
                    info!(namespace = %space.namespace, container = %r.name, session = %r.session, "removed: its client session ended");
                    containers.push(r.id);
                }
                Err(e) => warn!(container = %r.name, error = %e, "removal failed; will retry"),
            }
        }
        // A network goes once no container is on it.
        let members: std::collections::HashSet<String> = space
            .records()
            .into_iter()
            .flat_map(|r| r.spec.networks)
            .collect();
        let mut removed = Vec::new();
        for n in space.networks() {
            if members.contains(&n.name) || !ended(&n.session, &n.created) {
                continue;
            }
            match self.delete_network(space, &n).await {
                Ok(()) => {
                    info!(namespace = %space.namespace, network = %n.name, session = %n.session, "removed: its client session ended");
                    removed.push(n.name);
                }
                Err(e) => warn!(network = %n.name, error = %e, "removal failed; will retry"),
            }
        }
        (containers, removed)
    }

    /// Removes containers started with `auto_remove` once they finished and
    /// their log readers are done (or [`DRAIN_TIMEOUT`] passed), and every
    /// container of a client session whose Lease has expired
    /// ([`sessions::session_over`]). Runs while the process lives, for
    /// every mirrored namespace.
    pub async fn reap(self, space: Space) {
        let mut finished_at: std::collections::HashMap<String, tokio::time::Instant> =
            Default::default();
        let mut changes = space.subscribe();
        loop {
            changes.borrow_and_update();
            let due: Vec<Record> = space
                .records()
                .into_iter()
                .filter(|r| r.spec.auto_remove)
                .filter(|r| {
                    let Some(pod) = space.current_pod(r) else {
                        return false;
                    };
                    if !pod::finished(&pod) {
                        return false;
                    }
                    let since = *finished_at
                        .entry(r.id.clone())
                        .or_insert_with(tokio::time::Instant::now);
                    let uid = pod.metadata.uid.clone().unwrap_or_default();
                    self.registry.logs().open_for(&uid) == 0 || since.elapsed() > DRAIN_TIMEOUT
                })
                .collect();
            let now = now_secs();
            let too_old = space.records().into_iter().filter(|r| {
                let created = r
                    .created
                    .parse::<k8s_openapi::jiff::Timestamp>()
                    .map_or(i64::MAX, |t| t.as_second());
                r.spec.max_age_seconds > 0 && created.saturating_add(r.spec.max_age_seconds) < now
            });
            for (r, why) in due
                .into_iter()
                .map(|r| (r, "auto-removed"))
                .chain(too_old.map(|r| (r, "older than its max age")))
            {
                if let Err(e) = self.delete(&space, &r).await {
                    warn!(container = %r.name, error = %e, "removal failed; will retry");
                } else {
                    info!(namespace = %space.namespace, container = %r.name, "removed: {why}");
                    finished_at.remove(&r.id);
                }
            }
            let grace = sessions::DEFAULT_TTL.as_secs() as i64 * 3;
            for id in self.remove_ended(&space, grace).await.0 {
                finished_at.remove(&id);
            }
            // Wake on the next change; soon while readers drain; and now and
            // then while session containers exist, since Leases run out
            // without any event.
            let limit = if !finished_at.is_empty() {
                Duration::from_millis(200)
            } else if space
                .records()
                .iter()
                .any(|r| !r.session.is_empty() || r.spec.max_age_seconds > 0)
                || space.networks().iter().any(|n| !n.session.is_empty())
            {
                Duration::from_secs(2)
            } else {
                WAIT_LIMIT
            };
            let _ = tokio::time::timeout(limit, changes.changed()).await;
        }
    }
}

type LogChunks = Pin<Box<dyn Stream<Item = Result<pb::LogChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::containers_server::Containers for ContainersApi {
    async fn create(
        &self,
        request: Request<pb::CreateContainerRequest>,
    ) -> Result<Response<pb::ContainerInfo>, Status> {
        let session = session_of(request.metadata())?;
        let req = request.into_inner();
        let mut spec = req
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is required"))?;
        if spec.name.is_empty() {
            spec.name = record::generated_name();
        }
        let name = spec.name.trim_start_matches('/').to_string();
        if !record::valid_name(&name) {
            return Err(Status::invalid_argument(format!(
                "Invalid container name ({name}), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed, at most 63"
            )));
        }
        spec.name = name.clone();
        if spec.image.is_empty() {
            return Err(Status::invalid_argument("image is required"));
        }
        if !spec.uploads.is_empty() {
            return Err(Status::invalid_argument(
                "uploads are recorded by Upload only, never in a create",
            ));
        }
        let space = self
            .space(&req.namespace)
            .await?
            .for_session(session.clone());
        // Networks by their names, so that a record survives a client's use
        // of an ID prefix.
        for net in spec.networks.iter_mut() {
            *net = space.find_network(net)?.name;
        }
        if spec.networks.is_empty() && !spec.aliases.is_empty() {
            return Err(Status::invalid_argument(
                "network-scoped aliases are supported only for containers in user defined networks",
            ));
        }
        for alias in &spec.aliases {
            networks::check_alias(alias)?;
        }
        let id = record::new_id();
        let probe = Record {
            namespace: req.namespace.clone(),
            id: id.clone(),
            name: name.clone(),
            spec: spec.clone(),
            runs: 0,
            run_started: String::new(),
            created: String::new(),
            uid: String::new(),
            object_name: String::new(),
            session: session.clone().unwrap_or_default(),
        };
        pod::pod_for(&probe, 1).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let cm = record::to_config_map(
            &req.namespace,
            session.as_deref().unwrap_or(""),
            &id,
            &spec,
            &now_rfc3339(),
        );
        self.records(&req.namespace)
            .create(&PostParams::default(), &cm)
            .await
            .map_err(|e| match e {
                kube::Error::Api(ae) if ae.code == 409 => Status::already_exists(format!(
                    "Conflict. The container name \"/{name}\" is already in use"
                )),
                e => kube_status("creating the container", e),
            })?;
        let record = space
            .wait_for(SEE_WRITE, |s| s.find(&id).ok())
            .await
            .ok_or_else(|| Status::unavailable("the new container did not show in the watch"))?;
        if let Err(e) = networks::ensure_services(self.client(), &record).await {
            // A name it cannot have: the container is not made at all.
            let _ = self.delete(&space, &record).await;
            return Err(e);
        }
        Ok(Response::new(info(&space, &record)))
    }

    async fn start(
        &self,
        request: Request<pb::ContainerRequest>,
    ) -> Result<Response<pb::ContainerInfo>, Status> {
        let (space, record) = self
            .locate(
                request.metadata(),
                &request.get_ref().namespace,
                &request.get_ref().id,
            )
            .await?;
        if let Some(pod) = space.current_pod(&record)
            && !pod::finished(&pod)
            && pod::start_failure(&pod).is_none()
        {
            // Already started (or starting): Docker answers "not modified".
            return Ok(Response::new(info(&space, &record)));
        }
        let record = self.start_record(&space, record).await?;
        let outcome = space
            .wait_for(START_TIMEOUT, |s| {
                let r = s.find(&record.id).ok()?;
                let pod = s.current_pod(&r)?;
                if let Some(failure) = pod::start_failure(&pod) {
                    return Some(Err(failure));
                }
                pod::started(&pod).then_some(Ok(()))
            })
            .await;
        match outcome {
            Some(Ok(())) => {
                let info = info(&space, &space.find(&record.id)?);
                if !networks::wait_resolvable(self.client(), &record, &info.pod_ip).await {
                    warn!(container = %record.name, "its names were not in cluster DNS within {:?}", networks::DNS_READY);
                }
                Ok(Response::new(info))
            }
            Some(Err(failure)) => Err(Status::internal(format!(
                "starting container {}: {failure}",
                record.name
            ))),
            None => Err(Status::deadline_exceeded(format!(
                "container {} did not start within {START_TIMEOUT:?}",
                record.name
            ))),
        }
    }

    async fn stop(
        &self,
        request: Request<pb::StopContainerRequest>,
    ) -> Result<Response<pb::ContainerInfo>, Status> {
        let (space, record) = self
            .locate(
                request.metadata(),
                &request.get_ref().namespace,
                &request.get_ref().id,
            )
            .await?;
        self.end_run(&space, &record, true).await?;
        Ok(Response::new(info(&space, &space.find(&record.id)?)))
    }

    async fn kill(
        &self,
        request: Request<pb::ContainerRequest>,
    ) -> Result<Response<pb::ContainerInfo>, Status> {
        let (space, record) = self
            .locate(
                request.metadata(),
                &request.get_ref().namespace,
                &request.get_ref().id,
            )
            .await?;
        self.end_run(&space, &record, false).await?;
        Ok(Response::new(info(&space, &space.find(&record.id)?)))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveContainerRequest>,
    ) -> Result<Response<pb::RemoveContainerResponse>, Status> {
        let (space, record) = self
            .locate(
                request.metadata(),
                &request.get_ref().namespace,
                &request.get_ref().id,
            )
            .await?;
        let req = request.into_inner();
        let running = space
            .current_pod(&record)
            .is_some_and(|p| pod::state_of(Some(&p)).running);
        if running && !req.force {
            return Err(Status::failed_precondition(format!(
                "You cannot remove a running container {}. Stop the container before attempting removal or force remove",
                record.id
            )));
        }
        self.delete(&space, &record).await?;
        Ok(Response::new(pb::RemoveContainerResponse {}))
    }

    async fn inspect(
        &self,
        request: Request<pb::ContainerRequest>,
    ) -> Result<Response<pb::ContainerInfo>, Status> {
        let (space, record) = self
            .locate(
                request.metadata(),
                &request.get_ref().namespace,
                &request.get_ref().id,
            )
            .await?;
        Ok(Response::new(info(&space, &record)))
    }

    async fn list(
        &self,
        request: Request<pb::ListContainersRequest>,
    ) -> Result<Response<pb::ListContainersResponse>, Status> {
        let session = session_of(request.metadata())?;
        let req = request.into_inner();
        let space = self.space(&req.namespace).await?.for_session(session);
        let mut containers: Vec<pb::ContainerInfo> = space
            .records()
            .iter()
            .map(|r| info(&space, r))
            .filter(|c| matches(&req, c))
            .collect();
        containers.sort_by(|a, b| b.created.cmp(&a.created));
        Ok(Response::new(pb::ListContainersResponse { containers }))
    }

    async fn wait(
        &self,
        request: Request<pb::WaitContainerRequest>,
    ) -> Result<Response<pb::WaitContainerResponse>, Status> {
        Ok(Response::new(
            ContainersApi::wait(self, session_of(request.metadata())?, request.into_inner())
                .await?,
        ))
    }

    type LogsStream = LogChunks;

    type ExecStream = super::exec::ExecOutputs;

    type TunnelStream = super::tunnel::TunnelOutputs;

    async fn stdin(
        &self,
        request: Request<tonic::Streaming<pb::StdinInput>>,
    ) -> Result<Response<pb::StdinResult>, Status> {
        let session = session_of(request.metadata())?;
        Ok(Response::new(
            self.stdin(session, request.into_inner()).await?,
        ))
    }

    async fn upload(
        &self,
        request: Request<pb::UploadRequest>,
    ) -> Result<Response<pb::UploadResponse>, Status> {
        use super::uploads::{self, UploadError};
        let (space, record) = self
            .locate(
                request.metadata(),
                &request.get_ref().namespace,
                &request.get_ref().id,
            )
            .await?;
        if space
            .current_pod(&record)
            .is_some_and(|p| !pod::finished(&p))
        {
            return Err(Status::failed_precondition(format!(
                "container {} is starting or running: copy into it through Exec (tar) once it runs",
                record.name
            )));
        }
        let req = request.into_inner();
        let files = uploads::read_tar(&req.path, &req.tar).map_err(|e| match e {
            UploadError::TooLarge => Status::resource_exhausted(e.to_string()),
            e => Status::invalid_argument(e.to_string()),
        })?;
        let name = format!("berth-upl-{}-{:08x}", record.short_id(), fastrand::u32(..));
        let (cm, entries) = uploads::config_map_for(&record, &name, &files);
        let mut spec = record.spec.clone();
        spec.uploads = uploads::merge(&spec.uploads, entries.clone());
        uploads::check_paths(&spec.uploads).map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.records(&space.namespace)
            .create(&PostParams::default(), &cm)
            .await
            .map_err(|e| kube_status("keeping the copied files", e))?;
        if let Err(e) = self.rewrite(&space, &record, spec).await {
            let _ = self
                .records(&space.namespace)
                .delete(&name, &DeleteParams::default())
                .await;
            return Err(e);
        }
        info!(namespace = %space.namespace, container = %record.name, files = entries.len(), "files copied in before start");
        Ok(Response::new(pb::UploadResponse { files: entries }))
    }

    type EventsStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

    async fn events(
        &self,
        request: Request<pb::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let session = session_of(request.metadata())?;
        let space = self
            .space(&request.get_ref().namespace)
            .await?
            .for_session(session);
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            let mut changes = space.subscribe();
            changes.borrow_and_update();
            let mut seen = super::events::Snapshot::of(&space);
            loop {
                // Health verdicts and vanished pods follow the clock too.
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
                let now = super::events::Snapshot::of(&space);
                let at = k8s_openapi::jiff::Timestamp::now().as_nanosecond() as i64;
                for e in super::events::diff(&seen, &now, at) {
                    if tx.send(Ok(e)).await.is_err() {
                        return;
                    }
                }
                seen = now;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn prune_ended(
        &self,
        request: Request<pb::PruneRequest>,
    ) -> Result<Response<pb::PruneResponse>, Status> {
        // Every session's records, not only the caller's.
        let space = self.space(&request.get_ref().namespace).await?;
        // The reaper's own grace: a live shim's Lease may be a moment late.
        let (ids, networks) = self
            .remove_ended(&space, sessions::DEFAULT_TTL.as_secs() as i64 * 3)
            .await;
        Ok(Response::new(pb::PruneResponse {
            containers: ids,
            networks,
        }))
    }

    async fn tunnel(
        &self,
        request: Request<tonic::Streaming<pb::TunnelInput>>,
    ) -> Result<Response<Self::TunnelStream>, Status> {
        let session = session_of(request.metadata())?;
        Ok(Response::new(
            ContainersApi::tunnel(self, session, request.into_inner()).await?,
        ))
    }

    type SessionStream = sessions::SessionStates;

    async fn session(
        &self,
        request: Request<pb::SessionRequest>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let req = request.into_inner();
        sessions::check_session(&req.session)?;
        // Fails early if the coordinator may not work in the namespace.
        self.space(&req.namespace).await?;
        let ttl = match req.ttl_seconds {
            0 => sessions::DEFAULT_TTL,
            s => Duration::from_secs(s.clamp(3, 3600).into()),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(sessions::hold(
            Api::namespaced(self.spaces.client().clone(), &req.namespace),
            req.session,
            ttl,
            tx,
        ));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn exec(
        &self,
        request: Request<tonic::Streaming<pb::ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        Ok(Response::new(
            ContainersApi::exec(self, session_of(request.metadata())?, request.into_inner())
                .await?,
        ))
    }

    async fn logs(
        &self,
        request: Request<pb::ContainerLogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let (space, record) = self
            .locate(
                request.metadata(),
                &request.get_ref().namespace,
                &request.get_ref().id,
            )
            .await?;
        let req = request.into_inner();
        let limit = if req.wait_for_start {
            START_TIMEOUT
        } else {
            Duration::ZERO
        };
        // The pod to read: the current one once it has started; for an
        // attach before start, the next one.
        let pod = space
            .wait_for(limit, |s| {
                let r = s.find(&record.id).ok()?;
                let pod = s.current_pod(&r)?;
                (pod::started(&pod) || pod::start_failure(&pod).is_some()).then_some(pod)
            })
            .await;
        let Some(pod) = pod.filter(|p| pod::started(p)) else {
            return Ok(Response::new(Box::pin(futures::stream::empty())));
        };
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let request = agent_pb::LogRequest {
            stream_id: 0,
            pod_uid: pod.metadata.uid.clone().unwrap_or_default(),
            container_name: MAIN_CONTAINER.into(),
            follow: req.follow,
            since_unix_nanos: req.since_unix_nanos,
            until_unix_nanos: req.until_unix_nanos,
            tail: req.tail,
            stdout: req.stdout,
            stderr: req.stderr,
        };
        let mut stream = LogRouter::open(&self.registry, &node, request).ok_or_else(|| {
            Status::unavailable(format!("no Berth agent is connected on node {node}"))
        })?;
        let chunks = async_stream(move |tx| async move {
            while let Some(data) = stream.next().await {
                for e in data.entries {
                    let chunk = pb::LogChunk {
                        stream: e.stream,
                        data: e.data,
                        time_unix_nanos: e.time_unix_nanos,
                    };
                    if tx.send(Ok(chunk)).await.is_err() {
                        return;
                    }
                }
                if data.end {
                    if !data.error.is_empty() {
                        let _ = tx.send(Err(Status::unavailable(data.error))).await;
                    }
                    return;
                }
            }
        });
        Ok(Response::new(chunks))
    }
}

impl ContainersApi {
    /// Ends the current run: lets the kubelet stop the pod by giving it an
    /// active deadline already passed (the pod's grace period applies, its
    /// exit code and logs stay). With `wait`, returns once it has exited.
    async fn end_run(&self, space: &Space, record: &Record, wait: bool) -> Result<(), Status> {
        let Some(pod) = space.current_pod(record) else {
            return Ok(());
        };
        if pod::finished(&pod) {
            return Ok(());
        }
        let name = pod.metadata.name.clone().unwrap_or_default();
        if !pod::started(&pod) {
            // Not running yet: nothing to stop gracefully.
            let now = DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            };
            self.pods(&space.namespace)
                .delete(&name, &now)
                .await
                .map_err(|e| kube_status("stopping the container", e))?;
            return Ok(());
        }
        let started = pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .map(|t| t.0.as_second())
            .unwrap_or(0);
        let elapsed = (now_secs() - started).max(1);
        let patch = serde_json::json!({"spec": {"activeDeadlineSeconds": elapsed}});
        self.pods(&space.namespace)
            .patch(&name, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
            .map_err(|e| kube_status("stopping the container", e))?;
        if !wait {
            return Ok(());
        }
        let grace = pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(10) as u64;
        space
            .wait_for(Duration::from_secs(grace + 30), |s| {
                s.pod_of_run(record, record.runs)
                    .is_none_or(|p| pod::finished(&p))
                    .then_some(())
            })
            .await
            .ok_or_else(|| Status::deadline_exceeded("the container did not stop"))
    }
}

fn now_secs() -> i64 {
    k8s_openapi::jiff::Timestamp::now().as_second()
}

/// A stream fed by a task through a small channel.
fn async_stream<F, Fut>(body: F) -> LogChunks
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::LogChunk, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
