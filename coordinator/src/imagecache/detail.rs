//! Per-node detail of a cache for `berth.v1.Inventory/GetImageCache`: a pure
//! function of the planner's views (each image's state from
//! [`image_state`], the same decision the status counts come from), published by the controller into
//! [`crate::domain::CacheDetails`].

use super::plan::{CacheView, ImageOnNode, NodeView, image_state};
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
                    let state = image_state(v, n, i);
                    let mut d = ImageDetail {
                        reference: i.reference.clone(),
                        state: state.name().into(),
                        ..Default::default()
                    };
                    if let ImageOnNode::Failed(f) = state {
                        d.reason = f.reason;
                        d.message = f.message;
                        d.attempts = f.attempts;
                    }
                    d
                })
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests;
