//! Waiting for a log file to change, without busy polling.
//!
//! [`Waiter`] watches the directory of the log file with inotify (the
//! directory, not the file: the file may not exist yet, and log rotation
//! replaces it), and wakes at least every [`FALLBACK_TICK`] in case an event
//! was missed or inotify is not available (no watches left, a filesystem
//! without it, a directory that does not exist yet — the watch is tried
//! again at every wait).

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;
use tracing::debug;

/// The longest a follower sleeps without looking at the file again.
pub const FALLBACK_TICK: Duration = Duration::from_millis(250);

/// Why [`Waiter::wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Something in the directory changed.
    Changed,
    /// [`FALLBACK_TICK`] passed without an event.
    Tick,
}

/// nix's `Inotify` as tokio's `AsyncFd` wants it.
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Wakes a follower when the log file's directory changes.
pub struct Waiter {
    dir: PathBuf,
    inotify: Option<AsyncFd<InotifyFd>>,
}

impl Waiter {
    /// A waiter for files in `dir`; the watch is set up on the first wait.
    pub fn new(dir: PathBuf) -> Self {
        Waiter { dir, inotify: None }
    }

    /// Waits for a change in the directory, or at most [`FALLBACK_TICK`].
    pub async fn wait(&mut self) -> Wake {
        if self.inotify.is_none() {
            self.inotify = self.watch();
        }
        let Some(fd) = &self.inotify else {
            tokio::time::sleep(FALLBACK_TICK).await;
            return Wake::Tick;
        };
        let changed = async {
            loop {
                let Ok(mut guard) = fd.readable().await else {
                    return false;
                };
                match guard.try_io(|i| i.get_ref().0.read_events().map_err(io::Error::from)) {
                    Ok(Ok(_)) => return true,
                    Ok(Err(_)) => return false,
                    Err(_would_block) => continue,
                }
            }
        };
        tokio::select! {
            ok = changed => {
                if ok {
                    Wake::Changed
                } else {
                    // A broken watch: back to the timer, and a new watch next time.
                    self.inotify = None;
                    Wake::Tick
                }
            }
            _ = tokio::time::sleep(FALLBACK_TICK) => Wake::Tick,
        }
    }

    fn watch(&self) -> Option<AsyncFd<InotifyFd>> {
        let setup = || -> io::Result<AsyncFd<InotifyFd>> {
            let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
            inotify.add_watch(
                &self.dir,
                AddWatchFlags::IN_MODIFY
                    | AddWatchFlags::IN_CREATE
                    | AddWatchFlags::IN_MOVED_TO
                    | AddWatchFlags::IN_MOVED_FROM
                    | AddWatchFlags::IN_CLOSE_WRITE
                    | AddWatchFlags::IN_DELETE,
            )?;
            // tokio deprecates the safe constructor because an arbitrary
            // `AsRawFd` might close its fd while registered; `InotifyFd`
            // owns its fd and closes it only when dropped, after `AsyncFd`
            // deregisters it, so the safe call is sound here (and the
            // crate forbids `unsafe`, which `AsyncFd::register` is).
            #[allow(deprecated)]
            AsyncFd::new(InotifyFd(inotify))
        };
        match setup() {
            Ok(fd) => Some(fd),
            Err(e) => {
                debug!(dir = %self.dir.display(), error = %e, "no inotify watch; looking every {FALLBACK_TICK:?}");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_new_file_in_the_directory_wakes_the_waiter() {
        let dir = tempfile::tempdir().unwrap();
        let mut waiter = Waiter::new(dir.path().to_path_buf());
        // The first wait sets the watch up; nothing happens meanwhile.
        assert_eq!(waiter.wait().await, Wake::Tick);
        if waiter.inotify.is_none() {
            crate::testing::missing_prerequisite("inotify is not available here");
            return;
        }
        std::fs::write(dir.path().join("0.log"), b"x").unwrap();
        // The event is queued before this wait starts: no tick can win.
        assert_eq!(waiter.wait().await, Wake::Changed);
    }
}
