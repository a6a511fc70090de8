//! Which read each guarded method needs. A method without a rule is refused,
//! so a method added to a guarded service stays closed until it gets one.

use berth_proto::api as pb;
use prost::Message;

use super::{AccessError, ResourceAccess};

/// What one method requires.
#[derive(Debug, Clone)]
pub enum Rule {
    /// The same access for every call.
    Fixed(ResourceAccess),
    /// An access that depends on the request (its namespace or object),
    /// read from the call's first message.
    FromMessage(fn(&[u8]) -> Result<ResourceAccess, AccessError>),
}

/// Maps a method path (`/package.Service/Method`) to its rule.
pub type Policy = fn(&str) -> Option<Rule>;

/// Core `nodes`.
fn nodes(verb: &'static str, name: Option<String>) -> ResourceAccess {
    ResourceAccess {
        verb,
        group: "",
        resource: "nodes",
        namespace: None,
        name,
    }
}

fn decode<M: Message + Default>(message: &[u8], method: &str) -> Result<M, AccessError> {
    M::decode(message)
        .map_err(|e| AccessError::BadRequest(format!("{method}: undecodable request: {e}")))
}

fn list_node_images(message: &[u8]) -> Result<ResourceAccess, AccessError> {
    let r: pb::ListNodeImagesRequest = decode(message, "ListNodeImages")?;
    if r.node.is_empty() {
        return Err(AccessError::BadRequest("node is required".into()));
    }
    Ok(nodes("get", Some(r.node)))
}

fn get_image_cache(message: &[u8]) -> Result<ResourceAccess, AccessError> {
    let r: pb::GetImageCacheRequest = decode(message, "GetImageCache")?;
    if r.namespace.is_empty() || r.name.is_empty() {
        return Err(AccessError::BadRequest(
            "namespace and name are required".into(),
        ));
    }
    Ok(ResourceAccess {
        verb: "get",
        group: "berth.dev",
        resource: "imagecaches",
        namespace: Some(r.namespace),
        name: Some(r.name),
    })
}

/// `berth.v1.Inventory`: listing nodes needs `list nodes`; one node's images
/// need `get` on that node; a cache's per-node detail needs `get` on that
/// ImageCache in its namespace.
pub fn inventory(path: &str) -> Option<Rule> {
    match path {
        "/berth.v1.Inventory/ListNodes" => Some(Rule::Fixed(nodes("list", None))),
        "/berth.v1.Inventory/ListNodeImages" => Some(Rule::FromMessage(list_node_images)),
        "/berth.v1.Inventory/GetImageCache" => Some(Rule::FromMessage(get_image_cache)),
        _ => None,
    }
}
