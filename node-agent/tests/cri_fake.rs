//! The CRI client against a fake CRI server on a temporary unix socket: every
//! connection failure the operator can meet, the runtime's pull failures
//! (as containerd words them) turned into the right `CriError`, and a runtime
//! that exits and comes back on a new socket file at the same path — seen by
//! the client and by the `node-agent run` health endpoint the kubelet probes.
//! The log reader's container lookup (`ContainerLookup`) is checked against
//! the fake's containers, filtered by the kubelet's labels as containerd does.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use berth_node_agent::cri::{CriError, CriRuntime};
use berth_node_agent::runtime::{
    ContainerLog, ContainerLookup, ContainerState, ImageRuntime, RegistryAuth,
};
use berth_node_agent::testing::missing_prerequisite;
use berth_proto::reference::Reference;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_server::{ImageService, ImageServiceServer};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

/// What the fake registry behind the fake runtime holds.
#[derive(Default)]
struct FakeState {
    /// reference → image id
    registry: BTreeMap<String, String>,
    /// image id → image
    images: BTreeMap<String, cri::Image>,
    /// reference → the error PullImage answers with
    pull_errors: BTreeMap<String, Status>,
    /// the credentials the last pull carried
    last_auth: Option<cri::AuthConfig>,
    /// PullImage calls received
    pulls: u32,
    /// references whose PullImage never answers (until the runtime exits)
    hanging: Vec<String>,
}

#[derive(Clone, Default)]
struct FakeImages(Arc<Mutex<FakeState>>);

fn find<'a>(st: &'a FakeState, image: &str) -> Option<&'a cri::Image> {
    st.images
        .values()
        .find(|i| i.id == image || i.repo_tags.iter().any(|t| t == image))
}

#[tonic::async_trait]
impl ImageService for FakeImages {
    async fn list_images(
        &self,
        _: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        let images = self.0.lock().unwrap().images.values().cloned().collect();
        Ok(Response::new(cri::ListImagesResponse { images }))
    }

    async fn image_status(
        &self,
        r: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        let image = r.into_inner().image.unwrap_or_default().image;
        let st = self.0.lock().unwrap();
        Ok(Response::new(cri::ImageStatusResponse {
            image: find(&st, &image).cloned(),
            info: Default::default(),
        }))
    }

    async fn pull_image(
        &self,
        r: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let r = r.into_inner();
        let image = r.image.unwrap_or_default().image;
        let hang = {
            let mut st = self.0.lock().unwrap();
            st.last_auth = r.auth.clone();
            st.pulls += 1;
            st.hanging.contains(&image)
        };
        if hang {
            std::future::pending::<()>().await;
        }
        let mut st = self.0.lock().unwrap();
        if let Some(e) = st.pull_errors.get(&image) {
            return Err(Status::new(e.code(), e.message().to_string()));
        }
        let id = st.registry.get(&image).cloned().ok_or_else(|| {
            Status::unknown(format!(
                "failed to pull and unpack image \"{image}\": failed to resolve reference \"{image}\": {image}: not found"
            ))
        })?;
        st.images.insert(
            id.clone(),
            cri::Image {
                id: id.clone(),
                repo_tags: vec![image],
                size: 1234,
                ..Default::default()
            },
        );
        Ok(Response::new(cri::PullImageResponse { image_ref: id }))
    }

    async fn remove_image(
        &self,
        r: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        let image = r.into_inner().image.unwrap_or_default().image;
        let mut st = self.0.lock().unwrap();
        if let Some(id) = find(&st, &image).map(|i| i.id.clone()) {
            st.images.remove(&id);
        }
        Ok(Response::new(cri::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        let used = self.0.lock().unwrap().images.values().map(|i| i.size).sum();
        Ok(Response::new(cri::ImageFsInfoResponse {
            image_filesystems: vec![cri::FilesystemUsage {
                fs_id: Some(cri::FilesystemIdentifier {
                    mountpoint: "/fake/images".into(),
                }),
                used_bytes: Some(cri::UInt64Value { value: used }),
                ..Default::default()
            }],
            container_filesystems: vec![],
        }))
    }
}

/// The RuntimeService methods the agent calls (Version, ListContainers,
/// ContainerStatus), routed by hand: the generated server trait has 29
/// methods. It holds the containers' statuses.
#[derive(Clone, Default)]
struct FakeRuntime(Arc<Mutex<Vec<cri::ContainerStatus>>>);

impl FakeRuntime {
    /// Adds a container as the kubelet creates it: with its pod's UID and its
    /// name in labels.
    fn add(
        &self,
        id: &str,
        pod_uid: &str,
        name: &str,
        created_at: i64,
        state: cri::ContainerState,
    ) {
        self.0.lock().unwrap().push(cri::ContainerStatus {
            id: id.into(),
            created_at,
            state: state as i32,
            labels: [
                ("io.kubernetes.pod.uid".to_string(), pod_uid.to_string()),
                ("io.kubernetes.container.name".to_string(), name.to_string()),
            ]
            .into(),
            log_path: format!("/var/log/pods/default_web_{pod_uid}/{name}/{created_at}.log"),
            ..Default::default()
        });
    }

    /// ListContainers: the containers whose labels carry every pair of the
    /// filter's selector.
    fn list(&self, req: cri::ListContainersRequest) -> cri::ListContainersResponse {
        let selector = req.filter.map(|f| f.label_selector).unwrap_or_default();
        let containers = self
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|c| selector.iter().all(|(k, v)| c.labels.get(k) == Some(v)))
            .map(|c| cri::Container {
                id: c.id.clone(),
                state: c.state,
                created_at: c.created_at,
                labels: c.labels.clone(),
                ..Default::default()
            })
            .collect();
        cri::ListContainersResponse { containers }
    }

    /// ContainerStatus, NotFound for an unknown ID as containerd answers.
    fn status(
        &self,
        req: cri::ContainerStatusRequest,
    ) -> Result<cri::ContainerStatusResponse, Status> {
        let st = self.0.lock().unwrap();
        let status = st
            .iter()
            .find(|c| c.id == req.container_id)
            .cloned()
            .ok_or_else(|| {
                Status::not_found(format!(
                    "an error occurred when try to find container {:?}: not found",
                    req.container_id
                ))
            })?;
        Ok(cri::ContainerStatusResponse {
            status: Some(status),
            ..Default::default()
        })
    }
}

impl tonic::server::NamedService for FakeRuntime {
    const NAME: &'static str = "runtime.v1.RuntimeService";
}

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

struct Unary<F>(F);

impl<Req, Resp, F> tonic::server::UnaryService<Req> for Unary<F>
where
    F: Fn(Req) -> Result<Resp, Status> + Clone + Send + 'static,
    Req: Send + 'static,
    Resp: Send + 'static,
{
    type Response = Resp;
    type Future = BoxFut<Result<Response<Resp>, Status>>;
    fn call(&mut self, request: Request<Req>) -> Self::Future {
        let f = self.0.clone();
        Box::pin(async move { f(request.into_inner()).map(Response::new) })
    }
}

fn grpc<E: prost::Message + Send + 'static, D: prost::Message + Default + Send + 'static>()
-> tonic::server::Grpc<tonic_prost::ProstCodec<E, D>> {
    tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
}

impl<B> tower::Service<http::Request<B>> for FakeRuntime
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFut<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            Ok(match req.uri().path() {
                "/runtime.v1.RuntimeService/Version" => {
                    let svc = Unary(|_: cri::VersionRequest| {
                        Ok(cri::VersionResponse {
                            version: "0.1.0".into(),
                            runtime_name: "fake-cri".into(),
                            runtime_version: "9.9.9".into(),
                            runtime_api_version: "v1".into(),
                        })
                    });
                    grpc().unary(svc, req).await
                }
                "/runtime.v1.RuntimeService/ListContainers" => {
                    let svc = Unary(move |r| Ok(this.list(r)));
                    grpc().unary(svc, req).await
                }
                "/runtime.v1.RuntimeService/ContainerStatus" => {
                    let svc = Unary(move |r| this.status(r));
                    grpc().unary(svc, req).await
                }
                _ => Status::unimplemented("not faked").into_http(),
            })
        })
    }
}

/// A fake runtime on a temporary socket; its state (images, registry)
/// survives [`Fake::stop`] and [`Fake::start`], as a runtime's disk does.
struct Fake {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    state: FakeImages,
    containers: FakeRuntime,
    server: Option<Server>,
}

/// One run of the fake runtime's process: a thread with its own tokio
/// runtime, so that stopping it drops every connection at once, mid-call,
/// the way a runtime that exits does.
struct Server {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Fake {
    /// Starts serving on the socket path (which must not exist).
    fn start(&mut self) {
        assert!(self.server.is_none(), "already serving");
        let listener = std::os::unix::net::UnixListener::bind(&self.socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let images = ImageServiceServer::new(self.state.clone());
        let containers = self.containers.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let incoming = UnixListenerStream::new(UnixListener::from_std(listener).unwrap());
                let serve = tonic::transport::Server::builder()
                    .add_service(images)
                    .add_service(containers)
                    .serve_with_incoming(incoming);
                tokio::select! {
                    r = serve => r.unwrap(),
                    _ = stopped => {}
                }
            });
            // Dropping `rt` here drops the connection tasks: their sockets close.
        });
        self.server = Some(Server { stop, thread });
    }

    /// Stops the runtime: every connection closes, and the socket file goes
    /// (as containerd removes it; a new start makes a new one).
    fn stop(&mut self) {
        let server = self.server.take().expect("serving");
        let _ = server.stop.send(());
        server.thread.join().unwrap();
        std::fs::remove_file(&self.socket).unwrap();
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            let _ = server.stop.send(());
            let _ = server.thread.join();
        }
    }
}

async fn fake_cri() -> Fake {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cri.sock");
    let mut fake = Fake {
        _dir: dir,
        socket,
        state: FakeImages::default(),
        containers: FakeRuntime::default(),
        server: None,
    };
    fake.start();
    fake
}

fn r(s: &str) -> Reference {
    Reference::parse(s).unwrap()
}

#[tokio::test]
async fn connect_reports_the_runtime_name_and_version() {
    let fake = fake_cri().await;
    let cri = CriRuntime::connect(&fake.socket).await.unwrap();
    let v = cri.version().await.unwrap();
    assert_eq!((v.name.as_str(), v.version.as_str()), ("fake-cri", "9.9.9"));
}

#[tokio::test]
async fn pull_list_inspect_and_remove_round_trip() {
    let fake = fake_cri().await;
    fake.state
        .0
        .lock()
        .unwrap()
        .registry
        .insert("r.io/app:1".into(), "sha256:aaa".into());
    let cri = CriRuntime::connect(&fake.socket).await.unwrap();
    let auth = RegistryAuth {
        username: "u".into(),
        password: "p".into(),
    };
    assert_eq!(
        cri.pull(&r("r.io/app:1"), Some(&auth)).await.unwrap(),
        "sha256:aaa"
    );
    let sent = fake.state.0.lock().unwrap().last_auth.clone().unwrap();
    assert_eq!((sent.username.as_str(), sent.password.as_str()), ("u", "p"));
    assert_eq!(
        sent.server_address, "",
        "containerd 1.6 cannot parse host:port here"
    );
    assert_eq!(cri.list_images().await.unwrap().len(), 1);
    assert!(cri.image_status(&r("r.io/app:1")).await.unwrap().is_some());
    assert_eq!(cri.fs_info().await.unwrap().used_bytes, 1234);
    cri.remove("sha256:aaa").await.unwrap();
    assert!(cri.image_status(&r("r.io/app:1")).await.unwrap().is_none());
}

#[tokio::test]
async fn the_newest_attempt_of_a_pods_container_is_found_by_the_kubelets_labels() {
    use cri::ContainerState as S;
    let fake = fake_cri().await;
    fake.containers
        .add("c-old", "uid-1", "app", 10, S::ContainerExited);
    fake.containers
        .add("c-new", "uid-1", "app", 20, S::ContainerRunning);
    fake.containers
        .add("c-side", "uid-1", "sidecar", 30, S::ContainerRunning);
    fake.containers
        .add("c-else", "uid-2", "app", 40, S::ContainerCreated);
    let cri = CriRuntime::connect(&fake.socket).await.unwrap();

    let found = cri.find_container("uid-1", "app").await.unwrap();
    assert_eq!(
        found,
        Some(ContainerLog {
            id: "c-new".into(),
            log_path: "/var/log/pods/default_web_uid-1/app/20.log".into(),
            state: ContainerState::Running,
        })
    );
    assert_eq!(
        cri.find_container("uid-2", "app")
            .await
            .unwrap()
            .map(|c| c.state),
        Some(ContainerState::Created)
    );
    assert_eq!(cri.find_container("uid-3", "app").await.unwrap(), None);
    assert_eq!(
        cri.container_state("c-old").await.unwrap(),
        ContainerState::Exited
    );
    assert_eq!(
        cri.container_state("c-removed").await.unwrap(),
        ContainerState::Gone,
        "a removed container has exited for good, not failed the lookup"
    );
}

#[tokio::test]
async fn pull_failures_are_classified_from_the_runtime_message() {
    let fake = fake_cri().await;
    let cases = [
        ("r.io/missing:1", None, "ImageNotFound"),
        (
            "r.io/private:1",
            Some(
                "failed to pull and unpack image \"r.io/private:1\": failed to resolve reference \"r.io/private:1\": pulling from host r.io failed with status code [manifests 1]: 401 Unauthorized",
            ),
            "AuthFailed",
        ),
        (
            "r.io/down:1",
            Some(
                "failed to pull and unpack image \"r.io/down:1\": failed to resolve reference \"r.io/down:1\": failed to do request: Head \"http://r.io/v2/down/manifests/1\": dial tcp 10.0.0.1:80: connect: connection refused",
            ),
            "RegistryUnreachable",
        ),
        ("r.io/odd:1", Some("disk quota exceeded"), "RuntimeError"),
    ];
    for (image, message, _) in &cases {
        if let Some(m) = message {
            fake.state
                .0
                .lock()
                .unwrap()
                .pull_errors
                .insert(r(image).to_string(), Status::unknown(*m));
        }
    }
    let cri = CriRuntime::connect(&fake.socket).await.unwrap();
    for (image, _, reason) in cases {
        let err = cri.pull(&r(image), None).await.unwrap_err();
        assert_eq!(err.reason(), reason, "{image}: {err}");
    }
}

#[tokio::test]
async fn a_missing_socket_is_reported_as_missing() {
    let dir = tempfile::tempdir().unwrap();
    let err = CriRuntime::connect(dir.path().join("nope.sock"))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, CriError::SocketMissing { .. }), "{err}");
    assert!(err.to_string().contains("is the container runtime running"));
}

#[tokio::test]
async fn a_regular_file_is_not_a_socket() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let err = CriRuntime::connect(&file).await.err().unwrap();
    assert!(matches!(err, CriError::NotASocket { .. }), "{err}");
}

#[tokio::test]
async fn a_socket_nobody_listens_on_is_not_answering() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let err = CriRuntime::connect(&socket).await.err().unwrap();
    assert!(matches!(err, CriError::NotAnswering { .. }), "{err}");
    assert!(err.to_string().contains("refused"), "{err}");
}

#[tokio::test]
async fn a_runtime_that_accepts_but_never_answers_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("hung.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let hold = tokio::spawn(async move {
        let mut held = vec![];
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    let err = CriRuntime::connect(&socket).await.err().unwrap();
    assert!(matches!(err, CriError::NotAnswering { .. }), "{err}");
    assert!(err.to_string().contains("no answer"), "{err}");
    hold.abort();
}

/// How long a restarted runtime may take to be answered again.
const RECONNECT_DEADLINE: Duration = Duration::from_secs(10);

/// Polls `f` until it returns `Some`, failing the test after `deadline` with
/// `what` and the last value `f` saw.
async fn within<T, E: std::fmt::Display, Fut: Future<Output = Result<T, E>>>(
    deadline: Duration,
    what: &str,
    mut f: impl FnMut() -> Fut,
) -> T {
    let end = tokio::time::Instant::now() + deadline;
    loop {
        let last = match f().await {
            Ok(v) => return v,
            Err(e) => e.to_string(),
        };
        assert!(
            tokio::time::Instant::now() < end,
            "{what} not within {deadline:?}; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_same_client_answers_again_after_the_runtime_restarts_on_a_new_socket() {
    let mut fake = fake_cri().await;
    let cri = CriRuntime::connect(&fake.socket).await.unwrap();
    cri.version().await.unwrap();

    fake.stop();
    let err = cri.version().await.unwrap_err();
    assert_eq!(err.reason(), "RuntimeUnavailable", "{err}");
    assert!(err.is_unavailable());
    assert!(
        err.to_string().contains(fake.socket.to_str().unwrap()),
        "the error names the socket: {err}"
    );

    fake.start();
    let v = within(RECONNECT_DEADLINE, "CRI Version after the restart", || {
        cri.version()
    })
    .await;
    assert_eq!(v.name, "fake-cri");
    // And keeps answering: the new connection is used, not redialled per call.
    cri.list_images().await.unwrap();
}

#[tokio::test]
async fn a_pull_cut_off_by_the_runtime_exiting_fails_as_runtime_unavailable_and_leaves_no_image() {
    let mut fake = fake_cri().await;
    fake.state
        .0
        .lock()
        .unwrap()
        .hanging
        .push("r.io/big:1".into());
    let cri = CriRuntime::connect(&fake.socket).await.unwrap();
    let pull = tokio::spawn({
        let cri = cri.clone();
        async move { cri.pull(&r("r.io/big:1"), None).await }
    });
    within(RECONNECT_DEADLINE, "the pull to reach the runtime", || {
        let pulls = fake.state.0.lock().unwrap().pulls;
        std::future::ready(if pulls == 1 { Ok(()) } else { Err(pulls) })
    })
    .await;

    fake.stop();
    let err = tokio::time::timeout(RECONNECT_DEADLINE, pull)
        .await
        .expect("a pull whose runtime exited ends at once")
        .unwrap()
        .unwrap_err();
    assert_eq!(
        err.reason(),
        "RuntimeUnavailable",
        "not a registry or image failure: {err}"
    );

    fake.start();
    let big = r("r.io/big:1");
    let status = within(RECONNECT_DEADLINE, "ImageStatus after the restart", || {
        cri.image_status(&big)
    })
    .await;
    assert!(status.is_none(), "the runtime does not hold a cut-off pull");
}

#[tokio::test]
async fn a_lazy_client_made_while_the_runtime_is_down_answers_once_it_starts() {
    let mut fake = fake_cri().await;
    fake.stop();
    let cri = CriRuntime::lazy(&fake.socket);
    let err = cri.version().await.unwrap_err();
    assert_eq!(err.reason(), "RuntimeUnavailable", "{err}");
    fake.start();
    within(
        RECONNECT_DEADLINE,
        "CRI Version once the runtime started",
        || cri.version(),
    )
    .await;
}

/// How long one run of the `node-agent` binary may take.
const CLI_DEADLINE: Duration = Duration::from_secs(30);

/// Runs the `node-agent` binary (as `uid` if given) and returns (success,
/// stdout, stderr); fails the test if it does not finish within [`CLI_DEADLINE`].
async fn node_agent(args: &[&str], uid: Option<u32>) -> (bool, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_node-agent"));
    cmd.args(args).kill_on_drop(true);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let out = tokio::time::timeout(CLI_DEADLINE, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("node-agent {args:?} did not finish within {CLI_DEADLINE:?}"))
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Runs `node-agent` as an unprivileged user: root may open any socket.
#[tokio::test]
async fn permission_denied_on_the_socket_says_so() {
    if !nix::unistd::Uid::effective().is_root() {
        return missing_prerequisite("needs root to run the agent as an unprivileged user");
    }
    let fake = fake_cri().await;
    let dir = fake.socket.parent().unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&fake.socket, std::fs::Permissions::from_mode(0o600)).unwrap();
    let socket = fake.socket.to_str().unwrap();
    let (ok, _, stderr) = node_agent(&["--cri-socket", socket, "version"], Some(65534)).await;
    assert!(!ok);
    assert!(stderr.contains("permission denied"), "{stderr}");
}

async fn run_cli(socket: &Path, args: &[&str]) -> (bool, String, String) {
    let mut full = vec!["--cri-socket", socket.to_str().unwrap()];
    full.extend_from_slice(args);
    node_agent(&full, None).await
}

#[tokio::test]
async fn the_command_line_pulls_lists_inspects_and_removes() {
    let fake = fake_cri().await;
    let id = format!("sha256:{}", "ab".repeat(32));
    fake.state
        .0
        .lock()
        .unwrap()
        .registry
        .insert("r.io/app:1".into(), id.clone());
    let (ok, out, err) = run_cli(&fake.socket, &["images", "pull", "r.io/app:1"]).await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), id);
    assert!(
        err.contains("pulling r.io/app:1") && err.contains("done in"),
        "{err}"
    );

    let (ok, out, _) = run_cli(&fake.socket, &["images", "ls", "-q"]).await;
    assert!(ok);
    assert_eq!(out.trim(), id);

    let (ok, out, _) = run_cli(&fake.socket, &["images", "inspect", "r.io/app:1"]).await;
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["id"], id.as_str());

    let (ok, _, err) = run_cli(&fake.socket, &["images", "rm", "r.io/app:1", "r.io/gone:1"]).await;
    assert!(!ok, "removing an absent image must fail");
    assert!(err.contains("image r.io/gone:1 not found"), "{err}");
    assert!(fake.state.0.lock().unwrap().images.is_empty());
}

#[tokio::test]
async fn the_command_line_refuses_a_bad_reference_before_calling_the_runtime() {
    let fake = fake_cri().await;
    let (ok, _, err) = run_cli(&fake.socket, &["images", "pull", "Bad/Name"]).await;
    assert!(!ok);
    assert!(
        err.contains("invalid image reference") && err.contains("lowercase"),
        "{err}"
    );
    assert_eq!(fake.state.0.lock().unwrap().pulls, 0);
}

/// `node-agent run` on `socket`, with its health endpoint on a free loopback
/// port (returned) and a coordinator nobody serves: the probes concern the
/// runtime only. Killed when the child is dropped.
fn spawn_agent(socket: &Path, liveness_threshold: &str) -> (tokio::process::Child, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let state = socket.parent().unwrap().join("state");
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_node-agent"))
        .args(["--cri-socket", socket.to_str().unwrap(), "run"])
        .args([
            "--node-name",
            "node-a",
            "--coordinator",
            "http://127.0.0.1:9",
        ])
        .args(["--token-file", "/nonexistent/token"])
        .args(["--state-dir", state.to_str().unwrap()])
        .args(["--imagefs-path", "/"])
        .args(["--health-listen", &format!("127.0.0.1:{port}")])
        .args(["--runtime-probe-interval", "100ms"])
        .args(["--runtime-liveness-threshold", liveness_threshold])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    (child, port)
}

/// `GET path` on the agent's health endpoint: (status, body).
async fn probe(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    conn.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    conn.read_to_string(&mut response).await?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Waits until `GET path` answers `want`; returns the body.
async fn probe_until(port: u16, path: &str, want: u16) -> String {
    within(
        RECONNECT_DEADLINE,
        &format!("{path} to answer {want}"),
        || async {
            match probe(port, path).await {
                Ok((status, body)) if status == want => Ok(body),
                Ok((status, body)) => Err(format!("{status} {body}")),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await
}

#[tokio::test]
async fn the_agent_is_unready_while_its_runtime_is_away_and_ready_again_when_it_returns() {
    let mut fake = fake_cri().await;
    let (_agent, port) = spawn_agent(&fake.socket, "1h");
    let body = probe_until(port, "/readyz", 200).await;
    assert!(body.contains("fake-cri 9.9.9"), "{body}");

    fake.stop();
    let body = probe_until(port, "/readyz", 503).await;
    assert!(body.contains("unreachable"), "{body}");
    let (status, body) = probe(port, "/healthz").await.unwrap();
    assert_eq!(status, 200, "an hour's threshold is far off: {body}");

    fake.start();
    probe_until(port, "/readyz", 200).await;
}

#[tokio::test]
async fn an_agent_started_before_its_runtime_waits_for_it_and_fails_liveness_past_the_threshold() {
    let mut fake = fake_cri().await;
    fake.stop();
    let (mut agent, port) = spawn_agent(&fake.socket, "1s");
    let body = probe_until(port, "/healthz", 503).await;
    assert!(body.contains("threshold 1s"), "{body}");
    assert!(
        agent.try_wait().unwrap().is_none(),
        "the agent waits for its runtime instead of exiting"
    );

    fake.start();
    probe_until(port, "/readyz", 200).await;
    probe_until(port, "/healthz", 200).await;
}
