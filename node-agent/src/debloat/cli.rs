//! `node-agent baffs`: baffs's command line on one node, without the
//! coordinator. `shadow` profiles the containers of the named images while
//! they run and saves each image's profile; `debloat` builds `<ref>-baffs`
//! from the saved profiles, pushes it, and pulls it into the node's runtime.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use berth_proto::reference::Reference;
use oci_client::secrets::RegistryAuth;

use super::profile::Recording;
use super::store::Store;
use super::{Options, baffs_name, debloat, push};
use crate::cli::human_bytes;
use crate::cri::CriRuntime;
use crate::runtime::ImageRuntime;

/// `node-agent baffs …`
#[derive(Debug, clap::Subcommand)]
pub enum BaffsCommand {
    /// Profile the containers of these images (those running now and those
    /// that start) until the time is up or SIGINT/SIGTERM; save one profile
    /// per image, added to what earlier runs saved.
    Shadow {
        /// Images to profile, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        images: Vec<String>,
        /// Stop after this long [default: on SIGINT or SIGTERM].
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// Stop once every container profiled has exited (at least one),
        /// as baffs waits for its container to run and exit.
        #[arg(long)]
        until_exit: bool,
        /// Where profiles are kept.
        #[arg(
            long,
            env = "BERTH_PROFILES_DIR",
            default_value = "/var/lib/berth/profiles"
        )]
        profiles_dir: PathBuf,
    },
    /// Build `<ref>-baffs` from each image's profile, push it to its
    /// registry and pull it into the node's runtime.
    Debloat {
        /// Images to debloat, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        images: Vec<String>,
        /// Rewrite only the top N layers; the lower ones stay as they are.
        #[arg(long)]
        top: Option<usize>,
        /// More paths to keep (patterns: `*` within a component, a trailing
        /// `/**` for a subtree), comma-separated.
        #[arg(long, value_delimiter = ',')]
        keep: Vec<String>,
        /// Suffix of the new tag.
        #[arg(long, default_value = "-baffs")]
        suffix: String,
        /// Push to this repository (`host[:port]/path`) instead of the
        /// image's own.
        #[arg(long)]
        repository: Option<String>,
        /// Registries reached over plain HTTP, comma-separated.
        #[arg(long, env = "BERTH_INSECURE_REGISTRIES", value_delimiter = ',')]
        plain_http: Vec<String>,
        /// `user:password` for the registry pushed to.
        #[arg(long, env = "BERTH_PUSH_CREDENTIALS", hide_env_values = true)]
        credentials: Option<String>,
        /// Where profiles are kept.
        #[arg(
            long,
            env = "BERTH_PROFILES_DIR",
            default_value = "/var/lib/berth/profiles"
        )]
        profiles_dir: PathBuf,
        /// Scratch space for layer blobs [default: the system's temp dir].
        #[arg(long)]
        scratch_dir: Option<PathBuf>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// A saved profile: the paths containers of one image opened.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SavedProfile {
    /// The image's ID.
    pub image_id: String,
    /// The references it was profiled under.
    pub images: BTreeSet<String>,
    /// Containers profiled (`namespace/pod/container` or the container ID).
    pub containers: BTreeSet<String>,
    /// Paths opened, as the containers saw them.
    pub paths: BTreeSet<String>,
}

fn profile_path(dir: &Path, image_id: &str) -> PathBuf {
    dir.join(format!("{}.json", image_id.replace(':', "-")))
}

/// The saved profile of image `image_id`, if any.
pub fn load_profile(dir: &Path, image_id: &str) -> anyhow::Result<Option<SavedProfile>> {
    let path = profile_path(dir, image_id);
    match std::fs::read(&path) {
        Ok(raw) => Ok(Some(
            serde_json::from_slice(&raw).with_context(|| format!("profile {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("profile {}", path.display())),
    }
}

/// Adds `p` to the saved profile (written atomically: a crash leaves the
/// old one whole).
pub fn save_profile(dir: &Path, p: &SavedProfile) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut all = load_profile(dir, &p.image_id)?.unwrap_or_default();
    all.image_id = p.image_id.clone();
    all.images.extend(p.images.iter().cloned());
    all.containers.extend(p.containers.iter().cloned());
    all.paths.extend(p.paths.iter().cloned());
    let path = profile_path(dir, &p.image_id);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&all)?)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Runs a `baffs` command against the runtime `cri`.
pub async fn run(cri: &CriRuntime, cmd: BaffsCommand) -> anyhow::Result<()> {
    match cmd {
        BaffsCommand::Shadow {
            images,
            duration,
            until_exit,
            profiles_dir,
        } => shadow(cri, &images, duration, until_exit, &profiles_dir).await,
        BaffsCommand::Debloat {
            images,
            top,
            keep,
            suffix,
            repository,
            plain_http,
            credentials,
            profiles_dir,
            scratch_dir,
            json,
        } => {
            let auth = match credentials {
                Some(c) => match c.split_once(':') {
                    Some((u, p)) => RegistryAuth::Basic(u.into(), p.into()),
                    None => bail!("--credentials wants user:password"),
                },
                None => RegistryAuth::Anonymous,
            };
            let opts = Options { top, keep };
            let mut summaries = Vec::new();
            for image in &images {
                let s = debloat_one(
                    cri,
                    image,
                    &opts,
                    &suffix,
                    repository.as_deref(),
                    &plain_http,
                    &auth,
                    &profiles_dir,
                    scratch_dir.as_deref(),
                    !json,
                )
                .await
                .with_context(|| format!("debloating {image}"))?;
                summaries.push(s);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&summaries)?);
            }
            Ok(())
        }
    }
}

/// The image ID of each reference, refusing ones the node lacks.
async fn image_ids(
    cri: &CriRuntime,
    images: &[String],
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for image in images {
        let info = cri
            .status_of(image)
            .await?
            .with_context(|| format!("{image} is not on this node: pull it first"))?;
        out.insert(info.id, image.clone());
    }
    Ok(out)
}

async fn shadow(
    cri: &CriRuntime,
    images: &[String],
    duration: Option<Duration>,
    until_exit: bool,
    dir: &Path,
) -> anyhow::Result<()> {
    let wanted = image_ids(cri, images).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let deadline = duration.map(|d| tokio::time::Instant::now() + d);
    let mut live: BTreeMap<String, (String, String, Recording)> = BTreeMap::new();
    let mut done: BTreeMap<String, SavedProfile> = BTreeMap::new();
    let finish =
        |done: &mut BTreeMap<String, SavedProfile>, image_id: String, who: String, r: Recording| {
            let p = done.entry(image_id.clone()).or_default();
            p.image_id = image_id.clone();
            p.images.insert(wanted[&image_id].clone());
            p.containers.insert(who);
            p.paths.extend(r.stop());
        };
    eprintln!("shadowing {}; stop with Ctrl-C", images.join(", "));
    loop {
        let running = cri.running_containers().await?;
        let ids: BTreeSet<&str> = running.iter().map(|c| c.id.as_str()).collect();
        let gone: Vec<String> = live
            .keys()
            .filter(|k| !ids.contains(k.as_str()))
            .cloned()
            .collect();
        for id in gone {
            let (image_id, who, r) = live.remove(&id).expect("listed");
            eprintln!("  {who}: exited, {} paths", r.paths().len());
            finish(&mut done, image_id, who, r);
        }
        for c in running {
            if live.contains_key(&c.id) || !wanted.contains_key(&c.image_id) {
                continue;
            }
            let who = c.who();
            match Recording::start(c.pid) {
                Ok(r) => {
                    eprintln!("  {who}: profiling (pid {})", c.pid);
                    live.insert(c.id.clone(), (c.image_id.clone(), who, r));
                }
                Err(super::profile::ProfileError::Gone(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if until_exit && live.is_empty() && !done.is_empty() {
            break;
        }
        let tick = tokio::time::sleep(Duration::from_millis(250));
        let until = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick => {}
            _ = until => break,
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    for (_, (image_id, who, r)) in std::mem::take(&mut live) {
        finish(&mut done, image_id, who, r);
    }
    if done.is_empty() {
        bail!("no container of {} ran while shadowing", images.join(", "));
    }
    for p in done.values() {
        let path = save_profile(dir, p)?;
        println!(
            "{}\t{} containers\t{} paths\t{}",
            p.images.iter().cloned().collect::<Vec<_>>().join(","),
            p.containers.len(),
            p.paths.len(),
            path.display()
        );
    }
    Ok(())
}

/// What `baffs debloat` did to one image.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// The image debloated.
    pub image: String,
    /// The image pushed and pulled.
    pub debloated: String,
    /// Its manifest digest.
    pub digest: String,
    /// Per layer, before and after.
    pub layers: Vec<super::build::LayerStats>,
    /// Compressed bytes before.
    pub size_before: u64,
    /// Compressed bytes after.
    pub size_after: u64,
    /// Paths the profile recorded.
    pub paths_profiled: usize,
    /// Paths kept out of how many.
    pub paths_kept: usize,
    /// Paths of the original.
    pub paths_before: usize,
    /// Seconds from the start of the build to the pushed manifest.
    pub build_and_push_seconds: f64,
}

#[allow(clippy::too_many_arguments)]
async fn debloat_one(
    cri: &CriRuntime,
    image: &str,
    opts: &Options,
    suffix: &str,
    repository: Option<&str>,
    plain_http: &[String],
    auth: &RegistryAuth,
    profiles_dir: &Path,
    scratch: Option<&Path>,
    table: bool,
) -> anyhow::Result<Summary> {
    let target = baffs_name(image, suffix, repository).map_err(anyhow::Error::msg)?;
    let ids = image_ids(cri, &[image.to_string()]).await?;
    let image_id = ids.keys().next().expect("one image").clone();
    let profile = load_profile(profiles_dir, &image_id)?.with_context(|| {
        format!(
            "no profile of {image}: run `node-agent baffs shadow --images={image}` while it works"
        )
    })?;
    let job = Job {
        image,
        target: &target,
        paths: &profile.paths,
        opts,
        plain_http,
        auth,
        scratch,
    };
    // Progress goes to stderr, so it shows beside --json too.
    let summary = job.run(cri, |what| eprintln!("{what}")).await?;
    if table {
        print_table(&summary);
    }
    Ok(summary)
}

/// One debloat: `image` (on this node) filtered by `paths`, pushed as `target`.
pub struct Job<'a> {
    /// The image, as the runtime knows it.
    pub image: &'a str,
    /// Where the result goes.
    pub target: &'a Reference,
    /// The profile.
    pub paths: &'a BTreeSet<String>,
    /// `--top` and the keep-list.
    pub opts: &'a Options,
    /// Registries reached over plain HTTP.
    pub plain_http: &'a [String],
    /// Credentials for the target.
    pub auth: &'a RegistryAuth,
    /// Scratch space [default: the system's temp dir].
    pub scratch: Option<&'a Path>,
}

impl Job<'_> {
    /// Reads the image from the runtime, builds, pushes and pulls the
    /// result through CRI; says each step (with its time) to `progress`.
    pub async fn run(&self, cri: &CriRuntime, progress: impl Fn(&str)) -> anyhow::Result<Summary> {
        let reference = Reference::parse(self.image)?;
        let started = Instant::now();
        let step = |what: &str| {
            progress(&format!(
                "[{:>5.1}s] {what}",
                started.elapsed().as_secs_f64()
            ))
        };
        let scratch = match self.scratch {
            Some(d) => tempfile::TempDir::new_in(d)?,
            None => tempfile::TempDir::new()?,
        };
        step("reading the image from the runtime");
        let store = Store::new(crate::cri::unix_channel(cri.socket().to_path_buf()));
        let loaded = store.load(&reference.to_string(), scratch.path()).await?;
        step(&format!(
            "filtering {} layers against {} profiled paths",
            loaded.layers.len(),
            self.paths.len()
        ));
        let dir = scratch.path().to_path_buf();
        let paths = self.paths.clone();
        let opts = self.opts.clone();
        let built = tokio::task::spawn_blocking(move || debloat(&loaded, &paths, &opts, &dir))
            .await
            .context("the build thread failed")??;
        step(&format!("pushing {}", self.target));
        let client = berth_proto::oci::client(self.plain_http);
        let digest = push(&built, &client, self.auth, self.target).await?;
        let build_and_push = started.elapsed();
        step(&format!(
            "pushed {}: {} -> {}",
            digest,
            human_bytes(built.size_before()),
            human_bytes(built.size_after())
        ));
        step(&format!("pulling {} into the runtime", self.target));
        cri.pull(self.target, None).await?;
        Ok(Summary {
            image: reference.to_string(),
            debloated: self.target.to_string(),
            digest,
            layers: built.stats.clone(),
            size_before: built.size_before(),
            size_after: built.size_after(),
            paths_profiled: self.paths.len(),
            paths_kept: built.paths_kept,
            paths_before: built.paths_before,
            build_and_push_seconds: build_and_push.as_secs_f64(),
        })
    }
}

fn print_table(s: &Summary) {
    println!("{} -> {} ({})", s.image, s.debloated, s.digest);
    println!(
        "{:<6} {:>14} {:>14} {:>12} {:>12}",
        "LAYER", "FILES BEFORE", "FILES AFTER", "BEFORE", "AFTER"
    );
    for (i, l) in s.layers.iter().enumerate() {
        println!(
            "{:<6} {:>14} {:>14} {:>12} {:>12}",
            i,
            l.files_before,
            l.files_after,
            human_bytes(l.blob_before),
            human_bytes(l.blob_after)
        );
    }
    let pct = if s.size_before > 0 {
        100.0 * (1.0 - s.size_after as f64 / s.size_before as f64)
    } else {
        0.0
    };
    println!(
        "total: {} -> {} (-{pct:.1}%), {} of {} paths kept, built and pushed in {:.1}s",
        human_bytes(s.size_before),
        human_bytes(s.size_after),
        s.paths_kept,
        s.paths_before,
        s.build_and_push_seconds
    );
}
