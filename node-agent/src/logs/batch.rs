//! Packs log entries into `LogData` messages of at most [`MAX_BATCH_BYTES`]
//! and sends them, in order, on the session's outbound channel.
//!
//! An entry larger than a batch on its own (a runtime configured without a
//! line size limit) is cut into pieces; only the last piece carries the
//! line's newline, so the coordinator sees the same bytes, as partial lines.

use berth_proto::agent as pb;
use tokio::sync::mpsc;

/// The most bytes of entries (data plus an estimate of each entry's framing)
/// one `LogData` carries.
pub const MAX_BATCH_BYTES: usize = 64 * 1024;
/// What one entry costs beyond its data: time, stream, and field tags.
const ENTRY_OVERHEAD: usize = 24;

/// The session went away: nobody reads the stream any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionGone;

/// Batches of one stream on their way to the session.
#[derive(Debug)]
pub struct Batcher {
    stream_id: u64,
    out: mpsc::Sender<pb::AgentMessage>,
    entries: Vec<pb::LogEntry>,
    bytes: usize,
}

impl Batcher {
    /// A batcher for the stream `stream_id` sending on `out`.
    pub fn new(stream_id: u64, out: mpsc::Sender<pb::AgentMessage>) -> Self {
        Batcher {
            stream_id,
            out,
            entries: Vec::new(),
            bytes: 0,
        }
    }

    /// Adds an entry; sends the batch first if the entry would overflow it.
    pub async fn push(&mut self, mut entry: pb::LogEntry) -> Result<(), SessionGone> {
        const PIECE: usize = MAX_BATCH_BYTES - ENTRY_OVERHEAD;
        while entry.data.len() > PIECE {
            let rest = entry.data.split_off(PIECE);
            let piece = std::mem::replace(&mut entry.data, rest);
            self.push_one(pb::LogEntry {
                data: piece,
                ..entry.clone()
            })
            .await?;
        }
        self.push_one(entry).await
    }

    async fn push_one(&mut self, entry: pb::LogEntry) -> Result<(), SessionGone> {
        let size = entry.data.len() + ENTRY_OVERHEAD;
        if self.bytes + size > MAX_BATCH_BYTES {
            self.flush().await?;
        }
        self.bytes += size;
        self.entries.push(entry);
        Ok(())
    }

    /// Sends what has been gathered, if anything.
    pub async fn flush(&mut self) -> Result<(), SessionGone> {
        if self.entries.is_empty() {
            return Ok(());
        }
        let data = self.take(false, String::new());
        self.send(data).await
    }

    /// Sends the last message of the stream: what is left, `end`, and the
    /// error that ended it early (empty if none).
    pub async fn finish(mut self, error: String) -> Result<(), SessionGone> {
        let data = self.take(true, error);
        self.send(data).await
    }

    fn take(&mut self, end: bool, error: String) -> pb::LogData {
        self.bytes = 0;
        pb::LogData {
            stream_id: self.stream_id,
            entries: std::mem::take(&mut self.entries),
            end,
            error,
        }
    }

    async fn send(&self, data: pb::LogData) -> Result<(), SessionGone> {
        let msg = pb::AgentMessage {
            kind: Some(pb::agent_message::Kind::LogData(data)),
        };
        self.out.send(msg).await.map_err(|_| SessionGone)
    }
}
