//! Deployments, DaemonSets and StatefulSets as the backup controller reads
//! them: one shape for all three, and the patches that roll a workload onto
//! its copies and back.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::PodSpec;
use kube::ResourceExt;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::crd::{OPT_OUT, ORIGINAL_IMAGES, RESTORE, WorkloadKind};

/// A workload's images and what the controller needs to decide about it.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Its kind.
    pub kind: WorkloadKind,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Resource version, so a patch fails if it changed since.
    pub resource_version: String,
    /// Every pod of the current template is ready.
    pub ready: bool,
    /// The workload's annotations.
    pub annotations: BTreeMap<String, String>,
    /// Containers: (init?, name, image).
    pub containers: Vec<(bool, String, String)>,
    /// The template's `imagePullSecrets`.
    pub pull_secrets: Vec<String>,
    /// The template's ServiceAccount.
    pub service_account: String,
}

/// A rolled workload's original images, by container name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Originals {
    /// Containers.
    #[serde(default)]
    pub containers: BTreeMap<String, String>,
    /// Init containers.
    #[serde(default)]
    pub init_containers: BTreeMap<String, String>,
}

impl Workload {
    fn from_parts(
        kind: WorkloadKind,
        meta: &impl ResourceExt,
        spec: Option<&PodSpec>,
        ready: bool,
    ) -> Self {
        let mut containers = Vec::new();
        let (mut pull_secrets, mut service_account) = (Vec::new(), "default".to_string());
        if let Some(s) = spec {
            for c in s.init_containers.iter().flatten() {
                containers.push((true, c.name.clone(), c.image.clone().unwrap_or_default()));
            }
            for c in &s.containers {
                containers.push((false, c.name.clone(), c.image.clone().unwrap_or_default()));
            }
            pull_secrets = s
                .image_pull_secrets
                .iter()
                .flatten()
                .map(|r| r.name.clone())
                .collect();
            if let Some(sa) = &s.service_account_name {
                service_account = sa.clone();
            }
        }
        Workload {
            kind,
            namespace: meta.namespace().unwrap_or_default(),
            name: meta.name_any(),
            resource_version: meta.resource_version().unwrap_or_default(),
            ready,
            annotations: meta.annotations().clone(),
            containers,
            pull_secrets,
            service_account,
        }
    }

    /// A Deployment, ready once its current generation's replicas all are.
    pub fn deployment(d: &Deployment) -> Self {
        let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let st = d.status.clone().unwrap_or_default();
        let ready = st.observed_generation >= d.metadata.generation
            && st.updated_replicas.unwrap_or(0) >= want
            && st.ready_replicas.unwrap_or(0) >= want;
        let spec = d.spec.as_ref().and_then(|s| s.template.spec.as_ref());
        Self::from_parts(WorkloadKind::Deployment, d, spec, ready)
    }

    /// A DaemonSet, ready once every scheduled pod is current and ready.
    pub fn daemonset(d: &DaemonSet) -> Self {
        let st = d.status.clone().unwrap_or_default();
        let ready = st.observed_generation >= d.metadata.generation
            && st.desired_number_scheduled > 0
            && st.updated_number_scheduled.unwrap_or(0) >= st.desired_number_scheduled
            && st.number_ready >= st.desired_number_scheduled;
        let spec = d.spec.as_ref().and_then(|s| s.template.spec.as_ref());
        Self::from_parts(WorkloadKind::DaemonSet, d, spec, ready)
    }

    /// A StatefulSet, ready once its replicas all are.
    pub fn statefulset(s: &StatefulSet) -> Self {
        let want = s.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let st = s.status.clone().unwrap_or_default();
        let ready = st.observed_generation >= s.metadata.generation
            && st.ready_replicas.unwrap_or(0) >= want;
        let spec = s.spec.as_ref().and_then(|s| s.template.spec.as_ref());
        Self::from_parts(WorkloadKind::StatefulSet, s, spec, ready)
    }

    /// `Kind/namespace/name`.
    pub fn key(&self) -> String {
        format!("{:?}/{}/{}", self.kind, self.namespace, self.name)
    }

    /// The owner opted out.
    pub fn opted_out(&self) -> bool {
        self.annotations.get(OPT_OUT).is_some_and(|v| v == "false")
    }

    /// The owner asked for the original images back.
    pub fn restore_asked(&self) -> bool {
        self.annotations.get(RESTORE).is_some_and(|v| v == "true")
    }

    /// The images it had before it was rolled, if it was.
    pub fn originals(&self) -> Option<Originals> {
        self.annotations
            .get(ORIGINAL_IMAGES)
            .and_then(|j| serde_json::from_str(j).ok())
    }

    /// The image a container ran before the roll: the recorded original, or
    /// the current one.
    pub fn original_image(&self, init: bool, name: &str) -> Option<String> {
        let o = self.originals()?;
        let map = if init {
            &o.init_containers
        } else {
            &o.containers
        };
        map.get(name).cloned()
    }
}

/// Containers and init containers of a pod template patch, by name.
fn template_patch(images: &[(bool, String, String)]) -> serde_json::Value {
    let part = |init: bool| -> Vec<serde_json::Value> {
        images
            .iter()
            .filter(|(i, _, _)| *i == init)
            .map(|(_, n, img)| json!({"name": n, "image": img}))
            .collect()
    };
    let mut spec = serde_json::Map::new();
    let (c, i) = (part(false), part(true));
    if !c.is_empty() {
        spec.insert("containers".into(), c.into());
    }
    if !i.is_empty() {
        spec.insert("initContainers".into(), i.into());
    }
    json!({"template": {"spec": spec}})
}

/// A strategic merge patch that changes only the named containers' images
/// (containers merge by name), records `originals`, and fails if the
/// workload changed since it was read.
pub fn roll_patch(
    w: &Workload,
    images: &[(bool, String, String)],
    originals: &Originals,
) -> serde_json::Value {
    json!({
        "metadata": {
            "resourceVersion": w.resource_version,
            "annotations": {ORIGINAL_IMAGES: serde_json::to_string(originals).unwrap_or_default()},
        },
        "spec": template_patch(images),
    })
}

/// The patch that puts the original images back, forgets them, and opts the
/// workload out so that it stays on them.
pub fn restore_patch(w: &Workload, originals: &Originals) -> serde_json::Value {
    let mut images = Vec::new();
    for (init, map) in [
        (false, &originals.containers),
        (true, &originals.init_containers),
    ] {
        for (name, image) in map {
            if w.containers.iter().any(|(i, n, _)| *i == init && n == name) {
                images.push((init, name.clone(), image.clone()));
            }
        }
    }
    json!({
        "metadata": {
            "resourceVersion": w.resource_version,
            "annotations": {ORIGINAL_IMAGES: null, RESTORE: null, OPT_OUT: "false"},
        },
        "spec": template_patch(&images),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload() -> Workload {
        Workload {
            kind: WorkloadKind::Deployment,
            namespace: "ns".into(),
            name: "web".into(),
            resource_version: "7".into(),
            ready: true,
            annotations: BTreeMap::new(),
            containers: vec![
                (true, "setup".into(), "a:1".into()),
                (false, "app".into(), "b:1".into()),
            ],
            pull_secrets: vec![],
            service_account: "default".into(),
        }
    }

    #[test]
    fn a_roll_touches_only_images_and_records_the_originals() {
        let w = workload();
        let mut o = Originals::default();
        o.containers.insert("app".into(), "b:1".into());
        let p = roll_patch(&w, &[(false, "app".into(), "bk/b:1".into())], &o);
        assert_eq!(
            p["spec"],
            json!({"template": {"spec": {"containers": [{"name": "app", "image": "bk/b:1"}]}}})
        );
        assert_eq!(p["metadata"]["resourceVersion"], "7");
        let recorded: Originals = serde_json::from_str(
            p["metadata"]["annotations"][ORIGINAL_IMAGES]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(recorded, o);
    }

    #[test]
    fn a_restore_puts_back_what_was_recorded_and_opts_out() {
        let w = workload();
        let mut o = Originals::default();
        o.init_containers.insert("setup".into(), "a:1".into());
        o.containers.insert("gone".into(), "x:1".into());
        let p = restore_patch(&w, &o);
        assert_eq!(
            p["spec"],
            json!({"template": {"spec": {"initContainers": [{"name": "setup", "image": "a:1"}]}}})
        );
        assert_eq!(p["metadata"]["annotations"][OPT_OUT], "false");
        assert!(p["metadata"]["annotations"][ORIGINAL_IMAGES].is_null());
    }
}
