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
    /// Several accesses, all required, read from the call's first message
    /// (a call that makes more than one kind of object).
    FromMessageAll(fn(&[u8]) -> Result<Vec<ResourceAccess>, AccessError>),
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

/// Core `pods` (or a subresource, `pods/log`) in a request's namespace.
fn pods(
    verb: &'static str,
    resource: &'static str,
    namespace: String,
) -> Result<ResourceAccess, AccessError> {
    if namespace.is_empty() {
        return Err(AccessError::BadRequest("namespace is required".into()));
    }
    Ok(ResourceAccess {
        verb,
        group: "",
        resource,
        namespace: Some(namespace),
        name: None,
    })
}

fn exec(message: &[u8]) -> Result<ResourceAccess, AccessError> {
    let input: pb::ExecInput = decode(message, "Exec")?;
    match input.kind {
        Some(pb::exec_input::Kind::Start(s)) => pods("create", "pods/exec", s.namespace),
        _ => Err(AccessError::BadRequest(
            "Exec: the first message must be an ExecStart".into(),
        )),
    }
}

/// Creating a container makes a pod, and Services for its names when it
/// joins a network or publishes a port.
fn create_container(message: &[u8]) -> Result<Vec<ResourceAccess>, AccessError> {
    let r: pb::CreateContainerRequest = decode(message, "Create")?;
    let networked = r
        .spec
        .as_ref()
        .is_some_and(|s| !s.networks.is_empty() || !s.aliases.is_empty() || !s.ports.is_empty());
    let mut needs = vec![pods("create", "pods", r.namespace.clone())?];
    if networked {
        needs.push(pods("create", "services", r.namespace)?);
    }
    Ok(needs)
}

fn stdin(message: &[u8]) -> Result<ResourceAccess, AccessError> {
    let input: pb::StdinInput = decode(message, "Stdin")?;
    match input.kind {
        Some(pb::stdin_input::Kind::Open(o)) => pods("create", "pods/attach", o.namespace),
        _ => Err(AccessError::BadRequest(
            "Stdin: the first message must be a StdinOpen".into(),
        )),
    }
}

fn tunnel(message: &[u8]) -> Result<ResourceAccess, AccessError> {
    let input: pb::TunnelInput = decode(message, "Tunnel")?;
    match input.kind {
        Some(pb::tunnel_input::Kind::Open(o)) => pods("create", "pods/portforward", o.namespace),
        _ => Err(AccessError::BadRequest(
            "Tunnel: the first message must be a TunnelOpen".into(),
        )),
    }
}

/// A rule reading the namespace of a request of type `M`.
macro_rules! in_namespace {
    ($verb:literal, $message:ty, $method:literal) => {
        in_namespace!($verb, "pods", $message, $method)
    };
    ($verb:literal, $resource:literal, $message:ty, $method:literal) => {
        Rule::FromMessage(|m| pods($verb, $resource, decode::<$message>(m, $method)?.namespace))
    };
}

/// A rule reading the namespace of a request of type `M` that needs every
/// one of several `(verb, resource)` accesses there.
macro_rules! in_namespace_all {
    ($message:ty, $method:literal, [$(($verb:literal, $resource:literal)),+]) => {
        Rule::FromMessageAll(|m| {
            let ns = decode::<$message>(m, $method)?.namespace;
            Ok(vec![$(pods($verb, $resource, ns.clone())?),+])
        })
    };
}

/// `berth.v1.Containers` and `berth.v1.Images`: the caller needs, on pods in
/// the request's namespace, what the call does through Berth — `create` to
/// create or start a container (Berth makes a pod), `delete` to stop, kill
/// or remove one, `get` to inspect or wait on one, `get pods/log` to read
/// its logs, `create pods/exec` to run a command in it, `create pods/attach`
/// to write its stdin, `create pods/portforward` to reach one of its ports, `list` to list them
/// or read images; holding a session needs `create`. `berth.v1.Networks`
/// needs the matching verb on Services (a network's names are Services), and
/// so does creating a container on a network. Berth acts with its own rights
/// only after that check.
pub fn containers(path: &str) -> Option<Rule> {
    let rule = match path {
        "/berth.v1.Containers/Create" => Rule::FromMessageAll(create_container),
        "/berth.v1.Containers/Start" => in_namespace!("create", pb::ContainerRequest, "Start"),
        "/berth.v1.Containers/Stop" => in_namespace!("delete", pb::StopContainerRequest, "Stop"),
        "/berth.v1.Containers/Kill" => in_namespace!("delete", pb::ContainerRequest, "Kill"),
        "/berth.v1.Containers/Remove" => {
            in_namespace!("delete", pb::RemoveContainerRequest, "Remove")
        }
        "/berth.v1.Containers/Inspect" => in_namespace!("get", pb::ContainerRequest, "Inspect"),
        "/berth.v1.Containers/List" => in_namespace!("list", pb::ListContainersRequest, "List"),
        "/berth.v1.Containers/Wait" => in_namespace!("get", pb::WaitContainerRequest, "Wait"),
        "/berth.v1.Containers/Logs" => {
            in_namespace!("get", "pods/log", pb::ContainerLogsRequest, "Logs")
        }
        "/berth.v1.Containers/Exec" => Rule::FromMessage(exec),
        "/berth.v1.Containers/Tunnel" => Rule::FromMessage(tunnel),
        "/berth.v1.Containers/Stdin" => Rule::FromMessage(stdin),
        "/berth.v1.Containers/Upload" => in_namespace!("create", pb::UploadRequest, "Upload"),
        "/berth.v1.Containers/Session" => in_namespace!("create", pb::SessionRequest, "Session"),
        "/berth.v1.Containers/Events" => in_namespace!("list", pb::EventsRequest, "Events"),
        // Removes containers and the Services of their names.
        "/berth.v1.Containers/PruneEnded" => in_namespace_all!(
            pb::PruneRequest,
            "PruneEnded",
            [("delete", "pods"), ("delete", "services")]
        ),
        "/berth.v1.Images/Pull" => in_namespace!("list", pb::ImageRequest, "Pull"),
        "/berth.v1.Images/Inspect" => in_namespace!("list", pb::ImageRequest, "Inspect"),
        "/berth.v1.Networks/Create" => {
            in_namespace!("create", "services", pb::CreateNetworkRequest, "Create")
        }
        // A network's answer names its containers and their addresses.
        "/berth.v1.Networks/Inspect" => in_namespace_all!(
            pb::NetworkRequest,
            "Inspect",
            [("get", "services"), ("list", "pods")]
        ),
        "/berth.v1.Networks/List" => in_namespace_all!(
            pb::ListNetworksRequest,
            "List",
            [("list", "services"), ("list", "pods")]
        ),
        "/berth.v1.Networks/Remove" => {
            in_namespace!("delete", "services", pb::NetworkRequest, "Remove")
        }
        // Connecting changes the container's future pods too.
        "/berth.v1.Networks/ConnectContainer" => in_namespace_all!(
            pb::ConnectRequest,
            "ConnectContainer",
            [("create", "services"), ("create", "pods")]
        ),
        "/berth.v1.Networks/DisconnectContainer" => in_namespace_all!(
            pb::ConnectRequest,
            "DisconnectContainer",
            [("delete", "services"), ("create", "pods")]
        ),
        _ => return None,
    };
    Some(rule)
}

/// Every guarded service of the public API.
pub fn public(path: &str) -> Option<Rule> {
    inventory(path).or_else(|| containers(path))
}
