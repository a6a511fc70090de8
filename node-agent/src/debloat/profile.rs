//! Profiling: which paths the containers of an image open, as seen inside
//! their root filesystems, recorded with fanotify while they run. Nothing is
//! restarted and nothing in the container changes.
//!
//! Each container gets its own fanotify group with a filesystem mark on the
//! superblock of its root (reached as `/proc/<pid>/root`, so it works from
//! any mount namespace, given the host's PID namespace): every open and exec
//! on the container's overlay, by any of its processes, `kubectl exec`
//! sessions included, is an event; opens of volumes (other superblocks) are
//! not. An event's file descriptor names the path as the container sees it.
//!
//! A container already running when its mark is placed has opened its
//! executable and libraries before; those are read from its processes'
//! `/proc/<pid>/{exe,maps,fd,cwd}` at the start. What it read and closed
//! before the mark is not seen: start profiling before the workload starts
//! (the coordinator restarts the pods it profiles) or name such files in the
//! keep-list.
//!
//! Needs CAP_SYS_ADMIN (fanotify filesystem marks) and the host's PID
//! namespace; this is why profiling runs in its own privileged container,
//! apart from the agent that pulls images.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::fanotify::{EventFFlags, Fanotify, InitFlags, MarkFlags, MaskFlags};

/// Why a container could not be profiled.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// fanotify refused (no CAP_SYS_ADMIN, or a kernel without it).
    #[error(
        "fanotify on the root of container process {pid}: {errno} (profiling needs CAP_SYS_ADMIN and the host's PID namespace)"
    )]
    Fanotify {
        /// The container's process.
        pid: u32,
        /// What the kernel said.
        errno: nix::Error,
    },
    /// The container's process is gone.
    #[error("container process {0} is gone")]
    Gone(u32),
}

/// The paths one container opened, recorded until [`Recording::stop`].
pub struct Recording {
    paths: Arc<Mutex<BTreeSet<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Recording {
    /// Starts recording the container whose first process is `pid` (in the
    /// PID namespace this process sees), seeded with what its processes
    /// already hold open or mapped.
    pub fn start(pid: u32) -> Result<Recording, ProfileError> {
        let root = format!("/proc/{pid}/root");
        // How this process sees the container's root: paths of events start
        // with it (`/` once the container has pivoted into its root).
        let prefix = std::fs::read_link(&root)
            .map_err(|_| ProfileError::Gone(pid))?
            .to_string_lossy()
            .into_owned();
        let seeded = seed(pid, &prefix);
        Recording::mark(&format!("{root}/"), vec![prefix], seeded, pid)
    }

    /// Starts recording the root filesystem mounted at `root` (a path this
    /// process can open) before anything in it runs. Event paths are taken
    /// relative to the first of `prefixes` they start with: the mount's path
    /// in the runtime's mount namespace (opens before the container pivots
    /// into it) and `/` (after).
    pub fn start_at(root: &str, prefixes: Vec<String>) -> Result<Recording, ProfileError> {
        Recording::mark(&format!("{root}/"), prefixes, BTreeSet::new(), 0)
    }

    fn mark(
        root: &str,
        prefixes: Vec<String>,
        seeded: BTreeSet<String>,
        pid: u32,
    ) -> Result<Recording, ProfileError> {
        let fan = Fanotify::init(
            InitFlags::FAN_CLASS_NOTIF | InitFlags::FAN_CLOEXEC | InitFlags::FAN_NONBLOCK,
            EventFFlags::O_RDONLY | EventFFlags::O_LARGEFILE | EventFFlags::O_CLOEXEC,
        )
        .map_err(|errno| ProfileError::Fanotify { pid, errno })?;
        fan.mark(
            MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_FILESYSTEM,
            MaskFlags::FAN_OPEN | MaskFlags::FAN_OPEN_EXEC | MaskFlags::FAN_ONDIR,
            nix::fcntl::AT_FDCWD,
            Some(root),
        )
        .map_err(|errno| match errno {
            nix::Error::ENOENT | nix::Error::ESRCH => ProfileError::Gone(pid),
            errno => ProfileError::Fanotify { pid, errno },
        })?;
        let paths = Arc::new(Mutex::new(seeded));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (paths, stop) = (paths.clone(), stop.clone());
            std::thread::Builder::new()
                .name("profile".into())
                .spawn(move || record(fan, &prefixes, &paths, &stop))
                .map_err(|_| ProfileError::Gone(pid))?
        };
        Ok(Recording {
            paths,
            stop,
            thread: Some(thread),
        })
    }

    /// The paths recorded so far.
    pub fn paths(&self) -> BTreeSet<String> {
        self.paths.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Ends the recording (after the events already queued are read) and
    /// returns every path.
    pub fn stop(mut self) -> BTreeSet<String> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.paths()
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn record(fan: Fanotify, prefixes: &[String], paths: &Mutex<BTreeSet<String>>, stop: &AtomicBool) {
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        let mut fds = [PollFd::new(fan.as_fd(), PollFlags::POLLIN)];
        let ready = poll(&mut fds, PollTimeout::from(100u16)).unwrap_or(0);
        if ready > 0 {
            match fan.read_events() {
                Ok(events) => {
                    let mut got = paths.lock().unwrap_or_else(|e| e.into_inner());
                    for e in events {
                        if let Some(fd) = e.fd() {
                            let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
                            if let Ok(p) = std::fs::read_link(link) {
                                let p = p.to_string_lossy();
                                if let Some(p) = prefixes.iter().find_map(|x| inside(x, &p)) {
                                    got.insert(p);
                                }
                            }
                        }
                    }
                }
                Err(nix::Error::EAGAIN) => {}
                Err(_) => return,
            }
            continue;
        }
        if stopping {
            return;
        }
    }
}

/// `path` (as this process sees it) relative to the container's root, if it
/// is inside it.
fn inside(prefix: &str, path: &str) -> Option<String> {
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    let rest = if prefix == "/" {
        path.strip_prefix('/')?
    } else {
        let rest = path.strip_prefix(prefix)?;
        if rest.is_empty() {
            ""
        } else {
            rest.strip_prefix('/')?
        }
    };
    Some(format!("/{rest}"))
}

/// What the container's processes hold already: executables, mapped files,
/// open files and working directories.
fn seed(pid: u32, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/mnt")) else {
        return out;
    };
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let name = p.file_name();
        let Some(other) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let dir = Path::new("/proc").join(other);
        if std::fs::read_link(dir.join("ns/mnt")).ok().as_ref() != Some(&ns) {
            continue;
        }
        let mut add = |p: &Path| {
            if let Some(p) = inside(prefix, &p.to_string_lossy()) {
                out.insert(p);
            }
        };
        for link in ["exe", "cwd"] {
            if let Ok(p) = std::fs::read_link(dir.join(link)) {
                add(&p);
            }
        }
        if let Ok(fds) = std::fs::read_dir(dir.join("fd")) {
            for fd in fds.flatten() {
                if let Ok(p) = std::fs::read_link(fd.path()) {
                    add(&p);
                }
            }
        }
        if let Ok(maps) = std::fs::read_to_string(dir.join("maps")) {
            for line in maps.lines() {
                // address perms offset dev inode path
                if let Some(path) = line.split_whitespace().nth(5)
                    && path.starts_with('/')
                {
                    let at = line.find(path).unwrap_or(0);
                    add(Path::new(&line[at..]));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::inside;

    #[test]
    fn paths_are_taken_relative_to_the_containers_root() {
        assert_eq!(
            inside("/", "/usr/bin/redis-server").as_deref(),
            Some("/usr/bin/redis-server")
        );
        assert_eq!(
            inside("/run/c/rootfs", "/run/c/rootfs/etc/passwd").as_deref(),
            Some("/etc/passwd")
        );
        assert_eq!(
            inside("/run/c/rootfs", "/run/c/rootfs").as_deref(),
            Some("/")
        );
        assert_eq!(
            inside("/run/c/rootfs", "/run/c/rootfsX/etc").as_deref(),
            None
        );
        assert_eq!(inside("/run/c/rootfs", "/etc/passwd").as_deref(), None);
        assert_eq!(inside("/", "/tmp/x (deleted)").as_deref(), Some("/tmp/x"));
        assert_eq!(inside("/", "socket:[123]").as_deref(), None);
    }
}
