//! Helpers for Berth's end-to-end tests and benchmarks on a real cluster.
//!
//! [`Cluster::from_env`] reads the file `e2e/cluster.sh up` writes. Without
//! that file (and without `BERTH_E2E_ENV`), a set `KUBECONFIG` selects an
//! existing cluster instead: its nodes come from the API, test images from the
//! registry named by `BERTH_REGISTRY`, and node checks go through the agent pod
//! on each node, since the host cannot reach that node's runtime socket.
//! On the local cluster, tests check outcomes from outside Berth:
//! [`Cluster::cri`] opens a CRI client straight onto a node's containerd
//! socket; [`Cluster::kubectl`] and [`Cluster::grpcurl`] run the real tools.
//! Tests make the images they assert on with [`Cluster::fresh_image`] (see
//! [`registry`]), so they pass on any cluster whatever other caches hold.
//!
//! The coordinator speaks TLS only and its public API wants a bearer token:
//! [`Cluster::api_grpcurl`] and [`Cluster::inventory_client`] trust the CA
//! from the ConfigMap `berth-ca` ([`Cluster::ca_pem`]) and send the token of
//! a viewer ServiceAccount ([`Cluster::api_token`]); [`Cluster::grpcurl_as`]
//! calls with any token, or none.

pub mod bench;
pub mod debian;
pub mod debloat;
pub mod docker;
pub mod registry;
mod scope;
pub mod scratch;
pub mod systemd_host;

pub use scope::{RegistryLog, TestNamespace, phase};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use berth_proto::api::inventory_client::InventoryClient;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Namespace Berth is installed into by `manifests/`.
pub const NAMESPACE: &str = "berth-system";

/// The name the coordinator's certificate is checked against.
pub const COORDINATOR_NAME: &str = "berth-coordinator.berth-system.svc";

/// The ServiceAccount (in [`NAMESPACE`]) the tests read the API as, bound to
/// the ClusterRole `berth-viewer`.
pub const VIEWER_SA: &str = "berth-e2e-viewer";

/// Where the env file of the local cluster lives unless `BERTH_E2E_ENV` says.
pub const LOCAL_ENV: &str = "/var/lib/berth-e2e/env";

/// The cluster under test.
pub struct Cluster {
    env: HashMap<String, String>,
    /// The harness's local cluster (node sockets reachable from here).
    pub local: bool,
    /// Kubernetes client with the cluster's admin kubeconfig.
    pub client: kube::Client,
    /// Worker node names.
    pub nodes: Vec<String>,
    /// The viewer's token, made once per `Cluster`.
    token: OnceLock<String>,
}

fn read_env(path: &Path) -> anyhow::Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "{} not found: bring the cluster up with `e2e/cluster.sh up`, or set BERTH_E2E_ENV",
            path.display()
        )
    })?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect())
}

impl Cluster {
    /// Connects to the cluster the harness brought up.
    pub async fn from_env() -> anyhow::Result<Self> {
        let explicit = std::env::var("BERTH_E2E_ENV").ok();
        let external = std::env::var("KUBECONFIG").ok();
        if let (None, Some(kubeconfig)) = (&explicit, external)
            && !Path::new(LOCAL_ENV).exists()
        {
            return Self::external(kubeconfig).await;
        }
        let env = read_env(Path::new(explicit.as_deref().unwrap_or(LOCAL_ENV)))?;
        let kubeconfig = env.get("KUBECONFIG").context("env file lacks KUBECONFIG")?;
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(kubeconfig)?,
            &Default::default(),
        )
        .await?;
        let client = kube::Client::try_from(config)?;
        let nodes = env
            .get("BERTH_NODES")
            .map(|n| n.split_whitespace().map(String::from).collect())
            .unwrap_or_default();
        Ok(Cluster {
            env,
            local: true,
            client,
            nodes,
            token: OnceLock::new(),
        })
    }

    async fn external(kubeconfig: String) -> anyhow::Result<Self> {
        let client = kube::Client::try_default().await?;
        let api: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client.clone());
        let mut nodes: Vec<String> = api
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect();
        nodes.sort();
        let mut env = HashMap::from([("KUBECONFIG".to_string(), kubeconfig)]);
        for key in [
            "BERTH_REGISTRY",
            "BERTH_AUTH_REGISTRY",
            "BERTH_AUTH_USER",
            "BERTH_AUTH_PASSWORD",
            "BERTH_BIN",
        ] {
            if let Ok(v) = std::env::var(key) {
                env.insert(key.to_string(), v);
            }
        }
        Ok(Cluster {
            env,
            local: false,
            client,
            nodes,
            token: OnceLock::new(),
        })
    }
    /// A value from the harness's env file.
    pub fn var(&self, key: &str) -> &str {
        self.env.get(key).map(String::as_str).unwrap_or_default()
    }

    /// The plain local registry, `host:port`.
    pub fn registry(&self) -> &str {
        self.var("BERTH_REGISTRY")
    }

    /// The htpasswd-protected registry, `host:port`.
    pub fn auth_registry(&self) -> &str {
        self.var("BERTH_AUTH_REGISTRY")
    }

    /// A tool the harness built (kubectl, grpcurl, …), else the one on PATH.
    pub fn tool(&self, name: &str) -> PathBuf {
        let built = Path::new(self.var("BERTH_BIN")).join(name);
        if built.is_file() {
            built
        } else {
            PathBuf::from(name)
        }
    }

    /// A node's containerd socket, as seen from the host.
    pub fn node_socket(&self, node: &str) -> PathBuf {
        Path::new(self.var("BERTH_E2E_DIR"))
            .join("nodes")
            .join(node)
            .join("run/containerd.sock")
    }

    /// A raw CRI image client on a node's containerd (not Berth's client;
    /// only the unix-socket transport is shared with the agent).
    pub async fn cri(&self, node: &str) -> anyhow::Result<ImageServiceClient<Channel>> {
        let channel = berth_node_agent::cri::unix_channel(self.node_socket(node));
        Ok(ImageServiceClient::new(channel))
    }

    /// `node-agent ARGS` in the agent pod on `node` (external clusters).
    fn agent_exec(&self, node: &str, args: &[&str]) -> anyhow::Result<String> {
        let pod = self.kubectl(&[
            "-n",
            NAMESPACE,
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=berth-node-agent",
            "--field-selector",
            &format!("spec.nodeName={node}"),
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ])?;
        let mut full = vec!["-n", NAMESPACE, "exec", pod.trim(), "--", "node-agent"];
        full.extend_from_slice(args);
        self.kubectl(&full)
    }

    /// IDs of every image on a node, straight from CRI.
    pub async fn cri_image_ids(&self, node: &str) -> anyhow::Result<Vec<String>> {
        if !self.local {
            let mut ids: Vec<String> = self
                .agent_exec(node, &["images", "ls", "-q"])?
                .lines()
                .map(String::from)
                .collect();
            ids.sort();
            return Ok(ids);
        }
        let mut ids: Vec<String> = self
            .cri(node)
            .await?
            .list_images(k8s_cri::v1::ListImagesRequest { filter: None })
            .await?
            .into_inner()
            .images
            .into_iter()
            .map(|i| i.id)
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Whether a node's runtime holds `image`, straight from CRI ImageStatus.
    /// On an external cluster the agent's `images inspect` answers; only its
    /// "not found" counts as absent, any other failure is an error.
    pub async fn cri_has_image(&self, node: &str, image: &str) -> anyhow::Result<bool> {
        if !self.local {
            return match self.agent_exec(node, &["images", "inspect", image]) {
                Ok(_) => Ok(true),
                Err(e) if format!("{e:#}").contains(&format!("image {image} not found")) => {
                    Ok(false)
                }
                Err(e) => Err(e.context(format!("checking {image} on {node}"))),
            };
        }
        let spec = k8s_cri::v1::ImageSpec {
            image: image.to_string(),
            ..Default::default()
        };
        let r = self
            .cri(node)
            .await?
            .image_status(k8s_cri::v1::ImageStatusRequest {
                image: Some(spec),
                verbose: false,
            })
            .await?;
        Ok(r.into_inner().image.is_some())
    }

    /// Pulls `image` onto a local cluster's node straight through CRI;
    /// returns the image ID.
    pub async fn cri_pull(&self, node: &str, image: &str) -> anyhow::Result<String> {
        let spec = k8s_cri::v1::ImageSpec {
            image: image.to_string(),
            ..Default::default()
        };
        let r = self
            .cri(node)
            .await?
            .pull_image(k8s_cri::v1::PullImageRequest {
                image: Some(spec),
                ..Default::default()
            })
            .await?;
        // containerd answers with the image ID.
        Ok(r.into_inner().image_ref)
    }

    /// Removes an image from a node straight through CRI (absent is fine).
    pub async fn cri_remove(&self, node: &str, image: &str) -> anyhow::Result<()> {
        if !self.local {
            let _ = self.agent_exec(node, &["images", "rm", image]);
            return Ok(());
        }
        let spec = k8s_cri::v1::ImageSpec {
            image: image.to_string(),
            ..Default::default()
        };
        self.cri(node)
            .await?
            .remove_image(k8s_cri::v1::RemoveImageRequest { image: Some(spec) })
            .await?;
        Ok(())
    }

    /// A client of the plain registry.
    pub fn plain_registry(&self) -> registry::Registry {
        registry::Registry::new(self.registry(), None)
    }

    /// A client of the htpasswd registry, logged in.
    pub fn private_registry(&self) -> registry::Registry {
        registry::Registry::new(
            self.auth_registry(),
            Some((self.var("BERTH_AUTH_USER"), self.var("BERTH_AUTH_PASSWORD"))),
        )
    }

    /// Pushes a new image to the plain registry and returns its reference,
    /// `REGISTRY/e2e/NAME-UNIQUE:1`: the harness's busybox plus a layer with a
    /// unique marker, so its repository, tag and ID belong to the caller only.
    pub async fn fresh_image(&self, name: &str) -> anyhow::Result<String> {
        let repo = format!("e2e/{name}-{}", registry::unique_suffix());
        let mark = registry::tar_layer(&[("etc/berth-test-image", repo.as_bytes())])?;
        self.plain_registry()
            .push_image(&repo, "1", Some(("busybox", "1.36")), vec![mark])
            .await
            .with_context(|| format!("making test image {repo}"))?;
        Ok(format!("{}/{repo}:1", self.registry()))
    }

    /// Like [`Cluster::fresh_image`], configured as Docker Hub's busybox is
    /// (no entrypoint, command `sh`), so `docker run IMG sh -c …` means what
    /// it means with the real one.
    pub async fn fresh_docker_image(&self, name: &str) -> anyhow::Result<String> {
        let repo = format!("e2e/{name}-{}", registry::unique_suffix());
        let mark = registry::tar_layer(&[("etc/berth-test-image", repo.as_bytes())])?;
        let run = serde_json::json!({"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": ["sh"]});
        self.plain_registry()
            .push_image_as(&repo, "1", Some(("busybox", "1.36")), vec![mark], Some(run))
            .await
            .with_context(|| format!("making test image {repo}"))?;
        Ok(format!("{}/{repo}:1", self.registry()))
    }

    /// Like [`Cluster::fresh_image`], in the htpasswd registry only.
    pub async fn fresh_private_image(&self, name: &str) -> anyhow::Result<String> {
        let repo = format!("private/{name}-{}", registry::unique_suffix());
        let mark = registry::tar_layer(&[("etc/berth-test-image", repo.as_bytes())])?;
        self.private_registry()
            .push_image(&repo, "1", Some(("private/a", "1")), vec![mark])
            .await
            .with_context(|| format!("making private test image {repo}"))?;
        Ok(format!("{}/{repo}:1", self.auth_registry()))
    }

    /// A new image of `layers` layers of `layer_bytes` random bytes each (so
    /// nothing compresses or deduplicates), `REGISTRY/e2e/NAME-UNIQUE:1`.
    pub async fn fresh_big_image(
        &self,
        name: &str,
        layers: usize,
        layer_bytes: usize,
    ) -> anyhow::Result<String> {
        let repo = format!("e2e/{name}-{}", registry::unique_suffix());
        let mut tars = Vec::with_capacity(layers);
        for i in 0..layers {
            let data: Vec<u8> = std::iter::repeat_with(|| fastrand::u8(..))
                .take(layer_bytes)
                .collect();
            tars.push(registry::tar_layer(&[(&format!("data/layer{i}"), &data)])?);
        }
        self.plain_registry()
            .push_image(&repo, "1", None, tars)
            .await
            .with_context(|| format!("making test image {repo}"))?;
        Ok(format!("{}/{repo}:1", self.registry()))
    }

    /// Pushes new content (busybox plus a fresh marker) into the repository
    /// of `image` as tag `tag`, e.g. to move a tracked tag onto it later;
    /// returns that new reference.
    pub async fn push_variant(&self, image: &str, tag: &str) -> anyhow::Result<String> {
        let (host, rest) = image
            .split_once('/')
            .context("reference without registry")?;
        let repo = rest.rsplit_once(':').map_or(rest, |(r, _)| r);
        let mark = registry::tar_layer(&[(
            "etc/berth-test-image",
            format!("{repo}:{tag}:{}", registry::unique_suffix()).as_bytes(),
        )])?;
        let (reg, base) = if host == self.auth_registry() {
            (self.private_registry(), ("private/a", "1"))
        } else {
            (self.plain_registry(), ("busybox", "1.36"))
        };
        reg.push_image(repo, tag, Some(base), vec![mark]).await?;
        Ok(format!("{host}/{repo}:{tag}"))
    }

    /// Points `to` (`REGISTRY/REPO:TAG`, same registry and repository as
    /// `from`) at the manifest of `from`; returns the manifest digest.
    pub async fn retag_image(&self, from: &str, to: &str) -> anyhow::Result<String> {
        let split = |r: &str| -> anyhow::Result<(String, String, String)> {
            let (host, rest) = r.split_once('/').context("reference without registry")?;
            let (repo, tag) = rest.rsplit_once(':').context("reference without tag")?;
            Ok((host.into(), repo.into(), tag.into()))
        };
        let (host, repo, from_tag) = split(from)?;
        let (to_host, to_repo, to_tag) = split(to)?;
        if (host.as_str(), repo.as_str()) != (to_host.as_str(), to_repo.as_str()) {
            bail!("retag within one repository only: {from} -> {to}");
        }
        let reg = if host == self.auth_registry() {
            self.private_registry()
        } else {
            self.plain_registry()
        };
        reg.retag(&repo, &from_tag, &to_tag).await
    }

    /// `kubectl ARGS`, failing with its stderr.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(self.tool("kubectl"))
            .env("KUBECONFIG", self.var("KUBECONFIG"))
            .args(args)
            .output()
            .context("running kubectl")?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// The value of `name` in the coordinator Deployment's container env,
    /// if set there (as a literal value).
    pub fn coordinator_env(&self, name: &str) -> anyhow::Result<Option<String>> {
        let v = self.kubectl(&[
            "-n",
            NAMESPACE,
            "get",
            "deploy/berth-coordinator",
            "-o",
            &format!(
                "jsonpath={{.spec.template.spec.containers[0].env[?(@.name==\"{name}\")].value}}"
            ),
        ])?;
        let v = v.trim();
        Ok((!v.is_empty()).then(|| v.to_string()))
    }

    /// The connection caps of the coordinator's port 7070 as installed
    /// (`BERTH_MAX_CONNECTIONS`, `BERTH_MAX_CONNECTIONS_PER_IP`), the
    /// coordinator's `defaults` where unset: (total, per source IP).
    pub fn coordinator_caps(&self, defaults: (usize, usize)) -> anyhow::Result<(usize, usize)> {
        let read = |name: &str, default: usize| -> anyhow::Result<usize> {
            match self.coordinator_env(name)? {
                Some(v) => v.parse().with_context(|| format!("{name}={v}")),
                None => Ok(default),
            }
        };
        Ok((
            read("BERTH_MAX_CONNECTIONS", defaults.0)?,
            read("BERTH_MAX_CONNECTIONS_PER_IP", defaults.1)?,
        ))
    }

    /// `kubectl ARGS` with `input` on stdin; returns (success, stdout, stderr).
    pub fn kubectl_stdin(
        &self,
        args: &[&str],
        input: &str,
    ) -> anyhow::Result<(bool, String, String)> {
        use std::io::Write;
        let mut child = Command::new(self.tool("kubectl"))
            .env("KUBECONFIG", self.var("KUBECONFIG"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running kubectl")?;
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(input.as_bytes())?;
        let out = child.wait_with_output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
        ))
    }

    /// `kubectl apply -f -` of `yaml`, failing with kubectl's message.
    pub fn apply(&self, yaml: &str) -> anyhow::Result<()> {
        let (ok, _, err) = self.kubectl_stdin(&["apply", "-f", "-"], yaml)?;
        if !ok {
            bail!("kubectl apply: {err}");
        }
        Ok(())
    }

    /// `kubectl port-forward` to a Service; the forward ends when dropped.
    pub fn port_forward(&self, service: &str, port: u16) -> anyhow::Result<PortForward> {
        let local = free_port()?;
        let child = Command::new(self.tool("kubectl"))
            .env("KUBECONFIG", self.var("KUBECONFIG"))
            .args([
                "-n",
                NAMESPACE,
                "port-forward",
                "--address",
                "127.0.0.1",
                &format!("svc/{service}"),
                &format!("{local}:{port}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let pf = PortForward { child, port: local };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", local)).is_err() {
            if Instant::now() > deadline {
                bail!("port-forward to svc/{service} did not open");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(pf)
    }

    /// Runs the real `grpcurl` (reflection, no proto files) and returns stdout.
    pub fn grpcurl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(self.tool("grpcurl"))
            .args(args)
            .output()
            .context("running grpcurl")?;
        if !out.status.success() {
            bail!(
                "grpcurl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }
}

impl Cluster {
    /// The CA bundle the coordinator publishes (ConfigMap `berth-ca`, key
    /// `ca.crt`), read now: it changes when the certificate does.
    pub async fn ca_pem(&self) -> anyhow::Result<String> {
        let maps: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
            kube::Api::namespaced(self.client.clone(), NAMESPACE);
        let cm = maps
            .get("berth-ca")
            .await
            .context("reading ConfigMap berth-ca (the coordinator publishes it on start)")?;
        cm.data
            .and_then(|mut d| d.remove("ca.crt"))
            .context("ConfigMap berth-ca has no ca.crt")
    }

    /// [`Cluster::ca_pem`] in a file, for tools that want a path.
    pub async fn ca_file(&self) -> anyhow::Result<PathBuf> {
        let pem = self.ca_pem().await?;
        let path = std::env::temp_dir().join(format!(
            "berth-e2e-ca-{}-{}.crt",
            std::process::id(),
            registry::unique_suffix()
        ));
        std::fs::write(&path, pem)?;
        Ok(path)
    }

    /// A token of [`VIEWER_SA`], which may read the whole public API. The
    /// ServiceAccount and its ClusterRoleBinding are created if missing.
    pub fn api_token(&self) -> anyhow::Result<String> {
        if let Some(t) = self.token.get() {
            return Ok(t.clone());
        }
        self.apply(&format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {VIEWER_SA}, namespace: {NAMESPACE}}}\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: {VIEWER_SA}}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: berth-viewer}}\nsubjects:\n- {{kind: ServiceAccount, name: {VIEWER_SA}, namespace: {NAMESPACE}}}\n"
        ))?;
        let token = self.create_token(VIEWER_SA)?;
        Ok(self.token.get_or_init(|| token).clone())
    }

    /// `kubectl create token SA` in [`NAMESPACE`], for an hour.
    pub fn create_token(&self, service_account: &str) -> anyhow::Result<String> {
        Ok(self
            .kubectl(&[
                "-n",
                NAMESPACE,
                "create",
                "token",
                service_account,
                "--duration",
                "1h",
            ])?
            .trim()
            .to_string())
    }

    /// `grpcurl` over TLS (trusting `berth-ca`, checking
    /// [`COORDINATOR_NAME`]) with `token` as bearer, if any; returns
    /// (success, stdout, stderr), refusals included.
    pub async fn grpcurl_as(
        &self,
        token: Option<&str>,
        args: &[&str],
    ) -> anyhow::Result<(bool, String, String)> {
        let ca = self.ca_file().await?;
        let ca = ca.to_string_lossy().into_owned();
        let header = token.map(|t| format!("authorization: Bearer {t}"));
        let mut full = vec!["-cacert", &ca, "-servername", COORDINATOR_NAME];
        if let Some(h) = &header {
            full.extend(["-H", h.as_str()]);
        }
        full.extend_from_slice(args);
        let out = Command::new(self.tool("grpcurl"))
            .args(&full)
            .output()
            .context("running grpcurl")?;
        let _ = std::fs::remove_file(&ca);
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
        ))
    }

    /// `grpcurl` over TLS as the viewer ([`Cluster::api_token`]); fails with
    /// grpcurl's stderr.
    pub async fn api_grpcurl(&self, args: &[&str]) -> anyhow::Result<String> {
        let token = self.api_token()?;
        let (ok, out, err) = self.grpcurl_as(Some(&token), args).await?;
        if !ok {
            bail!("grpcurl {}: {err}", args.join(" "));
        }
        Ok(out)
    }

    /// A TLS channel to the coordinator at `addr` (`host:port`: a
    /// port-forward or a pod IP), verified against `berth-ca` as
    /// [`COORDINATOR_NAME`].
    pub async fn coordinator_channel(&self, addr: &str) -> anyhow::Result<Channel> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.ca_pem().await?))
            .domain_name(COORDINATOR_NAME);
        Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("TLS connection to the coordinator at {addr}"))
    }

    /// A `berth.v1.Inventory` client at `addr` that calls as the viewer.
    pub async fn inventory_client(&self, addr: &str) -> anyhow::Result<ApiClient> {
        let channel = self.coordinator_channel(addr).await?;
        let bearer = Bearer(format!("Bearer {}", self.api_token()?).parse()?);
        Ok(InventoryClient::with_interceptor(channel, bearer))
    }
}

/// Adds `authorization: Bearer …` to every call.
#[derive(Clone)]
pub struct Bearer(pub tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// An Inventory client that sends the viewer's token.
pub type ApiClient = InventoryClient<InterceptedService<Channel, Bearer>>;

/// A running `kubectl port-forward`.
pub struct PortForward {
    child: Child,
    /// Local port on 127.0.0.1.
    pub port: u16,
}

impl PortForward {
    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Polls `f` every 250 ms until it returns `Ok(Some(_))` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() > deadline {
            match last_err {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what}; last error: {e:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub use berth_node_agent::testing::missing_prerequisite;
