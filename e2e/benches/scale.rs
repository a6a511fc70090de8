//! Benchmark: the real coordinator (as installed, the leading replica)
//! against 1000 and then 5000 simulated agents, each time one ImageCache of 20
//! images over every simulated node.
//!
//! Each simulated agent is the node agent's own session and task code over an
//! in-memory runtime. Each has a Node object in the real apiserver (labelled
//! `berth.dev/agent=disabled`, so the DaemonSet leaves it alone), a Pod of the
//! agent ServiceAccount bound to that node, and a token bound to that Pod, so
//! the coordinator authenticates it exactly as a real agent (TokenReview, then
//! the Pod's node). Agents dial the leader's pod IP (the host routes to pod
//! subnets) over TLS, trusting the CA bundle in the ConfigMap berth-ca and
//! checking the Service's name in the certificate, as real agents do.
//!
//! Figures are taken where they land, not from Berth's own counters: the
//! coordinator's requests from the apiserver's audit log (every request of
//! its ServiceAccount, by verb and resource — TokenReviews and
//! SubjectAccessReviews included), its memory from its container's cgroup
//! (peak, reset before each size). A figure that cannot be measured fails the
//! benchmark. Each size prints time to connect and to converge, the
//! apiserver writes of each phase and the peak memory; then how each grows
//! from the first size to the second.
//!
//! All simulated agents dial from this host's one address, while the
//! coordinator caps connections per source IP (`BERTH_MAX_CONNECTIONS_PER_IP`,
//! 1024: real agents each have their own pod IP). When the largest size does
//! not fit under the installed caps, the benchmark raises them on the
//! Deployment for its run (a rollout; the new leader is measured) and puts
//! the installed values back at the end.
//!
//! `cargo bench -p berth-e2e --bench scale`; `BERTH_SCALE_AGENTS` lists the
//! sizes (default `1000,2000`; `1000,5000` exceeds this 2-core machine's
//! limits today, see the README).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use berth_coordinator::imagecache::crd::ImageCache;
use berth_e2e::bench::{Goal, report, watch_until};
use berth_e2e::{Cluster, NAMESPACE, eventually};
use berth_node_agent::runtime::MemRuntime;
use berth_node_agent::session::{self, SessionConfig};
use berth_node_agent::tasks::{Managed, TaskRunner};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, PostParams};

const IMAGES: usize = 20;
const LABEL: &str = "berth.dev/simulated";
const COORDINATOR_USER: &str = "system:serviceaccount:berth-system:berth-coordinator";

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or_default()
}

fn scrape(addr: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr)?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut out = String::new();
    conn.read_to_string(&mut out)?;
    Ok(out)
}

/// The apiserver's audit log of the coordinator's requests, read from an offset.
struct Audit {
    path: PathBuf,
}

impl Audit {
    fn mark(&self) -> anyhow::Result<u64> {
        Ok(std::fs::metadata(&self.path)
            .with_context(|| format!("audit log {}", self.path.display()))?
            .len())
    }

    /// The coordinator's completed requests since `from`, by `verb resource`.
    fn since(&self, from: u64) -> anyhow::Result<BTreeMap<String, u64>> {
        use std::io::{Read, Seek};
        let mut f = std::fs::File::open(&self.path)?;
        f.seek(std::io::SeekFrom::Start(from))?;
        let mut text = String::new();
        f.read_to_string(&mut text)?;
        let mut out = BTreeMap::new();
        for line in text.lines() {
            let Ok(ev) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if ev["stage"] != "ResponseComplete" || ev["user"]["username"] != COORDINATOR_USER {
                continue;
            }
            let resource = match ev["objectRef"]["subresource"].as_str() {
                Some(sub) => format!(
                    "{}/{sub}",
                    ev["objectRef"]["resource"].as_str().unwrap_or("?")
                ),
                None => ev["objectRef"]["resource"]
                    .as_str()
                    .unwrap_or("?")
                    .to_string(),
            };
            let verb = ev["verb"].as_str().unwrap_or("?");
            *out.entry(format!("{verb} {resource}")).or_default() += 1;
        }
        Ok(out)
    }
}

/// Requests that change something (TokenReviews and SubjectAccessReviews are
/// creates, so they count).
fn writes(by: &BTreeMap<String, u64>) -> u64 {
    by.iter()
        .filter(|(k, _)| {
            ["create", "update", "patch", "delete", "deletecollection"]
                .iter()
                .any(|v| k.starts_with(&format!("{v} ")))
        })
        .map(|(_, n)| n)
        .sum()
}

/// The memory cgroup of the coordinator container of pod `uid` (cgroup v1).
fn coordinator_cgroup(uid: &str) -> anyhow::Result<PathBuf> {
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if !cmd.starts_with(b"/usr/local/bin/coordinator") {
            continue;
        }
        let cgroups = std::fs::read_to_string(entry.path().join("cgroup")).unwrap_or_default();
        for l in cgroups.lines() {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
            let (Some(controllers), Some(path)) = (controllers, path) else {
                continue;
            };
            if controllers.split(',').any(|c| c == "memory") && path.contains(uid) {
                return Ok(
                    PathBuf::from("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'))
                );
            }
        }
    }
    bail!("no coordinator process of pod {uid} with a cgroup v1 memory controller")
}

/// The cgroup's peak memory in MB since the last [`reset_peak`].
fn peak_mb(cgroup: &std::path::Path) -> anyhow::Result<f64> {
    let f = cgroup.join("memory.max_usage_in_bytes");
    let bytes: f64 = std::fs::read_to_string(&f)
        .with_context(|| format!("reading {}", f.display()))?
        .trim()
        .parse()?;
    Ok(bytes / (1 << 20) as f64)
}

fn reset_peak(cgroup: &std::path::Path) -> anyhow::Result<()> {
    let f = cgroup.join("memory.max_usage_in_bytes");
    std::fs::write(&f, "0").with_context(|| format!("resetting {}", f.display()))
}

async fn cleanup(c: &Cluster) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(c.client.clone());
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), NAMESPACE);
    let lp = ListParams::default().labels(&format!("{LABEL}=yes"));
    pods.delete_collection(&DeleteParams::default().grace_period(0), &lp)
        .await?;
    nodes
        .delete_collection(&DeleteParams::default(), &lp)
        .await?;
    Ok(())
}

/// Node, bound Pod and token for each of `names`; returns the token files.
async fn make_agents(
    c: &Cluster,
    names: Vec<String>,
    dir: &std::path::Path,
) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let nodes: Api<Node> = Api::all(c.client.clone());
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), NAMESPACE);
    let sas: Api<ServiceAccount> = Api::namespaced(c.client.clone(), NAMESPACE);
    futures::stream::iter(names)
        .map(|name| {
            let (nodes, pods, sas) = (nodes.clone(), pods.clone(), sas.clone());
            async move {
                let node: Node = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name, "labels": {LABEL: "yes", "berth.dev/agent": "disabled"}}
                }))?;
                nodes.create(&PostParams::default(), &node).await?;
                let pod: Pod = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": format!("agent-{name}"), "labels": {LABEL: "yes"}},
                    "spec": {
                        "nodeName": name,
                        "serviceAccountName": "berth-node-agent",
                        "automountServiceAccountToken": false,
                        "tolerations": [{"operator": "Exists"}],
                        "containers": [{"name": "sim", "image": "simulated.invalid/agent:0"}]
                    }
                }))?;
                let pod = pods.create(&PostParams::default(), &pod).await?;
                let req = TokenRequest {
                    spec: TokenRequestSpec {
                        audiences: vec!["berth".into()],
                        bound_object_ref: Some(BoundObjectReference {
                            api_version: Some("v1".into()),
                            kind: Some("Pod".into()),
                            name: pod.metadata.name.clone(),
                            uid: pod.metadata.uid.clone(),
                        }),
                        expiration_seconds: Some(3600),
                    },
                    ..Default::default()
                };
                let token = sas
                    .create_token_request("berth-node-agent", &PostParams::default(), &req)
                    .await?
                    .status
                    .map(|s| s.token)
                    .unwrap_or_default();
                let file = dir.join(&name);
                std::fs::write(&file, token)?;
                anyhow::Ok((name, file))
            }
        })
        .buffer_unordered(16)
        .try_collect()
        .await
}

/// Starts one simulated agent per token, each holding `images`, dialing
/// `coordinator` over TLS and trusting `ca_file`.
fn start_agents(
    coordinator: &str,
    ca_file: &std::path::Path,
    tokens: Vec<(String, PathBuf)>,
    images: &[String],
) {
    for (name, token_file) in tokens {
        let rt = MemRuntime::default();
        for i in images {
            rt.publish(i, 10 << 20);
        }
        let (runner, updates) = TaskRunner::new(Arc::new(rt), &name, 2, Managed::load(None));
        let cfg = SessionConfig {
            coordinator: format!("https://{coordinator}:7070"),
            ca_file: ca_file.to_path_buf(),
            // Dialed by pod IP; the certificate names the Service.
            tls_server_name: Some(berth_e2e::COORDINATOR_NAME.into()),
            node_name: name,
            token_file,
            socket: "memory".into(),
            inventory_poll: Duration::from_secs(2),
        };
        tokio::spawn(session::run(runner, updates, cfg));
    }
}

/// Connections the host needs beyond the simulated agents' (the real
/// agents do not count: they dial from their own pod IPs).
const CAP_SLACK: usize = 64;

/// Sets the coordinator Deployment's env `vars` (`NAME=value`, or `NAME-` to
/// unset) and waits for the rollout.
fn set_coordinator_env(c: &Cluster, vars: &[String]) -> anyhow::Result<()> {
    let mut args = vec!["-n", NAMESPACE, "set", "env", "deploy/berth-coordinator"];
    args.extend(vars.iter().map(String::as_str));
    c.kubectl(&args)?;
    c.kubectl(&[
        "-n",
        NAMESPACE,
        "rollout",
        "status",
        "deploy/berth-coordinator",
        "--timeout=300s",
    ])?;
    Ok(())
}

/// Raises the coordinator's connection caps so `agents` fit from one
/// address; returns the env changes that restore the installed values
/// (empty when nothing had to change).
fn fit_caps(c: &Cluster, agents: usize) -> anyhow::Result<Vec<String>> {
    let defaults = berth_coordinator::server::Limits::default().connections;
    let need = agents + CAP_SLACK;
    let mut raise = Vec::new();
    let mut restore = Vec::new();
    for (name, default) in [
        ("BERTH_MAX_CONNECTIONS", defaults.max_connections),
        ("BERTH_MAX_CONNECTIONS_PER_IP", defaults.max_per_ip),
    ] {
        let installed = c.coordinator_env(name)?;
        let cap = match &installed {
            Some(v) => v.parse().with_context(|| format!("{name}={v}"))?,
            None => default,
        };
        if cap < need {
            raise.push(format!("{name}={need}"));
            restore.push(match installed {
                Some(v) => format!("{name}={v}"),
                None => format!("{name}-"),
            });
        }
    }
    if !raise.is_empty() {
        println!(
            "setup: {agents} agents from one address; raising {} for this run",
            raise.join(" ")
        );
        set_coordinator_env(c, &raise)?;
    }
    Ok(restore)
}

/// What one size measured.
struct Run {
    agents: usize,
    converge: Duration,
    writes: u64,
    peak_mb: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let sizes: Vec<usize> = std::env::var("BERTH_SCALE_AGENTS")
        .unwrap_or_else(|_| "1000,2000".into())
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()
        .context("BERTH_SCALE_AGENTS: comma-separated agent counts")?;
    anyhow::ensure!(
        sizes.windows(2).all(|w| w[0] < w[1]),
        "BERTH_SCALE_AGENTS must grow"
    );
    let c = Cluster::from_env().await?;
    anyhow::ensure!(
        c.local,
        "the scale benchmark needs the local cluster (pod IPs routed to the host)"
    );
    let audit = Audit {
        path: PathBuf::from(c.var("BERTH_AUDIT_LOG")),
    };
    anyhow::ensure!(
        !c.var("BERTH_AUDIT_LOG").is_empty(),
        "the cluster's env has no BERTH_AUDIT_LOG (bring it up with this e2e/cluster.sh)"
    );
    cleanup(&c).await?;
    let restore = fit_caps(&c, *sizes.last().unwrap_or(&0))?;
    let outcome = run(&c, &sizes, &audit).await;
    if !restore.is_empty() {
        println!("restoring {}", restore.join(" "));
        set_coordinator_env(&c, &restore)?;
    }
    outcome
}

/// The images of the cache of round `round`.
fn round_images(round: usize) -> Vec<String> {
    (0..IMAGES)
        .map(|i| format!("bench.invalid/r{round}/img{i:02}:1"))
        .collect()
}

/// Fails once the Lease names another holder than `leader`: the simulated
/// agents dial the leader's pod IP, so figures after a takeover mean nothing.
async fn same_leader(c: &Cluster, leader: &str) -> anyhow::Result<()> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(c.client.clone(), NAMESPACE);
    let holder = leases
        .get("berth-coordinator")
        .await?
        .spec
        .and_then(|s| s.holder_identity)
        .unwrap_or_default();
    if holder != leader {
        bail!(
            "the Lease moved from {leader} to {holder:?} during the benchmark; its figures would mix two coordinators"
        );
    }
    Ok(())
}

/// Returns (as an error) once the Lease leaves `leader`.
async fn leader_lost(c: &Cluster, leader: &str) -> anyhow::Error {
    loop {
        if let Err(e) = same_leader(c, leader).await {
            return e;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Every size, against the leader as it is now.
async fn run(c: &Cluster, sizes: &[usize], audit: &Audit) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), NAMESPACE);
    // After a rollout the new pods take a moment to elect and label.
    // After a rollout the new pods take a moment to elect and label, and the
    // old leader may still carry the label while it terminates: the leader
    // is the live pod the Lease names, with a running coordinator process.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(c.client.clone(), NAMESPACE);
    let (leader, cgroup) = eventually(
        Duration::from_secs(180),
        "the leading coordinator pod, running",
        || async {
            let holder = leases
                .get("berth-coordinator")
                .await?
                .spec
                .and_then(|s| s.holder_identity)
                .unwrap_or_default();
            let Some(pod) = pods.get_opt(&holder).await? else {
                return Ok(None);
            };
            let live = pod.metadata.deletion_timestamp.is_none()
                && pod.status.as_ref().is_some_and(|s| s.pod_ip.is_some());
            if !live {
                return Ok(None);
            }
            let cgroup = coordinator_cgroup(pod.metadata.uid.as_deref().unwrap_or_default())?;
            Ok(Some((pod, cgroup)))
        },
    )
    .await?;
    let leader_name = leader.metadata.name.clone().unwrap_or_default();
    let coordinator = leader
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .unwrap_or_default();
    let metrics_addr = format!("{coordinator}:9090");
    // The agents trust the CA the coordinator publishes, as real agents do.
    let ca_file = c.ca_file().await?;
    let dir = std::env::temp_dir().join(format!("berth-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ns = format!("bench-scale-{}", berth_e2e::registry::unique_suffix());
    c.kubectl(&["create", "namespace", &ns])?;
    let caches: Api<ImageCache> = Api::namespaced(c.client.clone(), &ns);

    let mut runs: Vec<Run> = Vec::new();
    let mut started = 0;
    for (round, &agents) in sizes.iter().enumerate() {
        // The agents of the earlier size stay; this size adds the rest.
        let t = Instant::now();
        let names: Vec<String> = (started..agents).map(|i| format!("sim-{i:05}")).collect();
        let tokens = make_agents(c, names, &dir).await?;
        println!(
            "setup: {} more nodes, pods and tokens in {:.1} s",
            agents - started,
            t.elapsed().as_secs_f64()
        );
        let images = round_images(round);
        // Every agent's in-memory registry offers the images of every round,
        // so agents started for an earlier size can pull this size's too.
        let offered: Vec<String> = (0..sizes.len()).flat_map(round_images).collect();
        reset_peak(&cgroup)?;
        let connect_mark = audit.mark()?;
        let t = Instant::now();
        start_agents(&coordinator, &ca_file, tokens, &offered);
        let deadline = Instant::now() + Duration::from_secs(900);
        loop {
            same_leader(c, &leader_name).await?;
            let connected = scrape(&metrics_addr)
                .map(|text| metric(&text, "berth_agents_connected") as usize)
                .unwrap_or_default();
            if connected >= agents + c.nodes.len() {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "only {connected} of {} agents connected after 15 min",
                agents + c.nodes.len()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let connect = t.elapsed();
        let connect_reqs = audit.since(connect_mark)?;

        let converge_mark = audit.mark()?;
        let name = format!("scale-{agents}");
        let cache: ImageCache = serde_json::from_value(serde_json::json!({
            "apiVersion": "berth.dev/v1alpha1",
            "kind": "ImageCache",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "images": images.iter().map(|i| serde_json::json!({"ref": i})).collect::<Vec<_>>(),
                "nodeSelector": {"matchLabels": {LABEL: "yes"}},
                "deletionPolicy": "Retain",
            },
        }))?;
        let t = Instant::now();
        caches.create(&PostParams::default(), &cache).await?;
        let want = agents as u32;
        let ready = watch_until(&caches, &name, Duration::from_secs(900), |ic| {
            ic.status
                .as_ref()
                .is_some_and(|s| s.phase == "Ready" && s.nodes.ready == want)
        });
        let (_, at) = tokio::select! {
            r = ready => r?,
            e = leader_lost(c, &leader_name) => return Err(e),
        };
        let converge = at - t;
        let converge_reqs = audit.since(converge_mark)?;
        let peak = peak_mb(&cgroup)?;

        println!("{agents} simulated agents, an ImageCache of {IMAGES} images on each:");
        for (phase, by) in [("connect", &connect_reqs), ("converge", &converge_reqs)] {
            let listed: Vec<String> = by.iter().map(|(k, n)| format!("{k}={n}")).collect();
            println!("  coordinator requests while {phase}: {}", listed.join(" "));
        }
        let n = agents;
        report(
            &format!("scale.{n}.connect"),
            connect.as_secs_f64(),
            "s",
            Goal::Baseline,
        )?;
        report(
            &format!("scale.{n}.connect.apiserver_writes"),
            writes(&connect_reqs) as f64,
            "requests",
            Goal::AtMost(1.2 * (agents - started) as f64),
        )?;
        report(
            &format!("scale.{n}.converge"),
            converge.as_secs_f64(),
            "s",
            Goal::AtMost(10.0 * agents as f64 / 1000.0),
        )?;
        report(
            &format!("scale.{n}.converge.apiserver_writes"),
            writes(&converge_reqs) as f64,
            "requests",
            Goal::AtMost(200.0),
        )?;
        report(
            &format!("scale.{n}.coordinator_peak_memory"),
            peak,
            "MB",
            Goal::AtMost(if agents <= 1000 { 300.0 } else { 480.0 }),
        )?;
        runs.push(Run {
            agents,
            converge,
            writes: writes(&converge_reqs),
            peak_mb: peak,
        });
        started = agents;
    }
    if let [first, .., last] = &runs[..] {
        let nodes = last.agents as f64 / first.agents as f64;
        println!(
            "growth from {} to {} agents ({nodes:.0}x the nodes):",
            first.agents, last.agents
        );
        // Linear in nodes or better is the goal for time and memory; writes
        // should not follow the node count at all.
        report(
            "scale.growth.converge",
            last.converge.as_secs_f64() / first.converge.as_secs_f64(),
            "x",
            Goal::AtMost(nodes),
        )?;
        report(
            "scale.growth.converge_writes",
            last.writes as f64 / first.writes.max(1) as f64,
            "x",
            Goal::AtMost(2.0),
        )?;
        report(
            "scale.growth.peak_memory",
            last.peak_mb / first.peak_mb,
            "x",
            Goal::AtMost(nodes),
        )?;
    }
    let _ = c.kubectl(&["delete", "namespace", &ns, "--wait=false"]);
    cleanup(c).await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
