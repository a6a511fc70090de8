//! Carries out the coordinator's tasks on the node's runtime.
//!
//! Pulls run under a semaphore (bounded concurrency) with the task's deadline;
//! a pull for an image already being pulled joins it, so a coordinator that
//! resends tasks after a restart causes no duplicate pulls. Removes happen only
//! for images this agent pulled (the [`Managed`] set, kept in a file so it
//! survives agent restarts) that no container uses. Every outcome goes back as
//! a `TaskUpdate` on the channel the session forwards.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_proto::agent as pb;
use berth_proto::reference::Reference;
use tokio::sync::{Semaphore, mpsc};
use tracing::{info, warn};

use crate::cri::CriError;
use crate::disk::DiskGuard;
use crate::runtime::{ImageRuntime, RegistryAuth};

/// Deadline of a pull whose task names none.
const DEFAULT_PULL_TIMEOUT: Duration = Duration::from_secs(30 * 60);

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

/// Runs tasks; cheap to clone.
pub struct TaskRunner<R> {
    rt: Arc<R>,
    pulls: Arc<Semaphore>,
    /// Image → ids of the tasks waiting for its pull.
    inflight: Arc<Mutex<HashMap<String, Vec<String>>>>,
    managed: Arc<Managed>,
    disk: Arc<DiskGuard>,
    updates: mpsc::UnboundedSender<pb::TaskUpdate>,
}

/// Why a pull did not happen.
enum PullError {
    Cri(CriError),
    Disk(String),
}

impl From<CriError> for PullError {
    fn from(e: CriError) -> Self {
        PullError::Cri(e)
    }
}

// By hand: a derive would demand `R: Clone`.
impl<R> Clone for TaskRunner<R> {
    fn clone(&self) -> Self {
        TaskRunner {
            rt: self.rt.clone(),
            pulls: self.pulls.clone(),
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
    /// A runner with at most `max_pulls` pulls at once; its updates go to the
    /// returned receiver.
    pub fn new(
        rt: Arc<R>,
        max_pulls: usize,
        managed: Managed,
    ) -> (Self, mpsc::UnboundedReceiver<pb::TaskUpdate>) {
        let (updates, rx) = mpsc::unbounded_channel();
        let runner = TaskRunner {
            rt,
            pulls: Arc::new(Semaphore::new(max_pulls.max(1))),
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

    /// The runtime tasks run on.
    pub fn runtime(&self) -> &R {
        &self.rt
    }

    /// The managed set, for the inventory.
    pub fn managed(&self) -> &Managed {
        &self.managed
    }

    /// Starts a task in the background.
    pub fn submit(&self, task: pb::Task) {
        match task.kind {
            Some(pb::task::Kind::Pull(p)) => self.pull(task.id, p),
            Some(pb::task::Kind::Remove(r)) => {
                let this = self.clone();
                tokio::spawn(async move { this.remove(task.id, r).await });
            }
            None => {
                let _ = self.updates.send(failed(
                    &task.id,
                    pb::FailureReason::Unspecified,
                    "task of an unknown kind (is the agent older than the coordinator?)".into(),
                    Instant::now(),
                ));
            }
        }
    }

    fn pull(&self, task_id: String, p: pb::PullTask) {
        let start = Instant::now();
        let reference = match Reference::parse(&p.image) {
            Ok(r) => r,
            Err(e) => {
                let _ = self.updates.send(failed(
                    &task_id,
                    pb::FailureReason::BadReference,
                    e.to_string(),
                    start,
                ));
                return;
            }
        };
        let key = reference.to_string();
        {
            let mut inflight = self.inflight.lock().unwrap();
            let _ = self.updates.send(update(&task_id, pb::TaskState::Accepted));
            if let Some(waiting) = inflight.get_mut(&key) {
                info!(image = %key, task = %task_id, "joining the pull already running");
                waiting.push(task_id);
                return;
            }
            inflight.insert(key.clone(), vec![task_id.clone()]);
        }
        let this = self.clone();
        tokio::spawn(async move {
            let outcome = this.pull_once(&reference, &p).await;
            let waiting = this
                .inflight
                .lock()
                .unwrap()
                .remove(&key)
                .unwrap_or_default();
            for id in waiting {
                let u = match &outcome {
                    Ok(image_id) => pb::TaskUpdate {
                        image_id: image_id.clone(),
                        elapsed_ms: start.elapsed().as_millis() as u64,
                        ..update(&id, pb::TaskState::Done)
                    },
                    Err(PullError::Cri(e)) => failed(&id, reason_of(e), e.to_string(), start),
                    Err(PullError::Disk(why)) => {
                        failed(&id, pb::FailureReason::DiskPressure, why.clone(), start)
                    }
                };
                let _ = this.updates.send(u);
            }
        });
    }

    async fn pull_once(
        &self,
        reference: &Reference,
        p: &pb::PullTask,
    ) -> Result<String, PullError> {
        let _permit = self
            .pulls
            .acquire()
            .await
            .expect("semaphore is never closed");
        let key = reference.to_string();
        // An image that was here before Berth pulled it is not Berth's to remove.
        if let Some(present) = self.rt.image_status(reference).await?
            && (p.pin.is_empty() || present.repo_digests.contains(&p.pin))
        {
            return Ok(present.id);
        }
        self.disk
            .check(&key, p.expected_size_bytes)
            .map_err(PullError::Disk)?;
        let auth = p.credentials.as_ref().map(|c| RegistryAuth {
            username: c.username.clone(),
            password: c.password.clone(),
        });
        let timeout = match p.timeout_seconds {
            0 => DEFAULT_PULL_TIMEOUT,
            s => Duration::from_secs(s.into()),
        };
        let span = tracing::info_span!("pull", image = %key);
        let _enter = span.enter();
        info!(?timeout, "pulling");
        let started = Instant::now();
        let id = tokio::time::timeout(timeout, self.rt.pull(reference, auth.as_ref()))
            .await
            .map_err(|_| CriError::PullTimeout {
                reference: key.clone(),
                timeout,
            })??;
        info!(elapsed = ?started.elapsed(), id = %id, "pulled");
        self.managed.update(|m| {
            m.insert(key);
        });
        Ok(id)
    }

    async fn remove(&self, task_id: String, r: pb::RemoveTask) {
        let start = Instant::now();
        let send = |u| {
            let _ = self.updates.send(u);
        };
        let _ = self.updates.send(update(&task_id, pb::TaskState::Accepted));
        let reference = match Reference::parse(&r.image) {
            Ok(r) => r,
            Err(e) => {
                return send(failed(
                    &task_id,
                    pb::FailureReason::BadReference,
                    e.to_string(),
                    start,
                ));
            }
        };
        let key = reference.to_string();
        if !self.managed.contains(&key) {
            return send(failed(
                &task_id,
                pb::FailureReason::NotManaged,
                format!("{key} was not pulled by Berth on this node; leaving it"),
                start,
            ));
        }
        let outcome = async {
            let Some(image) = self.rt.image_status(&reference).await? else {
                return Ok(true);
            };
            if self.rt.images_in_use().await?.contains(&image.id) {
                return Ok(false);
            }
            self.rt.remove(&image.id).await?;
            Ok::<_, CriError>(true)
        }
        .await;
        match outcome {
            Ok(true) => {
                self.managed.update(|m| {
                    m.remove(&key);
                });
                info!(image = %key, "removed");
                send(pb::TaskUpdate {
                    elapsed_ms: start.elapsed().as_millis() as u64,
                    ..update(&task_id, pb::TaskState::Done)
                });
            }
            Ok(false) => send(failed(
                &task_id,
                pb::FailureReason::InUse,
                format!("a container on this node uses {key}; not removed"),
                start,
            )),
            Err(e) => send(failed(&task_id, reason_of(&e), e.to_string(), start)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::MemRuntime;

    fn pull_task(id: &str, image: &str) -> pb::Task {
        pb::Task {
            id: id.into(),
            kind: Some(pb::task::Kind::Pull(pb::PullTask {
                image: image.into(),
                ..Default::default()
            })),
        }
    }

    fn remove_task(id: &str, image: &str) -> pb::Task {
        pb::Task {
            id: id.into(),
            kind: Some(pb::task::Kind::Remove(pb::RemoveTask {
                image: image.into(),
            })),
        }
    }

    async fn finished(rx: &mut mpsc::UnboundedReceiver<pb::TaskUpdate>) -> pb::TaskUpdate {
        loop {
            let u = rx.recv().await.unwrap();
            if u.state != pb::TaskState::Accepted as i32 {
                return u;
            }
        }
    }

    #[tokio::test]
    async fn a_resent_pull_joins_the_running_one_instead_of_pulling_twice() {
        let rt = Arc::new(MemRuntime::default());
        rt.publish("r.io/a:1", 1);
        let (runner, mut rx) = TaskRunner::new(rt.clone(), 1, Managed::load(None));
        runner.submit(pull_task("t1", "r.io/a:1"));
        runner.submit(pull_task("t2", "r.io/a:1"));
        let mut done = vec![
            finished(&mut rx).await.task_id,
            finished(&mut rx).await.task_id,
        ];
        done.sort();
        assert_eq!(done, ["t1", "t2"]);
        assert_eq!(rt.pulls(), 1);
        assert!(runner.managed().contains("r.io/a:1"));
    }

    #[tokio::test]
    async fn an_image_present_before_berth_is_not_managed_and_not_removed() {
        let rt = Arc::new(MemRuntime::default());
        rt.publish("r.io/a:1", 1);
        rt.pull(&Reference::parse("r.io/a:1").unwrap(), None)
            .await
            .unwrap();
        let (runner, mut rx) = TaskRunner::new(rt.clone(), 1, Managed::load(None));
        runner.submit(pull_task("t1", "r.io/a:1"));
        assert_eq!(finished(&mut rx).await.state, pb::TaskState::Done as i32);
        assert!(!runner.managed().contains("r.io/a:1"));
        runner.submit(remove_task("t2", "r.io/a:1"));
        let u = finished(&mut rx).await;
        assert_eq!(u.reason, pb::FailureReason::NotManaged as i32);
        assert_eq!(rt.list_images().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn an_image_a_container_uses_is_never_removed() {
        let rt = Arc::new(MemRuntime::default());
        let id = rt.publish("r.io/a:1", 1);
        let (runner, mut rx) = TaskRunner::new(rt.clone(), 1, Managed::load(None));
        runner.submit(pull_task("t1", "r.io/a:1"));
        finished(&mut rx).await;
        rt.set_in_use(&id);
        runner.submit(remove_task("t2", "r.io/a:1"));
        assert_eq!(
            finished(&mut rx).await.reason,
            pb::FailureReason::InUse as i32
        );
        assert_eq!(rt.list_images().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn pull_failures_carry_their_reason_and_managed_images_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let rt = Arc::new(MemRuntime::default());
        rt.publish("r.io/a:1", 1);
        let (runner, mut rx) =
            TaskRunner::new(rt.clone(), 2, Managed::load(Some(dir.path().into())));
        runner.submit(pull_task("t1", "r.io/missing:1"));
        assert_eq!(
            finished(&mut rx).await.reason,
            pb::FailureReason::ImageNotFound as i32
        );
        runner.submit(pull_task("t2", "r.io/a:1"));
        finished(&mut rx).await;
        let reloaded = Managed::load(Some(dir.path().into()));
        assert!(reloaded.contains("r.io/a:1"));
        runner.submit(remove_task("t3", "r.io/a:1"));
        assert_eq!(finished(&mut rx).await.state, pb::TaskState::Done as i32);
        assert!(!Managed::load(Some(dir.path().into())).contains("r.io/a:1"));
    }
}
