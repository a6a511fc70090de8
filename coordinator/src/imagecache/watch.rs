//! The controller's mirrors of the apiserver: reflector stores of ImageCaches
//! and Nodes that wake the planning loop only for events that can change a
//! plan ([`is_news`]), so passes do not grow with Node status heartbeats.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use tracing::warn;

/// Keeps every object of kind `K` in a store, waking `wake` when an object
/// comes or goes or its `relevant` fingerprint changes (for Nodes, their
/// labels: a Node's status heartbeats change no plan).
pub fn mirror<K>(
    client: &kube::Client,
    wake: Arc<tokio::sync::Notify>,
    relevant: fn(&K) -> u64,
) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let kind = K::kind(&());
    let mut seen = HashMap::new();
    tokio::spawn(
        watcher(Api::<K>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .reflect(writer)
            .for_each(move |e| {
                match e {
                    Ok(e) => {
                        if is_news(&mut seen, &e, relevant) {
                            wake.notify_one();
                        }
                    }
                    Err(e) => warn!(error = %e, "{kind} watch failed; retrying"),
                }
                futures::future::ready(())
            }),
    );
    store
}

/// Whether a watch event can change a plan: an object came or went, its
/// `relevant` fingerprint changed, or the watch restarted. `seen` holds the
/// fingerprint of every object by namespace and name.
fn is_news<K: Resource>(
    seen: &mut HashMap<String, u64>,
    event: &watcher::Event<K>,
    relevant: fn(&K) -> u64,
) -> bool {
    let id = |o: &K| format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any());
    match event {
        watcher::Event::Apply(o) | watcher::Event::InitApply(o) => {
            seen.insert(id(o), relevant(o)) != Some(relevant(o))
        }
        watcher::Event::Delete(o) => {
            seen.remove(&id(o));
            true
        }
        watcher::Event::Init | watcher::Event::InitDone => true,
    }
}

/// Every change of an object is relevant.
pub fn any_change<K: Resource>(o: &K) -> u64 {
    fingerprint_of(&o.resource_version())
}

/// Only a Node's labels (and its coming and going) change a plan.
pub fn node_labels(n: &Node) -> u64 {
    fingerprint_of(n.labels())
}

fn fingerprint_of(v: &impl std::hash::Hash) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imagecache::crd::ImageCache;

    fn node(name: &str, labels: &[(&str, &str)], rv: &str) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        n.metadata.resource_version = Some(rv.into());
        n.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        n
    }

    #[test]
    fn node_status_updates_wake_no_pass_but_label_changes_and_deletions_do() {
        let mut seen = HashMap::new();
        let apply = |n: Node| watcher::Event::Apply(n);
        let mut passes = 0;
        let mut feed = |e: watcher::Event<Node>, seen: &mut HashMap<String, u64>| {
            if is_news(seen, &e, node_labels) {
                passes += 1;
            }
        };
        feed(
            watcher::Event::InitApply(node("n1", &[("pool", "a")], "1")),
            &mut seen,
        );
        for rv in 2..100 {
            feed(
                apply(node("n1", &[("pool", "a")], &rv.to_string())),
                &mut seen,
            );
        }
        feed(apply(node("n1", &[("pool", "b")], "100")), &mut seen);
        feed(
            watcher::Event::Delete(node("n1", &[("pool", "b")], "101")),
            &mut seen,
        );
        assert_eq!(passes, 3, "first sight, relabel, deletion");
    }

    #[test]
    fn every_image_cache_change_wakes_a_pass() {
        let mut seen = HashMap::new();
        let mut c = ImageCache::new("c", Default::default());
        c.metadata.namespace = Some("ns".into());
        let news = (1..=3)
            .filter(|rv| {
                c.metadata.resource_version = Some(rv.to_string());
                is_news(&mut seen, &watcher::Event::Apply(c.clone()), any_change)
            })
            .count();
        assert_eq!(news, 3);
    }
}
