//! What the debloat tests and benchmark share: the redis image built from
//! Debian's packages, its pod, the workload that drives it, and
//! `node-agent baffs` run against a node's runtime.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};

use crate::Cluster;
use crate::systemd_host::agent_binary;

/// The packages of the redis image: the server, its tools (redis-cli and
/// redis-benchmark drive it) and ping, whose file capability must survive.
pub const REDIS: &[&str] = &["redis-server", "redis-tools", "iputils-ping"];

/// The redis image's run configuration.
pub fn redis_run() -> serde_json::Value {
    serde_json::json!({
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Cmd": ["redis-server", "--protected-mode", "no", "--save", "", "--appendonly", "no"],
        "ExposedPorts": {"6379/tcp": {}},
    })
}

/// A redis pod on `node`, ready when `redis-cli ping` answers.
pub fn redis_pod(ns: &str, name: &str, node: &str, image: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 1
  containers:
  - name: redis
    image: {image}
    readinessProbe:
      exec: {{command: [redis-cli, ping]}}
      periodSeconds: 1
"#
    )
}

/// `kubectl exec` of `args` in the first container of `pod`.
pub fn exec(c: &Cluster, ns: &str, pod: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["-n", ns, "exec", pod, "--"];
    all.extend_from_slice(args);
    c.kubectl(&all)
        .with_context(|| format!("{args:?} in {pod}"))
}

/// The workload: ping, set, get, a short redis-benchmark, and `ping -V`;
/// fails on any wrong answer.
pub fn exercise(c: &Cluster, ns: &str, pod: &str) -> anyhow::Result<()> {
    let run = |args: &[&str]| exec(c, ns, pod, args);
    let want = |args: &[&str], answer: &str| -> anyhow::Result<()> {
        let got = run(args)?;
        if !got.contains(answer) {
            bail!("{args:?} in {pod} answered {got:?}, not {answer:?}");
        }
        Ok(())
    };
    want(&["redis-cli", "ping"], "PONG")?;
    want(&["redis-cli", "set", "berth", "debloat"], "OK")?;
    want(&["redis-cli", "get", "berth"], "debloat")?;
    want(
        &["redis-benchmark", "-q", "-n", "2000", "-t", "set,get"],
        "requests per second",
    )?;
    want(&["ping", "-V"], "ping from iputils")
}

/// SET plus GET requests per second of one `redis-benchmark` run in `pod`.
pub fn throughput(c: &Cluster, ns: &str, pod: &str, requests: u32) -> anyhow::Result<f64> {
    let n = requests.to_string();
    let out = exec(
        c,
        ns,
        pod,
        &["redis-benchmark", "-q", "-n", &n, "-t", "set,get"],
    )?;
    let mut total = 0.0;
    let mut seen = 0;
    // Lines such as "SET: 81300.81 requests per second, p50=0.135 msec".
    for part in out.split(['\r', '\n']) {
        if let Some((_, rest)) = part.split_once(": ")
            && let Some(rps) = rest.split_whitespace().next()
            && rest.contains("requests per second")
        {
            total += rps.parse::<f64>().context("requests per second")?;
            seen += 1;
        }
    }
    if seen != 2 {
        bail!("redis-benchmark printed {out:?}");
    }
    Ok(total)
}

/// `node-agent --cri-socket <node's> baffs ARGS`.
pub fn baffs(c: &Cluster, node: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(agent_binary());
    cmd.arg("--cri-socket")
        .arg(c.node_socket(node))
        .arg("baffs")
        .args(args);
    cmd
}

/// A running `baffs shadow`.
pub struct Shadow {
    child: Child,
}

impl Shadow {
    /// Starts `baffs shadow` of `image` and returns once it profiles a
    /// container.
    pub fn start(c: &Cluster, node: &str, image: &str, profiles: &str) -> anyhow::Result<Shadow> {
        Shadow::spawn(baffs(
            c,
            node,
            &[
                "shadow",
                &format!("--images={image}"),
                "--profiles-dir",
                profiles,
            ],
        ))
    }

    /// Runs `cmd` (a `baffs shadow`, perhaps through `kubectl exec`) and
    /// returns once it profiles a container.
    pub fn spawn(mut cmd: Command) -> anyhow::Result<Shadow> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("node-agent baffs shadow")?;
        let mut err = BufReader::new(child.stderr.take().context("stderr")?);
        let mut line = String::new();
        loop {
            line.clear();
            if err.read_line(&mut line)? == 0 {
                bail!("shadow exited before profiling: {:?}", child.wait());
            }
            if line.contains("profiling") {
                // Keep draining so it never blocks on a full pipe.
                std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
                return Ok(Shadow { child });
            }
        }
    }

    /// SIGINT, then its summary once it has saved the profile.
    pub fn stop(self) -> anyhow::Result<String> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )?;
        self.wait()
    }

    /// Its summary once it ends by itself (`--until-exit`).
    pub fn wait(mut self) -> anyhow::Result<String> {
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .context("stdout")?
            .read_to_string(&mut out)?;
        let status = self.child.wait()?;
        if !status.success() {
            bail!("shadow failed ({status}): {out}");
        }
        Ok(out)
    }
}

impl Drop for Shadow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `baffs debloat --json` of `image`, pushing over plain HTTP to
/// `registry`; returns its summary of the image.
pub fn debloat(
    c: &Cluster,
    node: &str,
    image: &str,
    profiles: &str,
    registry: &str,
) -> anyhow::Result<serde_json::Value> {
    let out = baffs(
        c,
        node,
        &[
            "debloat",
            &format!("--images={image}"),
            "--profiles-dir",
            profiles,
            "--plain-http",
            registry,
            "--json",
        ],
    )
    .output()?;
    if !out.status.success() {
        bail!("debloat failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    // Its progress lines, timed step by step.
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    let mut summary: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(summary[0].take())
}
