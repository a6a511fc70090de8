//! Routes the progress of registry copies from the agent that runs them to
//! the ImageBackup controller task waiting on each.
//!
//! A copy is not node state (nothing a plan reads changes when it ends), so
//! its updates bypass the node registry's task bookkeeping: the session hands
//! every `TaskUpdate` to [`CopyRouter::deliver`] first, which keeps those of
//! the copies it knows. When a node's session ends, its copies' channels
//! close, and their waiters see the agent gone.

use std::collections::HashMap;
use std::sync::Mutex;

use berth_proto::agent as pb;
use tokio::sync::mpsc;

/// Open copies, by task id.
#[derive(Debug, Default)]
pub struct CopyRouter {
    open: Mutex<HashMap<String, (String, mpsc::UnboundedSender<pb::TaskUpdate>)>>,
}

impl CopyRouter {
    /// Starts routing the updates of task `id`, run on `node`.
    pub fn open(&self, id: &str, node: &str) -> mpsc::UnboundedReceiver<pb::TaskUpdate> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.open
            .lock()
            .unwrap()
            .insert(id.to_string(), (node.to_string(), tx));
        rx
    }

    /// Stops routing task `id` (its waiter is done with it).
    pub fn close(&self, id: &str) {
        self.open.lock().unwrap().remove(id);
    }

    /// Passes `u` to its copy's waiter; false if it is no copy's (or came
    /// from another node than the one running it).
    pub fn deliver(&self, node: &str, u: &pb::TaskUpdate) -> bool {
        let open = self.open.lock().unwrap();
        match open.get(&u.task_id) {
            Some((n, tx)) if n == node => {
                let _ = tx.send(u.clone());
                true
            }
            _ => false,
        }
    }

    /// Closes every copy running on `node`.
    pub fn node_gone(&self, node: &str) {
        self.open.lock().unwrap().retain(|_, (n, _)| n != node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_reach_their_copy_and_a_lost_node_closes_it() {
        let r = CopyRouter::default();
        let mut rx = r.open("copy-1", "a");
        let u = pb::TaskUpdate {
            task_id: "copy-1".into(),
            ..Default::default()
        };
        assert!(
            !r.deliver("b", &u),
            "another node's update is not this copy's"
        );
        assert!(r.deliver("a", &u));
        assert_eq!(rx.try_recv().unwrap().task_id, "copy-1");
        assert!(!r.deliver("a", &pb::TaskUpdate::default()));
        r.node_gone("a");
        assert!(rx.try_recv().is_err());
        assert!(!r.deliver("a", &u));
    }
}
