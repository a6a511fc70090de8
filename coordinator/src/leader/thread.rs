//! The Lease kept on an OS thread of its own, so a busy main runtime cannot
//! make the leader miss its renewals.
//!
//! During an agent connect storm the main runtime's workers spend seconds at
//! a time in TLS handshakes and planning passes; a renewal waiting behind
//! them can miss [`RENEW_DEADLINE`](super::RENEW_DEADLINE), and then the
//! leader steps down (and exits) although nothing was wrong. [`Election`]
//! runs the [`Elector`] — and the Lease store with its apiserver client,
//! built on that thread so its connections are driven there too — on a
//! current-thread runtime that does nothing else. The OS schedules that
//! thread beside the workers, so it renews on time as long as the process
//! gets any CPU at all.
//!
//! The semantics are [`Elector`]'s: [`Election::acquired`] resolves once this
//! replica holds the Lease, [`Election::lost`] once it no longer does (the
//! caller must stop acting at once), and [`Election::release`] gives the
//! Lease up (after a loss it changes nothing, as [`Elector::release`]).

use std::thread::JoinHandle;

use tokio::sync::oneshot;
use tracing::error;

use super::{Elector, LeaseError, LeaseStore, Lost};

/// A candidate for the Lease running on its own thread; see the module
/// documentation. Dropping it stops the election without releasing.
pub struct Election {
    acquired: Option<oneshot::Receiver<()>>,
    lost: Option<oneshot::Receiver<Lost>>,
    release: Option<oneshot::Sender<oneshot::Sender<Result<(), LeaseError>>>>,
    thread: Option<JoinHandle<()>>,
}

/// Why the election thread can no longer say anything.
#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    /// The Lease store could not be built (e.g. no apiserver config).
    #[error("cannot start leader election: {0}")]
    Store(#[source] LeaseError),
    /// The thread ended before answering (it panicked, or could not start).
    #[error("the leader election thread stopped")]
    Stopped,
}

impl Election {
    /// Starts candidate `me` on a thread named `berth-lease`; `store` builds
    /// the Lease store there, inside the thread's runtime (an apiserver
    /// client must be built on the runtime that drives it).
    pub fn spawn<S, F>(store: F, me: impl Into<String>) -> Result<Self, ElectionError>
    where
        S: LeaseStore + 'static,
        F: FnOnce() -> Result<S, LeaseError> + Send + 'static,
    {
        let me = me.into();
        let (acquired_tx, acquired) = oneshot::channel();
        let (lost_tx, lost) = oneshot::channel();
        let (release, release_rx) = oneshot::channel();
        let (built_tx, built) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("berth-lease".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        error!(error = %e, "cannot start the leader election runtime");
                        return;
                    }
                };
                runtime.block_on(async move {
                    let store = match store() {
                        Ok(s) => {
                            let _ = built_tx.send(Ok(()));
                            s
                        }
                        Err(e) => {
                            let _ = built_tx.send(Err(e));
                            return;
                        }
                    };
                    elect(Elector::new(store, me), acquired_tx, lost_tx, release_rx).await;
                });
            })
            .map_err(|_| ElectionError::Stopped)?;
        match built.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(ElectionError::Store(e)),
            Err(_) => return Err(ElectionError::Stopped),
        }
        Ok(Election {
            acquired: Some(acquired),
            lost: Some(lost),
            release: Some(release),
            thread: Some(thread),
        })
    }

    /// Resolves once this replica holds the Lease (waits forever as a
    /// standby); an error if the election thread stopped.
    pub async fn acquired(&mut self) -> Result<(), ElectionError> {
        let Some(rx) = self.acquired.as_mut() else {
            return Ok(());
        };
        rx.await.map_err(|_| ElectionError::Stopped)?;
        self.acquired = None;
        Ok(())
    }

    /// Resolves once this replica, having held the Lease, no longer does;
    /// the caller must stop acting at once. A stopped election thread counts
    /// as a loss: nobody renews any more.
    pub async fn lost(&mut self) -> Lost {
        let Some(rx) = self.lost.as_mut() else {
            return Lost::NotRenewed;
        };
        let lost = rx.await.unwrap_or(Lost::NotRenewed);
        self.lost = None;
        lost
    }

    /// Gives up the Lease, if this replica holds it, and stops the thread.
    pub async fn release(&mut self) -> Result<(), LeaseError> {
        let Some(tx) = self.release.take() else {
            return Ok(());
        };
        let (reply, answer) = oneshot::channel();
        if tx.send(reply).is_err() {
            return Ok(());
        }
        answer.await.unwrap_or(Ok(()))
    }
}

impl Drop for Election {
    fn drop(&mut self) {
        // Closing the release channel ends the thread's loop; it is not
        // joined, so a hung apiserver call cannot hold up the exit.
        self.release.take();
        self.thread.take();
    }
}

/// The thread's whole life: stand by, lead, report the loss, release when
/// asked (or stop when the [`Election`] is dropped).
async fn elect<S: LeaseStore>(
    mut elector: Elector<S>,
    acquired: oneshot::Sender<()>,
    lost: oneshot::Sender<Lost>,
    mut release: oneshot::Receiver<oneshot::Sender<Result<(), LeaseError>>>,
) {
    tokio::select! {
        () = elector.acquire() => {}
        asked = &mut release => {
            // Released as a standby: nothing to give up.
            if let Ok(reply) = asked {
                let _ = reply.send(Ok(()));
            }
            return;
        }
    }
    let _ = acquired.send(());
    tokio::select! {
        gone = elector.keep() => {
            let _ = lost.send(gone);
        }
        asked = &mut release => {
            if let Ok(reply) = asked {
                let _ = reply.send(elector.release().await);
            }
            return;
        }
    }
    // Lost: the caller still asks for a release on its way out, which is
    // safe (it is based on the version this replica last wrote).
    if let Ok(reply) = release.await {
        let _ = reply.send(elector.release().await);
    }
}
