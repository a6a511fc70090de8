//! An in-process fake of the coordinator's `berth.v1.Containers` and
//! `berth.v1.Images`, served by tonic on a loopback port, and a shim in
//! front of it, so tests drive the shim through a real HTTP client.
//!
//! The fake "runs" a container from its labels: `test.out` is written to
//! stdout and `test.err` to stderr at start, the container exits with
//! `test.exit` shortly after, or keeps running with `test.run=forever`.
//! Exec "runs" commands by a tiny interpreter (`exec.rs`).
//! Every call must carry `Bearer t0k` and namespace `ns`.

#![allow(dead_code)]

mod exec;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use berth_docker_shim::coordinator::Coordinator;
use berth_docker_shim::docker::system::Identity;
use berth_docker_shim::http::Shim;
use berth_docker_shim::token::TokenSource;
use berth_proto::agent::LogStream;
use berth_proto::api::containers_server::{Containers, ContainersServer};
use berth_proto::api::images_server::{Images, ImagesServer};
use berth_proto::api::*;
use futures::Stream;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// The token the fake accepts.
pub const TOKEN: &str = "t0k";
/// The namespace the fake serves.
pub const NAMESPACE: &str = "ns";

#[derive(Debug, Default)]
struct State {
    containers: BTreeMap<String, ContainerInfo>,
    /// Last exit code of every container that exited (also once removed).
    exits: BTreeMap<String, i32>,
    next: u64,
}

/// The fake coordinator.
#[derive(Clone)]
pub struct Fake {
    state: Arc<Mutex<State>>,
    changed: watch::Sender<u64>,
}

fn now() -> String {
    humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
}

fn check<T>(req: &Request<T>, namespace: &str) -> Result<(), Status> {
    let auth = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    if auth != Some(&format!("Bearer {TOKEN}")) {
        return Err(Status::unauthenticated("no valid bearer token"));
    }
    if namespace != NAMESPACE {
        return Err(Status::invalid_argument(format!(
            "wrong namespace {namespace}"
        )));
    }
    Ok(())
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl Fake {
    fn new() -> Self {
        Fake {
            state: Arc::new(Mutex::new(State::default())),
            changed: watch::channel(0).0,
        }
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    fn find(&self, id: &str) -> Result<ContainerInfo, Status> {
        let st = self.state.lock().unwrap();
        st.containers
            .values()
            .find(|c| c.id == id || c.name == id || (id.len() >= 3 && c.id.starts_with(id)))
            .cloned()
            .ok_or_else(|| Status::not_found(format!("container {id} not found")))
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut ContainerInfo)) {
        let mut st = self.state.lock().unwrap();
        if let Some(c) = st.containers.get_mut(id) {
            f(c);
        }
        drop(st);
        self.bump();
    }

    fn finish(&self, id: &str, code: i32) {
        let auto_remove = self
            .find(id)
            .map(|c| c.spec.unwrap_or_default().auto_remove)
            .unwrap_or(false);
        self.update(id, |c| {
            let s = c.state.get_or_insert_default();
            s.status = "exited".into();
            s.running = false;
            s.exit_code = code;
            s.finished_at = now();
        });
        self.state
            .lock()
            .unwrap()
            .exits
            .insert(id.to_string(), code);
        if auto_remove {
            self.state.lock().unwrap().containers.remove(id);
            self.bump();
        }
    }

    /// Waits until `pred` holds for the container (or it is gone: `None`).
    async fn until(&self, id: &str, pred: impl Fn(Option<&ContainerInfo>) -> bool) {
        let mut rx = self.changed.subscribe();
        loop {
            let c = self.state.lock().unwrap().containers.get(id).cloned();
            if pred(c.as_ref()) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

fn label(c: &ContainerInfo, key: &str) -> Option<String> {
    c.spec.as_ref()?.labels.get(key).cloned()
}

#[tonic::async_trait]
impl Containers for Fake {
    async fn create(
        &self,
        req: Request<CreateContainerRequest>,
    ) -> Result<Response<ContainerInfo>, Status> {
        check(&req, &req.get_ref().namespace)?;
        let mut spec = req.into_inner().spec.unwrap_or_default();
        if let Some(n) = spec.networks.iter().find(|n| n.as_str() == "nowhere") {
            return Err(Status::not_found(format!("network {n} not found")));
        }
        let mut st = self.state.lock().unwrap();
        st.next += 1;
        if spec.name.is_empty() {
            spec.name = format!("c{}", st.next);
        }
        if st.containers.values().any(|c| c.name == spec.name) {
            return Err(Status::already_exists(format!(
                "the name {} is in use",
                spec.name
            )));
        }
        let id = format!("{:064x}", st.next * 0x1111);
        let info = ContainerInfo {
            id: id.clone(),
            name: spec.name.clone(),
            namespace: NAMESPACE.into(),
            spec: Some(spec),
            created: now(),
            state: Some(ContainerState {
                status: "created".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        st.containers.insert(id, info.clone());
        Ok(Response::new(info))
    }

    async fn start(
        &self,
        req: Request<ContainerRequest>,
    ) -> Result<Response<ContainerInfo>, Status> {
        check(&req, &req.get_ref().namespace)?;
        let c = self.find(&req.get_ref().id)?;
        self.update(&c.id, |c| {
            let s = c.state.get_or_insert_default();
            s.status = "running".into();
            s.running = true;
            s.started_at = now();
            c.pod_name = format!("berth-{}", c.name);
            c.pod_ip = "10.0.0.7".into();
        });
        if label(&c, "test.run").as_deref() != Some("forever") {
            let code: i32 = label(&c, "test.exit")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let fake = self.clone();
            let id = c.id.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                fake.finish(&id, code);
            });
        }
        Ok(Response::new(self.find(&c.id)?))
    }

    async fn stop(
        &self,
        req: Request<StopContainerRequest>,
    ) -> Result<Response<ContainerInfo>, Status> {
        check(&req, &req.get_ref().namespace)?;
        let c = self.find(&req.get_ref().id)?;
        self.finish(&c.id, 143);
        self.find(&c.id).map(Response::new)
    }

    async fn kill(
        &self,
        req: Request<ContainerRequest>,
    ) -> Result<Response<ContainerInfo>, Status> {
        check(&req, &req.get_ref().namespace)?;
        let c = self.find(&req.get_ref().id)?;
        self.finish(&c.id, 137);
        self.find(&c.id).map(Response::new)
    }

    async fn remove(
        &self,
        req: Request<RemoveContainerRequest>,
    ) -> Result<Response<RemoveContainerResponse>, Status> {
        check(&req, &req.get_ref().namespace)?;
        let c = self.find(&req.get_ref().id)?;
        if c.state.as_ref().is_some_and(|s| s.running) && !req.get_ref().force {
            return Err(Status::failed_precondition(format!(
                "container {} is running: stop it first or force the removal",
                c.name
            )));
        }
        self.state.lock().unwrap().containers.remove(&c.id);
        self.bump();
        Ok(Response::new(RemoveContainerResponse {}))
    }

    async fn inspect(
        &self,
        req: Request<ContainerRequest>,
    ) -> Result<Response<ContainerInfo>, Status> {
        check(&req, &req.get_ref().namespace)?;
        self.find(&req.get_ref().id).map(Response::new)
    }

    async fn list(
        &self,
        req: Request<ListContainersRequest>,
    ) -> Result<Response<ListContainersResponse>, Status> {
        check(&req, &req.get_ref().namespace)?;
        let r = req.into_inner();
        let st = self.state.lock().unwrap();
        let containers = st
            .containers
            .values()
            .rev()
            .filter(|c| {
                let s = c.state.clone().unwrap_or_default();
                let labels = &c.spec.as_ref().unwrap().labels;
                (r.all || s.running)
                    && r.label_filters.iter().all(|f| match f.split_once('=') {
                        Some((k, v)) => labels.get(k).map(String::as_str) == Some(v),
                        None => labels.contains_key(f),
                    })
                    && (r.status_filters.is_empty() || r.status_filters.contains(&s.status))
                    && (r.name_filters.is_empty()
                        || r.name_filters.iter().any(|n| c.name.contains(n.as_str())))
                    && (r.id_filters.is_empty()
                        || r.id_filters.iter().any(|i| c.id.starts_with(i.as_str())))
            })
            .cloned()
            .collect();
        Ok(Response::new(ListContainersResponse { containers }))
    }

    async fn wait(
        &self,
        req: Request<WaitContainerRequest>,
    ) -> Result<Response<WaitContainerResponse>, Status> {
        check(&req, &req.get_ref().namespace)?;
        let c = self.find(&req.get_ref().id)?;
        self.until(&c.id, |c| {
            c.is_none_or(|c| c.state.clone().unwrap_or_default().status == "exited")
        })
        .await;
        let exit_code = self
            .state
            .lock()
            .unwrap()
            .exits
            .get(&c.id)
            .copied()
            .unwrap_or(0);
        Ok(Response::new(WaitContainerResponse {
            exit_code,
            error: String::new(),
        }))
    }

    type TunnelStream = BoxStream<TunnelOutput>;

    async fn stdin(
        &self,
        _req: Request<tonic::Streaming<StdinInput>>,
    ) -> Result<Response<StdinResult>, Status> {
        Err(Status::unimplemented("the fake has no stdin"))
    }

    async fn upload(
        &self,
        _req: Request<UploadRequest>,
    ) -> Result<Response<UploadResponse>, Status> {
        Err(Status::unimplemented("the fake keeps no files"))
    }

    type EventsStream = BoxStream<Event>;

    async fn events(
        &self,
        _req: Request<EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        Err(Status::unimplemented("the fake keeps no events"))
    }

    async fn prune_ended(
        &self,
        _req: Request<PruneRequest>,
    ) -> Result<Response<PruneResponse>, Status> {
        Err(Status::unimplemented("the fake has no sessions to prune"))
    }

    async fn tunnel(
        &self,
        _: Request<tonic::Streaming<TunnelInput>>,
    ) -> Result<Response<Self::TunnelStream>, Status> {
        Err(Status::unimplemented("the fake coordinator has no tunnels"))
    }

    type SessionStream = BoxStream<SessionState>;

    async fn session(
        &self,
        _: Request<SessionRequest>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        Err(Status::unimplemented(
            "the fake coordinator holds no sessions",
        ))
    }

    type ExecStream = BoxStream<ExecOutput>;

    async fn exec(
        &self,
        req: Request<tonic::Streaming<ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        check(&req, NAMESPACE)?;
        let mut input = req.into_inner();
        let Some(ExecInput {
            kind: Some(exec_input::Kind::Start(start)),
        }) = input.message().await?
        else {
            return Err(Status::invalid_argument(
                "the first message must be an ExecStart",
            ));
        };
        if start.namespace != NAMESPACE {
            return Err(Status::invalid_argument(format!(
                "wrong namespace {}",
                start.namespace
            )));
        }
        let c = self.find(&start.id)?;
        if !c.state.clone().unwrap_or_default().running {
            return Err(Status::failed_precondition(format!(
                "container {} is not running",
                c.name
            )));
        }
        Ok(Response::new(async_stream(move |tx| async move {
            exec::interpret(start, input, tx).await
        })))
    }

    type LogsStream = BoxStream<LogChunk>;

    async fn logs(
        &self,
        req: Request<ContainerLogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        check(&req, &req.get_ref().namespace)?;
        let r = req.into_inner();
        let c = self.find(&r.id)?;
        let fake = self.clone();
        let stream = async_stream(move |tx| async move {
            let started = |c: Option<&ContainerInfo>| {
                c.is_none_or(|c| !c.state.clone().unwrap_or_default().started_at.is_empty())
            };
            if r.wait_for_start {
                fake.until(&c.id, started).await;
            } else if !started(fake.state.lock().unwrap().containers.get(&c.id)) {
                return;
            }
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as i64;
            for (key, stream, wanted) in [
                ("test.out", LogStream::Stdout, r.stdout),
                ("test.err", LogStream::Stderr, r.stderr),
            ] {
                if let Some(text) = label(&c, key).filter(|_| wanted) {
                    let chunk = LogChunk {
                        stream: stream as i32,
                        data: text.into_bytes(),
                        time_unix_nanos: t,
                    };
                    if tx.send(Ok(chunk)).await.is_err() {
                        return;
                    }
                }
            }
            if r.follow {
                fake.until(&c.id, |c| {
                    c.is_none_or(|c| !c.state.clone().unwrap_or_default().running)
                })
                .await;
            }
        });
        Ok(Response::new(stream))
    }
}

/// A stream fed by a task (`tx` closes it when the task ends).
fn async_stream<T, F, Fut>(f: F) -> BoxStream<T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl Images for Fake {
    type PullStream = BoxStream<PullProgress>;

    async fn pull(&self, req: Request<ImageRequest>) -> Result<Response<Self::PullStream>, Status> {
        check(&req, &req.get_ref().namespace)?;
        let image = req.into_inner().image;
        if image.starts_with("missing") {
            return Err(Status::not_found(format!(
                "{image} does not exist in its registry"
            )));
        }
        let broken = image.starts_with("broken");
        let stream = async_stream(move |tx| async move {
            let _ = tx
                .send(Ok(PullProgress {
                    status: format!("Resolving {image}"),
                }))
                .await;
            if broken {
                let _ = tx
                    .send(Err(Status::unavailable("registry went away")))
                    .await;
            } else {
                let _ = tx
                    .send(Ok(PullProgress {
                        status: "Digest: sha256:abc".into(),
                    }))
                    .await;
            }
        });
        Ok(Response::new(stream))
    }

    async fn inspect(&self, req: Request<ImageRequest>) -> Result<Response<ImageInfo>, Status> {
        check(&req, &req.get_ref().namespace)?;
        let image = req.into_inner().image;
        if image.starts_with("missing") {
            return Err(Status::not_found(format!("{image}: manifest unknown")));
        }
        Ok(Response::new(ImageInfo {
            reference: image.clone(),
            id: "sha256:cfg".into(),
            repo_digest: format!("{image}@sha256:man"),
            os: "linux".into(),
            architecture: "amd64".into(),
            ..Default::default()
        }))
    }
}

/// A running fake coordinator and a shim in front of it.
pub struct Harness {
    /// The shim's TCP address.
    pub addr: std::net::SocketAddr,
    /// The shim itself, to serve it elsewhere too.
    pub shim: Arc<Shim>,
}

/// Starts the fake coordinator and a shim sending `token`.
pub async fn start_with_token(token: &str) -> Harness {
    let fake = Fake::new();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = grpc.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ContainersServer::new(fake.clone()))
            .add_service(ImagesServer::new(fake))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc)),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc_addr}"))
        .unwrap()
        .connect_lazy();
    let shim = Arc::new(Shim {
        coordinator: Coordinator::new(channel, TokenSource::fixed(token), NAMESPACE),
        identity: Identity {
            id: "shim-id".into(),
            name: "test-host".into(),
            namespace: NAMESPACE.into(),
            coordinator: format!("http://{grpc_addr}"),
        },
        forwards: Default::default(),
        reapers: Default::default(),
        pod_defaults: Default::default(),
        execs: Default::default(),
    });
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = http.local_addr().unwrap();
    tokio::spawn(berth_docker_shim::http::serve_tcp(shim.clone(), http));
    Harness { addr, shim }
}

/// Starts the fake coordinator and a shim with the right token.
pub async fn start() -> Harness {
    start_with_token(TOKEN).await
}
