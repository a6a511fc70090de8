//! The foundation on the real local cluster: nodes, agents, the coordinator,
//! the Inventory API through the real grpcurl, agent and coordinator
//! restarts, and agent authentication.
//!
//! Needs the cluster up and Berth installed (`e2e/test-all.sh` does both).
//! Run with `--test-threads=1`: some tests kill Berth's pods.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use berth_e2e::{Cluster, NAMESPACE, eventually};
use berth_proto::agent as pb;
use berth_proto::agent::agent_service_client::AgentServiceClient;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams};

const AGENT_LABEL: &str = "app.kubernetes.io/name=berth-node-agent";
const COORDINATOR_LABEL: &str = "app.kubernetes.io/name=berth-coordinator";

/// Running agent pods, grouped by node (a node with two agents shows two).
async fn agent_pods(c: &Cluster) -> anyhow::Result<BTreeMap<String, Vec<Pod>>> {
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), NAMESPACE);
    let list = pods
        .list(&ListParams::default().labels(AGENT_LABEL))
        .await?;
    let mut out: BTreeMap<String, Vec<Pod>> = BTreeMap::new();
    for p in list.items {
        let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        if p.metadata.deletion_timestamp.is_some() || !running {
            continue;
        }
        if let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.clone()) {
            out.entry(node).or_default().push(p);
        }
    }
    Ok(out)
}

/// The one running agent pod on `node`.
async fn agent_pod(c: &Cluster, node: &str) -> anyhow::Result<Pod> {
    let mut pods = agent_pods(c).await?.remove(node).unwrap_or_default();
    match pods.len() {
        1 => Ok(pods.remove(0)),
        n => anyhow::bail!("{n} running agent pods on {node}"),
    }
}

/// `node-agent images pull IMAGE` in the agent pod on `node`; returns stdout.
async fn agent_pull(c: &Cluster, node: &str, image: &str) -> String {
    let pod = agent_pod(c, node).await.unwrap().metadata.name.unwrap();
    c.kubectl(&[
        "-n",
        NAMESPACE,
        "exec",
        &pod,
        "--",
        "node-agent",
        "images",
        "pull",
        image,
    ])
    .unwrap()
}

/// `ListNodes` through grpcurl (TLS, as the viewer), as JSON.
async fn list_nodes(c: &Cluster, addr: &str) -> anyhow::Result<serde_json::Value> {
    let out = c
        .api_grpcurl(&[
            "-d",
            r#"{"include_images": true}"#,
            addr,
            "berth.v1.Inventory/ListNodes",
        ])
        .await?;
    Ok(serde_json::from_str(&out)?)
}

/// Nodes the coordinator shows as connected, with their image IDs.
fn connected_nodes(v: &serde_json::Value) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for n in v["nodes"].as_array().into_iter().flatten() {
        if n["connected"].as_bool() != Some(true) {
            continue;
        }
        let mut ids: Vec<String> = n["images"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["id"].as_str().map(String::from))
            .collect();
        ids.sort();
        out.insert(n["name"].as_str().unwrap_or_default().to_string(), ids);
    }
    out
}

async fn wait_all_connected(c: &Cluster, addr: &str, timeout: Duration) -> anyhow::Result<()> {
    eventually(
        timeout,
        "every node connected to the coordinator",
        || async {
            let v = list_nodes(c, addr).await?;
            let connected = connected_nodes(&v);
            Ok(c.nodes
                .iter()
                .all(|n| connected.contains_key(n))
                .then_some(()))
        },
    )
    .await
}

#[tokio::test]
async fn every_node_is_ready_and_runs_one_agent_that_reached_the_coordinator_by_name() {
    let c = Cluster::from_env().await.unwrap();
    assert!(c.nodes.len() >= 2, "the harness runs at least two nodes");
    let nodes: Api<Node> = Api::all(c.client.clone());
    for name in &c.nodes {
        let node = nodes.get(name).await.unwrap();
        let ready = node
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        assert!(ready, "node {name} is not Ready");
    }
    let pods = eventually(
        Duration::from_secs(60),
        "one agent pod per node",
        || async {
            let pods = agent_pods(&c).await?;
            Ok(c.nodes.iter().all(|n| pods.contains_key(n)).then_some(pods))
        },
    )
    .await
    .unwrap();
    let per_node: BTreeMap<&str, usize> = pods.iter().map(|(n, p)| (n.as_str(), p.len())).collect();
    let want: BTreeMap<&str, usize> = c.nodes.iter().map(|n| (n.as_str(), 1)).collect();
    assert_eq!(
        per_node, want,
        "exactly one running agent on every node, none elsewhere"
    );

    // The agents dial `https://berth-coordinator.berth-system.svc:7070`: the
    // coordinator lists a node only after that node's agent reached it
    // through DNS and the Service, verified its certificate, and
    // authenticated.
    let pf = c.port_forward("berth-coordinator", 7070).unwrap();
    wait_all_connected(&c, &pf.addr(), Duration::from_secs(60))
        .await
        .unwrap();
    for (node, pod) in pods
        .into_iter()
        .flat_map(|(n, p)| p.into_iter().map(move |p| (n.clone(), p)))
    {
        let name = pod.metadata.name.unwrap();
        let logs = c.kubectl(&["-n", NAMESPACE, "logs", &name]).unwrap();
        assert!(
            logs.contains("session established"),
            "agent on {node} logged no session:\n{logs}"
        );
    }
}

#[tokio::test]
async fn an_image_pulled_with_the_agent_cli_on_node_a_is_on_a_and_not_on_b() {
    let c = Cluster::from_env().await.unwrap();
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let image = c.fresh_image("cli-pull").await.unwrap();
    let out = agent_pull(&c, a, &image).await;
    assert!(out.trim().starts_with("sha256:"), "pull printed {out:?}");
    assert!(c.cri_has_image(a, &image).await.unwrap(), "not on {a}");
    assert!(
        !c.cri_has_image(b, &image).await.unwrap(),
        "leaked onto {b}"
    );
}

#[tokio::test]
async fn grpcurl_lists_every_node_with_exactly_the_images_cri_reports() {
    let c = Cluster::from_env().await.unwrap();
    // Make the two nodes differ, so a mix-up between them would show.
    let only_a = c.fresh_image("only-a").await.unwrap();
    agent_pull(&c, &c.nodes[0], &only_a).await;

    let pf = c.port_forward("berth-coordinator", 7070).unwrap();
    let services = c.api_grpcurl(&[&pf.addr(), "list"]).await.unwrap();
    assert!(services.contains("berth.v1.Inventory"), "{services}");
    assert!(
        services.contains("berth.agent.v1.AgentService"),
        "{services}"
    );

    eventually(
        Duration::from_secs(30),
        "Inventory == CRI on every node",
        || async {
            let listed = connected_nodes(&list_nodes(&c, &pf.addr()).await?);
            for node in &c.nodes {
                let cri = c.cri_image_ids(node).await?;
                if listed.get(node) != Some(&cri) {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await
    .unwrap();
    let listed = connected_nodes(&list_nodes(&c, &pf.addr()).await.unwrap());
    assert_ne!(listed[&c.nodes[0]], listed[&c.nodes[1]]);

    let one = c
        .api_grpcurl(&[
            "-d",
            &format!(r#"{{"node": "{}"}}"#, c.nodes[1]),
            &pf.addr(),
            "berth.v1.Inventory/ListNodeImages",
        ])
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&one).unwrap();
    let mut ids: Vec<String> = v["images"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["id"].as_str().map(String::from))
        .collect();
    ids.sort();
    assert_eq!(ids, c.cri_image_ids(&c.nodes[1]).await.unwrap());
    assert!(!c.cri_has_image(&c.nodes[1], &only_a).await.unwrap());
}

#[tokio::test]
async fn a_killed_agent_pod_comes_back_and_reconnects() {
    let c = Cluster::from_env().await.unwrap();
    let node = &c.nodes[0];
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), NAMESPACE);
    let old = agent_pod(&c, node).await.unwrap();
    let old_uid = old.metadata.uid.clone().unwrap();
    let killed_at = Instant::now();
    pods.delete(
        &old.metadata.name.unwrap(),
        &DeleteParams::default().grace_period(0),
    )
    .await
    .unwrap();
    let new_pod = eventually(
        Duration::from_secs(90),
        "a new agent pod on the node",
        || async {
            let now = agent_pod(&c, node).await?;
            Ok(Some(now)
                .filter(|p| p.metadata.uid.as_deref() != Some(&old_uid))
                .and_then(|p| p.metadata.name))
        },
    )
    .await
    .unwrap();
    let pf = c.port_forward("berth-coordinator", 7070).unwrap();
    eventually(
        Duration::from_secs(30),
        "the new agent's session",
        || async {
            let logs = c.kubectl(&["-n", NAMESPACE, "logs", &new_pod])?;
            Ok(logs.contains("session established").then_some(()))
        },
    )
    .await
    .unwrap();
    wait_all_connected(&c, &pf.addr(), Duration::from_secs(30))
        .await
        .unwrap();
    eprintln!(
        "agent replaced and reconnected in {:?}",
        killed_at.elapsed()
    );
}

#[tokio::test]
async fn a_restarted_coordinator_sees_every_node_again_within_seconds() {
    let c = Cluster::from_env().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), NAMESPACE);
    let old = pods
        .list(&ListParams::default().labels(COORDINATOR_LABEL))
        .await
        .unwrap();
    let started = Instant::now();
    for p in old.items {
        pods.delete(
            &p.metadata.name.unwrap(),
            &DeleteParams::default().grace_period(0),
        )
        .await
        .unwrap();
    }
    c.kubectl(&[
        "-n",
        NAMESPACE,
        "rollout",
        "status",
        "deploy/berth-coordinator",
        "--timeout=90s",
    ])
    .unwrap();
    // A fresh coordinator knows nothing: every node it lists came back on its own.
    let pf = eventually(
        Duration::from_secs(30),
        "a port-forward to the new coordinator",
        || async { Ok(c.port_forward("berth-coordinator", 7070).ok()) },
    )
    .await
    .unwrap();
    wait_all_connected(&c, &pf.addr(), Duration::from_secs(20))
        .await
        .unwrap();
    eprintln!(
        "coordinator replaced; every node back after {:?}",
        started.elapsed()
    );
}

/// Opens a session (over TLS) with `token` claiming `node`; returns the
/// gRPC outcome.
async fn try_session(
    c: &Cluster,
    addr: &str,
    token: &str,
    node: &str,
) -> Result<(), tonic::Status> {
    let channel = c
        .coordinator_channel(addr)
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?;
    let mut client = AgentServiceClient::new(channel);
    let hello = pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
            node_name: node.to_string(),
            agent_version: "test".into(),
            ..Default::default()
        })),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(hello).await.unwrap();
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut stream = client.session(req).await?.into_inner();
    let first = stream.message().await?;
    match first.and_then(|m| m.kind) {
        Some(pb::coordinator_message::Kind::Welcome(_)) => Ok(()),
        other => Err(tonic::Status::internal(format!("unexpected {other:?}"))),
    }
}

#[tokio::test]
async fn forged_and_wrong_node_tokens_are_refused() {
    let c = Cluster::from_env().await.unwrap();
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let pod = agent_pod(&c, a).await.unwrap();
    let (name, uid) = (pod.metadata.name.unwrap(), pod.metadata.uid.unwrap());
    let token_for = |audience: &str| {
        c.kubectl(&[
            "-n",
            NAMESPACE,
            "create",
            "token",
            "berth-node-agent",
            "--audience",
            audience,
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            &name,
            "--bound-object-uid",
            &uid,
        ])
        .unwrap()
        .trim()
        .to_string()
    };
    let good = token_for("berth");
    let pf = c.port_forward("berth-coordinator", 7070).unwrap();

    // One signature byte changed (mid-signature: every bit of those base64
    // characters counts), and a token that is no JWT at all.
    let mut forged = good.clone().into_bytes();
    let i = forged.len() - 20;
    forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    for bad in [forged.as_str(), "not-a-token"] {
        let e = try_session(&c, &pf.addr(), bad, a).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    }

    let e = try_session(&c, &pf.addr(), &token_for("not-berth"), a)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

    let e = try_session(&c, &pf.addr(), &good, b).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains(a.as_str()), "{}", e.message());

    let default_sa = c
        .kubectl(&[
            "-n",
            NAMESPACE,
            "create",
            "token",
            "default",
            "--audience",
            "berth",
        ])
        .unwrap();
    let e = try_session(&c, &pf.addr(), default_sa.trim(), a)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");

    // The same token, for its own node, is accepted: the refusals above are
    // about the token, not a coordinator that refuses everyone.
    try_session(&c, &pf.addr(), &good, a).await.unwrap();
    // That test session replaced the real agent's; the agent reconnects.
    wait_all_connected(&c, &pf.addr(), Duration::from_secs(30))
        .await
        .unwrap();
}
