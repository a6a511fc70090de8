//! Floods without credentials against the installed coordinator, from the
//! host, dialling the leading coordinator's pod IP (as the scale benchmark
//! does; the leader holds the agents' sessions):
//! huge Hellos behind garbage tokens, silent TCP connections, thousands of
//! garbage-token streams on one connection. After each flood the checks come
//! from outside Berth: the pod was not restarted, its memory (cgroup v1) and
//! open files (`/proc/PID/fd`) stayed bounded and came back down, it still
//! answers `grpc.health.v1.Health/Check`, the real agents' sessions were not
//! replaced, and the apiserver's audit log counts the TokenReviews it sent.
//!
//! Needs the local cluster (pod IPs routed to the host, the coordinator's
//! process visible in the host's /proc, `BERTH_AUDIT_LOG` in the env file).
//! Run with `--test-threads=1`: each test measures the coordinator alone.
//! The TCP floods work whether port 7070 speaks TLS or not; the gRPC ones
//! dial through [`channel`]: TLS, trusting the CA in `berth-ca` and checking
//! the Service's name (the pod IP is not in the certificate). Flood traffic
//! carries garbage agent tokens; the public API calls that judge the outcome
//! carry the e2e viewer token.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use berth_e2e::{COORDINATOR_NAME, Cluster, NAMESPACE, eventually};
use berth_proto::agent as pb;
use berth_proto::agent::agent_service_client::AgentServiceClient;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// The leading coordinator's pod (it labels itself; the Service selects it).
const LEADER_LABEL: &str = "app.kubernetes.io/name=berth-coordinator,berth.dev/leader=true";
/// A token shaped like a JWT (so it reaches a TokenReview) that is no token.
const GARBAGE: &str =
    "eyJhbGciOiJSUzI1NiIsImtpZCI6ImZsb29kIn0.eyJzdWIiOiJub2JvZHkifQ.Zm9yZ2VkLXNpZ25hdHVyZQ";
/// The coordinator's memory may grow by this much during a flood (the
/// unprotected coordinator grew by 233 MB at 50 huge Hellos, and its limit
/// is 512 MiB).
const MEMORY_GROWTH_BOUND: u64 = 150 << 20;
/// Open files the coordinator may hold above its quiet level after a flood.
const FD_SLACK: usize = 64;

/// A TLS gRPC channel to the coordinator at `addr` (`IP:7070`), verifying
/// its certificate against `ca_pem` for the Service's name.
async fn channel(addr: &str, ca_pem: &str) -> anyhow::Result<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(COORDINATOR_NAME);
    Ok(Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect()
        .await?)
}

/// The running coordinator as seen from outside.
struct Coordinator {
    pod: String,
    uid: String,
    restarts: i32,
    ip: String,
    pid: u32,
}

impl Coordinator {
    async fn find(c: &Cluster) -> anyhow::Result<Coordinator> {
        let pods: Api<Pod> = Api::namespaced(c.client.clone(), NAMESPACE);
        let list = pods
            .list(&ListParams::default().labels(LEADER_LABEL))
            .await?;
        let running: Vec<Pod> = list
            .items
            .into_iter()
            .filter(|p| {
                p.metadata.deletion_timestamp.is_none()
                    && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            })
            .collect();
        let [pod] = running.as_slice() else {
            bail!("{} running leading coordinator pods, want 1", running.len());
        };
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let status = pod.status.clone().unwrap_or_default();
        let restarts = status
            .container_statuses
            .unwrap_or_default()
            .iter()
            .map(|s| s.restart_count)
            .sum();
        Ok(Coordinator {
            pod: pod.metadata.name.clone().unwrap_or_default(),
            restarts,
            ip: status.pod_ip.context("coordinator pod has no IP")?,
            pid: coordinator_pid(&uid)?,
            uid,
        })
    }

    fn grpc(&self) -> String {
        format!("{}:7070", self.ip)
    }
}

/// The PID in the host's /proc of the coordinator of pod `uid` (found by its
/// command line and the pod's UID in its cgroup; two replicas run).
fn coordinator_pid(uid: &str) -> anyhow::Result<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cgroup = std::fs::read_to_string(entry.path().join("cgroup")).unwrap_or_default();
        // The systemd cgroup driver writes the UID with underscores.
        if cmd.starts_with(b"/usr/local/bin/coordinator")
            && (cgroup.contains(uid) || cgroup.contains(&uid.replace('-', "_")))
        {
            found.push(pid);
        }
    }
    match found.as_slice() {
        [pid] => Ok(*pid),
        other => bail!("want one coordinator process of pod {uid} in /proc, found {other:?}"),
    }
}

/// The coordinator's memory use: its cgroup's (v1) `memory.usage_in_bytes`.
fn memory_bytes(pid: u32) -> anyhow::Result<u64> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .with_context(|| format!("reading /proc/{pid}/cgroup"))?;
    let path = cgroups
        .lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers
                .split(',')
                .any(|c| c == "memory")
                .then(|| path.to_string())
        })
        .context("no memory controller (cgroup v1) in /proc/PID/cgroup")?;
    let file = format!("/sys/fs/cgroup/memory{path}/memory.usage_in_bytes");
    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {file}"))?;
    Ok(text.trim().parse()?)
}

/// The coordinator's open file descriptors.
fn open_fds(pid: u32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("reading /proc/{pid}/fd (run as root)"))?
        .count())
}

/// Samples the coordinator's memory and open files every 50 ms until dropped.
struct Sampler {
    peak: std::sync::Arc<std::sync::Mutex<(u64, usize)>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(pid: u32) -> anyhow::Result<Sampler> {
        let peak = std::sync::Arc::new(std::sync::Mutex::new((memory_bytes(pid)?, open_fds(pid)?)));
        let p = peak.clone();
        let task = tokio::spawn(async move {
            loop {
                if let (Ok(m), Ok(f)) = (memory_bytes(pid), open_fds(pid)) {
                    let mut peak = p.lock().unwrap();
                    peak.0 = peak.0.max(m);
                    peak.1 = peak.1.max(f);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Ok(Sampler { peak, task })
    }

    /// Peak (memory bytes, open files) seen so far.
    fn peak(&self) -> (u64, usize) {
        *self.peak.lock().unwrap()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `connected_since` of every connected node, from ListNodes.
async fn sessions(c: &Cluster, addr: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let nodes = c
        .inventory_client(addr)
        .await?
        .list_nodes(berth_proto::api::ListNodesRequest {
            include_images: false,
        })
        .await?
        .into_inner()
        .nodes;
    Ok(nodes
        .into_iter()
        .filter(|n| n.connected)
        .map(|n| (n.name, n.connected_since))
        .collect())
}

/// `grpc.health.v1.Health/Check` of the whole server.
async fn health(c: &Cluster, addr: &str) -> anyhow::Result<()> {
    let r = tonic_health::pb::health_client::HealthClient::new(c.coordinator_channel(addr).await?)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await?
        .into_inner();
    anyhow::ensure!(r.status == 1, "health status {}", r.status);
    Ok(())
}

/// What a flood is judged against: the coordinator and its agents before.
struct Before {
    coordinator: Coordinator,
    memory: u64,
    fds: usize,
    sessions: BTreeMap<String, String>,
    /// The CA bundle of ConfigMap berth-ca, which the flood's TLS trusts.
    ca_pem: String,
    /// The installed per-source-IP connection cap of port 7070.
    per_ip_cap: usize,
}

async fn before_flood(c: &Cluster) -> Before {
    assert!(c.local, "the flood tests need the local cluster");
    berth_coordinator::limits::raise_nofile().unwrap();
    let coordinator = Coordinator::find(c).await.unwrap();
    let addr = coordinator.grpc();
    // Every real agent connected before the flood starts.
    let sessions = eventually(Duration::from_secs(60), "every node connected", || async {
        let s = sessions(c, &addr).await?;
        Ok(c.nodes.iter().all(|n| s.contains_key(n)).then_some(s))
    })
    .await
    .unwrap();
    let defaults = berth_coordinator::server::Limits::default().connections;
    let (_, per_ip_cap) = c
        .coordinator_caps((defaults.max_connections, defaults.max_per_ip))
        .unwrap();
    Before {
        memory: memory_bytes(coordinator.pid).unwrap(),
        fds: open_fds(coordinator.pid).unwrap(),
        coordinator,
        sessions,
        ca_pem: c.ca_pem().await.unwrap(),
        per_ip_cap,
    }
}

/// The coordinator survived the flood: same pod, no restart, memory growth
/// bounded, open files back down, healthy, the agents' sessions untouched.
async fn assert_survived(c: &Cluster, before: &Before, sampler: &Sampler) {
    let now = Coordinator::find(c).await.unwrap();
    assert_eq!(
        (now.uid.as_str(), now.restarts),
        (before.coordinator.uid.as_str(), before.coordinator.restarts),
        "coordinator pod {} was replaced or restarted",
        before.coordinator.pod
    );
    assert_eq!(
        now.pid, before.coordinator.pid,
        "coordinator process restarted"
    );
    let (peak_memory, _) = sampler.peak();
    assert!(
        peak_memory <= before.memory + MEMORY_GROWTH_BOUND,
        "coordinator memory peaked at {} MB (from {} MB)",
        peak_memory >> 20,
        before.memory >> 20
    );
    let pid = now.pid;
    eventually(
        Duration::from_secs(60),
        "the coordinator's open files back near their quiet level",
        || async { Ok((open_fds(pid)? <= before.fds + FD_SLACK).then_some(())) },
    )
    .await
    .unwrap();
    let addr = now.grpc();
    eventually(Duration::from_secs(30), "a served health check", || async {
        health(c, &addr).await.map(Some)
    })
    .await
    .unwrap();
    let after = sessions(c, &addr).await.unwrap();
    for (node, since) in &before.sessions {
        assert_eq!(
            after.get(node),
            Some(since),
            "the agent session of {node} was dropped or replaced during the flood"
        );
    }
}

/// Opens a Session with `token` and a Hello of `hello_bytes` node name;
/// returns the gRPC code it ends with.
async fn session_with_hello(
    addr: &str,
    ca_pem: &str,
    token: &str,
    hello_bytes: usize,
) -> tonic::Code {
    let Ok(ch) = channel(addr, ca_pem).await else {
        return tonic::Code::Unavailable;
    };
    let hello = pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
            node_name: "x".repeat(hello_bytes),
            ..Default::default()
        })),
    };
    let mut req = tonic::Request::new(tokio_stream::iter([hello]));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    match AgentServiceClient::new(ch).session(req).await {
        Ok(_) => tonic::Code::Ok,
        Err(e) => e.code(),
    }
}

#[tokio::test]
async fn huge_hellos_behind_garbage_tokens_neither_restart_nor_bloat_the_coordinator() {
    let c = Cluster::from_env().await.unwrap();
    let before = before_flood(&c).await;
    let sampler = Sampler::start(before.coordinator.pid).unwrap();
    let addr = before.coordinator.grpc();
    let started = Instant::now();
    let codes: Vec<tonic::Code> = futures::future::join_all(
        (0..150).map(|_| session_with_hello(&addr, &before.ca_pem, GARBAGE, 3_900_000)),
    )
    .await;
    eprintln!("150 huge Hellos answered in {:?}", started.elapsed());
    for code in &codes {
        assert!(
            matches!(
                code,
                tonic::Code::Unauthenticated | tonic::Code::ResourceExhausted
            ),
            "a garbage-token session ended with {code:?}"
        );
    }
    assert_survived(&c, &before, &sampler).await;
}

#[tokio::test]
async fn twenty_thousand_silent_connections_neither_exhaust_files_nor_stop_the_coordinator() {
    let c = Cluster::from_env().await.unwrap();
    let before = before_flood(&c).await;
    let sampler = Sampler::start(before.coordinator.pid).unwrap();
    let addr = before.coordinator.grpc();
    let metrics = format!("{}:9090", before.coordinator.ip);
    let soft = berth_coordinator::limits::raise_nofile().unwrap();
    // As many as the trial (20 100) where the host allows it, and
    // always far past the coordinator's caps (1024 per IP, 8192 in all).
    let flood = 20_100.min(soft.saturating_sub(1_000) as usize);
    assert!(
        flood > 8_192 + 1_024,
        "this test needs more than 9 216 sockets; the host allows {soft} open files (raise `ulimit -Hn`)"
    );

    // Open that many connections that never send a byte, and hold them.
    let held: Vec<tokio::net::TcpStream> = futures::stream::iter(0..flood)
        .map(|_| {
            let addr = addr.clone();
            async move { tokio::net::TcpStream::connect(&addr).await }
        })
        .buffer_unordered(256)
        .filter_map(|r| async move { r.ok() })
        .collect()
        .await;
    eprintln!("{} silent connections open", held.len());
    // While they are held, the metrics port (its own listener) still answers
    // and counts the connections the gRPC port closed unserved.
    let text = scrape(&metrics).await.unwrap();
    assert!(
        text.contains("berth_connections_refused_total{listener=\"grpc\",reason=\"per_ip_cap\"}"),
        "{text}"
    );
    let (_, peak_fds) = sampler.peak();
    let cap = before.per_ip_cap;
    assert!(
        peak_fds <= before.fds + cap + FD_SLACK,
        "coordinator held {peak_fds} files (quiet: {}, per-IP cap {cap})",
        before.fds
    );
    drop(held);
    assert_survived(&c, &before, &sampler).await;
}

/// `GET /metrics` over plain HTTP/1.0.
async fn scrape(addr: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_string(&mut out)).await??;
    Ok(out)
}

/// When the apiserver received each TokenReview the coordinator sent, per
/// its audit log.
fn audited_token_reviews(c: &Cluster) -> anyhow::Result<Vec<Timestamp>> {
    let path = c.var("BERTH_AUDIT_LOG");
    anyhow::ensure!(!path.is_empty(), "the env file names no BERTH_AUDIT_LOG");
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let coordinator = format!("system:serviceaccount:{NAMESPACE}:berth-coordinator");
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| {
            e["verb"] == "create"
                && e["objectRef"]["resource"] == "tokenreviews"
                && e["stage"] == "ResponseComplete"
                && e["user"]["username"] == coordinator.as_str()
        })
        .filter_map(|e| e["requestReceivedTimestamp"].as_str()?.parse().ok())
        .collect())
}

#[tokio::test]
async fn three_thousand_garbage_streams_on_one_connection_make_a_handful_of_token_reviews() {
    let c = Cluster::from_env().await.unwrap();
    let before = before_flood(&c).await;
    let sampler = Sampler::start(before.coordinator.pid).unwrap();
    let addr = before.coordinator.grpc();
    let ch = channel(&addr, &before.ca_pem).await.unwrap();
    let started = Instant::now();
    // The cluster runs on this host: one clock for us and the apiserver.
    let flood_start = Timestamp::now();
    let codes: Vec<tonic::Code> = futures::future::join_all((0..3000).map(|_| {
        let mut client = AgentServiceClient::new(ch.clone());
        async move {
            let hello = pb::AgentMessage {
                kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
                    node_name: "flood".into(),
                    ..Default::default()
                })),
            };
            let mut req = tonic::Request::new(tokio_stream::iter([hello]));
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer {GARBAGE}").parse().unwrap(),
            );
            match client.session(req).await {
                Ok(_) => tonic::Code::Ok,
                Err(e) => e.code(),
            }
        }
    }))
    .await;
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for code in &codes {
        *tally.entry(format!("{code:?}")).or_default() += 1;
    }
    eprintln!("3000 streams in {:?}: {tally:?}", started.elapsed());
    assert!(!tally.contains_key("Ok"), "a garbage token was accepted");

    // One more garbage token, never seen: once its review is in the audit
    // log, so are the flood's, which the apiserver received before it.
    let flood_end = Timestamp::now();
    let sentinel = format!("{GARBAGE}x{}", std::process::id());
    let code = session_with_hello(&addr, &before.ca_pem, &sentinel, 16).await;
    assert_eq!(code, tonic::Code::Unauthenticated);
    let received = eventually(
        Duration::from_secs(30),
        "the sentinel's TokenReview in the audit log",
        || async {
            let r = audited_token_reviews(&c)?;
            Ok(r.iter().any(|t| *t >= flood_end).then_some(r))
        },
    )
    .await
    .unwrap();
    let flood_reviews = received
        .iter()
        .filter(|t| **t >= flood_start && **t < flood_end)
        .count();
    // One bad token: cached after its first refusal; at most the per-client
    // bound of reviews (4) ran before that. Unprotected: 2952.
    assert!(
        flood_reviews <= 8,
        "{flood_reviews} TokenReviews for 3000 streams of one bad token"
    );
    assert_survived(&c, &before, &sampler).await;
}
