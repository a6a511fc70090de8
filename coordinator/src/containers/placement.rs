//! Where a container's pod should run: on a node that already holds its
//! image (the agents' inventories say which), and when none does, on a node
//! chosen now whose agent starts pulling the image at once, while the pod is
//! still being scheduled and its sandbox made. The choice is a scheduling
//! preference (the scheduler still decides, honouring capacity), and is left
//! out when the pod names its own placement (a node selector, an affinity)
//! or pulls with secrets the agent would not have.

use std::time::{Duration, Instant};

use berth_proto::agent as agent_pb;
use k8s_openapi::api::core::v1::{
    Affinity, NodeAffinity, NodeSelectorRequirement, NodeSelectorTerm, PodSpec,
    PreferredSchedulingTerm,
};

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

/// Decides for `image` from the registry's agents, starts the warming pull
/// if that is the choice, and answers it.
pub fn place(registry: &NodeRegistry, image: &str) -> Placement {
    let now = Instant::now();
    let agents: Vec<(String, AgentView)> = registry
        .list()
        .into_iter()
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
