//! Berth's CRI client against the real containerd of a local cluster node and
//! the real registries: pulls, presence, removal, and each registry failure
//! classified as the operator needs to see it.

use berth_e2e::Cluster;
use berth_node_agent::cri::{CriError, CriRuntime};
use berth_node_agent::runtime::{ImageRuntime, RegistryAuth};
use berth_proto::reference::Reference;

/// These tests dial a node's socket from the host: local cluster only.
macro_rules! local_cluster {
    () => {{
        let c = Cluster::from_env().await.unwrap();
        if !c.local {
            berth_e2e::missing_prerequisite(
                "the containerd suite dials node sockets from the host: local cluster only",
            );
            return;
        }
        c
    }};
}

async fn node_runtime(c: &Cluster) -> CriRuntime {
    CriRuntime::connect(c.node_socket(&c.nodes[0]))
        .await
        .unwrap()
}

fn r(s: &str) -> Reference {
    Reference::parse(s).unwrap()
}

#[tokio::test]
async fn containerd_answers_version_and_image_filesystem_usage() {
    let c = local_cluster!();
    let cri = node_runtime(&c).await;
    let v = cri.version().await.unwrap();
    assert_eq!(v.name, "containerd");
    let fs = cri.fs_info().await.unwrap();
    assert!(fs.used_bytes > 0 && !fs.mountpoint.is_empty(), "{fs:?}");
}

#[tokio::test]
async fn pull_status_list_and_remove_against_containerd() {
    let c = local_cluster!();
    let cri = node_runtime(&c).await;
    let image = r(&c.fresh_image("cri").await.unwrap());
    assert!(cri.image_status(&image).await.unwrap().is_none());
    let id = cri.pull(&image, None).await.unwrap();
    assert!(id.starts_with("sha256:"));
    let status = cri.image_status(&image).await.unwrap().unwrap();
    assert_eq!(status.id, id);
    assert!(cri.list_images().await.unwrap().iter().any(|i| i.id == id));
    assert!(
        c.cri_has_image(&c.nodes[0], &image.to_string())
            .await
            .unwrap()
    );
    cri.remove(&id).await.unwrap();
    assert!(
        !c.cri_has_image(&c.nodes[0], &image.to_string())
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn a_tag_the_registry_lacks_is_image_not_found() {
    let c = local_cluster!();
    let cri = node_runtime(&c).await;
    let err = cri
        .pull(&r(&format!("{}/test/a:no-such-tag", c.registry())), None)
        .await
        .unwrap_err();
    assert!(matches!(err, CriError::ImageNotFound { .. }), "{err}");
}

#[tokio::test]
async fn a_registry_nobody_listens_on_is_unreachable() {
    let c = local_cluster!();
    let cri = node_runtime(&c).await;
    // The harness's bridge address, on a port with no server.
    let host = c.registry().split(':').next().unwrap().to_string();
    let err = cri
        .pull(&r(&format!("{host}:5999/test/a:1")), None)
        .await
        .unwrap_err();
    assert!(matches!(err, CriError::RegistryUnreachable { .. }), "{err}");
}

#[tokio::test]
async fn the_private_registry_refuses_missing_or_wrong_credentials_and_takes_right_ones() {
    let c = local_cluster!();
    let cri = node_runtime(&c).await;
    let image = r(&c.fresh_private_image("cri").await.unwrap());

    let err = cri.pull(&image, None).await.unwrap_err();
    assert!(matches!(err, CriError::AuthRefused { .. }), "{err}");
    let wrong = RegistryAuth {
        username: c.var("BERTH_AUTH_USER").into(),
        password: "wrong".into(),
    };
    let err = cri.pull(&image, Some(&wrong)).await.unwrap_err();
    assert!(matches!(err, CriError::AuthRefused { .. }), "{err}");
    assert!(err.to_string().contains("check the credentials"));

    let right = RegistryAuth {
        username: c.var("BERTH_AUTH_USER").into(),
        password: c.var("BERTH_AUTH_PASSWORD").into(),
    };
    cri.pull(&image, Some(&right)).await.unwrap();
    assert!(
        c.cri_has_image(&c.nodes[0], &image.to_string())
            .await
            .unwrap()
    );
    cri.remove(&image.to_string()).await.unwrap();
}
