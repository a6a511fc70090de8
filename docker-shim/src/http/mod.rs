//! The Docker Engine API over HTTP/1.1: the accept loops (TCP and unix
//! socket), one [`handle`] per request, and the response helpers.
//!
//! A request is routed ([`crate::route`]), handed to the handler of its
//! endpoint (`system`, `images`, `containers`, `logs`, `exec`, `networks`),
//! and whatever fails becomes Docker's error JSON in exactly one place,
//! [`error_response`].
//! Every answer carries `Api-Version`, `Docker-Experimental`, `Ostype` and
//! `Server` as Docker's do.

mod archive;
mod containers;
mod events;
mod exec;
mod images;
mod logs;
mod networks;
mod ryuk;
mod system;

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};

use crate::coordinator::Coordinator;
use crate::docker::system::{Identity, VERSION};
use crate::error::ShimError;
use crate::route::{self, MAX_API};

/// The largest request body accepted (4 MiB).
pub const MAX_BODY: usize = 4 << 20;

/// Response bodies: whole or streamed; a stream error aborts the connection.
pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// What every request handler shares.
#[derive(Debug, Clone)]
pub struct Shim {
    /// The coordinator's clients.
    pub coordinator: Coordinator,
    /// What `/info` says about this shim.
    pub identity: Identity,
    /// Exec instances between their create, start and inspect.
    pub execs: crate::exec::ExecStore,
    /// Listeners of the containers' published ports.
    pub forwards: crate::ports::Forwards,
    /// testcontainers' Ryuks, served by the shim.
    pub reapers: crate::ryuk::Reapers,
    /// Pod settings every container starts from (flags).
    pub pod_defaults: crate::docker::options::PodDefaults,
}

/// A whole body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}

/// A JSON answer with `status`.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(full(serde_json::to_vec(value).unwrap_or_default()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// An empty answer with `status` (204 for most container actions).
pub fn empty(status: StatusCode) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = status;
    resp
}

/// Docker's error answer for `e`.
pub fn error_response(e: &ShimError) -> Response<Body> {
    let status = e.status();
    if status == StatusCode::NOT_MODIFIED {
        return empty(status);
    }
    if status.is_server_error() {
        tracing::warn!(status = status.as_u16(), error = %e, "request failed");
    } else {
        tracing::debug!(status = status.as_u16(), error = %e, "request refused");
    }
    json(status, &e.body())
}

/// The query string, decoded; a repeated key keeps its last value.
#[derive(Debug, Default)]
pub struct Query(HashMap<String, String>);

impl Query {
    /// Parses the query of `uri`.
    pub fn of(uri: &http::Uri) -> Self {
        Query(
            form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
                .into_owned()
                .collect(),
        )
    }

    /// The raw value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// `key` as Docker reads booleans.
    pub fn flag(&self, key: &str) -> bool {
        crate::docker::query_bool(self.get(key))
    }

    /// `key` as an integer, `None` when absent or empty.
    pub fn int(&self, key: &str) -> Result<Option<i64>, ShimError> {
        match self.get(key) {
            None | Some("") => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                ShimError::BadRequest(format!("invalid value for {key}: {v:?} is not an integer"))
            }),
        }
    }
}

/// Reads a request body of at most [`MAX_BODY`] bytes.
pub async fn read_body(body: Incoming) -> Result<Bytes, ShimError> {
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ShimError::BodyTooLarge { limit: MAX_BODY })
        }
        Err(e) => Err(ShimError::BadRequest(format!(
            "cannot read the request body: {e}"
        ))),
    }
}

fn add_docker_headers(resp: &mut Response<Body>) {
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("1.{MAX_API}")) {
        h.insert("Api-Version", v);
    }
    h.insert("Docker-Experimental", HeaderValue::from_static("false"));
    h.insert("Ostype", HeaderValue::from_static("linux"));
    if let Ok(v) = HeaderValue::from_str(&format!("Berth/{VERSION}")) {
        h.insert(header::SERVER, v);
    }
}

/// Answers one request (never fails: errors become Docker's error JSON).
pub async fn handle(shim: Arc<Shim>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mut resp = match route::route(&method, &path) {
        Ok((version, route)) => {
            let span = tracing::debug_span!("docker", %method, %path);
            let _enter = span.enter();
            match dispatch(&shim, version, route, req).await {
                Ok(r) => r,
                Err(e) => error_response(&e),
            }
        }
        Err(e) => error_response(&e.into_error(&method)),
    };
    add_docker_headers(&mut resp);
    Ok(resp)
}

async fn dispatch(
    shim: &Shim,
    version: route::ApiVersion,
    route: route::Route,
    req: Request<Incoming>,
) -> Result<Response<Body>, ShimError> {
    use route::Route as R;
    let query = Query::of(req.uri());
    if let Some(reaper) = route.container().and_then(|key| shim.reapers.find(key)) {
        return ryuk::serve(shim, version, reaper, route, &query).await;
    }
    match route {
        R::Ping => Ok(system::ping(req.method())),
        R::Version => Ok(system::version()),
        R::Info => system::info(shim).await,
        R::Events => events::events(shim, &query).await,
        R::ImageCreate => images::pull(shim, &query).await,
        R::ImageInspect(name) => images::inspect(shim, &name).await,
        R::ImageList => Ok(images::list()),
        R::ContainerCreate => {
            let body = read_body(req.into_body()).await?;
            containers::create(shim, &query, &body).await
        }
        R::ContainerList => containers::list(shim, &query).await,
        R::ContainerInspect(id) => containers::inspect(shim, &id).await,
        R::ContainerStart(id) => containers::start(shim, &id).await,
        R::ContainerStop(id) => containers::stop(shim, &id, &query).await,
        R::ContainerKill(id) => containers::kill(shim, &id, &query).await,
        R::ContainerRestart(id) => containers::restart(shim, &id, &query).await,
        R::ContainerWait(id) => containers::wait(shim, &id, &query).await,
        R::ContainerRemove(id) => containers::remove(shim, &id, &query).await,
        R::ContainerLogs(id) => logs::logs(shim, version, &id, &query).await,
        R::ContainerAttach(id) => logs::attach(shim, version, &id, &query, req).await,
        R::ExecCreate(id) => {
            let body = read_body(req.into_body()).await?;
            exec::create(shim, &id, &body).await
        }
        R::ExecStart(id) => exec::start(shim, version, &id, req).await,
        R::ExecInspect(id) => exec::inspect(shim, &id),
        R::NetworkList => networks::list(shim, &query).await,
        R::NetworkInspect(id) => networks::inspect(shim, &id).await,
        R::NetworkCreate => {
            let body = read_body(req.into_body()).await?;
            networks::create(shim, &body).await
        }
        R::NetworkRemove(id) => networks::remove(shim, &id).await,
        R::NetworkConnect(id) => {
            let body = read_body(req.into_body()).await?;
            networks::connect(shim, &id, &body, false).await
        }
        R::NetworkDisconnect(id) => {
            let body = read_body(req.into_body()).await?;
            networks::connect(shim, &id, &body, true).await
        }
        R::PluginInspect(name) => Err(ShimError::NoSuchPlugin(name)),
        R::ArchiveStat(id) => archive::head(shim, &id, &query).await,
        R::ArchiveGet(id) => archive::get(shim, &id, &query).await,
        R::ArchivePut(id) => archive::put(shim, &id, &query, req.into_body()).await,
        R::VolumeList => Ok(networks::volumes()),
        R::VolumeInspect(name) => networks::volume(&name),
    }
}

/// Serves one connection, with upgrades (attach) enabled.
pub async fn serve_connection<S>(shim: Arc<Shim>, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| handle(shim.clone(), req));
    if let Err(e) = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await
    {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Accepts TCP connections forever.
pub async fn serve_tcp(shim: Arc<Shim>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_connection(shim.clone(), stream));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Binds the unix socket at `path`, replacing a stale socket file.
pub fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
    {
        std::fs::remove_file(path)?;
    }
    UnixListener::bind(path)
}

/// Accepts unix-socket connections forever.
pub async fn serve_unix(shim: Arc<Shim>, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(shim.clone(), stream));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}
