//! Networks (`berth.v1.Networks`) and volumes. Docker's default `bridge`
//! network is listed and inspectable but holds nothing to connect or remove.
//! Berth has no Docker volumes: the list is empty and each lookup is
//! Docker's 404, which `docker inspect NAME` needs to say "No such object"
//! after trying each kind in turn.

use berth_proto::api::{ConnectRequest, CreateNetworkRequest, NetworkRequest};
use bytes::Bytes;
use http::{Response, StatusCode};
use serde_json::{Value, json};

use super::{Body, Query, Shim, empty, json};
use crate::docker::network;
use crate::error::{ShimError, Subject};

fn on(id: &str) -> impl Fn(tonic::Status) -> ShimError + '_ {
    move |s| ShimError::grpc(Subject::Network(id.to_string()), s)
}

fn builtin(id: &str, what: &str) -> Result<(), ShimError> {
    if network::is_bridge(id) {
        return Err(ShimError::Forbidden(format!(
            "{what} the default bridge network is not possible: every Berth container has its own pod network"
        )));
    }
    Ok(())
}

/// `GET /networks`: the default `bridge`, then Berth's networks.
pub async fn list(shim: &Shim, query: &Query) -> Result<Response<Body>, ShimError> {
    let f = network::parse_filters(
        query.get("filters").unwrap_or(""),
        &shim.coordinator.namespace,
    )
    .map_err(ShimError::BadRequest)?;
    let mut out: Vec<Value> = Vec::new();
    if f.bridge {
        out.push(network::bridge());
    }
    if f.custom {
        let listed = shim
            .coordinator
            .networks
            .clone()
            .list(f.req)
            .await
            .map_err(|s| ShimError::grpc(Subject::Other, s))?
            .into_inner();
        out.extend(listed.networks.iter().map(network::to_docker));
    }
    Ok(json(StatusCode::OK, &Value::Array(out)))
}

/// `GET /networks/{id}`.
pub async fn inspect(shim: &Shim, id: &str) -> Result<Response<Body>, ShimError> {
    if network::is_bridge(id) {
        return Ok(json(StatusCode::OK, &network::bridge()));
    }
    let info = shim
        .coordinator
        .networks
        .clone()
        .inspect(NetworkRequest {
            namespace: shim.coordinator.namespace.clone(),
            id: id.to_string(),
        })
        .await
        .map_err(on(id))?
        .into_inner();
    Ok(json(StatusCode::OK, &network::to_docker(&info)))
}

/// `POST /networks/create` → 201 `{"Id", "Warning"}`.
pub async fn create(shim: &Shim, body: &Bytes) -> Result<Response<Body>, ShimError> {
    let b = network::parse_create(body).map_err(ShimError::BadRequest)?;
    let made = shim
        .coordinator
        .networks
        .clone()
        .create(CreateNetworkRequest {
            namespace: shim.coordinator.namespace.clone(),
            name: b.name.clone(),
            labels: b.labels.into_iter().collect(),
            driver: b.driver,
        })
        .await
        .map_err(on(&b.name))?
        .into_inner();
    Ok(json(
        StatusCode::CREATED,
        &json!({"Id": made.id, "Warning": ""}),
    ))
}

/// `DELETE /networks/{id}` → 204.
pub async fn remove(shim: &Shim, id: &str) -> Result<Response<Body>, ShimError> {
    builtin(id, "removing")?;
    shim.coordinator
        .networks
        .clone()
        .remove(NetworkRequest {
            namespace: shim.coordinator.namespace.clone(),
            id: id.to_string(),
        })
        .await
        .map_err(on(id))?;
    Ok(empty(StatusCode::NO_CONTENT))
}

/// `POST /networks/{id}/connect` and `…/disconnect` → 200.
pub async fn connect(
    shim: &Shim,
    id: &str,
    body: &Bytes,
    disconnect: bool,
) -> Result<Response<Body>, ShimError> {
    builtin(
        id,
        if disconnect {
            "disconnecting from"
        } else {
            "connecting to"
        },
    )?;
    let b = network::parse_connect(body).map_err(ShimError::BadRequest)?;
    let req = ConnectRequest {
        namespace: shim.coordinator.namespace.clone(),
        network: id.to_string(),
        container: b.container.clone(),
        aliases: b.endpoint_config.map(|e| e.aliases).unwrap_or_default(),
        force: b.force,
    };
    let mut client = shim.coordinator.networks.clone();
    let done = if disconnect {
        client.disconnect_container(req).await
    } else {
        client.connect_container(req).await
    };
    done.map_err(on(id))?;
    Ok(empty(StatusCode::OK))
}

/// `GET /volumes`: none.
pub fn volumes() -> Response<Body> {
    json(StatusCode::OK, &json!({ "Volumes": [], "Warnings": [] }))
}

/// `GET /volumes/{name}`: Docker's 404.
pub fn volume(name: &str) -> Result<Response<Body>, ShimError> {
    Err(ShimError::NoSuchVolume(name.to_string()))
}
