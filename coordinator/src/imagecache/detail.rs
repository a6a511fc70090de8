//! Per-node detail of a cache for `berth.v1.Inventory/GetImageCache`: a pure
//! function of the planner's views, published by the controller into
//! [`crate::domain::CacheDetails`].

use super::plan::{CacheView, NodeView};
use crate::domain::{ImageDetail, NodeDetail};

/// Per-node detail of one cache, one entry per selected node in `nodes` order.
pub fn node_details(v: &CacheView, nodes: &[NodeView]) -> Vec<NodeDetail> {
    nodes
        .iter()
        .filter(|n| v.targets(n))
        .map(|n| NodeDetail {
            node: n.name.clone(),
            images: v
                .images
                .iter()
                .map(|i| {
                    let r = &i.reference;
                    let mut d = ImageDetail {
                        reference: r.clone(),
                        ..Default::default()
                    };
                    d.state = match n.agent.as_ref().filter(|a| a.connected) {
                        None => "Unknown".into(),
                        Some(a) if a.holds(r).is_some() => "Ready".into(),
                        Some(a) => match a.failures.get(r) {
                            Some(f) => {
                                d.reason = f.reason.clone();
                                d.message = f.message.clone();
                                d.attempts = f.attempts;
                                "Failed".into()
                            }
                            None if a.pulling.contains(r) => "Pulling".into(),
                            None => "Pending".into(),
                        },
                    };
                    d
                })
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests;
