//! The Docker calls on Berth's built-in Ryuk ([`crate::ryuk`]): its image
//! is "pulled" and inspected without a registry, and a container of it is
//! served by the shim.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde_json::json;

use super::{Body, Query, Shim, empty, full, json};
use crate::docker::{container, create, image};
use crate::error::ShimError;
use crate::route::{ApiVersion, Route};
use crate::ryuk::{self, Reaper, STARTED_LINE};

/// The image ID Berth shows for Ryuk's image.
const RYUK_IMAGE_ID: &str =
    "sha256:0000000000000000000000000000000000000000000000000000000000b0ce7a";

/// `POST /images/create` of Ryuk's image: nothing to fetch.
pub fn pull(reference: &str) -> Response<Body> {
    let line = image::progress_line(&format!(
        "Status: Image is up to date for {reference} (Berth serves Ryuk itself)"
    ));
    let mut resp = Response::new(full(line));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// `GET /images/{name}/json` of Ryuk's image.
pub fn inspect_image(reference: &str) -> Response<Body> {
    let info = berth_proto::api::ImageInfo {
        reference: reference.to_string(),
        id: RYUK_IMAGE_ID.into(),
        os: "linux".into(),
        architecture: "amd64".into(),
        exposed_ports: vec![format!("{}/tcp", ryuk::RYUK_PORT)],
        ..Default::default()
    };
    json(StatusCode::OK, &image::inspect(&info))
}

/// `POST /containers/create` of Ryuk's image: a [`Reaper`], not a pod. The
/// Docker socket bind and privileged mode it asks for are not needed.
pub fn create(
    shim: &Shim,
    name: &str,
    body: &create::CreateBody,
) -> Result<Response<Body>, ShimError> {
    if !name.is_empty() {
        create::container_name(name).map_err(|e| ShimError::BadRequest(e.to_string()))?;
    }
    if !name.is_empty() && shim.reapers.find(name).is_some() {
        return Err(ShimError::Conflict(format!(
            "Conflict. The container name \"/{name}\" is already in use"
        )));
    }
    let mut spec = berth_proto::api::ContainerSpec {
        image: body.image.clone(),
        env: body.env.clone(),
        labels: body.labels.clone().into_iter().collect(),
        auto_remove: body.host_config.auto_remove,
        ports: create::ports(body).map_err(|e| ShimError::BadRequest(e.to_string()))?,
        ..Default::default()
    };
    super::containers::choose_host_ports(&mut spec.ports)?;
    let reaper = shim.reapers.add(Reaper::new(name, spec));
    let id = reaper.info().id;
    tracing::info!(%id, "Ryuk created (served by the shim)");
    Ok(json(
        StatusCode::CREATED,
        &json!({"Id": id, "Warnings": ["Berth serves Ryuk itself; the image does not run"]}),
    ))
}

/// A container call on a Ryuk.
pub async fn serve(
    shim: &Shim,
    version: ApiVersion,
    reaper: std::sync::Arc<Reaper>,
    route: Route,
    query: &Query,
) -> Result<Response<Body>, ShimError> {
    let id = reaper.info().id;
    match route {
        Route::ContainerInspect(_) => Ok(json(StatusCode::OK, &container::inspect(&reaper.info()))),
        Route::ContainerStart(_) if reaper.running() => Err(ShimError::NotModified),
        Route::ContainerStart(_) => {
            ryuk::start(reaper, shim.reapers.clone(), shim.coordinator.clone())
                .await
                .map_err(|e| ShimError::Internal(format!("Ryuk cannot listen: {e}")))?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        Route::ContainerStop(_) | Route::ContainerKill(_) => {
            if !reaper.running() {
                return Err(ShimError::NotModified);
            }
            reaper.finish(0);
            Ok(empty(StatusCode::NO_CONTENT))
        }
        Route::ContainerRemove(_) => {
            if reaper.running() && !query.flag("force") {
                return Err(ShimError::Conflict(format!(
                    "You cannot remove a running container {id}. Stop the container before attempting removal or force remove"
                )));
            }
            reaper.finish(0);
            shim.reapers.remove(&id);
            Ok(empty(StatusCode::NO_CONTENT))
        }
        Route::ContainerWait(_) => {
            if reaper.running() {
                reaper.ended().await;
            }
            Ok(json(
                StatusCode::OK,
                &json!({"StatusCode": 0, "Error": null}),
            ))
        }
        Route::ContainerLogs(_) => {
            let out = if query.flag("stdout")
                && reaper
                    .info()
                    .state
                    .is_some_and(|s| !s.started_at.is_empty())
            {
                crate::stream::frame(1, STARTED_LINE)
            } else {
                Bytes::new()
            };
            let mut resp = Response::new(full(out));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(crate::stream::content_type(false, version)),
            );
            Ok(resp)
        }
        _ => Err(ShimError::Conflict(format!(
            "container {id} is Berth's built-in Ryuk: it has no processes or files to reach"
        ))),
    }
}
