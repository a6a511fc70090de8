//! The disk guard: refuses a pull that would bring the runtime's image
//! filesystem to the point where the kubelet starts garbage-collecting images
//! (and, further on, evicting pods), instead of pulling and letting the
//! kubelet delete what Berth just cached.
//!
//! Use is counted the way the kubelet counts it, not the way `df` does. The
//! kubelet's image GC (`pkg/kubelet/images/image_gc_manager.go`,
//! `GarbageCollect`) computes
//!
//! ```text
//! usagePercent = 100 - available * 100 / capacity        (integer division)
//! ```
//!
//! and frees images while `usagePercent >= imageGCHighThresholdPercent`
//! (default 85). `capacity` and `available` are the image filesystem's
//! `CapacityBytes` and `AvailableBytes` (`pkg/kubelet/stats`), which cadvisor
//! reads with statfs(2) on the filesystem holding the runtime's image store
//! (`getVfsStats`: `capacity = f_frsize × f_blocks`, `available = f_frsize ×
//! f_bavail`). The eviction signal `imagefs.available` is the same
//! `available / capacity`.
//!
//! `df` differs where blocks are reserved for root (`f_bfree − f_bavail`,
//! ext4's `-m`): it shows `used = f_blocks − f_bfree` and `use% = used /
//! (used + f_bavail)`, leaving the reserve out of both, while the kubelet's
//! capacity includes the reserve and its available excludes it, so the
//! reserve counts as used. On a filesystem with a large reserve the kubelet
//! (and this guard) see far more use than `df` does; refusal messages give
//! both figures.

use std::path::{Path, PathBuf};

/// Sizes of one filesystem, in bytes, as statvfs(3) reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsStats {
    /// `f_frsize × f_blocks`: the kubelet's `CapacityBytes`.
    pub capacity: u64,
    /// `f_frsize × f_bfree`: free blocks, including those reserved for root.
    pub free: u64,
    /// `f_frsize × f_bavail`: free to unprivileged users, the kubelet's `AvailableBytes`.
    pub available: u64,
}

impl FsStats {
    /// statvfs(3) of the filesystem `path` is on (after symlinks and mounts).
    pub fn read(path: &Path) -> std::io::Result<Self> {
        let st = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
        let unit = st.fragment_size();
        Ok(FsStats {
            capacity: st.blocks().saturating_mul(unit),
            free: st.blocks_free().saturating_mul(unit),
            available: st.blocks_available().saturating_mul(unit),
        })
    }

    /// Use in percent as the kubelet's image GC computes it:
    /// `100 − ⌊available × 100 / capacity⌋`; `None` for a capacity of 0,
    /// which the kubelet rejects as invalid.
    pub fn kubelet_use_percent(&self) -> Option<u64> {
        let capacity = u128::from(self.capacity);
        let available = u128::from(self.available.min(self.capacity));
        (capacity > 0).then(|| 100 - (available * 100 / capacity) as u64)
    }

    /// Use in percent as `df` shows it: `⌈used × 100 / (used + available)⌉`
    /// with `used = capacity − free`.
    pub fn df_use_percent(&self) -> u64 {
        let used = u128::from(self.capacity.saturating_sub(self.free));
        let total = used + u128::from(self.available);
        if total == 0 {
            0
        } else {
            used.saturating_mul(100).div_ceil(total) as u64
        }
    }

    /// Blocks reserved for root, which the kubelet counts as used and `df` ignores.
    pub fn reserved(&self) -> u64 {
        self.free.saturating_sub(self.available)
    }

    /// The same filesystem after `bytes` more are written.
    pub fn after_writing(&self, bytes: u64) -> Self {
        FsStats {
            capacity: self.capacity,
            free: self.free.saturating_sub(bytes),
            available: self.available.saturating_sub(bytes),
        }
    }
}

/// Why a pull is refused, with the numbers behind it.
fn verdict(now: FsStats, expected: u64, threshold: f64) -> Result<(), Refusal> {
    let after = now.after_writing(expected);
    match after.kubelet_use_percent() {
        Some(use_after) if use_after as f64 >= threshold => Err(Refusal {
            now,
            use_after,
            expected,
        }),
        _ => Ok(()),
    }
}

/// A refused pull: the filesystem now and its use after the pull.
#[derive(Debug, PartialEq, Eq)]
struct Refusal {
    now: FsStats,
    use_after: u64,
    expected: u64,
}

/// Checks image filesystem usage before pulls.
#[derive(Debug, Clone)]
pub struct DiskGuard {
    /// A path on the image filesystem (e.g. `/var/lib/containerd`); `None`
    /// disables the guard.
    path: Option<PathBuf>,
    /// Where that path's filesystem is mounted, for messages.
    mount: String,
    /// The kubelet-counted use at which pulls are refused, percent.
    threshold_percent: f64,
}

impl DiskGuard {
    /// A guard over the filesystem holding `path` (statfs follows symlinks
    /// and reads whatever is mounted there); disabled, with a warning, when
    /// the path cannot be examined.
    pub fn new(path: PathBuf, threshold_percent: f64) -> Self {
        let stats = FsStats::read(&path);
        let mount = mount_of(&path).map_or_else(|| "mount unknown".into(), |m| m.to_string());
        match &stats {
            Ok(s) => tracing::info!(
                path = %path.display(),
                %mount,
                capacity = s.capacity,
                available = s.available,
                reserved = s.reserved(),
                kubelet_use_percent = s.kubelet_use_percent(),
                df_use_percent = s.df_use_percent(),
                threshold_percent,
                "disk guard on the image filesystem"
            ),
            Err(e) => tracing::warn!(
                path = %path.display(),
                error = %e,
                "image filesystem not visible: disk guard off (mount it into the agent)"
            ),
        }
        DiskGuard {
            path: stats.is_ok().then_some(path),
            mount,
            threshold_percent,
        }
    }

    /// A guard that allows everything.
    pub fn disabled() -> Self {
        DiskGuard {
            path: None,
            mount: String::new(),
            threshold_percent: 100.0,
        }
    }

    /// `Err(why)` if pulling `image`, of `expected_bytes` (0: unknown), would
    /// bring the image filesystem's kubelet-counted use to the threshold. With
    /// the size unknown only the current use is checked, and a refusal says so.
    pub fn check(&self, image: &str, expected_bytes: u64) -> Result<(), String> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let Ok(now) = FsStats::read(path) else {
            return Ok(());
        };
        verdict(now, expected_bytes, self.threshold_percent)
            .map_err(|r| self.explain(image, path, &r))
    }

    fn explain(&self, image: &str, path: &Path, r: &Refusal) -> String {
        let fs = format!(
            "the image filesystem at {} ({})",
            path.display(),
            self.mount
        );
        let limit = format!(
            "the limit is {:.0}% (BERTH_DISK_THRESHOLD, counted as the kubelet's image GC counts)",
            self.threshold_percent
        );
        let head = if r.expected == 0 {
            format!(
                "{fs} is at {}% used and the size of {image} is unknown; {limit}",
                r.use_after
            )
        } else {
            format!(
                "pulling {image} (~{}) would bring {fs} to {}% used; {limit}",
                gib(r.expected),
                r.use_after
            )
        };
        let mut why = format!(
            "{head}: {} of {} available",
            gib(r.now.available),
            gib(r.now.capacity)
        );
        if r.now.reserved() > 0 {
            why += &format!(
                ", {} reserved for root count as used (df shows {}%)",
                gib(r.now.reserved()),
                r.now.df_use_percent()
            );
        }
        why
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

/// A mount, as `/proc/self/mountinfo` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Where it is mounted.
    pub point: PathBuf,
    /// Filesystem type, e.g. `ext4`, `tmpfs`, `overlay`.
    pub fs_type: String,
    /// What is mounted, e.g. `/dev/vda1`.
    pub source: String,
}

impl std::fmt::Display for Mount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} mounted at {}",
            self.fs_type,
            self.source,
            self.point.display()
        )
    }
}

/// The mount `path` lies on: the deepest mount point above its canonical
/// path, the last mounted where several are stacked.
pub fn mount_of(path: &Path) -> Option<Mount> {
    let path = path.canonicalize().ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mount_in(&mountinfo, &path)
}

fn mount_in(mountinfo: &str, path: &Path) -> Option<Mount> {
    let mut best: Option<Mount> = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(point), Some(fs_type), Some(source)) =
            (fields.get(4), fields.get(sep + 1), fields.get(sep + 2))
        else {
            continue;
        };
        let point = PathBuf::from(unescape(point));
        let deeper = best
            .as_ref()
            .is_none_or(|b| point.components().count() >= b.point.components().count());
        if path.starts_with(&point) && deeper {
            best = Some(Mount {
                point,
                fs_type: fs_type.to_string(),
                source: unescape(source),
            });
        }
    }
    best
}

/// Undoes mountinfo's octal escapes (`\040` for a space, …).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1_000_000_000;

    /// A filesystem of `capacity` bytes with `used` written and `reserved`
    /// held back for root.
    fn fs(capacity: u64, used: u64, reserved: u64) -> FsStats {
        FsStats {
            capacity,
            free: capacity - used,
            available: capacity - used - reserved,
        }
    }

    #[test]
    fn use_is_counted_as_the_kubelet_counts_it_with_the_root_reserve_as_used() {
        // This machine's root filesystem while this was written: statvfs gave
        // f_frsize 4096, f_blocks 66053021, f_bfree 61750668, f_bavail
        // 19572963; `df` showed 20%, the kubelet's formula gives 71%.
        let host = FsStats {
            capacity: 66_053_021 * 4096,
            free: 61_750_668 * 4096,
            available: 19_572_963 * 4096,
        };
        assert_eq!(host.df_use_percent(), 19);
        assert_eq!(host.kubelet_use_percent(), Some(71));

        // The hostile trial: 185 GB, 30 GB written, 118 GB reserved, 37 GB
        // available. df: 30 / (30 + 37) = 45%; kubelet: 100 − 20 = 80%.
        let trial = fs(185 * GB, 30 * GB, 118 * GB);
        assert_eq!(trial.df_use_percent(), 45);
        assert_eq!(trial.kubelet_use_percent(), Some(80));
        assert_eq!(trial.reserved(), 118 * GB);

        // Without a reserve both agree (up to rounding).
        let plain = fs(100 * GB, 45 * GB, 0);
        assert_eq!(plain.df_use_percent(), 45);
        assert_eq!(plain.kubelet_use_percent(), Some(45));

        // The kubelet truncates available%, so any fraction counts as used.
        assert_eq!(fs(1000, 841, 0).kubelet_use_percent(), Some(85));
        assert_eq!(fs(0, 0, 0).kubelet_use_percent(), None);
    }

    #[test]
    fn a_pull_is_refused_when_it_would_reach_the_kubelets_gc_threshold() {
        let trial = fs(185 * GB, 30 * GB, 118 * GB);
        // 80% now; the kubelet's GC starts at 85%, which its truncation
        // reaches below 16% available (29.6 GB): 7 GB more is fine, 8 GB not.
        assert_eq!(verdict(trial, 7 * GB, 85.0), Ok(()));
        let refused = verdict(trial, 8 * GB, 85.0).unwrap_err();
        assert_eq!(refused.use_after, 85);
        // An unknown size (0) checks only the current use.
        assert_eq!(verdict(trial, 0, 85.0), Ok(()));
        assert_eq!(verdict(trial, 0, 80.0).unwrap_err().use_after, 80);
        // A filesystem of no size (some pseudo filesystems) is not judged.
        assert_eq!(verdict(fs(0, 0, 0), 10, 0.0), Ok(()));
    }

    fn guard_over(stats: FsStats, threshold: f64) -> (DiskGuard, Refusal) {
        let guard = DiskGuard {
            path: Some("/var/lib/containerd".into()),
            mount: "ext4 /dev/vda mounted at /".into(),
            threshold_percent: threshold,
        };
        let refusal = Refusal {
            now: stats,
            use_after: stats.kubelet_use_percent().unwrap(),
            expected: 0,
        };
        (guard, refusal)
    }

    #[test]
    fn a_refusal_names_the_filesystem_both_figures_and_an_unknown_size() {
        let (guard, refusal) = guard_over(fs(185 * GB, 30 * GB, 118 * GB), 80.0);
        let why = guard.explain("r.io/a:1", Path::new("/var/lib/containerd"), &refusal);
        for part in [
            "/var/lib/containerd (ext4 /dev/vda mounted at /)",
            "is at 80% used",
            "size of r.io/a:1 is unknown",
            "limit is 80%",
            "34.5 GiB of 172.3 GiB available",
            "109.9 GiB reserved for root count as used (df shows 45%)",
        ] {
            assert!(why.contains(part), "{part:?} missing from: {why}");
        }
        let known = Refusal {
            expected: 10 * GB,
            use_after: 85,
            ..refusal
        };
        let why = guard.explain("r.io/a:1", Path::new("/var/lib/containerd"), &known);
        assert!(
            why.contains("pulling r.io/a:1 (~9.3 GiB) would bring") && why.contains("85% used"),
            "{why}"
        );
    }

    #[test]
    fn the_guard_reads_the_filesystem_mounted_at_the_path() {
        let shm = Path::new("/dev/shm");
        let on_tmpfs = mount_of(shm).is_some_and(|m| m.fs_type == "tmpfs");
        if !on_tmpfs {
            return crate::testing::missing_prerequisite("/dev/shm is not a tmpfs mount");
        }
        let dir = tempfile::tempdir_in(shm).unwrap();
        let mount = mount_of(dir.path()).unwrap();
        assert_eq!(
            (mount.point.as_path(), mount.fs_type.as_str()),
            (shm, "tmpfs")
        );
        let inside = FsStats::read(dir.path()).unwrap();
        assert_eq!(inside.capacity, FsStats::read(shm).unwrap().capacity);
        assert_ne!(
            inside.capacity,
            FsStats::read(Path::new("/")).unwrap().capacity,
            "the tmpfs, not the root filesystem"
        );

        let strict = DiskGuard::new(dir.path().into(), 0.0);
        let e = strict.check("r.io/a:1", 1 << 20).unwrap_err();
        assert!(
            e.contains("r.io/a:1") && e.contains("limit is 0%") && e.contains("tmpfs"),
            "{e}"
        );
        assert!(
            DiskGuard::new(dir.path().into(), 100.0)
                .check("r.io/a:1", 0)
                .is_ok()
        );
        assert!(
            DiskGuard::new("/no/such/dir".into(), 0.0)
                .check("r.io/a:1", 1)
                .is_ok(),
            "a guard that cannot see the filesystem is off"
        );
    }

    #[test]
    fn the_deepest_and_latest_mount_above_a_path_is_its_mount() {
        let mountinfo = "\
22 1 252:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:26 / /var/lib/containerd rw shared:9 - xfs /dev/vdb rw
31 22 0:27 / /var/lib/containerd rw - xfs /dev/vdc rw
32 22 0:28 / /var/lib/with\\040space rw - tmpfs tmpfs rw
33 22 0:29 / /var/lib/containerdx rw - tmpfs tmpfs rw";
        let at = |p: &str| mount_in(mountinfo, Path::new(p)).unwrap();
        assert_eq!(at("/var/lib/containerd/io.x").source, "/dev/vdc");
        assert_eq!(
            at("/var/lib/containerd").point,
            Path::new("/var/lib/containerd")
        );
        assert_eq!(at("/var/lib/other").fs_type, "ext4");
        assert_eq!(at("/var/lib/with space/a").fs_type, "tmpfs");
        assert_eq!(
            at("/var/lib/containerd2").source,
            "/dev/vda",
            "not a path prefix"
        );
    }
}
