//! Ryuk, the reaper testcontainers starts before anything else, served by
//! the shim itself.
//!
//! testcontainers (Java, Go, Python, …) creates a container of the image
//! `testcontainers/ryuk` with the Docker socket bind-mounted, connects to
//! its port 8080, sends label filters (`label=org.testcontainers.sessionId=…`,
//! one set per line, `&`-separated and URL-encoded) and keeps the connection
//! open for its whole run. Once every connection has been closed for the
//! reconnection timeout (10 s unless `RYUK_RECONNECTION_TIMEOUT` says
//! otherwise), Ryuk removes every container and network matching any set.
//!
//! The real image cannot work here: its pod has no Docker socket, and the
//! cluster may not reach Docker Hub. So a create of that image makes a
//! [`Reaper`] in the shim instead of a pod: it answers inspect, start, logs
//! (`Started!`), stop and remove like a container, listens on the published
//! port on the shim's host, and prunes through the coordinator with the
//! shim's own session, so it can reach only what this shim made. Its
//! pulls and image inspects are answered by the shim too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_proto::api::{ContainerInfo, ContainerSpec, ContainerState, PortBinding};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::coordinator::Coordinator;

/// Ryuk's port inside its container.
pub const RYUK_PORT: u32 = 8080;
/// How long Ryuk waits after the last connection closed, by default.
pub const DEFAULT_RECONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long Ryuk waits for its first connection before it gives up.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);
/// The line Ryuk's log shows once it listens (clients wait for `Started`).
pub const STARTED_LINE: &[u8] = b"Berth's built-in Ryuk: Started!\n";

fn now() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    crate::docker::time::fixed_nanos(nanos)
}

/// Whether `image` is Ryuk's image, under any registry or tag.
pub fn is_ryuk_image(image: &str) -> bool {
    let name = image.split('@').next().unwrap_or(image);
    let repo = match name.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => name,
    };
    repo == "testcontainers/ryuk" || repo.ends_with("/testcontainers/ryuk")
}

/// Reads one line of Ryuk's protocol: the label filters of one set
/// (`k=v` or `k`), all of which a container must carry to be pruned.
/// Other filter kinds are not understood and are dropped.
pub fn parse_filters(line: &str) -> Vec<String> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    line.trim()
        .split('&')
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            (decode(key) == "label").then(|| decode(value))
        })
        .filter(|v| !v.is_empty())
        .collect()
}

/// A duration as Ryuk's environment writes it: `10s`, `1m`, `500ms`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = number.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

/// One Ryuk "container" served by the shim.
#[derive(Debug)]
pub struct Reaper {
    info: Mutex<ContainerInfo>,
    reconnection_timeout: Duration,
    ended: watch::Sender<bool>,
}

impl Reaper {
    /// A created, not yet started Ryuk named `name` (may be empty) with
    /// `spec` (image, labels, env, ports as the client asked).
    pub fn new(name: &str, mut spec: ContainerSpec) -> Self {
        let id = (0..4)
            .map(|_| format!("{:016x}", fastrand::u64(..)))
            .collect::<String>();
        let name = if name.is_empty() {
            format!("berth_ryuk_{}", &id[..8])
        } else {
            name.trim_start_matches('/').to_string()
        };
        spec.name = name.clone();
        let reconnection_timeout = spec
            .env
            .iter()
            .find_map(|e| e.strip_prefix("RYUK_RECONNECTION_TIMEOUT="))
            .and_then(parse_duration)
            .unwrap_or(DEFAULT_RECONNECTION_TIMEOUT);
        let info = ContainerInfo {
            id,
            name,
            spec: Some(spec),
            created: now(),
            state: Some(ContainerState {
                status: "created".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        Reaper {
            info: Mutex::new(info),
            reconnection_timeout,
            ended: watch::channel(false).0,
        }
    }

    /// The container as inspect and list show it.
    pub fn info(&self) -> ContainerInfo {
        self.info.lock().unwrap().clone()
    }

    /// Whether it is serving.
    pub fn running(&self) -> bool {
        self.info().state.is_some_and(|s| s.running)
    }

    fn set_state(&self, f: impl FnOnce(&mut ContainerState)) {
        let mut info = self.info.lock().unwrap();
        f(info.state.get_or_insert_with(Default::default));
    }

    /// Waits until it has stopped (pruned, or stopped by a client).
    pub async fn ended(&self) {
        let _ = self.ended.subscribe().wait_for(|e| *e).await;
    }

    /// Marks it exited with `code`.
    pub fn finish(&self, code: i32) {
        self.set_state(|s| {
            s.status = "exited".into();
            s.running = false;
            s.exit_code = code;
            s.finished_at = now();
        });
        self.ended.send_replace(true);
    }
}

/// The shim's Ryuks by ID; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Reapers {
    inner: Arc<Mutex<HashMap<String, Arc<Reaper>>>>,
}

impl Reapers {
    /// Keeps `reaper`, answering it.
    pub fn add(&self, reaper: Reaper) -> Arc<Reaper> {
        let reaper = Arc::new(reaper);
        self.inner
            .lock()
            .unwrap()
            .insert(reaper.info().id, reaper.clone());
        reaper
    }

    /// The Ryuk `key` names: its ID, a unique ID prefix, or its name.
    pub fn find(&self, key: &str) -> Option<Arc<Reaper>> {
        let key = key.trim_start_matches('/');
        let all = self.inner.lock().unwrap();
        let mut hits = all.values().filter(|r| {
            let info = r.info();
            info.name == key || (key.len() >= 4 && info.id.starts_with(key))
        });
        let first = hits.next()?.clone();
        hits.next().is_none().then_some(first)
    }

    /// Forgets the Ryuk with this ID.
    pub fn remove(&self, id: &str) {
        self.inner.lock().unwrap().remove(id);
    }

    /// Every Ryuk, for the container list.
    pub fn all(&self) -> Vec<ContainerInfo> {
        self.inner
            .lock()
            .unwrap()
            .values()
            .map(|r| r.info())
            .collect()
    }
}

/// Starts serving Ryuk's protocol on the reaper's published port 8080
/// (`127.0.0.1`, the host port chosen at create), pruning through
/// `coordinator` once its clients are gone.
pub async fn start(
    reaper: Arc<Reaper>,
    reapers: Reapers,
    coordinator: Coordinator,
) -> std::io::Result<()> {
    let port = reaper
        .info()
        .spec
        .and_then(|s| s.ports.into_iter().find(|p| p.container_port == RYUK_PORT))
        .map(|p| p.host_port)
        .unwrap_or(0);
    let listener = TcpListener::bind(("127.0.0.1", u16::try_from(port).unwrap_or(0))).await?;
    let bound = listener.local_addr()?.port();
    {
        let mut info = reaper.info.lock().unwrap();
        let spec = info.spec.get_or_insert_with(Default::default);
        match spec
            .ports
            .iter_mut()
            .find(|p| p.container_port == RYUK_PORT)
        {
            Some(p) => p.host_port = u32::from(bound),
            None => spec.ports.push(PortBinding {
                container_port: RYUK_PORT,
                protocol: "tcp".into(),
                host_port: u32::from(bound),
            }),
        }
        let state = info.state.get_or_insert_with(Default::default);
        state.status = "running".into();
        state.running = true;
        state.started_at = now();
    }
    tracing::info!(id = %reaper.info().id, port = bound, "Ryuk started (built into the shim)");
    tokio::spawn(async move {
        let filters = serve(&listener, &reaper).await;
        drop(listener);
        if !filters.is_empty() {
            prune(&coordinator, &filters).await;
        }
        reaper.finish(0);
        if reaper.info().spec.is_some_and(|s| s.auto_remove) {
            reapers.remove(&reaper.info().id);
        }
    });
    Ok(())
}

/// Accepts clients until none has been connected for the reconnection
/// timeout (or none came at all), or a client stopped the reaper; answers
/// the filter sets they sent.
async fn serve(listener: &TcpListener, reaper: &Reaper) -> Vec<Vec<String>> {
    let filters: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
    let (live_tx, mut live) = watch::channel(0usize);
    let live_tx = Arc::new(live_tx);
    let mut stopped = reaper.ended.subscribe();
    let mut ever = false;
    loop {
        let idle = if *live.borrow_and_update() > 0 {
            Duration::MAX
        } else if ever {
            reaper.reconnection_timeout
        } else {
            CONNECTION_TIMEOUT
        };
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((conn, _)) = accepted else { continue };
                ever = true;
                live_tx.send_modify(|n| *n += 1);
                let (filters, live_tx) = (filters.clone(), live_tx.clone());
                tokio::spawn(async move {
                    client(conn, &filters).await;
                    live_tx.send_modify(|n| *n -= 1);
                });
            }
            _ = live.changed() => {}
            _ = stopped.wait_for(|e| *e) => break,
            _ = tokio::time::sleep(idle) => break,
        }
    }
    filters.lock().unwrap().clone()
}

/// Most bytes one client may send (filter lines are short).
const MAX_CLIENT_BYTES: u64 = 64 << 10;
/// Most filter sets kept.
const MAX_SETS: usize = 64;

/// One client: each line is a filter set, acknowledged with `ACK`.
async fn client(conn: TcpStream, filters: &Mutex<Vec<Vec<String>>>) {
    use tokio::io::AsyncReadExt;
    let (read, mut write) = conn.into_split();
    let mut lines = BufReader::new(read.take(MAX_CLIENT_BYTES)).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let set = parse_filters(&line);
        if set.is_empty() {
            tracing::warn!(%line, "Ryuk: a line without label filters; ignored");
        } else {
            tracing::info!(filters = ?set, "Ryuk: will prune what matches");
            let mut all = filters.lock().unwrap();
            if !all.contains(&set) && all.len() < MAX_SETS {
                all.push(set);
            }
        }
        if write.write_all(b"ACK\n").await.is_err() {
            break;
        }
    }
}

/// Removes every container, then every network, matching any set.
async fn prune(coordinator: &Coordinator, filters: &[Vec<String>]) {
    for set in filters {
        coordinator.remove_labelled(set, "Ryuk").await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ryuk_is_recognised_under_any_registry_and_tag() {
        for yes in [
            "testcontainers/ryuk:0.8.1",
            "testcontainers/ryuk",
            "docker.io/testcontainers/ryuk:0.12.0",
            "mirror.local:5000/testcontainers/ryuk@sha256:abcd",
        ] {
            assert!(is_ryuk_image(yes), "{yes}");
        }
        for no in [
            "busybox",
            "testcontainers/sshd:1.2",
            "ryuk:1",
            "x/testcontainers/ryuk-fork:1",
        ] {
            assert!(!is_ryuk_image(no), "{no}");
        }
    }

    #[test]
    fn both_clients_filter_lines_are_read() {
        // testcontainers-java: URL-encoded pairs joined with `&`.
        assert_eq!(
            parse_filters(
                "label=org.testcontainers%3Dtrue&label=org.testcontainers.sessionId%3Dabc-1\n"
            ),
            [
                "org.testcontainers=true",
                "org.testcontainers.sessionId=abc-1"
            ]
        );
        // testcontainers-python: raw, CRLF.
        assert_eq!(
            parse_filters("label=org.testcontainers.session-id=7f3e\r\n"),
            ["org.testcontainers.session-id=7f3e"]
        );
        assert!(parse_filters("name=web").is_empty());
        assert!(parse_filters("").is_empty());
    }

    #[test]
    fn reconnection_timeouts_read_as_ryuk_writes_them() {
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("99999999999999999999h"), None);
        assert_eq!(parse_duration(&format!("{}h", u64::MAX)), None);
        assert_eq!(parse_duration("s"), None);
    }

    #[tokio::test]
    async fn a_client_gets_an_ack_per_line_and_its_sets_are_kept() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spec = ContainerSpec {
            env: vec!["RYUK_RECONNECTION_TIMEOUT=100ms".into()],
            ..Default::default()
        };
        let reaper = Reaper::new("testcontainers-ryuk-1", spec);
        let served = tokio::spawn(async move { serve(&listener, &reaper).await });
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"label=a%3D1&label=b\nlabel=c=2\r\n")
            .await
            .unwrap();
        let mut acks = BufReader::new(&mut conn);
        for _ in 0..2 {
            let mut line = String::new();
            acks.read_line(&mut line).await.unwrap();
            assert_eq!(line, "ACK\n");
        }
        drop(conn);
        // Ends by itself once the client has been gone for 100 ms.
        let sets = served.await.unwrap();
        assert_eq!(
            sets,
            [
                vec!["a=1".to_string(), "b".to_string()],
                vec!["c=2".to_string()]
            ]
        );
    }
}
