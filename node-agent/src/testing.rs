//! Support for tests that need something of the machine they run on (root,
//! a tmpfs, a runtime socket): where every test must run, a missing
//! prerequisite fails the test; elsewhere the test says loudly that it was
//! skipped, instead of passing in silence.

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
