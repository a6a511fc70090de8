//! ContainerInfo → Docker's inspect and list answers, as data in, data out.

use std::time::{Duration, UNIX_EPOCH};

use super::*;

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn state(status: &str, exit: i32, started: &str, finished: &str) -> ContainerState {
    ContainerState {
        status: status.into(),
        running: status == "running",
        exit_code: exit,
        started_at: started.into(),
        finished_at: finished.into(),
        ..Default::default()
    }
}

fn info(st: ContainerState) -> ContainerInfo {
    ContainerInfo {
        id: "a".repeat(64),
        name: "web".into(),
        namespace: "ci".into(),
        spec: Some(ContainerSpec {
            name: "web".into(),
            image: "nginx:1".into(),
            cmd: vec!["nginx".into(), "-g".into(), "daemon off;".into()],
            env: vec!["A=1".into()],
            labels: [("org.testcontainers".to_string(), "true".to_string())].into(),
            ports: vec![
                PortBinding {
                    container_port: 80,
                    protocol: "tcp".into(),
                    host_port: 32768,
                },
                PortBinding {
                    container_port: 53,
                    protocol: "udp".into(),
                    host_port: 0,
                },
            ],
            aliases: vec!["www".into()],
            networks: vec!["net-a".into()],
            ..Default::default()
        }),
        created: "1970-01-01T00:01:40.000000001Z".into(),
        state: Some(st),
        pod_name: "berth-web".into(),
        node: "n1".into(),
        pod_ip: "10.1.2.3".into(),
        image_id: "docker.io/library/nginx@sha256:abc".into(),
        restart_count: 0,
    }
}

#[test]
fn status_lines_read_as_dockers() {
    let t = "1970-01-01T00:01:40Z";
    assert_eq!(
        status_line(&state("running", 0, t, ""), at(105)),
        "Up 5 seconds"
    );
    assert_eq!(
        status_line(&state("exited", 3, t, t), at(102)),
        "Exited (3) 2 seconds ago"
    );
    assert_eq!(
        status_line(&state("exited", 137, t, ""), at(102)),
        "Exited (137)"
    );
    assert_eq!(
        status_line(&state("created", 0, "", ""), at(102)),
        "Created"
    );
    assert_eq!(status_line(&state("", 0, "", ""), at(102)), "Created");
    assert_eq!(
        status_line(&state("removing", 0, t, t), at(102)),
        "Removal In Progress"
    );
    assert_eq!(status_line(&state("dead", 0, t, t), at(102)), "Dead");
}

#[test]
fn inspect_of_an_exited_container_reports_its_real_exit_and_times() {
    let st = state(
        "exited",
        3,
        "1970-01-01T00:01:41Z",
        "1970-01-01T00:01:42.5Z",
    );
    let v = inspect(&info(st));
    assert_eq!(v["Id"], "a".repeat(64));
    assert_eq!(v["Name"], "/web");
    assert_eq!(v["Path"], "nginx");
    assert_eq!(v["Args"], json!(["-g", "daemon off;"]));
    assert_eq!(v["State"]["Status"], "exited");
    assert_eq!(v["State"]["Running"], false);
    assert_eq!(v["State"]["ExitCode"], 3);
    assert_eq!(v["State"]["Pid"], 0);
    assert_eq!(v["State"]["StartedAt"], "1970-01-01T00:01:41Z");
    assert_eq!(v["State"]["FinishedAt"], "1970-01-01T00:01:42.5Z");
    assert_eq!(v["Image"], "docker.io/library/nginx@sha256:abc");
    assert_eq!(v["Config"]["Image"], "nginx:1");
    assert_eq!(v["Config"]["Labels"]["org.testcontainers"], "true");
    assert_eq!(
        v["Config"]["ExposedPorts"],
        json!({"80/tcp": {}, "53/udp": {}})
    );
    assert_eq!(v["Mounts"], json!([]));
}

#[test]
fn a_created_container_has_dockers_zero_times() {
    let v = inspect(&info(state("created", 0, "", "")));
    assert_eq!(v["State"]["StartedAt"], "0001-01-01T00:00:00Z");
    assert_eq!(v["State"]["FinishedAt"], "0001-01-01T00:00:00Z");
    assert_eq!(v["State"]["Status"], "created");
}

#[test]
fn published_ports_are_where_clients_look_for_them() {
    let v = inspect(&info(state("running", 0, "1970-01-01T00:01:41Z", "")));
    assert_eq!(
        v["NetworkSettings"]["Ports"],
        json!({"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "32768"}], "53/udp": null})
    );
    assert_eq!(v["NetworkSettings"]["IPAddress"], "10.1.2.3");
    let net = &v["NetworkSettings"]["Networks"]["net-a"];
    assert_eq!(net["IPAddress"], "10.1.2.3");
    assert_eq!(net["Aliases"], json!(["www"]));
    assert_eq!(v["HostConfig"]["NetworkMode"], "net-a");
    assert_eq!(
        v["HostConfig"]["PortBindings"]["80/tcp"],
        json!([{"HostIp": "", "HostPort": "32768"}])
    );
    assert_eq!(v["State"]["Running"], true);
}

#[test]
fn a_container_without_networks_is_on_bridge() {
    let mut i = info(state("created", 0, "", ""));
    i.spec.as_mut().unwrap().networks.clear();
    let v = inspect(&i);
    assert_eq!(v["HostConfig"]["NetworkMode"], "bridge");
    assert!(v["NetworkSettings"]["Networks"]["bridge"].is_object());
}

#[test]
fn list_entries_carry_names_ports_and_status() {
    let st = state("running", 0, "1970-01-01T00:01:41Z", "");
    let v = summary(&info(st), at(161));
    assert_eq!(v["Names"], json!(["/web"]));
    assert_eq!(v["Image"], "nginx:1");
    assert_eq!(v["Command"], "nginx -g daemon off;");
    assert_eq!(v["Created"], 100);
    assert_eq!(v["State"], "running");
    assert_eq!(v["Status"], "Up About a minute");
    assert_eq!(
        v["Ports"],
        json!([
            {"IP": "127.0.0.1", "PrivatePort": 80, "PublicPort": 32768, "Type": "tcp"},
            {"PrivatePort": 53, "Type": "udp"}
        ])
    );
    assert_eq!(v["Labels"]["org.testcontainers"], "true");
}
