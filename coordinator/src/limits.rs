//! The process's open-file limit.
//!
//! Every connection costs a file descriptor; containers often start with a
//! soft limit (e.g. 1024) far below the hard one. [`raise_nofile`] lifts the
//! soft limit to the hard limit at start, and the connection caps
//! ([`crate::listener::Limits::within_fd_limit`]) are then fitted well below
//! what it returns, so accepting never runs the process out of descriptors.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the soft limit
/// in force afterwards (unchanged if raising failed).
pub fn raise_nofile() -> std::io::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(getrlimit(Resource::RLIMIT_NOFILE)?.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_open_file_limit_ends_at_the_hard_limit() {
        let soft = raise_nofile().unwrap();
        let (now_soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(soft, now_soft);
        assert_eq!(now_soft, hard);
    }
}
