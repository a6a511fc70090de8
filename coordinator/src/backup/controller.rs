//! The ImageBackup controller: produces one ImageBackup per image the covered
//! workloads use, hands the copies to agents, and rolls each workload onto
//! its copies once all of them are in the target registry.
//!
//! One pass, level-triggered (on a watch event, at most every [`RESYNC`]):
//! 1. restores the workloads whose owners asked (`berth.dev/backup-restore`);
//! 2. creates the missing ImageBackups of ready workloads' images (the name is
//!    a function of the image, so racing passes and replicas create one);
//! 3. writes each ImageBackup's users, and deletes those unused past the
//!    policy's `expireAfter` (never the registry content);
//! 4. starts copies, at most the policy's bound at once, each on an agent
//!    ([`super::copies`] brings its progress back), retrying a failure with
//!    backoff up to [`plan::MAX_ATTEMPTS`] times;
//! 5. rolls a workload when every image it uses is `Done` and a manifest
//!    HEAD on the target, with the target's credentials, answers the very
//!    digest that was copied: a cached belief is not enough.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_proto::agent as pb;
use berth_proto::docker_config::DockerCredentials;
use berth_proto::reference::Reference;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use serde_json::json;
use tokio::sync::Notify;
use tracing::{info, warn};

use super::crd::{BackupPolicy, BackupPolicySpec, ImageBackup};
use super::naming::reason_name;
use super::plan;
use super::workloads::{Workload, restore_patch, roll_patch};
use crate::imagecache::tags::{OciRegistry, Registry};
use crate::imagecache::watch::{any_change, mirror};
use crate::nodes::NodeRegistry;

/// A pass runs at least this often (retries fall due without an event).
const RESYNC: Duration = Duration::from_secs(2);
/// Copies at once when the policy names no bound.
const DEFAULT_CONCURRENCY: usize = 4;
/// Deadline of one copy.
const COPY_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Repositories of earlier copies offered to an agent for blob mounts.
const MOUNT_CANDIDATES: usize = 4;
/// Progress is written to a status at most this often.
const PROGRESS_WRITES: Duration = Duration::from_secs(1);

/// The controller's state across passes.
struct Controller {
    client: kube::Client,
    registry: Arc<NodeRegistry>,
    oci: OciRegistry,
    plain_http: Vec<String>,
    own_ns: String,
    policies: Store<BackupPolicy>,
    backups: Store<ImageBackup>,
    deployments: Store<Deployment>,
    daemonsets: Store<DaemonSet>,
    statefulsets: Store<StatefulSet>,
    recorder: Recorder,
    inflight: Mutex<HashSet<String>>,
    /// Copies that ended, by ImageBackup: the phase their end wrote. Until
    /// the mirror shows that phase, its view of the ImageBackup is older
    /// than the end, and starts nothing.
    ended: Mutex<HashMap<String, &'static str>>,
    wake: Arc<Notify>,
    next_task: AtomicU64,
    run_id: u64,
    next_node: AtomicUsize,
}

/// Runs the controller until its task is aborted.
pub async fn run(
    client: kube::Client,
    registry: Arc<NodeRegistry>,
    plain_http: Vec<String>,
    own_ns: String,
) {
    let wake = Arc::new(Notify::new());
    let c = Arc::new(Controller {
        policies: mirror(&client, wake.clone(), any_change),
        backups: mirror(&client, wake.clone(), any_change),
        deployments: mirror(&client, wake.clone(), any_change),
        daemonsets: mirror(&client, wake.clone(), any_change),
        statefulsets: mirror(&client, wake.clone(), any_change),
        oci: OciRegistry::new(plain_http.clone()),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "berth-coordinator".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        ),
        client,
        registry,
        plain_http,
        own_ns,
        inflight: Mutex::default(),
        ended: Mutex::default(),
        wake: wake.clone(),
        next_task: AtomicU64::new(0),
        run_id: fastrand::u64(..),
        next_node: AtomicUsize::new(0),
    });
    for store in [
        c.policies.wait_until_ready().await.err(),
        c.backups.wait_until_ready().await.err(),
    ]
    .into_iter()
    .flatten()
    {
        warn!(error = %store, "a backup mirror never filled");
    }
    let _ = c.deployments.wait_until_ready().await;
    let _ = c.daemonsets.wait_until_ready().await;
    let _ = c.statefulsets.wait_until_ready().await;
    loop {
        c.clone().pass().await;
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(RESYNC) => {}
        }
    }
}

fn now_rfc3339() -> String {
    Timestamp::now().to_string()
}

fn ready_condition(status: bool, reason: &str, message: &str) -> Condition {
    Condition {
        type_: "Ready".into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: Time(Timestamp::now()),
        observed_generation: None,
    }
}

impl Controller {
    fn policies(&self) -> Vec<Arc<BackupPolicy>> {
        let mut p = self.policies.state();
        p.sort_by_key(|p| p.name_any());
        p
    }

    fn workloads(&self) -> Vec<Workload> {
        let mut w: Vec<Workload> = Vec::new();
        w.extend(
            self.deployments
                .state()
                .iter()
                .map(|d| Workload::deployment(d)),
        );
        w.extend(
            self.daemonsets
                .state()
                .iter()
                .map(|d| Workload::daemonset(d)),
        );
        w.extend(
            self.statefulsets
                .state()
                .iter()
                .map(|s| Workload::statefulset(s)),
        );
        w
    }

    async fn pass(self: Arc<Self>) {
        let policies = self.policies();
        if policies.is_empty() {
            return;
        }
        let workloads = self.workloads();
        let survey = plan::survey(&policies, &workloads, &self.own_ns);
        for &i in &survey.restores {
            self.restore(&workloads[i]).await;
        }
        let backups: HashMap<String, Arc<ImageBackup>> = self
            .backups
            .state()
            .into_iter()
            .map(|b| (b.name_any(), b))
            .collect();
        for b in plan::to_create(&survey, &backups) {
            self.create_backup(b).await;
        }
        let now = Timestamp::now();
        for b in backups.values() {
            let users = survey.uses.get(&b.spec.source).map(|u| &u.users);
            let status = b.status.clone().unwrap_or_default();
            if let Some((list, unused_since)) = plan::users_update(&status, users, now) {
                self.patch_status(
                    &b.name_any(),
                    json!({"workloads": list, "unusedSince": unused_since}),
                )
                .await;
            }
            if let Some(policy) = policies.iter().find(|p| p.name_any() == b.spec.policy)
                && plan::expired(b, policy, now)
            {
                info!(backup = %b.name_any(), "expired: unused for the policy's expireAfter");
                let _ = Api::<ImageBackup>::all(self.client.clone())
                    .delete(&b.name_any(), &Default::default())
                    .await;
            }
        }
        self.clone().start_copies(&policies, &backups).await;
        for w in &workloads {
            if let Some(policy) = plan::policy_for(&policies, w, &self.own_ns)
                && !policy.spec.copy_only
                && !w.opted_out()
                && !w.restore_asked()
                && let plan::Roll::Patch {
                    checks,
                    images,
                    originals,
                } = plan::rollout(w, policy, &backups)
                && self.verified(w, policy, &checks).await
            {
                self.patch_workload(
                    w,
                    roll_patch(w, &images, &originals),
                    "rolled onto the backup copies",
                )
                .await;
            }
        }
    }

    /// The gate: every copy is in the target now, under the digest copied
    /// (a manifest HEAD with the target's credentials, not a cached belief).
    async fn verified(&self, w: &Workload, policy: &BackupPolicy, checks: &[plan::Check]) -> bool {
        // One read of the Secret for every copy the workload uses.
        let secret = self.target_secret(&policy.spec).await.ok().flatten();
        for c in checks {
            let Ok(r) = Reference::parse(&c.reference) else {
                return false;
            };
            let auth = secret.as_ref().and_then(|d| d.for_reference(&r)).cloned();
            match self.oci.resolve(&c.reference, auth).await {
                Ok(d) if d == c.digest => {}
                Ok(d) => {
                    warn!(workload = %w.key(), target = %c.reference, "target holds {d}, not the copied {}; not rolling", c.digest);
                    return false;
                }
                Err(e) => {
                    warn!(workload = %w.key(), target = %c.reference, error = %e, "copy not verified in the target; not rolling");
                    return false;
                }
            }
        }
        true
    }

    /// Records an Event on `regarding` (best effort).
    async fn event(
        &self,
        regarding: ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Backup".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &regarding).await {
            tracing::debug!(error = %e, "event not recorded");
        }
    }

    async fn create_backup(&self, b: ImageBackup) {
        let name = b.name_any();
        match Api::<ImageBackup>::all(self.client.clone())
            .create(&PostParams::default(), &b)
            .await
        {
            Ok(_) => info!(backup = %name, source = %b.spec.source, "ImageBackup created"),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => warn!(backup = %name, error = %e, "cannot create ImageBackup"),
        }
    }

    async fn patch_status(&self, name: &str, status: serde_json::Value) {
        if let Err(e) = Api::<ImageBackup>::all(self.client.clone())
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
        {
            warn!(backup = name, error = %e, "cannot write ImageBackup status");
        }
    }

    /// Whether the mirror has not yet seen the end of `b`'s last copy.
    fn stale(&self, b: &ImageBackup) -> bool {
        let mut ended = self.ended.lock().unwrap();
        let Some(phase) = ended.get(&b.name_any()) else {
            return false;
        };
        if b.status.as_ref().is_some_and(|s| s.phase == *phase) {
            ended.remove(&b.name_any());
            return false;
        }
        true
    }

    async fn start_copies(
        self: Arc<Self>,
        policies: &[Arc<BackupPolicy>],
        backups: &HashMap<String, Arc<ImageBackup>>,
    ) {
        let mut names: Vec<&String> = backups.keys().collect();
        names.sort();
        for name in names {
            let b = &backups[name];
            if self.inflight.lock().unwrap().contains(name)
                || self.stale(b)
                || !plan::due(b, Timestamp::now())
            {
                continue;
            }
            let Some(policy) = policies.iter().find(|p| p.name_any() == b.spec.policy) else {
                continue;
            };
            let bound = policy
                .spec
                .max_concurrent_copies
                .map_or(DEFAULT_CONCURRENCY, |n| n as usize);
            if self.inflight.lock().unwrap().len() >= bound {
                return;
            }
            // After the source registry could not be reached, a node whose
            // runtime holds the image is the source.
            let unreachable = b
                .status
                .as_ref()
                .is_some_and(|s| s.reason.as_deref() == Some("SourceUnreachable"));
            let holder = if unreachable {
                self.holder_of(&b.spec.source)
            } else {
                None
            };
            let from_runtime = holder.is_some();
            let Some(node) = holder.or_else(|| self.pick_node()) else {
                return;
            };
            self.clone()
                .start_copy(b.clone(), policy.clone(), node, from_runtime, backups)
                .await;
        }
    }

    /// A connected agent that copies whose runtime holds `source`.
    fn holder_of(&self, source: &str) -> Option<String> {
        let source = Reference::parse(source).ok()?.to_string();
        self.registry
            .list()
            .into_iter()
            .filter(|n| n.connected && n.hello.capabilities.iter().any(|c| c == "copy"))
            .find(|n| {
                n.inventory.as_ref().is_some_and(|inv| {
                    inv.images
                        .iter()
                        .any(|i| i.repo_tags.contains(&source) || i.repo_digests.contains(&source))
                })
            })
            .map(|n| n.name)
    }

    /// A connected agent that copies, taking turns.
    fn pick_node(&self) -> Option<String> {
        let nodes: Vec<String> = self
            .registry
            .list()
            .into_iter()
            .filter(|n| n.connected && n.hello.capabilities.iter().any(|c| c == "copy"))
            .map(|n| n.name)
            .collect();
        if nodes.is_empty() {
            return None;
        }
        let i = self.next_node.fetch_add(1, Ordering::Relaxed);
        Some(nodes[i % nodes.len()].clone())
    }

    async fn start_copy(
        self: Arc<Self>,
        b: Arc<ImageBackup>,
        policy: Arc<BackupPolicy>,
        node: String,
        from_runtime: bool,
        backups: &HashMap<String, Arc<ImageBackup>>,
    ) {
        let name = b.name_any();
        let status = b.status.clone().unwrap_or_default();
        let (Ok(source), Ok(target)) = (
            Reference::parse(&b.spec.source),
            Reference::parse(&b.spec.target),
        ) else {
            self.patch_status(
                &name,
                json!({"phase": "Failed", "reason": "BadImage", "attempts": plan::MAX_ATTEMPTS,
                "message": "source or target is not an image reference"}),
            )
            .await;
            return;
        };
        let source_credentials = self.source_credentials(&source, &status.workloads).await;
        let target_credentials = match self.target_credentials(&policy.spec, &target).await {
            Ok(c) => c,
            Err(message) => {
                self.patch_status(&name, json!({"phase": "Failed", "reason": "TargetCredentialsUnreadable",
                    "message": message, "attempts": status.attempts + 1, "finishedAt": now_rfc3339()})).await;
                return;
            }
        };
        // The newest copies' repositories: those most likely to share a
        // base with this one.
        let mut earlier: Vec<(String, String)> = backups
            .values()
            .filter(|o| o.name_any() != name)
            .filter_map(|o| {
                let s = o.status.as_ref().filter(|s| s.phase == "Done")?;
                let r = Reference::parse(&o.spec.target).ok()?;
                (r.domain == target.domain && r.path != target.path)
                    .then(|| (s.finished_at.clone().unwrap_or_default(), r.path))
            })
            .collect();
        earlier.sort_by(|a, b| b.cmp(a));
        let mut mount_from: Vec<String> = Vec::new();
        for (_, path) in earlier {
            if !mount_from.contains(&path) && mount_from.len() < MOUNT_CANDIDATES {
                mount_from.push(path);
            }
        }
        // Unique across leaders too: an agent may still report a copy an
        // earlier leader started.
        let id = format!(
            "copy-{:x}-{}",
            self.run_id,
            self.next_task.fetch_add(1, Ordering::Relaxed) + 1
        );
        let task = pb::Task {
            id: id.clone(),
            kind: Some(pb::task::Kind::Copy(pb::CopyTask {
                source: source.to_string(),
                target: target.to_string(),
                source_credentials,
                target_credentials,
                timeout_seconds: COPY_TIMEOUT.as_secs() as u32,
                plain_http_registries: self.plain_http.clone(),
                mount_from,
                from_runtime,
            })),
        };
        let rx = self.registry.copies().open(&id, &node);
        let msg = pb::CoordinatorMessage {
            kind: Some(pb::coordinator_message::Kind::Task(task)),
        };
        if !self.registry.send(&node, msg) {
            self.registry.copies().close(&id);
            return;
        }
        info!(backup = %name, node = %node, source = %source, target = %target, from_runtime, "copy started");
        self.inflight.lock().unwrap().insert(name.clone());
        self.patch_status(&name, json!({
            "phase": "Copying", "node": node,
            "conditions": [ready_condition(false, "Copying", &format!("copying on node {node}"))],
        })).await;
        let this = self.clone();
        tokio::spawn(async move {
            let phase = this.follow(&name, &node, &id, rx, status.attempts).await;
            this.ended.lock().unwrap().insert(name.clone(), phase);
            this.registry.copies().close(&id);
            this.inflight.lock().unwrap().remove(&name);
            this.wake.notify_one();
        });
    }

    /// Writes a copy's progress and outcome into its ImageBackup; returns
    /// the phase it ended in.
    async fn follow(
        &self,
        name: &str,
        node: &str,
        id: &str,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<pb::TaskUpdate>,
        attempts: u32,
    ) -> &'static str {
        let mut last_write = tokio::time::Instant::now();
        let deadline = tokio::time::Instant::now() + COPY_TIMEOUT + Duration::from_secs(60);
        loop {
            let u = match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(u)) => u,
                Ok(None) | Err(_) => {
                    warn!(
                        backup = name,
                        task = id,
                        "the agent went away during the copy"
                    );
                    self.patch_status(
                        name,
                        json!({
                            "phase": "Failed", "reason": "AgentLost", "attempts": attempts + 1,
                            "message": "the agent running the copy disconnected or went silent",
                            "finishedAt": now_rfc3339(),
                        }),
                    )
                    .await;
                    return "Failed";
                }
            };
            let p = u.copy.clone().unwrap_or_default();
            let bytes = json!({"bytesCopied": p.bytes_copied, "bytesSkipped": p.bytes_skipped, "bytesTotal": p.bytes_total});
            match pb::TaskState::try_from(u.state).unwrap_or_default() {
                pb::TaskState::Done => {
                    let took =
                        humantime::format_duration(Duration::from_millis(u.elapsed_ms)).to_string();
                    info!(backup = name, digest = %p.digest, copied = p.bytes_copied, skipped = p.bytes_skipped, "copy done");
                    let mut s = bytes;
                    s["phase"] = "Done".into();
                    s["digest"] = p.digest.clone().into();
                    s["platforms"] = p.platforms.clone().into();
                    s["duration"] = took.clone().into();
                    s["copiedFrom"] = if p.from_runtime {
                        format!("node/{node}")
                    } else {
                        "registry".to_string()
                    }
                    .into();
                    s["attempts"] = 0.into();
                    s["reason"] = serde_json::Value::Null;
                    s["message"] = serde_json::Value::Null;
                    s["finishedAt"] = now_rfc3339().into();
                    self.event(
                        backup_ref(name),
                        EventType::Normal,
                        "Copied",
                        format!(
                            "{} copied ({} bytes sent, {} already there) in {}",
                            p.digest, p.bytes_copied, p.bytes_skipped, took
                        ),
                    )
                    .await;
                    s["conditions"] = json!([ready_condition(
                        true,
                        "Copied",
                        &format!("{} in the target registry", p.digest)
                    )]);
                    self.patch_status(name, s).await;
                    return "Done";
                }
                pb::TaskState::Failed => {
                    let reason = reason_name(pb::FailureReason::from_wire(u.reason));
                    warn!(backup = name, reason, message = %u.message, "copy failed");
                    let mut s = bytes;
                    s["phase"] = "Failed".into();
                    s["reason"] = reason.into();
                    s["message"] = u.message.clone().into();
                    s["attempts"] = (attempts + 1).into();
                    s["finishedAt"] = now_rfc3339().into();
                    s["conditions"] = json!([ready_condition(false, reason, &u.message)]);
                    self.patch_status(name, s).await;
                    self.event(
                        backup_ref(name),
                        EventType::Warning,
                        reason,
                        format!("attempt {}: {}", attempts + 1, u.message),
                    )
                    .await;
                    return "Failed";
                }
                _ => {
                    if u.copy.is_some() && last_write.elapsed() >= PROGRESS_WRITES {
                        last_write = tokio::time::Instant::now();
                        self.patch_status(name, bytes).await;
                    }
                }
            }
        }
    }

    async fn read_docker_secret(
        &self,
        ns: &str,
        name: &str,
    ) -> Result<Option<DockerCredentials>, String> {
        match Api::<Secret>::namespaced(self.client.clone(), ns)
            .get_opt(name)
            .await
        {
            Ok(Some(s)) => match s.data.as_ref().and_then(|d| d.get(".dockerconfigjson")) {
                Some(b) => DockerCredentials::parse(&b.0, &format!("Secret {ns}/{name}"))
                    .map(Some)
                    .map_err(|e| e.to_string()),
                None => Err(format!("Secret {ns}/{name} has no .dockerconfigjson")),
            },
            Ok(None) => Ok(None),
            Err(e) => Err(format!("cannot read Secret {ns}/{name}: {e}")),
        }
    }

    /// Credentials for `source` from the pull Secrets of the workloads that
    /// use it and of their ServiceAccounts; only those for its registry.
    async fn source_credentials(
        &self,
        source: &Reference,
        users: &[String],
    ) -> Option<pb::RegistryCredentials> {
        let workloads = self.workloads();
        for key in users {
            let Some(w) = workloads.iter().find(|w| &w.key() == key) else {
                continue;
            };
            let mut secrets = w.pull_secrets.clone();
            if let Ok(Some(sa)) =
                Api::<ServiceAccount>::namespaced(self.client.clone(), &w.namespace)
                    .get_opt(&w.service_account)
                    .await
            {
                secrets.extend(
                    sa.image_pull_secrets
                        .iter()
                        .flatten()
                        .map(|r| r.name.clone()),
                );
            }
            for s in secrets {
                match self.read_docker_secret(&w.namespace, &s).await {
                    Ok(Some(d)) => {
                        if let Some(a) = d.for_reference(source) {
                            return Some(pb::RegistryCredentials {
                                username: a.username.clone(),
                                password: a.password.clone(),
                            });
                        }
                    }
                    Ok(None) => {}
                    Err(e) => warn!(workload = %key, "{e}"),
                }
            }
        }
        None
    }

    /// Credentials for the target registry from the policy's Secret.
    /// The policy's target credentials Secret, read once per use; `None`
    /// when the policy names none.
    async fn target_secret(
        &self,
        policy: &BackupPolicySpec,
    ) -> Result<Option<DockerCredentials>, String> {
        let Some(secret) = &policy.target.credentials_secret else {
            return Ok(None);
        };
        let ns = secret
            .namespace
            .clone()
            .unwrap_or_else(|| self.own_ns.clone());
        match self.read_docker_secret(&ns, &secret.name).await? {
            None => Err(format!(
                "the policy's credentials Secret {ns}/{} does not exist",
                secret.name
            )),
            Some(d) => Ok(Some(d)),
        }
    }

    /// Credentials for the target registry from the policy's Secret.
    async fn target_credentials(
        &self,
        policy: &BackupPolicySpec,
        target: &Reference,
    ) -> Result<Option<pb::RegistryCredentials>, String> {
        Ok(self.target_secret(policy).await?.and_then(|d| {
            d.for_reference(target).map(|a| pb::RegistryCredentials {
                username: a.username.clone(),
                password: a.password.clone(),
            })
        }))
    }

    async fn restore(&self, w: &Workload) {
        let originals = w.originals().unwrap_or_default();
        self.patch_workload(
            w,
            restore_patch(w, &originals),
            "restored to the original images",
        )
        .await;
    }

    async fn patch_workload(&self, w: &Workload, patch: serde_json::Value, what: &str) {
        let pp = PatchParams::default();
        let p = Patch::Strategic(patch);
        let result = match w.kind {
            super::crd::WorkloadKind::Deployment => {
                Api::<Deployment>::namespaced(self.client.clone(), &w.namespace)
                    .patch(&w.name, &pp, &p)
                    .await
                    .map(|_| ())
            }
            super::crd::WorkloadKind::DaemonSet => {
                Api::<DaemonSet>::namespaced(self.client.clone(), &w.namespace)
                    .patch(&w.name, &pp, &p)
                    .await
                    .map(|_| ())
            }
            super::crd::WorkloadKind::StatefulSet => {
                Api::<StatefulSet>::namespaced(self.client.clone(), &w.namespace)
                    .patch(&w.name, &pp, &p)
                    .await
                    .map(|_| ())
            }
        };
        match result {
            Ok(()) => {
                info!(workload = %w.key(), "{what}");
                let regarding = ObjectReference {
                    api_version: Some("apps/v1".into()),
                    kind: Some(format!("{:?}", w.kind)),
                    namespace: Some(w.namespace.clone()),
                    name: Some(w.name.clone()),
                    ..Default::default()
                };
                let reason = if what.starts_with("rolled") {
                    "RolledOntoBackup"
                } else {
                    "RestoredImages"
                };
                self.event(regarding, EventType::Normal, reason, what.to_string())
                    .await;
            }
            // Changed since read: the next pass sees the new version.
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => warn!(workload = %w.key(), error = %e, "cannot patch the workload"),
        }
    }
}

/// The reference of ImageBackup `name`, for its Events.
fn backup_ref(name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("berth.dev/v1alpha1".into()),
        kind: Some("ImageBackup".into()),
        name: Some(name.into()),
        ..Default::default()
    }
}
