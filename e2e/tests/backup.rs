//! ImageBackup on the real local cluster, checked against the registries
//! themselves (manifests and blobs read back, uploads counted in the
//! target's access log), not only through Berth's status.
//!
//! Each test owns its registries (Debian's docker-registry on a scratch
//! port, [`ScratchRegistry`]), its images, its namespace and a BackupPolicy
//! that covers only that namespace; it deletes what it made.

use std::time::Duration;

use berth_coordinator::backup::crd::ImageBackup;
use berth_e2e::registry::{tar_layer, unique_suffix};
use berth_e2e::scratch::ScratchRegistry;
use berth_e2e::{Cluster, NAMESPACE, TestNamespace, eventually};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use sha2::{Digest, Sha256};

const WAIT: Duration = Duration::from_secs(120);

/// A namespace, a policy covering only it, and the target's Secret.
struct Scope<'a> {
    c: &'a Cluster,
    ns: TestNamespace<'a>,
    policy: String,
}

impl<'a> Scope<'a> {
    /// `policy_spec` is the YAML under `spec:` minus `namespaces`, indented
    /// two spaces; `target_creds` go into a dockerconfigjson Secret for
    /// `target_host` that the policy names.
    fn new(
        c: &'a Cluster,
        name: &str,
        target_host: &str,
        target_creds: Option<(&str, &str)>,
        policy_spec: &str,
    ) -> Scope<'a> {
        let ns = TestNamespace::new(c, &format!("bk-{name}"));
        let policy = ns.name.clone();
        let mut spec = policy_spec.to_string();
        if let Some((u, p)) = target_creds {
            c.kubectl(&[
                "-n",
                NAMESPACE,
                "create",
                "secret",
                "docker-registry",
                &policy,
                &format!("--docker-server={target_host}"),
                &format!("--docker-username={u}"),
                &format!("--docker-password={p}"),
            ])
            .unwrap();
            // In the workloads' namespace too, so the nodes can pull the copies.
            c.kubectl(&[
                "-n",
                &ns.name,
                "create",
                "secret",
                "docker-registry",
                "backup-pull",
                &format!("--docker-server={target_host}"),
                &format!("--docker-username={u}"),
                &format!("--docker-password={p}"),
            ])
            .unwrap();
            spec = spec.replace(
                "  target:\n",
                &format!("  target:\n    credentialsSecret: {{name: {policy}}}\n"),
            );
        }
        c.apply(&format!(
            "apiVersion: berth.dev/v1alpha1\nkind: BackupPolicy\nmetadata: {{name: {policy}}}\nspec:\n{spec}  namespaces: {{include: [{}]}}\n",
            ns.name
        ))
        .unwrap();
        Scope { c, ns, policy }
    }

    /// A workload (`deployment` or `daemonset`) running `image` (`sleep`),
    /// with the copies' pull Secret and `annotations`.
    fn workload(&self, kind: &str, name: &str, image: &str, annotations: &str) {
        let (api_kind, extra) = match kind {
            "deployment" => ("Deployment", "  replicas: 1\n"),
            _ => ("DaemonSet", ""),
        };
        let secret = if self
            .c
            .kubectl(&["-n", &self.ns.name, "get", "secret", "backup-pull"])
            .is_ok()
        {
            "      imagePullSecrets: [{name: backup-pull}]\n"
        } else {
            ""
        };
        self.c
            .apply(&format!(
                "apiVersion: apps/v1\nkind: {api_kind}\nmetadata:\n  name: {name}\n  namespace: {ns}\n  annotations: {{{annotations}}}\nspec:\n{extra}  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n{secret}      terminationGracePeriodSeconds: 0\n      tolerations: [{{operator: Exists}}]\n      containers:\n      - {{name: main, image: \"{image}\", command: [sleep, \"3600\"]}}\n",
                ns = self.ns.name
            ))
            .unwrap();
    }

    fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.c.client.clone(), &self.ns.name)
    }

    fn daemonsets(&self) -> Api<DaemonSet> {
        Api::namespaced(self.c.client.clone(), &self.ns.name)
    }

    /// The ImageBackups of `source`.
    async fn backups_of(&self, source: &str) -> anyhow::Result<Vec<ImageBackup>> {
        let api: Api<ImageBackup> = Api::all(self.c.client.clone());
        Ok(api
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|b| b.spec.source == source)
            .collect())
    }

    /// Waits until the one ImageBackup of `source` satisfies `ok`.
    async fn wait_backup(
        &self,
        source: &str,
        what: &str,
        ok: impl Fn(&ImageBackup) -> bool,
    ) -> ImageBackup {
        eventually(WAIT, what, || async {
            let b = self.backups_of(source).await?;
            anyhow::ensure!(b.len() <= 1, "{} ImageBackups of {source}", b.len());
            Ok(b.into_iter().next().filter(|b| ok(b)))
        })
        .await
        .unwrap()
    }

    /// Waits until the workload's image is `want`.
    async fn wait_image(&self, kind: &str, name: &str, want: &str) {
        eventually(WAIT, &format!("{kind}/{name} on {want}"), || async {
            let spec = match kind {
                "deployment" => self.deployments().get(name).await?.spec.map(|s| s.template),
                _ => self.daemonsets().get(name).await?.spec.map(|s| s.template),
            };
            let image = spec
                .and_then(|t| t.spec)
                .and_then(|s| s.containers.first().and_then(|c| c.image.clone()));
            Ok((image.as_deref() == Some(want)).then_some(()))
        })
        .await
        .unwrap();
    }

    /// Waits until every pod of `app` runs `image`, ready, and there are `n`.
    async fn wait_pods(&self, app: &str, image: &str, n: usize) {
        let pods: Api<Pod> = Api::namespaced(self.c.client.clone(), &self.ns.name);
        eventually(
            WAIT,
            &format!("{n} ready pods of {app} on {image}"),
            || async {
                let list = pods
                    .list(&ListParams::default().labels(&format!("app={app}")))
                    .await?;
                let ready = list
                    .items
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .filter(|p| {
                        p.spec
                            .as_ref()
                            .is_some_and(|s| s.containers[0].image.as_deref() == Some(image))
                            && p.status.as_ref().is_some_and(|s| {
                                s.conditions
                                    .iter()
                                    .flatten()
                                    .any(|c| c.type_ == "Ready" && c.status == "True")
                            })
                    })
                    .count();
                Ok((ready == n).then_some(()))
            },
        )
        .await
        .unwrap();
    }
}

impl Drop for Scope<'_> {
    fn drop(&mut self) {
        let _ = self
            .c
            .kubectl(&["delete", "backuppolicy", &self.policy, "--wait=false"]);
        let _ = self.c.kubectl(&[
            "-n",
            NAMESPACE,
            "delete",
            "secret",
            &self.policy,
            "--ignore-not-found",
        ]);
        if let Ok(list) = self.c.kubectl(&[
            "get",
            "imagebackups",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.spec.policy}{\"\\n\"}{end}",
        ]) {
            for line in list.lines() {
                if let Some((name, policy)) = line.split_once(' ')
                    && policy == self.policy
                {
                    let _ = self
                        .c
                        .kubectl(&["delete", "imagebackup", name, "--wait=false"]);
                }
            }
        }
    }
}

/// Busybox plus a unique marker, pushed to `reg` as `repo:tag`; returns
/// `host/repo:tag`. Busybox is copied in first (skopeo) as `e2e/busybox`.
async fn image_in(c: &Cluster, reg: &ScratchRegistry, name: &str) -> String {
    if reg
        .client()
        .get_manifest("e2e/busybox", "1.36")
        .await
        .is_err()
    {
        reg.skopeo_copy_in(
            &format!("{}/busybox:1.36", c.registry()),
            "e2e/busybox:1.36",
        )
        .unwrap();
    }
    let repo = format!("e2e/{name}-{}", unique_suffix());
    let mark = tar_layer(&[("etc/berth-test-image", repo.as_bytes())]).unwrap();
    reg.client()
        .push_image(&repo, "1", Some(("e2e/busybox", "1.36")), vec![mark])
        .await
        .unwrap();
    format!("{}/{repo}:1", reg.host)
}

/// An index of two platforms in `reg`, `REPO:multi`: amd64 runs here
/// (busybox and a marker), arm64 is a layer of its own. Returns the
/// repository, both platform manifests and the index's digest.
async fn two_platform_index(
    c: &Cluster,
    reg: &ScratchRegistry,
) -> (String, bytes::Bytes, bytes::Bytes, String) {
    let amd = image_in(c, reg, "multi").await;
    let (repo, _) = split(&amd);
    let client = reg.client();
    let amd_raw = client.get_any_manifest(&repo, "1").await.unwrap();
    let arm_layer = tar_layer(&[("etc/arch", format!("arm64 {repo}").as_bytes())]).unwrap();
    client
        .push_image_for("arm64", &repo, "arm64", None, vec![arm_layer], None)
        .await
        .unwrap();
    let arm_raw = client.get_any_manifest(&repo, "arm64").await.unwrap();
    let index_digest = client
        .push_index(
            &repo,
            "multi",
            &[
                (sha256(&amd_raw), amd_raw.len(), "amd64"),
                (sha256(&arm_raw), arm_raw.len(), "arm64"),
            ],
        )
        .await
        .unwrap();
    (repo, amd_raw, arm_raw, index_digest)
}

fn sha256(b: &[u8]) -> String {
    format!(
        "sha256:{}",
        Sha256::digest(b)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

/// `host/repo:tag` → (repo, tag or digest).
fn split(reference: &str) -> (String, String) {
    let rest = reference.split_once('/').unwrap().1;
    match rest.split_once('@') {
        Some((repo, digest)) => (repo.to_string(), digest.to_string()),
        None => {
            let (repo, tag) = rest.rsplit_once(':').unwrap();
            (repo.to_string(), tag.to_string())
        }
    }
}

/// Removes `images` from every node's runtime.
async fn remove_everywhere(c: &Cluster, images: &[&str]) {
    for node in &c.nodes {
        for image in images {
            if c.cri_has_image(node, image).await.unwrap_or(false) {
                c.cri_remove(node, image).await.unwrap();
            }
        }
    }
}

#[tokio::test]
async fn workloads_are_copied_rolled_survive_the_source_going_away_and_restore() {
    let c = Cluster::from_env().await.unwrap();
    let mut source = ScratchRegistry::start(&c, None).await.unwrap();
    let password = unique_suffix();
    let target = ScratchRegistry::start(&c, Some(("backup", &password)))
        .await
        .unwrap();
    let s = Scope::new(
        &c,
        "roll",
        &target.host,
        Some(("backup", &password)),
        &format!(
            "  target:\n    registry: {}/keep\n  naming: Flatten\n",
            target.host
        ),
    );
    let web = image_in(&c, &source, "web").await;
    let node = image_in(&c, &source, "node").await;
    s.workload("deployment", "web", &web, "");
    s.workload("daemonset", "node", &node, "");

    for image in [&web, &node] {
        let b = s
            .wait_backup(image, &format!("ImageBackup of {image} Done"), |b| {
                b.status.as_ref().is_some_and(|s| s.phase == "Done")
            })
            .await;
        let st = b.status.unwrap();
        // The copy is in the target with the source's digest, read back
        // from the registries themselves.
        let (repo, tag) = split(image);
        let src_raw = source.client().get_any_manifest(&repo, &tag).await.unwrap();
        let (copy_repo, copy_tag) = split(&b.spec.target);
        assert_eq!(
            copy_repo,
            format!("keep/{}", repo.replace('/', "_")),
            "Flatten naming"
        );
        let dst_raw = target
            .client()
            .get_any_manifest(&copy_repo, &copy_tag)
            .await
            .unwrap();
        assert_eq!(src_raw, dst_raw, "the manifest is copied byte for byte");
        assert_eq!(st.digest.as_deref(), Some(sha256(&src_raw).as_str()));
        assert!(
            st.bytes_copied > 0 && st.bytes_total >= st.bytes_copied,
            "{st:?}"
        );
    }
    let web_copy = format!("{}/keep/{}:1", target.host, split(&web).0.replace('/', "_"));
    let node_copy = format!(
        "{}/keep/{}:1",
        target.host,
        split(&node).0.replace('/', "_")
    );
    s.wait_image("deployment", "web", &web_copy).await;
    s.wait_image("daemonset", "node", &node_copy).await;
    s.wait_pods("web", &web_copy, 1).await;
    s.wait_pods("node", &node_copy, c.nodes.len()).await;
    let d = s.deployments().get("web").await.unwrap();
    let originals =
        d.metadata.annotations.unwrap_or_default()["berth.dev/backup-original-images"].clone();
    assert!(originals.contains(&web), "{originals}");
    // The roll is an Event on the workload.
    eventually(WAIT, "a RolledOntoBackup event", || async {
        let out = c.kubectl(&[
            "-n",
            &s.ns.name,
            "get",
            "events",
            "--field-selector",
            "reason=RolledOntoBackup,involvedObject.name=web",
            "-o",
            "name",
        ]);
        Ok(out.ok().filter(|o| !o.trim().is_empty()).map(|_| ()))
    })
    .await
    .unwrap();

    // The source goes away; the pods and every copy of the images on the
    // nodes go too; the pods come back from the backup registry.
    source.stop();
    remove_everywhere(&c, &[&web, &node, &web_copy, &node_copy]).await;
    c.kubectl(&["-n", &s.ns.name, "delete", "pods", "--all", "--wait=false"])
        .unwrap();
    s.wait_pods("web", &web_copy, 1).await;
    s.wait_pods("node", &node_copy, c.nodes.len()).await;
    let mut pulled = 0;
    for n in &c.nodes {
        pulled += usize::from(c.cri_has_image(n, &node_copy).await.unwrap());
        assert!(
            !c.cri_has_image(n, &node).await.unwrap(),
            "{node} came back on {n}"
        );
    }
    assert_eq!(
        pulled,
        c.nodes.len(),
        "every node pulled the DaemonSet's copy"
    );

    // Restore: the original image is back, and stays.
    c.kubectl(&[
        "-n",
        &s.ns.name,
        "annotate",
        "deployment",
        "web",
        "berth.dev/backup-restore=true",
    ])
    .unwrap();
    s.wait_image("deployment", "web", &web).await;
    let d = s.deployments().get("web").await.unwrap();
    let a = d.metadata.annotations.unwrap_or_default();
    assert_eq!(a.get("berth.dev/backup").map(String::as_str), Some("false"));
    assert!(!a.contains_key("berth.dev/backup-original-images"));
    assert!(!a.contains_key("berth.dev/backup-restore"));
}

#[tokio::test]
async fn a_multi_arch_index_and_a_digest_pinned_image_are_copied_whole() {
    let c = Cluster::from_env().await.unwrap();
    let source = ScratchRegistry::start(&c, None).await.unwrap();
    let target = ScratchRegistry::start(&c, None).await.unwrap();
    let s = Scope::new(
        &c,
        "index",
        &target.host,
        None,
        &format!(
            "  target:\n    registry: {}\n  naming: Mirror\n  rewrite: Digest\n",
            target.host
        ),
    );
    let (repo, amd_raw, arm_raw, index_digest) = two_platform_index(&c, &source).await;
    let reg = source.client();
    let multi = format!("{}/{repo}:multi", source.host);
    // A digest-pinned reference of another image.
    let pinned_tagged = image_in(&c, &source, "pinned").await;
    let (prepo, _) = split(&pinned_tagged);
    let pdigest = sha256(&reg.get_any_manifest(&prepo, "1").await.unwrap());
    let pinned = format!("{}/{prepo}@{pdigest}", source.host);
    s.workload("deployment", "multi", &multi, "");
    s.workload("deployment", "pinned", &pinned, "");

    let b = s
        .wait_backup(&multi, "the index copied", |b| {
            b.status.as_ref().is_some_and(|s| s.phase == "Done")
        })
        .await;
    let st = b.status.clone().unwrap();
    assert_eq!(st.digest.as_deref(), Some(index_digest.as_str()));
    assert_eq!(st.platforms, ["linux/amd64", "linux/arm64"]);
    let mirror_repo = format!("{}/{repo}", source.host.replace(':', "_"));
    let dst = target.client();
    assert_eq!(
        dst.get_any_manifest(&mirror_repo, "multi").await.unwrap(),
        reg.get_any_manifest(&repo, "multi").await.unwrap(),
        "the index, byte for byte"
    );
    for raw in [&amd_raw, &arm_raw] {
        let d = sha256(raw);
        assert_eq!(
            &dst.get_any_manifest(&mirror_repo, &d).await.unwrap(),
            raw,
            "platform manifest {d}"
        );
        let m: serde_json::Value = serde_json::from_slice(raw).unwrap();
        let mut blobs = vec![m["config"]["digest"].as_str().unwrap().to_string()];
        blobs.extend(
            m["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["digest"].as_str().unwrap().to_string()),
        );
        for blob in blobs {
            let bytes = dst.get_blob(&mirror_repo, &blob).await.unwrap();
            assert_eq!(sha256(&bytes), blob, "blob {blob} intact in the target");
        }
    }
    s.wait_image(
        "deployment",
        "multi",
        &format!("{}/{mirror_repo}@{index_digest}", target.host),
    )
    .await;

    let b = s
        .wait_backup(&pinned, "the pinned image copied", |b| {
            b.status.as_ref().is_some_and(|s| s.phase == "Done")
        })
        .await;
    let st = b.status.unwrap();
    assert_eq!(st.digest.as_deref(), Some(pdigest.as_str()));
    let pinned_copy = format!(
        "{}/{}/{prepo}@{pdigest}",
        target.host,
        source.host.replace(':', "_")
    );
    assert_eq!(b.spec.target, pinned_copy);
    let (crepo, _) = split(&pinned_copy);
    assert_eq!(
        sha256(&dst.get_any_manifest(&crepo, &pdigest).await.unwrap()),
        pdigest
    );
    s.wait_image("deployment", "pinned", &pinned_copy).await;
    s.wait_pods("pinned", &pinned_copy, 1).await;
}

#[tokio::test]
async fn ten_workloads_sharing_an_image_make_one_backup_and_one_copy() {
    let c = Cluster::from_env().await.unwrap();
    let target = ScratchRegistry::start(&c, None).await.unwrap();
    let s = Scope::new(
        &c,
        "shared",
        &target.host,
        None,
        &format!(
            "  target:\n    registry: {}/ten\n  copyOnly: true\n",
            target.host
        ),
    );
    let image = c.fresh_image("shared").await.unwrap();
    for i in 0..10 {
        s.workload("deployment", &format!("w{i}"), &image, "");
    }
    let b = s
        .wait_backup(&image, "one ImageBackup used by ten workloads, Done", |b| {
            b.status
                .as_ref()
                .is_some_and(|s| s.phase == "Done" && s.workloads.len() == 10)
        })
        .await;
    assert_eq!(s.backups_of(&image).await.unwrap().len(), 1);
    let (repo, _) = split(&b.spec.target);
    let raw = c
        .plain_registry()
        .get_any_manifest(&split(&image).0, "1")
        .await
        .unwrap();
    let m: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    let blobs = 1 + m["layers"].as_array().unwrap().len();
    assert_eq!(
        target.blob_uploads(&repo),
        blobs,
        "each blob uploaded exactly once:\n{}",
        target.access_log()
    );
    // copyOnly: nothing rolled.
    let d = s.deployments().get("w3").await.unwrap();
    assert_eq!(
        d.spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .as_deref(),
        Some(image.as_str())
    );
}

#[tokio::test]
async fn wrong_target_credentials_fail_and_leave_workloads_alone_and_opt_outs_are_never_touched() {
    let c = Cluster::from_env().await.unwrap();
    let target = ScratchRegistry::start(&c, Some(("backup", "right-password")))
        .await
        .unwrap();
    let s = Scope::new(
        &c,
        "denied",
        &target.host,
        Some(("backup", "wrong-password")),
        &format!("  target:\n    registry: {}\n", target.host),
    );
    let image = c.fresh_image("denied").await.unwrap();
    let kept = c.fresh_image("optout").await.unwrap();
    s.workload("deployment", "app", &image, "");
    s.workload("deployment", "mine", &kept, "berth.dev/backup: \"false\"");
    let b = s
        .wait_backup(&image, "Failed with TargetAuthFailed", |b| {
            b.status.as_ref().is_some_and(|s| {
                s.phase == "Failed" && s.reason.as_deref() == Some("TargetAuthFailed")
            })
        })
        .await;
    let st = b.status.unwrap();
    assert!(
        st.message.as_deref().unwrap_or_default().contains("target"),
        "{st:?}"
    );
    assert!(
        !st.message.unwrap_or_default().contains("wrong-password"),
        "credentials never in a status"
    );
    let d = s.deployments().get("app").await.unwrap();
    assert_eq!(
        d.spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .as_deref(),
        Some(image.as_str())
    );
    // The pass that made app's ImageBackup saw `mine` too, and left it be.
    assert!(
        s.backups_of(&kept).await.unwrap().is_empty(),
        "an opted-out workload's image was backed up"
    );
    let d = s.deployments().get("mine").await.unwrap();
    assert!(
        !d.metadata
            .annotations
            .unwrap_or_default()
            .contains_key("berth.dev/backup-original-images")
    );
    // Malformed policies are refused at admission, each with its reason.
    for (spec, reason) in [
        (
            "target: {registry: \"http://no/scheme\"}",
            "registry must be host[:port][/path]",
        ),
        (
            "target: {registry: a.example}\n  naming: Sideways",
            "supported values: \"Flatten\", \"Mirror\"",
        ),
        (
            "target: {registry: a.example}\n  expireAfter: 1s",
            "expireAfter must be a duration of at least 1m",
        ),
    ] {
        let err = c
            .apply(&format!("apiVersion: berth.dev/v1alpha1\nkind: BackupPolicy\nmetadata: {{name: bad-policy}}\nspec:\n  {spec}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(reason), "{spec}: {err}");
    }
}

#[tokio::test]
async fn a_gone_source_is_copied_from_a_node_that_holds_the_image() {
    let c = Cluster::from_env().await.unwrap();
    let mut source = ScratchRegistry::start(&c, None).await.unwrap();
    let target = ScratchRegistry::start(&c, None).await.unwrap();
    // The workload runs (so its node holds the image) before any policy.
    let (repo, amd_raw, _, _) = two_platform_index(&c, &source).await;
    let multi = format!("{}/{repo}:multi", source.host);
    let ns = TestNamespace::new(&c, "bk-node");
    c.apply(&format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: app, namespace: {ns}}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: app}}}}\n  template:\n    metadata: {{labels: {{app: app}}}}\n    spec:\n      terminationGracePeriodSeconds: 0\n      containers:\n      - {{name: main, image: \"{multi}\", command: [sleep, \"3600\"]}}\n",
        ns = ns.name
    ))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), &ns.name);
    let holder = eventually(WAIT, "the workload running", || async {
        let list = pods.list(&ListParams::default().labels("app=app")).await?;
        Ok(list.items.into_iter().find_map(|p| {
            let ready = p
                .status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            ready.then(|| p.spec?.node_name).flatten()
        }))
    })
    .await
    .unwrap();
    // The source registry goes away; only then is a policy made.
    source.stop();
    let policy = ns.name.clone();
    c.apply(&format!(
        "apiVersion: berth.dev/v1alpha1\nkind: BackupPolicy\nmetadata: {{name: {policy}}}\nspec:\n  target: {{registry: \"{}\"}}\n  namespaces: {{include: [{policy}]}}\n",
        target.host
    ))
    .unwrap();
    let api: Api<ImageBackup> = Api::all(c.client.clone());
    let b = eventually(WAIT, "the copy from a node Done", || async {
        let list = api.list(&ListParams::default()).await?;
        Ok(list.items.into_iter().find(|b| {
            b.spec.source == multi && b.status.as_ref().is_some_and(|s| s.phase == "Done")
        }))
    })
    .await
    .unwrap();
    let st = b.status.clone().unwrap();
    assert_eq!(
        st.copied_from.as_deref(),
        Some(format!("node/{holder}").as_str()),
        "{st:?}"
    );
    assert_eq!(
        st.platforms,
        ["linux/amd64"],
        "the platform the node held, and only it"
    );
    assert_eq!(st.digest.as_deref(), Some(sha256(&amd_raw).as_str()));
    // The target serves the node's platform manifest, byte for byte, and its blobs.
    let (copy_repo, tag) = split(&b.spec.target);
    let dst = target.client();
    assert_eq!(
        dst.get_any_manifest(&copy_repo, &tag).await.unwrap(),
        amd_raw
    );
    let m: serde_json::Value = serde_json::from_slice(&amd_raw).unwrap();
    for l in m["layers"].as_array().unwrap() {
        let d = l["digest"].as_str().unwrap();
        assert_eq!(sha256(&dst.get_blob(&copy_repo, d).await.unwrap()), d);
    }
    // Rolled, and the pods come back from the copy with the source gone.
    let copy = b.spec.target.clone();
    eventually(WAIT, "the workload rolled", || async {
        let d: Deployment = Api::namespaced(c.client.clone(), &ns.name)
            .get("app")
            .await?;
        let image = d
            .spec
            .and_then(|s| s.template.spec)
            .and_then(|s| s.containers[0].image.clone());
        Ok((image.as_deref() == Some(copy.as_str())).then_some(()))
    })
    .await
    .unwrap();
    remove_everywhere(&c, &[&copy]).await;
    c.kubectl(&["-n", &ns.name, "delete", "pods", "--all", "--wait=false"])
        .unwrap();
    eventually(WAIT, "a pod of the copy running", || async {
        let list = pods.list(&ListParams::default().labels("app=app")).await?;
        Ok(list
            .items
            .iter()
            .any(|p| {
                p.metadata.deletion_timestamp.is_none()
                    && p.spec
                        .as_ref()
                        .is_some_and(|s| s.containers[0].image.as_deref() == Some(copy.as_str()))
                    && p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|cs| {
                            cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        })
            })
            .then_some(()))
    })
    .await
    .unwrap();
    let _ = c.kubectl(&["delete", "backuppolicy", &policy, "--wait=false"]);
    let _ = c.kubectl(&[
        "delete",
        "imagebackup",
        &b.metadata.name.unwrap(),
        "--wait=false",
    ]);
}

#[tokio::test]
async fn a_private_source_is_read_with_the_service_accounts_pull_secret_only() {
    let c = Cluster::from_env().await.unwrap();
    // Each registry accepts only its own credentials: a copy that sent
    // either registry the other's would be refused.
    let password = unique_suffix();
    let target = ScratchRegistry::start(&c, Some(("backup", &password)))
        .await
        .unwrap();
    let s = Scope::new(
        &c,
        "private",
        &target.host,
        Some(("backup", &password)),
        &format!(
            "  target:\n    registry: {}/priv\n  copyOnly: true\n",
            target.host
        ),
    );
    let image = c.fresh_private_image("priv").await.unwrap();
    let ns = s.ns.name.as_str();
    c.kubectl(&[
        "-n",
        ns,
        "create",
        "secret",
        "docker-registry",
        "source-pull",
        &format!("--docker-server={}", c.auth_registry()),
        &format!("--docker-username={}", c.var("BERTH_AUTH_USER")),
        &format!("--docker-password={}", c.var("BERTH_AUTH_PASSWORD")),
    ])
    .unwrap();
    c.kubectl(&[
        "-n",
        ns,
        "create",
        "rolebinding",
        "berth-pull-secret-reader",
        "--clusterrole=berth-pull-secret-reader",
        &format!("--serviceaccount={NAMESPACE}:berth-coordinator"),
    ])
    .unwrap();
    // The secret is the ServiceAccount's, not the workload's.
    c.kubectl(&["-n", ns, "create", "serviceaccount", "runner"])
        .unwrap();
    c.kubectl(&[
        "-n",
        ns,
        "patch",
        "serviceaccount",
        "runner",
        "-p",
        r#"{"imagePullSecrets": [{"name": "source-pull"}]}"#,
    ])
    .unwrap();
    c.apply(&format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: app, namespace: {ns}}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: app}}}}\n  template:\n    metadata: {{labels: {{app: app}}}}\n    spec:\n      serviceAccountName: runner\n      terminationGracePeriodSeconds: 0\n      containers:\n      - {{name: main, image: \"{image}\", command: [sleep, \"3600\"]}}\n"
    ))
    .unwrap();
    let b = s
        .wait_backup(&image, "the private image copied", |b| {
            b.status.as_ref().is_some_and(|s| s.phase == "Done")
        })
        .await;
    let (repo, tag) = split(&image);
    let (copy_repo, copy_tag) = split(&b.spec.target);
    assert_eq!(
        target
            .client()
            .get_any_manifest(&copy_repo, &copy_tag)
            .await
            .unwrap(),
        c.private_registry()
            .get_any_manifest(&repo, &tag)
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn a_later_copy_mounts_the_blobs_an_earlier_copy_left_in_the_target() {
    let c = Cluster::from_env().await.unwrap();
    let target = ScratchRegistry::start(&c, None).await.unwrap();
    let s = Scope::new(
        &c,
        "mount",
        &target.host,
        None,
        &format!(
            "  target:\n    registry: {}/m\n  copyOnly: true\n",
            target.host
        ),
    );
    // Two images on one base (the harness's busybox layer), one unique layer each.
    let first = c.fresh_image("first").await.unwrap();
    let second = c.fresh_image("second").await.unwrap();
    s.workload("deployment", "first", &first, "");
    s.wait_backup(&first, "the first copy Done", |b| {
        b.status.as_ref().is_some_and(|s| s.phase == "Done")
    })
    .await;
    s.workload("deployment", "second", &second, "");
    let b = s
        .wait_backup(&second, "the second copy Done", |b| {
            b.status.as_ref().is_some_and(|s| s.phase == "Done")
        })
        .await;
    let st = b.status.unwrap();
    let (repo, _) = split(&b.spec.target);
    let log = target.access_log();
    let mounts = log
        .lines()
        .filter(|l| {
            l.contains(&format!("\"POST /v2/{repo}/blobs/uploads/?mount=")) && l.contains("\" 201 ")
        })
        .count();
    assert_eq!(mounts, 1, "the shared base layer is mounted:\n{log}");
    assert_eq!(
        target.blob_uploads(&repo),
        2,
        "only the config and the unique layer are sent:\n{log}"
    );
    assert!(st.bytes_skipped > 0 && st.bytes_copied > 0, "{st:?}");
}
