//! Published ports on the shim's host: for each TCP port a started
//! container publishes, the shim listens on `127.0.0.1:<host port>` and
//! carries each connection to the container's port through the
//! coordinator (`Containers/Tunnel`), since the shim cannot reach pod IPs.
//! The listeners live until the container is removed — by the client, by
//! `--rm`, or by anyone: a `Wait` for `removed` closes them — or the shim
//! stops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use berth_proto::api::{
    ContainerInfo, TunnelInput, TunnelOpen, WaitContainerRequest, tunnel_input,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::coordinator::Coordinator;
use crate::docker::container::PUBLISHED_IP;

/// The listeners of every container, by full container ID.
#[derive(Debug, Default, Clone)]
pub struct Forwards {
    open: Arc<Mutex<HashMap<String, Vec<JoinHandle<()>>>>>,
}

impl Forwards {
    /// Listens for each TCP port `info` publishes, unless that container's
    /// ports are already listened for. A host port that cannot be bound is
    /// reported and skipped.
    pub async fn open_for(&self, coordinator: &Coordinator, info: &ContainerInfo) {
        let Some(spec) = &info.spec else { return };
        if self.open.lock().unwrap().contains_key(&info.id) {
            return;
        }
        let mut tasks = Vec::new();
        for p in spec
            .ports
            .iter()
            .filter(|p| p.host_port != 0 && p.protocol != "udp")
        {
            let addr = format!("{PUBLISHED_IP}:{}", p.host_port);
            match TcpListener::bind(&addr).await {
                Ok(listener) => {
                    tracing::info!(id = %info.id, %addr, port = p.container_port, "forwarding a published port");
                    tasks.push(tokio::spawn(accept(
                        listener,
                        coordinator.clone(),
                        info.id.clone(),
                        p.container_port,
                    )));
                }
                Err(e) => {
                    tracing::warn!(id = %info.id, %addr, error = %e, "cannot listen for a published port")
                }
            }
        }
        if tasks.is_empty() {
            return;
        }
        self.open.lock().unwrap().insert(info.id.clone(), tasks);
        // Close the listeners once the container is gone, however it goes.
        let (forwards, mut containers, id) = (
            self.clone(),
            coordinator.containers.clone(),
            info.id.clone(),
        );
        let request = WaitContainerRequest {
            namespace: coordinator.namespace.clone(),
            id: id.clone(),
            condition: "removed".into(),
        };
        tokio::spawn(async move {
            if let Err(s) = containers.wait(request).await {
                tracing::debug!(%id, error = %s.message(), "waiting for removal ended");
            }
            forwards.close_for(&id);
        });
    }

    /// Stops listening for a removed container's ports.
    pub fn close_for(&self, id: &str) {
        let tasks = self.open.lock().unwrap().remove(id);
        for t in tasks.into_iter().flatten() {
            t.abort();
        }
    }
}

async fn accept(listener: TcpListener, coordinator: Coordinator, id: String, port: u32) {
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                let _ = conn.set_nodelay(true);
                tokio::spawn(carry(conn, coordinator.clone(), id.clone(), port));
            }
            Err(e) => tracing::warn!(%id, error = %e, "accept on a published port failed"),
        }
    }
}

/// Carries one connection to the container's port and back.
async fn carry(conn: TcpStream, coordinator: Coordinator, id: String, port: u32) {
    let (mut rd, mut wr) = conn.into_split();
    let (tx, rx) = tokio::sync::mpsc::channel::<TunnelInput>(8);
    let open = TunnelInput {
        kind: Some(tunnel_input::Kind::Open(TunnelOpen {
            namespace: coordinator.namespace.clone(),
            id: id.clone(),
            port,
        })),
    };
    if tx.send(open).await.is_err() {
        return;
    }
    let inbound =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut output = match coordinator.containers.clone().tunnel(inbound).await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            tracing::warn!(%id, port, error = %s.message(), "cannot open a tunnel to the container");
            return;
        }
    };
    let up = tokio::spawn(async move {
        let mut buf = vec![0u8; 32 << 10];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let data = TunnelInput {
                        kind: Some(tunnel_input::Kind::Data(buf[..n].to_vec())),
                    };
                    if tx.send(data).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    loop {
        match output.message().await {
            Ok(Some(m)) => {
                if wr.write_all(&m.data).await.is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(s) => {
                tracing::debug!(%id, port, error = %s.message(), "tunnel ended");
                break;
            }
        }
    }
    let _ = wr.shutdown().await;
    up.abort();
}
