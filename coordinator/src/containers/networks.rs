//! Docker's user-defined networks (`berth.v1.Networks`), done with
//! headless Services.
//!
//! A network is a record, a ConfigMap like a container's ([`to_config_map`]).
//! Which networks a container is on, and its aliases, live in the
//! container's own spec. Each name a networked container answers to (its
//! name, when that is a DNS label, and its aliases) is a headless Service
//! selecting the container's pods ([`service_for`]), so cluster DNS resolves
//! it to the pod's address on every port, as Docker's embedded DNS does.
//! Services are owned by the container's record and go with it.
//!
//! Kubernetes gives every pod of a namespace one flat network, so a Berth
//! network names containers but does not isolate them, and a Service name
//! is unique in the namespace: an alias another container already answers
//! to is refused rather than taken over.

use std::collections::BTreeMap;
use std::time::Duration;

use berth_proto::api as pb;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::runtime::watcher;
use sha2::{Digest, Sha256};
use tonic::Status;

use super::api::{ignore_missing, kube_status};
use super::record::{
    CONTAINER_LABEL, CREATED_ANNOTATION, Record, SESSION_LABEL, berth_labels, label,
};
use super::store::Space;

/// Label on every network record: the network's 12-digit short ID.
pub const NETWORK_LABEL: &str = "berth.dev/network";
/// Annotation on a network record: the network's full 64-digit ID.
pub const NETWORK_ID_ANNOTATION: &str = "berth.dev/network-id";
/// Annotation on a network record: its name.
pub const NETWORK_NAME_ANNOTATION: &str = "berth.dev/network-name";
/// Annotation on a network record: the driver word the client gave.
pub const DRIVER_ANNOTATION: &str = "berth.dev/network-driver";
/// Key of a network record's data holding its labels, as JSON.
pub const LABELS_KEY: &str = "labels.json";
/// Docker's own networks, which are not Berth networks.
pub const PREDEFINED: [&str; 3] = ["bridge", "host", "none"];
/// Longest wait, after a start or a connect, for cluster DNS to have the
/// container's names.
pub const DNS_READY: Duration = Duration::from_secs(15);

/// A network record, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Network {
    /// Its namespace.
    pub namespace: String,
    /// 64 hex digits.
    pub id: String,
    /// Unique per client session.
    pub name: String,
    /// Docker's driver word (`bridge`).
    pub driver: String,
    /// RFC 3339 with nanos.
    pub created: String,
    /// The client's labels.
    pub labels: BTreeMap<String, String>,
    /// The client session that made it (empty: none).
    pub session: String,
    /// The ConfigMap's name.
    pub object_name: String,
}

/// Name of the ConfigMap recording the network `name` of `session`.
pub fn network_object_name(session: &str, name: &str) -> String {
    let digest = Sha256::digest(format!("{session}/{name}").as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("berth-net-{hex}")
}

/// The ConfigMap recording a new network.
pub fn to_config_map(n: &Network) -> ConfigMap {
    let labels = berth_labels(NETWORK_LABEL, &n.id[..12], &n.session);
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(network_object_name(&n.session, &n.name)),
            namespace: Some(n.namespace.clone()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([
                (NETWORK_ID_ANNOTATION.to_string(), n.id.clone()),
                (NETWORK_NAME_ANNOTATION.to_string(), n.name.clone()),
                (DRIVER_ANNOTATION.to_string(), n.driver.clone()),
                (CREATED_ANNOTATION.to_string(), n.created.clone()),
            ])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            LABELS_KEY.to_string(),
            serde_json::to_string(&n.labels).unwrap_or_default(),
        )])),
        ..Default::default()
    }
}

/// Reads a network record back; `None` if the ConfigMap is not one.
pub fn from_config_map(cm: &ConfigMap) -> Option<Network> {
    let meta = &cm.metadata;
    let annotations = meta.annotations.as_ref()?;
    let id = annotations.get(NETWORK_ID_ANNOTATION)?.clone();
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let labels = cm
        .data
        .as_ref()
        .and_then(|d| d.get(LABELS_KEY))
        .and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_default();
    Some(Network {
        namespace: meta.namespace.clone()?,
        name: annotations.get(NETWORK_NAME_ANNOTATION)?.clone(),
        driver: annotations
            .get(DRIVER_ANNOTATION)
            .cloned()
            .unwrap_or_default(),
        created: annotations
            .get(CREATED_ANNOTATION)
            .cloned()
            .unwrap_or_default(),
        session: label(meta, SESSION_LABEL).unwrap_or_default().to_string(),
        object_name: meta.name.clone()?,
        labels,
        id,
    })
}

/// Whether `name` can be a Service name (an RFC 1035 label: lowercase
/// letters, digits and `-`, starting with a letter, at most 63).
pub fn dns_label(name: &str) -> bool {
    name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Refuses an alias Berth cannot make a Service of, saying why.
pub fn check_alias(alias: &str) -> Result<(), Status> {
    if dns_label(&alias.to_ascii_lowercase()) {
        return Ok(());
    }
    Err(Status::invalid_argument(format!(
        "alias {alias:?} cannot be resolved in Kubernetes: a name other containers reach must be a DNS label \
         (lowercase letters, digits and '-', starting with a letter, at most 63)"
    )))
}

/// Every name a container answers to in the cluster, lowercase (DNS is
/// case-blind): its own name when that is a DNS label, if it is on a
/// network or publishes a port (so the port is reachable inside the cluster
/// through a Service, as well as on the shim's host), then its aliases on
/// its networks.
pub fn dns_names(spec: &pb::ContainerSpec) -> Vec<String> {
    let aliases: &[String] = if spec.networks.is_empty() {
        &[]
    } else {
        &spec.aliases
    };
    if spec.networks.is_empty() && spec.ports.is_empty() {
        return Vec::new();
    }
    let mut names: Vec<String> = Vec::new();
    for n in std::iter::once(&spec.name).chain(aliases) {
        let n = n.to_ascii_lowercase();
        if dns_label(&n) && !names.contains(&n) {
            names.push(n);
        }
    }
    names
}

/// The headless Service that makes `name` resolve to the record's pods.
pub fn service_for(record: &Record, name: &str) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(record.namespace.clone()),
            labels: Some(record.labels(CONTAINER_LABEL)),
            owner_references: Some(vec![record.owner()]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(BTreeMap::from([(
                CONTAINER_LABEL.to_string(),
                record.short_id().to_string(),
            )])),
            // Resolvable as soon as the pod has an address, as in Docker.
            publish_not_ready_addresses: Some(true),
            ..Default::default()
        }),
        status: None,
    }
}

/// Makes a Service for each of the record's DNS names. A name that another
/// container's Service holds is refused if the client asked for it (an
/// alias) and skipped if it is only the container's name.
pub async fn ensure_services(client: &kube::Client, record: &Record) -> Result<(), Status> {
    let api: Api<Service> = Api::namespaced(client.clone(), &record.namespace);
    for name in dns_names(&record.spec) {
        match api
            .create(&PostParams::default(), &service_for(record, &name))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(ae)) if ae.code == 409 => {
                let holder = api
                    .get_opt(&name)
                    .await
                    .map_err(|e| kube_status("reading the Service of a name", e))?
                    .and_then(|s| s.metadata.labels?.get(CONTAINER_LABEL).cloned());
                if holder.as_deref() == Some(record.short_id()) {
                    continue;
                }
                if name == record.spec.name.to_ascii_lowercase() {
                    tracing::warn!(container = %record.name, %name, "its name is another's Service; it is not resolvable by it");
                    continue;
                }
                return Err(Status::already_exists(format!(
                    "the name {name:?} is taken in namespace {}: {}",
                    record.namespace,
                    match holder {
                        Some(c) => format!("container {c} answers to it"),
                        None => "a Service of that name exists".into(),
                    }
                )));
            }
            Err(e) => return Err(kube_status("making the Service of a name", e)),
        }
    }
    Ok(())
}

/// The names whose Services the record holds.
async fn held_names(api: &Api<Service>, record: &Record) -> Result<Vec<String>, kube::Error> {
    let selector = format!("{CONTAINER_LABEL}={}", record.short_id());
    let mine = api
        .list_metadata(&ListParams::default().labels(&selector))
        .await?;
    Ok(mine.into_iter().filter_map(|s| s.metadata.name).collect())
}

/// Deletes the record's Services whose names are not in `keep`.
pub async fn drop_services(
    client: &kube::Client,
    record: &Record,
    keep: &[String],
) -> Result<(), Status> {
    let api: Api<Service> = Api::namespaced(client.clone(), &record.namespace);
    let held = held_names(&api, record)
        .await
        .map_err(|e| kube_status("listing the container's Services", e))?;
    for name in held.iter().filter(|n| !keep.contains(n)) {
        ignore_missing(api.delete(name, &DeleteParams::default()).await)
            .map_err(|e| kube_status("removing the Service of a name", e))?;
    }
    Ok(())
}

/// Waits (at most [`DNS_READY`]) until the endpoints of every DNS name of
/// the record list `ip`, so that a container started next resolves them.
/// Answers whether they did; the caller goes on either way.
pub async fn wait_resolvable(client: &kube::Client, record: &Record, ip: &str) -> bool {
    let mut pending = dns_names(&record.spec);
    if pending.is_empty() || ip.is_empty() {
        return true;
    }
    // Only the names it holds: its own name may be another's Service.
    let services: Api<Service> = Api::namespaced(client.clone(), &record.namespace);
    let Ok(held) = held_names(&services, record).await else {
        return false;
    };
    pending.retain(|n| held.contains(n));
    if pending.is_empty() {
        return true;
    }
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &record.namespace);
    let config =
        watcher::Config::default().labels(&format!("{CONTAINER_LABEL}={}", record.short_id()));
    let watch = async {
        let mut events = std::pin::pin!(watcher::watcher(api, config));
        while let Some(event) = events.next().await {
            let slice = match event {
                Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => s,
                Ok(_) => continue,
                Err(_) => return false,
            };
            let has_ip = slice
                .endpoints
                .iter()
                .any(|e| e.addresses.iter().any(|a| a == ip));
            if let Some(service) = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name"))
                && has_ip
            {
                pending.retain(|n| n != service);
                if pending.is_empty() {
                    return true;
                }
            }
        }
        false
    };
    tokio::time::timeout(DNS_READY, watch)
        .await
        .unwrap_or(false)
}

/// The network as the API reports it, with its members from `space`.
pub fn info(space: &Space, network: &Network) -> pb::NetworkInfo {
    let members = space
        .records()
        .into_iter()
        .filter(|r| r.spec.networks.contains(&network.name))
        .map(|r| {
            let ip = space
                .current_pod(&r)
                .and_then(|p| p.status.as_ref()?.pod_ip.clone())
                .unwrap_or_default();
            pb::NetworkMember {
                id: r.id.clone(),
                name: r.name.clone(),
                dns_names: dns_names(&r.spec),
                ip,
            }
        })
        .collect();
    pb::NetworkInfo {
        id: network.id.clone(),
        name: network.name.clone(),
        namespace: network.namespace.clone(),
        driver: network.driver.clone(),
        created: network.created.clone(),
        labels: network.labels.clone().into_iter().collect(),
        members,
    }
}

/// Whether a network matches a list request's filters.
pub fn matches(req: &pb::ListNetworksRequest, n: &Network) -> bool {
    let label_ok = req.label_filters.iter().all(|f| match f.split_once('=') {
        Some((k, v)) => n.labels.get(k).is_some_and(|have| have == v),
        None => n.labels.contains_key(f),
    });
    let name_ok =
        req.name_filters.is_empty() || req.name_filters.iter().any(|f| n.name.contains(f));
    let id_ok = req.id_filters.is_empty() || req.id_filters.iter().any(|p| n.id.starts_with(p));
    label_ok && name_ok && id_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network() -> Network {
        Network {
            namespace: "ci".into(),
            id: "ab".repeat(32),
            name: "backend".into(),
            driver: "bridge".into(),
            created: "2026-11-25T00:00:00Z".into(),
            labels: BTreeMap::from([("org.testcontainers".into(), "true".into())]),
            session: "0123abcd".into(),
            object_name: network_object_name("0123abcd", "backend"),
        }
    }

    #[test]
    fn a_network_survives_the_round_trip_through_its_config_map() {
        let n = network();
        let cm = to_config_map(&n);
        assert_eq!(from_config_map(&cm), Some(n.clone()));
        assert_eq!(cm.metadata.labels.unwrap()[NETWORK_LABEL], n.id[..12]);
        assert_ne!(
            network_object_name("0123abcd", "backend"),
            network_object_name("4567ef01", "backend")
        );
    }

    #[test]
    fn only_dns_labels_become_names_and_only_on_a_network() {
        let mut spec = pb::ContainerSpec {
            name: "berth_1234".into(),
            aliases: vec!["db".into(), "DB".into(), "cache-1".into()],
            ..Default::default()
        };
        assert!(dns_names(&spec).is_empty(), "no network, no names");
        spec.name = "web".into();
        spec.ports = vec![pb::PortBinding {
            container_port: 80,
            ..Default::default()
        }];
        assert_eq!(dns_names(&spec), ["web"], "a published port: its name only");
        spec.ports.clear();
        spec.name = "berth_1234".into();
        spec.networks = vec!["backend".into()];
        assert_eq!(dns_names(&spec), ["db", "cache-1"]);
        spec.name = "web".into();
        assert_eq!(dns_names(&spec), ["web", "db", "cache-1"]);
        for bad in ["1db", "db_1", "db.x", "db-", "", &"a".repeat(64)] {
            assert!(check_alias(bad).is_err(), "{bad:?}");
        }
        // testcontainers-java's own aliases, `tc-` and Base58.
        assert!(check_alias("tc-Xa9Kp2Qz").is_ok());
    }

    #[test]
    fn a_names_service_is_headless_and_selects_the_containers_pods() {
        let record = Record {
            namespace: "ci".into(),
            id: "cd".repeat(32),
            name: "web".into(),
            spec: pb::ContainerSpec::default(),
            runs: 0,
            run_started: String::new(),
            created: String::new(),
            uid: "u-1".into(),
            object_name: "berth-ctr-1".into(),
            session: String::new(),
        };
        let s = service_for(&record, "db");
        let spec = s.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.selector.unwrap()[CONTAINER_LABEL], "cdcdcdcdcdcd");
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        let owner = &s.metadata.owner_references.unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("ConfigMap", "u-1")
        );
    }

    #[test]
    fn list_filters_match_labels_names_and_ids() {
        let n = network();
        let req = |l: &[&str], names: &[&str], ids: &[&str]| pb::ListNetworksRequest {
            namespace: "ci".into(),
            label_filters: l.iter().map(|s| s.to_string()).collect(),
            name_filters: names.iter().map(|s| s.to_string()).collect(),
            id_filters: ids.iter().map(|s| s.to_string()).collect(),
        };
        assert!(matches(&req(&[], &[], &[]), &n));
        assert!(matches(
            &req(&["org.testcontainers=true"], &["back"], &["abab"]),
            &n
        ));
        assert!(!matches(&req(&["org.testcontainers=false"], &[], &[]), &n));
        assert!(!matches(&req(&[], &["front"], &[]), &n));
        assert!(!matches(&req(&[], &[], &["cd"]), &n));
    }
}
