//! A private systemd for one test: `systemd --user` and its session bus in
//! a mount namespace of their own (PID 1 here is not systemd; systemd wants
//! /run/systemd, which gets a tmpfs in that namespace only). Its units are
//! real systemd units; `systemctl --user` with [`SystemdHost::env`] reads
//! them. Stopped when dropped: its pod units first, then systemd (SIGTERM,
//! which stops the rest), then whatever is left of its process group.
//! [`VirtualNode`] runs `node-agent virtual-node` against such a host.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::registry::unique_suffix;
use crate::{Cluster, eventually};

/// A running private systemd.
pub struct SystemdHost {
    child: Child,
    dir: tempfile::TempDir,
}

impl SystemdHost {
    /// Starts it and waits until its manager answers.
    pub async fn start() -> anyhow::Result<Self> {
        for tool in [
            "/lib/systemd/systemd",
            "/usr/bin/dbus-daemon",
            "/usr/bin/unshare",
        ] {
            if !std::path::Path::new(tool).exists() {
                bail!("{tool} is missing (Debian's systemd, dbus and util-linux packages)");
            }
        }
        let dir = tempfile::tempdir()?;
        let run = dir.path().join("run");
        std::fs::create_dir_all(&run)?;
        let script = format!(
            "set -e\nmount -t tmpfs tmpfs /run/systemd\nmkdir -p /run/systemd/system\n\
             export XDG_RUNTIME_DIR={run}\n\
             dbus-daemon --session --address=unix:path={run}/bus --nofork --nopidfile &\n\
             for i in $(seq 100); do [ -S {run}/bus ] && break; sleep 0.05; done\n\
             export DBUS_SESSION_BUS_ADDRESS=unix:path={run}/bus\n\
             exec /lib/systemd/systemd --user\n",
            run = run.display()
        );
        let log = std::fs::File::create(dir.path().join("systemd.log"))?;
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting a private systemd")?;
        let host = SystemdHost { child, dir };
        eventually(Duration::from_secs(20), "the private systemd", || async {
            let out = host.systemctl(&["show", "-p", "Version"])?;
            Ok(String::from_utf8_lossy(&out.stdout)
                .starts_with("Version=")
                .then_some(()))
        })
        .await
        .with_context(|| host.log())?;
        Ok(host)
    }

    /// The bus address of its manager.
    pub fn bus(&self) -> String {
        format!("unix:path={}/run/bus", self.dir.path().display())
    }

    /// Environment that points `systemctl --user` and `journalctl --user` at it.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "XDG_RUNTIME_DIR".into(),
                format!("{}/run", self.dir.path().display()),
            ),
            ("DBUS_SESSION_BUS_ADDRESS".into(), self.bus()),
        ]
    }

    /// `systemctl --user ARGS` against it.
    pub fn systemctl(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Ok(Command::new("systemctl")
            .arg("--user")
            .args(args)
            .envs(self.env())
            .output()?)
    }

    /// Its own log, for failures.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("systemd.log")).unwrap_or_default()
    }
}

impl Drop for SystemdHost {
    fn drop(&mut self) {
        // Units run in process groups of their own: systemd stops them as it
        // exits (SIGTERM); only then is what is left killed.
        let _ = self.systemctl(&["stop", "berth.slice"]);
        let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// The node-agent binary of this build.
pub fn agent_binary() -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target").to_string());
    let bin = PathBuf::from(target).join("debug/node-agent");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --bins` first",
        bin.display()
    );
    bin
}

/// A virtual node process and its Node object; both go when dropped.
pub struct VirtualNode<'a> {
    c: &'a Cluster,
    /// The Node's name.
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl<'a> VirtualNode<'a> {
    /// Starts an agent as a new virtual Node on `host`.
    pub fn start(c: &'a Cluster, host: &SystemdHost) -> VirtualNode<'a> {
        Self::start_as(c, host, format!("berth-virtual-{}", unique_suffix()))
    }

    /// As [`VirtualNode::start`], for the Node `name` (an agent restart).
    pub fn start_as(c: &'a Cluster, host: &SystemdHost, name: String) -> VirtualNode<'a> {
        Self::start_with(c, host, name, &[])
    }

    /// As [`VirtualNode::start_as`], with more arguments.
    pub fn start_with(
        c: &'a Cluster,
        host: &SystemdHost,
        name: String,
        extra: &[String],
    ) -> VirtualNode<'a> {
        let log = std::env::temp_dir().join(format!("{name}.log"));
        let child = Command::new(agent_binary())
            .args([
                "virtual-node",
                "--provider",
                "systemd",
                "--node-name",
                &name,
            ])
            .args(["--kubeconfig", c.var("KUBECONFIG")])
            .args(["--dbus-address", &host.bus()])
            .args(["--internal-ip", c.var("BERTH_REGISTRY_IP")])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        VirtualNode {
            c,
            name,
            child,
            log,
        }
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the agent process only (its Node and units stay).
    pub fn kill_agent(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for VirtualNode<'_> {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = self
            .c
            .kubectl(&["delete", "node", &self.name, "--wait=false"]);
        let _ = std::fs::remove_file(&self.log);
    }
}
