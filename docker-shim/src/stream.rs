//! Container output as Docker writes it to clients. Without a TTY, each
//! piece is a frame: one byte for the stream (1 stdout, 2 stderr), three zero
//! bytes, the payload length as a big-endian u32, the payload. With a TTY the
//! bytes go out raw. With `timestamps`, each line starts with its RFC 3339
//! time (nine fractional digits) and a space.

use berth_proto::agent::LogStream;
use berth_proto::api::LogChunk;
use bytes::{BufMut, Bytes, BytesMut};

use crate::route::ApiVersion;

/// Content type of a multiplexed stream (API 1.42 and later).
pub const MULTIPLEXED: &str = "application/vnd.docker.multiplexed-stream";
/// Content type of a raw stream (TTY, or any stream before API 1.42).
pub const RAW: &str = "application/vnd.docker.raw-stream";

/// The content type Docker uses for a container's output.
pub fn content_type(tty: bool, version: ApiVersion) -> &'static str {
    if tty || version.minor < 42 {
        RAW
    } else {
        MULTIPLEXED
    }
}

/// One multiplexed frame: the 8-byte header, then `payload`.
pub fn frame(stream: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(8 + payload.len());
    out.put_u8(stream);
    out.put_bytes(0, 3);
    out.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    out.put_slice(payload);
    out.freeze()
}

/// Turns log chunks into the bytes a client reads.
#[derive(Debug)]
pub struct LogEncoder {
    tty: bool,
    timestamps: bool,
    /// Whether the next byte of stdout / stderr starts a line.
    at_line_start: [bool; 2],
}

impl LogEncoder {
    /// An encoder for a container with (or without) a TTY.
    pub fn new(tty: bool, timestamps: bool) -> Self {
        LogEncoder {
            tty,
            timestamps,
            at_line_start: [true, true],
        }
    }

    /// The bytes for one chunk (empty for an empty chunk).
    pub fn encode(&mut self, chunk: &LogChunk) -> Bytes {
        if chunk.data.is_empty() {
            return Bytes::new();
        }
        let stream: u8 = if chunk.stream == LogStream::Stderr as i32 {
            2
        } else {
            1
        };
        let payload = if self.timestamps {
            self.stamp(stream, chunk)
        } else {
            chunk.data.clone()
        };
        if self.tty {
            Bytes::from(payload)
        } else {
            frame(stream, &payload)
        }
    }

    fn stamp(&mut self, stream: u8, chunk: &LogChunk) -> Vec<u8> {
        let stamp = crate::docker::time::fixed_nanos(chunk.time_unix_nanos);
        let start = &mut self.at_line_start[usize::from(stream - 1)];
        let mut out = Vec::with_capacity(chunk.data.len() + 32);
        for piece in chunk.data.split_inclusive(|b| *b == b'\n') {
            if *start {
                out.extend_from_slice(stamp.as_bytes());
                out.push(b' ');
            }
            out.extend_from_slice(piece);
            *start = piece.ends_with(b"\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(stream: LogStream, data: &str, nanos: i64) -> LogChunk {
        LogChunk {
            stream: stream as i32,
            data: data.as_bytes().to_vec(),
            time_unix_nanos: nanos,
        }
    }

    #[test]
    fn frames_carry_the_stream_and_a_big_endian_length() {
        let f = frame(2, b"err\n");
        assert_eq!(&f[..], &[2, 0, 0, 0, 0, 0, 0, 4, b'e', b'r', b'r', b'\n']);
        let big = frame(1, &[b'x'; 300]);
        assert_eq!(&big[..8], &[1, 0, 0, 0, 0, 0, 1, 44]);
    }

    #[test]
    fn stdout_and_stderr_stay_apart_without_a_tty() {
        let mut enc = LogEncoder::new(false, false);
        assert_eq!(
            &enc.encode(&chunk(LogStream::Stdout, "out\n", 0))[..1],
            &[1]
        );
        assert_eq!(
            &enc.encode(&chunk(LogStream::Stderr, "err\n", 0))[..1],
            &[2]
        );
        assert_eq!(
            &enc.encode(&chunk(LogStream::Unspecified, "x", 0))[..1],
            &[1]
        );
        assert!(enc.encode(&chunk(LogStream::Stdout, "", 0)).is_empty());
    }

    #[test]
    fn a_tty_stream_is_raw() {
        let mut enc = LogEncoder::new(true, false);
        assert_eq!(
            &enc.encode(&chunk(LogStream::Stdout, "hi\r\n", 0))[..],
            b"hi\r\n"
        );
    }

    #[test]
    fn timestamps_prefix_each_line_once() {
        let mut enc = LogEncoder::new(true, true);
        let a = enc.encode(&chunk(LogStream::Stdout, "one\ntwo", 1_000_000_000));
        let b = enc.encode(&chunk(LogStream::Stdout, " more\n", 2_000_000_000));
        assert_eq!(
            String::from_utf8_lossy(&a),
            "1970-01-01T00:00:01.000000000Z one\n1970-01-01T00:00:01.000000000Z two"
        );
        assert_eq!(String::from_utf8_lossy(&b), " more\n");
    }

    #[test]
    fn content_types_follow_the_api_version() {
        assert_eq!(content_type(false, ApiVersion { minor: 47 }), MULTIPLEXED);
        assert_eq!(content_type(false, ApiVersion { minor: 41 }), RAW);
        assert_eq!(content_type(true, ApiVersion { minor: 47 }), RAW);
    }
}
