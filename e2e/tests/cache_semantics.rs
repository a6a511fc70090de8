//! ImageCache semantics users rely on, on the real local cluster and checked
//! through CRI on the nodes: one tenant's Secret never decides another's
//! readiness, a selection that matches no node says so, and deleting a
//! `RemoveFromNodes` cache waits for a node whose agent is away.
//!
//! Each test makes its own namespaces and images. Run with `--test-threads=1`.

use std::time::Duration;

use berth_coordinator::imagecache::crd::ImageCache;
use berth_e2e::{Cluster, NAMESPACE, TestNamespace, eventually, phase};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams};

const WAIT: Duration = Duration::from_secs(90);

/// A test namespace whose pull Secrets the coordinator may read.
struct Ns<'a> {
    c: &'a Cluster,
    ns: TestNamespace<'a>,
}

impl<'a> std::ops::Deref for Ns<'a> {
    type Target = TestNamespace<'a>;
    fn deref(&self) -> &TestNamespace<'a> {
        &self.ns
    }
}

impl<'a> Ns<'a> {
    fn new(c: &'a Cluster, prefix: &str) -> Ns<'a> {
        let ns = TestNamespace::new(c, prefix);
        // Pull Secrets are read only where the namespace allows it.
        c.kubectl(&[
            "-n",
            &ns.name,
            "create",
            "rolebinding",
            "berth-pull-secrets",
            "--clusterrole=berth-pull-secret-reader",
            "--serviceaccount=berth-system:berth-coordinator",
        ])
        .unwrap();
        Ns { c, ns }
    }

    fn secret(&self, name: &str, password: &str) {
        self.c
            .kubectl(&[
                "-n",
                &self.name,
                "create",
                "secret",
                "docker-registry",
                name,
                "--docker-server",
                self.c.auth_registry(),
                "--docker-username",
                self.c.var("BERTH_AUTH_USER"),
                "--docker-password",
                password,
            ])
            .unwrap();
    }

    async fn wait(&self, name: &str, what: &str, ok: impl Fn(&ImageCache) -> bool) -> ImageCache {
        self.wait_status(name, WAIT, what, ok).await
    }
}

fn condition<'a>(c: &'a ImageCache, type_: &str) -> Option<(&'a str, &'a str, &'a str)> {
    c.status.as_ref()?.conditions.iter().find_map(|k| {
        (k.type_ == type_).then_some((k.status.as_str(), k.reason.as_str(), k.message.as_str()))
    })
}

#[tokio::test]
async fn a_tenant_without_credentials_neither_blocks_nor_borrows_another_tenants_private_image() {
    let c = Cluster::from_env().await.unwrap();
    let img = c.fresh_private_image("tenants").await.unwrap();
    let n1 = &c.nodes[0];
    let (a, b) = (Ns::new(&c, "tenant-a"), Ns::new(&c, "tenant-b"));
    let spec = |secret: &str| {
        format!(
            "  images: [{{ref: \"{img}\"}}]\n  nodeNames: [{n1}]\n  imagePullSecrets: [{{name: {secret}}}]\n"
        )
    };
    // B first, with a Secret the registry refuses: it must not keep A waiting.
    b.secret("creds", "wrong");
    b.apply_cache("b", &spec("creds"));
    a.secret("creds", c.var("BERTH_AUTH_PASSWORD"));
    a.apply_cache("a", &spec("creds"));
    a.wait("a", "tenant A Ready", |ic| phase(ic) == "Ready")
        .await;
    assert!(c.cri_has_image(n1, &img).await.unwrap());

    // B's readiness rests on its own credentials, which the registry refuses.
    let st = b
        .wait("b", "tenant B refused on its own status", |ic| {
            phase(ic) == "Degraded"
                && ic
                    .status
                    .as_ref()
                    .is_some_and(|s| s.images[0].failure_reasons.contains_key("AuthFailed"))
        })
        .await;
    assert_eq!(condition(&st, "Ready").map(|c| c.0), Some("False"));
    assert!(c.cri_has_image(n1, &img).await.unwrap(), "A's copy stays");

    // B fixes its Secret: Ready without anyone else's help.
    c.kubectl(&["-n", &b.name, "delete", "secret", "creds"])
        .unwrap();
    b.secret("creds", c.var("BERTH_AUTH_PASSWORD"));
    b.wait("b", "tenant B Ready with its own Secret", |ic| {
        phase(ic) == "Ready"
    })
    .await;
}

#[tokio::test]
async fn a_selection_that_matches_no_node_is_degraded_and_names_what_is_missing() {
    let c = Cluster::from_env().await.unwrap();
    let img = c.fresh_image("nomatch").await.unwrap();
    let ns = Ns::new(&c, "nomatch");
    ns.apply_cache(
        "sel",
        &format!("  images: [{{ref: \"{img}\"}}]\n  nodeSelector: {{matchLabels: {{nope: x}}}}\n"),
    );
    let st = ns
        .wait("sel", "NoMatchingNodes", |ic| {
            condition(ic, "Ready").is_some_and(|c| c.1 == "NoMatchingNodes")
        })
        .await;
    assert_eq!(phase(&st), "Degraded");
    let (status, _, message) = condition(&st, "Ready").unwrap();
    assert_eq!(status, "False");
    assert!(message.contains("nope=x"), "{message}");
    assert_eq!(
        condition(&st, "Degraded").map(|c| c.1),
        Some("NoMatchingNodes")
    );

    ns.apply_cache(
        "named",
        &format!("  images: [{{ref: \"{img}\"}}]\n  nodeNames: [ghost-node]\n"),
    );
    let st = ns
        .wait("named", "NoMatchingNodes naming the ghost", |ic| {
            condition(ic, "Ready").is_some_and(|c| c.1 == "NoMatchingNodes")
        })
        .await;
    assert!(condition(&st, "Ready").unwrap().2.contains("ghost-node"));

    // A real node next to the ghost: Ready, and the ghost is still named.
    let n1 = &c.nodes[0];
    ns.apply_cache(
        "named",
        &format!("  images: [{{ref: \"{img}\"}}]\n  nodeNames: [ghost-node, {n1}]\n"),
    );
    let st = ns
        .wait("named", "Ready on the real node", |ic| phase(ic) == "Ready")
        .await;
    assert!(condition(&st, "Ready").unwrap().2.contains("ghost-node"));
    assert!(c.cri_has_image(n1, &img).await.unwrap());
}

/// Keeps the agent off `node` (the DaemonSet's affinity honours the label)
/// until dropped.
struct AgentAway<'a> {
    c: &'a Cluster,
    node: String,
}

impl<'a> AgentAway<'a> {
    async fn new(c: &'a Cluster, node: &str) -> AgentAway<'a> {
        c.kubectl(&[
            "label",
            "node",
            node,
            "berth.dev/agent=disabled",
            "--overwrite",
        ])
        .unwrap();
        let pods: Api<Pod> = Api::namespaced(c.client.clone(), NAMESPACE);
        eventually(WAIT, "the agent pod gone from the node", || async {
            let list = pods
                .list(
                    &ListParams::default()
                        .labels("app.kubernetes.io/name=berth-node-agent")
                        .fields(&format!("spec.nodeName={node}")),
                )
                .await?;
            Ok(list.items.is_empty().then_some(()))
        })
        .await
        .unwrap();
        AgentAway {
            c,
            node: node.to_string(),
        }
    }
}

impl Drop for AgentAway<'_> {
    fn drop(&mut self) {
        let _ = self
            .c
            .kubectl(&["label", "node", &self.node, "berth.dev/agent-"]);
    }
}

#[tokio::test]
async fn deleting_a_cache_waits_for_a_node_whose_agent_is_away_and_removes_its_copy_on_return() {
    let c = Cluster::from_env().await.unwrap();
    let img = c.fresh_image("away").await.unwrap();
    let (n1, n2) = (c.nodes[0].clone(), c.nodes[1].clone());
    let ns = Ns::new(&c, "away");
    ns.apply_cache(
        "away",
        &format!("  images: [{{ref: \"{img}\"}}]\n  deletionPolicy: RemoveFromNodes\n"),
    );
    let st = ns
        .wait("away", "Ready on both nodes, both recorded", |ic| {
            phase(ic) == "Ready"
                && ic
                    .status
                    .as_ref()
                    .is_some_and(|s| s.nodes_holding.contains(&n1) && s.nodes_holding.contains(&n2))
        })
        .await;
    assert_eq!(st.status.unwrap().nodes.ready as usize, c.nodes.len());

    let away = AgentAway::new(&c, &n2).await;
    ns.caches()
        .delete("away", &DeleteParams::default())
        .await
        .unwrap();
    // Node 1's copy goes: the coordinator has acted on the deletion...
    eventually(
        WAIT,
        "the copy on the node with an agent removed",
        || async { Ok((!c.cri_has_image(&n1, &img).await?).then_some(())) },
    )
    .await
    .unwrap();
    // ...and still holds the cache for the node it cannot reach.
    let held = ns.caches().get_opt("away").await.unwrap();
    assert!(
        held.as_ref()
            .is_some_and(|ic| ic.metadata.deletion_timestamp.is_some()),
        "the finalizer let go while {n2} still holds {img}"
    );
    assert!(c.cri_has_image(&n2, &img).await.unwrap());

    // The agent returns: it removes its copy, then the cache is gone.
    drop(away);
    eventually(
        Duration::from_secs(180),
        "the away node's copy removed",
        || async { Ok((!c.cri_has_image(&n2, &img).await?).then_some(())) },
    )
    .await
    .unwrap();
    eventually(WAIT, "the cache gone", || async {
        Ok(ns.caches().get_opt("away").await?.is_none().then_some(()))
    })
    .await
    .unwrap();
}
