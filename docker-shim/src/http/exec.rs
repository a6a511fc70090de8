//! `docker exec`: `POST /containers/{id}/exec` records an instance in the
//! shim's [`crate::exec::ExecStore`] (after checking the container runs),
//! `POST /exec/{id}/start` runs it as one `Containers.Exec` stream, and
//! `GET /exec/{id}/json` reports it.
//!
//! Start opens the stream before it answers, so a refusal (no such
//! container, not running, not allowed) is still an HTTP error status. Then,
//! like attach, it hijacks the connection (`101 UPGRADED`) when the client
//! asks: bytes the client writes go to the command as `stdin` messages (when
//! the exec attached stdin) and its half-close as `close_stdin`; the output
//! goes back as multiplexed frames (raw with a TTY). The exit code is
//! recorded before the connection closes, so the inspect a client sends
//! next (the docker CLI, testcontainers) reads the real code. A client that
//! does not upgrade gets a `200` streamed body and no stdin; `Detach` runs
//! the command with its output discarded and answers at once.

use std::time::Instant;

use berth_proto::api::{ExecInput, ExecOutput, ExecStart, exec_input, exec_output};
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::Streaming;

use super::logs::{streamed, upgraded, wants_upgrade};
use super::{Body, Shim, empty, json, read_body};
use crate::docker::exec::{self as docker_exec, LOST_EXIT_CODE};
use crate::error::{ShimError, Subject};
use crate::exec::{BeginError, ExecStore, Instance, MAX_INSTANCES};
use crate::route::ApiVersion;
use crate::stream::{LogEncoder, RAW, content_type, frame};

/// `POST /containers/{id}/exec`: checks the body and that the container
/// runs, records the instance → 201 `{"Id"}`.
pub async fn create(
    shim: &Shim,
    container: &str,
    body: &Bytes,
) -> Result<Response<Body>, ShimError> {
    let spec = docker_exec::parse_config(body).map_err(ShimError::BadRequest)?;
    let info = super::containers::fetch(shim, container).await?;
    if !info.state.as_ref().is_some_and(|s| s.running) {
        return Err(ShimError::Conflict(format!(
            "Container {} is not running",
            info.id
        )));
    }
    let id = docker_exec::new_id();
    if !shim.execs.insert(&id, &info.id, spec, Instant::now()) {
        return Err(ShimError::TooManyExecs {
            limit: MAX_INSTANCES,
        });
    }
    tracing::debug!(exec = %id, container = %info.id, "exec created");
    Ok(json(StatusCode::CREATED, &json!({ "Id": id })))
}

/// `GET /exec/{id}/json`: Docker's ExecInspect.
pub fn inspect(shim: &Shim, id: &str) -> Result<Response<Body>, ShimError> {
    let inst = shim
        .execs
        .get(id)
        .ok_or_else(|| ShimError::NoSuchExec(id.to_string()))?;
    Ok(json(
        StatusCode::OK,
        &docker_exec::inspect(id, &inst.container_id, &inst.spec, inst.phase),
    ))
}

fn input(kind: exec_input::Kind) -> ExecInput {
    ExecInput { kind: Some(kind) }
}

fn close_stdin() -> ExecInput {
    input(exec_input::Kind::CloseStdin(true))
}

/// Opens the Exec stream for `inst`: the sender for stdin (kept open until
/// the exit arrives) and the output.
async fn open(
    shim: &Shim,
    inst: &Instance,
) -> Result<(mpsc::Sender<ExecInput>, Streaming<ExecOutput>), ShimError> {
    let (tx, rx) = mpsc::channel(16);
    let start = ExecStart {
        namespace: shim.coordinator.namespace.clone(),
        id: inst.container_id.clone(),
        cmd: inst.spec.cmd.clone(),
        env: inst.spec.env.clone(),
        working_dir: inst.spec.working_dir.clone(),
        tty: inst.spec.tty,
        attach_stdin: inst.spec.attach_stdin,
        attach_stdout: inst.spec.attach_stdout,
        attach_stderr: inst.spec.attach_stderr,
    };
    tx.try_send(input(exec_input::Kind::Start(start)))
        .map_err(|e| ShimError::Internal(format!("cannot queue the exec start: {e}")))?;
    let messages =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let output = shim
        .coordinator
        .containers
        .clone()
        .exec(messages)
        .await
        .map_err(|s| ShimError::grpc(Subject::Container(inst.container_id.clone()), s))?
        .into_inner();
    Ok((tx, output))
}

/// `POST /exec/{id}/start`: runs the instance (see the module documentation).
pub async fn start(
    shim: &Shim,
    version: ApiVersion,
    id: &str,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, ShimError> {
    let on_upgrade = wants_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
    let body = read_body(req.into_body()).await?;
    let start = docker_exec::parse_start(&body).map_err(ShimError::BadRequest)?;
    let inst = shim.execs.begin(id).map_err(|e| match e {
        BeginError::Unknown => ShimError::NoSuchExec(id.to_string()),
        BeginError::Running => ShimError::Conflict(format!("Exec command {id} is already running")),
        BeginError::Ended => ShimError::Conflict(format!("Exec command {id} has already run")),
    })?;
    let (tx, output) = match open(shim, &inst).await {
        Ok(opened) => opened,
        Err(e) => {
            shim.execs.undo_begin(id);
            return Err(e);
        }
    };
    tracing::debug!(exec = %id, container = %inst.container_id, detach = start.detach, "exec started");
    let run = Run {
        execs: shim.execs.clone(),
        id: id.to_string(),
        container_id: inst.container_id.clone(),
        tty: inst.spec.tty,
        input: tx,
        output,
    };
    if start.detach {
        let _ = run.input.send(close_stdin()).await;
        tokio::spawn(run.pump(tokio::io::sink()));
        return Ok(empty(StatusCode::OK));
    }
    let Some(on_upgrade) = on_upgrade else {
        // Without a hijack there is no way to read stdin after the body.
        let _ = run.input.send(close_stdin()).await;
        let (wr, rd) = tokio::io::duplex(64 * 1024);
        tokio::spawn(run.pump(wr));
        return Ok(streamed(rd, HeaderValue::from_static(RAW)));
    };
    let kind = content_type(inst.spec.tty || start.tty, version);
    let attach_stdin = inst.spec.attach_stdin;
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(conn) => {
                let (rd, wr) = tokio::io::split(TokioIo::new(conn));
                let feeder = if attach_stdin {
                    Some(tokio::spawn(feed_stdin(rd, run.input.clone())))
                } else {
                    let _ = run.input.send(close_stdin()).await;
                    None
                };
                run.pump(wr).await;
                if let Some(feeder) = feeder {
                    feeder.abort();
                }
            }
            Err(e) => {
                tracing::warn!(exec = %run.id, error = %e, "exec upgrade failed; running it detached");
                let _ = run.input.send(close_stdin()).await;
                run.pump(tokio::io::sink()).await;
            }
        }
    });
    Ok(upgraded(HeaderValue::from_static(kind)))
}

/// Forwards the client's bytes as `stdin` messages; its half-close (or a
/// read error) as `close_stdin`.
async fn feed_stdin<R: AsyncRead + Unpin>(mut rd: R, tx: mpsc::Sender<ExecInput>) {
    let mut buf = vec![0u8; 32 * 1024];
    while let Ok(n) = rd.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let chunk = input(exec_input::Kind::Stdin(buf[..n].to_vec()));
        if tx.send(chunk).await.is_err() {
            return;
        }
    }
    let _ = tx.send(close_stdin()).await;
}

/// A started exec: its stream and where its end is recorded.
struct Run {
    execs: ExecStore,
    id: String,
    container_id: String,
    tty: bool,
    /// Held until the exit arrives: closing the request stream early could
    /// read as the client going away.
    input: mpsc::Sender<ExecInput>,
    output: Streaming<ExecOutput>,
}

impl Run {
    /// Copies the output to `out` until the exit arrives, records the exit
    /// code, then closes `out`. A client that goes away stops the copying,
    /// not the reading: the exit code is still recorded.
    async fn pump<W: AsyncWrite + Unpin>(mut self, mut out: W) {
        let mut encoder = LogEncoder::new(self.tty, false);
        let mut client = true;
        let (code, failure) = loop {
            match self.output.message().await {
                Ok(Some(ExecOutput {
                    kind: Some(exec_output::Kind::Output(chunk)),
                })) => {
                    let bytes = encoder.encode(&chunk);
                    if client
                        && !bytes.is_empty()
                        && (out.write_all(&bytes).await.is_err() || out.flush().await.is_err())
                    {
                        client = false;
                    }
                }
                Ok(Some(ExecOutput {
                    kind: Some(exec_output::Kind::Exit(exit)),
                })) => {
                    let error = (!exit.error.is_empty()).then(|| exit.error.clone());
                    break (docker_exec::exit_code_of(&exit), error);
                }
                Ok(Some(ExecOutput { kind: None })) => {}
                Ok(None) => {
                    break (
                        LOST_EXIT_CODE,
                        Some("the coordinator ended the exec stream without an exit code".into()),
                    );
                }
                Err(s) => {
                    let e = ShimError::grpc(Subject::Container(self.container_id.clone()), s);
                    break (LOST_EXIT_CODE, Some(e.message()));
                }
            }
        };
        if let Some(msg) = &failure {
            tracing::warn!(exec = %self.id, exit_code = code, error = %msg, "exec failed");
            if client {
                let line = format!("berth: {msg}\n");
                let bytes = if self.tty {
                    Bytes::from(line)
                } else {
                    frame(2, line.as_bytes())
                };
                let _ = out.write_all(&bytes).await;
            }
        } else {
            tracing::debug!(exec = %self.id, exit_code = code, "exec ended");
        }
        self.execs.finish(&self.id, code, Instant::now());
        drop(self.input);
        let _ = out.shutdown().await;
    }
}
