//! The planner as data in, data out.

use super::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

const T: Duration = Duration::from_secs(60);

fn cache(key: &str, images: &[&str]) -> CacheView {
    CacheView {
        key: key.into(),
        images: images
            .iter()
            .map(|r| WantedImage {
                reference: r.to_string(),
                timeout: T,
                pin: None,
            })
            .collect(),
        max_pulls_per_node: 2,
        ..Default::default()
    }
}

fn node(name: &str, labels: &[(&str, &str)], held: &[&str]) -> NodeView {
    NodeView {
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        agent: Some(AgentView {
            connected: true,
            reported: true,
            images: held.iter().map(|r| image(r, true, false)).collect(),
            ..Default::default()
        }),
    }
}

fn image(reference: &str, managed: bool, in_use: bool) -> pb::Image {
    pb::Image {
        id: format!("id-{reference}"),
        repo_tags: vec![reference.into()],
        size_bytes: 7,
        managed,
        in_use,
        ..Default::default()
    }
}

fn pulls(actions: &[Action]) -> Vec<(String, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Pull { node, image, .. } => Some((node.clone(), image.clone())),
            _ => None,
        })
        .collect()
}

fn removes(actions: &[Action]) -> Vec<(String, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Remove { node, image } => Some((node.clone(), image.clone())),
            _ => None,
        })
        .collect()
}

fn p(node: &str, image: &str) -> (String, String) {
    (node.into(), image.into())
}

fn selector(k: &str, v: &str) -> LabelSelector {
    LabelSelector {
        match_labels: Some([(k.to_string(), v.to_string())].into()),
        ..Default::default()
    }
}

#[test]
fn missing_images_are_pulled_on_selected_nodes_only() {
    let mut c = cache("ns/c", &["r/a:1", "r/b:1"]);
    c.selector = Some(selector("cache", "yes"));
    let nodes = [
        node("n1", &[("cache", "yes")], &["r/a:1"]),
        node("n2", &[], &[]),
    ];
    assert_eq!(pulls(&actions(&[c], &nodes)), [p("n1", "r/b:1")]);
}

#[test]
fn no_targeting_means_every_node_and_names_and_labels_must_both_match() {
    let nodes = [
        node("n1", &[("x", "1")], &[]),
        node("n2", &[("x", "1")], &[]),
    ];
    let all = cache("ns/c", &["r/a:1"]);
    assert_eq!(pulls(&actions(std::slice::from_ref(&all), &nodes)).len(), 2);
    let mut both = all;
    both.selector = Some(selector("x", "1"));
    both.node_names = Some(vec!["n2".into()]);
    assert_eq!(pulls(&actions(&[both], &nodes)), [p("n2", "r/a:1")]);
}

#[test]
fn match_expressions_follow_kubernetes_semantics() {
    let labels: BTreeMap<String, String> = [("zone".to_string(), "a".to_string())].into();
    let req = |op: &str, values: &[&str]| LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "zone".into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        }]),
        ..Default::default()
    };
    assert!(selector_matches(&req("In", &["a", "b"]), &labels));
    assert!(!selector_matches(&req("NotIn", &["a"]), &labels));
    assert!(selector_matches(&req("Exists", &[]), &labels));
    assert!(!selector_matches(&req("DoesNotExist", &[]), &labels));
    assert!(!selector_matches(&req("Bogus", &[]), &labels));
}

#[test]
fn pulls_under_way_or_backing_off_are_not_sent_again() {
    let c = cache("ns/c", &["r/a:1", "r/b:1", "r/c:1"]);
    let mut n = node("n1", &[], &[]);
    let a = n.agent.as_mut().unwrap();
    a.pulling.insert("r/a:1".into());
    let fail = |due| Failure {
        reason: "AuthFailed".into(),
        message: "401".into(),
        attempts: 1,
        retry_due: due,
    };
    a.failures.insert("r/b:1".into(), fail(false));
    a.failures.insert("r/c:1".into(), fail(true));
    assert_eq!(pulls(&actions(&[c], &[n])), [p("n1", "r/c:1")]);
}

#[test]
fn an_image_two_caches_want_is_pulled_once() {
    let nodes = [node("n1", &[], &[])];
    let a = pulls(&actions(
        &[cache("ns/a", &["r/x:1"]), cache("ns/b", &["r/x:1"])],
        &nodes,
    ));
    assert_eq!(a, [p("n1", "r/x:1")]);
}

#[test]
fn rollout_limits_bound_nodes_and_pulls_per_node() {
    let mut c = cache("ns/c", &["r/a:1", "r/b:1", "r/c:1"]);
    c.max_concurrent_nodes = Some(2);
    c.max_pulls_per_node = 1;
    let nodes = [
        node("n1", &[], &[]),
        node("n2", &[], &[]),
        node("n3", &[], &[]),
    ];
    assert_eq!(
        pulls(&actions(&[c.clone()], &nodes)),
        [p("n1", "r/a:1"), p("n2", "r/a:1")]
    );
    // n1 is busy with one pull: it gets no second, and n3 waits for a free slot.
    let mut busy = nodes.clone();
    busy[0]
        .agent
        .as_mut()
        .unwrap()
        .pulling
        .insert("r/a:1".into());
    assert_eq!(pulls(&actions(&[c], &busy)), [p("n2", "r/a:1")]);
}

#[test]
fn paused_and_disconnected_get_no_pulls() {
    let mut paused = cache("ns/c", &["r/a:1"]);
    paused.paused = true;
    let mut gone = node("n2", &[], &[]);
    gone.agent.as_mut().unwrap().connected = false;
    let nodes = [node("n1", &[], &[]), gone];
    assert!(actions(&[paused], &nodes).is_empty());
    assert_eq!(
        pulls(&actions(&[cache("ns/c", &["r/a:1"])], &nodes)),
        [p("n1", "r/a:1")]
    );
}

#[test]
fn deselected_nodes_lose_the_images_only_with_remove_from_nodes() {
    let nodes = [
        node("n1", &[], &["r/a:1"]),
        node("n2", &[("cache", "yes")], &["r/a:1"]),
    ];
    let mut c = cache("ns/c", &["r/a:1"]);
    c.selector = Some(selector("cache", "yes"));
    assert!(
        removes(&actions(&[c.clone()], &nodes)).is_empty(),
        "Retain keeps them"
    );
    c.deletion = DeletionPolicy::RemoveFromNodes;
    assert_eq!(removes(&actions(&[c], &nodes)), [p("n1", "r/a:1")]);
}

#[test]
fn removal_spares_images_in_use_not_pulled_by_berth_or_wanted_by_another_cache() {
    let mut n = node("n1", &[], &[]);
    let a = n.agent.as_mut().unwrap();
    a.images = vec![
        image("r/used:1", true, true),
        image("r/theirs:1", false, false),
        image("r/shared:1", true, false),
        image("r/mine:1", true, false),
    ]
    .into();
    let mut deleting = cache(
        "ns/old",
        &["r/used:1", "r/theirs:1", "r/shared:1", "r/mine:1"],
    );
    deleting.deleting = true;
    deleting.deletion = DeletionPolicy::RemoveFromNodes;
    let other = cache("ns/other", &["r/shared:1"]);
    let caches = [deleting.clone(), other];
    assert_eq!(
        removes(&actions(&caches, &[n.clone()])),
        [p("n1", "r/mine:1")]
    );
    assert!(!deletion_done(&deleting, &caches, &[n.clone()]));
    n.agent
        .as_mut()
        .unwrap()
        .images
        .make_mut()
        .retain(|i| i.repo_tags[0] != "r/mine:1");
    assert!(deletion_done(&deleting, &caches, &[n]));
}

#[test]
fn images_dropped_from_the_spec_are_removed_and_removals_are_not_repeated() {
    let mut c = cache("ns/c", &["r/a:1"]);
    c.forgotten = vec!["r/old:1".into()];
    c.deletion = DeletionPolicy::RemoveFromNodes;
    let mut n = node("n1", &[], &["r/a:1", "r/old:1"]);
    assert_eq!(
        removes(&actions(&[c.clone()], &[n.clone()])),
        [p("n1", "r/old:1")]
    );
    n.agent.as_mut().unwrap().removing.insert("r/old:1".into());
    assert!(actions(&[c], &[n]).is_empty());
}

#[test]
fn status_counts_each_node_once_in_its_worst_state() {
    let c = cache("ns/c", &["r/a:1", "r/b:1"]);
    let ready = node("n1", &[], &["r/a:1", "r/b:1"]);
    let mut pulling = node("n2", &[], &["r/a:1"]);
    pulling
        .agent
        .as_mut()
        .unwrap()
        .pulling
        .insert("r/b:1".into());
    let mut failed = node("n3", &[], &[]);
    failed.agent.as_mut().unwrap().failures.insert(
        "r/a:1".into(),
        Failure {
            reason: "AuthFailed".into(),
            message: "401 Unauthorized".into(),
            attempts: 3,
            retry_due: false,
        },
    );
    let pending = node("n4", &[], &[]);
    let unknown = NodeView {
        name: "n5".into(),
        ..Default::default()
    };
    let s = status(&c, &[ready, pulling, failed, pending, unknown]);
    assert_eq!(
        s.nodes,
        NodeCounts {
            target: 5,
            ready: 1,
            pulling: 1,
            pending: 1,
            failed: 1,
            unknown: 1
        }
    );
    assert_eq!(s.images[0].ready_nodes, 2);
    assert_eq!(s.images[0].image_id.as_deref(), Some("id-r/a:1"));
    assert_eq!(s.images[0].failure_reasons["AuthFailed"], 1);
    assert_eq!(s.images[0].failed_nodes_sample[0].node, "n3");
    assert_eq!(s.top_reason.as_deref(), Some("AuthFailed"));
}

#[test]
fn the_failed_node_sample_is_bounded() {
    let c = cache("ns/c", &["r/a:1"]);
    let nodes: Vec<NodeView> = (0..50)
        .map(|i| {
            let mut n = node(&format!("n{i:02}"), &[], &[]);
            n.agent.as_mut().unwrap().failures.insert(
                "r/a:1".into(),
                Failure {
                    reason: "RegistryUnreachable".into(),
                    message: "x".repeat(2000),
                    attempts: 1,
                    retry_due: false,
                },
            );
            n
        })
        .collect();
    let s = status(&c, &nodes);
    assert_eq!(s.images[0].failed_nodes, 50);
    assert_eq!(s.images[0].failed_nodes_sample.len(), FAILED_SAMPLE);
    assert!(s.images[0].failed_nodes_sample[0].message.len() <= 512);
}

#[test]
fn a_pull_carries_the_size_another_node_reports_for_the_disk_guard() {
    let mut just_pulled = node("n0", &[], &["r/a:1"]);
    just_pulled.agent.as_mut().unwrap().images.make_mut()[0].size_bytes = 0;
    let nodes = [
        node("n1", &[], &["r/a:1"]),
        node("n2", &[], &[]),
        just_pulled,
    ];
    match &actions(&[cache("ns/c", &["r/a:1"])], &nodes)[..] {
        [
            Action::Pull {
                node,
                expected_size,
                ..
            },
        ] => assert_eq!((node.as_str(), *expected_size), ("n2", 7)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_tracked_tag_is_pulled_again_when_it_points_to_a_new_digest() {
    let mut c = cache("ns/c", &["r/a:1"]);
    let mut n = node("n1", &[], &[]);
    let mut img = image("r/a:1", true, false);
    img.repo_digests = vec!["r/a@sha256:old".into()];
    n.agent.as_mut().unwrap().images = vec![img].into();
    c.images[0].pin = Some("r/a@sha256:old".into());
    assert!(actions(std::slice::from_ref(&c), std::slice::from_ref(&n)).is_empty());
    assert_eq!(status(&c, std::slice::from_ref(&n)).nodes.ready, 1);
    c.images[0].pin = Some("r/a@sha256:new".into());
    assert_eq!(
        pulls(&actions(std::slice::from_ref(&c), std::slice::from_ref(&n))),
        [p("n1", "r/a:1")]
    );
    let s = status(&c, &[n]);
    assert_eq!(
        (s.nodes.ready, s.images[0].digest.as_deref()),
        (0, Some("sha256:new"))
    );
}

#[test]
fn a_tag_beside_a_digest_is_pulled_by_digest_and_held_once_the_runtime_reports_the_digest() {
    use crate::imagecache::crd::{CachedImage, ImageCache, ImageCacheSpec};
    let d = format!("sha256:{}", "0123456789abcdef".repeat(4));
    let spec = ImageCacheSpec {
        images: vec![CachedImage {
            reference: format!("r.io/a:1@{d}"),
            pull_timeout: None,
        }],
        ..Default::default()
    };
    let c = crate::imagecache::view::cache_view(
        &ImageCache::new("c", spec),
        &std::collections::HashMap::new(),
    );
    let empty = node("n1", &[], &[]);
    assert_eq!(
        pulls(&actions(std::slice::from_ref(&c), &[empty])),
        [p("n1", &format!("r.io/a@{d}"))]
    );
    // What containerd's CRI reports for an image pulled by digest: no tag.
    let mut n = node("n1", &[], &[]);
    n.agent.as_mut().unwrap().images = vec![pb::Image {
        id: "id-a".into(),
        repo_digests: vec![format!("r.io/a@{d}")],
        size_bytes: 7,
        managed: true,
        ..Default::default()
    }]
    .into();
    assert!(actions(std::slice::from_ref(&c), std::slice::from_ref(&n)).is_empty());
    let s = status(&c, &[n]);
    assert_eq!((s.nodes.ready, s.images[0].ready_nodes), (1, 1));
}

#[test]
fn a_shared_pull_names_every_wanting_cache_so_any_cache_s_credentials_can_serve() {
    let nodes = [node("n1", &[], &[]), node("n2", &[], &[])];
    let mut other = cache("ns-b/b", &["r/x:1"]);
    other.node_names = Some(vec!["n2".into()]);
    let caches = [cache("ns-a/a", &["r/x:1"]), other];
    let lenders: Vec<(String, Vec<String>)> = actions(&caches, &nodes)
        .into_iter()
        .filter_map(|a| match a {
            Action::Pull { node, caches, .. } => Some((node, caches)),
            _ => None,
        })
        .collect();
    assert_eq!(
        lenders,
        [
            ("n1".to_string(), vec!["ns-a/a".to_string()]),
            (
                "n2".to_string(),
                vec!["ns-a/a".to_string(), "ns-b/b".to_string()]
            ),
        ]
    );
}

#[test]
fn a_retried_pull_carries_its_failed_attempts() {
    let mut n = node("n1", &[], &[]);
    n.agent.as_mut().unwrap().failures.insert(
        "r/x:1".into(),
        Failure {
            reason: "AuthFailed".into(),
            message: "401".into(),
            attempts: 3,
            retry_due: true,
        },
    );
    match &actions(&[cache("ns/c", &["r/x:1"])], &[n])[..] {
        [Action::Pull { attempt, .. }] => assert_eq!(*attempt, 3),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_cache_refused_by_the_registry_is_failed_on_its_own_status_while_its_neighbour_is_ready() {
    let nodes = [node("n1", &[], &["r/x:1"])];
    let good = cache("ns-a/a", &["r/x:1"]);
    let mut refused = cache("ns-b/b", &["r/x:1"]);
    refused
        .access
        .insert("r/x:1".into(), Access::Denied("401 Unauthorized".into()));
    let mut unchecked = cache("ns-c/c", &["r/x:1"]);
    unchecked.access.insert("r/x:1".into(), Access::Unverified);
    assert_eq!(status(&good, &nodes).nodes.ready, 1);
    let s = status(&refused, &nodes);
    assert_eq!((s.nodes.ready, s.nodes.failed), (0, 1));
    assert_eq!(s.top_reason.as_deref(), Some("AuthFailed"));
    assert!(s.images[0].failed_nodes_sample[0].message.contains("401"));
    let s = status(&unchecked, &nodes);
    assert_eq!((s.nodes.ready, s.nodes.pending), (0, 1));
}

#[test]
fn a_refused_cache_neither_pulls_nor_lends_its_credentials() {
    let nodes = [node("n1", &[], &[])];
    let mut refused = cache("ns-b/b", &["r/x:1"]);
    refused
        .access
        .insert("r/x:1".into(), Access::Denied("401".into()));
    assert!(actions(std::slice::from_ref(&refused), &nodes).is_empty());
    match &actions(&[refused, cache("ns-a/a", &["r/x:1"])], &nodes)[..] {
        [Action::Pull { caches, .. }] => assert_eq!(caches, &["ns-a/a".to_string()]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn selectors_are_described_as_kubectl_writes_them() {
    let s = LabelSelector {
        match_labels: Some([("pool".to_string(), "gpu".to_string())].into()),
        match_expressions: Some(vec![
            LabelSelectorRequirement {
                key: "zone".into(),
                operator: "In".into(),
                values: Some(vec!["a".into(), "b".into()]),
            },
            LabelSelectorRequirement {
                key: "spot".into(),
                operator: "DoesNotExist".into(),
                values: None,
            },
        ]),
    };
    assert_eq!(describe_selector(&s), "pool=gpu,zone in (a,b),!spot");
    let mut c = cache("ns/c", &[]);
    assert_eq!(c.describe_targets(), "every node");
    c.selector = Some(s);
    c.node_names = Some(vec!["n1".into()]);
    assert_eq!(
        c.describe_targets(),
        "nodeSelector pool=gpu,zone in (a,b),!spot and nodeNames [n1]"
    );
}

fn removing(key: &str, images: &[&str]) -> CacheView {
    let mut c = cache(key, images);
    c.deletion = DeletionPolicy::RemoveFromNodes;
    c
}

fn away(mut n: NodeView) -> NodeView {
    n.agent.as_mut().unwrap().connected = false;
    n
}

#[test]
fn a_deleted_cache_waits_for_a_node_whose_agent_is_away_and_was_seen_holding_its_image() {
    let nodes = [node("n1", &[], &[]), away(node("n2", &[], &["r/a:1"]))];
    let mut c = removing("ns/c", &["r/a:1"]);
    assert_eq!(holders(&c, &nodes), ["n2"]);
    c.deleting = true;
    let caches = [c.clone()];
    assert_eq!(deletion_waits(&c, &caches, &nodes), ["n2"]);
    // The agent comes back and the image is removed: nothing left to wait for.
    let back = [node("n1", &[], &[]), node("n2", &[], &["r/a:1"])];
    assert_eq!(removes(&actions(&caches, &back)), [p("n2", "r/a:1")]);
    let clean = [node("n1", &[], &[]), node("n2", &[], &[])];
    assert!(deletion_done(&c, &caches, &clean));
}

#[test]
fn the_status_record_keeps_a_deleted_cache_waiting_across_a_coordinator_restart() {
    // After a restart the registry knows nothing of n2; only the record does.
    let unknown = NodeView {
        name: "n2".into(),
        ..Default::default()
    };
    let mut c = removing("ns/c", &["r/a:1"]);
    c.holders = vec!["n2".into(), "gone".into()];
    let nodes = [node("n1", &[], &[]), unknown.clone()];
    assert_eq!(
        holders(&c, &nodes),
        ["n2"],
        "a node that left the cluster drops out"
    );
    c.deleting = true;
    assert_eq!(deletion_waits(&c, std::slice::from_ref(&c), &nodes), ["n2"]);
    // A node that reconnected but has not sent its inventory is not yet known.
    let mut connecting = unknown;
    connecting.agent = Some(AgentView {
        connected: true,
        ..Default::default()
    });
    let nodes = [node("n1", &[], &[]), connecting];
    assert_eq!(deletion_waits(&c, std::slice::from_ref(&c), &nodes), ["n2"]);
}

#[test]
fn a_deleted_cache_waits_for_a_pull_of_its_image_still_under_way() {
    let mut n = node("n1", &[], &[]);
    n.agent.as_mut().unwrap().pulling.insert("r/a:1".into());
    let mut c = removing("ns/c", &["r/a:1"]);
    assert_eq!(holders(&c, std::slice::from_ref(&n)), ["n1"]);
    c.deleting = true;
    assert!(!deletion_done(
        &c,
        std::slice::from_ref(&c),
        std::slice::from_ref(&n)
    ));
    // Another live cache that wants the image keeps it: no wait.
    let caches = [c.clone(), cache("ns/other", &["r/a:1"])];
    assert!(deletion_done(&c, &caches, &[n]));
}

#[test]
fn deleted_nodes_and_retain_caches_do_not_block_deletion() {
    let mut c = removing("ns/c", &["r/a:1"]);
    c.holders = vec!["deleted-node".into()];
    c.deleting = true;
    assert!(deletion_done(
        &c,
        std::slice::from_ref(&c),
        &[node("n1", &[], &[])]
    ));
    let mut retain = cache("ns/r", &["r/a:1"]);
    retain.deleting = true;
    let nodes = [away(node("n2", &[], &["r/a:1"]))];
    assert!(holders(&retain, &nodes).is_empty());
    assert!(deletion_done(
        &retain,
        std::slice::from_ref(&retain),
        &nodes
    ));
}

#[test]
fn a_reconnected_agent_gets_no_pulls_before_its_inventory_says_what_it_holds() {
    let mut n = node("n1", &[], &[]);
    n.agent.as_mut().unwrap().reported = false;
    assert!(actions(&[cache("ns/c", &["r/a:1"])], &[n]).is_empty());
}

#[test]
fn a_refused_cache_keeps_the_node_s_own_failed_attempts_in_its_detail() {
    let mut n = node("n2", &[], &[]);
    n.agent.as_mut().unwrap().failures.insert(
        "r/x:1".into(),
        Failure {
            reason: "AuthFailed".into(),
            message: "pull access denied".into(),
            attempts: 2,
            retry_due: false,
        },
    );
    let mut refused = cache("ns-b/b", &["r/x:1"]);
    refused
        .access
        .insert("r/x:1".into(), Access::Denied("401".into()));
    match image_state(&refused, &n, &refused.images[0]) {
        ImageOnNode::Failed(f) => assert_eq!(
            (f.reason.as_str(), f.message.as_str(), f.attempts),
            ("AuthFailed", "pull access denied", 2)
        ),
        other => panic!("{other:?}"),
    }
}
