//! Credential choice and the verification cache, against the in-memory registry.

use super::*;
use crate::imagecache::tags::MemRegistry;
use std::sync::atomic::Ordering;

fn auth(user: &str) -> RegistryAuth {
    RegistryAuth {
        username: user.into(),
        password: format!("{user}-pw"),
    }
}

#[test]
fn a_cache_without_credentials_first_in_order_does_not_decide_the_pull() {
    let candidates = [None, Some("b")];
    assert_eq!(pick_credentials(&candidates, 0), Some("b"));
    // b's credentials were refused: the next attempt tries without.
    assert_eq!(pick_credentials(&candidates, 1), None);
    assert_eq!(pick_credentials(&candidates, 2), Some("b"));
}

#[test]
fn each_attempt_after_a_failure_moves_to_the_next_cache_s_credentials() {
    let candidates = [Some("wrong"), Some("wrong"), Some("right")];
    assert_eq!(pick_credentials(&candidates, 0), Some("wrong"));
    assert_eq!(pick_credentials(&candidates, 1), Some("right"));
    assert_eq!(pick_credentials::<&str>(&[], 0), None);
    assert_eq!(pick_credentials::<&str>(&[None, None], 3), None);
}

#[test]
fn only_images_wanted_with_different_credentials_are_checked() {
    let uses = [
        ("a/one".to_string(), "r/x:1".to_string(), 1),
        ("b/two".to_string(), "r/x:1".to_string(), 2),
        ("a/one".to_string(), "r/y:1".to_string(), 1),
        ("b/two".to_string(), "r/y:1".to_string(), 1),
        ("c/three".to_string(), "r/z:1".to_string(), 3),
    ];
    let want: BTreeSet<(String, String)> = [
        ("a/one".to_string(), "r/x:1".to_string()),
        ("b/two".to_string(), "r/x:1".to_string()),
    ]
    .into();
    assert_eq!(needing_check(&uses), want);
}

async fn settle(wake: &Notify) {
    tokio::time::timeout(Duration::from_secs(2), wake.notified())
        .await
        .expect("a verdict arrives");
}

#[tokio::test]
async fn a_cache_whose_own_secret_is_refused_is_denied_and_its_neighbour_allowed() {
    let reg = MemRegistry::default();
    reg.tags
        .lock()
        .unwrap()
        .insert("r.io/team/app:1".into(), "sha256:aa".into());
    reg.private
        .lock()
        .unwrap()
        .insert("r.io/team/app".into(), auth("good"));
    let wake = Arc::new(Notify::new());
    let checker = AccessChecker::new(reg.clone(), wake.clone());
    assert_eq!(
        checker.verdict("ns-a/c", "r.io/team/app:1", Some(auth("good"))),
        None
    );
    settle(&wake).await;
    assert_eq!(
        checker.verdict("ns-a/c", "r.io/team/app:1", Some(auth("good"))),
        Some(Verdict::Allowed)
    );
    assert_eq!(checker.verdict("ns-b/c", "r.io/team/app:1", None), None);
    settle(&wake).await;
    assert!(matches!(
        checker.verdict("ns-b/c", "r.io/team/app:1", None),
        Some(Verdict::Denied(_))
    ));
}

#[tokio::test]
async fn verdicts_are_kept_for_the_ttl_and_a_changed_secret_is_asked_again() {
    let reg = MemRegistry::default();
    reg.tags
        .lock()
        .unwrap()
        .insert("r.io/team/app:1".into(), "sha256:aa".into());
    reg.private
        .lock()
        .unwrap()
        .insert("r.io/team/app".into(), auth("good"));
    let wake = Arc::new(Notify::new());
    let checker = AccessChecker::new(reg.clone(), wake.clone());
    checker.verdict("ns/c", "r.io/team/app:1", Some(auth("bad")));
    settle(&wake).await;
    for _ in 0..20 {
        assert!(matches!(
            checker.verdict("ns/c", "r.io/team/app:1", Some(auth("bad"))),
            Some(Verdict::Denied(_))
        ));
    }
    assert_eq!(reg.calls.load(Ordering::Relaxed), 1, "one question per TTL");
    // The Secret is fixed: new credentials, a new question, a new verdict.
    assert_eq!(
        checker.verdict("ns/c", "r.io/team/app:1", Some(auth("good"))),
        None
    );
    settle(&wake).await;
    assert_eq!(
        checker.verdict("ns/c", "r.io/team/app:1", Some(auth("good"))),
        Some(Verdict::Allowed)
    );
    assert_eq!(reg.calls.load(Ordering::Relaxed), 2);
}
