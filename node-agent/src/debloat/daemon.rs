//! `node-agent debloater`: the node's half of ImageDebloat, run by the
//! privileged `berth-debloater` DaemonSet. The coordinator decides the
//! phases; this loop does what they ask of this node:
//!
//! - `Profiling` (this node named): record every running container of the
//!   image (and those that start) and say so in `status.profiler`;
//! - when profiling ends: stop, add the paths to the node's profile of the
//!   image (on disk, so a restart loses nothing recorded);
//! - `Debloating`: build `<image>-baffs` from that profile, push it, pull it
//!   into the runtime, and write the result (or the error) to
//!   `status.build`.
//!
//! It writes only its own status fields, with merge patches, so it never
//! races the coordinator's.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use berth_proto::reference::Reference;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use oci_client::secrets::RegistryAuth;
use serde_json::{Value, json};
use tracing::{info, warn};

use super::Options;
use super::cli::{Job, SavedProfile, load_profile, save_profile};
use super::profile::Recording;
use super::starts::StartWatcher;
use crate::cri::CriRuntime;

/// How often the ImageDebloats are read.
const TICK: Duration = Duration::from_secs(1);
/// How long a task marked at its start may stay unknown to CRI.
const PENDING_FOR: Duration = Duration::from_secs(30);

/// `node-agent debloater …`
#[derive(Debug, clap::Args)]
pub struct DebloaterArgs {
    /// This node's name.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Where profiles are kept.
    #[arg(
        long,
        env = "BERTH_PROFILES_DIR",
        default_value = "/var/lib/berth/profiles"
    )]
    pub profiles_dir: PathBuf,
    /// Registries reached over plain HTTP, comma-separated.
    #[arg(long, env = "BERTH_INSECURE_REGISTRIES", value_delimiter = ',')]
    pub plain_http: Vec<String>,
}

fn resource() -> ApiResource {
    ApiResource {
        group: "berth.dev".into(),
        version: "v1alpha1".into(),
        api_version: "berth.dev/v1alpha1".into(),
        kind: "ImageDebloat".into(),
        plural: "imagedebloats".into(),
    }
}

/// One ImageDebloat this node profiles.
struct Profiling {
    name: String,
    image: String,
    image_id: String,
    since: String,
    recordings: BTreeMap<String, (String, Recording)>,
    paths: BTreeSet<String>,
    containers: BTreeSet<String>,
    reported: Option<(usize, Option<bool>)>,
    /// Marks new containers before they start; `None` until a container
    /// of the image shows which runtime to watch.
    watcher: Option<StartWatcher>,
    watching: Option<bool>,
    /// New tasks marked at their start, until CRI says what they are.
    pending: Vec<(String, Instant, Recording)>,
}

impl Profiling {
    /// Stops every recording and adds what they saw to the node's profile.
    fn finish(mut self, dir: &std::path::Path) {
        // Tasks marked at their start that CRI has not named yet (the
        // profile may end within a second of a restart) count too. A pod
        // sandbox's or another image's paths at worst keep a few files of
        // this image it did not need; the build keeps only paths it has.
        if let Some(w) = self.watcher.take() {
            let now = Instant::now();
            self.pending
                .extend(w.take().into_iter().map(|(id, r)| (id, now, r)));
        }
        for (_, _, r) in std::mem::take(&mut self.pending) {
            self.paths.extend(r.stop());
        }
        for (_, (_, r)) in std::mem::take(&mut self.recordings) {
            self.paths.extend(r.stop());
        }
        let p = SavedProfile {
            image_id: self.image_id.clone(),
            images: [self.image.clone()].into(),
            containers: self.containers.clone(),
            paths: self.paths.clone(),
        };
        match save_profile(dir, &p) {
            Ok(path) => {
                info!(debloat = %self.name, paths = self.paths.len(), file = %path.display(), "profile saved")
            }
            Err(e) => warn!(debloat = %self.name, error = %e, "could not save the profile"),
        }
    }
}

async fn patch_status(api: &Api<DynamicObject>, name: &str, status: Value) -> kube::Result<()> {
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status})),
    )
    .await
    .map(|_| ())
}

/// Runs until the process is stopped.
pub async fn run(cri: CriRuntime, args: DebloaterArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("a Kubernetes client")?;
    let all: Api<DynamicObject> = Api::all_with(client.clone(), &resource());
    let mut active: HashMap<String, Profiling> = HashMap::new();
    let building: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    info!(node = %args.node_name, "debloater ready");
    loop {
        let list = match all.list(&ListParams::default()).await {
            Ok(l) => l.items,
            Err(e) => {
                warn!(error = %e, "listing ImageDebloats");
                tokio::time::sleep(TICK).await;
                continue;
            }
        };
        let mut seen = BTreeSet::new();
        for obj in list {
            let Some(uid) = obj.metadata.uid.clone() else {
                continue;
            };
            let status = obj.data.get("status").cloned().unwrap_or(Value::Null);
            let me = args.node_name.as_str();
            let builder = status["node"].as_str() == Some(me);
            let listed = status["nodes"]
                .as_array()
                .is_some_and(|n| n.iter().any(|n| n.as_str() == Some(me)));
            if !builder && !listed {
                continue;
            }
            let ns = obj.metadata.namespace.clone().unwrap_or_default();
            let name = obj.metadata.name.clone().unwrap_or_default();
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &resource());
            let phase = status["phase"].as_str().unwrap_or("");
            if phase == "Profiling" {
                seen.insert(uid.clone());
                if let Err(e) = profile(&cri, &api, &mut active, &uid, &name, &status, &args).await
                {
                    warn!(debloat = %name, error = %e, "profiling");
                }
                continue;
            }
            if let Some(p) = active.remove(&uid) {
                p.finish(&args.profiles_dir);
            }
            // Another node builds: hand it what this node recorded (the
            // node's whole profile of the image, kept across restarts).
            if phase == "Debloating" && !builder && status["profilers"][me]["paths"].is_null() {
                if let Err(e) = hand_over(&cri, &api, &name, &status, &args).await {
                    warn!(debloat = %name, error = format!("{e:#}"), "could not hand the profile over");
                }
                continue;
            }
            if phase == "Debloating" && builder && status["build"].is_null() {
                // The building node waits for every other node's paths.
                let others: Option<BTreeSet<String>> = status["nodes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|n| n.as_str())
                    .filter(|n| *n != me)
                    .map(|n| {
                        status["profilers"][n]["paths"].as_array().map(|ps| {
                            ps.iter()
                                .filter_map(|p| p.as_str().map(String::from))
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect::<Option<Vec<_>>>()
                    .map(|all| all.into_iter().flatten().collect());
                let Some(others) = others else { continue };
                if !building
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(uid.clone())
                {
                    continue;
                }
                let (cri, building, args_dir, plain_http) = (
                    cri.clone(),
                    building.clone(),
                    args.profiles_dir.clone(),
                    args.plain_http.clone(),
                );
                let spec = obj.data.get("spec").cloned().unwrap_or(Value::Null);
                tokio::spawn(async move {
                    let result = build(&cri, &status, &spec, &args_dir, &plain_http, others).await;
                    let report = match result {
                        Ok(b) => b,
                        Err(e) => {
                            warn!(debloat = %name, error = format!("{e:#}"), "build failed");
                            json!({"error": format!("{e:#}")})
                        }
                    };
                    if let Err(e) = patch_status(&api, &name, json!({"build": report})).await {
                        warn!(debloat = %name, error = %e, "could not write the build");
                    }
                    building
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&uid);
                });
            }
        }
        // Deleted (or moved on) while profiling: keep what was recorded.
        let gone: Vec<String> = active
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(p) = active.remove(&k) {
                p.finish(&args.profiles_dir);
            }
        }
        tokio::time::sleep(TICK).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn profile(
    cri: &CriRuntime,
    api: &Api<DynamicObject>,
    active: &mut HashMap<String, Profiling>,
    uid: &str,
    name: &str,
    status: &Value,
    args: &DebloaterArgs,
) -> anyhow::Result<()> {
    if !active.contains_key(uid) {
        let image = status["image"]
            .as_str()
            .context("status.image")?
            .to_string();
        let info = cri
            .status_of(&image)
            .await?
            .with_context(|| format!("{image} is not on this node"))?;
        let since = k8s_openapi::jiff::Timestamp::now().to_string();
        info!(debloat = %name, %image, "profiling starts");
        active.insert(
            uid.to_string(),
            Profiling {
                name: name.to_string(),
                image,
                image_id: info.id,
                since,
                recordings: BTreeMap::new(),
                paths: BTreeSet::new(),
                containers: BTreeSet::new(),
                reported: None,
                watcher: None,
                watching: None,
                pending: Vec::new(),
            },
        );
    }
    let p = active.get_mut(uid).expect("inserted");
    let running = cri.running_containers().await?;
    if p.watching.is_none()
        && let Some(c) = running.iter().find(|c| c.image_id == p.image_id)
    {
        match StartWatcher::start(c.pid) {
            Ok(w) => {
                p.watcher = Some(w);
                p.watching = Some(true);
            }
            Err(e) => {
                warn!(debloat = %name, error = format!("{e:#}"), "new containers cannot be marked before they start");
                p.watching = Some(false);
            }
        }
    }
    if let Some(w) = &p.watcher {
        let now = Instant::now();
        p.pending
            .extend(w.take().into_iter().map(|(id, r)| (id, now, r)));
    }
    // A marked task is kept if CRI shows it as a container of the image,
    // dropped if of another image, or never shown (a pod sandbox).
    for (id, at, r) in std::mem::take(&mut p.pending) {
        match running.iter().find(|c| c.id == id) {
            Some(c) if c.image_id == p.image_id => {
                let who = c.who();
                info!(debloat = %p.name, container = %who, "recording from its start");
                p.containers.insert(who.clone());
                p.recordings.insert(id, (who, r));
            }
            Some(_) => drop(r.stop()),
            None if at.elapsed() > PENDING_FOR => drop(r.stop()),
            None => p.pending.push((id, at, r)),
        }
    }
    let live: BTreeSet<&str> = running.iter().map(|c| c.id.as_str()).collect();
    let ended: Vec<String> = p
        .recordings
        .keys()
        .filter(|k| !live.contains(k.as_str()))
        .cloned()
        .collect();
    for id in ended {
        if let Some((_, r)) = p.recordings.remove(&id) {
            p.paths.extend(r.stop());
        }
    }
    for c in running.iter().filter(|c| c.image_id == p.image_id) {
        if p.recordings.contains_key(&c.id) {
            continue;
        }
        let who = c.who();
        match Recording::start(c.pid) {
            Ok(r) => {
                info!(debloat = %p.name, container = %who, "recording");
                p.containers.insert(who.clone());
                p.recordings.insert(c.id.clone(), (who, r));
            }
            Err(super::profile::ProfileError::Gone(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let now = Some((p.containers.len(), p.watching));
    if p.reported != now && !p.containers.is_empty() && p.watching.is_some() {
        patch_status(
            api,
            name,
            json!({"profilers": {&args.node_name: {"since": p.since,
                "containers": p.containers, "watching": p.watching}}}),
        )
        .await?;
        p.reported = now;
    }
    Ok(())
}

/// Writes this node's profile of the image into its `status.profilers`
/// entry, for the node that builds.
async fn hand_over(
    cri: &CriRuntime,
    api: &Api<DynamicObject>,
    name: &str,
    status: &Value,
    args: &DebloaterArgs,
) -> anyhow::Result<()> {
    let image = status["image"].as_str().context("status.image")?;
    let id = cri
        .status_of(image)
        .await?
        .with_context(|| format!("{image} is not on this node"))?
        .id;
    let paths = load_profile(&args.profiles_dir, &id)?
        .map(|p| p.paths)
        .unwrap_or_default();
    info!(debloat = %name, paths = paths.len(), "profile handed to the building node");
    patch_status(
        api,
        name,
        json!({"profilers": {&args.node_name: {"paths": paths}}}),
    )
    .await?;
    Ok(())
}

/// Builds, pushes and pulls the debloated image; the `status.build` value.
async fn build(
    cri: &CriRuntime,
    status: &Value,
    spec: &Value,
    profiles: &std::path::Path,
    plain_http: &[String],
    others: BTreeSet<String>,
) -> anyhow::Result<Value> {
    let image = status["image"].as_str().context("status.image")?;
    let target = Reference::parse(status["target"].as_str().context("status.target")?)?;
    let id = cri
        .status_of(image)
        .await?
        .with_context(|| format!("{image} is no longer on this node"))?
        .id;
    let mut paths = load_profile(profiles, &id)?
        .with_context(|| format!("no profile of {image} on this node"))?
        .paths;
    paths.extend(others);
    let opts = Options {
        top: spec["top"].as_u64().map(|n| n as usize),
        keep: spec["keep"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|k| k.as_str().map(String::from))
            .collect(),
    };
    let job = Job {
        image,
        target: &target,
        paths: &paths,
        opts: &opts,
        plain_http,
        auth: &RegistryAuth::Anonymous,
        scratch: None,
    };
    let s = job.run(cri, |what| info!(image, "{what}")).await?;
    Ok(json!({
        "image": s.debloated,
        "digest": s.digest,
        "sizeBefore": s.size_before,
        "sizeAfter": s.size_after,
        "pathsProfiled": s.paths_profiled,
        "pathsKept": s.paths_kept,
        "pathsBefore": s.paths_before,
        "seconds": s.build_and_push_seconds,
        "layers": s.layers.iter().map(|l| json!({
            "filesBefore": l.files_before, "filesAfter": l.files_after,
            "sizeBefore": l.blob_before, "sizeAfter": l.blob_after,
        })).collect::<Vec<_>>(),
    }))
}
