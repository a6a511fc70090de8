//! The shim's HTTP layer, driven by a real HTTP/1.1 client against an
//! in-process fake coordinator (see `fake`): what Docker clients send, what
//! they get back. `docker exec` has its own file, `exec.rs`.

mod client;
mod fake;

use std::time::Duration;

use bytes::Bytes;
use client::{call, create, frames, request, send};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

#[tokio::test]
async fn ping_answers_ok_with_dockers_headers_on_every_version() {
    let h = fake::start().await;
    for path in ["/_ping", "/v1.24/_ping", "/v1.47/_ping"] {
        let a = call(&h, "GET", path, "").await;
        assert_eq!(
            (a.status, &a.body[..]),
            (StatusCode::OK, &b"OK"[..]),
            "{path}"
        );
        assert_eq!(a.headers["api-version"], "1.47");
        assert_eq!(a.headers["docker-experimental"], "false");
        assert_eq!(a.headers["ostype"], "linux");
        assert!(a.headers["server"].to_str().unwrap().starts_with("Berth/"));
    }
    let head = call(&h, "HEAD", "/_ping", "").await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(
        call(&h, "GET", "/v1.48/_ping", "").await.status,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn version_and_info_say_it_is_berth_and_count_the_namespaces_containers() {
    let h = fake::start().await;
    let v = call(&h, "GET", "/version", "").await.json();
    assert_eq!(
        (v["ApiVersion"].as_str(), v["MinAPIVersion"].as_str()),
        (Some("1.47"), Some("1.24"))
    );
    create(&h, "one", json!({"Image": "busybox"})).await;
    let info = call(&h, "GET", "/v1.41/info", "").await;
    assert_eq!(info.status, StatusCode::OK);
    let i = info.json();
    assert_eq!(i["Driver"], "berth");
    assert_eq!(i["ID"], "shim-id");
    assert_eq!(i["Containers"], 1);
    assert_eq!(i["ContainersStopped"], 1);
}

#[tokio::test]
async fn unknown_paths_are_404_and_unimplemented_endpoints_501() {
    let h = fake::start().await;
    let missing = call(&h, "GET", "/frobnicate", "").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.message(), "page not found");
    let net = call(&h, "POST", "/v1.44/networks/prune", "{}").await;
    assert_eq!(net.status, StatusCode::NOT_IMPLEMENTED);
    assert_eq!(
        net.message(),
        "Berth does not support POST /networks/prune yet"
    );
}

#[tokio::test]
async fn docker_run_sequence_reports_the_real_exit_code_and_output() {
    let h = fake::start().await;
    let id = create(
        &h,
        "job",
        json!({"Image": "busybox", "Cmd": ["sh", "-c", "exit 3"],
               "Labels": {"test.out": "out\n", "test.err": "err\n", "test.exit": "3"}}),
    )
    .await;
    // Like the docker CLI: attach and wait before start.
    let attach = send(
        h.addr,
        Request::builder()
            .method("POST")
            .uri(format!(
                "/v1.47/containers/{id}/attach?stream=1&stdout=1&stderr=1"
            ))
            .header("host", "docker")
            .header("connection", "Upgrade")
            .header("upgrade", "tcp")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(attach.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(attach.headers()["upgrade"], "tcp");
    assert_eq!(
        attach.headers()["content-type"],
        "application/vnd.docker.multiplexed-stream"
    );
    let reason = attach
        .extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .map(|r| r.as_bytes().to_vec());
    assert_eq!(reason.as_deref(), Some(&b"UPGRADED"[..]));
    let mut upgraded = TokioIo::new(hyper::upgrade::on(attach).await.unwrap());
    let wait = send(
        h.addr,
        request(
            "POST",
            &format!("/containers/{id}/wait?condition=next-exit"),
            "",
        ),
    )
    .await;
    assert_eq!(
        wait.status(),
        StatusCode::OK,
        "the wait answers its headers before the start"
    );

    let start = call(&h, "POST", &format!("/containers/{id}/start"), "").await;
    assert_eq!(start.status, StatusCode::NO_CONTENT);

    let mut output = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), upgraded.read_to_end(&mut output))
        .await
        .expect("attach ends when the container does")
        .unwrap();
    assert_eq!(frames(&output), [(1, "out\n".into()), (2, "err\n".into())]);
    let waited = wait.into_body().collect().await.unwrap().to_bytes();
    let waited: Value = serde_json::from_slice(&waited).unwrap();
    assert_eq!(waited, json!({"StatusCode": 3, "Error": null}));

    let inspect = call(&h, "GET", &format!("/containers/{}/json", &id[..12]), "")
        .await
        .json();
    assert_eq!(inspect["State"]["Status"], "exited");
    assert_eq!(inspect["State"]["ExitCode"], 3);
    assert_eq!(inspect["Name"], "/job");
    assert_ne!(inspect["State"]["FinishedAt"], "0001-01-01T00:00:00Z");
}

#[tokio::test]
async fn logs_keep_stdout_and_stderr_apart_and_honour_the_stream_choice() {
    let h = fake::start().await;
    let id = create(
        &h,
        "logger",
        json!({"Image": "busybox", "Labels": {"test.out": "o1\n", "test.err": "e1\n"}}),
    )
    .await;
    call(&h, "POST", &format!("/containers/{id}/start"), "").await;
    let both = call(
        &h,
        "GET",
        "/containers/logger/logs?stdout=1&stderr=1&follow=1",
        "",
    )
    .await;
    assert_eq!(both.status, StatusCode::OK);
    assert_eq!(
        both.headers["content-type"],
        "application/vnd.docker.multiplexed-stream"
    );
    assert_eq!(frames(&both.body), [(1, "o1\n".into()), (2, "e1\n".into())]);
    let err_only = call(&h, "GET", "/v1.41/containers/logger/logs?stderr=1", "").await;
    assert_eq!(
        err_only.headers["content-type"],
        "application/vnd.docker.raw-stream"
    );
    assert_eq!(frames(&err_only.body), [(2, "e1\n".into())]);
    let stamped = call(
        &h,
        "GET",
        "/containers/logger/logs?stdout=1&timestamps=1",
        "",
    )
    .await;
    let (_, line) = &frames(&stamped.body)[0];
    assert!(line.ends_with("Z o1\n") && line.len() == 31 + 3, "{line:?}");
    let none = call(&h, "GET", "/containers/logger/logs", "").await;
    assert_eq!(none.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_tty_containers_logs_are_raw() {
    let h = fake::start().await;
    let id = create(
        &h,
        "tty",
        json!({"Image": "busybox", "Tty": true, "Labels": {"test.out": "hi\r\n"}}),
    )
    .await;
    call(&h, "POST", &format!("/containers/{id}/start"), "").await;
    let a = call(&h, "GET", "/containers/tty/logs?stdout=1&stderr=1", "").await;
    assert_eq!(
        a.headers["content-type"],
        "application/vnd.docker.raw-stream"
    );
    assert_eq!(&a.body[..], b"hi\r\n");
}

#[tokio::test]
async fn bad_create_bodies_get_400_and_create_nothing() {
    let h = fake::start().await;
    let cases = [
        (
            json!({"Image": "busybox", "HostConfig": {"Privileged": true}}).to_string(),
            "Privileged",
        ),
        (
            json!({"Image": "busybox", "HostConfig": {"Binds": ["/:/host"]}}).to_string(),
            "bind mount",
        ),
        (
            json!({"Image": "busybox", "HostConfig": {"NetworkMode": "host"}}).to_string(),
            "NetworkMode",
        ),
        (
            json!({"Image": "busybox", "Env": "A=1"}).to_string(),
            "invalid type",
        ),
        (
            "{\"Image\": ".to_string(),
            "invalid container configuration",
        ),
        (String::new(), "cannot be empty"),
    ];
    for (body, needle) in cases {
        let a = call(&h, "POST", "/containers/create", body.clone()).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{body}");
        assert!(a.message().contains(needle), "{body}: {}", a.message());
    }
    let list = call(&h, "GET", "/containers/json?all=1", "").await.json();
    assert_eq!(list, json!([]));
}

#[tokio::test]
async fn an_oversized_body_is_refused_with_413() {
    let h = fake::start().await;
    let big = format!(
        "{{\"Image\": \"busybox\", \"Env\": [\"A={}\"]}}",
        "x".repeat(5 << 20)
    );
    let a = call(&h, "POST", "/containers/create", big).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(a.message().contains("larger than"), "{}", a.message());
}

#[tokio::test]
async fn coordinator_refusals_become_dockers_status_codes() {
    let h = fake::start().await;
    let a = call(&h, "GET", "/containers/nope/json", "").await;
    assert_eq!(
        (a.status, a.message().as_str()),
        (StatusCode::NOT_FOUND, "No such container: nope")
    );
    create(&h, "dup", json!({"Image": "busybox"})).await;
    let clash = call(
        &h,
        "POST",
        "/containers/create?name=dup",
        json!({"Image": "busybox"}).to_string(),
    )
    .await;
    assert_eq!(clash.status, StatusCode::CONFLICT);
    let no_network = call(
        &h,
        "POST",
        "/containers/create",
        json!({"Image": "busybox", "HostConfig": {"NetworkMode": "nowhere"}}).to_string(),
    )
    .await;
    assert_eq!(
        (no_network.status, no_network.message().as_str()),
        (StatusCode::NOT_FOUND, "network nowhere not found")
    );
    let stranger = fake::start_with_token("wrong").await;
    let refused = call(&stranger, "GET", "/containers/json", "").await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn stop_kill_and_remove_follow_dockers_rules() {
    let h = fake::start().await;
    let id = create(
        &h,
        "svc",
        json!({"Image": "busybox", "Labels": {"test.run": "forever"}}),
    )
    .await;
    assert_eq!(
        call(&h, "POST", "/containers/svc/start", "").await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        call(&h, "POST", "/containers/svc/start", "").await.status,
        StatusCode::NOT_MODIFIED
    );
    let busy = call(&h, "DELETE", "/containers/svc", "").await;
    assert_eq!(busy.status, StatusCode::CONFLICT);
    let hup = call(&h, "POST", "/containers/svc/kill?signal=SIGHUP", "").await;
    assert_eq!(hup.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        call(&h, "POST", "/containers/svc/stop?t=1", "")
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        call(&h, "POST", "/containers/svc/stop", "").await.status,
        StatusCode::NOT_MODIFIED
    );
    assert_eq!(
        call(&h, "POST", "/containers/svc/kill", "").await.status,
        StatusCode::CONFLICT
    );
    assert_eq!(
        call(&h, "DELETE", &format!("/containers/{id}?force=1&v=1"), "")
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        call(&h, "GET", "/containers/svc/json", "").await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn the_list_filters_by_label_and_shows_dockers_summary() {
    let h = fake::start().await;
    create(
        &h,
        "aa",
        json!({"Image": "busybox", "Labels": {"session": "1"},
                           "HostConfig": {"PortBindings": {"80/tcp": [{"HostPort": ""}]}}}),
    )
    .await;
    create(
        &h,
        "bb",
        json!({"Image": "busybox", "Labels": {"session": "2"}}),
    )
    .await;
    let filters = percent_encode(r#"{"label":{"session=1":true}}"#);
    let list = call(
        &h,
        "GET",
        &format!("/containers/json?all=1&filters={filters}"),
        "",
    )
    .await
    .json();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["Names"], json!(["/aa"]));
    assert_eq!(list[0]["State"], "created");
    assert_eq!(list[0]["Status"], "Created");
    let port = &list[0]["Ports"][0];
    assert_eq!(
        (port["PrivatePort"].as_u64(), port["Type"].as_str()),
        (Some(80), Some("tcp"))
    );
    assert!(
        port["PublicPort"].as_u64().unwrap() > 0,
        "the shim chose a host port"
    );
    let running = call(&h, "GET", "/containers/json", "").await.json();
    assert_eq!(running, json!([]), "without all, only running containers");
    let bad = call(
        &h,
        "GET",
        &format!(
            "/containers/json?filters={}",
            percent_encode("{\"ancestor\":[\"x\"]}")
        ),
        "",
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

fn percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[tokio::test]
async fn pulls_stream_progress_lines_and_report_failures_as_docker_does() {
    let h = fake::start().await;
    let ok = call(
        &h,
        "POST",
        "/v1.47/images/create?fromImage=busybox&tag=1.36",
        "",
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);
    let lines: Vec<Value> = ok
        .body
        .split(|b| *b == b'\n')
        .filter(|l| !l.trim_ascii().is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(
        lines,
        [
            json!({"status": "Resolving busybox:1.36"}),
            json!({"status": "Digest: sha256:abc"})
        ]
    );
    let missing = call(&h, "POST", "/images/create?fromImage=missing&tag=1", "").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let broken = call(&h, "POST", "/images/create?fromImage=broken&tag=1", "").await;
    assert_eq!(broken.status, StatusCode::OK);
    let last = broken
        .body
        .split(|b| *b == b'\n')
        .rfind(|l| !l.trim_ascii().is_empty())
        .unwrap();
    let last: Value = serde_json::from_slice(last).unwrap();
    assert!(
        last["errorDetail"]["message"]
            .as_str()
            .unwrap()
            .contains("registry went away"),
        "{last}"
    );
    assert_eq!(last["error"], last["errorDetail"]["message"]);
}

#[tokio::test]
async fn image_inspect_takes_names_with_slashes_and_404s_missing_images() {
    let h = fake::start().await;
    let a = call(&h, "GET", "/v1.47/images/host:5000/team/app:1/json", "").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json()["RepoTags"], json!(["host:5000/team/app:1"]));
    assert_eq!(a.json()["Id"], "sha256:cfg");
    let m = call(&h, "GET", "/images/missing:2/json", "").await;
    assert_eq!(
        (m.status, m.message().as_str()),
        (StatusCode::NOT_FOUND, "No such image: missing:2")
    );
}

#[tokio::test]
async fn run_rm_wait_for_removal_returns_the_exit_code() {
    let h = fake::start().await;
    let id = create(&h, "gone", json!({"Image": "busybox", "Labels": {"test.exit": "5"}, "HostConfig": {"AutoRemove": true}})).await;
    let wait = send(
        h.addr,
        request(
            "POST",
            &format!("/containers/{id}/wait?condition=removed"),
            "",
        ),
    )
    .await;
    call(&h, "POST", &format!("/containers/{id}/start"), "").await;
    let body = tokio::time::timeout(Duration::from_secs(10), wait.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["StatusCode"], 5);
    assert_eq!(
        call(&h, "GET", "/containers/gone/json", "").await.status,
        StatusCode::NOT_FOUND
    );
    let bad = call(&h, "POST", "/containers/x/wait?condition=soon", "").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn the_api_is_served_on_a_unix_socket_too_replacing_a_stale_one() {
    let h = fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("docker.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let listener = berth_docker_shim::http::bind_unix(&path).unwrap();
    tokio::spawn(berth_docker_shim::http::serve_unix(
        h.shim.clone(),
        listener,
    ));
    let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(request("GET", "/v1.44/_ping", ""))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        &resp.into_body().collect().await.unwrap().to_bytes()[..],
        b"OK"
    );
}

#[tokio::test]
async fn the_default_bridge_is_shown_but_not_changed_and_bad_network_bodies_are_400() {
    let h = fake::start().await;
    let builtin = "/v1.47/networks?filters=%7B%22type%22%3A%5B%22builtin%22%5D%7D";
    let nets = call(&h, "GET", builtin, "").await;
    assert_eq!(nets.status, StatusCode::OK);
    assert_eq!(nets.json()[0]["Name"], "bridge");
    let net = call(&h, "GET", "/networks/bridge", "").await;
    assert_eq!(
        (net.status, net.json()["Driver"].clone()),
        (StatusCode::OK, json!("bridge"))
    );
    let rm = call(&h, "DELETE", "/networks/bridge", "").await;
    assert_eq!(rm.status, StatusCode::FORBIDDEN);
    for body in [
        r#"{"Name":"n","Driver":"overlay"}"#,
        "{",
        r#"{"Name":["x"]}"#,
    ] {
        let bad = call(&h, "POST", "/networks/create", body).await;
        assert_eq!(
            bad.status,
            StatusCode::BAD_REQUEST,
            "{body}: {}",
            bad.message()
        );
    }
    let bad = call(&h, "POST", "/networks/n1/connect", "{}").await;
    assert_eq!(
        (bad.status, bad.message().as_str()),
        (StatusCode::BAD_REQUEST, "Container is required")
    );
    let vols = call(&h, "GET", "/volumes", "").await;
    assert_eq!(
        (vols.status, vols.json()),
        (StatusCode::OK, json!({"Volumes": [], "Warnings": []}))
    );
    let vol = call(&h, "GET", "/v1.24/volumes/data", "").await;
    assert_eq!(
        (vol.status, vol.message().as_str()),
        (StatusCode::NOT_FOUND, "get data: no such volume")
    );
}
