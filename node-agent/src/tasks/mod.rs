//! Carries out the coordinator's tasks on the node's runtime.
//!
//! [`TaskRunner::submit`] gives every task one tracing span (task id, node,
//! image) that its future is instrumented with, so each log line names the
//! task it belongs to even while tasks overlap. One file per task kind:
//!
//! - [`pull`]: pulls run under a semaphore (bounded concurrency) with the
//!   task's deadline, after the disk guard agrees; a pull for an image already
//!   being pulled joins it, so a coordinator that resends tasks after a
//!   restart causes no duplicate pulls.
//! - [`remove`]: removes happen only for images this agent pulled (the
//!   [`Managed`] set, kept in a file so it survives agent restarts) that no
//!   container uses and that carry no reference Berth did not pull (CRI
//!   removes an image with every reference to it).
//!
//! - [`copy`]: registry-to-registry copies for ImageBackup, at most
//!   [`COPIES_AT_ONCE`] at a time, with byte progress as they go.
//!
//! Every outcome goes back as a `TaskUpdate` on the channel the session forwards.

pub mod copy;
mod pull;
mod remove;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use berth_proto::agent as pb;
use tokio::sync::{Semaphore, mpsc};
use tracing::{Instrument, warn};

use crate::cri::CriError;
use crate::disk::DiskGuard;
use crate::runtime::ImageRuntime;

pub use remove::foreign_references;

/// Images Berth pulled onto this node, by normalised reference, persisted as
/// JSON in the state directory (written to a temporary file, then renamed).
#[derive(Debug)]
pub struct Managed {
    path: Option<PathBuf>,
    refs: Mutex<BTreeSet<String>>,
}

impl Managed {
    /// Loads the set from `dir/managed-images.json`; `None` keeps it in memory.
    pub fn load(dir: Option<PathBuf>) -> Self {
        let path = dir.map(|d| d.join("managed-images.json"));
        let refs = path
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Managed {
            path,
            refs: Mutex::new(refs),
        }
    }

    /// Whether Berth pulled `reference` here.
    pub fn contains(&self, reference: &str) -> bool {
        self.refs.lock().unwrap().contains(reference)
    }

    /// Every managed reference.
    pub fn all(&self) -> BTreeSet<String> {
        self.refs.lock().unwrap().clone()
    }

    fn update(&self, f: impl FnOnce(&mut BTreeSet<String>)) {
        let mut refs = self.refs.lock().unwrap();
        f(&mut refs);
        if let Some(path) = &self.path {
            let tmp = path.with_extension("json.tmp");
            let write = std::fs::write(&tmp, serde_json::to_vec(&*refs).unwrap_or_default())
                .and_then(|_| std::fs::rename(&tmp, path));
            if let Err(e) = write {
                warn!(path = %path.display(), error = %e, "cannot persist managed images");
            }
        }
    }
}

/// Copies one agent runs at once.
pub const COPIES_AT_ONCE: usize = 2;

/// Runs tasks; cheap to clone.
pub struct TaskRunner<R> {
    rt: Arc<R>,
    /// The node this agent runs on, for the task spans.
    node: Arc<str>,
    pulls: Arc<Semaphore>,
    copies: Arc<Semaphore>,
    /// The runtime's socket, for copies that read its content store.
    runtime_socket: Option<PathBuf>,
    /// Image → ids of the tasks waiting for its pull.
    inflight: Arc<Mutex<HashMap<String, Vec<String>>>>,
    managed: Arc<Managed>,
    disk: Arc<DiskGuard>,
    updates: mpsc::UnboundedSender<pb::TaskUpdate>,
}

// By hand: a derive would demand `R: Clone`.
impl<R> Clone for TaskRunner<R> {
    fn clone(&self) -> Self {
        TaskRunner {
            rt: self.rt.clone(),
            node: self.node.clone(),
            pulls: self.pulls.clone(),
            copies: self.copies.clone(),
            runtime_socket: self.runtime_socket.clone(),
            inflight: self.inflight.clone(),
            managed: self.managed.clone(),
            disk: self.disk.clone(),
            updates: self.updates.clone(),
        }
    }
}

fn reason_of(e: &CriError) -> pb::FailureReason {
    use pb::FailureReason as F;
    match e {
        CriError::ImageNotFound { .. } => F::ImageNotFound,
        CriError::RegistryUnreachable { .. } => F::RegistryUnreachable,
        CriError::AuthRefused { .. } => F::AuthFailed,
        CriError::PullTimeout { .. } => F::PullTimeout,
        CriError::BadReference(_) => F::BadReference,
        _ => F::RuntimeError,
    }
}

fn update(task_id: &str, state: pb::TaskState) -> pb::TaskUpdate {
    pb::TaskUpdate {
        task_id: task_id.to_string(),
        state: state as i32,
        ..Default::default()
    }
}

fn failed(
    task_id: &str,
    reason: pb::FailureReason,
    message: String,
    start: Instant,
) -> pb::TaskUpdate {
    pb::TaskUpdate {
        reason: reason as i32,
        message,
        elapsed_ms: start.elapsed().as_millis() as u64,
        ..update(task_id, pb::TaskState::Failed)
    }
}

impl<R: ImageRuntime> TaskRunner<R> {
    /// A runner for the node `node` with at most `max_pulls` pulls at once;
    /// its updates go to the returned receiver.
    pub fn new(
        rt: Arc<R>,
        node: &str,
        max_pulls: usize,
        managed: Managed,
    ) -> (Self, mpsc::UnboundedReceiver<pb::TaskUpdate>) {
        let (updates, rx) = mpsc::unbounded_channel();
        let runner = TaskRunner {
            rt,
            node: node.into(),
            pulls: Arc::new(Semaphore::new(max_pulls.max(1))),
            copies: Arc::new(Semaphore::new(COPIES_AT_ONCE)),
            runtime_socket: None,
            inflight: Arc::default(),
            managed: Arc::new(managed),
            disk: Arc::new(DiskGuard::disabled()),
            updates,
        };
        (runner, rx)
    }

    /// Refuses pulls that would pass `guard`'s threshold.
    pub fn with_disk_guard(mut self, guard: DiskGuard) -> Self {
        self.disk = Arc::new(guard);
        self
    }

    /// Lets copies read images from containerd's content store at `socket`
    /// (the CRI socket of a containerd node).
    pub fn with_runtime_socket(mut self, socket: PathBuf) -> Self {
        self.runtime_socket = Some(socket);
        self
    }

    /// The runtime tasks run on.
    pub fn runtime(&self) -> &R {
        &self.rt
    }

    /// The runtime, shared, for work that outlives a borrow (log streams).
    pub fn shared_runtime(&self) -> Arc<R> {
        self.rt.clone()
    }

    /// The managed set, for the inventory.
    pub fn managed(&self) -> &Managed {
        &self.managed
    }

    /// Starts a task in the background, in its own span (task id, node,
    /// image) that every log line of the task carries.
    pub fn submit(&self, task: pb::Task) {
        let image = match &task.kind {
            Some(pb::task::Kind::Pull(p)) => p.image.as_str(),
            Some(pb::task::Kind::Remove(r)) => r.image.as_str(),
            Some(pb::task::Kind::Copy(c)) => c.source.as_str(),
            None => "",
        };
        let span =
            tracing::info_span!("task", task_id = %task.id, node = %self.node, image = %image);
        match task.kind {
            Some(pb::task::Kind::Pull(p)) => self.pull(task.id, p, span),
            Some(pb::task::Kind::Copy(c)) => self.copy(task.id, c, span),
            Some(pb::task::Kind::Remove(r)) => {
                let this = self.clone();
                tokio::spawn(async move { this.remove(task.id, r).await }.instrument(span));
            }
            None => {
                span.in_scope(|| warn!("task of an unknown kind"));
                self.send(failed(
                    &task.id,
                    pb::FailureReason::Unspecified,
                    "task of an unknown kind (is the agent older than the coordinator?)".into(),
                    Instant::now(),
                ));
            }
        }
    }

    /// Hands an update to the session; a closed channel means the agent is
    /// shutting down, and the update has nobody left to tell.
    fn send(&self, update: pb::TaskUpdate) {
        let _ = self.updates.send(update);
    }
}
