//! Election as data in, data out ([`decide`]), and [`Elector`]s racing on
//! an in-memory Lease in paused time.

use std::sync::{Arc, Mutex};

use super::*;

fn held_by(holder: &str) -> LeaseRecord {
    LeaseRecord {
        holder: Some(holder.into()),
        duration: LEASE_DURATION,
        transitions: 3,
        acquired: None,
        version: Some("7".into()),
    }
}

#[test]
fn without_a_lease_the_candidate_creates_it() {
    let now = Instant::now();
    assert_eq!(decide(None, now, now, "a"), Decision::Create);
}

#[test]
fn a_lease_held_by_me_is_renewed() {
    let now = Instant::now();
    let long_ago = now - Duration::from_secs(3600);
    assert_eq!(
        decide(Some(&held_by("a")), long_ago, now, "a"),
        Decision::Renew
    );
}

#[test]
fn a_released_lease_is_taken_at_once() {
    let now = Instant::now();
    for holder in [None, Some(String::new())] {
        let free = LeaseRecord {
            holder,
            ..held_by("x")
        };
        assert_eq!(decide(Some(&free), now, now, "a"), Decision::Acquire);
    }
}

#[test]
fn another_holders_lease_is_waited_for_until_it_went_unchanged_for_its_duration() {
    let seen = Instant::now();
    let lease = held_by("b");
    let expiry = seen + LEASE_DURATION;
    assert_eq!(
        decide(Some(&lease), seen, seen, "a"),
        Decision::Wait(expiry)
    );
    let just_before = expiry - Duration::from_millis(1);
    assert_eq!(
        decide(Some(&lease), seen, just_before, "a"),
        Decision::Wait(expiry)
    );
    assert_eq!(decide(Some(&lease), seen, expiry, "a"), Decision::Acquire);
}

#[test]
fn the_lease_duration_written_by_the_holder_counts_not_my_own() {
    let seen = Instant::now();
    let long = LeaseRecord {
        duration: Duration::from_secs(60),
        ..held_by("b")
    };
    assert_eq!(
        decide(Some(&long), seen, seen + LEASE_DURATION, "a"),
        Decision::Wait(seen + Duration::from_secs(60))
    );
}

#[test]
fn a_holder_gives_up_well_before_a_standby_may_take_over() {
    assert!(RENEW_DEADLINE + RETRY_PERIOD / 2 < LEASE_DURATION);
    assert!(RETRY_PERIOD * 3 <= RENEW_DEADLINE);
}

/// An in-memory Lease with resourceVersions, which can be made unreachable.
#[derive(Clone, Default)]
struct FakeLeases(Arc<Mutex<Fake>>);

#[derive(Default)]
struct Fake {
    lease: Option<LeaseRecord>,
    version: u64,
    down: bool,
    /// Holder of every successful write, in order.
    writes: Vec<Option<String>>,
}

impl FakeLeases {
    fn set_down(&self, down: bool) {
        self.0.lock().unwrap().down = down;
    }

    fn holder(&self) -> Option<String> {
        let f = self.0.lock().unwrap();
        f.lease.as_ref().and_then(|l| l.holder().map(String::from))
    }

    fn lease(&self) -> LeaseRecord {
        self.0.lock().unwrap().lease.clone().unwrap()
    }

    /// Writes the Lease as another replica would, ignoring versions.
    fn overwrite(&self, holder: &str) {
        let mut f = self.0.lock().unwrap();
        f.version += 1;
        f.lease = Some(LeaseRecord {
            version: Some(f.version.to_string()),
            ..held_by(holder)
        });
    }

    fn write(&self, lease: &LeaseRecord, create: bool) -> Result<LeaseRecord, LeaseError> {
        let mut f = self.0.lock().unwrap();
        if f.down {
            return Err(unreachable());
        }
        let current = f.lease.as_ref().map(|l| l.version.clone());
        let fits = match current {
            None => create,
            Some(v) => !create && v == lease.version,
        };
        if !fits {
            return Err(LeaseError::Conflict);
        }
        f.version += 1;
        let written = LeaseRecord {
            version: Some(f.version.to_string()),
            ..lease.clone()
        };
        f.writes.push(written.holder().map(String::from));
        f.lease = Some(written.clone());
        Ok(written)
    }
}

fn unreachable() -> LeaseError {
    let status = kube::core::Status::failure("apiserver down", "ServiceUnavailable").with_code(503);
    LeaseError::from(kube::Error::Api(status.boxed()))
}

impl LeaseStore for FakeLeases {
    async fn get(&self) -> Result<Option<LeaseRecord>, LeaseError> {
        let f = self.0.lock().unwrap();
        if f.down {
            return Err(unreachable());
        }
        Ok(f.lease.clone())
    }

    async fn create(&self, lease: &LeaseRecord) -> Result<LeaseRecord, LeaseError> {
        self.write(lease, true)
    }

    async fn replace(&self, lease: &LeaseRecord) -> Result<LeaseRecord, LeaseError> {
        self.write(lease, false)
    }
}

#[test]
fn an_apiserver_conflict_is_a_lease_conflict_and_other_failures_are_not() {
    let conflict = kube::core::Status::failure("changed", "Conflict").with_code(409);
    assert!(matches!(
        LeaseError::from(kube::Error::Api(conflict.boxed())),
        LeaseError::Conflict
    ));
    assert!(matches!(unreachable(), LeaseError::Api(_)));
}

#[tokio::test(start_paused = true)]
async fn the_first_candidate_creates_the_lease_and_holds_it() {
    let store = FakeLeases::default();
    let mut a = Elector::new(store.clone(), "a");
    a.acquire().await;
    let lease = store.lease();
    assert_eq!(
        (lease.holder(), lease.duration, lease.transitions),
        (Some("a"), LEASE_DURATION, 0)
    );
    assert!(lease.acquired.is_some());
}

#[tokio::test(start_paused = true)]
async fn a_standby_takes_over_only_after_the_leader_stopped_renewing() {
    let store = FakeLeases::default();
    let mut a = Elector::new(store.clone(), "a");
    a.acquire().await;
    let start = Instant::now();
    let leader_stops = start + Duration::from_secs(30);
    // The leader renews for 30 s, then dies without releasing.
    let leader = tokio::spawn(async move { tokio::time::timeout_at(leader_stops, a.keep()).await });
    let mut b = Elector::new(store.clone(), "b");
    b.acquire().await;
    let took_over = Instant::now();
    assert!(
        leader.await.unwrap().is_err(),
        "the leader kept the Lease until it stopped"
    );
    assert!(
        took_over >= leader_stops,
        "b took over at {:?}",
        took_over - start
    );
    // The leader's last renewal was at most a retry period before it
    // stopped; b noticed it at most a retry period later.
    assert!(
        took_over <= leader_stops + LEASE_DURATION + RETRY_PERIOD,
        "b took over {:?} after the leader stopped",
        took_over - leader_stops
    );
    let lease = store.lease();
    assert_eq!((lease.holder(), lease.transitions), (Some("b"), 1));
}

#[tokio::test(start_paused = true)]
async fn a_released_lease_is_taken_over_within_one_look() {
    let store = FakeLeases::default();
    let mut a = Elector::new(store.clone(), "a");
    a.acquire().await;
    let mut b = Elector::new(store.clone(), "b");
    let standby = tokio::spawn(async move {
        b.acquire().await;
        Instant::now()
    });
    tokio::time::sleep(RETRY_PERIOD * 2).await;
    let released = Instant::now();
    a.release().await.unwrap();
    assert_eq!(store.holder(), None);
    let took_over = standby.await.unwrap();
    assert!(took_over - released <= RETRY_PERIOD);
    assert_eq!(store.holder().as_deref(), Some("b"));
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_cannot_renew_gives_up_at_the_renew_deadline() {
    let store = FakeLeases::default();
    let mut a = Elector::new(store.clone(), "a");
    a.acquire().await;
    let acquired = Instant::now();
    store.set_down(true);
    let lost = a.keep().await;
    assert!(matches!(lost, Lost::NotRenewed), "{lost}");
    assert_eq!(Instant::now() - acquired, RENEW_DEADLINE);
}

#[tokio::test(start_paused = true)]
async fn a_leader_survives_a_short_apiserver_outage() {
    let store = FakeLeases::default();
    let mut a = Elector::new(store.clone(), "a");
    a.acquire().await;
    let outage = {
        let store = store.clone();
        async move {
            tokio::time::sleep(RETRY_PERIOD * 2 + RETRY_PERIOD / 2).await;
            store.set_down(true);
            // Back up shortly before the last renewal within the deadline.
            tokio::time::sleep(RENEW_DEADLINE - RETRY_PERIOD - RETRY_PERIOD / 4).await;
            store.set_down(false);
            tokio::time::sleep(LEASE_DURATION * 3).await;
        }
    };
    tokio::select! {
        lost = a.keep() => panic!("lost the Lease: {lost}"),
        () = outage => {}
    }
    assert_eq!(store.holder().as_deref(), Some("a"));
}

#[tokio::test(start_paused = true)]
async fn a_leader_whose_lease_was_taken_steps_down_at_its_next_renewal() {
    let store = FakeLeases::default();
    let mut a = Elector::new(store.clone(), "a");
    a.acquire().await;
    store.overwrite("b");
    let taken = Instant::now();
    let lost = a.keep().await;
    assert!(matches!(&lost, Lost::Taken(Some(h)) if h == "b"), "{lost}");
    assert!(Instant::now() - taken <= RETRY_PERIOD);
    assert_eq!(store.holder().as_deref(), Some("b"));
}

#[tokio::test(start_paused = true)]
async fn a_restarted_leader_with_the_same_identity_takes_its_lease_back_at_once() {
    let store = FakeLeases::default();
    Elector::new(store.clone(), "a").acquire().await;
    let restarted = Instant::now();
    let mut again = Elector::new(store.clone(), "a");
    again.acquire().await;
    assert_eq!(Instant::now(), restarted);
    assert_eq!(store.lease().transitions, 0);
}

#[tokio::test(start_paused = true)]
async fn of_candidates_racing_for_an_expired_lease_exactly_one_wins() {
    let store = FakeLeases::default();
    store.overwrite("dead");
    let mut electors: Vec<_> = ["a", "b", "c"]
        .into_iter()
        .map(|me| Elector::new(store.clone(), me))
        .collect();
    // Every candidate saw the same record, and then it expired for all.
    let seen = Instant::now();
    for e in &mut electors {
        e.observe(store.get().await.unwrap(), seen);
    }
    let now = seen + LEASE_DURATION;
    let mut won = vec![];
    for e in &mut electors {
        let changed = e.changed.unwrap();
        assert_eq!(
            decide(e.seen.as_ref(), changed, now, &e.me),
            Decision::Acquire
        );
        match e.store.replace(&e.claim()).await {
            Ok(_) => won.push(e.me.clone()),
            Err(LeaseError::Conflict) => {}
            Err(other) => panic!("{other}"),
        }
    }
    assert_eq!(won, ["a"]);
    assert_eq!(store.holder().as_deref(), Some("a"));
    assert_eq!(store.0.lock().unwrap().writes, [Some("a".to_string())]);
}

/// Runs `f` on a current-thread runtime of its own (real time: the election
/// thread's runtime does not share a paused clock).
fn on_one_thread<F: Future<Output = ()>>(f: F) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn the_lease_is_renewed_while_the_callers_runtime_is_blocked() {
    let store = FakeLeases::default();
    on_one_thread(async {
        let s = store.clone();
        let mut election = thread::Election::spawn(move || Ok(s), "a").unwrap();
        election.acquired().await.unwrap();
        let before = store.lease().version;
        // The caller's only worker is busy for longer than a renewal period,
        // as the main runtime's are during a connect storm.
        std::thread::sleep(RETRY_PERIOD + Duration::from_secs(1));
        assert_ne!(store.lease().version, before, "not renewed meanwhile");
        assert_eq!(store.holder().as_deref(), Some("a"));
        election.release().await.unwrap();
        assert_eq!(store.holder(), None, "released");
    });
}

#[test]
fn a_lease_taken_from_the_election_thread_is_reported_lost() {
    let store = FakeLeases::default();
    on_one_thread(async {
        let s = store.clone();
        let mut election = thread::Election::spawn(move || Ok(s), "a").unwrap();
        election.acquired().await.unwrap();
        store.overwrite("b");
        let lost = tokio::time::timeout(RENEW_DEADLINE, election.lost())
            .await
            .expect("the loss is reported by the next renewal");
        assert!(
            matches!(lost, Lost::Taken(Some(ref b)) if b == "b"),
            "{lost}"
        );
        election.release().await.unwrap();
        assert_eq!(
            store.holder().as_deref(),
            Some("b"),
            "b's Lease is left alone"
        );
    });
}

#[test]
fn an_election_whose_store_cannot_be_built_says_why() {
    let e = thread::Election::spawn(|| Err::<FakeLeases, _>(unreachable()), "a")
        .err()
        .expect("no election without a store");
    assert!(
        e.to_string().contains("cannot start leader election"),
        "{e}"
    );
}
