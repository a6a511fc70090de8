//! Containers recorded from their very start. A container already running
//! when profiling begins has read its startup files (configuration, Python
//! modules, …) before any mark could see them; one that starts later has a
//! new root filesystem, mounted only just before its first process runs.
//!
//! [`StartWatcher`] watches the runtime's task directory (in the runtime's
//! mount namespace, reached through `/proc/<shim>/root`) with inotify. For
//! each new task it waits, polling every half millisecond, for the root
//! filesystem to be mounted at `<task>/rootfs`, and marks it at once: the
//! runtime still has the whole OCI runtime setup (namespaces, mounts,
//! pivot_root) to do before the entrypoint is exec'd, so the mark comes
//! first. Tasks of other images (and pod sandboxes) are dropped by the
//! caller, which knows from CRI which container each task is.

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use super::profile::Recording;

/// How long a new task's root filesystem is waited for.
const MOUNT_WAIT: Duration = Duration::from_secs(10);

type Found = Arc<Mutex<Vec<(String, Recording)>>>;

/// Records every container the runtime starts from now on.
pub struct StartWatcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    found: Found,
}

/// The parent PID of `pid`.
fn ppid(pid: u32) -> anyhow::Result<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // pid (comm) state ppid …; comm may hold spaces and parentheses.
    let after = stat.rsplit_once(')').context("/proc/<pid>/stat")?.1;
    after
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .context("/proc/<pid>/stat has no ppid")
}

impl StartWatcher {
    /// Watches the task directory of the runtime that runs the container
    /// whose first process is `pid` (its parent is the runtime's shim, whose
    /// working directory is the pod's task directory).
    pub fn start(pid: u32) -> anyhow::Result<StartWatcher> {
        let shim = ppid(pid)?;
        let bundle = std::fs::read_link(format!("/proc/{shim}/cwd"))
            .with_context(|| format!("the working directory of the runtime shim {shim}"))?;
        let tasks = bundle
            .parent()
            .context("the shim's directory has no parent")?
            .to_path_buf();
        let through_shim = PathBuf::from(format!("/proc/{shim}/root{}", tasks.display()));
        // Held open, the directory stays reachable (as /proc/self/fd/N)
        // after this shim exits, as it does when its pod is restarted.
        let dir = std::fs::File::open(&through_shim)
            .with_context(|| format!("opening {}", through_shim.display()))?;
        let here = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)?;
        inotify
            .add_watch(&here, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
            .with_context(|| format!("watching {}", through_shim.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let found: Found = Arc::default();
        let thread = {
            let (stop, found) = (stop.clone(), found.clone());
            std::thread::Builder::new()
                .name("task-watch".into())
                .spawn(move || {
                    watch(inotify, &here, &tasks, &stop, &found);
                    drop(dir);
                })?
        };
        Ok(StartWatcher {
            stop,
            thread: Some(thread),
            found,
        })
    }

    /// The recordings of tasks that started since the last call, by task
    /// (container) ID.
    pub fn take(&self) -> Vec<(String, Recording)> {
        std::mem::take(&mut *self.found.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Drop for StartWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn watch(inotify: Inotify, here: &Path, tasks: &Path, stop: &Arc<AtomicBool>, found: &Found) {
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::from(100u16)).unwrap_or(0) == 0 {
            continue;
        }
        let Ok(events) = inotify.read_events() else {
            continue;
        };
        for e in events {
            let Some(name) = e.name.and_then(|n| n.into_string().ok()) else {
                continue;
            };
            let dir = here.join(&name);
            let seen_as = format!("{}/{name}/rootfs", tasks.display());
            let (stop, found) = (stop.clone(), found.clone());
            let _ = std::thread::Builder::new()
                .name("task-mount".into())
                .spawn(move || {
                    if let Some(r) = wait_and_mark(&dir, seen_as, &stop) {
                        found
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((name, r));
                    }
                });
        }
    }
}

/// Marks `<dir>/rootfs` as soon as a filesystem is mounted there.
fn wait_and_mark(dir: &Path, seen_as: String, stop: &AtomicBool) -> Option<Recording> {
    let rootfs = dir.join("rootfs");
    let deadline = Instant::now() + MOUNT_WAIT;
    while Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
        if let (Ok(d), Ok(r)) = (std::fs::metadata(dir), std::fs::metadata(&rootfs))
            && d.dev() != r.dev()
        {
            return Recording::start_at(&rootfs.to_string_lossy(), vec![seen_as, "/".into()]).ok();
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    None
}
