use std::collections::BTreeMap;

use super::*;
use crate::backup::crd::{BackupPolicySpec, BackupTarget, Namespaces, Rewrite, WorkloadKind};
use crate::backup::crd::{OPT_OUT, ORIGINAL_IMAGES, RESTORE};

const OWN: &str = "berth-system";

fn policy(name: &str, ns: &[&str]) -> Arc<BackupPolicy> {
    Arc::new(BackupPolicy::new(
        name,
        BackupPolicySpec {
            target: BackupTarget {
                registry: "backup.example/keep".into(),
                credentials_secret: None,
            },
            namespaces: Some(Namespaces {
                include: ns.iter().map(|n| n.to_string()).collect(),
                exclude: vec![],
            }),
            ..Default::default()
        },
    ))
}

fn workload(ns: &str, name: &str, images: &[&str], ready: bool) -> Workload {
    Workload {
        kind: WorkloadKind::Deployment,
        namespace: ns.into(),
        name: name.into(),
        resource_version: "1".into(),
        ready,
        annotations: BTreeMap::new(),
        containers: images
            .iter()
            .enumerate()
            .map(|(i, img)| (false, format!("c{i}"), img.to_string()))
            .collect(),
        pull_secrets: vec![],
        service_account: "default".into(),
    }
}

fn normal(image: &str) -> String {
    Reference::parse(image).unwrap().to_string()
}

fn done(b: &ImageBackup, digest: &str) -> Arc<ImageBackup> {
    let mut b = b.clone();
    b.status = Some(ImageBackupStatus {
        phase: "Done".into(),
        digest: Some(digest.into()),
        ..Default::default()
    });
    Arc::new(b)
}

fn by_name(list: Vec<ImageBackup>) -> HashMap<String, Arc<ImageBackup>> {
    list.into_iter()
        .map(|b| (b.name_any(), Arc::new(b)))
        .collect()
}

#[test]
fn ten_workloads_sharing_an_image_make_one_image_backup_listing_all_ten() {
    let p = [policy("p", &["team"])];
    let w: Vec<Workload> = (0..10)
        .map(|i| workload("team", &format!("w{i}"), &["nginx:1.14.0"], true))
        .collect();
    let s = survey(&p, &w, OWN);
    assert_eq!(s.uses.len(), 1);
    assert_eq!(s.uses[&normal("nginx:1.14.0")].users.len(), 10);
    let create = to_create(&s, &HashMap::new());
    assert_eq!(create.len(), 1);
    assert_eq!(
        create[0].spec.target,
        "backup.example/keep/library_nginx:1.14.0"
    );
    assert!(
        to_create(&s, &by_name(create)).is_empty(),
        "an existing one is not made again"
    );
}

#[test]
fn opted_out_unready_and_uncovered_workloads_produce_nothing() {
    let p = [policy("p", &["team"])];
    let mut out = workload("team", "mine", &["a.example/x:1"], true);
    out.annotations.insert(OPT_OUT.into(), "false".into());
    let w = [
        out,
        workload("team", "starting", &["a.example/y:1"], false),
        workload("other", "elsewhere", &["a.example/z:1"], true),
        workload("kube-system", "dns", &["a.example/z:1"], true),
    ];
    let s = survey(&p, &w, OWN);
    assert_eq!(
        s.uses.keys().collect::<Vec<_>>(),
        [&normal("a.example/y:1")]
    );
    assert!(
        to_create(&s, &HashMap::new()).is_empty(),
        "not ready: no copy yet"
    );
}

#[test]
fn a_rolled_workload_still_uses_its_original_image_and_a_restore_is_listed() {
    let p = [policy("p", &["team"])];
    let mut rolled = workload("team", "web", &["backup.example/keep/x:1"], true);
    rolled.annotations.insert(
        ORIGINAL_IMAGES.into(),
        r#"{"containers":{"c0":"a.example/x:1"}}"#.into(),
    );
    let mut restoring = rolled.clone();
    restoring.name = "undo".into();
    restoring.annotations.insert(RESTORE.into(), "true".into());
    let s = survey(&p, &[rolled, restoring], OWN);
    assert_eq!(
        s.uses[&normal("a.example/x:1")]
            .users
            .iter()
            .collect::<Vec<_>>(),
        ["Deployment/team/web"]
    );
    assert_eq!(s.restores, [1]);
}

#[test]
fn the_first_policy_by_order_covers_a_workload() {
    let p = [policy("a", &["team"]), policy("b", &["team", "other"])];
    let s = survey(
        &p,
        &[
            workload("team", "w", &["x:1"], true),
            workload("other", "v", &["y:1"], true),
        ],
        OWN,
    );
    assert_eq!(s.uses[&normal("x:1")].policy.name_any(), "a");
    assert_eq!(s.uses[&normal("y:1")].policy.name_any(), "b");
}

#[test]
fn a_workload_rolls_only_once_every_image_is_done_and_keeps_its_originals() {
    let p = policy("p", &["team"]);
    let w = workload("team", "web", &["a.example/x:1"], true);
    let w2 = workload("team", "two", &["a.example/x:1", "a.example/y:2"], true);
    let s = survey(std::slice::from_ref(&p), &[w.clone(), w2.clone()], OWN);
    let created = to_create(&s, &HashMap::new());
    let x = created
        .iter()
        .find(|b| b.spec.source == normal("a.example/x:1"))
        .unwrap();
    let mut backups = HashMap::new();
    backups.insert(x.name_any(), done(x, "sha256:aaa"));
    // `two` also needs y, not copied yet.
    assert_eq!(rollout(&w2, &p, &backups), Roll::Wait);
    let Roll::Patch {
        checks,
        images,
        originals,
    } = rollout(&w, &p, &backups)
    else {
        panic!("web should roll")
    };
    assert_eq!(
        checks,
        [Check {
            reference: "backup.example/keep/x:1".into(),
            digest: "sha256:aaa".into()
        }]
    );
    assert_eq!(
        images,
        [(
            false,
            "c0".to_string(),
            "backup.example/keep/x:1".to_string()
        )]
    );
    assert_eq!(originals.containers["c0"], "a.example/x:1");
}

#[test]
fn digest_rewrites_name_the_verified_digest() {
    let mut spec = policy("p", &["team"]).spec.clone();
    spec.rewrite = Rewrite::Digest;
    let p = BackupPolicy::new("p", spec);
    let w = workload("team", "web", &["a.example/x:1"], true);
    let s = survey(&[Arc::new(p.clone())], std::slice::from_ref(&w), OWN);
    let b = &to_create(&s, &HashMap::new())[0];
    let backups = HashMap::from([(b.name_any(), done(b, "sha256:bbb"))]);
    let Roll::Patch { images, .. } = rollout(&w, &p, &backups) else {
        panic!()
    };
    assert_eq!(images[0].2, "backup.example/keep/x@sha256:bbb");
}

#[test]
fn a_workload_on_its_copies_has_nothing_to_roll() {
    let p = policy("p", &["team"]);
    let w = workload("team", "web", &["backup.example/keep/x:1"], true);
    assert_eq!(rollout(&w, &p, &HashMap::new()), Roll::Wait);
}

#[test]
fn failures_retry_with_backoff_and_stop_after_the_last_attempt() {
    let now = Timestamp::now();
    let mut b = ImageBackup::new("b", ImageBackupSpec::default());
    assert!(due(&b, now), "never tried");
    b.status = Some(ImageBackupStatus {
        phase: "Failed".into(),
        attempts: 1,
        finished_at: Some(now.to_string()),
        ..Default::default()
    });
    assert!(!due(&b, now), "within its backoff");
    assert!(
        due(&b, now + SignedDuration::from_secs(120)),
        "after its backoff"
    );
    b.status.as_mut().unwrap().attempts = MAX_ATTEMPTS;
    assert!(
        !due(&b, now + SignedDuration::from_secs(3600)),
        "out of attempts"
    );
    b.status.as_mut().unwrap().phase = "Done".into();
    assert!(!due(&b, now));
}

#[test]
fn finished_backups_expire_only_once_unused_for_expire_after() {
    let now = Timestamp::now();
    let mut spec = policy("p", &["team"]).spec.clone();
    spec.expire_after = Some("1h".into());
    let p = BackupPolicy::new("p", spec);
    let mut b = ImageBackup::new("b", ImageBackupSpec::default());
    let status = ImageBackupStatus::default();
    // Nobody uses it from now on.
    let (users, since) = users_update(&status, None, now).unwrap();
    assert!(users.is_empty());
    b.status = Some(ImageBackupStatus {
        phase: "Done".into(),
        unused_since: since,
        ..Default::default()
    });
    assert!(!expired(&b, &p, now + SignedDuration::from_secs(59 * 60)));
    assert!(expired(&b, &p, now + SignedDuration::from_secs(61 * 60)));
    // Used again: no longer unused.
    let users = BTreeSet::from(["Deployment/team/web".to_string()]);
    let (list, since) = users_update(b.status.as_ref().unwrap(), Some(&users), now).unwrap();
    assert_eq!((list.len(), since), (1, None));
    b.status.as_mut().unwrap().phase = "Copying".into();
    assert!(
        !expired(&b, &p, now + SignedDuration::from_secs(86400)),
        "never while copying"
    );
}
