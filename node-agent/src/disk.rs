//! The disk guard: refuses a pull that would fill the runtime's image
//! filesystem past a threshold, instead of letting the node run out of disk
//! and the kubelet start evicting pods.

use std::path::PathBuf;

/// Checks image filesystem usage before pulls.
#[derive(Debug, Clone)]
pub struct DiskGuard {
    /// A path on the image filesystem (e.g. `/var/lib/containerd`); `None`
    /// disables the guard.
    path: Option<PathBuf>,
    /// Highest allowed use, percent.
    threshold_percent: f64,
}

impl DiskGuard {
    /// A guard over the filesystem holding `path`; disabled (with a warning)
    /// when the path cannot be examined.
    pub fn new(path: PathBuf, threshold_percent: f64) -> Self {
        let usable = nix::sys::statvfs::statvfs(&path).is_ok();
        if !usable {
            tracing::warn!(path = %path.display(), "image filesystem not visible: disk guard off (mount it into the agent)");
        }
        DiskGuard {
            path: usable.then_some(path),
            threshold_percent,
        }
    }

    /// A guard that allows everything.
    pub fn disabled() -> Self {
        DiskGuard {
            path: None,
            threshold_percent: 100.0,
        }
    }

    /// `Err(why)` if pulling `expected_bytes` more would pass the threshold.
    pub fn check(&self, image: &str, expected_bytes: u64) -> Result<(), String> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let Ok(st) = nix::sys::statvfs::statvfs(path) else {
            return Ok(());
        };
        let block = st.fragment_size();
        let total = st.blocks() * block;
        let avail = st.blocks_available() * block;
        verdict(total, avail, expected_bytes, self.threshold_percent).map_err(|after| {
            format!(
                "pulling {image} (~{} MiB) would take the image filesystem at {} to {after:.0}% (limit {:.0}%)",
                expected_bytes >> 20,
                path.display(),
                self.threshold_percent
            )
        })
    }
}

/// Use after the pull, in percent, if that passes `threshold`.
fn verdict(total: u64, avail: u64, expected: u64, threshold: f64) -> Result<(), f64> {
    if total == 0 {
        return Ok(());
    }
    let used_after = total.saturating_sub(avail).saturating_add(expected);
    let percent = used_after as f64 * 100.0 / total as f64;
    if percent > threshold {
        Err(percent)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pull_that_would_pass_the_threshold_is_refused() {
        assert_eq!(verdict(100, 30, 10, 85.0), Ok(()));
        assert_eq!(verdict(100, 30, 20, 85.0), Err(90.0));
        assert_eq!(verdict(100, 10, 0, 85.0), Err(90.0), "already past it");
        assert_eq!(verdict(0, 0, 10, 85.0), Ok(()), "unknown size");
    }

    #[test]
    fn the_guard_reads_the_real_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let strict = DiskGuard::new(dir.path().into(), 0.0);
        let e = strict.check("r.io/a:1", 1 << 20).unwrap_err();
        assert!(e.contains("r.io/a:1") && e.contains("limit 0%"), "{e}");
        assert!(
            DiskGuard::new(dir.path().into(), 100.0)
                .check("r.io/a:1", 0)
                .is_ok()
        );
        assert!(
            DiskGuard::new("/no/such/dir".into(), 0.0)
                .check("r.io/a:1", 1)
                .is_ok()
        );
    }
}
