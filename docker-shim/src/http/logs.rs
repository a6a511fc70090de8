//! Container output: `GET /containers/{id}/logs` (a streamed HTTP body) and
//! `POST /containers/{id}/attach` (a hijacked connection: `101 UPGRADED`,
//! then the bytes), both from `Containers.Logs`, framed by
//! [`crate::stream::LogEncoder`] (multiplexed without a TTY, raw with one).
//!
//! Attach asks for `follow` and `wait_for_start`: the docker CLI attaches
//! before it starts the container and must see its output from the first
//! byte. The 101 goes out before the Logs call, so a coordinator that holds
//! the call until the start cannot deadlock the client. With `stdin=1` on
//! a container made with stdin open (`docker run -i`), the client's bytes go
//! to `Containers.Stdin`, and its half-close closes the container's stdin;
//! otherwise they are dropped. The hijack answers (`upgraded`, `streamed`)
//! serve `exec` too.

use std::time::{SystemTime, UNIX_EPOCH};

use berth_proto::api::{ContainerLogsRequest, LogChunk};
use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tonic::Streaming;

use super::{Body, Query, Shim};
use crate::docker::time::parse_query_time;
use crate::error::{ShimError, Subject};
use crate::route::ApiVersion;
use crate::stream::{LogEncoder, content_type, frame};

async fn open(
    shim: &Shim,
    request: ContainerLogsRequest,
) -> Result<Streaming<LogChunk>, ShimError> {
    let id = request.id.clone();
    Ok(shim
        .coordinator
        .containers
        .clone()
        .logs(request)
        .await
        .map_err(|s| ShimError::grpc(Subject::Container(id), s))?
        .into_inner())
}

fn streams(query: &Query) -> Result<(bool, bool), ShimError> {
    let (stdout, stderr) = (query.flag("stdout"), query.flag("stderr"));
    if !stdout && !stderr {
        return Err(ShimError::BadRequest(
            "Bad parameters: you must choose at least one stream".into(),
        ));
    }
    Ok((stdout, stderr))
}

fn tail(query: &Query) -> Result<i64, ShimError> {
    match query.get("tail") {
        None | Some("") | Some("all") => Ok(-1),
        Some(v) => v.parse::<i64>().map_err(|_| {
            ShimError::BadRequest(format!(
                "invalid tail {v:?}: want a number of lines or \"all\""
            ))
        }),
    }
}

/// `GET /containers/{id}/logs?stdout=&stderr=&follow=&tail=&since=&until=&timestamps=`.
pub async fn logs(
    shim: &Shim,
    version: ApiVersion,
    id: &str,
    query: &Query,
) -> Result<Response<Body>, ShimError> {
    let (stdout, stderr) = streams(query)?;
    let time = |key| parse_query_time(query.get(key).unwrap_or("")).map_err(ShimError::BadRequest);
    let request = ContainerLogsRequest {
        namespace: shim.coordinator.namespace.clone(),
        id: id.to_string(),
        follow: query.flag("follow"),
        stdout,
        stderr,
        since_unix_nanos: time("since")?,
        until_unix_nanos: time("until")?,
        tail: tail(query)?,
        wait_for_start: false,
    };
    let tty = tty_of(shim, id).await?;
    let mut stream = open(shim, request).await?;
    // A refusal that arrives with the first message is still an error status.
    let first = stream
        .message()
        .await
        .map_err(|s| ShimError::grpc(Subject::Container(id.to_string()), s))?;
    let mut encoder = LogEncoder::new(tty, query.flag("timestamps"));
    let head = first.as_ref().map(|c| encoder.encode(c));
    let head = futures::stream::iter(head.map(Ok));
    let rest = futures::stream::unfold(
        first.is_some().then_some((stream, encoder)),
        |state| async move {
            let (mut s, mut enc) = state?;
            match s.message().await {
                Ok(Some(chunk)) => Some((Ok(enc.encode(&chunk)), Some((s, enc)))),
                Ok(None) => None,
                Err(status) => Some((Err(std::io::Error::other(status.to_string())), None)),
            }
        },
    );
    let body = head
        .chain(rest)
        .filter(|r| std::future::ready(!matches!(r, Ok(b) if b.is_empty())))
        .map(|r: Result<Bytes, std::io::Error>| r.map(Frame::data));
    let mut resp = Response::new(StreamBody::new(body).boxed_unsync());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(tty, version)),
    );
    Ok(resp)
}

async fn tty_of(shim: &Shim, id: &str) -> Result<bool, ShimError> {
    let info = super::containers::fetch(shim, id).await?;
    Ok(info.spec.is_some_and(|s| s.tty))
}

/// Whether the client asked to hijack the connection (`Connection: Upgrade`
/// with an `Upgrade` header), as the docker CLI does for attach and exec.
pub(super) fn wants_upgrade(req: &Request<Incoming>) -> bool {
    let has = |name: header::HeaderName, word: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.split(',').any(|p| p.trim().eq_ignore_ascii_case(word)))
        })
    };
    has(header::CONNECTION, "upgrade") && req.headers().contains_key(header::UPGRADE)
}

/// `POST /containers/{id}/attach?stream=&stdout=&stderr=&logs=`.
pub async fn attach(
    shim: &Shim,
    version: ApiVersion,
    id: &str,
    query: &Query,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, ShimError> {
    let info = shim
        .coordinator
        .containers
        .clone()
        .inspect(berth_proto::api::ContainerRequest {
            namespace: shim.coordinator.namespace.clone(),
            id: id.to_string(),
        })
        .await
        .map_err(|s| ShimError::grpc(Subject::Container(id.to_string()), s))?
        .into_inner();
    let tty = info.spec.as_ref().is_some_and(|s| s.tty);
    let forward_stdin = query.flag("stdin") && info.spec.as_ref().is_some_and(|s| s.open_stdin);
    let running = info.state.as_ref().is_some_and(|s| s.running);
    let (stdout, stderr) = (query.flag("stdout"), query.flag("stderr"));
    // Attaching to a running container without `logs` shows only new output.
    let since = if running && !query.flag("logs") {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
    } else {
        0
    };
    let request = ContainerLogsRequest {
        namespace: shim.coordinator.namespace.clone(),
        id: id.to_string(),
        follow: query.flag("stream"),
        stdout,
        stderr,
        since_unix_nanos: since,
        until_unix_nanos: 0,
        tail: -1,
        wait_for_start: true,
    };
    let kind = HeaderValue::from_static(content_type(tty, version));
    let shim = shim.clone();
    let id = id.to_string();
    if wants_upgrade(&req) {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            match upgrade.await {
                Ok(upgraded) => {
                    let (rd, wr) = tokio::io::split(TokioIo::new(upgraded));
                    if forward_stdin {
                        tokio::spawn(send_stdin(shim.clone(), id.clone(), rd));
                    } else {
                        tokio::spawn(drop_stdin(id.clone(), rd));
                    }
                    pump(&shim, request, tty, wr, stdout || stderr).await;
                }
                Err(e) => tracing::warn!(%id, error = %e, "attach upgrade failed"),
            }
        });
        return Ok(upgraded(kind));
    }
    let (tx, rx) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move { pump(&shim, request, tty, tx, stdout || stderr).await });
    Ok(streamed(rx, kind))
}

/// Sends what the client writes to the container's stdin, closing it at the
/// client's half-close.
async fn send_stdin<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    shim: Shim,
    id: String,
    mut rd: R,
) {
    use berth_proto::api::{StdinInput, StdinOpen, stdin_input::Kind};
    let (tx, rx) = tokio::sync::mpsc::channel::<StdinInput>(16);
    let open = StdinInput {
        kind: Some(Kind::Open(StdinOpen {
            namespace: shim.coordinator.namespace.clone(),
            id: id.clone(),
        })),
    };
    if tx.send(open).await.is_err() {
        return;
    }
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 << 10];
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let data = StdinInput {
                kind: Some(Kind::Data(buf[..n].to_vec())),
            };
            if tx.send(data).await.is_err() {
                return;
            }
        }
        let _ = tx
            .send(StdinInput {
                kind: Some(Kind::Close(true)),
            })
            .await;
    });
    let call = shim
        .coordinator
        .containers
        .clone()
        .stdin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|m| (m, rx))
        }))
        .await;
    match call {
        Ok(r) => tracing::debug!(%id, bytes = r.into_inner().bytes, "stdin closed"),
        Err(s) => tracing::warn!(%id, error = %s.message(), "stdin could not be delivered"),
    }
}

/// Reads and drops what the client writes (a container without stdin open).
async fn drop_stdin<R: tokio::io::AsyncRead + Unpin>(id: String, mut rd: R) {
    let mut buf = [0u8; 4096];
    let mut warned = false;
    while let Ok(n) = rd.read(&mut buf).await {
        if n == 0 {
            break;
        }
        if !warned {
            tracing::warn!(%id, "stdin sent to a container made without stdin open (docker run -i); dropping it");
            warned = true;
        }
    }
}

/// Docker's answer to a hijack: `101 UPGRADED` with `Upgrade: tcp`; the
/// bytes follow on the upgraded connection.
pub(super) fn upgraded(kind: HeaderValue) -> Response<Body> {
    let mut resp = Response::new(super::full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.extensions_mut()
        .insert(hyper::ext::ReasonPhrase::from_static(b"UPGRADED"));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, kind);
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("tcp"));
    resp
}

/// A `200` whose body is whatever is written to the other end of `rx`
/// (for clients that do not ask to hijack).
pub(super) fn streamed(rx: tokio::io::DuplexStream, kind: HeaderValue) -> Response<Body> {
    let body = read_stream::reader_stream(rx).map(|r| r.map(Frame::data));
    let mut resp = Response::new(StreamBody::new(body).boxed_unsync());
    resp.headers_mut().insert(header::CONTENT_TYPE, kind);
    resp
}

/// Copies the container's output to `out` until Logs ends (or the client
/// goes), then closes `out`. A failure is written where the client sees it.
async fn pump<W: AsyncWrite + Unpin>(
    shim: &Shim,
    request: ContainerLogsRequest,
    tty: bool,
    mut out: W,
    any_stream: bool,
) {
    let id = request.id.clone();
    if any_stream {
        let failure = match open(shim, request).await {
            Err(e) => Some(e.message()),
            Ok(mut stream) => {
                let mut encoder = LogEncoder::new(tty, false);
                loop {
                    match stream.message().await {
                        Ok(Some(chunk)) => {
                            let bytes = encoder.encode(&chunk);
                            if out.write_all(&bytes).await.is_err() || out.flush().await.is_err() {
                                break None;
                            }
                        }
                        Ok(None) => break None,
                        Err(s) => {
                            break Some(
                                ShimError::grpc(Subject::Container(id.clone()), s).message(),
                            );
                        }
                    }
                }
            }
        };
        if let Some(msg) = failure {
            tracing::warn!(%id, error = %msg, "attach stream failed");
            let line = format!("berth: {msg}\n");
            let bytes = if tty {
                Bytes::from(line)
            } else {
                frame(2, line.as_bytes())
            };
            let _ = out.write_all(&bytes).await;
        }
    }
    let _ = out.shutdown().await;
}

/// A byte stream over an `AsyncRead`, for the non-upgraded attach answer.
mod read_stream {
    use bytes::Bytes;
    use tokio::io::{AsyncRead, AsyncReadExt};

    /// Reads `r` in chunks until EOF.
    pub fn reader_stream<R: AsyncRead + Unpin + Send + 'static>(
        r: R,
    ) -> impl futures::Stream<Item = std::io::Result<Bytes>> + Send {
        futures::stream::unfold(Some(r), |r| async move {
            let mut r = r?;
            let mut buf = vec![0u8; 16 * 1024];
            match r.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(Bytes::from(buf)), Some(r)))
                }
                Err(e) => Some((Err(e), None)),
            }
        })
    }
}
