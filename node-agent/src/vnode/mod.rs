//! `node-agent virtual-node --provider systemd`: a host without a kubelet
//! joins the cluster as a Node whose pods run as transient systemd units.
//!
//! - [`node`]: the Node (capacity from /proc, a NoSchedule taint pods must
//!   tolerate), its Lease and its Ready condition.
//! - [`pods`]: the pods bound to it, reconciled against the units.
//! - [`kubelet_api`]: the kubelet API the apiserver calls for `kubectl logs`.
//! - [`probes`]: readiness and liveness probes (exec, httpGet, tcpSocket).
//! - [`units`]: the pure rules (unit names, commands, restart, limits, images).
//! - [`systemd`]: systemd's manager over D-Bus.

pub mod kubelet_api;
pub mod node;
pub mod pods;
pub mod probes;
pub mod systemd;
pub mod units;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

/// `node-agent virtual-node …`
#[derive(Debug, clap::Args)]
pub struct VirtualNodeArgs {
    /// Where pods run; only `systemd` exists.
    #[arg(long, default_value = "systemd")]
    pub provider: String,
    /// Name of the Node to register.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Kubeconfig of the cluster to join [default: in-cluster, or $KUBECONFIG].
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// D-Bus address of the systemd to run units on (e.g.
    /// `unix:path=/run/user/0/bus` for a user instance) [default: the system bus].
    #[arg(long, env = "BERTH_DBUS_ADDRESS")]
    pub dbus_address: Option<String>,
    /// The host's address, reported as the Node's InternalIP and the pods' IP
    /// (pods share the host's network).
    #[arg(long)]
    pub internal_ip: IpAddr,
    /// The slice every pod unit runs in.
    #[arg(long, default_value = "berth.slice")]
    pub slice: String,
    /// Where containers' stdout and stderr are written, one file each.
    #[arg(long, default_value = "/var/lib/berth/virtual-node/logs")]
    pub logs_dir: PathBuf,
    /// Port of the kubelet API (`kubectl logs`), on the internal IP.
    #[arg(long, default_value_t = 10250)]
    pub kubelet_port: u16,
    /// Serving certificate of the kubelet API, for the internal IP, signed by
    /// the CA the apiserver trusts for kubelets. Without it (and the key and
    /// client CA) the kubelet API is not served.
    #[arg(long, requires_all = ["tls_key_file", "client_ca_file"])]
    pub tls_cert_file: Option<PathBuf>,
    /// Its private key.
    #[arg(long)]
    pub tls_key_file: Option<PathBuf>,
    /// CA of the apiserver's kubelet client certificate; other callers are refused.
    #[arg(long)]
    pub client_ca_file: Option<PathBuf>,
}

/// Registers the Node and runs its pods until the process ends.
pub async fn run(args: VirtualNodeArgs) -> anyhow::Result<()> {
    if args.provider != "systemd" {
        anyhow::bail!("unknown provider {:?}: only systemd exists", args.provider);
    }
    let config = match &args.kubeconfig {
        Some(path) => kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?,
            &Default::default(),
        )
        .await
        .context("kubeconfig")?,
        None => kube::Config::infer()
            .await
            .context("no kubeconfig and not in a cluster")?,
    };
    let client = kube::Client::try_from(config)?;
    let systemd = systemd::Systemd::connect(args.dbus_address.as_deref()).await?;
    let version = systemd.version().await.unwrap_or_else(|_| "unknown".into());
    std::fs::create_dir_all(&args.logs_dir)
        .with_context(|| format!("creating {}", args.logs_dir.display()))?;
    let port = match (
        &args.tls_cert_file,
        &args.tls_key_file,
        &args.client_ca_file,
    ) {
        (Some(cert), Some(key), Some(ca)) => {
            let listener = tokio::net::TcpListener::bind((args.internal_ip, args.kubelet_port))
                .await
                .with_context(|| {
                    format!(
                        "binding the kubelet API on {}:{}",
                        args.internal_ip, args.kubelet_port
                    )
                })?;
            let tls = kubelet_api::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: ca.clone(),
            };
            let dir = args.logs_dir.clone();
            tokio::spawn(async move {
                if let Err(e) = kubelet_api::serve(listener, tls, dir).await {
                    tracing::error!(error = %format!("{e:#}"), "the kubelet API stopped; kubectl logs will fail");
                }
            });
            Some(args.kubelet_port)
        }
        _ => {
            tracing::warn!("no --tls-cert-file: the kubelet API (kubectl logs) is not served");
            None
        }
    };
    node::register(&client, &args.node_name, args.internal_ip, &version, port).await?;
    tracing::info!(node = %args.node_name, systemd = %version, "virtual node registered");
    tokio::spawn(node::keep_lease(client.clone(), args.node_name.clone()));
    {
        let (client, name, ip, version) = (
            client.clone(),
            args.node_name.clone(),
            args.internal_ip,
            version.clone(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(node::STATUS_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Err(e) = node::write_status(&client, &name, ip, &version, port).await {
                    tracing::warn!(error = %format!("{e:#}"), "node status not written");
                }
            }
        });
    }
    let wake = Arc::new(tokio::sync::Notify::new());
    let provider = pods::Provider::new(
        client,
        &args.node_name,
        &args.internal_ip.to_string(),
        systemd,
        &args.slice,
        args.logs_dir.clone(),
        wake.clone(),
    );
    provider.run(wake).await;
    Ok(())
}
