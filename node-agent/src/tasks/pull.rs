//! The pull task: bounded concurrency, one pull per image however many tasks
//! ask for it, the disk guard before the runtime is asked, the task's deadline
//! (or [`berth_proto::DEFAULT_PULL_TIMEOUT`]) around the runtime's pull.
//!
//! An image that was on the node before Berth pulled it does not become
//! managed: it is not Berth's to remove.

use std::time::{Duration, Instant};

use berth_proto::DEFAULT_PULL_TIMEOUT;
use berth_proto::agent as pb;
use berth_proto::reference::Reference;
use tracing::{Instrument, Span, info};

use super::{TaskRunner, failed, reason_of, update};
use crate::cri::CriError;
use crate::runtime::{ImageRuntime, RegistryAuth};

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

impl<R: ImageRuntime> TaskRunner<R> {
    /// Registers the task with the pull of its image, starting that pull (in
    /// `span`) unless one is already running.
    pub(super) fn pull(&self, task_id: String, p: pb::PullTask, span: Span) {
        let start = Instant::now();
        let reference = match Reference::parse(&p.image) {
            Ok(r) => r,
            Err(e) => {
                span.in_scope(|| info!(error = %e, "refused"));
                self.send(failed(
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
            self.send(update(&task_id, pb::TaskState::Accepted));
            if let Some(waiting) = inflight.get_mut(&key) {
                span.in_scope(|| info!("joining the pull already running"));
                waiting.push(task_id);
                return;
            }
            inflight.insert(key.clone(), vec![task_id.clone()]);
        }
        let this = self.clone();
        let run = async move {
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
                this.send(u);
            }
        };
        tokio::spawn(run.instrument(span));
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
            info!(id = %present.id, "already present");
            return Ok(present.id);
        }
        if let Err(why) = self.disk.check(&key, p.expected_size_bytes) {
            info!(reason = %why, "refused");
            return Err(PullError::Disk(why));
        }
        let auth = p.credentials.as_ref().map(|c| RegistryAuth {
            username: c.username.clone(),
            password: c.password.clone(),
        });
        let timeout = match p.timeout_seconds {
            0 => DEFAULT_PULL_TIMEOUT,
            s => Duration::from_secs(s.into()),
        };
        info!(?timeout, "pulling");
        let started = Instant::now();
        let pulled = tokio::time::timeout(timeout, self.rt.pull(reference, auth.as_ref()))
            .await
            .map_err(|_| CriError::PullTimeout {
                reference: key.clone(),
                timeout,
            })
            .and_then(|r| r);
        let id = match pulled {
            Ok(id) => id,
            Err(e) => {
                info!(error = %e, "pull failed");
                return Err(e.into());
            }
        };
        info!(elapsed = ?started.elapsed(), id = %id, "pulled");
        self.managed.update(|m| {
            m.insert(key);
        });
        Ok(id)
    }
}
