//! The CRI log format, one record per line, as containerd and CRI-O write it:
//!
//! ```text
//! 2024-05-01T12:00:00.123456789Z stdout F a whole line
//! 2024-05-01T12:00:00.123456790+02:00 stderr P the start of a long line
//! ```
//!
//! `<RFC 3339 time with up to 9 fraction digits> <stdout|stderr> <tag> <bytes>`.
//! The tag's first `:`-separated part is `F` (the record ends a line: the
//! runtime stripped its newline) or `P` (a partial line, continued by the
//! next record of the same stream). [`parse_record`] reads one record;
//! [`Record::entry`] turns it into the `LogEntry` the coordinator gets, with
//! the newline of a full line put back.

use berth_proto::agent as pb;

/// The stream a record was written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The container's standard output.
    Stdout,
    /// The container's standard error.
    Stderr,
}

/// One record of a CRI log file, borrowing its bytes from the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    /// When the runtime read the bytes, in nanoseconds since the Unix epoch.
    pub time_unix_nanos: i64,
    /// Where the container wrote them.
    pub stream: Stream,
    /// `F`: the record ends a line; `P`: the line goes on in the next record.
    pub full: bool,
    /// The bytes, without the line's newline.
    pub data: &'a [u8],
}

impl Record<'_> {
    /// The record as the coordinator gets it: a full line with its newline.
    pub fn entry(&self) -> pb::LogEntry {
        let mut data = Vec::with_capacity(self.data.len() + 1);
        data.extend_from_slice(self.data);
        if self.full {
            data.push(b'\n');
        }
        pb::LogEntry {
            time_unix_nanos: self.time_unix_nanos,
            stream: match self.stream {
                Stream::Stdout => pb::LogStream::Stdout,
                Stream::Stderr => pb::LogStream::Stderr,
            } as i32,
            data,
        }
    }
}

/// Why a line is not a CRI log record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The line has fewer than three space-separated fields.
    #[error("not a CRI log record (expected `<time> <stream> <tag> <bytes>`)")]
    TooShort,
    /// The first field is not an RFC 3339 time.
    #[error("the time {0:?} is not RFC 3339")]
    BadTime(String),
    /// The second field is neither `stdout` nor `stderr`.
    #[error("the stream {0:?} is neither stdout nor stderr")]
    BadStream(String),
    /// The tag is neither `F` nor `P`.
    #[error("the tag {0:?} is neither F nor P")]
    BadTag(String),
}

/// Parses one line of a CRI log file, without its trailing `\n`.
pub fn parse_record(line: &[u8]) -> Result<Record<'_>, ParseError> {
    let mut fields = line.splitn(4, |b| *b == b' ');
    let (Some(time), Some(stream), Some(tag)) = (fields.next(), fields.next(), fields.next())
    else {
        return Err(ParseError::TooShort);
    };
    // containerd always writes the space after the tag; tolerate its absence
    // on an empty line.
    let data = fields.next().unwrap_or_default();
    let lossy = |b: &[u8]| String::from_utf8_lossy(&b[..b.len().min(64)]).into_owned();
    let time_unix_nanos =
        parse_rfc3339_nanos(time).ok_or_else(|| ParseError::BadTime(lossy(time)))?;
    let stream = match stream {
        b"stdout" => Stream::Stdout,
        b"stderr" => Stream::Stderr,
        other => return Err(ParseError::BadStream(lossy(other))),
    };
    let full = match tag.split(|b| *b == b':').next() {
        Some(b"F") => true,
        Some(b"P") => false,
        _ => return Err(ParseError::BadTag(lossy(tag))),
    };
    Ok(Record {
        time_unix_nanos,
        stream,
        full,
        data,
    })
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` as nanoseconds since the Unix
/// epoch; `None` for anything else (or a time outside i64 nanoseconds).
/// Go's `RFC3339Nano`, which the runtimes use, drops trailing zeros of the
/// fraction and writes the host's offset when it is not UTC.
pub fn parse_rfc3339_nanos(s: &[u8]) -> Option<i64> {
    fn num(b: &[u8]) -> Option<i64> {
        if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(b.iter().fold(0, |n, d| n * 10 + i64::from(d - b'0')))
    }
    if s.len() < 20 || s[4] != b'-' || s[7] != b'-' || !matches!(s[10], b'T' | b't') {
        return None;
    }
    if s[13] != b':' || s[16] != b':' {
        return None;
    }
    let (year, month, day) = (num(&s[0..4])?, num(&s[5..7])?, num(&s[8..10])?);
    let (hour, minute, second) = (num(&s[11..13])?, num(&s[14..16])?, num(&s[17..19])?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    // 60: a leap second, which Unix time folds into the next one.
    if second > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos = 0;
    if let Some(after_dot) = rest.strip_prefix(b".") {
        let digits = after_dot.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || digits > 9 {
            return None;
        }
        nanos = num(&after_dot[..digits])? * 10_i64.pow(9 - digits as u32);
        rest = &after_dot[digits..];
    }
    let offset_seconds = match rest {
        b"Z" | b"z" => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let (h, m) = (num(&[*h1, *h2])?, num(&[*m1, *m2])?);
            if h > 23 || m > 59 {
                return None;
            }
            let magnitude = h * 3600 + m * 60;
            if *sign == b'+' { magnitude } else { -magnitude }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_seconds;
    seconds.checked_mul(1_000_000_000)?.checked_add(nanos)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_stdout_record_gets_its_newline_back() {
        let r = parse_record(b"2024-05-01T12:00:00.5Z stdout F hello world").unwrap();
        assert_eq!(r.time_unix_nanos, 1_714_564_800_500_000_000);
        assert_eq!(r.stream, Stream::Stdout);
        assert!(r.full);
        let e = r.entry();
        assert_eq!(e.data, b"hello world\n");
        assert_eq!(e.stream, pb::LogStream::Stdout as i32);
    }

    #[test]
    fn a_partial_stderr_record_keeps_its_bytes_as_they_are() {
        let r = parse_record(b"2024-05-01T12:00:00Z stderr P part one ").unwrap();
        assert_eq!(r.stream, Stream::Stderr);
        assert!(!r.full);
        assert_eq!(r.entry().data, b"part one ");
        assert_eq!(r.entry().stream, pb::LogStream::Stderr as i32);
    }

    #[test]
    fn an_empty_line_is_just_a_newline_with_or_without_the_trailing_space() {
        for line in [
            &b"2024-05-01T12:00:00Z stdout F "[..],
            b"2024-05-01T12:00:00Z stdout F",
        ] {
            assert_eq!(parse_record(line).unwrap().entry().data, b"\n");
        }
    }

    #[test]
    fn spaces_and_binary_bytes_in_the_data_are_kept() {
        let r = parse_record(b"2024-05-01T12:00:00Z stdout F  a  b \xff\x00").unwrap();
        assert_eq!(r.data, b" a  b \xff\x00");
    }

    #[test]
    fn a_tag_with_extra_parts_is_read_by_its_first() {
        assert!(
            parse_record(b"2024-05-01T12:00:00Z stdout F:x y")
                .unwrap()
                .full
        );
        assert!(
            !parse_record(b"2024-05-01T12:00:00Z stdout P:x y")
                .unwrap()
                .full
        );
    }

    #[test]
    fn malformed_lines_are_errors_not_panics() {
        let bad: &[&[u8]] = &[
            b"",
            b"garbage",
            b"2024-05-01T12:00:00Z stdout",
            b"yesterday stdout F x",
            b"2024-05-01T12:00:00Z stdin F x",
            b"2024-05-01T12:00:00Z stdout X x",
            b"2024-13-01T12:00:00Z stdout F x",
            b"2024-05-01T12:00:00.Z stdout F x",
            b"2024-05-01T12:00:00.1234567891Z stdout F x",
            b"2024-05-01T12:00:00+0200 stdout F x",
            b"\xff\xfe\xfd",
        ];
        for line in bad {
            assert!(
                parse_record(line).is_err(),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn times_with_offsets_and_short_fractions_are_the_same_instant_in_utc() {
        let utc = parse_rfc3339_nanos(b"2024-05-01T12:00:00.123456789Z").unwrap();
        assert_eq!(
            parse_rfc3339_nanos(b"2024-05-01T14:00:00.123456789+02:00"),
            Some(utc)
        );
        assert_eq!(
            parse_rfc3339_nanos(b"2024-05-01T11:30:00.123456789-00:30"),
            Some(utc)
        );
        assert_eq!(
            parse_rfc3339_nanos(b"2024-05-01T12:00:00.12Z"),
            Some(utc - 3_456_789)
        );
        assert_eq!(parse_rfc3339_nanos(b"1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_nanos(b"2000-02-29T00:00:00Z"),
            Some(951_782_400 * 1_000_000_000)
        );
    }
}
