//! The pods bound to the virtual node, run as transient systemd units.
//!
//! Level-triggered: every pass (on a pod event, at least every [`RESYNC`])
//! compares the pods with the units in the provider's slice. A pod whose
//! units are missing gets them started (its Debian packages installed
//! first); a unit without a pod is stopped (so units orphaned while the
//! agent was away are found, and the units of live pods are adopted, never
//! restarted); a deleted pod's units are stopped (SIGTERM, SIGKILL after its
//! grace period) and the pod object removed once they are gone; each pod's
//! status is written from its units' state when it changes.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::sync::Notify;
use tracing::{info, warn};

use super::probes::Probes;
use super::systemd::{Property, Systemd, UnitState, value};
use super::units::{self, Image};

/// A pass runs at least this often.
const RESYNC: Duration = Duration::from_secs(1);

/// The provider's state.
pub struct Provider {
    client: kube::Client,
    node: String,
    ip: String,
    systemd: Systemd,
    slice: String,
    logs_dir: std::path::PathBuf,
    pods: Store<Pod>,
    /// Status last written per pod UID.
    written: std::sync::Mutex<BTreeMap<String, serde_json::Value>>,
    probes: tokio::sync::Mutex<Probes>,
    /// Restarts a failed liveness probe caused, by (pod UID, container):
    /// systemd counts only its own.
    probe_restarts: std::sync::Mutex<BTreeMap<(String, String), u32>>,
}

impl Provider {
    /// Mirrors the pods bound to `node`; `wake` is notified on their events.
    pub fn new(
        client: kube::Client,
        node: &str,
        ip: &str,
        systemd: Systemd,
        slice: &str,
        logs_dir: std::path::PathBuf,
        wake: Arc<Notify>,
    ) -> Self {
        let (pods, writer) = reflector::store();
        let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        tokio::spawn(
            watcher(Api::<Pod>::all(client.clone()), cfg)
                .default_backoff()
                .reflect(writer)
                .for_each(move |e| {
                    if let Err(e) = e {
                        warn!(error = %e, "pod watch failed; retrying");
                    }
                    wake.notify_one();
                    futures::future::ready(())
                }),
        );
        Provider {
            client,
            node: node.into(),
            ip: ip.into(),
            systemd,
            slice: slice.into(),
            logs_dir,
            pods,
            written: Default::default(),
            probes: Default::default(),
            probe_restarts: Default::default(),
        }
    }

    /// Runs passes forever.
    pub async fn run(self, wake: Arc<Notify>) {
        let _ = self.pods.wait_until_ready().await;
        info!(node = %self.node, "systemd provider running");
        loop {
            if let Err(e) = self.pass().await {
                warn!(error = %format!("{e:#}"), "pass failed");
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(RESYNC) => {}
            }
        }
    }

    async fn pass(&self) -> anyhow::Result<()> {
        let pods = self.pods.state();
        let mut wanted = HashSet::new();
        for pod in &pods {
            let (ns, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
            for c in pod.spec.iter().flat_map(|s| &s.containers) {
                wanted.insert(units::unit_name(&ns, &name, &c.name));
            }
        }
        // Units without a pod (deleted while the agent was away, or by hand).
        for unit in self
            .systemd
            .list(&format!("{}*.service", units::PREFIX))
            .await?
        {
            if !wanted.contains(&unit) {
                info!(unit = %unit, "stopping a unit without a pod");
                self.systemd.stop(&unit).await?;
                self.systemd.reset(&unit).await;
            }
        }
        let conflicts = units::port_conflicts(&pods);
        for pod in pods {
            if let Some(message) = conflicts.get(&pod.uid().unwrap_or_default()) {
                if let Err(e) = self.reject(&pod, "HostPortConflict", message).await {
                    warn!(pod = %pod.name_any(), error = %format!("{e:#}"), "pod not rejected");
                }
                continue;
            }
            if let Err(e) = self.reconcile(&pod).await {
                warn!(pod = %pod.name_any(), error = %format!("{e:#}"), "pod not reconciled");
            }
        }
        Ok(())
    }

    /// Fails a pod this node cannot run, as a kubelet's admission does:
    /// phase Failed with `reason`, nothing started.
    async fn reject(&self, pod: &Pod, reason: &str, message: &str) -> anyhow::Result<()> {
        let st = pod.status.clone().unwrap_or_default();
        if pod.metadata.deletion_timestamp.is_some() {
            return self.finish_deletion(pod, &[]).await;
        }
        if st.phase.as_deref() == Some("Failed") && st.reason.as_deref() == Some(reason) {
            return Ok(());
        }
        info!(pod = %pod.name_any(), reason, "{message}");
        let api: Api<Pod> =
            Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        api.patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"phase": "Failed", "reason": reason, "message": message}}),
            ),
        )
        .await
        .context("writing the pod status")?;
        Ok(())
    }

    async fn reconcile(&self, pod: &Pod) -> anyhow::Result<()> {
        let (ns, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
        let spec = pod.spec.clone().unwrap_or_default();
        let names: Vec<(String, String)> = spec
            .containers
            .iter()
            .map(|c| (c.name.clone(), units::unit_name(&ns, &name, &c.name)))
            .collect();
        if pod.metadata.deletion_timestamp.is_some() {
            return self.finish_deletion(pod, &names).await;
        }
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        if phase == "Succeeded" || phase == "Failed" {
            return Ok(());
        }
        let grace = spec.termination_grace_period_seconds.unwrap_or(30).max(0) as u64;
        let mut states = BTreeMap::new();
        let mut waiting: BTreeMap<String, (String, String)> = BTreeMap::new();
        for (c, (cname, unit)) in spec.containers.iter().zip(&names) {
            let state = match self.systemd.state(unit).await? {
                Some(s) => s,
                None => match self.start(pod, c, unit, grace).await {
                    Ok(()) => self.systemd.state(unit).await?.unwrap_or_default(),
                    Err((reason, message)) => {
                        waiting.insert(cname.clone(), (reason, message));
                        continue;
                    }
                },
            };
            states.insert(cname.clone(), state);
        }
        self.write_status(pod, &states, &waiting).await
    }

    /// Starts the unit of container `c`; `Err((reason, message))` says why not.
    async fn start(
        &self,
        pod: &Pod,
        c: &k8s_openapi::api::core::v1::Container,
        unit: &str,
        grace: u64,
    ) -> Result<(), (String, String)> {
        let image = c.image.clone().unwrap_or_default();
        match units::image_of(&image) {
            Ok(Image::Deb(pkg)) => ensure_package(&pkg)
                .await
                .map_err(|e| ("ErrImagePull".to_string(), e))?,
            Ok(Image::Oci(r)) => {
                return Err((
                    "ImageUnsupported".into(),
                    format!(
                        "{r}: this systemd node runs Debian packages (deb://NAME); OCI images are not supported yet"
                    ),
                ));
            }
            Err(e) => return Err(("InvalidImageName".into(), e)),
        }
        let (path, argv) = units::exec_start(c, |p| std::path::Path::new(p).exists())
            .map_err(|e| ("CreateContainerConfigError".to_string(), e))?;
        let restart = units::restart(pod);
        let mut props: Vec<Property> = vec![
            (
                "Description",
                value(format!(
                    "berth pod {}/{} uid {} container {}",
                    pod.namespace().unwrap_or_default(),
                    pod.name_any(),
                    pod.uid().unwrap_or_default(),
                    c.name
                )),
            ),
            ("Slice", value(self.slice.clone())),
            ("ExecStart", value(vec![(path, argv, false)])),
            ("Restart", value(restart.to_string())),
            ("RestartUSec", value(1_000_000u64)),
            ("TimeoutStopUSec", value(grace.max(1) * 1_000_000)),
            // Keep a finished unit loaded, so its exit status can be read.
            ("RemainAfterExit", value(restart != "always")),
        ];
        let log = super::kubelet_api::log_file(
            &self.logs_dir,
            &pod.namespace().unwrap_or_default(),
            &pod.name_any(),
            &c.name,
        );
        // `StandardOutput=append:FILE` in unit-file terms.
        let sink = log.display().to_string();
        props.push(("StandardOutputFileToAppend", value(sink.clone())));
        props.push(("StandardErrorFileToAppend", value(sink)));
        let env: Vec<String> = c
            .env
            .iter()
            .flatten()
            .filter_map(|e| e.value.as_ref().map(|v| format!("{}={v}", e.name)))
            .collect();
        if !env.is_empty() {
            props.push(("Environment", value(env)));
        }
        if let Some(dir) = &c.working_dir {
            props.push(("WorkingDirectory", value(dir.clone())));
        }
        let (memory, cpu) = units::limits(c);
        if let Some(m) = memory {
            props.push(("MemoryMax", value(m)));
        }
        if let Some(q) = cpu {
            props.push(("CPUQuotaPerSecUSec", value(q)));
        }
        self.systemd.reset(unit).await;
        self.systemd
            .start(unit, props)
            .await
            .map_err(|e| ("RunContainerError".to_string(), format!("{e:#}")))?;
        info!(unit, "started");
        Ok(())
    }

    /// Stops a deleted pod's units; removes the pod once they are gone.
    async fn finish_deletion(&self, pod: &Pod, names: &[(String, String)]) -> anyhow::Result<()> {
        let mut running = false;
        for (_, unit) in names {
            if let Some(s) = self.systemd.state(unit).await? {
                if s.active == "active" || s.active == "activating" || s.active == "deactivating" {
                    running = true;
                    if s.active != "deactivating" {
                        self.systemd.stop(unit).await?;
                    }
                } else {
                    self.systemd.reset(unit).await;
                }
            }
        }
        if running {
            return Ok(());
        }
        let api: Api<Pod> =
            Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: pod.uid(),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api.delete(&pod.name_any(), &dp).await {
            Ok(_) => {
                info!(pod = %pod.name_any(), "units stopped; pod removed");
                for (container, _) in names {
                    let _ = std::fs::remove_file(super::kubelet_api::log_file(
                        &self.logs_dir,
                        &pod.namespace().unwrap_or_default(),
                        &pod.name_any(),
                        container,
                    ));
                }
            }
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => return Err(e).context("removing the pod"),
        }
        Ok(())
    }

    async fn write_status(
        &self,
        pod: &Pod,
        states: &BTreeMap<String, UnitState>,
        waiting: &BTreeMap<String, (String, String)>,
    ) -> anyhow::Result<()> {
        let spec = pod.spec.clone().unwrap_or_default();
        let never = units::restart(pod) != "always";
        let mut statuses = Vec::new();
        let (mut all_running, mut all_done, mut any_failed) = (true, true, false);
        let (mut all_ready, mut ever_started) = (true, false);
        for c in &spec.containers {
            let image = c.image.clone().unwrap_or_default();
            let unit = units::unit_name(
                &pod.namespace().unwrap_or_default(),
                &pod.name_any(),
                &c.name,
            );
            let (state, ready, restarts) = if let Some((reason, message)) = waiting.get(&c.name) {
                all_running = false;
                all_done = false;
                all_ready = false;
                (
                    json!({"waiting": {"reason": reason, "message": message}}),
                    false,
                    0,
                )
            } else {
                let s = states.get(&c.name).cloned().unwrap_or_default();
                let (state, mut running) = container_state(&s);
                let uid = pod.uid().unwrap_or_default();
                let started = since_boot(s.started_usec);
                let mut ready = running;
                if running && let Some(probe) = &c.liveness_probe {
                    let alive = self
                        .probes
                        .lock()
                        .await
                        .check((&uid, &c.name, "liveness"), probe, started, true)
                        .await;
                    if !alive {
                        info!(unit = %unit, "liveness probe failed; restarting");
                        self.systemd.restart(&unit).await?;
                        self.probes.lock().await.reset(&uid, &c.name);
                        *self
                            .probe_restarts
                            .lock()
                            .unwrap()
                            .entry((uid.clone(), c.name.clone()))
                            .or_default() += 1;
                        running = false;
                        ready = false;
                    }
                }
                if running && let Some(probe) = &c.readiness_probe {
                    ready = self
                        .probes
                        .lock()
                        .await
                        .check((&uid, &c.name, "readiness"), probe, started, false)
                        .await;
                }
                let extra = self
                    .probe_restarts
                    .lock()
                    .unwrap()
                    .get(&(uid.clone(), c.name.clone()))
                    .copied()
                    .unwrap_or(0);
                let finished = state.get("terminated").is_some();
                all_running &= running;
                all_done &= finished;
                if finished && state["terminated"]["exitCode"] != 0 {
                    any_failed = true;
                }
                ever_started |= s.started_usec != 0;
                all_ready &= ready;
                (state, ready, s.restarts + extra)
            };
            statuses.push(json!({
                "name": c.name, "image": image, "imageID": image,
                "containerID": format!("systemd://{unit}"),
                "ready": ready, "started": ready, "restartCount": restarts, "state": state,
            }));
        }
        let phase = if all_running || (!never && ever_started) {
            // Between restarts a pod stays Running, as with a kubelet.
            "Running"
        } else if never && all_done {
            if any_failed { "Failed" } else { "Succeeded" }
        } else {
            "Pending"
        };
        let cond = |t: &str, ok: bool| json!({"type": t, "status": if ok {"True"} else {"False"}});
        let status = json!({
            "phase": phase,
            "hostIP": self.ip, "podIP": self.ip,
            "podIPs": [{"ip": self.ip}], "hostIPs": [{"ip": self.ip}],
            "startTime": pod.status.as_ref().and_then(|s| s.start_time.clone()).map_or_else(|| Timestamp::now().to_string(), |t| t.0.to_string()),
            "conditions": [cond("PodScheduled", true), cond("Initialized", true),
                cond("ContainersReady", all_running && all_ready), cond("Ready", all_running && all_ready)],
            "containerStatuses": statuses,
        });
        let uid = pod.uid().unwrap_or_default();
        // Transition times aside, is this what was last written?
        if self.written.lock().unwrap().get(&uid) == Some(&status) {
            return Ok(());
        }
        let api: Api<Pod> =
            Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        api.patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Strategic(json!({"status": status.clone()})),
        )
        .await
        .context("writing the pod status")?;
        self.written.lock().unwrap().insert(uid, status);
        Ok(())
    }
}

/// The monotonic instant of a wall-clock time in µs since the epoch.
fn since_boot(usec: u64) -> tokio::time::Instant {
    let now_wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let ago = now_wall.saturating_sub(Duration::from_micros(usec));
    tokio::time::Instant::now()
        .checked_sub(ago)
        .unwrap_or_else(tokio::time::Instant::now)
}

fn rfc3339(usec: u64) -> String {
    Timestamp::from_microsecond(usec as i64)
        .unwrap_or(Timestamp::UNIX_EPOCH)
        .to_string()
}

/// A container's state from its unit's, and whether it runs. A process that
/// ended counts by how it ended (ExecMainCode/ExecMainStatus), never by the
/// unit's result alone: a killed `RemainAfterExit` unit still says success.
pub fn container_state(s: &UnitState) -> (serde_json::Value, bool) {
    let ended = s.exec_main_code != 0 && s.exited_usec != 0;
    if s.active == "active" && s.sub == "running" {
        return (
            json!({"running": {"startedAt": rfc3339(s.started_usec)}}),
            true,
        );
    }
    if ended {
        let (exit, reason) = match s.exec_main_code {
            // CLD_EXITED
            1 => (
                s.exec_main_status,
                if s.exec_main_status == 0 {
                    "Completed"
                } else {
                    "Error"
                },
            ),
            // Killed or dumped by a signal.
            _ if s.result == "oom-kill" => (128 + s.exec_main_status, "OOMKilled"),
            _ => (128 + s.exec_main_status, "Error"),
        };
        let reason = if s.result == "oom-kill" {
            "OOMKilled"
        } else {
            reason
        };
        return (
            json!({"terminated": {"exitCode": exit, "reason": reason,
                "startedAt": rfc3339(s.started_usec), "finishedAt": rfc3339(s.exited_usec)}}),
            false,
        );
    }
    (json!({"waiting": {"reason": "ContainerCreating"}}), false)
}

/// Makes sure Debian package `pkg` is installed, without starting its own
/// services (a `policy-rc.d` that refuses them, for the install only).
async fn ensure_package(pkg: &str) -> Result<(), String> {
    let installed = tokio::process::Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .await
        .map_err(|e| format!("dpkg-query: {e}"))?;
    if String::from_utf8_lossy(&installed.stdout).contains("install ok installed") {
        return Ok(());
    }
    let out = tokio::process::Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends", pkg])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("RUNLEVEL", "1")
        .output()
        .await
        .map_err(|e| format!("apt-get: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "apt-get install {pkg} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}
