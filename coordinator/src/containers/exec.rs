//! `Containers/Exec`: a command in a running container, through the pod
//! exec API, its stdout and stderr kept apart and its exit code read from
//! the status the API ends with.

use std::pin::Pin;

use berth_proto::agent as agent_pb;
use berth_proto::api as pb;
use futures::Stream;
use tonic::Status;

use super::api::{ContainersApi, kube_status};
use super::pod::MAIN_CONTAINER;

/// The command an exec runs: wrapped in `env` and a `cd` when it asks for
/// an environment or a working directory (the pod exec API has neither),
/// so those need `env` and `sh` in the image.
pub fn exec_command(start: &pb::ExecStart) -> Vec<String> {
    let mut cmd = start.cmd.clone();
    if !start.env.is_empty() {
        cmd = std::iter::once("env".to_string())
            .chain(start.env.iter().cloned())
            .chain(cmd)
            .collect();
    }
    if !start.working_dir.is_empty() {
        cmd = ["sh", "-c", "cd \"$1\" && shift && exec \"$@\"", "sh"]
            .into_iter()
            .map(String::from)
            .chain(std::iter::once(start.working_dir.clone()))
            .chain(cmd)
            .collect();
    }
    cmd
}

/// The exit code in the status the exec API ends with.
pub fn exec_exit(
    status: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Status>,
) -> pb::ExecExit {
    let Some(status) = status else {
        return pb::ExecExit {
            exit_code: -1,
            error: "the exec ended without a status".into(),
        };
    };
    if status.status.as_deref() == Some("Success") {
        return pb::ExecExit::default();
    }
    let code = status
        .details
        .as_ref()
        .and_then(|d| d.causes.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.reason.as_deref() == Some("ExitCode")))
        .and_then(|c| c.message.as_deref()?.parse().ok());
    match code {
        Some(exit_code) => pb::ExecExit {
            exit_code,
            error: String::new(),
        },
        None => pb::ExecExit {
            exit_code: 126,
            error: status.message.unwrap_or_else(|| "the exec failed".into()),
        },
    }
}

impl ContainersApi {
    /// Delivers a client's bytes to a container's stdin through the pod
    /// attach API, once the container runs.
    pub(super) async fn stdin(
        &self,
        session: Option<String>,
        mut input: tonic::Streaming<pb::StdinInput>,
    ) -> Result<pb::StdinResult, Status> {
        use kube::api::AttachParams;
        use tokio::io::AsyncWriteExt;

        let first = input
            .message()
            .await?
            .and_then(|m| m.kind)
            .ok_or_else(|| Status::invalid_argument("Stdin: no StdinOpen"))?;
        let pb::stdin_input::Kind::Open(open) = first else {
            return Err(Status::invalid_argument(
                "Stdin: the first message must be a StdinOpen",
            ));
        };
        let space = self.space(&open.namespace).await?.for_session(session);
        let record = space.find(&open.id)?;
        if !record.spec.open_stdin {
            return Err(Status::failed_precondition(format!(
                "container {} was not made with stdin open (docker run -i)",
                record.name
            )));
        }
        let pod = space
            .wait_for(super::api::START_TIMEOUT, |s| {
                let r = s.find(&record.id).ok()?;
                let pod = s.current_pod(&r)?;
                let state = super::pod::state_of(Some(&pod));
                (state.running || state.status == "exited").then_some(pod)
            })
            .await
            .ok_or_else(|| Status::deadline_exceeded("the container did not start"))?;
        if !super::pod::state_of(Some(&pod)).running {
            return Err(Status::failed_precondition(format!(
                "Container {} is not running",
                record.id
            )));
        }
        let name = pod.metadata.name.clone().unwrap_or_default();
        let params = AttachParams {
            container: Some(MAIN_CONTAINER.into()),
            stdin: true,
            stdout: false,
            stderr: false,
            tty: record.spec.tty,
            ..Default::default()
        };
        let mut attached = self
            .pods(&space.namespace)
            .attach(&name, &params)
            .await
            .map_err(|e| kube_status("attaching to the container", e))?;
        let mut stdin = attached
            .stdin()
            .ok_or_else(|| Status::internal("attach without stdin"))?;
        let mut sent = 0u64;
        while let Some(m) = input.message().await? {
            match m.kind {
                Some(pb::stdin_input::Kind::Data(b)) => {
                    stdin
                        .write_all(&b)
                        .await
                        .map_err(|e| Status::unavailable(format!("writing stdin: {e}")))?;
                    sent += b.len() as u64;
                }
                Some(pb::stdin_input::Kind::Close(true)) => break,
                _ => {}
            }
        }
        let _ = stdin.shutdown().await;
        drop(stdin);
        let _ = attached.join().await;
        Ok(pb::StdinResult { bytes: sent })
    }
}

/// The output stream of one exec.
pub type ExecOutputs = Pin<Box<dyn Stream<Item = Result<pb::ExecOutput, Status>> + Send>>;

impl ContainersApi {
    /// Runs an exec through the pod exec API and pumps its streams.
    pub(super) async fn exec(
        &self,
        session: Option<String>,
        mut input: tonic::Streaming<pb::ExecInput>,
    ) -> Result<ExecOutputs, Status> {
        use kube::api::AttachParams;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let first = input
            .message()
            .await?
            .and_then(|m| m.kind)
            .ok_or_else(|| Status::invalid_argument("Exec: no ExecStart"))?;
        let pb::exec_input::Kind::Start(start) = first else {
            return Err(Status::invalid_argument(
                "Exec: the first message must be an ExecStart",
            ));
        };
        if start.cmd.is_empty() {
            return Err(Status::invalid_argument("Exec: cmd is required"));
        }
        let space = self.space(&start.namespace).await?.for_session(session);
        let record = space.find(&start.id)?;
        let pod = space.running_pod(&record)?;
        let name = pod.metadata.name.clone().unwrap_or_default();
        let params = AttachParams {
            container: Some(MAIN_CONTAINER.into()),
            stdin: start.attach_stdin,
            stdout: start.attach_stdout || start.tty,
            stderr: start.attach_stderr && !start.tty,
            tty: start.tty,
            ..Default::default()
        };
        let mut process = self
            .pods(&space.namespace)
            .exec(&name, exec_command(&start), &params)
            .await
            .map_err(|e| kube_status("exec", e))?;
        let status = process
            .take_status()
            .ok_or_else(|| Status::internal("exec without a status channel"))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::ExecOutput, Status>>(16);
        if let Some(mut stdin) = process.stdin() {
            tokio::spawn(async move {
                while let Ok(Some(m)) = input.message().await {
                    let wrote = match m.kind {
                        Some(pb::exec_input::Kind::Stdin(b)) => stdin.write_all(&b).await,
                        Some(pb::exec_input::Kind::CloseStdin(true)) => break,
                        _ => Ok(()),
                    };
                    if wrote.is_err() {
                        return;
                    }
                }
                let _ = stdin.shutdown().await;
            });
        }
        let pump =
            |reader: Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>>,
             stream: agent_pb::LogStream,
             tx: tokio::sync::mpsc::Sender<Result<pb::ExecOutput, Status>>| async move {
                let Some(mut reader) = reader else { return };
                let mut buf = vec![0u8; 32 << 10];
                while let Ok(n) = reader.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    let out = pb::ExecOutput {
                        kind: Some(pb::exec_output::Kind::Output(pb::LogChunk {
                            stream: stream as i32,
                            data: buf[..n].to_vec(),
                            time_unix_nanos: 0,
                        })),
                    };
                    if tx.send(Ok(out)).await.is_err() {
                        return;
                    }
                }
            };
        let out = pump(
            process
                .stdout()
                .map(|r| Box::new(r) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            agent_pb::LogStream::Stdout,
            tx.clone(),
        );
        let err = pump(
            process
                .stderr()
                .map(|r| Box::new(r) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            agent_pb::LogStream::Stderr,
            tx.clone(),
        );
        tokio::spawn(async move {
            futures::join!(out, err);
            let exit = exec_exit(status.await);
            let _ = tx
                .send(Ok(pb::ExecOutput {
                    kind: Some(pb::exec_output::Kind::Exit(exit)),
                }))
                .await;
            drop(process);
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
        Status as KStatus, StatusCause, StatusDetails,
    };

    use super::*;

    #[test]
    fn an_exec_with_env_or_workdir_is_wrapped_and_a_plain_one_is_not() {
        let mut s = pb::ExecStart {
            cmd: vec!["ls".into(), "-l".into()],
            ..Default::default()
        };
        assert_eq!(exec_command(&s), ["ls", "-l"]);
        s.env = vec!["A=1".into()];
        assert_eq!(exec_command(&s), ["env", "A=1", "ls", "-l"]);
        s.working_dir = "/tmp dir".into();
        let cmd = exec_command(&s);
        assert_eq!(&cmd[..2], ["sh", "-c"]);
        assert_eq!(&cmd[3..], ["sh", "/tmp dir", "env", "A=1", "ls", "-l"]);
    }

    #[test]
    fn the_exit_code_comes_from_the_status_the_exec_api_ends_with() {
        let ok = KStatus {
            status: Some("Success".into()),
            ..Default::default()
        };
        assert_eq!(exec_exit(Some(ok)).exit_code, 0);
        let three = KStatus {
            status: Some("Failure".into()),
            reason: Some("NonZeroExitCode".into()),
            details: Some(StatusDetails {
                causes: Some(vec![StatusCause {
                    reason: Some("ExitCode".into()),
                    message: Some("3".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(exec_exit(Some(three)).exit_code, 3);
        let broken = KStatus {
            status: Some("Failure".into()),
            message: Some("executable file not found".into()),
            ..Default::default()
        };
        let e = exec_exit(Some(broken));
        assert_eq!(
            (e.exit_code, e.error.as_str()),
            (126, "executable file not found")
        );
        assert_eq!(exec_exit(None).exit_code, -1);
    }
}
