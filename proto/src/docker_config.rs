//! Registry credentials from a Docker config file (`~/.docker/config.json`, or
//! the `.dockerconfigjson` of a Kubernetes Secret), matched to an image's registry.

use std::collections::BTreeMap;

use base64::Engine as _;

use crate::reference::Reference;

/// A user name and password for one registry.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RegistryAuth {
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Why credentials could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file is not a Docker config.
    #[error("{path}: not a Docker config file: {reason}")]
    Malformed {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The IO error.
        source: std::io::Error,
    },
}

#[derive(serde::Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
}

#[derive(serde::Deserialize)]
struct DockerAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// Credentials per registry host, as in a Docker config file.
#[derive(Debug, Default, Clone)]
pub struct DockerCredentials {
    by_host: BTreeMap<String, RegistryAuth>,
}

impl DockerCredentials {
    /// Parses the JSON of a Docker config (`{"auths": {host: {auth | username+password}}}`).
    pub fn parse(json: &[u8], path: &str) -> Result<Self, AuthError> {
        let bad = |reason: String| AuthError::Malformed {
            path: path.to_string(),
            reason,
        };
        let cfg: DockerConfig = serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
        let mut by_host = BTreeMap::new();
        for (host, a) in cfg.auths {
            let auth = match (a.auth, a.username, a.password) {
                (Some(b64), _, _) => {
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(b64.trim())
                        .map_err(|e| bad(format!("auth for {host} is not base64: {e}")))?;
                    let raw = String::from_utf8(raw)
                        .map_err(|_| bad(format!("auth for {host} is not UTF-8")))?;
                    let (u, p) = raw
                        .split_once(':')
                        .ok_or_else(|| bad(format!("auth for {host} is not user:password")))?;
                    RegistryAuth {
                        username: u.into(),
                        password: p.into(),
                    }
                }
                (None, Some(username), Some(password)) => RegistryAuth { username, password },
                _ => {
                    return Err(bad(format!(
                        "entry for {host} has neither auth nor username+password"
                    )));
                }
            };
            by_host.insert(normalize_host(&host), auth);
        }
        Ok(DockerCredentials { by_host })
    }

    /// Reads and parses a Docker config file.
    pub fn load(path: &str) -> Result<Self, AuthError> {
        let bytes = std::fs::read(path).map_err(|source| AuthError::Read {
            path: path.to_string(),
            source,
        })?;
        Self::parse(&bytes, path)
    }

    /// The credentials for the registry `reference` lives in, if any.
    pub fn for_reference(&self, reference: &Reference) -> Option<&RegistryAuth> {
        self.by_host.get(&normalize_host(&reference.domain))
    }
}

/// `https://index.docker.io/v1/` and `docker.io` name the same registry; keys
/// may carry a scheme and a path.
fn normalize_host(key: &str) -> String {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let k = k.split('/').next().unwrap_or(k);
    match k {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_entries_match_by_registry_host() {
        let json = br#"{"auths":{
            "http://10.0.0.1:5001/v2/":{"auth":"dXNlcjpwYXNz"},
            "https://index.docker.io/v1/":{"username":"hub","password":"pw"}}}"#;
        let c = DockerCredentials::parse(json, "cfg").unwrap();
        let a = c
            .for_reference(&Reference::parse("10.0.0.1:5001/x:1").unwrap())
            .unwrap();
        assert_eq!((a.username.as_str(), a.password.as_str()), ("user", "pass"));
        let h = c
            .for_reference(&Reference::parse("busybox").unwrap())
            .unwrap();
        assert_eq!(h.username, "hub");
        assert!(
            c.for_reference(&Reference::parse("other.io/x").unwrap())
                .is_none()
        );
    }

    #[test]
    fn malformed_docker_configs_say_what_is_wrong() {
        for (json, why) in [
            (&br#"{"auths": 3}"#[..], "invalid type"),
            (br#"{"auths":{"h":{"auth":"!!"}}}"#, "not base64"),
            (
                br#"{"auths":{"h":{"auth":"bm9jb2xvbg=="}}}"#,
                "user:password",
            ),
            (br#"{"auths":{"h":{}}}"#, "neither auth"),
        ] {
            let e = DockerCredentials::parse(json, "cfg")
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{e}");
        }
    }
}
