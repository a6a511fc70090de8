//! Floods without credentials against the real coordinator server, in
//! process, with a fake token verifier that counts what it is asked.
//!
//! Each test starts `server::serve_with` on a loopback port and floods it the
//! way an ordinary pod without a token could: huge Hellos behind garbage
//! tokens, thousands of streams on one HTTP/2 connection, silent TCP
//! connections, accept errors. Tests run one at a time (one process-wide
//! lock), so the memory test measures its own flood only.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use berth_coordinator::access::{AccessError, Caller, ResourceAccess, Reviewer, TokenVerdict};
use berth_coordinator::auth::{AgentIdentity, AuthError, TokenIdentity, TokenVerifier};
use berth_coordinator::listener::{self, Accept};
use berth_coordinator::metrics::METRICS;
use berth_coordinator::nodes::NodeRegistry;
use berth_coordinator::server::{self, Limits, Plain};
use berth_proto::agent as pb;
use berth_proto::agent::agent_service_client::AgentServiceClient;
use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_client::HealthClient;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A JWT-shaped token the fake refuses (shaped so it reaches the verifier).
const GARBAGE: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJub2JvZHkifQ.Zm9yZ2Vk";

/// Refuses every token, after a little latency like the apiserver's;
/// counts reviews, the most in flight at once, and node checks (which only
/// happen after a Hello was decoded).
#[derive(Default)]
struct Fake {
    reviews: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    node_checks: AtomicUsize,
}

/// Decrements its counter when dropped.
struct Leave<'a>(&'a AtomicUsize);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl TokenVerifier for Fake {
    async fn review(&self, _token: &str) -> Result<TokenIdentity, AuthError> {
        self.reviews.fetch_add(1, Ordering::SeqCst);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        // Counted out even when the stream is cancelled mid-review.
        let _done = Leave(&self.in_flight);
        tokio::time::sleep(Duration::from_millis(20)).await;
        Err(AuthError::Rejected("fake: every token is bad".into()))
    }

    async fn check_node(
        &self,
        _token: &TokenIdentity,
        _node: &str,
    ) -> Result<AgentIdentity, AuthError> {
        self.node_checks.fetch_add(1, Ordering::SeqCst);
        Err(AuthError::NotPodBound)
    }
}

/// The public API is not flooded here: no token is valid for it.
struct NoCallers;

impl Reviewer for NoCallers {
    async fn review_token(&self, _token: &str) -> Result<TokenVerdict, AccessError> {
        Ok(TokenVerdict::Invalid("no callers in this test".into()))
    }

    async fn review_access(&self, _: &Caller, _: &ResourceAccess) -> Result<bool, AccessError> {
        Ok(false)
    }
}

/// Starts the server on a loopback port with `limits`; returns its address.
async fn start<A>(acceptor: A, addr: SocketAddr, limits: Limits, fake: Arc<Fake>) -> SocketAddr
where
    A: Accept<Conn = TcpStream>,
{
    let (stop, stopping) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _stop = stop;
        let services = server::Services {
            registry: Arc::new(NodeRegistry::default()),
            details: Default::default(),
            verifier: fake,
            reviewer: NoCallers,
            health: tonic_health::server::HealthReporter::new(),
            // Leading: sessions get as far as the token check.
            leading: tokio::sync::watch::channel(true).1,
            containers: None,
        };
        server::serve_with(acceptor, Plain, limits, services, stopping)
            .await
            .unwrap();
    });
    addr
}

async fn start_default(fake: Arc<Fake>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    start(l, addr, Limits::default(), fake).await
}

/// A channel to `addr` from source address `from` (any 127.0.0.0/8 works).
async fn channel_from(from: IpAddr, addr: SocketAddr) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_| async move {
            let s = TcpSocket::new_v4()?;
            s.bind(SocketAddr::new(from, 0))?;
            Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(s.connect(addr).await?))
        }))
        .await
}

/// `grpc.health.v1.Health/Check` of the whole server from `from`.
async fn health_from(from: IpAddr, addr: SocketAddr) -> anyhow::Result<()> {
    let ch = tokio::time::timeout(Duration::from_secs(5), channel_from(from, addr)).await??;
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        HealthClient::new(ch).check(tonic_health::pb::HealthCheckRequest::default()),
    )
    .await??;
    anyhow::ensure!(r.into_inner().status == 1, "not SERVING");
    Ok(())
}

fn local(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// Polls `f` until it holds or `timeout` passes.
async fn eventually<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// One gRPC message frame: uncompressed flag, length, protobuf.
fn grpc_frame(msg: &impl prost::Message) -> Bytes {
    let body = msg.encode_to_vec();
    let mut b = BytesMut::with_capacity(5 + body.len());
    b.put_u8(0);
    b.put_u32(body.len() as u32);
    b.put_slice(&body);
    b.freeze()
}

/// Opens a Session with raw HTTP/2 (so the client shares one copy of
/// `body` across all its streams) and returns the grpc-status.
async fn raw_session(addr: SocketAddr, token: &str, body: Bytes) -> anyhow::Result<u32> {
    let tcp = TcpStream::connect(addr).await?;
    let (client, conn) = h2::client::handshake(tcp).await?;
    tokio::spawn(conn);
    let mut client = client.ready().await?;
    let req = http::Request::post(format!("http://{addr}/berth.agent.v1.AgentService/Session"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {token}"))
        .body(())?;
    let (response, mut send) = client.send_request(req, false)?;
    send.send_data(body, true)?;
    let response = tokio::time::timeout(Duration::from_secs(30), response).await??;
    let status = |h: &http::HeaderMap| {
        h.get("grpc-status")
            .and_then(|v| v.to_str().ok()?.parse::<u32>().ok())
    };
    if let Some(s) = status(response.headers()) {
        return Ok(s);
    }
    let mut body = response.into_body();
    while body.data().await.is_some() {}
    let trailers = body.trailers().await?.unwrap_or_default();
    status(&trailers).ok_or_else(|| anyhow::anyhow!("no grpc-status"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_tokens_with_huge_hellos_neither_grow_memory_nor_get_a_hello_decoded() {
    let _serial = SERIAL.lock().await;
    let fake = Arc::new(Fake::default());
    let addr = start_default(fake.clone()).await;
    health_from(local(1), addr).await.unwrap();

    // 3.9 MB Hello, one copy shared by all 150 streams.
    let hello = pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
            node_name: "x".repeat(3_900_000),
            ..Default::default()
        })),
    };
    let body = grpc_frame(&hello);
    let before = rss_kb();
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampling = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kb(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let attempts: Vec<_> = (0..150)
        .map(|_| tokio::spawn(raw_session(addr, GARBAGE, body.clone())))
        .collect();
    for a in attempts {
        let code = a.await.unwrap().unwrap();
        assert!(
            code == tonic::Code::Unauthenticated as u32
                || code == tonic::Code::ResourceExhausted as u32,
            "grpc-status {code}"
        );
    }
    peak.fetch_max(rss_kb(), Ordering::Relaxed);
    sampling.abort();
    let grown_mb = (peak.load(Ordering::Relaxed).saturating_sub(before)) / 1024;
    eprintln!("RSS grew by {grown_mb} MB during the flood");
    // Decoding the Hellos would take 150 × 3.9 MB × 2 (buffer and message)
    // ≈ 1.1 GB; refused before reading, each stream buffers at most its
    // 64 KiB window: ~10 MB, plus client and allocator noise.
    assert!(grown_mb < 100, "RSS grew by {grown_mb} MB during the flood");
    assert_eq!(
        fake.node_checks.load(Ordering::SeqCst),
        0,
        "a Hello was decoded"
    );
    health_from(local(1), addr).await.unwrap();
}

/// Whether `c` is how a flood stream may end: refused, or cut off with its
/// connection (hyper closes a connection after 1024 streams it had to reset,
/// `max_local_error_reset_streams`; the channel then dials again).
fn refused_or_cut_off(c: &tonic::Code) -> bool {
    matches!(
        c,
        tonic::Code::Unauthenticated
            | tonic::Code::ResourceExhausted
            | tonic::Code::Unknown
            | tonic::Code::Unavailable
            | tonic::Code::Cancelled
    )
}

/// How many streams ended with each code.
fn tally(codes: &[tonic::Code]) -> std::collections::BTreeMap<String, usize> {
    let mut t = std::collections::BTreeMap::new();
    for c in codes {
        *t.entry(format!("{c:?}")).or_default() += 1;
    }
    t
}

/// Opens `n` Session streams on one channel, token `token(i)` each, and
/// returns their status codes.
async fn streams_on_one_connection(
    addr: SocketAddr,
    n: usize,
    token: impl Fn(usize) -> String,
) -> Vec<tonic::Code> {
    let channel = channel_from(local(1), addr).await.unwrap();
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let mut client = AgentServiceClient::new(channel.clone());
            let token = token(i);
            tokio::spawn(async move {
                let hello = pb::AgentMessage {
                    kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
                        node_name: "flood".into(),
                        ..Default::default()
                    })),
                };
                let mut req = tonic::Request::new(tokio_stream::iter([hello]));
                req.metadata_mut()
                    .insert("authorization", format!("Bearer {token}").parse().unwrap());
                match client.session(req).await {
                    Ok(_) => tonic::Code::Ok,
                    Err(e) => e.code(),
                }
            })
        })
        .collect();
    let mut codes = Vec::with_capacity(n);
    for c in calls {
        codes.push(c.await.unwrap());
    }
    codes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_thousand_streams_with_one_garbage_token_on_one_connection_make_a_handful_of_reviews()
{
    let _serial = SERIAL.lock().await;
    let fake = Arc::new(Fake::default());
    let addr = start_default(fake.clone()).await;
    let codes = streams_on_one_connection(addr, 3000, |_| GARBAGE.to_string()).await;
    let tally = tally(&codes);
    assert!(codes.iter().all(refused_or_cut_off), "{tally:?}");
    assert!(
        tally.get("Unauthenticated").copied().unwrap_or_default() >= 100,
        "the bad token was refused as such: {tally:?}"
    );
    eprintln!("{tally:?}");
    let per_peer = Limits::default().sessions.reviews.in_flight_per_peer;
    let reviews = fake.reviews.load(Ordering::SeqCst);
    assert!(
        reviews <= per_peer,
        "{reviews} TokenReviews for one bad token (bound {per_peer})"
    );
    assert_eq!(fake.node_checks.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_thousand_distinct_garbage_tokens_never_have_more_reviews_in_flight_than_the_bound() {
    let _serial = SERIAL.lock().await;
    let fake = Arc::new(Fake::default());
    let addr = start_default(fake.clone()).await;
    let codes = streams_on_one_connection(addr, 3000, |i| format!("eyJ{i}.eyJ{i}.c2ln")).await;
    let tally = tally(&codes);
    assert!(codes.iter().all(refused_or_cut_off), "{tally:?}");
    let bound = Limits::default().sessions.reviews.in_flight_per_peer;
    let max = fake.max_in_flight.load(Ordering::SeqCst);
    assert!(
        max <= bound,
        "{max} reviews in flight at once (bound {bound})"
    );
    assert!(
        tally.contains_key("ResourceExhausted"),
        "the bound was reached and answered at once: {tally:?}"
    );
}

/// Opens a TCP connection from `from` that sends nothing.
async fn silent(from: IpAddr, addr: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(from, 0)).unwrap();
    s.connect(addr).await.unwrap()
}

/// Whether the server closes `conn` within `within`.
async fn closed_within(conn: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(within, conn.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_beyond_the_caps_are_closed_at_once_the_rest_at_the_handshake_timeout() {
    let _serial = SERIAL.lock().await;
    let limits = Limits {
        connections: listener::Limits {
            max_connections: 16,
            max_per_ip: 8,
            // Long enough that a loaded machine opens all 20 in time.
            handshake_timeout: Duration::from_secs(6),
        },
        ..Limits::default()
    };
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    start(l, addr, limits, Arc::new(Fake::default())).await;
    health_from(local(9), addr).await.unwrap();

    // 10 silent connections from each of two addresses: 8 + 8 fill both
    // per-IP caps and the total; the last 2 of each are closed at once.
    let mut held = Vec::new();
    for from in [local(1), local(2)] {
        for i in 0..10 {
            let mut c = silent(from, addr).await;
            if i >= 8 {
                assert!(
                    closed_within(&mut c, Duration::from_secs(1)).await,
                    "connection {i} from {from} beyond the per-IP cap still open"
                );
            } else {
                held.push(c);
            }
        }
    }
    // A third address finds the total cap reached.
    assert!(
        health_from(local(3), addr).await.is_err(),
        "a connection beyond the total cap was served"
    );
    // The silent ones are closed at the handshake timeout, and the port
    // serves again.
    for c in &mut held {
        assert!(
            closed_within(c, Duration::from_secs(10)).await,
            "silent connection kept"
        );
    }
    eventually(Duration::from_secs(5), "a served health check", || async {
        health_from(local(3), addr).await.is_ok()
    })
    .await;
    let text = METRICS.render();
    for reason in ["per_ip_cap", "total_cap", "handshake_timeout"] {
        assert!(
            text.contains(&format!(
                "berth_connections_refused_total{{listener=\"grpc\",reason=\"{reason}\"}}"
            )),
            "{reason} not counted:\n{text}"
        );
    }
}

/// A listener whose first `failures` accepts fail with EMFILE.
struct Failing {
    inner: TcpListener,
    failures: usize,
}

impl Accept for Failing {
    type Conn = TcpStream;

    async fn accept(&mut self) -> io::Result<(TcpStream, SocketAddr)> {
        if self.failures > 0 {
            self.failures -= 1;
            return Err(io::Error::from_raw_os_error(24));
        }
        Accept::accept(&mut self.inner).await
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        self.inner.local_addr().ok()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_port_keeps_serving_after_accept_fails_with_too_many_open_files() {
    let _serial = SERIAL.lock().await;
    let inner = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = inner.local_addr().unwrap();
    let failing = Failing { inner, failures: 3 };
    start(failing, addr, Limits::default(), Arc::new(Fake::default())).await;
    health_from(local(1), addr).await.unwrap();
    assert!(
        METRICS
            .render()
            .contains("berth_accept_errors_total{listener=\"grpc\"}")
    );
}

async fn scrape(addr: SocketAddr) -> io::Result<String> {
    let mut c = TcpStream::connect(addr).await?;
    c.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await?;
    let mut out = String::new();
    c.read_to_string(&mut out).await?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_port_keeps_serving_after_accept_fails_with_too_many_open_files() {
    let _serial = SERIAL.lock().await;
    let inner = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = inner.local_addr().unwrap();
    tokio::spawn(berth_coordinator::metrics::serve_on(Failing {
        inner,
        failures: 3,
    }));
    let text = tokio::time::timeout(Duration::from_secs(5), scrape(addr))
        .await
        .unwrap()
        .unwrap();
    assert!(text.starts_with("HTTP/1.0 200"), "{text}");
    assert!(
        text.contains("berth_accept_errors_total{listener=\"metrics\"} 3"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_connections_beyond_the_cap_are_closed_and_scrapes_still_work() {
    let _serial = SERIAL.lock().await;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(berth_coordinator::metrics::serve_on(l));
    let cap = berth_coordinator::metrics::LIMITS.max_per_ip;
    let mut held = Vec::new();
    for _ in 0..cap {
        held.push(silent(local(1), addr).await);
    }
    let mut over = silent(local(1), addr).await;
    assert!(closed_within(&mut over, Duration::from_secs(2)).await);
    let from_elsewhere = {
        let mut c = silent(local(2), addr).await;
        c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    };
    assert!(
        from_elsewhere.starts_with("HTTP/1.0 200"),
        "{from_elsewhere}"
    );
    // Silent ones are cut off by the header read timeout.
    for c in &mut held {
        let within = berth_coordinator::metrics::HEADER_READ_TIMEOUT + Duration::from_secs(3);
        assert!(
            closed_within(c, within).await,
            "silent metrics connection kept"
        );
    }
}
