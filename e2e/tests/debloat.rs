//! ImageDebloat on the real local cluster: a redis image built from
//! Debian's packages, profiled while a workload drives it, debloated,
//! pushed to a real registry and run again, checked against the registry's
//! own bytes (sizes, tar headers), not only against what Berth reports.

use std::io::Read;
use std::process::Command;
use std::time::Duration;

use berth_coordinator::debloat::crd::{ImageDebloat, ImageDebloatStatus};
use berth_e2e::debloat::{REDIS, Shadow, baffs, exec, exercise, redis_pod, redis_run};
use berth_e2e::registry::{Registry, unique_suffix};
use berth_e2e::scratch::ScratchRegistry;
use berth_e2e::{Cluster, NAMESPACE, TestNamespace, debian, eventually};
use berth_node_agent::debloat::tar::{Kind, Reader, Record};
use berth_node_agent::testing::{tar_of, ustar_header};

const WAIT: &str = "180s";

/// `kubectl wait --for=condition=Ready` of `what` (e.g. `pod/x`) in `ns`.
fn wait_ready(c: &Cluster, ns: &str, what: &str) {
    c.kubectl(&[
        "-n",
        ns,
        "wait",
        "--for=condition=Ready",
        what,
        "--timeout",
        WAIT,
    ])
    .unwrap();
}

/// Waits for Deployment `name` to finish rolling out.
fn rollout(c: &Cluster, ns: &str, name: &str) {
    c.kubectl(&[
        "-n",
        ns,
        "rollout",
        "status",
        &format!("deploy/{name}"),
        "--timeout",
        WAIT,
    ])
    .unwrap();
}

/// The image of Deployment `name`'s first container.
fn image_of(c: &Cluster, ns: &str, name: &str) -> String {
    c.kubectl(&[
        "-n",
        ns,
        "get",
        "deploy",
        name,
        "-o",
        "jsonpath={.spec.template.spec.containers[0].image}",
    ])
    .unwrap()
}

fn records(gz: &[u8]) -> Vec<(Record, Vec<u8>)> {
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut tar)
        .unwrap();
    let mut r = Reader::new(&tar[..]);
    let mut out = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        let mut data = Vec::new();
        r.copy_data(&mut data).unwrap();
        out.push((rec, data));
    }
    out
}

async fn layers(reg: &Registry, repo: &str, tag: &str) -> Vec<(String, u64)> {
    let (_, raw) = reg.get_manifest(repo, tag).await.unwrap();
    let m: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().unwrap().to_string(),
                l["size"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn baffs_shadow_and_debloat_shrink_redis_keep_every_header_and_it_still_serves() {
    let c = Cluster::from_env().await.unwrap();
    assert!(
        c.local,
        "profiling reaches the node's runtime socket: local cluster only"
    );
    let node = c.nodes[0].clone();
    let reg = ScratchRegistry::start(&c, None).await.unwrap();
    let client = reg.client();
    let repo = format!("debloat/redis-{}", unique_suffix());
    debian::push(&client, &repo, "7", REDIS, redis_run())
        .await
        .unwrap();
    let image = format!("{}/{repo}:7", reg.host);
    let ns = TestNamespace::new(&c, "debloat-cli");
    c.apply(&redis_pod(&ns.name, "redis", &node, &image))
        .unwrap();
    wait_ready(&c, &ns.name, "pod/redis");

    let profiles = tempfile::tempdir().unwrap();
    let profiles_dir = profiles.path().to_str().unwrap();
    let shadowing = Shadow::start(&c, &node, &image, profiles_dir).unwrap();
    exercise(&c, &ns.name, "redis").unwrap();
    let saved = shadowing.stop().unwrap();
    assert!(saved.contains(&image), "{saved}");

    let summary = berth_e2e::debloat::debloat(&c, &node, &image, profiles_dir, &reg.host).unwrap();
    let (before, after) = (
        summary["sizeBefore"].as_u64().unwrap(),
        summary["sizeAfter"].as_u64().unwrap(),
    );
    eprintln!(
        "redis: {before} -> {after} bytes ({:.1} % smaller)",
        100.0 * (1.0 - after as f64 / before as f64)
    );

    // The registry holds what the summary says, under `<tag>-baffs`.
    let orig = layers(&client, &repo, "7").await;
    let new = layers(&client, &repo, "7-baffs").await;
    assert_eq!(orig.iter().map(|l| l.1).sum::<u64>(), before);
    assert_eq!(new.iter().map(|l| l.1).sum::<u64>(), after);
    assert!(
        after * 2 < before,
        "less than half removed: {before} -> {after}"
    );

    // Tar header by tar header: every kept entry is the original's, bytes
    // and all (owner, mode, mtime, xattrs, link targets).
    let orig_records = records(&client.get_blob(&repo, &orig[0].0).await.unwrap());
    let new_records = records(&client.get_blob(&repo, &new[0].0).await.unwrap());
    let by_path: std::collections::HashMap<&str, &(Record, Vec<u8>)> = orig_records
        .iter()
        .map(|r| (r.0.path.as_str(), r))
        .collect();
    for (rec, data) in &new_records {
        let (o, odata) = by_path[rec.path.as_str()];
        assert_eq!(rec.header, o.header, "header of {}", rec.path);
        assert_eq!(data, odata, "data of {}", rec.path);
    }
    let kept = |p: &str| new_records.iter().find(|r| r.0.path == p).map(|r| &r.0);
    let ping = kept("usr/bin/ping").expect("ping was run");
    assert!(
        ping.header
            .windows(24)
            .any(|w| w == b"SCHILY.xattr.security.ca"),
        "ping lost its capability"
    );
    assert!(
        matches!(kept("lib64").map(|r| &r.kind), Some(Kind::Symlink(_))),
        "the loader's link is kept"
    );
    assert!(kept("usr/bin/redis-server").is_some());
    assert!(
        kept("usr/share/doc/redis-server/copyright").is_none(),
        "unused files go"
    );
    assert!(new_records.len() * 4 < orig_records.len());

    // The debloated image is in the node's runtime and serves the same workload.
    let baffs_image = format!("{}/{repo}:7-baffs", reg.host);
    assert!(c.cri_has_image(&node, &baffs_image).await.unwrap());
    c.apply(&redis_pod(&ns.name, "redis-baffs", &node, &baffs_image))
        .unwrap();
    wait_ready(&c, &ns.name, "pod/redis-baffs");
    exercise(&c, &ns.name, "redis-baffs").unwrap();
}

#[tokio::test]
async fn hostile_layers_are_refused_before_anything_is_written() {
    let c = Cluster::from_env().await.unwrap();
    assert!(
        c.local,
        "reaches the node's runtime socket: local cluster only"
    );
    let node = c.nodes[0].clone();
    let reg = ScratchRegistry::start(&c, None).await.unwrap();
    let client = reg.client();
    let profiles = tempfile::tempdir().unwrap();
    let cases: [(&str, Vec<u8>, &str); 3] = [
        (
            "dotdot",
            raw_tar(&[("etc/../../berth-escape", b'0', "")]),
            "`..` component",
        ),
        (
            "device",
            raw_tar(&[("dev/berth-disk", b'4', "")]),
            "device node",
        ),
        (
            "symlink",
            raw_tar(&[("app/evil", b'2', "../../../etc/shadow")]),
            "climbs out of the root",
        ),
    ];
    for (name, layer, why) in cases {
        let repo = format!("debloat/hostile-{name}-{}", unique_suffix());
        client
            .push_gzip_image(&repo, "1", vec![layer], serde_json::json!({"Cmd": ["/x"]}))
            .await
            .unwrap();
        let image = format!("{}/{repo}:1", reg.host);
        // containerd unpacks it (clamping the paths into the root), so the
        // image is on the node, as a hostile image would be.
        let image_id = c.cri_pull(&node, &image).await.unwrap();
        // A profile, as `shadow` would leave it.
        let profile = serde_json::json!({"imageId": image_id, "images": [image], "containers": [], "paths": ["/x"]});
        std::fs::write(
            profiles
                .path()
                .join(format!("{}.json", image_id.replace(':', "-"))),
            serde_json::to_vec(&profile).unwrap(),
        )
        .unwrap();
        let out = baffs(
            &c,
            &node,
            &[
                "debloat",
                &format!("--images={image}"),
                "--profiles-dir",
                profiles.path().to_str().unwrap(),
                "--plain-http",
                &reg.host,
            ],
        )
        .output()
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{name}: a hostile layer was debloated"
        );
        assert!(
            err.contains("refused") && err.contains(why),
            "{name}: {err}"
        );
        // Nothing was pushed, and nothing escaped onto the host.
        assert!(
            client.get_manifest(&repo, "1-baffs").await.is_err(),
            "{name}: pushed"
        );
        assert!(!std::path::Path::new("/berth-escape").exists());
    }
}

/// An uncompressed tar of raw ustar entries (name, type, link), empty.
fn raw_tar(entries: &[(&str, u8, &str)]) -> Vec<u8> {
    let blocks: Vec<([u8; 512], &[u8])> = entries
        .iter()
        .map(|(name, flag, link)| (ustar_header(name, *flag, 0, link), &b""[..]))
        .collect();
    tar_of(&blocks)
}

/// Removes a node label when dropped.
struct Label<'a> {
    c: &'a Cluster,
    node: String,
}

impl Drop for Label<'_> {
    fn drop(&mut self) {
        let _ = self
            .c
            .kubectl(&["label", "node", &self.node, "berth.dev/debloat-"]);
    }
}

#[tokio::test]
async fn the_debloater_daemonset_runs_baffs_on_labelled_nodes_only_with_its_own_privileges() {
    let c = Cluster::from_env().await.unwrap();
    let (node, other) = (c.nodes[0].clone(), c.nodes[1].clone());
    // The pull agent keeps every capability dropped; only the debloater adds any.
    let caps = |ds: &str| {
        c.kubectl(&[
            "-n",
            NAMESPACE,
            "get",
            "ds",
            ds,
            "-o",
            "jsonpath={.spec.template.spec.containers[0].securityContext.capabilities}",
        ])
        .unwrap()
    };
    assert_eq!(caps("berth-node-agent"), r#"{"drop":["ALL"]}"#);
    assert_eq!(
        caps("berth-debloater"),
        r#"{"add":["SYS_ADMIN","SYS_PTRACE","DAC_READ_SEARCH"],"drop":["ALL"]}"#
    );

    let reg = ScratchRegistry::start(&c, None).await.unwrap();
    let client = reg.client();
    let repo = format!("debloat/redis-ds-{}", unique_suffix());
    debian::push(&client, &repo, "7", REDIS, redis_run())
        .await
        .unwrap();
    let image = format!("{}/{repo}:7", reg.host);
    let ns = TestNamespace::new(&c, "debloat-ds");
    c.apply(&redis_pod(&ns.name, "redis", &node, &image))
        .unwrap();

    c.kubectl(&[
        "label",
        "node",
        &node,
        "berth.dev/debloat=enabled",
        "--overwrite",
    ])
    .unwrap();
    let _label = Label {
        c: &c,
        node: node.clone(),
    };
    let debloater = |n: &str| {
        c.kubectl(&[
            "-n",
            NAMESPACE,
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=berth-debloater",
            "--field-selector",
            &format!("spec.nodeName={n}"),
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])
        .unwrap()
    };
    let pod = eventually(
        Duration::from_secs(120),
        "a debloater pod on the labelled node",
        || async { Ok(Some(debloater(&node)).filter(|p| !p.is_empty())) },
    )
    .await
    .unwrap();
    for p in [&format!("pod/{pod}"), "pod/redis"] {
        let n = if p == "pod/redis" {
            ns.name.as_str()
        } else {
            NAMESPACE
        };
        wait_ready(&c, n, p);
    }
    assert_eq!(
        debloater(&other),
        "",
        "a node without the label runs no debloater"
    );

    let kubectl_exec = |args: &[&str]| {
        let mut cmd = Command::new(c.tool("kubectl"));
        cmd.env("KUBECONFIG", c.var("KUBECONFIG"))
            .args(["-n", NAMESPACE, "exec", &pod, "--", "node-agent", "baffs"])
            .args(args);
        cmd
    };
    // baffs's own flow: shadow until the profiled container exits.
    let shadowing = Shadow::spawn(kubectl_exec(&[
        "shadow",
        &format!("--images={image}"),
        "--until-exit",
    ]))
    .unwrap();
    exercise(&c, &ns.name, "redis").unwrap();
    c.kubectl(&["-n", &ns.name, "delete", "pod", "redis", "--wait=false"])
        .unwrap();
    let saved = shadowing.wait().unwrap();
    assert!(saved.contains(&image), "{saved}");

    let out = kubectl_exec(&[
        "debloat",
        &format!("--images={image}"),
        "--plain-http",
        &reg.host,
        "--json",
    ])
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let after = summary[0]["sizeAfter"].as_u64().unwrap();
    assert_eq!(
        layers(&client, &repo, "7-baffs")
            .await
            .iter()
            .map(|l| l.1)
            .sum::<u64>(),
        after
    );

    let baffs_image = format!("{}/{repo}:7-baffs", reg.host);
    c.apply(&redis_pod(&ns.name, "redis-baffs", &node, &baffs_image))
        .unwrap();
    wait_ready(&c, &ns.name, "pod/redis-baffs");
    exercise(&c, &ns.name, "redis-baffs").unwrap();
}

/// A Deployment of `image` pinned to `node`, rolled one new pod at a time
/// with the old one serving until the new one is ready.
fn deployment(ns: &str, name: &str, node: &str, image: &str, probe: &str, period: u32) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {ns}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: {name}}}}}
  strategy: {{type: RollingUpdate, rollingUpdate: {{maxUnavailable: 0, maxSurge: 1}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      nodeSelector: {{kubernetes.io/hostname: {node}}}
      terminationGracePeriodSeconds: 1
      containers:
      - name: redis
        image: {image}
        readinessProbe:
          exec: {{command: [{probe}]}}
          periodSeconds: {period}
"#
    )
}

/// A Job on `node` that drives the redis at `ip` from outside its pod.
fn exercise_job(ns: &str, name: &str, node: &str, image: &str, ip: &str) -> String {
    format!(
        r#"apiVersion: batch/v1
kind: Job
metadata: {{name: {name}, namespace: {ns}}}
spec:
  backoffLimit: 0
  template:
    spec:
      nodeSelector: {{kubernetes.io/hostname: {node}}}
      restartPolicy: Never
      containers:
      - name: exercise
        image: {image}
        command: [sh, -c, "redis-cli -h {ip} ping | grep -q PONG && redis-cli -h {ip} set berth debloat | grep -q OK && redis-cli -h {ip} get berth | grep -q debloat && redis-benchmark -h {ip} -q -n 2000 -t set,get"]
"#
    )
}

fn debloat_api(c: &Cluster, ns: &str) -> kube::Api<ImageDebloat> {
    kube::Api::namespaced(c.client.clone(), ns)
}

/// Waits until the ImageDebloat's status satisfies `done`.
async fn wait_debloat(
    c: &Cluster,
    ns: &str,
    name: &str,
    what: &str,
    done: impl Fn(&ImageDebloatStatus) -> bool,
) -> ImageDebloatStatus {
    let api = debloat_api(c, ns);
    eventually(Duration::from_secs(240), what, || async {
        let d = api.get(name).await?;
        Ok(d.status.filter(|s| done(s)))
    })
    .await
    .unwrap_or_else(|e| {
        let now = c
            .kubectl(&["-n", ns, "get", "imagedebloat", name, "-o", "yaml"])
            .unwrap_or_default();
        panic!("{e:#}\n{now}")
    })
}

/// Name and IP of the pod of `app` that runs `image` and is not going away.
fn pod_of(c: &Cluster, ns: &str, app: &str, image: &str) -> (String, String) {
    let out = c
        .kubectl(&[
            "-n",
            ns,
            "get",
            "pods",
            "-l",
            &format!("app={app}"),
            "-o",
            r#"jsonpath={range .items[*]}{.metadata.name} {.status.podIP} {.spec.containers[0].image} {.metadata.deletionTimestamp}{"\n"}{end}"#,
        ])
        .unwrap();
    let line = out
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() == 3 && f[2] == image)
        .unwrap_or_else(|| panic!("no live pod of {app} runs {image}: {out}"));
    (line[0].to_string(), line[1].to_string())
}

/// Waits for Job `name` to succeed; fails at once, with its logs, if it fails.
async fn job_succeeds(c: &Cluster, ns: &str, name: &str) {
    eventually(Duration::from_secs(180), &format!("job {name}"), || async {
        let st = c.kubectl(&[
            "-n",
            ns,
            "get",
            "job",
            name,
            "-o",
            "jsonpath={.status.succeeded}/{.status.failed}",
        ])?;
        let (ok, failed) = st.trim().split_once('/').unwrap_or(("", ""));
        if !failed.is_empty() && failed != "0" {
            let logs = c
                .kubectl(&["-n", ns, "logs", &format!("job/{name}")])
                .unwrap_or_default();
            panic!("job {name} failed: {logs}");
        }
        Ok((!ok.is_empty() && ok != "0").then_some(()))
    })
    .await
    .unwrap();
}

/// Labels `node` for the debloater and waits for its pod there.
async fn debloater_on<'a>(c: &'a Cluster, node: &str) -> Label<'a> {
    c.kubectl(&[
        "label",
        "node",
        node,
        "berth.dev/debloat=enabled",
        "--overwrite",
    ])
    .unwrap();
    let label = Label {
        c,
        node: node.to_string(),
    };
    let pod = eventually(Duration::from_secs(120), "a debloater pod", || async {
        let p = c.kubectl(&[
            "-n",
            NAMESPACE,
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=berth-debloater",
            "--field-selector",
            &format!("spec.nodeName={node}"),
            "-o",
            // Not one still going from an earlier test's label.
            r#"jsonpath={range .items[*]}{.metadata.name} {.metadata.deletionTimestamp}{"\n"}{end}"#,
        ])?;
        Ok(p.lines()
            .find(|l| l.split_whitespace().count() == 1)
            .map(|l| l.trim().to_string()))
    })
    .await
    .unwrap();
    wait_ready(c, NAMESPACE, &format!("pod/{pod}"));
    label
}

/// A registry of the test's own holding the redis image, and a namespace
/// with a Deployment `redis` of it on `node`, rolled out.
struct Fixture<'a> {
    reg: ScratchRegistry,
    client: Registry,
    repo: String,
    image: String,
    ns: TestNamespace<'a>,
}

async fn redis_fixture<'a>(c: &'a Cluster, node: &str, name: &str) -> Fixture<'a> {
    let reg = ScratchRegistry::start(c, None).await.unwrap();
    let client = reg.client();
    let repo = format!("debloat/redis-{name}-{}", unique_suffix());
    debian::push(&client, &repo, "7", REDIS, redis_run())
        .await
        .unwrap();
    let image = format!("{}/{repo}:7", reg.host);
    let ns = TestNamespace::new(c, &format!("debloat-{name}"));
    c.apply(&deployment(
        &ns.name,
        "redis",
        node,
        &image,
        "redis-cli, ping",
        1,
    ))
    .unwrap();
    rollout(c, &ns.name, "redis");
    Fixture {
        reg,
        client,
        repo,
        image,
        ns,
    }
}

#[tokio::test]
async fn an_image_debloat_profiles_until_the_probe_job_succeeds_then_rolls_the_deployment_onto_baffs()
 {
    let c = Cluster::from_env().await.unwrap();
    let (node, other) = (c.nodes[0].clone(), c.nodes[1].clone());
    let _label = debloater_on(&c, &node).await;
    let Fixture {
        reg: _reg,
        client,
        repo,
        image,
        ns,
    } = redis_fixture(&c, &node, "crd").await;
    // The result goes to a registry of its own.
    let slim = ScratchRegistry::start(&c, None).await.unwrap();
    c.apply(&format!(
        "apiVersion: berth.dev/v1alpha1\nkind: ImageDebloat\nmetadata: {{name: redis, namespace: {}}}\nspec:\n  workload: {{kind: Deployment, name: redis}}\n  repository: {}/slim/redis\n  profile: {{probeJob: exercise}}\n  rolloutTimeout: 2m\n",
        ns.name, slim.host
    ))
    .unwrap();
    let s = wait_debloat(
        &c,
        &ns.name,
        "redis",
        "the workload restarted under the profiler",
        |s| s.restarted_at.is_some(),
    )
    .await;
    assert_eq!(s.phase, "Profiling");
    assert_eq!(s.node.as_deref(), Some(node.as_str()));
    assert_eq!(s.profilers.get(&node).and_then(|p| p.watching), Some(true));
    rollout(&c, &ns.name, "redis");
    // The user's workload, from another node, while the profile records.
    let (_, ip) = pod_of(&c, &ns.name, "redis", &image);
    c.apply(&exercise_job(&ns.name, "exercise", &other, &image, &ip))
        .unwrap();
    let s = wait_debloat(&c, &ns.name, "redis", "Ready", |s| {
        matches!(s.phase.as_str(), "Ready" | "Failed" | "RolledBack")
    })
    .await;
    assert_eq!(s.phase, "Ready", "{s:?}");
    let target = format!("{}/slim/redis:7-baffs", slim.host);
    assert_eq!(s.target.as_deref(), Some(target.as_str()));
    let build = s.build.clone().unwrap();
    let registry_size: u64 = layers(&slim.client(), "slim/redis", "7-baffs")
        .await
        .iter()
        .map(|l| l.1)
        .sum();
    assert_eq!(
        build.size_after, registry_size,
        "the status says what the registry holds"
    );
    assert_eq!(
        build.size_before,
        layers(&client, &repo, "7")
            .await
            .iter()
            .map(|l| l.1)
            .sum::<u64>()
    );
    assert!(build.size_after * 2 < build.size_before, "{build:?}");
    assert_eq!(build.layers.len(), 1);
    let now = image_of(&c, &ns.name, "redis");
    assert_eq!(now, target);
    // The same workload passes against the debloated pod.
    let (_, ip) = pod_of(&c, &ns.name, "redis", &target);
    c.apply(&exercise_job(
        &ns.name,
        "exercise-after",
        &other,
        &image,
        &ip,
    ))
    .unwrap();
    job_succeeds(&c, &ns.name, "exercise-after").await;
}

#[tokio::test]
async fn a_profile_that_misses_what_the_readiness_probe_reads_rolls_back_with_the_old_pod_serving()
{
    let c = Cluster::from_env().await.unwrap();
    let node = c.nodes[0].clone();
    let _label = debloater_on(&c, &node).await;
    let reg = ScratchRegistry::start(&c, None).await.unwrap();
    let client = reg.client();
    let repo = format!("debloat/redis-rb-{}", unique_suffix());
    // The probe reads a file only until it has once succeeded (a warm-up
    // marker in the container's own layer): that was before profiling, and
    // the pod is not restarted under the profiler (restart: false), so the
    // profile cannot know the file, nor `cat`.
    let base = std::fs::read(debian::rootfs(REDIS).unwrap()).unwrap();
    let extra = berth_e2e::registry::tar_layer(&[("etc/berth/ready", b"ready\n")]).unwrap();
    client
        .push_gzip_image(&repo, "7", vec![base, extra], redis_run())
        .await
        .unwrap();
    let image = format!("{}/{repo}:7", reg.host);
    let ns = TestNamespace::new(&c, "debloat-rb");
    let probe = r#"sh, -c, "[ -e /tmp/warm ] || { cat /etc/berth/ready && touch /tmp/warm; }""#;
    c.apply(&deployment(&ns.name, "redis", &node, &image, probe, 1))
        .unwrap();
    rollout(&c, &ns.name, "redis");
    let (old_pod, _) = pod_of(&c, &ns.name, "redis", &image);

    c.apply(&format!(
        "apiVersion: berth.dev/v1alpha1\nkind: ImageDebloat\nmetadata: {{name: redis, namespace: {}}}\nspec:\n  workload: {{kind: Deployment, name: redis}}\n  profile: {{window: 3s, restart: false}}\n  rolloutTimeout: 20s\n",
        ns.name
    ))
    .unwrap();
    let s = wait_debloat(&c, &ns.name, "redis", "the end", |s| {
        matches!(s.phase.as_str(), "Ready" | "Failed" | "RolledBack")
    })
    .await;
    assert_eq!(s.phase, "RolledBack", "{s:?}");
    assert_eq!(s.reason.as_deref(), Some("NewPodsNotReady"), "{s:?}");
    let now = image_of(&c, &ns.name, "redis");
    assert_eq!(now, image, "the original image is back");
    // The original pod served throughout: the same pod, never restarted, ready.
    let st = c
        .kubectl(&["-n", &ns.name, "get", "pod", &old_pod, "-o", "jsonpath={.status.containerStatuses[0].ready} {.status.containerStatuses[0].restartCount}"])
        .unwrap();
    assert_eq!(st.trim(), "true 0");
    assert_eq!(
        exec(&c, &ns.name, &old_pod, &["redis-cli", "ping"])
            .unwrap()
            .trim(),
        "PONG"
    );
    let events = c
        .kubectl(&[
            "-n",
            &ns.name,
            "get",
            "events",
            "--field-selector",
            "reason=RolledBackFromDebloated",
            "-o",
            "name",
        ])
        .unwrap();
    assert!(
        !events.trim().is_empty(),
        "an event on the Deployment says why"
    );
}

#[tokio::test]
async fn an_image_debloat_for_a_missing_workload_fails_and_a_malformed_one_is_refused() {
    let c = Cluster::from_env().await.unwrap();
    let ns = TestNamespace::new(&c, "debloat-bad");
    c.apply(&format!(
        "apiVersion: berth.dev/v1alpha1\nkind: ImageDebloat\nmetadata: {{name: ghost, namespace: {}}}\nspec:\n  workload: {{kind: Deployment, name: nowhere}}\n",
        ns.name
    ))
    .unwrap();
    let s = wait_debloat(&c, &ns.name, "ghost", "Failed", |s| s.phase == "Failed").await;
    assert_eq!(s.reason.as_deref(), Some("WorkloadNotFound"));
    let bad = c.apply(&format!(
        "apiVersion: berth.dev/v1alpha1\nkind: ImageDebloat\nmetadata: {{name: bad, namespace: {}}}\nspec:\n  workload: {{kind: StatefulSet, name: x}}\n  profile: {{window: soon}}\n",
        ns.name
    ));
    let err = format!("{:#}", bad.unwrap_err());
    assert!(
        err.contains("kind must be Deployment or DaemonSet"),
        "{err}"
    );
}

const PYTHON_APP: &str = r#"import http.server, json

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"ok": True, "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

http.server.HTTPServer(("", 8080), Handler).serve_forever()
"#;

#[tokio::test]
async fn a_python_program_restarted_under_the_profiler_debloats_and_still_serves() {
    let c = Cluster::from_env().await.unwrap();
    let (node, other) = (c.nodes[0].clone(), c.nodes[1].clone());
    let _label = debloater_on(&c, &node).await;
    let reg = ScratchRegistry::start(&c, None).await.unwrap();
    let client = reg.client();
    let repo = format!("debloat/python-{}", unique_suffix());
    let base = std::fs::read(debian::rootfs(&["python3"]).unwrap()).unwrap();
    let app = berth_e2e::registry::tar_layer(&[("app/server.py", PYTHON_APP.as_bytes())]).unwrap();
    let run = serde_json::json!({
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Cmd": ["python3", "/app/server.py"],
    });
    client
        .push_gzip_image(&repo, "1", vec![base, app], run)
        .await
        .unwrap();
    let image = format!("{}/{repo}:1", reg.host);
    let ns = TestNamespace::new(&c, "debloat-py");
    // Ready by an HTTP probe from the kubelet: nothing runs inside the
    // container but the program, whose imports happen only at its start.
    c.apply(&format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: {ns}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: web}}}}
  strategy: {{type: RollingUpdate, rollingUpdate: {{maxUnavailable: 0, maxSurge: 1}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      nodeSelector: {{kubernetes.io/hostname: {node}}}
      terminationGracePeriodSeconds: 1
      containers:
      - name: web
        image: {image}
        readinessProbe:
          httpGet: {{path: /ready, port: 8080}}
          periodSeconds: 1
"#,
        ns = ns.name
    ))
    .unwrap();
    rollout(&c, &ns.name, "web");
    c.apply(&format!(
        "apiVersion: berth.dev/v1alpha1\nkind: ImageDebloat\nmetadata: {{name: web, namespace: {}}}\nspec:\n  workload: {{kind: Deployment, name: web}}\n  profile: {{window: 5s}}\n  rolloutTimeout: 2m\n",
        ns.name
    ))
    .unwrap();
    let s = wait_debloat(&c, &ns.name, "web", "the end", |s| {
        matches!(s.phase.as_str(), "Ready" | "Failed" | "RolledBack")
    })
    .await;
    assert_eq!(s.phase, "Ready", "{s:?}");
    assert!(s.restarted_at.is_some(), "restarted under the profiler");
    let build = s.build.clone().unwrap();
    assert!(build.size_after * 2 < build.size_before, "{build:?}");
    let registry_size: u64 = layers(&client, &repo, "1-baffs")
        .await
        .iter()
        .map(|l| l.1)
        .sum();
    assert_eq!(build.size_after, registry_size);
    // The debloated program answers, asked from another node.
    let target = format!("{}/{repo}:1-baffs", reg.host);
    let (_, ip) = pod_of(&c, &ns.name, "web", &target);
    c.apply(&format!(
        r#"apiVersion: batch/v1
kind: Job
metadata: {{name: ask, namespace: {ns}}}
spec:
  backoffLimit: 0
  template:
    spec:
      nodeSelector: {{kubernetes.io/hostname: {other}}}
      restartPolicy: Never
      containers:
      - name: ask
        image: {image}
        command: [python3, -c, "import json, urllib.request; assert json.load(urllib.request.urlopen('http://{ip}:8080/x'))['path'] == '/x'"]
"#,
        ns = ns.name
    ))
    .unwrap();
    job_succeeds(&c, &ns.name, "ask").await;
}

#[tokio::test]
async fn an_annotated_deployment_gets_an_image_debloat_and_stop_ends_its_profile() {
    let c = Cluster::from_env().await.unwrap();
    let node = c.nodes[0].clone();
    let _label = debloater_on(&c, &node).await;
    // The registry stays up while `_reg` lives.
    let Fixture {
        reg: _reg,
        image,
        ns,
        ..
    } = redis_fixture(&c, &node, "ann").await;
    // As baffs's pod-event listener would pick it up.
    c.kubectl(&[
        "-n",
        &ns.name,
        "annotate",
        "deploy/redis",
        "berth.dev/debloat=true",
    ])
    .unwrap();
    let s = wait_debloat(
        &c,
        &ns.name,
        "redis-debloat",
        "profiling after the restart",
        |s| s.restarted_at.is_some(),
    )
    .await;
    assert_eq!(s.phase, "Profiling");
    rollout(&c, &ns.name, "redis");
    // The default window is a minute: end it by hand.
    c.kubectl(&[
        "-n",
        &ns.name,
        "patch",
        "imagedebloat",
        "redis-debloat",
        "--type=merge",
        "-p",
        r#"{"spec":{"profile":{"stop":true}}}"#,
    ])
    .unwrap();
    let s = wait_debloat(&c, &ns.name, "redis-debloat", "the end", |s| {
        matches!(s.phase.as_str(), "Ready" | "Failed" | "RolledBack")
    })
    .await;
    assert_eq!(s.phase, "Ready", "{s:?}");
    assert_eq!(image_of(&c, &ns.name, "redis"), format!("{image}-baffs"));
    let (pod, _) = pod_of(&c, &ns.name, "redis", &format!("{image}-baffs"));
    assert_eq!(
        exec(&c, &ns.name, &pod, &["redis-cli", "ping"])
            .unwrap()
            .trim(),
        "PONG"
    );
}

/// Redis as a DaemonSet (one pod per node) on both nodes, each with a
/// debloater; redis-benchmark runs only in the pod of the node that does
/// not build, and the image built on the other node must still have it.
/// With `restart`, the pods are replaced under the profilers first.
async fn two_nodes_merge(tag: &str, restart: bool) {
    let c = Cluster::from_env().await.unwrap();
    let (node, other) = (c.nodes[0].clone(), c.nodes[1].clone());
    let _labels = (
        debloater_on(&c, &node).await,
        debloater_on(&c, &other).await,
    );
    let reg = ScratchRegistry::start(&c, None).await.unwrap();
    let client = reg.client();
    let unique = unique_suffix();
    let repo = format!("debloat/redis-{tag}-{unique}");
    // An image of its own (a layer naming this run): no node has a profile
    // of it from earlier tests.
    let base = std::fs::read(debian::rootfs(REDIS).unwrap()).unwrap();
    let mark = berth_e2e::registry::tar_layer(&[("etc/berth-run", unique.as_bytes())]).unwrap();
    client
        .push_gzip_image(&repo, "7", vec![base, mark], redis_run())
        .await
        .unwrap();
    let image = format!("{}/{repo}:7", reg.host);
    let ns = TestNamespace::new(&c, &format!("debloat-{tag}"));
    // A DaemonSet: one pod on each node, before and after every restart.
    c.apply(&format!(
        r#"apiVersion: apps/v1
kind: DaemonSet
metadata: {{name: redis, namespace: {ns}}}
spec:
  selector: {{matchLabels: {{app: redis}}}}
  template:
    metadata: {{labels: {{app: redis}}}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: redis
        image: {image}
        readinessProbe:
          exec: {{command: [redis-cli, ping]}}
          periodSeconds: 1
"#,
        ns = ns.name
    ))
    .unwrap();
    let ds_rollout = || {
        c.kubectl(&[
            "-n",
            &ns.name,
            "rollout",
            "status",
            "ds/redis",
            "--timeout",
            WAIT,
        ])
        .unwrap()
    };
    ds_rollout();
    let pods_now = || -> Vec<(String, bool)> {
        let out = c
            .kubectl(&["-n", &ns.name, "get", "pods", "-l", "app=redis", "-o", r#"jsonpath={range .items[*]}{.metadata.name} {.status.containerStatuses[0].ready} {.metadata.deletionTimestamp}{"\n"}{end}"#])
            .unwrap();
        out.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|f| f.len() == 2)
            .map(|f| (f[0].to_string(), f[1] == "true"))
            .collect()
    };
    let before: Vec<String> = pods_now().into_iter().map(|p| p.0).collect();
    c.apply(&format!(
        "apiVersion: berth.dev/v1alpha1\nkind: ImageDebloat\nmetadata: {{name: redis, namespace: {}}}\nspec:\n  workload: {{kind: DaemonSet, name: redis}}\n  profile: {{window: 10m, restart: {restart}}}\n  rolloutTimeout: 2m\n",
        ns.name
    ))
    .unwrap();
    let s = if restart {
        // Once both debloaters watch, the DaemonSet is restarted, and each
        // node must record its new pod from its start.
        let s = wait_debloat(&c, &ns.name, "redis", "restarted", |s| {
            s.restarted_at.is_some()
        })
        .await;
        eventually(Duration::from_secs(120), "both pods replaced", || async {
            let now = pods_now();
            Ok(
                (now.len() == 2 && now.iter().all(|(n, ready)| *ready && !before.contains(n)))
                    .then_some(()),
            )
        })
        .await
        .unwrap();
        s
    } else {
        // The pods stay: what runs in them later is what each node sees.
        wait_debloat(&c, &ns.name, "redis", "both nodes recording", |s| {
            s.profilers.len() == 2
        })
        .await
    };
    let mut both = vec![node.clone(), other.clone()];
    both.sort();
    assert_eq!(s.nodes, both);
    // redis-benchmark runs on the other node's pod only.
    let on = |n: &str, want: &str| {
        let pods = c
            .kubectl(&["-n", &ns.name, "get", "pods", "-l", "app=redis", "--field-selector", &format!("spec.nodeName={n}"), "-o", r#"jsonpath={range .items[*]}{.metadata.name} {.spec.containers[0].image} {.metadata.deletionTimestamp}{"\n"}{end}"#])
            .unwrap();
        pods.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() == 2 && f[1] == want)
            .map(|f| f[0].to_string())
            .unwrap_or_else(|| panic!("no pod of {want} on {n}: {pods}"))
    };
    let builder = s.node.clone().unwrap();
    let far = on(both.iter().find(|n| **n != builder).unwrap(), &image);
    let bench = exec(
        &c,
        &ns.name,
        &far,
        &["redis-benchmark", "-q", "-n", "200", "-t", "ping"],
    )
    .unwrap();
    assert!(bench.contains("requests per second"), "{bench}");
    c.kubectl(&[
        "-n",
        &ns.name,
        "patch",
        "imagedebloat",
        "redis",
        "--type=merge",
        "-p",
        r#"{"spec":{"profile":{"stop":true}}}"#,
    ])
    .unwrap();
    let s = wait_debloat(&c, &ns.name, "redis", "the end", |s| {
        matches!(s.phase.as_str(), "Ready" | "Failed" | "RolledBack")
    })
    .await;
    assert_eq!(s.phase, "Ready", "{s:?}");
    let handed: Vec<&String> = s
        .profilers
        .iter()
        .filter(|(_, p)| p.paths.is_some())
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        handed,
        vec![both.iter().find(|n| **n != builder).unwrap()],
        "the other node handed its paths over"
    );
    // The image was built on the building node, where redis-benchmark
    // never ran, and still has it: the other node's profile was merged in.
    let (near, _) = pod_of(&c, &ns.name, "redis", &format!("{image}-baffs"));
    let bench = exec(
        &c,
        &ns.name,
        &near,
        &["redis-benchmark", "-q", "-n", "200", "-t", "ping"],
    )
    .unwrap();
    assert!(bench.contains("requests per second"), "{bench}");
}

#[tokio::test]
async fn every_node_running_the_workload_profiles_it_and_the_build_merges_their_paths() {
    two_nodes_merge("2n", false).await;
}

#[tokio::test]
async fn restarted_under_two_profilers_each_node_records_its_new_pod_from_the_start() {
    two_nodes_merge("2r", true).await;
}
