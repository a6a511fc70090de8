//! Reading one container's log for one `LogRequest`: [`serve`] finds the
//! container, opens its log file (waiting for it while the container is
//! being created), skips to the last `tail` lines, sends the selected
//! records in file order and, when asked to follow, keeps going until the
//! container has exited and the file is drained.
//!
//! Following: at the end of the file the reader sends what it has gathered,
//! then waits on a [`Waiter`] (inotify on the file's directory, with a
//! fallback tick). At most every [`EXIT_CHECK_EVERY`] it asks the runtime
//! whether the container has finished; once it has, the file is read once
//! more to its end and the stream ends.
//!
//! Log rotation: the kubelet renames `N.log` to `N.log.<timestamp>` and has
//! the runtime reopen `N.log`, a new file. At the end of the file the reader
//! checks whether the path now names another file; if so it reads the old
//! one to its end (it still holds it open) and carries on at the start of the
//! new one. A record the runtime left half-written in the old file is lost,
//! and a rotation between the lookup and the first open is not noticed (the
//! new file is simply read).

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use berth_proto::agent as pb;
use tokio::fs::File;
use tokio::io::{AsyncBufReadExt, AsyncSeekExt, BufReader};
use tracing::{debug, info, warn};

use super::LogError;
use super::batch::Batcher;
use super::parse::{Record, Stream, parse_record};
use super::watch::Waiter;
use crate::runtime::{ContainerLog, ContainerLookup, ContainerState};

/// How often a follower at the end of the file asks whether the container
/// has exited.
pub const EXIT_CHECK_EVERY: Duration = Duration::from_millis(500);
/// How long a running container's log file may be missing (a rotation
/// caught between the rename and the reopen) before that is an error.
const MISSING_GRACE: Duration = Duration::from_secs(2);

/// Which records a request selects.
#[derive(Debug, Clone, Copy)]
pub struct Filter {
    stdout: bool,
    stderr: bool,
    since: i64,
    until: i64,
}

impl Filter {
    /// The selection of `req`: its streams and its time bounds (0: none).
    pub fn of(req: &pb::LogRequest) -> Self {
        Filter {
            stdout: req.stdout,
            stderr: req.stderr,
            since: req.since_unix_nanos,
            until: req.until_unix_nanos,
        }
    }

    /// Whether `r` is selected.
    pub fn accepts(&self, r: &Record<'_>) -> bool {
        let stream = match r.stream {
            Stream::Stdout => self.stdout,
            Stream::Stderr => self.stderr,
        };
        stream
            && (self.since == 0 || r.time_unix_nanos >= self.since)
            && (self.until == 0 || r.time_unix_nanos < self.until)
    }

    /// Whether no record written from now on can be selected.
    fn past_until(&self) -> bool {
        self.until != 0 && now_unix_nanos() >= self.until
    }
}

fn now_unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Numbers the lines that records belong to, in the order the lines start:
/// a line is a run of `P` records ended by an `F` record of the same stream
/// (or by the end of the file). The numbers are the same on every read of
/// the same bytes, which is how `tail` skips lines on a second pass.
#[derive(Debug, Default)]
struct Lines {
    open: [Option<u64>; 2],
    started: u64,
}

impl Lines {
    fn line_of(&mut self, r: &Record<'_>) -> u64 {
        let slot = &mut self.open[r.stream as usize];
        let line = *slot.get_or_insert_with(|| {
            self.started += 1;
            self.started - 1
        });
        if r.full {
            *slot = None;
        }
        line
    }
}

/// A log file read record by record; a record not yet ended by its newline
/// is kept back until the runtime writes the rest.
struct LogFile {
    reader: BufReader<File>,
    partial: Vec<u8>,
    /// (device, inode) of the open file, to notice a rotation.
    identity: (u64, u64),
}

impl LogFile {
    async fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path).await?;
        let meta = file.metadata().await?;
        Ok(LogFile {
            reader: BufReader::with_capacity(64 * 1024, file),
            partial: Vec::new(),
            identity: (meta.dev(), meta.ino()),
        })
    }

    /// The next whole record (without its newline); `None` at the end of
    /// what has been written so far.
    async fn next_line(&mut self) -> io::Result<Option<Vec<u8>>> {
        self.reader.read_until(b'\n', &mut self.partial).await?;
        if self.partial.last() != Some(&b'\n') {
            return Ok(None);
        }
        let mut line = std::mem::take(&mut self.partial);
        line.pop();
        Ok(Some(line))
    }

    async fn rewind(&mut self) -> io::Result<()> {
        self.partial.clear();
        self.reader.seek(io::SeekFrom::Start(0)).await?;
        Ok(())
    }

    /// Whether `path` now names another file than the one open.
    async fn replaced_at(&self, path: &Path) -> bool {
        tokio::fs::metadata(path)
            .await
            .is_ok_and(|m| (m.dev(), m.ino()) != self.identity)
    }
}

/// Answers `req`: sends its records through `out` (without the final
/// message, which the caller sends with the outcome).
pub async fn serve<L: ContainerLookup>(
    lookup: &L,
    req: &pb::LogRequest,
    out: &mut Batcher,
) -> Result<(), LogError> {
    let pod_uid = req.pod_uid.clone();
    let container_name = req.container_name.clone();
    if !req.stdout && !req.stderr {
        return Err(LogError::NoStream {
            pod_uid,
            container: container_name,
        });
    }
    let container = lookup
        .find_container(&req.pod_uid, &req.container_name)
        .await
        .map_err(|source| LogError::Lookup {
            pod_uid: pod_uid.clone(),
            container: container_name.clone(),
            source,
        })?
        .ok_or_else(|| LogError::NotFound {
            pod_uid: pod_uid.clone(),
            container: container_name.clone(),
        })?;
    if container.log_path.as_os_str().is_empty() {
        return Err(LogError::NoLogPath {
            pod_uid,
            container: container_name,
            id: container.id,
        });
    }
    debug!(container_id = %container.id, path = %container.log_path.display(), state = ?container.state, "reading log");
    let mut follower = Follower::new(lookup, req, &container);
    let unreadable = |source: io::Error| LogError::Unreadable {
        pod_uid: pod_uid.clone(),
        container: container_name.clone(),
        path: container.log_path.clone(),
        source,
    };
    let Some(mut file) = follower.open(container.state).await.map_err(unreadable)? else {
        return Ok(());
    };
    let filter = Filter::of(req);
    let skip = match u64::try_from(req.tail) {
        Ok(tail) => count_lines(&mut file, &filter)
            .await
            .map_err(unreadable)?
            .saturating_sub(tail),
        Err(_) => 0,
    };

    let mut lines = Lines::default();
    let mut malformed = 0u64;
    let mut exited = false;
    let mut rotated = false;
    loop {
        while let Some(line) = file.next_line().await.map_err(unreadable)? {
            match parse_record(&line) {
                Ok(r) if filter.accepts(&r) && lines.line_of(&r) >= skip => {
                    out.push(r.entry()).await?;
                }
                Ok(_) => {}
                Err(e) => {
                    malformed += 1;
                    if malformed == 1 {
                        warn!(error = %e, line = %String::from_utf8_lossy(&line[..line.len().min(120)]), "skipping a malformed log line");
                    }
                }
            }
        }
        out.flush().await?;
        if !req.follow || exited || filter.past_until() {
            break;
        }
        if rotated {
            match LogFile::open(&container.log_path).await {
                Ok(new) => {
                    info!(path = %container.log_path.display(), "log file rotated; reading the new one");
                    file = new;
                    rotated = false;
                    continue;
                }
                Err(e) => debug!(error = %e, "the rotated log file's successor is not there yet"),
            }
        } else if file.replaced_at(&container.log_path).await {
            // Read what the runtime wrote to the old file before it
            // switched, then go on with the new one.
            rotated = true;
            continue;
        }
        if follower.finished().await {
            // Written between our last read and the exit: read once more.
            exited = true;
            continue;
        }
        follower.waiter.wait().await;
    }
    if malformed > 1 {
        warn!(malformed, "skipped malformed log lines");
    }
    Ok(())
}

/// How many selected lines the file holds now; leaves it at its start.
async fn count_lines(file: &mut LogFile, filter: &Filter) -> io::Result<u64> {
    let mut lines = Lines::default();
    while let Some(line) = file.next_line().await? {
        if let Ok(r) = parse_record(&line)
            && filter.accepts(&r)
        {
            lines.line_of(&r);
        }
    }
    file.rewind().await?;
    Ok(lines.started)
}

/// What a follower needs between reads: the container's state and a way to
/// wait for its file.
struct Follower<'a, L> {
    lookup: &'a L,
    follow: bool,
    id: &'a str,
    path: &'a Path,
    waiter: Waiter,
    last_check: Option<Instant>,
}

impl<'a, L: ContainerLookup> Follower<'a, L> {
    fn new(lookup: &'a L, req: &pb::LogRequest, container: &'a ContainerLog) -> Self {
        let dir = container
            .log_path
            .parent()
            .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
        Follower {
            lookup,
            follow: req.follow,
            id: &container.id,
            path: &container.log_path,
            waiter: Waiter::new(dir),
            last_check: None,
        }
    }

    /// The container's state now; a runtime that does not answer says
    /// [`ContainerState::Unknown`] (the log may well go on meanwhile).
    async fn state(&self) -> ContainerState {
        match self.lookup.container_state(self.id).await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot read the container's state; following on");
                ContainerState::Unknown
            }
        }
    }

    /// Whether the container has exited, asking the runtime at most every
    /// [`EXIT_CHECK_EVERY`] (and always the first time).
    async fn finished(&mut self) -> bool {
        if self
            .last_check
            .is_some_and(|t| t.elapsed() < EXIT_CHECK_EVERY)
        {
            return false;
        }
        self.last_check = Some(Instant::now());
        self.state().await.is_finished()
    }

    /// Opens the log file. A container still being created may have none
    /// yet: without `follow` that is an empty log (`None`); with it, the
    /// file is waited for. A running container's file may be missing for a
    /// moment during a rotation; after [`MISSING_GRACE`], or at once for a
    /// container that has exited, a missing file is an error.
    async fn open(&mut self, mut state: ContainerState) -> io::Result<Option<LogFile>> {
        let mut missing_since = Instant::now();
        loop {
            match LogFile::open(self.path).await {
                Ok(f) => return Ok(Some(f)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if state == ContainerState::Created {
                        if !self.follow {
                            return Ok(None);
                        }
                        missing_since = Instant::now();
                    } else if state.is_finished() || missing_since.elapsed() >= MISSING_GRACE {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
            self.waiter.wait().await;
            state = self.state().await;
        }
    }
}
