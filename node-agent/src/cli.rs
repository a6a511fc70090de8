//! The `node-agent` command line: the DaemonSet's `run`, and crictl-like
//! image commands for operators (`images ls|pull|rm|inspect`, `fsinfo`, `version`).

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use berth_proto::reference::Reference;
use clap::{Parser, Subcommand};

use crate::cri::{CriError, CriRuntime, find_socket};
use crate::health::{self, Health, HealthConfig};
use crate::runtime::{ImageInfo, ImageRuntime, RegistryAuth};
use crate::session::{self, SessionConfig};
use berth_proto::docker_config::DockerCredentials;

/// Berth node agent.
#[derive(Debug, Parser)]
#[command(name = "node-agent", version, about)]
pub struct Args {
    /// CRI socket of the container runtime [default: the first of the
    /// containerd and CRI-O default paths that exists].
    #[arg(long, global = true, env = "CRI_SOCKET")]
    pub cri_socket: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run as the node's agent: hold a session with the coordinator.
    Run(RunArgs),
    /// Image commands.
    #[command(subcommand)]
    Images(ImagesCommand),
    /// Image filesystem usage.
    Fsinfo {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Name and version of the runtime.
    Version,
    /// Register this host as a virtual Node and run its pods as systemd
    /// units (no kubelet needed).
    VirtualNode(crate::vnode::VirtualNodeArgs),
    /// baffs's command line: profile images' containers (`shadow`), then
    /// build, push and pull `<ref>-baffs` (`debloat`).
    #[command(subcommand)]
    Baffs(crate::debloat::cli::BaffsCommand),
    /// The node's half of ImageDebloat (the berth-debloater DaemonSet):
    /// profile and build what the coordinator's ImageDebloats ask of it.
    Debloater(crate::debloat::daemon::DebloaterArgs),
    /// Do nothing until SIGTERM or SIGINT, then exit 0: the process that
    /// keeps a ready pod sandbox of the coordinator's pool alive (Docker API
    /// containers start in it as ephemeral containers).
    Pause,
}

/// `node-agent run …`
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Coordinator URL (TLS only).
    #[arg(
        long,
        env = "BERTH_COORDINATOR",
        default_value = "https://berth-coordinator.berth-system.svc:7070"
    )]
    pub coordinator: String,
    /// CA bundle the coordinator's certificate must chain to (the
    /// ConfigMap berth-ca, key ca.crt).
    #[arg(
        long,
        env = "BERTH_CA_FILE",
        default_value = "/var/run/berth-ca/ca.crt"
    )]
    pub ca_file: PathBuf,
    /// Name to verify in the coordinator's certificate [default: the
    /// URL's host].
    #[arg(long, env = "BERTH_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// Name of this node.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Projected ServiceAccount token (audience "berth").
    #[arg(
        long,
        env = "BERTH_TOKEN_FILE",
        default_value = "/var/run/secrets/berth/token"
    )]
    pub token_file: PathBuf,
    /// How often to look for image changes.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub inventory_poll: Duration,
    /// Pulls at once on this node.
    #[arg(long, env = "BERTH_MAX_PULLS", default_value_t = 2)]
    pub max_pulls: usize,
    /// A path on the runtime's image filesystem, for the disk guard.
    #[arg(
        long,
        env = "BERTH_IMAGEFS_PATH",
        default_value = "/var/lib/containerd"
    )]
    pub imagefs_path: PathBuf,
    /// Refuse pulls that would bring the image filesystem's use to this
    /// percentage, counted as the kubelet's image GC counts it (reserved
    /// blocks as used; the kubelet's imageGCHighThresholdPercent is 85).
    #[arg(long, env = "BERTH_DISK_THRESHOLD", default_value_t = 85.0)]
    pub disk_threshold: f64,
    /// Where the agent remembers which images it pulled (survives restarts).
    #[arg(long, env = "BERTH_STATE_DIR", default_value = "/var/lib/berth")]
    pub state_dir: PathBuf,
    /// Address of the kubelet's probes: `GET /readyz` (the runtime answers)
    /// and `GET /healthz` (it has not been away longer than the threshold).
    #[arg(long, env = "BERTH_HEALTH_LISTEN", default_value = "0.0.0.0:7072")]
    pub health_listen: SocketAddr,
    /// How often the agent asks the runtime for its version, for the probes.
    #[arg(long, env = "BERTH_RUNTIME_PROBE_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub runtime_probe_interval: Duration,
    /// How long the runtime may be unreachable before `/healthz` fails and the
    /// kubelet restarts the agent (a backstop: the agent reconnects by itself).
    #[arg(long, env = "BERTH_RUNTIME_LIVENESS_THRESHOLD", default_value = "60s", value_parser = humantime::parse_duration)]
    pub runtime_liveness_threshold: Duration,
}

/// `node-agent images …`
#[derive(Debug, Subcommand)]
pub enum ImagesCommand {
    /// List images.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Print image IDs only.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Pull an image, showing elapsed time while it runs.
    Pull {
        /// Image reference, e.g. `registry:5000/app:1.2`.
        reference: String,
        /// Registry user name.
        #[arg(long, requires = "password_stdin")]
        username: Option<String>,
        /// Read the registry password from standard input.
        #[arg(long, requires = "username")]
        password_stdin: bool,
        /// Docker config file with credentials (e.g. a Secret's .dockerconfigjson).
        #[arg(long, conflicts_with = "username")]
        auth_file: Option<String>,
        /// Give up after this long.
        #[arg(long, default_value_t = berth_proto::DEFAULT_PULL_TIMEOUT.into())]
        timeout: humantime::Duration,
    },
    /// Remove images.
    Rm {
        /// Image references or IDs.
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Show one image as JSON.
    Inspect {
        /// Image reference or ID.
        image: String,
    },
}

/// Runs the parsed command line.
pub async fn main(args: Args) -> anyhow::Result<()> {
    if matches!(
        args.command,
        Command::Run(_) | Command::VirtualNode(_) | Command::Debloater(_)
    ) {
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info".into()),
            )
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .init();
    }
    // No runtime needed: a pool sandbox has no CRI socket.
    if let Command::Pause = args.command {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        return Ok(());
    }
    // A systemd node has no container runtime either.
    if let Command::VirtualNode(v) = args.command {
        return crate::vnode::run(v).await;
    }
    let socket = find_socket(args.cri_socket.as_deref())?;
    if let Command::Run(run) = args.command {
        return agent(socket, run).await;
    }
    let cri = CriRuntime::connect(&socket).await?;
    match args.command {
        Command::Run(_) | Command::Pause | Command::VirtualNode(_) => {
            unreachable!("handled above")
        }
        Command::Version => {
            let v = cri.version().await?;
            println!(
                "{} {} (CRI {}) at {}",
                v.name,
                v.version,
                v.api_version,
                socket.display()
            );
            Ok(())
        }
        Command::Fsinfo { json } => {
            let fs = cri.fs_info().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&fs)?);
            } else {
                println!(
                    "{}\t{} used\t{} inodes",
                    fs.mountpoint,
                    human_bytes(fs.used_bytes),
                    fs.inodes_used
                );
            }
            Ok(())
        }
        Command::Images(cmd) => images(&cri, cmd).await,
        Command::Baffs(cmd) => crate::debloat::cli::run(&cri, cmd).await,
        Command::Debloater(a) => crate::debloat::daemon::run(cri, a).await,
    }
}

/// `node-agent run`: the health monitor and endpoint, the task runner, and
/// the coordinator session, all on one reconnecting CRI client. A runtime
/// that is not up yet (or restarting) is waited for, not fatal.
async fn agent(socket: PathBuf, run: RunArgs) -> anyhow::Result<()> {
    let cri = match CriRuntime::connect(&socket).await {
        Ok(cri) => {
            let v = cri.version().await?;
            tracing::info!(runtime = %v.name, version = %v.version, socket = %socket.display(), "connected to runtime");
            cri
        }
        Err(e) if e.is_unavailable() => {
            tracing::warn!(error = %e, "container runtime not reachable yet; waiting for it");
            CriRuntime::lazy(&socket)
        }
        Err(e) => return Err(e.into()),
    };
    let cri = Arc::new(cri);
    let health = Health::new(HealthConfig {
        interval: run.runtime_probe_interval,
        liveness_threshold: run.runtime_liveness_threshold,
    });
    let listener = tokio::net::TcpListener::bind(run.health_listen)
        .await
        .with_context(|| format!("binding the health endpoint {}", run.health_listen))?;
    tracing::info!(addr = %run.health_listen, "health endpoint: /readyz, /healthz");
    tokio::spawn(health::monitor(cri.clone(), health.clone()));
    let served = health.clone();
    tokio::spawn(async move {
        if let Err(e) = health::serve(listener, served).await {
            tracing::error!(error = %e, "health endpoint failed; the kubelet's probes will fail");
        }
    });
    let cfg = SessionConfig {
        coordinator: run.coordinator,
        ca_file: run.ca_file,
        tls_server_name: run.tls_server_name,
        node_name: run.node_name.clone(),
        token_file: run.token_file,
        socket: socket.display().to_string(),
        inventory_poll: run.inventory_poll,
    };
    if let Err(e) = std::fs::create_dir_all(&run.state_dir) {
        tracing::warn!(dir = %run.state_dir.display(), error = %e, "no state directory; managed images are forgotten on restart");
    }
    let managed = crate::tasks::Managed::load(Some(run.state_dir));
    let (runner, updates) =
        crate::tasks::TaskRunner::new(cri, &run.node_name, run.max_pulls, managed);
    let runner = runner
        .with_disk_guard(crate::disk::DiskGuard::new(
            run.imagefs_path,
            run.disk_threshold,
        ))
        .with_runtime_socket(socket.clone());
    session::run_while_reachable(runner, updates, cfg, health.reachable()).await;
    Ok(())
}

async fn images(cri: &CriRuntime, cmd: ImagesCommand) -> anyhow::Result<()> {
    match cmd {
        ImagesCommand::Ls { json, quiet } => {
            let mut images = cri.list_images().await?;
            images.sort_by(|a, b| a.repo_tags.cmp(&b.repo_tags).then(a.id.cmp(&b.id)));
            let mut out = std::io::stdout().lock();
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&images)?)?;
            } else if quiet {
                for i in &images {
                    writeln!(out, "{}", i.id)?;
                }
            } else {
                writeln!(out, "{:<60} {:<19} {:>10}", "IMAGE", "ID", "SIZE")?;
                for i in &images {
                    writeln!(
                        out,
                        "{:<60} {:<19} {:>10}",
                        display_name(i),
                        short_id(&i.id),
                        human_bytes(i.size_bytes)
                    )?;
                }
            }
            Ok(())
        }
        ImagesCommand::Pull {
            reference,
            username,
            password_stdin,
            auth_file,
            timeout,
        } => {
            let r = Reference::parse(&reference)?;
            let auth = match (username, password_stdin, auth_file) {
                (Some(username), true, _) => {
                    let mut password = String::new();
                    std::io::stdin()
                        .read_line(&mut password)
                        .context("reading password from stdin")?;
                    Some(RegistryAuth {
                        username,
                        password: password.trim_end().to_string(),
                    })
                }
                (_, _, Some(file)) => {
                    let creds = DockerCredentials::load(&file)?;
                    match creds.for_reference(&r) {
                        Some(a) => Some(a.clone()),
                        None => bail!("{file} has no credentials for registry {}", r.domain),
                    }
                }
                _ => None,
            };
            let id = with_progress(
                &format!("pulling {r}"),
                cri.pull_with_timeout(&r, auth.as_ref(), timeout.into()),
            )
            .await?;
            println!("{id}");
            Ok(())
        }
        ImagesCommand::Rm { images } => {
            let mut failed = 0;
            for image in images {
                match remove_one(cri, &image).await {
                    Ok(id) => println!("removed {image} ({})", short_id(&id)),
                    Err(e) => {
                        eprintln!("error: {e}");
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} image(s) not removed");
            }
            Ok(())
        }
        ImagesCommand::Inspect { image } => {
            let info = resolve(cri, &image).await?;
            println!("{}", serde_json::to_string_pretty(&info)?);
            Ok(())
        }
    }
}

/// Finds an image by ID or by reference; a reference is validated first.
async fn resolve(cri: &CriRuntime, image: &str) -> Result<ImageInfo, CriError> {
    let key = if looks_like_id(image) {
        image.to_string()
    } else {
        Reference::parse(image)?.to_string()
    };
    cri.status_of(&key).await?.ok_or(CriError::ImageNotFound {
        reference: image.to_string(),
    })
}

async fn remove_one(cri: &CriRuntime, image: &str) -> Result<String, CriError> {
    let info = resolve(cri, image).await?;
    cri.remove(&info.id).await?;
    Ok(info.id)
}

fn looks_like_id(s: &str) -> bool {
    let hex = s.strip_prefix("sha256:").unwrap_or(s);
    hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit())
}

/// Awaits `fut` while printing the elapsed time on stderr: rewritten in place
/// on a terminal, one line every 5 s otherwise.
async fn with_progress<T, E>(what: &str, fut: impl Future<Output = Result<T, E>>) -> Result<T, E> {
    let start = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let every = if tty {
        Duration::from_millis(100)
    } else {
        Duration::from_secs(5)
    };
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tokio::pin!(fut);
    let result = loop {
        tokio::select! {
            r = &mut fut => break r,
            _ = tick.tick() => {
                let secs = start.elapsed().as_secs_f64();
                if tty { eprint!("\r{what} … {secs:.1}s") } else { eprintln!("{what} … {secs:.0}s") }
            }
        }
    };
    let secs = start.elapsed().as_secs_f64();
    let outcome = if result.is_ok() { "done" } else { "failed" };
    if tty {
        eprintln!("\r{what} … {outcome} in {secs:.2}s");
    } else {
        eprintln!("{what} … {outcome} in {secs:.2}s");
    }
    result
}

fn display_name(i: &ImageInfo) -> String {
    i.repo_tags
        .first()
        .or(i.repo_digests.first())
        .cloned()
        .unwrap_or_else(|| "<none>".into())
}

fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    &hex[..hex.len().min(12)]
}

/// `1536` → `1.5 KiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
