//! The task runner over the in-memory runtime: joins, managed images,
//! removal only of what Berth alone pulled. Every wait for an update has a
//! deadline. (Log spans are tested in `tests/task_logs.rs`, a process of
//! their own.)

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use berth_proto::agent as pb;
use berth_proto::reference::Reference;
use tokio::sync::mpsc;

use super::*;
use crate::runtime::{ImageInfo, MemRuntime};

/// How long a test waits for a task to report before it fails.
const DEADLINE: Duration = Duration::from_secs(10);

fn pull_task(id: &str, image: &str) -> pb::Task {
    pb::Task {
        id: id.into(),
        kind: Some(pb::task::Kind::Pull(pb::PullTask {
            image: image.into(),
            ..Default::default()
        })),
    }
}

fn remove_task(id: &str, image: &str) -> pb::Task {
    pb::Task {
        id: id.into(),
        kind: Some(pb::task::Kind::Remove(pb::RemoveTask {
            image: image.into(),
        })),
    }
}

/// The next update that ends a task (Done or Failed), within [`DEADLINE`].
async fn finished(rx: &mut mpsc::UnboundedReceiver<pb::TaskUpdate>) -> pb::TaskUpdate {
    let next = async {
        loop {
            match rx.recv().await {
                Some(u) if u.state == pb::TaskState::Accepted as i32 => continue,
                Some(u) => return u,
                None => panic!("the runner's update channel closed before the task finished"),
            }
        }
    };
    tokio::time::timeout(DEADLINE, next)
        .await
        .unwrap_or_else(|_| {
            panic!("no task finished within {DEADLINE:?}: a task hung or never reported")
        })
}

fn runner(
    rt: &Arc<MemRuntime>,
) -> (
    TaskRunner<MemRuntime>,
    mpsc::UnboundedReceiver<pb::TaskUpdate>,
) {
    TaskRunner::new(rt.clone(), "node-a", 2, Managed::load(None))
}

fn r(s: &str) -> Reference {
    Reference::parse(s).unwrap()
}

#[tokio::test]
async fn a_resent_pull_joins_the_running_one_instead_of_pulling_twice() {
    let rt = Arc::new(MemRuntime::default());
    rt.publish("r.io/a:1", 1);
    let (runner, mut rx) = TaskRunner::new(rt.clone(), "node-a", 1, Managed::load(None));
    runner.submit(pull_task("t1", "r.io/a:1"));
    runner.submit(pull_task("t2", "r.io/a:1"));
    let mut done = vec![
        finished(&mut rx).await.task_id,
        finished(&mut rx).await.task_id,
    ];
    done.sort();
    assert_eq!(done, ["t1", "t2"]);
    assert_eq!(rt.pulls(), 1);
    assert!(runner.managed().contains("r.io/a:1"));
}

#[tokio::test]
async fn an_image_present_before_berth_is_not_managed_and_not_removed() {
    let rt = Arc::new(MemRuntime::default());
    rt.publish("r.io/a:1", 1);
    rt.pull(&r("r.io/a:1"), None).await.unwrap();
    let (runner, mut rx) = runner(&rt);
    runner.submit(pull_task("t1", "r.io/a:1"));
    assert_eq!(finished(&mut rx).await.state, pb::TaskState::Done as i32);
    assert!(!runner.managed().contains("r.io/a:1"));
    runner.submit(remove_task("t2", "r.io/a:1"));
    let u = finished(&mut rx).await;
    assert_eq!(u.reason, pb::FailureReason::NotManaged as i32);
    assert_eq!(rt.list_images().await.unwrap().len(), 1);
}

#[tokio::test]
async fn an_image_a_container_uses_is_never_removed() {
    let rt = Arc::new(MemRuntime::default());
    let id = rt.publish("r.io/a:1", 1);
    let (runner, mut rx) = runner(&rt);
    runner.submit(pull_task("t1", "r.io/a:1"));
    finished(&mut rx).await;
    rt.set_in_use(&id);
    runner.submit(remove_task("t2", "r.io/a:1"));
    assert_eq!(
        finished(&mut rx).await.reason,
        pb::FailureReason::InUse as i32
    );
    assert_eq!(rt.list_images().await.unwrap().len(), 1);
}

#[tokio::test]
async fn pull_failures_carry_their_reason_and_managed_images_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Arc::new(MemRuntime::default());
    rt.publish("r.io/a:1", 1);
    let (runner, mut rx) = TaskRunner::new(
        rt.clone(),
        "node-a",
        2,
        Managed::load(Some(dir.path().into())),
    );
    runner.submit(pull_task("t1", "r.io/missing:1"));
    assert_eq!(
        finished(&mut rx).await.reason,
        pb::FailureReason::ImageNotFound as i32
    );
    runner.submit(pull_task("t2", "r.io/a:1"));
    finished(&mut rx).await;
    let reloaded = Managed::load(Some(dir.path().into()));
    assert!(reloaded.contains("r.io/a:1"));
    runner.submit(remove_task("t3", "r.io/a:1"));
    assert_eq!(finished(&mut rx).await.state, pb::TaskState::Done as i32);
    assert!(!Managed::load(Some(dir.path().into())).contains("r.io/a:1"));
}

#[tokio::test]
async fn an_image_also_tagged_by_someone_else_is_kept_until_that_tag_is_gone() {
    let rt = Arc::new(MemRuntime::default());
    let id = rt.publish("r.io/app:1.2", 1);
    rt.publish_alias("r.io/app:prod", "r.io/app:1.2");
    let (runner, mut rx) = runner(&rt);
    runner.submit(pull_task("t1", "r.io/app:1.2"));
    assert_eq!(finished(&mut rx).await.state, pb::TaskState::Done as i32);
    // A user pulls another tag of the same image, outside Berth.
    rt.pull(&r("r.io/app:prod"), None).await.unwrap();

    runner.submit(remove_task("t2", "r.io/app:1.2"));
    let u = finished(&mut rx).await;
    assert_eq!(
        (u.state, u.reason),
        (
            pb::TaskState::Failed as i32,
            pb::FailureReason::SharedImage as i32
        ),
        "{u:?}"
    );
    assert!(
        u.message.contains("r.io/app:prod") && u.message.contains(&id),
        "the message names the other reference and the image: {}",
        u.message
    );
    let image = rt.image_status(&r("r.io/app:1.2")).await.unwrap().unwrap();
    assert_eq!(image.repo_tags, ["r.io/app:1.2", "r.io/app:prod"]);
    assert!(
        runner.managed().contains("r.io/app:1.2"),
        "still Berth's to remove later"
    );

    rt.remove_reference("r.io/app:prod");
    runner.submit(remove_task("t3", "r.io/app:1.2"));
    assert_eq!(finished(&mut rx).await.state, pb::TaskState::Done as i32);
    assert!(rt.list_images().await.unwrap().is_empty());
    assert!(!runner.managed().contains("r.io/app:1.2"));
}

#[tokio::test]
async fn a_tag_in_another_repository_counts_as_someone_elses_reference() {
    let rt = Arc::new(MemRuntime::default());
    rt.publish("r.io/app:1.2", 1);
    rt.publish_alias("other.io/mirror/app:1.2", "r.io/app:1.2");
    let (runner, mut rx) = runner(&rt);
    runner.submit(pull_task("t1", "r.io/app:1.2"));
    finished(&mut rx).await;
    rt.pull(&r("other.io/mirror/app:1.2"), None).await.unwrap();
    runner.submit(remove_task("t2", "r.io/app:1.2"));
    let u = finished(&mut rx).await;
    assert_eq!(u.reason, pb::FailureReason::SharedImage as i32, "{u:?}");
    assert!(
        u.message.contains("other.io/mirror/app:1.2"),
        "{}",
        u.message
    );
    assert_eq!(rt.list_images().await.unwrap().len(), 1);
}

#[tokio::test]
async fn an_image_whose_every_reference_berth_pulled_is_removed_with_all_of_them() {
    let rt = Arc::new(MemRuntime::default());
    rt.publish("r.io/app:1.2", 1);
    rt.publish_alias("r.io/app:latest", "r.io/app:1.2");
    let (runner, mut rx) = runner(&rt);
    runner.submit(pull_task("t1", "r.io/app:1.2"));
    runner.submit(pull_task("t2", "r.io/app:latest"));
    finished(&mut rx).await;
    finished(&mut rx).await;
    runner.submit(remove_task("t3", "r.io/app:1.2"));
    assert_eq!(finished(&mut rx).await.state, pb::TaskState::Done as i32);
    assert!(rt.list_images().await.unwrap().is_empty());
    assert!(
        runner.managed().all().is_empty(),
        "both tags went with the image, so neither is managed any more"
    );
}

#[tokio::test]
async fn a_pull_cut_off_by_a_runtime_restart_fails_with_a_clear_reason_and_is_not_held() {
    let rt = Arc::new(MemRuntime::default());
    rt.publish("r.io/big:1", 1);
    rt.set_pull_delay(Duration::from_secs(3600));
    let (runner, mut rx) = runner(&rt);
    runner.submit(pull_task("t1", "r.io/big:1"));
    tokio::time::timeout(DEADLINE, async {
        while rt.pulls() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the pull reaches the runtime");

    rt.set_down(true);
    let u = finished(&mut rx).await;
    assert_eq!(
        (u.state, u.reason),
        (
            pb::TaskState::Failed as i32,
            pb::FailureReason::RuntimeError as i32
        ),
        "{u:?}"
    );
    assert!(
        u.message.contains("unavailable") && u.message.contains("restarting"),
        "the message says the runtime went away: {}",
        u.message
    );
    assert!(!runner.managed().contains("r.io/big:1"));

    // Back up: the coordinator's retry pulls it, and only now is it held.
    rt.set_down(false);
    rt.set_pull_delay(Duration::ZERO);
    assert!(rt.image_status(&r("r.io/big:1")).await.unwrap().is_none());
    runner.submit(pull_task("t2", "r.io/big:1"));
    assert_eq!(finished(&mut rx).await.state, pb::TaskState::Done as i32);
    assert!(runner.managed().contains("r.io/big:1"));
}

fn image(tags: &[&str], digests: &[&str]) -> ImageInfo {
    ImageInfo {
        id: "sha256:1".into(),
        repo_tags: tags.iter().map(|s| s.to_string()).collect(),
        repo_digests: digests.iter().map(|s| s.to_string()).collect(),
        size_bytes: 1,
        pinned: false,
    }
}

fn set(refs: &[&str]) -> BTreeSet<String> {
    refs.iter().map(|s| s.to_string()).collect()
}

#[test]
fn foreign_references_are_the_tags_and_digests_berth_did_not_pull() {
    let d = "sha256:".to_string() + &"a".repeat(64);
    let app_digest = format!("r.io/app@{d}");
    let other_digest = format!("r.io/other@{d}");
    let managed = set(&["r.io/app:1.2"]);
    let cases: [(&str, ImageInfo, Vec<String>); 4] = [
        (
            "only the managed tag and its repository's digest",
            image(&["r.io/app:1.2"], &[&app_digest]),
            vec![],
        ),
        (
            "a second tag in the same repository",
            image(&["r.io/app:1.2", "r.io/app:prod"], &[&app_digest]),
            vec!["r.io/app:prod".into()],
        ),
        (
            "a tag in another repository brings that repository's digest",
            image(
                &["r.io/app:1.2", "r.io/other:x"],
                &[&app_digest, &other_digest],
            ),
            vec!["r.io/other:x".into(), other_digest.clone()],
        ),
        (
            "a digest reference of another repository without a tag",
            image(&["r.io/app:1.2"], &[&app_digest, &other_digest]),
            vec![other_digest.clone()],
        ),
    ];
    for (what, image, want) in cases {
        assert_eq!(foreign_references(&image, &managed), want, "{what}");
    }
    assert!(
        foreign_references(
            &image(&["busybox:1"], &[]),
            &set(&["docker.io/library/busybox:1"])
        )
        .is_empty(),
        "references are compared in their normalised form"
    );
}
