//! `GET /version` and `GET /info`: what the shim is (Berth, not Docker), the
//! API versions it speaks, and the container counts of its namespace.

use serde_json::{Value, json};

use crate::route::{MAX_API, MIN_API};

/// The shim's version, as shown in `Server: Berth/<version>`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The Docker Engine release whose API (1.47) the shim speaks, reported as
/// the engine's `Version`: clients compare it with engine releases
/// (testcontainers-java refuses an engine below 1.6.0). What is really
/// serving shows in `Platform` and `Components`.
pub const ENGINE_VERSION: &str = "27.5.1";

/// Facts about this shim shown by `/info`.
#[derive(Debug, Clone)]
pub struct Identity {
    /// A random ID fixed for the process's life.
    pub id: String,
    /// The shim's host name.
    pub name: String,
    /// The namespace containers go to.
    pub namespace: String,
    /// The coordinator's URL.
    pub coordinator: String,
}

/// Containers by state, for `/info`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Running.
    pub running: usize,
    /// Paused.
    pub paused: usize,
    /// Every other state.
    pub stopped: usize,
}

/// Go's name for this machine's architecture (Docker's `Arch`).
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

/// The `/version` answer.
pub fn version() -> Value {
    json!({
        "Platform": {"Name": format!("Berth {VERSION}")},
        "Components": [{
            "Name": "Berth docker-shim",
            "Version": VERSION,
            "Details": {"ApiVersion": format!("1.{MAX_API}"), "MinAPIVersion": format!("1.{MIN_API}")},
        }],
        "Version": ENGINE_VERSION,
        "ApiVersion": format!("1.{MAX_API}"),
        "MinAPIVersion": format!("1.{MIN_API}"),
        "GitCommit": "",
        "GoVersion": "",
        "Os": "linux",
        "Arch": go_arch(),
        "KernelVersion": "",
        "BuildTime": "",
    })
}

/// The `/info` answer. CPU and memory are the shim host's: containers run
/// on the cluster's nodes, which the shim does not see.
pub fn info(id: &Identity, counts: Counts, ncpu: usize, mem_total: u64) -> Value {
    json!({
        "ID": id.id,
        "Name": id.name,
        "ServerVersion": ENGINE_VERSION,
        "OperatingSystem": format!("Berth (containers run as pods in namespace {} via {})", id.namespace, id.coordinator),
        "OSType": "linux",
        "OSVersion": "",
        "KernelVersion": "",
        "Architecture": std::env::consts::ARCH,
        "NCPU": ncpu,
        "MemTotal": mem_total,
        "Driver": super::container::DRIVER,
        "DriverStatus": [["Namespace", id.namespace], ["Coordinator", id.coordinator]],
        "Containers": counts.running + counts.paused + counts.stopped,
        "ContainersRunning": counts.running,
        "ContainersPaused": counts.paused,
        "ContainersStopped": counts.stopped,
        "Images": 0,
        "Labels": [
            "dev.berth.shim=true",
            format!("dev.berth.namespace={}", id.namespace),
        ],
        "Experimental": false,
        "DockerRootDir": "",
        "IndexServerAddress": "https://index.docker.io/v1/",
        "RegistryConfig": {"IndexConfigs": {}, "InsecureRegistryCIDRs": [], "Mirrors": []},
        "Runtimes": {"berth": {"path": "berth"}},
        "DefaultRuntime": "berth",
        "CgroupDriver": "",
        "CgroupVersion": "",
        "LoggingDriver": "berth",
        "Plugins": {"Volume": [], "Network": [], "Log": []},
        "SecurityOptions": [],
        "Warnings": [],
        "Swarm": {"LocalNodeState": "inactive", "NodeID": "", "NodeAddr": "", "ControlAvailable": false},
        "HttpProxy": "", "HttpsProxy": "", "NoProxy": "",
    })
}

/// Total memory of the shim's host in bytes, from `/proc/meminfo` (0 if unknown).
pub fn host_mem_total() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_advertises_1_47_down_to_1_24() {
        let v = version();
        assert_eq!(v["ApiVersion"], "1.47");
        assert_eq!(v["MinAPIVersion"], "1.24");
        assert_eq!(v["Os"], "linux");
        // An engine release clients accept; Berth names itself beside it.
        assert_eq!(v["Version"], "27.5.1");
        assert_eq!(v["Components"][0]["Name"], "Berth docker-shim");
    }

    #[test]
    fn info_says_it_is_berth_and_counts_containers() {
        let id = Identity {
            id: "id".into(),
            name: "ci-runner".into(),
            namespace: "ci".into(),
            coordinator: "https://c:7070".into(),
        };
        let counts = Counts {
            running: 2,
            paused: 0,
            stopped: 3,
        };
        let v = info(&id, counts, 4, 1024);
        assert_eq!(v["Driver"], "berth");
        assert_eq!(v["Containers"], 5);
        assert_eq!(v["ContainersRunning"], 2);
        assert_eq!(v["ContainersStopped"], 3);
        assert_eq!(
            (v["NCPU"].as_u64(), v["MemTotal"].as_u64()),
            (Some(4), Some(1024))
        );
        assert!(v["OperatingSystem"].as_str().unwrap().starts_with("Berth"));
        assert_eq!(v["OSType"], "linux");
        assert_eq!(v["Name"], "ci-runner");
    }
}
