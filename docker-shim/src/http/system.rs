//! `/_ping`, `/version` and `/info`.

use http::{HeaderValue, Method, Response, StatusCode, header};

use super::{Body, Shim, full, json};
use crate::docker::system::{self, Counts};
use crate::error::{ShimError, Subject};

/// `GET|HEAD /_ping`: `OK`, uncached.
pub fn ping(method: &Method) -> Response<Body> {
    let body = if method == Method::HEAD { "" } else { "OK" };
    let mut resp = Response::new(full(body));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store, must-revalidate"),
    );
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

/// `GET /version`.
pub fn version() -> Response<Body> {
    json(StatusCode::OK, &system::version())
}

/// `GET /info`, with the namespace's container counts from the coordinator.
pub async fn info(shim: &Shim) -> Result<Response<Body>, ShimError> {
    let list = shim
        .coordinator
        .containers
        .clone()
        .list(berth_proto::api::ListContainersRequest {
            namespace: shim.coordinator.namespace.clone(),
            all: true,
            ..Default::default()
        })
        .await
        .map_err(|s| ShimError::grpc(Subject::Other, s))?
        .into_inner();
    let mut counts = Counts::default();
    for c in &list.containers {
        match c.state.as_ref().map(|s| s.status.as_str()) {
            Some("running") => counts.running += 1,
            Some("paused") => counts.paused += 1,
            _ => counts.stopped += 1,
        }
    }
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    let v = system::info(&shim.identity, counts, ncpu, system::host_mem_total());
    Ok(json(StatusCode::OK, &v))
}
