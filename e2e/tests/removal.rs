//! The agent's remove task against the real containerd of a local cluster
//! node: Berth's own task runner over Berth's CRI client, checked through a
//! separate raw CRI client (`Cluster::cri`).
//!
//! containerd's CRI RemoveImage deletes an image with every reference it
//! carries, so an image Berth cached that a user also pulled under another
//! tag must stay until the user's tag is gone; then Berth removes it.

use std::sync::Arc;
use std::time::Duration;

use berth_e2e::{Cluster, eventually};
use berth_node_agent::cri::CriRuntime;
use berth_node_agent::tasks::{Managed, TaskRunner};
use berth_node_agent::testing::missing_prerequisite;
use berth_proto::agent as pb;
use k8s_cri::v1 as cri;
use tokio::sync::mpsc;

/// How long a pull or remove task may take to report.
const TASK_DEADLINE: Duration = Duration::from_secs(120);

fn task(id: &str, kind: pb::task::Kind) -> pb::Task {
    pb::Task {
        id: id.into(),
        kind: Some(kind),
    }
}

fn pull(id: &str, image: &str) -> pb::Task {
    task(
        id,
        pb::task::Kind::Pull(pb::PullTask {
            image: image.into(),
            ..Default::default()
        }),
    )
}

fn remove(id: &str, image: &str) -> pb::Task {
    task(
        id,
        pb::task::Kind::Remove(pb::RemoveTask {
            image: image.into(),
        }),
    )
}

/// The update that ends task `id`, within [`TASK_DEADLINE`].
async fn outcome(rx: &mut mpsc::UnboundedReceiver<pb::TaskUpdate>, id: &str) -> pb::TaskUpdate {
    let wait = async {
        loop {
            let u = rx.recv().await.expect("the task runner is alive");
            if u.task_id == id && u.state != pb::TaskState::Accepted as i32 {
                return u;
            }
        }
    };
    tokio::time::timeout(TASK_DEADLINE, wait)
        .await
        .unwrap_or_else(|_| panic!("task {id} did not finish within {TASK_DEADLINE:?}"))
}

/// The image `reference` names on `node`, straight from CRI ImageStatus.
async fn cri_image(c: &Cluster, node: &str, reference: &str) -> Option<cri::Image> {
    c.cri(node)
        .await
        .unwrap()
        .image_status(cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: reference.into(),
                ..Default::default()
            }),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .image
}

/// Drops one reference in the node's containerd (`ctr images rm`): CRI has no
/// call that removes a single tag.
fn ctr_remove_reference(c: &Cluster, node: &str, reference: &str) {
    let socket = c.node_socket(node);
    let out = std::process::Command::new(c.tool("ctr"))
        .arg("--address")
        .arg(&socket)
        .args(["--namespace", "k8s.io", "images", "rm", reference])
        .output()
        .expect("running ctr");
    assert!(
        out.status.success(),
        "ctr images rm {reference}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_cached_image_another_tag_shares_is_kept_until_that_tag_is_gone() {
    let c = Cluster::from_env().await.unwrap();
    if !c.local {
        return missing_prerequisite("needs the local cluster's node sockets and registry");
    }
    let node = c.nodes[0].clone();
    // A brand-new image, and a second tag of it in the same repository: the
    // user's `app:prod` beside Berth's `app:1.2`.
    let cached = c.fresh_image("removal-app").await.unwrap();
    let foreign = format!("{cached}-prod");
    c.retag_image(&cached, &foreign).await.unwrap();

    let rt = CriRuntime::connect(c.node_socket(&node)).await.unwrap();
    let (runner, mut rx) = TaskRunner::new(Arc::new(rt), &node, 1, Managed::load(None));
    runner.submit(pull("pull", &cached));
    let pulled = outcome(&mut rx, "pull").await;
    assert_eq!(pulled.state, pb::TaskState::Done as i32, "{pulled:?}");
    assert!(runner.managed().contains(&cached));

    // The user pulls the other tag straight through CRI.
    c.cri(&node)
        .await
        .unwrap()
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: foreign.clone(),
                ..Default::default()
            }),
            auth: None,
            sandbox_config: None,
        })
        .await
        .unwrap();
    let image = cri_image(&c, &node, &foreign)
        .await
        .expect("user's tag pulled");
    assert_eq!(image.id, pulled.image_id, "one image under both tags");
    assert!(image.repo_tags.contains(&cached), "{:?}", image.repo_tags);

    runner.submit(remove("refused", &cached));
    let refused = outcome(&mut rx, "refused").await;
    assert_eq!(
        (refused.state, refused.reason),
        (
            pb::TaskState::Failed as i32,
            pb::FailureReason::SharedImage as i32
        ),
        "{refused:?}"
    );
    assert!(
        refused.message.contains(&foreign),
        "the message names the user's tag: {}",
        refused.message
    );
    assert!(
        cri_image(&c, &node, &cached).await.is_some(),
        "Berth's tag stays"
    );
    assert!(
        cri_image(&c, &node, &foreign).await.is_some(),
        "the user's tag stays"
    );

    // The user's tag goes; containerd's CRI learns it from containerd's events.
    ctr_remove_reference(&c, &node, &foreign);
    eventually(
        Duration::from_secs(30),
        "CRI to forget the user's tag",
        || async { Ok(cri_image(&c, &node, &foreign).await.is_none().then_some(())) },
    )
    .await
    .unwrap();
    assert!(
        cri_image(&c, &node, &cached).await.is_some(),
        "Berth's tag is untouched by the user's removal"
    );

    runner.submit(remove("removed", &cached));
    let removed = outcome(&mut rx, "removed").await;
    assert_eq!(removed.state, pb::TaskState::Done as i32, "{removed:?}");
    assert!(cri_image(&c, &node, &cached).await.is_none());
    assert!(
        !c.cri_image_ids(&node)
            .await
            .unwrap()
            .contains(&pulled.image_id),
        "the image is gone from the node"
    );
    assert!(!runner.managed().contains(&cached));
}
