//! Per-node detail of a cache for `berth.v1.Inventory/GetImageCache`: a pure
//! function of the planner's views (each image's state from
//! [`image_state`], the same decision the status counts come from). The
//! controller publishes a [`PassDetail`] per cache into
//! [`crate::domain::CacheDetails`]; the detail is computed when asked.

use std::sync::Arc;

use super::plan::{CacheView, ImageOnNode, NodeView, image_state};
use crate::domain::{DetailSource, ImageDetail, NodeDetail};

/// One cache's view and the node views of the pass that planned it: what
/// the controller publishes, so the detail is computed only when asked.
#[derive(Debug, Clone)]
pub struct PassDetail {
    /// The cache.
    pub view: CacheView,
    /// Every node of the pass, in name order (shared by all caches).
    pub nodes: Arc<Vec<NodeView>>,
}

impl DetailSource for PassDetail {
    fn node_details(&self) -> Vec<NodeDetail> {
        node_details(&self.view, &self.nodes)
    }
}

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
