//! `Containers/Upload`: files copied into a container that is not running
//! (`docker cp` before start, testcontainers' copy-to-container). A pod's
//! filesystem exists only while it runs, so the files are kept in a
//! ConfigMap the container's record owns, and every later run mounts each
//! one read-only at its path (a `subPath` mount of one key, which leaves
//! the rest of the directory as the image has it).
//!
//! [`read_tar`] is the untrusted part: only regular files are taken, their
//! names joined to the destination with no `..`, within [`MAX_UPLOAD`].

use std::collections::BTreeMap;

use berth_proto::api as pb;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, KeyToPath, Volume, VolumeMount,
};
use kube::api::ObjectMeta;

use super::record::Record;

/// Label on the ConfigMaps of copied files: the container's short ID. Not
/// [`super::record::CONTAINER_LABEL`], so that the namespace's mirror of
/// records does not hold every file copied in.
pub const UPLOAD_LABEL: &str = "berth.dev/upload-of";

/// Most bytes of files one upload carries (a ConfigMap holds at most 1 MiB,
/// base64 included).
pub const MAX_UPLOAD: u64 = 700 << 10;

/// A file read from an uploaded tar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    /// Absolute, normalised path in the container.
    pub path: String,
    /// Permission bits.
    pub mode: u32,
    /// Contents.
    pub data: Vec<u8>,
}

/// Why an upload is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UploadError {
    /// The destination is not an absolute path.
    #[error("the destination {0:?} must be an absolute directory")]
    Destination(String),
    /// The body does not read as a tar.
    #[error("the archive is not a readable tar: {0}")]
    Tar(String),
    /// An entry Berth cannot place before the container runs.
    #[error("{path}: {why}")]
    Entry {
        /// The entry's name in the tar.
        path: String,
        /// Why.
        why: String,
    },
    /// Over [`MAX_UPLOAD`].
    #[error(
        "the files come to more than {MAX_UPLOAD} bytes, which Berth keeps for a container that is not running; start it and copy then"
    )]
    TooLarge,
    /// No regular file in the tar.
    #[error("the archive holds no regular file to copy")]
    Empty,
    /// One copied file would sit inside another.
    #[error("{0} and {1}: a copied file cannot also be a directory")]
    Conflict(String, String),
    /// Too many files kept for one container.
    #[error("a container keeps at most {MAX_FILES} files copied before it runs")]
    TooMany,
}

/// Most files kept for one container (each is a mount).
pub const MAX_FILES: usize = 256;

/// Refuses a set of kept files no pod could mount: too many, or a file
/// that another one's path goes through.
pub fn check_paths(files: &[pb::UploadedFile]) -> Result<(), UploadError> {
    if files.len() > MAX_FILES {
        return Err(UploadError::TooMany);
    }
    for a in files {
        for b in files {
            if b.path.starts_with(&format!("{}/", a.path)) {
                return Err(UploadError::Conflict(a.path.clone(), b.path.clone()));
            }
        }
    }
    Ok(())
}

/// `dest` joined with `name`, normalised; `None` if a component is `..`.
fn join(dest: &str, name: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in dest.split('/').chain(name.split('/')) {
        match c {
            "" | "." => {}
            ".." => return None,
            c => parts.push(c),
        }
    }
    Some(format!("/{}", parts.join("/")))
}

/// The regular files of `tar`, placed under `dest`.
pub fn read_tar(dest: &str, tar: &[u8]) -> Result<Vec<File>, UploadError> {
    if !dest.starts_with('/') {
        return Err(UploadError::Destination(dest.to_string()));
    }
    let mut archive = tar::Archive::new(tar);
    let mut files: Vec<File> = Vec::new();
    let mut total = 0u64;
    let entries = archive
        .entries()
        .map_err(|e| UploadError::Tar(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| UploadError::Tar(e.to_string()))?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let refuse = |why: &str| UploadError::Entry {
            path: name.clone(),
            why: why.to_string(),
        };
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {}
            tar::EntryType::Directory => continue,
            tar::EntryType::Symlink | tar::EntryType::Link => {
                return Err(refuse(
                    "links cannot be copied into a container before it runs; start it first",
                ));
            }
            other => {
                return Err(refuse(&format!(
                    "only regular files can be copied into a container before it runs, not {other:?}"
                )));
            }
        }
        let path = join(dest, &name).ok_or_else(|| refuse("a name with '..' is refused"))?;
        if path == "/" {
            return Err(refuse("a file needs a name"));
        }
        // The entry's size as the reader sees it (a PAX record may set it).
        let size = entry.size();
        total = total.saturating_add(size);
        if total > MAX_UPLOAD {
            return Err(UploadError::TooLarge);
        }
        let mode = entry
            .header()
            .mode()
            .map_err(|e| UploadError::Tar(e.to_string()))?
            & 0o777;
        let mut data = Vec::with_capacity(size as usize);
        std::io::Read::read_to_end(&mut entry, &mut data)
            .map_err(|e| UploadError::Tar(e.to_string()))?;
        files.retain(|f| f.path != path);
        files.push(File { path, mode, data });
    }
    if files.is_empty() {
        return Err(UploadError::Empty);
    }
    Ok(files)
}

/// The ConfigMap holding one upload's files (`f0`, `f1`, … in order), owned
/// by the record, and the spec entries that mount them.
pub fn config_map_for(
    record: &Record,
    name: &str,
    files: &[File],
) -> (ConfigMap, Vec<pb::UploadedFile>) {
    let mut data = BTreeMap::new();
    let mut entries = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let key = format!("f{i}");
        data.insert(key.clone(), ByteString(f.data.clone()));
        entries.push(pb::UploadedFile {
            config_map: name.to_string(),
            key,
            path: f.path.clone(),
            mode: f.mode,
            size: f.data.len() as u64,
        });
    }
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(record.namespace.clone()),
            labels: Some(record.labels(UPLOAD_LABEL)),
            owner_references: Some(vec![record.owner()]),
            ..Default::default()
        },
        binary_data: Some(data),
        ..Default::default()
    };
    (cm, entries)
}

/// The spec's uploads after `new` ones: a path copied again is replaced.
pub fn merge(old: &[pb::UploadedFile], new: Vec<pb::UploadedFile>) -> Vec<pb::UploadedFile> {
    let mut out: Vec<pb::UploadedFile> = old
        .iter()
        .filter(|o| !new.iter().any(|n| n.path == o.path))
        .cloned()
        .collect();
    out.extend(new);
    out
}

/// The pod's volumes and the main container's mounts for the uploads.
pub fn mounts(uploads: &[pb::UploadedFile]) -> (Vec<Volume>, Vec<VolumeMount>) {
    let mut volumes: Vec<Volume> = Vec::new();
    let mut mounts = Vec::new();
    for u in uploads {
        let volume = format!("berth-{}", u.config_map);
        let item = KeyToPath {
            key: u.key.clone(),
            path: u.key.clone(),
            mode: Some(u.mode as i32),
        };
        match volumes.iter_mut().find(|v| v.name == volume) {
            Some(v) => {
                if let Some(cm) = v.config_map.as_mut() {
                    cm.items.get_or_insert_with(Vec::new).push(item);
                }
            }
            None => volumes.push(Volume {
                name: volume.clone(),
                config_map: Some(ConfigMapVolumeSource {
                    name: u.config_map.clone(),
                    items: Some(vec![item]),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
        mounts.push(VolumeMount {
            name: volume,
            mount_path: u.path.clone(),
            sub_path: Some(u.key.clone()),
            read_only: Some(true),
            ..Default::default()
        });
    }
    (volumes, mounts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, tar::EntryType, &[u8], u32)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data, mode) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(*mode);
            if *kind == tar::EntryType::Symlink {
                h.set_link_name("/etc/passwd").unwrap();
            }
            // Written raw, so that hostile names reach the reader as sent.
            let raw = &mut h.as_old_mut().name;
            raw[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn regular_files_land_under_the_destination_with_their_modes() {
        let t = tar_of(&[
            ("conf/", tar::EntryType::Directory, b"", 0o755),
            ("conf/app.yml", tar::EntryType::Regular, b"a: 1\n", 0o640),
            ("./run.sh", tar::EntryType::Regular, b"#!/bin/sh\n", 0o755),
        ]);
        let files = read_tar("/etc/app/", &t).unwrap();
        let got: Vec<(&str, u32)> = files.iter().map(|f| (f.path.as_str(), f.mode)).collect();
        assert_eq!(
            got,
            [("/etc/app/conf/app.yml", 0o640), ("/etc/app/run.sh", 0o755)]
        );
        assert_eq!(files[0].data, b"a: 1\n");
    }

    #[test]
    fn hostile_or_unplaceable_entries_are_refused_by_name() {
        let cases = [
            tar_of(&[("../../etc/shadow", tar::EntryType::Regular, b"x", 0o644)]),
            tar_of(&[("a/../../b", tar::EntryType::Regular, b"x", 0o644)]),
            tar_of(&[("link", tar::EntryType::Symlink, b"", 0o777)]),
            tar_of(&[("dev", tar::EntryType::Char, b"", 0o600)]),
        ];
        for t in &cases {
            let e = read_tar("/tmp", t).unwrap_err();
            assert!(matches!(e, UploadError::Entry { .. }), "{e}");
        }
        assert!(matches!(
            read_tar("tmp", &cases[0]),
            Err(UploadError::Destination(_))
        ));
        assert!(matches!(
            read_tar("/tmp", b"not a tar at all, really not"),
            Err(UploadError::Tar(_)) | Err(UploadError::Empty)
        ));
        let big = vec![0u8; MAX_UPLOAD as usize + 1];
        let t = tar_of(&[("big", tar::EntryType::Regular, &big, 0o644)]);
        assert_eq!(read_tar("/tmp", &t), Err(UploadError::TooLarge));
        let only_dirs = tar_of(&[("d/", tar::EntryType::Directory, b"", 0o755)]);
        assert_eq!(read_tar("/tmp", &only_dirs), Err(UploadError::Empty));
    }

    #[test]
    fn a_file_that_another_goes_through_is_refused() {
        let f = |path: &str| pb::UploadedFile {
            path: path.into(),
            ..Default::default()
        };
        assert!(check_paths(&[f("/a/b"), f("/a/c")]).is_ok());
        assert!(matches!(
            check_paths(&[f("/a"), f("/a/b")]),
            Err(UploadError::Conflict(..))
        ));
        let many: Vec<pb::UploadedFile> = (0..=MAX_FILES).map(|i| f(&format!("/f{i}"))).collect();
        assert_eq!(check_paths(&many), Err(UploadError::TooMany));
    }

    #[test]
    fn uploads_mount_each_file_by_sub_path_and_a_new_copy_replaces_an_old_one() {
        let f = |cm: &str, key: &str, path: &str| pb::UploadedFile {
            config_map: cm.into(),
            key: key.into(),
            path: path.into(),
            mode: 0o644,
            size: 1,
        };
        let merged = merge(
            &[f("u1", "f0", "/a"), f("u1", "f1", "/b")],
            vec![f("u2", "f0", "/b")],
        );
        assert_eq!(merged, [f("u1", "f0", "/a"), f("u2", "f0", "/b")]);
        let (volumes, mounts) = mounts(&merged);
        assert_eq!(volumes.len(), 2);
        assert_eq!(mounts[1].mount_path, "/b");
        assert_eq!(mounts[1].sub_path.as_deref(), Some("f0"));
        assert_eq!(mounts[1].read_only, Some(true));
        assert_eq!(volumes[1].config_map.as_ref().unwrap().name, "u2");
    }
}
