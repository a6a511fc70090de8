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
}

impl Args {
    /// The token file to use: the flag, else the in-cluster token if it exists.
    pub fn token_path(&self) -> Option<PathBuf> {
        self.token_file.clone().or_else(|| {
            let p = PathBuf::from(IN_CLUSTER_TOKEN);
            p.exists().then_some(p)
        })
    }
}
