//! Registries a test starts, owns and stops: Debian's `docker-registry` on
//! one of the harness's scratch ports (which the nodes' containerd reaches
//! over plain HTTP), with storage in a temporary directory, optionally behind
//! htpasswd, its access log kept so a test can count what reached it.
//! Stopped by PID when dropped, or earlier with [`ScratchRegistry::stop`]
//! (a backup test takes its source away that way).

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::registry::Registry;
use crate::{Cluster, eventually};

/// Ports this process has handed out.
static TAKEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A registry of one test.
pub struct ScratchRegistry {
    child: Option<Child>,
    port: u16,
    /// `host:port`, as pods and nodes reach it.
    pub host: String,
    /// `user:password` when behind htpasswd.
    pub credentials: Option<(String, String)>,
    dir: tempfile::TempDir,
}

impl ScratchRegistry {
    /// Starts a registry on a free scratch port, behind htpasswd with
    /// `credentials` if given, and waits until it answers.
    pub async fn start(c: &Cluster, credentials: Option<(&str, &str)>) -> anyhow::Result<Self> {
        let ip = c.var("BERTH_REGISTRY_IP").to_string();
        let ports: Vec<u16> = c
            .var("BERTH_SCRATCH_PORTS")
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if ports.is_empty() {
            bail!(
                "the harness names no scratch registry ports (BERTH_SCRATCH_PORTS): run e2e/cluster.sh up"
            );
        }
        let port = {
            let mut taken = TAKEN.lock().unwrap();
            let taken = taken.get_or_insert_with(HashSet::new);
            let port = ports
                .iter()
                .copied()
                .find(|p| {
                    !taken.contains(p) && std::net::TcpListener::bind((ip.as_str(), *p)).is_ok()
                })
                .context("every scratch registry port is in use")?;
            taken.insert(port);
            port
        };
        let host = format!("{ip}:{port}");
        let dir = tempfile::tempdir()?;
        let mut auth = String::new();
        if let Some((u, p)) = credentials {
            let file = dir.path().join("htpasswd");
            let out = Command::new("htpasswd")
                .args(["-Bbc", &file.display().to_string(), u, p])
                .output()
                .context("htpasswd (apache2-utils)")?;
            if !out.status.success() {
                bail!("htpasswd: {}", String::from_utf8_lossy(&out.stderr));
            }
            auth = format!(
                "auth:\n  htpasswd:\n    realm: berth-scratch\n    path: {}\n",
                file.display()
            );
        }
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {{level: warn}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\n  delete: {{enabled: true}}\nhttp: {{addr: \"{host}\"}}\n{auth}",
                dir.path().join("data").display()
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("access.log"))?;
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .context("starting /usr/bin/docker-registry (Debian's docker-registry)")?;
        let r = ScratchRegistry {
            child: Some(child),
            port,
            host: host.clone(),
            credentials: credentials.map(|(u, p)| (u.to_string(), p.to_string())),
            dir,
        };
        let url = format!("http://{host}/v2/");
        eventually(Duration::from_secs(20), &format!("registry {host}"), || {
            let url = url.clone();
            async move {
                let ok = Command::new("curl")
                    .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &url])
                    .output()?;
                let code = String::from_utf8_lossy(&ok.stdout).to_string();
                Ok((code == "200" || code == "401").then_some(()))
            }
        })
        .await?;
        Ok(r)
    }

    /// A client of this registry, logged in if it has credentials.
    pub fn client(&self) -> Registry {
        Registry::new(
            &self.host,
            self.credentials
                .as_ref()
                .map(|(u, p)| (u.as_str(), p.as_str())),
        )
    }

    /// The access log so far.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// Completed blob uploads into `repo` (the PUT that ends each upload).
    pub fn blob_uploads(&self, repo: &str) -> usize {
        let put = format!("\"PUT /v2/{repo}/blobs/uploads/");
        self.access_log()
            .lines()
            .filter(|l| l.contains(&put) && l.contains("\" 201 "))
            .count()
    }

    /// Bytes of blob data the registry stores.
    pub fn stored_bytes(&self) -> u64 {
        fn walk(p: PathBuf) -> u64 {
            let Ok(rd) = std::fs::read_dir(&p) else {
                return 0;
            };
            rd.flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => walk(e.path()),
                    Ok(_) if e.file_name() == "data" => e.metadata().map_or(0, |m| m.len()),
                    _ => 0,
                })
                .sum()
        }
        walk(self.dir.path().join("data/docker/registry/v2/blobs"))
    }

    /// Copies `from` (any registry the harness can read) to `repo:tag` here
    /// with skopeo.
    pub fn skopeo_copy_in(&self, from: &str, repo_tag: &str) -> anyhow::Result<()> {
        let mut cmd = Command::new("skopeo");
        cmd.args([
            "copy",
            "-q",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
        ]);
        if let Some((u, p)) = &self.credentials {
            cmd.arg("--dest-creds").arg(format!("{u}:{p}"));
        }
        let out = cmd
            .arg(format!("docker://{from}"))
            .arg(format!("docker://{}/{repo_tag}", self.host))
            .output()
            .context("skopeo")?;
        if !out.status.success() {
            bail!(
                "skopeo copy {from}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Stops the registry (kill by PID, then reap).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ScratchRegistry {
    fn drop(&mut self) {
        self.stop();
        if let Some(t) = TAKEN.lock().unwrap().as_mut() {
            t.remove(&self.port);
        }
    }
}
