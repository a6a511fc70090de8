//! The real docker CLI (Debian's) against docker-shim and the cluster's
//! coordinator: every container runs as a pod on a node of the cluster.

use berth_e2e::Cluster;
use berth_e2e::docker::DockerNamespace;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn docker_run_rm_keeps_stdout_and_stderr_apart_and_exits_with_the_code() {
    let c = Cluster::from_env().await.unwrap();
    let image = c.fresh_docker_image("docker-run").await.unwrap();
    let ns = DockerNamespace::new(&c, "docker-run").unwrap();
    let shim = ns.shim("ci").await.unwrap();

    let out = shim
        .docker(&[
            "run",
            "--rm",
            &image,
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ])
        .unwrap();
    assert_eq!(
        (text(&out.stdout), text(&out.stderr), out.status.code()),
        ("out\n".into(), "err\n".into(), Some(3)),
        "shim log:\n{}",
        shim.log()
    );
    // --rm: gone from the list and from the cluster once run returned.
    assert_eq!(shim.docker_ok(&["ps", "-a", "-q"]).unwrap(), "");
    assert_eq!(ns.berth_objects().unwrap(), Vec::<String>::new());
}

#[tokio::test]
async fn a_detached_container_is_listed_logged_stopped_and_removed() {
    let c = Cluster::from_env().await.unwrap();
    let image = c.fresh_docker_image("docker-detach").await.unwrap();
    let ns = DockerNamespace::new(&c, "docker-detach").unwrap();
    let shim = ns.shim("ci").await.unwrap();

    let id = shim
        .docker_ok(&[
            "run",
            "-d",
            "--name",
            "web",
            "--label",
            "suite=e2e",
            &image,
            "sh",
            "-c",
            "echo hello; echo oops >&2; trap 'exit 7' TERM; while true; do sleep 1; done",
        ])
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(id.len(), 64, "a full container ID: {id}");
    let listed = shim
        .docker_ok(&[
            "ps",
            "--filter",
            "label=suite=e2e",
            "--format",
            "{{.ID}} {{.Names}} {{.Status}}",
        ])
        .unwrap();
    assert!(
        listed.starts_with(&format!("{} web Up", &id[..12])),
        "{listed}"
    );

    // The log so far, streams apart; `logs -f` ends when the container does.
    let logs = shim.docker(&["logs", "web"]).unwrap();
    assert_eq!(
        (text(&logs.stdout), text(&logs.stderr)),
        ("hello\n".into(), "oops\n".into())
    );
    let inspect = shim
        .docker_ok(&[
            "inspect",
            "-f",
            "{{.State.Status}} {{.State.Running}} {{.Name}}",
            "web",
        ])
        .unwrap();
    assert_eq!(inspect.trim(), "running true /web");

    shim.docker_ok(&["stop", "web"]).unwrap();
    let state = shim
        .docker_ok(&[
            "inspect",
            "-f",
            "{{.State.Status}} {{.State.ExitCode}}",
            &id[..12],
        ])
        .unwrap();
    assert_eq!(state.trim(), "exited 7", "the TERM trap's exit code");
    let all = shim
        .docker_ok(&["ps", "-a", "--format", "{{.Names}} {{.Status}}"])
        .unwrap();
    assert!(all.starts_with("web Exited (7)"), "{all}");
    // Logs outlive the run.
    let logs = shim.docker_ok(&["logs", "web"]).unwrap();
    assert_eq!(logs, "hello\n");

    shim.docker_ok(&["rm", "web"]).unwrap();
    assert_eq!(shim.docker_ok(&["ps", "-a", "-q"]).unwrap(), "");
    assert_eq!(ns.berth_objects().unwrap(), Vec::<String>::new());
    let gone = shim.docker(&["inspect", "web"]).unwrap();
    assert!(!gone.status.success());
    assert!(
        text(&gone.stderr).contains("No such"),
        "{}",
        text(&gone.stderr)
    );
}

#[tokio::test]
async fn a_caller_without_pod_rights_is_refused_and_nothing_is_created() {
    let c = Cluster::from_env().await.unwrap();
    let image = c.fresh_docker_image("docker-outsider").await.unwrap();
    let ns = DockerNamespace::new(&c, "docker-outsider").unwrap();
    let shim = ns.shim("outsider").await.unwrap();

    let out = shim.docker(&["run", "--rm", &image, "true"]).unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("create pods") || err.contains("forbidden") || err.contains("not allowed"),
        "{err}"
    );
    assert_eq!(ns.berth_objects().unwrap(), Vec::<String>::new());
    let out = shim.docker(&["ps", "-a"]).unwrap();
    assert!(!out.status.success(), "listing is refused too");
}

#[tokio::test]
async fn a_container_berth_cannot_run_is_refused_before_anything_is_made() {
    let c = Cluster::from_env().await.unwrap();
    let image = c.fresh_docker_image("docker-bad").await.unwrap();
    let ns = DockerNamespace::new(&c, "docker-bad").unwrap();
    let shim = ns.shim("ci").await.unwrap();

    let out = shim
        .docker(&["create", "--user", "nobody", &image])
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("numeric"),
        "{}",
        text(&out.stderr)
    );
    let out = shim
        .docker(&["create", "--name", "bad/name", &image])
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("Invalid container name"),
        "{}",
        text(&out.stderr)
    );
    // An image that does not exist: the start fails with the pull's reason.
    let missing = format!("{}/e2e/no-such-image:1", c.registry());
    let out = shim.docker(&["run", "--rm", &missing, "true"]).unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).to_lowercase().contains("no such image")
            || text(&out.stderr).contains("ErrImagePull")
            || text(&out.stderr).contains("ImagePullBackOff"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(shim.docker_ok(&["ps", "-q"]).unwrap(), "");
}

#[tokio::test]
async fn docker_exec_returns_the_commands_streams_apart_and_its_exit_code() {
    let c = Cluster::from_env().await.unwrap();
    let image = c.fresh_docker_image("docker-exec").await.unwrap();
    let ns = DockerNamespace::new(&c, "docker-exec").unwrap();
    let shim = ns.shim("ci").await.unwrap();

    shim.docker_ok(&["run", "-d", "--name", "box", &image, "sleep", "600"])
        .unwrap();
    let out = shim
        .docker(&["exec", "box", "sh", "-c", "echo in; echo oops >&2; exit 4"])
        .unwrap();
    assert_eq!(
        (text(&out.stdout), text(&out.stderr), out.status.code()),
        ("in\n".into(), "oops\n".into(), Some(4)),
        "shim log:\n{}",
        shim.log()
    );
    let out = shim
        .docker_ok(&[
            "exec",
            "-e",
            "GREETING=hi",
            "-w",
            "/etc",
            "box",
            "sh",
            "-c",
            "echo $GREETING $(pwd)",
        ])
        .unwrap();
    assert_eq!(out, "hi /etc\n");
    // stdin reaches the command (docker exec -i).
    let mut child = std::process::Command::new(c.tool("docker"))
        .args(["exec", "-i", "box", "cat"])
        .env("DOCKER_HOST", &shim.host)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"through stdin\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(text(&out.stdout), "through stdin\n");
    shim.docker_ok(&["rm", "-f", "box"]).unwrap();
    // A stopped container takes no exec.
    let out = shim.docker(&["exec", "box", "true"]).unwrap();
    assert!(!out.status.success());
}

#[tokio::test]
async fn two_shims_do_not_see_each_others_containers_and_a_killed_shims_are_reaped() {
    let c = Cluster::from_env().await.unwrap();
    let image = c.fresh_docker_image("docker-sessions").await.unwrap();
    let ns = DockerNamespace::new(&c, "docker-sessions").unwrap();
    let mut first = ns.shim("ci").await.unwrap();
    let second = ns.shim("ci").await.unwrap();

    // The same name in both sessions: no clash, each sees its own.
    let a = first
        .docker_ok(&["run", "-d", "--name", "db", &image, "sleep", "600"])
        .unwrap();
    let b = second
        .docker_ok(&["run", "-d", "--name", "db", &image, "sleep", "600"])
        .unwrap();
    assert_ne!(a, b);
    assert_eq!(first.docker_ok(&["ps", "-q", "--no-trunc"]).unwrap(), a);
    assert_eq!(second.docker_ok(&["ps", "-q", "--no-trunc"]).unwrap(), b);
    for verb in ["inspect", "stop", "rm"] {
        let out = second.docker(&[verb, &a[..12]]).unwrap();
        assert!(
            !out.status.success(),
            "the second shim cannot {verb} the first's container"
        );
        assert!(
            text(&out.stderr).contains("No such"),
            "{}",
            text(&out.stderr)
        );
    }
    // (`docker rm -f` says nothing about a missing container, by design.)
    assert_eq!(
        first
            .docker_ok(&["inspect", "-f", "{{.State.Status}}", "db"])
            .unwrap(),
        "running\n"
    );

    // The first shim dies without cleaning up: its Lease runs out (20 s)
    // and the coordinator removes its container; the second's stays.
    first.kill();
    let started = std::time::Instant::now();
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(c.client.clone(), &ns.ns.name);
    let a_pod_label = format!("berth.dev/container={}", &a[..12]);
    berth_e2e::eventually(
        std::time::Duration::from_secs(90),
        "the dead shim's container removed",
        || {
            let pods = pods.clone();
            let label = a_pod_label.clone();
            async move {
                let left = pods
                    .list(&kube::api::ListParams::default().labels(&label))
                    .await?;
                Ok(left.items.is_empty().then_some(()))
            }
        },
    )
    .await
    .unwrap();
    let took = started.elapsed();
    assert!(
        took >= std::time::Duration::from_secs(10),
        "removed after {took:?}: before the Lease ran out"
    );
    assert_eq!(second.docker_ok(&["ps", "-q", "--no-trunc"]).unwrap(), b);
    second.docker_ok(&["rm", "-f", "db"]).unwrap();
}

#[tokio::test]
async fn docker_cp_copies_files_both_ways_and_into_a_container_before_it_starts() {
    let c = Cluster::from_env().await.unwrap();
    let image = c.fresh_docker_image("docker-cp").await.unwrap();
    let ns = DockerNamespace::new(&c, "docker-cp").unwrap();
    let shim = ns.shim("ci").await.unwrap();
    let dir = std::env::temp_dir().join(format!(
        "berth-e2e-cp-{}",
        berth_e2e::registry::unique_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let local = dir.join("greeting.txt");
    std::fs::write(&local, "hello from the host\n").unwrap();
    // Larger than any one gRPC frame's worth, well within what a copy takes.
    let big = dir.join("big.txt");
    let big_text: String = (0..20_000).map(|i| format!("line {i:08}\n")).collect();
    std::fs::write(&big, &big_text).unwrap();

    shim.docker_ok(&["run", "-d", "--name", "box", &image, "sleep", "600"])
        .unwrap();
    shim.docker_ok(&["cp", local.to_str().unwrap(), "box:/tmp/"])
        .unwrap();
    let inside = shim
        .docker_ok(&["exec", "box", "cat", "/tmp/greeting.txt"])
        .unwrap();
    assert_eq!(inside, "hello from the host\n");
    shim.docker_ok(&["cp", big.to_str().unwrap(), "box:/tmp/"])
        .unwrap();
    let size = shim
        .docker_ok(&["exec", "box", "wc", "-c", "/tmp/big.txt"])
        .unwrap();
    assert_eq!(
        size.split_whitespace().next(),
        Some(big_text.len().to_string().as_str())
    );

    // And back: a file the container wrote, and a missing one (a 404,
    // which the CLI words as below).
    shim.docker_ok(&["exec", "box", "sh", "-c", "echo made inside > /tmp/out.txt"])
        .unwrap();
    let back = dir.join("out.txt");
    shim.docker_ok(&["cp", "box:/tmp/out.txt", back.to_str().unwrap()])
        .unwrap();
    assert_eq!(std::fs::read_to_string(&back).unwrap(), "made inside\n");
    let out = shim
        .docker(&["cp", "box:/no/such/file", dir.to_str().unwrap()])
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("No such container:path"),
        "{}",
        text(&out.stderr)
    );
    shim.docker_ok(&["rm", "-f", "box"]).unwrap();
    // Before start: the copy does not start the container, and every run
    // finds the file, by the directory or by the file's new name.
    shim.docker_ok(&[
        "create",
        "--name",
        "later",
        &image,
        "sh",
        "-c",
        "cat /tmp/greeting.txt /etc/renamed.txt; wc -c < /tmp/big.txt",
    ])
    .unwrap();
    shim.docker_ok(&["cp", local.to_str().unwrap(), "later:/tmp/"])
        .unwrap();
    shim.docker_ok(&["cp", local.to_str().unwrap(), "later:/etc/renamed.txt"])
        .unwrap();
    shim.docker_ok(&["cp", big.to_str().unwrap(), "later:/tmp/"])
        .unwrap();
    let state = shim
        .docker_ok(&["inspect", "-f", "{{.State.Status}}", "later"])
        .unwrap();
    assert_eq!(state, "created\n", "a copy does not start the container");
    let out = shim.docker_ok(&["start", "-a", "later"]).unwrap();
    assert_eq!(
        out,
        format!(
            "hello from the host\nhello from the host\n{}\n",
            big_text.len()
        )
    );
    let again = shim.docker_ok(&["start", "-a", "later"]).unwrap();
    assert_eq!(again, out, "and again on the next run");
    shim.docker_ok(&["rm", "later"]).unwrap();
    assert_eq!(ns.berth_objects().unwrap(), Vec::<String>::new());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_published_port_is_reachable_from_the_shims_host() {
    let c = Cluster::from_env().await.unwrap();
    let image = c.fresh_docker_image("docker-port").await.unwrap();
    let ns = DockerNamespace::new(&c, "docker-port").unwrap();
    let shim = ns.shim("ci").await.unwrap();

    shim.docker_ok(&[
        "run", "-d", "--name", "web", "-p", "8080", &image, "sh", "-c",
        "mkdir -p /www && echo hello-from-the-pod > /www/index.html && exec httpd -f -p 8080 -h /www",
    ])
    .unwrap();
    let mapped = shim.docker_ok(&["port", "web", "8080"]).unwrap();
    let addr = mapped.lines().next().unwrap().trim().to_string();
    assert!(addr.starts_with("127.0.0.1:"), "{mapped}");
    // The server inside starts a moment after the container does.
    let body = berth_e2e::eventually(
        std::time::Duration::from_secs(30),
        "an answer on the published port",
        || {
            let addr = addr.clone();
            async move {
                use std::io::{Read, Write};
                let mut s = std::net::TcpStream::connect(&addr)?;
                s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
                s.write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")?;
                let mut answer = String::new();
                s.read_to_string(&mut answer)?;
                Ok(answer.contains("200").then_some(answer))
            }
        },
    )
    .await
    .unwrap();
    assert!(body.ends_with("hello-from-the-pod\n"), "{body}");
    // Inside the cluster, through the Service of its name.
    let inside = shim
        .docker_ok(&["run", "--rm", &image, "wget", "-qO-", "http://web:8080/"])
        .unwrap();
    assert_eq!(inside, "hello-from-the-pod\n");
    shim.docker_ok(&["rm", "-f", "web"]).unwrap();
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "the listener closes with the container"
    );

    // A --rm container's listener closes when Berth removes it.
    shim.docker_ok(&[
        "run", "-d", "--rm", "--name", "brief", "-p", "8081", &image, "sleep", "3",
    ])
    .unwrap();
    let mapped = shim.docker_ok(&["port", "brief", "8081"]).unwrap();
    let brief = mapped.lines().next().unwrap().trim().to_string();
    berth_e2e::eventually(
        std::time::Duration::from_secs(60),
        "the --rm container's listener closed",
        || {
            let brief = brief.clone();
            async move { Ok(std::net::TcpStream::connect(&brief).is_err().then_some(())) }
        },
    )
    .await
    .unwrap();
    assert_eq!(shim.docker_ok(&["ps", "-a", "-q"]).unwrap(), "");
}

#[tokio::test]
async fn containers_on_a_network_reach_each_other_by_name_and_alias_on_any_port() {
    let c = Cluster::from_env().await.unwrap();
    let image = c.fresh_docker_image("docker-net").await.unwrap();
    let ns = DockerNamespace::new(&c, "docker-net").unwrap();
    let shim = ns.shim("ci").await.unwrap();

    let net_id = shim
        .docker_ok(&["network", "create", "--label", "suite=e2e", "backend"])
        .unwrap();
    assert_eq!(net_id.trim().len(), 64, "{net_id}");
    // A server on a port nobody published.
    shim.docker_ok(&[
        "run",
        "-d",
        "--name",
        "web",
        "--network",
        "backend",
        "--network-alias",
        "database",
        &image,
        "sh",
        "-c",
        "mkdir /www && echo pong > /www/index.html && exec httpd -f -p 8080 -h /www",
    ])
    .unwrap();
    for host in ["database", "web"] {
        let got = shim
            .docker(&[
                "run",
                "--rm",
                "--network",
                "backend",
                &image,
                "wget",
                "-qO-",
                &format!("http://{host}:8080/"),
            ])
            .unwrap();
        assert_eq!(
            (text(&got.stdout), got.status.code()),
            ("pong\n".into(), Some(0)),
            "{host}: {}\nshim log:\n{}",
            text(&got.stderr),
            shim.log()
        );
    }
    let members = shim
        .docker_ok(&[
            "network",
            "inspect",
            "-f",
            "{{range .Containers}}{{.Name}} {{end}}{{.Labels.suite}}",
            "backend",
        ])
        .unwrap();
    assert_eq!(members.trim(), "web e2e");
    let listed = shim
        .docker_ok(&["network", "ls", "--format", "{{.Name}}"])
        .unwrap();
    assert_eq!(listed, "backend\nbridge\n", "the CLI sorts by name");
    let aliases = shim
        .docker_ok(&[
            "inspect",
            "-f",
            "{{json .NetworkSettings.Networks.backend.Aliases}}",
            "web",
        ])
        .unwrap();
    assert_eq!(aliases.trim(), r#"["database"]"#);

    // Not while a container is on it; a name is never taken twice.
    let busy = shim.docker(&["network", "rm", "backend"]).unwrap();
    assert!(
        text(&busy.stderr).contains("active endpoints"),
        "{}",
        text(&busy.stderr)
    );
    let clash = shim
        .docker(&[
            "run",
            "-d",
            "--network",
            "backend",
            "--network-alias",
            "database",
            &image,
            "true",
        ])
        .unwrap();
    assert!(
        text(&clash.stderr).contains("\"database\" is taken"),
        "{}",
        text(&clash.stderr)
    );
    let bad = shim
        .docker(&[
            "run",
            "--rm",
            "--network",
            "backend",
            "--network-alias",
            "db_1",
            &image,
            "true",
        ])
        .unwrap();
    assert!(
        text(&bad.stderr).contains("DNS label"),
        "{}",
        text(&bad.stderr)
    );
    let missing = shim
        .docker(&["run", "--rm", "--network", "nowhere", &image, "true"])
        .unwrap();
    assert!(
        text(&missing.stderr).contains("network nowhere not found"),
        "{}",
        text(&missing.stderr)
    );

    // Disconnected, its names go; connected again with a new alias, they
    // come back.
    shim.docker_ok(&["network", "disconnect", "backend", "web"])
        .unwrap();
    assert_eq!(ns.services().unwrap(), Vec::<String>::new());
    shim.docker_ok(&["network", "connect", "--alias", "cache", "backend", "web"])
        .unwrap();
    let got = shim
        .docker_ok(&[
            "run",
            "--rm",
            "--network",
            "backend",
            &image,
            "wget",
            "-qO-",
            "http://cache:8080/",
        ])
        .unwrap();
    assert_eq!(got, "pong\n");

    shim.docker_ok(&["rm", "-f", "web"]).unwrap();
    shim.docker_ok(&["network", "rm", "backend"]).unwrap();
    assert_eq!(
        shim.docker_ok(&["network", "ls", "--format", "{{.Name}}"])
            .unwrap(),
        "bridge\n"
    );
    assert_eq!(ns.berth_objects().unwrap(), Vec::<String>::new());
}

#[tokio::test]
async fn operator_flags_and_container_labels_shape_the_pod_and_exit_cleans_up() {
    let c = Cluster::from_env().await.unwrap();
    let image = c.fresh_docker_image("docker-knobs").await.unwrap();
    let ns = DockerNamespace::new(&c, "docker-knobs").unwrap();
    let template = std::env::temp_dir().join(format!("berth-template-{}.yaml", std::process::id()));
    std::fs::write(
        &template,
        "metadata:\n  labels: {team: ci}\nspec:\n  tolerations: [{key: dedicated, operator: Exists}]\n  \
         volumes: [{name: scratch, emptyDir: {}}]\n  containers:\n  - name: base\n    \
         volumeMounts: [{name: scratch, mountPath: /scratch}]\n",
    )
    .unwrap();
    let node = &c.nodes[0];
    let selector = format!("kubernetes.io/hostname={node}");
    let mut shim = ns
        .shim_with(
            "ci",
            &[
                "--cpu-request",
                "50m",
                "--memory-limit",
                "64Mi",
                "--pull-policy",
                "IfNotPresent",
                "--node-selector",
                &selector,
                "--active-deadline",
                "10m",
                "--run-as-user",
                "1234",
                "--pod-template",
                template.to_str().unwrap(),
            ],
        )
        .await
        .unwrap();

    // The template's volume is there, and the user is the operator's.
    let out = shim
        .docker_ok(&[
            "run",
            "-d",
            "--name",
            "shaped",
            "--label",
            "berth.dev/cpu-request=75m",
            &image,
            "sh",
            "-c",
            "touch /scratch/ok && id -u && exec sleep 600",
        ])
        .unwrap();
    let id = out.trim();
    let pod = ns.pod_json(&format!("berth-{}-1", &id[..12])).unwrap();
    let spec = &pod["spec"];
    let main = &spec["containers"][0];
    assert_eq!(
        main["resources"]["requests"]["cpu"], "75m",
        "the label wins"
    );
    assert_eq!(main["resources"]["limits"]["memory"], "64Mi");
    assert_eq!(main["imagePullPolicy"], "IfNotPresent");
    assert_eq!(main["volumeMounts"][0]["mountPath"], "/scratch");
    assert_eq!(
        spec["nodeSelector"]["kubernetes.io/hostname"],
        node.as_str()
    );
    assert_eq!(spec["nodeName"], node.as_str());
    assert_eq!(spec["activeDeadlineSeconds"], 600);
    assert_eq!(spec["securityContext"]["runAsUser"], 1234);
    assert_eq!(spec["tolerations"][0]["key"], "dedicated");
    assert_eq!(pod["metadata"]["labels"]["team"], "ci");
    let logs = shim.docker_ok(&["logs", "shaped"]).unwrap();
    assert_eq!(logs, "1234\n");

    // A malformed label is refused before anything is made.
    let bad = shim
        .docker(&[
            "run",
            "--rm",
            "--label",
            "berth.dev/node-selector=ssd",
            &image,
            "true",
        ])
        .unwrap();
    assert!(
        text(&bad.stderr).contains("berth.dev/node-selector"),
        "{}",
        text(&bad.stderr)
    );

    // SIGTERM: the shim removes what it made before it exits, well before
    // its session's Lease (20 s) could run out.
    shim.docker_ok(&["network", "create", "leftover"]).unwrap();
    let stopped = std::time::Instant::now();
    assert!(shim.terminate().unwrap().success());
    assert!(
        stopped.elapsed() < std::time::Duration::from_secs(15),
        "cleanup took {:?}",
        stopped.elapsed()
    );
    assert_eq!(
        ns.berth_objects().unwrap(),
        Vec::<String>::new(),
        "{}",
        shim.log()
    );
    let _ = std::fs::remove_file(&template);
}

#[tokio::test]
async fn a_container_older_than_the_max_age_is_removed_while_its_shim_lives() {
    let c = Cluster::from_env().await.unwrap();
    let image = c.fresh_docker_image("docker-max-age").await.unwrap();
    let ns = DockerNamespace::new(&c, "docker-max-age").unwrap();
    let shim = ns.shim_with("ci", &["--max-age", "3s"]).await.unwrap();

    let id = shim
        .docker_ok(&["run", "-d", &image, "sleep", "600"])
        .unwrap()
        .trim()
        .to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !ns.berth_objects().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "still there a minute after its max age of 3 s: {:?}",
            ns.berth_objects().unwrap()
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    let gone = shim.docker(&["inspect", &id]).unwrap();
    assert!(
        text(&gone.stderr).contains("No such"),
        "{}",
        text(&gone.stderr)
    );
}

#[tokio::test]
async fn a_health_check_turns_healthy_or_unhealthy_as_its_command_says() {
    let c = Cluster::from_env().await.unwrap();
    let image = c.fresh_docker_image("docker-health").await.unwrap();
    let ns = DockerNamespace::new(&c, "docker-health").unwrap();
    let shim = ns.shim("ci").await.unwrap();
    let mut events = shim
        .docker_spawn(&[
            "events",
            "--filter",
            "event=health_status",
            "--format",
            "{{.Actor.Attributes.name}} {{.Action}}",
        ])
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !shim.log().contains("streaming events") {
        assert!(std::time::Instant::now() < deadline, "{}", shim.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    let health = |name: &str| {
        shim.docker_ok(&["inspect", "-f", "{{.State.Health.Status}}", name])
            .unwrap()
            .trim()
            .to_string()
    };
    let until = |name: &'static str, want: &'static str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut seen = Vec::new();
        loop {
            let h = health(name);
            if h == want {
                return seen;
            }
            if seen.last() != Some(&h) {
                seen.push(h);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name} never {want}: {seen:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
    };
    // Failures count only after `retries` intervals: 5 s for the good one,
    // whose check passes from 2 s on; 1 s for the bad one.
    for (name, cmd, check, retries) in [
        (
            "good",
            "sleep 2; touch /tmp/ok; exec sleep 600",
            "test -f /tmp/ok",
            "5",
        ),
        ("bad", "exec sleep 600", "false", "1"),
    ] {
        shim.docker_ok(&[
            "run",
            "-d",
            "--name",
            name,
            "--health-cmd",
            check,
            "--health-interval",
            "1s",
            "--health-timeout",
            "1s",
            "--health-retries",
            retries,
            &image,
            "sh",
            "-c",
            cmd,
        ])
        .unwrap();
    }
    let before = until("good", "healthy");
    assert!(before.iter().all(|h| h == "starting"), "{before:?}");
    let before = until("bad", "unhealthy");
    assert!(before.iter().all(|h| h == "starting"), "{before:?}");
    let listed = shim
        .docker_ok(&["ps", "--format", "{{.Names}} {{.Status}}"])
        .unwrap();
    assert!(
        listed.contains("(healthy)") && listed.contains("(unhealthy)"),
        "{listed}"
    );

    // The verdict comes from a probe that ran and failed, not from the clock
    // alone: the kubelet recorded the failure.
    let id = shim
        .docker_ok(&["inspect", "-f", "{{.Id}}", "bad"])
        .unwrap();
    let pod = format!("berth-{}-1", &id.trim()[..12]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let failed = c
            .kubectl(&[
                "-n",
                &ns.ns.name,
                "get",
                "events",
                "--field-selector",
                &format!("involvedObject.name={pod},reason=Unhealthy"),
                "-o",
                "name",
            ])
            .unwrap();
        if !failed.trim().is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no failed probe recorded for {pod}"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    // And both verdicts were events.
    use std::io::BufRead;
    let stdout = events.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line.trim().to_string()).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    while !(seen.iter().any(|l| l == "good health_status: healthy")
        && seen.iter().any(|l| l == "bad health_status: unhealthy"))
    {
        match rx.recv_timeout(std::time::Duration::from_secs(30)) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("no health events within 30 s: {seen:?}"),
        }
    }
    let _ = events.kill();
    let _ = events.wait();
}

#[tokio::test]
async fn docker_events_follow_a_container_from_create_to_destroy_with_its_exit_code() {
    use std::io::BufRead;
    let c = Cluster::from_env().await.unwrap();
    let image = c.fresh_docker_image("docker-events").await.unwrap();
    let ns = DockerNamespace::new(&c, "docker-events").unwrap();
    let shim = ns.shim("ci").await.unwrap();

    let mut watcher = shim
        .docker_spawn(&[
            "events",
            "--filter",
            "type=container",
            "--filter",
            "container=ev",
            "--format",
            "{{.Action}}{{if eq .Action \"die\"}} {{.Actor.Attributes.exitCode}}{{end}}",
        ])
        .unwrap();
    let stdout = watcher.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim().to_string()).is_err() {
                break;
            }
        }
    });
    // The stream is open once the shim has asked the coordinator for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !shim.log().contains("streaming events") {
        assert!(std::time::Instant::now() < deadline, "{}", shim.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = shim
        .docker(&["run", "--rm", "--name", "ev", &image, "sh", "-c", "exit 3"])
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("destroy") {
        match rx.recv_timeout(std::time::Duration::from_secs(30)) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("no destroy event within 30 s: {seen:?}\n{}", shim.log()),
        }
    }
    let _ = watcher.kill();
    let _ = watcher.wait();
    assert_eq!(seen, ["create", "start", "die 3", "destroy"]);
}

#[tokio::test]
async fn docker_run_i_feeds_stdin_to_the_container_until_end_of_file() {
    let c = Cluster::from_env().await.unwrap();
    let image = c.fresh_docker_image("docker-stdin").await.unwrap();
    let ns = DockerNamespace::new(&c, "docker-stdin").unwrap();
    let shim = ns.shim("ci").await.unwrap();

    // Many chunks' worth of lines.
    let input: String = (0..30_000).map(|i| format!("line {i:08}\n")).collect();
    let out = shim
        .docker_with_stdin(
            &["run", "-i", "--rm", &image, "sh", "-c", "wc -l; echo done"],
            input.as_bytes(),
        )
        .unwrap();
    assert_eq!(
        (text(&out.stdout), out.status.code()),
        ("30000\ndone\n".into(), Some(0)),
        "stderr: {}\nshim log:\n{}",
        text(&out.stderr),
        shim.log()
    );
    assert_eq!(ns.berth_objects().unwrap(), Vec::<String>::new());
}

/// Waits (at most 30 s) until the coordinator's inventory of `node` shows
/// `image`; answers whether Berth's agent pulled it there (`managed`).
async fn until_on_node(api: &berth_e2e::ApiClient, node: &str, image: &str) -> bool {
    berth_e2e::eventually(
        std::time::Duration::from_secs(30),
        &format!("the coordinator sees {image} on {node}"),
        || {
            let (mut api, node, image) = (api.clone(), node.to_string(), image.to_string());
            async move {
                let images = api
                    .list_node_images(berth_proto::api::ListNodeImagesRequest { node })
                    .await?
                    .into_inner()
                    .images;
                Ok(images
                    .iter()
                    .find(|i| i.repo_tags.contains(&image))
                    .map(|i| i.managed))
            }
        },
    )
    .await
    .unwrap()
}

/// The nodes a container's pod prefers, and the node it runs on.
fn placement_of(ns: &DockerNamespace<'_>, id: &str) -> (Vec<String>, String) {
    let pod = ns.pod_json(&format!("berth-{}-1", &id[..12])).unwrap();
    let spec = &pod["spec"];
    let preferred =
        spec["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
            .as_array()
            .map(|terms| {
                terms
                    .iter()
                    .map(|t| {
                        t["preference"]["matchFields"][0]["values"][0]
                            .as_str()
                            .unwrap_or("")
                            .to_string()
                    })
                    .collect()
            })
            .unwrap_or_default();
    (
        preferred,
        spec["nodeName"].as_str().unwrap_or("").to_string(),
    )
}

#[tokio::test]
async fn a_container_goes_where_its_image_is_or_warms_the_node_it_will_run_on() {
    let c = Cluster::from_env().await.unwrap();
    let ns = DockerNamespace::new(&c, "docker-place").unwrap();
    let shim = ns.shim("ci").await.unwrap();
    let forward = c.port_forward("berth-coordinator", 7070).unwrap();
    let api = c.inventory_client(&forward.addr()).await.unwrap();

    // Held by one node only (pulled there directly): the pod prefers it.
    let held = c.fresh_docker_image("docker-held").await.unwrap();
    let holder = c.nodes[c.nodes.len() - 1].clone();
    berth_e2e::bench::direct_pull(&c, std::slice::from_ref(&holder), &held)
        .await
        .unwrap();
    until_on_node(&api, &holder, &held).await;
    let id = shim
        .docker_ok(&["run", "-d", &held, "sleep", "600"])
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(
        placement_of(&ns, &id),
        (vec![holder.clone()], holder.clone())
    );

    // Held by every node: each is preferred, one term per node (the
    // apiserver takes one value per metadata.name selector).
    let others: Vec<String> = c.nodes.iter().filter(|n| **n != holder).cloned().collect();
    berth_e2e::bench::direct_pull(&c, &others, &held)
        .await
        .unwrap();
    for node in &others {
        until_on_node(&api, node, &held).await;
    }
    let everywhere = shim
        .docker_ok(&["run", "-d", &held, "sleep", "600"])
        .unwrap()
        .trim()
        .to_string();
    let (mut preferred, _) = placement_of(&ns, &everywhere);
    preferred.sort();
    let mut all = c.nodes.clone();
    all.sort();
    assert_eq!(preferred, all);

    // Held nowhere: one node is chosen, its agent pulls the image (Berth's
    // own pull, so `managed`), and the pod runs there.
    let fresh = c.fresh_docker_image("docker-warm").await.unwrap();
    let id = shim
        .docker_ok(&["run", "-d", &fresh, "sleep", "600"])
        .unwrap()
        .trim()
        .to_string();
    let (preferred, ran_on) = placement_of(&ns, &id);
    assert_eq!(
        preferred,
        vec![ran_on.clone()],
        "one chosen node, and the pod is there"
    );
    let managed = until_on_node(&api, &ran_on, &fresh).await;
    assert!(
        managed,
        "the agent pulled it (a warming pull), not only the kubelet"
    );
    shim.docker_ok(&["rm", "-f", &id]).unwrap();

    // A node the pod could not land on (tainted) is never the one warmed.
    let tainted = c.nodes[0].clone();
    let _taint = Taint::new(&c, &tainted, "berth.dev/e2e-placement=x:NoSchedule");
    for i in 0..4 {
        let fresh = c
            .fresh_docker_image(&format!("docker-warm-taint{i}"))
            .await
            .unwrap();
        let id = shim
            .docker_ok(&["run", "-d", &fresh, "sleep", "600"])
            .unwrap()
            .trim()
            .to_string();
        let (preferred, ran_on) = placement_of(&ns, &id);
        assert!(
            !preferred.contains(&tainted),
            "{preferred:?} includes the tainted {tainted}"
        );
        assert_ne!(ran_on, tainted);
        shim.docker_ok(&["rm", "-f", &id]).unwrap();
    }
}

/// A taint on a node, taken off again when dropped (a failed test too).
struct Taint<'a> {
    c: &'a Cluster,
    node: String,
    key: String,
}

impl<'a> Taint<'a> {
    fn new(c: &'a Cluster, node: &str, taint: &str) -> Self {
        c.kubectl(&["taint", "node", node, taint, "--overwrite"])
            .unwrap();
        let key = taint.split(['=', ':']).next().unwrap_or(taint).to_string();
        Taint {
            c,
            node: node.to_string(),
            key,
        }
    }
}

impl Drop for Taint<'_> {
    fn drop(&mut self) {
        let _ = self
            .c
            .kubectl(&["taint", "node", &self.node, &format!("{}-", self.key)]);
    }
}

#[tokio::test]
async fn a_container_starts_in_a_ready_pool_sandbox_when_it_asks_for_one() {
    let c = Cluster::from_env().await.unwrap();
    let image = c.fresh_docker_image("docker-pool").await.unwrap();
    let ns = DockerNamespace::new(&c, "docker-pool").unwrap();
    let shim = ns
        .shim_with("ci", &["--start-mode", "sandbox-pool"])
        .await
        .unwrap();

    // The first start finds no pool yet (a fresh pod) and fills it.
    let first = shim
        .docker_ok(&["run", "--rm", &image, "hostname"])
        .unwrap();
    assert!(!first.starts_with("berth-pool-"), "{first}");
    let idle = || {
        let out = c
            .kubectl(&[
                "-n",
                &ns.ns.name,
                "get",
                "pods",
                "-l",
                "berth.dev/pool=idle",
                "--field-selector",
                "status.phase=Running",
                "-o",
                "name",
            ])
            .unwrap();
        out.lines().count()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while idle() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the pool did not fill"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }

    // In the pool: the sandbox's hostname, streams apart, the exit code.
    let out = shim
        .docker(&[
            "run",
            "--rm",
            &image,
            "sh",
            "-c",
            "hostname; echo err >&2; exit 3",
        ])
        .unwrap();
    assert!(
        text(&out.stdout).starts_with("berth-pool-"),
        "{}\n{}",
        text(&out.stdout),
        shim.log()
    );
    assert_eq!(
        (text(&out.stderr), out.status.code()),
        ("err\n".into(), Some(3))
    );

    // Detached, exec'd into, removed; nothing is left but the pool.
    let id = shim
        .docker_ok(&["run", "-d", &image, "sleep", "600"])
        .unwrap()
        .trim()
        .to_string();
    let host = shim.docker_ok(&["exec", &id, "hostname"]).unwrap();
    assert!(host.starts_with("berth-pool-"), "{host}");
    shim.docker_ok(&["rm", "-f", &id]).unwrap();

    // What an ephemeral container cannot have gets a fresh pod.
    let out = shim
        .docker_ok(&["run", "--rm", "-p", "8080", &image, "hostname"])
        .unwrap();
    assert!(!out.starts_with("berth-pool-"), "{out}");
    let left: Vec<String> = ns
        .berth_objects()
        .unwrap()
        .into_iter()
        .filter(|o| !o.starts_with("pod/berth-pool-"))
        .collect();
    assert_eq!(left, Vec::<String>::new());
}
