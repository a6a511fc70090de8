//! The fake coordinator's exec: a tiny interpreter of the commands the
//! tests run, answering as `Containers.Exec` does (output chunks tagged
//! with their stream, then one exit).

use berth_proto::agent::LogStream;
use berth_proto::api::*;
use tonic::Status;

/// "Runs" an exec: `cat` (stdin back to stdout until `close_stdin`), or
/// `sh -c` with `;`-separated `echo WORDS`, `echo WORDS >&2`, `cat`,
/// `printenv NAME`, `pwd` and `exit N`. Anything else cannot run (127).
pub async fn interpret(
    start: ExecStart,
    mut input: tonic::Streaming<ExecInput>,
    tx: tokio::sync::mpsc::Sender<Result<ExecOutput, Status>>,
) {
    let script = match start.cmd.as_slice() {
        [sh, c, script] if sh == "sh" && c == "-c" => script.clone(),
        [cat] if cat == "cat" => "cat".to_string(),
        other => {
            let error = format!(
                "exec: {:?}: executable file not found in $PATH",
                other.first()
            );
            let exit = ExecExit {
                exit_code: 127,
                error,
            };
            let _ = tx.send(Ok(exit_message(exit))).await;
            return;
        }
    };
    let out = |stream: LogStream, text: String| {
        let wanted = if stream == LogStream::Stderr {
            start.attach_stderr
        } else {
            start.attach_stdout
        };
        wanted.then(|| ExecOutput {
            kind: Some(exec_output::Kind::Output(LogChunk {
                stream: stream as i32,
                data: text.into_bytes(),
                time_unix_nanos: 0,
            })),
        })
    };
    let mut code = 0;
    for statement in script.split(';').map(str::trim) {
        let mut messages = Vec::new();
        if let Some(words) = statement.strip_prefix("echo ") {
            match words.strip_suffix(" >&2") {
                Some(words) => messages.extend(out(LogStream::Stderr, format!("{words}\n"))),
                None => messages.extend(out(LogStream::Stdout, format!("{words}\n"))),
            }
        } else if let Some(name) = statement.strip_prefix("printenv ") {
            let value = start
                .env
                .iter()
                .find_map(|e| e.strip_prefix(&format!("{name}=")))
                .unwrap_or_default();
            messages.extend(out(LogStream::Stdout, format!("{value}\n")));
        } else if statement == "pwd" {
            messages.extend(out(LogStream::Stdout, format!("{}\n", start.working_dir)));
        } else if statement == "cat" {
            loop {
                match input.message().await {
                    Ok(Some(ExecInput {
                        kind: Some(exec_input::Kind::Stdin(data)),
                    })) => {
                        let text = String::from_utf8_lossy(&data).into_owned();
                        if let Some(m) = out(LogStream::Stdout, text)
                            && tx.send(Ok(m)).await.is_err()
                        {
                            return;
                        }
                    }
                    Ok(Some(ExecInput {
                        kind: Some(exec_input::Kind::CloseStdin(_)),
                    }))
                    | Ok(None) => break,
                    Ok(Some(_)) => {}
                    Err(_) => return,
                }
            }
        } else if let Some(n) = statement.strip_prefix("exit ") {
            code = n.parse().unwrap_or(2);
            break;
        } else if !statement.is_empty() {
            code = 127;
            messages.extend(out(
                LogStream::Stderr,
                format!("sh: {statement}: not found\n"),
            ));
        }
        for m in messages {
            if tx.send(Ok(m)).await.is_err() {
                return;
            }
        }
    }
    let exit = ExecExit {
        exit_code: code,
        error: String::new(),
    };
    let _ = tx.send(Ok(exit_message(exit))).await;
}

fn exit_message(exit: ExecExit) -> ExecOutput {
    ExecOutput {
        kind: Some(exec_output::Kind::Exit(exit)),
    }
}
