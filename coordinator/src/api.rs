//! `berth.v1.Inventory`: the public, read-only view of nodes and their images.
//!
//! It reads the live [`NodeRegistry`] and the caches' per-node detail
//! ([`CacheDetails`]): plain data from [`crate::domain`], no controller and no
//! Kubernetes type.

use std::sync::Arc;
use std::time::SystemTime;

use berth_proto::api as pb;
use berth_proto::api::inventory_server::Inventory;
use tonic::{Request, Response, Status};

use crate::domain::CacheDetails;
use crate::nodes::{NodeRegistry, NodeView};

/// Serves the [`NodeRegistry`] and the caches' per-node detail on `berth.v1.Inventory`.
pub struct InventoryApi {
    registry: Arc<NodeRegistry>,
    details: CacheDetails,
}

impl InventoryApi {
    /// Serves `registry` and `details`.
    pub fn new(registry: Arc<NodeRegistry>, details: CacheDetails) -> Self {
        InventoryApi { registry, details }
    }
}

/// `t` in RFC 3339, UTC, to the millisecond.
fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn node(v: NodeView, include_images: bool) -> pb::Node {
    let inv = v.inventory.unwrap_or_default();
    let images = match include_images {
        true => inv.images.clone(),
        false => vec![],
    };
    pb::Node {
        name: v.name,
        connected: v.connected,
        agent_version: v.hello.agent_version,
        runtime: v.hello.runtime,
        connected_since: rfc3339(v.connected_since),
        last_seen: rfc3339(v.last_seen),
        image_count: inv.images.len() as u32,
        image_fs: inv.image_fs.clone(),
        images,
    }
}

#[tonic::async_trait]
impl Inventory for InventoryApi {
    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let include = request.into_inner().include_images;
        let nodes = self
            .registry
            .list()
            .into_iter()
            .map(|v| node(v, include))
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn list_node_images(
        &self,
        request: Request<pb::ListNodeImagesRequest>,
    ) -> Result<Response<pb::ListNodeImagesResponse>, Status> {
        let name = request.into_inner().node;
        if name.is_empty() {
            return Err(Status::invalid_argument("node is required"));
        }
        let v = self
            .registry
            .get(&name)
            .ok_or_else(|| Status::not_found(format!("no agent has reported node {name:?}")))?;
        let inv = v.inventory.map(Arc::unwrap_or_clone).unwrap_or_default();
        Ok(Response::new(pb::ListNodeImagesResponse {
            node: name,
            images: inv.images,
            image_fs: inv.image_fs,
        }))
    }

    async fn get_image_cache(
        &self,
        request: Request<pb::GetImageCacheRequest>,
    ) -> Result<Response<pb::ImageCacheDetail>, Status> {
        let r = request.into_inner();
        if r.namespace.is_empty() || r.name.is_empty() {
            return Err(Status::invalid_argument("namespace and name are required"));
        }
        let key = format!("{}/{}", r.namespace, r.name);
        let source = self
            .details
            .read()
            .unwrap()
            .get(&key)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no ImageCache {key}")))?;
        let nodes = source
            .node_details()
            .into_iter()
            .map(|n| pb::ImageCacheNode {
                node: n.node,
                images: n
                    .images
                    .into_iter()
                    .map(|i| pb::ImageCacheImage {
                        r#ref: i.reference,
                        state: i.state,
                        reason: i.reason,
                        message: i.message,
                        attempts: i.attempts,
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ImageCacheDetail {
            namespace: r.namespace,
            name: r.name,
            nodes,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_times_are_rfc3339_in_utc() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_500);
        assert_eq!(rfc3339(t), "1970-01-01T00:00:01.500Z");
    }
}
