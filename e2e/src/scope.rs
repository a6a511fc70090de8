//! What the end-to-end tests share around one test: a namespace of its own
//! that goes (with its caches) when the test ends, waits on a cache's
//! status, and the registry's access log for counting the pulls that reach
//! the registry.

use std::time::Duration;

use anyhow::Context;
use berth_coordinator::imagecache::crd::ImageCache;
use k8s_openapi::api::core::v1::Node;
use kube::Api;

use crate::{Cluster, eventually};

/// A namespace for one test, deleted with its caches when dropped.
pub struct TestNamespace<'a> {
    c: &'a Cluster,
    /// The namespace's name: `PREFIX-UNIQUE`.
    pub name: String,
}

impl<'a> TestNamespace<'a> {
    /// Creates `PREFIX-UNIQUE` (unique per run: an earlier run's namespace
    /// may still be terminating).
    pub fn new(c: &'a Cluster, prefix: &str) -> TestNamespace<'a> {
        let name = format!("{prefix}-{}", crate::registry::unique_suffix());
        c.kubectl(&["create", "namespace", &name]).unwrap();
        TestNamespace { c, name }
    }

    /// The ImageCaches of this namespace.
    pub fn caches(&self) -> Api<ImageCache> {
        Api::namespaced(self.c.client.clone(), &self.name)
    }

    /// `kubectl apply` of an ImageCache here; `spec` is the YAML under
    /// `spec:`, indented two spaces.
    pub fn apply_cache(&self, name: &str, spec: &str) {
        self.c
            .apply(&format!(
                "apiVersion: berth.dev/v1alpha1\nkind: ImageCache\nmetadata: {{name: {name}, namespace: {}}}\nspec:\n{spec}",
                self.name
            ))
            .unwrap();
    }

    /// Waits up to `timeout` until cache `name`'s status satisfies `ok`.
    pub async fn wait_status(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        ok: impl Fn(&ImageCache) -> bool,
    ) -> ImageCache {
        let api = self.caches();
        eventually(timeout, what, || async {
            let c = api.get(name).await?;
            Ok(ok(&c).then_some(c))
        })
        .await
        .unwrap()
    }
}

impl Drop for TestNamespace<'_> {
    fn drop(&mut self) {
        let _ = self.c.kubectl(&[
            "delete",
            "imagecaches",
            "--all",
            "-n",
            &self.name,
            "--wait=false",
        ]);
        let _ = self
            .c
            .kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

/// A cache's phase, empty before its first status.
pub fn phase(c: &ImageCache) -> &str {
    c.status
        .as_ref()
        .map(|s| s.phase.as_str())
        .unwrap_or_default()
}

/// The plain registry's access log (local cluster), read from the line
/// where [`RegistryLog::mark`] left it.
pub struct RegistryLog {
    path: String,
    start: usize,
}

impl RegistryLog {
    /// Remembers where the log ends now.
    pub fn mark(c: &Cluster) -> RegistryLog {
        let path = format!("{}/logs/registry-plain.log", c.var("BERTH_E2E_DIR"));
        let start = std::fs::read_to_string(&path)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        RegistryLog { path, start }
    }

    /// Since the mark, how often `node` fetched the manifest of `image`
    /// (`REGISTRY/REPO:TAG`): the HEAD that resolves its tag, once per pull.
    pub async fn manifest_fetches(
        &self,
        c: &Cluster,
        node: &str,
        image: &str,
    ) -> anyhow::Result<usize> {
        let (repo, tag) = image
            .split_once('/')
            .and_then(|(_, r)| r.rsplit_once(':'))
            .with_context(|| format!("{image} is not REGISTRY/REPO:TAG"))?;
        let request = format!("\"HEAD /v2/{repo}/manifests/{tag} ");
        let ip = internal_ip(c, node).await?;
        let log = std::fs::read_to_string(&self.path).unwrap_or_default();
        Ok(log
            .lines()
            .skip(self.start)
            .filter(|l| l.starts_with(&format!("{ip} ")) && l.contains(&request))
            .count())
    }
}

/// A node's InternalIP.
pub async fn internal_ip(c: &Cluster, node: &str) -> anyhow::Result<String> {
    let nodes: Api<Node> = Api::all(c.client.clone());
    nodes
        .get(node)
        .await?
        .status
        .and_then(|s| s.addresses)
        .unwrap_or_default()
        .into_iter()
        .find(|a| a.type_ == "InternalIP")
        .map(|a| a.address)
        .with_context(|| format!("node {node} has no InternalIP"))
}
