//! `docker cp`: `HEAD|GET|PUT /containers/{id}/archive?path=`. With a
//! running container, done with `stat` and `tar` run in it through
//! `Containers/Exec` (so the image needs them, as busybox and most
//! distributions have). Before it runs (testcontainers' copy-to-container,
//! `docker create` then `docker cp`), a PUT goes to `Containers/Upload`,
//! which keeps the regular files and mounts them read-only into each run;
//! HEAD then knows only those files, and paths ending in `/` (taken as
//! directories); GET needs the container running.

use base64::Engine;
use berth_proto::agent::LogStream;
use berth_proto::api::{ExecInput, ExecStart, exec_input, exec_output};
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::json;

use super::{Body, Query, Shim};
use crate::error::{ShimError, Subject};

/// Largest archive copied in either direction.
pub const MAX_ARCHIVE: usize = 64 << 20;

/// What a command run for an archive call printed, and how it ended.
struct Ran {
    stdout: Vec<u8>,
    stderr: String,
    exit_code: i32,
}

/// Runs `cmd` in the container, feeding it `stdin`, collecting at most
/// [`MAX_ARCHIVE`] bytes of output.
async fn run(shim: &Shim, id: &str, cmd: &[&str], stdin: Option<Bytes>) -> Result<Ran, ShimError> {
    let start = ExecStart {
        namespace: shim.coordinator.namespace.clone(),
        id: id.to_string(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        attach_stdin: stdin.is_some(),
        attach_stdout: true,
        attach_stderr: true,
        ..Default::default()
    };
    let input = |kind| ExecInput { kind: Some(kind) };
    let mut messages = vec![input(exec_input::Kind::Start(start))];
    if let Some(data) = stdin {
        for chunk in data.chunks(32 << 10) {
            messages.push(input(exec_input::Kind::Stdin(chunk.to_vec())));
        }
        messages.push(input(exec_input::Kind::CloseStdin(true)));
    }
    let mut output = shim
        .coordinator
        .containers
        .clone()
        .exec(futures::stream::iter(messages))
        .await
        .map_err(|s| ShimError::grpc(Subject::Container(id.to_string()), s))?
        .into_inner();
    let mut ran = Ran {
        stdout: Vec::new(),
        stderr: String::new(),
        exit_code: -1,
    };
    while let Some(m) = output
        .message()
        .await
        .map_err(|s| ShimError::grpc(Subject::Container(id.to_string()), s))?
    {
        match m.kind {
            Some(exec_output::Kind::Output(chunk)) => {
                if chunk.stream == LogStream::Stderr as i32 {
                    ran.stderr.push_str(&String::from_utf8_lossy(&chunk.data));
                } else {
                    ran.stdout.extend_from_slice(&chunk.data);
                }
                if ran.stdout.len() > MAX_ARCHIVE {
                    return Err(ShimError::BadRequest(format!(
                        "the archive is larger than Berth copies ({MAX_ARCHIVE} bytes)"
                    )));
                }
            }
            Some(exec_output::Kind::Exit(e)) => {
                ran.exit_code = e.exit_code;
                if !e.error.is_empty() {
                    ran.stderr.push_str(&e.error);
                }
            }
            None => {}
        }
    }
    Ok(ran)
}

/// Docker's `FileMode` bits from a unix `st_mode`.
pub fn go_mode(unix: u32) -> u32 {
    const DIR: u32 = 1 << 31;
    const SYMLINK: u32 = 1 << 27;
    let kind = match unix & 0o170000 {
        0o040000 => DIR,
        0o120000 => SYMLINK,
        _ => 0,
    };
    kind | (unix & 0o777)
}

/// The `X-Docker-Container-Path-Stat` JSON from a `stat -c '%n|%s|%f|%Y'`
/// line, or `None` if the line is not one.
pub fn path_stat(line: &str) -> Option<serde_json::Value> {
    let mut parts = line.trim_end().rsplitn(4, '|');
    let mtime: i64 = parts.next()?.parse().ok()?;
    let mode = u32::from_str_radix(parts.next()?, 16).ok()?;
    let size: i64 = parts.next()?.parse().ok()?;
    let path = parts.next()?;
    let name = path.rsplit('/').find(|s| !s.is_empty()).unwrap_or("/");
    let mtime = crate::docker::time::fixed_nanos(mtime.saturating_mul(1_000_000_000));
    Some(json!({
        "name": name,
        "size": size,
        "mode": go_mode(mode),
        "mtime": mtime,
        "linkTarget": "",
    }))
}

fn required_path(query: &Query) -> Result<String, ShimError> {
    match query.get("path") {
        Some(p) if !p.is_empty() => Ok(p.to_string()),
        _ => Err(ShimError::BadRequest("path is required".into())),
    }
}

/// Archive calls run commands in the container, so it must be running.
async fn ensure_running(shim: &Shim, id: &str) -> Result<(), ShimError> {
    let info = super::containers::fetch(shim, id).await?;
    if super::containers::is_running(&info) {
        Ok(())
    } else {
        Err(ShimError::Conflict(format!(
            "container {id} is not running: Berth reads files from running containers only"
        )))
    }
}

/// What a container that is not running can say of `path`: an uploaded
/// file's stat, a directory for a path ending in `/`, else not found.
fn stat_before_start(
    info: &berth_proto::api::ContainerInfo,
    id: &str,
    path: &str,
) -> Result<serde_json::Value, ShimError> {
    let uploads = info
        .spec
        .as_ref()
        .map(|s| s.uploads.as_slice())
        .unwrap_or(&[]);
    let wanted = path.trim_end_matches('/');
    if let Some(u) = uploads.iter().find(|u| u.path == wanted) {
        let name = wanted.rsplit('/').next().unwrap_or(wanted);
        return Ok(json!({"name": name, "size": u.size, "mode": u.mode,
                         "mtime": crate::docker::time::fixed_nanos(0), "linkTarget": ""}));
    }
    if path.ends_with('/') {
        let name = wanted.rsplit('/').find(|s| !s.is_empty()).unwrap_or("/");
        return Ok(json!({"name": name, "size": 0, "mode": go_mode(0o040755),
                         "mtime": crate::docker::time::fixed_nanos(0), "linkTarget": ""}));
    }
    Err(ShimError::NoSuchPath(format!(
        "Could not find the file {path} in container {id} (it is not running: Berth sees only files copied in)"
    )))
}

async fn stat(shim: &Shim, id: &str, path: &str) -> Result<serde_json::Value, ShimError> {
    ensure_running(shim, id).await?;
    let ran = run(shim, id, &["stat", "-c", "%n|%s|%f|%Y", path], None).await?;
    if ran.exit_code != 0 {
        return Err(ShimError::NoSuchPath(format!(
            "Could not find the file {path} in container {id}"
        )));
    }
    path_stat(&String::from_utf8_lossy(&ran.stdout)).ok_or_else(|| {
        ShimError::Internal(format!(
            "cannot read what stat said of {path}: {:?}",
            String::from_utf8_lossy(&ran.stdout)
        ))
    })
}

fn stat_header(stat: &serde_json::Value) -> Result<HeaderValue, ShimError> {
    let encoded = base64::engine::general_purpose::STANDARD.encode(stat.to_string());
    HeaderValue::from_str(&encoded).map_err(|e| ShimError::Internal(e.to_string()))
}

/// `HEAD /containers/{id}/archive?path=`: the path's stat, in a header.
pub async fn head(shim: &Shim, id: &str, query: &Query) -> Result<Response<Body>, ShimError> {
    let path = required_path(query)?;
    let info = super::containers::fetch(shim, id).await?;
    let stat = if super::containers::is_running(&info) {
        stat(shim, id, &path).await?
    } else {
        stat_before_start(&info, id, &path)?
    };
    let mut resp = super::empty(StatusCode::OK);
    resp.headers_mut()
        .insert("X-Docker-Container-Path-Stat", stat_header(&stat)?);
    Ok(resp)
}

/// `GET /containers/{id}/archive?path=`: a tar of the path, named by its
/// last component, with its stat in a header.
pub async fn get(shim: &Shim, id: &str, query: &Query) -> Result<Response<Body>, ShimError> {
    let path = required_path(query)?;
    let stat = stat(shim, id, &path).await?;
    let trimmed = path.trim_end_matches('/');
    let (parent, base) = match trimmed.rsplit_once('/') {
        Some(("", b)) => ("/", b),
        Some((p, b)) => (p, b),
        None => (".", trimmed),
    };
    let base = if base.is_empty() { "." } else { base };
    let ran = run(shim, id, &["tar", "cf", "-", "-C", parent, base], None).await?;
    if ran.exit_code != 0 {
        return Err(ShimError::Internal(format!(
            "tar in the container failed ({}): {}",
            ran.exit_code,
            ran.stderr.trim()
        )));
    }
    let mut resp = Response::new(super::full(Bytes::from(ran.stdout)));
    resp.headers_mut()
        .insert("X-Docker-Container-Path-Stat", stat_header(&stat)?);
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-tar"),
    );
    Ok(resp)
}

/// `PUT /containers/{id}/archive?path=DIR`: unpacks the body (a tar) into
/// the directory: in a running container with its `tar`, else kept for
/// every later run (`Containers/Upload`).
pub async fn put(
    shim: &Shim,
    id: &str,
    query: &Query,
    body: Incoming,
) -> Result<Response<Body>, ShimError> {
    let path = required_path(query)?;
    let running = super::containers::is_running(&super::containers::fetch(shim, id).await?);
    let data = match http_body_util::Limited::new(body, MAX_ARCHIVE)
        .collect()
        .await
    {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(ShimError::BodyTooLarge { limit: MAX_ARCHIVE });
        }
        Err(e) => {
            return Err(ShimError::BadRequest(format!(
                "cannot read the archive: {e}"
            )));
        }
    };
    if !running {
        let kept = shim
            .coordinator
            .containers
            .clone()
            .upload(berth_proto::api::UploadRequest {
                namespace: shim.coordinator.namespace.clone(),
                id: id.to_string(),
                path: path.clone(),
                tar: data.to_vec(),
            })
            .await
            .map_err(|s| ShimError::grpc(Subject::Container(id.to_string()), s))?
            .into_inner();
        tracing::info!(%id, files = kept.files.len(), "copied in before start");
        return Ok(super::empty(StatusCode::OK));
    }
    let ran = run(shim, id, &["tar", "xf", "-", "-C", &path], Some(data)).await?;
    if ran.exit_code != 0 {
        return Err(ShimError::BadRequest(format!(
            "extracting into {path} failed ({}): {}",
            ran.exit_code,
            ran.stderr.trim()
        )));
    }
    Ok(super::empty(StatusCode::OK))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_becomes_dockers_path_stat() {
        let s = path_stat("/etc/hostname|12|81a4|1764000000\n").unwrap();
        assert_eq!(s["name"], "hostname");
        assert_eq!(s["size"], 12);
        assert_eq!(s["mode"], 0o644);
        let d = path_stat("/tmp/a|b|40|41ed|1764000000").unwrap();
        assert_eq!(d["name"], "a|b", "a | in the name survives");
        assert_eq!(d["mode"], (1u32 << 31) | 0o755);
        assert!(path_stat("garbage").is_none());
    }

    #[test]
    fn unix_modes_map_to_go_file_modes() {
        assert_eq!(go_mode(0o100600), 0o600);
        assert_eq!(go_mode(0o120777), (1 << 27) | 0o777);
        assert_eq!(go_mode(0o040700), (1 << 31) | 0o700);
    }
}
