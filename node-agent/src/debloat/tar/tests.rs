use super::*;

pub(crate) use crate::testing::{tar_of as archive, ustar_header as header};

/// A realistic layer written by the `tar` crate: a long GNU name, PAX
/// xattrs, a symlink, a hard link, a whiteout and an opaque directory.
pub(crate) fn sample_layer() -> Vec<u8> {
    let mut b = ::tar::Builder::new(Vec::new());
    let mut dir = ::tar::Header::new_gnu();
    dir.set_entry_type(::tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    b.append_data(&mut dir.clone(), "usr/", std::io::empty())
        .unwrap();
    b.append_data(&mut dir.clone(), "usr/bin/", std::io::empty())
        .unwrap();
    let mut f = ::tar::Header::new_gnu();
    f.set_mode(0o4755);
    f.set_uid(1234);
    f.set_gid(5678);
    f.set_mtime(1_700_000_000);
    f.set_size(5);
    b.append_pax_extensions([(
        "SCHILY.xattr.security.capability",
        &[1u8, 0, 0, 2, 0x20, 0, 0, 0][..],
    )])
    .unwrap();
    b.append_data(&mut f.clone(), "usr/bin/ping", &b"hello"[..])
        .unwrap();
    let long = format!("usr/share/{}/file", "x".repeat(150));
    b.append_data(&mut f.clone(), &long, &b"long!"[..]).unwrap();
    let mut l = ::tar::Header::new_gnu();
    l.set_entry_type(::tar::EntryType::Symlink);
    l.set_size(0);
    b.append_link(&mut l.clone(), "usr/bin/p", "ping").unwrap();
    let mut h = ::tar::Header::new_gnu();
    h.set_entry_type(::tar::EntryType::Link);
    h.set_size(0);
    b.append_link(&mut h, "usr/bin/ping2", "usr/bin/ping")
        .unwrap();
    let mut empty = f.clone();
    empty.set_size(0);
    b.append_data(&mut empty.clone(), "etc/.wh.gone", std::io::empty())
        .unwrap();
    b.append_data(&mut empty, "var/.wh..wh..opq", std::io::empty())
        .unwrap();
    b.into_inner().unwrap()
}

fn all(raw: &[u8]) -> Result<Vec<Record>, TarError> {
    let mut r = Reader::new(raw);
    let mut out = Vec::new();
    while let Some(rec) = r.next_record()? {
        out.push(rec);
    }
    Ok(out)
}

#[test]
fn copying_every_record_gives_back_the_same_bytes() {
    let raw = sample_layer();
    let mut r = Reader::new(&raw[..]);
    let mut out = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        out.extend_from_slice(&rec.header);
        r.copy_data(&mut out).unwrap();
    }
    write_end(&mut out).unwrap();
    assert_eq!(out, raw);
}

#[test]
fn records_name_paths_and_kinds_as_the_root_filesystem_sees_them() {
    let got: Vec<(String, Kind, u64)> = all(&sample_layer())
        .unwrap()
        .into_iter()
        .map(|r| (r.path, r.kind, r.size))
        .collect();
    let long = format!("usr/share/{}/file", "x".repeat(150));
    assert_eq!(
        got,
        vec![
            ("usr".into(), Kind::Dir, 0),
            ("usr/bin".into(), Kind::Dir, 0),
            ("usr/bin/ping".into(), Kind::File, 5),
            (long, Kind::File, 5),
            ("usr/bin/p".into(), Kind::Symlink("ping".into()), 0),
            (
                "usr/bin/ping2".into(),
                Kind::Hardlink("usr/bin/ping".into()),
                0
            ),
            ("etc/.wh.gone".into(), Kind::Whiteout("etc/gone".into()), 0),
            ("var/.wh..wh..opq".into(), Kind::Opaque("var".into()), 0),
        ]
    );
}

#[test]
fn the_pax_record_travels_with_its_entry() {
    let recs = all(&sample_layer()).unwrap();
    let ping = &recs[2];
    assert_eq!(
        ping.header.len(),
        3 * 512,
        "PAX header, its data, the entry"
    );
    assert!(
        ping.header
            .windows(32)
            .any(|w| w == b"SCHILY.xattr.security.capability")
    );
}

#[test]
fn dot_slash_and_trailing_slashes_are_normalised() {
    let raw = archive(&[
        (header("./", b'5', 0, ""), b""),
        (header("./etc//passwd", b'0', 3, ""), b"abc"),
    ]);
    let recs = all(&raw).unwrap();
    assert_eq!(recs[0].path, "");
    assert_eq!(recs[1].path, "etc/passwd");
}

fn refused(entries: &[([u8; 512], &[u8])]) -> String {
    match all(&archive(entries)) {
        Err(e @ TarError::Hostile(_)) => e.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn hostile_entries_are_refused_with_what_is_wrong() {
    assert!(refused(&[(header("/etc/passwd", b'0', 0, ""), b"")]).contains("absolute path"));
    assert!(refused(&[(header("a/../../etc/passwd", b'0', 0, ""), b"")]).contains("`..`"));
    assert!(refused(&[(header("dev/sda", b'4', 0, ""), b"")]).contains("device node"));
    assert!(refused(&[(header("dev/mem", b'3', 0, ""), b"")]).contains("device node"));
    assert!(refused(&[(header("a/b", b'2', 0, "../../etc/shadow"), b"")]).contains("climbs out"));
    assert!(refused(&[(header("a", b'2', 0, "/../etc"), b"")]).contains("climbs out"));
    assert!(refused(&[(header("a", b'1', 0, "../x"), b"")]).contains("hard link"));
    assert!(refused(&[(header("s", b'S', 0, ""), b"")]).contains("sparse"));
    assert!(refused(&[(header("x", b'Z', 0, ""), b"")]).contains("unknown entry type"));
    // An extension header too big to hold in memory, refused before it is read.
    assert!(
        refused(&[(header("././@PaxHeader", b'x', MAX_EXTENSION + 1, ""), b"")])
            .contains("extension header")
    );
    // A GNU long name longer than any path.
    let long = vec![b'a'; MAX_PATH + 1];
    assert!(
        refused(&[
            (header("././@LongLink", b'L', long.len() as u64, ""), &long),
            (header("x", b'0', 0, ""), b"")
        ])
        .contains("path of")
    );
}

#[test]
fn symlinks_that_stay_inside_are_fine() {
    let raw = archive(&[
        (header("usr/lib/a", b'2', 0, "../../etc/x"), b""),
        (
            header("etc/localtime", b'2', 0, "/usr/share/zoneinfo/UTC"),
            b"",
        ),
        (header("lib", b'2', 0, "usr/lib"), b""),
    ]);
    assert_eq!(all(&raw).unwrap().len(), 3);
}

#[test]
fn corrupt_and_truncated_archives_are_malformed() {
    let mut h = header("a", b'0', 3, "");
    h[0] = b'b'; // the checksum no longer matches
    assert!(
        matches!(all(&archive(&[(h, b"abc")])), Err(TarError::Malformed(m)) if m.contains("checksum"))
    );
    let mut raw = archive(&[(header("a", b'0', 2000, ""), &[7u8; 2000])]);
    raw.truncate(1024);
    let mut r = Reader::new(&raw[..]);
    r.next_record().unwrap();
    assert!(matches!(
        r.copy_data(&mut Vec::new()),
        Err(TarError::Malformed(_))
    ));
    assert!(matches!(
        all(b"not a tar archive at all, surely".repeat(20).as_slice()),
        Err(TarError::Malformed(_))
    ));
}
