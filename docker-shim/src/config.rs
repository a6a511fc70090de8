//! The shim's command line: where it listens, which coordinator it calls,
//! how it proves who it is, and where containers go. Every flag can also be
//! set through the environment variable named beside it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Where a pod's projected (or default) ServiceAccount token sits.
pub const IN_CLUSTER_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// `docker-shim`: the Docker Engine API, served by running containers as
/// pods through the Berth coordinator.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "docker-shim", version, about)]
pub struct Args {
    /// TCP address of the Docker API (`DOCKER_HOST=tcp://ADDR`). Anyone who
    /// reaches it acts with the shim's token: keep it on loopback unless the
    /// network around it is trusted.
    #[arg(long, env = "BERTH_DOCKER_LISTEN", default_value = "127.0.0.1:2475")]
    pub listen: SocketAddr,
    /// Also serve the Docker API on this unix socket
    /// (`DOCKER_HOST=unix://PATH`); a stale socket file there is replaced.
    #[arg(long, env = "BERTH_DOCKER_SOCKET")]
    pub socket: Option<PathBuf>,
    /// The coordinator's public API (TLS only).
    #[arg(
        long,
        env = "BERTH_COORDINATOR",
        default_value = "https://127.0.0.1:7070"
    )]
    pub coordinator: String,
    /// The CA bundle the coordinator's certificate is checked against (the
    /// key `ca.crt` of the ConfigMap `berth-ca` in `berth-system`).
    #[arg(long, env = "BERTH_CA_FILE")]
    pub ca_file: PathBuf,
    /// The name to verify in the coordinator's certificate, whatever host
    /// the URL names (so a port-forward to 127.0.0.1 still verifies).
    #[arg(
        long,
        env = "BERTH_TLS_SERVER_NAME",
        default_value = "berth-coordinator.berth-system.svc"
    )]
    pub tls_server_name: String,
    /// A file holding the bearer token sent on every call; re-read every
    /// `--token-refresh`, since projected tokens rotate. Default: the pod's
    /// ServiceAccount token, if the shim runs in a pod.
    #[arg(long, env = "BERTH_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// How often the token file is read again.
    #[arg(long, env = "BERTH_TOKEN_REFRESH", default_value = "60s", value_parser = humantime::parse_duration)]
    pub token_refresh: Duration,
    /// The Kubernetes namespace the containers are created in (and listed
    /// from); sent with every call.
    #[arg(long, env = "BERTH_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// CPU request of every container's pod (`250m`); label
    /// `berth.dev/cpu-request` overrides it per container.
    #[arg(long, env = "BERTH_CPU_REQUEST", default_value = "")]
    pub cpu_request: String,
    /// Memory request (`256Mi`); label `berth.dev/memory-request`.
    #[arg(long, env = "BERTH_MEMORY_REQUEST", default_value = "")]
    pub memory_request: String,
    /// CPU limit; label `berth.dev/cpu-limit` (and `docker run --cpus`).
    #[arg(long, env = "BERTH_CPU_LIMIT", default_value = "")]
    pub cpu_limit: String,
    /// Memory limit; label `berth.dev/memory-limit` (and `docker run -m`).
    #[arg(long, env = "BERTH_MEMORY_LIMIT", default_value = "")]
    pub memory_limit: String,
    /// Image pull policy: Always, IfNotPresent or Never; label
    /// `berth.dev/pull-policy`.
    #[arg(long, env = "BERTH_PULL_POLICY", default_value = "")]
    pub pull_policy: String,
    /// The pods' ServiceAccount (its token is not mounted); label
    /// `berth.dev/service-account`.
    #[arg(long, env = "BERTH_SERVICE_ACCOUNT", default_value = "")]
    pub service_account: String,
    /// `key=value` node labels every pod must land on (repeatable, or
    /// comma-separated); label `berth.dev/node-selector`.
    #[arg(long, env = "BERTH_NODE_SELECTOR", value_delimiter = ',')]
    pub node_selector: Vec<String>,
    /// Stop every pod after this long (`30m`); label
    /// `berth.dev/active-deadline-seconds`.
    #[arg(long, env = "BERTH_ACTIVE_DEADLINE", value_parser = humantime::parse_duration)]
    pub active_deadline: Option<Duration>,
    /// Secrets of the namespace to pull images with (repeatable, or
    /// comma-separated); label `berth.dev/image-pull-secrets`.
    #[arg(long, env = "BERTH_IMAGE_PULL_SECRETS", value_delimiter = ',')]
    pub image_pull_secret: Vec<String>,
    /// A Pod in YAML or JSON that every container's pod is built on
    /// (volumes, tolerations, affinity, security context; its first
    /// container is the base of the container).
    #[arg(long, env = "BERTH_POD_TEMPLATE")]
    pub pod_template: Option<PathBuf>,
    /// `uid[:gid]` to run containers as when they name no user; label
    /// `berth.dev/run-as-user`.
    #[arg(long, env = "BERTH_RUN_AS_USER", default_value = "")]
    pub run_as_user: String,
    /// How containers start: `pod` (a fresh pod each) or `sandbox-pool` (in
    /// a ready sandbox of the coordinator's pool, as an ephemeral container,
    /// when the container needs nothing an ephemeral container cannot have);
    /// label `berth.dev/start-mode`.
    #[arg(long, env = "BERTH_START_MODE", default_value = "pod")]
    pub start_mode: String,
    /// Remove every container this long after it was created, whatever its
    /// state (`60m`; default: never; the session's end removes them too).
    #[arg(long, env = "BERTH_MAX_AGE", value_parser = humantime::parse_duration)]
    pub max_age: Option<Duration>,
    /// At start, remove at once the containers and networks that shims no
    /// longer running left in the namespace (the coordinator removes them
    /// by itself about a minute after their shim stopped).
    #[arg(long, env = "BERTH_PRUNE_AT_START")]
    pub prune_at_start: bool,
    /// On SIGTERM or ctrl-c, remove this shim's containers and networks
    /// before exiting (`false`: leave them to the coordinator, which removes
    /// them about 20 s later).
    #[arg(long, env = "BERTH_CLEANUP_ON_EXIT", default_value_t = true, action = clap::ArgAction::Set)]
    pub cleanup_on_exit: bool,
}

impl Args {
    /// The pod settings every container starts from, the pod template read
    /// from its file.
    pub fn pod_defaults(&self) -> anyhow::Result<crate::docker::options::PodDefaults> {
        use anyhow::Context;
        let pod_template = match &self.pod_template {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the pod template {}", path.display()))?,
            None => String::new(),
        };
        let options = berth_proto::api::PodOptions {
            cpu_request: self.cpu_request.clone(),
            memory_request: self.memory_request.clone(),
            cpu_limit: self.cpu_limit.clone(),
            memory_limit: self.memory_limit.clone(),
            pull_policy: self.pull_policy.clone(),
            service_account: self.service_account.clone(),
            node_selector: crate::docker::options::node_selector(&self.node_selector)
                .map_err(anyhow::Error::msg)?,
            active_deadline_seconds: self
                .active_deadline
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
            image_pull_secrets: self.image_pull_secret.clone(),
            pod_template,
        };
        Ok(crate::docker::options::PodDefaults {
            options,
            run_as_user: self.run_as_user.clone(),
            max_age_seconds: self
                .max_age
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
            start_mode: self.start_mode.clone(),
        })
    }

    /// The token file to use: the flag, else the in-cluster token if it exists.
    pub fn token_path(&self) -> Option<PathBuf> {
        self.token_file.clone().or_else(|| {
            let p = PathBuf::from(IN_CLUSTER_TOKEN);
            p.exists().then_some(p)
        })
    }
}
