//! Networks and volumes, read side. Berth has no Docker networks or
//! volumes yet, so the lists are empty and every lookup is Docker's 404:
//! `docker inspect NAME` tries a container, an image, a network, a volume
//! and a plugin in turn, and needs an honest "not found" from each to say
//! "No such object" (Berth has no plugins either). Creating, connecting and removing stay 501.

use http::{Response, StatusCode};
use serde_json::json;

use super::{Body, json};
use crate::error::ShimError;

/// `GET /networks`: none.
pub fn list() -> Response<Body> {
    json(StatusCode::OK, &json!([]))
}

/// `GET /networks/{id}`: Docker's 404.
pub fn inspect(id: &str) -> Result<Response<Body>, ShimError> {
    Err(ShimError::NoSuchNetwork(id.to_string()))
}

/// `GET /volumes`: none.
pub fn volumes() -> Response<Body> {
    json(StatusCode::OK, &json!({ "Volumes": [], "Warnings": [] }))
}

/// `GET /volumes/{name}`: Docker's 404.
pub fn volume(name: &str) -> Result<Response<Body>, ShimError> {
    Err(ShimError::NoSuchVolume(name.to_string()))
}
