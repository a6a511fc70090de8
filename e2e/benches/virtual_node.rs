//! Benchmark: pod create → Running on a systemd virtual node (a unit over
//! D-Bus on a private systemd) against the same pod on a kubelet node of
//! the local cluster (its image already on the node), alternating runs,
//! with the ratio. Both pods run `sleep`; the virtual node's comes from a
//! Debian package, the kubelet node's from the harness's busybox image.
//!
//! `cargo bench -p berth-e2e --bench virtual_node` with the local cluster
//! up; `BERTH_BENCH_RUNS` sets the runs of each (default 5).

use std::time::{Duration, Instant};

use berth_e2e::bench::{Goal, median, ms, report, runs, watch_until};
use berth_e2e::systemd_host::{SystemdHost, VirtualNode};
use berth_e2e::{Cluster, TestNamespace, eventually};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, PostParams};

/// Creates `pod` and returns the time until it is Running.
async fn create_to_running(api: &Api<Pod>, pod: serde_json::Value) -> anyhow::Result<Duration> {
    let pod: Pod = serde_json::from_value(pod)?;
    let name = pod.metadata.name.clone().unwrap_or_default();
    let start = Instant::now();
    api.create(&PostParams::default(), &pod).await?;
    let (_, at) = watch_until(api, &name, Duration::from_secs(120), |p: &Pod| {
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    })
    .await?;
    api.delete(&name, &DeleteParams::default().grace_period(0))
        .await?;
    Ok(at - start)
}

fn pod(name: &str, node: &str, image: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "tolerations": [{"key": "berth.dev/virtual-node", "operator": "Exists"}],
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "main", "image": image, "command": ["sleep", "3600"]}],
        },
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let c = Cluster::from_env().await?;
    let host = SystemdHost::start().await?;
    let vn = VirtualNode::start(&c, &host);
    let nodes: Api<Node> = Api::all(c.client.clone());
    eventually(Duration::from_secs(60), "the virtual Node", || async {
        Ok(nodes.get_opt(&vn.name).await?.filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        }))
    })
    .await?;
    let ns = TestNamespace::new(&c, "bench-vn");
    let api: Api<Pod> = Api::namespaced(c.client.clone(), &ns.name);
    let kubelet_node = c.nodes.first().cloned().unwrap_or_default();
    let image = format!("{}/busybox:1.36", c.registry());
    let n = runs(5);
    let (mut virt, mut kubelet) = (Vec::new(), Vec::new());
    for i in 0..n {
        for side in if i % 2 == 0 { [0, 1] } else { [1, 0] } {
            if side == 0 {
                let p = pod(&format!("v{i}"), &vn.name, "deb://busybox-static");
                virt.push(create_to_running(&api, p).await?);
            } else {
                let p = pod(&format!("k{i}"), &kubelet_node, &image);
                kubelet.push(create_to_running(&api, p).await?);
            }
        }
    }
    let (v, k) = (ms(median(virt)), ms(median(kubelet)));
    report(
        "virtual_node.create_to_running.systemd",
        v,
        "ms",
        Goal::Baseline,
    )?;
    report(
        "virtual_node.create_to_running.kubelet",
        k,
        "ms",
        Goal::Baseline,
    )?;
    report(
        "virtual_node.create_to_running.ratio",
        v / k,
        "x",
        Goal::AtMost(1.0),
    )?;
    Ok(())
}
