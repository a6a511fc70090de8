//! Routes container logs from the node that holds them to the API caller.
//!
//! A [`LogRouter::open`] sends a `LogRequest` on the node's agent session
//! and hands back a [`LogStream`]; the session passes each `LogData` it
//! receives to [`LogRouter::deliver`], which forwards it to the stream's
//! reader. Dropping a stream (the caller went away) sends `LogCancel`. A
//! reader that falls [`BUFFER`] batches behind loses its stream rather than
//! stall the agent's session, which carries everything else of that node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use berth_proto::agent as pb;
use tokio::sync::mpsc;

use crate::nodes::NodeRegistry;

/// Batches (of up to ~64 KiB) buffered per stream.
pub const BUFFER: usize = 64;

/// Open log streams, by stream ID.
#[derive(Debug, Default)]
pub struct LogRouter {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Route>>,
}

#[derive(Debug)]
struct Route {
    node: String,
    pod_uid: String,
    tx: mpsc::Sender<pb::LogData>,
}

/// The reading end of one log stream; cancels it on drop.
#[derive(Debug)]
pub struct LogStream {
    id: u64,
    rx: mpsc::Receiver<pb::LogData>,
    registry: Arc<NodeRegistry>,
}

impl LogStream {
    /// The next batch; `None` once the agent sent its last one (or the
    /// stream was dropped for falling behind).
    pub async fn next(&mut self) -> Option<pb::LogData> {
        self.rx.recv().await
    }
}

impl Drop for LogStream {
    fn drop(&mut self) {
        let router = self.registry.logs();
        let route = router.open.lock().unwrap().remove(&self.id);
        if let Some(route) = route {
            let cancel = pb::CoordinatorMessage {
                kind: Some(pb::coordinator_message::Kind::LogCancel(pb::LogCancel {
                    stream_id: self.id,
                })),
            };
            self.registry.send(&route.node, cancel);
        }
    }
}

impl LogRouter {
    /// Asks `node`'s agent for a log (the request's `stream_id` is set
    /// here). `None` if the node has no agent session right now.
    pub fn open(
        registry: &Arc<NodeRegistry>,
        node: &str,
        mut request: pb::LogRequest,
    ) -> Option<LogStream> {
        let router = registry.logs();
        let id = router.next.fetch_add(1, Ordering::Relaxed) + 1;
        request.stream_id = id;
        let (tx, rx) = mpsc::channel(BUFFER);
        router.open.lock().unwrap().insert(
            id,
            Route {
                node: node.to_string(),
                pod_uid: request.pod_uid.clone(),
                tx,
            },
        );
        let stream = LogStream {
            id,
            rx,
            registry: registry.clone(),
        };
        let msg = pb::CoordinatorMessage {
            kind: Some(pb::coordinator_message::Kind::LogRequest(request)),
        };
        // On failure the stream's drop forgets the route.
        registry.send(node, msg).then_some(stream)
    }

    /// Passes a batch from `node`'s agent to its stream's reader. False if
    /// the reader fell behind and lost its stream: the agent should stop.
    pub fn deliver(&self, node: &str, data: pb::LogData) -> bool {
        let id = data.stream_id;
        let mut open = self.open.lock().unwrap();
        let Some(route) = open.get(&id).filter(|r| r.node == node) else {
            // Cancelled already; the agent's cancel is on its way.
            return true;
        };
        let end = data.end;
        let kept = route.tx.try_send(data).is_ok();
        if !kept || end {
            // The reader sees the channel close after what it already has.
            open.remove(&id);
        }
        kept
    }

    /// Streams open for a pod right now (auto-removal waits for them).
    pub fn open_for(&self, pod_uid: &str) -> usize {
        self.open
            .lock()
            .unwrap()
            .values()
            .filter(|r| r.pod_uid == pod_uid)
            .count()
    }

    /// Ends every stream of a node whose session ended.
    pub fn node_gone(&self, node: &str) {
        self.open.lock().unwrap().retain(|_, r| r.node != node);
    }
}
