//! `docker exec` through the shim, driven as the docker CLI and
//! testcontainers drive it (create → start, hijacked → inspect) against the
//! fake coordinator, whose exec interprets a few shell commands.

mod client;
mod fake;

use std::time::Duration;

use bytes::Bytes;
use client::{call, create, frames, send};
use http::{Request, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Creates and starts a container that runs until stopped.
async fn running(h: &fake::Harness, name: &str) -> String {
    let id = create(
        h,
        name,
        json!({"Image": "busybox", "Labels": {"test.run": "forever"}}),
    )
    .await;
    let start = call(h, "POST", &format!("/containers/{id}/start"), "").await;
    assert_eq!(start.status, StatusCode::NO_CONTENT);
    id
}

async fn exec_create(h: &fake::Harness, container: &str, config: Value) -> String {
    let a = call(
        h,
        "POST",
        &format!("/v1.47/containers/{container}/exec"),
        config.to_string(),
    )
    .await;
    assert_eq!(
        a.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    a.json()["Id"].as_str().unwrap().to_string()
}

/// Starts an exec the docker CLI's way: hijacked, `101 UPGRADED`.
async fn exec_hijack(
    h: &fake::Harness,
    exec: &str,
    body: Value,
) -> (http::HeaderMap, TokioIo<hyper::upgrade::Upgraded>) {
    let resp = send(
        h.addr,
        Request::builder()
            .method("POST")
            .uri(format!("/v1.47/exec/{exec}/start"))
            .header("host", "docker")
            .header("content-type", "application/json")
            .header("connection", "Upgrade")
            .header("upgrade", "tcp")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let headers = resp.headers().clone();
    let conn = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    (headers, conn)
}

async fn exec_inspect(h: &fake::Harness, exec: &str) -> Value {
    let a = call(h, "GET", &format!("/exec/{exec}/json"), "").await;
    assert_eq!(a.status, StatusCode::OK);
    a.json()
}

#[tokio::test]
async fn docker_exec_sequence_keeps_stdout_and_stderr_apart_and_reports_the_exit_code() {
    let h = fake::start().await;
    let container = running(&h, "svc").await;
    let exec = exec_create(
        &h,
        "svc",
        json!({"AttachStdout": true, "AttachStderr": true, "Tty": false, "User": "",
               "Privileged": false, "Cmd": ["sh", "-c", "echo X; echo Y >&2; exit 4"]}),
    )
    .await;
    assert_eq!(exec.len(), 64);
    let before = exec_inspect(&h, &exec).await;
    assert_eq!(before["Running"], false);
    assert_eq!(before["ExitCode"], Value::Null);
    assert_eq!(before["ContainerID"], container.as_str());
    assert_eq!(before["ProcessConfig"]["entrypoint"], "sh");
    assert_eq!(
        before["ProcessConfig"]["arguments"],
        json!(["-c", "echo X; echo Y >&2; exit 4"])
    );

    let (headers, mut conn) = exec_hijack(&h, &exec, json!({"Detach": false, "Tty": false})).await;
    assert_eq!(
        headers["content-type"],
        "application/vnd.docker.multiplexed-stream"
    );
    assert_eq!(headers["upgrade"], "tcp");
    let mut output = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut output))
        .await
        .expect("the stream ends when the command does")
        .unwrap();
    assert_eq!(frames(&output), [(1, "X\n".into()), (2, "Y\n".into())]);

    let after = exec_inspect(&h, &exec).await;
    assert_eq!(after["Running"], false);
    assert_eq!(after["ExitCode"], 4);
    let again = call(&h, "POST", &format!("/exec/{exec}/start"), "{}").await;
    assert_eq!(again.status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn stdin_reaches_the_command_and_its_half_close_ends_it() {
    let h = fake::start().await;
    running(&h, "svc").await;
    let exec = exec_create(
        &h,
        "svc",
        json!({"AttachStdin": true, "AttachStdout": true, "AttachStderr": true, "Cmd": ["cat"]}),
    )
    .await;
    let (_, mut conn) = exec_hijack(&h, &exec, json!({})).await;
    conn.write_all(b"hello\n").await.unwrap();
    let mut first = [0u8; 8 + 6];
    tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut first))
        .await
        .expect("the echo within 10 s")
        .unwrap();
    assert_eq!(frames(&first), [(1, "hello\n".into())]);
    let open = exec_inspect(&h, &exec).await;
    assert_eq!(
        (open["Running"].clone(), open["ExitCode"].clone()),
        (json!(true), Value::Null),
        "running while its stream is open"
    );
    assert_eq!(open["OpenStdin"], true);

    conn.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut rest))
        .await
        .expect("cat ends at end of stdin")
        .unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    let done = exec_inspect(&h, &exec).await;
    assert_eq!(
        (done["Running"].clone(), done["ExitCode"].clone()),
        (json!(false), json!(0))
    );
}

#[tokio::test]
async fn a_tty_exec_is_raw_and_gets_its_env_and_working_dir() {
    let h = fake::start().await;
    running(&h, "svc").await;
    let exec = exec_create(
        &h,
        "svc",
        json!({"AttachStdout": true, "Tty": true, "Env": ["GREETING=hi"], "WorkingDir": "/srv",
               "Cmd": ["sh", "-c", "printenv GREETING; pwd"]}),
    )
    .await;
    let (headers, mut conn) = exec_hijack(&h, &exec, json!({"Tty": true})).await;
    assert_eq!(headers["content-type"], "application/vnd.docker.raw-stream");
    let mut output = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut output))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&output), "hi\n/srv\n");
    assert_eq!(exec_inspect(&h, &exec).await["ProcessConfig"]["tty"], true);
}

#[tokio::test]
async fn an_exec_started_without_an_upgrade_streams_its_output_in_the_body() {
    let h = fake::start().await;
    running(&h, "svc").await;
    let exec = exec_create(
        &h,
        "svc",
        json!({"AttachStdout": true, "AttachStderr": true, "Cmd": ["sh", "-c", "echo out; exit 2"]}),
    )
    .await;
    let a = call(&h, "POST", &format!("/exec/{exec}/start"), "{}").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        a.headers["content-type"],
        "application/vnd.docker.raw-stream"
    );
    assert_eq!(frames(&a.body), [(1, "out\n".into())]);
    assert_eq!(exec_inspect(&h, &exec).await["ExitCode"], 2);
}

#[tokio::test]
async fn a_detached_exec_answers_at_once_and_records_its_exit_code() {
    let h = fake::start().await;
    running(&h, "svc").await;
    let exec = exec_create(
        &h,
        "svc",
        json!({"AttachStdout": true, "Cmd": ["sh", "-c", "echo ignored; exit 7"]}),
    )
    .await;
    let a = call(
        &h,
        "POST",
        &format!("/exec/{exec}/start"),
        json!({"Detach": true}).to_string(),
    )
    .await;
    assert_eq!((a.status, a.body.len()), (StatusCode::OK, 0));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut last = Value::Null;
    while tokio::time::Instant::now() < deadline {
        last = exec_inspect(&h, &exec).await;
        if last["ExitCode"] == 7 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(last["ExitCode"], 7, "last inspect: {last}");
    assert_eq!(last["Running"], false);
}

#[tokio::test]
async fn a_command_that_cannot_run_reports_why_and_a_failing_code() {
    let h = fake::start().await;
    running(&h, "svc").await;
    let exec = exec_create(
        &h,
        "svc",
        json!({"AttachStdout": true, "AttachStderr": true, "Cmd": ["nosuchcmd"]}),
    )
    .await;
    let (_, mut conn) = exec_hijack(&h, &exec, json!({})).await;
    let mut output = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut output))
        .await
        .unwrap()
        .unwrap();
    let frames = frames(&output);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].0, 2);
    assert!(
        frames[0].1.contains("executable file not found"),
        "{frames:?}"
    );
    assert_eq!(exec_inspect(&h, &exec).await["ExitCode"], 127);
}

#[tokio::test]
async fn exec_is_refused_in_a_container_that_is_not_running_or_missing() {
    let h = fake::start().await;
    let id = create(&h, "idle", json!({"Image": "busybox"})).await;
    let body = json!({"AttachStdout": true, "Cmd": ["true"]}).to_string();
    let idle = call(&h, "POST", "/containers/idle/exec", body.clone()).await;
    assert_eq!(
        (idle.status, idle.message()),
        (
            StatusCode::CONFLICT,
            format!("Container {id} is not running")
        )
    );
    let missing = call(&h, "POST", "/containers/nope/exec", body).await;
    assert_eq!(
        (missing.status, missing.message().as_str()),
        (StatusCode::NOT_FOUND, "No such container: nope")
    );
}

#[tokio::test]
async fn exec_settings_the_pod_exec_api_cannot_honour_get_400() {
    let h = fake::start().await;
    running(&h, "svc").await;
    for (config, needle) in [
        (json!({"Cmd": ["id"], "User": "root"}), "User"),
        (json!({"Cmd": ["id"], "Privileged": true}), "Privileged"),
        (json!({"Cmd": []}), "No exec command specified"),
    ] {
        let a = call(&h, "POST", "/containers/svc/exec", config.to_string()).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{config}");
        assert!(a.message().contains(needle), "{config}: {}", a.message());
    }
}

#[tokio::test]
async fn unknown_exec_instances_are_404() {
    let h = fake::start().await;
    let inspect = call(&h, "GET", "/v1.47/exec/abc123/json", "").await;
    assert_eq!(
        (inspect.status, inspect.message().as_str()),
        (StatusCode::NOT_FOUND, "No such exec instance: abc123")
    );
    let start = call(&h, "POST", "/exec/abc123/start", "{}").await;
    assert_eq!(
        (start.status, start.message().as_str()),
        (StatusCode::NOT_FOUND, "No such exec instance: abc123")
    );
}
