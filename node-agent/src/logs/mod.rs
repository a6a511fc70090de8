//! Container logs for the coordinator: the agent's answer to `LogRequest`.
//!
//! The runtime writes each container's stdout and stderr to a CRI log file
//! on the host (`/var/log/pods/…`, mounted read-only into the agent). For a
//! request, [`LogStreams::start`] spawns one task, in its own span (stream id,
//! node, pod UID, container), that:
//!
//! 1. finds the container through [`ContainerLookup`] (the newest attempt of
//!    the pod's container) and its log file (`read`);
//! 2. parses the records ([`parse`]), keeps those the request selects
//!    (streams, since/until, the last `tail` lines), follows the file when
//!    asked (`watch`: inotify plus a fallback tick);
//! 3. sends them as `LogData` batches of at most ~64 KiB ([`batch`]) on the
//!    session's outbound channel, in file order; the last one has `end` set,
//!    and `error` if the stream ended early ([`LogError`]).
//!
//! Streams run side by side; [`LogStreams::cancel`] (a `LogCancel`) stops
//! one, which still sends its final `LogData`. Dropping the [`LogStreams`]
//! (the session ended) stops them all without a word: nobody is listening.
//! Each task waits for room on the shared channel like every other sender,
//! never holding up the session loop itself.

pub mod batch;
pub mod parse;
mod read;
#[cfg(test)]
mod tests;
mod watch;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use berth_proto::agent as pb;
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument, info, warn};

use crate::cri::CriError;
use crate::runtime::ContainerLookup;

pub use read::{EXIT_CHECK_EVERY, Filter};
pub use watch::FALLBACK_TICK;

/// Why a log stream ended early; its message goes to the coordinator in the
/// final `LogData`.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The request selects neither stdout nor stderr.
    #[error(
        "log request for container {container} of pod {pod_uid} selects neither stdout nor stderr; ask for at least one"
    )]
    NoStream {
        /// The pod's UID.
        pod_uid: String,
        /// The container's name.
        container: String,
    },
    /// The runtime has no such container.
    #[error(
        "no container {container} of pod {pod_uid} on this node: is the pod scheduled here, and has the container been created?"
    )]
    NotFound {
        /// The pod's UID.
        pod_uid: String,
        /// The container's name.
        container: String,
    },
    /// The runtime could not be asked.
    #[error("cannot look up container {container} of pod {pod_uid}: {source}")]
    Lookup {
        /// The pod's UID.
        pod_uid: String,
        /// The container's name.
        container: String,
        /// What the runtime said.
        source: CriError,
    },
    /// The runtime reports no log file for the container.
    #[error("the runtime reports no log file for container {container} (id {id}) of pod {pod_uid}")]
    NoLogPath {
        /// The pod's UID.
        pod_uid: String,
        /// The container's name.
        container: String,
        /// The runtime's container ID.
        id: String,
    },
    /// The log file could not be read.
    #[error(
        "cannot read the log of container {container} of pod {pod_uid} at {path}: {source}; is the host's /var/log/pods mounted into the agent at the same path?"
    )]
    Unreadable {
        /// The pod's UID.
        pod_uid: String,
        /// The container's name.
        container: String,
        /// The log file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The session ended: nobody reads the stream any more.
    #[error("the coordinator session ended")]
    SessionGone,
}

impl From<batch::SessionGone> for LogError {
    fn from(_: batch::SessionGone) -> Self {
        LogError::SessionGone
    }
}

/// The log streams of one session, by stream id.
pub struct LogStreams<L> {
    lookup: Arc<L>,
    node: Arc<str>,
    out: mpsc::Sender<pb::AgentMessage>,
    /// Dropping a sender stops its stream silently; sending on it stops it
    /// with a final `LogData`.
    active: HashMap<u64, oneshot::Sender<()>>,
}

impl<L: ContainerLookup> LogStreams<L> {
    /// Streams of the node `node`, reading through `lookup`, sending on `out`.
    pub fn new(lookup: Arc<L>, node: &str, out: mpsc::Sender<pb::AgentMessage>) -> Self {
        LogStreams {
            lookup,
            node: node.into(),
            out,
            active: HashMap::new(),
        }
    }

    /// Starts answering `req` in a task of its own. A stream id still in use
    /// names a new stream: the old one stops without a final message.
    pub fn start(&mut self, req: pb::LogRequest) {
        // Forget the streams that have ended.
        self.active.retain(|_, cancel| !cancel.is_closed());
        let (cancel, cancelled) = oneshot::channel();
        self.active.insert(req.stream_id, cancel);
        let span = tracing::info_span!(
            "logs",
            stream_id = req.stream_id,
            node = %self.node,
            pod_uid = %req.pod_uid,
            container = %req.container_name,
        );
        tokio::spawn(
            run_stream(self.lookup.clone(), req, self.out.clone(), cancelled).instrument(span),
        );
    }

    /// Stops the stream `stream_id` (a `LogCancel`); it sends its final
    /// `LogData`. An unknown or finished stream is left alone.
    pub fn cancel(&mut self, stream_id: u64) {
        if let Some(cancel) = self.active.remove(&stream_id) {
            let _ = cancel.send(());
        }
    }

    /// How many streams are still running.
    pub fn running(&self) -> usize {
        self.active.values().filter(|c| !c.is_closed()).count()
    }
}

/// Answers one request until it is done, fails, or `cancelled` fires (a
/// `LogCancel`: final message sent) or is dropped (the session ended).
pub async fn run_stream<L: ContainerLookup>(
    lookup: Arc<L>,
    req: pb::LogRequest,
    out: mpsc::Sender<pb::AgentMessage>,
    cancelled: oneshot::Receiver<()>,
) {
    info!(follow = req.follow, tail = req.tail, "log stream started");
    let mut batcher = batch::Batcher::new(req.stream_id, out);
    let outcome = tokio::select! {
        r = read::serve(&*lookup, &req, &mut batcher) => r,
        c = cancelled => match c {
            Ok(()) => {
                info!("log stream cancelled");
                Ok(())
            }
            Err(_) => return,
        },
    };
    let error = match outcome {
        Ok(()) => String::new(),
        Err(LogError::SessionGone) => return,
        Err(e) => {
            warn!(error = %e, "log stream failed");
            e.to_string()
        }
    };
    if batcher.finish(error).await.is_ok() {
        info!("log stream ended");
    }
}
