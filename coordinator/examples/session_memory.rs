//! How much memory the coordinator holds per agent session, measured
//! in-process, without a cluster.
//!
//! The example runs itself twice. The child (`session_memory serve`) is the
//! coordinator's main port as production runs it: TLS with a generated
//! certificate, the real [`AgentSessions`] behind the real listener caps, a
//! [`NodeRegistry`], and an in-memory token verifier (agents present
//! `agent.<node>.sig`). Beside it runs a stand-in for the ImageCache
//! controller: the same pure planner ([`plan::actions`], [`plan::status`],
//! [`PassDetail`]) over the registry, woken as the real one is, its pulls
//! dispatched to the sessions; only the apiserver is missing. The parent
//! starts simulated agents in batches (the node agent's own session code
//! over an in-memory runtime, as `e2e/benches/scale.rs` does), all at once
//! per batch like the benchmark's connect storm, then creates one cache of
//! 20 images over every node and waits for every node to hold them.
//!
//! After each size it prints the child's resident memory now (`VmRSS`) and
//! at its peak (`VmHWM`), so the growth per session can be read off.
//!
//! `cargo run --release -p berth-coordinator --example session_memory --
//! 500,1000,2000,5000`; set `SESSION_MEMORY_NO_PLAN=1` to leave the planner
//! out (sessions only). The parent and child share the open-file limit's
//! hard value, which must exceed the largest size plus a few hundred.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_coordinator::access::{AccessError, Caller, ResourceAccess, Reviewer, TokenVerdict};
use berth_coordinator::auth::{AgentIdentity, AuthError, TokenIdentity, TokenVerifier};
use berth_coordinator::domain::{CacheDetails, TaskRecord};
use berth_coordinator::imagecache::detail::PassDetail;
use berth_coordinator::imagecache::plan::{self, Action, CacheView, NodeView, WantedImage};
use berth_coordinator::nodes::NodeRegistry;
use berth_coordinator::server::{self, Services};
use berth_coordinator::session::SessionLimits;
use berth_coordinator::tls::{TlsAcceptor, certs};
use berth_coordinator::{limits, listener};
use berth_proto::agent as pb;
use berth_proto::reference::Reference;

const IMAGES: usize = 20;

/// Agents present `agent.<node>.sig`: the pod `agent-<node>` on `<node>`.
struct Agents;

impl TokenVerifier for Agents {
    async fn review(&self, token: &str) -> Result<TokenIdentity, AuthError> {
        match token.split('.').collect::<Vec<_>>().as_slice() {
            ["agent", node, "sig"] => Ok(TokenIdentity {
                pod: format!("agent-{node}"),
                pod_uid: "uid".into(),
                node: Some(node.to_string()),
            }),
            _ => Err(AuthError::Rejected("not an agent's token".into())),
        }
    }

    async fn check_node(&self, t: &TokenIdentity, node: &str) -> Result<AgentIdentity, AuthError> {
        match t.node.as_deref() == Some(node) {
            true => Ok(AgentIdentity {
                node: node.into(),
                pod: t.pod.clone(),
            }),
            false => Err(AuthError::Rejected("not this node's token".into())),
        }
    }
}

/// Nobody may use the public API here.
struct Nobody;

impl Reviewer for Nobody {
    async fn review_token(&self, _: &str) -> Result<TokenVerdict, AccessError> {
        Ok(TokenVerdict::Invalid("no API callers here".into()))
    }
    async fn review_access(&self, _: &Caller, _: &ResourceAccess) -> Result<bool, AccessError> {
        Ok(false)
    }
}

fn round_images(round: usize) -> Vec<String> {
    (0..IMAGES)
        .map(|i| format!("bench.invalid/r{round}/img{i:02}:1"))
        .collect()
}

fn node_name(i: usize) -> String {
    format!("sim-{i:05}")
}

/// `VmRSS` and `VmHWM` of `pid`, in MiB.
fn memory_of(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let nofile = limits::raise_nofile()?;
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("serve") => serve(&args.next().expect("serve CA_FILE")),
        sizes => drive(sizes.unwrap_or("500,1000,2000,5000"), nofile),
    }
}

/// The child: the main port and the stand-in controller, commanded on stdin
/// (`nodes N`: the cluster has N nodes; `cache R`: create round R's cache),
/// reporting on stdout once every 250 ms.
#[tokio::main]
async fn serve(ca_file: &str) -> anyhow::Result<()> {
    let material = certs::generate("berth-system")?;
    std::fs::write(ca_file, &material.ca_pem)?;
    let acceptor = TlsAcceptor::from_material(&material)?;
    let listener = server::bind("127.0.0.1:0".parse()?).await?;
    let addr = listener.local_addr()?;
    let registry = Arc::new(NodeRegistry::default());
    let (_stop, stopping) = tokio::sync::watch::channel(false);
    let services = Services {
        registry: registry.clone(),
        details: CacheDetails::default(),
        verifier: Arc::new(Agents),
        reviewer: Nobody,
        health: tonic_health::server::HealthReporter::new(),
        leading: tokio::sync::watch::channel(true).1,
        containers: None,
    };
    // Every simulated agent dials from 127.0.0.1.
    let limits = server::Limits {
        connections: listener::Limits {
            max_connections: 8192,
            max_per_ip: 8192,
            ..server::Limits::default().connections
        },
        sessions: SessionLimits::default(),
    };
    tokio::spawn(server::serve_with(
        listener, acceptor, limits, services, stopping,
    ));
    let nodes = Arc::new(AtomicUsize::new(0));
    let caches = Arc::new(Mutex::new(Vec::<CacheView>::new()));
    let ready = Arc::new(AtomicUsize::new(0));
    let passes = Arc::new(AtomicU64::new(0));
    if std::env::var_os("SESSION_MEMORY_NO_PLAN").is_none() {
        tokio::spawn(planner(
            registry.clone(),
            nodes.clone(),
            caches.clone(),
            ready.clone(),
            passes.clone(),
        ));
    }
    println!("listening {addr}");
    let mut lines = BufReader::new(std::io::stdin()).lines();
    let (nodes_in, caches_in) = (nodes.clone(), caches.clone());
    std::thread::spawn(move || {
        while let Some(Ok(line)) = lines.next() {
            match line.split_once(' ') {
                Some(("nodes", n)) => nodes_in.store(n.parse().unwrap(), Ordering::SeqCst),
                Some(("cache", r)) => {
                    let round: usize = r.parse().unwrap();
                    caches_in.lock().unwrap().push(CacheView {
                        key: format!("bench/scale-{round}"),
                        images: round_images(round)
                            .iter()
                            .map(|i| WantedImage {
                                reference: Reference::parse(i).unwrap().identity(),
                                timeout: Duration::from_secs(600),
                                pin: None,
                            })
                            .collect(),
                        max_pulls_per_node: 2,
                        ..Default::default()
                    });
                }
                _ => {}
            }
        }
        std::process::exit(0);
    });
    loop {
        let connected = berth_coordinator::metrics::METRICS.agents_connected.get();
        println!(
            "state {connected} {} {}",
            ready.load(Ordering::SeqCst),
            passes.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The ImageCache controller's pass without the apiserver: node views from
/// the registry, the planner's actions dispatched, status counts computed
/// and per-node detail published; woken by the registry, at most every
/// 50 ms, at least every 2 s.
async fn planner(
    registry: Arc<NodeRegistry>,
    nodes: Arc<AtomicUsize>,
    caches: Arc<Mutex<Vec<CacheView>>>,
    ready: Arc<AtomicUsize>,
    passes: Arc<AtomicU64>,
) {
    let wake = registry.changed();
    let mut next_task = 0u64;
    let mut details = BTreeMap::new();
    loop {
        let started = Instant::now();
        let now = Instant::now();
        let node_views: Vec<NodeView> = (0..nodes.load(Ordering::SeqCst))
            .map(|i| {
                let name = node_name(i);
                NodeView {
                    agent: registry.agent_view(&name, now),
                    labels: BTreeMap::new(),
                    name,
                }
            })
            .collect();
        let node_views = Arc::new(node_views);
        let views = caches.lock().unwrap().clone();
        for action in plan::actions(&views, &node_views) {
            let Action::Pull {
                node,
                image,
                timeout,
                ..
            } = action
            else {
                continue;
            };
            next_task += 1;
            let task = pb::Task {
                id: format!("t-{next_task}"),
                kind: Some(pb::task::Kind::Pull(pb::PullTask {
                    image: image.clone(),
                    timeout_seconds: timeout.as_secs() as u32,
                    ..Default::default()
                })),
            };
            let record = TaskRecord {
                image,
                pull: true,
                pin: None,
            };
            registry.dispatch(&node, task, record);
        }
        let mut least_ready = usize::MAX;
        for v in &views {
            least_ready = least_ready.min(plan::status(v, &node_views).nodes.ready as usize);
            let detail = PassDetail {
                view: v.clone(),
                nodes: node_views.clone(),
            };
            details.insert(v.key.clone(), detail);
        }
        ready.store(
            if views.is_empty() { 0 } else { least_ready },
            Ordering::SeqCst,
        );
        passes.fetch_add(1, Ordering::SeqCst);
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        tokio::time::sleep_until((started + Duration::from_millis(50)).into()).await;
    }
}

/// The parent: starts the child, then the agents of each size, and prints
/// the child's memory after each.
#[tokio::main]
async fn drive(sizes: &str, nofile: u64) -> anyhow::Result<()> {
    let sizes: Vec<usize> = sizes
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let largest = *sizes.iter().max().unwrap_or(&0);
    anyhow::ensure!(
        (largest as u64) + 256 < nofile,
        "the open-file limit {nofile} is too small for {largest} agents"
    );
    let dir = tempfile::tempdir()?;
    let ca_file = dir.path().join("ca.crt");
    // SESSION_MEMORY_WRAP runs the child under a tool, e.g. `heaptrack`.
    let exe = std::env::current_exe()?;
    let mut command = match std::env::var("SESSION_MEMORY_WRAP") {
        Ok(tool) => {
            let mut c = Command::new(tool);
            c.arg(exe);
            c
        }
        Err(_) => Command::new(exe),
    };
    let mut child = command
        .arg("serve")
        .arg(&ca_file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let mut commands = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = out.next().expect("the child prints its address")?;
        if let Some(a) = line.strip_prefix("listening ") {
            break a.to_string();
        }
    };
    let state = Arc::new(Mutex::new((0usize, 0usize, 0u64)));
    let state_in = state.clone();
    std::thread::spawn(move || {
        for line in out.map_while(Result::ok) {
            let f: Vec<&str> = line.split(' ').collect();
            if let ["state", c, r, p] = f.as_slice() {
                *state_in.lock().unwrap() =
                    (c.parse().unwrap(), r.parse().unwrap(), p.parse().unwrap());
            }
        }
    });
    let (rss, _) = memory_of(pid);
    println!("idle coordinator: {rss:.1} MiB resident");
    let offered: Vec<String> = (0..sizes.len()).flat_map(round_images).collect();
    let mut started = 0;
    for (round, &n) in sizes.iter().enumerate() {
        writeln!(commands, "nodes {n}")?;
        let t = Instant::now();
        for i in started..n {
            start_agent(&addr, &ca_file, dir.path(), &node_name(i), &offered)?;
        }
        wait(&state, "connected", Duration::from_secs(600), |s| s.0 >= n).await?;
        let connect = t.elapsed();
        let (rss_connected, peak_connect) = memory_of(pid);
        writeln!(commands, "cache {round}")?;
        let t = Instant::now();
        let planning = std::env::var_os("SESSION_MEMORY_NO_PLAN").is_none();
        if planning {
            wait(&state, "ready", Duration::from_secs(600), |s| s.1 >= n).await?;
        }
        let converge = t.elapsed();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (rss, peak) = memory_of(pid);
        let passes = state.lock().unwrap().2;
        println!(
            "{n} agents: connected in {:.1} s ({rss_connected:.1} MiB resident, peak {peak_connect:.1}); \
             converged in {:.1} s; now {rss:.1} MiB resident, peak {peak:.1} MiB, \
             {:.1} KiB per agent; {passes} passes so far",
            connect.as_secs_f64(),
            converge.as_secs_f64(),
            rss * 1024.0 / n as f64,
        );
        started = n;
    }
    drop(commands);
    let _ = child.wait();
    // The agents' sessions end with the process.
    std::process::exit(0)
}

async fn wait(
    state: &Mutex<(usize, usize, u64)>,
    what: &str,
    limit: Duration,
    done: impl Fn((usize, usize, u64)) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let s = *state.lock().unwrap();
        if done(s) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not {what} in time: {} connected, {} ready",
            s.0,
            s.1
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One simulated agent, as `e2e/benches/scale.rs` starts it.
fn start_agent(
    addr: &str,
    ca_file: &std::path::Path,
    dir: &std::path::Path,
    node: &str,
    offered: &[String],
) -> anyhow::Result<()> {
    use berth_node_agent::runtime::MemRuntime;
    use berth_node_agent::session::{self, SessionConfig};
    use berth_node_agent::tasks::{Managed, TaskRunner};
    let token_file = dir.join(node);
    std::fs::write(&token_file, format!("agent.{node}.sig"))?;
    let rt = MemRuntime::default();
    for i in offered {
        rt.publish(i, 10 << 20);
    }
    let (runner, updates) = TaskRunner::new(Arc::new(rt), node, 2, Managed::load(None));
    let cfg = SessionConfig {
        coordinator: format!("https://{addr}"),
        ca_file: ca_file.to_path_buf(),
        tls_server_name: Some(certs::server_name("berth-system")),
        node_name: node.into(),
        token_file,
        socket: "memory".into(),
        inventory_poll: Duration::from_secs(2),
    };
    tokio::spawn(session::run(runner, updates, cfg));
    Ok(())
}
