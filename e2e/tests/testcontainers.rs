//! testcontainers clients, unchanged and with their defaults (Ryuk on, no
//! setting but `DOCKER_HOST`), against docker-shim and the cluster's
//! coordinator.

use std::time::{Duration, Instant};

use berth_e2e::Cluster;
use berth_e2e::docker::DockerNamespace;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
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
    // Each `with` removed its containers and network.
    assert_eq!(shim.docker_ok(&["ps", "-a", "-q"]).unwrap(), "");
    assert_eq!(ns.berth_objects().unwrap(), Vec::<String>::new());
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
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let left = ns.berth_objects().unwrap();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Ryuk did not remove {left:?} within 90 s\nshim log:\n{}",
            shim.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let gone = shim.docker(&["inspect", &id]).unwrap();
    assert!(!gone.status.success());
    assert!(shim.log().contains("Ryuk: removed"), "{}", shim.log());
}
