//! Log streams over real files in a temporary directory and the in-memory
//! runtime's containers: what the coordinator receives for each kind of
//! request. Every wait has a deadline; nothing sleeps and then asserts.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use berth_proto::agent as pb;
use prost::Message;
use tokio::sync::{mpsc, oneshot};

use super::*;
use crate::runtime::{ContainerLog, ContainerState, MemRuntime};

/// How long a test waits for a message before it fails.
const DEADLINE: Duration = Duration::from_secs(10);
const POD: &str = "8c1f0e6a-uid";
const NAME: &str = "app";

/// A pod's container with its log path (the file is not created).
struct Pod {
    _dir: tempfile::TempDir,
    rt: Arc<MemRuntime>,
    path: PathBuf,
}

fn pod(state: ContainerState) -> Pod {
    let dir = tempfile::tempdir().unwrap();
    let container_dir = dir.path().join(format!("default_web_{POD}")).join(NAME);
    std::fs::create_dir_all(&container_dir).unwrap();
    let path = container_dir.join("0.log");
    let rt = Arc::new(MemRuntime::default());
    rt.add_container(
        POD,
        NAME,
        1,
        ContainerLog {
            id: "c-0".into(),
            log_path: path.clone(),
            state,
        },
    );
    Pod {
        _dir: dir,
        rt,
        path,
    }
}

/// Appends CRI records (each gets its newline).
fn append(path: &Path, records: &[&str]) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    for r in records {
        f.write_all(r.as_bytes()).unwrap();
        f.write_all(b"\n").unwrap();
    }
}

fn at(second: u32) -> String {
    format!("2024-05-01T12:00:{second:02}Z")
}

fn nanos(second: u32) -> i64 {
    parse::parse_rfc3339_nanos(at(second).as_bytes()).unwrap()
}

fn request(stream_id: u64) -> pb::LogRequest {
    pb::LogRequest {
        stream_id,
        pod_uid: POD.into(),
        container_name: NAME.into(),
        stdout: true,
        stderr: true,
        tail: -1,
        ..Default::default()
    }
}

/// A stream of `req` on its own channel; keep the sender to let it run.
fn start(
    rt: &Arc<MemRuntime>,
    req: pb::LogRequest,
) -> (mpsc::Receiver<pb::AgentMessage>, oneshot::Sender<()>) {
    let (tx, rx) = mpsc::channel(16);
    let (cancel, cancelled) = oneshot::channel();
    tokio::spawn(run_stream(rt.clone(), req, tx, cancelled));
    (rx, cancel)
}

/// The next `LogData`, within [`DEADLINE`].
async fn next(rx: &mut mpsc::Receiver<pb::AgentMessage>) -> pb::LogData {
    match tokio::time::timeout(DEADLINE, rx.recv()).await {
        Ok(Some(pb::AgentMessage {
            kind: Some(pb::agent_message::Kind::LogData(d)),
        })) => d,
        Ok(other) => panic!("expected LogData, got {other:?}"),
        Err(_) => panic!("no LogData within {DEADLINE:?}"),
    }
}

/// Every batch up to and including the one with `end`.
async fn all(rx: &mut mpsc::Receiver<pb::AgentMessage>) -> Vec<pb::LogData> {
    let mut batches = vec![];
    loop {
        let d = next(rx).await;
        let end = d.end;
        batches.push(d);
        if end {
            return batches;
        }
    }
}

fn entries(batches: &[pb::LogData]) -> Vec<pb::LogEntry> {
    batches.iter().flat_map(|b| b.entries.clone()).collect()
}

fn text(batches: &[pb::LogData]) -> String {
    entries(batches)
        .iter()
        .map(|e| String::from_utf8_lossy(&e.data).into_owned())
        .collect()
}

fn error(batches: &[pb::LogData]) -> &str {
    &batches.last().expect("at least the final batch").error
}

/// Reads batches until `want` appears in the text received so far.
async fn until_text(rx: &mut mpsc::Receiver<pb::AgentMessage>, seen: &mut String, want: &str) {
    while !seen.contains(want) {
        let d = next(rx).await;
        assert!(
            !d.end,
            "the stream ended before {want:?}; got {seen:?} and {d:?}"
        );
        seen.push_str(&text(&[d]));
    }
}

#[tokio::test]
async fn full_and_partial_lines_of_both_streams_arrive_in_file_order() {
    let p = pod(ContainerState::Running);
    append(
        &p.path,
        &[
            &format!("{} stdout F hello", at(1)),
            &format!("{} stderr P warn", at(2)),
            &format!("{} stderr F ing", at(3)),
            &format!("{} stdout F ", at(4)),
        ],
    );
    let (mut rx, _cancel) = start(&p.rt, request(7));
    let batches = all(&mut rx).await;
    assert_eq!(error(&batches), "");
    assert!(batches.iter().all(|b| b.stream_id == 7));
    let got: Vec<_> = entries(&batches)
        .into_iter()
        .map(|e| (e.time_unix_nanos, e.stream, e.data))
        .collect();
    let (out, err) = (pb::LogStream::Stdout as i32, pb::LogStream::Stderr as i32);
    assert_eq!(
        got,
        [
            (nanos(1), out, b"hello\n".to_vec()),
            (nanos(2), err, b"warn".to_vec()),
            (nanos(3), err, b"ing\n".to_vec()),
            (nanos(4), out, b"\n".to_vec()),
        ]
    );
}

#[tokio::test]
async fn only_the_requested_stream_is_sent() {
    let p = pod(ContainerState::Exited);
    append(
        &p.path,
        &[
            &format!("{} stdout F out", at(1)),
            &format!("{} stderr F err", at(2)),
        ],
    );
    let (mut rx, _c) = start(
        &p.rt,
        pb::LogRequest {
            stdout: false,
            ..request(1)
        },
    );
    assert_eq!(text(&all(&mut rx).await), "err\n");
    let (mut rx, _c) = start(
        &p.rt,
        pb::LogRequest {
            stderr: false,
            ..request(2)
        },
    );
    assert_eq!(text(&all(&mut rx).await), "out\n");
}

#[tokio::test]
async fn since_and_until_keep_the_lines_of_the_half_open_window() {
    let p = pod(ContainerState::Exited);
    let lines: Vec<_> = (1..=5)
        .map(|s| format!("{} stdout F l{s}", at(s)))
        .collect();
    append(
        &p.path,
        &lines.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let (mut rx, _c) = start(
        &p.rt,
        pb::LogRequest {
            since_unix_nanos: nanos(2),
            until_unix_nanos: nanos(4),
            ..request(1)
        },
    );
    assert_eq!(text(&all(&mut rx).await), "l2\nl3\n");
}

#[tokio::test]
async fn tail_sends_the_last_lines_counting_a_split_line_once() {
    let p = pod(ContainerState::Exited);
    append(
        &p.path,
        &[
            &format!("{} stdout F one", at(1)),
            &format!("{} stdout P tw", at(2)),
            &format!("{} stderr F err", at(2)),
            &format!("{} stdout F o", at(3)),
            &format!("{} stdout F three", at(4)),
        ],
    );
    let tail = |n, stderr| pb::LogRequest {
        tail: n,
        stderr,
        ..request(1)
    };
    let (mut rx, _c) = start(&p.rt, tail(2, false));
    assert_eq!(text(&all(&mut rx).await), "two\nthree\n");
    // Lines are counted in the order they start: "two" starts before "err".
    let (mut rx, _c) = start(&p.rt, tail(3, true));
    assert_eq!(text(&all(&mut rx).await), "twerr\no\nthree\n");
    let (mut rx, _c) = start(&p.rt, tail(0, true));
    assert_eq!(text(&all(&mut rx).await), "");
    let (mut rx, _c) = start(&p.rt, tail(-1, true));
    assert_eq!(text(&all(&mut rx).await), "one\ntwerr\no\nthree\n");
    let (mut rx, _c) = start(&p.rt, tail(100, true));
    assert_eq!(text(&all(&mut rx).await), "one\ntwerr\no\nthree\n");
}

#[tokio::test]
async fn malformed_lines_are_skipped_and_the_others_still_arrive() {
    let p = pod(ContainerState::Exited);
    append(
        &p.path,
        &[
            "not a log line",
            &format!("{} stdout F good", at(1)),
            &format!("{} stdin F bad stream", at(2)),
            "yesterday stdout F bad time",
            &format!("{} stdout X bad tag", at(3)),
            "",
            &format!("{} stderr F also good", at(4)),
        ],
    );
    let batches = all(&mut start(&p.rt, request(1)).0).await;
    assert_eq!(error(&batches), "");
    assert_eq!(text(&batches), "good\nalso good\n");
}

#[tokio::test]
async fn batches_stay_within_64_kib_and_keep_the_file_order() {
    let p = pod(ContainerState::Exited);
    let lines: Vec<_> = (0..3000)
        .map(|i| format!("{} stdout F {i:05} {}", at(1), "x".repeat(100)))
        .collect();
    append(
        &p.path,
        &lines.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let batches = all(&mut start(&p.rt, request(1)).0).await;
    assert!(batches.len() >= 5, "{} batches for ~320 KB", batches.len());
    for b in &batches {
        assert!(
            b.encoded_len() <= 64 * 1024,
            "a batch of {} bytes",
            b.encoded_len()
        );
    }
    let want: String = (0..3000)
        .map(|i| format!("{i:05} {}\n", "x".repeat(100)))
        .collect();
    assert_eq!(text(&batches), want);
}

#[tokio::test]
async fn a_line_longer_than_a_batch_is_cut_into_pieces_that_add_up_to_it() {
    let p = pod(ContainerState::Exited);
    let long = "y".repeat(200 * 1024);
    append(
        &p.path,
        &[
            &format!("{} stdout F {long}", at(1)),
            &format!("{} stdout F after", at(2)),
        ],
    );
    let batches = all(&mut start(&p.rt, request(1)).0).await;
    for b in &batches {
        assert!(
            b.encoded_len() <= 64 * 1024,
            "a batch of {} bytes",
            b.encoded_len()
        );
    }
    let e = entries(&batches);
    assert!(e.len() >= 5);
    assert!(
        e[..e.len() - 2].iter().all(|e| !e.data.ends_with(b"\n")),
        "only the last piece ends the line"
    );
    assert_eq!(text(&batches), format!("{long}\nafter\n"));
}

#[tokio::test]
async fn an_unknown_container_ends_the_stream_with_an_error_naming_pod_and_container() {
    let p = pod(ContainerState::Running);
    let batches = all(&mut start(
        &p.rt,
        pb::LogRequest {
            container_name: "sidecar".into(),
            ..request(3)
        },
    )
    .0)
    .await;
    assert_eq!(batches.len(), 1);
    let e = error(&batches);
    assert!(e.contains(POD) && e.contains("sidecar"), "{e}");
}

#[tokio::test]
async fn the_newest_attempt_of_the_container_is_read() {
    let p = pod(ContainerState::Exited);
    append(&p.path, &[&format!("{} stdout F first attempt", at(1))]);
    let second = p.path.with_file_name("1.log");
    append(&second, &[&format!("{} stdout F second attempt", at(2))]);
    p.rt.add_container(
        POD,
        NAME,
        2,
        ContainerLog {
            id: "c-1".into(),
            log_path: second,
            state: ContainerState::Running,
        },
    );
    let batches = all(&mut start(&p.rt, request(1)).0).await;
    assert_eq!(text(&batches), "second attempt\n");
}

#[tokio::test]
async fn an_exited_container_without_its_log_file_is_an_error_naming_the_file() {
    let p = pod(ContainerState::Exited);
    let batches = all(&mut start(&p.rt, request(1)).0).await;
    let e = error(&batches);
    assert!(
        e.contains(POD) && e.contains(NAME) && e.contains(&p.path.display().to_string()),
        "{e}"
    );
    assert!(e.contains("/var/log/pods"), "says what to check: {e}");
}

#[tokio::test]
async fn a_request_for_neither_stream_is_refused() {
    let p = pod(ContainerState::Running);
    let req = pb::LogRequest {
        stdout: false,
        stderr: false,
        ..request(1)
    };
    let batches = all(&mut start(&p.rt, req).0).await;
    assert!(error(&batches).contains("neither stdout nor stderr"));
}

#[tokio::test]
async fn a_container_still_being_created_has_an_empty_log() {
    let p = pod(ContainerState::Created);
    let batches = all(&mut start(&p.rt, request(1)).0).await;
    assert_eq!(error(&batches), "");
    assert_eq!(text(&batches), "");
}

#[tokio::test]
async fn following_sends_new_lines_and_ends_once_the_container_exited_and_the_file_is_drained() {
    let p = pod(ContainerState::Running);
    append(&p.path, &[&format!("{} stdout F before", at(1))]);
    let (mut rx, _c) = start(
        &p.rt,
        pb::LogRequest {
            follow: true,
            ..request(1)
        },
    );
    let mut seen = String::new();
    until_text(&mut rx, &mut seen, "before\n").await;
    append(
        &p.path,
        &[
            &format!("{} stdout P wri", at(2)),
            &format!("{} stdout F tten later", at(3)),
        ],
    );
    until_text(&mut rx, &mut seen, "written later\n").await;
    // The last words and the exit come together: the stream still sends them.
    append(&p.path, &[&format!("{} stderr F last words", at(4))]);
    p.rt.set_container_state("c-0", ContainerState::Exited);
    let rest = all(&mut rx).await;
    assert_eq!(error(&rest), "");
    seen.push_str(&text(&rest));
    assert_eq!(seen, "before\nwritten later\nlast words\n");
}

#[tokio::test]
async fn following_waits_for_the_log_file_of_a_starting_container() {
    let p = pod(ContainerState::Created);
    let (mut rx, _c) = start(
        &p.rt,
        pb::LogRequest {
            follow: true,
            ..request(1)
        },
    );
    p.rt.set_container_state("c-0", ContainerState::Running);
    append(&p.path, &[&format!("{} stdout F started", at(1))]);
    let mut seen = String::new();
    until_text(&mut rx, &mut seen, "started\n").await;
    p.rt.set_container_state("c-0", ContainerState::Exited);
    let rest = all(&mut rx).await;
    assert_eq!(error(&rest), "");
    assert_eq!(seen + &text(&rest), "started\n");
}

#[tokio::test]
async fn following_goes_on_in_the_new_file_after_a_rotation() {
    let p = pod(ContainerState::Running);
    append(&p.path, &[&format!("{} stdout F old file", at(1))]);
    let (mut rx, _c) = start(
        &p.rt,
        pb::LogRequest {
            follow: true,
            ..request(1)
        },
    );
    let mut seen = String::new();
    until_text(&mut rx, &mut seen, "old file\n").await;
    // What the kubelet does: rename, and the runtime reopens the path.
    let rotated = p.path.with_file_name("0.log.20240501-120002");
    append(
        &p.path,
        &[&format!("{} stdout F written before the rename", at(2))],
    );
    std::fs::rename(&p.path, &rotated).unwrap();
    append(
        &rotated,
        &[&format!("{} stdout F written before the reopen", at(2))],
    );
    append(&p.path, &[&format!("{} stdout F new file", at(3))]);
    until_text(&mut rx, &mut seen, "new file\n").await;
    p.rt.set_container_state("c-0", ContainerState::Exited);
    seen.push_str(&text(&all(&mut rx).await));
    assert_eq!(
        seen,
        "old file\nwritten before the rename\nwritten before the reopen\nnew file\n"
    );
}

#[tokio::test]
async fn a_cancelled_stream_sends_its_final_message_and_the_others_go_on() {
    let p = pod(ContainerState::Running);
    append(&p.path, &[&format!("{} stdout F hello", at(1))]);
    let (tx, mut rx) = mpsc::channel(16);
    let mut streams = LogStreams::new(p.rt.clone(), "node-a", tx);
    let follow = |id| pb::LogRequest {
        follow: true,
        ..request(id)
    };
    streams.start(follow(1));
    streams.start(follow(2));
    let mut hello = [false, false];
    while hello != [true, true] {
        let d = next(&mut rx).await;
        assert!(!d.end, "{d:?}");
        let i = d.stream_id as usize - 1;
        hello[i] = text(&[d]) == "hello\n";
    }
    streams.cancel(1);
    let d = next(&mut rx).await;
    assert_eq!((d.stream_id, d.end, d.error.as_str()), (1, true, ""));

    append(&p.path, &[&format!("{} stdout F only two", at(2))]);
    let d = next(&mut rx).await;
    assert_eq!((d.stream_id, text(&[d])), (2, "only two\n".to_string()));
    p.rt.set_container_state("c-0", ContainerState::Exited);
    let d = next(&mut rx).await;
    assert_eq!((d.stream_id, d.end, d.error.as_str()), (2, true, ""));
    assert_eq!(streams.running(), 0);
}

#[tokio::test]
async fn streams_stop_without_a_word_when_the_session_ends() {
    let p = pod(ContainerState::Running);
    append(&p.path, &[&format!("{} stdout F hello", at(1))]);
    let (tx, mut rx) = mpsc::channel(16);
    let mut streams = LogStreams::new(p.rt.clone(), "node-a", tx);
    streams.start(pb::LogRequest {
        follow: true,
        ..request(1)
    });
    assert_eq!(text(&[next(&mut rx).await]), "hello\n");
    drop(streams);
    // Every sender is gone once the stream's task has stopped.
    match tokio::time::timeout(DEADLINE, rx.recv()).await {
        Ok(None) => {}
        Ok(Some(m)) => panic!("a stream spoke after its session ended: {m:?}"),
        Err(_) => panic!("the stream still runs {DEADLINE:?} after its session ended"),
    }
}

#[tokio::test]
async fn following_with_a_past_until_stops_at_the_end_of_the_file() {
    let p = pod(ContainerState::Running);
    append(
        &p.path,
        &[
            &format!("{} stdout F in", at(1)),
            &format!("{} stdout F out", at(3)),
        ],
    );
    let req = pb::LogRequest {
        follow: true,
        until_unix_nanos: nanos(2),
        ..request(1)
    };
    let batches = all(&mut start(&p.rt, req).0).await;
    assert_eq!(text(&batches), "in\n");
}
