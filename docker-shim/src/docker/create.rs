//! `POST /containers/create`: Docker's container configuration (with its
//! `HostConfig` and `NetworkingConfig`) → a `berth.v1.ContainerSpec`.
//!
//! Unknown fields are ignored, as Docker ignores them; fields of the wrong
//! type are refused with serde's message. A setting Berth cannot honour
//! (privileged mode, host paths, the host's namespaces, capabilities,
//! devices, restart policies, …) is refused with a message naming it, rather
//! than dropped: a container must not run differently from what was asked.

use std::collections::BTreeMap;

use berth_proto::api::{ContainerSpec, PortBinding};
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::{null_as_default, string_or_list};

/// The body of `POST /containers/create` (the fields Berth reads).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CreateBody {
    /// Host name inside the container.
    #[serde(deserialize_with = "null_as_default")]
    pub hostname: String,
    /// DNS domain name (not supported when set).
    #[serde(deserialize_with = "null_as_default")]
    pub domainname: String,
    /// `uid` or `uid:gid`.
    #[serde(deserialize_with = "null_as_default")]
    pub user: String,
    /// `{"80/tcp": {}}`.
    #[serde(deserialize_with = "null_as_default")]
    pub exposed_ports: BTreeMap<String, IgnoredAny>,
    /// Allocate a terminal.
    #[serde(deserialize_with = "null_as_default")]
    pub tty: bool,
    /// Keep stdin open.
    #[serde(deserialize_with = "null_as_default")]
    pub open_stdin: bool,
    /// Close stdin after the first attached client closes it.
    #[serde(deserialize_with = "null_as_default")]
    pub stdin_once: bool,
    /// `KEY=value` each.
    #[serde(deserialize_with = "null_as_default")]
    pub env: Vec<String>,
    /// The command (a string or a list).
    #[serde(deserialize_with = "string_or_list")]
    pub cmd: Option<Vec<String>>,
    /// Health check (not supported unless disabled).
    pub healthcheck: Option<Healthcheck>,
    /// The image reference.
    #[serde(deserialize_with = "null_as_default")]
    pub image: String,
    /// Working directory.
    #[serde(deserialize_with = "null_as_default")]
    pub working_dir: String,
    /// The entrypoint (a string or a list).
    #[serde(deserialize_with = "string_or_list")]
    pub entrypoint: Option<Vec<String>>,
    /// Disable networking (not supported).
    #[serde(deserialize_with = "null_as_default")]
    pub network_disabled: bool,
    /// MAC address (not supported).
    #[serde(deserialize_with = "null_as_default")]
    pub mac_address: String,
    /// Labels.
    #[serde(deserialize_with = "null_as_default")]
    pub labels: BTreeMap<String, String>,
    /// Stop signal (only SIGTERM is supported).
    #[serde(deserialize_with = "null_as_default")]
    pub stop_signal: String,
    /// Seconds between the stop signal and the kill.
    pub stop_timeout: Option<i64>,
    /// Host-side settings.
    #[serde(deserialize_with = "null_as_default")]
    pub host_config: HostConfig,
    /// Networks and aliases.
    #[serde(deserialize_with = "null_as_default")]
    pub networking_config: NetworkingConfig,
}

/// `Healthcheck` of the create body.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Healthcheck {
    /// `["CMD", …]`, `["CMD-SHELL", "…"]`, or `["NONE"]` (no check).
    #[serde(deserialize_with = "null_as_default")]
    pub test: Vec<String>,
    /// Nanoseconds between checks.
    #[serde(deserialize_with = "null_as_default")]
    pub interval: i64,
    /// Nanoseconds a check may take.
    #[serde(deserialize_with = "null_as_default")]
    pub timeout: i64,
    /// Nanoseconds after start during which failures do not count.
    #[serde(deserialize_with = "null_as_default")]
    pub start_period: i64,
    /// Failures in a row that make the container unhealthy.
    #[serde(deserialize_with = "null_as_default")]
    pub retries: i32,
}

/// `HostConfig` of the create body (the fields Berth reads).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct HostConfig {
    /// `host:container[:mode]` bind mounts and named volumes.
    #[serde(deserialize_with = "null_as_default")]
    pub binds: Vec<String>,
    /// Mounts of any type.
    #[serde(deserialize_with = "null_as_default")]
    pub mounts: Vec<IgnoredAny>,
    /// `{"80/tcp": [{"HostIp": "", "HostPort": "8080"}]}`.
    #[serde(deserialize_with = "null_as_default")]
    pub port_bindings: BTreeMap<String, Option<Vec<HostPort>>>,
    /// Publish every exposed port on a port the shim chooses.
    #[serde(deserialize_with = "null_as_default")]
    pub publish_all_ports: bool,
    /// `docker run --rm`.
    #[serde(deserialize_with = "null_as_default")]
    pub auto_remove: bool,
    /// `bridge`, `default`, a network name, `host`, `none`, `container:…`.
    #[serde(deserialize_with = "null_as_default")]
    pub network_mode: String,
    /// Memory limit in bytes.
    #[serde(deserialize_with = "null_as_default")]
    pub memory: i64,
    /// CPU limit in billionths of a CPU.
    #[serde(deserialize_with = "null_as_default")]
    pub nano_cpus: i64,
    /// CFS quota (with `CpuPeriod`), another way to limit CPU.
    #[serde(deserialize_with = "null_as_default")]
    pub cpu_quota: i64,
    /// CFS period in microseconds.
    #[serde(deserialize_with = "null_as_default")]
    pub cpu_period: i64,
    /// Restart policy.
    #[serde(deserialize_with = "null_as_default")]
    pub restart_policy: RestartPolicy,
    /// Privileged mode.
    #[serde(deserialize_with = "null_as_default")]
    pub privileged: bool,
    /// Read-only root filesystem.
    #[serde(deserialize_with = "null_as_default")]
    pub readonly_rootfs: bool,
    /// PID namespace (`host`, `container:…`).
    #[serde(deserialize_with = "null_as_default")]
    pub pid_mode: String,
    /// IPC namespace.
    #[serde(deserialize_with = "null_as_default")]
    pub ipc_mode: String,
    /// UTS namespace.
    #[serde(deserialize_with = "null_as_default")]
    pub uts_mode: String,
    /// User namespace.
    #[serde(deserialize_with = "null_as_default")]
    pub userns_mode: String,
    /// Added capabilities.
    #[serde(deserialize_with = "null_as_default")]
    pub cap_add: Vec<String>,
    /// Dropped capabilities.
    #[serde(deserialize_with = "null_as_default")]
    pub cap_drop: Vec<String>,
    /// Host devices.
    #[serde(deserialize_with = "null_as_default")]
    pub devices: Vec<IgnoredAny>,
    /// Security options.
    #[serde(deserialize_with = "null_as_default")]
    pub security_opt: Vec<String>,
    /// Volumes of other containers.
    #[serde(deserialize_with = "null_as_default")]
    pub volumes_from: Vec<String>,
    /// Legacy links.
    #[serde(deserialize_with = "null_as_default")]
    pub links: Vec<String>,
    /// `/etc/hosts` additions.
    #[serde(deserialize_with = "null_as_default")]
    pub extra_hosts: Vec<String>,
    /// DNS servers.
    #[serde(deserialize_with = "null_as_default")]
    pub dns: Vec<String>,
    /// Kernel parameters.
    #[serde(deserialize_with = "null_as_default")]
    pub sysctls: BTreeMap<String, String>,
    /// tmpfs mounts.
    #[serde(deserialize_with = "null_as_default")]
    pub tmpfs: BTreeMap<String, String>,
    /// Run an init process.
    pub init: Option<bool>,
}

/// One entry of `PortBindings`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct HostPort {
    /// Host address (the shim decides where it listens).
    #[serde(deserialize_with = "null_as_default")]
    pub host_ip: String,
    /// Host port, empty for "any".
    #[serde(deserialize_with = "null_as_default")]
    pub host_port: String,
}

/// `RestartPolicy`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct RestartPolicy {
    /// `no` (or empty) is the only one Berth runs.
    #[serde(deserialize_with = "null_as_default")]
    pub name: String,
}

/// `NetworkingConfig`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct NetworkingConfig {
    /// Network name → endpoint settings.
    #[serde(deserialize_with = "null_as_default")]
    pub endpoints_config: BTreeMap<String, Option<EndpointConfig>>,
}

/// One network's endpoint settings.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct EndpointConfig {
    /// Names this container answers to on the network.
    #[serde(deserialize_with = "null_as_default")]
    pub aliases: Vec<String>,
    /// Static addresses (not supported).
    #[serde(rename = "IPAMConfig")]
    pub ipam_config: Option<IpamConfig>,
}

/// Static addresses of an endpoint.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct IpamConfig {
    /// IPv4 address.
    #[serde(rename = "IPv4Address", deserialize_with = "null_as_default")]
    pub ipv4_address: String,
    /// IPv6 address.
    #[serde(rename = "IPv6Address", deserialize_with = "null_as_default")]
    pub ipv6_address: String,
}

/// Why a create body cannot become a container.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CreateError {
    /// The body is not the JSON Docker documents.
    #[error("invalid container configuration: {0}")]
    Json(String),
    /// A value is malformed.
    #[error("{0}")]
    Invalid(String),
    /// A setting Berth cannot honour.
    #[error("Berth cannot honour {what}: {why}")]
    Unsupported {
        /// The setting, in Docker's names.
        what: String,
        /// Why, and what to do instead.
        why: &'static str,
    },
}

/// Networks that mean "the default network", not a Berth network.
fn is_default_network(name: &str) -> bool {
    matches!(name, "" | "default" | "bridge")
}

/// Parses a create body; empty is refused as Docker refuses it.
pub fn parse(body: &[u8]) -> Result<CreateBody, CreateError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(CreateError::Invalid(
            "config cannot be empty in order to create a container".into(),
        ));
    }
    serde_json::from_slice(body).map_err(|e| CreateError::Json(e.to_string()))
}

/// Checks a `?name=` as Docker does (leading `/` allowed and dropped).
pub fn container_name(name: &str) -> Result<String, CreateError> {
    let name = name.strip_prefix('/').unwrap_or(name);
    if name.is_empty() {
        return Ok(String::new());
    }
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok =
        name.len() >= 2 && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if first_ok && rest_ok {
        Ok(name.to_string())
    } else {
        Err(CreateError::Invalid(format!(
            "Invalid container name ({name}), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"
        )))
    }
}

/// `80/tcp`, `53/udp` or `80` → (port, protocol).
pub fn parse_port_key(key: &str) -> Result<(u32, String), CreateError> {
    let (port, proto) = key.split_once('/').unwrap_or((key, "tcp"));
    let proto = proto.to_ascii_lowercase();
    if !matches!(proto.as_str(), "tcp" | "udp") {
        return Err(CreateError::Unsupported {
            what: format!("port {key}"),
            why: "Berth publishes tcp and udp ports only",
        });
    }
    match port.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok((p, proto)),
        _ => Err(CreateError::Invalid(format!(
            "invalid port {key:?}: want PORT or PORT/PROTOCOL with PORT in 1-65535"
        ))),
    }
}

fn unsupported(what: impl Into<String>, why: &'static str) -> CreateError {
    CreateError::Unsupported {
        what: what.into(),
        why,
    }
}

/// Refuses every setting Berth cannot honour, naming the first it finds.
fn check_supported(b: &CreateBody) -> Result<(), CreateError> {
    let h = &b.host_config;
    let pod = "a container runs as a pod, which Kubernetes isolates from its node";
    if h.privileged {
        return Err(unsupported("HostConfig.Privileged", pod));
    }
    if let Some(bind) = h.binds.first() {
        return Err(unsupported(
            format!("the bind mount {bind:?}"),
            "host paths and volumes are not supported yet; copy files in with the archive API once it lands",
        ));
    }
    if !h.mounts.is_empty() {
        return Err(unsupported(
            "HostConfig.Mounts",
            "mounts are not supported yet",
        ));
    }
    if !h.volumes_from.is_empty() {
        return Err(unsupported(
            "HostConfig.VolumesFrom",
            "volumes are not supported yet",
        ));
    }
    let mode = h.network_mode.as_str();
    if mode == "host" || mode == "none" || mode.starts_with("container:") {
        return Err(unsupported(
            format!("HostConfig.NetworkMode {mode:?}"),
            "every container gets its own pod network; use the default or a named network",
        ));
    }
    for (field, value) in [
        ("PidMode", &h.pid_mode),
        ("IpcMode", &h.ipc_mode),
        ("UTSMode", &h.uts_mode),
        ("UsernsMode", &h.userns_mode),
    ] {
        let shareable = value.is_empty() || value == "private" || value == "shareable";
        if !shareable {
            return Err(unsupported(format!("HostConfig.{field} {value:?}"), pod));
        }
    }
    let lists = [
        ("HostConfig.CapAdd", &h.cap_add),
        ("HostConfig.CapDrop", &h.cap_drop),
        ("HostConfig.SecurityOpt", &h.security_opt),
        ("HostConfig.Links", &h.links),
        ("HostConfig.ExtraHosts", &h.extra_hosts),
        ("HostConfig.Dns", &h.dns),
    ];
    for (field, list) in lists {
        if !list.is_empty() {
            return Err(unsupported(
                field,
                "the container API has no such setting yet",
            ));
        }
    }
    if !h.devices.is_empty() {
        return Err(unsupported("HostConfig.Devices", pod));
    }
    if !h.sysctls.is_empty() || !h.tmpfs.is_empty() {
        return Err(unsupported(
            "HostConfig.Sysctls/Tmpfs",
            "the container API has no such setting yet",
        ));
    }
    if h.readonly_rootfs {
        return Err(unsupported(
            "HostConfig.ReadonlyRootfs",
            "the container API has no such setting yet",
        ));
    }
    if h.init == Some(true) {
        return Err(unsupported(
            "HostConfig.Init",
            "the container API has no such setting yet",
        ));
    }
    if !matches!(h.restart_policy.name.as_str(), "" | "no") {
        return Err(unsupported(
            format!("the restart policy {:?}", h.restart_policy.name),
            "a Berth container runs once; start it again through the API",
        ));
    }
    if let Some(hc) = &b.healthcheck
        && (hc.interval < 0 || hc.timeout < 0 || hc.start_period < 0 || hc.retries < 0)
    {
        return Err(CreateError::Invalid(
            "Healthcheck durations and retries cannot be negative".into(),
        ));
    }
    if !b.domainname.is_empty() || !b.mac_address.is_empty() || b.network_disabled {
        return Err(unsupported(
            "Domainname/MacAddress/NetworkDisabled",
            "every container gets its own pod network",
        ));
    }
    if !matches!(b.stop_signal.as_str(), "" | "SIGTERM" | "TERM" | "15") {
        return Err(unsupported(
            format!("StopSignal {:?}", b.stop_signal),
            "a pod is stopped with SIGTERM",
        ));
    }
    for (net, ep) in &b.networking_config.endpoints_config {
        if let Some(ipam) = ep.as_ref().and_then(|e| e.ipam_config.as_ref())
            && (!ipam.ipv4_address.is_empty() || !ipam.ipv6_address.is_empty())
        {
            return Err(unsupported(
                format!("a static address on network {net:?}"),
                "pods get their addresses from the cluster",
            ));
        }
    }
    Ok(())
}

/// The published ports: `PortBindings`, plus every exposed port with
/// `PublishAllPorts`. Host port 0 means "let the shim choose".
pub fn ports(b: &CreateBody) -> Result<Vec<PortBinding>, CreateError> {
    let mut out: Vec<PortBinding> = Vec::new();
    for (key, bindings) in &b.host_config.port_bindings {
        let (container_port, protocol) = parse_port_key(key)?;
        let bindings = bindings.as_deref().unwrap_or_default();
        let hosts: Vec<u32> = if bindings.is_empty() {
            vec![0]
        } else {
            bindings
                .iter()
                .map(|hp| match hp.host_port.as_str() {
                    "" | "0" => Ok(0),
                    p => p.parse::<u16>().map(u32::from).map_err(|_| {
                        CreateError::Invalid(format!(
                            "invalid host port {p:?} for {key}: want one port number (ranges are not supported)"
                        ))
                    }),
                })
                .collect::<Result<_, _>>()?
        };
        for host_port in hosts {
            out.push(PortBinding {
                container_port,
                protocol: protocol.clone(),
                host_port,
            });
        }
    }
    if b.host_config.publish_all_ports {
        for key in b.exposed_ports.keys() {
            let (container_port, protocol) = parse_port_key(key)?;
            let bound = out
                .iter()
                .any(|p| p.container_port == container_port && p.protocol == protocol);
            if !bound {
                out.push(PortBinding {
                    container_port,
                    protocol,
                    host_port: 0,
                });
            }
        }
    }
    Ok(out)
}

/// The CPU limit: `NanoCpus`, else `CpuQuota`/`CpuPeriod`.
fn nano_cpus(h: &HostConfig) -> Result<i64, CreateError> {
    if h.nano_cpus < 0 || h.memory < 0 {
        return Err(CreateError::Invalid(
            "HostConfig.NanoCpus and HostConfig.Memory cannot be negative".into(),
        ));
    }
    if h.nano_cpus > 0 || h.cpu_quota <= 0 {
        return Ok(h.nano_cpus);
    }
    let period = if h.cpu_period > 0 {
        h.cpu_period
    } else {
        100_000
    };
    Ok(h.cpu_quota.saturating_mul(1_000_000_000) / period)
}

/// Turns a create body into the spec the coordinator records.
pub fn to_spec(name: &str, b: &CreateBody) -> Result<ContainerSpec, CreateError> {
    check_supported(b)?;
    if b.image.is_empty() {
        return Err(CreateError::Invalid(
            "no image was given (Image is empty)".into(),
        ));
    }
    let name = container_name(name)?;
    for key in b.exposed_ports.keys() {
        parse_port_key(key)?;
    }
    // `--entrypoint ""`: run the command itself, without the image's entrypoint.
    let (entrypoint, cmd) = match (b.entrypoint.clone().unwrap_or_default(), b.cmd.clone()) {
        (ep, cmd) if ep == [""] => match cmd {
            Some(cmd) if !cmd.is_empty() => (cmd, Vec::new()),
            _ => {
                return Err(CreateError::Invalid(
                    "an empty Entrypoint needs a Cmd: Berth cannot run the image's command without its entrypoint".into(),
                ));
            }
        },
        (ep, cmd) => (ep, cmd.unwrap_or_default()),
    };
    let stop_timeout_seconds = match b.stop_timeout {
        None => 0,
        Some(t) if t >= 0 => u32::try_from(t).unwrap_or(u32::MAX),
        Some(t) => {
            return Err(CreateError::Invalid(format!(
                "StopTimeout {t} cannot be negative"
            )));
        }
    };
    let mut networks: Vec<String> = Vec::new();
    let mut aliases: Vec<String> = Vec::new();
    let mode = &b.host_config.network_mode;
    if !is_default_network(mode) {
        networks.push(mode.clone());
    }
    for (net, ep) in &b.networking_config.endpoints_config {
        if !is_default_network(net) && !networks.contains(net) {
            networks.push(net.clone());
        }
        for alias in ep.iter().flat_map(|e| &e.aliases) {
            if !aliases.contains(alias) {
                aliases.push(alias.clone());
            }
        }
    }
    Ok(ContainerSpec {
        name,
        image: b.image.clone(),
        entrypoint,
        cmd,
        env: b.env.clone(),
        working_dir: b.working_dir.clone(),
        user: b.user.clone(),
        labels: b.labels.clone().into_iter().collect(),
        tty: b.tty,
        open_stdin: b.open_stdin,
        stdin_once: b.stdin_once,
        uploads: Vec::new(),
        start_mode: String::new(),
        auto_remove: b.host_config.auto_remove,
        hostname: b.hostname.clone(),
        ports: ports(b)?,
        stop_timeout_seconds,
        aliases,
        networks,
        memory_bytes: b.host_config.memory,
        nano_cpus: nano_cpus(&b.host_config)?,
        // Set from the shim's defaults and the labels (`options`).
        pod: None,
        max_age_seconds: 0,
        health: b
            .healthcheck
            .as_ref()
            .filter(|h| !h.test.is_empty() && h.test != ["NONE"])
            .map(|h| berth_proto::api::Healthcheck {
                test: h.test.clone(),
                interval_nanos: h.interval,
                timeout_nanos: h.timeout,
                start_period_nanos: h.start_period,
                retries: h.retries,
            }),
    })
}

#[cfg(test)]
mod tests;
