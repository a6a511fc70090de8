//! `Containers/Events`: Docker's event stream, from the mirror. Each change
//! of the namespace's mirror is a fresh snapshot of the caller's containers
//! and networks ([`Snapshot::of`]); the events are the difference between
//! two snapshots ([`diff`]), so nothing is polled and a burst of watch
//! events between two looks still yields every step (a container created,
//! started and exited at once is `create`, `start`, `die`).

use std::collections::BTreeMap;

use berth_proto::api as pb;

use super::api::info;
use super::store::Space;

/// What an event reader remembers of a container.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Seen {
    /// Its name.
    pub name: String,
    /// Its image, as given.
    pub image: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Docker's status word.
    pub status: String,
    /// Starts seen running (or over) so far: a start still being made is
    /// not counted until its pod runs.
    pub runs: u32,
    /// The last exit code.
    pub exit_code: i32,
    /// Docker's health word, if it has a check.
    pub health: String,
}

/// The caller's containers and networks at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// Containers by ID.
    pub containers: BTreeMap<String, Seen>,
    /// Network names by ID.
    pub networks: BTreeMap<String, String>,
}

impl Snapshot {
    /// The snapshot of `space` (as its session sees it).
    pub fn of(space: &Space) -> Snapshot {
        let containers = space
            .records()
            .into_iter()
            .map(|r| {
                let i = info(space, &r);
                let state = i.state.unwrap_or_default();
                let ran = matches!(state.status.as_str(), "running" | "exited");
                let seen = Seen {
                    name: r.name.clone(),
                    image: r.spec.image.clone(),
                    labels: r.spec.labels.clone().into_iter().collect(),
                    runs: if ran {
                        r.runs
                    } else {
                        r.runs.saturating_sub(1)
                    },
                    status: state.status,
                    exit_code: state.exit_code,
                    health: state.health,
                };
                (r.id, seen)
            })
            .collect();
        let networks = space
            .networks()
            .into_iter()
            .map(|n| (n.id, n.name))
            .collect();
        Snapshot {
            containers,
            networks,
        }
    }
}

fn container_event(action: &str, id: &str, c: &Seen, now: i64) -> pb::Event {
    let mut attributes: std::collections::HashMap<String, String> =
        c.labels.clone().into_iter().collect();
    attributes.insert("name".into(), c.name.clone());
    attributes.insert("image".into(), c.image.clone());
    if action == "die" {
        attributes.insert("exitCode".into(), c.exit_code.to_string());
    }
    pb::Event {
        r#type: "container".into(),
        action: action.into(),
        id: id.into(),
        attributes,
        time_unix_nanos: now,
    }
}

/// The events that lead from `before` to `after`, at `now`.
pub fn diff(before: &Snapshot, after: &Snapshot, now: i64) -> Vec<pb::Event> {
    let mut out = Vec::new();
    for (id, name) in &after.networks {
        if !before.networks.contains_key(id) {
            out.push(network_event("create", id, name, now));
        }
    }
    for (id, c) in &after.containers {
        let prev = before.containers.get(id);
        if prev.is_none() {
            out.push(container_event("create", id, c, now));
        }
        let prev_runs = prev.map_or(0, |p| p.runs);
        let ran = matches!(c.status.as_str(), "running" | "exited");
        let started = c.runs > prev_runs && ran;
        if started {
            out.push(container_event("start", id, c, now));
        }
        let was_exited = prev.is_some_and(|p| p.status == "exited") && !started;
        if c.status == "exited" && c.runs > 0 && !was_exited {
            out.push(container_event("die", id, c, now));
        }
        // Docker reports a verdict, not the wait for one.
        let prev_health = prev.map_or("", |p| p.health.as_str());
        if c.health != prev_health && matches!(c.health.as_str(), "healthy" | "unhealthy") {
            out.push(container_event(
                &format!("health_status: {}", c.health),
                id,
                c,
                now,
            ));
        }
    }
    for (id, c) in &before.containers {
        if !after.containers.contains_key(id) {
            out.push(container_event("destroy", id, c, now));
        }
    }
    for (id, name) in &before.networks {
        if !after.networks.contains_key(id) {
            out.push(network_event("destroy", id, name, now));
        }
    }
    out
}

fn network_event(action: &str, id: &str, name: &str, now: i64) -> pb::Event {
    pb::Event {
        r#type: "network".into(),
        action: action.into(),
        id: id.into(),
        attributes: [
            ("name".to_string(), name.to_string()),
            ("type".to_string(), "bridge".to_string()),
        ]
        .into(),
        time_unix_nanos: now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(status: &str, runs: u32, exit_code: i32) -> Seen {
        Seen {
            name: "web".into(),
            image: "busybox".into(),
            status: status.into(),
            runs,
            exit_code,
            ..Default::default()
        }
    }

    fn snap(containers: &[(&str, Seen)]) -> Snapshot {
        Snapshot {
            containers: containers
                .iter()
                .map(|(id, s)| (id.to_string(), s.clone()))
                .collect(),
            networks: BTreeMap::new(),
        }
    }

    fn actions(events: &[pb::Event]) -> Vec<String> {
        events.iter().map(|e| e.action.clone()).collect()
    }

    #[test]
    fn a_container_that_ran_between_two_looks_yields_every_step() {
        let empty = Snapshot::default();
        let done = snap(&[("c1", seen("exited", 1, 3))]);
        let events = diff(&empty, &done, 7);
        assert_eq!(actions(&events), ["create", "start", "die"]);
        assert_eq!(events[2].attributes["exitCode"], "3");
        assert_eq!(events[2].attributes["name"], "web");
        assert_eq!(events[2].time_unix_nanos, 7);
        assert_eq!(actions(&diff(&done, &Snapshot::default(), 8)), ["destroy"]);
    }

    #[test]
    fn each_transition_is_one_event_and_nothing_repeats() {
        let created = snap(&[("c1", seen("created", 0, 0))]);
        let running = snap(&[("c1", seen("running", 1, 0))]);
        let exited = snap(&[("c1", seen("exited", 1, 0))]);
        let again = snap(&[("c1", seen("running", 2, 0))]);
        let quick = snap(&[("c1", seen("exited", 3, 1))]);
        assert_eq!(
            actions(&diff(&Snapshot::default(), &created, 0)),
            ["create"]
        );
        assert_eq!(actions(&diff(&created, &running, 0)), ["start"]);
        assert_eq!(actions(&diff(&running, &running, 0)), Vec::<String>::new());
        assert_eq!(actions(&diff(&running, &exited, 0)), ["die"]);
        assert_eq!(actions(&diff(&exited, &exited, 0)), Vec::<String>::new());
        assert_eq!(actions(&diff(&exited, &again, 0)), ["start"]);
        assert_eq!(actions(&diff(&again, &quick, 0)), ["start", "die"]);
    }

    #[test]
    fn health_changes_and_networks_are_events_too() {
        let mut a = seen("running", 1, 0);
        a.health = "starting".into();
        let mut b = a.clone();
        b.health = "healthy".into();
        let before = snap(&[("c1", a)]);
        let mut after = snap(&[("c1", b)]);
        after.networks.insert("n1".into(), "backend".into());
        let events = diff(&before, &after, 0);
        assert_eq!(actions(&events), ["create", "health_status: healthy"]);
        assert_eq!(events[0].r#type, "network");
        assert_eq!(events[0].attributes["name"], "backend");
    }
}
