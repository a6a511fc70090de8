//! The create body → spec translation, as data in, data out.

use super::*;
use serde_json::json;

fn spec(name: &str, body: serde_json::Value) -> Result<ContainerSpec, CreateError> {
    to_spec(name, &parse(body.to_string().as_bytes())?)
}

fn refused(body: serde_json::Value) -> String {
    match spec("", body) {
        Ok(s) => panic!("accepted: {s:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_docker_cli_run_body_becomes_the_spec_it_describes() {
    let s = spec(
        "/web",
        json!({
            "Hostname": "h", "User": "1000:1000", "Tty": true, "OpenStdin": true,
            "AttachStdin": true, "StdinOnce": true,
            "Env": ["A=1"], "Cmd": ["sh", "-c", "echo hi"], "Image": "busybox:1.36",
            "WorkingDir": "/w", "Entrypoint": null, "Labels": {"k": "v"},
            "StopTimeout": 3, "ExposedPorts": {"80/tcp": {}, "53/udp": {}},
            "Volumes": null, "OnBuild": null,
            "HostConfig": {
                "Binds": null, "NetworkMode": "default", "AutoRemove": true,
                "PortBindings": {"80/tcp": [{"HostIp": "", "HostPort": "8080"}]},
                "RestartPolicy": {"Name": "no", "MaximumRetryCount": 0},
                "Memory": 268435456, "NanoCpus": 500000000, "CapAdd": null,
                "LogConfig": {"Type": "", "Config": {}}, "ConsoleSize": [0, 0]
            },
            "NetworkingConfig": {"EndpointsConfig": {"default": {}}}
        }),
    )
    .unwrap();
    assert_eq!(s.name, "web");
    assert_eq!(s.image, "busybox:1.36");
    assert_eq!(s.cmd, ["sh", "-c", "echo hi"]);
    assert!(s.entrypoint.is_empty());
    assert_eq!(s.env, ["A=1"]);
    assert_eq!(
        (s.working_dir.as_str(), s.user.as_str()),
        ("/w", "1000:1000")
    );
    assert_eq!(s.labels.get("k").map(String::as_str), Some("v"));
    assert!(s.tty && s.open_stdin && s.auto_remove);
    assert_eq!(s.hostname, "h");
    assert_eq!(s.stop_timeout_seconds, 3);
    assert_eq!(
        s.ports,
        [PortBinding {
            container_port: 80,
            protocol: "tcp".into(),
            host_port: 8080
        }]
    );
    assert_eq!((s.memory_bytes, s.nano_cpus), (268435456, 500000000));
    assert!(s.networks.is_empty() && s.aliases.is_empty());
}

#[test]
fn testcontainers_style_networks_and_aliases_are_kept() {
    let s = spec(
        "",
        json!({
            "Image": "redis", "Cmd": "redis-server",
            "HostConfig": {"NetworkMode": "net-a", "PortBindings": {"6379/tcp": [{"HostIp": "", "HostPort": ""}]}},
            "NetworkingConfig": {"EndpointsConfig": {
                "net-a": {"Aliases": ["cache", "redis"]},
                "net-b": {"Aliases": ["cache"]}
            }}
        }),
    )
    .unwrap();
    assert_eq!(s.cmd, ["redis-server"]);
    assert_eq!(s.networks, ["net-a", "net-b"]);
    assert_eq!(s.aliases, ["cache", "redis"]);
    assert_eq!(
        s.ports[0].host_port, 0,
        "an empty HostPort lets the shim choose"
    );
    assert_eq!(s.name, "");
}

#[test]
fn publish_all_ports_publishes_every_exposed_port_once() {
    let s = spec(
        "",
        json!({"Image": "x", "ExposedPorts": {"80/tcp": {}, "53": {}},
               "HostConfig": {"PublishAllPorts": true, "PortBindings": {"80/tcp": [{"HostPort": "9000"}]}}}),
    )
    .unwrap();
    let mut got: Vec<_> = s
        .ports
        .iter()
        .map(|p| (p.container_port, p.protocol.as_str(), p.host_port))
        .collect();
    got.sort();
    assert_eq!(got, [(53, "tcp", 0), (80, "tcp", 9000)]);
}

#[test]
fn an_empty_entrypoint_runs_the_command_without_the_images_entrypoint() {
    let s = spec(
        "",
        json!({"Image": "x", "Entrypoint": [""], "Cmd": ["ls", "/"]}),
    )
    .unwrap();
    assert_eq!(s.entrypoint, ["ls", "/"]);
    assert!(s.cmd.is_empty());
    assert!(refused(json!({"Image": "x", "Entrypoint": ""})).contains("empty Entrypoint"));
}

#[test]
fn cpu_quota_and_period_become_a_cpu_limit() {
    let s = spec(
        "",
        json!({"Image": "x", "HostConfig": {"CpuQuota": 150000, "CpuPeriod": 100000}}),
    )
    .unwrap();
    assert_eq!(s.nano_cpus, 1_500_000_000);
}

#[test]
fn what_berth_cannot_honour_is_refused_by_name() {
    let cases = [
        (
            json!({"Image": "x", "HostConfig": {"Privileged": true}}),
            "Privileged",
        ),
        (
            json!({"Image": "x", "HostConfig": {"Binds": ["/etc:/host-etc"]}}),
            "/etc:/host-etc",
        ),
        (
            json!({"Image": "x", "HostConfig": {"Mounts": [{"Type": "bind"}]}}),
            "Mounts",
        ),
        (
            json!({"Image": "x", "HostConfig": {"NetworkMode": "host"}}),
            "NetworkMode \"host\"",
        ),
        (
            json!({"Image": "x", "HostConfig": {"NetworkMode": "container:abc"}}),
            "container:abc",
        ),
        (
            json!({"Image": "x", "HostConfig": {"PidMode": "host"}}),
            "PidMode",
        ),
        (
            json!({"Image": "x", "HostConfig": {"CapAdd": ["NET_ADMIN"]}}),
            "CapAdd",
        ),
        (
            json!({"Image": "x", "HostConfig": {"Devices": [{"PathOnHost": "/dev/fuse"}]}}),
            "Devices",
        ),
        (
            json!({"Image": "x", "HostConfig": {"RestartPolicy": {"Name": "always"}}}),
            "always",
        ),
        (json!({"Image": "x", "StopSignal": "SIGINT"}), "SIGINT"),
        (
            json!({"Image": "x", "HostConfig": {"PortBindings": {"80/sctp": null}}}),
            "sctp",
        ),
        (
            json!({"Image": "x", "NetworkingConfig": {"EndpointsConfig": {"n": {"IPAMConfig": {"IPv4Address": "10.0.0.9"}}}}}),
            "static address",
        ),
    ];
    for (body, needle) in cases {
        let msg = refused(body.clone());
        assert!(msg.contains(needle), "{body}: {msg}");
        assert!(msg.starts_with("Berth cannot honour"), "{body}: {msg}");
    }
}

#[test]
fn a_health_check_is_carried_with_its_durations() {
    let s = spec(
        "",
        json!({"Image": "x", "Healthcheck": {"Test": ["CMD-SHELL", "test -f /ok"],
               "Interval": 2_000_000_000i64, "Retries": 4}}),
    )
    .unwrap();
    let h = s.health.unwrap();
    assert_eq!(h.test, ["CMD-SHELL", "test -f /ok"]);
    assert_eq!((h.interval_nanos, h.retries), (2_000_000_000, 4));
    let none = spec("", json!({"Image": "x", "Healthcheck": {"Test": ["NONE"]}})).unwrap();
    assert!(none.health.is_none());
    assert!(
        spec(
            "",
            json!({"Image": "x", "Healthcheck": {"Test": ["CMD", "true"], "Retries": -1}})
        )
        .is_err()
    );
}

#[test]
fn harmless_defaults_the_docker_cli_sends_are_accepted() {
    let s = spec(
        "",
        json!({"Image": "x", "Healthcheck": {"Test": ["NONE"]}, "StopSignal": "SIGTERM",
               "HostConfig": {"IpcMode": "private", "Init": false, "Binds": [], "CapDrop": null}}),
    );
    assert!(s.is_ok(), "{s:?}");
}

#[test]
fn malformed_bodies_are_refused_with_seriously_clear_messages() {
    assert!(matches!(parse(b""), Err(CreateError::Invalid(m)) if m.contains("cannot be empty")));
    assert!(matches!(parse(b"{"), Err(CreateError::Json(_))));
    let wrong_type = parse(br#"{"Image": "x", "Env": "A=1"}"#)
        .unwrap_err()
        .to_string();
    assert!(wrong_type.contains("invalid type: string"), "{wrong_type}");
    let wrong_cmd = parse(br#"{"Image": "x", "Cmd": 5}"#)
        .unwrap_err()
        .to_string();
    assert!(
        wrong_cmd.contains("a string or a list of strings"),
        "{wrong_cmd}"
    );
    assert!(parse(br#"{"Image": "x", "Unknown": {"deep": [1]}}"#).is_ok());
    assert!(refused(json!({"Cmd": ["true"]})).contains("no image"));
    let bad_port = refused(
        json!({"Image": "x", "HostConfig": {"PortBindings": {"80/tcp": [{"HostPort": "8000-8010"}]}}}),
    );
    assert!(bad_port.contains("ranges are not supported"), "{bad_port}");
}

#[test]
fn container_names_follow_dockers_rule() {
    assert_eq!(container_name("/db-1").unwrap(), "db-1");
    assert_eq!(container_name("").unwrap(), "");
    for bad in ["a", "-a", "a b", "a/b"] {
        assert!(container_name(bad).is_err(), "{bad}");
    }
}
