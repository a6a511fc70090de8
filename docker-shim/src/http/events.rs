//! `GET /events?since=&until=&filters=`: `Containers.Events`, filtered and
//! written as Docker's JSON lines while the client reads. Berth keeps no
//! event history: the stream starts at the call (`since` in the past
//! replays nothing) and ends at `until`, if given.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use berth_proto::api::EventsRequest;
use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderValue, Response, header};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};

use super::{Body, Query, Shim};
use crate::docker::events;
use crate::docker::time::parse_query_time;
use crate::error::{ShimError, Subject};

/// `GET /events`.
pub async fn events(shim: &Shim, query: &Query) -> Result<Response<Body>, ShimError> {
    let filters =
        events::parse_filters(query.get("filters").unwrap_or("")).map_err(ShimError::BadRequest)?;
    let until =
        parse_query_time(query.get("until").unwrap_or("")).map_err(ShimError::BadRequest)?;
    parse_query_time(query.get("since").unwrap_or("")).map_err(ShimError::BadRequest)?;
    let stream = shim
        .coordinator
        .containers
        .clone()
        .events(EventsRequest {
            namespace: shim.coordinator.namespace.clone(),
        })
        .await
        .map_err(|s| ShimError::grpc(Subject::Other, s))?
        .into_inner();
    tracing::info!("streaming events");
    let lines = stream
        .filter_map(move |e| {
            let line = match e {
                Ok(e) if events::matches(&filters, &e) => {
                    let mut bytes = serde_json::to_vec(&events::to_docker(&e)).unwrap_or_default();
                    bytes.push(b'\n');
                    Some(Ok(Frame::data(Bytes::from(bytes))))
                }
                Ok(_) => None,
                Err(s) => Some(Err(std::io::Error::other(s.message().to_string()))),
            };
            futures::future::ready(line)
        })
        .boxed();
    let body = if until > 0 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        let left = Duration::from_nanos(u64::try_from(until - now).unwrap_or(0));
        lines.take_until(tokio::time::sleep(left)).boxed()
    } else {
        lines
    };
    let mut resp = Response::new(StreamBody::new(body).boxed_unsync());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}
