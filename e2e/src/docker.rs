//! The Docker API under test: a namespace set up for containers, a real
//! `docker-shim` process in front of the cluster's coordinator (reached as
//! a developer reaches it, through `kubectl port-forward`, with a token from
//! `kubectl create token`), and the real docker CLI pointed at it.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{COORDINATOR_NAME, Cluster, PortForward, TestNamespace, free_port};

/// The Role a Docker API user gets in a test namespace: what Berth checks
/// before it acts (pods: create, get, list, delete; pods/log: get;
/// pods/exec, pods/attach, pods/portforward: create; services for networks: create, get,
/// list, delete).
const USER_ROLE: &str = "berth-docker-user";

/// A namespace where Berth may run containers, with a ServiceAccount `ci`
/// that may use them there and one, `outsider`, that may not.
pub struct DockerNamespace<'a> {
    /// The namespace; deleted when dropped.
    pub ns: TestNamespace<'a>,
    c: &'a Cluster,
}

impl<'a> DockerNamespace<'a> {
    /// Creates the namespace, lets the coordinator run containers there
    /// (ClusterRole `berth-container-runner`) and makes both accounts.
    pub fn new(c: &'a Cluster, prefix: &str) -> anyhow::Result<Self> {
        let ns = TestNamespace::new(c, prefix);
        let n = &ns.name;
        c.apply(&format!(
            "apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: berth-container-runner, namespace: {n}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: berth-container-runner}}
subjects:
- {{kind: ServiceAccount, name: berth-coordinator, namespace: berth-system}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: ci, namespace: {n}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: outsider, namespace: {n}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: {USER_ROLE}, namespace: {n}}}
rules:
- apiGroups: [\"\"]
  resources: [pods, services]
  verbs: [create, get, list, delete]
- apiGroups: [\"\"]
  resources: [pods/log]
  verbs: [get]
- apiGroups: [\"\"]
  resources: [pods/exec, pods/attach, pods/portforward]
  verbs: [create]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: {USER_ROLE}, namespace: {n}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: {USER_ROLE}}}
subjects:
- {{kind: ServiceAccount, name: ci, namespace: {n}}}
"
        ))?;
        Ok(DockerNamespace { ns, c })
    }

    /// `kubectl create token` for a ServiceAccount of this namespace.
    pub fn token(&self, service_account: &str) -> anyhow::Result<String> {
        Ok(self
            .c
            .kubectl(&[
                "-n",
                &self.ns.name,
                "create",
                "token",
                service_account,
                "--duration",
                "1h",
            ])?
            .trim()
            .to_string())
    }

    /// A shim serving this namespace as `service_account`.
    pub async fn shim(&self, service_account: &str) -> anyhow::Result<Shim> {
        self.shim_with(service_account, &[]).await
    }

    /// [`DockerNamespace::shim`] with extra command-line flags.
    pub async fn shim_with(&self, service_account: &str, flags: &[&str]) -> anyhow::Result<Shim> {
        Shim::start(self.c, &self.ns.name, &self.token(service_account)?, flags).await
    }

    /// A pod of the namespace, as JSON.
    pub fn pod_json(&self, name: &str) -> anyhow::Result<serde_json::Value> {
        let out = self
            .c
            .kubectl(&["-n", &self.ns.name, "get", "pod", name, "-o", "json"])?;
        Ok(serde_json::from_str(&out)?)
    }

    /// The names of the Services in the namespace.
    pub fn services(&self) -> anyhow::Result<Vec<String>> {
        let out = self
            .c
            .kubectl(&["-n", &self.ns.name, "get", "services", "-o", "name"])?;
        Ok(out.lines().map(String::from).collect())
    }

    /// Names of the objects Berth made here (container and network
    /// records, pods, the Services of names, copied files).
    pub fn berth_objects(&self) -> anyhow::Result<Vec<String>> {
        let mut all = Vec::new();
        for (kinds, label) in [
            ("configmaps,pods,services", "berth.dev/container"),
            ("configmaps", "berth.dev/network"),
            ("configmaps", "berth.dev/upload-of"),
        ] {
            let out =
                self.c
                    .kubectl(&["-n", &self.ns.name, "get", kinds, "-l", label, "-o", "name"])?;
            all.extend(out.lines().map(String::from));
        }
        Ok(all)
    }
}

/// The shim binary of this build.
pub fn shim_binary() -> anyhow::Result<PathBuf> {
    let target = std::env::var("CARGO_TARGET_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target").to_string());
    let bin = PathBuf::from(target).join("debug/docker-shim");
    if !bin.exists() {
        bail!(
            "{} is missing: run `cargo build --bins` first",
            bin.display()
        );
    }
    Ok(bin)
}

/// A running `docker-shim`; stopped when dropped.
pub struct Shim {
    child: Child,
    /// `tcp://127.0.0.1:PORT`, for `DOCKER_HOST`.
    pub host: String,
    _forward: PortForward,
    _files: tempfile_dir::Dir,
    c_tool_docker: PathBuf,
    tc_python: PathBuf,
}

mod tempfile_dir {
    //! A directory removed on drop.
    /// The directory.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Shim {
    /// Starts a shim for `namespace` that calls the coordinator with `token`.
    pub async fn start(
        c: &Cluster,
        namespace: &str,
        token: &str,
        flags: &[&str],
    ) -> anyhow::Result<Shim> {
        let forward = c.port_forward("berth-coordinator", 7070)?;
        let dir = std::env::temp_dir().join(format!(
            "berth-e2e-shim-{}-{}",
            std::process::id(),
            crate::registry::unique_suffix()
        ));
        std::fs::create_dir_all(&dir)?;
        let files = tempfile_dir::Dir(dir.clone());
        let ca = dir.join("ca.crt");
        std::fs::write(&ca, c.ca_pem().await?)?;
        let token_file = dir.join("token");
        std::fs::write(&token_file, token)?;
        let port = free_port()?;
        let child = Command::new(shim_binary()?)
            .args([
                "--coordinator",
                &format!("https://{}", forward.addr()),
                "--ca-file",
                ca.to_str().unwrap(),
                "--tls-server-name",
                COORDINATOR_NAME,
                "--token-file",
                token_file.to_str().unwrap(),
                "--namespace",
                namespace,
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--socket",
                dir.join("docker.sock").to_str().unwrap(),
            ])
            .args(flags)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("shim.log"))?)
            .spawn()
            .context("starting docker-shim")?;
        let shim = Shim {
            child,
            host: format!("tcp://127.0.0.1:{port}"),
            _forward: forward,
            _files: files,
            c_tool_docker: c.tool("docker"),
            tc_python: c.tool("tc-python/bin/python"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("docker-shim did not listen on {port}: {}", shim.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(shim)
    }

    /// What the shim logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._files.0.join("shim.log")).unwrap_or_default()
    }

    /// Runs the real docker CLI against this shim.
    pub fn docker(&self, args: &[&str]) -> anyhow::Result<Output> {
        let out = Command::new(&self.c_tool_docker)
            .args(args)
            .env("DOCKER_HOST", &self.host)
            .env("DOCKER_CONFIG", self._files.0.join("docker-config"))
            .stdin(Stdio::null())
            .output()
            .context("running the docker CLI")?;
        Ok(out)
    }

    /// Runs the docker CLI with `input` on its stdin; fails if it has not
    /// ended within two minutes (a container still waiting for input).
    pub fn docker_with_stdin(&self, args: &[&str], input: &[u8]) -> anyhow::Result<Output> {
        use std::io::Write;
        let mut child = Command::new(&self.c_tool_docker)
            .args(args)
            .env("DOCKER_HOST", &self.host)
            .env("DOCKER_CONFIG", self._files.0.join("docker-config"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running the docker CLI")?;
        let mut stdin = child.stdin.take().context("docker's stdin")?;
        stdin.write_all(input)?;
        drop(stdin);
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(out) => Ok(out?),
            Err(_) => {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                bail!("docker {} did not end within 2 minutes", args.join(" "))
            }
        }
    }

    /// Starts the docker CLI against this shim without waiting for it; its
    /// stdout is piped.
    pub fn docker_spawn(&self, args: &[&str]) -> anyhow::Result<Child> {
        Command::new(&self.c_tool_docker)
            .args(args)
            .env("DOCKER_HOST", &self.host)
            .env("DOCKER_CONFIG", self._files.0.join("docker-config"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("running the docker CLI")
    }

    /// [`Shim::docker`] that must succeed; its stdout.
    pub fn docker_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.docker(args)?;
        if !out.status.success() {
            bail!(
                "docker {} exited {:?}: {}\nshim log:\n{}",
                args.join(" "),
                out.status.code(),
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Runs `e2e/testcontainers/python_client.py` with testcontainers-python
    /// (`e2e/cluster.sh` installs it) against this shim. Its environment
    /// holds `DOCKER_HOST` and nothing else of Docker's or testcontainers':
    /// their defaults, Ryuk included.
    pub fn testcontainers_python(&self, args: &[&str]) -> anyhow::Result<Output> {
        self.python_command(args)?
            .stdin(Stdio::null())
            .output()
            .context("running testcontainers-python")
    }

    /// The command [`Shim::testcontainers_python`] runs, to spawn with pipes.
    pub fn python_command(&self, args: &[&str]) -> anyhow::Result<Command> {
        if !self.tc_python.is_file() {
            bail!(
                "{} is missing: e2e/cluster.sh build installs testcontainers-python",
                self.tc_python.display()
            );
        }
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testcontainers/python_client.py"
        );
        let mut cmd = Command::new(&self.tc_python);
        cmd.arg(script)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", &self._files.0)
            .env("DOCKER_HOST", &self.host);
        Ok(cmd)
    }

    /// Runs the JUnit tests of `e2e/testcontainers/java` (testcontainers-java
    /// from Maven Central, local repository under `/var/cache/berth/m2`)
    /// against this shim, with `-Dberth.image=IMAGE`. Its environment holds
    /// `DOCKER_HOST` and nothing else of Docker's or testcontainers'.
    /// Answers mvn's output and the surefire report of the test class.
    pub fn testcontainers_java(&self, image: &str) -> anyhow::Result<(Output, String)> {
        let project = concat!(env!("CARGO_MANIFEST_DIR"), "/testcontainers/java");
        let repo = std::env::var("BERTH_M2_REPO").unwrap_or_else(|_| "/var/cache/berth/m2".into());
        let build = self._files.0.join("mvn");
        let out = Command::new("mvn")
            .args([
                "-B",
                "-q",
                "-f",
                &format!("{project}/pom.xml"),
                &format!("-Dmaven.repo.local={repo}"),
                &format!("-Dberth.image={image}"),
                // Build output stays out of the checkout.
                &format!("-Dberth.build.dir={}", build.display()),
                "test",
            ])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", &self._files.0)
            .env("DOCKER_HOST", &self.host)
            .stdin(Stdio::null())
            .output()
            .context("running mvn (testcontainers-java)")?;
        let report = std::fs::read_to_string(
            build.join("surefire-reports/TEST-dev.berth.e2e.BerthDockerApiTest.xml"),
        )
        .unwrap_or_default();
        Ok((out, report))
    }

    /// Stops the shim as an operator does (SIGTERM), and waits for it to exit.
    pub fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        Ok(self.child.wait()?)
    }

    /// Stops the shim at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        self.kill();
    }
}
