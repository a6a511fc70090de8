//! Builds the agent protocol's `Inventory` from what the runtime reports.

use std::collections::BTreeSet;

use berth_proto::agent as pb;

use crate::cri::CriError;
use crate::runtime::{ImageRuntime, RuntimeVersion};

/// Reads every image, which of them containers use, and image filesystem
/// usage, into one `Inventory` with images sorted by ID. Images with a tag in
/// `managed` (references Berth pulled here) are marked managed.
pub async fn read<R: ImageRuntime>(
    rt: &R,
    managed: &BTreeSet<String>,
) -> Result<pb::Inventory, CriError> {
    let (images, in_use, fs) =
        tokio::try_join!(rt.list_images(), rt.images_in_use(), rt.fs_info())?;
    let mut images: Vec<pb::Image> = images
        .into_iter()
        .map(|i| pb::Image {
            in_use: in_use.contains(&i.id),
            managed: i
                .repo_tags
                .iter()
                .chain(&i.repo_digests)
                .any(|t| managed.contains(t)),
            id: i.id,
            repo_tags: i.repo_tags,
            repo_digests: i.repo_digests,
            size_bytes: i.size_bytes,
            pinned: i.pinned,
        })
        .collect();
    images.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(pb::Inventory {
        images,
        image_fs: Some(pb::FsUsage {
            mountpoint: fs.mountpoint,
            used_bytes: fs.used_bytes,
            inodes_used: fs.inodes_used,
        }),
        observed_at_unix_ms: now_ms(),
    })
}

/// True when two inventories differ in anything but the time they were read.
pub fn changed(a: &pb::Inventory, b: &pb::Inventory) -> bool {
    a.images != b.images
}

/// The runtime identity for `Hello`.
pub fn runtime_info(v: &RuntimeVersion, socket: &str) -> pb::RuntimeInfo {
    pb::RuntimeInfo {
        name: v.name.clone(),
        version: v.version.clone(),
        api_version: v.api_version.clone(),
        socket: socket.to_string(),
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::MemRuntime;
    use berth_proto::reference::Reference;

    #[tokio::test]
    async fn inventory_marks_images_used_by_containers() {
        let rt = MemRuntime::default();
        let a = rt.publish("r.io/a:1", 10);
        rt.publish("r.io/b:1", 20);
        rt.pull(&Reference::parse("r.io/a:1").unwrap(), None)
            .await
            .unwrap();
        rt.pull(&Reference::parse("r.io/b:1").unwrap(), None)
            .await
            .unwrap();
        rt.set_in_use(&a);
        let managed = BTreeSet::from(["r.io/b:1".to_string()]);
        let inv = read(&rt, &managed).await.unwrap();
        assert_eq!(inv.images.len(), 2);
        let used: Vec<_> = inv
            .images
            .iter()
            .filter(|i| i.in_use)
            .map(|i| i.id.clone())
            .collect();
        assert_eq!(used, vec![a]);
        assert_eq!(inv.image_fs.unwrap().used_bytes, 30);
        let managed: Vec<_> = inv
            .images
            .iter()
            .filter(|i| i.managed)
            .map(|i| i.repo_tags[0].clone())
            .collect();
        assert_eq!(managed, ["r.io/b:1"]);
    }
}
