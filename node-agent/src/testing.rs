//! Support for tests that need something of the machine they run on (root,
//! a tmpfs, a runtime socket): where every test must run, a missing
//! prerequisite fails the test; elsewhere the test says loudly that it was
//! skipped, instead of passing in silence. Also raw tar blocks, for tests
//! of what layer readers must refuse.

/// Whether every test must run: in CI (`CI` set) or with `BERTH_REQUIRE_ALL=1`.
pub fn all_required() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
        || std::env::var("BERTH_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// Ends a test whose prerequisite `why` is missing: panics where every test
/// must run ([`all_required`]), else prints `SKIPPED: why` on stderr.
#[track_caller]
pub fn missing_prerequisite(why: &str) {
    if all_required() {
        panic!("{why} (CI or BERTH_REQUIRE_ALL=1: every test must run here)");
    }
    eprintln!("\n*** SKIPPED: {why} (set CI or BERTH_REQUIRE_ALL=1 to make this a failure) ***\n");
}

/// A raw ustar header block with a correct checksum: the entries no tar
/// library writes (absolute paths, `..`, devices), for tests of refusals.
pub fn ustar_header(name: &str, flag: u8, size: u64, link: &str) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[..name.len()].copy_from_slice(name.as_bytes());
    b[100..107].copy_from_slice(b"0000644");
    b[108..115].copy_from_slice(b"0000000");
    b[116..123].copy_from_slice(b"0000000");
    b[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    b[136..147].copy_from_slice(b"14000000000");
    b[156] = flag;
    b[157..157 + link.len()].copy_from_slice(link.as_bytes());
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    b[148..156].copy_from_slice(b"        ");
    let sum: u64 = b.iter().map(|x| *x as u64).sum();
    b[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    b
}

/// An archive of raw entries (header, data), padded and ended.
pub fn tar_of(entries: &[([u8; 512], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (h, data) in entries {
        out.extend_from_slice(h);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}
