//! What the task runner's logs say while tasks overlap: every line of a task
//! carries that task's span (task id, node, image) and no other task's.
//!
//! The only test in this file, so that it runs in a process of its own:
//! tracing caches per call site whether anyone listens, and a test that
//! starts logging while other threads first hit the same call sites can find
//! that cache stale and lose its lines.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_node_agent::runtime::MemRuntime;
use berth_node_agent::tasks::{Managed, TaskRunner};
use berth_proto::agent as pb;

/// Log output captured in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

fn pull_task(id: &str, image: &str) -> pb::Task {
    pb::Task {
        id: id.into(),
        kind: Some(pb::task::Kind::Pull(pb::PullTask {
            image: image.into(),
            ..Default::default()
        })),
    }
}

// A current-thread runtime: both pulls interleave on the one thread, whose
// logging context a span entered across an `.await` would leak into.
#[tokio::test]
async fn each_pull_logs_under_its_own_task_while_pulls_overlap() {
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);
    let rt = Arc::new(MemRuntime::default());
    rt.publish("r.io/first:1", 1);
    rt.publish("r.io/second:1", 1);
    rt.set_pull_delay(Duration::from_millis(50));
    let (runner, mut rx) = TaskRunner::new(rt, "node-a", 2, Managed::load(None));
    runner.submit(pull_task("t1", "r.io/first:1"));
    runner.submit(pull_task("t2", "r.io/second:1"));
    let mut done = 0;
    while done < 2 {
        let u = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("both pulls report within 10 s")
            .expect("the runner is alive");
        if u.state == pb::TaskState::Done as i32 {
            done += 1;
        }
    }

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let pulled: Vec<&str> = text.lines().filter(|l| l.contains("pulled")).collect();
    assert_eq!(pulled.len(), 2, "one \"pulled\" line per pull:\n{text}");
    for line in pulled {
        let (own, other) = if line.contains("task_id=t1") {
            ("r.io/first:1", "r.io/second:1")
        } else {
            ("r.io/second:1", "r.io/first:1")
        };
        assert!(
            line.contains(own) && !line.contains(other) && line.contains("node=node-a"),
            "a line of one task carries that task's image and node only:\n{line}\nall logs:\n{text}"
        );
    }
}
