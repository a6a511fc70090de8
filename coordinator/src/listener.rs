//! Accepting connections so that no client can exhaust the process.
//!
//! Every listener of the coordinator (gRPC on 7070, metrics on 9090) runs the
//! same loop, [`run`]: accept (an [`Accept`]or: a `TcpListener`, or a fake in
//! tests) → admit against [`Limits`] (total connections and connections per
//! source IP; over the cap the socket is closed at once) → an optional
//! [`Handshake`] (TLS, the HTTP/2 preface, or [`Plain`]) that must finish
//! within [`Limits::handshake_timeout`] → hand the [`Admitted`] connection to
//! the server. The permit travels inside [`Admitted`] and is returned when the
//! server drops the connection.
//!
//! Accept errors never end the loop: `EMFILE` and friends are counted, logged
//! at most once per second, and followed by a short pause (the pending
//! connection stays in the kernel's backlog until a descriptor frees up).
//!
//! For tonic, [`incoming`] turns the loop into the stream that
//! `serve_with_incoming_shutdown` takes; [`Admitted`] reports its peer as a
//! `TcpConnectInfo`, so `Request::remote_addr` works whatever the handshake.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;
use tracing::warn;

use crate::metrics::METRICS;

/// Pause after an accept error caused by a resource shortage.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How many connections a listener holds and how long a handshake may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once, handshaking or served.
    pub max_connections: usize,
    /// Connections open at once from one source IP.
    pub max_per_ip: usize,
    /// Time from accept until the handshake is done.
    pub handshake_timeout: Duration,
}

impl Limits {
    /// The same limits with `max_connections` (and `max_per_ip`) lowered to
    /// fit `fd_limit` open files: at most half of them, minus a reserve for
    /// the process's own files and apiserver connections.
    pub fn within_fd_limit(self, fd_limit: u64) -> Limits {
        let fit = (fd_limit.saturating_sub(256) / 2).max(16) as usize;
        Limits {
            max_connections: self.max_connections.min(fit),
            max_per_ip: self.max_per_ip.min(fit),
            ..self
        }
    }
}

/// A source of connections: a `TcpListener`, or a fake in tests.
pub trait Accept: Send + 'static {
    /// What an accepted connection is.
    type Conn: Send + 'static;
    /// The next connection and its peer.
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Conn, SocketAddr)>> + Send;
    /// The listening address, if any.
    fn local_addr(&self) -> Option<SocketAddr>;
}

impl Accept for TcpListener {
    type Conn = TcpStream;

    async fn accept(&mut self) -> io::Result<(TcpStream, SocketAddr)> {
        let (stream, peer) = TcpListener::accept(self).await?;
        // Small gRPC frames go out at once, as tonic's own listener does.
        let _ = stream.set_nodelay(true);
        Ok((stream, peer))
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        TcpListener::local_addr(self).ok()
    }
}

/// What happens between accept and serve, e.g. a TLS handshake.
pub trait Handshake<C>: Clone + Send + Sync + 'static {
    /// The connection the server then speaks on.
    type Io: Send + 'static;
    /// Completes the handshake; [`run`] bounds it by the handshake timeout.
    fn handshake(&self, conn: C) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

/// No handshake: the connection is served as accepted.
#[derive(Debug, Clone, Copy, Default)]
pub struct Plain;

impl<C: Send + 'static> Handshake<C> for Plain {
    type Io = C;

    async fn handshake(&self, conn: C) -> io::Result<C> {
        Ok(conn)
    }
}

/// The client's first bytes on an HTTP/2 connection (RFC 9113, 3.4).
pub const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Runs the inner handshake (e.g. TLS), then waits for the HTTP/2 client
/// preface, so a connection that never starts speaking HTTP/2 is closed
/// when the handshake times out instead of being held by the server forever.
#[derive(Debug, Clone, Copy, Default)]
pub struct Http2Preface<H>(pub H);

impl<C, H> Handshake<C> for Http2Preface<H>
where
    C: Send + 'static,
    H: Handshake<C>,
    H::Io: AsyncRead + Unpin,
{
    type Io = Rewind<H::Io>;

    async fn handshake(&self, conn: C) -> io::Result<Rewind<H::Io>> {
        let mut io = self.0.handshake(conn).await?;
        let mut preface = [0u8; 24];
        io.read_exact(&mut preface).await?;
        if &preface != HTTP2_PREFACE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not an HTTP/2 connection: speak gRPC (HTTP/2 with prior knowledge)",
            ));
        }
        Ok(Rewind {
            preface,
            replayed: 0,
            inner: io,
        })
    }
}

/// A connection whose HTTP/2 preface was read by [`Http2Preface`] and is
/// replayed to the server before the rest of the stream.
#[derive(Debug)]
pub struct Rewind<Io> {
    preface: [u8; 24],
    replayed: usize,
    inner: Io,
}

impl<Io: AsyncRead + Unpin> AsyncRead for Rewind<Io> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.replayed < this.preface.len() {
            let rest = &this.preface[this.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Rewind<Io> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Open connections of one listener, in total and per source IP.
#[derive(Debug, Clone)]
pub struct Admission {
    limits: Limits,
    counts: Arc<Mutex<Counts>>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Why a connection was closed without being served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The listener holds its maximum of connections.
    TotalCap,
    /// The peer's IP holds its maximum of connections.
    PerIpCap,
    /// The handshake did not finish in time.
    HandshakeTimeout,
    /// The handshake failed (bad TLS, not HTTP/2, peer went away).
    HandshakeFailed,
}

impl Refusal {
    /// The `reason` label of `berth_connections_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::TotalCap => "total_cap",
            Refusal::PerIpCap => "per_ip_cap",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::HandshakeFailed => "handshake_failed",
        }
    }
}

/// One admitted connection's place; given back when dropped.
#[derive(Debug)]
pub struct Permit {
    counts: Arc<Mutex<Counts>>,
    ip: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap();
        c.total -= 1;
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

impl Admission {
    /// Counts connections against `limits`.
    pub fn new(limits: Limits) -> Self {
        Admission {
            limits,
            counts: Arc::default(),
        }
    }

    /// A place for a connection from `ip`, or why there is none.
    pub fn admit(&self, ip: IpAddr) -> Result<Permit, Refusal> {
        let mut c = self.counts.lock().unwrap();
        if c.total >= self.limits.max_connections {
            return Err(Refusal::TotalCap);
        }
        let n = c.per_ip.entry(ip).or_default();
        if *n >= self.limits.max_per_ip {
            return Err(Refusal::PerIpCap);
        }
        *n += 1;
        c.total += 1;
        Ok(Permit {
            counts: self.counts.clone(),
            ip,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.counts.lock().unwrap().total
    }
}

/// A connection that passed admission and its handshake.
#[derive(Debug)]
pub struct Admitted<Io> {
    io: Io,
    /// The peer's address.
    pub remote: SocketAddr,
    /// The listening address.
    pub local: Option<SocketAddr>,
    _permit: Permit,
}

impl<Io> Admitted<Io> {
    /// The connection itself.
    pub fn get_ref(&self) -> &Io {
        &self.io
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for Admitted<Io> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Admitted<Io> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<Io> tonic::transport::server::Connected for Admitted<Io> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: self.local,
            remote_addr: Some(self.remote),
        }
    }
}

/// Logs a recurring warning at most once per second, with how many were
/// left out in between.
#[derive(Debug)]
struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    fn new() -> Self {
        RateLimitedLog {
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(suppressed since the last line)` when a line may be written now.
    fn tick(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|l| now.duration_since(l) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Whether an accept error means "out of a resource": pause before retrying.
fn is_resource_shortage(e: &io::Error) -> bool {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM (Linux numbers).
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

/// Accepts on `acceptor` forever, admitting against `limits`; each admitted
/// connection runs `handshake` (bounded by the timeout) on its own task and
/// is then given to `serve`, on that task. `name` labels logs and metrics.
pub async fn run<A, H, F, Fut>(
    name: &'static str,
    mut acceptor: A,
    handshake: H,
    limits: Limits,
    serve: F,
) where
    A: Accept,
    H: Handshake<A::Conn>,
    F: Fn(Admitted<H::Io>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let admission = Admission::new(limits);
    let local = acceptor.local_addr();
    let mut accept_log = RateLimitedLog::new();
    let refusal_log = Arc::new(Mutex::new(RateLimitedLog::new()));
    let refused = move |reason: Refusal, peer: SocketAddr| {
        METRICS.connection_refused(name, reason.label());
        if let Some(suppressed) = refusal_log.lock().unwrap().tick() {
            warn!(listener = name, %peer, reason = reason.label(), suppressed, "connection closed unserved");
        }
    };
    loop {
        let (conn, peer) = match acceptor.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                METRICS.accept_error(name);
                if let Some(suppressed) = accept_log.tick() {
                    warn!(listener = name, error = %e, suppressed, "accept failed; listener continues");
                }
                if is_resource_shortage(&e) {
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
                continue;
            }
        };
        let permit = match admission.admit(peer.ip()) {
            Ok(p) => p,
            Err(reason) => {
                drop(conn);
                refused(reason, peer);
                continue;
            }
        };
        let (handshake, serve, refused) = (handshake.clone(), serve.clone(), refused.clone());
        tokio::spawn(async move {
            let io = match tokio::time::timeout(limits.handshake_timeout, handshake.handshake(conn))
                .await
            {
                Ok(Ok(io)) => io,
                Ok(Err(_)) => return refused(Refusal::HandshakeFailed, peer),
                Err(_) => return refused(Refusal::HandshakeTimeout, peer),
            };
            serve(Admitted {
                io,
                remote: peer,
                local,
                _permit: permit,
            })
            .await;
        });
    }
}

/// The stream of admitted, handshaken connections that tonic's
/// `serve_with_incoming_shutdown` serves; the accept loop ends when the
/// stream is dropped (the server stopped).
pub fn incoming<A, H>(
    name: &'static str,
    acceptor: A,
    handshake: H,
    limits: Limits,
) -> ReceiverStream<Result<Admitted<H::Io>, Infallible>>
where
    A: Accept,
    H: Handshake<A::Conn>,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let closed = tx.clone();
    tokio::spawn(async move {
        let serve = move |conn| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(Ok(conn)).await;
            }
        };
        tokio::select! {
            _ = run(name, acceptor, handshake, limits, serve) => {}
            _ = closed.closed() => {}
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_connections: 3,
        max_per_ip: 2,
        handshake_timeout: Duration::from_secs(1),
    };

    #[test]
    fn admission_refuses_past_the_per_ip_and_total_caps_and_frees_places_on_drop() {
        let a = Admission::new(LIMITS);
        let (x, y) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let p1 = a.admit(x).unwrap();
        let _p2 = a.admit(x).unwrap();
        assert_eq!(a.admit(x).unwrap_err(), Refusal::PerIpCap);
        let _p3 = a.admit(y).unwrap();
        assert_eq!(a.admit(y).unwrap_err(), Refusal::TotalCap);
        drop(p1);
        assert_eq!(a.open(), 2);
        a.admit(x).unwrap();
    }

    #[test]
    fn the_connection_caps_fit_within_the_open_file_limit() {
        let l = Limits {
            max_connections: 2048,
            max_per_ip: 1024,
            ..LIMITS
        };
        assert_eq!(l.within_fd_limit(1 << 20), l);
        let small = l.within_fd_limit(1024);
        assert_eq!(small.max_connections, 384);
        assert!(small.max_per_ip <= small.max_connections);
    }

    #[tokio::test]
    async fn the_preface_is_replayed_to_the_server_after_it_was_checked() {
        let (mut client, server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nrest")
            .await
            .unwrap();
        drop(client);
        let mut io = Http2Preface(Plain).handshake(server).await.unwrap();
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nrest");
    }

    #[tokio::test]
    async fn a_connection_that_speaks_http1_fails_the_preface_check() {
        let (mut client, server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let e = Http2Preface(Plain).handshake(server).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
