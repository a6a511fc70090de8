//! testcontainers clients, unchanged and with their defaults (Ryuk on, no
//! setting but `DOCKER_HOST`), against docker-shim and the cluster's
//! coordinator.

use std::time::{Duration, Instant};

use berth_e2e::Cluster;
use berth_e2e::docker::{DockerNamespace, Shim};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Waits (at most 90 s) until the shim lists no container and Berth has
/// no object left in the namespace: Ryuk exits (and removes itself) 10 s
/// after its client is gone, pruning what is left.
async fn until_all_gone(shim: &Shim, ns: &DockerNamespace<'_>) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let listed = shim.docker_ok(&["ps", "-a", "-q"]).unwrap();
        let left = ns.berth_objects().unwrap();
        if listed.is_empty() && left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still there after 90 s: {listed} {left:?}\nshim log:\n{}",
            shim.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn testcontainers_python_waits_reaches_execs_and_networks_with_ryuk_on() {
    let c = Cluster::from_env().await.unwrap();
    let image = c.fresh_docker_image("tc-python").await.unwrap();
    let ns = DockerNamespace::new(&c, "tc-python").unwrap();
    let shim = ns.shim("ci").await.unwrap();

    let out = shim.testcontainers_python(&["run", &image]).unwrap();
    assert!(
        out.status.success() && text(&out.stdout).ends_with("OK\n"),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}\nshim log:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr),
        shim.log()
    );
    assert!(
        shim.log().contains("Ryuk started"),
        "testcontainers started its reaper: {}",
        shim.log()
    );
    // Each `with` removed its containers and network; Ryuk follows.
    until_all_gone(&shim, &ns).await;
}

#[tokio::test]
async fn ryuk_removes_what_a_crashed_testcontainers_run_left_behind() {
    let c = Cluster::from_env().await.unwrap();
    let image = c.fresh_docker_image("tc-ryuk").await.unwrap();
    let ns = DockerNamespace::new(&c, "tc-ryuk").unwrap();
    let shim = ns.shim("ci").await.unwrap();

    let out = shim.testcontainers_python(&["abandon", &image]).unwrap();
    let id = text(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && id.len() == 64,
        "exit {:?}\nstdout:\n{}\nstderr:\n{}\nshim log:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr),
        shim.log()
    );
    let running = shim
        .docker_ok(&["inspect", "-f", "{{.State.Status}}", &id])
        .unwrap();
    assert_eq!(running.trim(), "running", "left running by the dead client");

    // The shim lives on, so its session does not end: only Ryuk removes
    // the container, once the client's connection has been gone for its
    // reconnection timeout (10 s).
    until_all_gone(&shim, &ns).await;
    let gone = shim.docker(&["inspect", &id]).unwrap();
    assert!(!gone.status.success());
    assert!(shim.log().contains("Ryuk: removed"), "{}", shim.log());
}

#[tokio::test]
async fn testcontainers_java_junit_tests_pass_with_ryuk_and_checks_on() {
    let c = Cluster::from_env().await.unwrap();
    let image = c.fresh_docker_image("tc-java").await.unwrap();
    let ns = DockerNamespace::new(&c, "tc-java").unwrap();
    let shim = ns.shim("ci").await.unwrap();

    let (out, report) = shim.testcontainers_java(&image).unwrap();
    assert!(
        out.status.success(),
        "mvn test exited {:?}\nstdout:\n{}\nstderr:\n{}\nshim log:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr),
        shim.log()
    );
    // Both JUnit tests ran, and passed.
    assert!(
        report.contains(r#"tests="2" errors="0" skipped="0" failures="0""#),
        "surefire report:\n{report}"
    );
    assert!(shim.log().contains("Ryuk started"), "{}", shim.log());
    // Each test closed what it made; Ryuk follows.
    until_all_gone(&shim, &ns).await;
}
