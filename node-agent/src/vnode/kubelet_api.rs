//! The part of the kubelet API the apiserver calls for `kubectl logs`, on
//! the virtual node: HTTPS with the node's serving certificate (which the
//! apiserver checks against its `--kubelet-certificate-authority`), and
//! only callers with a client certificate of the cluster's CA (the
//! apiserver's kubelet client) are answered.
//!
//! Each container's stdout and stderr go to one file per unit under the
//! logs directory (`StandardOutput=append:`); `GET
//! /containerLogs/{namespace}/{pod}/{container}` serves it, with `tailLines`
//! and `follow`.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tracing::{debug, warn};

/// How often a followed log is checked for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// The serving certificate, its key, and the CA callers' certificates must chain to.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain for the node's address.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA of the apiserver's kubelet client certificate.
    pub client_ca: PathBuf,
}

/// The log file of one container.
pub fn log_file(dir: &Path, namespace: &str, pod: &str, container: &str) -> PathBuf {
    dir.join(format!("{namespace}_{pod}_{container}.log"))
}

fn server_config(tls: &TlsFiles) -> anyhow::Result<rustls::ServerConfig> {
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(&tls.cert)?)
        .collect::<Result<_, _>>()
        .context("the serving certificate")?;
    let key = PrivateKeyDer::from_pem_slice(&read(&tls.key)?).context("the serving key")?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&read(&tls.client_ca)?) {
        roots.add(c.context("the client CA")?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots)).build()?;
    Ok(rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?)
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn text(status: u16, body: impl Into<String>) -> hyper::Response<Body> {
    hyper::Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body.into())).boxed())
        .expect("a valid response")
}

/// The last `n` lines of `data`.
pub fn tail(data: &[u8], n: usize) -> &[u8] {
    if n == 0 {
        return &[];
    }
    let body = data.strip_suffix(b"\n").unwrap_or(data);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                return &data[i + 1..];
            }
        }
    }
    data
}

async fn logs(dir: &Path, path: &str, query: &str) -> hyper::Response<Body> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let ["containerLogs", ns, pod, container] = parts[..] else {
        return text(
            404,
            "only /containerLogs/{namespace}/{pod}/{container} on a systemd node\n",
        );
    };
    let param = |k: &str| {
        form_urlencoded::parse(query.as_bytes())
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.into_owned())
    };
    if param("previous").is_some_and(|v| v == "true") {
        return text(
            400,
            "a systemd node keeps one log per container across restarts: there is no separate previous log\n",
        );
    }
    let file = log_file(dir, ns, pod, container);
    let Ok(mut f) = tokio::fs::File::open(&file).await else {
        return text(
            404,
            format!("no log for container {container} of {ns}/{pod} on this node\n"),
        );
    };
    let mut data = Vec::new();
    if f.read_to_end(&mut data).await.is_err() {
        return text(500, "the log cannot be read\n");
    }
    let first = match param("tailLines").and_then(|t| t.parse::<usize>().ok()) {
        Some(n) => tail(&data, n).to_vec(),
        None => data.clone(),
    };
    if param("follow").is_none_or(|v| v != "true") {
        return hyper::Response::new(Full::new(Bytes::from(first)).boxed());
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
    let mut offset = data.len() as u64;
    tokio::spawn(async move {
        if tx.send(Ok(Frame::data(Bytes::from(first)))).await.is_err() {
            return;
        }
        loop {
            tokio::time::sleep(FOLLOW_POLL).await;
            let Ok(mut f) = tokio::fs::File::open(&file).await else {
                return;
            };
            if f.seek(std::io::SeekFrom::Start(offset)).await.is_err() {
                return;
            }
            let mut more = Vec::new();
            if f.read_to_end(&mut more).await.is_err() {
                return;
            }
            offset += more.len() as u64;
            if !more.is_empty() && tx.send(Ok(Frame::data(Bytes::from(more)))).await.is_err() {
                return;
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    hyper::Response::new(BodyExt::boxed(StreamBody::new(stream)))
}

/// Serves the API on `listener` until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: TlsFiles,
    dir: PathBuf,
) -> anyhow::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(&tls)?));
    let dir = Arc::new(dir);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "kubelet API accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, dir) = (acceptor.clone(), dir.clone());
        tokio::spawn(async move {
            let stream = match acceptor.accept(stream).await {
                Ok(s) => s,
                Err(e) => {
                    debug!(%peer, error = %e, "kubelet API handshake refused");
                    return;
                }
            };
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let dir = dir.clone();
                    async move {
                        let resp = if req.method() != hyper::Method::GET {
                            text(405, "only GET\n")
                        } else {
                            logs(&dir, req.uri().path(), req.uri().query().unwrap_or("")).await
                        };
                        Ok::<_, Infallible>(resp)
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(tail(b"a\nb\nc", 1), b"c");
        assert_eq!(tail(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(tail(b"a\n", 0), b"");
    }

    #[tokio::test]
    async fn logs_are_read_whole_or_tailed_and_unknown_paths_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(log_file(dir.path(), "ns", "p", "c"), "one\ntwo\nthree\n").unwrap();
        let body = |r: hyper::Response<Body>| async move {
            (
                r.status().as_u16(),
                r.into_body().collect().await.unwrap().to_bytes(),
            )
        };
        assert_eq!(
            body(logs(dir.path(), "/containerLogs/ns/p/c", "").await).await,
            (200, Bytes::from("one\ntwo\nthree\n"))
        );
        assert_eq!(
            body(logs(dir.path(), "/containerLogs/ns/p/c", "tailLines=1").await).await,
            (200, Bytes::from("three\n"))
        );
        assert_eq!(
            body(logs(dir.path(), "/containerLogs/ns/p/other", "").await)
                .await
                .0,
            404
        );
        assert_eq!(
            body(logs(dir.path(), "/exec/ns/p/c", "").await).await.0,
            404
        );
        assert_eq!(
            body(logs(dir.path(), "/containerLogs/ns/p/c", "previous=true").await)
                .await
                .0,
            400
        );
    }
}
