//! The virtual Node: registered with the host's capacity, tainted so only
//! pods that tolerate it land there, kept alive by its Lease (renewed every
//! [`LEASE_RENEW`]) and a Ready condition refreshed every [`STATUS_EVERY`].

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus, Taint};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tracing::warn;

/// The taint every pod of a systemd node must tolerate.
pub const TAINT_KEY: &str = "berth.dev/virtual-node";
/// Seconds a Lease holds.
const LEASE_SECONDS: i32 = 40;
/// How often the Lease is renewed.
pub const LEASE_RENEW: Duration = Duration::from_secs(10);
/// How often the Ready condition is written.
pub const STATUS_EVERY: Duration = Duration::from_secs(60);

/// The host's CPUs and memory (kibibytes), from /proc.
fn host_capacity() -> (String, String) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .unwrap_or_else(|| "0".into());
    (cpus.to_string(), format!("{mem_kib}Ki"))
}

/// The Node's status as of now: capacity, addresses, Ready.
fn status(name: &str, ip: IpAddr, systemd_version: &str, port: Option<u16>) -> NodeStatus {
    let (cpu, memory) = host_capacity();
    let resources: BTreeMap<String, Quantity> = [
        ("cpu".to_string(), Quantity(cpu)),
        ("memory".to_string(), Quantity(memory)),
        ("pods".to_string(), Quantity("110".into())),
    ]
    .into();
    let now = Time(Timestamp::now());
    NodeStatus {
        capacity: Some(resources.clone()),
        allocatable: Some(resources),
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: ip.to_string(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: name.into(),
            },
        ]),
        conditions: Some(vec![NodeCondition {
            type_: "Ready".into(),
            status: "True".into(),
            reason: Some("SystemdReady".into()),
            message: Some("systemd answers on D-Bus".into()),
            last_heartbeat_time: Some(now.clone()),
            last_transition_time: Some(now),
        }]),
        node_info: Some(k8s_openapi::api::core::v1::NodeSystemInfo {
            architecture: std::env::consts::ARCH.replace("x86_64", "amd64"),
            operating_system: "linux".into(),
            kubelet_version: format!("v1.34.0-berth-{}", env!("CARGO_PKG_VERSION")),
            kube_proxy_version: String::new(),
            container_runtime_version: format!("systemd://{systemd_version}"),
            os_image: "systemd virtual node (Berth)".into(),
            ..Default::default()
        }),
        daemon_endpoints: port.map(|p| k8s_openapi::api::core::v1::NodeDaemonEndpoints {
            kubelet_endpoint: Some(k8s_openapi::api::core::v1::DaemonEndpoint { port: p.into() }),
        }),
        ..Default::default()
    }
}

/// Creates the Node (or takes it over after a restart) and writes its status.
pub async fn register(
    client: &kube::Client,
    name: &str,
    ip: IpAddr,
    systemd_version: &str,
    port: Option<u16>,
) -> anyhow::Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                [
                    ("kubernetes.io/hostname", name),
                    ("kubernetes.io/os", "linux"),
                    ("type", "virtual-kubelet"),
                    ("berth.dev/provider", "systemd"),
                    // No node agent DaemonSet pod here: this process is the agent.
                    ("berth.dev/agent", "disabled"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            taints: Some(vec![Taint {
                key: TAINT_KEY.into(),
                value: Some("systemd".into()),
                effect: "NoSchedule".into(),
                time_added: None,
            }]),
            ..Default::default()
        }),
        status: None,
    };
    match api.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e).context("registering the Node"),
    }
    write_status(client, name, ip, systemd_version, port).await
}

/// Writes the Node's status (a heartbeat of its Ready condition).
pub async fn write_status(
    client: &kube::Client,
    name: &str,
    ip: IpAddr,
    systemd_version: &str,
    port: Option<u16>,
) -> anyhow::Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status(name, ip, systemd_version, port)})),
    )
    .await
    .context("writing the Node status")?;
    Ok(())
}

/// Renews the Node's Lease in `kube-node-lease` forever; a failed renewal
/// is retried at the next tick.
pub async fn keep_lease(client: kube::Client, name: String) {
    let api: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    let mut tick = tokio::time::interval(LEASE_RENEW);
    loop {
        tick.tick().await;
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(name.clone()),
                lease_duration_seconds: Some(LEASE_SECONDS),
                renew_time: Some(MicroTime(Timestamp::now())),
                ..Default::default()
            }),
        };
        let applied = api
            .patch(
                &name,
                &PatchParams::apply("berth-virtual-node").force(),
                &Patch::Apply(&lease),
            )
            .await;
        if let Err(e) = applied {
            warn!(error = %e, "cannot renew the node Lease");
        }
    }
}
