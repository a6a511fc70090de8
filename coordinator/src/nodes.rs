//! The coordinator's live view of nodes, built from agent sessions.
//!
//! Plain data behind a lock: sessions call [`NodeRegistry::connect`],
//! [`NodeRegistry::update_inventory`], [`NodeRegistry::task_update`],
//! [`NodeRegistry::touch`] and [`NodeRegistry::disconnect`]; the public API
//! reads [`NodeRegistry::list`]; controllers send work with
//! [`NodeRegistry::dispatch`] and read [`NodeRegistry::agent_view`].
//! A node that reconnects gets a new session number, and only the newest
//! session of a node may change it, so a stale session closing late cannot mark
//! a freshly reconnected node as gone. Every change a plan reads (sessions,
//! inventories, finished tasks) wakes [`NodeRegistry::changed`]; heartbeats do not.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use berth_proto::agent as pb;
use tokio::sync::{Notify, mpsc};

use crate::backup::copies::CopyRouter;
use crate::containers::logs::LogRouter;
use crate::metrics::METRICS;

pub use crate::domain::TaskRecord;
use crate::domain::{AgentView, Failure, HeldImages};

/// Where a session's messages to its agent go.
pub type Outbox = mpsc::Sender<Result<pb::CoordinatorMessage, tonic::Status>>;

/// First retry delay after a failed pull; doubles per attempt up to [`RETRY_MAX`].
pub const RETRY_BASE: Duration = Duration::from_secs(1);
/// Longest delay between two attempts of a failing pull.
pub const RETRY_MAX: Duration = Duration::from_secs(60);
/// Delay before a refused removal is asked again.
const REMOVE_RETRY: Duration = Duration::from_secs(60);

/// The last failed pull of an image on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureRecord {
    /// Reason name, e.g. `AuthFailed`.
    pub reason: String,
    /// The runtime's message.
    pub message: String,
    /// Failed attempts in a row.
    pub attempts: u32,
    /// Not to be tried before.
    pub retry_at: Instant,
}

/// The backoff after `attempts` failures: doubling, capped, with jitter
/// (Berth's one policy, [`berth_proto::backoff`]).
pub fn retry_delay(attempts: u32) -> Duration {
    berth_proto::backoff::delay_after(RETRY_BASE, RETRY_MAX, attempts)
}

/// The image a finished pull left, as the next inventory will show it: the
/// reference as a tag (or digest), the pinned digest, managed by Berth.
fn pulled_image(task: &TaskRecord, image_id: &str) -> pb::Image {
    let mut image = pb::Image {
        id: image_id.to_string(),
        managed: true,
        ..Default::default()
    };
    if task.image.contains('@') {
        image.repo_digests.push(task.image.clone());
    } else {
        image.repo_tags.push(task.image.clone());
    }
    image.repo_digests.extend(task.pin.clone());
    image
}

/// Identifies one session of one node.
pub type SessionId = u64;

/// What the coordinator knows of one node.
#[derive(Debug, Clone)]
pub struct NodeView {
    /// The node's name.
    pub name: String,
    /// The agent's `Hello`.
    pub hello: pb::Hello,
    /// Its newest session.
    pub session: SessionId,
    /// That session is open.
    pub connected: bool,
    /// When that session started.
    pub connected_since: SystemTime,
    /// When the agent was last heard from.
    pub last_seen: SystemTime,
    /// The last inventory the agent sent, if any yet (shared with the
    /// planner's views, never copied per pass).
    pub inventory: Option<Arc<pb::Inventory>>,
    /// The current session has sent an inventory (until then `inventory`
    /// may be an older session's).
    pub reported: bool,
    /// Where messages to the current session go.
    pub outbox: Option<Outbox>,
    /// Tasks of the current session not yet finished, by id (kept after a
    /// disconnect until the node reconnects).
    pub tasks: BTreeMap<String, TaskRecord>,
    /// Images whose pull the agent reported done and no inventory has shown
    /// yet, by reference: counted as held at once, so a finished pull reaches
    /// the status without waiting for the agent's next inventory.
    pub pulled: BTreeMap<String, pb::Image>,
    /// Last failed pull per image (kept across sessions).
    pub failures: BTreeMap<String, FailureRecord>,
    /// Refused removals, not to be asked again before the instant.
    pub remove_backoff: BTreeMap<String, Instant>,
}

/// All nodes that have had a session since the coordinator started.
#[derive(Debug, Default)]
pub struct NodeRegistry {
    inner: RwLock<Inner>,
    changed: Arc<Notify>,
    logs: LogRouter,
    copies: CopyRouter,
}

#[derive(Debug, Default)]
struct Inner {
    next_session: SessionId,
    nodes: BTreeMap<String, NodeView>,
}

impl NodeRegistry {
    /// Woken on every change of any node.
    pub fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    /// Records a new session for `hello.node_name`, replacing any older one.
    pub fn connect(&self, hello: pb::Hello, now: SystemTime, outbox: Option<Outbox>) -> SessionId {
        // Log streams of an older session of the node end with it.
        self.logs.node_gone(&hello.node_name);
        let session = self.connect_inner(hello, now, outbox);
        self.changed.notify_one();
        session
    }

    fn connect_inner(
        &self,
        hello: pb::Hello,
        now: SystemTime,
        outbox: Option<Outbox>,
    ) -> SessionId {
        let mut inner = self.inner.write().unwrap();
        inner.next_session += 1;
        let session = inner.next_session;
        let name = hello.node_name.clone();
        let previous = inner.nodes.remove(&name);
        if !previous.as_ref().is_some_and(|p| p.connected) {
            METRICS.agents_connected.inc();
        }
        let (inventory, failures) = previous
            .map(|p| (p.inventory, p.failures))
            .unwrap_or_default();
        inner.nodes.insert(
            name.clone(),
            NodeView {
                name,
                hello,
                session,
                connected: true,
                connected_since: now,
                last_seen: now,
                // Keep the old inventory until the new session sends its own.
                inventory,
                reported: false,
                outbox,
                // The agent joins resent tasks to pulls it still runs.
                tasks: BTreeMap::new(),
                pulled: BTreeMap::new(),
                failures,
                remove_backoff: BTreeMap::new(),
            },
        );
        session
    }

    /// Stores a full inventory from the node's current session.
    pub fn update_inventory(
        &self,
        node: &str,
        session: SessionId,
        inv: pb::Inventory,
        now: SystemTime,
    ) -> bool {
        self.with_current(node, session, |n| {
            n.inventory = Some(Arc::new(inv));
            n.reported = true;
            n.pulled.clear();
            n.last_seen = now;
        })
    }

    /// Applies a task's progress from the node's current session.
    pub fn task_update(
        &self,
        node: &str,
        session: SessionId,
        u: &pb::TaskUpdate,
        now: Instant,
    ) -> bool {
        let state = pb::TaskState::try_from(u.state).unwrap_or_default();
        if state == pb::TaskState::Accepted {
            // Changes nothing a plan reads: the task already counts as under way.
            return self.with_current_quietly(node, session, |_| {});
        }
        self.with_current(node, session, |n| {
            let Some(task) = n.tasks.remove(&u.task_id) else {
                return;
            };
            let reason = pb::FailureReason::from_wire(u.reason);
            let kind = if task.pull { "pull" } else { "remove" };
            match state {
                pb::TaskState::Done => METRICS.task_result(kind, "done", ""),
                _ => METRICS.task_result(kind, "failed", reason.name()),
            }
            match (state, task.pull) {
                (pb::TaskState::Done, true) => {
                    n.failures.remove(&task.image);
                    let image = pulled_image(&task, &u.image_id);
                    n.pulled.insert(task.image, image);
                }
                (pb::TaskState::Failed, true) => {
                    let attempts = n.failures.get(&task.image).map_or(0, |f| f.attempts) + 1;
                    n.failures.insert(
                        task.image,
                        FailureRecord {
                            reason: reason.name().to_string(),
                            message: u.message.clone(),
                            attempts,
                            retry_at: now + retry_delay(attempts),
                        },
                    );
                }
                (pb::TaskState::Failed, false) => {
                    n.remove_backoff.insert(task.image, now + REMOVE_RETRY);
                }
                _ => {}
            }
        })
    }

    /// The log streams open through the agents' sessions.
    pub fn logs(&self) -> &LogRouter {
        &self.logs
    }

    /// The registry copies running on agents.
    pub fn copies(&self) -> &CopyRouter {
        &self.copies
    }

    /// Passes a batch of log lines from `node`'s agent to its reader, and
    /// cancels the stream at the agent if the reader fell behind.
    pub fn deliver_log(&self, node: &str, data: pb::LogData) {
        let id = data.stream_id;
        if !self.logs.deliver(node, data) {
            let cancel = pb::CoordinatorMessage {
                kind: Some(pb::coordinator_message::Kind::LogCancel(pb::LogCancel {
                    stream_id: id,
                })),
            };
            self.send(node, cancel);
        }
    }

    /// Sends a message on the node's current session; false if it has none
    /// or its queue is full.
    pub fn send(&self, node: &str, msg: pb::CoordinatorMessage) -> bool {
        let inner = self.inner.read().unwrap();
        inner
            .nodes
            .get(node)
            .filter(|n| n.connected)
            .and_then(|n| n.outbox.as_ref())
            .is_some_and(|outbox| outbox.try_send(Ok(msg)).is_ok())
    }

    /// Sends `task` to the node's current session; false if it has none or
    /// its queue is full (the task falls out of the next plan again).
    pub fn dispatch(&self, node: &str, task: pb::Task, record: TaskRecord) -> bool {
        let mut inner = self.inner.write().unwrap();
        let Some(n) = inner.nodes.get_mut(node).filter(|n| n.connected) else {
            return false;
        };
        let Some(outbox) = &n.outbox else {
            return false;
        };
        let id = task.id.clone();
        let msg = pb::CoordinatorMessage {
            kind: Some(pb::coordinator_message::Kind::Task(task)),
        };
        if outbox.try_send(Ok(msg)).is_err() {
            return false;
        }
        METRICS.task_sent(if record.pull { "pull" } else { "remove" });
        n.tasks.insert(id, record);
        true
    }

    /// What the planner needs to know of a node's agent.
    pub fn agent_view(&self, node: &str, now: Instant) -> Option<AgentView> {
        let inner = self.inner.read().unwrap();
        let n = inner.nodes.get(node)?;
        let in_flight = |pull: bool| -> BTreeSet<String> {
            n.tasks
                .values()
                .filter(|t| t.pull == pull)
                .map(|t| t.image.clone())
                .collect()
        };
        let mut removing = in_flight(false);
        removing.extend(
            n.remove_backoff
                .iter()
                .filter(|(_, t)| **t > now)
                .map(|(i, _)| i.clone()),
        );
        let images = HeldImages::new(n.inventory.clone(), n.pulled.values().cloned().collect());
        Some(AgentView {
            connected: n.connected,
            reported: n.reported,
            images,
            pulling: in_flight(true),
            removing,
            failures: n
                .failures
                .iter()
                .map(|(image, f)| {
                    let failure = Failure {
                        reason: f.reason.clone(),
                        message: f.message.clone(),
                        attempts: f.attempts,
                        retry_due: f.retry_at <= now,
                    };
                    (image.clone(), failure)
                })
                .collect(),
        })
    }

    /// Notes that the node's current session is alive.
    /// Changes nothing a plan reads, so it wakes nobody: heartbeats from many
    /// nodes must not make planning passes grow with the node count.
    pub fn touch(&self, node: &str, session: SessionId, now: SystemTime) -> bool {
        self.with_current_quietly(node, session, |n| n.last_seen = now)
    }

    /// Marks the node disconnected, if `session` is still its newest.
    pub fn disconnect(&self, node: &str, session: SessionId) -> bool {
        let current = self.with_current(node, session, |n| {
            if n.connected {
                METRICS.agents_connected.dec();
            }
            n.connected = false;
            n.outbox = None;
            // Its pulls stay listed: the agent may finish them while away, and
            // a deleted cache must wait for what they leave behind.
        });
        if current {
            // Its log streams and copies ended with it.
            self.logs.node_gone(node);
            self.copies.node_gone(node);
        }
        current
    }

    /// Every node, sorted by name.
    pub fn list(&self) -> Vec<NodeView> {
        self.inner.read().unwrap().nodes.values().cloned().collect()
    }

    /// One node.
    pub fn get(&self, node: &str) -> Option<NodeView> {
        self.inner.read().unwrap().nodes.get(node).cloned()
    }

    /// Applies `f` if `session` is the node's newest, and wakes [`Self::changed`].
    fn with_current(&self, node: &str, session: SessionId, f: impl FnOnce(&mut NodeView)) -> bool {
        let current = self.with_current_quietly(node, session, f);
        if current {
            self.changed.notify_one();
        }
        current
    }

    /// Applies `f` if `session` is the node's newest, waking nobody.
    fn with_current_quietly(
        &self,
        node: &str,
        session: SessionId,
        f: impl FnOnce(&mut NodeView),
    ) -> bool {
        let mut inner = self.inner.write().unwrap();
        match inner.nodes.get_mut(node) {
            Some(n) if n.session == session => {
                f(n);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    impl NodeRegistry {
        fn connect_t(&self, hello: pb::Hello, now: SystemTime) -> SessionId {
            self.connect(hello, now, None)
        }
    }

    fn hello(node: &str) -> pb::Hello {
        pb::Hello {
            node_name: node.into(),
            ..Default::default()
        }
    }

    fn inv(ids: &[&str]) -> pb::Inventory {
        pb::Inventory {
            images: ids
                .iter()
                .map(|i| pb::Image {
                    id: i.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_stale_session_closing_late_does_not_disconnect_the_reconnected_node() {
        let reg = NodeRegistry::default();
        let t = SystemTime::UNIX_EPOCH;
        let old = reg.connect_t(hello("a"), t);
        let new = reg.connect_t(hello("a"), t + Duration::from_secs(1));
        assert!(!reg.disconnect("a", old));
        assert!(!reg.update_inventory("a", old, inv(&["x"]), t));
        assert!(reg.get("a").unwrap().connected);
        assert!(reg.disconnect("a", new));
        assert!(!reg.get("a").unwrap().connected);
    }

    #[test]
    fn inventory_survives_a_reconnect_until_replaced() {
        let reg = NodeRegistry::default();
        let t = SystemTime::UNIX_EPOCH;
        let s1 = reg.connect_t(hello("a"), t);
        reg.update_inventory("a", s1, inv(&["x"]), t);
        reg.disconnect("a", s1);
        let s2 = reg.connect_t(hello("a"), t);
        assert_eq!(
            reg.get("a").unwrap().inventory.as_deref(),
            Some(&inv(&["x"]))
        );
        let now = Instant::now();
        assert!(
            !reg.agent_view("a", now).unwrap().reported,
            "the old one says nothing now"
        );
        reg.update_inventory("a", s2, inv(&["y"]), t);
        assert!(reg.agent_view("a", now).unwrap().reported);
        assert_eq!(
            reg.get("a").unwrap().inventory.as_deref(),
            Some(&inv(&["y"]))
        );
    }

    #[test]
    fn failed_pulls_back_off_exponentially_and_success_clears_them() {
        let reg = NodeRegistry::default();
        let (tx, mut rx) = mpsc::channel(8);
        let s = reg.connect(hello("a"), SystemTime::UNIX_EPOCH, Some(tx));
        let t0 = Instant::now();
        let mut delays = vec![];
        for i in 0..8 {
            let id = format!("t{i}");
            let task = pb::Task {
                id: id.clone(),
                kind: None,
            };
            assert!(reg.dispatch(
                "a",
                task,
                TaskRecord {
                    image: "r/x:1".into(),
                    pull: true,
                    pin: None,
                }
            ));
            assert!(rx.try_recv().is_ok());
            assert!(reg.agent_view("a", t0).unwrap().pulling.contains("r/x:1"));
            let failed = pb::TaskUpdate {
                task_id: id,
                state: pb::TaskState::Failed as i32,
                reason: pb::FailureReason::AuthFailed as i32,
                ..Default::default()
            };
            assert!(reg.task_update("a", s, &failed, t0));
            let f = reg.get("a").unwrap().failures["r/x:1"].clone();
            assert_eq!((f.attempts, f.reason.as_str()), (i + 1, "AuthFailed"));
            delays.push(f.retry_at - t0);
        }
        assert!(delays[0] <= RETRY_BASE && delays[7] >= RETRY_MAX / 2 && delays[7] <= RETRY_MAX);
        let view = reg.agent_view("a", t0).unwrap();
        assert!(view.pulling.is_empty() && !view.failures["r/x:1"].retry_due);
        assert!(reg.agent_view("a", t0 + RETRY_MAX).unwrap().failures["r/x:1"].retry_due);
        reg.dispatch(
            "a",
            pb::Task {
                id: "ok".into(),
                kind: None,
            },
            TaskRecord {
                image: "r/x:1".into(),
                pull: true,
                pin: None,
            },
        );
        let done = pb::TaskUpdate {
            task_id: "ok".into(),
            state: pb::TaskState::Done as i32,
            ..Default::default()
        };
        reg.task_update("a", s, &done, t0);
        assert!(reg.get("a").unwrap().failures.is_empty());
    }

    #[test]
    fn a_finished_pull_counts_as_held_before_the_next_inventory() {
        let reg = NodeRegistry::default();
        let (tx, _rx) = mpsc::channel(8);
        let s = reg.connect(hello("a"), SystemTime::UNIX_EPOCH, Some(tx));
        let record = TaskRecord {
            image: "r/x:1".into(),
            pull: true,
            pin: Some("r/x@sha256:aa".into()),
        };
        let task = pb::Task {
            id: "t".into(),
            kind: None,
        };
        assert!(reg.dispatch("a", task, record));
        let done = pb::TaskUpdate {
            task_id: "t".into(),
            state: pb::TaskState::Done as i32,
            image_id: "sha256:img".into(),
            ..Default::default()
        };
        assert!(reg.task_update("a", s, &done, Instant::now()));
        let view = reg.agent_view("a", Instant::now()).unwrap();
        let held = view.holds("r/x:1").expect("held at once");
        assert_eq!(held.id, "sha256:img");
        assert_eq!(held.repo_digests, ["r/x@sha256:aa"]);
        assert!(view.pulling.is_empty());
        // The inventory that follows replaces the stand-in.
        reg.update_inventory("a", s, inv(&["other"]), SystemTime::UNIX_EPOCH);
        let view = reg.agent_view("a", Instant::now()).unwrap();
        assert!(view.holds("r/x:1").is_none());
    }

    /// Whether `changed` was notified since the last call.
    fn woken(reg: &NodeRegistry) -> bool {
        use futures::FutureExt;
        reg.changed().notified().now_or_never().is_some()
    }

    #[test]
    fn a_heartbeat_does_not_wake_the_planner_but_an_inventory_does() {
        let reg = NodeRegistry::default();
        let t = SystemTime::UNIX_EPOCH;
        let s = reg.connect_t(hello("a"), t);
        assert!(woken(&reg), "a new session is news");
        let passes = (1..=100)
            .filter(|i| {
                assert!(reg.touch("a", s, t + Duration::from_secs(*i)));
                woken(&reg)
            })
            .count();
        assert_eq!(passes, 0, "a hundred heartbeats, no pass");
        assert_eq!(
            reg.get("a").unwrap().last_seen,
            t + Duration::from_secs(100)
        );
        reg.update_inventory("a", s, inv(&["x"]), t);
        assert!(woken(&reg));
    }

    #[test]
    fn nodes_are_listed_by_name() {
        let reg = NodeRegistry::default();
        for n in ["c", "a", "b"] {
            reg.connect_t(hello(n), SystemTime::UNIX_EPOCH);
        }
        let names: Vec<_> = reg.list().into_iter().map(|n| n.name).collect();
        assert_eq!(names, ["a", "b", "c"]);
    }
}
