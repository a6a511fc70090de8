//! ImageCache on the real local cluster, checked through CRI on each node,
//! not only through Berth's own status.
//!
//! Each test uses its own namespace and node label and images it pushes to
//! the registry itself (unique repository, tag and digest), so it passes
//! whatever other caches hold; it deletes what it made.
//! Run with `--test-threads=1`.

use std::time::Duration;

use berth_coordinator::imagecache::crd::ImageCache;
use berth_e2e::{Cluster, NAMESPACE, RegistryLog, TestNamespace, eventually, phase};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams};

const WAIT: Duration = Duration::from_secs(60);

/// A namespace and a node label for one test, both gone when dropped.
struct Scope<'a> {
    c: &'a Cluster,
    ns: TestNamespace<'a>,
    label: String,
}

impl<'a> Scope<'a> {
    fn new(c: &'a Cluster, name: &str) -> Scope<'a> {
        let ns = TestNamespace::new(c, &format!("ic-{name}"));
        for node in &c.nodes {
            c.kubectl(&["label", "node", node, &format!("berth-e2e/{name}-")])
                .unwrap();
        }
        Scope {
            c,
            ns,
            label: format!("berth-e2e/{name}"),
        }
    }

    fn label(&self, node: &str, on: bool) {
        let arg = if on {
            format!("{}=yes", self.label)
        } else {
            format!("{}-", self.label)
        };
        self.c
            .kubectl(&["label", "node", node, &arg, "--overwrite"])
            .unwrap();
    }

    fn apply_cache(&self, name: &str, spec: &str) {
        self.ns.apply_cache(name, spec);
    }

    fn caches(&self) -> Api<ImageCache> {
        self.ns.caches()
    }

    /// Waits until the cache's status satisfies `ok`.
    async fn wait_status(
        &self,
        name: &str,
        what: &str,
        ok: impl Fn(&ImageCache) -> bool,
    ) -> ImageCache {
        self.ns.wait_status(name, WAIT, what, ok).await
    }

    async fn wait_gone(&self, name: &str) {
        let api = self.caches();
        eventually(WAIT, "the cache to be deleted", || async {
            Ok(api.get_opt(name).await?.is_none().then_some(()))
        })
        .await
        .unwrap();
    }
}

impl Drop for Scope<'_> {
    fn drop(&mut self) {
        for node in &self.c.nodes {
            let _ = self
                .c
                .kubectl(&["label", "node", node, &format!("{}-", self.label)]);
        }
    }
}

/// A new image of this test's own (see [`Cluster::fresh_image`]).
async fn fresh(c: &Cluster, name: &str) -> String {
    c.fresh_image(name).await.unwrap()
}

async fn wait_on_node(c: &Cluster, node: &str, image: &str, present: bool) {
    eventually(
        WAIT,
        &format!("{image} present={present} on {node}"),
        || async { Ok((c.cri_has_image(node, image).await? == present).then_some(())) },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_cache_puts_its_images_on_the_selected_nodes_only_and_reports_ready() {
    let c = Cluster::from_env().await.unwrap();
    let s = Scope::new(&c, "select");
    let (a, b) = (fresh(&c, "select-a").await, fresh(&c, "select-b").await);
    let (n1, n2) = (&c.nodes[0], &c.nodes[1]);
    s.label(n1, true);
    s.apply_cache(
        "sel",
        &format!(
            r#"  images: [{{ref: "{a}"}}, {{ref: "{b}", pullTimeout: 2m}}]
  nodeSelector: {{matchLabels: {{"{label}": "yes"}}}}
"#,
            label = s.label
        ),
    );
    let ready = s
        .wait_status("sel", "Ready", |ic| phase(ic) == "Ready")
        .await;
    let st = ready.status.unwrap();
    assert_eq!(
        (st.nodes.target, st.nodes.ready, st.nodes.failed),
        (1, 1, 0)
    );
    assert!(
        st.images
            .iter()
            .all(|i| i.ready_nodes == 1 && i.image_id.is_some())
    );
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    );
    for i in [&a, &b] {
        assert!(c.cri_has_image(n1, i).await.unwrap(), "{i} on {n1}");
        assert!(!c.cri_has_image(n2, i).await.unwrap(), "{i} on {n2}");
    }
    // The printer columns read the status.
    let row = c
        .kubectl(&["get", "ic", "sel", "-n", &s.ns.name, "--no-headers"])
        .unwrap();
    assert!(
        row.split_whitespace()
            .take(4)
            .eq(["sel", "1", "1", "Ready"]),
        "{row}"
    );
}

#[tokio::test]
async fn images_follow_relabelled_nodes_and_selector_changes_both_ways() {
    let c = Cluster::from_env().await.unwrap();
    let s = Scope::new(&c, "follow");
    let (n1, n2) = (&c.nodes[0], &c.nodes[1]);
    let img = fresh(&c, "follow").await;
    s.label(n1, true);
    let cache = |selector: &str| {
        format!(
            r#"
apiVersion: berth.dev/v1alpha1
kind: ImageCache
metadata: {{name: follow, namespace: {ns}}}
spec:
  images: [{{ref: "{img}"}}]
  deletionPolicy: RemoveFromNodes
  {selector}
"#,
            ns = s.ns.name
        )
    };
    c.apply(&cache(&format!(
        r#"nodeSelector: {{matchLabels: {{"{}": "yes"}}}}"#,
        s.label
    )))
    .unwrap();
    wait_on_node(&c, n1, &img, true).await;
    assert!(!c.cri_has_image(n2, &img).await.unwrap());

    // Relabel: the image moves to the newly selected node and leaves the old one.
    s.label(n2, true);
    s.label(n1, false);
    wait_on_node(&c, n2, &img, true).await;
    wait_on_node(&c, n1, &img, false).await;

    // Change the selector to a node name: back again.
    c.apply(&cache(&format!("nodeNames: [{n1}]"))).unwrap();
    wait_on_node(&c, n1, &img, true).await;
    wait_on_node(&c, n2, &img, false).await;
    s.wait_status("follow", "Ready on the named node", |ic| {
        phase(ic) == "Ready" && ic.status.as_ref().unwrap().nodes.target == 1
    })
    .await;
}

#[tokio::test]
async fn an_image_removed_behind_berths_back_is_pulled_again() {
    let c = Cluster::from_env().await.unwrap();
    let s = Scope::new(&c, "drift");
    let n2 = &c.nodes[1];
    let img = fresh(&c, "drift").await;
    s.apply_cache(
        "drift",
        &format!(
            r#"  images: [{{ref: "{img}"}}]
  nodeNames: [{n2}]
"#
        ),
    );
    wait_on_node(&c, n2, &img, true).await;
    // As kubelet image GC would.
    c.cri_remove(n2, &img).await.unwrap();
    assert!(!c.cri_has_image(n2, &img).await.unwrap());
    wait_on_node(&c, n2, &img, true).await;
}

#[tokio::test]
async fn shared_images_stay_until_the_last_cache_goes_and_images_in_use_are_never_removed() {
    let c = Cluster::from_env().await.unwrap();
    let s = Scope::new(&c, "shared");
    let n2 = &c.nodes[1];
    let (shared, used) = (fresh(&c, "shared").await, fresh(&c, "used").await);
    let cache = |name: &str, img: &str| {
        format!(
            r#"
apiVersion: berth.dev/v1alpha1
kind: ImageCache
metadata: {{name: {name}, namespace: {ns}}}
spec:
  images: [{{ref: "{img}"}}]
  nodeNames: [{n2}]
  deletionPolicy: RemoveFromNodes
"#,
            ns = s.ns.name
        )
    };
    c.apply(&cache("one", &shared)).unwrap();
    c.apply(&cache("two", &shared)).unwrap();
    c.apply(&cache("three", &used)).unwrap();
    for name in ["one", "two", "three"] {
        s.wait_status(name, "Ready", |ic| phase(ic) == "Ready")
            .await;
    }
    // A pod on the node runs from the cached image (no pull: it is there).
    c.apply(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: user, namespace: {ns}}}
spec:
  nodeName: {n2}
  terminationGracePeriodSeconds: 0
  containers:
  - {{name: c, image: "{used}", imagePullPolicy: Never, command: [sleep, "3600"]}}
"#,
        ns = s.ns.name
    ))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), &s.ns.name);
    eventually(WAIT, "the pod running", || async {
        let p = pods.get("user").await?;
        Ok((p.status.and_then(|s| s.phase).as_deref() == Some("Running")).then_some(()))
    })
    .await
    .unwrap();

    s.caches()
        .delete("one", &DeleteParams::default())
        .await
        .unwrap();
    s.wait_gone("one").await;
    assert!(
        c.cri_has_image(n2, &shared).await.unwrap(),
        "cache two still wants it"
    );

    // Cache three (the in-use image) goes first, then two (the shared one):
    // once the shared image is gone, every removal the coordinator planned
    // for both has run, so the in-use image still being there is the verdict.
    s.caches()
        .delete("three", &DeleteParams::default())
        .await
        .unwrap();
    s.wait_gone("three").await;
    s.caches()
        .delete("two", &DeleteParams::default())
        .await
        .unwrap();
    s.wait_gone("two").await;
    wait_on_node(&c, n2, &shared, false).await;
    assert!(
        c.cri_has_image(n2, &used).await.unwrap(),
        "a running pod uses it"
    );
    let p = pods.get("user").await.unwrap();
    assert_eq!(p.status.and_then(|s| s.phase).as_deref(), Some("Running"));
    pods.delete("user", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_private_image_is_cached_with_its_pull_secret_and_a_wrong_secret_degrades_with_auth_failed()
 {
    let c = Cluster::from_env().await.unwrap();
    let private = c.fresh_private_image("cached").await.unwrap();
    let s = Scope::new(&c, "private");
    let (n1, n2) = (&c.nodes[0], &c.nodes[1]);
    for (name, password) in [("good", c.var("BERTH_AUTH_PASSWORD")), ("bad", "wrong")] {
        c.kubectl(&[
            "-n",
            &s.ns.name,
            "create",
            "secret",
            "docker-registry",
            name,
            "--docker-server",
            c.auth_registry(),
            "--docker-username",
            c.var("BERTH_AUTH_USER"),
            "--docker-password",
            password,
        ])
        .unwrap();
    }
    // The coordinator reads pull Secrets only where a namespace allows it.
    c.kubectl(&[
        "-n",
        &s.ns.name,
        "create",
        "rolebinding",
        "berth-pull-secret-reader",
        "--clusterrole=berth-pull-secret-reader",
        "--serviceaccount=berth-system:berth-coordinator",
    ])
    .unwrap();
    let cache = |name: &str, node: &str, secret: &str| {
        format!(
            r#"
apiVersion: berth.dev/v1alpha1
kind: ImageCache
metadata: {{name: {name}, namespace: {ns}}}
spec:
  images: [{{ref: "{private}"}}]
  nodeNames: [{node}]
  imagePullSecrets: [{{name: {secret}}}]
"#,
            ns = s.ns.name
        )
    };
    c.apply(&cache("good", n1, "good")).unwrap();
    c.apply(&cache("bad", n2, "bad")).unwrap();
    s.wait_status("good", "Ready", |ic| phase(ic) == "Ready")
        .await;
    assert!(c.cri_has_image(n1, &private).await.unwrap());

    let bad = s
        .wait_status("bad", "Degraded", |ic| phase(ic) == "Degraded")
        .await
        .status
        .unwrap();
    let degraded = bad
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "AuthFailed")
    );
    assert_eq!(bad.images[0].failure_reasons.get("AuthFailed"), Some(&1));
    assert_eq!(bad.images[0].failed_nodes_sample[0].node, *n2);
    assert!(!c.cri_has_image(n2, &private).await.unwrap());
}

#[tokio::test]
async fn a_missing_image_is_retried_with_backoff_and_cached_once_it_is_pushed() {
    let c = Cluster::from_env().await.unwrap();
    let s = Scope::new(&c, "late");
    let n1 = &c.nodes[0];
    let late = format!(
        "{}/e2e/late-{}:1",
        c.registry(),
        berth_e2e::registry::unique_suffix()
    );
    s.apply_cache(
        "late",
        &format!(
            r#"  images: [{{ref: "{late}"}}]
  nodeNames: [{n1}]
"#
        ),
    );
    // Retries happen, and back off: the delay after the third failure is
    // 2–4 s (1 s doubling, ±50 % jitter), and longer after later ones, so
    // once two consecutive attempts k and k+1 (k ≥ 3) have both been seen,
    // the second came well after the first. (A poll can miss an attempt on
    // a loaded machine; then the next pair decides.)
    let pf = c.port_forward("berth-coordinator", 7070).unwrap();
    let seen: std::sync::Mutex<Vec<(u64, std::time::Instant)>> = Default::default();
    let consecutive = |seen: &[(u64, std::time::Instant)]| {
        seen.windows(2)
            .find(|w| w[0].0 >= 3 && w[1].0 == w[0].0 + 1)
            .map(|w| (w[0], w[1]))
    };
    eventually(
        Duration::from_secs(90),
        "two consecutive late attempts seen",
        || async {
            let detail = c
                .api_grpcurl(&[
                    "-d",
                    &format!(r#"{{"namespace": "{}", "name": "late"}}"#, s.ns.name),
                    &pf.addr(),
                    "berth.v1.Inventory/GetImageCache",
                ])
                .await?;
            let v: serde_json::Value = serde_json::from_str(&detail)?;
            let img = &v["nodes"][0]["images"][0];
            anyhow::ensure!(img["state"] == "Failed", "{detail}");
            anyhow::ensure!(img["reason"] == "ImageNotFound", "{detail}");
            let attempts = img["attempts"].as_u64().unwrap_or_default();
            let mut seen = seen.lock().unwrap();
            if seen.last().is_none_or(|(a, _)| *a < attempts) {
                seen.push((attempts, std::time::Instant::now()));
            }
            Ok(consecutive(&seen).map(|_| ()))
        },
    )
    .await
    .unwrap();
    let seen = seen.into_inner().unwrap();
    let ((k, first), (_, second)) = consecutive(&seen).unwrap();
    assert!(
        second.duration_since(first) >= Duration::from_millis(1500),
        "attempt {} came {:?} after attempt {k}: no backoff ({seen:?})",
        k + 1,
        second.duration_since(first)
    );
    // Once the image exists, a later retry caches it without anyone's help.
    c.push_variant(&late, "1").await.unwrap();
    s.wait_status("late", "Ready once the image exists", |ic| {
        phase(ic) == "Ready"
    })
    .await;
    assert!(c.cri_has_image(n1, &late).await.unwrap());
}

#[tokio::test]
async fn invalid_specs_are_refused_at_admission_with_a_clear_message() {
    let c = Cluster::from_env().await.unwrap();
    let s = Scope::new(&c, "invalid");
    let long_repo = format!(r#"images: [{{ref: "r.io/{}:1"}}]"#, "a".repeat(300));
    let digest = format!("sha256:{}", "ab".repeat(32));
    let track_digest = format!(
        r#"images: [{{ref: "r.io/a:1@{digest}"}}]
  updatePolicy: {{type: TrackTag}}"#
    );
    let cases: [(&str, &str); 22] = [
        ("images: []", "should have at least 1 items"),
        (
            r#"images: [{ref: "Not/Valid:Ref"}]"#,
            "ref must be an image reference",
        ),
        (
            r#"images: [{ref: "r.io/a:1"}, {ref: "r.io/a:1"}]"#,
            "Duplicate value",
        ),
        (
            r#"images: [{ref: "r.io/a@sha256:abc"}]"#,
            "ref must be an image reference",
        ),
        (
            r#"images: [{ref: "r.io/a:1", pullTimeout: "forever"}]"#,
            "pullTimeout must be a duration",
        ),
        (
            r#"images: [{ref: "r.io/a:1", pullTimeout: "48h"}]"#,
            "pullTimeout must be a duration",
        ),
        (
            r#"images: [{ref: "r.io/a:1"}]
  rollout: {maxConcurrentNodes: 0}"#,
            "maxConcurrentNodes",
        ),
        (
            r#"images: [{ref: "r.io/a:1"}]
  deletionPolicy: Sometimes"#,
            "Unsupported value",
        ),
        (
            r#"images: [{ref: "r.io/a:1"}]
  updatePolicy: {type: TrackTag, interval: 1s}"#,
            "interval must be a duration",
        ),
        (
            r#"images: [{ref: "r.io/a:1"}]
  updatePolicy: {type: Sometimes}"#,
            "Unsupported value",
        ),
        (
            r#"images: [{ref: "r.io/a:1"}]
  nodeNames: [""]"#,
            "nodeNames must be node names",
        ),
        (
            r#"images: [{ref: "Team/app:1"}]"#,
            "ref must be an image reference",
        ),
        (
            r#"images: [{ref: "r.example:123456/a:1"}]"#,
            "ref must be an image reference",
        ),
        (&long_repo, "at most 255 characters once normalised"),
        (&track_digest, "TrackTag follows tags"),
        (
            r#"images: [{ref: "r.io/a:1"}]
  nodeNames: ["../../kube-system/x"]"#,
            "nodeNames must be node names",
        ),
        (
            r#"images: [{ref: "r.io/a:1"}]
  imagePullSecrets: [{name: "../../kube-system/x"}]"#,
            "imagePullSecrets name must be a Secret name",
        ),
        (
            r#"images: [{ref: "r.io/a:1"}]
  nodeSelector: {matchExpressions: [{key: pool, operator: Gt, values: ["1"]}]}"#,
            "Unsupported value",
        ),
        (
            r#"images: [{ref: "r.io/a:1"}]
  nodeSelector: {matchExpressions: [{key: pool, operator: In}]}"#,
            "In and NotIn need values",
        ),
        (
            r#"images: [{ref: "r.io/a:1"}]
  nodeSelector: {matchExpressions: [{key: pool, operator: Exists, values: [a]}]}"#,
            "In and NotIn need values",
        ),
        (
            r#"images: [{ref: "r.io/a:1"}]
  nodeSelector: {matchExpressions: [{key: "bad key", operator: Exists}]}"#,
            "must be a label key",
        ),
        (
            r#"images: [{ref: "r.io/a:1"}]
  nodeSelector: {matchLabels: {pool: "-x"}}"#,
            "matchLabels values must be label values",
        ),
    ];
    for (spec, expected) in cases {
        let yaml = format!(
            "apiVersion: berth.dev/v1alpha1\nkind: ImageCache\nmetadata: {{name: bad, namespace: {}}}\nspec:\n  {spec}\n",
            s.ns.name
        );
        let (ok, _, err) = c.kubectl_stdin(&["apply", "-f", "-"], &yaml).unwrap();
        assert!(!ok, "accepted: {spec}");
        assert!(err.contains(expected), "{spec}\n→ {err}");
    }
    assert!(
        s.caches()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    // The same grammar admits what the controller can use.
    for (i, spec) in [
        format!(r#"images: [{{ref: "r.io/a:1@{digest}"}}]"#),
        r#"images: [{ref: "r.io/a:1", pullTimeout: "1.5h"}]"#.to_string(),
    ]
    .iter()
    .enumerate()
    {
        let yaml = format!(
            "apiVersion: berth.dev/v1alpha1\nkind: ImageCache\nmetadata: {{name: good{i}, namespace: {}}}\nspec:\n  {spec}\n  paused: true\n",
            s.ns.name
        );
        let (ok, _, err) = c.kubectl_stdin(&["apply", "-f", "-"], &yaml).unwrap();
        assert!(ok, "refused: {spec}\n→ {err}");
    }
}

/// Runs `cluster.sh up` when dropped: idempotent, it restarts only what is
/// not running (here the registry the outage test killed).
struct RestartRegistry(&'static str);

impl Drop for RestartRegistry {
    fn drop(&mut self) {
        let up = std::process::Command::new(self.0).arg("up").output();
        match up {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "cluster.sh up failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("cluster.sh up did not run: {e}"),
        }
    }
}

#[tokio::test]
async fn a_registry_outage_degrades_the_cache_and_it_recovers_by_itself() {
    let c = Cluster::from_env().await.unwrap();
    if !c.local {
        berth_e2e::missing_prerequisite(
            "the registry outage test stops the local cluster's registry; this is another cluster",
        );
        return;
    }
    let s = Scope::new(&c, "outage");
    let n1 = &c.nodes[0];
    let img = fresh(&c, "outage").await;
    let cluster_sh = concat!(env!("CARGO_MANIFEST_DIR"), "/cluster.sh");
    let pid_file = format!("{}/pids/registry-plain.pid", c.var("BERTH_E2E_DIR"));
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    // SIGKILL: an outage, not a graceful drain (a draining registry still
    // counts as running to `cluster.sh up`).
    let pid = pid.trim().to_string();
    // Brings the registry back however the test ends, so later tests have it.
    let restart = RestartRegistry(cluster_sh);
    std::process::Command::new("kill")
        .args(["-9", &pid])
        .status()
        .unwrap();
    eventually(WAIT, "the registry to stop", || async {
        let gone = !std::path::Path::new(&format!("/proc/{pid}")).exists();
        Ok((gone && std::net::TcpStream::connect(c.registry()).is_err()).then_some(()))
    })
    .await
    .unwrap();

    s.apply_cache(
        "outage",
        &format!(
            r#"  images: [{{ref: "{img}"}}]
  nodeNames: [{n1}]
"#
        ),
    );
    let st = s
        .wait_status("outage", "Degraded", |ic| phase(ic) == "Degraded")
        .await
        .status
        .unwrap();
    assert_eq!(
        st.images[0].failure_reasons.get("RegistryUnreachable"),
        Some(&1),
        "{st:?}"
    );

    drop(restart);
    s.wait_status("outage", "Ready after the registry returned", |ic| {
        phase(ic) == "Ready"
    })
    .await;
    assert!(c.cri_has_image(n1, &img).await.unwrap());
}

#[tokio::test]
async fn killing_the_agent_and_the_coordinator_during_a_rollout_still_converges() {
    let c = Cluster::from_env().await.unwrap();
    let s = Scope::new(&c, "crash");
    let img = fresh(&c, "crash").await;
    // The registry's access log counts the pulls that reach it.
    let log = RegistryLog::mark(&c);
    s.apply_cache(
        "crash",
        &format!(
            r#"  images: [{{ref: "{img}"}}]
"#
        ),
    );
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), NAMESPACE);
    let mut killed_on = None;
    for label in [
        "app.kubernetes.io/name=berth-node-agent",
        // The leader: killing the standby would change nothing.
        "app.kubernetes.io/name=berth-coordinator,berth.dev/leader=true",
    ] {
        let list = pods
            .list(&ListParams::default().labels(label))
            .await
            .unwrap();
        let victim = list.items.into_iter().next().unwrap();
        if label.contains("node-agent") {
            killed_on = victim.spec.as_ref().and_then(|s| s.node_name.clone());
        }
        pods.delete(
            &victim.metadata.name.unwrap(),
            &DeleteParams::default().grace_period(0),
        )
        .await
        .unwrap();
    }
    let st = s
        .wait_status("crash", "Ready on every node", |ic| {
            phase(ic) == "Ready"
                && ic.status.as_ref().unwrap().nodes.ready as usize == c.nodes.len()
        })
        .await
        .status
        .unwrap();
    assert_eq!(st.nodes.target as usize, c.nodes.len());
    for n in &c.nodes {
        wait_on_node(&c, n, &img, true).await;
    }
    // The node whose agent lived through the coordinator's restart got the
    // resent pull task but pulled once: its tag was resolved at most once.
    if !c.local {
        berth_e2e::missing_prerequisite(&format!(
            "{} counts pulls in the registry's access log, which only the local cluster exposes",
            "the crash test"
        ));
    } else {
        let survivor = c
            .nodes
            .iter()
            .find(|n| Some(*n) != killed_on.as_ref())
            .unwrap();
        let pulls = log.manifest_fetches(&c, survivor, &img).await.unwrap();
        assert_eq!(pulls, 1, "{survivor} pulled {img} {pulls} times");
    }
}

/// Sets the agents' disk threshold and waits for them to restart with it.
fn set_disk_threshold(c: &Cluster, percent: &str) {
    c.kubectl(&[
        "-n",
        NAMESPACE,
        "set",
        "env",
        "ds/berth-node-agent",
        &format!("BERTH_DISK_THRESHOLD={percent}"),
    ])
    .unwrap();
    c.kubectl(&[
        "-n",
        NAMESPACE,
        "rollout",
        "status",
        "ds/berth-node-agent",
        "--timeout=120s",
    ])
    .unwrap();
}

/// The agents' threshold as installed.
fn disk_threshold(c: &Cluster) -> String {
    c.kubectl(&[
        "-n",
        NAMESPACE,
        "get",
        "ds/berth-node-agent",
        "-o",
        r#"jsonpath={.spec.template.spec.containers[0].env[?(@.name=="BERTH_DISK_THRESHOLD")].value}"#,
    ])
    .unwrap()
}

/// Puts the installed threshold back even when the test fails.
struct RestoreThreshold<'a>(&'a Cluster, String);

impl Drop for RestoreThreshold<'_> {
    fn drop(&mut self) {
        set_disk_threshold(self.0, &self.1);
    }
}

#[tokio::test]
async fn the_disk_guard_refuses_pulls_past_its_threshold_and_says_so() {
    let c = Cluster::from_env().await.unwrap();
    let s = Scope::new(&c, "disk");
    let n1 = &c.nodes[0];
    let img = fresh(&c, "disk").await;
    let installed = disk_threshold(&c);
    assert!(
        !installed.is_empty(),
        "BERTH_DISK_THRESHOLD not set on the agents"
    );
    let restore = RestoreThreshold(&c, installed);
    // Any real filesystem is fuller than 1 %.
    set_disk_threshold(&c, "1");
    s.apply_cache(
        "disk",
        &format!(
            r#"  images: [{{ref: "{img}"}}]
  nodeNames: [{n1}]
"#
        ),
    );
    let st = s
        .wait_status("disk", "Degraded by the disk guard", |ic| {
            phase(ic) == "Degraded"
        })
        .await
        .status
        .unwrap();
    assert_eq!(
        st.images[0].failure_reasons.get("DiskPressure"),
        Some(&1),
        "{st:?}"
    );
    let message = &st.images[0].failed_nodes_sample[0].message;
    assert!(message.contains("the limit is 1%"), "{message}");
    // No node held the image: its size came from the registry's manifest.
    assert!(
        message.contains("would bring") && !message.contains("is unknown"),
        "{message}"
    );
    assert!(!c.cri_has_image(n1, &img).await.unwrap());

    drop(restore);
    s.wait_status("disk", "Ready once the threshold allows it", |ic| {
        phase(ic) == "Ready"
    })
    .await;
    assert!(c.cri_has_image(n1, &img).await.unwrap());
}

/// `GET /metrics` from the coordinator, through a port-forward.
fn scrape(c: &Cluster) -> String {
    use std::io::{Read, Write};
    let pf = c.port_forward("berth-coordinator", 9090).unwrap();
    let mut conn = std::net::TcpStream::connect(pf.addr()).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    conn.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test]
async fn metrics_show_connected_agents_tasks_and_cache_states() {
    let c = Cluster::from_env().await.unwrap();
    let s = Scope::new(&c, "metrics");
    let img = fresh(&c, "metrics").await;
    let n2 = &c.nodes[1];
    s.apply_cache(
        "m",
        &format!(
            r#"  images: [{{ref: "{img}"}}]
  nodeNames: [{n2}]
"#,
        ),
    );
    s.wait_status("m", "Ready", |ic| phase(ic) == "Ready").await;
    let text = eventually(WAIT, "metrics of the ready cache", || async {
        let text = scrape(&c);
        let want = format!(
            "berth_imagecache_nodes{{namespace=\"{}\",name=\"m\",state=\"ready\"}} 1",
            s.ns.name
        );
        Ok(text.contains(&want).then_some(text))
    })
    .await
    .unwrap();
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    assert!(
        text.contains(&format!("berth_agents_connected {}", c.nodes.len())),
        "{text}"
    );
    assert!(
        text.contains("berth_task_results_total{kind=\"pull\",result=\"done\",reason=\"\"}"),
        "{text}"
    );
    assert!(
        // OpenMetrics names a counter family without its `_total` samples' suffix.
        text.contains("# TYPE berth_status_writes counter"),
        "{text}"
    );
}

/// The image ID the node's runtime has for `reference`.
async fn image_id(c: &Cluster, node: &str, reference: &str) -> Option<String> {
    let spec = k8s_cri::v1::ImageSpec {
        image: reference.to_string(),
        ..Default::default()
    };
    let r = c
        .cri(node)
        .await
        .unwrap()
        .image_status(k8s_cri::v1::ImageStatusRequest {
            image: Some(spec),
            verbose: false,
        })
        .await
        .unwrap();
    r.into_inner().image.map(|i| i.id)
}

#[tokio::test]
async fn a_tracked_tag_moves_every_selected_node_to_its_new_digest() {
    let c = Cluster::from_env().await.unwrap();
    let s = Scope::new(&c, "track");
    let n1 = &c.nodes[0];
    let tracked = fresh(&c, "track").await;
    s.apply_cache(
        "track",
        &format!(
            r#"  images: [{{ref: "{tracked}"}}]
  nodeNames: [{n1}]
  updatePolicy: {{type: TrackTag, interval: 10s}}
"#
        ),
    );
    let first = s
        .wait_status("track", "Ready with a digest", |ic| {
            phase(ic) == "Ready" && ic.status.as_ref().unwrap().images[0].digest.is_some()
        })
        .await
        .status
        .unwrap();
    let old_id = image_id(&c, n1, &tracked).await.expect("pulled");

    // The tag moves to other content; within an interval or two the node follows.
    let next = c.push_variant(&tracked, "next").await.unwrap();
    c.retag_image(&next, &tracked).await.unwrap();
    let new_digest = eventually(
        Duration::from_secs(90),
        "the new digest in status",
        || async {
            let st = s.caches().get("track").await?.status.unwrap_or_default();
            let d = st.images.first().and_then(|i| i.digest.clone());
            Ok(d.filter(|d| Some(d) != first.images[0].digest.as_ref()))
        },
    )
    .await
    .unwrap();
    eventually(WAIT, "the node on the new content", || async {
        let id = image_id(&c, n1, &tracked).await;
        Ok(id.filter(|id| *id != old_id).map(|_| ()))
    })
    .await
    .unwrap();
    let st = s
        .wait_status("track", "Ready on the new digest", |ic| {
            phase(ic) == "Ready"
        })
        .await
        .status
        .unwrap();
    assert_eq!(st.images[0].digest.as_deref(), Some(new_digest.as_str()));
}
