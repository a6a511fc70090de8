//! The coordinator's live view of nodes, built from agent sessions.
//!
//! Plain data behind a lock: sessions call [`NodeRegistry::connect`],
//! [`NodeRegistry::update_inventory`], [`NodeRegistry::touch`] and
//! [`NodeRegistry::disconnect`]; the public API reads [`NodeRegistry::list`].
//! A node that reconnects gets a new session number, and only the newest
//! session of a node may change it, so a stale session closing late cannot mark
//! a freshly reconnected node as gone.

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::time::SystemTime;

use berth_proto::agent as pb;

/// Identifies one session of one node.
pub type SessionId = u64;

/// What the coordinator knows of one node.
#[derive(Debug, Clone, PartialEq)]
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
    /// The last inventory the agent sent, if any yet.
    pub inventory: Option<pb::Inventory>,
}

/// All nodes that have had a session since the coordinator started.
#[derive(Debug, Default)]
pub struct NodeRegistry {
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next_session: SessionId,
    nodes: BTreeMap<String, NodeView>,
}

impl NodeRegistry {
    /// Records a new session for `hello.node_name`, replacing any older one.
    pub fn connect(&self, hello: pb::Hello, now: SystemTime) -> SessionId {
        let mut inner = self.inner.write().unwrap();
        inner.next_session += 1;
        let session = inner.next_session;
        let name = hello.node_name.clone();
        let previous = inner.nodes.remove(&name);
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
                inventory: previous.and_then(|p| p.inventory),
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
            n.inventory = Some(inv);
            n.last_seen = now;
        })
    }

    /// Notes that the node's current session is alive.
    pub fn touch(&self, node: &str, session: SessionId, now: SystemTime) -> bool {
        self.with_current(node, session, |n| n.last_seen = now)
    }

    /// Marks the node disconnected, if `session` is still its newest.
    pub fn disconnect(&self, node: &str, session: SessionId) -> bool {
        self.with_current(node, session, |n| n.connected = false)
    }

    /// Every node, sorted by name.
    pub fn list(&self) -> Vec<NodeView> {
        self.inner.read().unwrap().nodes.values().cloned().collect()
    }

    /// One node.
    pub fn get(&self, node: &str) -> Option<NodeView> {
        self.inner.read().unwrap().nodes.get(node).cloned()
    }

    fn with_current(&self, node: &str, session: SessionId, f: impl FnOnce(&mut NodeView)) -> bool {
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
        let old = reg.connect(hello("a"), t);
        let new = reg.connect(hello("a"), t + Duration::from_secs(1));
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
        let s1 = reg.connect(hello("a"), t);
        reg.update_inventory("a", s1, inv(&["x"]), t);
        reg.disconnect("a", s1);
        let s2 = reg.connect(hello("a"), t);
        assert_eq!(reg.get("a").unwrap().inventory, Some(inv(&["x"])));
        reg.update_inventory("a", s2, inv(&["y"]), t);
        assert_eq!(reg.get("a").unwrap().inventory, Some(inv(&["y"])));
    }

    #[test]
    fn nodes_are_listed_by_name() {
        let reg = NodeRegistry::default();
        for n in ["c", "a", "b"] {
            reg.connect(hello(n), SystemTime::UNIX_EPOCH);
        }
        let names: Vec<_> = reg.list().into_iter().map(|n| n.name).collect();
        assert_eq!(names, ["a", "b", "c"]);
    }
}
