//! Where a container's pod should run: on a node that already holds its
//! image (the agents' inventories say which), and when none does, on a node
//! chosen now whose agent starts pulling the image at once, while the pod is
//! still being scheduled and its sandbox made. The choice is a scheduling
//! preference (the scheduler still decides, honouring capacity), and is left
//! out when the pod names its own placement (a node selector, an affinity)
//! or pulls with secrets the agent would not have. Only nodes the pod could
//! land on are chosen: not cordoned, and every `NoSchedule`/`NoExecute`
//! taint tolerated by the pod ([`admits`]).

use std::time::{Duration, Instant};

use berth_proto::agent as agent_pb;
use k8s_openapi::api::core::v1::{
    Affinity, Node, NodeAffinity, NodeSelectorRequirement, NodeSelectorTerm, PodSpec,
    PreferredSchedulingTerm, Taint, Toleration,
};
use kube::runtime::reflector::Store;

use crate::domain::{AgentView, TaskRecord};
use crate::nodes::NodeRegistry;

/// How long a warming pull may take.
pub const WARM_TIMEOUT: Duration = Duration::from_secs(600);

/// What to do for one start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// No agent knows anything: leave it to the scheduler.
    Anywhere,
    /// Prefer these nodes: they hold (or are pulling) the image.
    Holders(Vec<String>),
    /// Prefer this node, and pull the image there now.
    Warm(String),
}

/// The choice for `image` among agents that have reported an inventory;
/// `pick` chooses among candidates when none holds it.
pub fn decide(
    agents: &[(String, AgentView)],
    image: &str,
    pick: impl FnOnce(usize) -> usize,
) -> Placement {
    let live: Vec<&(String, AgentView)> = agents
        .iter()
        .filter(|(_, a)| a.connected && a.reported)
        .collect();
    let holders: Vec<String> = live
        .iter()
        .filter(|(_, a)| a.holds(image).is_some() || a.pulling.contains(image))
        .map(|(n, _)| n.clone())
        .collect();
    if !holders.is_empty() {
        return Placement::Holders(holders);
    }
    match live.len() {
        0 => Placement::Anywhere,
        n => Placement::Warm(live[pick(n) % n].0.clone()),
    }
}

/// Whether the pod already says where it may run, or pulls with secrets.
pub fn pod_decides(spec: &PodSpec) -> bool {
    spec.node_selector.as_ref().is_some_and(|s| !s.is_empty())
        || spec
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref())
            .is_some()
        || spec.node_name.is_some()
        || spec
            .image_pull_secrets
            .as_ref()
            .is_some_and(|s| !s.is_empty())
}

/// Adds the preference for `nodes` to the pod: one term per node, of equal
/// weight (a `metadata.name` field selector takes a single value).
pub fn prefer(spec: &mut PodSpec, nodes: &[String]) {
    let terms = nodes
        .iter()
        .map(|node| PreferredSchedulingTerm {
            weight: 100,
            preference: NodeSelectorTerm {
                match_fields: Some(vec![NodeSelectorRequirement {
                    key: "metadata.name".into(),
                    operator: "In".into(),
                    values: Some(vec![node.clone()]),
                }]),
                ..Default::default()
            },
        })
        .collect();
    let affinity = spec.affinity.get_or_insert_with(Affinity::default);
    affinity.node_affinity = Some(NodeAffinity {
        preferred_during_scheduling_ignored_during_execution: Some(terms),
        ..Default::default()
    });
}

fn tolerates(t: &Toleration, taint: &Taint) -> bool {
    let key_ok = match t.key.as_deref() {
        None | Some("") => t.operator.as_deref() == Some("Exists"),
        Some(k) => k == taint.key,
    };
    let effect_ok = t
        .effect
        .as_deref()
        .is_none_or(|e| e.is_empty() || e == taint.effect);
    let value_ok = t.operator.as_deref() == Some("Exists")
        || t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("");
    key_ok && effect_ok && value_ok
}

/// Whether a pod with `spec` could be scheduled to `node`: it is not
/// cordoned, and every taint that keeps pods off is tolerated.
pub fn admits(node: &Node, spec: &PodSpec) -> bool {
    let Some(ns) = node.spec.as_ref() else {
        return true;
    };
    if ns.unschedulable == Some(true) {
        return false;
    }
    let tolerations = spec.tolerations.as_deref().unwrap_or(&[]);
    ns.taints.iter().flatten().all(|taint| {
        !matches!(taint.effect.as_str(), "NoSchedule" | "NoExecute")
            || tolerations.iter().any(|t| tolerates(t, taint))
    })
}

/// Decides for `image` from the registry's agents on the nodes `spec` could
/// land on (as `nodes` knows them; all, before it has filled), starts the
/// warming pull if that is the choice, and answers it.
pub fn place(
    registry: &NodeRegistry,
    nodes: Option<&Store<Node>>,
    spec: &PodSpec,
    image: &str,
) -> Placement {
    let now = Instant::now();
    let fits = |name: &str| {
        nodes.is_none_or(|store| {
            store
                .get(&kube::runtime::reflector::ObjectRef::new(name))
                .is_none_or(|n| admits(&n, spec))
        })
    };
    let agents: Vec<(String, AgentView)> = registry
        .list()
        .into_iter()
        .filter(|n| fits(&n.name))
        .filter_map(|n| Some((n.name.clone(), registry.agent_view(&n.name, now)?)))
        .collect();
    let placement = decide(&agents, image, |n| fastrand::usize(..n));
    if let Placement::Warm(node) = &placement {
        let task = agent_pb::Task {
            id: format!("warm-{:016x}", fastrand::u64(..)),
            kind: Some(agent_pb::task::Kind::Pull(agent_pb::PullTask {
                image: image.to_string(),
                credentials: None,
                timeout_seconds: WARM_TIMEOUT.as_secs() as u32,
                expected_size_bytes: 0,
                pin: String::new(),
            })),
        };
        let record = TaskRecord {
            image: image.to_string(),
            pull: true,
            pin: None,
        };
        if registry.dispatch(node, task, record) {
            tracing::info!(%node, %image, "warming the image where the container will run");
        }
    }
    placement
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::agent as pb;

    fn agent(images: &[&str], connected: bool) -> AgentView {
        let held: Vec<pb::Image> = images
            .iter()
            .map(|r| pb::Image {
                repo_tags: vec![r.to_string()],
                ..Default::default()
            })
            .collect();
        AgentView {
            connected,
            reported: true,
            images: crate::domain::HeldImages::new(
                Some(std::sync::Arc::new(pb::Inventory {
                    images: held,
                    ..Default::default()
                })),
                Vec::new(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn nodes_holding_the_image_are_preferred_and_none_warms_one() {
        let img = "reg:5000/app:1";
        let agents = vec![
            ("n1".to_string(), agent(&[], true)),
            ("n2".to_string(), agent(&[img], true)),
            ("n3".to_string(), agent(&[img], false)),
        ];
        assert_eq!(
            decide(&agents, img, |_| 0),
            Placement::Holders(vec!["n2".into()])
        );
        assert_eq!(
            decide(&agents, "other:1", |_| 1),
            Placement::Warm("n2".into())
        );
        assert_eq!(decide(&[], img, |_| 0), Placement::Anywhere);
        let away = vec![("n3".to_string(), agent(&[img], false))];
        assert_eq!(decide(&away, img, |_| 0), Placement::Anywhere);
    }

    #[test]
    fn cordoned_and_tainted_nodes_admit_only_pods_that_tolerate_them() {
        let node = |unschedulable: bool, taints: Vec<Taint>| Node {
            spec: Some(k8s_openapi::api::core::v1::NodeSpec {
                unschedulable: Some(unschedulable),
                taints: Some(taints),
                ..Default::default()
            }),
            ..Default::default()
        };
        let taint = |key: &str, effect: &str| Taint {
            key: key.into(),
            effect: effect.into(),
            value: Some("x".into()),
            ..Default::default()
        };
        let plain = PodSpec::default();
        assert!(admits(&node(false, vec![]), &plain));
        assert!(!admits(&node(true, vec![]), &plain));
        assert!(!admits(
            &node(false, vec![taint("gpu", "NoSchedule")]),
            &plain
        ));
        assert!(admits(
            &node(false, vec![taint("gpu", "PreferNoSchedule")]),
            &plain
        ));
        let tolerant = PodSpec {
            tolerations: Some(vec![Toleration {
                key: Some("gpu".into()),
                operator: Some("Exists".into()),
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert!(admits(
            &node(false, vec![taint("gpu", "NoSchedule")]),
            &tolerant
        ));
        assert!(!admits(
            &node(false, vec![taint("disk", "NoExecute")]),
            &tolerant
        ));
        let everything = PodSpec {
            tolerations: Some(vec![Toleration {
                operator: Some("Exists".into()),
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert!(admits(
            &node(false, vec![taint("disk", "NoExecute")]),
            &everything
        ));
    }

    #[test]
    fn a_pod_that_places_itself_is_left_alone_and_a_preference_names_nodes() {
        let mut spec = PodSpec::default();
        assert!(!pod_decides(&spec));
        prefer(&mut spec, &["n2".into()]);
        let term = &spec
            .affinity
            .as_ref()
            .unwrap()
            .node_affinity
            .as_ref()
            .unwrap()
            .preferred_during_scheduling_ignored_during_execution
            .as_ref()
            .unwrap()[0];
        assert_eq!(
            term.preference.match_fields.as_ref().unwrap()[0]
                .values
                .as_ref()
                .unwrap(),
            &["n2"]
        );
        assert!(pod_decides(&spec), "an affinity is a placement");
        let selected = PodSpec {
            node_selector: Some([("disk".to_string(), "ssd".to_string())].into()),
            ..Default::default()
        };
        assert!(pod_decides(&selected));
    }
}
