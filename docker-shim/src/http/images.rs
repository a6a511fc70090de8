//! `POST /images/create` (pull, with Docker's progress lines) and
//! `GET /images/{name}/json`.

use berth_proto::api::ImageRequest;
use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderValue, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};

use super::{Body, Query, Shim, json};
use crate::docker::image::{self, error_line, progress_line};
use crate::error::{ShimError, Subject};

/// `POST /images/create?fromImage=&tag=`: `Images.Pull`. A failure before
/// the first progress line is an error status (404, 403, …); one after it
/// is an error line inside the 200 stream, as Docker does.
pub async fn pull(shim: &Shim, query: &Query) -> Result<Response<Body>, ShimError> {
    if query.get("fromSrc").is_some_and(|s| !s.is_empty()) {
        return Err(ShimError::Unsupported {
            method: "POST".into(),
            path: "/images/create?fromSrc (image import)".into(),
        });
    }
    let reference = image::pull_reference(
        query.get("fromImage").unwrap_or(""),
        query.get("tag").unwrap_or(""),
    )
    .map_err(ShimError::BadRequest)?;
    if crate::ryuk::is_ryuk_image(&reference) {
        return Ok(super::ryuk::pull(&reference));
    }
    let subject = Subject::Image(reference.clone());
    let mut stream = shim
        .coordinator
        .images
        .clone()
        .pull(ImageRequest {
            namespace: shim.coordinator.namespace.clone(),
            image: reference.clone(),
        })
        .await
        .map_err(|s| ShimError::grpc(subject.clone(), s))?
        .into_inner();
    let first = stream
        .message()
        .await
        .map_err(|s| ShimError::grpc(subject.clone(), s))?;
    let head = futures::stream::iter(
        first
            .as_ref()
            .map(|p| Bytes::from(progress_line(&p.status))),
    );
    let rest = futures::stream::unfold(first.is_some().then_some(stream), move |s| {
        let subject = subject.clone();
        async move {
            let mut s = s?;
            match s.message().await {
                Ok(Some(p)) => Some((Bytes::from(progress_line(&p.status)), Some(s))),
                Ok(None) => None,
                Err(status) => {
                    let msg = ShimError::grpc(subject, status).message();
                    Some((Bytes::from(error_line(&msg)), None))
                }
            }
        }
    });
    let body = StreamBody::new(
        head.chain(rest)
            .map(|b| Ok::<_, std::io::Error>(Frame::data(b))),
    );
    let mut resp = Response::new(body.boxed_unsync());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// `GET /images/json`: none. Berth keeps no local image store: every
/// image is read from its registry when inspected or pulled, and pulled by
/// the node that runs it, so clients that list before they pull (as
/// testcontainers-java does) inspect, then pull.
pub fn list() -> Response<Body> {
    json(StatusCode::OK, &serde_json::json!([]))
}

/// `GET /images/{name}/json`: `Images.Inspect`.
pub async fn inspect(shim: &Shim, name: &str) -> Result<Response<Body>, ShimError> {
    if crate::ryuk::is_ryuk_image(name) {
        return Ok(super::ryuk::inspect_image(name));
    }
    let info = shim
        .coordinator
        .images
        .clone()
        .inspect(ImageRequest {
            namespace: shim.coordinator.namespace.clone(),
            image: name.to_string(),
        })
        .await
        .map_err(|s| ShimError::grpc(Subject::Image(name.to_string()), s))?
        .into_inner();
    Ok(json(StatusCode::OK, &image::inspect(&info)))
}
