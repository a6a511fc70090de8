//! The ImageDebloat controller: reads each ImageDebloat's workload, asks
//! [`super::plan::next`] for the step, and carries it out — the status
//! phases, the patch that rolls the workload onto the debloated image, and
//! the one that rolls it back. The node work (profile, build, push) is the
//! node's debloater's (`node-agent debloater`), which reads the status this
//! controller writes and adds its own fields.
//!
//! It also creates an ImageDebloat for each Deployment or DaemonSet
//! annotated `berth.dev/debloat: "true"`.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod, PodSpec};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio::sync::Notify;
use tracing::{info, warn};

use super::crd::{
    ImageDebloat, ImageDebloatSpec, ORIGINAL_IMAGE, PROFILE_RESTART, TRIGGER, WorkloadRef,
};
use super::plan::{self, Facts, Step, WorkloadFacts};
use crate::imagecache::watch::{any_change, mirror};

/// The label of nodes that run the debloater (manifests/35-debloater.yaml).
pub const DEBLOAT_NODES: &str = "berth.dev/debloat=enabled";
/// A pass runs at least this often (windows and timeouts fall due).
const RESYNC: Duration = Duration::from_secs(1);
/// Container states of a new pod that mean the debloated image broke it.
const BROKEN: [&str; 5] = [
    "CrashLoopBackOff",
    "CreateContainerError",
    "RunContainerError",
    "ErrImagePull",
    "ImagePullBackOff",
];

struct Controller {
    client: kube::Client,
    debloats: Store<ImageDebloat>,
    deployments: Store<Deployment>,
    daemonsets: Store<DaemonSet>,
    recorder: Recorder,
}

/// Runs the controller until the task is dropped.
pub async fn run(client: kube::Client) {
    let wake = Arc::new(Notify::new());
    let c = Controller {
        debloats: mirror(&client, wake.clone(), any_change),
        deployments: mirror(&client, wake.clone(), any_change),
        daemonsets: mirror(&client, wake.clone(), any_change),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "berth-coordinator".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        ),
        client,
    };
    if let Err(e) = c.debloats.wait_until_ready().await {
        warn!(error = %e, "the ImageDebloat mirror never filled");
    }
    let _ = c.deployments.wait_until_ready().await;
    let _ = c.daemonsets.wait_until_ready().await;
    loop {
        c.pass().await;
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(RESYNC) => {}
        }
    }
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// `<image><suffix>` as a reference (in `repository` if given), or why it
/// cannot be one.
pub fn target_of(image: &str, suffix: &str, repository: Option<&str>) -> Result<String, String> {
    berth_proto::reference::Reference::parse(image)
        .map_err(|e| e.to_string())?
        .suffixed_in(suffix, repository)
        .map(|r| r.to_string())
}

/// The workload in one shape: its pod template, selector, and rollout state.
struct Workload {
    reference: ObjectReference,
    template: PodSpec,
    selector: String,
    rolled_out: bool,
}

fn selector_of(labels: Option<&std::collections::BTreeMap<String, String>>) -> String {
    labels
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

impl Controller {
    fn workload(&self, ns: &str, w: &WorkloadRef) -> Option<Workload> {
        match w.kind.as_str() {
            "Deployment" => {
                let d = self
                    .deployments
                    .state()
                    .into_iter()
                    .find(|d| d.namespace().as_deref() == Some(ns) && d.name_any() == w.name)?;
                let spec = d.spec.as_ref()?;
                let s = d.status.clone().unwrap_or_default();
                let want = spec.replicas.unwrap_or(1);
                let rolled_out = s.observed_generation >= d.metadata.generation
                    && s.updated_replicas.unwrap_or(0) == want
                    && s.available_replicas.unwrap_or(0) == want
                    && s.replicas.unwrap_or(0) == want;
                Some(Workload {
                    reference: d.object_ref(&()),
                    template: spec.template.spec.clone()?,
                    selector: selector_of(spec.selector.match_labels.as_ref()),
                    rolled_out,
                })
            }
            "DaemonSet" => {
                let d = self
                    .daemonsets
                    .state()
                    .into_iter()
                    .find(|d| d.namespace().as_deref() == Some(ns) && d.name_any() == w.name)?;
                let spec = d.spec.as_ref()?;
                let s = d.status.clone().unwrap_or_default();
                let rolled_out = s.observed_generation >= d.metadata.generation
                    && s.updated_number_scheduled.unwrap_or(0) == s.desired_number_scheduled
                    && s.number_available.unwrap_or(0) == s.desired_number_scheduled;
                Some(Workload {
                    reference: d.object_ref(&()),
                    template: spec.template.spec.clone()?,
                    selector: selector_of(spec.selector.match_labels.as_ref()),
                    rolled_out,
                })
            }
            _ => None,
        }
    }

    async fn facts(&self, d: &ImageDebloat, ns: &str) -> (Facts, Option<Workload>) {
        let spec = &d.spec;
        let status = d.status.clone().unwrap_or_default();
        let mut facts = Facts {
            now: now_secs(),
            workload: None,
            probe_job_done: None,
        };
        let Some(w) = self.workload(ns, &spec.workload) else {
            return (facts, None);
        };
        let container = match &spec.container {
            Some(name) => w.template.containers.iter().find(|c| &c.name == name),
            None => w.template.containers.first(),
        };
        let name = container.map(|c| c.name.clone()).unwrap_or_default();
        let image = container.and_then(|c| c.image.clone());
        let mut wf = WorkloadFacts {
            image: image.clone(),
            ready_nodes: Vec::new(),
            rolled_out: w.rolled_out,
            failing: None,
        };
        // Pods tell where to profile (before it starts) and whether new
        // pods fail (during the rollout); no other phase reads them.
        let phase = status.phase.as_str();
        let starting = matches!(phase, "" | "Pending");
        let pods: Vec<Pod> = if starting || phase == "RollingOut" {
            Api::<Pod>::namespaced(self.client.clone(), ns)
                .list(&ListParams::default().labels(&w.selector))
                .await
                .map(|l| l.items)
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        for p in &pods {
            let runs = |want: &str| {
                p.spec.as_ref().is_some_and(|s| {
                    s.containers
                        .iter()
                        .any(|c| c.name == name && c.image.as_deref() == Some(want))
                })
            };
            let st = p.status.clone().unwrap_or_default();
            let ready = st
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            if ready
                && image.as_deref().is_some_and(runs)
                && p.metadata.deletion_timestamp.is_none()
            {
                wf.ready_nodes
                    .extend(p.spec.as_ref().and_then(|s| s.node_name.clone()));
            }
            if status.phase == "RollingOut"
                && status.target.as_deref().is_some_and(runs)
                && wf.failing.is_none()
            {
                for cs in st
                    .container_statuses
                    .iter()
                    .flatten()
                    .filter(|c| c.name == name)
                {
                    let waiting = cs.state.as_ref().and_then(|s| s.waiting.as_ref());
                    let last = cs.last_state.as_ref().and_then(|s| s.terminated.as_ref());
                    if let Some(w) =
                        waiting.filter(|w| BROKEN.contains(&w.reason.as_deref().unwrap_or("")))
                    {
                        wf.failing = Some(format!(
                            "pod {}: container {name}: {}: {}",
                            p.name_any(),
                            w.reason.as_deref().unwrap_or(""),
                            w.message.as_deref().unwrap_or("")
                        ));
                    } else if let Some(t) = last.filter(|t| t.exit_code != 0) {
                        wf.failing = Some(format!(
                            "pod {}: container {name} exited {} ({})",
                            p.name_any(),
                            t.exit_code,
                            t.reason.as_deref().unwrap_or("")
                        ));
                    }
                }
            }
        }
        wf.ready_nodes.sort();
        wf.ready_nodes.dedup();
        // Only nodes with a debloater can profile.
        if starting && !wf.ready_nodes.is_empty() {
            let labelled: Vec<String> = Api::<Node>::all(self.client.clone())
                .list(&ListParams::default().labels(DEBLOAT_NODES))
                .await
                .map(|l| l.items.iter().map(|n| n.name_any()).collect())
                .unwrap_or_default();
            wf.ready_nodes.retain(|n| labelled.contains(n));
        }
        facts.workload = Some(wf);
        if let Some(job) = spec
            .profile
            .probe_job
            .as_ref()
            .filter(|_| phase == "Profiling")
        {
            let done = match Api::<Job>::namespaced(self.client.clone(), ns)
                .get_opt(job)
                .await
            {
                Ok(Some(j)) => j.status.and_then(|s| s.succeeded).unwrap_or(0) > 0,
                _ => false,
            };
            facts.probe_job_done = Some(done);
        }
        (facts, Some(w))
    }

    async fn pass(&self) {
        self.trigger().await;
        for d in self.debloats.state() {
            let Some(ns) = d.namespace() else { continue };
            let status = d.status.clone().unwrap_or_default();
            if matches!(status.phase.as_str(), "Ready" | "Failed" | "RolledBack") {
                continue;
            }
            let (facts, workload) = self.facts(&d, &ns).await;
            let step = plan::next(&d.spec, &status, &facts, target_of);
            if let Err(e) = self.apply(&d, &ns, step, workload.as_ref()).await {
                warn!(debloat = %d.name_any(), error = %e, "step failed; retried next pass");
            }
        }
    }

    async fn status(
        &self,
        d: &ImageDebloat,
        ns: &str,
        status: serde_json::Value,
    ) -> kube::Result<()> {
        Api::<ImageDebloat>::namespaced(self.client.clone(), ns)
            .patch_status(
                &d.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
            .map(|_| ())
    }

    async fn set_image(
        &self,
        w: &Workload,
        container: &str,
        image: &str,
        original: Option<&str>,
    ) -> kube::Result<()> {
        let patch = json!({
            "metadata": {"annotations": {ORIGINAL_IMAGE: original}},
            "spec": {"template": {"spec": {"containers": [{"name": container, "image": image}]}}},
        });
        self.patch_workload(w, patch).await
    }

    async fn patch_workload(&self, w: &Workload, patch: serde_json::Value) -> kube::Result<()> {
        let ns = w.reference.namespace.clone().unwrap_or_default();
        let name = w.reference.name.clone().unwrap_or_default();
        let p = Patch::Strategic(patch);
        let pp = PatchParams::default();
        match w.reference.kind.as_deref() {
            Some("DaemonSet") => Api::<DaemonSet>::namespaced(self.client.clone(), &ns)
                .patch(&name, &pp, &p)
                .await
                .map(|_| ()),
            _ => Api::<Deployment>::namespaced(self.client.clone(), &ns)
                .patch(&name, &pp, &p)
                .await
                .map(|_| ()),
        }
    }

    async fn event(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Debloat".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, regarding).await {
            tracing::debug!(error = %e, "event not recorded");
        }
    }

    async fn apply(
        &self,
        d: &ImageDebloat,
        ns: &str,
        step: Step,
        w: Option<&Workload>,
    ) -> kube::Result<()> {
        let status = d.status.clone().unwrap_or_default();
        let name = d.name_any();
        let container = || {
            d.spec.container.clone().or_else(|| {
                w.and_then(|w| w.template.containers.first())
                    .map(|c| c.name.clone())
            })
        };
        match step {
            Step::Wait => Ok(()),
            Step::Note(message) => {
                if status.message.as_deref() != Some(&message) {
                    self.status(d, ns, json!({"phase": "Pending", "message": message}))
                        .await?;
                }
                Ok(())
            }
            Step::Profile {
                nodes,
                image,
                target,
            } => {
                info!(debloat = %name, ?nodes, %image, "profiling");
                self.status(
                    d,
                    ns,
                    json!({"phase": "Profiling", "node": nodes[0], "nodes": nodes, "image": image,
                        "target": target, "profileStartedAt": now_rfc3339(), "reason": null, "message": null}),
                )
                .await
            }
            Step::Restart => {
                let Some(w) = w else { return Ok(()) };
                let at = now_rfc3339();
                self.patch_workload(
                    w,
                    json!({"spec": {"template": {"metadata": {"annotations": {PROFILE_RESTART: at}}}}}),
                )
                .await?;
                info!(debloat = %name, "workload restarted under the profiler");
                self.status(d, ns, json!({"restartedAt": at})).await
            }
            Step::EndProfile => {
                info!(debloat = %name, "profile ended; debloating");
                self.status(
                    d,
                    ns,
                    json!({"phase": "Debloating", "profileEndedAt": now_rfc3339()}),
                )
                .await
            }
            Step::RollOut { image } => {
                let (Some(w), Some(c)) = (w, container()) else {
                    return Ok(());
                };
                self.set_image(w, &c, &image, status.image.as_deref())
                    .await?;
                self.event(
                    &w.reference,
                    EventType::Normal,
                    "RollingOntoDebloated",
                    format!("container {c} onto {image}"),
                )
                .await;
                self.status(
                    d,
                    ns,
                    json!({"phase": "RollingOut", "rolloutStartedAt": now_rfc3339()}),
                )
                .await
            }
            Step::Done => {
                let b = status.build.clone().unwrap_or_default();
                let message = format!(
                    "rolled onto {}: {} -> {} bytes ({:.1} % smaller)",
                    status.target.as_deref().unwrap_or(""),
                    b.size_before,
                    b.size_after,
                    100.0 * (1.0 - b.size_after as f64 / b.size_before.max(1) as f64)
                );
                info!(debloat = %name, "{message}");
                self.status(
                    d,
                    ns,
                    json!({"phase": "Ready", "reason": null, "message": message}),
                )
                .await
            }
            Step::Fail { reason, message } => {
                warn!(debloat = %name, reason, %message, "failed");
                self.status(
                    d,
                    ns,
                    json!({"phase": "Failed", "reason": reason, "message": message}),
                )
                .await
            }
            Step::RollBack { reason, message } => {
                let (Some(w), Some(c), Some(original)) = (w, container(), status.image.clone())
                else {
                    return Ok(());
                };
                warn!(debloat = %name, reason, %message, "rolling back");
                self.set_image(w, &c, &original, None).await?;
                self.event(
                    &w.reference,
                    EventType::Warning,
                    "RolledBackFromDebloated",
                    format!("{reason}: {message}"),
                )
                .await;
                self.status(
                    d,
                    ns,
                    json!({"phase": "RolledBack", "reason": reason, "message": message}),
                )
                .await
            }
        }
    }

    /// An ImageDebloat for each workload annotated `berth.dev/debloat: "true"`.
    async fn trigger(&self) {
        let mut wanted = Vec::new();
        for d in self.deployments.state() {
            if d.annotations().get(TRIGGER).map(String::as_str) == Some("true") {
                wanted.push((
                    "Deployment",
                    d.namespace().unwrap_or_default(),
                    d.name_any(),
                ));
            }
        }
        for d in self.daemonsets.state() {
            if d.annotations().get(TRIGGER).map(String::as_str) == Some("true") {
                wanted.push(("DaemonSet", d.namespace().unwrap_or_default(), d.name_any()));
            }
        }
        for (kind, ns, workload) in wanted {
            let name = format!("{workload}-debloat");
            if self
                .debloats
                .state()
                .iter()
                .any(|d| d.namespace().as_deref() == Some(&ns) && d.name_any() == name)
            {
                continue;
            }
            let d = ImageDebloat::new(
                &name,
                ImageDebloatSpec {
                    workload: WorkloadRef {
                        kind: kind.into(),
                        name: workload.clone(),
                    },
                    ..Default::default()
                },
            );
            match Api::<ImageDebloat>::namespaced(self.client.clone(), &ns)
                .create(&PostParams::default(), &d)
                .await
            {
                Ok(_) => info!(%ns, %name, "ImageDebloat created for an annotated workload"),
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => warn!(%ns, %name, error = %e, "could not create an ImageDebloat"),
            }
        }
    }
}
