//! Exec instances in the shim's memory, [`ExecStore`]: Docker creates an
//! exec (`POST /containers/{id}/exec`), starts it later
//! (`POST /exec/{id}/start`) and reads its exit code after
//! (`GET /exec/{id}/json`); the coordinator only sees the start, as one
//! `Containers.Exec` stream. So the shim keeps what was asked and how it
//! ended.
//!
//! The store is bounded: an instance that ended (or was never started) is
//! dropped [`FINISHED_TTL`] after, and beyond [`MAX_INSTANCES`] the oldest
//! ended ones go first; a running instance is never dropped, and a create
//! is refused when every slot holds a running one. Time comes in as an
//! argument, so the rules are tested without waiting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::docker::exec::{ExecSpec, Phase};

/// How long an ended (or never started) instance stays inspectable.
pub const FINISHED_TTL: Duration = Duration::from_secs(600);
/// The most instances kept at once.
pub const MAX_INSTANCES: usize = 1000;

/// One exec instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// The container's full ID.
    pub container_id: String,
    /// What it runs.
    pub spec: ExecSpec,
    /// Where it is.
    pub phase: Phase,
    /// When it was created, or when it ended once it has.
    since: Instant,
}

/// Why an instance cannot be started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BeginError {
    /// No instance with that ID (never, or dropped).
    Unknown,
    /// It is running now.
    Running,
    /// It has run already (Docker does not run an exec twice).
    Ended,
}

/// The store; cheap to clone (clones share the instances).
#[derive(Debug, Clone)]
pub struct ExecStore {
    inner: Arc<Mutex<HashMap<String, Instance>>>,
    ttl: Duration,
    max: usize,
}

impl Default for ExecStore {
    fn default() -> Self {
        ExecStore::with_limits(FINISHED_TTL, MAX_INSTANCES)
    }
}

impl ExecStore {
    /// A store dropping ended instances after `ttl` and holding at most `max`.
    pub fn with_limits(ttl: Duration, max: usize) -> Self {
        ExecStore {
            inner: Arc::default(),
            ttl,
            max,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Instance>> {
        // A panic while holding the lock leaves the map consistent: every
        // change is a single insert, remove or field write.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a new instance `id`; false (and nothing recorded) when the
    /// store is full of running instances.
    pub fn insert(&self, id: &str, container_id: &str, spec: ExecSpec, now: Instant) -> bool {
        let mut map = self.lock();
        prune(&mut map, now, self.ttl, self.max.saturating_sub(1));
        if map.len() >= self.max {
            return false;
        }
        map.insert(
            id.to_string(),
            Instance {
                container_id: container_id.to_string(),
                spec,
                phase: Phase::Created,
                since: now,
            },
        );
        true
    }

    /// A copy of instance `id`.
    pub fn get(&self, id: &str) -> Option<Instance> {
        self.lock().get(id).cloned()
    }

    /// Marks a created instance running and returns it.
    pub fn begin(&self, id: &str) -> Result<Instance, BeginError> {
        let mut map = self.lock();
        let inst = map.get_mut(id).ok_or(BeginError::Unknown)?;
        match inst.phase {
            Phase::Created => {
                inst.phase = Phase::Running;
                Ok(inst.clone())
            }
            Phase::Running => Err(BeginError::Running),
            Phase::Exited(_) => Err(BeginError::Ended),
        }
    }

    /// Puts a running instance back to created (its stream could not be
    /// opened, so nothing ran).
    pub fn undo_begin(&self, id: &str) {
        if let Some(inst) = self.lock().get_mut(id)
            && inst.phase == Phase::Running
        {
            inst.phase = Phase::Created;
        }
    }

    /// Records how instance `id` ended.
    pub fn finish(&self, id: &str, exit_code: i32, now: Instant) {
        if let Some(inst) = self.lock().get_mut(id) {
            inst.phase = Phase::Exited(exit_code);
            inst.since = now;
        }
    }

    /// How many instances are kept.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no instance is kept.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

/// Drops expired instances, then the oldest non-running ones until at most
/// `keep` remain (running instances always stay).
fn prune(map: &mut HashMap<String, Instance>, now: Instant, ttl: Duration, keep: usize) {
    map.retain(|_, i| i.phase == Phase::Running || now.saturating_duration_since(i.since) < ttl);
    if map.len() <= keep {
        return;
    }
    let mut idle: Vec<(Instant, String)> = map
        .iter()
        .filter(|(_, i)| i.phase != Phase::Running)
        .map(|(id, i)| (i.since, id.clone()))
        .collect();
    idle.sort();
    let excess = map.len() - keep;
    for (_, id) in idle.into_iter().take(excess) {
        map.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ExecSpec {
        ExecSpec {
            cmd: vec!["true".into()],
            ..Default::default()
        }
    }

    #[test]
    fn an_instance_runs_once_and_keeps_its_exit_code() {
        let store = ExecStore::default();
        let t0 = Instant::now();
        assert!(store.insert("e", "c", spec(), t0));
        assert_eq!(store.get("e").unwrap().phase, Phase::Created);
        assert_eq!(store.begin("e").unwrap().container_id, "c");
        assert_eq!(store.begin("e"), Err(BeginError::Running));
        store.finish("e", 4, t0);
        assert_eq!(store.get("e").unwrap().phase, Phase::Exited(4));
        assert_eq!(store.begin("e"), Err(BeginError::Ended));
        assert_eq!(store.begin("nope"), Err(BeginError::Unknown));
    }

    #[test]
    fn a_start_that_could_not_open_its_stream_can_be_retried() {
        let store = ExecStore::default();
        store.insert("e", "c", spec(), Instant::now());
        store.begin("e").unwrap();
        store.undo_begin("e");
        assert_eq!(store.get("e").unwrap().phase, Phase::Created);
        assert!(store.begin("e").is_ok());
    }

    #[test]
    fn ended_and_unstarted_instances_expire_but_running_ones_stay() {
        let store = ExecStore::with_limits(Duration::from_secs(600), 100);
        let t0 = Instant::now();
        for id in ["ended", "unstarted", "running"] {
            store.insert(id, "c", spec(), t0);
        }
        store.begin("ended").unwrap();
        store.finish("ended", 0, t0 + Duration::from_secs(60));
        store.begin("running").unwrap();
        let later = t0 + Duration::from_secs(630);
        store.insert("new", "c", spec(), later);
        assert!(store.get("ended").is_some(), "ended 570 s ago: kept");
        assert!(
            store.get("unstarted").is_none(),
            "created 630 s ago: dropped"
        );
        assert!(store.get("running").is_some());
        store.insert("newer", "c", spec(), t0 + Duration::from_secs(700));
        assert!(store.get("ended").is_none(), "ended 640 s ago: dropped");
        assert!(
            store.get("running").is_some(),
            "running instances never expire"
        );
    }

    #[test]
    fn a_full_store_drops_the_oldest_ended_instance_first() {
        let store = ExecStore::with_limits(Duration::from_secs(600), 3);
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        store.insert("a", "c", spec(), at(0));
        store.insert("b", "c", spec(), at(1));
        store.insert("r", "c", spec(), at(2));
        store.begin("r").unwrap();
        store.begin("a").unwrap();
        store.finish("a", 0, at(5));
        store.insert("d", "c", spec(), at(6));
        assert_eq!(store.len(), 3);
        assert!(
            store.get("b").is_none(),
            "b was idle since 1 s, a since 5 s"
        );
        assert!(store.get("a").is_some() && store.get("r").is_some());
    }

    #[test]
    fn a_store_full_of_running_instances_refuses_new_ones() {
        let store = ExecStore::with_limits(Duration::from_secs(600), 2);
        let t0 = Instant::now();
        for id in ["a", "b"] {
            assert!(store.insert(id, "c", spec(), t0));
            store.begin(id).unwrap();
        }
        assert!(!store.insert("c", "c", spec(), t0));
        assert_eq!(store.len(), 2);
        assert!(store.get("c").is_none());
    }
}
