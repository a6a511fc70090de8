//! The systemd virtual node against the local cluster's apiserver and
//! scheduler, with a private systemd as the host ([`SystemdHost`]): the
//! units are checked in systemd itself, not only through pod status.
//!
//! Each test registers a Node of its own (deleted at the end) and runs its
//! pods in a namespace of its own.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use berth_e2e::registry::unique_suffix;
use berth_e2e::systemd_host::{SystemdHost, VirtualNode};
use berth_e2e::{Cluster, TestNamespace, eventually};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;

const WAIT: Duration = Duration::from_secs(60);

fn pod_yaml(ns: &str, name: &str, node: &str, image: &str, script: &str, restart: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  nodeSelector: {{kubernetes.io/hostname: {node}}}\n  tolerations: [{{key: berth.dev/virtual-node, operator: Exists}}]\n  restartPolicy: {restart}\n  terminationGracePeriodSeconds: 5\n  containers:\n  - name: main\n    image: \"{image}\"\n    command: [busybox, sh, -c, {script:?}]\n    env: [{{name: GREETING, value: hello}}]\n"
    )
}

#[tokio::test]
async fn a_pod_scheduled_to_the_virtual_node_runs_as_a_unit_and_stops_when_deleted() {
    let c = Cluster::from_env().await.unwrap();
    let host = SystemdHost::start().await.unwrap();
    let vn = VirtualNode::start(&c, &host);
    let nodes: Api<Node> = Api::all(c.client.clone());
    // Registered, tainted, Ready, with the host's capacity.
    let node = eventually(WAIT, "the virtual Node Ready", || async {
        let n = nodes.get_opt(&vn.name).await?;
        Ok(n.filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        }))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", vn.log()));
    let taints = node.spec.unwrap().taints.unwrap_or_default();
    assert!(
        taints
            .iter()
            .any(|t| t.key == "berth.dev/virtual-node" && t.effect == "NoSchedule")
    );
    let cap = node.status.unwrap().capacity.unwrap();
    assert!(
        cap["memory"].0.ends_with("Ki") && cap["cpu"].0 != "0",
        "{cap:?}"
    );

    let ns = TestNamespace::new(&c, "vn");
    c.apply(&pod_yaml(
        &ns.name,
        "web",
        &vn.name,
        "deb://busybox-static",
        "echo $GREETING from systemd; exec sleep 3600",
        "Always",
    ))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), &ns.name);
    eventually(WAIT, "the pod Running and Ready", || async {
        let p = pods.get("web").await?;
        let st = p.status.unwrap_or_default();
        let ready = st
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        Ok((st.phase.as_deref() == Some("Running") && ready).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", vn.log()));
    // systemd itself runs it, in Berth's slice, with the pod's environment.
    let unit = format!("berth_{}_web_main.service", ns.name);
    let show = host
        .systemctl(&[
            "show",
            &unit,
            "-p",
            "ActiveState",
            "-p",
            "SubState",
            "-p",
            "Slice",
            "-p",
            "Environment",
        ])
        .unwrap();
    let show = String::from_utf8_lossy(&show.stdout).to_string();
    assert!(
        show.contains("ActiveState=active") && show.contains("SubState=running"),
        "{show}"
    );
    assert!(show.contains("Slice=berth.slice"), "{show}");
    assert!(show.contains("GREETING=hello"), "{show}");

    // Deleting the pod stops the unit, and the pod object goes.
    c.kubectl(&["-n", &ns.name, "delete", "pod", "web", "--wait=false"])
        .unwrap();
    eventually(Duration::from_secs(20), "the pod gone", || async {
        Ok(pods.get_opt("web").await?.is_none().then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", vn.log()));
    let state = host.systemctl(&["is-active", &unit]).unwrap();
    let state = String::from_utf8_lossy(&state.stdout).trim().to_string();
    assert_ne!(state, "active", "the unit still runs");
}

#[tokio::test]
async fn a_failing_container_reports_its_exit_code_and_an_oci_image_a_clear_reason() {
    let c = Cluster::from_env().await.unwrap();
    let host = SystemdHost::start().await.unwrap();
    let vn = VirtualNode::start(&c, &host);
    let ns = TestNamespace::new(&c, "vn-fail");
    c.apply(&pod_yaml(
        &ns.name,
        "fails",
        &vn.name,
        "deb://busybox-static",
        "exit 7",
        "Never",
    ))
    .unwrap();
    c.apply(&pod_yaml(
        &ns.name,
        "oci",
        &vn.name,
        "busybox:1.36",
        "true",
        "Never",
    ))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), &ns.name);
    let p = eventually(WAIT, "the failing pod Failed", || async {
        let p = pods.get("fails").await?;
        Ok((p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed")).then_some(p))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", vn.log()));
    let cs = &p.status.unwrap().container_statuses.unwrap()[0];
    let t = cs.state.as_ref().unwrap().terminated.as_ref().unwrap();
    assert_eq!((t.exit_code, t.reason.as_deref()), (7, Some("Error")));
    let waiting = eventually(WAIT, "the OCI pod waiting with a reason", || async {
        let p = pods.get("oci").await?;
        Ok(p.status
            .and_then(|s| s.container_statuses)
            .and_then(|cs| cs[0].state.clone())
            .and_then(|s| s.waiting))
    })
    .await
    .unwrap();
    assert_eq!(waiting.reason.as_deref(), Some("ImageUnsupported"));
    assert!(waiting.message.unwrap_or_default().contains("deb://"));
}

/// `systemctl --user show UNIT -p PROP` → the value.
fn unit_prop(host: &SystemdHost, unit: &str, prop: &str) -> String {
    let out = host.systemctl(&["show", unit, "-p", prop]).unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches(&format!("{prop}="))
        .to_string()
}

#[tokio::test]
async fn after_an_agent_restart_live_units_are_adopted_and_orphans_stopped() {
    let c = Cluster::from_env().await.unwrap();
    let host = SystemdHost::start().await.unwrap();
    let mut vn = VirtualNode::start(&c, &host);
    let ns = TestNamespace::new(&c, "vn-adopt");
    for name in ["stays", "goes"] {
        c.apply(&pod_yaml(
            &ns.name,
            name,
            &vn.name,
            "deb://busybox-static",
            "exec sleep 3600",
            "Always",
        ))
        .unwrap();
    }
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), &ns.name);
    let unit = |pod: &str| format!("berth_{}_{pod}_main.service", ns.name);
    for name in ["stays", "goes"] {
        eventually(WAIT, &format!("{name} Running"), || async {
            let p = pods.get(name).await?;
            Ok((p.status.and_then(|s| s.phase).as_deref() == Some("Running")).then_some(()))
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", vn.log()));
    }
    let pid = unit_prop(&host, &unit("stays"), "MainPID");
    let invocation = unit_prop(&host, &unit("stays"), "InvocationID");
    assert_ne!(pid, "0");
    // The agent goes away; meanwhile one pod is removed for good.
    vn.kill_agent();
    c.kubectl(&[
        "-n",
        &ns.name,
        "delete",
        "pod",
        "goes",
        "--grace-period=0",
        "--force",
    ])
    .unwrap();
    let vn2 = VirtualNode::start_as(&c, &host, vn.name.clone());
    eventually(WAIT, "the orphaned unit stopped", || async {
        let state = unit_prop(&host, &unit("goes"), "ActiveState");
        Ok((state != "active" && state != "deactivating").then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", vn2.log()));
    // The live pod's unit is the same process, the same invocation.
    assert_eq!(unit_prop(&host, &unit("stays"), "MainPID"), pid);
    assert_eq!(unit_prop(&host, &unit("stays"), "InvocationID"), invocation);
    let p = pods.get("stays").await.unwrap();
    assert_eq!(p.status.and_then(|s| s.phase).as_deref(), Some("Running"));
}

#[tokio::test]
async fn restarts_follow_the_restart_policy_and_probes_drive_ready_and_liveness() {
    let c = Cluster::from_env().await.unwrap();
    let host = SystemdHost::start().await.unwrap();
    let vn = VirtualNode::start(&c, &host);
    let ns = TestNamespace::new(&c, "vn-probe");
    let dir = tempfile::tempdir().unwrap();
    let (ready_file, alive_file) = (dir.path().join("ready"), dir.path().join("alive"));
    std::fs::write(&alive_file, "").unwrap();
    // A container that keeps failing is restarted by systemd (Restart=always).
    c.apply(&pod_yaml(
        &ns.name,
        "crashes",
        &vn.name,
        "deb://busybox-static",
        "sleep 0.3; exit 3",
        "Always",
    ))
    .unwrap();
    let probe = |file: &std::path::Path| {
        format!(
            "{{exec: {{command: [test, -f, {}]}}, periodSeconds: 1, failureThreshold: 1}}",
            file.display()
        )
    };
    c.apply(&format!(
        "{}    readinessProbe: {}\n    livenessProbe: {}\n",
        pod_yaml(
            &ns.name,
            "probed",
            &vn.name,
            "deb://busybox-static",
            "exec sleep 3600",
            "Always"
        ),
        probe(&ready_file),
        probe(&alive_file),
    ))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), &ns.name);
    let status = |name: &'static str| {
        let pods = pods.clone();
        async move {
            let p = pods.get(name).await?;
            anyhow::Ok(p.status.unwrap_or_default())
        }
    };
    let ready = |s: &k8s_openapi::api::core::v1::PodStatus| {
        s.conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    };
    let restarts = |s: &k8s_openapi::api::core::v1::PodStatus| {
        s.container_statuses
            .as_ref()
            .map_or(0, |cs| cs[0].restart_count)
    };
    eventually(WAIT, "crashes restarted twice", || async {
        let s = status("crashes").await?;
        Ok((restarts(&s) >= 2 && s.phase.as_deref() == Some("Running")).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", vn.log()));
    // Running but not Ready until its readiness probe passes.
    eventually(WAIT, "probed running, not ready", || async {
        let s = status("probed").await?;
        Ok((s.phase.as_deref() == Some("Running") && !ready(&s)).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", vn.log()));
    std::fs::write(&ready_file, "").unwrap();
    eventually(WAIT, "probed ready", || async {
        Ok(ready(&status("probed").await?).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", vn.log()));
    // A failing liveness probe restarts the unit: a new main process.
    let unit = format!("berth_{}_probed_main.service", ns.name);
    let pid = unit_prop(&host, &unit, "MainPID");
    std::fs::remove_file(&alive_file).unwrap();
    eventually(WAIT, "probed restarted by its liveness probe", || async {
        Ok((restarts(&status("probed").await?) >= 1).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", vn.log()));
    assert_ne!(unit_prop(&host, &unit, "MainPID"), pid);
}

/// A kubelet serving certificate for `ip` signed by the cluster's CA (the
/// one the apiserver checks kubelets against), in `dir`.
fn serving_cert(
    c: &Cluster,
    dir: &std::path::Path,
    node: &str,
    ip: &str,
) -> (PathBuf, PathBuf, PathBuf) {
    let pki = PathBuf::from(c.var("BERTH_E2E_DIR")).join("pki");
    let (key, csr, crt, ext) = (
        dir.join("k.key"),
        dir.join("k.csr"),
        dir.join("k.crt"),
        dir.join("ext"),
    );
    std::fs::write(
        &ext,
        format!("subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth\n"),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let p = |x: &PathBuf| x.display().to_string();
    run(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &p(&key),
        "-out",
        &p(&csr),
        "-subj",
        &format!("/O=system:nodes/CN=system:node:{node}"),
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        &p(&csr),
        "-CA",
        &p(&pki.join("ca.crt")),
        "-CAkey",
        &p(&pki.join("ca.key")),
        "-CAcreateserial",
        "-out",
        &p(&crt),
        "-days",
        "1",
        "-extfile",
        &p(&ext),
    ]);
    (crt, key, pki.join("ca.crt"))
}

#[tokio::test]
async fn kubectl_logs_reads_a_container_whole_tailed_and_followed() {
    let c = Cluster::from_env().await.unwrap();
    let host = SystemdHost::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let name = format!("berth-virtual-{}", unique_suffix());
    let ip = c.var("BERTH_REGISTRY_IP").to_string();
    let (crt, key, ca) = serving_cert(&c, dir.path(), &name, &ip);
    let port = std::net::TcpListener::bind((ip.as_str(), 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let p = |x: &std::path::Path| x.display().to_string();
    let vn = VirtualNode::start_with(
        &c,
        &host,
        name,
        &[
            "--tls-cert-file".into(),
            p(&crt),
            "--tls-key-file".into(),
            p(&key),
            "--client-ca-file".into(),
            p(&ca),
            "--kubelet-port".into(),
            port.to_string(),
            "--logs-dir".into(),
            p(&dir.path().join("logs")),
        ],
    );
    let ns = TestNamespace::new(&c, "vn-logs");
    c.apply(&pod_yaml(&ns.name, "talks", &vn.name, "deb://busybox-static",
        "echo out-one; echo err-one >&2; i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.3; done", "Always"))
        .unwrap();
    let logs = eventually(WAIT, "kubectl logs with the first lines", || async {
        let out = c.kubectl(&["-n", &ns.name, "logs", "talks"]);
        Ok(out.ok().filter(|o| o.contains("tick 1")))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", vn.log()));
    assert!(logs.starts_with("out-one\nerr-one\ntick 0\n"), "{logs}");
    let last = c
        .kubectl(&["-n", &ns.name, "logs", "talks", "--tail=1"])
        .unwrap();
    assert_eq!(last.lines().count(), 1, "{last}");
    assert!(last.starts_with("tick "), "{last}");
    // Following: lines written after the call arrive.
    let mut follow = Command::new(c.tool("kubectl"))
        .env("KUBECONFIG", c.var("KUBECONFIG"))
        .args(["-n", &ns.name, "logs", "-f", "--tail=1", "talks"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let first: u64 = rx
        .recv_timeout(WAIT)
        .unwrap()
        .trim_start_matches("tick ")
        .parse()
        .unwrap();
    let later = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("no new line while following");
        let n: u64 = line.trim_start_matches("tick ").parse().unwrap();
        if n >= first + 3 {
            break n;
        }
    };
    assert!(later > first);
    let _ = follow.kill();
    let _ = follow.wait();
    // Another caller (no client certificate of the cluster's CA) is refused.
    let out = Command::new("curl")
        .args([
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("https://{ip}:{port}/containerLogs/{}/talks/main", ns.name),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "000",
        "served without a client certificate"
    );
}

#[tokio::test]
async fn a_second_pod_on_a_taken_host_port_fails_and_names_the_holder() {
    let c = Cluster::from_env().await.unwrap();
    let host = SystemdHost::start().await.unwrap();
    let vn = VirtualNode::start(&c, &host);
    let ns = TestNamespace::new(&c, "vn-port");
    let port = 20000 + fastrand::u16(..20000);
    let with_port = |name: &str| {
        format!(
            "{}    ports: [{{containerPort: {port}}}]\n",
            pod_yaml(
                &ns.name,
                name,
                &vn.name,
                "deb://busybox-static",
                "exec sleep 3600",
                "Always"
            )
        )
    };
    c.apply(&with_port("first")).unwrap();
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), &ns.name);
    eventually(WAIT, "first Running", || async {
        let p = pods.get("first").await?;
        Ok((p.status.and_then(|s| s.phase).as_deref() == Some("Running")).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", vn.log()));
    c.apply(&with_port("second")).unwrap();
    let st = eventually(WAIT, "second Failed", || async {
        let s = pods.get("second").await?.status.unwrap_or_default();
        Ok((s.phase.as_deref() == Some("Failed")).then_some(s))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", vn.log()));
    assert_eq!(st.reason.as_deref(), Some("HostPortConflict"));
    let message = st.message.unwrap_or_default();
    assert!(
        message.contains(&format!("{port}/TCP")) && message.contains("/first"),
        "{message}"
    );
    // Nothing of it was started.
    let unit = format!("berth_{}_second_main.service", ns.name);
    assert_ne!(unit_prop(&host, &unit, "ActiveState"), "active");
    let first = pods.get("first").await.unwrap();
    assert_eq!(
        first.status.and_then(|s| s.phase).as_deref(),
        Some("Running")
    );
}
