//! Per-node detail as data in, data out.

use std::time::Duration;

use berth_proto::agent as pb;

use super::*;
use crate::domain::{AgentView, Failure};
use crate::imagecache::plan::WantedImage;

fn wanted(r: &str) -> WantedImage {
    WantedImage {
        reference: r.into(),
        timeout: Duration::from_secs(60),
        pin: None,
    }
}

fn agent(held: &[&str]) -> AgentView {
    AgentView {
        connected: true,
        images: held
            .iter()
            .map(|r| pb::Image {
                id: format!("id-{r}"),
                repo_tags: vec![r.to_string()],
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn states(d: &[NodeDetail]) -> Vec<(String, Vec<String>)> {
    d.iter()
        .map(|n| {
            let s = n.images.iter().map(|i| i.state.clone()).collect();
            (n.node.clone(), s)
        })
        .collect()
}

#[test]
fn each_selected_node_lists_each_image_in_its_state() {
    let v = CacheView {
        key: "ns/c".into(),
        images: vec![wanted("r/a:1"), wanted("r/b:1")],
        node_names: Some(vec!["n1".into(), "n2".into(), "n3".into()]),
        ..Default::default()
    };
    let mut pulling = agent(&["r/a:1"]);
    pulling.pulling.insert("r/b:1".into());
    let mut failed = agent(&[]);
    failed.failures.insert(
        "r/a:1".into(),
        Failure {
            reason: "AuthFailed".into(),
            message: "401".into(),
            attempts: 2,
            retry_due: false,
        },
    );
    let node = |name: &str, agent: Option<AgentView>| NodeView {
        name: name.into(),
        agent,
        ..Default::default()
    };
    let nodes = [
        node("n1", Some(pulling)),
        node("n2", Some(failed)),
        node("n3", None),
        node("other", Some(agent(&[]))),
    ];
    let d = node_details(&v, &nodes);
    assert_eq!(
        states(&d),
        [
            (
                "n1".to_string(),
                vec!["Ready".to_string(), "Pulling".into()]
            ),
            (
                "n2".to_string(),
                vec!["Failed".to_string(), "Pending".into()]
            ),
            (
                "n3".to_string(),
                vec!["Unknown".to_string(), "Unknown".into()]
            ),
        ]
    );
    let f = &d[1].images[0];
    assert_eq!(
        (f.reason.as_str(), f.message.as_str(), f.attempts),
        ("AuthFailed", "401", 2)
    );
}

#[test]
fn a_node_holding_a_tracked_tag_at_its_old_digest_is_not_ready_in_detail_or_status() {
    let mut tracked = wanted("r/a:1");
    tracked.pin = Some("r/a@sha256:new".into());
    let v = CacheView {
        key: "ns/c".into(),
        images: vec![tracked],
        ..Default::default()
    };
    let mut a = agent(&["r/a:1"]);
    a.images.make_mut()[0].repo_digests = vec!["r/a@sha256:old".into()];
    let nodes = [NodeView {
        name: "n1".into(),
        agent: Some(a),
        ..Default::default()
    }];
    assert_eq!(node_details(&v, &nodes)[0].images[0].state, "Pending");
    let s = crate::imagecache::plan::status(&v, &nodes);
    assert_eq!((s.nodes.ready, s.nodes.pending), (0, 1));
}
