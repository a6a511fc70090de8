use super::*;

fn e(path: &str, kind: Kind) -> Entry {
    Entry {
        path: path.into(),
        kind,
        size: 1,
    }
}
fn file(path: &str) -> Entry {
    e(path, Kind::File)
}
fn dir(path: &str) -> Entry {
    e(path, Kind::Dir)
}
fn link(path: &str, to: &str) -> Entry {
    e(path, Kind::Symlink(to.into()))
}

/// A merged-/usr Debian-like base and a layer on top.
fn layers() -> Vec<Vec<Entry>> {
    vec![
        vec![
            dir(""),
            dir("usr"),
            dir("usr/lib"),
            dir("usr/lib/x86_64-linux-gnu"),
            file("usr/lib/x86_64-linux-gnu/libc.so.6"),
            file("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
            file("usr/lib/x86_64-linux-gnu/libnss_files.so.2"),
            file("usr/lib/x86_64-linux-gnu/libunused.so"),
            link("lib", "usr/lib"),
            link("lib64", "usr/lib64"),
            dir("usr/lib64"),
            link(
                "usr/lib64/ld-linux-x86-64.so.2",
                "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            ),
            dir("usr/bin"),
            file("usr/bin/redis-server"),
            file("usr/bin/bash"),
            e(
                "usr/bin/redis-check-rdb",
                Kind::Hardlink("usr/bin/redis-server".into()),
            ),
            dir("etc"),
            file("etc/passwd"),
            file("etc/motd"),
            link("etc/localtime", "/usr/share/zoneinfo/Etc/UTC"),
            dir("usr/share"),
            dir("usr/share/zoneinfo"),
            dir("usr/share/zoneinfo/Etc"),
            file("usr/share/zoneinfo/Etc/UTC"),
            file("usr/share/zoneinfo/Etc/GMT"),
            dir("var"),
            dir("var/cache"),
            file("var/cache/big"),
        ],
        vec![
            dir("etc"),
            file("etc/redis.conf"),
            file("etc/passwd"),
            e("etc/.wh.motd", Kind::Whiteout("etc/motd".into())),
            e("var/.wh..wh..opq", Kind::Opaque("var".into())),
            dir("var"),
            file("var/new"),
        ],
    ]
}

fn set(paths: &[&str]) -> BTreeSet<String> {
    paths.iter().map(|s| s.to_string()).collect()
}

#[test]
fn the_merged_view_applies_whiteouts_opaque_dirs_and_overrides() {
    let v = View::build(&layers());
    assert!(v.get("etc/motd").is_none());
    assert!(v.get("var/cache").is_none() && v.get("var/cache/big").is_none());
    assert_eq!(v.get("var/new").map(|n| n.1), Some(1));
    assert_eq!(v.get("etc/passwd").map(|n| n.1), Some(1));
    assert_eq!(v.get("usr/bin/bash").map(|n| n.1), Some(0));
    // A file over a directory removes what was under it.
    let v = View::build(&[vec![dir("a"), file("a/b")], vec![file("a")]]);
    assert!(v.get("a/b").is_none());
    assert_eq!(v.get("a"), Some(&(Kind::File, 1)));
}

#[test]
fn paths_resolve_through_directory_symlinks_and_absolute_ones() {
    let v = View::build(&layers());
    let mut via = Vec::new();
    assert_eq!(
        v.resolve("/lib64/ld-linux-x86-64.so.2", &mut via)
            .as_deref(),
        Some("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    );
    assert_eq!(via, vec!["lib64", "usr/lib64/ld-linux-x86-64.so.2", "lib"]);
    assert_eq!(v.resolve("/nonexistent/x", &mut Vec::new()), None);
    let loop_ = View::build(&[vec![link("a", "b"), link("b", "a")]]);
    assert_eq!(loop_.resolve("a", &mut Vec::new()), None);
    let up = View::build(&[vec![dir("d"), link("d/up", "../x"), file("x")]]);
    assert_eq!(up.resolve("d/up", &mut Vec::new()).as_deref(), Some("x"));
}

#[test]
fn the_closure_keeps_parents_links_to_kept_files_hard_link_targets_and_the_keep_list() {
    let v = View::build(&layers());
    let accessed = [
        "/usr/bin/redis-check-rdb",
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        "/etc/redis.conf",
        "/data/dump.rdb",
        "/proc/self/status",
    ];
    let keep: Vec<String> = DEFAULT_KEEP.iter().map(|s| s.to_string()).collect();
    let kept = closure(&v, accessed, &keep);
    let want = set(&[
        "",
        "usr",
        "usr/bin",
        "usr/bin/redis-check-rdb",
        "usr/bin/redis-server",
        "usr/lib",
        "usr/lib/x86_64-linux-gnu",
        "usr/lib/x86_64-linux-gnu/libc.so.6",
        "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        "usr/lib/x86_64-linux-gnu/libnss_files.so.2",
        "lib",
        "lib64",
        "usr/lib64",
        "usr/lib64/ld-linux-x86-64.so.2",
        "etc",
        "etc/redis.conf",
        "etc/passwd",
        "etc/localtime",
        "usr/share",
        "usr/share/zoneinfo",
        "usr/share/zoneinfo/Etc",
        "usr/share/zoneinfo/Etc/UTC",
    ]);
    assert_eq!(
        kept,
        want,
        "extra: {:?}, missing: {:?}",
        kept.difference(&want).collect::<Vec<_>>(),
        want.difference(&kept).collect::<Vec<_>>()
    );
}

#[test]
fn keep_patterns_match_components_and_subtrees() {
    assert!(matches("etc/passwd", "etc/passwd"));
    assert!(matches("/etc/passwd", "etc/passwd"));
    assert!(!matches("etc/passwd", "etc/passwd-"));
    assert!(matches(
        "usr/lib/*/libnss_files*",
        "usr/lib/x86_64-linux-gnu/libnss_files.so.2"
    ));
    assert!(!matches(
        "usr/lib/*/libnss_files*",
        "usr/lib/a/b/libnss_files.so.2"
    ));
    assert!(matches("etc/ld.so.conf.d/**", "etc/ld.so.conf.d/x/y.conf"));
    assert!(!matches("etc/ld.so.conf.d/**", "etc/ld.so.conf"));
    assert!(matches("tmp", "tmp") && !matches("tmp", "tmp/x"));
}

#[test]
fn the_plan_keeps_files_where_they_are_provided_dirs_everywhere_and_all_whiteouts() {
    let ls = layers();
    let v = View::build(&ls);
    let kept = closure(&v, ["/etc/passwd", "/usr/bin/bash"], &[]);
    let plan = plan(&ls, &v, &kept, 0);
    let kept_in = |i: usize| -> Vec<&str> {
        ls[i]
            .iter()
            .zip(plan[i].as_ref().unwrap())
            .filter(|(_, k)| **k)
            .map(|(e, _)| e.path.as_str())
            .collect()
    };
    // The lower etc/passwd is shadowed by the upper one: dropped below.
    assert_eq!(
        kept_in(0),
        vec!["", "usr", "usr/bin", "usr/bin/bash", "etc"]
    );
    // var is not kept: its opaque marker goes too.
    assert_eq!(kept_in(1), vec!["etc", "etc/passwd", "etc/.wh.motd"]);
}

#[test]
fn a_kept_hard_link_keeps_its_target_entry_and_top_leaves_lower_layers_alone() {
    let ls = vec![
        vec![dir("usr"), file("usr/a")],
        vec![
            dir("bin"),
            file("bin/t"),
            e("bin/h", Kind::Hardlink("bin/t".into())),
            e("bin/h2", Kind::Hardlink("usr/a".into())),
        ],
    ];
    let v = View::build(&ls);
    // Only the links were opened (by their names).
    let kept = closure(&v, ["/bin/h", "/bin/h2"], &[]);
    assert!(kept.contains("bin/t") && kept.contains("usr/a"));
    let p = plan(&ls, &v, &kept, 0);
    assert_eq!(p[1], Some(vec![true, true, true, true]));
    assert_eq!(p[0], Some(vec![true, true]), "usr/a is h2's target");
    let p = plan(&ls, &v, &kept, 1);
    assert_eq!(p[0], None);
}

#[test]
fn parents_a_layer_does_not_list_are_there_and_what_is_under_them_is_kept() {
    let ls = vec![
        vec![dir("usr"), file("usr/bin")],
        vec![file("app/server.py"), file("app/unused.py")],
    ];
    let v = View::build(&ls);
    assert_eq!(v.get("app"), Some(&(Kind::Dir, 1)));
    let kept = closure(&v, ["/app/server.py"], &[]);
    assert!(kept.contains("app/server.py") && kept.contains("app"));
    let p = plan(&ls, &v, &kept, 0);
    assert_eq!(p[1], Some(vec![true, false]));
}

#[test]
fn python_bytecode_keeps_the_source_the_import_system_looks_for() {
    assert_eq!(
        python_source("usr/lib/python3.11/encodings/__pycache__/__init__.cpython-311.pyc")
            .as_deref(),
        Some("usr/lib/python3.11/encodings/__init__.py")
    );
    assert_eq!(
        python_source("a/__pycache__/m.cpython-311.opt-1.pyc").as_deref(),
        Some("a/m.py")
    );
    assert_eq!(python_source("a/m.pyc"), None);
    let v = View::build(&[vec![
        file("lib/json/__init__.py"),
        file("lib/json/__pycache__/__init__.cpython-311.pyc"),
        file("lib/json/decoder.py"),
    ]]);
    let kept = closure(&v, ["/lib/json/__pycache__/__init__.cpython-311.pyc"], &[]);
    assert!(kept.contains("lib/json/__init__.py"));
    assert!(!kept.contains("lib/json/decoder.py"));
}
