//! `Containers/Tunnel`: one TCP connection from the coordinator to a port
//! of a running container's pod, its bytes carried over the gRPC stream, so
//! a client that cannot reach pod IPs (docker-shim on a developer machine)
//! reaches a published port through the coordinator it already talks to.

use std::pin::Pin;
use std::time::Duration;

use berth_proto::api as pb;
use futures::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Status;

use super::api::ContainersApi;

/// Longest wait for the container's port to accept.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the container sends, as a stream.
pub type TunnelOutputs = Pin<Box<dyn Stream<Item = Result<pb::TunnelOutput, Status>> + Send>>;

impl ContainersApi {
    /// Connects to the container's port and pumps bytes both ways.
    pub(super) async fn tunnel(
        &self,
        session: Option<String>,
        mut input: tonic::Streaming<pb::TunnelInput>,
    ) -> Result<TunnelOutputs, Status> {
        let Some(pb::tunnel_input::Kind::Open(open)) = input.message().await?.and_then(|m| m.kind)
        else {
            return Err(Status::invalid_argument(
                "Tunnel: the first message must be a TunnelOpen",
            ));
        };
        let port = u16::try_from(open.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                Status::invalid_argument(format!("port {} is not a TCP port", open.port))
            })?;
        let space = self.space(&open.namespace).await?.for_session(session);
        let record = space.find(&open.id)?;
        let pod = space.running_pod(&record)?;
        let ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .ok_or_else(|| Status::unavailable("the container's pod has no IP yet"))?;
        let stream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((ip.as_str(), port)),
        )
        .await
        .map_err(|_| {
            Status::unavailable(format!(
                "port {port} of container {} did not answer within {CONNECT_TIMEOUT:?}",
                record.name
            ))
        })?
        .map_err(|e| {
            Status::unavailable(format!(
                "cannot connect to port {port} of container {}: {e}",
                record.name
            ))
        })?;
        let (mut rd, mut wr) = stream.into_split();
        tokio::spawn(async move {
            while let Ok(Some(m)) = input.message().await {
                if let Some(pb::tunnel_input::Kind::Data(d)) = m.kind
                    && wr.write_all(&d).await.is_err()
                {
                    return;
                }
            }
            let _ = wr.shutdown().await;
        });
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::TunnelOutput, Status>>(8);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 32 << 10];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) => return,
                    Ok(n) => {
                        let out = pb::TunnelOutput {
                            data: buf[..n].to_vec(),
                        };
                        if tx.send(Ok(out)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::aborted(format!(
                                "the container's connection broke: {e}"
                            ))))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}
