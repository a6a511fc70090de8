//! A container's durable record: one ConfigMap per container in its
//! namespace, holding its ID, name, spec and run counter. The record exists
//! from `Create` to `Remove`; each `Start` makes a fresh pod that the record
//! owns, so deleting the record lets the garbage collector take any pod left.
//!
//! The ConfigMap's name derives from the container's name
//! ([`record_name`]), so two creates of one name collide in the apiserver
//! itself, not in a check that races.

use std::collections::BTreeMap;

use berth_proto::api as pb;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::ObjectMeta;
use prost::Message;
use sha2::{Digest, Sha256};

/// Label on every record and pod: the container's 12-digit short ID.
pub const CONTAINER_LABEL: &str = "berth.dev/container";
/// Label on every pod: which start of its container made it.
pub const RUN_LABEL: &str = "berth.dev/run";
/// Label on records and pods made in a client session (one docker-shim):
/// the session's ID. Such containers are seen only by calls of that session
/// and removed once its Lease has expired.
pub const SESSION_LABEL: &str = "berth.dev/session";
/// Annotation on the record: the container's full 64-digit ID.
pub const ID_ANNOTATION: &str = "berth.dev/container-id";
/// Annotation on the record: the container's name.
pub const NAME_ANNOTATION: &str = "berth.dev/container-name";
/// Annotation on the record: how many times it was started.
pub const RUNS_ANNOTATION: &str = "berth.dev/runs";
/// Annotation on the record: when its latest start was asked for (RFC 3339).
pub const RUN_STARTED_ANNOTATION: &str = "berth.dev/run-started";
/// Annotation on the record: when it was created (RFC 3339 with nanos).
pub const CREATED_ANNOTATION: &str = "berth.dev/created";
/// Key of the record's binary data holding the encoded spec.
pub const SPEC_KEY: &str = "spec.pb";

/// What a record says, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Namespace of the record and its pods.
    pub namespace: String,
    /// 64 hex digits.
    pub id: String,
    /// The container's name (no leading `/`).
    pub name: String,
    /// What to run.
    pub spec: pb::ContainerSpec,
    /// Starts so far; the pod of run `n` is [`pod_name`]`(id, n)`.
    pub runs: u32,
    /// When the latest start was asked for (RFC 3339; empty before one).
    pub run_started: String,
    /// RFC 3339 with nanos.
    pub created: String,
    /// The ConfigMap's UID, for owner references.
    pub uid: String,
    /// The ConfigMap's name.
    pub object_name: String,
    /// The client session that made it (empty: none).
    pub session: String,
}

impl Record {
    /// The 12-digit short ID.
    pub fn short_id(&self) -> &str {
        &self.id[..12]
    }

    /// The reference that makes an object the record's own, so that it goes
    /// with the record (pods, the Services of its names, copied files).
    pub fn owner(&self) -> OwnerReference {
        OwnerReference {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            name: self.object_name.clone(),
            uid: self.uid.clone(),
            ..Default::default()
        }
    }

    /// The labels of the objects the record owns: its short ID under `key`
    /// ([`CONTAINER_LABEL`] for what the mirror must see), Berth as manager,
    /// and its session.
    pub fn labels(&self, key: &str) -> BTreeMap<String, String> {
        berth_labels(key, self.short_id(), &self.session)
    }
}

/// Labels of an object Berth keeps for a client: `key: value`, Berth as the
/// manager, and the session (when there is one).
pub fn berth_labels(key: &str, value: &str, session: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (key.to_string(), value.to_string()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "berth".to_string(),
        ),
    ]);
    if !session.is_empty() {
        labels.insert(SESSION_LABEL.to_string(), session.to_string());
    }
    labels
}

/// The value of label `key` of an object.
pub fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

/// Name of the ConfigMap recording the container called `name` in
/// `session` (names are unique per session).
pub fn record_name(session: &str, name: &str) -> String {
    let digest = Sha256::digest(format!("{session}/{name}").as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("berth-ctr-{hex}")
}

/// Name of the pod of a container's `run`-th start.
pub fn pod_name(id: &str, run: u32) -> String {
    format!("berth-{}-{run}", &id[..12])
}

/// A fresh random container ID: 64 hex digits.
pub fn new_id() -> String {
    let mut id = String::with_capacity(64);
    while id.len() < 64 {
        id.push_str(&format!("{:016x}", fastrand::u64(..)));
    }
    id
}

/// Whether `name` is acceptable as a container name: Docker's grammar
/// (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`), at most 63 characters.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && name.len() <= 63
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// The ConfigMap that records a new container.
pub fn to_config_map(
    namespace: &str,
    session: &str,
    id: &str,
    spec: &pb::ContainerSpec,
    created: &str,
) -> ConfigMap {
    let labels = berth_labels(CONTAINER_LABEL, &id[..12], session);
    let annotations = BTreeMap::from([
        (ID_ANNOTATION.to_string(), id.to_string()),
        (NAME_ANNOTATION.to_string(), spec.name.clone()),
        (RUNS_ANNOTATION.to_string(), "0".to_string()),
        (CREATED_ANNOTATION.to_string(), created.to_string()),
    ]);
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(record_name(session, &spec.name)),
            namespace: Some(namespace.to_string()),
            labels: Some(labels),
            annotations: Some(annotations),
            ..Default::default()
        },
        binary_data: Some(BTreeMap::from([(
            SPEC_KEY.to_string(),
            ByteString(spec.encode_to_vec()),
        )])),
        ..Default::default()
    }
}

/// Reads a record back; `None` if the ConfigMap is not a well-formed one
/// (a user's object that happens to carry the label is left alone).
pub fn from_config_map(cm: &ConfigMap) -> Option<Record> {
    let meta = &cm.metadata;
    let annotations = meta.annotations.as_ref()?;
    let id = annotations.get(ID_ANNOTATION)?.clone();
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let spec_bytes = cm.binary_data.as_ref()?.get(SPEC_KEY)?;
    let spec = pb::ContainerSpec::decode(spec_bytes.0.as_slice()).ok()?;
    Some(Record {
        namespace: meta.namespace.clone()?,
        name: annotations.get(NAME_ANNOTATION)?.clone(),
        runs: annotations.get(RUNS_ANNOTATION)?.parse().ok()?,
        run_started: annotations
            .get(RUN_STARTED_ANNOTATION)
            .cloned()
            .unwrap_or_default(),
        created: annotations
            .get(CREATED_ANNOTATION)
            .cloned()
            .unwrap_or_default(),
        uid: meta.uid.clone()?,
        object_name: meta.name.clone()?,
        session: label(meta, SESSION_LABEL).unwrap_or_default().to_string(),
        id,
        spec,
    })
}

/// A short random name for a container created without one, like
/// `berth_3f9a2c1d`.
pub fn generated_name() -> String {
    format!("berth_{:08x}", fastrand::u32(..))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_the_round_trip_through_its_config_map() {
        let id = new_id();
        let spec = pb::ContainerSpec {
            name: "web".into(),
            image: "busybox".into(),
            cmd: vec!["sh".into(), "-c".into(), "exit 3".into()],
            ..Default::default()
        };
        let mut cm = to_config_map("ci", "", &id, &spec, "2026-11-25T00:00:00.000000001Z");
        cm.metadata.uid = Some("u-1".into());
        let r = from_config_map(&cm).unwrap();
        assert_eq!(r.id, id);
        assert_eq!(r.name, "web");
        assert_eq!(r.spec, spec);
        assert_eq!(r.runs, 0);
        assert_eq!(r.namespace, "ci");
        assert_eq!(r.object_name, record_name("", "web"));
        assert_eq!(r.session, "");
        assert_eq!(cm.metadata.labels.unwrap()[CONTAINER_LABEL], id[..12]);
    }

    #[test]
    fn a_foreign_config_map_with_the_label_is_not_a_record() {
        let mut cm = to_config_map("ci", "", &new_id(), &pb::ContainerSpec::default(), "");
        cm.metadata.uid = Some("u".into());
        cm.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(ID_ANNOTATION.into(), "not-hex".into());
        assert!(from_config_map(&cm).is_none());
    }

    #[test]
    fn names_follow_dockers_grammar_and_fit_a_label() {
        assert!(valid_name("web"));
        assert!(valid_name("a.b_c-1"));
        assert!(!valid_name(""));
        assert!(!valid_name("-web"));
        assert!(!valid_name("web/1"));
        assert!(!valid_name(&"a".repeat(64)));
        assert_eq!(record_name("", "web"), record_name("", "web"));
        assert_ne!(record_name("", "web"), record_name("", "Web"));
        assert_ne!(record_name("a1", "web"), record_name("b2", "web"));
        assert!(valid_name(&generated_name()));
    }

    #[test]
    fn ids_are_64_hex_digits_and_pods_are_named_by_run() {
        let id = new_id();
        assert_eq!(id.len(), 64);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(pod_name(&id, 2), format!("berth-{}-2", &id[..12]));
    }
}
