//! A real HTTP/1.1 client for the shim's tests: one connection per call
//! (with upgrades enabled), answers collected whole, and a reader for
//! Docker's multiplexed frames.

#![allow(dead_code)]

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use crate::fake;

/// A whole answer.
pub struct Answer {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON (panics when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
    /// `message` of Docker's error body.
    pub fn message(&self) -> String {
        self.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// Sends `req` on a fresh connection (upgrades enabled) and answers the head.
pub async fn send(
    addr: std::net::SocketAddr,
    req: Request<Full<Bytes>>,
) -> http::Response<hyper::body::Incoming> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    sender.send_request(req).await.unwrap()
}

/// A request with a JSON body.
pub fn request(method: &str, path: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "docker")
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap()
}

/// Sends a request and collects its whole answer (within 10 s).
pub async fn call(h: &fake::Harness, method: &str, path: &str, body: impl Into<Bytes>) -> Answer {
    let resp = send(h.addr, request(method, path, body)).await;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("body within 10 s")
        .unwrap()
        .to_bytes();
    Answer {
        status,
        headers,
        body,
    }
}

/// `docker create --name NAME` with `body`; answers the ID.
pub async fn create(h: &fake::Harness, name: &str, body: Value) -> String {
    let a = call(
        h,
        "POST",
        &format!("/v1.47/containers/create?name={name}"),
        body.to_string(),
    )
    .await;
    assert_eq!(
        a.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    assert_eq!(a.json()["Warnings"], json!([]));
    a.json()["Id"].as_str().unwrap().to_string()
}

/// Splits a multiplexed stream into (stream byte, payload) frames.
pub fn frames(mut bytes: &[u8]) -> Vec<(u8, String)> {
    let mut out = Vec::new();
    while bytes.len() >= 8 {
        let len = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
        assert_eq!(&bytes[1..4], &[0, 0, 0]);
        out.push((
            bytes[0],
            String::from_utf8_lossy(&bytes[8..8 + len]).into_owned(),
        ));
        bytes = &bytes[8 + len..];
    }
    assert!(bytes.is_empty(), "trailing bytes");
    out
}
