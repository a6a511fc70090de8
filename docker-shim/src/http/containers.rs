//! Container lifecycle: create, list, inspect, start, stop, kill, restart,
//! wait and remove, each a call (or two) on `berth.v1.Containers`.

use std::time::SystemTime;

use berth_proto::api::{
    ContainerInfo, ContainerRequest, CreateContainerRequest, ListContainersRequest, PortBinding,
    RemoveContainerRequest, StopContainerRequest, WaitContainerRequest,
};
use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderValue, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use serde_json::json;

use super::{Body, Query, Shim, empty, json};
use crate::docker::{container, create, filters, options};
use crate::error::{ShimError, Subject};

fn on(id: &str) -> impl Fn(tonic::Status) -> ShimError + '_ {
    move |s| ShimError::grpc(Subject::Container(id.to_string()), s)
}

fn req(shim: &Shim, id: &str) -> ContainerRequest {
    ContainerRequest {
        namespace: shim.coordinator.namespace.clone(),
        id: id.to_string(),
    }
}

/// The container `id` as the coordinator sees it.
pub(super) async fn fetch(shim: &Shim, id: &str) -> Result<ContainerInfo, ShimError> {
    Ok(shim
        .coordinator
        .containers
        .clone()
        .inspect(req(shim, id))
        .await
        .map_err(on(id))?
        .into_inner())
}

pub(super) fn is_running(info: &ContainerInfo) -> bool {
    info.state.as_ref().is_some_and(|s| s.running)
}

/// Picks a free local port for each published port the client left to the
/// shim (host port 0), so inspect shows where the port is.
pub(super) fn choose_host_ports(ports: &mut [PortBinding]) -> Result<(), ShimError> {
    for p in ports.iter_mut().filter(|p| p.host_port == 0) {
        let port = if p.protocol == "udp" {
            std::net::UdpSocket::bind(("127.0.0.1", 0)).and_then(|s| s.local_addr())
        } else {
            std::net::TcpListener::bind(("127.0.0.1", 0)).and_then(|s| s.local_addr())
        }
        .map_err(|e| ShimError::Internal(format!("cannot find a free host port: {e}")))?
        .port();
        p.host_port = u32::from(port);
    }
    Ok(())
}

/// `POST /containers/create?name=`: `Containers.Create` → 201 `{"Id", "Warnings"}`.
pub async fn create(shim: &Shim, query: &Query, body: &Bytes) -> Result<Response<Body>, ShimError> {
    let bad = |e: create::CreateError| ShimError::BadRequest(e.to_string());
    let parsed = create::parse(body).map_err(bad)?;
    if crate::ryuk::is_ryuk_image(&parsed.image) {
        return super::ryuk::create(shim, query.get("name").unwrap_or(""), &parsed);
    }
    let mut spec = create::to_spec(query.get("name").unwrap_or(""), &parsed).map_err(bad)?;
    options::apply(&shim.pod_defaults, &mut spec).map_err(ShimError::BadRequest)?;
    choose_host_ports(&mut spec.ports)?;
    let image = spec.image.clone();
    let name = spec.name.clone();
    let info = shim
        .coordinator
        .containers
        .clone()
        .create(CreateContainerRequest {
            namespace: shim.coordinator.namespace.clone(),
            spec: Some(spec),
        })
        .await
        .map_err(|s| {
            // A 404 here names what is missing (a network, the namespace)
            // in the coordinator's words; a clash of names is a 409.
            let subject = if s.code() == tonic::Code::NotFound {
                Subject::Other
            } else {
                Subject::Container(name.clone())
            };
            ShimError::grpc(subject, s)
        })?
        .into_inner();
    tracing::info!(id = %info.id, name = %info.name, image = %image, "created");
    Ok(json(
        StatusCode::CREATED,
        &json!({"Id": info.id, "Warnings": []}),
    ))
}

/// `GET /containers/json?all=&filters=&limit=`.
pub async fn list(shim: &Shim, query: &Query) -> Result<Response<Body>, ShimError> {
    let f = filters::parse(query.get("filters").unwrap_or("")).map_err(ShimError::BadRequest)?;
    let limit = query.int("limit")?.filter(|n| *n > 0);
    let answer = shim
        .coordinator
        .containers
        .clone()
        .list(ListContainersRequest {
            namespace: shim.coordinator.namespace.clone(),
            all: query.flag("all") || limit.is_some(),
            label_filters: f.labels.clone(),
            status_filters: f.statuses.clone(),
            name_filters: f.names.clone(),
            id_filters: f.ids.clone(),
        })
        .await
        .map_err(|s| ShimError::grpc(Subject::Other, s))?
        .into_inner();
    let now = SystemTime::now();
    let mut out: Vec<serde_json::Value> = answer
        .containers
        .iter()
        .filter(|c| {
            f.exited.is_empty()
                || c.state
                    .as_ref()
                    .is_some_and(|s| s.status == "exited" && f.exited.contains(&s.exit_code))
        })
        .map(|c| container::summary(c, now))
        .collect();
    // testcontainers finds its Ryuk by listing too.
    let all = query.flag("all") || limit.is_some();
    out.extend(
        shim.reapers
            .all()
            .iter()
            .filter(|r| filters::matches(&f, all, r))
            .map(|r| container::summary(r, now)),
    );
    if let Some(n) = limit {
        out.truncate(usize::try_from(n).unwrap_or(usize::MAX));
    }
    Ok(json(StatusCode::OK, &serde_json::Value::Array(out)))
}

/// `GET /containers/{id}/json`.
pub async fn inspect(shim: &Shim, id: &str) -> Result<Response<Body>, ShimError> {
    let info = fetch(shim, id).await?;
    Ok(json(StatusCode::OK, &container::inspect(&info)))
}

/// `POST /containers/{id}/start`: 204, or 304 if it already runs.
pub async fn start(shim: &Shim, id: &str) -> Result<Response<Body>, ShimError> {
    if is_running(&fetch(shim, id).await?) {
        return Err(ShimError::NotModified);
    }
    let info = shim
        .coordinator
        .containers
        .clone()
        .start(req(shim, id))
        .await
        .map_err(on(id))?
        .into_inner();
    tracing::info!(id = %info.id, pod = %info.pod_name, "started");
    shim.forwards.open_for(&shim.coordinator, &info).await;
    Ok(empty(StatusCode::NO_CONTENT))
}

/// The `t` of stop and restart: seconds, or -1 for the container's own.
fn stop_timeout(query: &Query) -> Result<i32, ShimError> {
    if query
        .get("signal")
        .is_some_and(|s| !matches!(s, "" | "SIGTERM" | "TERM" | "15"))
    {
        return Err(ShimError::BadRequest(
            "Berth stops containers with SIGTERM only; leave out the signal".into(),
        ));
    }
    Ok(match query.int("t")? {
        None => -1,
        Some(t) => i32::try_from(t).unwrap_or(i32::MAX),
    })
}

async fn stop_call(shim: &Shim, id: &str, timeout: i32) -> Result<(), ShimError> {
    shim.coordinator
        .containers
        .clone()
        .stop(StopContainerRequest {
            namespace: shim.coordinator.namespace.clone(),
            id: id.to_string(),
            timeout_seconds: timeout,
        })
        .await
        .map_err(on(id))?;
    Ok(())
}

/// `POST /containers/{id}/stop?t=`: 204, or 304 if it is not running.
pub async fn stop(shim: &Shim, id: &str, query: &Query) -> Result<Response<Body>, ShimError> {
    let timeout = stop_timeout(query)?;
    if !is_running(&fetch(shim, id).await?) {
        return Err(ShimError::NotModified);
    }
    stop_call(shim, id, timeout).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}

/// `POST /containers/{id}/kill?signal=`: SIGKILL only; 409 if not running.
pub async fn kill(shim: &Shim, id: &str, query: &Query) -> Result<Response<Body>, ShimError> {
    let signal = query.get("signal").unwrap_or("");
    if !matches!(signal, "" | "KILL" | "SIGKILL" | "9") {
        return Err(ShimError::BadRequest(format!(
            "Berth cannot send {signal} to a container: only SIGKILL (kill) or SIGTERM (stop) can reach a pod"
        )));
    }
    if !is_running(&fetch(shim, id).await?) {
        return Err(ShimError::grpc(
            Subject::Container(id.to_string()),
            tonic::Status::failed_precondition(format!(
                "cannot kill container: {id}: container is not running"
            )),
        ));
    }
    shim.coordinator
        .containers
        .clone()
        .kill(req(shim, id))
        .await
        .map_err(on(id))?;
    Ok(empty(StatusCode::NO_CONTENT))
}

/// `POST /containers/{id}/restart?t=`: stop if running, then start.
pub async fn restart(shim: &Shim, id: &str, query: &Query) -> Result<Response<Body>, ShimError> {
    let timeout = stop_timeout(query)?;
    if is_running(&fetch(shim, id).await?) {
        stop_call(shim, id, timeout).await?;
    }
    shim.coordinator
        .containers
        .clone()
        .start(req(shim, id))
        .await
        .map_err(on(id))?;
    Ok(empty(StatusCode::NO_CONTENT))
}

/// `POST /containers/{id}/wait?condition=`: the headers go out at once (so
/// a client may wait before it starts the container), the body when the
/// container reaches the condition: `{"StatusCode": n, "Error": …}`.
pub async fn wait(shim: &Shim, id: &str, query: &Query) -> Result<Response<Body>, ShimError> {
    let condition = query.get("condition").unwrap_or("").to_string();
    if !matches!(
        condition.as_str(),
        "" | "not-running" | "next-exit" | "removed"
    ) {
        return Err(ShimError::BadRequest(format!(
            "invalid condition {condition:?}: want not-running, next-exit or removed"
        )));
    }
    fetch(shim, id).await?;
    let mut client = shim.coordinator.containers.clone();
    let request = WaitContainerRequest {
        namespace: shim.coordinator.namespace.clone(),
        id: id.to_string(),
        condition,
    };
    let id = id.to_string();
    let answer = futures::stream::once(async move {
        let v = match client.wait(request).await {
            Ok(r) => {
                let r = r.into_inner();
                let error = if r.error.is_empty() {
                    json!(null)
                } else {
                    json!({"Message": r.error})
                };
                json!({"StatusCode": r.exit_code, "Error": error})
            }
            Err(s) => {
                let msg = ShimError::grpc(Subject::Container(id), s).message();
                json!({"StatusCode": -1, "Error": {"Message": msg}})
            }
        };
        let mut bytes = serde_json::to_vec(&v).unwrap_or_default();
        bytes.push(b'\n');
        Ok::<_, std::io::Error>(Frame::data(Bytes::from(bytes)))
    });
    let mut resp = Response::new(StreamBody::new(answer.boxed()).boxed_unsync());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// `DELETE /containers/{id}?force=&v=`: `v` has nothing to remove (no
/// volumes); `link` is refused.
pub async fn remove(shim: &Shim, id: &str, query: &Query) -> Result<Response<Body>, ShimError> {
    if query.flag("link") {
        return Err(ShimError::BadRequest(
            "Berth has no container links to remove".into(),
        ));
    }
    let full = fetch(shim, id).await?.id;
    shim.coordinator
        .containers
        .clone()
        .remove(RemoveContainerRequest {
            namespace: shim.coordinator.namespace.clone(),
            id: full.clone(),
            force: query.flag("force"),
        })
        .await
        .map_err(on(id))?;
    shim.forwards.close_for(&full);
    tracing::info!(%id, "removed");
    Ok(empty(StatusCode::NO_CONTENT))
}
