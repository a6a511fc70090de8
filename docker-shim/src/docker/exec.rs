//! `docker exec` in Docker's JSON: the body of `POST /containers/{id}/exec`
//! (an ExecConfig) → an [`ExecSpec`], the body of `POST /exec/{id}/start`
//! → [`StartBody`], and an exec instance → the answer of
//! `GET /exec/{id}/json` ([`inspect`]).
//!
//! As with container creation, a setting Berth cannot honour is refused
//! rather than dropped: the pod exec API runs a command as the container's
//! own user and without extra privileges, so `User` and `Privileged` are
//! refused when set.

use serde::Deserialize;
use serde_json::{Value, json};

use super::{null_as_default, string_or_list};

/// The body of `POST /containers/{id}/exec` (the fields Berth reads).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ExecConfig {
    /// Forward the client's stdin to the command.
    #[serde(deserialize_with = "null_as_default")]
    pub attach_stdin: bool,
    /// Send the command's stdout to the client.
    #[serde(deserialize_with = "null_as_default")]
    pub attach_stdout: bool,
    /// Send the command's stderr to the client.
    #[serde(deserialize_with = "null_as_default")]
    pub attach_stderr: bool,
    /// Allocate a terminal.
    #[serde(deserialize_with = "null_as_default")]
    pub tty: bool,
    /// `KEY=value` each, added to the container's environment.
    #[serde(deserialize_with = "null_as_default")]
    pub env: Vec<String>,
    /// The command (a string or a list).
    #[serde(deserialize_with = "string_or_list")]
    pub cmd: Option<Vec<String>>,
    /// Working directory of the command (empty: the container's).
    #[serde(deserialize_with = "null_as_default")]
    pub working_dir: String,
    /// Run as this user (refused when set).
    #[serde(deserialize_with = "null_as_default")]
    pub user: String,
    /// Run with extended privileges (refused when true).
    #[serde(deserialize_with = "null_as_default")]
    pub privileged: bool,
}

/// What an exec instance runs, checked and ready for `ExecStart`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecSpec {
    /// The command and its arguments (never empty).
    pub cmd: Vec<String>,
    /// `KEY=value` each.
    pub env: Vec<String>,
    /// Working directory (empty: the container's).
    pub working_dir: String,
    /// Allocate a terminal.
    pub tty: bool,
    /// Forward stdin.
    pub attach_stdin: bool,
    /// Send stdout.
    pub attach_stdout: bool,
    /// Send stderr.
    pub attach_stderr: bool,
}

/// Reads and checks an exec creation body; the error is the text of the 400.
pub fn parse_config(body: &[u8]) -> Result<ExecSpec, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err("No exec command specified".into());
    }
    let config: ExecConfig =
        serde_json::from_slice(body).map_err(|e| format!("invalid exec configuration: {e}"))?;
    to_spec(config)
}

/// Checks an [`ExecConfig`] and turns it into an [`ExecSpec`].
pub fn to_spec(config: ExecConfig) -> Result<ExecSpec, String> {
    if !config.user.is_empty() {
        return Err(format!(
            "Berth cannot run an exec as user {:?}: the pod exec API runs commands as the container's own user; leave User empty",
            config.user
        ));
    }
    if config.privileged {
        return Err(
            "Berth cannot run a privileged exec: the pod exec API runs commands with the container's own privileges; leave Privileged false"
                .into(),
        );
    }
    let cmd = config.cmd.unwrap_or_default();
    if cmd.is_empty() {
        return Err("No exec command specified".into());
    }
    if let Some(bad) = config
        .env
        .iter()
        .find(|e| e.split('=').next().is_none_or(str::is_empty))
    {
        return Err(format!(
            "invalid environment variable {bad:?}: want KEY=value"
        ));
    }
    Ok(ExecSpec {
        cmd,
        env: config.env,
        working_dir: config.working_dir,
        tty: config.tty,
        attach_stdin: config.attach_stdin,
        attach_stdout: config.attach_stdout,
        attach_stderr: config.attach_stderr,
    })
}

/// The body of `POST /exec/{id}/start`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct StartBody {
    /// Run without attaching: answer at once, discard the output.
    #[serde(deserialize_with = "null_as_default")]
    pub detach: bool,
    /// The client expects a terminal (raw output).
    #[serde(deserialize_with = "null_as_default")]
    pub tty: bool,
}

/// Reads the start body (an empty body is all defaults).
pub fn parse_start(body: &[u8]) -> Result<StartBody, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(StartBody::default());
    }
    serde_json::from_slice(body).map_err(|e| format!("invalid exec start configuration: {e}"))
}

/// A new exec ID: 64 hex digits, as Docker's.
pub fn new_id() -> String {
    (0..4)
        .map(|_| format!("{:016x}", fastrand::u64(..)))
        .collect()
}

/// The exit code recorded when the stream to the coordinator broke before
/// the command's exit arrived (as ssh reports a lost connection).
pub const LOST_EXIT_CODE: i32 = 255;

/// The exit code recorded when the command could not run and the
/// coordinator gave no code (Docker's "cannot invoke").
pub const CANNOT_RUN_EXIT_CODE: i32 = 126;

/// The exit code to record for an `ExecExit`: its own, except that an
/// error with a zero code (the command could not run) is not a success.
pub fn exit_code_of(exit: &berth_proto::api::ExecExit) -> i32 {
    if exit.exit_code == 0 && !exit.error.is_empty() {
        CANNOT_RUN_EXIT_CODE
    } else {
        exit.exit_code
    }
}

/// Where an exec instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Created, not started.
    Created,
    /// Started; the stream to the coordinator is open.
    Running,
    /// Ended with this exit code.
    Exited(i32),
}

/// `GET /exec/{id}/json`: Docker's ExecInspect for an instance.
pub fn inspect(id: &str, container_id: &str, spec: &ExecSpec, phase: Phase) -> Value {
    let exit_code = match phase {
        Phase::Exited(code) => json!(code),
        Phase::Created | Phase::Running => Value::Null,
    };
    let (entrypoint, arguments) = match spec.cmd.split_first() {
        Some((first, rest)) => (first.as_str(), rest.to_vec()),
        None => ("", Vec::new()),
    };
    json!({
        "ID": id,
        "Running": phase == Phase::Running,
        "ExitCode": exit_code,
        "ProcessConfig": {
            "tty": spec.tty,
            "entrypoint": entrypoint,
            "arguments": arguments,
            "privileged": false,
            "user": "",
        },
        "OpenStdin": spec.attach_stdin,
        "OpenStderr": spec.attach_stderr,
        "OpenStdout": spec.attach_stdout,
        "CanRemove": false,
        "ContainerID": container_id,
        "DetachKeys": "",
        "Pid": 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_docker_clis_exec_body_becomes_a_spec() {
        let body = br#"{"User":"","Privileged":false,"Tty":false,"ConsoleSize":[24,80],
            "AttachStdin":true,"AttachStderr":true,"AttachStdout":true,"Detach":false,
            "DetachKeys":"","Env":["A=1"],"WorkingDir":"/tmp","Cmd":["sh","-c","exit 4"]}"#;
        assert_eq!(
            parse_config(body),
            Ok(ExecSpec {
                cmd: vec!["sh".into(), "-c".into(), "exit 4".into()],
                env: vec!["A=1".into()],
                working_dir: "/tmp".into(),
                tty: false,
                attach_stdin: true,
                attach_stdout: true,
                attach_stderr: true,
            })
        );
    }

    #[test]
    fn nulls_and_a_lone_string_command_are_read_as_docker_does() {
        let spec = parse_config(br#"{"Cmd":"ls","Env":null,"User":null}"#).unwrap();
        assert_eq!(spec.cmd, ["ls"]);
        assert!(spec.env.is_empty() && !spec.attach_stdout);
    }

    #[test]
    fn a_user_or_privileges_are_refused_naming_the_field() {
        let user = parse_config(br#"{"Cmd":["id"],"User":"root"}"#).unwrap_err();
        assert!(user.contains("User"), "{user}");
        let privileged = parse_config(br#"{"Cmd":["id"],"Privileged":true}"#).unwrap_err();
        assert!(privileged.contains("Privileged"), "{privileged}");
    }

    #[test]
    fn an_exec_needs_a_command_and_well_formed_json() {
        for body in [&b""[..], b"{}", br#"{"Cmd":[]}"#, br#"{"Cmd":null}"#] {
            assert_eq!(
                parse_config(body),
                Err("No exec command specified".into()),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let wrong = parse_config(br#"{"Cmd":["ls"],"Tty":"yes"}"#).unwrap_err();
        assert!(wrong.starts_with("invalid exec configuration"), "{wrong}");
        let env = parse_config(br#"{"Cmd":["ls"],"Env":["=x"]}"#).unwrap_err();
        assert!(env.contains("KEY=value"), "{env}");
    }

    #[test]
    fn the_start_body_may_be_empty() {
        assert_eq!(parse_start(b""), Ok(StartBody::default()));
        assert_eq!(
            parse_start(br#"{"Detach":true,"Tty":false}"#),
            Ok(StartBody {
                detach: true,
                tty: false
            })
        );
        assert!(parse_start(b"{").is_err());
    }

    #[test]
    fn a_command_that_could_not_run_never_reads_as_a_success() {
        use berth_proto::api::ExecExit;
        let exit = |exit_code, error: &str| ExecExit {
            exit_code,
            error: error.into(),
        };
        assert_eq!(exit_code_of(&exit(4, "")), 4);
        assert_eq!(exit_code_of(&exit(0, "")), 0);
        assert_eq!(exit_code_of(&exit(127, "no such file")), 127);
        assert_eq!(exit_code_of(&exit(0, "no such file")), CANNOT_RUN_EXIT_CODE);
    }

    #[test]
    fn exec_ids_are_64_hex_digits_and_differ() {
        let (a, b) = (new_id(), new_id());
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn inspect_shows_no_exit_code_until_the_command_ends() {
        let spec = ExecSpec {
            cmd: vec!["sh".into(), "-c".into(), "exit 4".into()],
            attach_stdout: true,
            ..Default::default()
        };
        let running = inspect("e1", "c1", &spec, Phase::Running);
        assert_eq!(running["Running"], true);
        assert_eq!(running["ExitCode"], Value::Null);
        assert_eq!(running["ProcessConfig"]["entrypoint"], "sh");
        assert_eq!(
            running["ProcessConfig"]["arguments"],
            json!(["-c", "exit 4"])
        );
        assert_eq!(running["ContainerID"], "c1");
        assert_eq!(running["OpenStdout"], true);
        assert_eq!(running["Pid"], 0);
        let created = inspect("e1", "c1", &spec, Phase::Created);
        assert_eq!(
            (created["Running"].clone(), created["ExitCode"].clone()),
            (json!(false), Value::Null)
        );
        let done = inspect("e1", "c1", &spec, Phase::Exited(4));
        assert_eq!(
            (done["Running"].clone(), done["ExitCode"].clone()),
            (json!(false), json!(4))
        );
    }
}
