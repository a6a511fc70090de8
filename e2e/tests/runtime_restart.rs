//! The node agent survives its container runtime restarting, as a containerd
//! upgrade restarts it: `e2e/cluster.sh restart-containerd` stops a node's
//! containerd in the middle of a pull Berth started, and starts it again.
//!
//! Checked from outside Berth: the image is on the node through CRI, and the
//! agent's pod is the same pod (same UID) with no container restart — the
//! agent reconnected by itself, not because the kubelet or a person
//! restarted it. Local cluster only (it restarts the node's runtime).

use std::time::Duration;

use berth_coordinator::imagecache::crd::ImageCache;
use berth_e2e::{Cluster, NAMESPACE, TestNamespace, missing_prerequisite, phase};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

/// How long the cache may take to start pulling.
const START: Duration = Duration::from_secs(60);
/// How long after containerd is back the cache must be Ready again.
const RECOVERY: Duration = Duration::from_secs(30);
/// How long the runtime stays down (an upgrade's restart).
const DOWN_SECONDS: &str = "5";

/// The agent pod on `node`: (UID, restarts of its container).
async fn agent_pod(c: &Cluster, node: &str) -> (String, i32) {
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), NAMESPACE);
    let list = pods
        .list(
            &ListParams::default()
                .labels("app.kubernetes.io/name=berth-node-agent")
                .fields(&format!("spec.nodeName={node}")),
        )
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1, "one agent pod on {node}");
    let pod = &list.items[0];
    let restarts = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.first())
        .map_or(0, |c| c.restart_count);
    (pod.metadata.uid.clone().unwrap(), restarts)
}

#[tokio::test]
async fn a_containerd_restart_during_a_pull_is_survived_without_restarting_the_agent() {
    let c = Cluster::from_env().await.unwrap();
    if !c.local {
        return missing_prerequisite(
            "the runtime restart test restarts a local cluster node's containerd; this is another cluster",
        );
    }
    let n1 = &c.nodes[0];
    let index = n1
        .strip_prefix("berth-node-")
        .expect("local cluster nodes are named berth-node-N");
    let s = TestNamespace::new(&c, "rt-restart");
    // 200 MiB of random layers: a pull of a few seconds on these machines.
    let img = c.fresh_big_image("rt-restart", 10, 20 << 20).await.unwrap();
    let before = agent_pod(&c, n1).await;

    c.apply(&format!(
        r#"apiVersion: berth.dev/v1alpha1
kind: ImageCache
metadata: {{name: restart, namespace: {ns}}}
spec:
  images: [{{ref: "{img}"}}]
  nodeNames: [{n1}]
"#,
        ns = s.name
    ))
    .unwrap();
    // The first status (a watch event, not a poll that could miss a short
    // state) says the pull is under way; containerd goes down right then.
    let caches: Api<ImageCache> = s.caches();
    berth_e2e::bench::watch_until(&caches, "restart", START, |ic| phase(ic) == "Progressing")
        .await
        .unwrap();
    assert!(
        !c.cri_has_image(n1, &img).await.unwrap(),
        "the pull finished before containerd could be restarted; the test needs a pull in flight"
    );

    let out = tokio::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/cluster.sh"))
        .args(["restart-containerd", index, DOWN_SECONDS])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "cluster.sh restart-containerd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.wait_status(
        "restart",
        RECOVERY,
        "the cache to be Ready again after containerd came back",
        |ic| phase(ic) == "Ready",
    )
    .await;
    assert!(
        c.cri_has_image(n1, &img).await.unwrap(),
        "{img} on {n1} through CRI"
    );
    let after = agent_pod(&c, n1).await;
    assert_eq!(
        after.0, before.0,
        "the agent pod on {n1} was replaced; it should have reconnected by itself"
    );
    assert_eq!(
        after.1, before.1,
        "the agent on {n1} was restarted by the kubelet; the outage is shorter than its liveness threshold"
    );
}
