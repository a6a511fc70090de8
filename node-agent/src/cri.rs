//! The real [`ImageRuntime`]: CRI gRPC over the runtime's unix socket.
//!
//! [`CriRuntime::connect`] checks the socket before dialing so that the common
//! mistakes (no runtime, wrong path, not root, runtime hung) each get their own
//! error; [`CriError`] classifies the runtime's pull failures the same way.
//!
//! The client outlives the runtime's process: its channel dials the socket
//! *path* again whenever its connection is gone, so a runtime that restarts
//! (and makes a new socket file) is answered again without a new client.
//! A call the runtime cannot answer because it went away fails with
//! [`CriError::RuntimeUnavailable`], never as a registry or image failure.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_proto::reference::{Reference, ReferenceError};
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::runtime::{
    ContainerLog, ContainerLookup, ContainerState, FsInfo, ImageInfo, ImageRuntime, RegistryAuth,
    RuntimeVersion,
};

/// Where runtimes put their CRI socket by default, in the order we try them.
pub const DEFAULT_SOCKETS: &[&str] = &[
    "/run/containerd/containerd.sock",
    "/run/crio/crio.sock",
    "/var/run/containerd/containerd.sock",
    "/var/run/crio/crio.sock",
];

/// How long `connect` waits for the runtime to answer `Version`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline for CRI calls other than PullImage.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything that can go wrong talking to a runtime over CRI.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// No `--cri-socket` was given and no default socket exists.
    #[error(
        "no container runtime socket found (tried {tried}); is containerd or CRI-O running? Pass --cri-socket PATH"
    )]
    NoSocketFound {
        /// The paths that were tried.
        tried: String,
    },
    /// The given socket path does not exist.
    #[error("no CRI socket at {path}: is the container runtime running, and is the path right?")]
    SocketMissing {
        /// The socket path.
        path: PathBuf,
    },
    /// The path exists but is something else.
    #[error("{path} is not a unix socket; point --cri-socket at the runtime's socket")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// The caller may not open the socket.
    #[error("permission denied on {path}: run as root or as a user allowed to open the socket")]
    PermissionDenied {
        /// The socket path.
        path: PathBuf,
    },
    /// The socket exists but no runtime answers on it.
    #[error("the container runtime at {path} is not answering: {reason}")]
    NotAnswering {
        /// The socket path.
        path: PathBuf,
        /// What happened.
        reason: String,
    },
    /// The image reference is malformed.
    #[error(transparent)]
    BadReference(#[from] ReferenceError),
    /// The runtime or the registry does not have the image.
    #[error("image {reference} not found")]
    ImageNotFound {
        /// The reference asked for.
        reference: String,
    },
    /// The registry could not be reached.
    #[error("registry of {reference} is unreachable: {message}")]
    RegistryUnreachable {
        /// The reference asked for.
        reference: String,
        /// The runtime's message.
        message: String,
    },
    /// The registry refused the credentials (or demanded some).
    #[error("registry refused access to {reference} (check the credentials): {message}")]
    AuthRefused {
        /// The reference asked for.
        reference: String,
        /// The runtime's message.
        message: String,
    },
    /// A pull did not finish in time.
    #[error("pull of {reference} did not finish within {timeout:?}")]
    PullTimeout {
        /// The reference asked for.
        reference: String,
        /// The deadline.
        timeout: Duration,
    },
    /// The runtime stopped answering a call: it exited, is restarting, or its
    /// socket is gone. Worth retrying once it answers again.
    #[error(
        "the container runtime at {path} is unavailable (CRI {op}: {message}); is it restarting? Berth retries once it answers again"
    )]
    RuntimeUnavailable {
        /// The socket path.
        path: PathBuf,
        /// The CRI method.
        op: &'static str,
        /// What the transport said.
        message: String,
    },
    /// Any other failure of a CRI call.
    #[error("CRI {op} failed: {code:?}: {message}")]
    Runtime {
        /// The CRI method.
        op: &'static str,
        /// gRPC status code.
        code: tonic::Code,
        /// The runtime's message.
        message: String,
    },
}

impl CriError {
    /// A short, stable name for the kind of failure, for status reasons and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            CriError::NoSocketFound { .. } | CriError::SocketMissing { .. } => "SocketMissing",
            CriError::NotASocket { .. } => "NotASocket",
            CriError::PermissionDenied { .. } => "PermissionDenied",
            CriError::NotAnswering { .. } => "RuntimeNotAnswering",
            CriError::RuntimeUnavailable { .. } => "RuntimeUnavailable",
            CriError::BadReference(_) => "BadReference",
            CriError::ImageNotFound { .. } => "ImageNotFound",
            CriError::RegistryUnreachable { .. } => "RegistryUnreachable",
            CriError::AuthRefused { .. } => "AuthFailed",
            CriError::PullTimeout { .. } => "PullTimeout",
            CriError::Runtime { .. } => "RuntimeError",
        }
    }

    /// Classifies a failed PullImage by the runtime's message. containerd and
    /// CRI-O report registry failures as `Unknown` with the cause in the text;
    /// a pull cut off by the runtime going away is [`CriError::RuntimeUnavailable`]
    /// (its transport error may say "connection reset" too, but not of the registry).
    fn from_pull_status(socket: &Path, reference: &Reference, status: tonic::Status) -> Self {
        if runtime_went_away(&status) {
            return CriError::unavailable(socket, "PullImage", &status);
        }
        let reference = reference.to_string();
        let message = status.message().to_string();
        let m = message.to_ascii_lowercase();
        let has = |needles: &[&str]| needles.iter().any(|n| m.contains(n));
        if has(&[
            "401 unauthorized",
            "403 forbidden",
            "failed to authorize",
            "authorization failed",
            "unauthorized",
            "access denied",
            "denied:",
        ]) {
            CriError::AuthRefused { reference, message }
        } else if has(&[
            "connection refused",
            "no such host",
            "i/o timeout",
            "network is unreachable",
            "no route to host",
            "connection reset",
            "tls handshake",
            "server misbehaving",
            "eof",
        ]) {
            CriError::RegistryUnreachable { reference, message }
        } else if has(&[
            ": not found",
            "manifest unknown",
            "name unknown",
            "404 not found",
            "not found",
        ]) {
            CriError::ImageNotFound { reference }
        } else {
            CriError::Runtime {
                op: "PullImage",
                code: status.code(),
                message,
            }
        }
    }

    /// A failed CRI call other than PullImage.
    fn call(socket: &Path, op: &'static str, status: tonic::Status) -> Self {
        if runtime_went_away(&status) {
            return CriError::unavailable(socket, op, &status);
        }
        CriError::Runtime {
            op,
            code: status.code(),
            message: status.message().to_string(),
        }
    }

    fn unavailable(socket: &Path, op: &'static str, status: &tonic::Status) -> Self {
        let mut message = status.message().to_string();
        let mut source = std::error::Error::source(status);
        // tonic's sources repeat each other's words ("transport error:
        // transport error: …"): keep each part once.
        while let Some(e) = source {
            let part = e.to_string();
            if part.starts_with(&message) {
                message = part;
            } else if !message.contains(&part) {
                message = format!("{message}: {part}");
            }
            source = e.source();
        }
        CriError::RuntimeUnavailable {
            path: socket.to_path_buf(),
            op,
            message,
        }
    }

    /// Whether the runtime could not be reached (or went away mid-call), as
    /// opposed to the runtime answering with an error.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            CriError::RuntimeUnavailable { .. }
                | CriError::NotAnswering { .. }
                | CriError::SocketMissing { .. }
        )
    }
}

/// True when `status` was made by our side of the connection (dial failed,
/// connection broke, deadline passed) rather than sent by the runtime: the
/// runtime's own errors come from the wire and carry no source error.
fn runtime_went_away(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable || std::error::Error::source(status).is_some()
}

/// Picks the CRI socket: the explicit one if given, else the first default that exists.
pub fn find_socket(explicit: Option<&Path>) -> Result<PathBuf, CriError> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    DEFAULT_SOCKETS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| CriError::NoSocketFound {
            tried: DEFAULT_SOCKETS.join(", "),
        })
}

/// A CRI client bound to one runtime socket.
#[derive(Clone)]
pub struct CriRuntime {
    socket: PathBuf,
    images: ImageServiceClient<Channel>,
    runtime: RuntimeServiceClient<Channel>,
}

/// A gRPC channel to the unix socket at `path`, lazy and reconnecting:
/// tonic calls the connector again, with the same path, whenever the
/// connection is gone (a restarted runtime makes a new socket there).
pub fn unix_channel(path: PathBuf) -> Channel {
    Endpoint::from_static("http://cri.invalid")
        .connect_timeout(CONNECT_TIMEOUT)
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
}

impl CriRuntime {
    /// Checks `socket`, dials it, and asks the runtime its version.
    pub async fn connect(socket: impl AsRef<Path>) -> Result<Self, CriError> {
        let socket = socket.as_ref().to_path_buf();
        let meta = match std::fs::metadata(&socket) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CriError::SocketMissing { path: socket });
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(CriError::PermissionDenied { path: socket });
            }
            Err(e) => {
                return Err(CriError::NotAnswering {
                    path: socket,
                    reason: e.to_string(),
                });
            }
        };
        if !meta.file_type().is_socket() {
            return Err(CriError::NotASocket { path: socket });
        }
        // Dial once ourselves to tell "refused" from "denied"; tonic's
        // transport error would hide the difference.
        match UnixStream::connect(&socket).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(CriError::PermissionDenied { path: socket });
            }
            Err(e) => {
                return Err(CriError::NotAnswering {
                    path: socket,
                    reason: e.to_string(),
                });
            }
        }
        let cri = CriRuntime::lazy(socket);
        match tokio::time::timeout(CONNECT_TIMEOUT, cri.version()).await {
            Ok(Ok(_)) => Ok(cri),
            Ok(Err(
                CriError::Runtime { message, .. } | CriError::RuntimeUnavailable { message, .. },
            )) => Err(CriError::NotAnswering {
                path: cri.socket,
                reason: message,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(CriError::NotAnswering {
                path: cri.socket,
                reason: format!("no answer to CRI Version within {CONNECT_TIMEOUT:?}"),
            }),
        }
    }

    /// A client of `socket` that dials on its first call, without checking
    /// anything first: for an agent that starts while the runtime is down.
    /// Calls fail with [`CriError::RuntimeUnavailable`] until it answers.
    pub fn lazy(socket: impl AsRef<Path>) -> Self {
        let socket = socket.as_ref().to_path_buf();
        let channel = unix_channel(socket.clone());
        CriRuntime {
            images: ImageServiceClient::new(channel.clone()).max_decoding_message_size(64 << 20),
            runtime: RuntimeServiceClient::new(channel).max_decoding_message_size(64 << 20),
            socket,
        }
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Pulls with a deadline; the runtime's pull is cancelled when it passes.
    pub async fn pull_with_timeout(
        &self,
        reference: &Reference,
        auth: Option<&RegistryAuth>,
        timeout: Duration,
    ) -> Result<String, CriError> {
        tokio::time::timeout(timeout, self.pull(reference, auth))
            .await
            .map_err(|_| CriError::PullTimeout {
                reference: reference.to_string(),
                timeout,
            })?
    }
}

fn spec(image: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

fn request<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(CALL_TIMEOUT);
    r
}

fn image_info(i: cri::Image) -> ImageInfo {
    ImageInfo {
        id: i.id,
        repo_tags: i.repo_tags,
        repo_digests: i.repo_digests,
        size_bytes: i.size,
        pinned: i.pinned,
    }
}

impl ImageRuntime for CriRuntime {
    async fn version(&self) -> Result<RuntimeVersion, CriError> {
        let v = self
            .runtime
            .clone()
            .version(request(cri::VersionRequest {
                version: "v1".into(),
            }))
            .await
            .map_err(|s| CriError::call(&self.socket, "Version", s))?
            .into_inner();
        Ok(RuntimeVersion {
            name: v.runtime_name,
            version: v.runtime_version,
            api_version: v.runtime_api_version,
        })
    }

    async fn list_images(&self) -> Result<Vec<ImageInfo>, CriError> {
        let r = self
            .images
            .clone()
            .list_images(request(cri::ListImagesRequest { filter: None }))
            .await
            .map_err(|s| CriError::call(&self.socket, "ListImages", s))?;
        Ok(r.into_inner().images.into_iter().map(image_info).collect())
    }

    async fn image_status(&self, reference: &Reference) -> Result<Option<ImageInfo>, CriError> {
        self.status_of(&reference.to_string()).await
    }

    async fn pull(
        &self,
        reference: &Reference,
        auth: Option<&RegistryAuth>,
    ) -> Result<String, CriError> {
        let req = cri::PullImageRequest {
            image: spec(&reference.to_string()),
            // No server_address: containerd 1.6 parses it as a URL and
            // fails on `host:port`; the pull names the registry already.
            auth: auth.map(|a| cri::AuthConfig {
                username: a.username.clone(),
                password: a.password.clone(),
                ..Default::default()
            }),
            sandbox_config: None,
        };
        // No CALL_TIMEOUT here: large images take long; callers set their own.
        let r = self
            .images
            .clone()
            .pull_image(tonic::Request::new(req))
            .await
            .map_err(|s| CriError::from_pull_status(&self.socket, reference, s))?;
        Ok(r.into_inner().image_ref)
    }

    async fn remove(&self, image: &str) -> Result<(), CriError> {
        self.images
            .clone()
            .remove_image(request(cri::RemoveImageRequest { image: spec(image) }))
            .await
            .map_err(|s| CriError::call(&self.socket, "RemoveImage", s))?;
        Ok(())
    }

    async fn fs_info(&self) -> Result<FsInfo, CriError> {
        let r = self
            .images
            .clone()
            .image_fs_info(request(cri::ImageFsInfoRequest {}))
            .await
            .map_err(|s| CriError::call(&self.socket, "ImageFsInfo", s))?
            .into_inner();
        Ok(r.image_filesystems
            .into_iter()
            .next()
            .map(|fs| FsInfo {
                mountpoint: fs.fs_id.map(|i| i.mountpoint).unwrap_or_default(),
                used_bytes: fs.used_bytes.map(|v| v.value).unwrap_or_default(),
                inodes_used: fs.inodes_used.map(|v| v.value).unwrap_or_default(),
            })
            .unwrap_or_default())
    }

    async fn images_in_use(&self) -> Result<Vec<String>, CriError> {
        let r = self
            .runtime
            .clone()
            .list_containers(request(cri::ListContainersRequest { filter: None }))
            .await
            .map_err(|s| CriError::call(&self.socket, "ListContainers", s))?;
        let mut ids: Vec<String> = r
            .into_inner()
            .containers
            .into_iter()
            .map(|c| c.image_ref)
            .collect();
        ids.sort();
        ids.dedup();
        Ok(ids)
    }
}

/// The kubelet's labels on every container it creates, which
/// [`ContainerLookup::find_container`] filters by.
pub const POD_UID_LABEL: &str = "io.kubernetes.pod.uid";
/// See [`POD_UID_LABEL`].
pub const CONTAINER_NAME_LABEL: &str = "io.kubernetes.container.name";

fn container_state(state: i32) -> ContainerState {
    match cri::ContainerState::try_from(state) {
        Ok(cri::ContainerState::ContainerCreated) => ContainerState::Created,
        Ok(cri::ContainerState::ContainerRunning) => ContainerState::Running,
        Ok(cri::ContainerState::ContainerExited) => ContainerState::Exited,
        _ => ContainerState::Unknown,
    }
}

impl ContainerLookup for CriRuntime {
    async fn find_container(
        &self,
        pod_uid: &str,
        container_name: &str,
    ) -> Result<Option<ContainerLog>, CriError> {
        let filter = cri::ContainerFilter {
            label_selector: [
                (POD_UID_LABEL.to_string(), pod_uid.to_string()),
                (CONTAINER_NAME_LABEL.to_string(), container_name.to_string()),
            ]
            .into(),
            ..Default::default()
        };
        let r = self
            .runtime
            .clone()
            .list_containers(request(cri::ListContainersRequest {
                filter: Some(filter),
            }))
            .await
            .map_err(|s| CriError::call(&self.socket, "ListContainers", s))?;
        let Some(newest) = r
            .into_inner()
            .containers
            .into_iter()
            .max_by_key(|c| c.created_at)
        else {
            return Ok(None);
        };
        // Removed between the two calls: as if it had never been there.
        let Some(status) = self.container_status(&newest.id).await? else {
            return Ok(None);
        };
        Ok(Some(ContainerLog {
            id: newest.id,
            log_path: status.log_path.into(),
            state: container_state(status.state),
        }))
    }

    async fn container_state(&self, id: &str) -> Result<ContainerState, CriError> {
        Ok(self
            .container_status(id)
            .await?
            .map_or(ContainerState::Gone, |s| container_state(s.state)))
    }
}

/// A running container, as the debloat profiler needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningContainer {
    /// Container ID.
    pub id: String,
    /// Its name in the pod.
    pub name: String,
    /// `namespace/pod` from the kubelet's labels (empty outside Kubernetes).
    pub pod: String,
    /// ID of the image it runs (`sha256:…`).
    pub image_id: String,
    /// PID of its first process, in the runtime's PID namespace.
    pub pid: u32,
}

impl RunningContainer {
    /// `namespace/pod/container`, or the container ID outside Kubernetes.
    pub fn who(&self) -> String {
        if self.pod.is_empty() {
            self.id.clone()
        } else {
            format!("{}/{}", self.pod, self.name)
        }
    }
}

impl CriRuntime {
    /// Every running container with the PID of its first process (from
    /// the runtime's verbose status; containers the runtime gives no PID
    /// for are left out).
    pub async fn running_containers(&self) -> Result<Vec<RunningContainer>, CriError> {
        let filter = cri::ContainerFilter {
            state: Some(cri::ContainerStateValue {
                state: cri::ContainerState::ContainerRunning as i32,
            }),
            ..Default::default()
        };
        let list = self
            .runtime
            .clone()
            .list_containers(request(cri::ListContainersRequest {
                filter: Some(filter),
            }))
            .await
            .map_err(|s| CriError::call(&self.socket, "ListContainers", s))?
            .into_inner()
            .containers;
        let mut out = Vec::new();
        for c in list {
            let r = self
                .runtime
                .clone()
                .container_status(request(cri::ContainerStatusRequest {
                    container_id: c.id.clone(),
                    verbose: true,
                }))
                .await;
            let info = match r {
                Ok(r) => r.into_inner().info,
                Err(s) if s.code() == tonic::Code::NotFound => continue,
                Err(s) => return Err(CriError::call(&self.socket, "ContainerStatus", s)),
            };
            let pid = info
                .get("info")
                .and_then(|i| serde_json::from_str::<serde_json::Value>(i).ok())
                .and_then(|v| v["pid"].as_u64())
                .filter(|p| *p > 0);
            let Some(pid) = pid else { continue };
            let label = |k: &str| c.labels.get(k).cloned().unwrap_or_default();
            let pod = match (
                label("io.kubernetes.pod.namespace"),
                label("io.kubernetes.pod.name"),
            ) {
                (ns, name) if !name.is_empty() => format!("{ns}/{name}"),
                _ => String::new(),
            };
            out.push(RunningContainer {
                id: c.id,
                name: c.metadata.map(|m| m.name).unwrap_or_default(),
                pod,
                image_id: if c.image_ref.is_empty() {
                    c.image.map(|i| i.image).unwrap_or_default()
                } else {
                    c.image_ref
                },
                pid: pid as u32,
            });
        }
        Ok(out)
    }

    /// ContainerStatus of `id`; `None` when the runtime has no such container.
    async fn container_status(&self, id: &str) -> Result<Option<cri::ContainerStatus>, CriError> {
        let r = self
            .runtime
            .clone()
            .container_status(request(cri::ContainerStatusRequest {
                container_id: id.to_string(),
                verbose: false,
            }))
            .await;
        match r {
            Ok(r) => Ok(r.into_inner().status),
            Err(s) if s.code() == tonic::Code::NotFound && !runtime_went_away(&s) => Ok(None),
            Err(s) => Err(CriError::call(&self.socket, "ContainerStatus", s)),
        }
    }

    /// ImageStatus by ID or reference string.
    pub async fn status_of(&self, image: &str) -> Result<Option<ImageInfo>, CriError> {
        let r = self
            .images
            .clone()
            .image_status(request(cri::ImageStatusRequest {
                image: spec(image),
                verbose: false,
            }))
            .await
            .map_err(|s| CriError::call(&self.socket, "ImageStatus", s))?;
        Ok(r.into_inner().image.map(image_info))
    }
}
