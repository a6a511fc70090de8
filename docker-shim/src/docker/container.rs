//! A `berth.v1.ContainerInfo` as Docker shows a container: the inspect
//! answer (`GET /containers/{id}/json`), the list entry
//! (`GET /containers/json`) and the status line ("Up 5 seconds",
//! "Exited (3) 2 seconds ago"). Every field clients index is present, in
//! Docker's formats; what Berth does not know is empty, never made up.

use std::collections::BTreeMap;
use std::time::SystemTime;

use berth_proto::api::{ContainerInfo, ContainerSpec, ContainerState, PortBinding};
use serde_json::{Value, json};

use super::time::{human_duration, or_zero, parse_rfc3339, unix_seconds};

/// The address published ports are reported on: the shim's host. It is
/// also each network's `Gateway`, which clients running in a container
/// (testcontainers with `/.dockerenv`) read as the address where published
/// ports are reachable.
pub const PUBLISHED_IP: &str = "127.0.0.1";

/// The image driver name shown wherever Docker names a storage driver.
pub const DRIVER: &str = "berth";

/// Docker's status word, defaulting to `created` when the coordinator sent none.
pub fn status_word(state: &ContainerState) -> &str {
    if state.status.is_empty() {
        "created"
    } else {
        &state.status
    }
}

/// The list's status line, as of `now`.
pub fn status_line(state: &ContainerState, now: SystemTime) -> String {
    let since = |t: &str| {
        parse_rfc3339(t)
            .and_then(|t| now.duration_since(t).ok())
            .map(human_duration)
    };
    match status_word(state) {
        "running" => {
            let up = since(&state.started_at).unwrap_or_else(|| "Less than a second".into());
            match state.health.as_str() {
                "" => format!("Up {up}"),
                "starting" => format!("Up {up} (health: starting)"),
                h => format!("Up {up} ({h})"),
            }
        }
        "paused" => format!(
            "Up {} (Paused)",
            since(&state.started_at).unwrap_or_default()
        ),
        "restarting" => format!(
            "Restarting ({}) {} ago",
            state.exit_code,
            since(&state.finished_at).unwrap_or_else(|| "Less than a second".into())
        ),
        "exited" => match since(&state.finished_at) {
            Some(ago) => format!("Exited ({}) {ago} ago", state.exit_code),
            None => format!("Exited ({})", state.exit_code),
        },
        "removing" => "Removal In Progress".into(),
        "dead" => "Dead".into(),
        _ => "Created".into(),
    }
}

/// `entrypoint + cmd`, as far as the spec overrides them.
fn argv(spec: &ContainerSpec) -> Vec<String> {
    spec.entrypoint.iter().chain(&spec.cmd).cloned().collect()
}

fn port_key(p: &PortBinding) -> String {
    let proto = if p.protocol.is_empty() {
        "tcp"
    } else {
        &p.protocol
    };
    format!("{}/{proto}", p.container_port)
}

/// `{"80/tcp": [{"HostIp": …, "HostPort": "8080"}]}` for bound ports; an
/// unbound one (host port not chosen yet) is `null`, as Docker shows it.
fn port_map(ports: &[PortBinding]) -> BTreeMap<String, Value> {
    let mut map: BTreeMap<String, Value> = BTreeMap::new();
    for p in ports {
        let entry = map.entry(port_key(p)).or_insert(Value::Null);
        if p.host_port != 0 {
            let binding = json!({"HostIp": PUBLISHED_IP, "HostPort": p.host_port.to_string()});
            match entry {
                Value::Array(list) => list.push(binding),
                _ => *entry = json!([binding]),
            }
        }
    }
    map
}

/// The spec's port bindings as `HostConfig.PortBindings` (the asked-for ports).
fn host_config_ports(ports: &[PortBinding]) -> BTreeMap<String, Value> {
    let mut map: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for p in ports {
        let host = if p.host_port == 0 {
            String::new()
        } else {
            p.host_port.to_string()
        };
        map.entry(port_key(p))
            .or_default()
            .push(json!({"HostIp": "", "HostPort": host}));
    }
    map.into_iter().map(|(k, v)| (k, Value::Array(v))).collect()
}

fn network_names(spec: &ContainerSpec) -> Vec<String> {
    if spec.networks.is_empty() {
        vec!["bridge".to_string()]
    } else {
        spec.networks.clone()
    }
}

fn networks(info: &ContainerInfo, spec: &ContainerSpec) -> Value {
    let mut out = serde_json::Map::new();
    for net in network_names(spec) {
        let user_defined = net != "bridge";
        let aliases = if user_defined {
            json!(spec.aliases)
        } else {
            Value::Null
        };
        let mut dns_names: Vec<String> = Vec::new();
        if user_defined {
            dns_names.push(info.name.clone());
            dns_names.extend(spec.aliases.iter().cloned());
        }
        out.insert(
            net.clone(),
            json!({
                "IPAMConfig": null, "Links": null, "Aliases": aliases, "MacAddress": "",
                "DriverOpts": null, "NetworkID": net, "EndpointID": "", "Gateway": PUBLISHED_IP,
                "IPAddress": info.pod_ip, "IPPrefixLen": 0, "IPv6Gateway": "",
                "GlobalIPv6Address": "", "GlobalIPv6PrefixLen": 0,
                "DNSNames": if user_defined { json!(dns_names) } else { Value::Null },
            }),
        );
    }
    Value::Object(out)
}

fn list_or_null(v: &[String]) -> Value {
    if v.is_empty() { Value::Null } else { json!(v) }
}

fn host_config(spec: &ContainerSpec) -> Value {
    json!({
        "Binds": null,
        "ContainerIDFile": "",
        "LogConfig": {"Type": "berth", "Config": {}},
        "NetworkMode": network_names(spec)[0],
        "PortBindings": host_config_ports(&spec.ports),
        "RestartPolicy": {"Name": "no", "MaximumRetryCount": 0},
        "AutoRemove": spec.auto_remove,
        "VolumeDriver": "", "VolumesFrom": null, "Mounts": null,
        "CapAdd": null, "CapDrop": null, "Dns": [], "DnsOptions": [], "DnsSearch": [],
        "ExtraHosts": null, "GroupAdd": null, "IpcMode": "private", "Cgroup": "",
        "Links": null, "OomScoreAdj": 0, "PidMode": "", "Privileged": false,
        "PublishAllPorts": false, "ReadonlyRootfs": false, "SecurityOpt": null,
        "UTSMode": "", "UsernsMode": "", "ShmSize": 0, "Runtime": "berth",
        "Isolation": "", "CpuShares": 0,
        "Memory": spec.memory_bytes, "NanoCpus": spec.nano_cpus,
        "CpuPeriod": 0, "CpuQuota": 0, "MemoryReservation": 0, "MemorySwap": 0,
        "Devices": null, "Ulimits": null, "Init": null,
    })
}

fn config(spec: &ContainerSpec) -> Value {
    let exposed: BTreeMap<String, Value> = spec
        .ports
        .iter()
        .map(|p| (port_key(p), json!({})))
        .collect();
    let stop_timeout = (spec.stop_timeout_seconds != 0).then_some(spec.stop_timeout_seconds);
    json!({
        "Hostname": spec.hostname,
        "Domainname": "",
        "User": spec.user,
        "AttachStdin": false, "AttachStdout": false, "AttachStderr": false,
        "ExposedPorts": if exposed.is_empty() { Value::Null } else { json!(exposed) },
        "Tty": spec.tty,
        "OpenStdin": spec.open_stdin,
        "StdinOnce": false,
        "Env": spec.env,
        "Cmd": list_or_null(&spec.cmd),
        "Image": spec.image,
        "Volumes": null,
        "WorkingDir": spec.working_dir,
        "Entrypoint": list_or_null(&spec.entrypoint),
        "OnBuild": null,
        "Labels": spec.labels.iter().collect::<BTreeMap<_, _>>(),
        "StopTimeout": stop_timeout,
        "Healthcheck": spec.health.as_ref().map(|h| json!({
            "Test": h.test, "Interval": h.interval_nanos, "Timeout": h.timeout_nanos,
            "StartPeriod": h.start_period_nanos, "Retries": h.retries,
        })),
    })
}

fn network_settings(info: &ContainerInfo, spec: &ContainerSpec) -> Value {
    json!({
        "Bridge": "", "SandboxID": "", "SandboxKey": "", "HairpinMode": false,
        "LinkLocalIPv6Address": "", "LinkLocalIPv6PrefixLen": 0,
        "Ports": port_map(&spec.ports),
        "SecondaryIPAddresses": null, "SecondaryIPv6Addresses": null,
        "EndpointID": "", "Gateway": PUBLISHED_IP, "GlobalIPv6Address": "", "GlobalIPv6PrefixLen": 0,
        "IPAddress": info.pod_ip, "IPPrefixLen": 0, "IPv6Gateway": "", "MacAddress": "",
        "Networks": networks(info, spec),
    })
}

fn state_json(state: &ContainerState, spec: &ContainerSpec) -> Value {
    let status = status_word(state);
    let mut out = json!({
        "Status": status,
        "Running": state.running,
        "Paused": status == "paused",
        "Restarting": status == "restarting",
        "OOMKilled": state.oom_killed,
        "Dead": status == "dead",
        "Pid": if state.running { 1 } else { 0 },
        "ExitCode": state.exit_code,
        "Error": state.error,
        "StartedAt": or_zero(&state.started_at),
        "FinishedAt": or_zero(&state.finished_at),
    });
    if let Some(h) = &spec.health {
        // The probe's own results stay in the kubelet; Berth knows the verdict.
        let verdict = if state.health.is_empty() {
            "starting"
        } else {
            state.health.as_str()
        };
        let streak = if verdict == "unhealthy" {
            h.retries.max(1)
        } else {
            0
        };
        out["Health"] = json!({"Status": verdict, "FailingStreak": streak, "Log": []});
    }
    out
}

/// Docker's `ContainerInspect` answer.
pub fn inspect(info: &ContainerInfo) -> Value {
    let spec = info.spec.clone().unwrap_or_default();
    let state = info.state.clone().unwrap_or_default();
    let argv = argv(&spec);
    let image = if info.image_id.is_empty() {
        &spec.image
    } else {
        &info.image_id
    };
    json!({
        "Id": info.id,
        "Created": or_zero(&info.created),
        "Path": argv.first().cloned().unwrap_or_default(),
        "Args": argv.iter().skip(1).collect::<Vec<_>>(),
        "State": state_json(&state, &spec),
        "Image": image,
        "ResolvConfPath": "", "HostnamePath": "", "HostsPath": "", "LogPath": "",
        "Name": format!("/{}", info.name),
        "RestartCount": info.restart_count,
        "Driver": DRIVER,
        "Platform": "linux",
        "MountLabel": "", "ProcessLabel": "", "AppArmorProfile": "",
        "ExecIDs": null,
        "HostConfig": host_config(&spec),
        "GraphDriver": {"Name": DRIVER, "Data": null},
        "Mounts": [],
        "Config": config(&spec),
        "NetworkSettings": network_settings(info, &spec),
    })
}

/// Docker's list entry (`ContainerSummary`), as of `now`.
pub fn summary(info: &ContainerInfo, now: SystemTime) -> Value {
    let spec = info.spec.clone().unwrap_or_default();
    let state = info.state.clone().unwrap_or_default();
    let ports: Vec<Value> = spec
        .ports
        .iter()
        .map(|p| {
            let proto = if p.protocol.is_empty() {
                "tcp"
            } else {
                &p.protocol
            };
            if p.host_port == 0 {
                json!({"PrivatePort": p.container_port, "Type": proto})
            } else {
                json!({"IP": PUBLISHED_IP, "PrivatePort": p.container_port,
                       "PublicPort": p.host_port, "Type": proto})
            }
        })
        .collect();
    json!({
        "Id": info.id,
        "Names": [format!("/{}", info.name)],
        "Image": spec.image,
        "ImageID": info.image_id,
        "Command": argv(&spec).join(" "),
        "Created": unix_seconds(&info.created),
        "Ports": ports,
        "Labels": spec.labels.iter().collect::<BTreeMap<_, _>>(),
        "State": status_word(&state),
        "Status": status_line(&state, now),
        "HostConfig": {"NetworkMode": network_names(&spec)[0]},
        "NetworkSettings": {"Networks": networks(info, &spec)},
        "Mounts": [],
    })
}

#[cfg(test)]
mod tests;
