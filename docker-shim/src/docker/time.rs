//! Timestamps as Docker writes them: RFC 3339 with nanoseconds in JSON
//! (`0001-01-01T00:00:00Z` when unset), Unix seconds in lists, a fixed nine
//! digits before each log line; and the `since`/`until` query values it
//! accepts (Unix seconds with an optional fraction, or RFC 3339).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Docker's "never": Go's zero time.
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// `value`, or [`ZERO_TIME`] when empty.
pub fn or_zero(value: &str) -> String {
    if value.is_empty() {
        ZERO_TIME.to_string()
    } else {
        value.to_string()
    }
}

/// Parses an RFC 3339 time with `Z` or a numeric offset; `None` if empty,
/// malformed or the zero time.
pub fn parse_rfc3339(value: &str) -> Option<SystemTime> {
    if value.is_empty() || value.starts_with("0001-") {
        return None;
    }
    if let Ok(t) = humantime::parse_rfc3339(value) {
        return Some(t);
    }
    // A numeric offset (`+02:00`): read the local part, then shift.
    let (local, sign, offset) = match value.rfind(['+', '-']) {
        Some(i) if i > 10 => (&value[..i], &value[i..i + 1], &value[i + 1..]),
        _ => return None,
    };
    let (h, m) = offset.split_once(':')?;
    let shift = Duration::from_secs(h.parse::<u64>().ok()? * 3600 + m.parse::<u64>().ok()? * 60);
    let t = humantime::parse_rfc3339(&format!("{local}Z")).ok()?;
    if sign == "+" {
        t.checked_sub(shift)
    } else {
        t.checked_add(shift)
    }
}

/// Unix seconds of an RFC 3339 time; 0 when unknown.
pub fn unix_seconds(value: &str) -> i64 {
    parse_rfc3339(value)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs() as i64)
}

/// RFC 3339 with exactly nine fractional digits (what `docker logs -t` prints).
pub fn fixed_nanos(unix_nanos: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_nanos(unix_nanos.max(0) as u64);
    humantime::format_rfc3339_nanos(t).to_string()
}

/// A `since`/`until` query value as Unix nanoseconds: `1700000000`,
/// `1700000000.5`, or an RFC 3339 time; empty or `0` is `0` (no bound).
pub fn parse_query_time(value: &str) -> Result<i64, String> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(0);
    }
    let bad =
        || format!("invalid time {value:?}: want Unix seconds (e.g. 1700000000.5) or RFC 3339");
    if value.contains('T') {
        let t = parse_rfc3339(value).ok_or_else(bad)?;
        let d = t.duration_since(UNIX_EPOCH).map_err(|_| bad())?;
        return i64::try_from(d.as_nanos()).map_err(|_| bad());
    }
    let (secs, frac) = value.split_once('.').unwrap_or((value, ""));
    let secs: i64 = secs.parse().map_err(|_| bad())?;
    if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let nanos: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().map_err(|_| bad())?
    };
    secs.checked_mul(1_000_000_000)
        .and_then(|s| s.checked_add(nanos))
        .ok_or_else(bad)
}

/// Docker's human duration ("Less than a second", "5 seconds",
/// "About a minute", "3 hours", "2 weeks", …).
pub fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let hours = secs / 3600;
    if secs < 1 {
        "Less than a second".into()
    } else if secs == 1 {
        "1 second".into()
    } else if secs < 60 {
        format!("{secs} seconds")
    } else if secs / 60 == 1 {
        "About a minute".into()
    } else if secs / 60 < 60 {
        format!("{} minutes", secs / 60)
    } else if hours == 1 {
        "About an hour".into()
    } else if hours < 48 {
        format!("{hours} hours")
    } else if hours < 24 * 7 * 2 {
        format!("{} days", hours / 24)
    } else if hours < 24 * 30 * 2 {
        format!("{} weeks", hours / 24 / 7)
    } else if hours < 24 * 365 * 2 {
        format!("{} months", hours / 24 / 30)
    } else {
        format!("{} years", hours / 24 / 365)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_with_z_or_an_offset_reads_the_same_instant() {
        let z = parse_rfc3339("2024-05-01T10:00:00.5Z").unwrap();
        let off = parse_rfc3339("2024-05-01T12:00:00.5+02:00").unwrap();
        assert_eq!(z, off);
        assert_eq!(parse_rfc3339(""), None);
        assert_eq!(parse_rfc3339(ZERO_TIME), None);
        assert_eq!(unix_seconds("1970-01-01T00:01:40Z"), 100);
        assert_eq!(unix_seconds("garbage"), 0);
    }

    #[test]
    fn unset_times_are_dockers_zero_time() {
        assert_eq!(or_zero(""), "0001-01-01T00:00:00Z");
        assert_eq!(or_zero("2024-05-01T10:00:00Z"), "2024-05-01T10:00:00Z");
    }

    #[test]
    fn log_timestamps_have_nine_digits() {
        assert_eq!(fixed_nanos(1_500_000_000), "1970-01-01T00:00:01.500000000Z");
    }

    #[test]
    fn since_and_until_accept_seconds_fractions_and_rfc3339() {
        assert_eq!(parse_query_time(""), Ok(0));
        assert_eq!(parse_query_time("0"), Ok(0));
        assert_eq!(parse_query_time("12"), Ok(12_000_000_000));
        assert_eq!(parse_query_time("12.5"), Ok(12_500_000_000));
        assert_eq!(parse_query_time("12.000000001"), Ok(12_000_000_001));
        assert_eq!(parse_query_time("1970-01-01T00:00:12Z"), Ok(12_000_000_000));
        assert!(parse_query_time("yesterday").is_err());
        assert!(parse_query_time("1.1234567890").is_err());
    }

    #[test]
    fn durations_read_as_docker_prints_them() {
        let cases = [
            (0, "Less than a second"),
            (1, "1 second"),
            (5, "5 seconds"),
            (60, "About a minute"),
            (119, "About a minute"),
            (120, "2 minutes"),
            (3600, "About an hour"),
            (3 * 3600, "3 hours"),
            (3 * 86400, "3 days"),
            (15 * 86400, "2 weeks"),
            (70 * 86400, "2 months"),
            (800 * 86400, "2 years"),
        ];
        for (secs, want) in cases {
            assert_eq!(human_duration(Duration::from_secs(secs)), want, "{secs}");
        }
    }
}
