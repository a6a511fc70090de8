//! Benchmark: the real coordinator (as installed) against ≥ 1000 simulated
//! agents and one ImageCache of 20 images.
//!
//! Each simulated agent is the node agent's own session and task code over an
//! in-memory runtime. Each has a Node object in the real apiserver (labelled
//! `berth.dev/agent=disabled`, so the DaemonSet leaves it alone), a Pod of the
//! agent ServiceAccount bound to that node, and a projected-style token bound
//! to that Pod, so the coordinator authenticates it exactly as a real agent
//! (TokenReview, then the Pod's node). Agents dial the coordinator's pod IP
//! (the host routes to pod subnets) over TLS, trusting the CA bundle in the
//! ConfigMap berth-ca and checking the Service's name in the certificate. Prints time to converge, apiserver
//! writes by the coordinator, and the coordinator's peak memory, against the
//! goals (< 10 s, < 200 writes, < 300 MB).
//!
//! `cargo bench -p berth-e2e --bench scale`; `BERTH_SCALE_AGENTS` (default 1000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_coordinator::imagecache::crd::ImageCache;
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

/// Peak RSS of the coordinator process, read from the host's /proc.
fn coordinator_peak_mb() -> Option<f64> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if cmd.starts_with(b"/usr/local/bin/coordinator") {
            let status = std::fs::read_to_string(entry.path().join("status")).ok()?;
            let kb: f64 = status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            return Some(kb / 1024.0);
        }
    }
    None
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let agents: usize = std::env::var("BERTH_SCALE_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let c = Cluster::from_env().await?;
    anyhow::ensure!(
        c.local,
        "the scale benchmark needs the local cluster (pod IPs routed to the host)"
    );
    cleanup(&c).await?;
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), NAMESPACE);
    let coordinator = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=berth-coordinator"))
        .await?
        .items
        .into_iter()
        .find_map(|p| p.status?.pod_ip)
        .ok_or_else(|| anyhow::anyhow!("no coordinator pod IP"))?;
    let metrics_addr = format!("{coordinator}:9090");
    // The agents trust the CA the coordinator publishes, as real agents do.
    let ca_file = c.ca_file().await?;

    // Nodes, agent pods bound to them, and tokens bound to the pods.
    let t = Instant::now();
    let names: Vec<String> = (0..agents).map(|i| format!("sim-{i:04}")).collect();
    let nodes: Api<Node> = Api::all(c.client.clone());
    let sas: Api<ServiceAccount> = Api::namespaced(c.client.clone(), NAMESPACE);
    let dir = tempfile_dir()?;
    let tokens: Vec<(String, std::path::PathBuf)> = futures::stream::iter(names.clone())
        .map(|name| {
            let (nodes, pods, sas, dir) = (nodes.clone(), pods.clone(), sas.clone(), dir.clone());
            async move {
                let node: Node = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name, "labels": {LABEL: "yes", "berth.dev/agent": "disabled", "bench": "scale"}}
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
        .await?;
    println!(
        "setup: {agents} nodes, pods and tokens in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // The simulated agents: the real session and task code, in-memory runtime.
    let images: Vec<String> = (0..IMAGES)
        .map(|i| format!("bench.invalid/img{i:02}:1"))
        .collect();
    for (name, token_file) in tokens {
        let rt = MemRuntime::default();
        for i in &images {
            rt.publish(i, 10 << 20);
        }
        let (runner, updates) = TaskRunner::new(Arc::new(rt), &name, 2, Managed::load(None));
        let cfg = SessionConfig {
            coordinator: format!("https://{coordinator}:7070"),
            ca_file: ca_file.clone(),
            // Dialed by pod IP; the certificate names the Service.
            tls_server_name: Some(berth_e2e::COORDINATOR_NAME.into()),
            node_name: name,
            token_file,
            socket: "memory".into(),
            inventory_poll: Duration::from_secs(2),
        };
        tokio::spawn(session::run(runner, updates, cfg));
    }
    let t = Instant::now();
    eventually(
        Duration::from_secs(300),
        "every simulated agent connected",
        || async {
            let text = scrape(&metrics_addr)?;
            Ok(
                (metric(&text, "berth_agents_connected") as usize >= agents + c.nodes.len())
                    .then_some(()),
            )
        },
    )
    .await?;
    println!(
        "{agents} agents authenticated and connected in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // One cache, 20 images, every simulated node.
    let before = scrape(&metrics_addr)?;
    let ns = "berth-scale";
    let _ = c.kubectl(&["create", "namespace", ns]);
    let refs: String = images
        .iter()
        .map(|i| format!("{{ref: \"{i}\"}}, "))
        .collect();
    let t = Instant::now();
    c.apply(&format!(
        "apiVersion: berth.dev/v1alpha1\nkind: ImageCache\nmetadata: {{name: scale, namespace: {ns}}}\nspec:\n  images: [{refs}]\n  nodeSelector: {{matchLabels: {{\"{LABEL}\": \"yes\"}}}}\n  deletionPolicy: Retain\n"
    ))?;
    let api: Api<ImageCache> = Api::namespaced(c.client.clone(), ns);
    loop {
        let ready = api
            .get("scale")
            .await?
            .status
            .is_some_and(|s| s.phase == "Ready" && s.nodes.ready as usize == agents);
        if ready {
            break;
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(600),
            "did not converge in 10 min"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let converge = t.elapsed();
    let after = scrape(&metrics_addr)?;
    let writes =
        metric(&after, "berth_api_writes_total") - metric(&before, "berth_api_writes_total");
    let peak = coordinator_peak_mb();

    println!(
        "ImageCache of {IMAGES} images on {agents} simulated nodes ({} pulls):",
        agents * IMAGES
    );
    println!(
        "  time to converge        : {:>8.2} s   (goal < 10 s)",
        converge.as_secs_f64()
    );
    println!("  apiserver writes        : {writes:>8.0}     (goal < 200)");
    match peak {
        Some(mb) => println!("  coordinator peak memory : {mb:>8.1} MB  (goal < 300 MB)"),
        None => println!("  coordinator peak memory : not found in /proc"),
    }
    api.delete("scale", &DeleteParams::default()).await?;
    let _ = c.kubectl(&["delete", "namespace", ns, "--wait=false"]);
    cleanup(&c).await?;
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("berth-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
